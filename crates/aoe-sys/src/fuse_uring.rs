//! FUSE over io_uring (Linux 6.14+, fs/fuse/dev_uring.c): the daemon's side of the ring
//! transport, as a safe interface over `IORING_OP_URING_CMD` on a `/dev/fuse` fd.
//!
//! How the kernel uses it (fs/fuse/dev_uring.c, include/uapi/linux/fuse.h):
//! - The connection must have been initialized (`FUSE_INIT` answered, with
//!   `FUSE_OVER_IO_URING` when `/sys/module/fuse/parameters/enable_uring` is `Y`); until then
//!   a command fails with `EAGAIN`, and with `EOPNOTSUPP` while the parameter is `N` and the
//!   connection did not negotiate the flag.
//! - The daemon registers ring entries (`FUSE_IO_URING_CMD_REGISTER`) on a ring set up with
//!   128-byte SQEs: `sqe->addr` points to two iovecs, a [`HEADER_LEN`]-byte
//!   `struct fuse_uring_req_header` and a payload buffer at least the ring's
//!   `max_payload_sz` long (the largest of 8 KiB, `max_write`, `max_pages` pages); the SQE's
//!   80-byte command area holds `struct fuse_uring_cmd_req` (flags, commit_id, qid). There is
//!   one queue per possible CPU, and requests go to the queue of the CPU the requesting task
//!   runs on; the ring is used (instead of `read(2)` of `/dev/fuse`) only once **every**
//!   queue has an entry registered, and until then every request waits.
//! - A registered entry's command completes (a CQE with result 0) when a request was copied
//!   into it: the `fuse_in_header` at the start of the header's `in_out`, the opcode's first
//!   argument in `op_in`, the rest (names, write data) in the payload, and
//!   `fuse_uring_ent_in_out` (commit_id, payload_sz) after them.
//! - `FUSE_IO_URING_CMD_COMMIT_AND_FETCH` answers it (a `fuse_out_header` in `in_out`, the
//!   answer's arguments in the payload, their length in `payload_sz`) and re-arms the entry in
//!   one command. Between the completion and the commit the two buffers are the daemon's: the
//!   kernel reads or writes them only while a command of the entry is queued.
//! - `FORGET`, `BATCH_FORGET` and `INTERRUPT` still go through `read(2)` of `/dev/fuse`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::EventFd;

/// Bytes of `struct fuse_uring_req_header`: `in_out` (128), `op_in` (128),
/// `fuse_uring_ent_in_out` (32).
pub const HEADER_LEN: usize = 288;
/// Where `op_in` starts in the header.
pub const OP_IN_AT: usize = 128;
/// Where `fuse_uring_ent_in_out` starts in the header: flags (u64), commit_id (u64),
/// payload_sz (u32), padding (u32), reserved (u64).
const ENT_IN_OUT_AT: usize = 256;

/// `enum fuse_uring_cmd`.
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `IORING_ENTER_GETEVENTS` (include/uapi/linux/io_uring.h).
const IORING_ENTER_GETEVENTS: u32 = 1;

/// The user_data of the wake-up read of the eventfd.
const WAKE: u64 = u64::MAX;

/// What [`FuseUring::wait`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// Entry `n` holds a request: read it ([`FuseUring::header`], [`FuseUring::payload`]),
    /// answer it with [`FuseUring::commit`].
    Request(usize),
    /// The [`FuseUring::waker`] was notified.
    Woken,
    /// Entry `n`'s command failed (`ENOTCONN` when the file system is unmounted or aborted):
    /// it is out of use.
    Failed(usize, i32),
}

struct Ent {
    qid: u16,
    header: Box<[u8; HEADER_LEN]>,
    /// The registered payload block: `None` while lent out ([`FuseUring::take_payload`]).
    payload: Option<Vec<u8>>,
    /// Where the registered block starts and how long it is: a lent block must come back
    /// as this same block.
    block: (usize, usize),
    /// The two iovecs given to the kernel at registration, kept where they are.
    iov: Box<[libc::iovec; 2]>,
    /// A command of this entry is with the kernel (it may write the buffers).
    queued: bool,
    /// The kernel took a command of this entry at some point: it may know the buffers'
    /// addresses until the ring is gone (see Drop).
    given: bool,
    /// The commit_id of the request the entry holds.
    commit_id: u64,
}

