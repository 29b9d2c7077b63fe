//! `--metrics ADDR:PORT` on `aoe serve` and `aoe initiator`: Prometheus metrics over HTTP.
//!
//! Encoded by `prometheus-client` (OpenMetrics text, which Prometheus scrapes natively) and
//! served by a small responder thread on a std `TcpListener`: `GET /metrics` answers the
//! metrics, anything else 404. Each scrape builds a registry from the state the daemons
//! already publish (the target's [`aoe_target::control::Observer`] snapshot, the initiator's
//! [`aoe_initiator::net::Shared`] devices), so the I/O paths carry no metrics code at all.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use aoe_proto::initiator::DeviceState;
use aoe_target::control::Observer;
use clap::Args;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The `--metrics` option.
#[derive(Debug, Clone, Args)]
pub struct MetricsArg {
    /// Serve Prometheus metrics over HTTP at http://ADDR:PORT/metrics (e.g. 127.0.0.1:9610).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
}

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A registry being filled for one scrape.
struct Scrape {
    reg: Registry,
}

impl Scrape {
    fn new() -> Scrape {
        Scrape {
            reg: Registry::default(),
        }
    }

    fn counter(&mut self, name: &str, help: &str, rows: Vec<(Labels, u64)>) {
        let fam = Family::<Labels, Counter>::default();
        for (l, v) in rows {
            fam.get_or_create(&l).inc_by(v);
        }
        self.reg.register(name, help, fam);
    }

    fn gauge(&mut self, name: &str, help: &str, rows: Vec<(Labels, i64)>) {
        let fam = Family::<Labels, Gauge>::default();
        for (l, v) in rows {
            fam.get_or_create(&l).set(v);
        }
        self.reg.register(name, help, fam);
    }

    fn gauge_f(&mut self, name: &str, help: &str, rows: Vec<(Labels, f64)>) {
        let fam = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        for (l, v) in rows {
            fam.get_or_create(&l).set(v);
        }
        self.reg.register(name, help, fam);
    }

    fn text(self) -> String {
        let mut s = String::new();
        // Encoding into a String cannot fail.
        let _ = encode(&mut s, &self.reg);
        s
    }
}

