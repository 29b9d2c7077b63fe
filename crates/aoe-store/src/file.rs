//! Files and block devices as backends, with vblade's options: read-only (`-r`), O_DIRECT
//! (`-d`), O_SYNC (`-s`), and an offset/length window (`-o`/`-l`, in sectors).
//!
//! Two data-integrity rules live here (issue 9):
//!
//! * O_DIRECT writes use the alignment the file really needs (`statx` `STATX_DIOALIGN`, else
//!   the block device's logical block size, else 4096). With 512 (a loop device, most disks)
//!   AoE's 512-byte sectors are written as they come, like vblade `-d`. Where a write covers
//!   only part of an aligned block it is read-modify-written, and every direct write holds its
//!   aligned block range in a [`RangeLock`] meanwhile, so concurrent workers writing
//!   neighbouring frames never write back each other's stale bytes. The lock is one per
//!   file (device and inode, or block device) in the process, shared by every export of it:
//!   two exports whose `-o`/`-l` windows meet inside an aligned block, or a reloaded export
//!   beside its retiring instance, read-modify-write the same blocks. While a direct
//!   backend of a file is open, the buffered writes of its other backends take the lock
//!   too: a buffered write landing in the page cache between a direct read-modify-write's
//!   read and its write would be flushed first and then overwritten by the stale block.
//!   Other processes cannot see that lock: where an export's window starts or ends inside
//!   an aligned block (its `-o`/`-l` not multiples of the alignment, on a disk or file
//!   system of 4 KiB sectors), the rest of that block may be another process's export (a
//!   second `aoe serve`, one per config file), whose read-modify-write would undo this
//!   one's acknowledged write there, and the reverse (twelfth audit). Every write that
//!   touches such an edge block also holds its aligned range in an open file description
//!   lock (`fcntl(F_OFD_SETLKW)`, [`aoe_sys::lock_range_ofd`]), which every process's
//!   backend of the inode takes (of a block device, the inode of its own node in `/dev`,
//!   whichever node of it was opened: `edge_lock_node`), after the in-process lock;
//!   buffered exports take it at their edge blocks too, as the file's direct alignment
//!   (or 4096) counts them. vblade
//!   takes no such lock, so vblade beside us at such a boundary is still exposed.
//!   A file whose size is not a multiple of the alignment ends in a partial aligned block,
//!   which O_DIRECT can neither read whole nor write without growing the file: the
//!   sectors in it go through a second, buffered `O_DSYNC` descriptor of the same file.
//! * A failed fdatasync is latched: see [`FileBackend::failed`].
//! * O_DIRECT on a file on a disk without a volatile cache is also O_DSYNC
//!   (`direct_flags`): O_DIRECT bypasses the page cache, but the file system's metadata
//!   for the write (btrfs's new copy-on-write extent, XFS's and ext4's allocation of a hole
//!   or conversion of an unwritten extent) reaches the disk only with the next journal
//!   commit or fsync, so an acknowledged `-d` write was lost with a power loss (session 33:
//!   every unflushed one, on btrfs, and in holes and preallocated space on XFS and ext4).
//!   On btrfs a `-d` file is O_DSYNC without O_DIRECT.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use aoe_sys::NoWait;

use crate::range_lock::{RangeGuard, RangeLock};
use crate::{check_range, Backend, ReadSource};

const SECTOR: u64 = 512;
/// O_DIRECT alignment when the kernel does not tell (no `STATX_DIOALIGN`, not a block device):
/// 4096 is the largest logical block size of Linux block devices in practice, so it is always
/// enough, at the cost of a read-modify-write for smaller writes.
const DEFAULT_DIRECT_ALIGN: usize = 4096;
/// Largest alignment accepted from the kernel or a caller (a page on the biggest-page systems).
const MAX_DIRECT_ALIGN: usize = 64 * 1024;
/// A buffered write done inline (on a file system without `RWF_NOWAIT` writes) that took
/// longer than this waited for something (dirty-page throttling, the journal, a page under
/// write-back) rather than copying into the page cache, which takes microseconds.
const INLINE_SLOW: Duration = Duration::from_millis(1);
/// After such a slow write, writes go to a worker for this long before inline writes are
/// tried again.
const INLINE_PAUSE: Duration = Duration::from_millis(100);

/// A window's edges inside aligned blocks it shares with the rest of its file
/// ([`FileBackend::unaligned_edges`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnalignedEdges {
    /// The block size counted, in bytes.
    pub block: u64,
    /// The window's first byte in the file, if it is inside a block.
    pub start: Option<u64>,
    /// The byte after the window's last, if it is inside a block before the file's end.
    pub end: Option<u64>,
    /// A buffered export of a block device that is a partition, or a disk with partitions:
    /// the other device's node has a page cache of its own, which neither the edge lock
    /// nor a direct read-modify-write sees (the fourteenth audit lost 300 of 1200 with the
    /// disk buffered beside a `-d` partition), so this export writes its edge blocks
    /// through, under the lock (fifteenth audit: [`FileBackend`]'s edge write-through).
    pub other_page_cache: bool,
}

/// How to open a backing file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open read-only; writes are refused.
    pub read_only: bool,
    /// O_DIRECT: bypass the page cache (vblade `-d`).
    pub direct: bool,
    /// O_SYNC: every write is durable before it is acknowledged (vblade `-s`).
    pub sync: bool,
    /// Start of the export in the file, in 512-byte sectors (vblade `-o`).
    pub offset_sectors: u64,
    /// Length of the export in sectors (vblade `-l`); `None`: to the end of the file.
    pub length_sectors: Option<u64>,
}

/// A file or block device, or a sector window of one.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    path: PathBuf,
    base: u64,
    len: u64,
    opts: OpenOptions,
    /// On tmpfs/ramfs: reads and writes copy pages and never wait for a device, so they
    /// are done inline.
    memory: bool,
    /// The file system refused `RWF_NOWAIT` for a read once: stop trying for reads.
    read_nowait_unsupported: AtomicBool,
    /// The file system refused `RWF_NOWAIT` for a write once (ext4 and block devices do for
    /// buffered writes, Linux 6.18): writes are then plain `pwrite`s, inline while they are
    /// fast (see [`FileBackend::try_write_at`]). Kept apart from reads, which such a file
    /// system still does with `RWF_NOWAIT`.
    write_nowait_unsupported: AtomicBool,
    /// A block device, or a file on a local disk file system
    /// ([`aoe_sys::is_local_disk_fs`]): the only stores whose writes are done inline without
    /// `RWF_NOWAIT`. A network or FUSE file system's write may wait for its server.
    local_disk: bool,
    /// Until when (nanoseconds after `opened`) inline plain writes are paused after one was
    /// slow ([`INLINE_SLOW`]).
    inline_paused_until: AtomicU64,
    /// When the file was opened: the clock `inline_paused_until` counts from.
    opened: Instant,
    /// O_DIRECT alignment of file offsets and lengths, in bytes (a power of two >= 512).
    align: usize,
    /// O_DIRECT alignment of memory addresses, in bytes (a power of two).
    mem_align: usize,
    /// Aligned byte ranges of the file that direct writes are writing: the lock of every
    /// backend of this file in the process ([`shared_file_lock`]).
    writing: Arc<FileLock>,
    /// The latched write-back failure, if any: see [`FileBackend::failed`].
    failure: Mutex<Option<String>>,
    /// Size of a regular file at open, in bytes (0 for a block device, whose size is a
    /// multiple of its logical block size): where it is not a multiple of `align`, the
    /// sectors of its partial last block go through `tail_file`.
    file_size: u64,
    /// The same file opened again without O_DIRECT (and with O_DSYNC, so that a write
    /// acknowledged there is on the device as a direct one is), for the partial last
    /// aligned block of a direct export's file; `None` when there is none.
    tail_file: Option<File>,
    /// Size of the file or block device at open, in bytes: a window that ends before it
    /// may share its last aligned block with another export.
    store_size: u64,
    /// For a buffered export: the alignment by which other processes' direct exports of the
    /// file read-modify-write it (`STATX_DIOALIGN`, the logical block size, else 4096),
    /// which decides its edge blocks ([`FileBackend::shared_edge`]).
    buffered_edge_align: u64,
    /// The window may share an aligned block with the rest of the file at some alignment up
    /// to [`MAX_DIRECT_ALIGN`]: its start, or its end before the end of the store, is not a
    /// multiple of 64 KiB. False for the usual whole-file export, whose writes then skip
    /// [`FileBackend::shared_edge`] with one load.
    edges_possible: bool,
    /// An open file description lock was refused once (a file system without them): said
    /// once, then writes go on without it, as before the twelfth audit.
    ofd_unsupported: AtomicBool,
    /// For a writable block device whose window may share a block: the device's own node
    /// in `/dev` (`/sys/dev/block/MAJ:MIN/uevent`'s `DEVNAME`), or for a partition its whole
    /// disk's, on which the edge lock is taken when it is another inode than the node opened
    /// ([`edge_lock_node`]), with the byte offset of the device on it (the partition's
    /// start; 0 for a whole disk); `None` to lock on [`FileBackend::file`].
    edge_lock_file: Option<(File, u64)>,
    /// A buffered export of a partition, or of a disk with partitions, whose window shares
    /// an edge block ([`UnalignedEdges::other_page_cache`]): the other node of the device
    /// has a page cache of its own, so a write at an edge block drops this node's copy of
    /// the block before it writes (the partial page is read from the device, as the other
    /// node last wrote it) and writes it back and drops it again before the edge lock is
    /// let go ([`FileBackend::write_through_edge`]).
    edge_write_through: bool,
}

