//! What a running target shows of itself: a [`Snapshot`] of its exports, counters and lists,
//! published by the daemon's own loop into an [`Observer`] that other threads (the metrics
//! responder, the control socket) read.
//!
//! The hot path is untouched: the counters are the ones the engine and the daemon already
//! keep ([`aoe_proto::target::Stats`], the worker-queue and send-backlog drops); the loop
//! copies them into a new snapshot once a second, and sooner when a reader asks
//! ([`Observer::fresh`]). `clear-stats` (ggaoectl's) is a baseline kept here and subtracted
//! from what is shown, so the daemon's own totals (which its drop log lines difference)
//! never go backwards.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Counters of one export, since it was opened (or since `clear-stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportCounters {
    /// Requests answered (replies sent or queued).
    pub replies: u64,
    /// Replies with the AoE error flag.
    pub aoe_errors: u64,
    /// ATA commands answered with the ERR status bit.
    pub ata_errors: u64,
    /// Bytes read from the backing store for initiators.
    pub bytes_read: u64,
    /// Bytes written to the backing store.
    pub bytes_written: u64,
    /// FLUSH CACHE commands performed.
    pub flushes: u64,
    /// Requests dropped, any reason (the engine's count).
    pub dropped: u64,
    /// Requests dropped because the buffer count was reached.
    pub dropped_over_buffer_count: u64,
    /// Requests dropped because the I/O worker queue was full.
    pub dropped_queue_full: u64,
    /// Requests dropped because their source held its fair share of the buffer count while
    /// another source waited (`aoe_proto::target::DropReason::OverFairShare`).
    #[serde(default)]
    pub dropped_over_fair_share: u64,
    /// Requests whose reply was not sent: longer than the interface's frame
    /// (`aoe_proto::target::DropReason::ReplyTooLong`).
    #[serde(default)]
    pub dropped_reply_too_long: u64,
    /// Requests by command ([`aoe_proto::target::RequestCounts`]).
    #[serde(default)]
    pub requests: RequestCounters,
    /// Replies with the AoE error flag by error code
    /// ([`aoe_proto::target::AoeErrorCounts`]).
    #[serde(default)]
    pub aoe_error_codes: AoeErrorCounters,
    /// The duplicate-write table ([`aoe_proto::target::DedupCounts`]).
    #[serde(default)]
    pub duplicate_writes: DedupCounters,
    /// WRITEs addressed to a wildcard shelf or slot, aborted unexecuted (docs/PROTOCOL.md 1.7).
    #[serde(default)]
    pub wildcard_writes_refused: u64,
}

/// Generates a serializable copy of an engine counter struct, with `minus` for `clear-stats`.
macro_rules! counters {
    ($(#[$m:meta])* $name:ident from $src:path { $($(#[$fm:meta])* $f:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct $name {
            $($(#[$fm])* pub $f: u64,)*
        }

        impl From<$src> for $name {
            fn from(c: $src) -> Self {
                $name { $($f: c.$f,)* }
            }
        }

        impl $name {
            fn minus(self, b: $name) -> $name {
                $name { $($f: self.$f.saturating_sub(b.$f),)* }
            }

            /// Every counter with its name (the metric label and the JSON key).
            pub fn named(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($f), self.$f),)*]
            }
        }
    };
}

counters! {
    /// Requests for an export by command, as the engine counts them.
    RequestCounters from aoe_proto::target::RequestCounts {
        /// ATA READ SECTORS (EXT).
        ata_read,
        /// ATA WRITE SECTORS (EXT).
        ata_write,
        /// ATA IDENTIFY DEVICE.
        ata_identify,
        /// ATA FLUSH CACHE (EXT).
        ata_flush,
        /// Other ATA commands.
        ata_other,
        /// Query Config read and tests.
        config_query,
        /// Query Config set and force set.
        config_set,
        /// Mac Mask List.
        mac_mask,
        /// Reserve/Release.
        reserve,
        /// Unknown AoE commands.
        unknown,
    }
}

