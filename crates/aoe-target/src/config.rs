//! Target configuration: vblade-style arguments or a TOML file with any number of exports.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aoe_wire::{MacAddr, TargetAddr};
use serde::Deserialize;

/// Buffer count advertised when none is given. Larger than vblade's 16 because requests are
/// served asynchronously and the socket buffer is sized to hold this many frames per export.
pub const DEFAULT_BUFFER_COUNT: u16 = 128;

/// Largest buffer count an export may advertise: the requests the worker queue holds
/// (`POOL_QUEUE` in the daemon, shared by every export). AoEr11 section 3.2 defines Buffer
/// Count as the outstanding messages the server can queue; a larger count was advertised
/// and then dropped past the queue (every O_DIRECT request takes a place in it), and the
/// receive ring sized for it (two slots per buffer) pinned 2.4 GB per interface at MTU
/// 9000 for 65535. The Linux driver keeps at most `aoe_maxout` (default 64) anyway.
pub const MAX_BUFFER_COUNT: u16 = 8192;

/// I/O worker threads when none is given.
pub const DEFAULT_WORKERS: usize = 4;

/// How often a running daemon probes again for another target at one of its addresses when
/// the file sets no `conflict_check_s` (and for `aoe serve` without a file): a minute, as
/// RFC 5227 hosts re-check their IP address on their own schedule. One probe costs a
/// broadcast frame per export and interface and a socket open for `probe_ms`.
pub const DEFAULT_CONFLICT_CHECK: Duration = Duration::from_secs(60);

/// The longest `conflict_check_s`: a day.
pub const MAX_CONFLICT_CHECK: Duration = Duration::from_secs(86_400);

/// Most I/O worker threads: far more than a disk queue keeps busy, far fewer than the
/// thread start-up memory that failed (a panic in std) at about 18 000 on a 24 GiB VM.
pub const MAX_WORKERS: usize = 1024;

/// How long the event loop keeps polling its sockets after the last frame when none is
/// given (`aoe serve --spin-us`): see [`ServeConfig::spin`]. 25 us, down from 100: on this
/// 2-CPU VM the shorter most took 0.84-0.89x the target's CPU time for the same transfer at
/// window 16 (9 of 9 interleaved pairs, load 9) with no less MB/s, and earlier pinned runs
/// gave 20 us the MB/s of 100 us (docs/PERFORMANCE.md, "The target's write path").
pub const DEFAULT_SPIN: Duration = Duration::from_micros(25);

/// Longest spin accepted: the loop's other duties (signals, reloads, state files) wait that
/// long at most anyway.
pub const MAX_SPIN: Duration = Duration::from_millis(10);

/// Longest coalescing wait accepted (`aoe serve --coalesce-us`): each frame it holds back
/// waits up to that long for its reply.
pub const MAX_COALESCE: Duration = Duration::from_millis(1);

/// How long a stop (SIGTERM, SIGINT) waits for the I/O in flight when none is given
/// (`aoe serve --drain-secs`): see [`ServeConfig::drain`].
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

/// Longest drain accepted: systemd's default stop timeout is 90 s, past which it kills.
pub const MAX_DRAIN: Duration = Duration::from_secs(3600);

/// Longest duplicate-write window accepted (`aoe serve --dedup-window-ms`): an hour. The
/// table forgets by count as well ([`MAX_DEDUP_ENTRIES`]), so a longer window would keep no
/// more; a window near `u64::MAX` ms is a slip, not a wish.
pub const MAX_DEDUP_WINDOW: Duration = Duration::from_secs(3600);

/// Most writes an export's duplicate-write table may be told to remember
/// (`aoe serve --dedup-entries`): 2^20, 64 times the default, about 80 MiB per export when
/// full (80 bytes an entry: `aoe_proto::target::DEFAULT_DEDUP_ENTRIES`'s note). Unbounded, a
/// typo of a few digits let each export grow towards terabytes under a steady write load.
pub const MAX_DEDUP_ENTRIES: usize = 1 << 20;

/// One export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// The file or block device.
    pub path: PathBuf,
    /// Shelf (major).
    pub shelf: u16,
    /// Slot (minor).
    pub slot: u8,
    /// Interfaces it is served on.
    pub interfaces: Vec<String>,
    /// Refuse writes (vblade `-r`).
    pub read_only: bool,
    /// O_DIRECT (vblade `-d`).
    pub direct_io: bool,
    /// O_SYNC (vblade `-s`).
    pub sync: bool,
    /// Offset in sectors (vblade `-o`).
    pub offset: u64,
    /// Length in sectors (vblade `-l`); `None`: to the end.
    pub length: Option<u64>,
    /// Advertised buffer count (vblade `-b`), and enforced: disk requests beyond it per
    /// interface are dropped (see `aoe_proto::target::DropReason::OverBufferCount`).
    pub buffer_count: u16,
    /// Initial Mac Mask List (vblade `-m`); empty: everyone.
    pub allowed_macs: Vec<MacAddr>,
    /// Send the unsolicited Query Config response at start.
    pub announce: bool,
    /// How to reach the Ceph cluster of an `rbd:` export (empty for files).
    pub ceph: CephOptions,
}

impl ExportSpec {
    /// The export's address.
    pub fn addr(&self) -> TargetAddr {
        TargetAddr::new(self.shelf, self.slot)
    }

    /// The RBD image if the backing store is `rbd:POOL/IMAGE` or `rbd:POOL/NAMESPACE/IMAGE`;
    /// `None` for a file or block device; an error for an `rbd:` path of another shape.
    pub fn rbd_image(&self) -> Option<Result<RbdImage, ConfigError>> {
        let p = self.path.to_str()?;
        let rest = p.strip_prefix(RBD_PREFIX)?;
        Some(RbdImage::parse(rest).ok_or_else(|| ConfigError::BadRbd {
            addr: self.addr(),
            path: p.to_string(),
        }))
    }
}

/// What marks an export's path as a Ceph RBD image rather than a file.
pub const RBD_PREFIX: &str = "rbd:";

/// A Ceph RBD image named by an export's `rbd:POOL[/NAMESPACE]/IMAGE` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdImage {
    /// The pool.
    pub pool: String,
    /// The RADOS namespace, if named.
    pub namespace: Option<String>,
    /// The image.
    pub image: String,
}

impl RbdImage {
    /// Parses `POOL/IMAGE` or `POOL/NAMESPACE/IMAGE` (what follows `rbd:`); no part may be
    /// empty or hold an `@` (a snapshot, which would be read-only: not supported).
    pub fn parse(s: &str) -> Option<RbdImage> {
        let parts: Vec<&str> = s.split('/').collect();
        if parts.iter().any(|p| p.is_empty() || p.contains('@')) {
            return None;
        }
        match parts[..] {
            [pool, image] => Some(RbdImage {
                pool: pool.into(),
                namespace: None,
                image: image.into(),
            }),
            [pool, ns, image] => Some(RbdImage {
                pool: pool.into(),
                namespace: Some(ns.into()),
                image: image.into(),
            }),
            _ => None,
        }
    }
}

/// Cluster access for an `rbd:` export: the `ceph_conf`, `client_id` and `keyring` keys of an
/// export (or `--ceph-conf`, `--client-id`, `--keyring`). Unset: librados's defaults
/// (`$CEPH_CONF` or /etc/ceph/ceph.conf, `client.admin`, the keyring ceph.conf names).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CephOptions {
    /// The cluster's ceph.conf.
    pub ceph_conf: Option<PathBuf>,
    /// The cephx client id, without `client.`.
    pub client_id: Option<String>,
    /// The client's keyring.
    pub keyring: Option<PathBuf>,
}

impl CephOptions {
    /// True if none is set.
    pub fn is_empty(&self) -> bool {
        self == &CephOptions::default()
    }
}

