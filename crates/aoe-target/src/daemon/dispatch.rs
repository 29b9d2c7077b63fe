//! I/O dispatch and completion: engine actions to store requests (submitted through
//! [`AsyncBackend`]: a file's run on the worker pool, an RBD image's as librbd aio), their
//! completions (one queue for every store, woken through the eventfd) back to the engine and
//! its replies to the send backlog; how a store error shows on the wire.
//!
//! Ordering: per export, a write that overlaps (byte ranges intersect) a write submitted to
//! the store and not completed, or an earlier write still waiting, is neither written
//! inline nor submitted: it waits in [`ExportRt::writes`] and is submitted once every earlier
//! overlapping write has completed, in arrival order ([`super::order`] says why: a
//! retransmitted write answered before its original must not let newer data be overwritten
//! by the original). Reads, flushes and writes to other sectors run in parallel as before. A
//! waiting write holds its engine slot (so counts against the buffer count) and a place of
//! [`POOL_QUEUE`] (so the waiting list is bounded like the pool's queue); when neither is
//! free the request is dropped and counted like one refused by a full store queue, and the
//! initiator retransmits.

use super::*;
use aoe_proto::target::InFlight;

impl Daemon {
    pub(super) fn dispatch(&mut self, idx: usize, f: usize, id: u32) {
        let cap = self.ifaces[idx].frame_cap;
        // A write must not overtake the reads staged before it in this batch: a read that
        // came first reads what was there before, as when each read was done on arrival.
        if may_write(self.ifaces[idx].frame(f)) {
            if self.ifaces[idx].has_unread() {
                self.run_staged_reads(idx);
            }
            // Likewise the reads held back for merging: submitted before the write is.
            if !self.gathering.is_empty() {
                self.submit_gathered_reads();
            }
            // A write that may have to wait for one on a worker must not get ahead of the
            // batch's staged writes: one of them that then went to a worker would wait
            // behind it, the older data landing last.
            if self.ifaces[idx].has_unwritten()
                && self.exports.get(&id).is_some_and(|rt| !rt.writes.is_idle())
            {
                self.run_staged_writes(idx);
            }
        } else if self.ifaces[idx].has_unwritten() {
            // And a read (or flush) must find the writes staged before it done.
            self.run_staged_writes(idx);
        }
        let Some(rt) = self.exports.get_mut(&id) else {
            return;
        };
        // What the loop's per-turn looks visit instead of every export (session 35).
        if !rt.listed_busy {
            rt.listed_busy = true;
            self.busy.push(id);
        }
        if !rt.listed_touched {
            rt.listed_touched = true;
            self.touched.push(id);
        }
        // Another gateway took the shared store over (broke our lock): not answered at
        // all, not even a Query Config, so that initiators re-send to that gateway (the
        // Linux driver moves a frame that timed out to another target of the device,
        // aoecmd.c `rexmit_timer`/`reassign_frame`; `aoe initiator` likewise) instead of
        // failing the application's I/O with an ATA error while it serves; with no such
        // gateway, their `deadsecs` still fails the I/O (docs/TEST-AUDIT.md, session 27).
        // A file export pays one test of `shared` (None) per frame.
        if rt.handed_over() {
            return;
        }
        let iface = &mut self.ifaces[idx];
        // With a transmit ring, the reply is built in its next free slot (a read's data is
        // read straight into it) and committed there: no reply buffer, no copy. Otherwise
        // (no ring, a full ring, replies queued ahead) in a buffer that goes to the backlog.
        let source = source_key(iface.frame(f), id);
        let (frame, slot) = iface.frame_and_slot(f, cap);
        let in_slot = slot.is_some();
        let mut owned = None;
        let reply: &mut [u8] = match slot {
            Some(s) => s,
            None => owned.insert(take_buffer(&mut self.spare, cap)),
        };
        // The store's size may have changed (`rbd resize`): re-read it for IDENTIFY, which the
        // initiator sends on discovery and on revalidate. Only whole sectors are exported.
        if aoe_proto::target::is_identify_request(frame) {
            let sectors = rt.backend.len() / 512;
            let old = rt.engine.config().sectors;
            if rt.engine.set_sectors(sectors) {
                tracing::info!(old, sectors, "{}: store resized", rt.spec.addr());
            }
        }
        // A shared store keeps the reserve list (issue 13): see [`super::shared`].
        let mut reserve_before = None;
        if rt.shared.is_some() {
            super::shared::take_reservation_update(rt);
            if aoe_proto::target::is_reserve_request(frame) {
                if rt.reserve_pending.is_some() {
                    // One change at a time: the initiator retransmits, and is answered
                    // from what the store then holds.
                    self.spare.extend(owned);
                    return;
                }
                reserve_before = Some(rt.engine.state().reserve.clone());
            }
        }
        rt.engine.set_now(self.rx_now);
        let outcome = rt.engine.handle_frame(idx, frame, &mut reply[..cap]);
        if let Some(before) = reserve_before {
            if rt.engine.state().reserve != before {
                let Outcome::Reply(n) = outcome else {
                    let _ = rt.engine.set_reserve(before);
                    self.spare.extend(owned);
                    return;
                };
                // The reply waits for the cluster, so in a buffer of its own: a transmit
                // slot must not be held (the kernel sends slots in order).
                let mut buf = take_buffer(&mut self.spare, cap);
                buf[..n].copy_from_slice(&reply[..n]);
                self.spare.extend(owned);
                super::shared::store_reservation(rt, id, idx, before, buf, n, &self.completions);
                return;
            }
        }
        let n = match outcome {
            Outcome::Reply(n) => n,
            Outcome::Drop(reason) => {
                // A frame per dropped request would let any sender fill the log: checked
                // only when trace is on, then one line a second.
                if tracing::enabled!(tracing::Level::TRACE) {
                    if let Some(a) = self.logs.check(Instant::now(), "frame dropped") {
                        tracing::trace!(export = %rt.spec.addr(), %reason, "frame dropped{a}");
                    }
                }
                self.spare.extend(owned);
                return;
            }
            Outcome::Io(req) => {
                // Fast path: data in the page cache is read (and a write that need not wait is
                // written) right here with RWF_NOWAIT; only I/O that would block goes to a
                // worker. Either way the event loop never waits on the disk.
                let write_range = match &req.kind {
                    IoKind::Write { offset, data } => Some(*offset..*offset + data.len() as u64),
                    _ => None,
                };
                // The range a request that waits holds in the queue of waiting ones: a write
                // that overlaps an earlier one, or a read that overlaps a write inherited
                // from a retiring export ([`super::order`]).
                let wait_range = match &req.kind {
                    IoKind::Write { .. } => write_range.clone().filter(|r| rt.writes.must_wait(r)),
                    IoKind::Read { offset, len } => {
                        Some(*offset..*offset + *len as u64).filter(|r| rt.writes.fenced(r))
                    }
                    IoKind::Flush => None,
                };
                let ordered = wait_range.is_some();
                // With a transmit slot, a read of a file that can be read without blocking
                // is staged: at the end of the batch its contiguous reads are read into their
                // slots with one preadv2 each run, or all of them with one io_uring_enter
                // (run_staged_reads).
                if let (IoKind::Read { offset, len }, true, false) = (&req.kind, in_slot, ordered) {
                    if let Ok(Some(_)) = rt.backend.inline_read_source(*offset, *len) {
                        iface.stage(Staged::Read {
                            id,
                            token: req.token,
                            source,
                            offset: *offset,
                            len: *len,
                            done: None,
                        });
                        return;
                    }
                }
                // Likewise a write that need not wait for an earlier one: the batch's writes
                // run at its end (run_staged_writes), contiguous ones as one pwritev.
                if let (IoKind::Write { offset, data }, true, false) = (&req.kind, in_slot, ordered)
                {
                    iface.stage(Staged::Write {
                        id,
                        token: req.token,
                        offset: *offset,
                        frame: f,
                        data: data.clone(),
                        done: None,
                    });
                    return;
                }
                let inline = match &req.kind {
                    _ if ordered => Ok(false),
                    IoKind::Read { offset, len } => rt
                        .backend
                        .try_read_at(&mut reply[ATA_HEADER_LEN..ATA_HEADER_LEN + len], *offset),
                    IoKind::Write { offset, data } => {
                        rt.backend.try_write_at(&frame[data.clone()], *offset)
                    }
                    IoKind::Flush => Ok(false),
                };
                let result = match inline {
                    Ok(false) => None,
                    Ok(true) => Some(Ok(())),
                    Err(e) => {
                        let e = StoreError::from(e);
                        if let Some(a) = self.logs.check(Instant::now(), "I/O failed") {
                            tracing::warn!(error = %e, "{}: I/O failed{}{a}", rt.spec.addr(), failed_at(&rt.engine, req.token));
                        }
                        Some(Err(ata_failure(&e)))
                    }
                };
                if let Some(result) = result {
                    match rt.engine.complete(req.token, result, reply) {
                        Some(n) => n,
                        None => {
                            self.spare.extend(owned);
                            return;
                        }
                    }
                } else {
                    note_iface(rt, req.token, idx);
                    // The job needs a buffer of its own: a transmit slot stays free for the
                    // next reply.
                    let mut buf = owned.unwrap_or_else(|| take_buffer(&mut self.spare, cap));
                    let op = match req.kind {
                        IoKind::Read { offset, len } => Op::Read {
                            offset,
                            at: ATA_HEADER_LEN..ATA_HEADER_LEN + len,
                        },
                        IoKind::Write { offset, data } => {
                            // The receive batch is reused: the write data travels in the
                            // reply buffer, whose header the completion then overwrites.
                            buf[..frame.len()].copy_from_slice(frame);
                            Op::Write { offset, from: data }
                        }
                        IoKind::Flush => Op::Flush,
                    };
                    let job = Request {
                        op,
                        token: (u64::from(id) << 32) | u64::from(req.token.0),
                        source,
                        buf,
                    };
                    if ordered {
                        if rt.backend.queued() + self.waiting_writes >= POOL_QUEUE {
                            rt.engine.abort(req.token);
                            self.spare.push(job.buf);
                            rt.pool_full_drops += 1;
                            return;
                        }
                        let range = wait_range.unwrap_or_else(|| unreachable!());
                        rt.writes.wait(req.token.0, range, job);
                        self.waiting_writes += 1;
                        return;
                    }
                    // A store that merges contiguous reads gets the batch's together, at
                    // its end.
                    if matches!(job.op, Op::Read { .. }) && rt.backend.merges_reads() {
                        if rt.gathered.is_empty() {
                            self.gathering.push(id);
                        }
                        rt.gathered.push(job);
                        return;
                    }
                    match rt.backend.submit(job) {
                        Ok(()) => {
                            if let Some(range) = write_range {
                                rt.writes.started(req.token.0, range);
                            }
                        }
                        Err(job) => {
                            rt.engine.abort(req.token);
                            self.spare.push(job.buf);
                            rt.pool_full_drops += 1;
                        }
                    }
                    return;
                }
            }
        };
        match owned {
            Some(buf) => iface.queue(buf, n, &mut self.spare),
            None => iface.commit(n),
        }
    }

