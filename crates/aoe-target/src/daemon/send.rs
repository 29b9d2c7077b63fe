//! The send backlog: replies queued per interface, flushed when the socket has room
//! (POLLOUT), dropped and counted when full; reply buffers are recycled. How frames come in
//! and go out of an interface's socket: [`Batch`].

use super::*;
use aoe_sys::{PacketRing, RecvMeta};
use dispatch::Staged;
use std::collections::HashMap;

/// Receive slots of an interface's ring at least ([`IoMode::Rings`]); grown to twice the sum
/// of the buffer counts served there (`Daemon::size_socket_buffers`), so every request an
/// initiator may have in flight, and a retransmitted copy of each, has a slot.
///
/// Why 1024 and not the 256 that twice the default 128 buffers would need: the rings at
/// MTU 9000 take about 9 MiB each way with 1024, and 256 slots were tried to keep the slots
/// the initiator's kernel writes and the target reads in the caches; they cost more CPU per
/// GB written, not less, in two interleaved runs of `bench-initiator.sh` in both orders
/// (initiator 0.71-0.78 / 0.81-0.84 CPU-s/GB for dd / nbdcopy writes against 0.59-0.68 /
/// 0.70-0.81, target 0.45-0.50 against 0.37-0.45; docs/PERFORMANCE.md, "The target's CPU
/// per GB written"): a slot reused four times as often is more often still in the other
/// CPU's cache when the kernel or the target touches it again. A larger floor also leaves
/// room for several initiators' windows at once.
pub(super) const RING_FRAMES: usize = 1024;

/// Where an interface's received frames are, and how its replies leave.
pub(super) enum Batch {
    /// `recvmmsg` into this batch, `sendmmsg` from the backlog.
    Mmsg(RecvBatch),
    /// `PACKET_MMAP` receive and transmit rings on the socket: frames are read where the
    /// kernel wrote them, replies are built in transmit slots (those that waited in the
    /// backlog are copied there) and sent with one kick per batch.
    Ring(PacketRing),
}

impl Batch {
    /// Frame `f` of the last receive.
    pub(super) fn frame(&self, f: usize) -> &[u8] {
        match self {
            Batch::Mmsg(b) => b.frame(f),
            Batch::Ring(r) => r.frame(f),
        }
    }

    /// Metadata of frame `f` of the last receive.
    pub(super) fn meta(&self, f: usize) -> RecvMeta {
        match self {
            Batch::Mmsg(b) => b.meta(f),
            Batch::Ring(r) => r.meta(f),
        }
    }
}

/// Opens interface `name`'s socket for `mode`: with rings of at least `frames` slots set up
/// before the socket is bound ([`PacketSocket::open_with_ring`] says why), or, for `mmsg`
/// and where a ring cannot be set up (logged once), a plain socket and `recvmmsg` buffers.
/// `PACKET_QDISC_BYPASS` is on where the kernel has it; the buffer sizes are
/// [`Daemon::size_socket_buffers`]'s.
pub(super) fn open_socket(
    mode: IoMode,
    name: &str,
    frames: usize,
) -> io::Result<(PacketSocket, Batch)> {
    if mode == IoMode::Rings {
        match PacketSocket::open_with_ring(name, aoe_wire::MIN_FRAME_LEN, frames) {
            Ok((sock, ring)) => {
                // Best effort: a faster send path, as the memory-only responder measured.
                let _ = sock.set_qdisc_bypass(true);
                return Ok((sock, Batch::Ring(ring)));
            }
            // Without the privilege for any packet socket there is nothing to fall back to.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(e),
            Err(e) => tracing::warn!(
                interface = %name,
                error = %e,
                "cannot set up packet rings; using recvmmsg/sendmmsg"
            ),
        }
    }
    let sock = PacketSocket::open(name)?;
    let _ = sock.set_qdisc_bypass(true);
    let cap = frame_cap(sock.info().mtu);
    Ok((sock, Batch::Mmsg(RecvBatch::new(BATCH, cap))))
}

