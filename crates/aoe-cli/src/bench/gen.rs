//! The load generator's loop: a slab of pre-built request frames, sent in batches through a
//! `PACKET_TX_RING` on a send-only socket ([`TxRing`], one `send()` kick per batch) or with
//! `sendmmsg` (`--tx mmsg`), replies read by `recvmmsg` into header-sized buffers (or,
//! with `--rx ring`, from a PACKET_MMAP RX ring of header-sized slots, a [`PacketRing`]; whole
//! frames when the data is checked), tags that are slab indices, a short busy-poll before
//! sleeping in poll(2), and an RTT-adaptive retransmit timer.
//!
//! Nothing is allocated per frame: a request's frame lives in its slot of one arena for its
//! whole life and is patched in place (tag, LBA, count, write data). Through a transmit ring
//! the arena keeps only the request headers: each send copies the header into a ring slot and
//! writes a write's data (the LBA-stamped pattern) straight after it, so the data is written
//! once per send, not into the arena and then copied.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use aoe_sys::{PacketRing, PacketSocket, PollFd, RecvBatch};
use aoe_wire::{
    AtaFlags, AtaPacket, AtaRepr, Body, Command as AoeCommand, Frame, HeaderRepr, MacAddr, Message,
    Tag, TargetAddr, ATA_HEADER_LEN,
};

use super::hist::Histogram;
use super::pace::{Pacer, Rate};
use super::pattern::{self, SECTOR};

/// ATA status bits that mean the command failed: ERR (bit 0) and DF (bit 5), as the Linux
/// driver checks them in `ktiocomplete` (`ATA_ERR | ATA_DF`).
const ATA_FAILED: u8 = 0x21;
/// Ethernet minimum frame without FCS: shorter frames are padded.
const MIN_FRAME: usize = 60;
/// Receive slot when the data is not checked: the 36 header bytes of an ATA reply, or the
/// 60 of a padded one.
const HEADERS_ONLY: usize = 64;
/// Frames per `sendmmsg`/`recvmmsg` call.
const BATCH: usize = 64;

/// Reading or writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// READ SECTORS EXT.
    Read,
    /// WRITE SECTORS EXT.
    Write,
}

/// Where a phase sends its requests and how it stops.
pub struct Plan {
    /// Read or write.
    pub op: Op,
    /// Random request-aligned offsets instead of sequential ones.
    pub random: bool,
    /// Sectors per request.
    pub per: u8,
    /// Requests stay inside sectors `0..span`.
    pub span: u64,
    /// Stop issuing after this many sectors (the last request may be short).
    pub limit: Option<u64>,
    /// Stop at this time, counting only what completed before it.
    pub time: Option<Duration>,
    /// Check read data against the pattern.
    pub check: bool,
    /// The written data will be read back and checked (verify's write phase): each
    /// request carries the LBA-stamped pattern of its own sectors, retransmits included.
    /// Otherwise nothing looks at the data again (the stamp is the run's own), so each
    /// transmit slot (or, with `sendmmsg`, each request slot) gets the pattern once, that of
    /// the first request it carries, and keeps it for every later one: a write then costs
    /// the generator no store of its data, as the C generator's constant payload does not.
    pub stamp_data: bool,
    /// The pattern's run stamp.
    pub stamp: u64,
    /// Seed of the random offsets.
    pub seed: u64,
}

/// How the loop behaves.
pub struct Tuning {
    /// Requests in flight.
    pub window: usize,
    /// Busy-poll this long after the last activity before sleeping in poll(2).
    pub spin: Duration,
    /// Lower bound of the retransmit timeout.
    pub min_rto: Duration,
    /// Give up when nothing at all came back for this long.
    pub dead: Duration,
    /// Receive unchecked replies through the RX ring of a [`PacketRing`] instead of
    /// `recvmmsg`.
    pub rx_ring: bool,
    /// Receive read answers whole, their data copied into the generator's buffers or ring
    /// slots as a reader of the data needs it (`--rx-whole`), instead of their headers only.
    pub rx_whole: bool,
    /// The most the phase may ask (`--rate`, `--rate-iops`); unlimited by default.
    pub rate: Rate,
    /// How far behind its schedule a paced phase may fall and still catch up
    /// (`--rate-burst-ms`, the token bucket's depth).
    pub rate_depth: Duration,
}

