//! `aoe bench`: a load generator for any AoE target reachable through an interface.
//!
//! It finds the target with Query Config (AoEr11 §3.2; its buffer count, firmware version and
//! sectors per request are the target's advertised limits) and its size with ATA IDENTIFY
//! DEVICE, then keeps `--window` requests in flight for `--time` seconds or `--size` bytes and
//! reports MB/s (10^6 bytes), IOPS, latency percentiles, retransmissions and its own CPU time.
//!
//! Modes: `read`, `randread`, `write`, `randwrite`, and `verify` (write an LBA-stamped pattern
//! over the span, read it back, check every byte). Writing modes need `--write` and a single
//! target: a load generator must never write to a disk by accident.
//!
//! The comparison of several targets on a private topology lives outside the shipped binary,
//! in `scripts/bench-compare.sh`.

mod gen;
mod hist;
mod pace;
mod pattern;

use std::io::{IsTerminal, Write as _};
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aoe_sys::{PacketSocket, PollFd};
use aoe_wire::{
    max_sectors_for_mtu, AtaFlags, AtaRepr, Body, Command as AoeCommand, ConfigCommand, ConfigRepr,
    HeaderRepr, Identify, IdentifyInfo, MacAddr, Message, Tag, TargetAddr,
};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::serve::UsageError;
use gen::{Op, PhaseStats};
use pattern::SECTOR;

/// Drive an AoE target with reads or writes and report throughput and latency.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Network interface the target is reachable on.
    iface: String,
    /// Target as shelf.slot (`1.1` or `e1.1`), or `broadcast` for the first target to answer
    /// (reads only).
    #[arg(long, default_value = "broadcast")]
    target: String,
    /// What to do. `write`, `randwrite` and `verify` overwrite the target and need `--write`.
    #[arg(long, value_enum, default_value_t = Mode::Read)]
    mode: Mode,
    /// Confirm that a writing mode may destroy the data on the target.
    #[arg(long)]
    write: bool,
    /// Request size in bytes, a multiple of 512 (suffix k = KiB); default: the most the MTU
    /// and the target allow.
    #[arg(long, value_parser = parse_size, conflicts_with = "sectors")]
    bs: Option<u64>,
    /// Request size in 512-byte sectors (alternative to --bs).
    #[arg(long)]
    sectors: Option<u8>,
    /// Requests in flight (1-4096).
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Seconds to run (default 10 when --size is not given); not for verify.
    #[arg(long)]
    time: Option<f64>,
    /// Bytes to move (suffix k, M, G = KiB, MiB, GiB); with --time, whichever comes first. In
    /// verify mode: the span written and read back from LBA 0 (default: the whole target).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
    /// Microseconds to busy-poll for replies before sleeping in poll(2), 0 to 1000000.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    spin_us: u64,
    /// Lower bound of the RTT-adaptive retransmit timeout, in microseconds. The default is
    /// the C cross-check's fixed timeout: on a busy machine scheduling delays reach several
    /// milliseconds, and a lower floor resends requests that were never lost (work the
    /// target then does twice). 0 to 2000000: every timeout is at most 2 s, so a higher
    /// floor could not be kept.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(0..=gen::MAX_RTO_US))]
    min_rto_us: u64,
    /// How replies come in: `mmsg`, `recvmmsg` into header-sized buffers, or `ring`, a
    /// PACKET_MMAP RX ring (TPACKET_V2) that keeps only their headers: fewer system calls
    /// here, but the kernel fills the ring in the target's transmit path, which costs a
    /// target that is the bottleneck more than the `recvmmsg` path does (with `--tx ring`:
    /// the generator's CPU per GB 0.97-1.01x, the target's 0.99-1.06x, so `mmsg` stays the
    /// default). Verify's read-back checks data, so it always receives whole frames with
    /// `recvmmsg`.
    #[arg(long, value_enum, default_value_t = Io::Mmsg)]
    rx: Io,
    /// Receive read answers whole, their data copied into this program's buffers (or ring
    /// slots with `--rx ring`), as a reader of the data must, instead of their headers
    /// only: the reference for a path that delivers the data, such as `aoe initiator`'s
    /// (at MTU 9000 it cost generator and target 6-47% more CPU per GB on a loaded two-CPU rig,
    /// docs/PERFORMANCE.md "Session 32: the initiator's reads against raw").
    #[arg(long)]
    rx_whole: bool,
    /// How requests go out: `ring` (the default), a PACKET_TX_RING (TPACKET_V2) on a
    /// send-only socket, each batch copied into its slots (write data built there) and sent
    /// with one `send()` kick, or `mmsg`, `sendmmsg` batches of 64, which pay per frame for
    /// the message's set-up: measured against it, the ring costs the generator 0.73-0.99x
    /// the CPU per GB moved (docs/PERFORMANCE.md). If the ring cannot be made, `ring` says so
    /// on stderr and sends with `sendmmsg`; the JSON output counts the frames each way sent
    /// (`tx_frames_ring`, `tx_frames_mmsg`).
    #[arg(long, value_enum, default_value_t = Io::Ring)]
    tx: Io,
    /// Ask at most this many bytes per second (suffix k, M, G = KiB, MiB, GiB per second, as
    /// fio's `rate=`): requests are paced by a token bucket (`--rate-burst-ms` deep) so that the target is
    /// offered this load, not as much as it can take. The report gives the asked and the
    /// achieved rate and says when the target did not keep up (below 95%), and latency from
    /// each request's place in the schedule as well as from its send.
    #[arg(long, allow_hyphen_values = true)]
    rate: Option<String>,
    /// Ask at most this many requests per second (fio's `rate_iops`); with --rate, a request
    /// waits for both.
    #[arg(long, allow_hyphen_values = true)]
    rate_iops: Option<String>,
    /// The depth of --rate's token bucket, in milliseconds (0 to 10000): how far behind its
    /// schedule the generator may fall (a stalled target, a full window) and still catch up
    /// by sending at once what is due; beyond it the load is lost and the achieved rate shows
    /// it. 0 sends no burst at all [default: 50]. Only with --rate or --rate-iops (without
    /// them nothing is paced, and the depth is refused rather than taken and ignored).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    rate_burst_ms: Option<u64>,
    /// Seed of the random offsets (randread, randwrite) [default: 1]. The other modes go
    /// in order and refuse it rather than take it and ignore it.
    #[arg(long)]
    seed: Option<u64>,
}

