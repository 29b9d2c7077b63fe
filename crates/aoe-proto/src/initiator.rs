//! The initiator engine: discovery, block I/O and failover for every AoE device seen, as a
//! deterministic state machine (the user-space counterpart of the Linux driver's core,
//! `drivers/block/aoe/aoecmd.c` and `aoedev.c`, version 85).
//!
//! The engine owns no socket, clock or thread. The daemon around it:
//! 1. registers its interfaces ([`Engine::add_interface`]),
//! 2. feeds every received AoE frame to [`Engine::handle_frame`],
//! 3. calls [`Engine::handle_timeout`] when [`Engine::poll_timeout`] says so,
//! 4. after any call, drains [`Engine::poll_transmit`] (frames to send) and
//!    [`Engine::poll_event`] (device changes, I/O completions, log lines).
//!
//! Block I/O enters through [`Engine::submit`], never blocks, and leaves as
//! [`Event::Completed`].
//!
//! ```text
//!  submit(BlockOp) -> per-device queue -> split into frames of `payload` sectors
//!        -> window per target MAC (slow start / congestion avoidance, halved once per loss)
//!        -> path (target MAC x local interface) round-robin, tainted targets avoided
//!        -> poll_transmit ........ network ........ handle_frame(response, by tag)
//!        -> all frames of the op answered -> Event::Completed
//! ```
//!
//! Behaviour follows `docs/PROTOCOL.md` (sections 1.7 and 2.4-2.7; differences in 4):
//! - Discovery: broadcast Query Config on every interface when an interface is added, on
//!   [`Engine::discover`] and every [`Config::discover_interval`] (the driver's 60 s beacon).
//!   Any config response, asked for or not, adds the path it came on; a device that nobody
//!   has open is (re-)IDENTIFYed on every one (`aoecmd_cfg_rsp`): a new or down device comes
//!   up, an up one shows a new size. An open device is left alone until its last close.
//! - ATA responses are matched by shelf.slot and tag (`aoecmd_ata_rsp`, `getframe`), not by
//!   source MAC: a multi-port target may answer from another port.
//! - Tags `(++lasttag & 0x7fff) << 16 | (ticks & 0xffff)`; bit 31 belongs to user tools and
//!   responses carrying it are ignored (`aoenet_rcv`).
//! - RTT per target (RFC 6298), retransmission with a fresh tag on the next path when the
//!   timer runs out or later frames were answered first, a tail loss probe when the last
//!   frames of a burst go unanswered for two smoothed RTTs, per-frame exponential backoff,
//!   device down after [`Config::deadsecs`] (`docs/PROTOCOL.md` 4, "Loss recovery").
//! - Beyond the driver: FLUSH CACHE (EXT) for [`BlockOp::Flush`] (the driver never flushes),
//!   and every I/O of a device that goes down or is flushed fails promptly instead of hanging.
//! - Beyond the driver: a write waits while a copy of an earlier write to any of its sectors
//!   may still reach the target (sent, unanswered, out less than max(1 s, RTO): `fences`),
//!   so a delayed original whose retransmitted copy completed it never lands after a newer
//!   write (`docs/PROTOCOL.md` 4, "Late copies of writes"). The driver sends it at once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ratelimit::RateLimiter;
use aoe_wire::ata::status;
use aoe_wire::{
    max_sectors_for_mtu, AtaCommand, AtaFlags, AtaRepr, Body, Command, ConfigCommand, ConfigRepr,
    ErrorCode, Frame, HeaderRepr, Identify, IdentifyInfo, MacAddr, Message, Tag, TargetAddr,
    ETHERTYPE_AOE, SECTOR_SIZE,
};

/// Most local interfaces one target MAC is used through (the driver's `NAOEIFS`).
pub const MAX_PATHS_PER_TARGET: usize = 8;

/// Payload used when a target advertises a sector count of 0 (the driver's `DEFAULTBCNT`,
/// 1024 bytes).
const DEFAULT_SECTORS: u8 = 2;

/// How often tainted targets are probed (the driver's `TIMERTICK`, 100 ms).
const PROBE_TICK: Duration = Duration::from_millis(100);

/// How late a timer run must come before [`Engine::handle_timeout`] takes the daemon
/// itself to have been stalled: longer than a busy host delays a thread (tens of
/// milliseconds) or a `cpu.max` period holds it (100 ms by default).
pub const STALL: Duration = Duration::from_millis(500);

/// Highest taint a target reaches (the driver's `MAX_TAINT`).
const MAX_TAINT: u32 = 1000;

/// Most frame buffers [`Engine::recycle_frame`] keeps for reuse: the default `maxout`
/// (128) frames in flight twice over; at MTU 9000 about 2.3 MB.
const SPARE_FRAMES: usize = 256;

/// Most bytes of read buffers [`Engine::recycle_read_buffer`] keeps for reuse: the reads
/// being filled at a time (a window of frames, a few ops) and those a front-end still
/// holds, over again. A read then fills pages written before instead of fresh ones the
/// kernel must fault in and zero first (measured at MTU 9000 through NBD: a seventh of the
/// network thread's time went to zeroing newly faulted pages of read buffers).
const SPARE_READ_BYTES: usize = 16 << 20;

