//! Deterministic simulation: the initiator engine against [`crate::target::Engine`]s over a
//! seeded link that loses, duplicates, reorders and delays frames in virtual time.
//!
//! Built for this crate's tests and, with the `sim` feature, for the fuzz targets: the
//! initiator fuzz target drives the same link by hand ([`Sim::hold`], [`Sim::deliver`]).
//!
//! Topology: segment `k` joins initiator interface `k` with every target interface the
//! target lists on segment `k`. A segment or a target can be switched off mid-run. A frame
//! longer than either end's MTU (plus the 14-byte Ethernet header) is dropped by the link,
//! as a switch drops an oversized frame.
//!
//! After every step the simulation checks what the initiator sent: each frame parses, is
//! padded to the Ethernet minimum, fits its interface's MTU, and a read asks for no more
//! sectors than fit in the answer at that MTU; each target's window stays within
//! `min(bufcnt, maxout)`.
//!
//! Late copies of writes (AoE has no sequence numbers): a network duplicate of an old write
//! that arrives after a newer write to the same sectors would undo it, and so would a
//! delayed original whose retransmitted copy completed the write. The target engine answers
//! a duplicate (same source, tag, range and data) without executing it again, and the
//! initiator sends no write over sectors a copy of an earlier write may still reach, so the
//! link may delay frames well past the RTO (`sim_late_copies_never_undo_newer_writes`).

use std::cell::RefCell;
use std::rc::Rc;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::initiator::{
    BlockOp, Config, DeviceInfo, DeviceState, Engine, Event, IoError, IoId, SourceId, SubmitError,
};
use crate::target::{self, ExportConfig, Interface as TargetIface, IoKind, Outcome};
use aoe_wire::{AtaFlags, Body, Command, MacAddr, Message, TargetAddr, ATA_HEADER_LEN};

/// Ethernet header: a frame of MTU `m` is `m + ETH_HEADER` bytes on the wire.
const ETH_HEADER: usize = 14;

