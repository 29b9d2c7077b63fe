//! `aoe serve` / `vblade`: the target.

use std::path::PathBuf;

use anyhow::{Context, Result};
use aoe_target::config::{DEFAULT_BUFFER_COUNT, DEFAULT_WORKERS};
use aoe_target::{CephOptions, Control, Daemon, ExportSpec, IoMode, Overrides, ServeConfig};
use aoe_wire::MacAddr;
use clap::Args;

/// vblade's arguments: `[-b BUFCNT] [-d] [-s] [-r] [-m MAC[,MAC...]] [-o OFFSET] [-l LENGTH]
/// SHELF SLOT NETIF FILE`, or `--config FILE` for any number of exports.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  aoe serve 1 1 eth1 /srv/disk.img   (SIGHUP: reopened at its new size if it grew or shrank)\n  aoe serve -r -m 52:54:00:12:34:56 2 0 eth1 /dev/sdb\n  aoe serve --config /etc/aoe/serve.toml   (SIGHUP reloads it)\n  aoe serve --ceph-conf /etc/ceph/ceph.conf --client-id aoe 1 2 eth1 rbd:pool/img"
)]
pub struct ServeArgs {
    /// Advertised buffer count: requests the initiator may keep in flight, 1 to 8192
    /// [default: 128].
    #[arg(short = 'b', value_name = "BUFCNT")]
    bufcnt: Option<u16>,
    /// Open the file with O_DIRECT (bypass the page cache).
    #[arg(short = 'd')]
    direct: bool,
    /// Open the file with O_SYNC (every write durable before it is acknowledged).
    #[arg(short = 's')]
    sync: bool,
    /// Export read-only.
    #[arg(short = 'r')]
    read_only: bool,
    /// Initial MAC mask list: only these initiators are answered.
    #[arg(short = 'm', value_name = "MAC[,MAC...]", value_delimiter = ',')]
    macs: Vec<String>,
    /// Offset into the file, in 512-byte sectors [default: 0].
    #[arg(short = 'o', value_name = "OFFSET")]
    offset: Option<u64>,
    /// Length of the export, in 512-byte sectors (default: to the end of the file).
    #[arg(short = 'l', value_name = "LENGTH")]
    length: Option<u64>,
    /// A TOML file with any number of exports, or Debian vblade-persistence files (a
    /// directory such as /etc/vblade.conf.d, or one NAME.conf), instead of the positional
    /// arguments; SIGHUP reloads it. Every
    /// export option then comes from the file: -b, -d, -s, -r, -m, -o, -l, --no-announce and
    /// the positional arguments are refused with it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Keep config strings, mask and reserve lists here across restarts.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// I/O worker threads, 1 to 1024 [default: 4].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Do not send the unsolicited Query Config response at start.
    #[arg(long)]
    no_announce: bool,
    /// Start even if another target on the segment answers for our shelf.slot (only warn).
    /// Nothing to allow with --probe-ms 0 (no probe runs): said at start.
    #[arg(long)]
    allow_duplicate: bool,
    /// How long to wait for answers to the duplicate probe before announcing; 0: no probe
    /// [default: 1000].
    #[arg(long, value_name = "MS")]
    probe_ms: Option<u64>,
    /// For an rbd:POOL/IMAGE export: the Ceph cluster's config file (default: $CEPH_CONF or
    /// /etc/ceph/ceph.conf).
    #[arg(long, value_name = "FILE")]
    ceph_conf: Option<PathBuf>,
    /// For an rbd:POOL/IMAGE export: the cephx client id, without "client." (default: admin).
    #[arg(long, value_name = "ID")]
    client_id: Option<String>,
    /// For an rbd:POOL/IMAGE export: the client's keyring (default: the one ceph.conf names).
    #[arg(long, value_name = "FILE")]
    keyring: Option<PathBuf>,
    /// How frames move between the interfaces and the target: `rings` (the default) reads
    /// requests from a PACKET_MMAP receive ring without a system call and sends replies
    /// through a transmit ring, one send() per batch, less CPU per GB (falls back to mmsg,
    /// logging it, where rings cannot be set up); `mmsg` uses recvmmsg/sendmmsg batches of 64.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = Io::Rings)]
    io: Io,
    /// How long at most, in microseconds, the target keeps polling its sockets after the
    /// last frame before it sleeps, 0 to 10000 [default: 25]. Within it the spin runs only
    /// while it costs less CPU than the sleep and wake-up it saves (the target measures what
    /// its own wake-ups cost): it spins under a saturating load, where the next frames come
    /// within a microsecond or two, and sleeps at a partial load. 0 never spins. Fixed at
    /// start.
    #[arg(long, value_name = "US")]
    spin_us: Option<u64>,
    /// How long at most, in microseconds, the target lets frames gather before it takes
    /// them, 0 to 1000 [default: 0, off]. Used only while the spin does not pay (a partial
    /// load: frames further apart than a wake-up costs), and only where the frames come at
    /// most half this far apart: after a batch the target sleeps as long as four frames take
    /// (at most this) on a timer instead of waking for each, and takes what came in one go.
    /// Fewer wake-ups, less CPU per GB; each reply waits up to this long more. Fixed at start.
    #[arg(long, value_name = "US")]
    coalesce_us: Option<u64>,
    /// How long, in seconds, a stop (SIGTERM, SIGINT) waits for the I/O in flight to finish
    /// and be answered, 0 to 3600 [default: 30]. What is still in flight then is logged, by
    /// export, and the target exits with status 1 (the stop lost work). Fixed at start.
    #[arg(long, value_name = "SECS")]
    drain_secs: Option<u64>,
    /// How long, in milliseconds, each export remembers a write it admitted, to drop a
    /// network duplicate of it once a newer write overlapped it (a late copy would put old
    /// data back over the newer write), 0 to 3600000 [default: 3000]. 0 turns this off (and
    /// makes --dedup-entries do nothing, which is said at start). Fixed at start.
    #[arg(long, value_name = "MS")]
    dedup_window_ms: Option<u64>,
    /// Most writes each export remembers for that, the oldest forgotten first, 0 to
    /// 1048576 (about 80 MiB) [default: 16384, about 1.25 MiB]. 0 turns it off. Fixed at
    /// start.
    #[arg(long, value_name = "N")]
    dedup_entries: Option<usize>,
    /// Check the configuration (files, sizes, interfaces, state files) and exit. Binds no
    /// socket: the --metrics address and the --control path are not tried (a warning says
    /// so).
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    metrics: crate::metrics::MetricsArg,
    #[command(flatten)]
    control: crate::target_ctl::ControlArg,
    /// Shelf (major) address, 0-65534.
    shelf: Option<u16>,
    /// Slot (minor) address, 0-254.
    slot: Option<u8>,
    /// Network interface to serve on.
    netif: Option<String>,
    /// File or block device to export, or a Ceph RBD image as rbd:POOL/IMAGE or
    /// rbd:POOL/NAMESPACE/IMAGE (needs the `rbd` build feature).
    file: Option<PathBuf>,
}