/// Initial RTT: 250 ms average as in the driver, 62.5 ms deviation (`docs/PROTOCOL.md` 2.4, 4).
const RTT_AVG_INIT_US: u64 = 250_000;
const RTT_DEV_INIT_US: u64 = 62_500;

mod device;
mod encode;
mod frames;
mod queue;
mod receive;
mod retransmit;
mod rtt;
mod split;
mod types;

use device::*;
use frames::{Frames, TimeQueue};
use queue::Queues;
use receive::ReadSpare;
use rtt::*;
pub use types::*;

/// The initiator engine. See the module documentation for how a daemon drives it.
#[derive(Debug)]
pub struct Engine {
    cfg: Config,
    start: Instant,
    last_now: Instant,
    /// Up to when a late timer run has been taken for a stall of the daemon
    /// ([`Engine::handle_timeout`]), so that one stall is credited once.
    stall_credited: Instant,
    interfaces: BTreeMap<usize, Iface>,
    devices: BTreeMap<TargetAddr, Device>,
    /// The operations submitted and not yet completed, by id (counted up: [`CountedMap`]).
    ops: CountedMap<u64, Op>,
    /// The frames outstanding, by tag, and their deadlines ([`Frames`]).
    outstanding: Frames,
    /// Copies that still hold a window slot without standing for a frame, by tag.
    held: BTreeMap<u32, Held>,
    /// RACK's reordering timer (RFC 8985 6.3), by tag: when an outstanding frame that a
    /// later frame's answer overtook is presumed lost if still unanswered
    /// (`Engine::later_frame_answered`).
    rack: BTreeMap<u32, Instant>,
    /// Copies presumed lost whose slot was freed without an answer (`Engine::expire_held`),
    /// by tag, oldest first in `ghost_order`: an answer that still comes proves the
    /// presumption wrong (`Engine::ghost_answered`). At most [`MAX_GHOSTS`], each kept
    /// [`GHOST_TTL`].
    ghosts: BTreeMap<u32, Ghost>,
    ghost_order: VecDeque<(Instant, u32)>,
    /// Every copy of a write sent and not yet answered nor presumed gone, by tag: a write
    /// to sectors one covers waits (`Engine::pick_queued`), so that a late copy of an
    /// earlier write never lands after a newer one.
    fences: BTreeMap<u32, Fence>,
    /// When each fence ends (`Fence::gone_at`), earliest first, with stale entries of
    /// fences already lifted behind a live front (`Engine::trim_fences`): what
    /// `poll_timeout` reads instead of scanning every fence while ops are queued.
    fence_ends: TimeQueue,
    next_op: u64,
    lasttag: u32,
    next_discover: Option<Instant>,
    /// When the timer runs next to probe tainted targets (`Engine::tainted_targets`).
    next_probe: Option<Instant>,
    /// Frames to send: the interface, the frame's bytes (its headers only when write data
    /// follows) and the write data it carries.
    transmit: VecDeque<(usize, Vec<u8>, Option<TxData>)>,
    /// Frame buffers sent and handed back ([`Engine::recycle_frame`]), reused for the next
    /// frames: at most [`SPARE_FRAMES`], so encoding a frame neither allocates nor zeroes.
    spare: Vec<Vec<u8>>,
    /// Read buffers handed back ([`Engine::recycle_read_buffer`]), at most
    /// [`SPARE_READ_BYTES`] of capacity in all.
    read_spare: ReadSpare,
    events: VecDeque<Event>,
    /// The frame being handled by [`Engine::handle_held_frame`]: its token and where it
    /// lies (address and length, to tell whether an answer's payload is inside it).
    rx_frame: Option<(u64, usize, usize)>,
    /// That frame's payload was kept as a [`HeldPart`].
    rx_kept: bool,
    /// The op each kept frame's token belongs to.
    slot_ops: CountedMap<u64, u64>,
    /// Tokens of failed [`BlockOp::ReadHeld`]s, for the driver to release
    /// ([`Engine::take_released`]).
    released: Vec<u64>,
    stats: Stats,
    /// Log lines a peer can provoke, one per kind per [`Config::peer_log_interval`].
    peer_logs: RateLimiter,
    /// Frames sized before their device's payload shrank (an MTU change) whose sectors
    /// went out again in frames that fit, by device and target, not yet said: one line
    /// each once none of that target's frames in flight is too large any more
    /// (`Engine::say_resized`), instead of one per frame.
    resized: BTreeMap<(TargetAddr, MacAddr), Resized>,
}

