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
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod fs;
pub mod nbd;
pub mod net;
pub mod partition;
pub mod rangelock;

use std::path::PathBuf;
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

/// Runs the initiator until `stop` becomes true (SIGTERM/SIGINT in the binary): mounts the
/// file system at `opts.root`, serves it, and on stop fails what is still in flight,
/// detaches loop devices and unmounts.
pub fn run(opts: Options, stop: Arc<AtomicBool>) -> Result<()> {
    for i in &opts.iflist {
        aoe_sys::interface_info(i)
            .with_context(|| format!("--iflist: {i} is not a network interface"))?;
    }
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

    while !stop.load(Ordering::SeqCst) {
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