/// The target's metrics, per export (`export="shelf.slot"`, `interfaces`) and interface.
pub fn target_text(obs: &Observer) -> String {
    let snap = obs.fresh(Duration::from_millis(1500));
    let mut s = Scrape::new();
    let ex = |e: &aoe_target::control::ExportStatus| {
        labels(&[
            ("export", &e.target),
            ("interfaces", &e.interfaces.join(",")),
        ])
    };
    let per = |f: &dyn Fn(&aoe_target::control::ExportCounters) -> u64| {
        snap.exports
            .iter()
            .map(|e| (ex(e), f(&e.counters)))
            .collect::<Vec<_>>()
    };
    s.counter(
        "aoe_target_replies",
        "Requests answered",
        per(&|c| c.replies),
    );
    s.counter(
        "aoe_target_read_bytes",
        "Bytes read from the backing store for initiators",
        per(&|c| c.bytes_read),
    );
    s.counter(
        "aoe_target_written_bytes",
        "Bytes written to the backing store",
        per(&|c| c.bytes_written),
    );
    s.counter(
        "aoe_target_flushes",
        "FLUSH CACHE commands",
        per(&|c| c.flushes),
    );
    let mut requests = Vec::new();
    let mut codes = Vec::new();
    for e in &snap.exports {
        for (kind, n) in e.counters.requests.named() {
            let mut l = ex(e);
            l.push(("kind".into(), kind.into()));
            requests.push((l, n));
        }
        for (code, n) in e.counters.aoe_error_codes.named() {
            let mut l = ex(e);
            l.push(("code".into(), code.into()));
            codes.push((l, n));
        }
    }
    s.counter(
        "aoe_target_requests",
        "Requests by command: ATA read, write, identify, flush, other; Query Config query and \
         set; Mac Mask List; Reserve/Release; unknown commands",
        requests,
    );
    s.counter(
        "aoe_target_aoe_errors",
        "Replies with the AoE error flag by error code (AoEr11 section 2.4)",
        codes,
    );
    let mut dups = Vec::new();
    for e in &snap.exports {
        for (what, n) in e.counters.duplicate_writes.named() {
            let mut l = ex(e);
            l.push(("what".into(), what.into()));
            dups.push((l, n));
        }
    }
    s.counter(
        "aoe_target_duplicate_writes",
        "The duplicate-write table: requests under an answered write's key run again, nothing \
         written over it since (executed_again), copies of a write in flight dropped \
         (dropped_in_flight), requests under the key of a write a newer one overlapped dropped \
         unanswered (dropped_superseded), writes forgotten inside the window because the \
         table was full (evicted)",
        dups,
    );
    s.counter(
        "aoe_target_wildcard_writes_refused",
        "WRITEs addressed to shelf 0xffff or slot 0xff, aborted without writing",
        snap.exports
            .iter()
            .map(|e| (ex(e), e.counters.wildcard_writes_refused))
            .collect(),
    );
    let mut errors = Vec::new();
    let mut drops = Vec::new();
    for e in &snap.exports {
        let l = ex(e);
        let with = |k: &str, v: &str| {
            let mut l = l.clone();
            l.push((k.to_string(), v.to_string()));
            l
        };
        errors.push((with("kind", "aoe"), e.counters.aoe_errors));
        errors.push((with("kind", "ata"), e.counters.ata_errors));
        let c = &e.counters;
        drops.push((with("reason", "buffer_count"), c.dropped_over_buffer_count));
        drops.push((with("reason", "queue_full"), c.dropped_queue_full));
        drops.push((with("reason", "fair_share"), c.dropped_over_fair_share));
        drops.push((with("reason", "reply_too_long"), c.dropped_reply_too_long));
        let other = c.dropped.saturating_sub(
            c.dropped_over_buffer_count
                + c.dropped_queue_full
                + c.dropped_over_fair_share
                + c.dropped_reply_too_long,
        );
        drops.push((with("reason", "other"), other));
    }
    s.counter(
        "aoe_target_errors",
        "Replies with the AoE error flag (kind=aoe) or ATA ERR status (kind=ata)",
        errors,
    );
    s.counter(
        "aoe_target_dropped_requests",
        "Requests dropped: buffer count reached, worker queue full, source over its fair share of the buffer count, reply too long for the interface's frame, other (bad or not for us)",
        drops,
    );
    s.gauge(
        "aoe_target_in_flight",
        "Requests in flight",
        snap.exports
            .iter()
            .map(|e| (ex(e), i64::from(e.in_flight)))
            .collect(),
    );
    s.gauge(
        "aoe_target_oldest_request_seconds",
        "How long the oldest request in flight has waited on the store, whole seconds; 5 or \
         more is logged as requests waiting on the backend (a hung disk, an RBD cluster whose \
         OSDs stopped answering)",
        snap.exports
            .iter()
            .map(|e| (ex(e), i64::from(e.oldest_request_secs)))
            .collect(),
    );
    s.gauge(
        "aoe_target_store_failed",
        "1 while the store refuses writes: a latched write-back failure, or an rbd: export \
         whose exclusive lock another gateway took over",
        snap.exports
            .iter()
            .map(|e| (ex(e), i64::from(e.failed)))
            .collect(),
    );
    s.gauge(
        "aoe_target_path_replaced",
        "1 while the export's path no longer names the file it serves (renamed over or \
         removed, looked at every 5 s): reads and writes go to the file opened until a reload \
         (SIGHUP) reopens the path",
        snap.exports
            .iter()
            .map(|e| (ex(e), i64::from(e.path_replaced)))
            .collect(),
    );
    s.gauge(
        "aoe_target_address_conflict",
        "Other targets (MACs) seen answering for the export's shelf.slot within the last \
         few conflict probes (conflict_check_s, a minute by default): nonzero means an \
         initiator takes them and us as paths of one disk and mixes their data",
        snap.exports
            .iter()
            .map(|e| (ex(e), e.conflicts.len() as i64))
            .collect(),
    );
    s.gauge(
        "aoe_target_pending_export_seconds",
        "Seconds an export the start or a reload opened has waited, not served yet, for the \
         gateway whose rbd: image lock it broke to stop answering at its shelf.slot (given up, \
         refused, after 30 s); no series while none waits",
        snap.pending
            .iter()
            .map(|p| {
                (
                    labels(&[
                        ("export", &p.target),
                        ("interfaces", &p.interfaces.join(",")),
                    ]),
                    i64::try_from(p.waiting_secs).unwrap_or(i64::MAX),
                )
            })
            .collect(),
    );
    s.gauge(
        "aoe_target_state_files_failing",
        "State files (--state-dir) whose last save failed: the newest config string, mask or \
         reserve list of that many exports is only in memory, the save tried again every 10 s \
         at most",
        vec![(labels(&[]), snap.state_files_failing as i64)],
    );
    s.counter(
        "aoe_target_state_save_failures",
        "State file saves that failed since the start, each try counted",
        vec![(labels(&[]), snap.state_save_failures)],
    );
    s.counter(
        "aoe_target_rx_dropped_frames",
        "Frames the kernel dropped before the target read them, by interface: the socket's \
         receive ring or queue was full (PACKET_STATISTICS tp_drops)",
        snap.interfaces
            .iter()
            .map(|i| (labels(&[("interface", &i.name)]), i.rx_dropped))
            .collect(),
    );
    let mut rdrops = Vec::new();
    for i in &snap.interfaces {
        let l = |r: &str| labels(&[("interface", &i.name), ("reason", r)]);
        rdrops.push((l("send_failed"), i.send_failed));
        rdrops.push((l("backlog_full"), i.backlog_full));
        rdrops.push((l("tx_rejected"), i.tx_rejected));
    }
    s.counter(
        "aoe_target_dropped_replies",
        "Replies dropped by interface: the socket refused them, the send backlog was full, \
         or the kernel refused them from the transmit ring (tx_rejected)",
        rdrops,
    );
    s.text()
}

