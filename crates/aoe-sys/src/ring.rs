//! `PACKET_MMAP` rings (packet(7), Documentation/networking/packet_mmap.rst): a receive and a
//! transmit ring of `TPACKET_V2` frames shared with the kernel, so that frames come in
//! without a system call per batch and go out with one `send()` kick per batch.
//!
//! Why `TPACKET_V2` and not the block-based `TPACKET_V3` for receiving: a V3 block is handed
//! to user space only when it is full or when its retire timer fires, and that timer counts
//! in whole milliseconds (`tp_retire_blk_tov`). An initiator keeping 16 requests in flight
//! sees a round trip of 50-200 us, so a block of a few frames would wait for the timer and
//! the window would stall. V2 hands over every frame as soon as it is written (its own
//! `tp_status`), which is what a request/reply protocol needs; one socket then carries both
//! rings, since `PACKET_VERSION` applies to both.
//!
//! The one ring implementation of the crate: the target uses both rings with whole frames,
//! `aoe bench` (the load generator, `--rx ring`) a receive ring alone, of header-sized slots
//! (the kernel stores the first bytes of a frame and reports its wire length):
//! [`PacketRing::with_slots`] sizes each ring's slots, or leaves one ring out. The
//! initiator sends through a transmit ring alone on a socket that receives nothing
//! ([`PacketRing::sender`]), beside the socket it receives on.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::packet::{PacketSocket, RecvMeta};
use crate::{cvt, cvt_size};

// <linux/if_packet.h>
const PACKET_RX_RING: libc::c_int = 5;
const PACKET_VERSION: libc::c_int = 10;
const PACKET_TX_RING: libc::c_int = 13;
const PACKET_LOSS: libc::c_int = 14;
pub(crate) const PACKET_VNET_HDR: libc::c_int = 15;
/// `sizeof(struct virtio_net_hdr)`: flags, gso_type (u8), hdr_len, gso_size, csum_start,
/// csum_offset (u16, in the host's byte order: packet sockets read it with `vio_le()`, the
/// legacy virtio rule).
pub(crate) const VNET_HDR_LEN: usize = 10;
const TPACKET_V2: libc::c_int = 1;
const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;
const TP_STATUS_AVAILABLE: u32 = 0;
const TP_STATUS_SEND_REQUEST: u32 = 1;
const TP_STATUS_WRONG_FORMAT: u32 = 1 << 2;
const TPACKET_ALIGNMENT: usize = 16;
/// `sizeof(struct tpacket2_hdr)`: tp_status, tp_len, tp_snaplen (u32), tp_mac, tp_net (u16),
/// tp_sec, tp_nsec (u32), tp_vlan_tci, tp_vlan_tpid (u16), tp_padding[4].
const TPACKET2_HDR_SIZE: usize = 32;
/// Where a transmitted frame's data starts in its slot: `TPACKET2_HDRLEN -
/// sizeof(struct sockaddr_ll)` = `TPACKET_ALIGN(32)`, as `tpacket_fill_skb` expects without
/// `PACKET_TX_HAS_OFF`.
const TX_DATA_OFFSET: usize = 32;
/// Where received frame data can start at the latest for SOCK_RAW: `tpacket_rcv` puts the
/// MAC header at `TPACKET_ALIGN(TPACKET2_HDRLEN + 16) - 14` = 66 (TPACKET2_HDRLEN is
/// 32 + sizeof(sockaddr_ll) = 52); the slot needs room for that plus the whole frame.
const RX_DATA_OFFSET: usize = 80;

const fn align(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// Largest block [`block_size`] picks: 2 MiB, order 9 on 4 KiB pages. The kernel tries a
/// physically contiguous block of each size without reclaiming (`__GFP_NORETRY`) and falls
/// back to `vzalloc`, so a fragmented machine still gets the ring.
const MAX_BLOCK: usize = 2 << 20;

/// The block size for slots of `frame_size` bytes: 128 KiB (at least one slot, a multiple of
/// `page`), doubled while the tail no slot fits in is more than a sixteenth of the block,
/// up to [`MAX_BLOCK`]. The kernel gives each block `PAGE_SIZE << get_order(tp_block_size)`
/// bytes (`alloc_pg_vec`), so a block that is a power of two of pages wastes only its tail.
/// At MTU 1500 and 9000 the 128 KiB block wastes 1-3% and stays; at 65535 (65,632-byte
/// receive slots) one slot fitted a 128 KiB block, half of the ring's memory was tail
/// (a 1024-slot ring took 128 MiB), and 1 MiB blocks of 15 slots waste 6%.
fn block_size(frame_size: usize, page: usize) -> usize {
    let mut block = align(frame_size.max(128 << 10), page);
    while block < MAX_BLOCK && (block % frame_size) * 16 > block {
        block *= 2;
    }
    block
}

/// `(a + b) % n` for `a < n` and `b <= n`, without the division: the ring's positions are
/// moved on per frame, several times a request, and a 32- or 64-bit `div` takes tens of
/// cycles (session 31's profile of `commit_from`).
#[inline]
fn wrap_add(a: usize, b: usize, n: usize) -> usize {
    debug_assert!(a < n && b <= n);
    let s = a + b;
    if s >= n {
        s - n
    } else {
        s
    }
}

/// `struct tpacket_req` from `<linux/if_packet.h>`.
#[repr(C)]
struct TpacketReq {
    tp_block_size: libc::c_uint,
    tp_block_nr: libc::c_uint,
    tp_frame_size: libc::c_uint,
    tp_frame_nr: libc::c_uint,
}

/// The geometry of one ring: `frame_nr` slots of `frame_size` bytes, `per_block` to a block
/// of `block_size` bytes (frames never cross a block, packet_mmap.rst).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    frame_size: usize,
    block_size: usize,
    per_block: usize,
    block_nr: usize,
}

impl Geometry {
    /// At least `frames` slots that each hold `data` bytes after `offset`: blocks of 128 KiB
    /// (a multiple of the page size), as many as needed, or of the smallest power of two
    /// times that which wastes at most a sixteenth of each block ([`block_size`]). No
    /// frames: no blocks, which the kernel takes as "no ring" (`packet_set_ring` with
    /// `tp_block_nr` 0).
    fn new(frames: usize, data: usize, offset: usize, page: usize) -> Geometry {
        let frame_size = align(offset + data, TPACKET_ALIGNMENT);
        let block_size = block_size(frame_size, page);
        let per_block = block_size / frame_size;
        let block_nr = frames.div_ceil(per_block);
        Geometry {
            frame_size,
            block_size,
            per_block,
            block_nr,
        }
    }

