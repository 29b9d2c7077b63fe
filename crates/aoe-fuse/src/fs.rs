//! The `/dev/etherd`-style file system over FUSE.
//!
//! ```text
//! ROOT/discover            write: broadcast a Query Config on every allowed interface
//! ROOT/interfaces          read/write: the allowed interfaces (empty: all)
//! ROOT/err                 read: blocks until a diagnostic line is available
//! ROOT/revalidate          write "eX.Y": re-query and re-IDENTIFY
//! ROOT/flush               write "all", names, or nothing (= down devices): remove devices
//! ROOT/eX.Y                the device, read/write at any offset; fsync = FLUSH CACHE EXT
//! ROOT/eX.YpN              partition N of an MBR or GPT table on it
//! ROOT/sysfs/block/etherd!eX.Y/{state,mac,netif,firmware-version,payload,size,identify}
//! ROOT/sysfs/kernel/debug/aoe/eX.Y   the driver's debugfs file (/sys/kernel/debug/aoe/eX.Y)
//! ```
//! The attribute tree is laid out like the kernel's sysfs so aoetools' `aoe-stat` reads it
//! with `sysfs_dir=ROOT/sysfs`. `identify` is ours: the raw 512-byte IDENTIFY page the
//! driver returns for the `HDIO_GET_IDENTITY` ioctl, which a FUSE file cannot answer.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use aoe_proto::initiator::{BlockOp, DeviceState, FlushWhich, Lent};
use aoe_wire::TargetAddr;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, Notifier, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

use aoe_initiator::blockdev::BlockDevice;
use aoe_initiator::net::{lock, try_lock, Cmd, DevEntry, ErrWaiter, Handle, Shared};

use crate::openers::{file_handle, is_direct, Openers};
use crate::{heldreply, inval};

pub(crate) const ROOT: u64 = 1;
const DISCOVER: u64 = 2;
pub(crate) const INTERFACES: u64 = 3;
pub(crate) const ERR: u64 = 4;
const REVALIDATE: u64 = 5;
const FLUSH: u64 = 6;
const SYSFS: u64 = 7;
const SYSFS_BLOCK: u64 = 8;
const SYSFS_KERNEL: u64 = 9;
const SYSFS_DEBUG: u64 = 10;
const SYSFS_DEBUG_AOE: u64 = 11;
/// The attribute index of a device's debug file (under `SYSFS_DEBUG_AOE`, not in its
/// attribute directory).
const DEBUG_ATTR: usize = 0xff;

const DEV_BASE: u64 = 1 << 40;
const DEVDIR_BASE: u64 = 2 << 40;
const ATTR_BASE: u64 = 3 << 40;

const ATTRS: [&str; 7] = [
    "state",
    "mac",
    "netif",
    "firmware-version",
    "payload",
    "size",
    "identify",
];
pub(crate) const TTL: Duration = Duration::from_millis(200);

fn key(a: TargetAddr) -> u64 {
    (u64::from(a.shelf) << 8) | u64::from(a.slot)
}

fn addr_of(k: u64) -> TargetAddr {
    TargetAddr::new((k >> 8) as u16, k as u8)
}

/// What an inode number names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Node {
    Fixed(u64),
    Dev(TargetAddr, u32),
    DevDir(TargetAddr),
    Attr(TargetAddr, usize),
}

pub(crate) fn node(ino: u64) -> Option<Node> {
    match ino {
        1..=11 => Some(Node::Fixed(ino)),
        i if i >= ATTR_BASE => Some(Node::Attr(
            addr_of((i - ATTR_BASE) >> 8),
            ((i - ATTR_BASE) & 0xff) as usize,
        )),
        i if i >= DEVDIR_BASE => Some(Node::DevDir(addr_of((i - DEVDIR_BASE) >> 8))),
        i if i >= DEV_BASE => Some(Node::Dev(
            addr_of((i - DEV_BASE) >> 16),
            ((i - DEV_BASE) & 0xffff) as u32,
        )),
        _ => None,
    }
}

pub(crate) fn ino(n: Node) -> u64 {
    match n {
        Node::Fixed(i) => i,
        Node::Dev(a, p) => DEV_BASE + (key(a) << 16) + u64::from(p),
        Node::DevDir(a) => DEVDIR_BASE + (key(a) << 8),
        Node::Attr(a, i) => ATTR_BASE + (key(a) << 8) + i as u64,
    }
}

/// A FUSE read of `err` waiting for a line.
struct ErrReply(ReplyData);

impl ErrWaiter for ErrReply {
    fn line(self: Box<Self>, line: &[u8]) {
        self.0.data(line);
    }
    fn interrupted(self: Box<Self>) {
        self.0.error(fuser::Errno::EINTR);
    }
}

/// Tells the kernel to drop its cached pages of each range queued ([`inval::Queue`]),
/// after the write that covered it was answered. Neither before the answer nor on the
/// network thread: the kernel waits for the lock of every cached page in the range, and a
/// page being read ahead holds it until its read is answered, which may wait for a slot among
/// the connection's background requests (`max_background`), which the direct writes fill
/// until they are answered: holding a write's answer here deadlocked fio's direct writers and
/// a buffered reader (fio.rs `fio_parallel_direct_writes_verify`, under load). While this
/// thread waits there, the writes answered meanwhile merge in the queue, which stays bounded.
///
/// A write through the NBD front-end is answered only after its ranges are dropped here
/// (the `then` queued with them, [`CachedPages`]): it holds no FUSE request, so nothing the
/// kernel waits for here waits for it.
fn invalidator(q: Arc<inval::Queue>, notifier: Arc<OnceLock<Notifier>>) {
    while let Some((batch, then)) = q.wait() {
        if let Some(n) = notifier.get() {
            drop_ranges(n, batch);
        }
        for f in then {
            f();
        }
    }
}

/// Drops each range of `batch` from its inode's page cache.
fn drop_ranges(n: &Notifier, batch: std::collections::BTreeMap<u64, inval::Span>) {
    for (ino, span) in batch {
        // ENOENT: the kernel has no such inode cached (nothing to drop). Offset 0 and
        // length 0 drop the whole file (`fuse_reverse_inval_inode`: a length <= 0 runs to
        // the end).
        let ranges = match span {
            inval::Span::Whole => vec![(0, 0)],
            inval::Span::Ranges(r) => r,
        };
        for (offset, len) in ranges {
            let _ = n.inval_inode(
                INodeNo(ino),
                i64::try_from(offset).unwrap_or(i64::MAX),
                i64::try_from(len).unwrap_or(i64::MAX),
            );
        }
    }
}

