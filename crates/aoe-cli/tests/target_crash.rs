//! Crash test of `aoe serve` (issue 9): the target is SIGKILLed in the middle of a stream of
//! writes and flushes, restarted, and every write acknowledged before a FLUSH CACHE EXT that
//! completed must be in the export, read back through AoE and in the backing file itself.
//!
//! What it checks, precisely: SIGKILL ends the process but does not drop the page cache, so
//! this proves that nothing acknowledged lives only in the process (a write answered before
//! its `pwrite`, a FLUSH answered before the writes it covers reached the file); it does not
//! prove that `fdatasync` reached the disk, which only a power cut would show.
//!
//! How: a raw AoE client (`aoe_testkit::aoeclient`) in a second namespace, so the test knows
//! exactly which request was acknowledged. Per seed (deterministic operation sequence from the
//! seed; only the timing varies): WRITE SECTORS EXT of 1-2 sectors (what one frame carries at
//! MTU 1500) at random LBAs, each sector stamped with its LBA and a generation number, with
//! 16 requests outstanding (within the buffer count `aoe serve` advertises, which bounds the
//! Linux driver's window too), FLUSH CACHE EXT at random points, and a SIGKILL after a random
//! number of acknowledged writes, right after the window was filled, so requests are in
//! flight (sent and not answered, as the client sees it).
//!
//! Per sector the test tracks which generations are acceptable after the crash: the last
//! write acknowledged before a completed FLUSH ("durable"), and any write to that sector sent
//! after it (acknowledged or merely in flight at the kill: either may or may not have landed);
//! with no durable write, the initial zeros or any write sent. A write is never sent while an
//! earlier write to an overlapping sector is outstanding: the target runs requests on a worker
//! pool, so ATA gives no order between two outstanding writes and the test must not assume
//! one. A write the client retransmitted may land late, so it stays acceptable too.
//!
//! Modes: buffered, `-s` (O_SYNC), and `-d` (O_DIRECT) with the default worker pool (the
//! O_DIRECT path once lost acknowledged writes even without a crash, through an unlocked
//! read-modify-write of 4 KiB blocks; `store_integrity.rs` pins that).

mod stamped;
use stamped::{generation, stamp, Net, Rng, MTU};

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use aoe_testkit::aoeclient::{AoeClient, Request};
use aoe_testkit::NsChild;
use aoe_wire::{max_sectors_for_mtu, TargetAddr, SECTOR_SIZE};

/// Export size: small, so that sectors are written many times over.
const SECTORS: u64 = 4096;
const SEEDS: u64 = 20;
const WINDOW: usize = 16;
const ADDR: TargetAddr = TargetAddr::new(1, 1);
const MAGIC: &[u8; 8] = b"AOECRASH";

#[derive(Clone, Copy)]
enum Op {
    Write { lba: u64, count: u64, gen: u64 },
    Flush,
}

/// What the client knows about each sector.
struct Ledger {
    /// Generations sent to the sector, in order.
    sent: Vec<Vec<u64>>,
    /// The last acknowledged generation.
    acked: Vec<Option<u64>>,
    /// The last generation acknowledged before a FLUSH that completed.
    durable: Vec<Option<u64>>,
    /// A write covering the sector is outstanding.
    busy: Vec<bool>,
    /// Generations whose write was retransmitted (may land late).
    late: Vec<Vec<u64>>,
}

impl Ledger {
    fn new() -> Ledger {
        let n = SECTORS as usize;
        Ledger {
            sent: vec![Vec::new(); n],
            acked: vec![None; n],
            durable: vec![None; n],
            busy: vec![false; n],
            late: vec![Vec::new(); n],
        }
    }

    /// Generations sector `s` may hold after the crash.
    fn acceptable(&self, s: usize) -> Vec<u64> {
        stamped::acceptable(self.durable[s], &self.sent[s], &self.late[s])
    }
}

/// Figures of one run.
#[derive(Default)]
struct Figures {
    writes_sent: u64,
    writes_acked: u64,
    flushes_sent: u64,
    flushes_done: u64,
    in_flight_at_kill: usize,
    writes_in_flight_at_kill: usize,
    durable_sectors: usize,
    retransmits: u64,
}