/// How replies reach the generator, or requests leave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Io {
    /// A PACKET_MMAP ring (TPACKET_V2) shared with the kernel.
    Ring,
    /// `recvmmsg` / `sendmmsg` batches.
    Mmsg,
}

/// The access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// Sequential reads.
    Read,
    /// Sequential writes. Their data is the LBA-stamped pattern laid into each transmit
    /// slot once and not checked (that is `verify`).
    Write,
    /// Reads at random request-aligned offsets.
    Randread,
    /// Writes at random request-aligned offsets.
    Randwrite,
    /// Write the pattern over the span, read it back, check every byte.
    Verify,
}

impl Mode {
    fn writes(self) -> bool {
        matches!(self, Mode::Write | Mode::Randwrite | Mode::Verify)
    }
}

/// `4096`, `4k`, `4K`, `4KiB`, `8M`, `1G` (binary multiples).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("'{s}' is not a size (e.g. 8704, 4k, 64M, 1G)"))
}

/// `--rate-burst-ms`'s default.
const DEFAULT_BURST_MS: u64 = pace::DEFAULT_DEPTH_MS;

/// A positive rate: digits with an optional k, M or G (binary multiples, as fio).
fn parse_rate(flag: &str, s: &str) -> Result<u64> {
    let bad = || {
        usage(format!(
            "{flag} '{s}' is not a rate: a positive whole number with an optional k, M or G (e.g. 300M)"
        ))
    };
    if !s.trim().starts_with(|c: char| c.is_ascii_digit()) {
        return Err(bad());
    }
    match parse_size(s) {
        Ok(0) => Err(usage(format!("{flag} 0: a rate must be positive"))),
        Ok(n) => Ok(n),
        Err(_) => Err(bad()),
    }
}

/// `--rate` and `--rate-iops`, checked.
fn rate_of(a: &BenchArgs) -> Result<pace::Rate> {
    Ok(pace::Rate {
        bytes_per_s: a
            .rate
            .as_deref()
            .map(|s| parse_rate("--rate", s))
            .transpose()?,
        iops: a
            .rate_iops
            .as_deref()
            .map(|s| parse_rate("--rate-iops", s))
            .transpose()?,
    })
}

