//! The fault-injecting FUSE file system of the test kit, checked on its own. Needs root (it
//! mounts FUSE): its own test binary, so `cargo test` as an ordinary user runs every unit
//! test of the kit, and this one says that it needs root.

use std::os::unix::fs::FileExt;

use aoe_testkit::faultfs::FaultFs;
use std::os::unix::fs::OpenOptionsExt;

#[test]
fn passes_through_and_fails_on_demand() {
    aoe_testkit::require_root();
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("b.img");
    std::fs::write(&backing, vec![7u8; 64 * 1024]).unwrap();
    let fs = FaultFs::mount(&backing).unwrap();
    let faults = fs.faults();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(fs.file())
        .unwrap();
    assert_eq!(f.metadata().unwrap().len(), 64 * 1024);
    f.write_all_at(&[1u8; 4096], 4096).unwrap();
    assert!(faults.writes() >= 1);
    f.sync_data().unwrap();
    assert_eq!(faults.fsyncs(), 1);
    let on_disk = std::fs::read(&backing).unwrap();
    assert_eq!(&on_disk[4096..8192], &[1u8; 4096][..]);

    faults.fail_fsync(true);
    assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(5));
    assert_eq!(faults.fsyncs(), 2);
    faults.fail_fsync(false);
    f.sync_data().unwrap();

    faults.fail_writes(Some(28));
    let e = f.write_all_at(&[2u8; 4096], 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(28), "{e}");
    faults.fail_writes(None);
    let mut back = [0u8; 4096];
    f.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(back, [7u8; 4096], "a failed write changed the data");
    drop(f);
    let mp = fs.mountpoint().to_path_buf();
    drop(fs);
    assert!(!mp.exists(), "mount point left behind");
}

/// Set in the environment of the copy of this test binary that
/// [`a_killed_test_process_leaves_no_mount`] starts and kills: the backing file it mounts
/// (made, and removed, by the test that starts it).
const HOLDER_ENV: &str = "AOE_FAULTFS_TEST_HOLDER";

/// Session 18 found two FaultFs mounts left on the machine after its test runs, no process
/// serving them (every access ENOTCONN). Each test that uses FaultFs leaves none when it
/// ends, passed or failed (its drop unmounts); a test process killed by a signal (a run
/// stopped by hand or by a timeout) never drops it, and the mount stayed, as did the
/// `aoe serve` that held its file open. Here a copy of this test binary mounts a FaultFs,
/// has a child of its own hold the file open (the orphaned daemon), prints both, and is
/// SIGKILLed: the mount must go away without anyone unmounting it.
/// On the code before (no `auto_unmount`): still mounted 10 s after the kill.
#[test]
fn a_killed_test_process_leaves_no_mount() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    aoe_testkit::require_root();
    if let Some(backing) = std::env::var_os(HOLDER_ENV) {
        // The holder: mount, open the file in a child that outlives us, say where, wait to
        // be killed.
        let fs = FaultFs::mount(std::path::Path::new(&backing)).unwrap();
        // Never waited for: it stands for the orphaned daemon, outliving this holder (which
        // is killed); the test that starts the holder kills it by its pid.
        #[allow(clippy::zombie_processes)]
        let child = Command::new("sh")
            .args(["-c", "exec 3<\"$0\" && exec sleep 600"])
            .arg(fs.file())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        assert!(aoe_testkit::wait_until(Duration::from_secs(10), || {
            std::fs::read_link(format!("/proc/{}/fd/3", child.id())).is_ok()
        }));
        println!("HOLDER {} {}", fs.mountpoint().display(), child.id());
        std::thread::sleep(Duration::from_secs(600));
        unreachable!("the holder was not killed");
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("b.img");
    std::fs::write(&backing, vec![0u8; 64 * 1024]).unwrap();
    let mut holder = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_killed_test_process_leaves_no_mount",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLDER_ENV, &backing)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Whatever happens below: the holder and its child go (SIGKILL), and a mount left by the
    // code before is removed, so that a failure here leaks nothing either.
    struct Cleanup {
        pids: Vec<u32>,
        mountpoint: Option<std::path::PathBuf>,
    }
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for p in &self.pids {
                let _ = Command::new("kill")
                    .args(["-KILL", &p.to_string()])
                    .status();
            }
            if let Some(m) = &self.mountpoint {
                let _ = Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(m)
                    .status();
                let _ = std::fs::remove_dir(m);
            }
        }
    }
    let mut cleanup = Cleanup {
        pids: vec![holder.id()],
        mountpoint: None,
    };
    // The line follows libtest's "test NAME ... " on the same line.
    let mut line = String::new();
    for l in std::io::BufReader::new(holder.stdout.take().unwrap()).lines() {
        let l = l.unwrap();
        if let Some(at) = l.find("HOLDER ") {
            line = l[at..].to_owned();
            break;
        }
    }
    let mut words = line.split(' ').skip(1);
    let (mountpoint, orphan) = match (words.next(), words.next()) {
        (Some(m), Some(p)) => (std::path::PathBuf::from(m), p.parse::<u32>().unwrap()),
        _ => panic!("the holder said no HOLDER line: {line:?}"),
    };
    cleanup.pids.push(orphan);
    cleanup.mountpoint = Some(mountpoint.clone());
    assert!(
        aoe_testkit::faultfs::is_mount_point(&mountpoint).unwrap(),
        "{} not mounted while the holder runs",
        mountpoint.display()
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(
        aoe_testkit::wait_until(Duration::from_secs(10), || {
            !aoe_testkit::faultfs::is_mount_point(&mountpoint).unwrap()
        }),
        "{} still mounted 10 s after its test process was killed (its file held open by \
         pid {orphan})",
        mountpoint.display()
    );
}
