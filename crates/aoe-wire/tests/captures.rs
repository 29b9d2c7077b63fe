//! Frames captured from real peers (vblade 25, aoetools 36, the Linux 6.1 aoe initiator; see
//! `testdata/README.md`): each parses, its fields equal what Wireshark's AoE dissector (or,
//! where tshark 4.0 does not dissect, the raw bytes) said, and re-emitting it reproduces the
//! captured bytes up to where the frame's own layout ends.

use aoe_wire::{Body, Message};

struct Entry {
    name: String,
    expect: Vec<(String, String)>,
    bytes: Vec<u8>,
}

fn entries() -> Vec<Entry> {
    let text = include_str!("../testdata/captures.txt");
    let mut out: Vec<Entry> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("== ") {
            out.push(Entry {
                name: name.trim().to_string(),
                expect: Vec::new(),
                bytes: Vec::new(),
            });
        } else if let Some(exp) = line.strip_prefix("# expect:") {
            let e = out.last_mut().expect("expect before an entry");
            e.expect = split_pairs(exp);
        } else if !line.is_empty() && !line.starts_with('#') {
            if let Some(e) = out.last_mut() {
                e.bytes.extend(
                    line.split_whitespace()
                        .map(|h| u8::from_str_radix(h, 16).expect("hex byte")),
                );
            }
        }
    }
    out
}

/// `k=v k="quoted string" ...`
fn split_pairs(s: &str) -> Vec<(String, String)> {
    let mut v = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let (k, after) = rest.split_once('=').expect("key=value");
        let (val, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"').expect("closing quote");
            (q[..end].to_string(), &q[end + 1..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        v.push((k.trim().to_string(), val));
        rest = next.trim();
    }
    v
}

fn num(v: &str) -> u64 {
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).expect("hex"),
        None => v.parse().expect("decimal"),
    }
}

fn mac(v: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, p) in v.split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16).expect("mac");
    }
    m
}

#[test]
fn every_captured_frame_parses_to_what_the_dissector_said() {
    let all = entries();
    assert!(all.len() >= 30, "only {} captured frames", all.len());
    let mut checked = 0;
    for e in &all {
        let m = Message::parse(&e.bytes).unwrap_or_else(|err| panic!("{}: {err}", e.name));
        let f = aoe_wire::Frame::new_checked(&e.bytes[..]).unwrap();
        for (k, v) in &e.expect {
            let ctx = format!("{}: {k}={v}", e.name);
            let h = &m.header;
            match k.as_str() {
                "dst" => assert_eq!(h.dst.0, mac(v), "{ctx}"),
                "src" => assert_eq!(h.src.0, mac(v), "{ctx}"),
                "ver" => assert_eq!(u64::from(h.version), num(v), "{ctx}"),
                "flags" => assert_eq!(u64::from(f.flags()), num(v), "{ctx}"),
                "err" => assert_eq!(u64::from(f.error()), num(v), "{ctx}"),
                "major" => assert_eq!(u64::from(h.target.shelf), num(v), "{ctx}"),
                "minor" => assert_eq!(u64::from(h.target.slot), num(v), "{ctx}"),
                "cmd" => assert_eq!(u64::from(u8::from(h.command)), num(v), "{ctx}"),
                "tag" => assert_eq!(u64::from(h.tag.0), num(v), "{ctx}"),
                "len" => assert_eq!(e.bytes.len() as u64, num(v), "{ctx}"),
                _ => match &m.body {
                    Body::Ata(a) => match k.as_str() {
                        "aflags" => assert_eq!(u64::from(a.aflags.bits()), num(v), "{ctx}"),
                        "errfeat" => assert_eq!(u64::from(a.err_feature), num(v), "{ctx}"),
                        "scnt" => assert_eq!(u64::from(a.sector_count), num(v), "{ctx}"),
                        "cmdstat" => assert_eq!(u64::from(a.cmd_status), num(v), "{ctx}"),
                        "lba" => assert_eq!(a.lba, num(v), "{ctx}"),
                        // Bytes after the 36-byte header as captured, padding included.
                        "datalen" => {
                            assert_eq!((e.bytes.len() - 36) as u64, num(v), "{ctx}")
                        }
                        other => panic!("{}: unknown ATA key {other}", e.name),
                    },
                    Body::Config(c) => match k.as_str() {
                        "bufcnt" => assert_eq!(u64::from(c.buffer_count), num(v), "{ctx}"),
                        "fw" => assert_eq!(u64::from(c.firmware_version), num(v), "{ctx}"),
                        "scnt" => assert_eq!(u64::from(c.sector_count), num(v), "{ctx}"),
                        "aoever" => assert_eq!(u64::from(c.aoe_version), num(v), "{ctx}"),
                        "ccmd" => assert_eq!(u64::from(u8::from(c.ccmd)), num(v), "{ctx}"),
                        "cfglen" => assert_eq!(c.config.len() as u64, num(v), "{ctx}"),
                        "cfg" => {
                            let want = match v.strip_prefix("0x") {
                                Some(h) => (0..h.len())
                                    .step_by(2)
                                    .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                                    .collect::<Vec<u8>>(),
                                None => v.as_bytes().to_vec(),
                            };
                            assert_eq!(c.config, &want[..], "{ctx}")
                        }
                        other => panic!("{}: unknown config key {other}", e.name),
                    },
                    other => panic!("{}: key {k} for body {other:?}", e.name),
                },
            }
            checked += 1;
        }
    }
    assert!(checked > 300, "only {checked} fields checked");
}

#[test]
fn captured_frames_re_emit_byte_for_byte() {
    for e in entries() {
        let m = Message::parse(&e.bytes).unwrap();
        let again = m.to_vec().unwrap();
        // Up to where the layout ends (header, argument, declared strings/lists, write data);
        // beyond that a capture holds padding or a sender's uninitialised memory.
        let n = m.unpadded_len().min(e.bytes.len());
        assert_eq!(&again[..n], &e.bytes[..n], "{}", e.name);
        assert!(again.len() >= 60, "{}: emitted frames are padded", e.name);
    }
}

#[test]
fn every_command_type_the_peers_emit_is_covered() {
    let names: Vec<String> = entries().into_iter().map(|e| e.name).collect();
    for needle in [
        "config_read_request_aoecfg",
        "config_set_error4_response_vblade",
        "config_test_request_aoecfg",
        "config_prefix_request_aoecfg",
        "config_fset_request_aoecfg",
        "config_read_broadcast_request_linux",
        "ata_identify_request_aoeping",
        "ata_identify_response_vblade",
        "ata_smart_return_status_request_aoeping",
        "ata_read_ext_request_linux",
        "ata_read_ext_response_vblade",
        "ata_write_ext_request_linux",
        "ata_write_ext_response_vblade",
    ] {
        assert!(
            names.iter().any(|n| n == needle),
            "missing capture {needle}"
        );
    }
}
