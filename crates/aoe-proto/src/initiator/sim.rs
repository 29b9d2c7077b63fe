//! Deterministic simulation: the initiator engine against `crate::target::Engine`s over a
//! seeded link that loses, duplicates, reorders and delays frames in virtual time.
//!
//! Topology: segment `k` joins initiator interface `k` with every target interface the
//! target lists on segment `k`. A segment or a target can be switched off mid-run.
//!
//! Ordering caveat (true of AoE itself, which has no sequence numbers): a network duplicate of
//! an old write that arrives after a newer write to the same sectors would undo it. The link
//! keeps `delay_max < 3 * delay_min` and the RTO floor far above `delay_max`, so a duplicate
//! always lands before the next write to the same sectors can (a write needs a round trip to
//! complete, and the next one a further one-way trip).

use std::cell::RefCell;
use std::rc::Rc;

use super::*;
use crate::target::{self, ExportConfig, Interface as TargetIface, IoKind, Outcome};
use aoe_wire::ATA_HEADER_LEN;

/// xorshift64*: small, seeded, good enough for fault injection.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `percent`/100 (fractional percent allowed).
    pub(super) fn chance(&mut self, percent: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 100.0 < percent
    }

    pub(super) fn duration(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_nanos() as u64;
        lo + Duration::from_nanos(self.below(span + 1))
    }

    pub(super) fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Link behaviour, per frame copy.
#[derive(Debug, Clone, Copy)]
pub(super) struct LinkCfg {
    pub loss_pct: f64,
    pub dup_pct: f64,
    pub delay_min: Duration,
    pub delay_max: Duration,
}

impl LinkCfg {
    pub(super) fn perfect() -> LinkCfg {
        LinkCfg {
            loss_pct: 0.0,
            dup_pct: 0.0,
            delay_min: Duration::from_micros(200),
            delay_max: Duration::from_micros(200),
        }
    }

    pub(super) fn lossy(loss_pct: f64, dup_pct: f64) -> LinkCfg {
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
    Initiator(usize),
    Target(usize, usize),
}

pub(super) type Disk = Rc<RefCell<Vec<u8>>>;

/// What an [`Event::Completed`] carries.
pub(super) type IoResult = Result<Option<Vec<u8>>, IoError>;

pub(super) struct SimTarget {
    pub eng: target::Engine,
    pub disk: Disk,
    /// Segment of each of the target's interfaces (index = target interface index).
    pub segs: Vec<usize>,
    pub up: bool,
    /// Disk latency: each I/O completes after a random delay up to this.
    pub io_delay: Duration,
    pending: BTreeMap<(Instant, u64), (usize, target::Token, Vec<u8>)>,
}

/// Parameters of one simulated target.
pub(super) struct TargetSpec {
    pub addr: TargetAddr,
    pub sectors: u64,
    pub buffer_count: u16,
    /// (MAC, MTU, segment) per interface.
    pub ifaces: Vec<(MacAddr, u32, usize)>,
    pub io_delay: Duration,
    /// Share another target's disk (two engines exporting one file on two NICs).
    pub disk: Option<Disk>,
}

pub(super) const INIT_MACS: [MacAddr; 2] = [
    MacAddr([0x02, 0xaa, 0, 0, 0, 1]),
    MacAddr([0x02, 0xaa, 0, 0, 0, 2]),
];

pub(super) struct Sim {
    pub base: Instant,
    pub now: Instant,
    pub rng: Rng,
    pub link: LinkCfg,
    pub init: Engine,
    pub seg_up: Vec<bool>,
    pub targets: Vec<SimTarget>,
    wire: BTreeMap<(Instant, u64), (Dest, Vec<u8>)>,
    seq: u64,
    pub events: Vec<(Instant, Event)>,
    pub completions: BTreeMap<IoId, (Instant, IoResult)>,
    /// Initiator `maxout`, for the window invariant.
    maxout: u16,
}

impl Sim {
    /// A simulation whose initiator has `init_mtus.len()` interfaces (interface k on
    /// segment k).
    pub(super) fn new(seed: u64, link: LinkCfg, cfg: Config, init_mtus: &[u32]) -> Sim {
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
            targets: Vec::new(),
            wire: BTreeMap::new(),
            seq: 0,
            events: Vec::new(),
            completions: BTreeMap::new(),
            maxout,
        };
        for (k, mtu) in init_mtus.iter().enumerate() {
            sim.init
                .add_interface(k, &format!("eth{k}"), INIT_MACS[k % 2], *mtu);
        }
        sim.flush();
        sim
    }

