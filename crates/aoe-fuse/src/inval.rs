//! The ranges of a device file's page cache to drop after direct-I/O writes, bounded.
//!
//! While a device file is open in the kernel's cached mode as well as in direct-I/O mode, a
//! direct write's range is dropped from the page cache once the write has been answered
//! ([`crate::fs`]: `FUSE_NOTIFY_INVAL_INODE`, the post-write invalidation the kernel's
//! `generic_file_direct_write` does for a cached open and the FUSE direct-I/O mode does not).
//! The same queue drops, after a device-file write's answer, its sectors from the other
//! device and partition files of the device open cached, and, before an NBD write's answer
//! (queued with the ranges, run once they are dropped: [`Queue::push_then`]), its sectors from
//! every such file (`crate::fs::CachedPages`).
//! The invalidations run on a thread of their own, and each may wait in the kernel for the
//! lock of every cached page in its range, so writes can be answered faster than their ranges
//! are dropped. An unbounded queue would then grow for as long as that lasts.
//!
//! [`Pending`] keeps at most [`MAX_RANGES`] ranges per inode, merging a range that touches or
//! overlaps one already queued; past that it drops the whole inode's cache instead (offset 0,
//! length 0: `fuse_reverse_inval_inode` then invalidates to the end of the file). Dropping
//! more than was written is always safe (the next read goes to the device); dropping less is
//! not, so nothing queued is ever lost. The inodes are the device and partition files, a
//! number bounded by the devices the initiator holds, so the queue's memory is bounded.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

/// The most ranges queued for one inode before its whole cache is dropped instead.
pub(crate) const MAX_RANGES: usize = 32;

/// What is queued for one inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Span {
    /// These byte ranges (offset, length), sorted, none touching another.
    Ranges(Vec<(u64, u64)>),
    /// All of the inode's cached pages.
    Whole,
}

/// The ranges waiting to be dropped, per inode.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    inodes: BTreeMap<u64, Span>,
}

impl Pending {
    /// Queues `len` bytes at `offset` of inode `ino`, merged with what touches them.
    pub(crate) fn push(&mut self, ino: u64, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let entry = self
            .inodes
            .entry(ino)
            .or_insert_with(|| Span::Ranges(Vec::new()));
        let Span::Ranges(ranges) = entry else {
            return;
        };
        let end = offset.saturating_add(len);
        // The first range that ends at or after `offset` (touching counts) and the first
        // that starts after `end`: everything between merges with the new one.
        let lo = ranges.partition_point(|&(o, l)| o.saturating_add(l) < offset);
        let hi = ranges.partition_point(|&(o, _)| o <= end);
        let (start, stop) = ranges[lo..hi]
            .iter()
            .fold((offset, end), |(s, e), &(o, l)| {
                (s.min(o), e.max(o.saturating_add(l)))
            });
        ranges.splice(lo..hi, [(start, stop - start)]);
        if ranges.len() > MAX_RANGES {
            *entry = Span::Whole;
        }
    }

    /// Takes everything queued, leaving the queue empty.
    pub(crate) fn take(&mut self) -> BTreeMap<u64, Span> {
        std::mem::take(&mut self.inodes)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.inodes.is_empty()
    }
}

/// What runs once the ranges queued with it are dropped: the answer of a write that came
/// through another front-end (`aoe_initiator::net::CachedViews`).
pub(crate) type Then = Box<dyn FnOnce() + Send>;

/// The queue shared by the writers' completions and the invalidating thread.
#[derive(Default)]
pub(crate) struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    pending: Pending,
    /// What runs once the ranges queued so far are dropped, in the order queued.
    then: Vec<Then>,
    closed: bool,
}

impl Queue {
    /// Queues a range; never blocks for long (a lock held only to merge).
    pub(crate) fn push(&self, ino: u64, offset: u64, len: u64) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.pending.push(ino, offset, len);
        self.ready.notify_one();
    }

    /// Queues `ranges` (inode, offset, length) and `then`, which runs on the invalidating
    /// thread once they are dropped; at once, here, if the queue is closed (the file system
    /// unmounted: no page cache left to drop).
    pub(crate) fn push_then(&self, ranges: &[(u64, u64, u64)], then: Then) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.closed {
            drop(s);
            return then();
        }
        for &(ino, offset, len) in ranges {
            s.pending.push(ino, offset, len);
        }
        s.then.push(then);
        self.ready.notify_one();
    }

    /// Waits for ranges and takes them all, with what is to run once they are dropped;
    /// `None` once closed and drained.
    pub(crate) fn wait(&self) -> Option<(BTreeMap<u64, Span>, Vec<Then>)> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if !s.pending.is_empty() || !s.then.is_empty() {
                return Some((s.pending.take(), std::mem::take(&mut s.then)));
            }
            if s.closed {
                return None;
            }
            s = self.ready.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Ends [`Queue::wait`] once what is queued has been taken.
    pub(crate) fn close(&self) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed = true;
        self.ready.notify_all();
    }
}

