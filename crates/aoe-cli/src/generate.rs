//! `aoe generate`: man pages and shell completions, made from the clap definitions
//! (clap_mangen, clap_complete), so they never drift from `--help`.
//!
//! Pages: `aoe.1`, one `aoe-SUB.1` per subcommand, and one page per multi-call name that is
//! not already such a page (`vblade.1`, `aoeping.1`, `aoecfg.1`, `coraid-update.1`,
//! `sos-linux.1`; `aoe-stat` is both the link and `aoe stat`, one page). Completions: one
//! file for `aoe` and one per multi-call name, named as each shell looks them up
//! (bash-completion: `NAME`, zsh: `_NAME`, fish: `NAME.fish`).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use clap_complete::Shell;

/// Write man pages or shell completions, generated from the command-line definitions.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, Subcommand)]
enum What {
    /// Write section-1 man pages into DIR: aoe.1, aoe-SUB.1 per subcommand, and one per
    /// multi-call name (vblade.1, aoeping.1, ...).
    Man {
        /// Directory to write the pages into (created if missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Print the completion script of `aoe` for SHELL; with --dir, write one file per
    /// command name (aoe and every multi-call name) there instead.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_name = "SHELL")]
        shell: Shell,
        /// Write files here (bash: NAME, zsh: _NAME, fish: NAME.fish) instead of stdout.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Runs `aoe generate`. `cli` is the full `aoe` command; `multicall` the multi-call names
/// with the subcommand each stands for.
pub fn run(a: GenerateArgs, cli: clap::Command, multicall: &[(&str, &str)]) -> Result<()> {
    match a.what {
        What::Man { dir } => {
            let n = man_pages(&cli, multicall, &dir)?;
            eprintln!("wrote {n} man pages to {}", dir.display());
            Ok(())
        }
        What::Completions { shell, dir: None } => {
            let mut cmd = cli;
            clap_complete::generate(shell, &mut cmd, "aoe", &mut std::io::stdout());
            Ok(())
        }
        What::Completions {
            shell,
            dir: Some(dir),
        } => {
            let n = completions(shell, &cli, multicall, &dir)?;
            eprintln!("wrote {n} {shell} completion files to {}", dir.display());
            Ok(())
        }
    }
}

/// The subcommand `sub` of `cli` as a command of its own called `name` (for a multi-call
/// link) with its usage line naming it so.
fn standalone(cli: &clap::Command, sub: &str, name: &str) -> Result<clap::Command> {
    let sc = cli
        .find_subcommand(sub)
        .with_context(|| format!("no subcommand {sub}"))?
        .clone();
    Ok(page_command(sc, name, name.to_owned()))
}

/// `cmd` as its page presents it: named `name` (the page's and its references' name),
/// called as `bin`, with the package's version.
fn page_command(cmd: clap::Command, name: &str, bin: String) -> clap::Command {
    cmd.name(name.to_owned())
        .bin_name(bin)
        .display_name(name.to_owned())
        .version(env!("CARGO_PKG_VERSION"))
}

/// The page's SYNOPSIS line for `cmd` as `name` calls it: every option that is not hidden
/// with its value names (`[-b BUFCNT]`, `[--config FILE]`, `[-v]...`), then the positional
/// arguments (`<SHELF>` required, `[FILE]` optional). clap_mangen's own synopsis names no
/// values (`[-b ] [--config]`), and clap's usage line folds the options into `[OPTIONS]`.
fn synopsis(cmd: &clap::Command, name: &str) -> String {
    let values = |a: &clap::Arg| -> String {
        if !a.get_action().takes_values() {
            return String::new();
        }
        match a.get_value_names() {
            Some(v) => v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" "),
            None => a.get_id().as_str().to_uppercase(),
        }
    };
    let repeats = |a: &clap::Arg| {
        matches!(
            a.get_action(),
            clap::ArgAction::Append | clap::ArgAction::Count
        )
    };
    let mut out = vec![name.to_owned()];
    for a in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        if a.is_positional() {
            continue;
        }
        let flag = match (a.get_short(), a.get_long()) {
            (Some(s), Some(l)) => format!("-{s}|--{l}"),
            (Some(s), None) => format!("-{s}"),
            (None, Some(l)) => format!("--{l}"),
            (None, None) => continue,
        };
        let v = values(a);
        let item = if v.is_empty() {
            flag
        } else {
            format!("{flag} {v}")
        };
        let dots = if repeats(a) { "..." } else { "" };
        if a.is_required_set() {
            out.push(format!("{item}{dots}"));
        } else {
            out.push(format!("[{item}]{dots}"));
        }
    }
    for a in cmd.get_positionals().filter(|a| !a.is_hide_set()) {
        let v = match a.get_value_names() {
            Some(v) => v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" "),
            None => a.get_id().as_str().to_uppercase(),
        };
        let many = a.get_num_args().is_some_and(|n| n.max_values() > 1);
        let dots = if many { "..." } else { "" };
        if a.is_required_set() {
            out.push(format!("<{v}>{dots}"));
        } else {
            out.push(format!("[{v}]{dots}"));
        }
    }
    if cmd.has_subcommands() {
        out.push("<COMMAND>".to_owned());
    }
    out.join(" ")
}

