//! The aoetools (release 36) as `aoe` subcommands and multi-call names.
//!
//! | aoetools name    | subcommand        | what it does here                                    |
//! |------------------|-------------------|------------------------------------------------------|
//! | `aoe-discover`   | `aoe discover`    | writes `ROOT/discover`                               |
//! | `aoe-stat`       | `aoe stat`        | one row per device, byte-identical to aoetools       |
//! | `aoe-interfaces` | `aoe interfaces`  | shows or sets `ROOT/interfaces`                      |
//! | `aoe-flush`      | `aoe flush`       | writes `ROOT/flush`                                  |
//! | `aoe-revalidate` | `aoe revalidate`  | writes `ROOT/revalidate`                             |
//! | `aoe-version`    | `aoe version`     | versions of these tools and of the drivers           |
//! | `aoe-sancheck`   | `aoe sancheck`    | raw-socket SAN check (no initiator needed)           |
//! | `aoeping`        | `aoe ping`        | raw Query Config, IDENTIFY and SMART                 |
//! | `aoecfg`         | `aoe cfg`         | raw Query Config: read, test, prefix, set, fset      |
//! | `aoe-mkdevs`     | `aoe mkdevs`      | explains why static nodes are not needed; fails      |
//! | `aoe-mkshelf`    | `aoe mkshelf`     | the same                                             |
//! | `coraid-update`  | `aoe coraid-update` | copies an update file to an update target          |
//! | `sos-linux`      | `aoe sos-linux`   | support report: versions, devices, err, logs         |
//!
//! The file-based tools talk to `aoe initiator` through its control files under ROOT
//! (`--root`, else `$AOE_ROOT`, else `/dev/etherd`), not to the kernel driver: aoetools'
//! shell scripts insist on character devices (`test -c /dev/etherd/discover`), which a FUSE
//! file system cannot offer, so they cannot drive our initiator.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aoe_sys::PacketSocket;
use aoe_wire::Frame;
use clap::{Args, Subcommand};

mod cfg;
mod coraid_update;
mod discover;
mod flush;
mod interfaces;
mod mkdevs;
mod ping;
mod revalidate;
mod sancheck;
mod sos;
mod stat;
mod version;

/// The aoetools subcommands (flattened into `aoe`'s own subcommand list).
#[derive(Debug, Subcommand)]
pub enum Tool {
    /// Trigger AoE discovery (aoe-discover): writes ROOT/discover.
    Discover(discover::DiscoverArgs),
    /// One row per AoE device, byte-identical to aoetools' aoe-stat.
    Stat(stat::StatArgs),
    /// Show or set the interfaces the initiator may use (aoe-interfaces).
    Interfaces(interfaces::InterfacesArgs),
    /// Forget down devices, all devices, or the named ones (aoe-flush).
    Flush(flush::FlushArgs),
    /// Re-query and re-IDENTIFY a device (aoe-revalidate).
    Revalidate(revalidate::RevalidateArgs),
    /// Versions of these tools and of the AoE drivers (aoe-version).
    Version(version::VersionArgs),
    /// Check each interface and path: up/down, MTU, payload, mismatches (aoe-sancheck).
    Sancheck(sancheck::SancheckArgs),
    /// Query Config, IDENTIFY and SMART with raw frames (aoeping).
    Ping(ping::PingArgs),
    /// Read or set a target's config string with raw frames (aoecfg).
    Cfg(cfg::CfgArgs),
    /// Legacy static device nodes (aoe-mkdevs): not needed here, explains why and fails.
    Mkdevs(mkdevs::MkArgs),
    /// Legacy static device nodes for one shelf (aoe-mkshelf): not needed here; fails.
    Mkshelf(mkdevs::MkArgs),
    /// Upload an update file to a CORAID appliance's update target (coraid-update).
    CoraidUpdate(coraid_update::CoraidUpdateArgs),
    /// Collect support information into a text file (sos-linux).
    SosLinux(sos::SosArgs),
}

/// The subcommand an aoetools name stands for, for multi-call by `argv[0]`.
pub fn multicall(name: &str) -> Option<&'static str> {
    Some(match name {
        "aoe-discover" => "discover",
        "aoe-stat" => "stat",
        "aoe-interfaces" => "interfaces",
        "aoe-flush" => "flush",
        "aoe-revalidate" => "revalidate",
        "aoe-version" => "version",
        "aoe-sancheck" => "sancheck",
        "aoeping" => "ping",
        "aoecfg" => "cfg",
        "aoe-mkdevs" => "mkdevs",
        "aoe-mkshelf" => "mkshelf",
        "coraid-update" => "coraid-update",
        "sos-linux" => "sos-linux",
        _ => return None,
    })
}

