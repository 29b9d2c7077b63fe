//! Operation splitting: block ops into frames of the device's payload, sent on the
//! window of the next usable target (`aoecmd_work`, `aoecmd_ata_rw`).

use super::*;

impl Engine {
    /// Queues IDENTIFY DEVICE (scnt 1) at the head of the device's queue.
    pub(super) fn queue_identify(&mut self, now: Instant, dev: TargetAddr) {
        let pending = self
            .ops
            .values()
            .any(|o| o.dev == dev && matches!(o.kind, OpKind::Identify));
        if !pending {
            self.new_op(dev, SourceId::ENGINE, OpKind::Identify, 0, 1, true);
        }
        self.pump(now, dev);
    }

    pub(super) fn new_op(
        &mut self,
        dev: TargetAddr,
        source: SourceId,
        kind: OpKind,
        lba: u64,
        sectors: u64,
        front: bool,
    ) -> u64 {
        let id = self.next_op;
        self.next_op += 1;
        self.ops.insert(
            id,
            Op {
                dev,
                source,
                kind,
                lba,
                sectors,
                issued: 0,
                reissue: Vec::new(),
                frames_out: 0,
                fenced: false,
                home: ReadHome::default(),
                held: None,
            },
        );
        if let Some(d) = self.devices.get_mut(&dev) {
            if front {
                d.queue.push_front(source, id, true);
            } else {
                d.queue.push_back(source, id);
            }
        }
        id
    }

    /// Sends queued frames while some target's window has room: first the copies waiting
    /// for a slot (`Device::rexmitq`, as the driver's `rexmit_deferred` runs before
    /// `aoecmd_work` sends new frames), then new frames, from each source's lane in turn,
    /// 256 KiB a turn ([`Queues`]).
    pub(super) fn pump(&mut self, now: Instant, addr: TargetAddr) {
        if !self.send_waiting_copies(now, addr) {
            return;
        }
        loop {
            let pick = self.pick_queued(addr);
            let Some(d) = self.devices.get_mut(&addr) else {
                return;
            };
            if d.life == Life::Down || d.payload == 0 {
                return;
            }
            let Some(at) = pick else {
                return;
            };
            let Some(op_id) = d.queue.get(at) else {
                return;
            };
            let Some(op) = self.ops.get_mut(&op_id) else {
                d.queue.remove(at, None);
                continue;
            };
            if d.life == Life::Identifying && !matches!(op.kind, OpKind::Identify) {
                return;
            }
            let Some(ti) = d.pick_target() else {
                return;
            };
            let payload = d.payload as u64;
            // (offset within the op, sector count)
            let (offset, count) = match (op.reissue.last_mut(), &op.kind) {
                (Some(r), _) => {
                    let n = r.1.min(payload);
                    let offset = r.0;
                    *r = (r.0 + n, r.1 - n);
                    if r.1 == 0 {
                        op.reissue.pop();
                    }
                    (offset, n as u8)
                }
                (None, OpKind::Read(_) | OpKind::Write(_)) => {
                    let n = (op.sectors - op.issued).min(payload);
                    op.issued += n;
                    (op.issued - n, n as u8)
                }
                // IDENTIFY returns one sector; FLUSH CACHE moves none.
                (None, OpKind::Identify | OpKind::Probe | OpKind::Verify) => {
                    op.issued = op.sectors;
                    (0, 1)
                }
                (None, OpKind::Flush) => {
                    op.issued = op.sectors;
                    (0, 0)
                }
            };
            op.frames_out += 1;
            let sent = u64::from(count) * SECTOR_SIZE as u64;
            if op.unsent() {
                d.queue.passed(at, sent);
            } else {
                d.queue.remove(at, Some(sent));
            }
            self.send_new(now, addr, op_id, ti, offset, count);
        }
    }

