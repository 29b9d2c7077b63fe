//! Stream-socket reads straight into a vector's spare capacity, without zeroing it first.
//!
//! The NBD export reads each write's payload (a copy tool's 256 KiB) from its client's
//! socket on the initiator's network thread, which serves many sockets and must never
//! sleep in one: [`recv_append_nowait`] takes what the socket holds now (`MSG_DONTWAIT`),
//! and the next readiness brings the rest. (Until session 21 a reader thread per
//! connection took a payload with one blocking `recv(2)` and `MSG_WAITALL`,
//! `recv_exact_append`; `Read::read_to_end` on a `Take` of the socket before that took six
//! or seven calls per 256 KiB, since it starts at 8 KiB a read and doubles.)

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Appends to `buf` what the connected stream socket `fd` holds now, at most `max` bytes,
/// without waiting (`MSG_DONTWAIT`, so a blocking socket shared with a thread that writes
/// to it stays blocking for that thread), written into the spare capacity without zeroing
/// it first: for a loop that serves many sockets and must never sleep in one of them (the
/// NBD export's write payloads read on the initiator's network thread).
///
/// Returns the bytes appended: 0 when the peer closed its end (or `max` is 0). Errors:
/// `WouldBlock` when nothing is queued, or the socket's error. `EINTR` is retried.
pub fn recv_append_nowait(fd: BorrowedFd<'_>, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    if max == 0 {
        return Ok(0);
    }
    buf.reserve(max);
    loop {
        let spare = buf.spare_capacity_mut();
        // SAFETY: `spare` is the vector's unused capacity, at least `max` bytes long
        // (reserved above); the kernel writes at most `max` bytes there and reads nothing
        // through the pointer. The fd is borrowed, so open for the whole call.
        let r = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                max,
                libc::MSG_DONTWAIT,
            )
        };
        match crate::cvt_size(r) {
            Ok(n) => {
                let n = n.min(max);
                // SAFETY: the kernel initialised the first `n` bytes of the spare capacity
                // (`recv` returned `n`, and never more than `max` were asked for).
                unsafe { buf.set_len(buf.len() + n) };
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn without_waiting_takes_what_is_there_and_says_would_block_or_eof() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut buf = b"h".to_vec();
        let e = recv_append_nowait(b.as_fd(), &mut buf, 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        a.write_all(&[5u8; 100]).unwrap();
        assert_eq!(recv_append_nowait(b.as_fd(), &mut buf, 60).unwrap(), 60);
        assert_eq!(recv_append_nowait(b.as_fd(), &mut buf, 60).unwrap(), 40);
        assert_eq!(buf.len(), 101);
        assert!(buf[1..].iter().all(|&x| x == 5));
        drop(a);
        assert_eq!(recv_append_nowait(b.as_fd(), &mut buf, 60).unwrap(), 0);
    }
}
