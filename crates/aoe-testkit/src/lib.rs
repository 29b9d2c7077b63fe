//! # aoe-testkit: network-namespace fixtures for integration tests
//!
//! The test-support layer. It builds throw-away network topologies with RAII guards, so a
//! test that sends real AoE frames never touches the host's own interfaces and leaves nothing
//! behind, even when it panics:
//!
//! * [`Netns`]: a named network namespace (`ip netns add`), loopback up, IPv6 off so that no
//!   router/neighbour solicitations show up next to the frames under test. Dropping it kills
//!   the processes still inside and deletes it.
//! * [`VethPair`]: a veth link between two namespaces (or inside one), both ends up, with a
//!   chosen MTU (1500, 9000 for jumbo frames, ...). Deleted on drop.
//! * [`Bridge`]: a Linux bridge inside a namespace, to join several hosts on one segment.
//! * [`NsChild`]: a process (daemon, `vblade`, `tshark`, ...) running inside a namespace, with
//!   its output captured to a temporary file; stopped with SIGTERM, then SIGKILL, on drop.
//! * [`require_root`] and [`wait_until`]: the two helpers every such test needs.
//! * [`run_script`]: runs an interop script under `tests/interop/` (which has its own hard
//!   timeout and cleanup) with its output captured, and a backstop kill if it hangs.
//! * [`fuseuring::FuseUring`]: `enable_uring` of the fuse module set for a test and restored.
//! * [`cgroup::Cgroup`]: a control group of the test's own (pids, memory, cpu limits), removed
//!   on drop.
//! * [`aoeclient`]: a raw AoE client on a veth end (tagged requests, a window, retransmits),
//!   for tests that must know exactly which request was acknowledged.
//!
//! How: everything shells out to `ip` (iproute2), `nsenter` (util-linux) and `sh`; this crate
//! has no `unsafe`. Only [`aoeclient`] uses `aoe-sys` (and `aoe-wire`); `aoe-sys` still uses
//! the rest in its tests (a dev-dependency cycle, which Cargo allows). Code that must run
//! *inside* a namespace in the test process itself calls `aoe_sys::run_in_netns(ns.path(), ..)`
//! (`setns(2)` on a helper thread).
//!
//! What it deliberately does not do: no traffic shaping or capture, no frame building beyond
//! [`aoeclient`]'s few requests; and it never creates anything in the host namespace: veth
//! pairs are created directly inside the test namespaces (`ip -n A link add ... peer ...
//! netns B`).
//!
//! Names are `PREFIX-PID-N`, so namespaces left behind by a test process that was killed
//! (and so could not run its destructors) are recognised by the next [`Netns::new`] with the
//! same prefix, which ends the processes still running in them (the orphaned `aoe serve`)
//! and removes them, see [`remove_stale_namespaces`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod aoeclient;
pub mod cgroup;
pub mod faultfs;
pub mod fuseuring;
pub mod killed;
pub mod relay;

use std::borrow::Borrow;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Counter that makes names unique within this process.
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

fn next_id() -> u32 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// True if the effective user id is 0, read from the `Uid:` line of `/proc/self/status`.
pub fn is_root() -> bool {
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        // Fields: real, effective, saved, filesystem.
        .and_then(|ids| ids.split_whitespace().nth(1))
        .is_some_and(|euid| euid == "0")
}

/// `PermissionDenied` naming what to do, unless running as root: for the helpers that need
/// it, so a test that unwraps their result says why it failed.
pub(crate) fn not_root_error() -> io::Result<()> {
    if is_root() {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        "needs root: run scripts/test.sh as root (network namespaces, veth pairs, FUSE mounts)",
    ))
}

/// Panics with a clear message unless running as root: namespace and veth tests cannot work
/// otherwise, and failing loudly beats a confusing `ip` error.
pub fn require_root() {
    assert!(
        is_root(),
        "needs root: run scripts/test.sh as root (network namespaces, veth pairs, FUSE mounts)"
    );
}

/// Where `tool` is on PATH (`command -v`), if it is.
pub fn tool_path(tool: &str) -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !path.is_empty()).then_some(path)
}

/// Fails (never skips) unless every `(tool, Debian package)` is on PATH, naming the package
/// to install (`scripts/install-deps.sh` installs everything the tests use).
pub fn require_tools(tools: &[(&str, &str)]) {
    for (tool, package) in tools {
        assert!(
            tool_path(tool).is_some(),
            "`{tool}` not found on PATH: install Debian package {package} \
             (scripts/install-deps.sh installs everything these tests use)"
        );
    }
}

