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

/// Issue 15: `aoe serve --spin-us` takes 0 to 10000 (10 ms); more is refused by `--check`
/// (and a start) naming the limit, exit 1, not cut down silently.
#[test]
fn serve_refuses_a_spin_over_10_ms() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, vec![0u8; 64 * 512]).unwrap();
    let check = |us: &str| {
        Command::new(AOE)
            .args(["serve", "--check", "--spin-us", us, "1", "1", "lo"])
            .arg(&img)
            .output()
            .unwrap()
    };
    let out = check("10001");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains("at most 10000 us (10 ms), not 10001 us"),
        "{err}"
    );
    for ok in ["0", "10000"] {
        let out = check(ok);
        assert!(out.status.success(), "--spin-us {ok}: {out:?}");
    }
}

/// Issue 15: `aoe serve --coalesce-us` takes 0 to 1000 (1 ms); more is refused by `--check`
/// naming the limit, exit 1; a word is refused by the parser (exit 2).
#[test]
fn serve_refuses_a_coalescing_wait_over_1_ms() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, vec![0u8; 64 * 512]).unwrap();
    let check = |us: &str| {
        Command::new(AOE)
            .args(["serve", "--check", "--coalesce-us", us, "1", "1", "lo"])
            .arg(&img)
            .output()
            .unwrap()
    };
    let out = check("1001");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(err.contains("at most 1000 us (1 ms), not 1001 us"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(check("soon").status.code(), Some(2));
    for ok in ["0", "20", "1000"] {
        let out = check(ok);
        assert!(out.status.success(), "--coalesce-us {ok}: {out:?}");
    }
}

/// Audit (s8): `aoe serve -b 65535` was accepted and advertised 65535 in its Query Config
/// replies, but the worker queue holds 8192 requests (over all exports), so a burst of
/// O_DIRECT requests past that was dropped however honestly the initiator kept to the
/// advertised count, and the receive ring sized for it pinned 2.4 GB per interface at MTU
/// 9000. More than the target can queue is refused, naming the limit, exit 1.
#[test]
fn serve_refuses_a_buffer_count_it_cannot_queue() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::write(&img, vec![0u8; 64 * 512]).unwrap();
    let check = |b: &str| {
        Command::new(AOE)
            .args(["serve", "--check", "-b", b, "1", "1", "lo"])
            .arg(&img)
            .output()
            .unwrap()
    };
    for bad in ["8193", "65535"] {
        let out = check(bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "-b {bad}: {out:?}");
        assert_eq!(err.trim().lines().count(), 1, "-b {bad}: {err}");
        assert!(
            err.contains(&format!("buffer count {bad} is more than")) && err.contains("8192"),
            "-b {bad}: {err}"
        );
    }
    for ok in ["1", "8192"] {
        let out = check(ok);
        assert!(out.status.success(), "-b {ok}: {out:?}");
    }
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

/// A scratch directory holding `disk.img`, 1 MiB of zeroes, for the tests that need an
/// export to exist (kept while the directory lives).
fn scratch_disk() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    (dir, img)
}

