//! The `aoe` binary's own checks of its arguments, which need no privileges: this binary is
//! built by plain `cargo test`, unlike the namespace tests (feature `root-tests`).

use std::process::{Command, Stdio};

const AOE: &str = env!("CARGO_BIN_EXE_aoe");

/// `--nbd-tcp` on a non-loopback address is refused unless `--nbd-tcp-any` says it is meant
/// (NBD has no authentication), before anything is opened.
#[test]
fn nbd_tcp_refuses_non_loopback() {
    let o = Command::new(AOE)
        .args([
            "initiator",
            "--root",
            "/nonexistent/aoe-nbd-test",
            "--nbd-tcp",
            "0.0.0.0:10809",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run aoe");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--nbd-tcp-any"), "{err}");
}

/// Issue 9 item 6: with --config every export option comes from the file; vblade flags
/// given as well would be silently ignored (a `-r` export served writable), so they are a
/// usage error (exit 2) naming them. Needs no root: the refusal comes before any socket.
#[test]
fn vblade_flags_with_a_config_file_are_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    std::fs::write(&img, vec![0u8; 64 * 512]).unwrap();
    let img = img.to_str().unwrap().to_string();
    let conf = dir.path().join("serve.toml");
    std::fs::write(
        &conf,
        format!("[[export]]\npath = \"{img}\"\nshelf = 1\nslot = 1\ninterfaces = [\"lo\"]\n"),
    )
    .unwrap();
    let c = conf.to_str().unwrap();
    for (flags, named) in [
        (&["-r"][..], &["-r"][..]),
        (&["-d", "-s", "-b", "4"], &["-d", "-s", "-b"]),
        (
            &["-m", "02:00:00:00:00:01", "-o", "8", "-l", "8"],
            &["-m", "-o", "-l"],
        ),
        (&["--no-announce"], &["--no-announce"]),
    ] {
        let out = Command::new(AOE)
            .arg("serve")
            .args(["--config", c])
            .args(flags)
            .arg("--check")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {out:?}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{flags:?}: not one line: {err}"
        );
        for f in named {
            assert!(err.contains(f), "{flags:?}: {f} not named: {err}");
        }
    }
    // Positional arguments too (clap's conflict already refused these).
    let out = Command::new(AOE)
        .args(["serve", "--config", c, "1", "1", "lo", &img, "--check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// Audit: `aoe serve -m ff:ff:ff:ff:ff:ff` (any group address) would serve an export that
/// answers nobody; it is refused with one line, exit 1, naming the address. No root needed:
/// `--check` opens the file and looks up `lo`, nothing more.
#[test]
fn serve_refuses_a_group_mac_in_the_mask_list() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    std::fs::write(&img, vec![0u8; 64 * 512]).unwrap();
    let img = img.to_str().unwrap();
    for macs in ["ff:ff:ff:ff:ff:ff", "02:00:00:00:00:01,01:00:5e:00:00:01"] {
        let out = Command::new(AOE)
            .args(["serve", "-m", macs, "1", "1", "lo", img, "--check"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{macs}: {out:?}");
        assert_eq!(err.trim().lines().count(), 1, "{macs}: not one line: {err}");
        let bad = macs.rsplit(',').next().unwrap();
        assert!(
            err.contains(&format!("e1.1: {bad} is a multicast or broadcast address")),
            "{macs}: {err}"
        );
    }
    let out = Command::new(AOE)
        .args([
            "serve",
            "-m",
            "02:00:00:00:00:01",
            "1",
            "1",
            "lo",
            img,
            "--check",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// Audit: two writable exports of one file (here the second through a symlink) would
/// overwrite each other; `aoe serve --check` (and a start or reload, which apply the same
/// check) refuses them naming both, exit 1. Read-only on both sides is allowed.
#[test]
fn serve_refuses_overlapping_writable_exports() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("img1"), vec![0u8; 64 * 512]).unwrap();
    std::os::unix::fs::symlink("img1", dir.path().join("same")).unwrap();
    let conf = dir.path().join("serve.toml");
    let write = |ro: bool| {
        let e = |path: &str, slot: u8| {
            format!(
                "[[export]]\npath = \"{path}\"\nshelf = 1\nslot = {slot}\n\
                 interfaces = [\"lo\"]\nread_only = {ro}\n"
            )
        };
        std::fs::write(&conf, format!("{}{}", e("img1", 1), e("same", 2))).unwrap();
    };
    let check = || {
        Command::new(AOE)
            .arg("serve")
            .arg("--config")
            .arg(&conf)
            .arg("--check")
            .output()
            .unwrap()
    };
    write(false);
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains("e1.1 and e1.2 both export") && err.contains("both are writable"),
        "{err}"
    );
    write(true);
    let out = check();
    assert!(out.status.success(), "{out:?}");
}

/// Audit: `aoe serve` names its socket with `--control`; `aoe target` takes the same flag
/// (an alias of `--socket`) and documents it in --help.
#[test]
fn target_takes_control_like_serve() {
    let help = Command::new(AOE)
        .args(["target", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.status.success() && text.contains("--control"),
        "{text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let out = Command::new(AOE)
        .args(["target", "status", "--control"])
        .arg(&sock)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Not a usage error: the flag is taken, and the socket it names is what fails.
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(err.contains(sock.to_str().unwrap()), "{err}");
}

/// Audit (issue 14): `aoe ping abc 1 IF` pinged shelf 0 and `aoe ping 99999 1 IF` a wrapped
/// shelf, and without `-s` waited for ever; aoetools' aoeping (atoi) does the same, and for an
/// out-of-range or broadcast address never matches the answer either. Each is now a usage
/// error (exit 2) naming the argument, before any socket is opened, so `lo` is enough.
#[test]
fn ping_refuses_an_address_that_names_no_one_target() {
    for (shelf, slot, named) in [
        ("abc", "1", "<SHELF>"),
        ("99999", "1", "<SHELF>"),
        ("65535", "1", "broadcast shelf"),
        ("-1", "1", "<SHELF>"),
        ("1", "x", "<SLOT>"),
        ("1", "300", "<SLOT>"),
        ("1", "255", "broadcast slot"),
    ] {
        let mut child = Command::new(AOE)
            .args(["ping", "--", shelf, slot, "lo"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run aoe ping");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while child.try_wait().expect("try_wait").is_none() {
            if std::time::Instant::now() > deadline {
                child.kill().ok();
                panic!("aoe ping {shelf} {slot} lo still waiting after 20 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let o = child.wait_with_output().expect("output");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{shelf} {slot}: {err}");
        assert!(err.contains(named), "{shelf} {slot}: {err}");
    }
}

/// `aoe target monitor -c 0` printed the header and no line and exited 0: a count of nothing
/// is now a usage error (exit 2, one line naming the range), like `-i` below 0.1, checked
/// before any socket is opened (so no target is needed here).
#[test]
fn target_monitor_count_zero_is_a_usage_error() {
    for (args, named) in [
        (&["-c", "0"][..], "-c 0: the count is at least 1"),
        (&["-i", "0.05"][..], "-i 0.05: the interval is at least 0.1"),
    ] {
        let out = Command::new(AOE)
            .args([
                "target",
                "--socket",
                "/nonexistent/aoe-target.sock",
                "monitor",
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
        assert!(err.contains(named), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: printed {:?}", out.stdout);
    }
}
