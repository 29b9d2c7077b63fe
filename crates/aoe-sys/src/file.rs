//! Positional file I/O that never blocks: `preadv2`/`pwritev2` with `RWF_NOWAIT` (Linux 4.14+
//! for reads, 4.13+ with `IOCB_NOWAIT` for writes). A read that the page cache can satisfy
//! completes at once; one that would wait for the disk fails with `EAGAIN`, and the caller
//! hands it to a worker thread instead. This lets an event loop serve cached data inline,
//! without one blocking read per frame and without a thread hop.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// What a non-blocking positional read or write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoWait {
    /// `n` bytes moved (possibly fewer than asked, e.g. only part cached).
    Done(usize),
    /// It would have blocked: do it on a thread that may wait.
    WouldBlock,
    /// The file system does not support `RWF_NOWAIT` (`EOPNOTSUPP`): it never will.
    Unsupported,
}

/// Reads into `buf` at `offset` if that can be done without blocking.
pub fn pread_nowait(file: &File, buf: &mut [u8], offset: u64) -> io::Result<NoWait> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let Ok(off) = libc::off_t::try_from(offset) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: `iov` describes `buf`, which is valid for writes of `buf.len()` bytes and
    // outlives the call; the fd is open for the duration of the borrow of `file`.
    let r = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    nowait_result(r)
}

/// Writes the dirty pages of `len` bytes at `offset` of `file` to its device and waits
/// for them (`sync_file_range(2)` with `SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER`):
/// they are on the device, as another node of that device reads it, though not flushed
/// from its volatile cache (the man page: no data-integrity guarantee, which a FLUSH gives).
pub fn write_back_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(n)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: plain integer arguments; the fd is open for the duration of the borrow.
    let r = unsafe { libc::sync_file_range(file.as_raw_fd(), off, n, flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Drops the clean, unmapped pages of `len` bytes at `offset` of `file` from the page cache
/// (`posix_fadvise(2)` `POSIX_FADV_DONTNEED`), so the next buffered access reads the device.
/// Dirty pages are left (write them back first: [`write_back_range`]).
pub fn drop_cached_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: plain integer arguments; the fd is open for the duration of the borrow.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), off, n, libc::POSIX_FADV_DONTNEED) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

/// Writes `buf` at `offset` if that can be done without blocking; see [`pread_nowait`].
/// A short write leaves the rest unwritten: the caller writes the whole range again.
pub fn pwrite_nowait(file: &File, buf: &[u8], offset: u64) -> io::Result<NoWait> {
    let iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let Ok(off) = libc::off_t::try_from(offset) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: `iov` describes `buf`, valid for reads of `buf.len()` bytes for the whole call
    // (the kernel only reads through the pointer despite the `*mut` type); the fd is open.
    let r = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    nowait_result(r)
}

/// Most slices [`pwritev_nowait`] and [`pwritev_all`] take: a receive batch's frames.
pub const MAX_WRITEV: usize = 64;

/// `bufs` as iovecs (at most [`MAX_WRITEV`]), in `out`; more is `InvalidInput`.
fn iovecs<'a>(
    bufs: &[&[u8]],
    out: &'a mut [libc::iovec; MAX_WRITEV],
) -> io::Result<&'a [libc::iovec]> {
    if bufs.len() > out.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (v, b) in out.iter_mut().zip(bufs) {
        *v = libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        };
    }
    Ok(&out[..bufs.len()])
}

/// Writes the slices of `bufs` (at most [`MAX_WRITEV`]), one after the other, at `offset` with one
/// `pwritev2(RWF_NOWAIT)`; see [`pwrite_nowait`]. `Done(n)` with `n` short of the total left
/// the rest unwritten: the caller writes the whole range again.
pub fn pwritev_nowait(file: &File, bufs: &[&[u8]], offset: u64) -> io::Result<NoWait> {
    let mut v = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_WRITEV];
    let iov = iovecs(bufs, &mut v)?;
    let Ok(off) = libc::off_t::try_from(offset) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: each iovec describes a slice of `bufs`, valid for reads for the whole call (the
    // kernel only reads through the pointers despite the `*mut` type); the count is the
    // slice's length; the fd is open.
    let r = unsafe {
        libc::pwritev2(
            file.as_raw_fd(),
            iov.as_ptr(),
            iov.len() as libc::c_int,
            off,
            libc::RWF_NOWAIT,
        )
    };
    nowait_result(r)
}

