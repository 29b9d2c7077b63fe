//! Data-integrity regressions of `aoe initiator` (issue 9), against `aoe serve` on a veth
//! link between two namespaces the tests create (see `common`):
//!
//! - concurrent unaligned writes to different bytes of the same sectors, through the
//!   device file, a partition file and NBD at once, all land (the sector range locks);
//! - SIGTERM while the device is in use (ext4 mounted on the `--loop` device) does not
//!   stop the daemon: it keeps serving and exits once the file system is unmounted, or at
//!   once on SIGQUIT;
//! - a second `aoe initiator` on a ROOT that is already mounted refuses to start, and
//!   a restart after SIGKILL takes the dead one's ROOT and NBD socket over;
//! - a full send buffer does not stall the network thread;
//! - `O_DIRECT` writes through the device file reach the initiator in parallel, and a
//!   buffered opener of the same file never reads back what they overwrote.

mod common;
use common::*;

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aoe_testkit::wait_until;

// ------------------------------------------------------------------------------------------
// Concurrent unaligned writes

/// First sector of partition 1 in the backing file's MBR.
const PART_START: u64 = 2048;
/// Sectors of partition 1.
const PART_SECTORS: u64 = 8192;
/// The bytes the writers share: 64 sectors from 3 sectors into partition 1.
const REGION: u64 = (PART_START + 3) * 512;
const REGION_LEN: usize = 64 * 512;

/// A backing file of SECTORS holding `pattern(1, ..)` with an MBR at sector 0 whose
/// partition 1 is at [PART_START, PART_START + PART_SECTORS).
fn backing_with_partition(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut b = pattern(1, (SECTORS * 512) as usize);
    write_mbr_partition1(&mut b, PART_START as u32, PART_SECTORS as u32);
    let f = dir.join("parted.img");
    fs::write(&f, &b).unwrap();
    (f, b)
}

/// The region cut into pieces of 1 to 37 bytes (so almost none is aligned), dealt to
/// `writers` writers in turn: (offset in the region, length, writer).
fn pieces(writers: usize) -> Vec<(usize, usize, usize)> {
    let lens = pattern(77, REGION_LEN);
    let mut v = Vec::new();
    let mut off = 0;
    let mut i = 0;
    while off < REGION_LEN {
        let len = (1 + lens[i] as usize % 37).min(REGION_LEN - off);
        v.push((off, len, i % writers));
        off += len;
        i += 1;
    }
    v
}

/// A minimal NBD client on a Unix socket: fixed newstyle handshake with `NBD_OPT_GO`, then
/// simple replies only.
fn nbd_connect(sock: &Path, export: &str) -> UnixStream {
    let mut s = UnixStream::connect(sock).expect("connect to the NBD socket");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    let mut o = b"IHAVEOPT".to_vec();
    o.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    o.extend_from_slice(&(d.len() as u32).to_be_bytes());
    o.extend_from_slice(&d);
    s.write_all(&o).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("option reply");
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).unwrap();
        assert!(kind < 1 << 31, "NBD_OPT_GO {export}: error reply {kind:#x}");
        if kind == 1 {
            return s;
        }
    }
}

/// Sends every write (`NBD_CMD_WRITE`, cookie = index) from one thread while this one
/// reads the replies, so the server has up to its cap of them in flight at once; returns
/// (cookie, error) of those that failed.
fn nbd_pipelined_writes(s: UnixStream, writes: Vec<(u64, Vec<u8>)>) -> Vec<(u64, u32)> {
    let n = writes.len();
    let mut w = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut out = Vec::new();
        for (i, (off, data)) in writes.iter().enumerate() {
            out.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            out.extend_from_slice(&0u16.to_be_bytes());
            out.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
            out.extend_from_slice(&(i as u64).to_be_bytes());
            out.extend_from_slice(&off.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
        }
        w.write_all(&out).unwrap();
    });
    let mut r = s;
    let mut errs = Vec::new();
    for _ in 0..n {
        let mut h = [0u8; 16];
        r.read_exact(&mut h).expect("NBD write reply");
        assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes(), "simple reply magic");
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        if err != 0 {
            errs.push((u64::from_be_bytes(h[8..16].try_into().unwrap()), err));
        }
    }
    sender.join().unwrap();
    // NBD_CMD_DISC
    let mut d = 0x2560_9513u32.to_be_bytes().to_vec();
    d.extend_from_slice(&[0, 0, 0, 2]);
    d.extend_from_slice(&[0u8; 20]);
    let _ = r.write_all(&d);
    errs
}

/// Four writers at once on the same 64 sectors, each owning every fourth piece of 1 to 37
/// bytes (so neighbouring pieces of one sector belong to different writers): the whole
/// device file and the partition file through FUSE (pwrite, one piece at a time), and the
/// device and partition exports through NBD (all pieces in flight at once). Every byte must
/// end up as its owner wrote it, in the backing file and read back through the device.
/// Before the sector range locks, the read-modify-writes of one sector overwrote each
/// other's bytes with stale ones.
#[test]
fn concurrent_unaligned_writes_all_land() {
    unaligned_writes_all_land(InitOpts::default(), 1500);
}

/// [`concurrent_unaligned_writes_all_land`] with `--fuse-uring`: the device and partition
/// files' writes come through FUSE over io_uring (enable_uring set to Y for the test).
#[test]
fn concurrent_unaligned_writes_all_land_fuse_uring() {
    let (_u, opts) = InitOpts::fuse_uring();
    unaligned_writes_all_land(opts, 1500);
}

/// [`concurrent_unaligned_writes_all_land_fuse_uring`] at MTU 65535, a veth's largest
/// (issue 15): each piece is a part of one 127-sector frame, FUSE over io_uring and NBD.
#[test]
fn concurrent_unaligned_writes_all_land_fuse_uring_mtu_65535() {
    let (_u, opts) = InitOpts::fuse_uring();
    unaligned_writes_all_land(opts, 65535);
}

/// `aoe serve` and an `aoe initiator --fuse-uring` over a veth of `mtu`, with
/// enable_uring held at Y while the guard lives (bind it first: the rig goes before it).
fn fuse_uring_rig(mtu: u32) -> (aoe_testkit::fuseuring::FuseUring, Rig) {
    let (u, opts) = InitOpts::fuse_uring();
    (u, Rig::start(Target::AoeServe, mtu, opts))
}

/// A shell loop running `dd {args} bs=64k` again until one fails, then exiting 1.
fn dd_loop(args: &str) -> std::process::Child {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while dd {args} bs=64k status=none; do :; done; exit 1"
        ))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// A dd loop reading the rig's device file and one writing zeros to it (both O_DIRECT),
/// returned once the zeros have reached the backing file (it held a pattern).
fn dd_reader_and_writer(rig: &Rig) -> (std::process::Child, std::process::Child) {
    let dev = rig.dev().display().to_string();
    let reader = dd_loop(&format!("if={dev} of=/dev/null iflag=direct"));
    let writer = dd_loop(&format!("if=/dev/zero of={dev} oflag=direct"));
    let file = rig.file.clone();
    assert!(
        wait_until(Duration::from_secs(20), || {
            read_at(&file, 0, 65536).is_ok_and(|b| b.iter().all(|&x| x == 0))
        }),
        "the dd writer's data never reached the target{}",
        rig.logs()
    );
    (reader, writer)
}

/// Each of the two dd loops ends within 10 s of `event` (killed if not), with a failure.
fn dd_loops_fail(reader: &mut std::process::Child, writer: &mut std::process::Child, event: &str) {
    for (what, dd) in [("reader", reader), ("writer", writer)] {
        let done = wait_until(Duration::from_secs(10), || dd.try_wait().unwrap().is_some());
        if !done {
            let _ = dd.kill();
        }
        assert!(done, "the dd {what} hangs 10 s after {event}");
        assert!(
            !dd.wait().unwrap().success(),
            "the dd {what} succeeded across {event}"
        );
    }
}

/// `aoe initiator --fuse-uring` while enable_uring is N: it exits 1 saying which parameter
/// to set, and leaves ROOT unmounted (no silent fallback to /dev/fuse).
#[test]
fn fuse_uring_refused_while_enable_uring_is_off() {
    let _off = aoe_testkit::fuseuring::FuseUring::disabled()
        .unwrap_or_else(|e| panic!("cannot set enable_uring: {e}"));
    let mut rig = Rig::start(Target::AoeServe, 1500, InitOpts::default());
    let mut old = rig.initiator.take().expect("initiator running");
    assert!(old.stop().expect("stop the initiator").success());
    assert!(
        wait_until(Duration::from_secs(5), || !rig.root_mounted()),
        "ROOT still mounted after the initiator stopped"
    );
    let mut init = rig.spawn_initiator(&["--fuse-uring"]);
    let status = init.wait_timeout(Duration::from_secs(20)).unwrap();
    let out = init.output_so_far();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "initiator: {out}");
    assert!(
        out.contains("/sys/module/fuse/parameters/enable_uring is N"),
        "initiator said:\n{out}"
    );
    assert!(!rig.root_mounted(), "ROOT left mounted: {out}");
    // Nothing to finish: no initiator runs (the rig's drop removes the rest).
}

fn unaligned_writes_all_land(opts: InitOpts, mtu: u32) {
    let dir = tempfile::tempdir().unwrap();
    let (file, orig) = backing_with_partition(dir.path());
    let mut rig = Rig::start_with(Target::AoeServe, mtu, opts, Some(file), &[]);
    let sock = rig.dir.path().join("nbd.sock");
    // The restart takes only the arguments given: the options' again, and --nbd.
    let mut args = opts.args();
    args.extend(["--nbd".to_string(), sock.to_string_lossy().into_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    rig.restart_initiator(&args);
    if opts.fuse_uring {
        assert!(
            rig.initiator_log()
                .contains("FUSE requests through io_uring"),
            "not through the ring: {}",
            rig.logs()
        );
    }
    let part = rig.root.join(format!("{DEV}p1"));
    assert!(
        wait_until(Duration::from_secs(10), || part.exists() && sock.exists()),
        "no {} or NBD socket{}",
        part.display(),
        rig.logs()
    );

    const WRITERS: usize = 4;
    let new: Vec<Vec<u8>> = (0..WRITERS)
        .map(|w| pattern(1000 + w as u64, REGION_LEN))
        .collect();
    let pieces = pieces(WRITERS);
    let mut want = orig[REGION as usize..][..REGION_LEN].to_vec();
    for &(off, len, w) in &pieces {
        want[off..off + len].copy_from_slice(&new[w][off..off + len]);
    }
    let part_off = REGION - PART_START * 512;
    // Writer w: its pieces as (offset in its file or export, bytes).
    let mine = |w: usize, base: u64| -> Vec<(u64, Vec<u8>)> {
        pieces
            .iter()
            .filter(|p| p.2 == w)
            .map(|&(off, len, _)| (base + off as u64, new[w][off..off + len].to_vec()))
            .collect()
    };
    let t0 = Instant::now();
    let mut fuse = Vec::new();
    for (w, path, base) in [(0, rig.dev(), REGION), (1, part.clone(), part_off)] {
        let writes = mine(w, base);
        fuse.push(std::thread::spawn(move || {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            for (off, data) in writes {
                f.write_all_at(&data, off)
                    .unwrap_or_else(|e| panic!("pwrite {} at {off}: {e}", path.display()));
            }
        }));
    }
    let mut nbd = Vec::new();
    for (w, export, base) in [
        (2, DEV.to_string(), REGION),
        (3, format!("{DEV}p1"), part_off),
    ] {
        let writes = mine(w, base);
        let s = nbd_connect(&sock, &export);
        nbd.push(std::thread::spawn(move || nbd_pipelined_writes(s, writes)));
    }
    for t in fuse {
        t.join().expect("FUSE writer");
    }
    for t in nbd {
        let errs = t.join().expect("NBD writer");
        assert!(errs.is_empty(), "NBD writes failed: {errs:?}");
    }
    eprintln!(
        "{} pieces by {WRITERS} writers in {:?}",
        pieces.len(),
        t0.elapsed()
    );

    let check = |got: &[u8], what: &str| {
        let bad: Vec<usize> = (0..REGION_LEN).filter(|&i| got[i] != want[i]).collect();
        assert!(
            bad.is_empty(),
            "{what}: {} of {REGION_LEN} bytes lost, first at region offset {} (piece {:?})",
            bad.len(),
            bad[0],
            pieces.iter().find(|p| p.0 <= bad[0] && bad[0] < p.0 + p.1)
        );
    };
    let f = fs::File::open(&rig.file).unwrap();
    let mut got = vec![0u8; REGION_LEN];
    f.read_exact_at(&mut got, REGION).unwrap();
    check(&got, "backing file");
    check(
        &read_at(&rig.dev(), REGION, REGION_LEN).unwrap(),
        "read back through the device",
    );
    // Nothing outside the region changed.
    let all = fs::read(&rig.file).unwrap();
    assert!(
        all[..REGION as usize] == orig[..REGION as usize],
        "bytes before the region changed"
    );
    assert!(
        all[REGION as usize + REGION_LEN..] == orig[REGION as usize + REGION_LEN..],
        "bytes after the region changed"
    );
    rig.finish();
}

// ------------------------------------------------------------------------------------------
// SIGTERM while in use

/// ext4 made and mounted on the `--loop` device: (rig, loop device, mount point).
fn ext4_mounted_on_loop() -> (Rig, String, PathBuf) {
    let mut rig = Rig::start(
        Target::AoeServe,
        1500,
        InitOpts {
            loop_devices: true,
            ..InitOpts::default()
        },
    );
    let loops = rig.wait_loops();
    let lo = loops[0].clone();
    let mnt = mkfs_and_mount(&mut rig, &lo, &[]);
    (rig, lo, mnt)
}

/// The initiator exits with status 0 within 10 s; `after` says after what, for the message.
fn initiator_exits_0(rig: &mut Rig, after: &str) {
    let mut init = rig.initiator.take().unwrap();
    let status = init.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "{after}: {status:?}\n{}",
        init.output_so_far()
    );
}

/// Waits for the initiator's one-line refusal to stop, which must name the device and
/// SIGQUIT.
fn wait_refusal(rig: &Rig) {
    let init = rig.initiator.as_ref().unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || init
            .output_so_far()
            .contains("not stopping while in use")),
        "no refusal logged after SIGTERM{}",
        rig.logs()
    );
    let out = init.output_so_far();
    let line = out
        .lines()
        .find(|l| l.contains("not stopping while in use"))
        .unwrap();
    assert!(
        line.contains(DEV) && line.contains("kill -QUIT"),
        "refusal line: {line}"
    );
}

