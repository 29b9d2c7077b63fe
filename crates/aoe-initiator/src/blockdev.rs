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

use aoe_proto::initiator::{BlockOp, Lent};
use aoe_wire::TargetAddr;

use crate::net::{DoneHeld, Handle};
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
        read(&self.net, self.dev, self.base, offset, len, None, done)
    }

    /// Like [`read`](Self::read), into `buf` ([`BlockOp::ReadInto`]): `done` gets that very
    /// buffer (its block unmoved: the bytes read, moved to its start when `offset` is not
    /// sector-aligned), and on failure `buf` goes home. A `buf` whose capacity does not hold
    /// the covering sectors fails the read (`EINVAL`).
    pub fn read_into(&self, offset: u64, len: usize, buf: Lent, done: Cb<Vec<u8>>) {
        read(&self.net, self.dev, self.base, offset, len, Some(buf), done)
    }

    /// Like [`read`](Self::read), the bytes left in the network thread's receive ring
    /// ([`Handle::read_held`]): `done` runs on the network thread with the bytes as slices
    /// valid only during the call (a front-end writes them out or copies them there).
    pub fn read_held(&self, offset: u64, len: usize, done: DoneHeld) {
        if len == 0 {
            return done(Ok(&[]));
        }
        let (first, count, skip) = covering(offset, len as u64);
        let Ok(sectors) = u32::try_from(count) else {
            return done(Err(libc::EINVAL));
        };
        let (dev, lba) = (self.dev, self.base + first);
        let n2 = self.net.clone();
        self.net.locks().acquire(
            dev,
            lba,
            count,
            Mode::Shared,
            Box::new(move |held| {
                n2.read_held(
                    dev,
                    lba,
                    sectors,
                    Box::new(move |r| {
                        drop(held);
                        match r.map(|p| trim(p, skip, len)) {
                            Ok(Some(t)) => done(Ok(&t)),
                            Ok(None) => done(Err(libc::EIO)),
                            Err(e) => done(Err(e)),
                        }
                    }),
                )
            }),
        );
    }

    /// Writes `data` at byte `offset` of the extent. An aligned write goes out as it is
    /// (holding its sectors shared); otherwise the partial first and last sectors are read
    /// first and the whole covering range is written back, all under an exclusive hold of
    /// the covering sectors.
    pub fn write(&self, offset: u64, data: Vec<u8>, done: Cb<()>) {
        write(
            &self.net,
            self.dev,
            self.base,
            offset,
            Lent::owned(data),
            done,
        )
    }

    /// Like [`write`](Self::write), with a lent buffer: an aligned write hands it to the
    /// engine as it is ([`BlockOp::WriteLent`]), which gives it back once done with it; an
    /// unaligned one copies it into the read-modify-write buffer and gives it back then.
    pub fn write_lent(&self, offset: u64, data: Lent, done: Cb<()>) {
        write(&self.net, self.dev, self.base, offset, data, done)
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

    /// A callback that, once the write of `len` bytes at byte `offset` it is given to
    /// succeeded, drops every cached copy of the sectors it covered that another front-end
    /// keeps ([`Handle::drop_cached`]: the FUSE device files' page cache), then runs `done`:
    /// a read of the device file after the write was answered sees it, as after a direct
    /// write to a block device (NBD: "a read ... after a write completed" on any
    /// connection).
    pub fn then_drop_cached(&self, offset: u64, len: u64, done: Cb<()>) -> Cb<()> {
        if len == 0 {
            return done;
        }
        let (net, dev) = (self.net.clone(), self.dev);
        let (first, count, _) = covering(offset, len);
        let lba = self.base + first;
        // A failed write (a write of zeros cut short) may have landed in part: its range is
        // dropped too (dropping more than was written is always safe).
        Box::new(move |r| net.drop_cached(dev, lba, count, Box::new(move || done(r))))
    }

    /// A callback that runs, once the operation it is given to succeeded and if
    /// `also_flush`, a flush, then `done`: a write with FUA is acknowledged only once it is
    /// on stable storage.
    pub fn then_flush(&self, also_flush: bool, done: Cb<()>) -> Cb<()> {
        then_flush(&self.net, self.dev, also_flush, done)
    }
}

/// The sectors covering bytes `[offset, offset + len)`: first sector, sector count, and
/// the offset of `offset` inside the first sector. `len` must be non-zero.
pub fn covering(offset: u64, len: u64) -> (u64, u64, usize) {
    let first = offset / SECTOR;
    let last = (offset + len).div_ceil(SECTOR);
    (first, last - first, (offset % SECTOR) as usize)
}

/// `pieces` without their first `skip` bytes, cut to `len` bytes; None if they hold fewer
/// than `skip + len`.
pub fn trim<'a>(pieces: &[&'a [u8]], mut skip: usize, len: usize) -> Option<Vec<&'a [u8]>> {
    let mut out = Vec::with_capacity(pieces.len());
    let mut want = len;
    for p in pieces {
        if want == 0 {
            break;
        }
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        let p = &p[skip..];
        skip = 0;
        let k = p.len().min(want);
        out.push(&p[..k]);
        want -= k;
    }
    (want == 0).then_some(out)
}

/// Reads `len` bytes at byte `offset` of the extent starting at sector `base` of `dev`.
fn read(
    net: &Handle,
    dev: TargetAddr,
    base: u64,
    offset: u64,
    len: usize,
    into: Option<Lent>,
    done: Cb<Vec<u8>>,
) {
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
            let op = match into {
                Some(buf) => BlockOp::ReadInto { lba, sectors, buf },
                None => BlockOp::Read { lba, sectors },
            };
            n2.io(
                dev,
                op,
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
fn write(net: &Handle, dev: TargetAddr, base: u64, offset: u64, data: Lent, done: Cb<()>) {
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
                    BlockOp::WriteLent {
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
    data: Lent,
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
        Lent::owned(vec![0u8; n as usize]),
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

    #[test]
    fn covering_sectors() {
        assert_eq!(covering(0, 512), (0, 1, 0));
        assert_eq!(covering(1, 1), (0, 1, 1));
        assert_eq!(covering(511, 2), (0, 2, 511));
        assert_eq!(covering(1024, 1536), (2, 3, 0));
        assert_eq!(covering(1000, 100), (1, 2, 488));
        assert_eq!(covering(1030, 100), (2, 1, 6));
    }

    /// Trimming a held read's pieces to the bytes asked for (an unaligned offset, a length
    /// short of the last sector) keeps exactly those bytes, across piece boundaries.
    #[test]
    fn trim_keeps_the_bytes_asked_for() {
        let all: Vec<u8> = (0..100u8).collect();
        let pieces: Vec<&[u8]> = vec![&all[..10], &all[10..10], &all[10..55], &all[55..]];
        for skip in 0..100 {
            for len in 0..=100 - skip {
                let t = trim(&pieces, skip, len).unwrap();
                let got: Vec<u8> = t.concat();
                assert_eq!(got, &all[skip..skip + len], "skip {skip} len {len}");
                assert!(t.iter().all(|p| !p.is_empty()));
            }
        }
        assert!(trim(&pieces, 50, 51).is_none());
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
