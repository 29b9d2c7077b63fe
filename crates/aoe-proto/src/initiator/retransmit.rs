//! Retransmission: frame deadlines, `rexmit_timer` (fresh tag on the next path, backoff,
//! window cut, scorn, path ejection, device down), fast retransmission when later frames
//! are answered first, and probes of tainted targets.

use super::*;

impl Engine {
    pub(super) fn deadline(&self, now: Instant, first_sent: Instant, rto: Duration) -> Instant {
        let d = now + rto;
        if self.cfg.deadsecs.is_zero() {
            d
        } else {
            d.min((first_sent + self.cfg.deadsecs).max(now))
        }
    }

    /// Frame `f` has been out (its first copy sent) for `deadsecs` or longer: no more copies,
    /// the device goes down instead (`aoe_deadsecs`).
    fn past_deadsecs(&self, f: &Outstanding, now: Instant) -> bool {
        !self.cfg.deadsecs.is_zero()
            && now.saturating_duration_since(f.first_sent) >= self.cfg.deadsecs
    }

    /// Frame `f` carries a data op (READ, WRITE, FLUSH), the only kind a loss found from
    /// other answers (fast retransmission, tail probe) copies; not IDENTIFY or a probe.
    fn carries_data(&self, f: &Outstanding) -> bool {
        self.ops
            .get(&f.op)
            .is_some_and(|o| matches!(o.kind, OpKind::Read(_) | OpKind::Write(_) | OpKind::Flush))
    }

    /// `rexmit_timer` for one frame: dead device after `deadsecs`, else the window cut,
    /// scorn and path ejection as the driver does, and the frame's next copy queued
    /// (`Device::rexmitq`) to go out on the next path as soon as a window has room.
    ///
    /// Unlike the driver, the copy that timed out keeps its slot: it may be only queued
    /// at the target (a stalled or slow target, not a lost frame), and a target that
    /// enforces its buffer count (`aoe serve`) drops whatever goes over it. It is presumed
    /// lost, and its slot freed, one more timeout later (`Engine::held`), or sooner if its
    /// own answer comes. The driver frees the slot at once (`t->nout--`) and paces the copy
    /// to the window in `rexmit_deferred`.
    pub(super) fn frame_timed_out(&mut self, now: Instant, tag: u32) {
        let Some(f) = self.outstanding.get(tag).cloned() else {
            return;
        };
        let addr = f.dev;
        let probe = self
            .ops
            .get(&f.op)
            .is_some_and(|o| matches!(o.kind, OpKind::Probe | OpKind::Verify));
        let timeout = f.deadline.saturating_duration_since(f.sent);
        if probe || !self.ops.contains_key(&f.op) || !self.devices.contains_key(&addr) {
            // An orphan of a failed op, or an unanswered probe (the next timer run sends
            // another) or new target's IDENTIFY (sent again below, a few times): never
            // retransmitted; its copy keeps its slot until presumed lost.
            self.outstanding.remove(tag);
            let verify = self
                .ops
                .remove(&f.op)
                .is_some_and(|o| matches!(o.kind, OpKind::Verify));
            if f.waiting.is_none() {
                self.hold_copy(now, tag, &f, now + timeout, false);
            }
            if verify {
                self.verify_unanswered(now, &f);
            }
            return;
        }
        let waited = now.saturating_duration_since(f.first_sent);
        if !self.cfg.deadsecs.is_zero() && waited >= self.cfg.deadsecs {
            let identifying = self
                .devices
                .get(&addr)
                .is_some_and(|d| d.life == Life::Identifying);
            if identifying {
                self.outstanding.remove(tag);
                if f.waiting.is_none() {
                    self.hold_copy(now, tag, &f, now + timeout, false);
                }
                self.ops.remove(&f.op);
                self.identify_failed(addr, "IDENTIFY unanswered");
                return;
            }
            self.device_down(
                addr,
                &format!("tag {tag:08x} unanswered for {} s", waited.as_secs()),
            );
            return;
        }
        if let Some(why) = f.waiting {
            // Its next copy still waits for a slot or for a sign that it is due
            // (`Target::copy_due_after_timeout`).
            let wake = self.waiting_wake(now, &f, why);
            self.outstanding.set_deadline(tag, wake);
            return;
        }
        // The timer restarts with every answer from the frame's target (RFC 6298 5.3), so
        // it fires only once the target has answered nothing for a whole timeout: the
        // backstop. While the target keeps answering, a frame lost among the answered ones
        // is found by the answers to frames sent after it (RACK, `later_frame_answered`),
        // and one only queued or slow at the target is not copied.
        // Nor before the frame's own path could have answered it (session 36): a target
        // reached over paths of different lengths has one RTO, which its shorter paths'
        // answers set, and the first frames on a longer one timed out while the target
        // answered nothing else.
        let restart = self
            .devices
            .get(&addr)
            .and_then(|d| d.target_idx(f.target).map(|ti| &d.targets[ti]))
            .and_then(|t| {
                let by_target = t.last_answer.map(|a| a + t.rto(&self.cfg));
                let by_path = (t.paths.len() > 1)
                    .then(|| t.paths.iter().find(|p| p.iface == f.iface))
                    .flatten()
                    .map(|p| f.sent + p.rtt.overtaken_after());
                by_target.max(by_path)
            })
            .filter(|at| *at > now);
        if let Some(at) = restart {
            let deadline = self.deadline(now, f.first_sent, at - now);
            self.outstanding.set_deadline(tag, deadline);
            return;
        }
        // The target has been silent for a whole timeout. As TCP's timer does (RFC 6298
        // 5.4), only the earliest frame outstanding there is copied, and the timer backs
        // off (5.5); the others wait for that copy's answer or any other, after which RACK
        // finds the lost ones (`later_frame_answered`; RFC 8985's tail loss probe is the
        // same idea). A stalled target (a daemon starved of CPU) then gets one copy per
        // backed-off timeout, not a copy of its whole window at once. The driver copies
        // every frame whose timer ran out. A frame that can move to another target still
        // does (multipath failover, as the driver).
        // Once the target has answered such a copy and then nothing else for a timeout,
        // it is alive and the frames it still has not answered are lost: all are copied.
        let probe_answered = self
            .devices
            .get(&addr)
            .and_then(|d| {
                d.target_idx(f.target)
                    .map(|ti| d.targets[ti].probe_answered)
            })
            .unwrap_or(false);
        if !probe_answered
            && !self.copies_elsewhere(&f)
            && !self.earliest_at_target(tag, &f)
            && !self.slot_wanted(now, tag, &f)
        {
            let cfg = &self.cfg;
            let backed_off = self
                .devices
                .get_mut(&addr)
                .and_then(|d| d.target_idx(f.target).map(|ti| &mut d.targets[ti]))
                .map(|t| t.silent_backoff(now, cfg));
            if let Some(rto) = backed_off {
                let deadline = self.deadline(now, f.first_sent, rto);
                self.outstanding.set_deadline(tag, deadline);
                return;
            }
        }
        let cfg = self.cfg.clone();
        let Some(d) = self.devices.get_mut(&addr) else {
            return;
        };
        let ntargets = d.targets.iter().filter(|t| t.usable()).count().max(1) as u32;
        let mut logs = Vec::new();
        if let Some(ti) = d.target_idx(f.target) {
            let t = &mut d.targets[ti];
            t.on_loss(f.seq, cfg.min_window, true);
            t.retransmits += 1;
            let scorn_at = if cfg.deadsecs.is_zero() {
                cfg.scorn_after
            } else {
                cfg.scorn_after.min(cfg.deadsecs / ntargets)
            };
            // The driver scorns only after `deadsecs / targets` (or 10 s) of waiting; since we
            // move a timed-out frame to another target at once, no frame may wait that long,
            // so a target that let `nframes` timeouts pass without one answer is scorned too.
            t.silent += 1;
            t.silent_since.get_or_insert(now);
            if ntargets > 1 && (waited > scorn_at || t.silent >= t.nframes as u32) {
                // Said once per change of state, not once per frame: every frame of a full
                // window that times out together scorns the target again (the driver's
                // `scorn` logs nothing; its `err` device gets the retransmissions).
                if t.taint == 0 {
                    t.scorned = 0;
                }
                let was = t.taint;
                t.scorn();
                t.scorned += 1;
                t.silent = 0;
                if was == 0 {
                    logs.push(format!(
                        "{addr}: target {} tainted ({}): new frames go to the other targets",
                        t.mac, t.taint
                    ));
                }
            }
            t.path_dark(f.iface);
            logs.extend(t.path_lost(addr, f.iface));
        }
        for l in logs {
            self.log(l);
        }
        self.hold_copy(now, tag, &f, now + timeout, true);
        self.copy_due(now, tag, CopyWhy::Timeout);
    }

