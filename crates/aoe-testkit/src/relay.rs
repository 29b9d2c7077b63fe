//! A user-space fault-injecting relay for AoE frames between real daemons.
//!
//! The engines' simulated link (in `aoe-proto`'s tests) covers loss and reordering in virtual
//! time; this relay does the same to real processes: a thread of the test process with two
//! `AF_PACKET` sockets ([`aoe_sys::PacketSocket`], ethertype 0x88A2) opened inside a middle
//! namespace with [`aoe_sys::run_in_netns`], one on the veth end towards the target and one
//! on the end towards the initiator. Every AoE frame received on one side is sent out of the
//! other, after the faults:
//!
//! * loss, duplication, reordering (the frame is held back and sent after the next one of
//!   its direction, or after 20 ms), delay (a fixed extra latency), each a probability drawn
//!   from a seeded xorshift generator, so a failing run can be replayed with its seed;
//! * corruption of a chosen [`Field`] (XOR with a non-zero byte);
//! * a cut ([`RelayControl::set_link`], [`RelayControl::cut_for`]): every frame dropped while
//!   the link is down, as when a cable is pulled (the veth carriers stay up, so neither end
//!   sees a link change: only silence, like a dead switch port);
//! * a hold ([`RelayControl::hold_writes`]): the first write requests to a chosen LBA are
//!   kept back for a while and then sent, every other frame passing them meanwhile, as a
//!   frame stuck in a queue somewhere while its retransmission overtakes it; the answers
//!   to the frames held are counted, so a test knows when the target has executed them.
//!
//! [`RelayControl`] changes the faults while traffic flows and reads the [`Counters`].
//!
//! [`RelayLink`] builds the topology: `target ns <-veth-> middle ns <-veth-> initiator ns`,
//! the middle ends in promiscuous mode, the relay between them; several of them between the
//! same two namespaces give several independent paths (multipath).
//!
//! What it does not do: no bandwidth shaping, no MTU changes, no frames of other ethertypes
//! (only AoE is relayed, so nothing else crosses), no rate above what one thread forwards.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aoe_sys::{PacketSocket, PollFd};
use aoe_wire::{AtaCommand, Body, Message};

use crate::{Netns, VethPair};

/// How long a reordered frame waits for the next frame of its direction at most.
const REORDER_HOLD: Duration = Duration::from_millis(20);

/// A field of an AoE frame to corrupt (offsets in the Ethernet frame, AoEr11 section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// Byte 14: version (high nibble) and flags.
    VerFlags,
    /// Byte 15: error.
    Error,
    /// Bytes 16-18: shelf and slot.
    Address,
    /// Byte 19: command.
    Command,
    /// Bytes 20-23: tag.
    Tag,
    /// Bytes 24-35: the ATA header (flags, feature, count, command, LBA).
    AtaHeader,
    /// Bytes 36 on: the data.
    Data,
    /// Any byte after the Ethernet header.
    Any,
}

impl Field {
    /// The byte range of this field in a frame of `len` bytes (possibly empty).
    fn range(self, len: usize) -> std::ops::Range<usize> {
        let (a, b) = match self {
            Field::VerFlags => (14, 15),
            Field::Error => (15, 16),
            Field::Address => (16, 19),
            Field::Command => (19, 20),
            Field::Tag => (20, 24),
            Field::AtaHeader => (24, 36),
            Field::Data => (36, len),
            Field::Any => (14, len),
        };
        a.min(len)..b.min(len)
    }
}

/// Which frames a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    /// Both directions.
    #[default]
    Both,
    /// Initiator to target (requests).
    ToTarget,
    /// Target to initiator (responses).
    ToInitiator,
}

impl Direction {
    fn applies(self, to_target: bool) -> bool {
        match self {
            Direction::Both => true,
            Direction::ToTarget => to_target,
            Direction::ToInitiator => !to_target,
        }
    }
}

/// The faults, as probabilities per frame (0.0 to 1.0). The default passes every frame.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Faults {
    /// Frames dropped.
    pub loss: f64,
    /// Frames sent twice.
    pub duplicate: f64,
    /// Frames held back and sent after the next frame of their direction.
    pub reorder: f64,
    /// Frames with one byte of [`corrupt_field`](Self::corrupt_field) XORed.
    pub corrupt: f64,
    /// The field corrupted.
    pub corrupt_field: Option<Field>,
    /// Extra latency for every frame.
    pub delay: Duration,
    /// Which frames loss, duplication, reordering and corruption apply to.
    pub direction: Direction,
}

