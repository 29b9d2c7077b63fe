//! `aoe serve` at scale and under resource limits (session 35, the eighteenth audit): a
//! configuration of more than a thousand exports, the open-file limit a host sets, and the
//! answers of every export to a broadcast.
//!
//! What these pin (each failed on the session's base build, 44c48b4):
//! - the daemons raise `RLIMIT_NOFILE`'s soft limit to the hard one at start (one
//!   descriptor per export: 1024 exports under the usual soft limit of 1024 failed to start
//!   with EMFILE), and an EMFILE that is left names the limit;
//! - every export's start announcement leaves (past 1024 exports on an interface the rest
//!   were dropped: the send backlog gives Query Config responses 1024 places);
//! - the receive and transmit rings are sized by what the worker queue takes, not by the
//!   sum of the exports' buffer counts (1100 exports of 128 buffers took 930 MB resident);
//! - `aoe cfg` of the broadcast address hears every export (its socket's default buffer
//!   held about 270 answers).
//!
//! And `aoe initiator` with the devices of such a target (session 36):
//! - every device of 1024 that appear at once gets its partition files under a `pids.max`
//!   of 128 (the base build started a thread per device's partition scan, up to 1031 at
//!   once; a spawn refused at the cap dropped that device's scan with a warn line), and
//!   `ROOT`'s listing, `aoe stat` and the NBD export list name every device and partition.
//!
//! Needs root; frames stay on a veth pair between two namespaces the test creates.

mod common;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use aoe_testkit::cgroup::Cgroup;
use aoe_testkit::{wait_until, Netns, NsChild, VethPair};
use common::{proc_status, raw_socket, AOE, ROOTS};

/// Writes `dir/serve.toml` with `n` exports of 1 MiB sparse files on `netif`, 200 slots a
/// shelf from shelf 1, no probe (nothing else answers on the test's link).
fn many_exports(dir: &Path, n: usize, netif: &str) -> std::path::PathBuf {
    let mut text = String::from("probe_ms = 0\n");
    for i in 0..n {
        let file = dir.join(format!("{i}.img"));
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(1 << 20))
            .expect("sparse image");
        writeln!(
            text,
            "[[export]]\npath = \"{i}.img\"\nshelf = {}\nslot = {}\ninterfaces = [\"{netif}\"]",
            i / 200 + 1,
            i % 200
        )
        .expect("write to a String");
    }
    let cfg = dir.join("serve.toml");
    std::fs::write(&cfg, text).expect("write config");
    cfg
}

/// The (shelf, slot) of a Query Config response (AoE header: response flag in byte 14,
/// command 1 in byte 19; AoEr11 section 2), else None.
fn config_response(frame: &[u8]) -> Option<(u16, u8)> {
    (frame.len() >= 20 && frame[12..14] == [0x88, 0xa2] && frame[14] & 0x08 != 0 && frame[19] == 1)
        .then(|| (u16::from_be_bytes([frame[16], frame[17]]), frame[18]))
}

/// `prlimit --nofile=SOFT:HARD aoe serve --check --config CFG` in `ns`.
fn check_under(ns: &Netns, soft: u32, hard: u32, cfg: &Path) -> std::process::Output {
    ns.command("prlimit")
        .arg(format!("--nofile={soft}:{hard}"))
        .args([AOE, "serve", "--check", "--config"])
        .arg(cfg)
        .output()
        .expect("run prlimit aoe serve --check")
}

