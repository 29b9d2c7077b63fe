//! The frames outstanding, by tag ([`Frames`]): a flat table indexed from the tag
//! ([`TagMap`]) and a sorted queue of their deadlines, so that an answer finds its frame in
//! O(1) without a tree walk and [`Engine::poll_timeout`] reads the earliest deadline without
//! looking at every frame.
//!
//! The tags keep the Linux driver's format, `(++lasttag & 0x7fff) << 16 | (ticks & 0xffff)`
//! (`newtag` in `aoecmd.c`; `docs/PROTOCOL.md` 2.4): a target's duplicate table keys on the
//! tag, so the format and its uniqueness over seconds stay as they were. The table only
//! reads the counter in the tag's high half as the slot: frames sent one after another
//! take slots one after another, and a window of frames never shares a slot while it is
//! smaller than the table.

use std::collections::VecDeque;
use std::time::Instant;

use super::device::Outstanding;

/// Fewest slots a [`TagMap`] has: twice the default window (`maxout` 128) would need 256
/// at half load; the table grows past it only for more frames out at once.
const MIN_SLOTS: usize = 256;

/// A map from tag to `V` in one flat array of slots (open addressing, linear probing with
/// Robin Hood insertion), the slot of a tag being its counter bits (`tag.rotate_left(16)`,
/// masked). At most half full: it doubles before that. Robin Hood keeps every run of
/// slots ordered by home slot, so a lookup stops at the first entry nearer its home than
/// the tag would be, and a removal shifts back only the entries behind it that are away
/// from their home (no tombstones): the frames of a window, at home one after another,
/// cost one slot each. No allocation per entry; iteration is in slot order.
#[derive(Debug, Clone)]
pub(super) struct TagMap<V> {
    slots: Vec<Option<(u32, V)>>,
    len: usize,
}

impl<V> Default for TagMap<V> {
    fn default() -> Self {
        TagMap::new()
    }
}

impl<V> TagMap<V> {
    pub(super) fn new() -> TagMap<V> {
        TagMap {
            slots: Vec::new(),
            len: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    /// The slot `tag` hashes to: the driver's counter (bits 16..31) in the low bits, the
    /// ticks above them, for tables of more than 32768 slots.
    fn home(&self, tag: u32) -> usize {
        tag.rotate_left(16) as usize & self.mask()
    }

    /// How far slot `i` lies past the home of `tag`.
    fn dist(&self, tag: u32, i: usize) -> usize {
        i.wrapping_sub(self.home(tag)) & self.mask()
    }

    /// The slot holding `tag`, if any.
    fn find(&self, tag: u32) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let mask = self.mask();
        let mut i = self.home(tag);
        let mut d = 0;
        loop {
            match &self.slots[i] {
                None => return None,
                Some((t, _)) if *t == tag => return Some(i),
                // Runs are ordered by home: `tag` would have taken this slot.
                Some((t, _)) if self.dist(*t, i) < d => return None,
                Some(_) => {
                    i = (i + 1) & mask;
                    d += 1;
                }
            }
        }
    }

    pub(super) fn contains_key(&self, tag: u32) -> bool {
        self.find(tag).is_some()
    }

    pub(super) fn get(&self, tag: u32) -> Option<&V> {
        let i = self.find(tag)?;
        self.slots[i].as_ref().map(|(_, v)| v)
    }

    pub(super) fn get_mut(&mut self, tag: u32) -> Option<&mut V> {
        let i = self.find(tag)?;
        self.slots[i].as_mut().map(|(_, v)| v)
    }

    /// Inserts `v` under `tag`, returning the value it replaces.
    pub(super) fn insert(&mut self, tag: u32, v: V) -> Option<V> {
        if let Some(i) = self.find(tag) {
            return self.slots[i].replace((tag, v)).map(|(_, old)| old);
        }
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mask = self.mask();
        let mut cur = (tag, v);
        let mut i = self.home(tag);
        let mut d = 0;
        loop {
            let here = self.slots[i].as_ref().map(|(t, _)| self.dist(*t, i));
            match here {
                None => {
                    self.slots[i] = Some(cur);
                    self.len += 1;
                    return None;
                }
                // Robin Hood: the entry nearer its home gives its slot up and moves on.
                Some(e) if e < d => {
                    if let Some(slot) = self.slots[i].as_mut() {
                        std::mem::swap(slot, &mut cur);
                    }
                    d = e;
                }
                Some(_) => {}
            }
            i = (i + 1) & mask;
            d += 1;
        }
    }

    fn grow(&mut self) {
        let n = (self.slots.len() * 2).max(MIN_SLOTS);
        let old = std::mem::replace(&mut self.slots, (0..n).map(|_| None).collect());
        self.len = 0;
        for (tag, v) in old.into_iter().flatten() {
            self.insert(tag, v);
        }
    }

    pub(super) fn remove(&mut self, tag: u32) -> Option<V> {
        let mut hole = self.find(tag)?;
        let (_, v) = self.slots[hole].take()?;
        self.len -= 1;
        // Backward shift: the entries behind it that are away from their home move one
        // slot nearer, up to an empty slot or an entry at home.
        let mask = self.mask();
        loop {
            let j = (hole + 1) & mask;
            match &self.slots[j] {
                Some((t, _)) if self.dist(*t, j) > 0 => {
                    self.slots[hole] = self.slots[j].take();
                    hole = j;
                }
                _ => break,
            }
        }
        Some(v)
    }

    /// Robin Hood's invariant, which lookups and removals rely on: an entry away from its
    /// home has the slot before it taken by one no nearer its own home, less one.
    #[cfg(test)]
    fn check_runs(&self) -> bool {
        let mask = self.mask();
        (0..self.slots.len()).all(|i| match &self.slots[i] {
            Some((t, _)) if self.dist(*t, i) > 0 => {
                let p = i.wrapping_sub(1) & mask;
                self.slots[p]
                    .as_ref()
                    .is_some_and(|(u, _)| self.dist(*u, p) + 1 >= self.dist(*t, i))
            }
            _ => true,
        })
    }

    /// Keeps the entries for which `keep` is true.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(u32, &mut V) -> bool) {
        let gone: Vec<u32> = self
            .slots
            .iter_mut()
            .flatten()
            .filter_map(|(t, v)| (!keep(*t, v)).then_some(*t))
            .collect();
        for t in gone {
            self.remove(t);
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, &V)> + '_ {
        self.slots.iter().flatten().map(|(t, v)| (*t, v))
    }