/// Writes the page of `cmd` to `path`; its synopsis names the command by its bin name, and
/// then, if `also` is given, again as `also` calls it (a multi-call link's page: `aoe-stat
/// ...` first, as aoetools' own page, then `aoe stat ...`).
fn write_page(cmd: clap::Command, path: &Path, also: Option<&str>) -> Result<()> {
    let env = environment(&cmd);
    let mut buf = Vec::new();
    // clap_mangen renders an overridden usage as given, the name in bold.
    let name = cmd
        .get_bin_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_owned();
    let mut line = synopsis(&cmd, &name);
    if let Some(also) = also {
        line = format!("{line}\n{}", synopsis(&cmd, also));
    }
    let cmd = cmd.override_usage(line);
    // clap's own `help` subcommand would be listed as `aoe-help(1)`, a page nobody writes:
    // hidden on the pages (it stays on the command line).
    let cmd = if cmd.find_subcommand("help").is_some() {
        cmd.mut_subcommand("help", |h| h.hide(true))
    } else {
        cmd
    };
    clap_mangen::Man::new(cmd)
        .section("1")
        .source(format!("aoe {}", env!("CARGO_PKG_VERSION")))
        .manual("AoE tools")
        .render(&mut buf)
        .with_context(|| format!("cannot render {}", path.display()))?;
    if !env.is_empty() {
        buf.extend_from_slice(b".SH ENVIRONMENT\n");
        for (var, what) in env {
            let text = format!(".TP\n\\fB{var}\\fR\n{what}\n");
            buf.extend_from_slice(text.replace('-', "\\-").as_bytes());
        }
    }
    fs::write(path, buf).with_context(|| format!("cannot write {}", path.display()))
}

