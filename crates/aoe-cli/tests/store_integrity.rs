//! Issue 9: data integrity of `aoe serve`'s backing store, end to end through `aoe initiator`.
//!
//! * `concurrent_writes_*`: `aoe serve -d` (O_DIRECT), `-s` (O_SYNC) and buffered (writes on
//!   the event loop, issue 15) serving a file on ext4
//!   with 4 KiB blocks on a loop device, at MTU 1500 (1 KiB per frame) and 9000 (8.5 KiB);
//!   `dd bs=64k oflag=direct conv=fsync` of a pattern onto the device file, then four `dd`s at
//!   once, then every byte of the backing file compared. `-d` used to read-modify-write each
//!   frame's 4 KiB block without a lock, on several workers, and lost neighbouring frames.
//! * `a_failed_flush_is_latched`: `aoe serve` (buffered) serving a file on a FUSE file system
//!   whose fsync fails on demand (`aoe_testkit::faultfs`); after one failed FLUSH, later
//!   FLUSHes and writes fail even once fsync works again, reads go on. Linux reports a
//!   write-back error once, so without the latch the second FLUSH succeeded.
//!
//! Root, namespaces and a veth pair (see `common`); nothing touches the host's interfaces.

mod common;
use common::*;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use aoe_testkit::faultfs::FaultFs;

const MIB: u64 = 1 << 20;

/// `dd` of `src` onto `dev` at byte `seek` (a multiple of 64 KiB), O_DIRECT, fsync at the end.
fn dd(src: &Path, dev: &Path, seek: u64) -> Command {
    let mut c = Command::new("timeout");
    c.args(["-k", "5", "120", "dd"])
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", dev.display()))
        .args([
            "bs=64k",
            "oflag=direct",
            "conv=fsync,notrunc",
            "iflag=fullblock",
            "status=none",
        ])
        .arg(format!("seek={}", seek / (64 * 1024)));
    c
}

fn concurrent_writes(flags: &[&str], mtu: u32, sector: u32) {
    let ext4 = Ext4Loop::new(sector, 64);
    let file = ext4.mnt().join("export.img");
    let mut want = pattern(1, (SECTORS * 512) as usize);
    fs::write(&file, &want).expect("backing file");
    let rig = Rig::start_with(
        Target::AoeServe,
        mtu,
        InitOpts::default(),
        Some(file.clone()),
        flags,
    );

    // One sequential 8 MiB write, then four 2 MiB writes from four processes at once.
    let mut jobs = vec![(0u64, 8 * MIB, 2u64)];
    jobs.extend((0..4).map(|i| (12 * MIB + i * 3 * MIB, 2 * MIB, 3 + i)));
    for (k, batch) in [&jobs[..1], &jobs[1..]].into_iter().enumerate() {
        let children: Vec<_> = batch
            .iter()
            .map(|&(at, len, seed)| {
                let data = pattern(seed, len as usize);
                let src = rig.dir.path().join(format!("src-{seed}"));
                fs::write(&src, &data).expect("source file");
                want[at as usize..(at + len) as usize].copy_from_slice(&data);
                dd(&src, &rig.dev(), at)
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot run dd: {e}"))
            })
            .collect();
        for mut c in children {
            let st = c.wait().expect("wait for dd");
            assert!(st.success(), "dd (batch {k}) failed: {st}{}", rig.logs());
        }
    }

    let got = fs::read(&file).expect("read the backing file");
    let wrong = wrong_sectors(&got, &want);
    assert!(
        wrong.is_empty(),
        "aoe serve {flags:?}, MTU {mtu}, {sector}-byte-sector loop device: {} of {} sectors of \
         the backing file wrong, first {:?}{}",
        wrong.len(),
        SECTORS,
        &wrong[..wrong.len().min(8)],
        rig.logs()
    );
    rig.finish();
    drop(ext4);
}

#[test]
fn concurrent_writes_direct_mtu_1500() {
    concurrent_writes(&["-d"], 1500, 512);
}