/// The device files' page cache as the other front-ends see it
/// ([`aoe_initiator::net::CachedViews`]): a write through the NBD server drops the sectors
/// it wrote from the cache of every device and partition file open in the kernel's cached
/// mode that covers them, before it is answered. Without it, a file open cached kept what
/// it had read before an NBD client's write, answered and flushed, for as long as the
/// kernel kept the pages (a real block device has one page cache that every local writer
/// goes through). A write through one device or partition file drops the sectors from the
/// other files' caches the same way, after its answer like a direct write's own range
/// ([`AoeFs::write_dev`]): a partition file and its disk's file are one device here (on
/// Linux a partition's block device has a page cache of its own, which a write through
/// the whole disk's does not update). Files without a cached open have nothing to drop:
/// the kernel drops an inode's cache at each open (no `FOPEN_KEEP_CACHE`), so pages from
/// an earlier open are gone before a new one reads.
#[derive(Clone)]
struct CachedPages {
    shared: Arc<Mutex<Shared>>,
    cached_opens: Arc<Mutex<HashMap<u64, u32>>>,
    queue: Arc<inval::Queue>,
}

impl CachedPages {
    /// The byte ranges (inode, offset, length) of sectors `[lba, lba + sectors)` of `dev`
    /// in every device and partition file with a cached open but `except`.
    fn ranges(
        &self,
        dev: TargetAddr,
        lba: u64,
        sectors: u64,
        except: Option<u64>,
    ) -> Vec<(u64, u64, u64)> {
        let files: Vec<(u64, u32)> = {
            let c = self.cached_opens.lock().unwrap_or_else(|p| p.into_inner());
            if c.is_empty() {
                return Vec::new();
            }
            c.keys()
                .filter(|&&ino| Some(ino) != except)
                .filter_map(|&ino| match node(ino) {
                    Some(Node::Dev(a, p)) if a == dev => Some((ino, p)),
                    _ => None,
                })
                .collect()
        };
        if files.is_empty() {
            return Vec::new();
        }
        // Sector range to byte range of each file. A partition's start is in the shared
        // state, which the network thread (an NBD write's completion) must never wait for:
        // held by a front-end now, the partition's whole cache is dropped instead (more is
        // always safe).
        let end = lba.saturating_add(sectors);
        let clip = |ino: u64, (start, len): (u64, u64)| {
            let (a, b) = (lba.max(start), end.min(start.saturating_add(len)));
            (a < b).then(|| (ino, (a - start) * 512, (b - a) * 512))
        };
        let shared = if files.iter().any(|&(_, p)| p != 0) {
            try_lock(&self.shared)
        } else {
            None
        };
        files
            .into_iter()
            .filter_map(|(ino, p)| match (p, &shared) {
                (0, _) => clip(ino, (0, u64::MAX)),
                (_, Some(s)) => clip(ino, s.devices.get(&dev).and_then(|e| extent(e, p))?),
                (_, None) => Some((ino, 0, u64::MAX)),
            })
            .collect()
    }
}

impl aoe_initiator::net::CachedViews for CachedPages {
    fn written(&self, dev: TargetAddr, lba: u64, sectors: u64, then: Box<dyn FnOnce() + Send>) {
        let ranges = self.ranges(dev, lba, sectors, None);
        if ranges.is_empty() {
            return then();
        }
        self.queue.push_then(&ranges, then);
    }
}

/// The file system. A clone shares everything (the FUSE-over-io_uring source and its side
/// thread hold one).
#[derive(Clone)]
pub struct AoeFs {
    shared: Arc<Mutex<Shared>>,
    /// The mount's own source: control commands, and the device-file I/O of opens beyond
    /// [`crate::openers::FILE_SOURCES`].
    net: Handle,
    /// Each open device file's source, named by its file handle ([`crate::openers`]).
    openers: Arc<Openers>,
    uid: u32,
    gid: u32,
    start: SystemTime,
    /// Per device-file inode, how many opens of it are in the kernel's cached mode (opened
    /// without `O_DIRECT` or read-only): while there are any, a direct-I/O write's range is
    /// invalidated in the page cache after it completes ([`invalidator`]).
    cached_opens: Arc<Mutex<HashMap<u64, u32>>>,
    /// The other device and partition files' cached pages a write drops.
    pages: CachedPages,
    invalidate: Arc<inval::Sender>,
    /// Asks for `FUSE_OVER_IO_URING` at `FUSE_INIT` ([`crate::ring`]).
    uring: bool,
    /// A dup of the session's /dev/fuse fd, set once mounted ([`crate::mount`]): device-file
    /// reads are answered on it from the receive ring ([`heldreply`]); unset, through fuser
    /// from a copy.
    reply_fd: Arc<OnceLock<OwnedFd>>,
}

impl AoeFs {
    /// A file system over the shared state, sending work to `net` (the mount's source; each
    /// open device file gets one of its own, up to a cap); `notifier` is set once the
    /// session is mounted. Fails if its invalidator thread cannot start (a cgroup's
    /// `pids.max` reached), which panicked until session 36.
    pub fn new(
        shared: Arc<Mutex<Shared>>,
        net: Handle,
        notifier: Arc<OnceLock<Notifier>>,
    ) -> std::io::Result<AoeFs> {
        let q = Arc::new(inval::Queue::default());
        let (rx, n) = (q.clone(), notifier.clone());
        std::thread::Builder::new()
            .name("fuse-inval".into())
            .spawn(move || invalidator(rx, n))?;
        let cached_opens = Arc::new(Mutex::new(HashMap::new()));
        let pages = CachedPages {
            shared: shared.clone(),
            cached_opens: cached_opens.clone(),
            queue: q.clone(),
        };
        net.set_cached_views(Box::new(pages.clone()));
        Ok(AoeFs {
            shared,
            openers: Arc::new(Openers::new(net.clone())),
            net,
            uid: 0,
            gid: 0,
            start: SystemTime::now(),
            cached_opens,
            pages,
            invalidate: Arc::new(inval::Sender(q)),
            uring: false,
            reply_fd: Arc::new(OnceLock::new()),
        })
    }

    /// Answers device-file reads on `fd` (a dup of the session's /dev/fuse fd, the one its
    /// requests are read from) straight from the receive ring ([`heldreply`]). Set before
    /// the session serves requests; a second call changes nothing.
    pub(crate) fn set_reply_fd(&self, fd: OwnedFd) {
        let _ = self.reply_fd.set(fd);
    }

    /// Asks the kernel for FUSE over io_uring at `FUSE_INIT`.
    pub(crate) fn with_uring(mut self) -> AoeFs {
        self.uring = true;
        self
    }