/// Writes a file on the mounted file system and syncs it: both must succeed.
fn write_and_sync(mnt: &Path, name: &str, seed: u64) {
    let data = pattern(seed, 300_000);
    fs::write(mnt.join(name), &data).unwrap();
    run_ok(Command::new("timeout").args(["-k", "5", "60", "sync"]));
    assert!(fs::read(mnt.join(name)).unwrap() == data);
}

/// SIGTERM (as `systemctl restart` sends) while ext4 is mounted on the `--loop` device: the
/// daemon keeps running and serving (a write and sync on the file system succeed), and once
/// the file system is unmounted it exits 0 by itself, unmounting ROOT and detaching the
/// loop device. Before, it unmounted at once and the mounted ext4 got I/O errors.
#[test]
fn sigterm_while_mounted_waits_for_the_unmount() {
    let (mut rig, lo, mnt) = ext4_mounted_on_loop();
    write_and_sync(&mnt, "before", 1);
    rig.signal_initiator("TERM");
    wait_refusal(&rig);
    assert!(
        rig.initiator.as_mut().unwrap().is_running(),
        "the initiator stopped{}",
        rig.logs()
    );
    write_and_sync(&mnt, "after", 2);
    assert!(rig.root_mounted());
    umount_ext4(&mnt, &lo);
    rig.mounts.clear();
    initiator_exits_0(&mut rig, "after the unmount");
    assert!(!rig.root_mounted(), "ROOT still mounted");
    assert!(
        wait_until(Duration::from_secs(10), || rig.loops().is_empty()),
        "loop devices left: {:?}",
        rig.loops()
    );
    // What was written while it refused to stop is on the target.
    let fsck = run(Command::new("timeout")
        .args(["-k", "5", "60", "fsck.ext4", "-n", "-f"])
        .arg(&rig.file));
    assert!(
        fsck.status.success(),
        "fsck of the backing file after {lo} was unmounted: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// SIGTERM while in use, then SIGQUIT: the explicit second request stops it at once (exit
/// 0, ROOT unmounted), even with the file system still mounted.
#[test]
fn sigquit_stops_even_while_mounted() {
    let (mut rig, _lo, _mnt) = ext4_mounted_on_loop();
    rig.signal_initiator("TERM");
    wait_refusal(&rig);
    let t0 = Instant::now();
    rig.signal_initiator("QUIT");
    initiator_exits_0(&mut rig, "after SIGQUIT");
    eprintln!("SIGQUIT to exit: {:?}", t0.elapsed());
    assert!(
        wait_until(Duration::from_secs(10), || !rig.root_mounted()),
        "ROOT still mounted after SIGQUIT"
    );
    // Drop unmounts the ext4 (it now gets I/O errors) and detaches the loop device.
}

/// SIGTERM with a control file open (which does not hold the daemon off, as a device file
/// does) while the files are served through FUSE over io_uring: the daemon exits 0 and
/// ROOT is unmounted (lazily: the open file gets ENOTCONN). Before, its `umount(2)` failed
/// with EBUSY and it then waited for the ring thread, which lives as long as the FUSE
/// connection: for as long as the file stayed open (on the code before: still running
/// 10 s after SIGTERM, its main thread in the join). The kernel drops a closed file's
/// mount reference a moment after it sends RELEASE, so a device file closed just before
/// SIGTERM could hit the same window (`fio.rs`'s one unexplained stop under load).
#[test]
fn sigterm_with_a_control_file_open_exits_fuse_uring() {
    let (_u, mut rig) = fuse_uring_rig(9000);
    let held = fs::File::open(rig.root.join("interfaces")).unwrap();
    rig.signal_initiator("TERM");
    initiator_exits_0(&mut rig, "SIGTERM with ROOT/interfaces open");
    assert!(
        wait_until(Duration::from_secs(10), || !rig.root_mounted()),
        "ROOT still mounted after the initiator exited"
    );
    drop(held);
}

/// A device file held open by a process also keeps it from stopping, and closing it lets it
/// stop; with nothing open SIGTERM stops at once (`Rig::finish` checks that elsewhere).
#[test]
fn sigterm_waits_for_an_open_partition_file() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = backing_with_partition(dir.path());
    let mut rig = Rig::on_file(1500, file);
    let part = rig.partition(1);
    let f = fs::File::open(&part).unwrap();
    rig.signal_initiator("TERM");
    wait_refusal(&rig);
    let out = rig.initiator.as_ref().unwrap().output_so_far();
    assert!(out.contains(&format!("{DEV}p1 (open 1x)")), "{out}");
    let mut b = [0u8; 512];
    f.read_exact_at(&mut b, 0).unwrap();
    drop(f);
    initiator_exits_0(&mut rig, "after the close");
    assert!(!rig.root_mounted(), "ROOT still mounted");
}

/// An NBD client connected to an export holds the daemon too; it stops once the client
/// disconnects.
#[test]
fn sigterm_waits_for_an_nbd_client() {
    let mut rig = Rig::start(Target::AoeServe, 1500, InitOpts::default());
    let sock = rig.dir.path().join("nbd.sock");
    rig.restart_initiator(&["--nbd", sock.to_str().unwrap()]);
    assert!(wait_until(Duration::from_secs(10), || sock.exists()));
    let client = nbd_connect(&sock, DEV);
    rig.signal_initiator("TERM");
    wait_refusal(&rig);
    let out = rig.initiator.as_ref().unwrap().output_so_far();
    assert!(out.contains(&format!("{DEV} (NBD, 1 client)")), "{out}");
    // Still serving it: a write through NBD completes.
    let errs = nbd_pipelined_writes(client, vec![(4096, pattern(5, 4096))]);
    assert!(
        errs.is_empty(),
        "NBD write while refusing to stop: {errs:?}"
    );
    initiator_exits_0(&mut rig, "after the NBD client left");
    assert!(!rig.root_mounted(), "ROOT still mounted");
}

// ------------------------------------------------------------------------------------------
// A stop in the middle of an application's write+fsync stream

/// Bytes per write of the fsync writer.
const CHUNK: usize = 64 * 1024;

/// What the writer wrote to chunk `i` in pass `pass` (pass 0: the backing file's initial
/// content is not a pass).
fn chunk_data(pass: u64, i: usize) -> Vec<u8> {
    pattern(1000 + pass * 1_000_000 + i as u64, CHUNK)
}

/// What an application doing `pwrite` + `fsync` of 64 KiB chunks, pass after pass over the
/// device, saw: per chunk the last pass whose write and fsync both succeeded, and the chunk
/// and pass of the call that failed (the writer stops there).
struct WriterLog {
    done: Vec<Option<u64>>,
    failed: Option<(usize, u64, io::Error)>,
    calls_ok: usize,
}

/// Starts the writer on `dev`; it counts completed chunks in `progress` and stops at the
/// first error or once `stop` is set.
fn fsync_writer(
    dev: PathBuf,
    chunks: usize,
    progress: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> std::sync::mpsc::Receiver<WriterLog> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut log = WriterLog {
            done: vec![None; chunks],
            failed: None,
            calls_ok: 0,
        };
        let f = match OpenOptions::new().write(true).open(&dev) {
            Ok(f) => f,
            Err(e) => {
                log.failed = Some((0, 1, e));
                let _ = tx.send(log);
                return;
            }
        };
        'passes: for pass in 1.. {
            for i in 0..chunks {
                if stop.load(Ordering::SeqCst) {
                    break 'passes;
                }
                let r = f
                    .write_all_at(&chunk_data(pass, i), (i * CHUNK) as u64)
                    .and_then(|()| f.sync_data());
                if let Err(e) = r {
                    log.failed = Some((i, pass, e));
                    break 'passes;
                }
                log.done[i] = Some(pass);
                log.calls_ok += 1;
                progress.fetch_add(1, Ordering::SeqCst);
            }
        }
        drop(f);
        let _ = tx.send(log);
    });
    rx
}

