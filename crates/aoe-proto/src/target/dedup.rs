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

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::ptr;
use std::time::{Duration, Instant};

use aoe_wire::{AtaRepr, MacAddr};

/// Default of [`DedupConfig::window`]: longer than any queueing delay on a LAN (a frame held
/// in a switch or a software bridge for milliseconds), and than `aoe initiator` waits for a
/// copy of a write to be presumed gone (a second, or its retransmission timeout).
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(3);

/// Default of [`DedupConfig::entries`]: about 1.5 MiB per export when full (64 bytes an
/// entry in the age queue, 32 in the index). At a sustained 120 000 writes a second (1 GB/s
/// of 8 KiB frames) it covers the last 130 ms.
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

impl Key {
    /// The key of write request `req` from `src` under `tag`: what the lookup before the
    /// write (`Engine::read_write`) and the batch's prefetch pass
    /// ([`Engine::prefetch_frame`](super::Engine::prefetch_frame)) both hash, so the line
    /// the pass hints is the line the lookup reads.
    pub(super) fn of_write(src: MacAddr, tag: u32, req: &AtaRepr<'_>) -> Key {
        Key {
            src,
            tag,
            cmd: req.cmd_status,
            count: req.sector_count,
            lba: req.effective_lba(),
        }
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

/// A write admitted, in [`Dedup::order`] at its seq.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// When it was admitted (`None` in engines fed no time: never too old).
    at: Option<Instant>,
    key: Key,
    digest: Digest,
    state: State,
    /// The index leads to it: it is its key's remembered write. False once a write under
    /// the same key replaced it, it was forgotten, or the index had no room for it; it then
    /// only counts against the bound until it leaves the queue.
    indexed: bool,
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

/// Buckets in a [`Group`]: with its `spill` word, one 64-byte cache line.
const BUCKETS: usize = 7;
/// Groups a key's bucket may be placed in, from its home group on: a lookup reads at most
/// this many (adjacent) cache lines, whatever the keys.
const MAX_PROBE: usize = 4;
/// The bits of a bucket that hold its seq; the 16 above them are the key's fingerprint.
const SEQ_BITS: u32 = 48;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

/// A cache line of the index. A bucket is `fingerprint << 48 | seq` (the seq's low 48
/// bits); it stands for a write only while that seq is still in the age queue (and
/// the entry there has its key), so buckets are never removed: a write that leaves the queue
/// frees its bucket by leaving it.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Group {
    buckets: [u64; BUCKETS],
    /// The newest seq whose bucket went to a later group because this one was full: a
    /// lookup goes on to the next group only while that seq is still in the queue.
    spill: u64,
}

/// Where a key's bucket is, or could go.
#[derive(Debug, Clone, Copy)]
struct Place {
    /// Groups after the home group.
    step: usize,
    bucket: usize,
}

/// What [`Dedup::find`] found.
#[derive(Debug, Clone, Copy)]
enum Found {
    /// The key's bucket, and its entry's position in `order`.
    At(Place, usize),
    /// Not there; the first free bucket on its way.
    Free(Place),
    /// Not there, and every bucket of the first this many groups taken.
    Full(usize),
}

/// The table of recently executed writes of one export.
///
/// Each write admitted gets the next seq and an [`Entry`] at the back of `order`, which is
/// indexed by seq (`order[seq - first]`) and forgets from the front (the window, the
/// bound). The index finds a key's entry: an open-addressed table of 64-byte groups of
/// seven buckets, a keyed hash of the key choosing the home group and a 16-bit fingerprint;
/// a full group spills into the next (at most [`MAX_PROBE`] groups). A write costs one keyed
/// hash and one or two adjacent cache lines of the index (read, and its bucket written),
/// plus the entry at the back of the queue; forgetting the oldest write costs nothing in the
/// index (its bucket is free once its seq has left the queue) and finishing one nothing
/// either (the seq finds its entry). The std `HashMap` it replaced took two SipHash-1-3
/// hashes and two entry lookups a write (its admission, the removal of the write pushed
/// out), 5-7% of the target's samples under writes. What is left is the cache miss on the
/// home group, read at random: the engine hints it ([`Dedup::line`]) before computing the
/// write's digest, which takes long enough for the line to arrive (docs/PERFORMANCE.md,
/// "The duplicate-write table's cost").
///
/// Flooding: the hash is keyed by a secret drawn per table from the process's random
/// source (std's `RandomState`), so a sender cannot aim keys at one group; and whatever the
/// keys, a lookup reads at most [`MAX_PROBE`] groups, and memory is fixed by the bound. A
/// key whose groups are all full takes the bucket of the oldest write in its home group
/// (counted in `evicted`, like a write pushed out by the bound): the same loss a flood of
/// new writes causes anyway.
#[derive(Debug)]
pub(super) struct Dedup {
    cfg: DedupConfig,
    /// Entries by age, oldest first, of seqs `first..next_seq`.
    order: VecDeque<Entry>,
    /// The seq of `order`'s front.
    first: u64,
    next_seq: u64,
    /// The index (empty until the first write, and while the table is off): a power of two
    /// groups, at most 2 entries of the bound per 7 buckets: at 4 per 7 runs of four full
    /// groups were common enough that a full table at the default bound lost a few writes
    /// in 80 000 to them (`a_full_table_forgets_only_the_oldest`, 1 run in 2).
    groups: Vec<Group>,
    /// The hash's secret.
    seed: [u64; 4],
    /// Entries with `indexed` set.
    live: usize,
    /// Tests: every key's home group is this one (to fill groups and make them spill).
    #[cfg(test)]
    force_home: Option<usize>,
    /// Writes forgotten inside the window because the table was full (`entries`): a copy of
    /// one of them arriving late would be executed again. Steadily rising, the bound is too
    /// small for the write rate.
    evicted: u64,
}

/// Groups of the index for a bound of `entries` writes: five buckets in seven or more
/// free when the table is full.
fn groups_for(entries: usize) -> usize {
    entries.div_ceil(2).max(1).next_power_of_two()
}

/// The 128-bit product's halves folded together (foldhash's and wyhash's mixing step).
fn fold(x: u64, y: u64) -> u64 {
    let p = u128::from(x) * u128::from(y);
    (p as u64) ^ ((p >> 64) as u64)
}

impl Dedup {
    pub(super) fn new(cfg: DedupConfig) -> Dedup {
        let rs = RandomState::new();
        Dedup {
            cfg,
            order: VecDeque::new(),
            // Seqs start at 1, so that a bucket never written (0) never stands for a write.
            first: 1,
            next_seq: 1,
            groups: Vec::new(),
            seed: [1u8, 2, 3, 4].map(|i| rs.hash_one(i)),
            live: 0,
            evicted: 0,
            #[cfg(test)]
            force_home: None,
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
            self.groups = Vec::new();
            self.order = VecDeque::new();
            self.first = self.next_seq;
            self.live = 0;
            return;
        }
        self.expire(now);
        if !self.groups.is_empty() && self.groups.len() != groups_for(cfg.entries) {
            self.reindex();
        }
    }

