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
