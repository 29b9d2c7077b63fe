//! The 512-byte IDENTIFY DEVICE page (ATA8-ACS), as an AoE target returns it and an initiator
//! reads capacity and features from it.
//!
//! Words are little-endian; ATA strings are space-padded and byte-swapped within each word
//! ("AB" is stored as 'B','A').

use crate::error::{check_len, Result};

/// Bytes in the page.
pub const IDENTIFY_LEN: usize = 512;

mod word {
    pub const GENERAL: usize = 0;
    pub const CYLINDERS: usize = 1;
    pub const HEADS: usize = 3;
    pub const SECTORS_PER_TRACK: usize = 6;
    pub const SERIAL: (usize, usize) = (10, 20);
    pub const FIRMWARE: (usize, usize) = (23, 27);
    pub const MODEL: (usize, usize) = (27, 47);
    pub const MAX_MULTIPLE: usize = 47;
    pub const CAPABILITIES: usize = 49;
    pub const CAPABILITIES2: usize = 50;
    pub const FIELD_VALIDITY: usize = 53;
    pub const LBA28_CAPACITY: usize = 60;
    pub const MAJOR_VERSION: usize = 80;
    pub const SUPPORTED1: usize = 82;
    pub const SUPPORTED2: usize = 83;
    pub const SUPPORTED3: usize = 84;
    pub const ENABLED1: usize = 85;
    pub const ENABLED2: usize = 86;
    pub const ENABLED3: usize = 87;
    pub const LBA48_CAPACITY: usize = 100;
    pub const INTEGRITY: usize = 255;
}

/// Word 83 / 86 bit 10: 48-bit address feature set.
pub const LBA48_BIT: u16 = 1 << 10;
/// Word 83 / 86 bit 12: FLUSH CACHE supported (mandatory).
pub const FLUSH_CACHE_BIT: u16 = 1 << 12;
/// Word 83 / 86 bit 13: FLUSH CACHE EXT supported.
pub const FLUSH_CACHE_EXT_BIT: u16 = 1 << 13;
/// Word 82 / 85 bit 5: volatile write cache supported / enabled.
pub const WRITE_CACHE_BIT: u16 = 1 << 5;
/// Word 82 / 85 bit 0: SMART feature set supported / enabled.
pub const SMART_BIT: u16 = 1 << 0;
/// Word 49 bit 9: LBA supported.
pub const LBA_BIT: u16 = 1 << 9;
/// The largest capacity words 60-61 can report; bigger devices report it and use 100-103.
pub const LBA28_MAX: u64 = 0x0fff_ffff;
/// Sectors an LBA48 command reaches: its LBA field holds 48 bits (the AoE header's six LBA
/// bytes), while words 100-103 can claim up to 2^64 - 1.
pub const LBA48_REACH: u64 = 1 << 48;

/// What an IDENTIFY page says, for building one or reading one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identify {
    /// Model number (words 27-46, 40 characters).
    pub model: String,
    /// Serial number (words 10-19, 20 characters).
    pub serial: String,
    /// Firmware revision (words 23-26, 8 characters).
    pub firmware: String,
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// Advertise a volatile write cache (words 82/85 bit 5), so initiators send flushes.
    pub write_cache: bool,
    /// Advertise SMART (words 82/85 bit 0).
    pub smart: bool,
}

/// What an initiator reads back from a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifyInfo {
    /// Model number, trimmed.
    pub model: String,
    /// Serial number, trimmed.
    pub serial: String,
    /// Firmware revision, trimmed.
    pub firmware: String,
    /// Words 60-61.
    pub lba28_sectors: u64,
    /// Words 100-103.
    pub lba48_sectors: u64,
    /// Word 83 bit 10.
    pub lba48: bool,
    /// Word 83 bit 12.
    pub flush_cache: bool,
    /// Word 83 bit 13.
    pub flush_cache_ext: bool,
    /// Word 85 bit 5.
    pub write_cache_enabled: bool,
}