    fn frame_nr(&self) -> usize {
        self.per_block * self.block_nr
    }

    fn bytes(&self) -> usize {
        self.block_size * self.block_nr
    }

    /// Offset of slot `i` from the start of the ring.
    fn slot(&self, i: usize) -> usize {
        (i / self.per_block) * self.block_size + (i % self.per_block) * self.frame_size
    }

    /// Every slot's offset from the start of the mapping, the ring starting at `base`
    /// ([`Geometry::slot`] of each): looked up per frame instead of computed, since the
    /// computation is a division (`per_block` is no power of two at MTU 1500 or 9000).
    fn offsets(&self, base: usize) -> Box<[usize]> {
        (0..self.frame_nr()).map(|i| base + self.slot(i)).collect()
    }

    fn req(&self) -> io::Result<TpacketReq> {
        let c = |v: usize| {
            libc::c_uint::try_from(v)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "packet ring too large"))
        };
        Ok(TpacketReq {
            tp_block_size: c(self.block_size)?,
            tp_block_nr: c(self.block_nr)?,
            tp_frame_size: c(self.frame_size)?,
            tp_frame_nr: c(self.frame_nr())?,
        })
    }
}

/// Counters of a [`PacketRing`] since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Frames the kernel refused to send (`TP_STATUS_WRONG_FORMAT`: too long for the
    /// interface's MTU, or malformed).
    pub tx_rejected: u64,
    /// Frames marked for sending ([`PacketRing::push`], [`PacketRing::commit`]).
    pub tx_marked: u64,
}

/// A `TPACKET_V2` receive ring and transmit ring on one [`PacketSocket`], mapped into this
/// process (packet(7) `PACKET_RX_RING`, `PACKET_TX_RING`, `PACKET_MMAP`).
///
/// Receiving: [`recv_batch`](Self::recv_batch) collects the frames the kernel has written
/// (no system call at all: each slot's `tp_status` says whose it is) and lends them through
/// [`frame`](Self::frame) and [`meta`](Self::meta) until the next `recv_batch`, which hands
/// their slots back to the kernel. `poll(POLLIN)` on the socket reports a frame waiting.
///
/// The kernel stores at most the receive slot's capacity of each frame and reports the frame's
/// length on the wire ([`wire_len`](Self::wire_len)), so small slots receive headers only.
///
/// Sending: [`push`](Self::push) copies a frame into the next free slot and marks it
/// `TP_STATUS_SEND_REQUEST`; [`kick`](Self::kick) (one `send(fd, NULL, 0)`) makes the kernel
/// send every marked slot. A slot becomes free again when the kernel has let go of the frame.
///
/// The socket keeps its filter, binding and options; while a receive ring exists, `recv` and
/// `recv_batch` on the socket itself see nothing (the kernel delivers into the ring). While
/// a transmit ring exists every send on the socket goes through it (packet_sendmsg calls
/// tpacket_snd), so the socket's own `send` sends only frames marked in the ring, nothing of
/// its own buffer. Dropping the ring unmaps it and removes it from the socket (best effort:
/// the kernel keeps a transmit ring whose frames are still in flight), which then receives
/// and sends by itself again.
///
/// Set up on a bound socket ([`new`](Self::new)), a ring loses the frames that arrive
/// meanwhile and those already queued (the kernel detaches the socket for the setup and
/// purges its queue): a server sets its rings up before binding, with
/// [`PacketSocket::open_with_ring`], and sizes them anew (an MTU change) on a fresh socket.
pub struct PacketRing {
    map: NonNull<u8>,
    map_len: usize,
    rx: Geometry,
    tx: Geometry,
    /// Next receive slot to look at.
    rx_head: usize,
    /// Slots lent out by the last `recv_batch`, starting at `rx_lent_from`.
    rx_lent: usize,
    rx_lent_from: usize,
    /// (offset of the frame data in the ring, meta, wire length) of the lent frames.
    lent: Vec<(usize, RecvMeta, usize)>,
    /// Per receive slot: `Some((offset of the frame data, length))` while the slot is held
    /// past its batch ([`hold`](Self::hold)), out of the kernel's hands until
    /// [`release_held`](Self::release_held).
    held: Vec<Option<(usize, usize)>>,
    /// Slots held now.
    held_n: usize,
    /// Next transmit slot to fill.
    tx_head: usize,
    /// Offsets in the mapping of the receive and transmit slots, by index
    /// ([`Geometry::offsets`]).
    rx_offs: Box<[usize]>,
    tx_offs: Box<[usize]>,
    /// Slots marked since the last kick that took them all.
    tx_unkicked: usize,
    /// A duplicate of the socket's descriptor, so that kicks and the removal on drop reach
    /// this socket even if its `PacketSocket` was closed first.
    fd: OwnedFd,
    stats: RingStats,
    /// Bytes of `virtio_net_hdr` before each frame (`PACKET_VNET_HDR`), 0 without.
    vnet: usize,
}

// SAFETY: the mapping is owned by the ring (unmapped on drop) and only touched through
// `&mut self` (writes) or `&self` reads of slots the kernel has handed over; moving it to
// another thread or reading it from several is as safe as for a Vec.
unsafe impl Send for PacketRing {}
// SAFETY: as above; `&self` methods only read.
unsafe impl Sync for PacketRing {}

impl PacketRing {
    /// Puts a receive ring of at least `rx_frames` and a transmit ring of at least
    /// `tx_frames` slots, each holding a frame of `frame_cap` bytes, on `sock` and maps them.
    ///
    /// # Errors
    ///
    /// `EBUSY` if the socket already has a ring (a mapped one: drop it first), or any error of
    /// `setsockopt(PACKET_VERSION / PACKET_RX_RING / PACKET_TX_RING)` and `mmap`, e.g. on a
    /// kernel built without `CONFIG_PACKET_MMAP`-era support; the socket is then left with no
    /// ring and works as before.
    pub fn new(
        sock: &PacketSocket,
        frame_cap: usize,
        rx_frames: usize,
        tx_frames: usize,
    ) -> io::Result<PacketRing> {
        Self::with_slots(sock, frame_cap, rx_frames, frame_cap, tx_frames)
    }

