//! The worker pool's queue: jobs taken round-robin by source, first in first out within a
//! source.
//!
//! A queue served first in, first out makes every job wait behind all that came before it.
//! On a slow store one initiator writing far over the buffer count keeps its share of the
//! target's slots queued here (session 18: 8 of 16 on a store of 50 writes a second), and
//! another initiator's single read waited behind about five of those 20 ms writes: p50
//! 103 ms (docs/PERFORMANCE.md, "One greedy initiator and the buffer count"). Served
//! round-robin, a source with one job queued waits for at most one job of each other
//! source with jobs queued.
//!
//! What it keeps:
//! - Per source, jobs leave in the order they came: one initiator's requests reach the
//!   store in arrival order, as before.
//! - Across sources, a job may leave before one queued earlier. Writes are not reordered
//!   by that: the target daemon submits a write only once every earlier overlapping write
//!   has completed (`WriteOrder` in aoe-target), so two overlapping writes are never queued
//!   here together; a read queued with an overlapping write had no order with it anyway
//!   (with several workers the two ran at once before, and ATA gives requests outstanding
//!   together no order).
//! - Memory: at most `cap` jobs, so at most `cap` sources; the entry and source tables grow
//!   to their high-water mark and are reused, so a steady load allocates nothing per job.
//!   The last source pushed is cached, and kept (parked, in no turn) when its last job
//!   leaves: a single source (the common case, its queue often running empty between
//!   jobs) never hashes.

use std::collections::{HashMap, VecDeque};

/// No entry (end of a source's list, an empty slot's link).
const NIL: u32 = u32::MAX;

#[derive(Debug)]
struct Entry<T> {
    item: Option<T>,
    /// The next entry of the same source, or the next free entry.
    next: u32,
}

#[derive(Debug, Clone, Copy)]
struct Source {
    key: u64,
    head: u32,
    tail: u32,
}

/// Jobs of type `T` keyed by a source, taken round-robin across sources.
#[derive(Debug)]
pub struct FairQueue<T> {
    cap: usize,
    len: usize,
    entries: Vec<Entry<T>>,
    free_entry: u32,
    /// Source slots; those with jobs are in `ring`, the last source pushed may be parked
    /// (no jobs, `head` NIL, still in `index`), the others are in `free_sources`.
    sources: Vec<Source>,
    free_sources: Vec<u32>,
    /// Sources with jobs queued, in the order they are served: the front gives one job and
    /// goes to the back.
    ring: VecDeque<u32>,
    /// Source key to its slot, for sources with jobs queued and the parked one (not
    /// consulted for the last).
    index: HashMap<u64, u32>,
    /// The last source pushed: (key, slot), its slot queued or parked.
    last: Option<(u64, u32)>,
}

impl<T> FairQueue<T> {
    /// A queue of at most `cap` jobs (at least 1).
    pub fn new(cap: usize) -> FairQueue<T> {
        FairQueue {
            cap: cap.max(1),
            len: 0,
            entries: Vec::new(),
            free_entry: NIL,
            sources: Vec::new(),
            free_sources: Vec::new(),
            ring: VecDeque::new(),
            index: HashMap::new(),
            last: None,
        }
    }

    /// Jobs queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no job is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sources with jobs queued.
    pub fn sources(&self) -> usize {
        self.ring.len()
    }

    /// Queues `item` behind the jobs of `source`; gives it back if the queue holds `cap`.
    pub fn push(&mut self, source: u64, item: T) -> Result<(), T> {
        if self.len >= self.cap {
            return Err(item);
        }
        let e = match self.free_entry {
            NIL => {
                self.entries.push(Entry {
                    item: Some(item),
                    next: NIL,
                });
                (self.entries.len() - 1) as u32
            }
            e => {
                let entry = &mut self.entries[e as usize];
                self.free_entry = entry.next;
                entry.item = Some(item);
                entry.next = NIL;
                e
            }
        };
        self.len += 1;
        let slot = match self.last {
            Some((key, slot)) if key == source => Some(slot),
            _ => {
                self.unpark_last();
                self.index.get(&source).copied()
            }
        };
        let slot = match slot {
            Some(s) => {
                let src = &mut self.sources[s as usize];
                if src.head == NIL {
                    // Parked: its turn starts behind every source waiting.
                    src.head = e;
                    self.ring.push_back(s);
                } else {
                    self.entries[src.tail as usize].next = e;
                }
                src.tail = e;
                s
            }
            None => {
                let src = Source {
                    key: source,
                    head: e,
                    tail: e,
                };
                let s = match self.free_sources.pop() {
                    Some(s) => {
                        self.sources[s as usize] = src;
                        s
                    }
                    None => {
                        self.sources.push(src);
                        (self.sources.len() - 1) as u32
                    }
                };
                // A source joins behind every source already waiting.
                self.ring.push_back(s);
                self.index.insert(source, s);
                s
            }
        };
        self.last = Some((source, slot));
        Ok(())
    }

    /// Frees the last source's slot if it is parked (another source is being pushed).
    fn unpark_last(&mut self) {
        if let Some((key, s)) = self.last.take() {
            if self.sources[s as usize].head == NIL {
                self.index.remove(&key);
                self.free_sources.push(s);
            }
        }
    }

