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

    fn submit(&self, req: Request) -> Result<(), Request> {
        self.pool
            .try_submit(Job {
                backend: self.backend.clone(),
                op: req.op,
                user: req.token,
                buf: req.buf,
            })
            .map_err(|j| Request {
                op: j.op,
                token: j.user,
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
}