    /// Interface `idx` is running again (`Engine::interface_up`): every data frame whose
    /// last copy went out on it, or whose target is reached through it alone, and whose
    /// target has answered nothing since that copy went out a smoothed RTT or more ago,
    /// went into a dead link. Its copy is presumed lost, its window slot free at once, and
    /// the frame's next copy is due now (`CopyWhy::LinkUp`), in the order the frames were
    /// first sent, with the target's timeout not backed off. A frame whose next copy
    /// already waits (after a timeout, after later frames were answered, a tail probe),
    /// through the interface as well, has its copy due now and its last copy's slot freed
    /// too, however recent the answers that made it wait: session 35's version passed over
    /// copies waiting after later answers, and left the slots of copies out less than
    /// [`SILENT_HOLD`] held, so the copies waited up to that long for the window after the
    /// link came back (s36/leftovers saw 0.75 s on real daemons). The copies go out as the
    /// window allows (`send_waiting_copies`: below `nframes`). Each frame presumed lost
    /// here counts as a loss of its target; one whose copy already waited was counted when
    /// it began to wait. Returns the devices to `pump`.
    ///
    /// Without it the frames waited for timers backed off through the silence (up to
    /// `rto_max`, 5 s) after the link was back. Making them time out at once instead
    /// (session 34) was worse: `frame_timed_out` copies only the earliest frame at a silent
    /// target and backs every other off for as long as the silence lasted, and the earliest
    /// frame's copy then waited for a slot those others held. The Linux driver has no link
    /// event (`rexmit_timer` backs off to `MAXTIMER` over a cut link).
    pub(super) fn link_back(&mut self, now: Instant, idx: usize) -> Vec<TargetAddr> {
        let mut kicked: Vec<(u32, (Instant, u64, u64))> = Vec::new();
        // What was passed over, for the log line below: not data or past deadsecs, device
        // not up, another interface, answered since (or not yet overdue).
        let mut passed = [0u32; 4];
        for (tag, f) in self.outstanding.iter() {
            if !self.carries_data(f) || self.past_deadsecs(f, now) {
                passed[0] += 1;
                continue;
            }
            let Some(d) = self.devices.get(&f.dev).filter(|d| d.life == Life::Up) else {
                passed[1] += 1;
                continue;
            };
            let Some(t) = d.target_idx(f.target).map(|ti| &d.targets[ti]) else {
                passed[1] += 1;
                continue;
            };
            let through = t.paths.iter().any(|p| p.iface == idx);
            let only_through = through && t.paths.iter().all(|p| p.iface == idx);
            if !(f.iface == idx && through || only_through) {
                passed[2] += 1;
                continue;
            }
            let overdue =
                now.saturating_duration_since(f.sent) >= Duration::from_micros(t.rtt_avg_us);
            // An answer at the instant the copy went out (which freed its slot) is not
            // one since. A frame whose copy waits is presumed lost already (after a
            // timeout, or from answers to later frames, which may well have come after
            // its last copy went out): only its wait ends here.
            if f.waiting.is_none() && (!overdue || t.last_answer.is_some_and(|a| a > f.sent)) {
                passed[3] += 1;
                continue;
            }
            kicked.push((tag, (f.first_sent, f.op, f.offset)));
        }
        let waiting = kicked
            .iter()
            .filter(|(tag, _)| {
                self.outstanding
                    .get(*tag)
                    .is_some_and(|f| f.waiting.is_some())
            })
            .count();
        self.log(format!(
            "link back on if {idx}: {} frames copied ({waiting} of them waiting); passed over: \
             {} not data or past deadsecs, {} device not up, {} through another interface, \
             {} answered since or not overdue",
            kicked.len(),
            passed[0],
            passed[1],
            passed[2],
            passed[3]
        ));
        kicked.sort_by_key(|k| k.1);
        let mut devs: Vec<TargetAddr> = Vec::new();
        for (tag, _) in kicked {
            let Some(f) = self.outstanding.get(tag).cloned() else {
                continue;
            };
            // A loss of the target's (`aoe_initiator_losses`, found by timeout) unless the
            // frame was presumed lost already, and counted then, when its copy began to
            // wait.
            if let Some(t) = self
                .devices
                .get_mut(&f.dev)
                .filter(|_| f.waiting.is_none())
                .and_then(|d| d.target_idx(f.target).map(|ti| &mut d.targets[ti]))
            {
                t.retransmits += 1;
            }
            if f.waiting.is_some() {
                if let Some(o) = self.outstanding.get_mut(tag) {
                    o.waiting = Some(CopyWhy::LinkUp);
                }
            } else {
                self.hold_copy(now, tag, &f, now, true);
                self.copy_due(now, tag, CopyWhy::LinkUp);
            }
            // Its last copy (held under the frame's key) went into the dead link: gone,
            // its slot free now rather than once it has been out `SILENT_HOLD`, or the
            // copies would wait for those slots up to a second after the link came back
            // (0.7 s after a cut of 300 ms in the simulator). Remembered as a ghost: a late
            // answer undoes the presumption (`Engine::ghost_answered`).
            if let Some(h) = self.held.remove(&tag) {
                self.release(h.dev, h.target);
                if h.presumed_lost {
                    self.add_ghost(now, tag, &h);
                }
            }
            if !devs.contains(&f.dev) {
                devs.push(f.dev);
            }
        }
        devs
    }