impl Faults {
    /// Loss, duplication and reordering in both directions, the others off.
    pub fn lossy(loss: f64, duplicate: f64, reorder: f64) -> Faults {
        Faults {
            loss,
            duplicate,
            reorder,
            ..Faults::default()
        }
    }
}

/// What the relay did, counted over both directions unless named.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames received towards the target.
    pub to_target: AtomicU64,
    /// Frames received towards the initiator.
    pub to_initiator: AtomicU64,
    /// Frames sent out (duplicates included).
    pub forwarded: AtomicU64,
    /// Frames dropped by the loss rate.
    pub lost: AtomicU64,
    /// Extra copies sent.
    pub duplicated: AtomicU64,
    /// Frames held back and sent late.
    pub reordered: AtomicU64,
    /// Frames corrupted.
    pub corrupted: AtomicU64,
    /// Frames dropped while the link was down.
    pub cut: AtomicU64,
    /// Frames the outgoing socket refused (queue full, too long, ...).
    pub send_errors: AtomicU64,
    /// Write requests kept back by [`RelayControl::hold_writes`].
    pub held: AtomicU64,
    /// Of those, sent on since.
    pub released: AtomicU64,
    /// Responses seen with the tag of a frame held (the target's answers to them).
    pub held_answered: AtomicU64,
}

/// A copy of the [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(missing_docs)]
pub struct Snapshot {
    pub to_target: u64,
    pub to_initiator: u64,
    pub forwarded: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub corrupted: u64,
    pub cut: u64,
    pub send_errors: u64,
    pub held: u64,
    pub released: u64,
    pub held_answered: u64,
}

impl Counters {
    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            to_target: g(&self.to_target),
            to_initiator: g(&self.to_initiator),
            forwarded: g(&self.forwarded),
            lost: g(&self.lost),
            duplicated: g(&self.duplicated),
            reordered: g(&self.reordered),
            corrupted: g(&self.corrupted),
            cut: g(&self.cut),
            send_errors: g(&self.send_errors),
            held: g(&self.held),
            released: g(&self.released),
            held_answered: g(&self.held_answered),
        }
    }
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} frames to the target, {} to the initiator; forwarded {}, lost {}, duplicated {}, \
             reordered {}, corrupted {}, cut {}, send errors {}, held {} (released {}, \
             answered {})",
            self.to_target,
            self.to_initiator,
            self.forwarded,
            self.lost,
            self.duplicated,
            self.reordered,
            self.corrupted,
            self.cut,
            self.send_errors,
            self.held,
            self.released,
            self.held_answered
        )
    }
}

/// [`RelayControl::hold_writes`]: the next `remaining` ATA writes to `lba` towards the
/// target are kept back for `hold`.
#[derive(Debug, Clone, Copy)]
struct HoldWrites {
    lba: u64,
    remaining: u32,
    hold: Duration,
}

impl HoldWrites {
    /// True if `frame` is an ATA write request (WRITE SECTORS or WRITE SECTORS EXT)
    /// whose first sector is `self.lba`.
    fn matches(&self, frame: &[u8]) -> bool {
        match Message::parse(frame) {
            Ok(Message {
                header,
                body: Body::Ata(ata),
            }) if !header.response => {
                matches!(
                    ata.command(),
                    AtaCommand::WriteSectors | AtaCommand::WriteSectorsExt
                ) && ata.effective_lba() == self.lba
            }
            _ => false,
        }
    }
}

/// The tag of an AoE frame ([`Field::Tag`]).
fn tag_of(frame: &[u8]) -> Option<[u8; 4]> {
    frame.get(Field::Tag.range(frame.len()))?.try_into().ok()
}

struct Shared {
    faults: Mutex<Faults>,
    hold: Mutex<Option<HoldWrites>>,
    link_up: AtomicBool,
    stop: AtomicBool,
    counters: Counters,
}

/// A handle to a running [`Relay`]: change its faults, cut its link, read its counters.
/// Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct RelayControl {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RelayControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayControl")
            .field("faults", &*self.faults())
            .field("link_up", &self.link_up())
            .finish()
    }
}

