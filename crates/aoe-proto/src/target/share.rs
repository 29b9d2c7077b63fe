//! The buffer count shared fairly among the sources (initiator MACs) of one interface.
//!
//! AoEr11 section 3.2 defines Buffer Count as "the maximum number of outstanding messages
//! the server can queue for processing" and lets the target drop the excess; the initiator
//! retransmits. The engine keeps at most the advertised count in flight per interface the
//! requests come in on (the total cap: what the daemon's receive ring and worker queue are
//! sized for, so memory stays bounded however many MACs send). Within that pool, one source
//! sending far more than the count (an initiator that ignores it, e.g. `aoe bench --window
//! 4096`, or many processes behind one MAC) used to take every slot freed, the instant it
//! was freed, and another initiator's requests found the pool full each time: 0 reads in
//! 15 s on a 50-IOPS store (docs/TEST-AUDIT.md, second audit, row 1b).
//!
//! The rule, per interface with buffer count `B`:
//! 1. The pool is full (`B` in flight): refused. If the source holds less than its fair share
//!    it becomes a *contender*: it asked and was turned away while others held its slots.
//! 2. Otherwise, a source holding its fair share or more is refused while another source is
//!    a contender: slots that free up are left for the contender, whose retransmit finds
//!    them ([`DropReason::OverFairShare`](super::DropReason::OverFairShare)).
//! 3. Otherwise admitted. So a source never holds more than `B` (the pool), a newcomer always
//!    gets slots, and while nobody is turned away for a full pool nobody is refused at all.
//!
//! Fair share = `B / active` rounded up (at least 1), where *active* sources are those with
//! I/O in flight or that asked for I/O in this period or the last one (the daemon starts one
//! every second: [`super::Engine::next_query_period`]). Why also "asked recently" and not
//! only "holds slots": an initiator at window 1 holds nothing between a reply and its next
//! request, and a flooder refills the pool within microseconds; counted only while it holds
//! a slot, such a source would drop out of the count and lose the pool again at every
//! request. Likewise a contender stays one while it keeps asking: its mark is cleared only
//! when it has sent nothing for a whole period. A source silent for a full period is
//! forgotten.
//!
//! What real peers do is never refused while they keep within the count:
//! - The Linux aoe driver keeps at most `maxout` frames outstanding per target MAC
//!   (`aoetgt.nout < maxout` in `newframe`, aoecmd.c; `maxout` at most `nframes`, the buffer
//!   count capped by the `aoe_maxout` parameter, default 64), and rotates its own
//!   interfaces frame by frame (`ifrotate`): one host may appear as several source MACs
//!   whose sum stays within the count. Rule 2 applies only once rule 1 turned a source away,
//!   which a total within `B` never does, so such a host is never split against itself.
//! - vblade (`bufcnt`, `-b`) sizes one receive buffer for all initiators and drops what does
//!   not fit, whoever sent it: this engine's total cap is the same bound, with the share
//!   deciding whose request is dropped when the pool is contended.
//!
//! A host spoofing many source MACs still defeats the share (each MAC is a source); the
//! table of sources is bounded ([`MAX_IDLE_SOURCES`] beyond the buffer count) so such a
//! flood cannot grow memory either.

use std::collections::HashMap;

use aoe_wire::MacAddr;

/// Sources tracked per interface beyond those holding slots (at most the buffer count hold
/// any): room for this many recently active but idle sources. A request from a source
/// that finds the table full is refused as over the buffer count.
pub const MAX_IDLE_SOURCES: usize = 1024;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The interface has the buffer count in flight (or the source table is full).
    Full,
    /// The source holds its fair share or more while another source waits for slots.
    OverShare,
}

#[derive(Debug, Clone, Copy)]
struct Source {
    /// Requests of this source in flight on the interface.
    in_flight: u32,
    /// The period of its last request for I/O.
    seen: u64,
    /// Refused for a full pool while under its fair share, and still asking.
    contending: bool,
}

#[derive(Debug, Default)]
struct Pool {
    sources: HashMap<MacAddr, Source>,
    in_flight: u32,
    contenders: u32,
}

/// The per-interface pools of buffer-count slots and their sources.
#[derive(Debug, Default)]
pub(super) struct Shares {
    pools: Vec<Pool>,
    period: u64,
}

impl Shares {
    /// A request for I/O from `src` on interface `iface`, whose pool holds `cap` slots:
    /// takes a slot (release it with [`Shares::release`]) or says why not.
    pub(super) fn admit(&mut self, iface: usize, src: MacAddr, cap: u32) -> Result<(), Refusal> {
        if self.pools.len() <= iface {
            self.pools.resize_with(iface + 1, Pool::default);
        }
        let period = self.period;
        let pool = &mut self.pools[iface];
        if !pool.sources.contains_key(&src) && pool.sources.len() >= cap as usize + MAX_IDLE_SOURCES
        {
            return Err(Refusal::Full);
        }
        let active = pool.sources.len() as u32 + u32::from(!pool.sources.contains_key(&src));
        let share = cap.div_ceil(active.max(1)).max(1);
        let s = pool.sources.entry(src).or_insert(Source {
            in_flight: 0,
            seen: period,
            contending: false,
        });
        s.seen = period;
        if pool.in_flight >= cap {
            if s.in_flight < share && !s.contending {
                s.contending = true;
                pool.contenders += 1;
            }
            return Err(Refusal::Full);
        }
        let others_contend = pool.contenders > u32::from(s.contending);
        if s.in_flight >= share && others_contend {
            return Err(Refusal::OverShare);
        }
        s.in_flight += 1;
        pool.in_flight += 1;
        Ok(())
    }

    /// Gives back the slot a request of `src` on `iface` held.
    pub(super) fn release(&mut self, iface: usize, src: MacAddr) {
        let Some(pool) = self.pools.get_mut(iface) else {
            return;
        };
        if let Some(s) = pool.sources.get_mut(&src) {
            s.in_flight = s.in_flight.saturating_sub(1);
            pool.in_flight = pool.in_flight.saturating_sub(1);
        }
    }

    /// Starts a new period: a source that asked for nothing during the one that ends is no
    /// longer a contender, and is forgotten unless it still holds slots.
    pub(super) fn next_period(&mut self) {
        let ended = self.period;
        self.period += 1;
        for pool in &mut self.pools {
            let mut contenders = 0;
            pool.sources.retain(|_, s| {
                if s.seen < ended {
                    s.contending = false;
                }
                contenders += u32::from(s.contending);
                s.in_flight > 0 || s.seen >= ended
            });
            pool.contenders = contenders;
        }
    }

    /// Slots in flight on `iface`.
    #[cfg(test)]
    pub(super) fn in_flight(&self, iface: usize) -> u32 {
        self.pools.get(iface).map_or(0, |p| p.in_flight)
    }

    /// Sources tracked on `iface`.
    #[cfg(test)]
    pub(super) fn sources(&self, iface: usize) -> usize {
        self.pools.get(iface).map_or(0, |p| p.sources.len())
    }
}
