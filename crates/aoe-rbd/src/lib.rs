//! A Ceph RBD image as the backing store of an AoE export.
//!
//! Layer: beside `aoe-store`'s file backend, on the safe types of `aoe-rbd-sys` (no `unsafe`
//! here). [`RbdBackend::open`] connects to the cluster, opens the image and, for a writable
//! export of an image with the exclusive-lock feature, takes that lock and keeps it: the
//! fencing that lets two `aoe serve` gateways export one image safely, as Ceph's iSCSI
//! gateways (tcmu-runner's rbd handler) do.
//!
//! Failover: a gateway that finds the lock held breaks it. It has the monitors blocklist
//! the holder before and after it breaks the lock (librbd does too, by Ceph's
//! `rbd_blocklist_on_break_lock`, but with settings it fixed from the image's config at open,
//! which the gateway's check reads a moment later: `Shared::break_lock`), so a gateway that
//! was only slow, not dead, can no longer write. It notices without waiting for
//! a write: a monitor thread per image asks the cluster who holds the lock whenever librbd's
//! update watch reports a header change (which a blocklisted client's watch does once
//! librbd re-registers it), and every [`LOCK_RECHECK`] while the export writes (a lock
//! taken without blocklisting sends no header update), and an owner that is not this
//! client, or `EBLOCKLISTED`, fences it; a write that fails with
//! `EBLOCKLISTED` or `EROFS` first does the same (a read failing with `EBLOCKLISTED` too). A
//! fenced gateway logs once that it lost the lock, refuses every later write and reports
//! itself failed ([`RbdBackend::lock_lost`], `AsyncBackend::failed`); the daemon then stops
//! answering for the export (`aoe-target`'s dispatch), so initiators re-send to the gateway
//! that took over instead of failing the application's I/O. So the newest gateway wins and
//! the old one never writes behind its back. The same monitor re-reads the image's size
//! ([`RbdBackend::size_seen`]), which the daemon announces; AoE reservations are kept in the
//! image's metadata ([`RESERVE_KEY`]) so that they survive a failover: the monitor thread
//! stores them ([`RbdBackend::store_reservation`], off the daemon's event loop) and re-reads
//! them on each update notification, so a change made through another gateway is seen
//! while running ([`RbdBackend::reservation_update`]).
//!
//! I/O: the store is an [`aoe_store::AsyncBackend`]. Each request is a librbd aio call
//! (read, write, write-zeroes, flush) whose completion callback, on a librbd thread, pushes
//! (token, buffer, result) onto the daemon's [`Completions`] queue and so writes its eventfd:
//! no thread waits per request, and as many are in flight against the cluster as the daemon
//! submits (each export's buffer count bounds that; [`MAX_IN_FLIGHT`] bounds it here too),
//! not as many as `--workers`. Reads that follow one another in a receive batch (a sequential
//! initiator's, one frame each) are one `rbd_aio_readv` scattered into their reply buffers
//! ([`RbdBackend`]'s `submit_reads`): one OSD op per object instead of one per frame, which
//! is what a single sequential stream, all of whose requests land on one object and so one
//! placement group, is limited by. A fenced gateway refuses writes, write-zeroes and flushes in
//! `submit`, before librbd sees them, with the same `EROFS` (an ATA error) as a write that
//! fails on a lost lock. A buffer belongs to its operation until the callback gives it back,
//! and the image is closed only after the last callback, so a daemon that stops with
//! requests in flight frees nothing librbd still writes into. Errors keep their errno and
//! reach the initiator as ATA errors through `aoe_store::StoreError`. librbd's cache is off,
//! or a no-op where the pool's or image's config turns it on (write-around with nothing
//! allowed in flight), and a writable export whose pool or image asks for a cache that
//! acknowledges early is refused at open ([`OpenError::WriteBackCache`]), so an
//! acknowledged write is on the OSDs and survives the gateway, flushed or not; one that
//! keeps data in memory is refused too ([`OpenError::WriterCache`]): a gateway whose lock
//! was broken would answer reads from it. A writable export whose pool or image turns
//! `rbd_blocklist_on_break_lock` off is refused likewise ([`OpenError::NoBlocklistOnBreak`]):
//! its take-over would not fence the old gateway. A read-only export of an image whose
//! config turns the cache on is refused too ([`OpenError::ReadCache`]): its cache would
//! answer reads with what another gateway has overwritten since. So is a writable export
//! whose pool or image turns librbd's persistent write-back cache on
//! ([`OpenError::PersistentCache`]: writes acknowledged from a log on this host), or sets
//! how long a broken lock's holder stays blocklisted ([`OpenError::BlocklistExpiry`]:
//! librbd 16's lock break then fails, and where it works a gateway stalled longer would
//! come back unfenced). Every other option a pool or image can
//! override was reviewed for these promises in docs/TEST-AUDIT.md ("Session 32: librbd's
//! overrides, one by one"). These are open-time checks: librbd builds its cache layer,
//! loads its plugins and fixes its lock's break settings at open, so an override set on a
//! served image does not reach this gateway (session 33), but it would stop the gateway
//! that takes the image over; the monitor reads the config again after each update
//! notification and logs what a starting gateway would refuse (`Shared::recheck_config`).
//! No OSD timeout is set:
//! while the cluster is away I/O waits in librbd, and the initiator retransmits, so service
//! resumes when the cluster comes back.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use aoe_rbd_sys::{errno, AioOp, Cluster, Image, MAX_READV_PARTS};
use aoe_store::{read_runs, AsyncBackend, Completions, Done, Op, Request};

/// Requests one image has in flight at most; more are given back to the daemon, which drops
/// them (the initiator retransmits). The export's buffer count normally keeps far below it.
pub const MAX_IN_FLIGHT: usize = 8192;

