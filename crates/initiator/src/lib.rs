//! The AoE initiator daemon: the Linux `aoe` driver's behaviour in user space.
//!
//! Layer: the I/O driver around [`aoe_proto::initiator::Engine`]. A network thread owns the
//! engine and the AF_PACKET sockets ([`net`]); a FUSE file system ([`fs`]) offers what the
//! driver's device nodes and sysfs offer: `discover`, `interfaces`, `err`, `revalidate`,
//! `flush`, one file per device (`eX.Y`) and per partition (`eX.YpN`), and a sysfs-like
//! attribute tree that aoetools' `aoe-stat` reads. With `--loop` every device that comes up
//! is attached to a loop device with partition scan, so a real block device exists.
//! With `--nbd` every device that is up (and each partition) is also an NBD export
//! ([`nbd`]), for qemu, nbd-client and the libnbd tools.
//!
//! It runs in any network namespace (the kernel driver serves only the initial one) and a
//! target vanishing mid-I/O fails that I/O with EIO after `deadsecs` instead of crashing.
//!
//! Stopping follows the kernel driver, whose module cannot be unloaded (`rmmod aoe`: "Module
//! aoe is in use") while one of its block devices is open: on SIGTERM or SIGINT with a device
//! in use, meaning a device or partition file open through FUSE, a `--loop` device that is
//! itself in use (mounted, or claimed by device-mapper, md, mkfs: an `O_EXCL` open of it
//! fails with EBUSY), or an NBD client connected to an export, the daemon logs one line
//! naming them, keeps serving, and exits by itself once they are all closed. SIGQUIT
//! (`kill -QUIT PID`, `Ctrl-\`) stops it at once anyway: I/O in flight fails with EIO and
//! whatever is mounted on its devices sees I/O errors from then on. With nothing in use,
//! SIGTERM stops at once.
//!
//! One daemon per ROOT: a ROOT that is already mounted (by another `aoe initiator`, or by
//! anything else) is refused before mounting, since two FUSE mounts stacked on one
//! directory would each take requests meant for the other.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod fs;
pub mod nbd;
pub mod net;
pub mod partition;
pub mod rangelock;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aoe_proto::initiator::{Config, Engine};

/// What `aoe initiator` runs with (the driver's module parameters, plus the mount point).
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the control files and device files appear (default `/dev/etherd`).
    pub root: PathBuf,
    /// Allowed interfaces (`aoe_iflist`); empty: every interface of the namespace.
    pub iflist: Vec<String>,
    /// Seconds without an answer before a device is declared down (`aoe_deadsecs`);
    /// 0 retries forever.
    pub deadsecs: u64,
    /// Cap on outstanding frames per target (`aoe_maxout`).
    pub maxout: u16,
    /// Attach each device that comes up to a loop device.
    pub loop_devices: bool,
    /// Serve the devices over NBD too (nothing when both addresses are None).
    pub nbd: nbd::NbdOptions,
}

