//! `aoe target` (issue 12): every subcommand, plain and `--json`, against a running
//! `aoe serve` with an initiator on a veth link; the control socket is 0600 and goes away
//! with the target.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use aoe_testkit::wait_until;
use aoe_wire::{
    Body, Command as AoeCmd, Directive, DirectiveCommand, HeaderRepr, MacAddr, MacMaskRepr,
    MaskCommand, MaskError, Message, ReserveCommand, ReserveRepr, Tag, TargetAddr,
};
use common::*;

fn target(sock: &std::path::Path, args: &[&str]) -> std::process::Output {
    run(Command::new("timeout")
        .args(["-k", "5", "60", AOE, "target", "--socket"])
        .arg(sock)
        .args(args))
}

fn target_ok(sock: &std::path::Path, args: &[&str]) -> String {
    let out = target(sock, args);
    assert!(
        out.status.success(),
        "aoe target {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(sock: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = target_ok(sock, &a);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

#[test]
fn every_target_subcommand_against_a_running_target() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("ctl.sock");
    let sock_s = sock.to_string_lossy().into_owned();
    let mut rig = Rig::start_with(
        Target::AoeServe,
        1500,
        InitOpts::default(),
        None,
        &["--control", &sock_s],
    );
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let data = read_at(&rig.dev(), 0, 64 * 1024).expect("read through the device");
    assert_eq!(data.len(), 64 * 1024);

    // status
    let s = target_ok(&sock, &["status"]);
    let row = s
        .lines()
        .find(|l| l.starts_with(&format!("{SHELF}.{SLOT} ")))
        .unwrap_or_else(|| panic!("no row for {SHELF}.{SLOT}:\n{s}"));
    assert!(
        row.contains(&rig.target_if)
            && row.contains(&SECTORS.to_string())
            && row.contains(" rw ")
            && row.contains(&rig.file.display().to_string()),
        "{row}"
    );
    let j = json(&sock, &["status"]);
    assert_eq!(j["exports"][0]["target"], format!("{SHELF}.{SLOT}"));
    assert_eq!(j["exports"][0]["sectors"], SECTORS);
    assert_eq!(j["pid"], rig.target.as_ref().unwrap().pid());

    // stats
    let j = json(&sock, &["stats"]);
    let read0 = j["exports"][0]["counters"]["bytes_read"].as_u64().unwrap();
    assert!(read0 >= 64 * 1024, "bytes_read {read0}: {j}");
    assert!(j["exports"][0]["counters"]["replies"].as_u64().unwrap() > 0);
    let s = target_ok(&sock, &["stats", &format!("e{SHELF}.{SLOT}")]);
    assert!(
        s.contains("READ-BYTES") && s.contains(&read0.to_string()),
        "{s}"
    );
    assert!(s.contains(&rig.target_if), "interface row missing:\n{s}");

    // show-config
    let s = target_ok(&sock, &["show-config"]);
    assert!(
        s.contains(&format!("{SHELF}.{SLOT}:"))
            && s.contains("buffer-count  ")
            && s.contains("config-string \"\""),
        "{s}"
    );
    let j = json(&sock, &["show-config"]);
    assert_eq!(j["exports"][0]["read_only"], false);

    // show-macmask and show-reserve: empty, then set over the wire by raw frames.
    let s = target_ok(&sock, &["show-macmask"]);
    assert!(s.contains("(empty: every initiator)"), "{s}");
    let s = target_ok(&sock, &["show-reserve"]);
    assert!(s.contains("(empty: not reserved)"), "{s}");
    let me = MacAddr(rig.veth.b_mac());
    let raw = raw_socket(&rig.init_ns, &rig.init_if);
    let header = |cmd, tag| {
        HeaderRepr::request(
            MacAddr(rig.veth.a_mac()),
            me,
            TargetAddr::new(SHELF, SLOT),
            cmd,
            Tag(tag),
        )
    };
    let mask = Message {
        header: header(AoeCmd::MacMaskList, 0x8000_0101),
        body: Body::MacMask(MacMaskRepr {
            mcmd: MaskCommand::Edit,
            merror: MaskError::None,
            directives: vec![Directive {
                command: DirectiveCommand::Add,
                mac: me,
            }],
        }),
    };
    raw.send(&mask.to_vec().unwrap()).expect("send mask edit");
    let reserve = Message {
        header: header(AoeCmd::ReserveRelease, 0x8000_0102),
        body: Body::Reserve(ReserveRepr {
            rcmd: ReserveCommand::Set,
            macs: vec![me],
        }),
    };
    raw.send(&reserve.to_vec().unwrap()).expect("send reserve");
    let mut s = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            s = target_ok(&sock, &["show-macmask"]);
            s.contains(&me.to_string())
        }),
        "mask not shown: {s}"
    );
    assert_eq!(
        json(&sock, &["show-macmask"])["exports"][0]["mask"][0],
        me.to_string()
    );
    let s = target_ok(&sock, &["show-reserve"]);
    assert!(s.contains(&format!("{SHELF}.{SLOT}: {me}")), "{s}");
    assert_eq!(
        json(&sock, &["show-reserve"])["exports"][0]["reserve"][0],
        me.to_string()
    );

    // clear-stats: the counters shown start again from zero.
    let s = target_ok(&sock, &["clear-stats"]);
    assert_eq!(s.trim(), "statistics cleared for 1 export(s)");
    let j = json(&sock, &["stats"]);
    let read1 = j["exports"][0]["counters"]["bytes_read"].as_u64().unwrap();
    assert!(
        read1 < read0,
        "bytes_read {read1} after clear-stats, {read0} before"
    );
    assert_eq!(json(&sock, &["clear-stats", "7.3"])["cleared"], 1);

    // monitor: a header and one line per interval.
    let s = target_ok(&sock, &["monitor", "-i", "0.2", "-c", "2"]);
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines.len(), 3, "{s}");
    assert!(
        lines[0].starts_with("TARGET") && lines[0].contains("READ-B/s"),
        "{s}"
    );
    assert!(
        lines[1..]
            .iter()
            .all(|l| l.starts_with(&format!("{SHELF}.{SLOT} "))),
        "{s}"
    );
    let s = target_ok(&sock, &["--json", "monitor", "-i", "0.2", "-c", "2"]);
    assert_eq!(s.lines().count(), 2, "{s}");
    for l in s.lines() {
        let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
        assert_eq!(v["exports"][0]["target"], format!("{SHELF}.{SLOT}"));
    }

    // Errors are one line and exit 1.
    let out = target(&sock, &["stats", "9.9"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), "aoe: target: no export 9.9 on this target");

    // The socket goes away with the target.
    rig.kill_target();
    assert!(
        wait_until(Duration::from_secs(5), || !sock.exists()),
        "socket left behind"
    );
    rig.start_target();
    rig.finish();
}

