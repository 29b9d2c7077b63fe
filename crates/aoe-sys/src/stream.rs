//! Stream sockets: a payload of known length received whole with one system call.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Appends exactly `n` bytes received from the stream socket `fd` to `buf`, received into
/// its spare capacity (reserved here, never zeroed first) with `recv(2)` and `MSG_WAITALL`:
/// the kernel gathers the whole payload in one call however many writes the peer makes of
/// it (`unix_stream_read_generic` and `tcp_recvmsg` wait for the target length), where
/// `Read::read_to_end` of a `Take` begins at 8 KiB and doubles its reads, six calls for a
/// 256 KiB payload. A call cut short (a signal, or the socket's receive timeout) is
/// continued for the rest.
///
/// # Errors
///
/// [`io::ErrorKind::UnexpectedEof`] if the peer ends the stream before `n` bytes (what came
/// is kept in `buf`); else the `recv(2)` error.
pub fn recv_exact_append(fd: BorrowedFd<'_>, buf: &mut Vec<u8>, n: usize) -> io::Result<()> {
    buf.reserve(n);
    let mut left = n;
    while left > 0 {
        let spare = buf.spare_capacity_mut();
        // SAFETY: the pointer and length name `left` bytes of `buf`'s spare capacity
        // (`reserve(n)` above made room for all `n`, and every byte received so far moved
        // `len` by as much as it shrank `left`), which the kernel writes into; nothing else
        // refers to them during the call.
        let r = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                spare.as_mut_ptr().cast::<libc::c_void>(),
                left,
                libc::MSG_WAITALL,
            )
        };
        match r {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            r if r > 0 => {
                let got = (r as usize).min(left);
                // SAFETY: the kernel wrote `got` bytes at the start of the spare capacity,
                // so the first `len + got` bytes are initialized and within capacity.
                unsafe { buf.set_len(buf.len() + got) };
                left -= got;
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
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

    /// A payload written in dribbles (many small writes, some after a pause the receiver
    /// must wait through) arrives whole and in order after what `buf` held, in one call.
    #[test]
    fn a_payload_written_in_pieces_arrives_whole() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let want: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sent = want.clone();
        let writer = std::thread::spawn(move || {
            for piece in sent.chunks(4099) {
                b.write_all(piece).unwrap();
            }
            b
        });
        let mut buf = b"head".to_vec();
        recv_exact_append(a.as_fd(), &mut buf, want.len()).unwrap();
        let _b = writer.join().unwrap();
        assert_eq!(&buf[..4], b"head");
        assert_eq!(buf.len(), 4 + want.len());
        assert!(buf[4..] == want[..], "the payload arrived changed");
    }

    /// Bytes past the payload stay in the socket for the next read.
    #[test]
    fn takes_no_byte_past_the_payload() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"0123456789").unwrap();
        let mut buf = Vec::new();
        recv_exact_append(a.as_fd(), &mut buf, 4).unwrap();
        assert_eq!(buf, b"0123");
        recv_exact_append(a.as_fd(), &mut buf, 6).unwrap();
        assert_eq!(buf, b"0123456789");
    }

    /// A stream that ends early is an error, not a short payload taken for whole.
    #[test]
    fn a_stream_ending_early_is_unexpected_eof() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"abc").unwrap();
        drop(b);
        let mut buf = Vec::new();
        let e = recv_exact_append(a.as_fd(), &mut buf, 8).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(buf, b"abc");
    }
}