/// The initiator's metrics, per device (`device="eX.Y"`) and per target MAC.
pub fn initiator_text(shared: &Mutex<aoe_initiator::net::Shared>) -> String {
    let (devs, io_bytes, drops) = {
        let s = aoe_initiator::net::lock(shared);
        let devs: Vec<_> = s.devices.values().map(|d| d.info.clone()).collect();
        (devs, s.io_bytes.clone(), s.drops)
    };
    let mut s = Scrape::new();
    let dl = |d: &aoe_proto::initiator::DeviceInfo| labels(&[("device", &d.addr.to_string())]);
    let per = |f: &dyn Fn(&aoe_proto::initiator::DeviceInfo) -> u64| {
        devs.iter().map(|d| (dl(d), f(d))).collect::<Vec<_>>()
    };
    let mut ops = Vec::new();
    let mut errors = Vec::new();
    let mut states = Vec::new();
    for d in &devs {
        let with = |k: &str, v: &str| {
            let mut l = dl(d);
            l.push((k.to_string(), v.to_string()));
            l
        };
        ops.push((with("result", "ok"), d.stats.ops_ok));
        ops.push((with("result", "failed"), d.stats.ops_failed));
        errors.push((with("kind", "aoe"), d.stats.aoe_errors));
        errors.push((with("kind", "ata"), d.stats.ata_errors));
        errors.push((with("kind", "bad_response"), d.stats.bad_responses));
        errors.push((
            with("kind", "unexpected_response"),
            d.stats.unexpected_responses,
        ));
        for st in [
            DeviceState::Up,
            DeviceState::Down,
            DeviceState::DownCloseWait,
        ] {
            states.push((with("state", &st.to_string()), i64::from(d.state == st)));
        }
    }
    s.counter(
        "aoe_initiator_requests",
        "Block requests completed, by result",
        ops,
    );
    s.counter(
        "aoe_initiator_read_bytes",
        "Bytes read from the device (completed reads of the files, NBD and partition scans)",
        per(&|d| io_bytes.of(d.addr).0),
    );
    s.counter(
        "aoe_initiator_written_bytes",
        "Bytes written to the device (completed writes)",
        per(&|d| io_bytes.of(d.addr).1),
    );
    s.counter(
        "aoe_initiator_frames_sent",
        "ATA frames sent, retransmissions included",
        per(&|d| d.stats.frames_sent),
    );
    s.counter(
        "aoe_initiator_retransmits",
        "ATA frames retransmitted",
        per(&|d| d.stats.retransmits),
    );
    s.counter(
        "aoe_initiator_errors",
        "Responses with the AoE error flag, ATA errors, and responses ignored as bad or unexpected",
        errors,
    );
    let e = drops.engine;
    s.counter(
        "aoe_initiator_dropped",
        "Frames the initiator dropped, by reason (engine-wide: frames that belong to no \
         device, caps reached, send buffers full, refused by the kernel from a transmit \
         ring), and err lines lost to a full ring",
        [
            ("malformed", e.malformed),
            ("user_tag", e.user_tags),
            ("wildcard_config", e.wildcard_rejected),
            ("group_source", e.group_source),
            ("unknown_device", e.unknown_device),
            ("tx_buffer_too_small", e.tx_buffer_too_small),
            ("device_cap", e.devices_refused),
            ("target_cap", e.targets_refused),
            ("send_buffer_full", drops.send_buffer_full),
            ("tx_rejected", drops.tx_rejected),
            ("err_ring_full", drops.err_ring_full),
        ]
        .into_iter()
        .map(|(r, n)| (labels(&[("reason", r)]), n))
        .collect(),
    );
    s.counter(
        "aoe_initiator_targets_other_disk",
        "New target MACs of a device up not taken as paths: their IDENTIFY reported another \
         capacity than the device's (another disk answering for the same shelf.slot), or \
         failed; each refusal counted (a MAC is asked again at its next Query Config response)",
        vec![(Labels::new(), e.targets_other_disk)],
    );
    s.counter(
        "aoe_initiator_targets_forgotten",
        "Target MACs that were not paths (refused as another disk, or silent to every \
         IDENTIFY) forgotten at --max-targets to admit a new MAC of their device",
        vec![(Labels::new(), e.targets_forgotten)],
    );
    s.counter(
        "aoe_initiator_writes_fenced",
        "Writes held back because a copy of an earlier write to some of their sectors could \
         still reach the target (the write fence; each write counted once)",
        vec![(Labels::new(), e.writes_fenced)],
    );
    s.gauge(
        "aoe_initiator_state",
        "Device state (the driver's up, down, down,closewait): 1 for the current one",
        states,
    );
    s.gauge(
        "aoe_initiator_in_flight",
        "Block requests submitted and not yet completed",
        devs.iter()
            .map(|d| (dl(d), d.ops_outstanding as i64))
            .collect(),
    );
    s.gauge(
        "aoe_initiator_size_bytes",
        "Device capacity",
        devs.iter()
            .map(|d| (dl(d), (d.sectors * 512) as i64))
            .collect(),
    );
    let mut rtt = Vec::new();
    let mut dev = Vec::new();
    let mut win = Vec::new();
    let mut nout = Vec::new();
    let mut losses = Vec::new();
    let mut cuts = Vec::new();
    let mut spurious = Vec::new();
    let mut overtaking = Vec::new();
    let mut other_disk = Vec::new();
    for d in &devs {
        for t in &d.targets {
            let l = labels(&[("device", &d.addr.to_string()), ("mac", &t.mac.to_string())]);
            let found = |how: &str| {
                let mut l = l.clone();
                l.push(("found_by".into(), how.into()));
                l
            };
            let timer = t
                .retransmits
                .saturating_sub(t.fast_retransmits + t.tail_probes);
            losses.push((found("timeout"), timer));
            losses.push((found("later_answers"), t.fast_retransmits));
            losses.push((found("tail_probe"), t.tail_probes));
            cuts.push((l.clone(), t.window_cuts));
            spurious.push((l.clone(), t.spurious));
            overtaking.push((l.clone(), t.overtaking_answers));
            let other = matches!(t.vetting, aoe_proto::initiator::Vetting::OtherDisk(_));
            other_disk.push((l.clone(), i64::from(other)));
            rtt.push((l.clone(), t.rtt_avg.as_secs_f64()));
            dev.push((l.clone(), t.rtt_dev.as_secs_f64()));
            win.push((l.clone(), i64::from(t.maxout)));
            nout.push((l, i64::from(t.nout)));
        }
    }
    s.gauge_f(
        "aoe_initiator_rtt_average_seconds",
        "Smoothed round-trip time per target MAC",
        rtt,
    );
    s.gauge_f(
        "aoe_initiator_rtt_deviation_seconds",
        "Round-trip time mean deviation per target MAC",
        dev,
    );
    s.gauge(
        "aoe_initiator_target_other_disk",
        "1 for a target MAC not used as a path of the device: its IDENTIFY reported another \
         capacity (another disk at the same shelf.slot) or failed",
        other_disk,
    );
    s.gauge(
        "aoe_initiator_window",
        "Congestion window (frames allowed outstanding) per target MAC",
        win,
    );
    s.counter(
        "aoe_initiator_losses",
        "Frames presumed lost per target MAC, by how: their timer ran out (timeout), frames \
         sent after them were answered first (later_answers), or a tail loss probe went out \
         for them (tail_probe); each is copied unless its answer comes first",
        losses,
    );
    s.counter(
        "aoe_initiator_window_cuts",
        "Times the congestion window of a target MAC was cut for a loss (once per loss episode)",
        cuts,
    );
    s.counter(
        "aoe_initiator_spurious_losses",
        "Frames presumed lost that the target MAC answered after all (late, not lost); each \
         undoes its episode's window cut",
        spurious,
    );
    s.counter(
        "aoe_initiator_overtaking_answers",
        "Answers per target MAC that came while a frame sent to it before them was still \
         unanswered: frames sent, delivered or answered out of order, or lost",
        overtaking,
    );
    s.gauge(
        "aoe_initiator_frames_outstanding",
        "ATA frames outstanding per target MAC",
        nout,
    );
    s.text()
}

