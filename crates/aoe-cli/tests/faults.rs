//! Issue 14: the real daemons under injected faults, each test in namespaces it creates and
//! each asserting on data.
//!
//! * `loss_*`: 5% loss, 1% duplication, 1% reordering (aoe_testkit::relay) under
//!   `aoe initiator` against `aoe serve` and vblade at MTU 1500 and 9000; every byte written
//!   is read back and the figures (frames lost, duplicated, retransmitted, MB/s with and
//!   without loss, and the goal: at least half the loss-free rate) printed.
//! * `corrupted_*`: shelf.slot or command bytes corrupted in 2% of the frames: ignored,
//!   retransmitted, data intact.
//! * `link_cut_*`: a 3 s cut of the link in the middle of a transfer: no I/O error, data
//!   intact (the driver retransmits until `deadsecs`, `aoecmd.c` `rexmit_timer`).
//! * `vanished_target_*`: the target goes silent (link cut for good) with reads pending: they
//!   fail with EIO within deadsecs + 1 s of their start, new I/O fails at once, the daemon
//!   stays up, and after `discover` the device is `up` again (extends initiator_peers.rs
//!   `dead_*`, which kills the target with no I/O pending except one read).
//! * `multipath_*`: two relayed paths to one target, one cut mid-transfer: the transfer
//!   finishes, the cut path's retransmits show in `err` (the driver's `retransmit ... s=MAC`);
//!   two targets of one device (one per path), both cut for 3 s and one back: the write
//!   finishes, the device stays up (a pin).
//! * `interface_list_swapped_*`: the interface list changed mid-write from the first path's
//!   interface to the second's: the write finishes (the old interface stays in use until
//!   the device has a path through the new one), then only the new one is used.
//! * `reserved_*`, `mask_*`, `read_only_*`: raw clients (two MACs on one LAN) against the
//!   target's Reserve/Release (error 6, AoEr11 3.4), MAC mask list (no answer outside it,
//!   AoEr11 3.3) and `-r` (writes fail with ATA ABRT, vblade `ata.c`), the backing file
//!   unchanged by every refused write.
//! * `imposter_*`: a target with the same shelf.slot on an interface outside `--iflist` is
//!   never attached (the driver's `aoe_iflist`, `is_aoe_netif`).
//! * `flush_*`: FLUSH CACHE and FLUSH CACHE EXT reach fdatasync before their reply
//!   (aoe_testkit::faultfs counts the FUSE_FSYNCs).
//! * `late_original_*`: the relay holds the first copy of a write past the initiator's
//!   timeout (its retransmitted copy completes the write), a newer write to the same
//!   sectors follows, then the held original is let through: the newer data must stay (the
//!   initiator's write fence), against `aoe serve` and vblade; with the fence off
//!   (`--unsafe-no-write-fence`, the Linux driver's behaviour) the original undoes it.
//!
//! Needs root, fuse3, vblade, aoetools (`scripts/install-deps.sh`).

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use aoe_testkit::faultfs::FaultFs;
use aoe_testkit::relay::Faults;
use aoe_testkit::wait_until;
use aoe_wire::{ErrorCode, MacAddr, ReserveCommand, ReserveRepr};
use common::*;

const MIB: usize = 1 << 20;

/// Writes `data` at `offset` of `dev` in 1 MiB pieces, then fsync; the first error.
fn write_in_pieces(dev: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let f = OpenOptions::new().write(true).open(dev)?;
    for (i, chunk) in data.chunks(MIB).enumerate() {
        f.write_all_at(chunk, offset + (i * MIB) as u64)?;
    }
    f.sync_all()
}

/// Progress of a transfer under loss, one mark per MiB: a gap of more than
/// [`Gaps::STALL`] between marks is a stall, reported with the initiator's log around it
/// (to `$AOE_STALL_DIR` if set, else to stderr).
struct Gaps {
    t0: Instant,
    last: Instant,
    stalls: Vec<(String, f64, f64)>,
}

impl Gaps {
    const STALL: Duration = Duration::from_secs(2);

    fn new(t0: Instant) -> Gaps {
        Gaps {
            t0,
            last: t0,
            stalls: Vec::new(),
        }
    }

    fn mark(&mut self, what: &str) {
        self.mark_after(what, Self::STALL);
    }

    /// A mark where a gap of `stall` is a stall.
    fn mark_after(&mut self, what: &str, stall: Duration) {
        let now = Instant::now();
        let gap = now - self.last;
        if gap > stall {
            let at = (self.last - self.t0).as_secs_f64();
            eprintln!("STALL {what}: {:.1} s from {at:.1} s", gap.as_secs_f64());
            self.stalls.push((what.to_owned(), at, gap.as_secs_f64()));
        }
        self.last = now;
    }

    fn report(&self, what: &str, rig: &Rig) {
        if self.stalls.is_empty() {
            return;
        }
        let log = rig.initiator_log();
        let text = format!("{what}: stalls {:?}\n{log}", self.stalls);
        match std::env::var_os("AOE_STALL_DIR") {
            Some(d) => {
                let p = Path::new(&d).join(format!(
                    "stall-{}-{}.log",
                    std::process::id(),
                    what.replace(' ', "_")
                ));
                let _ = fs::write(&p, text);
                eprintln!("STALL log: {}", p.display());
            }
            None => eprintln!("{text}"),
        }
    }
}

fn write_in_pieces_timed(
    dev: &Path,
    offset: u64,
    data: &[u8],
    gaps: &mut Gaps,
) -> std::io::Result<()> {
    let f = OpenOptions::new().write(true).open(dev)?;
    for (i, chunk) in data.chunks(MIB).enumerate() {
        f.write_all_at(chunk, offset + (i * MIB) as u64)?;
        gaps.mark(&format!("write MiB {i}"));
    }
    f.sync_all()
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let bad = wrong_sectors(got, want);
        panic!(
            "{what}: {} sectors differ, first {:?}",
            bad.len(),
            &bad[..bad.len().min(8)]
        );
    }
}

/// Retransmissions so far: the initiator's `err` lines (`retransmit ... oldtag=`), counted in
/// its log at INFO (the `err` file keeps only the last 100, like the driver's ring), with
/// the lines the log's rate limit suppressed (`(N similar lines suppressed)`, also on the
/// summary line of a burst).
fn retransmits(rig: &Rig) -> usize {
    retransmit_lines(rig, "")
}

/// Retransmissions that later frames' answers triggered (fast retransmission), not a timer.
fn fast_retransmits(rig: &Rig) -> usize {
    retransmit_lines(rig, "(later frames answered)")
}

/// Copies sent as tail loss probes (nothing answered for two RTTs at the end of a burst),
/// counted in the initiator's DEBUG lines, which no rate limit thins out (the INFO line of
/// a burst carries one note for all the lines it stands for).
fn tail_probes(rig: &Rig) -> usize {
    let log = rig.initiator_log();
    log.lines()
        .filter(|l| l.contains("DEBUG") && l.contains("retransmit ") && l.contains("(tail probe)"))
        .count()
}

fn retransmit_lines(rig: &Rig, with: &str) -> usize {
    let log = rig.initiator_log();
    log.lines()
        .filter(|l| l.contains("INFO") && l.contains("retransmit ") && l.contains(with))
        .map(|l| usize::from(l.contains("oldtag=")) + suppressed(l))
        .sum()
}

/// The count of a rate-limited log line's `(N similar line[s] suppressed)`, else 0.
fn suppressed(line: &str) -> usize {
    line.rsplit_once(" (")
        .filter(|(_, r)| r.contains("similar line"))
        .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

// ------------------------------------------------------------------------------------------
// 1. loss, duplication, reordering

/// Size moved each way (written, then read back) on the clean link and again under loss:
/// the 256 MiB of issue 14's test 1.
const LOSS_TEST_BYTES: usize = 256 * MIB;

/// `len` bytes of the file at `path` from `off`.
fn file_range(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut buf, off))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    buf
}

/// Issue 14 test 1 at MTU 1500 and 9000: the same transfer on a clean relayed link and
/// under 5% loss, 1% duplication, 1% reordering, every byte checked. The goal (at least
/// half the loss-free rate under loss) is printed as a figure, never asserted on: timing on
/// a shared machine measures the machine as much as the code. Engine-level checks of the
/// goal, in simulated time, are in aoe-proto (`initiator::tests::loss`).
fn loss(kind: Target) {
    let mut lines = Vec::new();
    // AOE_LOSS_MTU=1500 (or 9000) runs only that MTU (to chase an intermittent stall).
    let only: Option<u32> = std::env::var("AOE_LOSS_MTU")
        .ok()
        .and_then(|m| m.parse().ok());
    for (mtu, seed) in [(1500u32, 14u64), (9000, 15)] {
        if only.is_some_and(|m| m != mtu) {
            continue;
        }
        lines.push(loss_at(kind, mtu, seed));
    }
    for l in lines {
        eprintln!("{l}");
    }
}

