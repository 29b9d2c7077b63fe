//! FUSE over io_uring for the file system ([`crate::fs`]): the requests the kernel puts in
//! ring entries ([`aoe_sys::fuse_uring`]) instead of `/dev/fuse`, parsed and answered here.
//!
//! fuser keeps the mount, `FUSE_INIT` (where `FUSE_OVER_IO_URING` is asked for) and its
//! `/dev/fuse` loop, which still gets `FORGET`, `BATCH_FORGET` and `INTERRUPT`
//! (fs/fuse/dev_uring.c sends only through the ring what goes through `fiq->ops->send_req`).
//! Every other request arrives in a ring entry, once entries are registered on every queue:
//! each is answered here, `ENOSYS` for an opcode the file system does not serve.
//!
//! A device-file WRITE's payload is the data the kernel copied out of the writer's pages;
//! a READ's answer is gathered into the entry's payload, which the kernel copies into the
//! reader's pages at the commit.
//!
//! The ring is served on the initiator's network thread ([`RingSource`], an
//! [`aoe_initiator::net::Source`]): it registers the entries (so the kernel runs the
//! requests' task work there), polls the ring's fd with its sockets, hands device-file I/O
//! to the engine without a thread hop or an eventfd, and commits the answers. Nothing there
//! may block, so every other request (LOOKUP, OPEN, a read of `err` that waits for a line,
//! a write to `discover`, ...) goes to a side thread with its entry's payload block, and
//! comes back with the answer in it for the network thread to commit: one thread pushes
//! and submits every command of the ring.

use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use aoe_initiator::net::{lock, Cmd, ErrWaiter, Handle, Interest, Source};
use aoe_proto::initiator::Lent;
use aoe_sys::fuse_uring::{
    possible_cpus, request_payload_len, FuseUring, Ready, HEADER_LEN, OP_IN_AT,
};
use fuser::{Errno, FileAttr, FileType};

use crate::fs::{node, slice_at, AoeFs, Node, ERR, INTERFACES, MAX_BACKGROUND, TTL};
use crate::openers::is_direct;

/// `enum fuse_opcode` (include/uapi/linux/fuse.h), the ones answered here.
pub(crate) mod op {
    pub const LOOKUP: u32 = 1;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const DESTROY: u32 = 38;
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes(s.try_into().unwrap_or_default()))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_le_bytes(s.try_into().unwrap_or_default()))
}

/// `struct fuse_in_header` (40 bytes): len, opcode, unique, nodeid, uid, gid, pid,
/// total_extlen, padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InHeader {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub pid: u32,
}

impl InHeader {
    pub const LEN: usize = 40;
    pub fn parse(b: &[u8]) -> Option<InHeader> {
        if b.len() < Self::LEN {
            return None;
        }
        Some(InHeader {
            opcode: u32_at(b, 4),
            unique: u64_at(b, 8),
            nodeid: u64_at(b, 16),
            pid: u32_at(b, 32),
        })
    }
}

/// `struct fuse_read_in` (40 bytes), also READDIR's: fh, offset, size, read_flags,
/// lock_owner, flags, padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub flags: u32,
}

impl ReadIn {
    pub fn parse(b: &[u8]) -> ReadIn {
        ReadIn {
            fh: u64_at(b, 0),
            offset: u64_at(b, 8),
            size: u32_at(b, 16),
            flags: u32_at(b, 32),
        }
    }
}

/// `struct fuse_write_in` (40 bytes): fh, offset, size, write_flags, lock_owner, flags,
/// padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WriteIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
}

impl WriteIn {
    pub fn parse(b: &[u8]) -> WriteIn {
        WriteIn {
            fh: u64_at(b, 0),
            offset: u64_at(b, 8),
            size: u32_at(b, 16),
        }
    }
}

/// `struct fuse_open_in` (flags, open_flags), `fuse_release_in` and `fuse_fsync_in` (fh,
/// flags, ...), `fuse_getxattr_in` (size, padding): the fields read of them.
pub(crate) fn open_in_flags(b: &[u8]) -> u32 {
    u32_at(b, 0)
}
pub(crate) fn release_in_fh(b: &[u8]) -> u64 {
    u64_at(b, 0)
}
/// `fuse_setattr_in`: the size if `FATTR_SIZE` is set, and whether a file handle came
/// (`FATTR_FH`: an `ftruncate`, not an `open(O_TRUNC)` or `truncate(2)`).
pub(crate) fn setattr_in_size(b: &[u8]) -> (Option<u64>, bool) {
    const FATTR_SIZE: u32 = 1 << 3;
    const FATTR_FH: u32 = 1 << 6;
    let valid = u32_at(b, 0);
    let size = (valid & FATTR_SIZE != 0).then(|| u64_at(b, 16));
    (size, valid & FATTR_FH != 0)
}
pub(crate) fn getxattr_in_size(b: &[u8]) -> u32 {
    u32_at(b, 0)
}

