//! `sos-linux`: collects support information about this host's AoE setup into one text file,
//! as aoetools' `sos-linux` (release 26, ".txt" output since 2008-08, debugfs data in 36)
//! does for the kernel driver.
//!
//! The file has one section per subject, each starting with a line `==== NAME ====`:
//! `host` (date, kernel, host name), `aoe-version` (ours, the drivers', the running
//! initiator), `aoe-stat` (the devices, as aoe-stat prints them), `attributes` (every file of
//! each device's attribute directory under ROOT/sysfs), `interfaces` (ROOT/interfaces, then
//! each network interface with its MTU, up/down and MAC), `err` (the lines queued in ROOT/err),
//! `logs` (kernel log lines that mention AoE, then the journal's lines of `aoe` processes).
//!
//! Reading ROOT/err takes the queued lines, as reading the kernel driver's `/dev/etherd/err`
//! does: they are in the report and no longer in the queue. A source that cannot be read
//! leaves a line saying why in its section, never an empty section. The file name is printed
//! on standard output when done.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::{stat, version, RootArg};

/// Collect support information (devices, attributes, interfaces, err, logs) into a file.
#[derive(Debug, Args)]
#[command(
    after_help = "Writes /tmp/sos-linux-HOSTNAME.txt unless -o names another file, and prints \
its name. Reading ROOT/err takes the queued error lines into the report."
)]
pub struct SosArgs {
    #[command(flatten)]
    root: RootArg,
    /// Where to write the report [default: /tmp/sos-linux-HOSTNAME.txt].
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// How long to wait for the first line of ROOT/err, in milliseconds, 0 to 60000 (the
    /// file blocks until a line comes, so a longer wait only delays the report).
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    err_wait_ms: u64,
}

/// Runs `sos-linux`.
pub fn run(a: SosArgs) -> Result<()> {
    let host = read_trim("/proc/sys/kernel/hostname").unwrap_or_else(|| "localhost".into());
    let out = a
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/sos-linux-{host}.txt")));
    let root = a.root.dir();
    let mut r = String::new();

    section(&mut r, "host");
    let date = command_output("date", &["-u"]).unwrap_or_else(|why| why);
    let _ = writeln!(r, "date: {}", date.trim_end());
    for (k, f) in [
        ("hostname", "/proc/sys/kernel/hostname"),
        ("kernel", "/proc/sys/kernel/osrelease"),
        ("kernel build", "/proc/sys/kernel/version"),
    ] {
        let v = read_trim(f).unwrap_or_else(|| format!("(cannot read {f})"));
        let _ = writeln!(r, "{k}: {v}");
    }
    let _ = writeln!(r, "ROOT: {}", root.display());

    section(&mut r, "aoe-version");
    r.push_str(&version::report(&root));

    let sysfs = root.join("sysfs");
    section(&mut r, "aoe-stat");
    match stat::read_rows(&sysfs) {
        Ok((rows, payload_format)) if !rows.is_empty() => {
            let mut lines: Vec<String> = rows
                .iter()
                .map(|row| stat::format_row(row, payload_format))
                .collect();
            lines.sort();
            lines.iter().for_each(|l| r.push_str(l));
        }
        Ok(_) => r.push_str("(no AoE devices)\n"),
        Err(e) => {
            let _ = writeln!(r, "(cannot list devices: {e:#})");
        }
    }

    section(&mut r, "attributes");
    attributes(&mut r, &sysfs.join("block"));

    section(&mut r, "interfaces");
    match std::fs::read_to_string(root.join("interfaces")) {
        Ok(s) if s.trim().is_empty() => r.push_str("ROOT/interfaces: (all interfaces allowed)\n"),
        Ok(s) => {
            let _ = writeln!(r, "ROOT/interfaces: {}", s.trim_end());
        }
        Err(e) => {
            let _ = writeln!(r, "ROOT/interfaces: (cannot read: {e})");
        }
    }
    net_interfaces(&mut r);

    section(&mut r, "err");
    let err = err_lines(
        &root.join("err"),
        Duration::from_millis(a.err_wait_ms),
        Duration::from_millis(300),
    );
    match err {
        Ok(s) if s.is_empty() => r.push_str("(no queued error lines)\n"),
        Ok(s) => {
            r.push_str(&s);
            if !s.ends_with('\n') {
                r.push('\n');
            }
        }
        Err(e) => {
            let _ = writeln!(r, "(cannot read {}: {e})", root.join("err").display());
        }
    }

    section(&mut r, "logs");
    r.push_str("-- kernel log lines mentioning aoe (dmesg):\n");
    match command_output("dmesg", &[]) {
        Ok(dmesg) => {
            let aoe_lines: Vec<&str> = dmesg.lines().filter(|l| l.contains("aoe")).collect();
            if aoe_lines.is_empty() {
                r.push_str("(none)\n");
            }
            for l in aoe_lines.iter().rev().take(500).rev() {
                let _ = writeln!(r, "{l}");
            }
        }
        Err(why) => r.push_str(&why),
    }
    r.push_str("-- journal lines of aoe processes (journalctl _COMM=aoe):\n");
    match command_output(
        "journalctl",
        &["--no-pager", "-q", "-n", "500", "_COMM=aoe"],
    ) {
        Ok(j) if j.trim().is_empty() => r.push_str("(none)\n"),
        Ok(j) => r.push_str(&j),
        Err(why) => r.push_str(&why),
    }

    std::fs::write(&out, r).with_context(|| format!("cannot write {}", out.display()))?;
    println!("{}", out.display());
    Ok(())
}

