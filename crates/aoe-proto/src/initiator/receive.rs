//! Responses: config responses (new paths and devices) and ATA responses (completions,
//! IDENTIFY), `aoecmd_cfg_rsp` and `aoecmd_ata_rsp`.

use super::*;

impl Engine {
    /// `aoecmd_cfg_rsp`: records the target MAC and the path, sizes the window and payload,
    /// and, if nobody has the device open, takes the firmware version and IDENTIFYs it: a
    /// new or down device comes up, an up one is re-read so a target that grew or was
    /// replaced is seen on the next discover or beacon. An open device keeps what its users
    /// see ("don't change users' perspective"); a down one stays "down,closewait".
    pub(super) fn config_response(
        &mut self,
        now: Instant,
        iface: usize,
        h: &HeaderRepr,
        cfg: &ConfigRepr<'_>,
    ) {
        if h.target.is_wildcard() {
            self.stats.wildcard_rejected += 1;
            self.log_peer(now, "wildcard config", || {
                format!(
                    "{}: config response claims wildcard shelf {} slot {}, rejected",
                    h.src, h.target.shelf, h.target.slot
                )
            });
            return;
        }
        if let Some(e) = h.error {
            self.log_peer(now, "config error", || {
                format!("{}: config error from {}: {e}", h.target, h.src)
            });
            return;
        }
        if h.target.shelf == 0xfff {
            self.log_peer(now, "shelf 0xfff", || {
                format!(
                    "{}: shelf 0xfff from {}: check shelf dip switches",
                    h.target, h.src
                )
            });
        }
        let Some(mtu) = self.interfaces.get(&iface).map(|i| i.mtu) else {
            return;
        };
        if !self.admit(now, h) {
            return;
        }
        let maxout = self.cfg.maxout;
        let d = self
            .devices
            .entry(h.target)
            .or_insert_with(|| Device::new(h.target));
        let ti = match d.target_idx(h.src) {
            Some(i) => i,
            None => {
                let mut t = Target::new(h.src);
                // A new MAC of a device up (or identifying through another MAC) is asked
                // IDENTIFY before it becomes a path (`Engine::vet_targets`).
                if d.life != Life::Down && !d.targets.is_empty() {
                    t.vet = Vet::Pending;
                }
                d.targets.push(t);
                d.targets.len() - 1
            }
        };
        let t = &mut d.targets[ti];
        let was_refused = matches!(t.vet, Vet::Refused { .. });
        if was_refused {
            // Asked again: its disk may have become the device's (grown, or revalidated).
            t.vet = Vet::Pending;
        }
        let nframes = cfg.buffer_count.clamp(1, maxout);
        let fresh = t.buffer_count == 0 && t.paths.is_empty();
        t.buffer_count = cfg.buffer_count;
        t.sector_count = cfg.sector_count;
        if t.nframes != nframes || fresh {
            t.nframes = nframes;
            t.wreset();
        }
        let sectors = path_sectors(max_sectors_for_mtu(mtu), cfg.sector_count);
        for p in &mut t.paths {
            p.sectors = path_sectors(
                max_sectors_for_mtu(self.interfaces.get(&p.iface).map_or(0, |i| i.mtu)),
                cfg.sector_count,
            );
        }
        let npaths = t.paths.len();
        match t.paths.iter().position(|p| p.iface == iface) {
            Some(i) => t.paths[i].answered(),
            // A path whose MTU cannot carry one sector is useless.
            None if sectors > 0 && npaths < MAX_PATHS_PER_TARGET => {
                t.paths.push(Path::new(iface, sectors))
            }
            None => {}
        }
        // A down device unopened is identified through the MAC that answered (the only
        // path while it identifies); its other targets are asked IDENTIFY once it is up.
        // But not through a MAC refused as another disk while a path of the device is still
        // known: the driver sends its IDENTIFY to the device's current target
        // (`aoecmd_ata_id`, `*d->tgt`) whichever MAC answered, and so identifies a device
        // that went down through the disk it was. Taken through whichever answered first, a
        // second box at the address (vblade over another file) made the device its disk at
        // the next discover, and the real target was then refused. If that path stays
        // silent, its IDENTIFY fails after `deadsecs`, the device is down again, and the
        // next answer of the other MAC (no longer refused) identifies it; `aoe-flush`
        // forgets both at once.
        let identity = !d.open && d.life == Life::Down && !d.targets[ti].paths.is_empty();
        if identity {
            let former = d
                .targets
                .iter()
                .position(|t| t.mac != h.src && t.vet == Vet::Path && !t.paths.is_empty());
            let via = match former {
                Some(fi) if was_refused => d.targets[fi].mac,
                _ => h.src,
            };
            d.life = Life::Identifying;
            for t in &mut d.targets {
                t.vet = if t.mac == via {
                    Vet::Path
                } else {
                    Vet::Pending
                };
            }
        }
        // "Don't change users' perspective": the driver takes `fw_ver` only while nobody
        // has the device open. It keeps no config string; ours ([`DeviceInfo::config`])
        // follows the same rule, so a response (after another host's `aoecfg -c set`, or
        // a spoofed one) cannot rewrite it under an open device's users. Nor can a MAC
        // that is not a path (being asked, or another disk's): its string is not the
        // device's.
        if !d.open && d.targets[ti].vet == Vet::Path {
            d.firmware_version = cfg.firmware_version;
            d.config = cfg.config.to_vec();
        }
        // The frame size follows the config responses of the device's paths, so a peer
        // can move it with every response it sends: its change is logged at most once per
        // device per `peer_log_interval`, with the count of changes not logged. A MAC
        // that is not a path does not move it (`Device::recompute_payload`).
        let log = d.recompute_payload().and_then(|l| {
            let every = self.cfg.peer_log_interval;
            if d.payload_logged
                .is_some_and(|t| now.saturating_duration_since(t) < every)
            {
                d.payload_unlogged += 1;
                return None;
            }
            d.payload_logged = Some(now);
            Some(match std::mem::take(&mut d.payload_unlogged) {
                0 => l,
                n => format!("{l} ({n} more changes since the last report)"),
            })
        });
        let identify = !d.open && d.payload > 0 && d.life != Life::Down;
        if let Some(l) = log {
            self.log(l);
        }
        if identify {
            self.queue_identify(now, h.target);
        }
        self.vet_targets(now, h.target);
    }