fn loss_at(kind: Target, mtu: u32, seed: u64) -> String {
    let n = LOSS_TEST_BYTES;
    // Room for both transfers; sparse, and every byte read back was written first.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("loss.img");
    fs::File::create(&file)
        .and_then(|f| f.set_len((2 * n + MIB) as u64))
        .expect("backing file");
    // `aoe serve` reports its drops on a control socket; AOE_LOSS_TARGET_ARGS adds target
    // options (e.g. "-b 16") to compare settings under loss.
    let sock = dir.path().join("ctl.sock");
    let mut args: Vec<String> = std::env::var("AOE_LOSS_TARGET_ARGS")
        .map(|a| a.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    if kind == Target::AoeServe {
        args.extend(["--control".to_owned(), sock.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = RelayRig::start(kind, mtu, InitOpts::default(), Some(file), &args, 1, seed);
    let dev = r.rig.dev();
    let ctl = r.control(0);
    let drops = || (kind == Target::AoeServe).then(|| target_drops(&sock));

    // Clean link first: the figure loss is compared with.
    let clean = pattern(140, n);
    let k0 = Contention::sample(&r.rig);
    let t0 = Instant::now();
    write_in_pieces(&dev, 0, &clean).expect("write on a clean link");
    let clean_write_secs = t0.elapsed().as_secs_f64();
    let got = read_at(&dev, 0, clean.len()).expect("read on a clean link");
    let clean_secs = t0.elapsed().as_secs_f64();
    let k1 = Contention::sample(&r.rig);
    assert_same(&got, &clean, "clean link");
    drop(got);
    // Every byte also in the backing file.
    let back = file_range(&r.rig.file, 0, n);
    assert_same(&back, &clean, "backing file, clean part");
    drop((back, clean));
    let c0 = ctl.counters();
    let (rx0, fast0, tlp0) = (
        retransmits(&r.rig),
        fast_retransmits(&r.rig),
        tail_probes(&r.rig),
    );
    let d0 = drops();

    // The same amount under 5% loss, 1% duplication, 1% reordering.
    ctl.set_faults(Faults::lossy(0.05, 0.01, 0.01));
    let lossy = pattern(141, n);
    let off = n as u64;
    let k2 = Contention::sample(&r.rig);
    let t0 = Instant::now();
    let mut gaps = Gaps::new(t0);
    write_in_pieces_timed(&dev, off, &lossy, &mut gaps)
        .unwrap_or_else(|e| panic!("write under loss: {e}{}", r.rig.logs()));
    gaps.mark("fsync done");
    let write_secs = t0.elapsed().as_secs_f64();
    // One read of it all, as before the marks: the kernel splits it into many requests in
    // flight at once (a read per MiB would change the load this measures).
    let got = read_at(&dev, off, lossy.len())
        .unwrap_or_else(|e| panic!("read under loss: {e}{}", r.rig.logs()));
    gaps.mark_after("read", Duration::from_secs(10));
    let lossy_secs = t0.elapsed().as_secs_f64();
    let k3 = Contention::sample(&r.rig);
    gaps.report(&format!("{kind:?} MTU {mtu}"), &r.rig);
    assert_same(&got, &lossy, "under loss");
    drop(got);
    ctl.set_faults(Faults::default());
    let c1 = ctl.counters();
    let (rx1, fast1, tlp1) = (
        retransmits(&r.rig),
        fast_retransmits(&r.rig),
        tail_probes(&r.rig),
    );
    let target = match (d0, drops()) {
        (Some(a), Some(b)) => format!(
            "; target drops under loss: {} ({} over its buffer count, {} queue full)",
            b.0 - a.0,
            b.1 - a.1,
            b.2 - a.2
        ),
        _ => String::new(),
    };
    if let Some(d) = std::env::var_os("AOE_LOSS_LOG_DIR") {
        // The initiator's log (every retransmission, with its time) for a closer look.
        let log = r.rig.initiator_log();
        let p = Path::new(&d).join(format!("loss-{kind:?}-{mtu}-{}.log", std::process::id()));
        fs::write(&p, log).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        eprintln!("LOG {}", p.display());
    }
    let window = fs::read_to_string(r.rig.root.join("sysfs/kernel/debug/aoe").join(DEV))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let back = file_range(&r.rig.file, off, n);
    assert_same(&back, &lossy, "backing file, lossy part");
    drop((back, lossy));
    let moved_mb = 2.0 * n as f64 / 1e6;
    let (clean_mbs, lossy_mbs) = (moved_mb / clean_secs, moved_mb / lossy_secs);
    eprintln!(
        "FIGURES {kind:?} MTU {mtu}: clean {clean_mbs:.2} MB/s ({moved_mb:.1} MB moved in \
         {clean_secs:.1} s, writing {clean_write_secs:.1} s, {rx0} retransmits, {fast0} fast, {tlp0} tail probes); \
         under 5%/1%/1%: {lossy_mbs:.2} MB/s ({moved_mb:.1} MB moved in {lossy_secs:.1} s, \
         writing {write_secs:.1} s); relay under loss: {}; initiator \
         retransmits under loss: {} ({} fast, {} tail probes){target}; initiator after: \
         {window}; machine, loss-free {}; under loss {}",
        Snapshot(c0, c1),
        rx1 - rx0,
        fast1 - fast0,
        tlp1 - tlp0,
        k0.phase(&k1),
        k2.phase(&k3),
    );
    assert!(
        c1.lost > c0.lost && c1.duplicated > c0.duplicated && c1.reordered > c0.reordered,
        "not every fault injected (loss, duplication, reordering): {c1}"
    );
    r.finish();
    format!(
        "GOAL {kind:?} MTU {mtu}: {lossy_mbs:.2} MB/s under loss against {clean_mbs:.2} MB/s \
         without, {:.0}% (goal: at least 50%)",
        100.0 * lossy_mbs / clean_mbs
    )
}

/// What the machine did to one phase of a loss run: run-queue waits (ns; `schedstat`'s
/// second field, summed over every thread) of the test process (the relay's threads), of
/// every process in the initiator's namespace and in the target's, and the machine's CPU
/// pressure (PSI `some` total, us: time during which some task waited for a CPU). A
/// loss-free and a lossy phase are only comparable when the machine treated them alike;
/// these say whether it did (on 2 CPUs shared with other builds it often does not).
#[derive(Clone, Copy)]
struct Contention {
    at: Instant,
    relay_ns: u64,
    initiator_ns: u64,
    target_ns: u64,
    psi_us: Option<u64>,
}

impl Contention {
    fn sample(rig: &Rig) -> Contention {
        let waits = |pids: Vec<u32>| -> u64 { pids.into_iter().map(run_queue_wait).sum() };
        Contention {
            at: Instant::now(),
            relay_ns: run_queue_wait(std::process::id()),
            initiator_ns: waits(rig.init_ns.pids().unwrap_or_default()),
            target_ns: waits(rig.target_ns.pids().unwrap_or_default()),
            psi_us: fs::read_to_string("/proc/pressure/cpu").ok().and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("some "))?
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix("total="))?
                    .parse()
                    .ok()
            }),
        }
    }

    /// `later` against `self`: the phase's seconds and what waited in it.
    fn phase(&self, later: &Contention) -> String {
        let secs = (later.at - self.at).as_secs_f64();
        let ms = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e6;
        let psi = match (self.psi_us, later.psi_us) {
            (Some(a), Some(b)) => format!(
                ", CPU pressure {:.0}%",
                100.0 * b.saturating_sub(a) as f64 / 1e6 / secs
            ),
            _ => String::new(),
        };
        format!(
            "{secs:.1} s: run-queue wait relay {:.0} ms, initiator {:.0} ms, target {:.0} ms{psi}",
            ms(self.relay_ns, later.relay_ns),
            ms(self.initiator_ns, later.initiator_ns),
            ms(self.target_ns, later.target_ns),
        )
    }
}

/// Nanoseconds every thread of process `pid` spent runnable but waiting for a CPU (0 for a
/// process that is gone).
fn run_queue_wait(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Requests `aoe serve` dropped in all, over its buffer count and for a full worker queue
/// (`aoe target --json stats` on its control socket `sock`), over its one export.
fn target_drops(sock: &Path) -> (u64, u64, u64) {
    let j = target_json(sock, "stats");
    let c = &j["exports"][0]["counters"];
    let n = |k: &str| {
        c[k].as_u64()
            .unwrap_or_else(|| panic!("no {k} in the target's stats: {j}"))
    };
    (
        n("dropped"),
        n("dropped_over_buffer_count"),
        n("dropped_queue_full"),
    )
}

/// Counter differences for the figures.
struct Snapshot(aoe_testkit::relay::Snapshot, aoe_testkit::relay::Snapshot);

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (a, b) = (&self.0, &self.1);
        write!(
            f,
            "{} frames to the target, {} back, lost {}, duplicated {}, reordered {}",
            b.to_target - a.to_target,
            b.to_initiator - a.to_initiator,
            b.lost - a.lost,
            b.duplicated - a.duplicated,
            b.reordered - a.reordered
        )
    }
}

