//! Partition tables on an AoE device: MBR primary, extended and logical partitions, and
//! GPT, as the kernel's partition scan finds them (`block/partitions/efi.c`, then
//! `msdos.c`), so `eX.YpN` files can be offered, numbered as the kernel numbers them on an
//! aoe disk: MBR slots 1-4, logical partitions from 5, GPT entries from 1, and never past
//! 15 (the driver's disks have `AOE_PARTITIONS` = 16 minors, so `state->limit` is 16).
//!
//! The table comes from the device, so every field is hostile: all arithmetic on it is
//! checked, and a table that does not add up yields no partitions or only its valid entries,
//! never a panic or a partition outside the device. A GPT is taken only with both CRCs right
//! (header and entry array, as efi.c `is_gpt_valid`); like the kernel without the `gpt`
//! boot option, the backup GPT at the end of the device is never used in place of a bad
//! primary (efi.c `find_valid_gpt` reads it only after a valid primary, and only to compare;
//! we do not compare). Differences on purpose: an entry
//! that reaches past the device is dropped (the kernel keeps it cut at the end), and an EBR
//! chain that comes back to an EBR already read ends there (msdos.c follows it, adding the
//! same logical partitions again under new numbers, until 100 links without one or p15).

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

/// The highest partition number on an aoe disk: `AOE_PARTITIONS` (16) minors, one of them
/// the whole disk. msdos.c stops adding logical partitions there, efi.c reads no more
/// entries (`i < state->limit - 1`).
pub const MAX_PARTITION: u32 = 15;

/// GPT entries read at most: those numbered up to [`MAX_PARTITION`].
pub const GPT_MAX_ENTRIES: u32 = MAX_PARTITION;

/// EBR links msdos.c `parse_extended` follows without finding a data partition.
const MAX_EBR_LINKS: u32 = 100;

const SECTOR: usize = 512;
/// MBR partition type of a GPT protective MBR (`EFI_PMBR_OSTYPE_EFI_GPT`).
const PROTECTIVE: u8 = 0xee;
/// `sizeof(gpt_entry)`, the only entry size `efi.c` accepts.
const GPT_ENTRY: usize = 128;
/// `sizeof(gpt_header)`: the smallest header size `efi.c` accepts.
const GPT_HEADER_MIN: u32 = 92;
/// The largest entry array read: efi.c refuses one over `KMALLOC_MAX_SIZE` (4 MiB on x86-64
/// with 4 KiB pages), so a hostile count cannot make the scan read the whole device.
pub const GPT_MAX_TABLE_BYTES: u64 = 4 << 20;

/// Partitions described by the first sectors of a device of `capacity` sectors (`head` may
/// be shorter than [`SCAN_SECTORS`]; what it lacks is not there). EBRs of logical
/// partitions are read from `head` only: use [`scan_with`] to read them from the device.
pub fn scan(head: &[u8], capacity: u64) -> Vec<Partition> {
    scan_with(head, capacity, &mut |_| None)
}