/// How often, while the export writes, the monitor asks the cluster who holds the lock
/// (one OSD read, `rbd_lock_get_owners`): a client that breaks the lock without
/// blocklisting us and takes it (`rbd_lock_break` and `rbd_lock_acquire` with
/// `rbd_blocklist_on_break_lock=false`) sends no header update, so nothing else tells us.
/// An idle export asks nothing.
pub const LOCK_RECHECK: Duration = Duration::from_secs(1);

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
    /// The buffer count the target advertises (`-b`): requests an initiator may have
    /// queued at the export, what a QoS limit's wait is reckoned from (the warning of a
    /// limit under which a full queue outlasts [`INITIATOR_DEADSECS`]).
    pub buffer_count: u16,
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
    /// The pool's or the image's librbd config (`rbd config pool set`, `rbd config image
    /// set`), which overrides the gateway's own, turns a write-back cache on: librbd would
    /// acknowledge writes before the OSDs have them, and a gateway that dies would lose them.
    /// The operator's to change (the command is in the message).
    #[error(
        "{name}: librbd's write-back cache is on for this image ({settings}): a write would be \
         acknowledged before the OSDs have it and lost if this gateway died; not serving it \
         writable. Remove the override (`rbd config {level} remove {target} {option}`)"
    )]
    WriteBackCache {
        /// The export's name.
        name: String,
        /// The options that make it write-back, with where each came from.
        settings: String,
        /// `pool` or `image`: where the override to remove is.
        level: &'static str,
        /// The option to remove there: `rbd_cache_policy` if the pool or image sets it,
        /// else `rbd_cache`.
        option: &'static str,
        /// The pool or the pool/image, as `rbd config` names it.
        target: String,
    },
    /// A writable export of an image whose pool or image config turns librbd's cache on with
    /// a policy that keeps data in memory (`writethrough` or `writeback`: librbd's
    /// `ObjectCacher`): after another gateway took the image over and wrote, this one would
    /// answer reads from its cache with the old data until it noticed the loss of the lock
    /// (session 32: one such read answered). The operator's to change.
    #[error(
        "{name}: librbd's cache would keep this image's data in memory ({settings}): after \
         another gateway took the image over and wrote, this one would answer reads from it \
         with the old data until it noticed; not serving it writable. Remove the override \
         (`rbd config {level} remove {target} rbd_cache_policy`)"
    )]
    WriterCache {
        /// The export's name.
        name: String,
        /// The options that make it so, with where each came from.
        settings: String,
        /// `pool` or `image`: where the policy is set.
        level: &'static str,
        /// The pool or the pool/image, as `rbd config` names it.
        target: String,
    },
    /// The pool's or the image's librbd config turns `rbd_blocklist_on_break_lock` off over
    /// the gateway's own setting: a gateway taking the image over would break the old one's
    /// lock without blocklisting it, and the old one's writes in flight would still land
    /// after the new one's. The operator's to change (the command is in the message).
    #[error(
        "{name}: this image's config turns blocklisting off when a lock is broken \
         (rbd_blocklist_on_break_lock=false from the {level}): a gateway taking it over could \
         not fence the old one, whose late writes would land over the new one's; not serving \
         it writable. Remove the override (`rbd config {level} remove {target} \
         rbd_blocklist_on_break_lock`)"
    )]
    NoBlocklistOnBreak {
        /// The export's name.
        name: String,
        /// `pool` or `image`: where the override is.
        level: &'static str,
        /// The pool or the pool/image, as `rbd config` names it.
        target: String,
    },
    /// The pool's or the image's librbd config sets `rbd_blocklist_expire_seconds`, which
    /// librbd's lock break passes to the monitors: with librbd 16 the break then fails
    /// (`EINVAL`), so no gateway could take the image over; where it works, a gateway
    /// stalled longer than that comes back unfenced, and what it had queued lands over the
    /// writes of the gateway that took over. The operator's to change.
    #[error(
        "{name}: this image's config sets how long a gateway whose lock is broken stays \
         blocklisted (rbd_blocklist_expire_seconds={value} from the {level}): librbd 16 then \
         fails to break a lock (EINVAL), so no gateway could take this image over, and where \
         it works a gateway stalled longer than that would come back unfenced and write over \
         the one that took over; not serving it writable. Remove the override (`rbd config \
         {level} remove {target} rbd_blocklist_expire_seconds`: 0, the monitors' default of \
         an hour, is what the gateway sets)"
    )]
    BlocklistExpiry {
        /// The export's name.
        name: String,
        /// The value, as the config has it.
        value: String,
        /// `pool` or `image`: where the override is.
        level: &'static str,
        /// The pool or the pool/image, as `rbd config` names it.
        target: String,
    },
    /// The pool's or the image's librbd config turns librbd's persistent write-back cache
    /// on (`rbd_persistent_cache_mode` `rwl` or `ssd` with the `pwl_cache` plugin in
    /// `rbd_plugins`): a write is acknowledged once it is in a log on this gateway's host
    /// (after the first flush, once librbd no longer needs its buffer), so a gateway taking
    /// the image over would not have it. The operator's to change (the command is in the
    /// message).
    #[error(
        "{name}: librbd's persistent write-back cache is on for this image ({settings}): a \
         write would be acknowledged once it is in a log on this gateway's host, not on the \
         OSDs, and a gateway taking the image over would not have it; not serving it \
         writable. Remove the override (`rbd config {level} remove {target} {option}`)"
    )]
    PersistentCache {
        /// The export's name.
        name: String,
        /// The options that turn it on, with where each came from.
        settings: String,
        /// `pool` or `image`: where the override to remove is.
        level: &'static str,
        /// The option to remove there.
        option: &'static str,
        /// The pool or the pool/image, as `rbd config` names it.
        target: String,
    },
    /// A read-only export of an image whose pool or image config turns librbd's cache on:
    /// the cache would answer reads with what it read before another gateway wrote the
    /// sectors (this gateway holds no lock, so nothing tells it). The operator's to change.
    #[error(
        "{name}: librbd's cache is on for this image (rbd_cache=true from the {level}): a \
         read-only gateway would answer reads from it after another gateway wrote those \
         sectors; not serving it. Remove the override (`rbd config {level} remove {target} \
         rbd_cache`)"
    )]
    ReadCache {
        /// The export's name.
        name: String,
        /// `pool` or `image`: where the override is.
        level: &'static str,
        /// The pool or the pool/image, as `rbd config` names it.
        target: String,
    },
    /// librbd cannot open the image: a plugin that the pool's or the image's config names
    /// (`rbd_plugins`, e.g. `pwl_cache` for the persistent write-back cache) is not
    /// installed on this host, and librbd fails the open with `ENOSYS`. The operator's to
    /// change (the way is in the message).
    #[error(
        "{name}: librbd cannot open this image: a librbd plugin that its config names is not \
         installed on this host ({plugins}; librbd: {error}); not serving it. {fix}"
    )]
    MissingPlugin {
        /// The export's name.
        name: String,
        /// The plugin list and where it came from, as far as the pool's config tells.
        plugins: String,
        /// How to remove the override.
        fix: String,
        /// librbd's error.
        error: io::Error,
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
    /// How `rbd config` names the pool and the image, for the overrides' messages.
    targets: Targets,
    /// What a gateway starting on the image now would refuse, as the monitor last found
    /// after an update notification ([`Shared::recheck_config`]); `None` at open (else the
    /// open was refused).
    refused: Mutex<Option<String>>,
    /// The buffer count advertised ([`RbdOptions::buffer_count`]).
    buffer_count: u16,
    /// The QoS limit that makes a full queue wait past the initiator's dead time, as last
    /// said ([`qos_too_slow`]: at open, and by the monitor after an update notification).
    qos_said: Mutex<Option<String>>,
    /// Size at open, or as last read (by the monitor, or `len` on IDENTIFY): what `len`
    /// answers if the cluster cannot be asked, and what requests are checked against.
    size: AtomicU64,
    /// The lock state: shared with the aio completion callbacks, which must not hold the
    /// image (see [`Fence`]).
    fence: Arc<Fence>,
    /// True if we took the exclusive lock at open: the monitor then checks we still hold it.
    locked: bool,
    /// True if another client held the lock when we opened the image and we broke it
    /// ([`RbdBackend::took_over`]).
    took_over: AtomicBool,
    /// Set by every write, write-zeroes and flush sent to librbd, cleared by the monitor's
    /// next lock check ([`LOCK_RECHECK`]).
    wrote: AtomicBool,
    /// Our RADOS session's addresses (`rados_getaddrs`), to find ourselves among the lock's
    /// owners.
    addrs: String,
    /// Wakes the monitor thread early: librbd's update callback, a reservation to store, and
    /// Drop (with `stop`).
    wake: Arc<Wake>,
    stop: AtomicBool,
    /// Where finished requests go.
    completions: Arc<Completions>,
    /// Reservations to store, in order: the monitor thread stores them, so a cluster that
    /// does not answer never holds up the daemon's event loop.
    reserve_jobs: Mutex<std::collections::VecDeque<ReserveJob>>,
    /// The reservation as the cluster last told it (read after each update notification,
    /// or stored by this gateway), not yet taken by [`RbdBackend::reservation_update`].
    reserve_update: Mutex<Option<Vec<[u8; 6]>>>,
    /// True while `reserve_update` holds one: the daemon's check per frame is one load.
    reserve_changed: AtomicBool,
}

/// A reservation for the monitor thread to store, and whom to tell once it is stored.
struct ReserveJob {
    macs: Vec<[u8; 6]>,
    done: ReserveDone,
}

/// Called with the outcome of a stored reservation (on the monitor thread).
pub type ReserveDone = Box<dyn FnOnce(io::Result<()>) + Send>;

impl std::fmt::Debug for ReserveJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReserveJob({})", format_macs(&self.macs))
    }
}

/// Whether the exclusive lock was lost. Apart from [`Shared`] so that an aio completion
/// callback can fence without holding a reference to the image: a callback holding the
/// last one would close the image on a librbd thread, from inside the callback that
/// closing waits for.
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
                 no longer answering for the export, so initiators move to that gateway"
            );
        }
        io::Error::from_raw_os_error(libc::EROFS)
    }

    /// A read's librbd error: `EBLOCKLISTED` for a gateway that held the lock means another
    /// one broke it (the cluster blocklisted us first), so it fences too, and the read is
    /// not answered (the initiator re-sends it to the gateway that took over).
    fn read_error(&self, e: io::Error, locked: bool) -> io::Error {
        match e.raw_os_error() {
            Some(EBLOCKLISTED) if locked => self.fence(&e),
            _ => e,
        }
    }

    /// A write's, write-zeroes' or flush's librbd error, with a lost lock turned into the
    /// fence.
    fn write_error(&self, e: io::Error) -> io::Error {
        match e.raw_os_error() {
            Some(libc::EROFS) | Some(EBLOCKLISTED) => self.fence(&e),
            _ => e,
        }
    }
}

/// The monitor's wake-up flag. Apart from [`Shared`] for the same reason as [`Fence`]: the
/// update watch's callback holds only this, never the image, so it cannot be the one that
/// drops the image (whose Drop unregisters that very watch and waits for its callbacks).
#[derive(Debug, Default)]
struct Wake {
    flag: Mutex<Woken>,
    cv: Condvar,
}

