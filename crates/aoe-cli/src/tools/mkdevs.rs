//! `aoe-mkdevs` and `aoe-mkshelf`: aoetools create static device nodes (`mknod`, major 152,
//! minor `(shelf*16+slot)*16`) for the kernel driver with `aoe_dyndevs=0`. Neither applies
//! here, so both say why and fail.

use anyhow::{bail, Result};
use clap::Args;

/// Arguments accepted (and ignored) for compatibility: aoe-mkdevs DIR, aoe-mkshelf DIR SHELF.
#[derive(Debug, Args)]
pub struct MkArgs {
    /// Ignored (aoetools: the directory and shelf to create nodes for).
    #[arg(value_name = "ARGS", num_args = 0..)]
    args: Vec<String>,
}

/// Runs `aoe-mkdevs` / `aoe-mkshelf`: always an error. The message does not start with
/// `name`: the error line's prefix is already the program's name (`aoe-mkdevs: ...`);
/// until session 27 it said it twice.
pub fn run(_name: &str, _a: MkArgs) -> Result<()> {
    bail!(
        "static device nodes are not needed: `aoe initiator` creates a file for each \
         device and partition under its root (ROOT/eX.Y, ROOT/eX.YpN) as devices appear, and \
         the kernel driver's nodes come from udev (aoe_dyndevs=1); nodes made with mknod could \
         address neither"
    )
}
