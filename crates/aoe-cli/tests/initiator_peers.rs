//! Integration: `aoe initiator` against real targets, vblade (the Debian package, the
//! reference) and our own `aoe serve`, at MTU 1500 and 9000 (and `data_*` at 65535, the
//! largest MTU of a veth: 127 sectors, 65,024 bytes, a frame).
//!
//! Each test builds its own pair of network namespaces joined by a veth link: the target in
//! one, the initiator in the other, started with `--iflist` naming its end of the link, so
//! AoE frames never touch the host's interfaces. The initiator is started with
//! `nsenter --net` only (never `ip netns exec`, which would give it a private mount
//! namespace), so its FUSE mount at ROOT is visible to this test process.
//!
//! What is checked, per target and MTU:
//! * `data_*`: `echo > ROOT/discover` brings `eX.Y` back (after a `flush`) within 1 s with
//!   the right size; its sha256 equals the backing file's; aligned and unaligned pattern
//!   writes (one longer than a frame's payload) land in the backing file at the right
//!   offset and read back through `eX.Y`; aoetools' `aoe-stat` (with `sysfs_dir=ROOT/sysfs`)
//!   shows the device `up` with the right size, netif and payload; `err` has its lines.
//! * `ext4_*` (`--loop`): mkfs.ext4 on the loop device, mount, write files, umount,
//!   `fsck -n` clean (on the loop device and on the backing file), files intact after a
//!   remount.
//! * `dead_*` (`--deadsecs 3`): the target killed, I/O fails with EIO after deadsecs and
//!   the device is `down`; then reads fail at once; the target restarted and `discover`
//!   written, the device is `up` again with its data intact.
//!
//! Per target (MTU 1500): `control_*`: `interfaces` (refuses an unknown name, restricts
//! discovery to the named interfaces), `flush` (skips an open device, removes a closed one;
//! the empty write keeps an up device), partitions (an MBR written through `eX.Y` shows
//! `eX.Yp1`/`p2` of the right sizes at the right offsets), `revalidate` (a target
//! restarted over a grown file: the new size shows), and bad names refused.
//!
//! aoetools' `aoe-stat` drops every path containing the letter `p`, so ROOT lives under
//! `/run/aoeroots/` with a name checked to have no `p` (a temp dir under /tmp would not do).
//!
//! These tests need root, fuse3, vblade, aoetools and e2fsprogs (`scripts/install-deps.sh`);
//! a missing tool or missing root is a failure, never a skip.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use aoe_testkit::{wait_until, End};
use common::*;
// ------------------------------------------------------------------------------------------
// data_*: discovery, checksums, pattern writes, aoe-stat, err

fn data_path(kind: Target, mtu: u32) {
    let rig = Rig::start(kind, mtu, InitOpts::default());
    let dev = rig.dev();

    // Size: the file and the sysfs attribute.
    assert_eq!(rig.attr("size").as_deref(), Some(&*SECTORS.to_string()));
    assert_eq!(fs::metadata(&dev).expect("stat eX.Y").len(), SECTORS * 512);

    // `flush all` removes the (closed) device; `echo > discover` brings it back (within a
    // second on a quiet machine: the time is printed; the wait allows a loaded one more).
    rig.echo_ok("flush", "all");
    assert!(
        wait_until(Duration::from_secs(10), || !dev.exists()
            && rig.state().is_none()),
        "{DEV} still there after `flush all`{}",
        rig.logs()
    );
    let t0 = Instant::now();
    rig.echo_ok("discover", "");
    let back = wait_until(Duration::from_secs(10), || {
        rig.state().as_deref() == Some("up")
            && fs::metadata(&dev).is_ok_and(|m| m.len() == SECTORS * 512)
    });
    assert!(
        back,
        "{DEV} not up within 10 s of `echo > discover` ({:?}){}",
        t0.elapsed(),
        rig.logs()
    );

    eprintln!(
        "{kind:?} mtu {mtu}: up {:?} after `echo > discover`",
        t0.elapsed()
    );

    // Whole-device checksum.
    assert_eq!(
        sha256(&dev),
        sha256(&rig.file),
        "sha256 of {DEV} != backing file"
    );

    // Pattern writes: aligned; unaligned and short; unaligned and longer than a frame's
    // payload (several frames, partial first and last sectors); and the last bytes. The
    // fsync is the regression check for FLUSH CACHE EXT, which vblade aborts (it advertises
    // only FLUSH CACHE): fsync failed with EIO against vblade until the initiator chose the
    // command from IDENTIFY.
    let payload = payload_for(mtu);
    let writes: [(u64, usize); 4] = [
        (8 << 20, 64 << 10),
        (1_000_003, 100),
        ((5 << 20) + 777, 3 * payload as usize + 1001),
        (SECTORS * 512 - 700, 700),
    ];
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
            .expect("open eX.Y for writing");
        for (i, &(off, len)) in writes.iter().enumerate() {
            f.write_all_at(&pattern(100 + i as u64, len), off)
                .unwrap_or_else(|e| panic!("write {len} bytes at {off}: {e}{}", rig.logs()));
        }
        f.sync_all()
            .unwrap_or_else(|e| panic!("fsync of {DEV}: {e}{}", rig.logs()));
    }
    let backing = File::open(&rig.file).expect("open backing file");
    let original = pattern(1, (SECTORS * 512) as usize);
    for (i, &(off, len)) in writes.iter().enumerate() {
        let want = pattern(100 + i as u64, len);
        let mut got = vec![0u8; len];
        backing.read_exact_at(&mut got, off).expect("read backing");
        assert!(
            got == want,
            "write of {len} at {off}: not in the backing file"
        );
        // The bytes around it are untouched.
        let mut around = [0u8; 2];
        backing.read_exact_at(&mut around[..1], off - 1).unwrap();
        assert_eq!(
            around[0],
            original[off as usize - 1],
            "byte before {off} changed"
        );
        if off + (len as u64) < SECTORS * 512 {
            backing
                .read_exact_at(&mut around[1..], off + len as u64)
                .unwrap();
            assert_eq!(
                around[1],
                original[off as usize + len],
                "byte after {off}+{len} changed"
            );
        }
        let read = read_at(&dev, off, len)
            .unwrap_or_else(|e| panic!("read back {len} at {off}: {e}{}", rig.logs()));
        assert!(
            read == want,
            "read back of {len} at {off} through {DEV} differs"
        );
    }
    // An unaligned read spanning several frames and one of the writes.
    let (off, len) = ((5 << 20) + 333, 5 * payload as usize + 77);
    let mut want = vec![0u8; len];
    backing.read_exact_at(&mut want, off).unwrap();
    assert!(read_at(&dev, off, len).expect("unaligned read") == want);
    assert_eq!(sha256(&dev), sha256(&rig.file), "sha256 after writes");

    // aoe-stat over ROOT/sysfs.
    let out = run_ok(Command::new("aoe-stat").env("sysfs_dir", rig.root.join("sysfs")));
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let want_row = vec![
        DEV.to_owned(),
        aoe_stat_size(SECTORS),
        rig.init_if.clone(),
        payload.to_string(),
        "up".to_owned(),
    ];
    assert_eq!(rows.len(), 1, "aoe-stat output:\n{out}");
    assert_eq!(rows[0], want_row, "aoe-stat output:\n{out}");
    assert_eq!(rig.attr("payload"), Some(payload.to_string()));
    assert_eq!(rig.attr("netif").as_deref(), Some(rig.init_if.as_str()));
    let mac = rig
        .veth
        .a_mac()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    assert_eq!(rig.attr("mac"), Some(mac));
    let fw = rig.attr("firmware-version").unwrap_or_default();
    assert!(
        fw.starts_with("0x") && fw.len() == 6,
        "firmware-version {fw:?}"
    );

    // err: the device coming up (twice: at start and after the rediscovery).
    let err = rig.err_lines(2);
    assert!(
        err.lines()
            .filter(|l| l.trim() == format!("{DEV} up"))
            .count()
            >= 2,
        "err lines:\n{err}{}",
        rig.logs()
    );
    assert!(err.contains(&format!("{DEV} v")) && err.contains(&format!("has {SECTORS} sectors")));
    copies_on_a_clean_link(&rig, kind, mtu);
    rig.finish();
}