impl Engine {
    /// A new engine. Discovery starts when interfaces are added (each new interface gets a
    /// broadcast Query Config); the beacon repeats every [`Config::discover_interval`].
    pub fn new(cfg: Config, now: Instant) -> Engine {
        let next_discover = (!cfg.discover_interval.is_zero()).then(|| now + cfg.discover_interval);
        let cfg = Config {
            maxout: cfg.maxout.max(1),
            max_devices: cfg.max_devices.max(1),
            max_targets: cfg.max_targets.max(1),
            ..cfg
        };
        let peer_logs = RateLimiter::new(cfg.peer_log_interval);
        Engine {
            cfg,
            start: now,
            last_now: now,
            stall_credited: now,
            interfaces: BTreeMap::new(),
            devices: BTreeMap::new(),
            ops: CountedMap::default(),
            outstanding: Frames::default(),
            held: BTreeMap::new(),
            rack: BTreeMap::new(),
            ghosts: BTreeMap::new(),
            ghost_order: VecDeque::new(),
            fences: BTreeMap::new(),
            fence_ends: TimeQueue::default(),
            next_op: 0,
            lasttag: 0,
            next_discover,
            next_probe: None,
            transmit: VecDeque::new(),
            spare: Vec::new(),
            read_spare: ReadSpare::default(),
            events: VecDeque::new(),
            rx_frame: None,
            rx_kept: false,
            slot_ops: CountedMap::default(),
            released: Vec::new(),
            stats: Stats::default(),
            peer_logs,
            resized: BTreeMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Engine-wide counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Registers interface `idx` (any number the daemon likes, e.g. its ifindex), or updates
    /// its name, MAC and MTU. A new interface gets a broadcast Query Config at once; an MTU
    /// change recomputes the payload of every path through it.
    pub fn add_interface(&mut self, idx: usize, name: &str, mac: MacAddr, mtu: u32) {
        let new = !self.interfaces.contains_key(&idx);
        self.interfaces.insert(
            idx,
            Iface {
                name: name.to_string(),
                mac,
                mtu,
            },
        );
        let mtu_sectors = max_sectors_for_mtu(mtu);
        let mut logs = Vec::new();
        let mut pathless = Vec::new();
        for d in self.devices.values_mut() {
            for t in &mut d.targets {
                let scnt = t.sector_count;
                for p in t.paths.iter_mut().filter(|p| p.iface == idx) {
                    p.sectors = path_sectors(mtu_sectors, scnt);
                }
                // An MTU too small for one sector makes the path useless.
                t.paths.retain(|p| p.sectors > 0);
            }
            logs.extend(d.recompute_payload());
            if d.life != Life::Down && !d.targets.iter().any(Target::usable) {
                pathless.push(d.addr);
            }
        }
        for l in logs {
            self.log(l);
        }
        for addr in pathless {
            self.device_down(addr, "no path can carry a sector");
        }
        if new {
            let now = self.last_now;
            self.queue_config_query(now, idx, MacAddr::BROADCAST, TargetAddr::BROADCAST);
        }
    }

    /// Forgets interface `idx`: paths through it are dropped; frames outstanding on it are
    /// retransmitted elsewhere when they time out. A device left without any path goes down
    /// (its I/O fails rather than waiting for `deadsecs`).
    pub fn remove_interface(&mut self, idx: usize) {
        if self.interfaces.remove(&idx).is_none() {
            return;
        }
        let mut logs = Vec::new();
        let mut pathless = Vec::new();
        for d in self.devices.values_mut() {
            for t in &mut d.targets {
                t.paths.retain(|p| p.iface != idx);
            }
            logs.extend(d.recompute_payload());
            if d.life != Life::Down && !d.targets.iter().any(Target::usable) {
                pathless.push(d.addr);
            }
        }
        for l in logs {
            self.log(l);
        }
        for addr in pathless {
            self.device_down(addr, "no path left");
        }
    }

    /// The link of interface `idx` came back (up with a carrier again: the driver heard
    /// it from rtnetlink, `RTM_NEWLINK` with `IFF_UP` and `IFF_LOWER_UP` or `IFF_RUNNING`,
    /// or found a re-created interface of its name): a broadcast Query Config goes out on it, as on a new interface, so a
    /// target that moved (a new MAC) or appeared meanwhile is found at once; and the data
    /// frames that went into the dead link (their last copy sent on it, or their target
    /// reached through it alone, and nothing answered there since) are copied at once,
    /// earliest first, their slots freed and their timeouts not backed off, instead of
    /// waiting for timers backed off through the silence (up to `rto_max`):
    /// `Engine::link_back`. The Linux driver has no such input (its `rexmit_timer` backs
    /// off to `MAXTIMER` over a cut link).
    pub fn interface_up(&mut self, now: Instant, idx: usize) {
        self.touch(now);
        if !self.interfaces.contains_key(&idx) {
            return;
        }
        self.queue_config_query(now, idx, MacAddr::BROADCAST, TargetAddr::BROADCAST);
        for addr in self.link_back(now, idx) {
            self.pump(now, addr);
        }
    }

    /// Queues a broadcast Query Config (dst ff:ff:ff:ff:ff:ff, shelf 0xffff, slot 0xff) on
    /// every interface (`aoecmd_cfg_pkts`; writing `/dev/etherd/discover`), and restarts the
    /// beacon period.
    pub fn discover(&mut self, now: Instant) {
        self.touch(now);
        let ifaces: Vec<usize> = self.interfaces.keys().copied().collect();
        for idx in ifaces {
            self.queue_config_query(now, idx, MacAddr::BROADCAST, TargetAddr::BROADCAST);
        }
        if !self.cfg.discover_interval.is_zero() {
            self.next_discover = Some(now + self.cfg.discover_interval);
        }
    }

    /// Like [`handle_frame`](Self::handle_frame) for a frame the driver can leave where it
    /// is: an answer to a [`BlockOp::ReadHeld`] is not copied but kept as a [`HeldPart`]
    /// naming `token`, and then this returns true: the driver must keep the frame's bytes
    /// unchanged until the token comes back (the read's [`Event::CompletedHeld`], or
    /// [`take_released`](Self::take_released)), or give it up first with
    /// [`unhold`](Self::unhold). False: nothing of the frame is kept.
    pub fn handle_held_frame(
        &mut self,
        now: Instant,
        iface: usize,
        frame: &[u8],
        token: u64,
    ) -> bool {
        self.rx_frame = Some((token, frame.as_ptr() as usize, frame.len()));
        self.rx_kept = false;
        self.handle_frame(now, iface, frame);
        self.rx_frame = None;
        std::mem::take(&mut self.rx_kept)
    }

    /// Gives up the frame kept under `token` ([`handle_held_frame`](Self::handle_held_frame)):
    /// its part is copied out of `frame` (the same bytes) into the read's buffer (or into
    /// its [`Event::CompletedHeld`] if that is not polled yet), and the driver may reuse
    /// the frame's memory at once. False if no read keeps that token (it failed, or its
    /// event was polled: the token came back with it).
    pub fn unhold(&mut self, token: u64, frame: &[u8]) -> bool {
        let Some(id) = self.slot_ops.remove(&token) else {
            return self.unhold_completed(token, frame);
        };
        let Some(op) = self.ops.get_mut(&id) else {
            return false;
        };
        let Some(h) = &mut op.held else {
            return false;
        };
        match h.copy_out(token, frame) {
            None => false,
            Some(true) => true,
            // Not the frame it was: those bytes are lost, so is the read.
            Some(false) => {
                self.finish_op(id, Err(IoError::DeviceDown));
                true
            }
        }
    }

    /// [`unhold`](Self::unhold) for a read already completed whose
    /// [`Event::CompletedHeld`] still waits to be polled: its part is copied into the
    /// event's buffer, so the event holds every byte without that frame.
    fn unhold_completed(&mut self, token: u64, frame: &[u8]) -> bool {
        for ev in self.events.iter_mut() {
            let Event::CompletedHeld { result: Ok(h), .. } = ev else {
                continue;
            };
            if let Some(copied) = h.copy_out(token, frame) {
                return copied;
            }
        }
        false
    }

    /// Moves the tokens of failed [`BlockOp::ReadHeld`]s into `out`: the driver releases
    /// their frames.
    pub fn take_released(&mut self, out: &mut Vec<u64>) {
        out.append(&mut self.released);
    }

    /// Handles one frame received on interface `iface`. Anything that is not an AoE response
    /// addressed to us is ignored; no byte sequence makes this panic.
    pub fn handle_frame(&mut self, now: Instant, iface: usize, frame: &[u8]) {
        self.touch(now);
        let Some(local) = self.interfaces.get(&iface) else {
            return;
        };
        let local_mac = local.mac;
        let Ok(view) = Frame::new_checked(frame) else {
            self.stats.malformed += 1;
            return;
        };
        if view.ethertype() != ETHERTYPE_AOE || !view.is_response() {
            // Not AoE, or another initiator's request seen on a shared segment.
            return;
        }
        if view.dst() != local_mac && !view.dst().is_multicast() {
            return;
        }
        if view.src().is_multicast() {
            // No target sends from a group address (the I/G bit marks destinations, IEEE
            // 802); taken as a target's MAC, every request after it would go to every host
            // on the segment. The target side refuses group MACs in its mask list alike.
            self.stats.group_source += 1;
            let (src, addr) = (view.src(), (view.major(), view.minor()));
            self.log_peer(now, "group source", || {
                format!(
                    "e{}.{}: response from group source {src} on if {iface} ignored",
                    addr.0, addr.1
                )
            });
            return;
        }
        if view.tag().0 & Tag::USER_BIT != 0 {
            // `aoenet_rcv`: bit 31 tags belong to aoeping/aoecfg.
            self.stats.user_tags += 1;
            return;
        }
        let msg = match Message::parse(frame) {
            Ok(m) => m,
            Err(e) => {
                self.stats.malformed += 1;
                let src = view.src();
                self.log_peer(now, "bad frame", || {
                    format!("bad frame from {src} on if {iface}: {e}")
                });
                return;
            }
        };
        match msg.body {
            Body::Config(cfg) => self.config_response(now, iface, &msg.header, &cfg),
            Body::Ata(ata) => self.ata_response(now, iface, &msg.header, &ata),
            _ => {}
        }
        self.say_resized();
    }

    /// Retransmits frames whose timeout passed or whose target went silent at the end of a
    /// burst (tail loss probes), declares devices down after `deadsecs`, probes tainted
    /// targets and sends the discovery beacon. Call it when [`Engine::poll_timeout`]
    /// is reached (calling it early is harmless).
    ///
    /// Called [`STALL`] or more after [`Engine::poll_timeout`] (the daemon stopped, frozen
    /// or starved of CPU: SIGSTOP, a cgroup freezer, `cpu.max`), the time it was late does
    /// not count toward `deadsecs` for the frames already out: nobody sent their copies
    /// meanwhile, so their silence says nothing of the target. The driver's `rexmit_timer`
    /// counts a frame's waits from its timer's runs (`waited_total`), which a stopped
    /// initiator does not have either.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(due) = self.poll_timeout() {
            // From the later of the timer's due time and the last stall taken, so that a
            // timer still due at the next run does not credit the same time again.
            let since = due.max(self.stall_credited);
            let late = now.saturating_duration_since(since);
            if late >= STALL {
                for f in self.outstanding.values_mut() {
                    if f.first_sent <= since {
                        f.first_sent = (f.first_sent + late).min(now);
                    }
                }
                self.stall_credited = now;
            }
        }
        self.touch(now);
        if self.next_discover.is_some_and(|t| now >= t) {
            self.discover(now);
        }
        // Every device is pumped below, whichever got a slot back.
        let _freed = self.expire_held(now);
        self.expire_fences(now);
        self.rack_timers(now);
        self.tail_probes(now);
        let expired = self.outstanding.take_expired(now);
        for &tag in &expired {
            // An earlier expiry in this loop may have taken the device down.
            if self.outstanding.contains_key(tag) {
                self.frame_timed_out(now, tag);
            }
        }
        for tag in expired {
            // A frame whose deadline did not move is looked at again on the next run.
            if self.outstanding.get(tag).is_some_and(|f| f.deadline <= now) {
                self.outstanding.requeue(tag);
            }
        }
        self.probe_tainted(now);
        // The driver probes on every 100 ms tick of `rexmit_timer`; with fast retransmission
        // and a timeout near the RTT our timer may not run for long, so probing has its own.
        self.next_probe = self.tainted_targets().then(|| now + PROBE_TICK);
        let addrs: Vec<TargetAddr> = self.devices.keys().copied().collect();
        for a in addrs {
            self.pump(now, a);
        }
        self.say_resized();
    }