/// xorshift64*: small, seeded, good enough for fault injection.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `percent`/100 (fractional percent allowed).
    pub fn chance(&mut self, percent: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 100.0 < percent
    }

    /// A duration in `lo..=hi`.
    pub fn duration(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_nanos() as u64;
        lo + Duration::from_nanos(self.below(span + 1))
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Link behaviour, per frame copy.
#[derive(Debug, Clone, Copy)]
pub struct LinkCfg {
    /// Chance, in percent, that a frame is lost.
    pub loss_pct: f64,
    /// Chance, in percent, that a frame arrives twice.
    pub dup_pct: f64,
    /// Shortest one-way delay.
    pub delay_min: Duration,
    /// Longest one-way delay.
    pub delay_max: Duration,
}

impl LinkCfg {
    /// No loss, no duplicates, a fixed 200 µs delay.
    pub fn perfect() -> LinkCfg {
        LinkCfg {
            loss_pct: 0.0,
            dup_pct: 0.0,
            delay_min: Duration::from_micros(200),
            delay_max: Duration::from_micros(200),
        }
    }

    /// Loss and duplication at the given percentages, 200-550 µs delay (so frames reorder).
    pub fn lossy(loss_pct: f64, dup_pct: f64) -> LinkCfg {
        LinkCfg {
            loss_pct,
            dup_pct,
            delay_min: Duration::from_micros(200),
            delay_max: Duration::from_micros(550),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Dest {
    /// To initiator interface `seg`, from target `.1` interface `.2`.
    Initiator(usize, usize, usize),
    Target(usize, usize),
}

/// Which way a frame on the wire travels, for the hand-driven link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toward {
    /// From the initiator to a target.
    Target,
    /// From a target to the initiator.
    Initiator,
}

impl Dest {
    fn toward(self) -> Toward {
        match self {
            Dest::Initiator(..) => Toward::Initiator,
            Dest::Target(..) => Toward::Target,
        }
    }
}

/// A target's disk, shareable between two target engines.
pub type Disk = Rc<RefCell<Vec<u8>>>;

/// What an [`Event::Completed`] carries.
pub type IoResult = Result<Option<Vec<u8>>, IoError>;

/// One simulated target: an engine, its disk and where its interfaces are.
pub struct SimTarget {
    /// The target engine.
    pub eng: target::Engine,
    /// Its disk; writes land at once, in arrival order.
    pub disk: Disk,
    /// Segment of each of the target's interfaces (index = target interface index).
    pub segs: Vec<usize>,
    /// MAC and MTU of each interface.
    ifaces: Vec<(MacAddr, u32)>,
    /// False while the target is off the network.
    pub up: bool,
    /// Disk latency: each I/O completes after a random delay up to this.
    pub io_delay: Duration,
    /// Serial service instead: when non-zero, I/Os are served one at a time in arrival
    /// order, each taking this long (vblade's single loop; a slow disk). Requests beyond
    /// the buffer count are dropped by the target engine, as `aoe serve` does.
    pub service: Duration,
    /// When the serial server is next free; without serial service, when a stall ends.
    busy_until: Instant,
    pending: BTreeMap<(Instant, u64), (usize, target::Token, Vec<u8>)>,
}

/// Parameters of one simulated target.
pub struct TargetSpec {
    /// Shelf and slot.
    pub addr: TargetAddr,
    /// Size in sectors.
    pub sectors: u64,
    /// Frames the target buffers (its advertised bufcnt).
    pub buffer_count: u16,
    /// (MAC, MTU, segment) per interface.
    pub ifaces: Vec<(MacAddr, u32, usize)>,
    /// Disk latency bound, as [`SimTarget::io_delay`].
    pub io_delay: Duration,
    /// Share another target's disk (two engines exporting one file on two NICs).
    pub disk: Option<Disk>,
}

/// MACs of the initiator's interfaces (interface `k` has `INIT_MACS[k % 2]`).
pub const INIT_MACS: [MacAddr; 2] = [
    MacAddr([0x02, 0xaa, 0, 0, 0, 1]),
    MacAddr([0x02, 0xaa, 0, 0, 0, 2]),
];

/// The initiator engine, its targets and the link between them, in virtual time.
pub struct Sim {
    /// Virtual time zero.
    pub base: Instant,
    /// Virtual now.
    pub now: Instant,
    /// The seeded generator behind every random choice.
    pub rng: Rng,
    /// How the link treats each frame.
    pub link: LinkCfg,
    /// The initiator engine under test.
    pub init: Engine,
    /// Whether each segment is up.
    pub seg_up: Vec<bool>,
    /// One-way delay each segment adds to every frame on it, on top of [`Sim::link`]'s
    /// (a longer path: another switch hop, a loaded bridge); zero unless set.
    pub seg_delay: Vec<Duration>,
    /// Chance, in percent, that a frame on each segment is lost, on top of [`Sim::link`]'s
    /// (one lossy path among clean ones); zero unless set.
    pub seg_loss: Vec<f64>,
    /// Frames the initiator sent on each of its interfaces.
    pub sent_on: Vec<u64>,
    /// The targets, in the order added.
    pub targets: Vec<SimTarget>,
    /// Hand-driven link: frames stay on the wire until [`Sim::deliver`] takes them, and
    /// stepping moves only timers and disk I/O.
    pub hold: bool,
    wire: BTreeMap<(Instant, u64), (Dest, Vec<u8>)>,
    seq: u64,
    /// Initiator events other than completions, with their time.
    pub events: Vec<(Instant, Event)>,
    /// Completed operations not yet taken, with their time.
    pub completions: BTreeMap<IoId, (Instant, IoResult)>,
    /// Initiator `maxout`, for the window invariant.
    maxout: u16,
    /// MTU of each initiator interface; 0 once removed.
    init_mtu: Vec<u32>,
}

impl Sim {
    /// A simulation whose initiator has `init_mtus.len()` interfaces (interface k on
    /// segment k).
    pub fn new(seed: u64, link: LinkCfg, cfg: Config, init_mtus: &[u32]) -> Sim {
        let base = Instant::now();
        let maxout = cfg.maxout;
        let init = Engine::new(cfg, base);
        let mut sim = Sim {
            base,
            now: base,
            rng: Rng::new(seed),
            link,
            init,
            seg_up: vec![true; init_mtus.len()],
            seg_delay: vec![Duration::ZERO; init_mtus.len()],
            seg_loss: vec![0.0; init_mtus.len()],
            sent_on: vec![0; init_mtus.len()],
            targets: Vec::new(),
            hold: false,
            wire: BTreeMap::new(),
            seq: 0,
            events: Vec::new(),
            completions: BTreeMap::new(),
            maxout,
            init_mtu: init_mtus.to_vec(),
        };
        for (k, mtu) in init_mtus.iter().enumerate() {
            sim.init
                .add_interface(k, &format!("eth{k}"), INIT_MACS[k % 2], *mtu);
        }
        sim.flush();
        sim
    }

    /// Starts a target; it broadcasts its announcement on each interface (vblade `aoead`).
    pub fn add_target(&mut self, spec: TargetSpec) -> usize {
        let disk = spec
            .disk
            .unwrap_or_else(|| Rc::new(RefCell::new(vec![0u8; spec.sectors as usize * 512])));
        let mut eng = target::Engine::new(
            ExportConfig {
                addr: spec.addr,
                sectors: spec.sectors,
                read_only: false,
                buffer_count: spec.buffer_count,
                firmware_version: 0x4019,
                max_sectors: 255,
                model: "sim disk".into(),
                serial: format!("{}:sim", spec.addr),
                firmware: "1.0".into(),
            },
            target::PersistentState::default(),
        );
        for (j, (mac, mtu, _)) in spec.ifaces.iter().enumerate() {
            eng.set_interface(
                j,
                TargetIface {
                    mac: *mac,
                    mtu: *mtu,
                },
            );
        }
        let t = self.targets.len();
        self.targets.push(SimTarget {
            eng,
            disk,
            segs: spec.ifaces.iter().map(|i| i.2).collect(),
            ifaces: spec.ifaces.iter().map(|i| (i.0, i.1)).collect(),
            up: true,
            io_delay: spec.io_delay,
            service: Duration::ZERO,
            busy_until: self.now,
            pending: BTreeMap::new(),
        });
        self.announce(t);
        t
    }

    /// The target broadcasts its Query Config announcement on each interface.
    pub fn announce(&mut self, t: usize) {
        for j in 0..self.targets[t].segs.len() {
            for frame in self.targets[t].eng.announcements(j) {
                self.send_from_target(t, j, frame);
            }
        }
    }

    fn enqueue(&mut self, dest: Dest, bytes: &[u8]) {
        if self.rng.chance(self.link.loss_pct) {
            return;
        }
        let seg = match dest {
            Dest::Initiator(seg, _, _) => seg,
            Dest::Target(t, j) => self.targets[t].segs[j],
        };
        let seg_loss = self.seg_loss.get(seg).copied().unwrap_or_default();
        if seg_loss > 0.0 && self.rng.chance(seg_loss) {
            return;
        }
        let extra = self.seg_delay.get(seg).copied().unwrap_or_default();
        let copies = if self.rng.chance(self.link.dup_pct) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.now + extra + self.rng.duration(self.link.delay_min, self.link.delay_max);
            self.seq += 1;
            self.wire.insert((at, self.seq), (dest, bytes.to_vec()));
        }
    }

    fn send_from_initiator(&mut self, iface: usize, bytes: &[u8]) {
        if !self.seg_up.get(iface).copied().unwrap_or(false) {
            return;
        }
        for t in 0..self.targets.len() {
            if !self.targets[t].up {
                continue;
            }
            for j in 0..self.targets[t].segs.len() {
                if self.targets[t].segs[j] == iface {
                    self.enqueue(Dest::Target(t, j), bytes);
                }
            }
        }
    }

    fn send_from_target(&mut self, t: usize, j: usize, bytes: Vec<u8>) {
        let seg = self.targets[t].segs[j];
        if !self.targets[t].up || !self.seg_up.get(seg).copied().unwrap_or(false) {
            return;
        }
        self.enqueue(Dest::Initiator(seg, t, j), &bytes);
    }

    /// Drains the initiator's transmit and event queues and checks what it sent and the
    /// window invariant.
    pub fn flush(&mut self) {
        let mut buf = vec![0u8; 9014];
        while let Some(tx) = self.init.poll_transmit(self.now, &mut buf) {
            let frame = buf[..tx.len].to_vec();
            check_sent(&frame, self.init_mtu.get(tx.iface).copied().unwrap_or(0));
            if let Some(n) = self.sent_on.get_mut(tx.iface) {
                *n += 1;
            }
            self.send_from_initiator(tx.iface, &frame);
        }
        while let Some(ev) = self.init.poll_event() {
            match ev {
                Event::Completed { id, result } => {
                    assert!(
                        self.completions.insert(id, (self.now, result)).is_none(),
                        "{id} completed twice"
                    );
                }
                other => self.events.push((self.now, other)),
            }
        }
        for d in self.init.devices() {
            for t in &d.targets {
                let cap = t.buffer_count.clamp(1, self.maxout);
                assert_eq!(t.nframes, cap, "nframes = min(bufcnt, maxout)");
                assert!(t.maxout <= cap, "window {} > {cap}", t.maxout);
                assert!(t.max_nout <= cap, "outstanding {} > {cap}", t.max_nout);
            }
        }
    }

    /// Whether a frame of `len` bytes fits both ends of the link between initiator
    /// interface `seg` and interface `j` of target `t`.
    fn fits(&self, seg: usize, t: usize, j: usize, len: usize) -> bool {
        let a = self.init_mtu.get(seg).copied().unwrap_or(0);
        let b = self.targets[t].ifaces[j].1;
        a > 0 && len <= a.min(b) as usize + ETH_HEADER
    }

    fn deliver_to_target(&mut self, t: usize, j: usize, frame: &[u8]) {
        if !self.targets[t].up || !self.fits(self.targets[t].segs[j], t, j, frame.len()) {
            return;
        }
        let mut reply = vec![0u8; 9014];
        self.targets[t].eng.set_now(self.now);
        let out = self.targets[t].eng.handle_frame(j, frame, &mut reply);
        match out {
            Outcome::Drop(_) => {}
            Outcome::Reply(n) => {
                reply.truncate(n);
                self.send_from_target(t, j, reply);
            }
            Outcome::Io(io) => {
                // Disk effects happen at once, in arrival order; only the reply waits.
                {
                    let st = &self.targets[t];
                    let mut disk = st.disk.borrow_mut();
                    match io.kind {
                        IoKind::Read { offset, len } => {
                            let o = offset as usize;
                            reply[ATA_HEADER_LEN..ATA_HEADER_LEN + len]
                                .copy_from_slice(&disk[o..o + len]);
                        }
                        IoKind::Write { offset, data } => {
                            let o = offset as usize;
                            let n = data.len();
                            disk[o..o + n].copy_from_slice(&frame[data]);
                        }
                        IoKind::Flush => {}
                    }
                }
                let st = &mut self.targets[t];
                let at = if st.service.is_zero() {
                    // Not before the end of a stall (`busy_until`, which only a stall
                    // moves for a target without serial service).
                    let delay = st.io_delay;
                    self.now.max(st.busy_until) + self.rng.duration(Duration::ZERO, delay)
                } else {
                    st.busy_until = st.busy_until.max(self.now) + st.service;
                    st.busy_until
                };
                self.seq += 1;
                self.targets[t]
                    .pending
                    .insert((at, self.seq), (j, io.token, reply));
            }
        }
    }

    /// Advances to the next event not after `limit`; false if there is none.
    pub fn step(&mut self, limit: Instant) -> bool {
        // A held link delivers nothing by itself (see [`Sim::hold`]).
        let next_wire = match self.hold {
            true => None,
            false => self.wire.keys().next().map(|k| k.0),
        };
        let next_io = self
            .targets
            .iter()
            .filter_map(|t| t.pending.keys().next().map(|k| k.0))
            .min();
        let next_timer = self.init.poll_timeout();
        let Some(next) = [next_wire, next_io, next_timer].into_iter().flatten().min() else {
            self.now = self.now.max(limit);
            return false;
        };
        if next > limit {
            self.now = self.now.max(limit);
            return false;
        }
        self.now = self.now.max(next);
        let now = self.now;
        while let Some(entry) = self.wire.first_entry() {
            if self.hold || entry.key().0 > now {
                break;
            }
            let (dest, bytes) = entry.remove();
            self.arrive(dest, &bytes);
        }
        self.complete_due_io();
        if self.init.poll_timeout().is_some_and(|t| t <= now) {
            self.init.handle_timeout(now);
        }
        self.flush();
        true
    }

    /// A frame reaches its destination.
    fn arrive(&mut self, dest: Dest, bytes: &[u8]) {
        match dest {
            Dest::Initiator(seg, t, j) => {
                if self.fits(seg, t, j, bytes.len()) {
                    self.init.handle_frame(self.now, seg, bytes);
                    self.flush();
                }
            }
            Dest::Target(t, j) => self.deliver_to_target(t, j, bytes),
        }
    }

    /// Answers the disk I/O whose time has come.
    fn complete_due_io(&mut self) {
        let now = self.now;
        for t in 0..self.targets.len() {
            while let Some(entry) = self.targets[t].pending.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let (j, token, mut reply) = entry.remove();
                if let Some(n) = self.targets[t].eng.complete(token, Ok(()), &mut reply) {
                    reply.truncate(n);
                    self.send_from_target(t, j, reply);
                }
            }
        }
    }

    /// Steps until `done` holds or `limit` of virtual time passes; returns `done`'s value.
    pub fn run_until(&mut self, within: Duration, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let limit = self.now + within;
        while !done(self) {
            if !self.step(limit) {
                return done(self);
            }
        }
        true
    }

    /// Steps through everything due in the next `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let limit = self.now + d;
        while self.step(limit) {}
    }

    /// Takes a target off the network (it also forgets I/O in progress).
    pub fn set_target_up(&mut self, t: usize, up: bool) {
        self.targets[t].up = up;
        if !up {
            self.targets[t].pending.clear();
        }
    }

    /// Target `t` stops serving for `d` (its host is busy, as a loaded machine starves a
    /// daemon of CPU): every I/O in progress completes `d` later, and new ones queue behind.
    /// Requests still arrive and count against its buffer count.
    pub fn stall_target(&mut self, t: usize, d: Duration) {
        let st = &mut self.targets[t];
        let pending = std::mem::take(&mut st.pending);
        st.pending = pending
            .into_iter()
            .map(|((at, seq), v)| ((at.max(self.now) + d, seq), v))
            .collect();
        st.busy_until = st.busy_until.max(self.now) + d;
    }

    /// Sets the MTU of initiator interface `k` (adding it back if it was removed).
    pub fn set_initiator_mtu(&mut self, k: usize, mtu: u32) {
        self.init
            .add_interface(k, &format!("eth{k}"), INIT_MACS[k % 2], mtu);
        self.init_mtu[k] = mtu;
        self.flush();
    }

    /// Removes initiator interface `k`; frames still on its link are lost on arrival.
    pub fn remove_initiator_interface(&mut self, k: usize) {
        self.init.remove_interface(k);
        self.init_mtu[k] = 0;
        self.flush();
    }

    /// The MTU of initiator interface `k`; 0 once removed.
    pub fn initiator_mtu(&self, k: usize) -> u32 {
        self.init_mtu[k]
    }

    /// Sets the MTU of interface `j` of target `t`.
    pub fn set_target_mtu(&mut self, t: usize, j: usize, mtu: u32) {
        let st = &mut self.targets[t];
        st.ifaces[j].1 = mtu;
        let mac = st.ifaces[j].0;
        st.eng.set_interface(j, TargetIface { mac, mtu });
    }

    /// The MTU of interface `j` of target `t`.
    pub fn target_mtu(&self, t: usize, j: usize) -> u32 {
        self.targets[t].ifaces[j].1
    }

    /// Key of the `i`-th frame (modulo their number) on the wire going `toward`, in
    /// arrival-time order.
    fn nth_on_wire(&self, toward: Toward, i: usize) -> Option<(Instant, u64)> {
        let n = self.on_wire(toward);
        if n == 0 {
            return None;
        }
        self.wire
            .iter()
            .filter(|(_, (d, _))| d.toward() == toward)
            .nth(i % n)
            .map(|(k, _)| *k)
    }

    /// Frames on the wire going `toward`.
    pub fn on_wire(&self, toward: Toward) -> usize {
        self.wire
            .values()
            .filter(|(d, _)| d.toward() == toward)
            .count()
    }

    /// Hand-driven link: delivers the `i`-th frame (modulo their number) going `toward`
    /// now, whatever its arrival time; disk I/O due by now is answered. Nothing if there is
    /// no such frame.
    pub fn deliver(&mut self, toward: Toward, i: usize) {
        if let Some(key) = self.nth_on_wire(toward, i) {
            if let Some((dest, bytes)) = self.wire.remove(&key) {
                self.arrive(dest, &bytes);
            }
        }
        self.complete_due_io();
        self.flush();
    }

    /// Hand-driven link: loses the `i`-th frame going `toward`.
    pub fn lose(&mut self, toward: Toward, i: usize) {
        if let Some(key) = self.nth_on_wire(toward, i) {
            self.wire.remove(&key);
        }
    }

    /// Hand-driven link: a second copy of the `i`-th frame going `toward`, arriving last.
    pub fn duplicate(&mut self, toward: Toward, i: usize) {
        if let Some(key) = self.nth_on_wire(toward, i) {
            let copy = self.wire[&key].clone();
            let last = self.wire.keys().next_back().map_or(self.now, |k| k.0);
            self.seq += 1;
            self.wire.insert((last.max(self.now), self.seq), copy);
        }
    }

    /// Hand-driven link: the bytes of the `i`-th frame going `toward`, to corrupt.
    pub fn frame_mut(&mut self, toward: Toward, i: usize) -> Option<&mut Vec<u8>> {
        let key = self.nth_on_wire(toward, i)?;
        self.wire.get_mut(&key).map(|(_, bytes)| bytes)
    }

    /// Submits `op` to device `dev` and sends what the initiator then has to send.
    pub fn submit(&mut self, dev: TargetAddr, op: BlockOp) -> Result<IoId, SubmitError> {
        self.submit_from(dev, op, SourceId::DEFAULT)
    }

    /// Submits an operation from `source` ([`Engine::submit_from`]).
    pub fn submit_from(
        &mut self,
        dev: TargetAddr,
        op: BlockOp,
        source: SourceId,
    ) -> Result<IoId, SubmitError> {
        let r = self.init.submit_from(self.now, dev, op, source);
        self.flush();
        r
    }

    /// The initiator's view of `dev` (which must be known).
    pub fn device(&self, dev: TargetAddr) -> DeviceInfo {
        self.init.device(dev).expect("device known")
    }

    /// Whether the initiator has `dev` up.
    pub fn is_up(&self, dev: TargetAddr) -> bool {
        self.init
            .device(dev)
            .is_some_and(|d| d.state == DeviceState::Up)
    }

    /// The initiator's log lines so far.
    pub fn logs(&self) -> impl Iterator<Item = &str> {
        self.events.iter().filter_map(|(_, e)| match e {
            Event::Log(l) => Some(l.as_str()),
            _ => None,
        })
    }
}