    /// Entries remembered (for tests and metrics).
    pub(super) fn len(&self) -> usize {
        self.live
    }

    /// Entries forgotten for the bound while still inside the window, since the start.
    pub(super) fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Forgets entries past the window at `now` and beyond the bound.
    fn expire(&mut self, now: Option<Instant>) {
        self.expire_to(now, self.cfg.entries);
    }

    /// Forgets entries past the window at `now`, and the oldest beyond `most`. The index is
    /// not touched: a bucket whose seq left the queue is free.
    fn expire_to(&mut self, now: Option<Instant>, most: usize) {
        while let Some(e) = self.order.front() {
            let old = match (now, e.at) {
                (Some(now), Some(at)) => now.saturating_duration_since(at) >= self.cfg.window,
                _ => false,
            };
            if !old && self.order.len() <= most {
                break;
            }
            if e.indexed {
                self.live -= 1;
                if !old {
                    self.evicted += 1;
                }
            }
            self.order.pop_front();
            self.first += 1;
        }
    }

    /// The keyed hash of a key: its home group in the low bits, its fingerprint in the top 16.
    pub(super) fn hash(&self, k: &Key) -> u64 {
        let m = k.src.0;
        let a = u64::from_le_bytes([m[0], m[1], m[2], m[3], m[4], m[5], k.cmd, k.count]);
        let h = fold(a ^ self.seed[0], k.lba ^ self.seed[1]);
        fold(h ^ u64::from(k.tag) ^ self.seed[2], self.seed[3])
    }