/// Why the monitor thread was woken.
#[derive(Debug, Default, Clone, Copy)]
struct Woken {
    /// librbd's update watch fired: the header changed (size, metadata, lock traffic) or
    /// librbd re-registered its watch (after which it cannot know what it missed).
    updated: bool,
    /// Work was queued, or the backend is being dropped.
    poked: bool,
}

impl Wake {
    fn wake(&self, updated: bool) {
        if let Ok(mut w) = self.flag.lock() {
            w.updated |= updated;
            w.poked |= !updated;
            self.cv.notify_all();
        }
    }
}

/// The image metadata key (`rbd image-meta get IMAGE aoe.reserve`) that holds the AoE
/// Reserve/Release list of an `rbd:` export: MAC addresses, comma-separated; unset when the
/// image is not reserved. Kept in the cluster, so every gateway of the image enforces the
/// same reservation, including one that takes over from a dead gateway.
pub const RESERVE_KEY: &str = "aoe.reserve";

impl RbdBackend {
    /// Connects, opens the image and, for a writable export of an image with the
    /// exclusive-lock feature, takes its lock, breaking (and so blocklisting) a previous
    /// holder's: see the crate documentation for the failover this gives. A lock break
    /// that fails with `EINVAL` (librbd 16, for a lock made with an
    /// `rbd_blocklist_expire_seconds` from the image's config at open, which the check after
    /// the open no longer found) gets one fresh open, with the config of now.
    /// Finished requests go to `completions`.
    pub fn open(o: &RbdOptions, completions: Arc<Completions>) -> Result<RbdBackend, OpenError> {
        Self::open_once(o, completions, true)
    }

    /// [`RbdBackend::open`]; `first` is false on the one retry that a lock break failing
    /// with `EINVAL` gets (see there).
    fn open_once(
        o: &RbdOptions,
        completions: Arc<Completions>,
        first: bool,
    ) -> Result<RbdBackend, OpenError> {
        let again = completions.clone();
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
            // The pool's or the image's config overrides the line above (librbd's
            // `ImageCtx::apply_metadata`): if one turns the cache on, these two make it
            // librbd's write-around layer with nothing in flight allowed, which is a no-op
            // (`WriteAroundObjectDispatch`: "write-through mode is active -- no-op the
            // cache"): no write acknowledged before the OSDs have it, and no data kept in
            // memory, so no read answered from it (the `writethrough` policy, which session 31
            // set here, keeps librbd's `ObjectCacher`, and a fenced gateway answered a read
            // from it with old data, session 32). Other policies or a larger
            // `rbd_cache_max_dirty` from the pool or image are refused ([`writable_cache`]).
            ("rbd_cache_policy", "writearound"),
            ("rbd_cache_max_dirty", "0"),
            // A gateway that breaks another's lock has the cluster blocklist it first (Ceph's
            // default, made sure of here): the fenced gateway's writes then fail at the OSDs,
            // and librbd's update watch tells its monitor (see [`Shared::monitor`]). A pool's
            // or image's override of it is refused ([`no_blocklist_on_break`]).
            ("rbd_blocklist_on_break_lock", "true"),
            // For as long as Ceph's default blocklists it (0: the monitors'
            // `mon_osd_blocklist_default_expire`, an hour). A pool's or image's value is
            // refused ([`blocklist_expiry`]).
            ("rbd_blocklist_expire_seconds", "0"),
            // No persistent write-back cache (librbd's `pwl_cache` plugin): it acknowledges a
            // write once it is in a log on this host. A pool's or image's override is refused
            // ([`persistent_cache`]).
            ("rbd_persistent_cache_mode", "disabled"),
        ];
        if let Some(k) = &keyring {
            // librados says only "No such file or directory" at connect for a keyring it
            // cannot read: name the file here.
            if let Err(error) = std::fs::File::open(k) {
                return Err(OpenError::Other {
                    name,
                    error: io::Error::new(
                        error.kind(),
                        format!("cannot read the keyring {k}: {error}"),
                    ),
                });
            }
            options.push(("keyring", k.as_str()));
        }
        let conf_name = o
            .ceph_conf
            .as_ref()
            .map_or("the default ceph.conf".into(), |c| c.display().to_string());
        let classify = |error: io::Error, what: &str| match errno(&error) {
            Some(libc::EACCES) | Some(libc::EPERM) => OpenError::PermissionDenied {
                name: name.clone(),
                client: client.clone(),
                error,
            },
            Some(libc::ETIMEDOUT) => OpenError::Unreachable {
                name: name.clone(),
                conf: conf_name.clone(),
                timeout: o.connect_timeout,
                error,
            },
            // rados_connect's ENOENT: no keyring found (none given and none where ceph.conf
            // points) or no monitor address in the config (MonClient::build_initial_monmap).
            Some(libc::ENOENT)
                if what == "connect" && error.to_string().starts_with("cannot connect") =>
            {
                OpenError::Other {
                    name: name.clone(),
                    error: io::Error::new(
                        error.kind(),
                        format!(
                            "{error}: no keyring for client.{client} (--keyring, or `keyring` in \
                         {conf_name}) or no monitor address (`mon_host` in {conf_name})"
                        ),
                    ),
                }
            }
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
        let image = match io.open(&o.image) {
            Ok(image) => image,
            Err(e) if errno(&e) == Some(libc::ENOSYS) => {
                return Err(missing_plugin(&io, o, name.clone(), e))
            }
            Err(e) => return Err(classify(e, "image")),
        };
        // Before the lock is taken (or a holder's broken): a refused gateway leaves the one
        // serving alone.
        let config = image.config().map_err(|e| classify(e, "config"))?;
        let targets = Targets::new(o);
        if let Some(e) = refusal(&config, o.read_only, &name, &targets) {
            return Err(e);
        }
        let qos = qos_too_slow(&config, o.buffer_count, &targets);
        if let Some(q) = &qos {
            tracing::warn!(image = %name, "{q}");
        }
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
            targets,
            refused: Mutex::new(None),
            buffer_count: o.buffer_count,
            qos_said: Mutex::new(qos),
            size: AtomicU64::new(size),
            fence: Arc::new(Fence {
                name: name.clone(),
                fenced: AtomicBool::new(false),
            }),
            locked,
            took_over: AtomicBool::new(false),
            wrote: AtomicBool::new(false),
            addrs,
            wake: Arc::new(Wake::default()),
            stop: AtomicBool::new(false),
            completions,
            reserve_jobs: Mutex::new(std::collections::VecDeque::new()),
            reserve_update: Mutex::new(None),
            reserve_changed: AtomicBool::new(false),
        });
        if locked {
            let broke = match shared.take_lock() {
                Ok(broke) => broke,
                // librbd 16's lock break fails with EINVAL when the image's lock was made
                // with an `rbd_blocklist_expire_seconds` (session 32), which it takes from the
                // config at open: here the config checked above no longer sets one, so it
                // was removed between librbd's open and the check. The holder is fenced
                // already (`Shared::break_lock` blocklists it first); a fresh open makes a
                // lock with the config of now, and checks it again.
                Err(e) if first && errno(&e) == Some(libc::EINVAL) => {
                    tracing::warn!(
                        image = %name,
                        error = %e,
                        "the lock break failed with settings librbd took from the image's \
                         config at open, which has changed since; opening the image again"
                    );
                    drop(shared);
                    return Self::open_once(o, again, false);
                }
                Err(e) => return Err(classify(e, "lock")),
            };
            shared.took_over.store(broke, Ordering::SeqCst);
        }
        // librbd calls back on every header change (resize, metadata, lock traffic, and after
        // it re-registered its watch, as it does once this client is blocklisted): the monitor
        // then looks at once instead of at its next tick. The callback holds only the wake-up
        // flag, not the image, so it never keeps the image open nor closes it.
        let wake = shared.wake.clone();
        shared
            .image
            .watch_updates(Box::new(move || wake.wake(true)))
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

    /// The image's size in bytes as the monitor thread last read it (after the update
    /// notification that a resize sends): no call to the cluster, so the daemon's event
    /// loop can ask it on its timer and announce a resize.
    pub fn size_seen(&self) -> u64 {
        self.shared.size.load(Ordering::Relaxed)
    }

    /// True once this gateway lost the image's exclusive lock (another gateway broke it):
    /// every write is refused from then on. Noticed by the monitor thread once librbd's
    /// watch reports it (seconds: its next watch ping), by its check every
    /// [`LOCK_RECHECK`] while the export writes, or by the first write refused.
    pub fn lock_lost(&self) -> bool {
        self.shared.fence.is_fenced()
    }

    /// True if another client held the image's exclusive lock when this gateway opened it,
    /// and this gateway broke it (the holder, blocklisted, fences itself within seconds and
    /// then stops answering for the export: see the crate documentation). The daemon's
    /// duplicate-address probe waits for that gateway to fall silent instead of refusing.
    pub fn took_over(&self) -> bool {
        self.shared.took_over.load(Ordering::SeqCst)
    }

    /// The reservation kept in the image ([`RESERVE_KEY`]): empty if not reserved. Asks the
    /// cluster (blocking).
    pub fn reservation(&self) -> io::Result<Vec<[u8; 6]>> {
        parse_reservation(self.shared.image.metadata_get(RESERVE_KEY)?.as_deref())
    }

    /// Stores the reservation in the image ([`RESERVE_KEY`]; removed when `macs` is empty)
    /// without waiting: the monitor thread stores it, in the order given, and then calls
    /// `done` (on that thread) with the outcome, `Ok` once the cluster has it. librbd has no
    /// asynchronous metadata call (`librbd.h` offers only `rbd_metadata_set`), so a thread
    /// must wait on the cluster, and it is this one rather than the daemon's event loop:
    /// while the cluster does not answer, only this image's reservation (and lock check)
    /// waits. A gateway that lost the lock is refused (`EROFS`): only the lock holder
    /// changes the image's state.
    pub fn store_reservation(&self, macs: &[[u8; 6]], done: ReserveDone) {
        if self.shared.read_only || self.lock_lost() {
            done(Err(io::Error::from_raw_os_error(libc::EROFS)));
            return;
        }
        match self.shared.reserve_jobs.lock() {
            Ok(mut q) => q.push_back(ReserveJob {
                macs: macs.to_vec(),
                done,
            }),
            Err(_) => {
                done(Err(io::Error::other("reservation queue poisoned")));
                return;
            }
        }
        self.shared.wake.wake(false);
    }

    /// The reservation as the cluster holds it now, if it changed since the last call:
    /// read by the monitor thread after each update notification of the image (another
    /// gateway, or `rbd image-meta set`, changed it) and set by each reservation this
    /// gateway stored. No cluster call: one atomic load when nothing changed, so the
    /// daemon may ask before every frame it hands to the export.
    pub fn reservation_update(&self) -> Option<Vec<[u8; 6]>> {
        if !self.shared.reserve_changed.swap(false, Ordering::SeqCst) {
            return None;
        }
        self.shared.reserve_update.lock().ok()?.take()
    }
}

