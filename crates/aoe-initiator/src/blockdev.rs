//! The block-device handle every front-end uses, [`BlockDevice`]: byte-granular I/O on a
//! 512-byte-sector AoE device (or a partition of one), on top of [`Handle::io`]: reads of
//! any offset and length (read the covering sectors and slice), writes of any offset and
//! length (read-modify-write of the partial first and last sectors), writes of zeros, and
//! flush. Every method is asynchronous: it submits to the network thread and returns, and
//! `done` runs later on that thread. The front-ends hold one: the NBD server (`aoe-nbd`)
//! and the FUSE device files (`aoe-fuse`); another (ublk) would too.
//!
//! Every read and write holds its covering sectors in the daemon's
//! [`RangeLocks`](rangelock::RangeLocks) until it completes: shared when aligned,
//! exclusive for a read-modify-write (from the read of the partial sectors to the end of
//! the write back), so two unaligned writes to different bytes of one sector, through any
//! mix of device files, partition files and NBD exports, both land (what the kernel's page
//! cache guarantees above a real block device).

pub mod rangelock;

use aoe_proto::initiator::BlockOp;
use aoe_wire::TargetAddr;

use crate::net::Handle;
use rangelock::Mode;

/// Sector size of every AoE device.
pub const SECTOR: u64 = 512;

/// Bytes of zeros written per AoE operation by [`BlockDevice::write_zeroes`].
pub const ZERO_CHUNK: u64 = 4 << 20;

/// Completion callback.
pub type Cb<T> = Box<dyn FnOnce(Result<T, i32>) + Send>;

/// A block device as a front-end sees it: the extent starting at sector `base` of AoE device
/// `dev` (a whole device, or one of its partitions), read and written at byte granularity
/// through the initiator's network thread. Cheap to clone.
#[derive(Clone)]
pub struct BlockDevice {
    net: Handle,
    dev: TargetAddr,
    base: u64,
}

impl BlockDevice {
    /// The extent starting at sector `base` of `dev`, through the network thread `net`.
    pub fn new(net: Handle, dev: TargetAddr, base: u64) -> BlockDevice {
        BlockDevice { net, dev, base }
    }

    /// The AoE device (shelf.slot).
    pub fn addr(&self) -> TargetAddr {
        self.dev
    }

    /// First sector of the extent on the AoE device.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Reads `len` bytes at byte `offset` of the extent, holding the covering sectors shared.
    pub fn read(&self, offset: u64, len: usize, done: Cb<Vec<u8>>) {
        read(&self.net, self.dev, self.base, offset, len, done)
    }

    /// Writes `data` at byte `offset` of the extent. An aligned write goes out as it is
    /// (holding its sectors shared); otherwise the partial first and last sectors are read
    /// first and the whole covering range is written back, all under an exclusive hold of
    /// the covering sectors.
    pub fn write(&self, offset: u64, data: Vec<u8>, done: Cb<()>) {
        write(&self.net, self.dev, self.base, offset, data, done)
    }

    /// Writes a copy of `src` at byte `offset`, like [`BlockDevice::write`], but copied and
    /// submitted a piece at a time ([`BlockDevice::write_pieces`]): a FUSE write's data lies
    /// in fuser's buffer, borrowed, and must be copied before the request is answered later;
    /// in pieces, the first frames are on the wire while the rest is still being copied.
    pub fn write_from(&self, offset: u64, src: &[u8], piece: usize, done: Cb<()>) {
        let mut at = 0;
        let _ = self.write_pieces(
            offset,
            src.len(),
            piece,
            &mut |n| {
                let d = src[at..at + n].to_vec();
                at += n;
                Ok(d)
            },
            done,
        );
    }