/// Settings given on the command line next to `--config` (`--state-dir`, `--workers`,
/// `--allow-duplicate`, `--probe-ms`): they win over the file's keys, at start and at
/// every reload, which re-reads the file alone.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Overrides {
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--workers`.
    pub workers: Option<usize>,
    /// `--allow-duplicate` (only ever turns it on).
    pub allow_duplicate: bool,
    /// `--probe-ms`.
    pub probe: Option<Duration>,
}

impl Overrides {
    /// Applies the overrides to a configuration loaded from its file.
    pub fn apply(&self, cfg: &mut ServeConfig) {
        if let Some(d) = &self.state_dir {
            cfg.state_dir = Some(d.clone());
        }
        if let Some(w) = self.workers {
            cfg.workers = w;
            cfg.sources.forget("workers");
        }
        if self.allow_duplicate {
            cfg.allow_duplicate = true;
        }
        if let Some(p) = self.probe {
            cfg.probe = p;
            cfg.sources.forget("probe_ms");
        }
    }
}

/// Everything `aoe serve` runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServeConfig {
    /// The exports.
    pub exports: Vec<ExportSpec>,
    /// Where config strings, mask and reserve lists persist; `None`: in memory only.
    pub state_dir: Option<PathBuf>,
    /// I/O worker threads.
    pub workers: usize,
    /// Start (or reload) even when the duplicate probe finds another target answering for
    /// one of our addresses: the conflict is only logged.
    pub allow_duplicate: bool,
    /// How long the duplicate probe waits for answers ([`crate::probe`]); zero: no probe.
    pub probe: Duration,
    /// How often a running daemon probes again for another target answering for one of
    /// its addresses (`conflict_check_s`; the conflict watch, `daemon/conflict.rs`); zero:
    /// never. Default [`DEFAULT_CONFLICT_CHECK`].
    pub conflict_check: Duration,
    /// The control socket (`control` in the file, `--control` on the command line, which
    /// wins); `None`: the default, `/run/aoe/serve-PID.sock`
    /// ([`crate::control::default_socket_path`]). Read at start: a reload that changes it
    /// is logged and takes effect at the next start.
    pub control: Option<PathBuf>,
    /// How frames reach and leave the sockets (`aoe serve --io`); fixed at start, a reload
    /// keeps the running one.
    pub io: IoMode,
    /// How long at most the event loop keeps polling its sockets without sleeping after the
    /// last frame (`aoe serve --spin-us`, at most [`MAX_SPIN`]; zero: sleep in poll() at
    /// once); within it the daemon spins only while that costs less CPU than the sleep and
    /// wake-up it saves (`daemon/spin.rs`): while an initiator keeps its window full the next
    /// frames are a microsecond or two away and it spins; at a partial load they are further
    /// apart than a wake-up costs and it sleeps. Fixed at start, like `io`.
    pub spin: Duration,
    /// How long at most the event loop lets frames gather before it takes them, when the
    /// spin does not pay (`aoe serve --coalesce-us`, at most [`MAX_COALESCE`]; zero, the
    /// default: a frame wakes the loop at once). Where the frames of the last batches came
    /// at most half this far apart, the loop sleeps after a batch as long as four of them
    /// take (at most this) on a timer, not on its sockets, so one wake-up takes every frame
    /// that came meanwhile (a NIC's adaptive interrupt moderation, `daemon/coalesce.rs`);
    /// further apart, a frame wakes it at once. Fixed at start, like `io`.
    pub coalesce: Duration,
    /// How long a stop waits for the I/O in flight to finish and be answered (`aoe serve
    /// --drain-secs`, at most [`MAX_DRAIN`]); what is still in flight then is named in the
    /// log and the daemon fails (exit status 1). Fixed at start, like `io`.
    pub drain: Duration,
    /// How long and how many admitted writes each export remembers, to drop a network
    /// duplicate of one that a newer write overlapped (`aoe serve --dedup-window-ms`,
    /// `--dedup-entries`; [`aoe_proto::target::DedupConfig`]). Fixed at start, like `io`.
    pub dedup: aoe_proto::target::DedupConfig,
    /// Where the settings and exports were written, for errors: empty for a configuration
    /// from the command line.
    pub sources: Sources,
}

/// Where a TOML configuration file wrote its exports and its daemon-wide numbers, so that
/// an error found after parsing (an out-of-range value, an export twice on an interface,
/// two writable exports overlapping, a missing file, an interface that is not there) names
/// `FILE:LINE:COLUMN` as the TOML parser's own errors do, next to the export (operator's
/// audit, session 27: they named the export alone). Not part of what a reload compares:
/// any two are equal, so an export moved within the file is not reopened for it.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The file.
    pub file: Option<PathBuf>,
    /// The 1-based line and column of each export's `[[export]]` header, in the order of
    /// [`ServeConfig::exports`].
    pub exports: Vec<(usize, usize)>,
    /// The line and column of each daemon-wide key the file set that a check may refuse
    /// (`workers`, `probe_ms`, `conflict_check_s`).
    pub keys: Vec<(&'static str, (usize, usize))>,
    /// The line and column of each key each export set (of its value, as for `keys`), in
    /// the order of [`ServeConfig::exports`]: an error about one key of an export names that
    /// key's line (`buffer_count = 9000`), not the `[[export]]` header's (session 29; the
    /// header's until then).
    pub export_keys: Vec<Vec<(String, (usize, usize))>>,
}

impl PartialEq for Sources {
    fn eq(&self, _: &Sources) -> bool {
        true
    }
}

impl Eq for Sources {}

impl Sources {
    /// `error` at the place of export `i`, when the file said where it is: at the first of
    /// the export's keys the error is about (`ConfigError::export_keys`) that the file
    /// set, else at its `[[export]]` header.
    pub fn export(&self, i: usize, error: ConfigError) -> ConfigError {
        let at = match &error {
            // The list's entry that repeats the address, not the list.
            ConfigError::ExportedTwice { interface, .. } => {
                self.export_at(i, &[&interface_key(interface), "interfaces"])
            }
            _ => self.export_at(i, error.export_keys()),
        };
        self.placed(at, error)
    }

    /// The line and column of the first of `keys` that export `i` set, else of its
    /// `[[export]]` header.
    fn export_at(&self, i: usize, keys: &[&str]) -> Option<(usize, usize)> {
        let set = self.export_keys.get(i);
        keys.iter()
            .find_map(|k| set?.iter().find(|(name, _)| name == k).map(|(_, at)| *at))
            .or_else(|| self.exports.get(i).copied())
    }

    /// `error` at the place of daemon-wide key `key`, when the file set it.
    pub fn key(&self, key: &str, error: ConfigError) -> ConfigError {
        self.placed(self.key_at(key), error)
    }

    /// The line and column of daemon-wide key `key` (one of [`Sources::keys`]' names), if
    /// the file set it.
    pub fn key_at(&self, key: &str) -> Option<(usize, usize)> {
        self.keys.iter().find(|(k, _)| *k == key).map(|(_, at)| *at)
    }

    /// `error` at line and column `at` of the file, when both are known.
    fn placed(&self, at: Option<(usize, usize)>, error: ConfigError) -> ConfigError {
        match (&self.file, at) {
            (Some(f), Some(at)) => ConfigError::At {
                origin: f.clone(),
                at,
                error: Box::new(error),
            },
            _ => error,
        }
    }

    /// `FILE:LINE:COLUMN` of export `i`'s key `key` (`path`, `interfaces`), or of its
    /// `[[export]]` header if the file did not set it, when the file said where it is.
    pub fn export_place(&self, i: usize, key: &str) -> Option<String> {
        self.export_place_of(i, &[key])
    }

    /// `FILE:LINE:COLUMN` of the entry `name` of export `i`'s `interfaces` list, else of the
    /// list, else of its `[[export]]` header.
    pub fn interface_place(&self, i: usize, name: &str) -> Option<String> {
        self.export_place_of(i, &[&interface_key(name), "interfaces"])
    }

    fn export_place_of(&self, i: usize, keys: &[&str]) -> Option<String> {
        let f = self.file.as_ref()?;
        let (l, c) = self.export_at(i, keys)?;
        Some(format!("{}:{l}:{c}", f.display()))
    }

    /// Forgets where daemon-wide key `key` was: a command-line option replaced its value.
    fn forget(&mut self, key: &str) {
        self.keys.retain(|(k, _)| *k != key);
    }
}

/// How the target moves frames between its sockets and itself (`aoe serve --io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// `PACKET_MMAP` rings (`TPACKET_V2`, packet(7)): frames are read from a receive ring
    /// without a system call and replies go out through a transmit ring with one `send()`
    /// per batch. Falls back to [`IoMode::Mmsg`], with one log line, where a ring cannot be
    /// set up.
    #[default]
    Rings,
    /// `recvmmsg(2)` / `sendmmsg(2)` batches of 64 frames, a copy each way in the kernel.
    Mmsg,
}