counters! {
    /// Replies with the AoE error flag by error code (AoEr11 section 2.4).
    AoeErrorCounters from aoe_proto::target::AoeErrorCounts {
        /// 1.
        unrecognized_command,
        /// 2.
        bad_argument,
        /// 3.
        device_unavailable,
        /// 4.
        config_string_present,
        /// 5.
        unsupported_version,
        /// 6.
        target_reserved,
    }
}

counters! {
    /// What the duplicate-write table did ([`aoe_proto::target::DedupCounts`]).
    DedupCounters from aoe_proto::target::DedupCounts {
        /// Requests under an answered write's key, nothing overwritten since: run again.
        executed_again,
        /// Copies of a write in flight, dropped.
        dropped_in_flight,
        /// Requests under the key of a write overwritten since, dropped unanswered.
        dropped_superseded,
        /// Writes forgotten inside the window because the table was full.
        evicted,
    }
}

impl ExportCounters {
    fn minus(self, b: ExportCounters) -> ExportCounters {
        ExportCounters {
            replies: self.replies.saturating_sub(b.replies),
            aoe_errors: self.aoe_errors.saturating_sub(b.aoe_errors),
            ata_errors: self.ata_errors.saturating_sub(b.ata_errors),
            bytes_read: self.bytes_read.saturating_sub(b.bytes_read),
            bytes_written: self.bytes_written.saturating_sub(b.bytes_written),
            flushes: self.flushes.saturating_sub(b.flushes),
            dropped: self.dropped.saturating_sub(b.dropped),
            dropped_over_buffer_count: self
                .dropped_over_buffer_count
                .saturating_sub(b.dropped_over_buffer_count),
            dropped_queue_full: self.dropped_queue_full.saturating_sub(b.dropped_queue_full),
            dropped_over_fair_share: self
                .dropped_over_fair_share
                .saturating_sub(b.dropped_over_fair_share),
            dropped_reply_too_long: self
                .dropped_reply_too_long
                .saturating_sub(b.dropped_reply_too_long),
            requests: self.requests.minus(b.requests),
            aoe_error_codes: self.aoe_error_codes.minus(b.aoe_error_codes),
            duplicate_writes: self.duplicate_writes.minus(b.duplicate_writes),
            wildcard_writes_refused: self
                .wildcard_writes_refused
                .saturating_sub(b.wildcard_writes_refused),
        }
    }
}

/// One export as the daemon serves it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportStatus {
    /// `shelf.slot`.
    pub target: String,
    /// Shelf.
    pub shelf: u16,
    /// Slot.
    pub slot: u8,
    /// Interfaces it is served on.
    pub interfaces: Vec<String>,
    /// Backing file or device.
    pub path: String,
    /// Size in sectors.
    pub sectors: u64,
    /// Offset into the backing store, bytes.
    pub offset: u64,
    /// Read-only (`-r`).
    pub read_only: bool,
    /// `O_DIRECT` (`-d`).
    pub direct: bool,
    /// `O_SYNC` (`-s`).
    pub sync: bool,
    /// Buffer count advertised (`-b`).
    pub buffer_count: u16,
    /// Requests in flight now.
    pub in_flight: u32,
    /// Most requests in flight at once.
    pub max_in_flight: u32,
    /// The Query Config string.
    pub config_string: String,
    /// The Mac Mask List (empty: everyone).
    pub mask: Vec<String>,
    /// The reserve list (empty: not reserved).
    pub reserve: Vec<String>,
    /// The store refuses writes: a latched write-back failure of a file, or an `rbd:` export
    /// whose exclusive lock another gateway took over (issue 13).
    #[serde(default)]
    pub failed: bool,
    /// How long the oldest request in flight has waited on the store, whole seconds (0:
    /// none, or for less than a second); 5 or more is a stuck store, also logged
    /// (`requests waiting on the backend`).
    #[serde(default)]
    pub oldest_request_secs: u32,
    /// The export's path no longer names the file it serves (renamed over or removed, seen
    /// within 5 s): reads and writes go to the file opened until a reload reopens the path.
    #[serde(default)]
    pub path_replaced: bool,
    /// Other targets seen answering for this shelf.slot (the conflict watch's probes, or
    /// the start probe with `allow_duplicate`): an initiator takes them and us as paths of
    /// one disk and mixes their data. Empty: none seen.
    #[serde(default)]
    pub conflicts: Vec<AddressConflict>,
    /// Counters.
    pub counters: ExportCounters,
}