/// The bytes a frame received or sent on an interface of `mtu` may take (Ethernet header
/// included), never less than the shortest AoE frame.
pub(super) fn frame_cap(mtu: u32) -> usize {
    aoe_sys::frame_capacity(mtu).max(aoe_wire::MIN_FRAME_LEN)
}

/// An export an interface serves: its id in [`Daemon::exports`] and the two things the
/// receive loop asks of it for every frame, copied here so that routing a frame reads the
/// interface's list and not the export map (three look-ups a frame before, 2026-12-04
/// profile). Neither changes for an id: a changed export is a new one with a new id.
#[derive(Debug, Clone, Copy)]
pub(super) struct Route {
    pub(super) id: u32,
    /// The export's shelf.slot.
    pub(super) addr: aoe_wire::TargetAddr,
    /// A file export (not a shared store): frames for it make the spin pay
    /// ([`Daemon::spin_pays`]).
    pub(super) file: bool,
}

impl Route {
    /// True if `frame` may concern this export: its AoE header's shelf.slot (bytes 16-18)
    /// is the export's or a wildcard (AoEr11 section 2: major 0xffff and minor 0xff address
    /// every shelf and every slot), as the engine itself tests with
    /// [`TargetAddr::reaches`](aoe_wire::TargetAddr::reaches). A frame too short to carry
    /// the address goes to every export, whose engine drops and counts it as malformed.
    /// The rule the routing index ([`each_route_in`]) answers by; the loop asks the index
    /// alone, so this is the tests' statement of it.
    #[cfg(test)]
    fn reaches(&self, frame: &[u8]) -> bool {
        frame_addr(frame).is_none_or(|a| a.reaches(self.addr))
    }
}

/// The shelf.slot a frame is addressed to (AoEr11 section 2: bytes 16-18 of the Ethernet
/// frame), or `None` if it is too short to carry one.
fn frame_addr(frame: &[u8]) -> Option<aoe_wire::TargetAddr> {
    match (frame.get(16..18), frame.get(18)) {
        (Some(&[hi, lo]), Some(&minor)) => Some(aoe_wire::TargetAddr::new(
            u16::from_be_bytes([hi, lo]),
            minor,
        )),
        _ => None,
    }
}

/// Builds `by_addr`, the index of `exports` by shelf.slot ([`IfaceRt::by_addr`]).
fn index_routes(exports: &[Route], by_addr: &mut HashMap<aoe_wire::TargetAddr, Vec<usize>>) {
    by_addr.clear();
    for (k, r) in exports.iter().enumerate() {
        by_addr.entry(r.addr).or_default().push(k);
    }
}

/// Calls `g` with the index of each of `exports` that `frame` may concern, in order: those
/// `Route::reaches` is true of, found through the index `by_addr` ([`index_routes`]). The
/// one place that routes a frame: until session 36 the receive loop asked
/// `Route::reaches` again of each route this had named (the same answer, the frame's
/// shelf.slot parsed a second time per route); now that rule is this function's
/// specification, held to it by the unit tests.
fn each_route_in(
    exports: &[Route],
    by_addr: &HashMap<aoe_wire::TargetAddr, Vec<usize>>,
    frame: &[u8],
    mut g: impl FnMut(usize),
) {
    match frame_addr(frame) {
        Some(addr) if addr.is_wildcard() => (0..exports.len())
            .filter(|&k| addr.reaches(exports[k].addr))
            .for_each(g),
        Some(addr) => {
            if let Some(ks) = by_addr.get(&addr) {
                ks.iter().for_each(|&k| g(k));
            }
        }
        None => (0..exports.len()).for_each(g),
    }
}