fn put_u32(out: &mut [u8], at: usize, v: u32) {
    out[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut [u8], at: usize, v: u64) {
    out[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// `struct fuse_attr` (88 bytes).
pub(crate) const ATTR_LEN: usize = 88;

fn since_epoch(t: SystemTime) -> (u64, u32) {
    t.duration_since(UNIX_EPOCH)
        .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()))
}

fn mode_of(a: &FileAttr) -> u32 {
    let kind = match a.kind {
        FileType::Directory => libc::S_IFDIR,
        FileType::RegularFile => libc::S_IFREG,
        FileType::Symlink => libc::S_IFLNK,
        FileType::NamedPipe => libc::S_IFIFO,
        FileType::CharDevice => libc::S_IFCHR,
        FileType::BlockDevice => libc::S_IFBLK,
        FileType::Socket => libc::S_IFSOCK,
    };
    kind | u32::from(a.perm)
}

/// Encodes `struct fuse_attr`: ino, size, blocks, atime, mtime, ctime, their nsecs, mode,
/// nlink, uid, gid, rdev, blksize, flags.
pub(crate) fn encode_attr(a: &FileAttr, out: &mut [u8]) {
    let (at, atn) = since_epoch(a.atime);
    let (mt, mtn) = since_epoch(a.mtime);
    let (ct, ctn) = since_epoch(a.ctime);
    put_u64(out, 0, a.ino.0);
    put_u64(out, 8, a.size);
    put_u64(out, 16, a.blocks);
    put_u64(out, 24, at);
    put_u64(out, 32, mt);
    put_u64(out, 40, ct);
    put_u32(out, 48, atn);
    put_u32(out, 52, mtn);
    put_u32(out, 56, ctn);
    put_u32(out, 60, mode_of(a));
    put_u32(out, 64, a.nlink);
    put_u32(out, 68, a.uid);
    put_u32(out, 72, a.gid);
    put_u32(out, 76, a.rdev);
    put_u32(out, 80, a.blksize);
    put_u32(out, 84, a.flags);
}

/// `struct fuse_attr_out` (104 bytes): attr_valid, attr_valid_nsec, dummy, attr.
pub(crate) fn encode_attr_out(a: &FileAttr, out: &mut [u8]) -> usize {
    put_u64(out, 0, TTL.as_secs());
    put_u32(out, 8, TTL.subsec_nanos());
    put_u32(out, 12, 0);
    encode_attr(a, &mut out[16..16 + ATTR_LEN]);
    16 + ATTR_LEN
}

/// `struct fuse_entry_out` (128 bytes): nodeid, generation, entry_valid, attr_valid, their
/// nsecs, attr.
pub(crate) fn encode_entry_out(a: &FileAttr, out: &mut [u8]) -> usize {
    put_u64(out, 0, a.ino.0);
    put_u64(out, 8, 0);
    put_u64(out, 16, TTL.as_secs());
    put_u64(out, 24, TTL.as_secs());
    put_u32(out, 32, TTL.subsec_nanos());
    put_u32(out, 36, TTL.subsec_nanos());
    encode_attr(a, &mut out[40..40 + ATTR_LEN]);
    40 + ATTR_LEN
}

/// `struct fuse_open_out` (16 bytes): fh, open_flags, backing_id.
pub(crate) fn encode_open_out(fh: u64, flags: u32, out: &mut [u8]) -> usize {
    put_u64(out, 0, fh);
    put_u32(out, 8, flags);
    put_u32(out, 12, 0);
    16
}

/// `struct fuse_write_out` (8 bytes): size, padding; also `fuse_getxattr_out`.
pub(crate) fn encode_size_out(size: u32, out: &mut [u8]) -> usize {
    put_u32(out, 0, size);
    put_u32(out, 4, 0);
    8
}

/// `struct fuse_kstatfs` in `fuse_statfs_out` (80 bytes), what fuser answers by default:
/// no blocks, no files, bsize 512, namelen 255.
pub(crate) fn encode_statfs_out(out: &mut [u8]) -> usize {
    out[..80].fill(0);
    put_u32(out, 40, 512);
    put_u32(out, 44, 255);
    put_u32(out, 48, 0);
    80
}

/// `struct fuse_dirent` entries (ino, off, namelen, type, name padded to 8 bytes) of
/// `entries` from index `offset` on, as many as fit in `size` bytes of `out`.
pub(crate) fn encode_dirents(
    entries: &[(u64, FileType, String)],
    offset: u64,
    size: usize,
    out: &mut [u8],
) -> usize {
    let room = size.min(out.len());
    let mut at = 0;
    for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
        let n = name.len();
        let len = (24 + n).div_ceil(8) * 8;
        if at + len > room {
            break;
        }
        let t = mode_of(&FileAttr {
            ino: fuser::INodeNo(*ino),
            size: 0,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: *kind,
            perm: 0,
            nlink: 0,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 0,
            flags: 0,
        }) >> 12;
        let e = &mut out[at..at + len];
        put_u64(e, 0, *ino);
        put_u64(e, 8, (i + 1) as u64);
        put_u32(e, 16, n as u32);
        put_u32(e, 20, t);
        e[24..24 + n].copy_from_slice(name.as_bytes());
        e[24 + n..].fill(0);
        at += len;
    }
    at
}