/// Writes all the slices of `bufs` (at most [`MAX_WRITEV`]), one after the other, at `offset`: one
/// `pwritev` for all of them, more only after a short write (what `write_all_at` is for one
/// slice).
pub fn pwritev_all(file: &File, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut done = 0usize;
    while done < total {
        // The slices not yet (fully) written.
        let mut skip = done;
        let mut rest: [&[u8]; MAX_WRITEV] = [&[]; MAX_WRITEV];
        let mut k = 0;
        for b in bufs {
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            if k == rest.len() {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            }
            rest[k] = &b[skip..];
            skip = 0;
            k += 1;
        }
        let mut v = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_WRITEV];
        let iov = iovecs(&rest[..k], &mut v)?;
        let Ok(off) = libc::off_t::try_from(offset + done as u64) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: as in pwritev_nowait: the iovecs describe live slices of `bufs`, read only.
        let r = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, off) };
        match r {
            0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            n if n > 0 => done += n as usize,
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

/// A write lock on a byte range of a file, shared with every process on the machine that
/// locks the same inode (an open file description lock, `fcntl(F_OFD_SETLKW)`, Linux 3.15+;
/// fcntl(2) "Open file description locks (non-POSIX)"); released when dropped, and by the
/// kernel when the last descriptor of its open file description is closed (a killed
/// process leaves none behind). Unlike a classic POSIX record lock it belongs to the open
/// file description, not the process: two descriptors opened separately in one process
/// conflict as two processes do, and closing another descriptor of the same file does not
/// drop it. Locks of one open file description never conflict with each other: callers
/// sharing one must keep their ranges apart themselves.
#[derive(Debug)]
pub struct OfdRangeLock<'a> {
    file: &'a File,
    start: u64,
    len: u64,
}

impl OfdRangeLock<'_> {
    /// The range held, in bytes.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.start..self.start + self.len
    }
}

impl Drop for OfdRangeLock<'_> {
    fn drop(&mut self) {
        // An unlock can fail only with a bad descriptor or range, which the lock's own
        // success rules out; nothing useful can be done about it in a drop.
        let _ = ofd_fcntl(
            self.file,
            libc::F_OFD_SETLK,
            libc::F_UNLCK,
            self.start,
            self.len,
        );
    }
}

/// Waits until no other open file description holds a lock overlapping `len` bytes at
/// `start` of `file`, then holds that range for writing (see [`OfdRangeLock`]). Retried
/// after a signal. `len` 0 is refused (`InvalidInput`): for fcntl it means "to the end of
/// the file, however far it grows", which no caller here wants.
pub fn lock_range_ofd(file: &File, start: u64, len: u64) -> io::Result<OfdRangeLock<'_>> {
    if len == 0 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    ofd_fcntl(file, libc::F_OFD_SETLKW, libc::F_WRLCK, start, len)?;
    Ok(OfdRangeLock { file, start, len })
}

/// [`lock_range_ofd`] without waiting: `None` while another open file description holds an
/// overlapping lock.
pub fn try_lock_range_ofd(
    file: &File,
    start: u64,
    len: u64,
) -> io::Result<Option<OfdRangeLock<'_>>> {
    if len == 0 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    match ofd_fcntl(file, libc::F_OFD_SETLK, libc::F_WRLCK, start, len) {
        Ok(()) => Ok(Some(OfdRangeLock { file, start, len })),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// How [`flock`] holds a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flock {
    /// `LOCK_SH`: any number of holders at once, none while one holds it exclusively.
    Shared,
    /// `LOCK_EX`: one holder alone.
    Exclusive,
}