fn usage(msg: String) -> anyhow::Error {
    UsageError(format!("bench: {msg}")).into()
}

/// Which target, decided before any I/O.
enum Want {
    Broadcast,
    One(TargetAddr),
}

/// Checks the flags that need no network, so a refused run sends nothing.
fn check_args(a: &BenchArgs) -> Result<Want> {
    let want = if a.target == "broadcast" {
        Want::Broadcast
    } else {
        Want::One(
            a.target
                .parse()
                .map_err(|e: aoe_wire::header::ParseTargetError| usage(e.to_string()))?,
        )
    };
    if a.mode.writes() {
        if matches!(want, Want::Broadcast) {
            bail!(usage(format!(
                "--mode {} writes: name one target with --target SHELF.SLOT, not broadcast",
                mode_name(a.mode)
            )));
        }
        if !a.write {
            bail!(usage(format!(
                "--mode {} overwrites {} on {}: add --write to confirm",
                mode_name(a.mode),
                a.target,
                a.iface
            )));
        }
    } else if a.write {
        bail!(usage(format!(
            "--write is only for the modes that write (write, randwrite, verify), not {}",
            mode_name(a.mode)
        )));
    }
    if !(1..=4096).contains(&a.window) {
        bail!(usage(format!("--window {} is not in 1-4096", a.window)));
    }
    if let Some(t) = a.time {
        if a.mode == Mode::Verify {
            bail!(usage(
                "verify covers --size bytes (default: the whole target); --time does not apply"
                    .into()
            ));
        }
        if !(t > 0.0 && t < 1e7) {
            bail!(usage(format!(
                "--time {t} must be a positive number of seconds"
            )));
        }
    }
    if let Some(s) = a.size {
        if s == 0 || s % SECTOR as u64 != 0 {
            bail!(usage(format!(
                "--size {s} must be a positive multiple of 512"
            )));
        }
    }
    if let Some(b) = a.bs {
        if b == 0 || b % SECTOR as u64 != 0 || b > 255 * SECTOR as u64 {
            bail!(usage(format!(
                "--bs {b} must be a multiple of 512 between 512 and {}",
                255 * SECTOR
            )));
        }
    }
    if a.sectors == Some(0) {
        bail!(usage("--sectors must be at least 1".into()));
    }
    // Session 29 audit: both were taken and did nothing without a word; a run meant to be
    // paced or to follow a seed would have been measured as something else.
    if a.seed.is_some() && !matches!(a.mode, Mode::Randread | Mode::Randwrite) {
        bail!(usage(format!(
            "--seed sets the random offsets of randread and randwrite; --mode {} goes in order",
            mode_name(a.mode)
        )));
    }
    if a.rate_burst_ms.is_some() && a.rate.is_none() && a.rate_iops.is_none() {
        bail!(usage(
            "--rate-burst-ms is the depth of --rate's (or --rate-iops') pacing; without \
             either nothing is paced"
                .into()
        ));
    }
    rate_of(a)?;
    Ok(want)
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Read => "read",
        Mode::Write => "write",
        Mode::Randread => "randread",
        Mode::Randwrite => "randwrite",
        Mode::Verify => "verify",
    }
}

/// What the target told us about itself.
#[derive(Debug, Serialize)]
struct TargetInfo {
    shelf: u16,
    slot: u8,
    mac: String,
    /// Query Config: requests the target can hold (AoEr11 §3.2 Buffer Count).
    buffer_count: u16,
    firmware_version: u16,
    /// Query Config: most sectors per ATA request.
    max_sectors: u8,
    aoe_version: u8,
    /// IDENTIFY DEVICE capacity, in sectors.
    sectors: u64,
    model: String,
}