/// `--io`: how frames move ([`aoe_target::IoMode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Io {
    /// PACKET_MMAP receive and transmit rings (TPACKET_V2).
    Rings,
    /// recvmmsg/sendmmsg batches.
    Mmsg,
}

impl From<Io> for IoMode {
    fn from(io: Io) -> IoMode {
        match io {
            Io::Rings => IoMode::Rings,
            Io::Mmsg => IoMode::Mmsg,
        }
    }
}

/// The per-export flags and operands given on the command line, as the user spelled them.
/// With `--config` the file sets all of these, so any of them is an error rather than
/// silently ignored: `-r` ignored would serve a read-only intent writable.
fn export_flags_given(a: &ServeArgs) -> Vec<&'static str> {
    let mut v = Vec::new();
    let flags = [
        ("-b", a.bufcnt.is_some()),
        ("-d", a.direct),
        ("-s", a.sync),
        ("-r", a.read_only),
        ("-m", !a.macs.is_empty()),
        ("-o", a.offset.is_some()),
        ("-l", a.length.is_some()),
        ("--no-announce", a.no_announce),
        ("--ceph-conf", a.ceph_conf.is_some()),
        ("--client-id", a.client_id.is_some()),
        ("--keyring", a.keyring.is_some()),
        ("SHELF", a.shelf.is_some()),
        ("SLOT", a.slot.is_some()),
        ("NETIF", a.netif.is_some()),
        ("FILE", a.file.is_some()),
    ];
    for (name, given) in flags {
        if given {
            v.push(name);
        }
    }
    v
}

