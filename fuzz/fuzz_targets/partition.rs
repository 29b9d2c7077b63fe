//! Any bytes as the first sectors of a disk into the initiator's partition scanner, as the
//! network thread feeds it (`scan(head, capacity)` with up to `SCAN_SECTORS` read from the
//! device): input = device size in sectors (8 bytes, little-endian) then the head. Never a
//! panic; every partition is non-empty and lies within the device after sector 0; numbers
//! are unique, ascending and as the kernel names them (MBR: slot N is partition N with that
//! slot's start and length; GPT: entry index + 1, at most `GPT_MAX_ENTRIES`).
#![no_main]

use aoe_initiator::partition::{scan, GPT_MAX_ENTRIES, SCAN_SECTORS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((size, head)) = data.split_first_chunk::<8>() else {
        return;
    };
    let capacity = u64::from_le_bytes(*size);
    // The network thread reads at most SCAN_SECTORS, and no more than the device has.
    let max = (SCAN_SECTORS as u64).min(capacity) as usize * 512;
    let head = &head[..head.len().min(max)];
    let parts = scan(head, capacity);
    let mut last = 0;
    for p in &parts {
        assert!(p.sectors > 0 && p.start > 0, "{p:?}");
        let end = p.start.checked_add(p.sectors);
        assert!(end.is_some_and(|e| e <= capacity), "{p:?} past {capacity}");
        assert!(
            p.number > last,
            "numbers not unique and ascending: {parts:?}"
        );
        last = p.number;
    }
    if parts.is_empty() {
        return;
    }
    let slots: Vec<&[u8]> = head[446..510].chunks_exact(16).collect();
    let u64le = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().unwrap());
    if slots.iter().any(|s| s[4] == 0xee) {
        // Partition N is entry N - 1 of the array at the header's entries LBA.
        assert!(last <= GPT_MAX_ENTRIES, "{parts:?}");
        let base = u64le(&head[512 + 72..]) as usize * 512;
        for p in &parts {
            let e = &head[base + (p.number as usize - 1) * 128..][..128];
            let (first, end) = (u64le(&e[32..]), u64le(&e[40..]));
            assert_eq!(
                (p.start, p.sectors),
                (first, end - first + 1),
                "entry {}",
                p.number
            );
        }
    } else {
        for p in &parts {
            assert!((1..=4).contains(&p.number), "{parts:?}");
            let s = slots[p.number as usize - 1];
            let field =
                |at: usize| u64::from(u32::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]]));
            assert_eq!(
                (p.start, p.sectors),
                (field(8), field(12)),
                "slot {}",
                p.number
            );
        }
    }
});