/// A `PACKET_TX_RING` on a send-only socket of the target's interface
/// ([`PacketSocket::open_sender`], [`PacketRing::sender`]): a whole batch of requests goes
/// out with one `send()` kick, where `sendmmsg(2)` pays per message for the header's copy,
/// the iovec import and `packet_snd`'s skb set-up. Its `virtio_net_hdr` makes the kernel copy
/// each frame into the skb's linear part (a veth would copy the ring's pages again).
pub struct TxRing {
    /// The send-only socket, open as long as its ring (which holds a duplicate of it).
    _sock: PacketSocket,
    ring: PacketRing,
}

/// Most slots of a transmit ring: 9 MiB of them at MTU 9000. A larger window goes on when
/// the kernel hands slots back (a kick frees them as it sends, on a veth at once).
const TX_RING_MAX_SLOTS: usize = 1024;

impl TxRing {
    /// A transmit ring on interface `ifname` with slots for frames of an `mtu`-byte payload,
    /// twice `window` of them (at least 256, at most [`TX_RING_MAX_SLOTS`]): a window's
    /// requests and as many retransmits of them fit without waiting for the kernel.
    ///
    /// # Errors
    ///
    /// Any error of the socket, `PACKET_TX_RING` or `mmap`.
    pub fn new(ifname: &str, mtu: u32, window: usize) -> io::Result<TxRing> {
        let sock = PacketSocket::open_sender(ifname)?;
        // Best effort, as on the receiving socket: room for a whole ring's frames in the
        // send buffer, and no qdisc between the ring and the device.
        let _ = sock.set_send_buffer(32 << 20);
        let _ = sock.set_qdisc_bypass(true);
        let slots = (2 * window).clamp(256, TX_RING_MAX_SLOTS);
        let ring = PacketRing::sender(&sock, aoe_sys::frame_capacity(mtu), slots)?;
        Ok(TxRing { _sock: sock, ring })
    }
}

/// Where the target is.
pub struct Peer<'a> {
    /// The socket on the interface the target answered on.
    pub sock: &'a PacketSocket,
    /// Our MAC.
    pub me: MacAddr,
    /// The target's MAC.
    pub mac: MacAddr,
    /// The target's shelf and slot.
    pub addr: TargetAddr,
}

/// What one phase did.
pub struct PhaseStats {
    /// Read or write.
    pub op: Op,
    /// Requests completed.
    pub requests: u64,
    /// Bytes completed.
    pub bytes: u64,
    /// From the first send to the last completion (or the time limit).
    pub elapsed: Duration,
    /// Latency from a request's first send to its reply, retransmissions included.
    pub hist: Histogram,
    /// With a rate: latency from the time the schedule meant the request to go (its place in
    /// the rate, not its send), which counts the wait for a window slot or for a target that
    /// fell behind (coordinated omission). Empty without a rate.
    pub hist_sched: Histogram,
    /// Requests went out through the transmit ring (else with `sendmmsg`).
    pub tx_ring: bool,
    /// Replies came in through the RX ring (else with `recvmmsg`).
    pub rx_ring: bool,
    /// Requests sent again after a timeout.
    pub retransmits: u64,
    /// Requests completed by the answer to a send older than their latest: that send was
    /// not lost, so the retransmit after it was spurious (the answer came after the timer,
    /// not never).
    pub late_replies: u64,
    /// Frames the kernel dropped at this socket over the phase, its receive queue or ring
    /// full (`PACKET_STATISTICS` `tp_drops`): answers lost here, not on the wire or at the
    /// target.
    pub rx_drops: u64,
    /// Sectors checked against the pattern.
    pub checked_sectors: u64,
    /// Sectors that differed.
    pub bad_sectors: u64,
    /// Bytes of read data that arrived in the generator's memory: all of them with
    /// [`Tuning::rx_whole`] or when checking, a few per answer (what fits a header-sized
    /// buffer after the headers) otherwise.
    pub rx_data_bytes: u64,
    /// First differing byte: (LBA, offset in the sector).
    pub first_bad: Option<(u64, usize)>,
    /// Frames the transmit ring took (requests and retransmits).
    pub frames_ring: u64,
    /// Frames sent with `sendmmsg`.
    pub frames_mmsg: u64,
    /// Stopped early by Ctrl-C.
    pub interrupted: bool,
}

