//! The asynchronous store interface the target daemon uses for every export: it submits a
//! [`Request`] (an [`Op`], the buffer the op reads into or writes from, and a token) and
//! later takes [`Done`]s (token, buffer, result) from a [`Completions`] queue after the
//! wake-up that queue was built with (the daemon's eventfd, which its poll loop watches).
//! No thread of the daemon waits for a request.
//!
//! Two kinds of store sit behind it:
//!
//! * a synchronous [`Backend`] (files, block devices) through [`PoolBackend`]: the request
//!   runs on a worker of the shared [`Pool`], so at most `--workers` run at once, and the
//!   behaviour of [`crate::FileBackend`] (latched fdatasync failure, O_DIRECT alignment,
//!   ENOSPC) is unchanged;
//! * a natively asynchronous store (a Ceph RBD image, `aoe-rbd`): it starts the operation
//!   and the library's completion callback pushes the [`Done`], so as many requests are in
//!   flight as the daemon submits (each export's buffer count bounds that).
//!
//! Either way the buffer belongs to the store from [`AsyncBackend::submit`] until its
//! [`Done`] gives it back, so it outlives the operation whatever the caller does meanwhile.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::{Backend, Done, Job, Op, Pool};

/// One operation for an [`AsyncBackend`].
#[derive(Debug)]
pub struct Request {
    /// What to do, and where in `buf` its data is.
    pub op: Op,
    /// The caller's handle, returned as [`Done::user`].
    pub token: u64,
    /// Who asked: a store that queues requests takes them round-robin by source (the
    /// worker pool, [`crate::FairQueue`]); 0 where there is one.
    pub source: u64,
    /// The buffer reads fill and writes take their data from; returned in [`Done`].
    pub buf: Vec<u8>,
}

/// Where finished requests wait for the caller: an unbounded queue plus a wake-up called
/// after each push. It is never longer than the requests submitted and not yet taken back,
/// which the caller bounds (the target by its buffer counts).
pub struct Completions {
    tx: Sender<Done>,
    rx: Receiver<Done>,
    wake: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Completions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completions")
            .field("waiting", &self.rx.len())
            .finish()
    }
}

impl Completions {
    /// A queue whose pushes call `wake` (from whichever thread completes the request).
    pub fn new(wake: Arc<dyn Fn() + Send + Sync>) -> Arc<Completions> {
        let (tx, rx) = crossbeam_channel::unbounded();
        Arc::new(Completions { tx, rx, wake })
    }

    /// Hands a finished request to the caller and wakes it. Never blocks, so a storage
    /// library may call it from its own completion thread.
    pub fn push(&self, done: Done) {
        // The queue owns both ends, so the send cannot fail.
        let _ = self.tx.send(done);
        (self.wake)();
    }

    /// Hands several finished requests to the caller and wakes it once (a merged read's
    /// parts, which finish together).
    pub fn push_all(&self, done: impl IntoIterator<Item = Done>) {
        for d in done {
            let _ = self.tx.send(d);
        }
        (self.wake)();
    }

    /// A finished request, if any, without waiting.
    pub fn try_pop(&self) -> Option<Done> {
        self.rx.try_recv().ok()
    }

    /// Waits at most `timeout` for a finished request.
    pub fn wait(&self, timeout: Duration) -> Option<Done> {
        self.rx.recv_timeout(timeout).ok()
    }
}

/// A store the daemon submits requests to and collects completions from.
///
/// Implementations take `&self` and are shared (`Arc`) between the daemon and, for native
/// stores, the library threads that complete their requests.
pub trait AsyncBackend: Send + Sync + std::fmt::Debug {
    /// Size in bytes now (re-read where the store can be resized under the export).
    fn len(&self) -> u64;

    /// True for a zero-length store.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True if writes are refused.
    fn read_only(&self) -> bool;

    /// True while the store refuses writes after a failure it latched (a file's failed
    /// fdatasync, an RBD image's lost lock); for status and metrics.
    fn failed(&self) -> bool {
        false
    }