/// Issue 14: on this loss-free veth, with the window at the target's buffer count, the
/// initiator's copies (`retransmit ... oldtag=` lines) and `aoe serve`'s drops of requests
/// over its buffer count, printed as a figure. Not asserted: a timeout on a loaded machine
/// is the machine's doing, and a copy costs no drop (the engine counts every copy a target
/// may hold against its window; aoe-proto's `copies_never_put_a_stalled_target_over_its_buffer_count`
/// pins that in simulated time). Before that, a low retransmit floor fed storms here.
fn copies_on_a_clean_link(rig: &Rig, kind: Target, mtu: u32) {
    let out = |c: &Option<aoe_testkit::NsChild>| {
        c.as_ref()
            .map(aoe_testkit::NsChild::output_so_far)
            .unwrap_or_default()
    };
    let init = out(&rig.initiator);
    let copies = init
        .lines()
        .filter(|l| l.contains("retransmit") && l.contains("oldtag="))
        .count();
    let drops = out(&rig.target)
        .lines()
        .filter(|l| l.contains("requests dropped"))
        .filter_map(|l| l.split("over_buffer_count=").nth(1))
        .filter_map(|v| {
            v.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum::<u64>();
    eprintln!(
        "FIGURES {kind:?} mtu {mtu}: {copies} retransmits on a loss-free link, target drops over its buffer count: {drops}"
    );
}

// ------------------------------------------------------------------------------------------
// ext4_*: a real file system on the loop device

fn ext4_over_loop(kind: Target, mtu: u32) {
    let mut rig = Rig::start(
        kind,
        mtu,
        InitOpts {
            loop_devices: true,
            ..InitOpts::default()
        },
    );
    let loops = rig.wait_loops();
    assert_eq!(loops.len(), 1, "loop devices over ROOT: {loops:?}");
    let lo = loops[0].clone();

    let mnt = mkfs_and_mount(&mut rig, &lo, &["-L", "aoeit"]);

    let files: Vec<(String, Vec<u8>)> = [(1usize << 20), 4097, 5 << 20, 1]
        .iter()
        .enumerate()
        .map(|(i, &len)| (format!("f{i}"), pattern(200 + i as u64, len)))
        .collect();
    fs::create_dir(mnt.join("d")).unwrap();
    for (name, data) in &files {
        fs::write(mnt.join("d").join(name), data).unwrap();
    }
    run_ok(Command::new("timeout").args(["-k", "5", "60", "sync"]));
    umount_ext4(&mnt, &lo);
    rig.mounts.clear();

    let fsck = run(Command::new("timeout").args(["-k", "5", "60", "fsck.ext4", "-n", "-f", &lo]));
    assert!(
        fsck.status.success(),
        "fsck -n {lo} ({}):\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    // The data really is on the target: the backing file itself is a clean file system.
    let fsck = run(Command::new("timeout")
        .args(["-k", "5", "60", "fsck.ext4", "-n", "-f"])
        .arg(&rig.file));
    assert!(
        fsck.status.success(),
        "fsck -n of the backing file ({}):\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );

    run_ok(Command::new("mount").arg(&lo).arg(&mnt));
    rig.mounts.push(mnt.clone());
    for (name, data) in &files {
        let got = fs::read(mnt.join("d").join(name)).unwrap();
        assert!(&got == data, "{name} differs after remount");
    }
    umount_ext4(&mnt, &lo);
    rig.mounts.clear();
    let err = rig.err_lines(2);
    assert!(
        err.contains(&format!("{DEV} attached to {lo}")),
        "err lines:\n{err}"
    );
    rig.finish();
}

// ------------------------------------------------------------------------------------------
// dead_*: the target dies and comes back

fn dead_target(kind: Target, mtu: u32) {
    let mut rig = Rig::start(
        kind,
        mtu,
        InitOpts {
            deadsecs: Some(DEADSECS),
            ..InitOpts::default()
        },
    );
    let dev = rig.dev();
    // Something written before the target dies, to find again afterwards.
    let mark = pattern(300, 4096 + 13);
    {
        let f = OpenOptions::new().write(true).open(&dev).unwrap();
        f.write_all_at(&mark, 3 << 20).unwrap();
    }
    let before = sha256(&rig.file);

    // Held open across the failure: the state shows it (`down,closewait`, docs/PROTOCOL.md 2.7).
    let held = File::open(&dev).unwrap();
    rig.kill_target();
    // The initiator notices only when I/O goes unanswered: this read waits deadsecs.
    let t0 = Instant::now();
    let r = read_at(&dev, 7 << 20, 4096);
    let waited = t0.elapsed();
    eprintln!("{kind:?} mtu {mtu}: EIO {waited:?} after the target died");
    match &r {
        Err(e) if is_eio(e) => {}
        other => panic!("read from a dead target: {other:?}, want EIO{}", rig.logs()),
    }
    assert!(
        waited >= Duration::from_secs(DEADSECS - 1) && waited < Duration::from_secs(DEADSECS + 5),
        "EIO after {waited:?}, deadsecs is {DEADSECS}"
    );
    assert_eq!(
        rig.state().as_deref(),
        Some("down,closewait"),
        "while held open"
    );
    drop(held);
    rig.wait_state("down", Duration::from_secs(10), "after the target died");
    // Down: reads fail at once.
    rig.assert_prompt_eio(4096, "from a down device");
    let w = OpenOptions::new()
        .write(true)
        .open(&dev)
        .and_then(|f| f.write_all_at(&[1; 512], 0));
    assert!(
        matches!(&w, Err(e) if is_eio(e)),
        "write to a down device: {w:?}"
    );
    let err = rig.err_lines(2);
    assert!(err.contains(&format!("{DEV} down")), "err lines:\n{err}");

    // Back: target restarted, `discover` written.
    rig.start_target();
    rig.echo_ok("discover", "");
    rig.wait_state("up", Duration::from_secs(10), "after the target came back");
    assert_eq!(sha256(&rig.file), before, "backing file changed while down");
    assert_eq!(sha256(&dev), before, "sha256 of {DEV} after recovery");
    assert_eq!(read_at(&dev, 3 << 20, mark.len()).unwrap(), mark);
    rig.finish();
}

// ------------------------------------------------------------------------------------------
// control_*: interfaces, flush, revalidate

fn control_files(kind: Target) {
    let mut rig = Rig::start(
        kind,
        1500,
        InitOpts {
            spare_link: true,
            ..InitOpts::default()
        },
    );
    let dev = rig.dev();
    let ifaces = rig.root.join("interfaces");
    let spare = rig.spare_if.clone().unwrap();

    // interfaces: shows --iflist; a name that does not exist (yet) is accepted, as the
    // driver's aoe_iflist is a name filter (issue 11 item 6); one that can never be an
    // interface name is refused and changes nothing.
    assert_eq!(
        fs::read_to_string(&ifaces).unwrap(),
        format!("{}\n", rig.init_if)
    );
    rig.echo_ok("interfaces", &format!("nosuch0 {}", rig.init_if));
    assert_eq!(
        fs::read_to_string(&ifaces).unwrap(),
        format!("nosuch0 {}\n", rig.init_if)
    );
    let e = fs::write(&ifaces, "a-name-too-long-for-ifnamsiz\n").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(22), "impossible interface name: {e}");
    assert_eq!(
        fs::read_to_string(&ifaces).unwrap(),
        format!("nosuch0 {}\n", rig.init_if)
    );

    // Restricted to the spare link (no target behind it), discovery finds nothing...
    rig.echo_ok("interfaces", &spare);
    assert_eq!(fs::read_to_string(&ifaces).unwrap(), format!("{spare}\n"));
    rig.echo_ok("flush", "all");
    assert!(wait_until(Duration::from_secs(10), || !dev.exists()));
    rig.echo_ok("discover", "");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !dev.exists(),
        "{DEV} found through {spare}, which has no target"
    );
    // ...and with both links (two names, like aoe_iflist) it is found again, through the
    // right one only.
    rig.echo_ok("interfaces", &format!("{} {spare}", rig.init_if));
    assert_eq!(
        fs::read_to_string(&ifaces).unwrap(),
        format!("{} {spare}\n", rig.init_if)
    );
    rig.echo_ok("discover", "");
    rig.wait_state(
        "up",
        Duration::from_secs(10),
        "after interfaces were widened",
    );
    assert_eq!(rig.attr("netif").as_deref(), Some(rig.init_if.as_str()));

    // Taking the device's only interface away puts it down at once (no path left: reads
    // fail without waiting for deadsecs); giving it back brings it up with no `discover`
    // (a new interface gets a broadcast query).
    rig.echo_ok("interfaces", &spare);
    rig.wait_state(
        "down",
        Duration::from_secs(10),
        "with the device's interface removed",
    );
    rig.assert_prompt_eio(512, "without a path");
    rig.echo_ok("interfaces", &rig.init_if.clone());
    rig.wait_state("up", Duration::from_secs(10), "with the interface back");

    // The initiator's MTU lowered under a running device: after `discover` (which rescans
    // interfaces) frames carry one sector, and I/O still works. vblade exits on any failed
    // send (a reply over the MTU, or one the peer's veth drops: ENOBUFS), so nothing may be
    // in flight when the MTU changes: a direct read, queued behind the partition scan that
    // follows `up`, completes only once the scan's frames are answered. (The engine resends
    // frames caught by an MTU change in pieces that fit; its unit tests cover that.)
    run_ok(Command::new("timeout").args(["-k", "5", "30", "dd"]).args([
        &format!("if={}", dev.display()),
        "of=/dev/null",
        "bs=512",
        "count=1",
        "skip=1000",
        "iflag=direct",
        "status=none",
    ]));
    rig.veth.set_end_mtu(End::B, 1000).unwrap();
    rig.echo_ok("discover", "");
    rig.wait_attr("payload", "512", Duration::from_secs(10), "at MTU 1000");
    assert_eq!(sha256(&dev), sha256(&rig.file), "sha256 at MTU 1000");
    rig.veth.set_end_mtu(End::B, 1500).unwrap();
    rig.echo_ok("discover", "");
    rig.wait_attr(
        "payload",
        "1024",
        Duration::from_secs(10),
        "back at MTU 1500",
    );

    // flush: the empty write removes only down devices; `all` skips open ones.
    rig.echo_ok("flush", "");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        rig.state().as_deref(),
        Some("up"),
        "empty flush removed an up device"
    );
    let held = File::open(&dev).unwrap();
    // Regression: another open and close of the device (a read, as `sha256sum eX.Y` next to
    // a mounted loop device would do) used to clear the open flag, so `flush all` removed a
    // device that was still held.
    drop(read_at(&dev, 0, 512).unwrap());
    std::thread::sleep(Duration::from_millis(100));
    rig.echo_ok("flush", "all");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        rig.state().as_deref(),
        Some("up"),
        "flush removed an open device"
    );
    let mut buf = [0u8; 512];
    held.read_exact_at(&mut buf, 512).expect("read while held");
    drop(held);
    // The close reaches the FUSE daemon after close(2) returns (FUSE_RELEASE is sent
    // asynchronously), and a flush that comes first skips the device as open: flush again
    // until it is gone (a fixed 100 ms stood in for the release). A flush that finds it
    // gone already (the last one's removal slower than the 200 ms looked) fails: ignored.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let _ = rig.echo("flush", DEV);
            wait_until(Duration::from_millis(200), || {
                !dev.exists() && rig.state().is_none()
            })
        }),
        "{DEV} still there after `flush {DEV}`"
    );
    assert!(rig.echo("flush", "bogus").status.code() != Some(0));
    rig.echo_ok("discover", "");
    assert!(wait_until(Duration::from_secs(10), || rig
        .state()
        .as_deref()
        == Some("up")));

    // Partitions: an MBR written through eX.Y is found when the device comes back; eX.YpN
    // are windows onto the device at the partitions' offsets.
    let parts: [(u32, u32); 2] = [(2048, 8192), (10240, 20480)];
    {
        let f = OpenOptions::new().write(true).open(&dev).unwrap();
        f.write_all_at(&mbr(&parts), 0).unwrap();
        f.sync_all().unwrap();
    }
    rig.echo_ok("flush", DEV);
    assert!(wait_until(Duration::from_secs(10), || rig
        .state()
        .is_none()));
    rig.echo_ok("discover", "");
    let p2 = rig.root.join(format!("{DEV}p2"));
    assert!(
        wait_until(Duration::from_secs(10), || fs::metadata(&p2)
            .is_ok_and(|m| m.len() == u64::from(parts[1].1) * 512)),
        "{DEV}p2 missing or of the wrong size{}",
        rig.logs()
    );
    assert_eq!(
        fs::metadata(rig.root.join(format!("{DEV}p1")))
            .unwrap()
            .len(),
        u64::from(parts[0].1) * 512
    );
    let data = pattern(500, 3000);
    {
        let f = OpenOptions::new().write(true).open(&p2).unwrap();
        f.write_all_at(&data, 1234).unwrap();
        f.sync_all().unwrap();
    }
    let mut got = vec![0u8; data.len()];
    File::open(&rig.file)
        .unwrap()
        .read_exact_at(&mut got, u64::from(parts[1].0) * 512 + 1234)
        .unwrap();
    assert!(
        got == data,
        "write to {DEV}p2 not at the partition's offset"
    );
    assert_eq!(read_at(&p2, 1234, data.len()).unwrap(), data);
    let e = OpenOptions::new()
        .write(true)
        .open(&p2)
        .and_then(|f| f.write_all_at(&[0; 512], u64::from(parts[1].1) * 512))
        .unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(28),
        "write past the partition's end: {e}"
    );

    // revalidate: the target restarted over a grown file; the new size shows. The `err`
    // lines so far are read first: under load a stall during the reads above can log a
    // retransmit per outstanding frame (100 of them with the window open), and a full ring
    // of 100 unread lines drops the new ones (aoechr.c), this step's among them.
    let early = rig.err_lines(1);
    let grown = SECTORS + 8 * 2048;
    rig.kill_target();
    let f = OpenOptions::new().write(true).open(&rig.file).unwrap();
    f.set_len(grown * 512).unwrap();
    let tail = pattern(400, 4096);
    f.write_all_at(&tail, (grown - 8) * 512).unwrap();
    drop(f);
    rig.start_target();
    rig.echo_ok("revalidate", DEV);
    assert!(
        wait_until(Duration::from_secs(10), || rig.attr("size")
            == Some(grown.to_string())),
        "size {:?} after revalidate, want {grown}{}",
        rig.attr("size"),
        rig.logs()
    );
    assert!(wait_until(Duration::from_secs(10), || fs::metadata(&dev)
        .is_ok_and(|m| m.len() == grown * 512)));
    assert_eq!(read_at(&dev, (grown - 8) * 512, 4096).unwrap(), tail);
    assert_eq!(sha256(&dev), sha256(&rig.file));
    let out = rig.echo("revalidate", "e9.9");
    assert!(
        !out.status.success(),
        "revalidate of an unknown device succeeded"
    );
    let e = fs::write(rig.root.join("revalidate"), "e9.9").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(19), "revalidate e9.9: {e}");
    let e = fs::write(rig.root.join("revalidate"), "nonsense").unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::InvalidInput,
        "revalidate nonsense: {e}"
    );
    let err = early + &rig.err_lines(2);
    assert!(
        err.contains(&format!(
            "{DEV}: size changed from {SECTORS} to {grown} sectors"
        )),
        "err lines:\n{err}"
    );
    assert!(
        err.contains("busy (open), not flushed"),
        "err lines:\n{err}"
    );
    assert!(err.contains("interfaces: nosuch0"), "err lines:\n{err}");
    rig.finish();
}