/// Progress so far, for the live line.
pub struct Progress {
    /// Since the phase started.
    pub elapsed: Duration,
    /// Bytes completed.
    pub bytes: u64,
    /// Requests completed.
    pub requests: u64,
    /// Retransmissions.
    pub retransmits: u64,
}

#[derive(Clone, Copy)]
struct Slot {
    busy: bool,
    /// Bumped on every (re)send, so each send has its own tag; the request's first send had
    /// generation `gen - tries` (modulo 2^15).
    gen: u16,
    lba: u64,
    count: u8,
    len: usize,
    first: Instant,
    sent: Instant,
    /// When the rate's schedule meant it to go (its first send without a rate).
    intended: Instant,
    tries: u32,
    /// Its arena frame holds write data already (`sendmmsg` only; see [`Plan::stamp_data`]).
    filled: bool,
}

/// Tag layout: bit 31 set (a user-space tool's tag), bits 16-30 the slot's generation,
/// bits 0-15 the slot index. The target echoes the tag (AoEr11 §3.1), so a reply finds
/// its request without a lookup table.
fn tag(slot: usize, gen: u16) -> u32 {
    Tag::USER_BIT | (u32::from(gen & 0x7fff) << 16) | slot as u32
}

/// Retransmit timeout after RFC 6298 (SRTT + 4 RTTVAR, doubled per retry), as the Linux
/// driver adapts its `rttavg`/`mintimer` per target (`calc_rttavg` in aoecmd.c), with the
/// lower bound of `Tuning::min_rto`. Every send carries its own tag, so a reply names the send
/// it answers and its sample is never ambiguous: Karn's rule (no samples from retransmitted
/// requests) is not needed, and a late reply to a first send still teaches the estimator that
/// the path is slow instead of leaving it to fire again and again.
struct Rto {
    srtt: f64,
    rttvar: f64,
    min: f64,
}

/// The longest retransmit timeout, in microseconds (2 s): `--min-rto-us` cannot exceed it.
pub const MAX_RTO_US: u64 = 2_000_000;

impl Rto {
    fn sample(&mut self, rtt: Duration) {
        let r = rtt.as_secs_f64();
        if self.srtt == 0.0 {
            self.srtt = r;
            self.rttvar = r / 2.0;
        } else {
            self.rttvar = 0.75 * self.rttvar + 0.25 * (self.srtt - r).abs();
            self.srtt = 0.875 * self.srtt + 0.125 * r;
        }
    }

    /// The timeout of a request sent `tries` times before (doubled per retry, at most
    /// [`MAX_RTO_US`]).
    fn timeout(&self, tries: u32) -> Duration {
        let base = if self.srtt == 0.0 {
            0.05
        } else {
            (self.srtt + 4.0 * self.rttvar).max(self.min)
        };
        Duration::from_secs_f64(
            (base * f64::from(1u32 << tries.min(6))).min(MAX_RTO_US as f64 / 1e6),
        )
    }
}