/// The environment variables the command `cmd` reads, with what each does: `AOE_LOG` for
/// every command (main.rs `init_logging`), `AOE_ROOT` where `--root` defaults to it
/// (tools/mod.rs), `sysfs_dir` for aoe-stat (tools/stat.rs, as aoetools' script), and
/// `CEPH_CONF` where `--ceph-conf` defaults to it (librados's own search). Session 29's
/// audit: none of them was on a man page, `AOE_LOG` only in README.
fn environment(cmd: &clap::Command) -> Vec<(&'static str, &'static str)> {
    let mut v = vec![(
        "AOE_LOG",
        "What is logged to standard error, in tracing's env-filter syntax (info, debug, \
         trace, or per module: aoe_target=debug); default info. A value that does not parse \
         is said in a warning and info is used.",
    )];
    let has = |long: &str| cmd.get_arguments().any(|a| a.get_long() == Some(long));
    if has("root")
        && cmd
            .get_arguments()
            .filter_map(|a| a.get_help())
            .any(|h| h.to_string().contains("$AOE_ROOT"))
    {
        v.push((
            "AOE_ROOT",
            "The initiator's control directory when --root is not given (else /dev/etherd).",
        ));
    }
    if cmd.get_name().ends_with("stat") && has("root") {
        v.push((
            "sysfs_dir",
            "Where the device attributes are read (default ROOT/sysfs), as aoetools' \
             aoe-stat: sysfs_dir=/sys reads the kernel driver's.",
        ));
    }
    if has("ceph-conf") {
        v.push((
            "CEPH_CONF",
            "For an rbd: export without --ceph-conf: the Ceph cluster's config file (librados's \
             search, else /etc/ceph/ceph.conf).",
        ));
    }
    v
}

/// Writes every page; returns how many.
fn man_pages(cli: &clap::Command, multicall: &[(&str, &str)], dir: &Path) -> Result<usize> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cli = cli.clone();
    cli.build();
    write_page(cli.clone(), &dir.join("aoe.1"), None)?;
    let mut written = vec!["aoe".to_owned()];
    for sc in cli.get_subcommands() {
        let sub = sc.get_name();
        if sub == "help" {
            continue;
        }
        let name = format!("aoe-{sub}");
        // `aoe-stat` is both this page and a multi-call link: the page shows the link's
        // invocation first, as aoetools' aoe-stat(8) does, then `aoe stat`.
        let link = multicall.iter().any(|(m, s)| *m == name && *s == sub);
        let (bin, also) = if link {
            (name.clone(), Some(format!("aoe {sub}")))
        } else {
            (format!("aoe {sub}"), None)
        };
        let cmd = page_command(sc.clone(), &name, bin);
        write_page(cmd, &dir.join(format!("{name}.1")), also.as_deref())?;
        // `aoe target monitor`, `aoe generate completions`, ...: clap_mangen's page of the
        // parent names each as `aoe-target-monitor(1)`; their options (`monitor -i -c`,
        // `completions --dir`) were on no page until session 29's audit.
        for nested in sc.get_subcommands().filter(|c| c.get_name() != "help") {
            let leaf = nested.get_name();
            let nested_name = format!("{name}-{leaf}");
            let cmd = page_command(nested.clone(), &nested_name, format!("aoe {sub} {leaf}"));
            write_page(cmd, &dir.join(format!("{nested_name}.1")), None)?;
            written.push(nested_name);
        }
        written.push(name);
    }
    for (name, sub) in multicall {
        if written.iter().any(|w| w == name) {
            continue;
        }
        write_page(
            standalone(&cli, sub, name)?,
            &dir.join(format!("{name}.1")),
            Some(&format!("aoe {sub}")),
        )?;
        written.push((*name).to_owned());
    }
    Ok(written.len())
}

/// The file a shell's completion loader looks for, for command `name`.
fn completion_file(shell: Shell, name: &str) -> String {
    match shell {
        // bash-completion loads completions/NAME on first use of NAME.
        Shell::Bash => name.to_owned(),
        other => clap_complete::Generator::file_name(&other, name),
    }
}