/// Every chunk the writer saw written and synced is in the backing file `got`; the chunk
/// whose call failed holds, sector by sector, its previous content or the new one.
fn check_fsynced(got: &[u8], initial: &[u8], log: &WriterLog) {
    let old = |i: usize| match log.done[i] {
        Some(p) => chunk_data(p, i),
        None => initial[i * CHUNK..(i + 1) * CHUNK].to_vec(),
    };
    let mut bad = Vec::new();
    for i in 0..log.done.len() {
        let have = &got[i * CHUNK..(i + 1) * CHUNK];
        let want = old(i);
        match &log.failed {
            Some((fi, fp, _)) if *fi == i => {
                let new = chunk_data(*fp, i);
                let torn = (0..CHUNK / 512).any(|s| {
                    let r = s * 512..(s + 1) * 512;
                    have[r.clone()] != want[r.clone()] && have[r.clone()] != new[r]
                });
                if torn {
                    bad.push(format!("chunk {i} (the failed call): neither old nor new"));
                }
            }
            _ if have != want.as_slice() => bad.push(format!(
                "chunk {i}: not what the last synced write (pass {:?}) wrote",
                log.done[i]
            )),
            _ => {}
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} chunks lost synced writes:\n{}",
        bad.len(),
        log.done.len(),
        bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// Waits until the writer has completed `n` calls in all.
fn wait_progress(rig: &Rig, progress: &AtomicUsize, n: usize, what: &str) {
    assert!(
        wait_until(Duration::from_secs(20), || progress.load(Ordering::SeqCst)
            >= n),
        "{what}{}",
        rig.logs()
    );
}

/// Starts [`fsync_writer`] on the rig's device over 256 chunks (16 MiB) and waits for its
/// first 16 calls; returns the backing file's content before it, the progress counter, the
/// stop flag and the writer's log.
fn fsync_writer_going(
    rig: &Rig,
) -> (
    Vec<u8>,
    Arc<AtomicUsize>,
    Arc<AtomicBool>,
    std::sync::mpsc::Receiver<WriterLog>,
) {
    let initial = fs::read(&rig.file).unwrap();
    let progress = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let rx = fsync_writer(rig.dev(), 256, progress.clone(), stop.clone());
    wait_progress(rig, &progress, 16, "the writer did not get going");
    (initial, progress, stop, rx)
}

/// SIGTERM, the refusal, then SIGQUIT while `writer` runs: the daemon exits 0 within 10 s,
/// ROOT is unmounted within 3 s, the writer's log arrives within `log_wait` with a failed
/// call (never a silent success), and every call that succeeded before is on the target
/// (`initial`: the backing file before the writer).
fn quit_mid_writes(
    rig: &mut Rig,
    rx: std::sync::mpsc::Receiver<WriterLog>,
    initial: &[u8],
    log_wait: Duration,
    writer: &str,
    calls: &str,
) {
    rig.signal_initiator("TERM");
    wait_refusal(rig);
    rig.signal_initiator("QUIT");
    initiator_exits_0(rig, "after SIGQUIT");
    assert!(
        wait_until(Duration::from_secs(10), || !rig.root_mounted()),
        "ROOT still mounted after SIGQUIT"
    );
    let log = rx
        .recv_timeout(log_wait)
        .unwrap_or_else(|e| panic!("{writer} hung after the daemon exited: {e}"));
    let Some((i, p, e)) = &log.failed else {
        panic!(
            "{writer} never saw an error after SIGQUIT ({} calls)",
            log.calls_ok
        );
    };
    eprintln!(
        "{} {calls} completed; chunk {i} pass {p} failed: {e}",
        log.calls_ok
    );
    check_fsynced(&fs::read(&rig.file).unwrap(), initial, &log);
}

/// SIGTERM while an application writes and fsyncs through the device file: the daemon
/// refuses to stop while the file is open, every call goes on succeeding, and once the
/// application closes the file the daemon exits 0 with ROOT unmounted; every synced write is
/// on the target.
#[test]
fn sigterm_mid_fsync_writes_keeps_serving_them() {
    let mut rig = Rig::start(Target::AoeServe, 1500, InitOpts::default());
    let (initial, progress, stop, rx) = fsync_writer_going(&rig);
    rig.signal_initiator("TERM");
    wait_refusal(&rig);
    // Still served after the refusal: more calls complete.
    let at_refusal = progress.load(Ordering::SeqCst);
    wait_progress(
        &rig,
        &progress,
        at_refusal + 16,
        "no write completed after the refusal",
    );
    stop.store(true, Ordering::SeqCst);
    let log = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("writer hung");
    if let Some((i, p, e)) = &log.failed {
        panic!(
            "chunk {i} pass {p} failed while the daemon refused to stop: {e}{}",
            rig.logs()
        );
    }
    initiator_exits_0(&mut rig, "after the writer closed the device");
    assert!(!rig.root_mounted(), "ROOT still mounted");
    eprintln!("{} write+fsync calls completed", log.calls_ok);
    check_fsynced(&fs::read(&rig.file).unwrap(), &initial, &log);
}

/// SIGTERM then SIGQUIT while an application writes and fsyncs through the device file: the
/// daemon exits 0 at once, ROOT is unmounted (no hung FUSE mount), the application's next
/// call fails (never a silent success), and every call that succeeded before is on the
/// target.
#[test]
fn sigquit_mid_fsync_writes_fails_the_rest() {
    let mut rig = Rig::start(Target::AoeServe, 1500, InitOpts::default());
    // The stop flag stays unset: only the daemon's exit ends this writer.
    let (initial, _progress, _stop, rx) = fsync_writer_going(&rig);
    quit_mid_writes(
        &mut rig,
        rx,
        &initial,
        Duration::from_secs(10),
        "the writer",
        "write+fsync calls",
    );
}

/// One NBD request (`cmd`: 1 write, 3 flush) on `s` and its simple reply's error; an I/O
/// error if the connection ended first.
fn nbd_call(s: &mut UnixStream, cmd: u16, cookie: u64, off: u64, data: &[u8]) -> io::Result<u32> {
    let mut out = 0x2560_9513u32.to_be_bytes().to_vec();
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&cmd.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&off.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    s.write_all(&out)?;
    let mut h = [0u8; 16];
    s.read_exact(&mut h)?;
    assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes(), "simple reply magic");
    assert_eq!(&h[8..16], &cookie.to_be_bytes(), "reply to another request");
    Ok(u32::from_be_bytes(h[4..8].try_into().unwrap()))
}

/// SIGTERM then SIGQUIT while an NBD client writes and flushes 64 KiB chunks one after the
/// other: the daemon exits 0 at once with ROOT unmounted; the client's request in progress
/// ends in an error reply or a closed connection (never a success it did not earn), and
/// every chunk whose write and flush were answered with no error is on the target.
#[test]
fn sigquit_mid_nbd_writes_fails_the_rest() {
    let mut rig = Rig::start(Target::AoeServe, 1500, InitOpts::default());
    let sock = rig.dir.path().join("nbd.sock");
    rig.restart_initiator(&["--nbd", sock.to_str().unwrap()]);
    assert!(wait_until(Duration::from_secs(10), || sock.exists()));
    let initial = fs::read(&rig.file).unwrap();
    let chunks = 256;
    let mut s = nbd_connect(&sock, DEV);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let progress = Arc::new(AtomicUsize::new(0));
    let p2 = progress.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut log = WriterLog {
            done: vec![None; chunks],
            failed: None,
            calls_ok: 0,
        };
        let mut cookie = 0u64;
        'passes: for pass in 1.. {
            for i in 0..chunks {
                cookie += 2;
                let off = (i * CHUNK) as u64;
                let r = nbd_call(&mut s, 1, cookie, off, &chunk_data(pass, i)).and_then(|e| {
                    if e != 0 {
                        return Ok(e);
                    }
                    nbd_call(&mut s, 3, cookie + 1, 0, &[])
                });
                match r {
                    Ok(0) => {}
                    Ok(e) => {
                        let e = io::Error::other(format!("NBD error {e}"));
                        log.failed = Some((i, pass, e));
                        break 'passes;
                    }
                    Err(e) => {
                        log.failed = Some((i, pass, e));
                        break 'passes;
                    }
                }
                log.done[i] = Some(pass);
                log.calls_ok += 1;
                p2.fetch_add(1, Ordering::SeqCst);
            }
        }
        let _ = tx.send(log);
    });
    wait_progress(&rig, &progress, 16, "the NBD writer did not get going");
    quit_mid_writes(
        &mut rig,
        rx,
        &initial,
        Duration::from_secs(30),
        "the NBD writer",
        "NBD write+flush pairs",
    );
}

// ------------------------------------------------------------------------------------------
// One initiator per ROOT

/// Waits up to 10 s for the refused `second` initiator: it must exit 1 saying `want`.
/// Returns what it said.
fn assert_refused(second: &mut aoe_testkit::NsChild, want: &str) -> String {
    let status = second.wait_timeout(Duration::from_secs(10)).unwrap();
    let out = second.output_so_far();
    if status.is_none() {
        second.stop().ok();
    }
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "second initiator: {out}"
    );
    assert!(
        out.contains(want),
        "second initiator said:\n{out}\nwant: {want}"
    );
    out
}

/// The first initiator still reads the rig's pattern (its device file, 4 KiB at 1 MiB).
fn assert_first_initiator_reads(rig: &Rig) {
    let got = read_at(&rig.dev(), 1 << 20, 4096).expect("read through the first initiator");
    assert!(
        got == pattern(1, (1 << 20) + 4096)[1 << 20..],
        "wrong bytes"
    );
}

/// A second `aoe initiator` on a ROOT the first has mounted exits 1 with a clear message
/// naming the first one's pid, without mounting anything; the first keeps working.
#[test]
fn second_initiator_on_a_mounted_root_is_refused() {
    let rig = Rig::start(Target::AoeServe, 1500, InitOpts::default());
    let first = rig.initiator.as_ref().unwrap().pid();
    let mut second = rig.spawn_initiator(&[]);
    let want = format!(
        "{} is already mounted (by another aoe initiator, pid {first}); stop it first",
        rig.root.display()
    );
    assert_refused(&mut second, &want);
    let mounts = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(&*rig.root.to_string_lossy()))
        .count();
    assert_eq!(mounts, 1, "mounts on ROOT");
    assert_first_initiator_reads(&rig);
    rig.finish();
}

/// Audit (issue 14): a second `aoe initiator` in the first one's network namespace, on
/// another ROOT, ran beside it: both send from the interface's MAC with tags from the same
/// counter and clock, so each could take the other's answers. It now exits 1 naming the
/// first one's pid, mounts nothing, and the first keeps working.
///
/// Audit (s7): also with an `--iflist` disjoint from the first one's. Refused still (the
/// kernel driver is one per machine, one initiator serves any number of interfaces, and
/// either list can be rewritten at run time through ROOT/interfaces), but the error now
/// says how to get there: the first one's ROOT and `aoe-interfaces --root ROOT`, or a
/// network namespace of its own; it used to say only "stop it".
#[test]
fn second_initiator_in_one_network_namespace_is_refused() {
    let rig = Rig::start(Target::AoeServe, 1500, InitOpts::default());
    let first = rig.initiator.as_ref().unwrap().pid();
    let root2 = rig.dir.path().join("root2");
    let mut c = Command::new(AOE);
    c.args(["initiator", "--root", root2.to_str().unwrap()])
        .args(["--iflist", "aoe-disjoint0"]);
    let mut second = rig.init_ns.spawn(c).unwrap();
    let out = assert_refused(
        &mut second,
        &format!("another aoe initiator runs in this network namespace, pid {first}"),
    );
    let root1 = rig.root.display();
    for want in [
        format!("with ROOT {root1}"),
        format!("aoe-interfaces --root {root1}"),
        "ip link set IF netns".to_string(),
        "disjoint --iflist".to_string(),
    ] {
        assert!(
            out.contains(&want),
            "second initiator said:\n{out}\nwant: {want}"
        );
    }
    assert!(
        !root2.join("discover").exists(),
        "the second initiator mounted its ROOT"
    );
    assert_first_initiator_reads(&rig);
    rig.finish();
}

/// SIGKILL of `aoe initiator` in the middle of a write through its device file and of one
/// through NBD: both writers get an error instead of hanging, and the dead daemon leaves a
/// FUSE mount answering ENOTCONN and its NBD socket file. A restart on the same ROOT and
/// socket removes the stale mount (one warning line), takes the socket over and serves
/// both again; it used to exit 1 asking for `fusermount3 -u -z`. Before that, a second
/// initiator on another ROOT is refused the first one's live NBD socket instead of
/// silently taking it over.
#[test]
fn sigkill_mid_write_then_restart_takes_over_root_and_nbd_socket() {
    let mut rig = Rig::start(Target::AoeServe, 1500, InitOpts::default());
    let sock = rig.dir.path().join("nbd.sock");
    let nbd = ["--nbd", sock.to_str().unwrap()];
    rig.restart_initiator(&nbd);
    assert!(wait_until(Duration::from_secs(10), || sock.exists()));

    // A live socket stays with its server (the second initiator in a network namespace of
    // its own: in the first one's it is refused for that).
    let root2 = rig.dir.path().join("root2");
    let ns2 = aoe_testkit::Netns::new("aoeii2").unwrap();
    let lan2 = aoe_testkit::VethPair::new_named(&ns2, "n2a", &ns2, "n2b", 1500).unwrap();
    let mut other = ns2
        .spawn(
            Command::new(AOE)
                .args(["initiator", "--root", root2.to_str().unwrap()])
                .args(["--iflist", lan2.a_name()])
                .args(nbd),
        )
        .unwrap();
    let status = other.wait_timeout(Duration::from_secs(10)).unwrap();
    let out = other.output_so_far();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "--nbd: {} is in use by a running server",
            sock.display()
        )),
        "{out}"
    );
    let client = nbd_connect(&sock, DEV);
    assert!(nbd_pipelined_writes(client, vec![(0, pattern(7, 4096))]).is_empty());

    // Writers on both front-ends, then SIGKILL.
    let mut dd = dd_loop(&format!(
        "if=/dev/zero of={} oflag=direct",
        rig.dev().display()
    ));
    let mut client = nbd_connect(&sock, DEV);
    let replies = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = replies.clone();
    // One NBD_CMD_WRITE at a time, over and over: true once the connection fails.
    let nbd_writer = std::thread::spawn(move || {
        for i in 0u64.. {
            let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
            req.extend_from_slice(&[0, 0, 0, 1]); // flags, NBD_CMD_WRITE
            req.extend_from_slice(&i.to_be_bytes());
            req.extend_from_slice(&((i % 1024) * 4096).to_be_bytes());
            req.extend_from_slice(&4096u32.to_be_bytes());
            req.extend_from_slice(&pattern(i, 4096));
            let mut h = [0u8; 16];
            if client
                .write_all(&req)
                .and_then(|_| client.read_exact(&mut h))
                .is_err()
            {
                return true;
            }
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        false
    });
    assert!(wait_until(Duration::from_secs(10), || {
        replies.load(std::sync::atomic::Ordering::Relaxed) > 20
    }));
    rig.sigkill_initiator();
    let dd_done = wait_until(Duration::from_secs(10), || dd.try_wait().unwrap().is_some());
    assert!(dd_done, "dd on the device file hangs after SIGKILL");
    assert!(!dd.wait().unwrap().success(), "dd succeeded across SIGKILL");
    assert!(
        nbd_writer.join().unwrap(),
        "the NBD writer saw every reply across SIGKILL"
    );
    assert!(
        fs::metadata(&rig.root).is_err_and(|e| e.kind() == std::io::ErrorKind::NotConnected),
        "ROOT is not a stale mount after SIGKILL"
    );
    assert!(sock.exists(), "the NBD socket file is gone");

    // The restart takes over.
    rig.launch_initiator(&nbd.map(String::from));
    rig.wait_state("up", Duration::from_secs(10), "after the restart");
    let out = rig.initiator.as_ref().unwrap().output_so_far();
    assert!(
        out.contains("removing the stale mount of an aoe initiator that is gone"),
        "{out}"
    );
    write_sync(&rig.dev(), 8192, &pattern(9, 4096)).expect("write through the device file");
    let client = nbd_connect(&sock, DEV);
    assert!(nbd_pipelined_writes(client, vec![(0, pattern(8, 4096))]).is_empty());
    assert!(read_at(&rig.dev(), 0, 4096).unwrap() == pattern(8, 4096));
    assert!(read_at(&rig.dev(), 8192, 4096).unwrap() == pattern(9, 4096));
    rig.finish();
}