/// Another target answering for one of our addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressConflict {
    /// Its MAC address.
    pub mac: String,
    /// Our interface that heard it.
    pub interface: String,
    /// Seconds since it last answered a probe.
    pub last_seen_secs: u64,
}

/// An export a start or a reload has opened but does not serve yet: it took its `rbd:`
/// image over from another gateway (broke its lock) and waits for that gateway to notice
/// and fall silent before it answers at the address (`daemon/exports.rs`, `TakingOver`;
/// the gateway's wait of README "Fencing and failover"). Until session 29 only the log said
/// so (`waiting for it to stop`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingExport {
    /// `shelf.slot`.
    pub target: String,
    /// Interfaces it is to be served on.
    pub interfaces: Vec<String>,
    /// The store (`rbd:POOL/IMAGE`).
    pub path: String,
    /// `start` (the daemon's own start; its other exports serve meanwhile) or `reload` (the
    /// running configuration serves on; nothing of the reload is installed yet).
    pub during: String,
    /// Seconds since the epoch when the wait began.
    pub since: f64,
    /// Seconds it has waited.
    pub waiting_secs: u64,
    /// Seconds left before it gives up and is refused as a duplicate address (unless
    /// `allow_duplicate`).
    pub gives_up_in_secs: u64,
    /// What it waits for: the other targets its last probe heard answering at the address
    /// (the gateway whose lock was broken, until it notices).
    pub waiting_for: Vec<AddressConflict>,
}

/// One interface's reply-side counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IfaceStatus {
    /// Interface name.
    pub name: String,
    /// MTU.
    pub mtu: u32,
    /// Replies the socket refused with an error.
    pub send_failed: u64,
    /// Replies dropped because the send backlog was full.
    pub backlog_full: u64,
    /// Replies the kernel refused from the transmit ring (`TP_STATUS_WRONG_FORMAT`: too
    /// long for the interface's MTU, or malformed), which no socket error reports.
    #[serde(default)]
    pub tx_rejected: u64,
    /// Requests the kernel dropped before the target read them, its socket's receive ring
    /// or queue full (`PACKET_STATISTICS` `tp_drops`). Read once per published snapshot.
    #[serde(default)]
    pub rx_dropped: u64,
}

/// Everything a reader sees of the target at one moment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Seconds since the epoch when the snapshot was taken.
    pub taken: f64,
    /// Process ID of the daemon.
    pub pid: u32,
    /// Seconds the daemon has been running.
    pub uptime: f64,
    /// The configuration file, if started with one.
    pub config_file: Option<String>,
    /// I/O worker threads.
    pub workers: usize,
    /// Exports, by shelf and slot.
    pub exports: Vec<ExportStatus>,
    /// Interfaces.
    pub interfaces: Vec<IfaceStatus>,
    /// State files (`--state-dir`) whose last save failed: their newest state (config
    /// string, mask or reserve list) is only in memory while the save is tried again.
    #[serde(default)]
    pub state_files_failing: usize,
    /// Failed state file saves since the start, each try counted.
    #[serde(default)]
    pub state_save_failures: u64,
    /// Address conflict probes finished since the start (the conflict watch, every
    /// `conflict_check_s`): what each export's `conflicts` is as of.
    #[serde(default)]
    pub conflict_probes: u64,
    /// Exports opened but not served yet, waiting to take their address over from another
    /// gateway ([`PendingExport`]). Empty: none.
    #[serde(default)]
    pub pending: Vec<PendingExport>,
    /// A reload (SIGHUP) under way, if any ([`ReloadStatus`]).
    #[serde(default)]
    pub reload: Option<ReloadStatus>,
}

