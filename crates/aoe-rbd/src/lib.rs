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
//! gateway that was only slow, not dead, can no longer write: its next write fails with
//! `EBLOCKLISTED` (or `EROFS` from librbd's lock state), it logs once that it lost the lock
//! and answers every later write with an ATA error. So the newest gateway wins and the old
//! one never writes behind its back.
//!
//! I/O: the store is an [`aoe_store::AsyncBackend`]. Each request is a librbd aio call
//! (read, write, write-zeroes, flush) whose completion callback, on a librbd thread, pushes
//! (token, buffer, result) onto the daemon's [`Completions`] queue and so writes its eventfd:
//! no thread waits per request, and as many are in flight against the cluster as the daemon
//! submits (each export's buffer count bounds that; [`MAX_IN_FLIGHT`] bounds it here too).
//! A buffer belongs to its operation until the callback gives it back, and the image is
//! closed only after the last callback, so a daemon that stops with requests in flight
//! frees nothing librbd still writes into. Errors keep their errno and reach the initiator
//! as ATA errors through `aoe_store::StoreError`. librbd's cache is off, so an acknowledged write is on the OSDs
//! and survives the gateway. No OSD timeout is set: while the cluster is away I/O waits in
//! librbd, and the initiator retransmits, so service resumes when the cluster comes back.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aoe_rbd_sys::{errno, AioOp, Cluster, Image};
use aoe_store::{AsyncBackend, Completions, Done, Op, Request};

/// Requests one image has in flight at most; more are given back to the daemon, which drops
/// them (the initiator retransmits). The export's buffer count normally keeps far below it.
pub const MAX_IN_FLIGHT: usize = 8192;

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
    name: String,
    image: Image,
    read_only: bool,
    /// Size at open, or as last read: what `len` answers if the cluster cannot be asked,
    /// and what requests are checked against.
    size: AtomicU64,
    /// The lock state the completion callbacks update.
    fence: Arc<Fence>,
    /// Where finished requests go.
    completions: Arc<Completions>,
}

/// Whether the exclusive lock was lost; shared with the completion callbacks.
#[derive(Debug)]
struct Fence {
    name: String,
    /// Set when the exclusive lock was lost: writes are refused from then on.
    fenced: AtomicBool,
}

impl Fence {
    fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
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

    /// A write's or flush's librbd error, with a lost lock turned into the fence.
    fn write_error(&self, e: io::Error) -> io::Error {
        match e.raw_os_error() {
            Some(libc::EROFS) | Some(EBLOCKLISTED) => self.fence(&e),
            _ => e,
        }
    }
}

impl RbdBackend {
    /// Connects, opens the image and, for a writable export of an image with the
    /// exclusive-lock feature, takes its lock, breaking (and so blocklisting) a previous
    /// holder's: see the crate documentation for the failover this gives.
    /// Finished requests go to `completions`.
    pub fn open(o: &RbdOptions, completions: Arc<Completions>) -> Result<RbdBackend, OpenError> {
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
        let b = RbdBackend {
            name: name.clone(),
            image,
            read_only: o.read_only,
            size: AtomicU64::new(size),
            fence: Arc::new(Fence {
                name: name.clone(),
                fenced: AtomicBool::new(false),
            }),
            completions,
        };
        if !o.read_only
            && b.image
                .has_exclusive_lock()
                .map_err(|e| classify(e, "lock"))?
        {
            b.take_lock().map_err(|e| classify(e, "lock"))?;
        }
        Ok(b)
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

    /// The export's name, `rbd:POOL/IMAGE`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.len() / 512
    }

    /// Checks a request against the size last read (re-read on every IDENTIFY, so after a
    /// resize the initiator's revalidate brings both up to date).
    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.size.load(Ordering::Relaxed);
        match offset.checked_add(len) {
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

impl AsyncBackend for RbdBackend {
    fn len(&self) -> u64 {
        match self.image.size() {
            Ok(s) => {
                self.size.store(s, Ordering::Relaxed);
                s
            }
            Err(_) => self.size.load(Ordering::Relaxed),
        }
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn failed(&self) -> bool {
        self.fence.is_fenced()
    }

    fn submit(&self, req: Request) -> Result<(), Request> {
        if self.image.aio_in_flight() >= MAX_IN_FLIGHT {
            return Err(req);
        }
        let Request { op, token, buf } = req;
        let writes = !matches!(op, Op::Read { .. });
        // Refused before librbd sees it: completed at once, with the error.
        let refuse = |buf: Vec<u8>, e: io::Error| {
            self.completions.push(Done {
                user: token,
                buf,
                result: Err(e),
            });
        };
        if writes && !matches!(op, Op::Flush) && self.read_only {
            refuse(buf, io::Error::from_raw_os_error(libc::EROFS));
            return Ok(());
        }
        if writes && self.fence.is_fenced() {
            refuse(buf, io::Error::from_raw_os_error(libc::EROFS));
            return Ok(());
        }
        let (aio, len) = match op {
            Op::Read { offset, at } => {
                let n = at.len();
                (AioOp::Read { offset, at }, Some((offset, n)))
            }
            Op::Write { offset, from } => {
                let n = from.len();
                (AioOp::Write { offset, from }, Some((offset, n)))
            }
            Op::WriteZeroes { offset, len } => {
                if let Err(e) = self.check_range(offset, len) {
                    refuse(buf, e);
                    return Ok(());
                }
                (AioOp::WriteZeroes { offset, len }, None)
            }
            Op::Flush => (AioOp::Flush, None),
        };
        if let Some((offset, n)) = len {
            if let Err(e) = self.check_range(offset, n as u64) {
                refuse(buf, e);
                return Ok(());
            }
        }
        let read_len = match &aio {
            AioOp::Read { at, .. } => Some(at.len()),
            _ => None,
        };
        let completions = self.completions.clone();
        let fence = self.fence.clone();
        self.image.aio_submit(
            aio,
            buf,
            Box::new(move |buf, r| {
                let result = if r < 0 {
                    let e = io::Error::from_raw_os_error((-r) as i32);
                    Err(if writes { fence.write_error(e) } else { e })
                } else {
                    match read_len {
                        Some(n) if r as usize != n => Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("rbd read: {r} of {n} bytes"),
                        )),
                        _ => Ok(()),
                    }
                };
                completions.push(Done {
                    user: token,
                    buf,
                    result,
                });
            }),
        );
        Ok(())
    }
}
