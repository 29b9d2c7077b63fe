//! Loss recovery (issue 14, `docs/PROTOCOL.md` 4 "Loss recovery"): the retransmission timeout
//! follows the measured RTT and the spread of the target's answer times, a retransmitted
//! frame gives no RTT sample (Karn), a frame is resent once later frames are answered and
//! the reordering window passed (RACK), a copy found spurious undoes its window cut
//! (Eifel, F-RTO), and random loss does not shrink the window (a timeout halves it, never
//! below the floor). The driver, whose
//! behaviour the engine had before, waits at least 50 ms (here; 100 ms ticks in the driver)
//! for any lost frame and sets the window to 1 on every timeout.

use super::*;

/// The window floor (`Config::min_window`'s default), written out so this file also
/// builds against an engine without that setting.
const FLOOR: u16 = 8;

fn up_engine(sectors: u64, lba48: bool) -> (Engine, Instant) {
    up_engine_with(Config::default(), sectors, lba48)
}

fn tag_of(frame: &[u8]) -> u32 {
    u32::from_be_bytes(frame[20..24].try_into().unwrap())
}

/// Frames sent after `lba`'s first frame but answered before it: once three are answered
/// and the reordering window has passed (RACK, RFC 8985), the frame goes out again with a
/// fresh tag, long before its retransmission timeout; a fourth answer does not send it a
/// second time (the copy counts afresh from its own send).
#[test]
fn later_answers_resend_a_frame_before_its_timeout() {
    let (mut e, t0) = up_engine(1000, true);
    // 10 sectors, payload 2: five frames, all within the window of 8.
    e.submit(
        t0,
        DEV,
        BlockOp::Read {
            lba: 0,
            sectors: 10,
        },
    )
    .unwrap();
    let tx = drain(&mut e, t0);
    assert_eq!(tx.len(), 5);
    assert_eq!(req_lba(&tx[0].1), 0);
    let deadline = e.poll_timeout().unwrap();
    let now = t0 + Duration::from_micros(100);
    assert!(now < deadline);
    for f in &tx[1..4] {
        e.handle_frame(now, 0, &ata_rsp(&f.1, TMAC, status::DRDY, 0, &[5; 1024]));
    }
    // At once if RACK's reordering window (a quarter of the shortest RTT seen) has passed,
    // else when the reordering timer runs, which is well before the RTO.
    let mut again = drain(&mut e, now);
    let now = if again.is_empty() {
        let at = e.poll_timeout().unwrap();
        assert!(at < deadline, "reordering timer {at:?}, RTO {deadline:?}");
        e.handle_timeout(at);
        again = drain(&mut e, at);
        at
    } else {
        now
    };
    assert_eq!(again.len(), 1, "frame 0 resent after three later answers");
    assert_eq!(req_lba(&again[0].1), 0);
    assert_eq!(&again[0].1[24..], &tx[0].1[24..], "same request");
    assert_ne!(tag_of(&again[0].1), tag_of(&tx[0].1), "fresh tag");
    let d = e.device(DEV).unwrap();
    assert_eq!(d.stats.retransmits, 1);
    // A fourth later answer: no second copy.
    e.handle_frame(
        now,
        0,
        &ata_rsp(&tx[4].1, TMAC, status::DRDY, 0, &[5; 1024]),
    );
    assert!(drain(&mut e, now).is_empty());
    // The copy's answer completes the read; the original's late one is ignored.
    e.handle_frame(
        now,
        0,
        &ata_rsp(&again[0].1, TMAC, status::DRDY, 0, &[6; 1024]),
    );
    e.handle_frame(
        now,
        0,
        &ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, &[7; 1024]),
    );
    let done = completions(&mut e);
    let mut want = vec![6u8; 1024];
    want.extend([5u8; 4 * 1024]);
    assert_eq!(done, vec![Ok(Some(want))]);
}

/// Karn's rule: the answer to a retransmitted frame leaves the RTT estimate alone, however
/// long it took.
#[test]
fn retransmitted_frame_gives_no_rtt_sample() {
    let (mut e, t0) = up_engine(1000, true);
    e.submit(t0, DEV, BlockOp::Read { lba: 0, sectors: 1 })
        .unwrap();
    let tx = drain(&mut e, t0);
    let deadline = e.poll_timeout().unwrap();
    e.handle_timeout(deadline);
    let tx2 = drain(&mut e, deadline);
    let copy = &tx2.iter().find(|(_, f)| req_lba(f) == 0).unwrap().1;
    assert_ne!(tag_of(copy), tag_of(&tx[0].1));
    let before = e.device(DEV).unwrap().targets[0].clone();
    let late = deadline + Duration::from_micros(300);
    e.handle_frame(late, 0, &ata_rsp(copy, TMAC, status::DRDY, 0, &[1; 512]));
    let after = e.device(DEV).unwrap().targets[0].clone();
    assert_eq!(after.answers, before.answers + 1);
    assert_eq!(
        (after.rtt_avg, after.rtt_dev),
        (before.rtt_avg, before.rtt_dev),
        "a retransmitted frame was sampled"
    );
}

/// The timeout follows the measured RTT: after answers that took 150 µs it is under a
/// millisecond (the driver's floor is a 100 ms timer tick), and a slow target raises it.
#[test]
fn retransmission_timeout_follows_the_rtt() {
    let (mut e, t0) = up_engine(100_000, true);
    let now = reads_answered_after(&mut e, t0, Duration::from_micros(150));
    let rto = e.device(DEV).unwrap().targets[0].rto;
    assert!(
        rto < Duration::from_millis(1),
        "rto {rto:?} on a 150 µs RTT"
    );
    reads_answered_after(&mut e, now, Duration::from_millis(20));
    let rto = e.device(DEV).unwrap().targets[0].rto;
    assert!(
        rto >= Duration::from_millis(20),
        "rto {rto:?} on a 20 ms RTT"
    );
}