/// The settings given next to `--config` that win over its file, at start and on reload.
fn overrides(a: &ServeArgs) -> Overrides {
    Overrides {
        state_dir: a.state_dir.clone(),
        workers: a.workers,
        allow_duplicate: a.allow_duplicate,
        probe: a.probe_ms.map(std::time::Duration::from_millis),
    }
}

fn config_from_args(a: &ServeArgs) -> Result<(ServeConfig, Option<PathBuf>)> {
    if let Some(path) = &a.config {
        let given = export_flags_given(a);
        if !given.is_empty() {
            return Err(UsageError(format!(
                "--config {} sets every export option; remove {} from the command line \
                 (put them in the config file)",
                path.display(),
                given.join(", ")
            ))
            .into());
        }
        let mut cfg = ServeConfig::load(path)?;
        overrides(a).apply(&mut cfg);
        cfg.io = a.io.into();
        if let Some(us) = a.spin_us {
            cfg.spin = std::time::Duration::from_micros(us);
        }
        if let Some(us) = a.coalesce_us {
            cfg.coalesce = std::time::Duration::from_micros(us);
        }
        if let Some(s) = a.drain_secs {
            cfg.drain = std::time::Duration::from_secs(s);
        }
        cfg.dedup = dedup(a);
        return Ok((cfg, Some(path.clone())));
    }
    let (Some(shelf), Some(slot), Some(netif), Some(file)) =
        (a.shelf, a.slot, a.netif.clone(), a.file.clone())
    else {
        return Err(UsageError(
            "usage: aoe serve [options] SHELF SLOT NETIF FILE, or aoe serve --config FILE".into(),
        )
        .into());
    };
    let allowed_macs = a
        .macs
        .iter()
        .map(|m| m.parse::<MacAddr>())
        .collect::<Result<Vec<_>, _>>()
        .context("-m")?;
    let cfg = ServeConfig {
        exports: vec![ExportSpec {
            path: file,
            shelf,
            slot,
            interfaces: vec![netif],
            read_only: a.read_only,
            direct_io: a.direct,
            sync: a.sync,
            offset: a.offset.unwrap_or(0),
            length: a.length,
            buffer_count: a.bufcnt.unwrap_or(DEFAULT_BUFFER_COUNT),
            allowed_macs,
            announce: !a.no_announce,
            ceph: CephOptions {
                ceph_conf: a.ceph_conf.clone(),
                client_id: a.client_id.clone(),
                keyring: a.keyring.clone(),
            },
        }],
        state_dir: a.state_dir.clone(),
        workers: a.workers.unwrap_or(DEFAULT_WORKERS),
        allow_duplicate: a.allow_duplicate,
        probe: a.probe_ms.map_or(
            aoe_target::probe::DEFAULT_PROBE,
            std::time::Duration::from_millis,
        ),
        conflict_check: aoe_target::config::DEFAULT_CONFLICT_CHECK,
        control: None,
        io: a.io.into(),
        spin: a.spin_us.map_or(
            aoe_target::config::DEFAULT_SPIN,
            std::time::Duration::from_micros,
        ),
        coalesce: std::time::Duration::from_micros(a.coalesce_us.unwrap_or(0)),
        drain: a.drain_secs.map_or(
            aoe_target::config::DEFAULT_DRAIN,
            std::time::Duration::from_secs,
        ),
        dedup: dedup(a),
        sources: Default::default(),
    };
    Ok((cfg, None))
}

/// `--dedup-window-ms` and `--dedup-entries` over the defaults.
fn dedup(a: &ServeArgs) -> aoe_proto::target::DedupConfig {
    let d = aoe_proto::target::DedupConfig::default();
    aoe_proto::target::DedupConfig {
        window: a
            .dedup_window_ms
            .map_or(d.window, std::time::Duration::from_millis),
        entries: a.dedup_entries.unwrap_or(d.entries),
    }
}