    /// Like [`new`](Self::new) with slots of their own size per ring: a receive slot stores
    /// the first `rx_cap` bytes of a frame (the kernel cuts the rest and still reports its
    /// wire length), a transmit slot holds frames of up to `tx_cap` bytes. Either count may
    /// be 0 for no ring of that kind: without a receive ring the socket's own `recv` and
    /// `recv_batch` go on receiving, and [`recv_batch`](Self::recv_batch) lends nothing;
    /// without a transmit ring [`push`](Self::push) finds no slot. At least one ring.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new); [`io::ErrorKind::InvalidInput`] if both counts are 0.
    pub fn with_slots(
        sock: &PacketSocket,
        rx_cap: usize,
        rx_frames: usize,
        tx_cap: usize,
        tx_frames: usize,
    ) -> io::Result<PacketRing> {
        // With both rings every send and receive of the socket goes through them, so the
        // virtio_net_hdr before each frame is the rings' business alone.
        Self::make(
            sock,
            rx_cap,
            rx_frames,
            tx_cap,
            tx_frames,
            rx_frames > 0 && tx_frames > 0,
        )
    }

    /// A transmit ring alone, of at least `tx_frames` slots of `tx_cap` bytes, on a socket
    /// that receives nothing ([`PacketSocket::open_sender`]), with the `virtio_net_hdr` that
    /// makes the kernel copy each frame into the skb's linear part (as the target's rings
    /// do; see the source of `with_slots`): on a veth, frames sent from the ring's pages as
    /// zero-copy fragments would be copied into new pages again (`skb_copy_ubufs`). A
    /// socket that receives would get the header before every frame it reads, which is why
    /// [`with_slots`](Self::with_slots) sets it only with both rings.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] for a socket bound to an ethertype (it receives) or
    /// no slots; else as [`new`](Self::new).
    pub fn sender(sock: &PacketSocket, tx_cap: usize, tx_frames: usize) -> io::Result<PacketRing> {
        if sock.ethertype() != 0 || tx_frames == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a sender ring needs slots and a socket that receives nothing",
            ));
        }
        Self::make(sock, 0, 0, tx_cap, tx_frames, true)
    }

    fn make(
        sock: &PacketSocket,
        rx_cap: usize,
        rx_frames: usize,
        tx_cap: usize,
        tx_frames: usize,
        want_vnet: bool,
    ) -> io::Result<PacketRing> {
        if rx_frames == 0 && tx_frames == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a packet ring needs receive or transmit slots",
            ));
        }
        // SAFETY: sysconf takes an integer and returns one.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|&p| p > 0)
            .unwrap_or(4096);
        let owned = sock.as_fd().try_clone_to_owned()?;
        let fd = owned.as_raw_fd();
        // With a transmit ring and nothing received outside the rings, a
        // virtio_net_hdr before each frame lets a transmitted frame say how much of it the
        // kernel copies into the skb (`hdr_len`): all of it. Without it
        // tpacket_snd attaches the ring's pages as zero-copy fragments, and veth, which may
        // not pass those on, copies them into newly allocated pages (`skb_copy_ubufs`):
        // 17% of the target's samples at MTU 1500. Best effort: without it, as before.
        let vnet = if want_vnet && set_int(fd, PACKET_VNET_HDR, 1).is_ok() {
            VNET_HDR_LEN
        } else {
            0
        };
        let rx = Geometry::new(rx_frames, rx_cap, RX_DATA_OFFSET + vnet, page);
        let tx = Geometry::new(tx_frames, tx_cap, TX_DATA_OFFSET + vnet, page);
        // A socket whose earlier ring was unmapped still holds it: free it first (a request
        // with no blocks), or the kernel refuses the new one with EBUSY.
        let none = TpacketReq {
            tp_block_size: 0,
            tp_block_nr: 0,
            tp_frame_size: 0,
            tp_frame_nr: 0,
        };
        let _ = set_req(fd, PACKET_RX_RING, &none);
        let _ = set_req(fd, PACKET_TX_RING, &none);
        set_int(fd, PACKET_VERSION, TPACKET_V2)?;
        // PACKET_LOSS: a frame the kernel cannot send (too long, malformed) is skipped and its
        // slot freed; without it tpacket_snd leaves the slot TP_STATUS_WRONG_FORMAT at the
        // ring's head and sends nothing after it until user space clears it.
        set_int(fd, PACKET_LOSS, 1)?;
        if rx.frame_nr() > 0 {
            set_req(fd, PACKET_RX_RING, &rx.req()?)?;
        }
        if tx.frame_nr() > 0 {
            if let Err(e) = set_req(fd, PACKET_TX_RING, &tx.req()?) {
                let _ = set_req(fd, PACKET_RX_RING, &none);
                return Err(e);
            }
        }
        let map_len = rx.bytes() + tx.bytes();
        // SAFETY: a fresh shared mapping of the socket's rings (RX first, then TX, as
        // packet_mmap.rst says for one mmap of both); the kernel checks the length against
        // the rings it just made. The result is checked before use.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            let _ = set_req(fd, PACKET_RX_RING, &none);
            let _ = set_req(fd, PACKET_TX_RING, &none);
            return Err(e);
        }
        let map = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(PacketRing {
            map,
            map_len,
            rx,
            tx,
            rx_head: 0,
            rx_lent: 0,
            rx_lent_from: 0,
            lent: Vec::with_capacity(rx.frame_nr()),
            held: vec![None; rx.frame_nr()],
            held_n: 0,
            tx_head: 0,
            rx_offs: rx.offsets(0),
            tx_offs: tx.offsets(rx.bytes()),
            tx_unkicked: 0,
            fd: owned,
            stats: RingStats::default(),
            vnet,
        })
    }

    /// Receive slots.
    pub fn rx_frames(&self) -> usize {
        self.rx.frame_nr()
    }

    /// Transmit slots.
    pub fn tx_frames(&self) -> usize {
        self.tx.frame_nr()
    }

    /// The largest frame a transmit slot holds.
    pub fn tx_frame_cap(&self) -> usize {
        self.tx.frame_size - self.tx_off()
    }

    /// True if each transmit slot carries a `virtio_net_hdr` (`PACKET_VNET_HDR`), so the
    /// kernel copies the frame into the skb's linear part rather than lending the slot's
    /// pages (see [`sender`](Self::sender)).
    pub fn has_vnet_hdr(&self) -> bool {
        self.vnet > 0
    }

    /// Where a transmitted frame starts in its slot: after the `virtio_net_hdr`, if any.
    fn tx_off(&self) -> usize {
        TX_DATA_OFFSET + self.vnet
    }

    /// Counters since the ring was made.
    pub fn stats(&self) -> RingStats {
        self.stats
    }

    /// The status word at the start of the slot at `off` bytes into the mapping.
    fn status(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off + TPACKET2_HDR_SIZE <= self.map_len && off % 16 == 0);
        // SAFETY: `off` is a slot start inside the mapping (16-aligned, so aligned for u32),
        // which lives as long as `self`; the kernel updates the word concurrently, which is
        // why it is only ever accessed as an atomic.
        unsafe { AtomicU32::from_ptr(self.map.as_ptr().add(off).cast::<u32>()) }
    }

    /// A u32 or u16 field of a slot header the kernel has handed over (`TP_STATUS_USER`).
    fn read_u32(&self, off: usize) -> u32 {
        // SAFETY: inside the mapping, in a slot user space owns now; unaligned read is fine.
        unsafe { ptr::read_volatile(self.map.as_ptr().add(off).cast::<u32>()) }
    }

    fn read_u16(&self, off: usize) -> u16 {
        // SAFETY: as read_u32; offset 12 of a 16-aligned slot is 2-aligned.
        unsafe { ptr::read_volatile(self.map.as_ptr().add(off).cast::<u16>()) }
    }

    /// True if a frame waits in the receive ring that [`recv_batch`](Self::recv_batch) would
    /// lend first: one load of the next slot's status word, no system call. A loop that asks
    /// this before it sleeps in poll(2) or epoll_wait(2) saves the call whenever frames came
    /// while it worked (`packet_poll` answers from the same word: `tpacket_rcv` sets
    /// `TP_STATUS_USER` before it wakes the socket's waiters).
    pub fn rx_ready(&self) -> bool {
        if self.held.get(self.rx_head).is_some_and(Option::is_some) {
            return false;
        }
        let Some(&off) = self.rx_offs.get(self.rx_head) else {
            return false;
        };
        // Acquire: as in recv_batch, the frame is visible once its status is.
        self.status(off).load(Ordering::Acquire) & TP_STATUS_USER != 0
    }

    /// Gives the frames lent by the last call back to the kernel, then lends up to `max`
    /// frames that have arrived since, in arrival order; returns how many (0: none waiting).
    /// No system call.
    pub fn recv_batch(&mut self, max: usize) -> usize {
        self.release();
        let n = self.rx.frame_nr();
        self.rx_lent_from = self.rx_head;
        while n > 0 && self.lent.len() < max {
            if self.held[self.rx_head].is_some() {
                // Still held from an earlier lap: the kernel stops here too (it writes only
                // into TP_STATUS_KERNEL slots), so nothing newer lies beyond it.
                break;
            }
            let off = self.rx_offs[self.rx_head];
            // Acquire: the frame's bytes and header fields are visible once the status is.
            let st = self.status(off).load(Ordering::Acquire);
            if st & TP_STATUS_USER == 0 {
                break;
            }
            let wire = self.read_u32(off + 4) as usize; // tp_len
            let snap = self.read_u32(off + 8) as usize; // tp_snaplen
            let mac = usize::from(self.read_u16(off + 12)); // tp_mac

            // The kernel keeps tp_mac + tp_snaplen inside the slot; check rather than trust.
            let len = if mac + snap <= self.rx.frame_size {
                snap
            } else {
                0
            };
            let mut src = [0u8; 6];
            if len >= 12 {
                // SAFETY: bytes mac+6..mac+12 are inside the slot (len >= 12 checked above).
                unsafe {
                    ptr::copy_nonoverlapping(
                        self.map.as_ptr().add(off + mac + 6),
                        src.as_mut_ptr(),
                        6,
                    )
                };
            }
            let meta = RecvMeta {
                len,
                truncated: wire > len,
                src,
            };
            self.lent.push((off + mac, meta, wire));
            self.rx_head = wrap_add(self.rx_head, 1, n);
            self.rx_lent += 1;
        }
        self.lent.len()
    }

    /// Gives the frames lent by the last [`recv_batch`](Self::recv_batch) back to the kernel
    /// now rather than at the next call; [`frame`](Self::frame) lends nothing after it.
    ///
    /// A loop must do this before it sleeps in poll(2) or epoll_wait(2): `packet_poll`
    /// reports the socket readable while the slot before the kernel's next one is not
    /// `TP_STATUS_KERNEL` (net/packet/af_packet.c), so a frame still lent, however long
    /// ago it was read, ends the wait at once, one system call for nothing.
    pub fn release_lent(&mut self) {
        self.release();
    }

    fn release(&mut self) {
        let n = self.rx.frame_nr();
        for k in 0..self.rx_lent {
            let i = wrap_add(self.rx_lent_from, k, n);
            if self.held[i].is_some() {
                continue;
            }
            let off = self.rx_offs[i];
            // Release: our reads of the frame are done before the kernel may overwrite it.
            self.status(off).store(TP_STATUS_KERNEL, Ordering::Release);
        }
        self.rx_lent = 0;
        self.lent.clear();
    }

    /// Keeps frame `i` of the last [`recv_batch`](Self::recv_batch) out of the kernel's
    /// hands past the next call, until [`release_held`](Self::release_held); returns its
    /// slot. While a slot is held the kernel delivers into the slots before it only: when
    /// its head comes round to a held slot it drops what arrives (`tpacket_rcv` takes only
    /// a `TP_STATUS_KERNEL` slot, net/packet/af_packet.c), so a caller bounds how long and
    /// how far behind the head it holds one. `packet_poll` also calls the socket readable
    /// while the slot before the kernel's head is held.
    ///
    /// # Panics
    ///
    /// If `i >= len()`.
    pub fn hold(&mut self, i: usize) -> usize {
        let n = self.rx.frame_nr();
        let slot = (self.rx_lent_from + i) % n;
        let (off, meta, _) = self.lent[i];
        if self.held[slot].is_none() {
            self.held_n += 1;
        }
        self.held[slot] = Some((off, meta.len));
        slot
    }

    /// The frame held in receive slot `slot` ([`hold`](Self::hold)), or None if that slot is
    /// not held.
    pub fn held_frame(&self, slot: usize) -> Option<&[u8]> {
        let (off, len) = (*self.held.get(slot)?)?;
        // SAFETY: a held slot stays user-owned (release skips it, recv_batch stops at it)
        // until release_held, which takes &mut self; recv_batch checked off + len is inside.
        Some(unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(off), len) })
    }

    /// Gives a held slot back to the kernel (a slot not held: nothing).
    pub fn release_held(&mut self, slot: usize) {
        if let Some(h) = self.held.get_mut(slot) {
            if h.take().is_some() {
                self.held_n -= 1;
                let off = self.rx_offs[slot];
                // Release: our reads of the frame are done before the kernel may overwrite it.
                self.status(off).store(TP_STATUS_KERNEL, Ordering::Release);
            }
        }
    }

    /// Slots held now.
    pub fn held_count(&self) -> usize {
        self.held_n
    }

    /// True if receive slot `slot` is held.
    pub fn is_held(&self, slot: usize) -> bool {
        self.held.get(slot).is_some_and(Option::is_some)
    }

    /// Receive slots in the ring.
    pub fn rx_slots(&self) -> usize {
        self.rx.frame_nr()
    }

    /// The receive slot `ahead` slots past the next one [`recv_batch`](Self::recv_batch)
    /// looks at (0: that one), round the ring.
    pub fn rx_slot_ahead(&self, ahead: usize) -> usize {
        let n = self.rx.frame_nr().max(1);
        (self.rx_head + ahead) % n
    }

    /// Frames lent by the last [`recv_batch`](Self::recv_batch).
    pub fn len(&self) -> usize {
        self.lent.len()
    }

    /// True if the last [`recv_batch`](Self::recv_batch) lent nothing.
    pub fn is_empty(&self) -> bool {
        self.lent.is_empty()
    }

    /// Frame `i` of the last [`recv_batch`](Self::recv_batch), from its destination address
    /// on (`meta(i).len` bytes).
    ///
    /// # Panics
    ///
    /// If `i >= len()`, like slice indexing.
    pub fn frame(&self, i: usize) -> &[u8] {
        let (off, meta, _) = self.lent[i];
        // SAFETY: the slot is user-owned until the next recv_batch (which needs &mut self,
        // so this borrow has ended by then); recv_batch checked off + len is inside it.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(off), meta.len) }
    }

    /// Metadata of frame `i` of the last [`recv_batch`](Self::recv_batch).
    ///
    /// # Panics
    ///
    /// If `i >= len()`.
    pub fn meta(&self, i: usize) -> RecvMeta {
        self.lent[i].1
    }

    /// Length on the wire of frame `i` of the last [`recv_batch`](Self::recv_batch): more than
    /// `meta(i).len` when the slot kept only its start (`tp_len`, packet_mmap.rst).
    ///
    /// # Panics
    ///
    /// If `i >= len()`.
    pub fn wire_len(&self, i: usize) -> usize {
        self.lent[i].2
    }

    /// Copies `frame` into the next free transmit slot and marks it for sending; it goes out
    /// at the next [`kick`](Self::kick). Returns false, copying nothing, when the ring is full
    /// (the kernel still holds the next slot).
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] if `frame` is longer than
    /// [`tx_frame_cap`](Self::tx_frame_cap).
    pub fn push(&mut self, frame: &[u8]) -> io::Result<bool> {
        self.push_parts(&[frame])
    }

    /// Like [`push`](Self::push) for a frame in parts (headers, then data), copied into the
    /// slot back to back.
    ///
    /// # Errors
    ///
    /// As [`push`](Self::push), for the parts' total length.
    pub fn push_parts(&mut self, parts: &[&[u8]]) -> io::Result<bool> {
        let len = parts.iter().map(|p| p.len()).sum();
        self.check_len(len)?;
        let Some(off) = self.free_tx_slot() else {
            return Ok(false);
        };
        let mut at = off + self.tx_off();
        for p in parts {
            // SAFETY: the slot is free (the kernel does not touch it until we mark it), and
            // the parts together fit after its header (checked above), so each lands
            // inside it; `p` is a separate borrow, not in the mapping's free slot.
            unsafe {
                ptr::copy_nonoverlapping(p.as_ptr(), self.map.as_ptr().add(at), p.len());
            }
            at += p.len();
        }
        self.mark(off, len);
        Ok(true)
    }

    /// Frame `i` of the last [`recv_batch`](Self::recv_batch), and the data area of the next
    /// free transmit slot ([`tx_frame_cap`](Self::tx_frame_cap) bytes; `None` when the ring
    /// is full), so a reply is built in place while the request is read: no buffer, no copy.
    /// The slot goes out only once [`commit`](Self::commit)ted; until then it stays free and
    /// the next call lends it again.
    ///
    /// # Panics
    ///
    /// If `i >= len()`, like slice indexing.
    pub fn frame_and_slot(&mut self, i: usize) -> (&[u8], Option<&mut [u8]>) {
        self.frame_and_slot_ahead(i, 0)
    }

    /// Like [`frame_and_slot`](Self::frame_and_slot), with the transmit slot `ahead` places
    /// after the next free one, so several replies of one batch can be built before any is
    /// committed (the target reads their data with one `io_uring_enter`). `None` if that
    /// slot is not free; callers ask for `ahead` = 0, 1, 2, ... in turn and stop at the first
    /// `None`, so every slot before it is free too. Commit them in order with
    /// [`commit_from`](Self::commit_from).
    ///
    /// # Panics
    ///
    /// If `i >= len()`, like slice indexing.
    pub fn frame_and_slot_ahead(&mut self, i: usize, ahead: usize) -> (&[u8], Option<&mut [u8]>) {
        let (off, meta, _) = self.lent[i];
        let slot = self.free_tx_slot_ahead(ahead);
        let cap = self.tx_frame_cap();
        let data = self.tx_off();
        let base = self.map.as_ptr();
        // SAFETY: the receive slot is user-owned until the next recv_batch (which needs
        // &mut self, so these borrows have ended by then) and recv_batch checked off + len
        // is inside it; the transmit slot is free (the kernel does not touch it until it is
        // marked, which needs &mut self too) and `cap` bytes after its header are inside
        // it. The two do not overlap: the receive ring ends where the transmit ring begins.
        unsafe {
            (
                std::slice::from_raw_parts(base.add(off), meta.len),
                slot.map(|o| std::slice::from_raw_parts_mut(base.add(o + data), cap)),
            )
        }
    }

    /// Hints the CPU ([`crate::prefetch`]) to fetch the first two cache lines of the
    /// transmit slot `ahead` places after the next free one: its status word (which
    /// [`frame_and_slot_ahead`](Self::frame_and_slot_ahead) reads) and the reply header a
    /// caller writes after it (with the vnet header, data from byte 42 to 78 at least). The
    /// kernel wrote the status word last, on whichever CPU freed the sent frame
    /// (`TP_STATUS_AVAILABLE`, packet_mmap.rst), so the slot's first touch is a cache miss;
    /// hinted a few replies ahead it comes in while the replies before it are built. A
    /// `prefetchw` (the line owned, for the stores that follow) measured no better than
    /// this `prefetcht0` (docs/PERFORMANCE.md, session 31). Nothing is read or written; a
    /// slot past the ring's size is not hinted.
    #[inline]
    pub fn prefetch_tx_slot(&self, ahead: usize) {
        let n = self.tx.frame_nr();
        if ahead >= n {
            return;
        }
        let off = self.tx_offs[wrap_add(self.tx_head, ahead, n)];
        let p = self.map.as_ptr().cast_const().wrapping_add(off);
        crate::prefetch(p);
        crate::prefetch(p.wrapping_add(64));
    }

    /// The data area of the transmit slot `ahead` places after the next free one
    /// ([`tx_frame_cap`](Self::tx_frame_cap) bytes), if that slot is free.
    pub fn slot_ahead(&mut self, ahead: usize) -> Option<&mut [u8]> {
        let off = self.free_tx_slot_ahead(ahead)?;
        let cap = self.tx_frame_cap();
        // SAFETY: as in frame_and_slot_ahead: a free transmit slot, `cap` data bytes inside
        // it, borrowed mutably from `self` so nothing marks it meanwhile.
        Some(unsafe {
            std::slice::from_raw_parts_mut(self.map.as_ptr().add(off + self.tx_off()), cap)
        })
    }

    /// Pointer to `len` bytes at `at` in the data area of the free transmit slot `ahead`
    /// places after the next free one, for a read the kernel does into it (`crate::uring`).
    /// `None` if the slot is not free or the range is not inside its data area.
    pub(crate) fn slot_ptr_ahead(
        &mut self,
        ahead: usize,
        at: usize,
        len: usize,
    ) -> Option<*mut u8> {
        let off = self.free_tx_slot_ahead(ahead)?;
        if at.checked_add(len)? > self.tx_frame_cap() {
            return None;
        }
        // SAFETY: off + tx_off + at + len is inside the slot (checked above), so inside the
        // mapping.
        Some(unsafe { self.map.as_ptr().add(off + self.tx_off() + at) })
    }

    /// Marks the slot [`frame_and_slot`](Self::frame_and_slot) lent, holding a frame of `len`
    /// bytes, for sending; it goes out at the next [`kick`](Self::kick).
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] if `len` is longer than
    /// [`tx_frame_cap`](Self::tx_frame_cap); [`io::ErrorKind::WouldBlock`] if the ring is
    /// full (no slot was lent).
    pub fn commit(&mut self, len: usize) -> io::Result<()> {
        self.commit_from(0, len)
    }

    /// Marks the next free slot for sending with the frame of `len` bytes built in the slot
    /// `ahead` places after it ([`frame_and_slot_ahead`](Self::frame_and_slot_ahead)),
    /// copied down first when `ahead` > 0: the kernel sends slots in order and stops at the
    /// first one not marked, so a reply whose slot was given up (its read went elsewhere)
    /// must not leave a hole.
    ///
    /// # Errors
    ///
    /// As [`commit`](Self::commit); [`io::ErrorKind::WouldBlock`] also if the slot `ahead`
    /// is not free.
    pub fn commit_from(&mut self, ahead: usize, len: usize) -> io::Result<()> {
        self.check_len(len)?;
        let (Some(off), Some(from)) = (self.free_tx_slot(), self.free_tx_slot_ahead(ahead)) else {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "no free transmit slot to commit",
            ));
        };
        if from != off {
            // SAFETY: both slots are free (the kernel does not touch them until marked) and
            // distinct, and `len` bytes fit each one's data area (check_len).
            unsafe {
                let base = self.map.as_ptr();
                let data = self.tx_off();
                ptr::copy_nonoverlapping(base.add(from + data), base.add(off + data), len);
            }
        }
        self.mark(off, len);
        Ok(())
    }

    fn check_len(&self, len: usize) -> io::Result<()> {
        if len > self.tx_frame_cap() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "frame of {len} bytes does not fit a {}-byte ring slot",
                    self.tx_frame_cap()
                ),
            ));
        }
        Ok(())
    }

    /// Offset of the next transmit slot if the kernel has let go of it: sent
    /// (`TP_STATUS_AVAILABLE`), or refused and skipped (`TP_STATUS_WRONG_FORMAT` with
    /// `PACKET_LOSS`).
    fn free_tx_slot(&self) -> Option<usize> {
        self.free_tx_slot_ahead(0)
    }

    /// Offset of the transmit slot `ahead` places after the next one, if the kernel has let
    /// go of it (as [`free_tx_slot`](Self::free_tx_slot)); `None` past the ring's size.
    fn free_tx_slot_ahead(&self, ahead: usize) -> Option<usize> {
        let n = self.tx.frame_nr();
        if ahead >= n {
            return None;
        }
        let off = self.tx_offs[wrap_add(self.tx_head, ahead, n)];
        let st = self.status(off).load(Ordering::Acquire);
        (st == TP_STATUS_AVAILABLE || st == TP_STATUS_WRONG_FORMAT).then_some(off)
    }

    /// Marks the free slot at `off`, its first `len` data bytes written, for sending.
    fn mark(&mut self, off: usize, len: usize) {
        if self.status(off).load(Ordering::Acquire) == TP_STATUS_WRONG_FORMAT {
            self.stats.tx_rejected += 1;
        }
        if self.vnet > 0 {
            // virtio_net_hdr: no checksum offload, no GSO; hdr_len, the bytes tpacket_snd
            // copies into the skb's linear part: the whole frame. Measured against keeping
            // the fragments past 2048 bytes (MTU 9000, pinned): 0.66x the target's CPU for
            // 4 KiB random reads, 0.86x for 8.5 KiB reads.
            let mut h = [0u8; VNET_HDR_LEN];
            // (Past 65535 bytes, which no MTU gives, the rest would go as fragments.)
            let hdr_len = u16::try_from(len).unwrap_or(u16::MAX);
            h[2..4].copy_from_slice(&hdr_len.to_ne_bytes());
            // SAFETY: the header's bytes are inside the free slot, before its frame data.
            unsafe {
                ptr::copy_nonoverlapping(
                    h.as_ptr(),
                    self.map.as_ptr().add(off + TX_DATA_OFFSET),
                    VNET_HDR_LEN,
                )
            };
        }
        // SAFETY: tp_len (u32 at offset 4) of a free slot inside the mapping; `len` was
        // checked against the slot size, which fits a u32.
        unsafe {
            ptr::write_volatile(
                self.map.as_ptr().add(off + 4).cast::<u32>(),
                (len + self.vnet) as u32,
            )
        };
        // Release: data and length are visible to the kernel before the request is.
        self.status(off)
            .store(TP_STATUS_SEND_REQUEST, Ordering::Release);
        self.tx_head = wrap_add(self.tx_head, 1, self.tx.frame_nr());
        self.tx_unkicked += 1;
        self.stats.tx_marked += 1;
    }

    /// True if frames were pushed that no [`kick`](Self::kick) has sent yet.
    pub fn needs_kick(&self) -> bool {
        self.tx_unkicked > 0
    }

    /// Asks the kernel to send every marked slot: `send(fd, NULL, 0, MSG_DONTWAIT)`, again
    /// while it makes progress and frames are left.
    ///
    /// The kernel (`tpacket_snd`) stops at the first frame it cannot charge to the socket's
    /// send buffer (frames still queued below, in a qdisc or a slow device, hold it) and
    /// returns the bytes it sent so far, a success: the frames after stay marked. So after
    /// each send the marked slots are looked at again; those the kernel has not taken are
    /// kicked once more, and if it takes none of them the kick reports `WouldBlock` with
    /// [`needs_kick`](Self::needs_kick) still true.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::WouldBlock`] when the device queue or the send buffer is full
    /// (`ENOBUFS`, `EAGAIN`, or a send that took none of the frames left): those stay
    /// marked, and a later kick sends them. The kernel signals no `POLLOUT` for them (that
    /// says only that the next slot is free): retry on a short timer. `EINTR` is retried.
    pub fn kick(&mut self) -> io::Result<()> {
        let full = || io::Error::new(io::ErrorKind::WouldBlock, "transmit queue full (ENOBUFS)");
        while self.tx_unkicked > 0 {
            // SAFETY: a NULL buffer of length 0 is what tpacket_snd expects from a kick; the
            // kernel reads the frames from the mapped ring, which outlives the call.
            let ret =
                unsafe { libc::send(self.fd.as_raw_fd(), ptr::null(), 0, libc::MSG_DONTWAIT) };
            match cvt_size(ret) {
                Ok(_) => {
                    let left = self.tx_still_requested();
                    if left == 0 {
                        self.tx_unkicked = 0;
                        return Ok(());
                    }
                    let progress = left < self.tx_unkicked;
                    self.tx_unkicked = left;
                    if !progress {
                        return Err(full());
                    }
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) | Some(libc::EAGAIN) => return Err(full()),
                    _ => return Err(e),
                },
            }
        }
        Ok(())
    }

    /// How many of the last `tx_unkicked` marked slots the kernel has not taken yet (still
    /// `TP_STATUS_SEND_REQUEST`). The kernel sends marked slots in ring order and stops at
    /// the first it cannot take, so these are the newest: the count says which.
    fn tx_still_requested(&self) -> usize {
        let n = self.tx.frame_nr();
        (1..=self.tx_unkicked.min(n))
            .map(|back| (self.tx_head + n - back) % n)
            .map(|i| self.rx.bytes() + self.tx.slot(i))
            .filter(|&off| self.status(off).load(Ordering::Acquire) == TP_STATUS_SEND_REQUEST)
            .count()
    }
}

