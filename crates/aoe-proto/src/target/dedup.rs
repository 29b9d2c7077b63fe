//! Writes admitted recently, so that a late copy of one never undoes a newer write.
//!
//! Ethernet may deliver a frame twice (a switch flooding while it learns, a bridge loop
//! settling, a relay with duplication). AoE writes are not idempotent once another write to
//! the same sectors has run in between: initiator writes A (tag T) to LBA X, the target
//! answers, the initiator writes B (tag T2) to X and is answered, and then the network's
//! second copy of the first frame arrives. Executed, it puts A back over B, an acknowledged
//! write, and nobody notices. vblade and the Linux driver do nothing about it.
//!
//! The target remembers each write it admitted by (source MAC, tag, ATA command, LBA, sector
//! count), for [`DedupConfig::window`] and at most [`DedupConfig::entries`] writes (oldest
//! forgotten first), in the order it admitted them. It keeps no digest of the data: a copy
//! is only harmful once a later write overlapped its sectors, and that the table can tell
//! from the writes it admitted since. A write request whose key matches a remembered write
//! E is:
//! - dropped unanswered while E is in flight (E's own reply answers the initiator);
//! - dropped unanswered, once E is answered (or was given up), if any write admitted after
//!   E overlaps E's sectors (E is *superseded*): executed, it could put E's data back over
//!   the newer write's, and the table cannot tell a copy from new data under a reused tag,
//!   so it neither executes nor answers it. A network copy is meant to be dropped; a reused
//!   tag with new data is sent again by its initiator and runs once E has left the window;
//! - executed again, once E is answered (or was given up), if no write admitted since
//!   overlaps E's sectors. They hold E's data (nothing wrote them since), so a copy writes
//!   the same data again and a reused tag writes what its initiator asked for; either way
//!   the disk ends as the initiator expects, and the request gets its own reply. It then
//!   replaces E.
//!
//! A write under a key not remembered is executed and remembered. Why executing the
//! unsuperseded copy is safe with the daemon's write fence (`aoe-target`
//! `daemon/order.rs`: a write is submitted only once every earlier-admitted overlapping
//! write completed): the fence runs overlapping writes in the order the engine admitted
//! them, on every completion path (inline file writes, staged `pwritev` runs, the worker
//! pool, io_uring, RBD, the memory store), so "no write admitted after E overlaps E" means
//! no write reached E's sectors after E, and the copy, admitted now, lands after E and
//! before any overlapping write admitted later. A write the driver never ran (over the
//! buffer count, or aborted) stays its key's write (forgotten, a late copy of its frame
//! would run as new even after the initiator had sent it again under a new tag and then
//! overwritten those sectors), and still counts as a later write when an older write's copy
//! is checked: that errs toward dropping, which never writes.
//!
//! The check costs nothing on the common path: every write is a new key, looked up and
//! remembered as before. Only a request whose key is remembered and answered walks the
//! writes admitted after its match, at most [`MAX_SCAN`] of them; behind more than that it
//! is dropped as superseded without the walk (a copy that late is a copy: no initiator
//! known reuses a tag that soon). The age queue holds every write admitted after E for as
//! long as it holds E, since it forgets oldest first, so the walk misses none.
//!
//! Tags: the Linux driver and `aoe initiator` make a tag of `(counter & 0x7fff) << 16 |
//! (milliseconds & 0xffff)`, so one MAC repeats a tag at the earliest after 65 s, far
//! outside the window, and both retransmit under a new tag (`aoecmd.c` `resend`), so a
//! remembered key from them is always a network copy. aoetools set bit 31 and count (and
//! only read); iPXE's aoe.c a 16-bit counter under a fixed high half (`AOE_TAG_MAGIC`), so a
//! tag comes back after 65536 commands, one at a time.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::ptr;
use std::time::{Duration, Instant};

use aoe_wire::{AtaRepr, MacAddr};

/// Default of [`DedupConfig::window`]: longer than any queueing delay on a LAN (a frame held
/// in a switch or a software bridge for milliseconds), and than `aoe initiator` waits for a
/// copy of a write to be presumed gone (a second, or its retransmission timeout).
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(3);

/// Default of [`DedupConfig::entries`]: about 1.25 MiB per export when full (48 bytes an
/// entry in the age queue, 32 in the index). At a sustained 120 000 writes a second (1 GB/s
/// of 8 KiB frames) it covers the last 130 ms.
pub const DEFAULT_DEDUP_ENTRIES: usize = 16384;