/// An answer completed elsewhere (the engine, the side thread, a waiter of `err`), for the
/// network thread to commit in the ring source's next run.
enum Answer {
    /// Bytes to put in the payload of a device read: the entry's own payload block, or
    /// else the engine's buffer, recycled after.
    Data(usize, Result<Vec<u8>, Errno>),
    /// A write's count.
    Written(usize, Result<u32, Errno>),
    /// A lent payload back ([`Lent`]).
    Home(usize, Vec<u8>),
    /// An empty answer (fsync).
    Empty(usize, Result<(), Errno>),
    /// The side thread's answer: the entry's payload block back, the answer's bytes at its
    /// start, or the error.
    Side(usize, Vec<u8>, Result<usize, Errno>),
}

/// The sender of answers to the ring source.
#[derive(Clone)]
struct Answers {
    tx: crossbeam_channel::Sender<Answer>,
    /// Wakes the network thread (a no-op on it: it asks its sources before it sleeps).
    net: Handle,
    /// A wake-up is on its way and the channel not yet drained: no other needed (a write
    /// sends two answers, its buffer home and its count, often back to back).
    woken: Arc<AtomicBool>,
}

impl Answers {
    fn send(&self, a: Answer) {
        // Only once the source is gone is the receiver gone too: nobody to answer.
        if self.tx.send(a).is_ok() && !self.woken.swap(true, Ordering::AcqRel) {
            self.net.wake();
        }
    }
}

/// A read of `err` waiting for a line, answered into the entry's payload block.
struct RingErrReply(Answers, usize, Vec<u8>);

impl ErrWaiter for RingErrReply {
    fn line(self: Box<Self>, line: &[u8]) {
        let RingErrReply(answers, i, mut payload) = *self;
        let n = line.len().min(payload.len());
        payload[..n].copy_from_slice(&line[..n]);
        answers.send(Answer::Side(i, payload, Ok(n)));
    }
    fn interrupted(self: Box<Self>) {
        let RingErrReply(answers, i, payload) = *self;
        answers.send(Answer::Side(i, payload, Err(Errno::EINTR)));
    }
}

/// Entries per queue: the writes and reads in flight at once per CPU. Every background
/// request the kernel lets out at once (`max_background`, [`MAX_BACKGROUND`]: one process's
/// direct I/O or read-ahead, all submitted from one CPU) and a few synchronous ones beside
/// them: a queue's requests beyond its entries wait in the kernel, first in first out
/// (fs/fuse/dev_uring.c, `fuse_req_queue`), where no source of the engine's serves them in
/// turn. With 32, a database's 4 KiB read submitted on the CPU of a backup's 64 requests
/// waited behind the 32 of them that had no entry (8 MiB; fio.rs
/// `fio_small_read_is_not_queued_behind_another_openers_backlog_fuse_uring`). An entry's
/// payload block ([`crate::fs`]'s `WRITE_REQUEST_BYTES`) is address space until a request
/// is written into it: at most 72 MiB a CPU, against 32 MiB with 32 entries.
pub(crate) const PER_QUEUE: u16 = MAX_BACKGROUND + 8;

/// How long the ring's registration waits for `FUSE_INIT` to be answered (`EAGAIN` until
/// then) before it gives up with that error.
const INIT_WAIT: Duration = Duration::from_secs(10);

/// A request the network thread hands to the side thread: the entry, a copy of its header,
/// its payload block (lent) and the payload's length.
struct Job {
    i: usize,
    hdr: Box<[u8; HEADER_LEN]>,
    payload: Vec<u8>,
    len: usize,
}

/// The ring's side thread: serves every request but device-file I/O, which may block
/// (a control write waits for the network thread's answer), started once the ring is
/// registered on the network thread.
pub(crate) struct RingThread {
    join: std::thread::JoinHandle<()>,
}

impl RingThread {
    /// Registers the ring on the connection `fuse` (a dup of the session's `/dev/fuse` fd)
    /// on the network thread, which serves it from then on ([`RingSource`]), and starts the
    /// side thread; fails (with the cause, naming the module parameter where it is the
    /// cause) if the kernel refuses.
    pub(crate) fn start(fs: AoeFs, fuse: OwnedFd, payload: usize) -> Result<Self> {
        let queues = possible_cpus().context("cannot count the possible CPUs")?;
        let (ok_tx, ok_rx) = crossbeam_channel::bounded(1);
        let (tx, rx) = crossbeam_channel::unbounded();
        let answers = Answers {
            tx,
            net: fs.net().clone(),
            woken: Arc::new(AtomicBool::new(false)),
        };
        let (job_tx, job_rx) = crossbeam_channel::unbounded();
        let src = RingSource {
            fs: fs.clone(),
            fuse: Some(fuse),
            queues,
            payload,
            deadline: Instant::now() + INIT_WAIT,
            registered: Some(ok_tx),
            again: 0,
            ring: None,
            live: 0,
            state: State {
                lent: Vec::new(),
                waiting: Vec::new(),
            },
            answers: answers.clone(),
            rx,
            side: job_tx,
            ready: Vec::new(),
        };
        fs.net().send(Cmd::AddSource(Box::new(src)));
        match ok_rx.recv_timeout(INIT_WAIT + Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => bail!(
                "FUSE over io_uring is disabled in this kernel: \
                 /sys/module/fuse/parameters/enable_uring is N (root may set it to Y): {e}"
            ),
            Ok(Err(e)) => bail!(
                "the kernel refused FUSE over io_uring (a kernel before 6.14, or without \
                 io_uring or CONFIG_FUSE_IO_URING?): {e}"
            ),
            Err(_) => bail!("the network thread did not register the FUSE io_uring"),
        }
        let join = std::thread::Builder::new()
            .name("fuse-uring".into())
            .spawn(move || side(fs, job_rx, answers))
            .context("cannot start the FUSE io_uring side thread")?;
        Ok(RingThread { join })
    }