/// Issue 12: the control socket's path as the config file's `control` key (relative to the
/// file, like its other paths), and `--control` on the command line winning over it.
#[test]
fn control_socket_path_from_the_config_file_and_the_flag_over_it() {
    let t_ns = aoe_testkit::Netns::new("aoectlk").expect("namespace");
    let o_ns = aoe_testkit::Netns::new("aoectll").expect("namespace");
    let veth = aoe_testkit::VethPair::new(&t_ns, &o_ns, 1500).expect("veth pair");
    let dir = tempfile::tempdir().expect("temp dir");
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let conf = dir.path().join("serve.toml");
    std::fs::write(
        &conf,
        format!(
            "control = \"run/ctl.sock\"\nprobe_ms = 0\n[[export]]\npath = \"disk.img\"\n\
             shelf = 9\nslot = 8\ninterfaces = [\"{}\"]\n",
            veth.a_name()
        ),
    )
    .unwrap();
    let from_file = dir.path().join("run/ctl.sock");
    let flag = dir.path().join("flag.sock");
    for (extra, want, not) in [(None, &from_file, &flag), (Some(&flag), &flag, &from_file)] {
        let mut c = Command::new(AOE);
        c.args(["serve", "--config"]).arg(&conf);
        if let Some(f) = extra {
            c.arg("--control").arg(f);
        }
        let mut t = t_ns.spawn(c).expect("start aoe serve");
        assert!(
            wait_until(Duration::from_secs(20), || want.exists() || !t.is_running()),
            "no control socket at {}:\n{}",
            want.display(),
            t.output_so_far()
        );
        let st = json(want, &["status"]);
        assert_eq!(st["exports"][0]["target"], "9.8", "{st}");
        assert!(!not.exists(), "a socket at {} too", not.display());
        t.stop().expect("stop aoe serve");
        assert!(!want.exists(), "socket left behind at {}", want.display());
    }
}