// ------------------------------------------------------------------------------------------
// A second target at the device's shelf.slot

/// vblade over `name` in the rig's directory, a disk of `sectors` sectors every byte 'V',
/// started in `ns` on `ifname` at the rig's shelf.slot.
fn vblade_disk(
    rig: &Rig,
    ns: &aoe_testkit::Netns,
    ifname: &str,
    name: &str,
    sectors: u64,
) -> aoe_testkit::NsChild {
    let file = rig.dir.path().join(name);
    fs::write(&file, vec![b'V'; (sectors * 512) as usize]).unwrap();
    ns.spawn(Target::Vblade.command(ifname, &file, &[]))
        .expect("start vblade")
}

/// `aoe serve` (a 'c' disk) on a bridge in the target namespace, with the initiator's veth
/// and a port to a namespace of its own for a second box at the device's address (vblade),
/// all at MTU 1500; the initiator started with `init_args` and the device up. Namespaces
/// are named `{prefix}t`, `{prefix}i` and `{prefix}v`.
struct SecondBox {
    rig: Rig,
    vb_ns: aoe_testkit::Netns,
    vb_veth: aoe_testkit::VethPair,
    /// The second box's end of its veth, and its MAC.
    vb_if: String,
    vb_mac: String,
    br: aoe_testkit::Bridge,
}

