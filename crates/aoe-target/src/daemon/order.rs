//! Overlapping writes of one export run in the order they arrived.
//!
//! Why: an initiator retransmits a write whose answer is late (the Linux aoe driver after its
//! RTT-based timeout, `aoecmd.c` `rexmit_timer`, as our own initiator does), with a new tag.
//! The original W1 and its copy W1' may then both be queued at the worker pool. If W1' is
//! answered first the initiator completes the write, and the application may write W2 to the
//! same sectors; with several workers W2 can run before the still-queued W1, and W1's old
//! data lands last: an acknowledged write is lost. vblade serves one request at a time, so it
//! never reorders; a disk's queue (SCSI ordered tags aside) promises nothing either, which is
//! why the block layer never has two overlapping writes in flight itself.
//!
//! How: per export, the byte ranges of the writes submitted to the pool and not completed, and
//! a queue of writes that wait. A write that overlaps a write in flight or an earlier waiting
//! one waits; when a write completes, the waiting writes that now overlap neither a write in
//! flight nor an earlier waiting one are released, in arrival order. Reads, flushes and
//! writes to other sectors are not held back. The lists are short (the export's buffer count
//! bounds them), so a linear scan is the search.

use std::collections::VecDeque;
use std::ops::Range;

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// The writes of one export in flight, and those waiting for an overlapping one to finish.
#[derive(Debug)]
pub(super) struct WriteOrder<T> {
    /// (token, byte range) of writes submitted and not completed.
    running: Vec<(u32, Range<u64>)>,
    /// (token, byte range, job) of writes not yet submitted, in arrival order.
    waiting: VecDeque<(u32, Range<u64>, T)>,
}

impl<T> Default for WriteOrder<T> {
    fn default() -> Self {
        WriteOrder {
            running: Vec::new(),
            waiting: VecDeque::new(),
        }
    }
}

impl<T> WriteOrder<T> {
    /// True if a write of `range` arriving now must wait (so must not run inline either).
    pub(super) fn must_wait(&self, range: &Range<u64>) -> bool {
        self.running.iter().any(|(_, r)| overlaps(r, range))
            || self.waiting.iter().any(|(_, r, _)| overlaps(r, range))
    }

    /// True if no write is in flight or waiting.
    pub(super) fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Records a write submitted to the pool.
    pub(super) fn started(&mut self, token: u32, range: Range<u64>) {
        self.running.push((token, range));
    }

    /// Queues a write that [`must_wait`](Self::must_wait).
    pub(super) fn wait(&mut self, token: u32, range: Range<u64>, job: T) {
        self.waiting.push_back((token, range, job));
    }

    /// Writes waiting now.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Forgets a write that completed (or was given up); returns the waiting writes it
    /// released, in arrival order, already recorded as submitted: the caller submits them, or
    /// calls `completed` for those it cannot.
    pub(super) fn completed(&mut self, token: u32) -> Vec<(u32, T)> {
        let Some(i) = self.running.iter().position(|(t, _)| *t == token) else {
            return Vec::new();
        };
        self.running.swap_remove(i);
        let mut released = Vec::new();
        let mut i = 0;
        while i < self.waiting.len() {
            let r = &self.waiting[i].1;
            let blocked = self.running.iter().any(|(_, h)| overlaps(h, r))
                || self.waiting.iter().take(i).any(|(_, w, _)| overlaps(w, r));
            if blocked {
                i += 1;
                continue;
            }
            let (t, r, job) = self.waiting.remove(i).unwrap_or_else(|| unreachable!());
            self.running.push((t, r));
            released.push((t, job));
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Admits like the daemon does: submit now if nothing overlapping is ahead, else wait.
    fn admit(o: &mut WriteOrder<&'static str>, t: u32, r: Range<u64>, name: &'static str) -> bool {
        if o.must_wait(&r) {
            o.wait(t, r, name);
            false
        } else {
            o.started(t, r);
            true
        }
    }

    #[test]
    fn an_overlapping_write_waits_for_the_earlier_one() {
        let mut o = WriteOrder::default();
        assert!(admit(&mut o, 1, 0..4096, "W1"));
        assert!(!admit(&mut o, 2, 2048..6144, "W2"), "overlaps W1");
        assert!(
            !admit(&mut o, 3, 6000..8192, "W3"),
            "overlaps the waiting W2"
        );
        assert!(admit(&mut o, 4, 8192..9000, "W4"), "overlaps nothing");
        assert_eq!(o.waiting(), 2);
        assert_eq!(o.completed(4), vec![]);
        // W1 done: W2 goes; W3 still waits for W2.
        assert_eq!(o.completed(1), vec![(2, "W2")]);
        assert!(!o.must_wait(&(0..1)));
        assert!(o.must_wait(&(3000..3001)), "W2 is running");
        assert_eq!(o.completed(2), vec![(3, "W3")]);
        assert_eq!(o.completed(3), vec![]);
        assert_eq!(o.waiting(), 0);
        assert!(o.running.is_empty());
    }

    #[test]
    fn waiting_writes_are_released_in_arrival_order() {
        // Three copies of writes to one sector (a retransmit, then newer data twice): each
        // runs only after the one before it completed.
        let mut o = WriteOrder::default();
        assert!(admit(&mut o, 1, 0..512, "A"));
        assert!(!admit(&mut o, 2, 0..512, "A'"));
        assert!(!admit(&mut o, 3, 0..1024, "B"));
        assert!(!admit(&mut o, 4, 512..1024, "C"));
        assert_eq!(o.completed(1), vec![(2, "A'")]);
        assert_eq!(o.completed(2), vec![(3, "B")]);
        assert_eq!(o.completed(3), vec![(4, "C")]);
        assert_eq!(o.completed(4), vec![]);
    }

    #[test]
    fn one_completion_releases_every_write_it_held_back() {
        let mut o = WriteOrder::default();
        assert!(admit(&mut o, 1, 0..8192, "big"));
        assert!(!admit(&mut o, 2, 0..512, "a"));
        assert!(!admit(&mut o, 3, 4096..4608, "b"));
        assert!(!admit(&mut o, 4, 0..512, "a2"));
        assert_eq!(o.completed(1), vec![(2, "a"), (3, "b")]);
        assert_eq!(o.completed(3), vec![]);
        assert_eq!(o.completed(2), vec![(4, "a2")]);
        // A token that is not running (a read, an inline write) changes nothing.
        assert_eq!(o.completed(99), vec![]);
    }
}
