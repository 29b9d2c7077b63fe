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