/// A reload under way: the running configuration serves on until it is committed or
/// refused. Until session 29 only the log said so (`the reload is still opening its stores
/// after N s`, from 5 s on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadStatus {
    /// The configuration file it reads (`(command line)` for exports given as arguments).
    pub config: String,
    /// `opening` (a thread of its own opens the new stores: an `open(2)`, an RBD
    /// connection) or `taking_over` (its exports wait for an old gateway to fall silent:
    /// [`Snapshot::pending`]).
    pub phase: String,
    /// Seconds since it began (the loop's once-a-second ticks).
    pub secs: u64,
}

/// Counters at the last `clear-stats`: per export (`shelf.slot`), and per interface
/// (send failures, backlog drops).
type Baseline = (
    BTreeMap<String, ExportCounters>,
    BTreeMap<String, (u64, u64, u64)>,
);

/// Wakes the daemon's loop.
pub type Waker = Box<dyn Fn() + Send + Sync>;

/// The daemon's published state and the requests readers leave for it.
#[derive(Default)]
pub struct Observer {
    current: Mutex<(u64, Arc<Snapshot>)>,
    published: Condvar,
    wanted: AtomicBool,
    /// Wakes the daemon's loop from its poll, so a reader waits for no timeout.
    waker: Mutex<Option<Waker>>,
    /// Counters at the last `clear-stats`, by `shelf.slot` (and interface name).
    baseline: Mutex<Baseline>,
}

impl Observer {
    /// A new observer with an empty snapshot.
    pub fn new() -> Arc<Observer> {
        Arc::new(Observer::default())
    }

    /// Called by the daemon when it starts its loop: how to wake it.
    pub fn set_waker(&self, w: Waker) {
        *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
    }

    /// Called by the daemon's loop: true when a reader is waiting for a fresh snapshot.
    pub fn wanted(&self) -> bool {
        self.wanted.swap(false, Ordering::Relaxed)
    }

    /// Called by the daemon's loop with the state as it is now.
    pub fn publish(&self, snap: Snapshot) {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        cur.0 += 1;
        cur.1 = Arc::new(snap);
        self.published.notify_all();
    }

    /// The latest snapshot, as published (raw totals, no baseline applied).
    pub fn latest(&self) -> Arc<Snapshot> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// Asks the daemon for a snapshot taken from now on and waits up to `within` for it
    /// (the loop wakes at least once a second); returns the latest one either way, raw
    /// totals (what metrics export: counters never go backwards).
    pub fn fresh(&self, within: Duration) -> Arc<Snapshot> {
        let guard = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let seen = guard.0;
        self.wanted.store(true, Ordering::Relaxed);
        if let Some(w) = &*self.waker.lock().unwrap_or_else(|e| e.into_inner()) {
            w();
        }
        let (guard, _) = self
            .published
            .wait_timeout_while(guard, within, |c| c.0 == seen)
            .unwrap_or_else(|e| e.into_inner());
        guard.1.clone()
    }

    /// Like [`fresh`](Self::fresh) with the `clear-stats` baseline subtracted (what the
    /// control tool shows).
    pub fn fresh_shown(&self, within: Duration) -> Snapshot {
        let snap = self.fresh(within);
        self.shown(&snap)
    }

    /// `snap` with the `clear-stats` baseline subtracted.
    fn shown(&self, snap: &Snapshot) -> Snapshot {
        let base = self.baseline.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = snap.clone();
        for e in &mut s.exports {
            if let Some(b) = base.0.get(&e.target) {
                e.counters = e.counters.minus(*b);
            }
        }
        for i in &mut s.interfaces {
            if let Some(&(f, b, r)) = base.1.get(&i.name) {
                i.send_failed = i.send_failed.saturating_sub(f);
                i.backlog_full = i.backlog_full.saturating_sub(b);
                i.rx_dropped = i.rx_dropped.saturating_sub(r);
            }
        }
        s
    }