/// The writers' side: closes the queue when the last holder drops it, which ends the thread.
pub(crate) struct Sender(pub(crate) Arc<Queue>);

impl Drop for Sender {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(p: &mut Pending, ino: u64) -> Option<Span> {
        p.take().remove(&ino)
    }

    #[test]
    fn touching_and_overlapping_ranges_merge() {
        let mut p = Pending::default();
        p.push(7, 4096, 4096);
        p.push(7, 0, 4096); // touches the first on its left
        p.push(7, 8192, 100); // touches on its right
        p.push(7, 100, 50); // inside
        p.push(7, 20000, 10); // apart
        p.push(7, 8000, 12010); // bridges the two
        assert_eq!(ranges(&mut p, 7), Some(Span::Ranges(vec![(0, 20010)])));
    }

    #[test]
    fn apart_ranges_stay_sorted_and_separate() {
        let mut p = Pending::default();
        p.push(3, 9000, 10);
        p.push(3, 1000, 10);
        p.push(3, 5000, 10);
        p.push(4, 0, 512);
        p.push(3, 0, 0); // nothing
        let mut all = p.take();
        assert_eq!(
            all.remove(&3),
            Some(Span::Ranges(vec![(1000, 10), (5000, 10), (9000, 10)]))
        );
        assert_eq!(all.remove(&4), Some(Span::Ranges(vec![(0, 512)])));
        assert!(all.is_empty());
        assert!(p.is_empty());
    }

    #[test]
    fn many_ranges_become_the_whole_inode_and_stay_bounded() {
        let mut p = Pending::default();
        // A million 4 KiB writes a page apart, faster than any are dropped: the queue holds
        // at most MAX_RANGES + 1 ranges at any moment, then one marker.
        for i in 0..1_000_000u64 {
            p.push(9, i * 8192, 4096);
            if let Some(Span::Ranges(r)) = p.inodes.get(&9) {
                assert!(r.len() <= MAX_RANGES);
            }
        }
        assert_eq!(ranges(&mut p, 9), Some(Span::Whole));
        // After a take, ranges are kept again.
        p.push(9, 0, 10);
        assert_eq!(ranges(&mut p, 9), Some(Span::Ranges(vec![(0, 10)])));
    }

    #[test]
    fn ranges_at_the_end_of_u64_do_not_overflow() {
        let mut p = Pending::default();
        p.push(1, u64::MAX - 10, 100);
        p.push(1, u64::MAX - 200, 190);
        assert_eq!(
            ranges(&mut p, 1),
            Some(Span::Ranges(vec![(u64::MAX - 200, 200)]))
        );
    }

    #[test]
    fn the_queue_drains_then_ends_when_the_sender_drops() {
        let q = Arc::new(Queue::default());
        let s = Sender(q.clone());
        s.0.push(5, 0, 512);
        let t = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some((m, _)) = q.wait() {
                got.extend(m);
            }
            got
        });
        drop(s);
        let got = t.join().unwrap();
        assert_eq!(got, vec![(5, Span::Ranges(vec![(0, 512)]))]);
    }

    /// What is queued with ranges runs once they are taken (by the invalidating thread,
    /// after dropping them), in order; on a closed queue it runs at once.
    #[test]
    fn what_waits_for_its_ranges_runs_after_they_are_taken_or_at_once_when_closed() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let q = Queue::default();
        let ran = Arc::new(AtomicU32::new(0));
        let r = ran.clone();
        q.push_then(
            &[(7, 512, 512), (8, 0, 4096)],
            Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }),
        );
        assert_eq!(
            ran.load(Ordering::SeqCst),
            0,
            "not before its ranges are dropped"
        );
        let (m, then) = q.wait().expect("queued");
        assert_eq!(m.get(&7), Some(&Span::Ranges(vec![(512, 512)])));
        assert_eq!(m.get(&8), Some(&Span::Ranges(vec![(0, 4096)])));
        assert_eq!(then.len(), 1);
        then.into_iter().for_each(|f| f());
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        q.close();
        let r = ran.clone();
        q.push_then(
            &[(7, 0, 512)],
            Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }),
        );
        assert_eq!(ran.load(Ordering::SeqCst), 2, "closed: at once");
        assert!(q.wait().is_none());
    }
}