    /// Runs the reads staged in interface `idx`'s batch that have not run yet, each
    /// straight into its transmit slot: each run of reads of one export that follow each
    /// other on the store (a sequential reader's) with one `preadv2` (`RWF_NOWAIT` where the
    /// data may not be cached), which walks the page cache once for the run; with
    /// [`URING_MIN_READS`] runs or more (random reads at a large window) all of them with
    /// one `io_uring_enter` instead. A read that did not run (an error, a short read) is
    /// tried alone by `finish_staged`; one that would block goes to a worker there. If
    /// io_uring fails, it is closed (logged once).
    pub(super) fn run_staged_reads(&mut self, idx: usize) {
        let IfaceRt { batch, staged, .. } = &mut self.ifaces[idx];
        let Batch::Ring(ring) = batch else {
            return;
        };
        // Kept in the daemon for their capacity: arrays of the most parts, zeroed per call,
        // were 2 KiB of memset for the one or two reads a batch holds at window 16.
        let members = &mut self.read_members;
        let (mut runs, mut j) = (0, 0);
        // Counted only as far as the choice below needs.
        while runs < URING_MIN_READS {
            let Some((_, next)) = read_run(staged, j, members) else {
                break;
            };
            runs += 1;
            j = next;
        }
        if runs == 0 {
            return;
        }
        if runs < URING_MIN_READS || self.uring.is_none() {
            let parts = &mut self.read_parts;
            let mut j = 0;
            while let Some((m, next)) = read_run(staged, j, members) {
                j = next;
                let mut total = 0;
                parts.clear();
                for &k in &members[..m] {
                    let len = staged[k].read_len();
                    total += len;
                    parts.push(aoe_sys::SlotPart {
                        ahead: k,
                        at: ATA_HEADER_LEN,
                        len,
                    });
                }
                let Staged::Read { id, offset, .. } = &staged[members[0]] else {
                    continue;
                };
                let Some(Ok(Some(src))) = self
                    .exports
                    .get(id)
                    .map(|rt| rt.backend.inline_read_source(*offset, total))
                else {
                    continue;
                };
                let r = ring.preadv_into_slots(src.fd, src.pos, parts, src.nowait);
                let mut end = 0;
                for &k in &members[..m] {
                    let Staged::Read { len, done, .. } = &mut staged[k] else {
                        continue;
                    };
                    end += *len;
                    *done = match &r {
                        Ok(aoe_sys::NoWait::Done(n)) if end <= *n => {
                            Some(Ok(aoe_sys::NoWait::Done(*len)))
                        }
                        // Only part was cached: the rest goes to a worker.
                        Ok(aoe_sys::NoWait::Done(_)) if src.nowait => {
                            Some(Ok(aoe_sys::NoWait::WouldBlock))
                        }
                        Ok(w @ (aoe_sys::NoWait::WouldBlock | aoe_sys::NoWait::Unsupported)) => {
                            Some(Ok(*w))
                        }
                        // A short read that could have waited (the file shrank) or an error:
                        // each read alone in finish_staged, which learns which one fails.
                        Ok(aoe_sys::NoWait::Done(_)) | Err(_) => None,
                    };
                }
            }
            return;
        }
        let Some(uring) = &mut self.uring else {
            return;
        };
        let exports = &self.exports;
        let reads = staged.iter().enumerate().filter_map(|(j, s)| match s {
            Staged::Read {
                id,
                offset,
                len,
                done: None,
                ..
            } => {
                let (file, pos) = exports
                    .get(id)?
                    .backend
                    .nowait_read_source(*offset, *len)
                    .ok()??;
                Some(aoe_sys::SlotRead {
                    file,
                    offset: pos,
                    slot: j,
                    at: ATA_HEADER_LEN,
                    len: *len,
                    user: j,
                })
            }
            _ => None,
        });
        let out = &mut self.uring_out;
        out.clear();
        if let Err(e) = uring.read_into_slots(ring, reads, out) {
            tracing::error!(
                error = %e,
                "io_uring failed; cached reads use one preadv2 each from now on"
            );
            self.uring = None;
        }
        for (j, r) in out.drain(..) {
            if let Some(Staged::Read { done, .. }) = staged.get_mut(j) {
                *done = Some(r);
            }
        }
    }