/// A configuration that cannot run: one variant per cause, each the operator's to fix (the
/// file, its path, or the `aoe serve` arguments).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// Not TOML, or a key or value the format does not have (the TOML parser's message),
    /// at a 1-based line and column when the parser names a place.
    #[error("{}{}: {message}", origin.display(), at.map_or(String::new(), |(l, c)| format!(":{l}:{c}")))]
    Syntax {
        /// The file.
        origin: PathBuf,
        /// Line and column, 1-based.
        at: Option<(usize, usize)>,
        /// What is wrong.
        message: String,
    },
    /// An `allowed_macs` entry that is not a MAC address.
    #[error("{}: export #{export}: {error}", origin.display())]
    BadMac {
        /// The file.
        origin: PathBuf,
        /// The export's position in the file, 1-based.
        export: usize,
        /// The parse error.
        error: aoe_wire::ParseMacError,
    },
    /// No export at all.
    #[error("no exports configured")]
    NoExports,
    /// `workers` outside 1..=[`MAX_WORKERS`]: none could serve a request, and tens of
    /// thousands exhaust the process's memory maps while starting.
    #[error("workers must be from 1 to {MAX_WORKERS}, not {0}")]
    Workers(usize),
    /// `probe_ms` (`--probe-ms`) past [`crate::probe::MAX_PROBE`]: the start (or reload)
    /// would wait that long before serving, deaf to SIGTERM at start, and a value near
    /// `u64::MAX` never ends. The user's mistake.
    #[error(
        "--probe-ms / probe_ms {0} is not from 0 to {max} ms (0: no probe; targets answer a \
         Query Config within milliseconds)",
        max = crate::probe::MAX_PROBE.as_millis()
    )]
    Probe(u128),
    /// `conflict_check_s` past [`MAX_CONFLICT_CHECK`] (a value near `u64::MAX` would
    /// overflow the clock).
    #[error("conflict_check_s must be from 0 to 86400 s (0: never), not {0} s")]
    ConflictCheck(u64),
    /// A drain limit longer than [`MAX_DRAIN`].
    #[error("the drain limit must be at most 3600 s, not {0} s")]
    Drain(u64),
    /// A spin longer than [`MAX_SPIN`].
    #[error("the spin must be at most 10000 us (10 ms), not {0} us")]
    Spin(u128),
    /// A coalescing wait longer than [`MAX_COALESCE`].
    #[error("the coalescing wait must be at most 1000 us (1 ms), not {0} us")]
    Coalesce(u128),
    /// `--dedup-window-ms` past [`MAX_DEDUP_WINDOW`]. The user's mistake.
    #[error("--dedup-window-ms must be from 0 to 3600000 ms (an hour; 0: off), not {0} ms")]
    DedupWindow(u128),
    /// `--dedup-entries` past [`MAX_DEDUP_ENTRIES`]. The user's mistake.
    #[error(
        "--dedup-entries must be from 0 to 1048576 (about 80 MiB per export; 0: off), not {0}"
    )]
    DedupEntries(usize),
    /// Shelf 0xffff is the broadcast shelf (AoEr11 section 2.1).
    #[error("shelf {0} is the broadcast shelf and cannot be exported (use 0-65534)")]
    BroadcastShelf(u16),
    /// Slot 0xff is the broadcast slot (AoEr11 section 2.1).
    #[error("slot {0} is the broadcast slot and cannot be exported (use 0-254)")]
    BroadcastSlot(u8),
    /// An export with an empty interface list.
    #[error("{0}: no interfaces given")]
    NoInterfaces(TargetAddr),
    /// `buffer_count = 0`: no request could ever be taken.
    #[error("{0}: buffer count must be at least 1")]
    NoBuffers(TargetAddr),
    /// A buffer count over [`MAX_BUFFER_COUNT`]: advertised, it would not be honoured.
    #[error(
        "{0}: buffer count {1} is more than the target can queue (at most {MAX_BUFFER_COUNT})"
    )]
    TooManyBuffers(TargetAddr, u16),
    /// One shelf.slot twice on one interface.
    #[error("{addr} is exported twice on interface {interface}")]
    ExportedTwice {
        /// The address.
        addr: TargetAddr,
        /// The interface.
        interface: String,
    },
    /// A Mac Mask List entry that is a group (multicast or broadcast) address. The target
    /// answers an initiator whose frame's source address is on the list, and a source
    /// address is never a group address (IEEE 802.3 clause 3.2.3: the I/G bit of a source
    /// is 0), so the export would answer nobody.
    #[error(
        "{addr}: {mac} is a multicast or broadcast address; a MAC mask list holds initiators' \
         unicast addresses (with it the export would answer nobody)"
    )]
    GroupMac {
        /// The export.
        addr: TargetAddr,
        /// The address as parsed.
        mac: MacAddr,
    },
    /// Two exports of overlapping sectors of one file or block device (or of one RBD image),
    /// at least one of them writable: each would overwrite data the other serves, behind
    /// the other's back. Read-only overlaps are allowed; one shelf.slot on several
    /// interfaces is one export (its paths), not two.
    #[error(
        "{first} and {second} both export {what}, and {}; make both read-only or give them \
         ranges that do not overlap (-o/-l, offset/length)",
        if *both_writable { "both are writable" } else { "one of them is writable" }
    )]
    Overlap {
        /// The export listed first.
        first: TargetAddr,
        /// The export listed second.
        second: TargetAddr,
        /// The shared store and range, as the operator named it.
        what: String,
        /// Whether both are writable (else one is).
        both_writable: bool,
    },
    /// An `rbd:` path that is not `rbd:POOL/IMAGE` or `rbd:POOL/NAMESPACE/IMAGE`.
    #[error("{addr}: {path} is not rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE")]
    BadRbd {
        /// The export.
        addr: TargetAddr,
        /// The path as given.
        path: String,
    },
    /// `ceph_conf`, `client_id` or `keyring` on an export that is not an `rbd:` image: they
    /// would be ignored.
    #[error("{0}: ceph_conf, client_id and keyring apply only to an rbd:POOL/IMAGE export")]
    CephOptionsWithoutRbd(TargetAddr),
    /// A file-only option on an `rbd:` export: librbd has no page cache to bypass and an
    /// image is exported whole, so it would be ignored.
    #[error("{addr}: {option} applies to files, not to an rbd: export")]
    FileOptionOnRbd {
        /// The export.
        addr: TargetAddr,
        /// The option.
        option: &'static str,
    },
    /// A line of a vblade-persistence file (`/etc/vblade.conf.d/NAME.conf`) that is not a
    /// known `key=value`, or a value or vblade option that does not parse.
    #[error("{}:{line}: {message}", origin.display())]
    Vblade {
        /// The file.
        origin: PathBuf,
        /// 1-based line (0 when the file as a whole is wrong, e.g. a missing key).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A check failed at a 1-based line and column of a file.
    #[error("{}:{}:{}: {error}", origin.display(), at.0, at.1)]
    At {
        /// The file.
        origin: PathBuf,
        /// Line and column, 1-based.
        at: (usize, usize),
        /// The failed check.
        error: Box<ConfigError>,
    },
    /// A check of [`ServeConfig::check_static`] failed for a file.
    #[error("{}: {error}", origin.display())]
    In {
        /// The file.
        origin: PathBuf,
        /// The failed check.
        error: Box<ConfigError>,
    },
}

impl ConfigError {
    /// The keys of an `[[export]]` table an error of [`check_export`] or
    /// [`ServeConfig::check_overlaps`] is about, the likeliest culprit first: where
    /// [`Sources::export`] places it.
    fn export_keys(&self) -> &'static [&'static str] {
        match self {
            ConfigError::BroadcastShelf(_) => &["shelf"],
            ConfigError::BroadcastSlot(_) => &["slot"],
            ConfigError::NoInterfaces(_) | ConfigError::ExportedTwice { .. } => &["interfaces"],
            ConfigError::NoBuffers(_) | ConfigError::TooManyBuffers(..) => &["buffer_count"],
            ConfigError::GroupMac { .. } => &["allowed_macs"],
            ConfigError::BadRbd { .. } => &["path"],
            ConfigError::CephOptionsWithoutRbd(_) => &["ceph_conf", "client_id", "keyring"],
            ConfigError::FileOptionOnRbd { option, .. } => {
                match option.split(' ').next().unwrap_or("") {
                    "direct_io" => &["direct_io"],
                    "sync" => &["sync"],
                    "offset" => &["offset"],
                    _ => &["length"],
                }
            }
            // Placed by `check_overlaps` itself (`offset`, `length` or `path`).
            ConfigError::Overlap { .. } => &["path"],
            _ => &[],
        }
    }
}

/// The 1-based line and column of byte `pos` in `text`.
#[cfg(test)]
fn line_column(text: &str, pos: usize) -> (usize, usize) {
    Lines::new(text).place(pos)
}

/// Where each line of a configuration file starts, so that the place of a key is found by
/// a binary search and a count of the characters before it on its line. Until session 35
/// each place was counted from the start of the file: with a place for every key of every
/// export that was quadratic, and a file of 4096 exports took 12-40 s to parse (most of a
/// start), 1024 exports 1.2 s.
struct Lines<'a> {
    text: &'a str,
    /// Byte offsets of each line's first byte; the first is 0.
    starts: Vec<usize>,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Lines<'a> {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Lines { text, starts }
    }

    /// The 1-based line and column (in characters) of byte `pos`.
    fn place(&self, pos: usize) -> (usize, usize) {
        let mut end = pos.min(self.text.len());
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        // The last line starting at or before `end` (`starts[0]` is 0, so there is one).
        let line = self.starts.partition_point(|&s| s <= end);
        let start = self.starts[line - 1];
        (line, self.text[start..end].chars().count() + 1)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    state_dir: Option<PathBuf>,
    workers: Option<toml::Spanned<usize>>,
    #[serde(default)]
    allow_duplicate: bool,
    probe_ms: Option<toml::Spanned<u64>>,
    conflict_check_s: Option<toml::Spanned<u64>>,
    control: Option<PathBuf>,
    #[serde(default, rename = "export")]
    exports: Vec<toml::Spanned<FileExport>>,
}

/// Where each `[[export]]` table's keys are ([`Sources::export_keys`]): the file read a
/// second time, each value with its span (the [`FileConfig`] read checked the keys and
/// types already).
#[derive(Debug, Deserialize)]
struct KeyPlaces {
    #[serde(default, rename = "export")]
    exports: Vec<std::collections::BTreeMap<String, toml::Spanned<toml::Value>>>,
}

