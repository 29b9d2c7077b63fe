//! Power loss of the target's machine: `aoe serve` in a qemu/TCG guest whose kernel page
//! cache is really lost (the host SIGKILLs qemu mid-write), against the durability promises
//! of README.md's "Data safety" table, per mode (buffered, `-s`, `-d`) and export (the raw
//! virtio disk, a file on ext4 on it; on XFS and btrfs for `-d`, session 33).
//!
//! The work is done by `tests/interop/power-loss.sh` (see its header): the guest gets our
//! binary and its shared libraries on a read-only disk, its data disk is a host file, and
//! `aoe initiator` on the host side (in the script's namespace) writes 64 KiB chunks with
//! `dd oflag=direct`, a FLUSH (`sync -d` on the device file), more chunks, then a writer
//! that is cut off by the kill. The host classifies every sector of the image as old, new
//! or foreign: flushed writes must be there in every mode, acknowledged ones in `-s` and
//! `-d`, nothing foreign anywhere, and in buffered mode some acknowledged, unflushed write
//! must have been lost (else the run could not tell a FLUSH that syncs from one that does
//! not). Here we only run it and insist on PASS, printing its whole output otherwise.
//!
//! Since session 34 also a file system made on the host through the initiator (the
//! script's `-F`: ext4, XFS, btrfs on a loop device over the device file), across the
//! guest's power loss or the initiator's SIGKILL: every file whose `fsync` returned 0 must
//! be there ([`fs_through_initiator`]).
//!
//! Needs root, qemu-system-x86, busybox-static, e2fsprogs, xfsprogs, btrfs-progs
//! (scripts/install-deps.sh); the
//! first run downloads the kernel package into `${AOE_CACHE:-/var/tmp/aoe-test-cache}`.
//! About 10-20 s a test on an idle two-core machine (the guest boots in 6-8 s).

use std::path::PathBuf;
use std::time::Duration;

use aoe_testkit::{require_root, require_tools, run_script, tool_path, ScriptRun};

/// The script's own hard timeout (`-T`); it cleans up and fails when it is hit.
const SCRIPT_TIMEOUT_S: u64 = 480;

/// Runs the script for `target` (`aoe` or `vblade`) with binary `bin`, `export` (`raw` or
/// `ext4`) and `mode` (`buffered`, `sync`, `direct`), plus `extra` options.
fn power_loss(target: &str, bin: &str, export: &str, mode: &str, extra: &[&str]) -> ScriptRun {
    require_root();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/power-loss.sh");
    let timeout = SCRIPT_TIMEOUT_S.to_string();
    let mut args = vec![
        "-b",
        bin,
        "-t",
        target,
        "-e",
        export,
        "-M",
        mode,
        "-I",
        env!("CARGO_BIN_EXE_aoe"),
        "-T",
        &timeout,
    ];
    args.extend_from_slice(extra);
    run_script(&script, &args, Duration::from_secs(SCRIPT_TIMEOUT_S))
}

/// `aoe serve` in `mode` on `export` (512-byte sectors): the script must PASS.
fn aoe_serve(export: &str, mode: &str) {
    aoe_serve_sectors(export, mode, 512);
}

/// [`aoe_serve`] on a data disk with `sector`-byte logical sectors.
fn aoe_serve_sectors(export: &str, mode: &str, sector: u32) {
    let sector_arg = sector.to_string();
    let what = format!("`aoe serve` ({mode}, {export} export, {sector}-byte sectors)");
    aoe_power_loss_passes(&what, export, mode, &["-L", &sector_arg]);
}

/// Runs the power-loss rig on `aoe serve` with the script's `extra` arguments and asserts
/// that it passed; `what` names the run in the messages.
fn aoe_power_loss_passes(what: &str, export: &str, mode: &str, extra: &[&str]) {
    let run = power_loss("aoe", env!("CARGO_BIN_EXE_aoe"), export, mode, extra);
    let took = run.took.as_secs_f32();
    assert!(
        run.passed(),
        "power loss of {what}: {} after {took:.0}s\n{}",
        run.verdict(),
        run.output
    );
    eprintln!("power loss of {what}: PASS in {took:.1}s");
}

