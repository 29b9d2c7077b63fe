//! Any bytes into the frame parser: never a panic; whatever parses re-emits and parses to the
//! same header, and the IDENTIFY parser accepts any 512 bytes.
#![no_main]

use aoe_wire::{Identify, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::parse(data) {
        let again = m.to_vec().expect("a parsed message re-emits");
        let back = Message::parse(&again).expect("an emitted message parses");
        assert_eq!(back.header, m.header);
    }
    if data.len() >= 512 {
        let _ = Identify::parse(data);
    }
});
