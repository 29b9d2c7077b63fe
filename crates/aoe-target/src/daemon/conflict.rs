//! The address conflict watch: another target answering for one of our shelf.slots while we
//! serve it.
//!
//! AoE has no disk identity beyond shelf.slot. An initiator files every Query Config answer
//! for e*X*.*Y* under one device and takes each answering MAC as another path to it (the
//! Linux driver's `aoecmd_cfg_rsp` adds a target per MAC; `aoe initiator` likewise), so two
//! targets at one address are read and written as one disk, each request landing on either.
//! The start and reload probe ([`crate::probe`]) refuses an address already served, but a
//! target that comes up *after* us is not seen by it. So, as a host defends its IP address
//! against a duplicate (RFC 5227's ARP probes and announcements), the daemon probes again
//! every [`ServeConfig::conflict_check`] (a minute by default): a broadcast Query Config
//! `read` for each export's shelf.slot on each of its interfaces, tagged with the probe's
//! tag ([`Probe::start_watch`]). Any answer with that tag from a MAC that is not one of our
//! interfaces' is another target claiming the address.
//!
//! Our own target never answers the probe: it goes out on a socket of its own, and the
//! serving socket, bound to the AoE ethertype with `PACKET_IGNORE_OUTGOING`, does not see
//! frames sent from its host (only `ETH_P_ALL` taps do, packet(7)). An answer from another
//! of our interfaces (one export on two links of one switch) is ours and does not count.
//! The same holds for a peer on the *same* NIC (vblade on our interface shares our MAC): its
//! socket, bound to the AoE ethertype too, does not see our probe leave, so it cannot
//! answer it and is not found this way (docs/PROTOCOL.md).
//!
//! What is done: a warning once per other MAC and export while the conflict lasts, the
//! export's status (`conflicts`) and the metric `aoe_target_address_conflict`; the entry is
//! dropped, with an info line, when that MAC has not answered [`CLEAR_AFTER`] probes in a
//! row. Serving goes on: refusing would let any host on the LAN switch an export off by
//! answering for its address.
//!
//! Cost: the probe's sockets live for the probe's wait (`probe_ms`, 1 s) once a check
//! period, and take AoE responses only (a kernel filter), so the initiators' requests are
//! not copied to them; the loop reads them on its once-a-second refresh tick.

use std::collections::BTreeMap;
use std::time::Instant;

use aoe_wire::{MacAddr, TargetAddr};

use crate::config::ServeConfig;
use crate::probe::{Duplicate, Probe};

/// Probes in a row an entry may go unanswered before it is cleared: one lost answer (a
/// loaded segment, a restarting peer) does not clear it.
pub(super) const CLEAR_AFTER: u32 = 3;

/// One other target seen answering for one of our addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Seen {
    /// Our interface that heard it.
    pub interface: String,
    /// When it last answered.
    pub last: Instant,
    /// Probes since then that it did not answer.
    pub missed: u32,
}

/// What the probes found, by address and other MAC (sans-I/O: the daemon feeds it).
#[derive(Debug, Default)]
pub(super) struct Conflicts {
    seen: BTreeMap<(TargetAddr, MacAddr), Seen>,
}

impl Conflicts {
    /// Takes in one probe's answers (only other machines': [`Duplicate::ours`] is the
    /// start probe's matter). Returns the conflicts that are new (to warn about).
    pub fn record(&mut self, found: &[Duplicate], now: Instant) -> Vec<Duplicate> {
        let mut new = Vec::new();
        for d in found.iter().filter(|d| !d.ours) {
            let s = self.seen.entry((d.addr, d.mac)).or_insert_with(|| {
                new.push(d.clone());
                Seen {
                    interface: d.interface.clone(),
                    last: now,
                    missed: 0,
                }
            });
            s.last = now;
            s.missed = 0;
            s.interface.clone_from(&d.interface);
        }
        new
    }

    /// After a periodic probe of every address in `probed` (taken in by [`record`] at
    /// `now`): counts a miss for each entry that did not answer it, and returns those
    /// cleared (unanswered [`CLEAR_AFTER`] probes in a row, or their export gone).
    ///
    /// [`record`]: Self::record
    pub fn age(
        &mut self,
        probed: &[TargetAddr],
        now: Instant,
    ) -> Vec<(TargetAddr, MacAddr, String)> {
        let mut cleared = Vec::new();
        self.seen.retain(|(addr, mac), s| {
            if s.last == now {
                return true;
            }
            // An address no longer probed (its export is gone) is forgotten at once.
            if probed.contains(addr) {
                s.missed += 1;
                if s.missed < CLEAR_AFTER {
                    return true;
                }
            }
            cleared.push((*addr, *mac, s.interface.clone()));
            false
        });
        cleared
    }

    /// The other targets seen answering for `addr`: MAC, interface, seconds since the last
    /// answer.
    pub fn of(&self, addr: TargetAddr, now: Instant) -> Vec<crate::control::AddressConflict> {
        self.seen
            .range((addr, MacAddr([0; 6]))..=(addr, MacAddr([0xff; 6])))
            .map(|((_, mac), s)| crate::control::AddressConflict {
                mac: mac.to_string(),
                interface: s.interface.clone(),
                last_seen_secs: now.saturating_duration_since(s.last).as_secs(),
            })
            .collect()
    }
}

