//! Operations (issue 12): `aoe demo` end to end and interrupted, leaving nothing behind.

use std::fs;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use aoe_testkit::{require_root, require_tools, wait_until};

const AOE: &str = env!("CARGO_BIN_EXE_aoe");

fn demo_tools() {
    require_root();
    require_tools(&[
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("losetup", "mount"),
        ("blockdev", "util-linux"),
        ("mkfs.ext4", "e2fsprogs"),
        ("fsck.ext4", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
        ("fusermount3", "fuse3"),
    ]);
}

/// Held by each test that runs `aoe demo`, so that this binary runs one demo at a time.
/// Every `aoe demo` first removes what demos that are no longer running left (`reap`): a
/// demo started by another test thread just after `demo_after_a_sigkilled_...` killed its
/// demo took that demo's leftovers before the test had looked at them (or while its second
/// demo removed them too).
static ONE_DEMO: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_demo_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_DEMO
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Everything a demo with process id `pid` could leave behind, named; empty when clean.
fn leftovers(pid: u32) -> Vec<String> {
    let tag = format!("aoedemo-{pid}");
    let mut left = Vec::new();
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    for l in String::from_utf8_lossy(&netns.stdout).lines() {
        if l.contains(&tag) {
            left.push(format!("namespace {l}"));
        }
    }
    for l in fs::read_to_string("/proc/self/mountinfo").unwrap().lines() {
        if l.contains(&tag) {
            left.push(format!("mount {l}"));
        }
    }
    let lo = Command::new("losetup").args(["-l", "-n"]).output().unwrap();
    for l in String::from_utf8_lossy(&lo.stdout).lines() {
        if l.contains(&tag) {
            left.push(format!("loop device {l}"));
        }
    }
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&tag) || cmdline.contains(&format!("aoedemo{}", pid % 1_000_000)) {
            left.push(format!(
                "process {}: {cmdline}",
                e.file_name().to_string_lossy()
            ));
        }
    }
    for dir in [
        format!("/run/{tag}"),
        std::env::temp_dir().join(&tag).display().to_string(),
    ] {
        if fs::metadata(&dir).is_ok() {
            left.push(format!("directory {dir}"));
        }
    }
    left
}

#[test]
fn demo_runs_end_to_end_and_leaves_nothing_behind() {
    let _one = one_demo_at_a_time();
    demo_tools();
    let child = Command::new("timeout")
        .args(["300", AOE, "demo", "--no-install"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `timeout` runs the demo as its child: the demo's pid names what it makes.
    let timeout_pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "aoe demo: {}\n{stdout}\n{stderr}",
        out.status
    );
    for want in [
        "== aoe stat",
        "== mkfs.ext4",
        "== fsck.ext4",
        "== read back",
        "== figures",
        "DEMO OK",
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }
    // aoe-stat's row for the device, up.
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("e1.1") && l.contains(" up")),
        "no aoe-stat row for e1.1 up:\n{stdout}"
    );
    let pid = demo_pid(&stdout).unwrap_or(timeout_pid);
    let left = leftovers(pid);
    assert!(left.is_empty(), "left behind: {left:#?}\n{stdout}");
}

/// The demo's pid, from its namespace names in the first line.
fn demo_pid(stdout: &str) -> Option<u32> {
    let at = stdout.find("aoedemo-")? + "aoedemo-".len();
    stdout[at..].split('-').next()?.parse().ok()
}

