//! Helpers shared by the tests that stop `aoe serve` in the middle of a stream of stamped
//! writes from a raw AoE client and then check every sector (`target_crash.rs`: SIGKILL,
//! `target_stop.rs`: SIGTERM): the seeded generator, the sector stamp and its reader, the set
//! of generations a sector may hold, and the two namespaces with `aoe serve` in one.
//!
//! Every test binary that says `mod stamped;` compiles this file.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use aoe_testkit::{require_root, Netns, NsChild, VethPair};
use aoe_wire::SECTOR_SIZE;

const AOE: &str = env!("CARGO_BIN_EXE_aoe");
/// The link's MTU: one frame carries 1-2 sectors.
pub const MTU: u32 = 1500;

/// splitmix64: a small deterministic generator, so a failing seed can be rerun.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Sector `lba` as generation `gen` writes it: `magic`, LBA, generation, then bytes that
/// depend on both, so a torn, misplaced or stale sector is recognised.
pub fn stamp(magic: &[u8; 8], lba: u64, gen: u64) -> Vec<u8> {
    let mut s = vec![0u8; SECTOR_SIZE];
    s[..8].copy_from_slice(magic);
    s[8..16].copy_from_slice(&lba.to_le_bytes());
    s[16..24].copy_from_slice(&gen.to_le_bytes());
    let mut x = lba.wrapping_mul(0x1000_0001) ^ gen.wrapping_mul(0x9e37_79b9);
    for b in &mut s[24..] {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *b = (x >> 56) as u8;
    }
    s
}

/// The generation in sector `lba` stamped with `magic` (0: never written, all zeros), or what
/// is wrong with it.
pub fn generation(magic: &[u8; 8], sector: &[u8], lba: u64) -> Result<u64, String> {
    if sector.iter().all(|b| *b == 0) {
        return Ok(0);
    }
    if &sector[..8] != magic {
        return Err("no stamp".into());
    }
    let at = u64::from_le_bytes(sector[8..16].try_into().unwrap());
    let gen = u64::from_le_bytes(sector[16..24].try_into().unwrap());
    if at != lba {
        return Err(format!("stamp of sector {at} (generation {gen})"));
    }
    if sector != stamp(magic, lba, gen) {
        return Err(format!("torn sector of generation {gen}"));
    }
    Ok(gen)
}

/// The generations a sector may hold, given those `sent` to it in order: from `kept` (the
/// last one that must have landed) on, since any sent after it may or may not have; with none
/// kept, zeros or any sent. Those in `late` (retransmitted: may land late) too.
pub fn acceptable(kept: Option<u64>, sent: &[u64], late: &[u64]) -> Vec<u64> {
    let mut ok = match kept {
        Some(k) => {
            let i = sent.iter().position(|g| *g == k).unwrap();
            sent[i..].to_vec()
        }
        None => [&[0][..], sent].concat(),
    };
    ok.extend(late);
    ok
}

/// A target namespace and a client namespace joined by a veth link of [`MTU`]; names from
/// `prefix`.
pub struct Net {
    pub t: Netns,
    pub i: Netns,
    pub veth: VethPair,
}

impl Net {
    pub fn new(prefix: &str) -> Net {
        require_root();
        let t = Netns::new(&format!("{prefix}t")).unwrap();
        let i = Netns::new(&format!("{prefix}i")).unwrap();
        let veth = VethPair::new(&t, &i, MTU).unwrap();
        Net { t, i, veth }
    }

    /// `aoe serve FLAGS 1 1 LINK FILE` in the target namespace.
    pub fn serve(&self, flags: &[&str], file: &Path) -> NsChild {
        let mut c = Command::new(AOE);
        c.arg("serve")
            .args(flags)
            .args(["1", "1", self.veth.a_name()])
            .arg(file);
        NsChild::spawn(&self.t, c).unwrap()
    }
}
