//! A Ceph RBD image as the backing store of an AoE export.
//!
//! Layer: beside `aoe-store`'s file backend, on the safe types of `aoe-rbd-sys` (no `unsafe`
//! here). [`RbdBackend::open`] connects to the cluster, opens the image and, for a writable
//! export of an image with the exclusive-lock feature, takes that lock and keeps it: the
//! fencing that lets two `aoe serve` gateways export one image safely, as Ceph's iSCSI
//! gateways (tcmu-runner's rbd handler) do.
//!
//! Failover: a gateway that finds the lock held breaks it. librbd blocklists the holder
//! before it breaks the lock (Ceph's `rbd_blocklist_on_break_lock`, on by default), so a
//! gateway that was only slow, not dead, can no longer write. It notices without waiting for
//! a write: a monitor thread per image asks the cluster who holds the lock every
//! [`MONITOR_INTERVAL`] (sooner when librbd's update watch reports a header change), and an
//! owner that is not this client, or `EBLOCKLISTED`, fences it; a write that fails with
//! `EBLOCKLISTED` or `EROFS` first does the same. A fenced gateway logs once that it lost the
//! lock, answers every later write with an ATA error and reports itself failed
//! ([`RbdBackend::lock_lost`], `Backend::failed`). So the newest gateway wins and the old
//! one never writes behind its back. The same monitor re-reads the image's size
//! ([`RbdBackend::size_seen`]), which the daemon announces; AoE reservations are kept in the
//! image's metadata ([`RESERVE_KEY`]) so that they survive a failover.
//!
//! I/O: reads, writes and flushes are librbd aio calls waited for on the store's worker
//! threads, so as many requests are in flight against the cluster as `aoe serve` has workers
//! (`--workers`). Errors keep their errno and reach the initiator as ATA errors through
//! `aoe_store::StoreError`. librbd's cache is off, so an acknowledged write is on the OSDs
//! and survives the gateway. No OSD timeout is set: while the cluster is away I/O waits in
//! librbd, and the initiator retransmits, so service resumes when the cluster comes back.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use aoe_rbd_sys::{errno, Cluster, Image};
use aoe_store::Backend;

/// `EBLOCKLISTED` in Ceph is `ESHUTDOWN`.
const EBLOCKLISTED: i32 = libc::ESHUTDOWN;

/// Which image, and how to reach its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdOptions {
    /// The pool.
    pub pool: String,
    /// The RADOS namespace in the pool, if any.
    pub namespace: Option<String>,
    /// The image.
    pub image: String,
    /// ceph.conf; `None`: librados's search (`$CEPH_CONF`, /etc/ceph/ceph.conf).
    pub ceph_conf: Option<PathBuf>,
    /// The cephx client id, without `client.`; `None`: `admin`.
    pub client_id: Option<String>,
    /// The keyring; `None`: the one ceph.conf names.
    pub keyring: Option<PathBuf>,
    /// How long to wait for the monitors at start (`client_mount_timeout`, and
    /// `rados_mon_op_timeout` for the pool, image and lock calls).
    pub connect_timeout: Duration,
    /// Open for reading only: no lock is taken and writes are refused.
    pub read_only: bool,
}

impl RbdOptions {
    /// `rbd:POOL/IMAGE` or `rbd:POOL/NAMESPACE/IMAGE`, as the operator writes it.
    pub fn name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("rbd:{}/{ns}/{}", self.pool, self.image),
            None => format!("rbd:{}/{}", self.pool, self.image),
        }
    }
}

/// Why an image cannot be exported: one line each, naming the cause and the thing to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// No monitor answered in time (or the config names none).
    #[error(
        "{name}: cannot reach the Ceph cluster within {timeout:?} (monitors in {conf}): {error}"
    )]
    Unreachable {
        /// The export's name.
        name: String,
        /// The config.
        conf: String,
        /// The timeout.
        timeout: Duration,
        /// librados's error.
        error: io::Error,
    },
    /// cephx refused the client, or its caps do not cover the pool or image.
    #[error("{name}: permission denied for client.{client} (check its keyring and caps): {error}")]
    PermissionDenied {
        /// The export's name.
        name: String,
        /// The client id.
        client: String,
        /// librados's or librbd's error.
        error: io::Error,
    },
    /// The pool does not exist.
    #[error("{name}: no such pool {pool}")]
    NoPool {
        /// The export's name.
        name: String,
        /// The pool.
        pool: String,
    },
    /// The image does not exist.
    #[error("{name}: no such image")]
    NoImage {
        /// The export's name.
        name: String,
    },
    /// Anything else (a bad config file, a lock that could not be taken, ...).
    #[error("{name}: {error}")]
    Other {
        /// The export's name.
        name: String,
        /// What failed.
        error: io::Error,
    },
}

