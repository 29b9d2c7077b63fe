//! Helpers shared by the integration tests that run `aoe initiator` against a real target
//! (vblade or `aoe serve`) on a veth link between two namespaces the test creates: the
//! [`Rig`] (namespaces, link, backing file, target, initiator, ROOT mounted, all undone on
//! drop), small command runners, and the deterministic data pattern.
//!
//! Every test binary that says `mod common;` compiles this file; not every one uses every
//! helper.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aoe_testkit::{require_root, wait_until, Netns, NsChild, VethPair};

pub const AOE: &str = env!("CARGO_BIN_EXE_aoe");
pub const SHELF: u16 = 7;
pub const SLOT: u8 = 3;
pub const DEV: &str = "e7.3";
/// Backing file size in sectors: 32 MiB and 3 sectors, so a size rounded to KiB or MiB shows.
pub const SECTORS: u64 = 32 * 2048 + 3;
/// Where ROOTs are made: no `p` anywhere in the path (see the module docs).
pub const ROOTS: &str = "/run/aoeroots";
/// `--deadsecs` for the tests that kill the target.
pub const DEADSECS: u64 = 3;

static NEXT: AtomicU32 = AtomicU32::new(0);

// ------------------------------------------------------------------------------------------
// Preconditions and small helpers

/// Fails (never skips) unless every tool is on PATH.
pub fn require_tools() {
    require_root();
    aoe_testkit::require_tools(&[
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("losetup", "util-linux"),
        ("timeout", "coreutils"),
        ("sha256sum", "coreutils"),
        ("fusermount3", "fuse3"),
        ("vblade", "vblade"),
        ("aoe-stat", "aoetools"),
        ("mkfs.ext4", "e2fsprogs"),
        ("fsck.ext4", "e2fsprogs"),
    ]);
}

/// Runs a command to completion (under the caller's own `timeout` where it could hang).
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command and panics with its output unless it succeeds; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sha256(path: &Path) -> String {
    let out = run_ok(
        Command::new("timeout")
            .args(["-k", "5", "60", "sha256sum"])
            .arg(path),
    );
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

/// Makes sector 0 of `disk` an MBR with one primary Linux partition (type 0x83) at `start`
/// for `sectors` sectors (CHS fields "beyond 1024 cylinders", as sfdisk writes them) and
/// nothing else in it.
pub fn write_mbr_partition1(disk: &mut [u8], start: u32, sectors: u32) {
    disk[..512].fill(0);
    let e = &mut disk[446..462];
    e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[4] = 0x83;
    e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    disk[510] = 0x55;
    disk[511] = 0xaa;
}

/// Deterministic, position-dependent bytes (xorshift), different for each `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Number of AF_PACKET sockets bound to an interface in `ns` (`/proc/net/packet` shows the
/// reader's netns; column 5 is the interface index, 0 until `bind`). A socket is listed from
/// `socket()` on but receives nothing before it is bound, and `aoe serve` sets its rings up
/// in between (milliseconds at MTU 9000): a peer that starts talking when the socket is
/// merely listed loses its first frames.
pub fn packet_sockets(ns: &Netns) -> usize {
    ns.run("cat", &["/proc/net/packet"])
        .map(|s| {
            s.lines()
                .skip(1)
                .filter(|l| l.split_whitespace().nth(4).is_some_and(|i| i != "0"))
                .count()
        })
        .unwrap_or(0)
}

/// Stops process `pid` with SIGSTOP and waits until every one of its threads is stopped
/// (state `T` in `/proc/PID/task/*/stat`): the signal's delivery is asynchronous, and a test
/// that wants frames to queue up unread must know the process no longer runs. Panics, naming
/// the threads still running, if that takes longer than 10 s.
pub fn stop_process(pid: u32) {
    run_ok(Command::new("kill").args(["-STOP", &pid.to_string()]));
    let mut running = Vec::new();
    let stopped = wait_until(Duration::from_secs(10), || {
        running.clear();
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        for task in tasks.flatten() {
            let stat = fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next());
            if !matches!(state, Some("T") | Some("t")) {
                running.push(format!("{}: {state:?}", task.file_name().to_string_lossy()));
            }
        }
        running.is_empty()
    });
    assert!(
        stopped,
        "process {pid} not stopped 10 s after SIGSTOP: {running:?}"
    );
}

/// Packets received on interface `iface` of `ns` (its `rx_packets`, from `/proc/net/dev`
/// read inside the namespace). Panics if the interface is not there.
pub fn rx_packets(ns: &Netns, iface: &str) -> u64 {
    let dev = ns
        .run("cat", &["/proc/net/dev"])
        .expect("read /proc/net/dev");
    dev.lines()
        .find_map(|l| {
            let (name, counters) = l.split_once(':')?;
            (name.trim() == iface).then(|| counters.split_whitespace().nth(1)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {iface} in the namespace's /proc/net/dev:\n{dev}"))
}

/// Runs `send`, which sends `frames` frames to process `pid` through interface `iface` of
/// `ns`, while `pid` is stopped ([`stop_process`]), and lets the process run again once all of
/// them are on the interface ([`rx_packets`]): they then sit in its receive ring together and
/// it takes them in as few receive batches as it can (`aoe serve` takes up to 64 a batch),
/// on any machine. A test whose assertion needs requests in one receive batch (merged reads,
/// a read and a write staged together) must hold the receiver so: running, a fast machine's
/// receiver wakes on each frame as it lands and takes them one or two at a time (CI, stop
/// 42). The process is continued even if `send` panics; panics if the frames did not all
/// reach the interface within 20 s.
pub fn while_stopped<T>(
    pid: u32,
    ns: &Netns,
    iface: &str,
    frames: usize,
    send: impl FnOnce() -> T,
) -> T {
    struct Cont(u32);
    impl Drop for Cont {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-CONT", &self.0.to_string()])
                .status();
        }
    }
    stop_process(pid);
    let cont = Cont(pid);
    let rx = rx_packets(ns, iface);
    let out = send();
    let landed = wait_until(Duration::from_secs(20), || {
        rx_packets(ns, iface) >= rx + frames as u64
    });
    drop(cont);
    assert!(
        landed,
        "{frames} frames sent to process {pid} did not all reach {iface} in 20 s"
    );
    out
}

/// A numeric field of `/proc/PID/status` (`VmRSS:` and `VmHWM:` in KiB, `Threads:`), for
/// the tests that check a daemon's memory or threads stay bounded. Panics, naming the
/// process, if it is gone or the field is missing.
pub fn proc_status(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("pid {pid} gone: {e}"))
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// The payload per frame the MTU allows for both targets: whole sectors after the 36 bytes
/// of Ethernet, AoE and ATA headers (the driver's `aoecmd_cfg_rsp`, vblade's `confcmd`).
pub fn payload_for(mtu: u32) -> u64 {
    u64::from(mtu - 36) / 512 * 512
}

/// aoe-stat's size column: `512000 * sectors / 1e9`, `%04d`, a dot before the last three
/// digits, "GB".
pub fn aoe_stat_size(sectors: u64) -> String {
    let n = format!("{:04}", 512_000 * sectors / 1_000_000_000);
    let (int, frac) = n.split_at(n.len() - 3);
    format!("{int}.{frac}GB")
}

// ------------------------------------------------------------------------------------------
// Targets

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Our `aoe serve`.
    AoeServe,
    /// vblade, the reference implementation.
    Vblade,
}

impl Target {
    /// The target's command line: `extra` (options such as `-d`) before the positional
    /// arguments, as vblade wants them.
    pub fn command(self, netif: &str, file: &Path, extra: &[String]) -> Command {
        let mut cmd = match self {
            Target::AoeServe => {
                let mut c = Command::new(AOE);
                c.arg("serve");
                c
            }
            Target::Vblade => Command::new("vblade"),
        };
        cmd.args(extra)
            .arg(SHELF.to_string())
            .arg(SLOT.to_string())
            .arg(netif)
            .arg(file);
        cmd
    }
}

/// A temporary directory, the backing file (`file`, or a new one of SECTORS filled with
/// `pattern(1, ..)` in the directory) and a fresh ROOT under [`ROOTS`] named `TAG PID-N`,
/// checked to contain no `p` (aoe-stat skips such paths) and created.
pub fn backing_and_root(tag: char, file: Option<PathBuf>) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = file.unwrap_or_else(|| {
        let f = dir.path().join("backing.img");
        fs::write(&f, pattern(1, (SECTORS * 512) as usize)).expect("backing file");
        f
    });
    let root = Path::new(ROOTS).join(format!(
        "{tag}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    assert!(
        !root.to_string_lossy().contains('p'),
        "{} contains a 'p': aoe-stat would not see it",
        root.display()
    );
    fs::create_dir_all(&root).expect("create ROOT");
    (dir, file, root)
}

// ------------------------------------------------------------------------------------------
// The rig: target and initiator on one veth link, ROOT mounted, everything undone on drop

/// Options for the initiator.
#[derive(Debug, Clone, Copy, Default)]
pub struct InitOpts {
    pub loop_devices: bool,
    pub deadsecs: Option<u64>,
    /// A second veth in the initiator's namespace leading to an empty namespace (no target).
    pub spare_link: bool,
    /// `--unsafe-no-write-fence`: writes go out at once even while a copy of an earlier
    /// write to their sectors may still land (only to show what the fence prevents).
    pub no_write_fence: bool,
    /// `--fuse-uring`: the files' requests through FUSE over io_uring (hold an
    /// [`aoe_testkit::fuseuring::FuseUring::enabled`] guard meanwhile).
    pub fuse_uring: bool,
}

impl InitOpts {
    /// `--fuse-uring` options, with `enable_uring` set to Y until the guard is dropped (bind
    /// it first, so that the rig goes before it); fails the test with the reason where the
    /// ring cannot be enabled.
    pub fn fuse_uring() -> (aoe_testkit::fuseuring::FuseUring, InitOpts) {
        let u = aoe_testkit::fuseuring::FuseUring::enabled()
            .unwrap_or_else(|e| panic!("FUSE over io_uring cannot be enabled: {e}"));
        let opts = InitOpts {
            fuse_uring: true,
            ..InitOpts::default()
        };
        (u, opts)
    }

    /// The initiator arguments these options stand for.
    pub fn args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(d) = self.deadsecs {
            v.extend(["--deadsecs".to_string(), d.to_string()]);
        }
        if self.loop_devices {
            v.push("--loop".into());
        }
        if self.no_write_fence {
            v.push("--unsafe-no-write-fence".into());
        }
        if self.fuse_uring {
            v.push("--fuse-uring".into());
        }
        v
    }
}