/// How many replies ahead of the one being built [`IfaceRt::frame_and_slot`] hints the
/// transmit slot ([`PacketRing::prefetch_tx_slot`]): a frame's own code is 0.3-0.4 us
/// (docs/PERFORMANCE.md, session 30), so four frames give a miss of a microsecond room.
const TX_PREFETCH_AHEAD: usize = 4;

pub(super) struct IfaceRt {
    pub(super) name: String,
    pub(super) sock: PacketSocket,
    pub(super) batch: Batch,
    pub(super) frame_cap: usize,
    pub(super) iface: Interface,
    /// Exports served here, with what routing a frame asks of each ([`Route`]). Changed
    /// only through [`set_routes`](Self::set_routes), which keeps `by_addr` in step.
    pub(super) exports: Vec<Route>,
    /// Indices into `exports` by shelf.slot: a frame for one address is offered to the
    /// routes of that address alone ([`routes_for`](Self::routes_for)). Until session 35
    /// every frame was offered to every export of the interface: beside 4096 idle exports
    /// one export's 1 KiB reads took 7x the target's CPU per MiB at 0.26x the MB/s.
    by_addr: HashMap<aoe_wire::TargetAddr, Vec<usize>>,
    /// Replies waiting to be sent, oldest first: buffer and length. At most
    /// [`SEND_BACKLOG`].
    pub(super) out: VecDeque<(Vec<u8>, usize)>,
    /// Replies the socket refused with an error other than a full queue.
    pub(super) send_failures: u64,
    /// Replies dropped because the backlog was full.
    pub(super) backlog_drops: u64,
    /// Frames the kernel dropped before the loop saw them, the socket's receive ring or
    /// queue full (`PACKET_STATISTICS` `tp_drops`, packet(7)), summed over the reads of
    /// [`read_rx_drops`](Self::read_rx_drops): requests an initiator sent within the
    /// buffer count that Query Config advertises are lost here only if the ring holds
    /// fewer frames than that count (AoEr11 section 3.2: the buffer count is how many
    /// requests the target can take at once).
    pub(super) rx_drops: u64,
    /// (send_failures, backlog_drops) last logged.
    pub(super) drops_logged: (u64, u64),
    /// The last kick of the transmit ring failed with an error other than a full queue
    /// (`ENETDOWN`: the interface is down; `ENXIO`: gone). The kernel leaves the marked
    /// slots as they were, and the socket stays writable, so a loop waiting for POLLOUT to
    /// send them woke at once, every time: one core busy (300 000 failed kicks a second)
    /// for as long as the interface was down, from the start announce on (session 27,
    /// operator's audit). While this holds the loop neither polls for POLLOUT nor retries
    /// every [`KICK_RETRY`](super::KICK_RETRY): it kicks again when it wakes for anything
    /// else (a frame, a completion, the refresh timer once a second), and the first kick
    /// that succeeds clears it.
    pub(super) send_down: bool,
    /// The socket and batch replaced by [`rebuild`](Self::rebuild): it takes no new frames
    /// (`stop_receiving`), and the frames that reached it before are read from it until it
    /// is empty, then it is closed. Between the new socket's bind and that, a frame may
    /// reach both and be answered twice, which AoE allows (a retransmission looks the
    /// same).
    pub(super) old: Option<(PacketSocket, Batch)>,
    /// True while the frames of the last [`recv`](Self::recv) are in `old`.
    reading_old: bool,
    /// Replies of the current receive batch built in transmit slots and not yet marked, in
    /// slot order from the ring's next free one; [`Daemon::finish_staged`] reads their data
    /// (one `io_uring_enter`) and marks them at the end of the batch.
    pub(super) staged: Vec<Staged>,
    /// How many of `staged` are reads and writes ([`Staged::Read`], [`Staged::Write`], run
    /// or not), counted by [`stage`](Self::stage), zeroed when `finish_staged` empties
    /// `staged`: a count of 0 spares [`has_unread`](Self::has_unread) and
    /// [`has_unwritten`](Self::has_unwritten) their walk over the whole batch so far, which
    /// [`Daemon::dispatch`] asks for every frame (a write load has no reads to look for,
    /// a read load no writes).
    staged_reads: usize,
    staged_writes: usize,
    /// The interface's index is gone and no interface of its name exists (said once, by
    /// [`Daemon::refresh_interfaces`](super::Daemon), until it is back).
    pub(super) gone: bool,
    /// Its index was deleted (`RTM_DELLINK`: deleted, or moved to another namespace): the
    /// kernel unbound the socket for good, so the next look opens a new one on an
    /// interface of the name, even one back with the same index (an interface moved out
    /// and back keeps it), which the index alone does not tell apart.
    pub(super) unbound: bool,
}