    /// A new target's IDENTIFY timed out: asked again up to [`VET_TRIES`] times, then left
    /// [`Vet::Pending`] until its next Query Config response.
    #[cold]
    fn verify_unanswered(&mut self, now: Instant, f: &Outstanding) {
        let Some(d) = self.devices.get_mut(&f.dev) else {
            return;
        };
        let up = d.life == Life::Up;
        let Some(ti) = d.target_idx(f.target) else {
            return;
        };
        let t = &mut d.targets[ti];
        match t.vet {
            Vet::Out { tries } if up && tries < VET_TRIES => {
                self.send_verify(now, f.dev, ti, tries + 1);
            }
            Vet::Out { .. } => t.vet = Vet::Pending,
            _ => {}
        }
    }

    /// Whether frame `f`'s copy after a timeout may go to another target of its device
    /// (`place_copy`: a usable one, untainted unless every usable one is tainted).
    fn copies_elsewhere(&self, f: &Outstanding) -> bool {
        self.devices.get(&f.dev).is_some_and(|d| {
            let all_tainted = d.targets.iter().filter(|t| t.usable()).all(|t| t.taint > 0);
            d.targets
                .iter()
                .any(|t| t.mac != f.target && t.usable() && (t.taint == 0 || all_tainted))
        })
    }

    /// Whether `tag` is the earliest frame of a live operation outstanding at `f`'s target,
    /// its copy waiting to go out counted: first sent first, then in the order the frames
    /// were made (op, then offset), which copies keep. (Ordered by the latest copy's send
    /// order instead, the frame just copied would stop being the earliest, and each silent
    /// timeout would copy another frame of the window, as TCP's timer does not: it resends
    /// the earliest unacknowledged segment until it is acknowledged, RFC 6298 5.4.)
    fn earliest_at_target(&self, tag: u32, f: &Outstanding) -> bool {
        let key = |g: &Outstanding| (g.first_sent, g.op, g.offset);
        !self.outstanding.iter().any(|(k, g)| {
            k != tag
                && g.dev == f.dev
                && g.target == f.target
                && self.ops.contains_key(&g.op)
                && key(g) < key(f)
        })
    }

    /// Whether frame `f` (`tag`), whose target has answered nothing for a whole timeout and
    /// which is not the earliest there, must give its window slot up rather than back off:
    /// the copy of an earlier frame of its device waits for a slot (`Device::rexmitq`), is
    /// due, has no room at any target it may go to (`place_copy`), and may go to `f`'s
    /// target; that earlier frame is the earliest at its own target (so one slot is given
    /// up per copy of that frame, as TCP resends only the earliest segment, RFC 6298 5.4);
    /// and no copy presumed lost at `f`'s target is still to free its slot (one is coming
    /// already). Without it, frames sent into a silence that hold every slot of a target
    /// back off for ever (`Target::silent_backoff`) while the earliest frame's copy waits
    /// for one of their slots until `deadsecs`: a multipath device whose paths all went
    /// dark, one coming back, went down though that path answered. The driver frees a
    /// timed-out frame's slot at once (`rexmit_timer`: `t->nout--`) and moves the frames of
    /// a target that stopped answering to another (`reassign_frame`, `ejectif`), so
    /// nothing there waits on a slot.
    fn slot_wanted(&self, now: Instant, tag: u32, f: &Outstanding) -> bool {
        let Some(d) = self.devices.get(&f.dev) else {
            return false;
        };
        let Some(fti) = d.target_idx(f.target) else {
            return false;
        };
        if self
            .held
            .values()
            .any(|h| h.dev == f.dev && h.target == f.target && h.presumed_lost)
        {
            return false;
        }
        let f_key = (f.first_sent, f.op, f.offset);
        let all_tainted = d.targets.iter().filter(|t| t.usable()).all(|t| t.taint > 0);
        let ft = &d.targets[fti];
        d.rexmitq.iter().any(|&k| {
            let Some(g) = self.outstanding.get(k) else {
                return false;
            };
            let Some(why) = g.waiting else {
                return false;
            };
            if k == tag || (g.first_sent, g.op, g.offset) >= f_key {
                return false;
            }
            if !self.ops.contains_key(&g.op) || place_copy(d, g.target, why).is_some() {
                return false;
            }
            let due = why != CopyWhy::Timeout
                || d.target_idx(g.target)
                    .is_none_or(|ti| d.targets[ti].copy_due_after_timeout(g.seq, now));
            let may_go = g.target == f.target || (ft.usable() && (ft.taint == 0 || all_tainted));
            due && may_go && self.earliest_at_target(k, g)
        })
    }

    /// Copy `tag` of frame `f` keeps its window slot, without standing for the frame any
    /// more, until its own answer or its presumed loss (`Held`): at `due` if the target has
    /// answered a frame sent after it by then, else once it has been out [`SILENT_HOLD`] or
    /// its target's RTO, whichever is longer (a target that takes seconds to answer keeps
    /// its frames that long). A copy out that long already is presumed lost at once: its
    /// slot is free now. (Held until `due` regardless, a copy whose timer had backed off
    /// through a long silence kept its slot as long again, and at a full window the next
    /// copy waited for it past `deadsecs`.)
    pub(super) fn hold_copy(
        &mut self,
        now: Instant,
        tag: u32,
        f: &Outstanding,
        due: Instant,
        presumed_lost: bool,
    ) {
        let rto = self
            .devices
            .get(&f.dev)
            .and_then(|d| {
                d.target_idx(f.target)
                    .map(|ti| d.targets[ti].rto(&self.cfg))
            })
            .unwrap_or(self.cfg.rto_min);
        let silent_until = f.sent + SILENT_HOLD.max(rto);
        let h = Held {
            dev: f.dev,
            target: f.target,
            seq: f.seq,
            sent: f.sent,
            presumed_lost,
            due,
            silent_until,
            check_at: due.min(silent_until),
        };
        if silent_until <= now {
            self.release(h.dev, h.target);
            if presumed_lost {
                self.add_ghost(now, tag, &h);
            }
            return;
        }
        self.held.insert(tag, h);
    }