/// Checks a frame the initiator sent on an interface of MTU `mtu`: it parses, is padded to
/// the Ethernet minimum, fits the MTU, and a read's answer (36-byte header and the sectors
/// asked for) fits it too (the driver sizes frames by `ifp->maxbcnt`, `aoecmd.c`).
fn check_sent(frame: &[u8], mtu: u32) {
    assert!(mtu > 0, "frame sent on a removed interface");
    assert!(frame.len() >= 60, "frames are padded");
    assert!(
        frame.len() <= mtu as usize + ETH_HEADER,
        "{}-byte frame on an interface with MTU {mtu}",
        frame.len()
    );
    let m = Message::parse(frame).expect("the initiator's frame parses");
    if let (Command::Ata, Body::Ata(a)) = (m.header.command, &m.body) {
        if !a.aflags.contains(AtaFlags::WRITE) {
            let answer = ATA_HEADER_LEN + a.sector_count as usize * 512;
            assert!(
                answer <= mtu as usize,
                "asks for {} sectors at MTU {mtu}",
                a.sector_count
            );
        }
    }
}

/// Random reads, writes and flushes against a shadow copy: every read must return what was
/// last written. Ranges in flight never overlap (as a block device's user would ensure).
pub struct Workload {
    /// The device under load.
    pub dev: TargetAddr,
    /// Its size in sectors.
    pub sectors: u64,
    /// What the device should hold.
    pub shadow: Vec<u8>,
    /// Longest operation, in sectors.
    pub max_len: u64,
    /// Operations in flight at once.
    pub concurrency: usize,
    /// Sources the operations come from, each picked at random ([`Engine::submit_from`]);
    /// 1 (the default) submits everything from [`SourceId::DEFAULT`] and draws nothing more
    /// from the seed's random numbers.
    pub sources: u32,
    inflight: BTreeMap<IoId, (u64, u64, Option<Vec<u8>>)>,
    /// Operations completed.
    pub done: u64,
    /// Reads whose data was checked.
    pub reads_checked: u64,
    /// When each operation in flight was submitted.
    started: BTreeMap<IoId, Instant>,
    /// The longest an operation took from its submission to its completion.
    pub longest: Duration,
}