    /// Runs the writes staged in interface `idx`'s batch that have not run yet, in arrival
    /// order: each run of writes to one export that follow each other on the store
    /// (contiguous, in order) as one `try_write_vectored_at` (one `pwritev`), the others one
    /// each. A write that now overlaps one on a worker waits for it ([`super::order`]); writes
    /// the store cannot take inline go to a worker, in order, as from `dispatch`. Two writes
    /// to the same sectors in one batch are never in one run, and the later one is written
    /// after the earlier: the later data is what stays.
    pub(super) fn run_staged_writes(&mut self, idx: usize) {
        if !self.ifaces[idx].has_unwritten() {
            return;
        }
        let mut staged = std::mem::take(&mut self.ifaces[idx].staged);
        let mut run: Vec<usize> = std::mem::take(&mut self.write_run);
        run.clear();
        let mut run_end = 0;
        for j in 0..staged.len() {
            let Staged::Write {
                id,
                offset,
                ref data,
                done: None,
                ..
            } = staged[j]
            else {
                continue;
            };
            let range = offset..offset + data.len() as u64;
            let joins = match run.last().map(|&k| &staged[k]) {
                Some(Staged::Write { id: rid, .. }) => {
                    *rid == id && run_end == offset && run.len() < aoe_sys::MAX_WRITEV
                }
                _ => false,
            };
            if !joins {
                // Written (or on a worker) before the next write looks for overlaps.
                self.write_staged_run(idx, &mut staged, &run);
                run.clear();
            }
            if self
                .exports
                .get(&id)
                .is_some_and(|rt| rt.writes.must_wait(&range))
            {
                self.write_staged_run(idx, &mut staged, &run);
                run.clear();
                self.write_to_worker(idx, &mut staged[j], true);
                continue;
            }
            run.push(j);
            run_end = range.end;
        }
        self.write_staged_run(idx, &mut staged, &run);
        run.clear();
        self.write_run = run;
        self.ifaces[idx].staged = staged;
    }

