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
//! Needs root; frames stay on a veth pair between two namespaces the test creates.

mod common;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use aoe_testkit::{wait_until, Netns, NsChild, VethPair};
use common::{proc_status, raw_socket, AOE};

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