/// Forty one-sector reads, one at a time, each answered `rtt` after it was sent; returns
/// the time of the last answer.
fn reads_answered_after(e: &mut Engine, mut now: Instant, rtt: Duration) -> Instant {
    for i in 0..40 {
        e.submit(now, DEV, BlockOp::Read { lba: i, sectors: 1 })
            .unwrap();
        let tx = drain(e, now);
        now += rtt;
        e.handle_frame(now, 0, &ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, &[0; 512]));
        events(e);
    }
    now
}

/// A pass of the caller's loop delayed far beyond the RTO (its thread descheduled for 5 ms
/// on a busy host, at a 150 µs RTT): the answers that arrived meanwhile, handed over before
/// the timers run (as `aoe-initiator`'s loop takes a ring's waiting answers before a due
/// timer), leave nothing to retransmit and the window uncut. The contract the loop keeps;
/// the engine needs no clock of its own for it.
#[test]
fn a_delayed_pass_answers_before_its_timers_run() {
    let (mut e, t0) = up_engine(100_000, true);
    let now = reads_answered_after(&mut e, t0, Duration::from_micros(150));
    let before = e.device(DEV).unwrap().clone();
    e.submit(
        now,
        DEV,
        BlockOp::Read {
            lba: 0,
            sectors: 64,
        },
    )
    .unwrap();
    let tx = drain(&mut e, now);
    assert!(tx.len() > 1);
    assert!(
        e.poll_timeout().unwrap() < now + ms(5),
        "the timer is not shorter than the delay"
    );
    let late = now + ms(5);
    let mut tx = tx;
    let mut lbas = Vec::new();
    while !tx.is_empty() {
        for (_, f) in &tx {
            let Body::Ata(a) = Message::parse(f).unwrap().body else {
                panic!("not ATA")
            };
            lbas.push(a.lba);
            let data = vec![0u8; usize::from(a.sector_count) * 512];
            e.handle_frame(late, 0, &ata_rsp(f, TMAC, status::DRDY, 0, &data));
        }
        e.handle_timeout(late);
        tx = drain(&mut e, late);
    }
    let n = lbas.len();
    lbas.sort_unstable();
    lbas.dedup();
    assert_eq!(lbas.len(), n, "a frame went out twice");
    let after = e.device(DEV).unwrap();
    assert_eq!(after.stats.retransmits, before.stats.retransmits);
    assert_eq!(after.targets[0].window_cuts, before.targets[0].window_cuts);
    assert_eq!(after.targets[0].retransmits, before.targets[0].retransmits);
    assert!(completions(&mut e).iter().all(|r| r.is_ok()));
}

/// A link that keeps frames in order, as a veth or a switch does (the simulated link draws
/// each frame's delay at random, so any jitter reorders frames sent together).
fn link(loss_pct: f64, dup_pct: f64) -> LinkCfg {
    LinkCfg {
        loss_pct,
        dup_pct,
        delay_min: Duration::from_micros(70),
        delay_max: Duration::from_micros(70),
    }
}

/// Takes the requests of `inflight` (id to LBA) that have completed out of it and out of
/// `sim.completions`: each one's id, LBA and result.
fn take_done(
    sim: &mut Sim,
    inflight: &mut BTreeMap<IoId, u64>,
) -> Vec<(IoId, u64, crate::sim::IoResult)> {
    let done: Vec<IoId> = inflight
        .keys()
        .filter(|id| sim.completions.contains_key(id))
        .copied()
        .collect();
    done.into_iter()
        .map(|id| {
            let lba = inflight.remove(&id).unwrap();
            let (_, r) = sim.completions.remove(&id).unwrap();
            (id, lba, r)
        })
        .collect()
}

/// What [`stream`] measured.
struct Streamed {
    took: Duration,
    min_window: u16,
    info: DeviceInfo,
}

/// What `aoe initiator` does for `dd` through its device file: 2 MiB written and read back
/// in 128 KiB operations, four in flight, every byte checked in the read and on the disk.
fn stream(seed: u64, link: LinkCfg, mtu: u32, cfg: Config) -> Streamed {
    const SECTORS: u64 = 4096;
    const OP: u64 = 256;
    const DEPTH: usize = 4;
    let mut sim = Sim::new(seed, link, cfg, &[mtu]);
    let mut s = spec(DEV, SECTORS, 16, vec![(TMAC, mtu, 0)]);
    s.io_delay = Duration::from_micros(20);
    sim.add_target(s);
    bring_up(&mut sim, DEV);
    let mut data = vec![0u8; SECTORS as usize * 512];
    sim.rng.fill(&mut data);
    let start = sim.now;
    let limit = start + Duration::from_secs(600);
    let mut min_window = u16::MAX;
    for write in [true, false] {
        let mut next = 0u64;
        let mut inflight: BTreeMap<IoId, u64> = BTreeMap::new();
        while next < SECTORS || !inflight.is_empty() {
            while inflight.len() < DEPTH && next < SECTORS {
                let range = next as usize * 512..(next + OP) as usize * 512;
                let op = if write {
                    BlockOp::Write {
                        lba: next,
                        data: data[range].to_vec(),
                    }
                } else {
                    BlockOp::Read {
                        lba: next,
                        sectors: OP as u32,
                    }
                };
                inflight.insert(sim.submit(DEV, op).expect("submit"), next);
                next += OP;
            }
            assert!(sim.step(limit), "stuck at {:?}", sim.now - start);
            min_window = min_window.min(sim.init.devices[&DEV].targets[0].maxout);
            for (id, lba, r) in take_done(&mut sim, &mut inflight) {
                let r = r.unwrap_or_else(|e| panic!("{id} at {lba} failed: {e}"));
                if let Some(got) = r {
                    let range = lba as usize * 512..(lba + OP) as usize * 512;
                    assert!(got == data[range], "read at {lba}: wrong data");
                }
            }
        }
    }
    assert!(*sim.targets[0].disk.borrow() == data, "disk differs");
    Streamed {
        took: sim.now - start,
        min_window,
        info: sim.device(DEV),
    }
}