    /// Writes the staged writes `run` (contiguous, one export) with one
    /// `try_write_vectored_at`; what it cannot take goes to a worker, each on its own, in
    /// order; after an error, each is tried alone, so the reply of each says how it went.
    fn write_staged_run(&mut self, idx: usize, staged: &mut [Staged], run: &[usize]) {
        let Some(&first) = run.first() else {
            return;
        };
        let Staged::Write { id, offset, .. } = staged[first] else {
            return;
        };
        let Some(rt) = self.exports.get(&id) else {
            // The export went away (a reload) with its engine: nothing to answer.
            for &j in run {
                set_write_done(&mut staged[j], WriteDone::Handed);
            }
            return;
        };
        let iface = &self.ifaces[idx];
        let slice = |j: usize| match &staged[j] {
            Staged::Write { frame, data, .. } => &iface.frame(*frame)[data.clone()],
            _ => &[][..],
        };
        // A run of one (every random write) is the store's one-slice write, without the
        // 64-slice array the vectored call takes: the stores answer both alike
        // (`Backend::try_write_vectored_at`), and zeroing that array was a third of this
        // function at MTU 1500 random writes (docs/PERFORMANCE.md, session 25).
        let all = if let [only] = run {
            rt.backend.try_write_at(slice(*only), offset)
        } else {
            let mut bufs: [&[u8]; aoe_sys::MAX_WRITEV] = [&[]; aoe_sys::MAX_WRITEV];
            for (b, &j) in bufs.iter_mut().zip(run) {
                *b = slice(j);
            }
            rt.backend.try_write_vectored_at(&bufs[..run.len()], offset)
        };
        match all {
            Ok(true) => {
                for &j in run {
                    set_write_done(&mut staged[j], WriteDone::Inline(Ok(())));
                }
            }
            Ok(false) => {
                for &j in run {
                    self.write_to_worker(idx, &mut staged[j], false);
                }
            }
            Err(_) => {
                for &j in run {
                    let Staged::Write {
                        offset,
                        frame,
                        ref data,
                        token,
                        ..
                    } = staged[j]
                    else {
                        continue;
                    };
                    let Some(rt) = self.exports.get(&id) else {
                        continue;
                    };
                    let buf = &self.ifaces[idx].frame(frame)[data.clone()];
                    match rt.backend.try_write_at(buf, offset) {
                        Ok(true) => set_write_done(&mut staged[j], WriteDone::Inline(Ok(()))),
                        Ok(false) => self.write_to_worker(idx, &mut staged[j], false),
                        Err(e) => {
                            let e = StoreError::from(e);
                            if let Some(a) = self.logs.check(Instant::now(), "I/O failed") {
                                tracing::warn!(error = %e, "{}: I/O failed{}{a}", rt.spec.addr(), failed_at(&rt.engine, token));
                            }
                            set_write_done(&mut staged[j], WriteDone::Inline(Err(ata_failure(&e))));
                        }
                    }
                }
            }
        }
    }

    /// Hands staged write `s` to the store's workers in a buffer of its own (the receive
    /// batch is reused), as `dispatch` does: behind the earlier overlapping writes if
    /// `waits`, else submitted now. A full queue drops it (counted; the initiator
    /// retransmits).
    fn write_to_worker(&mut self, idx: usize, s: &mut Staged, waits: bool) {
        let Staged::Write {
            id,
            token,
            offset,
            frame,
            ref data,
            ..
        } = *s
        else {
            return;
        };
        let data = data.clone();
        set_write_done(s, WriteDone::Handed);
        let cap = self.ifaces[idx].frame_cap;
        let Some(rt) = self.exports.get_mut(&id) else {
            return;
        };
        note_iface(rt, token, idx);
        let frame = self.ifaces[idx].frame(frame);
        let mut buf = take_buffer(&mut self.spare, cap.max(frame.len()));
        buf[..frame.len()].copy_from_slice(frame);
        let range = offset..offset + data.len() as u64;
        let job = Request {
            op: Op::Write { offset, from: data },
            token: (u64::from(id) << 32) | u64::from(token.0),
            source: source_key(frame, id),
            buf,
        };
        if waits {
            if rt.backend.queued() + self.waiting_writes >= POOL_QUEUE {
                rt.engine.abort(token);
                self.spare.push(job.buf);
                rt.pool_full_drops += 1;
                return;
            }
            rt.writes.wait(token.0, range, job);
            self.waiting_writes += 1;
            return;
        }
        match rt.backend.submit(job) {
            Ok(()) => rt.writes.started(token.0, range),
            Err(job) => {
                rt.engine.abort(token);
                self.spare.push(job.buf);
                rt.pool_full_drops += 1;
            }
        }
    }