/// Runs one of the aoetools subcommands.
pub fn run(t: Tool) -> Result<()> {
    match t {
        Tool::Discover(a) => discover::run(a),
        Tool::Stat(a) => stat::run(a),
        Tool::Interfaces(a) => interfaces::run(a),
        Tool::Flush(a) => flush::run(a),
        Tool::Revalidate(a) => revalidate::run(a),
        Tool::Version(a) => version::run(a),
        Tool::Sancheck(a) => sancheck::run(a),
        Tool::Ping(a) => ping::run(a),
        Tool::Cfg(a) => cfg::run(a),
        Tool::Mkdevs(a) => mkdevs::run("aoe-mkdevs", a),
        Tool::Mkshelf(a) => mkdevs::run("aoe-mkshelf", a),
        Tool::CoraidUpdate(a) => coraid_update::run(a),
        Tool::SosLinux(a) => sos::run(a),
    }
}

/// `--root`: where `aoe initiator` keeps its control files.
#[derive(Debug, Clone, Args)]
pub struct RootArg {
    /// The initiator's control directory [default: $AOE_ROOT, else /dev/etherd].
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
}

/// A resolved control root: `ROOT/discover` exists, so an initiator is running there.
pub struct Root {
    dir: PathBuf,
}

impl RootArg {
    /// The directory named by `--root`, `$AOE_ROOT` or the default, unchecked.
    fn dir(&self) -> PathBuf {
        self.root
            .clone()
            .or_else(|| std::env::var_os("AOE_ROOT").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/dev/etherd"))
    }

    /// Resolves the root and checks that an initiator serves it.
    pub fn open(&self) -> Result<Root> {
        let dir = self.dir();
        if !dir.join("discover").exists() {
            bail!(
                "no AoE initiator running at {} ({}/discover is missing); start one with \
                 `aoe initiator --root {}` or point --root / AOE_ROOT at it",
                dir.display(),
                dir.display(),
                dir.display()
            );
        }
        Ok(Root { dir })
    }
}

impl Root {
    /// `ROOT/NAME`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The attribute tree, laid out like `/sys`.
    pub fn sysfs(&self) -> PathBuf {
        self.dir.join("sysfs")
    }