/// Scrapes answered at once; a connection beyond them is closed unanswered. Prometheus
/// scrapes one target every few seconds, so a few are plenty; the bound keeps clients that
/// connect and send nothing from holding a thread each.
const MAX_CONNECTIONS: usize = 8;
/// The most a connection may take, from its accept to the last byte of the answer: a
/// client that sends its request a byte at a time, or reads the answer so, is cut off
/// then (a timeout per read or write alone let one such client hold the responder for
/// ever: docs/TEST-AUDIT.md, sixth audit, row 2).
const CONNECTION_LIMIT: Duration = Duration::from_secs(5);
/// The most request bytes read (request line and headers); a longer request is answered
/// 431. Before the bound a request line without an end grew the daemon's memory for as
/// long as the client sent.
const MAX_REQUEST_BYTES: u64 = 16 * 1024;

/// Starts the HTTP responder on `addr`, answering `GET /metrics` with `render()`. The
/// accepting thread lives as long as the process; each connection is answered on a thread
/// of its own, at most [`MAX_CONNECTIONS`] at once, each within [`CONNECTION_LIMIT`].
pub fn serve(addr: SocketAddr, render: impl Fn() -> String + Send + Sync + 'static) -> Result<()> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("--metrics {addr}: cannot listen"))?;
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    let render = std::sync::Arc::new(render);
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("aoe-metrics".into())
        .spawn(move || {
            use std::sync::atomic::Ordering::SeqCst;
            for conn in listener.incoming().flatten() {
                if busy.fetch_add(1, SeqCst) >= MAX_CONNECTIONS {
                    busy.fetch_sub(1, SeqCst);
                    tracing::debug!("metrics connection closed: {MAX_CONNECTIONS} being answered");
                    continue;
                }
                let (render, done) = (render.clone(), busy.clone());
                let spawned = std::thread::Builder::new()
                    .name("aoe-metrics-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(conn, &*render) {
                            tracing::debug!(error = %e, "metrics request failed");
                        }
                        done.fetch_sub(1, SeqCst);
                    });
                if spawned.is_err() {
                    busy.fetch_sub(1, SeqCst);
                }
            }
        })
        .context("cannot start the metrics thread")?;
    Ok(())
}