/// Why a writable export's cache is refused ([`writable_cache`]).
#[derive(Debug, PartialEq, Eq)]
enum CacheRefusal {
    /// It acknowledges writes before the OSDs have them ([`OpenError::WriteBackCache`]).
    WriteBack(Override),
    /// It keeps data in memory and answers reads from it ([`OpenError::WriterCache`]).
    Reads(Override),
}

/// Whether librbd's cache, which only a pool's or image's `rbd_cache true` turns on over the
/// gateway's `false`, would break a writable export's promises. The gateway's own policy,
/// `writearound` with `rbd_cache_max_dirty` 0, is a no-op (librbd's
/// `WriteAroundObjectDispatch` dispatches every write as if there were no cache and keeps
/// no data). Refused: a `writethrough` or `writeback` policy from the pool or image
/// (librbd's `ObjectCacher`, which answers reads from memory: a gateway whose lock was
/// broken answered a read with what it had cached after the new gateway's acknowledged,
/// flushed write, session 32; `writeback` also acknowledges writes early once
/// `rbd_cache_max_dirty` is above 0), and `writearound` with a pool's or image's
/// `rbd_cache_max_dirty` above 0 (it completes a write at once while less than that is in
/// flight, after the first flush with `rbd_cache_writethrough_until_flush`, from the first
/// write without). Returns the settings, each with its source, and the override to
/// remove. A FLUSH CACHE would still reach the OSDs (`rbd_aio_flush` flushes the cache),
/// but the Linux aoe driver never sends one (it declares no write cache), and this project
/// promises that a killed gateway loses no acknowledged write, flushed or not.
fn writable_cache(config: &[aoe_rbd_sys::ConfigOption]) -> Option<CacheRefusal> {
    let get = |name| option(config, name);
    let cache = get("rbd_cache")?;
    if cache.value.trim() != "true" {
        return None;
    }
    let policy = get("rbd_cache_policy");
    let max_dirty = get("rbd_cache_max_dirty");
    let dirty = max_dirty.is_some_and(|m| m.value.trim() != "0");
    let found = |option: &'static str, at: &aoe_rbd_sys::ConfigOption| Override {
        settings: settings(std::iter::once(cache).chain(policy).chain(max_dirty)),
        level: level(at.source),
        option,
    };
    match (policy, max_dirty) {
        (Some(p), _) if p.value.trim() == "writeback" && dirty => {
            Some(CacheRefusal::WriteBack(found("rbd_cache_policy", p)))
        }
        (Some(p), _) if matches!(p.value.trim(), "writeback" | "writethrough") => {
            Some(CacheRefusal::Reads(found("rbd_cache_policy", p)))
        }
        // The gateway's own policy (or a value librbd refused to set, which leaves the
        // gateway's): a no-op while nothing may be in flight.
        (_, Some(m)) if dirty => Some(CacheRefusal::WriteBack(found("rbd_cache_max_dirty", m))),
        _ => None,
    }
}

/// How `rbd config` names an export's pool (`pool` level) and image (`image` level).
#[derive(Debug)]
struct Targets {
    pool: String,
    image: String,
    /// `rados`'s `-p POOL [-N NAMESPACE]`, for the header object's commands.
    rados: String,
    /// The image's name alone (`rbd_id.NAME` holds its ID).
    name: String,
}

impl Targets {
    fn new(o: &RbdOptions) -> Targets {
        Targets {
            pool: o.pool.clone(),
            image: match &o.namespace {
                Some(ns) => format!("{}/{ns}/{}", o.pool, o.image),
                None => format!("{}/{}", o.pool, o.image),
            },
            rados: match &o.namespace {
                Some(ns) => format!("-p {} -N {ns}", o.pool),
                None => format!("-p {}", o.pool),
            },
            name: o.image.clone(),
        }
    }

    /// How to remove the image's own `rbd_plugins` when `rbd` cannot open the image
    /// (a plugin not installed: `rbd config image remove` fails as the open does).
    fn plugins_fix(&self) -> String {
        format!(
            "`rbd` cannot open the image to remove the image's override either: remove it \
             from the image's header object (`rados {r} rmomapkey rbd_header.ID \
             metadata_conf_rbd_plugins`, with the ID that `rados {r} get rbd_id.{image} \
             /dev/stdout` prints)",
            r = self.rados,
            image = self.name
        )
    }

    /// The target of `rbd config LEVEL ...` for `level` (`pool` or `image`).
    fn at(&self, level: &str) -> String {
        match level {
            "pool" => self.pool.clone(),
            _ => self.image.clone(),
        }
    }
}

/// Why an export of an image with this effective librbd `config` would be refused (read
/// only or writable as `read_only` says), if it would: the checks of [`RbdBackend::open`],
/// made before the lock is touched, and again by the monitor after each update
/// notification ([`Shared::recheck_config`]).
fn refusal(
    config: &[aoe_rbd_sys::ConfigOption],
    read_only: bool,
    name: &str,
    targets: &Targets,
) -> Option<OpenError> {
    let name = name.to_owned();
    if read_only {
        return read_cache(config).map(|level| OpenError::ReadCache {
            name,
            level,
            target: targets.at(level),
        });
    }
    if let Some(Override {
        settings,
        level,
        option,
    }) = persistent_cache(config)
    {
        return Some(OpenError::PersistentCache {
            name,
            settings,
            level,
            option,
            target: targets.at(level),
        });
    }
    if let Some((value, level)) = blocklist_expiry(config) {
        return Some(OpenError::BlocklistExpiry {
            name,
            value,
            level,
            target: targets.at(level),
        });
    }
    if let Some(level) = no_blocklist_on_break(config) {
        return Some(OpenError::NoBlocklistOnBreak {
            name,
            level,
            target: targets.at(level),
        });
    }
    match writable_cache(config)? {
        CacheRefusal::WriteBack(Override {
            settings,
            level,
            option,
        }) => Some(OpenError::WriteBackCache {
            name,
            settings,
            level,
            option,
            target: targets.at(level),
        }),
        CacheRefusal::Reads(Override {
            settings, level, ..
        }) => Some(OpenError::WriterCache {
            name,
            settings,
            level,
            target: targets.at(level),
        }),
    }
}

