//! Integration: fio, a load generator and verifier this project did not write, against
//! `aoe serve` exports through `aoe initiator`.
//!
//! Our own integrity tests write our own stamped pattern and read it back with our own
//! checker; fio has its own (a header per block with a CRC32C or MD5 of the block, its
//! offset and a sequence number, checked as it goes with `verify_backlog` and again at
//! the end), its own engines (psync, libaio, io_uring on the device file, its libnbd
//! engine on the NBD export) and its own idea of what a failed write looks like. Every
//! run has `verify_fatal=1`; each test checks fio's exit status and its JSON output (the
//! per-job error and the bytes written and read back).
//!
//! Each test makes the project's rig (tests/common: two namespaces, a veth link, `aoe
//! serve` in one, `aoe initiator` with ROOT mounted in the other); fio runs on the host
//! side, on ROOT's device file or on the initiator's NBD socket (the mount and the Unix
//! socket are in the shared mount namespace). These tests need root and fio
//! (`scripts/install-deps.sh` installs it); a missing tool is a failure, never a skip.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use aoe_testkit::{wait_until, NsChild, TxBytes};
use common::*;

/// The partition on the device (MBR entry 1): start and length in sectors.
const PART: (u64, u64) = (2048, 16384);

fn require_fio() {
    require_tools();
    aoe_testkit::require_tools(&[("fio", "fio")]);
}

/// What one fio run left: exit status, its JSON report, stderr.
struct FioRun {
    ok: bool,
    code: Option<i32>,
    json: serde_json::Value,
    stderr: String,
}

