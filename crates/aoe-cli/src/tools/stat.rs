//! `aoe-stat [REGEX]`: one row per AoE device, byte for byte what aoetools' `aoe-stat`
//! prints for the same attribute tree.
//!
//! aoetools (`aoe-stat.in`, release 36) lists `$sysfs_dir/block/*e[0-9]*.[0-9]*`, reads
//! `size`, `netif`, `payload` and `state` of each (`(NA)` when a file is unreadable), prints
//! `"%10s %15s %10s %-5s %-14s\n"` (or `"%10s %15s %6s %-14s\n"` when no device has a
//! `payload` file), then `| sort | grep $re`. This module does the same in-process, with two
//! deliberate differences: partitions are skipped by *name* (aoetools drops every path
//! containing a `p`, so nothing shows under a directory such as `/tmp/...`), and `sort` is
//! bytewise (aoetools' order under `LC_ALL=C` or `C.UTF-8`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use regex_automata::meta::Regex;

use super::{json_str, RootArg};

/// Show one row per AoE device: device, size, interfaces, payload, state.
#[derive(Debug, Args)]
#[command(
    after_help = "Rows are byte-identical to aoetools' aoe-stat. The attribute tree is \
ROOT/sysfs, or $sysfs_dir when set (as aoetools: sysfs_dir=/sys reads the kernel driver's).\n\
Exit status 1 when no row matches, like aoetools' final grep."
)]
pub struct StatArgs {
    #[command(flatten)]
    root: RootArg,
    /// Print JSON (an array of objects) instead of aoetools' columns.
    #[arg(long)]
    json: bool,
    /// Only rows matching this basic regular expression (grep's syntax), as aoetools.
    #[arg(value_name = "REGEX")]
    regex: Option<String>,
}

/// One device's attributes, `None` where aoetools prints `(NA)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// `eX.Y`: the part of the path after the last `!`.
    pub dev: String,
    /// `size` in 512-byte sectors.
    pub sectors: Option<String>,
    /// `netif`.
    pub netif: Option<String>,
    /// `payload`.
    pub payload: Option<String>,
    /// `state`.
    pub state: Option<String>,
}

const NA: &str = "(NA)";

/// aoetools' size column: `$(((512000 * sectors) / (1000 * 1000 * 1000)))` in the shell's
/// 64-bit arithmetic, `printf "%04d"`, then a `.` before the last three digits and `GB`.
pub fn psize(sectors: &str) -> String {
    let Ok(n) = sectors.trim().parse::<i64>() else {
        return NA.to_string();
    };
    let v = 512_000i64.wrapping_mul(n) / 1_000_000_000;
    let s = format!("{v:04}");
    let (a, b) = s.split_at(s.len() - 3);
    format!("{a}.{b}GB")
}

/// The shell glob `*e[0-9]*.[0-9]*` on a directory entry's name.
fn glob_match(name: &str) -> bool {
    let b = name.as_bytes();
    (0..b.len().saturating_sub(1)).any(|i| {
        b[i] == b'e'
            && b[i + 1].is_ascii_digit()
            && (i + 2..b.len().saturating_sub(1)).any(|j| b[j] == b'.' && b[j + 1].is_ascii_digit())
    })
}

/// `cat_or_NA`: the file's text without trailing newlines (as `$(cat f)`), or `None` when it
/// cannot be read.
fn cat(path: &Path) -> Option<String> {
    let s = std::fs::read(path).ok()?;
    let s = String::from_utf8_lossy(&s);
    Some(s.trim_end_matches('\n').to_string())
}