fn completions(
    shell: Shell,
    cli: &clap::Command,
    multicall: &[(&str, &str)],
    dir: &Path,
) -> Result<usize> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmds = vec![("aoe".to_owned(), cli.clone())];
    for (name, sub) in multicall {
        cmds.push(((*name).to_owned(), standalone(cli, sub, name)?));
    }
    for (name, mut cmd) in cmds.iter().cloned() {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut buf);
        let path = dir.join(completion_file(shell, &name));
        fs::write(&path, buf).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(cmds.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The SYNOPSIS section of page `name` as written by `aoe generate man`, roff included.
    pub(super) fn synopsis_of(name: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        man_pages(
            &crate::Cli::command(),
            &crate::multicall_table(),
            dir.path(),
        )
        .unwrap();
        let page = fs::read_to_string(dir.path().join(format!("{name}.1"))).unwrap();
        let s = page.split(".SH SYNOPSIS").nth(1).unwrap();
        let s = s.split(".SH ").next().unwrap();
        assert!(s.starts_with("\n\\fB"), "the name is not bold: {s}");
        s.replace("\\fB", "")
            .replace("\\fR", "")
            .replace("\\fI", "")
            .replace("\\-", "-")
    }

    /// Audit (s8): clap_mangen's own synopsis names no option values (`[-b ] [--config]`,
    /// a short flag with a space inside its brackets), so `man aoe-serve` did not say what
    /// `-b` or `--config` take; the synopsis is now written from the arguments themselves.
    #[test]
    fn man_synopsis_names_option_values() {
        let s = synopsis_of("aoe-serve");
        for want in [
            "[-b BUFCNT]",
            "[-m MAC[,MAC...]]...",
            "[--config FILE]",
            "[--drain-secs SECS]",
            "[-d]",
            "[-h|--help]",
            "[SHELF]",
        ] {
            assert!(s.contains(want), "{want} not in the synopsis: {s}");
        }
        assert!(s.starts_with("\naoe serve "), "{s}");
        let s = synopsis_of("aoeping");
        assert!(s.starts_with("\naoeping "), "{s}");
        for want in [
            "[-v]...",
            "[-s SECS]",
            "[-S CMD[:ARG]]",
            "<SHELF> <SLOT> <NETIF>",
        ] {
            assert!(s.contains(want), "{want} not in the synopsis: {s}");
        }
    }
}

/// Issue 14 (fixes round): the page of each multi-call name shows it invoked under that
/// name, as aoetools' own pages do (`aoe-stat [-a] ...`), then as the `aoe` subcommand; it
/// showed `aoe stat ...` alone on `aoe-stat.1` (and so for aoe-discover, aoe-flush, ...).
/// Pages of subcommands that are no link keep `aoe SUB`.
#[cfg(test)]
mod multicall_pages {
    use super::tests::synopsis_of;

    #[test]
    fn each_multicall_page_shows_its_own_name_first() {
        for (name, sub) in crate::multicall_table() {
            let s = synopsis_of(name);
            let mut lines = s.trim_start_matches('\n').lines();
            let first = lines.next().unwrap_or("");
            assert!(
                first.starts_with(&format!("{name} ")) || first == name,
                "{name}.1 synopsis starts {first:?}"
            );
            assert!(
                s.contains(&format!("aoe {sub}")),
                "{name}.1 does not show `aoe {sub}`: {s}"
            );
        }
        let s = synopsis_of("aoe-serve");
        assert!(s.starts_with("\naoe serve "), "{s}");
    }
}

#[cfg(test)]
mod help_audit {
    use clap::CommandFactory;

    fn walk(c: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in c.get_arguments().filter(|a| !a.is_hide_set()) {
            if a.get_help().is_none() && a.get_long_help().is_none() {
                out.push(format!("{path} {}", a.get_id()));
            }
        }
        for s in c.get_subcommands() {
            walk(s, &format!("{path} {}", s.get_name()), out);
        }
    }

    /// Every argument of every command has help text (the man page's OPTIONS and `--help`).
    #[test]
    fn every_argument_is_documented() {
        let mut c = crate::Cli::command();
        c.build();
        let mut missing = Vec::new();
        walk(&c, "aoe", &mut missing);
        assert!(missing.is_empty(), "no help: {missing:#?}");
    }
}

/// Session 29's audit of the man pages against the binary: `aoe-target.1` and
/// `aoe-generate.1` named `aoe-target-monitor(1)`, `aoe-generate-completions(1)`, ... and no
/// such page was written, so `monitor -i/-c` and `completions --dir` were on no page; and no
/// page named an environment variable the binary reads (`AOE_LOG`, `AOE_ROOT`, `sysfs_dir`,
/// `CEPH_CONF`).
#[cfg(test)]
mod completeness {
    use std::collections::BTreeMap;