    /// Writes `len` bytes at byte `offset` that `fill(n)` produces `n` at a time, in order
    /// (read from a socket, copied from a borrowed buffer): an aligned write longer than
    /// `piece` bytes is submitted a piece at a time, each as soon as `fill` has produced
    /// it, so the network thread sends the first frames while the rest is still arriving
    /// or being copied, instead of idling until the whole write is in memory. `done` runs
    /// once, when every piece is answered (a write is acknowledged only then, as one write
    /// is), with the first error if a piece failed. Each piece holds its own sectors
    /// shared, as an aligned write does (overlapping writers are ordered per sector, as the
    /// kernel's block layer orders the pieces it splits a large write into). An unaligned
    /// write, one no longer than `piece`, or `piece` not a non-zero multiple of [`SECTOR`],
    /// is produced whole and goes as one [`BlockDevice::write`].
    ///
    /// If `fill` fails, its error is returned, no further piece is asked for, and `done`
    /// still runs once (with EIO) after the pieces already submitted are answered, so a
    /// front-end's accounting of what is in flight stays whole.
    pub fn write_pieces(
        &self,
        offset: u64,
        len: usize,
        piece: usize,
        fill: &mut dyn FnMut(usize) -> std::io::Result<Vec<u8>>,
        done: Cb<()>,
    ) -> std::io::Result<()> {
        let aligned = offset % SECTOR == 0 && len as u64 % SECTOR == 0;
        if !aligned || piece == 0 || piece as u64 % SECTOR != 0 || len <= piece {
            return match fill(len) {
                Ok(data) => {
                    self.write(offset, data, done);
                    Ok(())
                }
                Err(e) => {
                    done(Err(libc::EIO));
                    Err(e)
                }
            };
        }
        let n = len.div_ceil(piece);
        let all = Pieces::new(n, done);
        for i in 0..n {
            let at = i * piece;
            match fill(piece.min(len - at)) {
                Ok(data) => {
                    let all = all.clone();
                    self.write(offset + at as u64, data, Box::new(move |r| all.answered(r)));
                }
                Err(e) => {
                    for _ in i..n {
                        all.answered(Err(libc::EIO));
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Writes `len` zero bytes at byte `offset` (real writes: AoE has no unmap or
    /// write-same), in chunks of [`ZERO_CHUNK`] one after the other.
    pub fn write_zeroes(&self, offset: u64, len: u64, done: Cb<()>) {
        write_zeroes(&self.net, self.dev, self.base, offset, len, done)
    }

    /// ATA FLUSH CACHE EXT on the device.
    pub fn flush(&self, done: Cb<()>) {
        flush(&self.net, self.dev, done)
    }

    /// A callback that runs, once the operation it is given to succeeded and if
    /// `also_flush`, a flush, then `done`: a write with FUA is acknowledged only once it is
    /// on stable storage.
    pub fn then_flush(&self, also_flush: bool, done: Cb<()>) -> Cb<()> {
        then_flush(&self.net, self.dev, also_flush, done)
    }
}

/// The pieces of one [`BlockDevice::write_from`] still unanswered, and its callback, run by
/// the last piece's answer with the first error seen.
#[derive(Clone)]
struct Pieces(std::sync::Arc<std::sync::Mutex<PiecesState>>);

struct PiecesState {
    left: usize,
    err: Option<i32>,
    done: Option<Cb<()>>,
}

impl Pieces {
    fn new(n: usize, done: Cb<()>) -> Pieces {
        Pieces(std::sync::Arc::new(std::sync::Mutex::new(PiecesState {
            left: n,
            err: None,
            done: Some(done),
        })))
    }

    fn answered(&self, r: Result<(), i32>) {
        let (done, r) = {
            let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = r {
                s.err.get_or_insert(e);
            }
            s.left -= 1;
            if s.left > 0 {
                return;
            }
            (s.done.take(), s.err.map_or(Ok(()), Err))
        };
        if let Some(done) = done {
            done(r)
        }
    }
}

/// Bytes of a write handed to the network thread at a time, about ([`write_piece`] rounds it
/// up to whole frames; half of a copy tool's 256 KiB request), by the front-ends that have a write's data arrive or copied in
/// order ([`BlockDevice::write_pieces`]). A `dd bs=1M oflag=direct` write is one FUSE
/// request of 1 MiB, and its frames waited until the daemon had copied the whole MiB out of
/// fuser's buffer (about 60 us per MiB, the other CPU and the link idle meanwhile; dd keeps
/// one request in flight, so nothing else filled the gap); an NBD write of 256 KiB waited
/// for its last byte, read in several pieces as the client refilled its send buffer
/// (docs/PERFORMANCE.md, "The write path's idle CPU").
pub const WRITE_PIECE_BYTES: usize = 128 << 10;

/// The piece a front-end submits at a time for a device whose frames carry `payload`
/// bytes: [`WRITE_PIECE_BYTES`] rounded up to whole frames, so pieces add no short frame of
/// their own (at MTU 9000 a piece is 16 frames of 17 sectors, where 128 KiB would be 15
/// and one of 1 sector; a 256 KiB write is then 16 + 15 frames, 31 as whole).
pub fn write_piece(payload: usize) -> usize {
    let frame = (payload / SECTOR as usize * SECTOR as usize).max(SECTOR as usize);
    WRITE_PIECE_BYTES.div_ceil(frame) * frame
}

/// The sectors covering bytes `[offset, offset + len)`: first sector, sector count, and
/// the offset of `offset` inside the first sector. `len` must be non-zero.
pub fn covering(offset: u64, len: u64) -> (u64, u64, usize) {
    let first = offset / SECTOR;
    let last = (offset + len).div_ceil(SECTOR);
    (first, last - first, (offset % SECTOR) as usize)
}

/// Reads `len` bytes at byte `offset` of the extent starting at sector `base` of `dev`.
fn read(net: &Handle, dev: TargetAddr, base: u64, offset: u64, len: usize, done: Cb<Vec<u8>>) {
    if len == 0 {
        return done(Ok(Vec::new()));
    }
    let (first, count, skip) = covering(offset, len as u64);
    let Ok(sectors) = u32::try_from(count) else {
        return done(Err(libc::EINVAL));
    };
    let lba = base + first;
    let n2 = net.clone();
    net.locks().acquire(
        dev,
        lba,
        count,
        Mode::Shared,
        Box::new(move |held| {
            n2.io(
                dev,
                BlockOp::Read { lba, sectors },
                Box::new(move |r| {
                    drop(held);
                    match r {
                        Ok(Some(mut d)) if d.len() >= skip + len => {
                            d.drain(..skip);
                            d.truncate(len);
                            done(Ok(d))
                        }
                        Ok(_) => done(Err(libc::EIO)),
                        Err(e) => done(Err(e)),
                    }
                }),
            )
        }),
    );
}

/// Writes `data` at byte `offset` of the extent starting at sector `base` of `dev`. An
/// aligned write goes out as it is (holding its sectors shared); otherwise the partial
/// first and last sectors are read first and the whole covering range is written back,
/// all under an exclusive hold of the covering sectors.
fn write(net: &Handle, dev: TargetAddr, base: u64, offset: u64, data: Vec<u8>, done: Cb<()>) {
    if data.is_empty() {
        return done(Ok(()));
    }
    let len = data.len() as u64;
    let (first, count, _) = covering(offset, len);
    let aligned = offset % SECTOR == 0 && len % SECTOR == 0;
    let mode = if aligned {
        Mode::Shared
    } else {
        Mode::Exclusive
    };
    let n2 = net.clone();
    net.locks().acquire(
        dev,
        base + first,
        count,
        mode,
        Box::new(move |held| {
            // Released when the last AoE command of this write completes.
            let done: Cb<()> = Box::new(move |r| {
                drop(held);
                done(r)
            });
            if aligned {
                n2.io(
                    dev,
                    BlockOp::Write {
                        lba: base + first,
                        data,
                    },
                    Box::new(move |r| done(r.map(|_| ()))),
                )
            } else {
                read_modify_write(n2, dev, base, offset, data, done)
            }
        }),
    );
}

/// The unaligned half of [`write`], run with the covering sectors held exclusively.
fn read_modify_write(
    net: Handle,
    dev: TargetAddr,
    base: u64,
    offset: u64,
    data: Vec<u8>,
    done: Cb<()>,
) {
    let len = data.len() as u64;
    let (first, count, skip) = covering(offset, len);
    let mut buf = vec![0u8; (count * SECTOR) as usize];
    buf[skip..skip + data.len()].copy_from_slice(&data);
    drop(data);
    let covered = (skip, skip + len as usize);
    let mut todo = Vec::new();
    if skip != 0 {
        todo.push(0);
    }
    if covered.1 % SECTOR as usize != 0 && !(count == 1 && skip != 0) {
        todo.push(count - 1);
    }
    fill(net, dev, base + first, buf, covered, todo, done);
}

/// Reads the partial sectors in `todo` (indices into `buf`) one after the other, keeps
/// their bytes outside `covered`, then writes `buf` at `lba`.
fn fill(
    net: Handle,
    dev: TargetAddr,
    lba: u64,
    buf: Vec<u8>,
    covered: (usize, usize),
    mut todo: Vec<u64>,
    done: Cb<()>,
) {
    let Some(i) = todo.pop() else {
        return net.io(
            dev,
            BlockOp::Write { lba, data: buf },
            Box::new(move |r| done(r.map(|_| ()))),
        );
    };
    let n2 = net.clone();
    net.io(
        dev,
        BlockOp::Read {
            lba: lba + i,
            sectors: 1,
        },
        Box::new(move |r| match r {
            Ok(Some(old)) if old.len() == SECTOR as usize => {
                let mut buf = buf;
                patch_outside(&mut buf, i, &old, covered);
                fill(n2, dev, lba, buf, covered, todo, done)
            }
            Ok(_) => done(Err(libc::EIO)),
            Err(e) => done(Err(e)),
        }),
    );
}

/// Copies the bytes of sector `i`'s old contents that lie outside `covered` into `buf`.
fn patch_outside(buf: &mut [u8], i: u64, old: &[u8], covered: (usize, usize)) {
    let s = (i * SECTOR) as usize;
    let e = s + SECTOR as usize;
    for (a, b) in [(s, covered.0.min(e)), (covered.1.max(s), e)] {
        if a < b {
            buf[a..b].copy_from_slice(&old[a - s..b - s]);
        }
    }
}

/// Writes `len` zero bytes at byte `offset` (real writes: AoE has no unmap or write-same),
/// in chunks of [`ZERO_CHUNK`] one after the other so a large request does not allocate
/// its whole length.
fn write_zeroes(net: &Handle, dev: TargetAddr, base: u64, offset: u64, len: u64, done: Cb<()>) {
    if len == 0 {
        return done(Ok(()));
    }
    // Cut at the first sector boundary so every chunk after an unaligned head is aligned.
    let mut n = (ZERO_CHUNK - offset % ZERO_CHUNK).min(len);
    if offset % SECTOR != 0 {
        n = (SECTOR - offset % SECTOR).min(len);
    }
    let net2 = net.clone();
    write(
        net,
        dev,
        base,
        offset,
        vec![0u8; n as usize],
        Box::new(move |r| match r {
            Ok(()) => write_zeroes(&net2, dev, base, offset + n, len - n, done),
            Err(e) => done(Err(e)),
        }),
    );
}

/// ATA FLUSH CACHE EXT on `dev`.
fn flush(net: &Handle, dev: TargetAddr, done: Cb<()>) {
    net.io(dev, BlockOp::Flush, Box::new(move |r| done(r.map(|_| ()))));
}

/// Runs `first`, then (if it succeeded and `also_flush`) a flush, then `done`: a write
/// with FUA is acknowledged only once it is on stable storage.
fn then_flush(net: &Handle, dev: TargetAddr, also_flush: bool, done: Cb<()>) -> Cb<()> {
    if !also_flush {
        return done;
    }
    let net = net.clone();
    Box::new(move |r| match r {
        Ok(()) => flush(&net, dev, done),
        Err(e) => done(Err(e)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::net::Cmd;
    use std::sync::{Arc, Mutex};

    const DEV: TargetAddr = TargetAddr { shelf: 1, slot: 1 };

    /// The writes waiting in the channel, in the order submitted: (lba, data, done).
    fn submitted(rx: &crossbeam_channel::Receiver<Cmd>) -> Vec<(u64, Vec<u8>, crate::net::Done)> {
        let mut v = Vec::new();
        while let Ok(c) = rx.try_recv() {
            match c {
                Cmd::Io {
                    dev,
                    op: BlockOp::Write { lba, data },
                    done,
                } => {
                    assert_eq!(dev, DEV);
                    v.push((lba, data, done));
                }
                _ => panic!("a command other than a write"),
            }
        }
        v
    }

    /// The results a callback was called with.
    type Results = Arc<Mutex<Vec<Result<(), i32>>>>;

    fn result_slot() -> (Results, Cb<()>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        (got, Box::new(move |r| g.lock().unwrap().push(r)))
    }

    /// A long aligned write from a borrowed buffer (a FUSE write) goes to the network thread
    /// in pieces, each submitted as it is copied, and is answered once, after its last
    /// piece, with the first error. The old FUSE write copied the whole request and
    /// submitted one write (one command here): this fails on it.
    #[test]
    fn a_long_aligned_write_goes_in_pieces_answered_once() {
        let (h, rx) = Handle::for_test().unwrap();
        let bd = BlockDevice::new(h, DEV, 100);
        let src: Vec<u8> = (0..(1 << 20) + 4096).map(|i| (i / 512) as u8).collect();
        let piece = 8704 * 31;
        let (got, done) = result_slot();
        bd.write_from(512 * 8, &src, piece, done);
        let mut w = submitted(&rx);
        assert_eq!(w.len(), src.len().div_ceil(piece), "one command per piece");
        let mut at = 0;
        for (k, (lba, data, _)) in w.iter().enumerate() {
            assert_eq!(
                *lba,
                100 + 8 + (at / 512) as u64,
                "piece {k} at its sectors"
            );
            assert_eq!(
                data[..],
                src[at..at + data.len()],
                "piece {k} carries its bytes"
            );
            at += data.len();
        }
        assert_eq!(at, src.len());
        // Answered out of order, one failing: nothing until the last, then its error.
        let last = w.pop().unwrap();
        let (_, _, d0) = w.remove(0);
        d0(Err(libc::EIO));
        for (_, _, d) in w {
            d(Ok(None));
            assert!(
                got.lock().unwrap().is_empty(),
                "answered before every piece was"
            );
        }
        (last.2)(Ok(None));
        assert_eq!(*got.lock().unwrap(), vec![Err(libc::EIO)]);

        // All answered well: Ok, once.
        let (got, done) = result_slot();
        bd.write_from(0, &src[..3 * piece], piece, done);
        let w = submitted(&rx);
        assert_eq!(w.len(), 3);
        for (_, _, d) in w {
            d(Ok(None));
        }
        assert_eq!(*got.lock().unwrap(), vec![Ok(())]);
    }

    /// A source that fails part way (an NBD client gone mid-payload) stops the pieces; the
    /// callback still runs once, with EIO, after the pieces already submitted are answered.
    #[test]
    fn a_failing_source_still_answers_once() {
        let (h, rx) = Handle::for_test().unwrap();
        let bd = BlockDevice::new(h, DEV, 0);
        let (got, done) = result_slot();
        let mut calls = 0;
        let r = bd.write_pieces(
            0,
            4 << 20,
            1 << 20,
            &mut |n| {
                calls += 1;
                if calls == 3 {
                    Err(std::io::ErrorKind::UnexpectedEof.into())
                } else {
                    Ok(vec![1u8; n])
                }
            },
            done,
        );
        assert!(r.is_err());
        assert_eq!(calls, 3, "no piece asked for after the failure");
        let w = submitted(&rx);
        assert_eq!(w.len(), 2);
        for (_, _, d) in w {
            assert!(got.lock().unwrap().is_empty());
            d(Ok(None));
        }
        assert_eq!(*got.lock().unwrap(), vec![Err(libc::EIO)]);
        // Whole (no pieces), failing: answered at once.
        let (got, done) = result_slot();
        let r = bd.write_pieces(
            0,
            4096,
            0,
            &mut |_| Err(std::io::ErrorKind::UnexpectedEof.into()),
            done,
        );
        assert!(r.is_err());
        assert_eq!(*got.lock().unwrap(), vec![Err(libc::EIO)]);
        assert!(rx.try_recv().is_err());
    }

    /// An unaligned write, or one no longer than a piece, is one write as before (an
    /// unaligned one reads its partial sectors first).
    #[test]
    fn short_or_unaligned_writes_stay_whole() {
        let (h, rx) = Handle::for_test().unwrap();
        let bd = BlockDevice::new(h, DEV, 0);
        let src = vec![7u8; 64 << 10];
        let (_got, done) = result_slot();
        bd.write_from(0, &src, 64 << 10, done);
        let w = submitted(&rx);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].1.len(), 64 << 10);
        // Answered, it releases its sectors for the next write's exclusive hold.
        for (_, _, d) in w {
            d(Ok(None));
        }
        let (_got, done) = result_slot();
        bd.write_from(100, &src, 4096, done);
        // The read of a partial sector comes first, under the exclusive hold.
        match rx.try_recv() {
            Ok(Cmd::Io {
                op: BlockOp::Read { sectors: 1, .. },
                ..
            }) => {}
            _ => panic!("an unaligned write starts with the read of a partial sector"),
        }
        assert!(rx.try_recv().is_err());
    }

    /// A write's pieces are whole frames of the device, about [`WRITE_PIECE_BYTES`].
    #[test]
    fn write_pieces_are_whole_frames() {
        assert_eq!(write_piece(8704), 16 * 8704);
        assert_eq!(write_piece(1024), WRITE_PIECE_BYTES);
        assert_eq!(write_piece(0), WRITE_PIECE_BYTES);
        assert_eq!(write_piece(1000), WRITE_PIECE_BYTES);
        for p in [512, 1024, 4096, 8704, 8192] {
            let w = write_piece(p);
            assert_eq!(w % p, 0, "{p}");
            assert!(
                (WRITE_PIECE_BYTES..WRITE_PIECE_BYTES + p).contains(&w),
                "{p}: {w}"
            );
            // A copy tool's 256 KiB write is split, in no more frames than whole.
            assert!(w < 256 << 10, "{p}: {w}");
            let frames = |n: usize| n.div_ceil(p);
            assert_eq!(
                frames(w) + frames((256 << 10) - w),
                frames(256 << 10),
                "{p}"
            );
        }
    }

    #[test]
    fn covering_sectors() {
        assert_eq!(covering(0, 512), (0, 1, 0));
        assert_eq!(covering(1, 1), (0, 1, 1));
        assert_eq!(covering(511, 2), (0, 2, 511));
        assert_eq!(covering(1024, 1536), (2, 3, 0));
        assert_eq!(covering(1000, 100), (1, 2, 488));
        assert_eq!(covering(1030, 100), (2, 1, 6));
    }

    #[test]
    fn patch_keeps_old_bytes_outside_the_write() {
        // Two sectors, new data in [100, 700).
        let mut buf = vec![0xaau8; 1024];
        let old0 = vec![1u8; 512];
        let old1 = vec![2u8; 512];
        patch_outside(&mut buf, 0, &old0, (100, 700));
        patch_outside(&mut buf, 1, &old1, (100, 700));
        assert!(buf[..100].iter().all(|b| *b == 1));
        assert!(buf[100..700].iter().all(|b| *b == 0xaa));
        assert!(buf[700..].iter().all(|b| *b == 2));
        // Inside one sector: both ends from the same old sector.
        let mut buf = vec![0xaau8; 512];
        patch_outside(&mut buf, 0, &old0, (3, 8));
        assert_eq!(&buf[..3], &[1, 1, 1]);
        assert!(buf[3..8].iter().all(|b| *b == 0xaa));
        assert!(buf[8..].iter().all(|b| *b == 1));
    }
}
