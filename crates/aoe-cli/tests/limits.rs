//! The daemons under a service manager's resource limits (cgroup `pids.max`, as systemd's
//! `TasksMax=` sets it), each in a control group the test makes and removes
//! ([`aoe_testkit::cgroup::Cgroup`]), on a veth link between namespaces it creates.
//!
//! A thread that cannot start (`pthread_create` fails with EAGAIN once the group holds
//! `pids.max` tasks) must end the daemon with a message naming the cause, or leave it
//! serving: never a panic, and never a mounted ROOT that nobody answers. Until session 36
//! `aoe initiator` panicked at `pids.max` 2 (the FUSE invalidator's spawn) and at 4 left
//! ROOT mounted with no thread reading `/dev/fuse` (fuser's request threads could not
//! start), so every access to ROOT waited for ever, SIGTERM included.
//!
//! What else was tried under limits and held (docs/TEST-AUDIT.md, session 36): `aoe serve`
//! and `aoe initiator` under `memory.max` with write floods (bounded, no OOM kill, every
//! byte in the file), and under `cpu.max` 10% and 1% (no device went down).
//!
//! Needs root, a pids controller (cgroup v1 or v2), fuse3.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aoe_testkit::cgroup::Cgroup;
use aoe_testkit::{wait_until, Netns, NsChild, VethPair};
use common::*;

/// The `pids.max` values tried: from too few for the main thread's first spawn to enough
/// for every thread a daemon starts (6 for `aoe initiator` without `--nbd`; 6 for
/// `aoe serve` with its 4 default workers to serve, 7 with its control socket's thread).
const PIDS: std::ops::RangeInclusive<u32> = 1..=8;

/// How long an access to ROOT may take before it counts as hung. A live initiator answers
/// an attribute read in microseconds; the base waited for ever.
const HUNG: Duration = Duration::from_secs(10);

/// Reads `path` on a thread of its own and waits at most [`HUNG`] for it: None if it did
/// not return (the thread is left blocked until the daemon is killed, which fails it).
fn bounded_read(path: &Path) -> Option<std::io::Result<String>> {
    let (tx, rx) = mpsc::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(fs::read_to_string(&path));
    });
    rx.recv_timeout(HUNG).ok()
}

/// Whether something is mounted on `root` (field 5 of /proc/self/mountinfo).
fn mounted(root: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = root.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == want))
}