/// Like [`scan`], with `read_sector(lba)` giving sectors beyond `head` (the EBRs of an
/// extended partition, anywhere on the device); None when a sector cannot be read, which
/// ends that chain. Partitions that are empty, start at sector 0 or reach past the device
/// are dropped. An extended container is offered as msdos.c offers it: its first 2 sectors
/// (room for a boot loader, and no `mkfs` on the whole container).
pub fn scan_with(
    head: &[u8],
    capacity: u64,
    read_sector: &mut dyn FnMut(u64) -> Option<Vec<u8>>,
) -> Vec<Partition> {
    let Some(mbr) = head.get(..SECTOR) else {
        return Vec::new();
    };
    if mbr[510] != 0x55 || mbr[511] != 0xaa {
        return Vec::new();
    }
    let slots: Vec<&[u8]> = mbr[446..510].chunks_exact(16).collect();
    let mut read = |lba: u64| -> Option<Vec<u8>> {
        // Nothing past the device is read (a link or table there is not followed).
        if lba >= capacity {
            return None;
        }
        let off = usize::try_from(lba).ok()?.checked_mul(SECTOR)?;
        match head.get(off..off.checked_add(SECTOR)?) {
            Some(s) => Some(s.to_vec()),
            None => read_sector(lba),
        }
    };
    let mut parts = if slots.iter().any(|e| e[4] == PROTECTIVE) {
        // efi.c `is_pmbr_valid`: a 0xEE slot starting at LBA 1 (protective or hybrid MBR)
        // means GPT; and msdos.c gives up on any MBR with a 0xEE slot, so without a valid
        // GPT there are no partitions at all.
        if slots
            .iter()
            .any(|e| e[4] == PROTECTIVE && u32le(&e[8..12]) == 1)
        {
            scan_gpt(head, capacity, &mut read)
        } else {
            Vec::new()
        }
    } else if slots.iter().any(|e| e[0] != 0 && e[0] != 0x80) {
        // msdos.c: a boot indicator other than 0 or 0x80 means this 55AA sector is not a
        // partition table (typically a FAT boot sector): no partitions.
        Vec::new()
    } else {
        scan_mbr(&slots, &mut read)
    };
    parts.retain(|p| {
        p.sectors > 0
            && p.start > 0
            && p.start
                .checked_add(p.sectors)
                .is_some_and(|e| e <= capacity)
    });
    // msdos.c adds the four primary slots first and parses extended ones afterwards, so
    // p4 comes before p5 even when the extended container is in slot 2 or 3.
    parts.sort_by_key(|p| p.number);
    parts
}

/// msdos.c `is_extended_partition`: DOS, Windows (LBA) and Linux extended.
fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

/// The four primary slots (msdos.c: slot N is partition N; those of 0 sectors are skipped), then
/// the logical partitions of each extended one, numbered from 5 on across all of them.
fn scan_mbr(slots: &[&[u8]], read: &mut dyn FnMut(u64) -> Option<Vec<u8>>) -> Vec<Partition> {
    let mut parts = Vec::new();
    let mut next = 5u32;
    for (number, e) in (1u32..).zip(slots) {
        let start = u64::from(u32le(&e[8..12]));
        let sectors = u64::from(u32le(&e[12..16]));
        if sectors == 0 {
            continue;
        }
        if is_extended(e[4]) {
            parts.push(Partition {
                number,
                start,
                sectors: sectors.min(2),
            });
            scan_extended(start, sectors, &mut next, &mut parts, read);
            continue;
        }
        // msdos.c puts any non-empty slot, whatever its type (0 included).
        parts.push(Partition {
            number,
            start,
            sectors,
        });
    }
    parts
}

/// msdos.c `parse_extended`: follows the chain of EBRs from the extended partition at
/// `first` (`first_size` sectors). In each EBR the data entries (non-empty, not extended)
/// are logical partitions, at offsets from that EBR; entries 3 and 4 only if they lie inside
/// both that EBR's link and the extended partition ("sometimes contain random garbage").
/// The first extended entry links to the next EBR, at an offset from `first`. Ends at an
/// unreadable sector or one without 55AA, after [`MAX_EBR_LINKS`] links without a data
/// partition, past [`MAX_PARTITION`], or at an EBR already read (a loop).
fn scan_extended(
    first: u64,
    first_size: u64,
    next: &mut u32,
    parts: &mut Vec<Partition>,
    read: &mut dyn FnMut(u64) -> Option<Vec<u8>>,
) {
    let (mut this, mut this_size) = (first, first_size);
    let mut seen = Vec::new();
    let mut links = 0u32;
    loop {
        links += 1;
        if links > MAX_EBR_LINKS || *next > MAX_PARTITION || seen.contains(&this) {
            return;
        }
        seen.push(this);
        let Some(ebr) = read(this) else {
            return;
        };
        if ebr.len() < SECTOR || ebr[510] != 0x55 || ebr[511] != 0xaa {
            return;
        }
        let slots: Vec<&[u8]> = ebr[446..510].chunks_exact(16).collect();
        for (i, e) in slots.iter().enumerate() {
            let offs = u64::from(u32le(&e[8..12]));
            let size = u64::from(u32le(&e[12..16]));
            if size == 0 || is_extended(e[4]) {
                continue;
            }
            // u64 of two u32s: no overflow.
            let start = this + offs;
            if i >= 2
                && (offs + size > this_size
                    || start < first
                    || start + size > first.saturating_add(first_size))
            {
                continue;
            }
            parts.push(Partition {
                number: *next,
                start,
                sectors: size,
            });
            links = 0;
            *next += 1;
            if *next > MAX_PARTITION {
                return;
            }
        }
        let Some(link) = slots
            .iter()
            .find(|e| u32le(&e[12..16]) != 0 && is_extended(e[4]))
        else {
            return;
        };
        this = first.saturating_add(u64::from(u32le(&link[8..12])));
        this_size = u64::from(u32le(&link[12..16]));
    }
}

