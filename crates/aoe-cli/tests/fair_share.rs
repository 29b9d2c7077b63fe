//! One greedy initiator must not starve the others (session 17's audit, docs/TEST-AUDIT.md,
//! second audit, row 1b): `aoe serve` on a slow store, one `aoe bench` writing far over the
//! advertised buffer count (window 4096 against a count of 16), and a second `aoe bench`
//! reading at window 1 from another MAC on the same switch.
//!
//! Before the per-source share (`aoe_proto::target`, module `share`) the buffer count was one
//! pool per interface and the flood took every slot the instant it was freed: the reader got
//! 0 reads, every one of its requests dropped as over the buffer count and retransmitted
//! until its run ended. Now the reader, once turned away, is a contender and the flooder is
//! refused while it holds its share: the reader's reads complete, each with a bounded
//! number of retransmits. No time is asserted, only counts: the reads all complete, their
//! retransmits stay within [`MAX_RETRANSMITS_PER_READ`] per read, and the target counted
//! refusals of the flooder's share.
//!
//! Once admitted, a read waits for the store behind the jobs queued on the worker pool.
//! Taken first in, first out, each read waited behind the flooder's share queued there
//! (about five 20 ms writes: p50 103 ms); taken round-robin by source
//! (`aoe_store::FairQueue`), behind at most one. Counted, not timed: the store writes
//! completed while the reader ran stay within [`MAX_WRITES_PER_READ`] per read.
//!
//! The store: a [`FaultFs`] file whose every write waits [`WRITE_DELAY`] (writes one at a
//! time: about 50 writes per second, the audit's throttled loop device). Needs root; every
//! frame stays on veth pairs and a bridge inside namespaces the test creates.

mod common;
use common::*;

use std::fs;
use std::time::Duration;

use aoe_testkit::faultfs::FaultFs;
use aoe_testkit::{wait_until, Bridge, Netns, VethPair};
use serde_json::Value;

/// Each write's time on the store.
const WRITE_DELAY: Duration = Duration::from_millis(20);
/// The advertised buffer count.
const BUFFER_COUNT: &str = "16";
/// Reads the window-1 initiator must complete.
const READS: u64 = 40;
/// Most retransmits per read allowed. The reader's reads wait behind up to the flooder's
/// share of slow writes (8 of 16) and its retransmit timer starts at 20 ms, so a few per
/// read are expected; before the share every read was retransmitted until the run's end.
const MAX_RETRANSMITS_PER_READ: u64 = 10;
/// Most store writes completed per read while the reader runs, plus [`WRITES_SLACK`]. A
/// read taken round-robin waits for a worker to free (one write, the store taking one at a
/// time) and at most one queued write of the flooder's taken first: two (measured: 75
/// writes over the 40 reads). First in, first out it waited behind every write queued
/// before it: about five (209 over the 40 reads, and the test fails there).
const MAX_WRITES_PER_READ: u64 = 3;
/// Writes allowed beyond [`MAX_WRITES_PER_READ`] per read: the first read, admitted when
/// the flooder held the whole buffer count, may wait behind all of it.
const WRITES_SLACK: u64 = 16;
/// Export size: 8 MiB.
const FILE_BYTES: usize = 8 << 20;