/// Sixth audit, row 2 (docs/TEST-AUDIT.md): hostile local clients of the control socket.
/// Two hundred connections that send nothing; a request line of 64 MiB with no end; a
/// `monitor` at 100 ms whose client never reads. The export answers reads meanwhile;
/// `aoe target status` gets a clear error while the connections are held and answers
/// once they close; the daemon's threads and memory stay bounded, and the monitor that
/// is never read is closed. Before: a thread per connection with no bound (200 more
/// threads), the long line kept whole in memory, and the unread monitor's thread blocked
/// in its write for ever.
#[test]
fn hostile_control_clients_are_bounded() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    let data = pattern(43, 4 << 20);
    std::fs::write(&file, &data).unwrap();
    let sock = dir.path().join("ctl.sock");
    let sock_s = sock.to_string_lossy().into_owned();
    let mut lan = RawLan::start(Target::AoeServe, &file, &["--control", &sock_s], 1);
    let pid = lan.target.as_ref().unwrap().pid();
    let status = |key: &str| common::proc_status(pid, key);
    // Connections to the control socket the daemon has not accepted yet: the Recv-Q of its
    // listening socket (`ss`, in the daemon's namespace, where the socket lives).
    let ns = lan.target_ns.name().to_owned();
    let unaccepted = || -> Option<u64> {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "ss", "-xlH", "src", &sock_s])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(2)?
            .parse()
            .ok()
    };
    let mut read_ok = |lba: u64| {
        let f = lan
            .request(
                0,
                RawLan::ata(0x24, false, lba, 2, &[]),
                Duration::from_secs(5),
            )
            .unwrap_or_else(|| panic!("no answer to a read of LBA {lba}"));
        let Body::Ata(a) = Message::parse(&f).unwrap().body else {
            panic!("not an ATA reply")
        };
        assert_eq!(
            a.data[..1024],
            data[lba as usize * 512..][..1024],
            "LBA {lba}"
        );
    };
    target_ok(&sock, &["status"]);
    read_ok(0);
    let threads0 = status("Threads:");
    let peak0 = status("VmHWM:");

    // The long line.
    let mut long = UnixStream::connect(&sock).unwrap();
    long.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let chunk = vec![b'{'; 1 << 20];
    let mut sent = 0;
    for _ in 0..64 {
        if long.write_all(&chunk).is_err() {
            break;
        }
        sent += 1;
    }
    read_ok(8);
    let peak1 = status("VmHWM:");
    drop(long);

    // The monitor nobody reads, and the idle connections.
    let mut unread = UnixStream::connect(&sock).unwrap();
    writeln!(unread, r#"{{"cmd":"monitor","interval_ms":100}}"#).unwrap();
    let idle: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    // The daemon has taken all 200 in (connect() returns once the kernel queued them, before
    // the daemon accepts them). A 500 ms sleep stood for it: a daemon slower to accept had
    // fewer threads to count and could answer the status below.
    let mut queued = None;
    let accepted = wait_until(Duration::from_secs(20), || {
        queued = unaccepted();
        queued == Some(0)
    });
    assert!(
        accepted,
        "the daemon did not accept the idle connections in 20 s ({queued:?} queued)"
    );
    let out = target(&sock, &["status"]);
    read_ok(16);
    let threads1 = status("Threads:");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    drop(idle);
    assert!(
        threads1 <= threads0 + 64,
        "{threads0} threads before, {threads1} with 200 idle control connections"
    );
    assert!(
        peak1 < peak0 + 16 * 1024,
        "a {sent} MiB request line took the daemon's peak RSS from {peak0} to {peak1} KiB"
    );
    assert!(
        !out.status.success() && err.contains("control connections are open"),
        "aoe target status with 200 connections held: {}\n{err}",
        out.status
    );
    // Once they close, status answers; the unread monitor is closed in the end.
    assert!(
        wait_until(Duration::from_secs(10), || target(&sock, &["status"])
            .status
            .success()),
        "status not answered after the idle connections closed"
    );
    let hung_up = || {
        use std::os::fd::AsRawFd;
        // Neither readable nor writable asked: ready only on a hang-up (or an error).
        let mut fds = [aoe_sys::PollFd::with_events(
            unread.as_raw_fd(),
            false,
            false,
        )];
        aoe_sys::poll(&mut fds, Some(Duration::ZERO)).unwrap();
        fds[0].ready
    };
    assert!(
        !hung_up(),
        "the monitor was closed before its client stopped reading"
    );
    assert!(
        wait_until(Duration::from_secs(60), hung_up),
        "the monitor nobody reads is still open after 60 s"
    );
    read_ok(24);
    drop(unread);
}