/// An open RBD image serving an export.
#[derive(Debug)]
pub struct RbdBackend {
    shared: Arc<Shared>,
    /// The monitor thread, joined on drop so that the image (and its lock) is closed then.
    monitor: Option<std::thread::JoinHandle<()>>,
}

/// What the I/O path and the monitor thread share.
#[derive(Debug)]
struct Shared {
    name: String,
    image: Image,
    read_only: bool,
    /// Size at open, or as last read: what `len` answers if the cluster cannot be asked.
    size: AtomicU64,
    /// Set when the exclusive lock was lost: writes are refused from then on.
    fenced: AtomicBool,
    /// True if we took the exclusive lock at open: the monitor then checks we still hold it.
    locked: bool,
    /// Our RADOS session's addresses (`rados_getaddrs`), to find ourselves among the lock's
    /// owners.
    addrs: String,
    /// Wakes the monitor thread early: set by librbd's update callback, and by Drop (with
    /// `stop`).
    wake: Mutex<bool>,
    wake_cv: Condvar,
    stop: AtomicBool,
}

/// How often the monitor thread asks the cluster who holds the image's lock, and re-reads
/// the image's size, when no update notification came sooner.
pub const MONITOR_INTERVAL: Duration = Duration::from_secs(1);

/// The image metadata key (`rbd image-meta get IMAGE aoe.reserve`) that holds the AoE
/// Reserve/Release list of an `rbd:` export: MAC addresses, comma-separated; unset when the
/// image is not reserved. Kept in the cluster, so every gateway of the image enforces the
/// same reservation, including one that takes over from a dead gateway.
pub const RESERVE_KEY: &str = "aoe.reserve";

impl RbdBackend {
    /// Connects, opens the image and, for a writable export of an image with the
    /// exclusive-lock feature, takes its lock, breaking (and so blocklisting) a previous
    /// holder's: see the crate documentation for the failover this gives.
    pub fn open(o: &RbdOptions) -> Result<RbdBackend, OpenError> {
        let name = o.name();
        let client = o.client_id.clone().unwrap_or_else(|| "admin".into());
        let secs = o.connect_timeout.as_secs().max(1).to_string();
        let keyring = o.keyring.as_ref().map(|k| k.display().to_string());
        let mut options = vec![
            ("client_mount_timeout", secs.as_str()),
            ("rados_mon_op_timeout", secs.as_str()),
            // No write-back cache in this process: a write is acknowledged to the initiator
            // only once the OSDs have it, so a gateway killed with SIGKILL loses no
            // acknowledged write (librbd's cache turns write-back after the first flush).
            ("rbd_cache", "false"),
        ];
        if let Some(k) = &keyring {
            options.push(("keyring", k.as_str()));
        }
        let classify = |error: io::Error, what: &str| match errno(&error) {
            Some(libc::EACCES) | Some(libc::EPERM) => OpenError::PermissionDenied {
                name: name.clone(),
                client: client.clone(),
                error,
            },
            Some(libc::ETIMEDOUT) => OpenError::Unreachable {
                name: name.clone(),
                conf: o
                    .ceph_conf
                    .as_ref()
                    .map_or("the default ceph.conf".into(), |c| c.display().to_string()),
                timeout: o.connect_timeout,
                error,
            },
            Some(libc::ENOENT) if what == "pool" => OpenError::NoPool {
                name: name.clone(),
                pool: o.pool.clone(),
            },
            Some(libc::ENOENT) if what == "image" => OpenError::NoImage { name: name.clone() },
            _ => OpenError::Other {
                name: name.clone(),
                error,
            },
        };
        let cluster = Cluster::connect(o.client_id.as_deref(), o.ceph_conf.as_deref(), &options)
            .map_err(|e| classify(e, "connect"))?;
        let io = Arc::new(
            Arc::new(cluster)
                .ioctx(&o.pool, o.namespace.as_deref())
                .map_err(|e| classify(e, "pool"))?,
        );
        let image = io.open(&o.image).map_err(|e| classify(e, "image"))?;
        let size = image.size().map_err(|e| classify(e, "size"))?;
        let locked = !o.read_only
            && image
                .has_exclusive_lock()
                .map_err(|e| classify(e, "lock"))?;
        let addrs = image.client_addrs().map_err(|e| classify(e, "addrs"))?;
        let shared = Arc::new(Shared {
            name: name.clone(),
            image,
            read_only: o.read_only,
            size: AtomicU64::new(size),
            fenced: AtomicBool::new(false),
            locked,
            addrs,
            wake: Mutex::new(false),
            wake_cv: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        if locked {
            shared.take_lock().map_err(|e| classify(e, "lock"))?;
        }
        // librbd calls back on every header change (resize, metadata, lock traffic, and after
        // it re-registered its watch, as it does once this client is blocklisted): the monitor
        // then looks at once instead of at its next tick. The callback holds only a weak
        // reference, so the image can close.
        let weak = Arc::downgrade(&shared);
        shared
            .image
            .watch_updates(Box::new(move || {
                if let Some(s) = weak.upgrade() {
                    s.wake();
                }
            }))
            .map_err(|e| classify(e, "watch"))?;
        let monitor = shared.clone();
        let monitor = std::thread::Builder::new()
            .name("rbd-monitor".into())
            .spawn(move || monitor.monitor())
            .map_err(|e| classify(e, "thread"))?;
        Ok(RbdBackend {
            shared,
            monitor: Some(monitor),
        })
    }

    /// The export's name, `rbd:POOL/IMAGE`.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.len() / 512
    }

    /// The image's size in bytes as the monitor thread last read it (at most
    /// [`MONITOR_INTERVAL`] old, sooner after an update notification): no call to the
    /// cluster, so the daemon's event loop can ask it on its timer and announce a resize.
    pub fn size_seen(&self) -> u64 {
        self.shared.size.load(Ordering::Relaxed)
    }

    /// True once this gateway lost the image's exclusive lock (another gateway broke it):
    /// every write is refused from then on. Noticed by the monitor thread within about
    /// [`MONITOR_INTERVAL`], with no write needed.
    pub fn lock_lost(&self) -> bool {
        self.shared.fenced.load(Ordering::SeqCst)
    }

    /// The reservation kept in the image ([`RESERVE_KEY`]): empty if not reserved. Asks the
    /// cluster (blocking).
    pub fn reservation(&self) -> io::Result<Vec<[u8; 6]>> {
        match self.shared.image.metadata_get(RESERVE_KEY)? {
            None => Ok(Vec::new()),
            Some(v) => parse_macs(&v).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("image metadata {RESERVE_KEY} is not a MAC list: {v:?}"),
                )
            }),
        }
    }

    /// Stores the reservation in the image ([`RESERVE_KEY`]; removed when `macs` is empty),
    /// waiting until the cluster has it. A gateway that lost the lock is refused (`EROFS`):
    /// only the lock holder changes the image's state.
    pub fn set_reservation(&self, macs: &[[u8; 6]]) -> io::Result<()> {
        if self.shared.read_only || self.lock_lost() {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let r = if macs.is_empty() {
            self.shared.image.metadata_remove(RESERVE_KEY)
        } else {
            self.shared
                .image
                .metadata_set(RESERVE_KEY, &format_macs(macs))
        };
        r.map_err(|e| match errno(&e) {
            Some(libc::EROFS) | Some(EBLOCKLISTED) => self.shared.fence(&e),
            _ => e,
        })
    }
}

