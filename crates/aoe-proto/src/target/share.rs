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
//! flood cannot grow memory either. Sources that find the table full share one entry of
//! their own (the *overflow*), as Query Config's per-source limit lets further sources
//! share one allowance: before, such a source was refused outright, with nothing in
//! flight, so a peer sending one read from each of a thousand fresh MACs a second kept
//! every initiator that started (or sat idle for two periods) from getting any I/O
//! (docs/TEST-AUDIT.md, sixth audit, row 1).

use std::collections::HashMap;

use aoe_wire::MacAddr;

/// Sources tracked per interface beyond those holding slots (at most the buffer count hold
/// any): room for this many recently active but idle sources. Sources that find the table
/// full share one further entry, the overflow.
pub const MAX_IDLE_SOURCES: usize = 1024;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The interface has the buffer count in flight.
    Full,
    /// The source holds its fair share or more while another source waits for slots.
    OverShare,
}

#[derive(Debug, Clone, Copy)]
struct Source {
    mac: MacAddr,
    /// Requests of this source in flight on the interface.
    in_flight: u32,
    /// The period of its last request for I/O.
    seen: u64,
    /// Refused for a full pool while under its fair share, and still asking.
    contending: bool,
    /// The overflow entry, shared by every source that found the table full (`mac` is
    /// the first of them; the entry is not in `index`).
    overflow: bool,
}

/// A slot's holder: the index of its source in the pool's table, kept by the engine with
/// the request ([`Shares::release`] needs no lookup).
pub(super) type SourceId = u32;

#[derive(Debug, Default)]
struct Pool {
    /// The sources, by [`SourceId`]; `None` where one was forgotten (reused from `free`).
    table: Vec<Option<Source>>,
    free: Vec<SourceId>,
    /// Source MAC to its entry in `table`.
    index: HashMap<MacAddr, SourceId>,
    /// The source of the last request: a lone initiator's requests find it here without
    /// hashing its MAC (a `HashMap` lookup per request cost the read path about 150 ns in
    /// `cargo bench -p aoe-proto`).
    last: Option<(MacAddr, SourceId)>,
    /// The entry shared by the sources that found the table full, while it exists.
    overflow: Option<SourceId>,
    in_flight: u32,
    contenders: u32,
}

impl Pool {
    /// The entry of `src`: its own, added if new and there is room, else the overflow
    /// entry (added if missing).
    fn find_or_add(&mut self, src: MacAddr, cap: u32, period: u64) -> SourceId {
        if let Some((mac, id)) = self.last {
            if mac == src {
                return id;
            }
        }
        let id = match self.index.get(&src) {
            Some(&id) => id,
            None if self.index.len() >= cap as usize + MAX_IDLE_SOURCES => {
                // Not cached in `last`: a source's entry there must be its own.
                return match self.overflow {
                    Some(id) => id,
                    None => {
                        let id = self.add(src, period, true);
                        self.overflow = Some(id);
                        id
                    }
                };
            }
            None => {
                let id = self.add(src, period, false);
                self.index.insert(src, id);
                id
            }
        };
        self.last = Some((src, id));
        id
    }

    /// A new entry in `table`.
    fn add(&mut self, mac: MacAddr, seen: u64, overflow: bool) -> SourceId {
        let s = Source {
            mac,
            in_flight: 0,
            seen,
            contending: false,
            overflow,
        };
        match self.free.pop() {
            Some(id) => {
                self.table[id as usize] = Some(s);
                id
            }
            None => {
                self.table.push(Some(s));
                (self.table.len() - 1) as SourceId
            }
        }
    }

    /// Sources counted for the fair share: those in the table, the overflow as one.
    fn active(&self) -> u32 {
        (self.index.len() + usize::from(self.overflow.is_some())) as u32
    }
}

/// The per-interface pools of buffer-count slots and their sources.
#[derive(Debug, Default)]
pub(super) struct Shares {
    pools: Vec<Pool>,
    period: u64,
}

impl Shares {
    /// A request for I/O from `src` on interface `iface`, whose pool holds `cap` slots:
    /// takes a slot (give it back with [`Shares::release`] and the id returned) or says
    /// why not.
    pub(super) fn admit(
        &mut self,
        iface: usize,
        src: MacAddr,
        cap: u32,
    ) -> Result<SourceId, Refusal> {
        if self.pools.len() <= iface {
            self.pools.resize_with(iface + 1, Pool::default);
        }
        let period = self.period;
        let pool = &mut self.pools[iface];
        let id = pool.find_or_add(src, cap, period);
        let active = pool.active();
        let share = cap.div_ceil(active.max(1)).max(1);
        let Some(s) = pool.table[id as usize].as_mut() else {
            return Err(Refusal::Full);
        };
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
        Ok(id)
    }

    /// Gives back the slot a request of source `id` on `iface` held.
    pub(super) fn release(&mut self, iface: usize, id: SourceId) {
        let Some(pool) = self.pools.get_mut(iface) else {
            return;
        };
        if let Some(Some(s)) = pool.table.get_mut(id as usize) {
            if s.in_flight > 0 {
                s.in_flight -= 1;
                pool.in_flight -= 1;
            }
        }
    }

    /// Starts a new period: a source that asked for nothing during the one that ends is no
    /// longer a contender, and is forgotten unless it still holds slots.
    pub(super) fn next_period(&mut self) {
        let ended = self.period;
        self.period += 1;
        for pool in &mut self.pools {
            let mut contenders = 0;
            for (id, slot) in pool.table.iter_mut().enumerate() {
                let Some(s) = slot else { continue };
                if s.seen < ended {
                    s.contending = false;
                    if s.in_flight == 0 {
                        if s.overflow {
                            pool.overflow = None;
                        } else {
                            pool.index.remove(&s.mac);
                            if pool.last.is_some_and(|(m, _)| m == s.mac) {
                                pool.last = None;
                            }
                        }
                        pool.free.push(id as SourceId);
                        *slot = None;
                        continue;
                    }
                }
                contenders += u32::from(s.contending);
            }
            pool.contenders = contenders;
        }
    }

    /// Slots in flight on `iface`.
    #[cfg(test)]
    pub(super) fn in_flight(&self, iface: usize) -> u32 {
        self.pools.get(iface).map_or(0, |p| p.in_flight)
    }

    /// Sources tracked on `iface` (the overflow entry counted as one).
    #[cfg(test)]
    pub(super) fn sources(&self, iface: usize) -> usize {
        self.pools.get(iface).map_or(0, |p| p.active() as usize)
    }
}
