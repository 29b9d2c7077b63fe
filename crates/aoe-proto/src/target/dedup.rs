//! Writes executed recently, so that a late copy of one is answered, not executed again.
//!
//! Ethernet may deliver a frame twice (a switch flooding while it learns, a bridge loop
//! settling, a relay with duplication). AoE writes are not idempotent once another write to
//! the same sectors has run in between: initiator writes A (tag T) to LBA X, the target
//! answers, the initiator writes B (tag T2) to X and is answered, and then the network's
//! second copy of the first frame arrives. Executed, it puts A back over B, an acknowledged
//! write, and nobody notices. vblade and the Linux driver do nothing about it.
//!
//! The target remembers each write it executed by (source MAC, tag, ATA command, LBA, sector
//! count) with a digest of the data (XXH3-128 of the payload), for
//! [`DedupConfig::window`] and at most [`DedupConfig::entries`] writes (oldest forgotten
//! first). A request matching an entry in key and digest is a copy of that write: it gets the
//! reply the write got (the first reply may be the frame that was lost), or nothing while
//! the write is still on its way to the disk, and is not executed again. A write with the
//! same key and other data (an initiator that reuses tags) is executed and replaces the
//! entry.
//!
//! Tags: the Linux driver and `aoe initiator` make a tag of `(counter & 0x7fff) << 16 |
//! (milliseconds & 0xffff)`, so one MAC repeats a tag at the earliest after 65 s, far
//! outside the window. aoetools set bit 31 and count (and only read); iPXE's aoe.c a 16-bit
//! counter under a fixed high half (`AOE_TAG_MAGIC`), so a tag comes back after 65536 commands. An initiator that writes the same data under the same tag, LBA and count again
//! within the window, after another write to those sectors, would have its second write
//! taken for a copy: none of the known initiators can, since none repeats a tag that soon.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use aoe_wire::MacAddr;

/// Default of [`DedupConfig::window`]: longer than any queueing delay on a LAN (a frame held
/// in a switch or a software bridge for milliseconds), and than `aoe initiator` waits for a
/// copy of a write to be presumed gone (a second, or its retransmission timeout).
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(3);

/// Default of [`DedupConfig::entries`]: about 2 MiB per export when full (64 bytes an entry
/// in the age queue, 33 a bucket of the map at twice as many buckets). At a sustained
/// 120 000 writes a second (1 GB/s of 8 KiB frames) it covers the last 130 ms.
pub const DEFAULT_DEDUP_ENTRIES: usize = 16384;

/// How long and how many executed writes an export remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupConfig {
    /// A write is forgotten this long after it was executed. Zero turns suppression off.
    pub window: Duration,
    /// At most this many writes are remembered, the oldest forgotten first, whatever the
    /// window: a flood of writes from random MACs and tags cannot grow the table. Zero turns
    /// suppression off.
    pub entries: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            window: DEFAULT_DEDUP_WINDOW,
            entries: DEFAULT_DEDUP_ENTRIES,
        }
    }
}

impl DedupConfig {
    fn enabled(&self) -> bool {
        !self.window.is_zero() && self.entries > 0
    }
}

/// What identifies a write request apart from its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Key {
    pub(super) src: MacAddr,
    pub(super) tag: u32,
    pub(super) cmd: u8,
    pub(super) count: u8,
    pub(super) lba: u64,
}

impl Hash for Key {
    /// Three words into the (keyed, flood-proof) hasher instead of five fields with length
    /// prefixes: this runs for every write.
    fn hash<H: Hasher>(&self, state: &mut H) {
        let m = self.src.0;
        let mac = u64::from_be_bytes([m[0], m[1], m[2], m[3], m[4], m[5], 0, 0]);
        state.write_u64(mac | u64::from(self.cmd) << 8 | u64::from(self.count));
        state.write_u64(self.lba);
        state.write_u32(self.tag);
    }
}

/// The data's digest: XXH3-128 (twox-hash, which picks its AVX2 code at run time where the
/// CPU has it; xxhash-rust, used before, takes SSE2 in a build for baseline x86-64 whatever
/// the CPU: 326 against 203 ns per 8704-byte payload here, the same digests). It replaced
/// CRC-32 plus a 64-bit word sum (96 bits, the sum linear and so weak against structured
/// differences) at a third of their cost per byte (docs/PERFORMANCE.md, "The target's write
/// path"): 128 well-mixed bits, so two different payloads under one key pass for a copy
/// with probability about 2^-128, less than the 2^-96 the old pair could at best give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Digest(u128);