    /// When [`Engine::handle_timeout`] must next be called: the earliest frame deadline, the
    /// next tail loss probe, the next probe of a tainted target, the end of the first write
    /// fence while ops are queued, or the discovery beacon. `None` if nothing is pending.
    #[must_use = "the engine needs handle_timeout at this instant"]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let frames = self.outstanding.next_deadline();
        let held = self.held.values().map(|h| h.check_at).min();
        let rack = self.rack.values().min().copied();
        let tail = self.next_tail_probe();
        // Only while an op is queued (a write may wait for one): otherwise a fence's end
        // changes nothing.
        let fence = self.fenced_ops().then(|| self.fence_ends.front()).flatten();
        #[cfg(test)]
        assert_eq!(
            self.fence_ends.front(),
            self.fences.values().map(|f| f.gone_at).min(),
            "the fence queue's front is not the earliest fence's end"
        );
        [
            frames,
            held,
            rack,
            tail,
            fence,
            self.next_discover,
            self.next_probe,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Writes the next frame to send into `buf` (which must hold the interface's MTU + 14
    /// bytes) and says on which interface to send it. Call until `None` after every other
    /// call. A frame that does not fit `buf` is dropped, counted, and recovered by
    /// retransmission.
    #[must_use = "the frame written to buf must be sent, or it is lost"]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        while let Some(f) = self.poll_transmit_parts(now) {
            let len = f.len();
            if len > buf.len() {
                self.stats.tx_buffer_too_small += 1;
                self.recycle_frame(f.head);
                continue;
            }
            buf[..f.head.len()].copy_from_slice(&f.head);
            buf[f.head.len()..len].copy_from_slice(f.data());
            let iface = f.iface;
            self.recycle_frame(f.head);
            return Some(Transmit { iface, len });
        }
        None
    }

