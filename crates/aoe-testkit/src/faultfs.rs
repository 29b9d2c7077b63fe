//! A FUSE file system that passes one backing file through and fails `fsync`, writes and
//! reads of a chosen range on demand, for tests of what a daemon does when its storage
//! fails (device-mapper's `error` and `flakey` targets are not available in every test
//! kernel; FUSE is).
//!
//! [`FaultFs::mount`] mounts, on a fresh temporary directory and from a thread of the test
//! process itself, a file system holding one file, [`FaultFs::file`], whose reads, writes and
//! fsyncs go to the backing file. [`Faults`] (shared, so a test can hold it while a daemon uses
//! the file) switches failures on and off and counts what the file system saw:
//!
//! * `fail_fsync(true)`: every `fsync`/`fdatasync` on the file fails with EIO, as a disk whose
//!   write-back failed does (the data written through stays in the backing file: what is
//!   tested is that the error is reported and remembered, not that data vanish).
//! * `fail_writes(Some(errno))`: every write fails with `errno` (EIO, ENOSPC, ...) and writes
//!   nothing.
//! * `delay_writes(prefix, d)`: a write whose data begins with `prefix` waits `d` before it is
//!   carried out (and answered), as a slow disk does (`delay_every_write(d)`: every write,
//!   whatever its data); other requests go on meanwhile (the delayed write waits on a thread
//!   of its own, not on one of the server's). With
//!   `parallel_writes(true)` set before the file is opened, opens answer `FOPEN_DIRECT_IO |
//!   FOPEN_PARALLEL_DIRECT_WRITES`, so the kernel sends writes to different ranges of one open
//!   file at once instead of one at a time under the inode lock (Linux 6.2+): only then can a
//!   later write overtake a delayed one.
//! * `hold_opens(true)`: every later open of the file waits (on a thread of its own, the
//!   server's stay free) until `hold_opens(false)`, as an open on a hung NFS mount or a busy
//!   FUSE server does; `opens_held` says how many wait now.
//! * `fail_reads(Some(range))`: every read overlapping that byte range of the file fails
//!   with EIO, as a disk with unreadable sectors there does; `reads_failed` counts them.
//! * `fsyncs` and `writes`: counters of the FUSE_FSYNC and FUSE_WRITE requests seen (failed or
//!   not), e.g. to check that a FLUSH reached fdatasync before it was answered.
//!
//! The file is served without `FOPEN_DIRECT_IO` and without the FUSE write-back cache, so each
//! `write(2)` by a user of the file reaches the file system (write-through) and each
//! `fsync(2)` sends one FUSE_FSYNC. Open the file with O_DIRECT if page-cache reads would hide
//! what a test looks for.
//!
//! It needs `/dev/fuse` and `fusermount3` (Debian package fuse3) and, for other users than the
//! mounting one to open the file, root. Dropping [`FaultFs`] unmounts (lazily, so a daemon
//! still holding the file open does not keep it mounted), panics if the mount point is still
//! mounted after that (a test that passed must not leave a mount behind), and removes the
//! directory. A test process that never drops it (killed by a signal, or aborted) leaves no
//! mount either: the file system is mounted with `auto_unmount`, so `fusermount3` stays
//! beside the process and unmounts once the process's `/dev/fuse` descriptor is closed,
//! however the process ended (libfuse's `fusermount3 -o auto_unmount`). Without it such a
//! mount stayed, answering every access with ENOTCONN, until someone unmounted it by hand.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite,
    Request, WriteFlags,
};

/// Name of the one file in the file system.
pub const FILE_NAME: &str = "disk.img";

const ROOT_INO: u64 = 1;
const FILE_INO: u64 = 2;
const TTL: Duration = Duration::from_secs(1);