    /// Reads at once if that cannot block (see [`Backend::try_read_at`]); `Ok(false)`: submit.
    fn try_read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<bool> {
        Ok(false)
    }

    /// Writes at once if that cannot block (see [`Backend::try_write_at`]); `Ok(false)`:
    /// submit the whole write.
    fn try_write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<bool> {
        Ok(false)
    }

    /// Writes the slices of `bufs` one after the other at once if that can be done without
    /// blocking (see [`Backend::try_write_vectored_at`]); `Ok(false)`: submit each.
    fn try_write_vectored_at(&self, _bufs: &[&[u8]], _offset: u64) -> io::Result<bool> {
        Ok(false)
    }

    /// See [`Backend::nowait_read_source`].
    fn nowait_read_source(
        &self,
        _offset: u64,
        _len: usize,
    ) -> io::Result<Option<(std::os::fd::BorrowedFd<'_>, u64)>> {
        Ok(None)
    }

    /// See [`Backend::inline_read_source`].
    fn inline_read_source(
        &self,
        _offset: u64,
        _len: usize,
    ) -> io::Result<Option<crate::ReadSource<'_>>> {
        Ok(None)
    }

    /// Makes every write completed so far durable, blocking the caller (a stop: `aoe serve`
    /// exits with nothing acknowledged left only in the page cache, as a clean shutdown of
    /// qemu flushes its drives). The default does nothing: a store that flushes when it is
    /// closed (librbd's `rbd_close` writes back its cache) or writes through.
    fn sync_at_stop(&self) -> io::Result<()> {
        Ok(())
    }

    /// Starts `req`; its [`Done`] arrives on the store's [`Completions`]. Gives the request
    /// back, untouched, if the store cannot take it now (a full queue): the caller drops it
    /// and the AoE initiator retransmits. A request it takes is always completed, also with
    /// an error found before it started (a range outside the store, a refused write).
    fn submit(&self, req: Request) -> Result<(), Request>;

    /// Requests taken and not yet started (a pool's queue); the daemon bounds this plus the
    /// writes it holds back for ordering. A native store that starts each request at once
    /// says 0.
    fn queued(&self) -> usize {
        0
    }

    /// True if the store reads a run of contiguous reads faster as one operation than one
    /// by one ([`AsyncBackend::submit_reads`]): the daemon then holds each receive batch's
    /// reads back and hands them over together at the batch's end. A store where every
    /// operation costs a network round trip and a message of its own (an RBD image: one
    /// OSD op per librbd read) says so; a file on the worker pool does not.
    fn merges_reads(&self) -> bool {
        false
    }

    /// Starts `reads` (all [`Op::Read`]s, from one receive batch, in arrival order); gives
    /// back, untouched, those the store cannot take now, as [`AsyncBackend::submit`] does.
    /// Each read still completes on its own [`Done`], with its own token and buffer. The
    /// default submits them one by one; a store that [merges](AsyncBackend::merges_reads)
    /// reads the [`read_runs`] of them as one operation each.
    fn submit_reads(&self, reads: Vec<Request>) -> Vec<Request> {
        reads
            .into_iter()
            .filter_map(|r| self.submit(r).err())
            .collect()
    }
}

/// Reads whose byte ranges follow one another with no gap: one operation of `len` bytes at
/// `offset`, scattered into the parts' buffers (each part's data goes to `buf[at]` of its
/// [`Op::Read`], in order). A sequential initiator's requests are one frame each (1 KiB at
/// MTU 1500, 8 KiB at 9000); a run of them costs a network store one round trip and one
/// message instead of one per frame.
#[derive(Debug)]
pub struct ReadRun {
    /// Where the first part starts in the store.
    pub offset: u64,
    /// The parts' lengths added up.
    pub len: u64,
    /// The reads, in store order.
    pub parts: Vec<Request>,
}