/// The primary GPT at LBA 1, checked as efi.c `is_gpt_valid` does: signature, header size,
/// header CRC32 (over `header_size` bytes with the CRC field zeroed), `my_lba`, the usable
/// range, the entry size, the entry array's size (at most [`GPT_MAX_TABLE_BYTES`], as the
/// kernel's allocation bound) and its CRC32 (over all `count * 128` bytes, read from the
/// device where they lie beyond `head`; an unreadable array is no GPT). Its entries are
/// taken as `is_pte_valid` takes them: a non-zero type GUID, both ends on the device. Entry
/// `i` (from 0) is partition `i + 1`, as `efi_partition` numbers them, up to
/// [`GPT_MAX_ENTRIES`].
fn scan_gpt(
    head: &[u8],
    capacity: u64,
    read: &mut dyn FnMut(u64) -> Option<Vec<u8>>,
) -> Vec<Partition> {
    let Some(last_lba) = capacity.checked_sub(1) else {
        return Vec::new();
    };
    let Some(h) = head.get(SECTOR..2 * SECTOR) else {
        return Vec::new();
    };
    let header_size = u32le(&h[12..16]);
    let my_lba = u64le(&h[24..32]);
    let first_usable = u64le(&h[40..48]);
    let last_usable = u64le(&h[48..56]);
    let entries_lba = u64le(&h[72..80]);
    let count = u32le(&h[80..84]);
    let entry_size = u32le(&h[84..88]);
    if &h[0..8] != b"EFI PART"
        || !(GPT_HEADER_MIN..=SECTOR as u32).contains(&header_size)
        || my_lba != 1
        || first_usable > last_lba
        || last_usable > last_lba
        || last_usable < first_usable
        || entry_size as usize != GPT_ENTRY
        || header_crc(&h[..header_size as usize]) != u32le(&h[16..20])
    {
        return Vec::new();
    }
    let table_bytes = u64::from(count) * GPT_ENTRY as u64;
    if table_bytes > GPT_MAX_TABLE_BYTES {
        return Vec::new();
    }
    let Some(table) = read_table(entries_lba, table_bytes as usize, read) else {
        return Vec::new();
    };
    if crc32fast::hash(&table) != u32le(&h[88..92]) {
        return Vec::new();
    }
    let mut parts = Vec::new();
    for (number, e) in (1u32..=GPT_MAX_ENTRIES).zip(table.chunks_exact(GPT_ENTRY)) {
        if e[..16].iter().all(|b| *b == 0) {
            continue;
        }
        let first = u64le(&e[32..40]);
        let last = u64le(&e[40..48]);
        if first > last_lba || last > last_lba || last < first {
            continue;
        }
        // last <= last_lba < u64::MAX, so this cannot overflow; checked all the same.
        let Some(sectors) = (last - first).checked_add(1) else {
            continue;
        };
        parts.push(Partition {
            number,
            start: first,
            sectors,
        });
    }
    parts
}

/// CRC32 of a GPT header with its own CRC field (bytes 16..20) taken as zero.
fn header_crc(h: &[u8]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(&h[..16]);
    c.update(&[0; 4]);
    c.update(&h[20..]);
    c.finalize()
}