/// Where each entry of each export's `interfaces` list is (a [`toml::Value`] array keeps no
/// spans of its own): a third read, of that list alone.
#[derive(Debug, Deserialize)]
struct InterfacePlaces {
    #[serde(default, rename = "export")]
    exports: Vec<InterfaceList>,
}

#[derive(Debug, Deserialize)]
struct InterfaceList {
    #[serde(default)]
    interfaces: Vec<toml::Spanned<String>>,
}

/// The name [`Sources::export_keys`] files the `interfaces` entry `name` under.
fn interface_key(name: &str) -> String {
    format!("interfaces[{name:?}]")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileExport {
    path: PathBuf,
    shelf: u16,
    slot: u8,
    interfaces: Vec<String>,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    direct_io: bool,
    #[serde(default)]
    sync: bool,
    #[serde(default)]
    offset: u64,
    length: Option<u64>,
    buffer_count: Option<u16>,
    #[serde(default)]
    allowed_macs: Vec<toml::Spanned<String>>,
    #[serde(default = "yes")]
    announce: bool,
    ceph_conf: Option<PathBuf>,
    client_id: Option<String>,
    keyring: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

impl ServeConfig {
    /// Parses a TOML configuration (see the README for the format). Relative paths are taken
    /// from the directory of `origin`.
    pub fn from_toml(text: &str, origin: &Path) -> Result<ServeConfig, ConfigError> {
        let lines = Lines::new(text);
        let f: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            origin: origin.to_path_buf(),
            at: e.span().map(|r| lines.place(r.start)),
            // toml's messages may run over several lines (`invalid array` / `expected
            // `]``): one line, as every other configuration error.
            message: e.message().trim_end().replace('\n', "; "),
        })?;
        let base = origin.parent().unwrap_or(Path::new("."));
        let place = |span: std::ops::Range<usize>| lines.place(span.start);
        let mut export_keys: Vec<Vec<(String, (usize, usize))>> = toml::from_str::<KeyPlaces>(text)
            .map(|k| {
                k.exports
                    .iter()
                    .map(|t| {
                        t.iter()
                            .map(|(key, v)| (key.clone(), place(v.span())))
                            .collect()
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Ok(lists) = toml::from_str::<InterfacePlaces>(text) {
            for (keys, list) in export_keys.iter_mut().zip(lists.exports) {
                keys.extend(
                    list.interfaces
                        .iter()
                        .map(|n| (interface_key(n.get_ref()), place(n.span()))),
                );
            }
        }
        let mut sources = Sources {
            file: Some(origin.to_path_buf()),
            exports: f.exports.iter().map(|e| place(e.span())).collect(),
            keys: Vec::new(),
            export_keys,
        };
        for (key, span) in [
            ("workers", f.workers.as_ref().map(toml::Spanned::span)),
            ("probe_ms", f.probe_ms.as_ref().map(toml::Spanned::span)),
            (
                "conflict_check_s",
                f.conflict_check_s.as_ref().map(toml::Spanned::span),
            ),
        ] {
            if let Some(span) = span {
                sources.keys.push((key, place(span)));
            }
        }
        let mut exports = Vec::new();
        for (i, e) in f.exports.into_iter().enumerate() {
            let e = e.into_inner();
            let addr = TargetAddr::new(e.shelf, e.slot);
            let allowed_macs =
                e.allowed_macs
                    .iter()
                    .map(|m| {
                        let mac = m.get_ref().parse::<MacAddr>().map_err(|error| {
                            ConfigError::BadMac {
                                origin: origin.to_path_buf(),
                                export: i + 1,
                                error,
                            }
                        })?;
                        if mac.is_multicast() {
                            return Err(ConfigError::At {
                                origin: origin.to_path_buf(),
                                at: lines.place(m.span().start),
                                error: Box::new(ConfigError::GroupMac { addr, mac }),
                            });
                        }
                        Ok(mac)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
            // An rbd: image is a name, not a path: not taken relative to the file.
            let is_rbd = e.path.to_str().is_some_and(|p| p.starts_with(RBD_PREFIX));
            exports.push(ExportSpec {
                path: if is_rbd {
                    e.path.clone()
                } else {
                    base.join(&e.path)
                },
                shelf: e.shelf,
                slot: e.slot,
                interfaces: e.interfaces,
                read_only: e.read_only,
                direct_io: e.direct_io,
                sync: e.sync,
                offset: e.offset,
                length: e.length,
                buffer_count: e.buffer_count.unwrap_or(DEFAULT_BUFFER_COUNT),
                allowed_macs,
                announce: e.announce,
                ceph: CephOptions {
                    ceph_conf: e.ceph_conf.map(|c| base.join(c)),
                    client_id: e.client_id,
                    keyring: e.keyring.map(|k| base.join(k)),
                },
            });
        }
        let cfg = ServeConfig {
            exports,
            state_dir: f.state_dir.map(|d| base.join(d)),
            workers: f.workers.map_or(DEFAULT_WORKERS, toml::Spanned::into_inner),
            allow_duplicate: f.allow_duplicate,
            probe: f.probe_ms.map_or(crate::probe::DEFAULT_PROBE, |p| {
                Duration::from_millis(p.into_inner())
            }),
            conflict_check: f.conflict_check_s.map_or(DEFAULT_CONFLICT_CHECK, |c| {
                Duration::from_secs(c.into_inner())
            }),
            control: f.control.map(|c| base.join(c)),
            io: IoMode::default(),
            spin: DEFAULT_SPIN,
            coalesce: Duration::ZERO,
            drain: DEFAULT_DRAIN,
            dedup: aoe_proto::target::DedupConfig::default(),
            sources,
        };
        cfg.check_static().map_err(|e| match e {
            // Placed already: FILE:LINE:COLUMN.
            e @ ConfigError::At { .. } => e,
            e => ConfigError::In {
                origin: origin.to_path_buf(),
                error: Box::new(e),
            },
        })?;
        Ok(cfg)
    }

    /// Reads and parses a configuration: a directory is read as Debian's vblade-persistence
    /// directory (`/etc/vblade.conf.d`, see [`ServeConfig::from_vblade_dir`]), a file whose
    /// name ends in `.conf` as one vblade-persistence file, anything else as TOML. SIGHUP
    /// reloads go through here too, so either format reloads.
    pub fn load(path: &Path) -> Result<ServeConfig, ConfigError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|error| ConfigError::Read {
                path: p.to_path_buf(),
                error,
            })
        };
        if path.is_dir() {
            return Self::from_vblade_dir(path);
        }
        let text = read(path)?;
        if path.extension().is_some_and(|e| e == "conf") {
            let cfg = ServeConfig {
                exports: vec![vblade_export(&text, path)?],
                ..ServeConfig::defaults()
            };
            cfg.check_static().map_err(|e| ConfigError::In {
                origin: path.to_path_buf(),
                error: Box::new(e),
            })?;
            return Ok(cfg);
        }
        Self::from_toml(&text, path)
    }

    /// Every `*.conf` file of a vblade-persistence directory (Debian's vblade-persistence
    /// package, `/etc/vblade.conf.d/`), one export each, in file-name order, with the
    /// daemon-wide settings at their defaults. Each file holds vblade-persistence's
    /// `key=value` lines (`shelf`, `slot`, `netif`, `filename`, `options`, `ionice`), parsed
    /// by the private `vblade_export`, whose comment gives an example.
    pub fn from_vblade_dir(dir: &Path) -> Result<ServeConfig, ConfigError> {
        let rd = |error| ConfigError::Read {
            path: dir.to_path_buf(),
            error,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(rd)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(rd)?
            .into_iter()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "conf") && p.is_file())
            .collect();
        files.sort();
        let mut exports = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(f).map_err(|error| ConfigError::Read {
                path: f.clone(),
                error,
            })?;
            exports.push(vblade_export(&text, f)?);
        }
        let cfg = ServeConfig {
            exports,
            ..ServeConfig::defaults()
        };
        cfg.check_static().map_err(|e| ConfigError::In {
            origin: dir.to_path_buf(),
            error: Box::new(e),
        })?;
        Ok(cfg)
    }

    /// No exports, every daemon-wide setting at its default.
    fn defaults() -> ServeConfig {
        ServeConfig {
            exports: Vec::new(),
            state_dir: None,
            workers: DEFAULT_WORKERS,
            allow_duplicate: false,
            probe: crate::probe::DEFAULT_PROBE,
            conflict_check: DEFAULT_CONFLICT_CHECK,
            control: None,
            io: IoMode::default(),
            spin: DEFAULT_SPIN,
            coalesce: Duration::ZERO,
            drain: DEFAULT_DRAIN,
            dedup: aoe_proto::target::DedupConfig::default(),
            sources: Sources::default(),
        }
    }

    /// Checks what can be checked without touching files or interfaces: at least one export,
    /// real (non-wildcard) addresses, interfaces named, a non-zero buffer count, no
    /// shelf.slot exported twice on one interface, unicast MAC mask lists, well-formed `rbd:`
    /// names and Ceph options only on them.
    pub fn check_static(&self) -> Result<(), ConfigError> {
        if self.exports.is_empty() {
            return Err(ConfigError::NoExports);
        }
        let src = &self.sources;
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return Err(src.key("workers", ConfigError::Workers(self.workers)));
        }
        if self.probe > crate::probe::MAX_PROBE {
            return Err(src.key("probe_ms", ConfigError::Probe(self.probe.as_millis())));
        }
        if self.conflict_check > MAX_CONFLICT_CHECK {
            return Err(src.key(
                "conflict_check_s",
                ConfigError::ConflictCheck(self.conflict_check.as_secs()),
            ));
        }
        if self.drain > MAX_DRAIN {
            return Err(ConfigError::Drain(self.drain.as_secs()));
        }
        if self.spin > MAX_SPIN {
            return Err(ConfigError::Spin(self.spin.as_micros()));
        }
        if self.coalesce > MAX_COALESCE {
            return Err(ConfigError::Coalesce(self.coalesce.as_micros()));
        }
        if self.dedup.window > MAX_DEDUP_WINDOW {
            return Err(ConfigError::DedupWindow(self.dedup.window.as_millis()));
        }
        if self.dedup.entries > MAX_DEDUP_ENTRIES {
            return Err(ConfigError::DedupEntries(self.dedup.entries));
        }
        let mut seen = HashSet::new();
        for (i, e) in self.exports.iter().enumerate() {
            check_export(e, &mut seen).map_err(|err| src.export(i, err))?;
        }
        Ok(())
    }
}