/// Runs the initiator until `stop` becomes true (SIGTERM/SIGINT in the binary) while no
/// device is in use (see [`in_use`]), or `force` becomes true (SIGQUIT): mounts the file
/// system at `opts.root`, serves it, and on stop fails what is still in flight, detaches
/// loop devices and unmounts. Refuses a ROOT that is already mounted.
pub fn run(opts: Options, stop: Arc<AtomicBool>, force: Arc<AtomicBool>) -> Result<()> {
    for i in &opts.iflist {
        aoe_sys::interface_info(i)
            .with_context(|| format!("--iflist: {i} is not a network interface"))?;
    }
    refuse_mounted_root(&opts.root)?;
    std::fs::create_dir_all(&opts.root)
        .with_context(|| format!("cannot create {}", opts.root.display()))?;
    let cfg = Config {
        deadsecs: Duration::from_secs(opts.deadsecs),
        maxout: opts.maxout,
        ..Config::default()
    };
    let engine = Engine::new(cfg, Instant::now());
    let shared = Arc::new(Mutex::new(net::Shared {
        iflist: opts.iflist.clone(),
        ..Default::default()
    }));
    let net = net::Net::new(engine, shared.clone(), opts.loop_devices, opts.root.clone())
        .context("cannot create the network thread")?;
    let handle = net.handle();
    let net_thread = std::thread::Builder::new()
        .name("aoe-net".into())
        .spawn(move || net.run())
        .context("cannot start the network thread")?;

    let mut fcfg = fuser::Config::default();
    fcfg.mount_options = vec![
        fuser::MountOption::FSName("aoe".into()),
        fuser::MountOption::Subtype("etherd".into()),
        fuser::MountOption::NoExec,
    ];
    fcfg.acl = fuser::SessionACL::All;
    fcfg.n_threads = Some(2);
    let session = fuser::spawn_mount(
        fs::AoeFs::new(shared.clone(), handle.clone()),
        &opts.root,
        &fcfg,
    )
    .with_context(|| {
        format!(
            "cannot mount the control file system on {}",
            opts.root.display()
        )
    })?;
    let nbd_server = if opts.nbd.unix.is_some() || opts.nbd.tcp.is_some() {
        match nbd::start(&opts.nbd, shared.clone(), handle.clone()) {
            Ok(s) => Some(s),
            Err(e) => {
                handle.send(net::Cmd::Stop);
                let _ = net_thread.join();
                drop(session);
                return Err(e);
            }
        }
    } else {
        None
    };
    tracing::info!(root = %opts.root.display(), "initiator running");

    let mut refused = false;
    loop {
        if force.load(Ordering::SeqCst) {
            tracing::warn!("SIGQUIT: stopping now, failing I/O on devices still in use");
            break;
        }
        if stop.load(Ordering::SeqCst) {
            let held = in_use(&shared);
            if held.is_empty() {
                break;
            }
            if !refused {
                refused = true;
                tracing::warn!(
                    "not stopping while in use: {}; stopping once they are closed \
                     (to stop now and fail their I/O: kill -QUIT {})",
                    held.join(", "),
                    std::process::id()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::info!("stopping");
    if let Some(s) = nbd_server {
        s.stop();
    }
    handle.send(net::Cmd::Stop);
    let _ = net_thread.join();
    // Wake blocked readers of `err` before unmounting.
    for (_, w) in net::lock(&shared).err_waiters.drain(..) {
        w.error(fuser::Errno::EINTR);
    }
    drop(session);
    // The BackgroundSession unmounts on drop; make sure nothing is left mounted even if a
    // reader still held a file open (lazy unmount).
    let _ = std::process::Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(&opts.root)
        .stderr(std::process::Stdio::null())
        .status();
    Ok(())
}

/// What keeps the daemon from stopping on SIGTERM, as `NAME (why)` phrases: device and
/// partition files open through FUSE (other than the `--loop` device's own open of
/// `eX.Y`), `--loop` devices in use, NBD clients. Empty when nothing is.
///
/// A loop device is in use when an exclusive open (`O_EXCL`, read-only) of it fails with
/// EBUSY: the kernel's claim that mount, device-mapper, md and mkfs take on a block device
/// or any of its partitions. That open is made here with no lock held, since closing a
/// block device may write back through this daemon.
pub fn in_use(shared: &Mutex<net::Shared>) -> Vec<String> {
    let mut held = Vec::new();
    let loops: Vec<(aoe_wire::TargetAddr, String)> = {
        let s = net::lock(shared);
        for (&(a, p), &n) in &s.open_files {
            let own =
                u32::from(p == 0 && s.devices.get(&a).is_some_and(|e| e.loop_device.is_some()));
            let n = n.saturating_sub(own);
            if n > 0 {
                let name = if p == 0 {
                    a.to_string()
                } else {
                    format!("{a}p{p}")
                };
                held.push(format!("{name} (open {n}x)"));
            }
        }
        for (export, &n) in &s.nbd_clients {
            if n > 0 {
                held.push(format!(
                    "{export} (NBD, {n} client{})",
                    if n == 1 { "" } else { "s" }
                ));
            }
        }
        s.devices
            .iter()
            .filter_map(|(a, e)| e.loop_device.clone().map(|l| (*a, l)))
            .collect()
    };
    for (a, lo) in loops {
        if loop_in_use(Path::new(&lo)) {
            held.push(format!("{a} (as {lo}, in use)"));
        }
    }
    held
}

/// True if `dev` (a block device) is claimed: mounted, or held by device-mapper, md or
/// another exclusive opener, itself or through one of its partitions.
fn loop_in_use(dev: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(dev)
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

/// Fails if something is already mounted on `root` (field 5 of /proc/self/mountinfo): a
/// second FUSE mount stacked on an `aoe initiator`'s ROOT would take requests meant for
/// the first and answer them from an empty device list.
fn refuse_mounted_root(root: &Path) -> Result<()> {
    // Not `canonicalize(root)`: a stale FUSE mount (its daemon gone) fails stat with
    // ENOTCONN. Resolve the parent and keep the last component.
    let abs = match (root.parent(), root.file_name()) {
        (Some(p), Some(n)) => {
            let p = if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            };
            match p.canonicalize() {
                Ok(p) => p.join(n),
                Err(_) => return Ok(()),
            }
        }
        _ => root.to_path_buf(),
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Ok(());
    };
    let Some((fstype, source)) = mount_at(&info, &abs) else {
        return Ok(());
    };
    let r = root.display();
    // Mounted by root the type is `fuse` (the subtype goes into the options), through
    // fusermount3 `fuse.etherd`; the source is the FSName either way.
    if (fstype == "fuse" || fstype.starts_with("fuse.")) && source == "aoe" {
        match initiator_pid_on(&abs) {
            Some(pid) => anyhow::bail!(
                "{r} is already mounted (by another aoe initiator, pid {pid}); stop it first"
            ),
            None => anyhow::bail!(
                "{r} is already mounted (by another aoe initiator, which seems to be gone: \
                 fusermount3 -u -z {r} removes a stale mount); stop it first"
            ),
        }
    }
    anyhow::bail!(
        "{r} is already mounted ({fstype} from {source}); unmount it or choose another --root"
    )
}

/// The file system type and source of the mount on `dir` in a mountinfo text (the last
/// one: mounts stacked on one directory hide the earlier ones).
fn mount_at(mountinfo: &str, dir: &Path) -> Option<(String, String)> {
    let want = dir.to_str()?;
    let mut found = None;
    for l in mountinfo.lines() {
        let fields: Vec<&str> = l.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.get(4).map(|m| unescape(m)).as_deref() == Some(want) {
            let fstype = fields.get(sep + 1).copied().unwrap_or("?").to_string();
            let source = fields.get(sep + 2).map(|s| unescape(s)).unwrap_or_default();
            found = Some((fstype, source));
        }
    }
    found
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The pid of another `aoe initiator` process whose `--root` (default `/dev/etherd`) is
/// `root`, found through /proc/PID/{comm,cmdline,cwd}; None if there is none (or /proc
/// does not tell).
fn initiator_pid_on(root: &Path) -> Option<u32> {
    let me = std::process::id();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let dir = e.path();
        if !std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == "aoe") {
            continue;
        }
        let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.iter().any(|a| a == "initiator") {
            continue;
        }
        let mut r = PathBuf::from("/dev/etherd");
        for (i, a) in args.iter().enumerate() {
            if a == "--root" {
                if let Some(v) = args.get(i + 1) {
                    r = PathBuf::from(v);
                }
            } else if let Some(v) = a.strip_prefix("--root=") {
                r = PathBuf::from(v);
            }
        }
        if r.is_relative() {
            match std::fs::read_link(dir.join("cwd")) {
                Ok(cwd) => r = cwd.join(r),
                Err(_) => continue,
            }
        }
        let same = r == root
            || r.parent()
                .and_then(|p| p.canonicalize().ok())
                .zip(r.file_name())
                .is_some_and(|(p, n)| p.join(n) == root);
        if same {
            return Some(pid);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lookup() {
        let info = "\
22 1 0:21 / /run rw,nosuid - tmpfs tmpfs rw
90 22 0:50 / /run/aoe\\040roots/r1 rw,nosuid,nodev shared:1 - fuse.etherd aoe rw,user_id=0
91 22 0:51 / /run/x rw - ext4 /dev/loop0 rw
92 91 0:52 / /run/x rw - fuse.etherd aoe rw
";
        assert_eq!(
            mount_at(info, Path::new("/run/aoe roots/r1")),
            Some(("fuse.etherd".into(), "aoe".into()))
        );
        // The last mount on a directory is the visible one.
        assert_eq!(
            mount_at(info, Path::new("/run/x")),
            Some(("fuse.etherd".into(), "aoe".into()))
        );
        assert_eq!(mount_at(info, Path::new("/run/aoe")), None);
        assert_eq!(mount_at("garbage\n\n1 2 3", Path::new("/run")), None);
        assert_eq!(unescape("a\\040b\\134c\\"), "a b\\c\\");
    }

    #[test]
    fn an_unmounted_root_is_fine() {
        let d = std::env::temp_dir();
        assert!(refuse_mounted_root(&d.join("aoe-no-such-root")).is_ok());
    }
}