impl FileBackend {
    /// Opens `path`. Refuses, with a message naming the problem: a missing file, a size that
    /// is not a multiple of 512, an empty export, and a window beyond the end of the file.
    pub fn open(path: &Path, opts: &OpenOptions) -> io::Result<FileBackend> {
        let named =
            |e: io::Error, what: &str| crate::Failed::wrap(e, format!("{what} {}", path.display()));
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(!opts.read_only);
        let mut flags = 0;
        if opts.direct {
            // What the path is (symlinks followed, as open(2) does), asked by path: the
            // flags must be known before the one open. One that cannot be asked about fails
            // the open below, with its message.
            flags |= direct_flags(DirectUnder::at(path));
        }
        if opts.sync {
            flags |= libc_o_sync();
        }
        o.custom_flags(flags);
        let mut file = o.open(path).map_err(|e| {
            // open(2) answers EINVAL for O_DIRECT on a file system that has no direct I/O
            // (ramfs, some FUSE and network file systems): "Invalid argument" alone did not
            // say which argument (session 29's audit).
            if opts.direct && e.raw_os_error() == Some(libc::EINVAL) {
                let what = format!(
                    "cannot open {} with O_DIRECT (-d, direct_io), which its file system does \
                     not support (leave -d out)",
                    path.display()
                );
                crate::Failed::wrap(e, what)
            } else {
                named(e, "cannot open")
            }
        })?;
        let meta = file.metadata().map_err(|e| named(e, "cannot stat"))?;
        let ft = meta.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        }
        // A read-only block device (`losetup -r`, a write-protected disk) opens O_RDWR and
        // fails every write with EPERM: refused here, rather than served as writable to an
        // initiator that would mount it and see each write fail.
        if ft.is_block_device()
            && !opts.read_only
            && aoe_sys::block_device_read_only(&file).unwrap_or(false)
        {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is a read-only block device; export it read-only (-r, or read_only \
                     = true in a config file)",
                    path.display()
                ),
            ));
        }
        // A regular file's size is in its metadata; a block device reports 0 there, and
        // is sized by seeking to its end. Not a seek for a file: on FUSE `llseek(SEEK_END)`
        // takes the inode lock (`fuse_file_llseek`), which every parallel direct write in
        // flight holds shared, so a reload reopening the file of a busy export waited for
        // its slowest write (session 17's audit, "2 SIGHUP with writes").
        let size = if ft.is_file() {
            meta.len()
        } else {
            file.seek(SeekFrom::End(0))
                .map_err(|e| named(e, "cannot size"))?
        };
        // Only whole sectors can be exported. A file with a partial last sector is refused
        // unless the export's length is given and ends within the whole sectors: vblade
        // serves such a file cut to its whole sectors without a word (the tail is neither
        // read nor written), and an explicit `-l` says that cut is meant.
        let total = size / SECTOR;
        if size % SECTOR != 0 && opts.length_sectors.is_none() {
            let tail = size % SECTOR;
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "size {size} of {p} is not a multiple of 512 bytes: its last {tail} bytes \
                     would not be served; pad it to {padded} bytes (truncate -s {padded} {p}) \
                     or give the length in whole sectors (-l {avail}, or length in a config \
                     file)",
                    p = path.display(),
                    padded = (total + 1) * SECTOR,
                    avail = total.saturating_sub(opts.offset_sectors),
                ),
            ));
        }
        if opts.offset_sectors > total {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "offset {} sectors is beyond the end of {} ({total} sectors)",
                    opts.offset_sectors,
                    path.display()
                ),
            ));
        }
        let avail = total - opts.offset_sectors;
        let len = match opts.length_sectors {
            Some(l) if l > avail => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "length {l} sectors at offset {} exceeds {} ({total} sectors)",
                        opts.offset_sectors,
                        path.display()
                    ),
                ))
            }
            Some(l) => l,
            None => avail,
        };
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("export of {} would be empty", path.display()),
            ));
        }
        // O_DIRECT cannot serve the partial aligned block at the end of a file whose size is
        // not a multiple of the alignment: a read of the whole block ends short at the end
        // of the file, a write of it grows the file. Where that can happen (the alignment
        // may be raised later, up to MAX_DIRECT_ALIGN), a buffered descriptor of the same
        // inode, opened through /proc so that a rename since the open does not matter,
        // serves those sectors.
        let tail_file = if opts.direct && ft.is_file() && size % MAX_DIRECT_ALIGN as u64 != 0 {
            let mut t = std::fs::OpenOptions::new();
            t.read(true)
                .write(!opts.read_only)
                .custom_flags(libc::O_DSYNC | if opts.sync { libc_o_sync() } else { 0 });
            let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
            Some(t.open(&proc).map_err(|e| {
                named(
                    e,
                    "cannot open (without O_DIRECT, for its partial last block, through /proc)",
                )
            })?)
        } else {
            None
        };
        let kernel_align = aoe_sys::dio_alignment(&file).map(|a| {
            (
                (a.offset as usize).clamp(SECTOR as usize, MAX_DIRECT_ALIGN),
                (a.mem as usize).clamp(1, MAX_DIRECT_ALIGN),
            )
        });
        let (align, mem_align) = if opts.direct {
            kernel_align.unwrap_or((DEFAULT_DIRECT_ALIGN, DEFAULT_DIRECT_ALIGN))
        } else {
            (SECTOR as usize, 1)
        };
        let buffered_edge_align = kernel_align.map_or(DEFAULT_DIRECT_ALIGN, |(a, _)| a) as u64;
        let edges_possible = {
            let (start, end) = (
                opts.offset_sectors * SECTOR,
                (opts.offset_sectors + len) * SECTOR,
            );
            let m = MAX_DIRECT_ALIGN as u64;
            start % m != 0 || (end % m != 0 && end < size)
        };
        let edge_lock_file = if ft.is_block_device() && !opts.read_only && edges_possible {
            edge_lock_node(path, &meta)
        } else {
            None
        };
        Ok(FileBackend {
            align,
            mem_align,
            writing: shared_file_lock(&meta, opts.direct),
            failure: Mutex::new(None),
            path: path.to_path_buf(),
            base: opts.offset_sectors * SECTOR,
            len: len * SECTOR,
            opts: opts.clone(),
            // A device node lives on devtmpfs, a tmpfs: what counts for a block device is
            // the device, not the file system of its node.
            memory: ft.is_file() && aoe_sys::is_memory_fs(&file) && !opts.direct && !opts.sync,
            read_nowait_unsupported: AtomicBool::new(false),
            write_nowait_unsupported: AtomicBool::new(false),
            local_disk: ft.is_block_device() || aoe_sys::is_local_disk_fs(&file),
            inline_paused_until: AtomicU64::new(0),
            opened: Instant::now(),
            file_size: if ft.is_file() { size } else { 0 },
            tail_file,
            store_size: size,
            edges_possible,
            buffered_edge_align,
            ofd_unsupported: AtomicBool::new(false),
            edge_lock_file,
            edge_write_through: !opts.direct
                && !opts.read_only
                && edges_possible
                && partition_or_partitioned(&file),
            file,
        })
    }

    /// The path opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options it was opened with.
    pub fn options(&self) -> &OpenOptions {
        &self.opts
    }

    /// Size in sectors.
    pub fn sectors(&self) -> u64 {
        self.len / SECTOR
    }

    /// The O_DIRECT alignment of offsets and lengths in use, in bytes: what `statx`
    /// `STATX_DIOALIGN` (`stx_dio_offset_align`) or, for a block device, `BLKSSZGET` said,
    /// else 4096; 512 when not opened with O_DIRECT. A write that is not a multiple of it at
    /// an offset that is not a multiple of it is read-modify-written.
    pub fn direct_alignment(&self) -> usize {
        self.align
    }

    /// Raises the O_DIRECT alignment to `align` bytes (a power of two, at least what the
    /// kernel asked for, at most 64 KiB), for tests that need read-modify-write on a device
    /// that does not: what a 4 KiB-sector disk would make us do. Never lowers it.
    pub fn raise_direct_alignment(&mut self, align: usize) -> io::Result<()> {
        if !align.is_power_of_two() || align > MAX_DIRECT_ALIGN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("O_DIRECT alignment {align} is not a power of two up to 64 KiB"),
            ));
        }
        self.align = self.align.max(align);
        self.mem_align = self.mem_align.max(align);
        Ok(())
    }

    /// The latched failure, if the export has one: a description of the first write-back
    /// failure (a failed fdatasync, or EIO from a write).
    ///
    /// Why a latch: Linux reports a write-back error to each open file once
    /// (`errseq_t`, Documentation/filesystems/vfs.rst "Handling errors during writeback");
    /// the next fdatasync succeeds although the pages it failed to write are gone (they are
    /// marked clean, or dropped). An initiator that retries a failed FLUSH, or sends another
    /// one later, would be told its acknowledged writes are safe when they are not. The same
    /// holds for the write-back an O_SYNC write does (`generic_write_sync`): an EIO there may
    /// be another acknowledged write's failure, consumed by this one. So after the first
    /// failure the export refuses every write and FLUSH with EIO (the target answers an ATA
    /// error, ABRT+UNC, like a failing disk) and keeps serving reads, until the operator
    /// clears it ([`FileBackend::clear_failure`]) or restarts the target.
    ///
    /// What latches: any fdatasync error, and EIO from a write in any mode (buffered, O_SYNC,
    /// O_DIRECT). ENOSPC, EDQUOT and other write errors are a clean refusal of that one write
    /// (the file system refuses before it copies anything; nothing acknowledged is lost) and
    /// are only reported for that write.
    ///
    /// The latch is in memory only: a restart clears it and the export serves writes again,
    /// although data acknowledged before the failure may be lost. After a restart the
    /// initiator (or whoever restarts it) must verify the data, e.g. with a file system check
    /// or checksums, before trusting it.
    pub fn failed(&self) -> Option<String> {
        self.failure_slot().clone()
    }

    /// Clears a latched failure (the operator has dealt with the store) and returns what it
    /// was. Writes and FLUSH are served again from here on.
    pub fn clear_failure(&self) -> Option<String> {
        let was = self.failure_slot().take();
        if let Some(w) = &was {
            tracing::warn!(
                file = %self.path.display(),
                failure = %w,
                "write-back failure cleared: writes and flushes are served again"
            );
        }
        was
    }

    fn failure_slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The error every write and FLUSH gets while a failure is latched.
    fn refuse_if_failed(&self) -> io::Result<()> {
        match &*self.failure_slot() {
            None => Ok(()),
            Some(_) => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    /// Latches `e` (from `what`) if it is a write-back failure, logging it loudly the first
    /// time; returns `e` for the caller to pass on.
    fn latch(&self, e: io::Error, what: Failing) -> io::Error {
        let latches = what == Failing::Fdatasync || e.raw_os_error() == Some(libc::EIO);
        if latches {
            let mut slot = self.failure_slot();
            if slot.is_none() {
                let desc = match what {
                    Failing::Write => format!("write failed: {e}"),
                    Failing::Fdatasync => format!("fdatasync failed: {e}"),
                };
                tracing::error!(
                    file = %self.path.display(),
                    failure = %desc,
                    "write-back to the backing store failed: data acknowledged to the \
                     initiator may be lost; writes and flushes are refused until restart \
                     (reads go on)"
                );
                *slot = Some(desc);
            }
        }
        e
    }

    /// O_DIRECT needs aligned memory, offset and length: go through an aligned bounce buffer
    /// covering the aligned superset of the range.
    fn direct_read(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        if let Some((tail, at)) = self.tail_part(pos, buf.len()) {
            let (head, rest) = buf.split_at_mut(at);
            tail.read_exact_at(rest, pos + at as u64)?;
            if head.is_empty() {
                return Ok(());
            }
            return self.direct_read(head, pos);
        }
        let a = self.align as u64;
        let start = pos / a * a;
        let end = (pos + buf.len() as u64).div_ceil(a) * a;
        let mut bounce = AlignedBuf::new((end - start) as usize, self.mem_align);
        if let Err(e) = self.file.read_exact_at(bounce.as_mut(), start) {
            if start == pos && end == pos + buf.len() as u64 {
                return Err(e);
            }
            let mut exact = AlignedBuf::new(buf.len(), self.mem_align);
            match self.exact_sectors(&e, pos, buf.len(), |b| {
                self.file.read_exact_at(exact.as_mut(), b)
            }) {
                Some(r) => r?,
                None => return Err(e),
            }
            buf.copy_from_slice(exact.as_mut());
            return Ok(());
        }
        let skip = (pos - start) as usize;
        buf.copy_from_slice(&bounce.as_mut()[skip..skip + buf.len()]);
        Ok(())
    }

    /// For a buffered write of `len` bytes at `pos`: while a direct backend of the same file
    /// is open (another export of it with `-d`, or a reload's instance), the range held in
    /// the file's lock, so that the write cannot land between that backend's
    /// read-modify-write read and write (eleventh audit); else nothing, at the cost of one
    /// atomic load.
    fn buffered_write_guard(&self, pos: u64, len: usize) -> Option<RangeGuard<'_>> {
        self.shares_with_direct()
            .then(|| self.writing.ranges.lock(pos..pos + len as u64))
    }

    /// A direct backend of this file is open: the caller's inline buffered write could
    /// wait for its lock, so it goes to a worker ([`Backend::write_at`]), which may wait.
    fn shares_with_direct(&self) -> bool {
        self.writing.direct.load(Ordering::Relaxed) > 0
    }

    /// The aligned byte range around `len` bytes at `pos` (in the file) if it reaches past
    /// the export's window into an aligned block the rest of the file shares: the first
    /// block when the window starts inside it, the last when the window ends inside it
    /// before the end of the file. Those bytes may be another export's, served by another
    /// process; the alignment is the direct one in use, or for a buffered export the one
    /// other processes' direct exports use. `None` for a window on the alignment; for one on
    /// 64 KiB (the usual whole-file export) at the cost of one load.
    fn shared_edge(&self, pos: u64, len: usize) -> Option<std::ops::Range<u64>> {
        if len == 0 || !self.edges_possible {
            return None;
        }
        let a = self.edge_align();
        let start = pos / a * a;
        let end = (pos + len as u64).div_ceil(a) * a;
        let window_end = self.base + self.len;
        (start < self.base || (end > window_end && window_end < self.store_size))
            .then_some(start..end)
    }

    /// The block size by which the window's edges are shared with the rest of the file:
    /// the direct alignment in use (raised later, perhaps: [`Self::raise_direct_alignment`]),
    /// or for a buffered export the one other processes' direct exports of the file use.
    fn edge_align(&self) -> u64 {
        if self.opts.direct {
            self.align as u64
        } else {
            self.buffered_edge_align
        }
    }

    /// Where the window starts or ends inside an aligned block that the rest of the file
    /// shares, by the alignment `shared_edge` counts (the direct one in use, or for a
    /// buffered export the file's `STATX_DIOALIGN`, else 4096): what `aoe serve` says at start,
    /// at a reload that opens the export and under `--check` (twelfth audit, Left). Writes
    /// there take the edge lock, which other `aoe serve` processes take too; vblade and other
    /// programs do not. `None` for a read-only export (it writes nothing there) and for a
    /// window on the alignment.
    pub fn unaligned_edges(&self) -> Option<UnalignedEdges> {
        if self.opts.read_only || !self.edges_possible {
            return None;
        }
        let block = self.edge_align();
        let end = self.base + self.len;
        let edges = UnalignedEdges {
            block,
            start: (self.base % block != 0).then_some(self.base),
            end: (end % block != 0 && end < self.store_size).then_some(end),
            // What the backend does about it, decided at open (read-only and no edges
            // returned above).
            other_page_cache: self.edge_write_through,
        };
        (edges.start.is_some() || edges.end.is_some()).then_some(edges)
    }

    /// `range` (from [`Self::shared_edge`]) held in an open file description lock, which
    /// other processes' backends of the file take too; the caller holds it across its
    /// read-modify-write or write, and holds the same range in the in-process lock first
    /// (the threads of one backend share its open file description). A file system that
    /// refuses the lock (`ENOLCK`, `EINVAL`) is named once and written without it.
    fn ofd_lock(&self, range: std::ops::Range<u64>) -> Option<aoe_sys::OfdRangeLock<'_>> {
        if self.ofd_unsupported.load(Ordering::Relaxed) {
            return None;
        }
        let (on, at) = self
            .edge_lock_file
            .as_ref()
            .map_or((&self.file, 0), |(f, at)| (f, *at));
        match aoe_sys::lock_range_ofd(on, at + range.start, range.end - range.start) {
            Ok(held) => Some(held),
            Err(e) => {
                if !self.ofd_unsupported.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        file = %self.path.display(),
                        error = %e,
                        "cannot lock the aligned block this export shares with the rest \
                         of the file: a write of another process's export of that block \
                         may be undone by ours, or ours by it; put -o/-l on the alignment"
                    );
                }
                None
            }
        }
    }

    /// A buffered write of `buf` at `pos` inside the edge block(s) `block`, with the edge
    /// lock held, for an export whose device has another node with a page cache of its own
    /// (a partition and its disk: fourteenth and fifteenth audits). This node's copy of the
    /// block is dropped first, so the kernel reads the partial page from the device (what
    /// the other node's export wrote there, under the same lock: a direct write, or this
    /// same write-through); after the write the block is written back and dropped again,
    /// so the other node's next read-modify-write of it, once it has the lock, reads this
    /// write from the device. Before, the write sat in this node's page cache, and its
    /// write-back later put a stale copy of the other export's sectors over them (300 of
    /// 1200 acknowledged sector writes undone in the session-31 rig). Costs a write-back
    /// per write at an edge block, which only an unaligned window has.
    fn write_through_edge(
        &self,
        buf: &[u8],
        pos: u64,
        block: std::ops::Range<u64>,
    ) -> io::Result<()> {
        let len = block.end - block.start;
        aoe_sys::drop_cached_range(&self.file, block.start, len)?;
        self.file.write_all_at(buf, pos)?;
        aoe_sys::write_back_range(&self.file, block.start, len)?;
        aoe_sys::drop_cached_range(&self.file, block.start, len)
    }

    /// Where `len` bytes at `pos` reach into the partial aligned block at the end of the
    /// file (its size not a multiple of the alignment): the buffered descriptor that serves
    /// that block and how many of the bytes come before it (those go the direct way).
    fn tail_part(&self, pos: u64, len: usize) -> Option<(&File, usize)> {
        let tail = self.tail_file.as_ref()?;
        let a = self.align as u64;
        if self.file_size % a == 0 {
            return None;
        }
        let start = self.file_size / a * a;
        (pos + len as u64 > start).then(|| (tail, start.saturating_sub(pos) as usize))
    }

    /// A direct read of the aligned blocks around `len` bytes at `pos` failed with `e`.
    /// Where that is a medium error (EIO) and the alignment is more than a sector (the
    /// 4096 assumed when `statx` does not report `STATX_DIOALIGN`, as for FUSE or NFS), the
    /// bad sector may be one the request does not cover: `io` is tried on the request's own
    /// sectors alone, which such a file system takes, so that only requests that include a
    /// bad sector fail, as on the disk (the Linux driver sees an ATA error for exactly those;
    /// docs/TEST-AUDIT.md, seventh audit). `io`'s result, or None where it is not tried or
    /// a file system that does need the alignment refuses it with EINVAL: then `e` stands.
    fn exact_sectors(
        &self,
        e: &io::Error,
        pos: u64,
        len: usize,
        io: impl FnOnce(u64) -> io::Result<()>,
    ) -> Option<io::Result<()>> {
        if e.raw_os_error() != Some(libc::EIO)
            || self.align == SECTOR as usize
            || pos % SECTOR != 0
            || len as u64 % SECTOR != 0
        {
            return None;
        }
        match io(pos) {
            Err(e2) if e2.raw_os_error() == Some(libc::EINVAL) => None,
            r => Some(r),
        }
    }

    /// A buffered write done by the caller's thread with a plain `pwrite`, on a local disk
    /// only and unless one was slow less than [`INLINE_PAUSE`] ago (`Ok(false)`: the caller
    /// uses a worker).
    fn write_inline(&self, bufs: &[&[u8]], pos: u64) -> io::Result<bool> {
        if !self.local_disk {
            return Ok(false);
        }
        let now = self.opened.elapsed();
        if (now.as_nanos() as u64) < self.inline_paused_until.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let r = match bufs {
            [one] => self.file.write_all_at(one, pos),
            _ => aoe_sys::pwritev_all(&self.file, bufs, pos),
        };
        r.map_err(|e| self.latch(e, Failing::Write))?;
        let took = self.opened.elapsed().saturating_sub(now);
        if took > INLINE_SLOW {
            let until = now + took + INLINE_PAUSE;
            self.inline_paused_until
                .store(until.as_nanos() as u64, Ordering::Relaxed);
        }
        Ok(true)
    }

    /// Writes through an aligned bounce buffer. A range that does not start and end on the
    /// alignment is read-modify-written, holding its aligned blocks in `writing` from the
    /// read to the end of the write, and every direct write holds its blocks too, so no
    /// other write can land between the read and the write-back and be undone by it.
    ///
    /// A read of the edge blocks that fails (a bad sector beside the request's) fails the
    /// write unless the request's own sectors can be written alone ([`Self::exact_sectors`]);
    /// either way it is no write-back failure (nothing was written, nothing acknowledged is
    /// lost), so it is never latched.
    fn direct_write(&self, buf: &[u8], pos: u64) -> Result<(), DirectWriteError> {
        if let Some((tail, at)) = self.tail_part(pos, buf.len()) {
            let (head, rest) = buf.split_at(at);
            if !head.is_empty() {
                self.direct_write(head, pos)?;
            }
            return tail
                .write_all_at(rest, pos + at as u64)
                .map_err(DirectWriteError::Write);
        }
        let a = self.align as u64;
        let start = pos / a * a;
        let end = (pos + buf.len() as u64).div_ceil(a) * a;
        let mut bounce = AlignedBuf::new((end - start) as usize, self.mem_align);
        let _held = self.writing.ranges.lock(start..end);
        // After the in-process lock over the same range: the threads of this backend
        // share its open file description, whose locks never conflict with each other, and
        // one order everywhere (this process's lock, then the file's) keeps two processes
        // from each waiting for the other.
        let _edge = self
            .shared_edge(pos, buf.len())
            .and_then(|r| self.ofd_lock(r));
        if start != pos || end != pos + buf.len() as u64 {
            // Read-modify-write of the partial blocks at the edges.
            if let Err(e) = self.file.read_exact_at(bounce.as_mut(), start) {
                let mut exact = AlignedBuf::new(buf.len(), self.mem_align);
                exact.as_mut().copy_from_slice(buf);
                // The write's own error is latched where EIO; the read's never.
                return match self.exact_sectors(&e, pos, buf.len(), |b| {
                    self.file.write_all_at(exact.as_mut(), b)
                }) {
                    Some(r) => r.map_err(DirectWriteError::Write),
                    None => Err(DirectWriteError::Unwritten(e)),
                };
            }
        }
        let skip = (pos - start) as usize;
        bounce.as_mut()[skip..skip + buf.len()].copy_from_slice(buf);
        self.file
            .write_all_at(bounce.as_mut(), start)
            .map_err(DirectWriteError::Write)
    }
}