    /// The position in `addr`'s queue (lane, index) of the op to send a frame of next: in
    /// the lane whose turn it is, else the next lane in turn that has one, the first op
    /// that is neither a write with sectors under a fence (`Engine::fences`: a copy of an
    /// earlier write to them, from any source, may still reach the target, and would land
    /// after this one) nor an op overlapping one held back before it in its lane
    /// (overlapping ops of a source keep their order; those of different sources are
    /// concurrent, neither completed when the other was submitted, so either order is
    /// one the submitters may see). Ops already started go on; reads, flushes and
    /// IDENTIFY never wait for a fence: a late copy of a completed write writes what the
    /// read would see anyway, and a flush covers writes completed before it.
    /// Non-overlapping I/O passes a waiting write. What wakes a waiting write: an answer
    /// that lifts a fence pumps its device (`Engine::ata_response`), and
    /// [`Engine::poll_timeout`] reports the first fence's end while any op is queued.
    pub(super) fn pick_queued(&mut self, addr: TargetAddr) -> Option<(usize, usize)> {
        let d = self.devices.get(&addr)?;
        if self.fences.is_empty() {
            return d.queue.first().map(|l| (l, 0));
        }
        let overlaps = |a: (u64, u64), b: (u64, u64)| a.0 < b.1 && b.0 < a.1;
        let mut held_back: Vec<(u64, u64)> = Vec::new();
        let mut newly_fenced = Vec::new();
        let mut pick = None;
        'lanes: for (l, lane) in d.queue.in_turn() {
            held_back.clear();
            for (i, id) in lane.ops.iter().enumerate() {
                let Some(op) = self.ops.get(id) else {
                    pick = Some((l, i));
                    break 'lanes;
                };
                let data = matches!(op.kind, OpKind::Read(_) | OpKind::Write(_));
                if !data || op.issued > 0 || !op.reissue.is_empty() {
                    pick = Some((l, i));
                    break 'lanes;
                }
                let range = (op.lba, op.lba + op.sectors);
                let fenced = || {
                    matches!(op.kind, OpKind::Write(_))
                        && self.fences.values().any(|f| {
                            f.dev == addr && f.op != *id && overlaps(range, (f.lba, f.end))
                        })
                };
                if held_back.iter().any(|h| overlaps(*h, range)) || fenced() {
                    held_back.push(range);
                    if matches!(op.kind, OpKind::Write(_)) && !op.fenced {
                        newly_fenced.push(*id);
                    }
                    continue;
                }
                pick = Some((l, i));
                break 'lanes;
            }
        }
        for id in newly_fenced {
            if let Some(op) = self.ops.get_mut(&id) {
                op.fenced = true;
                self.stats.writes_fenced += 1;
            }
        }
        pick
    }

    /// Sends one new frame of `op` to target `ti`.
    pub(super) fn send_new(
        &mut self,
        now: Instant,
        addr: TargetAddr,
        op: u64,
        ti: usize,
        offset: u64,
        count: u8,
    ) {
        let tag = self.new_tag(now);
        let Some(d) = self.devices.get_mut(&addr) else {
            return;
        };
        let t = &mut d.targets[ti];
        t.nout += 1;
        t.max_nout = t.max_nout.max(t.nout);
        let rto = t.rto(&self.cfg);
        let pi = t.take_path();
        let iface = t.paths[pi].iface;
        let seq = t.take_seq();
        t.sent_order.push_back((seq, tag));
        t.last_sent = Some(now);
        let f = Outstanding {
            dev: addr,
            op,
            target: t.mac,
            iface,
            offset,
            count,
            sent: now,
            first_sent: now,
            deadline: self.deadline(now, now, rto),
            retransmits: 0,
            seq,
            later_answered: 0,
            after_silence: false,
            earlier: Vec::new(),
            waiting: None,
        };
        self.emit_frame(tag, &f);
        self.outstanding.insert(tag, f);
    }

    /// Hands sectors `offset..offset + sectors` of op `id` back to be sent again in frames
    /// of the device's current payload, ahead of the ops its source queued behind it.
    pub(super) fn reissue(&mut self, addr: TargetAddr, id: u64, offset: u64, sectors: u64) {
        let Some(op) = self.ops.get_mut(&id) else {
            return;
        };
        op.reissue.push((offset, sectors));
        let source = op.source;
        if let Some(d) = self.devices.get_mut(&addr) {
            if !d.queue.contains(source, id) {
                d.queue.push_front(source, id, false);
            }
        }
    }
}
