//! Ceph RBD exports (issue 13): `aoe serve ... rbd:POOL/IMAGE` against a one-node cluster that
//! each test starts with scripts/ceph-up.sh on the loopback of the target's namespace and
//! stops at its end. `aoe initiator` reads and writes through AoE; `rbd import` and
//! `rbd export` put data in and check it beside the target; a gateway killed with SIGKILL is
//! replaced by a second one that breaks its lock.
//!
//! Built only with the `rbd` feature (`cargo test --features aoe-cli/rbd`, which
//! scripts/test.sh passes): it needs librbd-dev to build and the Ceph daemons to run.
#![cfg(feature = "rbd")]

mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use aoe_testkit::aoeclient::{AoeClient, Request};
use aoe_testkit::{wait_until, NsChild};
use aoe_wire::TargetAddr;
use common::*;

/// 32 MiB: the image size of these tests.
const IMAGE_BYTES: usize = 32 << 20;

/// Data put in with `rbd import` reads back through AoE; data written through AoE (and
/// flushed) is what `rbd export` sees; the initiator sees the image's size.
#[test]
fn rbd_export_reads_and_writes_through_aoe() {
    let seeded = pattern(1, IMAGE_BYTES);
    let r = RbdRig::start("rbd/img", |ceph| {
        let f = ceph.dir.join("seed.img");
        fs::write(&f, &seeded).expect("write seed file");
        ceph.ok("rbd", &["import", &f.display().to_string(), "rbd/img"]);
        fs::remove_file(&f).expect("remove seed file");
    });
    let rig = &r.rig;
    assert_eq!(
        rig.attr("size").as_deref(),
        Some(&*(IMAGE_BYTES / 512).to_string()),
        "sectors of the export{}",
        rig.logs()
    );
    // rbd import -> AoE.
    let got = read_at(&rig.dev(), 0, IMAGE_BYTES).expect("read the whole export");
    assert!(
        got == seeded,
        "AoE read differs from rbd import in sectors {:?}",
        &wrong_sectors(&got, &seeded)[..wrong_sectors(&got, &seeded).len().min(8)]
    );
    // AoE -> rbd export: an unaligned run of sectors across an object boundary (4 MiB), and
    // the last sector; write_sync ends with fsync, i.e. FLUSH CACHE, i.e. rbd flush.
    let a = pattern(2, 300 * 1024);
    let a_at = (4 << 20) - 100 * 1024;
    write_sync(&rig.dev(), a_at as u64, &a).expect("write through AoE");
    let last = pattern(3, 512);
    write_sync(&rig.dev(), (IMAGE_BYTES - 512) as u64, &last).expect("write the last sector");
    let mut want = seeded;
    want[a_at..a_at + a.len()].copy_from_slice(&a);
    want[IMAGE_BYTES - 512..].copy_from_slice(&last);
    let exported = r.ceph.export("rbd/img");
    assert_eq!(exported.len(), IMAGE_BYTES);
    assert!(
        exported == want,
        "rbd export differs from what AoE wrote in sectors {:?}",
        &wrong_sectors(&exported, &want)[..wrong_sectors(&exported, &want).len().min(8)]
    );
    // A write past the end is refused, as for a file.
    let past = write_sync(&rig.dev(), IMAGE_BYTES as u64, &[0u8; 512]);
    assert!(past.is_err(), "a write past the end succeeded");

    // Start errors, each one line: no such image; a client whose caps do not cover the
    // pool; a cluster out of reach (from the initiator's namespace, where no monitor is).
    let serve = |ns: &aoe_testkit::Netns, netif: &str, args: &[String], path: &str| {
        let mut cmd = ns.command(AOE);
        cmd.arg("serve")
            .args(args)
            .args(["--probe-ms", "0", "9", "9", netif, path])
            .env("AOE_LOG", "off");
        let out = run(&mut cmd);
        assert!(!out.status.success(), "aoe serve {path} started");
        String::from_utf8_lossy(&out.stderr).trim().to_owned()
    };
    let e = serve(
        &rig.target_ns,
        &rig.target_if,
        &rig.target_args,
        "rbd:rbd/nosuch",
    );
    assert!(e.ends_with("rbd:rbd/nosuch: no such image"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    let nobody = r.ceph.dir.join("nobody.keyring");
    r.ceph.ok(
        "ceph",
        &[
            "auth",
            "get-or-create",
            "client.nobody",
            "mon",
            "allow r",
            "-o",
            &nobody.display().to_string(),
        ],
    );
    let args = [
        "--ceph-conf".to_string(),
        r.ceph.conf().display().to_string(),
        "--client-id".into(),
        "nobody".into(),
        "--keyring".into(),
        nobody.display().to_string(),
    ];
    let e = serve(&rig.target_ns, &rig.target_if, &args, "rbd:rbd/img");
    assert!(e.contains("permission denied for client.nobody"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    let t0 = std::time::Instant::now();
    let e = serve(&rig.init_ns, &rig.init_if, &rig.target_args, "rbd:rbd/img");
    assert!(
        e.contains("cannot reach the Ceph cluster within 10s"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "gave up after {:?}",
        t0.elapsed()
    );

    // The cluster goes away (its only OSD stopped) and comes back: a write issued meanwhile
    // waits, then completes, without a restart of anything.
    let osd = fs::read_to_string(r.ceph.dir.join("osd.pid")).expect("osd.pid");
    let osd = osd.trim().to_owned();
    run_ok(Command::new("kill").args(["-STOP", &osd]));
    let dev = rig.dev();
    let late = pattern(9, 64 * 1024);
    let late2 = late.clone();
    let writer = std::thread::spawn(move || write_sync(&dev, 16 << 20, &late2));
    let finished_early = wait_until(Duration::from_secs(5), || writer.is_finished());
    run_ok(Command::new("kill").args(["-CONT", &osd]));
    assert!(
        !finished_early,
        "a write completed while the OSD was stopped"
    );
    assert!(
        wait_until(Duration::from_secs(120), || writer.is_finished()),
        "the write did not complete after the OSD came back{}",
        rig.logs()
    );
    writer
        .join()
        .expect("writer thread")
        .expect("write after the cluster came back");
    let exported = r.ceph.export("rbd/img");
    assert!(
        exported[16 << 20..(16 << 20) + late.len()] == late[..],
        "the late write is lost"
    );
    r.rig.finish();
}

/// Starts `aoe serve` on the rig's export in the target's namespace and waits (generously:
/// breaking a dead holder's lock asks the cluster first) until its AoE socket is open.
fn start_gateway(r: &RbdRig, shelf_slot: (u16, u8), extra: &[&str]) -> NsChild {
    let rig = &r.rig;
    let mut cmd = Command::new(AOE);
    cmd.arg("serve")
        .args(&rig.target_args)
        .args(extra)
        .arg(shelf_slot.0.to_string())
        .arg(shelf_slot.1.to_string())
        .arg(&rig.target_if)
        .arg(&rig.file);
    let before = packet_sockets(&rig.target_ns);
    let mut t = rig.target_ns.spawn(cmd).expect("start aoe serve");
    let bound = wait_until(Duration::from_secs(90), || {
        packet_sockets(&rig.target_ns) > before || !t.is_running()
    });
    assert!(
        bound && t.is_running(),
        "aoe serve did not start:\n{}",
        t.output_so_far()
    );
    t
}

/// SIGKILLs a target and waits until it is gone.
fn kill_9(t: &mut NsChild) {
    run_ok(Command::new("kill").args(["-9", &t.pid().to_string()]));
    assert!(
        t.wait_timeout(Duration::from_secs(10))
            .expect("wait for the killed target")
            .is_some(),
        "target survived SIGKILL"
    );
}

/// The failover of the README: gateway A holds the image's exclusive lock; it is killed
/// with SIGKILL; gateway B, started on the same image, breaks A's lock (the cluster
/// blocklists A) and serves; the initiator carries on after `discover`, and every write A
/// acknowledged is there: those `aoe initiator` flushed, and those a raw AoE client sent
/// after a FLUSH and before the kill, never flushed (with librbd's cache on they would
/// have been in A's memory only: it turns write-back after the first flush).
#[test]
fn a_second_gateway_takes_over_a_killed_ones_image() {
    let mut r = RbdRig::start("rbd/img", |ceph| {
        ceph.ok("rbd", &["create", "rbd/img", "--size", "32M"]);
    });
    let acked = pattern(4, 1 << 20);
    write_sync(&r.rig.dev(), 512, &acked).expect("write through gateway A");
    let locks = r.ceph.ok("rbd", &["lock", "ls", "rbd/img"]);
    assert!(
        locks.contains("1 exclusive lock"),
        "gateway A holds no exclusive lock: {locks}{}",
        r.rig.logs()
    );
    // Acknowledged, never flushed: 64 writes of 2 sectors from a raw client, after a FLUSH.
    let mut client = AoeClient::open(&r.rig.init_ns, &r.rig.init_if, TargetAddr::new(SHELF, SLOT))
        .expect("raw AoE client");
    client
        .discover(Duration::from_secs(10))
        .expect("raw client finds gateway A");
    let flush = client
        .call(&Request::Flush, Duration::from_secs(30))
        .expect("FLUSH through gateway A");
    assert!(flush.is_ok(), "FLUSH failed: {flush:?}");
    const RAW_LBA: u64 = 40_000;
    let raw = pattern(8, 64 * 1024);
    let writes: Vec<Request> = raw
        .chunks(1024)
        .enumerate()
        .map(|(i, c)| Request::Write {
            lba: RAW_LBA + 2 * i as u64,
            data: c.to_vec(),
        })
        .collect();
    let replies = client
        .run(&writes, Duration::from_secs(60))
        .expect("raw writes");
    assert!(
        replies.iter().all(|r| r.is_ok()),
        "a raw write failed: {replies:?}"
    );
    drop(client);
    let mut a = r.rig.target.take().expect("gateway A");
    kill_9(&mut a);
    assert!(
        wait_until(Duration::from_secs(5), || packet_sockets(&r.rig.target_ns)
            == 0),
        "gateway A's socket still open"
    );

    let b = start_gateway(&r, (SHELF, SLOT), &[]);
    r.rig.target = Some(b);
    let blocklist = r.ceph.ok("ceph", &["osd", "blocklist", "ls"]);
    assert!(
        blocklist.contains("127.0.0.1"),
        "gateway A was not blocklisted: {blocklist:?}{}",
        r.rig.logs()
    );
    assert!(
        r.rig.logs().contains("breaking it"),
        "gateway B did not say it broke the lock{}",
        r.rig.logs()
    );
    r.rig.echo_ok("discover", "");
    r.rig
        .wait_state("up", Duration::from_secs(30), "after gateway B started");
    let got = read_at(&r.rig.dev(), 512, acked.len()).expect("read through gateway B");
    assert!(got == acked, "a write gateway A acknowledged is lost");
    let more = pattern(5, 64 * 1024);
    write_sync(&r.rig.dev(), 8 << 20, &more).expect("write through gateway B");
    let exported = r.ceph.export("rbd/img");
    assert!(
        exported[512..512 + acked.len()] == acked[..],
        "rbd export lost A's write"
    );
    assert!(
        exported[8 << 20..(8 << 20) + more.len()] == more[..],
        "rbd export lacks B's write"
    );
    let at = RAW_LBA as usize * 512;
    assert!(
        exported[at..at + raw.len()] == raw[..],
        "writes gateway A acknowledged (not flushed) are lost in {} sectors",
        wrong_sectors(&exported[at..at + raw.len()], &raw).len()
    );
    r.rig.finish();
}

/// Fencing: a gateway whose lock another one broke stops writing (an ATA error to the
/// initiator) and says so once, while the new holder writes.
#[test]
fn a_gateway_that_lost_its_lock_refuses_writes() {
    let mut r = RbdRig::start("rbd/img", |ceph| {
        ceph.ok("rbd", &["create", "rbd/img", "--size", "32M"]);
    });
    write_sync(&r.rig.dev(), 0, &pattern(6, 4096)).expect("write while holding the lock");
    // Gateway B on another address, same image: it breaks A's lock while A is alive.
    let mut b = start_gateway(&r, (SHELF, SLOT + 1), &["--no-announce"]);
    let out = b.output_so_far();
    assert!(
        out.contains("breaking it"),
        "B did not break A's lock:\n{out}"
    );
    let w = write_sync(&r.rig.dev(), 8192, &pattern(7, 4096));
    assert!(w.is_err(), "gateway A wrote after losing its lock");
    assert!(
        wait_until(Duration::from_secs(10), || r
            .rig
            .logs()
            .contains("lost the image's exclusive lock")),
        "gateway A did not say it lost the lock{}",
        r.rig.logs()
    );
    let exported = r.ceph.export("rbd/img");
    assert!(
        exported[8192..8192 + 4096].iter().all(|&x| x == 0),
        "A's write after the break reached the image"
    );
    let _ = b.stop();
    r.rig.cleanup();
}

/// A resized image is seen by the initiator's revalidate: `rbd resize`, then
/// `echo eX.Y > ROOT/revalidate` (as for the Linux driver's /dev/etherd/revalidate, which
/// re-sends IDENTIFY), and the export's size attribute shows the new size; the sectors
/// past the old end are written through AoE and `rbd export` has them. A shrink shows too.
#[test]
fn a_resized_image_is_seen_on_revalidate() {
    let r = RbdRig::start("rbd/img", |ceph| {
        ceph.ok("rbd", &["create", "rbd/img", "--size", "32M"]);
    });
    let rig = &r.rig;
    assert_eq!(rig.attr("size").as_deref(), Some("65536"), "{}", rig.logs());
    r.ceph.ok("rbd", &["resize", "rbd/img", "--size", "48M"]);
    rig.echo_ok("revalidate", &format!("e{SHELF}.{SLOT}"));
    assert!(
        wait_until(Duration::from_secs(30), || rig.attr("size").as_deref()
            == Some("98304")),
        "size after rbd resize to 48M and revalidate: {:?}{}",
        rig.attr("size"),
        rig.logs()
    );
    let grown = pattern(10, 1 << 20);
    write_sync(&rig.dev(), 40 << 20, &grown).expect("write past the old end");
    let exported = r.ceph.export("rbd/img");
    assert_eq!(exported.len(), 48 << 20);
    assert!(
        exported[40 << 20..(40 << 20) + grown.len()] == grown[..],
        "rbd export lacks the write past the old end"
    );
    r.ceph.ok(
        "rbd",
        &["resize", "rbd/img", "--size", "16M", "--allow-shrink"],
    );
    rig.echo_ok("revalidate", &format!("e{SHELF}.{SLOT}"));
    assert!(
        wait_until(Duration::from_secs(30), || rig.attr("size").as_deref()
            == Some("32768")),
        "size after rbd resize to 16M and revalidate: {:?}{}",
        rig.attr("size"),
        rig.logs()
    );
    r.rig.finish();
}

/// Issue 13 (many requests in flight): an RBD export submits every request to librbd at once
/// and collects completions from librbd's callbacks, so the requests in flight against the
/// cluster are not capped by `--workers`. With the only OSD stopped, 8 reads of 8 different
/// objects from a raw AoE client, to a gateway with one worker, must all be outstanding in
/// the gateway's librados objecter (its admin socket's `objecter_requests`) at once; the old
/// worker-waits-per-request store had 1 there. Then the gateway is told to stop while they
/// are still in flight: it waits for librbd to give their buffers back (nothing is freed
/// under librbd), and once the OSD is back the reads are answered, with the data, and the
/// gateway exits cleanly.
#[test]
fn rbd_requests_are_in_flight_at_once_and_drained_at_stop() {
    let seeded = pattern(11, IMAGE_BYTES);
    let r = RbdRig::start("rbd/img", |ceph| {
        let f = ceph.dir.join("seed.img");
        fs::write(&f, &seeded).expect("write seed file");
        ceph.ok("rbd", &["import", &f.display().to_string(), "rbd/img"]);
        fs::remove_file(&f).expect("remove seed file");
    });
    // A second, read-only gateway (no lock to take) with a single worker thread.
    let mut b = start_gateway(
        &r,
        (SHELF, SLOT + 1),
        &["--no-announce", "-r", "--workers", "1"],
    );
    let asok = r
        .ceph
        .dir
        .join("run")
        .join(format!("ceph-client.admin.{}.asok", b.pid()));
    assert!(
        wait_until(Duration::from_secs(30), || asok.exists()),
        "no admin socket {} for gateway B:\n{}",
        asok.display(),
        b.output_so_far()
    );
    let mut client = AoeClient::open(
        &r.rig.init_ns,
        &r.rig.init_if,
        TargetAddr::new(SHELF, SLOT + 1),
    )
    .expect("raw AoE client");
    client.set_retransmit_timeout(Duration::from_secs(300));
    client
        .discover(Duration::from_secs(10))
        .expect("raw client finds gateway B");

    let osd = fs::read_to_string(r.ceph.dir.join("osd.pid")).expect("osd.pid");
    let osd = osd.trim().to_owned();
    run_ok(Command::new("kill").args(["-STOP", &osd]));
    // One 2-sector read in each of 8 objects (4 MiB each: 8192 sectors).
    const READS: u64 = 8;
    for i in 0..READS {
        client
            .send(&Request::Read {
                lba: i * 8192 + 8,
                count: 2,
            })
            .expect("send a read");
    }
    // The OSD ops the gateway's objecter has sent and not had answered (its admin socket
    // also lists the header watch's pings, which pile up while the OSD is stopped).
    let objecter = || {
        let out = r
            .rig
            .target_ns
            .command("ceph")
            .args([
                "--admin-daemon",
                &asok.display().to_string(),
                "objecter_requests",
            ])
            .output()
            .expect("ceph --admin-daemon");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ops = |json: &str| {
        serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .and_then(|v| {
                v["ops"].as_array().map(|ops| {
                    ops.iter()
                        .filter(|op| {
                            op["object_id"]
                                .as_str()
                                .is_some_and(|o| o.starts_with("rbd_data."))
                        })
                        .count()
                })
            })
            .unwrap_or(0)
    };
    let all = wait_until(Duration::from_secs(30), || {
        ops(&objecter()) >= READS as usize
    });
    let seen = objecter();
    if !all {
        run_ok(Command::new("kill").args(["-CONT", &osd]));
    }
    assert!(
        all,
        "{} of {READS} reads of data objects in flight at librbd with --workers 1 (the OSD \
         stopped): {seen}",
        ops(&seen)
    );

    // Stop the gateway while the reads wait on the stopped OSD: it must not exit (their
    // buffers are librbd's until the callbacks) ...
    run_ok(Command::new("kill").args(["-TERM", &b.pid().to_string()]));
    let exited_early = wait_until(Duration::from_secs(3), || !b.is_running());
    run_ok(Command::new("kill").args(["-CONT", &osd]));
    assert!(!exited_early, "gateway B exited with reads in flight");
    // ... and, the OSD back, answers them with the image's data and exits cleanly.
    let mut replies = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while replies.len() < READS as usize && std::time::Instant::now() < deadline {
        replies.extend(client.poll(Duration::from_secs(1)).expect("poll replies"));
    }
    assert_eq!(
        replies.len(),
        READS as usize,
        "replies after the OSD came back"
    );
    for reply in &replies {
        assert!(reply.is_ok(), "a read failed: {reply:?}");
        let d = reply.data();
        assert!(
            (0..READS).any(|i| {
                let at = (i * 8192 + 8) as usize * 512;
                d == &seeded[at..at + 1024]
            }),
            "a read returned data that is not the image's"
        );
    }
    let status = b
        .wait_timeout(Duration::from_secs(120))
        .expect("wait for gateway B");
    assert!(
        status.is_some_and(|s| s.success()),
        "gateway B did not exit cleanly: {status:?}\n{}",
        b.output_so_far()
    );
    r.rig.finish();
}