    /// ggaoectl `clear-stats`: counters shown from now on start at zero (for `shelf.slot`
    /// only, or every export and interface).
    pub fn clear_stats(&self, within: Duration, only: Option<&str>) -> usize {
        let snap = self.fresh(within);
        let mut base = self.baseline.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for e in &snap.exports {
            if only.is_none_or(|t| t == e.target) {
                base.0.insert(e.target.clone(), e.counters);
                n += 1;
            }
        }
        if only.is_none() {
            for i in &snap.interfaces {
                base.1.insert(
                    i.name.clone(),
                    (i.send_failed, i.backlog_full, i.rx_dropped),
                );
            }
        }
        n
    }
}

/// Seconds since the epoch, for [`Snapshot::taken`].
pub fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

// ------------------------------------------------------------------------------------------
// The control socket (`aoe target`, after ggaoed's ggaoectl)

/// A control request: one JSON object on one line, e.g. `{"cmd":"stats","target":"7.3"}`.
#[derive(Debug, Clone, Deserialize)]
pub struct Request {
    /// `status`, `stats`, `show-config`, `show-macmask`, `show-reserve`, `clear-stats` or
    /// `monitor`.
    pub cmd: String,
    /// Only this export (`shelf.slot`); every export when absent.
    #[serde(default)]
    pub target: Option<String>,
    /// `monitor`: milliseconds between samples (default 1000, at least 100).
    #[serde(default)]
    pub interval_ms: Option<u64>,
    /// `monitor`: samples to send before closing (default: until the client goes away).
    #[serde(default)]
    pub count: Option<u64>,
}

/// The default socket path: `/run/aoe/serve-PID.sock`.
pub fn default_socket_path() -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/run/aoe/serve-{}.sock", std::process::id()))
}