    /// The root directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `text` to control file `name` in one `write(2)`, as the kernel driver's
    /// character devices expect.
    pub fn control(&self, name: &str, text: &str) -> Result<()> {
        let path = self.file(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        f.write_all(text.as_bytes())
            .with_context(|| format!("{}: write {:?} refused", path.display(), text.trim()))
    }

    /// Whether device `name` (`eX.Y`) is known to the initiator.
    pub fn has_device(&self, name: &str) -> bool {
        !name.contains('/')
            && self
                .sysfs()
                .join("block")
                .join(format!("etherd!{name}"))
                .is_dir()
    }
}

/// The capacity a tool that sends only LBA48 commands (`aoe read`, `aoe bench`) may use:
/// the page's claim cut to what a 48-bit LBA reaches, as the initiator's engine cuts it
/// (aoe-proto `identify_done`). A sector past 2^48 would go out as the one 2^48 below it
/// (`AtaPacket::set_lba` keeps the low 48 bits): its data taken for another sector's, or
/// a write put over it. A cut claim is said on standard error unless `quiet`.
pub fn lba48_capacity(addr: aoe_wire::TargetAddr, claimed: u64, quiet: bool) -> u64 {
    let reach = aoe_wire::identify::LBA48_REACH;
    if claimed > reach && !quiet {
        eprintln!(
            "{addr}: IDENTIFY claims {claimed} sectors; LBA48 commands reach {reach}: using {reach}"
        );
    }
    claimed.min(reach)
}

/// A usage error (exit status 2), with the message shown.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    crate::serve::UsageError(msg.into()).into()
}

/// Flushes standard output and exits with `code` without an error message: for the exit
/// statuses aoetools give without printing anything (`aoe-stat` when no row matched, like
/// its final `grep`).
pub fn exit_quietly(code: i32) -> ! {
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

/// aoetools' `hex_print(out, buf, n, sep)`: `%02x` plus `sep` per byte, a newline after
/// every 16 bytes (aoeping.c).
pub fn hex_print(out: &mut String, bytes: &[u8], sep: &str) {
    use std::fmt::Write as _;
    for (i, b) in bytes.iter().enumerate() {
        let _ = write!(out, "{b:02x}{sep}");
        if (i + 1) % 16 == 0 {
            out.push('\n');
        }
    }
}

/// C's `atoi`: optional blanks and sign, then decimal digits; anything else ends the number
/// (aoeping parses shelf, slot, `-s` and `-t` this way).
pub fn atoi(s: &str) -> i64 {
    let s = s.trim_start();
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let mut v: i64 = 0;
    for c in digits.bytes().take_while(u8::is_ascii_digit) {
        v = v.wrapping_mul(10).wrapping_add(i64::from(c - b'0'));
    }
    if neg {
        -v
    } else {
        v
    }
}

/// C's `strtoul(s, 0, 0)`: `0x` hex, leading-`0` octal or decimal (aoecfg's shelf and slot).
pub fn strtoul(s: &str) -> u64 {
    let s = s.trim_start();
    let s = s.strip_prefix('+').unwrap_or(s);
    let (radix, body) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (16, h)
    } else if s.len() > 1 && s.starts_with('0') {
        (8, &s[1..])
    } else {
        (10, s)
    };
    let mut v: u64 = 0;
    for c in body.chars().map_while(|c| c.to_digit(radix)) {
        v = v.wrapping_mul(u64::from(radix)).wrapping_add(u64::from(c));
    }
    v
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A MAC address as aoetools print it: 12 lower-case hex digits, no separators.
pub fn mac_hex(mac: &[u8]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect()
}

/// Ctrl-C / SIGTERM: the raw-frame tools wait in short slices and leave cleanly (exit 130)
/// when this is set, where aoetools would simply be killed.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    Ok(stop)
}

/// Opens an AoE socket on `netif`, with an error naming the interface, and a receive
/// buffer of [`aoe_sys::RECV_BUFFER_BYTES`] (8 MiB): a broadcast Query Config (`aoecfg`,
/// `aoeping` of a wildcard) is answered by every export on the segment at once; with the
/// default buffer `aoe cfg -t 3 65535 255` listed 256 of the 1024 exports a target served
/// (session 35).
pub fn open_socket(netif: &str) -> Result<PacketSocket> {
    if aoe_sys::interface_info(netif).is_err() {
        bail!("{netif:?} is not a network interface (in this network namespace)");
    }
    let sock = PacketSocket::open(netif)
        .with_context(|| format!("cannot open an AoE socket on {netif}"))?;
    // Best effort, as elsewhere: without CAP_NET_ADMIN the kernel's rmem_max caps it.
    let _ = sock.set_recv_buffer(aoe_sys::RECV_BUFFER_BYTES);
    Ok(sock)
}

/// Receives frames until `accept` returns true for one (returning its length in `buf`),
/// `deadline` passes (`None`) or `stop` is set (exits 130, the shell's status for SIGINT).
pub fn recv_until(
    sock: &PacketSocket,
    buf: &mut [u8],
    deadline: Option<Instant>,
    stop: &AtomicBool,
    mut accept: impl FnMut(&[u8]) -> bool,
) -> Result<Option<usize>> {
    loop {
        if stop.load(Ordering::Relaxed) {
            exit_quietly(130);
        }
        let mut slice = Duration::from_millis(100);
        if let Some(d) = deadline {
            let now = Instant::now();
            if now >= d {
                return Ok(None);
            }
            slice = slice.min(d - now);
        }
        let mut fds = [aoe_sys::PollFd::new(std::os::fd::AsRawFd::as_raw_fd(sock))];
        match aoe_sys::poll(&mut fds, Some(slice)) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("poll"),
        }
        while let Some(meta) = sock.recv(buf).context("read network")? {
            if accept(&buf[..meta.len]) {
                return Ok(Some(meta.len));
            }
        }
    }
}

/// A view of the AoE header of a received frame, if it is one (EtherType 0x88A2 and the
/// whole 24-byte header present), through aoe-wire's [`Frame`]: aoetools' `dat.h` fields.
pub fn aoe_frame(f: &[u8]) -> Option<Frame<&[u8]>> {
    Frame::new_checked(f).ok()
}

/// Whether `f` is a response to `tag` from `shelf.slot` (0xffff and 0xff match any shelf
/// and slot, as in aoetools' `aoe_tag` filters).
pub fn is_answer(f: &[u8], shelf: u16, slot: u8, tag: u32) -> bool {
    aoe_frame(f).is_some_and(|h| {
        (shelf == 0xffff || h.major() == shelf)
            && (slot == 0xff || h.minor() == slot)
            && h.tag().0 == tag
            && h.is_response()
    })
}