    #[cfg(test)]
    pub(super) fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.slots.iter().flatten().map(|(_, v)| v)
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut V> + '_ {
        self.slots.iter_mut().flatten().map(|(_, v)| v)
    }
}

/// The frames outstanding ([`Outstanding`]) by tag, with their deadlines in a sorted queue.
///
/// The queue holds `(deadline, tag)` for every frame, in order, and stale entries besides
/// (of frames answered or whose deadline moved since), which are dropped when they come to
/// the front: every change that can make the front stale ([`Frames::remove`],
/// [`Frames::set_deadline`], [`Frames::retain`]) drops them, so the front is always a live
/// frame's deadline and the earliest ([`Frames::next_deadline`]). A frame's deadline
/// changes only through [`Frames::set_deadline`]; [`Frames::get_mut`] is for its other
/// fields. The frames of a target are sent in order with one RTO, so a new deadline is
/// nearly always the latest and goes to the back, and frames are answered about in the
/// order sent, so the front is what most answers remove: O(1) each, with no scan. A
/// deadline out of order (an RTO that shrank, a timer moved) is put in its place by a
/// binary search. Stale entries behind a live front are bounded by a rebuild once they
/// outnumber the frames.
#[derive(Debug, Default)]
pub(super) struct Frames {
    map: TagMap<Outstanding>,
    deadlines: TimeQueue,
}

impl Frames {
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    pub(super) fn contains_key(&self, tag: u32) -> bool {
        self.map.contains_key(tag)
    }

    pub(super) fn get(&self, tag: u32) -> Option<&Outstanding> {
        self.map.get(tag)
    }

    /// The frame under `tag`, to change anything but its deadline ([`Frames::set_deadline`]).
    pub(super) fn get_mut(&mut self, tag: u32) -> Option<&mut Outstanding> {
        self.map.get_mut(tag)
    }

    pub(super) fn insert(&mut self, tag: u32, f: Outstanding) {
        self.queue(f.deadline, tag);
        if self.map.insert(tag, f).is_some() {
            self.trim();
        }
    }

    pub(super) fn remove(&mut self, tag: u32) -> Option<Outstanding> {
        let f = self.map.remove(tag)?;
        self.trim();
        Some(f)
    }

    pub(super) fn set_deadline(&mut self, tag: u32, deadline: Instant) {
        let Some(f) = self.map.get_mut(tag) else {
            return;
        };
        if f.deadline == deadline {
            return;
        }
        f.deadline = deadline;
        self.queue(deadline, tag);
        self.trim();
    }

