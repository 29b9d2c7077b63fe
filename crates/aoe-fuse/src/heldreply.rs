//! A device file's READ answered straight from the initiator's receive ring: the FUSE reply
//! written by us as one `writev(2)` on the /dev/fuse fd, a `fuse_out_header` then one iovec
//! per frame payload still in its ring slot ([`aoe_initiator::blockdev::BlockDevice::read_held`]),
//! so the only copy of the data is the kernel's, from the slots into the reader's pages
//! (fs/fuse/dev.c `fuse_dev_do_write`, `copy_out_args`). Before, the engine copied each
//! payload into a buffer first and fuser wrote that.
//!
//! The kernel's rules for the write (fs/fuse/dev.c `fuse_dev_do_write`): the header's `len`
//! is the whole write (else `EINVAL`); a reply with data has `error` 0; the request is found by
//! `unique` on the processing list of the device file it was read from (a `dup` shares it:
//! fuser's session reads from one fd, not `FUSE_DEV_IOC_CLONE`d ones, see [`crate::mount`]);
//! a READ's reply may be short (`out_argvar`), which is how a read crossing the device's end
//! is answered; and a second reply to a request already answered finds nothing (`ENOENT`),
//! since request ids come from a counter that only grows (`fuse_get_unique`) and are never
//! reused. A write to /dev/fuse does not block: the data goes into the pages the request
//! already holds.

use std::io::{self, IoSlice};
use std::os::fd::BorrowedFd;

/// Bytes of `struct fuse_out_header` (include/uapi/linux/fuse.h): `len` u32, `error` i32,
/// `unique` u64, in the machine's byte order.
pub(crate) const OUT_HEADER: usize = 16;

/// Most iovecs one `writev(2)` takes (`UIO_MAXIOV`); a reply must be one write. A 256 KiB
/// read is 30 frames at MTU 9000 and 256 at 1500, far below.
pub(crate) const IOV_MAX: usize = 1024;

/// The `fuse_out_header` of a successful reply to request `unique` carrying `data` bytes.
pub(crate) fn out_header(unique: u64, data: usize) -> io::Result<[u8; OUT_HEADER]> {
    let len = u32::try_from(OUT_HEADER + data)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "reply longer than 4 GiB"))?;
    let mut h = [0u8; OUT_HEADER];
    h[..4].copy_from_slice(&len.to_ne_bytes());
    // h[4..8]: error 0.
    h[8..].copy_from_slice(&unique.to_ne_bytes());
    Ok(h)
}