impl Workload {
    /// A workload on `dev` (`sectors` long, starting zeroed).
    pub fn new(dev: TargetAddr, sectors: u64, max_len: u64, concurrency: usize) -> Self {
        Workload {
            dev,
            sectors,
            shadow: vec![0u8; sectors as usize * 512],
            max_len,
            concurrency,
            sources: 1,
            inflight: BTreeMap::new(),
            done: 0,
            reads_checked: 0,
            started: BTreeMap::new(),
            longest: Duration::ZERO,
        }
    }

    fn overlaps(&self, lba: u64, n: u64) -> bool {
        self.inflight
            .values()
            .any(|(l, m, _)| lba < l + m && *l < lba + n)
    }

    /// Submits new operations up to the concurrency limit (at most `budget` in all).
    pub fn fill(&mut self, sim: &mut Sim, budget: &mut u64) {
        while self.inflight.len() < self.concurrency && *budget > 0 {
            let n = 1 + sim.rng.below(self.max_len);
            let lba = sim.rng.below(self.sectors - n + 1);
            if self.overlaps(lba, n) {
                return;
            }
            let kind = sim.rng.below(20);
            let (op, entry) = if kind < 9 {
                let mut data = vec![0u8; n as usize * 512];
                sim.rng.fill(&mut data);
                (
                    BlockOp::Write {
                        lba,
                        data: data.clone(),
                    },
                    (lba, n, Some(data)),
                )
            } else if kind < 19 {
                (
                    BlockOp::Read {
                        lba,
                        sectors: n as u32,
                    },
                    (lba, n, None),
                )
            } else {
                (BlockOp::Flush, (0, 0, None))
            };
            let source = if self.sources > 1 {
                SourceId(1 + sim.rng.below(u64::from(self.sources)) as u32)
            } else {
                SourceId::DEFAULT
            };
            let id = sim
                .submit_from(self.dev, op, source)
                .expect("submit on an up device");
            self.inflight.insert(id, entry);
            self.started.insert(id, sim.now);
            *budget -= 1;
        }
    }

