//! Any bytes as a disk into the initiator's partition scanner, as the network thread feeds
//! it (`scan_with(head, capacity, read_sector)` with up to `SCAN_SECTORS` read from the
//! device, and EBRs and GPT entry arrays read from anywhere on it): input = a flags byte,
//! the device size in sectors (8 bytes, little-endian), then the disk's first sectors
//! (sectors past them read as missing). Flag bit 0 writes right CRCs into the GPT header at
//! LBA 1 first, so the fuzzer reaches the entry parsing behind the CRC checks. Never a
//! panic; every partition is non-empty and lies within the device after sector 0; numbers
//! are unique, ascending, at most `MAX_PARTITION`, and as the kernel names them (MBR: slot
//! N is partition N with that slot's start and length, 2 sectors of an extended one;
//! logical partitions from 5; GPT: entry index + 1, at most `GPT_MAX_ENTRIES`).
#![no_main]

use aoe_initiator::partition::{
    scan_with, GPT_MAX_ENTRIES, GPT_MAX_TABLE_BYTES, MAX_PARTITION, SCAN_SECTORS,
};
use libfuzzer_sys::fuzz_target;

/// Writes the entry array's CRC and then the header's into a GPT header at LBA 1, as far as
/// `disk` holds what they cover.
fn seal(disk: &mut [u8]) {
    let Some(h) = disk.get(512..1024) else {
        return;
    };
    let le32 = |b: &[u8]| u32::from_le_bytes(b[..4].try_into().unwrap());
    let (size, lba, count) = (
        le32(&h[12..]) as usize,
        u64::from_le_bytes(h[72..80].try_into().unwrap()),
        le32(&h[80..]) as u64,
    );
    let table = usize::try_from(lba)
        .ok()
        .and_then(|l| l.checked_mul(512))
        .and_then(|a| Some(a..a.checked_add(usize::try_from(count * 128).ok()?)?))
        .and_then(|r| disk.get(r))
        .map_or(0, crc32fast::hash);
    disk[512 + 88..512 + 92].copy_from_slice(&table.to_le_bytes());
    let size = size.clamp(20, 512);
    let mut c = crc32fast::Hasher::new();
    c.update(&disk[512..528]);
    c.update(&[0; 4]);
    c.update(&disk[532..512 + size]);
    let crc = c.finalize();
    disk[512 + 16..512 + 20].copy_from_slice(&crc.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((size, disk)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let mut disk = disk.to_vec();
    if flags & 1 != 0 {
        seal(&mut disk);
    }
    let disk = &disk[..];
    let capacity = u64::from_le_bytes(*size);
    // The network thread reads at most SCAN_SECTORS, and no more than the device has.
    let max = (SCAN_SECTORS as u64).min(capacity) as usize * 512;
    let head = &disk[..disk.len().min(max)];
    let mut reads = 0u32;
    let parts = scan_with(head, capacity, &mut |lba| {
        reads += 1;
        assert!(lba < capacity, "EBR read at {lba} past {capacity}");
        let off = usize::try_from(lba).ok()?.checked_mul(512)?;
        disk.get(off..off.checked_add(512)?).map(<[u8]>::to_vec)
    });
    let table_sectors = (GPT_MAX_TABLE_BYTES / 512) as u32;
    assert!(reads <= 1000 + table_sectors, "{reads} sector reads");
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
    assert!(last <= MAX_PARTITION, "{parts:?}");
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
            let e = &disk[base + (p.number as usize - 1) * 128..][..128];
            let (first, end) = (u64le(&e[32..]), u64le(&e[40..]));
            assert_eq!(
                (p.start, p.sectors),
                (first, end - first + 1),
                "entry {}",
                p.number
            );
        }
    } else {
        for p in parts.iter().filter(|p| p.number <= 4) {
            let s = slots[p.number as usize - 1];
            let field =
                |at: usize| u64::from(u32::from_le_bytes([s[at], s[at + 1], s[at + 2], s[at + 3]]));
            let sectors = match s[4] {
                0x05 | 0x0f | 0x85 => field(12).min(2),
                _ => field(12),
            };
            assert_eq!(
                (p.start, p.sectors),
                (field(8), sectors),
                "slot {}",
                p.number
            );
        }
    }
});
