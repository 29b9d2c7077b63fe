//! Per-device sector range locks, shared by every front-end (the FUSE device files and the
//! NBD server), so that a read-modify-write of a partial sector cannot lose a concurrent
//! write to other bytes of the same sector.
//!
//! A block device never sees a write smaller than its logical block: the kernel's page
//! cache (or the client, for NBD's advertised 512-byte minimum block size) does the
//! read-modify-write above it, under the page lock. Our device files and NBD exports accept
//! any byte offset and length, so the read-modify-write happens here, in two AoE round
//! trips, and two of them on one sector would each write back the other's old bytes.
//!
//! Every I/O takes its covering sectors before it is submitted and gives them back when it
//! completes: an unaligned write **exclusively** (from the read of the partial sectors to
//! the end of the write back), aligned reads and writes **shared** (they never touch bytes
//! outside their own range, so they exclude only read-modify-writes). Sectors are counted
//! from the start of the device, so a partition file and the whole-device file (or an NBD
//! export of either) exclude each other too.
//!
//! Nothing blocks: [`RangeLocks::acquire`] runs its continuation at once when the range is
//! free, or queues it; the release (on whatever thread completes the I/O, usually the
//! network thread) runs the continuations it unblocks. Waiters are granted in arrival order
//! per overlapping range: a request that overlaps a queued one it conflicts with queues
//! behind it, so a stream of shared requests cannot starve a read-modify-write.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aoe_wire::TargetAddr;

/// How a range is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Aligned reads and writes: many at once.
    Shared,
    /// A read-modify-write: alone on its sectors.
    Exclusive,
}

/// What runs once the range is held; the guard releases it on drop.
pub type Then = Box<dyn FnOnce(Guard) + Send>;

struct Entry {
    id: u64,
    first: u64,
    end: u64,
    mode: Mode,
}

impl Entry {
    fn conflicts(&self, first: u64, end: u64, mode: Mode) -> bool {
        self.first < end
            && first < self.end
            && (self.mode == Mode::Exclusive || mode == Mode::Exclusive)
    }
}

#[derive(Default)]
struct Dev {
    held: Vec<Entry>,
    waiting: Vec<(Entry, Then)>,
}

#[derive(Default)]
struct Inner {
    devs: HashMap<TargetAddr, Dev>,
    next: u64,
}

/// The range locks of every device (cheap to clone: one shared table).
#[derive(Clone, Default)]
pub struct RangeLocks {
    inner: Arc<Mutex<Inner>>,
}

/// A held range; dropping it releases the range and starts the waiters it was blocking.
pub struct Guard {
    locks: RangeLocks,
    dev: TargetAddr,
    id: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.locks.release(self.dev, self.id);
    }
}