#[test]
fn power_loss_raw_buffered() {
    aoe_serve("raw", "buffered");
}

#[test]
fn power_loss_raw_sync() {
    aoe_serve("raw", "sync");
}

#[test]
fn power_loss_raw_direct() {
    aoe_serve("raw", "direct");
}

#[test]
fn power_loss_ext4_buffered() {
    aoe_serve("ext4", "buffered");
}

#[test]
fn power_loss_ext4_sync() {
    aoe_serve("ext4", "sync");
}

#[test]
fn power_loss_ext4_direct() {
    aoe_serve("ext4", "direct");
}

/// A disk with 4 KiB logical sectors: the 8704-byte frames (MTU 9000) end mid-block, so
/// `-d` must read, patch and write the partial blocks (an unaligned O_DIRECT write would
/// fail with EINVAL), and still keep every acknowledged write through the power loss.
#[test]
fn power_loss_raw_direct_4k() {
    aoe_serve_sectors("raw", "direct", 4096);
}

/// As [`power_loss_raw_direct_4k`], on ext4 with 4 KiB blocks on that disk.
#[test]
fn power_loss_ext4_direct_4k() {
    aoe_serve_sectors("ext4", "direct", 4096);
}

/// `-d` on btrfs (session 33): every overwrite is a new copy-on-write extent, which only a
/// transaction commit or an fsync's log tree makes reachable, so an O_DIRECT write that
/// returned is on the disk but not in the file. The base build (O_DIRECT alone) lost every
/// acknowledged, unflushed write: "3072 acknowledged sectors (B, C) are old". A `-d` file
/// on btrfs is O_DSYNC without O_DIRECT now (`aoe_store::file`: O_DIRECT|O_DSYNC read back
/// EIO, checksum holes in btrfs's log, after the power loss on Linux 6.1).
#[test]
fn power_loss_btrfs_direct() {
    require_tools(&[("mkfs.btrfs", "btrfs-progs"), ("btrfs", "btrfs-progs")]);
    aoe_serve("btrfs", "direct");
}

/// `-d` into preallocated space on XFS (session 33): data.bin made by `fallocate` in the
/// guest, so every write lands in an unwritten extent whose conversion XFS logs at the
/// write's completion (`xfs_dio_write_end_io`) without forcing the log. The base build lost
/// every acknowledged, unflushed write ("2560 acknowledged sectors (B, C) are old"); a
/// hole (`-S sparse`) on XFS, ext4 and btrfs lost them the same way.
#[test]
fn power_loss_xfs_direct_prealloc() {
    require_tools(&[("mkfs.xfs", "xfsprogs"), ("xfs_repair", "xfsprogs")]);
    aoe_power_loss_passes(
        "`aoe serve` (direct, xfs export, preallocated data file)",
        "xfs",
        "direct",
        &["-S", "prealloc"],
    );
}

/// Not a gate on vblade's data: vblade answers FLUSH without syncing (docs/PROTOCOL.md),
/// so in buffered mode its flushed writes are lost with the guest's page cache. The
/// script's report mode (`-r`) prints what it found and passes whatever the data; this test
/// fails only if the rig itself cannot run vblade. Its output (`--nocapture`) is the
/// evidence README.md's "Data safety" cites.
#[test]
fn power_loss_vblade_report() {
    require_tools(&[("vblade", "vblade")]);
    // Its absolute path: the guest gets a copy of the binary.
    let vblade = tool_path("vblade").expect("vblade on PATH");
    let run = power_loss("vblade", &vblade, "raw", "buffered", &["-r"]);
    assert!(
        run.passed() && run.output.contains("REPORT:"),
        "power loss of vblade (buffered, raw export, report only): {}\n{}",
        run.verdict(),
        run.output
    );
    let findings: Vec<&str> = run
        .output
        .lines()
        .filter(|l| l.starts_with("### ") && !l.starts_with("### ["))
        .collect();
    eprintln!(
        "power loss of vblade (buffered, raw export), report only:\n{}",
        findings.join("\n")
    );
}