fn second_box(prefix: &str, init_args: &[String]) -> SecondBox {
    let backing = backing_and_root('c', None);
    let target_ns = aoe_testkit::Netns::new(&format!("{prefix}t")).expect("target namespace");
    let init_ns = aoe_testkit::Netns::new(&format!("{prefix}i")).expect("initiator namespace");
    let vb_ns = aoe_testkit::Netns::new(&format!("{prefix}v")).expect("vblade namespace");
    let veth = aoe_testkit::VethPair::new(&target_ns, &init_ns, 1500).expect("veth pair");
    let vb_veth = aoe_testkit::VethPair::new(&vb_ns, &target_ns, 1500).expect("vblade veth");
    let br = aoe_testkit::Bridge::new(&target_ns).expect("bridge");
    br.add_port(veth.a_name()).expect("bridge port");
    br.add_port(vb_veth.b_name()).expect("bridge port");
    let target_if = br.name().to_owned();
    let vb_if = vb_veth.a_name().to_owned();
    let vb_mac = aoe_wire::MacAddr(vb_veth.a_mac()).to_string();
    let mut rig = Rig::assemble(
        Target::AoeServe,
        Vec::new(),
        backing,
        (veth, target_ns, init_ns),
        target_if,
    );
    rig.start_target();
    rig.launch_initiator(init_args);
    rig.wait_state("up", Duration::from_secs(10), "at start");
    SecondBox {
        rig,
        vb_ns,
        vb_veth,
        vb_if,
        vb_mac,
        br,
    }
}

