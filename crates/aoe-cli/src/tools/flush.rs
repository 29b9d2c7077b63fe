//! `aoe-flush [-a] [eX.Y ...]`: makes the initiator forget devices. As aoetools' script:
//! no arguments flushes the devices that are down, `-a` all of them, names only those
//! (each checked first: `"eX.Y" is not an aoe device`), one write per name.

use anyhow::{bail, Result};
use clap::Args;

use super::RootArg;

/// Forget devices: the down ones, all (-a), or the named ones.
#[derive(Debug, Args)]
pub struct FlushArgs {
    #[command(flatten)]
    root: RootArg,
    /// Flush all devices, also those that are up.
    #[arg(short = 'a', conflicts_with = "devices")]
    all: bool,
    /// Devices to flush (eX.Y); none: every device that is down.
    #[arg(value_name = "eX.Y")]
    devices: Vec<String>,
}

/// Runs `aoe-flush`.
pub fn run(a: FlushArgs) -> Result<()> {
    let root = a.root.open()?;
    if a.all {
        return root.control("flush", "all");
    }
    if a.devices.is_empty() {
        return root.control("flush", "\n");
    }
    let missing: Vec<&str> = a
        .devices
        .iter()
        .filter(|d| !root.has_device(d))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        bail!(
            "no such device: {} is not an aoe device at {}",
            missing
                .iter()
                .map(|d| format!("{d:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            root.dir().display()
        );
    }
    for d in &a.devices {
        root.control("flush", d)?;
    }
    Ok(())
}