/// Issue 14's goal in simulated time, with the default configuration: under 5% loss and
/// 1% duplication a streaming transfer keeps at least half of its loss-free rate, at MTU
/// 1500 and 9000, and random loss never pushes the window below the floor. (With the
/// driver's recovery, a 50 ms timeout floor and a window of 1 after every timeout, it is
/// some 30 times slower; with the former default, a 20 ms floor and fast retransmission
/// only after 1.25 smoothed RTTs, it fell short at MTU 9000.)
#[test]
fn sim_five_percent_loss_keeps_half_the_rate() {
    for mtu in [1500u32, 9000] {
        for seed in [1u64, 2] {
            let clean = stream(seed, link(0.0, 0.0), mtu, Config::default());
            let lossy = stream(seed, link(5.0, 1.0), mtu, Config::default());
            let t = &lossy.info.targets[0];
            eprintln!(
                "mtu {mtu} seed {seed}: clean {:?}, lossy {:?} ({:.0}%), min window {}, \
                 retransmits {}; {t:?}",
                clean.took,
                lossy.took,
                100.0 * clean.took.as_secs_f64() / lossy.took.as_secs_f64(),
                lossy.min_window,
                lossy.info.stats.retransmits,
            );
            assert_eq!(
                clean.info.stats.retransmits, 0,
                "{:?}",
                clean.info.targets[0]
            );
            assert!(lossy.info.stats.retransmits > 0, "no loss injected");
            assert!(
                lossy.min_window >= FLOOR,
                "mtu {mtu} seed {seed}: window fell to {} (floor {FLOOR})",
                lossy.min_window
            );
            assert!(
                lossy.took <= 2 * clean.took,
                "mtu {mtu} seed {seed}: {:?} under loss, {:?} without: less than half the rate",
                lossy.took,
                clean.took
            );
        }
    }
}

/// A frame resent because its answer was only slow: the original's answer completes it
/// (the driver would wait for the copy's, queued behind the original at the target), gives
/// an RTT sample of the original (the timeout was too short, so it rises), and the copy's
/// answer is then ignored as late.
#[test]
fn answer_to_an_earlier_copy_completes_the_frame_and_raises_the_timeout() {
    let (mut e, t0) = up_engine(1000, true);
    e.submit(t0, DEV, BlockOp::Read { lba: 0, sectors: 1 })
        .unwrap();
    let tx = drain(&mut e, t0);
    let deadline = e.poll_timeout().unwrap();
    e.handle_timeout(deadline);
    let copy = drain(&mut e, deadline)
        .into_iter()
        .find(|(_, f)| req_lba(f) == 0)
        .unwrap()
        .1;
    let rto_before = e.device(DEV).unwrap().targets[0].rto;
    let late = t0 + Duration::from_millis(5);
    e.handle_frame(
        late,
        0,
        &ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, &[3; 512]),
    );
    let done = completions(&mut e);
    assert_eq!(done, vec![Ok(Some(vec![3; 512]))]);
    let t = e.device(DEV).unwrap().targets[0].clone();
    assert_eq!(
        t.nout, 1,
        "the copy, maybe still queued at the target, keeps its slot"
    );
    assert!(t.rto > rto_before, "{:?} -> {:?}", rto_before, t.rto);
    e.handle_frame(late, 0, &ata_rsp(&copy, TMAC, status::DRDY, 0, &[4; 512]));
    assert!(events(&mut e)
        .iter()
        .all(|e| !matches!(e, Event::Completed { .. })));
    let d = e.device(DEV).unwrap();
    assert_eq!(d.stats.unexpected_responses, 1);
    assert_eq!(d.targets[0].nout, 0, "the copy's own answer frees its slot");
}

/// A write is not completed on an earlier copy's answer: it waits for its latest copy's,
/// so no copy of it can still be queued at the target when a newer write to the same
/// sectors goes out.
#[test]
fn write_waits_for_its_latest_copy() {
    let (mut e, t0) = up_engine(1000, true);
    e.submit(
        t0,
        DEV,
        BlockOp::Write {
            lba: 0,
            data: vec![9; 512],
        },
    )
    .unwrap();
    let tx = drain(&mut e, t0);
    let deadline = e.poll_timeout().unwrap();
    e.handle_timeout(deadline);
    let copy = drain(&mut e, deadline)
        .into_iter()
        .find(|(_, f)| req_lba(f) == 0)
        .unwrap()
        .1;
    let late = t0 + Duration::from_millis(5);
    e.handle_frame(late, 0, &ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, &[]));
    assert!(events(&mut e)
        .iter()
        .all(|e| !matches!(e, Event::Completed { .. })));
    e.handle_frame(late, 0, &ata_rsp(&copy, TMAC, status::DRDY, 0, &[]));
    assert!(events(&mut e).iter().any(|e| matches!(
        e,
        Event::Completed {
            result: Ok(None),
            ..
        }
    )));
}

/// Random I/O against a target that serves one request at a time (`service` each) and stalls
/// now and then for 2-6 ms (a daemon starved of CPU on a loaded host), with the
/// default configuration, so frames only queued at the target time out. Returns the simulation once
/// `ops` operations completed and every read was checked.
fn stalling_target_run(seed: u64, link: LinkCfg, ops: u64, service: Duration) -> Sim {
    let mut sim = Sim::new(seed, link, Config::default(), &[1500]);
    let t = sim.add_target(spec(DEV, 4096, 16, vec![(TMAC, 1500, 0)]));
    sim.targets[t].service = service;
    bring_up(&mut sim, DEV);
    let mut w = Workload::new(DEV, 4096, 64, 8);
    let limit = sim.now + Duration::from_secs(600);
    let mut budget = ops;
    let mut next_stall = sim.now + ms(10);
    loop {
        w.reap(&mut sim);
        w.fill(&mut sim, &mut budget);
        if budget == 0 && w.idle() {
            break;
        }
        if sim.now >= next_stall {
            let d = sim.rng.duration(ms(2), ms(6));
            sim.stall_target(t, d);
            next_stall = sim.now + ms(15);
        }
        assert!(sim.step(limit), "stuck at {:?}", sim.now - sim.base);
        slots_accounted(&sim);
    }
    sim
}