impl IfaceRt {
    pub(super) fn new(name: &str, sock: PacketSocket, batch: Batch) -> IfaceRt {
        let info = sock.info().clone();
        IfaceRt {
            name: name.to_string(),
            batch,
            frame_cap: frame_cap(info.mtu),
            iface: Interface {
                mac: MacAddr(info.mac),
                mtu: info.mtu,
            },
            sock,
            exports: Vec::new(),
            by_addr: HashMap::new(),
            out: VecDeque::new(),
            send_failures: 0,
            backlog_drops: 0,
            rx_drops: 0,
            drops_logged: (0, 0),
            send_down: false,
            old: None,
            reading_old: false,
            staged: Vec::with_capacity(BATCH),
            staged_reads: 0,
            staged_writes: 0,
            gone: false,
            unbound: false,
        }
    }

    /// Receives the next batch of frames (they stay readable through
    /// [`frame`](Self::frame) and [`meta`](Self::meta) until the next call); returns how
    /// many.
    pub(super) fn recv(&mut self) -> io::Result<usize> {
        if let Some((sock, batch)) = &mut self.old {
            let n = match batch {
                Batch::Mmsg(b) => sock.recv_batch(b).unwrap_or(0),
                Batch::Ring(r) => r.recv_batch(BATCH),
            };
            if n > 0 {
                self.reading_old = true;
                return Ok(n);
            }
            self.old = None;
        }
        self.reading_old = false;
        match &mut self.batch {
            Batch::Mmsg(b) => self.sock.recv_batch(b),
            Batch::Ring(r) => Ok(r.recv_batch(BATCH)),
        }
    }

    fn received(&self) -> &Batch {
        match &self.old {
            Some((_, b)) if self.reading_old => b,
            _ => &self.batch,
        }
    }

    /// Frame `f` of the last [`recv`](Self::recv).
    pub(super) fn frame(&self, f: usize) -> &[u8] {
        self.received().frame(f)
    }

    /// Metadata of frame `f` of the last [`recv`](Self::recv).
    pub(super) fn meta(&self, f: usize) -> RecvMeta {
        self.received().meta(f)
    }

    /// Frame `f` of the last [`recv`](Self::recv) and, where the reply can be built in the
    /// transmit ring ([`PacketRing::frame_and_slot_ahead`]), the first `cap` bytes of the
    /// free slot after those the batch's replies already took; send what was built there
    /// with [`commit`](Self::commit), or stage a read into it ([`Staged::Read`]). No slot
    /// while replies wait in the backlog: they go first.
    pub(super) fn frame_and_slot(&mut self, f: usize, cap: usize) -> (&[u8], Option<&mut [u8]>) {
        if self.reading_old || !self.out.is_empty() {
            return (self.frame(f), None);
        }
        match &mut self.batch {
            Batch::Ring(r) => {
                // The slot a reply a few frames on will take, fetched now
                // ([`PacketRing::prefetch_tx_slot`]); at a batch's first reply, the first
                // few after it.
                let k = self.staged.len();
                if k == 0 {
                    for a in 1..=TX_PREFETCH_AHEAD {
                        r.prefetch_tx_slot(a);
                    }
                } else {
                    r.prefetch_tx_slot(k + TX_PREFETCH_AHEAD);
                }
                let (frame, slot) = r.frame_and_slot_ahead(f, k);
                (
                    frame,
                    slot.filter(|s| s.len() >= cap).map(|s| &mut s[..cap]),
                )
            }
            Batch::Mmsg(b) => (b.frame(f), None),
        }
    }