/// Settings that were given and do nothing beside the others, one line each, said at start
/// (and by `--check`) rather than taken without a word (session 29's audit of the flags).
/// The run goes on: each is harmless, and vblade's scripts may carry them.
fn ignored_settings(cfg: &ServeConfig, a: &ServeArgs) -> Vec<String> {
    let mut out = Vec::new();
    // The start, reload and conflict-watch probes all wait `probe_ms`; at 0 none runs
    // (`aoe_target::probe`), so there is no duplicate to allow.
    if cfg.allow_duplicate && cfg.probe.is_zero() {
        out.push(
            "--allow-duplicate (allow_duplicate) has no effect with --probe-ms 0 (probe_ms = 0): \
             no probe runs, so no duplicate is found to allow"
                .to_owned(),
        );
    }
    // The conflict watch probes with the same wait, and is off at `probe_ms` 0
    // (`daemon/conflict.rs`): a `conflict_check_s` the file sets does nothing then.
    let watch_set = cfg.sources.key_at("conflict_check_s").is_some();
    if watch_set && cfg.probe.is_zero() && !cfg.conflict_check.is_zero() {
        out.push(format!(
            "conflict_check_s = {} has no effect with probe_ms = 0 (--probe-ms 0): the \
             conflict watch's probe waits probe_ms, so none runs",
            cfg.conflict_check.as_secs()
        ));
    }
    // The worker pool runs the I/O of files and block devices only; librbd runs an rbd:
    // image's itself (`aoe_target::backing::Store`). A reload may add a file export, so
    // this is said, not refused.
    let workers_set = a.workers.is_some() || cfg.sources.key_at("workers").is_some();
    if workers_set && cfg.exports.iter().all(|e| e.rbd_image().is_some()) {
        out.push(format!(
            "--workers {} (workers) has no effect while every export is an rbd: image: \
             librbd runs their I/O, the workers serve files and block devices",
            cfg.workers
        ));
    }
    // The duplicate-write table is off when either is 0 (`DedupConfig`): the other, if
    // given, does nothing.
    match (a.dedup_window_ms, a.dedup_entries) {
        (Some(0), Some(n)) if n != 0 => out.push(format!(
            "--dedup-entries {n} has no effect with --dedup-window-ms 0: the duplicate-write \
             table is off"
        )),
        (Some(ms), Some(0)) if ms != 0 => out.push(format!(
            "--dedup-window-ms {ms} has no effect with --dedup-entries 0: the duplicate-write \
             table is off"
        )),
        _ => {}
    }
    out
}

/// A command line that names too little to run: exit status 2, like clap's own errors.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Runs `aoe serve`.
pub fn run(a: ServeArgs) -> Result<()> {
    let (cfg, path) = config_from_args(&a)?;
    // O_SYNC makes writes durable before they are acknowledged; a read-only export takes
    // none, so the option would be taken and do nothing: said, not silently ignored.
    for e in cfg.exports.iter().filter(|e| e.read_only && e.sync) {
        tracing::warn!(
            "{}: -s (sync) has no effect on a read-only export: it takes no writes",
            e.addr()
        );
    }
    for warning in ignored_settings(&cfg, &a) {
        tracing::warn!("{warning}");
    }
    if a.check {
        // `--check` opens no socket: what a start would bind is not tried (session 29's
        // audit: taken without a word, so `--check` said ok for a port already in use).
        let unchecked: Vec<&str> = [
            ("--metrics", a.metrics.metrics.is_some()),
            ("--control", a.control.control.is_some()),
        ]
        .into_iter()
        .filter_map(|(f, given)| given.then_some(f))
        .collect();
        if !unchecked.is_empty() {
            tracing::warn!(
                "--check does not try {}: nothing is bound until the target starts",
                unchecked.join(" or ")
            );
        }
        aoe_target::validate(&cfg)?;
        outln!("configuration ok: {} export(s)", cfg.exports.len());
        return Ok(());
    }
    let cfg_control = cfg.control.clone();
    let control = Control::with_signals().context("cannot install signal handlers")?;
    let mut daemon = Daemon::new(cfg, path)?;
    daemon.set_overrides(overrides(&a));
    if let Some(addr) = a.metrics.metrics {
        let obs = daemon.observer();
        crate::metrics::serve(addr, move || crate::metrics::target_text(&obs))?;
    }
    // `--control` wins over the file's `control` key.
    let control_arg = crate::target_ctl::ControlArg {
        control: a.control.control.clone().or(cfg_control),
    };
    let _control = crate::target_ctl::listen(&control_arg, daemon.observer())?;
    daemon.run(&control)
}