/// Every target's `nout` is exactly the copies that may be at it: frames whose latest copy
/// went there and copies held there (`Engine::held`). A slot taken and never given back,
/// or given back twice, breaks it.
fn slots_accounted(sim: &Sim) {
    let e = &sim.init;
    for d in e.devices.values() {
        for t in &d.targets {
            let current = e
                .outstanding
                .values()
                .filter(|f| f.dev == d.addr && f.target == t.mac && f.waiting.is_none())
                .count();
            let held = e
                .held
                .values()
                .filter(|h| h.dev == d.addr && h.target == t.mac)
                .count();
            assert_eq!(
                t.nout as usize,
                current + held,
                "{} target {}: nout {} but {current} frames and {held} held copies",
                d.addr,
                t.mac,
                t.nout
            );
        }
    }
}

/// Every copy a target may still hold counts against its window, and a copy sent on a
/// timeout waits for a free slot instead of going out past the window: against a target
/// that drops requests beyond its buffer count (as `aoe serve` does) and stalls for longer
/// than the timeout, on a loss-free link, frames time out and are copied, yet the target
/// never drops one, and no slot is left taken once the copies are answered or presumed
/// lost. (Before: a copy took its original's slot while the original was still queued,
/// the target dropped what went over its count, and each drop was another timeout.)
#[test]
fn copies_never_put_a_stalled_target_over_its_buffer_count() {
    for seed in [1u64, 2, 3, 4] {
        let mut sim = stalling_target_run(seed, link(0.0, 0.0), 300, Duration::from_micros(30));
        let d = sim.device(DEV);
        let st = sim.targets[0].eng.stats();
        eprintln!(
            "seed {seed}: retransmits {}, target dropped {} (over its buffer count {}); {:?}",
            d.stats.retransmits, st.dropped, st.over_buffer_count, d.targets[0]
        );
        // Timeouts fired (each counted on the target) ...
        assert!(
            d.targets[0].retransmits > 0,
            "seed {seed}: no timeout provoked"
        );
        assert_eq!(
            st.over_buffer_count, 0,
            "seed {seed}: {} requests over the target's buffer count",
            st.over_buffer_count
        );
        sim.run_for(Duration::from_secs(30));
        assert_eq!(
            sim.device(DEV).targets[0].nout,
            0,
            "seed {seed}: slots leaked"
        );
    }
}

/// No window slot leaks, whatever ends a copy (its answer, another copy's, its presumed
/// loss, a path dying): a lossy, duplicating, reordering link, two targets for one device
/// (one serving serially, so copies move between them and some wait for a slot), then one
/// path cut. Every target's `nout` counts exactly the copies that may be at it; once the
/// work is done and the last copies are presumed lost, only a probe of a tainted target
/// may hold a slot; neither target ever went over its buffer count.
#[test]
fn copies_leak_no_window_slot_under_loss_and_multipath_failover() {
    for seed in [31u64, 32, 33] {
        let cfg = Config {
            deadsecs: Duration::from_secs(60),
            ..Config::default()
        };
        let mut sim = Sim::new(seed, LinkCfg::lossy(5.0, 2.0), cfg, &[1500, 1500]);
        let a = sim.add_target(spec(DEV, 2048, 8, vec![(TMAC, 1500, 0)]));
        let disk: Disk = sim.targets[a].disk.clone();
        let b = sim.add_target(TargetSpec {
            disk: Some(disk),
            ..spec(DEV, 2048, 8, vec![(TMAC2, 1500, 1)])
        });
        sim.targets[b].service = Duration::from_micros(100);
        bring_up(&mut sim, DEV);
        assert!(
            sim.run_until(Duration::from_secs(60), |s| s.device(DEV).targets.len()
                == 2),
            "seed {seed}: second target not found"
        );
        let mut w = Workload::new(DEV, 2048, 32, 12);
        let idle = |sim: &mut Sim, what: &str| {
            slots_accounted(sim);
            sim.run_for(Duration::from_secs(30));
            slots_accounted(sim);
            let d = sim.device(DEV);
            assert!(d.stats.retransmits > 0, "seed {seed}: no loss injected");
            for t in &d.targets {
                // A tainted target may have its probe out (or held), nothing else.
                let probes = if t.taint > 0 { 1 } else { 0 };
                assert!(
                    t.nout <= probes,
                    "seed {seed} {what}: leaked window slots: {t:?}"
                );
            }
            for t in &sim.targets {
                assert_eq!(t.eng.stats().over_buffer_count, 0, "seed {seed} {what}");
            }
        };
        w.run(&mut sim, 150, Duration::from_secs(600));
        idle(&mut sim, "both paths");
        sim.seg_up[1] = false;
        w.run(&mut sim, 100, Duration::from_secs(600));
        idle(&mut sim, "one path");
    }
}