/// Field order matters only for what `Drop` does not do by hand: the link and namespaces go
/// last.
pub struct Rig {
    pub kind: Target,
    /// Options the target is started with, before its positional arguments.
    pub target_args: Vec<String>,
    pub root: PathBuf,
    pub file: PathBuf,
    /// ext4 mount points to unmount on drop.
    pub mounts: Vec<PathBuf>,
    pub initiator: Option<NsChild>,
    pub target: Option<NsChild>,
    pub init_if: String,
    pub target_if: String,
    pub spare_if: Option<String>,
    pub _spare: Option<(VethPair, Netns)>,
    pub veth: VethPair,
    pub init_ns: Netns,
    pub target_ns: Netns,
    pub dir: tempfile::TempDir,
}

impl Rig {
    /// A rig with nothing started yet: `backing` is what [`backing_and_root`] returns (dir,
    /// file, root), `link` the veth pair and its (target, initiator) namespaces; the
    /// initiator uses the pair's initiator end, the target `target_if` (the pair's other end,
    /// or a bridge it is a port of). Callers with a spare link or several paths set
    /// `init_if`, `spare_if` and `_spare` afterwards.
    pub fn assemble(
        kind: Target,
        target_args: Vec<String>,
        backing: (tempfile::TempDir, PathBuf, PathBuf),
        link: (VethPair, Netns, Netns),
        target_if: String,
    ) -> Rig {
        let (dir, file, root) = backing;
        let (veth, target_ns, init_ns) = link;
        Rig {
            kind,
            target_args,
            root,
            file,
            mounts: Vec::new(),
            initiator: None,
            target: None,
            init_if: veth.b_name().to_owned(),
            target_if,
            spare_if: None,
            _spare: None,
            veth,
            init_ns,
            target_ns,
            dir,
        }
    }

    /// Namespaces, link, backing file (SECTORS, filled with a pattern), target, initiator;
    /// returns once ROOT is mounted and the device is up.
    pub fn start(kind: Target, mtu: u32, opts: InitOpts) -> Rig {
        Rig::start_with(kind, mtu, opts, None, &[])
    }

    /// Like [`Rig::start`], with the target serving `file` (its contents as they are;
    /// default: a new file of SECTORS filled with `pattern(1, ..)`) and given `target_args`
    /// before its positional arguments (`-d`, `-s`, `-b 16`, ...), also on a restart.
    pub fn start_with(
        kind: Target,
        mtu: u32,
        opts: InitOpts,
        file: Option<PathBuf>,
        target_args: &[&str],
    ) -> Rig {
        require_tools();
        let (dir, file, root) = backing_and_root('r', file);

        let target_ns = Netns::new("aoeit").expect("target namespace");
        let init_ns = Netns::new("aoeii").expect("initiator namespace");
        let veth = VethPair::new(&target_ns, &init_ns, mtu).expect("veth pair");
        let spare = opts.spare_link.then(|| {
            let ns = Netns::new("aoeis").expect("spare namespace");
            let v = VethPair::new(&init_ns, &ns, mtu).expect("spare veth pair");
            (v, ns)
        });
        let target_if = veth.a_name().to_owned();
        let mut rig = Rig::assemble(
            kind,
            target_args.iter().map(|a| a.to_string()).collect(),
            (dir, file, root),
            (veth, target_ns, init_ns),
            target_if,
        );
        rig.spare_if = spare.as_ref().map(|(v, _)| v.a_name().to_owned());
        rig._spare = spare;
        rig.start_target();
        rig.launch_initiator(&opts.args());
        // It discovers at start; the target also announces itself when it starts.
        let up = wait_until(Duration::from_secs(10), || {
            rig.state().as_deref() == Some("up")
        });
        assert!(up, "{DEV} did not come up: {}", rig.logs());
        rig
    }

    /// `aoe serve` on `file` as it is (an image a test made, with its partition table) at
    /// MTU `mtu`, the initiator with its default options: [`Rig::start_with`] as most tests
    /// that bring their own image call it.
    pub fn on_file(mtu: u32, file: PathBuf) -> Rig {
        Rig::start_with(Target::AoeServe, mtu, InitOpts::default(), Some(file), &[])
    }

    /// The file of partition `n` (`eX.YpN`) once it has appeared (the scan follows the
    /// device coming up); panics with the logs after 10 s.
    pub fn partition(&self, n: u32) -> PathBuf {
        let p = self.root.join(format!("{DEV}p{n}"));
        assert!(
            wait_until(Duration::from_secs(10), || p.exists()),
            "{} did not appear{}",
            p.display(),
            self.logs()
        );
        p
    }