#[test]
fn loss_aoe_serve() {
    loss(Target::AoeServe);
}

#[test]
fn loss_vblade() {
    loss(Target::Vblade);
}

// ------------------------------------------------------------------------------------------
// 1b. corrupted header fields

/// Frames whose shelf.slot or command byte is corrupted (2% each way, one field at a time)
/// are not taken for anything else: the initiator ignores a response for no device or of
/// another command (`aoenet_rcv` dispatches on the command, `aoecmd_ata_rsp` checks the
/// device) and the target a request not addressed to it, so the frame is lost and
/// retransmitted and the data are intact.
///
/// Not tested: a corrupted tag, flags byte, ATA header or data. AoE trusts the Ethernet FCS
/// for those: a tag changed into the tag of another outstanding read of the same device is
/// accepted as that read's answer (measured: 2 wrong sectors in 2 MiB at 2% tag corruption,
/// issue 14 report; the Linux driver matches on the tag alone too), and a flipped E bit or
/// LBA is indistinguishable from a real error or request.
#[test]
fn corrupted_address_and_command_are_ignored_aoe_serve() {
    use aoe_testkit::relay::Field;
    let r = RelayRig::start(Target::AoeServe, 1500, InitOpts::default(), None, &[], 1, 5);
    let ctl = r.control(0);
    let dev = r.rig.dev();
    for (i, field) in [Field::Address, Field::Command].into_iter().enumerate() {
        ctl.set_faults(Faults {
            corrupt: 0.02,
            corrupt_field: Some(field),
            ..Faults::default()
        });
        let data = pattern(150 + i as u64, 2 * MIB);
        let off = (i * 2 * MIB) as u64;
        write_in_pieces(&dev, off, &data)
            .unwrap_or_else(|e| panic!("write with {field:?} corrupted: {e}{}", r.rig.logs()));
        let got = read_at(&dev, off, data.len())
            .unwrap_or_else(|e| panic!("read with {field:?} corrupted: {e}{}", r.rig.logs()));
        ctl.set_faults(Faults::default());
        assert_same(&got, &data, &format!("{field:?} corrupted"));
        let back = fs::read(&r.rig.file).expect("backing file");
        assert_same(&back[off as usize..][..data.len()], &data, "backing file");
    }
    let c = ctl.counters();
    assert!(c.corrupted > 50, "too little corrupted: {c}");
    eprintln!(
        "corruption: {c}; initiator retransmits {}",
        retransmits(&r.rig)
    );
    r.finish();
}

// ------------------------------------------------------------------------------------------
// 2. a 3 s link cut mid-transfer

#[test]
fn link_cut_3s_mid_transfer_aoe_serve() {
    let r = RelayRig::start(Target::AoeServe, 1500, InitOpts::default(), None, &[], 1, 2);
    let ctl = r.control(0);
    let data = pattern(200, 16 * MIB);
    let dev = r.rig.dev();
    let before = ctl.counters().to_target;
    let cut_done = std::thread::scope(|s| {
        let writer = s.spawn(|| write_in_pieces(&dev, 4 * MIB as u64, &data));
        // Cut once a quarter of the frames went through.
        let started = wait_until(Duration::from_secs(60), || {
            ctl.counters().to_target - before > 16 * 1024 / 4 / 2
        });
        assert!(started, "transfer did not start: {}", ctl.counters());
        let cut_at = ctl.counters();
        ctl.cut_for(Duration::from_secs(3))
            .join()
            .expect("cut thread");
        let w = writer.join().expect("writer thread");
        (w, cut_at)
    });
    let (w, cut_at) = cut_done;
    w.unwrap_or_else(|e| panic!("write across a 3 s cut: {e}{}", r.rig.logs()));
    let c = ctl.counters();
    assert!(c.cut > 0, "nothing was cut: {c}");
    assert!(
        c.to_target > cut_at.to_target + c.cut,
        "the transfer did not go on after the cut: {c}"
    );
    let got = read_at(&dev, 4 * MIB as u64, data.len()).expect("read back");
    assert_same(&got, &data, "read back after the cut");
    let back = fs::read(&r.rig.file).expect("backing file");
    assert_same(&back[4 * MIB..][..data.len()], &data, "backing file");
    assert_eq!(r.rig.state().as_deref(), Some("up"));
    eprintln!("cut: {c}");
    r.finish();
}

// ------------------------------------------------------------------------------------------
// 3. the target vanishes with I/O pending

#[test]
fn vanished_target_fails_pending_and_new_io_within_deadsecs() {
    let r = RelayRig::start(
        Target::AoeServe,
        1500,
        InitOpts {
            deadsecs: Some(DEADSECS),
            ..InitOpts::default()
        },
        None,
        &[],
        1,
        3,
    );
    let ctl = r.control(0);
    let dev = r.rig.dev();
    let want = pattern(1, (SECTORS * 512) as usize);
    ctl.set_link(false);
    let t0 = Instant::now();
    // Four readers (different offsets, so none is served from another's page) pending, on
    // threads of their own: a read the initiator never fails must fail the test, not hang
    // it (a panic drops the rig, which stops the initiator and so ends the read).
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..4u64 {
        let (dev, tx) = (dev.clone(), tx.clone());
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = read_at(&dev, (i + 1) << 20, 64 * 1024);
            let _ = tx.send((r, t.elapsed()));
        });
    }
    drop(tx);
    let limit = Duration::from_secs(DEADSECS + 5);
    let results: Vec<(std::io::Result<Vec<u8>>, Duration)> = (0..4)
        .map(|i| {
            let left = limit.saturating_sub(t0.elapsed());
            rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "pending read {i} still hanging {:?} after the cut (deadsecs {DEADSECS}){}",
                    t0.elapsed(),
                    r.rig.logs()
                )
            })
        })
        .collect();
    for (i, (res, took)) in results.iter().enumerate() {
        assert!(
            matches!(res, Err(e) if is_eio(e)),
            "pending read {i}: {res:?}, want EIO{}",
            r.rig.logs()
        );
        assert!(
            *took < Duration::from_secs(DEADSECS + 1),
            "pending read {i} failed after {took:?}, deadsecs {DEADSECS}"
        );
    }
    eprintln!("pending reads failed {:?} after the cut", t0.elapsed());
    r.rig
        .wait_state("down", Duration::from_secs(10), "after the target vanished");
    r.rig.assert_prompt_eio(4096, "new read on a down device");
    let w = OpenOptions::new()
        .write(true)
        .open(&dev)
        .and_then(|f| f.write_all_at(&[7; 4096], 0));
    assert!(
        matches!(&w, Err(e) if is_eio(e)),
        "write to a down device: {w:?}"
    );
    let mut rig_init_alive = false;
    if let Some(i) = r.rig.initiator.as_ref() {
        rig_init_alive = r.rig.init_ns.pids().unwrap_or_default().contains(&i.pid());
    }
    assert!(rig_init_alive, "the initiator exited{}", r.rig.logs());

    ctl.set_link(true);
    r.rig.echo_ok("discover", "");
    r.rig
        .wait_state("up", Duration::from_secs(5), "after discover");
    let got = read_at(&dev, 1 << 20, 64 * 1024).expect("read after the target came back");
    assert_same(&got, &want[1 << 20..][..64 * 1024], "read after recovery");
    r.finish();
}

// ------------------------------------------------------------------------------------------
// 4. multipath: one of two paths cut mid-transfer

#[test]
fn multipath_one_path_cut_mid_transfer() {
    let r = RelayRig::start(Target::AoeServe, 1500, InitOpts::default(), None, &[], 2, 4);
    // Both paths known before the transfer.
    let both = wait_until(Duration::from_secs(10), || {
        let _ = r.rig.echo("discover", "");
        let n = r.rig.attr("netif").unwrap_or_default();
        r.paths.iter().all(|(p, _)| n.contains(p.as_str()))
    });
    assert!(
        both,
        "netif {:?}, want both {:?}",
        r.rig.attr("netif"),
        r.paths
    );
    let (c0, c1) = (r.control(0), r.control(1));
    let data = pattern(400, 16 * MIB);
    let dev = r.rig.dev();
    let w = std::thread::scope(|s| {
        let writer = s.spawn(|| write_in_pieces(&dev, 2 * MIB as u64, &data));
        let started = wait_until(Duration::from_secs(60), || {
            c0.counters().to_target > 1000 && c1.counters().to_target > 1000
        });
        assert!(
            started,
            "both paths not in use: {} / {}",
            c0.counters(),
            c1.counters()
        );
        c0.set_link(false);
        writer.join().expect("writer")
    });
    w.unwrap_or_else(|e| panic!("write with one path cut: {e}{}", r.rig.logs()));
    let got = read_at(&dev, 2 * MIB as u64, data.len()).expect("read back");
    assert_same(&got, &data, "read back with one path cut");
    let back = fs::read(&r.rig.file).expect("backing file");
    assert_same(&back[2 * MIB..][..data.len()], &data, "backing file");
    let cut_mac = MacAddr(r.paths[0].1).to_string();
    // The `err` lines as a reader of the file saw them during the run: the daemon logs them
    // at INFO (`push_err`), retransmissions at least once a second per path (`errlog.rs`).
    // The file itself keeps only the last 100 (the driver's ring), which spurious
    // retransmissions on the surviving path (a loaded machine, an RTO near the RTT) and
    // their late answers can fill after the cut path was ejected.
    let log = r.rig.initiator_log();
    let err_stream: Vec<&str> = log.lines().filter(|l| l.contains("INFO")).collect();
    let from_cut = err_stream
        .iter()
        .filter(|l| l.contains("retransmit") && l.contains(&format!("s={cut_mac}")))
        .count();
    let err = r.rig.err_lines(2);
    assert!(
        from_cut > 0,
        "no retransmit from the cut path (s={cut_mac}) in err ({} lines); the file's last \
         lines:\n{err}",
        err_stream.len()
    );
    eprintln!(
        "multipath: {} retransmits in err, {from_cut} from the cut path, ejected: {}; \
         path 0: {}; path 1: {}",
        retransmits(&r.rig),
        err_stream.iter().any(|l| l.contains("ejecting")),
        c0.counters(),
        c1.counters()
    );
    r.finish();
}