impl RangeLocks {
    /// A table with nothing held.
    pub fn new() -> RangeLocks {
        RangeLocks::default()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes sectors `[first, first + count)` of `dev` in `mode` and runs `then` with the
    /// guard: at once (on this thread) if nothing conflicting is held or queued before it,
    /// otherwise later, on the thread whose release frees the range. An empty range is
    /// granted at once.
    pub fn acquire(&self, dev: TargetAddr, first: u64, count: u64, mode: Mode, then: Then) {
        let end = first.saturating_add(count);
        let guard = {
            let mut t = self.table();
            let id = t.next;
            t.next += 1;
            let d = t.devs.entry(dev).or_default();
            let e = Entry {
                id,
                first,
                end,
                mode,
            };
            let blocked = count > 0
                && (d.held.iter().any(|h| h.conflicts(first, end, mode))
                    || d.waiting.iter().any(|(w, _)| w.conflicts(first, end, mode)));
            if blocked {
                d.waiting.push((e, then));
                return;
            }
            d.held.push(e);
            Guard {
                locks: self.clone(),
                dev,
                id,
            }
        };
        then(guard)
    }

    fn release(&self, dev: TargetAddr, id: u64) {
        let mut ready = Vec::new();
        {
            let mut t = self.table();
            let Some(d) = t.devs.get_mut(&dev) else {
                return;
            };
            d.held.retain(|h| h.id != id);
            // Grant, in arrival order, every waiter that conflicts neither with what is held
            // (including those just granted) nor with an earlier waiter still queued.
            let mut i = 0;
            while i < d.waiting.len() {
                let (w, _) = &d.waiting[i];
                let (first, end, mode) = (w.first, w.end, w.mode);
                let free = !d.held.iter().any(|h| h.conflicts(first, end, mode))
                    && !d.waiting[..i]
                        .iter()
                        .any(|(e, _)| e.conflicts(first, end, mode));
                if free {
                    let (e, then) = d.waiting.remove(i);
                    let id = e.id;
                    d.held.push(e);
                    ready.push((id, then));
                } else {
                    i += 1;
                }
            }
            if d.held.is_empty() && d.waiting.is_empty() {
                t.devs.remove(&dev);
            }
        }
        for (id, then) in ready {
            then(Guard {
                locks: self.clone(),
                dev,
                id,
            });
        }
    }

    /// Ranges held and waiting on `dev` (for tests and diagnostics).
    pub fn counts(&self, dev: TargetAddr) -> (usize, usize) {
        self.table()
            .devs
            .get(&dev)
            .map_or((0, 0), |d| (d.held.len(), d.waiting.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    const D: TargetAddr = TargetAddr::new(1, 1);

    /// Acquires and sends the guard (tagged) down `tx` when granted.
    fn take(l: &RangeLocks, tx: &mpsc::Sender<(u32, Guard)>, tag: u32, f: u64, n: u64, m: Mode) {
        let tx = tx.clone();
        l.acquire(D, f, n, m, Box::new(move |g| tx.send((tag, g)).unwrap()));
    }

    #[test]
    fn shared_ranges_coexist_and_exclusive_waits() {
        let l = RangeLocks::new();
        let (tx, rx) = mpsc::channel();
        take(&l, &tx, 1, 0, 8, Mode::Shared);
        take(&l, &tx, 2, 4, 8, Mode::Shared);
        let a = rx.try_recv().unwrap();
        let b = rx.try_recv().unwrap();
        // Overlaps both: waits for both.
        take(&l, &tx, 3, 7, 1, Mode::Exclusive);
        // Disjoint: granted at once.
        take(&l, &tx, 4, 100, 1, Mode::Exclusive);
        assert_eq!(rx.try_recv().unwrap().0, 4);
        assert!(rx.try_recv().is_err());
        drop(a);
        assert!(rx.try_recv().is_err(), "still overlaps range 2");
        drop(b);
        let c = rx.try_recv().unwrap();
        assert_eq!(c.0, 3);
        drop(c);
        assert_eq!(l.counts(D), (0, 0));
    }

    #[test]
    fn queued_exclusive_is_not_starved_and_order_is_kept() {
        let l = RangeLocks::new();
        let (tx, rx) = mpsc::channel();
        take(&l, &tx, 1, 0, 1, Mode::Shared);
        let s = rx.try_recv().unwrap();
        take(&l, &tx, 2, 0, 1, Mode::Exclusive);
        // Shared again, but behind the queued exclusive one.
        take(&l, &tx, 3, 0, 1, Mode::Shared);
        take(&l, &tx, 4, 0, 1, Mode::Exclusive);
        assert!(rx.try_recv().is_err());
        drop(s);
        let g = rx.try_recv().unwrap();
        assert_eq!(g.0, 2);
        assert!(rx.try_recv().is_err());
        drop(g);
        let g = rx.try_recv().unwrap();
        assert_eq!(g.0, 3);
        assert!(rx.try_recv().is_err());
        drop(g);
        assert_eq!(rx.try_recv().unwrap().0, 4);
    }

    #[test]
    fn devices_are_independent_and_empty_ranges_never_wait() {
        let l = RangeLocks::new();
        let (tx, rx) = mpsc::channel();
        take(&l, &tx, 1, 0, 1, Mode::Exclusive);
        let _g = rx.try_recv().unwrap();
        let tx2 = tx.clone();
        l.acquire(
            TargetAddr::new(2, 1),
            0,
            1,
            Mode::Exclusive,
            Box::new(move |g| tx2.send((2, g)).unwrap()),
        );
        assert_eq!(rx.try_recv().unwrap().0, 2);
        take(&l, &tx, 3, 0, 0, Mode::Exclusive);
        assert_eq!(rx.try_recv().unwrap().0, 3);
    }
}