/// Reads every device under `sysfs/block`, in directory-name order.
pub fn read_rows(sysfs: &Path) -> Result<(Vec<Row>, bool)> {
    let block = sysfs.join("block");
    if !block.is_dir() {
        bail!(
            "{} is not a directory: no AoE attribute tree there",
            block.display()
        );
    }
    let mut names: Vec<String> = std::fs::read_dir(&block)
        .with_context(|| format!("cannot list {}", block.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| glob_match(n) && !n.contains('p'))
        .collect();
    names.sort();
    let mut rows = Vec::new();
    let mut any_payload = false;
    for name in names {
        let d: PathBuf = block.join(&name);
        let dev = match name.rfind('!') {
            Some(i) => name[i + 1..].to_string(),
            // `sed 's/.*!//'` leaves a path without `!` whole.
            None => d.display().to_string(),
        };
        let payload = cat(&d.join("payload"));
        any_payload |= payload.is_some();
        rows.push(Row {
            dev,
            sectors: cat(&d.join("size")),
            netif: cat(&d.join("netif")),
            payload,
            state: cat(&d.join("state")),
        });
    }
    Ok((rows, any_payload))
}

/// The formatted line aoetools prints for `r`.
pub fn format_row(r: &Row, payload_format: bool) -> String {
    let size = r.sectors.as_deref().map_or(NA.to_string(), psize);
    let na = |v: &Option<String>| v.clone().unwrap_or_else(|| NA.to_string());
    let (netif, state) = (na(&r.netif), na(&r.state));
    match (&r.payload, payload_format) {
        (Some(p), true) => format!(
            "{:>10} {:>15} {:>10} {:<5} {:<14}\n",
            r.dev, size, netif, p, state
        ),
        // aoetools passes one argument too few here (no payload), so printf fills the
        // payload column with the state and leaves the last one empty.
        (None, true) => format!(
            "{:>10} {:>15} {:>10} {:<5} {:<14}\n",
            r.dev, size, netif, state, ""
        ),
        (_, false) => format!("{:>10} {:>15} {:>6} {:<14}\n", r.dev, size, netif, state),
    }
}

/// Translates a POSIX basic regular expression (grep's default) into the syntax of the
/// `regex` crates: `\( \) \{ \} \| \+ \?` are the operators, the bare characters literals.
pub fn bre_to_regex(bre: &str) -> String {
    let mut out = String::new();
    let mut chars = bre.chars().peekable();
    let mut in_bracket = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if in_bracket {
            out.push(c);
            if c == ']' {
                in_bracket = false;
            }
            continue;
        }
        match c {
            '\\' => match chars.next() {
                Some(n @ ('(' | ')' | '{' | '}' | '|' | '+' | '?')) => out.push(n),
                Some(n) => {
                    out.push('\\');
                    out.push(n);
                }
                None => out.push_str("\\\\"),
            },
            '(' | ')' | '{' | '}' | '|' | '+' | '?' => {
                out.push('\\');
                out.push(c);
            }
            '*' if at_start => out.push_str("\\*"),
            '[' => {
                in_bracket = true;
                out.push('[');
                if chars.peek() == Some(&'^') {
                    out.push(chars.next().unwrap_or('^'));
                }
                if chars.peek() == Some(&']') {
                    out.push_str("\\]");
                    chars.next();
                }
            }
            c => out.push(c),
        }
        at_start = c == '^' && out.len() == 1;
    }
    out
}

/// Runs `aoe-stat`.
pub fn run(a: StatArgs) -> Result<()> {
    let sysfs = match std::env::var_os("sysfs_dir") {
        Some(d) => PathBuf::from(d),
        None => a.root.open()?.sysfs(),
    };
    let re = match &a.regex {
        Some(r) => Some(
            Regex::new(&bre_to_regex(r))
                .map_err(|e| super::usage(format!("bad regular expression {r:?}: {e}")))?,
        ),
        None => None,
    };
    let (rows, payload_format) = read_rows(&sysfs)?;
    let mut lines: Vec<(String, &Row)> = rows
        .iter()
        .map(|r| (format_row(r, payload_format), r))
        .collect();
    lines.sort_by(|x, y| x.0.as_bytes().cmp(y.0.as_bytes()));
    // `grep .` (the default) drops nothing: every line has at least the device name.
    lines.retain(|(l, _)| {
        re.as_ref()
            .is_none_or(|re| re.is_match(l.trim_end_matches('\n')))
    });
    let mut out = String::new();
    if a.json {
        out.push('[');
        for (i, (_, r)) in lines.iter().enumerate() {
            let f = |v: &Option<String>| v.as_deref().map_or("null".to_string(), json_str);
            out.push_str(&format!(
                "{}{{\"device\":{},\"sectors\":{},\"size\":{},\"netif\":{},\"payload\":{},\"state\":{}}}",
                if i > 0 { "," } else { "" },
                json_str(&r.dev),
                r.sectors
                    .as_deref()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .map_or("null".to_string(), |n| n.to_string()),
                json_str(&r.sectors.as_deref().map_or(NA.to_string(), psize)),
                f(&r.netif),
                r.payload
                    .as_deref()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .map_or("null".to_string(), |n| n.to_string()),
                f(&r.state),
            ));
        }
        out.push_str("]\n");
    } else {
        for (l, _) in &lines {
            out.push_str(l);
        }
    }
    std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes())?;
    if lines.is_empty() && !a.json {
        super::exit_quietly(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_column_as_aoetools_computes_it() {
        assert_eq!(psize("131072"), "0.067GB");
        assert_eq!(psize("8589934592"), "4398.046GB");
        assert_eq!(psize("0"), "0.000GB");
        assert_eq!(psize("x"), "(NA)");
    }

    #[test]
    fn glob_like_the_shell() {
        assert!(glob_match("etherd!e1.2"));
        assert!(glob_match("etherd!e10.255"));
        assert!(!glob_match("sda"));
        assert!(!glob_match("etherd!e1."));
    }

    #[test]
    fn basic_regex_translation() {
        assert_eq!(bre_to_regex("e1.1"), "e1.1");
        assert_eq!(bre_to_regex("e1\\(0\\|1\\)"), "e1(0|1)");
        assert_eq!(bre_to_regex("a+b"), "a\\+b");
        assert_eq!(bre_to_regex("*x"), "\\*x");
    }

    #[test]
    fn row_format() {
        let r = Row {
            dev: "e1.2".into(),
            sectors: Some("131072".into()),
            netif: Some("eth0".into()),
            payload: Some("1024".into()),
            state: Some("up".into()),
        };
        assert_eq!(
            format_row(&r, true),
            "      e1.2         0.067GB       eth0 1024  up            \n"
        );
    }
}