/// xorshift64*: cheap random offsets, reproducible from the seed.
fn next_rand(s: &mut u64) -> u64 {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    s.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Stamps the first `n` pending requests as sent now (the first send's time too, for a
/// request's first try) and takes them off the pending queue.
fn mark_sent(pending: &mut VecDeque<u16>, slots: &mut [Slot], n: usize) {
    let sent_at = Instant::now();
    for i in pending.drain(..n) {
        let s = &mut slots[usize::from(i)];
        if s.tries == 0 {
            s.first = sent_at;
        }
        s.sent = sent_at;
    }
}

/// Runs one phase, sending through `tx` if given (else with `sendmmsg`). `progress` is
/// called about once a second; `stop` ends the phase early.
pub fn run(
    peer: &Peer<'_>,
    plan: &Plan,
    t: &Tuning,
    mut tx: Option<&mut TxRing>,
    stop: &AtomicBool,
    mut progress: impl FnMut(&Progress),
) -> Result<PhaseStats> {
    let per = u64::from(plan.per);
    let write = plan.op == Op::Write;
    let data_max = usize::from(plan.per) * SECTOR;
    // A ring slot must hold the longest request; else (an MTU the ring was not made for)
    // this phase sends with sendmmsg.
    if tx
        .as_ref()
        .is_some_and(|r| ATA_HEADER_LEN + data_max > r.ring.tx_frame_cap())
    {
        tx = None;
    }
    // Through a ring the arena holds the headers only; write data goes into the slot.
    let arena_data = if write && tx.is_none() { data_max } else { 0 };
    let stride = (ATA_HEADER_LEN + arena_data).max(MIN_FRAME);
    // One template, emitted by aoe-wire, copied into every slot.
    let zeros = vec![0u8; arena_data];
    let template = Message {
        header: HeaderRepr::request(peer.mac, peer.me, peer.addr, AoeCommand::Ata, Tag(0)),
        body: Body::Ata(AtaRepr {
            aflags: if write {
                AtaFlags::EXTENDED | AtaFlags::WRITE
            } else {
                AtaFlags::EXTENDED
            },
            err_feature: 0,
            sector_count: plan.per,
            // READ SECTORS EXT / WRITE SECTORS EXT (ATA8-ACS), as the driver's LBA48 path.
            cmd_status: if write { 0x34 } else { 0x24 },
            lba: 0,
            data: &zeros,
        }),
    }
    .to_vec()?;
    let mut arena = vec![0u8; stride * t.window];
    for f in arena.chunks_exact_mut(stride) {
        f[..template.len()].copy_from_slice(&template);
    }
    // Reading PACKET_STATISTICS resets it: what an earlier phase left is not this one's.
    let _ = peer.sock.stats();
    let start = Instant::now();
    let mut slots = vec![
        Slot {
            busy: false,
            gen: 0,
            lba: 0,
            count: 0,
            len: 0,
            first: start,
            sent: start,
            intended: start,
            tries: 0,
            filled: false,
        };
        t.window
    ];
    let mut free: Vec<u16> = (0..t.window as u16).rev().collect();
    let mut pending: VecDeque<u16> = VecDeque::with_capacity(t.window);
    // Replies come through `recvmmsg` into header-sized slots (`MSG_TRUNC` still gives the
    // length, so the data of a read reply is counted, not copied), or with `--rx ring`
    // through an RX ring that keeps only their headers (no system call per batch; the kernel
    // fills the ring in the target's transmit path instead). Checked data comes through
    // `recvmmsg` into full-size slots.
    let rx_ring = t.rx_ring && !plan.check;
    // Whole frames: what reaches a reader of the data (the initiator's receive ring gets
    // each answer's data copied in the target's transmit path); header-sized slots: what
    // reaches a generator that only counts (docs/PERFORMANCE.md, "Session 32: the
    // initiator's reads against raw").
    let whole = aoe_sys::frame_capacity(peer.sock.info().mtu);
    let mut ring = if rx_ring {
        let frames = (4 * t.window).max(2048);
        let cap = if t.rx_whole { whole } else { HEADERS_ONLY };
        Some(
            PacketRing::with_slots(peer.sock, cap, frames, 0, 0)
                .map_err(|e| anyhow::anyhow!("cannot attach an RX ring to the socket: {e}"))?,
        )
    } else {
        None
    };
    let mut batch = (!rx_ring).then(|| {
        let slot_size = if plan.check || t.rx_whole {
            whole
        } else {
            HEADERS_ONLY
        };
        RecvBatch::new(BATCH, slot_size)
    });
    let mut rto = Rto {
        srtt: 0.0,
        rttvar: 0.0,
        min: t.min_rto.as_secs_f64(),
    };
    let deadline = plan.time.map(|d| start + d);
    let slots_in_span = (plan.span / per).max(1);
    let mut rng = plan.seed | 1;
    let mut next_lba = 0u64;
    let mut issued = 0u64;
    let mut busy = 0usize;
    let mut st = PhaseStats {
        op: plan.op,
        requests: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
        hist: Histogram::new(),
        hist_sched: Histogram::new(),
        tx_ring: tx.is_some(),
        rx_ring,
        retransmits: 0,
        late_replies: 0,
        rx_drops: 0,
        checked_sectors: 0,
        bad_sectors: 0,
        rx_data_bytes: 0,
        first_bad: None,
        frames_ring: 0,
        frames_mmsg: 0,
        interrupted: false,
    };
    let mut pacer = t
        .rate
        .is_limited()
        .then(|| Pacer::new(start, t.rate, t.rate_depth));
    // Transmit slots not yet given write data in this phase (set at the first send).
    let mut unseeded: Option<usize> = None;
    let mut last_reply = start;
    let mut last_activity = start;
    let mut next_scan = start;
    let mut next_progress = start + Duration::from_secs(1);
    let end = loop {
        let mut now = Instant::now();
        if stop.load(Ordering::Relaxed) {
            st.interrupted = true;
            break now;
        }
        if deadline.is_some_and(|d| now >= d) {
            break deadline.unwrap_or(now);
        }
        // Issue new requests into free slots, as far as the rate allows.
        while plan.limit.is_none_or(|l| issued < l) {
            if pacer.as_ref().is_some_and(|p| !p.ready(now)) || free.is_empty() {
                break;
            }
            if busy == 0 {
                // An empty window (paced, between requests): the dead-target timer counts
                // from now, not from the last reply.
                last_reply = now;
            }
            let Some(i) = free.pop() else { break };
            let (lba, count) = if plan.random {
                let lba = (next_rand(&mut rng) % slots_in_span) * per;
                (lba, per.min(plan.span - lba))
            } else {
                let lba = next_lba;
                let count = per.min(plan.span - lba);
                next_lba = (lba + count) % plan.span;
                (lba, count)
            };
            let count = plan.limit.map_or(count, |l| count.min(l - issued));
            issued += count;
            let i = usize::from(i);
            let s = &mut slots[i];
            s.intended = pacer
                .as_mut()
                .map_or(now, |p| p.take(now, count * SECTOR as u64));
            s.busy = true;
            s.lba = lba;
            // count <= per <= 255.
            s.count = count as u8;
            s.tries = 0;
            s.gen = s.gen.wrapping_add(1);
            let data_len = if write { count as usize * SECTOR } else { 0 };
            s.len = (ATA_HEADER_LEN + data_len).max(MIN_FRAME);
            let mut f = Frame::new_checked(&mut arena[i * stride..(i + 1) * stride])?;
            f.set_tag(Tag(tag(i, s.gen)));
            let mut ata = AtaPacket::new_checked(f.payload_mut())?;
            ata.set_sector_count(s.count);
            ata.set_lba(lba);
            if write && tx.is_none() && (plan.stamp_data || !s.filled) {
                pattern::fill(&mut ata.data_mut()[..data_len], lba, plan.stamp);
                s.filled = true;
            }
            pending.push_back(i as u16);
            busy += 1;
        }
        let more = plan.limit.is_none_or(|l| issued < l);
        if busy == 0 && !more {
            break now;
        }
        // Send what is pending: into the ring's free slots and one kick for them all, or
        // with sendmmsg in batches.
        if let Some(r) = tx.as_deref_mut() {
            if unseeded.is_none() {
                unseeded = Some(r.ring.tx_frames());
            }
            let mut n = 0;
            for &i in pending.iter() {
                let i = usize::from(i);
                let Some(slot) = r.ring.slot_ahead(0) else {
                    break;
                };
                let s = &slots[i];
                let head = s.len.min(stride);
                slot[..head].copy_from_slice(&arena[i * stride..i * stride + head]);
                // Slots are taken in ring order, so the first `tx_frames` sends of the phase
                // reach each slot once.
                let seeding = unseeded.is_some_and(|u| u > 0);
                if write && (plan.stamp_data || seeding) {
                    let data = usize::from(s.count) * SECTOR;
                    pattern::fill(
                        &mut slot[ATA_HEADER_LEN..ATA_HEADER_LEN + data],
                        s.lba,
                        plan.stamp,
                    );
                }
                if seeding {
                    unseeded = unseeded.map(|u| u - 1);
                }
                r.ring.commit(s.len)?;
                n += 1;
            }
            // Frames a kick could not send (the device queue or the send buffer is full)
            // stay marked: the loop kicks again on its next pass and does not sleep before.
            match r.ring.kick() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            mark_sent(&mut pending, &mut slots, n);
            st.frames_ring += n as u64;
        }
        while tx.is_none() && !pending.is_empty() {
            let k = pending.len().min(BATCH);
            let mut refs: [&[u8]; BATCH] = [&[]; BATCH];
            for (r, &i) in refs.iter_mut().zip(pending.iter()) {
                let i = usize::from(i);
                *r = &arena[i * stride..i * stride + slots[i].len];
            }
            let n = match peer.sock.send_batch(&refs[..k]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e.into()),
            };
            mark_sent(&mut pending, &mut slots, n);
            st.frames_mmsg += n as u64;
            if n < k {
                break;
            }
        }
        // Receive and complete. Ring frames stay lent until the next `recv_batch`.
        let n = match (&mut batch, &mut ring) {
            (Some(b), _) => peer.sock.recv_batch(b)?,
            (None, Some(r)) => r.recv_batch(BATCH),
            (None, None) => 0,
        };
        if n > 0 {
            now = Instant::now();
        }
        for k in 0..n {
            let (f, wire) = match (&batch, &ring) {
                (Some(b), _) => (b.frame(k), b.wire_len(k)),
                (None, Some(r)) => (r.frame(k), r.wire_len(k)),
                (None, None) => break,
            };
            let Ok(fr) = Frame::new_checked(f) else {
                continue;
            };
            if !fr.is_response() || fr.command() != AoeCommand::Ata || fr.target() != peer.addr {
                continue;
            }
            let Ok(ata) = AtaPacket::new_checked(fr.payload()) else {
                continue;
            };
            let tg = fr.tag().0;
            let i = (tg & 0xffff) as usize;
            if tg & Tag::USER_BIT == 0 || i >= slots.len() {
                continue;
            }
            let s = &mut slots[i];
            // How many sends ago the answered one was: a reply to an earlier send of the same
            // request (same LBA, same data) completes it as well as the newest would.
            let age = u32::from(s.gen.wrapping_sub((tg >> 16) as u16) & 0x7fff);
            if !s.busy || age > s.tries {
                // A reply to an earlier request of this slot, long since completed.
                continue;
            }
            if fr.is_error() {
                bail!(
                    "{} answered AoE error {} to the request for LBA {}",
                    peer.addr,
                    fr.error(),
                    s.lba
                );
            }
            if ata.cmd_status() & ATA_FAILED != 0 {
                bail!(
                    "{} answered ATA status {:#04x} error {:#04x} for LBA {}",
                    peer.addr,
                    ata.cmd_status(),
                    ata.err_feature(),
                    s.lba
                );
            }
            let bytes = usize::from(s.count) * SECTOR;
            if !write {
                if wire < ATA_HEADER_LEN + bytes {
                    bail!(
                        "{} answered a {}-sector read with {} bytes of data",
                        peer.addr,
                        s.count,
                        wire - ATA_HEADER_LEN
                    );
                }
                st.rx_data_bytes += f.len().saturating_sub(ATA_HEADER_LEN).min(bytes) as u64;
                if plan.check {
                    let Some(data) = f.get(ATA_HEADER_LEN..ATA_HEADER_LEN + bytes) else {
                        bail!("a {wire}-byte reply from {} did not fit the MTU", peer.addr);
                    };
                    let (bad, first) = pattern::check(data, s.lba, plan.stamp);
                    st.checked_sectors += u64::from(s.count);
                    st.bad_sectors += bad;
                    if st.first_bad.is_none() {
                        st.first_bad = first;
                    }
                }
            }
            if age == 0 {
                rto.sample(now.saturating_duration_since(s.sent));
            } else {
                st.late_replies += 1;
                if age == s.tries {
                    rto.sample(now.saturating_duration_since(s.first));
                }
            }
            st.hist
                .record(now.saturating_duration_since(s.first).as_nanos() as u64);
            if pacer.is_some() {
                st.hist_sched
                    .record(now.saturating_duration_since(s.intended).as_nanos() as u64);
            }
            st.requests += 1;
            st.bytes += bytes as u64;
            s.busy = false;
            busy -= 1;
            free.push(i as u16);
        }
        if n > 0 {
            last_reply = now;
            last_activity = now;
        }
        // Retransmit what waited too long, under a new generation so a late reply to the
        // old send is recognised as stale. Only once the receive queue is drained (a short
        // batch): after the generator itself was descheduled, the replies still queued are
        // not losses.
        if n < BATCH && now >= next_scan {
            for (i, s) in slots.iter_mut().enumerate() {
                if s.busy && s.sent <= now && now - s.sent > rto.timeout(s.tries) {
                    if pending.contains(&(i as u16)) {
                        continue;
                    }
                    s.tries += 1;
                    s.gen = s.gen.wrapping_add(1);
                    Frame::new_checked(&mut arena[i * stride..(i + 1) * stride])?
                        .set_tag(Tag(tag(i, s.gen)));
                    pending.push_back(i as u16);
                    st.retransmits += 1;
                }
            }
            next_scan = now + (rto.timeout(0) / 4).min(Duration::from_millis(1));
            if busy > 0 && now - last_reply > t.dead {
                bail!(
                    "{} stopped answering: no reply for {:.1} s with {} requests in flight",
                    peer.addr,
                    t.dead.as_secs_f64(),
                    busy
                );
            }
        }
        if now >= next_progress {
            progress(&Progress {
                elapsed: now - start,
                bytes: st.bytes,
                requests: st.requests,
                retransmits: st.retransmits,
            });
            next_progress += Duration::from_secs(1);
        }
        let unkicked = tx.as_ref().is_some_and(|r| r.ring.needs_kick());
        if n > 0 || !pending.is_empty() || unkicked || now - last_activity < t.spin {
            continue;
        }
        // Idle: sleep until a reply arrives, the next retransmit scan is due, or (paced, with
        // a free slot) the next request is.
        let mut fds = [PollFd::new(peer.sock.as_raw_fd())];
        let mut wake = deadline.map_or(next_scan, |d| d.min(next_scan));
        if let Some(p) = pacer.as_ref().filter(|_| more && !free.is_empty()) {
            // With nothing in flight there is nothing to rescan: sleep until the next
            // request is due (a slow rate wakes once per request, not every millisecond).
            let due = p.next_due();
            wake = if busy == 0 {
                deadline.map_or(due, |d| d.min(due))
            } else {
                wake.min(due)
            };
        }
        if pacer.is_some() {
            // To the nanosecond: the next request is due at a given time, and a poll rounded
            // up to the millisecond would send the rate in bursts.
            aoe_sys::poll_precise(&mut fds, Some(wake.saturating_duration_since(now)))?;
        } else {
            aoe_sys::poll(&mut fds, Some(wake.saturating_duration_since(now)))?;
        }
        last_activity = Instant::now();
    };
    st.elapsed = end.saturating_duration_since(start);
    st.rx_drops = peer.sock.stats().map_or(0, |p| u64::from(p.drops));
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_carry_slot_and_generation() {
        let t = tag(513, 0x8123);
        assert_eq!(t & 0xffff, 513);
        assert_eq!((t >> 16) & 0x7fff, 0x0123);
        assert_ne!(t & Tag::USER_BIT, 0);
    }

    #[test]
    fn rto_follows_rtt_with_floor_and_backoff() {
        let mut r = Rto {
            srtt: 0.0,
            rttvar: 0.0,
            min: 0.001,
        };
        assert_eq!(r.timeout(0), Duration::from_millis(50));
        for _ in 0..50 {
            r.sample(Duration::from_micros(100));
        }
        assert_eq!(r.timeout(0), Duration::from_millis(1));
        assert_eq!(r.timeout(2), Duration::from_millis(4));
        assert_eq!(r.timeout(30), Duration::from_secs_f64(0.064));
        for _ in 0..50 {
            r.sample(Duration::from_millis(10));
        }
        assert!(r.timeout(0) > Duration::from_millis(10));
    }
}
