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

impl Daemon {
    pub(super) fn dispatch(&mut self, idx: usize, f: usize, id: u32) {
        let cap = self.ifaces[idx].frame_cap;
        let Some(rt) = self.exports.get_mut(&id) else {
            return;
        };
        let iface = &mut self.ifaces[idx];
        // With a transmit ring, the reply is built in its next free slot (a read's data is
        // read straight into it) and committed there: no reply buffer, no copy. Otherwise
        // (no ring, a full ring, replies queued ahead) in a buffer that goes to the backlog.
        let (frame, slot) = iface.frame_and_slot(f, cap);
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
                let ordered = write_range.as_ref().is_some_and(|r| rt.writes.must_wait(r));
                let inline = match &req.kind {
                    IoKind::Write { .. } if ordered => Ok(false),
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
                            tracing::warn!(error = %e, "{}: I/O failed{a}", rt.spec.addr());
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
                    let t = req.token.0 as usize;
                    if rt.token_iface.len() <= t {
                        rt.token_iface.resize(t + 1, 0);
                    }
                    rt.token_iface[t] = idx;
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
                        buf,
                    };
                    if ordered {
                        if rt.backend.queued() + self.waiting_writes >= POOL_QUEUE {
                            rt.engine.abort(req.token);
                            self.spare.push(job.buf);
                            rt.pool_full_drops += 1;
                            return;
                        }
                        let range = write_range.unwrap_or_else(|| unreachable!());
                        rt.writes.wait(req.token.0, range, job);
                        self.waiting_writes += 1;
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
        let logs = &mut self.logs;
        let result = done.result.map_err(|e| {
            let e = StoreError::from(e);
            if let Some(a) = logs.check(Instant::now(), "I/O failed") {
                tracing::warn!(error = %e, "{}: I/O failed{a}", rt.spec.addr());
            }
            ata_failure(&e)
        });
        let idx = rt.token_iface.get(token.0 as usize).copied().unwrap_or(0);
        match rt.engine.complete(token, result, &mut buf) {
            Some(n) if idx < self.ifaces.len() => self.ifaces[idx].queue(buf, n, &mut self.spare),
            _ => self.spare.push(buf),
        }
        // Writes that waited for this one go now, in arrival order. One the store refuses is
        // dropped (the initiator retransmits) and releases in turn what waited for it.
        let mut done = vec![token.0];
        while let Some(t) = done.pop() {
            for (t, job) in rt.writes.completed(t) {
                self.waiting_writes -= 1;
                if let Err(job) = rt.backend.submit(job) {
                    rt.engine.abort(Token(t));
                    self.spare.push(job.buf);
                    rt.pool_full_drops += 1;
                    done.push(t);
                }
            }
        }
    }

    pub(super) fn drain_io(&mut self, limit: Duration) {
        let start = Instant::now();
        while self.exports.values().any(|e| e.engine.in_flight() > 0) {
            if start.elapsed() > limit {
                tracing::error!("I/O still in flight after {limit:?}; exiting anyway");
                return;
            }
            if let Some(done) = self.completions.wait(Duration::from_millis(100)) {
                self.finish(done);
                self.complete_io();
                self.flush_sends();
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