impl IdentifyInfo {
    /// The capacity the Linux driver uses (`ataid_complete`): words 100-103 if LBA48 is
    /// supported, else words 60-61.
    pub fn sectors(&self) -> u64 {
        if self.lba48 {
            self.lba48_sectors
        } else {
            self.lba28_sectors
        }
    }
}

fn put_word(page: &mut [u8; IDENTIFY_LEN], w: usize, v: u16) {
    page[2 * w..2 * w + 2].copy_from_slice(&v.to_le_bytes());
}

fn get_word(page: &[u8], w: usize) -> u16 {
    u16::from_le_bytes([page[2 * w], page[2 * w + 1]])
}

/// Writes `s` as an ATA string over words `from..to`: space padded, truncated to fit,
/// bytes swapped within each word. Non-ASCII characters become '?'.
fn put_string(page: &mut [u8; IDENTIFY_LEN], (from, to): (usize, usize), s: &str) {
    let n = 2 * (to - from);
    let mut raw = vec![b' '; n];
    for (dst, c) in raw.iter_mut().zip(s.chars()) {
        *dst = if c.is_ascii() && !c.is_ascii_control() {
            c as u8
        } else {
            b'?'
        };
    }
    for (i, pair) in raw.chunks(2).enumerate() {
        page[2 * (from + i)] = pair[1];
        page[2 * (from + i) + 1] = pair[0];
    }
}

fn get_string(page: &[u8], (from, to): (usize, usize)) -> String {
    let mut raw = Vec::with_capacity(2 * (to - from));
    for w in from..to {
        raw.push(page[2 * w + 1]);
        raw.push(page[2 * w]);
    }
    String::from_utf8_lossy(&raw)
        .trim_matches(|c: char| c == ' ' || c == '\0')
        .to_string()
}

impl Identify {
    /// Builds the page.
    ///
    /// Advertises LBA (word 49), LBA48 and FLUSH CACHE / FLUSH CACHE EXT (words 83 and 86),
    /// the capacity in words 60-61 (capped at 0x0fffffff) and 100-103, a nominal CHS geometry
    /// for old software, and a valid integrity word (255: 0xA5 signature and checksum).
    pub fn build(&self) -> [u8; IDENTIFY_LEN] {
        let mut p = [0u8; IDENTIFY_LEN];
        put_word(&mut p, word::GENERAL, 0x0040); // fixed, non-removable ATA device
        put_word(&mut p, word::CYLINDERS, 16383);
        put_word(&mut p, word::HEADS, 16);
        put_word(&mut p, word::SECTORS_PER_TRACK, 63);
        put_string(&mut p, word::SERIAL, &self.serial);
        put_string(&mut p, word::FIRMWARE, &self.firmware);
        put_string(&mut p, word::MODEL, &self.model);
        put_word(&mut p, word::MAX_MULTIPLE, 0x8001);
        put_word(&mut p, word::CAPABILITIES, LBA_BIT);
        put_word(&mut p, word::CAPABILITIES2, 0x4000);
        put_word(&mut p, word::FIELD_VALIDITY, 0x0006);
        let lba28 = self.sectors.min(LBA28_MAX) as u32;
        put_word(&mut p, word::LBA28_CAPACITY, lba28 as u16);
        put_word(&mut p, word::LBA28_CAPACITY + 1, (lba28 >> 16) as u16);
        put_word(&mut p, word::MAJOR_VERSION, 0x01f0); // ATA/ATAPI-4 .. ATA8-ACS
        let mut feat1 = 0x4000;
        if self.write_cache {
            feat1 |= WRITE_CACHE_BIT;
        }
        if self.smart {
            feat1 |= SMART_BIT;
        }
        put_word(&mut p, word::SUPPORTED1, feat1);
        let feat2 = 0x4000 | LBA48_BIT | FLUSH_CACHE_BIT | FLUSH_CACHE_EXT_BIT;
        put_word(&mut p, word::SUPPORTED2, feat2);
        put_word(&mut p, word::SUPPORTED3, 0x4000);
        put_word(&mut p, word::ENABLED1, feat1);
        put_word(
            &mut p,
            word::ENABLED2,
            LBA48_BIT | FLUSH_CACHE_BIT | FLUSH_CACHE_EXT_BIT,
        );
        put_word(&mut p, word::ENABLED3, 0x4000);
        for i in 0..4 {
            put_word(
                &mut p,
                word::LBA48_CAPACITY + i,
                (self.sectors >> (16 * i)) as u16,
            );
        }
        // Integrity word: signature 0xA5 in the low byte, and a checksum in the high byte
        // that makes all 512 bytes sum to zero mod 256.
        p[2 * word::INTEGRITY] = 0xa5;
        let sum = p[..511].iter().fold(0u8, |a, b| a.wrapping_add(*b));
        p[511] = 0u8.wrapping_sub(sum);
        p
    }

