//! `--metrics` on `aoe serve` and `aoe initiator` (issue 12): scraped over HTTP on
//! 127.0.0.1 inside each namespace during a transfer, the counters move and every line is
//! Prometheus/OpenMetrics text: the target's requests by command and errors by code, the
//! initiator's bytes read and written, RTT, window, state and in-flight per device.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aoe_testkit::{wait_until, Netns};
use common::*;

const PORT: u16 = 9610;

/// `GET /metrics` from inside `ns`; the body, after checking the status and content type.
fn scrape(ns: &Netns) -> String {
    let (head, body) = get_metrics(ns, PORT);
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text"),
        "{head}"
    );
    check_exposition(&body);
    body
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

/// Checks the syntax of every line: `# HELP|TYPE|UNIT name ...`, `# EOF` last, or a sample
/// `name{label="value",...} number`.
fn check_exposition(body: &str) {
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "no # EOF at the end:\n{body}");
    for l in &lines[..lines.len() - 1] {
        if let Some(rest) = l.strip_prefix("# ") {
            let mut w = rest.splitn(3, ' ');
            let kind = w.next().unwrap_or("");
            let name = w.next().unwrap_or("");
            assert!(
                ["HELP", "TYPE", "UNIT"].contains(&kind) && is_name(name),
                "bad comment line {l:?}"
            );
            if kind == "TYPE" {
                let t = w.next().unwrap_or("");
                assert!(["counter", "gauge"].contains(&t), "type {t:?} in {l:?}");
            }
            continue;
        }
        let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l:?}"));
        assert!(value.parse::<f64>().is_ok(), "value {value:?} in {l:?}");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, Some(rest.strip_suffix('}').expect("closing brace"))),
            None => (series, None),
        };
        assert!(is_name(name), "metric name {name:?} in {l:?}");
        if let Some(labels) = labels {
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("{l:?}"));
                assert!(is_name(k), "label {k:?} in {l:?}");
                assert!(
                    !v.trim_end_matches('"').contains('"'),
                    "label value in {l:?}"
                );
            }
        }
    }
}

/// The value of the sample `series` exactly as written (name and labels).
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `aoe serve` and `aoe initiator` at MTU 1500, each with `--metrics 127.0.0.1:{PORT}` in
/// its namespace.
fn metrics_rig() -> Rig {
    let addr = format!("127.0.0.1:{PORT}");
    let mut rig = Rig::start_with(
        Target::AoeServe,
        1500,
        InitOpts::default(),
        None,
        &["--metrics", &addr],
    );
    rig.restart_initiator(&["--metrics", &addr]);
    rig
}

