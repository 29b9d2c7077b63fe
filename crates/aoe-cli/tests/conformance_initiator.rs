//! Issue 11, items 1, 2 and 7, end to end: `aoe initiator` behaves as the Linux driver
//! (`aoecmd_cfg_rsp`, `aoeblk_release`, `revalidate` in aoechr.c) and its admin guide say,
//! against `aoe serve` and vblade, each test in the namespaces and veth link of its own
//! [`Rig`].
//!
//! * `closewait_*` (item 1): a device held open while its target dies is `down,closewait`;
//!   the target restarted (it announces itself) and `discover` written, it stays
//!   `down,closewait` ("cannot come up again until it has been closed"); once the last file
//!   is closed, the Query Config the close sends brings it `up` with no discover.
//! * `growth_*` (item 2): the target restarted over a grown file; nobody has the device
//!   open, so the config answers (its announcement, a discover) re-IDENTIFY it and the new
//!   size shows, without `revalidate`.
//! * `revalidate_partition_*` (item 7): a second partition added to the table in the
//!   target's backing file (not through the initiator); `echo eX.Y > revalidate` re-reads
//!   the table and `eX.Yp2` appears with its size and bytes, without flush and discover.
//! * `revalidate_leaves_an_open_partition_where_it_is`: a table that moves a partition
//!   whose file is open is not taken while it is (the kernel answers `BLKRRPART` with
//!   EBUSY while a partition is open): writes through the open file stay where they were.
//!
//! Needs root, fuse3, vblade, aoetools (`scripts/install-deps.sh`).

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use aoe_testkit::wait_until;
use common::*;

// ------------------------------------------------------------------------------------------
// closewait_*: an open, down device stays down until its last close

fn closewait(kind: Target) {
    let mut rig = Rig::start(
        kind,
        1500,
        InitOpts {
            deadsecs: Some(DEADSECS),
            ..InitOpts::default()
        },
    );
    let dev = rig.dev();
    let before = sha256(&rig.file);
    let held = File::open(&dev).unwrap();
    rig.kill_target();
    // Unanswered I/O takes it down after deadsecs; it is held open.
    let r = read_at(&dev, 5 << 20, 4096);
    assert!(
        matches!(&r, Err(e) if is_eio(e)),
        "read from a dead target: {r:?}"
    );
    rig.wait_state(
        "down,closewait",
        Duration::from_secs(3),
        "held open after the target died",
    );

    // The target comes back (announcing itself) and a discover is written: the config
    // answers do not IDENTIFY an open device, so it does not come up while held.
    rig.start_target();
    rig.echo_ok("discover", "");
    let came_up = wait_until(Duration::from_secs(4), || {
        rig.state().as_deref() != Some("down,closewait")
    });
    assert!(
        !came_up,
        "state {:?} while still open, want down,closewait until closed{}",
        rig.state(),
        rig.logs()
    );
    // A second open does not change that either.
    let held2 = File::open(&dev).unwrap();
    drop(held);
    rig.echo_ok("discover", "");
    assert!(
        !wait_until(Duration::from_secs(2), || rig.state().as_deref()
            != Some("down,closewait")),
        "state {:?} with one file still open{}",
        rig.state(),
        rig.logs()
    );

    // The last close sends a Query Config for e7.3; its answer brings the device up, with
    // no discover written.
    drop(held2);
    rig.wait_state("up", Duration::from_secs(5), "after the last close");
    assert_eq!(sha256(&dev), before, "data after coming back");
    rig.finish();
}

#[test]
fn closewait_aoe_serve() {
    closewait(Target::AoeServe);
}

#[test]
fn closewait_vblade() {
    closewait(Target::Vblade);
}

// ------------------------------------------------------------------------------------------
// growth_*: an idle up device is re-IDENTIFYed on config answers

fn growth(kind: Target) {
    let mut rig = Rig::start(kind, 1500, InitOpts::default());
    let dev = rig.dev();
    assert_eq!(rig.attr("size"), Some(SECTORS.to_string()));
    // The target restarted over a grown file; the device was never down (no I/O).
    let grown = SECTORS + 4 * 2048;
    rig.kill_target();
    let tail = pattern(77, 4096);
    {
        let f = OpenOptions::new().write(true).open(&rig.file).unwrap();
        f.set_len(grown * 512).unwrap();
        f.write_all_at(&tail, (grown - 8) * 512).unwrap();
    }
    rig.start_target();
    rig.echo_ok("discover", "");
    rig.wait_attr(
        "size",
        &grown.to_string(),
        Duration::from_secs(5),
        "after the target grew and a discover (no revalidate)",
    );
    assert_eq!(rig.state().as_deref(), Some("up"));
    assert!(wait_until(Duration::from_secs(10), || fs::metadata(&dev)
        .is_ok_and(|m| m.len() == grown * 512)));
    assert_eq!(read_at(&dev, (grown - 8) * 512, 4096).unwrap(), tail);
    let err = rig.err_lines(2);
    assert!(
        err.contains(&format!(
            "{DEV}: size changed from {SECTORS} to {grown} sectors"
        )),
        "err lines:\n{err}"
    );
    rig.finish();
}

#[test]
fn growth_aoe_serve() {
    growth(Target::AoeServe);
}

