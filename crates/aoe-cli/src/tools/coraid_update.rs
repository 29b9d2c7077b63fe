//! `coraid-update UPDATE-FILE DEVICE`: copies an update file to a CORAID appliance's update
//! target, as aoetools 36's `coraid-update` script does, through `aoe initiator`'s ROOT.
//!
//! The script (release 25 onwards, unchanged in 36) checks, in this order, and stops with a
//! message on standard error and exit status 1 at the first failure:
//! 1. the device is an AoE device: its basename is a row of `aoe-stat`;
//! 2. it is small enough to be an update target: at most 70000 KiB (its size in
//!    `/proc/partitions`; an update LUN shows 40000 there);
//! 3. a file named `*.tarc` is a tar archive the local `tar tf` can list;
//! 4. the update file is readable;
//!
//! then writes the file to the device (`dd if=FILE of=DEVICE`) and `sync`s. It prints nothing
//! on success.
//!
//! Here the device is a file under ROOT (`ROOT/eX.Y`, or just `eX.Y`), its size comes from
//! the initiator's attribute tree (`ROOT/sysfs/block/etherd!eX.Y/size`, in sectors), and the
//! write ends with an fsync of the device file, which the initiator acknowledges only once
//! the target has answered every write. Two deliberate differences: an update file larger
//! than the device is refused before anything is written (dd would write what fits and then
//! fail), and a usage error exits 2 as every parser usage error here does (the script
//! exits 1).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::RootArg;

/// Largest update target in KiB: aoetools' `max=70000` against `/proc/partitions`.
pub const MAX_UPDATE_TARGET_KIB: u64 = 70_000;

/// Upload an update file to a CORAID appliance's update target (coraid-update).
#[derive(Debug, Args)]
#[command(
    after_help = "The device is the update target's file under ROOT, e.g. /dev/etherd/e100.40 \
(or just e100.40). Prints nothing and exits 0 once the file is written and flushed."
)]
pub struct CoraidUpdateArgs {
    #[command(flatten)]
    root: RootArg,
    /// The update file (an SR `.tarc` file, or any file not ending in `.tarc`).
    #[arg(value_name = "UPDATE-FILE")]
    update: PathBuf,
    /// The update target: ROOT/eX.Y, or eX.Y.
    #[arg(value_name = "AOE-DEVICE")]
    device: PathBuf,
}

/// Runs `coraid-update`.
pub fn run(a: CoraidUpdateArgs) -> Result<()> {
    let root = a.root.open()?;
    let dev_arg = a.device.display().to_string();
    // 1. An AoE device of this initiator: the basename is an aoe-stat row, and a path names
    //    the file under ROOT.
    let name = a
        .device
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    let under_root = match a.device.parent() {
        None => true,
        Some(p) if p.as_os_str().is_empty() => true,
        Some(p) => same_dir(p, root.dir()),
    };
    if name.is_empty() || !root.has_device(&name) || !under_root {
        bail!(
            "coraid-update Error: \"{dev_arg}\" is not an AoE target (not a device of the \
             initiator at {}; aoe-stat lists them)",
            root.dir().display()
        );
    }
    // 2. Small enough to be an update target.
    let size_path = root
        .sysfs()
        .join("block")
        .join(format!("etherd!{name}"))
        .join("size");
    let sectors: u64 = std::fs::read_to_string(&size_path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| {
            format!(
                "Error coraid-update: could not get size of {dev_arg} ({} unreadable)",
                size_path.display()
            )
        })?;
    let kib = sectors / 2;
    if kib > MAX_UPDATE_TARGET_KIB {
        bail!(
            "Error coraid-update: {dev_arg} is too large to be an update target \
             ({kib} KiB, at most {MAX_UPDATE_TARGET_KIB})"
        );
    }
    // 3. A .tarc file must list with tar.
    let upd = a.update.display().to_string();
    if upd.ends_with(".tarc") {
        let status = Command::new("tar")
            .arg("tf")
            .arg(&a.update)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(_) => {
                bail!("coraid-update Error: \"{upd}\" does not appear to be a valid tarc file")
            }
            Err(e) => bail!(
                "coraid-update Error: cannot run tar to check \"{upd}\" ({e}); install the \
                 Debian package tar"
            ),
        }
    }
    // 4. Readable.
    let mut src = File::open(&a.update)
        .map_err(|e| anyhow::anyhow!("coraid-update Error: \"{upd}\" is not readable ({e})"))?;
    let len = src
        .metadata()
        .map(|m| m.len())
        .map_err(|e| anyhow::anyhow!("coraid-update Error: \"{upd}\" is not readable ({e})"))?;
    let capacity = sectors * 512;
    if len > capacity {
        bail!(
            "coraid-update Error: \"{upd}\" ({len} bytes) does not fit {dev_arg} \
             ({capacity} bytes); nothing written"
        );
    }
    // Send it over: write, then flush to the target.
    let dev_path = root.file(&name);
    copy(&mut src, &dev_path).map_err(|e| {
        anyhow::anyhow!(
            "coraid-update Error: could not successfully write \"{upd}\" to \"{dev_arg}\" ({e:#})"
        )
    })
}

/// Writes all of `src` at the start of `dev` (no truncation: it is a device) and fsyncs.
fn copy(src: &mut File, dev: &Path) -> Result<()> {
    let mut out = OpenOptions::new()
        .write(true)
        .open(dev)
        .with_context(|| format!("cannot open {}", dev.display()))?;
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("read"),
        };
        out.write_all(&buf[..n]).context("write")?;
    }
    out.sync_all().context("flush")
}

/// Whether two directory paths name the same directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}
