//! `aoe target`: ask a running `aoe serve` what it serves, through its control socket
//! (what ggaoed's `ggaoectl` offers: status, stats, show-config, show-macmask, show-reserve,
//! clear-stats, monitor), and `--control PATH` on `aoe serve`.
//!
//! The protocol is a JSON object per line each way (see `aoe_target::control::Request`);
//! `--json` prints the daemon's answer as it came, for scripts.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use aoe_target::control::{ControlSocket, ExportStatus, Observer, Snapshot};
use clap::{Args, Subcommand};

/// `--control` on `aoe serve`.
#[derive(Debug, Clone, Args)]
pub struct ControlArg {
    /// Control socket for `aoe target` (mode 0600); overrides the config file's `control`
    /// key [default: /run/aoe/serve-PID.sock].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// Opens the control socket of `aoe serve`: where `--control` says (an error there is
/// fatal), else at the default path (an error there is logged and the target runs without).
pub fn listen(a: &ControlArg, obs: Arc<Observer>) -> Result<Option<ControlSocket>> {
    match &a.control {
        Some(p) => aoe_target::control::listen(p, obs).map(Some),
        None => {
            let p = aoe_target::control::default_socket_path();
            if let Some(dir) = p.parent() {
                let n = aoe_target::control::remove_dead_sockets(dir);
                if n > 0 {
                    tracing::info!(
                        "removed {n} control socket(s) of killed targets from {}",
                        dir.display()
                    );
                }
            }
            match aoe_target::control::listen(&p, obs) {
                Ok(s) => Ok(Some(s)),
                Err(e) => {
                    tracing::warn!("no control socket: {e:#}");
                    Ok(None)
                }
            }
        }
    }
}

/// Arguments of `aoe target`.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// The target's control socket, the path given to `aoe serve --control` [default: the
    /// only /run/aoe/serve-*.sock].
    #[arg(long, visible_alias = "control", global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print the answer as JSON, one object per line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: TargetCmd,
}

/// What to ask.
#[derive(Debug, Subcommand)]
enum TargetCmd {
    /// Exports: address, interfaces, backing store, size, mode, requests in flight.
    Status(Which),
    /// Counters per export and per interface (since start or the last clear-stats).
    Stats(Which),
    /// Each export's configuration and its Query Config string.
    ShowConfig(Which),
    /// Each export's Mac Mask List (empty: every initiator is served).
    ShowMacmask(Which),
    /// Each export's reserve list (Reserve/Release; empty: not reserved).
    ShowReserve(Which),
    /// Start the counters shown by stats and monitor from zero (metrics keep their totals).
    ClearStats(Which),
    /// Requests, bytes and drops per second, a line per export every interval.
    Monitor(MonitorArgs),
}

#[derive(Debug, Args)]
struct Which {
    /// Only this export, SHELF.SLOT or eSHELF.SLOT.
    target: Option<String>,
}

#[derive(Debug, Args)]
struct MonitorArgs {
    /// Only this export, SHELF.SLOT or eSHELF.SLOT.
    target: Option<String>,
    /// Seconds between lines, 0.1 to 3600.
    #[arg(short = 'i', long, default_value_t = 1.0, value_name = "SECONDS", value_parser = parse_interval)]
    interval: f64,
    /// Stop after COUNT intervals, at least 1 [default: until interrupted].
    #[arg(short = 'c', long, value_name = "COUNT")]
    count: Option<u64>,
}

impl MonitorArgs {
    /// Usage errors (exit 2), before the socket is opened (`-i` is checked by its parser,
    /// [`parse_interval`]). `-c 0` would print the header and
    /// no line: a count of nothing is a mistake (leave `-c` out to run until interrupted).
    fn check(&self) -> Result<()> {
        if self.count == Some(0) {
            return Err(crate::tools::usage(
                "-c 0: the count is at least 1 (leave -c out to run until interrupted)",
            ));
        }
        Ok(())
    }
}