    /// Checks completed operations; panics on any failure or wrong data.
    pub fn reap(&mut self, sim: &mut Sim) {
        let ids: Vec<IoId> = self
            .inflight
            .keys()
            .filter(|id| sim.completions.contains_key(id))
            .copied()
            .collect();
        for id in ids {
            let (lba, n, data) = self.inflight.remove(&id).unwrap_or_default();
            let (at, result) = sim.completions.remove(&id).unwrap_or((sim.now, Ok(None)));
            if let Some(start) = self.started.remove(&id) {
                self.longest = self.longest.max(at.saturating_duration_since(start));
            }
            let result = result.unwrap_or_else(|e| panic!("{id} failed: {e}"));
            let range = lba as usize * 512..(lba + n) as usize * 512;
            match (data, result) {
                (Some(w), None) => self.shadow[range].copy_from_slice(&w),
                (None, Some(r)) => {
                    assert_eq!(r.len(), range.len());
                    assert!(
                        r == self.shadow[range],
                        "{id}: read {lba}+{n} returned stale data"
                    );
                    self.reads_checked += 1;
                }
                (None, None) => {}
                (w, r) => panic!(
                    "{id}: mismatched completion {:?} {:?}",
                    w.is_some(),
                    r.is_some()
                ),
            }
            self.done += 1;
        }
    }

