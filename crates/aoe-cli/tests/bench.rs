//! `aoe bench` as a load generator, against `aoe serve` and vblade on a veth link between two
//! namespaces the test creates (root, netns). No timing is asserted: only that verify passes,
//! that `--json` parses and carries the fields the comparison harness reads, and that a
//! writing mode without `--write` (or aimed at broadcast) is refused before anything is sent.
//! Requests go out through the transmit ring by default (`--tx ring`); the JSON output's
//! counters of frames sent each way show which path a run took. Paced runs (`--rate`) are
//! checked by bounds that hold on any machine: not before the last request was due, not
//! more than the rate allows.

mod common;
use common::*;

use std::fs;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use aoe_testkit::relay::{Faults, RelayLink};
use aoe_testkit::{wait_until, Netns, NsChild, VethPair};
use serde_json::Value;

/// Backing file: 8 MiB of a seeded pattern (so a verify pass really changes it).
const FILE_BYTES: usize = 8 << 20;

/// A target in one namespace, `aoe bench` run from the other, over one veth pair or through
/// the fault-injecting relay (a middle namespace).
struct BenchRig {
    _target: NsChild,
    file: PathBuf,
    init: Netns,
    link: Link,
    _target_ns: Netns,
    _dir: tempfile::TempDir,
}

enum Link {
    Veth(VethPair),
    Relay(RelayLink),
}

impl BenchRig {
    fn start(kind: Target, mtu: u32) -> BenchRig {
        Self::start_on(kind, mtu, false)
    }