/// One part of a vectored read into transmit slots ([`PacketRing::preadv_into_slots`]):
/// `len` bytes at `at` in the data area of the free slot `ahead` places after the next
/// free one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotPart {
    /// The slot, counted from the next free one as in
    /// [`slot_ahead`](PacketRing::slot_ahead).
    pub ahead: usize,
    /// Where in the slot's data area the bytes go.
    pub at: usize,
    /// How many bytes.
    pub len: usize,
}

/// Parts of one [`PacketRing::preadv_into_slots`] at most (a receive batch of the target).
pub const MAX_SLOT_PARTS: usize = 64;

impl PacketRing {
    /// Reads the bytes of `file` from `offset` on into the transmit slots `parts` name, one
    /// part after the other, with one `preadv2` (`RWF_NOWAIT` if `nowait`): the contiguous
    /// reads of a receive batch cost one system call and one walk of the page cache instead
    /// of one each. `Done(n)`: the first `n` bytes arrived (fewer than the parts hold if only
    /// part was cached, or at the end of the file); the parts past them are untouched.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] for more than [`MAX_SLOT_PARTS`] parts, parts whose
    /// slots are not free, not in increasing order (so no two iovecs share a slot) or whose
    /// range is outside a slot's data area, and an offset past `off_t`; else the read's own
    /// error (`WouldBlock` and `Unsupported` as [`crate::pread_nowait`]).
    pub fn preadv_into_slots(
        &mut self,
        file: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        parts: &[SlotPart],
        nowait: bool,
    ) -> io::Result<crate::NoWait> {
        let invalid = || io::Error::from(io::ErrorKind::InvalidInput);
        if parts.len() > MAX_SLOT_PARTS {
            return Err(invalid());
        }
        // Left uninitialized past `parts.len()`: zeroing all of it (1 KiB) was a memset per
        // read run for a run of one or two reads at window 16 (2026-12-04 profile).
        let mut v = [const { std::mem::MaybeUninit::<libc::iovec>::uninit() }; MAX_SLOT_PARTS];
        let mut prev = None;
        for (iov, p) in v.iter_mut().zip(parts) {
            if prev.is_some_and(|a| p.ahead <= a) {
                return Err(invalid());
            }
            prev = Some(p.ahead);
            let ptr = self
                .slot_ptr_ahead(p.ahead, p.at, p.len)
                .ok_or_else(invalid)?;
            iov.write(libc::iovec {
                iov_base: ptr.cast(),
                iov_len: p.len,
            });
        }
        let off = libc::off_t::try_from(offset).map_err(|_| invalid())?;
        let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
        loop {
            // SAFETY: each iovec points at `len` bytes inside the data area of a distinct
            // free transmit slot (checked by slot_ptr_ahead; distinct as the slots are in
            // increasing order), which the kernel does not touch until a slot is marked,
            // and `self` is borrowed mutably for the call so nothing marks one meanwhile.
            // The first `parts.len()` entries of `v` were written by the loop above (it
            // returned on any part it could not write), and the kernel reads no more.
            let r = unsafe {
                libc::preadv2(
                    file.as_raw_fd(),
                    v.as_ptr().cast::<libc::iovec>(),
                    parts.len() as libc::c_int,
                    off,
                    flags,
                )
            };
            if r < 0 && !nowait && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return crate::file::nowait_result(r);
        }
    }
}

