//! `aoe-revalidate eX.Y`: asks the initiator to query and IDENTIFY the device again (new
//! size, new paths), as aoetools does through `/dev/etherd/revalidate`.

use anyhow::{bail, Result};
use clap::Args;

use super::RootArg;

/// Revalidate a device: re-query its targets and re-read its size.
#[derive(Debug, Args)]
pub struct RevalidateArgs {
    #[command(flatten)]
    root: RootArg,
    /// The device, as aoe-stat names it (eX.Y).
    #[arg(value_name = "eX.Y")]
    device: String,
}

/// Runs `aoe-revalidate`.
pub fn run(a: RevalidateArgs) -> Result<()> {
    let root = a.root.open()?;
    if !root.has_device(&a.device) {
        bail!(
            "no such device {:?} at {} (aoe-stat lists the devices)",
            a.device,
            root.dir().display()
        );
    }
    root.control("revalidate", &format!("{}\n", a.device))
        .map_err(|e| e.context("aoe-revalidate: revalidate failed"))
}