/// Finds the socket: `--socket` (or `--control`), else the only live `/run/aoe/serve-*.sock`.
fn socket_path(given: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/run/aoe")
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    // Left by a target that was killed: nothing answers there.
                    n.starts_with("serve-")
                        && n.ends_with(".sock")
                        && UnixStream::connect(p).is_ok()
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    match found.len() {
        0 => bail!(
            "no aoe serve control socket in /run/aoe; is a target running? (or give --socket PATH)"
        ),
        1 => Ok(found.remove(0)),
        _ => bail!(
            "several targets are running ({}); choose one with --socket PATH",
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// How long `aoe target` waits for an answer. The daemon answers within 1.5 s even when
/// its loop is busy (it then shows the last snapshot taken); no answer at all means the
/// process is stopped or hung.
const ANSWER_LIMIT: Duration = Duration::from_secs(10);

struct Conn {
    w: UnixStream,
    r: BufReader<UnixStream>,
    path: PathBuf,
}

impl Conn {
    fn open(path: &Path) -> Result<Conn> {
        let w = UnixStream::connect(path).map_err(|e| {
            // Connection refused on a socket file: nothing listens there any more (a target
            // killed with SIGKILL leaves its socket behind); on any other file: it is not a
            // control socket at all. Said in words, not only as the errno.
            use std::os::unix::fs::FileTypeExt;
            let hint = match std::fs::symlink_metadata(path) {
                Ok(m) if !m.file_type().is_socket() => {
                    ": not a socket (give --socket the control socket of aoe serve)"
                }
                _ if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    ": no aoe serve listens on it (a socket left by a target that was killed?)"
                }
                _ => "",
            };
            anyhow::Error::new(e).context(format!("cannot connect to {}{hint}", path.display()))
        })?;
        w.set_read_timeout(Some(ANSWER_LIMIT))?;
        let r = BufReader::new(w.try_clone()?);
        Ok(Conn {
            w,
            r,
            path: path.to_path_buf(),
        })
    }

    fn send(&mut self, req: serde_json::Value) -> Result<()> {
        match writeln!(self.w, "{req}") {
            Ok(()) => Ok(()),
            // The daemon may have refused the connection with a line saying why (too many
            // open) and closed it before the request came: that line is the error to show.
            Err(e) => match self.answer() {
                Err(said) if said.to_string().starts_with("target: ") => Err(said),
                _ => Err(e).with_context(|| format!("write to {}", self.path.display())),
            },
        }
    }

    /// The next answer line: the raw line and its `data`, or the daemon's error.
    fn answer(&mut self) -> Result<(String, serde_json::Value)> {
        let mut line = String::new();
        let n = match self.r.read_line(&mut line) {
            Ok(n) => n,
            // The read timeout: name the likely cause rather than EAGAIN.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let waited = self.w.read_timeout().ok().flatten().unwrap_or(ANSWER_LIMIT);
                bail!(
                    "{}: no answer in {} s; is that aoe serve stopped (SIGSTOP, a debugger) \
                     or hung?",
                    self.path.display(),
                    waited.as_secs()
                );
            }
            Err(e) => return Err(e).with_context(|| format!("read from {}", self.path.display())),
        };
        if n == 0 {
            bail!("{} closed the connection", self.path.display());
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}: not a JSON answer: {line:?}", self.path.display()))?;
        if v["ok"] != serde_json::Value::Bool(true) {
            bail!(
                "target: {}",
                v["error"].as_str().unwrap_or("request refused")
            );
        }
        Ok((line.trim_end().to_owned(), v["data"].clone()))
    }
}

/// Runs `aoe target`.
pub fn run(a: TargetArgs) -> Result<()> {
    if let TargetCmd::Monitor(m) = &a.cmd {
        m.check()?;
    }
    let path = socket_path(&a.socket)?;
    let mut c = Conn::open(&path)?;
    let (cmd, which) = match &a.cmd {
        TargetCmd::Status(w) => ("status", &w.target),
        TargetCmd::Stats(w) => ("stats", &w.target),
        TargetCmd::ShowConfig(w) => ("show-config", &w.target),
        TargetCmd::ShowMacmask(w) => ("show-macmask", &w.target),
        TargetCmd::ShowReserve(w) => ("show-reserve", &w.target),
        TargetCmd::ClearStats(w) => ("clear-stats", &w.target),
        TargetCmd::Monitor(m) => return monitor(&mut c, m, a.json),
    };
    c.send(serde_json::json!({ "cmd": cmd, "target": which }))?;
    let (line, data) = c.answer()?;
    if a.json {
        outln!("{}", serde_json::to_string(&data).unwrap_or(line));
        return Ok(());
    }
    if cmd == "clear-stats" {
        outln!("statistics cleared for {} export(s)", data["cleared"]);
        return Ok(());
    }
    let snap: Snapshot = serde_json::from_value(data).context("unexpected answer")?;
    let mut out = String::new();
    match cmd {
        "status" => status(&mut out, &snap),
        "stats" => stats(&mut out, &snap),
        "show-config" => show_config(&mut out, &snap),
        "show-macmask" => lists(&mut out, &snap, |e| &e.mask, "every initiator"),
        _ => lists(&mut out, &snap, |e| &e.reserve, "not reserved"),
    }
    out!("{out}");
    Ok(())
}

fn mode(e: &ExportStatus) -> String {
    let mut m = String::from(if e.read_only { "ro" } else { "rw" });
    if e.direct {
        m.push_str(",direct");
    }
    if e.sync {
        m.push_str(",sync");
    }
    if e.failed {
        m.push_str(",failed");
    }
    if e.path_replaced {
        m.push_str(",path-replaced");
    }
    if !e.conflicts.is_empty() {
        m.push_str(",conflict");
    }
    m
}

fn status(out: &mut String, s: &Snapshot) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "aoe serve pid {} up {:.0}s, {} export(s), {} worker(s){}",
        s.pid,
        s.uptime,
        s.exports.len(),
        s.workers,
        s.config_file
            .as_ref()
            .map(|c| format!(", config {c}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "{:<10} {:<16} {:>14} {:<12} {:>9}  PATH",
        "TARGET", "INTERFACES", "SECTORS", "MODE", "IN-FLIGHT"
    );
    for e in &s.exports {
        let _ = writeln!(
            out,
            "{:<10} {:<16} {:>14} {:<12} {:>9}  {}",
            e.target,
            e.interfaces.join(","),
            e.sectors,
            mode(e),
            e.in_flight,
            e.path
        );
    }
    // A reload (SIGHUP) under way: the running configuration serves on meanwhile.
    if let Some(r) = &s.reload {
        let _ = writeln!(
            out,
            "reload: {} under way for {} s ({}); the running configuration serves meanwhile",
            r.config,
            r.secs,
            if r.phase == "opening" {
                "opening its stores"
            } else {
                "waiting to take an image over, see pending"
            }
        );
    }
    // An export opened but not served yet: it took its rbd: image over and waits for the
    // gateway whose lock it broke to fall silent (README, "Fencing and failover").
    for p in &s.pending {
        let heard = p
            .waiting_for
            .iter()
            .map(|c| format!("{} on {}", c.mac, c.interface))
            .collect::<Vec<_>>()
            .join(", ");
        let _ =
            writeln!(
            out,
            "pending: e{} {} on {} ({}): took the image over, waiting {} s for {} (the gateway \
             whose lock was broken) to stop answering; gives up in {} s",
            p.target,
            p.path,
            p.interfaces.join(","),
            p.during,
            p.waiting_secs,
            if heard.is_empty() { "the old gateway".into() } else { heard },
            p.gives_up_in_secs
        );
    }
    // Another target at one of our addresses: an initiator mixes the two disks' data.
    for e in &s.exports {
        for c in &e.conflicts {
            let _ = writeln!(
                out,
                "conflict: e{} is also answered by {} on {} (last {} s ago): initiators will \
                 mix the two disks' data",
                e.target, c.mac, c.interface, c.last_seen_secs
            );
        }
    }
}

fn stats(out: &mut String, s: &Snapshot) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "{:<10} {:>10} {:>14} {:>14} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "TARGET",
        "REPLIES",
        "READ-BYTES",
        "WRITE-BYTES",
        "FLUSHES",
        "ERR-AOE",
        "ERR-ATA",
        "DROP-BUF",
        "DROP-QUEUE",
        "DROP-SHARE"
    );
    for e in &s.exports {
        let c = &e.counters;
        let _ = writeln!(
            out,
            "{:<10} {:>10} {:>14} {:>14} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
            e.target,
            c.replies,
            c.bytes_read,
            c.bytes_written,
            c.flushes,
            c.aoe_errors,
            c.ata_errors,
            c.dropped_over_buffer_count,
            c.dropped_queue_full,
            c.dropped_over_fair_share
        );
    }
    // The duplicate-write table (copies run again, nothing written over them since; copies
    // dropped while the write was in flight; copies dropped because a newer write overlapped
    // it; writes forgotten early for its bound) and wildcard writes refused.
    let _ = writeln!(
        out,
        "{:<10} {:>12} {:>12} {:>15} {:>12} {:>15}",
        "TARGET", "DUP-AGAIN", "DUP-DROPPED", "DUP-SUPERSEDED", "DUP-EVICTED", "WILDCARD-WRITES"
    );
    for e in &s.exports {
        let d = &e.counters.duplicate_writes;
        let _ = writeln!(
            out,
            "{:<10} {:>12} {:>12} {:>15} {:>12} {:>15}",
            e.target,
            d.executed_again,
            d.dropped_in_flight,
            d.dropped_superseded,
            d.evicted,
            e.counters.wildcard_writes_refused
        );
    }
    let _ = writeln!(
        out,
        "{:<16} {:>6} {:>12} {:>12} {:>12}",
        "INTERFACE", "MTU", "SEND-FAILED", "BACKLOG-FULL", "RX-DROPPED"
    );
    for i in &s.interfaces {
        let _ = writeln!(
            out,
            "{:<16} {:>6} {:>12} {:>12} {:>12}",
            i.name, i.mtu, i.send_failed, i.backlog_full, i.rx_dropped
        );
    }
}