    /// Whether a config response from `h.src` for `h.target` may add what it would add: a
    /// new device only below [`Config::max_devices`], a new target MAC only below
    /// [`Config::max_targets`] (the cap a flood of config responses for random shelf.slot
    /// from random MACs meets). Known devices and MACs always pass; a refusal is counted and
    /// logged once per [`Config::peer_log_interval`]. At the target cap, a MAC that is not
    /// a path and is not being asked (refused as another disk, or silent to every
    /// IDENTIFY it was sent) gives its place to the new one
    /// ([`Device::forget_idle_target`]): a few boxes of another disk at the device's
    /// shelf.slot, or MACs a peer made up, cannot keep a second path or a replacement
    /// target out for ever.
    fn admit(&mut self, now: Instant, h: &HeaderRepr) -> bool {
        let (max_d, max_t) = (self.cfg.max_devices, self.cfg.max_targets);
        let forgot = match self.devices.get_mut(&h.target) {
            Some(d) if d.target_idx(h.src).is_none() && d.targets.len() >= max_t => {
                d.forget_idle_target()
            }
            _ => None,
        };
        if let Some(old) = forgot {
            // Copies of its IDENTIFYs held or presumed lost go with it, as a removed
            // device's do: their slots were in its window, not in a new MAC's (the same
            // MAC admitted again starts a window of its own).
            let dev = h.target;
            self.held.retain(|_, c| !(c.dev == dev && c.target == old));
            self.ghosts
                .retain(|_, g| !(g.dev == dev && g.target == old));
            self.stats.targets_forgotten += 1;
            let n = self.stats.targets_forgotten;
            self.log_peer(now, "target forgotten", || {
                format!(
                    "{}: target {old} (not a path) forgotten for new target {}: {max_t} targets known (max-targets); {n} forgotten in all",
                    h.target, h.src
                )
            });
            return true;
        }
        match self.devices.get(&h.target) {
            Some(d) if d.target_idx(h.src).is_some() || d.targets.len() < max_t => true,
            None if self.devices.len() < max_d => true,
            Some(_) => {
                self.stats.targets_refused += 1;
                let n = self.stats.targets_refused;
                self.log_peer(now, "target refused", || {
                    format!(
                        "{}: new target {} refused: {max_t} targets known (max-targets); {n} refused in all",
                        h.target, h.src
                    )
                });
                false
            }
            None => {
                self.stats.devices_refused += 1;
                let n = self.stats.devices_refused;
                self.log_peer(now, "device refused", || {
                    format!(
                        "{}: new device from {} refused: {max_d} devices known (max-devices); {n} refused in all",
                        h.target, h.src
                    )
                });
                false
            }
        }
    }