    /// Frees the window slots of held copies presumed lost by `now`: past `due` with a
    /// later frame to the same target answered, or past `silent_until`. Returns the
    /// devices that got a slot back: the caller must `pump` them, or a copy waiting for
    /// that slot (`Device::rexmitq`, its frame's timer parked) may wait for the next
    /// unrelated timer run, as long as the 60 s discovery beacon.
    #[must_use = "a freed slot must be offered to the copies waiting for one (pump)"]
    pub(super) fn expire_held(&mut self, now: Instant) -> Vec<TargetAddr> {
        let mut lost = Vec::new();
        for (tag, h) in self.held.iter_mut() {
            if h.silent_until <= now {
                lost.push(*tag);
                continue;
            }
            if h.due > now {
                continue;
            }
            let passed = self
                .devices
                .get(&h.dev)
                .and_then(|d| d.target_idx(h.target).map(|ti| &d.targets[ti]))
                .is_none_or(|t| t.answered_seq.is_some_and(|s| s > h.seq));
            if passed {
                lost.push(*tag);
            } else {
                h.check_at = h.silent_until;
            }
        }
        let mut freed: Vec<TargetAddr> = Vec::new();
        for tag in lost {
            if let Some(h) = self.held.remove(&tag) {
                self.release(h.dev, h.target);
                if !freed.contains(&h.dev) {
                    freed.push(h.dev);
                }
                if h.presumed_lost {
                    self.add_ghost(now, tag, &h);
                }
            }
        }
        freed
    }

    /// Lifts the fences (`Engine::fences`) of write copies presumed gone by `now`.
    pub(super) fn expire_fences(&mut self, now: Instant) {
        if self.fence_ends.front().is_some_and(|at| at <= now) {
            self.fences.retain(|_, f| f.gone_at > now);
            self.trim_fences();
        }
    }

    /// Drops the ends of fences already lifted from the front of `fence_ends`, so its
    /// front is the earliest end of a fence standing; rebuilds it once such entries
    /// outnumber the fences. Run after every removal from `fences`.
    pub(super) fn trim_fences(&mut self) {
        let fences = &self.fences;
        self.fence_ends.tidy(
            fences.len(),
            |at, tag| fences.get(&tag).is_some_and(|f| f.gone_at == at),
            || fences.iter().map(|(t, f)| (f.gone_at, *t)),
        );
    }

    /// True while a fence stands and some device has ops queued, one of which may wait for
    /// it. Worked out from the queues themselves, not from a flag `pick_queued` keeps, so
    /// no path that queues an op or raises a fence can leave a waiting write without its
    /// wake-up; a wake-up for a fence nobody waits for costs one timer run.
    pub(super) fn fenced_ops(&self) -> bool {
        !self.fences.is_empty() && self.devices.values().any(|d| !d.queue.is_empty())
    }