fn show_config(out: &mut String, s: &Snapshot) {
    use std::fmt::Write as _;
    for e in &s.exports {
        let _ = writeln!(out, "{}:", e.target);
        let _ = writeln!(out, "  path          {}", e.path);
        let _ = writeln!(out, "  interfaces    {}", e.interfaces.join(","));
        let _ = writeln!(out, "  sectors       {}", e.sectors);
        let _ = writeln!(out, "  offset        {}", e.offset);
        let _ = writeln!(out, "  mode          {}", mode(e));
        let _ = writeln!(out, "  buffer-count  {}", e.buffer_count);
        let _ = writeln!(out, "  config-string {:?}", e.config_string);
    }
}

fn lists(out: &mut String, s: &Snapshot, f: fn(&ExportStatus) -> &Vec<String>, empty: &str) {
    use std::fmt::Write as _;
    for e in &s.exports {
        let l = f(e);
        if l.is_empty() {
            let _ = writeln!(out, "{}: (empty: {empty})", e.target);
        } else {
            let _ = writeln!(out, "{}: {}", e.target, l.join(" "));
        }
    }
}

/// `monitor -i`: 0.1 s (the daemon's floor) to an hour; NaN, infinities and the rest are
/// usage errors, before anything is connected.
fn parse_interval(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.1..=MAX_INTERVAL_S).contains(&v) => Ok(v),
        _ => Err(format!(
            "-i {s}: the interval is from 0.1 to {MAX_INTERVAL_S} seconds"
        )),
    }
}