impl RelayControl {
    fn faults(&self) -> MutexGuard<'_, Faults> {
        self.shared
            .faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Replaces the faults; frames already held back keep their fate.
    pub fn set_faults(&self, faults: Faults) {
        *self.faults() = faults;
    }

    /// Keeps back the next `count` ATA write requests whose first sector is `lba` (towards
    /// the target) for `hold` each, then sends them, while every other frame passes: a
    /// delayed original that its retransmitted copy overtakes. Replaces an earlier rule.
    /// Counted in `held` and `released`; the target's answers to them in `held_answered`.
    pub fn hold_writes(&self, lba: u64, count: u32, hold: Duration) {
        *self
            .shared
            .hold
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(HoldWrites {
            lba,
            remaining: count,
            hold,
        });
    }

    /// Brings the link up (frames pass) or down (every frame is dropped and counted in `cut`).
    pub fn set_link(&self, up: bool) {
        self.shared.link_up.store(up, Ordering::SeqCst);
    }

    /// True unless the link is cut.
    pub fn link_up(&self) -> bool {
        self.shared.link_up.load(Ordering::SeqCst)
    }

    /// Cuts the link for `window`, from a helper thread, and returns at once.
    pub fn cut_for(&self, window: Duration) -> JoinHandle<()> {
        let me = self.clone();
        me.set_link(false);
        std::thread::spawn(move || {
            std::thread::sleep(window);
            me.set_link(true);
        })
    }

    /// The counters.
    pub fn counters(&self) -> Snapshot {
        self.shared.counters.snapshot()
    }
}

/// A frame waiting to be sent: its release time and whether it goes to the target.
struct Held {
    at: Instant,
    to_target: bool,
    frame: Vec<u8>,
}

/// The relay thread between two sockets; stopped and joined on drop.
pub struct Relay {
    control: RelayControl,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("control", &self.control)
            .finish()
    }
}