/// The switches and counters of a [`FaultFs`], shared with its FUSE threads.
#[derive(Debug, Default)]
pub struct Faults {
    /// FUSE_FSYNC requests seen on the file (fsync and fdatasync), failed or not.
    pub fsyncs: AtomicU64,
    /// FUSE_WRITE requests seen on the file, failed or not.
    pub writes: AtomicU64,
    fail_fsync: AtomicBool,
    /// 0: writes succeed; otherwise the errno they fail with.
    fail_writes: AtomicI32,
    /// Writes whose data begin with these bytes (empty: every write) wait this long (none: no
    /// delay).
    delay: Mutex<Option<(Vec<u8>, Duration)>>,
    /// Opens answer FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES.
    parallel_writes: AtomicBool,
    /// Opens wait while this is true ([`Faults::hold_opens`]).
    hold_opens: Mutex<bool>,
    opens_released: Condvar,
    /// Opens waiting now.
    opens_held: AtomicU64,
    /// Reads overlapping this byte range of the file fail with EIO ([`Faults::fail_reads`]).
    fail_reads: Mutex<Option<std::ops::Range<u64>>>,
    /// FUSE_READ requests failed by `fail_reads`.
    pub reads_failed: AtomicU64,
}

impl Faults {
    /// Makes every later fsync fail with EIO (`true`) or succeed again (`false`).
    pub fn fail_fsync(&self, on: bool) {
        self.fail_fsync.store(on, Ordering::SeqCst);
    }

    /// Makes every later write fail with `errno` (e.g. `libc::EIO` = 5, `ENOSPC` = 28), or
    /// succeed again (`None`).
    pub fn fail_writes(&self, errno: Option<i32>) {
        self.fail_writes.store(errno.unwrap_or(0), Ordering::SeqCst);
    }

    /// Makes every later write whose data begins with `prefix` (non-empty) wait `delay`
    /// before it is carried out, or no write wait (`None`).
    pub fn delay_writes(&self, what: Option<(&[u8], Duration)>) {
        *self.delay.lock().unwrap_or_else(|p| p.into_inner()) = what
            .filter(|(p, _)| !p.is_empty())
            .map(|(p, d)| (p.to_vec(), d));
    }

    /// Makes every later write wait `delay` before it is carried out, whatever its data (a
    /// uniformly slow disk: with writes one at a time, the default, at most `1 / delay`
    /// writes per second), or no write wait (`None`).
    pub fn delay_every_write(&self, delay: Option<Duration>) {
        *self.delay.lock().unwrap_or_else(|p| p.into_inner()) = delay.map(|d| (Vec::new(), d));
    }

    /// Makes later opens of the file ask the kernel for parallel direct writes (`true`), or
    /// for ordinary page-cache I/O again (`false`, the default).
    pub fn parallel_writes(&self, on: bool) {
        self.parallel_writes.store(on, Ordering::SeqCst);
    }

    /// Makes every later open of the file wait until `hold_opens(false)` (`true`), or
    /// releases the waiting ones and lets opens through again (`false`).
    pub fn hold_opens(&self, on: bool) {
        *self.hold_opens.lock().unwrap_or_else(|p| p.into_inner()) = on;
        if !on {
            self.opens_released.notify_all();
        }
    }

    /// Opens of the file waiting now ([`Faults::hold_opens`]).
    pub fn opens_held(&self) -> u64 {
        self.opens_held.load(Ordering::SeqCst)
    }

    /// Makes every later read that overlaps the byte range `range` of the file fail with
    /// EIO, as a disk with unreadable sectors there does (reads elsewhere succeed), or no
    /// read fail (`None`). The kernel reads a FUSE file a page or more at a time: a range
    /// aligned to 4 KiB fails exactly its own pages.
    pub fn fail_reads(&self, range: Option<std::ops::Range<u64>>) {
        *self.fail_reads.lock().unwrap_or_else(|p| p.into_inner()) = range;
    }

    /// Number of fsyncs seen so far.
    pub fn fsyncs(&self) -> u64 {
        self.fsyncs.load(Ordering::SeqCst)
    }

    /// Number of writes seen so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }
}

struct PassThrough {
    backing: File,
    size: u64,
    faults: Arc<Faults>,
    start: SystemTime,
}