/// The checks of [`ServeConfig::check_static`] for one export; `seen` holds the (address,
/// interface) pairs of the exports before it.
fn check_export(
    e: &ExportSpec,
    seen: &mut HashSet<(TargetAddr, String)>,
) -> Result<(), ConfigError> {
    let a = e.addr();
    if e.shelf == TargetAddr::BROADCAST_SHELF {
        return Err(ConfigError::BroadcastShelf(e.shelf));
    }
    if e.slot == TargetAddr::BROADCAST_SLOT {
        return Err(ConfigError::BroadcastSlot(e.slot));
    }
    if e.interfaces.is_empty() {
        return Err(ConfigError::NoInterfaces(a));
    }
    if e.buffer_count == 0 {
        return Err(ConfigError::NoBuffers(a));
    }
    if e.buffer_count > MAX_BUFFER_COUNT {
        return Err(ConfigError::TooManyBuffers(a, e.buffer_count));
    }
    if let Some(&mac) = e.allowed_macs.iter().find(|m| m.is_multicast()) {
        return Err(ConfigError::GroupMac { addr: a, mac });
    }
    match e.rbd_image() {
        Some(r) => {
            r?;
            let file_only = [
                ("direct_io (-d)", e.direct_io),
                ("sync (-s)", e.sync),
                ("offset (-o)", e.offset != 0),
                ("length (-l)", e.length.is_some()),
            ];
            if let Some((name, _)) = file_only.iter().find(|(_, on)| *on) {
                return Err(ConfigError::FileOptionOnRbd {
                    addr: a,
                    option: name,
                });
            }
        }
        None if !e.ceph.is_empty() => return Err(ConfigError::CephOptionsWithoutRbd(a)),
        None => {}
    }
    for i in &e.interfaces {
        if !seen.insert((a, i.clone())) {
            return Err(ConfigError::ExportedTwice {
                addr: a,
                interface: i.clone(),
            });
        }
    }
    Ok(())
}

impl ServeConfig {
    /// Refuses two exports (of different shelf.slot) of overlapping sectors of one backing
    /// store when at least one of them is writable ([`ConfigError::Overlap`]); read-only
    /// overlaps are allowed. Files and block devices are compared by what `stat(2)` finds
    /// behind the path: a block device by its device number (so `/dev/sdb` and a
    /// `/dev/disk/by-id` link to it are one), a file by device and inode (so a second
    /// spelling of the path or a hard link is too), with the `-o`/`-l` sector ranges. RBD
    /// images are compared by pool, namespace and image name (an image is exported whole).
    /// A path that cannot be stat'ed is left to the open that follows, which names the error.
    /// One shelf.slot listed on several interfaces is one export (its paths), never refused.
    pub fn check_overlaps(&self) -> Result<(), ConfigError> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        #[derive(PartialEq)]
        enum Store {
            Block(u64),
            File(u64, u64),
            Rbd(RbdImage),
        }
        let range = |s: u64, e: u64| {
            if e == u64::MAX {
                format!("{s}-end")
            } else {
                format!("{s}-{}", e - 1)
            }
        };
        let mut seen: Vec<(Store, u64, u64, &ExportSpec)> = Vec::new();
        for (i, e) in self.exports.iter().enumerate() {
            let store = match e.rbd_image() {
                Some(r) => Store::Rbd(r?),
                None => match std::fs::metadata(&e.path) {
                    Ok(m) if m.file_type().is_block_device() => Store::Block(m.rdev()),
                    Ok(m) => Store::File(m.dev(), m.ino()),
                    Err(_) => continue,
                },
            };
            let start = e.offset;
            let end = e.length.map_or(u64::MAX, |l| start.saturating_add(l));
            for (other_store, o_start, o_end, o) in &seen {
                if *other_store != store
                    || o.addr() == e.addr()
                    || (o.read_only && e.read_only)
                    || start >= *o_end
                    || *o_start >= end
                {
                    continue;
                }
                let what = match &store {
                    Store::Rbd(_) => e.path.display().to_string(),
                    _ => {
                        let same = if o.path == e.path {
                            o.path.display().to_string()
                        } else {
                            format!("{} and {}", o.path.display(), e.path.display())
                        };
                        format!(
                            "{same} (sectors {} and {})",
                            range(*o_start, *o_end),
                            range(start, end)
                        )
                    }
                };
                // At the key whose value makes this window reach into the other's (session
                // 29, operator's leftovers; `path` until then): `offset` when this window
                // starts inside the other, else `length` (it starts before the other and
                // runs into it); `path` when the file did not set that key (the window's
                // start or end is the file's own).
                let keys: &[&str] = if start >= *o_start {
                    &["offset", "path"]
                } else {
                    &["length", "path"]
                };
                return Err(self.sources.placed(
                    self.sources.export_at(i, keys),
                    ConfigError::Overlap {
                        first: o.addr(),
                        second: e.addr(),
                        what,
                        both_writable: !o.read_only && !e.read_only,
                    },
                ));
            }
            seen.push((store, start, end, e));
        }
        Ok(())
    }
}