/// Groups `reads` into [`ReadRun`]s: sorted by offset (a stable sort: equal offsets keep
/// their order), a read joins the run before it if it starts exactly where that run ends and
/// the run stays within `max_bytes` and `max_parts`; otherwise (a gap, an overlap such as a
/// retransmitted request read twice, a full run) it starts a run of its own. A request that
/// is not a read is a run of its own (offset and length 0), after the reads' runs: the
/// caller submits one-part runs as they are.
pub fn read_runs(reads: Vec<Request>, max_bytes: u64, max_parts: usize) -> Vec<ReadRun> {
    let mut spans: Vec<(u64, u64, Request)> = Vec::with_capacity(reads.len());
    let mut others = Vec::new();
    for r in reads {
        match &r.op {
            Op::Read { offset, at } => spans.push((*offset, at.len() as u64, r)),
            _ => others.push(ReadRun {
                offset: 0,
                len: 0,
                parts: vec![r],
            }),
        }
    }
    spans.sort_by_key(|s| s.0);
    let mut runs: Vec<ReadRun> = Vec::with_capacity(spans.len().min(8));
    for (offset, len, r) in spans {
        if let Some(run) = runs.last_mut() {
            if run.offset.checked_add(run.len) == Some(offset)
                && run.len.saturating_add(len) <= max_bytes
                && run.parts.len() < max_parts
            {
                run.len += len;
                run.parts.push(r);
                continue;
            }
        }
        runs.push(ReadRun {
            offset,
            len,
            parts: vec![r],
        });
    }
    runs.extend(others);
    runs
}

/// A synchronous [`Backend`] served through the asynchronous interface by a shared worker
/// [`Pool`]: each request is a [`Job`] on a worker thread; its [`Done`] goes to the pool's
/// [`Completions`].
#[derive(Debug)]
pub struct PoolBackend {
    backend: Arc<dyn Backend>,
    pool: Arc<Pool>,
}

impl PoolBackend {
    /// `backend`, run on `pool`'s workers.
    pub fn new(backend: Arc<dyn Backend>, pool: Arc<Pool>) -> PoolBackend {
        PoolBackend { backend, pool }
    }

    /// The synchronous store underneath.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
}

impl AsyncBackend for PoolBackend {
    fn len(&self) -> u64 {
        self.backend.len()
    }

    fn read_only(&self) -> bool {
        self.backend.read_only()
    }