    /// The next frame to send, as [`Engine::poll_transmit`] gives it but handed over
    /// instead of copied: the interface index and the frame (padded, ready for the wire).
    /// A write frame's data is copied behind its headers here; [`Engine::poll_transmit_parts`]
    /// hands it over without that copy. Hand the buffer back with [`Engine::recycle_frame`].
    pub fn poll_transmit_frame(&mut self, now: Instant) -> Option<(usize, Vec<u8>)> {
        let mut f = self.poll_transmit_parts(now)?;
        if let Some(d) = f.data {
            f.head.extend_from_slice(d.as_slice());
        }
        Some((f.iface, f.head))
    }

    /// The next frame to send, in the two parts a vectored send (`sendmmsg` with two
    /// iovecs per frame) puts on the wire back to back ([`TxFrame`]): a write's sectors are
    /// never copied into a frame buffer, only its headers are written. A daemon that sends
    /// in batches keeps the frames until the call, or in its backlog while the socket is
    /// full, and then hands each `head` back with [`Engine::recycle_frame`] (the data is
    /// released by dropping it).
    pub fn poll_transmit_parts(&mut self, now: Instant) -> Option<TxFrame> {
        self.touch(now);
        let (iface, head, data) = self.transmit.pop_front()?;
        Some(TxFrame { iface, head, data })
    }