#[test]
fn metrics_move_during_a_transfer_on_target_and_initiator() {
    let rig = metrics_rig();

    let before_t = scrape(&rig.target_ns);
    let before_i = scrape(&rig.init_ns);
    let ex = format!(
        "{{export=\"{SHELF}.{SLOT}\",interfaces=\"{}\"}}",
        rig.target_if
    );
    let dev = format!("{{device=\"{DEV}\"}}");
    let read0 = value(&before_t, &format!("aoe_target_read_bytes_total{ex}"))
        .unwrap_or_else(|| panic!("no read bytes for {ex}:\n{before_t}"));
    let kind = |k: &str| {
        format!(
            "aoe_target_requests_total{{export=\"{SHELF}.{SLOT}\",interfaces=\"{}\",kind=\"{k}\"}}",
            rig.target_if
        )
    };
    let reads0 = value(&before_t, &kind("ata_read")).unwrap_or_else(|| panic!("{before_t}"));
    let writes0 = value(&before_t, &kind("ata_write")).unwrap_or_else(|| panic!("{before_t}"));
    let rbytes = format!("aoe_initiator_read_bytes_total{{device=\"{DEV}\"}}");
    let wbytes = format!("aoe_initiator_written_bytes_total{{device=\"{DEV}\"}}");
    let rb0 = value(&before_i, &rbytes).unwrap_or_else(|| panic!("{before_i}"));
    let wb0 = value(&before_i, &wbytes).unwrap_or_else(|| panic!("{before_i}"));
    let ok0 = value(
        &before_i,
        &format!("aoe_initiator_requests_total{{device=\"{DEV}\",result=\"ok\"}}"),
    )
    .unwrap_or_else(|| panic!("no requests for {DEV}:\n{before_i}"));
    assert_eq!(
        value(
            &before_i,
            &format!("aoe_initiator_state{{device=\"{DEV}\",state=\"up\"}}")
        ),
        Some(1.0),
        "{before_i}"
    );

    // A transfer: reads of the whole device, over and over, until the test is done.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let path = rig.dev();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let off = (n % 64) * (512 * 1024);
                read_at(&path, off, 512 * 1024).expect("read during the scrape");
                n += 1;
            }
            n
        })
    };
    // And writes, past the region read.
    let writer = {
        let stop = stop.clone();
        let path = rig.dev();
        std::thread::spawn(move || {
            let data = pattern(7, 64 * 1024);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let off = (32 << 20) - (n % 8 + 1) * data.len() as u64;
                write_sync(&path, off, &data).expect("write during the scrape");
                n += 1;
            }
            n
        })
    };
    let mut t = String::new();
    let mut i = String::new();
    let moved = wait_until(Duration::from_secs(30), || {
        t = scrape(&rig.target_ns);
        i = scrape(&rig.init_ns);
        let read = value(&t, &format!("aoe_target_read_bytes_total{ex}")).unwrap_or(0.0);
        let ok = value(
            &i,
            &format!("aoe_initiator_requests_total{{device=\"{DEV}\",result=\"ok\"}}"),
        )
        .unwrap_or(0.0);
        let v = |b: &str, k: &str, at: f64| value(b, k).is_some_and(|x| x > at);
        read >= read0 + 1024.0 * 1024.0
            && ok > ok0
            && v(&t, &kind("ata_read"), reads0)
            && v(&t, &kind("ata_write"), writes0)
            && v(&i, &rbytes, rb0 + 1024.0 * 1024.0)
            && v(&i, &wbytes, wb0)
    });
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("reader thread");
    let writes = writer.join().expect("writer thread");
    assert!(writes > 0);
    assert!(moved, "counters did not move:\n{t}\n---\n{i}{}", rig.logs());
    assert!(reads > 0);
    for series in [
        format!("aoe_target_replies_total{ex}"),
        format!("aoe_target_in_flight{ex}"),
        format!("aoe_target_oldest_request_seconds{ex}"),
        format!("aoe_target_path_replaced{ex}"),
        format!("aoe_target_address_conflict{ex}"),
        format!("aoe_target_dropped_requests_total{{export=\"{SHELF}.{SLOT}\",interfaces=\"{}\",reason=\"buffer_count\"}}", rig.target_if),
        format!("aoe_target_dropped_requests_total{{export=\"{SHELF}.{SLOT}\",interfaces=\"{}\",reason=\"reply_too_long\"}}", rig.target_if),
        "aoe_target_state_files_failing".to_string(),
        "aoe_target_state_save_failures_total".to_string(),
    ] {
        assert!(value(&t, &series).is_some(), "no {series}:\n{t}");
    }
    assert!(value(&t, &format!("aoe_target_replies_total{ex}")).unwrap() > 0.0);
    assert_eq!(
        value(&t, &format!("aoe_target_path_replaced{ex}")),
        Some(0.0)
    );
    // Alone on its link: no other target at its address.
    assert_eq!(
        value(&t, &format!("aoe_target_address_conflict{ex}")),
        Some(0.0)
    );
    // A healthy store: nothing waits near the 5 s that count as stuck (whole seconds, one
    // over at most).
    assert!(
        value(&t, &format!("aoe_target_oldest_request_seconds{ex}")).unwrap() < 5.0,
        "{t}"
    );
    // Discovery IDENTIFYs the device and queries its config; every kind and error code is
    // exported, zero or not.
    assert!(
        value(&t, &kind("ata_identify")).unwrap_or(0.0) >= 1.0,
        "{t}"
    );
    assert!(
        value(&t, &kind("config_query")).unwrap_or(0.0) >= 1.0,
        "{t}"
    );
    for k in [
        "ata_flush",
        "ata_other",
        "config_set",
        "mac_mask",
        "reserve",
        "unknown",
    ] {
        assert!(
            value(&t, &kind(k)).is_some(),
            "no requests of kind {k}:\n{t}"
        );
    }
    assert!(
        value(
            &t,
            &format!(
                "aoe_target_aoe_errors_total{{export=\"{SHELF}.{SLOT}\",interfaces=\"{}\",code=\"target_reserved\"}}",
                rig.target_if
            )
        )
        .is_some(),
        "no AoE errors by code:\n{t}"
    );
    assert!(
        value(
            &t,
            &format!(
                "aoe_target_dropped_replies_total{{interface=\"{}\",reason=\"tx_rejected\"}}",
                rig.target_if
            )
        )
        .is_some(),
        "no replies refused by the transmit ring:\n{t}"
    );
    for series in [
        format!("aoe_initiator_frames_sent_total{dev}"),
        format!("aoe_initiator_retransmits_total{dev}"),
        format!("aoe_initiator_in_flight{dev}"),
        "aoe_initiator_dropped_total{reason=\"unknown_device\"}".to_string(),
        "aoe_initiator_dropped_total{reason=\"send_buffer_full\"}".to_string(),
        "aoe_initiator_dropped_total{reason=\"err_ring_full\"}".to_string(),
        "aoe_initiator_dropped_total{reason=\"tx_rejected\"}".to_string(),
        "aoe_initiator_writes_fenced_total".to_string(),
    ] {
        assert!(value(&i, &series).is_some(), "no {series}:\n{i}");
    }
    for name in [
        "aoe_initiator_rtt_average_seconds",
        "aoe_initiator_rtt_deviation_seconds",
        "aoe_initiator_frames_outstanding",
        "aoe_initiator_losses_total",
        "aoe_initiator_window_cuts_total",
        "aoe_initiator_spurious_losses_total",
    ] {
        assert!(
            i.lines()
                .any(|l| l.starts_with(&format!("{name}{{"))
                    && l.contains(&format!("device=\"{DEV}\""))),
            "no {name}:\n{i}"
        );
    }
    assert!(
        i.lines()
            .any(|l| l.starts_with("aoe_initiator_rtt_average_seconds{")
                && l.contains(&format!("device=\"{DEV}\""))),
        "no RTT:\n{i}"
    );
    assert!(
        i.lines()
            .any(|l| l.starts_with("aoe_initiator_window{") && !l.ends_with(" 0")),
        "no window:\n{i}"
    );
    rig.finish();
}

