//! `aoe initiator`: the user-space AoE initiator daemon.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

/// Run the AoE initiator: discovery, control files and device files under ROOT.
#[derive(Debug, Args)]
#[command(
    after_help = "Control files under ROOT (like the kernel driver's /dev/etherd):\n  \
discover, interfaces, err, revalidate, flush, eX.Y, eX.YpN, sysfs/block/etherd!eX.Y/*\n\
aoetools' aoe-stat reads the attributes with sysfs_dir=ROOT/sysfs.\n\n\
Stopping: like the kernel driver, which cannot be unloaded while a device is in use,\n\
SIGTERM or SIGINT while a device or partition file is open, a --loop device is in use\n\
(mounted, ...) or an NBD client is connected does not stop the daemon: it logs what is\n\
in use, keeps serving, and exits once they are all closed. SIGQUIT (kill -QUIT PID, or\n\
Ctrl-\\) stops it at once anyway: their I/O fails from then on.\n\
One daemon per ROOT: a ROOT that is already mounted is refused. One daemon per network\n\
namespace, even with disjoint --iflist: one serves any number of interfaces (add more with\n\
aoe-interfaces --root ROOT IF...); for a second, move its interfaces into a namespace of\n\
their own (ip link set IF netns NS) and start it there."
)]
pub struct InitiatorArgs {
    /// Where control and device files appear.
    #[arg(long, default_value = "/dev/etherd", value_name = "DIR")]
    root: PathBuf,
    /// Whitespace-separated interfaces AoE may use (like aoe_iflist); default: all. A list
    /// that names none is refused.
    #[arg(long, value_name = "\"IF ...\"")]
    iflist: Option<String>,
    /// Seconds without an answer before a device is down (like aoe_deadsecs), 0 to 86400;
    /// 0 = forever.
    #[arg(long, default_value_t = 180, value_name = "N", value_parser = parse_deadsecs)]
    deadsecs: u64,
    /// Cap on outstanding frames per target (like aoe_maxout). The default, 128, is what the
    /// driver's admin guide documents; the driver's code uses 64.
    #[arg(long, default_value_t = 128, value_name = "N")]
    maxout: u16,
    /// Most devices (shelf.slot) to keep. Anyone on the segment can announce devices, so
    /// config responses for more are refused (one rate-limited line in `err`, counted):
    /// a flood of them costs bounded memory and CPU. Devices already known are never
    /// displaced; `echo > ROOT/flush` removes those that are down to make room.
    #[arg(long, default_value_t = 256, value_name = "N")]
    max_devices: usize,
    /// Most target MACs (paths' far ends) per device; config responses from more MACs for
    /// one shelf.slot are refused the same way.
    #[arg(long, default_value_t = 16, value_name = "N")]
    max_targets: usize,
    /// Tests only: send a write at once even while a copy of an earlier write to its
    /// sectors may still reach the target, so a delayed original can undo a newer,
    /// acknowledged write (what the Linux driver does). Hidden: it exists to show the
    /// hazard the fence prevents (crates/aoe-cli/tests/faults.rs).
    #[arg(long, hide = true)]
    unsafe_no_write_fence: bool,
    /// Attach each device that comes up to a loop device with partition scan.
    #[arg(long = "loop")]
    loop_devices: bool,
    /// Also serve every device that is up (and its partitions) as an NBD export named
    /// eX.Y / eX.YpN on this Unix socket (qemu, nbd-client, nbdinfo, nbdcopy).
    #[arg(long, value_name = "SOCKET")]
    nbd: Option<PathBuf>,
    /// Also serve NBD on TCP ADDR:PORT; loopback addresses only unless --nbd-tcp-any.
    #[arg(long, value_name = "ADDR:PORT")]
    nbd_tcp: Option<String>,
    /// Allow --nbd-tcp on a non-loopback address (NBD has no authentication: anyone who
    /// can reach the port can read and write every AoE disk).
    #[arg(long, requires = "nbd_tcp")]
    nbd_tcp_any: bool,
    /// Serve the NBD exports read-only: clients see NBD_FLAG_READ_ONLY (nbdinfo's
    /// is_read_only, qemu's read-only node) and a write gets EPERM. AoE has no way for a
    /// target to say it refuses writes (`aoe serve -r` aborts each one), so say it here.
    /// Bare: every export; =NAME,...: those exports only, a device eX.Y with its partitions
    /// or a partition eX.YpN (a name that is no export name is refused). The FUSE files
    /// stay writable.
    #[arg(
        long,
        value_name = "EXPORT,...",
        num_args = 0..=1,
        require_equals = true,
        value_parser = parse_nbd_read_only
    )]
    nbd_read_only: Option<Option<aoe_nbd::ReadOnly>>,
    /// Serve the files' requests through FUSE over io_uring (Linux 6.14+, with
    /// /sys/module/fuse/parameters/enable_uring set to Y by root) instead of read(2) and
    /// writev(2) on /dev/fuse. Refused with the reason where the kernel does not allow it.
    #[arg(long)]
    fuse_uring: bool,
    #[command(flatten)]
    metrics: crate::metrics::MetricsArg,
}