    /// Ends interface `idx`'s receive batch: runs its staged reads
    /// ([`run_staged_reads`](Self::run_staged_reads)), then marks its replies for sending in
    /// order. A read that would block (or was only partly cached) goes to a worker, as it
    /// did from `dispatch`, and gives up its slot: the kernel sends transmit slots in order
    /// and stops at the first one not marked, so the replies after it are moved down one
    /// slot each ([`PacketRing::commit_from`], a copy only in that case).
    pub(super) fn finish_staged(&mut self, idx: usize) {
        if self.ifaces[idx].staged.is_empty() {
            return;
        }
        self.run_staged_writes(idx);
        self.run_staged_reads(idx);
        let cap = self.ifaces[idx].frame_cap;
        let mut staged = std::mem::take(&mut self.ifaces[idx].staged);
        // Slots given up so far: the reply of entry j is now `skipped` slots after the next
        // free one.
        let mut skipped = 0;
        for s in staged.drain(..) {
            let iface = &mut self.ifaces[idx];
            let Batch::Ring(ring) = &mut iface.batch else {
                break;
            };
            let n = match s {
                Staged::Ready(n) => Some(n),
                Staged::Write {
                    id,
                    token,
                    done: Some(WriteDone::Inline(r)),
                    ..
                } => match (self.exports.get_mut(&id), ring.slot_ahead(skipped)) {
                    (Some(rt), Some(slot)) => rt.engine.complete(token, r, &mut slot[..cap]),
                    _ => None,
                },
                // Handed to a worker (or to the writes waiting for an earlier one), or dropped:
                // its reply, if any, comes from there.
                Staged::Write { .. } => None,
                Staged::Read {
                    id,
                    token,
                    source,
                    offset,
                    len,
                    done,
                } => {
                    let (Some(rt), Some(slot)) =
                        (self.exports.get_mut(&id), ring.slot_ahead(skipped))
                    else {
                        skipped += 1;
                        continue;
                    };
                    let slot = &mut slot[..cap];
                    let data = &mut slot[ATA_HEADER_LEN..ATA_HEADER_LEN + len];
                    let result = match done {
                        Some(Ok(aoe_sys::NoWait::Done(m))) if m == len => Some(Ok(())),
                        // Not run (io_uring failed) or the file has no RWF_NOWAIT: one
                        // preadv2, which also notes the latter for the next reads.
                        None | Some(Ok(aoe_sys::NoWait::Unsupported)) => {
                            match rt.backend.try_read_at(data, offset) {
                                Ok(true) => Some(Ok(())),
                                Ok(false) => None,
                                Err(e) => Some(Err(e)),
                            }
                        }
                        Some(Ok(_)) => None,
                        Some(Err(e)) => Some(Err(e)),
                    };
                    match result {
                        Some(r) => {
                            let r = r.map_err(|e| {
                                let e = StoreError::from(e);
                                if let Some(a) = self.logs.check(Instant::now(), "I/O failed") {
                                    tracing::warn!(error = %e, "{}: I/O failed{}{a}", rt.spec.addr(), failed_at(&rt.engine, token));
                                }
                                ata_failure(&e)
                            });
                            rt.engine.complete(token, r, slot)
                        }
                        None => {
                            read_to_worker(
                                rt,
                                &mut self.spare,
                                idx,
                                id,
                                (token, source),
                                offset,
                                len,
                                cap,
                            );
                            None
                        }
                    }
                }
            };
            match n {
                Some(n) => {
                    if ring.commit_from(skipped, n).is_err() {
                        iface.send_failures += 1;
                    }
                }
                None => skipped += 1,
            }
        }
        self.ifaces[idx].reset_staged(staged);
    }

    /// Hands each export's reads held back in this receive batch ([`ExportRt::gathered`])
    /// to its store at once ([`AsyncBackend::submit_reads`]: an RBD image reads each
    /// contiguous run with one librbd call). Reads the store cannot take are dropped and
    /// counted like a full queue's, and the initiator retransmits them.
    pub(super) fn submit_gathered_reads(&mut self) {
        let mut ids = std::mem::take(&mut self.gathering);
        for id in ids.drain(..) {
            let Some(rt) = self.exports.get_mut(&id) else {
                continue;
            };
            let reads = std::mem::take(&mut rt.gathered);
            for job in rt.backend.submit_reads(reads) {
                rt.engine.abort(Token(job.token as u32));
                self.spare.push(job.buf);
                rt.pool_full_drops += 1;
            }
        }
        // Kept for its capacity.
        self.gathering = ids;
    }

    pub(super) fn complete_io(&mut self) {
        while let Some(done) = self.completions.try_pop() {
            self.finish(done);
        }
    }

    /// Turns a finished request into a reply queued on the interface its request came from.
    pub(super) fn finish(&mut self, done: Done) {
        let id = (done.user >> 32) as u32;
        let token = Token(done.user as u32);
        if token.0 == super::shared::RESERVE_TOKEN {
            self.reservation_stored(id, done.buf, done.result);
            return;
        }
        let mut buf = done.buf;
        let Some(rt) = self.exports.get_mut(&id) else {
            self.spare.push(buf);
            return;
        };
        // A request that failed once another gateway took the store over (a write the
        // cluster refused because we are blocklisted, or one refused since) is not
        // answered: the initiator re-sends it to that gateway, where it lands. (One that
        // succeeded is answered: it is on the OSDs.)
        if done.result.is_err() && rt.handed_over() {
            rt.engine.abort(token);
            self.spare.push(buf);
            self.ended(id, token.0);
            return;
        }
        let logs = &mut self.logs;
        let result = done.result.map_err(|e| {
            let e = StoreError::from(e);
            if let Some(a) = logs.check(Instant::now(), "I/O failed") {
                tracing::warn!(error = %e, "{}: I/O failed{}{a}", rt.spec.addr(), failed_at(&rt.engine, token));
            }
            ata_failure(&e)
        });
        let idx = rt.token_iface.get(token.0 as usize).map_or(0, |&(i, _)| i);
        match rt.engine.complete(token, result, &mut buf) {
            Some(n) if idx < self.ifaces.len() => self.ifaces[idx].queue(buf, n, &mut self.spare),
            _ => self.spare.push(buf),
        }
        self.ended(id, token.0);
    }