impl Digest {
    pub(super) fn of(data: &[u8]) -> Digest {
        Digest(twox_hash::XxHash3_128::oneshot(data))
    }
}

/// How a remembered write stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Handed to the driver; no reply yet.
    InFlight,
    /// Answered with these ATA status and error registers.
    Done { status: u8, error: u8 },
}

/// A remembered write, in [`Dedup::order`] at its seq.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// When it was admitted (`None` in engines fed no time: never too old).
    at: Option<Instant>,
    key: Key,
    digest: Digest,
    state: State,
}

fn seen(e: &Entry) -> Seen {
    match e.state {
        State::InFlight => Seen::InFlight,
        State::Done { status, error } => Seen::Done { status, error },
    }
}

/// What the table says of a write request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    /// Not a copy of a remembered write: execute it. (Only `check`, for the tests, says
    /// so; `admit` remembers such a write at once and returns its seq instead.)
    #[cfg(test)]
    New,
    /// A copy of a write still in flight.
    InFlight,
    /// A copy of a write answered with these registers.
    Done { status: u8, error: u8 },
}

/// The table of recently executed writes of one export.
///
/// Each write admitted gets the next seq and an [`Entry`] at the back of `order`, which is
/// indexed by seq (`order[seq - first]`); `map` says which seq each key stands for now. A
/// write costs two lookups in `map` (its admission, and the removal of the one it pushes out
/// of the window or the bound); finishing it none (the seq finds its entry).
#[derive(Debug, Default)]
pub(super) struct Dedup {
    cfg: DedupConfig,
    map: HashMap<Key, u64>,
    /// Entries by age, oldest first, of seqs `first..next_seq`. One whose seq `map` no
    /// longer holds for its key was replaced since, and only counts against the bound.
    order: VecDeque<Entry>,
    /// The seq of `order`'s front.
    first: u64,
    next_seq: u64,
    /// Writes forgotten inside the window because the table was full (`entries`): a copy of
    /// one of them arriving late would be executed again. Steadily rising, the bound is too
    /// small for the write rate.
    evicted: u64,
}

impl Dedup {
    pub(super) fn new(cfg: DedupConfig) -> Dedup {
        Dedup {
            cfg,
            ..Dedup::default()
        }
    }

    /// False when the configuration turns suppression off: nothing is looked up.
    pub(super) fn active(&self) -> bool {
        self.cfg.enabled()
    }

    pub(super) fn config(&self) -> DedupConfig {
        self.cfg
    }

    /// Applies a new configuration; entries beyond the new bound are forgotten.
    pub(super) fn set_config(&mut self, cfg: DedupConfig, now: Option<Instant>) {
        self.cfg = cfg;
        if !cfg.enabled() {
            self.map = HashMap::new();
            self.order = VecDeque::new();
            self.first = self.next_seq;
        }
        self.expire(now);
    }

    /// Entries remembered (for tests and metrics).
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Entries forgotten for the bound while still inside the window, since the start.
    pub(super) fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Forgets entries past the window at `now` and beyond the bound.
    fn expire(&mut self, now: Option<Instant>) {
        self.expire_to(now, self.cfg.entries);
    }

    /// Forgets entries past the window at `now`, and the oldest beyond `most`.
    fn expire_to(&mut self, now: Option<Instant>, most: usize) {
        while let Some(e) = self.order.front() {
            let old = match (now, e.at) {
                (Some(now), Some(at)) => now.saturating_duration_since(at) >= self.cfg.window,
                _ => false,
            };
            if !old && self.order.len() <= most {
                break;
            }
            let key = e.key;
            let seq = self.first;
            self.order.pop_front();
            self.first += 1;
            if let MapEntry::Occupied(m) = self.map.entry(key) {
                if *m.get() == seq {
                    m.remove();
                    if !old {
                        self.evicted += 1;
                    }
                }
            }
        }
    }

    /// The entry of `seq`, if still remembered.
    fn entry_mut(&mut self, seq: u64) -> Option<&mut Entry> {
        self.order.get_mut(index(self.first, seq)?)
    }

    /// Looks a write up (and expires old entries first) without remembering it.
    #[cfg(test)]
    pub(super) fn check(&mut self, now: Option<Instant>, key: &Key, digest: Digest) -> Seen {
        if !self.cfg.enabled() {
            return Seen::New;
        }
        self.expire(now);
        let i = self.map.get(key).and_then(|&seq| index(self.first, seq));
        match i.and_then(|i| self.order.get(i)) {
            Some(e) if e.digest == digest => seen(e),
            _ => Seen::New,
        }
    }