impl Backend for FileBackend {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.len)?;
        let pos = self.base + offset;
        if self.opts.direct {
            self.direct_read(buf, pos)
        } else {
            self.file.read_exact_at(buf, pos)
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.opts.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "export is read-only",
            ));
        }
        check_range(offset, buf.len(), self.len)?;
        self.refuse_if_failed()?;
        let pos = self.base + offset;
        let r = if self.opts.direct {
            match self.direct_write(buf, pos) {
                Err(DirectWriteError::Unwritten(e)) => return Err(e),
                Err(DirectWriteError::Write(e)) => Err(e),
                Ok(()) => Ok(()),
            }
        } else {
            // At a shared edge block the in-process lock holds the aligned range the open
            // file description lock does: two threads of this backend share its open file
            // description, whose locks never conflict, and the first to unlock would free
            // the block under the other.
            let edge = self.shared_edge(pos, buf.len());
            let _held = match &edge {
                Some(r) => Some(self.writing.ranges.lock(r.clone())),
                None => self.buffered_write_guard(pos, buf.len()),
            };
            let _edge = edge.clone().and_then(|r| self.ofd_lock(r));
            match edge {
                Some(r) if self.edge_write_through => self.write_through_edge(buf, pos, r),
                _ => self.file.write_all_at(buf, pos),
            }
        };
        r.map_err(|e| self.latch(e, Failing::Write))
    }

    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        if self.opts.direct {
            return Ok(false);
        }
        check_range(offset, buf.len(), self.len)?;
        let pos = self.base + offset;
        if self.memory {
            self.file.read_exact_at(buf, pos)?;
            return Ok(true);
        }
        if self.read_nowait_unsupported.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match aoe_sys::pread_nowait(&self.file, buf, pos)? {
            NoWait::Done(n) => Ok(n == buf.len()),
            NoWait::WouldBlock => Ok(false),
            NoWait::Unsupported => {
                self.read_nowait_unsupported.store(true, Ordering::Relaxed);
                Ok(false)
            }
        }
    }

    fn nowait_read_source(
        &self,
        offset: u64,
        len: usize,
    ) -> io::Result<Option<(std::os::fd::BorrowedFd<'_>, u64)>> {
        // As try_read_at: O_DIRECT goes through the aligned bounce buffer on a worker, a
        // memory file system has no RWF_NOWAIT (its reads never wait: try_read_at reads it).
        if self.opts.direct || self.memory || self.read_nowait_unsupported.load(Ordering::Relaxed) {
            return Ok(None);
        }
        check_range(offset, len, self.len)?;
        Ok(Some((
            std::os::fd::AsFd::as_fd(&self.file),
            self.base + offset,
        )))
    }

    fn inline_read_source(&self, offset: u64, len: usize) -> io::Result<Option<ReadSource<'_>>> {
        if self.memory && !self.opts.direct {
            check_range(offset, len, self.len)?;
            return Ok(Some(ReadSource {
                fd: std::os::fd::AsFd::as_fd(&self.file),
                pos: self.base + offset,
                nowait: false,
            }));
        }
        Ok(self
            .nowait_read_source(offset, len)?
            .map(|(fd, pos)| ReadSource {
                fd,
                pos,
                nowait: true,
            }))
    }

    /// Without `RWF_NOWAIT` for buffered writes (ext4 refuses it with `EOPNOTSUPP`), a
    /// write is one plain `pwrite` here, as vblade does every write: it copies into the page
    /// cache, and handing it to a worker instead cost 8x vblade's CPU per GB (a wake-up and
    /// a context switch each way, issue 15). What could make it wait (dirty-page
    /// throttling, a full journal) shows as a write slower than `INLINE_SLOW`, after which
    /// writes go to the workers for `INLINE_PAUSE`, so the caller's loop stalls at most
    /// once per pause.
    fn try_write_at(&self, buf: &[u8], offset: u64) -> io::Result<bool> {
        // O_SYNC writes wait for the disk by definition; O_DIRECT needs the bounce buffer.
        if self.opts.direct || self.opts.sync || self.opts.read_only {
            return Ok(false);
        }
        check_range(offset, buf.len(), self.len)?;
        self.refuse_if_failed()?;
        let pos = self.base + offset;
        if self.shares_with_direct() || self.shared_edge(pos, buf.len()).is_some() {
            return Ok(false);
        }
        if self.memory {
            self.file
                .write_all_at(buf, pos)
                .map_err(|e| self.latch(e, Failing::Write))?;
            return Ok(true);
        }
        if self.write_nowait_unsupported.load(Ordering::Relaxed) {
            return self.write_inline(&[buf], pos);
        }
        match aoe_sys::pwrite_nowait(&self.file, buf, pos)
            .map_err(|e| self.latch(e, Failing::Write))?
        {
            NoWait::Done(n) => Ok(n == buf.len()),
            NoWait::WouldBlock => Ok(false),
            NoWait::Unsupported => {
                self.write_nowait_unsupported.store(true, Ordering::Relaxed);
                self.write_inline(&[buf], pos)
            }
        }
    }

    /// [`try_write_at`](Self::try_write_at) of contiguous slices with one `pwritev`
    /// (`RWF_NOWAIT`, or plain where the file system refuses that, on the same terms).
    fn try_write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<bool> {
        if let [one] = bufs {
            return self.try_write_at(one, offset);
        }
        if self.opts.direct || self.opts.sync || self.opts.read_only {
            return Ok(false);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        check_range(offset, total, self.len)?;
        self.refuse_if_failed()?;
        let pos = self.base + offset;
        if self.shares_with_direct() || self.shared_edge(pos, total).is_some() {
            return Ok(false);
        }
        if self.memory {
            aoe_sys::pwritev_all(&self.file, bufs, pos)
                .map_err(|e| self.latch(e, Failing::Write))?;
            return Ok(true);
        }
        if !self.write_nowait_unsupported.load(Ordering::Relaxed) {
            match aoe_sys::pwritev_nowait(&self.file, bufs, pos)
                .map_err(|e| self.latch(e, Failing::Write))?
            {
                NoWait::Done(n) => return Ok(n == total),
                NoWait::WouldBlock => return Ok(false),
                NoWait::Unsupported => {
                    self.write_nowait_unsupported.store(true, Ordering::Relaxed);
                }
            }
        }
        self.write_inline(bufs, pos)
    }

    fn flush(&self) -> io::Result<()> {
        if self.opts.read_only {
            return Ok(());
        }
        self.refuse_if_failed()?;
        self.file
            .sync_data()
            .map_err(|e| self.latch(e, Failing::Fdatasync))
    }

    fn read_only(&self) -> bool {
        self.opts.read_only
    }

    fn failed(&self) -> bool {
        self.failure_slot().is_some()
    }
}

