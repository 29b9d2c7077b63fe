//! A device's queued operations, one first-in-first-out lane per source ([`SourceId`]),
//! served in turn, 256 KiB at a time.
//!
//! One queue for every client of a device made a client's one small read wait for every
//! byte the others had queued before it (four NBD clients with 512 MiB of reads queued: a
//! fifth's 4 KiB read waited up to 9.5 s, docs/TEST-AUDIT.md "Sixth audit, the initiator's
//! side"). The Linux block layer keeps each submitter's requests apart (a plug per task)
//! and its schedulers (mq-deadline's FIFO batches, bfq's per-process queues) interleave
//! them; nbdkit serves each connection on its own threads. Here each source's ops keep
//! their order in their own lane, and [`Engine::pump`](super::Engine) takes frames from
//! the lane whose turn it is until it has sent [`QUANTUM_BYTES`] (or has nothing left to
//! send), then from the next lane with something to send: deficit round-robin by bytes
//! (a frame counts its data, whatever the size of the op it belongs to), not by command,
//! which would give a client of 1 MiB requests 256 times the share of one of 4 KiB
//! requests.
//!
//! The quantum is nbdcopy's and qemu's usual request (256 KiB) rather than one frame: a
//! frame-by-frame turn interleaved the clients' LBAs frame by frame, so the target could
//! no longer read a burst's contiguous sectors in one call, and four NBD connections'
//! reads at MTU 1500 cost the target 20 % more CPU per GB and ran 5-15 % slower than
//! with one queue (docs/PERFORMANCE.md "Session 24's merged main"). A small request now
//! waits for at most one quantum of each other backlogged source.
//!
//! With one source there is one lane, taken every time, as the single queue was. A lane
//! is dropped when it empties and its buffer kept for the next ([`SPARE_LANES`]), so a
//! source that comes and goes costs no allocation per command.

use std::collections::VecDeque;

use super::SourceId;

/// Bytes a lane sends in its turn before the next lane's turn (see the module's doc).
pub(super) const QUANTUM_BYTES: u64 = 256 << 10;

/// Emptied lanes' buffers kept for new lanes.
const SPARE_LANES: usize = 8;

/// A lane's buffer kept only up to this many entries of capacity (a lane that once held a
/// client's whole backlog does not keep its memory).
const SPARE_CAPACITY: usize = 1024;

#[derive(Debug)]
pub(super) struct Lane {
    pub(super) source: SourceId,
    /// Op ids in submission order (reissued and IDENTIFY ops pushed at the front).
    pub(super) ops: VecDeque<u64>,
}

/// The lanes with something queued, and whose turn it is.
#[derive(Debug, Default)]
pub(super) struct Queues {
    lanes: Vec<Lane>,
    /// The lane whose turn is next (below the lane count, or 0).
    turn: usize,
    /// Ops queued in all the lanes.
    len: usize,
    /// Bytes the lane whose turn it is has sent in this turn.
    spent: u64,
    spare: Vec<VecDeque<u64>>,
}

impl Queues {
    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The lane whose turn it is, if any lane has ops.
    pub(super) fn first(&self) -> Option<usize> {
        (!self.lanes.is_empty()).then_some(self.turn)
    }

    /// The lanes, the one whose turn it is first, then the others in turn: `(index, lane)`.
    pub(super) fn in_turn(&self) -> impl Iterator<Item = (usize, &Lane)> {
        let n = self.lanes.len();
        let start = self.turn;
        (0..n).map(move |k| {
            let i = if start + k < n {
                start + k
            } else {
                start + k - n
            };
            (i, &self.lanes[i])
        })
    }

    /// The op at position `at` (lane, index), if any.
    pub(super) fn get(&self, at: (usize, usize)) -> Option<u64> {
        self.lanes.get(at.0)?.ops.get(at.1).copied()
    }

    fn lane_of(&mut self, source: SourceId) -> usize {
        if let Some(i) = self.lanes.iter().position(|l| l.source == source) {
            return i;
        }
        let ops = self.spare.pop().unwrap_or_default();
        self.lanes.push(Lane { source, ops });
        self.lanes.len() - 1
    }

    /// Queues `id` at the end of `source`'s lane.
    pub(super) fn push_back(&mut self, source: SourceId, id: u64) {
        let i = self.lane_of(source);
        self.lanes[i].ops.push_back(id);
        self.len += 1;
    }