/// Starts `aoe demo` (its stderr to `stderr`) and waits until it reports its write step:
/// mid-way, with the file system mounted on the AoE device and being written. Returns the
/// demo and its pid; kills it and panics if it never gets there within 120 s.
fn demo_writing(stderr: Stdio) -> (std::process::Child, u32) {
    demo_tools();
    let mut child = Command::new(AOE)
        .args(["demo", "--no-install", "--write", "48"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut seen = Vec::new();
    let mid = wait_until(Duration::from_secs(120), || {
        while let Ok(l) = rx.try_recv() {
            seen.push(l);
        }
        seen.iter().any(|l| l.starts_with("== write"))
    });
    if !mid {
        let _ = child.kill();
    }
    assert!(mid, "the demo never reached the write step: {seen:#?}");
    (child, pid)
}

#[test]
fn demo_interrupted_mid_way_removes_everything() {
    let _one = one_demo_at_a_time();
    let (mut child, pid) = demo_writing(Stdio::piped());
    assert!(
        !leftovers(pid).is_empty(),
        "mid-way, the demo should have made namespaces and mounts"
    );
    let sent = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let mut status = None;
    let done = wait_until(Duration::from_secs(90), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if !done {
        let _ = child.kill();
    }
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr);
    assert!(done, "the demo did not end within 90 s of SIGINT: {stderr}");
    assert_eq!(
        status.unwrap().code(),
        Some(130),
        "exit status; stderr:\n{stderr}"
    );
    assert!(stderr.contains("interrupted"), "{stderr}");
    let left = leftovers(pid);
    assert!(
        left.is_empty(),
        "left behind after SIGINT: {left:#?}\n{stderr}"
    );
}

/// Audit (s8): a demo killed by SIGKILL (or the OOM killer) cannot clean up: its namespaces,
/// FUSE root, mounted ext4 on a loop device, target and initiator stayed for good, and a
/// user who ran the README's first command again saw them pile up. The next `aoe demo`
/// removes what a demo that is no longer running left, saying so.
/// Seen failing before the fix: the second demo passed and every leftover was still there.
#[test]
fn demo_after_a_sigkilled_demo_removes_what_it_left() {
    let _one = one_demo_at_a_time();
    let (mut child, pid) = demo_writing(Stdio::null());
    child.kill().unwrap();
    child.wait().unwrap();
    let left = leftovers(pid);
    assert!(
        left.iter().any(|l| l.starts_with("namespace"))
            && left.iter().any(|l| l.starts_with("loop device")),
        "a SIGKILLed demo should have left its namespaces and loop device: {left:#?}"
    );
    let out = Command::new("timeout")
        .args(["300", AOE, "demo", "--no-install"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "second demo: {stdout}\n{stderr}");
    let left = leftovers(pid);
    assert!(
        left.is_empty(),
        "the second demo left what demo {pid} left: {left:#?}\n{stdout}"
    );
    assert!(
        stdout.contains(&format!("removing what demo {pid} left")),
        "the second demo did not say it removed them: {stdout}"
    );
}

// ------------------------------------------------------------------------------------------
// Install: man pages, completions, units (scripts/install.sh, `aoe generate`)

/// The repository root (two levels above this crate).
fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs scripts/install.sh with this build's binary into a fresh PREFIX (and SYSCONFDIR
/// inside it); returns the directory.
fn install() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("sh")
        .arg(repo().join("scripts/install.sh"))
        .env("PREFIX", dir.path())
        .env("SYSCONFDIR", dir.path().join("etc"))
        .env("AOE", AOE)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install.sh: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// The subcommands `aoe --help` lists, less `help`.
fn subcommands() -> Vec<String> {
    let out = Command::new(AOE).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let cmds = help.split("Commands:").nth(1).expect("a Commands: section");
    let cmds = cmds.split("\n\n").next().unwrap();
    let names: Vec<String> = cmds
        .lines()
        .filter(|l| l.starts_with("  ") && !l.starts_with("    "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|n| n != "help")
        .collect();
    assert!(names.len() > 10, "too few subcommands in:\n{help}");
    names
}

/// The multi-call names scripts/install-links.sh makes.
fn multicall_names() -> Vec<String> {
    let s = fs::read_to_string(repo().join("scripts/install-links.sh")).unwrap();
    let list = s
        .split("for name in")
        .nth(1)
        .unwrap()
        .split("; do")
        .next()
        .unwrap();
    list.split_whitespace()
        .filter(|w| *w != "\\")
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_command_and_multicall_name_has_a_man_page_that_renders_cleanly() {
    require_tools(&[("man", "man-db"), ("groff", "groff")]);
    let dir = install();
    let man1 = dir.path().join("share/man/man1");
    let mut pages: Vec<String> = vec!["aoe".into()];
    pages.extend(subcommands().iter().map(|s| format!("aoe-{s}")));
    pages.extend(multicall_names());
    for p in &pages {
        let page = man1.join(format!("{p}.1"));
        assert!(page.is_file(), "no man page {}", page.display());
        let out = Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l"])
            .arg(&page)
            .env("MANWIDTH", "80")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.is_empty(),
            "man -l {p}.1: {err}"
        );
        // Overstrike bold (`S\bS`) as man writes it to a pipe, removed.
        let mut text = String::new();
        for c in String::from_utf8_lossy(&out.stdout).chars() {
            if c == '\u{8}' {
                text.pop();
            } else {
                text.push(c);
            }
        }
        assert!(text.contains("SYNOPSIS"), "{p}.1 has no SYNOPSIS:\n{text}");
    }
    // The binary and every link.
    for n in multicall_names() {
        let link = dir.path().join("bin").join(&n);
        assert_eq!(
            fs::read_link(&link).unwrap(),
            std::path::Path::new("aoe"),
            "{n}"
        );
    }
}

#[test]
fn every_shell_parses_every_completion_file() {
    require_tools(&[("bash", "bash"), ("zsh", "zsh"), ("fish", "fish")]);
    let dir = install();
    let share = dir.path().join("share");
    let mut names = vec!["aoe".to_owned()];
    names.extend(multicall_names());
    for n in &names {
        for (shell, file) in [
            ("bash", share.join("bash-completion/completions").join(n)),
            (
                "zsh",
                share.join("zsh/site-functions").join(format!("_{n}")),
            ),
            (
                "fish",
                share
                    .join("fish/vendor_completions.d")
                    .join(format!("{n}.fish")),
            ),
        ] {
            assert!(file.is_file(), "no {shell} completion {}", file.display());
            let out = Command::new(shell).arg("-n").arg(&file).output().unwrap();
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "{shell} -n {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // bash: completing `aoe se` offers serve.
    let bash = share.join("bash-completion/completions/aoe");
    let script = format!(
        "source {}; COMP_WORDS=(aoe se); COMP_CWORD=1; COMP_LINE='aoe se'; COMP_POINT=6; \
         _aoe aoe se aoe; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        bash.display()
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        got.lines().any(|l| l == "serve"),
        "bash completion of `aoe se`: {got:?}"
    );
}

/// Operator's audit (session 27): README's `sh scripts/install-links.sh /usr/local/sbin`,
/// run as written on a machine where `aoe` is built but not on PATH, makes the links to the
/// checkout's release build. Before: "no aoe binary", exit 1.
#[test]
fn install_links_as_the_readme_writes_it_finds_the_release_build() {
    let built = repo().join("target/release/aoe");
    if !built.exists() {
        eprintln!("skipped: no release build at {}", built.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("sh")
        .arg(repo().join("scripts/install-links.sh"))
        .arg(dir.path())
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install-links.sh: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for name in multicall_names() {
        let link = dir.path().join(&name);
        let to = fs::canonicalize(&link).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(to, fs::canonicalize(&built).unwrap(), "{name}");
    }
}

/// Every path under `dir`, relative to it, sorted (what `find` lists, less `dir` itself).
fn tree(dir: &std::path::Path) -> Vec<String> {
    fn walk(root: &std::path::Path, d: &std::path::Path, out: &mut Vec<String>) {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                walk(root, &p, out);
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// scripts/install.sh into `prefix` (SYSCONFDIR inside it), with `args` and the
/// environment `env`: (exit status, stderr).
fn install_sh(prefix: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut c = Command::new("sh");
    c.arg(repo().join("scripts/install.sh"))
        .args(args)
        .env("PREFIX", prefix)
        .env("SYSCONFDIR", prefix.join("etc"))
        .env("AOE", AOE);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Session 28 (operator's audit, session 27: no uninstall): `install.sh --uninstall` removes
/// what install put there (its manifest) and nothing else: a file of the operator's in the
/// same directories stays, and so does a directory install did not make; run again, it
/// has nothing to do. A file changed since install (an edited man page) and a link
/// pointed elsewhere are kept and named, exit 1. Before: `--uninstall` was ignored and
/// installed again.
#[test]
fn install_sh_uninstall_removes_exactly_what_it_installed() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("p");
    // The operator's own: a program in bin and a config in etc/aoe.
    fs::create_dir_all(prefix.join("bin")).unwrap();
    fs::write(prefix.join("bin/mine"), "#!/bin/sh\n").unwrap();
    let (rc, err) = install_sh(&prefix, &[], &[]);
    assert_eq!(rc, 0, "install: {err}");
    fs::write(prefix.join("etc/aoe/site.toml"), "# mine\n").unwrap();
    assert!(prefix.join("share/aoe/install-manifest").is_file());
    let (rc, err) = install_sh(&prefix, &["--uninstall"], &[]);
    assert_eq!(rc, 0, "uninstall: {err}");
    assert_eq!(
        tree(&prefix),
        ["bin", "bin/mine", "etc", "etc/aoe", "etc/aoe/site.toml"],
        "left after --uninstall"
    );
    assert!(err.contains("etc/aoe is not empty; kept"), "{err}");
    // Idempotent.
    let (rc, err) = install_sh(&prefix, &["--uninstall"], &[]);
    assert_eq!(rc, 0, "second uninstall: {err}");
    assert_eq!(tree(&prefix).len(), 5);

    // Changed since install: kept, named, exit 1; the rest removed.
    let (rc, err) = install_sh(&prefix, &[], &[]);
    assert_eq!(rc, 0, "install: {err}");
    let page = prefix.join("share/man/man1/vblade.1");
    let mut text = fs::read_to_string(&page).unwrap();
    text.push_str(".\\\" local note\n");
    fs::write(&page, text).unwrap();
    let link = prefix.join("bin/aoeping");
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink("/bin/true", &link).unwrap();
    let (rc, err) = install_sh(&prefix, &["--uninstall"], &[]);
    assert_eq!(rc, 1, "uninstall with changed files: {err}");
    assert!(
        err.contains(&format!(
            "{} changed since it was installed; kept",
            page.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{} now points to /bin/true", link.display())),
        "{err}"
    );
    assert!(page.is_file() && link.is_symlink());
    assert!(!prefix.join("bin/aoe").exists() && !prefix.join("bin/vblade").exists());
    // The operator looks at them, removes them; the next run finishes.
    fs::remove_file(&page).unwrap();
    fs::remove_file(&link).unwrap();
    let (rc, err) = install_sh(&prefix, &["--uninstall"], &[]);
    assert_eq!(rc, 0, "uninstall after: {err}");
    assert_eq!(
        tree(&prefix),
        ["bin", "bin/mine", "etc", "etc/aoe", "etc/aoe/site.toml"]
    );
}

/// Session 28 (operator's audit, session 27): a link named like a program found elsewhere
/// on PATH (Debian's /usr/sbin/vblade and aoetools' programs) is said to shadow it when the
/// links' directory comes first on PATH, naming both; `--no-shadow` (install-links.sh) and
/// `NO_SHADOW=1` (install.sh) make no link for a name already on PATH. Before: silent.
#[test]
fn install_links_says_which_names_shadow_which_and_can_skip_them() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("sbin");
    fs::create_dir_all(&fake).unwrap();
    for name in ["vblade", "aoe-stat"] {
        let p = fake.join(name);
        fs::write(&p, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let links = dir.path().join("links");
    let path = format!("{}:{}:/usr/bin:/bin", links.display(), fake.display());
    let run = |args: &[&str]| {
        let out = Command::new("sh")
            .arg(repo().join("scripts/install-links.sh"))
            .args(args)
            .env("PATH", &path)
            .output()
            .unwrap();
        assert!(out.status.success(), "install-links.sh {args:?}: {out:?}");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let l = links.to_str().unwrap();
    let (out, err) = run(&[l, AOE]);
    for name in ["vblade", "aoe-stat"] {
        assert!(
            out.contains(&format!(
                "{l}/{name} -> {AOE} (shadows {}/{name} on PATH)",
                fake.display()
            )),
            "{name}: {out}"
        );
    }
    assert!(err.contains("--no-shadow"), "{err}");
    assert!(out.contains(&format!("{l}/aoeping -> {AOE}\n")), "{out}");
    fs::remove_dir_all(&links).unwrap();
    let (out, err) = run(&["--no-shadow", l, AOE]);
    assert!(!links.join("vblade").exists() && !links.join("aoe-stat").exists());
    assert!(links.join("aoeping").is_symlink(), "{out}");
    assert!(
        err.contains(&format!(
            "vblade is on PATH already ({}/vblade); no link made",
            fake.display()
        )),
        "{err}"
    );

    // install.sh: PREFIX/bin first on PATH.
    let prefix = dir.path().join("p");
    let path = format!("{}/bin:{}:/usr/bin:/bin", prefix.display(), fake.display());
    let (rc, err) = install_sh(&prefix, &[], &[("PATH", &path)]);
    assert_eq!(rc, 0, "{err}");
    assert!(
        err.contains(&format!(
            "{}/bin/vblade shadows {}/vblade on PATH",
            prefix.display(),
            fake.display()
        )),
        "{err}"
    );
    let (rc, err) = install_sh(&prefix, &["--uninstall"], &[]);
    assert_eq!(rc, 0, "{err}");
    let (rc, err) = install_sh(&prefix, &[], &[("PATH", &path), ("NO_SHADOW", "1")]);
    assert_eq!(rc, 0, "{err}");
    assert!(!prefix.join("bin/vblade").exists() && !prefix.join("bin/aoe-stat").exists());
    assert!(prefix.join("bin/aoeping").is_symlink());
    assert!(!err.contains("shadows"), "{err}");
}

/// Operator's audit (session 27): `aoe-serve@.service` lets through the address families
/// the target's own features use: AF_INET/AF_INET6 for an `rbd:` export (librados talks
/// TCP to the monitors and OSDs) and for `--metrics` in a drop-in. Before: AF_PACKET,
/// AF_UNIX and AF_NETLINK only, so either failed under the unit (EAFNOSUPPORT) though
/// it worked from a shell.
#[test]
fn the_serve_unit_allows_the_address_families_rbd_and_metrics_need() {
    let text = fs::read_to_string(repo().join("dist/systemd/aoe-serve@.service")).unwrap();
    let families = text
        .lines()
        .find_map(|l| l.strip_prefix("RestrictAddressFamilies="))
        .expect("RestrictAddressFamilies=");
    for f in ["AF_PACKET", "AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"] {
        assert!(
            families.split_whitespace().any(|w| w == f),
            "{f} missing: {families}"
        );
    }
}

#[test]
fn units_pass_systemd_analyze_verify() {
    require_tools(&[("systemd-analyze", "systemd"), ("man", "man-db")]);
    let dir = install();
    let units = dir.path().join("lib/systemd/system");
    for u in ["aoe-initiator.service", "aoe-serve@.service"] {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(units.join(u))
            // verify checks that Documentation=man:... pages exist.
            .env("MANPATH", dir.path().join("share/man"))
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "systemd-analyze verify {u}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = fs::read_to_string(units.join(u)).unwrap();
        let bin = dir.path().join("bin/aoe");
        assert!(
            text.contains(&format!("ExecStart={} ", bin.display())),
            "{text}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// aoe read: broadcast addresses refused, no partial output left

#[test]
fn read_refuses_broadcast_addresses_and_creates_no_file() {
    require_root();
    let ns = aoe_testkit::Netns::new("aoeopsr").unwrap();
    let peer = aoe_testkit::Netns::new("aoeopsp").unwrap();
    let veth = aoe_testkit::VethPair::new(&ns, &peer, 1500).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (shelf, slot) in [("65535", "255"), ("65535", "1"), ("1", "255")] {
        let out_file = dir.path().join("out.img");
        let mut cmd = ns.command(AOE);
        cmd.args(["read", shelf, slot, veth.a_name()])
            .arg(&out_file)
            .args(["--timeout", "1"]);
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "aoe read {shelf} {slot}: {err}");
        assert!(err.contains("broadcast address"), "{err}");
        assert!(
            !out_file.exists(),
            "aoe read {shelf} {slot} created its output"
        );
    }
}

#[test]
fn read_removes_its_partial_output_when_the_target_goes_away() {
    require_root();
    let t_ns = aoe_testkit::Netns::new("aoeopst").unwrap();
    let i_ns = aoe_testkit::Netns::new("aoeopsi").unwrap();
    let veth = aoe_testkit::VethPair::new(&t_ns, &i_ns, 1500).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    fs::File::create(&img).unwrap().set_len(4 << 30).unwrap();
    let mut target = t_ns
        .spawn({
            let mut c = Command::new(AOE);
            c.args(["serve", "--probe-ms", "0", "5", "5", veth.a_name()])
                .arg(&img);
            c
        })
        .unwrap();
    let out_file = dir.path().join("out.img");
    let mut reader = i_ns
        .spawn({
            let mut c = Command::new(AOE);
            c.args(["read", "5", "5", veth.b_name()])
                .arg(&out_file)
                .args(["--timeout", "2"]);
            c
        })
        .unwrap();
    let started = wait_until(Duration::from_secs(60), || {
        fs::metadata(&out_file).is_ok_and(|m| m.len() > (1 << 20)) || !reader.is_running()
    });
    assert!(
        started && reader.is_running(),
        "the read did not get going: {}\n{}",
        reader.output_so_far(),
        target.output_so_far()
    );
    target.stop().unwrap();
    let status = reader
        .wait_timeout(Duration::from_secs(60))
        .unwrap()
        .expect("aoe read ends after the target went away");
    assert!(!status.success(), "{}", reader.output_so_far());
    assert!(
        !out_file.exists(),
        "a partial copy was left: {} bytes\n{}",
        fs::metadata(&out_file).map(|m| m.len()).unwrap_or(0),
        reader.output_so_far()
    );
    assert!(
        reader.output_so_far().contains("removed"),
        "{}",
        reader.output_so_far()
    );
}

/// A target we do not have: it answers Query Config, IDENTIFY with a page whose words
/// 100-103 claim `claimed` sectors, and each read with sectors stamped with the LBA the
/// request carried (its 48 bits), until `stop`. Every carried read LBA goes to `seen`.
fn fake_target(
    sock: aoe_sys::PacketSocket,
    claimed: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seen: mpsc::Sender<u64>,
) {
    use aoe_wire::{AtaRepr, Body, ConfigCommand, ConfigRepr, Identify, Message};
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 9100];
    let page = Identify {
        model: "fake".into(),
        serial: "fake".into(),
        firmware: "1".into(),
        sectors: claimed,
        write_cache: false,
        smart: false,
    }
    .build();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let mut fds = [aoe_sys::PollFd::new(sock.as_raw_fd())];
        if aoe_sys::poll(&mut fds, Some(Duration::from_millis(50))).is_err() {
            return;
        }
        // An error (the link gone as a failed test unwinds) ends the loop too.
        while let Ok(Some(meta)) = sock.recv(&mut buf) {
            let Ok(m) = Message::parse(&buf[..meta.len]) else {
                continue;
            };
            if m.header.response {
                continue;
            }
            let mut h = m.header;
            h.response = true;
            h.dst = m.header.src;
            h.src = aoe_wire::MacAddr(sock.info().mac);
            let data: Vec<u8>;
            let body = match m.body {
                Body::Config(_) => Body::Config(ConfigRepr {
                    buffer_count: 16,
                    firmware_version: 0x4019,
                    sector_count: 2,
                    aoe_version: 1,
                    ccmd: ConfigCommand::Read,
                    config: b"",
                }),
                Body::Ata(a) if a.cmd_status == 0xec => {
                    data = page.to_vec();
                    Body::Ata(AtaRepr {
                        cmd_status: 0x40,
                        data: &data,
                        ..a
                    })
                }
                Body::Ata(a) if a.cmd_status == 0x24 => {
                    let _ = seen.send(a.lba);
                    data = (0..u64::from(a.sector_count))
                        .flat_map(|i| (a.lba + i).to_le_bytes().repeat(64))
                        .collect();
                    Body::Ata(AtaRepr {
                        cmd_status: 0x40,
                        data: &data,
                        ..a
                    })
                }
                _ => continue,
            };
            let f = Message { header: h, body }.to_vec().expect("emit");
            let _ = sock.send(&f);
        }
    }
}

/// Audit (s24): `aoe read` and `aoe bench` took an IDENTIFY page's capacity as it came
/// (words 100-103, up to 2^64 - 1), while the LBA field of the commands they send holds 48
/// bits: against a target claiming more, `aoe read --lba 2^48+5` sent a read of sector 5 and
/// wrote its data out as sector 2^48+5 (exit 0), and `aoe bench` spread its requests over
/// the claim, each past 2^48 going out as a sector 2^48 lower. And `aoe read --lba 8
/// --count 2^64-1` wrapped the end below the start: nothing read, exit 0, "read
/// 18446744073709551615 sectors". The capacity is now cut to 2^48 (said on stderr) and the
/// range's end checked.
#[test]
fn read_and_bench_cut_a_capacity_beyond_lba48() {
    require_root();
    let t_ns = aoe_testkit::Netns::new("aoeopsf").unwrap();
    let i_ns = aoe_testkit::Netns::new("aoeopsg").unwrap();
    let veth = aoe_testkit::VethPair::new(&t_ns, &i_ns, 1500).unwrap();
    let name = veth.a_name().to_owned();
    let sock = aoe_sys::run_in_netns(&t_ns.path(), move || aoe_sys::PacketSocket::open(&name))
        .expect("enter netns")
        .expect("AoE socket");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, seen) = mpsc::channel();
    let fake = {
        let stop = stop.clone();
        std::thread::spawn(move || fake_target(sock, u64::MAX, stop, tx))
    };
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("out.img");
    let read = |lba: u64, count: u64| {
        let mut c = i_ns.command(AOE);
        c.args(["read", "5", "5", veth.b_name()])
            .arg(&out_file)
            .args(["--timeout", "5", "--lba", &lba.to_string()])
            .args(["--count", &count.to_string()]);
        c.output().unwrap()
    };
    let reach = 1u64 << 48;
    // Past what a 48-bit LBA reaches: refused, nothing read, no file.
    let o = read(reach + 5, 1);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let carried: Vec<u64> = seen.try_iter().collect();
    assert!(
        !o.status.success() && !out_file.exists() && carried.is_empty(),
        "aoe read --lba 2^48+5 on a target claiming 2^64-1 sectors: {:?}, reads sent at {carried:?}, \
         output {:?}: {err}",
        o.status,
        fs::read(&out_file).ok().map(|b| b[..8].to_vec())
    );
    assert!(err.contains("LBA48 commands reach"), "{err}");
    assert!(err.contains("beyond the device"), "{err}");
    // The last sector reached reads as itself.
    let o = read(reach - 1, 1);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        fs::read(&out_file).unwrap(),
        (reach - 1).to_le_bytes().repeat(64)
    );
    // A count that wraps the end is refused, not taken for an empty range.
    let o = read(8, u64::MAX);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("exceed the device"),
        "aoe read --lba 8 --count 2^64-1: {o:?}"
    );
    // aoe bench spreads its reads over what is reached, and says what it took.
    let _ = seen.try_iter().count();
    let o = i_ns
        .command(AOE)
        .args([
            "bench",
            veth.b_name(),
            "--target",
            "5.5",
            "--mode",
            "randread",
        ])
        .args(["--time", "0.5", "--window", "1", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("bench JSON");
    assert_eq!(report["target"]["sectors"], reach, "{report}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    fake.join().unwrap();
}

// ------------------------------------------------------------------------------------------
// --help shows defaults

/// The defaults `aoe serve --help` shows are the ones the target applies (the options are
/// `Option`s so that `--config` can tell given from not given, hence written in the help).
#[test]
fn serve_help_shows_the_defaults_it_applies() {
    let out = Command::new(AOE)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let line = |opt: &str| {
        help.lines()
            .skip_while(|l| !l.contains(opt))
            .take_while(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    };
    use aoe_target::config::{DEFAULT_BUFFER_COUNT, DEFAULT_WORKERS};
    let probe = aoe_target::probe::DEFAULT_PROBE.as_millis();
    for (opt, want) in [
        ("-b <BUFCNT>", DEFAULT_BUFFER_COUNT.to_string()),
        ("--workers <N>", DEFAULT_WORKERS.to_string()),
        ("--probe-ms <MS>", probe.to_string()),
        ("-o <OFFSET>", "0".to_string()),
    ] {
        let l = line(opt);
        assert!(l.contains(&format!("[default: {want}]")), "{opt}: {l:?}");
    }
}

// ------------------------------------------------------------------------------------------
// Log noise

/// fuser's `WARN [Not Implemented] access(...)` (several lines per access(2) on a FUSE
/// file) stays out of the initiator's log, at the default level and at debug.
#[test]
fn initiator_log_has_no_fuser_not_implemented_noise() {
    demo_tools();
    for level in ["info", "debug"] {
        let ns = aoe_testkit::Netns::new("aoeopsf").unwrap();
        let peer = aoe_testkit::Netns::new("aoeopsg").unwrap();
        let veth = aoe_testkit::VethPair::new(&ns, &peer, 1500).unwrap();
        fs::create_dir_all("/run/aoeroots").unwrap();
        let root =
            std::path::PathBuf::from(format!("/run/aoeroots/f{}-{level}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        let mut cmd = Command::new(AOE);
        cmd.arg("initiator")
            .arg("--root")
            .arg(&root)
            .args(["--iflist", veth.b_name()])
            .env("AOE_LOG", level);
        let mut init = peer.spawn(cmd).unwrap();
        let discover = root.join("discover");
        assert!(
            wait_until(Duration::from_secs(20), || discover.exists()
                || !init.is_running()),
            "initiator did not mount: {}",
            init.output_so_far()
        );
        // access(2) on the control files, as `test -w` in aoetools' scripts does.
        for _ in 0..3 {
            let st = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "test -w {0}/discover && test -r {0}/interfaces",
                    root.display()
                ))
                .status()
                .unwrap();
            assert!(st.success());
        }
        let status = init.stop_within(Duration::from_secs(20)).unwrap();
        assert!(status.success(), "{}", init.output_so_far());
        let log = init.output_so_far();
        let _ = fs::remove_dir(&root);
        assert!(
            !log.contains("Not Implemented"),
            "AOE_LOG={level}: fuser noise in the log:\n{log}"
        );
    }
}

/// The "exporting" line names how the export is served: read-only, direct, sync, offset,
/// mask.
#[test]
fn exporting_line_names_read_only_direct_sync_offset_and_mask() {
    require_root();
    let t_ns = aoe_testkit::Netns::new("aoeopse").unwrap();
    let i_ns = aoe_testkit::Netns::new("aoeopsj").unwrap();
    let veth = aoe_testkit::VethPair::new(&t_ns, &i_ns, 1500).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    let mut c = Command::new(AOE);
    c.args(["serve", "--probe-ms", "0", "-r", "-s", "-o", "8"])
        .args([
            "-m",
            "52:54:00:12:34:56,52:54:00:12:34:57",
            "3",
            "4",
            veth.a_name(),
        ])
        .arg(&img);
    let mut t = t_ns.spawn(c).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || t
            .output_so_far()
            .contains("exporting")
            || !t.is_running()),
        "{}",
        t.output_so_far()
    );
    t.stop().unwrap();
    let log = t.output_so_far();
    let line = log.lines().find(|l| l.contains("exporting")).unwrap();
    // Keyed by shelf.slot, as every per-export line (issue 12).
    assert!(line.contains("e3.4: exporting"), "{line:?}");
    for want in [
        "read_only=true",
        "direct=false",
        "sync=true",
        "offset=8",
        "mask=52:54:00:12:34:56,52:54:00:12:34:57",
    ] {
        assert!(line.contains(want), "no {want} in {line:?}");
    }
}

// ------------------------------------------------------------------------------------------
// Progress on a terminal, quiet in scripts; --json where a script parses the output

/// `cmd` run in the network namespace `ns` (nsenter), its output.
fn in_ns(ns: &aoe_testkit::Netns, cmd: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .args(cmd)
        .output()
        .expect("run nsenter")
}

fn json_of(out: &std::process::Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(s.lines().count(), 1, "{what}: one line of JSON: {s:?}");
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("{what}: {e}: {s}"))
}

/// Issue 12: `aoe read` shows its progress on a terminal (here the pty `script` gives it)
/// and prints only its summary line otherwise; `aoeping --json` and `aoecfg --json` print
/// one JSON object (per answer) a script can parse.
#[test]
fn read_progress_only_on_a_terminal_and_ping_cfg_json() {
    require_root();
    require_tools(&[("script", "bsdutils"), ("nsenter", "util-linux")]);
    let t_ns = aoe_testkit::Netns::new("aoeopsq").unwrap();
    let i_ns = aoe_testkit::Netns::new("aoeopsr").unwrap();
    let veth = aoe_testkit::VethPair::new(&t_ns, &i_ns, 1500).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i / 512 % 251) as u8).collect();
    fs::write(&img, &data).unwrap();
    let mut target = t_ns
        .spawn({
            let mut c = Command::new(AOE);
            c.args(["serve", "--probe-ms", "0", "5", "6", veth.a_name()])
                .arg(&img);
            c
        })
        .unwrap();
    let b = veth.b_name();
    let mut ping = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            let out = in_ns(
                &i_ns,
                &[AOE, "ping", "--json", "-I", "-s", "1", "5", "6", b],
            );
            let ok = out.status.success();
            ping = Some(out);
            ok
        }),
        "no answer to aoe ping --json: {:?}\n{}",
        ping,
        target.output_so_far()
    );
    let p = json_of(ping.as_ref().unwrap(), "aoe ping --json -I");
    let target_mac = aoe_wire::MacAddr(veth.a_mac()).to_string();
    assert_eq!(p["target"], "e5.6", "{p}");
    assert_eq!(p["mac"], target_mac.as_str(), "{p}");
    assert_eq!(p["interface"], b, "{p}");
    assert!(p["rtt_ms"].as_f64().is_some_and(|r| r >= 0.0), "{p}");
    assert_eq!(p["identify"]["sectors"], (data.len() / 512) as u64, "{p}");
    assert_eq!(p["buffer_count"], 128, "{p}");

    let c = json_of(
        &in_ns(&i_ns, &[AOE, "cfg", "--json", "-t", "5", "5", "6", b]),
        "aoe cfg --json",
    );
    assert_eq!(c["target"], "e5.6", "{c}");
    assert_eq!(c["string"], "", "{c}");
    assert!(c["error"].is_null(), "{c}");

    // Not a terminal: the summary line only.
    let out_file = dir.path().join("out.img");
    let out = in_ns(
        &i_ns,
        &[AOE, "read", "5", "6", b, out_file.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        fs::read(&out_file).unwrap() == data,
        "aoe read copied wrong data"
    );
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(
        !err.contains('\r') && err.starts_with("e5.6: read 16384 sectors"),
        "{err:?}"
    );

    // On a terminal: the progress line, then the summary.
    let tty_file = dir.path().join("tty.img");
    let out = Command::new("script")
        .args([
            "-qec",
            &format!(
                "nsenter --net={} {AOE} read 5 6 {b} {}",
                i_ns.path().display(),
                tty_file.display()
            ),
            "/dev/null",
        ])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("\re5.6: ") && shown.contains(" of 8.0 MiB ("),
        "no progress line on a terminal: {shown:?}"
    );
    assert!(shown.contains("e5.6: read 16384 sectors"), "{shown:?}");
    target.stop().unwrap();
}

/// `aoe initiator --iflist ''` (say, a script's empty variable) used to start on every
/// interface, as if `--iflist` had not been given. It is refused at once, one line naming
/// the option. Run in a namespace of its own, so that the code before the fix (which
/// started and ran until `timeout` ended it: exit 124) met only a loopback.
#[test]
fn initiator_refuses_an_iflist_that_names_no_interface() {
    require_root();
    let ns = aoe_testkit::Netns::new("aoeopsif").unwrap();
    let root = tempfile::tempdir().unwrap();
    for list in ["", " ", ", ,"] {
        let out = ns
            .command("timeout")
            .args(["10", AOE, "initiator", "--root"])
            .arg(root.path())
            .args(["--iflist", list])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "--iflist {list:?}: exit status; stderr:\n{stderr}"
        );
        assert!(
            stderr.contains("--iflist names no interface") && stderr.trim().lines().count() == 1,
            "--iflist {list:?}: {stderr}"
        );
    }
}