/// Regression (session 36): `aoe initiator` under every small `pids.max` either exits 1
/// with an error that names EAGAIN, ROOT unmounted, or mounts ROOT and answers it with the
/// device up. On the base, `pids.max` 2 panicked (exit 101, "spawn the FUSE invalidator
/// thread") and `pids.max` 4 left ROOT mounted and hung.
#[test]
fn initiator_under_pids_max_fails_with_the_cause_or_serves() {
    require_tools();
    let (_dir, file, root) = backing_and_root('l', None);
    let t_ns = Netns::new("aoelt").expect("target namespace");
    let i_ns = Netns::new("aoeli").expect("initiator namespace");
    let veth = VethPair::new(&t_ns, &i_ns, 1500).expect("veth pair");
    let mut target = t_ns
        .spawn(Target::AoeServe.command(veth.a_name(), &file, &[]))
        .expect("start aoe serve");
    let state = root.join(format!("sysfs/block/etherd!{DEV}/state"));
    let mut outcomes = Vec::new();
    for pids in PIDS {
        let cg = Cgroup::new("pids").expect("a pids cgroup of the test's own");
        cg.write("pids.max", &pids.to_string()).expect("pids.max");
        let mut cmd = Command::new(AOE);
        cmd.arg("initiator")
            .arg("--root")
            .arg(&root)
            .arg("--iflist")
            .arg(veth.b_name());
        let mut init: NsChild = i_ns.spawn(cg.wrap(&cmd)).expect("start aoe initiator");
        let t0 = Instant::now();
        // Every pids.max is tried, and what went wrong with each reported at the end.
        let outcome = loop {
            if let Some(status) = init.try_wait().expect("wait for the initiator") {
                let out = init.output_so_far();
                if status.code() != Some(1) {
                    break Err(format!(
                        "pids.max {pids}: the initiator ended with {status}, not exit 1 with \
                         a message:\n{out}"
                    ));
                }
                if !out.contains("Resource temporarily unavailable") {
                    break Err(format!(
                        "pids.max {pids}: the initiator's error does not name the cause:\n{out}"
                    ));
                }
                if mounted(&root) {
                    break Err(format!(
                        "pids.max {pids}: ROOT still mounted after the initiator exited"
                    ));
                }
                break Ok(format!("{pids}: exit 1"));
            }
            if mounted(&root) {
                match bounded_read(&state) {
                    None => {
                        // SIGKILL aborts the connection, which fails the blocked read.
                        let out = init.output_so_far();
                        let _ = Command::new("kill")
                            .args(["-KILL", &init.pid().to_string()])
                            .status();
                        let _ = init.wait_timeout(Duration::from_secs(5));
                        let _ = Command::new("fusermount3")
                            .args(["-u", "-z"])
                            .arg(&root)
                            .status();
                        break Err(format!(
                            "pids.max {pids}: ROOT mounted but reading {} hung for {HUNG:?} \
                             (nobody serves the file system):\n{out}",
                            state.display()
                        ));
                    }
                    Some(Ok(s)) if s.trim() == "up" => break Ok(format!("{pids}: serves")),
                    // Not up yet, or already going (ENOTCONN, ENOENT): look again.
                    Some(_) => {}
                }
            }
            if t0.elapsed() > Duration::from_secs(20) {
                break Err(format!(
                    "pids.max {pids}: neither exited nor served within 20 s:\n{}",
                    init.output_so_far()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let running = init.is_running();
        let outcome = outcome.and_then(|o| match running {
            true => match init.stop() {
                Ok(s) if s.success() => Ok(o),
                st => Err(format!(
                    "pids.max {pids}: the initiator's stop: {st:?}\n{}",
                    init.output_so_far()
                )),
            },
            false => Ok(o),
        });
        drop(init);
        if !wait_until(Duration::from_secs(5), || !mounted(&root)) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&root)
                .status();
            panic!("pids.max {pids}: ROOT still mounted after the initiator stopped");
        }
        outcomes.push(outcome);
        drop(cg);
    }
    let failed: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    eprintln!("outcomes: {outcomes:?}");
    assert!(
        failed.is_empty(),
        "{} failed:\n{}",
        failed.len(),
        failed
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        outcomes
            .last()
            .is_some_and(|o| o.as_ref().is_ok_and(|o| o.ends_with("serves"))),
        "pids.max {} should be enough to serve: {outcomes:?}",
        PIDS.end()
    );
    target.stop().expect("stop the target");
    let _ = fs::remove_dir(&root);
}

/// Guard (held on the base too): `aoe serve` under every small `pids.max` either exits 1
/// naming what could not start (`cannot start I/O workers: Resource temporarily
/// unavailable`, `cannot start the state writer: ...`) or serves, its control thread left
/// out with a warning if that one could not start; never a panic.
#[test]
fn serve_under_pids_max_fails_with_the_cause_or_serves() {
    require_tools();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("disk.img");
    fs::write(&file, pattern(2, 1 << 20)).expect("backing file");
    let t_ns = Netns::new("aoelt").expect("target namespace");
    let i_ns = Netns::new("aoeli").expect("initiator namespace");
    let veth = VethPair::new(&t_ns, &i_ns, 1500).expect("veth pair");
    let mut outcomes = Vec::new();
    for pids in PIDS {
        let cg = Cgroup::new("pids").expect("a pids cgroup of the test's own");
        cg.write("pids.max", &pids.to_string()).expect("pids.max");
        let extra = ["--probe-ms".to_string(), "0".to_string()];
        let cmd = Target::AoeServe.command(veth.a_name(), &file, &extra);
        let mut t = t_ns.spawn(cg.wrap(&cmd)).expect("start aoe serve");
        let t0 = Instant::now();
        let outcome = loop {
            if let Some(status) = t.try_wait().expect("wait for the target") {
                let out = t.output_so_far();
                assert_eq!(
                    status.code(),
                    Some(1),
                    "pids.max {pids}: aoe serve ended with {status}:\n{out}"
                );
                assert!(
                    out.contains("cannot start") && out.contains("Resource temporarily"),
                    "pids.max {pids}: aoe serve's error does not name the cause:\n{out}"
                );
                break format!("{pids}: exit 1");
            }
            if t.output_so_far().contains("exporting") {
                let ping = i_ns
                    .command(AOE)
                    .args(["ping", "-t", "2"])
                    .arg(SHELF.to_string())
                    .arg(SLOT.to_string())
                    .arg(veth.b_name())
                    .output()
                    .expect("run aoe ping");
                assert!(
                    ping.status.success(),
                    "pids.max {pids}: aoe serve runs but does not answer: {}\n{}",
                    String::from_utf8_lossy(&ping.stderr),
                    t.output_so_far()
                );
                break format!("{pids}: serves");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "pids.max {pids}: aoe serve neither exited nor served within 20 s:\n{}",
                t.output_so_far()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        outcomes.push(outcome);
        if t.is_running() {
            let status = t.stop().expect("stop aoe serve");
            assert!(
                status.success(),
                "pids.max {pids}: aoe serve's stop: {status}\n{}",
                t.output_so_far()
            );
        }
        drop(cg);
    }
    eprintln!("outcomes: {outcomes:?}");
    assert!(
        outcomes.last().is_some_and(|o| o.ends_with("serves")),
        "pids.max {} should be enough to serve: {outcomes:?}",
        PIDS.end()
    );
}