    /// The counts of cached opens (a poisoned lock is taken over: the map stays valid).
    pub(crate) fn cached_opens(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        self.cached_opens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn attr(&self, n: Node, size: u64, kind: FileType, perm: u16) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino(n)),
            size,
            blocks: size.div_ceil(512),
            atime: self.start,
            mtime: self.start,
            ctime: self.start,
            crtime: self.start,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 512,
            flags: 0,
        }
    }

    /// The bytes of attribute file `i` of device `a` (None: no such device or file), copied
    /// out under the shared lock, which is released before the caller replies.
    pub(crate) fn attr_bytes(&self, a: TargetAddr, i: usize) -> Option<Vec<u8>> {
        let s = lock(&self.shared);
        s.devices.get(&a).and_then(|e| attr_value(e, i))
    }

    /// Attributes of a node, or None if it does not exist (now).
    pub(crate) fn getattr_node(&self, n: Node) -> Option<FileAttr> {
        let s = lock(&self.shared);
        Some(match n {
            Node::Fixed(
                ROOT | SYSFS | SYSFS_BLOCK | SYSFS_KERNEL | SYSFS_DEBUG | SYSFS_DEBUG_AOE,
            ) => self.attr(n, 0, FileType::Directory, 0o755),
            Node::Fixed(DISCOVER | REVALIDATE | FLUSH) => {
                self.attr(n, 0, FileType::RegularFile, 0o200)
            }
            Node::Fixed(INTERFACES) => self.attr(n, 0, FileType::RegularFile, 0o600),
            Node::Fixed(ERR) => self.attr(n, 0, FileType::RegularFile, 0o400),
            Node::Fixed(_) => return None,
            Node::Dev(a, p) => {
                let e = s.devices.get(&a)?;
                let (_, len) = extent(e, p)?;
                self.attr(n, len * 512, FileType::RegularFile, 0o660)
            }
            Node::DevDir(a) => {
                s.devices.get(&a)?;
                self.attr(n, 0, FileType::Directory, 0o755)
            }
            Node::Attr(a, i) => {
                let e = s.devices.get(&a)?;
                let v = attr_value(e, i)?;
                // The debug file is for root only, as debugfs is.
                let perm = if i == DEBUG_ATTR { 0o400 } else { 0o444 };
                self.attr(n, v.len() as u64, FileType::RegularFile, perm)
            }
        })
    }

    fn children(&self, dir: u64) -> Option<Vec<(Node, FileType, String)>> {
        let s = lock(&self.shared);
        let mut v = Vec::new();
        match node(dir)? {
            Node::Fixed(ROOT) => {
                for (i, name) in [
                    (DISCOVER, "discover"),
                    (INTERFACES, "interfaces"),
                    (ERR, "err"),
                    (REVALIDATE, "revalidate"),
                    (FLUSH, "flush"),
                ] {
                    v.push((Node::Fixed(i), FileType::RegularFile, name.to_string()));
                }
                v.push((Node::Fixed(SYSFS), FileType::Directory, "sysfs".into()));
                for (a, e) in &s.devices {
                    v.push((Node::Dev(*a, 0), FileType::RegularFile, a.to_string()));
                    for p in &e.partitions {
                        v.push((
                            Node::Dev(*a, p.number),
                            FileType::RegularFile,
                            format!("{a}p{}", p.number),
                        ));
                    }
                }
            }
            Node::Fixed(SYSFS) => {
                v.push((
                    Node::Fixed(SYSFS_BLOCK),
                    FileType::Directory,
                    "block".into(),
                ));
                v.push((
                    Node::Fixed(SYSFS_KERNEL),
                    FileType::Directory,
                    "kernel".into(),
                ));
            }
            Node::Fixed(SYSFS_KERNEL) => v.push((
                Node::Fixed(SYSFS_DEBUG),
                FileType::Directory,
                "debug".into(),
            )),
            Node::Fixed(SYSFS_DEBUG) => v.push((
                Node::Fixed(SYSFS_DEBUG_AOE),
                FileType::Directory,
                "aoe".into(),
            )),
            // aoeblk.c `aoedisk_add_debugfs`: one file per device, named after its disk
            // without "etherd/".
            Node::Fixed(SYSFS_DEBUG_AOE) => {
                for a in s.devices.keys() {
                    v.push((
                        Node::Attr(*a, DEBUG_ATTR),
                        FileType::RegularFile,
                        a.to_string(),
                    ));
                }
            }
            Node::Fixed(SYSFS_BLOCK) => {
                for a in s.devices.keys() {
                    v.push((Node::DevDir(*a), FileType::Directory, format!("etherd!{a}")));
                }
            }
            Node::DevDir(a) => {
                s.devices.get(&a)?;
                for (i, name) in ATTRS.iter().enumerate() {
                    v.push((Node::Attr(a, i), FileType::RegularFile, name.to_string()));
                }
            }
            _ => return None,
        }
        Some(v)
    }

    /// Runs a command that answers on a channel, waiting briefly for the answer.
    fn ask<T>(&self, make: impl FnOnce(crossbeam_channel::Sender<T>) -> Cmd) -> Option<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.net.send(make(tx));
        rx.recv_timeout(Duration::from_secs(10)).ok()
    }

    pub(crate) fn control_write(&self, which: u64, data: &[u8]) -> Result<(), Errno> {
        let text = String::from_utf8_lossy(data);
        let words: Vec<&str> = text
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|w| !w.is_empty())
            .collect();
        match which {
            DISCOVER => {
                self.net.send(Cmd::Discover);
                Ok(())
            }
            INTERFACES => {
                let list = words.iter().map(|w| w.to_string()).collect();
                match self.ask(|tx| Cmd::SetInterfaces(list, tx)) {
                    Some(Ok(())) => Ok(()),
                    Some(Err(e)) => {
                        lock(&self.shared).push_err(format!("interfaces: {e}"));
                        Err(Errno::EINVAL)
                    }
                    None => Err(Errno::EIO),
                }
            }
            REVALIDATE => {
                let [name] = words.as_slice() else {
                    return Err(Errno::EINVAL);
                };
                let dev: TargetAddr = name.parse().map_err(|_| Errno::EINVAL)?;
                match self.ask(|tx| Cmd::Revalidate(dev, tx)) {
                    Some(Ok(())) => Ok(()),
                    Some(Err(_)) => Err(Errno::ENODEV),
                    None => Err(Errno::EIO),
                }
            }
            FLUSH => {
                let which = match words.as_slice() {
                    [] => FlushWhich::Down,
                    ["all"] => FlushWhich::All,
                    names => FlushWhich::Named(
                        names
                            .iter()
                            .map(|n| n.parse::<TargetAddr>().map_err(|_| Errno::EINVAL))
                            .collect::<Result<_, _>>()?,
                    ),
                };
                self.ask(|tx| Cmd::Flush(which, tx)).ok_or(Errno::EIO)?;
                Ok(())
            }
            _ => Err(Errno::EACCES),
        }
    }
}

