//! `aoe_testkit::fuseuring::FuseUring` across processes (session 35): test processes that
//! run at once share the setting of `enable_uring`, and the machine is left as found. Each
//! test runs guards in child processes (this test binary again, `child`), on a parameter
//! file and lock files of its own in a temporary directory
//! (`AOE_TESTKIT_FUSE_URING_PARAM`, `AOE_TESTKIT_FUSE_URING_DIR`), so the machine's
//! parameter is not touched and no root is needed.
//!
//! Before, the guards ordered the parameter within one process only: a second process's
//! enabled guard was left with `N` when the first one's drop restored the value it had
//! found, and a disabled guard set `N` under another process's enabled one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use aoe_testkit::fuseuring::FuseUring;

const ROLE: &str = "FUSE_URING_TEST_ROLE";
const NAME: &str = "FUSE_URING_TEST_NAME";

/// A child's part (a no-op in the parent run): takes the guard its role names, says
/// `NAME.held`, waits for `NAME.go`, then drops it (`enabled`, `disabled`) or exits without
/// dropping it (`dies`).
#[test]
fn child() {
    let (Ok(role), Ok(name)) = (std::env::var(ROLE), std::env::var(NAME)) else {
        return;
    };
    let dir = PathBuf::from(std::env::var("AOE_TESTKIT_FUSE_URING_DIR").unwrap());
    std::fs::write(dir.join(format!("{name}.trying")), "").unwrap();
    let guard = match role.as_str() {
        "enabled" | "dies" => FuseUring::enabled().unwrap(),
        "disabled" => FuseUring::disabled().unwrap(),
        r => panic!("role {r}"),
    };
    std::fs::write(dir.join(format!("{name}.held")), "").unwrap();
    assert!(
        wait_file(&dir.join(format!("{name}.go"))),
        "{name}: no go within 60 s"
    );
    if role == "dies" {
        std::process::exit(0);
    }
    drop(guard);
}

fn wait_file(p: &Path) -> bool {
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        if p.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

struct Rig {
    dir: tempfile::TempDir,
}

impl Rig {
    fn new(value: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("enable_uring"), format!("{value}\n")).unwrap();
        Rig { dir }
    }

    fn param(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("enable_uring"))
            .unwrap()
            .trim()
            .to_string()
    }

    fn file(&self, name: &str, what: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.{what}"))
    }

    /// Starts a child holding a guard of `role`, and waits until it says `what`.
    fn spawn(&self, name: &str, role: &str, what: &str) -> Child {
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .env(NAME, name)
            .env("AOE_TESTKIT_FUSE_URING_DIR", self.dir.path())
            .env(
                "AOE_TESTKIT_FUSE_URING_PARAM",
                self.dir.path().join("enable_uring"),
            )
            .spawn()
            .unwrap();
        assert!(
            wait_file(&self.file(name, what)),
            "{name} ({role}) did not say {what} within 60 s"
        );
        child
    }

    /// Lets a child drop its guard (or die) and waits for it to exit.
    fn release(&self, name: &str, mut child: Child) {
        std::fs::write(self.file(name, "go"), "").unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "{name} exited with {status}");
    }
}

#[test]
fn two_processes_share_the_setting_and_the_last_one_restores_it() {
    let rig = Rig::new("N");
    let a = rig.spawn("a", "enabled", "held");
    let b = rig.spawn("b", "enabled", "held");
    assert_eq!(rig.param(), "Y");
    rig.release("a", a);
    assert_eq!(
        rig.param(),
        "Y",
        "the first process's guard went and took Y from under the second's"
    );
    rig.release("b", b);
    assert_eq!(rig.param(), "N", "not left as found");
}

#[test]
fn a_holder_that_died_leaves_the_value_it_found_to_the_last_one() {
    let rig = Rig::new("N");
    let a = rig.spawn("a", "dies", "held");
    rig.release("a", a);
    // Killed with the guard held: nothing wrote N back yet.
    assert_eq!(rig.param(), "Y");
    let b = rig.spawn("b", "enabled", "held");
    rig.release("b", b);
    assert_eq!(
        rig.param(),
        "N",
        "the value found before the dead holder was not restored"
    );
}

#[test]
fn a_disabled_guard_waits_for_the_enabled_ones_of_other_processes() {
    let rig = Rig::new("N");
    let a = rig.spawn("a", "enabled", "held");
    let b = rig.spawn("b", "disabled", "trying");
    // A window for the wrong order, not a wait for a condition: b must not get the
    // guard (and set N) while a holds its own.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !rig.file("b", "held").exists(),
        "a disabled guard was taken while another process held an enabled one"
    );
    assert_eq!(rig.param(), "Y");
    rig.release("a", a);
    assert!(wait_file(&rig.file("b", "held")), "b never got the guard");
    assert_eq!(rig.param(), "N");
    rig.release("b", b);
    assert_eq!(rig.param(), "N", "not left as found");
}