/// Session 34: a device with two targets (two `aoe serve` on one file, each on its own
/// relayed path), both paths dark for 3 s mid-write, then only the first back (the second
/// cut for good). Asserts the write and its fsync succeed, the device is up, and the data
/// is in the backing file and reads back. A pin, not a regression test: in aoe-proto's
/// simulator this case went down at `deadsecs` before the fix (the frames sent into the
/// dark held every slot of the live target's window while the earliest frame's copy waited
/// for one: `sim_multipath_dark_*_one_path_back`), but the real daemons on the base got
/// through it (the write ended 1.3-1.5 s after the path came back; with 12 s of dark and
/// either path back, 2.9 and 6.6 s), for a reason not found.
#[test]
fn multipath_two_targets_both_dark_then_one_back() {
    const DEADSECS: u64 = 20;
    let r = RelayRig::start_per_path_targets(
        Target::AoeServe,
        InitOpts {
            deadsecs: Some(DEADSECS),
            ..InitOpts::default()
        },
        &[],
        2,
        9,
    );
    let both = wait_until(Duration::from_secs(20), || {
        let _ = r.rig.echo("discover", "");
        let n = r.rig.attr("netif").unwrap_or_default();
        r.paths.iter().all(|(p, _)| n.contains(p.as_str()))
    });
    assert!(
        both,
        "netif {:?}, want both {:?}",
        r.rig.attr("netif"),
        r.paths
    );
    let (c0, c1) = (r.control(0), r.control(1));
    let data = pattern(403, 16 * MIB);
    let dev = r.rig.dev();
    let t_back = std::cell::Cell::new(None);
    let w = std::thread::scope(|s| {
        let writer = s.spawn(|| write_in_pieces(&dev, 2 * MIB as u64, &data));
        let started = wait_until(Duration::from_secs(60), || {
            c0.counters().to_target > 1000 && c1.counters().to_target > 1000
        });
        assert!(
            started,
            "both targets not in use: {} / {}",
            c0.counters(),
            c1.counters()
        );
        c0.set_link(false);
        c1.set_link(false);
        // The fault itself: both paths dark this long (not a wait for a condition).
        std::thread::sleep(Duration::from_secs(3));
        c0.set_link(true);
        t_back.set(Some(Instant::now()));
        writer.join().expect("writer")
    });
    let took = t_back.get().map(|t| t.elapsed());
    w.unwrap_or_else(|e| {
        panic!(
            "write with both targets' paths dark 3 s, the first back (deadsecs {DEADSECS}): \
             {e}, {took:?} after the first path came back{}",
            r.rig.logs()
        )
    });
    assert_eq!(r.rig.state().as_deref(), Some("up"), "{}", r.rig.logs());
    let got = read_at(&dev, 2 * MIB as u64, data.len()).expect("read back");
    assert_same(&got, &data, "read back over the path that came back");
    let back = fs::read(&r.rig.file).expect("backing file");
    assert_same(&back[2 * MIB..][..data.len()], &data, "backing file");
    eprintln!(
        "multipath, two targets, dark 3 s, one back: the write ended {took:?} after the \
         first path came back; path 0: {}; path 1: {}",
        c0.counters(),
        c1.counters()
    );
    r.finish();
}

/// Audit 4 (session 21): the interface list changed mid-write from the first path's
/// interface to the second's, both reaching the target (an administrator moving AoE to
/// another NIC). On the code before, the device lost its only path at once ("e7.3 down: no
/// path left") and the writer got EIO, though the second interface found the target
/// milliseconds later. The driver's `aoe_iflist` never takes a target's interfaces away
/// (it filters what is received and where config queries go), so the I/O goes on. Now the
/// interface taken out stays in use until the device has a path through the new one
/// (`RETIRE_GRACE` at most), then goes.
#[test]
fn interface_list_swapped_mid_transfer_aoe_serve() {
    let r = RelayRig::start(Target::AoeServe, 1500, InitOpts::default(), None, &[], 2, 6);
    let (p0, p1) = (r.paths[0].0.clone(), r.paths[1].0.clone());
    r.rig.echo_ok("interfaces", &p0);
    let only0 = wait_until(Duration::from_secs(10), || {
        r.rig.attr("netif").as_deref() == Some(p0.as_str())
    });
    assert!(only0, "netif {:?}, want {p0} alone", r.rig.attr("netif"));
    let c0 = r.control(0);
    let data = pattern(401, 16 * MIB);
    let dev = r.rig.dev();
    let w = std::thread::scope(|s| {
        let writer = s.spawn(|| write_in_pieces(&dev, 2 * MIB as u64, &data));
        let started = wait_until(Duration::from_secs(60), || c0.counters().to_target > 1000);
        assert!(started, "the write did not start: {}", c0.counters());
        r.rig.echo_ok("interfaces", &p1);
        writer.join().expect("writer")
    });
    w.unwrap_or_else(|e| panic!("write across the interface swap: {e}{}", r.rig.logs()));
    let got = read_at(&dev, 2 * MIB as u64, data.len()).expect("read back");
    assert_same(&got, &data, "read back after the interface swap");
    let back = fs::read(&r.rig.file).expect("backing file");
    assert_same(&back[2 * MIB..][..data.len()], &data, "backing file");
    // The interface taken out goes once the device has a path through the new one.
    let only1 = wait_until(Duration::from_secs(15), || {
        r.rig.attr("netif").as_deref() == Some(p1.as_str())
    });
    assert!(
        only1,
        "netif {:?}, want {p1} alone{}",
        r.rig.attr("netif"),
        r.rig.logs()
    );
    r.finish();
}

// ------------------------------------------------------------------------------------------
// 4b. multipath: every path dark in turn under a window of writes (session 35)

/// `O_DIRECT` of asm-generic/fcntl.h on x86 (the tests run there).
const O_DIRECT: i32 = 0o40000;

/// Writer threads of [`WindowWriters`]: this many `O_DIRECT` writes in flight at once.
const WINDOW_WRITERS: usize = 8;
/// Each writer's places: 64 KiB pieces, writer `w`'s piece `k` at `(w * PLACES + k) * 64 KiB`.
const WINDOW_PLACES: u64 = 4;
const WINDOW_PIECE: usize = 64 << 10;

/// [`WINDOW_WRITERS`] threads writing 64 KiB `O_DIRECT` pieces through a device file, each
/// write a new generation's pattern at one of the thread's own places, until
/// [`WindowWriters::stop`]: a window of writes in flight, as a file system's writeback
/// keeps. A failed write's piece is not checked (its bytes are undefined); every
/// acknowledged one must be in the backing file.
struct WindowWriters {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    failed: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Per thread: the last generation acknowledged at each of its places (by piece index).
    threads: Vec<std::thread::JoinHandle<std::collections::BTreeMap<u64, u64>>>,
}

impl WindowWriters {
    fn start(dev: &Path) -> WindowWriters {
        use std::os::unix::fs::OpenOptionsExt;
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads = (0..WINDOW_WRITERS as u64)
            .map(|w| {
                let f = OpenOptions::new()
                    .write(true)
                    .custom_flags(O_DIRECT)
                    .open(dev)
                    .expect("open the device file with O_DIRECT");
                let (s, a, fl) = (stop.clone(), acked.clone(), failed.clone());
                std::thread::spawn(move || {
                    let mut last = std::collections::BTreeMap::new();
                    let mut g = 0u64;
                    while !s.load(Ordering::Relaxed) {
                        g += 1;
                        let i = w * WINDOW_PLACES + g % WINDOW_PLACES;
                        let gen = (w << 32) | g;
                        match f.write_all_at(&pattern(gen, WINDOW_PIECE), i * WINDOW_PIECE as u64) {
                            Ok(()) => {
                                last.insert(i, gen);
                                a.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                last.remove(&i);
                                fl.lock()
                                    .unwrap()
                                    .push(format!("piece {i} generation {gen:#x}: {e}"));
                            }
                        }
                    }
                    last
                })
            })
            .collect();
        WindowWriters {
            stop,
            acked,
            failed,
            threads,
        }
    }