/// Random I/O against a target that loses nothing but answers slowly, as `set` makes it:
/// `warmup` operations, then `ops` more, every read checked. Returns the copies sent during
/// the warm-up, and the device at the end.
fn slow_target_run(
    seed: u64,
    set: impl FnOnce(&mut crate::sim::SimTarget),
    warmup: u64,
    ops: u64,
) -> (u64, DeviceInfo) {
    let mut sim = Sim::new(seed, link(0.0, 0.0), Config::default(), &[1500]);
    let t = sim.add_target(spec(DEV, 4096, 16, vec![(TMAC, 1500, 0)]));
    set(&mut sim.targets[t]);
    bring_up(&mut sim, DEV);
    let mut w = Workload::new(DEV, 4096, 64, 8);
    w.run(&mut sim, warmup, Duration::from_secs(600));
    let early = sim.device(DEV).stats.retransmits;
    w.run(&mut sim, ops, Duration::from_secs(600));
    assert_eq!(w.done, warmup + ops);
    assert!(
        *sim.targets[t].disk.borrow() == w.shadow,
        "seed {seed}: disk diverged"
    );
    (early, sim.device(DEV))
}

/// A target whose disk answers anywhere between 0 and 4 ms, on a link that loses nothing,
/// with the default configuration: once its first answers have shown how they spread (the
/// first 40 operations, during which slow answers overtaken by fast ones are copied), at
/// most a few copies in the next 400 operations (0, 0, 1 and 0 for these seeds, of some
/// 6000 answers each), and the window whole. Answers overtake each other all the time, so
/// "a later frame answered" alone says nothing here: the originals of the first copies
/// answered after all widen the reordering window (RACK, RFC 8985, with Eifel detection,
/// RFC 3522, in place of DSACKs) and raise the timeout, which restarts with every answer
/// (RFC 6298 5.3). (Before: a copy for every frame three later ones overtook once it had
/// been out 1.25 smoothed RTTs, some 2.6 ms here, all along.)
#[test]
fn slow_target_that_loses_nothing_stops_getting_copies() {
    for seed in [1u64, 2, 3, 4] {
        let (early, d) = slow_target_run(seed, |t| t.io_delay = ms(4), 40, 400);
        let t = &d.targets[0];
        let late = d.stats.retransmits - early;
        eprintln!("seed {seed}: {early} copies in the warm-up, {late} after; {t:?}");
        assert!(
            late <= 3,
            "seed {seed}: {late} copies of slow answers after the warm-up: {t:?}"
        );
        assert_eq!(t.maxout, t.nframes, "seed {seed}: window not whole: {t:?}");
    }
}

/// 128 one-sector reads in flight against a target that buffers 256 frames (the window's
/// ceiling raised to match) and serves them in arrival order at once (no disk latency),
/// on a loss-free link in order, until all 128 are outstanding at once, with room left
/// in the window; then `before` runs with them out, and everything is answered.
/// Returns the copies sent from `before` on, the device and the target's counters, once
/// every read completed with the disk's data.
fn window_out_then(
    seed: u64,
    before: impl FnOnce(&mut Sim),
) -> (u64, DeviceInfo, crate::target::Stats) {
    const SECTORS: u64 = 4096;
    const INFLIGHT: usize = 128;
    let cfg = Config {
        maxout: 256,
        ..Config::default()
    };
    let mut sim = Sim::new(seed, link(0.0, 0.0), cfg, &[1500]);
    let mut s = spec(DEV, SECTORS, 256, vec![(TMAC, 1500, 0)]);
    s.io_delay = Duration::ZERO;
    let t = sim.add_target(s);
    sim.rng.fill(&mut sim.targets[t].disk.borrow_mut());
    bring_up(&mut sim, DEV);
    let limit = sim.now + Duration::from_secs(600);
    let mut inflight: BTreeMap<IoId, u64> = BTreeMap::new();
    let mut next = 0u64;
    let reap = |sim: &mut Sim, inflight: &mut BTreeMap<IoId, u64>| {
        for (_, lba, r) in take_done(sim, inflight) {
            let got = r
                .unwrap_or_else(|e| panic!("seed {seed}: read at {lba} failed: {e}"))
                .unwrap();
            let disk = sim.targets[t].disk.borrow();
            let want = &disk[lba as usize * 512..(lba as usize + 1) * 512];
            assert!(got == want, "seed {seed}: read at {lba}: wrong data");
        }
    };
    loop {
        reap(&mut sim, &mut inflight);
        while inflight.len() < INFLIGHT {
            let lba = next % SECTORS;
            next += 1;
            let id = sim
                .submit(DEV, BlockOp::Read { lba, sectors: 1 })
                .expect("submit");
            inflight.insert(id, lba);
        }
        if sim.device(DEV).targets[0].nout as usize == INFLIGHT {
            break;
        }
        assert!(sim.step(limit), "seed {seed}: stuck filling the window");
    }
    let copies_before = sim.device(DEV).stats.retransmits;
    before(&mut sim);
    while !inflight.is_empty() {
        assert!(sim.step(limit), "seed {seed}: stuck after the stall");
        reap(&mut sim, &mut inflight);
    }
    let d = sim.device(DEV);
    (
        d.stats.retransmits - copies_before,
        d,
        sim.targets[t].eng.stats(),
    )
}

/// A target that stalls for 50 ms with 128 frames outstanding (a daemon starved of CPU on
/// a loaded host, its requests then served in order, as `aoe serve` was when `initiator_peers` ran with 16 tests in
/// parallel), on a loss-free link, then answers everything: at most a handful of copies,
/// one per backed-off timeout of the silence (RFC 6298 5.4, 5.5), and none over the
/// target's buffer count. (Before: every outstanding frame was copied, 84 and more
/// `retransmit` lines in a 100-line `err` ring.)
#[test]
fn stalled_target_with_128_frames_out_gets_a_handful_of_copies() {
    for seed in [1u64, 2, 3, 4] {
        let (copies, d, st) = window_out_then(seed, |sim| {
            sim.stall_target(0, ms(50));
        });
        eprintln!(
            "seed {seed}: {copies} copies after the stall; {:?}",
            d.targets[0]
        );
        assert!(
            copies <= 8,
            "seed {seed}: {copies} copies for one 50 ms stall: {:?}",
            d.targets[0]
        );
        assert_eq!(st.over_buffer_count, 0, "seed {seed}");
    }
}