#[derive(Debug, Serialize)]
struct Latency {
    avg: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// What a phase, or the whole run, moved and how fast.
#[derive(Debug, Serialize)]
struct Figures {
    requests: u64,
    bytes: u64,
    seconds: f64,
    mb_per_s: f64,
    iops: f64,
    /// From each request's first send to its reply.
    latency_us: Latency,
    retransmits: u64,
    /// Requests completed by the answer to a send they had been sent again after: the
    /// retransmit was spurious, the answer late rather than lost.
    late_replies: u64,
    /// Answers the kernel dropped at the generator's own socket (`PACKET_STATISTICS`).
    rx_drops: u64,
    /// With `--rate` / `--rate-iops`: what was asked and what came of it; null without.
    rate: Option<Pacing>,
}

/// A paced run's asked and achieved rate.
#[derive(Debug, Serialize)]
struct Pacing {
    /// `--rate` in bytes per second (null: no byte limit).
    asked_bytes_per_s: Option<u64>,
    /// `--rate-iops` (null: no request limit).
    asked_iops: Option<u64>,
    achieved_bytes_per_s: f64,
    achieved_iops: f64,
    /// Achieved over asked (the lower of the two when both are limited).
    achieved_fraction: f64,
    /// Achieved at least 95% of what was asked: else the target (or the window) could not
    /// keep up, and the figures are a saturated run's, not an equal-load one's.
    kept_up: bool,
    /// From the time the rate's schedule meant each request to go (not its send) to its
    /// reply: includes the wait for a free window slot or for a target that fell behind.
    latency_from_schedule_us: Latency,
}

/// A phase's retransmits and what tells their cause: [`gen::PhaseStats`]'s fields of the
/// same names.
#[derive(Clone, Copy)]
struct Resent {
    retransmits: u64,
    late_replies: u64,
    rx_drops: u64,
}

/// Below this fraction of the asked rate a paced run says the target did not keep up.
const KEPT_UP: f64 = 0.95;

impl Figures {
    fn new(
        requests: u64,
        bytes: u64,
        seconds: f64,
        h: &hist::Histogram,
        resent: Resent,
        paced: Option<(pace::Rate, &hist::Histogram)>,
    ) -> Self {
        let achieved_bytes_per_s = rate(bytes as f64, seconds);
        let achieved_iops = rate(requests as f64, seconds);
        Figures {
            requests,
            bytes,
            seconds,
            mb_per_s: achieved_bytes_per_s / 1e6,
            iops: achieved_iops,
            latency_us: latency(h),
            retransmits: resent.retransmits,
            late_replies: resent.late_replies,
            rx_drops: resent.rx_drops,
            rate: paced.map(|(r, sched)| {
                let fraction = [
                    r.bytes_per_s.map(|b| achieved_bytes_per_s / b as f64),
                    r.iops.map(|i| achieved_iops / i as f64),
                ]
                .into_iter()
                .flatten()
                .fold(f64::INFINITY, f64::min);
                Pacing {
                    asked_bytes_per_s: r.bytes_per_s,
                    asked_iops: r.iops,
                    achieved_bytes_per_s,
                    achieved_iops,
                    achieved_fraction: fraction,
                    kept_up: fraction >= KEPT_UP,
                    latency_from_schedule_us: latency(sched),
                }
            }),
        }
    }
}

#[derive(Debug, Serialize)]
struct PhaseReport {
    op: &'static str,
    #[serde(flatten)]
    figures: Figures,
    /// How this phase's requests went out (`mmsg` if the ring could not take its frames).
    tx: Io,
    /// How this phase's replies came in (verify's read-back: always `mmsg`).
    rx: Io,
    /// Bytes of read data that arrived in the generator's memory (all of them with
    /// `--rx-whole` or in verify's read-back).
    rx_data_bytes: u64,
    tx_frames_ring: u64,
    tx_frames_mmsg: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    interface: String,
    mtu: u32,
    target: TargetInfo,
    mode: Mode,
    bs: u64,
    window: usize,
    /// Totals over all phases (verify has a write and a read phase).
    #[serde(flatten)]
    total: Figures,
    phases: Vec<PhaseReport>,
    verified_sectors: u64,
    mismatched_sectors: u64,
    /// The generator's own user + system CPU seconds, to show it is not the limit.
    generator_cpu_s: f64,
    /// How requests went out (`--tx`, `mmsg` if the ring could not be made); each phase
    /// says what it used.
    tx: Io,
    /// How replies came in (`--rx`); each phase says what it used (verify's read-back always
    /// `recvmmsg`).
    rx: Io,
    /// Read answers were received whole (`--rx-whole`).
    rx_whole: bool,
    /// Bytes of read data that arrived in the generator's memory, over all phases.
    rx_data_bytes: u64,
    /// Frames sent through the transmit ring, requests and retransmits.
    tx_frames_ring: u64,
    /// Frames sent with `sendmmsg`.
    tx_frames_mmsg: u64,
    interrupted: bool,
}

fn latency(h: &hist::Histogram) -> Latency {
    let us = |ns: u64| ns as f64 / 1e3;
    Latency {
        avg: h.mean() / 1e3,
        p50: us(h.quantile(0.50)),
        p99: us(h.quantile(0.99)),
        p999: us(h.quantile(0.999)),
        max: us(h.quantile(1.0)),
    }
}

fn rate(x: f64, secs: f64) -> f64 {
    if secs > 0.0 {
        x / secs
    } else {
        0.0
    }
}

/// user + system CPU seconds of this process, from /proc/self/stat (fields 14 and 15, in
/// USER_HZ = 100 ticks per second on Linux).
fn own_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let rest = stat.rsplit_once(')').map_or("", |x| x.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

/// Sends `frame` every 250 ms until `accept` takes a reply or `within` passes.
fn ask<T>(
    sock: &PacketSocket,
    frame: &[u8],
    within: Duration,
    mut accept: impl FnMut(&Message<'_>) -> Option<T>,
) -> Result<Option<T>> {
    let end = Instant::now() + within;
    let mut buf = vec![0u8; aoe_sys::frame_capacity(sock.info().mtu)];
    let mut resend = Instant::now();
    while Instant::now() < end {
        if Instant::now() >= resend {
            sock.send(frame)?;
            resend = Instant::now() + Duration::from_millis(250);
        }
        let mut fds = [PollFd::new(sock.as_raw_fd())];
        aoe_sys::poll(&mut fds, Some(Duration::from_millis(10)))?;
        while let Some(meta) = sock.recv(&mut buf)? {
            if let Ok(m) = Message::parse(&buf[..meta.len]) {
                if m.header.response {
                    if let Some(x) = accept(&m) {
                        return Ok(Some(x));
                    }
                }
            }
        }
    }
    Ok(None)
}

/// Query Config to the broadcast MAC (AoEr11 §3.2), as `aoe-discover` does; the first
/// answer from the wanted address (any, for broadcast) wins.
fn discover(sock: &PacketSocket, me: MacAddr, want: &Want) -> Result<TargetInfo> {
    let addr = match want {
        Want::Broadcast => TargetAddr::BROADCAST,
        Want::One(a) => *a,
    };
    // Slot index 0xffff: above any window, so a late copy never completes a load request.
    let tag = Tag(Tag::USER_BIT | 0x7fff_ffff);
    let q = Message {
        header: HeaderRepr::request(MacAddr::BROADCAST, me, addr, AoeCommand::QueryConfig, tag),
        body: Body::Config(ConfigRepr::request(ConfigCommand::Read, b"")),
    }
    .to_vec()?;
    let found = ask(sock, &q, Duration::from_secs(3), |m| match &m.body {
        Body::Config(c) if m.header.tag == tag && !m.header.target.is_wildcard() => {
            addr.reaches(m.header.target).then(|| TargetInfo {
                shelf: m.header.target.shelf,
                slot: m.header.target.slot,
                mac: m.header.src.to_string(),
                buffer_count: c.buffer_count,
                firmware_version: c.firmware_version,
                max_sectors: c.sector_count,
                aoe_version: c.aoe_version,
                sectors: 0,
                model: String::new(),
            })
        }
        _ => None,
    })?;
    found.with_context(|| {
        format!(
            "no AoE target {} answered Query Config on {} within 3 s",
            match want {
                Want::Broadcast => "at all".to_string(),
                Want::One(a) => a.to_string(),
            },
            sock.info().name
        )
    })
}

/// ATA IDENTIFY DEVICE (0xEC) for the capacity, as the driver's `aoecmd_ata_id`.
fn identify(
    sock: &PacketSocket,
    me: MacAddr,
    mac: MacAddr,
    addr: TargetAddr,
) -> Result<IdentifyInfo> {
    let tag = Tag(Tag::USER_BIT | 0x7fff_fffe);
    let q = Message {
        header: HeaderRepr::request(mac, me, addr, AoeCommand::Ata, tag),
        body: Body::Ata(AtaRepr {
            aflags: AtaFlags::empty(),
            err_feature: 0,
            sector_count: 1,
            cmd_status: 0xec,
            lba: 0,
            data: &[],
        }),
    }
    .to_vec()?;
    let got = ask(sock, &q, Duration::from_secs(3), |m| match &m.body {
        Body::Ata(a) if m.header.tag == tag && m.header.target == addr => {
            Some(Identify::parse(a.data).map_err(|e| (e, a.cmd_status)))
        }
        _ => None,
    })?;
    match got {
        None => bail!("{addr} answered Query Config but not IDENTIFY DEVICE within 3 s"),
        Some(Err((e, status))) => {
            bail!("{addr} sent an unusable IDENTIFY DEVICE reply (status {status:#04x}): {e}")
        }
        Some(Ok(id)) => Ok(id),
    }
}

/// Runs `aoe bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    let want = check_args(&a)?;
    let sock = PacketSocket::open(&a.iface)
        .with_context(|| format!("cannot open an AoE socket on {}", a.iface))?;
    // Best effort: larger buffers and no qdisc only make loss less likely.
    let _ = sock.set_recv_buffer(32 << 20);
    let _ = sock.set_send_buffer(32 << 20);
    let _ = sock.set_qdisc_bypass(true);
    // Bound to the AoE ethertype, the socket needs no filter, and on a veth link the filter
    // would run in the target's transmit path for every reply: best effort, as the filter
    // only costs time.
    let _ = sock.detach_filter();
    let me = MacAddr(sock.info().mac);
    let mtu = sock.info().mtu;
    let mut info = discover(&sock, me, &want)?;
    let addr = TargetAddr::new(info.shelf, info.slot);
    let mac: MacAddr = info
        .mac
        .parse()
        .map_err(|_| anyhow::anyhow!("bad MAC {}", info.mac))?;
    let id = identify(&sock, me, mac, addr)?;
    info.sectors = crate::tools::lba48_capacity(addr, id.sectors(), a.json);
    info.model = id.model.clone();

    let mtu_max = max_sectors_for_mtu(mtu);
    let target_max = if info.max_sectors == 0 {
        mtu_max
    } else {
        info.max_sectors
    };
    let per = match (a.bs, a.sectors) {
        (Some(b), _) => (b / SECTOR as u64) as u8,
        (None, Some(s)) => s,
        (None, None) => mtu_max.min(target_max),
    };
    if per > mtu_max {
        bail!(usage(format!(
            "{} bytes per request do not fit MTU {mtu} of {} (at most {} sectors, --bs {})",
            usize::from(per) * SECTOR,
            a.iface,
            mtu_max,
            usize::from(mtu_max) * SECTOR
        )));
    }
    if per > target_max {
        bail!(usage(format!(
            "{addr} takes at most {target_max} sectors per request (Query Config), asked {per}"
        )));
    }
    if info.sectors < u64::from(per) {
        bail!(
            "{addr} has {} sectors, fewer than one request",
            info.sectors
        );
    }
    let limit = a.size.map(|s| s / SECTOR as u64);
    if a.mode == Mode::Verify && limit.is_some_and(|l| l > info.sectors) {
        bail!(usage(format!(
            "--size {} is larger than {addr} ({} bytes)",
            a.size.unwrap_or(0),
            info.sectors * SECTOR as u64
        )));
    }
    if a.window > usize::from(info.buffer_count) && !a.json {
        eprintln!(
            "aoe bench: note: window {} is above the {} buffers {addr} advertises; it may drop requests",
            a.window, info.buffer_count
        );
    }
    let time = match (a.time, a.size) {
        (Some(t), _) => Some(Duration::from_secs_f64(t)),
        (None, None) if a.mode != Mode::Verify => Some(Duration::from_secs(10)),
        _ => None,
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id());
    let base = gen::Plan {
        op: Op::Read,
        random: matches!(a.mode, Mode::Randread | Mode::Randwrite),
        per,
        span: info.sectors,
        limit,
        time,
        check: false,
        stamp_data: false,
        stamp,
        seed: a.seed.unwrap_or(1),
    };
    let plans = match a.mode {
        Mode::Read | Mode::Randread => vec![base],
        Mode::Write | Mode::Randwrite => vec![gen::Plan {
            op: Op::Write,
            ..base
        }],
        Mode::Verify => {
            let span = limit.unwrap_or(info.sectors);
            vec![
                gen::Plan {
                    op: Op::Write,
                    span,
                    limit: Some(span),
                    stamp_data: true,
                    ..base
                },
                gen::Plan {
                    op: Op::Read,
                    span,
                    limit: Some(span),
                    check: true,
                    ..base
                },
            ]
        }
    };
    let tuning = gen::Tuning {
        window: a.window,
        spin: Duration::from_micros(a.spin_us),
        min_rto: Duration::from_micros(a.min_rto_us),
        dead: Duration::from_secs(5),
        rx_ring: a.rx == Io::Ring,
        rx_whole: a.rx_whole,
        rate: rate_of(&a)?,
        rate_depth: Duration::from_millis(a.rate_burst_ms.unwrap_or(DEFAULT_BURST_MS)),
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    let live = std::io::stderr().is_terminal();
    let mut txr = match a.tx {
        Io::Mmsg => None,
        Io::Ring => match gen::TxRing::new(&a.iface, mtu, a.window) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!(
                    "aoe bench: note: no transmit ring on {} ({e}); sending with sendmmsg",
                    a.iface
                );
                None
            }
        },
    };
    let tx = if txr.is_some() { Io::Ring } else { Io::Mmsg };
    let peer = gen::Peer {
        sock: &sock,
        me,
        mac,
        addr,
    };
    let cpu0 = own_cpu_seconds();
    let mut phases: Vec<PhaseStats> = Vec::new();
    for plan in &plans {
        let name = op_name(plan.op);
        let st = gen::run(&peer, plan, &tuning, txr.as_mut(), &stop, |p| {
            if live {
                let s = p.elapsed.as_secs_f64();
                eprint!(
                    "\r{name} {s:6.1} s {:9.1} MB/s {:9.0} IOPS  retransmits {}   ",
                    rate(p.bytes as f64, s) / 1e6,
                    rate(p.requests as f64, s),
                    p.retransmits
                );
                let _ = std::io::stderr().flush();
            }
        })?;
        let stopped = st.interrupted;
        phases.push(st);
        if stopped {
            break;
        }
    }
    if live {
        eprint!("\r{:78}\r", "");
    }
    let report = build_report(&a, mtu, info, per, &phases, own_cpu_seconds() - cpu0, tx);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    if report.mismatched_sectors > 0 {
        let (lba, off) = phases.iter().find_map(|p| p.first_bad).unwrap_or((0, 0));
        bail!(
            "verify: {} of {} sectors read back differ from what was written; first at LBA {lba} byte {off}",
            report.mismatched_sectors,
            report.verified_sectors
        );
    }
    if report.interrupted {
        bail!("interrupted; the figures above cover the time until then");
    }
    Ok(())
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Read => "read",
        Op::Write => "write",
    }
}