/// The NBD front-end's multi-connection promise under a real power loss (fifteenth audit):
/// the server advertises `NBD_FLAG_CAN_MULTI_CONN`, so a FLUSH on one connection must make
/// every write completed on any connection durable. The script's `-N`: libnbd's nbdcopy
/// writes phase A over 4 connections (no FLUSH of its own), `qemu-io -c flush` flushes on a
/// fifth, nbdcopy writes phase B, and the guest is killed: A must be new, and in buffered
/// mode B (never flushed) must have been lost, so the run can tell. With the FLUSH left out
/// the script fails ("2023 sectors of phase A are old although a FLUSH after them
/// succeeded"). A pin: the base build passes too (the FLUSH is the device's, not the
/// connection's).
fn aoe_serve_nbd(export: &str, mode: &str) {
    let what = format!("`aoe serve` ({mode}, {export} export) written through NBD");
    aoe_power_loss_passes(&what, export, mode, &["-N"]);
}

#[test]
fn power_loss_raw_buffered_nbd_flush_on_another_connection() {
    require_tools(&[("nbdcopy", "libnbd-bin"), ("qemu-io", "qemu-utils")]);
    aoe_serve_nbd("raw", "buffered");
}

#[test]
fn power_loss_ext4_buffered_nbd_flush_on_another_connection() {
    require_tools(&[("nbdcopy", "libnbd-bin"), ("qemu-io", "qemu-utils")]);
    aoe_serve_nbd("ext4", "buffered");
}

/// A file system made on the host through `aoe initiator` (session 34, the script's `-F`):
/// ext4, XFS or btrfs on a loop device over the device file, a stream of files each
/// written with `dd conv=fsync` and its directory fsynced, then `kill` (`guest`: the
/// target's machine loses power; `initiator`: our initiator SIGKILLed under the mounted
/// file system). The writer must get an error within a deadline, not hang; after the guest
/// boots again (the same initiator finds the device with `discover`) or a new initiator
/// starts, the file system must mount, every file whose fsync returned 0 must have its
/// exact bytes, btrfs scrub and the checker (`e2fsck -fn`, `xfs_repair -n`,
/// `btrfs check --readonly`) must find nothing. In buffered mode this holds only if the
/// loop device's REQ_PREFLUSH reaches the target as FLUSH CACHE EXT (FUSE `fsync` on the
/// device file) and the target syncs before it answers: the control
/// [`power_loss_fs_ext4_without_barriers_loses_fsynced_files`] shows the rig tells.
fn fs_through_initiator(fs: &str, mode: &str, kill: &str) {
    let what = format!("{fs} made through the initiator, {kill} killed (`aoe serve`, {mode})");
    aoe_power_loss_passes(&what, "raw", mode, &["-F", fs, "-K", kill]);
}

#[test]
fn power_loss_fs_ext4_through_the_initiator_buffered() {
    fs_through_initiator("ext4", "buffered", "guest");
}

#[test]
fn power_loss_fs_xfs_through_the_initiator_buffered() {
    require_tools(&[("mkfs.xfs", "xfsprogs"), ("xfs_repair", "xfsprogs")]);
    fs_through_initiator("xfs", "buffered", "guest");
}

#[test]
fn power_loss_fs_btrfs_through_the_initiator_buffered() {
    require_tools(&[("mkfs.btrfs", "btrfs-progs"), ("btrfs", "btrfs-progs")]);
    fs_through_initiator("btrfs", "buffered", "guest");
}

/// The initiator SIGKILLed under the mounted ext4: the writer's fsync fails with EIO at
/// once (the FUSE connection is gone), the file system unmounts, a new initiator on the
/// same ROOT removes the stale mount, and through it every fsynced file is intact.
#[test]
fn power_loss_fs_ext4_through_the_initiator_initiator_killed() {
    fs_through_initiator("ext4", "buffered", "initiator");
}