    /// Sends the reply of `n` bytes built in the slot [`frame_and_slot`](Self::frame_and_slot)
    /// lent, at the next kick ([`Daemon::flush_sends`]) after the batch
    /// ([`Daemon::finish_staged`] marks it, behind the batch's earlier replies).
    pub(super) fn commit(&mut self, n: usize) {
        self.stage(Staged::Ready(n));
    }

    /// Adds `s` to this batch's [`staged`](Self::staged), counting its reads and writes.
    pub(super) fn stage(&mut self, s: Staged) {
        match s {
            Staged::Read { .. } => self.staged_reads += 1,
            Staged::Write { .. } => self.staged_writes += 1,
            _ => {}
        }
        self.staged.push(s);
    }

    /// True if a read staged in this batch has not run yet ([`Staged::unread`]).
    pub(super) fn has_unread(&self) -> bool {
        self.staged_reads > 0 && self.staged.iter().any(Staged::unread)
    }

    /// True if a write staged in this batch has not run yet ([`Staged::unwritten`]).
    pub(super) fn has_unwritten(&self) -> bool {
        self.staged_writes > 0 && self.staged.iter().any(Staged::unwritten)
    }

    /// Empties [`staged`](Self::staged) for the next batch, keeping `emptied`'s allocation.
    pub(super) fn reset_staged(&mut self, emptied: Vec<Staged>) {
        debug_assert!(emptied.is_empty());
        self.staged = emptied;
        self.staged_reads = 0;
        self.staged_writes = 0;
    }

    /// Gives the receive ring's frames back to the kernel ([`PacketRing::release_lent`]),
    /// which would otherwise report the socket readable until the next receive.
    pub(super) fn release_rx(&mut self) {
        if let Batch::Ring(r) = &mut self.batch {
            r.release_lent();
        }
        if let Some((_, Batch::Ring(r))) = &mut self.old {
            r.release_lent();
        }
    }

    /// True if frames wait in the interface's receive ring, read without a system call
    /// ([`PacketRing::rx_ready`]); false without a ring (`recvmmsg`), or while a replaced
    /// socket is read (the loop does not wait then anyway).
    pub(super) fn rx_ready(&self) -> bool {
        matches!(&self.batch, Batch::Ring(r) if r.rx_ready())
    }

    /// True if the loop must wait for the socket to become writable: replies wait in the
    /// backlog.
    pub(super) fn wants_out(&self) -> bool {
        !self.send_down && (!self.out.is_empty() || self.kick_pending())
    }

    /// True if replies sit in the transmit ring that the kernel refused to take yet (a full
    /// device queue). The kernel reports no POLLOUT for them, so the loop polls with a short
    /// timeout and kicks again.
    pub(super) fn kick_pending(&self) -> bool {
        !self.send_down && self.ring().is_some_and(PacketRing::needs_kick)
    }

    /// Adds what the kernel dropped at the socket since the last read to `rx_drops` (the
    /// read resets the kernel's counter). A replaced socket's drops since the last read
    /// are not counted.
    pub(super) fn read_rx_drops(&mut self) {
        if let Ok(s) = self.sock.stats() {
            self.rx_drops += u64::from(s.drops);
        }
    }

    /// The socket's ring, if it has one.
    pub(super) fn ring(&self) -> Option<&PacketRing> {
        match &self.batch {
            Batch::Ring(r) => Some(r),
            Batch::Mmsg(_) => None,
        }
    }