    /// Export `id`'s request `token` ended (answered or given up): the requests that waited
    /// for it go now, in arrival order, in this export and in those that inherited it
    /// ([`ExportRt::heirs`]). One the store refuses is dropped (the initiator retransmits)
    /// and ends in turn.
    pub(super) fn ended(&mut self, id: u32, token: u32) {
        // (export whose queue changes, export the ended request belongs to, its token)
        let mut work = vec![(id, id, token)];
        while let Some((at, of, t)) = work.pop() {
            let Some(rt) = self.exports.get_mut(&at) else {
                continue;
            };
            let released = if at == of {
                work.extend(rt.heirs.iter().map(|&h| (h, of, t)));
                rt.writes.completed(t)
            } else {
                rt.writes.inherited_done(of, t)
            };
            let refused = submit_released(rt, released, &mut self.waiting_writes, &mut self.spare);
            work.extend(refused.into_iter().map(|t| (at, at, t)));
        }
    }

    /// Export `id` is gone: the exports that inherited its writes stop waiting for them.
    pub(super) fn forget_export(&mut self, id: u32) {
        let mut refused = Vec::new();
        for (&at, rt) in self.exports.iter_mut() {
            let released = rt.writes.forget_inherited(id);
            let gone = submit_released(rt, released, &mut self.waiting_writes, &mut self.spare);
            refused.extend(gone.into_iter().map(|t| (at, t)));
        }
        for (at, t) in refused {
            self.ended(at, t);
        }
    }

    /// Waits up to `limit` for the I/O in flight to finish, answering each as it does.
    /// Returns what is still in flight after `limit`, by export (empty: everything was
    /// answered); each is logged, one line per export.
    pub(super) fn drain_io(&mut self, limit: Duration) -> Vec<(aoe_wire::TargetAddr, InFlight)> {
        let start = Instant::now();
        while self.exports.values().any(|e| e.engine.in_flight() > 0) {
            if start.elapsed() > limit {
                let mut left: Vec<_> = self
                    .exports
                    .values()
                    .filter(|e| e.engine.in_flight() > 0)
                    .map(|e| (e.spec.addr(), e.engine.in_flight_kinds()))
                    .collect();
                left.sort_by_key(|(a, _)| *a);
                for (addr, what) in &left {
                    tracing::error!(
                        "{addr}: {what} still in flight {} s after the stop; never answered",
                        limit.as_secs()
                    );
                }
                return left;
            }
            if let Some(done) = self.completions.wait(Duration::from_millis(100)) {
                self.finish(done);
                self.complete_io();
                self.flush_sends();
            }
        }
        Vec::new()
    }

    /// At a stop, after [`Daemon::drain_io`]: makes every writable export's acknowledged
    /// writes durable ([`AsyncBackend::sync_at_stop`], fdatasync for a file), so that a clean
    /// stop leaves none of them only in the page cache (the initiator may never have sent
    /// its FLUSH). Waits at most `limit` (at least 1 s) for the stores, on a thread of its
    /// own so that a hung store cannot hold the stop. Returns what failed or did not finish,
    /// one line each (each also logged).
    pub(super) fn sync_exports(&mut self, limit: Duration) -> Vec<String> {
        let stores: Vec<_> = self
            .exports
            .values()
            .filter(|e| !e.backend.read_only())
            .map(|e| (e.spec.addr(), e.backend.clone()))
            .collect();
        if stores.is_empty() {
            return Vec::new();
        }
        let addrs: Vec<_> = stores.iter().map(|(a, _)| *a).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        let inline = stores.clone();
        let spawned = std::thread::Builder::new()
            .name("aoe-stop-sync".into())
            .spawn(move || {
                for (addr, store) in stores {
                    let _ = tx.send((addr, store.sync_at_stop()));
                }
            });
        if let Err(e) = spawned {
            // No thread (a cgroup's pids.max reached: EAGAIN): sync here, without the time
            // limit, rather than stop with acknowledged writes only in the page cache.
            // Until session 36 this gave up, and the stop exited 1 with work lost.
            tracing::warn!(
                error = %e,
                "no thread to sync the stores at the stop; syncing them on this one, \
                 without the {} s limit",
                limit.max(Duration::from_secs(1)).as_secs()
            );
            let mut lost = Vec::new();
            for (addr, store) in inline {
                if let Err(e) = store.sync_at_stop() {
                    let line = format!("{addr}: syncing the store at the stop failed: {e}");
                    tracing::error!("{line}");
                    lost.push(line);
                }
            }
            return lost;
        }
        let deadline = Instant::now() + limit.max(Duration::from_secs(1));
        let mut lost = Vec::new();
        let mut synced = Vec::new();
        while synced.len() < addrs.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((addr, Ok(()))) => synced.push(addr),
                Ok((addr, Err(e))) => {
                    synced.push(addr);
                    let line = format!("{addr}: syncing the store at the stop failed: {e}");
                    tracing::error!("{line}");
                    lost.push(line);
                }
                Err(_) => {
                    for addr in addrs.iter().filter(|a| !synced.contains(a)) {
                        let line = format!(
                            "{addr}: store not synced {} s after the stop",
                            limit.max(Duration::from_secs(1)).as_secs()
                        );
                        tracing::error!("{line}");
                        lost.push(line);
                    }
                    break;
                }
            }
        }
        lost
    }
}