fn build_report(
    a: &BenchArgs,
    mtu: u32,
    target: TargetInfo,
    per: u8,
    phases: &[PhaseStats],
    cpu: f64,
    tx: Io,
) -> Report {
    // Checked by check_args before anything was sent.
    let paced = rate_of(a).unwrap_or_default();
    let mut all = hist::Histogram::new();
    let mut all_sched = hist::Histogram::new();
    let mut reports = Vec::new();
    let io = |ring: bool| if ring { Io::Ring } else { Io::Mmsg };
    for p in phases {
        all.merge(&p.hist);
        all_sched.merge(&p.hist_sched);
        reports.push(PhaseReport {
            op: op_name(p.op),
            figures: Figures::new(
                p.requests,
                p.bytes,
                p.elapsed.as_secs_f64(),
                &p.hist,
                Resent {
                    retransmits: p.retransmits,
                    late_replies: p.late_replies,
                    rx_drops: p.rx_drops,
                },
                paced.is_limited().then_some((paced, &p.hist_sched)),
            ),
            tx: io(p.tx_ring),
            rx: io(p.rx_ring),
            rx_data_bytes: p.rx_data_bytes,
            tx_frames_ring: p.frames_ring,
            tx_frames_mmsg: p.frames_mmsg,
        });
    }
    let sum = |f: fn(&PhaseStats) -> u64| phases.iter().map(f).sum::<u64>();
    let secs: f64 = phases.iter().map(|p| p.elapsed.as_secs_f64()).sum();
    Report {
        interface: a.iface.clone(),
        mtu,
        target,
        mode: a.mode,
        bs: u64::from(per) * SECTOR as u64,
        window: a.window,
        total: Figures::new(
            sum(|p| p.requests),
            sum(|p| p.bytes),
            secs,
            &all,
            Resent {
                retransmits: sum(|p| p.retransmits),
                late_replies: sum(|p| p.late_replies),
                rx_drops: sum(|p| p.rx_drops),
            },
            paced.is_limited().then_some((paced, &all_sched)),
        ),
        phases: reports,
        verified_sectors: sum(|p| p.checked_sectors),
        mismatched_sectors: sum(|p| p.bad_sectors),
        generator_cpu_s: cpu,
        tx,
        rx: a.rx,
        rx_whole: a.rx_whole,
        rx_data_bytes: sum(|p| p.rx_data_bytes),
        tx_frames_ring: sum(|p| p.frames_ring),
        tx_frames_mmsg: sum(|p| p.frames_mmsg),
        interrupted: phases.iter().any(|p| p.interrupted),
    }
}

