//! The AoE initiator daemon: the Linux `aoe` driver's behaviour in user space, minus its
//! front-ends.
//!
//! Layer: the I/O driver around [`aoe_proto::initiator::Engine`]. A network thread owns the
//! engine and the AF_PACKET sockets ([`net`]) and publishes the devices it sees, with the
//! partitions found on them ([`partition`]); with `--loop` every device that comes up is
//! attached to a loop device with partition scan, so a real block device exists.
//! Front-ends reach the devices through one block-device handle ([`blockdev`]: byte-granular
//! reads and writes over 512-byte sectors under the daemon's sector range locks) that
//! submits to the network thread: `aoe-fuse` (the driver's `/dev/etherd` files and sysfs
//! attributes) and `aoe-nbd` (NBD exports) are crates of their own, and the `aoe` binary
//! wires them to an [`Initiator`].
//!
//! It runs in any network namespace (the kernel driver serves only the initial one) and a
//! target vanishing mid-I/O fails that I/O with EIO after `deadsecs` instead of crashing.
//!
//! Stopping follows the kernel driver, whose module cannot be unloaded (`rmmod aoe`: "Module
//! aoe is in use") while one of its block devices is open: on SIGTERM or SIGINT with a device
//! in use, meaning a device or partition file open through FUSE, a `--loop` device that is
//! itself in use (mounted, or claimed by device-mapper, md, mkfs: an `O_EXCL` open of it
//! fails with EBUSY), or an NBD client connected to an export, the daemon logs one line
//! naming them, keeps serving, and exits by itself once they are all closed
//! ([`Initiator::wait`], [`in_use`]). SIGQUIT (`kill -QUIT PID`, `Ctrl-\`) stops it at once
//! anyway: I/O in flight fails with EIO and whatever is mounted on its devices sees I/O
//! errors from then on. With nothing in use, SIGTERM stops at once.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod blockdev;
pub mod errlog;
pub mod iostats;
pub mod net;
pub mod partition;
mod scanpool;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aoe_proto::initiator::{Config, Engine};

/// The largest `deadsecs` [`Options::check`] accepts: a day (0 means never down).
pub const MAX_DEADSECS: u64 = 86_400;

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
    /// Most devices kept; config responses for more are refused ([`Config::max_devices`]).
    pub max_devices: usize,
    /// Most target MACs per device ([`Config::max_targets`]).
    pub max_targets: usize,
    /// Hold a write back while a copy of an earlier write to its sectors may still reach
    /// the target ([`Config::fence_writes`]). Always on but in tests that show what it
    /// prevents.
    pub fence_writes: bool,
}

impl Options {
    /// Refuses a `deadsecs` past [`MAX_DEADSECS`] (its deadline would overflow `Instant`)
    /// and an `iflist` entry that can never be an interface name. Names that do not
    /// exist (yet) are accepted: the list is a name filter, as the driver's `aoe_iflist`
    /// ([`net::Net::sync_interfaces`]).
    pub fn check(&self) -> Result<()> {
        if self.deadsecs > MAX_DEADSECS {
            anyhow::bail!(
                "deadsecs {} is not from 0 to {MAX_DEADSECS} seconds (0: never down)",
                self.deadsecs
            );
        }
        net::check_iflist(&self.iflist).map_err(|e| anyhow::anyhow!("--iflist: {e}"))
    }
}

/// A running network thread with its shared device state: what front-ends mount on.
pub struct Initiator {
    shared: Arc<Mutex<net::Shared>>,
    handle: net::Handle,
    thread: JoinHandle<()>,
}

impl Initiator {
    /// Starts the network thread for `opts` (checked with [`Options::check`]).
    pub fn start(opts: &Options) -> Result<Initiator> {
        opts.check()?;
        let cfg = Config {
            deadsecs: Duration::from_secs(opts.deadsecs),
            maxout: opts.maxout,
            max_devices: opts.max_devices,
            max_targets: opts.max_targets,
            fence_writes: opts.fence_writes,
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
        let thread = std::thread::Builder::new()
            .name("aoe-net".into())
            .spawn(move || net.run())
            .context("cannot start the network thread")?;
        Ok(Initiator {
            shared,
            handle,
            thread,
        })
    }

    /// The device state the network thread publishes.
    pub fn shared(&self) -> Arc<Mutex<net::Shared>> {
        self.shared.clone()
    }

    /// The handle front-ends submit work through.
    pub fn handle(&self) -> net::Handle {
        self.handle.clone()
    }

    /// Waits until `stop` becomes true (SIGTERM/SIGINT in the binary) while no device is in
    /// use (see [`in_use`]; what is, is logged once), or `force` becomes true (SIGQUIT).
    ///
    /// Fails, ending the wait, when `front_ends` (called every 100 ms) does, or when the
    /// network thread has ended (it ends only on [`Initiator::shutdown`]; a panic there left
    /// every request waiting on a thread that would never answer it).
    pub fn wait(
        &self,
        stop: &AtomicBool,
        force: &AtomicBool,
        mut front_ends: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut refused = false;
        loop {
            front_ends()?;
            if self.thread.is_finished() {
                anyhow::bail!("the network thread ended unexpectedly (see the log above)");
            }
            if force.load(Ordering::SeqCst) {
                tracing::warn!("SIGQUIT: stopping now, failing I/O on devices still in use");
                break;
            }
            if stop.load(Ordering::SeqCst) {
                let held = in_use(&self.shared);
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
        Ok(())
    }

    /// Stops the network thread (I/O still in flight fails) and answers EINTR to readers
    /// still blocked on `err`, so a front-end can then go away.
    pub fn shutdown(self) {
        self.handle.send(net::Cmd::Stop);
        let _ = self.thread.join();
        for (_, w) in net::lock(&self.shared).err_waiters.drain(..) {
            w.interrupted();
        }
    }
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