/// All 128 frames out lost at once (the link down for 20 ms, then back and lossy: 5%
/// loss, 1% duplication, reordering): one copy per backed-off timeout while the link is
/// down; once one is answered and nothing else for a timeout, the others are copied;
/// every read completes with the disk's data and none goes over the buffer count.
#[test]
fn frames_all_lost_recover_once_the_link_is_back() {
    for seed in [5u64, 6, 7] {
        let mut in_cut = 0;
        let (copies, d, st) = window_out_then(seed, |sim| {
            sim.link = LinkCfg::lossy(5.0, 1.0);
            sim.seg_up[0] = false;
            let before = sim.device(DEV).stats.retransmits;
            sim.run_for(ms(20));
            in_cut = sim.device(DEV).stats.retransmits - before;
            sim.seg_up[0] = true;
        });
        eprintln!(
            "seed {seed}: {in_cut} copies while cut, {copies} in all; {:?}",
            d.targets[0]
        );
        assert!(
            in_cut <= 8,
            "seed {seed}: {in_cut} copies while the link was cut"
        );
        // Each frame lost is copied at least once: the link dropped all 128.
        assert!(copies >= 128, "seed {seed}: {copies} copies");
        assert_eq!(st.over_buffer_count, 0, "seed {seed}");
    }
}

/// Runs the engine on its own timer, as the daemon does, until `id` completes: returns
/// how many times the timer ran and how long that took (the fuzz target `initiator_engine`
/// drives it the same way).
fn timer_runs_until_done(sim: &mut Sim, id: IoId, budget: usize) -> (usize, Duration) {
    let start = sim.now;
    let mut runs = 0;
    while !sim.completions.contains_key(&id) && runs < budget {
        let now = sim.now;
        let Some(t) = sim.init.poll_timeout() else {
            break;
        };
        sim.run_for(
            t.saturating_duration_since(now)
                .max(Duration::from_micros(1)),
        );
        runs += 1;
    }
    (runs, sim.now - start)
}

/// A target that stops answering with a window full of frames: the device goes down and
/// the write fails (EIO) within `deadsecs` of its first frame, as the driver's
/// `rexmit_timer` does, and meanwhile the timer backs off (RFC 6298 5.5) instead of running
/// every few hundred microseconds. What the fuzz target found
/// (`fuzz/regressions/initiator_engine-s6-loss-liveness`): the target's MTU shrank under
/// the initiator, so only the write's last, one-sector frame still reached it and was
/// answered; every two-sector frame was dropped. The copies that timed out held their slots
/// for a second, so the next copy waited for a slot, and it, and every frame behind it,
/// was looked at again every 0.5-2 ms: 3000 timer runs in the 3 s before the device went
/// down (the fuzz target allows 1000).
#[test]
fn silent_target_with_a_full_window_backs_off_and_fails_within_deadsecs() {
    let deadsecs = Duration::from_secs(3);
    for shrink_mtu in [false, true] {
        let cfg = Config {
            deadsecs,
            ..Config::default()
        };
        let mut sim = Sim::new(1, LinkCfg::perfect(), cfg, &[1500]);
        let mut s = spec(DEV, 96, 8, vec![(TMAC, 1500, 0)]);
        s.io_delay = Duration::ZERO;
        sim.add_target(s);
        bring_up(&mut sim, DEV);
        if shrink_mtu {
            // Two-sector frames (1024 bytes of data) no longer fit; one sector does.
            sim.set_target_mtu(0, 0, 1000);
        } else {
            sim.seg_up[0] = false;
        }
        let start = sim.now;
        let id = sim
            .submit(
                DEV,
                BlockOp::Write {
                    lba: 10,
                    data: vec![7; 31 * 512],
                },
            )
            .unwrap();
        let (runs, took) = timer_runs_until_done(&mut sim, id, 100_000);
        let result = sim
            .completions
            .get(&id)
            .map(|(at, r)| (*at - start, r.clone()));
        eprintln!("shrink_mtu {shrink_mtu}: {runs} timer runs, {took:?}: {result:?}");
        let (at, result) = result.expect("the write completes");
        assert_eq!(result, Err(IoError::DeviceDown), "shrink_mtu {shrink_mtu}");
        assert!(
            at <= deadsecs + ms(10),
            "shrink_mtu {shrink_mtu}: failed after {at:?}, deadsecs {deadsecs:?}"
        );
        assert!(
            runs <= 200,
            "shrink_mtu {shrink_mtu}: the timer ran {runs} times in {took:?}"
        );
    }
}