fn section(r: &mut String, name: &str) {
    if !r.is_empty() {
        r.push('\n');
    }
    let _ = writeln!(r, "==== {name} ====");
}

fn read_trim(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// A command's standard output, or a line saying why there is none.
fn command_output(program: &str, args: &[&str]) -> Result<String, String> {
    match Command::new(program).args(args).output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(format!(
            "({program} failed, {}: {})\n",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("({program} not run: {e})\n")),
    }
}

/// Every readable file of every device directory under `block`, as `dev/name: value`.
fn attributes(r: &mut String, block: &Path) {
    let mut devs: Vec<PathBuf> = match std::fs::read_dir(block) {
        Ok(d) => d.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
        Err(e) => {
            let _ = writeln!(r, "(cannot list {}: {e})", block.display());
            return;
        }
    };
    devs.sort();
    if devs.is_empty() {
        r.push_str("(no AoE devices)\n");
    }
    for d in devs {
        let dev = d
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&d)
            .map(|it| it.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        for f in files.iter().filter(|f| f.is_file()) {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let value = match std::fs::read(f) {
                Ok(v) => String::from_utf8_lossy(&v)
                    .trim_end()
                    .replace('\n', "\n    "),
                Err(e) => format!("(cannot read: {e})"),
            };
            let _ = writeln!(r, "{dev}/{name}: {value}");
        }
    }
}

/// Each network interface of this network namespace (netlink and ioctls, not /sys/class/net,
/// which shows the namespace sysfs was mounted in): name, MTU, up or down, MAC.
fn net_interfaces(r: &mut String) {
    match aoe_sys::list_interfaces() {
        Ok(list) => {
            for i in list {
                let _ = writeln!(
                    r,
                    "{}: mtu {} {} mac {}",
                    i.name,
                    i.mtu,
                    if i.up { "up" } else { "down" },
                    super::mac_hex(&i.mac)
                );
            }
        }
        Err(e) => {
            let _ = writeln!(r, "(cannot list network interfaces: {e})");
        }
    }
}

/// The lines queued in an `err` file. Its reads block while the queue is empty, so a thread
/// reads and this waits `first` for the first line and `next` for each further one; a thread
/// still blocked then ends with the process.
fn err_lines(path: &Path, first: Duration, next: Duration) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        loop {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut out = Vec::new();
    let mut wait = first;
    while let Ok(chunk) = rx.recv_timeout(wait) {
        out.extend_from_slice(&chunk);
        wait = next;
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}