/// Writes the reply to READ request `unique` whose data is `pieces` in order, in one
/// `writev(2)` on `fd` (the /dev/fuse fd the request was read from, or a dup of it).
/// `Unsupported` without writing when `pieces` needs more than [`IOV_MAX`] iovecs (the
/// caller then copies them into one buffer); otherwise the kernel's refusal as it is
/// (`ENOENT`: the request is no longer waiting, e.g. its reader was interrupted and it was
/// given up; `ENODEV`: unmounted).
pub(crate) fn write_reply(fd: BorrowedFd<'_>, unique: u64, pieces: &[&[u8]]) -> io::Result<()> {
    if pieces.len() + 1 > IOV_MAX {
        return Err(io::ErrorKind::Unsupported.into());
    }
    let data: usize = pieces.iter().map(|p| p.len()).sum();
    let head = out_header(unique, data)?;
    let iov: Vec<IoSlice<'_>> = std::iter::once(&head[..])
        .chain(pieces.iter().copied())
        .filter(|p| !p.is_empty())
        .map(IoSlice::new)
        .collect();
    loop {
        match nix::sys::uio::writev(fd, &iov) {
            // The write is all or nothing: the kernel copies the whole reply or fails it.
            Ok(n) if n == OUT_HEADER + data => return Ok(()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "/dev/fuse took {n} of a {} byte reply",
                    OUT_HEADER + data
                )))
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Pieces shorter than this on average (frames of an MTU under about 4,500: at 1500 a
/// 256 KiB read is 256 pieces of 1 KiB) are gathered into one buffer before the write
/// ([`write_reply_gathered`]).
pub(crate) const GATHER_BELOW: usize = 4096;

/// [`write_reply`], but with pieces averaging under [`GATHER_BELOW`] bytes first copied, in
/// order, into `buf` (cleared, kept for the next reply) and written as one iovec. For each
/// iovec the kernel pins the user page it lies in and releases it again (fs/fuse/dev.c
/// `fuse_copy_fill`, `iov_iter_get_pages2`; `gup_fast_fallback` in the profiles), once per
/// piece however small: 1,024 pins a MiB at MTU 1500 against 256 for one buffer, the
/// reply's largest per-frame cost there (docs/PERFORMANCE.md, "Session 30: the
/// initiator's reads at MTU 1500"). Larger pieces (MTU 9000: 8.5 KiB, two or three pages
/// each) go as they are: the copy would cost more than the pins it saves.
pub(crate) fn write_reply_gathered(
    fd: BorrowedFd<'_>,
    unique: u64,
    pieces: &[&[u8]],
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let data: usize = pieces.iter().map(|p| p.len()).sum();
    if pieces.len() < 2 || data >= GATHER_BELOW * pieces.len() {
        return write_reply(fd, unique, pieces);
    }
    buf.clear();
    buf.reserve(data);
    for p in pieces {
        buf.extend_from_slice(p);
    }
    write_reply(fd, unique, &[&buf[..]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    #[test]
    fn header_fields_in_machine_order() {
        let h = out_header(0x0102_0304_0506_0708, 4096).unwrap();
        assert_eq!(u32::from_ne_bytes(h[..4].try_into().unwrap()), 16 + 4096);
        assert_eq!(i32::from_ne_bytes(h[4..8].try_into().unwrap()), 0);
        assert_eq!(
            u64::from_ne_bytes(h[8..].try_into().unwrap()),
            0x0102_0304_0506_0708
        );
        assert!(out_header(1, u32::MAX as usize).is_err());
    }

    /// The reply is the header then every piece, in order, in one write (a socket stands in
    /// for /dev/fuse); empty pieces are left out, and too many pieces write nothing.
    #[test]
    fn one_write_of_header_and_pieces() {
        let (mut r, w) = std::os::unix::net::UnixStream::pair().unwrap();
        let all: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let pieces: Vec<&[u8]> = vec![&all[..1000], &all[1000..1000], &all[1000..]];
        write_reply(w.as_fd(), 42, &pieces).unwrap();
        let mut got = vec![0u8; OUT_HEADER + all.len()];
        r.read_exact(&mut got).unwrap();
        assert_eq!(got[..OUT_HEADER], out_header(42, 3000).unwrap());
        assert_eq!(got[OUT_HEADER..], all[..]);

        let many: Vec<&[u8]> = vec![&all[..1]; IOV_MAX];
        let e = write_reply(w.as_fd(), 43, &many).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        drop(w);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "wrote {} bytes", rest.len());
    }

    /// Gathered or not, the reply's bytes are the same: the header, then every piece in
    /// order. Small pieces (1 KiB, as at MTU 1500) come out of a buffer that already held a
    /// longer reply (its stale tail must not follow), large ones (8.5 KiB) as they are. A
    /// thread reads the socket to its end, so a reply too long fails the comparison
    /// instead of filling the socket.
    #[test]
    fn gathered_reply_is_the_header_and_the_pieces_in_order() {
        let (mut r, w) = std::os::unix::net::UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            r.read_to_end(&mut got).unwrap();
            got
        });
        let all: Vec<u8> = (0..=250u8).cycle().take(256 * 1024).collect();
        let mut buf = vec![0xee; 300 * 1024];
        let mut want = Vec::new();
        for size in [1024usize, 1000, 8704] {
            let pieces: Vec<&[u8]> = all.chunks(size).take(20).collect();
            let data: Vec<u8> = pieces.concat();
            write_reply_gathered(w.as_fd(), size as u64, &pieces, &mut buf).unwrap();
            want.extend_from_slice(&out_header(size as u64, data.len()).unwrap());
            want.extend_from_slice(&data);
            // Gathered only below GATHER_BELOW: the buffer holds the last small reply.
            if size < GATHER_BELOW {
                assert!(
                    buf == data,
                    "{size}-byte pieces: the buffer is not the reply"
                );
            }
        }
        assert_eq!(buf.len(), 20 * 1000, "8.5 KiB pieces were copied");
        drop(w);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the replies' bytes differ");
    }
}