/// Calls `f` every 10 ms until it returns true or `timeout` has passed. Returns whether it
/// did return true (it is always called at least once, and once more at the deadline).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}

/// What [`run_script`] saw: the script's exit status (`None`: it hung past its own timeout
/// and was killed), its whole output (stdout and stderr interleaved) and its run time.
#[derive(Debug)]
pub struct ScriptRun {
    /// The exit status; `None` if the script outlived `timeout` plus a minute.
    pub status: Option<ExitStatus>,
    /// stdout and stderr, in the order written.
    pub output: String,
    /// From the start to the exit (or the kill).
    pub took: Duration,
}

impl ScriptRun {
    /// Whether the script exited 0.
    pub fn passed(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// "exited with ..." or "hung past its own timeout", for a failure message.
    pub fn verdict(&self) -> String {
        match self.status {
            Some(s) => format!("script exited with {s}"),
            None => "script hung past its own timeout".into(),
        }
    }
}

/// Runs `bash script args...` (an interop script under `tests/interop/` that enforces its
/// own hard `timeout` and cleans up after itself) with its output captured. A backstop: a
/// minute after `timeout` it gets SIGTERM (so its trap still runs), 40 s later SIGKILL.
pub fn run_script(script: &Path, args: &[&str], timeout: Duration) -> ScriptRun {
    assert!(script.is_file(), "missing script {}", script.display());
    let log = tempfile::NamedTempFile::new().expect("temp file");
    let out = File::options()
        .append(true)
        .open(log.path())
        .expect("open log");
    let err = out.try_clone().expect("clone log");
    let started = Instant::now();
    let mut child = Command::new("bash")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("run bash");
    let deadline = started + timeout + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for script") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            // Its trap cleans up; SIGKILL only if it has not exited within 40 s.
            let grace = Instant::now() + Duration::from_secs(40);
            while Instant::now() < grace && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ScriptRun {
        status,
        output: fs::read_to_string(log.path()).unwrap_or_default(),
        took: started.elapsed(),
    }
}

/// Runs `cmd` to completion and returns its stdout; a failure to start or a non-zero exit is
/// an error that quotes the command and its stderr.
fn run(cmd: &mut Command) -> io::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sends `signal` (e.g. `"TERM"`) to `pid` through the shell's `kill` builtin (no `unsafe`
/// needed); errors (process already gone) are ignored.
fn signal(pid: u32, signal: &str) {
    let _ = Command::new("sh")
        .args(["-c", &format!("kill -{signal} {pid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// A network namespace created with `ip netns add`, deleted on drop.
///
/// It starts with only `lo`, which is brought up, and with IPv6 disabled
/// (`net.ipv6.conf.{all,default}.disable_ipv6 = 1`) so that interfaces added later send no
/// IPv6 chatter. Dropping it first kills (SIGKILL) every process still in it except the test
/// process itself, then runs `ip netns del`.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `PREFIX-PID-N`. First removes stale namespaces with the same
    /// prefix whose process has died (see [`remove_stale_namespaces`]).
    ///
    /// # Errors
    ///
    /// `InvalidInput` for an empty prefix or one containing `/` or whitespace; otherwise the
    /// failing command and its stderr (no `ip`, ...); `PermissionDenied` when not root.
    pub fn new(prefix: &str) -> io::Result<Netns> {
        check_prefix(prefix)?;
        not_root_error()?;
        let _ = remove_stale_namespaces(prefix);
        let name = format!("{prefix}-{}-{}", std::process::id(), next_id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        // From here on, dropping `ns` deletes the namespace if a later step fails.
        let ns = Netns { name };
        if Path::new("/proc/sys/net/ipv6").exists() {
            // /proc/sys/net shows the namespace of the process that opens it, here the shell
            // nsenter started inside the namespace.
            let mut cmd = ns.command("sh");
            cmd.args([
                "-c",
                "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && \
                 echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
            ]);
            run(&mut cmd)?;
        }
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as shown by `ip netns list`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, the bind mount that keeps the namespace alive; pass it to
    /// `aoe_sys::enter_netns` / `run_in_netns` or to `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// A [`Command`] that runs `program` inside the namespace:
    /// `nsenter --net=/run/netns/NAME -- program`. Add arguments with `.arg`/`.args`.
    ///
    /// `nsenter` is used rather than `ip netns exec`, which would also make a private mount
    /// namespace and remount `/sys`; only the network namespace changes here.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(self.net_arg()).arg("--").arg(program);
        cmd
    }

    /// Runs `ip -n NAME ARGS...` and returns its stdout; the error quotes the command and
    /// its stderr.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs `program ARGS...` inside the namespace to completion and returns its stdout; a
    /// non-zero exit is an error quoting stderr.
    pub fn run(&self, program: impl AsRef<OsStr>, args: &[&str]) -> io::Result<String> {
        run(self.command(program).args(args))
    }

    /// Starts `cmd` (a plain `Command`, by value or by reference) inside the namespace as an
    /// [`NsChild`]; same as [`NsChild::spawn`].
    pub fn spawn(&self, cmd: impl Borrow<Command>) -> io::Result<NsChild> {
        NsChild::spawn(self, cmd)
    }

    /// Process ids in the namespace (`ip netns pids NAME`).
    pub fn pids(&self) -> io::Result<Vec<u32>> {
        let out = run(Command::new("ip").args(["netns", "pids", &self.name]))?;
        Ok(out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    fn net_arg(&self) -> String {
        format!("--net={}", self.path().display())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let me = std::process::id();
        if let Ok(pids) = self.pids() {
            // Our own pid shows up if the main thread was moved into the namespace (tests
            // run on the main thread with --test-threads=1); never kill ourselves.
            for pid in pids.into_iter().filter(|&p| p != me) {
                signal(pid, "KILL");
            }
        }
        for attempt in 0..5 {
            if run(Command::new("ip").args(["netns", "del", &self.name])).is_ok() {
                return;
            }
            if !self.path().exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20 << attempt));
        }
        eprintln!(
            "aoe-testkit: could not delete network namespace {}",
            self.name
        );
    }
}

fn check_prefix(prefix: &str) -> io::Result<()> {
    if prefix.is_empty()
        || prefix.len() > 64
        || prefix.contains('/')
        || prefix.chars().any(char::is_whitespace)
    {
        return Err(invalid(format!(
            "namespace prefix {prefix:?} must be 1 to 64 characters without '/' or whitespace"
        )));
    }
    Ok(())
}

/// Parses `PREFIX-PID-N` and returns PID.
fn stale_candidate_pid(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('-')?;
    let (pid, n) = rest.split_once('-')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// How long [`remove_stale_namespaces`] gives the processes left in a stale namespace to exit
/// after SIGTERM before it sends SIGKILL (an `aoe serve` exits within milliseconds of SIGTERM).
const STALE_TERM_GRACE: Duration = Duration::from_secs(3);

/// True while `pid` runs: `/proc/PID` exists and its state is not `Z` (a zombie has exited;
/// an orphan's zombie is its new parent's to reap, not ours).
pub fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "PID (COMM) STATE ...": COMM may hold spaces or ')', so read after the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

/// Ends every process in the namespace `name` (`ip netns pids NAME`) but this one: SIGTERM,
/// up to [`STALE_TERM_GRACE`] for them to exit, then SIGKILL for the rest and up to 5 s more.
/// Returns the pids still running after that (e.g. stuck in uninterruptible sleep).
fn end_processes_in(name: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(out) = run(Command::new("ip").args(["netns", "pids", name])) else {
        return Vec::new();
    };
    let pids: Vec<u32> = out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|&p| p != me)
        .collect();
    for (sig, grace) in [("TERM", STALE_TERM_GRACE), ("KILL", Duration::from_secs(5))] {
        let alive: Vec<u32> = pids.iter().copied().filter(|&p| process_alive(p)).collect();
        if alive.is_empty() {
            break;
        }
        for &pid in &alive {
            signal(pid, sig);
        }
        wait_until(grace, || !alive.iter().any(|&p| process_alive(p)));
    }
    pids.into_iter().filter(|&p| process_alive(p)).collect()
}

/// Deletes namespaces named `PREFIX-PID-N` whose creating process `PID` no longer exists, and
/// returns their names. Such leftovers come from test processes killed before their
/// destructors ran (SIGKILL, a CI time-out). Namespaces of live processes are left alone.
///
/// The processes still inside a stale namespace (the `aoe serve` or initiator a killed test
/// had started, orphaned and still holding its files and the namespace) are ended first:
/// SIGTERM, then SIGKILL for those still running after a grace period, waiting on their exit.
/// `ip netns del` alone only removes the name; the namespace and its processes would live on.
pub fn remove_stale_namespaces(prefix: &str) -> io::Result<Vec<String>> {
    check_prefix(prefix)?;
    let listing = run(Command::new("ip").args(["netns", "list"]))?;
    let mut removed = Vec::new();
    // Lines look like "NAME" or "NAME (id: 3)".
    for name in listing.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = stale_candidate_pid(name, prefix) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let stuck = end_processes_in(name);
        if !stuck.is_empty() {
            eprintln!(
                "aoe-testkit: processes {stuck:?} in stale namespace {name} survived SIGKILL"
            );
        }
        if run(Command::new("ip").args(["netns", "del", name])).is_ok() {
            removed.push(name.to_owned());
        }
    }
    Ok(removed)
}

/// Names of the network namespaces that exist now (`ip netns list`).
pub fn list_namespaces() -> io::Result<Vec<String>> {
    let listing = run(Command::new("ip").args(["netns", "list"]))?;
    Ok(listing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// One end of a [`VethPair`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The end in the first namespace passed to [`VethPair::new`].
    A,
    /// The end in the second namespace.
    B,
}

/// A veth pair: end A in one namespace, end B in another (or the same), deleted on drop.
///
/// A frame sent on one end arrives on the other, like a cable between two hosts. The guard
/// stores namespace names rather than borrowing the [`Netns`] guards, so it can live in the
/// same struct; dropping it after its namespaces is harmless (deleting a namespace deletes
/// its veths).
#[derive(Debug)]
pub struct VethPair {
    a_ns: String,
    b_ns: String,
    a_name: String,
    b_name: String,
    a_mac: [u8; 6],
    b_mac: [u8; 6],
}

impl VethPair {
    /// Creates a pair with generated names (`vPID-Na` / `vPID-Nb`, at most 13 characters),
    /// sets `mtu` on both ends and brings them up.
    pub fn new(a: &Netns, b: &Netns, mtu: u32) -> io::Result<VethPair> {
        let n = next_id() % 100_000;
        let pid = std::process::id() % 100_000;
        let a_name = format!("v{pid}-{n}a");
        let b_name = format!("v{pid}-{n}b");
        Self::new_named(a, &a_name, b, &b_name, mtu)
    }

    /// Like [`new`](Self::new) with chosen interface names, e.g. `eth0` in each host
    /// namespace. Names must be 1 to 15 characters without `/`, `:` or whitespace, and unique
    /// within their namespace.
    pub fn new_named(
        a: &Netns,
        a_name: &str,
        b: &Netns,
        b_name: &str,
        mtu: u32,
    ) -> io::Result<VethPair> {
        check_ifname(a_name)?;
        check_ifname(b_name)?;
        // Created inside the namespaces directly; nothing ever appears in the host namespace.
        a.ip(&[
            "link", "add", "name", a_name, "type", "veth", "peer", "name", b_name, "netns", &b.name,
        ])?;
        let mut pair = VethPair {
            a_ns: a.name.clone(),
            b_ns: b.name.clone(),
            a_name: a_name.to_owned(),
            b_name: b_name.to_owned(),
            a_mac: [0; 6],
            b_mac: [0; 6],
        };
        pair.bring_up(mtu)?;
        Ok(pair)
    }

    /// The steps after the pair is made: the MTU of both ends, both ends up, and their MAC
    /// addresses read.
    fn bring_up(&mut self, mtu: u32) -> io::Result<()> {
        self.set_mtu(mtu)?;
        self.set_link(End::A, true)?;
        self.set_link(End::B, true)?;
        self.a_mac = self.mac(End::A)?;
        self.b_mac = self.mac(End::B)?;
        Ok(())
    }

    /// Interface name of end A (in the first namespace).
    pub fn a_name(&self) -> &str {
        &self.a_name
    }

    /// Interface name of end B (in the second namespace).
    pub fn b_name(&self) -> &str {
        &self.b_name
    }

    /// MAC address of end A, as read when the pair was created.
    pub fn a_mac(&self) -> [u8; 6] {
        self.a_mac
    }

    /// MAC address of end B, as read when the pair was created.
    pub fn b_mac(&self) -> [u8; 6] {
        self.b_mac
    }

    /// Name of the namespace holding `end`.
    pub fn ns_name(&self, end: End) -> &str {
        match end {
            End::A => &self.a_ns,
            End::B => &self.b_ns,
        }
    }

    /// Interface name of `end`.
    pub fn name(&self, end: End) -> &str {
        match end {
            End::A => &self.a_name,
            End::B => &self.b_name,
        }
    }

    /// Sets the MTU of both ends (`ip link set ... mtu`).
    pub fn set_mtu(&self, mtu: u32) -> io::Result<()> {
        for end in [End::A, End::B] {
            self.set_end_mtu(end, mtu)?;
        }
        Ok(())
    }

    /// Sets the MTU of one end only. The other end still sends larger frames; the kernel
    /// drops those on arrival, as a switch drops frames over a port's MTU.
    pub fn set_end_mtu(&self, end: End, mtu: u32) -> io::Result<()> {
        let mtu = mtu.to_string();
        self.ip(end, &["link", "set", "dev", self.name(end), "mtu", &mtu])
            .map(drop)
    }

    /// Brings `end` up or down. Taking one end down also takes the carrier of the other away
    /// (its state becomes `LOWERLAYERDOWN`), like pulling a cable.
    pub fn set_link(&self, end: End, up: bool) -> io::Result<()> {
        let state = if up { "up" } else { "down" };
        self.ip(end, &["link", "set", "dev", self.name(end), state])
            .map(drop)
    }

    /// Deletes the pair and creates it again with the same names, namespaces and MTU, both
    /// ends up: new interfaces with new indices and new (random) MAC addresses, as when a
    /// container runtime re-makes its veth pair or a USB NIC is plugged back. The ends'
    /// MACs ([`a_mac`](Self::a_mac), [`b_mac`](Self::b_mac)) are read again.
    pub fn recreate(&mut self) -> io::Result<()> {
        self.recreate_after(std::time::Duration::ZERO)
    }

    /// Like [`recreate`](Self::recreate), with `gap` between the deletion and the new pair
    /// (an unplugged NIC plugged back later).
    pub fn recreate_after(&mut self, gap: std::time::Duration) -> io::Result<()> {
        let mtu = self.mtu(End::A)?;
        self.ip(End::A, &["link", "del", "dev", &self.a_name])?;
        std::thread::sleep(gap);
        self.ip(
            End::A,
            &[
                "link",
                "add",
                "name",
                &self.a_name,
                "type",
                "veth",
                "peer",
                "name",
                &self.b_name,
                "netns",
                &self.b_ns,
            ],
        )?;
        self.bring_up(mtu)
    }

    /// Sets `end`'s MAC address (`ip link set DEV address MAC`, the link staying up) and
    /// reads it back into [`a_mac`](Self::a_mac) / [`b_mac`](Self::b_mac).
    pub fn set_mac(&mut self, end: End, mac: &str) -> io::Result<()> {
        let name = self.name(end).to_owned();
        self.ip(end, &["link", "set", "dev", &name, "address", mac])?;
        let got = self.mac(end)?;
        match end {
            End::A => self.a_mac = got,
            End::B => self.b_mac = got,
        }
        Ok(())
    }

    /// The current MTU of `end`, read with `ip -o link show`.
    pub fn mtu(&self, end: End) -> io::Result<u32> {
        let line = self.ip(end, &["-o", "link", "show", "dev", self.name(end)])?;
        field_after(&line, "mtu")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no mtu in `ip link` output: {line}")))
    }

    /// The current MAC address of `end`, read with `ip -o link show`.
    pub fn mac(&self, end: End) -> io::Result<[u8; 6]> {
        let line = self.ip(end, &["-o", "link", "show", "dev", self.name(end)])?;
        field_after(&line, "link/ether")
            .and_then(parse_mac)
            .ok_or_else(|| io::Error::other(format!("no MAC in `ip link` output: {line}")))
    }

    fn ip(&self, end: End, args: &[&str]) -> io::Result<String> {
        run(Command::new("ip")
            .args(["-n", self.ns_name(end)])
            .args(args))
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting one end deletes both. Fails harmlessly if the namespace is already gone.
        let _ = run(Command::new("ip")
            .args(["-n", &self.a_ns, "link", "del", "dev", &self.a_name])
            .stderr(Stdio::null()));
    }
}

/// A Linux bridge inside a namespace, acting as the switch of a test LAN: create one in a
/// "switch" namespace, connect each host namespace to it with a [`VethPair`], and
/// [`add_port`](Self::add_port) the switch-side ends. STP is off (the default), so ports
/// forward at once. Deleted on drop.
#[derive(Debug)]
pub struct Bridge {
    ns: String,
    name: String,
}

impl Bridge {
    /// Creates bridge `brN` in `ns` and brings it up. Its MTU follows the smallest port MTU.
    pub fn new(ns: &Netns) -> io::Result<Bridge> {
        let name = format!("br{}", next_id() % 1_000_000);
        ns.ip(&[
            "link",
            "add",
            "name",
            &name,
            "type",
            "bridge",
            "stp_state",
            "0",
        ])?;
        let bridge = Bridge {
            ns: ns.name.clone(),
            name,
        };
        bridge.ip(&["link", "set", "dev", &bridge.name, "up"])?;
        Ok(bridge)
    }

    /// The bridge's interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Enslaves `ifname` (an interface in the bridge's namespace) and brings it up.
    pub fn add_port(&self, ifname: &str) -> io::Result<()> {
        self.ip(&["link", "set", "dev", ifname, "master", &self.name, "up"])
            .map(drop)
    }

    fn ip(&self, args: &[&str]) -> io::Result<String> {
        run(Command::new("ip").args(["-n", &self.ns]).args(args))
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = run(Command::new("ip")
            .args(["-n", &self.ns, "link", "del", "dev", &self.name])
            .stderr(Stdio::null()));
    }
}

/// Bytes an interface in a namespace has sent (its `tx_bytes`), read through one `ip netns
/// exec` shell kept running, with its builtins only, so a reading costs a pipe's round trip
/// and not a process's start: what a target's veth sent (its read replies' data) between
/// two points of a test, counted instead of timed.
pub struct TxBytes {
    child: Child,
    out: io::BufReader<std::process::ChildStdout>,
}

impl TxBytes {
    /// Counts what `iface` in `ns` sends.
    pub fn new(ns: &Netns, iface: &str) -> TxBytes {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "sh", "-c"])
            .arg(format!(
                "while read _; do read v < /sys/class/net/{iface}/statistics/tx_bytes; \
                 echo $v; done"
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("ip netns exec");
        let out = io::BufReader::new(child.stdout.take().expect("piped stdout"));
        TxBytes { child, out }
    }

    /// The interface's `tx_bytes` now.
    pub fn get(&mut self) -> u64 {
        use std::io::{BufRead, Write};
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        stdin.write_all(b"\n").expect("ask tx_bytes");
        let mut l = String::new();
        self.out.read_line(&mut l).expect("read tx_bytes");
        l.trim().parse().expect("tx_bytes")
    }
}

impl Drop for TxBytes {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn check_ifname(name: &str) -> io::Result<()> {
    // Linux dev_valid_name: 1..IFNAMSIZ-1 bytes, not "." or "..", no '/', ':' or whitespace.
    if name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.chars().any(char::is_whitespace)
    {
        return Err(invalid(format!(
            "{name:?} is not a valid interface name (1 to 15 bytes, no '/', ':' or whitespace)"
        )));
    }
    Ok(())
}

/// The whitespace-separated word after `key` in `line`.
fn field_after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == key)?;
    words.next()
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A process running inside a [`Netns`], with stdout and stderr captured to a temporary file.
/// Dropping it [stops](Self::stop) the process.
#[derive(Debug)]
pub struct NsChild {
    child: Child,
    status: Option<ExitStatus>,
    output: tempfile::TempPath,
    label: String,
}

impl NsChild {
    /// Starts `cmd` inside `ns`: its program, arguments, environment changes and working
    /// directory are carried over to `nsenter --net=... -- program args...`. Stdin is
    /// `/dev/null`; stdout and stderr go to [`output_so_far`](Self::output_so_far).
    ///
    /// `cmd` may be passed by value, `&` or `&mut`. Pass a plain command (`Command::new("vblade")`);
    /// one from [`Netns::command`] belongs in [`spawn_command`](Self::spawn_command).
    pub fn spawn(ns: &Netns, cmd: impl Borrow<Command>) -> io::Result<NsChild> {
        let cmd = cmd.borrow();
        let mut wrapped = ns.command(cmd.get_program());
        wrapped.args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(v) => wrapped.env(key, v),
                None => wrapped.env_remove(key),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        Self::spawn_command(wrapped)
    }

    /// Starts `cmd` as it is, e.g. one built with [`Netns::command`], capturing its output.
    pub fn spawn_command(mut cmd: Command) -> io::Result<NsChild> {
        let output = tempfile::Builder::new()
            .prefix("aoe-testkit-out-")
            .tempfile()?
            .into_temp_path();
        let stdout: File = OpenOptions::new().append(true).open(&output)?;
        let stderr = stdout.try_clone()?;
        let label = format!("{cmd:?}");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {label}: {e}")))?;
        Ok(NsChild {
            child,
            status: None,
            output,
            label,
        })
    }

    /// Process id (of the program itself: `nsenter` execs it without forking).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit; `Ok(None)` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
        }
    }

    /// Stops the process: SIGTERM, up to 5 s for it to exit, then SIGKILL. Returns its exit
    /// status (at once if it had already exited).
    pub fn stop(&mut self) -> io::Result<ExitStatus> {
        self.stop_within(Duration::from_secs(5))
    }

    /// Like [`NsChild::stop`], allowing `grace` between SIGTERM and SIGKILL (for a daemon
    /// that finishes work in progress before it exits).
    pub fn stop_within(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        // The child is not reaped until we wait for it, so its pid cannot have been reused.
        signal(self.pid(), "TERM");
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        match self.child.kill() {
            Ok(()) => {}
            // Exited between the last check and the kill.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {}
            Err(e) => return Err(e),
        }
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok(status)
    }

    /// Exit status, if the process has exited (without blocking).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Everything the process wrote to stdout and stderr so far (interleaved as written,
    /// invalid UTF-8 replaced). Handy in assertion messages.
    pub fn output_so_far(&self) -> String {
        match fs::read(&self.output) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("<cannot read output of {}: {e}>", self.label),
        }
    }

    /// The command line, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_macs() {
        assert_eq!(
            parse_mac("5a:aa:be:e5:69:79"),
            Some([0x5a, 0xaa, 0xbe, 0xe5, 0x69, 0x79])
        );
        assert_eq!(parse_mac("5a:aa:be:e5:69"), None);
        assert_eq!(parse_mac("5a:aa:be:e5:69:79:00"), None);
        assert_eq!(parse_mac("5a:aa:be:e5:69:zz"), None);
        assert_eq!(parse_mac("5a:aa:be:e5:69:"), None);
        assert_eq!(parse_mac(""), None);
    }

    #[test]
    fn finds_fields_in_ip_link_output() {
        let line = "2: va@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 9000 qdisc noqueue state UP \
                    mode DEFAULT group default qlen 1000\\    link/ether 5a:aa:be:e5:69:79 brd \
                    ff:ff:ff:ff:ff:ff link-netns t2x";
        assert_eq!(field_after(line, "mtu"), Some("9000"));
        assert_eq!(field_after(line, "link/ether"), Some("5a:aa:be:e5:69:79"));
        assert_eq!(field_after(line, "nothing"), None);
    }

    #[test]
    fn recognises_stale_names() {
        assert_eq!(stale_candidate_pid("aoe-123-4", "aoe"), Some(123));
        assert_eq!(stale_candidate_pid("aoe-x-123-4", "aoe"), None);
        assert_eq!(stale_candidate_pid("aoe-123-", "aoe"), None);
        assert_eq!(stale_candidate_pid("aoe-123", "aoe"), None);
        assert_eq!(stale_candidate_pid("other-123-4", "aoe"), None);
        assert_eq!(stale_candidate_pid("aoex-123-4", "aoe"), None);
    }

    #[test]
    fn rejects_bad_names() {
        assert!(check_prefix("").is_err());
        assert!(check_prefix("a/b").is_err());
        assert!(check_prefix("a b").is_err());
        assert!(check_prefix("aoe").is_ok());
        assert!(check_ifname("a-name-that-is-too-long").is_err());
        assert!(check_ifname("eth0:1").is_err());
        assert!(check_ifname("..").is_err());
        assert!(check_ifname("eth0").is_ok());
    }

    #[test]
    fn wait_until_returns_early_and_times_out() {
        let start = Instant::now();
        assert!(wait_until(Duration::from_secs(10), || true));
        // Well under the 10 s it would have waited; a stalled machine may take a moment.
        assert!(start.elapsed() < Duration::from_secs(5));
        let mut calls = 0;
        assert!(!wait_until(Duration::from_millis(30), || {
            calls += 1;
            false
        }));
        assert!(calls >= 2);
    }
}