    /// The next job: the oldest of the source whose turn it is, which then goes behind the
    /// others. None when empty.
    pub fn pop(&mut self) -> Option<T> {
        let s = self.ring.pop_front()?;
        let src = &mut self.sources[s as usize];
        let e = src.head;
        let entry = &mut self.entries[e as usize];
        let item = entry.item.take();
        src.head = entry.next;
        entry.next = self.free_entry;
        self.free_entry = e;
        self.len -= 1;
        if src.head == NIL {
            // The last source pushed stays parked for its next job; any other is freed.
            if self.last.is_none_or(|(_, slot)| slot != s) {
                let key = src.key;
                self.index.remove(&key);
                self.free_sources.push(s);
            }
        } else {
            self.ring.push_back(s);
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn drain(q: &mut FairQueue<(u64, u32)>) -> Vec<(u64, u32)> {
        std::iter::from_fn(|| q.pop()).collect()
    }

    #[test]
    fn one_source_is_first_in_first_out() {
        let mut q = FairQueue::new(8);
        for i in 0..8 {
            q.push(7, (7, i)).unwrap();
        }
        assert_eq!(q.push(7, (7, 8)), Err((7, 8)), "over cap: given back");
        assert_eq!(drain(&mut q), (0..8).map(|i| (7, i)).collect::<Vec<_>>());
        assert!(q.is_empty());
        assert_eq!(q.sources(), 0);
    }

    #[test]
    fn a_source_with_one_job_waits_for_one_job_of_each_other() {
        // The session 18 scene: the flooder has six jobs queued, then the reader one.
        let mut q = FairQueue::new(64);
        for i in 0..6 {
            q.push(1, (1, i)).unwrap();
        }
        q.push(2, (2, 0)).unwrap();
        assert_eq!(q.pop(), Some((1, 0)));
        assert_eq!(q.pop(), Some((2, 0)), "the reader after one flooder job");
        // Its next request, pushed while the flooder still has four queued, likewise.
        q.push(2, (2, 1)).unwrap();
        assert_eq!(q.pop(), Some((1, 1)));
        assert_eq!(q.pop(), Some((2, 1)));
        // Three sources alternate; each keeps its own order.
        q.push(3, (3, 0)).unwrap();
        q.push(3, (3, 1)).unwrap();
        q.push(2, (2, 2)).unwrap();
        assert_eq!(
            drain(&mut q),
            vec![(1, 2), (3, 0), (2, 2), (1, 3), (3, 1), (1, 4), (1, 5)]
        );
    }

    #[test]
    fn slots_are_reused_and_the_cache_forgets_a_drained_source() {
        let mut q = FairQueue::new(4);
        for round in 0..100u32 {
            q.push(1, (1, round)).unwrap();
            q.push(2, (2, round)).unwrap();
            assert_eq!(q.pop(), Some((1, round)));
            // Source 1 drained, its slot freed; the cache (source 2) still holds.
            q.push(2, (2, round + 1000)).unwrap();
            assert_eq!(drain(&mut q), vec![(2, round), (2, round + 1000)]);
        }
        assert!(q.entries.len() <= 4, "{} entries", q.entries.len());
        assert!(q.sources.len() <= 3, "{} sources", q.sources.len());
        assert!(q.index.len() <= 2, "{} indexed", q.index.len());
    }

    #[test]
    fn a_lone_source_whose_queue_runs_empty_keeps_its_slot_without_hashing() {
        let mut q = FairQueue::new(4);
        for i in 0..10u32 {
            q.push(9, (9, i)).unwrap();
            assert_eq!(q.pop(), Some((9, i)));
            assert_eq!(q.sources(), 0);
            // Parked: still indexed, same slot, nothing freed.
            assert_eq!((q.index.len(), q.sources.len()), (1, 1));
            assert!(q.free_sources.is_empty());
        }
        // Another source frees the parked slot and takes it.
        q.push(5, (5, 0)).unwrap();
        assert_eq!((q.index.len(), q.sources.len()), (1, 1));
        q.push(9, (9, 10)).unwrap();
        assert_eq!(drain(&mut q), vec![(5, 0), (9, 10)]);
    }

    proptest! {
        /// Against a model: per source first in first out; each pop serves the source
        /// whose turn it is (sources in the order they last became non-empty or were
        /// last served); at most `cap` queued; every job pushed comes out once.
        #[test]
        fn matches_a_round_robin_model(
            ops in proptest::collection::vec((0u64..5, any::<bool>()), 0..300),
            cap in 1usize..12,
        ) {
            let mut q = FairQueue::new(cap);
            let mut model: VecDeque<(u64, VecDeque<u32>)> = VecDeque::new();
            let mut n = 0u32;
            for (source, push) in ops {
                if push {
                    let queued: usize = model.iter().map(|(_, j)| j.len()).sum();
                    let r = q.push(source, (source, n));
                    if queued >= cap {
                        prop_assert_eq!(r, Err((source, n)));
                    } else {
                        prop_assert_eq!(r, Ok(()));
                        match model.iter_mut().find(|(s, _)| *s == source) {
                            Some((_, jobs)) => jobs.push_back(n),
                            None => model.push_back((source, VecDeque::from([n]))),
                        }
                    }
                    n += 1;
                } else {
                    let want = model.pop_front().map(|(s, mut jobs)| {
                        let j = jobs.pop_front().unwrap();
                        if !jobs.is_empty() {
                            model.push_back((s, jobs));
                        }
                        (s, j)
                    });
                    prop_assert_eq!(q.pop(), want);
                }
                prop_assert_eq!(q.len(), model.iter().map(|(_, j)| j.len()).sum::<usize>());
                prop_assert_eq!(q.sources(), model.len());
                prop_assert!(q.index.len() <= model.len() + 1);
                prop_assert!(q.sources.len() <= cap + 1);
            }
        }
    }
}