/// Eighth audit (session 25), the seventh audit's item 4: vblade started by mistake at
/// e7.3 on the same segment as `aoe serve`, with its own MAC and a file of another size,
/// while the device is up and open. The initiator (as the Linux driver, `aoecmd_cfg_rsp`)
/// took vblade's MAC as a second path and spread the device's frames over both disks:
/// the seventh audit read 2311 of 16384 blocks from vblade's file. Now a new MAC of a
/// device up is asked IDENTIFY first and refused, with one line in `err`, if its capacity
/// differs; every byte read is `aoe serve`'s. Then vblade again with a file of the same
/// size (other bytes): taken as a path, as two NICs or two gateways of one disk must be;
/// two disks of one size cannot be told apart at this layer (a pin of that limit).
/// On the code before: the device's sha256 that of neither file (vblade's bytes mixed in).
#[test]
fn a_second_target_of_another_size_at_our_address_is_not_a_path() {
    require_tools();
    assert!(
        Command::new("vblade").arg("-h").output().is_ok(),
        "vblade is not installed (Debian package vblade)"
    );
    let SecondBox {
        rig,
        vb_ns,
        vb_veth,
        vb_if,
        vb_mac,
        br,
    } = second_box("aud25", &[]);
    let dev = rig.dev();
    let held = File::open(&dev).expect("open the device");

    // Another disk: 1 MiB larger, every byte 'V'.
    let mut vb = vblade_disk(&rig, &vb_ns, &vb_if, "vblade-other.img", SECTORS + 2048);
    // Known to the initiator (the debug file lists each target MAC, path or not).
    let vb_hex: String = vb_veth.a_mac().iter().map(|b| format!("{b:02x}")).collect();
    let debug = rig.root.join(format!("sysfs/kernel/debug/aoe/{DEV}"));
    let known = rig.discover_until(Duration::from_secs(20), || {
        fs::read_to_string(&debug).is_ok_and(|d| d.contains(&vb_hex))
    });
    assert!(
        known,
        "vblade's MAC {vb_mac} never seen by the initiator; vblade:\n{}{}",
        vb.output_so_far(),
        rig.logs()
    );
    assert_eq!(
        sha256(&dev),
        sha256(&rig.file),
        "the device's bytes are not all aoe serve's file's{}",
        rig.logs()
    );
    let refused = wait_until(Duration::from_secs(10), || {
        rig.initiator_log()
            .contains(&format!("target {vb_mac} not taken as a path"))
    });
    assert!(
        refused,
        "no line refusing vblade's MAC {vb_mac}; vblade:\n{}{}",
        vb.output_so_far(),
        rig.logs()
    );
    assert!(
        rig.initiator_log()
            .contains(&format!("has {} sectors", SECTORS + 2048)),
        "the line does not give the other capacity{}",
        rig.logs()
    );
    assert_eq!(rig.attr("size").as_deref(), Some(&*SECTORS.to_string()));
    let _ = vb.stop();

    // Same size, other bytes: undetectable by capacity, taken as a path (pinned).
    let mut vb = vblade_disk(&rig, &vb_ns, &vb_if, "vblade-same.img", SECTORS);
    let taken = rig.discover_until(Duration::from_secs(20), || {
        rig.initiator_log().contains(&format!(
            "target {vb_mac} has the device's {SECTORS} sectors"
        ))
    });
    assert!(
        taken,
        "vblade's disk of the same size not taken as a path (it cannot be told apart); \
         vblade:\n{}{}",
        vb.output_so_far(),
        rig.logs()
    );
    let _ = vb.stop();
    drop(held);
    rig.finish();
    drop(br);
}