    /// A response to an ATA request (`aoecmd_ata_rsp`, `ktiocomplete`). If it answers a
    /// held copy (`Engine::held`), that copy's window slot is free whatever else the answer
    /// does, and a copy waiting for a slot may go out.
    pub(super) fn ata_response(
        &mut self,
        now: Instant,
        iface: usize,
        h: &HeaderRepr,
        ata: &AtaRepr<'_>,
    ) {
        let held = self.held_answered(now, h.target, h.tag.0);
        let sampled = held || self.ghost_answered(now, h.target, h.tag.0);
        // Whichever copy this answers, that copy can no longer land: its fence is gone.
        let unfenced = self.fences.get(&h.tag.0).is_some_and(|f| f.dev == h.target)
            && self.fences.remove(&h.tag.0).is_some();
        if unfenced {
            self.trim_fences();
        }
        self.ata_answer(now, iface, h, ata, sampled);
        if unfenced
            && self
                .devices
                .get(&h.target)
                .is_some_and(|d| !d.queue.is_empty())
        {
            self.pump(now, h.target);
        }
        let mut freed = Vec::new();
        if !self.held.is_empty() {
            // A later frame answered: held copies sent before it are presumed lost. Their
            // slots go to the waiting copies and queued frames now: this answer's own pump
            // (if it took any step: not for a duplicate or a late copy's) ran while they
            // still took the slots, a waiting copy's timer is parked, and with nothing else
            // out no timer would send anything (the initiator stalled until the 60 s beacon).
            freed = self.expire_held(now);
        }
        if held || !self.held.is_empty() || freed.contains(&h.target) {
            self.pump(now, h.target);
        }
        for dev in freed {
            if dev != h.target {
                self.pump(now, dev);
            }
        }
    }