/// Reads of one batch at least for io_uring; fewer are one `preadv2` each. Measured (docs/PERFORMANCE.md,
/// "The target's fast path"): at window 16 (batches of a few reads) one `io_uring_enter`
/// cost more target CPU than the `preadv2` calls it replaced, at window 64 less.
const URING_MIN_READS: usize = 8;

/// The run of unread reads starting at the first unread one at or after `staged[from]`:
/// reads of one export, each starting where the one before ends (entries in between that
/// are not unread reads are passed over), at most [`aoe_sys::MAX_SLOT_PARTS`]. Their indices
/// replace what `members` held; returns how many, and where to look for the next run.
fn read_run(staged: &[Staged], from: usize, members: &mut Vec<usize>) -> Option<(usize, usize)> {
    let first = from + staged.get(from..)?.iter().position(Staged::unread)?;
    let Staged::Read {
        id, offset, len, ..
    } = &staged[first]
    else {
        return None;
    };
    let (id, mut end) = (*id, offset + *len as u64);
    members.clear();
    members.push(first);
    let mut k = first + 1;
    while k < staged.len() && members.len() < aoe_sys::MAX_SLOT_PARTS {
        match &staged[k] {
            Staged::Read {
                id: i,
                offset: o,
                len: l,
                done: None,
                ..
            } if *i == id && *o == end => {
                members.push(k);
                end += *l as u64;
            }
            Staged::Read { done: None, .. } => break,
            _ => {}
        }
        k += 1;
    }
    Some((members.len(), k))
}

/// A reply of the current receive batch, in a transmit slot not yet marked
/// ([`IfaceRt::staged`]).
pub(super) enum Staged {
    /// Built: a frame of this many bytes.
    Ready(usize),
    /// Export `id`'s read for `token` of `len` bytes at `offset`, to be read into the slot
    /// behind the reply header; `done` once it has run.
    Read {
        id: u32,
        token: Token,
        /// [`source_key`] of the request.
        source: u64,
        offset: u64,
        len: usize,
        done: Option<io::Result<aoe_sys::NoWait>>,
    },
    /// Export `id`'s write for `token` of `data` (a range of received frame `frame`) at
    /// `offset`; `done` once it has run ([`Daemon::run_staged_writes`]).
    Write {
        id: u32,
        token: Token,
        offset: u64,
        frame: usize,
        data: std::ops::Range<usize>,
        done: Option<WriteDone>,
    },
}

impl Staged {
    /// True for a read that has not run yet.
    pub(super) fn unread(&self) -> bool {
        matches!(self, Staged::Read { done: None, .. })
    }

    /// The length of a read, 0 for anything else.
    pub(super) fn read_len(&self) -> usize {
        match self {
            Staged::Read { len, .. } => *len,
            _ => 0,
        }
    }

    /// True for a write that has not run yet.
    pub(super) fn unwritten(&self) -> bool {
        matches!(self, Staged::Write { done: None, .. })
    }
}

/// How a staged write went.
pub(super) enum WriteDone {
    /// Written by the loop (or failed): the reply goes in its slot.
    Inline(Result<(), IoFailure>),
    /// Handed to a worker or to the writes waiting for an earlier one, or dropped: its slot
    /// is given up.
    Handed,
}

fn set_write_done(s: &mut Staged, d: WriteDone) {
    if let Staged::Write { done, .. } = s {
        *done = Some(d);
    }
}

/// True if `frame` may be an ATA write: AoE command 0 (ATA, byte 19) with the AFlags W bit
/// (byte 24, 0x01; AoEr11 section 3.1). Only the fixed headers are looked at; the engine
/// parses the frame properly afterwards.
pub(super) fn may_write(frame: &[u8]) -> bool {
    frame.get(19) == Some(&0) && frame.get(24).is_some_and(|a| a & 0x01 != 0)
}

/// Submits the requests a fence `released` (they leave the waiting queue: `waiting_writes`
/// counts them). One the store refuses (its queue full) is aborted, dropped (the initiator
/// retransmits) and returned, its buffer given back to `spare`: it has ended in turn, and
/// what waited for it must be released as well ([`Daemon::ended`]).
fn submit_released(
    rt: &mut ExportRt,
    released: Vec<(u32, Request)>,
    waiting_writes: &mut usize,
    spare: &mut Vec<Vec<u8>>,
) -> Vec<u32> {
    let mut refused = Vec::new();
    for (t, job) in released {
        *waiting_writes -= 1;
        if let Err(job) = rt.backend.submit(job) {
            rt.engine.abort(Token(t));
            spare.push(job.buf);
            rt.pool_full_drops += 1;
            refused.push(t);
        }
    }
    refused
}

/// Notes that `token`'s reply goes out on interface `idx`, and that it waits on the store
/// from this tick on ([`ExportRt::tick`], for [`Daemon::log_stuck`]).
fn note_iface(rt: &mut ExportRt, token: Token, idx: usize) {
    let t = token.0 as usize;
    if rt.token_iface.len() <= t {
        rt.token_iface.resize(t + 1, (0, 0));
    }
    rt.token_iface[t] = (idx, rt.tick);
}