impl Relay {
    /// Starts relaying AoE frames between `target_if` and `initiator_if`, both interfaces of
    /// namespace `ns`, with no faults and RNG `seed`.
    pub fn start(ns: &Netns, target_if: &str, initiator_if: &str, seed: u64) -> io::Result<Relay> {
        let (t, i) = (target_if.to_owned(), initiator_if.to_owned());
        let (t_sock, i_sock) = aoe_sys::run_in_netns(&ns.path(), move || {
            Ok::<_, io::Error>((PacketSocket::open(&t)?, PacketSocket::open(&i)?))
        })??;
        for s in [&t_sock, &i_sock] {
            s.set_recv_buffer(8 << 20)?;
            s.set_send_buffer(8 << 20)?;
        }
        let shared = Arc::new(Shared {
            faults: Mutex::new(Faults::default()),
            hold: Mutex::new(None),
            link_up: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let control = RelayControl {
            shared: shared.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("aoe-relay".into())
            .spawn(move || run(&shared, &t_sock, &i_sock, seed))?;
        Ok(Relay {
            control,
            thread: Some(thread),
        })
    }

    /// A handle to change faults and read counters.
    pub fn control(&self) -> RelayControl {
        self.control.clone()
    }

    /// True while the relay thread runs (a socket error ends it early; [`Relay::stop`]
    /// then returns the error).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the thread and returns its result (an I/O error on a socket ends it early).
    pub fn stop(&mut self) -> io::Result<()> {
        self.control.shared.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("relay thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// xorshift64*: deterministic for a seed, good enough for fault rates.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        let unit = (self.next() >> 11) as f64 / ((1u64 << 53) as f64);
        p > 0.0 && unit < p
    }
}

fn run(shared: &Shared, t_sock: &PacketSocket, i_sock: &PacketSocket, seed: u64) -> io::Result<()> {
    let mut rng = Rng::new(seed);
    let cap = aoe_sys::frame_capacity(t_sock.info().mtu.max(i_sock.info().mtu)).max(9100);
    let mut buf = vec![0u8; cap];
    // Frames waiting for their release time (delay), in arrival order.
    let mut delayed: VecDeque<Held> = VecDeque::new();
    // Per direction (0: to target, 1: to initiator), a frame held back for reordering.
    let mut reordered: [Option<Held>; 2] = [None, None];
    // Write requests kept back by `RelayControl::hold_writes`, and the tags of those held.
    let mut held_writes: Vec<Held> = Vec::new();
    let mut held_tags: Vec<[u8; 4]> = Vec::new();
    let c = &shared.counters;
    let send = |to_target: bool, frame: &[u8]| {
        let sock = if to_target { t_sock } else { i_sock };
        // A full queue on a veth is transient: retry briefly, then count it as lost.
        let deadline = Instant::now() + Duration::from_millis(50);
        loop {
            match sock.send(frame) {
                Ok(()) => {
                    c.forwarded.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(_) => {
                    c.send_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    };
    while !shared.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        // Release what is due.
        while delayed.front().is_some_and(|h| h.at <= now) {
            let h = delayed.pop_front().unwrap_or_else(|| unreachable!());
            send(h.to_target, &h.frame);
        }
        for slot in reordered.iter_mut() {
            if slot.as_ref().is_some_and(|h| h.at <= now) {
                let h = slot.take().unwrap_or_else(|| unreachable!());
                send(h.to_target, &h.frame);
            }
        }
        while let Some(i) = held_writes.iter().position(|h| h.at <= now) {
            let h = held_writes.remove(i);
            send(h.to_target, &h.frame);
            c.released.fetch_add(1, Ordering::Relaxed);
        }
        let next = delayed
            .front()
            .map(|h| h.at)
            .into_iter()
            .chain(reordered.iter().flatten().map(|h| h.at))
            .chain(held_writes.iter().map(|h| h.at))
            .min();
        let wait = next
            .map_or(Duration::from_millis(10), |t| {
                t.saturating_duration_since(now)
            })
            .min(Duration::from_millis(10));
        let mut fds = [
            PollFd::new(t_sock.as_raw_fd()),
            PollFd::new(i_sock.as_raw_fd()),
        ];
        aoe_sys::poll(&mut fds, Some(wait))?;
        for (to_target, sock) in [(false, t_sock), (true, i_sock)] {
            while let Some(meta) = sock.recv(&mut buf)? {
                let mut frame = buf[..meta.len.min(buf.len())].to_vec();
                if to_target {
                    c.to_target.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.to_initiator.fetch_add(1, Ordering::Relaxed);
                }
                if !shared.link_up.load(Ordering::SeqCst) {
                    c.cut.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if !to_target && tag_of(&frame).is_some_and(|t| held_tags.contains(&t)) {
                    c.held_answered.fetch_add(1, Ordering::Relaxed);
                }
                if to_target {
                    let mut rule = shared.hold.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(r) = rule
                        .as_mut()
                        .filter(|r| r.remaining > 0 && r.matches(&frame))
                    {
                        r.remaining -= 1;
                        c.held.fetch_add(1, Ordering::Relaxed);
                        held_tags.extend(tag_of(&frame));
                        held_writes.push(Held {
                            at: Instant::now() + r.hold,
                            to_target,
                            frame,
                        });
                        continue;
                    }
                }
                let f = shared
                    .faults
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let on = f.direction.applies(to_target);
                if on && rng.chance(f.loss) {
                    c.lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let (true, Some(field)) = (on, f.corrupt_field) {
                    let range = field.range(frame.len());
                    if !range.is_empty() && rng.chance(f.corrupt) {
                        let at = range.start + (rng.next() as usize) % range.len();
                        let xor = (rng.next() % 255) as u8 + 1;
                        frame[at] ^= xor;
                        c.corrupted.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let copies = if on && rng.chance(f.duplicate) {
                    c.duplicated.fetch_add(1, Ordering::Relaxed);
                    2
                } else {
                    1
                };
                let dir = usize::from(!to_target);
                let hold = on && reordered[dir].is_none() && rng.chance(f.reorder);
                let now = Instant::now();
                for _ in 0..copies {
                    let held = Held {
                        at: now + f.delay,
                        to_target,
                        frame: frame.clone(),
                    };
                    if hold && reordered[dir].is_none() {
                        c.reordered.fetch_add(1, Ordering::Relaxed);
                        reordered[dir] = Some(Held {
                            at: now + f.delay + REORDER_HOLD,
                            ..held
                        });
                    } else if f.delay.is_zero() && delayed.is_empty() {
                        send(to_target, &held.frame);
                    } else {
                        delayed.push_back(held);
                    }
                }
                // A frame held for reordering goes out right after the next one passes.
                if !hold {
                    if let Some(h) = reordered[dir].take() {
                        if f.delay.is_zero() && delayed.is_empty() {
                            send(h.to_target, &h.frame);
                        } else {
                            delayed.push_back(Held {
                                at: now + f.delay,
                                ..h
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// One relayed path between two namespaces: `target ns <-veth-> middle ns <-veth-> initiator
/// ns`, the relay in the middle. Dropped in order: relay, veths, middle namespace.
#[derive(Debug)]
pub struct RelayLink {
    /// The relay; [`control`](Relay::control) it.
    pub relay: Relay,
    target_side: VethPair,
    initiator_side: VethPair,
    /// The middle namespace.
    pub middle: Netns,
}

impl RelayLink {
    /// Creates the middle namespace and the two veth pairs (MTU `mtu`), puts the middle ends
    /// in promiscuous mode (frames to any MAC reach the relay) and starts the relay with
    /// `seed`.
    pub fn new(target_ns: &Netns, initiator_ns: &Netns, mtu: u32, seed: u64) -> io::Result<Self> {
        let middle = Netns::new("aoerelay")?;
        let target_side = VethPair::new(target_ns, &middle, mtu)?;
        let initiator_side = VethPair::new(&middle, initiator_ns, mtu)?;
        for ifname in [target_side.b_name(), initiator_side.a_name()] {
            middle.ip(&["link", "set", "dev", ifname, "promisc", "on"])?;
        }
        let relay = Relay::start(&middle, target_side.b_name(), initiator_side.a_name(), seed)?;
        Ok(RelayLink {
            relay,
            target_side,
            initiator_side,
            middle,
        })
    }

    /// The interface in the target's namespace.
    pub fn target_if(&self) -> &str {
        self.target_side.a_name()
    }

    /// The interface in the initiator's namespace.
    pub fn initiator_if(&self) -> &str {
        self.initiator_side.b_name()
    }

    /// MAC of the interface in the initiator's namespace.
    pub fn initiator_mac(&self) -> [u8; 6] {
        self.initiator_side.b_mac()
    }

    /// MAC of the interface in the target's namespace.
    pub fn target_mac(&self) -> [u8; 6] {
        self.target_side.a_mac()
    }

    /// The relay's control handle.
    pub fn control(&self) -> RelayControl {
        self.relay.control()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_rates_are_close_to_asked() {
        let mut r = Rng::new(7);
        let hits = (0..100_000).filter(|_| r.chance(0.05)).count();
        assert!((4_000..6_000).contains(&hits), "{hits}");
        assert!(!(0..1000).any(|_| r.chance(0.0)));
        assert!((0..1000).all(|_| r.chance(1.0)));
    }

    #[test]
    fn field_ranges_stay_inside_the_frame() {
        assert_eq!(Field::Tag.range(60), 20..24);
        assert_eq!(Field::Data.range(60), 36..60);
        assert!(Field::Data.range(30).is_empty());
        assert_eq!(Field::Any.range(10), 10..10);
    }

    /// An ATA request as the initiator sends it: AoE's EtherType, flags byte, command, LBA
    /// (6 bytes LE).
    fn ata(ext: bool, cmd: u8, lba: u64) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[12..14].copy_from_slice(&[0x88, 0xa2]);
        f[14] = 0x10;
        f[24] = if ext { 0x41 } else { 0x01 };
        f[27] = cmd;
        f[28..34].copy_from_slice(&lba.to_le_bytes()[..6]);
        f
    }

    #[test]
    fn hold_matches_write_requests_to_its_lba_only() {
        let h = HoldWrites {
            lba: 64,
            remaining: 1,
            hold: Duration::ZERO,
        };
        assert!(h.matches(&ata(true, 0x34, 64)));
        // LBA28: the top nibble of byte 31 carries the device bits (0xe0), not address.
        assert!(h.matches(&ata(false, 0x30, 64 | 0xe000_0000)));
        assert!(!h.matches(&ata(true, 0x34, 65)));
        assert!(!h.matches(&ata(true, 0x24, 64)), "a read");
        let mut rsp = ata(true, 0x34, 64);
        rsp[14] |= 0x08;
        assert!(!h.matches(&rsp), "a response");
        assert!(!h.matches(&ata(true, 0x34, 64)[..30]), "too short");
    }
}