/// The node `name` names in directory `parent` if it is a device file (`eX.Y`, `eX.YpN`
/// under ROOT) or a device's attribute directory (`etherd!eX.Y` under `sysfs/block`), in
/// the one spelling `children` lists it by; whether it exists is the caller's check.
fn device_node(parent: u64, name: &str) -> Option<Node> {
    let canonical = |a: TargetAddr, s: &str| (a.to_string() == s).then_some(a);
    match parent {
        ROOT => {
            let (dev, part) = match name.split_once('p') {
                Some((d, p)) => (
                    d,
                    p.parse::<u32>()
                        .ok()
                        .filter(|n| *n > 0 && n.to_string() == p)?,
                ),
                None => (name, 0),
            };
            let a = canonical(dev.parse().ok()?, dev)?;
            (part <= 0xffff).then_some(Node::Dev(a, part))
        }
        SYSFS_BLOCK => {
            let dev = name.strip_prefix("etherd!")?;
            Some(Node::DevDir(canonical(dev.parse().ok()?, dev)?))
        }
        _ => None,
    }
}

/// Whether a device file opened with these `open(2)` flags is opened in the kernel's
/// direct I/O mode ([`AoeFs::open`]): `O_DIRECT` and write access.
fn direct_write_open(flags: i32) -> bool {
    flags & libc::O_DIRECT != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY
}

/// Start and length (sectors) of device `a`'s partition `p` (0: the whole device).
fn extent(e: &DevEntry, p: u32) -> Option<(u64, u64)> {
    if p == 0 {
        return Some((0, e.info.sectors));
    }
    e.partitions
        .iter()
        .find(|x| x.number == p)
        .map(|x| (x.start, x.sectors))
}

/// The bytes of attribute file `i` (see [`ATTRS`], and [`DEBUG_ATTR`]): text ending in a
/// newline like sysfs, but for `identify` (the raw page, empty before IDENTIFY answered).
fn attr_value(e: &DevEntry, i: usize) -> Option<Vec<u8>> {
    let info = &e.info;
    if i == DEBUG_ATTR {
        return Some(debug_text(e).into_bytes());
    }
    let v = match *ATTRS.get(i)? {
        "state" => state_text(info.state, e.kickme),
        // aoeblk.c `aoedisk_show_mac`: the first target's MAC ("%pm"), "none" without one.
        "mac" => info
            .targets
            .first()
            .map_or_else(|| "none".to_string(), |t| hex_mac(&t.mac.0)),
        // `aoedisk_show_netif`: the interfaces of all targets, "none" when there are none
        // (no target, or every interface it was reached through is gone).
        "netif" if info.interfaces.is_empty() => "none".to_string(),
        "netif" => info.interfaces.join(","),
        "firmware-version" => format!("0x{:04x}", info.firmware_version),
        "payload" => info.payload.to_string(),
        "size" => info.sectors.to_string(),
        "identify" => return Some(e.identify_page.clone().unwrap_or_default()),
        _ => return None,
    };
    Some((v + "\n").into_bytes())
}

/// `%pm`: six bytes in lower-case hex without separators.
fn hex_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect()
}

/// aoeblk.c `aoedisk_show_state`: "up" or "down", then ",kickme" if the device waits for
/// the network layer (`DEVFL_KICKME`, which wins), else ",closewait" if it is down and
/// open.
fn state_text(state: DeviceState, kickme: bool) -> String {
    let up = if state == DeviceState::Up {
        "up"
    } else {
        "down"
    };
    let why = if kickme {
        ",kickme"
    } else if state == DeviceState::DownCloseWait {
        ",closewait"
    } else {
        ""
    };
    format!("{up}{why}")
}

/// What aoeblk.c `aoedisk_debugfs_show` prints, for the values this initiator has:
/// `rttavg: N rttdev: N` (microseconds; the driver keeps one estimate per device, we keep
/// one per target MAC and show the first target's), `maxbcnt` (the payload), then per
/// target MAC `MAC:nout:maxout:nframes`, `\tssthresh:N`, `\ttaint:N` and a tab and its
/// interfaces. Left out, having no meaning here: `nskbpool`, `kicked`, `ref`, `falloc`,
/// `ffree` and the per-target `r`/`w` packet counts.
fn debug_text(e: &DevEntry) -> String {
    let info = &e.info;
    let (avg, dev) = info
        .targets
        .first()
        .map_or((0, 0), |t| (t.rtt_avg.as_micros(), t.rtt_dev.as_micros()));
    let mut s = format!("rttavg: {avg} rttdev: {dev}\nmaxbcnt: {}\n", info.payload);
    for t in &info.targets {
        s += &format!(
            "{}:{}:{}:{}\n\tssthresh:{}\n\ttaint:{}\n\t{}\n",
            hex_mac(&t.mac.0),
            t.nout,
            t.maxout,
            t.nframes,
            t.ssthresh,
            t.taint,
            t.interfaces.join(",")
        );
    }
    s
}

/// Bytes of one FUSE read or write request on a device file: a quarter of `dd bs=1M`'s
/// system call. Measured at MTU 9000 against `aoe serve` (`scripts/bench-initiator.sh`,
/// docs/PERFORMANCE.md, "The initiator's path"): smaller requests cost more requests per byte, larger ones leave
/// one request per system call and the link idle while it is answered.
pub(crate) const REQUEST_BYTES: u32 = 256 << 10;

/// Bytes of one FUSE write request (`max_write`), larger than [`REQUEST_BYTES`]: a buffered
/// write() goes through the kernel one request at a time, each sent only once the one
/// before is answered (fs/fuse/file.c `fuse_perform_write`; no `FUSE_WRITEBACK_CACHE`,
/// below), so each request waits for its slowest frame, and under loss that is a
/// retransmission. A `write()` of 1 MiB is one request (120 frames at MTU 9000) instead of
/// four one after the other: one tail to recover per MiB instead of four
/// (docs/PERFORMANCE.md, "Loss recovery through the relay", 2026-12-03 14:34). Reads stay
/// at [`REQUEST_BYTES`]: the kernel's `max_pages` follows this larger value, and a direct
/// read is cut at `max_read` (`fuse_direct_io`), which [`crate::mount`] sets.
///
/// Not `FUSE_WRITEBACK_CACHE` (the kernel caching buffered writes and writing dirty pages
/// back many at a time, as for a block device): it writes back whole pages, so a page one
/// file (the device, a partition, an NBD export) holds stale puts its stale bytes back over
/// a write made through another meanwhile. Tried (14:20 UTC): 88% of the loss-free rate at
/// MTU 9000 in one run, but `initiator_integrity.rs` `concurrent_unaligned_writes_all_land`
/// lost 8850 of 32768 bytes.
pub(crate) const WRITE_REQUEST_BYTES: u32 = 1 << 20;