    pub fn start_target(&mut self) {
        assert!(self.target.is_none(), "target already running");
        let mut t = self
            .target_ns
            .spawn(
                self.kind
                    .command(&self.target_if, &self.file, &self.target_args),
            )
            .expect("start target");
        // Ready once its AF_PACKET socket exists.
        let bound = wait_until(Duration::from_secs(10), || {
            packet_sockets(&self.target_ns) > 0 || !t.is_running()
        });
        assert!(
            bound && t.is_running(),
            "target {} did not start:\n{}",
            t.label(),
            t.output_so_far()
        );
        self.target = Some(t);
    }

    /// Stops the target and waits until its socket is gone.
    pub fn kill_target(&mut self) {
        if let Some(mut t) = self.target.take() {
            let _ = t.stop();
        }
        assert!(
            wait_until(Duration::from_secs(5), || packet_sockets(&self.target_ns)
                == 0),
            "target's socket still open"
        );
    }

    pub fn dev(&self) -> PathBuf {
        self.root.join(DEV)
    }

    pub fn attr_path(&self, name: &str) -> PathBuf {
        self.root
            .join("sysfs/block")
            .join(format!("etherd!{DEV}"))
            .join(name)
    }

    /// A sysfs attribute of the device, trimmed; None if the device is not there.
    pub fn attr(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.attr_path(name))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    pub fn state(&self) -> Option<String> {
        self.attr("state")
    }

    /// Waits up to `within` for attribute `name` to read `want`; panics otherwise, saying
    /// `when` and with the logs.
    pub fn wait_attr(&self, name: &str, want: &str, within: Duration, when: &str) {
        assert!(
            wait_until(within, || self.attr(name).as_deref() == Some(want)),
            "{name} {:?} {when}, want {want}{}",
            self.attr(name),
            self.logs()
        );
    }

    pub fn wait_state(&self, want: &str, within: Duration, when: &str) {
        self.wait_attr("state", want, within, when);
    }