    /// Remembers held copy `tag`, presumed lost and its slot freed, for [`GHOST_TTL`].
    fn add_ghost(&mut self, now: Instant, tag: u32, h: &Held) {
        while self.ghost_order.len() >= MAX_GHOSTS
            || self
                .ghost_order
                .front()
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= GHOST_TTL)
        {
            let Some((_, old)) = self.ghost_order.pop_front() else {
                break;
            };
            self.ghosts.remove(&old);
        }
        self.ghosts.insert(
            tag,
            Ghost {
                dev: h.dev,
                target: h.target,
                sent: h.sent,
            },
        );
        self.ghost_order.push_back((now, tag));
    }

    /// The answer to a copy presumed lost after all (`Engine::ghosts`): a sample of it, and
    /// the presumption undone (`Target::spurious_copy`). True if `tag` was one (of `dev`).
    pub(super) fn ghost_answered(&mut self, now: Instant, dev: TargetAddr, tag: u32) -> bool {
        if self.ghosts.get(&tag).is_none_or(|g| g.dev != dev) {
            return false;
        }
        let Some(g) = self.ghosts.remove(&tag) else {
            return false;
        };
        if let Some(t) = self
            .devices
            .get_mut(&g.dev)
            .and_then(|d| d.target_idx(g.target).map(|ti| &mut d.targets[ti]))
        {
            t.spurious_copy(now, now.saturating_duration_since(g.sent));
        }
        true
    }

    /// The answer to a held copy: its slot is free, and if the copy was presumed lost, the
    /// presumption was wrong (`Target::spurious_copy`: a sample of the copy, the window
    /// cut undone). True if `tag` was one (of device `dev`).
    pub(super) fn held_answered(&mut self, now: Instant, dev: TargetAddr, tag: u32) -> bool {
        if self.held.get(&tag).is_none_or(|h| h.dev != dev) {
            return false;
        }
        if let Some(h) = self.held.remove(&tag) {
            self.release(h.dev, h.target);
            let mut ended_silence = false;
            if let Some(t) = self
                .devices
                .get_mut(&h.dev)
                .and_then(|d| d.target_idx(h.target).map(|ti| &mut d.targets[ti]))
            {
                ended_silence = t.answered_copy(h.seq, now);
                if h.presumed_lost {
                    t.spurious_copy(now, now.saturating_duration_since(h.sent));
                }
            }
            if ended_silence {
                self.restart_timers(now, h.dev, h.target);
            }
        }
        true
    }

    /// Target `mac` of device `dev` answered after a silence: the frames outstanding there,
    /// whose timers backed off through the silence (`Target::silent_backoff`, up to
    /// `rto_max`), run again one timeout from now, as every answer restarts TCP's timer
    /// (RFC 6298 5.3). Without it, a frame that slept through a link cut would be looked
    /// at only seconds after the link came back, and with a short `deadsecs` could take
    /// the device down though the target answers again. Frames whose copy waits are left
    /// as they are (`Engine::waiting_wake`).
    pub(super) fn restart_timers(&mut self, now: Instant, dev: TargetAddr, mac: MacAddr) {
        let Some(rto) = self
            .devices
            .get(&dev)
            .and_then(|d| d.target_idx(mac).map(|ti| d.targets[ti].rto(&self.cfg)))
        else {
            return;
        };
        let restarted: Vec<(u32, Instant)> = self
            .outstanding
            .iter()
            .filter(|(_, f)| f.dev == dev && f.target == mac && f.waiting.is_none())
            .map(|(tag, f)| (tag, f.deadline.min(self.deadline(now, f.first_sent, rto))))
            .collect();
        for (tag, deadline) in restarted {
            self.outstanding.set_deadline(tag, deadline);
        }
    }

    /// One slot of `mac`'s window on device `dev` is free.
    pub(super) fn release(&mut self, dev: TargetAddr, mac: MacAddr) {
        if let Some(d) = self.devices.get_mut(&dev) {
            if let Some(ti) = d.target_idx(mac) {
                d.targets[ti].nout = d.targets[ti].nout.saturating_sub(1);
            }
        }
    }

    /// Where a waiting frame's deadline is parked: only `deadsecs` ends the wait.
    fn park_deadline(&self, now: Instant, first_sent: Instant) -> Instant {
        if self.cfg.deadsecs.is_zero() {
            now + self.cfg.rto_max
        } else {
            (first_sent + self.cfg.deadsecs).max(now)
        }
    }

    /// When the timer must look at frame `f`, whose next copy waits (`why`), again. A copy
    /// that is due waits only for a window slot, and every slot is freed by an event that
    /// sends the waiting copies (an answer, a held copy's expiry on the timer, `pump`): its
    /// frame sleeps until `deadsecs`, when the device goes down if it is still unanswered.
    /// A copy after a timeout that is not yet due becomes due by time alone when its target
    /// has answered nothing for a smoothed RTT (`Target::copy_due_after_timeout`): the
    /// timer runs then, once, not every RTT while the window stays full (which, on a 500 µs
    /// timeout, ran the timer some 2000 times a second while a target was silent).
    fn waiting_wake(&self, now: Instant, f: &Outstanding, why: CopyWhy) -> Instant {
        let park = self.park_deadline(now, f.first_sent);
        let t = self
            .devices
            .get(&f.dev)
            .and_then(|d| d.target_idx(f.target).map(|ti| &d.targets[ti]));
        match (why, t) {
            (CopyWhy::Timeout, Some(t)) if !t.copy_due_after_timeout(f.seq, now) => t
                .copy_due_at()
                .map_or(park, |at| park.min(at.max(now + self.cfg.rto_min))),
            _ => park,
        }
    }

    /// Frame `tag`'s last copy is held; its next copy goes out when a window has room
    /// (`Engine::send_waiting_copies`, run by `pump`).
    fn copy_due(&mut self, now: Instant, tag: u32, why: CopyWhy) {
        let Some(f) = self.outstanding.get(tag) else {
            return;
        };
        let dev = f.dev;
        let park = self.waiting_wake(now, f, why);
        if let Some(f) = self.outstanding.get_mut(tag) {
            f.waiting = Some(why);
        }
        self.outstanding.set_deadline(tag, park);
        if let Some(d) = self.devices.get_mut(&dev) {
            d.rexmitq.push_back(tag);
        }
    }

    /// Sends the copies waiting for a window slot, oldest first, while a target has room
    /// (`rexmit_deferred`). Every copy that may still be at a target counts against that
    /// target's window, and a copy goes out only below the target's ceiling (`nframes`,
    /// its buffer count): a retransmission ignores the congestion window, as TCP's does,
    /// but never puts the target over its buffer count. True if none is left waiting.
    pub(super) fn send_waiting_copies(&mut self, now: Instant, addr: TargetAddr) -> bool {
        let mut i = 0;
        loop {
            let Some(d) = self.devices.get_mut(&addr) else {
                return false;
            };
            let Some(&key) = d.rexmitq.get(i) else {
                return d.rexmitq.is_empty();
            };
            let Some(f) = self.outstanding.get(key).filter(|f| f.waiting.is_some()) else {
                d.rexmitq.remove(i);
                continue;
            };
            let f = f.clone();
            if !self.ops.contains_key(&f.op) {
                // Its op failed: nothing to resend (the last copy stays held).
                d.rexmitq.remove(i);
                self.outstanding.remove(key);
                continue;
            }
            if d.life == Life::Down {
                return false;
            }
            if !d.targets.iter().any(Target::usable) {
                self.device_down(addr, "no path left");
                return false;
            }
            let why = f.waiting.unwrap_or(CopyWhy::Timeout);
            let due = why != CopyWhy::Timeout
                || d.target_idx(f.target)
                    .is_none_or(|ti| d.targets[ti].copy_due_after_timeout(f.seq, now));
            if !due {
                // Looked at again on the next answer or timer run. Its frame's timer may be
                // parked (the copy was due when queued, and an answer since made it wait
                // again): it must run when the copy turns due by time alone, or with no
                // other frame out nothing would send it before the next beacon.
                let wake = self.waiting_wake(now, &f, why);
                if let Some(o) = self.outstanding.get(key) {
                    let d = o.deadline.min(wake);
                    self.outstanding.set_deadline(key, d);
                }
                i += 1;
                continue;
            }
            let Some(ti) = place_copy(d, f.target, why) else {
                return false;
            };
            d.rexmitq.remove(i);
            let rto = d.targets[ti].rto(&self.cfg);
            let rto = match why {
                CopyWhy::Timeout => backoff(rto, f.retransmits + 1, self.cfg.rto_max),
                CopyWhy::LaterAnswered | CopyWhy::TailProbe | CopyWhy::LinkUp => rto,
            };
            self.resend(now, key, f, ti, rto, why);
        }
    }

    /// Sends a copy of frame `tag` to target `ti` (which has room) on that target's next
    /// path, with a fresh tag and timeout `rto`; the copy takes a slot of its own.
    fn resend(
        &mut self,
        now: Instant,
        tag: u32,
        f: Outstanding,
        ti: usize,
        rto: Duration,
        why: CopyWhy,
    ) {
        let addr = f.dev;
        let Some(d) = self.devices.get_mut(&addr) else {
            return;
        };
        d.stats.retransmits += 1;
        let t = &mut d.targets[ti];
        t.nout += 1;
        t.max_nout = t.max_nout.max(t.nout);
        let pi = t.take_path();
        let path = &t.paths[pi];
        let (iface, path_sectors) = (path.iface, path.sectors);
        let seq = t.take_seq();
        t.last_sent = Some(now);
        let mac = t.mac;
        self.outstanding.remove(tag);
        let newtag = self.new_tag(now);
        if let Some(d) = self.devices.get_mut(&addr) {
            d.targets[ti].sent_order.push_back((seq, newtag));
        }
        let src = self
            .interfaces
            .get(&iface)
            .map(|i| i.mac)
            .unwrap_or_default();
        let mut earlier = if mac == f.target {
            f.earlier.clone()
        } else {
            Vec::new()
        };
        if mac == f.target {
            if earlier.len() >= MAX_EARLIER_COPIES {
                earlier.remove(0);
            }
            earlier.push((tag, f.sent));
        }
        let mut nf = Outstanding {
            target: mac,
            iface,
            sent: now,
            deadline: self.deadline(now, f.first_sent, rto),
            retransmits: f.retransmits + 1,
            seq,
            later_answered: 0,
            after_silence: why == CopyWhy::Timeout,
            earlier,
            waiting: None,
            ..f
        };
        // The path's MTU shrank since the frame was sized (or it moves to a path with a
        // smaller one): resent whole, neither the request (a write) nor the answer (a read)
        // would fit, and it would time out for ever. Keep what fits; the rest goes back to
        // the op and out in new frames as the window allows. (The Linux driver resends the
        // frame unchanged.)
        if nf.count > path_sectors {
            let rest = (nf.count - path_sectors) as u64;
            self.reissue(addr, f.op, nf.offset + path_sectors as u64, rest);
            nf.count = path_sectors;
            self.note_resized(addr, f.target, rest, false);
        }
        let nout = self.devices.get(&addr).map_or(0, |d| d.targets[ti].nout);
        let note = match why {
            CopyWhy::Timeout => "",
            CopyWhy::LaterAnswered => " (later frames answered)",
            CopyWhy::TailProbe => " (tail probe)",
            CopyWhy::LinkUp => " (link up)",
        };
        self.log(format!(
            "retransmit {addr} oldtag={tag:08x} newtag={newtag:08x} s={src} d={mac} nout={nout}{note}"
        ));
        self.emit_frame(newtag, &nf);
        self.outstanding.insert(newtag, nf);
    }

    /// A frame to target `mac` of device `addr`, sized before the payload shrank, had
    /// `sectors` sent again in new frames (`refused`: the target aborted it): counted for
    /// [`Engine::say_resized`].
    pub(super) fn note_resized(
        &mut self,
        addr: TargetAddr,
        mac: MacAddr,
        sectors: u64,
        refused: bool,
    ) {
        let r = self.resized.entry((addr, mac)).or_default();
        r.frames += 1;
        r.refused += u32::from(refused);
        r.sectors += sectors;
    }

    /// Says, in one line per device and target, the frames sized before an MTU change that
    /// went out again in frames that fit (`note_resized`), once none of that target's
    /// frames in flight is larger than its device's payload any more: a window's worth of
    /// frames is resized at every such change, and a line each (before session 35) filled
    /// the log and the `err` file. Run at the end of `handle_frame` and `handle_timeout`,
    /// where frames are answered, refused or time out; costs nothing while none is counted.
    pub(super) fn say_resized(&mut self) {
        if self.resized.is_empty() {
            return;
        }
        let done: Vec<(TargetAddr, MacAddr)> = self
            .resized
            .keys()
            .filter(|(dev, mac)| {
                let payload = self.devices.get(dev).map_or(0, |d| d.payload);
                payload == 0
                    || !self
                        .outstanding
                        .iter()
                        .any(|(_, f)| f.dev == *dev && f.target == *mac && f.count > payload)
            })
            .copied()
            .collect();
        for k in done {
            let Some(r) = self.resized.remove(&k) else {
                continue;
            };
            let (addr, mac) = k;
            let payload = self.devices.get(&addr).map_or(0, |d| d.payload);
            self.log(format!(
                "{addr}: {} frames to {mac} sized before the payload shrank to {payload} sectors \
                 ({} refused by the target): {} sectors resent in new frames",
                r.frames, r.refused, r.sectors
            ));
        }
    }

    /// Loss detection from later answers, as RACK does it (RFC 8985 6.2), with
    /// [`Config::fast_retransmit`] as the count of later answers a frame needs first (RFC
    /// 5681 3.2's duplicate-ACK threshold; AoE has answers to later frames where TCP has
    /// duplicate ACKs): `answered`, sent at `sent`, was just answered, so every frame still
    /// outstanding at its target that was sent before it has one more later frame answered.
    /// Such a frame is presumed lost once it has been out as long as `answered` took plus
    /// the target's reordering window (`Target::reo_wnd`, the spread of its answer times):
    /// at once if that has passed, else when it passes (RACK's reordering timer, RFC 8985
    /// 6.3; `Engine::rack`) if its answer has not come by then. Its copy goes out at once,
    /// on the target's next path, without waiting for the retransmission timer, which is
    /// only the backstop. A target that completes requests out of order (a worker pool, a
    /// disk that reorders) widens its own window by the spread of its answer times, so a
    /// frame merely slow is not copied. The copy counts afresh from its own send. Frames of
    /// failed ops, probes, IDENTIFYs and frames past `deadsecs` are left to the timer, which
    /// handles them as the driver does. The driver has no such thing: a lost frame waits
    /// for `rexmit_timer`.
    ///
    /// Per path (session 36): the answer came in through local interface `iface`, and the
    /// rule above holds for the frames sent before it through that interface. Frames on
    /// the target's other paths are not in its order: a path that takes longer (another
    /// hop, a busy bridge or relay) has its frames overtaken by every answer on a quicker
    /// one, and each was copied for nothing (15870 copies in the three-path test,
    /// session 35). Such a frame is presumed lost only once it has been out as long as
    /// its own path's round trip allows (`PathRtt::overtaken_after`: that path's
    /// `srtt + 4 * rttvar`, or the answered frame's time if longer) plus the reordering
    /// window, so a path that went dark while the others answer (the timer, restarted by
    /// their answers, would not fire) is still found within its own RTO. MPTCP does the
    /// same with one loss detector per subflow (RFC 8684 3.3: each subflow is a TCP
    /// connection of its own); the driver has neither.
    pub(super) fn later_frame_answered(
        &mut self,
        now: Instant,
        answered: &Outstanding,
        sent: Instant,
        iface: usize,
    ) {
        let thresh = self.cfg.fast_retransmit;
        if thresh == 0 || answered.after_silence {
            // A copy sent after a silent timeout overtakes everything the target still
            // holds from before its silence (a stalled daemon works through its backlog
            // first, or a disk serves it in any order): its answer says the target is
            // alive, not that those frames are lost. If nothing else is answered for a
            // timeout, they are (`Target::probe_answered`, `Engine::frame_timed_out`).
            return;
        }
        let Some(t) = self
            .devices
            .get_mut(&answered.dev)
            .and_then(|d| d.target_idx(answered.target).map(|ti| &mut d.targets[ti]))
        else {
            return;
        };
        let took = now.saturating_duration_since(sent);
        let reo_wnd = t.reo_wnd();
        // A frame on another path than the answer's waits as long as its own path's round
        // trip allows; a path since ejected (its frames timed out) gets none of that.
        let paths = &t.paths;
        let wait_on = |f_iface: usize| {
            let own = match paths.iter().find(|p| p.iface == f_iface) {
                Some(p) if f_iface != iface => p.rtt.overtaken_after(),
                _ => Duration::ZERO,
            };
            took.max(own) + reo_wnd
        };
        let rack = &mut self.rack;
        // The copies sent to this target before the answered one, oldest first, from its
        // send-order list: with answers in order there are none, and this costs nothing,
        // where a scan of every outstanding frame cost a window's worth per answer.
        let outstanding = &mut self.outstanding;
        let live = |o: &Frames, (seq, tag): (u64, u32)| {
            o.get(tag).is_some_and(|f| {
                f.seq == seq && f.dev == answered.dev && f.target == answered.target
            })
        };
        while t.sent_order.front().is_some_and(|e| !live(outstanding, *e)) {
            t.sent_order.pop_front();
        }
        if t.sent_order.len() > t.sent_order_compact_at() {
            t.sent_order.retain(|e| live(outstanding, *e));
        }
        if t.sent_order
            .front()
            .is_some_and(|&(seq, _)| seq < answered.seq)
        {
            t.overtaking_answers += 1;
        }
        let mut lost = Vec::new();
        for &(seq, tag) in &t.sent_order {
            if seq >= answered.seq {
                break;
            }
            let Some(f) = outstanding.get_mut(tag) else {
                continue;
            };
            if f.seq == seq
                && f.dev == answered.dev
                && f.target == answered.target
                && f.waiting.is_none()
            {
                f.later_answered = f.later_answered.saturating_add(1);
                if f.later_answered >= thresh {
                    let at = f.sent + wait_on(f.iface);
                    if at <= now {
                        lost.push(tag);
                    } else {
                        let e = rack.entry(tag).or_insert(at);
                        *e = (*e).min(at);
                    }
                }
            }
        }
        for tag in lost {
            self.rack.remove(&tag);
            self.fast_retransmit(now, tag);
        }
    }

    /// When target `t` of device `d` gets a tail loss probe (RACK-TLP, RFC 8985 7): a probe
    /// timeout ([`Target::pto`]) after its last answer or the last frame sent to it,
    /// whichever is later, while frames are out there and nothing more waits to go to the
    /// device (no unsent frame, no copy waiting), once per silence. `None` if none is due.
    ///
    /// Such a tail is where RACK finds nothing: no frame is sent after the last ones, so no
    /// answer overtakes them, and a lost one waited for the RTO (`srtt + 4 * rttvar`, at
    /// least twice the RTT) with the link idle. Each request of a write through the page
    /// cache ends in one (the kernel sends the next when it is done). A window still busy
    /// is left to RACK and the timer, so a stalled target gets no more than one probe.
    pub(super) fn tail_probe_at(&self, d: &Device, t: &Target) -> Option<Instant> {
        if d.life != Life::Up
            || !d.queue.is_empty()
            || !d.rexmitq.is_empty()
            || t.nout == 0
            || t.tail_probe_out
            || !t.usable()
        {
            return None;
        }
        let base = match (t.last_answer, t.last_sent) {
            (Some(a), Some(s)) => a.max(s),
            (a, s) => a.or(s)?,
        };
        base.checked_add(t.pto(&self.cfg)?)
    }

    /// The earliest [`Engine::tail_probe_at`] of every target.
    pub(super) fn next_tail_probe(&self) -> Option<Instant> {
        self.devices
            .values()
            .flat_map(|d| d.targets.iter().filter_map(|t| self.tail_probe_at(d, t)))
            .min()
    }

    /// Sends the tail loss probes due by `now`: a copy of the latest frame out at each such
    /// target (RFC 8985 7.3 retransmits the most recently sent segment), taking a free slot
    /// as a fast retransmission's copy does. Its answer overtakes every frame sent before
    /// it, so RACK then finds those lost (`Engine::later_frame_answered`); if the probe
    /// itself is lost, the timer still runs an RTO after the last answer. The window is left
    /// alone (a probe is no sign of congestion; RACK's losses or the timeout that may follow
    /// count as usual), and the original, presumed lost, keeps its slot as a fast
    /// retransmission's does: its answer after all is a sample that raises the smoothed
    /// RTT, and with it the probe timeout (`Target::spurious_copy`).
    pub(super) fn tail_probes(&mut self, now: Instant) {
        let mut due = Vec::new();
        for d in self.devices.values() {
            for t in &d.targets {
                if self.tail_probe_at(d, t).is_some_and(|at| at <= now) {
                    due.push((d.addr, t.mac));
                }
            }
        }
        for (addr, mac) in due {
            let latest = self
                .outstanding
                .iter()
                .filter(|(_, f)| {
                    f.dev == addr && f.target == mac && f.waiting.is_none() && self.carries_data(f)
                })
                .max_by_key(|(_, f)| f.seq)
                .map(|(tag, f)| (tag, self.past_deadsecs(f, now)));
            let Some(t) = self
                .devices
                .get_mut(&addr)
                .and_then(|d| d.target_idx(mac).map(|ti| &mut d.targets[ti]))
            else {
                continue;
            };
            // Once per silence, whether or not a frame could be copied.
            t.tail_probe_out = true;
            let Some((tag, past_deadsecs)) = latest else {
                continue;
            };
            if past_deadsecs {
                continue;
            }
            t.retransmits += 1;
            t.tail_probes += 1;
            let Some(f) = self.outstanding.get(tag).cloned() else {
                continue;
            };
            self.hold_copy(now, tag, &f, f.deadline, true);
            self.copy_due(now, tag, CopyWhy::TailProbe);
        }
    }

    /// RACK's reordering timer (RFC 8985 6.3): frames whose reordering window passed
    /// without their answer are presumed lost (`Engine::later_frame_answered`).
    pub(super) fn rack_timers(&mut self, now: Instant) {
        let due: Vec<u32> = self
            .rack
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(tag, _)| *tag)
            .collect();
        for tag in due {
            self.rack.remove(&tag);
            self.fast_retransmit(now, tag);
        }
    }

    /// The answer to an earlier copy of a write, which waits for its latest copy's answer
    /// (`Engine::answered_frame`): the later copy was spurious all the same, and the answer
    /// is a sample of the earlier copy (`Target::spurious_copy`).
    pub(super) fn late_write_copy_answered(&mut self, now: Instant, h: &HeaderRepr) {
        let tag = h.tag.0;
        let Some((sent, mac)) = self.outstanding.values_mut().find_map(|f| {
            if f.dev != h.target {
                return None;
            }
            let i = f.earlier.iter().position(|e| e.0 == tag)?;
            // Forgotten, so a duplicate of the answer is not another sample.
            Some((f.earlier.remove(i).1, f.target))
        }) else {
            return;
        };
        if let Some(t) = self
            .devices
            .get_mut(&h.target)
            .and_then(|d| d.target_idx(mac).map(|ti| &mut d.targets[ti]))
        {
            t.spurious_copy(now, now.saturating_duration_since(sent));
        }
    }

    fn fast_retransmit(&mut self, now: Instant, tag: u32) {
        let Some(f) = self.outstanding.get(tag).cloned() else {
            return;
        };
        if f.waiting.is_some() || !self.carries_data(&f) || self.past_deadsecs(&f, now) {
            return;
        }
        let cfg = self.cfg.clone();
        let addr = f.dev;
        let Some(d) = self.devices.get_mut(&addr) else {
            return;
        };
        if d.life != Life::Up {
            return;
        }
        let Some(ti) = d.target_idx(f.target) else {
            return;
        };
        let t = &mut d.targets[ti];
        if !t.usable() {
            return;
        }
        t.on_loss(f.seq, cfg.min_window, false);
        t.loss_found();
        t.path_dark(f.iface);
        t.retransmits += 1;
        t.fast_retransmits += 1;
        // Not a loss of the frame's path: a frame presumed lost because later ones were
        // answered is most often only overtaken, by answers on a shorter path of the same
        // target. The driver counts a path's losses (`ifp->lost`, `ejectif`) in
        // `rexmit_timer` alone, on timeouts; counting these ejected the longer of two
        // healthy paths within a second (session 35, docs/TEST-AUDIT.md).
        // Most likely lost, but a target that serves requests in parallel may still hold
        // it: the copy keeps its slot until its own timer runs out.
        self.hold_copy(now, tag, &f, f.deadline, true);
        self.copy_due(now, tag, CopyWhy::LaterAnswered);
    }

    /// The outstanding frame an answer with `tag` from `src` belongs to, and, if the tag
    /// is that of an earlier copy, when that copy was sent. A frame resent to the same
    /// target MAC asks for the same thing with a new tag, so for a read whichever copy is
    /// answered first completes it and the others' answers are ignored as late (the driver
    /// forgets the old tag, so when only the answer was slow it waits for the copy's answer
    /// too, queued behind the original at the target). The answer to an earlier copy is an
    /// unambiguous RTT sample of that copy: the timer fired too soon, and the sample
    /// raises it.
    ///
    /// A write still waits for its latest copy's answer: completed on an earlier one, it
    /// could be followed by a new write to the same sectors while the copy is still queued
    /// at the target, and a target that serves requests in parallel (`aoe serve`) could
    /// then apply the stale copy last.
    pub(super) fn answered_frame(&self, tag: u32) -> Option<(u32, Option<Instant>)> {
        if self.outstanding.contains_key(tag) {
            return Some((tag, None));
        }
        let (cur, sent) = self
            .outstanding
            .iter()
            .find_map(|(cur, f)| f.earlier.iter().find(|e| e.0 == tag).map(|e| (cur, e.1)))?;
        let f = self.outstanding.get(cur)?;
        let write = self
            .ops
            .get(&f.op)
            .is_some_and(|o| matches!(o.kind, OpKind::Write(_)));
        (!write).then_some((cur, Some(sent)))
    }

    /// `probe`: a one-sector read to each tainted target with nothing outstanding; every
    /// answer halves the taint (the driver decrements it; halving recovers a path that came
    /// back within a few answers instead of up to 1000).
    pub(super) fn probe_tainted(&mut self, now: Instant) {
        let mut probes = Vec::new();
        for d in self.devices.values() {
            if d.life != Life::Up || d.sectors == 0 {
                continue;
            }
            for (ti, t) in d.targets.iter().enumerate() {
                if t.taint > 0 && t.nout == 0 && t.usable() {
                    probes.push((d.addr, ti));
                }
            }
        }
        for (addr, ti) in probes {
            let id = self.new_internal_op(addr, OpKind::Probe);
            self.send_new(now, addr, id, ti, 0, 1);
        }
    }

    /// An op of one frame of one sector (a probe's read, a new target's IDENTIFY) sent
    /// to one target directly, never queued.
    pub(super) fn new_internal_op(&mut self, addr: TargetAddr, kind: OpKind) -> u64 {
        let id = self.next_op;
        self.next_op += 1;
        self.ops.insert(
            id,
            Op {
                dev: addr,
                source: SourceId::ENGINE,
                kind,
                lba: 0,
                sectors: 1,
                issued: 1,
                reissue: Vec::new(),
                frames_out: 1,
                fenced: false,
                home: ReadHome::default(),
                held: None,
            },
        );
        id
    }
}