/// `--deadsecs`: 0 (never down) to [`aoe_initiator::MAX_DEADSECS`]. The driver's
/// `aoe_deadsecs` is an int; past a day a dead target would hold I/O for longer than anyone
/// waits, and near `u64::MAX` the deadline overflowed `Instant` in the network thread.
fn parse_deadsecs(s: &str) -> Result<u64, String> {
    let max = aoe_initiator::MAX_DEADSECS;
    match s.trim().parse::<u64>() {
        Ok(v) if v <= max => Ok(v),
        _ => Err(format!(
            "--deadsecs {s} is not from 0 to {max} seconds (0: a device is never declared down)"
        )),
    }
}

/// `--nbd-read-only=NAME,...`: the exports named ([`aoe_nbd::ReadOnly::Only`]); clap's
/// message names the option and the value before the reason.
fn parse_nbd_read_only(s: &str) -> Result<aoe_nbd::ReadOnly, String> {
    s.parse()
}

/// Runs `aoe initiator`.
pub fn run(a: InitiatorArgs) -> Result<()> {
    // SIGTERM/SIGINT: stop once no device is in use; SIGQUIT: stop now (see the module
    // doc of aoe_initiator).
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    let force = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGQUIT, force.clone())
        .context("cannot install signal handlers")?;
    if a.maxout == 0 {
        anyhow::bail!("--maxout must be at least 1");
    }
    if a.max_devices == 0 {
        anyhow::bail!("--max-devices must be at least 1");
    }
    if a.max_targets == 0 {
        anyhow::bail!("--max-targets must be at least 1");
    }
    let iflist: Vec<String> = a
        .iflist
        .as_deref()
        .unwrap_or("")
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    // An empty aoe_iflist means every interface; an `--iflist` given but naming none is
    // far more likely a script's empty variable than a wish for every link, and on a host
    // that would send AoE broadcasts out of every interface: refuse it.
    if a.iflist.is_some() && iflist.is_empty() {
        anyhow::bail!(
            "--iflist names no interface (leave it out to use every interface, as an empty \
             aoe_iflist does)"
        );
    }
    let nbd_tcp = match &a.nbd_tcp {
        None => None,
        Some(s) => Some(resolve_nbd_tcp(s, a.nbd_tcp_any)?),
    };
    let opts = aoe_initiator::Options {
        root: a.root,
        iflist,
        deadsecs: a.deadsecs,
        maxout: a.maxout,
        loop_devices: a.loop_devices,
        max_devices: a.max_devices,
        max_targets: a.max_targets,
        fence_writes: !a.unsafe_no_write_fence,
    };
    let nbd = aoe_nbd::NbdOptions {
        unix: a.nbd,
        tcp: nbd_tcp,
        read_only: match a.nbd_read_only {
            None => aoe_nbd::ReadOnly::None,
            Some(None) => aoe_nbd::ReadOnly::All,
            Some(Some(names)) => names,
        },
    };
    serve(&opts, &nbd, &stop, &force, a.metrics.metrics, a.fuse_uring)
}

/// Runs the initiator with its front-ends until stopped (see [`aoe_initiator::Initiator::wait`]):
/// the FUSE files at `opts.root`, NBD exports where `nbd` says. On stop: the NBD listeners
/// go, I/O still in flight fails, blocked `err` readers get EINTR, ROOT is unmounted.
fn serve(
    opts: &aoe_initiator::Options,
    nbd: &aoe_nbd::NbdOptions,
    stop: &AtomicBool,
    force: &AtomicBool,
    metrics: Option<std::net::SocketAddr>,
    fuse_uring: bool,
) -> Result<()> {
    opts.check()?;
    aoe_fuse::prepare_root(&opts.root)?;
    let _claim = claim_network_namespace()?;
    let init = aoe_initiator::Initiator::start(opts)?;
    let mut mount = match aoe_fuse::mount(&opts.root, init.shared(), init.handle(), fuse_uring) {
        Ok(m) => m,
        Err(e) => {
            init.shutdown();
            return Err(e);
        }
    };
    if let Some(addr) = metrics {
        let shared = init.shared();
        crate::metrics::serve(addr, move || crate::metrics::initiator_text(&shared))?;
    }
    let nbd_server = if nbd.unix.is_some() || nbd.tcp.is_some() {
        match aoe_nbd::start(nbd, init.shared(), init.handle()) {
            Ok(s) => Some(s),
            Err(e) => {
                init.shutdown();
                mount.unmount();
                return Err(e);
            }
        }
    } else {
        None
    };
    tracing::info!(root = %opts.root.display(), "initiator running");
    let waited = init.wait(stop, force, || mount.check());
    if waited.is_ok() {
        tracing::info!("stopping");
    }
    if let Some(s) = nbd_server {
        s.stop();
    }
    init.shutdown();
    mount.unmount();
    waited
}