/// A link cut for half of `deadsecs` with a full window of reads out: while it is cut, the
/// timers back off (a handful of timer runs and copies, not one per millisecond), and once
/// the link is back and the target answers a copy of the earliest frame, the frames that
/// slept through the cut are copied one timeout later (RFC 6298 5.3: an answer restarts the
/// timer): every read completes with the target's data, none fails with the device down.
/// At a full window a copy goes out only once the copy before it is presumed lost, a second
/// after it was sent (`SILENT_HOLD`), so all are done within a second of the link's return.
/// Before, the timer ran every 0.5-2 ms through the cut (750 runs for 300 ms, 3750 for
/// 1.5 s); with the timers backed off but not restarted by the answer, the frames behind
/// the earliest were copied only when their backed-off timers ran out (1.34 s after the
/// link's return for the 300 ms cut).
#[test]
fn frames_that_slept_through_a_cut_are_copied_once_the_target_answers() {
    let deadsecs = Duration::from_secs(3);
    for cut in [ms(300), ms(1500)] {
        let cfg = Config {
            deadsecs,
            ..Config::default()
        };
        let mut sim = Sim::new(2, LinkCfg::perfect(), cfg, &[1500]);
        let mut s = spec(DEV, 96, 8, vec![(TMAC, 1500, 0)]);
        s.io_delay = Duration::ZERO;
        let disk: Disk = std::rc::Rc::new(std::cell::RefCell::new(
            (0..96 * 512).map(|i| (i / 7) as u8).collect(),
        ));
        s.disk = Some(disk.clone());
        sim.add_target(s);
        bring_up(&mut sim, DEV);
        // Grow the window to its ceiling of 8 first.
        for _ in 0..16 {
            let id = sim
                .submit(
                    DEV,
                    BlockOp::Read {
                        lba: 0,
                        sectors: 16,
                    },
                )
                .unwrap();
            assert!(sim.run_until(ms(100), |s| s.completions.contains_key(&id)));
        }
        sim.seg_up[0] = false;
        let ids: Vec<IoId> = (0..8)
            .map(|i| {
                sim.submit(
                    DEV,
                    BlockOp::Read {
                        lba: i * 2,
                        sectors: 2,
                    },
                )
                .unwrap()
            })
            .collect();
        assert_eq!(sim.device(DEV).targets[0].nout, 8);
        let copies_before = sim.device(DEV).stats.retransmits;
        let mut runs = 0;
        let back = sim.now + cut;
        while sim.now < back {
            let next = sim.init.poll_timeout().unwrap().min(back);
            let now = sim.now;
            sim.run_for(
                next.saturating_duration_since(now)
                    .max(Duration::from_micros(1)),
            );
            runs += 1;
        }
        let copies = sim.device(DEV).stats.retransmits - copies_before;
        sim.seg_up[0] = true;
        let done = sim.run_until(deadsecs, |s| {
            ids.iter().all(|id| s.completions.contains_key(id))
        });
        assert!(done, "cut {cut:?}: reads outstanding");
        let last = ids.iter().map(|id| sim.completions[id].0).max().unwrap();
        eprintln!(
            "cut {cut:?}: {runs} timer runs and {copies} copies while cut; all done {:?} after the link came back",
            last - back
        );
        for (i, id) in ids.iter().enumerate() {
            let (_, r) = &sim.completions[id];
            let want = &disk.borrow()[i * 1024..(i + 1) * 1024];
            assert_eq!(
                r.as_ref().map(|d| d.as_deref() == Some(want)),
                Ok(true),
                "cut {cut:?}: read {i}"
            );
        }
        assert!(runs <= 50, "cut {cut:?}: the timer ran {runs} times");
        assert!(copies <= 8, "cut {cut:?}: {copies} copies while cut");
        assert!(
            last - back <= Duration::from_secs(1) + ms(10),
            "cut {cut:?}: the reads completed {:?} after the link came back",
            last - back
        );
    }
}

/// A frame's copy waits for a window slot held by the frame's own earlier copy
/// (`Engine::held`; one slot here: buffer count 1). The held copy is presumed lost at its
/// `silent_until`; if an answer the engine no longer expects (a duplicate of an earlier
/// answer, as a link that duplicates frames delivers) arrives just then, before the timer
/// runs (a daemon handles the frames of a wake-up before its timer), handling that answer
/// frees the slot. The waiting copy must still go out at once: nothing else would send it
/// (its frame's timer is parked until `deadsecs`, no other frame is out). `aoe initiator`
/// under 5% loss stalled some 50 s on this, until the discovery beacon's timer run (60 s
/// after the last) sent the copies.
#[test]
fn copy_waiting_for_a_slot_goes_out_when_a_late_answer_frees_it() {
    let t0 = Instant::now();
    let mut e = Engine::new(Config::default(), t0);
    e.add_interface(0, "eth0", HOST, 1500);
    drain(&mut e, t0);
    e.handle_frame(t0, 0, &config_rsp(TMAC, DEV, 1, 2, 0));
    let tx = drain(&mut e, t0);
    e.handle_frame(t0, 0, &identify_rsp(&tx[0].1, 1000));
    assert!(events(&mut e).contains(&Event::DeviceUp(DEV)));
    // One read answered; its answer will come again later.
    e.submit(t0, DEV, BlockOp::Read { lba: 0, sectors: 2 })
        .unwrap();
    let tx = drain(&mut e, t0);
    let now = t0 + Duration::from_micros(100);
    let dup = ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, &[1; 1024]);
    e.handle_frame(now, 0, &dup);
    assert_eq!(completions(&mut e).len(), 1);
    // The next read's frame is lost; its copy waits for the only slot, which the lost
    // frame's copy holds until presumed lost.
    e.submit(now, DEV, BlockOp::Read { lba: 2, sectors: 2 })
        .unwrap();
    assert_eq!(drain(&mut e, now).len(), 1);
    let release = loop {
        let at = e.poll_timeout().unwrap();
        assert!(at < t0 + Duration::from_secs(5), "no copy held");
        let waiting = !e.devices[&DEV].rexmitq.is_empty();
        if waiting && e.held.values().any(|h| at == h.silent_until) {
            break at;
        }
        e.handle_timeout(at);
        assert!(drain(&mut e, at).is_empty(), "no slot for a copy yet");
    };
    // The duplicate arrives as the held copy is presumed lost, before the timer runs.
    late_answer_sends_lba_2(&mut e, release, &dup, "the copy");
}