/// A start opens every store and holds it, and `--check` must find what the start would
/// (README, "Using the target"). Under a soft limit of 64 with a hard one of 4096, 200
/// exports must pass `--check` and start (the base build: `cannot open 57.img: Too many
/// open files`); under a hard limit of 64 `--check` must fail and name the limit and how to
/// raise it (the base build said "configuration ok", opening one store at a time).
#[test]
fn serve_raises_the_open_file_limit_and_names_the_hard_one_it_runs_into() {
    aoe_testkit::require_tools(&[
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("prlimit", "util-linux"),
    ]);
    let ns = Netns::new("s35nofile").expect("netns");
    ns.ip(&["link", "set", "lo", "up"]).expect("lo up");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = many_exports(dir.path(), 200, "lo");

    let out = check_under(&ns, 64, 4096, &cfg);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("configuration ok: 200 export(s)"),
        "200 exports under a soft limit of 64 (hard 4096): {}\n{text}",
        out.status
    );

    // The start itself, under the same limits: it must serve all 200 on the namespace's lo.
    let mut serve = ns.command("prlimit");
    serve
        .arg("--nofile=64:4096")
        .args([AOE, "serve", "--config"])
        .arg(&cfg);
    let mut target = NsChild::spawn_command(serve).expect("start aoe serve");
    let started = wait_until(Duration::from_secs(30), || {
        target.output_so_far().contains("control socket listening") || !target.is_running()
    });
    assert!(
        started && target.is_running(),
        "200 exports under a soft limit of 64 (hard 4096) did not start:\n{}",
        tail(&target.output_so_far())
    );
    let _ = target.stop();

    let out = check_under(&ns, 64, 64, &cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "hard limit 64: {err}");
    for want in [
        "Too many open files",
        "RLIMIT_NOFILE) of 64 (hard 64)",
        "ulimit -Hn",
    ] {
        assert!(err.contains(want), "hard limit 64: no {want:?} in: {err}");
    }
}

/// 1100 exports on one interface (more than the 1024 places the send backlog gives Query
/// Config responses): every export's start announcement arrives, the daemon stays under
/// 256 MiB resident, and `aoe cfg` of the broadcast address lists every export.
#[test]
fn eleven_hundred_exports_announce_and_answer_a_broadcast_each_in_bounded_memory() {
    const N: usize = 1100;
    aoe_testkit::require_tools(&[("ip", "iproute2"), ("nsenter", "util-linux")]);
    let tns = Netns::new("s35sct").expect("netns");
    let ins = Netns::new("s35sci").expect("netns");
    let link = VethPair::new(&tns, &ins, 1500).expect("veth");
    let (tif, iif) = (link.a_name().to_owned(), link.b_name().to_owned());
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = many_exports(dir.path(), N, &tif);

    let sock = raw_socket(&ins, &iif);
    sock.set_recv_buffer(16 << 20).expect("receive buffer");
    let mut serve = Command::new(AOE);
    serve.args(["serve", "--config"]).arg(&cfg);
    let mut target = NsChild::spawn(&tns, serve).expect("start aoe serve");

    // The announcements, until one from each export or 30 s.
    let mut announced = HashSet::new();
    let mut buf = vec![0u8; 9100];
    let deadline = Instant::now() + Duration::from_secs(30);
    while announced.len() < N && Instant::now() < deadline && target.is_running() {
        match sock.recv(&mut buf).expect("recv") {
            Some(meta) => announced.extend(config_response(&buf[..meta.len.min(buf.len())])),
            None => {
                let mut fds = [aoe_sys::PollFd::new(sock.as_raw_fd())];
                aoe_sys::poll(&mut fds, Some(Duration::from_millis(100))).expect("poll");
            }
        }
    }
    assert_eq!(
        announced.len(),
        N,
        "exports announced of {N} in 30 s; target:\n{}",
        tail(&target.output_so_far())
    );
    assert!(
        wait_until(Duration::from_secs(30), || target
            .output_so_far()
            .contains("control socket listening")),
        "target did not finish starting:\n{}",
        tail(&target.output_so_far())
    );
    let rss_kib = proc_status(target.pid(), "VmRSS:");
    assert!(
        rss_kib < 256 << 10,
        "aoe serve of {N} exports holds {} MiB resident (rings sized by the buffer counts?)",
        rss_kib >> 10
    );

    // A broadcast Query Config through the aoecfg tool: one answer (line) per export.
    let mut cfg_cmd = Command::new(AOE);
    cfg_cmd.args(["cfg", "65535", "255", &iif]);
    let mut tool = NsChild::spawn(&ins, cfg_cmd).expect("start aoe cfg");
    let lines = |t: &NsChild| t.output_so_far().lines().count();
    // Dropped answers never come: the wait ends at the count or at its deadline.
    let all = wait_until(Duration::from_secs(30), || lines(&tool) >= N);
    let heard = lines(&tool);
    let _ = tool.stop();
    assert!(
        all,
        "aoe cfg 65535 255 heard {heard} answers of {N} exports:\n{}",
        tail(&tool.output_so_far())
    );
    let _ = target.stop();
}