/// Sixth audit, row 2: `aoe target` against a stopped daemon (SIGSTOP) ends with an error
/// that says what is wrong. Before: after 30 s, `read from SOCKET: Resource temporarily
/// unavailable (os error 11)`. Now after 10 s, naming a stopped or hung daemon; once the
/// daemon runs again it answers.
#[test]
fn aoe_target_against_a_stopped_daemon_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("ctl.sock");
    let sock_s = sock.to_string_lossy().into_owned();
    let lan = RawLan::start(Target::AoeServe, &file, &["--control", &sock_s], 1);
    let pid = lan.target.as_ref().unwrap().pid().to_string();
    target_ok(&sock, &["status"]);
    // Stopped for sure (every thread) before the request: SIGSTOP is asynchronous.
    stop_process(pid.parse().unwrap());
    let out = target(&sock, &["status"]);
    run(Command::new("kill").args(["-CONT", &pid]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no answer in 10 s") && err.contains("stopped"),
        "aoe target status against a stopped daemon: {}\n{err}",
        out.status
    );
    target_ok(&sock, &["status"]);
}

/// Ninth audit (s26): the exported file truncated shorter under the export (as `truncate`
/// does, or a `cp` over it, which truncates the same inode before it writes), then grown
/// past its first size. The export keeps the size it opened with until a reload: reads
/// past the new end fail, and a grown file's new sectors are not seen. Nothing said so
/// (the path still names the same inode, so the renamed-over look was silent). Now one
/// warning for the shorter file and one for the longer, naming both sizes and the reload;
/// further looks at the same state add none. Before: "no warning about the shortened
/// image in 20 s".
#[test]
fn a_file_truncated_or_grown_under_the_export_is_warned_about() {
    let rig = Rig::start(Target::AoeServe, 1500, InitOpts::default());
    let target_log = || {
        rig.target
            .as_ref()
            .map(aoe_testkit::NsChild::output_so_far)
            .unwrap_or_default()
    };
    let count = |what: &str| {
        target_log()
            .lines()
            .filter(|l| l.contains("when the export opened it") && l.contains(what))
            .count()
    };
    let len = std::fs::metadata(&rig.file).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&rig.file)
        .expect("open the image");
    f.set_len(len / 2).expect("truncate");
    assert!(
        wait_until(Duration::from_secs(20), || count(
            "reads past its new end fail"
        ) == 1),
        "no warning about the shortened image in 20 s{}",
        rig.logs()
    );
    let line = target_log();
    assert!(
        line.contains(&format!("is {} bytes now, {len} when", len / 2)),
        "the warning does not give both sizes{}",
        rig.logs()
    );
    f.set_len(len + (1 << 20)).expect("grow");
    assert!(
        wait_until(Duration::from_secs(20), || count(
            "initiators see the old size"
        ) == 1),
        "no warning about the grown image in 20 s{}",
        rig.logs()
    );
    // Two more looks (5 s apart) at the same state: no further warning.
    std::thread::sleep(Duration::from_secs(11));
    assert_eq!(count("reads past its new end fail"), 1, "{}", rig.logs());
    assert_eq!(count("initiators see the old size"), 1, "{}", rig.logs());
    drop(f);
    rig.finish();
}

