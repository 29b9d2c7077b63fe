//! Partition tables on an AoE device: MBR primary partitions and GPT, as the kernel's
//! partition scan finds them, so `eX.YpN` files can be offered (numbered like Linux: MBR
//! slots 1-4, GPT entries from 1).

/// One partition, in 512-byte sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// Partition number (the N of `eX.YpN`).
    pub number: u32,
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub sectors: u64,
}

/// Sectors to read from the start of a device to find its partitions: the MBR, the GPT
/// header and 128 GPT entries of 128 bytes.
pub const SCAN_SECTORS: u32 = 34;

/// Partitions described by the first sectors of a device of `capacity` sectors. Entries
/// that reach past the device are dropped; so are MBR extended containers (types 0x05,
/// 0x0f, 0x85), whose logical partitions are not scanned.
pub fn scan(head: &[u8], capacity: u64) -> Vec<Partition> {
    if head.len() < 512 || head[510] != 0x55 || head[511] != 0xaa {
        return Vec::new();
    }
    let mut parts = Vec::new();
    let mut protective = false;
    for i in 0..4 {
        let e = &head[446 + 16 * i..446 + 16 * (i + 1)];
        let kind = e[4];
        let start = u32::from_le_bytes([e[8], e[9], e[10], e[11]]) as u64;
        let sectors = u32::from_le_bytes([e[12], e[13], e[14], e[15]]) as u64;
        match kind {
            0 => {}
            0xee => protective = true,
            0x05 | 0x0f | 0x85 => {}
            _ => parts.push(Partition {
                number: i as u32 + 1,
                start,
                sectors,
            }),
        }
    }
    if protective {
        parts = scan_gpt(head);
    }
    parts.retain(|p| {
        p.sectors > 0
            && p.start > 0
            && p.start
                .checked_add(p.sectors)
                .is_some_and(|e| e <= capacity)
    });
    parts
}

fn scan_gpt(head: &[u8]) -> Vec<Partition> {
    let Some(h) = head.get(512..1024) else {
        return Vec::new();
    };
    if &h[0..8] != b"EFI PART" {
        return Vec::new();
    }
    let u32le = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let u64le = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]));
    let entries_lba = u64le(&h[72..80]);
    let count = u32le(&h[80..84]) as usize;
    let size = u32le(&h[84..88]) as usize;
    if size < 128 || entries_lba == 0 {
        return Vec::new();
    }
    let mut parts = Vec::new();
    for i in 0..count.min(128) {
        let off = entries_lba as usize * 512 + i * size;
        let Some(e) = head.get(off..off + 128) else {
            break;
        };
        if e[..16].iter().all(|b| *b == 0) {
            continue;
        }
        let first = u64le(&e[32..40]);
        let last = u64le(&e[40..48]);
        if last < first {
            continue;
        }
        parts.push(Partition {
            number: i as u32 + 1,
            start: first,
            sectors: last - first + 1,
        });
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr(entries: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut s = vec![0u8; SCAN_SECTORS as usize * 512];
        for (i, (kind, start, len)) in entries.iter().enumerate() {
            let e = &mut s[446 + 16 * i..446 + 16 * (i + 1)];
            e[4] = *kind;
            e[8..12].copy_from_slice(&start.to_le_bytes());
            e[12..16].copy_from_slice(&len.to_le_bytes());
        }
        s[510] = 0x55;
        s[511] = 0xaa;
        s
    }

    #[test]
    fn mbr_primaries() {
        let s = mbr(&[
            (0x83, 2048, 4096),
            (0, 0, 0),
            (0x05, 8192, 100),
            (0x83, 6144, 2048),
        ]);
        let p = scan(&s, 10000);
        assert_eq!(
            p,
            vec![
                Partition {
                    number: 1,
                    start: 2048,
                    sectors: 4096
                },
                Partition {
                    number: 4,
                    start: 6144,
                    sectors: 2048
                }
            ]
        );
        // Past the end of the device: dropped.
        assert_eq!(scan(&s, 8000).len(), 1);
        // No signature: nothing.
        let mut bad = s.clone();
        bad[511] = 0;
        assert!(scan(&bad, 10000).is_empty());
        assert!(scan(&s[..100], 10000).is_empty());
    }

    #[test]
    fn gpt_entries() {
        let mut s = mbr(&[(0xee, 1, 0xffff_ffff)]);
        let h = &mut s[512..1024];
        h[0..8].copy_from_slice(b"EFI PART");
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        for (i, (first, last)) in [(2048u64, 4095u64), (4096, 8191)].iter().enumerate() {
            let e = &mut s[1024 + i * 128..1024 + (i + 1) * 128];
            e[0] = 0xaf; // some type GUID
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
        }
        let p = scan(&s, 10000);
        assert_eq!(
            p,
            vec![
                Partition {
                    number: 1,
                    start: 2048,
                    sectors: 2048
                },
                Partition {
                    number: 2,
                    start: 4096,
                    sectors: 4096
                }
            ]
        );
    }
}