    /// Waits for the side thread, which ends once the ring source is gone (unmounted, or
    /// the network thread stopped).
    pub(crate) fn join(self) {
        let _ = self.join.join();
    }
}

/// The FUSE ring served on the initiator's network thread: the ring's fd is polled with the
/// interfaces' sockets, a device-file READ, WRITE or FSYNC goes from its entry straight to
/// the engine ([`AoeFs::read_dev`], [`AoeFs::write_dev`]), and its completion, on the same
/// thread, is committed with the next run, without a thread of its own in between. Every
/// other request goes to the side thread with its payload block, and comes back with it.
///
/// Only this thread pushes and submits the ring's commands (it created the ring, a
/// single-issuer one); answers completed elsewhere come through `answers` (waking the
/// thread where they come from another thread).
struct RingSource {
    fs: AoeFs,
    /// The connection, until the ring is registered on it.
    fuse: Option<OwnedFd>,
    queues: u16,
    payload: usize,
    /// Registration gives up on `EAGAIN` (`FUSE_INIT` not yet answered) after this.
    deadline: Instant,
    /// Where the registration's outcome goes ([`RingThread::start`] waits for it).
    registered: Option<crossbeam_channel::Sender<std::io::Result<()>>>,
    /// Registrations refused with `EAGAIN` (`FUSE_INIT` not yet answered) before it took.
    again: u64,
    ring: Option<FuseUring>,
    /// Entries whose command has not failed (the file system is mounted while any is).
    live: usize,
    state: State,
    answers: Answers,
    rx: crossbeam_channel::Receiver<Answer>,
    side: crossbeam_channel::Sender<Job>,
    ready: Vec<Ready>,
}

impl RingSource {
    /// Registers the ring; false when that failed for good (reported to the mount).
    fn register(&mut self) -> bool {
        let Some(fuse) = &self.fuse else {
            return false;
        };
        let r = fuse
            .try_clone()
            .and_then(|dup| FuseUring::new(dup, self.queues, PER_QUEUE, self.payload));
        match r {
            // FUSE_INIT's answer written but not yet processed by the kernel: the next
            // pass of the loop tries again.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && Instant::now() < self.deadline => {
                self.again += 1;
                true
            }
            Err(e) => {
                if let Some(tx) = self.registered.take() {
                    let _ = tx.send(Err(e));
                }
                false
            }
            Ok(ring) => {
                tracing::info!(
                    "FUSE requests through io_uring on the network thread: {} entries on {} \
                     queues (registered after {} refusals with EAGAIN)",
                    ring.len(),
                    self.queues,
                    self.again
                );
                self.live = ring.len();
                self.state = State {
                    lent: vec![false; ring.len()],
                    waiting: (0..ring.len()).map(|_| None).collect(),
                };
                self.ring = Some(ring);
                self.fuse = None;
                if let Some(tx) = self.registered.take() {
                    let _ = tx.send(Ok(()));
                }
                true
            }
        }
    }

    /// Commits the answers that came in, and hands the commits to the kernel.
    fn answer(&mut self) {
        let Some(ring) = &mut self.ring else {
            return;
        };
        // Cleared before the channel is drained: an answer sent after this wakes again.
        self.answers.woken.store(false, Ordering::Release);
        while let Ok(a) = self.rx.try_recv() {
            finish(&self.fs, ring, &mut self.state, a);
        }
        if let Err(e) = ring.submit() {
            tracing::warn!("FUSE io_uring submit: {e}");
        }
    }
}

impl Source for RingSource {
    fn fd(&self) -> RawFd {
        self.ring.as_ref().map_or(-1, FuseUring::ring_fd)
    }

    fn interest(&mut self) -> Interest {
        match &self.ring {
            None => Interest::Now,
            Some(r) if r.has_unsubmitted() || !self.rx.is_empty() => Interest::Now,
            Some(_) => Interest::Read,
        }
    }