/// Removes the `serve-PID.sock` files in `dir` (the default sockets' directory) left by
/// targets that were killed: no process PID exists and nothing accepts on the socket.
/// Each SIGKILL left one behind for good, since the next target takes a path of its own.
/// Returns how many went.
pub fn remove_dead_sockets(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("serve-")?.strip_suffix(".sock"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let path = e.path();
        // Only sockets: a file of another kind under that name is not ours to remove.
        if !e.file_type().is_ok_and(|t| {
            use std::os::unix::fs::FileTypeExt;
            t.is_socket()
        }) {
            continue;
        }
        if std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::os::unix::net::UnixStream::connect(&path).is_ok()
        {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// A listening control socket; the socket file is removed when it is dropped, if the path
/// still names the socket this one bound (device and inode), not a file put there since.
#[derive(Debug)]
pub struct ControlSocket {
    path: std::path::PathBuf,
    id: Option<(u64, u64)>,
}

/// Device and inode of what `path` names (not following a symbolic link).
fn path_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if self.id.is_some() && path_id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Connections answered at once, a thread each; one beyond them gets an error line and is
/// closed. Before the bound every connection held a thread for as long as it stayed open
/// (docs/TEST-AUDIT.md, sixth audit, row 2).
pub const MAX_CONTROL_CONNECTIONS: usize = 64;
/// The longest request line read; a longer one gets an error and the connection is
/// closed (before, a line without an end grew the daemon's memory for as long as it came).
pub const MAX_REQUEST_LINE: usize = 64 * 1024;
/// A connection that sends no request for this long is closed.
const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// A client that reads none of an answer (or of `monitor`'s samples) for this long is
/// closed; before, its thread waited in the write for ever.
const WRITE_LIMIT: Duration = Duration::from_secs(10);

/// What a file type is, in words, for an error that names it.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else {
        "not a socket"
    }
}

/// Listens on the Unix socket `path` (mode 0600, its directory created 0700 if missing) and
/// answers requests from a thread per connection, at most [`MAX_CONTROL_CONNECTIONS`] at
/// once. A stale socket file (nothing listening) is replaced; a live one is refused,
/// naming it, and so is anything at `path` that is not a socket (it is left alone).
pub fn listen(path: &std::path::Path, obs: Arc<Observer>) -> anyhow::Result<ControlSocket> {
    use anyhow::Context as _;
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    use std::os::unix::net::{UnixListener, UnixStream};
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
    }
    // Only a socket is ever removed: a path that names anything else (a typo naming the
    // exported image or the config file, a directory) is refused, untouched. Until session
    // 27 any file there that nothing listened on was deleted as a "stale socket".
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            anyhow::bail!(
                "control socket {} exists and is not a socket ({}); not removed: give \
                 --control PATH (or control = \"PATH\" in the config file) a path of its own",
                path.display(),
                file_kind(&m.file_type())
            );
        }
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "control socket {} is in use by another aoe serve; give this one another \
                 --control PATH (or control = \"PATH\" in its config file)",
                path.display()
            );
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot create control socket {}", path.display()))?;
    let id = path_id(path);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    tracing::info!(socket = %path.display(), "control socket listening");
    std::thread::Builder::new()
        .name("aoe-control".into())
        .spawn(move || {
            use std::sync::atomic::AtomicUsize;
            let busy = Arc::new(AtomicUsize::new(0));
            for mut conn in listener.incoming().flatten() {
                if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CONTROL_CONNECTIONS {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    let _ = conn.set_write_timeout(Some(Duration::from_millis(100)));
                    let _ = reply_err(
                        &mut conn,
                        &format!(
                            "{MAX_CONTROL_CONNECTIONS} control connections are open; \
                             try again when one has closed"
                        ),
                    );
                    continue;
                }
                let (obs, done) = (obs.clone(), busy.clone());
                let spawned = std::thread::Builder::new()
                    .name("aoe-control-conn".into())
                    .spawn(move || {
                        let _ = handle(conn, &obs);
                        done.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    busy.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })
        .context("cannot start the control thread")?;
    Ok(ControlSocket {
        path: path.to_path_buf(),
        id,
    })
}

/// Waits this long for the loop to publish a fresh snapshot (it wakes once a second).
const FRESH: Duration = Duration::from_millis(1500);

/// Answers the requests of one connection, a line each, until it closes (or sends none
/// for [`IDLE_LIMIT`], a line over [`MAX_REQUEST_LINE`], or reads nothing for
/// [`WRITE_LIMIT`]).
fn handle(conn: std::os::unix::net::UnixStream, obs: &Observer) -> std::io::Result<()> {
    use std::io::{BufRead, BufReader, Read, Write};
    conn.set_read_timeout(Some(IDLE_LIMIT))?;
    conn.set_write_timeout(Some(WRITE_LIMIT))?;
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    loop {
        let mut raw = Vec::new();
        let n = (&mut reader)
            .take(MAX_REQUEST_LINE as u64 + 1)
            .read_until(b'\n', &mut raw)?;
        if n == 0 {
            return Ok(());
        }
        if raw.len() > MAX_REQUEST_LINE {
            return reply_err(
                &mut out,
                &format!("request longer than {MAX_REQUEST_LINE} bytes"),
            );
        }
        let line = String::from_utf8_lossy(&raw);
        if line.trim().is_empty() {
            continue;
        }
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                reply_err(&mut out, &format!("bad request: {e}"))?;
                continue;
            }
        };
        if req.cmd == "monitor" {
            let every = Duration::from_millis(req.interval_ms.unwrap_or(1000).max(100));
            let mut sent = 0u64;
            while req.count.is_none_or(|c| sent < c) {
                let snap = filtered(obs.fresh_shown(FRESH), req.target.as_deref());
                let v = serde_json::json!({ "ok": true, "data": snap });
                writeln!(out, "{v}")?;
                out.flush()?;
                sent += 1;
                if req.count.is_none_or(|c| sent < c) {
                    std::thread::sleep(every);
                }
            }
            continue;
        }
        let data = match req.cmd.as_str() {
            "status" | "stats" | "show-config" | "show-macmask" | "show-reserve" => {
                let snap = filtered(obs.fresh_shown(FRESH), req.target.as_deref());
                if let Some(t) = &req.target {
                    if snap.exports.is_empty() {
                        reply_err(&mut out, &format!("no export {t} on this target"))?;
                        continue;
                    }
                }
                serde_json::to_value(snap).unwrap_or_default()
            }
            "clear-stats" => {
                let n = obs.clear_stats(FRESH, req.target.as_deref());
                if n == 0 && req.target.is_some() {
                    let t = req.target.as_deref().unwrap_or_default();
                    reply_err(&mut out, &format!("no export {t} on this target"))?;
                    continue;
                }
                serde_json::json!({ "cleared": n })
            }
            other => {
                reply_err(&mut out, &format!("unknown command {other:?}"))?;
                continue;
            }
        };
        writeln!(out, "{}", serde_json::json!({ "ok": true, "data": data }))?;
        out.flush()?;
    }
}

