//! `aoe trace` (issue 12): decoded lines for a real transfer between `aoe serve` and
//! `aoe initiator` on a veth link, `-w` pcap output that tshark reads, and a malformed frame
//! named as such.

mod common;

use std::process::Command;
use std::time::Duration;

use aoe_testkit::wait_until;
use common::*;

/// Frame lines of the trace's output (its own notes start with `aoe trace:`).
fn frame_lines(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| !l.starts_with("aoe trace:") && !l.trim().is_empty())
        .collect()
}

#[test]
fn trace_decodes_a_transfer_writes_pcap_and_names_malformed_frames() {
    aoe_testkit::require_tools(&[("tshark", "tshark")]);
    let rig = Rig::start(Target::AoeServe, 1500, InitOpts::default());
    let dir = tempfile::tempdir().expect("temp dir");
    let pcap = dir.path().join("trace.pcap");
    // On the initiator's side: `aoe serve` sends with PACKET_QDISC_BYPASS, which hides its
    // replies from taps on its own host (packet(7)); they are seen arriving here.
    let mut trace = rig
        .init_ns
        .spawn(
            Command::new(AOE)
                .args(["trace", &rig.init_if, "-w"])
                .arg(&pcap),
        )
        .expect("start aoe trace");
    assert!(
        wait_until(Duration::from_secs(10), || trace
            .output_so_far()
            .contains("listening on")),
        "aoe trace did not start: {}",
        trace.output_so_far()
    );

    // Discovery (config query and reply), then a write and a read through the device.
    rig.echo_ok("discover", "");
    let data = pattern(12, 16 * 1024);
    write_sync(&rig.dev(), 1 << 20, &data).expect("write through the device");
    let back = read_at(&rig.dev(), 1 << 20, data.len()).expect("read through the device");
    assert!(back == data, "data read back differs");

    // A Reserve/Release read claiming 200 MACs in a 60-byte frame, sent raw.
    let sock = raw_socket(&rig.init_ns, &rig.init_if);
    let mut bad = vec![0u8; 60];
    bad[0..6].copy_from_slice(&rig.veth.a_mac());
    bad[6..12].copy_from_slice(&rig.veth.b_mac());
    bad[12..14].copy_from_slice(&[0x88, 0xa2]);
    bad[14] = 0x10; // version 1, request
    bad[16..18].copy_from_slice(&SHELF.to_be_bytes());
    bad[18] = SLOT;
    bad[19] = 3; // Reserve/Release
    bad[20..24].copy_from_slice(&0x8000_0042u32.to_be_bytes());
    bad[24] = 0; // RCmd read
    bad[25] = 200; // NMacs
    sock.send(&bad).expect("send the malformed frame");
    // Wait for the target's refusal too, not only the request: stopping the trace as soon
    // as the request shows can cut the reply off (CI, stop 40).
    assert!(
        wait_until(Duration::from_secs(10), || trace
            .output_so_far()
            .contains("tag 0x80000042 rsp")),
        "the malformed frame or its refusal was not shown: {}",
        trace.output_so_far()
    );

    let status = trace.stop().expect("stop aoe trace");
    assert!(status.success(), "aoe trace after SIGTERM: {status}");
    let out = trace.output_so_far();
    let lines = frame_lines(&out);
    let dev = format!(" {SHELF}.{SLOT} tag ");
    let has = |words: &[&str]| {
        lines
            .iter()
            .any(|l| l.contains(&dev) && words.iter().all(|w| l.contains(w)))
    };
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" 65535.255 tag ") && l.contains(" req config read ")),
        "no broadcast config query:\n{out}"
    );
    assert!(
        has(&[
            " rsp config read bufcnt ",
            " maxsectors 2 ",
            " aoe 1 string "
        ]),
        "no config reply from {DEV}:\n{out}"
    );
    assert!(
        has(&[" req ata write", " count 2 ", " data 1024"]),
        "no ATA write of {DEV}:\n{out}"
    );
    assert!(
        has(&[" req ata read", " count 2 ", " data 0"]),
        "no ATA read of {DEV}:\n{out}"
    );
    assert!(
        has(&[" rsp ata status 0x40 error 0x00 ", " data 1024"]),
        "no ATA read reply of {DEV}:\n{out}"
    );
    let malformed: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("tag 0x80000042 req"))
        .collect();
    assert!(
        malformed.len() == 1
            && malformed[0].contains("MALFORMED reserve: truncated AoE frame: 60 bytes"),
        "malformed frame line: {malformed:?}"
    );
    // The target refuses it with error 2, a well-formed reply.
    assert!(
        has(&["tag 0x80000042 rsp error 2 (bad argument parameter) reserve read macs []"]),
        "no refusal of the malformed frame:\n{out}"
    );

    // tshark reads the pcap without complaint, finds as many frames, and its AoE dissector
    // decodes shelf, slot and command.
    let t = run(Command::new("tshark").arg("-r").arg(&pcap).args([
        "-T",
        "fields",
        "-e",
        "aoe.major",
        "-e",
        "aoe.minor",
        "-e",
        "aoe.cmd",
    ]));
    let stderr = String::from_utf8_lossy(&t.stderr);
    assert!(t.status.success(), "tshark -r failed: {stderr}");
    assert!(
        !stderr.to_lowercase().contains("error")
            && !stderr.contains("cut short")
            && !stderr.contains("appears to be damaged"),
        "tshark complained: {stderr}"
    );
    let fields = String::from_utf8_lossy(&t.stdout);
    let rows: Vec<&str> = fields.lines().collect();
    assert_eq!(
        rows.len(),
        lines.len(),
        "tshark saw another number of frames:\n{fields}\n---\n{out}"
    );
    for cmd in [0, 1, 3] {
        let want = format!("{SHELF:#06x}\t{SLOT:#04x}\t{cmd}");
        assert!(
            rows.contains(&want.as_str()),
            "no {want:?} in tshark's fields:\n{fields}"
        );
    }
    rig.finish();
}