    fn run(&mut self) -> bool {
        if self.ring.is_none() && (!self.register() || self.ring.is_none()) {
            return self.fuse.is_some();
        }
        let Some(ring) = &mut self.ring else {
            return false;
        };
        if let Err(e) = ring.reap(&mut self.ready) {
            tracing::error!("FUSE io_uring: {e}");
            return false;
        }
        for r in std::mem::take(&mut self.ready) {
            match r {
                Ready::Request(i) => serve(
                    &self.fs,
                    ring,
                    &mut self.state,
                    &self.answers,
                    &self.side,
                    i,
                ),
                Ready::Woken => {}
                Ready::Failed(_, e) => {
                    self.live -= 1;
                    if e != libc::ENOTCONN && e != libc::ECANCELED {
                        tracing::warn!("FUSE io_uring entry failed: errno {e}");
                    }
                }
            }
        }
        self.answer();
        self.live > 0
    }

    /// The network thread stops: the I/O it failed is answered (EIO) before the ring goes.
    fn stopping(&mut self) {
        self.answer();
    }
}

/// Commits entry `i`'s answer; a failure means the connection is gone.
fn commit(ring: &mut FuseUring, i: usize, r: Result<usize, Errno>) {
    let res = match r {
        Ok(n) => ring.commit(i, 0, n),
        Err(e) => ring.commit(i, -e.code(), 0),
    };
    if let Err(e) = res {
        tracing::warn!("FUSE io_uring commit of entry {i}: {e}");
    }
}

/// Per entry: whether its payload is lent to the engine, and an answer waiting for it.
struct State {
    lent: Vec<bool>,
    waiting: Vec<Option<Answer>>,
}

fn finish(fs: &AoeFs, ring: &mut FuseUring, state: &mut State, a: Answer) {
    match a {
        // A device read into the entry's own block: the block is home again, the bytes in
        // place.
        Answer::Data(i, Ok(d)) if state.lent[i] => {
            let n = d.len();
            match ring.put_payload(i, d) {
                Ok(()) => {
                    state.lent[i] = false;
                    commit(ring, i, Ok(n))
                }
                // Another buffer (an empty read): answered once the block is home.
                Err(d) => state.waiting[i] = Some(Answer::Data(i, Ok(d))),
            }
        }
        a @ (Answer::Data(i, _) | Answer::Written(i, _)) if state.lent[i] => {
            state.waiting[i] = Some(a)
        }
        Answer::Data(i, r) => {
            let r = match r {
                Ok(d) => {
                    let out = ring.payload_mut(i).unwrap_or_default();
                    let n = d.len().min(out.len());
                    out[..n].copy_from_slice(&d[..n]);
                    fs.recycle(d);
                    Ok(n)
                }
                Err(e) => Err(e),
            };
            commit(ring, i, r)
        }
        Answer::Written(i, r) => {
            let r = r.map(|n| encode_size_out(n, ring.payload_mut(i).unwrap_or_default()));
            commit(ring, i, r)
        }
        Answer::Home(i, b) => {
            if ring.put_payload(i, b).is_err() {
                // Not this entry's block: cannot happen (each Lent goes to its own entry).
                tracing::error!("FUSE io_uring: entry {i} got a foreign buffer back");
                return;
            }
            state.lent[i] = false;
            if let Some(a) = state.waiting[i].take() {
                finish(fs, ring, state, a)
            }
        }
        Answer::Empty(i, r) => commit(ring, i, r.map(|()| 0)),
        Answer::Side(i, b, r) => {
            if ring.put_payload(i, b).is_err() {
                tracing::error!("FUSE io_uring: entry {i} got a foreign buffer back");
                return;
            }
            commit(ring, i, r)
        }
    }
}