    /// `held`: the answer was to a held copy or one presumed lost (`Engine::held_answered`
    /// or `Engine::ghost_answered` took its sample).
    fn ata_answer(
        &mut self,
        now: Instant,
        iface: usize,
        h: &HeaderRepr,
        ata: &AtaRepr<'_>,
        held: bool,
    ) {
        // The frame's own tag, or an earlier copy's (loss recovery, `answered_frame`).
        let answered = self.answered_frame(h.tag.0);
        let Some((key, earlier_sent)) = answered else {
            if !held {
                self.late_write_copy_answered(now, h);
            }
            match self.devices.get_mut(&h.target) {
                Some(d) => d.stats.unexpected_responses += 1,
                None => self.stats.unknown_device += 1,
            }
            self.log_peer(now, "unexpected rsp", || {
                format!(
                    "unexpected rsp {} tag={:08x} from {} on if {iface} (late or duplicate)",
                    h.target, h.tag.0, h.src
                )
            });
            return;
        };
        // What the checks below need; the frame itself is taken out once they pass.
        let Some(f) = self.outstanding.get(key).map(|f| Checked {
            dev: f.dev,
            op: f.op,
            count: f.count,
        }) else {
            return;
        };
        let is_read = self
            .ops
            .get(&f.op)
            .map(|o| match o.kind {
                OpKind::Read(_) | OpKind::Probe => f.count as usize * SECTOR_SIZE,
                OpKind::Identify | OpKind::Verify => aoe_wire::identify::IDENTIFY_LEN,
                _ => 0,
            })
            .unwrap_or(0);
        if h.target != f.dev {
            // `aoecmd_ata_rsp` looks the tag up among the frames of the device the header
            // names: a tag of another device's frame is an unexpected response there.
            match self.devices.get_mut(&h.target) {
                Some(d) => d.stats.unexpected_responses += 1,
                None => self.stats.unknown_device += 1,
            }
            // A peer that sees the requests can send as many of these per tag as it likes.
            self.log_peer(now, "unexpected rsp, tag of another device", || {
                format!(
                    "unexpected rsp {} tag={:08x} from {} on if {iface} (tag of {})",
                    h.target, h.tag.0, h.src, f.dev
                )
            });
            return;
        }
        let failed = h.error.is_some() || ata.cmd_status & status::FAILURE_MASK != 0;
        if !failed && ata.data.len() < is_read {
            if let Some(d) = self.devices.get_mut(&f.dev) {
                d.stats.bad_responses += 1;
            }
            self.log_peer(now, "bad rsp", || {
                format!(
                    "bad rsp {} tag={:08x} from {}: {} bytes of data, {is_read} expected (short data)",
                    h.target,
                    h.tag.0,
                    h.src,
                    ata.data.len()
                )
            });
            return;
        }
        let Some(f) = self.outstanding.remove(key) else {
            return;
        };
        if h.src != f.target {
            self.other_mac_response(now, &f, h.src);
        }
        self.rack.remove(&key);
        let addr = f.dev;
        let mut ended_silence = false;
        let mut well = None;
        if let Some(d) = self.devices.get_mut(&addr) {
            if let Some(ti) = d.target_idx(f.target) {
                let t = &mut d.targets[ti];
                // Karn's rule: no RTT sample from a retransmitted frame, but one from an
                // earlier copy whose tag came back.
                let path_sample = match earlier_sent {
                    // An earlier copy answered after a later one went out: the later one
                    // was spurious (`Target::spurious_copy`), unless a held copy's answer
                    // already said so.
                    Some(sent) if !held => {
                        let rtt = now.saturating_duration_since(sent);
                        t.spurious_copy(now, rtt);
                        t.on_answer(now, None);
                        Some(rtt)
                    }
                    // The same for a held copy (its sample taken by `held_answered`), and
                    // the answer to the copy whose successor waits to go out.
                    Some(_) => {
                        t.on_answer(now, None);
                        None
                    }
                    None if f.waiting.is_some() => {
                        t.on_answer(now, None);
                        None
                    }
                    None => {
                        let rtt =
                            (f.retransmits == 0).then(|| now.saturating_duration_since(f.sent));
                        t.on_answer(now, rtt);
                        rtt
                    }
                };
                if f.waiting.is_none() && earlier_sent.is_none() {
                    // The answer to the frame's latest copy: its slot is free. (A waiting
                    // frame's last copy was held, and freed by `held_answered`.)
                    t.nout = t.nout.saturating_sub(1);
                }
                ended_silence = t.answered_copy(f.seq, now);
                t.probe_answered = f.after_silence;
                t.answers += 1;
                if t.taint > 0 {
                    t.taint /= 2;
                    if t.taint == 0 {
                        well = Some(format!(
                            "{addr}: target {} well again (tainted {} times)",
                            t.mac, t.scorned
                        ));
                        t.scorned = 0;
                    }
                }
                // The path the answer came in on is alive: its loss count starts again
                // (`ktiocomplete`: `getif(t, skb->dev)`, `ifp->lost = 0`). Not the path of
                // the frame's latest copy: an original answered on a slow path after its
                // copy went out on another is still the slow path's answer.
                // Its sample is that path's too: an answer comes back through the interface
                // its request went out on (the target answers the request's source MAC).
                if let Some(p) = t.paths.iter_mut().find(|p| p.iface == iface) {
                    p.answered();
                    if let Some(rtt) = path_sample {
                        p.rtt.sample(rtt);
                    }
                }
            }
            if h.error.is_some() {
                d.stats.aoe_errors += 1;
            } else if failed {
                d.stats.ata_errors += 1;
            }
        }
        if let Some(l) = well {
            self.log(l);
        }
        if ended_silence {
            self.restart_timers(now, addr, f.target);
        }
        if f.waiting.is_some() {
            if let Some(d) = self.devices.get_mut(&addr) {
                d.rexmitq.retain(|k| *k != key);
            }
        } else if earlier_sent.is_some() {
            // Completed by an earlier copy's answer: the latest copy may still be queued at
            // the target, so it keeps its slot until its own answer or its timer.
            self.hold_copy(now, key, &f, f.deadline, false);
        }
        self.later_frame_answered(now, &f, earlier_sent.unwrap_or(f.sent), iface);
        // A data frame sized before the MTU shrank, refused by a target that now checks its
        // sector count against the smaller MTU (`aoe serve` aborts it): a size problem, not
        // a media error. Its sectors go out again in frames that fit.
        let data_op = self
            .ops
            .get(&f.op)
            .is_some_and(|o| matches!(o.kind, OpKind::Read(_) | OpKind::Write(_)));
        let payload = self.devices.get(&addr).map_or(0, |d| d.payload);
        if failed && data_op && f.count > payload && payload > 0 {
            if let Some(op) = self.ops.get_mut(&f.op) {
                op.frames_out = op.frames_out.saturating_sub(1);
            }
            self.reissue(addr, f.op, f.offset, f.count as u64);
            self.note_resized(addr, f.target, f.count as u64, true);
            self.pump(now, addr);
            return;
        }
        let result = match h.error {
            Some(code) => Err(IoError::Aoe(code)),
            None if failed => Err(IoError::Ata {
                status: ata.cmd_status,
                error: ata.err_feature,
            }),
            None => Ok(()),
        };
        self.frame_done(now, &f, result, ata.data);
        self.pump(now, addr);
    }