/// How long and how many admitted writes an export remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupConfig {
    /// A write is forgotten this long after it was admitted. Zero turns suppression off.
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
    /// ([`Engine::dedup_line`](super::Engine::dedup_line)) both hash, so the line
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

/// Most writes admitted after a remembered one that a request under its key walks to see
/// whether one of them overlapped it; behind more, the request is dropped as superseded
/// without the walk. 48 bytes an entry: the walk reads at most 48 KiB, in order (1.1 us
/// for a copy of a write behind 1024 later ones, the engines bench "write copy -> walk of
/// 1024 later writes", against 0.2 us for a whole write; on the rare path of copies only).
/// A copy this late is a network copy (at 120 000 writes a second, 1024 writes are
/// 8.5 ms), and dropping one never writes.
pub(super) const MAX_SCAN: usize = 1024;

/// How a remembered write stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Handed to the driver; no reply yet.
    InFlight,
    /// Answered (whatever its status).
    Done,
    /// Given up before it ran (over the buffer count, or the driver could not queue it).
    NotRun,
}

/// A write admitted, in [`Dedup::order`] at its seq. Its key's LBA and count are its
/// sectors, which a copy of an older write checks for overlap.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// When it was admitted (`None` in engines fed no time: never too old).
    at: Option<Instant>,
    key: Key,
    state: State,
    /// The index leads to it: it is its key's remembered write. False once a write under
    /// the same key replaced it or the index had no room for it; it then counts against
    /// the bound, and as a later write when an older one's copy is checked, until it leaves
    /// the queue.
    indexed: bool,
}

impl Entry {
    /// True if this write's sectors and `other`'s share one.
    fn overlaps(&self, other: &Key) -> bool {
        let end = |k: &Key| k.lba.saturating_add(u64::from(k.count));
        self.key.lba < end(other) && other.lba < end(&self.key)
    }
}

/// What the table says of a write request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    /// No write under its key is remembered: execute it. (Only `check`, for the tests,
    /// says so; `admit` remembers such a write at once and returns its seq instead.)
    #[cfg(test)]
    New,
    /// Its key's write was answered (or never ran) and nothing overlapped it since: execute
    /// it. (Only `check` says so; `admit` returns [`Admitted`] instead.)
    #[cfg(test)]
    Again,
    /// Its key's write is still in flight: drop it.
    InFlight,
    /// Its key's write was answered (or never ran) and a write admitted since overlaps it
    /// (or more than [`MAX_SCAN`] writes were admitted since): drop it unanswered.
    Superseded,
}

/// A write request to execute, remembered as in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Admitted {
    /// Its seq, to finish or forget it with.
    pub(super) seq: u64,
    /// It replaced an answered write under its key that nothing had overlapped since (a
    /// copy run again, or a reused tag). False for a new key, and for one whose write never
    /// ran.
    pub(super) again: bool,
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

