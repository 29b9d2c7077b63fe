//! Whole messages from a stream socket in one system call: `recv(2)` with `MSG_WAITALL`
//! straight into a vector's spare capacity.
//!
//! The NBD export reads each write's payload (a copy tool's 256 KiB) from its client's
//! socket. `Read::read_to_end` on a `Take` of the socket, which it used before, has no size
//! hint: its first read asks for 8 KiB and each full read doubles the next (8, 16, 32, 64
//! and 128 KiB, library/std/src/io/mod.rs `default_read_to_end`), so a 256 KiB payload took
//! six or seven `recvfrom(2)` calls even with all of it queued. With `MSG_WAITALL` the
//! kernel copies as the sender's data arrives and returns once `len` bytes are in
//! (net/unix/af_unix.c `unix_stream_read_generic`: `target = sock_rcvlowat(sk, flags &
//! MSG_WAITALL, size)`; net/ipv4/tcp.c `tcp_recvmsg_locked` likewise): one call, whatever
//! the sender's send buffer holds at a time. It returns early only on a signal, an error,
//! the peer's shutdown or a receive timeout, which the loop below meets.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Appends exactly `len` bytes received from the connected stream socket `fd` to `buf`,
/// written into its spare capacity without zeroing it first, with as few `recv(2)` calls as
/// the kernel allows (one, unless a signal or the socket's receive timeout cuts it short).
///
/// Errors: the socket's error (`buf` then holds what was received before it), or
/// `UnexpectedEof` if the peer closed its end before `len` bytes came (`buf` holds those
/// that did). `EINTR` is retried.
pub fn recv_exact_append(fd: BorrowedFd<'_>, buf: &mut Vec<u8>, len: usize) -> io::Result<()> {
    buf.reserve(len);
    let end = buf.len() + len;
    while buf.len() < end {
        let want = end - buf.len();
        let spare = buf.spare_capacity_mut();
        // SAFETY: `spare` is the vector's unused capacity, at least `want` bytes long
        // (reserved above, and the length only grows towards `end`); the kernel writes at
        // most `want` bytes there and reads nothing through the pointer. The fd is borrowed,
        // so open for the whole call.
        let r = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                want,
                libc::MSG_WAITALL,
            )
        };
        match crate::cvt_size(r) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                let n = n.min(want);
                // SAFETY: the kernel initialised the first `n` bytes of the spare capacity
                // (`recv` returned `n`, and never more than `want` were asked for).
                unsafe { buf.set_len(buf.len() + n) };
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_payload_sent_in_pieces_arrives_whole_after_what_was_there() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        // The writer sends in pieces smaller and larger than a socket buffer, so the
        // receiver has to wait for the rest inside its one call.
        let t = std::thread::spawn(move || {
            for c in sent.chunks(70_001) {
                a.write_all(c).unwrap();
            }
            a
        });
        let mut buf = b"head".to_vec();
        recv_exact_append(b.as_fd(), &mut buf, payload.len()).unwrap();
        assert_eq!(&buf[..4], b"head");
        assert_eq!(&buf[4..], &payload[..]);
        drop(t.join().unwrap());
    }

    #[test]
    fn a_peer_closing_early_is_an_unexpected_eof_with_what_came() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[7u8; 1000]).unwrap();
        drop(a);
        let mut buf = Vec::new();
        let e = recv_exact_append(b.as_fd(), &mut buf, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(buf, vec![7u8; 1000]);
    }

    #[test]
    fn nothing_asked_reads_nothing() {
        let (_a, b) = UnixStream::pair().unwrap();
        let mut buf = vec![1, 2];
        recv_exact_append(b.as_fd(), &mut buf, 0).unwrap();
        assert_eq!(buf, vec![1, 2]);
    }
}