fn print_human(r: &Report) {
    let t = &r.target;
    println!(
        "target e{}.{} ({}) on {} MTU {}: {} sectors ({:.1} GB), {} buffers, firmware {:#06x}, at most {} sectors/request",
        t.shelf,
        t.slot,
        t.mac,
        r.interface,
        r.mtu,
        t.sectors,
        t.sectors as f64 * SECTOR as f64 / 1e9,
        t.buffer_count,
        t.firmware_version,
        t.max_sectors
    );
    for ph in &r.phases {
        let (p, l) = (&ph.figures, &ph.figures.latency_us);
        println!(
            "{:<5} bs {} window {}: {:.1} MB/s, {:.0} IOPS, {} bytes in {:.2} s; latency us avg {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1}; retransmits {}",
            ph.op, r.bs, r.window, p.mb_per_s, p.iops, p.bytes, p.seconds, l.avg, l.p50, l.p99, l.p999, p.retransmits
        );
        if let Some(pc) = &p.rate {
            print_pacing(ph.op, pc);
        }
    }
    if r.mode == Mode::Verify {
        println!(
            "verify: {} sectors checked, {} differ",
            r.verified_sectors, r.mismatched_sectors
        );
    }
    println!(
        "generator CPU {:.2} s over {:.2} s ({:.0}% of one core)",
        r.generator_cpu_s,
        r.total.seconds,
        100.0 * rate(r.generator_cpu_s, r.total.seconds)
    );
}