/// Tenth audit (the ninth's Left list): a device down and not open came back through the
/// first MAC to answer the next discover, even one refused before as another disk. Here
/// vblade over a larger file at e7.3 is refused while the device is up; `aoe serve` is
/// then stopped (SIGSTOP) until a write fails and the device is down; a discover is
/// answered by vblade alone; `aoe serve` continues. On the code before, vblade's answer
/// identified the device: "the device came up as vblade's disk (size 67587) while aoe
/// serve was stopped". Now the IDENTIFY goes to the device's path (as the driver's
/// `aoecmd_ata_id` does), which answers once continued: the device is `aoe serve`'s file.
#[test]
fn a_down_device_comes_back_through_its_path_not_a_mac_refused_before() {
    require_tools();
    assert!(
        Command::new("vblade").arg("-h").output().is_ok(),
        "vblade is not installed (Debian package vblade)"
    );
    let SecondBox {
        rig,
        vb_ns,
        vb_if,
        vb_mac,
        br,
        // Bound, so that the veth lives as long as the test.
        vb_veth: _vb_veth,
    } = second_box("aud27-", &["--deadsecs".to_string(), "3".to_string()]);
    let dev = rig.dev();
    let other = SECTORS + 2048;
    let mut vb = vblade_disk(&rig, &vb_ns, &vb_if, "vblade-other.img", other);
    let refused = rig.discover_until(Duration::from_secs(20), || {
        rig.initiator_log()
            .contains(&format!("target {vb_mac} not taken as a path"))
    });
    assert!(
        refused,
        "vblade's MAC {vb_mac} not refused; vblade:\n{}{}",
        vb.output_so_far(),
        rig.logs()
    );
    // The device's target stops answering; a write fails after deadsecs: down.
    let pid = rig.target.as_ref().expect("target").pid().to_string();
    run_ok(Command::new("kill").args(["-STOP", &pid]));
    struct Cont(String);
    impl Drop for Cont {
        fn drop(&mut self) {
            let _ = Command::new("kill").args(["-CONT", &self.0]).status();
        }
    }
    let cont = Cont(pid);
    let w = write_sync(&dev, 4096, &[0x5a; 4096]);
    assert!(w.is_err(), "a write with the target stopped succeeded");
    rig.wait_state("down", Duration::from_secs(20), "after the write failed");
    // A discover that vblade alone answers (well within deadsecs of the IDENTIFY).
    let _ = rig.echo("discover", "");
    let wrong = wait_until(Duration::from_secs(1), || {
        rig.attr("size").as_deref() == Some(&*other.to_string())
    });
    assert!(
        !wrong,
        "the device came up as vblade's disk (size {other}) while aoe serve was stopped{}",
        rig.logs()
    );
    drop(cont);
    let up = rig.discover_until(Duration::from_secs(20), || {
        rig.state().as_deref() == Some("up")
    });
    assert!(up, "the device did not come back{}", rig.logs());
    assert_eq!(rig.attr("size").as_deref(), Some(&*SECTORS.to_string()));
    assert_eq!(
        sha256(&dev),
        sha256(&rig.file),
        "the device's bytes are not aoe serve's file's{}",
        rig.logs()
    );
    let _ = vb.stop();
    rig.finish();
    drop(br);
}

/// Ninth audit (session 26): the eighth's refused MAC still weighed on the device. On a
/// 9000-byte segment, vblade over another disk on a 1500-byte port answers Query Config
/// for our shelf.slot saying 2 sectors a frame: refused as a path, its answers still set
/// the device's frame size (the minimum over every MAC, paths or not), cutting it from
/// 8704 to 1024 bytes. And with `--max-targets 2` it kept its place for ever, so a second
/// `aoe serve` of the same file (a second path, or a replacement target with a new MAC)
/// was refused. Now the frame size follows the paths alone, and a MAC refused as another
/// disk is forgotten for a new one. On the code before: "payload 1024 after vblade's
/// answers, want 8704".
#[test]
fn a_refused_target_neither_shrinks_our_frames_nor_keeps_a_new_path_out() {
    require_tools();
    assert!(
        Command::new("vblade").arg("-h").output().is_ok(),
        "vblade is not installed (Debian package vblade)"
    );
    let backing = backing_and_root('c', None);
    let target_ns = aoe_testkit::Netns::new("aud26t").expect("target namespace");
    let init_ns = aoe_testkit::Netns::new("aud26i").expect("initiator namespace");
    let vb_ns = aoe_testkit::Netns::new("aud26v").expect("vblade namespace");
    let second_ns = aoe_testkit::Netns::new("aud26s").expect("second target namespace");
    let veth = aoe_testkit::VethPair::new(&target_ns, &init_ns, 9000).expect("veth pair");
    let vb_veth = aoe_testkit::VethPair::new(&vb_ns, &target_ns, 9000).expect("vblade veth");
    // vblade's own end at 1500: it says (1500 - 36) / 512 = 2 sectors a frame.
    vb_veth
        .set_end_mtu(aoe_testkit::End::A, 1500)
        .expect("vblade's MTU");
    let s_veth =
        aoe_testkit::VethPair::new(&second_ns, &target_ns, 9000).expect("second target veth");
    let br = aoe_testkit::Bridge::new(&target_ns).expect("bridge");
    for port in [veth.a_name(), vb_veth.b_name(), s_veth.b_name()] {
        br.add_port(port).expect("bridge port");
    }
    let target_if = br.name().to_owned();
    let vb_if = vb_veth.a_name().to_owned();
    let vb_mac = aoe_wire::MacAddr(vb_veth.a_mac()).to_string();
    let s_mac = aoe_wire::MacAddr(s_veth.a_mac()).to_string();
    let mut rig = Rig::assemble(
        Target::AoeServe,
        Vec::new(),
        backing,
        (veth, target_ns, init_ns),
        target_if,
    );
    rig.start_target();
    rig.launch_initiator(&["--max-targets".into(), "2".into()]);
    rig.wait_state("up", Duration::from_secs(10), "at start");
    rig.wait_attr("payload", "8704", Duration::from_secs(5), "at start");
    let dev = rig.dev();
    let held = File::open(&dev).expect("open the device");

    // Another disk, 1 MiB larger, behind the 1500-byte port.
    let mut vb = vblade_disk(&rig, &vb_ns, &vb_if, "vblade-other.img", SECTORS + 2048);
    let refused = rig.discover_until(Duration::from_secs(20), || {
        rig.initiator_log()
            .contains(&format!("target {vb_mac} not taken as a path"))
    });
    assert!(
        refused,
        "no line refusing vblade's MAC {vb_mac}; vblade:\n{}{}",
        vb.output_so_far(),
        rig.logs()
    );
    // vblade answers each discover; none of its answers moves the frame size.
    for _ in 0..5 {
        rig.echo_ok("discover", "");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            rig.attr("payload").as_deref(),
            Some("8704"),
            "payload {:?} after vblade's answers, want 8704{}",
            rig.attr("payload"),
            rig.logs()
        );
    }
    assert_eq!(
        sha256(&dev),
        sha256(&rig.file),
        "the device's bytes are not all aoe serve's file's{}",
        rig.logs()
    );

    // A second `aoe serve` of the same file, its own MAC: the third MAC of a device capped
    // at two; vblade's refused MAC gives way to it, and it becomes a path.
    let mut second = second_ns
        .spawn(Target::AoeServe.command(s_veth.a_name(), &rig.file, &["--allow-duplicate".into()]))
        .expect("start the second aoe serve");
    let taken = rig.discover_until(Duration::from_secs(20), || {
        rig.initiator_log().contains(&format!(
            "target {s_mac} has the device's {SECTORS} sectors"
        ))
    });
    assert!(
        taken,
        "the second aoe serve {s_mac} was not taken as a path; it:\n{}{}",
        second.output_so_far(),
        rig.logs()
    );
    assert!(
        rig.initiator_log().contains(&format!(
            "target {vb_mac} (not a path) forgotten for new target {s_mac}"
        )),
        "no line forgetting vblade's MAC{}",
        rig.logs()
    );
    assert_eq!(rig.attr("payload").as_deref(), Some("8704"));
    assert_eq!(sha256(&dev), sha256(&rig.file));
    let _ = vb.stop();
    let _ = second.stop();
    drop(held);
    rig.finish();
    drop(br);
}