/// Serves the request in entry `i` on the network thread: device-file I/O goes to the
/// engine (answered through `answers`), FLUSH is answered at once, anything else goes to
/// the side thread with the entry's payload block.
fn serve(
    fs: &AoeFs,
    ring: &mut FuseUring,
    state: &mut State,
    answers: &Answers,
    side: &crossbeam_channel::Sender<Job>,
    i: usize,
) {
    // (Entries are served only when their payload is home: a request arrives in an entry
    // only after its commit, which needs the block.)
    let hdr = ring.header(i);
    let Some(h) = InHeader::parse(hdr) else {
        return commit(ring, i, Err(Errno::EIO));
    };
    let op_in = &hdr[OP_IN_AT..OP_IN_AT + 128];
    match (h.opcode, node(h.nodeid)) {
        (op::READ, Some(Node::Dev(a, p))) => {
            let rd = ReadIn::parse(op_in);
            // Read into the entry's payload: the engine fills it where it is, and the block
            // comes back with the bytes (or, failed, goes home), then the entry is answered.
            let into = ring.take_payload(i).map(|buf| {
                let home = answers.clone();
                Lent::new(buf, Box::new(move |b| home.send(Answer::Home(i, b))))
            });
            state.lent[i] = into.is_some();
            let ans = answers.clone();
            fs.read_dev(
                a,
                p,
                rd.fh,
                rd.offset,
                rd.size,
                into,
                Box::new(move |r| ans.send(Answer::Data(i, r))),
            );
        }
        (op::WRITE, Some(Node::Dev(a, p))) => {
            let w = WriteIn::parse(op_in);
            let ino = h.nodeid;
            let len = (w.size as usize).min(ring.payload(i).map_or(0, <[u8]>::len));
            let inval = (is_direct(w.fh) && fs.cached_opens().contains_key(&ino)).then_some(ino);
            // The payload goes to the engine as it is, and comes back (Answer::Home) when
            // the engine is done with it, whatever happens to the write: only then is the
            // entry answered, the kernel writing the next request there.
            let Some(buf) = ring.take_payload(i) else {
                return commit(ring, i, Err(Errno::EIO));
            };
            let home = answers.clone();
            let mut lent = Lent::new(buf, Box::new(move |b| home.send(Answer::Home(i, b))));
            lent.truncate(len);
            state.lent[i] = true;
            let ans = answers.clone();
            fs.write_dev(
                a,
                p,
                w.fh,
                w.offset,
                len,
                move |n| {
                    lent.truncate(n);
                    lent
                },
                inval,
                Box::new(move |r| ans.send(Answer::Written(i, r))),
            );
        }
        (op::FSYNC, Some(Node::Dev(a, _))) => {
            let ans = answers.clone();
            fs.flush_dev(
                a,
                release_in_fh(op_in),
                Box::new(move |r| ans.send(Answer::Empty(i, r))),
            );
        }
        (op::FLUSH, _) => commit(ring, i, Ok(0)),
        _ => {
            let hdr = Box::new(*hdr);
            let len = request_payload_len(&hdr);
            let Some(payload) = ring.take_payload(i) else {
                return commit(ring, i, Err(Errno::EIO));
            };
            let job = Job {
                i,
                hdr,
                payload,
                len,
            };
            if let Err(crossbeam_channel::SendError(job)) = side.send(job) {
                // The side thread is gone (it never fails while the source lives).
                if ring.put_payload(i, job.payload).is_ok() {
                    commit(ring, i, Err(Errno::EIO));
                }
            }
        }
    }
}

/// The side thread: serves what the network thread hands it until the ring source goes.
fn side(fs: AoeFs, jobs: crossbeam_channel::Receiver<Job>, answers: Answers) {
    while let Ok(job) = jobs.recv() {
        serve_side(&fs, &answers, job);
    }
}

/// Answers a request other than device-file I/O, into its payload block, which goes back
/// to the network thread with the answer (or, a read of `err` waiting for a line, with the
/// line later).
fn serve_side(fs: &AoeFs, answers: &Answers, job: Job) {
    let Job {
        i,
        hdr,
        mut payload,
        len,
    } = job;
    let len = len.min(payload.len());
    let Some(h) = InHeader::parse(&hdr[..]) else {
        return answers.send(Answer::Side(i, payload, Err(Errno::EIO)));
    };
    let op_in = &hdr[OP_IN_AT..OP_IN_AT + 128];
    let ino = h.nodeid;
    let out = &mut payload[..];
    let r: Result<usize, Errno> = match h.opcode {
        op::LOOKUP => {
            let name = out[..len].split(|b| *b == 0).next().unwrap_or_default();
            match std::str::from_utf8(name)
                .ok()
                .and_then(|n| fs.lookup_attr(ino, n))
            {
                Some(a) => Ok(encode_entry_out(&a, out)),
                None => Err(Errno::ENOENT),
            }
        }
        op::GETATTR => match node(ino).and_then(|n| fs.getattr_node(n)) {
            Some(a) => Ok(encode_attr_out(&a, out)),
            None => Err(Errno::ENOENT),
        },
        // A block device's sizes (the fuser `setattr`, `AoeFs::setattr_node`).
        op::SETATTR => {
            let (size, has_fh) = setattr_in_size(op_in);
            fs.setattr_node(ino, size, has_fh)
                .map(|a| encode_attr_out(&a, out))
        }
        op::OPEN => match fs.open_node(ino, open_in_flags(op_in) as i32) {
            Ok((fh, f)) => Ok(encode_open_out(fh, f.bits(), out)),
            Err(e) => Err(e),
        },
        op::OPENDIR => Ok(encode_open_out(0, 0, out)),
        op::RELEASE => {
            fs.release_node(ino, release_in_fh(op_in));
            Ok(0)
        }
        op::RELEASEDIR | op::FLUSH | op::FSYNC | op::FSYNCDIR | op::DESTROY => Ok(0),
        op::STATFS => Ok(encode_statfs_out(out)),
        op::GETXATTR => Err(Errno::ENODATA),
        op::LISTXATTR => {
            if getxattr_in_size(op_in) == 0 {
                Ok(encode_size_out(0, out))
            } else {
                Ok(0)
            }
        }
        op::READDIR => {
            let rd = ReadIn::parse(op_in);
            match fs.dir_entries(ino) {
                Some(all) => Ok(encode_dirents(&all, rd.offset, rd.size as usize, out)),
                None => Err(Errno::ENOTDIR),
            }
        }
        op::READ if matches!(node(ino), Some(Node::Fixed(ERR))) => {
            let rd = ReadIn::parse(op_in);
            let mut s = lock(fs.shared());
            match s.err.pop_front() {
                Some(line) => {
                    drop(s);
                    let n = line.len().min(out.len());
                    out[..n].copy_from_slice(&line.as_bytes()[..n]);
                    Ok(n)
                }
                // aoechr.c `aoechr_read`: O_NDELAY and nothing queued is EAGAIN.
                None if rd.flags as i32 & libc::O_NONBLOCK != 0 => Err(Errno::EAGAIN),
                None => {
                    // Its waiter answers it, with the payload block, when a line comes.
                    s.err_waiters
                        .push((h.pid, Box::new(RingErrReply(answers.clone(), i, payload))));
                    return;
                }
            }
        }
        op::READ => match read_side(fs, ino, ReadIn::parse(op_in)) {
            Ok(d) => {
                let n = d.len().min(out.len());
                out[..n].copy_from_slice(&d[..n]);
                Ok(n)
            }
            Err(e) => Err(e),
        },
        op::WRITE => {
            let w = WriteIn::parse(op_in);
            let len = (w.size as usize).min(len);
            match node(ino) {
                Some(Node::Fixed(which)) => match fs.control_write(which, &out[..len]) {
                    Ok(()) => Ok(encode_size_out(len as u32, out)),
                    Err(e) => Err(e),
                },
                // Device files are written on the network thread (serve).
                Some(Node::Dev(..)) => Err(Errno::EIO),
                _ => Err(Errno::EACCES),
            }
        }
        _ => Err(Errno::ENOSYS),
    };
    answers.send(Answer::Side(i, payload, r))
}