    /// The position in `order` of the write a bucket stands for, if its seq is still there.
    fn slot_index(&self, bucket: u64) -> Option<usize> {
        // Seqs differ by less than 2^48 within the queue: the low bits are enough.
        let back = self.next_seq.wrapping_sub(bucket) & SEQ_MASK;
        let len = self.order.len() as u64;
        (back != 0 && back <= len).then(|| (len - back) as usize)
    }

    /// Where the home group of a key of hash `h` is in memory (for a prefetch), if the index
    /// is there yet.
    pub(super) fn line(&self, h: u64) -> Option<*const u8> {
        (!self.groups.is_empty()).then(|| ptr::from_ref(&self.groups[self.home(h)]).cast())
    }

    /// The home group of a key of hash `h`.
    fn home(&self, h: u64) -> usize {
        #[cfg(test)]
        if let Some(g) = self.force_home {
            return g;
        }
        h as usize & (self.groups.len() - 1)
    }

    fn group_at(&self, home: usize, step: usize) -> usize {
        (home + step) & (self.groups.len() - 1)
    }

    /// Looks a key up: where its bucket is and its entry's position in `order`, or else
    /// the first free bucket on its way if there was one, or else how many groups it read.
    fn find(&self, key: &Key, home: usize, fp: u64) -> Found {
        let mut free = None;
        for step in 0..MAX_PROBE {
            let g = &self.groups[self.group_at(home, step)];
            for (bucket, &b) in g.buckets.iter().enumerate() {
                match self.slot_index(b) {
                    Some(i) if b >> SEQ_BITS == fp => {
                        let e = &self.order[i];
                        if e.indexed && e.key == *key {
                            return Found::At(Place { step, bucket }, i);
                        }
                    }
                    Some(_) => {}
                    None => {
                        if free.is_none() {
                            free = Some(Place { step, bucket });
                        }
                    }
                }
            }
            // Nothing still remembered went past this group: the key is not further on.
            if g.spill < self.first {
                return free.map_or(Found::Full(step + 1), Found::Free);
            }
        }
        free.map_or(Found::Full(MAX_PROBE), Found::Free)
    }

    /// A free bucket for a key not in the index, in its groups not yet looked at (`from`
    /// on); else the oldest write's bucket in its home group, that write no longer indexed.
    fn make_room(&mut self, home: usize, from: usize) -> Place {
        for step in from..MAX_PROBE {
            let g = &self.groups[self.group_at(home, step)];
            if let Some(bucket) = g.buckets.iter().position(|&b| self.slot_index(b).is_none()) {
                return Place { step, bucket };
            }
        }
        let g = &self.groups[home];
        let (bucket, i) = g
            .buckets
            .iter()
            .enumerate()
            .filter_map(|(k, &b)| Some((k, self.slot_index(b)?)))
            .min_by_key(|&(_, i)| i)
            .expect("a group with no free bucket has seven in the queue");
        let e = &mut self.order[i];
        if e.indexed {
            e.indexed = false;
            self.live -= 1;
            self.evicted += 1;
        }
        Place { step: 0, bucket }
    }

    /// Points the bucket at `place` to `seq` under fingerprint `fp`, and tells the groups
    /// before it that a seq this new went past them.
    fn place(&mut self, home: usize, place: Place, fp: u64, seq: u64) {
        for step in 0..place.step {
            let g = self.group_at(home, step);
            self.groups[g].spill = seq;
        }
        let g = self.group_at(home, place.step);
        self.groups[g].buckets[place.bucket] = fp << SEQ_BITS | (seq & SEQ_MASK);
    }