// ------------------------------------------------------------------------------------------
// What a dying target's FLUSH and direct writes answer

/// `O_DIRECT` of asm-generic/fcntl.h on x86 (the tests run there).
const O_DIRECT: i32 = 0o40000;

/// The device file's `fsync` (FLUSH CACHE EXT) and a direct write of several FUSE requests
/// (`FUSE_ASYNC_DIO`: 4 MiB, four requests of `max_write` in flight together), both waiting
/// on a target that died,
/// fail with EIO when deadsecs ends: never 0, never a short count. Session 36 (s36/plbtrfs)
/// found an fdatasync on btrfs over a loop device (direct I/O) over the device file that
/// returned 0 at the moment the device went down, its write lost; the kernel log showed the
/// loop device's writes failing with EIO and btrfs aborting its log commit, so the success
/// was not ours. This pins that it is not: the two calls a loop device makes of the
/// device file (`vfs_fsync` for a flush, a direct `write_iter` for a write) both fail.
#[test]
fn fsync_and_direct_write_waiting_on_a_dead_target_fail_with_eio() {
    use std::os::unix::fs::OpenOptionsExt;
    let mut rig = Rig::start(
        Target::AoeServe,
        9000,
        InitOpts {
            deadsecs: Some(DEADSECS),
            ..InitOpts::default()
        },
    );
    let dev = rig.dev();
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(O_DIRECT)
            .open(&dev)
            .unwrap()
    };
    // A page-aligned MiB, as O_DIRECT wants.
    let mut raw = vec![0u8; (1 << 20) + 4096];
    let skip = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[skip..skip + (1 << 20)];
    buf.iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 251) as u8);
    let f = open();
    assert_eq!(
        f.write_at(buf, 0).unwrap(),
        1 << 20,
        "a direct MiB while the target lives"
    );
    f.sync_all().expect("fsync while the target lives");
    drop(f);

    rig.kill_target();
    let data = buf.to_vec();
    let (fs, fw) = (open(), open());
    let flusher = std::thread::spawn(move || fs.sync_all());
    let writer = std::thread::spawn(move || {
        let mut raw = vec![0u8; (4 << 20) + 4096];
        let skip = raw.as_ptr().align_offset(4096);
        for piece in raw[skip..skip + (4 << 20)].chunks_mut(1 << 20) {
            piece.copy_from_slice(&data);
        }
        fw.write_at(&raw[skip..skip + (4 << 20)], 4 << 20)
    });
    let synced = flusher.join().unwrap();
    let wrote = writer.join().unwrap();
    assert!(
        matches!(&synced, Err(e) if is_eio(e)),
        "fsync of the device file waiting on a dead target: {synced:?}, want EIO{}",
        rig.logs()
    );
    assert!(
        matches!(&wrote, Err(e) if is_eio(e)),
        "4 direct MiB written to a dead target: {wrote:?}, want EIO (not a count){}",
        rig.logs()
    );
    // Down: both fail at once as well.
    let f = open();
    let synced = f.sync_all();
    assert!(
        matches!(&synced, Err(e) if is_eio(e)),
        "fsync of a down device: {synced:?}"
    );
    drop(f);
    rig.finish();
}

// ------------------------------------------------------------------------------------------
// SIGTERM with I/O in flight

/// SIGTERM while a read waits on a dead target (deadsecs 60): the reader holds the device
/// file open, so the daemon refuses to stop (like `rmmod aoe` with a device open); SIGQUIT
/// then makes it fail the read, exit 0 and unmount ROOT; the reader gets an error in
/// seconds, not after deadsecs.
#[test]
fn sigterm_with_io_blocked_on_a_dead_target() {
    let mut rig = Rig::start(
        Target::AoeServe,
        1500,
        InitOpts {
            deadsecs: Some(60),
            ..InitOpts::default()
        },
    );
    rig.kill_target();
    let dev = rig.dev();
    let reader = std::thread::spawn(move || {
        let t0 = Instant::now();
        let r = read_at(&dev, 1 << 20, 4096);
        (r, t0.elapsed())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !reader.is_finished(),
        "the read did not wait for the dead target"
    );
    rig.signal_initiator("TERM");
    assert!(
        wait_until(Duration::from_secs(5), || rig
            .logs()
            .contains("not stopping while in use")),
        "SIGTERM with the device open: no refusal{}",
        rig.logs()
    );
    assert!(!reader.is_finished(), "the read ended on SIGTERM alone");
    rig.signal_initiator("QUIT");
    let mut init = rig.initiator.take().expect("initiator running");
    let status = init.wait_timeout(Duration::from_secs(5)).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "aoe initiator after SIGQUIT: {status:?}\n{}",
        init.output_so_far()
    );
    assert!(!rig.root_mounted(), "ROOT still mounted after SIGQUIT");
    let (r, took) = reader.join().unwrap();
    assert!(r.is_err(), "read from a dead target after SIGTERM: {r:?}");
    assert!(took < Duration::from_secs(10), "the read took {took:?}");
}

// ------------------------------------------------------------------------------------------
// MTU lowered with I/O in flight