    /// Applies one frame's outcome to its operation.
    pub(super) fn frame_done(
        &mut self,
        now: Instant,
        f: &Outstanding,
        result: Result<(), IoError>,
        data: &[u8],
    ) {
        let Some(op) = self.ops.get_mut(&f.op) else {
            return; // the op already failed; this was an orphan
        };
        op.frames_out = op.frames_out.saturating_sub(1);
        if let Err(e) = result {
            match op.kind {
                OpKind::Identify => {
                    self.ops.remove(&f.op);
                    self.identify_failed(f.dev, &format!("IDENTIFY failed: {e}"));
                }
                OpKind::Probe => {
                    self.ops.remove(&f.op);
                }
                OpKind::Verify => {
                    self.ops.remove(&f.op);
                    self.verify_done(now, f, Err(format!("IDENTIFY failed: {e}")));
                }
                _ => {
                    self.log(format!("{}: I/O error: {e}", f.dev));
                    self.finish_op(f.op, Err(e));
                }
            }
            return;
        }
        match &mut op.kind {
            OpKind::Read(buf) => {
                let s = f.offset as usize * SECTOR_SIZE;
                let n = f.count as usize * SECTOR_SIZE;
                if let Some(src) = data.get(..n) {
                    // A held read's payload stays in the driver's frame when the driver
                    // offered to hold it and the payload lies inside that frame.
                    let mut kept = false;
                    if let (Some(h), Some((token, base, len)), false) =
                        (&mut op.held, self.rx_frame, self.rx_kept)
                    {
                        let p = src.as_ptr() as usize;
                        if p >= base && p + n <= base + len {
                            let at = h.parts.partition_point(|q| q.at < s);
                            let part = HeldPart {
                                at: s,
                                token,
                                off: p - base,
                                len: n,
                            };
                            h.parts.insert(at, part);
                            self.rx_kept = true;
                            self.slot_ops.insert(token, f.op);
                            kept = true;
                        }
                    }
                    if !kept {
                        if buf.capacity() == 0 {
                            *buf = self.read_spare.take(op.sectors as usize * SECTOR_SIZE);
                        }
                        place(buf, s, src);
                    }
                }
            }
            OpKind::Identify => {
                self.ops.remove(&f.op);
                self.identify_done(now, f.dev, data);
                return;
            }
            OpKind::Probe => {
                self.ops.remove(&f.op);
                return;
            }
            OpKind::Verify => {
                self.ops.remove(&f.op);
                self.verify_done(now, f, Ok(data));
                return;
            }
            OpKind::Write(_) | OpKind::Flush => {}
        }
        if op.frames_out == 0 && !op.unsent() {
            self.finish_op(f.op, Ok(()));
        }
    }

    /// Completes a user operation: removes it (and its unsent rest) and reports it.
    pub(super) fn finish_op(&mut self, id: u64, result: Result<(), IoError>) {
        let Some(op) = self.ops.remove(&id) else {
            return;
        };
        if let Some(d) = self.devices.get_mut(&op.dev) {
            d.queue.remove_op(op.source, id);
            match result {
                Ok(()) => d.stats.ops_ok += 1,
                Err(_) => d.stats.ops_failed += 1,
            }
        }
        if op.kind.internal() {
            return;
        }
        if let Some(mut h) = op.held {
            for p in &h.parts {
                self.slot_ops.remove(&p.token);
            }
            let result = match (result, op.kind) {
                (Ok(()), OpKind::Read(mut buf)) => {
                    // The copied frames are at their offsets; the others leave gaps.
                    if !buf.is_empty() {
                        buf.resize(h.len, 0);
                    }
                    h.buf = buf;
                    Ok(h)
                }
                (Ok(()), _) => Ok(HeldRead::default()),
                (Err(e), kind) => {
                    self.released.extend(h.parts.iter().map(|p| p.token));
                    if let OpKind::Read(buf) = kind {
                        self.read_spare.put(buf);
                    }
                    Err(e)
                }
            };
            self.events.push_back(Event::CompletedHeld {
                id: IoId(id),
                result,
            });
            return;
        }
        let result = match (result, op.kind) {
            (Ok(()), OpKind::Read(mut buf)) => {
                // Every frame of the op was answered, so `place` has filled it to the end;
                // this only restates the length the caller asked for.
                buf.resize(op.sectors as usize * SECTOR_SIZE, 0);
                Ok(Some(buf))
            }
            (Ok(()), _) => Ok(None),
            (Err(e), OpKind::Read(buf)) => {
                // A lent buffer goes home (BlockOp::ReadInto).
                if let Some(home) = op.home.0 {
                    home(buf);
                }
                Err(e)
            }
            (Err(e), _) => Err(e),
        };
        self.events.push_back(Event::Completed {
            id: IoId(id),
            result,
        });
    }