/// `NAME=VALUE from SOURCE, ...`: the options that make a check refuse, for its message.
fn settings<'a>(options: impl Iterator<Item = &'a aoe_rbd_sys::ConfigOption>) -> String {
    use aoe_rbd_sys::ConfigSource;
    options
        .map(|o| {
            let src = match o.source {
                ConfigSource::Client => "the client's config",
                ConfigSource::Pool => "the pool",
                ConfigSource::Image => "the image",
            };
            format!("{}={} from {src}", o.name, o.value)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where the pool's or image's config sets `rbd_blocklist_expire_seconds` (over the
/// gateway's own 0, the monitors' `mon_osd_blocklist_default_expire`, an hour), with the
/// value, if it does. librbd passes it to the monitors' `osd blocklist add` when it breaks
/// a lock (`managed_lock::BreakRequest`, configured from the image's config as
/// `rbd_blocklist_on_break_lock` is). With Debian's librbd 16.2.15 every such break fails,
/// `EINVAL`, for any value but 0 (session 32: 5 and 3600 alike; `ceph osd blocklist add
/// ADDR 5` itself works), so no gateway could take the image over; and with a librbd
/// where it works, a value shorter than the gateway stays stalled (a paused VM, SIGSTOP, a
/// partition) lets it come back unfenced: its librbd still believes it holds the lock, the
/// OSDs take its writes again, and what it had queued lands over the new gateway's writes
/// before its monitor notices. 0 is the only value accepted; the monitors' default is the
/// cluster's lever.
fn blocklist_expiry(config: &[aoe_rbd_sys::ConfigOption]) -> Option<(String, &'static str)> {
    let o = option(config, "rbd_blocklist_expire_seconds")?;
    (o.value.trim() != "0").then(|| (o.value.clone(), level(o.source)))
}

/// Whether the pool's or image's config turns librbd's persistent write-back cache on: a
/// `rbd_persistent_cache_mode` other than `disabled` (over the gateway's own `disabled`)
/// with the `pwl_cache` plugin named in `rbd_plugins` (librbd loads the cache only
/// through that plugin, `librbd::plugin::WriteLogImageCache`, once the exclusive lock is
/// taken). Ceph's documentation of the cache: writes complete once they are in the log on
/// the client's host (`rwl`, `ssd`), and after the first flush as soon as the caller's
/// buffer is no longer needed, "but does not guarantee that writes will be readable after
/// a crash"; nothing of it is on the OSDs until librbd writes it back. Returns the
/// settings and the override to remove: the mode if the pool or image sets it, else the
/// plugin list. A read-only export takes no lock, so its librbd never starts the cache.
fn persistent_cache(config: &[aoe_rbd_sys::ConfigOption]) -> Option<Override> {
    use aoe_rbd_sys::ConfigSource;
    let get = |name| option(config, name);
    let plugins = get("rbd_plugins")?;
    let pwl = plugins
        .value
        .split(|c: char| c == ',' || c.is_whitespace())
        .any(|p| p == "pwl_cache");
    let mode = get("rbd_persistent_cache_mode")?;
    if !pwl || mode.value.trim() == "disabled" {
        return None;
    }
    let (at, option) = if mode.source != ConfigSource::Client {
        (mode.source, "rbd_persistent_cache_mode")
    } else {
        (plugins.source, "rbd_plugins")
    };
    Some(Override {
        settings: settings([plugins, mode].into_iter()),
        level: level(at),
        option,
    })
}

/// What [`RbdBackend::open`] says when `rbd_open` fails with `ENOSYS`: librbd's plugin
/// registry could not load a plugin that `rbd_plugins` names (`librbd::image::OpenRequest`
/// logs "failed to initialize plugin registry: (38) Function not implemented"; Debian's
/// librbd 16 ships neither `pwl_cache` nor `parent_cache`, session 32). The pool's overrides
/// are read without the image; an image's own cannot be removed with `rbd`, which cannot
/// open the image either (`rbd config image remove` fails the same way), only from the
/// image's header object with `rados` (its key is `metadata_conf_rbd_plugins`).
fn missing_plugin(
    io: &aoe_rbd_sys::IoCtx,
    o: &RbdOptions,
    name: String,
    error: io::Error,
) -> OpenError {
    use aoe_rbd_sys::ConfigSource;
    let listed = io.config().ok().and_then(|c| {
        c.into_iter()
            .find(|x| x.name == "rbd_plugins" && !x.value.trim().is_empty())
    });
    let (plugins, fix) = match listed {
        Some(p) if p.source == ConfigSource::Pool => (
            format!("rbd_plugins={} from the pool", p.value),
            format!(
                "Remove the override (`rbd config pool remove {} rbd_plugins`)",
                o.pool
            ),
        ),
        Some(p) => (
            format!("rbd_plugins={} from the client's config", p.value),
            "Remove rbd_plugins from this host's Ceph config".to_string(),
        ),
        None => (
            "rbd_plugins from the image: the pool sets none".to_string(),
            Targets::new(o).plugins_fix(),
        ),
    };
    OpenError::MissingPlugin {
        name,
        plugins,
        fix,
        error,
    }
}

/// What the served image's monitor logs when the pool's or image's config names librbd
/// plugins (`rbd_plugins`, over the client's empty list): the plugins, where from, what they
/// do and how to remove them. librbd loads plugins at open only (`image::OpenRequest`'s
/// plugin registry), so the running gateway goes on without them (session 33: `pwl_cache`
/// set on a served image changed nothing in it), but every later open loads them. A plugin
/// that is not installed (Debian's librbd 16 installs none) fails every open of the image
/// with `ENOSYS` (the gateway taking it over says why, [`OpenError::MissingPlugin`], but
/// cannot serve it); `pwl_cache` with a `rbd_persistent_cache_mode` is refused for a
/// writable export anyway ([`persistent_cache`]); `parent_cache` reads a clone's parent, an
/// immutable snapshot, through the host's `ceph-immutable-object-cache` daemon, which breaks
/// no promise of the gateway's but is a daemon the next gateway's host must run. An image's
/// own list cannot be removed with `rbd` where the plugin is missing, so the `rados` way is
/// given.
fn plugins(config: &[aoe_rbd_sys::ConfigOption], targets: &Targets) -> Option<String> {
    use aoe_rbd_sys::ConfigSource;
    let p = option(config, "rbd_plugins")?;
    if p.source == ConfigSource::Client || p.value.trim().is_empty() {
        return None;
    }
    let fix = if p.source == ConfigSource::Pool {
        format!("`rbd config pool remove {} rbd_plugins`", targets.pool)
    } else {
        format!(
            "`rbd config image remove {} rbd_plugins` where the plugins are installed; else {}",
            targets.image,
            targets.plugins_fix()
        )
    };
    Some(format!(
        "the librbd plugins {value} (rbd_plugins from the {level}): librbd loads plugins at \
         open only, so this gateway runs without them, but where one is not installed no \
         gateway can open the image at all (librbd: Function not implemented), and pwl_cache \
         caches writes on the gateway's host. Remove the override unless every gateway's \
         host has the plugins and they are meant: {fix}",
        value = p.value.trim(),
        level = level(p.source),
    ))
}

/// `rbd config`'s name for where an override lives: `pool` for the pool's, else `image`
/// (the gateway sets every option these checks read itself, so a value it did not set is
/// the pool's or the image's).
/// The initiator's default dead time: the Linux driver's `aoe_deadsecs` (60 * 3 s,
/// `drivers/block/aoe/aoecmd.c`), and `aoe initiator --deadsecs`'s default. A request
/// unanswered that long fails with EIO and the device goes down.
pub const INITIATOR_DEADSECS: Duration = Duration::from_secs(180);

/// The largest AoE request the gateway serves, in bytes: 17 sectors, what a frame at MTU
/// 9000 carries (`aoe_wire::max_sectors_for_mtu`).
const LARGEST_REQUEST: u64 = 17 * 512;

/// librbd's QoS limits that throttle every request of the gateway (`librbd::io::
/// ImageDispatcher`'s QoS layer, token buckets per image), and what each counts: requests
/// (`true`) or bytes a second. Burst settings are left out: a limit's rate is what a
/// queue that stays full gets.
const QOS_LIMITS: [(&str, bool); 6] = [
    ("rbd_qos_iops_limit", true),
    ("rbd_qos_read_iops_limit", true),
    ("rbd_qos_write_iops_limit", true),
    ("rbd_qos_bps_limit", false),
    ("rbd_qos_read_bps_limit", false),
    ("rbd_qos_write_bps_limit", false),
];

/// A QoS limit of the image's effective config so low that an initiator's full queue at
/// the export (`buffer_count` requests of the largest size, [`LARGEST_REQUEST`]) takes
/// longer than the initiator's default dead time ([`INITIATOR_DEADSECS`]) to get through
/// it: the last request then fails with EIO at the initiator, and its device goes down
/// (session 34 measured `rbd_qos_iops_limit 20`: 4 KiB writes p99 676 ms, well inside).
/// The tightest such limit, said with where it is set and the way out; `None` if none is.
/// An error, not lost data: what the initiator gave up on fails there.
fn qos_too_slow(
    config: &[aoe_rbd_sys::ConfigOption],
    buffer_count: u16,
    targets: &Targets,
) -> Option<String> {
    let queue = u64::from(buffer_count.max(1));
    let mut worst: Option<(u64, String)> = None;
    for (name, per_request) in QOS_LIMITS {
        let Some(o) = option(config, name) else {
            continue;
        };
        let Ok(limit) = o.value.trim().parse::<u64>() else {
            continue;
        };
        if limit == 0 {
            continue;
        }
        let work = if per_request {
            queue
        } else {
            queue * LARGEST_REQUEST
        };
        let secs = work.div_ceil(limit);
        if secs > INITIATOR_DEADSECS.as_secs() && worst.as_ref().is_none_or(|w| secs > w.0) {
            let what = if per_request {
                format!("{queue} requests")
            } else {
                format!("{queue} requests of {LARGEST_REQUEST} bytes")
            };
            let (at, fix) = match o.source {
                aoe_rbd_sys::ConfigSource::Pool => (
                    "the pool",
                    format!("rbd config pool set {} {name} N", targets.pool),
                ),
                aoe_rbd_sys::ConfigSource::Image => (
                    "the image",
                    format!("rbd config image set {} {name} N", targets.image),
                ),
                aoe_rbd_sys::ConfigSource::Client => (
                    "the client's config",
                    format!("{name} in the gateway's ceph.conf"),
                ),
            };
            worst = Some((
                secs,
                format!(
                    "{name} {limit} (set by {at}): a full queue of {what} (the buffer count, \
                     -b) takes {secs} s, longer than the initiator's default dead time ({} s): \
                     the last would fail with EIO and the device go down; raise the limit \
                     (`{fix}`), lower -b, or raise the initiator's deadsecs",
                    INITIATOR_DEADSECS.as_secs()
                ),
            ));
        }
    }
    worst.map(|w| w.1)
}

fn level(source: aoe_rbd_sys::ConfigSource) -> &'static str {
    if source == aoe_rbd_sys::ConfigSource::Pool {
        "pool"
    } else {
        "image"
    }
}

/// Option `name` of an image's or a pool's effective librbd config, if listed.
fn option<'a>(
    config: &'a [aoe_rbd_sys::ConfigOption],
    name: &str,
) -> Option<&'a aoe_rbd_sys::ConfigOption> {
    config.iter().find(|o| o.name == name)
}

/// Where (`pool` or `image`, [`level`]) the image's config has option `name` at `value`,
/// if it does.
fn set_to(config: &[aoe_rbd_sys::ConfigOption], name: &str, value: &str) -> Option<&'static str> {
    let o = option(config, name)?;
    (o.value == value).then(|| level(o.source))
}