    /// Queues `id` at the front of `source`'s lane; `now` also makes it that lane's turn
    /// (IDENTIFY: nothing else is sent before its answer while the device is identifying).
    pub(super) fn push_front(&mut self, source: SourceId, id: u64, now: bool) {
        let i = self.lane_of(source);
        self.lanes[i].ops.push_front(id);
        self.len += 1;
        if now {
            self.turn = i;
            self.spent = 0;
        }
    }

    pub(super) fn contains(&self, source: SourceId, id: u64) -> bool {
        self.lanes
            .iter()
            .find(|l| l.source == source)
            .is_some_and(|l| l.ops.contains(&id))
    }

    /// Takes the op at `at` off its lane. `sent` is the data of the frame of it just sent
    /// (counted against the lane's quantum, [`Queues::passed`]; a frame without data, a
    /// FLUSH CACHE, counts as one byte like any other), `None` if no frame was (the op
    /// went without one: the turn stays where it was, and a lane that takes the turn by
    /// moving into the emptied lane's place starts a fresh quantum).
    pub(super) fn remove(&mut self, at: (usize, usize), sent: Option<u64>) {
        let Some(l) = self.lanes.get_mut(at.0) else {
            return;
        };
        if l.ops.remove(at.1).is_some() {
            self.len -= 1;
        }
        if l.ops.is_empty() {
            self.drop_lane(at.0);
            // The lanes after it moved down by one: the next one is now at its place.
            if sent.is_some() || self.turn == at.0 {
                self.turn = at.0;
                self.spent = 0;
            } else if self.turn > at.0 {
                self.turn -= 1;
            }
            if self.turn >= self.lanes.len() {
                self.turn = 0;
            }
        } else if let Some(sent) = sent {
            self.passed(at, sent);
        }
    }

    /// A frame of `sent` bytes of the op at `at` was sent: counted against its lane's
    /// quantum (a lane served out of turn, the one whose turn it was having nothing it may
    /// send, takes the turn); the next lane's turn once the quantum is spent.
    pub(super) fn passed(&mut self, at: (usize, usize), sent: u64) {
        if at.0 != self.turn {
            self.turn = at.0;
            self.spent = 0;
        }
        self.spent += sent.max(1);
        if self.spent >= QUANTUM_BYTES {
            self.spent = 0;
            self.turn = if at.0 + 1 < self.lanes.len() {
                at.0 + 1
            } else {
                0
            };
        }
    }

    /// Takes `id` off `source`'s lane wherever it is.
    pub(super) fn remove_op(&mut self, source: SourceId, id: u64) {
        let Some(i) = self.lanes.iter().position(|l| l.source == source) else {
            return;
        };
        if let Some(k) = self.lanes[i].ops.iter().position(|q| *q == id) {
            self.remove((i, k), None);
        }
    }

    pub(super) fn clear(&mut self) {
        while !self.lanes.is_empty() {
            self.drop_lane(self.lanes.len() - 1);
        }
        self.len = 0;
        self.turn = 0;
        self.spent = 0;
    }