#[test]
fn growth_vblade() {
    growth(Target::Vblade);
}

// ------------------------------------------------------------------------------------------
// revalidate_partition_*: revalidate re-reads the partition table

fn revalidate_partition(kind: Target) {
    // The export starts with one partition, so the scan at discovery is seen to be done
    // (eX.Yp1 appears) before the table changes.
    let parts = [(2048u32, 4096u32), (8192, 8192)];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("parted.img");
    let mut img = pattern(1, (SECTORS * 512) as usize);
    img[..512].copy_from_slice(&mbr(&parts[..1]));
    fs::write(&file, &img).unwrap();
    let rig = Rig::start_with(kind, 1500, InitOpts::default(), Some(file.clone()), &[]);
    let part = |n: usize| rig.root.join(format!("{DEV}p{n}"));
    assert!(
        wait_until(Duration::from_secs(5), || fs::metadata(part(1))
            .is_ok_and(|m| m.len() == u64::from(parts[0].1) * 512)),
        "{DEV}p1 not found at discovery{}",
        rig.logs()
    );
    assert!(!part(2).exists());
    // A second partition added on the target's side, behind the initiator's back.
    {
        let f = OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(&mbr(&parts), 0).unwrap();
        f.sync_all().unwrap();
    }
    rig.echo_ok("revalidate", DEV);
    assert!(
        wait_until(Duration::from_secs(5), || fs::metadata(part(2))
            .is_ok_and(|m| m.len() == u64::from(parts[1].1) * 512)),
        "{DEV}p2 missing or of the wrong size after revalidate{}",
        rig.logs()
    );
    let mut want = vec![0u8; 4096];
    File::open(&file)
        .unwrap()
        .read_exact_at(&mut want, u64::from(parts[1].0) * 512 + 512)
        .unwrap();
    assert_eq!(
        read_at(&part(2), 512, 4096).unwrap(),
        want,
        "{DEV}p2's bytes"
    );
    assert_eq!(rig.state().as_deref(), Some("up"));
    rig.finish();
}

#[test]
fn revalidate_partition_aoe_serve() {
    revalidate_partition(Target::AoeServe);
}

#[test]
fn revalidate_partition_vblade() {
    revalidate_partition(Target::Vblade);
}

// ------------------------------------------------------------------------------------------
// revalidate_leaves_an_open_partition_where_it_is: no table change under an open partition

/// Audit 4 (session 21): `eX.Yp1` held open (as a loop device or a VM holds it), the table
/// rewritten behind the initiator's back to move p1, and `revalidate` written. On the code
/// before, the open file followed the new table at once: its next write landed at the new
/// place (sector 8192 of the backing file, not 2048), over what was there. The kernel never
/// moves an open partition (`bdev_disk_changed`: EBUSY while any is open); here the old
/// table stays, `err` says why, and the new one is taken at the first revalidate after the
/// close.
#[test]
fn revalidate_leaves_an_open_partition_where_it_is() {
    let (old, new) = ((2048u32, 4096u32), (8192u32, 4096u32));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("parted.img");
    let mut img = pattern(3, (SECTORS * 512) as usize);
    img[..512].copy_from_slice(&mbr(&[old]));
    fs::write(&file, &img).unwrap();
    let rig = Rig::on_file(1500, file.clone());
    let p1 = rig.partition(1);
    let held = OpenOptions::new().read(true).write(true).open(&p1).unwrap();
    {
        let f = OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(&mbr(&[new]), 0).unwrap();
        f.sync_all().unwrap();
    }
    rig.echo_ok("revalidate", DEV);
    let line = format!("{DEV}: partition table changed, not re-read while {DEV}p1 open");
    assert!(
        wait_until(Duration::from_secs(10), || rig
            .initiator_log()
            .contains(&line)),
        "no {line:?} after revalidate{}",
        rig.logs()
    );
    let data = pattern(4, 4096);
    held.write_all_at(&data, 0).unwrap();
    held.sync_all().unwrap();
    let at = |sector: u32| {
        let mut b = vec![0u8; 4096];
        File::open(&file)
            .unwrap()
            .read_exact_at(&mut b, u64::from(sector) * 512)
            .unwrap();
        b
    };
    let new_start = (new.0 as usize) * 512;
    assert!(
        at(new.0) == img[new_start..new_start + 4096],
        "the write through the open {DEV}p1 landed at the new table's p1 (sector {})",
        new.0
    );
    assert_eq!(
        at(old.0),
        data,
        "the write missing at p1's sector {}",
        old.0
    );
    // Closed, a revalidate takes the new table. The kernel sends FUSE's RELEASE after
    // close(2) has returned, so a revalidate written at once can still find p1 open: it is
    // written again until the table is taken.
    drop(held);
    assert!(
        wait_until(Duration::from_secs(20), || {
            rig.echo_ok("revalidate", DEV);
            wait_until(Duration::from_secs(1), || {
                read_at(&p1, 0, 4096).is_ok_and(|b| b == img[new_start..new_start + 4096])
            })
        }),
        "{DEV}p1 not at sector {} after the close and a revalidate{}",
        new.0,
        rig.logs()
    );
    rig.finish();
}