/// A FUSE-over-io_uring ring of one thread: entries registered on every queue of a
/// connection, the requests they receive, and their answers.
pub struct FuseUring {
    // Declared first: dropped (closed) before anything else.
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    fuse: OwnedFd,
    ents: Vec<Ent>,
    wake: Arc<EventFd>,
    wake_buf: Box<u64>,
    to_submit: bool,
    /// Completions reaped during registration, for the first [`FuseUring::wait`].
    early: Vec<(u64, i32)>,
}

// SAFETY: what keeps FuseUring from being Send automatically is the raw pointers of the
// iovecs kept for the kernel (`Ent::iov`); they point into the entries' own heap blocks
// (header box, payload Vec), which do not move when the FuseUring moves to another thread.
// Every method takes `&mut self` or `&self` without interior mutability, so moving it is
// the only cross-thread use. A ring set up with IORING_SETUP_SINGLE_ISSUER refuses a
// submission from another thread than the one that created it with EEXIST (an error, not
// undefined behaviour); the network thread creates and uses it (aoe-fuse `ring`).
unsafe impl Send for FuseUring {}

impl std::fmt::Debug for FuseUring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseUring")
            .field("entries", &self.ents.len())
            .finish()
    }
}

impl FuseUring {
    /// Registers `per_queue` entries with payload buffers of `payload_len` bytes on each of
    /// `queues` queues of the connection `fuse` (a `/dev/fuse` fd of a mounted, initialized
    /// file system, or a dup of it).
    ///
    /// # Errors
    ///
    /// `io_uring_setup(2)`'s errors, and the first registration's: `EOPNOTSUPP` (the
    /// connection did not negotiate `FUSE_OVER_IO_URING` and `enable_uring` is off),
    /// `EAGAIN` (`FUSE_INIT` not answered yet: try again), `EINVAL` (a payload shorter than
    /// the ring's `max_payload_sz`, a qid beyond the possible CPUs, a kernel without 128-byte
    /// SQEs or FUSE's `uring_cmd`).
    pub fn new(
        fuse: OwnedFd,
        queues: u16,
        per_queue: u16,
        payload_len: usize,
    ) -> io::Result<FuseUring> {
        let n = usize::from(queues) * usize::from(per_queue);
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let sq = u32::try_from(n + 1)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?
            .next_power_of_two();
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_coop_taskrun()
            .setup_single_issuer()
            .setup_cqsize(sq * 2)
            .build(sq)?;
        let mut ents = Vec::with_capacity(n);
        for qid in 0..queues {
            for _ in 0..per_queue {
                let mut header = Box::new([0u8; HEADER_LEN]);
                let mut payload = vec![0u8; payload_len];
                let iov = Box::new([
                    libc::iovec {
                        iov_base: header.as_mut_ptr().cast(),
                        iov_len: HEADER_LEN,
                    },
                    libc::iovec {
                        iov_base: payload.as_mut_ptr().cast(),
                        iov_len: payload.len(),
                    },
                ]);
                let block = (payload.as_ptr() as usize, payload.capacity());
                ents.push(Ent {
                    qid,
                    header,
                    payload: Some(payload),
                    block,
                    iov,
                    queued: false,
                    given: false,
                    commit_id: 0,
                });
            }
        }
        let mut u = FuseUring {
            ring,
            fuse,
            ents,
            wake: Arc::new(EventFd::new()?),
            wake_buf: Box::new(0),
            to_submit: false,
            early: Vec::new(),
        };
        u.arm_wake()?;
        for i in 0..u.ents.len() {
            u.push_cmd(i, CMD_REGISTER)?;
            // Submitted one at a time so the first failure is seen before the rest are
            // tried: a registration that fails completes at once, one that succeeds stays
            // queued until a request arrives. Requests do arrive meanwhile, as soon as
            // every queue has an entry: their completions are kept for `wait`.
            u.ring.submit()?;
            u.to_submit = false;
            // A command that failed at issue may complete through task work, run only by
            // an io_uring_enter(2) that gets events: one that waits for none.
            // SAFETY: no arguments are passed (a null sigset, size 0); the call only runs
            // this thread's pending io_uring task work and returns.
            unsafe {
                u.ring
                    .submitter()
                    .enter::<libc::sigset_t>(0, 0, IORING_ENTER_GETEVENTS, None)?;
            }
            let done: Vec<(u64, i32)> = u
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (ud, res) in done {
                if ud == i as u64 && res < 0 {
                    // Refused at issue: the kernel kept nothing of it.
                    u.ents[i].queued = false;
                    u.ents[i].given = false;
                    return Err(io::Error::from_raw_os_error(-res));
                }
                u.early.push((ud, res));
            }
        }
        Ok(u)
    }