    /// Takes back a frame buffer from [`Engine::poll_transmit_frame`] once it is sent (or
    /// dropped), to encode a later frame into: the next frames then cost no allocation and
    /// no zeroing of a buffer the frame overwrites anyway. Optional; at most
    /// `SPARE_FRAMES` are kept, the rest are freed.
    pub fn recycle_frame(&mut self, frame: Vec<u8>) {
        if self.spare.len() < SPARE_FRAMES {
            self.spare.push(frame);
        }
    }

    /// Takes back the buffer of a completed read ([`Event::Completed`]) once the caller is
    /// done with it, to fill a later read into: its pages are already in memory, so the
    /// next read costs no page faults and no zeroing by the kernel. Optional; at most
    /// `SPARE_READ_BYTES` of buffers are kept, the rest are freed. A read takes a buffer
    /// when its first frame is answered, not when it is submitted, so the buffers kept
    /// serve the reads being filled, however many are queued.
    pub fn recycle_read_buffer(&mut self, buf: Vec<u8>) {
        self.read_spare.put(buf);
    }

    /// The next event, if any. Drain after every call.
    #[must_use = "the event is taken off the queue: completions must reach their callers"]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Queues a block operation. Never blocks: frames go out as the window allows, and the
    /// result arrives as [`Event::Completed`]. Fails at once for unknown or down devices
    /// and for malformed requests. Submitted from [`SourceId::DEFAULT`].
    pub fn submit(
        &mut self,
        now: Instant,
        dev: TargetAddr,
        op: BlockOp,
    ) -> Result<IoId, SubmitError> {
        self.submit_from(now, dev, op, SourceId::DEFAULT)
    }

    /// Like [`Engine::submit`], from `source`: the device's queued ops are served in turn
    /// among their sources, 256 KiB each, and each source's own in the order submitted
    /// (the write fence holds across sources, the overlap rule within one:
    /// `Engine::pick_queued`).
    pub fn submit_from(
        &mut self,
        now: Instant,
        dev: TargetAddr,
        op: BlockOp,
        source: SourceId,
    ) -> Result<IoId, SubmitError> {
        self.touch(now);
        let d = self.devices.get(&dev).ok_or(SubmitError::UnknownDevice)?;
        if d.life != Life::Up {
            return Err(SubmitError::DeviceDown);
        }
        // A read into the caller's buffer: kept whole (dropped, it goes home) until every
        // check has passed.
        let mut into = None;
        let mut held = None;
        let (mut kind, lba, sectors) = match op {
            BlockOp::Read { lba, sectors } => {
                if sectors == 0 {
                    return Err(SubmitError::Empty);
                }
                // A buffer is taken when the first frame is answered (`frame_done`), and
                // filled as the frames are (`receive::place`), never zeroed first.
                (OpKind::Read(Vec::new()), lba, sectors as u64)
            }
            BlockOp::ReadHeld { lba, sectors } => {
                if sectors == 0 {
                    return Err(SubmitError::Empty);
                }
                held = Some(HeldRead {
                    len: sectors as usize * SECTOR_SIZE,
                    ..HeldRead::default()
                });
                (OpKind::Read(Vec::new()), lba, sectors as u64)
            }
            BlockOp::ReadInto { lba, sectors, buf } => {
                if sectors == 0 {
                    return Err(SubmitError::Empty);
                }
                let need = sectors as usize * SECTOR_SIZE;
                if buf.capacity() < need {
                    return Err(SubmitError::BufferTooSmall {
                        capacity: buf.capacity(),
                        need,
                    });
                }
                into = Some(buf);
                (OpKind::Read(Vec::new()), lba, sectors as u64)
            }
            BlockOp::Write { lba, data } => write_kind(lba, Lent::owned(data))?,
            BlockOp::WriteLent { lba, data } => write_kind(lba, data)?,
            BlockOp::Flush => (OpKind::Flush, 0, 1),
        };
        if !matches!(kind, OpKind::Flush) && lba.checked_add(sectors).is_none_or(|e| e > d.sectors)
        {
            return Err(SubmitError::OutOfRange {
                lba,
                sectors,
                capacity: d.sectors,
            });
        }
        let mut home = None;
        if let Some(buf) = into {
            let (mut v, h) = buf.into_parts();
            // Filled from the start (`receive::place`), within its capacity: it stays put.
            v.clear();
            kind = OpKind::Read(v);
            home = h;
        }
        let id = self.new_op(dev, source, kind, lba, sectors, false);
        if let Some(op) = self.ops.get_mut(&id) {
            op.held = held;
            op.home = ReadHome(home);
        }
        self.pump(now, dev);
        Ok(IoId(id))
    }

    /// Like writing "eX.Y" to `/dev/etherd/revalidate` (`revalidate` in aoechr.c):
    /// `aoecmd_cleanslate` (every target's RTT estimate and window start over, the payload is
    /// forgotten and re-learnt from the Query Config response), an IDENTIFY if the device is
    /// up, and a Query Config for its shelf.slot broadcast on every interface
    /// (`aoecmd_cfg`). The IDENTIFY's answer emits [`Event::Revalidated`] (and
    /// [`Event::DeviceResized`] if the size changed), on which the daemon re-reads the
    /// partition table. A down device that nobody has open is IDENTIFYed when the query is
    /// answered and comes up; one that is open stays "down,closewait" until it is closed
    /// (the admin guide's rule; the driver's revalidate would IDENTIFY it regardless).
    pub fn revalidate(&mut self, now: Instant, dev: TargetAddr) -> Result<(), DeviceError> {
        self.touch(now);
        let d = self
            .devices
            .get_mut(&dev)
            .ok_or(DeviceError::UnknownDevice)?;
        d.cleanslate();
        let up = d.life == Life::Up;
        d.revalidating = up;
        if up {
            self.queue_identify(now, dev);
        }
        self.query_device(now, dev);
        Ok(())
    }

