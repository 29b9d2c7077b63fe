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
aoetools' aoe-stat reads the attributes with sysfs_dir=ROOT/sysfs."
)]
pub struct InitiatorArgs {
    /// Where control and device files appear.
    #[arg(long, default_value = "/dev/etherd", value_name = "DIR")]
    root: PathBuf,
    /// Whitespace-separated interfaces AoE may use (like aoe_iflist); default: all.
    #[arg(long, value_name = "\"IF ...\"")]
    iflist: Option<String>,
    /// Seconds without an answer before a device is down (like aoe_deadsecs); 0 = forever.
    #[arg(long, default_value_t = 180, value_name = "N")]
    deadsecs: u64,
    /// Cap on outstanding frames per target (like aoe_maxout; the driver's code uses 64).
    #[arg(long, default_value_t = 64, value_name = "N")]
    maxout: u16,
    /// Attach each device that comes up to a loop device with partition scan.
    #[arg(long = "loop")]
    loop_devices: bool,
}

/// Runs `aoe initiator`.
pub fn run(a: InitiatorArgs) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    if a.maxout == 0 {
        anyhow::bail!("--maxout must be at least 1");
    }
    let iflist = a
        .iflist
        .as_deref()
        .unwrap_or("")
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    aoe_initiator::run(
        aoe_initiator::Options {
            root: a.root,
            iflist,
            deadsecs: a.deadsecs,
            maxout: a.maxout,
            loop_devices: a.loop_devices,
        },
        stop,
    )
}