/// The loop device `--loop` attached survives a SIGKILL of the initiator, bound to a file
/// on the dead mount where every I/O fails; it used to stay so for good. The restart
/// detaches it (`losetup -d`): held open here, so the kernel can only mark it to go with
/// its last close (`autoclear`), which keeps its name from being reused meanwhile.
#[test]
fn sigkill_then_restart_detaches_the_dead_initiators_loop_device() {
    let opts = InitOpts {
        loop_devices: true,
        ..InitOpts::default()
    };
    let mut rig = Rig::start(Target::AoeServe, 1500, opts);
    let old = rig.wait_loops();
    assert_eq!(old.len(), 1, "{old:?}");
    let holder = fs::File::open(&old[0]).unwrap();
    let autoclear = PathBuf::from(old[0].replace("/dev/", "/sys/block/")).join("loop/autoclear");
    assert_eq!(fs::read_to_string(&autoclear).unwrap().trim(), "0");
    rig.sigkill_initiator();
    rig.launch_initiator(&["--loop".to_string()]);
    rig.wait_state("up", Duration::from_secs(10), "after the restart");
    let detached = wait_until(Duration::from_secs(10), || {
        fs::read_to_string(&autoclear).is_ok_and(|a| a.trim() == "1")
    });
    if !detached {
        // Do not leave it behind.
        let _ = Command::new("losetup").args(["-d", &old[0]]).status();
    }
    assert!(
        detached,
        "{} still attached after the restart{}",
        old[0],
        rig.logs()
    );
    drop(holder);
    rig.finish();
}

// ------------------------------------------------------------------------------------------
// A full send buffer

/// The initiator's link slowed to 16 kbit/s by a tbf qdisc with a queue that never drops:
/// frames wait in it holding their socket's send buffer until send() says EAGAIN. With
/// writes in flight, the network thread must keep answering commands (it waits for POLLOUT
/// instead of sleeping per frame); once the link is fast again the writes complete with the
/// right bytes.
///
/// The condition, with no timing of its own: 20 control writes to `interfaces` (answered by
/// the network thread, Cmd::SetInterfaces) each finish within `echo`'s 20 s bound, all while
/// the 4 MiB write is still stuck behind the slow link (checked after them). A network
/// thread that sleeps until its frames are sent would hold the first of them for as long
/// as the link stays slow: at 16 kbit/s one 9 KiB frame takes 4.5 s and the write's frames
/// half an hour. (It asserted each control write under 250 ms, which a loaded machine can
/// miss; the slowest is still printed.)
#[test]
fn full_send_buffer_does_not_stall_the_network_thread() {
    let rig = Rig::start(Target::AoeServe, 9000, InitOpts::default());
    let tbf = |op: &str| tbf_slow_link(&rig.init_ns, &rig.init_if, op);
    tbf("add");
    let data = pattern(9, 4 << 20);
    let writer = {
        let dev = rig.dev();
        let data = data.clone();
        std::thread::spawn(move || {
            let f = OpenOptions::new().write(true).open(&dev).unwrap();
            f.write_all_at(&data, 1 << 20)
        })
    };
    let init = rig.initiator.as_ref().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || init
            .output_so_far()
            .contains("send buffer full")),
        "the send buffer never filled{}",
        rig.logs()
    );
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t0 = Instant::now();
        // Fails if the write is not answered within 20 s (`timeout` in `echo`).
        rig.echo_ok("interfaces", &rig.init_if);
        slowest = slowest.max(t0.elapsed());
    }
    eprintln!("slowest of 20 control writes with the send buffer full: {slowest:?}");
    assert!(
        !writer.is_finished(),
        "the write finished during the control writes: the link was not congested{}",
        rig.logs()
    );
    tbf("del");
    writer
        .join()
        .unwrap()
        .expect("the write once the link is fast again");
    assert!(
        read_at(&rig.dev(), 1 << 20, data.len()).unwrap() == data,
        "wrong bytes after the congestion"
    );
    rig.finish();
}

// ------------------------------------------------------------------------------------------
// Long direct I/O (FUSE_ASYNC_DIO)

/// `dd bs=4M` with O_DIRECT through the device file: with `FUSE_ASYNC_DIO` the kernel sends
/// each 4 MiB as sixteen 256 KiB read requests (aoe-fuse `REQUEST_BYTES`) or four 1 MiB
/// write requests (`WRITE_REQUEST_BYTES`) at once, completed in any order; every byte must land where it belongs, both ways, and nothing around it may
/// change.
#[test]
fn long_direct_io_lands_in_place() {
    let rig = Rig::start(Target::AoeServe, 9000, InitOpts::default());
    let src = rig.dir.path().join("src");
    let data = pattern(77, 8 << 20);
    fs::write(&src, &data).unwrap();
    let orig = fs::read(&rig.file).unwrap();
    let dd = |args: &[String]| run_dd(&rig, args);
    let dev = rig.dev().display().to_string();
    // 8 MiB at 4 MiB + 4 KiB: direct I/O needs only 512-byte alignment here.
    dd(&[
        format!("if={}", src.display()),
        format!("of={dev}"),
        "bs=4M".into(),
        "oflag=direct,seek_bytes".into(),
        format!("seek={}", (4 << 20) + 4096),
        "conv=notrunc".into(),
    ]);
    let mut want = orig.clone();
    want[(4 << 20) + 4096..][..data.len()].copy_from_slice(&data);
    let all = fs::read(&rig.file).unwrap();
    assert!(all.len() == want.len(), "the backing file changed size");
    if let Some(i) = (0..all.len()).find(|&i| all[i] != want[i]) {
        panic!("backing file differs first at byte {i}{}", rig.logs());
    }
    let got = dd_read_back(&rig, &["bs=4M"]);
    assert!(
        got.len() == want.len(),
        "read {} of {} bytes",
        got.len(),
        want.len()
    );
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!("direct read differs first at byte {i}{}", rig.logs());
    }
    rig.finish();
}

// ------------------------------------------------------------------------------------------
// Sizes: a block device's

/// Sixth audit (s23): `truncate` and `ftruncate` of a device file to another size reported
/// success and changed nothing. Now they fail with `EINVAL`, as on a block device, while an
/// `open(O_TRUNC)` is still taken and ignored as on /dev/sdX (`dd of=ROOT/e1.1` without
/// `conv=notrunc`, which the kernel sends as the same size-0 `SETATTR` as `truncate(path, 0)`,
/// so that one is taken too); the device's own size is taken; no byte changes but those
/// written, and the size stays. The same for a partition file.
#[test]
fn a_device_file_refuses_a_size_change_and_takes_o_trunc() {
    size_changes_refused(InitOpts::default());
}

/// [`a_device_file_refuses_a_size_change_and_takes_o_trunc`] with `--fuse-uring`: the
/// `SETATTR`s come through the ring's side thread.
#[test]
fn a_device_file_refuses_a_size_change_and_takes_o_trunc_fuse_uring() {
    let (_u, opts) = InitOpts::fuse_uring();
    size_changes_refused(opts);
}

fn size_changes_refused(opts: InitOpts) {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = backing_with_partition(dir.path());
    let rig = Rig::start_with(Target::AoeServe, 1500, opts, Some(file), &[]);
    let dev = rig.dev();
    let part = rig.partition(1);
    let mut want = fs::read(&rig.file).unwrap();
    let src = rig.dir.path().join("src");
    let data = pattern(23, 8192);
    fs::write(&src, &data).unwrap();
    for (path, base, len) in [
        (&dev, 0u64, want.len() as u64),
        (&part, PART_START * 512, PART_SECTORS * 512),
    ] {
        let at = |off: u64| (base + off) as usize;
        // dd without conv=notrunc: open(O_WRONLY|O_CREAT|O_TRUNC), then the write. (With a
        // seek, GNU dd also calls ftruncate(seek * bs), refused here: coreutils 9 says
        // "failed to truncate" and writes, exit 0; 8.x stopped there, exit 1. On /dev/sdX it
        // says nothing, the file not being a regular one; see docs/TEST-AUDIT.md.)
        run_dd(
            &rig,
            &[
                format!("if={}", src.display()),
                format!("of={}", path.display()),
                "bs=4k".into(),
                "seek=3".into(),
            ],
        );
        want[at(3 * 4096)..][..data.len()].copy_from_slice(&data);
        // open(O_TRUNC) from std too, then a write through it.
        let f = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open(O_TRUNC) {}: {e}{}", path.display(), rig.logs()));
        // Not at 0: the device's sector 0 holds the partition table.
        f.write_all_at(&data[..512], 5 * 512).unwrap();
        f.sync_all().unwrap();
        want[at(5 * 512)..][..512].copy_from_slice(&data[..512]);
        assert_eq!(fs::metadata(path).unwrap().len(), len, "size after O_TRUNC");
        // ftruncate: any other size refused, the file's own taken.
        for to in [0, len / 2, len - 512, len + 4096, 1 << 40] {
            match f.set_len(to) {
                Err(e) if e.raw_os_error() == Some(22) => {} // EINVAL
                r => panic!(
                    "ftruncate of {} ({len} bytes) to {to}: {r:?}",
                    path.display()
                ),
            }
        }
        f.set_len(len)
            .unwrap_or_else(|e| panic!("ftruncate to its own size: {e}"));
        drop(f);
        // truncate(1), which opens and calls ftruncate: refused with the kernel's message.
        let out = Command::new("truncate")
            .args(["-s", "1M"])
            .arg(path)
            .output()
            .expect("truncate (coreutils)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("Invalid argument"),
            "truncate -s 1M of {}: {:?} {err}",
            path.display(),
            out.status
        );
        assert_eq!(
            fs::metadata(path).unwrap().len(),
            len,
            "size after truncates"
        );
    }
    let all = fs::read(&rig.file).unwrap();
    assert!(all.len() == want.len(), "the backing file changed size");
    if let Some(i) = (0..all.len()).find(|&i| all[i] != want[i]) {
        panic!("backing file differs first at byte {i}{}", rig.logs());
    }
    rig.finish();
}