/// The last lines of a process's output, for messages (1100 "exporting" lines are many).
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The address of export `i` of [`many_exports`]: 200 slots a shelf from shelf 1.
fn export_addr(i: usize) -> (usize, usize) {
    (i / 200 + 1, i % 200)
}

/// `aoe initiator` in `ns` on ROOT `root`, inside `cgroup`, with its mount undone on drop
/// (a test that fails midway must not leave a FUSE mount behind).
struct CgInitiator {
    child: NsChild,
    root: std::path::PathBuf,
}

impl CgInitiator {
    fn start(ns: &Netns, cgroup: &Cgroup, root: &Path, args: &[&str]) -> CgInitiator {
        std::fs::create_dir_all(root).expect("create ROOT");
        let mut cmd = ns.command(AOE);
        cmd.arg("initiator").arg("--root").arg(root).args(args);
        let mut child = NsChild::spawn_command(cgroup.wrap(&cmd)).expect("start initiator");
        let discover = root.join("discover");
        let mounted = wait_until(Duration::from_secs(20), || {
            discover.exists() || !child.is_running()
        });
        assert!(
            mounted && child.is_running(),
            "aoe initiator did not mount {}:\n{}",
            root.display(),
            tail(&child.output_so_far())
        );
        CgInitiator {
            child,
            root: root.to_owned(),
        }
    }
}

impl Drop for CgInitiator {
    fn drop(&mut self) {
        let _ = self.child.stop_within(Duration::from_secs(30));
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.root)
            .output();
        let _ = std::fs::remove_dir(&self.root);
    }
}

