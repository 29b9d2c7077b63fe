//! The LBA-stamped data pattern `aoe bench` writes and, in verify mode, checks byte for byte.
//!
//! Every 512-byte sector is 64 little-endian words: word 0 is the sector's LBA, word 1 the
//! run's stamp (so data left by an earlier run never passes), and every other word mixes LBA,
//! stamp and word index. A sector written to the wrong place, a stale sector, a torn sector or
//! a flipped bit anywhere all read back as a mismatch.

/// Bytes per sector (AoEr11 §3.1: ATA sectors are 512 bytes).
pub const SECTOR: usize = 512;
const WORDS: usize = SECTOR / 8;

/// Word `j` of the sector at `lba` for the run stamped `stamp`.
#[inline]
fn word(lba: u64, stamp: u64, j: usize) -> u64 {
    match j {
        0 => lba,
        1 => stamp,
        _ => {
            (lba ^ stamp.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ (j as u64).wrapping_mul(0xd1b5_4a32_d192_ed03)
        }
    }
}

/// Fills `buf` (a whole number of sectors) with the pattern of the sectors from `lba` on.
pub fn fill(buf: &mut [u8], lba: u64, stamp: u64) {
    for (s, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
        let lba = lba + s as u64;
        for (j, w) in sector.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&word(lba, stamp, j).to_le_bytes());
        }
    }
}

/// Checks `buf` against the pattern of the sectors from `lba` on. Returns how many sectors
/// differ and the first differing byte as (LBA, offset in that sector).
pub fn check(buf: &[u8], lba: u64, stamp: u64) -> (u64, Option<(u64, usize)>) {
    let mut bad = 0;
    let mut first = None;
    for (s, sector) in buf.chunks_exact(SECTOR).enumerate() {
        let lba = lba + s as u64;
        let wrong = (0..WORDS).find(|&j| {
            let got = &sector[j * 8..j * 8 + 8];
            got != word(lba, stamp, j).to_le_bytes()
        });
        if let Some(j) = wrong {
            bad += 1;
            if first.is_none() {
                let want = word(lba, stamp, j).to_le_bytes();
                let k = (0..8).find(|&k| sector[j * 8 + k] != want[k]).unwrap_or(0);
                first = Some((lba, j * 8 + k));
            }
        }
    }
    (bad, first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_sectors_check_clean() {
        let mut b = vec![0u8; 3 * SECTOR];
        fill(&mut b, 100, 7);
        assert_eq!(check(&b, 100, 7), (0, None));
    }

    #[test]
    fn every_byte_is_checked() {
        let mut b = vec![0u8; 2 * SECTOR];
        fill(&mut b, 40, 9);
        for i in [0, 9, 100, 511, 512, 1023] {
            let mut c = b.clone();
            c[i] ^= 0x10;
            let want = (40 + (i / SECTOR) as u64, i % SECTOR);
            assert_eq!(check(&c, 40, 9), (1, Some(want)), "byte {i}");
        }
    }

    #[test]
    fn wrong_place_or_stale_run_is_caught() {
        let mut b = vec![0u8; SECTOR];
        fill(&mut b, 5, 1);
        assert_eq!(check(&b, 6, 1).0, 1);
        assert_eq!(check(&b, 5, 2).0, 1);
    }
}