    /// Remembers a write about to be handed to the driver; returns the seq to finish it
    /// with.
    #[cfg(test)]
    pub(super) fn insert(&mut self, now: Option<Instant>, key: Key, digest: Digest) -> Option<u64> {
        self.admit(now, key, digest).unwrap_or_default()
    }

    /// One lookup for the hot path: a copy of a remembered write is `Err` with what the table
    /// says of it; anything else is remembered as in flight (replacing an entry under the
    /// same key with other data) and `Ok` with the seq to finish or forget it with (`None`
    /// when the table is off).
    pub(super) fn admit(
        &mut self,
        now: Option<Instant>,
        key: Key,
        digest: Digest,
    ) -> Result<Option<u64>, Seen> {
        if !self.cfg.enabled() {
            return Ok(None);
        }
        // Room for one more within the bound (so `order` never grows past it).
        self.expire_to(now, self.cfg.entries - 1);
        let seq = self.next_seq;
        match self.map.entry(key) {
            MapEntry::Occupied(mut m) => {
                // The map holds only seqs still in `order` (`expire` removes the others).
                let i = index(self.first, *m.get());
                if let Some(e) = i
                    .and_then(|i| self.order.get(i))
                    .filter(|e| e.digest == digest)
                {
                    return Err(seen(e));
                }
                m.insert(seq);
            }
            MapEntry::Vacant(v) => {
                v.insert(seq);
            }
        }
        self.next_seq += 1;
        self.order.push_back(Entry {
            at: now,
            key,
            digest,
            state: State::InFlight,
        });
        Ok(Some(seq))
    }

    /// The write's reply went out with these registers.
    pub(super) fn finish(&mut self, seq: u64, status: u8, error: u8) {
        if let Some(e) = self.entry_mut(seq) {
            e.state = State::Done { status, error };
        }
    }

    /// The write never ran (the driver could not queue it): a copy must run.
    pub(super) fn forget(&mut self, key: &Key, seq: u64) {
        if let MapEntry::Occupied(m) = self.map.entry(*key) {
            if *m.get() == seq {
                m.remove();
            }
        }
    }
}