    /// `ataid_complete`: capacity and LBA48 from the page; up (or resized).
    ///
    /// LBA48 is bit 10 of word 83 or of word 86, with no check of word 83's validity bits
    /// (14/15), exactly as `ataid_complete` tests it; the capacity is then words 100-103,
    /// else words 60-61.
    pub(super) fn identify_done(&mut self, now: Instant, addr: TargetAddr, page: &[u8]) {
        let mut info = match Identify::parse(page) {
            Ok(i) => i,
            Err(e) => {
                self.identify_failed(addr, &format!("bad IDENTIFY page: {e}"));
                return;
            }
        };
        info.lba48 = driver_lba48(page);
        // A capacity beyond what the device's commands address is cut to it: an LBA28
        // command carries 28 bits of LBA (`put_lba`), words 60-61 hold 32, and a sector
        // past 2^28 would go out as one near the start of the disk (an LBA48 command
        // carries 48 bits, words 100-103 hold 64). ATA caps words 60-61 at 0x0fff_ffff
        // and the 48-bit maximum likewise; the driver takes either as it is.
        let claimed = info.sectors();
        let reach = if info.lba48 {
            aoe_wire::identify::LBA48_REACH
        } else {
            aoe_wire::identify::LBA28_MAX
        };
        let new = claimed.min(reach);
        if new < claimed {
            self.log_peer(now, "capacity beyond the commands' reach", || {
                format!(
                    "{addr}: IDENTIFY claims {claimed} sectors; {} commands reach {new}: \
                     using {new}",
                    if info.lba48 { "LBA48" } else { "LBA28" }
                )
            });
        }
        let Some(d) = self.devices.get_mut(&addr) else {
            return;
        };
        let old = d.sectors;
        d.sectors = new;
        d.lba48 = info.lba48;
        d.identify = Some(info);
        d.identify_page = page.get(..512).unwrap_or(page).to_vec();
        let mac = d.targets.first().map(|t| t.mac).unwrap_or_default();
        let fw = d.firmware_version;
        let revalidated = std::mem::take(&mut d.revalidating);
        match d.life {
            Life::Identifying => {
                d.life = Life::Up;
                self.log(format!("{mac} {addr} v{fw:x} has {new} sectors"));
                self.log(format!("{addr} up"));
                self.events.push_back(Event::DeviceUp(addr));
                if old != 0 && old != new {
                    self.events.push_back(Event::DeviceResized {
                        dev: addr,
                        old_sectors: old,
                        new_sectors: new,
                    });
                }
            }
            Life::Up if old != new => {
                // Logged at most once per device per `peer_log_interval`, with the count
                // of changes not logged: a peer that sees the IDENTIFYs can answer each
                // with another size (the event still goes out for every change).
                let every = self.cfg.peer_log_interval;
                let line = if d
                    .size_logged
                    .is_some_and(|t| now.saturating_duration_since(t) < every)
                {
                    d.size_unlogged += 1;
                    None
                } else {
                    d.size_logged = Some(now);
                    Some(match std::mem::take(&mut d.size_unlogged) {
                        0 => format!("{addr}: size changed from {old} to {new} sectors"),
                        n => format!(
                            "{addr}: size changed from {old} to {new} sectors \
                             ({n} more changes since the last report)"
                        ),
                    })
                };
                if let Some(l) = line {
                    self.log(l);
                }
                self.events.push_back(Event::DeviceResized {
                    dev: addr,
                    old_sectors: old,
                    new_sectors: new,
                });
            }
            _ => {}
        }
        if revalidated {
            self.events.push_back(Event::Revalidated(addr));
        }
        self.vet_targets(now, addr);
        self.pump(now, addr);
    }