    fn drop_lane(&mut self, i: usize) {
        let mut l = self.lanes.remove(i);
        self.len -= l.ops.len();
        if self.spare.len() < SPARE_LANES && l.ops.capacity() <= SPARE_CAPACITY {
            l.ops.clear();
            self.spare.push(l.ops);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes the front op of the lane whose turn it is, as `pump` does for a one-frame op
    /// of a whole quantum's bytes (the turn passes after each).
    fn take(q: &mut Queues) -> Option<u64> {
        let (i, _) = q.in_turn().next()?;
        let id = q.get((i, 0))?;
        q.remove((i, 0), Some(QUANTUM_BYTES));
        Some(id)
    }

    #[test]
    fn one_source_is_first_in_first_out() {
        let mut q = Queues::default();
        for id in 0..5 {
            q.push_back(SourceId(3), id);
        }
        let got: Vec<u64> = std::iter::from_fn(|| take(&mut q)).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert!(q.is_empty());
    }

    #[test]
    fn sources_take_turns_and_keep_their_own_order() {
        let mut q = Queues::default();
        for id in 0..4 {
            q.push_back(SourceId(1), id);
        }
        q.push_back(SourceId(2), 10);
        q.push_back(SourceId(2), 11);
        q.push_back(SourceId(3), 20);
        let got: Vec<u64> = std::iter::from_fn(|| take(&mut q)).collect();
        assert_eq!(got, vec![0, 10, 20, 1, 11, 2, 3]);
        assert!(q.is_empty());
    }

    #[test]
    fn an_op_sent_in_several_frames_passes_the_turn_after_each() {
        let mut q = Queues::default();
        q.push_back(SourceId(1), 0);
        q.push_back(SourceId(2), 1);
        // Op 0 needs three frames: its lane keeps it, the turn moves on each time.
        let mut sent = Vec::new();
        for _ in 0..2 {
            let (i, _) = q.in_turn().next().unwrap();
            let id = q.get((i, 0)).unwrap();
            sent.push(id);
            if id == 0 {
                q.passed((i, 0), QUANTUM_BYTES);
            } else {
                q.remove((i, 0), Some(QUANTUM_BYTES));
            }
        }
        assert_eq!(sent, vec![0, 1]);
        assert_eq!(take(&mut q), Some(0));
        assert!(q.is_empty());
    }

    #[test]
    fn identify_at_the_front_goes_first_and_removal_keeps_the_turn() {
        let mut q = Queues::default();
        q.push_back(SourceId(1), 0);
        q.push_back(SourceId(2), 1);
        q.push_front(SourceId::ENGINE, 9, true);
        assert_eq!(take(&mut q), Some(9));
        q.push_back(SourceId(1), 2);
        q.remove_op(SourceId(2), 1);
        assert_eq!(take(&mut q), Some(0));
        assert_eq!(take(&mut q), Some(2));
        assert!(q.is_empty());
        q.push_back(SourceId(5), 7);
        q.clear();
        assert!(q.is_empty() && q.in_turn().next().is_none());
    }

    #[test]
    fn a_lane_keeps_the_turn_until_it_has_sent_a_quantum() {
        let mut q = Queues::default();
        q.push_back(SourceId(1), 0);
        q.push_back(SourceId(2), 1);
        // Op 0 in 1 KiB frames (MTU 1500): a quantum of them before lane 2's turn.
        let frame = 1024;
        let per_turn = QUANTUM_BYTES / frame;
        for _ in 0..per_turn {
            let (i, _) = q.in_turn().next().unwrap();
            assert_eq!(q.get((i, 0)), Some(0));
            q.passed((i, 0), frame);
        }
        let (i, _) = q.in_turn().next().unwrap();
        assert_eq!(
            q.get((i, 0)),
            Some(1),
            "lane 2's turn after a quantum of lane 1's"
        );
        q.remove((i, 0), Some(frame));
        // Lane 2 emptied: lane 1's turn again, from a fresh quantum.
        let (i, _) = q.in_turn().next().unwrap();
        assert_eq!(q.get((i, 0)), Some(0));
        q.passed((i, 0), frame);
        let (i, _) = q.in_turn().next().unwrap();
        assert_eq!(q.get((i, 0)), Some(0));
    }

    /// A frame without data (FLUSH CACHE) that ends its op counts against the lane's
    /// quantum as one byte, as it does when the op has more to send: a lane at the end of
    /// its quantum passes the turn with it. (Counted as "not sent" it kept the turn.)
    #[test]
    fn a_frame_without_data_counts_against_the_quantum() {
        let mut q = Queues::default();
        q.push_back(SourceId(1), 0);
        q.push_back(SourceId(1), 1);
        q.push_back(SourceId(2), 2);
        q.passed((0, 0), QUANTUM_BYTES - 1);
        assert_eq!(q.first(), Some(0));
        q.remove((0, 0), Some(0));
        let (i, _) = q.in_turn().next().unwrap();
        assert_eq!(
            q.get((i, 0)),
            Some(2),
            "the flush's frame spent lane 1's last byte: lane 2's turn"
        );
    }

    /// A lane emptied without a frame (its last op answered or dropped while queued) hands
    /// the turn to the lane moving into its place with a fresh quantum, not with the bytes
    /// the emptied lane had spent.
    #[test]
    fn a_lane_emptied_without_a_frame_hands_on_no_spent_bytes() {
        let mut q = Queues::default();
        q.push_back(SourceId(1), 0);
        q.push_back(SourceId(2), 1);
        q.push_back(SourceId(3), 2);
        q.passed((0, 0), QUANTUM_BYTES - 10);
        q.remove_op(SourceId(1), 0);
        // Lane 2 is now first and has the turn: 20 bytes are far from its quantum.
        let (i, _) = q.in_turn().next().unwrap();
        assert_eq!(q.get((i, 0)), Some(1));
        q.passed((i, 0), 20);
        let (i, _) = q.in_turn().next().unwrap();
        assert_eq!(
            q.get((i, 0)),
            Some(1),
            "lane 2 keeps the turn after 20 bytes (it inherited lane 1's spent bytes)"
        );
    }
}