/// `flock(2)`: waits until `file` can be held as `kind`, then holds it until `file` (its
/// open file description: every duplicate of the fd) is closed. Locks of two opens of one
/// path conflict even within one process, so each holder opens the file itself. Retried
/// after a signal. (`File::lock` and `lock_shared` do this from Rust 1.89; the workspace
/// builds with 1.85.)
pub fn flock(file: &File, kind: Flock) -> io::Result<()> {
    let op = match kind {
        Flock::Shared => libc::LOCK_SH,
        Flock::Exclusive => libc::LOCK_EX,
    };
    loop {
        // SAFETY: flock takes an fd and an operation; the fd is open for the duration of
        // the borrow of `file`, and no memory is passed.
        let r = unsafe { libc::flock(file.as_raw_fd(), op) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn ofd_fcntl(
    file: &File,
    cmd: libc::c_int,
    kind: libc::c_int,
    start: u64,
    len: u64,
) -> io::Result<()> {
    let (Ok(l_start), Ok(l_len)) = (libc::off_t::try_from(start), libc::off_t::try_from(len))
    else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: `struct flock` is plain integers (and, on some targets, padding), for which
    // all zeroes is a valid value; OFD locks require `l_pid` to be 0.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = l_start;
    fl.l_len = l_len;
    loop {
        // SAFETY: `fl` is a valid, initialised `struct flock` that lives across the call,
        // which is what F_OFD_SETLK/F_OFD_SETLKW take as their third argument; the fd is
        // open for the duration of the borrow of `file`.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub(crate) fn nowait_result(r: isize) -> io::Result<NoWait> {
    if r >= 0 {
        return Ok(NoWait::Done(r as usize));
    }
    nowait_error(io::Error::last_os_error())
}

/// What a failed non-blocking read or write means: `EAGAIN` would block, `EOPNOTSUPP` never
/// works on this file; any other error is the I/O's own. Shared with [`crate::uring`], whose
/// completions carry the same errors.
pub(crate) fn nowait_error(e: io::Error) -> io::Result<NoWait> {
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(NoWait::WouldBlock),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(NoWait::Unsupported),
        _ => Err(e),
    }
}

/// True if `file` lives on a memory file system (tmpfs, ramfs), where reads and writes copy
/// pages and never wait for a device (`fstatfs(2)` `f_type`).
pub fn is_memory_fs(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    matches!(fs_magic(file), Some(TMPFS_MAGIC | RAMFS_MAGIC))
}

/// True if `file` lives on a local disk file system (ext2/3/4, XFS, btrfs, f2fs; `fstatfs(2)`
/// `f_type`, `linux/magic.h`), where a buffered write copies into the page cache and waits
/// only for local things (dirty-page throttling, the journal). Not for network or FUSE file
/// systems, where a write may wait for a server. A block device's node says nothing (it
/// lives on devtmpfs): ask its file type.
pub fn is_local_disk_fs(file: &File) -> bool {
    local_disk_magic(fs_magic(file))
}

/// [`is_local_disk_fs`] of what `path` names (symlinks followed, as open(2) does;
/// `statfs(2)`), without opening it.
pub fn is_local_disk_fs_at(path: &Path) -> bool {
    local_disk_magic(fs_magic_at(path))
}

fn local_disk_magic(magic: Option<i64>) -> bool {
    const EXT4_SUPER_MAGIC: i64 = 0xef53;
    const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
    const F2FS_SUPER_MAGIC: i64 = 0xf2f5_2010;
    matches!(
        magic,
        Some(EXT4_SUPER_MAGIC | XFS_SUPER_MAGIC | BTRFS_SUPER_MAGIC | F2FS_SUPER_MAGIC)
    )
}

/// `BTRFS_SUPER_MAGIC` (`linux/magic.h`).
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;

/// True if `file` lives on btrfs (`fstatfs(2)` `f_type`, `BTRFS_SUPER_MAGIC`), whose data
/// is copy-on-write and checksummed: an O_DIRECT write lands in a new extent that only a
/// transaction commit or an fsync's log tree makes part of the file.
pub fn is_btrfs(file: &File) -> bool {
    fs_magic(file) == Some(BTRFS_SUPER_MAGIC)
}

/// [`is_btrfs`] of what `path` names (symlinks followed; `statfs(2)`), without opening it.
pub fn is_btrfs_at(path: &Path) -> bool {
    fs_magic_at(path) == Some(BTRFS_SUPER_MAGIC)
}

/// The `f_type` of the file system `path` lives on, if `statfs(2)` tells.
fn fs_magic_at(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path that outlives the call; `st` is valid for
    // writes of a `statfs`.
    let r = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: statfs returned 0, so it filled `st` in.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64 but not on every target
    Some(st.f_type as i64)
}

/// The `f_type` of the file system `file` lives on, if `fstatfs(2)` tells.
fn fs_magic(file: &File) -> Option<i64> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `st` is valid for writes of a `statfs`; the fd is open for the call.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: fstatfs returned 0, so it filled `st` in.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64 but not on every target
    Some(st.f_type as i64)
}

/// What O_DIRECT I/O on a file needs aligned, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DioAlign {
    /// Alignment of the user buffer's address (`stx_dio_mem_align`).
    pub mem: u32,
    /// Alignment of the file offset and of the length (`stx_dio_offset_align`).
    pub offset: u32,
    /// Where the numbers came from, for logs.
    pub source: DioAlignSource,
}

/// Where a [`DioAlign`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DioAlignSource {
    /// `statx(2)` with `STATX_DIOALIGN` (Linux 6.1+ for regular files on ext4, xfs, f2fs,
    /// btrfs; 6.11+ for block devices).
    Statx,
    /// The block device's logical block size (`ioctl(BLKSSZGET)`), used for both.
    LogicalBlockSize,
}

