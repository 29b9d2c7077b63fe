//! `aoe-discover`: asks the initiator to broadcast a Query Config on every allowed interface.
//!
//! aoetools writes a newline to `/dev/etherd/discover` (and refuses anything but a character
//! device there); this writes the same to `ROOT/discover`.

use anyhow::Result;
use clap::Args;

use super::RootArg;

/// Trigger discovery: the initiator broadcasts a Query Config on its interfaces.
#[derive(Debug, Args)]
pub struct DiscoverArgs {
    #[command(flatten)]
    root: RootArg,
}

/// Runs `aoe-discover`.
pub fn run(a: DiscoverArgs) -> Result<()> {
    a.root.open()?.control("discover", "\n")
}