/// Reads the rig's device with `dd iflag=direct` and `args` (`bs=`, `count=`, ...) into a
/// file and returns its bytes; a failure fails the test with dd's error and the rig's logs.
fn dd_read_back(rig: &Rig, args: &[&str]) -> Vec<u8> {
    let back = rig.dir.path().join("back");
    let mut all = vec![
        format!("if={}", rig.dev().display()),
        format!("of={}", back.display()),
        "iflag=direct".into(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    run_dd(rig, &all);
    fs::read(&back).unwrap()
}

/// Runs dd with `args`; a failure fails the test with dd's error and the rig's logs.
fn run_dd(rig: &Rig, args: &[String]) {
    let out = Command::new("dd")
        .args(args)
        .output()
        .expect("dd (coreutils)");
    assert!(
        out.status.success(),
        "dd {args:?}: {}{}",
        String::from_utf8_lossy(&out.stderr),
        rig.logs()
    );
}

/// The initiator's read requests leave through its transmit ring (a `PACKET_TX_RING` on a
/// send-only socket per interface, one kick per batch; aoe-initiator `net.rs` `TxRing`),
/// and its full-size write frames with `sendmmsg` from the write's buffer through the
/// linear sender (`Iface::linear`, `LINEAR_MIN_DATA`): after 8 MiB written and read back
/// with direct I/O at MTU 9000 (17 sectors a frame: 964 frames each way), SIGTERM, and the
/// initiator's last line about the ring counts at least 964 frames through the ring, none
/// refused by the kernel, and at least 964 through the linear sender, and gives the
/// linear sender's full send buffers (`linear_full`). With `sendmmsg`
/// alone (a kernel refusing the ring) there is no such line: checked by making the ring's
/// set-up fail, which fails here; with the write frames copied into the ring (the code
/// before) `linear` is missing.
#[test]
fn frames_leave_through_the_transmit_ring() {
    let mut rig = Rig::start(Target::AoeServe, 9000, InitOpts::default());
    let src = rig.dir.path().join("src");
    let data = pattern(31, 8 << 20);
    fs::write(&src, &data).unwrap();
    run_dd(
        &rig,
        &[
            format!("if={}", src.display()),
            format!("of={}", rig.dev().display()),
            "oflag=direct".into(),
            "bs=1M".into(),
            "count=8".into(),
            "conv=notrunc".into(),
        ],
    );
    assert!(
        dd_read_back(&rig, &["bs=1M", "count=8"]) == data,
        "read back differs"
    );
    rig.signal_initiator("TERM");
    let mut init = rig.initiator.take().unwrap();
    let status = init.wait_timeout(Duration::from_secs(10)).unwrap();
    let log = init.output_so_far();
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM: {status:?}\n{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("frames sent through the transmit ring"))
        .unwrap_or_else(|| panic!("no transmit ring line:\n{log}"));
    let field = |name: &str| log_field(line, name);
    assert!(field("frames") >= 964, "{line}");
    assert!(field("linear") >= 964, "{line}");
    assert_eq!(field("rejected"), 0, "{line}");
    // The linear sender's full send buffers are counted on the same line (none expected
    // on a veth, which frees each frame's charge as it delivers it, but a loaded machine
    // may defer the delivery to ksoftirqd: only its presence is pinned).
    let _ = field("linear_full");
}

/// The sum over the initiator's devices of the counter `name` in its `--metrics` text.
fn metric_sum(rig: &Rig, port: u16, name: &str) -> u64 {
    let (_, body) = get_metrics(&rig.init_ns, port);
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Write frames leave in the order the engine sent them. At MTU 9000 a 256 KiB NBD write
/// (nbdcopy's request size) is 30 full frames, which go out with `sendmmsg` from the
/// write's buffer, and a 1 KiB tail frame, small enough for the transmit ring; the ring was
/// kicked before the `sendmmsg` of its batch, so each tail overtook the full frames sent
/// before it, their answers came after its answer, and the engine counted them toward a
/// loss (some were copied for nothing, docs/PERFORMANCE.md "Writes at MTU 9000: frames in
/// order"). 64 such writes pipelined on one connection: with the target answering in
/// order on a veth, no answer may come while a frame sent before it is unanswered, beyond
/// what retransmissions explain. With the build before the fix the initiator counted about
/// one such answer per write; the bytes are checked too. The image is on tmpfs, where the
/// target writes every frame inline, in order: on a disk file system it writes inline
/// only while writes are fast, and one slow write sends the next ones to its workers for a
/// while (`FileBackend::write_inline`), whose answers then overtake; on a busy machine
/// (eight test threads) that made 415 answers overtake with 5 retransmissions, frames
/// that had left in order.
#[test]
fn nbd_write_frames_leave_in_order_mtu_9000() {
    const PORT: u16 = 9618;
    const WRITES: usize = 64;
    const LEN: usize = 256 << 10;
    let shm = tempfile::tempdir_in("/dev/shm").expect("a directory on /dev/shm");
    let image = shm.path().join("backing.img");
    fs::write(&image, pattern(1, (SECTORS * 512) as usize)).expect("the image on tmpfs");
    let mut rig = Rig::start_with(
        Target::AoeServe,
        9000,
        InitOpts::default(),
        Some(image),
        &[],
    );
    let sock = rig.dir.path().join("nbd.sock");
    let addr = format!("127.0.0.1:{PORT}");
    rig.restart_initiator(&["--nbd", sock.to_str().unwrap(), "--metrics", &addr]);
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists()),
        "no NBD socket{}",
        rig.logs()
    );
    let writes: Vec<(u64, Vec<u8>)> = (0..WRITES)
        // Apart, so that no two are merged into one request.
        .map(|i| ((i * 2 * LEN) as u64, pattern(4000 + i as u64, LEN)))
        .collect();
    let failed = nbd_pipelined_writes(nbd_connect(&sock, DEV), writes.clone());
    assert!(failed.is_empty(), "writes failed: {failed:?}{}", rig.logs());
    // The network thread publishes its counters every 250 ms or so: wait for the frames
    // of every write (at most 8704 bytes each).
    let least = (WRITES * LEN).div_ceil(8704) as u64;
    let mut sent = 0;
    let published = wait_until(Duration::from_secs(10), || {
        sent = metric_sum(&rig, PORT, "aoe_initiator_frames_sent_total");
        sent >= least
    });
    assert!(
        published,
        "{sent} frames sent for {WRITES} writes of 256 KiB, at least {least} expected:\n{}",
        get_metrics(&rig.init_ns, PORT).1
    );
    let overtaking = metric_sum(&rig, PORT, "aoe_initiator_overtaking_answers_total");
    let retransmits = metric_sum(&rig, PORT, "aoe_initiator_retransmits_total");
    assert!(
        overtaking <= retransmits,
        "{overtaking} answers came while a frame sent before them was unanswered, with \
         {retransmits} retransmissions: frames left out of order{}",
        rig.logs()
    );
    let back = fs::read(&rig.file).unwrap();
    for (off, data) in &writes {
        let off = *off as usize;
        assert!(back[off..off + LEN] == data[..], "bytes at {off} differ");
    }
}

// ------------------------------------------------------------------------------------------
// Many NBD requests in flight

/// One request of a pipelined NBD stream.
enum NbdReq {
    Read(u64, u32),
    Write(u64, Vec<u8>),
    Flush,
}

/// Sends every request of `reqs` (cookie = index) from one thread while this one reads the
/// replies, so the server has them all in flight at once (up to its cap); returns each
/// request's (error, read data), by cookie. Replies may come in any order.
fn nbd_pipeline(s: &UnixStream, reqs: &[NbdReq]) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut read_len = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let (kind, off, len, data): (u16, u64, u32, &[u8]) = match r {
            NbdReq::Read(off, len) => (0, *off, *len, &[]),
            NbdReq::Write(off, d) => (1, *off, d.len() as u32, d),
            NbdReq::Flush => (3, 0, 0, &[]),
        };
        read_len.push(if kind == 0 { len as usize } else { 0 });
        out.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(i as u64).to_be_bytes());
        out.extend_from_slice(&off.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(data);
    }
    let mut w = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || w.write_all(&out));
    let mut r = s.try_clone().unwrap();
    let mut got: Vec<Option<(u32, Vec<u8>)>> = (0..reqs.len()).map(|_| None).collect();
    for _ in 0..reqs.len() {
        let mut h = [0u8; 16];
        r.read_exact(&mut h).expect("NBD reply");
        assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes(), "simple reply magic");
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap()) as usize;
        assert!(
            got.get(cookie).is_some_and(Option::is_none),
            "reply for unknown or answered cookie {cookie}"
        );
        let mut data = vec![0u8; if err == 0 { read_len[cookie] } else { 0 }];
        r.read_exact(&mut data).expect("NBD read data");
        got[cookie] = Some((err, data));
    }
    sender.join().unwrap().expect("send the requests");
    got.into_iter().map(Option::unwrap).collect()
}

/// Rounds of requests on two connections to one export at once (NBD multi-conn): in each,
/// on each connection, writes of 1 byte to 300 KiB at any offset (most unaligned, some in
/// the sectors of another write), reads, and flushes between them, all in flight together.
/// Within a round no two writes share a byte and no read covers a byte written in it (the
/// protocol orders neither); from round to round writes land over earlier ones, and reads
/// cover what earlier rounds wrote. Every read must return the bytes of the model byte for
/// byte, every request succeed, and at the end the whole device, read through NBD, and the
/// backing file must equal the model: read buffers the engine fills a second time (kept
/// from earlier reads) must hold no stale byte, and no write may be lost or misplaced.
/// At MTU 1500 (two sectors a frame) and 9000 (17 sectors: full 8.5 KiB write frames,
/// the ones a change to how write data reaches the wire touches first).
#[test]
fn many_nbd_requests_in_flight_keep_every_byte() {
    many_nbd_requests_in_flight(1500);
}

#[test]
fn many_nbd_requests_in_flight_keep_every_byte_mtu_9000() {
    many_nbd_requests_in_flight(9000);
}

/// At MTU 65535, the largest a veth or TAP link takes (issue 15, frames above 9000): 127
/// sectors, 65,024 bytes, a frame, so a 300 KiB write is five frames and most requests are
/// partial frames at both ends.
#[test]
fn many_nbd_requests_in_flight_keep_every_byte_mtu_65535() {
    many_nbd_requests_in_flight(65535);
}

