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
//!
//! Across a reload: a changed export is reopened as a new export while the old one retires
//! with its writes still in flight (`daemon::exports`). The new export inherits those writes
//! (running and waiting, [`WriteOrder::inherit`]) as entries that hold back its own
//! overlapping writes like its own running ones, until the retiring export reports each one
//! ended ([`WriteOrder::inherited_done`]). Without that, a newer write through the new export
//! (the application's next write after the retransmitted copy of an old one was answered, or
//! simply a write the initiator sent after the reload) could land before the old write still
//! on a worker, and the old data last. Reads of the new export that overlap an inherited
//! write wait too ([`WriteOrder::fenced`]), so a read arriving after the reload returns the
//! retiring export's write, not the sectors it is still overwriting. (By reading, the write
//! fence alone already keeps every acknowledged write visible, since the retiring write is
//! not answered before it lands; the read fence costs only reads of those sectors during
//! the reload's window, and within one export reads are still never held back.)

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
    /// (export, token, byte range in this export's offsets) of writes in flight or waiting
    /// on a retiring export of the same store: they hold back overlapping writes and reads
    /// until that export reports them ended.
    inherited: Vec<(u32, u32, Range<u64>)>,
}

impl<T> Default for WriteOrder<T> {
    fn default() -> Self {
        WriteOrder {
            running: Vec::new(),
            waiting: VecDeque::new(),
            inherited: Vec::new(),
        }
    }
}

impl<T> WriteOrder<T> {
    /// True if a write of `range` arriving now must wait (so must not run inline either).
    pub(super) fn must_wait(&self, range: &Range<u64>) -> bool {
        self.running.iter().any(|(_, r)| overlaps(r, range))
            || self.waiting.iter().any(|(_, r, _)| overlaps(r, range))
            || self.fenced(range)
    }

    /// True if a read of `range` arriving now must wait: it overlaps a write inherited
    /// from a retiring export (see the module's header). False at once when nothing is
    /// inherited, as between reloads.
    pub(super) fn fenced(&self, range: &Range<u64>) -> bool {
        self.inherited.iter().any(|(_, _, r)| overlaps(r, range))
    }