/// Both ends' MTU lowered while 2-sector reads wait at the target (stopped with SIGSTOP, so
/// they are surely in flight): its 1060-byte answers no longer fit and are lost (or, once it
/// has seen the new MTU, it aborts the requests); after `discover` the initiator resends
/// those frames in 1-sector pieces and the read completes with the right bytes. Only
/// against `aoe serve`: vblade exits on the first failed send.
#[test]
fn mtu_lowered_under_reads_in_flight() {
    let rig = Rig::start(Target::AoeServe, 1500, InitOpts::default());
    let dev = rig.dev();
    let pid = rig.target.as_ref().unwrap().pid().to_string();
    // The target's side of the link, to see the reads arrive.
    let watch = raw_socket(&rig.target_ns, &rig.target_if);
    stop_process(pid.parse().unwrap());
    let reader = {
        let dev = dev.clone();
        std::thread::spawn(move || {
            run(Command::new("timeout").args(["-k", "5", "60", "dd"]).args([
                &format!("if={}", dev.display()),
                "bs=64k",
                "count=4",
                "skip=8",
                "iflag=direct",
                "status=none",
            ]))
        })
    };
    // The reads are in flight: one of their frames reached the stopped target. (A 300 ms
    // sleep stood for this: on a machine slow to start dd and send, the MTU changed first,
    // the reads went out in 1-sector frames and nothing was resent.)
    let mut at_target = false;
    let arrived = wait_until(Duration::from_secs(20), || {
        at_target = at_target
            || drain_frames(&watch, Duration::from_millis(20))
                .iter()
                .any(|f| {
                    aoe_wire::Message::parse(f).is_ok_and(|m| {
                        !m.header.response && matches!(m.body, aoe_wire::Body::Ata(_))
                    })
                });
        at_target
    });
    assert!(
        arrived,
        "no read frame reached the stopped target{}",
        rig.logs()
    );
    rig.veth.set_mtu(1000).unwrap();
    rig.echo_ok("discover", "");
    rig.wait_attr("payload", "512", Duration::from_secs(10), "at MTU 1000");
    run_ok(Command::new("kill").args(["-CONT", &pid]));
    let out = reader.join().unwrap();
    assert!(
        out.status.success(),
        "read across the MTU change: {}{}",
        String::from_utf8_lossy(&out.stderr),
        rig.logs()
    );
    let want = &pattern(1, (SECTORS * 512) as usize)[512 << 10..768 << 10];
    assert!(out.stdout == want, "wrong bytes read across the MTU change");
    let err = rig.err_lines(1);
    assert!(
        err.contains("resent in new frames"),
        "no frame was split:\n{err}"
    );
    rig.finish();
}

/// The initiator receives into a `PACKET_RX_RING` whose slots hold one frame of the MTU the
/// interface had when the ring was made. Raised under a running device (1500 to 9000 on both
/// ends, so the target offers 8 KiB frames too), the ring must be remade with larger slots:
/// the kernel cuts a frame longer than its slot, the engine drops cut frames, and every
/// 8 KiB answer was lost until the read failed.
#[test]
fn mtu_raised_under_the_receive_ring() {
    let rig = Rig::start(Target::AoeServe, 1500, InitOpts::default());
    let dev = rig.dev();
    rig.veth.set_mtu(9000).unwrap();
    // The target notices the new MTU on its next interface refresh; `discover` rescans the
    // initiator's interfaces and asks again until the target offers the larger frames.
    let want = payload_for(9000).to_string();
    let raised = wait_until(Duration::from_secs(10), || {
        rig.echo_ok("discover", "");
        wait_until(Duration::from_millis(500), || {
            rig.attr("payload").as_deref() == Some(want.as_str())
        })
    });
    assert!(
        raised,
        "payload {:?} at MTU 9000, want {want}{}",
        rig.attr("payload"),
        rig.logs()
    );
    let out = run(Command::new("timeout").args(["-k", "5", "30", "dd"]).args([
        &format!("if={}", dev.display()),
        "bs=1M",
        "iflag=direct",
        "status=none",
    ]));
    assert!(
        out.status.success(),
        "read at MTU 9000 after the raise: {}{}",
        String::from_utf8_lossy(&out.stderr),
        rig.logs()
    );
    assert!(
        out.stdout == pattern(1, (SECTORS * 512) as usize),
        "wrong bytes read at MTU 9000 after the raise"
    );
    // The transmit ring likewise (a new send-only socket and ring with 9014-byte slots):
    // a direct write's 8.5 KiB frames go through it and land. Without the remake they go
    // out with sendmmsg, so the data lands either way; the log says which ring was made.
    let src = rig.dir.path().join("src");
    let data = pattern(5, 1 << 20);
    fs::write(&src, &data).unwrap();
    let out = run(Command::new("timeout").args(["-k", "5", "30", "dd"]).args([
        &format!("if={}", src.display()),
        &format!("of={}", dev.display()),
        "bs=1M",
        "seek=1",
        "oflag=direct",
        "conv=notrunc",
        "status=none",
    ]));
    assert!(
        out.status.success(),
        "write at MTU 9000 after the raise: {}{}",
        String::from_utf8_lossy(&out.stderr),
        rig.logs()
    );
    let back = fs::read(&rig.file).unwrap();
    assert!(
        back[1 << 20..2 << 20] == data[..],
        "wrong bytes written at MTU 9000 after the raise"
    );
    let log = rig.initiator_log();
    assert!(
        log.lines()
            .any(|l| l.contains("sending through a transmit ring") && l.contains("cap=9014")),
        "no transmit ring for 9014-byte frames after the raise{}",
        rig.logs()
    );
    rig.finish();
}

// ------------------------------------------------------------------------------------------
// The matrix

macro_rules! matrix {
    ($($name:ident: $f:ident($kind:expr, $mtu:expr);)*) => {
        $(
            #[test]
            fn $name() {
                $f($kind, $mtu);
            }
        )*
    };
}

matrix! {
    data_aoe_serve_mtu_1500: data_path(Target::AoeServe, 1500);
    data_aoe_serve_mtu_9000: data_path(Target::AoeServe, 9000);
    data_vblade_mtu_1500: data_path(Target::Vblade, 1500);
    data_vblade_mtu_9000: data_path(Target::Vblade, 9000);
    data_aoe_serve_mtu_65535: data_path(Target::AoeServe, 65535);
    data_vblade_mtu_65535: data_path(Target::Vblade, 65535);
    ext4_aoe_serve_mtu_1500: ext4_over_loop(Target::AoeServe, 1500);
    ext4_aoe_serve_mtu_9000: ext4_over_loop(Target::AoeServe, 9000);
    ext4_vblade_mtu_1500: ext4_over_loop(Target::Vblade, 1500);
    ext4_vblade_mtu_9000: ext4_over_loop(Target::Vblade, 9000);
    dead_aoe_serve_mtu_1500: dead_target(Target::AoeServe, 1500);
    dead_aoe_serve_mtu_9000: dead_target(Target::AoeServe, 9000);
    dead_vblade_mtu_1500: dead_target(Target::Vblade, 1500);
    dead_vblade_mtu_9000: dead_target(Target::Vblade, 9000);
}

#[test]
fn control_aoe_serve() {
    control_files(Target::AoeServe);
}

#[test]
fn control_vblade() {
    control_files(Target::Vblade);
}
