//! Operations subcommands (issue 12): `aoe trace` and `aoe target` (the control tool),
//! flattened into `aoe`'s subcommand list.

use anyhow::Result;
use clap::Subcommand;

/// The operations subcommands.
#[derive(Debug, Subcommand)]
pub enum Ops {
    /// Show AoE frames on an interface as they pass, one decoded line each; -w writes pcap.
    Trace(crate::trace::TraceArgs),
    /// Ask a running aoe serve through its control socket: status, stats, show-config,
    /// show-macmask, show-reserve, clear-stats, monitor (ggaoectl's commands).
    Target(crate::target_ctl::TargetArgs),
}

/// Runs one of the operations subcommands.
pub fn run(o: Ops) -> Result<()> {
    match o {
        Ops::Trace(a) => crate::trace::run(a),
        Ops::Target(a) => crate::target_ctl::run(a),
    }
}
