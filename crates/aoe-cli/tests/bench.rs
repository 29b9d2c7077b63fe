//! `aoe bench` as a load generator, against `aoe serve` and vblade on a veth link between two
//! namespaces the test creates (root, netns). No timing is asserted: only that verify passes,
//! that `--json` parses and carries the fields the comparison harness reads, and that a
//! writing mode without `--write` (or aimed at broadcast) is refused before anything is sent.

mod common;
use common::*;

use std::fs;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use aoe_testkit::{wait_until, Netns, NsChild, VethPair};
use serde_json::Value;

/// Backing file: 8 MiB of a seeded pattern (so a verify pass really changes it).
const FILE_BYTES: usize = 8 << 20;

/// A target in one namespace, `aoe bench` run from the other.
struct BenchRig {
    _target: NsChild,
    file: PathBuf,
    init: Netns,
    veth: VethPair,
    _target_ns: Netns,
    _dir: tempfile::TempDir,
}

impl BenchRig {
    fn start(kind: Target, mtu: u32) -> BenchRig {
        require_tools();
        let target_ns = Netns::new("aoebenchT").expect("target namespace");
        let init = Netns::new("aoebenchI").expect("initiator namespace");
        let veth = VethPair::new(&target_ns, &init, mtu).expect("veth pair");
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("disk.img");
        fs::write(&file, pattern(11, FILE_BYTES)).expect("backing file");
        let target = target_ns
            .spawn(kind.command(veth.a_name(), &file, &[]))
            .expect("start target");
        let rig = BenchRig {
            _target: target,
            file,
            init,
            veth,
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

    fn bench(&self, args: &[&str]) -> Output {
        run(self
            .init
            .command("timeout")
            .args(["-k", "5", "120", AOE, "bench", self.veth.b_name()])
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
        cur = cur
            .get(k)
            .unwrap_or_else(|| panic!("--json output has no field {path}:\n{v:#}"));
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("--json field {path} is not a number: {cur}"))
}

/// The sector the pattern stamps at `lba`: word 0 is the LBA itself.
fn stamped_lba(file: &std::path::Path, lba: u64) -> u64 {
    let b = read_at(file, lba * 512, 8).expect("read backing file");
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

fn verify_passes(kind: Target, mtu: u32) {
    let rig = BenchRig::start(kind, mtu);
    let v = rig.bench_json(&[
        "--target", "7.3", "--mode", "verify", "--write", "--size", "4M", "--window", "32",
    ]);
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
    assert_eq!(num(&v, "mismatched_sectors"), 0.0, "{v:#}");
    assert_eq!(num(&v, "verified_sectors"), sectors, "{v:#}");
}

#[test]
fn verify_passes_against_aoe_serve() {
    verify_passes(Target::AoeServe, 9000);
}

#[test]
fn verify_passes_against_vblade() {
    verify_passes(Target::Vblade, 1500);
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
    let out = rig.bench(&["--target", "7.3", "--rx", "rings"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown --rx value is a usage error"
    );
}