/// What failed, for [`FileBackend::latch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failing {
    Write,
    Fdatasync,
}

/// How a direct write failed: in the write itself (latched where EIO), or before anything
/// was written (the read of a read-modify-write: never latched).
#[derive(Debug)]
enum DirectWriteError {
    Write(io::Error),
    Unwritten(io::Error),
}

/// A heap buffer whose start is aligned to `align` bytes (the file's `stx_dio_mem_align`),
/// made without `unsafe` by over-allocating and starting at the first aligned byte.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> AlignedBuf {
        let raw = vec![0u8; len + align];
        let addr = raw.as_ptr() as usize;
        let start = (align - addr % align) % align;
        AlignedBuf { raw, start, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// The sysfs directory of block device `rdev` (`/sys/dev/block/MAJ:MIN`, a link into
/// `/sys/block`: a partition's lies inside its disk's).
fn sys_block_dir(rdev: u64) -> PathBuf {
    PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ))
}

/// True if `file` is a block device that is a partition (`/sys/dev/block/MAJ:MIN/partition`)
/// or a disk with partitions (a subdirectory of it with a `partition` file): another node
/// of the same sectors, with a page cache of its own.
fn partition_or_partitioned(file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = file.metadata() else {
        return false;
    };
    if !meta.file_type().is_block_device() {
        return false;
    }
    let sys = sys_block_dir(meta.rdev());
    sys.join("partition").exists()
        || std::fs::read_dir(&sys)
            .is_ok_and(|d| d.flatten().any(|e| e.path().join("partition").exists()))
}