fn reply_err(out: &mut impl std::io::Write, msg: &str) -> std::io::Result<()> {
    writeln!(out, "{}", serde_json::json!({ "ok": false, "error": msg }))?;
    out.flush()
}

/// `snap` with only export `target` (`shelf.slot` or `eshelf.slot`), or all.
fn filtered(mut snap: Snapshot, target: Option<&str>) -> Snapshot {
    if let Some(t) = target {
        let t = t.strip_prefix('e').unwrap_or(t);
        snap.exports.retain(|e| e.target == t);
        snap.pending.retain(|p| p.target == t);
    }
    snap
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod dead_socket_tests {
    use super::*;

    /// A socket file of a killed target (its pid gone, nothing listening) goes; the socket
    /// of a live process, an unrelated file and a name that is not `serve-PID.sock` stay.
    #[test]
    fn killed_targets_sockets_are_removed_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let dead = dir.path().join(format!("serve-{}.sock", pid_max + 1));
        drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
        assert!(dead.exists());
        let live = dir
            .path()
            .join(format!("serve-{}.sock", std::process::id()));
        let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let other = dir.path().join("serve-x.sock");
        std::fs::write(&other, b"").unwrap();
        assert_eq!(remove_dead_sockets(dir.path()), 1);
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());
    }

    /// Operator's audit (session 27): `--control` naming something that is not a socket
    /// (the exported image, the config file, by a slip of the hand; a directory) is refused
    /// with an error naming what is there, and left as it was. Before: a regular file was
    /// deleted as a "stale socket" and the daemon started; a directory gave "Address
    /// already in use".
    #[test]
    fn a_control_path_that_is_not_a_socket_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.img");
        std::fs::write(&file, b"keep me").unwrap();
        let err = listen(&file, Observer::new()).unwrap_err().to_string();
        assert!(
            err.contains("is not a socket") && err.contains("a regular file"),
            "{err}"
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let err = listen(&sub, Observer::new()).unwrap_err().to_string();
        assert!(err.contains("a directory"), "{err}");
        assert!(sub.is_dir());
        // A stale socket (nothing listening) is still taken over, and removed at the end.
        let stale = dir.path().join("ctl.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let ctl = listen(&stale, Observer::new()).expect("stale socket replaced");
        assert!(std::os::unix::net::UnixStream::connect(&stale).is_ok());
        drop(ctl);
        assert!(!stale.exists());
    }

    /// The socket file is removed at the end only if the path still names the socket bound:
    /// a file put there since (another daemon's socket, after ours was unlinked) stays.
    #[test]
    fn the_end_removes_only_the_socket_it_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let ctl = listen(&path, Observer::new()).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(ctl);
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
    }
}