/// The watch as the daemon runs it: the probe under way, when the next one starts, what
/// was found.
#[derive(Debug, Default)]
pub(super) struct Watch {
    probe: Option<(Probe, Vec<TargetAddr>)>,
    next: Option<Instant>,
    pub conflicts: Conflicts,
    /// Periodic probes finished.
    pub probes: u64,
}

impl Watch {
    /// Called on every refresh tick (once a second): finishes a probe whose wait is over,
    /// starts the next one when its time has come.
    pub fn tick(&mut self, config: &ServeConfig, now: Instant) {
        if let Some((p, _)) = &mut self.probe {
            if let Err(e) = p.collect() {
                tracing::debug!(error = %e, "address conflict probe: receive failed");
            }
            if now < p.deadline() {
                return;
            }
            let (p, probed) = self.probe.take().expect("a probe under way");
            self.take(&probed, &p.finish(), now);
            self.probes += 1;
        }
        if config.conflict_check.is_zero() || config.probe.is_zero() {
            self.next = None;
            return;
        }
        // A reload that shortens the period takes effect now, not after the old one.
        let next = match self.next {
            Some(n) if n <= now + config.conflict_check => n,
            _ => *self.next.insert(now + config.conflict_check),
        };
        if now < next {
            return;
        }
        self.next = Some(now + config.conflict_check);
        match Probe::start_watch(&config.exports, config.probe) {
            Ok(Some(p)) => {
                let probed = config.exports.iter().map(|e| e.addr()).collect();
                self.probe = Some((p, probed));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot probe for address conflicts")
            }
        }
    }

    /// Records what a start or reload probe found (served anyway, `allow_duplicate`): the
    /// conflict shows in the status from then on.
    pub fn found_at_start(&mut self, found: &[Duplicate], now: Instant) {
        // The start path has warned already (`serving it anyway`).
        let _ = self.conflicts.record(found, now);
    }

    fn take(&mut self, probed: &[TargetAddr], found: &[Duplicate], now: Instant) {
        let new = self.conflicts.record(found, now);
        let cleared = self.conflicts.age(probed, now);
        for d in new {
            tracing::warn!(
                target_addr = %d.addr,
                other_mac = %d.mac,
                interface = %d.interface,
                "{}: another target ({}) answers for this address on {}: an initiator will \
                 take both as paths of one disk and mix their data; still serving (stop the \
                 other target or move one of them to another shelf.slot)",
                d.addr,
                d.mac,
                d.interface
            );
        }
        for (addr, mac, iface) in cleared {
            tracing::info!(
                "{addr}: the other target ({mac}) on {iface} no longer answers for this \
                 address; conflict cleared"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn dup(addr: TargetAddr, mac: u8, ours: bool) -> Duplicate {
        Duplicate {
            addr,
            interface: "eth0".into(),
            mac: MacAddr([2, 0, 0, 0, 0, mac]),
            ours,
        }
    }

    #[test]
    fn a_conflict_is_new_once_and_cleared_after_unanswered_probes() {
        let a = TargetAddr::new(1, 1);
        let b = TargetAddr::new(1, 2);
        let mut c = Conflicts::default();
        let t0 = Instant::now();
        let s = Duration::from_secs(60);
        let probe = |c: &mut Conflicts, found: &[Duplicate], t: Instant| {
            let new = c.record(found, t);
            (new, c.age(&[a, b], t))
        };
        let (new, cleared) = probe(&mut c, &[dup(a, 9, false)], t0);
        assert_eq!(new, vec![dup(a, 9, false)]);
        assert!(cleared.is_empty());
        // Answered again: not new (one warning per MAC and export).
        let (new, _) = probe(&mut c, &[dup(a, 9, false)], t0 + s);
        assert!(new.is_empty());
        assert_eq!(c.of(a, t0 + s).len(), 1);
        assert!(c.of(b, t0 + s).is_empty());
        // Missed CLEAR_AFTER - 1 probes: still shown; the next clears it.
        let mut t = t0 + s;
        for _ in 1..CLEAR_AFTER {
            t += s;
            let (_, cleared) = probe(&mut c, &[], t);
            assert!(cleared.is_empty());
        }
        assert_eq!(
            c.of(a, t)[0].last_seen_secs,
            u64::from(CLEAR_AFTER - 1) * 60
        );
        let (_, cleared) = probe(&mut c, &[], t + s);
        assert_eq!(cleared.len(), 1);
        assert!(c.of(a, t + s).is_empty());
        // Back again: new again.
        let (new, _) = probe(&mut c, &[dup(a, 9, false)], t + s * 2);
        assert_eq!(new.len(), 1);
    }

    #[test]
    fn our_own_exports_meeting_and_gone_exports_are_not_conflicts() {
        let a = TargetAddr::new(1, 1);
        let mut c = Conflicts::default();
        let t0 = Instant::now();
        assert!(c.record(&[dup(a, 1, true)], t0).is_empty());
        assert!(c.of(a, t0).is_empty());
        c.record(&[dup(a, 9, false)], t0);
        // The export is gone (not probed): forgotten at once.
        let cleared = c.age(&[], t0 + Duration::from_secs(1));
        assert_eq!(cleared.len(), 1);
    }
}