    /// Whether nothing is in flight.
    pub fn idle(&self) -> bool {
        self.inflight.is_empty()
    }

    /// Runs `ops` operations to completion within `within` of virtual time.
    pub fn run(&mut self, sim: &mut Sim, ops: u64, within: Duration) {
        let limit = sim.now + within;
        let mut budget = ops;
        loop {
            self.reap(sim);
            self.fill(sim, &mut budget);
            if budget == 0 && self.idle() {
                return;
            }
            assert!(
                sim.step(limit),
                "stuck: {} ops in flight at {:?}: {:#?}",
                self.inflight.len(),
                sim.now - sim.base,
                sim.init.devices()
            );
        }
    }
}

/// Bytes of a write's stamp, repeated over each sector it writes ([`Overlapping`]).
const STAMP: usize = 16;

/// One sector of write `id` at `lba`: the id and the sector's address, repeated, so a read
/// tells which write a sector came from and that it is whole.
fn stamp_sector(id: u64, lba: u64, out: &mut [u8]) {
    for c in out.chunks_mut(STAMP) {
        c[..8].copy_from_slice(&id.to_le_bytes());
        c[8..].copy_from_slice(&lba.to_le_bytes());
    }
}

/// The write a sector read back at `lba` came from: `Some(0)` for the disk's first zeros,
/// `None` for anything else (a torn sector, another sector's data).
fn stamp_of(lba: u64, sector: &[u8]) -> Option<u64> {
    if sector.iter().all(|b| *b == 0) {
        return Some(0);
    }
    let id = u64::from_le_bytes(sector[..8].try_into().ok()?);
    let mut want = [0u8; 512];
    stamp_sector(id, lba, &mut want[..sector.len()]);
    (id > 0 && sector == &want[..sector.len()]).then_some(id)
}

/// An op of [`Overlapping`] in flight: a write's id (0 for a read or a flush), its range and
/// when it was submitted.
#[derive(Debug, Clone, Copy)]
struct Issued {
    write: u64,
    lba: u64,
    n: u64,
    submitted: u64,
    source: usize,
}