/// The alignment O_DIRECT I/O on `file` needs, as the kernel reports it: `statx(2)`
/// `STATX_DIOALIGN` where the kernel and file system fill it in, else, for a block device,
/// its logical block size (`BLKSSZGET`, what `blockdev --getss` prints). `None` if neither
/// tells: the caller picks a safe default (4096 covers every Linux block device). A file
/// system that reports `STATX_DIOALIGN` with zeros does not support O_DIRECT on the file;
/// that is also `None` (the `open` with `O_DIRECT` would have failed already on most).
pub fn dio_alignment(file: &File) -> Option<DioAlign> {
    let fd = file.as_raw_fd();
    let mut st = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: the path is a valid NUL-terminated empty string and AT_EMPTY_PATH makes statx
    // describe `fd` itself; `st` is valid for writes of a `statx`; the fd is open.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN | libc::STATX_TYPE,
            st.as_mut_ptr(),
        )
    };
    let mut is_blk = false;
    if r == 0 {
        // SAFETY: statx returned 0, so it filled `st` in (and it was zeroed before).
        let st = unsafe { st.assume_init() };
        if st.stx_mask & libc::STATX_DIOALIGN != 0
            && st.stx_dio_mem_align != 0
            && st.stx_dio_offset_align != 0
        {
            return Some(DioAlign {
                mem: st.stx_dio_mem_align,
                offset: st.stx_dio_offset_align,
                source: DioAlignSource::Statx,
            });
        }
        is_blk = u32::from(st.stx_mode) & libc::S_IFMT == libc::S_IFBLK;
    } else if let Ok(m) = file.metadata() {
        use std::os::unix::fs::FileTypeExt;
        is_blk = m.file_type().is_block_device();
    }
    if !is_blk {
        return None;
    }
    logical_block_size(file).ok().map(|ss| DioAlign {
        mem: ss,
        offset: ss,
        source: DioAlignSource::LogicalBlockSize,
    })
}

/// The logical block size of a block device (`ioctl(BLKSSZGET)`).
pub fn logical_block_size(file: &File) -> io::Result<u32> {
    let mut ss: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one `int` through the pointer, which is valid for that; the
    // fd is open. On a file that is not a block device it fails with ENOTTY and writes nothing.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKSSZGET,
            &mut ss as *mut libc::c_int,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(ss)
        .ok()
        .filter(|s| s.is_power_of_two())
        .ok_or_else(|| io::Error::other(format!("BLKSSZGET returned {ss}")))
}

/// `BLKROGET` (`_IO(0x12, 94)`, include/uapi/linux/fs.h); the libc crate does not name it.
const BLKROGET: u32 = 0x125e;

/// Whether a block device is read-only (`ioctl(BLKROGET)`, what `blockdev --getro` prints):
/// a loop device set up with `losetup -r`, a write-protected disk. Such a device opens
/// O_RDWR without complaint and fails each write with EPERM.
pub fn block_device_read_only(file: &File) -> io::Result<bool> {
    let mut ro: libc::c_int = 0;
    // SAFETY: BLKROGET writes one `int` through the pointer, which is valid for that; the
    // fd is open. On a file that is not a block device it fails with ENOTTY and writes nothing.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKROGET as _, &mut ro as *mut libc::c_int) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ro != 0)
}

/// The size in 512-byte sectors of the block device whose device number is `rdev` (a
/// `st_rdev`), from its sysfs `size` (`/sys/dev/block/MAJOR:MINOR/size`, always in 512-byte
/// units): a block device's size is not in its metadata, and this needs no open of it.
pub fn block_device_sectors(rdev: u64) -> io::Result<u64> {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/size"))?
        .trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("sysfs size: {e}")))
}