fn many_nbd_requests_in_flight(mtu: u32) {
    let mut rig = Rig::start(Target::AoeServe, mtu, InitOpts::default());
    let sock = rig.dir.path().join("nbd.sock");
    rig.restart_initiator(&["--nbd", sock.to_str().unwrap()]);
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists()),
        "no NBD socket{}",
        rig.logs()
    );
    let size = SECTORS * 512;
    let mut model = fs::read(&rig.file).unwrap();
    assert_eq!(model.len() as u64, size);
    let conns = [nbd_connect(&sock, DEV), nbd_connect(&sock, DEV)];
    let mut seed = 0x5eed_u64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    const ROUNDS: usize = 6;
    for round in 0..ROUNDS {
        // Byte ranges written in this round, over both connections.
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let free = |t: &[(u64, u64)], a: u64, b: u64| t.iter().all(|&(x, y)| b <= x || y <= a);
        let mut per_conn: Vec<Vec<NbdReq>> = vec![Vec::new(), Vec::new()];
        let mut writes = Vec::new();
        for (c, reqs) in per_conn.iter_mut().enumerate() {
            for i in 0..48 {
                let len = 1 + rand(300 << 10);
                let mut off = rand(size - len);
                if i % 4 == 0 {
                    off -= off % 512; // some aligned starts
                }
                if !free(&taken, off, off + len) {
                    continue;
                }
                taken.push((off, off + len));
                let data = pattern((round * 1000 + c * 100 + i) as u64 + 7, len as usize);
                writes.push((off, data.clone()));
                reqs.push(NbdReq::Write(off, data));
                if i % 16 == 8 {
                    reqs.push(NbdReq::Flush);
                }
            }
        }
        // Reads (any length, any offset) of bytes no write of this round touches.
        for reqs in per_conn.iter_mut() {
            let mut n = 0;
            while n < 24 {
                let len = 1 + rand(400 << 10);
                let off = rand(size - len);
                if free(&taken, off, off + len) {
                    let at = rand(reqs.len() as u64 + 1) as usize;
                    reqs.insert(at, NbdReq::Read(off, len as u32));
                    n += 1;
                }
            }
        }
        let results: Vec<Vec<(u32, Vec<u8>)>> = std::thread::scope(|sc| {
            let hs: Vec<_> = conns
                .iter()
                .zip(&per_conn)
                .map(|(s, reqs)| sc.spawn(move || nbd_pipeline(s, reqs)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (c, (reqs, res)) in per_conn.iter().zip(&results).enumerate() {
            for (i, (req, (err, data))) in reqs.iter().zip(res).enumerate() {
                assert_eq!(*err, 0, "round {round}, connection {c}, request {i} failed");
                if let NbdReq::Read(off, len) = req {
                    let want = &model[*off as usize..][..*len as usize];
                    if data != want {
                        let at = (0..data.len()).find(|&k| data[k] != want[k]).unwrap();
                        panic!(
                            "round {round}, connection {c}: read of {len} at {off}: byte {} \
                             (offset {}) is {:#04x}, want {:#04x}",
                            at,
                            off + at as u64,
                            data[at],
                            want[at]
                        );
                    }
                }
            }
        }
        for (off, data) in writes {
            model[off as usize..][..data.len()].copy_from_slice(&data);
        }
    }
    // The whole device through one connection, and the backing file.
    let whole: Vec<NbdReq> = (0..size)
        .step_by(1 << 20)
        .map(|off| NbdReq::Read(off, (size - off).min(1 << 20) as u32))
        .collect();
    let got: Vec<u8> = nbd_pipeline(&conns[0], &whole)
        .into_iter()
        .flat_map(|(err, d)| {
            assert_eq!(err, 0, "final read failed");
            d
        })
        .collect();
    let first_diff = |a: &[u8]| (0..a.len()).find(|&k| a[k] != model[k]);
    assert_eq!(got.len(), model.len());
    assert_eq!(
        first_diff(&got),
        None,
        "device read through NBD differs from the model"
    );
    let file = fs::read(&rig.file).unwrap();
    assert_eq!(
        first_diff(&file),
        None,
        "backing file differs from the model"
    );
    drop(conns);
    rig.finish();
}

// ------------------------------------------------------------------------------------------
// Direct writes in parallel, and the page cache of a buffered opener

/// `O_DIRECT` of asm-generic/fcntl.h on x86 (the tests run there).
const O_DIRECT: i32 = 0o40000;
/// The initiator's `--metrics` port (in its own namespace).
const METRICS_PORT: u16 = 9617;
/// 4 KiB blocks the direct writers write, block `i` at `DIRECT_BASE + i * 4096`.
const DIRECT_BLOCKS: usize = 16;
const DIRECT_BASE: u64 = 1 << 20;

fn open_direct(dev: &Path) -> fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(O_DIRECT)
        .open(dev)
        .expect("open the device file with O_DIRECT")
}

/// Block `i` of generation `g`: every byte says which.
fn direct_block(i: usize, g: u64) -> Vec<u8> {
    pattern(g * 1000 + i as u64, 4096)
}

/// The initiator's `aoe_initiator_in_flight` gauge (block requests submitted and not yet
/// completed), summed over its devices.
fn in_flight(rig: &Rig) -> u64 {
    let (_, body) = get_metrics(&rig.init_ns, METRICS_PORT);
    body.lines()
        .filter(|l| l.starts_with("aoe_initiator_in_flight{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Writes of 4 KiB to [`DIRECT_BLOCKS`] blocks, one thread per block, each through its
/// own `O_DIRECT` open of `dev`, all at once; returns the threads.
fn direct_writers(dev: &Path, g: u64) -> Vec<std::thread::JoinHandle<io::Result<()>>> {
    (0..DIRECT_BLOCKS)
        .map(|i| {
            let f = open_direct(dev);
            std::thread::spawn(move || {
                f.write_all_at(&direct_block(i, g), DIRECT_BASE + i as u64 * 4096)
            })
        })
        .collect()
}

/// Concurrent `O_DIRECT` writes through the device file reach the initiator together: with
/// the target stopped (SIGSTOP) so nothing completes, 16 writers of 4 KiB each, and the
/// initiator must count 16 block requests in flight. The device file's `O_DIRECT` opens
/// for writing are opened in the kernel's direct I/O mode with
/// `FOPEN_PARALLEL_DIRECT_WRITES` (aoe-fuse `AoeFs::open`); in the cached mode, as before,
/// each such write holds the inode lock exclusively and the count stays at 1, which fails
/// here (checked with the build before the change). Then, with a buffered open of the same
/// file reading the blocks over and over while they are rewritten directly, round after
/// round: once the writers are done, the buffered open reads back the last generation,
/// never a page cached from before (the kernel drops the range before a direct write, the
/// initiator after it: `invalidator`); its own buffered writes read back through O_DIRECT;
/// and the backing file holds it all.
#[test]
fn parallel_direct_writes_and_a_buffered_reader() {
    let addr = format!("127.0.0.1:{METRICS_PORT}");
    let mut rig = Rig::start(Target::AoeServe, 9000, InitOpts::default());
    rig.restart_initiator(&["--metrics", &addr]);
    let dev = rig.dev();

    let pid = rig.target.as_ref().unwrap().pid().to_string();
    // Stopped for sure (every thread) before the first write: SIGSTOP is asynchronous, and
    // a write the target answered is no longer in flight.
    stop_process(pid.parse().unwrap());
    let writers = direct_writers(&dev, 1);
    let mut most = 0;
    let all_in = wait_until(Duration::from_secs(20), || {
        most = most.max(in_flight(&rig));
        most >= DIRECT_BLOCKS as u64
    });
    run_ok(Command::new("kill").args(["-CONT", &pid]));
    for w in writers {
        w.join().unwrap().expect("direct write");
    }
    assert!(
        all_in,
        "{DIRECT_BLOCKS} concurrent O_DIRECT writes of the device file: at most {most} reached \
         the initiator at once (one at a time: the kernel's exclusive inode lock){}",
        rig.logs()
    );

    let mut buffered = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
        .expect("open the device file (buffered)");
    let span = DIRECT_BLOCKS * 4096;
    let read_buffered = |f: &fs::File| {
        let mut b = vec![0u8; span];
        f.read_exact_at(&mut b, DIRECT_BASE).expect("buffered read");
        b
    };
    let want = |g: u64| -> Vec<u8> {
        (0..DIRECT_BLOCKS)
            .flat_map(|i| direct_block(i, g))
            .collect()
    };
    for g in 2..32u64 {
        // Pages of the previous generation in the cache, then a reader filling it again
        // while the direct writes are on their way.
        assert_eq!(
            read_buffered(&buffered),
            want(g - 1),
            "generation {}",
            g - 1
        );
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let f = buffered.try_clone().unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let mut b = vec![0u8; span];
                    f.read_exact_at(&mut b, DIRECT_BASE).expect("buffered read");
                    n += 1;
                }
                n
            })
        };
        for w in direct_writers(&dev, g) {
            w.join().unwrap().expect("direct write");
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        let got = read_buffered(&buffered);
        let stale: Vec<usize> = (0..DIRECT_BLOCKS)
            .filter(|&i| got[i * 4096..][..4096] != direct_block(i, g)[..])
            .collect();
        assert!(
            stale.is_empty(),
            "generation {g}: the buffered open reads blocks {stale:?} as they were before \
             the direct writes that completed{}",
            rig.logs()
        );
    }
    // Buffered writes (write-through) read back through O_DIRECT.
    let mine = pattern(4242, 8192);
    buffered
        .seek(io::SeekFrom::Start(DIRECT_BASE + 4096))
        .unwrap();
    buffered.write_all(&mine).unwrap();
    let mut back = vec![0u8; 8192];
    open_direct(&dev)
        .read_exact_at(&mut back, DIRECT_BASE + 4096)
        .unwrap();
    assert!(back == mine, "O_DIRECT read after a buffered write");
    drop(buffered);
    let mut model = want(31);
    model[4096..4096 + 8192].copy_from_slice(&mine);
    let file = fs::read(&rig.file).unwrap();
    assert!(
        file[DIRECT_BASE as usize..][..span] == model[..],
        "the backing file differs from what was written{}",
        rig.logs()
    );
    rig.finish();
}

/// Audit (s17): the same SIGKILL with `--fuse-uring` (FUSE requests through io_uring, the
/// kernel's `fuse_uring` queues instead of /dev/fuse reads): a dd reading and one writing
/// through the device file when the initiator dies must each get an error within 10 s, not
/// hang on a ring entry no one will commit; the restart on the same ROOT, with the ring
/// again, removes the stale mount and serves the device; what it reads is what was
/// written through it.
#[test]
fn sigkill_with_fuse_uring_fails_readers_and_writers_then_restart_serves() {
    let (_u, mut rig) = fuse_uring_rig(1500);
    let log = rig.initiator_log();
    assert!(
        log.contains("FUSE requests through io_uring"),
        "the initiator does not use FUSE over io_uring: {log}"
    );
    // I/O goes through the ring, and both loops still run, before the kill.
    let (mut reader, mut writer) = dd_reader_and_writer(&rig);
    assert!(
        reader.try_wait().unwrap().is_none() && writer.try_wait().unwrap().is_none(),
        "a dd loop stopped before the kill{}",
        rig.logs()
    );
    rig.sigkill_initiator();
    dd_loops_fail(&mut reader, &mut writer, "SIGKILL with --fuse-uring");
    rig.launch_initiator(&["--fuse-uring".to_string()]);
    rig.wait_state("up", Duration::from_secs(10), "after the restart");
    let out = rig.initiator.as_ref().unwrap().output_so_far();
    assert!(
        out.contains("removing the stale mount of an aoe initiator that is gone")
            && out.contains("FUSE requests through io_uring"),
        "{out}"
    );
    write_sync(&rig.dev(), 8192, &pattern(9, 4096)).expect("write through the device file");
    assert!(read_at(&rig.dev(), 8192, 4096).unwrap() == pattern(9, 4096));
    rig.finish();
}

/// Reads one line of ROOT/err in a thread of its own (blocking until there is one); the
/// line or the error comes through the receiver.
fn err_reader(root: &Path) -> std::sync::mpsc::Receiver<io::Result<String>> {
    let err = root.join("err");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = fs::File::open(&err).and_then(|mut f| {
            let mut buf = [0u8; 4096];
            let n = f.read(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        });
        let _ = tx.send(r);
    });
    rx
}

/// With `--fuse-uring` the ring is served on the network thread, and every request but
/// device-file I/O on a side thread that may wait: a read of `err` waiting for a line
/// holds its ring entry while the whole device is read through the ring (every byte as in
/// the backing file); a refused `interfaces` write (served on the side thread) then gives
/// it its line. Then SIGQUIT with a dd reader, a dd writer and another waiting `err` read
/// in flight: the daemon exits 0 within 10 s, each of them gets an answer (the dd's an
/// error, the `err` read EINTR or a line), and ROOT is unmounted. With the ring on a
/// thread of its own (before session 22) the daemon did not exit within the 10 s (three
/// runs of three): as the code reads, that thread went on taking the dd's new requests
/// after the network thread had stopped, and a command sent to a stopped network thread
/// is dropped unanswered, so the device file stayed open and the unmount waited.
#[test]
fn fuse_uring_on_the_network_thread_serves_reads_while_err_waits_then_sigquit() {
    let (_u, mut rig) = fuse_uring_rig(1500);
    let log = rig.initiator_log();
    assert!(
        log.contains("FUSE requests through io_uring on the network thread"),
        "the ring is not served on the network thread: {log}"
    );
    // The lines queued since the start, taken without waiting.
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = OpenOptions::new()
            .read(true)
            .custom_flags(0o4000) // O_NONBLOCK
            .open(rig.root.join("err"))
            .unwrap();
        let mut buf = [0u8; 4096];
        for _ in 0..1000 {
            match f.read(&mut buf) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("O_NONBLOCK read of err: {e}"),
            }
        }
    }
    let waiting = err_reader(&rig.root);
    let want = fs::read(&rig.file).unwrap();
    for round in 0..3 {
        let got = read_at(&rig.dev(), 0, want.len()).expect("read the device file");
        assert!(got == want, "round {round}: the device file's bytes differ");
    }
    // Still waiting, unless the daemon had something to say meanwhile (then the next read
    // waits for the refusal's line).
    let mut waiting = waiting;
    if let Ok(r) = waiting.try_recv() {
        eprintln!("err answered during the reads: {r:?}");
        waiting = err_reader(&rig.root);
    }
    let refused = fs::write(rig.root.join("interfaces"), "not/an/interface\n");
    assert!(refused.is_err(), "a bad interface name was taken");
    let line = waiting
        .recv_timeout(Duration::from_secs(10))
        .expect("the waiting err read was not answered")
        .expect("the waiting err read failed");
    assert!(!line.is_empty(), "an empty err line");

    let (mut reader, mut writer) = dd_reader_and_writer(&rig);
    let waiting = err_reader(&rig.root);
    rig.signal_initiator("TERM");
    wait_refusal(&rig);
    rig.signal_initiator("QUIT");
    initiator_exits_0(
        &mut rig,
        "after SIGQUIT with I/O in flight through the ring",
    );
    dd_loops_fail(&mut reader, &mut writer, "SIGQUIT");
    // EINTR as the daemon stops (or a line it had to say before): answered either way.
    if let Err(e) = waiting.recv_timeout(Duration::from_secs(10)) {
        panic!("the waiting err read hangs after SIGQUIT: {e}");
    }
    assert!(
        wait_until(Duration::from_secs(10), || !rig.root_mounted()),
        "ROOT still mounted after SIGQUIT"
    );
}