/// Sixth audit (s23): the exported file renamed over (`mv new.img disk.img`) while served.
/// Writes went on to the old, unlinked inode until a reload, as vblade's do, and nothing
/// said so. Now, within a look or two (every 5 s, off the event loop), one warning names the
/// path, the status shows `path_replaced` (and `path-replaced` in its mode column), and
/// `aoe_target_path_replaced` would say 1; the export still serves the file it opened (a
/// write through the device lands in the old inode, the new file untouched) until the
/// reload, which clears it. Before: no warning within 20 s.
#[test]
fn a_file_renamed_over_while_served_is_warned_about_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("ctl.sock");
    let sock_s = sock.to_string_lossy().into_owned();
    let rig = Rig::start_with(
        Target::AoeServe,
        1500,
        InitOpts::default(),
        None,
        &["--control", &sock_s],
    );
    let target_log = || {
        rig.target
            .as_ref()
            .map(aoe_testkit::NsChild::output_so_far)
            .unwrap_or_default()
    };
    let warned = |log: &str| {
        log.lines()
            .filter(|l| l.contains("names another file now"))
            .count()
    };
    assert_eq!(
        json(&sock, &["status"])["exports"][0]["path_replaced"],
        false
    );
    // Hold the old inode open here, to read what the target writes into it.
    let old = std::fs::File::open(&rig.file).expect("open the image");
    let new = dir.path().join("new.img");
    let len = old.metadata().unwrap().len() as usize;
    std::fs::write(&new, vec![0xb5u8; len]).expect("new image");
    std::fs::rename(&new, &rig.file).expect("rename over the image");
    assert!(
        wait_until(Duration::from_secs(20), || warned(&target_log()) == 1),
        "no warning about the replaced image in 20 s{}",
        rig.logs()
    );
    assert!(
        wait_until(Duration::from_secs(10), || json(&sock, &["status"])
            ["exports"][0]["path_replaced"]
            == true),
        "status without path_replaced{}",
        rig.logs()
    );
    assert!(target_ok(&sock, &["status"]).contains("path-replaced"));
    // The export still serves the file it opened.
    let data = pattern(41, 4096);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(rig.dev())
            .expect("open the device file");
        f.write_all_at(&data, 8192).expect("write");
        f.sync_all().expect("fsync");
        let mut got = vec![0u8; 4096];
        old.read_exact_at(&mut got, 8192)
            .expect("read the old inode");
        assert!(got == data, "the write did not reach the file opened");
    }
    let now = std::fs::read(&rig.file).unwrap();
    assert!(now.iter().all(|&b| b == 0xb5), "the new file was written");
    // A further look finds it still replaced: no second warning.
    let before = json(&sock, &["status"])["uptime"].as_f64().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || json(&sock, &["status"])
            ["uptime"]
            .as_f64()
            .unwrap()
            > before + 11.0),
        "the target's uptime stopped"
    );
    assert_eq!(warned(&target_log()), 1, "{}", rig.logs());
    drop(old);
    rig.finish();
}