/// Background (asynchronous) requests the kernel keeps in flight before it waits: a
/// direct I/O of 16 MiB in [`REQUEST_BYTES`] pieces (the kernel's default is 12, fuser's 16).
pub(crate) const MAX_BACKGROUND: u16 = 64;

impl AoeFs {
    /// The attributes of `name` in directory `parent`, if it exists.
    pub(crate) fn lookup_attr(&self, parent: u64, name: &str) -> Option<FileAttr> {
        // Device and attribute-directory names are parsed, not searched for: a lookup
        // costs the same with one device or `--max-devices` of them.
        match device_node(parent, name) {
            Some(n) => self.getattr_node(n),
            None => self
                .children(parent)
                .and_then(|c| c.into_iter().find(|(_, _, n)| n == name))
                .and_then(|(n, _, _)| self.getattr_node(n)),
        }
    }

    /// A `SETATTR` of inode `ino` (the fuser callback and the ring's side thread): its
    /// attributes as they are, for nothing here changes a mode, an owner or a time. A size
    /// is a block device's: `truncate(2)` and `ftruncate(2)` of a device or partition file
    /// to another size fail with `EINVAL`, as on a block device (fs/open.c
    /// `vfs_truncate`/`do_ftruncate` refuse anything but a regular file), where they used to
    /// succeed and change nothing. `open(O_TRUNC)` must go on working as on /dev/sdX (where
    /// it is ignored: `dd of=ROOT/eX.Y` without `conv=notrunc`); without
    /// `FUSE_ATOMIC_O_TRUNC` (fuser does not ask for it) the kernel sends it as a size-0
    /// `SETATTR` without a file handle (fs/fuse/dir.c `fuse_do_setattr`, `ATTR_OPEN`), the
    /// same as `truncate(path, 0)`, so that one is taken and ignored; `ftruncate` carries
    /// its handle (`FATTR_FH`) and is refused at any other size (GNU dd's cut at its `seek=`
    /// without `conv=notrunc` too: dd 9 says so and writes; /dev/sdX's refusal it ignores only
    /// because that is no regular file). A size equal to the
    /// device's changes nothing and is taken. Control files take any size, so that
    /// `echo > file` works.
    pub(crate) fn setattr_node(
        &self,
        ino: u64,
        size: Option<u64>,
        has_fh: bool,
    ) -> Result<FileAttr, Errno> {
        let n = node(ino).ok_or(Errno::ENOENT)?;
        let a = self.getattr_node(n).ok_or(Errno::ENOENT)?;
        if let (Node::Dev(..), Some(size)) = (n, size) {
            let open_trunc = size == 0 && !has_fh;
            if size != a.size && !open_trunc {
                return Err(Errno::EINVAL);
            }
        }
        Ok(a)
    }

    /// Opens inode `ino` with `open(2)` flags `flags`: the file handle and open flags to
    /// answer ([`Filesystem::open`] of [`AoeFs`] says which).
    pub(crate) fn open_node(&self, ino: u64, flags: i32) -> Result<(u64, FopenFlags), Errno> {
        match node(ino) {
            Some(Node::Dev(a, p)) => {
                {
                    let mut s = lock(&self.shared);
                    if !s.devices.contains_key(&a) {
                        return Err(Errno::ENOENT);
                    }
                    *s.open_files.entry((a, p)).or_insert(0) += 1;
                }
                self.net.send(Cmd::SetOpen(a, true));
                // Its I/O comes from a source of its own, given back at its release.
                let slot = self.openers.open();
                if direct_write_open(flags) {
                    Ok((
                        file_handle(slot, true),
                        FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
                    ))
                } else {
                    *self.cached_opens().entry(ino).or_insert(0) += 1;
                    Ok((file_handle(slot, false), FopenFlags::empty()))
                }
            }
            // Control and attribute files have no fixed size: bypass the page cache.
            Some(_) => Ok((
                0,
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_NONSEEKABLE,
            )),
            None => Err(Errno::ENOENT),
        }
    }

    /// The release of an open of inode `ino` with file handle `fh`.
    pub(crate) fn release_node(&self, ino: u64, fh: u64) {
        if let Some(Node::Dev(a, p)) = node(ino) {
            self.openers.release(fh);
            if !is_direct(fh) {
                let mut c = self.cached_opens();
                if let Some(n) = c.get_mut(&ino) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        c.remove(&ino);
                    }
                }
            }
            {
                let mut s = lock(&self.shared);
                if let Some(n) = s.open_files.get_mut(&(a, p)) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        s.open_files.remove(&(a, p));
                    }
                }
            }
            self.net.send(Cmd::SetOpen(a, false));
        }
    }

    /// The entries of directory `ino` (`.` and `..` first), or None if it is none.
    pub(crate) fn dir_entries(&self, ino: u64) -> Option<Vec<(u64, FileType, String)>> {
        let children = self.children(ino)?;
        let mut all = vec![
            (ino, FileType::Directory, ".".to_string()),
            (ROOT, FileType::Directory, "..".to_string()),
        ];
        all.extend(
            children
                .into_iter()
                .map(|(n, k, name)| (self::ino(n), k, name)),
        );
        Some(all)
    }
}