    /// Writes acknowledged so far.
    fn acked(&self) -> usize {
        self.acked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes failed so far.
    fn failed(&self) -> usize {
        self.failed.lock().unwrap().len()
    }

    /// Stops the writers; the last generation acknowledged at each piece, and the failures.
    fn stop(self) -> (std::collections::BTreeMap<u64, u64>, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut all = std::collections::BTreeMap::new();
        for t in self.threads {
            all.extend(t.join().expect("writer thread"));
        }
        let failed = std::mem::take(&mut *self.failed.lock().unwrap());
        (all, failed)
    }
}

/// How long each path is dark in [`paths_dark_in_turn`]: a few RTOs, well under `deadsecs`.
const DARK: Duration = Duration::from_secs(4);
const DARK_DEADSECS: u64 = 30;

/// Session 35 (eighteenth audit, item 3): one `aoe serve` (on a bridge) reached over three
/// relayed paths, a window of [`WINDOW_WRITERS`] `O_DIRECT` writers, and each path dark
/// ([`DARK`]) in turn and back. Asserted by [`paths_dark_in_turn`]: no write fails, the device
/// stays up (`deadsecs` 30), writes go on after each return, every path carries frames to
/// the target and their answers again after its return, and every acknowledged write is in
/// the backing file; since session 36 also that the initiator sent at most
/// [`THREE_PATH_COPIES`] retransmissions (base: "14162 retransmits with each path dark 4s
/// in turn, at most 4000 wanted").
#[test]
fn multipath_three_paths_dark_in_turn_under_a_window_of_writes() {
    let r = RelayRig::start(
        Target::AoeServe,
        1500,
        InitOpts {
            deadsecs: Some(DARK_DEADSECS),
            ..InitOpts::default()
        },
        None,
        &[],
        3,
        11,
    );
    paths_dark_in_turn(r, "one aoe serve over three paths", Some(THREE_PATH_COPIES));
}

/// Session 36: most copies [`multipath_three_paths_dark_in_turn_under_a_window_of_writes`]
/// may send. The base (b1e26d5) sent 14162-15222 in three runs: every third frame went
/// into the dark path for its 4 s (the relays cut some 4200 per path), each then copied,
/// and frames on the slower paths were copied when answers on a quicker one overtook them.
/// With loss found per path and a dark path given one of `2^dark` of its turns: 854-1189
/// (some 150 frames cut per path).
const THREE_PATH_COPIES: usize = 4000;

/// Session 35 (eighteenth audit, item 3): our multipath over a target we did not write:
/// two vblade processes on one file, one per relayed path (a device with two targets, two
/// MACs), each path dark in turn and back under the window of writes; the assertions of
/// [`paths_dark_in_turn`].
#[test]
fn multipath_two_vblades_dark_in_turn_under_a_window_of_writes() {
    let r = RelayRig::start_per_path_targets(
        Target::Vblade,
        InitOpts {
            deadsecs: Some(DARK_DEADSECS),
            ..InitOpts::default()
        },
        &[],
        2,
        13,
    );
    paths_dark_in_turn(r, "two vblades, one per path", None);
}

/// The two tests above: every path of `r` known, the writers going on every path, then
/// each path dark for [`DARK`] in turn; after each return 50 more writes must be answered
/// within 45 s, and at the end each path must have carried 200 frames to the target and
/// 200 answers back since its return (within 45 s); no write may fail, the device must be
/// up, and every acknowledged write must be in the backing file; and, with `max_copies`,
/// the initiator's retransmissions (its log's, `retransmits`) at most that many.
fn paths_dark_in_turn(r: RelayRig, what: &str, max_copies: Option<usize>) {
    let all = wait_until(Duration::from_secs(20), || {
        let _ = r.rig.echo("discover", "");
        let n = r.rig.attr("netif").unwrap_or_default();
        r.paths.iter().all(|(p, _)| n.contains(p.as_str()))
    });
    assert!(
        all,
        "{what}: netif {:?}, want every path {:?}",
        r.rig.attr("netif"),
        r.paths
    );
    let ctls: Vec<_> = (0..r.paths.len()).map(|i| r.control(i)).collect();
    let writers = WindowWriters::start(&r.rig.dev());
    // The exact condition the rounds need: every path carrying writes, and none failed.
    let going = wait_until(Duration::from_secs(30), || {
        writers.failed() > 0
            || (writers.acked() >= 100 && ctls.iter().all(|c| c.counters().to_target > 200))
    });
    let mut stalled =
        (!going || writers.failed() > 0).then(|| {
            format!(
            "before the first path went dark ({} acknowledged; frames to the target per path {:?})",
            writers.acked(),
            ctls.iter().map(|c| c.counters().to_target).collect::<Vec<_>>()
        )
        });
    let mut at_back = Vec::new();
    for (i, c) in ctls.iter().enumerate() {
        if stalled.is_some() {
            break;
        }
        c.set_link(false);
        // The fault itself: the path dark this long (not a wait for a condition).
        std::thread::sleep(DARK);
        c.set_link(true);
        at_back.push(c.counters());
        let before = writers.acked();
        // The exact condition asserted: 50 writes answered after the return, or a failure.
        let on = wait_until(Duration::from_secs(45), || {
            writers.acked() >= before + 50 || writers.failed() > 0
        });
        if !on || writers.failed() > 0 {
            stalled = Some(format!(
                "after path {i} came back ({} acknowledged before, {} now)",
                before,
                writers.acked()
            ));
        }
    }
    // The exact condition asserted: every path used again since its return, both ways.
    let used = |i: usize| {
        let (b, n) = (&at_back[i], ctls[i].counters());
        n.to_target >= b.to_target + 200 && n.to_initiator >= b.to_initiator + 200
    };
    let used_again = stalled.is_none()
        && wait_until(Duration::from_secs(45), || {
            writers.failed() > 0 || (0..ctls.len()).all(used)
        });
    let counts: Vec<String> = ctls
        .iter()
        .enumerate()
        .map(|(i, c)| match at_back.get(i) {
            Some(b) => format!("path {i}: at its return {b}; now {}", c.counters()),
            None => format!("path {i}: now {}", c.counters()),
        })
        .collect();
    let (acked, failures) = writers.stop();
    assert!(
        failures.is_empty(),
        "{what}: {} writes failed with each path dark {DARK:?} in turn (deadsecs \
         {DARK_DEADSECS}), first {:?}\n{}{}",
        failures.len(),
        &failures[..failures.len().min(3)],
        counts.join("\n"),
        r.rig.logs()
    );
    assert!(
        stalled.is_none(),
        "{what}: writes did not go on {}\n{}{}",
        stalled.unwrap_or_default(),
        counts.join("\n"),
        r.rig.logs()
    );
    assert!(
        used_again,
        "{what}: not every path carried 200 frames each way within 45 s of the last \
         return:\n{}{}",
        counts.join("\n"),
        r.rig.logs()
    );
    assert_eq!(
        r.rig.state().as_deref(),
        Some("up"),
        "{what}: {}",
        r.rig.logs()
    );
    let file = fs::read(&r.rig.file).expect("read the backing file");
    for (&i, &g) in &acked {
        let at = i as usize * WINDOW_PIECE;
        assert!(
            file[at..at + WINDOW_PIECE] == pattern(g, WINDOW_PIECE)[..],
            "{what}: piece {i}: the acknowledged write of generation {g:#x} is not in the \
             backing file"
        );
    }
    let copies = retransmits(&r.rig);
    eprintln!(
        "{what}: each path dark {DARK:?} in turn, {} pieces checked, retransmits {copies}\n{}",
        acked.len(),
        counts.join("\n")
    );
    if let Some(max) = max_copies {
        assert!(
            copies <= max,
            "{what}: {copies} retransmits with each path dark {DARK:?} in turn, at most {max} \
             wanted (frames sent into a dark path, or copied when a quicker path's answers \
             overtook them)\n{}",
            counts.join("\n")
        );
    }
    r.finish();
}

// ------------------------------------------------------------------------------------------
// 5-7, 9: raw clients

fn backing(dir: &Path, sectors: usize) -> std::path::PathBuf {
    let f = dir.join("backing.img");
    fs::write(&f, pattern(9, sectors * 512)).expect("backing file");
    f
}

const WRITE_EXT: u8 = 0x34;
const READ_EXT: u8 = 0x24;

fn reservations(kind: Target) {
    let dir = tempfile::tempdir().unwrap();
    let file = backing(dir.path(), 2048);
    let mut lan = RawLan::start(kind, &file, &[], 2);
    let before = fs::read(&file).unwrap();
    let me = lan.macs[0];
    let set = |macs: Vec<MacAddr>| {
        aoe_wire::Body::Reserve(ReserveRepr {
            rcmd: ReserveCommand::Set,
            macs,
        })
    };
    let r = lan
        .request(0, set(vec![me]), Duration::from_secs(3))
        .unwrap_or_else(|| panic!("no answer to Reserve{}", lan.logs()));
    assert_eq!(rsp_status(&r).0, None, "Reserve refused");
    // The other initiator: writes refused with error 6, nothing lands.
    let other = pattern(50, 2 * 512);
    for lba in [0u64, 100, 2046] {
        let r = lan
            .request(
                1,
                RawLan::ata(WRITE_EXT, true, lba, 2, &other),
                Duration::from_secs(3),
            )
            .unwrap_or_else(|| panic!("no answer to the other's write{}", lan.logs()));
        assert_eq!(
            rsp_status(&r).0,
            Some(ErrorCode::TargetReserved),
            "write at {lba}"
        );
    }
    // Nor may it take the reservation with a plain Set.
    let r = lan
        .request(1, set(vec![lan.macs[1]]), Duration::from_secs(3))
        .expect("answer to the other's Reserve");
    assert_eq!(
        rsp_status(&r).0,
        Some(ErrorCode::TargetReserved),
        "other's Reserve Set"
    );
    assert_eq!(fs::read(&file).unwrap(), before, "a refused write landed");
    // The holder is fully served.
    let mine = pattern(51, 2 * 512);
    let r = lan
        .request(
            0,
            RawLan::ata(WRITE_EXT, true, 8, 2, &mine),
            Duration::from_secs(3),
        )
        .expect("answer to the holder's write");
    assert_eq!(rsp_status(&r).0, None, "holder's write");
    assert_eq!(&fs::read(&file).unwrap()[8 * 512..10 * 512], &mine[..]);
    // Released: the other writes again.
    let r = lan
        .request(0, set(vec![]), Duration::from_secs(3))
        .expect("answer to the release");
    assert_eq!(rsp_status(&r).0, None, "release");
    let r = lan
        .request(
            1,
            RawLan::ata(WRITE_EXT, true, 0, 2, &other),
            Duration::from_secs(3),
        )
        .expect("answer after the release");
    assert_eq!(rsp_status(&r).0, None, "write after the release");
    assert_eq!(&fs::read(&file).unwrap()[..2 * 512], &other[..]);
    assert!(lan.target_alive(), "target exited{}", lan.logs());
}

#[test]
fn reserved_target_refuses_others_aoe_serve() {
    reservations(Target::AoeServe);
}

#[test]
fn reserved_target_refuses_others_vblade() {
    reservations(Target::Vblade);
}

fn mask(kind: Target) {
    let dir = tempfile::tempdir().unwrap();
    let file = backing(dir.path(), 2048);
    let want = fs::read(&file).unwrap();
    // Client 0 on the list: RawLan::start waits for its Query Config answer.
    let mut lan = RawLan::start(kind, &file, &["-m", "{mac0}"], 2);
    let r = lan.request(1, RawLan::query(), Duration::from_secs(2));
    assert!(r.is_none(), "Query Config from outside the mask answered");
    let r = lan.request(
        1,
        RawLan::ata(READ_EXT, false, 0, 2, &[]),
        Duration::from_secs(2),
    );
    assert!(r.is_none(), "read from outside the mask answered");
    let r = lan.request(
        1,
        RawLan::ata(WRITE_EXT, true, 0, 1, &[0xee; 512]),
        Duration::from_secs(2),
    );
    assert!(r.is_none(), "write from outside the mask answered");
    assert_eq!(
        fs::read(&file).unwrap(),
        want,
        "a write from outside the mask landed"
    );
    // Inside: full service.
    let r = lan
        .request(
            0,
            RawLan::ata(READ_EXT, false, 10, 2, &[]),
            Duration::from_secs(3),
        )
        .expect("read from inside the mask");
    let m = aoe_wire::Message::parse(&r).unwrap();
    let aoe_wire::Body::Ata(a) = m.body else {
        panic!("not ATA")
    };
    assert_eq!(&a.data[..1024], &want[10 * 512..12 * 512]);
    let mine = pattern(60, 512);
    let r = lan
        .request(
            0,
            RawLan::ata(WRITE_EXT, true, 20, 1, &mine),
            Duration::from_secs(3),
        )
        .expect("write from inside the mask");
    assert_eq!(rsp_status(&r).0, None);
    assert_eq!(&fs::read(&file).unwrap()[20 * 512..21 * 512], &mine[..]);
    assert!(lan.target_alive(), "target exited{}", lan.logs());
}

#[test]
fn mask_list_outsider_gets_no_answer_aoe_serve() {
    mask(Target::AoeServe);
}

#[test]
fn mask_list_outsider_gets_no_answer_vblade() {
    mask(Target::Vblade);
}

fn read_only(kind: Target) {
    let dir = tempfile::tempdir().unwrap();
    let file = backing(dir.path(), 2048);
    let want = fs::read(&file).unwrap();
    let mut lan = RawLan::start(kind, &file, &["-r"], 1);
    for (lba, n) in [(0u64, 1u8), (100, 2), (2047, 1)] {
        let data = vec![0x5a; usize::from(n) * 512];
        let r = lan
            .request(
                0,
                RawLan::ata(WRITE_EXT, true, lba, n, &data),
                Duration::from_secs(3),
            )
            .unwrap_or_else(|| panic!("no answer to a write{}", lan.logs()));
        let (e, st) = rsp_status(&r);
        assert!(
            e.is_some() || st.is_some_and(|s| s & aoe_wire::ata::status::ERR != 0),
            "write at {lba} to a read-only export: error {e:?}, status {st:?}"
        );
    }
    assert_eq!(fs::read(&file).unwrap(), want, "read-only export written");
    let r = lan
        .request(
            0,
            RawLan::ata(READ_EXT, false, 5, 1, &[]),
            Duration::from_secs(3),
        )
        .expect("read");
    assert_eq!(rsp_status(&r), (None, Some(aoe_wire::ata::status::DRDY)));
}

#[test]
fn read_only_export_refuses_writes_aoe_serve() {
    read_only(Target::AoeServe);
}

#[test]
fn read_only_export_refuses_writes_vblade() {
    read_only(Target::Vblade);
}

// ------------------------------------------------------------------------------------------
// 8. interface restriction

#[test]
fn imposter_on_a_non_allowed_interface_is_never_attached() {
    let rig = Rig::start(
        Target::AoeServe,
        1500,
        InitOpts {
            spare_link: true,
            ..InitOpts::default()
        },
    );
    let (spare_veth, spare_ns) = rig._spare.as_ref().expect("spare link");
    // Same shelf.slot, other data, on the spare link (not in --iflist).
    let fake = rig.dir.path().join("imposter.img");
    fs::write(&fake, pattern(666, (SECTORS * 512) as usize)).unwrap();
    // Watch the spare link from the initiator's side: the imposter's frames do arrive there.
    let spare_if = rig.spare_if.clone().expect("spare interface");
    let watch = raw_socket(&rig.init_ns, &spare_if);
    let mut imposter = spare_ns
        .spawn(Target::AoeServe.command(spare_veth.b_name(), &fake, &[]))
        .expect("start the imposter");
    assert!(
        wait_until(Duration::from_secs(10), || packet_sockets(spare_ns) > 0),
        "imposter did not start: {}",
        imposter.output_so_far()
    );
    // Discovery goes out again, until the imposter's announcement (a Query Config response,
    // sent once its duplicate-address probe is over) has reached the initiator's namespace.
    // (Three discovers 300 ms apart and a 200 ms look stood for it: on a slow machine the
    // look could end before the announcement, or see only the probe, a request.)
    let imposter_mac = MacAddr(spare_veth.b_mac());
    let announced = wait_until(Duration::from_secs(20), || {
        rig.echo_ok("discover", "");
        drain_frames(&watch, Duration::from_millis(300))
            .iter()
            .any(|f| {
                f[6..12] == imposter_mac.0
                    && aoe_wire::Message::parse(f).is_ok_and(|m| m.header.response)
            })
    });
    assert!(
        announced,
        "no answer of the imposter reached the initiator's namespace: the test proves nothing"
    );
    let netif = rig.attr("netif").unwrap_or_default();
    assert!(
        netif.split(',').all(|n| n == rig.init_if),
        "netif {netif:?}: the imposter's interface {spare_if} is in use"
    );
    let mac = rig.attr("mac").unwrap_or_default();
    let imposter_hex = imposter_mac.to_string().replace(':', "");
    assert!(!mac.contains(&imposter_hex), "mac {mac} is the imposter's");
    assert_eq!(
        sha256(&rig.dev()),
        sha256(&rig.file),
        "data not the real target's"
    );
    // The imposter's frames reached the initiator's namespace, and were ignored.
    assert!(
        imposter.is_running(),
        "imposter exited: {}",
        imposter.output_so_far()
    );
    drop(imposter);
    rig.finish();
}

// ------------------------------------------------------------------------------------------
// 9. durability

#[test]
fn flush_reaches_fdatasync_before_the_reply() {
    let store = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let file = backing(store.path(), 4096);
    let ffs = FaultFs::mount(&file).expect("mount the fault file system");
    let faults = ffs.faults();
    let mut lan = RawLan::start(Target::AoeServe, &ffs.file(), &[], 1);
    for (i, cmd) in [(0u64, 0xeau8), (1, 0xe7), (2, 0xea)] {
        let data = pattern(90 + i, 2 * 512);
        let r = lan
            .request(
                0,
                RawLan::ata(WRITE_EXT, true, i * 8, 2, &data),
                Duration::from_secs(3),
            )
            .expect("write");
        assert_eq!(rsp_status(&r).0, None, "write");
        let before = faults.fsyncs();
        let r = lan
            .request(
                0,
                RawLan::ata(cmd, false, 0, 0, &[]),
                Duration::from_secs(5),
            )
            .unwrap_or_else(|| panic!("no answer to flush {cmd:#x}{}", lan.logs()));
        // Read the counter the moment the reply is in: the fsync must already be counted.
        let after = faults.fsyncs();
        assert_eq!(
            rsp_status(&r),
            (None, Some(aoe_wire::ata::status::DRDY)),
            "flush {cmd:#x}"
        );
        assert!(
            after > before,
            "flush {cmd:#x} answered before any fdatasync ({before} -> {after})"
        );
    }
    drop(lan);
    drop(ffs);
}

/// A store whose sectors 1024..1032 cannot be read (FaultFs, EIO for that page): a READ
/// of them is answered once with an ATA error (UNC), the sectors around it read right, the
/// target keeps serving, and its log names the LBA the initiator asked for.
#[test]
fn a_read_error_in_a_range_is_answered_as_an_ata_error_and_logged_with_its_lba() {
    let store = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let file = backing(store.path(), 4096);
    let original = fs::read(&file).unwrap();
    let ffs = FaultFs::mount(&file).expect("mount the fault file system");
    let faults = ffs.faults();
    faults.fail_reads(Some(1024 * 512..1032 * 512));
    let mut lan = RawLan::start(Target::AoeServe, &ffs.file(), &[], 1);
    for (lba, bad) in [
        (1016u64, false),
        (1024, true),
        (1030, true),
        (1032, false),
        (1024, true),
    ] {
        let r = lan
            .request(
                0,
                RawLan::ata(READ_EXT, false, lba, 2, &[]),
                Duration::from_secs(5),
            )
            .unwrap_or_else(|| panic!("no answer to a read of LBA {lba}{}", lan.logs()));
        let m = aoe_wire::Message::parse(&r).unwrap();
        let aoe_wire::Body::Ata(a) = m.body else {
            panic!("not an ATA reply")
        };
        if bad {
            assert!(
                a.cmd_status & aoe_wire::ata::status::ERR != 0,
                "LBA {lba} read without an error (status {:#x})",
                a.cmd_status
            );
        } else {
            assert_eq!(a.cmd_status & aoe_wire::ata::status::ERR, 0, "LBA {lba}");
            let at = lba as usize * 512;
            assert!(
                a.data[..1024] == original[at..at + 1024],
                "LBA {lba}: wrong data"
            );
        }
    }
    assert!(
        faults
            .reads_failed
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
    );
    assert!(lan.target_alive(), "target exited{}", lan.logs());
    let logged = wait_until(Duration::from_secs(5), || {
        lan.logs().contains("I/O failed at LBA 1024 (2 sectors)")
    });
    assert!(
        logged,
        "the failed read's LBA is not in the log{}",
        lan.logs()
    );
    drop(lan);
    drop(ffs);
}

/// The same bad range read through `aoe initiator` (`ROOT/e7.3`, O_DIRECT, 4 KiB at a
/// time): the bad page is EIO for the reader, the pages on either side read the file's
/// bytes, the device stays up, and the error is not retried (an answered ATA error is final;
/// a frame answered after later ones may be sent again once, a fast retransmit).
#[test]
fn a_read_error_in_a_range_reaches_the_reader_as_eio_and_the_device_stays_up() {
    use std::os::unix::fs::OpenOptionsExt;
    let store = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let file = backing(store.path(), SECTORS as usize);
    let original = fs::read(&file).unwrap();
    let ffs = FaultFs::mount(&file).expect("mount the fault file system");
    let faults = ffs.faults();
    let rig = Rig::start_with(
        Target::AoeServe,
        1500,
        InitOpts::default(),
        Some(ffs.file()),
        &[],
    );
    faults.fail_reads(Some(1024 * 512..1032 * 512));
    // O_DIRECT (0o40000 on Linux x86-64 and arm64): each read goes to the target.
    let dev = fs::OpenOptions::new()
        .read(true)
        .custom_flags(0o40000)
        .open(rig.dev())
        .expect("open the device");
    let mut buf = vec![0u8; 4096];
    for (lba, bad) in [(1016u64, false), (1024, true), (1032, false), (1024, true)] {
        match dev.read_exact_at(&mut buf, lba * 512) {
            Ok(()) if !bad => {
                let at = lba as usize * 512;
                assert!(buf == original[at..at + 4096], "LBA {lba}: wrong data");
            }
            Err(e) if bad => assert_eq!(e.raw_os_error(), Some(5), "LBA {lba}: {e}"),
            r => panic!("LBA {lba}: {r:?}{}", rig.logs()),
        }
    }
    drop(dev);
    assert_eq!(rig.state().as_deref(), Some("up"), "{}", rig.logs());
    let logs = rig.logs();
    // A frame answered after later ones may be sent again once (a fast retransmit, as the
    // workers read out of order); an error must not be retried over and over.
    let resent = logs
        .lines()
        .filter(|l| l.contains(" INFO retransmit e"))
        .count();
    assert!(
        resent <= 8,
        "{resent} retransmissions around a read error{logs}"
    );
    // The read went out as 2-sector frames; the line (one a second) names the first that
    // failed.
    assert!(
        [1024, 1026, 1028, 1030]
            .iter()
            .any(|l| logs.contains(&format!("I/O failed at LBA {l} (2 sectors)"))),
        "the failed LBA is not in the log{logs}"
    );
    rig.finish();
    drop(ffs);
}

// ------------------------------------------------------------------------------------------
// Integrity: a late original of a retransmitted write

/// Where the two writes go: sector 64 (a page of the FUSE file, so each write is one
/// request starting there).
const LATE_LBA: u64 = 64;

/// How long the relay holds W1's first frame: well past the initiator's retransmission
/// timeout (milliseconds on a veth), well within the fence (max(1 s, RTO) from its send).
const LATE_HOLD: Duration = Duration::from_millis(500);

/// W1 to sector [`LATE_LBA`], its first frame held by the relay for [`LATE_HOLD`] so that a
/// retransmitted copy (a fresh tag) completes it; then W2 to the same sectors; then the held
/// original reaches the target and is answered. Returns what the sectors hold after that,
/// read through the initiator and from the backing file, with W1's and W2's data.
fn late_original(kind: Target, fence: bool) -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
    let opts = InitOpts {
        no_write_fence: !fence,
        ..InitOpts::default()
    };
    let r = RelayRig::start(kind, 1500, opts, None, &[], 1, 31);
    let ctl = r.control(0);
    let dev = r.rig.dev();
    let off = LATE_LBA * 512;
    let (w1, w2) = (pattern(310, 4096), pattern(311, 4096));
    ctl.hold_writes(LATE_LBA, 1, LATE_HOLD);
    let t0 = Instant::now();
    write_in_pieces(&dev, off, &w1).unwrap_or_else(|e| panic!("W1: {e}{}", r.rig.logs()));
    let c = ctl.counters();
    assert_eq!(c.held, 1, "W1's first frame not held: {c}");
    assert_eq!(
        c.released,
        0,
        "W1 completed only after its original was let through ({:?}): no copy overtook it",
        t0.elapsed()
    );
    assert!(retransmits(&r.rig) > 0, "W1 completed without a copy");
    write_in_pieces(&dev, off, &w2).unwrap_or_else(|e| panic!("W2: {e}{}", r.rig.logs()));
    let w2_done = t0.elapsed();
    // The original reaches the target and is answered: whatever it did is done.
    assert!(
        wait_until(Duration::from_secs(10), || ctl.counters().held_answered
            >= 1),
        "the held original was never answered: {}",
        ctl.counters()
    );
    let got = read_at(&dev, off, w2.len()).expect("read back");
    let back = file_range(&r.rig.file, off, w2.len());
    eprintln!(
        "late original {kind:?} fence {fence}: W2 done {w2_done:?} after W1 started, \
         held {LATE_HOLD:?}; relay: {}; device has {}, backing file has {}",
        ctl.counters(),
        which(&got, &w1, &w2),
        which(&back, &w1, &w2)
    );
    r.finish();
    (got, back, w1, w2)
}