/// The file on which a writable block device export opened at `path` takes its edge lock
/// ([`FileBackend::ofd_lock`]), when that is not the node opened.
///
/// An open file description lock belongs to the inode of the path opened (`fcntl(2)`:
/// locks are "associated with an inode"), and two device nodes of one disk are two inodes:
/// a `mknod` copy of `/dev/loop0` (a container's or chroot's `/dev`, a node made by hand)
/// and `/dev/loop0` itself locked apart, and two `aoe serve` processes exporting windows
/// that meet inside a 4 KiB block undid each other's writes there (thirteenth audit). So
/// every process takes the lock on the device's own node, the one the kernel names in
/// `/sys/dev/block/MAJ:MIN/uevent` (`DEVNAME`, created by devtmpfs, whose mounts all share
/// one set of inodes), opened for writing (a write lock needs it) and checked to be the
/// same device.
///
/// A partition is a window of its disk with a node, a page cache and an inode of its own: a
/// process exporting a window of `/dev/loop0p1` and one exporting a window of `/dev/loop0`
/// that meet inside a block locked two nodes at two offsets and did not meet (thirteenth
/// audit, Left; shown on a 4Kn loop device with a GPT in the fourteenth). So a partition's
/// lock is taken on its whole disk's node (the parent of `/sys/dev/block/MAJ:MIN`, which
/// has a `partition` file), at the partition's `start` (512-byte units, whatever the
/// disk's sector size: `Documentation/ABI/stable/sysfs-block`), the returned offset.
///
/// `None` when the node opened is that node (the lock is taken on it), and when it cannot
/// be found or opened: said once, as the lock then meets only processes that opened the
/// same node.
fn edge_lock_node(path: &Path, meta: &std::fs::Metadata) -> Option<(File, u64)> {
    use std::os::unix::fs::MetadataExt;
    let rdev = meta.rdev();
    let sys = sys_block_dir(rdev);
    // A partition: its disk's sysfs directory, device number and the partition's start.
    let disk = sys.join("partition").exists().then(|| {
        let disk = std::fs::canonicalize(&sys).ok()?.parent()?.to_path_buf();
        let dev = std::fs::read_to_string(disk.join("dev")).ok()?;
        let (ma, mi) = dev.trim().split_once(':')?;
        let start: u64 = std::fs::read_to_string(sys.join("start"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some((
            disk,
            libc::makedev(ma.parse().ok()?, mi.parse().ok()?),
            start * SECTOR,
        ))
    });
    let (sys, want, at) = match disk {
        None => (Some(sys), rdev, 0),
        Some(Some((disk, want, at))) => (Some(disk), want, at),
        // A partition whose disk cannot be read: locking on the partition's own node would
        // say nothing to a process serving the disk (the warning below).
        Some(None) => (None, rdev, 0),
    };
    let found = sys
        .and_then(|sys| std::fs::read_to_string(sys.join("uevent")).ok())
        .and_then(|u| {
            u.lines().find_map(|l| {
                l.strip_prefix("DEVNAME=")
                    .map(|n| Path::new("/dev").join(n))
            })
        });
    let opened = found.as_ref().map(|node| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(node)
            .and_then(|f| f.metadata().map(|m| (f, m)))
    });
    match (found, opened) {
        (Some(node), Some(Ok((f, m)))) if m.file_type().is_block_device() && m.rdev() == want => {
            if (m.dev(), m.ino()) == (meta.dev(), meta.ino()) {
                None
            } else {
                tracing::debug!(
                    file = %path.display(),
                    node = %node.display(),
                    at,
                    "edge blocks locked on the device's own node (a partition's: its disk's, \
                     at the partition's start)"
                );
                Some((f, at))
            }
        }
        (node, opened) => {
            tracing::warn!(
                file = %path.display(),
                device = %format!("{}:{}", libc::major(rdev), libc::minor(rdev)),
                node = ?node,
                error = ?opened.and_then(Result::err),
                "cannot open the device's own node in /dev to lock the aligned blocks this \
                 export shares with the rest of the disk: only processes that opened this \
                 same node meet at that lock; put -o/-l on the alignment"
            );
            None
        }
    }
}

/// The range lock of direct writes to the file `meta` describes, shared by every
/// [`FileBackend`] of it in this process: a block device by its device number (two nodes or
/// links of one disk are one), a file by device and inode. Exports of one file whose
/// windows share an aligned block, and a reopened export beside its retiring instance,
/// then never read-modify-write that block at once (eleventh audit, docs/TEST-AUDIT.md:
/// with a lock each, acknowledged writes at the meeting point were undone). The table keeps
/// weak references and drops the dead ones at each open.
fn shared_file_lock(meta: &std::fs::Metadata, direct: bool) -> Arc<FileLock> {
    use std::os::unix::fs::MetadataExt;
    type Table = Vec<((u64, u64), Weak<FileLock>)>;
    static LOCKS: Mutex<Table> = Mutex::new(Vec::new());
    let key = if meta.file_type().is_block_device() {
        (u64::MAX, meta.rdev())
    } else {
        (meta.dev(), meta.ino())
    };
    let mut locks = LOCKS.lock().unwrap_or_else(|p| p.into_inner());
    locks.retain(|(_, w)| w.strong_count() > 0);
    let lock = match locks
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, w)| w.upgrade())
    {
        Some(lock) => lock,
        None => {
            let lock = Arc::new(FileLock::default());
            locks.push((key, Arc::downgrade(&lock)));
            lock
        }
    };
    if direct {
        lock.direct.fetch_add(1, Ordering::Relaxed);
    }
    lock
}