/// Where the pool's or image's config turns `rbd_blocklist_on_break_lock` off over the
/// gateway's own `true` (`pool` or `image`), if it does. librbd's lock break reads the
/// image's config (`managed_lock::BreakRequest`), so this gateway, taking the image over from
/// another, would break that one's lock and leave it free to write: what it had in flight,
/// or accepted before it noticed, would land after this gateway's writes.
fn no_blocklist_on_break(config: &[aoe_rbd_sys::ConfigOption]) -> Option<&'static str> {
    set_to(config, "rbd_blocklist_on_break_lock", "false")
}

/// Where the pool's or image's config turns librbd's cache on (`pool` or `image`), if it
/// does, for a read-only export. librbd keeps what it read in its cache (`ObjectCacher`),
/// and a gateway that holds no lock hears nothing of another gateway's writes: the
/// fourteenth audit read the old data through a read-only gateway after the writable one's
/// acknowledged, flushed write. `rbd:` exports are of the image's head, which another
/// gateway may write, so a read-only one must read from the OSDs.
fn read_cache(config: &[aoe_rbd_sys::ConfigOption]) -> Option<&'static str> {
    set_to(config, "rbd_cache", "true")
}

/// An override a check found: the settings that make it so (each with its source), and
/// the one to remove where it lives.
#[derive(Debug, PartialEq, Eq)]
struct Override {
    settings: String,
    level: &'static str,
    option: &'static str,
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

/// The value of [`RESERVE_KEY`] as a reserve list: none (unset) is empty.
fn parse_reservation(v: Option<&str>) -> io::Result<Vec<[u8; 6]>> {
    match v {
        None => Ok(Vec::new()),
        Some(v) => parse_macs(v).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("image metadata {RESERVE_KEY} is not a MAC list: {v:?}"),
            )
        }),
    }
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
        // the image closes with the last reference (no aio or watch callback holds one),
        // after its last request in flight has completed (aoe-rbd-sys waits for them),
        // releasing the lock for the next gateway.
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.wake(false);
        if let Some(t) = self.monitor.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    /// The monitor thread: when librbd says the header changed, re-reads the size and the
    /// reservation and checks that the lock is still ours; while the export writes, checks
    /// the lock every [`LOCK_RECHECK`] too; when asked, stores reservations. Nothing else:
    /// an idle image costs the cluster nothing beyond librbd's own watch. It never touches
    /// the event loop: a cluster that does not answer blocks only this thread.
    ///
    /// Why the update watch is enough for the lock (librbd `ImageWatcher`): a resize or a
    /// metadata change sends a header update to every watcher; a gateway whose lock is
    /// broken is blocklisted first (`rbd_blocklist_on_break_lock`, set at open), the OSD
    /// drops its watch, librbd finds out at its next watch ping and re-registers, and after
    /// re-registering (failed, since blocklisted) it calls the update callbacks, as it does
    /// after every re-registration because it cannot know what it missed. Until then its
    /// writes already fail at the OSDs with `EBLOCKLISTED`, which fences at once.
    ///
    /// A lock taken without blocklisting (a client with `rbd_blocklist_on_break_lock=false`)
    /// leaves our writes working at the OSDs: librbd does not guard object writes with the
    /// lock. `rbd lock rm` (librbd's `break_lock`) sends a header update after the break, so
    /// the update watch tells us; `rbd_lock_break` followed by `rbd_lock_acquire` sends only
    /// librbd's acquired-lock notification, which reaches no update callback (librbd
    /// `ImageWatcher::handle_payload(AcquiredLockPayload)`). Hence the check every
    /// [`LOCK_RECHECK`] while writes flow: writes sent between the loss and that check
    /// (at most about [`LOCK_RECHECK`] plus a round trip) still land; only blocklisting
    /// fences them at the OSDs.
    fn monitor(&self) {
        loop {
            let (woken, recheck) = {
                let Ok(mut w) = self.wake.flag.lock() else {
                    return;
                };
                let mut recheck = false;
                while !w.updated && !w.poked && !self.stop.load(Ordering::SeqCst) {
                    let (g, t) = match self.wake.cv.wait_timeout(w, LOCK_RECHECK) {
                        Ok(r) => r,
                        Err(_) => return,
                    };
                    w = g;
                    // Only an export that wrote since the last check asks the cluster.
                    if t.timed_out() && self.locked && self.wrote.load(Ordering::SeqCst) {
                        recheck = true;
                        break;
                    }
                }
                (std::mem::take(&mut *w), recheck)
            };
            if self.stop.load(Ordering::SeqCst) {
                // Reservations not stored yet are dropped with their callbacks: the daemon
                // is stopping, and it never answered them.
                return;
            }
            self.store_reservations();
            if woken.updated {
                if let Ok(s) = self.image.size() {
                    self.size.store(s, Ordering::Relaxed);
                }
                self.read_reservation();
                self.recheck_config();
            }
            if (woken.updated || recheck) && self.locked && !self.fence.is_fenced() {
                self.wrote.store(false, Ordering::SeqCst);
                self.check_lock();
            }
        }
    }

    /// Reads the image's effective librbd config again after an update notification (an
    /// `rbd config image set` or `rbd config pool set` on a served image is one: librbd
    /// applies the overrides again at its next refresh, `ImageCtx::apply_metadata`) and
    /// logs, once per change, what a gateway starting on the image now would refuse, or
    /// that nothing is left to refuse. This gateway itself keeps what it opened the image
    /// with: librbd builds its cache layer (`image::OpenRequest`), loads its plugins and
    /// fixes the lock-break settings of its exclusive lock at open, and this gateway breaks
    /// locks only at open (session 33: `rbd_cache`, `rbd_cache_policy`,
    /// `rbd_cache_max_dirty`, `rbd_persistent_cache_mode` and `rbd_plugins` set on a served
    /// image changed what librbd lists, not what it does). But the override would stop
    /// the next gateway, the one taking the image over when this one dies: said now, while
    /// there is time to remove it, rather than at the take-over. A pool's or image's
    /// `rbd_plugins` is logged likewise ([`plugins`]), though it is no refusal: a plugin not
    /// installed stops every open of the image, the next gateway's included.
    fn recheck_config(&self) {
        let config = match self.image.config() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(image = %self.name, error = %e, "config not read");
                return;
            }
        };
        self.recheck_qos(&config);
        let now = refusal(&config, self.read_only, &self.name, &self.targets)
            .map(|e| format!("would refuse it: {e}"))
            .or_else(|| plugins(&config, &self.targets).map(|p| format!("would load {p}")));
        let Ok(mut last) = self.refused.lock() else {
            return;
        };
        if *last == now {
            return;
        }
        match &now {
            Some(e) => tracing::warn!(
                image = %self.name,
                "the image's librbd config changed while it is served: this gateway keeps \
                 what it opened the image with, but a gateway starting on it now (taking it \
                 over, or this one restarted) {e}"
            ),
            None => tracing::info!(
                image = %self.name,
                "the image's librbd config no longer has an override that a starting gateway \
                 would refuse (nor plugins it would load)"
            ),
        }
        *last = now;
    }

    /// Says, once per change, that a QoS limit now set on the served image (or its pool)
    /// makes a full queue wait past the initiator's dead time ([`qos_too_slow`]), or that
    /// none does any more. librbd applies QoS limits at its next refresh after the change
    /// (session 34: `rbd_qos_iops_limit 20` slowed the writes at once), unlike the settings
    /// fixed at open that [`Shared::recheck_config`] says would stop the next gateway.
    fn recheck_qos(&self, config: &[aoe_rbd_sys::ConfigOption]) {
        let now = qos_too_slow(config, self.buffer_count, &self.targets);
        let Ok(mut last) = self.qos_said.lock() else {
            return;
        };
        if *last == now {
            return;
        }
        match &now {
            Some(q) => {
                tracing::warn!(image = %self.name, "the image's librbd config changed while it is served: {q}")
            }
            None => tracing::info!(
                image = %self.name,
                "the image's librbd config no longer has a QoS limit that makes a full queue \
                 wait past the initiator's default dead time"
            ),
        }
        *last = now;
    }

    /// Stores the queued reservations, in order, and tells each one's caller.
    fn store_reservations(&self) {
        loop {
            let job = match self.reserve_jobs.lock() {
                Ok(mut q) => q.pop_front(),
                Err(_) => None,
            };
            let Some(job) = job else {
                return;
            };
            let r = if self.fence.is_fenced() {
                Err(io::Error::from_raw_os_error(libc::EROFS))
            } else if job.macs.is_empty() {
                self.image.metadata_remove(RESERVE_KEY)
            } else {
                self.image
                    .metadata_set(RESERVE_KEY, &format_macs(&job.macs))
            };
            let r = r.map_err(|e| match errno(&e) {
                Some(libc::EROFS) | Some(EBLOCKLISTED) => self.fence.fence(&e),
                _ => e,
            });
            if r.is_ok() {
                // What the cluster holds now: a notification's read from before this store
                // must not be taken after it.
                self.publish_reservation(job.macs.clone());
            }
            (job.done)(r);
        }
    }

    /// Reads the reservation after an update notification and publishes it for
    /// [`RbdBackend::reservation_update`]. A value that is not a MAC list is logged and
    /// ignored (the gateway keeps enforcing what it had); a failed read likewise (the
    /// cluster away: librbd re-registers its watch when it comes back, and that fires the
    /// update callback again).
    fn read_reservation(&self) {
        match self.image.metadata_get(RESERVE_KEY) {
            Ok(v) => match parse_reservation(v.as_deref()) {
                Ok(macs) => self.publish_reservation(macs),
                Err(e) => {
                    tracing::warn!(image = %self.name, error = %e, "reservation not taken")
                }
            },
            Err(e) => {
                tracing::debug!(image = %self.name, error = %e, "reservation not read")
            }
        }
    }

    fn publish_reservation(&self, macs: Vec<[u8; 6]>) {
        if let Ok(mut u) = self.reserve_update.lock() {
            *u = Some(macs);
            self.reserve_changed.store(true, Ordering::SeqCst);
        }
    }

    /// Asks the cluster who holds the lock (`rbd_lock_get_owners`). Fenced if the cluster
    /// says we are blocklisted, or if the owner is not us (someone broke our lock without
    /// blocklisting us, or the lock is free): librbd itself does not find out (without a
    /// blocklist our writes still work). Other errors (the cluster away) change nothing:
    /// the next update or write-time check asks again.
    fn check_lock(&self) {
        match self.image.lock_owners() {
            Ok(owners) => {
                if !owners.iter().any(|o| is_us(&self.addrs, o)) {
                    let held = if owners.is_empty() {
                        "nobody".to_string()
                    } else {
                        owners.join(",")
                    };
                    self.fence.fence(&io::Error::other(format!(
                        "the lock is held by {held}, not by this gateway ({})",
                        self.addrs
                    )));
                }
            }
            Err(e) if matches!(errno(&e), Some(EBLOCKLISTED)) => {
                self.fence.fence(&e);
            }
            Err(e) => tracing::debug!(image = %self.name, error = %e, "lock owner check failed"),
        }
    }

    /// Takes the exclusive lock; if another client holds it, breaks that client's lock
    /// (the cluster blocklists it first) and takes it then. A holder found at open is
    /// broken before asking for the lock: `rbd_lock_acquire` first asks the holder to
    /// release it (a dead gateway's watch stays registered until the OSD's watch timeout,
    /// so that request waited about 30 s for nobody: `kernel-initiator.sh -H replace`, B
    /// logged `breaking it` 28 s before it served; a live `aoe serve` never hands it over).
    /// True if another client held it (we took the image over from another gateway).
    fn take_lock(&self) -> io::Result<bool> {
        let holders = self.image.lock_owners()?;
        for owner in &holders {
            tracing::warn!(
                image = %self.name,
                %owner,
                "the image's exclusive lock is held by another client; breaking it \
                 (the holder is blocklisted and can no longer write)"
            );
            self.break_lock(owner)?;
        }
        let first = match self.image.lock_acquire() {
            Ok(()) => return Ok(!holders.is_empty()),
            Err(e) => e,
        };
        // Someone took it in between: broken too.
        let owners = self.image.lock_owners()?;
        if owners.is_empty() {
            return Err(first);
        }
        for owner in &owners {
            tracing::warn!(image = %self.name, %owner, "breaking the exclusive lock of a new holder");
            self.break_lock(owner)?;
        }
        self.image.lock_acquire().map(|()| true)
    }

    /// Breaks `owner`'s lock; one already gone (released, or broken by another) is fine.
    ///
    /// The gateway blocklists `owner` itself first, for the monitors' default time, and
    /// again after the break: the fence does not depend on librbd's `rbd_blocklist_on_break_lock`
    /// and `rbd_blocklist_expire_seconds`, which librbd fixes in the image's exclusive lock
    /// from the image's config when it opens the image (`ExclusiveLock`'s constructor;
    /// session 33: a value set on an open image does not reach its lock break). The
    /// gateway's check of that config ([`refusal`]) reads it again after the open, so an
    /// override removed in between (milliseconds) would pass the check while the lock still
    /// breaks with it: without blocklisting (the old holder's queued writes would land over
    /// ours) or, where librbd's break with an expiry works, re-blocklisting for seconds over
    /// the hour. Blocklisting before the break fences the holder whatever the lock does; the
    /// second blocklist restores the hour if librbd's break shortened it.
    fn break_lock(&self, owner: &str) -> io::Result<()> {
        self.image.blocklist(owner)?;
        match self.image.lock_break(owner) {
            Err(e) if matches!(errno(&e), Some(libc::ENOENT)) => {}
            r => r?,
        }
        self.image.blocklist(owner)
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

    /// Checks a request against the size last read (by the monitor after each update
    /// notification, and on every IDENTIFY): no cluster call on the I/O path.
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

/// The most bytes one merged read asks librbd for ([`RbdBackend::submit_reads`]): a
/// receive batch's worth of 8 KiB frames (64, the daemon's batch) fits, and librbd splits a
/// read that spans objects into one OSD op per object itself.
pub const MAX_READ_RUN: u64 = 1 << 20;

impl AsyncBackend for RbdBackend {
    fn len(&self) -> u64 {
        self.shared.len()
    }

    fn read_only(&self) -> bool {
        self.shared.read_only
    }

    fn failed(&self) -> bool {
        self.lock_lost()
    }

    fn submit(&self, req: Request) -> Result<(), Request> {
        let sh = &self.shared;
        if sh.image.aio_in_flight() >= MAX_IN_FLIGHT {
            return Err(req);
        }
        let Request { op, token, buf, .. } = req;
        let writes = !matches!(op, Op::Read { .. });
        // Refused before librbd sees it: completed at once, with the error.
        let refuse = |buf: Vec<u8>, e: io::Error| {
            sh.completions.push(Done {
                user: token,
                buf,
                result: Err(e),
            });
        };
        if writes && !matches!(op, Op::Flush) && sh.read_only {
            refuse(buf, io::Error::from_raw_os_error(libc::EROFS));
            return Ok(());
        }
        // A gateway that lost the lock (noticed by the monitor, or by an earlier write's
        // error) sends no write, write-zeroes or flush to the cluster: EROFS, the error of
        // a write refused on a lost lock, an ATA error on the wire.
        if writes && sh.fence.is_fenced() {
            refuse(buf, io::Error::from_raw_os_error(libc::EROFS));
            return Ok(());
        }
        if writes && sh.locked {
            sh.wrote.store(true, Ordering::SeqCst);
        }
        let (aio, range) = match op {
            Op::Read { offset, at } => {
                let n = at.len() as u64;
                (AioOp::Read { offset, at }, Some((offset, n)))
            }
            Op::Write { offset, from } => {
                let n = from.len() as u64;
                (AioOp::Write { offset, from }, Some((offset, n)))
            }
            Op::WriteZeroes { offset, len } => {
                (AioOp::WriteZeroes { offset, len }, Some((offset, len)))
            }
            Op::Flush => (AioOp::Flush, None),
        };
        if let Some((offset, n)) = range {
            if let Err(e) = sh.check_range(offset, n) {
                refuse(buf, e);
                return Ok(());
            }
        }
        let read_len = match &aio {
            AioOp::Read { at, .. } => Some(at.len()),
            _ => None,
        };
        // The callback holds the queue and the fence, never the image (see [`Fence`]).
        let completions = sh.completions.clone();
        let fence = sh.fence.clone();
        let locked = sh.locked;
        sh.image.aio_submit(
            aio,
            buf,
            Box::new(move |buf, r| {
                let result = if r < 0 {
                    let e = io::Error::from_raw_os_error((-r) as i32);
                    Err(if writes {
                        fence.write_error(e)
                    } else {
                        fence.read_error(e, locked)
                    })
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

    fn merges_reads(&self) -> bool {
        true
    }

    /// A receive batch's reads: each run of contiguous ones ([`aoe_store::read_runs`], at
    /// most [`MAX_READ_RUN`] bytes and [`MAX_READV_PARTS`] parts) is one `rbd_aio_readv`
    /// that librbd scatters straight into the requests' buffers, so one OSD op per object
    /// instead of one per frame, and one completion (every part gets the run's result). A
    /// run of one is a plain read ([`AsyncBackend::submit`]); a read outside the image is
    /// refused alone, before the runs are formed.
    fn submit_reads(&self, reads: Vec<Request>) -> Vec<Request> {
        let sh = &self.shared;
        let mut inside = Vec::with_capacity(reads.len());
        for r in reads {
            if let Op::Read { offset, at } = &r.op {
                if let Err(e) = sh.check_range(*offset, at.len() as u64) {
                    sh.completions.push(Done {
                        user: r.token,
                        buf: r.buf,
                        result: Err(e),
                    });
                    continue;
                }
            }
            inside.push(r);
        }
        let mut back = Vec::new();
        for run in read_runs(inside, MAX_READ_RUN, MAX_READV_PARTS) {
            if run.parts.len() == 1 {
                back.extend(run.parts.into_iter().filter_map(|r| self.submit(r).err()));
                continue;
            }
            if sh.image.aio_in_flight() >= MAX_IN_FLIGHT {
                back.extend(run.parts);
                continue;
            }
            let mut tokens = Vec::with_capacity(run.parts.len());
            let parts = run
                .parts
                .into_iter()
                .map(|r| {
                    tokens.push(r.token);
                    let at = match r.op {
                        Op::Read { at, .. } => at,
                        // read_runs joins reads only.
                        _ => 0..0,
                    };
                    (r.buf, at)
                })
                .collect();
            let completions = sh.completions.clone();
            let fence = sh.fence.clone();
            let locked = sh.locked;
            let want = run.len;
            sh.image.aio_readv(
                run.offset,
                parts,
                Box::new(move |bufs, r| {
                    let result = || {
                        if r < 0 {
                            Err(fence.read_error(io::Error::from_raw_os_error((-r) as i32), locked))
                        } else if r as u64 != want {
                            Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!("rbd read: {r} of {want} bytes"),
                            ))
                        } else {
                            Ok(())
                        }
                    };
                    completions.push_all(bufs.into_iter().zip(tokens).map(|(buf, user)| Done {
                        user,
                        buf,
                        result: result(),
                    }));
                }),
            );
        }
        back
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

#[cfg(test)]
mod tests {
    use super::*;
    use aoe_rbd_sys::{ConfigOption, ConfigSource};

    fn opt(name: &str, value: &str, source: ConfigSource) -> ConfigOption {
        ConfigOption {
            name: name.into(),
            value: value.into(),
            source,
        }
    }

    fn targets() -> Targets {
        Targets::new(&RbdOptions {
            pool: "rbd".into(),
            namespace: None,
            image: "q".into(),
            ceph_conf: None,
            client_id: None,
            keyring: None,
            connect_timeout: Duration::from_secs(5),
            read_only: false,
            buffer_count: 128,
        })
    }

    /// Session 35: a QoS limit is said when a full queue (the buffer count) of the largest
    /// requests takes longer than the initiator's default dead time (180 s), and only then.
    #[test]
    fn a_qos_limit_is_said_when_a_full_queue_takes_longer_than_deadsecs() {
        let t = targets();
        let none = [
            opt("rbd_qos_iops_limit", "0", ConfigSource::Client),
            opt("rbd_qos_bps_limit", "0", ConfigSource::Client),
            opt("rbd_cache", "false", ConfigSource::Client),
        ];
        assert_eq!(qos_too_slow(&none, 128, &t), None, "0 is no limit");
        // Session 34's 20 requests a second: 128 in 7 s.
        let iops20 = [opt("rbd_qos_iops_limit", "20", ConfigSource::Image)];
        assert_eq!(qos_too_slow(&iops20, 128, &t), None);
        // 1 a second: 128 s at -b 128 is inside; 8192 s at -b 8192 is not.
        let iops1 = [opt("rbd_qos_write_iops_limit", "1", ConfigSource::Image)];
        assert_eq!(qos_too_slow(&iops1, 128, &t), None);
        let said = qos_too_slow(&iops1, 8192, &t).expect("8192 s");
        assert!(
            said.starts_with(
                "rbd_qos_write_iops_limit 1 (set by the image): a full queue of 8192 requests"
            ),
            "{said}"
        );
        assert!(said.contains("takes 8192 s"), "{said}");
        assert!(
            said.contains("rbd config image set rbd/q rbd_qos_write_iops_limit N"),
            "{said}"
        );
        // Bytes: 128 x 8704 bytes at 6000 B/s is 186 s; at 7000 B/s, 160 s.
        let bps = |v: &str| [opt("rbd_qos_bps_limit", v, ConfigSource::Pool)];
        assert_eq!(qos_too_slow(&bps("7000"), 128, &t), None);
        let said = qos_too_slow(&bps("6000"), 128, &t).expect("186 s");
        assert!(said.contains("takes 186 s"), "{said}");
        assert!(
            said.contains("rbd config pool set rbd rbd_qos_bps_limit N"),
            "{said}"
        );
        // The tightest of several is said.
        let both = [
            opt("rbd_qos_bps_limit", "6000", ConfigSource::Pool),
            opt("rbd_qos_read_iops_limit", "0", ConfigSource::Client),
            opt("rbd_qos_iops_limit", "", ConfigSource::Client),
            opt("rbd_qos_read_bps_limit", "1000", ConfigSource::Image),
        ];
        let said = qos_too_slow(&both, 128, &t).expect("1115 s");
        assert!(said.starts_with("rbd_qos_read_bps_limit 1000"), "{said}");
        assert!(said.contains("takes 1115 s"), "{said}");
    }
}