/// `aa:bb:cc:dd:ee:ff,...`.
fn format_macs(macs: &[[u8; 6]]) -> String {
    macs.iter()
        .map(|m| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The inverse of [`format_macs`]; `None` if any entry is not a MAC address.
fn parse_macs(s: &str) -> Option<Vec<[u8; 6]>> {
    s.split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(|m| {
            let mut mac = [0u8; 6];
            let mut parts = m.split(':');
            for b in &mut mac {
                let p = parts.next()?;
                if p.len() != 2 {
                    return None;
                }
                *b = u8::from_str_radix(p, 16).ok()?;
            }
            parts.next().is_none().then_some(mac)
        })
        .collect()
}

impl Drop for RbdBackend {
    fn drop(&mut self) {
        // The monitor thread ends at once (or when the cluster call it is in returns); then
        // the image closes with the last reference, releasing the lock for the next gateway.
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake();
        if let Some(t) = self.monitor.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn wake(&self) {
        if let Ok(mut w) = self.wake.lock() {
            *w = true;
            self.wake_cv.notify_all();
        }
    }

    /// The monitor thread: every [`MONITOR_INTERVAL`], or at once when librbd says the
    /// header changed, re-reads the size and checks that the lock is still ours. It never
    /// touches the event loop: a cluster that does not answer blocks only this thread.
    fn monitor(&self) {
        loop {
            {
                let Ok(mut w) = self.wake.lock() else { return };
                if !*w && !self.stop.load(Ordering::SeqCst) {
                    w = match self.wake_cv.wait_timeout(w, MONITOR_INTERVAL) {
                        Ok((w, _)) => w,
                        Err(_) => return,
                    };
                }
                *w = false;
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if let Ok(s) = self.image.size() {
                self.size.store(s, Ordering::Relaxed);
            }
            if self.locked && !self.fenced.load(Ordering::SeqCst) {
                self.check_lock();
            }
        }
    }

    /// Asks the cluster who holds the lock (`rbd_lock_get_owners`). Fenced if the cluster
    /// says we are blocklisted, or if the owner is not us (someone broke our lock without
    /// blocklisting us, or the lock is free): librbd itself would only find out at our next
    /// write. Other errors (the cluster away) change nothing: the next tick asks again.
    fn check_lock(&self) {
        match self.image.lock_owners() {
            Ok(owners) => {
                if !owners.iter().any(|o| is_us(&self.addrs, o)) {
                    let held = if owners.is_empty() {
                        "nobody".to_string()
                    } else {
                        owners.join(",")
                    };
                    self.fence(&io::Error::other(format!(
                        "the lock is held by {held}, not by this gateway ({})",
                        self.addrs
                    )));
                }
            }
            Err(e) if matches!(errno(&e), Some(EBLOCKLISTED)) => {
                self.fence(&e);
            }
            Err(e) => tracing::debug!(image = %self.name, error = %e, "lock owner check failed"),
        }
    }

    /// Takes the exclusive lock; if another client holds it, breaks that client's lock
    /// (the cluster blocklists it first) and takes it then. librbd itself breaks the lock of
    /// a holder that is gone (no longer watching the image); a live holder's is broken here.
    fn take_lock(&self) -> io::Result<()> {
        let holders = self.image.lock_owners()?;
        for owner in &holders {
            tracing::warn!(
                image = %self.name,
                %owner,
                "the image's exclusive lock is held by another client; breaking it \
                 (the holder is blocklisted and can no longer write)"
            );
        }
        let first = match self.image.lock_acquire() {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let owners = self.image.lock_owners()?;
        if owners.is_empty() {
            return Err(first);
        }
        for owner in &owners {
            if !holders.contains(owner) {
                tracing::warn!(image = %self.name, %owner, "breaking the exclusive lock of a new holder");
            }
            self.image.lock_break(owner)?;
        }
        self.image.lock_acquire()
    }

    /// Marks the lock lost (once: logs the first time) and says so as an error.
    fn fence(&self, cause: &io::Error) -> io::Error {
        if !self.fenced.swap(true, Ordering::SeqCst) {
            tracing::error!(
                image = %self.name,
                error = %cause,
                "lost the image's exclusive lock (another gateway took it over); \
                 refusing every write from now on"
            );
        }
        io::Error::from_raw_os_error(libc::EROFS)
    }

    /// The size now (librbd refreshes it after a resize), or as last read if the cluster
    /// cannot be asked.
    fn len(&self) -> u64 {
        match self.image.size() {
            Ok(s) => {
                self.size.store(s, Ordering::Relaxed);
                s
            }
            Err(_) => self.size.load(Ordering::Relaxed),
        }
    }

    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        let size = self.len();
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} is outside {} of {size} bytes",
                    self.name
                ),
            )),
        }
    }
}