/// Reads, writes and flushes from several sources over ranges that overlap freely, in
/// flight at once across sources and within one: what the processes sharing one device
/// file may do. Nothing is assumed about the order of ops in flight together; what is
/// checked is that nothing acknowledged is undone, sector by sector (a regular register):
/// a read returns the data of a write that began before the read ended and that no other
/// write overwrote entirely between (one begun after it completed and completed before the
/// read began); the disk ends with, in each sector, a write no later write followed; every
/// sector read is whole, one write's. Time is a counter of the workload's own steps:
/// completions are taken before the next submissions, so "completed before submitted" is
/// exact.
pub struct Overlapping {
    /// The device under load.
    pub dev: TargetAddr,
    /// Its size in sectors.
    pub sectors: u64,
    /// Longest operation, in sectors.
    pub max_len: u64,
    /// Sources the ops come from ([`Engine::submit_from`]), `SourceId(1)` and up.
    pub sources: u32,
    /// Ops each source has in flight at most.
    pub per_source: usize,
    /// Writes per 20 ops (9: 45 %); of the rest one is a flush, the others reads.
    pub writes_in_20: u64,
    /// The target's disk, if the test gives it: checked after every step of [`run`](Self::run)
    /// ([`check_disk`](Self::check_disk)), so that a late copy undoing an acknowledged
    /// write is caught whether or not a read comes before the next write covers it.
    pub disk: Option<Disk>,
    clock: u64,
    next_write: u64,
    /// The ranges of the writes completed last, newest last: half the ops go there (a
    /// process rewriting the block it just wrote, another reading it), where a late copy
    /// of the write just acknowledged would undo the next.
    recent: Vec<(u64, u64)>,
    /// The disk as last checked ([`disk`](Self::disk)).
    seen: Vec<u8>,
    inflight: BTreeMap<IoId, Issued>,
    /// Per sector, each write to it: (id, submitted, completed or `u64::MAX`).
    writes: Vec<Vec<(u64, u64, u64)>>,
    /// Operations completed.
    pub done: u64,
    /// Sectors read and checked.
    pub sectors_checked: u64,
    /// Reads that returned a write other than the last one completed before them (the
    /// concurrent writes' order showing).
    pub concurrent_seen: u64,
}

impl Overlapping {
    /// A workload on `dev` (`sectors` long, starting zeroed).
    pub fn new(
        dev: TargetAddr,
        sectors: u64,
        max_len: u64,
        sources: u32,
        per_source: usize,
    ) -> Self {
        Overlapping {
            dev,
            sectors,
            max_len,
            sources: sources.max(1),
            per_source: per_source.max(1),
            writes_in_20: 9,
            disk: None,
            clock: 0,
            next_write: 1,
            recent: Vec::new(),
            seen: vec![0u8; sectors as usize * 512],
            inflight: BTreeMap::new(),
            writes: vec![Vec::new(); sectors as usize],
            done: 0,
            sectors_checked: 0,
            concurrent_seen: 0,
        }
    }

    /// Submits new operations, from sources with room, up to `budget` in all.
    pub fn fill(&mut self, sim: &mut Sim, budget: &mut u64) {
        let cap = self.sources as usize * self.per_source;
        while self.inflight.len() < cap && *budget > 0 {
            let source = sim.rng.below(u64::from(self.sources)) as usize;
            if self
                .inflight
                .values()
                .filter(|o| o.source == source)
                .count()
                >= self.per_source
            {
                // That one is busy: the draw is spent, the others fill on the next step.
                return;
            }
            self.clock += 1;
            let (lba, n) = match self.recent.len() as u64 {
                k if k > 0 && sim.rng.below(2) == 0 => self.recent[sim.rng.below(k) as usize],
                _ => {
                    let n = 1 + sim.rng.below(self.max_len);
                    (sim.rng.below(self.sectors - n + 1), n)
                }
            };
            let kind = sim.rng.below(20);
            let (op, write) = if kind < self.writes_in_20.min(19) {
                let id = self.next_write;
                self.next_write += 1;
                let mut data = vec![0u8; n as usize * 512];
                for (k, sector) in data.chunks_mut(512).enumerate() {
                    stamp_sector(id, lba + k as u64, sector);
                }
                for x in lba..lba + n {
                    self.writes[x as usize].push((id, self.clock, u64::MAX));
                }
                (BlockOp::Write { lba, data }, id)
            } else if kind < 19 {
                let sectors = n as u32;
                (BlockOp::Read { lba, sectors }, 0)
            } else {
                (BlockOp::Flush, 0)
            };
            let (lba, n) = match op {
                BlockOp::Flush => (0, 0),
                _ => (lba, n),
            };
            let id = sim
                .submit_from(self.dev, op, SourceId(1 + source as u32))
                .expect("submit on an up device");
            let issued = Issued {
                write,
                lba,
                n,
                submitted: self.clock,
                source,
            };
            self.inflight.insert(id, issued);
            *budget -= 1;
        }
    }

    /// Checks read sector `x`'s data, from a read submitted at `submitted`: panics if it is
    /// not whole or was overwritten before the read began.
    fn check_read(&mut self, io: IoId, x: u64, sector: &[u8], submitted: u64) {
        let Some(v) = stamp_of(x, sector) else {
            panic!("{io}: sector {x} read back torn or from elsewhere");
        };
        let writes = &self.writes[x as usize];
        // Completed before the read began: the one the read must see, or a later one.
        let before = |c: u64| c < submitted;
        let got = if v == 0 {
            (0, 0, 0)
        } else {
            *writes
                .iter()
                .find(|w| w.0 == v)
                .unwrap_or_else(|| panic!("{io}: sector {x} holds write #{v}, never sent there"))
        };
        if let Some(newer) = writes
            .iter()
            .find(|w| w.0 != v && (v == 0 || got.2 < w.1) && before(w.2))
        {
            panic!(
                "{io}: sector {x} read back write #{v}, which write #{} (begun after it \
                 completed, completed before the read began) had overwritten: stale data",
                newer.0
            );
        }
        let last = writes
            .iter()
            .filter(|w| before(w.2))
            .max_by_key(|w| w.2)
            .map_or(0, |w| w.0);
        if v != last {
            self.concurrent_seen += 1;
        }
        self.sectors_checked += 1;
    }

