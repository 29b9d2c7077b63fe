//! Operations (issue 12): `aoe demo` end to end and interrupted, leaving nothing behind.

use std::fs;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use aoe_testkit::{require_root, require_tools, wait_until};

const AOE: &str = env!("CARGO_BIN_EXE_aoe");

fn demo_tools() {
    require_root();
    require_tools(&[
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("losetup", "mount"),
        ("blockdev", "util-linux"),
        ("mkfs.ext4", "e2fsprogs"),
        ("fsck.ext4", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
        ("fusermount3", "fuse3"),
    ]);
}

/// Everything a demo with process id `pid` could leave behind, named; empty when clean.
fn leftovers(pid: u32) -> Vec<String> {
    let tag = format!("aoedemo-{pid}");
    let mut left = Vec::new();
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    for l in String::from_utf8_lossy(&netns.stdout).lines() {
        if l.contains(&tag) {
            left.push(format!("namespace {l}"));
        }
    }
    for l in fs::read_to_string("/proc/self/mountinfo").unwrap().lines() {
        if l.contains(&tag) {
            left.push(format!("mount {l}"));
        }
    }
    let lo = Command::new("losetup").args(["-l", "-n"]).output().unwrap();
    for l in String::from_utf8_lossy(&lo.stdout).lines() {
        if l.contains(&tag) {
            left.push(format!("loop device {l}"));
        }
    }
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&tag) || cmdline.contains(&format!("aoedemo{}", pid % 1_000_000)) {
            left.push(format!(
                "process {}: {cmdline}",
                e.file_name().to_string_lossy()
            ));
        }
    }
    for dir in [
        format!("/run/{tag}"),
        std::env::temp_dir().join(&tag).display().to_string(),
    ] {
        if fs::metadata(&dir).is_ok() {
            left.push(format!("directory {dir}"));
        }
    }
    left
}

#[test]
fn demo_runs_end_to_end_and_leaves_nothing_behind() {
    demo_tools();
    let child = Command::new("timeout")
        .args(["300", AOE, "demo", "--no-install"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `timeout` runs the demo as its child: the demo's pid names what it makes.
    let timeout_pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "aoe demo: {}\n{stdout}\n{stderr}",
        out.status
    );
    for want in [
        "== aoe stat",
        "== mkfs.ext4",
        "== fsck.ext4",
        "== read back",
        "== figures",
        "DEMO OK",
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }
    // aoe-stat's row for the device, up.
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("e1.1") && l.contains(" up")),
        "no aoe-stat row for e1.1 up:\n{stdout}"
    );
    let pid = demo_pid(&stdout).unwrap_or(timeout_pid);
    let left = leftovers(pid);
    assert!(left.is_empty(), "left behind: {left:#?}\n{stdout}");
}

/// The demo's pid, from its namespace names in the first line.
fn demo_pid(stdout: &str) -> Option<u32> {
    let at = stdout.find("aoedemo-")? + "aoedemo-".len();
    stdout[at..].split('-').next()?.parse().ok()
}

#[test]
fn demo_interrupted_mid_way_removes_everything() {
    demo_tools();
    let mut child = Command::new(AOE)
        .args(["demo", "--no-install", "--write", "48"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    // Mid-way: the file system is mounted on the AoE device and being written.
    let mut seen = Vec::new();
    let mid = wait_until(Duration::from_secs(120), || {
        while let Ok(l) = rx.try_recv() {
            seen.push(l);
        }
        seen.iter().any(|l| l.starts_with("== write"))
    });
    assert!(mid, "the demo never reached the write step: {seen:#?}");
    assert!(
        !leftovers(pid).is_empty(),
        "mid-way, the demo should have made namespaces and mounts"
    );
    let sent = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let mut status = None;
    let done = wait_until(Duration::from_secs(90), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if !done {
        let _ = child.kill();
    }
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr);
    assert!(done, "the demo did not end within 90 s of SIGINT: {stderr}");
    assert_eq!(
        status.unwrap().code(),
        Some(130),
        "exit status; stderr:\n{stderr}"
    );
    assert!(stderr.contains("interrupted"), "{stderr}");
    let left = leftovers(pid);
    assert!(
        left.is_empty(),
        "left behind after SIGINT: {left:#?}\n{stderr}"
    );
}