    fn failed(&self) -> bool {
        self.backend.failed()
    }

    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        self.backend.try_read_at(buf, offset)
    }

    fn try_write_at(&self, buf: &[u8], offset: u64) -> io::Result<bool> {
        self.backend.try_write_at(buf, offset)
    }

    fn try_write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<bool> {
        self.backend.try_write_vectored_at(bufs, offset)
    }

    fn nowait_read_source(
        &self,
        offset: u64,
        len: usize,
    ) -> io::Result<Option<(std::os::fd::BorrowedFd<'_>, u64)>> {
        self.backend.nowait_read_source(offset, len)
    }

    fn inline_read_source(
        &self,
        offset: u64,
        len: usize,
    ) -> io::Result<Option<crate::ReadSource<'_>>> {
        self.backend.inline_read_source(offset, len)
    }

    fn sync_at_stop(&self) -> io::Result<()> {
        // fdatasync(2) for a writable file; nothing for a read-only one.
        self.backend.flush()
    }

    fn submit(&self, req: Request) -> Result<(), Request> {
        self.pool
            .try_submit(Job {
                backend: self.backend.clone(),
                op: req.op,
                user: req.token,
                source: req.source,
                buf: req.buf,
            })
            .map_err(|j| Request {
                op: j.op,
                token: j.user,
                source: j.source,
                buf: j.buf,
            })
    }

    fn queued(&self) -> usize {
        self.pool.queued()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemBackend;

    #[test]
    fn a_pool_backend_completes_through_the_shared_queue() {
        let woke = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = woke.clone();
        let done = Completions::new(Arc::new(move || {
            w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        let pool = Arc::new(Pool::with_completions(2, 16, done.clone()).unwrap());
        let mem = Arc::new(MemBackend::new(4096));
        let store = PoolBackend::new(mem.clone(), pool);
        let mut buf = vec![0u8; 1024];
        buf[..512].fill(9);
        store
            .submit(Request {
                op: Op::Write {
                    offset: 1024,
                    from: 0..512,
                },
                token: 7,
                source: 0,
                buf,
            })
            .unwrap();
        let d = done.wait(Duration::from_secs(5)).unwrap();
        assert_eq!(d.user, 7);
        d.result.unwrap();
        assert!(mem.snapshot()[1024..1536].iter().all(|b| *b == 9));
        store
            .submit(Request {
                op: Op::WriteZeroes {
                    offset: 1024,
                    len: 256,
                },
                token: 8,
                source: 0,
                buf: Vec::new(),
            })
            .unwrap();
        let d = done.wait(Duration::from_secs(5)).unwrap();
        assert_eq!(d.user, 8);
        d.result.unwrap();
        let snap = mem.snapshot();
        assert!(snap[1024..1280].iter().all(|b| *b == 0));
        assert!(snap[1280..1536].iter().all(|b| *b == 9));
        assert_eq!(woke.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(done.try_pop().is_none());
    }

    /// A read of `len` bytes at `offset` into a reply-like buffer: 36 header bytes (left
    /// as 0xee, which no read may touch) then the data.
    fn read(token: u64, offset: u64, len: usize) -> Request {
        Request {
            op: Op::Read {
                offset,
                at: 36..36 + len,
            },
            token,
            source: 0,
            buf: vec![0xee; 36 + len + 8],
        }
    }

    fn shape(runs: &[ReadRun]) -> Vec<(u64, u64, Vec<u64>)> {
        runs.iter()
            .map(|r| (r.offset, r.len, r.parts.iter().map(|p| p.token).collect()))
            .collect()
    }

    #[test]
    fn read_runs_join_what_follows_on_in_store_order() {
        // Arrival order shuffled: 0..3 contiguous, a gap, 5..7 contiguous, and 66, a second
        // read of 6's range (a retransmit): it overlaps, so it starts a run of its own, which
        // 7 (starting where 66 ends) joins; a stable sort keeps 6 before 66.
        let k = 1024u64;
        let reads = vec![
            read(2, 2 * k, 1024),
            read(6, 6 * k, 1024),
            read(0, 0, 1024),
            read(5, 5 * k, 1024),
            read(1, k, 1024),
            read(66, 6 * k, 1024),
            read(7, 7 * k, 1024),
        ];
        assert_eq!(
            shape(&read_runs(reads, 1 << 20, 64)),
            vec![
                (0, 3 * k, vec![0, 1, 2]),
                (5 * k, 2 * k, vec![5, 6]),
                (6 * k, 2 * k, vec![66, 7]),
            ]
        );
    }

    #[test]
    fn read_runs_stop_at_their_limits_and_leave_other_ops_alone() {
        let k = 1024u64;
        let reads: Vec<Request> = (0..10).map(|i| read(i, i * k, 1024)).collect();
        // At most 4 parts a run.
        assert_eq!(
            shape(&read_runs(reads, 1 << 20, 4)),
            vec![
                (0, 4 * k, vec![0, 1, 2, 3]),
                (4 * k, 4 * k, vec![4, 5, 6, 7]),
                (8 * k, 2 * k, vec![8, 9]),
            ]
        );
        // At most 3 KiB a run; a read longer than that is a run of its own.
        let mut reads: Vec<Request> = (0..5).map(|i| read(i, i * k, 1024)).collect();
        reads.push(read(9, 5 * k, 8192));
        assert_eq!(
            shape(&read_runs(reads, 3 * k, 64)),
            vec![
                (0, 3 * k, vec![0, 1, 2]),
                (3 * k, 2 * k, vec![3, 4]),
                (5 * k, 8 * k, vec![9]),
            ]
        );
        // Not a read: a run of its own, never joined.
        let flush = Request {
            op: Op::Flush,
            token: 50,
            source: 0,
            buf: Vec::new(),
        };
        let runs = read_runs(vec![read(0, 0, 1024), flush, read(1, k, 1024)], 1 << 20, 64);
        let mut got = shape(&runs);
        got.sort_by_key(|r| r.2.clone());
        assert_eq!(got, vec![(0, 2 * k, vec![0, 1]), (0, 0, vec![50])]);
    }

    /// A test store that merges: each run of [`read_runs`] is one read of the memory store
    /// (counted) into a scratch buffer, scattered into the parts' buffers as librbd's
    /// `rbd_aio_readv` scatters into its iovecs.
    #[derive(Debug)]
    struct Merging {
        mem: MemBackend,
        done: Arc<Completions>,
        ops: std::sync::atomic::AtomicUsize,
    }

    impl AsyncBackend for Merging {
        fn len(&self) -> u64 {
            Backend::len(&self.mem)
        }
        fn read_only(&self) -> bool {
            true
        }
        fn submit(&self, req: Request) -> Result<(), Request> {
            match self.submit_reads(vec![req]).pop() {
                Some(r) => Err(r),
                None => Ok(()),
            }
        }
        fn merges_reads(&self) -> bool {
            true
        }
        fn submit_reads(&self, reads: Vec<Request>) -> Vec<Request> {
            for run in read_runs(reads, 16 << 10, 64) {
                self.ops.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut data = vec![0u8; run.len as usize];
                let r = self.mem.read_at(&mut data, run.offset);
                let mut at_run = 0;
                for mut p in run.parts {
                    let Op::Read { at, .. } = p.op.clone() else {
                        unreachable!("reads only")
                    };
                    p.buf[at.clone()].copy_from_slice(&data[at_run..at_run + at.len()]);
                    at_run += at.len();
                    self.done.push(Done {
                        user: p.token,
                        buf: p.buf,
                        result: r
                            .as_ref()
                            .map(|_| ())
                            .map_err(|e| io::Error::new(e.kind(), e.to_string())),
                    });
                }
            }
            Vec::new()
        }
    }

    #[test]
    fn merged_reads_scatter_the_right_bytes_into_the_right_buffers() {
        let done = Completions::new(Arc::new(|| {}));
        let mem = MemBackend::new(64 << 10);
        let pattern: Vec<u8> = (0..64 << 10)
            .map(|i: u32| (i * 7 + i / 251) as u8)
            .collect();
        mem.write_at(&pattern, 0).unwrap();
        let store = Merging {
            mem,
            done: done.clone(),
            ops: Default::default(),
        };
        // 40 reads of 1 KiB up to the store's end, shuffled, plus one far away: runs of at
        // most 16 KiB, so 16 + 16 + 8 KiB and the lone one.
        let end = 64u64 << 10;
        let mut reads: Vec<Request> = (0..40)
            .map(|i| read(i, end - (40 - i) * 1024, 1024))
            .collect();
        reads.push(read(99, 4096, 512));
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for i in (1..reads.len()).rev() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            reads.swap(i, (rng % (i as u64 + 1)) as usize);
        }
        let want: std::collections::HashMap<u64, (u64, usize)> = reads
            .iter()
            .map(|r| match &r.op {
                Op::Read { offset, at } => (r.token, (*offset, at.len())),
                _ => unreachable!(),
            })
            .collect();
        assert!(store.submit_reads(reads).is_empty());
        assert_eq!(store.ops.load(std::sync::atomic::Ordering::SeqCst), 4);
        let mut seen = 0;
        while let Some(d) = done.try_pop() {
            d.result.unwrap();
            let (offset, len) = want[&d.user];
            let o = offset as usize;
            assert!(
                d.buf[36..36 + len] == pattern[o..o + len],
                "read {} (at {offset}) got another range's bytes",
                d.user
            );
            assert!(d.buf[..36]
                .iter()
                .chain(&d.buf[36 + len..])
                .all(|&b| b == 0xee));
            seen += 1;
        }
        assert_eq!(seen, 41);
    }
}
