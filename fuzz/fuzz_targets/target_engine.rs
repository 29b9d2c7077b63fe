//! Sequences of arbitrary frames into the target engine, with I/O completed in an in-memory
//! disk: never a panic, every reply is a well-formed AoE frame of at least 60 bytes, and no
//! I/O request ever leaves the export.
#![no_main]

use aoe_proto::target::{
    Engine, ExportConfig, Interface, IoKind, Outcome, PersistentState, FIRMWARE_VERSION,
};
use aoe_wire::{MacAddr, Message, TargetAddr, ATA_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

const SECTORS: u64 = 64;

fuzz_target!(|data: &[u8]| {
    let mut e = Engine::new(
        ExportConfig {
            addr: TargetAddr::new(1, 1),
            sectors: SECTORS,
            read_only: false,
            buffer_count: 16,
            firmware_version: FIRMWARE_VERSION,
            max_sectors: 255,
            model: "fuzz".into(),
            serial: "fuzz".into(),
            firmware: "0".into(),
        },
        PersistentState::default(),
    );
    let mac = MacAddr([2, 0, 0, 0, 0, 1]);
    e.set_interface(0, Interface { mac, mtu: 9000 });
    let mut disk = vec![0u8; SECTORS as usize * 512];
    // Frames are separated by a two-byte length prefix.
    let mut rest = data;
    while rest.len() >= 2 {
        let n = (u16::from_be_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let mut frame = rest[2..2 + n].to_vec();
        rest = &rest[2 + n..];
        if frame.len() >= 14 {
            // Make most inputs reach the engine's logic.
            frame[0..6].copy_from_slice(&mac.0);
            frame[12] = 0x88;
            frame[13] = 0xa2;
        }
        // The daemon's batch pass (`dedup_line`, whose address it only hints) parses every
        // frame too.
        let _ = e.dedup_line(&frame);
        let mut reply = vec![0u8; 9014];
        match e.handle_frame(0, &frame, &mut reply) {
            Outcome::Drop(_) => {}
            Outcome::Reply(n) => check_reply(&reply[..n]),
            Outcome::Io(io) => {
                match io.kind {
                    IoKind::Read { offset, len } => {
                        let o = offset as usize;
                        assert!(o + len <= disk.len(), "read outside the export");
                        reply[ATA_HEADER_LEN..ATA_HEADER_LEN + len]
                            .copy_from_slice(&disk[o..o + len]);
                    }
                    IoKind::Write { offset, data } => {
                        let o = offset as usize;
                        assert!(o + data.len() <= disk.len(), "write outside the export");
                        disk[o..o + data.len()].copy_from_slice(&frame[data]);
                    }
                    IoKind::Flush => {}
                }
                let n = e
                    .complete(io.token, Ok(()), &mut reply)
                    .expect("token in flight");
                check_reply(&reply[..n]);
            }
        }
    }
    assert_eq!(e.in_flight(), 0);
});

fn check_reply(r: &[u8]) {
    assert!(r.len() >= 60, "reply shorter than the Ethernet minimum");
    let m = Message::parse(r).unwrap_or_else(|e| panic!("reply does not parse: {e}: {r:02x?}"));
    assert!(m.header.response);
}