impl Backend for RbdBackend {
    fn len(&self) -> u64 {
        self.shared.len()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.shared.check_range(offset, buf.len())?;
        self.shared.image.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let sh = &self.shared;
        if sh.read_only || sh.fenced.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        sh.check_range(offset, buf.len())?;
        sh.image
            .write_at(buf, offset)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EROFS) | Some(EBLOCKLISTED) => sh.fence(&e),
                _ => e,
            })
    }

    fn flush(&self) -> io::Result<()> {
        let sh = &self.shared;
        if sh.fenced.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        sh.image.flush().map_err(|e| match e.raw_os_error() {
            Some(libc::EROFS) | Some(EBLOCKLISTED) => sh.fence(&e),
            _ => e,
        })
    }

    fn read_only(&self) -> bool {
        self.shared.read_only
    }

    fn failed(&self) -> bool {
        self.lock_lost()
    }
}

/// True if lock owner `owner` (`IP:PORT/NONCE`, as `rbd_lock_get_owners` lists it) is one
/// of our session's addresses `ours` (`rados_getaddrs`: the same form, possibly as a
/// `[v2:...,v1:...]` vector).
fn is_us(ours: &str, owner: &str) -> bool {
    let strip = |a: &str| -> String {
        let a = a.trim().trim_start_matches('[').trim_end_matches(']');
        let a = a
            .strip_prefix("v1:")
            .or_else(|| a.strip_prefix("v2:"))
            .or_else(|| a.strip_prefix("any:"))
            .unwrap_or(a);
        a.to_string()
    };
    let owner = strip(owner);
    !owner.is_empty() && ours.split(',').any(|a| strip(a) == owner)
}