impl Filesystem for AoeFs {
    /// Asks for `FUSE_ASYNC_DIO` where the kernel has it: a direct read or write longer
    /// than one request goes out as that many requests at once, all in flight together,
    /// instead of one after the other (fs/fuse/file.c `fuse_direct_io`,
    /// `fuse_async_req_send`). And makes one request `REQUEST_BYTES` (the kernel's
    /// `max_pages` follows the larger of `max_write` and `max_readahead`), so that `dd bs=1M
    /// iflag=direct`, one system call at a time, still has 4 requests in flight: the first
    /// quarter is answered (copied into the reader's pages) while the rest is on the wire,
    /// instead of the whole MiB waiting for its last frame and the link idling while it is
    /// copied. `MAX_BACKGROUND` lets a larger direct I/O keep all its requests in flight.
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Without it (a kernel before 3.13) long direct I/O goes one request at a time.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        // A shared mapping of a file opened in the direct I/O mode ([`AoeFs::open`]) is
        // refused (ENODEV) without it, where it worked when every open was cached; with it
        // the mapping puts the inode in the cached mode, so direct writes go one at a time
        // again while it lasts (fs/fuse/file.c `fuse_file_mmap`).
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        // Each refuses only a value beyond what the kernel offered (read-ahead) or fuser's
        // buffer holds (write); the kernel's own smaller value then stands.
        let _ = config.set_max_write(WRITE_REQUEST_BYTES);
        let _ = config.set_max_readahead(REQUEST_BYTES);
        let _ = config.set_max_background(MAX_BACKGROUND);
        // Offered only while /sys/module/fuse/parameters/enable_uring is Y; refused, the
        // ring's registration says why (crate::ring::RingThread::start).
        if self.uring {
            let _ = config.add_capabilities(InitFlags::FUSE_OVER_IO_URING);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        match self.lookup_attr(parent.0, name) {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match node(ino.0).and_then(|n| self.getattr_node(n)) {
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
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.setattr_node(ino.0, size, fh.is_some()) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    /// A device file opened with `O_DIRECT` for writing is opened in the kernel's direct
    /// I/O mode (`FOPEN_DIRECT_IO`) with `FOPEN_PARALLEL_DIRECT_WRITES`: its writes then take
    /// the inode lock shared, so fio's 32 writes in flight reach us together
    /// (fs/fuse/file.c `fuse_direct_write_iter`, `fuse_dio_lock`), where an `O_DIRECT`
    /// write to a file in the cached mode takes it exclusively and goes to us one at a
    /// time (`fuse_cache_write_iter`). The kernel falls back to the exclusive lock by
    /// itself while any open of the inode is in the cached mode (`FUSE_I_CACHE_IO_MODE`,
    /// fs/fuse/iomode.c), and a cached open waits for the parallel writes in flight. It
    /// drops the cached pages of a direct write's range before sending it; pages a cached
    /// opener reads back while the write is in flight are dropped by us just after it is
    /// answered (`invalidator`), as `generic_file_direct_write` does for a cached-mode
    /// synchronous direct write (before its return there; after the answer here, which
    /// must not wait on the page cache). Opens without `O_DIRECT`, and read-only ones, stay cached: buffered I/O and
    /// read-ahead work, and a synchronous direct read of more than one request keeps
    /// `FUSE_ASYNC_DIO`'s requests in flight together (the direct mode sends a
    /// synchronous read's requests one after the other, `fuse_direct_read_iter`).
    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.open_node(ino.0, flags.0) {
            Ok((fh, f)) => reply.opened(FileHandle(fh), f),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.release_node(ino.0, fh.0);
        reply.ok();
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Each answer is built under the shared lock and sent after it is released: the
        // reply is a write(2) to /dev/fuse that wakes the reader, who may take this CPU at
        // once, and the network thread must not wait for the lock meanwhile (an observer
        // reading attributes 20 times a second must not stall the I/O it observes).
        match node(ino.0) {
            Some(Node::Fixed(ERR)) => {
                let mut s = lock(&self.shared);
                let line = s.err.pop_front();
                match line {
                    Some(line) => {
                        drop(s);
                        reply.data(line.as_bytes())
                    }
                    // aoechr.c `aoechr_read`: O_NDELAY and nothing queued is EAGAIN.
                    None if flags.0 & libc::O_NONBLOCK != 0 => {
                        drop(s);
                        reply.error(Errno::EAGAIN)
                    }
                    // Blocks until a line arrives, like `cat /dev/etherd/err`.
                    None => s.err_waiters.push((req.pid(), Box::new(ErrReply(reply)))),
                }
            }
            Some(Node::Fixed(INTERFACES)) => {
                let text = {
                    let s = lock(&self.shared);
                    if s.iflist.is_empty() {
                        String::new()
                    } else {
                        s.iflist.join(" ") + "\n"
                    }
                };
                reply.data(slice_at(text.as_bytes(), offset, size));
            }
            Some(Node::Attr(a, i)) => match self.attr_bytes(a, i) {
                Some(v) => reply.data(slice_at(&v, offset, size)),
                None => reply.error(Errno::ENOENT),
            },
            Some(Node::Dev(a, p)) if self.reply_fd.get().is_some() => {
                self.read_dev_held(a, p, fh.0, offset, size, req.unique().0, reply)
            }
            Some(Node::Dev(a, p)) => {
                let net = self.net.clone();
                self.read_dev(
                    a,
                    p,
                    fh.0,
                    offset,
                    size,
                    None,
                    Box::new(move |r| match r {
                        Ok(d) => {
                            reply.data(&d);
                            net.recycle(d);
                        }
                        Err(e) => reply.error(e),
                    }),
                )
            }
            Some(Node::Fixed(_)) => reply.data(&[]),
            _ => reply.error(Errno::EISDIR),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match node(ino.0) {
            Some(Node::Fixed(which @ (DISCOVER | INTERFACES | REVALIDATE | FLUSH))) => {
                match self.control_write(which, data) {
                    Ok(()) => reply.written(data.len() as u32),
                    Err(e) => reply.error(e),
                }
            }
            Some(Node::Dev(a, p)) => {
                // A direct-I/O write while the inode is also open cached: its range is
                // invalidated once it has landed and been answered ([`invalidator`]).
                let inval =
                    (is_direct(fh.0) && self.cached_opens().contains_key(&ino.0)).then_some(ino.0);
                self.write_dev(
                    a,
                    p,
                    fh.0,
                    offset,
                    data.len(),
                    |n| Lent::owned(data[..n].to_vec()),
                    inval,
                    Box::new(move |r| match r {
                        Ok(n) => reply.written(n),
                        Err(e) => reply.error(e),
                    }),
                )
            }
            _ => reply.error(Errno::EACCES),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match node(ino.0) {
            Some(Node::Dev(a, _)) => self.flush_dev(
                a,
                fh.0,
                Box::new(move |r| match r {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(e),
                }),
            ),
            _ => reply.ok(),
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.size(0);
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

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(all) = self.dir_entries(ino.0) else {
            return reply.error(Errno::ENOTDIR);
        };
        for (i, (ino, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }
}

pub(crate) fn slice_at(b: &[u8], offset: u64, size: u32) -> &[u8] {
    let start = (offset as usize).min(b.len());
    let end = start.saturating_add(size as usize).min(b.len());
    &b[start..end]
}

impl AoeFs {
    /// Device extent (start, length) in sectors, or an errno.
    fn dev_extent(&self, a: TargetAddr, p: u32) -> Result<(u64, u64), Errno> {
        let s = lock(&self.shared);
        let e = s.devices.get(&a).ok_or(Errno::ENODEV)?;
        extent(e, p).ok_or(Errno::ENODEV)
    }

    /// A read of a device or partition file: the covering sectors, sliced
    /// ([`BlockDevice::read`], which holds them shared against a read-modify-write).
    ///
    /// `done` gets the bytes (to be handed back to [`Handle::recycle`] once answered): in
    /// `into` where given ([`BlockDevice::read_into`]; dropped unused, it goes home). `fh`
    /// is the open's file handle: its source ([`crate::openers`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn read_dev(
        &self,
        a: TargetAddr,
        p: u32,
        fh: u64,
        offset: u64,
        size: u32,
        into: Option<Lent>,
        done: DevDone<Vec<u8>>,
    ) {
        let (start, len) = match self.dev_extent(a, p) {
            Ok(x) => x,
            Err(e) => return done(Err(e)),
        };
        let end = len * 512;
        if offset >= end || size == 0 {
            return done(Ok(Vec::new()));
        }
        let want = (size as u64).min(end - offset) as usize;
        let bd = BlockDevice::new(self.openers.handle(fh).clone(), a, start);
        let done: aoe_initiator::blockdev::Cb<Vec<u8>> =
            Box::new(move |r| done(r.map_err(Errno::from_i32)));
        match into {
            Some(buf) => bd.read_into(offset, want, buf, done),
            None => bd.read(offset, want, done),
        }
    }

    /// A read of a device or partition file answered from the receive ring: the covering
    /// sectors are read with [`BlockDevice::read_held`] (held shared against a
    /// read-modify-write, as [`read_dev`](Self::read_dev)), and on the network thread, while
    /// their payloads are still in the ring's slots, the reply to request `unique` is
    /// written from them on the /dev/fuse fd ([`heldreply::write_reply_gathered`]: small
    /// frames gathered into one buffer first); the slots go
    /// back to the kernel when that returns. Errors go through `reply` as before.
    #[allow(clippy::too_many_arguments)]
    fn read_dev_held(
        &self,
        a: TargetAddr,
        p: u32,
        fh: u64,
        offset: u64,
        size: u32,
        unique: u64,
        reply: ReplyData,
    ) {
        let (start, len) = match self.dev_extent(a, p) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let end = len * 512;
        if offset >= end || size == 0 {
            return reply.data(&[]);
        }
        // A read crossing the end is answered short (a READ's reply may be).
        let want = (size as u64).min(end - offset) as usize;
        let fd = self.reply_fd.clone();
        BlockDevice::new(self.openers.handle(fh).clone(), a, start).read_held(
            offset,
            want,
            Box::new(move |r| match r {
                Ok(pieces) => answer_held(&fd, unique, pieces, reply),
                Err(e) => reply.error(Errno::from_i32(e)),
            }),
        );
    }

    /// FLUSH CACHE EXT on device `a` (fsync of a device file opened with handle `fh`).
    pub(crate) fn flush_dev(&self, a: TargetAddr, fh: u64, done: DevDone<()>) {
        self.openers.handle(fh).io(
            a,
            BlockOp::Flush,
            Box::new(move |r| done(r.map(|_| ()).map_err(Errno::from_i32))),
        )
    }

    /// The handle on the network thread.
    pub(crate) fn net(&self) -> &Handle {
        &self.net
    }

    /// The state shared with the network thread.
    pub(crate) fn shared(&self) -> &Arc<Mutex<Shared>> {
        &self.shared
    }

    /// Hands a read's buffer back to the engine ([`Handle::recycle`]).
    pub(crate) fn recycle(&self, buf: Vec<u8>) {
        self.net.recycle(buf);
    }

    /// A write to a device or partition file at any offset and length
    /// ([`BlockDevice::write`]: the partial sectors of an unaligned write are read, patched and
    /// written back under an exclusive hold of the covering sectors, shared with the NBD
    /// server, so concurrent writers to one sector through any file or export all land).
    ///
    /// `inval`: the inode whose cached pages of the range are dropped after the answer
    /// ([`invalidator`]). The sectors written are dropped from the cache of every other
    /// device or partition file of the device open cached too, after the answer
    /// ([`CachedPages`]).
    ///
    /// `data(n)` gives the first `n` of the `len` bytes written (cut at the device's end),
    /// called at most once: a copy, or a lent buffer ([`Lent`], handed to the engine as it
    /// is: FUSE over io_uring, [`crate::ring`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_dev(
        &self,
        a: TargetAddr,
        p: u32,
        fh: u64,
        offset: u64,
        len: usize,
        data: impl FnOnce(usize) -> Lent,
        inval: Option<u64>,
        reply: DevDone<u32>,
    ) {
        let (start, dlen) = match self.dev_extent(a, p) {
            Ok(x) => x,
            Err(e) => return reply(Err(e)),
        };
        let end = dlen * 512;
        if offset >= end {
            return reply(Err(Errno::ENOSPC));
        }
        // A write reaching past the end is cut at the end and reported short.
        let n = (len as u64).min(end - offset) as usize;
        let written = n as u32;
        // The invalidator's sender only for the writes that need it, not every write.
        let inval = inval.map(|ino| (ino, self.invalidate.clone()));
        let (pages, own) = (self.pages.clone(), ino(Node::Dev(a, p)));
        let (first, count, _) = aoe_initiator::blockdev::covering(offset, n as u64);
        BlockDevice::new(self.openers.handle(fh).clone(), a, start).write_lent(
            offset,
            data(n),
            Box::new(move |r| {
                match r {
                    Ok(()) => reply(Ok(written)),
                    Err(e) => reply(Err(Errno::from_i32(e))),
                }
                // A failed write may have landed in part: dropping more is always safe.
                if let Some((ino, invalidate)) = inval {
                    invalidate.0.push(ino, offset, n as u64);
                }
                for (ino, off, len) in pages.ranges(a, start + first, count, Some(own)) {
                    pages.queue.push(ino, off, len);
                }
            }),
        );
    }
}

/// Answers READ request `unique` with `pieces` (slices of the receive ring, valid during
/// this call) written on the /dev/fuse fd in `fd`, then retires fuser's `reply` for it.
///
/// Retiring: fuser's [`ReplyData`] must be consumed (dropped unanswered it answers EIO from
/// its `Drop`, and forgetting it would keep a reference to the session's fd for good), and it
/// offers no way to give up without writing. So it answers `EIO` after ours: the kernel has
/// already taken our reply, which ended the request and took it off the processing list, so
/// it refuses this one with `ENOENT` and nothing else happens (fs/fuse/dev.c
/// `fuse_dev_do_write`; request ids are never reused, so it cannot land on a later request).
/// fuser logs that refusal at its `fuser::reply` target, which `aoe`'s logging keeps quiet
/// (aoe-cli `init_logging`). Where our write failed (the request already gone: `ENOENT` for
/// both), the same `EIO` is the answer. One 16-byte write per request (256 KiB), against the
/// copy of the whole read it replaces.
fn answer_held(fd: &OnceLock<OwnedFd>, unique: u64, pieces: &[&[u8]], reply: ReplyData) {
    let Some(fd) = fd.get() else {
        return reply.data(&pieces.concat());
    };
    // Runs on the network thread, one reply at a time: one gather buffer for all of them.
    thread_local! {
        static GATHER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let written = GATHER.with(|b| match b.try_borrow_mut() {
        Ok(mut b) => heldreply::write_reply_gathered(fd.as_fd(), unique, pieces, &mut b),
        Err(_) => heldreply::write_reply(fd.as_fd(), unique, pieces),
    });
    match written {
        Ok(()) => reply.error(Errno::EIO),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => reply.data(&pieces.concat()),
        Err(e) => {
            tracing::debug!("device read reply {unique}: {e}");
            reply.error(Errno::EIO)
        }
    }
}

/// The completion of a device-file read or write: the answer, or the errno.
pub(crate) type DevDone<T> = Box<dyn FnOnce(Result<T, Errno>) + Send>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_to_the_nodes_listed() {
        let a = TargetAddr::new(7, 3);
        assert_eq!(device_node(ROOT, "e7.3"), Some(Node::Dev(a, 0)));
        assert_eq!(device_node(ROOT, "e7.3p12"), Some(Node::Dev(a, 12)));
        assert_eq!(
            device_node(SYSFS_BLOCK, "etherd!e7.3"),
            Some(Node::DevDir(a))
        );
        for other in [
            "e07.3",
            "7.3",
            "e7.3p",
            "e7.3p0",
            "e7.3p01",
            "e7.3p70000",
            "err",
            "e65535.1",
        ] {
            assert_eq!(device_node(ROOT, other), None, "{other}");
        }
        assert_eq!(device_node(SYSFS_BLOCK, "e7.3"), None);
        assert_eq!(device_node(SYSFS, "block"), None);
    }

    /// Only `O_DIRECT` opens with write access go to the kernel's direct I/O mode.
    #[test]
    fn direct_mode_for_direct_writable_opens() {
        use libc::{O_DIRECT, O_RDONLY, O_RDWR, O_WRONLY};
        assert!(direct_write_open(O_DIRECT | O_RDWR));
        assert!(direct_write_open(O_DIRECT | O_WRONLY | libc::O_SYNC));
        assert!(!direct_write_open(O_DIRECT | O_RDONLY));
        assert!(!direct_write_open(O_RDWR));
        assert!(!direct_write_open(O_WRONLY));
    }

    #[test]
    fn inode_numbers_round_trip() {
        for n in [
            Node::Fixed(ERR),
            Node::Dev(TargetAddr::new(65534, 254), 0),
            Node::Dev(TargetAddr::new(7, 3), 128),
            Node::DevDir(TargetAddr::new(0, 0)),
            Node::Attr(TargetAddr::new(65534, 254), 5),
        ] {
            assert_eq!(node(ino(n)), Some(n));
        }
    }

    fn entry() -> DevEntry {
        use aoe_proto::initiator::{DeviceInfo, DeviceStats, TargetInfo};
        let t = TargetInfo {
            mac: aoe_wire::MacAddr([2, 0xbb, 0, 0, 0, 1]),
            interfaces: vec!["eth0".into(), "eth1".into()],
            buffer_count: 16,
            nframes: 16,
            maxout: 9,
            ssthresh: 8,
            nout: 3,
            max_nout: 9,
            taint: 2,
            rtt_avg: Duration::from_micros(250),
            rtt_dev: Duration::from_micros(40),
            rto: Duration::from_millis(50),
            retransmits: 0,
            answers: 7,
            fast_retransmits: 0,
            overtaking_answers: 0,
            tail_probes: 0,
            window_cuts: 0,
            spurious: 0,
            vetting: aoe_proto::initiator::Vetting::Path,
        };
        DevEntry {
            info: DeviceInfo {
                addr: TargetAddr::new(7, 3),
                state: DeviceState::Up,
                sectors: 100,
                identify: None,
                firmware_version: 0x4019,
                config: Vec::new(),
                payload: 1024,
                targets: vec![t],
                interfaces: vec!["eth0".into(), "eth1".into()],
                open: false,
                ops_outstanding: 0,
                stats: DeviceStats::default(),
            },
            partitions: Vec::new(),
            loop_device: None,
            identify_page: None,
            kickme: false,
        }
    }

    fn text(e: &DevEntry, name: &str) -> String {
        let i = ATTRS.iter().position(|a| *a == name).unwrap();
        String::from_utf8(attr_value(e, i).unwrap()).unwrap()
    }

    /// aoeblk.c: `mac` and `netif` say "none" without a target or interface.
    #[test]
    fn mac_and_netif_none() {
        let mut e = entry();
        assert_eq!(text(&e, "mac"), "02bb00000001\n");
        assert_eq!(text(&e, "netif"), "eth0,eth1\n");
        e.info.interfaces.clear();
        assert_eq!(text(&e, "netif"), "none\n");
        e.info.targets.clear();
        assert_eq!(text(&e, "mac"), "none\n");
    }

    /// `aoedisk_show_state`: ",kickme" wins over ",closewait".
    #[test]
    fn state_kickme_and_closewait() {
        let mut e = entry();
        assert_eq!(text(&e, "state"), "up\n");
        e.kickme = true;
        assert_eq!(text(&e, "state"), "up,kickme\n");
        e.info.state = DeviceState::DownCloseWait;
        assert_eq!(text(&e, "state"), "down,kickme\n");
        e.kickme = false;
        assert_eq!(text(&e, "state"), "down,closewait\n");
        e.info.state = DeviceState::Down;
        assert_eq!(text(&e, "state"), "down\n");
    }

    /// The debug file has `aoedisk_debugfs_show`'s lines; `identify` is the raw page.
    #[test]
    fn debug_and_identify() {
        let mut e = entry();
        let d = String::from_utf8(attr_value(&e, DEBUG_ATTR).unwrap()).unwrap();
        assert_eq!(
            d,
            "rttavg: 250 rttdev: 40\nmaxbcnt: 1024\n02bb00000001:3:9:16\n\tssthresh:8\n\ttaint:2\n\teth0,eth1\n"
        );
        let i = ATTRS.iter().position(|a| *a == "identify").unwrap();
        assert_eq!(attr_value(&e, i), Some(Vec::new()));
        e.identify_page = Some((0..=255u8).cycle().take(512).collect());
        assert_eq!(attr_value(&e, i).unwrap().len(), 512);
        assert_eq!(
            node(ino(Node::Attr(e.info.addr, DEBUG_ATTR))),
            Some(Node::Attr(e.info.addr, DEBUG_ATTR))
        );
    }
}