    /// Reads a page (at least 512 bytes; more, as in a padded frame, is ignored).
    pub fn parse(page: &[u8]) -> Result<IdentifyInfo> {
        check_len(page, IDENTIFY_LEN)?;
        let w83 = get_word(page, word::SUPPORTED2);
        // Bits 14/15 of word 83 must read 01 for the word to be valid.
        let valid83 = w83 & 0xc000 == 0x4000;
        let lba28 = get_word(page, word::LBA28_CAPACITY) as u64
            | (get_word(page, word::LBA28_CAPACITY + 1) as u64) << 16;
        let lba48 = (0..4).fold(0u64, |acc, i| {
            acc | (get_word(page, word::LBA48_CAPACITY + i) as u64) << (16 * i)
        });
        Ok(IdentifyInfo {
            model: get_string(page, word::MODEL),
            serial: get_string(page, word::SERIAL),
            firmware: get_string(page, word::FIRMWARE),
            lba28_sectors: lba28,
            lba48_sectors: lba48,
            lba48: valid83 && w83 & LBA48_BIT != 0,
            flush_cache: valid83 && w83 & FLUSH_CACHE_BIT != 0,
            flush_cache_ext: valid83 && w83 & FLUSH_CACHE_EXT_BIT != 0,
            write_cache_enabled: get_word(page, word::ENABLED1) & WRITE_CACHE_BIT != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(sectors: u64) -> Identify {
        Identify {
            model: "AoE target model".into(),
            serial: "7.3:host".into(),
            firmware: "0.1.0".into(),
            sectors,
            write_cache: true,
            smart: true,
        }
    }

    #[test]
    fn build_parse_round_trip() {
        let page = sample(131072).build();
        let info = Identify::parse(&page).unwrap();
        assert_eq!(info.model, "AoE target model");
        assert_eq!(info.serial, "7.3:host");
        assert_eq!(info.firmware, "0.1.0");
        assert_eq!(info.sectors(), 131072);
        assert_eq!(info.lba28_sectors, 131072);
        assert!(info.lba48 && info.flush_cache && info.flush_cache_ext);
        assert!(info.write_cache_enabled);
    }

    #[test]
    fn strings_are_byte_swapped() {
        let page = sample(1).build();
        // Model starts at word 27: "AoE " is stored as "oA E".
        assert_eq!(&page[54..58], b"oA E");
    }

    #[test]
    fn big_capacity_caps_lba28() {
        let big = 1u64 << 40;
        let info = Identify::parse(&sample(big).build()).unwrap();
        assert_eq!(info.lba28_sectors, LBA28_MAX);
        assert_eq!(info.lba48_sectors, big);
        assert_eq!(info.sectors(), big);
    }

    #[test]
    fn checksum_sums_to_zero() {
        let page = sample(12345).build();
        assert_eq!(page[510], 0xa5);
        assert_eq!(page.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }

    #[test]
    fn long_strings_truncated_and_short_page_refused() {
        let mut id = sample(1);
        id.model = "x".repeat(100);
        let info = Identify::parse(&id.build()).unwrap();
        assert_eq!(info.model.len(), 40);
        assert!(Identify::parse(&[0u8; 511]).is_err());
    }
}