/// `len` bytes of the device from sector `lba` on, sector by sector through `read`; None if
/// a sector cannot be read or the range does not fit the address space.
fn read_table(
    lba: u64,
    len: usize,
    read: &mut dyn FnMut(u64) -> Option<Vec<u8>>,
) -> Option<Vec<u8>> {
    let mut table = Vec::with_capacity(len);
    let mut at = lba;
    while table.len() < len {
        let sector = read(at)?;
        let take = (len - table.len()).min(sector.len());
        table.extend_from_slice(sector.get(..take)?);
        at = at.checked_add(1)?;
    }
    Some(table)
}

fn u32le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn u64le(b: &[u8]) -> u64 {
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
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
                // The extended container: its first 2 sectors, as msdos.c offers it.
                Partition {
                    number: 3,
                    start: 8192,
                    sectors: 2
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

    /// A protective MBR and a GPT header as sgdisk writes it for a device of `capacity`
    /// sectors, entries at LBA 2, then `entries` (first, last), both CRCs right.
    fn gpt(capacity: u64, entries: &[(u64, u64)]) -> Vec<u8> {
        let mut s = mbr(&[(0xee, 1, 0xffff_ffff)]);
        let h = &mut s[512..1024];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes()); // revision 1.0
        h[12..16].copy_from_slice(&92u32.to_le_bytes()); // header size
        h[24..32].copy_from_slice(&1u64.to_le_bytes()); // my LBA
        h[32..40].copy_from_slice(&(capacity - 1).to_le_bytes()); // alternate LBA
        h[40..48].copy_from_slice(&34u64.to_le_bytes()); // first usable
        h[48..56].copy_from_slice(&(capacity - 34).to_le_bytes()); // last usable
        h[72..80].copy_from_slice(&2u64.to_le_bytes()); // entries LBA
        h[80..84].copy_from_slice(&128u32.to_le_bytes()); // entry count
        h[84..88].copy_from_slice(&128u32.to_le_bytes()); // entry size
        for (i, (first, last)) in entries.iter().enumerate() {
            let e = &mut s[1024 + i * 128..1024 + (i + 1) * 128];
            e[0] = 0xaf; // some type GUID
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
        }
        seal(&mut s);
        s
    }

    /// Recomputes both CRCs of the GPT in `s` (entry array as far as `s` holds it), so a
    /// test that changes a field meets the check for that field, not the CRC's.
    fn seal(s: &mut [u8]) {
        let lba = u64le(&s[512 + 72..]);
        let len = u64::from(u32le(&s[512 + 80..])) * 128;
        let table_crc = usize::try_from(lba)
            .ok()
            .and_then(|l| l.checked_mul(512))
            .and_then(|a| Some(a..a.checked_add(usize::try_from(len).ok()?)?))
            .and_then(|r| s.get(r))
            .map_or(0, crc32fast::hash);
        set(s, 512 + 88, &table_crc.to_le_bytes());
        let size = (u32le(&s[512 + 12..]) as usize).clamp(20, 512);
        let crc = header_crc(&s[512..512 + size]);
        set(s, 512 + 16, &crc.to_le_bytes());
    }

    /// Sets a field and reseals the table.
    fn set_sealed(s: &mut [u8], at: usize, bytes: &[u8]) {
        set(s, at, bytes);
        seal(s);
    }

    fn set(s: &mut [u8], at: usize, bytes: &[u8]) {
        s[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn p(number: u32, start: u64, sectors: u64) -> Partition {
        Partition {
            number,
            start,
            sectors,
        }
    }

    #[test]
    fn gpt_entries() {
        let s = gpt(10000, &[(2048, 4095), (4096, 8191)]);
        assert_eq!(scan(&s, 10000), vec![p(1, 2048, 2048), p(2, 4096, 4096)]);
        // Partition numbers follow the entry index, gaps included (efi.c: i + 1).
        let s = gpt(10000, &[(0, 0), (2048, 4095), (0, 0), (4096, 8191)]);
        let mut t = s.clone();
        t[1024..1152].fill(0);
        t[1024 + 256..1024 + 384].fill(0);
        seal(&mut t);
        assert_eq!(scan(&t, 10000), vec![p(2, 2048, 2048), p(4, 4096, 4096)]);
    }

    /// The entry array's LBA times 512 overflows: the old code wrapped it (to LBA 1 here, so
    /// the real entry 1 was offered as partition 5), or panicked with overflow checks on.
    /// Now the table is out of reach: no partitions.
    #[test]
    fn gpt_entries_lba_overflow() {
        let mut s = gpt(10000, &[(2048, 4095)]);
        set_sealed(&mut s, 512 + 72, &((1u64 << 55) + 1).to_le_bytes());
        assert_eq!(scan(&s, 10000), vec![]);
        set_sealed(&mut s, 512 + 72, &u64::MAX.to_le_bytes());
        assert_eq!(scan(&s, 10000), vec![]);
    }

    /// An entry from LBA 0 to u64::MAX: `last - first + 1` overflowed (a panic with overflow
    /// checks on). Now the entry is dropped, its valid neighbour kept.
    #[test]
    fn gpt_entry_whole_u64_range() {
        let s = gpt(10000, &[(0, u64::MAX), (2048, 4095), (1, u64::MAX)]);
        assert_eq!(scan(&s, 10000), vec![p(2, 2048, 2048)]);
    }

    /// efi.c accepts only 128-byte entries; the old code took any size >= 128 and stepped
    /// through the table by it (a size of 2^32 - 1 put entry 2 at 4 GiB).
    #[test]
    fn gpt_entry_size_not_128() {
        let mut s = gpt(10000, &[(2048, 4095), (4096, 8191)]);
        for size in [256u32, 0xffff_ffff, 64, 0] {
            set_sealed(&mut s, 512 + 84, &size.to_le_bytes());
            assert_eq!(scan(&s, 10000), vec![], "entry size {size}");
        }
    }

    /// An entry array larger than the kernel would allocate is no GPT (and is not read); a
    /// legal one beyond the scanned sectors is read from the device, sector by sector, and
    /// its CRC checked over all of it.
    #[test]
    fn gpt_entry_count_huge() {
        let mut s = gpt(10000, &[(2048, 4095)]);
        set_sealed(&mut s, 512 + 80, &u32::MAX.to_le_bytes());
        let mut reads = 0;
        assert_eq!(
            scan_with(&s, 10000, &mut |_| {
                reads += 1;
                None
            }),
            vec![]
        );
        assert_eq!(reads, 0);
        // 4 MiB exactly is allowed: 32768 entries, 8192 sectors from LBA 2.
        let mut disk = gpt(10000, &[(2048, 4095)]);
        disk.resize(8194 * 512, 0);
        set_sealed(&mut disk, 512 + 80, &32768u32.to_le_bytes());
        let head = &disk[..SCAN_SECTORS as usize * 512];
        let mut reads = 0;
        let got = scan_with(head, 10000, &mut |lba| {
            reads += 1;
            let at = lba as usize * 512;
            disk.get(at..at + 512).map(<[u8]>::to_vec)
        });
        assert_eq!(got, vec![p(1, 2048, 2048)]);
        assert_eq!(reads, 8194 - SCAN_SECTORS as usize);
        // The same array, one sector unreadable: no GPT.
        let got = scan_with(head, 10000, &mut |lba| {
            let at = lba as usize * 512;
            (lba != 5000).then(|| disk[at..at + 512].to_vec())
        });
        assert_eq!(got, vec![]);
    }

    /// The header's CRC32 and the entry array's CRC32 (efi.c `is_gpt_valid`): one flipped bit
    /// in the header, in an entry the scan uses, or in one it never looks at (entry 100) means
    /// no GPT at all, as the kernel's scan finds none. The old code took all three.
    #[test]
    fn gpt_crcs_checked() {
        let good = gpt(10000, &[(2048, 4095), (4096, 8191)]);
        assert_eq!(scan(&good, 10000), vec![p(1, 2048, 2048), p(2, 4096, 4096)]);
        for (what, at) in [
            ("header: first usable", 512 + 40),
            ("header: CRC field", 512 + 16),
            ("header: entries CRC field", 512 + 88),
            ("entry 1's last LBA", 1024 + 40),
            ("entry 100's type", 1024 + 99 * 128),
        ] {
            let mut s = good.clone();
            s[at] ^= 1;
            assert_eq!(scan(&s, 10000), vec![], "{what}");
        }
        // Bytes after a 92-byte header are outside its CRC (`header_size` bytes only); a
        // larger header_size takes them in.
        let mut s = good.clone();
        s[512 + 200] = 7;
        assert_eq!(scan(&s, 10000).len(), 2);
        set(&mut s, 512 + 12, &512u32.to_le_bytes());
        assert_eq!(scan(&s, 10000), vec![]);
        seal(&mut s);
        assert_eq!(scan(&s, 10000).len(), 2);
    }

    /// The header fields efi.c `is_gpt_valid` checks: a header that fails one of them is no
    /// GPT, and the protective MBR makes msdos.c give up too.
    #[test]
    fn gpt_header_checks() {
        let good = gpt(10000, &[(2048, 4095)]);
        let cases: [(&str, usize, &[u8]); 7] = [
            ("header size 91", 12, &91u32.to_le_bytes()),
            ("header size 513", 12, &513u32.to_le_bytes()),
            ("my LBA 2", 24, &2u64.to_le_bytes()),
            ("first usable past the device", 40, &10000u64.to_le_bytes()),
            ("last usable past the device", 48, &10000u64.to_le_bytes()),
            ("last usable before first usable", 48, &33u64.to_le_bytes()),
            ("signature", 0, b"EFI PARt"),
        ];
        for (what, at, bytes) in cases {
            let mut s = good.clone();
            set_sealed(&mut s, 512 + at, bytes);
            assert_eq!(scan(&s, 10000), vec![], "{what}");
        }
        // The protective slot must start at LBA 1 (efi.c `pmbr_part_valid`).
        let mut s = good.clone();
        set(&mut s, 446 + 8, &2u32.to_le_bytes());
        assert_eq!(scan(&s, 10000), vec![]);
        // A device too small for the header's usable range; and one of 0 sectors.
        assert_eq!(scan(&good, 9000), vec![]);
        assert_eq!(scan(&good, 0), vec![]);
        // Only the header sector was read, or not even that.
        assert_eq!(scan(&good[..1024], 10000), vec![]);
        assert_eq!(scan(&good[..1000], 10000), vec![]);
    }

    /// Entries with an end past the device, or ending before they start, are dropped
    /// (efi.c `is_pte_valid`), the others kept.
    #[test]
    fn gpt_entries_past_device() {
        let s = gpt(
            10000,
            &[
                (2048, 10000),
                (10000, 10001),
                (4096, 4095),
                (u64::MAX, 5),
                (34, 9999),
            ],
        );
        assert_eq!(scan(&s, 10000), vec![p(5, 34, 9966)]);
    }

    /// A FAT boot sector also ends in 55AA, and its boot code lands where the MBR slots
    /// are. msdos.c rejects a table whose boot indicators are not 0 or 0x80; the old code
    /// offered the bytes as partitions.
    #[test]
    fn fat_boot_sector_is_not_a_table() {
        let mut s = mbr(&[(0x83, 63, 100)]);
        s[446] = 0x4f; // boot indicator of slot 1: boot code, not 0/0x80
        assert_eq!(scan(&s, 10000), vec![]);
        s[446] = 0x80;
        assert_eq!(scan(&s, 10000), vec![p(1, 63, 100)]);
    }

    /// MBR slots at the u32 limits: widened before adding, so nothing overflows; what is
    /// past the device is dropped.
    #[test]
    fn mbr_slots_at_u32_limits() {
        let s = mbr(&[
            (0x83, u32::MAX, u32::MAX),
            (0x83, 1, u32::MAX),
            (0x83, u32::MAX, 1),
            (0x83, 0, 5),
        ]);
        assert_eq!(scan(&s, u64::from(u32::MAX)), vec![]);
        assert_eq!(
            scan(&s, u64::MAX),
            vec![
                p(1, 0xffff_ffff, 0xffff_ffff),
                p(2, 1, 0xffff_ffff),
                p(3, 0xffff_ffff, 1)
            ]
        );
    }

    /// A disk of `sectors` sectors as bytes, its MBR holding `primaries`.
    fn disk(sectors: usize, primaries: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut d = vec![0u8; sectors * 512];
        d[..SCAN_SECTORS as usize * 512].copy_from_slice(&mbr(primaries));
        d
    }

    /// Writes an EBR at `lba`: its data entry (offset from the EBR, length) and its link
    /// (offset from the extended partition, length), either may be absent.
    fn ebr(d: &mut [u8], lba: u32, data: Option<(u32, u32)>, link: Option<(u32, u32)>) {
        let s = &mut d[lba as usize * 512..(lba as usize + 1) * 512];
        s.fill(0);
        for (i, (kind, e)) in [(0x83u8, data), (0x05, link)].into_iter().enumerate() {
            if let Some((start, len)) = e {
                let x = &mut s[446 + 16 * i..446 + 16 * (i + 1)];
                x[4] = kind;
                x[8..12].copy_from_slice(&start.to_le_bytes());
                x[12..16].copy_from_slice(&len.to_le_bytes());
            }
        }
        s[510] = 0x55;
        s[511] = 0xaa;
    }

    /// Scans a whole-disk image, reading EBRs from it, and counts the sectors read.
    fn scan_disk(d: &[u8]) -> (Vec<Partition>, usize) {
        let mut reads = 0;
        let head = &d[..(SCAN_SECTORS as usize * 512).min(d.len())];
        let parts = scan_with(head, (d.len() / 512) as u64, &mut |lba| {
            reads += 1;
            let off = usize::try_from(lba).ok()?.checked_mul(512)?;
            d.get(off..off + 512).map(<[u8]>::to_vec)
        });
        (parts, reads)
    }

    /// What `sfdisk` writes for `p1 primary, p2 extended with two logicals`: the container
    /// is offered as 2 sectors (msdos.c), the logicals as p5 and p6 at their EBR's offset.
    #[test]
    fn mbr_extended_with_two_logicals() {
        let mut d = disk(20000, &[(0x83, 2048, 2048), (0x05, 4096, 10000)]);
        ebr(&mut d, 4096, Some((2048, 3000)), Some((6000, 4000)));
        ebr(&mut d, 10096, Some((2048, 1952)), None);
        let (parts, reads) = scan_disk(&d);
        assert_eq!(
            parts,
            vec![
                p(1, 2048, 2048),
                p(2, 4096, 2),
                p(5, 6144, 3000),
                p(6, 12144, 1952)
            ]
        );
        assert_eq!(reads, 2);
        // Without a way to read the EBRs, only the primaries.
        assert_eq!(
            scan(&d[..34 * 512], 20000),
            vec![p(1, 2048, 2048), p(2, 4096, 2)]
        );
    }

    /// An extended container in slot 2 and a primary in slot 4: partitions come out by
    /// number, p4 before the logical p5, as msdos.c adds them (found by the partition fuzz
    /// target: the scanner gave [1, 5, 4]).
    #[test]
    fn logicals_follow_the_fourth_primary() {
        let mut d = disk(
            20000,
            &[
                (0x83, 2048, 2048),
                (0x05, 4096, 6000),
                (0, 0, 0),
                (0x83, 12000, 2048),
            ],
        );
        ebr(&mut d, 4096, Some((2048, 1000)), None);
        let (parts, _) = scan_disk(&d);
        let numbers: Vec<u32> = parts.iter().map(|p| p.number).collect();
        assert_eq!(numbers, [1, 2, 4, 5], "{parts:?}");
    }

    /// Logical partitions stop at 15, the driver's last minor (msdos.c `state->limit`).
    #[test]
    fn mbr_logicals_stop_at_15() {
        let mut d = disk(40000, &[(0x0f, 100, 30000)]);
        for i in 0..20u32 {
            let link = (i < 19).then_some(((i + 1) * 1000, 1000));
            ebr(&mut d, 100 + i * 1000, Some((10, 500)), link);
        }
        let (parts, reads) = scan_disk(&d);
        let numbers: Vec<u32> = parts.iter().map(|p| p.number).collect();
        assert_eq!(numbers, [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(parts.last(), Some(&p(15, 100 + 10 * 1000 + 10, 500)));
        assert_eq!(reads, 11);
    }

    /// An EBR that links back to itself or to an earlier EBR: the chain ends there, no
    /// partition twice, no endless reading.
    #[test]
    fn mbr_ebr_loops_end() {
        let mut d = disk(20000, &[(0x05, 100, 10000)]);
        ebr(&mut d, 100, Some((10, 50)), Some((1000, 1000)));
        ebr(&mut d, 1100, Some((10, 50)), Some((0, 1000)));
        let (parts, reads) = scan_disk(&d);
        assert_eq!(parts, vec![p(1, 100, 2), p(5, 110, 50), p(6, 1110, 50)]);
        assert_eq!(reads, 2);
        // A self-loop without data partitions.
        let mut d = disk(20000, &[(0x05, 100, 10000)]);
        ebr(&mut d, 100, None, Some((0, 1000)));
        let (parts, reads) = scan_disk(&d);
        assert_eq!(parts, vec![p(1, 100, 2)]);
        assert_eq!(reads, 1);
    }

    /// Links and data entries out of range: past the device, at u32 limits, to sectors that
    /// cannot be read, or to a sector without 55AA. No panic; what is valid stays.
    #[test]
    fn mbr_ebr_out_of_range() {
        let mut d = disk(20000, &[(0x05, 100, 10000)]);
        ebr(&mut d, 100, Some((u32::MAX, u32::MAX)), Some((u32::MAX, 5)));
        let (parts, reads) = scan_disk(&d);
        assert_eq!(parts, vec![p(1, 100, 2)]);
        assert_eq!(reads, 1, "a link past the device is not read: {reads}");
        // A data entry past the device is dropped, the chain goes on.
        ebr(&mut d, 100, Some((30000, 10)), Some((500, 100)));
        ebr(&mut d, 600, Some((1, 10)), Some((600, 100)));
        // The third EBR has no signature: the chain ends.
        let (parts, _) = scan_disk(&d);
        assert_eq!(parts, vec![p(1, 100, 2), p(6, 601, 10)]);
        // An extended container at the u32 limits.
        let d = disk(100, &[(0x85, u32::MAX, u32::MAX)]);
        assert_eq!(scan_disk(&d).0, vec![]);
        // Truncated EBR sectors from the reader.
        let d = disk(100, &[(0x05, 50, 40)]);
        let head = d[..34 * 512].to_vec();
        assert_eq!(
            scan_with(&head, 100, &mut |_| Some(vec![0x55; 100])),
            vec![p(1, 50, 2)]
        );
    }

    /// Entries 3 and 4 of an EBR count only inside the EBR's link and the extended
    /// partition (msdos.c: "these sometimes contain random garbage").
    #[test]
    fn mbr_ebr_garbage_in_entries_3_and_4() {
        let mut d = disk(20000, &[(0x05, 100, 1000)]);
        ebr(&mut d, 100, Some((10, 50)), None);
        let s = &mut d[100 * 512..101 * 512];
        // Entry 3 inside, entry 4 outside the extended partition.
        for (i, (start, len)) in [(2, (100u32, 20u32)), (3, (900, 500))] {
            let x = &mut s[446 + 16 * i..446 + 16 * (i + 1)];
            x[4] = 0x83;
            x[8..12].copy_from_slice(&start.to_le_bytes());
            x[12..16].copy_from_slice(&len.to_le_bytes());
        }
        assert_eq!(
            scan_disk(&d).0,
            vec![p(1, 100, 2), p(5, 110, 50), p(6, 200, 20)]
        );
    }

    /// GPT entries past the 15th are not offered: the driver's disks have 16 minors.
    #[test]
    fn gpt_entries_stop_at_15() {
        let entries: Vec<(u64, u64)> = (0..20).map(|i| (100 + 10 * i, 109 + 10 * i)).collect();
        let s = gpt(10000, &entries);
        let got = scan(&s, 10000);
        assert_eq!(got.len(), 15);
        assert_eq!(got.last(), Some(&p(15, 240, 10)));
    }
}