/// The longest `monitor -i`, in seconds.
const MAX_INTERVAL_S: f64 = 3600.0;

/// ggaoectl `monitor`: rates over each interval, a line per export.
fn monitor(c: &mut Conn, m: &MonitorArgs, json: bool) -> Result<()> {
    // The daemon answers once per interval: the connection's fixed read timeout would
    // give up between two samples of a longer one.
    c.w.set_read_timeout(Some(Duration::from_secs_f64(m.interval) + ANSWER_LIMIT))?;
    let ms = (m.interval * 1000.0) as u64;
    // One sample more than lines: rates need a previous sample.
    let count = m.count.map(|n| n + 1);
    c.send(serde_json::json!({
        "cmd": "monitor", "target": m.target, "interval_ms": ms, "count": count
    }))?;
    let mut prev: Option<Snapshot> = None;
    if !json {
        outln!(
            "{:<10} {:>10} {:>12} {:>12} {:>8} {:>8} {:>9}",
            "TARGET",
            "REPLIES/s",
            "READ-B/s",
            "WRITE-B/s",
            "ERR/s",
            "DROP/s",
            "IN-FLIGHT"
        );
    }
    let mut lines = 0u64;
    loop {
        if m.count.is_some_and(|n| lines >= n) {
            return Ok(());
        }
        let (_, data) = c.answer()?;
        let snap: Snapshot = serde_json::from_value(data.clone()).context("unexpected answer")?;
        if let Some(p) = &prev {
            let dt = (snap.taken - p.taken).max(1e-3);
            if json {
                outln!("{data}");
            }
            for e in &snap.exports {
                let Some(pe) = p.exports.iter().find(|x| x.target == e.target) else {
                    continue;
                };
                let (a, b) = (&e.counters, &pe.counters);
                let r = |x: u64, y: u64| x.saturating_sub(y) as f64 / dt;
                if !json {
                    outln!(
                        "{:<10} {:>10.0} {:>12.0} {:>12.0} {:>8.0} {:>8.0} {:>9}",
                        e.target,
                        r(a.replies, b.replies),
                        r(a.bytes_read, b.bytes_read),
                        r(a.bytes_written, b.bytes_written),
                        r(a.aoe_errors + a.ata_errors, b.aoe_errors + b.ata_errors),
                        r(a.dropped, b.dropped),
                        e.in_flight
                    );
                }
            }
            let _ = std::io::stdout().flush();
            lines += 1;
        }
        prev = Some(snap);
    }
}