    /// Sends IDENTIFY to each target of `addr` waiting to be asked ([`Vet::Pending`]) once
    /// the device is up with a capacity to compare with.
    #[cold]
    pub(super) fn vet_targets(&mut self, now: Instant, addr: TargetAddr) {
        let Some(d) = self.devices.get(&addr) else {
            return;
        };
        if d.life != Life::Up || d.sectors == 0 {
            return;
        }
        let due: Vec<usize> = (0..d.targets.len())
            .filter(|&i| d.targets[i].vet == Vet::Pending && !d.targets[i].paths.is_empty())
            .collect();
        for ti in due {
            self.send_verify(now, addr, ti, 1);
        }
    }

    /// Sends try `tries` of IDENTIFY to target `ti` of `addr` alone (not a path yet, so
    /// it never gets the device's frames): an op of its own, as a probe.
    #[cold]
    pub(super) fn send_verify(&mut self, now: Instant, addr: TargetAddr, ti: usize, tries: u8) {
        let Some(t) = self
            .devices
            .get_mut(&addr)
            .and_then(|d| d.targets.get_mut(ti))
        else {
            return;
        };
        if t.paths.is_empty() {
            t.vet = Vet::Pending;
            return;
        }
        t.vet = Vet::Out { tries };
        let id = self.new_internal_op(addr, OpKind::Verify);
        self.send_new(now, addr, id, ti, 0, 1);
    }

    /// The answer to a target's [`OpKind::Verify`] (or its error): a path if the capacity
    /// it reports is the device's, as `identify_done` would take it, else refused with one
    /// rate-limited line and [`Stats::targets_other_disk`].
    #[cold]
    pub(super) fn verify_done(
        &mut self,
        now: Instant,
        f: &Outstanding,
        answer: Result<&[u8], String>,
    ) {
        let theirs = answer.and_then(|page| {
            let info = Identify::parse(page).map_err(|e| format!("bad IDENTIFY page: {e}"))?;
            let reach = if driver_lba48(page) {
                aoe_wire::identify::LBA48_REACH
            } else {
                aoe_wire::identify::LBA28_MAX
            };
            Ok(info.sectors().min(reach))
        });
        let Some(d) = self.devices.get_mut(&f.dev) else {
            return;
        };
        let Some(ti) = d.target_idx(f.target) else {
            return;
        };
        let (addr, mine) = (d.addr, d.sectors);
        let t = &mut d.targets[ti];
        if !matches!(t.vet, Vet::Out { .. }) {
            return;
        }
        if d.life != Life::Up {
            t.vet = Vet::Pending;
            return;
        }
        match theirs {
            Ok(n) if n == mine => {
                t.vet = Vet::Path;
                // Its sector count now counts (a path through a smaller MTU shrinks the
                // frames before any goes to it).
                let payload = d.recompute_payload();
                self.log(format!(
                    "{addr}: target {} has the device's {mine} sectors: taken as a path",
                    f.target
                ));
                if let Some(l) = payload {
                    self.log(l);
                }
                self.pump(now, addr);
            }
            theirs => {
                t.vet = Vet::Refused {
                    sectors: theirs.as_ref().ok().copied(),
                };
                self.stats.targets_other_disk += 1;
                let n = self.stats.targets_other_disk;
                let what = match theirs {
                    Ok(s) => format!(
                        "has {s} sectors, the device {mine}: another disk answers for {addr}"
                    ),
                    Err(e) => e,
                };
                self.log_peer(now, "target of another disk", || {
                    format!(
                        "{addr}: target {} not taken as a path: {what}; its answers are \
                         ignored ({n} refused in all)",
                        f.target
                    )
                });
            }
        }
    }

    /// A response matched a frame of this device by tag but came from another MAC than the
    /// frame went to. Accepted (the driver never compares the source); counted, and logged
    /// at most once every [`OTHER_MAC_LOG_EVERY`] per device with the number not logged.
    fn other_mac_response(&mut self, now: Instant, f: &Outstanding, src: MacAddr) {
        let Some(d) = self.devices.get_mut(&f.dev) else {
            return;
        };
        d.stats.other_mac_responses += 1;
        if d.other_mac_logged
            .is_some_and(|t| now.saturating_duration_since(t) < OTHER_MAC_LOG_EVERY)
        {
            d.other_mac_unlogged += 1;
            return;
        }
        d.other_mac_logged = Some(now);
        let unlogged = std::mem::take(&mut d.other_mac_unlogged);
        let more = if unlogged > 0 {
            format!(" ({unlogged} more since the last report)")
        } else {
            String::new()
        };
        self.log(format!(
            "{}: response from {src}, frame sent to {}; accepted{more}",
            f.dev, f.target
        ));
    }