/// Session 26: requests the kernel drops at the target's socket, its receive ring full, are
/// counted in `aoe target status` (`rx_dropped` of the interface, from `PACKET_STATISTICS`)
/// and in the text table. With the daemon stopped (SIGSTOP), 3000 one-sector reads overfill
/// its ring (1024 slots at least: `ring_frames`). Before, nothing the target reported said
/// a request was lost there: the field did not exist, and this test timed out waiting for it.
#[test]
fn requests_dropped_at_the_targets_ring_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("ctl.sock");
    let sock_s = sock.to_string_lossy().into_owned();
    let mut lan = RawLan::start(Target::AoeServe, &file, &["--control", &sock_s], 1);
    let pid = lan.target.as_ref().unwrap().pid().to_string();
    let dropped = |j: &serde_json::Value| j["interfaces"][0]["rx_dropped"].as_u64();
    assert_eq!(dropped(&json(&sock, &["status"])), Some(0));
    // READ SECTORS EXT of LBA 0; the same frame each time (the ring does not care).
    let (_, f) = lan.frame(0, RawLan::ata(0x24, false, 0, 1, &[]));
    // Stopped for sure (every thread) before the first frame: SIGSTOP is asynchronous, and
    // a loop still running drains the ring as the frames come.
    stop_process(pid.parse().unwrap());
    let mut sent = 0;
    for _ in 0..3000 {
        if lan.socks[0].send(&f).is_ok() {
            sent += 1;
        }
    }
    run(Command::new("kill").args(["-CONT", &pid]));
    assert!(sent > 2048, "only {sent} of 3000 frames went out");
    let mut last = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(10), || {
            last = json(&sock, &["status"]);
            dropped(&last).is_some_and(|n| n > 0)
        }),
        "no frame counted as dropped at the target's ring: {last}"
    );
    let text = target_ok(&sock, &["stats"]);
    assert!(text.contains("RX-DROPPED"), "{text}");
}

/// `aoe serve` of `file` on `iface` in `ns` (no address probe), once it says it exports.
fn serve_on(ns: &aoe_testkit::Netns, iface: &str, file: &std::path::Path) -> aoe_testkit::NsChild {
    let mut target = ns
        .spawn(Target::AoeServe.command(iface, file, &["--probe-ms".into(), "0".into()]))
        .expect("start target");
    assert!(
        wait_until(Duration::from_secs(20), || {
            target.output_so_far().contains("exporting") || !target.is_running()
        }) && target.is_running(),
        "target did not start:\n{}",
        target.output_so_far()
    );
    target
}

