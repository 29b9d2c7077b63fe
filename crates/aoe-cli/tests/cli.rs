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
