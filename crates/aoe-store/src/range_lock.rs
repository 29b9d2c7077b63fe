//! A lock over ranges of blocks, so that O_DIRECT writes that read-modify-write a partial block
//! never run at the same time as another write touching that block.
//!
//! Why: a write smaller than the device's O_DIRECT alignment (a 512- or 1024-byte AoE frame on a
//! 4 KiB-sector device) must read the enclosing block, patch its bytes and write the block back.
//! Two such writes of neighbouring frames in one block, run by two worker threads, each write
//! back the block as they read it and the second one undoes the first one's bytes. The Linux
//! block layer never merges such user writes for us, and vblade is single-threaded, so it never
//! races; our worker pool does.
//!
//! How: a `Mutex` over the list of held ranges and a `Condvar` to wait on. A write locks the
//! aligned block range it will write (`start..end`, in any unit the caller chooses); it waits
//! while any held range overlaps it, so writes to disjoint blocks still run in parallel. The
//! list is short (at most one entry per worker thread), so a linear scan is the fastest search.

use std::ops::Range;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Ranges held by writers in progress.
#[derive(Debug, Default)]
pub(crate) struct RangeLock {
    held: Mutex<Vec<Range<u64>>>,
    freed: Condvar,
}

/// Holds a range until dropped.
#[derive(Debug)]
pub(crate) struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: Range<u64>,
}

impl RangeLock {
    /// Waits until no held range overlaps `range`, then holds it. An empty range is held
    /// trivially (it overlaps nothing).
    pub(crate) fn lock(&self, range: Range<u64>) -> RangeGuard<'_> {
        let mut held = self.held_list();
        while held
            .iter()
            .any(|h| h.start < range.end && range.start < h.end)
        {
            held = self
                .freed
                .wait(held)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        held.push(range.clone());
        RangeGuard { lock: self, range }
    }

    /// The list, also after a panic in another holder (the list itself is always consistent:
    /// it is only changed by one push or one removal under the lock).
    fn held_list(&self) -> MutexGuard<'_, Vec<Range<u64>>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[cfg(test)]
    fn held_count(&self) -> usize {
        self.held_list().len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held_list();
        if let Some(i) = held.iter().position(|h| *h == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.lock.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn disjoint_ranges_are_held_together() {
        let l = RangeLock::default();
        let a = l.lock(0..2);
        let b = l.lock(2..4);
        let c = l.lock(10..11);
        assert_eq!(l.held_count(), 3);
        drop((a, b, c));
        assert_eq!(l.held_count(), 0);
    }

    #[test]
    fn overlapping_ranges_wait_for_each_other() {
        // Each of 8 threads locks a 2-block range overlapping its neighbours' many times and
        // counts the holders of each block: never more than one.
        let l = Arc::new(RangeLock::default());
        let inside: Arc<Vec<AtomicU32>> = Arc::new((0..10).map(|_| AtomicU32::new(0)).collect());
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let l = l.clone();
                let inside = inside.clone();
                std::thread::spawn(move || {
                    for i in 0..2000u64 {
                        let s = (t + i) % 9;
                        let _g = l.lock(s..s + 2);
                        for b in s..s + 2 {
                            let n = inside[b as usize].fetch_add(1, Ordering::SeqCst);
                            assert_eq!(n, 0, "block {b} held twice");
                        }
                        std::thread::yield_now();
                        for b in s..s + 2 {
                            inside[b as usize].fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(l.held_count(), 0);
    }
}