#[test]
fn a_window_one_reader_is_served_while_another_initiator_floods() {
    require_tools();
    let dir = tempfile::tempdir().expect("temp dir");
    let backing = dir.path().join("slow.img");
    fs::write(&backing, pattern(3, FILE_BYTES)).expect("backing file");
    let ffs = FaultFs::mount(&backing).expect("mount the fault file system");
    let faults = ffs.faults();
    faults.delay_every_write(Some(WRITE_DELAY));

    let target_ns = Netns::new("aoefsT").expect("target namespace");
    let flood_ns = Netns::new("aoefsF").expect("flooder namespace");
    let read_ns = Netns::new("aoefsR").expect("reader namespace");
    let bridge = Bridge::new(&target_ns).expect("bridge");
    let fveth = VethPair::new(&target_ns, &flood_ns, 1500).expect("flooder veth");
    bridge.add_port(fveth.a_name()).expect("bridge port");
    let rveth = VethPair::new(&target_ns, &read_ns, 1500).expect("reader veth");
    bridge.add_port(rveth.a_name()).expect("bridge port");

    let extra = ["-b".to_string(), BUFFER_COUNT.to_string()];
    let mut target = target_ns
        .spawn(Target::AoeServe.command(bridge.name(), &ffs.file(), &extra))
        .expect("start aoe serve");
    let bench = |ns: &Netns, iface: &str, args: &[&str]| {
        let mut c = ns.command("timeout");
        c.args(["-k", "5", "120", AOE, "bench", iface, "--target"])
            .arg(format!("{SHELF}.{SLOT}"))
            .args(args);
        c
    };
    // Ready once it answers a one-request read.
    assert!(
        wait_until(Duration::from_secs(20), || run(&mut bench(
            &read_ns,
            rveth.b_name(),
            &["--size", "512"]
        ))
        .status
        .success()),
        "aoe serve never answered: {}",
        target.output_so_far()
    );

    let mut flooder = flood_ns
        .spawn(bench(
            &flood_ns,
            fveth.b_name(),
            &[
                "--mode",
                "randwrite",
                "--write",
                "--window",
                "4096",
                "--time",
                "100",
            ],
        ))
        .expect("start the flooder");
    // The flood has reached the store and filled the pool: writes are being carried out
    // and the target has dropped requests over the buffer count.
    assert!(
        wait_until(Duration::from_secs(30), || faults.writes() >= 10
            && target.output_so_far().contains("total_over_buffer_count")),
        "the flood never reached the store ({} writes): {}",
        faults.writes(),
        target.output_so_far()
    );
    assert!(flooder.is_running(), "{}", flooder.output_so_far());

    let size = format!("{}", READS * 1024);
    let (writes_before, started) = (faults.writes(), std::time::Instant::now());
    let out = run(&mut bench(
        &read_ns,
        rveth.b_name(),
        &[
            "--mode", "randread", "--window", "1", "--bs", "1k", "--size", &size, "--time", "60",
            "--json",
        ],
    ));
    let (writes_during, secs) = (
        faults.writes() - writes_before,
        started.elapsed().as_secs_f64(),
    );
    let still_flooding = flooder.is_running();
    let _ = flooder.stop();
    faults.delay_every_write(None);
    let _ = target.stop();
    let log = target.output_so_far();
    assert!(
        out.status.success(),
        "the reader failed ({}): {}\ntarget: {log}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("--json output");
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"));
    let (reads, retransmits) = (n("requests"), n("retransmits"));
    println!(
        "reader: {reads} reads, {retransmits} retransmits, latency {} us; store writes {} \
         ({writes_during} while the reader ran, {secs:.2} s: the flooder's {:.1} writes/s)",
        v["latency_us"],
        faults.writes(),
        writes_during as f64 / secs
    );
    assert!(still_flooding, "the flood ended before the reader");
    assert_eq!(reads, READS, "the reader's reads did not all complete: {v}");
    assert!(
        retransmits <= READS * MAX_RETRANSMITS_PER_READ,
        "{retransmits} retransmits for {reads} reads"
    );
    assert!(
        writes_during <= READS * MAX_WRITES_PER_READ + WRITES_SLACK,
        "{writes_during} store writes completed while the reader's {READS} reads waited: \
         its reads waited behind the flooder's queue"
    );
    // The flooder was refused for its share, and that shows in the once-a-second log.
    let share_drops: u64 = log
        .lines()
        .filter_map(|l| l.split("total_over_fair_share=").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0);
    assert!(
        share_drops > 0,
        "no drops over the fair share logged: {log}"
    );
}