/// Runs `aoe ARGS` with stdin closed; fails the test if it is still running after 20 s.
fn run_bounded(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(AOE)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run aoe");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().ok();
            panic!("aoe {args:?} still running after 20 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// Audit (s7): `aoecfg 70000 1 IF` asked shelf 4464 and `aoecfg 1 300 IF` slot 44 (C's
/// strtoul cast to the field's width; aoetools 36's aoecfg wraps alike, checked in a
/// namespace: `aoecfg -t 1 65537 1 IF` prints shelf 1's string), and a shelf of `abc` was
/// shelf 0; `-t -3` or `-t abc` waited for ever (aoetools: `select: Invalid argument`, exit 1,
/// or for ever). Each is now a usage error (exit 2) naming the argument and its range, before
/// any socket is opened; a name that is no interface shows the check comes first.
#[test]
fn cfg_refuses_out_of_range_and_junk_arguments() {
    for (args, named) in [
        (&["70000", "1"][..], "shelf 70000"),
        (&["65536", "1"], "shelf 65536"),
        (&["1", "300"], "slot 300"),
        (&["1", "256"], "slot 256"),
        (&["abc", "1"], "shelf abc"),
        (&["1x", "1"], "shelf 1x"),
        (&["1", "0x100"], "slot 0x100"),
        (&["-t", "-3", "1", "1"], "-t -3"),
        (&["-t", "abc", "1", "1"], "-t abc"),
    ] {
        let mut a = vec!["cfg"];
        a.extend_from_slice(args);
        a.push("aoe-no-such-if0");
        let o = run_bounded(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
        assert!(err.contains(named), "{args:?}: {named:?} not named: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
    }
    // The whole range, broadcast included, in strtoul's bases, still reaches the interface
    // lookup (exit 1 naming the interface).
    for args in [
        &["65535", "255"][..],
        &["0xffff", "0xff"],
        &["0", "0"],
        &["010", "7"],
        &["-t", "0", "1", "1"],
    ] {
        let mut a = vec!["cfg"];
        a.extend_from_slice(args);
        a.push("aoe-no-such-if0");
        let o = run_bounded(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {o:?}");
        assert!(err.contains("aoe-no-such-if0"), "{args:?}: {err}");
    }
}

/// Audit (s7): `aoe serve --probe-ms 18446744073709551615` (or `probe_ms` so in its TOML
/// file) started a probe that never ended, deaf to SIGTERM, and never served; `aoe
/// initiator --deadsecs 18446744073709551615` panicked its network thread ("overflow when
/// adding duration to instant") and left a daemon that answered nothing. Each is now
/// refused before anything is opened, naming the flag and its range (0 stays "no probe" /
/// "never down"); the largest accepted value is still taken.
#[test]
fn duration_flags_out_of_range_are_refused_with_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    std::fs::write(&img, vec![0u8; 64 * 512]).unwrap();
    let img = img.to_str().unwrap().to_string();
    let serve =
        |ms: &str| run_bounded(&["serve", "--probe-ms", ms, "1", "1", "lo", &img, "--check"]);
    for ms in ["18446744073709551615", "3600000", "10001"] {
        let o = serve(ms);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "--probe-ms {ms}: {o:?}");
        assert!(
            err.contains(&format!("probe_ms {ms}")) && err.contains("0 to 10000"),
            "--probe-ms {ms}: {err}"
        );
    }
    for ms in ["0", "10000"] {
        let o = serve(ms);
        assert!(o.status.success(), "--probe-ms {ms}: {o:?}");
    }
    let conf = dir.path().join("serve.toml");
    std::fs::write(
        &conf,
        format!(
            "probe_ms = 99999999\n[[export]]\npath = \"{img}\"\nshelf = 1\nslot = 1\n\
             interfaces = [\"lo\"]\n"
        ),
    )
    .unwrap();
    let o = run_bounded(&["serve", "--config", conf.to_str().unwrap(), "--check"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(err.contains("probe_ms 99999999"), "{err}");

    let root = dir.path().join("root");
    for secs in ["18446744073709551615", "86401"] {
        let o = run_bounded(&[
            "initiator",
            "--root",
            root.to_str().unwrap(),
            "--deadsecs",
            secs,
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "--deadsecs {secs}: {o:?}");
        assert!(
            err.contains(&format!("--deadsecs {secs}")) && err.contains("0 to 86400"),
            "--deadsecs {secs}: {err}"
        );
    }
}

/// Audit (s7): a TOML syntax error in `aoe serve --config` printed the parser's message as
/// is, over two lines (`FILE:2:1: invalid array` / ``expected `]` ``), at start and in the
/// reload's log line, where the README promises one line naming line and column.
#[test]
fn serve_config_syntax_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("serve.toml");
    for text in [
        "garbage = [\n",
        "[[export]]\npath = \"x\nshelf = 1\n",
        "a = 1\na = 2\n",
    ] {
        std::fs::write(&conf, text).unwrap();
        let o = run_bounded(&["serve", "--config", conf.to_str().unwrap(), "--check"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{text:?}: {o:?}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{text:?}: not one line: {err}"
        );
        assert!(err.contains("serve.toml:"), "{text:?}: {err}");
    }
}

/// Session 28 (operator's audit, session 27): an error found after the TOML parsed (a value
/// out of range, an export twice on an interface, a file that is not there, an interface
/// that is not there) names `FILE:LINE:COLUMN` as well as the export, as the parser's own
/// errors do; before, `FILE: e1.2: ...` or the export alone (`e1.2: no such interface`).
/// One line each, exit 1, the old wording after the place.
#[test]
fn serve_config_check_errors_name_the_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    std::fs::write(&img, vec![0u8; 64 * 512]).unwrap();
    let other = dir.path().join("b.img");
    std::fs::write(&other, vec![0u8; 64 * 512]).unwrap();
    let conf = dir.path().join("serve.toml");
    let export = |path: &str, slot: u8, iface: &str, extra: &str| {
        format!(
            "[[export]]\npath = \"{path}\"\nshelf = 1\nslot = {slot}\n\
             interfaces = [\"{iface}\"]\n{extra}\n"
        )
    };
    let good = export(img.to_str().unwrap(), 1, "lo", "");
    // Session 29: the offending key's line and its value's column (the second export's
    // `[[export]]` header is line 7; every error named 7:1 before).
    let at = |l: u32, c: u32| format!("{}:{l}:{c}: ", conf.display());
    for (second, want) in [
        (
            export("missing.img", 2, "lo", ""),
            format!("{}e1.2", at(8, 8)),
        ),
        (
            export(other.to_str().unwrap(), 2, "nosuch0", ""),
            format!("{}e1.2: no such interface \"nosuch0\"", at(11, 15)),
        ),
        (
            export(img.to_str().unwrap(), 2, "lo", "buffer_count = 9000"),
            format!("{}e1.2: buffer count 9000 is more than", at(12, 16)),
        ),
        (
            export(img.to_str().unwrap(), 1, "lo", ""),
            format!("{}e1.1 is exported twice on interface lo", at(11, 15)),
        ),
    ] {
        std::fs::write(&conf, format!("{good}{second}")).unwrap();
        let o = run_bounded(&["serve", "--config", conf.to_str().unwrap(), "--check"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{want}: {o:?}");
        // (Before it, `lo`'s warning that it is a loopback interface.)
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("aoe: ")).collect();
        assert_eq!(errors.len(), 1, "not one error line: {err}");
        assert!(errors[0].contains(&want), "want {want:?} in: {err}");
    }
    std::fs::write(&conf, format!("\nworkers = 0\n{good}")).unwrap();
    let o = run_bounded(&["serve", "--config", conf.to_str().unwrap(), "--check"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{}:2:11: workers must be from 1", conf.display())),
        "{err}"
    );
}

/// Audit (s7): `aoe bench --min-rto-us 5000000` was taken and silently capped: every
/// timeout is at most 2 s (the generator's cap), so a floor above it did nothing; and
/// `--spin-us` took any value. Both are now refused by the parser (exit 2) with the range,
/// before any socket; a value in range still reaches the interface lookup (exit 1).
#[test]
fn bench_tuning_flags_out_of_range_are_refused() {
    for (flag, v, range) in [
        ("--min-rto-us", "2000001", "0..=2000000"),
        ("--min-rto-us", "18446744073709551615", "0..=2000000"),
        ("--spin-us", "1000001", "0..=1000000"),
    ] {
        let o = run_bounded(&["bench", flag, v, "--target", "1.1", "aoe-no-such-if0"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flag} {v}: {o:?}");
        assert!(
            err.contains(flag) && err.contains(range),
            "{flag} {v}: {err}"
        );
    }
    for (flag, v) in [("--min-rto-us", "2000000"), ("--spin-us", "0")] {
        let o = run_bounded(&["bench", flag, v, "--target", "1.1", "aoe-no-such-if0"]);
        assert_eq!(o.status.code(), Some(1), "{flag} {v}: {o:?}");
    }
}

/// Audit (s7): `aoe-interfaces NOSUCHIF` printed aoetools' line (`aoe-interfaces Error:
/// "X" is not a network interface`) and then a second one of its own (`aoe: not a network
/// interface: X`); aoetools' script prints the first and exits 1. The check comes before
/// ROOT is written, so a directory with a `discover` file stands in for an initiator.
#[test]
fn interfaces_reports_a_bad_name_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("discover"), "").unwrap();
    let o = run_bounded(&[
        "interfaces",
        "--root",
        dir.path().to_str().unwrap(),
        "aoe-no-such-if0",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_eq!(
        err,
        "aoe-interfaces Error: \"aoe-no-such-if0\" is not a network interface\n"
    );
    assert!(
        !dir.path().join("interfaces").exists(),
        "ROOT/interfaces written"
    );
}

/// Audit (s7): `aoe target monitor -i 31` failed after 30 s with `Resource temporarily
/// unavailable`: the control connection's read timeout (30 s) was shorter than the interval
/// between the daemon's samples. And `-i 1e30` was taken (a monitor that never prints).
/// The read timeout now follows the interval, which is at most an hour. A stand-in daemon
/// answers the request 31 s late (no root needed: it is a Unix socket in a temporary
/// directory).
#[test]
fn target_monitor_waits_as_long_as_its_interval() {
    use std::io::{BufRead, Write};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("serve.sock");
    let o = run_bounded(&[
        "target",
        "--control",
        sock.to_str().unwrap(),
        "monitor",
        "-i",
        "3601",
        "-c",
        "1",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(err.contains("-i 3601") && err.contains("3600"), "{err}");

    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        // The daemon's first sample comes at once, later ones an interval apart; here the
        // answer comes after 31 s, past the old fixed 30 s.
        std::thread::sleep(std::time::Duration::from_secs(31));
        let _ = writeln!(&s, "{{\"ok\":false,\"error\":\"late-answer\"}}");
        line
    });
    let out = Command::new(AOE)
        .args(["target", "--control", sock.to_str().unwrap()])
        .args(["monitor", "-i", "40", "-c", "1"])
        .output()
        .unwrap();
    let req = server.join().unwrap();
    assert!(req.contains("\"interval_ms\":40000"), "{req}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("late-answer"),
        "gave up before the answer: {err}"
    );
}

/// Audit (s7): `aoe read --timeout 18446744073709551615` panicked ("overflow when adding
/// duration to instant"), `--timeout 0` gave up before any answer could come ("no answer
/// within 0ns"), and `aoe sancheck --wait 18446744073709551615` probed for ever. Both are
/// now 1 to 3600 seconds, refused by the parser (exit 2) before any socket.
#[test]
fn read_and_sancheck_waits_out_of_range_are_refused() {
    for args in [
        &[
            "read",
            "--timeout",
            "18446744073709551615",
            "1",
            "1",
            "aoe-no-such-if0",
            "/dev/null",
        ][..],
        &[
            "read",
            "--timeout",
            "0",
            "1",
            "1",
            "aoe-no-such-if0",
            "/dev/null",
        ],
        &["sancheck", "--wait", "18446744073709551615"],
        &["sancheck", "--wait", "0"],
    ] {
        let o = run_bounded(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
        assert!(err.contains("1..=3600"), "{args:?}: {err}");
    }
}

/// Audit (s7): `sos-linux --err-wait-ms 18446744073709551615` waited for ever for a first
/// `err` line when none was queued (the initiator's `err` blocks until one comes). It is now
/// 0 to 60000 ms, refused by the parser (exit 2) before anything is read or written.
#[test]
fn sos_linux_err_wait_out_of_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report.txt");
    let o = run_bounded(&[
        "sos-linux",
        "--err-wait-ms",
        "18446744073709551615",
        "-o",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(err.contains("0..=60000"), "{err}");
    assert!(!out.exists(), "a report was written");
}

/// `aoe target monitor -c 0` printed the header and no line and exited 0: a count of nothing
/// is now a usage error (exit 2, one line naming the range), checked before any socket is
/// opened (so no target is needed here). `-i` out of range is its parser's error
/// (`target_monitor_waits_as_long_as_its_interval`).
#[test]
fn target_monitor_count_zero_is_a_usage_error() {
    let out = Command::new(AOE)
        .args([
            "target",
            "--socket",
            "/nonexistent/aoe-target.sock",
            "monitor",
            "-c",
            "0",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(err.contains("-c 0: the count is at least 1"), "{err}");
    assert!(out.stdout.is_empty(), "printed {:?}", out.stdout);
}

/// Audit (s8): called by a multi-call name, a failure was still reported as `aoe: ...`, so a
/// script running `aoe-stat` or `aoe-flush` logged a program it never called. The message
/// now names the tool as called (one line, exit 1); `aoe stat` keeps `aoe: `.
#[test]
fn errors_name_the_multicall_tool_as_called() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("no-initiator");
    for name in ["aoe-stat", "aoe-flush", "aoe-discover"] {
        let link = dir.path().join(name);
        std::os::unix::fs::symlink(AOE, &link).unwrap();
        let out = Command::new(&link)
            .env("AOE_ROOT", &root)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {out:?}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: {err}");
        assert!(
            err.starts_with(&format!("{name}: no AoE initiator running")),
            "{name}: {err}"
        );
    }
    let out = Command::new(AOE)
        .args(["stat"])
        .env("AOE_ROOT", &root)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("aoe: no AoE initiator running"), "{err}");
}

/// `aoe --version` names the optional features built in (a second line, `features: rbd` or
/// `features: (none)`), so scripts and users can tell an rbd build from another.
#[test]
fn version_names_the_features_built_in() {
    let o = Command::new(AOE)
        .arg("--version")
        .output()
        .expect("run aoe");
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    let features = out
        .lines()
        .find_map(|l| l.strip_prefix("features: "))
        .unwrap_or_else(|| panic!("no features line in {out:?}"));
    assert_eq!(
        features.split_whitespace().any(|f| f == "rbd"),
        cfg!(feature = "rbd"),
        "{out:?}"
    );
}

/// Issue 14 (fixes round): `scripts/bench-rbd.sh` given a binary built without the `rbd`
/// feature stops at once, exit status 1, with one line naming the feature, before it needs
/// root or starts a cluster. On main it started the cluster and printed a table of 0 MB/s
/// (every `rbd:` export refused). The binary here is a stand-in that reports no features,
/// as `aoe --version` of such a build does.
#[test]
fn bench_rbd_refuses_a_binary_without_the_rbd_feature() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("aoe");
    // Written by a child process, not by this one: a file this process opens for writing
    // is open, for a moment, in every child another test's thread forks meanwhile (until
    // that child's exec closes it), and executing it then fails with ETXTBSY ("Text file
    // busy"; rust-lang/rust#114554).
    let st = Command::new("sh")
        .args([
            "-c",
            "printf '#!/bin/sh\\necho \\047aoe 0.1.0\\047\\necho \\047features: (none)\\047\\n' \
             > \"$1\" && chmod 755 \"$1\"",
            "sh",
        ])
        .arg(&fake)
        .status()
        .expect("write the fake aoe");
    assert!(st.success());
    assert_eq!(
        std::fs::read_to_string(&fake).unwrap(),
        "#!/bin/sh\necho 'aoe 0.1.0'\necho 'features: (none)'\n"
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/bench-rbd.sh");
    let o = Command::new("bash")
        .arg(script)
        .env("AOE", &fake)
        .stdin(Stdio::null())
        .output()
        .expect("run bench-rbd.sh");
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("without the rbd feature"), "{err}");
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// Audit (2026-12-04): run without root, `aoe serve` said only `cannot open AoE socket on
/// interface IF: Operation not permitted (os error 1)`, after a warning that it fell back
/// from packet rings (which failed the same way), and `aoe ping` the same: now one line
/// saying that raw packet sockets need root or CAP_NET_RAW, and no fallback warning. Run as
/// `nobody` (when the test runs as root, in a network namespace of its own first, so that
/// nothing could reach the host's `lo` if the drop of privilege failed).
#[test]
fn without_cap_net_raw_the_error_says_what_is_needed() {
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o666)).unwrap();
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    for args in [
        &[
            "serve",
            "--probe-ms",
            "0",
            "1",
            "1",
            "lo",
            img.to_str().unwrap(),
        ][..],
        &["ping", "-t", "1", "1", "1", "lo"],
    ] {
        let mut cmd = if root {
            let mut c = Command::new("unshare");
            c.args([
                "--net",
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                AOE,
            ]);
            c
        } else {
            Command::new(AOE)
        };
        let o = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run aoe");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("root or a process with CAP_NET_RAW"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("packet rings"), "{args:?}: {err}");
    }
}

/// Audit (2026-12-04): `aoe serve -r -s` (and `read_only` with `sync` in a config file) took
/// `-s` and did nothing with it, as vblade does: a read-only export takes no writes to make
/// durable. It still starts (vblade's arguments), and says so in one line; `-r` alone and
/// `-s` alone say nothing. `--check` opens no socket, so `lo` is enough.
#[test]
fn sync_on_a_read_only_export_is_said_to_do_nothing() {
    let (_dir, img) = scratch_disk();
    let img = img.to_str().unwrap();
    for (flags, warned) in [
        (&["-r", "-s"][..], true),
        (&["-r"], false),
        (&["-s"], false),
    ] {
        let mut args = vec!["serve", "--check"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["1", "1", "lo", img]);
        let o = run_bounded(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{flags:?}: {err}");
        assert_eq!(
            err.contains("has no effect on a read-only export"),
            warned,
            "{flags:?}: {err}"
        );
    }
}

/// Sixth audit (s23): `aoe bench ... | head -1` panicked when `head` had gone (the report
/// written with `println!`, Rust's `SIGPIPE` ignored), and so did `aoe generate completions`
/// (clap_complete's write), `aoe version` and `aoe-version`. A closed standard output now ends
/// each as it ends `cat`: by `SIGPIPE`, without a message; `aoe serve --check` (a daemon's
/// subcommand, `SIGPIPE` kept ignored) the same through its own writes.
#[test]
fn a_closed_standard_output_ends_the_tools_quietly() {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let dir = std::env::temp_dir().join(format!("aoe-cli-epipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let img = img.to_str().unwrap().to_owned();
    let runs: &[(&str, &[&str])] = &[
        ("aoe", &["generate", "completions", "bash"]),
        ("aoe", &["version"]),
        ("aoe-version", &[]),
        ("aoe", &["serve", "1", "1", "lo", &img, "--check"]),
    ];
    for (name, args) in runs {
        let writer = closed_pipe(&dir);
        let o = Command::new(AOE)
            .arg0(name)
            .args(*args)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("run aoe");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{name} {args:?}: {err}");
        assert_eq!(
            o.status.signal(),
            Some(13),
            "{name} {args:?}: not ended by SIGPIPE: {:?} {err}",
            o.status
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The write end of a pipe whose reader is gone: a FIFO in `dir` opened for reading without
/// waiting, then for writing, then its reader closed (std's `io::pipe` is newer than the
/// workspace's minimum Rust).
fn closed_pipe(dir: &std::path::Path) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    let fifo = dir.join("fifo");
    let _ = std::fs::remove_file(&fifo);
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success(), "mkfifo");
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(0o4000) // O_NONBLOCK: no writer yet
        .open(&fifo)
        .expect("open the FIFO for reading");
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .expect("open the FIFO for writing");
    drop(reader);
    writer
}

/// Operator's audit (session 27): `aoe target --socket PATH` where PATH is a socket nothing
/// listens on (left by a target killed with SIGKILL), or not a socket at all, says which in
/// words; before, only `Connection refused (os error 111)` for both.
#[test]
fn aoe_target_on_a_stale_socket_or_a_file_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let file = dir.path().join("disk.img");
    std::fs::write(&file, b"").unwrap();
    for (path, said) in [
        (&stale, "no aoe serve listens on it"),
        (&file, "not a socket"),
    ] {
        let o = run_bounded(&["target", "--socket", path.to_str().unwrap(), "status"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{path:?}: {o:?}");
        assert!(err.contains(said), "{path:?}: {said:?} not said: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{path:?}: not one line: {err}"
        );
    }
}

/// Session 29's audit of the flags: `aoe bench --seed` with a mode that goes in order, and
/// `--rate-burst-ms` without `--rate` or `--rate-iops`, were taken and did nothing (a run
/// meant to follow a seed or be paced measured something else, without a word). Each is a
/// usage error (exit 2) naming the flag, before any socket; where it means something the run
/// goes on to the missing interface (exit 1). Base (1994e57): exit 1 for all of them.
#[test]
fn bench_flags_that_would_do_nothing_are_refused() {
    let refused: &[&[&str]] = &[
        &["--seed", "7"],
        &["--seed", "7", "--mode", "write", "--write"],
        &["--seed", "7", "--mode", "verify", "--write"],
        &["--rate-burst-ms", "10"],
        &["--rate-burst-ms", "0", "--mode", "randread"],
    ];
    for flags in refused {
        let mut args = vec!["bench", "--target", "1.1", "aoe-no-such-if0"];
        args.extend_from_slice(flags);
        let o = run_bounded(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(flags[0]), "{flags:?}: {err}");
    }
    let taken: &[&[&str]] = &[
        &["--seed", "7", "--mode", "randread"],
        &["--seed", "7", "--mode", "randwrite", "--write"],
        &["--rate-burst-ms", "10", "--rate", "1M"],
        &["--rate-burst-ms", "10", "--rate-iops", "100"],
    ];
    for flags in taken {
        let mut args = vec!["bench", "--target", "1.1", "aoe-no-such-if0"];
        args.extend_from_slice(flags);
        let o = run_bounded(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{flags:?}: {err}");
        assert!(err.contains("aoe-no-such-if0"), "{flags:?}: {err}");
    }
}

/// Session 29's audit: `--dedup-window-ms` and `--dedup-entries` had no upper bound (a
/// table of 10^12 entries per export taken, growing with the writes), and one of them given
/// beside the other at 0, or `--allow-duplicate` beside `--probe-ms 0`, did nothing without
/// a word. Out of range: one line naming the flag and its range, exit 1; the others start
/// (vblade's scripts may carry them) with one warning line each, and a setting that does
/// something is not warned about. `--check` opens no socket. Base (1994e57): every one
/// `configuration ok`, no warning.
#[test]
fn serve_dedup_and_probe_settings_that_do_nothing_are_said() {
    let (_dir, img) = scratch_disk();
    let img = img.to_str().unwrap();
    let check = |flags: &[&str]| {
        let mut args = vec!["serve", "--check"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["1", "1", "lo", img]);
        let o = run_bounded(&args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        (o.status.code(), err)
    };
    for (flag, v, range) in [
        ("--dedup-window-ms", "3600001", "from 0 to 3600000 ms"),
        (
            "--dedup-window-ms",
            "18446744073709551615",
            "from 0 to 3600000 ms",
        ),
        ("--dedup-entries", "1048577", "from 0 to 1048576"),
        ("--dedup-entries", "999999999999", "from 0 to 1048576"),
    ] {
        let (code, err) = check(&[flag, v]);
        assert_eq!(code, Some(1), "{flag} {v}: {err}");
        assert!(
            err.contains(flag) && err.contains(range),
            "{flag} {v}: {err}"
        );
    }
    for (flags, warned) in [
        (
            &["--dedup-window-ms", "0", "--dedup-entries", "5"][..],
            Some("--dedup-entries 5 has no effect"),
        ),
        (
            &["--dedup-window-ms", "500", "--dedup-entries", "0"],
            Some("--dedup-window-ms 500 has no effect"),
        ),
        (
            &["--allow-duplicate", "--probe-ms", "0"],
            Some("--allow-duplicate (allow_duplicate) has no effect"),
        ),
        (
            &["--dedup-window-ms", "3600000", "--dedup-entries", "1048576"],
            None,
        ),
        (&["--dedup-window-ms", "0", "--dedup-entries", "0"], None),
        (&["--dedup-window-ms", "0"], None),
        (&["--allow-duplicate"], None),
        (&["--probe-ms", "0"], None),
    ] {
        let (code, err) = check(flags);
        assert_eq!(code, Some(0), "{flags:?}: {err}");
        match warned {
            Some(w) => assert!(err.contains(w), "{flags:?}: no {w:?} in {err}"),
            None => assert!(!err.contains("has no effect"), "{flags:?}: {err}"),
        }
    }
}

/// Session 29's audit: `allow_duplicate = true` with `probe_ms = 0` in a config file did
/// nothing without a word, as on the command line. Base (1994e57): `configuration ok`
/// alone.
#[test]
fn a_config_files_allow_duplicate_without_a_probe_is_said() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    std::fs::write(&img, vec![0u8; 64 * 512]).unwrap();
    let conf = dir.path().join("serve.toml");
    std::fs::write(
        &conf,
        format!(
            "allow_duplicate = true\nprobe_ms = 0\n[[export]]\npath = \"{}\"\nshelf = 1\n\
             slot = 1\ninterfaces = [\"lo\"]\n",
            img.display()
        ),
    )
    .unwrap();
    let o = run_bounded(&["serve", "--check", "--config", conf.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("allow_duplicate) has no effect"), "{err}");
}

/// Session 29's audit: `aoe serve --check --metrics ADDR` (or `--control PATH`) said
/// `configuration ok` and tried neither: a port already taken passed the check. `--check`
/// still binds nothing (a running target may hold them), and says in one line that it did
/// not try them. Base (1994e57): no such line.
#[test]
fn check_says_it_does_not_try_metrics_or_control() {
    let (dir, img) = scratch_disk();
    let img = img.to_str().unwrap();
    let sock = dir.path().join("ctl.sock");
    let sock = sock.to_str().unwrap();
    for (flags, said) in [
        (&["--metrics", "127.0.0.1:1"][..], Some("--metrics")),
        (&["--control", sock], Some("--control")),
        (&[], None),
    ] {
        let mut args = vec!["serve", "--check"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["1", "1", "lo", img]);
        let o = run_bounded(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{flags:?}: {err}");
        match said {
            Some(f) => assert!(
                err.contains(&format!("--check does not try {f}")),
                "{flags:?}: {err}"
            ),
            None => assert!(!err.contains("--check does not try"), "{flags:?}: {err}"),
        }
        assert!(!std::path::Path::new(sock).exists(), "--check made {sock}");
    }
}

/// Session 29's audit: an `AOE_LOG` that does not parse (`aoe=verbose`) fell back to `info`
/// without a word. It still does (a log setting should not stop a target), and says so in
/// one warning naming the value. Base (1994e57): no line about AOE_LOG.
#[test]
fn a_log_filter_that_does_not_parse_is_said() {
    assert_aoe_log_warnings(
        &[
            ("aoe=verbose", true),
            ("debug", false),
            ("aoe_target=debug", false),
        ],
        |value| format!("AOE_LOG={value:?} is not a log filter"),
    );
}

/// Session 29's audit: a daemon's last line (`aoe: ...` on a failure) written to a standard
/// error whose reader had gone (`aoe serve ... 2>&1 | head -3` where `head` is done) panicked
/// (`eprintln!` on EPIPE with SIGPIPE ignored), and the exit status was 101, not the error's
/// 1. Now the line is dropped and the status kept. Base (1994e57): 101.
#[test]
fn a_failure_with_standard_error_closed_keeps_its_exit_status() {
    let dir = std::env::temp_dir().join(format!("aoe-cli-stderr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let o = Command::new(AOE)
        .args([
            "serve",
            "--check",
            "1",
            "1",
            "aoe-no-such-if0",
            img.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(closed_pipe(&dir))
        .status()
        .expect("run aoe");
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(o.code(), Some(1), "{o:?}");
}

/// Session 29's audit: `conflict_check_s = 30` beside `probe_ms = 0` (in the file, or
/// `--probe-ms 0` over it) turned the conflict watch off without a word: its probe waits
/// `probe_ms`, and at 0 none runs. One warning line now; without the key (the default
/// watch) or with it at 0, none. Base (1994e57): no such line.
#[test]
fn a_conflict_watch_without_a_probe_is_said() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    std::fs::write(&img, vec![0u8; 64 * 512]).unwrap();
    let export = format!(
        "[[export]]\npath = \"{}\"\nshelf = 1\nslot = 1\ninterfaces = [\"lo\"]\n",
        img.display()
    );
    for (keys, flags, warned) in [
        ("conflict_check_s = 30\nprobe_ms = 0\n", &[][..], true),
        ("conflict_check_s = 30\n", &["--probe-ms", "0"][..], true),
        ("conflict_check_s = 30\n", &[][..], false),
        ("probe_ms = 0\n", &[][..], false),
        ("conflict_check_s = 0\nprobe_ms = 0\n", &[][..], false),
    ] {
        let conf = dir.path().join("serve.toml");
        std::fs::write(&conf, format!("{keys}{export}")).unwrap();
        let mut args = vec!["serve", "--check", "--config", conf.to_str().unwrap()];
        args.extend_from_slice(flags);
        let o = run_bounded(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{keys:?} {flags:?}: {err}");
        assert_eq!(
            err.contains("conflict_check_s = 30 has no effect with probe_ms = 0"),
            warned,
            "{keys:?} {flags:?}: {err}"
        );
    }
}

/// Session 29's audit: `--workers N` (or `workers = N`) when every export is an `rbd:`
/// image did nothing without a word: the worker pool runs files' and block devices' I/O,
/// librbd an image's. One warning line now (before the store is opened, so it shows
/// whether or not a cluster answers: here none, `--ceph-conf` names no file); a file export
/// says nothing. Base (1994e57): no such line.
#[test]
fn workers_beside_only_rbd_exports_are_said_to_do_nothing() {
    let (dir, img) = scratch_disk();
    let conf = dir.path().join("no-ceph.conf");
    let conf = conf.to_str().unwrap();
    let said = "--workers 8 (workers) has no effect while every export is an rbd: image";
    let o = run_bounded(&[
        "serve",
        "--check",
        "--workers",
        "8",
        "--ceph-conf",
        conf,
        "1",
        "1",
        "lo",
        "rbd:pool/img",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(said), "{err}");
    let o = run_bounded(&[
        "serve",
        "--check",
        "--workers",
        "8",
        "1",
        "1",
        "lo",
        img.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("has no effect"), "{err}");
}

/// Session 29's audit: `AOE_LOG=debugg` (a level mistyped) parses as a filter for a module
/// named `debugg` and turned every log line off, warnings included, without a word. One line
/// now, written past the filter; a level, a module of ours, or a level beside a filter say
/// nothing. Base (1994e57): stderr empty for `debugg`.
#[test]
fn a_mistyped_log_level_is_said() {
    assert_aoe_log_warnings(
        &[
            ("debugg", true),
            ("info,infoo", true),
            ("debug", false),
            ("aoe_target=debug", false),
            ("warn,aoe=debug", false),
        ],
        |_| "which is no level (trace, debug, info, warn, error, off)".to_owned(),
    );
}

/// `aoe serve --check` of a scratch export under each `AOE_LOG` value of `cases`: it
/// succeeds, and its standard error holds `said(value)` exactly where `cases` says it warns.
fn assert_aoe_log_warnings(cases: &[(&str, bool)], said: impl Fn(&str) -> String) {
    let (_dir, img) = scratch_disk();
    for &(value, warned) in cases {
        let o = Command::new(AOE)
            .args(["serve", "--check", "1", "1", "lo", img.to_str().unwrap()])
            .env("AOE_LOG", value)
            .stdin(Stdio::null())
            .output()
            .expect("run aoe");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{value}: {err}");
        assert_eq!(err.contains(&said(value)), warned, "{value}: {err}");
    }
}

/// Session 29's audit: `aoe serve --check --state-dir DIR` did not load the state files a
/// start loads, so it said `configuration ok` for a state file that does not parse (or a
/// `--state-dir` naming a regular file) and the start then refused it (`cannot load
/// state`). `--check` now loads them as the start does, read only; a directory without the
/// file (the first start) is fine. Base (1994e57): exit 0 for both bad cases.
#[test]
fn check_loads_the_state_files_a_start_loads() {
    let (dir, img) = scratch_disk();
    let img = img.to_str().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let st = state.to_str().unwrap();
    let check = |state_dir: &str| {
        let o = run_bounded(&[
            "serve",
            "--check",
            "--state-dir",
            state_dir,
            "1",
            "1",
            "lo",
            img,
        ]);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = check(st);
    assert_eq!(code, Some(0), "no state file yet: {err}");
    std::fs::write(state.join("e1.1.toml"), "mask = 5\n").unwrap();
    let (code, err) = check(st);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("e1.1: cannot load state") && err.contains("e1.1.toml"),
        "{err}"
    );
    let (code, err) = check(img);
    assert_eq!(code, Some(1), "a state dir that is the image: {err}");
    assert!(err.contains("cannot load state"), "{err}");
    assert!(
        std::fs::metadata(img).unwrap().is_file(),
        "the image was touched"
    );
}

/// Twelfth audit, Left: an export whose `-o`/`-l` window starts or ends inside an aligned
/// block of its file shares that block with whatever else writes the file; `aoe serve`
/// processes lock it, vblade does not (the audit lost acknowledged writes so). Said once per
/// export, naming the export, the edge and the block size, by a start, a reload that opens
/// it and `--check`, for the command line and the config file's `offset`/`length` alike. The
/// file is on tmpfs, which reports no `STATX_DIOALIGN`: 4096 is counted. A window on the
/// blocks, the whole file and a window ending at the file's end say nothing. Base (1994e57):
/// no line.
#[test]
fn a_window_not_on_its_files_blocks_is_said() {
    let dir = tempfile::Builder::new()
        .prefix("aoe-cli-edges")
        .tempdir_in("/dev/shm")
        .expect("a directory on /dev/shm (tmpfs) for a file without STATX_DIOALIGN");
    let img = dir.path().join("disk.img");
    // 62 sectors: the file ends inside its last block, which no one else shares.
    std::fs::write(&img, vec![0u8; 62 * 512]).unwrap();
    let img = img.to_str().unwrap();
    let check = |flags: &[&str]| {
        let mut args = vec!["serve", "--check"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["1", "1", "lo", img]);
        let o = run_bounded(&args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{flags:?}: {err}");
        err
    };
    let said = |err: &str| {
        err.lines()
            .filter(|l| l.contains("inside the 4096-byte block"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let err = check(&["-o", "3", "-l", "8"]);
    let lines = said(&err);
    assert_eq!(lines.len(), 1, "one line for the export: {err}");
    for part in [
        "e1.1: its start (-o, offset) at sector 3 is inside the 4096-byte block of sectors 0-7",
        "end (-o + -l, offset + length) at sector 11 is inside the 4096-byte block of sectors 8-15",
        "vblade",
        "multiples of 8 sectors",
    ] {
        assert!(lines[0].contains(part), "{part:?} not in {err}");
    }
    let err = check(&["-o", "8", "-l", "20"]);
    let lines = said(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        !lines[0].contains("start"),
        "the start is on a block: {err}"
    );
    assert!(lines[0].contains("at sector 28"), "{err}");
    for flags in [
        &["-o", "8", "-l", "16"][..],
        &[],
        &["-o", "56"],
        &["-r", "-o", "3"],
    ] {
        let err = check(flags);
        assert!(said(&err).is_empty(), "{flags:?} said: {err}");
    }
    // The config file's keys, as the same words say.
    let conf = dir.path().join("serve.toml");
    std::fs::write(
        &conf,
        format!(
            "[[export]]\npath = \"{img}\"\nshelf = 2\nslot = 5\ninterfaces = [\"lo\"]\n\
             offset = 16\nlength = 9\n"
        ),
    )
    .unwrap();
    let o = run_bounded(&["serve", "--check", "--config", conf.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let lines = said(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("e2.5: its end (-o + -l, offset + length) at sector 25"),
        "{err}"
    );
}

/// Session 29's audit of the flags, Left: `aoe trace -c 0` listened and stopped at once with
/// `0 frames`, and `aoe read --count 0` reached the socket before anything was said of the
/// count. Both counts are now at least 1: a usage error (exit 2) naming the flag and the
/// range, before any socket (the interface named does not exist); a count of 1 gets past
/// the parser to the interface. Base (1994e57): exit 1 at the missing interface.
#[test]
fn trace_and_read_counts_of_zero_are_usage_errors() {
    let read = |count: &'static str| {
        [
            "read",
            "--count",
            count,
            "1",
            "1",
            "aoe-no-such-if0",
            "/dev/null",
        ]
    };
    for (args, flag) in [
        (
            &["trace", "-c", "0", "aoe-no-such-if0"][..],
            "--count <COUNT>",
        ),
        (&read("0")[..], "--count <COUNT>"),
    ] {
        let o = run_bounded(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&format!("invalid value '0' for '{flag}'"))
                && err.contains("0 is not in 1.."),
            "{args:?}: {err}"
        );
        assert!(!err.contains("aoe-no-such-if0"), "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?} printed {:?}", o.stdout);
    }
    for args in [&["trace", "-c", "1", "aoe-no-such-if0"][..], &read("1")[..]] {
        let o = run_bounded(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("aoe-no-such-if0"), "{args:?}: {err}");
    }
}