    pub(super) fn retain(&mut self, keep: impl FnMut(u32, &mut Outstanding) -> bool) {
        self.map.retain(keep);
        self.rebuild();
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, &Outstanding)> + '_ {
        self.map.iter()
    }

    #[cfg(test)]
    pub(super) fn values(&self) -> impl Iterator<Item = &Outstanding> + '_ {
        self.map.values()
    }

    /// Every frame, to change anything but its deadline.
    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut Outstanding> + '_ {
        self.map.values_mut()
    }

    /// The earliest deadline of a frame outstanding.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let top = self.deadlines.front();
        #[cfg(test)]
        assert_eq!(
            top,
            self.map.values().map(|f| f.deadline).min(),
            "the deadline queue's top is not the earliest deadline"
        );
        top
    }

    /// The tags of the frames whose deadline is `now` or earlier, in tag order (the order
    /// the frames were handled in when they were found by a scan of a tree keyed by tag).
    /// Their entries leave the queue: the caller either moves each one's deadline
    /// ([`Frames::set_deadline`]), removes it, or puts it back ([`Frames::requeue`]).
    pub(super) fn take_expired(&mut self, now: Instant) -> Vec<u32> {
        let mut due = Vec::new();
        while let Some((d, tag)) = self.deadlines.front_entry() {
            if d > now {
                break;
            }
            self.deadlines.pop_front();
            if self.map.get(tag).is_some_and(|f| f.deadline == d) {
                due.push(tag);
            }
        }
        self.trim();
        due.sort_unstable();
        due.dedup();
        due
    }

    /// Puts frame `tag`'s deadline back in the queue (after [`Frames::take_expired`], for
    /// a frame whose deadline did not move).
    pub(super) fn requeue(&mut self, tag: u32) {
        if let Some(d) = self.map.get(tag).map(|f| f.deadline) {
            self.queue(d, tag);
        }
    }

    fn queue(&mut self, deadline: Instant, tag: u32) {
        self.deadlines.push(deadline, tag);
    }

    /// Drops stale entries from the front; rebuilds the queue once stale entries outnumber
    /// the frames.
    fn trim(&mut self) {
        let map = &self.map;
        self.deadlines.tidy(
            map.len(),
            |d, tag| map.get(tag).is_some_and(|f| f.deadline == d),
            || map.iter().map(|(t, f)| (f.deadline, t)),
        );
    }

    fn rebuild(&mut self) {
        self.deadlines
            .rebuild(self.map.iter().map(|(t, f)| (f.deadline, t)));
    }
}

/// Instants with the tag each belongs to, in order (then by tag), for a min-queue whose
/// owner drops entries that went stale (`TimeQueue::trim`) instead of finding them to
/// remove. Made for times that come in about in order: a frame's deadline, a write copy's
/// fence end (`Engine::fences`).
#[derive(Debug, Default)]
pub(super) struct TimeQueue(VecDeque<(Instant, u32)>);