/// Bytes of W1's first frame, the one the relay holds: two sectors at MTU 1500.
const LATE_FRAME: usize = 1024;

/// W2 with the sectors of W1's held frame put back: what a late original leaves.
fn undone(w1: &[u8], w2: &[u8]) -> Vec<u8> {
    [&w1[..LATE_FRAME], &w2[LATE_FRAME..]].concat()
}

fn which(got: &[u8], w1: &[u8], w2: &[u8]) -> &'static str {
    if got == w2 {
        "W2"
    } else if got == undone(w1, w2) {
        "W2 with its first two sectors W1's again (undone by the late original)"
    } else {
        "neither"
    }
}

fn late_original_never_undoes_a_newer_write(kind: Target) {
    let (got, back, _, w2) = late_original(kind, true);
    assert_same(&back, &w2, "backing file after W1's late original");
    assert_same(&got, &w2, "read after W1's late original");
}

/// The hazard the fence guards against, shown: without it, W2 goes out at once and W1's
/// late original, executed after it, puts W1's data back (an acknowledged write lost).
/// If this ever passes with W2 intact, the test no longer reproduces the hazard and the
/// fenced test above proves nothing.
fn late_original_undoes_a_newer_write_without_the_fence(kind: Target) {
    let (got, back, w1, w2) = late_original(kind, false);
    let want = undone(&w1, &w2);
    assert_same(
        &back,
        &want,
        "backing file without the fence (W1's original last)",
    );
    assert_same(&got, &want, "read without the fence");
}