impl FioRun {
    fn jobs(&self) -> &[serde_json::Value] {
        self.json["jobs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Sum of `dir` ("read" or "write") io_bytes over every job.
    fn bytes(&self, dir: &str) -> u64 {
        self.jobs()
            .iter()
            .map(|j| j[dir]["io_bytes"].as_u64().unwrap_or(0))
            .sum()
    }

    /// The first non-zero per-job error (an errno), 0 if none.
    fn error(&self) -> i64 {
        self.jobs()
            .iter()
            .map(|j| j["error"].as_i64().unwrap_or(0))
            .find(|&e| e != 0)
            .unwrap_or(0)
    }

    fn describe(&self) -> String {
        let jobs: Vec<String> = self
            .jobs()
            .iter()
            .map(|j| {
                format!(
                    "{} error {} write {} read {}",
                    j["jobname"], j["error"], j["write"]["io_bytes"], j["read"]["io_bytes"]
                )
            })
            .collect();
        format!(
            "exit {:?}; jobs: {jobs:?}\nstderr:\n{}",
            self.code, self.stderr
        )
    }

    /// Exit status 0, no job error, and every job read back at least what it wrote (jobs
    /// that overwrite read back only the last write of each block: `overwrites`).
    fn assert_clean(&self, what: &str, logs: &str) {
        self.assert_clean_as(what, logs, false)
    }

    fn assert_clean_as(&self, what: &str, logs: &str, overwrites: bool) {
        assert!(
            self.ok && self.error() == 0 && !self.jobs().is_empty(),
            "fio {what}: {}{logs}",
            self.describe()
        );
        for j in self.jobs() {
            let w = j["write"]["io_bytes"].as_u64().unwrap_or(0);
            let r = j["read"]["io_bytes"].as_u64().unwrap_or(0);
            assert!(
                w > 0 && r > 0 && (overwrites || r >= w),
                "fio {what}: job {} wrote {w} and read back {r} (verify reads every block written)",
                j["jobname"]
            );
        }
    }
}

/// The fio command for `jobfile` (and `extra` options after it), run in `dir` (where fio
/// keeps its verify state files), JSON to `dir/NAME.json`, under `timeout`.
fn fio_command(dir: &Path, name: &str, jobfile: &str, extra: &[&str], secs: u32) -> Command {
    let job = dir.join(format!("{name}.fio"));
    fs::write(&job, jobfile).expect("write job file");
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", &secs.to_string(), "fio"])
        .arg("--output-format=json")
        .arg(format!(
            "--output={}",
            dir.join(format!("{name}.json")).display()
        ))
        .args(extra)
        .arg(&job)
        .current_dir(dir);
    cmd
}

/// Reads what a finished fio command left (status from `status`).
fn fio_result(dir: &Path, name: &str, code: Option<i32>, stderr: String) -> FioRun {
    let text = fs::read_to_string(dir.join(format!("{name}.json"))).unwrap_or_default();
    // fio prints notes ("fio: ...") before the JSON object in the same file on some errors.
    let json = text
        .find('{')
        .and_then(|i| serde_json::from_str(&text[i..]).ok())
        .unwrap_or(serde_json::Value::Null);
    FioRun {
        ok: code == Some(0),
        code,
        json,
        stderr,
    }
}

/// Runs fio on `jobfile` to completion.
fn fio(dir: &Path, name: &str, jobfile: &str, extra: &[&str], secs: u32) -> FioRun {
    let out = run(&mut fio_command(dir, name, jobfile, extra, secs));
    fio_result(
        dir,
        name,
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The [global] section every verifying job shares: O_DIRECT, CRC32C headers checked as
/// they go (every 64 blocks) and at the end, the first mismatch fatal.
fn verify_global(filename: &str, engine: &str, iodepth: u32, verify: &str) -> String {
    format!(
        "[global]\n\
         filename={filename}\n\
         ioengine={engine}\n\
         iodepth={iodepth}\n\
         direct=1\n\
         verify={verify}\n\
         do_verify=1\n\
         verify_backlog=64\n\
         verify_fatal=1\n\
         verify_state_save=0\n\
         group_reporting=0\n"
    )
}

/// Random then sequential writes of 512 B to 1 MiB blocks, four jobs on disjoint quarters
/// of [`base`, `base + 4 * span`) (offset_increment), each verified.
fn mixed_jobs(base: u64, span: u64) -> String {
    format!(
        "bssplit=512/10:4k/30:16k/20:64k/20:256k/10:1m/10\n\
         numjobs=4\n\
         size={span}\n\
         offset_increment={span}\n\
         [rand]\n\
         rw=randwrite\n\
         offset={base}\n\
         [seq]\n\
         stonewall\n\
         rw=write\n\
         offset={base}\n"
    )
}

/// What the device file `dev` reads is what the target's file holds, sector for sector.
fn assert_device_file_is_backing_file(rig: &Rig, dev: &Path) {
    let got = fs::read(&rig.file).unwrap();
    let through = read_at(dev, 0, got.len() / 512 * 512).unwrap();
    assert!(
        wrong_sectors(&through, &got[..through.len()]).is_empty(),
        "device file and backing file differ"
    );
}

/// A backing file of SECTORS holding `pattern(1, ..)` with an MBR whose partition 1 is
/// [`PART`].
fn backing_with_partition(dir: &Path) -> PathBuf {
    let mut b = pattern(1, (SECTORS * 512) as usize);
    write_mbr_partition1(&mut b, PART.0 as u32, PART.1 as u32);
    let f = dir.join("parted.img");
    fs::write(&f, &b).unwrap();
    f
}

// ------------------------------------------------------------------------------------------
// The device file

/// psync, libaio and io_uring at iodepth 1 and 32 on the device file: mixed block sizes,
/// random and sequential, four jobs at once on disjoint ranges, every block verified.
#[test]
fn fio_device_file_engines_verify() {
    engines_verify(InitOpts::default());
}

/// [`fio_device_file_engines_verify`] with `--fuse-uring`: every request through FUSE over
/// io_uring (enable_uring set to Y for the test).
#[test]
fn fio_device_file_engines_verify_fuse_uring() {
    let (_u, opts) = InitOpts::fuse_uring();
    engines_verify(opts);
}

/// The rig's initiator said it serves the files through the ring.
fn assert_on_the_ring(rig: &Rig) {
    let log = rig.initiator_log();
    assert!(
        log.contains("FUSE requests through io_uring"),
        "the initiator does not use FUSE over io_uring: {log}"
    );
}

fn engines_verify(opts: InitOpts) {
    require_fio();
    let rig = Rig::start(Target::AoeServe, 9000, opts);
    if opts.fuse_uring {
        assert_on_the_ring(&rig);
    }
    let dev = rig.dev();
    let dir = rig.dir.path().to_owned();
    for (n, (engine, depth)) in [
        ("psync", 1),
        ("libaio", 1),
        ("libaio", 32),
        ("io_uring", 1),
        ("io_uring", 32),
    ]
    .into_iter()
    .enumerate()
    {
        // Each run on its own 8 MiB of the 32 MiB device (the fifth over the first's).
        let base = (n as u64 % 4) * (8 << 20);
        let job = verify_global(&dev.to_string_lossy(), engine, depth, "crc32c")
            + &mixed_jobs(base, 2 << 20);
        let name = format!("{engine}-{depth}");
        let r = fio(&dir, &name, &job, &[], 300);
        r.assert_clean(&name, &rig.logs());
        assert_eq!(
            r.bytes("write"),
            2 * 4 * (2 << 20),
            "{name}: every job writes its whole range: {}",
            r.describe()
        );
    }
    // What the device file reads is what the target's file holds.
    assert_device_file_is_backing_file(&rig, &dev);
    rig.finish();
}

/// Random 4 KiB `O_DIRECT` writes at depth 32 from four jobs at once (libaio and io_uring),
/// which the device file's direct I/O mode hands to the initiator in parallel (aoe-fuse
/// `AoeFs::open`, `FOPEN_PARALLEL_DIRECT_WRITES`), every block verified; then the same
/// beside a buffered reader of the same file (a cached open, with which the kernel
/// takes the writes one at a time again and the initiator drops the pages they overwrite
/// from the page cache), whose reads must not fail; the device file reads back what the
/// target's file holds.
#[test]
fn fio_parallel_direct_writes_verify() {
    parallel_direct_writes_verify(InitOpts::default());
}

/// [`fio_parallel_direct_writes_verify`] with `--fuse-uring`: the writes' payloads go to
/// the engine lent, the buffered reader's cached open beside them.
#[test]
fn fio_parallel_direct_writes_verify_fuse_uring() {
    let (_u, opts) = InitOpts::fuse_uring();
    parallel_direct_writes_verify(opts);
}

fn parallel_direct_writes_verify(opts: InitOpts) {
    require_fio();
    let rig = Rig::start(Target::AoeServe, 9000, opts);
    if opts.fuse_uring {
        assert_on_the_ring(&rig);
    }
    let dev = rig.dev();
    let d = dev.to_string_lossy();
    let dir = rig.dir.path().to_owned();
    for (n, engine) in ["libaio", "io_uring"].into_iter().enumerate() {
        let base = n as u64 * (8 << 20);
        let writers = format!(
            "bs=4k\n\
             numjobs=4\n\
             size=2m\n\
             offset={base}\n\
             offset_increment=2m\n\
             serialize_overlap=1\n\
             [pdw]\n\
             rw=randwrite\n"
        );
        let job = verify_global(&d, engine, 32, "crc32c") + &writers;
        let name = format!("pdw-{engine}");
        let r = fio(&dir, &name, &job, &[], 300);
        r.assert_clean(&name, &rig.logs());
        assert_eq!(r.bytes("write"), 4 * (2 << 20), "{name}: {}", r.describe());
        // Again, with a buffered reader of the same range running beside the writers.
        let reader = format!(
            "[reader]\n\
             filename={d}\n\
             ioengine=psync\n\
             direct=0\n\
             rw=randread\n\
             bs=64k\n\
             numjobs=1\n\
             offset={base}\n\
             size=8m\n\
             time_based=1\n\
             runtime=3\n\
             do_verify=0\n\
             verify=0\n"
        );
        let name = format!("pdw-{engine}-reader");
        let r = fio(&dir, &name, &(job.clone() + &reader), &[], 300);
        assert!(
            r.ok && r.error() == 0,
            "fio {name}: {}{}",
            r.describe(),
            rig.logs()
        );
        for j in r.jobs().iter().filter(|j| j["jobname"] == "pdw") {
            let w = j["write"]["io_bytes"].as_u64().unwrap_or(0);
            let rd = j["read"]["io_bytes"].as_u64().unwrap_or(0);
            assert!(
                w > 0 && rd >= w,
                "fio {name}: a writer wrote {w}, verified {rd}"
            );
        }
    }
    assert_device_file_is_backing_file(&rig, &dev);
    rig.finish();
}

/// Most bytes the target may send between a small read's request and its reply while
/// another open of the device file keeps its backlog queued: half that backlog, the mount's
/// 64 background requests of 256 KiB (16 MiB), which a small read waited for with one queue
/// lane for every open (15-17 MiB at MTU 1500). Served in turn it waits for a quantum of
/// the other's (256 KiB) and its frames in flight (0.1-1.1 MiB measured); the rest of the
/// margin is for the time the read takes through FUSE on a loaded machine while the target
/// streams the backup's data (one run: 3 MiB).
const SMALL_READ_WAIT_MAX: u64 = 8 << 20;

/// Small reads [`small_read_beside_a_backlog`] makes.
const SMALL_READS: u64 = 16;

/// Session 26 (docs/TEST-AUDIT.md "Session 26: fairness between the openers of a device
/// file"): a backup reading the device file with fio (libaio, `O_DIRECT`, 1 MiB blocks at
/// depth 64: the kernel keeps the mount's `max_background`, 64 requests of 256 KiB, with the
/// initiator) must not hold up another process's 4 KiB reads (a database's: an
/// `O_RDWR | O_DIRECT` open, where a read is one synchronous request) for its whole
/// backlog. Counted, not timed: the bytes the target's veth sent between each small read's
/// request and its reply, each read made once the backup has been served another MiB. With
/// every open of the mount one source, one lane of the device's queue (before), most waited
/// for the backup's whole backlog ("served 16994 KiB"); each open a source of its own,
/// served in turn, a read waits for at most a quantum of the backup's.
#[test]
fn fio_small_read_is_not_queued_behind_another_openers_backlog() {
    small_read_beside_a_backlog(InitOpts::default());
}

/// [`fio_small_read_is_not_queued_behind_another_openers_backlog`] with `--fuse-uring`
/// (before the ring had more entries a CPU than the kernel's background requests, a small
/// read submitted on the backup's CPU also waited in the kernel behind those of the
/// backup's that had no entry: 8 MiB).
#[test]
fn fio_small_read_is_not_queued_behind_another_openers_backlog_fuse_uring() {
    let (_u, opts) = InitOpts::fuse_uring();
    small_read_beside_a_backlog(opts);
}

fn small_read_beside_a_backlog(opts: InitOpts) {
    require_fio();
    let rig = Rig::start(Target::AoeServe, 1500, opts);
    if opts.fuse_uring {
        assert_on_the_ring(&rig);
    }
    let dev = rig.dev();
    let dir = rig.dir.path().to_owned();
    let job = format!(
        "[backup]\n\
         filename={}\n\
         rw=read\n\
         bs=1M\n\
         ioengine=libaio\n\
         iodepth=64\n\
         direct=1\n\
         time_based=1\n\
         runtime=120\n",
        dev.display()
    );
    let mut backup =
        NsChild::spawn_command(fio_command(&dir, "backup", &job, &["--readonly"], 150))
            .expect("start fio");
    let mut tx = TxBytes::new(&rig.target_ns, &rig.target_if);
    // O_DIRECT (0o40000 on Linux x86-64 and arm64) with write access: the device file in the
    // kernel's direct I/O mode, where a read is one synchronous request.
    let db = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(0o40000)
        .open(&dev)
        .expect("open the device file");
    let backing = fs::read(&rig.file).expect("read the backing file");
    let mut buf = vec![0u8; 4096];
    let mut waits = Vec::new();
    let mut last = tx.get();
    for k in 0..SMALL_READS {
        // The backup streaming: another MiB of its reads served since the last small read.
        let streaming = wait_until(Duration::from_secs(30), || {
            tx.get() - last > 1 << 20 || !backup.is_running()
        });
        assert!(
            streaming && backup.is_running(),
            "the backup's reads not served: {}{}",
            backup.output_so_far(),
            rig.logs()
        );
        let offset = (3 + k) << 20;
        let before = tx.get();
        db.read_exact_at(&mut buf, offset).expect("the small read");
        last = tx.get();
        waits.push(last - before);
        assert!(
            buf[..] == backing[offset as usize..offset as usize + 4096],
            "the small read at {offset} returned wrong data"
        );
    }
    let _ = backup.stop();
    drop(db);
    eprintln!("bytes the target sent while each small read waited: {waits:?}");
    let worst = waits.iter().copied().max().unwrap_or(0);
    assert!(
        worst < SMALL_READ_WAIT_MAX,
        "the target served {} KiB of the backup's backlog between a small read's request and \
         its reply (each: {waits:?} bytes){}",
        worst >> 10,
        rig.logs()
    );
    rig.finish();
}

/// fio on the partition file `e7.3p1`: writes land inside the partition and nowhere else.
#[test]
fn fio_partition_verify() {
    require_fio();
    let tmp = tempfile::tempdir().unwrap();
    let file = backing_with_partition(tmp.path());
    let before = fs::read(&file).unwrap();
    let rig = Rig::on_file(1500, file.clone());
    let part = rig.partition(1);
    let job = verify_global(&part.to_string_lossy(), "libaio", 32, "md5")
        + &mixed_jobs(0, PART.1 * 512 / 4);
    let r = fio(rig.dir.path(), "part", &job, &[], 300);
    r.assert_clean("on the partition", &rig.logs());
    let after = fs::read(&file).unwrap();
    let (lo, hi) = ((PART.0 * 512) as usize, ((PART.0 + PART.1) * 512) as usize);
    assert!(
        wrong_sectors(&after[..lo], &before[..lo]).is_empty()
            && wrong_sectors(&after[hi..], &before[hi..]).is_empty(),
        "fio on the partition changed sectors outside it: before {:?}, after {:?}",
        wrong_sectors(&after[..lo], &before[..lo]),
        wrong_sectors(&after[hi..], &before[hi..])
            .iter()
            .map(|s| s + hi / 512)
            .collect::<Vec<_>>()
    );
    assert_ne!(
        after[lo..hi],
        before[lo..hi],
        "nothing reached the partition"
    );
    drop(part);
    rig.finish();
}

// ------------------------------------------------------------------------------------------
// The NBD export, with fio's libnbd engine

#[test]
fn fio_nbd_engine_verify() {
    require_fio();
    let mut rig = Rig::start_with(Target::AoeServe, 9000, InitOpts::default(), None, &[]);
    // Again with --nbd: the rig's own initiator has none.
    let sock = rig.dir.path().join("nbd.sock");
    let mut old = rig.initiator.take().unwrap();
    assert!(old.stop().unwrap().success(), "{}", old.output_so_far());
    assert!(wait_until(Duration::from_secs(5), || !rig.root_mounted()));
    rig.launch_initiator(&["--nbd".into(), sock.to_string_lossy().into_owned()]);
    rig.wait_state("up", Duration::from_secs(10), "with --nbd");
    assert!(
        wait_until(Duration::from_secs(10), || sock.exists()),
        "no NBD socket{}",
        rig.logs()
    );
    let uri = format!("nbd+unix:///{DEV}?socket={}", sock.display());
    for depth in [32, 64] {
        let job = format!(
            "[global]\n\
             ioengine=nbd\n\
             uri={uri}\n\
             iodepth={depth}\n\
             verify=crc32c\n\
             do_verify=1\n\
             verify_backlog=64\n\
             verify_fatal=1\n\
             verify_state_save=0\n"
        ) + &mixed_jobs((depth as u64 / 32 - 1) * (16 << 20), 4 << 20);
        let name = format!("nbd-{depth}");
        let r = fio(rig.dir.path(), &name, &job, &[], 300);
        r.assert_clean(&name, &rig.logs());
    }
    rig.finish();
}

// ------------------------------------------------------------------------------------------
// Exports of other kinds

/// A loop device detached on drop (declare it before the rig that serves it).
struct LoopDev(String);

impl LoopDev {
    fn new(file: &Path, sector: u32) -> LoopDev {
        let out = run_ok(
            Command::new("losetup")
                .args(["--find", "--show", "--sector-size", &sector.to_string()])
                .arg(file),
        );
        LoopDev(out.trim().to_owned())
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = run(Command::new("losetup").args(["-d", &self.0]));
    }
}

/// `aoe serve -d` (O_DIRECT) on a loop device with 512-byte and with 4096-byte logical
/// sectors; fio's 512-byte blocks then need the target to read-modify-write.
#[test]
fn fio_direct_export_on_loop_device() {
    require_fio();
    for sector in [512u32, 4096] {
        let img_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let img = img_dir.path().join("loop.img");
        fs::write(&img, pattern(3, 32 << 20)).unwrap();
        let lo = LoopDev::new(&img, sector);
        let rig = Rig::start_with(
            Target::AoeServe,
            9000,
            InitOpts::default(),
            Some(PathBuf::from(&lo.0)),
            &["-d"],
        );
        let job = verify_global(&rig.dev().to_string_lossy(), "io_uring", 32, "crc32c")
            + &mixed_jobs(0, 4 << 20);
        let name = format!("direct-{sector}");
        let r = fio(rig.dir.path(), &name, &job, &[], 300);
        r.assert_clean(&name, &rig.logs());
        rig.finish();
        drop(lo);
    }
}

/// `aoe serve -r`: fio's writes fail, fio says so (non-zero exit, the job's error set), the
/// backing file is unchanged, and reads still work.
#[test]
fn fio_read_only_export_refuses_writes() {
    require_fio();
    let rig = Rig::start_with(Target::AoeServe, 1500, InitOpts::default(), None, &["-r"]);
    let before = sha256(&rig.file);
    let dev = rig.dev().to_string_lossy().into_owned();
    for engine in ["psync", "libaio", "io_uring"] {
        let job = verify_global(&dev, engine, 8, "crc32c") + "bs=4k\nsize=1m\n[w]\nrw=randwrite\n";
        let name = format!("ro-{engine}");
        let r = fio(rig.dir.path(), &name, &job, &[], 120);
        assert!(
            !r.ok && r.error() != 0,
            "{name}: fio's writes to a read-only export must fail: {}{}",
            r.describe(),
            rig.logs()
        );
        eprintln!("{name}: fio's job error {}", r.error());
    }
    let job = format!(
        "[r]\nfilename={dev}\nioengine=libaio\niodepth=16\ndirect=1\nbs=64k\nsize=8m\nrw=randread\n"
    );
    let r = fio(rig.dir.path(), "ro-read", &job, &[], 120);
    assert!(
        r.ok && r.error() == 0 && r.bytes("read") == 8 << 20,
        "reads of a read-only export: {}",
        r.describe()
    );
    assert_eq!(
        sha256(&rig.file),
        before,
        "the read-only backing file changed"
    );
    rig.finish();
}

/// A tmpfs mounted on a temporary directory, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let d = tempfile::tempdir().unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(d.path()),
        );
        Tmpfs(d)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run(Command::new("umount").arg(self.0.path()));
    }
}

/// A sparse 32 MiB file on an 8 MiB tmpfs: once the file system is full, fio's writes must
/// fail (an error fio reports), not succeed silently; what fio wrote before then reads back.
#[test]
fn fio_full_disk_fails_writes() {
    require_fio();
    let fs_ = Tmpfs::new("8m");
    let file = fs_.0.path().join("sparse.img");
    File::create(&file)
        .and_then(|f| f.set_len(SECTORS * 512))
        .unwrap();
    let rig = Rig::start_with(
        Target::AoeServe,
        1500,
        InitOpts::default(),
        Some(file.clone()),
        &[],
    );
    let dev = rig.dev().to_string_lossy().into_owned();
    for (engine, name) in [("psync", "full-psync"), ("libaio", "full-libaio")] {
        let job = format!(
            "[w]\nfilename={dev}\nioengine={engine}\niodepth=16\ndirect=1\nbs=64k\nsize=32m\nrw=write\n"
        );
        let r = fio(rig.dir.path(), name, &job, &[], 120);
        // Some writes land before the file system fills (so the failure is the full disk,
        // not the path), none after.
        assert!(
            !r.ok && r.error() != 0 && r.bytes("write") < 9 << 20 && r.bytes("write") > 1 << 20,
            "{name}: writes past a full file system must fail: {}{}",
            r.describe(),
            rig.logs()
        );
        eprintln!(
            "{name}: fio's job error {} after {} bytes",
            r.error(),
            r.bytes("write")
        );
    }
    rig.finish();
}

// ------------------------------------------------------------------------------------------
// A lossy link: the project's relay drops, duplicates and reorders frames

/// fio's verified mixed jobs, and then many overwrites of the same blocks (norandommap,
/// never two writes to one block in flight at once: serialize_overlap), through a relay
/// that loses 2 %, duplicates 2 % and reorders 5 % of the frames each way. A duplicate or
/// retransmitted copy of an older write landing after a newer one shows as a stale block.
#[test]
fn fio_lossy_link_verify() {
    use aoe_testkit::relay::Faults;
    require_fio();
    let r = RelayRig::start(
        Target::AoeServe,
        1500,
        InitOpts::default(),
        None,
        &[],
        1,
        31,
    );
    let ctl = r.control(0);
    ctl.set_faults(Faults::lossy(0.02, 0.02, 0.05));
    let dev = r.rig.dev().to_string_lossy().into_owned();
    let dir = r.rig.dir.path().to_owned();
    let job = verify_global(&dev, "libaio", 32, "crc32c") + &mixed_jobs(0, 1 << 20);
    let run = fio(&dir, "lossy-mixed", &job, &[], 600);
    run.assert_clean("mixed through a lossy link", &r.rig.logs());
    let job = verify_global(&dev, "io_uring", 32, "md5")
        + "bs=4k\n\
           norandommap=1\n\
           serialize_overlap=1\n\
           offset=8m\n\
           size=256k\n\
           io_size=8m\n\
           [overwrite]\n\
           rw=randwrite\n";
    let run = fio(&dir, "lossy-overwrite", &job, &[], 600);
    run.assert_clean_as("overwrites through a lossy link", &r.rig.logs(), true);
    // io_size counts the backlog's verify reads too.
    assert!(run.bytes("write") >= 6 << 20, "{}", run.describe());
    let c = ctl.counters();
    assert!(
        c.lost > 0 && c.duplicated > 0 && c.reordered > 0,
        "the relay did not disturb anything: {c}"
    );
    r.finish();
}

// ------------------------------------------------------------------------------------------
// Crashes: fio's verify state says which writes completed; after the crash and a restart
// every one of them must read back intact.

/// The random-write job the crash tests run and then verify (same options both times, so
/// fio's `--verify_only` replays the same offsets and sequence numbers). Every 4 KiB block
/// of the 24 MiB is written at most once (fio's random map).
const CRASH_DEPTH: usize = 32;

fn crash_job(dev: &str, crashed_run: bool) -> String {
    let job = format!(
        "[crash]\n\
         filename={dev}\n\
         ioengine=libaio\n\
         iodepth={CRASH_DEPTH}\n\
         direct=1\n\
         rw=randwrite\n\
         bs=4k\n\
         size=24m\n\
         verify=crc32c\n\
         verify_state_save=1\n\
         randrepeat=1\n"
    );
    if crashed_run {
        // Completed writes with their offsets, one line each (fio 3.33 aborts on this log
        // in --verify_only, so only the run that crashes keeps it).
        job + "verify_fatal=1\nwrite_lat_log=crash\nlog_offset=1\n"
    } else {
        // Every bad block reported, not only the first.
        job + "verify_fatal=0\n"
    }
}

/// Offsets of the writes the crashed run saw complete: its completion-latency log
/// (`crash_clat.1.log`: time, latency, direction, size, offset) has a line for each.
fn completed_writes(dir: &Path) -> std::collections::HashSet<u64> {
    let log = fs::read_to_string(dir.join("crash_clat.1.log")).expect("fio's completion log");
    log.lines()
        .filter_map(|l| l.split(',').nth(4)?.trim().parse().ok())
        .collect()
}

/// After the crash and the restart: fio's `--verify_only --verify_state_load=1` replays the
/// crashed run's writes up to the last one it issued and checks each block's header and
/// CRC. fio 3.33's state keeps only the last completions, not which writes failed, so it
/// also checks the writes that were in flight at the crash (and failed); those may hold
/// the old data or part of the new. What must hold: no block fio saw complete is bad,
/// fewer blocks are bad than were in flight, and fio read back the completed blocks (all
/// but the last few it stops short of). Checked that it catches a lost write: zeroing one
/// completed block in the backing file before the verify fails the test.
fn verify_after_crash(dir: &Path, dev: &str, crashed: &FioRun, what: &str, logs: &str) {
    let state = dir.join("local-crash-0-verify.state");
    assert!(state.exists(), "{what}: fio left no verify state file");
    let done = completed_writes(dir);
    assert_eq!(
        done.len() as u64 * 4096,
        crashed.bytes("write"),
        "{what}: the completion log and fio's own count of bytes written disagree"
    );
    let r = fio(
        dir,
        "verify",
        &crash_job(dev, false),
        &["--verify_only", "--verify_state_load=1"],
        300,
    );
    // "... verify failed at file F offset N, length L ..." / "bad magic header ... offset N, ..."
    let bad: Vec<u64> = r
        .stderr
        .lines()
        .filter(|l| l.contains(" at file "))
        .filter_map(|l| l.split(" offset ").nth(1)?.split(',').next()?.parse().ok())
        .collect();
    let lost: Vec<&u64> = bad.iter().filter(|o| done.contains(o)).collect();
    assert!(
        lost.is_empty(),
        "{what}: blocks fio saw written before the crash read back wrong: {lost:?} \
         ({} completed, bad blocks {bad:?}): {}{logs}",
        done.len(),
        r.describe()
    );
    assert!(
        bad.len() <= CRASH_DEPTH && (r.error() == 0) == bad.is_empty(),
        "{what}: {} bad blocks, at most {CRASH_DEPTH} writes were in flight: {}{logs}",
        bad.len(),
        r.describe()
    );
    // fio stops at the first write of the last `iodepth` issued that is not among the
    // last completions, so up to CRASH_DEPTH completed blocks after it go unread.
    assert!(
        r.bytes("read") + (CRASH_DEPTH as u64) * 4096 >= crashed.bytes("write")
            && crashed.bytes("write") >= 2 << 20,
        "{what}: fio read back {} of the {} bytes written before the crash: {}{logs}",
        r.bytes("read"),
        crashed.bytes("write"),
        r.describe()
    );
    eprintln!(
        "{what}: {} writes completed before the crash, all intact; {} of the in-flight ones \
         hold old or torn data",
        done.len(),
        bad.len()
    );
}

/// Waits until fio has written at least `bytes` to the backing file (blocks differing
/// from the initial pattern), so the kill comes mid-run.
fn wait_written(rig: &Rig, fio: &mut NsChild, bytes: usize) {
    let initial = pattern(1, (SECTORS * 512) as usize);
    let f = File::open(&rig.file).unwrap();
    let mut buf = vec![0u8; initial.len()];
    let ok = wait_until(Duration::from_secs(60), || {
        f.read_exact_at(&mut buf, 0).unwrap();
        let changed = buf
            .chunks(4096)
            .zip(initial.chunks(4096))
            .filter(|(a, b)| a != b)
            .count();
        changed * 4096 >= bytes || !fio.is_running()
    });
    assert!(
        ok && fio.is_running(),
        "fio did not get {bytes} bytes written: {}{}",
        fio.output_so_far(),
        rig.logs()
    );
}

/// `aoe serve` SIGKILLed mid-run and kept down past the initiator's deadsecs: fio's writes
/// fail and it stops; then the target is restarted, and every write fio saw complete must
/// read back intact.
#[test]
fn fio_target_killed_acknowledged_writes_survive() {
    require_fio();
    let mut rig = Rig::start(
        Target::AoeServe,
        1500,
        InitOpts {
            deadsecs: Some(DEADSECS),
            ..Default::default()
        },
    );
    target_killed(&mut rig, "target killed");
    rig.finish();
}

/// The same through a relay that loses 1 %, duplicates 1 % and reorders 3 % of the frames:
/// retransmitted and duplicated copies of writes in flight at the kill, and of those that
/// completed before it, must not undo a completed write.
#[test]
fn fio_target_killed_on_a_lossy_link_acknowledged_writes_survive() {
    use aoe_testkit::relay::Faults;
    require_fio();
    let mut r = RelayRig::start(
        Target::AoeServe,
        1500,
        InitOpts {
            deadsecs: Some(DEADSECS),
            ..Default::default()
        },
        None,
        &[],
        1,
        47,
    );
    r.control(0).set_faults(Faults::lossy(0.01, 0.01, 0.03));
    target_killed(&mut r.rig, "target killed on a lossy link");
    r.finish();
}

/// fio's crash job started on `rig`'s device (state saved for the verify pass), once 2 MiB
/// are written: its directory, the device's path and the running fio.
fn start_crash_fio(rig: &Rig) -> (std::path::PathBuf, String, NsChild) {
    let dir = rig.dir.path().to_owned();
    let dev = rig.dev().to_string_lossy().into_owned();
    let mut f =
        NsChild::spawn_command(fio_command(&dir, "crash", &crash_job(&dev, true), &[], 300))
            .expect("start fio");
    wait_written(rig, &mut f, 2 << 20);
    (dir, dev, f)
}

/// Waits up to `timeout` for the crash job `f` to end and returns its result, which must be
/// a failure (an I/O error fio reports), `what` naming the crash in the message.
fn crashed_fio(dir: &Path, f: &mut NsChild, timeout: Duration, what: &str, rig: &Rig) -> FioRun {
    let t0 = Instant::now();
    let status = f.wait_timeout(timeout).unwrap();
    let r = fio_result(
        dir,
        "crash",
        status.and_then(|s| s.code()),
        f.output_so_far(),
    );
    assert!(
        status.is_some() && !r.ok && r.error() != 0,
        "fio with {what} for {:?}: {}{}",
        t0.elapsed(),
        r.describe(),
        rig.logs()
    );
    r
}

/// fio's crash job on `rig`'s device, `aoe serve` SIGKILLed once 2 MiB are written and
/// kept down until fio has failed and the device is down, restarted, then checked.
fn target_killed(rig: &mut Rig, what: &str) {
    let (dir, dev, mut f) = start_crash_fio(rig);
    let mut t = rig.target.take().unwrap();
    run_ok(Command::new("kill").args(["-KILL", &t.pid().to_string()]));
    assert!(t.wait_timeout(Duration::from_secs(5)).unwrap().is_some());
    let r = crashed_fio(
        &dir,
        &mut f,
        Duration::from_secs(120),
        "the target dead",
        rig,
    );
    rig.wait_state("down", Duration::from_secs(DEADSECS + 10), "after the kill");
    rig.start_target();
    // The target announces itself when it starts; on a lossy link ask again until it
    // answers.
    let up = wait_until(Duration::from_secs(30), || {
        if rig.state().as_deref() == Some("up") {
            return true;
        }
        let _ = rig.echo("discover", "");
        std::thread::sleep(Duration::from_millis(300));
        false
    });
    assert!(up, "{what}: {DEV} not up after the restart{}", rig.logs());
    verify_after_crash(&dir, &dev, &r, what, &rig.logs());
}

/// `aoe initiator` SIGKILLed mid-run: fio's writes fail (the FUSE connection is gone);
/// a new initiator mounts ROOT again, and every write fio saw complete must read back.
#[test]
fn fio_initiator_killed_acknowledged_writes_survive() {
    require_fio();
    let mut rig = Rig::start(Target::AoeServe, 1500, InitOpts::default());
    let (dir, dev, mut f) = start_crash_fio(&rig);
    rig.sigkill_initiator();
    let r = crashed_fio(
        &dir,
        &mut f,
        Duration::from_secs(60),
        "the initiator killed",
        &rig,
    );
    run_ok(
        Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&rig.root),
    );
    assert!(wait_until(Duration::from_secs(5), || !rig.root_mounted()));
    rig.launch_initiator(&[]);
    rig.wait_state("up", Duration::from_secs(10), "after the new initiator");
    verify_after_crash(&dir, &dev, &r, "initiator killed", &rig.logs());
    rig.finish();
}