    /// Notifying it wakes [`wait`](Self::wait) ([`Ready::Woken`]), from any thread.
    pub fn waker(&self) -> Arc<EventFd> {
        self.wake.clone()
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let sqe = opcode::Read::new(
            types::Fd(self.wake.as_raw_fd()),
            (&mut *self.wake_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(WAKE);
        self.push(sqe.into())
    }

    fn push(&mut self, sqe: squeue::Entry128) -> io::Result<()> {
        loop {
            // SAFETY: every SQE pushed here points only into memory this ring keeps for its
            // whole life and, once the ring is dropped, never frees (see Drop; an entry is
            // marked `given` before its SQE is pushed, and only entries never given, or
            // refused at issue, are freed): the
            // eventfd's 8-byte read buffer (`wake_buf`, boxed), and an entry's iovecs,
            // header and payload block (boxed or a Vec whose block is never freed or moved
            // while a command of the entry is queued: take_payload refuses then, and
            // put_payload takes back only that same block). The fds (eventfd, /dev/fuse)
            // are owned by `self` and outlive the ring, which is dropped first.
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            if pushed.is_ok() {
                self.to_submit = true;
                return Ok(());
            }
            // Full: hand what is queued to the kernel first.
            self.ring.submit()?;
        }
    }

    fn push_cmd(&mut self, i: usize, op: u32) -> io::Result<()> {
        let e = &mut self.ents[i];
        debug_assert!(!e.queued && e.payload.is_some());
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&e.commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&e.qid.to_ne_bytes());
        let sqe = opcode::UringCmd80::new(types::Fd(self.fuse.as_raw_fd()), op)
            .cmd(cmd)
            .addr(Some(e.iov.as_ptr() as u64))
            .build()
            .user_data(i as u64);
        let sqe = with_len(sqe, 2);
        e.queued = true;
        e.given = true;
        self.push(sqe)
    }

    /// Hands queued commands to the kernel and waits until at least one completes; pushes
    /// what completed onto `out`.
    ///
    /// # Errors
    ///
    /// An `io_uring_enter(2)` failure other than `EINTR`.
    pub fn wait(&mut self, out: &mut Vec<Ready>) -> io::Result<()> {
        if !self.early.is_empty() {
            let early = std::mem::take(&mut self.early);
            return self.reap_done(early, out);
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                    if !self.ring.completion().is_empty() {
                        break;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        self.to_submit = false;
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        self.reap_done(cqes, out)
    }

    /// The ring's fd, readable (`poll(2)`) when completions are waiting: the way a caller
    /// that polls other fds too waits for requests instead of [`wait`](Self::wait).
    pub fn ring_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// What has completed, without waiting: pushes it onto `out` as [`wait`](Self::wait)
    /// does. Commands pushed since are not handed to the kernel: that is
    /// [`submit`](Self::submit). (Requests reach entries through the task work of the
    /// thread that queued the command, run on its return from any system call, `poll(2)`
    /// included: that call is woken for it.)
    ///
    /// # Errors
    ///
    /// Re-arming the wake-up read failed (a full submission queue that cannot be submitted).
    pub fn reap(&mut self, out: &mut Vec<Ready>) -> io::Result<()> {
        let mut cqes = std::mem::take(&mut self.early);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        self.reap_done(cqes, out)
    }

    /// Hands the commands pushed since the last call (commits) to the kernel, without
    /// waiting for any to complete. An interrupted or busy `io_uring_enter(2)` leaves them
    /// for the next call ([`has_unsubmitted`](Self::has_unsubmitted)).
    ///
    /// # Errors
    ///
    /// `io_uring_enter(2)`'s other errors.
    pub fn submit(&mut self) -> io::Result<()> {
        if !self.to_submit {
            return Ok(());
        }
        match self.ring.submit() {
            Ok(_) => {
                self.to_submit = false;
                Ok(())
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Commands are pushed but not yet submitted, or completions were reaped during
    /// registration and not yet reported: the caller has work without polling.
    pub fn has_unsubmitted(&self) -> bool {
        self.to_submit || !self.early.is_empty()
    }

    /// Turns completions into what [`wait`](Self::wait) reports.
    fn reap_done(&mut self, cqes: Vec<(u64, i32)>, out: &mut Vec<Ready>) -> io::Result<()> {
        for (ud, res) in cqes {
            if ud == WAKE {
                self.arm_wake()?;
                out.push(Ready::Woken);
                continue;
            }
            let i = ud as usize;
            let Some(e) = self.ents.get_mut(i) else {
                continue;
            };
            e.queued = false;
            if res < 0 {
                out.push(Ready::Failed(i, -res));
            } else {
                let at = ENT_IN_OUT_AT + 8;
                e.commit_id =
                    u64::from_ne_bytes(e.header[at..at + 8].try_into().unwrap_or_default());
                out.push(Ready::Request(i));
            }
        }
        Ok(())
    }

    /// Entry `i`'s header (`struct fuse_uring_req_header`, [`HEADER_LEN`] bytes).
    pub fn header(&self, i: usize) -> &[u8; HEADER_LEN] {
        &self.ents[i].header
    }

    /// The payload bytes the request in entry `i` came with (`payload_sz`), or None while
    /// the payload is lent out.
    pub fn payload(&self, i: usize) -> Option<&[u8]> {
        let e = &self.ents[i];
        let n = request_payload_len(&e.header);
        e.payload.as_deref().map(|p| &p[..n.min(p.len())])
    }

    /// Entry `i`'s whole payload block, to write an answer into (None while lent out, or
    /// while a command of it is queued).
    pub fn payload_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        let e = &mut self.ents[i];
        if e.queued {
            return None;
        }
        e.payload.as_deref_mut()
    }

    /// Lends entry `i`'s payload block out (its request's bytes first), until
    /// [`put_payload`](Self::put_payload) gives it back; the entry cannot be committed
    /// meanwhile. None if it is out already or a command of the entry is queued.
    pub fn take_payload(&mut self, i: usize) -> Option<Vec<u8>> {
        let e = &mut self.ents[i];
        if e.queued {
            return None;
        }
        e.payload.take()
    }

    /// Takes back entry `i`'s lent payload block; any other buffer is refused (handed back).
    ///
    /// # Errors
    ///
    /// `buf` is not the block [`take_payload`](Self::take_payload) lent, or the entry has its
    /// block.
    pub fn put_payload(&mut self, i: usize, mut buf: Vec<u8>) -> Result<(), Vec<u8>> {
        let e = &mut self.ents[i];
        if e.payload.is_some() || (buf.as_ptr() as usize, buf.capacity()) != e.block {
            return Err(buf);
        }
        let cap = buf.capacity();
        // SAFETY: this is the block allocated as `vec![0u8; cap]` in `new`, every byte of it
        // initialized then; bytes of u8 stay initialized whatever the Vec's length was cut
        // to meanwhile (truncation does not de-initialize), and the kernel only writes
        // bytes into it.
        unsafe { buf.set_len(cap) };
        e.payload = Some(buf);
        Ok(())
    }

    /// Answers the request in entry `i` (`fuse_out_header` with `error`, the first
    /// `payload_len` bytes of the payload as the answer's arguments) and re-arms the entry
    /// (`FUSE_IO_URING_CMD_COMMIT_AND_FETCH`), sent with the next [`wait`](Self::wait).
    ///
    /// # Errors
    ///
    /// `InvalidInput`: the payload is lent out, the entry holds no request, or `payload_len`
    /// exceeds the payload.
    pub fn commit(&mut self, i: usize, error: i32, payload_len: usize) -> io::Result<()> {
        let e = &mut self.ents[i];
        let Some(p) = &e.payload else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        if e.queued || payload_len > p.len() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let plen = u32::try_from(payload_len).unwrap_or(u32::MAX);
        let h = &mut e.header;
        h[0..4].copy_from_slice(&(16u32.saturating_add(plen)).to_ne_bytes());
        h[4..8].copy_from_slice(&error.to_ne_bytes());
        h[8..16].copy_from_slice(&e.commit_id.to_ne_bytes());
        h[ENT_IN_OUT_AT + 16..ENT_IN_OUT_AT + 20].copy_from_slice(&plen.to_ne_bytes());
        self.push_cmd(i, CMD_COMMIT_AND_FETCH)
    }

    /// Entries registered.
    pub fn len(&self) -> usize {
        self.ents.len()
    }

    /// Never true ([`new`](Self::new) refuses zero entries).
    pub fn is_empty(&self) -> bool {
        self.ents.is_empty()
    }
}

impl Drop for FuseUring {
    fn drop(&mut self) {
        // Closing the ring cancels the queued commands, but the kernel may finish that after
        // close(2) returns (io_uring's exit work): the buffers it was given are leaked
        // rather than freed under it. One ring per mount, so this is bounded. An entry the
        // kernel never took a command of (a registration refused with EAGAIN before
        // FUSE_INIT was answered, retried: the rest of that attempt's entries) is freed.
        for e in self.ents.drain(..) {
            if e.given {
                std::mem::forget(e.header);
                std::mem::forget(e.payload);
                std::mem::forget(e.iov);
            }
        }
        std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
    }
}

/// The payload bytes the request in a header came with (`fuse_uring_ent_in_out.payload_sz`):
/// what [`FuseUring::payload`] slices, for a payload block lent out with its request.
pub fn request_payload_len(header: &[u8; HEADER_LEN]) -> usize {
    let at = ENT_IN_OUT_AT + 16;
    u32::from_ne_bytes(header[at..at + 4].try_into().unwrap_or_default()) as usize
}

/// Sets `sqe->len` (bytes 24..28 of the SQE), which `UringCmd80` has no setter for: FUSE's
/// REGISTER and COMMIT_AND_FETCH want the iovec count there.
fn with_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    // SAFETY: `squeue::Entry128` is `#[repr(C)]` of a `#[repr(C)]` `io_uring_sqe` (64 bytes)
    // and 64 bytes of command data: 128 plain bytes with no invalid bit patterns, so the
    // round trip through `[u8; 128]` is sound, and `len` is the u32 at byte 24 of
    // `struct io_uring_sqe` (include/uapi/linux/io_uring.h).
    unsafe {
        let mut b: [u8; 128] = std::mem::transmute(sqe);
        b[24..28].copy_from_slice(&len.to_ne_bytes());
        std::mem::transmute::<[u8; 128], squeue::Entry128>(b)
    }
}

/// How many queues the kernel makes: one per possible CPU (`num_possible_cpus()`, the
/// count in /sys/devices/system/cpu/possible).
pub fn possible_cpus() -> io::Result<u16> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0u32;
    for part in s.trim().split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let (a, b): (u32, u32) = (
            a.parse()
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?,
            b.parse()
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?,
        );
        n += b.saturating_sub(a) + 1;
    }
    u16::try_from(n).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqe_len_is_set_at_byte_24() {
        let sqe = opcode::UringCmd80::new(types::Fd(3), CMD_REGISTER)
            .addr(Some(0x1122_3344))
            .build();
        let sqe = with_len(sqe, 2);
        // SAFETY: as in with_len: 128 plain bytes.
        let b: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        assert_eq!(b[0], io_uring::opcode::UringCmd80::CODE);
        assert_eq!(&b[24..28], &2u32.to_ne_bytes());
        assert_eq!(&b[16..24], &0x1122_3344u64.to_ne_bytes());
        assert_eq!(&b[8..12], &CMD_REGISTER.to_ne_bytes());
    }

    #[test]
    fn possible_cpus_counts_ranges() {
        assert!(possible_cpus().unwrap() >= 1);
    }
}