/// Whether the disk under a file system has a volatile write cache: the sysfs
/// `queue/write_cache` ("write back" or "write through", `Documentation/block/queue-sysfs`)
/// of the block device whose device number is `dev` (a file's `st_dev`), or of the disk it
/// is a partition of. `None` where there is none to read: btrfs's anonymous device numbers,
/// network and FUSE file systems.
pub fn disk_write_cache(dev: u64) -> Option<bool> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let base = format!("/sys/dev/block/{major}:{minor}");
    // A partition's directory has no queue; the kernel resolves `..` from the link's target,
    // its disk's directory.
    let cache = std::fs::read_to_string(format!("{base}/queue/write_cache"))
        .or_else(|_| std::fs::read_to_string(format!("{base}/../queue/write_cache")))
        .ok()?;
    match cache.trim() {
        "write back" => Some(true),
        "write through" => Some(false),
        _ => None,
    }
}

/// Which pages of `file` in `offset..offset + len` (rounded out to whole pages) are in the
/// page cache, one `bool` per page, from `mincore(2)` on a read-only mapping that is never
/// touched (so the check itself reads nothing in, unlike a read with `RWF_NOWAIT`, whose
/// miss starts readahead). For tests and diagnostics that must know a read will miss. The
/// kernel reports a file's pages only to a caller that owns it or may write it (Linux 5.0).
///
/// # Errors
///
/// Those of `mmap` (e.g. a range past the end of the file is refused by `mincore` with
/// `ENOMEM`) and `mincore`.
pub fn resident_pages(file: &File, offset: u64, len: usize) -> io::Result<Vec<bool>> {
    // SAFETY: sysconf takes an integer and returns one.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|&p| p > 0)
        .unwrap_or(4096);
    let start = offset / page * page;
    let end = (offset + len as u64).div_ceil(page) * page;
    let map_len = usize::try_from(end - start)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "range too large"))?;
    if map_len == 0 {
        return Ok(Vec::new());
    }
    let at = libc::off_t::try_from(start)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset past off_t"))?;
    // SAFETY: a fresh read-only shared mapping of the file's range, checked before use,
    // never dereferenced (mincore only asks about it) and unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            at,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let mut vec = vec![0u8; map_len / page as usize];
    // SAFETY: `p` is the page-aligned mapping of `map_len` bytes made above; `vec` holds one
    // byte per page of it, as mincore writes.
    let r = unsafe { libc::mincore(p, map_len, vec.as_mut_ptr()) };
    let err = io::Error::last_os_error();
    // SAFETY: the mapping made above, of `map_len` bytes, no longer used.
    unsafe { libc::munmap(p, map_len) };
    if r != 0 {
        return Err(err);
    }
    Ok(vec.iter().map(|b| b & 1 != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Two open file descriptions of one file (what two processes, or two exports in one,
    /// hold): a range held through one cannot be taken through the other until it is
    /// dropped; ranges apart can.
    #[test]
    fn ofd_range_locks_exclude_other_open_file_descriptions_until_dropped() {
        let a = tempfile_in_target();
        let path = format!("/proc/self/fd/{}", a.as_raw_fd());
        let b = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let held = lock_range_ofd(&a, 4096, 4096).unwrap();
        assert_eq!(held.range(), 4096..8192);
        assert!(
            try_lock_range_ofd(&b, 8191, 1).unwrap().is_none(),
            "an overlapping range was taken through another open file description"
        );
        let apart = try_lock_range_ofd(&b, 0, 4096).unwrap();
        assert!(apart.is_some(), "a range apart was refused");
        drop(held);
        assert!(
            try_lock_range_ofd(&b, 4096, 1024).unwrap().is_some(),
            "the range was still held after the drop"
        );
        assert!(try_lock_range_ofd(&a, 0, 512).unwrap().is_none());
        drop(apart);
        assert!(try_lock_range_ofd(&a, 0, 512).unwrap().is_some());
        assert!(
            lock_range_ofd(&a, 0, 0).is_err(),
            "length 0 means to the end: refused"
        );
    }

    #[test]
    fn pages_just_written_are_resident() {
        let mut f = tempfile_in_target();
        f.write_all(&[1u8; 3 * 4096]).unwrap();
        let r = resident_pages(&f, 100, 2 * 4096).unwrap();
        assert_eq!(r.len(), 3, "rounded out to whole pages");
        assert!(r.iter().all(|&x| x), "{r:?}");
        assert!(resident_pages(&f, 0, 0).unwrap().is_empty());
    }

    #[test]
    fn cached_data_is_read_and_written_without_blocking() {
        let mut f = tempfile_in_target();
        f.write_all(&[7u8; 8192]).unwrap();
        f.sync_all().unwrap();
        let mut buf = [0u8; 4096];
        // Just written: in the page cache.
        let supported = match pread_nowait(&f, &mut buf, 4096).unwrap() {
            NoWait::Done(n) => {
                assert_eq!(n, 4096);
                assert!(buf.iter().all(|b| *b == 7));
                true
            }
            NoWait::WouldBlock => panic!("data just written should be cached"),
            NoWait::Unsupported => {
                assert!(
                    is_memory_fs(&f),
                    "only memory file systems lack RWF_NOWAIT here"
                );
                false
            }
        };
        if supported {
            // A buffered write may still need to wait (block allocation, journal): either it
            // is done in full, or it says so and nothing is promised.
            match pwrite_nowait(&f, &[9u8; 512], 512).unwrap() {
                NoWait::Done(n) => {
                    assert_eq!(n, 512);
                    let mut b = [0u8; 512];
                    assert_eq!(pread_nowait(&f, &mut b, 512).unwrap(), NoWait::Done(512));
                    assert_eq!(b, [9u8; 512]);
                }
                NoWait::WouldBlock | NoWait::Unsupported => {}
            }
            // Beyond the end: zero bytes, not an error.
            assert_eq!(
                pread_nowait(&f, &mut buf, 1 << 20).unwrap(),
                NoWait::Done(0)
            );
        }
    }

    /// The slices land one after the other, unaligned and of odd sizes, with one call.
    #[test]
    fn pwritev_writes_slices_in_order() {
        let f = tempfile_in_target();
        f.set_len(8192).unwrap();
        let a = [1u8; 700];
        let b = [2u8; 1];
        let c = [3u8; 1500];
        pwritev_all(&f, &[&a, &b, &c], 100).unwrap();
        let mut back = vec![0u8; 2400];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 0).unwrap();
        assert!(back[..100].iter().all(|x| *x == 0));
        assert!(back[100..800].iter().all(|x| *x == 1));
        assert_eq!(back[800], 2);
        assert!(back[801..2301].iter().all(|x| *x == 3));
        assert!(back[2301..].iter().all(|x| *x == 0));
        match pwritev_nowait(&f, &[&c, &a], 0).unwrap() {
            NoWait::Done(n) => {
                assert_eq!(n, 2200);
                std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 0).unwrap();
                assert!(back[..1500].iter().all(|x| *x == 3));
                assert!(back[1500..2200].iter().all(|x| *x == 1));
            }
            NoWait::WouldBlock | NoWait::Unsupported => {}
        }
        let many: Vec<&[u8]> = vec![&b[..]; MAX_WRITEV + 1];
        assert_eq!(
            pwritev_all(&f, &many, 0).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn shm_is_a_memory_file_system() {
        let p =
            std::path::Path::new("/dev/shm").join(format!("aoe-sys-shm-{}", std::process::id()));
        let f = File::create(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        assert!(is_memory_fs(&f));
        let here = File::open(env!("CARGO_MANIFEST_DIR")).unwrap();
        let _ = is_memory_fs(&here); // whatever it is, it must not fail
        assert!(!is_local_disk_fs(&f), "tmpfs is no disk file system");
    }

    #[test]
    fn dio_alignment_of_a_regular_file_is_a_power_of_two_or_unknown() {
        let f = tempfile_in_target();
        if let Some(a) = dio_alignment(&f) {
            assert!(
                a.mem.is_power_of_two() && a.offset.is_power_of_two(),
                "{a:?}"
            );
            assert_eq!(a.source, DioAlignSource::Statx);
        }
        // Not a block device: BLKSSZGET refuses.
        assert!(logical_block_size(&f).is_err());
    }

    /// A scratch file on disk (tmpfs may lack `O_DIRECT`): beside the test binary, in the
    /// target directory of whoever built it, not in the source tree, which an unprivileged
    /// user running the tests may not own.
    fn tempfile_in_target() -> File {
        // One name per call: tests run in parallel threads of one process.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let exe = std::env::current_exe().unwrap();
        let p = exe
            .parent()
            .unwrap()
            .join(format!("aoe-sys-nowait-{}-{n}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }
}
