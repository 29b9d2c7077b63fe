//! `aoe demo`: the main job, end to end, on a machine of its own making.
//!
//! Two network namespaces joined by a veth pair (created inside the namespaces, so nothing
//! ever appears on the host's interfaces), a sparse image exported by `aoe serve` in one,
//! `aoe initiator --loop` in the other, `aoe discover`, `aoe stat`, then an ext4 file system
//! made on the device, mounted, written, checked with `fsck.ext4`, and read back, both
//! through the device and straight from the target's image. Everything it made is removed
//! when it ends: on success, on failure and on SIGINT/SIGTERM (Ctrl-C).
//!
//! The children run in their own process groups, so a Ctrl-C on the terminal reaches only
//! the demo, which then undoes its steps in order: the file system is unmounted before the
//! initiator is asked to stop (the initiator, like the kernel driver, refuses to stop while
//! a device is in use).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

/// Run the whole AoE job on a private link: target, initiator, discovery, aoe-stat, an ext4
/// file system written and read back. Needs root; removes everything it made, also on Ctrl-C.
#[derive(Debug, Args)]
#[command(
    after_help = "What it makes (all removed at the end): network namespaces aoedemo-PID-t and \
aoedemo-PID-i\njoined by a veth pair, a work directory under $TMPDIR, the initiator's ROOT \
/run/aoedemo-PID.\nMissing tools (mkfs.ext4, fsck.ext4, debugfs, fusermount3, ip, nsenter, \
losetup) are installed\nwith apt-get, never upgrading or downgrading anything already installed."
)]
pub struct DemoArgs {
    /// Size of the sparse image exported, in MiB.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    size: u64,
    /// Data written through the file system and read back, in MiB.
    #[arg(long, default_value_t = 16, value_name = "MIB")]
    write: u64,
    /// MTU of the veth pair.
    #[arg(long, default_value_t = 1500, value_name = "BYTES")]
    mtu: u32,
    /// Do not install missing tools; fail naming the Debian package instead.
    #[arg(long)]
    no_install: bool,
}

const SHELF: u16 = 1;
const SLOT: u8 = 1;
const DEV: &str = "e1.1";

/// The tools the demo runs, with the Debian package of each.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("losetup", "mount"),
    ("mount", "mount"),
    ("mkfs.ext4", "e2fsprogs"),
    ("fsck.ext4", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("fusermount3", "fuse3"),
    ("blockdev", "util-linux"),
];

/// Runs `aoe demo`.
pub fn run(a: DemoArgs) -> Result<()> {
    if a.size < 8 || a.write == 0 || a.write + 4 > a.size {
        return Err(crate::tools::usage(format!(
            "--size {} --write {}: the image must be at least 8 MiB and 4 MiB larger than \
             what is written",
            a.size, a.write
        )));
    }
    if !is_root() {
        bail!("aoe demo must run as root (it makes network namespaces and mounts a file system)");
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    ensure_tools(!a.no_install)?;
    reap(&stop);
    let mut demo = Demo::new(stop);
    let result = demo.run(&a);
    if let Err(e) = &result {
        if !demo.interrupted() {
            demo.show_logs();
        }
        eprintln!("aoe demo: {e:#}");
    }
    say("== cleaning up: file system, loop device, initiator, target, namespaces, files");
    demo.cleanup();
    match result {
        Ok(()) => {
            say(&format!(
                "DEMO OK: ext4 on AoE device {DEV} written, checked and read back"
            ));
            Ok(())
        }
        Err(_) if demo.interrupted() => {
            eprintln!("aoe demo: interrupted; everything it made is removed");
            std::process::exit(130)
        }
        Err(_) => std::process::exit(1),
    }
}

/// Effective uid 0, from `/proc/self/status` (no `unsafe` in this crate for `geteuid`).
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn have(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).any(|d| d.join(tool).is_file())
}