/// Session 28 (operator's audit, session 27: `promtool` not run): Prometheus' own linter,
/// `promtool check metrics`, on what the target and the initiator serve after a transfer
/// (every family present), finds nothing to say. It lints the Prometheus text format
/// (0.0.4), which the endpoints now serve to a client that does not ask for OpenMetrics
/// (before: OpenMetrics to everyone, whose counter families promtool read without HELP or
/// TYPE: `aoe_target_replies_total no help text`, one line per counter). Needs promtool (Debian's `prometheus`,
/// which scripts/install-deps.sh installs); fails naming the package when it is missing.
#[test]
fn promtool_finds_nothing_to_say_about_either_endpoint() {
    aoe_testkit::require_tools(&[("promtool", "prometheus")]);
    let rig = metrics_rig();
    write_sync(&rig.dev(), 0, &pattern(12, 256 * 1024)).expect("write");
    read_at(&rig.dev(), 0, 256 * 1024).expect("read");
    for (who, ns) in [("target", &rig.target_ns), ("initiator", &rig.init_ns)] {
        // As curl asks: the Prometheus text format (0.0.4), which promtool reads.
        let (head, body) = get_metrics_accepting(ns, PORT, Some("*/*"));
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(body.contains("aoe_"), "{body}");
        let mut lint = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run promtool");
        {
            use std::io::Write;
            lint.stdin
                .take()
                .unwrap()
                .write_all(body.as_bytes())
                .unwrap();
        }
        let out = lint.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "promtool check metrics on the {who}'s /metrics: {}\n{said}\n{body}",
            out.status
        );
    }
    rig.finish();
}