    /// Checks completed operations; panics on any failure or data a read must not see.
    pub fn reap(&mut self, sim: &mut Sim) {
        let ids: Vec<IoId> = self
            .inflight
            .keys()
            .filter(|id| sim.completions.contains_key(id))
            .copied()
            .collect();
        if ids.is_empty() {
            return;
        }
        self.clock += 1;
        for id in ids {
            let op = self.inflight.remove(&id).expect("in flight");
            let (_, result) = sim.completions.remove(&id).expect("completed");
            let result = result.unwrap_or_else(|e| panic!("{id} failed: {e}"));
            if op.write > 0 {
                if self.recent.len() == 4 {
                    self.recent.remove(0);
                }
                self.recent.push((op.lba, op.n));
                for x in op.lba..op.lba + op.n {
                    if let Some(w) = self.writes[x as usize].iter_mut().find(|w| w.0 == op.write) {
                        w.2 = self.clock;
                    }
                }
            } else if let Some(data) = result {
                assert_eq!(data.len() as u64, op.n * 512, "{id}: read length");
                for (k, sector) in data.chunks(512).enumerate() {
                    self.check_read(id, op.lba + k as u64, sector, op.submitted);
                }
            }
            self.done += 1;
        }
    }

    /// Whether nothing is in flight.
    pub fn idle(&self) -> bool {
        self.inflight.is_empty()
    }

    /// Runs `ops` operations to completion within `within` of virtual time.
    pub fn run(&mut self, sim: &mut Sim, ops: u64, within: Duration) {
        let limit = sim.now + within;
        let mut budget = ops;
        loop {
            self.reap(sim);
            self.fill(sim, &mut budget);
            if budget == 0 && self.idle() {
                return;
            }
            assert!(
                sim.step(limit),
                "stuck: {} ops in flight at {:?}",
                self.inflight.len(),
                sim.now - sim.base
            );
            if let Some(disk) = self.disk.clone() {
                // Every sector after a completion (which may make what it holds stale), else
                // only those the step changed.
                let done = self.done;
                self.reap(sim);
                let disk = disk.borrow();
                for x in 0..self.writes.len() {
                    let now = &disk[x * 512..(x + 1) * 512];
                    let was = &mut self.seen[x * 512..(x + 1) * 512];
                    if self.done == done && now == &*was {
                        continue;
                    }
                    was.copy_from_slice(now);
                    if let Some(why) = self.check_sector(x, now) {
                        panic!("at {:?}: {why}", sim.now - sim.base);
                    }
                }
            }
        }
    }

    /// Checks the disk as it is now: each sector holds a write that no write acknowledged
    /// since followed (one begun after it completed, and completed), whole. Returns the
    /// sectors that do not, as messages. Once everything completed (and the copies still in
    /// the network landed), each sector holds a write no later write followed.
    pub fn check_disk(&self, disk: &[u8]) -> Vec<String> {
        (0..self.writes.len())
            .filter_map(|x| self.check_sector(x, &disk[x * 512..(x + 1) * 512]))
            .collect()
    }

    /// [`check_disk`](Self::check_disk) for sector `x` holding `sector`: why it may not.
    fn check_sector(&self, x: usize, sector: &[u8]) -> Option<String> {
        let writes = &self.writes[x];
        match stamp_of(x as u64, sector) {
            None => Some(format!("sector {x} torn or from elsewhere")),
            Some(0) => writes.iter().find(|w| w.2 != u64::MAX).map(|w| {
                format!(
                    "sector {x} holds its first zeros, undone: write #{} completed",
                    w.0
                )
            }),
            Some(v) => match writes.iter().find(|w| w.0 == v) {
                None => Some(format!("sector {x} holds write #{v}, never sent there")),
                Some(got) => writes
                    .iter()
                    .find(|w| got.2 < w.1 && w.2 != u64::MAX)
                    .map(|newer| {
                        format!(
                            "sector {x} holds write #{v}, undone: write #{} began after it \
                             completed, and completed",
                            newer.0
                        )
                    }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A held link moves only timers and disk I/O: stepping ends at the limit with the
    /// frames still on the wire (it once spun at their arrival time forever), and delivered
    /// by hand they bring the device up.
    #[test]
    fn a_held_link_waits_for_deliver() {
        let addr = TargetAddr::new(1, 1);
        let mut sim = Sim::new(1, LinkCfg::perfect(), Config::default(), &[1500]);
        sim.hold = true;
        sim.add_target(TargetSpec {
            addr,
            sectors: 64,
            buffer_count: 8,
            ifaces: vec![(MacAddr([2, 0xbb, 0, 0, 0, 1]), 1500, 0)],
            io_delay: Duration::ZERO,
            disk: None,
        });
        let queued = |s: &Sim| s.on_wire(Toward::Target) + s.on_wire(Toward::Initiator);
        let before = queued(&sim);
        assert!(before > 0, "discovery and the announcement are on the wire");
        let limit = sim.now + Duration::from_secs(1);
        let mut steps = 0;
        while sim.step(limit) {
            steps += 1;
            assert!(
                steps < 10_000,
                "a held link keeps stepping at {:?}",
                sim.now
            );
        }
        assert_eq!(sim.now, limit);
        assert!(queued(&sim) >= before, "nothing was delivered by itself");
        assert!(!sim.is_up(addr));
        for _ in 0..1_000 {
            if queued(&sim) == 0 {
                break;
            }
            sim.deliver(Toward::Target, 0);
            sim.deliver(Toward::Initiator, 0);
        }
        assert!(sim.is_up(addr), "{:?}", sim.logs().collect::<Vec<_>>());
    }
}