impl PassThrough {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT_INO => (FileType::Directory, 0o755, 0, 2),
            FILE_INO => (FileType::RegularFile, 0o644, self.size, 1),
            _ => return None,
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.start,
            mtime: self.start,
            ctime: self.start,
            crtime: self.start,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

/// Answers an open of the file: with parallel direct writes if `parallel`
/// ([`Faults::parallel_writes`]).
fn reply_open(parallel: bool, reply: ReplyOpen) {
    if parallel {
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    } else {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }
}

fn errno_of(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(5))
}

impl Filesystem for PassThrough {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent.0, name.to_str()) {
            (ROOT_INO, Some(FILE_NAME)) => match self.attr(FILE_INO) {
                Some(a) => reply.entry(&TTL, &a, Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // A fixed-size disk image: resizing is refused, everything else is ignored.
        if size.is_some_and(|s| s != self.size) {
            return reply.error(Errno::EPERM);
        }
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == FILE_INO
            && *self
                .faults
                .hold_opens
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        {
            self.faults.opens_held.fetch_add(1, Ordering::SeqCst);
            let faults = self.faults.clone();
            let parallel = faults.parallel_writes.load(Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut held = faults.hold_opens.lock().unwrap_or_else(|p| p.into_inner());
                while *held {
                    held = faults
                        .opens_released
                        .wait(held)
                        .unwrap_or_else(|p| p.into_inner());
                }
                drop(held);
                faults.opens_held.fetch_sub(1, Ordering::SeqCst);
                reply_open(parallel, reply);
            });
            return;
        }
        match ino.0 {
            FILE_INO => reply_open(self.faults.parallel_writes.load(Ordering::SeqCst), reply),
            _ => reply.error(Errno::EISDIR),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino.0 != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let end = offset.saturating_add(u64::from(size)).min(self.size);
        let bad = self
            .faults
            .fail_reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .is_some_and(|r| offset < r.end && r.start < end);
        if bad {
            self.faults.reads_failed.fetch_add(1, Ordering::SeqCst);
            return reply.error(Errno::EIO);
        }
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        match self.backing.read_exact_at(&mut buf, offset) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino.0 != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        self.faults.writes.fetch_add(1, Ordering::SeqCst);
        let fail = self.faults.fail_writes.load(Ordering::SeqCst);
        if fail != 0 {
            return reply.error(Errno::from_i32(fail));
        }
        if offset.saturating_add(data.len() as u64) > self.size {
            return reply.error(Errno::ENOSPC);
        }
        let delay = match &*self.faults.delay.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((prefix, d)) if data.starts_with(prefix) => Some(*d),
            _ => None,
        };
        if let Some(d) = delay {
            // Answered from a thread of its own, as a disk holds one command while it takes
            // others: the FUSE server's threads stay free for the file's other requests (an
            // open, a getattr, other writes), which would otherwise wait behind the delay.
            let backing = match self.backing.try_clone() {
                Ok(f) => f,
                Err(e) => return reply.error(errno_of(&e)),
            };
            let data = data.to_vec();
            std::thread::spawn(move || {
                std::thread::sleep(d);
                match backing.write_all_at(&data, offset) {
                    Ok(()) => reply.written(data.len() as u32),
                    Err(e) => reply.error(errno_of(&e)),
                }
            });
            return;
        }
        match self.backing.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino.0 != FILE_INO {
            return reply.ok();
        }
        self.faults.fsyncs.fetch_add(1, Ordering::SeqCst);
        if self.faults.fail_fsync.load(Ordering::SeqCst) {
            return reply.error(Errno::EIO);
        }
        match self.backing.sync_data() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let all = [
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted fault-injecting pass-through of one file; unmounted on drop.
pub struct FaultFs {
    session: Option<fuser::BackgroundSession>,
    faults: Arc<Faults>,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for FaultFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultFs")
            .field("mountpoint", &self.dir.path())
            .field("faults", &self.faults)
            .finish()
    }
}

impl FaultFs {
    /// Mounts a pass-through of `backing` (opened read-write; its size is fixed for the life
    /// of the mount) on a new temporary directory, and waits until the file is visible.
    ///
    /// # Errors
    ///
    /// Not root (`PermissionDenied`), the backing file cannot be opened, or the mount fails (no `/dev/fuse`, no
    /// `fusermount3`: install Debian package fuse3), each with a message naming it.
    pub fn mount(backing: &Path) -> io::Result<FaultFs> {
        crate::not_root_error()?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(backing)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("cannot open {}: {e}", backing.display()))
            })?;
        let size = file.metadata()?.len();
        let faults = Arc::new(Faults::default());
        remove_stale_mount_dirs();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{MOUNT_DIR_PREFIX}{}-", std::process::id()))
            .tempdir()?;
        let mut cfg = fuser::Config::default();
        cfg.mount_options = vec![
            fuser::MountOption::FSName("aoe-faultfs".into()),
            fuser::MountOption::Subtype("faultfs".into()),
            // A test process killed before its drop (a run stopped by hand or by a timeout)
            // must not leave the mount behind: fusermount3 unmounts when our /dev/fuse
            // descriptor closes (fuser mounts through fusermount3 for this, even as root).
            fuser::MountOption::AutoUnmount,
        ];
        // Root mounts; the daemon under test may run as another user.
        cfg.acl = fuser::SessionACL::All;
        cfg.n_threads = Some(2);
        let fs = PassThrough {
            backing: file,
            size,
            faults: faults.clone(),
            start: SystemTime::now(),
        };
        let session = fuser::spawn_mount(fs, dir.path(), &cfg).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot mount the fault file system on {} (needs /dev/fuse and \
                     fusermount3 from Debian package fuse3): {e}",
                    dir.path().display()
                ),
            )
        })?;
        let me = FaultFs {
            session: Some(session),
            faults,
            dir,
        };
        let file = me.file();
        if !crate::wait_until(Duration::from_secs(5), || file.exists()) {
            return Err(io::Error::other(format!(
                "{} did not appear after mounting",
                file.display()
            )));
        }
        Ok(me)
    }

    /// The pass-through file.
    pub fn file(&self) -> PathBuf {
        self.dir.path().join(FILE_NAME)
    }

    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        self.dir.path()
    }

    /// The switches and counters.
    pub fn faults(&self) -> Arc<Faults> {
        self.faults.clone()
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        // A lazy unmount first: a daemon that still has the file open must not keep the
        // session thread (and so this drop) waiting.
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(s) = self.session.take() {
            drop(s);
        }
        // The lazy unmount detaches at once: a mount point still listed now is a mount this
        // test leaves behind.
        match is_mount_point(self.dir.path()) {
            Ok(false) => {}
            Ok(true) if std::thread::panicking() => eprintln!(
                "FaultFs: {} is still mounted after `fusermount3 -u -z`",
                self.dir.path().display()
            ),
            Ok(true) => panic!(
                "FaultFs: {} is still mounted after `fusermount3 -u -z`",
                self.dir.path().display()
            ),
            Err(e) => eprintln!("FaultFs: cannot read /proc/self/mountinfo: {e}"),
        }
    }
}