    /// Every page `aoe generate man` writes, by file name, roff escapes of `-` undone.
    fn pages() -> BTreeMap<String, String> {
        let dir = tempfile::tempdir().unwrap();
        super::man_pages(
            &<crate::Cli as clap::CommandFactory>::command(),
            &crate::multicall_table(),
            dir.path(),
        )
        .unwrap();
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let text = std::fs::read_to_string(e.path()).unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    text.replace("\\-", "-"),
                )
            })
            .collect()
    }

    /// Each command's page, named as `man_pages` names it, holds every option of it.
    fn walk(
        c: &clap::Command,
        page: &str,
        pages: &BTreeMap<String, String>,
        out: &mut Vec<String>,
    ) {
        let Some(text) = pages.get(&format!("{page}.1")) else {
            out.push(format!("no page {page}.1"));
            return;
        };
        for a in c.get_arguments().filter(|a| !a.is_hide_set()) {
            let spelled = a
                .get_long()
                .map(|l| format!("--{l}"))
                .or_else(|| a.get_short().map(|s| format!("-{s}")));
            if let Some(f) = spelled {
                if !text.contains(&f) {
                    out.push(format!("{page}.1 lacks {f}"));
                }
            }
        }
        for s in c.get_subcommands().filter(|s| s.get_name() != "help") {
            walk(s, &format!("{page}-{}", s.get_name()), pages, out);
        }
    }

    #[test]
    fn every_option_of_every_command_is_on_its_page() {
        let pages = pages();
        let mut c = <crate::Cli as clap::CommandFactory>::command();
        c.build();
        let mut missing = Vec::new();
        for s in c.get_subcommands().filter(|s| s.get_name() != "help") {
            walk(s, &format!("aoe-{}", s.get_name()), &pages, &mut missing);
        }
        assert!(missing.is_empty(), "{missing:#?}");
    }

    #[test]
    fn every_page_a_page_names_exists() {
        let pages = pages();
        let mut dangling = Vec::new();
        for (name, text) in &pages {
            // clap_mangen's references: `aoe-target-monitor(1)` in the SUBCOMMANDS section.
            for word in text.split(|c: char| c.is_whitespace() || c == '\\') {
                let word = word.trim_start_matches("fB").trim_start_matches("fR");
                if let Some(page) = word.strip_suffix("(1)") {
                    if page.starts_with("aoe") && !pages.contains_key(&format!("{page}.1")) {
                        dangling.push(format!("{name} names {page}(1)"));
                    }
                }
            }
        }
        assert!(dangling.is_empty(), "{dangling:#?}");
    }

    #[test]
    fn the_environment_the_binary_reads_is_on_its_pages() {
        let pages = pages();
        let env = |page: &str| {
            let t = &pages[page];
            t.split(".SH ENVIRONMENT").nth(1).unwrap_or("").to_owned()
        };
        for (page, vars) in [
            ("aoe.1", &["AOE_LOG"][..]),
            ("aoe-serve.1", &["AOE_LOG", "CEPH_CONF"]),
            ("vblade.1", &["AOE_LOG", "CEPH_CONF"]),
            ("aoe-stat.1", &["AOE_LOG", "AOE_ROOT", "sysfs_dir"]),
            ("aoe-flush.1", &["AOE_ROOT"]),
            ("aoe-initiator.1", &["AOE_LOG"]),
        ] {
            let e = env(page);
            for v in vars {
                assert!(e.contains(v), "{page}: no {v} in ENVIRONMENT: {e:?}");
            }
        }
        // The initiator's --root has its own default, not $AOE_ROOT.
        assert!(!env("aoe-initiator.1").contains("AOE_ROOT"));
    }
}