impl Drop for PacketRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of that length, unmapped once; no borrow of it
        // can outlive `self`.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.map_len) };
        // Unmapped, the rings can be freed (a request with no blocks, packet_set_ring), so
        // the socket receives through recv again. The kernel refuses (EBUSY) to free a
        // transmit ring with frames still in flight; the socket then keeps it until closed.
        let none = TpacketReq {
            tp_block_size: 0,
            tp_block_nr: 0,
            tp_frame_size: 0,
            tp_frame_nr: 0,
        };
        let _ = set_req(self.fd.as_raw_fd(), PACKET_RX_RING, &none);
        let _ = set_req(self.fd.as_raw_fd(), PACKET_TX_RING, &none);
    }
}

impl std::fmt::Debug for PacketRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketRing")
            .field("rx", &self.rx)
            .field("tx", &self.tx)
            .field("lent", &self.lent.len())
            .finish_non_exhaustive()
    }
}

pub(crate) fn set_int(fd: libc::c_int, name: libc::c_int, val: libc::c_int) -> io::Result<()> {
    // SAFETY: `val` is a readable c_int whose size is passed; it outlives the call.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            name,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn set_req(fd: libc::c_int, name: libc::c_int, req: &TpacketReq) -> io::Result<()> {
    // SAFETY: `req` is a readable tpacket_req whose size is passed; it outlives the call.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            name,
            (req as *const TpacketReq).cast(),
            std::mem::size_of::<TpacketReq>() as libc::socklen_t,
        )
    })
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The offset table the ring looks slots up in is the computed one, slot for slot,
    /// and moving a position on without a division wraps as `%` does.
    #[test]
    fn slot_offsets_and_wrapping_match_the_division() {
        let g = Geometry::new(1024, 1514, RX_DATA_OFFSET, 4096);
        let offs = g.offsets(4096);
        assert_eq!(offs.len(), g.frame_nr());
        for (i, &o) in offs.iter().enumerate() {
            assert_eq!(o, 4096 + g.slot(i));
        }
        for n in [1, 2, 81, 1053] {
            for a in 0..n {
                for b in [0, 1, n / 2, n - 1, n] {
                    assert_eq!(wrap_add(a, b, n), (a + b) % n, "{a} + {b} mod {n}");
                }
            }
        }
    }

    #[test]
    fn geometry_keeps_frames_inside_blocks() {
        for (data, off) in [
            (1514, RX_DATA_OFFSET),
            (9014, RX_DATA_OFFSET),
            (9014, TX_DATA_OFFSET),
        ] {
            let g = Geometry::new(1000, data, off, 4096);
            assert_eq!(g.frame_size % TPACKET_ALIGNMENT, 0);
            assert!(g.frame_size >= off + data);
            assert_eq!(g.block_size % 4096, 0);
            assert!(g.per_block * g.frame_size <= g.block_size);
            assert!(g.frame_nr() >= 1000);
            let last = g.slot(g.frame_nr() - 1);
            assert!(last + g.frame_size <= g.bytes());
        }
        // 1514 + 80 bytes: 1600-byte slots, 81 to a 128 KiB block.
        let g = Geometry::new(1024, 1514, RX_DATA_OFFSET, 4096);
        assert_eq!(
            (g.frame_size, g.block_size, g.per_block),
            (1600, 131072, 81)
        );
        assert_eq!(g.slot(81), 131072);
        // No frames: no blocks, the kernel's "no ring".
        let g = Geometry::new(0, 64, RX_DATA_OFFSET, 4096);
        assert_eq!((g.block_nr, g.frame_nr(), g.bytes()), (0, 0, 0));
        // Issue 15, MTU 65535: 65,549-byte frames in 65,632-byte slots. With 128 KiB blocks
        // one slot fitted each and 1024 slots took 128 MiB (before `block_size`:
        // (65632, 131072, 1)); 1 MiB blocks of 15 take 69 MiB.
        let g = Geometry::new(1024, 65_549, RX_DATA_OFFSET, 4096);
        assert_eq!(
            (g.frame_size, g.block_size, g.per_block),
            (65632, 1 << 20, 15)
        );
        assert_eq!(g.bytes(), 69 << 20);
        // 1500 and 9000 keep their 128 KiB blocks, receiving and sending.
        for (data, off) in [
            (1514, RX_DATA_OFFSET),
            (9014, RX_DATA_OFFSET),
            (9014, TX_DATA_OFFSET + VNET_HDR_LEN),
        ] {
            assert_eq!(Geometry::new(1024, data, off, 4096).block_size, 128 << 10);
        }
        // Every MTU up to veth's largest wastes at most a sixteenth of a block, or the
        // largest block is used.
        for mtu in (1500..=65535).step_by(97) {
            let g = Geometry::new(64, mtu + 14, RX_DATA_OFFSET, 4096);
            assert!(g.per_block >= 1);
            assert!(
                (g.block_size - g.per_block * g.frame_size) * 16 <= g.block_size
                    || g.block_size == MAX_BLOCK,
                "MTU {mtu}: {g:?}"
            );
            assert!(g.block_size.is_power_of_two(), "MTU {mtu}: {g:?}");
        }
        // A frame larger than 128 KiB still gets a block of its own.
        let g = Geometry::new(2, 200_000, TX_DATA_OFFSET, 4096);
        assert_eq!(g.per_block, 1);
        assert!(g.block_size >= 200_032);
    }

    #[test]
    fn ring_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<PacketRing>();
    }
}