/// The control for the tests above: ext4 mounted `nobarrier` sends no FLUSH, so its
/// `fsync` returns 0 with the data only in the buffered target's page cache, and the power
/// loss must lose fsynced files. If this passed, the rig could not tell a FLUSH that
/// reaches the target from one that does not (run by hand on 2026-12-07: "fsynced files
/// lost or damaged: f100(missing) ...", every file, with the same binary that passes
/// above).
#[test]
fn power_loss_fs_ext4_without_barriers_loses_fsynced_files() {
    let run = power_loss(
        "aoe",
        env!("CARGO_BIN_EXE_aoe"),
        "raw",
        "buffered",
        &["-F", "ext4", "-B"],
    );
    assert!(
        !run.passed() && run.output.contains("fsynced files lost or damaged"),
        "ext4 through the initiator mounted nobarrier, guest killed: expected a FAIL naming \
         lost fsynced files, got {}\n{}",
        run.verdict(),
        run.output
    );
    eprintln!(
        "control: ext4 nobarrier lost fsynced files, as it must ({:.1}s)",
        run.took.as_secs_f32()
    );
}

/// [`power_loss_fs_ext4_through_the_initiator_initiator_killed`] with the initiator taking
/// its files' requests through FUSE over io_uring (`--fuse-uring`, the script's `-U`):
/// the loop device's flush arrives as a ring entry's FSYNC (`aoe_fuse::ring`), another path
/// than `/dev/fuse`'s, and the kill must fail the writer, not leave it waiting on an entry
/// no one will answer. enable_uring is held at Y for the test.
#[test]
fn power_loss_fs_ext4_through_the_initiator_fuse_uring_initiator_killed() {
    let _uring = aoe_testkit::fuseuring::FuseUring::enabled()
        .unwrap_or_else(|e| panic!("FUSE over io_uring is needed: {e}"));
    aoe_power_loss_passes(
        "ext4 made through the initiator over FUSE io_uring, initiator killed (`aoe serve`, buffered)",
        "raw",
        "buffered",
        &["-F", "ext4", "-K", "initiator", "-U"],
    );
}

/// Applications' write patterns across the power loss (session 35, the script's `-W all`,
/// `tests/interop/plapp.py`), all six at once on one file system made through the
/// initiator, one guest boot before the kill and one after: the atomic replace (write a
/// temporary file, fsync it, rename it over the old name, fsync the directory: every name
/// holds one whole version, at least the last acknowledged), overwrites in place followed
/// by `fdatasync` (of written blocks: no journal commit needed; and of `fallocate`'s
/// unwritten extents: a conversion to commit), `O_DIRECT|O_DSYNC` writes with no fsync,
/// and sqlite3 with `journal_mode=WAL` (`synchronous=FULL`) and `=DELETE`
/// (`synchronous=EXTRA`: with FULL the last COMMIT may be rolled back, as SQLite documents
/// and this rig found on btrfs; plapp.py's `sqlite-delete-full`) (a row per transaction:
/// after the loss `PRAGMA integrity_check` is ok and the rows are exactly 1..K, K at least
/// the last acknowledged COMMIT). Each writer logs every acknowledgement before
/// its next step; every one logged is held as a promise. The control
/// [`power_loss_apps_without_syncs_lose_acknowledged_steps`] shows the check can tell.
/// `extra`: more of the script's options (`-D`, `-P`).
fn apps_through_initiator(fs: &str, kill: &str, extra: &[&str]) {
    let what =
        format!(
        "applications on {fs} made through the initiator{}, {kill} killed (`aoe serve`, buffered)",
        if extra.is_empty() { String::new() } else { format!(" ({})", extra.join(" ")) }
    );
    let mut args = vec!["-F", fs, "-K", kill, "-W", "all"];
    args.extend_from_slice(extra);
    aoe_power_loss_passes(&what, "raw", "buffered", &args);
}

#[test]
fn power_loss_apps_on_ext4_through_the_initiator() {
    apps_through_initiator("ext4", "guest", &[]);
}

/// On XFS, the file system on the initiator's partition file `e1.1p1` (a GPT written
/// through the device file, then `revalidate`): a partition's fsync must send the whole
/// disk's FLUSH CACHE EXT, and its writes land at the partition's offset.
#[test]
fn power_loss_apps_on_xfs_on_a_partition_through_the_initiator() {
    require_tools(&[("mkfs.xfs", "xfsprogs"), ("xfs_repair", "xfsprogs")]);
    apps_through_initiator("xfs", "guest", &["-P"]);
}