    /// `aoecmd_cfg(major, minor)`: a Query Config for `dev` alone (its shelf.slot, broadcast
    /// destination) on every interface the engine was given (the daemon adds only the
    /// allowed ones, `aoe_iflist`).
    fn query_device(&mut self, now: Instant, dev: TargetAddr) {
        let ifaces: Vec<usize> = self.interfaces.keys().copied().collect();
        for idx in ifaces {
            self.queue_config_query(now, idx, MacAddr::BROADCAST, dev);
        }
    }

    /// Removes devices, like writing to `/dev/etherd/flush` (`aoedev_flush`): "all", the
    /// named ones, or (empty write) those that are down. Open devices are skipped, as the
    /// driver skips busy ones. Outstanding I/O of a removed device fails with
    /// [`IoError::Removed`]. Returns the devices removed.
    #[must_use = "the removed devices' front-end files must go too"]
    pub fn flush_devices(&mut self, which: FlushWhich) -> Vec<TargetAddr> {
        self.flush_devices_except(which, &BTreeMap::new())
    }

    /// [`flush_devices`](Self::flush_devices), skipping also the devices in `held` as busy,
    /// each logged with its reason (an NBD client on the device or a partition: also an
    /// opener, [`set_open`](Self::set_open), named here for the log).
    #[must_use = "the removed devices' front-end files must go too"]
    pub fn flush_devices_except(
        &mut self,
        which: FlushWhich,
        held: &BTreeMap<TargetAddr, String>,
    ) -> Vec<TargetAddr> {
        let chosen: Vec<TargetAddr> = self
            .devices
            .values()
            .filter(|d| match &which {
                FlushWhich::All => true,
                FlushWhich::Down => d.life != Life::Up,
                FlushWhich::Named(names) => names.contains(&d.addr),
            })
            .map(|d| d.addr)
            .collect();
        let mut removed = Vec::new();
        for addr in chosen {
            // The named reason first: such a user is also an opener (an NBD client).
            if let Some(why) = held.get(&addr) {
                self.log(format!("{addr}: busy ({why}), not flushed"));
                continue;
            }
            if self.devices.get(&addr).is_some_and(|d| d.open) {
                self.log(format!("{addr}: busy (open), not flushed"));
                continue;
            }
            self.fail_device_io(addr, IoError::Removed);
            self.devices.remove(&addr);
            self.events.push_back(Event::DeviceRemoved(addr));
            removed.push(addr);
        }
        removed
    }