    /// True if no write is in flight or waiting.
    pub(super) fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty() && self.inherited.is_empty()
    }

    /// The writes of this export in flight or waiting, (token, byte range), for a new
    /// export of the same store to [`inherit`](Self::inherit).
    pub(super) fn pending(&self) -> impl Iterator<Item = (u32, Range<u64>)> + '_ {
        self.running
            .iter()
            .cloned()
            .chain(self.waiting.iter().map(|(t, r, _)| (*t, r.clone())))
    }

    /// Takes over `writes` of retiring export `from` (ranges already in this export's
    /// offsets): this export's overlapping writes and reads wait until `from` reports each
    /// one ended. Empty ranges (a write outside this export's window) are left out.
    pub(super) fn inherit(&mut self, from: u32, writes: impl Iterator<Item = (u32, Range<u64>)>) {
        self.inherited.extend(
            writes
                .filter(|(_, r)| r.start < r.end)
                .map(|(t, r)| (from, t, r)),
        );
    }

    /// Inherited writes left.
    pub(super) fn inherited(&self) -> usize {
        self.inherited.len()
    }

    /// Forgets inherited write `token` of export `from` (it completed or was given up
    /// there); returns what it released, as [`completed`](Self::completed) does.
    pub(super) fn inherited_done(&mut self, from: u32, token: u32) -> Vec<(u32, T)> {
        let Some(i) = self
            .inherited
            .iter()
            .position(|(f, t, _)| *f == from && *t == token)
        else {
            return Vec::new();
        };
        self.inherited.swap_remove(i);
        self.release()
    }

    /// Forgets every write inherited from export `from` (it is gone); returns what that
    /// released.
    pub(super) fn forget_inherited(&mut self, from: u32) -> Vec<(u32, T)> {
        let before = self.inherited.len();
        self.inherited.retain(|(f, _, _)| *f != from);
        if self.inherited.len() == before {
            return Vec::new();
        }
        self.release()
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
        self.release()
    }

    /// Moves the waiting entries that overlap nothing running, inherited or waiting ahead of
    /// them to the running list, in arrival order, and returns them.
    fn release(&mut self) -> Vec<(u32, T)> {
        let mut released = Vec::new();
        let mut i = 0;
        while i < self.waiting.len() {
            let r = &self.waiting[i].1;
            let blocked = self.running.iter().any(|(_, h)| overlaps(h, r))
                || self.inherited.iter().any(|(_, _, h)| overlaps(h, r))
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

    /// Session 17's audit ("2 SIGHUP with writes"): a reopened export's writes and reads
    /// that overlap a write still in flight (or waiting) on the retiring export of the same
    /// store wait until the retiring export reports it ended; the others go at once.
    #[test]
    fn inherited_writes_hold_back_overlapping_writes_and_reads() {
        // The retiring export: W1 running, W2 waiting behind it.
        let mut old = WriteOrder::default();
        assert!(admit(&mut old, 1, 0..4096, "W1"));
        assert!(!admit(&mut old, 2, 0..512, "W2"));
        let mut new = WriteOrder::default();
        new.inherit(7, old.pending());
        assert_eq!(new.inherited(), 2);
        assert!(!new.is_idle());
        assert!(new.fenced(&(4000..4100)), "a read over W1");
        assert!(!new.fenced(&(4096..8192)), "a read next to it");
        assert!(!admit(&mut new, 1, 1024..1536, "N1"), "a write over W1");
        assert!(admit(&mut new, 2, 8192..9000, "N2"), "elsewhere: at once");
        // A fenced read waits in the same queue: behind N1, which came first.
        assert!(!admit(&mut new, 3, 1024..2048, "R"));
        // W1 ends on the retiring export: W2 runs there, and is still inherited here.
        assert_eq!(old.completed(1), vec![(2, "W2")]);
        assert_eq!(new.inherited_done(7, 1), vec![(1, "N1")]);
        assert!(new.fenced(&(0..1)), "W2 still in flight");
        assert_eq!(new.inherited_done(7, 99), vec![], "not inherited");
        assert_eq!(new.inherited_done(8, 2), vec![], "another export's token");
        assert_eq!(old.completed(2), vec![]);
        assert_eq!(new.inherited_done(7, 2), vec![], "R still waits for N1");
        assert_eq!(new.completed(1), vec![(3, "R")]);
        assert_eq!(new.inherited(), 0);
    }

    /// A retiring export that went away gives back whatever is still inherited from it; a
    /// write outside the new export's window (an empty range) is not inherited at all.
    #[test]
    fn forgetting_an_export_releases_what_it_held_back() {
        let mut new = WriteOrder::default();
        new.inherit(3, [(1, 0..512), (2, 600..600)].into_iter());
        assert_eq!(new.inherited(), 1);
        assert!(!admit(&mut new, 1, 0..512, "N1"));
        assert_eq!(new.forget_inherited(4), vec![]);
        assert_eq!(new.forget_inherited(3), vec![(1, "N1")]);
        assert_eq!(new.completed(1), vec![]);
        assert!(new.is_idle());
    }

    /// A store whose writes are recorded (offset, first byte) in the order they run; the
    /// first write waits until the gate opens, so the jobs behind it queue on the pool.
    #[derive(Debug, Default)]
    struct Recorder {
        log: std::sync::Mutex<Vec<(u64, u8)>>,
        gate: std::sync::Mutex<bool>,
        opened: std::sync::Condvar,
    }

    impl aoe_store::Backend for Recorder {
        fn len(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            let mut open = self.gate.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
            self.log.lock().unwrap().push((offset, buf[0]));
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Runs the writes `(source, token, offset, byte)` through a one-worker pool (taken
    /// round-robin by source) as the daemon submits them: through `WriteOrder` if `fence`,
    /// straight to the pool if not. The first write holds the worker until all are queued.
    /// Returns the order the store ran them in.
    fn run_through_pool(writes: &[(u64, u32, u64, u8)], fence: bool) -> Vec<(u64, u8)> {
        use aoe_store::{Job, Op, Pool};
        use std::sync::Arc;
        let store = Arc::new(Recorder::default());
        let pool = Pool::new(1, 64, Arc::new(|| {})).unwrap();
        let job = |&(source, token, offset, byte): &(u64, u32, u64, u8)| Job {
            backend: store.clone(),
            op: Op::Write {
                offset,
                from: 0..512,
            },
            user: u64::from(token),
            source,
            buf: vec![byte; 512],
        };
        let mut order = WriteOrder::default();
        for (i, w) in writes.iter().enumerate() {
            let range = w.2..w.2 + 512;
            if fence && order.must_wait(&range) {
                order.wait(w.1, range, job(w));
                continue;
            }
            order.started(w.1, range);
            pool.try_submit(job(w)).unwrap();
            if i == 0 {
                // The worker holds the first; the rest queue behind it.
                while pool.queued() != 0 {
                    std::thread::yield_now();
                }
            }
        }
        *store.gate.lock().unwrap() = true;
        store.opened.notify_all();
        let mut left = writes.len();
        while left > 0 {
            let done = pool
                .wait_done(std::time::Duration::from_secs(10))
                .expect("a write never completed");
            done.result.unwrap();
            left -= 1;
            for (_, released) in order.completed(done.user as u32) {
                pool.try_submit(released).unwrap();
            }
        }
        let log = store.log.lock().unwrap().clone();
        log
    }

    /// The pool takes queued jobs round-robin by source, so a later job of one source can
    /// run before an earlier one of another. Overlapping writes still run in arrival order
    /// whatever their sources: the later one is not queued until the earlier completed.
    #[test]
    fn overlapping_writes_of_two_sources_keep_their_order_through_the_round_robin_pool() {
        const F: u64 = 1; // a flooder: the write holding the worker, then two more
        const A: u64 = 2; // a write elsewhere, then W1 at 0
        const B: u64 = 3; // W2 at 0, after W1
        let writes = [
            (F, 1, 8192, 0xf1),
            (F, 2, 9216, 0xf2),
            (F, 3, 10240, 0xf3),
            (A, 4, 4096, 0xa0),
            (A, 5, 0, 0xa1),
            (B, 6, 0, 0xb2),
        ];
        // Without the fence the round-robin runs W2 first and W1's older data lands last:
        // the scene the fence is for.
        let unfenced = run_through_pool(&writes, false);
        let at0 = |log: &[(u64, u8)]| -> Vec<u8> {
            log.iter()
                .filter(|(o, _)| *o == 0)
                .map(|(_, b)| *b)
                .collect()
        };
        assert_eq!(at0(&unfenced), vec![0xb2, 0xa1], "{unfenced:x?}");
        // And each source's own writes ran in its order.
        let fenced = run_through_pool(&writes, true);
        assert_eq!(at0(&fenced), vec![0xa1, 0xb2], "{fenced:x?}");
        for log in [&unfenced, &fenced] {
            let of = |lo: u8| -> Vec<u8> {
                log.iter()
                    .map(|(_, b)| *b)
                    .filter(|b| b & 0xf0 == lo)
                    .collect()
            };
            assert_eq!(of(0xf0), vec![0xf1, 0xf2, 0xf3], "{log:x?}");
            assert_eq!(of(0xa0), vec![0xa0, 0xa1], "{log:x?}");
        }
    }
}