/// What the name of every FaultFs mount point begins with; the mounting process's pid and
/// a `-` follow it.
pub const MOUNT_DIR_PREFIX: &str = "aoe-faultfs-";

/// Removes the empty mount points (`/tmp/aoe-faultfs-PID-*`) of test processes that are
/// gone: a process killed by a signal never runs the drop that removes its directory
/// (`auto_unmount` takes the mount away, not the directory). A directory still mounted, not
/// empty, or of a process still running is left alone. Called by [`FaultFs::mount`];
/// returns the directories removed.
pub fn remove_stale_mount_dirs() -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(MOUNT_DIR_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        if pid == std::process::id()
            || Path::new(&format!("/proc/{pid}")).exists()
            || is_mount_point(&path).unwrap_or(true)
        {
            continue;
        }
        // remove_dir refuses a directory that is not empty: nothing but an empty mount
        // point goes.
        if std::fs::remove_dir(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// True if `path` is a mount point in this process's mount namespace: the fifth field of a
/// line of `/proc/self/mountinfo` (proc(5); spaces, tabs, newlines and backslashes in it are
/// written as octal escapes, which a path holding none of them never needs).
///
/// # Errors
///
/// `/proc/self/mountinfo` cannot be read.
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let want = path.to_string_lossy();
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_ref())))
}