/// Installs the packages of missing tools, quietly, only when one is missing, and with
/// `--no-upgrade` so that nothing already installed changes version (the old demo script
/// downgraded an installed qemu-utils).
fn ensure_tools(install: bool) -> Result<()> {
    let mut need: Vec<&str> = TOOLS
        .iter()
        .filter(|(t, _)| !have(t))
        .map(|(_, p)| *p)
        .collect();
    need.sort_unstable();
    need.dedup();
    if need.is_empty() {
        return Ok(());
    }
    if !install {
        bail!(
            "missing tools; install the Debian packages {}",
            need.join(" ")
        );
    }
    say(&format!("== installing {}", need.join(" ")));
    let apt = |args: &[&str]| -> Result<()> {
        let out = Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=600", "-y", "-qq"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .context("cannot run apt-get")?;
        if !out.status.success() {
            bail!(
                "apt-get {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    let lists = fs::read_dir("/var/lib/apt/lists")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with("_Packages"))
        })
        .unwrap_or(false);
    if !lists {
        apt(&["update"])?;
    }
    let mut args = vec!["install", "--no-install-recommends", "--no-upgrade"];
    args.extend(&need);
    apt(&args)?;
    let still: Vec<&str> = TOOLS
        .iter()
        .filter(|(t, _)| !have(t))
        .map(|(t, _)| *t)
        .collect();
    if !still.is_empty() {
        bail!("still missing after apt-get: {}", still.join(" "));
    }
    Ok(())
}

/// A progress line; a closed standard output is ignored (the demo goes on and removes what
/// it made, rather than panicking or dying with its namespaces and mounts left behind).
fn say(s: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{s}").and_then(|()| o.flush());
}

/// A child in its own process group (so a terminal's Ctrl-C reaches only the demo), with
/// its output in a log file.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
    }

    /// SIGTERM, then `then` after `grace`, then SIGKILL; waits for the exit.
    fn stop(&mut self, grace: Duration, then: &str) {
        if !self.running() {
            return;
        }
        self.signal("TERM");
        if wait_for(grace, || !self.running()) {
            return;
        }
        eprintln!(
            "aoe demo: {} still running after SIGTERM; SIG{then}",
            self.name
        );
        self.signal(then);
        if !wait_for(Duration::from_secs(5), || !self.running()) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn wait_for(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the demo made, so [`Demo::cleanup`] undoes exactly that.
struct Demo {
    stop: Arc<AtomicBool>,
    tag: String,
    ns_t: Option<String>,
    ns_i: Option<String>,
    if_t: String,
    if_i: String,
    work: Option<PathBuf>,
    root: PathBuf,
    root_made: bool,
    mnt: Option<PathBuf>,
    target: Option<Proc>,
    initiator: Option<Proc>,
}

impl Demo {
    fn new(stop: Arc<AtomicBool>) -> Demo {
        Demo::for_pid(stop, std::process::id())
    }

    /// The names a demo of process `pid` uses (its own, or a dead one's: [`reap`]).
    fn for_pid(stop: Arc<AtomicBool>, pid: u32) -> Demo {
        let tag = format!("aoedemo-{pid}");
        // Interface names: at most 15 characters, unique per demo.
        let n = pid % 1_000_000;
        Demo {
            stop,
            root: PathBuf::from(format!("/run/{tag}")),
            tag,
            ns_t: None,
            ns_i: None,
            if_t: format!("aoedemo{n}t"),
            if_i: format!("aoedemo{n}i"),
            work: None,
            root_made: false,
            mnt: None,
            target: None,
            initiator: None,
        }
    }

    fn interrupted(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn check_stop(&self) -> Result<()> {
        if self.interrupted() {
            bail!("interrupted");
        }
        Ok(())
    }

    /// Runs a command to completion, polling so that a signal stops it (SIGKILL) and the
    /// demo at once; fails with its stderr unless it exits 0. Returns its stdout.
    fn cmd(&self, cmd: &mut Command) -> Result<String> {
        self.check_stop()?;
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot run {what}"))?;
        let mut out_pipe = child.stdout.take().expect("piped");
        let mut err_pipe = child.stderr.take().expect("piped");
        let out_t = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out_pipe.read_to_string(&mut s);
            s
        });
        let err_t = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err_pipe.read_to_string(&mut s);
            s
        });
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if self.interrupted() {
                let _ = child.kill();
                let _ = child.wait();
                bail!("interrupted");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = out_t.join().unwrap_or_default();
        let err = err_t.join().unwrap_or_default();
        if !status.success() {
            bail!("{what}: {status}: {}", err.trim());
        }
        Ok(out)
    }

    /// `nsenter --net=/run/netns/NS PROGRAM`: only the network namespace changes (`ip netns
    /// exec` would also make a mount namespace, hiding the initiator's FUSE mount).
    fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(program);
        c
    }

    fn spawn(&self, name: &'static str, mut cmd: Command) -> Result<Proc> {
        self.check_stop()?;
        let log = self.work()?.join(format!("{name}.log"));
        let f = File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Proc { name, child, log })
    }

    fn work(&self) -> Result<&Path> {
        self.work.as_deref().context("no work directory")
    }

    fn run(&mut self, a: &DemoArgs) -> Result<()> {
        let aoe = std::env::current_exe().context("cannot find the aoe binary")?;
        let t_all = Instant::now();
        let stop = self.stop.clone();

        // Network: two namespaces and a veth pair made inside them.
        let (ns_t, ns_i) = (format!("{}-t", self.tag), format!("{}-i", self.tag));
        say(&format!(
            "== network: {ns_t}/{} <- veth, MTU {} -> {ns_i}/{} (the host's interfaces are not touched)",
            self.if_t, a.mtu, self.if_i
        ));
        self.cmd(Command::new("ip").args(["netns", "add", &ns_t]))?;
        self.ns_t = Some(ns_t.clone());
        self.cmd(Command::new("ip").args(["netns", "add", &ns_i]))?;
        self.ns_i = Some(ns_i.clone());
        let mtu = a.mtu.to_string();
        self.cmd(Command::new("ip").args([
            "-n", &ns_t, "link", "add", "name", &self.if_t, "mtu", &mtu, "type", "veth", "peer",
            "name", &self.if_i, "mtu", &mtu, "netns", &ns_i,
        ]))?;
        for (ns, ifname) in [(&ns_t, &self.if_t), (&ns_i, &self.if_i)] {
            self.cmd(Command::new("ip").args(["-n", ns, "link", "set", ifname, "up"]))?;
        }

        // The image: sparse, nothing written yet.
        let work = std::env::temp_dir().join(&self.tag);
        fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
        self.work = Some(work.clone());
        let img = work.join("disk.img");
        File::create(&img)
            .and_then(|f| f.set_len(a.size << 20))
            .with_context(|| format!("cannot create {}", img.display()))?;
        say(&format!(
            "== image: {} ({} MiB, sparse: {} KiB allocated)",
            img.display(),
            a.size,
            allocated_kib(&img)
        ));

        // The target.
        say(&format!(
            "== target: aoe serve {SHELF} {SLOT} {} {}",
            self.if_t,
            img.display()
        ));
        let mut c = Self::in_ns(&ns_t, &aoe);
        c.args(["serve", &SHELF.to_string(), &SLOT.to_string(), &self.if_t])
            .arg(&img);
        self.target = Some(self.spawn("target", c)?);
        let tlog = self
            .target
            .as_ref()
            .map(|p| p.log.clone())
            .unwrap_or_default();
        wait(
            &stop,
            Duration::from_secs(30),
            "the target did not start",
            || {
                fs::read_to_string(&tlog).is_ok_and(|s| s.contains("exporting"))
                    || self.target.as_mut().is_some_and(|p| !p.running())
            },
        )?;
        if !self.target.as_mut().is_some_and(Proc::running) {
            bail!("the target exited");
        }
        indent(&fs::read_to_string(&tlog).unwrap_or_default());

        // The initiator.
        fs::create_dir_all(&self.root)?;
        self.root_made = true;
        say(&format!(
            "== initiator: aoe initiator --root {} --iflist {} --loop",
            self.root.display(),
            self.if_i
        ));
        let mut c = Self::in_ns(&ns_i, &aoe);
        c.arg("initiator")
            .arg("--root")
            .arg(&self.root)
            .args(["--iflist", &self.if_i, "--loop"]);
        self.initiator = Some(self.spawn("initiator", c)?);
        let discover = self.root.join("discover");
        wait(
            &stop,
            Duration::from_secs(30),
            "the initiator did not mount its ROOT",
            || discover.exists() || self.initiator.as_mut().is_some_and(|p| !p.running()),
        )?;
        if !self.initiator.as_mut().is_some_and(Proc::running) {
            bail!("the initiator exited");
        }

        // Discovery and aoe-stat.
        let root = self.root.to_string_lossy().into_owned();
        say(&format!("== aoe discover --root {root}"));
        let t0 = Instant::now();
        self.cmd(Command::new(&aoe).args(["discover", "--root", &root]))?;
        let state = self.root.join(format!("sysfs/block/etherd!{DEV}/state"));
        wait(
            &stop,
            Duration::from_secs(30),
            "the device did not come up",
            || fs::read_to_string(&state).is_ok_and(|s| s.trim() == "up"),
        )?;
        let t_up = t0.elapsed();
        say(&format!("== aoe stat --root {root}   (aoe-stat)"));
        indent(&self.cmd(Command::new(&aoe).args(["stat", "--root", &root]))?);
        let dev = self.root.join(DEV);
        let mut lo = String::new();
        wait(
            &stop,
            Duration::from_secs(30),
            "no loop device over the device",
            || {
                lo = loop_over(&dev).unwrap_or_default();
                !lo.is_empty()
            },
        )?;
        say(&format!("   {} -> {lo}", dev.display()));

        // The file system.
        say(&format!("== mkfs.ext4 {lo}"));
        let t0 = Instant::now();
        self.cmd(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "aoedemo", &lo]))?;
        let t_mkfs = t0.elapsed();
        let mnt = work.join("mnt");
        fs::create_dir_all(&mnt)?;
        let mnt_s = mnt.to_string_lossy().into_owned();
        self.cmd(Command::new("mount").args([&lo, &mnt_s]))?;
        self.mnt = Some(mnt.clone());
        let bytes = a.write << 20;
        say(&format!(
            "== write: {} MiB to {mnt_s}/demo.bin, then sync",
            a.write
        ));
        let t0 = Instant::now();
        {
            let mut f = File::create(mnt.join("demo.bin"))?;
            let mut off = 0u64;
            while off < bytes {
                self.check_stop()?;
                f.write_all(&pattern(off, 1 << 20))?;
                off += 1 << 20;
            }
            f.sync_all()?;
        }
        fs::write(mnt.join("hello.txt"), "hello over ATA over Ethernet\n")?;
        self.cmd(Command::new("sync").arg("-f").arg(&mnt))?;
        let t_write = t0.elapsed();
        self.cmd(Command::new("umount").arg(&mnt))?;
        self.mnt = None;

        say(&format!("== fsck.ext4 -f -n {lo}   (through the device)"));
        let t0 = Instant::now();
        indent(&self.cmd(Command::new("fsck.ext4").args(["-f", "-n", &lo]))?);
        let t_fsck = t0.elapsed();

        say("== read back: caches dropped, mount again, compare every byte");
        // Clean pages of the device file and the loop device's buffers go, so the data
        // comes over the link again (`dd iflag=nocache count=0` drops a file's cache).
        let dev_s = dev.to_string_lossy().into_owned();
        self.cmd(Command::new("dd").args([
            &format!("if={dev_s}"),
            "iflag=nocache",
            "count=0",
            "status=none",
        ]))?;
        self.cmd(Command::new("blockdev").args(["--flushbufs", &lo]))?;
        self.cmd(Command::new("mount").args(["-o", "ro", &lo, &mnt_s]))?;
        self.mnt = Some(mnt.clone());
        let t0 = Instant::now();
        compare(&mnt.join("demo.bin"), bytes, &self.stop)?;
        let t_read = t0.elapsed();
        self.cmd(Command::new("umount").arg(&mnt))?;
        self.mnt = None;

        say("== on the target's side: the image holds the same file (debugfs, no AoE)");
        let dumped = work.join("dumped.bin");
        let req = format!("dump /demo.bin {}", dumped.display());
        self.cmd(Command::new("debugfs").arg("-R").arg(&req).arg(&img))?;
        compare(&dumped, bytes, &self.stop)?;
        fs::remove_file(&dumped)?;
        indent(
            &self.cmd(
                Command::new("debugfs")
                    .args(["-R", "cat /hello.txt"])
                    .arg(&img),
            )?,
        );

        let mib = a.write as f64;
        say("== figures");
        say(&format!(
            "   discovery to up     {:>8.2} s",
            t_up.as_secs_f64()
        ));
        say(&format!(
            "   mkfs.ext4           {:>8.2} s",
            t_mkfs.as_secs_f64()
        ));
        say(&format!(
            "   write + sync        {:>8.1} MB/s ({} MiB in {:.2} s)",
            mib * 1.048576 / t_write.as_secs_f64(),
            a.write,
            t_write.as_secs_f64()
        ));
        say(&format!(
            "   fsck.ext4 -f        {:>8.2} s",
            t_fsck.as_secs_f64()
        ));
        say(&format!(
            "   read back           {:>8.1} MB/s ({} MiB in {:.2} s)",
            mib * 1.048576 / t_read.as_secs_f64(),
            a.write,
            t_read.as_secs_f64()
        ));
        say(&format!(
            "   image               {} MiB, {} KiB allocated",
            a.size,
            allocated_kib(&img)
        ));
        say(&format!(
            "   whole demo          {:>8.2} s",
            t_all.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    fn show_logs(&self) {
        for p in [&self.target, &self.initiator].into_iter().flatten() {
            let s = fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = s.lines().collect();
            eprintln!("--- {} log (last lines):", p.name);
            for l in &lines[lines.len().saturating_sub(20)..] {
                eprintln!("   {l}");
            }
        }
    }

    /// Undoes what was made, in reverse order; every step is tried whatever failed before.
    fn cleanup(&mut self) {
        let quiet = |c: &mut Command| {
            let _ = c
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        if let Some(m) = self.mnt.take() {
            quiet(Command::new("umount").arg(&m));
            if is_mounted(&m) {
                quiet(Command::new("umount").arg("-l").arg(&m));
            }
        }
        if let Some(lo) = loop_over(&self.root.join(DEV)) {
            quiet(Command::new("losetup").args(["-d", &lo]));
        }
        // SIGTERM stops the initiator once no device is in use; SIGQUIT then stops it anyway.
        if let Some(mut p) = self.initiator.take() {
            p.stop(Duration::from_secs(30), "QUIT");
        }
        // A dead demo's initiator is no child of ours: SIGQUIT stops it, device in use or not.
        if let Some(ns) = &self.ns_i {
            stop_ns_processes(ns, "QUIT");
        }
        if self.root_made {
            if is_mounted(&self.root) {
                quiet(
                    Command::new("fusermount3")
                        .arg("-u")
                        .arg("-z")
                        .arg(&self.root),
                );
            }
            let _ = fs::remove_dir(&self.root);
        }
        if let Some(mut p) = self.target.take() {
            p.stop(Duration::from_secs(10), "KILL");
        }
        if let Some(ns) = &self.ns_t {
            stop_ns_processes(ns, "TERM");
        }
        for ns in [self.ns_i.take(), self.ns_t.take()].into_iter().flatten() {
            // Deleting a namespace deletes the veth end in it, and with it the pair.
            quiet(Command::new("ip").args(["netns", "del", &ns]));
        }
        if let Some(w) = self.work.take() {
            let _ = fs::remove_dir_all(&w);
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Removes what demos that are no longer running left behind: one killed by SIGKILL or the
/// OOM killer never ran its cleanup, and its namespaces, mounts, loop device, target and
/// initiator would stay for good. A demo is known by its namespaces (`aoedemo-PID-t`,
/// `-i`); one whose process still runs `aoe demo` is left alone.
fn reap(stop: &Arc<AtomicBool>) {
    let mut dead: Vec<u32> = fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix("aoedemo-")?;
            let pid = rest
                .strip_suffix("-t")
                .or_else(|| rest.strip_suffix("-i"))?;
            pid.parse::<u32>().ok()
        })
        .filter(|&pid| pid != std::process::id() && !is_demo(pid))
        .collect();
    dead.sort_unstable();
    dead.dedup();
    for pid in dead {
        say(&format!(
            "== removing what demo {pid} left (it is no longer running; killed?)"
        ));
        let mut d = Demo::for_pid(stop.clone(), pid);
        for (ns, slot) in [("t", &mut d.ns_t), ("i", &mut d.ns_i)] {
            let name = format!("{}-{ns}", d.tag);
            if Path::new("/run/netns").join(&name).exists() {
                *slot = Some(name);
            }
        }
        let work = std::env::temp_dir().join(&d.tag);
        if work.is_dir() {
            if is_mounted(&work.join("mnt")) {
                d.mnt = Some(work.join("mnt"));
            }
            d.work = Some(work);
        }
        d.root_made = d.root.is_dir();
        d.cleanup();
    }
}

/// Whether process `pid` runs `aoe demo` (by any name of the binary).
fn is_demo(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|b| *b == 0).nth(1) == Some(b"demo".as_slice()))
        .unwrap_or(false)
}

/// Signals every process in network namespace `ns` with `sig`, then SIGKILL to those still
/// there after 10 s; waits (up to 5 s more) for them to go.
fn stop_ns_processes(ns: &str, sig: &str) {
    let pids = || -> Vec<String> {
        Command::new("ip")
            .args(["netns", "pids", ns])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let kill = |sig: &str, pids: &[String]| {
        if pids.is_empty() {
            return;
        }
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .args(pids)
            .stderr(Stdio::null())
            .status();
    };
    kill(sig, &pids());
    if !wait_for(Duration::from_secs(10), || pids().is_empty()) {
        kill("KILL", &pids());
        wait_for(Duration::from_secs(5), || pids().is_empty());
    }
}

/// Waits up to `within` for `f`, failing with `what` (and at once on a signal).
fn wait(
    stop: &AtomicBool,
    within: Duration,
    what: &str,
    mut f: impl FnMut() -> bool,
) -> Result<()> {
    let end = Instant::now() + within;
    loop {
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        if f() {
            return Ok(());
        }
        if Instant::now() >= end {
            bail!("{what}: not within {} s", within.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn indent(s: &str) {
    for l in s.lines() {
        say(&format!("   {l}"));
    }
}

/// The loop device whose backing file is `file`, from `losetup -l`.
fn loop_over(file: &Path) -> Option<String> {
    let out = Command::new("losetup")
        .args(["-n", "-l", "-O", "NAME,BACK-FILE"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let want = file.to_string_lossy();
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let (name, back) = l.trim().split_once(char::is_whitespace)?;
        (back.trim() == want).then(|| name.to_owned())
    })
}

/// Whether `path` is a mount point (field 5 of /proc/self/mountinfo).
fn is_mounted(path: &Path) -> bool {
    let p = path.to_string_lossy();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*p))
}

fn allocated_kib(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).map(|m| m.blocks() / 2).unwrap_or(0)
}

/// Deterministic bytes for offset `off` onward (xorshift64 per 8-byte word, seeded by the
/// word's offset), so the read-back check needs no copy of what was written.
fn pattern(off: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut w = off / 8;
    while v.len() < len {
        let mut x = w.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
        w += 1;
    }
    v.truncate(len);
    v
}

/// Reads `path` and compares it with [`pattern`] over `len` bytes; names the first wrong MiB.
fn compare(path: &Path, len: u64, stop: &AtomicBool) -> Result<()> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = f.metadata()?.len();
    if size != len {
        bail!("{}: {size} bytes, {len} written", path.display());
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        f.read_exact(&mut buf)
            .with_context(|| format!("{}: read at {off}", path.display()))?;
        if buf != pattern(off, buf.len()) {
            bail!(
                "{}: the MiB at offset {off} differs from what was written",
                path.display()
            );
        }
        off += buf.len() as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_the_same_in_pieces() {
        let whole = pattern(0, 3 << 20);
        assert_eq!(&whole[1 << 20..2 << 20], &pattern(1 << 20, 1 << 20)[..]);
        assert_ne!(&whole[..8], &whole[8..16]);
    }
}