#[test]
fn late_original_never_undoes_a_newer_write_aoe_serve() {
    late_original_never_undoes_a_newer_write(Target::AoeServe);
}

#[test]
fn late_original_never_undoes_a_newer_write_vblade() {
    late_original_never_undoes_a_newer_write(Target::Vblade);
}

#[test]
fn late_original_undoes_a_newer_write_without_the_fence_aoe_serve() {
    late_original_undoes_a_newer_write_without_the_fence(Target::AoeServe);
}

#[test]
fn late_original_undoes_a_newer_write_without_the_fence_vblade() {
    late_original_undoes_a_newer_write_without_the_fence(Target::Vblade);
}

/// Eleventh audit (docs/TEST-AUDIT.md, the tenth's Left list: no rig had a second initiator
/// behind a relay): two `aoe initiator`s, each in its own namespace behind its own lossy
/// relay (5% loss, 5% duplication, 5% reordering), on one `aoe serve` export through a
/// bridge in the target's namespace. Each writes O_DIRECT chunks of 4-64 KiB, stamped with
/// its name and a counter, at random places of its own half for a few seconds, both at
/// once; each acknowledged write is remembered. Then each initiator reads the *other's*
/// half (O_DIRECT, through its own device file): every sector must hold the other's last
/// acknowledged write, and so must the backing file. The duplicate-write table and the
/// fair share key by source MAC: two real initiators are two sources, under frames the
/// network copies and reorders.
#[test]
fn two_initiators_behind_lossy_relays_read_what_the_other_wrote_aoe_serve() {
    use rand_like::Xorshift;
    use std::os::unix::fs::OpenOptionsExt;
    let half = 8 * MIB;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = dir.path().join("two.img");
    fs::File::create(&file)
        .and_then(|f| f.set_len((2 * half) as u64))
        .expect("backing file");
    // Two relayed paths into one initiator namespace, through a bridge on the target's
    // side; the second path's initiator end is then moved into a namespace of its own, for
    // a second initiator with its own MAC.
    let r = RelayRig::start(
        Target::AoeServe,
        1500,
        InitOpts::default(),
        Some(file.clone()),
        &["-b", "16"],
        2,
        21,
    );
    let (c_if, _) = r.paths[1].clone();
    let c_ns = aoe_testkit::Netns::new("aoe2c").expect("second initiator namespace");
    r.rig
        .init_ns
        .ip(&["link", "set", "dev", &c_if, "netns", c_ns.name()])
        .expect("move the second path's end");
    c_ns.ip(&["link", "set", "dev", &c_if, "up"]).expect("up");
    let c_root = Path::new(ROOTS).join(format!("two-c-{}", std::process::id()));
    fs::create_dir_all(&c_root).unwrap();
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = run(std::process::Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.0));
            let _ = fs::remove_dir(&self.0);
        }
    }
    let _unmount = Unmount(c_root.clone());
    let mut c_init = c_ns
        .spawn({
            let mut cmd = std::process::Command::new(AOE);
            cmd.arg("initiator")
                .arg("--root")
                .arg(&c_root)
                .arg("--iflist")
                .arg(&c_if)
                .env("AOE_LOG", "debug");
            cmd
        })
        .expect("start the second initiator");
    let c_dev = c_root.join(DEV);
    let c_state = c_root.join(format!("sysfs/block/etherd!{DEV}/state"));
    let up = wait_until(Duration::from_secs(20), || {
        if fs::read_to_string(&c_state).is_ok_and(|s| s.starts_with("up")) {
            return true;
        }
        let _ = fs::write(c_root.join("discover"), "");
        std::thread::sleep(Duration::from_millis(300));
        false
    });
    assert!(
        up,
        "the second initiator's {DEV} did not come up:\n{}",
        c_init.output_so_far()
    );
    for p in 0..2 {
        r.control(p).set_faults(Faults::lossy(0.05, 0.05, 0.05));
    }
    let open = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(0o40000) // O_DIRECT
            .open(p)
            .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
    };
    let run_for = Duration::from_secs(6);
    let writers: Vec<_> = [(r.rig.dev(), 1u64, 0usize), (c_dev.clone(), 2, half)]
        .into_iter()
        .map(|(dev, who, base)| {
            let f = open(&dev);
            std::thread::spawn(move || {
                let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15 ^ who);
                let mut last: Vec<(u64, u64)> = vec![(0, 0); half / 512];
                let t0 = Instant::now();
                let mut n = 0u64;
                while t0.elapsed() < run_for {
                    n += 1;
                    let sectors = [8u64, 16, 32, 128][(rng.next() % 4) as usize];
                    let at = rng.next() % (half as u64 / 512 - sectors);
                    let mut data = Vec::with_capacity(sectors as usize * 512);
                    for s in at..at + sectors {
                        data.extend_from_slice(&two_stamp(who, n, s).repeat(32));
                    }
                    f.write_all_at(&data, base as u64 + at * 512)
                        .unwrap_or_else(|e| panic!("initiator {who}: write {n}: {e}"));
                    for s in at..at + sectors {
                        last[s as usize] = (who, n);
                    }
                }
                (n, last)
            })
        })
        .collect();
    let results: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    // Each reads the other's half through its own device, still under the faults.
    for (reader, other, base) in [(&c_dev, 0usize, 0usize), (&r.rig.dev(), 1, half)] {
        let (n, last) = &results[other];
        assert!(*n > 10, "initiator {} wrote only {n} times", other + 1);
        let f = open(reader);
        let mut got = vec![0u8; half];
        f.read_exact_at(&mut got, base as u64)
            .unwrap_or_else(|e| panic!("read of initiator {}'s half: {e}", other + 1));
        let back = fs::read(&file).unwrap()[base..base + half].to_vec();
        let mut wrong = Vec::new();
        for (s, &(who, k)) in last.iter().enumerate() {
            let want = if k == 0 {
                vec![0u8; 512]
            } else {
                two_stamp(who, k, s as u64).repeat(32)
            };
            let at = s * 512;
            if got[at..at + 512] != want[..] || back[at..at + 512] != want[..] {
                wrong.push(s);
            }
        }
        assert!(
            wrong.is_empty(),
            "initiator {}'s half ({n} acknowledged writes): {} sectors not its last \
             acknowledged write, read by the other initiator or in the file, first {:?}; relays \
             {:?} / {:?}",
            other + 1,
            wrong.len(),
            &wrong[..wrong.len().min(8)],
            r.control(0).counters(),
            r.control(1).counters()
        );
    }
    eprintln!(
        "FIGURES two initiators: {} and {} acknowledged writes; relays {:?} / {:?}",
        results[0].0,
        results[1].0,
        r.control(0).counters(),
        r.control(1).counters()
    );
    for p in 0..2 {
        let c = r.control(p).counters();
        assert!(
            c.lost > 0 && c.duplicated > 0 && c.reordered > 0,
            "relay {p} did not lose, duplicate and reorder: {c:?}"
        );
    }
    for p in 0..2 {
        r.control(p).set_faults(Faults::default());
    }
    let status = c_init
        .stop_within(Duration::from_secs(30))
        .expect("stop the second initiator");
    assert!(status.success(), "second initiator: {status}");
    r.finish();
}

/// Sector `s` written by initiator `who` in its write `n`: 16 bytes, repeated.
fn two_stamp(who: u64, n: u64, s: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&s.to_le_bytes());
    b[8..].copy_from_slice(&((who << 48) | n).to_le_bytes());
    b
}

mod rand_like {
    /// A small xorshift generator (no dependency for a test's offsets).
    pub struct Xorshift(pub u64);
    impl Xorshift {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }
}