/// Where the entry of `seq` stands in [`Dedup::order`], whose front is seq `first`; `None`
/// for a seq forgotten before it.
fn index(first: u64, seq: u64) -> Option<usize> {
    usize::try_from(seq.checked_sub(first)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tag: u32) -> Key {
        Key {
            src: MacAddr([2, 0, 0, 0, 0, 1]),
            tag,
            cmd: 0x34,
            count: 2,
            lba: 100,
        }
    }

    /// The digest is XXH3-128 with seed 0, whichever implementation computes it: the values
    /// for the empty input and for a jumbo frame's payload as xxhash-rust (the implementation
    /// used before twox-hash) computed them.
    #[test]
    fn digest_is_xxh3_128() {
        assert_eq!(Digest::of(b"").0, 0x99aa06d3014798d86001c324468d497f);
        let payload: Vec<u8> = (0..8704u32).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(Digest::of(&payload).0, 0x78cd8c205553dcc368b6eaa7502e6280);
    }

    #[test]
    fn copy_of_done_write_is_seen_with_its_reply() {
        let mut d = Dedup::new(DedupConfig::default());
        let t0 = Instant::now();
        let dg = Digest::of(&[1u8; 1024]);
        assert_eq!(d.check(Some(t0), &key(7), dg), Seen::New);
        let seq = d.insert(Some(t0), key(7), dg).unwrap();
        assert_eq!(d.check(Some(t0), &key(7), dg), Seen::InFlight);
        d.finish(seq, 0x40, 0);
        assert_eq!(
            d.check(Some(t0), &key(7), dg),
            Seen::Done {
                status: 0x40,
                error: 0
            }
        );
        // Other data under the same key, or another tag: a new write.
        assert_eq!(
            d.check(Some(t0), &key(7), Digest::of(&[2u8; 1024])),
            Seen::New
        );
        assert_eq!(d.check(Some(t0), &key(8), dg), Seen::New);
        // Past the window: forgotten.
        let later = t0 + DEFAULT_DEDUP_WINDOW;
        assert_eq!(d.check(Some(later), &key(7), dg), Seen::New);
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn same_key_other_data_replaces_the_entry() {
        // An initiator that reuses one tag: A, then B, then A again to the same LBA. The third
        // write is not a copy of the first (B came in between under the same key).
        let mut d = Dedup::new(DedupConfig::default());
        let (a, b) = (Digest::of(&[0xaa; 512]), Digest::of(&[0xbb; 512]));
        let s = d.insert(None, key(1), a).unwrap();
        d.finish(s, 0x40, 0);
        assert_eq!(d.check(None, &key(1), b), Seen::New);
        let s = d.insert(None, key(1), b).unwrap();
        d.finish(s, 0x40, 0);
        assert_eq!(d.check(None, &key(1), a), Seen::New);
    }

    #[test]
    fn bounded_whatever_the_flood() {
        let cfg = DedupConfig {
            window: Duration::from_secs(60),
            entries: 64,
        };
        let mut d = Dedup::new(cfg);
        let dg = Digest::of(&[0u8; 512]);
        for tag in 0..10_000 {
            d.insert(None, key(tag), dg);
            // The same key over and over must not grow `order` past the bound either.
            d.insert(None, key(5), dg);
        }
        assert!(
            d.len() <= 64 && d.order.len() <= 64,
            "{} {}",
            d.len(),
            d.order.len()
        );
        // Nor its memory: the queue never held one more than the bound, which would have
        // doubled its capacity (the growth is amortized doubling: 4, 8, ..., 64).
        assert!(d.order.capacity() < 2 * 64, "{}", d.order.capacity());
        // The newest are kept.
        assert_eq!(d.check(None, &key(9_999), dg), Seen::InFlight);
        assert_eq!(d.check(None, &key(0), dg), Seen::New);
    }

    #[test]
    fn forgotten_write_runs_again_and_off_means_off() {
        let mut d = Dedup::new(DedupConfig::default());
        let dg = Digest::of(&[3u8; 512]);
        let s = d.insert(None, key(1), dg).unwrap();
        d.forget(&key(1), s);
        assert_eq!(d.check(None, &key(1), dg), Seen::New);
        d.set_config(
            DedupConfig {
                window: Duration::ZERO,
                ..DedupConfig::default()
            },
            None,
        );
        assert!(d.insert(None, key(1), dg).is_none());
        assert_eq!(d.check(None, &key(1), dg), Seen::New);
    }

    /// A write is finished by its seq alone: the reply of a write replaced since (same key,
    /// other data) must not mark the newer one answered, one pushed out of the table is
    /// ignored, and seqs keep finding their entries across evictions and a table turned off
    /// and on again.
    #[test]
    fn finish_by_seq_marks_only_its_own_write() {
        let cfg = DedupConfig {
            window: Duration::from_secs(60),
            entries: 4,
        };
        let mut d = Dedup::new(cfg);
        let (a, b) = (Digest::of(&[0xaa; 512]), Digest::of(&[0xbb; 512]));
        let old = d.insert(None, key(1), a).unwrap();
        let new = d.insert(None, key(1), b).unwrap();
        d.finish(old, 0x41, 0x04);
        assert_eq!(d.check(None, &key(1), b), Seen::InFlight);
        d.finish(new, 0x40, 0);
        let done = Seen::Done {
            status: 0x40,
            error: 0,
        };
        assert_eq!(d.check(None, &key(1), b), done);
        // Push both out (bound 4), then finish the evicted one: nothing changes, and the
        // newest entries are found by their seqs.
        let mut last = 0;
        for tag in 10..20 {
            last = d.insert(None, key(tag), a).unwrap();
        }
        d.finish(new, 0x41, 0x04);
        assert_eq!(d.check(None, &key(1), b), Seen::New);
        assert_eq!(d.check(None, &key(19), a), Seen::InFlight);
        d.finish(last, 0x40, 0);
        assert_eq!(d.check(None, &key(19), a), done);
        assert_eq!(d.check(None, &key(18), a), Seen::InFlight);
        // Off and on again: new seqs, found as before.
        d.set_config(DedupConfig { entries: 0, ..cfg }, None);
        d.set_config(cfg, None);
        let s = d.insert(None, key(1), a).unwrap();
        d.finish(s, 0x40, 0);
        assert_eq!(d.check(None, &key(1), a), done);
    }

    #[test]
    fn digest_tells_apart_swapped_and_shifted_data() {
        let mut a = vec![0u8; 1024];
        a[..8].copy_from_slice(&1u64.to_le_bytes());
        a[8..16].copy_from_slice(&2u64.to_le_bytes());
        let mut b = a.clone();
        b.swap(0, 8);
        assert_ne!(Digest::of(&a), Digest::of(&b));
        let mut c = a.clone();
        c.rotate_right(512);
        assert_ne!(Digest::of(&a), Digest::of(&c));
    }
}