/// A READ of anything but a device file or `err`: the bytes.
fn read_side(fs: &AoeFs, ino: u64, rd: ReadIn) -> Result<Vec<u8>, Errno> {
    match node(ino) {
        Some(Node::Fixed(INTERFACES)) => {
            let text = {
                let s = lock(fs.shared());
                if s.iflist.is_empty() {
                    String::new()
                } else {
                    s.iflist.join(" ") + "\n"
                }
            };
            Ok(slice_at(text.as_bytes(), rd.offset, rd.size).to_vec())
        }
        Some(Node::Attr(a, k)) => match fs.attr_bytes(a, k) {
            Some(v) => Ok(slice_at(&v, rd.offset, rd.size).to_vec()),
            None => Err(Errno::ENOENT),
        },
        // Device files are read on the network thread (serve).
        Some(Node::Dev(..)) => Err(Errno::EIO),
        Some(Node::Fixed(_)) => Ok(Vec::new()),
        _ => Err(Errno::EISDIR),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `fuse_setattr_in`: valid (FATTR_SIZE 1 << 3, FATTR_FH 1 << 6), padding, fh, size.
    #[test]
    fn setattr_in_fields() {
        let mut b = vec![0u8; 128];
        b[8..16].copy_from_slice(&7u64.to_le_bytes());
        b[16..24].copy_from_slice(&(1u64 << 20).to_le_bytes());
        assert_eq!(setattr_in_size(&b), (None, false));
        b[0..4].copy_from_slice(&(1u32 << 3).to_le_bytes());
        assert_eq!(setattr_in_size(&b), (Some(1 << 20), false));
        b[0..4].copy_from_slice(&((1u32 << 3) | (1 << 6)).to_le_bytes());
        assert_eq!(setattr_in_size(&b), (Some(1 << 20), true));
    }

    #[test]
    fn in_header_fields() {
        let mut b = vec![0u8; 40];
        b[0..4].copy_from_slice(&40u32.to_le_bytes());
        b[4..8].copy_from_slice(&16u32.to_le_bytes());
        b[8..16].copy_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        b[32..36].copy_from_slice(&4242u32.to_le_bytes());
        assert_eq!(
            InHeader::parse(&b),
            Some(InHeader {
                opcode: op::WRITE,
                unique: 0x0102_0304_0506_0708,
                nodeid: 1 << 40,
                pid: 4242,
            })
        );
        assert_eq!(InHeader::parse(&b[..39]), None);
    }

    /// fuse_read_in and fuse_write_in as the kernel lays them out (fs/fuse/file.c
    /// `fuse_read_args_fill`, `fuse_write_args_fill`).
    #[test]
    fn read_and_write_in() {
        let b: Vec<u8> = [
            &7u64.to_le_bytes()[..],         // fh
            &(1u64 << 30).to_le_bytes()[..], // offset
            &(1u32 << 20).to_le_bytes()[..], // size
            &0u32.to_le_bytes()[..],         // read_flags / write_flags
            &0u64.to_le_bytes()[..],         // lock_owner
            &0o4000u32.to_le_bytes()[..],    // flags (O_NONBLOCK)
            &0u32.to_le_bytes()[..],         // padding
        ]
        .concat();
        assert_eq!(b.len(), 40);
        assert_eq!(
            ReadIn::parse(&b),
            ReadIn {
                fh: 7,
                offset: 1 << 30,
                size: 1 << 20,
                flags: 0o4000
            }
        );
        assert_eq!(
            WriteIn::parse(&b),
            WriteIn {
                fh: 7,
                offset: 1 << 30,
                size: 1 << 20
            }
        );
    }

    fn attr() -> FileAttr {
        let t = UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 5);
        FileAttr {
            ino: fuser::INodeNo(0x1_0000_0301),
            size: 1 << 30,
            blocks: 1 << 21,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: FileType::RegularFile,
            perm: 0o660,
            nlink: 1,
            uid: 0,
            gid: 6,
            rdev: 0,
            blksize: 512,
            flags: 0,
        }
    }

    /// fuse_attr_out: the 16-byte validity head, then fuse_attr's fields in order.
    #[test]
    fn attr_out_bytes() {
        let mut out = vec![0xffu8; 104];
        assert_eq!(encode_attr_out(&attr(), &mut out), 104);
        let want: Vec<u8> = [
            &0u64.to_le_bytes()[..],                    // attr_valid (200 ms: 0 s)
            &200_000_000u32.to_le_bytes()[..],          // attr_valid_nsec
            &0u32.to_le_bytes()[..],                    // dummy
            &0x1_0000_0301u64.to_le_bytes()[..],        // ino
            &(1u64 << 30).to_le_bytes()[..],            // size
            &(1u64 << 21).to_le_bytes()[..],            // blocks
            &1_700_000_000u64.to_le_bytes()[..],        // atime
            &1_700_000_000u64.to_le_bytes()[..],        // mtime
            &1_700_000_000u64.to_le_bytes()[..],        // ctime
            &5u32.to_le_bytes()[..],                    // atimensec
            &5u32.to_le_bytes()[..],                    // mtimensec
            &5u32.to_le_bytes()[..],                    // ctimensec
            &(libc::S_IFREG | 0o660).to_le_bytes()[..], // mode
            &1u32.to_le_bytes()[..],                    // nlink
            &0u32.to_le_bytes()[..],                    // uid
            &6u32.to_le_bytes()[..],                    // gid
            &0u32.to_le_bytes()[..],                    // rdev
            &512u32.to_le_bytes()[..],                  // blksize
            &0u32.to_le_bytes()[..],                    // flags
        ]
        .concat();
        assert_eq!(out, want);
    }

    #[test]
    fn entry_out_bytes() {
        let mut out = vec![0u8; 128];
        assert_eq!(encode_entry_out(&attr(), &mut out), 128);
        assert_eq!(&out[0..8], &0x1_0000_0301u64.to_le_bytes());
        assert_eq!(&out[8..16], &0u64.to_le_bytes());
        assert_eq!(&out[32..36], &200_000_000u32.to_le_bytes());
        assert_eq!(&out[40..48], &0x1_0000_0301u64.to_le_bytes());
        assert_eq!(&out[100..104], &(libc::S_IFREG | 0o660).to_le_bytes());
    }

    #[test]
    fn open_and_write_out_bytes() {
        let mut out = [0xffu8; 16];
        assert_eq!(encode_open_out(1, 0x41, &mut out), 16);
        assert_eq!(out, [1, 0, 0, 0, 0, 0, 0, 0, 0x41, 0, 0, 0, 0, 0, 0, 0]);
        let mut out = [0xffu8; 8];
        assert_eq!(encode_size_out(1 << 20, &mut out), 8);
        assert_eq!(out, [0, 0, 0x10, 0, 0, 0, 0, 0]);
    }

    /// fuse_dirent: 24-byte head, the name, zero padding to 8 bytes; `off` is the index of
    /// the next entry; an entry that does not fit ends the answer.
    #[test]
    fn dirents() {
        let all = vec![
            (1, FileType::Directory, ".".to_string()),
            (1, FileType::Directory, "..".to_string()),
            (2, FileType::RegularFile, "discover".to_string()),
        ];
        let mut out = vec![0xffu8; 4096];
        let n = encode_dirents(&all, 1, 4096, &mut out);
        assert_eq!(n, 32 + 32);
        let want: Vec<u8> = [
            &1u64.to_le_bytes()[..],
            &2u64.to_le_bytes()[..],
            &2u32.to_le_bytes()[..],
            &4u32.to_le_bytes()[..], // DT_DIR
            b"..\0\0\0\0\0\0",
            &2u64.to_le_bytes()[..],
            &3u64.to_le_bytes()[..],
            &8u32.to_le_bytes()[..],
            &8u32.to_le_bytes()[..], // DT_REG
            b"discover",
        ]
        .concat();
        assert_eq!(&out[..n], &want[..]);
        assert_eq!(encode_dirents(&all, 0, 40, &mut out), 32);
        assert_eq!(encode_dirents(&all, 3, 4096, &mut out), 0);
    }

    #[test]
    fn statfs_out_bytes() {
        let mut out = [0xffu8; 80];
        assert_eq!(encode_statfs_out(&mut out), 80);
        assert!(out[..40].iter().all(|b| *b == 0));
        assert_eq!(&out[40..48], &[0, 2, 0, 0, 255, 0, 0, 0]);
        assert!(out[48..].iter().all(|b| *b == 0));
    }
}