/// On btrfs, the loop device with `--direct-io=on`: no page cache of the loop device's
/// own, its writes reach the device file as O_DIRECT writes and its flushes as fsync.
#[test]
fn power_loss_apps_on_btrfs_loop_direct_io_through_the_initiator() {
    require_tools(&[("mkfs.btrfs", "btrfs-progs"), ("btrfs", "btrfs-progs")]);
    apps_through_initiator("btrfs", "guest", &["-D"]);
}

/// The initiator SIGKILLed under the applications, on ext4 on the partition file over a
/// loop device with direct I/O: each writer must get an error (not hang), and a new
/// initiator must find every acknowledged step.
#[test]
fn power_loss_apps_on_ext4_initiator_killed() {
    apps_through_initiator("ext4", "initiator", &["-D", "-P"]);
}

/// The control for the `power_loss_apps_*` tests: with `-X` the writers leave
/// out every fsync, fdatasync and O_DSYNC (sqlite: `synchronous=OFF`) yet log their
/// acknowledgements, and the guest's power loss must make the check fail for every one of
/// the six patterns (run by hand on 2026-12-07: "replace: r0: holds g0, acknowledged g56",
/// 256 of 256 blocks old in place, 9 of 10 O_DIRECT writes old, "5068 committed rows
/// missing").
#[test]
fn power_loss_apps_without_syncs_lose_acknowledged_steps() {
    let run = power_loss(
        "aoe",
        env!("CARGO_BIN_EXE_aoe"),
        "raw",
        "buffered",
        &["-F", "ext4", "-W", "all", "-X"],
    );
    let missing: Vec<&str> = [
        "replace",
        "inplace",
        "prealloc",
        "odirect",
        "sqlite-wal",
        "sqlite-delete",
    ]
    .into_iter()
    .filter(|k| !run.output.contains(&format!("### VIOLATION: {k}: ")))
    .collect();
    assert!(
        !run.passed()
            && run.output.contains("acknowledged application writes lost")
            && missing.is_empty(),
        "applications without their syncs on ext4, guest killed: expected a FAIL with a \
         violation for each pattern, got {} (no violation for {missing:?})\n{}",
        run.verdict(),
        run.output
    );
    eprintln!(
        "control: the writers without their syncs lost acknowledged steps, as they must ({:.1}s)",
        run.took.as_secs_f32()
    );
}

/// The guest killed during a second `mkfs` over a file system holding fsynced files
/// (session 35, the script's `-Z`), the target `-d` so that mkfs's writes reach the disk in
/// the order they come: after the reboot the file system must be refused by mount, or
/// mount with every file readable (the old ones whole, if the old one is back) and the
/// checker content: never mount with garbage. If mkfs had ended before the kill (at a low
/// load it takes under 400 ms), it must mount, new and clean. A guard: passes on the base.
#[test]
fn power_loss_during_mkfs_ext4_is_refused_or_clean() {
    aoe_power_loss_passes(
        "mkfs.ext4 through the initiator cut by the power loss (`aoe serve`, direct)",
        "raw",
        "direct",
        &["-F", "ext4", "-Z", "150"],
    );
}

/// Session 35 (docs/TEST-AUDIT.md, its row 8): the target's machine loses power after mkfs
/// has ended, with nothing in flight, so the initiator keeps the device up; after the
/// reboot the guest's target takes 6 s to start (`-G 6`; a loaded TCG guest took 5 s,
/// probe included). The rig must wait until the target answers (`aoe ping`), not until
/// its init has started it: mounting before, the mount's read waited `--deadsecs 5` for
/// a target not yet there, the device went down and the read failed with EIO ("unable to
/// read superblock"; the rig before this test, with the same delay: 3 failures in 3 runs).
#[test]
fn power_loss_then_a_target_slow_to_start_is_waited_for() {
    aoe_power_loss_passes(
        "mkfs.ext4 done, then a power loss and a target 6 s slow to start (`aoe serve`, buffered)",
        "raw",
        "buffered",
        &["-F", "ext4", "-Z", "3000", "-G", "6"],
    );
}