    /// Sets up the batch anew for the current `frame_cap`, with at least `frames` ring slots
    /// (an MTU change, more buffers to honour). A ring is sized on a new socket, bound once
    /// its ring exists (a ring set up on the bound socket would drop what arrives
    /// meanwhile); the old socket is read until empty ([`IfaceRt::old`]). If no new socket
    /// can be opened the interface keeps the one it has.
    pub(super) fn rebuild(&mut self, mode: IoMode, frames: usize) {
        if mode == IoMode::Mmsg {
            self.batch = Batch::Mmsg(RecvBatch::new(BATCH, self.frame_cap));
            return;
        }
        match open_socket(mode, &self.name, frames) {
            Ok((sock, batch)) => {
                if let Batch::Ring(r) = &mut self.batch {
                    // Best effort: replies still marked in the old ring go out now.
                    let _ = r.kick();
                }
                let old_sock = std::mem::replace(&mut self.sock, sock);
                if let Err(e) = old_sock.stop_receiving() {
                    tracing::warn!(interface = %self.name, error = %e, "cannot stop the old socket");
                }
                let old_batch = std::mem::replace(&mut self.batch, batch);
                self.old = Some((old_sock, old_batch));
                self.reading_old = false;
            }
            Err(e) => tracing::error!(
                interface = %self.name,
                error = %e,
                "cannot open a new socket for the new MTU or buffer count; keeping the old one"
            ),
        }
    }
}

impl IfaceRt {
    /// Replaces the socket and batch with new ones on the interface now called `name`
    /// (with at least `frames` ring slots), and takes its index, address and MTU: the
    /// interface the old socket was bound to is gone (deleted and created again under its
    /// name). Nothing can be read from or sent on the old socket any more (the kernel
    /// unbound it), so it is closed, with what its rings held; a request lost there is
    /// retransmitted by its initiator. On error the old socket is kept.
    pub(super) fn reopen(&mut self, mode: IoMode, frames: usize) -> io::Result<()> {
        let (sock, batch) = open_socket(mode, &self.name, frames)?;
        // Replies still queued for the old socket go out on the new one.
        let info = sock.info().clone();
        self.sock = sock;
        self.batch = batch;
        self.old = None;
        self.reading_old = false;
        // The refresh tick runs between batches: each batch's staged replies are marked
        // (`Daemon::finish_staged`) before it ends, so none refers to the old ring.
        debug_assert!(self.staged.is_empty());
        self.send_down = false;
        self.frame_cap = frame_cap(info.mtu);
        self.iface = Interface {
            mac: MacAddr(info.mac),
            mtu: info.mtu,
        };
        Ok(())
    }
}

impl IfaceRt {
    /// Changes the routes (`f` may push, retain, ...) and rebuilds the index by address.
    pub(super) fn set_routes(&mut self, f: impl FnOnce(&mut Vec<Route>)) {
        f(&mut self.exports);
        index_routes(&self.exports, &mut self.by_addr);
    }

    /// Puts into `out` the indices (into `exports`, in its order) of the routes frame `f`
    /// may concern (`Route::reaches`, in the tests): those of its shelf.slot, or every one for a
    /// wildcard address (AoEr11 section 2) or a frame too short to carry an address.
    pub(super) fn routes_for(&self, f: usize, out: &mut Vec<usize>) {
        out.clear();
        self.each_route(f, |k| out.push(k));
    }

    /// Calls `g` with the index of each route [`routes_for`](Self::routes_for) names,
    /// without allocating.
    pub(super) fn each_route(&self, f: usize, g: impl FnMut(usize)) {
        each_route_in(&self.exports, &self.by_addr, self.frame(f), g);
    }