/// 1024 devices with a partition table each appear at once before an initiator running
/// under a `pids.max` of 128 tasks: every device must get its `eX.Yp1` (the base build
/// started a thread per device's scan, and the spawns refused at the cap left 831 of 1024
/// devices without partition files, saying so only in a warn line). Then what a user lists
/// must be whole: `ROOT`'s directory (2048 device and partition files, in shelf.slot order,
/// read through FUSE a page of entries at a time), `aoe stat` (1024 rows, each up) and
/// `nbdinfo --list` (2048 exports).
#[test]
fn initiator_scans_every_partition_table_of_1024_devices_under_a_pids_max() {
    const N: usize = 1024;
    const PIDS_MAX: u32 = 128;
    aoe_testkit::require_tools(&[
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("fusermount3", "fuse3"),
        ("nbdinfo", "libnbd-bin"),
    ]);
    let tns = Netns::new("s36pst").expect("netns");
    let ins = Netns::new("s36psi").expect("netns");
    let link = VethPair::new(&tns, &ins, 1500).expect("veth");
    let (tif, iif) = (link.a_name().to_owned(), link.b_name().to_owned());
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = many_exports(dir.path(), N, &tif);
    // One Linux partition on each 1 MiB image: sectors 64 to 1087.
    let mut mbr = vec![0u8; 512];
    common::write_mbr_partition1(&mut mbr, 64, 1024);
    for i in 0..N {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(format!("{i}.img")))
            .expect("open image");
        std::os::unix::fs::FileExt::write_all_at(&f, &mbr, 0).expect("write the MBR");
    }
    let mut serve = Command::new(AOE);
    serve.args(["serve", "--config"]).arg(&cfg);
    let mut target = NsChild::spawn(&tns, serve).expect("start aoe serve");
    assert!(
        wait_until(Duration::from_secs(60), || target
            .output_so_far()
            .contains("control socket listening")
            || !target.is_running()),
        "target did not start:\n{}",
        tail(&target.output_so_far())
    );

    let cgroup = Cgroup::new("pids").unwrap_or_else(|e| panic!("cannot make a pids cgroup: {e}"));
    cgroup
        .write("pids.max", &PIDS_MAX.to_string())
        .unwrap_or_else(|e| panic!("cannot set pids.max: {e}"));
    let root = Path::new(ROOTS).join(format!("s36s{}", std::process::id()));
    let nbd = dir.path().join("nbd.sock");
    let nbd_arg = nbd.to_str().expect("UTF-8 path");
    let init = CgInitiator::start(
        &ins,
        &cgroup,
        &root,
        &["--iflist", &iif, "--max-devices", "2048", "--nbd", nbd_arg],
    );
    let mut want = Vec::new();
    for i in 0..N {
        let (shelf, slot) = export_addr(i);
        want.push(format!("e{shelf}.{slot}"));
        want.push(format!("e{shelf}.{slot}p1"));
    }
    let listing = || -> Vec<String> {
        std::fs::read_dir(&root)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with('e') && n != "err")
                    .collect()
            })
            .unwrap_or_default()
    };
    // Each device's partition file appears once its scan is done; a scan that is never
    // run never makes it, and the wait ends at its deadline.
    let all = wait_until(Duration::from_secs(60), || {
        listing().iter().filter(|n| n.ends_with("p1")).count() == N
    });
    let got = listing();
    let missing: Vec<&String> = want.iter().filter(|w| !got.contains(w)).collect();
    let log = init.child.output_so_far();
    assert!(
        all && missing.is_empty(),
        "{} of {} device and partition files missing after 60 s (first: {:?}); tasks \
         refused at pids.max {PIDS_MAX}: {:?}; initiator log lines about scans that could \
         not start: {}\n{}",
        missing.len(),
        want.len(),
        &missing[..missing.len().min(5)],
        cgroup.refused(),
        log.lines().filter(|l| l.contains("cannot start")).count(),
        tail(&log)
    );
    assert_eq!(
        got, want,
        "ROOT's listing: every file once, in shelf.slot order"
    );

    let stat = Command::new(AOE)
        .args(["stat", "--root"])
        .arg(&root)
        .output()
        .expect("run aoe stat");
    let rows = String::from_utf8_lossy(&stat.stdout);
    assert!(stat.status.success(), "aoe stat: {}", stat.status);
    assert_eq!(
        rows.lines().filter(|l| l.contains(" up ")).count(),
        N,
        "aoe stat rows of devices up:\n{rows}"
    );
    let list = Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd+unix:///?socket={nbd_arg}"))
        .output()
        .expect("run nbdinfo --list");
    let exports = String::from_utf8_lossy(&list.stdout);
    let mut named: Vec<&str> = exports
        .lines()
        .filter_map(|l| l.strip_prefix("export=\""))
        .filter_map(|l| l.trim_end_matches(':').strip_suffix('"'))
        .collect();
    named.sort_unstable();
    let mut want_sorted: Vec<&str> = want.iter().map(String::as_str).collect();
    want_sorted.sort_unstable();
    assert_eq!(
        named,
        want_sorted,
        "nbdinfo --list: {}",
        String::from_utf8_lossy(&list.stderr)
    );
    eprintln!(
        "{N} devices: initiator {} threads, {} MiB resident (peak {} MiB); cgroup peak {:?} \
         tasks, {:?} refused",
        proc_status(init.child.pid(), "Threads:"),
        proc_status(init.child.pid(), "VmRSS:") >> 10,
        proc_status(init.child.pid(), "VmHWM:") >> 10,
        cgroup.read("pids.peak").ok(),
        cgroup.refused()
    );
    drop(init);
    let _ = target.stop();
}