/// One vblade-persistence file: shell-style `key=value` lines, as the package's init
/// script and systemd generator read them (`# comment` lines and blank lines skipped, a
/// value optionally in single or double quotes):
///
/// ```text
/// shelf=14
/// slot=2
/// netif=ens3
/// filename=/dev/mapper/SSD-aoe
/// options='-r -m 12:22:33:44:55:66,22:33:44:55:66:77 -o 8'
/// ionice='--class best-effort --classdata 7'
/// ```
///
/// `options` are vblade's own (`-b N -d -s -r -m MACS -o N -l N`). `ionice` is accepted and
/// not applied (a warning says so): set `IOSchedulingClass=` in a drop-in of the unit
/// instead. Any other key, option or a missing one is an error naming the line.
fn vblade_export(text: &str, origin: &Path) -> Result<ExportSpec, ConfigError> {
    let err = |line: usize, message: String| ConfigError::Vblade {
        origin: origin.to_path_buf(),
        line,
        message,
    };
    let mut vals: std::collections::HashMap<&str, (usize, String)> = Default::default();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let Some((k, v)) = l.split_once('=') else {
            return Err(err(n, format!("not key=value: {l:?}")));
        };
        let k = k.trim();
        if !matches!(
            k,
            "shelf" | "slot" | "netif" | "filename" | "options" | "ionice"
        ) {
            return Err(err(
                n,
                format!("unknown key {k:?} (shelf, slot, netif, filename, options, ionice)"),
            ));
        }
        let v = v.trim();
        let v = match (v.chars().next(), v.chars().last()) {
            (Some(q @ ('\'' | '"')), Some(e)) if v.len() >= 2 && e == q => &v[1..v.len() - 1],
            (Some('\'' | '"'), _) => return Err(err(n, format!("unclosed quote in {v:?}"))),
            _ => v,
        };
        if vals.insert(k, (n, v.to_owned())).is_some() {
            return Err(err(n, format!("{k} given twice")));
        }
    }
    let need = |k: &str| {
        vals.get(k)
            .cloned()
            .ok_or_else(|| err(0, format!("no {k}= line")))
    };
    let num = |k: &str, max: u64| -> Result<u64, ConfigError> {
        let (n, v) = need(k)?;
        v.parse::<u64>()
            .ok()
            .filter(|x| *x <= max)
            .ok_or_else(|| err(n, format!("{k}={v}: not a number from 0 to {max}")))
    };
    let shelf = num("shelf", u64::from(u16::MAX))? as u16;
    let slot = num("slot", u64::from(u8::MAX))? as u8;
    let (_, netif) = need("netif")?;
    let (_, filename) = need("filename")?;
    if let Some((n, v)) = vals.get("ionice") {
        tracing::warn!(
            file = %origin.display(),
            line = n,
            ionice = %v,
            "ionice is not applied by aoe serve; use IOSchedulingClass= in the unit instead"
        );
    }
    let mut e = ExportSpec {
        path: PathBuf::from(filename),
        shelf,
        slot,
        interfaces: vec![netif],
        read_only: false,
        direct_io: false,
        sync: false,
        offset: 0,
        length: None,
        buffer_count: DEFAULT_BUFFER_COUNT,
        allowed_macs: Vec::new(),
        announce: true,
        ceph: CephOptions::default(),
    };
    if let Some((n, opts)) = vals.get("options") {
        let bad = |m: String| err(*n, m);
        let mut it = opts.split_whitespace();
        // vblade's getopt keeps the last of `-b 4 -b 8` without a word, the first value lost
        // (session 29's audit); our command line refuses a second one (clap), and so does
        // this. `-m` adds to the list, as on the command line.
        let mut valued = HashSet::new();
        while let Some(flag) = it.next() {
            if matches!(flag, "-b" | "-o" | "-l") && !valued.insert(flag) {
                return Err(bad(format!("options: {flag} given twice")));
            }
            let mut arg = |f: &str| {
                it.next()
                    .map(str::to_owned)
                    .ok_or_else(|| bad(format!("options: {f} needs a value")))
            };
            let parse_n = |f: &str, v: String| {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("options: {f} {v}: not a number")))
            };
            match flag {
                "-d" => e.direct_io = true,
                "-s" => e.sync = true,
                "-r" => e.read_only = true,
                "-b" => {
                    let v = arg("-b")?;
                    e.buffer_count = v
                        .parse()
                        .map_err(|_| bad(format!("options: -b {v}: not a number")))?;
                }
                "-o" => e.offset = parse_n("-o", arg("-o")?)?,
                "-l" => e.length = Some(parse_n("-l", arg("-l")?)?),
                "-m" => {
                    for m in arg("-m")?.split(',').filter(|m| !m.is_empty()) {
                        let mac: MacAddr = m.parse().map_err(|x: aoe_wire::ParseMacError| {
                            bad(format!("options: -m {m}: {x}"))
                        })?;
                        if mac.is_multicast() {
                            let addr = e.addr();
                            return Err(bad(format!(
                                "options: -m: {}",
                                ConfigError::GroupMac { addr, mac }
                            )));
                        }
                        e.allowed_macs.push(mac);
                    }
                }
                other => {
                    return Err(bad(format!(
                        "options: {other} is not a vblade option (-b -d -s -r -m -o -l)"
                    )))
                }
            }
        }
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_file() {
        let t = r#"
            state_dir = "state"
            workers = 2
            allow_duplicate = true
            probe_ms = 250
            conflict_check_s = 5
            control = "ctl/serve.sock"
            [[export]]
            path = "disk.img"
            shelf = 1
            slot = 2
            interfaces = ["veth0", "veth1"]
            read_only = true
            offset = 8
            length = 100
            buffer_count = 32
            allowed_macs = ["00:11:22:33:44:55"]
            announce = false
            [[export]]
            path = "/abs/other.img"
            shelf = 1
            slot = 3
            interfaces = ["veth0"]
        "#;
        let c = ServeConfig::from_toml(t, Path::new("/etc/aoe/serve.toml")).unwrap();
        assert_eq!(c.state_dir, Some(PathBuf::from("/etc/aoe/state")));
        assert_eq!(c.workers, 2);
        assert!(c.allow_duplicate);
        assert_eq!(c.probe, Duration::from_millis(250));
        assert_eq!(c.conflict_check, Duration::from_secs(5));
        let over = t.replace("conflict_check_s = 5", "conflict_check_s = 86401");
        let err = ServeConfig::from_toml(&over, Path::new("/etc/aoe/serve.toml")).unwrap_err();
        assert!(format!("{err:#}").contains("conflict_check_s"), "{err:#}");
        assert_eq!(c.control, Some(PathBuf::from("/etc/aoe/ctl/serve.sock")));
        let e = &c.exports[0];
        assert_eq!(e.path, PathBuf::from("/etc/aoe/disk.img"));
        assert_eq!((e.shelf, e.slot, e.offset, e.length), (1, 2, 8, Some(100)));
        assert!(e.read_only && !e.announce);
        assert_eq!(e.allowed_macs.len(), 1);
        assert_eq!(c.exports[1].path, PathBuf::from("/abs/other.img"));
        assert_eq!(c.exports[1].buffer_count, DEFAULT_BUFFER_COUNT);
        assert!(c.exports[1].announce);
    }

    #[test]
    fn refuses_bad_configs() {
        let base = |extra: &str| {
            format!("[[export]]\npath = \"a\"\nshelf = 1\nslot = 1\ninterfaces = [\"x\"]\n{extra}")
        };
        let err = |t: &str| {
            ServeConfig::from_toml(t, Path::new("/c.toml"))
                .unwrap_err()
                .to_string()
        };
        assert!(err("").contains("no exports"));
        assert!(err(&base("bogus = 1")).contains("bogus"));
        assert!(err(&base("allowed_macs = [\"zz\"]")).contains("not a MAC"));
        assert!(err(&base("buffer_count = 0")).contains("buffer count"));
        // Audit (s8): more than the worker queue holds was advertised and not honoured.
        assert!(err(&base("buffer_count = 8193")).contains("at most 8192"));
        assert!(err(&base("buffer_count = 65535")).contains("at most 8192"));
        assert_eq!(
            ServeConfig::from_toml(&base("buffer_count = 8192"), Path::new("/c.toml"))
                .unwrap()
                .exports[0]
                .buffer_count,
            MAX_BUFFER_COUNT
        );
        // Audit (issue 14): `--workers 100000` started threads until the allocator failed
        // (a panic and an abort in std's thread start-up, at about 18 000 on the test VM).
        for w in ["100000", "0"] {
            let e = err(&format!("workers = {w}\n{}", base("")));
            assert!(
                e.contains(&format!("workers must be from 1 to 1024, not {w}")),
                "{e}"
            );
        }
        // `--spin-us` (issue 15): at most 10 ms, what the loop's other duties wait anyway.
        let mut c = ServeConfig::from_toml(&base(""), Path::new("/c.toml")).unwrap();
        assert_eq!(c.spin, DEFAULT_SPIN);
        c.spin = MAX_SPIN;
        c.check_static().unwrap();
        c.spin = MAX_SPIN + Duration::from_micros(1);
        let e = c.check_static().unwrap_err().to_string();
        assert!(e.contains("at most 10000 us (10 ms), not 10001 us"), "{e}");
        c.spin = DEFAULT_SPIN;
        // `--coalesce-us` (issue 15): off by default, at most 1 ms.
        assert_eq!(c.coalesce, Duration::ZERO);
        c.coalesce = MAX_COALESCE;
        c.check_static().unwrap();
        c.coalesce = MAX_COALESCE + Duration::from_micros(1);
        let e = c.check_static().unwrap_err().to_string();
        assert!(e.contains("at most 1000 us (1 ms), not 1001 us"), "{e}");
        c.coalesce = Duration::ZERO;
        // `--dedup-window-ms` and `--dedup-entries` (session 29): bounded, 0 allowed.
        c.dedup.window = MAX_DEDUP_WINDOW;
        c.dedup.entries = MAX_DEDUP_ENTRIES;
        c.check_static().unwrap();
        c.dedup.window = MAX_DEDUP_WINDOW + Duration::from_millis(1);
        let e = c.check_static().unwrap_err().to_string();
        assert!(e.contains("from 0 to 3600000 ms"), "{e}");
        assert!(e.contains("not 3600001 ms"), "{e}");
        c.dedup.window = Duration::ZERO;
        c.dedup.entries = MAX_DEDUP_ENTRIES + 1;
        let e = c.check_static().unwrap_err().to_string();
        assert!(e.contains("from 0 to 1048576"), "{e}");
        c.dedup = Default::default();
        // `--drain-secs` (audit s8): at most an hour.
        assert_eq!(c.drain, DEFAULT_DRAIN);
        c.drain = MAX_DRAIN;
        c.check_static().unwrap();
        c.drain = MAX_DRAIN + Duration::from_secs(1);
        let e = c.check_static().unwrap_err().to_string();
        assert!(e.contains("at most 3600 s, not 3601 s"), "{e}");
        let dup = format!("{}\n{}", base(""), base(""));
        assert!(
            err(&dup).contains("exported twice on interface x"),
            "{}",
            err(&dup)
        );
        assert!(err(&base("").replace("shelf = 1", "shelf = 65535")).contains("broadcast shelf"));
        assert!(err(&base("").replace("slot = 1", "slot = 255")).contains("broadcast slot"));
        assert!(
            err(&base("").replace("interfaces = [\"x\"]", "interfaces = []"))
                .contains("no interfaces")
        );
    }

    /// Issue 13: an export backed by an RBD image, its cluster options beside it; the image
    /// name is not taken relative to the config file, the ceph.conf and keyring are.
    #[test]
    fn parses_rbd_exports() {
        let t = r#"
            [[export]]
            path = "rbd:pool/img"
            shelf = 1
            slot = 2
            interfaces = ["veth0"]
            ceph_conf = "ceph.conf"
            client_id = "aoe"
            keyring = "/k/aoe.keyring"
            [[export]]
            path = "rbd:pool/ns/img2"
            shelf = 1
            slot = 3
            interfaces = ["veth0"]
        "#;
        let c = ServeConfig::from_toml(t, Path::new("/etc/aoe/serve.toml")).unwrap();
        let e = &c.exports[0];
        assert_eq!(e.path, PathBuf::from("rbd:pool/img"));
        assert_eq!(
            e.rbd_image().unwrap().unwrap(),
            RbdImage {
                pool: "pool".into(),
                namespace: None,
                image: "img".into()
            }
        );
        assert_eq!(e.ceph.ceph_conf, Some(PathBuf::from("/etc/aoe/ceph.conf")));
        assert_eq!(e.ceph.client_id.as_deref(), Some("aoe"));
        assert_eq!(e.ceph.keyring, Some(PathBuf::from("/k/aoe.keyring")));
        let r = c.exports[1].rbd_image().unwrap().unwrap();
        assert_eq!(
            (r.namespace.as_deref(), r.image.as_str()),
            (Some("ns"), "img2")
        );
        assert!(c.exports[1].ceph.is_empty());
    }

    /// Issue 13: a malformed rbd: name, and Ceph options on a file export (which would be
    /// silently ignored), are refused at load.
    #[test]
    fn refuses_bad_rbd_exports() {
        let with = |path: &str, extra: &str| {
            let t = format!(
                "[[export]]\npath = \"{path}\"\nshelf = 1\nslot = 1\ninterfaces = [\"x\"]\n{extra}"
            );
            ServeConfig::from_toml(&t, Path::new("/c.toml")).map(|_| ())
        };
        for bad in [
            "rbd:",
            "rbd:pool",
            "rbd:pool/",
            "rbd:/img",
            "rbd:a/b/c/d",
            "rbd:p/i@snap",
        ] {
            let e = with(bad, "").unwrap_err().to_string();
            assert!(e.contains("is not rbd:POOL/IMAGE"), "{bad}: {e}");
        }
        let e = with("disk.img", "client_id = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("apply only to an rbd:POOL/IMAGE export"), "{e}");
        with("rbd:p/i", "client_id = \"x\"").unwrap();
        let e = with("rbd:p/i", "offset = 8").unwrap_err().to_string();
        assert!(e.contains("offset (-o) applies to files"), "{e}");
    }

    /// Issue 12: Debian's vblade-persistence files, one export each, read as a directory
    /// or a single `.conf` file.
    #[test]
    fn reads_vblade_persistence_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("b.conf"),
            "# exported by vblade-persistence\nshelf=14\nslot=2\nnetif=ens3\n\
             filename=/dev/mapper/SSD-aoe\n\
             options='-r -m 12:22:33:44:55:66,22:33:44:55:66:77 -o 8 -l 100 -b 16 -d -s'\n\
             ionice='--class best-effort --classdata 7'\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("a.conf"),
            "shelf=1\nslot=0\nnetif=\"eth1\"\nfilename=/srv/a.img\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("README"), "not a conf file").unwrap();
        let c = ServeConfig::load(dir.path()).unwrap();
        assert_eq!(c.exports.len(), 2);
        let a = &c.exports[0];
        assert_eq!((a.shelf, a.slot), (1, 0));
        assert_eq!(a.interfaces, ["eth1"]);
        assert_eq!(a.path, PathBuf::from("/srv/a.img"));
        assert!(!a.read_only && a.announce && a.buffer_count == DEFAULT_BUFFER_COUNT);
        let b = &c.exports[1];
        assert_eq!((b.shelf, b.slot), (14, 2));
        assert!(b.read_only && b.direct_io && b.sync);
        assert_eq!((b.offset, b.length, b.buffer_count), (8, Some(100), 16));
        assert_eq!(b.allowed_macs.len(), 2);
        assert_eq!(c.workers, DEFAULT_WORKERS);
        // One file alone, by its .conf name.
        let one = ServeConfig::load(&dir.path().join("a.conf")).unwrap();
        assert_eq!(one.exports, vec![a.clone()]);

        let err = |text: &str| {
            let f = dir.path().join("bad.conf");
            std::fs::write(&f, text).unwrap();
            let e = ServeConfig::load(&f).unwrap_err().to_string();
            std::fs::remove_file(&f).unwrap();
            e
        };
        let ok = "shelf=1\nslot=1\nnetif=x\nfilename=/f\n";
        assert!(
            err(&format!("{ok}bogus=1\n")).ends_with(
                "bad.conf:5: unknown key \"bogus\" (shelf, slot, netif, filename, options, ionice)"
            ),
            "{}",
            err(&format!("{ok}bogus=1\n"))
        );
        assert!(
            err(&format!("{ok}options='-x'\n")).contains(":5: options: -x is not a vblade option")
        );
        assert!(err(&format!("{ok}options='-m zz'\n")).contains(":5: options: -m zz"));
        assert!(err(&ok.replace("shelf=1", "shelf=70000")).contains(":1: shelf=70000"));
        assert!(err(&ok.replace("netif=x\n", "")).contains("no netif= line"));
        assert!(err(&ok.replace("slot=1", "slot=255")).contains("broadcast slot"));
        assert!(err(&format!("{ok}options='-r\n")).contains(":5: unclosed quote"));
        // Session 29: a value option twice kept the last without a word (vblade's getopt).
        for twice in ["-b 4 -b 8", "-o 8 -r -o 16", "-l 8 -l 9"] {
            let e = err(&format!("{ok}options='{twice}'\n"));
            let flag = &twice[..2];
            assert!(
                e.contains(&format!(":5: options: {flag} given twice")),
                "{twice}: {e}"
            );
        }
    }

    /// Issue 10: a config error is data, one variant per cause, and a TOML error names its
    /// line and column (here the unknown key on line 6).
    #[test]
    fn config_errors_are_typed_with_line_and_column() {
        let text =
            "[[export]]\npath = \"a\"\nshelf = 1\nslot = 1\ninterfaces = [\"x\"]\nbogus = 1\n";
        let e = ServeConfig::from_toml(text, Path::new("/c.toml")).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Syntax {
                    at: Some((6, 1)),
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("/c.toml:6:1: "), "{e}");
        let e = ServeConfig::from_toml(
            &text.replace("bogus = 1\n", "buffer_count = 0\n"),
            Path::new("/c.toml"),
        )
        .unwrap_err();
        // Session 28: a check after parsing names the export's place too (it named the
        // file alone: "/c.toml: e1.1: ..."); session 29: the key's (line 6, the value's
        // column), not the header's (1:1).
        assert!(
            matches!(&e, ConfigError::At { at: (6, 16), error, .. } if matches!(**error, ConfigError::NoBuffers(_))),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "/c.toml:6:16: e1.1: buffer count must be at least 1"
        );
        assert_eq!(line_column("a\nbé\nc", 5), (2, 3));
        assert_eq!(line_column("a\nbé\nc", 0), (1, 1));
        assert_eq!(line_column("a\nbé\nc", 2), (2, 1));
        // Inside the é: the character it belongs to.
        assert_eq!(line_column("a\nbé\nc", 4), (2, 2));
        assert_eq!(line_column("a\nbé\nc", 6), (3, 1));
        assert_eq!(line_column("a\nbé\nc", 99), (3, 2));
        assert_eq!(line_column("", 0), (1, 1));
    }

    /// Audit: a broadcast or multicast MAC in a mask list would make the export answer
    /// nobody (a frame's source is never a group address); the file, the vblade options
    /// and a config built from the command line all refuse it, the TOML file at the line
    /// and column of the entry.
    #[test]
    fn refuses_group_macs_in_mask_lists() {
        let text = "[[export]]\npath = \"a\"\nshelf = 1\nslot = 1\ninterfaces = [\"x\"]\n\
                    allowed_macs = [\"02:00:00:00:00:01\", \"ff:ff:ff:ff:ff:ff\"]\n";
        let e = ServeConfig::from_toml(text, Path::new("/c.toml")).unwrap_err();
        assert!(
            matches!(&e, ConfigError::At { at: (6, 38), error, .. }
                if matches!(**error, ConfigError::GroupMac { .. })),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with("/c.toml:6:38: e1.1: ff:ff:ff:ff:ff:ff is a multicast or broadcast"),
            "{e}"
        );
        let multicast = text.replace("ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01");
        let e = ServeConfig::from_toml(&multicast, Path::new("/c.toml")).unwrap_err();
        assert!(
            e.to_string().contains("01:00:5e:00:00:01 is a multicast"),
            "{e}"
        );
        // A unicast list still parses.
        let unicast = text.replace("ff:ff:ff:ff:ff:ff", "02:00:00:00:00:02");
        ServeConfig::from_toml(&unicast, Path::new("/c.toml")).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("v.conf");
        std::fs::write(
            &f,
            "shelf=1\nslot=1\nnetif=x\nfilename=/f\noptions='-m 02:00:00:00:00:01,ff:ff:ff:ff:ff:ff'\n",
        )
        .unwrap();
        let e = ServeConfig::load(&f).unwrap_err().to_string();
        assert!(
            e.contains("v.conf:5: options: -m: e1.1: ff:ff:ff:ff:ff:ff is a"),
            "{e}"
        );

        // What `aoe serve -m` builds: check_static refuses it.
        let mut c = ServeConfig::from_toml(&unicast, Path::new("/c.toml")).unwrap();
        // (From the command line: no file to name.)
        c.sources = Sources::default();
        c.exports[0].allowed_macs.push(MacAddr::BROADCAST);
        assert!(matches!(
            c.check_static(),
            Err(ConfigError::GroupMac {
                mac: MacAddr::BROADCAST,
                ..
            })
        ));
    }

    /// Audit: two exports of overlapping sectors of one file, at least one writable, would
    /// overwrite each other's data; refused whatever the path spelling. Read-only overlaps,
    /// disjoint ranges and one shelf.slot on two interfaces stay allowed. RBD images are
    /// compared by name.
    #[test]
    fn refuses_overlapping_writable_exports() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("img1"), vec![0u8; 64 * 512]).unwrap();
        std::os::unix::fs::symlink("img1", dir.path().join("link")).unwrap();
        let origin = dir.path().join("c.toml");
        let export = |path: &str, slot: u8, iface: &str, extra: &str| {
            format!(
                "[[export]]\npath = \"{path}\"\nshelf = 1\nslot = {slot}\n\
                 interfaces = [\"{iface}\"]\n{extra}\n"
            )
        };
        let check = |a: String, b: String| {
            ServeConfig::from_toml(&format!("{a}{b}"), &origin)
                .unwrap()
                .check_overlaps()
        };
        let e = check(export("img1", 1, "x", ""), export("img1", 2, "x", "")).unwrap_err();
        // At the second export's `[[export]]` (line 7), session 28; at its `path` (line 8,
        // the value's column), session 29.
        assert!(
            matches!(
                &e,
                ConfigError::At { at: (8, 8), error, .. } if matches!(**error, ConfigError::Overlap {
                    both_writable: true,
                    ..
                })
            ),
            "{e:?}"
        );
        let at = format!("{}:8:8: ", origin.display());
        assert!(
            e.to_string()
                .starts_with(&format!("{at}e1.1 and e1.2 both export "))
                && e.to_string().contains("img1 (sectors 0-end and 0-end)"),
            "{e}"
        );
        // Another spelling of the same file, one of the two read-only.
        let e = check(
            export("img1", 1, "x", "read_only = true"),
            export("link", 2, "y", "offset = 8"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("link (sectors 0-end and 8-end), and one of them is writable"),
            "{e}"
        );
        // Ranges that overlap by one sector, and ranges that do not.
        let e = check(
            export("img1", 1, "x", "length = 9"),
            export("img1", 2, "x", "offset = 8"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("(sectors 0-8 and 8-end)"), "{e}");
        // Placed at the key that makes the windows meet (session 29; `path`, line 8, until
        // then): the second's `offset` (line 12) when it starts inside the first ...
        let at_line = |a: String, b: String| match check(a, b).unwrap_err() {
            ConfigError::At { at, .. } => at,
            e => panic!("not placed: {e:?}"),
        };
        assert_eq!(
            at_line(
                export("img1", 1, "x", "length = 9"),
                export("img1", 2, "x", "offset = 8")
            ),
            (12, 10)
        );
        // ... its `length` when it starts before the first and runs into it ...
        assert_eq!(
            at_line(
                export("img1", 1, "x", "offset = 16"),
                export("img1", 2, "x", "offset = 4\nlength = 13")
            ),
            (13, 10)
        );
        // ... and its `path` when neither key of it does (both windows start at 0).
        assert_eq!(
            at_line(
                export("img1", 1, "x", "length = 9"),
                export("img1", 2, "x", "length = 4")
            ),
            (8, 8)
        );
        check(
            export("img1", 1, "x", "length = 8"),
            export("img1", 2, "x", "offset = 8"),
        )
        .unwrap();
        // Both read-only: allowed.
        check(
            export("img1", 1, "x", "read_only = true"),
            export("link", 2, "x", "read_only = true"),
        )
        .unwrap();
        // One shelf.slot on two interfaces (two entries): one export, its two paths.
        check(export("img1", 1, "x", ""), export("img1", 1, "y", "")).unwrap();
        // A file that does not exist is left to the open, which names it.
        check(export("none", 1, "x", ""), export("none", 2, "x", "")).unwrap();

        let e = check(export("rbd:p/i", 1, "x", ""), export("rbd:p/i", 2, "y", ""))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("{at}e1.1 and e1.2 both export rbd:p/i, and both")),
            "{e}"
        );
        check(
            export("rbd:p/i", 1, "x", ""),
            export("rbd:p/ns/i", 2, "y", ""),
        )
        .unwrap();
    }
    /// Session 28 (operator's audit, session 27): an out-of-range daemon-wide number and an
    /// export twice on one interface name `FILE:LINE:COLUMN` (the value's place, the second
    /// export's `[[export]]`) as well as the export, as the TOML parser's errors do; a
    /// command-line override that is out of range names no line of the file.
    #[test]
    fn checks_after_parsing_name_the_file_line_and_column() {
        let export = |slot: u8, extra: &str| {
            format!(
                "[[export]]\npath = \"a\"\nshelf = 1\nslot = {slot}\ninterfaces = [\"x\"]\n{extra}"
            )
        };
        let err = |text: &str| {
            ServeConfig::from_toml(text, Path::new("/c.toml"))
                .unwrap_err()
                .to_string()
        };
        let e = err(&format!("\nworkers = 0\n{}", export(1, "")));
        assert_eq!(e, "/c.toml:2:11: workers must be from 1 to 1024, not 0");
        let e = err(&format!("probe_ms = 999999\n{}", export(1, "")));
        assert!(
            e.starts_with("/c.toml:1:12: --probe-ms / probe_ms 999999 "),
            "{e}"
        );
        let e = err(&format!("conflict_check_s = 86401\n{}", export(1, "")));
        assert!(e.starts_with("/c.toml:1:20: conflict_check_s "), "{e}");
        let e = err(&format!(
            "{}{}",
            export(1, ""),
            export(2, "buffer_count = 9000\n")
        ));
        // Session 29: at the offending key's line (its value's column, as `workers`), not
        // at its `[[export]]` header's (6:1, 7:1 and 1:1 before).
        assert!(
            e.starts_with("/c.toml:11:16: e1.2: buffer count 9000 is more than"),
            "{e}"
        );
        let e = err(&format!("{}\n{}", export(1, ""), export(1, "")));
        assert_eq!(e, "/c.toml:11:15: e1.1 is exported twice on interface x");
        // The entry of a longer list that repeats the address.
        let e = err(&format!(
            "{}\n{}",
            export(1, ""),
            export(1, "").replace("[\"x\"]", "[\"y\", \"x\"]")
        ));
        assert_eq!(e, "/c.toml:11:20: e1.1 is exported twice on interface x");
        let e = err(&export(255, ""));
        assert!(
            e.starts_with("/c.toml:4:8: slot 255 is the broadcast slot"),
            "{e}"
        );
        let e = err(&export(1, "direct_io = true\n").replace("\"a\"", "\"rbd:p/i\""));
        assert!(
            e.starts_with("/c.toml:6:13: e1.1: direct_io (-d) applies to files"),
            "{e}"
        );
        let e = err(&export(1, "keyring = \"k\"\n"));
        assert!(
            e.starts_with("/c.toml:6:11: e1.1: ceph_conf, client_id and keyring apply only"),
            "{e}"
        );
        let e = err(&format!(
            "{}{}",
            export(1, ""),
            export(2, "").replace("\"x\"", "")
        ));
        assert!(
            e.starts_with("/c.toml:10:14: e1.2: no interfaces given"),
            "{e}"
        );
        // --workers 0 over a file's good value: not the file's line.
        let mut c = ServeConfig::from_toml(
            &format!("workers = 2\n{}", export(1, "")),
            Path::new("/c.toml"),
        )
        .unwrap();
        Overrides {
            workers: Some(0),
            ..Overrides::default()
        }
        .apply(&mut c);
        assert_eq!(
            c.check_static().unwrap_err().to_string(),
            "workers must be from 1 to 1024, not 0"
        );
        // Where an export is written is not part of it: a reload that moves it in the file
        // does not reopen it.
        let a = ServeConfig::from_toml(&export(1, ""), Path::new("/c.toml")).unwrap();
        let b = ServeConfig::from_toml(&format!("\n\n{}", export(1, "")), Path::new("/c.toml"))
            .unwrap();
        assert_eq!(a, b);
    }
}