// ------------------------------------------------------------------------------------------
// Device-file reads answered from the receive ring

/// SIGTERMs the initiator (nothing open), waits for it to exit 0, and returns its last
/// "network thread loop" line (the network thread's counters as it stopped). Its log must
/// not hold fuser's error for the reply object retired after each read's own reply (the
/// kernel's refusal of it is expected: aoe-fuse `fs.rs` `answer_held`).
fn network_loop_line(rig: &mut Rig) -> String {
    rig.signal_initiator("TERM");
    let mut init = rig.initiator.take().unwrap();
    let status = init.wait_timeout(Duration::from_secs(10)).unwrap();
    let log = init.output_so_far();
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM: {status:?}\n{log}"
    );
    assert!(
        !log.contains("FUSE reply"),
        "fuser's reply errors in the log:\n{log}"
    );
    log.lines()
        .rfind(|l| l.contains("network thread loop"))
        .unwrap_or_else(|| panic!("no network thread loop line:\n{log}"))
        .to_owned()
}

/// The number after `name=` in a log line.
fn log_field(line: &str, name: &str) -> u64 {
    let at = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name} in: {line}"));
    line[at + name.len() + 2..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("{name} in: {line}"))
}

/// Opens `path` read-only, with `O_DIRECT` if `direct`.
fn open_read(path: &Path, direct: bool) -> fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(if direct { O_DIRECT } else { 0 })
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Reads up to `len` bytes at `offset` with one `pread(2)` after another until `len` or the
/// end of the file.
fn pread_all(f: &fs::File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match f.read_at(&mut buf[got..], offset + got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// Reads through the device file and a partition file at offsets and lengths that are not
/// sector-aligned, with `O_DIRECT` (the FUSE READ requests carry those very offsets and
/// lengths) and through the page cache, match the backing file byte for byte; a read
/// crossing the device's or the partition's end returns the bytes up to it, and one at
/// the end none. The reads are answered from the initiator's receive ring (aoe-fuse
/// `fs.rs` `answer_held`): its network thread counts held frames, none left held when it
/// stops (the copying path before held none: fails there).
#[test]
fn unaligned_reads_from_the_receive_ring_match_the_backing_file() {
    unaligned_reads_from_the_receive_ring(9000);
}

/// The same at MTU 1500, where a reply's 1 KiB pieces are gathered into one buffer before
/// the write (aoe-fuse `heldreply::write_reply_gathered`; at 9000 they go as iovecs).
#[test]
fn unaligned_reads_from_the_receive_ring_match_the_backing_file_mtu_1500() {
    unaligned_reads_from_the_receive_ring(1500);
}

fn unaligned_reads_from_the_receive_ring(mtu: u32) {
    let dir = tempfile::tempdir().unwrap();
    let (file, orig) = backing_with_partition(dir.path());
    let mut rig = Rig::on_file(mtu, file);
    let part = rig.partition(1);
    let dev_len = SECTORS * 512;
    let part_len = PART_SECTORS * 512;
    // (offset, length) in the file read; lengths past the end are cut there.
    let reads = |len: u64| -> Vec<(u64, usize)> {
        vec![
            (0, 1),
            (1, 511),
            (511, 2),
            (1000, 3000),
            (4095, 8193),
            (12345, 100_000),
            (513, (1 << 20) + 17),
            (len / 2 - 7, 300_001),
            (len - 700, 4096),
            (len - 1, 1),
            (len - (1 << 20) - 3, (1 << 20) + 1000),
            (len, 512),
            (len + 4096, 10),
        ]
    };
    for (path, base, len) in [
        (rig.dev(), 0u64, dev_len),
        (part.clone(), PART_START * 512, part_len),
    ] {
        for direct in [true, false] {
            for (off, n) in reads(len) {
                let f = open_read(&path, direct);
                let got = pread_all(&f, off, n).unwrap_or_else(|e| {
                    panic!(
                        "{} direct {direct}: read {n} at {off}: {e}{}",
                        path.display(),
                        rig.logs()
                    )
                });
                let end = (off + n as u64).min(len).max(off.min(len));
                let want = &orig[(base + off.min(len)) as usize..(base + end) as usize];
                assert!(
                    got == want,
                    "{} direct {direct}: read {n} at {off}: got {} bytes, want {}; first \
                     difference at {:?}{}",
                    path.display(),
                    got.len(),
                    want.len(),
                    got.iter().zip(want).position(|(a, b)| a != b),
                    rig.logs()
                );
            }
        }
    }
    let line = network_loop_line(&mut rig);
    // 1 MiB read at MTU 9000 is ~120 frames (1,024 at 1500); well over that many were held.
    assert!(
        log_field(&line, "held") >= 1000,
        "reads not from the ring: {line}"
    );
    assert_eq!(log_field(&line, "held_now"), 0, "{line}");
    assert_eq!(log_field(&line, "held_pending"), 0, "{line}");
}

/// Readers killed (SIGKILL) or interrupted (SIGINT) while their direct reads of the device
/// file are in flight: the initiator answers what is left of them (the kernel refuses the
/// answers of requests it gave up), keeps serving, a full read afterwards matches the
/// backing file, and when it stops no receive slot is still held and no held read is
/// waiting.
#[test]
fn readers_killed_mid_read_leave_nothing_held() {
    let mut rig = Rig::start(Target::AoeServe, 9000, InitOpts::default());
    let orig = fs::read(&rig.file).unwrap();
    let dev = rig.dev().display().to_string();
    let rchar = |pid: u32| -> u64 {
        fs::read_to_string(format!("/proc/{pid}/io"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("rchar: ").map(|v| v.trim().parse().ok()))
                    .flatten()
            })
            .unwrap_or(0)
    };
    for round in 0..8u32 {
        // Two readers at once, each through its own open, reading the whole device over
        // and over (dd's reads are 1 MiB: 4 FUSE requests in flight each).
        let mut readers: Vec<std::process::Child> = (0..2)
            .map(|i| {
                Command::new("dd")
                    .args([
                        format!("if={dev}"),
                        "of=/dev/null".into(),
                        "bs=1M".into(),
                        "iflag=direct".into(),
                        format!("skip={}", (round + i) % 8),
                    ])
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("dd (coreutils)")
            })
            .collect();
        for r in &readers {
            let pid = r.id();
            assert!(
                wait_until(Duration::from_secs(20), || rchar(pid) >= 4 << 20
                    || !Path::new(&format!("/proc/{pid}/io")).exists()),
                "round {round}: dd read nothing{}",
                rig.logs()
            );
        }
        let sig = if round % 2 == 0 { "KILL" } else { "INT" };
        for r in &readers {
            let _ = Command::new("kill")
                .args([format!("-{sig}"), r.id().to_string()])
                .status();
        }
        for r in &mut readers {
            r.wait().unwrap();
        }
    }
    let got = dd_read_back(&rig, &["bs=1M"]);
    assert!(
        got == orig,
        "the device read back differs from its backing file{}",
        rig.logs()
    );
    let line = network_loop_line(&mut rig);
    assert!(
        log_field(&line, "held") > 0,
        "reads not from the ring: {line}"
    );
    assert_eq!(log_field(&line, "held_now"), 0, "slots left held: {line}");
    assert_eq!(
        log_field(&line, "held_pending"),
        0,
        "held reads left waiting: {line}"
    );
}

// ------------------------------------------------------------------------------------------
// The link under the traffic (sixteenth audit)

/// Pieces of 64 KiB the re-creation test writes, piece `i` at `i * 65536`.
const RECREATE_PIECES: u64 = 32;
const RECREATE_PIECE: usize = 64 << 10;

/// Sixteenth audit (session 33): the veth pair deleted and created again under the same
/// names (new indices, new MACs: a container runtime re-making its link, a USB NIC plugged
/// back) while an `O_DIRECT` writer writes through the device file. Before, the initiator
/// dropped the interface at its next rescan and opened the new one as another: the device,
/// reached through the old one alone, went down at once ("no path left") and every write
/// failed with EIO (base: thousands of EIO within 5 s of the re-creation, `deadsecs` 60
/// notwithstanding), and `aoe serve`, its socket unbound for good, answered nothing on the
/// new link anyway. Now the initiator takes the new interface in the old one's place and
/// asks it for its targets, the target opens a socket on its new interface and announces
/// itself from the new MAC: the writes wait, then go on; none fails, and every one
/// acknowledged is in the backing file.
#[test]
fn writes_go_on_across_the_veth_pair_deleted_and_created_again() {
    writes_across_the_veth_pair_made_again(Duration::ZERO);
}

/// Sixteenth audit (session 33): as above, with the veth pair gone for 8 s, longer than the
/// initiator's rescan ([`aoe_initiator::net::RESCAN`], 5 s): the rescan that finds the
/// interface gone used to drop it, and the device reached through it alone went down at
/// once ("no path left"), failing every write with EIO though `deadsecs` was 60 (checked
/// with this session's first initiator fix alone, which covered only a re-creation between
/// two rescans: 154264 of 157467 writes EIO in `/tmp/a16/rig.py gone8`; base fails the
/// same way). Now a vanished interface that a device relies on alone is kept, as a link
/// that is down is, until an interface of its name is back or the device goes down after
/// `deadsecs`.
#[test]
fn writes_wait_for_the_veth_pair_gone_for_longer_than_a_rescan() {
    writes_across_the_veth_pair_made_again(Duration::from_secs(8));
}

/// The two tests above: the veth pair deleted and, `gap` later, made again under the
/// writes of [`writes_go_on_across`]; each side's log must say what it did.
fn writes_across_the_veth_pair_made_again(gap: Duration) {
    let what = format!("the veth pair deleted and, {gap:?} later, created again");
    let rig = writes_go_on_across(1500, &what, |rig| {
        rig.veth
            .recreate_after(gap)
            .expect("delete and create the veth pair again")
    });
    let log = rig.logs();
    let mut lines = vec![
        "interface deleted and created again: using the new one",
        "interface deleted and created again: serving the new one",
    ];
    if gap >= aoe_initiator::net::RESCAN {
        lines.push("interface is gone: the devices reached through it alone wait");
    }
    for said in lines {
        assert!(log.contains(said), "no {said:?} in the logs:\n{log}");
    }
    rig.finish();
}

/// Sixteenth audit (session 33): the MTU of the target's end alone lowered from 9000 to
/// 1500 under an `O_DIRECT` writer (an operator lowering the target host's MTU, or a switch
/// port's). The initiator's frames of 8 KiB no longer reach the target (a veth drops a
/// frame longer than the receiving end's MTU, as a NIC or switch does), and nothing told
/// the initiator: base stalled every write until `deadsecs` (60 s here: "1 writes failed
/// after the target's MTU lowered to 1500 (deadsecs 60) ... Input/output error", 62 s; by
/// hand with `deadsecs` 40 the device went down at 40 s). Now the
/// target announces itself after the change with its new Sector Count, and the initiator
/// resends what is in flight in frames that fit (`aoe_proto` `retransmit`).
#[test]
fn writes_go_on_when_the_targets_mtu_is_lowered_under_them() {
    let rig = writes_go_on_across(9000, "the target's MTU lowered to 1500", |rig| {
        rig.veth
            .set_end_mtu(aoe_testkit::End::A, 1500)
            .expect("lower the target's MTU")
    });
    // The writes went on (checked above); the target must have seen the change it announced.
    let log = rig.logs();
    assert!(
        log.contains("MTU changed"),
        "the target never saw its MTU change:\n{log}"
    );
    rig.finish();
}

/// An `O_DIRECT` writer of 64 KiB pieces through the device file of a rig at `mtu`
/// (`deadsecs` 60) while `event` happens to the link: no write may fail, 100 must be
/// answered after it within 45 s, and every acknowledged one must be in the backing file.
/// Returns the rig for the caller's own checks.
fn writes_go_on_across(mtu: u32, what: &str, event: impl FnOnce(&mut Rig)) -> Rig {
    let mut rig = Rig::start(
        Target::AoeServe,
        mtu,
        InitOpts {
            deadsecs: Some(60),
            ..InitOpts::default()
        },
    );
    let writer = PieceWriter::start(&rig.dev());
    assert!(
        wait_until(Duration::from_secs(20), || writer.answered() >= 50),
        "the writer did not get going: {}",
        rig.logs()
    );
    let before = writer.answered();
    event(&mut rig);
    // The exact condition asserted: 100 writes answered after the event, or a failure.
    let went_on = wait_until(Duration::from_secs(45), || {
        writer.answered() >= before + 100 || writer.failed() > 0
    });
    let answered = writer.answered();
    let (acked, failures) = writer.stop();
    assert!(
        went_on,
        "writes did not go on within 45 s after {what} ({} answered before, {} in all):\n{}",
        before,
        answered,
        rig.logs()
    );
    assert!(
        failures.is_empty(),
        "{} writes failed after {what} (deadsecs 60), first {:?}:\n{}",
        failures.len(),
        &failures[..failures.len().min(3)],
        rig.logs()
    );
    assert_pieces_in_file(&rig.file, &acked);
    rig
}

/// An `O_DIRECT` writer of 64 KiB pieces through a device file, each write a new
/// generation's pattern at one of [`RECREATE_PIECES`] places, until [`PieceWriter::stop`]:
/// the link-event tests' load. A failed write's piece is not checked (its bytes are
/// undefined); every acknowledged one must be in the backing file
/// ([`assert_pieces_in_file`]).
struct PieceWriter {
    stop: Arc<AtomicBool>,
    /// When each write was answered, in order.
    acks: Arc<std::sync::Mutex<Vec<Instant>>>,
    failed: Arc<AtomicUsize>,
    /// The last generation acknowledged at each piece, and the failures said.
    thread: std::thread::JoinHandle<(std::collections::BTreeMap<u64, u64>, Vec<String>)>,
}

impl PieceWriter {
    fn start(dev: &Path) -> PieceWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
        let failed = Arc::new(AtomicUsize::new(0));
        let f = open_direct(dev);
        let (s, a, fl) = (stop.clone(), acks.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let mut acked = std::collections::BTreeMap::new();
            let mut failures = Vec::new();
            let mut g = 1000u64;
            while !s.load(Ordering::Relaxed) {
                g += 1;
                let i = g % RECREATE_PIECES;
                let off = i * RECREATE_PIECE as u64;
                match f.write_all_at(&pattern(g, RECREATE_PIECE), off) {
                    Ok(()) => {
                        acked.insert(i, g);
                        a.lock().unwrap().push(Instant::now());
                    }
                    Err(e) => {
                        // A failed write's bytes are undefined: the piece is not checked.
                        acked.remove(&i);
                        failures.push(format!("piece {i} generation {g}: {e}"));
                        fl.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            (acked, failures)
        });
        PieceWriter {
            stop,
            acks,
            failed,
            thread,
        }
    }

    /// Writes answered so far.
    fn answered(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    /// When the first write answered after `t` was answered.
    fn answered_after(&self, t: Instant) -> Option<Instant> {
        self.acks.lock().unwrap().iter().find(|&&a| a > t).copied()
    }

    /// Writes failed so far.
    fn failed(&self) -> usize {
        self.failed.load(Ordering::Relaxed)
    }

    /// Stops the writer; the last generation acknowledged at each piece, and the failures.
    fn stop(self) -> (std::collections::BTreeMap<u64, u64>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("writer thread")
    }
}

/// Every piece's last acknowledged generation ([`PieceWriter`]) is in `file`.
fn assert_pieces_in_file(file: &Path, acked: &std::collections::BTreeMap<u64, u64>) {
    let file = fs::read(file).expect("read the backing file");
    for (&i, &g) in acked {
        let at = i as usize * RECREATE_PIECE;
        assert!(
            file[at..at + RECREATE_PIECE] == pattern(g, RECREATE_PIECE)[..],
            "piece {i}: the acknowledged write of generation {g} is not in the backing file"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Link events (seventeenth audit, session 34)

/// Seventeenth audit (session 34): the veth pair deleted and created again, three times,
/// under an `O_DIRECT` writer. Before, the initiator found the new interface only at its
/// next rescan (every [`aoe_initiator::net::RESCAN`], 5 s) and the target at its next
/// look (every second), so the writes waited up to 5 s more than the link's own gap
/// (measured by this test on base: 2.5-10 s from the new pair to the first write answered,
/// docs/TEST-AUDIT.md; 0.14-0.88 s now). Now both listen to rtnetlink's link group and
/// take the new interface at its link event. Asserted: the target's lines for the
/// re-created interface say it was found by a link event in at least 2 of the 3 rounds,
/// the initiator's in at least 1 (see below; base: 0 of 3 each), no write fails, and every
/// acknowledged write is in the backing file. The time from each new pair to the first
/// write answered after it is printed, a measurement, not asserted.
#[test]
fn a_veth_pair_made_again_is_taken_at_its_link_event_not_the_next_rescan() {
    let (rig, gaps) = writes_across_link_events(
        Target::AoeServe,
        "the veth pair deleted and created again",
        3,
        |rig| rig.veth.recreate().expect("make the veth pair again"),
    );
    eprintln!("from the pair made again to the first write answered: {gaps:?}");
    let log = rig.logs();
    // The initiator takes the interface at the event that says it runs, which a veth's
    // carrier sends up to a second after the pair is made (the kernel's linkwatch delay):
    // a rescan may fall in that second, once in five rounds at most, so one round of three
    // is asked of it. The target takes it at its creation's event.
    for (side, said, least) in [
        (
            "initiator",
            "interface deleted and created again: using the new one",
            1,
        ),
        (
            "target",
            "interface deleted and created again: serving the new one",
            2,
        ),
    ] {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(said)).collect();
        let by_event = lines.iter().filter(|l| l.contains("link event")).count();
        assert!(
            by_event >= least,
            "the {side} took the re-created interface by a link event in {by_event} of {} \
             rounds (3 made): {lines:#?}\n{log}",
            lines.len()
        );
    }
    rig.finish();
}

/// Seventeenth audit (session 34): the target's end of the veth moved to another network
/// namespace and back (`ip link set DEV netns OTHER`, 1 s away), then the initiator's end,
/// under an `O_DIRECT` writer. Moving an interface out unregisters it in its namespace, so
/// the kernel unbinds the packet sockets on it for good (`packet_notifier`,
/// `NETDEV_UNREGISTER`), but it comes back with the same name and, the index being free,
/// the same index: both daemons looked at the index alone, saw nothing changed, and kept
/// the dead socket. Base: the target never answered again and the device went down at
/// `deadsecs` ("1 writes failed across an end of the veth pair moved to another namespace
/// and back (deadsecs 60) ... Input/output error", 62 s; by hand with `deadsecs` 30: one
/// write EIO at 30 s, nothing acknowledged lost; the same with the initiator's end alone). Now the `RTM_DELLINK` of the interface marks the socket unbound and
/// the interface of that name is opened again when it is back. No write may fail, and
/// every acknowledged write must be in the backing file.
#[test]
fn writes_go_on_across_each_end_moved_to_another_namespace_and_back() {
    let away = aoe_testkit::Netns::new("aoeiw").expect("a third namespace");
    let mut round = 0;
    let (rig, gaps) = writes_across_link_events(
        Target::AoeServe,
        "an end of the veth pair moved to another namespace and back",
        2,
        |rig| {
            let (ns, dev) = if round == 0 {
                (&rig.target_ns, rig.veth.a_name().to_owned())
            } else {
                (&rig.init_ns, rig.veth.b_name().to_owned())
            };
            round += 1;
            ns.ip(&["link", "set", "dev", &dev, "netns", away.name()])
                .expect("move the end away");
            std::thread::sleep(Duration::from_secs(1));
            away.ip(&["link", "set", "dev", &dev, "netns", ns.name()])
                .expect("move the end back");
            ns.ip(&["link", "set", "dev", &dev, "up"])
                .expect("set the end up");
        },
    );
    eprintln!("from the end moved back to the first write answered: {gaps:?}");
    rig.finish();
}

/// Session 36 (probe of session 35's `Engine::link_back` on real daemons): the initiator's
/// end of the veth set down for 3 s and up again, six times, under an `O_DIRECT` writer.
/// No write may fail and every acknowledged one must be in the backing file; the time from
/// the `ip link set up` to the first write answered after it is printed (session 35 saw
/// 0.01 s mostly, 0.75 s at times and once 4.8 s), a measurement, not asserted.
#[test]
fn writes_go_on_across_the_initiators_link_set_down_and_up() {
    let (rig, gaps) = writes_across_link_events(
        Target::AoeServe,
        "the initiator's end of the veth set down for 3 s and up",
        6,
        |rig| {
            let dev = rig.veth.b_name().to_owned();
            rig.init_ns
                .ip(&["link", "set", "dev", &dev, "down"])
                .expect("set the end down");
            std::thread::sleep(Duration::from_secs(3));
            rig.init_ns
                .ip(&["link", "set", "dev", &dev, "up"])
                .expect("set the end up");
        },
    );
    eprintln!("from the link set up to the first write answered: {gaps:?}");
    // A probe: a slow round is not a failure, but its logs say what waited.
    if gaps.iter().any(|g| *g >= Duration::from_millis(500)) {
        eprintln!(
            "a round took 0.5 s or more; the daemons' logs:\n{}",
            rig.logs()
        );
    }
    rig.finish();
}

/// An `O_DIRECT` writer of 64 KiB pieces through the device file of a rig at MTU 1500
/// (`deadsecs` 60) while `event` happens `rounds` times, 2 s apart: after each, a write
/// must be answered within 45 s; no write may fail, and every acknowledged one must be
/// in the backing file. Returns the rig and, for each round, the time from the end of
/// `event` to the first write answered after it.
fn writes_across_link_events(
    kind: Target,
    what: &str,
    rounds: usize,
    mut event: impl FnMut(&mut Rig),
) -> (Rig, Vec<Duration>) {
    let mut rig = Rig::start(
        kind,
        1500,
        InitOpts {
            deadsecs: Some(60),
            ..InitOpts::default()
        },
    );
    let writer = PieceWriter::start(&rig.dev());
    let mut gaps = Vec::new();
    let mut stalled = None;
    for round in 0..rounds {
        let going = wait_until(Duration::from_secs(20), || {
            writer.answered() >= 50 * (round + 1)
        });
        if !going || writer.failed() > 0 {
            stalled = Some(format!("before round {round}"));
            break;
        }
        event(&mut rig);
        let t = Instant::now();
        // The exact condition measured: a write answered after the event, or a failure.
        let went_on = wait_until(Duration::from_secs(45), || {
            writer.answered_after(t).is_some() || writer.failed() > 0
        });
        match writer.answered_after(t) {
            Some(a) if went_on => gaps.push(a - t),
            _ => {
                stalled = Some(format!("after round {round}"));
                break;
            }
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let (acked, failures) = writer.stop();
    assert!(
        failures.is_empty(),
        "{} writes failed across {what} (deadsecs 60), first {:?}:\n{}",
        failures.len(),
        &failures[..failures.len().min(3)],
        rig.logs()
    );
    assert!(
        stalled.is_none(),
        "writes did not go on {} {what} within 45 s (gaps so far {gaps:?}):\n{}",
        stalled.unwrap_or_default(),
        rig.logs()
    );
    assert_pieces_in_file(&rig.file, &acked);
    (rig, gaps)
}
