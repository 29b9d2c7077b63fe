//! `aoe-version`: versions of the tools and of the AoE initiators, in aoetools' layout
//! (`printf "%22s:\t%s\n" description value`).
//!
//! aoetools prints its release, the installed kernel driver (`modinfo aoe`) and the running
//! one (`/sys/module/aoe/version`, `(none)` when not loaded). This prints those three lines,
//! the first naming this suite and the aoetools release it follows, and adds one for the
//! `aoe initiator` serving ROOT (found through `/proc/*/cmdline`).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use super::RootArg;

/// The aoetools release whose behaviour these tools follow.
pub const AOETOOLS_RELEASE: &str = "36";

/// Show versions of these tools, of the kernel aoe driver and of the running initiator.
#[derive(Debug, Args)]
pub struct VersionArgs {
    #[command(flatten)]
    root: RootArg,
}

fn line(desc: &str, val: &str) -> String {
    format!("{desc:>22}:\t{val}\n")
}

/// `modinfo aoe`'s `version:` field, as aoetools reads it.
fn installed_driver() -> String {
    std::process::Command::new("modinfo")
        .args(["-F", "version", "aoe"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8(o.stdout)
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "(unknown)".into())
}

fn running_driver() -> String {
    if !Path::new("/sys/module/aoe").is_dir() {
        return "(none)".into();
    }
    std::fs::read_to_string("/sys/module/aoe/version")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "(unknown)".into())
}

/// The `aoe initiator` process serving `root`: its pid and executable.
fn initiator_process(root: &Path) -> Option<(u32, PathBuf)> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.iter().any(|a| a == "initiator") {
            continue;
        }
        let r = args
            .iter()
            .position(|a| a == "--root")
            .and_then(|i| args.get(i + 1).cloned())
            .or_else(|| {
                args.iter()
                    .find_map(|a| a.strip_prefix("--root=").map(str::to_string))
            })
            .unwrap_or_else(|| "/dev/etherd".into());
        if Path::new(&r) == root {
            let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
            return Some((pid, exe));
        }
    }
    None
}

/// Runs `aoe-version`.
pub fn run(a: VersionArgs) -> Result<()> {
    print!("{}", report(&a.root.dir()));
    Ok(())
}

/// What `aoe-version` prints for the initiator at `root` (also a section of `sos-linux`).
pub fn report(root: &Path) -> String {
    let ours = env!("CARGO_PKG_VERSION");
    let mut s = line(
        "aoetools",
        &format!("aoe {ours} (aoetools {AOETOOLS_RELEASE} compatible)"),
    );
    s += &line("installed aoe driver", &installed_driver());
    s += &line("running aoe driver", &running_driver());
    let running = if !root.join("discover").exists() {
        "(none)".to_string()
    } else {
        match initiator_process(root) {
            Some((pid, exe)) => {
                let me = std::env::current_exe().ok();
                let same = me.as_ref().is_some_and(|m| {
                    m == &exe || std::fs::canonicalize(m).ok() == std::fs::canonicalize(&exe).ok()
                });
                if same {
                    format!("aoe {ours} (pid {pid}, {})", root.display())
                } else {
                    format!(
                        "(unknown version: pid {pid}, {}, {})",
                        exe.display(),
                        root.display()
                    )
                }
            }
            None => format!("(unknown: something serves {})", root.display()),
        }
    };
    s += &line("running aoe initiator", &running);
    s
}