/// Buffered writes go to the initiator in requests of 1 MiB (aoe-fuse `WRITE_REQUEST_BYTES`):
/// the kernel sends a buffered write() one request at a time, each only once the one before
/// is answered, so four 1 MiB write() calls are four requests, not sixteen of 256 KiB (each
/// waiting for its slowest frame, under loss a retransmission). Reads stay at 256 KiB
/// (`max_read`): a 4 MiB direct read is sixteen requests, all in flight at once. Counted by
/// the initiator's `aoe_initiator_requests_total`. Before the change: 16 write requests.
#[test]
fn buffered_writes_go_in_mib_requests_reads_in_quarters() {
    use std::os::unix::fs::FileExt;
    const MIB: u64 = 1 << 20;
    let addr = format!("127.0.0.1:{PORT}");
    let mut rig = Rig::start(Target::AoeServe, 9000, InitOpts::default());
    rig.restart_initiator(&["--metrics", &addr]);
    let series = format!("aoe_initiator_requests_total{{device=\"{DEV}\",result=\"ok\"}}");
    let ok = || {
        let body = scrape(&rig.init_ns);
        value(&body, &series).unwrap_or_else(|| panic!("no {series}:\n{body}"))
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(rig.dev())
        .expect("open the device");
    let data = pattern(90, MIB as usize);
    let before = ok();
    for i in 1..=4 {
        f.write_all_at(&data, i * MIB).expect("buffered write");
    }
    // The counter follows completions a moment late: wait for the least it can be.
    wait_until(Duration::from_secs(20), || ok() - before >= 4.0);
    let writes = ok() - before;
    drop(f);
    let before = ok();
    let out = std::process::Command::new("dd")
        .arg(format!("if={}", rig.dev().display()))
        .args(["of=/dev/null", "bs=4M", "count=1", "skip=1", "iflag=direct"])
        .args(["status=none"])
        .output()
        .expect("dd (coreutils)");
    assert!(out.status.success(), "dd: {out:?}");
    wait_until(Duration::from_secs(20), || ok() - before >= 16.0);
    let reads = ok() - before;
    assert_eq!(
        (writes, reads),
        (4.0, 16.0),
        "requests for four buffered 1 MiB writes and one direct 4 MiB read{}",
        rig.logs()
    );
    assert_eq!(
        read_at(&rig.dev(), MIB, MIB as usize).expect("read back"),
        data
    );
    rig.finish();
}

/// Sixth audit, row 2 (docs/TEST-AUDIT.md): hostile local clients of `aoe serve
/// --metrics`. One streams a request line of 64 MiB with no end; twenty connect and send
/// nothing; one sends its request a byte every half second for the whole test. Meanwhile
/// the export keeps answering reads, and a scrape is answered within 15 s (retried, each
/// try waiting 3 s for its answer). Before: the responder answered one connection at a
/// time with a timeout per read, so the idle ones took 5 s each and the slow one held it
/// for ever (no scrape answered in 16 s), and the long line grew the daemon by its size
/// (peak RSS 28.9 -> 91.6 MiB). Now each connection has 5 s in all, a request is cut at
/// 16 KiB (431) and at most 8 are answered at once, the rest closed.
#[test]
fn hostile_metrics_clients_do_not_stop_scrapes_or_grow_memory() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    const HOSTILE_PORT: u16 = 9612;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.img");
    let data = pattern(41, 4 << 20);
    std::fs::write(&file, &data).unwrap();
    let addr = format!("127.0.0.1:{HOSTILE_PORT}");
    let mut lan = RawLan::start(Target::AoeServe, &file, &["--metrics", &addr], 1);
    let pid = lan.target.as_ref().unwrap().pid();
    let status = |key: &str| common::proc_status(pid, key);
    let ns = lan.target_ns.path();
    let connect = || {
        aoe_sys::run_in_netns(&ns, || TcpStream::connect(("127.0.0.1", HOSTILE_PORT)))
            .expect("enter netns")
    };
    let read_ok = |lan: &mut RawLan, lba: u64| {
        let f = lan
            .request(
                0,
                RawLan::ata(0x24, false, lba, 2, &[]),
                Duration::from_secs(5),
            )
            .unwrap_or_else(|| panic!("no answer to a read of LBA {lba}{}", lan.logs()));
        let m = aoe_wire::Message::parse(&f).unwrap();
        let aoe_wire::Body::Ata(a) = m.body else {
            panic!("not an ATA reply")
        };
        assert_eq!(
            a.data[..1024],
            data[lba as usize * 512..][..1024],
            "LBA {lba}"
        );
    };
    read_ok(&mut lan, 0);
    let peak0 = status("VmHWM:");

    // The long request line, sent whole before anything else connects.
    let mut long = connect().expect("connect");
    long.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let chunk = vec![b'A'; 1 << 20];
    let mut sent = 0;
    for _ in 0..64 {
        match long.write_all(&chunk) {
            Ok(()) => sent += 1,
            Err(_) => break,
        }
    }
    read_ok(&mut lan, 8);
    let peak1 = status("VmHWM:");

    // Idle connections and one that trickles its request.
    let idle: Vec<TcpStream> = (0..20).filter_map(|_| connect().ok()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let slow = {
        let mut c = connect().expect("connect");
        let stop = stop.clone();
        std::thread::spawn(move || {
            let req = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: ";
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let b = req.get(n).copied().unwrap_or(b'x');
                if c.write_all(&[b]).is_err() {
                    break;
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let scrape_once = || -> Option<String> {
        let mut c = connect().ok()?;
        c.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut resp = String::new();
        c.read_to_string(&mut resp).ok()?;
        resp.starts_with("HTTP/1.1 200 OK").then_some(resp)
    };
    let start = std::time::Instant::now();
    let mut scraped = None;
    while scraped.is_none() && start.elapsed() < Duration::from_secs(15) {
        read_ok(&mut lan, 16);
        scraped = scrape_once();
        if scraped.is_none() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let waited = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    drop(idle);
    slow.join().unwrap();
    let body = scraped.unwrap_or_else(|| {
        panic!(
            "no scrape answered in {waited:?} with hostile clients connected{}",
            lan.logs()
        )
    });
    assert!(body.contains("aoe_target_read_bytes_total"), "{body}");
    assert!(
        peak1 < peak0 + 16 * 1024,
        "a {sent} MiB request line took the daemon's peak RSS from {peak0} to {peak1} KiB"
    );
    assert!(lan.target_alive(), "target exited{}", lan.logs());
}
