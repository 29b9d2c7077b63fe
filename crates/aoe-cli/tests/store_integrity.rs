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
//! * `*_serve_process*_meeting_inside_a_4096_byte_block_*` (twelfth audit): two `aoe serve`
//!   processes exporting windows of one file on a 4096-byte-sector loop device that meet
//!   inside an aligned block, both `-d` or one buffered; raw one-sector writes at the
//!   boundary, every acknowledged one checked in the file. Each process locked that block
//!   only in its own memory and undid the other's writes. `*_on_two_nodes_of_one_disk_*`
//!   (thirteenth audit): the same through two device nodes of one loop device, whose
//!   inodes differ, both `-d` or the second buffered.
//! * `ext4_loop_unmount_lets_go_of_the_file_system_beside_another_mount_namespace`
//!   (thirteenth audit): the ext4 helper the tests above use unmounts for good even when
//!   another process holds a copy of the mount in its own mount namespace.
//!
//! Root, namespaces and a veth pair (see `common`); nothing touches the host's interfaces.

mod common;
use common::*;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

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

/// Sector `lba` of round `round` as the two-process test writes it: the LBA and the round
/// in every 16 bytes.
fn edge_stamp(lba: u64, round: u64) -> Vec<u8> {
    (0..32)
        .flat_map(|_| lba.to_le_bytes().into_iter().chain(round.to_le_bytes()))
        .collect()
}

/// A frame from client 0 of `lan` to shelf.slot `SHELF.slot` (broadcast for Query Config),
/// with a fresh tag.
fn frame_to(lan: &mut RawLan, slot: u8, body: aoe_wire::Body<'_>) -> (aoe_wire::Tag, Vec<u8>) {
    use aoe_wire::{Body, Command as C, HeaderRepr, MacAddr, Message, Tag, TargetAddr};
    let (command, dst) = match &body {
        Body::Config(_) => (C::QueryConfig, MacAddr::BROADCAST),
        _ => (C::Ata, lan.target_mac),
    };
    lan.next_tag += 1;
    let tag = Tag(lan.next_tag);
    let h = HeaderRepr::request(dst, lan.macs[0], TargetAddr::new(SHELF, slot), command, tag);
    (tag, Message { header: h, body }.to_vec().expect("emit"))
}

/// Twelfth audit (docs/TEST-AUDIT.md): two `aoe serve` *processes* exporting windows of one
/// file that meet inside an aligned block (sectors 0-1000 at e7.3 and 1001-2047 at e7.4 of a
/// file on ext4 on a loop device of 4096-byte sectors: they share the block of sectors
/// 1000-1007), as two units of `aoe-serve@.service` with a config file each would. The
/// eleventh audit's shared range lock is per process: each process read-modify-wrote that
/// block under its own and undid the other's acknowledged write (by hand on 1994e57: 38 of
/// 400 sector writes lost in 100 rounds, both `-d`; 9 of 400 with the second buffered). In
/// each round, one-sector writes of sectors 999-1002 (each twice, under two tags) go out at
/// once from a raw client; once all are answered each sector must hold the round's stamp.
fn two_serve_processes_meeting_inside_a_4096_byte_block(second_direct: bool) {
    let ext4 = Ext4Loop::new(4096, 16);
    let file = ext4.mnt().join("split.img");
    fs::write(&file, vec![0u8; 2048 * 512]).expect("backing file");
    serve_processes_meeting_inside_a_4096_byte_block(&file, &file, second_direct, &file, 0, 1001);
    // Session 29: the file was still open here, so the file system stayed mounted (and
    // its loop device attached) after every run.
    let mut ext4 = ext4;
    ext4.unmount().expect("the test's ext4 unmounts");
}

/// The rig of [`two_serve_processes_meeting_inside_a_4096_byte_block`]: the first process
/// (`-d`) exports sectors 0-1000 of `first`, which are sectors `first_at`.. of `image`, the
/// second 1047 sectors from sector `second_at` of `second` (which is `image`, perhaps by
/// another path: `second_at` is `first_at + 1001`, the sector after the first's window);
/// after each round the sectors are read from `image`, where both land.
fn serve_processes_meeting_inside_a_4096_byte_block(
    first: &Path,
    second: &Path,
    second_direct: bool,
    image: &Path,
    first_at: u64,
    second_at: u64,
) {
    serve_processes_meeting_inside_a_block(
        (first, true),
        (second, second_direct),
        image,
        first_at,
        second_at,
    )
}