/// utime + stime of process `pid` in clock ticks (fields 14 and 15 of /proc/PID/stat,
/// counted after the parenthesised command name), as floods.rs reads them.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("target gone");
    let rest = &s[s.rfind(')').expect("stat") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Share of one core process `pid` used over the next `window`.
fn cpu_over(pid: u32, window: Duration) -> f64 {
    let t0 = std::time::Instant::now();
    let a = cpu_ticks(pid);
    std::thread::sleep(window);
    let b = cpu_ticks(pid);
    (b - a) as f64 / 100.0 / t0.elapsed().as_secs_f64()
}

/// Operator's audit (session 27): `aoe serve` (default `--io rings`) on an interface that
/// is down at start (a target started before the network at boot), and on one that goes
/// down and up under it (a cable pulled, `ifdown`/`ifup`). The kernel leaves ENETDOWN on
/// the packet socket, which poll reports as POLLERR until something reads it, and a ring's
/// reads never do; the refused announce also stayed in the transmit ring, the loop waiting
/// for POLLOUT on a socket that is always writable. Before: a whole core busy from then on
/// (300 000 failed kicks a second while down; after a flap, with the link up again, still
/// one core until the next request's reply read the error), and nothing said the
/// interface was down. Now: a warning at start, no CPU while down, and the export answers
/// once the link is up, after a flap too. The bound is loose (a fifth of a core, where the
/// busy loop took 0.5-1.0 of one on this 2-CPU machine under load); an idle target takes
/// ~0.
#[test]
fn an_interface_down_at_start_or_flapped_costs_no_cpu() {
    use aoe_testkit::{End, Netns, VethPair};
    require_tools();
    let t_ns = Netns::new("op27t").expect("target namespace");
    let c_ns = Netns::new("op27c").expect("client namespace");
    let veth = VethPair::new(&t_ns, &c_ns, 1500).expect("veth");
    veth.set_link(End::A, false).expect("link down");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    let mut target = serve_on(&t_ns, veth.a_name(), &file);
    assert!(
        target.output_so_far().contains("is down"),
        "no word that the interface is down:\n{}",
        target.output_so_far()
    );
    let pid = target.pid();
    let down = cpu_over(pid, Duration::from_secs(2));
    let ping = |when: &str| {
        let o = run(c_ns.command(AOE).args([
            "ping",
            "-t",
            "10",
            &SHELF.to_string(),
            &SLOT.to_string(),
            veth.b_name(),
        ]));
        assert!(o.status.success(), "{when}: no answer: {o:?}");
    };
    veth.set_link(End::A, true).expect("link up");
    ping("link brought up");
    veth.set_link(End::A, false).expect("link down");
    veth.set_link(End::A, true).expect("link up");
    // Measured before any request: a reply's send reads the socket error too (and fails),
    // so traffic after the flap ended the old busy loop; an idle target stayed in it.
    let flapped = cpu_over(pid, Duration::from_secs(2));
    ping("after a flap");
    let log = target.output_so_far();
    target.stop().expect("stop target");
    assert!(
        down < 0.2 && flapped < 0.2,
        "CPU of an idle target: {down:.2} of a core with its interface down, {flapped:.2} \
         after a flap\n{log}"
    );
}

/// Sixteenth audit (session 33): the target's interface changed under it. A packet socket
/// is bound to an interface index, and the kernel unbinds it for good when that index goes;
/// before, `aoe serve` kept the dead socket: after `ip link del` and a veth of the same name
/// made again (a new index) it answered nothing there, for ever, while its log said only
/// "Network is down" once (base: no answer in 20 s). And after `ip link set DEV address`
/// it went on answering from the old address (base: the Query Config answer came from the
/// old MAC), dropping every request sent to the new one. Now the refresh tick takes both:
/// the new MAC within a second, the new interface with a new socket, each said in the log.
#[test]
fn a_target_serves_its_interface_created_again_and_its_new_mac_address() {
    use aoe_testkit::{End, Netns, VethPair};
    require_tools();
    let t_ns = Netns::new("a16t").expect("target namespace");
    let c_ns = Netns::new("a16c").expect("client namespace");
    let mut veth = VethPair::new(&t_ns, &c_ns, 1500).expect("veth");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    let mut target = serve_on(&t_ns, veth.a_name(), &file);
    // The MAC the target answers a Query Config from, asked every 2 s for up to 20 s until
    // `done` holds for it; None if nothing answered.
    let answers_from = |veth: &VethPair, done: &dyn Fn(&str) -> bool| -> Option<String> {
        let mut last = None;
        wait_until(Duration::from_secs(20), || {
            let o = run(c_ns.command(AOE).args([
                "ping",
                "--json",
                "-s",
                "2",
                &SHELF.to_string(),
                &SLOT.to_string(),
                veth.b_name(),
            ]));
            let v: Option<serde_json::Value> = serde_json::from_slice(&o.stdout).ok();
            last = v.and_then(|v| v["mac"].as_str().map(str::to_owned));
            last.as_deref().is_some_and(done)
        });
        last
    };
    let mac = |m: [u8; 6]| MacAddr(m).to_string();
    let first = mac(veth.a_mac());
    assert_eq!(
        answers_from(&veth, &|m| m == first).as_deref(),
        Some(first.as_str()),
        "no answer at start:\n{}",
        target.output_so_far()
    );
    let new = "02:00:00:33:16:01";
    veth.set_mac(End::A, new).expect("set the MAC");
    let got = answers_from(&veth, &|m| m == new);
    assert_eq!(
        got.as_deref(),
        Some(new),
        "after `ip link set {} address {new}` the target answered from {got:?} for 20 s:\n{}",
        veth.a_name(),
        target.output_so_far()
    );
    veth.recreate()
        .expect("delete and create the veth pair again");
    let again = mac(veth.a_mac());
    let got = answers_from(&veth, &|m| m == again);
    let log = target.output_so_far();
    target.stop().expect("stop target");
    assert_eq!(
        got.as_deref(),
        Some(again.as_str()),
        "the veth pair deleted and created again (new index, MAC {again}): answers {got:?} \
         for 20 s:\n{log}"
    );
    for said in [
        "MAC address changed",
        "interface deleted and created again: serving the new one",
    ] {
        assert!(log.contains(said), "no {said:?} in the log:\n{log}");
    }
}

/// Operator's audit (session 27): an interface without an Ethernet address (a tun device:
/// AF_PACKET sees IP packets there, no Ethernet frames) is refused by `aoe serve --check`
/// and at start, naming it; a loopback interface is served with a warning that only this
/// host reaches it. Before: both taken without a word, the tun export answering nothing.
#[test]
fn an_interface_without_an_ethernet_address_is_refused() {
    use aoe_testkit::Netns;
    require_tools();
    let ns = Netns::new("op27n").expect("namespace");
    ns.ip(&["tuntap", "add", "mode", "tun", "op27tun"])
        .expect("tun");
    ns.ip(&["link", "set", "op27tun", "up"]).expect("tun up");
    ns.ip(&["link", "set", "lo", "up"]).expect("lo up");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    let file = file.to_str().unwrap();
    for check in [true, false] {
        let mut args = vec!["serve", "--probe-ms", "0", "1", "1", "op27tun", file];
        if check {
            args.push("--check");
        }
        let o = run(ns
            .command("timeout")
            .args(["-k", "5", "30", AOE])
            .args(&args));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {o:?}");
        assert!(
            err.contains("interface op27tun has no Ethernet address"),
            "{args:?}: {err}"
        );
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
    }
    let o = run(ns
        .command(AOE)
        .args(["serve", "--check", "1", "1", "lo", file]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{o:?}");
    assert!(err.contains("lo is a loopback interface"), "{err}");
}

/// Operator's audit (session 27): `aoe serve ... 2>&1 | head` and any log reader that goes
/// away. A log line written to the closed pipe failed, tracing-subscriber reported that
/// with `eprintln!` on the same stderr, and that panicked: the target died (exit 101) at
/// its first log line after the reader left. Now the line is dropped and the target
/// serves on; SIGTERM ends it with status 0.
#[test]
fn a_target_whose_log_reader_went_serves_on() {
    use aoe_testkit::{Netns, VethPair};
    use std::process::Stdio;
    require_tools();
    let t_ns = Netns::new("op27l").expect("target namespace");
    let c_ns = Netns::new("op27m").expect("client namespace");
    let veth = VethPair::new(&t_ns, &c_ns, 1500).expect("veth");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("ctl.sock");
    let mut child = t_ns
        .command(AOE)
        .args(["serve", "--probe-ms", "0", "--control"])
        .arg(&sock)
        .args(["1", "1", veth.a_name()])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start target");
    // The reader goes before the first line is written.
    drop(child.stderr.take());
    let answered = wait_until(Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(None)) && target(&sock, &["status"]).status.success()
    });
    let early = child.try_wait().ok().flatten();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("wait");
    assert!(
        answered && early.is_none(),
        "the target did not serve with its log reader gone: exited {early:?}"
    );
    assert_eq!(status.code(), Some(0), "{status}");
}

/// Operator's audit (session 27), the initiator's side of
/// `an_interface_down_at_start_or_flapped_costs_no_cpu`: `aoe initiator` (receive and
/// transmit rings) held a core while its interface was down (2.96 s of CPU in 3 s on a
/// down `--iflist` interface) and after it came back up (a full core until the process
/// ended: nothing read the socket's ENETDOWN), and re-kicked every millisecond while the
/// down link refused its frames. Now idle, and the device reads again after the flap.
#[test]
fn the_initiator_on_a_link_that_went_down_and_up_costs_no_cpu() {
    use aoe_testkit::End;
    let rig = Rig::start(Target::AoeServe, 1500, InitOpts::default());
    let pid = rig.initiator.as_ref().expect("initiator").pid();
    read_at(&rig.dev(), 0, 4096).expect("read before the flap");
    rig.veth.set_link(End::B, false).expect("link down");
    let down = cpu_over(pid, Duration::from_secs(2));
    rig.veth.set_link(End::B, true).expect("link up");
    let flapped = cpu_over(pid, Duration::from_secs(2));
    let reads = wait_until(Duration::from_secs(30), || {
        read_at(&rig.dev(), 0, 4096).is_ok()
    });
    let log = rig.initiator_log();
    rig.finish();
    assert!(reads, "the device does not read after the flap:\n{log}");
    assert!(
        down < 0.2 && flapped < 0.2,
        "CPU of an idle initiator: {down:.2} of a core with its link down, {flapped:.2} \
         after it came up\n{log}"
    );
}