/// The table of recently admitted writes of one export.
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
/// home group, read at random: the daemon hints it ([`Dedup::line`], through
/// `Engine::dedup_line`) for every frame of a receive batch before it handles the first,
/// so the line comes in behind the work on the frames before (docs/PERFORMANCE.md, "The
/// duplicate-write table's cost"). The queue is also the sector-range index a copy is
/// checked against ([`Dedup::overwritten_since`]): a walk from the copied write to the back.
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
    /// The time [`Dedup::cutoff`] was last computed for, and what it was.
    cutoff_at: Option<Instant>,
    cutoff: Option<Instant>,
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
            cutoff_at: None,
            cutoff: None,
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
        // The window may have changed: the cutoff is computed anew.
        self.cutoff_at = None;
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
        let cutoff = self.cutoff(now);
        while let Some(e) = self.order.front() {
            // Admitted at or before `now - window`: `now - at >= window`.
            let old = matches!((cutoff, e.at), (Some(c), Some(at)) if at <= c);
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

    /// The start of the window at `now` (`now - window`): a write admitted at or before it
    /// is past the window. Computed once for each new `now` and kept: the engine is given
    /// the time once a receive batch (`Engine::set_now`), and every write of the batch
    /// expires against the same cutoff, an `Instant` comparison, where each took two
    /// `saturating_duration_since` calls (not inlined; 0.3-0.5% of the target's samples
    /// on 1500 writes, docs/PERFORMANCE.md session 34). `None` (nothing is old) without a
    /// time, or when `now` is less than a window after the clock's origin.
    fn cutoff(&mut self, now: Option<Instant>) -> Option<Instant> {
        let now = now?;
        if self.cutoff_at != Some(now) {
            self.cutoff_at = Some(now);
            self.cutoff = now.checked_sub(self.cfg.window);
        }
        self.cutoff
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
    pub(super) fn check(&mut self, now: Option<Instant>, key: &Key) -> Seen {
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
            Found::At(_, i) => self.verdict(i).err().unwrap_or(Seen::Again),
            _ => Seen::New,
        }
    }

    /// Remembers a write about to be handed to the driver; returns the seq to finish it
    /// with (`None` if the table is off or says to drop it).
    #[cfg(test)]
    pub(super) fn insert(&mut self, now: Option<Instant>, key: Key) -> Option<u64> {
        self.admit(now, key).ok().flatten().map(|a| a.seq)
    }

    /// True if a write admitted after the one at `i` in `order` overlaps its sectors, or
    /// more than [`MAX_SCAN`] were admitted after it. Every write admitted after it is still
    /// in `order` (it forgets oldest first), those replaced under their key or forgotten
    /// unexecuted too: the answer errs only toward true.
    fn overwritten_since(&self, i: usize) -> bool {
        let later = self.order.len() - i - 1;
        if later > MAX_SCAN {
            return true;
        }
        let key = self.order[i].key;
        self.order.range(i + 1..).any(|w| w.overlaps(&key))
    }

    /// What a request under the key of the remembered write at `i` in `order` is to do:
    /// `Err` to drop it (that write in flight, or overwritten since), `Ok` to run it (the
    /// write answered or never run, and nothing overlapped it since).
    fn verdict(&self, i: usize) -> Result<(), Seen> {
        if self.order[i].state == State::InFlight {
            return Err(Seen::InFlight);
        }
        if self.overwritten_since(i) {
            return Err(Seen::Superseded);
        }
        Ok(())
    }

    /// One lookup for the hot path: a request to drop is `Err` with what the table says of
    /// it (its key's write in flight, or superseded); anything else is remembered as in
    /// flight (replacing the answered write under the same key, if there is one) and `Ok`
    /// with the seq to finish or forget it with (`None` when the table is off: nothing is
    /// hashed then).
    pub(super) fn admit(
        &mut self,
        now: Option<Instant>,
        key: Key,
    ) -> Result<Option<Admitted>, Seen> {
        if !self.cfg.enabled() {
            return Ok(None);
        }
        let h = self.hash(&key);
        // Room for one more within the bound (so `order` never grows past it).
        self.expire_to(now, self.cfg.entries - 1);
        if self.groups.is_empty() {
            self.groups = vec![Group::default(); groups_for(self.cfg.entries)];
        }
        let home = self.home(h);
        let fp = h >> SEQ_BITS;
        let seq = self.next_seq;
        let mut again = false;
        let place = match self.find(&key, home, fp) {
            Found::At(place, i) => {
                self.verdict(i)?;
                // Answered (or never run), and nothing overlapped it since: the request runs
                // and takes the key's bucket.
                again = self.order[i].state == State::Done;
                self.order[i].indexed = false;
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
            state: State::InFlight,
            indexed: true,
        });
        Ok(Some(Admitted { seq, again }))
    }

    /// Moves the writes `old` remembers, in their order and with their times and states,
    /// into this table, which must be empty (a reopened export's, before its first frame),
    /// and leaves `old` empty (a retiring export's, which admits no more writes: a reply it
    /// still sends finishes nothing). A copy of a write the export it replaces admitted is
    /// then checked as it would have been there. A write still in flight there stays in
    /// flight here, for good: a copy of it is dropped (its reply comes from the old export)
    /// until the window forgets it. This table's configuration applies from now on (its
    /// bound, its window at `now`). Moved, not copied: a reload storm that reopens the
    /// export every few milliseconds holds one table, not one per retiring instance.
    /// Returns the writes remembered.
    pub(super) fn take(&mut self, old: &mut Dedup, now: Option<Instant>) -> usize {
        if !self.cfg.enabled() || !self.order.is_empty() {
            return 0;
        }
        let cfg = self.cfg;
        let mut emptied = Dedup::new(old.cfg);
        // The retiring export's count stays its own.
        emptied.evicted = old.evicted;
        *self = std::mem::replace(old, emptied);
        self.evicted = 0;
        self.set_config(cfg, now);
        self.live
    }

    /// The write's reply went out (whatever its status).
    pub(super) fn finish(&mut self, seq: u64) {
        if let Some(e) = self.entry_mut(seq) {
            e.state = State::Done;
        }
    }

    /// The write never ran (the driver could not queue it): a copy must run.
    ///
    /// It stays its key's write: a request under the key is then taken as under an answered
    /// write (run if nothing overlapped it since, else dropped). Forgetting the key instead
    /// would run any later copy as new, also after an overlapping write: the initiator
    /// retransmits the write under a new tag, writes those sectors anew once answered, and
    /// the network's copy of the first frame would then put the old data back. And it still
    /// counts as a later write when an older one's copy is checked (it errs toward dropping).
    pub(super) fn forget(&mut self, seq: u64) {
        if let Some(e) = self.entry_mut(seq) {
            if e.state == State::InFlight {
                e.state = State::NotRun;
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

    /// The key of a two-sector write at LBA 100 under `tag` (all such writes overlap).
    fn key(tag: u32) -> Key {
        Key {
            src: MacAddr([2, 0, 0, 0, 0, 1]),
            tag,
            cmd: 0x34,
            count: 2,
            lba: 100,
        }
    }

    /// A write of `count` sectors at `lba` under `tag`.
    fn key_at(tag: u32, lba: u64, count: u8) -> Key {
        Key {
            lba,
            count,
            ..key(tag)
        }
    }

    fn done(d: &mut Dedup, seq: u64) {
        d.finish(seq);
    }

    #[test]
    fn a_copy_is_dropped_in_flight_and_runs_again_once_answered() {
        let mut d = Dedup::new(DedupConfig::default());
        let t0 = Instant::now();
        assert_eq!(d.check(Some(t0), &key(7)), Seen::New);
        let seq = d.insert(Some(t0), key(7)).unwrap();
        assert_eq!(d.check(Some(t0), &key(7)), Seen::InFlight);
        assert_eq!(d.admit(Some(t0), key(7)), Err(Seen::InFlight));
        d.finish(seq);
        // Answered (even with an error), nothing written over it since: run it again.
        assert_eq!(d.check(Some(t0), &key(7)), Seen::Again);
        let again = d.admit(Some(t0), key(7)).unwrap().unwrap();
        assert!(again.again);
        assert_eq!(d.len(), 1, "the copy replaced the write under its key");
        assert_eq!(d.check(Some(t0), &key(7)), Seen::InFlight);
        done(&mut d, again.seq);
        // Another tag: a new write.
        assert_eq!(d.check(Some(t0), &key(8)), Seen::New);
        // Past the window: forgotten.
        let later = t0 + DEFAULT_DEDUP_WINDOW;
        assert_eq!(d.check(Some(later), &key(7)), Seen::New);
        assert_eq!(d.len(), 0);
    }

    /// A write is forgotten when a full window has passed since its admission, not a
    /// nanosecond earlier; the window's start is kept for a time already seen, and a new
    /// window applies at once, at that same time. (The kept start, without its reset in
    /// `set_config`, still forgot by the old window: the last check below said `InFlight`.)
    #[test]
    fn the_window_ends_exactly_and_a_new_window_applies_at_the_same_time() {
        let mut d = Dedup::new(DedupConfig::default());
        let t0 = Instant::now();
        d.insert(Some(t0), key(7)).unwrap();
        let edge = t0 + DEFAULT_DEDUP_WINDOW;
        let just_before = edge - Duration::from_nanos(1);
        assert_eq!(d.check(Some(just_before), &key(7)), Seen::InFlight);
        // The same time again: the same verdict from the kept start.
        assert_eq!(d.check(Some(just_before), &key(7)), Seen::InFlight);
        assert_eq!(d.check(Some(edge), &key(7)), Seen::New);
        // A shorter window at a time the table has seen already.
        d.insert(Some(edge), key(8)).unwrap();
        let t1 = edge + Duration::from_millis(1500);
        assert_eq!(d.check(Some(t1), &key(8)), Seen::InFlight);
        d.set_config(
            DedupConfig {
                window: Duration::from_secs(1),
                ..DedupConfig::default()
            },
            None,
        );
        assert_eq!(d.check(Some(t1), &key(8)), Seen::New);
    }

    /// A reopened export's table takes the old one's writes: a copy of an answered write
    /// overlapped since is still dropped, one of a write still in flight on the old export
    /// too (its reply comes from there), one of an answered write nothing overlapped runs
    /// again; the window still counts from each write's admission, and only an empty table
    /// takes them. Before `take`, the new table said `New` to all three.
    #[test]
    fn a_reopened_table_keeps_the_old_ones_verdicts() {
        let t0 = Instant::now();
        let mut old = Dedup::new(DedupConfig::default());
        let w1 = old.insert(Some(t0), key_at(1, 100, 2)).unwrap();
        old.finish(w1);
        let w2 = old.insert(Some(t0), key_at(2, 100, 2)).unwrap();
        old.finish(w2);
        old.insert(Some(t0), key_at(3, 500, 2)).unwrap();
        let w4 = old.insert(Some(t0), key_at(4, 900, 2)).unwrap();
        old.finish(w4);
        let mut new = Dedup::new(DedupConfig::default());
        assert_eq!(new.check(Some(t0), &key_at(1, 100, 2)), Seen::New);
        let w3 = 3;
        assert_eq!(new.take(&mut old, Some(t0)), 4);
        assert_eq!(new.len(), 4);
        // The old table is empty, and a reply it still sends finishes nothing here.
        assert_eq!(old.len(), 0);
        old.finish(w3);
        assert_eq!(old.check(Some(t0), &key_at(1, 100, 2)), Seen::New);
        assert_eq!(new.check(Some(t0), &key_at(1, 100, 2)), Seen::Superseded);
        assert_eq!(new.check(Some(t0), &key_at(3, 500, 2)), Seen::InFlight);
        assert_eq!(new.check(Some(t0), &key_at(4, 900, 2)), Seen::Again);
        // Later writes in the new table are checked against the inherited ones.
        let w5 = new.insert(Some(t0), key_at(5, 901, 1)).unwrap();
        new.finish(w5);
        assert_eq!(new.check(Some(t0), &key_at(4, 900, 2)), Seen::Superseded);
        // Not into a table in use.
        let mut other = Dedup::new(DedupConfig::default());
        other.insert(Some(t0), key_at(9, 0, 1)).unwrap();
        assert_eq!(new.take(&mut other, Some(t0)), 0);
        assert_eq!(other.len(), 1);
        // The window runs from the old admissions.
        let later = t0 + DEFAULT_DEDUP_WINDOW;
        let mut newer = Dedup::new(DedupConfig::default());
        assert_eq!(newer.take(&mut new, Some(later)), 0);
        assert_eq!(newer.check(Some(later), &key_at(1, 100, 2)), Seen::New);
    }

    /// The integrity property: A answered, then B overlapping A admitted (from any source,
    /// in flight or answered): a copy of A is dropped, never run, and stays dropped while A
    /// is remembered.
    #[test]
    fn a_copy_after_an_overlapping_later_write_is_dropped() {
        for b_done in [false, true] {
            let mut d = Dedup::new(DedupConfig::default());
            let a = d.insert(None, key_at(1, 100, 4)).unwrap();
            done(&mut d, a);
            let other = Key {
                src: MacAddr([2, 0, 0, 0, 0, 9]),
                ..key_at(2, 102, 1)
            };
            let b = d.insert(None, other).unwrap();
            if b_done {
                done(&mut d, b);
            }
            assert_eq!(d.check(None, &key_at(1, 100, 4)), Seen::Superseded);
            assert_eq!(d.admit(None, key_at(1, 100, 4)), Err(Seen::Superseded));
            assert_eq!(d.admit(None, key_at(1, 100, 4)), Err(Seen::Superseded));
            assert_eq!(d.len(), 2);
        }
    }

    /// Overlap is of sectors: one shared sector at either end supersedes; writes that only
    /// touch A's range (end to start) or lie elsewhere do not.
    #[test]
    fn partial_overlap_supersedes_and_adjacent_writes_do_not() {
        for (lba, count, superseded) in [
            (96, 5, true),   // 96..101 shares sector 100
            (103, 17, true), // 103..120 shares sector 103
            (101, 1, true),  // inside
            (90, 30, true),  // covers A
            (96, 4, false),  // 96..100 ends where A starts
            (104, 8, false), // starts where A ends
            (5000, 17, false),
        ] {
            let mut d = Dedup::new(DedupConfig::default());
            let a = d.insert(None, key_at(1, 100, 4)).unwrap();
            done(&mut d, a);
            let b = d.insert(None, key_at(2, lba, count)).unwrap();
            done(&mut d, b);
            let want = if superseded {
                Seen::Superseded
            } else {
                Seen::Again
            };
            assert_eq!(
                d.check(None, &key_at(1, 100, 4)),
                want,
                "B at {lba}+{count}"
            );
        }
    }

    /// A write the driver never ran (forgotten) still counts as a later write: the check
    /// errs toward dropping. It stays its key's write: a request under its key runs while
    /// nothing overlapped it since (it never ran), and is dropped after an overlapping write
    /// (the initiator sent it again under a new tag, then wrote the sectors anew: a network
    /// copy of the first frame must not put the old data back).
    #[test]
    fn a_forgotten_write_supersedes_and_is_superseded() {
        let mut d = Dedup::new(DedupConfig::default());
        let a = d.insert(None, key_at(1, 0, 2)).unwrap();
        done(&mut d, a);
        let w = d.insert(None, key_at(2, 1, 2)).unwrap();
        d.forget(w);
        assert_eq!(d.check(None, &key_at(1, 0, 2)), Seen::Superseded);
        assert_eq!(d.check(None, &key_at(2, 1, 2)), Seen::Again);
        assert_eq!(d.len(), 2);
        // Its retransmission (another tag) ran, then a newer write to its sectors.
        let w2 = d.insert(None, key_at(3, 1, 2)).unwrap();
        done(&mut d, w2);
        assert_eq!(d.check(None, &key_at(2, 1, 2)), Seen::Superseded);
        // A request under the key of a forgotten write that replaced an answered one (a copy
        // run again but over the buffer count) is checked the same way.
        let b = d.insert(None, key_at(4, 50, 1)).unwrap();
        done(&mut d, b);
        let again = d.admit(None, key_at(4, 50, 1)).unwrap().unwrap();
        assert!(again.again);
        d.forget(again.seq);
        assert_eq!(d.check(None, &key_at(4, 50, 1)), Seen::Again);
        let c = d.insert(None, key_at(5, 50, 1)).unwrap();
        done(&mut d, c);
        assert_eq!(d.check(None, &key_at(4, 50, 1)), Seen::Superseded);
    }

    /// The walk is bounded: behind exactly [`MAX_SCAN`] later writes that do not overlap,
    /// a copy runs again; behind one more, it is dropped without the walk.
    #[test]
    fn the_walk_stops_at_max_scan() {
        let cfg = DedupConfig {
            window: Duration::from_secs(60),
            entries: 4 * MAX_SCAN,
        };
        for (later, want) in [(MAX_SCAN, Seen::Again), (MAX_SCAN + 1, Seen::Superseded)] {
            let mut d = Dedup::new(cfg);
            let a = d.insert(None, key_at(0, 0, 1)).unwrap();
            done(&mut d, a);
            for t in 1..=later as u32 {
                d.insert(None, key_at(t, 10 + u64::from(t), 1)).unwrap();
            }
            assert_eq!(d.check(None, &key_at(0, 0, 1)), want, "{later} later");
        }
    }

    /// Eviction: the queue forgets oldest first, so a write is never remembered without the
    /// writes admitted after it. Past the bound, A and then the write that superseded it
    /// are forgotten (a copy then runs as new, counted in `evicted`, as before).
    #[test]
    fn eviction_forgets_the_superseded_before_what_superseded_it() {
        let cfg = DedupConfig {
            window: Duration::from_secs(60),
            entries: 8,
        };
        let mut d = Dedup::new(cfg);
        let a = d.insert(None, key_at(1, 0, 2)).unwrap();
        done(&mut d, a);
        let b = d.insert(None, key_at(2, 0, 2)).unwrap();
        done(&mut d, b);
        assert_eq!(d.check(None, &key_at(1, 0, 2)), Seen::Superseded);
        for t in 10..16 {
            d.insert(None, key_at(t, 100 * u64::from(t), 1)).unwrap();
        }
        assert_eq!(d.len(), 8);
        assert_eq!(d.check(None, &key_at(1, 0, 2)), Seen::Superseded);
        d.insert(None, key_at(16, 1600, 1)).unwrap();
        assert_eq!(d.evicted(), 1);
        assert_eq!(d.check(None, &key_at(1, 0, 2)), Seen::New);
        // B, the newer, is still there, and nothing overlapped it since: it runs again.
        assert_eq!(d.check(None, &key_at(2, 0, 2)), Seen::Again);
        d.insert(None, key_at(17, 1700, 1)).unwrap();
        assert_eq!(d.check(None, &key_at(2, 0, 2)), Seen::New);
        assert_eq!(d.order.len(), 8);
    }

    #[test]
    fn bounded_whatever_the_flood() {
        let cfg = DedupConfig {
            window: Duration::from_secs(60),
            entries: 64,
        };
        let mut d = Dedup::new(cfg);
        for tag in 0..10_000 {
            // Random-looking keys over the whole disk, and the same key over and over.
            let lba = u64::from(tag).wrapping_mul(0x9e37_79b9) % 1_000_000;
            if let Some(s) = d.insert(None, key_at(tag, lba, 17)) {
                done(&mut d, s);
            }
            if let Some(s) = d.insert(None, key_at(5, 7, 1)) {
                done(&mut d, s);
            }
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
        assert_eq!(d.groups.len(), groups_for(64));
        // The newest are kept.
        assert_eq!(d.check(None, &key_at(5, 7, 1)), Seen::Again);
        assert_eq!(d.check(None, &key_at(0, 0, 17)), Seen::New);
    }

    #[test]
    fn a_forgotten_write_runs_again_and_off_means_off() {
        let mut d = Dedup::new(DedupConfig::default());
        let s = d.insert(None, key(1)).unwrap();
        d.forget(s);
        assert_eq!(d.check(None, &key(1)), Seen::Again);
        let s = d.admit(None, key(1)).unwrap().unwrap();
        assert!(
            !s.again,
            "its key's write never ran: not counted as run again"
        );
        d.set_config(
            DedupConfig {
                window: Duration::ZERO,
                ..DedupConfig::default()
            },
            None,
        );
        assert_eq!(d.admit(None, key(1)), Ok(None));
        assert_eq!(d.check(None, &key(1)), Seen::New);
    }

    /// A write is finished by its seq alone: the reply of a write replaced since (its copy
    /// run again) must not mark the newer one answered, one pushed out of the table is
    /// ignored, and seqs keep finding their entries across evictions and a table turned off
    /// and on again.
    #[test]
    fn finish_by_seq_marks_only_its_own_write() {
        let cfg = DedupConfig {
            window: Duration::from_secs(60),
            entries: 4,
        };
        let mut d = Dedup::new(cfg);
        let old = d.insert(None, key(1)).unwrap();
        done(&mut d, old);
        let new = d.insert(None, key(1)).unwrap();
        d.finish(old);
        assert_eq!(d.check(None, &key(1)), Seen::InFlight);
        done(&mut d, new);
        assert_eq!(d.check(None, &key(1)), Seen::Again);
        // Push both out (bound 4), then finish the evicted one: nothing changes, and the
        // newest entries are found by their seqs.
        let mut last = 0;
        for tag in 10..20 {
            last = d.insert(None, key_at(tag, 17 * u64::from(tag), 1)).unwrap();
        }
        d.finish(new);
        assert_eq!(d.check(None, &key(1)), Seen::New);
        assert_eq!(d.check(None, &key_at(19, 17 * 19, 1)), Seen::InFlight);
        done(&mut d, last);
        assert_eq!(d.check(None, &key_at(19, 17 * 19, 1)), Seen::Again);
        assert_eq!(d.check(None, &key_at(18, 17 * 18, 1)), Seen::InFlight);
        // Off and on again: new seqs, found as before.
        d.set_config(DedupConfig { entries: 0, ..cfg }, None);
        d.set_config(cfg, None);
        let s = d.insert(None, key(1)).unwrap();
        assert_eq!(d.check(None, &key(1)), Seen::InFlight);
        done(&mut d, s);
        assert_eq!(d.check(None, &key(1)), Seen::Again);
    }

    fn key_n(n: u32) -> Key {
        key_at(n, u64::from(n) * 17, 2)
    }

    /// Writes as an initiator sends them, many times the bound: the index never lacks room
    /// (every write forgotten is forgotten for the bound, oldest first, none for a full
    /// group), every write of the last `entries` is found, and the index keeps its size.
    #[test]
    fn a_full_table_forgets_only_the_oldest() {
        let mut d = Dedup::new(DedupConfig::default());
        let n = 5 * DEFAULT_DEDUP_ENTRIES as u32;
        for t in 0..n {
            let seq = d.insert(None, key_n(t)).unwrap();
            done(&mut d, seq);
        }
        assert_eq!(d.len(), DEFAULT_DEDUP_ENTRIES);
        assert_eq!(d.evicted(), u64::from(n) - DEFAULT_DEDUP_ENTRIES as u64);
        // Found: the newest MAX_SCAN run again, the older ones are behind too many.
        for t in n - DEFAULT_DEDUP_ENTRIES as u32..n {
            let want = if t >= n - 1 - MAX_SCAN as u32 {
                Seen::Again
            } else {
                Seen::Superseded
            };
            assert_eq!(d.check(None, &key_n(t)), want, "write {t}");
        }
        assert_eq!(
            d.check(None, &key_n(n - 1 - DEFAULT_DEDUP_ENTRIES as u32)),
            Seen::New
        );
        assert_eq!(d.groups.len(), groups_for(DEFAULT_DEDUP_ENTRIES));
        // The index: 64 bytes a group, 32 an entry of the bound; the queue 48 an entry.
        assert_eq!(std::mem::size_of::<Group>(), 64);
        assert_eq!(d.groups.len() * 64, DEFAULT_DEDUP_ENTRIES * 32);
        assert_eq!(std::mem::size_of::<Entry>(), 48);
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
        let span = (BUCKETS * MAX_PROBE) as u32;
        let seqs: Vec<u64> = (0..span)
            .map(|t| d.insert(Some(t0), key_n(t)).unwrap())
            .collect();
        for t in 0..span {
            assert_eq!(d.check(Some(t0), &key_n(t)), Seen::InFlight, "key {t}");
        }
        assert_eq!(d.evicted(), 0);
        // Four groups full: the next key takes the bucket of key 0, the oldest in group 3.
        d.insert(Some(t0), key_n(span));
        assert_eq!(d.evicted(), 1);
        assert_eq!(d.len(), span as usize);
        assert_eq!(d.check(Some(t0), &key_n(0)), Seen::New);
        assert_eq!(d.check(Some(t0), &key_n(span)), Seen::InFlight);
        // Key 15 sits in the third group; answered, and half a second later written again
        // (nothing overlapped it), which takes its bucket there.
        d.finish(seqs[15]);
        assert_eq!(d.check(Some(t0), &key_n(15)), Seen::Again);
        let t1 = t0 + Duration::from_millis(500);
        assert!(d.admit(Some(t1), key_n(15)).unwrap().unwrap().again);
        // Past the window of the first writes: only key 15's second write is remembered,
        // found past the two groups whose own writes are all forgotten.
        let t2 = t0 + Duration::from_millis(1200);
        assert_eq!(d.check(Some(t2), &key_n(15)), Seen::InFlight);
        assert_eq!(d.check(Some(t2), &key_n(16)), Seen::New);
        assert_eq!(d.len(), 1);
        // The freed buckets are taken again.
        for t in 100..100 + span {
            d.insert(Some(t2), key_n(t));
        }
        assert_eq!(d.check(Some(t2), &key_n(15)), Seen::InFlight);
        assert_eq!(d.check(Some(t2), &key_n(100 + span - 1)), Seen::InFlight);
    }

    /// A smaller bound forgets the oldest and builds the index anew; what is kept is found.
    #[test]
    fn a_new_bound_keeps_the_newest() {
        let mut d = Dedup::new(DedupConfig::default());
        for t in 0..1000 {
            d.insert(None, key_n(t));
        }
        let cfg = DedupConfig {
            entries: 100,
            ..DedupConfig::default()
        };
        d.set_config(cfg, None);
        assert_eq!(d.len(), 100);
        assert_eq!(d.groups.len(), groups_for(100));
        assert_eq!(d.check(None, &key_n(899)), Seen::New);
        for t in 900..1000 {
            assert_eq!(d.check(None, &key_n(t)), Seen::InFlight, "write {t}");
        }
    }
}