    /// A read of the device, which must fail with EIO at once (in under a second), as it
    /// does while the device is down.
    pub fn assert_prompt_eio(&self, len: usize, when: &str) {
        let t0 = Instant::now();
        let r = read_at(&self.dev(), 0, len);
        assert!(matches!(&r, Err(e) if is_eio(e)), "read {when}: {r:?}");
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "EIO {when} took {:?}",
            t0.elapsed()
        );
    }

    /// Writes `discover` and gives the answers 200 ms, until `done` holds or `within` has
    /// passed; whether it held.
    pub fn discover_until(&self, within: Duration, mut done: impl FnMut() -> bool) -> bool {
        wait_until(within, || {
            let _ = self.echo("discover", "");
            std::thread::sleep(Duration::from_millis(200));
            done()
        })
    }

    /// Writes `text` to a control file the way a shell's `echo TEXT > ROOT/NAME` does.
    pub fn echo(&self, name: &str, text: &str) -> Output {
        run(Command::new("timeout")
            .args([
                "-k",
                "5",
                "20",
                "sh",
                "-c",
                r#"echo "$1" > "$2""#,
                "sh",
                text,
            ])
            .arg(self.root.join(name)))
    }

    pub fn echo_ok(&self, name: &str, text: &str) {
        let out = self.echo(name, text);
        assert!(
            out.status.success(),
            "echo {text:?} > {name} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
    }

    /// The lines `err` has queued and those queued within `secs`, read here without
    /// blocking (O_NONBLOCK: EAGAIN when the queue is empty, as `aoechr_read`). Each read
    /// takes a line off the queue. This was `timeout SECS cat ROOT/err`: on a stalled
    /// machine cat could start late and be stopped before it had read (or written out) a
    /// line already queued, which was then lost to the assertion.
    pub fn err_lines(&self, secs: u32) -> String {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(0o4000) // O_NONBLOCK (asm-generic/fcntl.h: x86, arm)
            .open(self.root.join("err"))
            .expect("open ROOT/err");
        let deadline = Instant::now() + Duration::from_secs(secs.into());
        let mut text = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        // Lines queued before the deadline are all read, however long that takes.
        loop {
            match f.read(&mut buf) {
                Ok(n) if n > 0 => text.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(_) | Err(_) if Instant::now() >= deadline => break,
                Ok(_) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("read ROOT/err: {e}"),
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    /// The initiator's output so far (its log), empty when none runs.
    pub fn initiator_log(&self) -> String {
        self.initiator
            .as_ref()
            .map(NsChild::output_so_far)
            .unwrap_or_default()
    }

    /// The target's output so far (its log), empty when none runs.
    pub fn target_log(&self) -> String {
        self.target
            .as_ref()
            .map(NsChild::output_so_far)
            .unwrap_or_default()
    }

    /// Initiator and target output, for failure messages.
    pub fn logs(&self) -> String {
        let init = self.initiator_log();
        let target = self.target_log();
        format!("\n--- initiator:\n{init}\n--- target:\n{target}")
    }

    /// Loop devices whose backing file is under ROOT.
    pub fn loops(&self) -> Vec<String> {
        let out = run(Command::new("losetup").args(["-n", "-l", "-O", "NAME,BACK-FILE"]));
        let prefix = format!("{}/", self.root.display());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (name, back) = l.trim().split_once(char::is_whitespace)?;
                back.trim().starts_with(&prefix).then(|| name.to_owned())
            })
            .collect()
    }

    /// True while something is mounted on ROOT (field 5 of /proc/self/mountinfo).
    pub fn root_mounted(&self) -> bool {
        let root = self.root.to_string_lossy();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(&*root))
    }

    /// The normal end of a test: SIGTERM stops the initiator cleanly (exit status 0 within
    /// 30 s, else SIGKILL), it unmounts ROOT and detaches the loop devices it attached by
    /// itself. Drop then does the rest. The grace is long because SIGTERM waits for files
    /// still open, and the kernel releases a FUSE file only once its last readahead has
    /// completed, which after a lossy spell can take a few retransmit back-offs.
    pub fn finish(mut self) {
        assert!(
            self.mounts.is_empty(),
            "a test left {:?} mounted",
            self.mounts
        );
        assert!(self.root_mounted(), "ROOT not mounted before the stop");
        let mut init = self.initiator.take().expect("initiator running");
        let t0 = Instant::now();
        let status = init
            .stop_within(Duration::from_secs(30))
            .expect("stop the initiator");
        assert!(
            status.success(),
            "aoe initiator after SIGTERM: {status} ({:?}):\n{}",
            t0.elapsed(),
            init.output_so_far()
        );
        assert!(
            !self.root_mounted(),
            "ROOT still mounted after the initiator stopped"
        );
        assert!(
            wait_until(Duration::from_secs(10), || self.loops().is_empty()),
            "loop devices left over ROOT: {:?}",
            self.loops()
        );
    }

    /// Undoes everything a test may have left: ext4 mounts, loop devices, initiator (its
    /// SIGTERM unmounts ROOT), target, then the mount and ROOT itself.
    pub fn cleanup(&mut self) {
        for m in self.mounts.drain(..) {
            let _ = run(Command::new("umount").arg(&m));
            let _ = run(Command::new("umount").arg("-l").arg(&m));
        }
        for lo in self.loops() {
            let _ = run(Command::new("losetup").args(["-d", &lo]));
        }
        if let Some(mut i) = self.initiator.take() {
            let _ = i.stop();
        }
        if let Some(mut t) = self.target.take() {
            let _ = t.stop();
        }
        let _ = run(Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.root));
        for lo in self.loops() {
            let _ = run(Command::new("losetup").args(["-d", &lo]));
        }
        let _ = fs::remove_dir(&self.root);
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Reads `len` bytes at `offset` through a fresh open of `path` (a fresh open drops the
/// FUSE page cache of the file, so the data comes over the network).
pub fn read_at(path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let f = File::open(path)?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

pub fn is_eio(e: &io::Error) -> bool {
    e.raw_os_error() == Some(5)
}

// ------------------------------------------------------------------------------------------
// Store integrity (issue 9): a real file system with 4 KiB blocks under the target's file

/// An ext4 file system with 4 KiB blocks (`mkfs.ext4 -b 4096`) on a loop device with
/// `sector`-byte logical blocks (`losetup --sector-size`), mounted on a temporary directory.
/// Drop unmounts it and detaches the loop device, also when the test panics: declare it
/// before the [`Rig`] whose target serves a file on it, so the target is stopped first.
pub struct Ext4Loop {
    pub dir: tempfile::TempDir,
    pub loopdev: Option<String>,
    pub mounted: bool,
}

impl Ext4Loop {
    pub fn new(sector: u32, mib: u64) -> Ext4Loop {
        require_tools();
        // On the disk the tests run on (not tmpfs), so the loop device does real I/O.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
        let image = dir.path().join("ext4.img");
        File::create(&image)
            .and_then(|f| f.set_len(mib << 20))
            .expect("ext4 image");
        let mut me = Ext4Loop {
            dir,
            loopdev: None,
            mounted: false,
        };
        let dev = run_ok(
            Command::new("losetup")
                .args(["--find", "--show", "--sector-size", &sector.to_string()])
                .arg(&image),
        );
        me.loopdev = Some(dev.trim().to_owned());
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096"])
                .arg(me.dev()),
        );
        fs::create_dir(me.mnt()).expect("mount point");
        run_ok(Command::new("mount").arg(me.dev()).arg(me.mnt()));
        me.mounted = true;
        me
    }

    pub fn dev(&self) -> &str {
        self.loopdev.as_deref().unwrap_or_default()
    }

    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Ext4Loop {
    /// Unmounts the file system, trying again while it is busy (a process of the test
    /// still closing a file on it) for up to 10 s, removes the mount point and waits (up
    /// to 20 s) until the kernel has let go of the file system, then detaches the loop
    /// device. The error names what `umount` last said, or the processes whose mount
    /// namespaces still hold the file system.
    ///
    /// Session 29: a test that dropped this while it still held a file open left the mount
    /// and the loop device behind, one per run (`umount` said "target is busy" and Drop
    /// went on). Session 30 (thirteenth audit): a successful `umount` only takes the mount
    /// out of *this* mount namespace. A process started by `ip netns exec` (or `unshare
    /// -m`) while the file system was mounted has a copy of the mount in its own namespace
    /// (the machine's `/` is a private mount, so our `umount` does not propagate to it),
    /// and the superblock lives on, dirty, until that process exits: the last unmount and
    /// its superblock write come later, behind the test's back. Removing the mount point
    /// detaches those copies (Linux 3.18, "vfs: Lazily remove mounts on unlinked files and
    /// directories"); `/sys/fs/ext4/<device>` is there exactly while the superblock is.
    pub fn unmount(&mut self) -> Result<(), String> {
        if self.mounted {
            let mut said = String::new();
            let gone = wait_until(Duration::from_secs(10), || {
                let o = run(Command::new("umount").arg(self.mnt()));
                said = String::from_utf8_lossy(&o.stderr).trim().to_owned();
                o.status.success()
            });
            if !gone {
                return Err(format!("umount {}: {said}", self.mnt().display()));
            }
            self.mounted = false;
            release_ext4(&self.mnt(), self.dev())?;
        }
        if let Some(d) = self.loopdev.take() {
            let _ = run(Command::new("losetup").args(["-d", &d]));
        }
        Ok(())
    }

    /// `/sys/fs/ext4/loopN`: there while the kernel holds the file system's superblock.
    pub fn superblock(&self) -> PathBuf {
        ext4_superblock(self.dev())
    }
}

/// `/sys/fs/ext4/<name of dev>`: there exactly while the kernel holds the superblock of an
/// ext4 file system on `dev`.
pub fn ext4_superblock(dev: &str) -> PathBuf {
    let name = Path::new(dev).file_name().unwrap_or_default();
    Path::new("/sys/fs/ext4").join(name)
}

/// The processes (`PID (comm)`) with a mount of the ext4 file system on `dev` in their
/// mount namespaces, from `/proc/*/mountinfo` (whose source field is the device's path).
pub fn ext4_holders(dev: &str) -> Vec<String> {
    let source = format!(" ext4 {dev} ");
    let mut out = vec![];
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let p = e.path();
        if fs::read_to_string(p.join("mountinfo")).is_ok_and(|m| m.contains(&source)) {
            let comm = fs::read_to_string(p.join("comm")).unwrap_or_default();
            out.push(format!(
                "{} ({})",
                e.file_name().to_string_lossy(),
                comm.trim()
            ));
        }
    }
    out
}

/// After a successful `umount MNT` of the ext4 file system on `dev`: removes the mount
/// point and waits (up to 20 s) until the kernel has let go of the file system; the error
/// names the processes whose mount namespaces still hold it.
///
/// Thirteenth audit: `umount` only takes the mount out of *this* mount namespace. A process
/// started by `ip netns exec` (or `unshare -m`) while the file system was mounted has a copy
/// of the mount in its own namespace (the machine's `/` is a private mount, so our `umount`
/// does not propagate to it), and the superblock lives on, dirty, until that process exits:
/// the last unmount and its superblock write come later, behind the test's back (an
/// `fsck` of the image, or an initiator waiting for its loop device to be let go, sees the
/// file system still alive). Removing the mount point detaches those copies (Linux 3.18,
/// "vfs: Lazily remove mounts on unlinked files and directories"); a copy that is busy in
/// its namespace still holds the superblock until it is not.
pub fn release_ext4(mnt: &Path, dev: &str) -> Result<(), String> {
    fs::remove_dir(mnt).map_err(|e| format!("remove the mount point {}: {e}", mnt.display()))?;
    let sb = ext4_superblock(dev);
    if !wait_until(Duration::from_secs(20), || !sb.exists()) {
        return Err(format!(
            "{} was unmounted, but the file system on {dev} is still alive 20 s later ({} is \
             there): mounted in the mount namespaces of {}",
            mnt.display(),
            sb.display(),
            ext4_holders(dev).join(", ")
        ));
    }
    Ok(())
}

/// `umount MNT` (under `timeout`) of the ext4 file system on `dev`, then [`release_ext4`];
/// the mount point is made again, empty, for a later mount. Panics naming what is left.
pub fn umount_ext4(mnt: &Path, dev: &str) {
    run_ok(
        Command::new("timeout")
            .args(["-k", "5", "60", "umount"])
            .arg(mnt),
    );
    if let Err(e) = release_ext4(mnt, dev) {
        panic!("{e}");
    }
    fs::create_dir(mnt).expect("make the mount point again");
}

impl Drop for Ext4Loop {
    fn drop(&mut self) {
        if self.unmount().is_err() {
            // Still busy after 10 s (a test that panicked holding a file open): detach it
            // lazily, so that neither the mount nor the loop device outlives the run.
            let _ = run(Command::new("umount").arg("-l").arg(self.mnt()));
            self.mounted = false;
            if let Some(d) = self.loopdev.take() {
                let _ = run(Command::new("losetup").args(["-d", &d]));
            }
        }
    }
}

/// Indices of the 512-byte sectors in which `got` and `want` differ.
pub fn wrong_sectors(got: &[u8], want: &[u8]) -> Vec<usize> {
    assert_eq!(got.len(), want.len(), "lengths differ");
    got.chunks(512)
        .zip(want.chunks(512))
        .enumerate()
        .filter(|(_, (g, w))| g != w)
        .map(|(i, _)| i)
        .collect()
}

// ------------------------------------------------------------------------------------------
// Initiator integrity (issue 9): restarting the initiator with other options, a second
// initiator on the same ROOT, signals

impl Rig {
    /// The `aoe initiator` command line [`Rig::start_with`] uses (ROOT, the link, debug
    /// logs; no `--loop` or `--deadsecs`), with `extra` arguments after it.
    pub fn initiator_command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(AOE);
        cmd.arg("initiator")
            .arg("--root")
            .arg(&self.root)
            .arg("--iflist")
            .arg(&self.init_if)
            .args(extra)
            .env("AOE_LOG", "debug");
        cmd
    }

    /// Starts another `aoe initiator` in the initiator's namespace on this rig's ROOT,
    /// without waiting for anything.
    pub fn spawn_initiator(&self, extra: &[&str]) -> NsChild {
        self.init_ns
            .spawn(self.initiator_command(extra))
            .expect("start aoe initiator")
    }

    /// Stops the running initiator (it must exit 0 and unmount ROOT) and starts one with
    /// `extra` arguments; returns once ROOT is mounted and the device is up again.
    pub fn restart_initiator(&mut self, extra: &[&str]) {
        let mut old = self.initiator.take().expect("initiator running");
        let status = old.stop().expect("stop the initiator");
        assert!(
            status.success(),
            "initiator before restart: {status}\n{}",
            old.output_so_far()
        );
        assert!(
            wait_until(Duration::from_secs(5), || !self.root_mounted()),
            "ROOT still mounted after the initiator stopped"
        );
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        self.launch_initiator(&extra);
        self.wait_state("up", Duration::from_secs(10), "after the restart");
    }

    /// Starts `aoe initiator` with `extra` arguments as this rig's initiator and waits until
    /// it has mounted ROOT (not for any device). `nsenter --net` only: the mount is in this
    /// process's mount namespace.
    pub fn launch_initiator(&mut self, extra: &[String]) {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut init = self.spawn_initiator(&extra);
        let discover = self.root.join("discover");
        let mounted = wait_until(Duration::from_secs(10), || {
            discover.exists() || !init.is_running()
        });
        assert!(
            mounted && init.is_running(),
            "aoe initiator {extra:?} did not mount {}:\n{}",
            self.root.display(),
            init.output_so_far()
        );
        self.initiator = Some(init);
    }

    /// Waits (10 s) for `--loop` to attach the device and returns the loop devices over
    /// ROOT; panics with the logs if none appears.
    pub fn wait_loops(&self) -> Vec<String> {
        let mut loops = Vec::new();
        assert!(
            wait_until(Duration::from_secs(10), || {
                loops = self.loops();
                !loops.is_empty()
            }),
            "no loop device attached to {}{}",
            self.dev().display(),
            self.logs()
        );
        loops
    }

    /// Sends `signal` (`"TERM"`, `"QUIT"`, ...) to the initiator.
    pub fn signal_initiator(&self, signal: &str) {
        let pid = self.initiator.as_ref().expect("initiator running").pid();
        run_ok(Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]));
    }

    /// SIGKILLs the initiator and waits (10 s at most) until it is gone; what it leaves
    /// behind (its ROOT mount, NBD socket, loop devices) stays for the test to look at.
    pub fn sigkill_initiator(&mut self) {
        self.signal_initiator("KILL");
        let mut dead = self.initiator.take().expect("initiator running");
        assert!(
            dead.wait_timeout(Duration::from_secs(10))
                .unwrap()
                .is_some(),
            "initiator still running 10 s after SIGKILL"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Faults (issue 14): the rig with aoe_testkit::relay between target and initiator, and raw
// frame exchanges for the hostile-frame table

/// A [`Rig`] whose link runs through fault-injecting relays (aoe_testkit::relay), one per
/// path: `target ns <-veth-> relay ns <-veth-> initiator ns`. With more than one path the
/// target-side ends are joined by a bridge in the target's namespace and the target serves
/// on the bridge, so one target MAC is reachable over every path (multipath, as a target
/// with one port on a switched network with two initiator ports). Relays stop first on drop.
pub struct RelayRig {
    pub relays: Vec<aoe_testkit::relay::Relay>,
    /// Per path: the initiator's interface name and MAC.
    pub paths: Vec<(String, [u8; 6])>,
    /// Extra paths' veths and middle namespaces (the first path's are in the Rig).
    pub extra: Vec<(VethPair, VethPair, Netns)>,
    pub bridge: Option<aoe_testkit::Bridge>,
    /// With [`RelayRig::start_per_path_targets`]: the targets of the paths after the first
    /// (the first is the rig's), each serving the same file on its own path.
    pub more_targets: Vec<NsChild>,
    pub rig: Rig,
}

impl RelayRig {
    /// Like [`Rig::start_with`] with `npaths` relayed paths (RNG seeds `seed`, `seed + 1`,
    /// ...). Returns once the device is up.
    pub fn start(
        kind: Target,
        mtu: u32,
        opts: InitOpts,
        file: Option<PathBuf>,
        target_args: &[&str],
        npaths: usize,
        seed: u64,
    ) -> RelayRig {
        Self::start_inner(kind, mtu, opts, file, target_args, npaths, seed, false)
    }

    /// Like [`RelayRig::start`], but without the bridge: each path ends at a target of its
    /// own (`kind` on that path's interface, the same shelf.slot and file), so the device has
    /// `npaths` targets, one per path, as a disk with two controllers (multipath across
    /// targets, where [`RelayRig::start`] gives one target over several paths).
    pub fn start_per_path_targets(
        kind: Target,
        opts: InitOpts,
        target_args: &[&str],
        npaths: usize,
        seed: u64,
    ) -> RelayRig {
        Self::start_inner(kind, 1500, opts, None, target_args, npaths, seed, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn start_inner(
        kind: Target,
        mtu: u32,
        opts: InitOpts,
        file: Option<PathBuf>,
        target_args: &[&str],
        npaths: usize,
        seed: u64,
        per_path_targets: bool,
    ) -> RelayRig {
        use aoe_testkit::relay::Relay;
        require_tools();
        assert!(npaths >= 1);
        let (dir, file, root) = backing_and_root('f', file);
        let target_ns = Netns::new("aoeft").expect("target namespace");
        let init_ns = Netns::new("aoefi").expect("initiator namespace");
        let mut relays = Vec::new();
        let mut paths = Vec::new();
        let mut first = None;
        let mut extra = Vec::new();
        for i in 0..npaths {
            let mid = Netns::new("aoefm").expect("relay namespace");
            let t_side = VethPair::new(&target_ns, &mid, mtu).expect("target-side veth");
            let i_side = VethPair::new(&mid, &init_ns, mtu).expect("initiator-side veth");
            for ifname in [t_side.b_name(), i_side.a_name()] {
                mid.ip(&["link", "set", "dev", ifname, "promisc", "on"])
                    .expect("promisc");
            }
            relays.push(
                Relay::start(&mid, t_side.b_name(), i_side.a_name(), seed + i as u64)
                    .expect("start relay"),
            );
            paths.push((i_side.b_name().to_owned(), i_side.b_mac()));
            if first.is_none() {
                first = Some((t_side, i_side, mid));
            } else {
                extra.push((t_side, i_side, mid));
            }
        }
        let (veth, i_side, mid) = first.expect("one path");
        let (bridge, target_if) = if npaths > 1 && !per_path_targets {
            let br = aoe_testkit::Bridge::new(&target_ns).expect("bridge");
            br.add_port(veth.a_name()).expect("bridge port");
            for (t, _, _) in &extra {
                br.add_port(t.a_name()).expect("bridge port");
            }
            target_ns
                .ip(&["link", "set", "dev", br.name(), "mtu", &mtu.to_string()])
                .expect("bridge mtu");
            let name = br.name().to_owned();
            (Some(br), name)
        } else {
            (None, veth.a_name().to_owned())
        };
        let iflist = paths
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let mut rig = Rig::assemble(
            kind,
            target_args.iter().map(|a| a.to_string()).collect(),
            (dir, file, root),
            (veth, target_ns, init_ns),
            target_if,
        );
        rig.init_if = iflist.clone();
        rig._spare = Some((i_side, mid));
        rig.start_target();
        let mut more_targets = Vec::new();
        if per_path_targets {
            let args: Vec<String> = target_args.iter().map(|a| a.to_string()).collect();
            for (t, _, _) in &extra {
                let cmd = kind.command(t.a_name(), &rig.file, &args);
                more_targets
                    .push(NsChild::spawn(&rig.target_ns, cmd).expect("start another target"));
            }
        }
        // `init_if` is the whole --iflist here: every path's initiator end.
        rig.launch_initiator(&opts.args());
        let me = RelayRig {
            relays,
            paths,
            extra,
            bridge,
            more_targets,
            rig,
        };
        // Discovery frames may be lost too: ask again until the device is up.
        let up = wait_until(Duration::from_secs(20), || {
            if me.rig.state().as_deref() == Some("up") {
                return true;
            }
            let _ = me.rig.echo("discover", "");
            std::thread::sleep(Duration::from_millis(300));
            false
        });
        assert!(up, "{DEV} did not come up: {}", me.rig.logs());
        me
    }

    pub fn control(&self, path: usize) -> aoe_testkit::relay::RelayControl {
        self.relays[path].control()
    }

    /// Finishes the rig (clean initiator stop) while the relays still carry frames (each
    /// must still be running: a socket error would have ended it), then stops the relays.
    /// In that order because the initiator does not stop while a device file is open, and
    /// the kernel releases a FUSE file only after its readahead has completed over the link.
    pub fn finish(self) {
        let RelayRig {
            mut relays,
            extra,
            bridge,
            more_targets,
            rig,
            ..
        } = self;
        for (i, r) in relays.iter_mut().enumerate() {
            if !r.is_running() {
                panic!("relay of path {i} ended early: {:?}", r.stop());
            }
        }
        rig.finish();
        drop(more_targets);
        drop(relays);
        drop(bridge);
        drop(extra);
    }
}

/// Writes `data` at `offset` of `dev` with O_DIRECT-free pwrite and fsync; the error as is.
pub fn write_sync(dev: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
    let f = fs::OpenOptions::new().write(true).open(dev)?;
    f.write_all_at(data, offset)?;
    f.sync_all()
}

/// An AoE socket on `ifname` in `ns` (for hand-made frames).
pub fn raw_socket(ns: &Netns, ifname: &str) -> aoe_sys::PacketSocket {
    let name = ifname.to_owned();
    aoe_sys::run_in_netns(&ns.path(), move || aoe_sys::PacketSocket::open(&name))
        .expect("enter netns")
        .unwrap_or_else(|e| panic!("AoE socket on {ifname}: {e}"))
}

/// Every AoE frame that arrives on `sock` within `wait` (polling, never blocking longer).
pub fn drain_frames(sock: &aoe_sys::PacketSocket, wait: Duration) -> Vec<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 9100];
    let deadline = Instant::now() + wait;
    loop {
        while let Some(meta) = sock.recv(&mut buf).expect("recv") {
            got.push(buf[..meta.len.min(buf.len())].to_vec());
        }
        let now = Instant::now();
        if now >= deadline {
            return got;
        }
        let mut fds = [aoe_sys::PollFd::new(sock.as_raw_fd())];
        aoe_sys::poll(&mut fds, Some(deadline - now)).expect("poll");
    }
}

/// A LAN for raw-frame tests: `aoe serve` (or vblade) in one namespace on a bridge, and
/// `nclients` client namespaces each with a veth to the bridge and a raw AoE socket. The
/// target serves `file` with `args` before its positional arguments.
pub struct RawLan {
    pub target: Option<NsChild>,
    pub socks: Vec<aoe_sys::PacketSocket>,
    pub macs: Vec<aoe_wire::MacAddr>,
    pub target_mac: aoe_wire::MacAddr,
    pub file: PathBuf,
    pub bridge: aoe_testkit::Bridge,
    pub veths: Vec<VethPair>,
    pub clients: Vec<Netns>,
    pub target_ns: Netns,
    pub next_tag: u32,
}

impl RawLan {
    pub fn start(kind: Target, file: &Path, args: &[&str], nclients: usize) -> RawLan {
        require_tools();
        let target_ns = Netns::new("aoelt").expect("target namespace");
        let bridge = aoe_testkit::Bridge::new(&target_ns).expect("bridge");
        let mut clients = Vec::new();
        let mut veths = Vec::new();
        let mut socks = Vec::new();
        let mut macs = Vec::new();
        for _ in 0..nclients {
            let ns = Netns::new("aoelc").expect("client namespace");
            let v = VethPair::new(&target_ns, &ns, 1500).expect("veth");
            bridge.add_port(v.a_name()).expect("bridge port");
            let s = raw_socket(&ns, v.b_name());
            s.set_recv_buffer(8 << 20).expect("rcvbuf");
            macs.push(aoe_wire::MacAddr(v.b_mac()));
            socks.push(s);
            veths.push(v);
            clients.push(ns);
        }
        let target_mac = aoe_wire::MacAddr(
            aoe_testkit::parse_mac(
                target_ns
                    .ip(&["-o", "link", "show", "dev", bridge.name()])
                    .expect("ip link")
                    .split_whitespace()
                    .skip_while(|w| *w != "link/ether")
                    .nth(1)
                    .expect("bridge MAC"),
            )
            .expect("bridge MAC"),
        );
        // "{mac0}" in `args` stands for client 0's MAC (for -m).
        let extra: Vec<String> = args
            .iter()
            .map(|a| a.replace("{mac0}", &macs[0].to_string()))
            .collect();
        let mut t = target_ns
            .spawn(kind.command(bridge.name(), file, &extra))
            .expect("start target");
        let bound = wait_until(Duration::from_secs(10), || {
            packet_sockets(&target_ns) > 0 || !t.is_running()
        });
        assert!(
            bound && t.is_running(),
            "target did not start:\n{}",
            t.output_so_far()
        );
        let mut lan = RawLan {
            target: Some(t),
            socks,
            macs,
            target_mac,
            file: file.to_owned(),
            bridge,
            veths,
            clients,
            target_ns,
            next_tag: 0x5000_0000,
        };
        // Bridge ports forward at once (no STP), but the target may still be starting: wait
        // for it to answer a Query Config from client 0.
        let up = wait_until(Duration::from_secs(10), || {
            lan.request(0, Self::query(), Duration::from_millis(300))
                .is_some()
        });
        assert!(up, "target never answered:{}", lan.logs());
        // Drop the start-up announcements and the answers above.
        for s in &lan.socks {
            drain_frames(s, Duration::from_millis(50));
        }
        lan
    }

    pub fn query() -> aoe_wire::Body<'static> {
        aoe_wire::Body::Config(aoe_wire::ConfigRepr::request(
            aoe_wire::ConfigCommand::Read,
            b"",
        ))
    }

    pub fn ata(cmd: u8, write: bool, lba: u64, count: u8, data: &[u8]) -> aoe_wire::Body<'_> {
        let mut aflags = aoe_wire::AtaFlags::EXTENDED;
        if write {
            aflags |= aoe_wire::AtaFlags::WRITE;
        }
        aoe_wire::Body::Ata(aoe_wire::AtaRepr {
            aflags,
            err_feature: 0,
            sector_count: count,
            cmd_status: cmd,
            lba,
            data,
        })
    }

    /// The frame client `c` sends for `body` to the target's MAC (broadcast for Query
    /// Config), shelf.slot SHELF.SLOT, with a fresh tag.
    pub fn frame(&mut self, c: usize, body: aoe_wire::Body<'_>) -> (aoe_wire::Tag, Vec<u8>) {
        use aoe_wire::{Body, Command as C, HeaderRepr, MacAddr, Message, Tag, TargetAddr};
        let (command, dst) = match &body {
            Body::Ata(_) => (C::Ata, self.target_mac),
            Body::Config(_) => (C::QueryConfig, MacAddr::BROADCAST),
            Body::MacMask(_) => (C::MacMaskList, self.target_mac),
            Body::Reserve(_) => (C::ReserveRelease, self.target_mac),
            Body::Unknown(_) => (C::Unknown(0xf0), self.target_mac),
        };
        self.next_tag += 1;
        let tag = Tag(self.next_tag);
        let h = HeaderRepr::request(
            dst,
            self.macs[c],
            TargetAddr::new(SHELF, SLOT),
            command,
            tag,
        );
        (tag, Message { header: h, body }.to_vec().expect("emit"))
    }

    /// Sends raw `frame` from client `c` and returns the first response carrying `tag`
    /// within `wait`.
    pub fn send_raw(&self, c: usize, frame: &[u8], tag: u32, wait: Duration) -> Option<Vec<u8>> {
        self.socks[c].send(frame).expect("send");
        self.wait_tag(c, tag, wait)
    }

    /// The first response with `tag` arriving at client `c` within `wait`.
    pub fn wait_tag(&self, c: usize, tag: u32, wait: Duration) -> Option<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 9100];
        loop {
            while let Some(meta) = self.socks[c].recv(&mut buf).expect("recv") {
                let f = &buf[..meta.len.min(buf.len())];
                if let Ok(m) = aoe_wire::Message::parse(f) {
                    if m.header.response && m.header.tag.0 == tag {
                        return Some(f.to_vec());
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let mut fds = [aoe_sys::PollFd::new(self.socks[c].as_raw_fd())];
            aoe_sys::poll(&mut fds, Some(deadline - now)).expect("poll");
        }
    }

    /// Sends `body` from client `c`; the response, if one came within `wait`.
    pub fn request(
        &mut self,
        c: usize,
        body: aoe_wire::Body<'_>,
        wait: Duration,
    ) -> Option<Vec<u8>> {
        let (tag, f) = self.frame(c, body);
        self.send_raw(c, &f, tag.0, wait)
    }

    pub fn logs(&self) -> String {
        self.target
            .as_ref()
            .map(|t| format!("\n--- target:\n{}", t.output_so_far()))
            .unwrap_or_default()
    }

    /// True while the target process runs.
    pub fn target_alive(&mut self) -> bool {
        self.target.as_mut().is_some_and(NsChild::is_running)
    }
}

/// The frames and receive batches `aoe serve` logs at its stop ("received F frames in B receive
/// batches"; scripts/bench/target-cpu.sh reads frames per batch from it), from the
/// target's `log`; panics, showing the log, when the line is not there.
pub fn frames_and_batches_at_stop(log: &str) -> (u64, u64) {
    let counts = log.lines().find_map(|l| {
        let rest = l.split("received ").nth(1)?;
        let mut w = rest.split_whitespace();
        let frames: u64 = w.next()?.parse().ok()?;
        let batches: u64 = w.nth(2)?.parse().ok()?;
        Some((frames, batches))
    });
    let Some(counts) = counts else {
        panic!("no frames and batches at the stop in the log:\n{log}")
    };
    counts
}

/// Stops target `t`, whose requests came in held bursts (`while_stopped`,
/// `AoeClient::send_burst`), and checks from its own count of frames and receive batches at
/// the stop ([`frames_and_batches_at_stop`]) that the bursts came in as batches, at least
/// `per_batch` frames a batch on average, queries and all: without them a test of what a
/// batch does tried nothing of it. `what` heads the failure message.
pub fn stop_batched(t: &mut NsChild, per_batch: u64, what: &str) {
    let st = t.stop().unwrap();
    let log = t.output_so_far();
    assert!(st.success(), "{what}: {st:?}\n{log}");
    let (frames, batches) = frames_and_batches_at_stop(&log);
    eprintln!("{what}: {frames} frames in {batches} receive batches");
    assert!(
        frames >= per_batch * batches,
        "{what}: {frames} frames in {batches} receive batches: the bursts were not taken in \
         together, the batch was not tried:\n{log}"
    );
}

/// AoE error and ATA status of a response frame.
pub fn rsp_status(frame: &[u8]) -> (Option<aoe_wire::ErrorCode>, Option<u8>) {
    let m = aoe_wire::Message::parse(frame).expect("parse response");
    let st = match m.body {
        aoe_wire::Body::Ata(a) => Some(a.cmd_status),
        _ => None,
    };
    (m.header.error, st)
}

// ------------------------------------------------------------------------------------------
// Structure (issue 10): helpers the initiator test files shared as copies

/// Makes ext4 on the loop device `lo` (`mkfs.ext4 -q -F -E nodiscard` plus `extra`, under a
/// 60 s timeout) and mounts it at `DIR/mnt`, which the rig unmounts when dropped.
pub fn mkfs_and_mount(rig: &mut Rig, lo: &str, extra: &[&str]) -> PathBuf {
    run_ok(
        Command::new("timeout")
            .args(["-k", "5", "60", "mkfs.ext4", "-q", "-F", "-E", "nodiscard"])
            .args(extra)
            .arg(lo),
    );
    let mnt = rig.dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    run_ok(Command::new("mount").arg(lo).arg(&mnt));
    rig.mounts.push(mnt.clone());
    mnt
}

// ------------------------------------------------------------------------------------------
// Ceph RBD exports (issue 13): a throwaway cluster inside the target's namespace, and the
// rig around an `rbd:` export

/// A one-node Ceph cluster that scripts/ceph-up.sh started on the loopback of `ns` (so
/// `aoe serve` in that namespace reaches it at 127.0.0.1, and nothing leaves the namespace);
/// stopped by scripts/ceph-down.sh on drop.
pub struct Ceph {
    pub dir: PathBuf,
    ns_path: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Ceph {
    fn script(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../scripts")
            .join(name)
    }

    /// Starts the cluster in `ns`: about 15-30 s; panics with its logs if it does not come up.
    pub fn start(ns: &Netns) -> Ceph {
        aoe_testkit::require_tools(&[
            ("ceph-mon", "ceph-mon"),
            ("ceph-mgr", "ceph-mgr"),
            ("ceph-osd", "ceph-osd"),
            ("rbd", "ceph-common"),
            ("uuidgen", "uuid-runtime"),
        ]);
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("ceph");
        let out = run(ns
            .command("timeout")
            .args(["-k", "5", "300", "bash"])
            .arg(Self::script("ceph-up.sh"))
            .arg(&dir));
        assert!(
            out.status.success(),
            "ceph-up.sh failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ceph {
            dir,
            ns_path: ns.path(),
            _tmp: tmp,
        }
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.join("ceph.conf")
    }

    pub fn keyring(&self) -> PathBuf {
        self.dir.join("ceph.client.admin.keyring")
    }

    /// A Ceph command line tool (`rbd`, `ceph`) run in the cluster's namespace with its
    /// config, under `timeout`.
    pub fn tool(&self, tool: &str, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.ns_path.display()))
            .args(["--", "timeout", "-k", "5", "120", tool, "-c"])
            .arg(self.conf())
            .args(args);
        c
    }

    /// Runs a tool and returns its stdout; panics with its output if it fails.
    pub fn ok(&self, tool: &str, args: &[&str]) -> String {
        run_ok(&mut self.tool(tool, args))
    }

    /// `rbd config LEVEL OP TARGET [OPTION [VALUE]]` (a pool's or an image's librbd
    /// overrides); panics with its output if it fails.
    pub fn rbd_config(&self, args: &[&str]) -> String {
        self.ok("rbd", &[&["config"], args].concat())
    }

    /// The `aoe serve` options that reach this cluster as client.admin.
    pub fn serve_args(&self) -> Vec<String> {
        vec![
            "--ceph-conf".into(),
            self.conf().display().to_string(),
            "--client-id".into(),
            "admin".into(),
            "--keyring".into(),
            self.keyring().display().to_string(),
        ]
    }

    /// The image's contents as `rbd export` sees them.
    pub fn export(&self, image: &str) -> Vec<u8> {
        let out = self.dir.join("export.img");
        let _ = fs::remove_file(&out);
        self.ok("rbd", &["export", image, &out.display().to_string()]);
        let data = fs::read(&out).expect("read rbd export");
        let _ = fs::remove_file(&out);
        data
    }

    pub fn stop(&mut self) {
        let _ = run(Command::new("timeout")
            .args(["-k", "5", "60", "bash"])
            .arg(Self::script("ceph-down.sh"))
            .arg(&self.dir));
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A [`Rig`] whose target is `aoe serve` exporting the RBD image `image` (created by the
/// caller through `prepare`, which runs once the cluster is up and before the target
/// starts) of a cluster in the target's namespace. The rig drops first: it stops initiator
/// and target, then its namespaces go (which kills the cluster's daemons), then ceph-down.sh
/// removes the cluster's directory.
pub struct RbdRig {
    pub rig: Rig,
    pub ceph: Ceph,
}

impl RbdRig {
    pub fn start(image: &str, prepare: impl FnOnce(&Ceph)) -> RbdRig {
        RbdRig::start_with(image, InitOpts::default(), prepare)
    }

    /// [`RbdRig::start`] with the initiator started with `opts` (e.g. a short `--deadsecs`
    /// for a test whose gateway falls silent with no other to take over).
    pub fn start_with(image: &str, opts: InitOpts, prepare: impl FnOnce(&Ceph)) -> RbdRig {
        require_tools();
        let target_ns = Netns::new("aoeit").expect("target namespace");
        let init_ns = Netns::new("aoeii").expect("initiator namespace");
        let veth = VethPair::new(&target_ns, &init_ns, 1500).expect("veth pair");
        let ceph = Ceph::start(&target_ns);
        prepare(&ceph);
        let (dir, _, root) = backing_and_root('c', Some(PathBuf::from(format!("rbd:{image}"))));
        let target_if = veth.a_name().to_owned();
        let mut rig = Rig::assemble(
            Target::AoeServe,
            ceph.serve_args(),
            (dir, PathBuf::from(format!("rbd:{image}")), root),
            (veth, target_ns, init_ns),
            target_if,
        );
        rig.start_target();
        rig.launch_initiator(&opts.args());
        let up = wait_until(Duration::from_secs(20), || {
            rig.state().as_deref() == Some("up")
        });
        assert!(up, "{DEV} did not come up: {}", rig.logs());
        RbdRig { rig, ceph }
    }
}

// ------------------------------------------------------------------------------------------
// Deduplication (issue 10): helpers this session's test files had each written twice

/// Little xorshift (Marsaglia's 13/7/17 triple); each test seeds it per case so a failure
/// replays. hostile_frames.rs and floods.rs draw from it.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A DOS partition table (boot sector) with Linux partitions (type 0x83) at
/// (LBA start, sectors), the two 32-bit fields of an MBR partition entry.
pub fn mbr(parts: &[(u32, u32)]) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    for (i, &(start, sectors)) in parts.iter().enumerate() {
        let e = &mut b[446 + 16 * i..446 + 16 * (i + 1)];
        // status, CHS first (unused: 0xfeffff), type 0x83, CHS last, LBA start, sectors
        e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[4] = 0x83;
        e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&sectors.to_le_bytes());
    }
    b[510] = 0x55;
    b[511] = 0xaa;
    b
}

/// Slows `ifname` in `ns` to 16 kbit/s with a tbf qdisc whose queue never drops
/// (`op` "add"), or removes it again (`op` "del"): frames wait in the queue holding their
/// socket's send buffer until send() says EAGAIN. The bucket holds one jumbo frame (tbf
/// drops a frame larger than its burst). Tests that need the send buffer full run at MTU
/// 9000: the initiator's first window of 8 KiB writes (about 64 frames) outgrows the
/// default 208 KiB send buffer by itself, where 1 KiB frames needed retransmissions of
/// the whole window on top, which the engine no longer sends (one copy per silent timeout).
pub fn tbf_slow_link(ns: &Netns, ifname: &str, op: &str) {
    let mut args = vec!["qdisc", op, "dev", ifname, "root"];
    if op == "add" {
        args.extend([
            "tbf",
            "rate",
            "16kbit",
            "burst",
            "10000",
            "limit",
            "100000000",
        ]);
    }
    ns.run("tc", &args)
        .unwrap_or_else(|e| panic!("tc {args:?} (Debian package iproute2): {e}"));
}

/// The MAC of bridge `name` in `ns`, as `ip -o link show` reports it (a bridge's MAC
/// follows its lowest port MAC, so ask once every port is in).
pub fn bridge_mac(ns: &Netns, name: &str) -> [u8; 6] {
    aoe_testkit::parse_mac(
        ns.ip(&["-o", "link", "show", "dev", name])
            .expect("ip link")
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .expect("bridge MAC"),
    )
    .expect("bridge MAC")
}

/// JSON of `aoe target --socket SOCK --json WHAT` (`status`, `stats`) from a running
/// `aoe serve`'s control socket.
pub fn target_json(sock: &Path, what: &str) -> serde_json::Value {
    let out = Command::new("timeout")
        .args(["-k", "5", "60", AOE, "target", "--socket"])
        .arg(sock)
        .args(["--json", what])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `GET /metrics` on 127.0.0.1:`port` from inside `ns` (a daemon's `--metrics` listener):
/// the response's head and body.
pub fn get_metrics(ns: &Netns, port: u16) -> (String, String) {
    get_metrics_accepting(ns, port, None)
}

/// [`get_metrics`] with an `Accept` header, when `accept` is given (the endpoints choose
/// OpenMetrics or the Prometheus text format 0.0.4 by it).
pub fn get_metrics_accepting(ns: &Netns, port: u16, accept: Option<&str>) -> (String, String) {
    use std::io::{Read, Write};
    let mut conn = aoe_sys::run_in_netns(&ns.path(), || {
        std::net::TcpStream::connect(("127.0.0.1", port))
    })
    .expect("enter netns")
    .expect("connect to the metrics port");
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    conn.write_all(format!("GET /metrics HTTP/1.1\r\nHost: localhost\r\n{accept}\r\n").as_bytes())
        .unwrap();
    let mut resp = String::new();
    conn.read_to_string(&mut resp).expect("read the response");
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP header and body");
    (head.to_owned(), body.to_owned())
}
