//! Batched non-blocking reads through io_uring (io_uring_enter(2)), straight into the
//! transmit slots of a [`PacketRing`]: the target's answer to "one `preadv2` per read
//! request". The reads of one receive batch go to the kernel as one submission and are all
//! complete when [`SlotReads::read_into_slots`] returns.
//!
//! Every read carries `RWF_NOWAIT` (the SQE's `rw_flags`, as `preadv2` takes it): data in the
//! page cache is copied during the submission itself, and a read that would wait for the
//! device completes at once with `-EAGAIN` instead of going to the kernel's io-wq threads,
//! so the caller hands it to its own workers as before and its slot stays free. A file that
//! cannot do `RWF_NOWAIT` at all (tmpfs on this kernel: `EOPNOTSUPP`) completes with
//! [`NoWait::Unsupported`]; without the flag io_uring would run each of its reads on an
//! io-wq thread, measured 6x slower than `pread` (1 KiB reads, kernel 6.18).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{opcode, types, IoUring};

use crate::file::{nowait_error, NoWait};
use crate::ring::PacketRing;

/// One read of [`SlotReads::read_into_slots`].
#[derive(Debug, Clone, Copy)]
pub struct SlotRead<'a> {
    /// The file to read from.
    pub file: BorrowedFd<'a>,
    /// Byte position in the file.
    pub offset: u64,
    /// The transmit slot, counted from the ring's next free one
    /// ([`PacketRing::frame_and_slot_ahead`]).
    pub slot: usize,
    /// Where in the slot's data area the bytes go.
    pub at: usize,
    /// How many bytes.
    pub len: usize,
    /// The caller's name for this read, handed back with its result.
    pub user: usize,
}

/// An io_uring instance for [`read_into_slots`](Self::read_into_slots).
pub struct SlotReads {
    /// `None` once a submission failed in a way that may have left reads queued: the ring is
    /// closed then (queued entries are never run) and every later call fails.
    ring: Option<IoUring>,
    entries: usize,
}

impl std::fmt::Debug for SlotReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotReads")
            .field("entries", &self.entries)
            .field("open", &self.ring.is_some())
            .finish()
    }
}

impl SlotReads {
    /// An io_uring with room for `entries` reads per submission (more are submitted in
    /// several rounds).
    ///
    /// # Errors
    ///
    /// What `io_uring_setup(2)` says where io_uring is unavailable: `ENOSYS` (a kernel
    /// before 5.1 or built without it), `EPERM` (`kernel.io_uring_disabled`, a seccomp
    /// filter), `ENOMEM` (locked-memory limit).
    pub fn new(entries: u32) -> io::Result<SlotReads> {
        // COOP_TASKRUN (5.19): no interrupt of the loop for completions it reaps itself.
        let ring = match IoUring::builder().setup_coop_taskrun().build(entries) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(entries)?,
            Err(e) => return Err(e),
        };
        let entries = ring.params().sq_entries() as usize;
        Ok(SlotReads {
            ring: Some(ring),
            entries,
        })
    }

    /// Reads each of `reads` into its slot of `ring`'s transmit ring, with `RWF_NOWAIT`, in
    /// as few `io_uring_enter` calls as the submission queue allows (one for a receive
    /// batch), and waits until every read has completed (with `RWF_NOWAIT` they complete
    /// during the submission). Pushes `(user, result)` per read onto `out`, in no particular
    /// order: [`NoWait::Done`] with the bytes read (fewer than asked: only part was cached),
    /// [`NoWait::WouldBlock`], [`NoWait::Unsupported`], or the read's error; a read whose
    /// slot is not free or too small gets [`io::ErrorKind::InvalidInput`] and is not started.
    ///
    /// # Errors
    ///
    /// An `io_uring_enter` failure other than `EINTR`: results are pushed for none of the
    /// reads not yet completed, and this instance is closed (later calls fail too).
    pub fn read_into_slots<'a>(
        &mut self,
        ring: &mut PacketRing,
        reads: impl IntoIterator<Item = SlotRead<'a>>,
        out: &mut Vec<(usize, io::Result<NoWait>)>,
    ) -> io::Result<()> {
        let Some(uring) = &mut self.ring else {
            return Err(io::Error::other("io_uring closed after an earlier failure"));
        };
        let mut queued = 0;
        for r in reads {
            let Some(ptr) = ring.slot_ptr_ahead(r.slot, r.at, r.len) else {
                out.push((r.user, Err(io::Error::from(io::ErrorKind::InvalidInput))));
                continue;
            };
            let (Ok(len), Ok(_)) = (u32::try_from(r.len), i64::try_from(r.offset)) else {
                out.push((r.user, Err(io::Error::from(io::ErrorKind::InvalidInput))));
                continue;
            };
            let sqe = opcode::Read::new(types::Fd(r.file.as_raw_fd()), ptr, len)
                .offset(r.offset)
                .rw_flags(libc::RWF_NOWAIT)
                .build()
                .user_data(r.user as u64);
            if queued == self.entries {
                if let Err(e) = complete(uring, queued, out) {
                    self.ring = None;
                    return Err(e);
                }
                queued = 0;
            }
            // SAFETY: the read writes `len` bytes at `ptr`, inside a free transmit slot of
            // `ring` (slot_ptr_ahead checked both), which nothing else touches while this
            // call holds `&mut ring`: the kernel does not send a slot that is not marked,
            // and marking needs `&mut ring`. Every queued read has completed before this
            // function returns (`complete`), or the io_uring is closed with it still
            // unsubmitted, so the kernel never writes there after the borrow ends. The fd
            // is borrowed for 'a, which outlives the call.
            unsafe {
                // Cannot fail: the queue was emptied above when full.
                if uring.submission().push(&sqe).is_err() {
                    out.push((r.user, Err(io::Error::from(io::ErrorKind::WouldBlock))));
                    continue;
                }
            }
            queued += 1;
        }
        if queued > 0 {
            if let Err(e) = complete(uring, queued, out) {
                self.ring = None;
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Submits what is queued and waits until `n` reads have completed, pushing their results.
fn complete(
    uring: &mut IoUring,
    n: usize,
    out: &mut Vec<(usize, io::Result<NoWait>)>,
) -> io::Result<()> {
    let mut done = 0;
    while done < n {
        match uring.submit_and_wait(n - done) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
        for cqe in uring.completion() {
            done += 1;
            let r = cqe.result();
            let res = if r >= 0 {
                Ok(NoWait::Done(r as usize))
            } else {
                nowait_error(io::Error::from_raw_os_error(-r))
            };
            out.push((cqe.user_data() as usize, res));
        }
    }
    Ok(())
}
