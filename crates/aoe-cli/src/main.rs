//! `aoe`: the ATA-over-Ethernet suite in one binary.
//!
//! Subcommands for the target (`serve`), and later the initiator and the aoetools. Invoked
//! through a link named after a classic tool (`vblade`, ...), it behaves as that tool
//! (multi-call, decided by `argv[0]`).
#![forbid(unsafe_code)]

#[macro_use]
mod out;

mod bench;
mod demo;
mod generate;
mod initiator;
mod metrics;
mod ops;
mod read;
mod serve;
mod target_ctl;
mod tools;
mod trace;

use std::ffi::OsString;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// `aoe --version`: the version and the optional features built in, so a script (and a
/// user) can tell whether this binary serves `rbd:` images (scripts/bench-rbd.sh checks).
#[cfg(feature = "rbd")]
const LONG_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\nfeatures: rbd");
#[cfg(not(feature = "rbd"))]
const LONG_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\nfeatures: (none)");

/// ATA over Ethernet (AoEr11): target, initiator and tools.
#[derive(Debug, Parser)]
#[command(name = "aoe", version, long_version = LONG_VERSION, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Export a file or block device as an AoE target (vblade-compatible arguments).
    Serve(Box<serve::ServeArgs>),
    /// Run the AoE initiator: discovery, /dev/etherd-style control files, device files.
    Initiator(initiator::InitiatorArgs),
    /// Drive an AoE target with reads, writes or a verify pass; report MB/s, IOPS, latency.
    Bench(bench::BenchArgs),
    /// The whole job on a private link: target, initiator, aoe-stat, ext4 written and read back.
    Demo(demo::DemoArgs),
    /// Write man pages or shell completions (bash, zsh, fish) generated from these definitions.
    Generate(generate::GenerateArgs),
    /// Read an AoE device into a file with raw frames (a diagnostic needing no initiator).
    Read(read::ReadArgs),
    /// The aoetools: stat, discover, interfaces, flush, revalidate, version, sancheck, ping, cfg,
    /// coraid-update, sos-linux.
    #[command(flatten)]
    Tool(tools::Tool),
    #[command(flatten)]
    Ops(ops::Ops),
}

/// Tools reachable by the name the binary is invoked as: the name and its subcommand.
fn multicall(argv0: &OsString) -> Option<(&str, &'static str)> {
    let name = Path::new(argv0).file_name()?.to_str()?;
    let sub = match name {
        "vblade" => "serve",
        other => tools::multicall(other)?,
    };
    Some((name, sub))
}

/// Every multi-call name (the links scripts/install-links.sh and scripts/install.sh make).
const MULTICALL_NAMES: &[&str] = &[
    "vblade",
    "aoe-discover",
    "aoe-stat",
    "aoe-interfaces",
    "aoe-flush",
    "aoe-revalidate",
    "aoe-version",
    "aoe-sancheck",
    "aoeping",
    "aoecfg",
    "aoe-mkdevs",
    "aoe-mkshelf",
    "coraid-update",
    "sos-linux",
];

/// Each multi-call name with the subcommand it stands for.
fn multicall_table() -> Vec<(&'static str, &'static str)> {
    MULTICALL_NAMES
        .iter()
        .filter_map(|n| multicall(&OsString::from(n)).map(|(_, sub)| (*n, sub)))
        .collect()
}

/// vblade's own usage line (vblade 24 `usage()`), printed by a bare `vblade`.
const VBLADE_USAGE: &str = "usage: vblade [-b bufcnt] [-o offset] [-l length] [-d ] [-s] [-r] \
                            [ -m mac[,mac...] ] shelf slot netif filename";

/// The command line parser; called by a multi-call name, the subcommand's usage line names
/// the tool as it was called (`Usage: aoe-stat [OPTIONS] [REGEX]`, as aoetools print it),
/// not `aoe-stat stat`.
fn parser(called: Option<(&str, &str)>) -> clap::Command {
    let cmd = Cli::command();
    let Some((name, sub)) = called else {
        return cmd;
    };
    let name = name.to_owned();
    cmd.mut_subcommand(sub, move |sc| {
        let usage = sc.clone().bin_name(&name).render_usage().to_string();
        let usage = usage
            .strip_prefix("Usage: ")
            .unwrap_or(&usage)
            .trim_end()
            .to_owned();
        sc.override_usage(usage)
    })
}