    /// Builds the index anew for the current bound, from the entries in the queue.
    fn reindex(&mut self) {
        self.groups = vec![Group::default(); groups_for(self.cfg.entries)];
        for i in 0..self.order.len() {
            let e = self.order[i];
            if !e.indexed {
                continue;
            }
            let h = self.hash(&e.key);
            let home = self.home(h);
            let p = self.make_room(home, 0);
            self.place(home, p, h >> SEQ_BITS, self.first + i as u64);
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
        if self.groups.is_empty() {
            return Seen::New;
        }
        let h = self.hash(key);
        let home = self.home(h);
        match self.find(key, home, h >> SEQ_BITS) {
            Found::At(_, i) if self.order[i].digest == digest => seen(&self.order[i]),
            _ => Seen::New,
        }
    }

    /// Remembers a write about to be handed to the driver; returns the seq to finish it
    /// with.
    #[cfg(test)]
    pub(super) fn insert(&mut self, now: Option<Instant>, key: Key, digest: Digest) -> Option<u64> {
        self.admit(now, key, digest).unwrap_or_default()
    }

    /// [`admit_hashed`](Self::admit_hashed), the hash computed here.
    #[cfg(test)]
    pub(super) fn admit(
        &mut self,
        now: Option<Instant>,
        key: Key,
        digest: Digest,
    ) -> Result<Option<u64>, Seen> {
        self.admit_hashed(now, key, self.hash(&key), digest)
    }

    /// One lookup for the hot path, of a key whose [`hash`](Self::hash) is `h`: a copy of a
    /// remembered write is `Err` with what the table says of it; anything else is
    /// remembered as in flight (replacing an entry under the same key with other data) and
    /// `Ok` with the seq to finish or forget it with (`None` when the table is off).
    pub(super) fn admit_hashed(
        &mut self,
        now: Option<Instant>,
        key: Key,
        h: u64,
        digest: Digest,
    ) -> Result<Option<u64>, Seen> {
        if !self.cfg.enabled() {
            return Ok(None);
        }
        // Room for one more within the bound (so `order` never grows past it).
        self.expire_to(now, self.cfg.entries - 1);
        if self.groups.is_empty() {
            self.groups = vec![Group::default(); groups_for(self.cfg.entries)];
        }
        let home = self.home(h);
        let fp = h >> SEQ_BITS;
        let seq = self.next_seq;
        let place = match self.find(&key, home, fp) {
            Found::At(place, i) => {
                let e = &mut self.order[i];
                if e.digest == digest {
                    return Err(seen(e));
                }
                // Other data under the same key: the new write takes the key's bucket.
                e.indexed = false;
                self.live -= 1;
                place
            }
            Found::Free(free) => free,
            Found::Full(read) => self.make_room(home, read),
        };
        self.place(home, place, fp, seq);
        self.next_seq += 1;
        self.live += 1;
        self.order.push_back(Entry {
            at: now,
            key,
            digest,
            state: State::InFlight,
            indexed: true,
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
    pub(super) fn forget(&mut self, seq: u64) {
        if let Some(e) = self.entry_mut(seq) {
            if e.indexed {
                e.indexed = false;
                self.live -= 1;
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
        d.forget(s);
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

    fn key_n(n: u32) -> Key {
        Key {
            lba: u64::from(n) * 17,
            ..key(n)
        }
    }

    /// Writes as an initiator sends them, many times the bound: the index never lacks room
    /// (every write forgotten is forgotten for the bound, oldest first, none for a full
    /// group), every write of the last `entries` is found, and the index keeps its size.
    #[test]
    fn a_full_table_forgets_only_the_oldest() {
        let mut d = Dedup::new(DedupConfig::default());
        let dg = Digest::of(&[7u8; 512]);
        let n = 5 * DEFAULT_DEDUP_ENTRIES as u32;
        for t in 0..n {
            let seq = d.insert(None, key_n(t), dg).unwrap();
            d.finish(seq, 0x40, 0);
        }
        assert_eq!(d.len(), DEFAULT_DEDUP_ENTRIES);
        assert_eq!(d.evicted(), u64::from(n) - DEFAULT_DEDUP_ENTRIES as u64);
        let done = Seen::Done {
            status: 0x40,
            error: 0,
        };
        for t in n - DEFAULT_DEDUP_ENTRIES as u32..n {
            assert_eq!(d.check(None, &key_n(t), dg), done, "write {t}");
        }
        assert_eq!(
            d.check(None, &key_n(n - 1 - DEFAULT_DEDUP_ENTRIES as u32), dg),
            Seen::New
        );
        assert_eq!(d.groups.len(), groups_for(DEFAULT_DEDUP_ENTRIES));
        // The index: 64 bytes a group, 32 an entry of the bound.
        assert_eq!(std::mem::size_of::<Group>(), 64);
        assert_eq!(d.groups.len() * 64, DEFAULT_DEDUP_ENTRIES * 32);
    }

    /// Keys that all hash to one group fill it and the next three (7 buckets each), then take
    /// the oldest write's bucket in the first (counted as evicted); a key placed past full
    /// groups is still found after the writes that filled them are forgotten, also when it
    /// was replaced by a newer write under the same key.
    #[test]
    fn a_full_group_spills_into_the_next_and_no_further_than_four() {
        let t0 = Instant::now();
        let cfg = DedupConfig {
            window: Duration::from_secs(1),
            entries: 64,
        };
        let mut d = Dedup::new(cfg);
        d.force_home = Some(3);
        let (a, b) = (Digest::of(&[0xaa; 512]), Digest::of(&[0xbb; 512]));
        let span = (BUCKETS * MAX_PROBE) as u32;
        for t in 0..span {
            d.insert(Some(t0), key(t), a);
        }
        for t in 0..span {
            assert_eq!(d.check(Some(t0), &key(t), a), Seen::InFlight, "key {t}");
        }
        assert_eq!(d.evicted(), 0);
        // Four groups full: the next key takes the bucket of key 0, the oldest in group 3.
        d.insert(Some(t0), key(span), a);
        assert_eq!(d.evicted(), 1);
        assert_eq!(d.len(), span as usize);
        assert_eq!(d.check(Some(t0), &key(0), a), Seen::New);
        assert_eq!(d.check(Some(t0), &key(span), a), Seen::InFlight);
        // Key 15 sits in the third group; half a second later it is written again with
        // other data, which takes its bucket there.
        let t1 = t0 + Duration::from_millis(500);
        d.insert(Some(t1), key(15), b);
        // Past the window of the first writes: only key 15's second write is remembered,
        // found past the two groups whose own writes are all forgotten.
        let t2 = t0 + Duration::from_millis(1200);
        assert_eq!(d.check(Some(t2), &key(15), b), Seen::InFlight);
        assert_eq!(d.check(Some(t2), &key(16), a), Seen::New);
        assert_eq!(d.len(), 1);
        // The freed buckets are taken again.
        for t in 100..100 + span {
            d.insert(Some(t2), key(t), a);
        }
        assert_eq!(d.check(Some(t2), &key(15), b), Seen::InFlight);
        assert_eq!(d.check(Some(t2), &key(100 + span - 1), a), Seen::InFlight);
    }

    /// A smaller bound forgets the oldest and builds the index anew; what is kept is found.
    #[test]
    fn a_new_bound_keeps_the_newest() {
        let mut d = Dedup::new(DedupConfig::default());
        let dg = Digest::of(&[1u8; 512]);
        for t in 0..1000 {
            d.insert(None, key_n(t), dg);
        }
        let cfg = DedupConfig {
            entries: 100,
            ..DedupConfig::default()
        };
        d.set_config(cfg, None);
        assert_eq!(d.len(), 100);
        assert_eq!(d.groups.len(), groups_for(100));
        assert_eq!(d.check(None, &key_n(899), dg), Seen::New);
        for t in 900..1000 {
            assert_eq!(d.check(None, &key_n(t), dg), Seen::InFlight, "write {t}");
        }
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