/// Hands a staged read that could not be done without blocking to the store's workers, in a
/// buffer of its own (as `dispatch` does); a full queue drops it (counted, the initiator
/// retransmits).
#[allow(clippy::too_many_arguments)]
fn read_to_worker(
    rt: &mut ExportRt,
    spare: &mut Vec<Vec<u8>>,
    idx: usize,
    id: u32,
    (token, source): (Token, u64),
    offset: u64,
    len: usize,
    cap: usize,
) {
    note_iface(rt, token, idx);
    let job = Request {
        op: Op::Read {
            offset,
            at: ATA_HEADER_LEN..ATA_HEADER_LEN + len,
        },
        token: (u64::from(id) << 32) | u64::from(token.0),
        source,
        buf: take_buffer(spare, cap),
    };
    if let Err(job) = rt.backend.submit(job) {
        rt.engine.abort(token);
        spare.push(job.buf);
        rt.pool_full_drops += 1;
    }
}

/// The key the worker pool takes queued requests round-robin by ([`aoe_store::FairQueue`]):
/// the request's source MAC (`frame[6..12]`, the Ethernet header's, which the engine
/// answers) and its export `id` (folded into the top bits: two keys that collide only
/// share one turn, nothing else).
pub(super) fn source_key(frame: &[u8], id: u32) -> u64 {
    let mut mac = [0u8; 8];
    if let Some(src) = frame.get(6..12) {
        mac[2..].copy_from_slice(src);
    }
    u64::from_be_bytes(mac) ^ u64::from(id).rotate_left(48)
}

/// A reply buffer of at least `cap` bytes: a spare one, or a new one.
pub(super) fn take_buffer(spare: &mut Vec<Vec<u8>>, cap: usize) -> Vec<u8> {
    match spare.pop() {
        Some(mut b) => {
            if b.len() < cap {
                b.resize(cap, 0);
            }
            b
        }
        None => vec![0u8; cap],
    }
}

/// How a store error shows in the ATA reply (the one place, as rust-vmm virtio-blk's
/// `Error::status()`): a medium error (EIO) and a short read are uncorrectable (UNC, what a
/// disk reports for an unreadable sector), everything else aborts the command (ABRT).
pub(super) fn ata_failure(e: &StoreError) -> IoFailure {
    match e {
        StoreError::Medium(_) | StoreError::ShortRead(_) => IoFailure::Medium,
        _ => IoFailure::Aborted,
    }
}

/// ` at LBA N (M sectors)` for the request in flight under `token`, for the log line of a
/// store error: which sectors of the export the initiator asked for (its LBA, not the file
/// offset), so a bad range on the disk under it can be found.
fn failed_at(engine: &aoe_proto::target::Engine, token: Token) -> String {
    match engine.in_flight_lba(token) {
        Some((lba, n)) => format!(" at LBA {lba} ({n} sectors)"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(id: u32, offset: u64, len: usize) -> Staged {
        Staged::Read {
            id,
            token: Token(0),
            source: 0,
            offset,
            len,
            done: None,
        }
    }

    /// All runs of `staged` as lists of indices.
    fn runs(staged: &[Staged]) -> Vec<Vec<usize>> {
        let mut members = Vec::new();
        let (mut out, mut j) = (Vec::new(), 0);
        while let Some((m, next)) = read_run(staged, j, &mut members) {
            out.push(members[..m].to_vec());
            j = next;
        }
        out
    }

    /// Issue 15: the contiguous reads of a receive batch are one preadv2. A run takes only
    /// unread reads of one export, each starting where the one before ends; replies
    /// already built and reads already done are passed over, anything else ends it.
    #[test]
    fn read_runs_take_contiguous_unread_reads_of_one_export() {
        let mut done = read(1, 3072, 1024);
        if let Staged::Read { done: d, .. } = &mut done {
            *d = Some(Ok(aoe_sys::NoWait::Done(1024)));
        }
        let staged = vec![
            read(1, 0, 1024),
            read(1, 1024, 1024),
            Staged::Ready(60), // a reply in between (an error, a Query Config)
            read(1, 2048, 1024),
            done,               // already read: passed over
            read(1, 4096, 512), // not where the run ends (3072): a new run
            read(2, 4608, 512), // another export: a new run
            read(2, 5120, 512),
            read(2, 5120, 512), // the same sectors again (a retransmission): a new run
        ];
        assert_eq!(
            runs(&staged),
            vec![vec![0, 1, 3], vec![5], vec![6, 7], vec![8]]
        );
        assert!(runs(&[Staged::Ready(60)]).is_empty());
        assert!(runs(&[]).is_empty());
    }

    /// A run holds at most what one preadv2 of slots takes; the rest starts the next.
    #[test]
    fn read_runs_stop_at_the_part_limit() {
        let n = aoe_sys::MAX_SLOT_PARTS + 3;
        let staged: Vec<Staged> = (0..n).map(|k| read(1, k as u64 * 512, 512)).collect();
        let r = runs(&staged);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].len(), aoe_sys::MAX_SLOT_PARTS);
        assert_eq!(r[1], (aoe_sys::MAX_SLOT_PARTS..n).collect::<Vec<_>>());
    }

    /// Issue 10: store errors are typed once and mapped to the ATA reply in one function.
    #[test]
    fn store_errors_map_to_ata_failures() {
        let of = |e: io::Error| ata_failure(&StoreError::from(e));
        assert_eq!(
            of(io::Error::from_raw_os_error(libc::EIO)),
            IoFailure::Medium
        );
        assert_eq!(of(io::ErrorKind::UnexpectedEof.into()), IoFailure::Medium);
        assert_eq!(
            of(io::Error::from_raw_os_error(libc::ENOSPC)),
            IoFailure::Aborted
        );
        assert_eq!(
            of(io::Error::from_raw_os_error(libc::EROFS)),
            IoFailure::Aborted
        );
        assert!(matches!(
            StoreError::from(io::Error::from_raw_os_error(libc::EIO)),
            StoreError::Medium(_)
        ));
    }
}