/// Logs to stderr, filtered by `AOE_LOG` (tracing's env-filter syntax; default `info`).
/// fuser logs a multi-line `WARN [Not Implemented] access(...)` for every access(2) on the
/// FUSE files (its default for an operation we leave to the kernel's permission checks), so
/// its target is held at `error` unless `AOE_LOG` names `fuser` itself. Its `fuser::reply`
/// target is off: it logs an error for each device-file read, whose reply we write ourselves
/// and whose fuser reply object the kernel then refuses as intended (aoe-fuse `fs.rs`
/// `answer_held`).
fn init_logging() {
    let given = std::env::var("AOE_LOG").ok();
    let spec = given.clone().unwrap_or_else(|| "info".to_owned());
    let spec = if spec.contains("fuser") {
        spec
    } else {
        format!("{spec},fuser=error,fuser::reply=off")
    };
    // A value that does not parse falls back to `info`, said in a warning once the
    // subscriber is up (session 29's audit: `AOE_LOG=aoe=verbose` logged at info without a
    // word, and its user looked for debug lines that never came).
    let (filter, bad) = match tracing_subscriber::EnvFilter::try_new(&spec) {
        Ok(f) => (f, None),
        Err(e) => (
            tracing_subscriber::EnvFilter::new("info,fuser=error,fuser::reply=off"),
            Some(e),
        ),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written (stderr a pipe whose reader went) is dropped.
        // With this on, tracing-subscriber reports the failure with `eprintln!` on the same
        // closed stderr, which panics: `aoe serve ... 2>&1 | head` killed the target (exit
        // 101) at its next log line (session 27, operator's audit).
        .log_internal_errors(false)
        .init();
    // A bare word that is no level and no module of ours (`AOE_LOG=debugg`) parses as a
    // module name and turns every other line off, this warning too: written past the
    // subscriber (session 29's audit).
    if let Some(given) = &given {
        for word in strange_targets(given) {
            let _ = writeln!(
                std::io::stderr().lock(),
                "aoe: AOE_LOG names {word:?}, which is no level (trace, debug, info, warn, \
                 error, off) and no module of aoe: taken as a module name, it turns every \
                 other log line off"
            );
        }
    }
    if let Some(e) = bad {
        let given = given.unwrap_or_default();
        tracing::warn!(
            "AOE_LOG={given:?} is not a log filter ({e}); logging at info (e.g. AOE_LOG=debug, \
             AOE_LOG=aoe_target=debug)"
        );
    }
}

/// The directives of an `AOE_LOG` value that are a bare word naming neither a level nor a
/// module of ours (`aoe*`) or of fuser: most likely a level mistyped.
fn strange_targets(spec: &str) -> Vec<&str> {
    spec.split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && !d.contains(['=', '[', '{']))
        .filter(|d| {
            d.parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        })
        .filter(|d| !d.starts_with("aoe") && !d.starts_with("fuser"))
        .collect()
}

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let argv0 = args.first().cloned().unwrap_or_default();
    let called = multicall(&argv0);
    if let Some((name, sub)) = called {
        if name == "vblade" && args.len() == 1 {
            // vblade without arguments prints its usage and exits 1.
            eprintln!("{VBLADE_USAGE}");
            return ExitCode::from(1);
        }
        args.insert(1, sub.into());
    }
    let parsed = parser(called)
        .try_get_matches_from(&args)
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging();
    if matches!(
        cli.command,
        Command::Bench(_) | Command::Read(_) | Command::Generate(_) | Command::Tool(_)
    ) {
        // Tools whose only pipe is their standard output: a closed one ends them as it ends
        // `cat` (`aoe bench ... | head -1`), also where a library prints for them
        // (clap_complete panics on a failed write). The daemons, `aoe target` (its control
        // socket's EPIPE names the daemon's refusal), `aoe trace` (it finishes its pcap file)
        // and `aoe demo` (it removes what it made) keep it ignored.
        aoe_sys::sigpipe_default();
    }
    if matches!(
        cli.command,
        Command::Serve(_) | Command::Initiator(_) | Command::Bench(_) | Command::Demo(_)
    ) {
        // One descriptor per export (and per interface socket): the usual soft limit of
        // 1024 stopped `aoe serve --config` of 1024 exports with EMFILE while the hard
        // limit allowed far more (session 35); daemons raise it, as systemd.exec(5) asks.
        if let Err(e) = aoe_sys::raise_nofile_limit() {
            tracing::warn!("cannot raise the open-file limit (RLIMIT_NOFILE): {e}");
        }
    }
    let result = match cli.command {
        Command::Serve(a) => serve::run(*a),
        Command::Read(a) => read::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Generate(a) => generate::run(a, Cli::command(), &multicall_table()),
        Command::Tool(t) => tools::run(t),
        Command::Bench(a) => bench::run(a),
        Command::Initiator(a) => initiator::run(a),
        Command::Ops(o) => ops::run(o),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Named as called: `aoe-stat: no AoE initiator ...`, as a tool's own name prefixes
            // its messages.
            let me = called.map_or("aoe", |(name, _)| name);
            // Not `eprintln!`: with standard error a pipe whose reader went (`aoe serve ...
            // 2>&1 | head`) and SIGPIPE ignored (the daemons), it panicked and the exit
            // status became 101 instead of the error's (session 29's audit).
            let _ = writeln!(
                std::io::stderr().lock(),
                "{me}: {e:#}{}",
                aoe_target::nofile_hint(&e)
            );
            if e.downcast_ref::<aoe_target::WorkLost>().is_some() {
                // Stores left running under their own threads (librados'): no library
                // destructor may run under them (`aoe_target::WorkLost`).
                aoe_sys::exit_now(1);
            }
            if e.downcast_ref::<serve::UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Session 29: a mistyped level is told from a module filter.
    #[test]
    fn strange_log_targets_are_the_bare_words_that_are_no_level_and_not_ours() {
        assert_eq!(strange_targets("debugg"), ["debugg"]);
        assert_eq!(strange_targets("info, infoo ,aoe_target=debug"), ["infoo"]);
        for fine in [
            "debug",
            "INFO",
            "off",
            "aoe_target",
            "aoe_target=trace",
            "fuser",
            "warn,aoe=debug",
            "",
        ] {
            assert!(strange_targets(fine).is_empty(), "{fine}");
        }
    }

    #[test]
    fn every_multicall_name_has_a_subcommand() {
        assert_eq!(multicall_table().len(), MULTICALL_NAMES.len());
    }
}