/// A connection whose reads and writes share one deadline.
struct Deadlined {
    conn: TcpStream,
    deadline: std::time::Instant,
}

impl Deadlined {
    /// Sets the socket's timeout to what is left, or fails if nothing is.
    fn arm(&self, read: bool) -> std::io::Result<()> {
        let left = self
            .deadline
            .checked_duration_since(std::time::Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::TimedOut))?;
        if read {
            self.conn.set_read_timeout(Some(left))
        } else {
            self.conn.set_write_timeout(Some(left))
        }
    }
}

impl std::io::Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm(true)?;
        self.conn.read(buf)
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm(false)?;
        self.conn.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.conn.flush()
    }
}

/// Whether a scrape with this `Accept` header gets OpenMetrics text (what Prometheus asks
/// for first, and what a request without the header gets, as before session 28) rather
/// than the Prometheus text format 0.0.4 (`curl`'s `*/*`, `text/plain`, tools that read
/// only the older format, `promtool check metrics`).
fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_none_or(|a| a.contains("application/openmetrics-text"))
}

/// OpenMetrics text as prometheus-client encodes it, in the Prometheus text format 0.0.4
/// (the "text-based exposition format" of the Prometheus documentation, which
/// `promtool check metrics` lints): there a family's HELP and TYPE name its samples, so a
/// counter's are `NAME_total` (OpenMetrics names the family `NAME` and its samples
/// `NAME_total`: read as 0.0.4 every counter's samples had no HELP or TYPE, untyped, and
/// promtool said `no help text` for each, session 28); it has no `# UNIT` and no `# EOF`.
/// Gauges and sample lines are the same in both.
pub(crate) fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let named = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| Some((*p, line.strip_prefix(p)?)));
        match named {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) && !name.ends_with("_total") {
                    out.push_str(&format!("{p}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Reads one HTTP/1.x request and answers it, closing the connection.
fn answer(conn: TcpStream, render: &dyn Fn() -> String) -> std::io::Result<()> {
    use std::io::Read as _;
    let deadline = std::time::Instant::now() + CONNECTION_LIMIT;
    let mut w = Deadlined {
        conn: conn.try_clone()?,
        deadline,
    };
    let mut r = BufReader::new(Deadlined { conn, deadline }.take(MAX_REQUEST_BYTES));
    let mut first = String::new();
    r.read_line(&mut first)?;
    // Headers end at the first empty line; a client that sends more than 100 is cut off.
    let mut ended = first.ends_with('\n');
    let mut accept: Option<String> = None;
    for _ in 0..100 {
        if !ended {
            break;
        }
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        ended = h.ends_with('\n');
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("accept") {
                accept = Some(v.trim().to_owned());
            }
        }
    }
    let mut parts = first.split_whitespace();
    let openmetrics = wants_openmetrics(accept.as_deref());
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = if !ended && r.get_ref().limit() == 0 {
        (
            "431 Request Header Fields Too Large",
            "text/plain; charset=utf-8",
            format!("the request is longer than {MAX_REQUEST_BYTES} bytes\n"),
        )
    } else if method == "GET" && (path == "/metrics" || path == "/") && openmetrics {
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(),
        )
    } else if method == "GET" && (path == "/metrics" || path == "/") {
        (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            prometheus_text(&render()),
        )
    } else {
        (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".to_string(),
        )
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    w.write_all(head.as_bytes())?;
    w.write_all(body.as_bytes())?;
    w.flush()
}

#[cfg(test)]
mod text_tests {
    use super::*;

    /// Session 28: the 0.0.4 text of a counter names its samples in HELP and TYPE; gauges
    /// and samples pass unchanged; no `# EOF`. Negotiated by `Accept`.
    #[test]
    fn openmetrics_counters_become_total_families_in_the_text_format() {
        let om = "# HELP aoe_x_bytes Bytes.\n# TYPE aoe_x_bytes counter\n\
                  aoe_x_bytes_total{export=\"1.1\"} 3\n\
                  # HELP aoe_y Now.\n# TYPE aoe_y gauge\naoe_y 2\n# EOF\n";
        assert_eq!(
            prometheus_text(om),
            "# HELP aoe_x_bytes_total Bytes.\n# TYPE aoe_x_bytes_total counter\n\
             aoe_x_bytes_total{export=\"1.1\"} 3\n\
             # HELP aoe_y Now.\n# TYPE aoe_y gauge\naoe_y 2\n"
        );
        assert!(wants_openmetrics(None));
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain")));
    }
}