    /// Starts a target; it broadcasts its announcement on each interface (vblade `aoead`).
    pub(super) fn add_target(&mut self, spec: TargetSpec) -> usize {
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
            up: true,
            io_delay: spec.io_delay,
            pending: BTreeMap::new(),
        });
        self.announce(t);
        t
    }

    pub(super) fn announce(&mut self, t: usize) {
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
        let copies = if self.rng.chance(self.link.dup_pct) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.now + self.rng.duration(self.link.delay_min, self.link.delay_max);
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
        self.enqueue(Dest::Initiator(seg), &bytes);
    }

    /// Drains the initiator's transmit and event queues and checks the window invariant.
    pub(super) fn flush(&mut self) {
        let mut buf = vec![0u8; 9014];
        while let Some(tx) = self.init.poll_transmit(self.now, &mut buf) {
            assert!(tx.len >= 60, "frames are padded");
            let frame = buf[..tx.len].to_vec();
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

    fn deliver_to_target(&mut self, t: usize, j: usize, frame: &[u8]) {
        if !self.targets[t].up {
            return;
        }
        let mut reply = vec![0u8; 9014];
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
                let delay = self.targets[t].io_delay;
                let at = self.now + self.rng.duration(Duration::ZERO, delay);
                self.seq += 1;
                self.targets[t]
                    .pending
                    .insert((at, self.seq), (j, io.token, reply));
            }
        }
    }

    /// Advances to the next event not after `limit`; false if there is none.
    pub(super) fn step(&mut self, limit: Instant) -> bool {
        let next_wire = self.wire.keys().next().map(|k| k.0);
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
            if entry.key().0 > now {
                break;
            }
            let (dest, bytes) = entry.remove();
            match dest {
                Dest::Initiator(i) => {
                    self.init.handle_frame(now, i, &bytes);
                    self.flush();
                }
                Dest::Target(t, j) => self.deliver_to_target(t, j, &bytes),
            }
        }
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
        if self.init.poll_timeout().is_some_and(|t| t <= now) {
            self.init.handle_timeout(now);
        }
        self.flush();
        true
    }

    /// Steps until `done` holds or `limit` of virtual time passes; returns `done`'s value.
    pub(super) fn run_until(
        &mut self,
        within: Duration,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> bool {
        let limit = self.now + within;
        while !done(self) {
            if !self.step(limit) {
                return done(self);
            }
        }
        true
    }

    pub(super) fn run_for(&mut self, d: Duration) {
        let limit = self.now + d;
        while self.step(limit) {}
    }

    /// Takes a target off the network (it also forgets I/O in progress).
    pub(super) fn set_target_up(&mut self, t: usize, up: bool) {
        self.targets[t].up = up;
        if !up {
            self.targets[t].pending.clear();
        }
    }

    pub(super) fn submit(&mut self, dev: TargetAddr, op: BlockOp) -> Result<IoId, SubmitError> {
        let r = self.init.submit(self.now, dev, op);
        self.flush();
        r
    }

    pub(super) fn device(&self, dev: TargetAddr) -> DeviceInfo {
        self.init.device(dev).expect("device known")
    }

    pub(super) fn is_up(&self, dev: TargetAddr) -> bool {
        self.init
            .device(dev)
            .is_some_and(|d| d.state == DeviceState::Up)
    }

    pub(super) fn logs(&self) -> impl Iterator<Item = &str> {
        self.events.iter().filter_map(|(_, e)| match e {
            Event::Log(l) => Some(l.as_str()),
            _ => None,
        })
    }
}

/// Random reads, writes and flushes against a shadow copy: every read must return what was
/// last written. Ranges in flight never overlap (as a block device's user would ensure).
pub(super) struct Workload {
    pub dev: TargetAddr,
    pub sectors: u64,
    pub shadow: Vec<u8>,
    pub max_len: u64,
    pub concurrency: usize,
    inflight: BTreeMap<IoId, (u64, u64, Option<Vec<u8>>)>,
    pub done: u64,
    pub reads_checked: u64,
}

impl Workload {
    pub(super) fn new(dev: TargetAddr, sectors: u64, max_len: u64, concurrency: usize) -> Self {
        Workload {
            dev,
            sectors,
            shadow: vec![0u8; sectors as usize * 512],
            max_len,
            concurrency,
            inflight: BTreeMap::new(),
            done: 0,
            reads_checked: 0,
        }
    }

    fn overlaps(&self, lba: u64, n: u64) -> bool {
        self.inflight
            .values()
            .any(|(l, m, _)| lba < l + m && *l < lba + n)
    }

    /// Submits new operations up to the concurrency limit (at most `budget` in all).
    pub(super) fn fill(&mut self, sim: &mut Sim, budget: &mut u64) {
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
            let id = sim.submit(self.dev, op).expect("submit on an up device");
            self.inflight.insert(id, entry);
            *budget -= 1;
        }
    }

    /// Checks completed operations; panics on any failure or wrong data.
    pub(super) fn reap(&mut self, sim: &mut Sim) {
        let ids: Vec<IoId> = self
            .inflight
            .keys()
            .filter(|id| sim.completions.contains_key(id))
            .copied()
            .collect();
        for id in ids {
            let (lba, n, data) = self.inflight.remove(&id).unwrap_or_default();
            let (_, result) = sim.completions.remove(&id).unwrap_or((sim.now, Ok(None)));
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

    pub(super) fn idle(&self) -> bool {
        self.inflight.is_empty()
    }

    /// Runs `ops` operations to completion within `within` of virtual time.
    pub(super) fn run(&mut self, sim: &mut Sim, ops: u64, within: Duration) {
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