/// [`serve_processes_meeting_inside_a_4096_byte_block`] with the first process buffered
/// too where `first.1` is false (its node fsynced after each round, as the second's).
fn serve_processes_meeting_inside_a_block(
    (first, first_direct): (&Path, bool),
    (second, second_direct): (&Path, bool),
    image: &Path,
    first_at: u64,
    second_at: u64,
) {
    const ROUNDS: u64 = 300;
    const SECOND: u8 = SLOT + 1;
    let second_path = second;
    let first_flags: &[&str] = if first_direct {
        &["-d", "-o", "0", "-l", "1001"]
    } else {
        &["-o", "0", "-l", "1001"]
    };
    let mut lan = RawLan::start(Target::AoeServe, first, first_flags, 1);
    let mut cmd = Command::new(AOE);
    cmd.arg("serve");
    if second_direct {
        cmd.arg("-d");
    }
    cmd.args(["-o", &second_at.to_string(), "-l", "1047"])
        .arg(SHELF.to_string())
        .arg(SECOND.to_string())
        .arg(lan.bridge.name())
        .arg(second);
    let second = lan
        .target_ns
        .spawn(cmd)
        .expect("start the second aoe serve");
    // It answers once its duplicate probe is over.
    let up = aoe_testkit::wait_until(Duration::from_secs(20), || {
        let (tag, f) = frame_to(&mut lan, SECOND, RawLan::query());
        lan.send_raw(0, &f, tag.0, Duration::from_millis(300))
            .is_some()
    });
    assert!(
        up,
        "the second aoe serve never answered:\n{}",
        second.output_so_far()
    );
    drain_frames(&lan.socks[0], Duration::from_millis(50));

    // (slot, LBA in the export, sector of the image)
    let targets = [
        (SLOT, 999u64, first_at + 999),
        (SLOT, 1000, first_at + 1000),
        (SECOND, 0, second_at),
        (SECOND, 1, second_at + 1),
    ];
    let image = fs::File::open(image).expect("open the backing file");
    // A buffered process's writes may sit in its node's page cache: each round writes
    // that node's dirty pages back (fsync) before the image is read, so what is compared is
    // what the device holds once both are written back.
    let buffered_nodes: Vec<fs::File> = [(first, first_direct), (second_path, second_direct)]
        .into_iter()
        .filter(|&(_, direct)| !direct)
        .map(|(p, _)| fs::File::open(p).expect("open a buffered process's node"))
        .collect();
    let mut lost = Vec::new();
    for round in 1..=ROUNDS {
        let mut waiting = std::collections::HashSet::new();
        for &(slot, lba, sector) in &targets {
            let data = edge_stamp(sector, round);
            for _copy in 0..2 {
                let (tag, f) = frame_to(&mut lan, slot, RawLan::ata(0x34, true, lba, 1, &data));
                lan.socks[0].send(&f).expect("send");
                waiting.insert(tag.0);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !waiting.is_empty() && Instant::now() < deadline {
            for f in drain_frames(&lan.socks[0], Duration::from_millis(5)) {
                let Ok(m) = aoe_wire::Message::parse(&f) else {
                    continue;
                };
                if m.header.response && waiting.remove(&m.header.tag.0) {
                    let (err, status) = rsp_status(&f);
                    assert!(
                        err.is_none() && status.is_some_and(|s| s & 0x01 == 0),
                        "round {round}: a write was refused (AoE error {err:?}, ATA status \
                         {status:?}){}\n--- second:\n{}",
                        lan.logs(),
                        second.output_so_far()
                    );
                }
            }
        }
        assert!(
            waiting.is_empty(),
            "round {round}: {} writes unanswered in 20 s{}\n--- second:\n{}",
            waiting.len(),
            lan.logs(),
            second.output_so_far()
        );
        for n in &buffered_nodes {
            n.sync_all().expect("fsync a buffered process's node");
        }
        for &(_, _, sector) in &targets {
            let mut got = vec![0u8; 512];
            image
                .read_exact_at(&mut got, sector * 512)
                .expect("read the backing file");
            if got != edge_stamp(sector, round) {
                lost.push((round, sector));
            }
        }
    }
    assert!(
        lost.is_empty(),
        "first process direct: {first_direct}, second: {second_direct}: {} of {} acknowledged sector writes undone \
         by the other process's read-modify-write, first (round, sector): {:?}",
        lost.len(),
        ROUNDS * targets.len() as u64,
        &lost[..lost.len().min(8)]
    );
    drop(image);
    drop(second);
    drop(lan);
}

#[test]
fn two_direct_serve_processes_meeting_inside_a_4096_byte_block_lose_no_write() {
    two_serve_processes_meeting_inside_a_4096_byte_block(true);
}

/// The same with the second process's export buffered: its write landing in the page cache
/// between the first's read-modify-write read and write was flushed and then overwritten.
#[test]
fn a_direct_and_a_buffered_serve_process_meeting_inside_a_4096_byte_block_lose_no_write() {
    two_serve_processes_meeting_inside_a_4096_byte_block(false);
}

/// Thirteenth audit (docs/TEST-AUDIT.md): the twelfth audit's edge lock is an open file
/// description lock, kept on the inode of the path opened. Two processes exporting one disk
/// through two device nodes (the udev node and a `mknod` copy of it, as a container's or a
/// chroot's `/dev` has) lock two inodes and did not meet: both `-d` on a loop device of
/// 4096-byte sectors, each read-modify-wrote the shared block and undid the other's
/// acknowledged writes (on the base binary: 60-72 of 1200 acknowledged sector writes undone
/// in five runs; with the second process buffered, 262 and 153).
fn two_serve_processes_on_two_nodes_of_one_disk(second_direct: bool) {
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = run(Command::new("losetup").args(["-d", &self.0]));
        }
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let img = dir.path().join("disk.img");
    fs::write(&img, vec![0u8; 2048 * 512]).expect("disk image");
    let dev = run_ok(
        Command::new("losetup")
            .args(["--find", "--show", "--sector-size", "4096"])
            .arg(&img),
    );
    let dev = Detach(dev.trim().to_owned());
    let numbers = run_ok(Command::new("stat").args(["-c", "%Hr %Lr", &dev.0]));
    let (major, minor) = numbers.trim().split_once(' ').expect("major and minor");
    let copy = dir.path().join("copy-of-the-disk");
    run_ok(Command::new("mknod").arg(&copy).args(["b", major, minor]));
    // Read back through the disk (its page cache, which a buffered process's acknowledged
    // writes may not have left yet), not through the image under the loop device.
    let disk = Path::new(&dev.0);
    serve_processes_meeting_inside_a_4096_byte_block(disk, &copy, second_direct, disk, 0, 1001);
}

#[test]
fn two_serve_processes_on_two_nodes_of_one_disk_meeting_inside_a_4096_byte_block_lose_no_write() {
    two_serve_processes_on_two_nodes_of_one_disk(true);
}

/// The same with the second process (on the copy) buffered: its writes go through the
/// disk's page cache, which both nodes share, and it takes the edge lock at the block too.
#[test]
fn a_direct_and_a_buffered_serve_process_on_two_nodes_of_one_disk_lose_no_write() {
    two_serve_processes_on_two_nodes_of_one_disk(false);
}

/// Fourteenth audit (docs/TEST-AUDIT.md): a partition is a device with a node of its own.
/// Two processes, one exporting sectors 0-1000 of the first partition of a loop device of
/// 4096-byte sectors (a GPT, the partition at 1 MiB), the other the disk's sectors from the
/// one after it (2048 + 1001) through the whole disk's node: their windows meet inside the
/// disk's block of sectors 3048-3055. The edge lock was keyed by the node opened and its own
/// offsets, so the two locked different inodes at different offsets and undid each other's
/// acknowledged writes (on the base binary, both `-d`: see the commit); it is now taken on the
/// disk's node at the partition's start.
/// A loop device of 4096-byte sectors over a 4 MiB image with a GPT and one partition at
/// 1 MiB (`p1`, 1 MiB long), detached on drop. `losetup -P` alone did not show the
/// partition on this machine (session 30); `partx -a` after `sfdisk` does.
struct PartitionedLoop {
    _dir: tempfile::TempDir,
    img: std::path::PathBuf,
    dev: String,
    part: String,
    /// The partition's start in 512-byte sectors (sysfs `start`).
    start: u64,
}

impl PartitionedLoop {
    fn new() -> PartitionedLoop {
        aoe_testkit::require_tools(&[("sfdisk", "fdisk"), ("partx", "util-linux")]);
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
        let img = dir.path().join("disk.img");
        fs::write(&img, vec![0u8; 4 << 20]).expect("disk image");
        let dev = run_ok(
            Command::new("losetup")
                .args(["--find", "--show", "--sector-size", "4096", "--partscan"])
                .arg(&img),
        );
        let dev = dev.trim().to_owned();
        // From here drop detaches it.
        let mut l = PartitionedLoop {
            _dir: dir,
            img,
            dev,
            part: String::new(),
            start: 0,
        };
        let mut sfdisk = Command::new("sfdisk");
        sfdisk
            .args(["-q", "--no-reread", &l.dev])
            .stdin(std::process::Stdio::piped());
        let mut child = sfdisk.spawn().expect("sfdisk");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("sfdisk stdin")
            .write_all(b"label: gpt\nstart=1MiB, size=1MiB\n")
            .expect("partition table to sfdisk");
        assert!(child.wait().expect("sfdisk").success(), "sfdisk failed");
        let _ = run(Command::new("partx").args(["-a", &l.dev]));
        let name = Path::new(&l.dev)
            .file_name()
            .expect("loop name")
            .to_string_lossy()
            .into_owned();
        l.part = format!("/dev/{name}p1");
        let sys = format!("/sys/block/{name}/{name}p1");
        assert!(
            aoe_testkit::wait_until(Duration::from_secs(20), || Path::new(&l.part).exists()
                && Path::new(&sys).exists()),
            "{} did not appear",
            l.part
        );
        l.start = fs::read_to_string(format!("{sys}/start"))
            .expect("partition start")
            .trim()
            .parse()
            .expect("start");
        assert_eq!(l.start, 2048, "the partition's start (512-byte units)");
        l
    }
}

impl Drop for PartitionedLoop {
    fn drop(&mut self) {
        let _ = run(Command::new("losetup").args(["-d", &self.dev]));
    }
}

#[test]
fn a_partition_and_its_whole_disk_served_by_two_processes_meeting_inside_a_block_lose_no_write() {
    let disk = PartitionedLoop::new();
    // Both direct: every acknowledged write has reached the loop device, which writes it to
    // the image (read there: the disk's page cache is not the partition's).
    serve_processes_meeting_inside_a_4096_byte_block(
        Path::new(&disk.part),
        Path::new(&disk.dev),
        true,
        &disk.img,
        disk.start,
        disk.start + 1001,
    );
}

/// Fifteenth audit: the rig above with the disk's process buffered. The partition and the
/// disk are two nodes with two page caches, which neither the edge lock nor a direct
/// read-modify-write sees: the disk's buffered write sat in its node's cache with a stale
/// copy of the partition's sectors of the block, whose write-back undid them (base: "300
/// of 1200 acknowledged sector writes undone", every round's sector 3048, the fourteenth
/// audit's count by hand). A buffered write at an edge block of a partition or of a disk
/// with partitions now drops its node's copy of the block, writes, writes the block back
/// and drops it again, all under the edge lock.
#[test]
fn a_buffered_disk_beside_its_direct_partition_served_by_two_processes_loses_no_write() {
    let disk = PartitionedLoop::new();
    serve_processes_meeting_inside_a_4096_byte_block(
        Path::new(&disk.part),
        Path::new(&disk.dev),
        false,
        &disk.img,
        disk.start,
        disk.start + 1001,
    );
}

/// As above with both processes buffered, each on its node (the same write-through on
/// both sides), and with the partition's buffered beside the disk's `-d`.
#[test]
fn a_buffered_partition_beside_its_buffered_or_direct_disk_served_by_two_processes_loses_no_write()
{
    let disk = PartitionedLoop::new();
    for disk_direct in [false, true] {
        serve_processes_meeting_inside_a_block(
            (Path::new(&disk.part), false),
            (Path::new(&disk.dev), disk_direct),
            &disk.img,
            disk.start,
            disk.start + 1001,
        );
    }
}

/// Fourteenth audit: the edge lock cannot help a buffered export of a partition, or of a
/// disk with partitions, beside another process's export of the same sectors through the
/// other node: each node has its own page cache (by hand, the rig above with the disk's
/// process buffered: 300 of 1200 acknowledged sector writes undone). The start's warning
/// about a window's shared edge said so and asked for `-d`; since the fifteenth audit such
/// an export writes its edge blocks through (the test above), and the warning says that
/// instead; a direct one does not get the words. Base: "serve both with -d".
#[test]
fn a_buffered_window_of_a_partition_or_its_disk_is_said_to_be_written_through_at_its_edges() {
    let disk = PartitionedLoop::new();
    let check = |flags: &[&str], path: &str| {
        let mut cmd = Command::new(AOE);
        cmd.args(["serve", "--check"])
            .args(flags)
            .args(["1", "1", "lo", path]);
        let o = run(&mut cmd);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{flags:?} {path}: {err}");
        let lines: Vec<String> = err
            .lines()
            .filter(|l| l.contains("inside the 4096-byte block"))
            .map(str::to_owned)
            .collect();
        assert_eq!(lines.len(), 1, "{flags:?} {path}: one edge line: {err}");
        lines[0].clone()
    };
    let caches = "page cache of its own";
    let through = "are written through";
    let part = check(&["-o", "0", "-l", "1001"], &disk.part);
    assert!(
        part.contains(caches) && part.contains(through),
        "the buffered partition: {part}"
    );
    let whole = check(&["-o", "3049", "-l", "1047"], &disk.dev);
    assert!(
        whole.contains(caches) && whole.contains(through),
        "the buffered disk: {whole}"
    );
    let direct = check(&["-d", "-o", "0", "-l", "1001"], &disk.part);
    assert!(!direct.contains(caches), "the direct partition: {direct}");
}

/// Thirteenth audit (docs/TEST-AUDIT.md): the integrator's ext4 check once compared the
/// device with the image while the file system was still alive. A process started by `ip
/// netns exec` (the Linux driver's qemu rig beside it) while the file system was mounted had
/// a copy of the mount in its own mount namespace; the machine's `/` is a private mount, so
/// our `umount` succeeded, `mountpoint` said "not mounted", and the superblock lived on until
/// that process exited, then wrote itself behind the check. `Ext4Loop::unmount` is what
/// this suite's ext4 tests assert ("the test's ext4 unmounts") and drop; it must let go of
/// the file system itself, with such a process beside it. Seen failing with the session's
/// first `unmount` (no mount point removed, no wait): "/sys/fs/ext4/loopN is there after
/// unmount".
#[test]
fn ext4_loop_unmount_lets_go_of_the_file_system_beside_another_mount_namespace() {
    let mut ext4 = Ext4Loop::new(4096, 16);
    fs::write(ext4.mnt().join("file"), b"dirty until the last unmount").expect("a file");
    // A process in a new mount namespace, made while the file system is mounted (what `ip
    // netns exec` and `unshare -m` do), alive past our unmount.
    let mut holder = Command::new("unshare")
        .args(["--mount", "sleep", "60"])
        .spawn()
        .expect("run unshare");
    let mountinfo = format!("/proc/{}/mountinfo", holder.id());
    let source = format!(" ext4 {} ", ext4.dev());
    let copied = aoe_testkit::wait_until(Duration::from_secs(20), || {
        fs::read_to_string(&mountinfo).is_ok_and(|m| m.contains(&source))
    });
    let sb = ext4.superblock();
    let unmounted = ext4.unmount();
    let alive = sb.exists();
    let running = holder.try_wait().expect("holder's status").is_none();
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        copied,
        "the holder's namespace never had a copy of the mount"
    );
    assert!(running, "the holder exited before the unmount was checked");
    assert!(
        unmounted.is_ok() && !alive,
        "unmount: {unmounted:?}; {} is there after unmount: the file system lives on in \
         another mount namespace",
        sb.display()
    );
}
