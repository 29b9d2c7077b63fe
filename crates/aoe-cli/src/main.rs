//! `aoe`: the ATA-over-Ethernet suite in one binary.
//!
//! Subcommands for the target (`serve`), and later the initiator and the aoetools. Invoked
//! through a link named after a classic tool (`vblade`, ...), it behaves as that tool
//! (multi-call, decided by `argv[0]`).
#![forbid(unsafe_code)]

mod bench;
mod initiator;
mod read;
mod serve;
mod tools;

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// ATA over Ethernet (AoEr11): target, initiator and tools.
#[derive(Debug, Parser)]
#[command(name = "aoe", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Export a file or block device as an AoE target (vblade-compatible arguments).
    Serve(serve::ServeArgs),
    /// Run the AoE initiator: discovery, /dev/etherd-style control files, device files.
    Initiator(initiator::InitiatorArgs),
    /// Measure target throughput against vblade in one run (private namespaces).
    Bench(bench::BenchArgs),
    /// Read an AoE device into a file with raw frames (a diagnostic needing no initiator).
    Read(read::ReadArgs),
    /// The aoetools: stat, discover, interfaces, flush, revalidate, version, sancheck, ping, cfg.
    #[command(flatten)]
    Tool(tools::Tool),
}

/// Tools reachable by the name the binary is invoked as.
fn multicall(argv0: &OsString) -> Option<&'static str> {
    let name = Path::new(argv0).file_name()?.to_str()?;
    match name {
        "vblade" => Some("serve"),
        other => tools::multicall(other),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AOE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    if let Some(sub) = args.first().and_then(multicall) {
        args.insert(1, sub.into());
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging();
    let result = match cli.command {
        Command::Serve(a) => serve::run(a),
        Command::Read(a) => read::run(a),
        Command::Tool(t) => tools::run(t),
        Command::Bench(a) => bench::run(a),
        Command::Initiator(a) => initiator::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aoe: {e:#}");
            if e.downcast_ref::<serve::UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
