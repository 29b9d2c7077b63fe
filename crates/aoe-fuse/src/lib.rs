//! The FUSE front-end of the AoE initiator: the Linux driver's `/dev/etherd` control and
//! device files, and a sysfs-like attribute tree, under a ROOT directory ([`fs`]).
//!
//! Layer: a front-end over [`aoe_initiator`]; device I/O goes through its block-device
//! handle ([`aoe_initiator::blockdev::BlockDevice`]), control writes go to its network thread as
//! commands. It knows nothing of frames or sockets.
//!
//! One daemon per ROOT: a ROOT that is already mounted (by another `aoe initiator`, or by
//! anything else) is refused before mounting ([`prepare_root`]), since two FUSE mounts
//! stacked on one directory would each take requests meant for the other.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod fs;
mod heldreply;
mod inval;
mod openers;
mod ring;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use aoe_initiator::net::{Handle, Shared};

/// Refuses a ROOT that is already mounted, then creates it if needed. Call before
/// starting the initiator, so a refused ROOT starts nothing.
pub fn prepare_root(root: &Path) -> Result<()> {
    refuse_mounted_root(root)?;
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))
}

/// The mounted file system; [`Mount::unmount`] takes it down.
pub struct Mount {
    /// None once [`Mount::check`] found its thread ended and joined it.
    session: Option<fuser::BackgroundSession>,
    root: PathBuf,
    /// `root` made absolute as mountinfo shows it ([`absolute`]).
    abs: Option<PathBuf>,
    ring: Option<ring::RingThread>,
}

/// Mounts the file system over `shared` at `root`, sending work to `net`. With `uring`, its
/// requests come through FUSE over io_uring (`ring`); where the kernel refuses it
/// (`/sys/module/fuse/parameters/enable_uring` N, a kernel before 6.14), the mount is taken
/// down again and the error says why.
pub fn mount(root: &Path, shared: Arc<Mutex<Shared>>, net: Handle, uring: bool) -> Result<Mount> {
    let mut fcfg = fuser::Config::default();
    fcfg.mount_options = vec![
        fuser::MountOption::FSName("aoe".into()),
        fuser::MountOption::Subtype("etherd".into()),
        fuser::MountOption::NoExec,
        // Reads in requests of REQUEST_BYTES, direct or read-ahead, though writes go in
        // larger ones (fs::WRITE_REQUEST_BYTES).
        fuser::MountOption::CUSTOM(format!("max_read={}", fs::REQUEST_BYTES)),
    ];
    fcfg.acl = fuser::SessionACL::All;
    fcfg.n_threads = Some(2);
    // One fd for both threads: a request is answered on the fd it was read from (its
    // processing list), and device-file reads are answered on a dup of this one.
    fcfg.clone_fd = false;
    let notifier = Arc::new(std::sync::OnceLock::new());
    // The mount's source in the devices' queues, served in turn with each NBD connection
    // ([`Handle::new_source`]); each open device file gets one of its own (`openers`), up
    // to a cap beyond which opens share this one.
    let mut afs = fs::AoeFs::new(shared, net.new_source(), notifier.clone())
        .context("cannot start the FUSE invalidator thread")?;
    if uring {
        afs = afs.with_uring();
    }
    let ring_fs = afs.clone();
    let reply_fs = afs.clone();
    let session = fuser::Session::new(afs, root, &fcfg)
        .with_context(|| format!("cannot mount the control file system on {}", root.display()))?;
    use std::os::fd::AsFd;
    let dup = || {
        session
            .as_fd()
            .try_clone_to_owned()
            .context("cannot duplicate the /dev/fuse fd")
    };
    // Device-file reads are answered on a dup of the fd fuser reads requests from, set
    // before it serves any (fs::AoeFs::set_reply_fd).
    reply_fs.set_reply_fd(dup()?);
    let fuse_fd = if uring { Some(dup()?) } else { None };
    let session = session
        .spawn()
        .with_context(|| format!("cannot serve the control file system on {}", root.display()))?;
    let _ = notifier.set(session.notifier());
    let mut m = Mount {
        session: Some(session),
        root: root.to_path_buf(),
        abs: absolute(root),
        ring: None,
    };
    if let Some(fd) = fuse_fd {
        match ring::RingThread::start(ring_fs, fd, fs::WRITE_REQUEST_BYTES as usize) {
            Ok(r) => m.ring = Some(r),
            Err(e) => {
                m.unmount();
                return Err(e);
            }
        }
    }
    Ok(m)
}

impl Mount {
    /// Fails, with the reason, once the file system's request threads have ended with an
    /// error; call it now and then while the daemon runs ([`aoe_initiator::Initiator::wait`]).
    ///
    /// fuser's `Session::spawn` returns as soon as its `fuser-bg` thread exists; that thread
    /// starts the request threads (`fuser-0`, `fuser-1`) afterwards, and where one cannot
    /// start (a cgroup's `pids.max` reached: `pthread_create` fails with EAGAIN) it ends
    /// with that error and the threads it did start are left alone. With none started, ROOT
    /// stayed mounted with nobody reading `/dev/fuse`, and every access to it (`cat`,
    /// `aoe-stat`, `dd`) waited for ever, SIGTERM included (a FUSE request waits killably
    /// only); with one, the daemon ran on half its threads without saying so. An error
    /// here ends the daemon, whose unmount then fails accesses with ENOTCONN at once.
    /// Ending without an error (the kernel's connection gone: ROOT unmounted from outside,
    /// or the connection aborted) is not a failure: the daemon keeps serving NBD as before.
    pub fn check(&mut self) -> Result<()> {
        if !self.session.as_ref().is_some_and(|s| s.guard.is_finished()) {
            return Ok(());
        }
        match self.session.take().map(fuser::BackgroundSession::join) {
            Some(Err(e)) => Err(anyhow::Error::new(e).context(format!(
                "the file system on {} stopped serving requests (its threads could not \
                 start or ended; a pids.max or RLIMIT_NPROC too low?)",
                self.root.display()
            ))),
            _ => Ok(()),
        }
    }