/// The abstract Unix socket (unix(7); its names belong to the network namespace) that
/// marks a running `aoe initiator` in a network namespace.
const CLAIM: &str = "aoe-initiator";

/// Claims the network namespace for this initiator, for as long as the listener lives (the
/// kernel frees the name when the process ends, SIGKILL included). Two initiators in one
/// namespace send from the same MACs, and each sees the other's answers: their tags come
/// from the same counter and clock (`newtag`), so one can take the other's read data or
/// write acknowledgement as its own. The Linux driver is one per kernel and never meets this.
fn claim_network_namespace() -> Result<std::os::unix::net::UnixListener> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(CLAIM)?;
    match std::os::unix::net::UnixListener::bind_addr(&addr) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let holder = claim_holder();
            let who = holder.map_or(String::new(), |pid| format!(", pid {pid}"));
            let root = holder
                .and_then(holder_root)
                .unwrap_or_else(|| "ITS_ROOT".into());
            anyhow::bail!(
                "another aoe initiator runs in this network namespace{who}, with ROOT {root}; \
                 one initiator serves every interface it is given, so add yours to its list \
                 (aoe-interfaces --root {root} IF..., or write them to {root}/interfaces) or \
                 move the interfaces into a network namespace of their own (ip link set IF \
                 netns NS) and start this one there; two in one namespace are refused even \
                 with disjoint --iflist, since either list can be rewritten at run time \
                 ({root}/interfaces) and two on one interface take each other's answers"
            )
        }
        Err(e) => Err(e).context("cannot bind the abstract socket @aoe-initiator"),
    }
}

/// The pid of the process holding [`CLAIM`], found through /proc/net/unix (this network
/// namespace's sockets) and the holders' /proc/PID/fd links; `None` if not found.
fn claim_holder() -> Option<u32> {
    let unix = std::fs::read_to_string("/proc/net/unix").ok()?;
    let want = format!("@{CLAIM}");
    let inode = unix.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() == 8 && f[7] == want).then(|| f[6].to_string())
    })?;
    let link = format!("socket:[{inode}]");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let pid: u32 = p.file_name().to_str()?.parse().ok()?;
        std::fs::read_dir(p.path().join("fd"))
            .ok()?
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == &*link))
            .then_some(pid)
    })
}

/// The ROOT of the initiator `pid` (its `--root DIR` or `--root=DIR`, else the default
/// `/dev/etherd`), read from its command line; `None` if that cannot be read.
fn holder_root(pid: u32) -> Option<String> {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmd
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let root = args
        .iter()
        .enumerate()
        .find_map(|(i, a)| match a.strip_prefix("--root") {
            Some("") => args.get(i + 1).cloned(),
            Some(v) => v.strip_prefix('=').map(str::to_string),
            None => None,
        });
    Some(root.unwrap_or_else(|| "/dev/etherd".into()))
}

/// Resolves `--nbd-tcp ADDR:PORT` (a name such as `localhost:10809` too) and refuses an
/// address that is not loopback unless `any` (`--nbd-tcp-any`).
fn resolve_nbd_tcp(s: &str, any: bool) -> Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let addr = s
        .to_socket_addrs()
        .with_context(|| format!("--nbd-tcp {s}: not an ADDR:PORT"))?
        .next()
        .with_context(|| format!("--nbd-tcp {s}: the name has no address"))?;
    if !addr.ip().is_loopback() && !any {
        anyhow::bail!(
            "--nbd-tcp {s}: {} is not a loopback address; NBD has no authentication, so \
             add --nbd-tcp-any to serve every AoE disk to the network anyway",
            addr.ip()
        );
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_tcp_is_loopback_unless_told_otherwise() {
        assert!(resolve_nbd_tcp("127.0.0.1:10809", false).is_ok());
        assert!(resolve_nbd_tcp("[::1]:10809", false).is_ok());
        let e = resolve_nbd_tcp("0.0.0.0:10809", false).unwrap_err();
        assert!(e.to_string().contains("--nbd-tcp-any"), "{e}");
        assert!(resolve_nbd_tcp("192.0.2.1:10809", false).is_err());
        assert!(resolve_nbd_tcp("0.0.0.0:10809", true).is_ok());
        assert!(resolve_nbd_tcp("nonsense", false).is_err());
    }
}