/// The window is taken only by a held copy: the spare copy of a frame that its first
/// copy's late answer completed (`Engine::held`). A new read waits in the queue, nothing
/// is out. If an answer the engine no longer expects arrives just as the held copy is
/// presumed lost (before the timer runs), handling it frees the slot, and the queued frame
/// must go out then: no timer would send it before the discovery beacon.
#[test]
fn queued_frame_goes_out_when_a_late_answer_frees_the_window() {
    let (mut e, t0) = up_engine(1000, true);
    e.submit(t0, DEV, BlockOp::Read { lba: 0, sectors: 2 })
        .unwrap();
    let first = drain(&mut e, t0);
    let rsp = ata_rsp(&first[0].1, TMAC, status::DRDY, 0, &[1; 1024]);
    // Its timer runs out: a copy goes out.
    let mut now = t0;
    while !e.outstanding.values().any(|f| f.retransmits > 0) {
        now = e.poll_timeout().unwrap();
        assert!(now < t0 + Duration::from_secs(1), "no copy");
        e.handle_timeout(now);
        drain(&mut e, now);
    }
    // The first copy's answer arrives late: the read is done, its copy keeps its slot.
    now += Duration::from_micros(10);
    e.handle_frame(now, 0, &rsp);
    assert_eq!(completions(&mut e).len(), 1);
    assert_eq!((e.held.len(), e.outstanding.len()), (1, 0));
    // A window of that one slot (as when a window at its floor is all held copies), and
    // the next read queued behind it.
    let t = &mut e.devices.get_mut(&DEV).unwrap().targets[0];
    assert_eq!(t.nout, 1);
    t.maxout = 1;
    e.submit(now, DEV, BlockOp::Read { lba: 2, sectors: 2 })
        .unwrap();
    assert!(drain(&mut e, now).is_empty(), "the window is full");
    let release = loop {
        let at = e.poll_timeout().unwrap();
        assert!(at < t0 + Duration::from_secs(5), "never released");
        if e.held.values().any(|h| h.silent_until <= at) {
            break at;
        }
        e.handle_timeout(at);
        assert!(drain(&mut e, at).is_empty(), "the window is still full");
    };
    // A duplicate of that answer arrives as the held copy is presumed lost.
    late_answer_sends_lba_2(&mut e, release, &rsp, "the next frame");
}

/// Hands the engine `late` (an answer it no longer expects) at `release`, when a held
/// copy is presumed lost, then runs its timer whenever due, as the daemon's loop does, for
/// two seconds: `what`, the frame of the read at LBA 2, must have gone out by then.
fn late_answer_sends_lba_2(e: &mut Engine, release: Instant, late: &[u8], what: &str) {
    e.handle_frame(release, 0, late);
    let mut sent = drain(e, release);
    let mut now = release;
    while sent.is_empty() {
        let Some(at) = e
            .poll_timeout()
            .filter(|at| *at <= release + Duration::from_secs(2))
        else {
            break;
        };
        now = now.max(at);
        e.handle_timeout(now);
        sent = drain(e, now);
    }
    assert_eq!(
        sent.iter().map(|(_, f)| req_lba(f)).collect::<Vec<_>>(),
        vec![2],
        "{what} went out within 2 s (next timer run {:?} after the release)",
        e.poll_timeout()
            .map(|t| t.saturating_duration_since(release))
    );
}

/// A lost last frame (nothing sent after it, so no later answer reveals it: each request of
/// a write through the page cache ends so) is copied two smoothed RTTs after the target's
/// last answer, as RACK-TLP's tail loss probe (RFC 8985 7), not a whole RTO later: with
/// `aoe serve`'s answer times spread by its worker pool, `srtt + 4 * rttvar` is several
/// times the RTT, and at MTU 9000 (30 frames a 256 KiB request) a tail loss every few
/// requests waited that long with the link idle. The probe is no sign of congestion: the
/// window stays.
#[test]
fn lost_last_frame_is_probed_after_two_rtts_not_the_timeout() {
    let (mut e, t0) = up_engine(100_000, true);
    // Answers after 100 µs and 2 ms by turns: a smoothed RTT near 1 ms, its deviation near
    // that, so the RTO is over twice the smoothed RTT.
    let mut now = t0;
    for i in 0..40 {
        e.submit(now, DEV, BlockOp::Read { lba: i, sectors: 1 })
            .unwrap();
        let tx = drain(&mut e, now);
        now += Duration::from_micros(if i % 2 == 0 { 100 } else { 2000 });
        e.handle_frame(now, 0, &ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, &[0; 512]));
        events(&mut e);
    }
    let before = e.device(DEV).unwrap().targets[0].clone();
    let (srtt, rto) = (before.rtt_avg, before.rto);
    assert!(rto > 2 * srtt + ms(1), "rto {rto:?}, srtt {srtt:?}");
    // Two frames; the first is answered after 100 µs, the last is lost.
    e.submit(
        now,
        DEV,
        BlockOp::Read {
            lba: 100,
            sectors: 4,
        },
    )
    .unwrap();
    let tx = drain(&mut e, now);
    assert_eq!(tx.len(), 2);
    let answered = now + Duration::from_micros(100);
    e.handle_frame(
        answered,
        0,
        &ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, &[1; 1024]),
    );
    assert!(drain(&mut e, answered).is_empty());
    let at = e.poll_timeout().unwrap();
    assert!(
        at <= answered + 2 * srtt,
        "next timer run {:?} after the last answer (srtt {srtt:?}, rto {rto:?})",
        at - answered
    );
    e.handle_timeout(at);
    let again = drain(&mut e, at);
    assert_eq!(again.len(), 1, "the last frame probed");
    assert_eq!(req_lba(&again[0].1), 102);
    assert_ne!(tag_of(&again[0].1), tag_of(&tx[1].1), "fresh tag");
    let t = &e.device(DEV).unwrap().targets[0];
    assert_eq!(
        (t.maxout, t.window_cuts),
        (before.maxout, before.window_cuts)
    );
    assert_eq!(t.tail_probes, 1);
    // Its answer completes the read; nothing else goes out.
    let done_at = at + Duration::from_micros(100);
    e.handle_frame(
        done_at,
        0,
        &ata_rsp(&again[0].1, TMAC, status::DRDY, 0, &[2; 1024]),
    );
    let mut want = vec![1u8; 1024];
    want.extend([2u8; 1024]);
    assert_eq!(completions(&mut e), vec![Ok(Some(want))]);
    assert!(drain(&mut e, done_at).is_empty());
}