    /// Queues a reply for sending, or drops it (counted) when the backlog is full; the
    /// buffer goes back to `spare` then. Replies other than ATA (Query Config, mask and
    /// reservation answers) get only the first [`CONTROL_BACKLOG`] places: anyone can ask
    /// for those by broadcast as fast as the link allows, and their answers must not crowd
    /// out the data replies a legitimate initiator waits for (a full backlog drops them,
    /// and each drop costs that initiator a retransmit timeout).
    pub(super) fn queue(&mut self, buf: Vec<u8>, n: usize, spare: &mut Vec<Vec<u8>>) {
        let ata = buf.get(19) == Some(&0); // AoE header: command 0 = ATA
        let cap = if ata { SEND_BACKLOG } else { CONTROL_BACKLOG };
        if self.out.len() >= cap {
            self.backlog_drops += 1;
            spare.push(buf);
        } else {
            self.out.push_back((buf, n));
        }
    }
}

impl Daemon {
    /// Sizes each socket's receive buffer so the advertised buffer counts are honest: every
    /// export's window of full frames fits, with room for the kernel's per-frame overhead,
    /// up to what the worker queue takes ([`held_buffers`](super::exports::held_buffers)).
    pub(super) fn size_socket_buffers(&mut self) {
        for i in &mut self.ifaces {
            let frames = super::exports::held_buffers(
                i.exports
                    .iter()
                    .filter_map(|r| self.exports.get(&r.id))
                    .map(|e| e.spec.buffer_count as usize)
                    .sum(),
            );
            let per_frame = i.frame_cap + 1024;
            let want = (frames * per_frame * 2).max(4 << 20);
            if let Some(rx_frames) = i.ring().map(PacketRing::rx_frames) {
                if rx_frames < 2 * frames {
                    i.rebuild(self.io, super::exports::ring_frames(frames));
                }
            }
            if let Err(e) = i.sock.set_recv_buffer(want) {
                tracing::warn!(interface = %i.name, error = %e, "cannot size receive buffer");
            }
            let _ = i.sock.set_send_buffer(want);
        }
    }