/// SIGKILL, as a crash would end the process (no destructors, no flush, nothing answered).
fn kill9(child: &mut NsChild) {
    let ok = Command::new("kill")
        .args(["-KILL", &child.pid().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -KILL {} failed", child.pid());
    let status = child.wait_timeout(Duration::from_secs(5)).unwrap();
    assert!(status.is_some(), "aoe serve survived SIGKILL");
}

/// One seeded run: write, flush, SIGKILL mid-stream, restart, check.
fn crash_run(net: &Net, flags: &[&str], dir: &Path, seed: u64) -> Figures {
    let file = dir.join(format!("crash-{seed}.img"));
    std::fs::File::create(&file)
        .unwrap()
        .set_len(SECTORS * SECTOR_SIZE as u64)
        .unwrap();
    let mut target = net.serve(flags, &file);
    let mut client = AoeClient::open(&net.i, net.veth.b_name(), ADDR).unwrap();
    client.set_window(WINDOW);
    let found = client.discover(Duration::from_secs(10));
    assert!(
        found.is_ok(),
        "seed {seed}: aoe serve {flags:?} never answered Query Config: {}",
        target.output_so_far()
    );
    let per_frame = u64::from(max_sectors_for_mtu(MTU)).min(2);
    let discover_retransmits = client.retransmits();

    let mut rng = Rng(seed.wrapping_mul(0x5851_f42d_4c95_7f2d) ^ 0xc0ffee);
    let kill_after = 100 + rng.below(1400);
    let mut ledger = Ledger::new();
    let mut fig = Figures::default();
    let mut ops: HashMap<u32, Op> = HashMap::new();
    let mut write_tags: HashMap<u32, Op> = HashMap::new();
    let mut next_gen = 1u64;
    // The next operation, drawn before it can be sent, so the sequence depends on the seed
    // alone and not on when replies happen to arrive.
    let mut draw = |rng: &mut Rng| -> Op {
        if rng.below(24) == 0 {
            return Op::Flush;
        }
        let count = 1 + rng.below(per_frame);
        let lba = rng.below(SECTORS - count + 1);
        let gen = next_gen;
        next_gen += 1;
        Op::Write { lba, count, gen }
    };
    let mut next = draw(&mut rng);
    let started = Instant::now();
    loop {
        while client.can_send() {
            let req = match next {
                Op::Flush => {
                    fig.flushes_sent += 1;
                    Request::Flush
                }
                Op::Write { lba, count, gen } => {
                    let range = lba as usize..(lba + count) as usize;
                    if ledger.busy[range.clone()].iter().any(|b| *b) {
                        break;
                    }
                    for s in range {
                        ledger.busy[s] = true;
                        ledger.sent[s].push(gen);
                    }
                    fig.writes_sent += 1;
                    let data = (lba..lba + count)
                        .flat_map(|s| stamp(MAGIC, s, gen))
                        .collect();
                    Request::Write { lba, data }
                }
            };
            let tag = client.send(&req).unwrap();
            ops.insert(tag.0, next);
            if let Op::Write { .. } = next {
                write_tags.insert(tag.0, next);
            }
            next = draw(&mut rng);
        }
        if fig.writes_acked >= kill_after {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "seed {seed}: only {} of {kill_after} writes acknowledged in 30 s",
            fig.writes_acked
        );
        for r in client.poll(Duration::from_secs(5)).unwrap() {
            let Some(op) = ops.remove(&r.tag.0) else {
                continue;
            };
            assert!(
                r.is_ok(),
                "seed {seed}: {r:?} failed: {}",
                target.output_so_far()
            );
            match op {
                Op::Write { lba, count, gen } => {
                    for s in lba as usize..(lba + count) as usize {
                        ledger.busy[s] = false;
                        ledger.acked[s] = Some(gen);
                    }
                    fig.writes_acked += 1;
                }
                Op::Flush => {
                    ledger.durable.clone_from(&ledger.acked);
                    fig.flushes_done += 1;
                }
            }
        }
    }
    // Mid-stream: the window was just filled, so requests are outstanding.
    kill9(&mut target);
    let abandoned = client.abandon();
    fig.in_flight_at_kill = abandoned.len();
    fig.writes_in_flight_at_kill = abandoned
        .iter()
        .filter(|t| matches!(ops.get(&t.0), Some(Op::Write { .. })))
        .count();
    fig.retransmits = client.retransmits() - discover_retransmits;
    for t in client.retransmitted() {
        if let Some(Op::Write { lba, count, gen }) = write_tags.get(&t.0) {
            for s in *lba as usize..(lba + count) as usize {
                ledger.late[s].push(*gen);
            }
        }
    }
    fig.durable_sectors = ledger.durable.iter().filter(|d| d.is_some()).count();
    drop(target);

    // Restart on the same file and read the whole export back through AoE.
    let target = net.serve(flags, &file);
    let found = client.discover(Duration::from_secs(10));
    assert!(
        found.is_ok(),
        "seed {seed}: restarted aoe serve never answered: {}",
        target.output_so_far()
    );
    let reads: Vec<Request> = (0..SECTORS)
        .step_by(per_frame as usize)
        .map(|lba| Request::Read {
            lba,
            count: per_frame as u8,
        })
        .collect();
    let replies = client.run(&reads, Duration::from_secs(30)).unwrap();
    let mut image = Vec::with_capacity(SECTORS as usize * SECTOR_SIZE);
    for r in &replies {
        assert!(r.is_ok(), "seed {seed}: read back failed: {r:?}");
        image.extend_from_slice(r.data());
    }
    assert_eq!(image.len(), SECTORS as usize * SECTOR_SIZE, "seed {seed}");
    let on_file = std::fs::read(&file).unwrap();
    assert!(
        on_file == image,
        "seed {seed}: the backing file differs from what AoE reads back"
    );

    let mut bad = Vec::new();
    for (s, sector) in image.chunks_exact(SECTOR_SIZE).enumerate() {
        let ok = ledger.acceptable(s);
        match generation(MAGIC, sector, s as u64) {
            Ok(g) if ok.contains(&g) => {}
            found => bad.push(format!(
                "sector {s}: found {found:?}, durable generation {:?}, acceptable {ok:?}",
                ledger.durable[s]
            )),
        }
    }
    assert!(
        bad.is_empty(),
        "seed {seed}, aoe serve {flags:?}: {} sectors lost acknowledged and flushed writes \
         ({} writes acked, {} flushes done, {} requests in flight at the kill):\n{}",
        bad.len(),
        fig.writes_acked,
        fig.flushes_done,
        fig.in_flight_at_kill,
        bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
    drop(target);
    std::fs::remove_file(&file).unwrap();
    fig
}

fn crash_test(prefix: &str, flags: &[&str], dir: &Path) {
    let net = Net::new(prefix);
    let started = Instant::now();
    for seed in 1..=SEEDS {
        let t = Instant::now();
        let f = crash_run(&net, flags, dir, seed);
        println!(
            "aoe serve {flags:?} seed {seed:2}: {} writes sent, {} acked, {}/{} flushes done, \
             {} requests in flight at kill ({} writes), {} sectors durable, {} retransmits, \
             {} ms",
            f.writes_sent,
            f.writes_acked,
            f.flushes_done,
            f.flushes_sent,
            f.in_flight_at_kill,
            f.writes_in_flight_at_kill,
            f.durable_sectors,
            f.retransmits,
            t.elapsed().as_millis()
        );
        assert!(f.flushes_done > 0 && f.in_flight_at_kill > 0, "seed {seed}");
    }
    println!(
        "aoe serve {flags:?}: {SEEDS} runs in {:?}",
        started.elapsed()
    );
}

#[test]
fn crash_buffered() {
    let dir = tempfile::tempdir().unwrap();
    crash_test("crb", &[], dir.path());
}

#[test]
fn crash_sync() {
    let dir = tempfile::tempdir().unwrap();
    crash_test("crs", &["-s"], dir.path());
}

/// `-d` with the default worker pool. O_DIRECT needs a file system that supports it: the
/// file goes under Cargo's target/tmp rather than the system temporary directory, which may
/// be tmpfs.
#[test]
fn crash_direct() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    crash_test("crd", &["-d"], dir.path());
}