    /// Unmounts. Call after [`aoe_initiator::Initiator::shutdown`], which wakes blocked
    /// readers of `err` first.
    ///
    /// The BackgroundSession unmounts on drop with `umount(2)`, which fails (EBUSY) while
    /// anything on ROOT is still open or in use: a control or attribute file (which do not
    /// hold off SIGTERM, see [`aoe_initiator::in_use`]), a process's working directory, or
    /// a device file whose last reference the kernel drops a moment after its RELEASE
    /// reached us (`__fput` sends RELEASE before it lets go of the mount). Then ROOT is
    /// unmounted lazily, and the connection lives on until that last user lets go: the
    /// FUSE io_uring side thread, which may be serving that user, is not waited for (it
    /// ends with the process, as the fuser threads do). Waiting for it there hung
    /// the daemon after SIGTERM for as long as the file stayed open.
    pub fn unmount(self) {
        drop(self.session);
        let busy = self.abs.as_deref().is_some_and(still_mounted);
        if busy {
            tracing::warn!(
                "{}: still in use (a file open on it, or a working directory); unmounted \
                 lazily, its users get ENOTCONN once the daemon is gone",
                self.root.display()
            );
        }
        // Make sure nothing is left mounted (lazy unmount), as before when the umount did.
        let _ = std::process::Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.root)
            .stderr(std::process::Stdio::null())
            .status();
        if let Some(r) = self.ring {
            if !busy {
                // The ring's source is gone by now (the network thread stopped, or every
                // entry's command ended with ENOTCONN at the unmount), and with it the side
                // thread's work: it ends.
                r.join();
            }
        }
    }
}

/// Fails if something is already mounted on `root` (field 5 of /proc/self/mountinfo): a
/// second FUSE mount stacked on an `aoe initiator`'s ROOT would take requests meant for
/// the first and answer them from an empty device list.
fn refuse_mounted_root(root: &Path) -> Result<()> {
    let Some(abs) = absolute(root) else {
        return Ok(());
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
        // ENOTCONN: the connection of this mount is gone, so is the daemon that served it
        // (killed, or crashed). Nothing answers there any more; a restart takes its place,
        // as a restarted `aoe initiator` under a service manager must.
        if std::fs::metadata(&abs).is_err_and(|e| e.kind() == std::io::ErrorKind::NotConnected) {
            return remove_stale_mount(&abs);
        }
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

/// `root` as mountinfo names it: the parent resolved, the last component kept. Not
/// `canonicalize(root)`: a stale FUSE mount (its daemon gone) fails stat with ENOTCONN, and
/// a live one would be asked. None if the parent cannot be resolved.
fn absolute(root: &Path) -> Option<PathBuf> {
    match (root.parent(), root.file_name()) {
        (Some(p), Some(n)) => {
            let p = if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            };
            p.canonicalize().ok().map(|p| p.join(n))
        }
        _ => Some(root.to_path_buf()),
    }
}

/// True while our file system (source `aoe`) is mounted on `abs` (/proc/self/mountinfo).
fn still_mounted(abs: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|info| mount_at(&info, abs))
        .is_some_and(|(_, source)| source == "aoe")
}

/// Lazily unmounts the mount on `root` whose FUSE daemon is gone (the file system answers
/// ENOTCONN), saying so once; fails if it stays.
fn remove_stale_mount(root: &Path) -> Result<()> {
    let r = root.display();
    tracing::warn!("{r}: removing the stale mount of an aoe initiator that is gone");
    detach_stale_loops(root);
    let out = std::process::Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(root)
        .output()
        .with_context(|| format!("{r} is a stale mount; cannot run fusermount3 -u -z {r}"))?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if !out.status.success() || mount_at(&info, root).is_some_and(|(_, s)| s == "aoe") {
        anyhow::bail!(
            "{r} is a stale mount of an aoe initiator that is gone, and fusermount3 -u -z {r} \
             failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Detaches the loop devices the dead initiator's `--loop` attached to files under `root`
/// (`/sys/block/loopN/loop/backing_file`): they can only fail I/O now, and the restarted
/// initiator attaches new ones. `losetup -d` on one still in use (mounted) detaches it
/// once its last user closes it.
fn detach_stale_loops(root: &Path) {
    let prefix = format!("{}/", root.display());
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let back = std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
        if !back.trim_end().starts_with(&prefix) {
            continue;
        }
        let dev = format!("/dev/{name}");
        let ok = std::process::Command::new("losetup")
            .args(["-d", &dev])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            tracing::warn!(
                "{dev}: detached; it was attached to {} by the initiator that is gone",
                back.trim_end()
            );
        } else {
            tracing::warn!(
                "{dev}: attached to {} by the initiator that is gone; losetup -d {dev} failed",
                back.trim_end()
            );
        }
    }
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