    pub(super) fn identify_failed(&mut self, addr: TargetAddr, why: &str) {
        let Some(d) = self.devices.get_mut(&addr) else {
            return;
        };
        d.revalidating = false;
        match d.life {
            Life::Identifying => {
                d.life = Life::Down;
                self.log(format!("{addr}: {why}"));
            }
            Life::Up => self.log(format!("{addr}: revalidate: {why}")),
            Life::Down => {}
        }
    }
}

/// Copies one frame's data to byte `at` of a read's buffer, which grows as frames land
/// (allocated with its capacity but empty, [`Engine::submit`]): a frame that continues the
/// buffer, the usual case since answers mostly come in the order the frames went out, is
/// appended without the buffer ever being zeroed first; one that lands beyond the end
/// zero-fills the gap, which the frames before it overwrite when they are answered.
pub(super) fn place(buf: &mut Vec<u8>, at: usize, src: &[u8]) {
    if buf.len() < at {
        buf.resize(at, 0);
    }
    let end = at + src.len();
    let inside = buf.len().min(end) - at;
    buf[at..at + inside].copy_from_slice(&src[..inside]);
    buf.extend_from_slice(&src[inside..]);
}

/// Read buffers handed back by the caller for reuse ([`Engine::recycle_read_buffer`]).
#[derive(Debug, Default)]
pub(super) struct ReadSpare {
    bufs: Vec<Vec<u8>>,
    /// Capacity of `bufs` in all, at most [`SPARE_READ_BYTES`].
    bytes: usize,
}

impl ReadSpare {
    /// An empty buffer with room for `len` bytes: a kept one if one is large enough (the
    /// most recently kept first, whose pages are likeliest in cache), else a new one.
    pub(super) fn take(&mut self, len: usize) -> Vec<u8> {
        match self.bufs.iter().rposition(|b| b.capacity() >= len) {
            Some(i) => {
                let b = self.bufs.swap_remove(i);
                self.bytes -= b.capacity();
                b
            }
            None => Vec::with_capacity(len),
        }
    }

    /// Keeps `buf` (emptied) if it fits in [`SPARE_READ_BYTES`]; frees it otherwise.
    pub(super) fn put(&mut self, mut buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap == 0 || self.bytes + cap > SPARE_READ_BYTES {
            return;
        }
        buf.clear();
        self.bytes += cap;
        self.bufs.push(buf);
    }
}

/// How often a device logs responses from another MAC than the frame's.
const OTHER_MAC_LOG_EVERY: Duration = Duration::from_secs(5);

/// `ataid_complete`'s LBA48 test: `(word 83 | word 86) & (1 << 10)`, no validity gate.
fn driver_lba48(page: &[u8]) -> bool {
    let word = |w: usize| {
        page.get(2 * w..2 * w + 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
    };
    (word(83) | word(86)) & (1 << 10) != 0
}

/// The fields of an answered frame that `Engine::ata_answer` checks the answer against
/// before it takes the frame out (a copy of these, not of the whole frame).
struct Checked {
    dev: TargetAddr,
    op: u64,
    count: u8,
}

#[cfg(test)]
mod place_tests {
    use super::place;

    /// Frames landing in any order build the same buffer as in order: appended when they
    /// continue it, the gap zero-filled and then overwritten when one lands beyond the end.
    #[test]
    fn frames_in_any_order_fill_the_buffer() {
        let piece = |i: u8| vec![i + 1; 4];
        let want: Vec<u8> = (0..4).flat_map(piece).collect();
        for order in [
            [0, 1, 2, 3],
            [3, 2, 1, 0],
            [1, 0, 3, 2],
            [2, 0, 3, 1],
            [0, 3, 1, 2],
        ] {
            let mut buf = Vec::with_capacity(16);
            for i in order {
                place(&mut buf, i as usize * 4, &piece(i));
            }
            assert_eq!(buf, want, "order {order:?}");
        }
        // A frame sent again over bytes already there (a reissue) rewrites them.
        let mut buf = want.clone();
        place(&mut buf, 2, &[9, 9, 9, 9]);
        assert_eq!(buf, [1, 1, 9, 9, 9, 9, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4]);
        // One that overlaps the end both rewrites and appends.
        let mut buf = vec![1, 1, 1];
        place(&mut buf, 2, &[5, 6, 7]);
        assert_eq!(buf, [1, 1, 5, 6, 7]);
    }
}