    /// Sends what the interfaces' backlogs hold, as far as their sockets take it, without
    /// waiting: a full send queue leaves the rest for the next turn, when poll() reports
    /// the socket writable (POLLOUT) again.
    pub(super) fn flush_sends(&mut self) {
        for i in &mut self.ifaces {
            if let Batch::Ring(r) = &mut i.batch {
                while let Some((b, n)) = i.out.front() {
                    match r.push(&b[..*n]) {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => {
                            if let Some(a) = self.logs.check(Instant::now(), "send failed") {
                                tracing::debug!(interface = %i.name, error = %e, "send failed{a}");
                            }
                            i.send_failures += 1;
                        }
                    }
                    if let Some((b, _)) = i.out.pop_front() {
                        self.spare.push(b);
                    }
                }
                match r.kick() {
                    Ok(()) => i.send_down = false,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => i.send_down = false,
                    Err(e) => {
                        if let Some(a) = self.logs.check(Instant::now(), "send failed") {
                            tracing::debug!(interface = %i.name, error = %e, "send failed{a}");
                        }
                        // One failure for the replies the refused kick held, not one
                        // more for each retry of the same ones while the link is down.
                        if !i.send_down {
                            i.send_failures += 1;
                        }
                        i.send_down = true;
                    }
                }
                continue;
            }
            while !i.out.is_empty() {
                let frames: Vec<&[u8]> = i.out.iter().take(BATCH).map(|(b, n)| &b[..*n]).collect();
                let sent = match i.sock.send_batch(&frames) {
                    Ok(0) => break,
                    Ok(k) => k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // Skip the frame that failed; the initiator retransmits. Counted and
                        // logged once a second by log_drops.
                        if let Some(a) = self.logs.check(Instant::now(), "send failed") {
                            tracing::debug!(interface = %i.name, error = %e, "send failed{a}");
                        }
                        i.send_failures += 1;
                        1
                    }
                };
                for _ in 0..sent {
                    if let Some((b, _)) = i.out.pop_front() {
                        self.spare.push(b);
                    }
                }
            }
        }
        // Keep a bounded cache of buffers.
        self.spare.truncate(1024);
    }

    /// At stop: sends what is left, waiting for POLLOUT up to `limit`.
    pub(super) fn drain_sends(&mut self, limit: Duration) {
        let start = Instant::now();
        self.flush_sends();
        while self.ifaces.iter().any(IfaceRt::wants_out) {
            let Some(left) = limit.checked_sub(start.elapsed()) else {
                let n: usize = self.ifaces.iter().map(|i| i.out.len()).sum();
                tracing::warn!(
                    replies = n,
                    "send queues still full at exit; replies dropped"
                );
                return;
            };
            let mut fds: Vec<PollFd> = self
                .ifaces
                .iter()
                .filter(|i| i.wants_out())
                .map(|i| PollFd::with_events(i.sock.as_raw_fd(), false, true))
                .collect();
            let wait = if self.ifaces.iter().any(IfaceRt::kick_pending) {
                left.min(KICK_RETRY)
            } else {
                left
            };
            let _ = aoe_sys::poll(&mut fds, Some(wait));
            self.flush_sends();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame of 60 bytes addressed to `shelf.slot` (AoE header: major at 16-17, minor at
    /// 18).
    fn frame_to(shelf: u16, slot: u8) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[16..18].copy_from_slice(&shelf.to_be_bytes());
        f[18] = slot;
        f
    }

    /// Issue 15: a frame is routed from the interface's copy of each export's address (no
    /// look-up in the export map); it reaches its own export, wildcards reach every one
    /// (AoEr11 section 2), another address none, and a frame too short to carry the
    /// address goes to every export for its engine to drop as malformed.
    #[test]
    fn routes_take_a_frame_to_its_address_wildcards_and_short_frames_to_all() {
        let r = Route {
            id: 7,
            addr: aoe_wire::TargetAddr::new(3, 4),
            file: true,
        };
        assert!(r.reaches(&frame_to(3, 4)));
        assert!(r.reaches(&frame_to(0xffff, 4)));
        assert!(r.reaches(&frame_to(3, 0xff)));
        assert!(r.reaches(&frame_to(0xffff, 0xff)));
        assert!(!r.reaches(&frame_to(3, 5)));
        assert!(!r.reaches(&frame_to(2, 4)));
        assert!(!r.reaches(&frame_to(0xffff, 5)));
        assert!(r.reaches(&[0u8; 18]));
        assert!(r.reaches(&[]));
    }

    /// Session 36: the receive loop takes the routes the index names without asking
    /// [`Route::reaches`] again, so the index must name exactly the routes that rule
    /// reaches, in order: for each address, wildcards, and short frames, beside exports
    /// that share an address (two interfaces' worth) and ones that share a shelf or a slot.
    #[test]
    fn the_routing_index_names_exactly_the_routes_a_frame_reaches() {
        let addrs = [(3, 4), (3, 5), (2, 4), (3, 4), (0, 0), (7, 0xfe)];
        let exports: Vec<Route> = addrs
            .iter()
            .enumerate()
            .map(|(id, &(shelf, slot))| Route {
                id: id as u32,
                addr: aoe_wire::TargetAddr::new(shelf, slot),
                file: id % 2 == 0,
            })
            .collect();
        let mut by_addr = HashMap::new();
        index_routes(&exports, &mut by_addr);
        let mut frames: Vec<Vec<u8>> = vec![vec![], vec![0; 17], vec![0; 18]];
        for shelf in [0, 2, 3, 7, 9, 0xffff] {
            for slot in [0, 4, 5, 0xfe, 0xff] {
                frames.push(frame_to(shelf, slot));
            }
        }
        for frame in &frames {
            let mut named = Vec::new();
            each_route_in(&exports, &by_addr, frame, |k| named.push(k));
            let reached: Vec<usize> = (0..exports.len())
                .filter(|&k| exports[k].reaches(frame))
                .collect();
            assert_eq!(named, reached, "frame {:?}", frame.get(16..19));
        }
    }
}