impl Engine {
    /// True while some up device has a usable tainted target, which the timer probes.
    pub(super) fn tainted_targets(&self) -> bool {
        self.devices
            .values()
            .any(|d| d.life == Life::Up && d.targets.iter().any(|t| t.taint > 0 && t.usable()))
    }
}

/// How long a held copy keeps its slot while its target answers nothing sent after it
/// (`Held`): longer than a loaded host stalls a daemon (tens of milliseconds), short next
/// to `deadsecs`, so a cut link still gets its copies out after a second.
pub(super) const SILENT_HOLD: Duration = Duration::from_secs(1);

/// Earlier copies of a frame whose answers are still taken (`Engine::answered_frame`).
const MAX_EARLIER_COPIES: usize = 4;

/// Most copies presumed lost remembered after their slot was freed (`Engine::ghosts`).
pub(super) const MAX_GHOSTS: usize = 1024;

/// How long such a copy is remembered: as long as a held copy of a silent target keeps its
/// slot, twice; an answer later than that is not a round trip worth learning from.
pub(super) const GHOST_TTL: Duration = Duration::from_secs(2);

/// Where a frame's next copy goes (`CopyWhy`): after a timeout another usable target with
/// room, else the same target if it has room (its next interface: `resend` ->
/// `ifrotate`); after later answers the same target first, then another. Other targets
/// are taken only untainted, unless every usable one is tainted. `None` while every
/// window it may use is full. Room is below `nframes`, the target's buffer count.
fn place_copy(d: &Device, old: MacAddr, why: CopyWhy) -> Option<usize> {
    let n = d.targets.len();
    let all_tainted = d.targets.iter().filter(|t| t.usable()).all(|t| t.taint > 0);
    let room = |t: &Target| t.usable() && t.nout < t.nframes;
    let old_ti = d.target_idx(old).filter(|&i| room(&d.targets[i]));
    let from = d.target_idx(old).unwrap_or(0);
    let other = (0..n)
        .map(|k| (from + 1 + k) % n)
        .filter(|&i| Some(i) != d.target_idx(old))
        .find(|&i| room(&d.targets[i]) && (d.targets[i].taint == 0 || all_tainted));
    match why {
        CopyWhy::Timeout => other.or(old_ti),
        CopyWhy::LaterAnswered | CopyWhy::TailProbe | CopyWhy::LinkUp => old_ti.or(other),
    }
}

/// `rto * 2^n`, capped.
pub(super) fn backoff(rto: Duration, n: u32, max: Duration) -> Duration {
    rto.checked_mul(1u32 << n.min(16))
        .unwrap_or(max)
        .min(max.max(rto))
}