    fn start_on(kind: Target, mtu: u32, relay: bool) -> BenchRig {
        require_tools();
        let target_ns = Netns::new("aoebenchT").expect("target namespace");
        let init = Netns::new("aoebenchI").expect("initiator namespace");
        let link = if relay {
            Link::Relay(RelayLink::new(&target_ns, &init, mtu, 0x5eed).expect("relayed link"))
        } else {
            Link::Veth(VethPair::new(&target_ns, &init, mtu).expect("veth pair"))
        };
        let target_if = match &link {
            Link::Veth(v) => v.a_name().to_string(),
            Link::Relay(r) => r.target_if().to_string(),
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("disk.img");
        fs::write(&file, pattern(11, FILE_BYTES)).expect("backing file");
        let target = target_ns
            .spawn(kind.command(&target_if, &file, &[]))
            .expect("start target");
        let rig = BenchRig {
            _target: target,
            file,
            init,
            link,
            _target_ns: target_ns,
            _dir: dir,
        };
        // Ready once it answers a one-request read.
        assert!(
            wait_until(Duration::from_secs(20), || rig
                .bench(&["--target", "7.3", "--size", "512"])
                .status
                .success()),
            "{kind:?} never answered `aoe bench`"
        );
        rig
    }

    fn iface(&self) -> &str {
        match &self.link {
            Link::Veth(v) => v.b_name(),
            Link::Relay(r) => r.initiator_if(),
        }
    }

    fn bench(&self, args: &[&str]) -> Output {
        run(self
            .init
            .command("timeout")
            .args(["-k", "5", "120", AOE, "bench", self.iface()])
            .args(args))
    }

    fn bench_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.bench(&all);
        assert!(
            out.status.success(),
            "aoe bench {all:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "--json output does not parse ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

fn num(v: &Value, path: &str) -> f64 {
    let mut cur = v;
    for k in path.split('.') {
        // A number is an index into an array (`phases.0.bytes`).
        let next = match k.parse::<usize>() {
            Ok(i) if cur.is_array() => cur.get(i),
            _ => cur.get(k),
        };
        cur = next.unwrap_or_else(|| panic!("--json output has no field {path}:\n{v:#}"));
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("--json field {path} is not a number: {cur}"))
}

/// The sector the pattern stamps at `lba`: word 0 is the LBA itself.
fn stamped_lba(file: &std::path::Path, lba: u64) -> u64 {
    let b = read_at(file, lba * 512, 8).expect("read backing file");
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

/// Every request (and retransmit) of the run went out through the transmit ring, none with
/// `sendmmsg`.
fn assert_sent_by_ring(v: &Value) {
    assert_eq!(v["tx"], "ring", "{v:#}");
    assert_eq!(num(v, "tx_frames_mmsg"), 0.0, "{v:#}");
    assert_eq!(
        num(v, "tx_frames_ring"),
        num(v, "requests") + num(v, "retransmits"),
        "one ring frame per request and retransmit: {v:#}"
    );
}

fn verify_passes(kind: Target, mtu: u32) {
    let rig = BenchRig::start(kind, mtu);
    let v = rig.bench_json(&[
        "--target", "7.3", "--mode", "verify", "--write", "--size", "4M", "--window", "32",
    ]);
    assert_sent_by_ring(&v);
    assert_eq!(num(&v, "verified_sectors"), 8192.0, "{v:#}");
    assert_eq!(num(&v, "mismatched_sectors"), 0.0, "{v:#}");
    assert_eq!(
        num(&v, "bytes"),
        2.0 * 4194304.0,
        "written and read back: {v:#}"
    );
    // The pattern really reached the disk, and nothing past the span was touched.
    for lba in [0, 1, 777, 8191] {
        assert_eq!(stamped_lba(&rig.file, lba), lba, "{kind:?} LBA {lba}");
    }
    let past = read_at(&rig.file, 8192 * 512, 512).expect("read");
    assert_eq!(past, pattern(11, FILE_BYTES)[8192 * 512..8193 * 512]);
    // Smaller requests and a short last request verify too.
    let (bs, size, sectors) = if mtu >= 9000 {
        ("1536", "1000k", 2000.0)
    } else {
        ("1024", "1024512", 2001.0)
    };
    let v = rig.bench_json(&[
        "--target", "7.3", "--mode", "verify", "--write", "--size", size, "--bs", bs,
    ]);
    assert_sent_by_ring(&v);
    assert_eq!(num(&v, "mismatched_sectors"), 0.0, "{v:#}");
    assert_eq!(num(&v, "verified_sectors"), sectors, "{v:#}");
    // And with sendmmsg, asked for: nothing through the ring.
    let v = rig.bench_json(&[
        "--target", "7.3", "--mode", "verify", "--write", "--size", "2M", "--tx", "mmsg",
    ]);
    assert_eq!(v["tx"], "mmsg", "{v:#}");
    assert_eq!(num(&v, "tx_frames_ring"), 0.0, "{v:#}");
    assert!(num(&v, "tx_frames_mmsg") >= num(&v, "requests"), "{v:#}");
    assert_eq!(num(&v, "mismatched_sectors"), 0.0, "{v:#}");
    assert_eq!(num(&v, "verified_sectors"), 4096.0, "{v:#}");
}

/// Lost, duplicated and reordered frames on the way (the relay): the requests sent again go
/// through the ring too, writes with their data rebuilt in the slot, and every sector still
/// reads back as written.
#[test]
fn lossy_verify_retransmits_through_the_ring() {
    let rig = BenchRig::start_on(Target::AoeServe, 1500, true);
    let Link::Relay(relay) = &rig.link else {
        unreachable!("started with a relay")
    };
    relay.control().set_faults(Faults::lossy(0.03, 0.01, 0.02));
    let v = rig.bench_json(&[
        "--target",
        "7.3",
        "--mode",
        "verify",
        "--write",
        "--size",
        "2M",
        "--window",
        "16",
        "--min-rto-us",
        "2000",
    ]);
    relay.control().set_faults(Faults::default());
    assert!(
        num(&v, "retransmits") > 0.0,
        "3% loss, no retransmit: {v:#}"
    );
    // A late answer completes one request, which was retransmitted at least once.
    assert!(
        num(&v, "late_replies") <= num(&v, "retransmits"),
        "more late answers than retransmits: {v:#}"
    );
    assert_sent_by_ring(&v);
    assert_eq!(num(&v, "verified_sectors"), 4096.0, "{v:#}");
    assert_eq!(num(&v, "mismatched_sectors"), 0.0, "{v:#}");
    for lba in [0, 1, 2047, 4095] {
        assert_eq!(stamped_lba(&rig.file, lba), lba, "LBA {lba}");
    }
}

#[test]
fn verify_passes_against_aoe_serve() {
    verify_passes(Target::AoeServe, 9000);
}

#[test]
fn verify_passes_against_vblade() {
    verify_passes(Target::Vblade, 1500);
}

/// MTU 65535, a veth's largest (issue 15): 127-sector requests, 65,024 bytes a frame, from
/// both targets.
#[test]
fn verify_passes_at_mtu_65535() {
    verify_passes(Target::AoeServe, 65535);
    verify_passes(Target::Vblade, 65535);
}

#[test]
fn json_has_the_fields_the_harness_reads() {
    for kind in [Target::AoeServe, Target::Vblade] {
        let rig = BenchRig::start(kind, 9000);
        for mode in ["read", "randread"] {
            let v = rig.bench_json(&["--mode", mode, "--time", "0.5", "--window", "8"]);
            for f in [
                "mb_per_s",
                "iops",
                "seconds",
                "bytes",
                "requests",
                "retransmits",
                "late_replies",
                "rx_drops",
                "latency_us.avg",
                "latency_us.p50",
                "latency_us.p99",
                "latency_us.p999",
                "generator_cpu_s",
                "target.buffer_count",
                "target.firmware_version",
                "target.max_sectors",
                "mtu",
                "bs",
                "window",
            ] {
                num(&v, f);
            }
            assert!(num(&v, "requests") > 0.0, "{kind:?} {mode}: {v:#}");
            // Broadcast found the one target there is, and IDENTIFY gave its size.
            assert_eq!(num(&v, "target.shelf"), f64::from(SHELF), "{v:#}");
            assert_eq!(num(&v, "target.slot"), f64::from(SLOT), "{v:#}");
            assert_eq!(num(&v, "target.sectors"), (FILE_BYTES / 512) as f64);
            assert_eq!(num(&v, "bs"), payload_for(9000) as f64, "default bs: {v:#}");
            assert_eq!(v["mode"], mode);
        }
    }
}

#[test]
fn write_without_write_flag_is_refused() {
    let rig = BenchRig::start(Target::AoeServe, 1500);
    let before = sha256(&rig.file);
    let refused = |args: &[&str], needle: &str| {
        let out = rig.bench(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?} was not refused: {err}"
        );
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    };
    for mode in ["write", "randwrite", "verify"] {
        refused(
            &["--target", "7.3", "--mode", mode, "--time", "1"],
            "--write",
        );
        // Broadcast never takes writes, --write or not.
        refused(&["--mode", mode, "--write"], "broadcast");
    }
    refused(
        &["--target", "7.3", "--write"],
        "only for the modes that write",
    );
    assert_eq!(
        sha256(&rig.file),
        before,
        "a refused run changed the target"
    );
    // With the flag the same write goes through.
    let v = rig.bench_json(&[
        "--target", "7.3", "--mode", "write", "--write", "--size", "64k",
    ]);
    assert_eq!(num(&v, "bytes"), 65536.0);
    assert_ne!(sha256(&rig.file), before);
}

#[test]
fn unusable_arguments_fail_with_one_line() {
    let rig = BenchRig::start(Target::Vblade, 1500);
    for (args, needle) in [
        (&["--bs", "1000"][..], "multiple of 512"),
        (&["--bs", "4k"][..], "MTU 1500"),
        (&["--window", "0"][..], "1-4096"),
        (&["--target", "7.9", "--time", "1"][..], "e7.9"),
    ] {
        let out = rig.bench(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    }
}

/// `--rate` and `--rate-iops` pace the requests: a run of `--size` bytes at a rate cannot end
/// before its last request was due (the first goes at once, each later one when the bytes, or
/// requests, before it are paid for), and a `--time` run cannot move more than the rate
/// allows plus one request. Both are lower or upper bounds that hold however busy the machine
/// is; nothing about speed is asserted. The JSON carries the asked and achieved rate, and
/// each phase says how it sent and received.
#[test]
fn paced_runs_never_exceed_their_rate() {
    let rig = BenchRig::start(Target::AoeServe, 1500);
    let bs = 1024.0;
    // 2 MiB at 4 MiB/s: 2048 requests, the last due at 2047 KiB / 4 MiB/s = 0.4998 s.
    for mode in ["read", "randread"] {
        let v = rig.bench_json(&[
            "--target", "7.3", "--mode", mode, "--size", "2M", "--bs", "1k", "--window", "16",
            "--rate", "4M",
        ]);
        assert_eq!(num(&v, "bytes"), 2097152.0, "{mode}: {v:#}");
        let floor = (2097152.0 - bs) / 4194304.0;
        assert!(
            num(&v, "seconds") >= floor,
            "{mode}: 2 MiB at 4 MiB/s took {} s, less than the {floor} s the rate allows: {v:#}",
            num(&v, "seconds")
        );
        assert_eq!(num(&v, "rate.asked_bytes_per_s"), 4194304.0, "{v:#}");
        assert!(v["rate"]["asked_iops"].is_null(), "{v:#}");
        assert!(v["rate"]["kept_up"].is_boolean(), "{v:#}");
        for f in [
            "rate.achieved_bytes_per_s",
            "rate.achieved_iops",
            "rate.achieved_fraction",
            "rate.latency_from_schedule_us.p50",
            "rate.latency_from_schedule_us.p99",
            "rate.latency_from_schedule_us.p999",
        ] {
            num(&v, f);
        }
        // The first request goes at once: at most one request above the rate.
        assert!(
            num(&v, "rate.achieved_fraction") <= 2097152.0 / (2097152.0 - bs),
            "{v:#}"
        );
        assert_eq!(
            num(&v, "phases.0.rate.asked_bytes_per_s"),
            4194304.0,
            "{v:#}"
        );
    }
    // Requests per second: 300 requests at 1000/s, the last due at 0.299 s.
    let v = rig.bench_json(&[
        "--target",
        "7.3",
        "--size",
        "300k",
        "--bs",
        "1k",
        "--rate-iops",
        "1000",
    ]);
    assert_eq!(num(&v, "requests"), 300.0, "{v:#}");
    assert!(num(&v, "seconds") >= 0.299, "{v:#}");
    assert_eq!(num(&v, "rate.asked_iops"), 1000.0, "{v:#}");
    assert!(v["rate"]["asked_bytes_per_s"].is_null(), "{v:#}");
    // A timed run: what it moved is at most the rate times the time, plus one request.
    let v = rig.bench_json(&[
        "--target", "7.3", "--mode", "randread", "--time", "0.5", "--bs", "1k", "--rate", "1M",
    ]);
    assert!(
        num(&v, "bytes") <= 0.5 * 1048576.0 + bs,
        "0.5 s at 1 MiB/s moved {} bytes: {v:#}",
        num(&v, "bytes")
    );
    assert!(num(&v, "requests") > 0.0, "{v:#}");
    // Verify, paced, both phases: each reports its own rate and its own way in and out.
    let v = rig.bench_json(&[
        "--target", "7.3", "--mode", "verify", "--write", "--size", "1M", "--rate", "8M", "--rx",
        "ring",
    ]);
    assert_eq!(num(&v, "mismatched_sectors"), 0.0, "{v:#}");
    assert_eq!(num(&v, "verified_sectors"), 2048.0, "{v:#}");
    let phases = v["phases"].as_array().expect("phases");
    assert_eq!(phases.len(), 2, "{v:#}");
    for (i, p) in phases.iter().enumerate() {
        assert!(
            num(p, "seconds") >= (1048576.0 - 1024.0) / 8388608.0,
            "phase {i}: {v:#}"
        );
        assert_eq!(num(p, "rate.asked_bytes_per_s"), 8388608.0, "{v:#}");
        assert_eq!(p["tx"], "ring", "{v:#}");
        assert_eq!(
            num(p, "tx_frames_ring"),
            num(p, "requests") + num(p, "retransmits"),
            "phase {i}: {v:#}"
        );
    }
    assert_eq!(phases[0]["rx"], "ring", "the write phase: {v:#}");
    assert_eq!(phases[1]["rx"], "mmsg", "the read-back checks data: {v:#}");
    // Unpaced: no rate object.
    let v = rig.bench_json(&["--target", "7.3", "--size", "64k"]);
    assert!(v["rate"].is_null(), "{v:#}");
}

#[test]
fn bad_rates_fail_with_one_line_and_exit_2() {
    let rig = BenchRig::start(Target::AoeServe, 1500);
    for (flag, value, needle) in [
        ("--rate", "0", "must be positive"),
        ("--rate", "5X", "not a rate"),
        ("--rate", "-5", "not a rate"),
        ("--rate", "1.5M", "not a rate"),
        ("--rate", "99999999999999G", "not a rate"),
        ("--rate-iops", "0", "must be positive"),
        ("--rate-iops", "99999999999999999999", "not a rate"),
    ] {
        let out = rig.bench(&["--target", "7.3", "--size", "64k", flag, value]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(needle), "{flag} {value}: {err}");
        assert!(err.contains(flag), "{flag} {value}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    }
}

#[test]
fn ring_and_recvmmsg_receive_paths_complete_the_same_sized_read() {
    let rig = BenchRig::start(Target::AoeServe, 1500);
    let per = payload_for(1500) as f64;
    for rx in [&[][..], &["--rx", "ring"][..], &["--rx", "mmsg"][..]] {
        let mut args = vec!["--target", "7.3", "--size", "2M", "--window", "16"];
        args.extend_from_slice(rx);
        let v = rig.bench_json(&args);
        assert_eq!(num(&v, "bytes"), 2097152.0, "{rx:?}: {v:#}");
        assert_eq!(
            num(&v, "requests"),
            (2097152.0 / per).ceil(),
            "{rx:?}: {v:#}"
        );
    }
    // Verify with the ring asked for: its write phase receives through the ring, its
    // read-back whole frames through recvmmsg, on the same socket one after the other.
    let v = rig.bench_json(&[
        "--target", "7.3", "--mode", "verify", "--write", "--size", "3M", "--window", "64", "--rx",
        "ring",
    ]);
    assert_eq!(num(&v, "verified_sectors"), 6144.0, "{v:#}");
    assert_eq!(num(&v, "mismatched_sectors"), 0.0, "{v:#}");
    // Both rings at once, and sendmmsg with the RX ring.
    for (tx, rx) in [("ring", "ring"), ("mmsg", "ring")] {
        let v = rig.bench_json(&[
            "--target", "7.3", "--size", "2M", "--window", "16", "--tx", tx, "--rx", rx,
        ]);
        assert_eq!(num(&v, "bytes"), 2097152.0, "{tx}/{rx}: {v:#}");
        assert_eq!(v["tx"], tx, "{v:#}");
        assert_eq!(v["rx"], rx, "{v:#}");
    }
    for flag in ["--rx", "--tx"] {
        let out = rig.bench(&["--target", "7.3", flag, "rings"]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "an unknown {flag} value is a usage error"
        );
    }
}

/// `--rx-whole` gets each read answer's data into the generator's memory, through both
/// receive paths, where the default receives its headers only (the reference a path that
/// delivers the data is measured against: docs/PERFORMANCE.md, "Session 32: the initiator's
/// reads against raw"); the JSON's `rx_data_bytes` says which.
#[test]
fn rx_whole_receives_the_data_of_every_answer() {
    let rig = BenchRig::start(Target::AoeServe, 9000);
    let size = 4.0 * 1024.0 * 1024.0;
    for rx in ["mmsg", "ring"] {
        let base = [
            "--target", "7.3", "--size", "4M", "--window", "16", "--rx", rx,
        ];
        let mut args = base.to_vec();
        args.push("--rx-whole");
        let v = rig.bench_json(&args);
        assert_eq!(num(&v, "bytes"), size, "{rx}: {v:#}");
        assert_eq!(num(&v, "rx_data_bytes"), size, "{rx}: {v:#}");
        assert_eq!(v["rx_whole"], true, "{v:#}");
        assert_eq!(v["rx"], rx, "{v:#}");
        let v = rig.bench_json(&base);
        assert_eq!(num(&v, "bytes"), size, "{rx}: {v:#}");
        assert!(
            num(&v, "rx_data_bytes") < size / 100.0,
            "{rx}: headers only, yet {} data bytes received: {v:#}",
            num(&v, "rx_data_bytes")
        );
        assert_eq!(v["rx_whole"], false, "{v:#}");
    }
}
