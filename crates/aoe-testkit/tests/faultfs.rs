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
/// On the code before (no `auto_unmount`): still mounted 10 s after the kill. Its empty
/// mount point is then removed by the next mount's clean-up (before: left in /tmp).
#[test]
fn a_killed_test_process_leaves_no_mount() {
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use aoe_testkit::faultfs::is_mount_point;
    use aoe_testkit::killed::{hold, KilledCopy};

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
        hold(&[
            fs.mountpoint().display().to_string(),
            child.id().to_string(),
        ]);
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("b.img");
    std::fs::write(&backing, vec![0u8; 64 * 1024]).unwrap();
    // Dropping `holder` SIGKILLs it and its child, and removes a mount left by the code
    // before, so that a failure here leaks nothing either.
    let (mut holder, words) = KilledCopy::spawn(
        "a_killed_test_process_leaves_no_mount",
        HOLDER_ENV,
        &backing,
    )
    .unwrap();
    let (mountpoint, orphan) = match words.as_slice() {
        [m, p] => (std::path::PathBuf::from(m), p.parse::<u32>().unwrap()),
        _ => panic!("the holder said {words:?}, not its mount point and child"),
    };
    holder.also_kill(orphan);
    let m = mountpoint.clone();
    holder.on_drop(move || {
        if is_mount_point(&m).unwrap_or(true) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&m)
                .status();
        }
        let _ = std::fs::remove_dir(&m);
    });
    assert!(
        is_mount_point(&mountpoint).unwrap(),
        "{} not mounted while the holder runs",
        mountpoint.display()
    );
    holder.kill().unwrap();
    assert!(
        aoe_testkit::wait_until(Duration::from_secs(10), || {
            !is_mount_point(&mountpoint).unwrap()
        }),
        "{} still mounted 10 s after its test process was killed (its file held open by \
         pid {orphan})",
        mountpoint.display()
    );
    // The empty directory stays (a killed process removes nothing); the next mount of any
    // test clears it, as this call does.
    let removed = aoe_testkit::faultfs::remove_stale_mount_dirs();
    assert!(
        removed.contains(&mountpoint) && !mountpoint.exists(),
        "the killed holder's mount point {} was not removed (removed: {removed:?})",
        mountpoint.display()
    );
}