#[test]
fn concurrent_writes_direct_mtu_9000() {
    concurrent_writes(&["-d"], 9000, 512);
}

/// A 4 KiB-sector device: every 1 KiB frame is read-modify-written, under the range lock.
#[test]
fn concurrent_writes_direct_4k_sectors_mtu_1500() {
    concurrent_writes(&["-d"], 1500, 4096);
}

/// Issue 15: buffered writes on ext4 run on the event loop (a plain `pwrite`, ext4 has no
/// `RWF_NOWAIT` for them), except those that overlap a write still on a worker.
#[test]
fn concurrent_writes_buffered_mtu_1500() {
    concurrent_writes(&[], 1500, 512);
}

#[test]
fn concurrent_writes_buffered_mtu_9000() {
    concurrent_writes(&[], 9000, 512);
}

#[test]
fn concurrent_writes_sync_mtu_1500() {
    concurrent_writes(&["-s"], 1500, 512);
}

#[test]
fn concurrent_writes_sync_mtu_9000() {
    concurrent_writes(&["-s"], 9000, 512);
}

fn is_io_error(r: &std::io::Result<()>) -> bool {
    matches!(r, Err(e) if is_eio(e))
}

/// Issue 9, item 2: a failed fdatasync is latched by the export.
#[test]
fn a_failed_flush_is_latched() {
    require_tools();
    let store = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let backing = store.path().join("backing.img");
    let initial = pattern(1, (SECTORS * 512) as usize);
    fs::write(&backing, &initial).expect("backing file");
    let ffs = FaultFs::mount(&backing).expect("mount the fault file system");
    let faults = ffs.faults();
    let rig = Rig::on_file(1500, ffs.file());
    // Without O_DIRECT: the initiator's FUSE file has no write-back cache, so every write
    // goes to the target at once and its error comes back to the write.
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(rig.dev())
        .expect("open the device");
    let a = pattern(2, 64 * 1024);
    dev.write_all_at(&a, 0).expect("first write");
    let before = faults.fsyncs();
    dev.sync_data().expect("first FLUSH");
    assert!(
        faults.fsyncs() > before,
        "FLUSH did not reach fdatasync{}",
        rig.logs()
    );

    dev.write_all_at(&pattern(3, 64 * 1024), MIB)
        .expect("second write");
    faults.fail_fsync(true);
    let r = dev.sync_data();
    assert!(
        is_io_error(&r),
        "FLUSH with fsync failing: {r:?}{}",
        rig.logs()
    );
    faults.fail_fsync(false);

    // The store works again; the export must keep saying no.
    let r = dev.sync_data();
    assert!(
        is_io_error(&r),
        "FLUSH after a failed one: {r:?} (the failure was forgotten){}",
        rig.logs()
    );
    let writes = faults.writes();
    let r = dev.write_all_at(&pattern(4, 4096), 2 * MIB);
    assert!(
        is_io_error(&r),
        "write after a failed FLUSH: {r:?}{}",
        rig.logs()
    );
    assert_eq!(faults.writes(), writes, "a refused write reached the store");
    let r = dev.sync_data();
    assert!(is_io_error(&r), "third FLUSH: {r:?}{}", rig.logs());

    // Reads go on, and show what was written before the failure.
    let got = read_at(&rig.dev(), 0, a.len()).expect("read after the failure");
    assert!(got == a, "read back differs");
    let got = read_at(&rig.dev(), 2 * MIB, 4096).expect("read after the failure");
    assert!(
        got[..] == initial[2 * MIB as usize..][..4096],
        "a refused write was written"
    );
    // Said loudly, once, naming the file.
    let logs = rig.logs();
    let said: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("refused until restart"))
        .collect();
    assert!(
        said.len() == 1
            && said[0].contains("ERROR")
            && said[0].contains(&*ffs.file().to_string_lossy()),
        "want one error line naming the file, got {said:?}:{logs}"
    );
    drop(dev);
    rig.finish();
    drop(ffs);
}