fn print_pacing(op: &str, pc: &Pacing) {
    let mut asked = Vec::new();
    if let Some(b) = pc.asked_bytes_per_s {
        asked.push(format!("{:.1} MB/s", b as f64 / 1e6));
    }
    if let Some(i) = pc.asked_iops {
        asked.push(format!("{i} IOPS"));
    }
    let l = &pc.latency_from_schedule_us;
    println!(
        "{op:<5} rate: asked {}, achieved {:.1} MB/s {:.0} IOPS ({:.1}%); latency from the schedule us avg {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1} (above: from the send)",
        asked.join(" and "),
        pc.achieved_bytes_per_s / 1e6,
        pc.achieved_iops,
        100.0 * pc.achieved_fraction,
        l.avg,
        l.p50,
        l.p99,
        l.p999
    );
    if !pc.kept_up {
        println!(
            "{op:<5} rate NOT KEPT UP: achieved {:.1}% of the asked rate (below {:.0}%); the target or the window is the limit, not the rate",
            100.0 * pc.achieved_fraction,
            100.0 * KEPT_UP
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_or_fail_with_one_line() {
        assert_eq!(parse_rate("--rate", "300M").ok(), Some(300 << 20));
        assert_eq!(parse_rate("--rate", "123456789").ok(), Some(123_456_789));
        assert_eq!(parse_rate("--rate-iops", "10k").ok(), Some(10_240));
        for bad in [
            "0",
            "5X",
            "-5",
            "",
            "k",
            "1.5M",
            "99999999999G",
            "99999999999999999999",
        ] {
            let e = parse_rate("--rate", bad).expect_err(bad);
            assert!(e.downcast_ref::<UsageError>().is_some(), "{bad}: {e}");
            assert_eq!(e.to_string().lines().count(), 1, "{bad}: {e}");
        }
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("8704"), Ok(8704));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999G").is_err());
    }
}