/// The write lock of one file shared by its backends in the process.
#[derive(Debug, Default)]
struct FileLock {
    /// Byte ranges being written by direct writes (and, while `direct` is not 0, by
    /// buffered ones).
    ranges: RangeLock,
    /// Direct backends of the file open: while there is one, buffered writes of the others
    /// hold their range too ([`FileBackend::buffered_write_guard`]).
    direct: std::sync::atomic::AtomicUsize,
}

impl Drop for FileBackend {
    fn drop(&mut self) {
        if self.opts.direct {
            self.writing.direct.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What a `-d` (`direct_io`) backend is opened on, for [`direct_flags`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirectUnder {
    /// A block device.
    BlockDevice,
    /// A file on btrfs, whatever its disks.
    Btrfs,
    /// A file on ext2/3/4, XFS or f2fs on a disk without a volatile write cache (sysfs
    /// `queue/write_cache` "write through"), or whose disk's cache is unknown.
    DiskWriteThrough,
    /// Anything else: a file on a disk with a volatile cache, or on a network or FUSE file
    /// system.
    Other,
}

impl DirectUnder {
    /// What `path` names, asked by path (`stat(2)`, `statfs(2)` and sysfs; symlinks
    /// followed, as open(2) does), without opening it: [`FileBackend::open`] needs the
    /// answer for its open's flags. Before session 34 the path was opened once more,
    /// read-only, to ask its descriptor; `DirectUnder::of` asks one, for the tests' check
    /// that both agree.
    fn at(path: &Path) -> DirectUnder {
        let Ok(meta) = std::fs::metadata(path) else {
            return DirectUnder::Other;
        };
        if meta.file_type().is_block_device() {
            DirectUnder::BlockDevice
        } else if aoe_sys::is_btrfs_at(path) {
            DirectUnder::Btrfs
        } else if aoe_sys::is_local_disk_fs_at(path)
            && aoe_sys::disk_write_cache(std::os::unix::fs::MetadataExt::dev(&meta)) != Some(true)
        {
            DirectUnder::DiskWriteThrough
        } else {
            DirectUnder::Other
        }
    }

    /// [`DirectUnder::at`] asked of an open file.
    #[cfg(test)]
    fn of(file: &File) -> DirectUnder {
        let Ok(meta) = file.metadata() else {
            return DirectUnder::Other;
        };
        if meta.file_type().is_block_device() {
            DirectUnder::BlockDevice
        } else if aoe_sys::is_btrfs(file) {
            DirectUnder::Btrfs
        } else if aoe_sys::is_local_disk_fs(file)
            && aoe_sys::disk_write_cache(std::os::unix::fs::MetadataExt::dev(&meta)) != Some(true)
        {
            DirectUnder::DiskWriteThrough
        } else {
            DirectUnder::Other
        }
    }
}

/// The open flags of a `-d` (`direct_io`) backend: O_DIRECT, and for a file on a disk
/// without a volatile cache O_DSYNC too. README's "Data safety" promises that such a `-d`
/// write survives a power loss once acknowledged, and on a disk with a volatile cache once
/// a FLUSH (fdatasync, which commits the metadata too) succeeded. open(2) says O_DIRECT "does not give the guarantees of O_SYNC that
/// data and necessary metadata are transferred": a direct write into a file is on the disk
/// when it returns, but the extent that makes it reachable may not be. btrfs writes every
/// overwrite to a new extent (copy-on-write) that only the next transaction commit or an
/// fsync's log tree records; XFS (`xfs_dio_write_end_io`) and ext4 log the allocation of a
/// hole and the conversion of an unwritten extent in a transaction that the write does not
/// wait for. With O_DSYNC the kernel commits that metadata before the write returns
/// (`generic_write_sync`, `iomap_dio_complete`); an overwrite of allocated, written blocks
/// has none to commit, and on a disk without a volatile cache the block layer drops the FUA
/// flag: nothing more to pay. On a disk with one, O_DSYNC would cost a FUA or cache flush
/// per write (half the MB/s of sequential writes on this project's virtio host, session
/// 33), for more than is promised there: O_DIRECT alone. A block device has no such
/// metadata: O_DIRECT alone, as vblade `-d`. Network and FUSE file systems: as before.
///
/// On btrfs, whatever its disks (an anonymous device number names none), O_DSYNC without
/// O_DIRECT: concurrent O_DIRECT|O_DSYNC writes to one file
/// (the worker pool's) left extents without checksums in btrfs's log on Debian's Linux
/// 6.1 ("csum hole found"), and after the power loss a read of a block flushed long before
/// failed with EIO (power-loss.sh `-e btrfs -M direct`, three runs of three, session 33),
/// where buffered O_DSYNC writes (as `-s`) kept every acknowledged write in every run. The
/// page cache is used there; the alignment rules stay (they cost a read-modify-write at a
/// partial block, not correctness).
fn direct_flags(under: DirectUnder) -> i32 {
    match under {
        DirectUnder::BlockDevice | DirectUnder::Other => libc::O_DIRECT,
        DirectUnder::Btrfs => libc::O_DSYNC,
        DirectUnder::DiskWriteThrough => libc::O_DIRECT | libc::O_DSYNC,
    }
}

fn libc_o_sync() -> i32 {
    libc::O_SYNC
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        f.write_all(&data).unwrap();
        f
    }

    #[test]
    fn window_read_write() {
        let f = file_of(64 * 512);
        let b = FileBackend::open(
            f.path(),
            &OpenOptions {
                offset_sectors: 8,
                length_sectors: Some(16),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(b.len(), 16 * 512);
        let mut buf = [0u8; 512];
        b.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf[0], ((8 * 512) % 253) as u8);
        b.write_at(&[0xaa; 512], 15 * 512).unwrap();
        assert!(b.write_at(&[0xaa; 512], 16 * 512).is_err());
        assert!(b.read_at(&mut buf, 16 * 512 - 1).is_err());
        b.flush().unwrap();
        let all = std::fs::read(f.path()).unwrap();
        assert!(all[23 * 512..24 * 512].iter().all(|x| *x == 0xaa));
        assert_eq!(all[24 * 512], ((24 * 512) % 253) as u8);
    }

    /// A file with a partial last sector (vblade serves its whole sectors and says nothing)
    /// is refused without a length, with the two ways out in the message; with `-l` in
    /// whole sectors it is served, and the partial tail is never read or written.
    #[test]
    fn a_partial_last_sector_is_served_only_with_an_explicit_length() {
        let odd = file_of(3 * 512 + 100);
        let e = FileBackend::open(odd.path(), &OpenOptions::default()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("last 100 bytes") && msg.contains("-l 3") && msg.contains("2048"),
            "{msg}"
        );
        let e = FileBackend::open(
            odd.path(),
            &OpenOptions {
                length_sectors: Some(4),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
        let b = FileBackend::open(
            odd.path(),
            &OpenOptions {
                offset_sectors: 1,
                length_sectors: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(b.len(), 2 * 512);
        b.write_at(&[0xee; 512], 512).unwrap();
        assert!(b.write_at(&[0xee; 512], 2 * 512).is_err());
        b.flush().unwrap();
        let all = std::fs::read(odd.path()).unwrap();
        assert_eq!(all.len(), 3 * 512 + 100, "the file's size changed");
        assert!(all[2 * 512..3 * 512].iter().all(|x| *x == 0xee));
        assert!(
            all[3 * 512..]
                .iter()
                .enumerate()
                .all(|(i, x)| *x == ((3 * 512 + i) % 253) as u8),
            "the partial tail was written"
        );
    }

    #[test]
    fn refuses_bad_files() {
        let odd = file_of(1000);
        let e = FileBackend::open(odd.path(), &OpenOptions::default()).unwrap_err();
        assert!(e.to_string().contains("not a multiple of 512"), "{e}");
        assert!(e.to_string().contains("-l 1"), "{e}");
        let e = FileBackend::open(Path::new("/nonexistent/x.img"), &OpenOptions::default())
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.img"), "{e}");
        let f = file_of(4 * 512);
        let e = FileBackend::open(
            f.path(),
            &OpenOptions {
                offset_sectors: 2,
                length_sectors: Some(3),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
        let empty = file_of(0);
        assert!(FileBackend::open(empty.path(), &OpenOptions::default()).is_err());
        let dir = tempfile::tempdir().unwrap();
        assert!(FileBackend::open(dir.path(), &OpenOptions::default()).is_err());
    }

    #[test]
    fn read_only_refuses_writes() {
        let f = file_of(8 * 512);
        let b = FileBackend::open(
            f.path(),
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(b.read_only());
        assert_eq!(
            b.write_at(&[0; 512], 0).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
    }

    /// A scratch directory on disk (tmpfs may lack `O_DIRECT`): beside the test binary, in
    /// the target directory of whoever built it, not in the source tree, which an
    /// unprivileged user running the tests may not own.
    fn scratch_dir() -> tempfile::TempDir {
        let exe = std::env::current_exe().unwrap();
        tempfile::tempdir_in(exe.parent().unwrap()).unwrap()
    }

    /// Issue 15: after an inline write that waited (dirty-page throttling, the journal),
    /// writes go to a worker until the pause is over, then run inline again.
    #[test]
    fn a_slow_inline_write_pauses_inline_writes() {
        let dir = scratch_dir();
        let path = dir.path().join("w.img");
        std::fs::write(&path, vec![0u8; 64 * 512]).unwrap();
        let mut b = FileBackend::open(&path, &OpenOptions::default()).unwrap();
        // Whatever the scratch directory's file system is, as a local disk.
        b.local_disk = true;
        assert!(b.write_inline(&[&[1; 512]], 0).unwrap());
        let paused = b.opened.elapsed() + INLINE_PAUSE;
        b.inline_paused_until
            .store(paused.as_nanos() as u64, Ordering::Relaxed);
        assert!(
            !b.write_inline(&[&[2; 512]], 0).unwrap(),
            "written while paused"
        );
        let mut back = [0u8; 512];
        b.read_at(&mut back, 0).unwrap();
        assert_eq!(back, [1; 512], "a paused write reached the file");
        b.inline_paused_until.store(0, Ordering::Relaxed);
        assert!(b.write_inline(&[&[3; 512]], 0).unwrap());
        b.read_at(&mut back, 0).unwrap();
        assert_eq!(back, [3; 512]);
        b.local_disk = false;
        assert!(
            !b.write_inline(&[&[4; 512]], 0).unwrap(),
            "inline on no local disk"
        );
    }

    /// Issue 15: where the target may read a batch's contiguous reads itself (one
    /// `preadv2`): a tmpfs file without `RWF_NOWAIT` (its reads never wait), a disk file
    /// with it, the position counted from the export's offset; a range outside the export
    /// is an error; O_DIRECT not at all (its reads need the aligned bounce buffer).
    #[test]
    fn inline_read_source_says_where_and_how() {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let disk = scratch_dir();
        for (dir, memory) in [(shm.path(), true), (disk.path(), false)] {
            let p = dir.join("src.img");
            std::fs::write(&p, vec![0u8; 64 * 512]).unwrap();
            let f = std::fs::File::open(&p).unwrap();
            if aoe_sys::is_memory_fs(&f) != memory {
                continue; // /dev/shm not tmpfs, or the scratch dir on one: nothing to see
            }
            let b = FileBackend::open(
                &p,
                &OpenOptions {
                    offset_sectors: 8,
                    ..Default::default()
                },
            )
            .unwrap();
            let src = b.inline_read_source(1024, 2048).unwrap().unwrap();
            assert_eq!(src.pos, 8 * 512 + 1024);
            assert_eq!(src.nowait, !memory, "{}", p.display());
            assert!(b.inline_read_source(56 * 512 - 512, 1024).is_err());
        }
        let p = disk.path().join("direct.img");
        std::fs::write(&p, vec![0u8; 64 * 512]).unwrap();
        if let Ok(b) = FileBackend::open(
            &p,
            &OpenOptions {
                direct: true,
                ..Default::default()
            },
        ) {
            assert!(b.inline_read_source(0, 512).unwrap().is_none());
        }
    }

    #[test]
    fn direct_io_unaligned_ranges() {
        // O_DIRECT is not supported on tmpfs; use a file under the target dir if it is not.
        let dir = scratch_dir();
        let p = dir.path().join("direct.img");
        std::fs::write(&p, vec![0u8; 64 * 512]).unwrap();
        let b = match FileBackend::open(
            &p,
            &OpenOptions {
                direct: true,
                ..Default::default()
            },
        ) {
            Ok(b) => b,
            Err(e) => panic!("O_DIRECT open failed on {}: {e}", p.display()),
        };
        let data: Vec<u8> = (0..1024).map(|i| (i % 7) as u8).collect();
        b.write_at(&data, 3 * 512).unwrap();
        let mut back = vec![0u8; 1024];
        b.read_at(&mut back, 3 * 512).unwrap();
        assert_eq!(back, data);
        let all = std::fs::read(&p).unwrap();
        assert_eq!(&all[3 * 512..5 * 512], &data[..]);
        assert!(all[..3 * 512].iter().all(|x| *x == 0));
    }

    /// The open file description's flags, as /proc/self/fdinfo reports them (octal).
    fn fd_flags(f: &File) -> i32 {
        use std::os::fd::AsRawFd;
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", f.as_raw_fd())).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .expect("a flags: line in fdinfo");
        i32::from_str_radix(flags.trim(), 8).unwrap()
    }

    /// Session 33: a `-d` export of a file on a disk without a volatile cache is O_DIRECT
    /// and O_DSYNC (on btrfs O_DSYNC alone), so a write's metadata (btrfs's copy-on-write
    /// extent, the allocation of a hole) is committed before it is acknowledged;
    /// power-loss.sh `-e btrfs -M direct` lost every unflushed write without it
    /// (`power_loss.rs` `power_loss_btrfs_direct`). The open uses what [`DirectUnder::of`]
    /// finds for the file.
    #[test]
    fn direct_file_flags() {
        let dir = scratch_dir();
        let p = dir.path().join("dsync.img");
        std::fs::write(&p, vec![0u8; 16 * 512]).unwrap();
        let b = FileBackend::open(
            &p,
            &OpenOptions {
                direct: true,
                ..Default::default()
            },
        )
        .unwrap();
        let flags = fd_flags(&b.file) & (libc::O_DIRECT | libc::O_DSYNC);
        let want = direct_flags(DirectUnder::of(&b.file));
        assert_eq!(flags, want, "flags {flags:o}, not {want:o}");
        // Asked by path (what the open uses) as asked of the open file, through a symlink
        // too, and of a block device node.
        assert_eq!(DirectUnder::at(&p), DirectUnder::of(&b.file));
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(DirectUnder::at(&link), DirectUnder::of(&b.file));
        if let Ok(dev) = File::open("/dev/loop0") {
            assert_eq!(
                DirectUnder::at(Path::new("/dev/loop0")),
                DirectUnder::of(&dev)
            );
        }
        assert_eq!(
            direct_flags(DirectUnder::DiskWriteThrough),
            libc::O_DIRECT | libc::O_DSYNC
        );
        assert_eq!(direct_flags(DirectUnder::Btrfs), libc::O_DSYNC);
        assert_eq!(direct_flags(DirectUnder::BlockDevice), libc::O_DIRECT);
        assert_eq!(direct_flags(DirectUnder::Other), libc::O_DIRECT);
    }

    /// Sector `lba` stamped: its number in every 8 bytes, xor'ed with `round`.
    fn stamp(lba: u64, round: u64) -> [u8; 512] {
        let mut s = [0u8; 512];
        for c in s.chunks_mut(8) {
            c.copy_from_slice(&(lba ^ (round << 40)).to_le_bytes());
        }
        s
    }

    /// Issue 9: neighbouring sub-4 KiB frames written by concurrent workers with O_DIRECT
    /// read-modify-write the same 4 KiB block. With the alignment forced to 4096 (a
    /// 4 KiB-sector disk), 16 threads write 1024-byte pieces (MTU 1500 frames) interleaved so
    /// that neighbours always run at once; every sector must hold its own stamp.
    #[test]
    fn direct_rmw_of_neighbouring_frames_loses_nothing() {
        let dir = scratch_dir();
        let p = dir.path().join("rmw.img");
        const SECTORS: u64 = 2048; // 1 MiB
        std::fs::write(&p, vec![0u8; (SECTORS * 512) as usize]).unwrap();
        let mut b = FileBackend::open(
            &p,
            &OpenOptions {
                direct: true,
                ..Default::default()
            },
        )
        .unwrap();
        b.raise_direct_alignment(4096).unwrap();
        assert_eq!(b.direct_alignment(), 4096);
        let b = std::sync::Arc::new(b);
        const THREADS: u64 = 16;
        const PIECE: u64 = 2; // sectors
        for round in 1..=3u64 {
            let threads: Vec<_> = (0..THREADS)
                .map(|t| {
                    let b = b.clone();
                    std::thread::spawn(move || {
                        // Thread t writes pieces t, t+16, ...: pieces 0..3 of a 4 KiB block
                        // are written by 4 different threads at about the same time.
                        let mut piece = t;
                        while piece * PIECE < SECTORS {
                            let lba = piece * PIECE;
                            let mut data = Vec::new();
                            for s in lba..lba + PIECE {
                                data.extend_from_slice(&stamp(s, round));
                            }
                            b.write_at(&data, lba * 512).unwrap();
                            piece += THREADS;
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let all = std::fs::read(&p).unwrap();
            let wrong = (0..SECTORS)
                .filter(|&s| all[(s * 512) as usize..][..512] != stamp(s, round))
                .count();
            assert_eq!(
                wrong, 0,
                "round {round}: {wrong} of {SECTORS} sectors wrong"
            );
        }
    }

    /// A file whose size is not a multiple of the O_DIRECT alignment (a 4 KiB-sector disk,
    /// or the 4096 assumed on FUSE and NFS) ends in a partial aligned block: the sectors
    /// in it must read and write like the others, under `-d` as without, and a write there
    /// must not grow the file. Both with a whole last sector and with a partial one cut by
    /// an explicit length (`-l`).
    #[test]
    fn direct_io_at_the_end_of_a_file_not_a_multiple_of_the_alignment() {
        let dir = scratch_dir();
        for (size, length) in [(9 * 512u64, None), (13 * 512 + 100, Some(13u64))] {
            let p = dir.path().join(format!("tail-{size}.img"));
            std::fs::write(&p, vec![0x11u8; size as usize]).unwrap();
            let mut b = FileBackend::open(
                &p,
                &OpenOptions {
                    direct: true,
                    length_sectors: length,
                    ..Default::default()
                },
            )
            .unwrap();
            b.raise_direct_alignment(4096).unwrap();
            let sectors = b.len() / 512;
            let last = (sectors - 1) * 512;
            let data: Vec<u8> = (0..512).map(|i| (i % 251) as u8).collect();
            b.write_at(&data, last)
                .unwrap_or_else(|e| panic!("{size}-byte file: write of its last sector: {e}"));
            let mut back = vec![0u8; 512];
            b.read_at(&mut back, last)
                .unwrap_or_else(|e| panic!("{size}-byte file: read of its last sector: {e}"));
            assert_eq!(back, data, "{size}-byte file: last sector read back");
            let mut two = vec![0u8; 1024];
            b.read_at(&mut two, last - 512).unwrap();
            assert_eq!(&two[512..], &data[..]);
            assert!(two[..512].iter().all(|x| *x == 0x11));
            let all = std::fs::read(&p).unwrap();
            assert_eq!(all.len() as u64, size, "the file's size changed");
            assert_eq!(&all[last as usize..][..512], &data[..]);
            assert!(all[..last as usize].iter().all(|x| *x == 0x11));
            assert!(all[last as usize + 512..].iter().all(|x| *x == 0x11));
        }
    }

    #[test]
    fn direct_alignment_comes_from_the_kernel() {
        let dir = scratch_dir();
        let p = dir.path().join("align.img");
        std::fs::write(&p, vec![0u8; 8 * 512]).unwrap();
        let direct = OpenOptions {
            direct: true,
            ..Default::default()
        };
        let mut b = FileBackend::open(&p, &direct).unwrap();
        let f = File::open(&p).unwrap();
        let want = aoe_sys::dio_alignment(&f).map_or(4096, |a| a.offset as usize);
        assert_eq!(b.direct_alignment(), want.max(512));
        assert!(b.raise_direct_alignment(3000).is_err());
        b.raise_direct_alignment(512).unwrap();
        assert_eq!(b.direct_alignment(), want.max(512), "never lowered");
        let buffered = FileBackend::open(&p, &OpenOptions::default()).unwrap();
        assert_eq!(buffered.direct_alignment(), 512);
    }

    /// Issue 9, item 2: after a failed fdatasync every later FLUSH and write fails with EIO,
    /// also once the store works again; reads go on; clearing it serves writes again. The
    /// failure is injected here; crates/aoe-store/tests/integrity.rs makes a real one with FUSE.
    #[test]
    fn a_flush_failure_is_latched() {
        let f = file_of(16 * 512);
        let b = FileBackend::open(f.path(), &OpenOptions::default()).unwrap();
        b.write_at(&[1; 512], 0).unwrap();
        b.flush().unwrap();
        assert!(!Backend::failed(&b) && b.failed().is_none());
        let e = b.latch(io::Error::from_raw_os_error(libc::EIO), Failing::Fdatasync);
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(Backend::failed(&b));
        assert!(
            b.failed().unwrap().contains("fdatasync"),
            "{:?}",
            b.failed()
        );
        for _ in 0..2 {
            assert_eq!(b.flush().unwrap_err().raw_os_error(), Some(libc::EIO));
            assert_eq!(
                b.write_at(&[2; 512], 512).unwrap_err().raw_os_error(),
                Some(libc::EIO)
            );
            assert_eq!(
                b.try_write_at(&[2; 512], 512).unwrap_err().raw_os_error(),
                Some(libc::EIO)
            );
        }
        let mut back = [0u8; 512];
        b.read_at(&mut back, 0).unwrap();
        assert_eq!(back, [1; 512]);
        b.read_at(&mut back, 512).unwrap();
        assert_ne!(back, [2; 512], "a refused write was written");
        assert!(b.clear_failure().is_some());
        b.write_at(&[2; 512], 512).unwrap();
        b.flush().unwrap();
    }

    #[test]
    fn only_write_back_failures_latch() {
        let f = file_of(16 * 512);
        let b = FileBackend::open(f.path(), &OpenOptions::default()).unwrap();
        // A clean refusal of one write (full file system) is not a lost write.
        let _ = b.latch(io::Error::from_raw_os_error(libc::ENOSPC), Failing::Write);
        assert!(b.failed().is_none());
        // EIO from a write is.
        let _ = b.latch(io::Error::from_raw_os_error(libc::EIO), Failing::Write);
        assert!(b.failed().unwrap().contains("write failed"));
        // The first failure is the one kept.
        let _ = b.latch(
            io::Error::from_raw_os_error(libc::ENOSPC),
            Failing::Fdatasync,
        );
        assert!(b.failed().unwrap().contains("write failed"));
    }

    /// Twelfth audit: which writes take the open file description lock. With a 4096-byte
    /// alignment, a window of sectors 3-32 of a 64-sector file shares its first block (0-7)
    /// and its last (32-39) with the rest of the file; a write inside it elsewhere, every
    /// write of a whole-file export, and an empty write take none; a write at a shared
    /// block holds the lock, which another open file description of the file then cannot
    /// take until the write is done.
    #[test]
    fn only_writes_at_a_block_the_window_shares_take_the_cross_process_lock() {
        let dir = scratch_dir();
        let p = dir.path().join("edges.img");
        std::fs::write(&p, vec![0u8; 64 * 512]).unwrap();
        let open = |offset_sectors, length_sectors| {
            let mut b = FileBackend::open(
                &p,
                &OpenOptions {
                    direct: true,
                    offset_sectors,
                    length_sectors,
                    ..Default::default()
                },
            )
            .unwrap();
            b.raise_direct_alignment(4096).unwrap();
            b
        };
        let window = open(3, Some(30));
        let sector = |s: u64| window.base + s * 512;
        assert_eq!(window.shared_edge(sector(0), 512), Some(0..4096));
        assert_eq!(window.shared_edge(sector(4), 512), Some(0..4096));
        assert_eq!(
            window.shared_edge(sector(5), 512),
            None,
            "block 8-15 is the window's own"
        );
        assert_eq!(window.shared_edge(sector(29), 512), Some(16384..20480));
        assert_eq!(window.shared_edge(sector(4), 1024), Some(0..8192));
        assert_eq!(window.shared_edge(sector(0), 0), None);
        assert_eq!(
            window.unaligned_edges(),
            Some(UnalignedEdges {
                block: 4096,
                start: Some(3 * 512),
                end: Some(33 * 512),
                other_page_cache: false,
            })
        );
        let whole = open(0, None);
        for s in [0, 7, 63] {
            assert_eq!(
                whole.shared_edge(s * 512, 512),
                None,
                "sector {s} of the whole file"
            );
        }
        assert_eq!(whole.unaligned_edges(), None);
        assert_eq!(
            open(8, Some(16)).unaligned_edges(),
            None,
            "sectors 8-23: on 4096"
        );
        assert_eq!(
            open(8, Some(20))
                .unaligned_edges()
                .map(|e| (e.start, e.end)),
            Some((None, Some(28 * 512))),
            "ends inside block 24-31"
        );
        assert_eq!(
            open(60, None).unaligned_edges().map(|e| (e.start, e.end)),
            Some((Some(60 * 512), None)),
            "the file's end is no shared edge"
        );
        // While a write holds block 0-7, another description of the file cannot lock it.
        // (A write lock needs a descriptor open for writing: EBADF otherwise.)
        let other = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let held = window.ofd_lock(0..4096).expect("the lock");
        assert!(aoe_sys::try_lock_range_ofd(&other, 512, 512)
            .unwrap()
            .is_none());
        drop(held);
        assert!(aoe_sys::try_lock_range_ofd(&other, 512, 512)
            .unwrap()
            .is_some());
    }
}