impl TimeQueue {
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }

    /// The earliest instant.
    pub(super) fn front(&self) -> Option<Instant> {
        self.0.front().map(|(at, _)| *at)
    }

    fn front_entry(&self) -> Option<(Instant, u32)> {
        self.0.front().copied()
    }

    fn pop_front(&mut self) {
        self.0.pop_front();
    }

    /// Puts `(at, tag)` in its place: at the back unless it is earlier than the last. The
    /// RTO moves with every sample, so a new frame's deadline is often a little earlier
    /// than the one before: its place is found from the back, a few entries at most (a
    /// binary search over the whole queue, which such a deadline cost before, was 0.7% of
    /// the network thread on NBD reads), by a binary search past that.
    pub(super) fn push(&mut self, at: Instant, tag: u32) {
        let q = &mut self.0;
        let e = (at, tag);
        let n = q.len();
        let mut i = n;
        while i > 0 && n - i < 8 && q[i - 1] > e {
            i -= 1;
        }
        if i > 0 && n - i == 8 && q[i - 1] > e {
            i = q.partition_point(|x| *x <= e);
        }
        q.insert(i, e);
    }

    /// Drops entries from the front while `live` says they are stale, so the front is the
    /// earliest live entry; once the queue holds more than twice `live_count` entries (and
    /// 64 more), stale ones behind a live front among them, rebuilds it from `all`, every
    /// live entry. Its owner runs this after every change that can leave an entry stale.
    pub(super) fn tidy<I: Iterator<Item = (Instant, u32)>>(
        &mut self,
        live_count: usize,
        live: impl Fn(Instant, u32) -> bool,
        all: impl FnOnce() -> I,
    ) {
        while let Some(&(at, tag)) = self.0.front() {
            if live(at, tag) {
                break;
            }
            self.0.pop_front();
        }
        if self.0.len() > 2 * live_count + 64 {
            self.rebuild(all());
        }
    }

    /// The queue made again from `entries` alone.
    pub(super) fn rebuild(&mut self, entries: impl Iterator<Item = (Instant, u32)>) {
        let mut v = Vec::from(std::mem::take(&mut self.0));
        v.clear();
        v.extend(entries);
        v.sort_unstable();
        self.0 = VecDeque::from(v);
    }

    #[cfg(test)]
    fn sorted(&self) -> bool {
        self.0
            .iter()
            .zip(self.0.iter().skip(1))
            .all(|(a, b)| a <= b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::initiator::device::Outstanding;
    use aoe_wire::{MacAddr, TargetAddr};
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    /// The driver's tag for counter `n` at `ticks` ms.
    fn tag(n: u32, ticks: u32) -> u32 {
        ((n & 0x7fff) << 16) | (ticks & 0xffff)
    }

    fn frame(deadline: Instant) -> Outstanding {
        Outstanding {
            dev: TargetAddr { shelf: 1, slot: 1 },
            op: 0,
            target: MacAddr([2, 0, 0, 0, 0, 1]),
            iface: 0,
            offset: 0,
            count: 1,
            sent: deadline,
            first_sent: deadline,
            deadline,
            retransmits: 0,
            seq: 0,
            later_answered: 0,
            after_silence: false,
            earlier: Vec::new(),
            waiting: None,
        }
    }

    /// Consecutive tags of a window take consecutive slots: no two share a run.
    #[test]
    fn a_window_of_consecutive_tags_takes_one_slot_each() {
        let mut m = TagMap::new();
        for n in 100..228 {
            m.insert(tag(n, 7), n);
        }
        for n in 100..228 {
            let home = m.home(tag(n, 7));
            assert_eq!(
                m.find(tag(n, 7)),
                Some(home),
                "tag {n} not in its home slot"
            );
        }
    }

    /// Filled far past its first size, it grows and keeps every entry; removed, each is
    /// gone and the others stay.
    #[test]
    fn a_full_table_grows_and_keeps_every_entry() {
        let mut m = TagMap::new();
        let n = 40_000u32;
        for i in 0..n {
            // More entries than the counter has values: the ticks tell them apart.
            assert_eq!(m.insert(tag(i, i >> 15), i), None);
        }
        assert_eq!(m.len(), n as usize);
        assert!(m.slots.len() >= 2 * n as usize, "at most half full");
        for i in 0..n {
            assert_eq!(m.get(tag(i, i >> 15)), Some(&i));
        }
        for i in (0..n).step_by(2) {
            assert_eq!(m.remove(tag(i, i >> 15)), Some(i));
        }
        assert!(m.check_runs());
        for i in 0..n {
            let want = (i % 2 == 1).then_some(i);
            assert_eq!(m.get(tag(i, i >> 15)).copied(), want, "entry {i}");
        }
    }

    /// The counter wraps (0x7fff, then 0) while tags from before the wrap are still in the
    /// table, some of them on the same slots as the new ones (same counter bits, other
    /// ticks): every tag is still found, and a tag never inserted (a stale one) is not.
    #[test]
    fn tags_across_the_counter_wrap_share_slots_and_are_all_found() {
        let mut m = TagMap::new();
        // Held over from the previous round of the counter, at ticks 1.
        for n in 0..64 {
            m.insert(tag(n, 1), (n, 1));
        }
        // The counter running up to the wrap and past it, at ticks 2.
        for n in (0x7fff - 63..=0x7fff).chain(0..64) {
            m.insert(tag(n, 2), (n, 2));
        }
        assert_eq!(m.len(), 192);
        for n in 0..64 {
            assert_eq!(m.get(tag(n, 1)), Some(&(n, 1)));
            assert_eq!(m.get(tag(n, 2)), Some(&(n, 2)));
            // Stale: the counter's earlier use at another tick, never in the table.
            assert_eq!(m.get(tag(n, 3)), None);
        }
        // The old ones answered: the new ones behind them in the runs are found still.
        for n in 0..64 {
            assert_eq!(m.remove(tag(n, 1)), Some((n, 1)));
            assert_eq!(
                m.remove(tag(n, 1)),
                None,
                "a duplicate answer finds nothing"
            );
        }
        for n in (0x7fff - 63..=0x7fff).chain(0..64) {
            assert_eq!(m.get(tag(n, 2)), Some(&(n, 2)));
        }
    }

    /// The deadline queue's top is the earliest deadline through removals, moved
    /// deadlines and expiries, and an expiry hands out exactly the frames due.
    #[test]
    fn the_earliest_deadline_follows_every_change() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut f = Frames::default();
        for n in 0..10u32 {
            f.insert(tag(n, 0), frame(at(10 + u64::from(n))));
        }
        assert_eq!(f.next_deadline(), Some(at(10)));
        f.remove(tag(0, 0));
        assert_eq!(f.next_deadline(), Some(at(11)));
        f.set_deadline(tag(1, 0), at(100));
        assert_eq!(f.next_deadline(), Some(at(12)));
        f.set_deadline(tag(9, 0), at(5));
        assert_eq!(f.next_deadline(), Some(at(5)));
        assert_eq!(
            f.take_expired(at(13)),
            vec![tag(2, 0), tag(3, 0), tag(9, 0)]
        );
        assert_eq!(f.take_expired(at(13)), vec![], "taken out of the queue");
        // Moved on, or put back (as `handle_timeout` does with a frame it left as it was).
        f.set_deadline(tag(9, 0), at(50));
        f.set_deadline(tag(2, 0), at(60));
        f.requeue(tag(3, 0));
        assert_eq!(f.next_deadline(), Some(at(13)));
        f.retain(|t, _| t != tag(3, 0));
        assert_eq!(f.next_deadline(), Some(at(14)));
        assert_eq!(
            f.take_expired(at(19)),
            (4..9).map(|n| tag(n, 0)).collect::<Vec<_>>()
        );
    }

    #[derive(Debug, Clone)]
    enum Step {
        Insert(u32, u64),
        Remove(u32),
        SetDeadline(u32, u64),
        Expire(u64),
        Retain(u32),
    }

    fn step() -> impl Strategy<Value = Step> {
        // Few counter values and ticks: slots are shared, runs long, tags repeat.
        let t = (0u32..40, 0u32..3).prop_map(|(n, k)| tag(n * 997, k));
        prop_oneof![
            3 => (t.clone(), 0u64..50).prop_map(|(t, d)| Step::Insert(t, d)),
            2 => t.clone().prop_map(Step::Remove),
            2 => (t.clone(), 0u64..50).prop_map(|(t, d)| Step::SetDeadline(t, d)),
            1 => (0u64..50).prop_map(Step::Expire),
            1 => (0u32..4).prop_map(Step::Retain),
        ]
    }

    proptest! {
        /// Against a BTreeMap model: every lookup, the entries, the earliest deadline and
        /// what expires agree after any sequence of changes.
        #[test]
        fn frames_agree_with_a_btreemap(steps in proptest::collection::vec(step(), 1..300)) {
            let t0 = Instant::now();
            let at = |ms: u64| t0 + Duration::from_millis(ms);
            let mut f = Frames::default();
            let mut model: BTreeMap<u32, Instant> = BTreeMap::new();
            for s in steps {
                match s {
                    Step::Insert(t, d) => {
                        f.insert(t, frame(at(d)));
                        model.insert(t, at(d));
                    }
                    Step::Remove(t) => {
                        prop_assert_eq!(f.remove(t).map(|x| x.deadline), model.remove(&t));
                    }
                    Step::SetDeadline(t, d) => {
                        f.set_deadline(t, at(d));
                        if let Some(x) = model.get_mut(&t) {
                            *x = at(d);
                        }
                    }
                    Step::Expire(now) => {
                        let due: Vec<u32> = model
                            .iter()
                            .filter(|(_, d)| **d <= at(now))
                            .map(|(t, _)| *t)
                            .collect();
                        let got = f.take_expired(at(now));
                        prop_assert_eq!(&got, &due);
                        // The engine moves or puts back every one it took.
                        for t in got {
                            f.requeue(t);
                        }
                    }
                    Step::Retain(k) => {
                        f.retain(|t, _| t & 3 != k);
                        model.retain(|t, _| t & 3 != k);
                    }
                }
                prop_assert_eq!(f.len(), model.len());
                prop_assert_eq!(f.next_deadline(), model.values().min().copied());
                let mut got: Vec<(u32, Instant)> = f.iter().map(|(t, x)| (t, x.deadline)).collect();
                got.sort();
                let want: Vec<(u32, Instant)> = model.iter().map(|(t, d)| (*t, *d)).collect();
                prop_assert_eq!(got, want);
                for t in model.keys() {
                    prop_assert!(f.contains_key(*t));
                }
                prop_assert!(f.deadlines.len() <= 2 * f.len() + 64 + 1);
                prop_assert!(f.map.check_runs(), "Robin Hood's order broken");
                prop_assert!(f.deadlines.sorted());
            }
        }
    }
}