    /// Every known device with its state, paths, windows and counters, in shelf.slot order.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.devices.values().map(|d| self.info(d)).collect()
    }

    /// The raw 512-byte IDENTIFY DEVICE page of the device's latest answer, as received
    /// (little-endian words): what the driver keeps in `d->ident` and returns for
    /// `HDIO_GET_IDENTITY`. None before the first answer.
    pub fn identify_page(&self, dev: TargetAddr) -> Option<&[u8]> {
        self.devices
            .get(&dev)
            .map(|d| d.identify_page.as_slice())
            .filter(|p| !p.is_empty())
    }

    /// One device's information.
    pub fn device(&self, dev: TargetAddr) -> Option<DeviceInfo> {
        self.devices.get(&dev).map(|d| self.info(d))
    }

    /// Tells the engine whether the device is open (a front-end holds it). While open, a
    /// device is not re-IDENTIFYed on config responses ("don't change users' perspective",
    /// `aoecmd_cfg_rsp`), so one that went down shows "down,closewait" and stays down: the
    /// admin guide's "cannot come up again until it has been closed". It is not flushed
    /// either. The last close sends a Query Config for it on every interface
    /// (`aoeblk_release` -> `aoecmd_cfg`); the answer IDENTIFYs it, so it comes back up (or
    /// shows a new size) if its target answers.
    pub fn set_open(&mut self, dev: TargetAddr, open: bool) {
        let Some(d) = self.devices.get_mut(&dev) else {
            return;
        };
        let was = d.open;
        d.open = open;
        if was && !open {
            let now = self.last_now;
            self.query_device(now, dev);
        }
    }

    // ------------------------------------------------------------------ internals

    fn touch(&mut self, now: Instant) {
        if now > self.last_now {
            self.last_now = now;
        }
    }

    fn log(&mut self, line: String) {
        tracing::debug!("{line}");
        self.events.push_back(Event::Log(line));
    }

    /// [`Engine::log`] for a line a peer can provoke with any frame it likes: at most one
    /// per `kind` per [`Config::peer_log_interval`], carrying the count suppressed since the
    /// previous one. `line` is built only when it is logged.
    fn log_peer(&mut self, now: Instant, kind: &'static str, line: impl FnOnce() -> String) {
        if let Some(a) = self.peer_logs.check(now, kind) {
            self.log(format!("{}{a}", line()));
        }
    }

    /// `newtag`: `(++lasttag & 0x7fff) << 16 | (ticks & 0xffff)`, bit 31 clear, skipping any
    /// tag still outstanding so tags stay unique.
    fn new_tag(&mut self, now: Instant) -> u32 {
        let ticks = now.saturating_duration_since(self.start).as_millis() as u32;
        loop {
            self.lasttag = self.lasttag.wrapping_add(1);
            let tag = ((self.lasttag & 0x7fff) << 16) | (ticks & 0xffff);
            if !self.outstanding.contains_key(tag)
                && !self.held.contains_key(&tag)
                && !self.ghosts.contains_key(&tag)
            {
                return tag;
            }
        }
    }

    /// `aoedev_downdev`: the device is down; all its I/O fails at once.
    fn device_down(&mut self, addr: TargetAddr, why: &str) {
        let Some(d) = self.devices.get_mut(&addr) else {
            return;
        };
        let was_up = d.life == Life::Up;
        d.life = Life::Down;
        for t in &mut d.targets {
            t.wreset();
            t.taint = 0;
        }
        self.log(format!("{addr} down: {why}"));
        self.fail_device_io(addr, IoError::DeviceDown);
        if was_up {
            self.events.push_back(Event::DeviceDown(addr));
        }
    }

    /// Drops every outstanding frame and queued op of `addr`, failing user ops with `err`.
    fn fail_device_io(&mut self, addr: TargetAddr, err: IoError) {
        self.outstanding.retain(|_, f| f.dev != addr);
        self.held.retain(|_, h| h.dev != addr);
        let outstanding = &self.outstanding;
        self.rack.retain(|tag, _| outstanding.contains_key(*tag));
        self.ghosts.retain(|_, g| g.dev != addr);
        // The fences stay: a copy sent before the device went down may still reach the
        // target, and a write after the device comes back (or is found again) must wait
        // for it as any other. They end by time (`Engine::expire_fences`).
        if let Some(d) = self.devices.get_mut(&addr) {
            d.queue.clear();
            d.rexmitq.clear();
            for t in &mut d.targets {
                t.nout = 0;
            }
        }
        let mut ids: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, o)| o.dev == addr)
            .map(|(id, _)| *id)
            .collect();
        // In the order submitted.
        ids.sort_unstable();
        for id in ids {
            self.finish_op(id, Err(err.clone()));
        }
    }

    fn info(&self, d: &Device) -> DeviceInfo {
        let name = |i: usize| {
            self.interfaces
                .get(&i)
                .map_or_else(|| format!("if{i}"), |f| f.name.clone())
        };
        let mut interfaces: Vec<String> = Vec::new();
        let targets = d
            .targets
            .iter()
            .map(|t| {
                let names: Vec<String> = t.paths.iter().map(|p| name(p.iface)).collect();
                for n in &names {
                    if !interfaces.contains(n) {
                        interfaces.push(n.clone());
                    }
                }
                TargetInfo {
                    mac: t.mac,
                    interfaces: names,
                    buffer_count: t.buffer_count,
                    nframes: t.nframes,
                    maxout: t.maxout,
                    ssthresh: t.ssthresh,
                    nout: t.nout,
                    max_nout: t.max_nout,
                    taint: t.taint,
                    rtt_avg: Duration::from_micros(t.rtt_avg_us),
                    rtt_dev: Duration::from_micros(t.rtt_dev_us),
                    rto: t.rto(&self.cfg),
                    retransmits: t.retransmits,
                    fast_retransmits: t.fast_retransmits,
                    overtaking_answers: t.overtaking_answers,
                    tail_probes: t.tail_probes,
                    window_cuts: t.reductions,
                    spurious: t.spurious,
                    answers: t.answers,
                    vetting: match t.vet {
                        Vet::Path => Vetting::Path,
                        Vet::Pending | Vet::Out { .. } => Vetting::Checking,
                        Vet::Refused { sectors } => Vetting::OtherDisk(sectors),
                    },
                }
            })
            .collect();
        DeviceInfo {
            addr: d.addr,
            state: d.state(),
            sectors: d.sectors,
            identify: d.identify.clone(),
            firmware_version: d.firmware_version,
            config: d.config.clone(),
            payload: d.payload as usize * SECTOR_SIZE,
            targets,
            interfaces,
            open: d.open,
            ops_outstanding: self
                .ops
                .values()
                .filter(|o| o.dev == d.addr && !o.kind.internal())
                .count(),
            stats: d.stats,
        }
    }
}

#[cfg(test)]
mod tests;

/// The operation kind, first sector and sector count of a write of `data` at `lba`.
fn write_kind(lba: u64, data: Lent) -> Result<(OpKind, u64, u64), SubmitError> {
    if data.is_empty() {
        return Err(SubmitError::Empty);
    }
    if data.len() % SECTOR_SIZE != 0 {
        return Err(SubmitError::Unaligned { len: data.len() });
    }
    let n = (data.len() / SECTOR_SIZE) as u64;
    Ok((OpKind::Write(Arc::new(data)), lba, n))
}
