//! AF_XDP (Documentation/networking/af_xdp.rst) with no libbpf: an `XSKMAP`, a hand-assembled
//! XDP program that redirects AoE frames into it, a `BPF_LINK_CREATE` attachment, and one
//! `AF_XDP` socket with its UMEM and four rings, behind the same receive-lend / build-in-slot
//! / kick shape as [`PacketRing`](crate::PacketRing).
//!
//! The program, in eBPF assembly (the `xdp_md` context: `data` at 0, `data_end` at 4,
//! `rx_queue_index` at 16, include/uapi/linux/bpf.h):
//!
//! ```text
//!  0: r2 = *(u32 *)(r1 + 0)          data
//!  1: r3 = *(u32 *)(r1 + 4)          data_end
//!  2: r4 = r2
//!  3: r4 += 14
//!  4: if r4 > r3 goto 13             shorter than an Ethernet header: pass
//!  5: r4 = *(u16 *)(r2 + 12)         ethertype, as stored (big-endian)
//!  6: if r4 != 0x88a2 goto 13        (compared in the host's byte order) not AoE: pass
//!  7: r2 = *(u32 *)(r1 + 16)         rx_queue_index: the XSKMAP key
//!  8: r1 = map[xsks] ll              (two instructions, BPF_PSEUDO_MAP_FD)
//! 10: r3 = XDP_PASS                  flags: the action when no socket sits at that key
//! 11: call bpf_redirect_map
//! 12: exit
//! 13: r0 = XDP_PASS
//! 14: exit
//! ```
//!
//! It is loaded with `BPF_F_XDP_HAS_FRAGS`, which veth requires for native XDP on a link whose
//! MTU does not fit one page (veth_xdp_set: "peer MTU is too large to set XDP"), and the socket
//! is bound with `XDP_USE_SG`, so a frame larger than a UMEM chunk arrives and leaves as a
//! chain of descriptors (`XDP_PKT_CONTD`). veth has no zero-copy AF_XDP: the kernel copies each
//! frame into the UMEM on receive and out of it on transmit (`XDP_COPY`), and transmits through
//! `xsk_generic_xmit` (a `sendto` kick, at most 32 frames per call).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{fence, AtomicU32, Ordering};

use crate::{cvt, interface_info};

// <linux/bpf.h>
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_F_XDP_HAS_FRAGS: u32 = 1 << 5;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const BPF_FUNC_REDIRECT_MAP: i32 = 51;
const XDP_PASS: i32 = 2;
// <linux/if_link.h>
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
// <linux/if_xdp.h>
const SOL_XDP: libc::c_int = 283;
const XDP_MMAP_OFFSETS: libc::c_int = 1;
const XDP_RX_RING: libc::c_int = 2;
const XDP_TX_RING: libc::c_int = 3;
const XDP_UMEM_REG: libc::c_int = 4;
const XDP_UMEM_FILL_RING: libc::c_int = 5;
const XDP_UMEM_COMPLETION_RING: libc::c_int = 6;
const XDP_STATISTICS: libc::c_int = 7;
const XDP_COPY: u16 = 1 << 1;
const XDP_USE_NEED_WAKEUP: u16 = 1 << 3;
const XDP_USE_SG: u16 = 1 << 4;
const XDP_RING_NEED_WAKEUP: u32 = 1;
const XDP_PKT_CONTD: u32 = 1;
const XDP_PGOFF_RX_RING: libc::off_t = 0;
const XDP_PGOFF_TX_RING: libc::off_t = 0x8000_0000;
const XDP_UMEM_PGOFF_FILL_RING: libc::off_t = 0x1_0000_0000;
const XDP_UMEM_PGOFF_COMPLETION_RING: libc::off_t = 0x1_8000_0000;
/// Room the kernel keeps before a received frame in its chunk (`XDP_PACKET_HEADROOM`).
const XDP_PACKET_HEADROOM: usize = 256;
/// The longest frame a socket takes: a chain of at most 16 page-sized chunks, within the
/// kernel's `MAX_SKB_FRAGS` (17) fragments of a transmitted frame.
const MAX_FRAME: usize = 16 * 4096;
/// Frames `xsk_generic_xmit` sends per `sendto` (`TX_BATCH_SIZE` in net/xdp/xsk.c).
const KICK_BATCH: usize = 32;

/// Which XDP hook the program runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// The driver's own hook (`XDP_FLAGS_DRV_MODE`): on veth, frames the peer sends arrive as
    /// `xdp_frame`s in veth's NAPI ring, and no socket buffer is built for an AoE frame.
    Native,
    /// The generic hook (`XDP_FLAGS_SKB_MODE`) in `netif_receive_skb`: every frame has become
    /// a socket buffer already; the program runs on it and the copy into the UMEM follows.
    Generic,
}

/// Which hook [`XdpSocket::open`] should attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpModeWanted {
    /// Native, and generic if the interface refuses native (the socket's
    /// [`mode`](XdpSocket::mode) says which it got).
    Auto,
    /// Only this one; an error if the interface refuses it.
    Only(XdpMode),
}

/// Sizes of an [`XdpSocket`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpConfig {
    /// The largest frame to receive or send (see [`frame_capacity`](crate::frame_capacity)).
    pub frame_cap: usize,
    /// Receive descriptors (the RX and fill rings; rounded up to a power of two).
    pub rx_frames: usize,
    /// Transmit slots of `frame_cap` bytes (rounded up to a power of two).
    pub tx_frames: usize,
    /// The hook to attach to.
    pub mode: XdpModeWanted,
}

/// Counters of an [`XdpSocket`]: the kernel's `XDP_STATISTICS` and our own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XdpStats {
    /// Frames the kernel dropped for other reasons (e.g. longer than the chain it may build).
    pub rx_dropped: u64,
    /// Frames dropped because the RX ring was full.
    pub rx_ring_full: u64,
    /// Times the kernel found the fill ring empty.
    pub rx_fill_ring_empty: u64,
    /// Transmit descriptors the kernel rejected.
    pub tx_invalid: u64,
}

/// One mapped AF_XDP ring: a producer index, a consumer index, a flags word and `size`
/// entries of `T` (a `u64` UMEM address for the fill and completion rings, an [`XdpDesc`] for
/// RX and TX), laid out at the offsets `XDP_MMAP_OFFSETS` reports.
struct Ring<T> {
    map: NonNull<u8>,
    map_len: usize,
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    ring: NonNull<T>,
    mask: u32,
    /// Our copy of the index we own (producer of fill/TX, consumer of RX/completion).
    ours: u32,
}

/// `struct xdp_desc`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct XdpDesc {
    addr: u64,
    len: u32,
    options: u32,
}

/// `struct xdp_ring_offset`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RingOffset {
    producer: u64,
    consumer: u64,
    desc: u64,
    flags: u64,
}

/// `struct xdp_mmap_offsets`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MmapOffsets {
    rx: RingOffset,
    tx: RingOffset,
    fr: RingOffset,
    cr: RingOffset,
}

impl<T: Copy> Ring<T> {
    /// Maps the ring of `size` entries at page offset `pgoff` of the socket `fd`.
    fn map(fd: RawFd, off: &RingOffset, size: u32, pgoff: libc::off_t) -> io::Result<Ring<T>> {
        let map_len = usize::try_from(off.desc).map_err(io::Error::other)?
            + size as usize * std::mem::size_of::<T>();
        // SAFETY: a fresh shared mapping of one of the socket's rings, whose size the kernel
        // checks against the ring it made; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                pgoff,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        let at = |o: u64| -> io::Result<NonNull<u8>> {
            let o = usize::try_from(o).map_err(io::Error::other)?;
            if o + 4 > map_len {
                return Err(io::Error::other("XDP_MMAP_OFFSETS outside the ring"));
            }
            // SAFETY: inside the mapping (checked just above).
            Ok(unsafe { NonNull::new_unchecked(map.as_ptr().add(o)) })
        };
        let ring = Ring {
            map,
            map_len,
            producer: at(off.producer)?.cast(),
            consumer: at(off.consumer)?.cast(),
            flags: at(off.flags)?.cast(),
            ring: at(off.desc)?.cast(),
            mask: size - 1,
            ours: 0,
        };
        Ok(ring)
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: a 4-aligned word inside the mapping (kernel-given offset), alive as long
        // as self; the kernel writes it concurrently, so it is only accessed atomically.
        unsafe { self.producer.as_ref() }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as producer().
        unsafe { self.consumer.as_ref() }
    }

    fn needs_wakeup(&self) -> bool {
        // The index stores before this load must be visible to the kernel first
        // (af_xdp.rst, need_wakeup: a full barrier, as libxdp's xsk_ring_prod__needs_wakeup).
        fence(Ordering::SeqCst);
        // SAFETY: as producer().
        unsafe { self.flags.as_ref() }.load(Ordering::Relaxed) & XDP_RING_NEED_WAKEUP != 0
    }

    fn size(&self) -> u32 {
        self.mask + 1
    }

    /// Producer side: free entries.
    fn free(&self) -> u32 {
        self.size()
            - self
                .ours
                .wrapping_sub(self.consumer().load(Ordering::Acquire))
    }

    /// Producer side: writes the entry at `ours` (not yet published).
    fn put(&mut self, v: T) {
        let i = (self.ours & self.mask) as usize;
        // SAFETY: index below size: inside the entry array; the entry is ours until the
        // producer index passes it (free() was checked by the caller).
        unsafe { ptr::write_volatile(self.ring.as_ptr().add(i), v) };
        self.ours = self.ours.wrapping_add(1);
    }

    /// Producer side: publishes the entries put so far.
    fn submit(&self) {
        self.producer().store(self.ours, Ordering::Release);
    }

    /// Consumer side: entries waiting.
    fn ready(&self) -> u32 {
        self.producer()
            .load(Ordering::Acquire)
            .wrapping_sub(self.ours)
    }

    /// Consumer side: reads the next entry (the caller checked `ready()`).
    fn take(&mut self) -> T {
        let i = (self.ours & self.mask) as usize;
        // SAFETY: index below size; the kernel published the entry (producer index, read
        // with Acquire, is past it) and does not touch it until we move the consumer index.
        let v = unsafe { ptr::read_volatile(self.ring.as_ptr().add(i)) };
        self.ours = self.ours.wrapping_add(1);
        v
    }

    /// Consumer side: hands back the entries taken so far.
    fn release(&self) {
        self.consumer().store(self.ours, Ordering::Release);
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.map_len) };
    }
}

/// Where a lent frame lies: in a UMEM chunk, or gathered from a descriptor chain into
/// `scratch`.
#[derive(Clone, Copy)]
enum Lent {
    Umem { off: usize, len: usize },
    Scratch { off: usize, len: usize },
}

/// An AF_XDP socket bound to queue 0 of one interface, with its UMEM and rings, and the XDP
/// program that steers AoE frames (ethertype 0x88A2, AoEr11 §2) to it; every other frame goes
/// on to the kernel's stack as before.
///
/// Receiving: [`recv_batch`](Self::recv_batch) takes the frames the kernel has put in the RX
/// ring (no system call) and lends them through [`frame`](Self::frame) until the next
/// `recv_batch`, which gives their chunks back through the fill ring. `poll(POLLIN)` on
/// [`as_raw_fd`](Self::as_raw_fd) reports a frame waiting.
///
/// Sending: [`frame_and_slot`](Self::frame_and_slot) and [`commit`](Self::commit) build a
/// reply in a free transmit slot of the UMEM, [`push`](Self::push) copies one in, and
/// [`kick`](Self::kick) has the kernel send them (`sendto`, as many as needed). A slot is free
/// again once the kernel reports it in the completion ring.
///
/// Dropping it detaches the program (closing the link) and closes the socket and the map.
pub struct XdpSocket {
    // Field order is drop order: the link first (the program leaves the interface), then the
    // rings, the socket and the UMEM.
    _link: OwnedFd,
    _prog: OwnedFd,
    _map: OwnedFd,
    mode: XdpMode,
    rx: Ring<XdpDesc>,
    tx: Ring<XdpDesc>,
    fill: Ring<u64>,
    comp: Ring<u64>,
    fd: OwnedFd,
    /// Last: unmapped after the socket that registered it is closed.
    umem: Umem,
    umem_len: usize,
    chunk: usize,
    /// Chunks per transmit slot (a frame longer than a chunk goes out as a chain).
    slot_chunks: usize,
    tx_cap: usize,
    /// Free transmit slots (UMEM offsets).
    tx_free: Vec<u64>,
    /// Transmit descriptors published since the last kick that sent them all.
    tx_unkicked: usize,
    /// Chunks of the frames lent by the last recv_batch, to return to the fill ring.
    rx_held: Vec<u64>,
    lent: Vec<Lent>,
    scratch: Vec<u8>,
    /// Chunks of a chain not yet complete at the end of a batch.
    partial: Vec<XdpDesc>,
    /// Slots sent, by first chunk address, waiting for their last chunk's completion: the
    /// completion ring reports chunks; a slot is free once all of its chunks are.
    pending_chunks: Vec<u32>,
    stats_tx_invalid_local: u64,
}

// SAFETY: the mappings are owned (unmapped on drop) and only written through `&mut self`;
// moving the socket to another thread is as safe as moving a Vec.
unsafe impl Send for XdpSocket {}

impl XdpSocket {
    /// Loads the program, attaches it to `ifname` (see [`XdpModeWanted`]), and opens an
    /// AF_XDP socket on its queue 0 with a UMEM sized by `cfg`; AoE frames arrive in this
    /// socket from then on, everything else goes to the stack.
    ///
    /// # Errors
    ///
    /// `EPERM` without `CAP_BPF`/`CAP_NET_ADMIN` (run as root), "unsupported" errors on a
    /// kernel without `CONFIG_XDP_SOCKETS` (`EAFNOSUPPORT`) or the bpf syscall (`ENOSYS`),
    /// `EBUSY` if another XDP program is attached to the interface, the verifier's log if the
    /// program is refused, or any error of the socket options and mappings; each names the
    /// step and the interface. Nothing is left attached after an error.
    pub fn open(ifname: &str, cfg: XdpConfig) -> io::Result<XdpSocket> {
        if cfg.frame_cap < crate::ETH_HLEN
            || cfg.frame_cap > MAX_FRAME
            || cfg.rx_frames == 0
            || cfg.tx_frames == 0
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "AF_XDP on {ifname}: frames of {} bytes (14 to {MAX_FRAME}), {} receive and \
                     {} transmit slots (at least 1 each)",
                    cfg.frame_cap, cfg.rx_frames, cfg.tx_frames
                ),
            ));
        }
        let info = interface_info(ifname)?;
        let ctx = |step: &str, e: io::Error| explain(ifname, step, e);
        // A received frame lands XDP_PACKET_HEADROOM into its chunk: 2 KiB chunks fit an
        // MTU-1500 frame, 4 KiB ones (the largest the kernel takes without huge pages) hold
        // the rest as a chain.
        let chunk = if cfg.frame_cap + XDP_PACKET_HEADROOM <= 2048 {
            2048
        } else {
            4096
        };
        let slot_chunks = cfg.frame_cap.div_ceil(chunk);
        let rx_n = pow2(cfg.rx_frames)?;
        let tx_n = pow2(cfg.tx_frames)?;
        // Room in the TX and completion rings for every chunk of every slot.
        let tx_ring_n = pow2(tx_n as usize * slot_chunks)?.max(KICK_BATCH as u32);
        // Fill-ring chunks (RX) first, then the transmit slots.
        let umem_chunks = rx_n as usize + tx_n as usize * slot_chunks;
        let umem_len = umem_chunks * chunk;

        let map = bpf_map_create().map_err(|e| ctx("creating the XSKMAP", e))?;
        let prog = bpf_prog_load(map.as_raw_fd()).map_err(|e| ctx("loading the program", e))?;

        // SAFETY: socket() takes integers and returns a new descriptor or -1.
        let fd = cvt(unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) })
            .map_err(|e| ctx("opening the AF_XDP socket", e))?;
        // SAFETY: a descriptor socket() just returned, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();

        // SAFETY: an anonymous private mapping, checked before use; page-aligned as
        // XDP_UMEM_REG requires.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                umem_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(ctx("mapping the UMEM", io::Error::last_os_error()));
        }
        let umem = Umem(
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?,
            umem_len,
        );

        #[repr(C)]
        struct UmemReg {
            addr: u64,
            len: u64,
            chunk_size: u32,
            headroom: u32,
            flags: u32,
            tx_metadata_len: u32,
        }
        let reg = UmemReg {
            addr: umem.0.as_ptr() as u64,
            len: umem_len as u64,
            chunk_size: chunk as u32,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        setsockopt(raw, XDP_UMEM_REG, &reg).map_err(|e| ctx("registering the UMEM", e))?;
        setsockopt(raw, XDP_UMEM_FILL_RING, &rx_n).map_err(|e| ctx("sizing the fill ring", e))?;
        setsockopt(raw, XDP_UMEM_COMPLETION_RING, &tx_ring_n)
            .map_err(|e| ctx("sizing the completion ring", e))?;
        setsockopt(raw, XDP_RX_RING, &rx_n).map_err(|e| ctx("sizing the RX ring", e))?;
        setsockopt(raw, XDP_TX_RING, &tx_ring_n).map_err(|e| ctx("sizing the TX ring", e))?;
        let mut off = MmapOffsets::default();
        let mut len = std::mem::size_of::<MmapOffsets>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `off`, a plain struct of u64s.
        cvt(unsafe {
            libc::getsockopt(
                raw,
                SOL_XDP,
                XDP_MMAP_OFFSETS,
                (&mut off as *mut MmapOffsets).cast(),
                &mut len,
            )
        })
        .map_err(|e| ctx("reading XDP_MMAP_OFFSETS", e))?;
        let rx = Ring::map(raw, &off.rx, rx_n, XDP_PGOFF_RX_RING)
            .map_err(|e| ctx("mapping the RX ring", e))?;
        let tx = Ring::map(raw, &off.tx, tx_ring_n, XDP_PGOFF_TX_RING)
            .map_err(|e| ctx("mapping the TX ring", e))?;
        let mut fill = Ring::<u64>::map(raw, &off.fr, rx_n, XDP_UMEM_PGOFF_FILL_RING)
            .map_err(|e| ctx("mapping the fill ring", e))?;
        let comp = Ring::<u64>::map(raw, &off.cr, tx_ring_n, XDP_UMEM_PGOFF_COMPLETION_RING)
            .map_err(|e| ctx("mapping the completion ring", e))?;
        for i in 0..rx_n as u64 {
            fill.put(i * chunk as u64);
        }
        fill.submit();

        #[repr(C)]
        struct SockaddrXdp {
            family: u16,
            flags: u16,
            ifindex: u32,
            queue_id: u32,
            shared_umem_fd: u32,
        }
        let sa = SockaddrXdp {
            family: libc::AF_XDP as u16,
            flags: XDP_COPY | XDP_USE_NEED_WAKEUP | XDP_USE_SG,
            ifindex: info.index,
            queue_id: 0,
            shared_umem_fd: 0,
        };
        // SAFETY: bind reads `size_of::<SockaddrXdp>()` bytes of `sa`, a sockaddr_xdp.
        cvt(unsafe {
            libc::bind(
                raw,
                (&sa as *const SockaddrXdp).cast(),
                std::mem::size_of::<SockaddrXdp>() as libc::socklen_t,
            )
        })
        .map_err(|e| ctx("binding the AF_XDP socket to queue 0", e))?;
        bpf_map_update(map.as_raw_fd(), 0, raw as u32)
            .map_err(|e| ctx("inserting the socket into the XSKMAP", e))?;

        let (link, mode) = match cfg.mode {
            XdpModeWanted::Only(m) => (bpf_link_xdp(prog.as_raw_fd(), info.index, m), m),
            XdpModeWanted::Auto => {
                match bpf_link_xdp(prog.as_raw_fd(), info.index, XdpMode::Native) {
                    Ok(l) => (Ok(l), XdpMode::Native),
                    Err(_) => (
                        bpf_link_xdp(prog.as_raw_fd(), info.index, XdpMode::Generic),
                        XdpMode::Generic,
                    ),
                }
            }
        };
        let link = link.map_err(|e| ctx(&format!("attaching the program ({mode:?} mode)"), e))?;

        let tx_free = (0..tx_n as u64)
            .rev()
            .map(|i| (rx_n as u64 + i * slot_chunks as u64) * chunk as u64)
            .collect();
        Ok(XdpSocket {
            _link: link,
            _prog: prog,
            _map: map,
            mode,
            rx,
            tx,
            fill,
            comp,
            fd,
            umem,
            umem_len,
            chunk,
            slot_chunks,
            tx_cap: cfg.frame_cap,
            tx_free,
            tx_unkicked: 0,
            rx_held: Vec::with_capacity(rx_n as usize),
            lent: Vec::with_capacity(rx_n as usize),
            scratch: Vec::new(),
            partial: Vec::new(),
            pending_chunks: vec![0; tx_n as usize],
            stats_tx_invalid_local: 0,
        })
    }

    /// The hook the program runs at.
    pub fn mode(&self) -> XdpMode {
        self.mode
    }

    /// The socket's descriptor, for `poll` (`POLLIN`: a frame waits in the RX ring).
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The largest frame a transmit slot holds.
    pub fn tx_frame_cap(&self) -> usize {
        self.tx_cap
    }

    /// Gives the chunks of the frames lent by the last call back to the kernel (fill ring),
    /// then lends up to `max` frames that have arrived since; returns how many. No system call
    /// (unless the kernel asked for a wake-up of the fill ring, `need_wakeup`).
    pub fn recv_batch(&mut self, max: usize) -> usize {
        for a in self.rx_held.drain(..) {
            // The fill ring has room for every chunk of the RX share: each held chunk came
            // out of it.
            self.fill.put(a);
        }
        self.fill.submit();
        if self.fill.needs_wakeup() {
            // SAFETY: a zero-length recvfrom with no buffer is the wake-up af_xdp.rst
            // documents for the fill ring; the result does not matter.
            unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    ptr::null_mut(),
                    0,
                    libc::MSG_DONTWAIT,
                    ptr::null_mut(),
                    ptr::null_mut(),
                )
            };
        }
        self.lent.clear();
        self.scratch.clear();
        let ready = self.rx.ready() as usize;
        let mut taken = 0;
        while taken < ready && self.lent.len() < max {
            let d = self.rx.take();
            taken += 1;
            if d.options & XDP_PKT_CONTD != 0 || !self.partial.is_empty() {
                // A chain: its chunks stay out of the fill ring until its last one came.
                self.partial.push(d);
                if d.options & XDP_PKT_CONTD != 0 {
                    continue;
                }
                let off = self.scratch.len();
                for p in std::mem::take(&mut self.partial) {
                    let (o, l) = (p.addr as usize, p.len as usize);
                    let part = self.umem.slice(o, l);
                    self.scratch.extend_from_slice(part);
                    self.rx_held.push(chunk_base(p.addr, self.chunk));
                }
                let len = self.scratch.len() - off;
                self.lent.push(Lent::Scratch { off, len });
            } else {
                self.rx_held.push(chunk_base(d.addr, self.chunk));
                self.lent.push(Lent::Umem {
                    off: d.addr as usize,
                    len: d.len as usize,
                });
            }
        }
        self.rx.release();
        self.lent.len()
    }

    /// Frames lent by the last [`recv_batch`](Self::recv_batch).
    pub fn len(&self) -> usize {
        self.lent.len()
    }

    /// True if the last [`recv_batch`](Self::recv_batch) lent nothing.
    pub fn is_empty(&self) -> bool {
        self.lent.is_empty()
    }

    /// Frame `i` of the last [`recv_batch`](Self::recv_batch).
    ///
    /// # Panics
    ///
    /// If `i >= len()`, like slice indexing.
    pub fn frame(&self, i: usize) -> &[u8] {
        match self.lent[i] {
            Lent::Umem { off, len } => self.umem.slice(off, len),
            Lent::Scratch { off, len } => &self.scratch[off..off + len],
        }
    }

    /// Frame `i` of the last [`recv_batch`](Self::recv_batch) and a free transmit slot of
    /// [`tx_frame_cap`](Self::tx_frame_cap) bytes (`None` while every slot is in flight), so a
    /// reply is built in place while the request is read. The slot goes out only once
    /// [`commit`](Self::commit)ted; until then the next call lends it again.
    ///
    /// # Panics
    ///
    /// If `i >= len()`, like slice indexing.
    pub fn frame_and_slot(&mut self, i: usize) -> (&[u8], Option<&mut [u8]>) {
        self.reap();
        let slot = self.tx_free.last().copied();
        let cap = self.tx_cap;
        let frame: *const [u8] = self.frame(i);
        let base = self.umem.0.as_ptr();
        // SAFETY: the frame is a receive chunk or scratch, both owned by self and not
        // touched until the next &mut call; the slot is a free transmit slot (the kernel
        // gave it back through the completion ring), `cap` bytes inside the UMEM (its
        // chunks follow each other), disjoint from every receive chunk.
        unsafe {
            (
                &*frame,
                slot.map(|o| std::slice::from_raw_parts_mut(base.add(o as usize), cap)),
            )
        }
    }

    /// Publishes the slot [`frame_and_slot`](Self::frame_and_slot) lent, holding a frame of
    /// `len` bytes, in the TX ring; it goes out at the next [`kick`](Self::kick).
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] if `len` is 0 or over
    /// [`tx_frame_cap`](Self::tx_frame_cap); [`io::ErrorKind::WouldBlock`] if no slot is free.
    pub fn commit(&mut self, len: usize) -> io::Result<()> {
        if len == 0 || len > self.tx_cap {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("frame of {len} bytes for a {}-byte XDP slot", self.tx_cap),
            ));
        }
        let Some(&slot) = self.tx_free.last() else {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "no free XDP transmit slot",
            ));
        };
        let descs = len.div_ceil(self.chunk);
        if (self.tx.free() as usize) < descs {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "XDP transmit ring full",
            ));
        }
        self.tx_free.pop();
        let mut left = len;
        for k in 0..descs {
            let part = left.min(self.chunk);
            left -= part;
            self.tx.put(XdpDesc {
                addr: slot + (k * self.chunk) as u64,
                len: part as u32,
                options: if left > 0 { XDP_PKT_CONTD } else { 0 },
            });
        }
        let idx = self.slot_index(slot);
        self.pending_chunks[idx] = descs as u32;
        self.tx.submit();
        self.tx_unkicked += descs;
        Ok(())
    }

    /// Copies `frame` into a free transmit slot and publishes it; false (nothing copied) if
    /// no slot is free.
    ///
    /// # Errors
    ///
    /// As [`commit`](Self::commit).
    pub fn push(&mut self, frame: &[u8]) -> io::Result<bool> {
        self.reap();
        let Some(&slot) = self.tx_free.last() else {
            return Ok(false);
        };
        if frame.is_empty() || frame.len() > self.tx_cap {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "frame of {} bytes for a {}-byte XDP slot",
                    frame.len(),
                    self.tx_cap
                ),
            ));
        }
        // SAFETY: a free slot of tx_cap bytes inside the UMEM (see frame_and_slot), and the
        // frame fits (checked).
        unsafe {
            ptr::copy_nonoverlapping(
                frame.as_ptr(),
                self.umem.0.as_ptr().add(slot as usize),
                frame.len(),
            )
        };
        match self.commit(frame.len()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn slot_index(&self, addr: u64) -> usize {
        let rx_bytes = (self.rx.size() as usize) * self.chunk;
        (addr as usize - rx_bytes) / (self.slot_chunks * self.chunk)
    }

    /// Takes the completion ring's chunks: a slot is free once all of its chunks are back.
    fn reap(&mut self) {
        let n = self.comp.ready();
        for _ in 0..n {
            let a = chunk_base(self.comp.take(), self.chunk);
            let rx_bytes = (self.rx.size() as usize * self.chunk) as u64;
            if a < rx_bytes || a as usize >= self.umem_len {
                self.stats_tx_invalid_local += 1;
                continue;
            }
            let slot_bytes = (self.slot_chunks * self.chunk) as u64;
            let slot = rx_bytes + (a - rx_bytes) / slot_bytes * slot_bytes;
            let idx = self.slot_index(slot);
            if self.pending_chunks[idx] > 0 {
                self.pending_chunks[idx] -= 1;
                if self.pending_chunks[idx] == 0 {
                    self.tx_free.push(slot);
                }
            }
        }
        if n > 0 {
            self.comp.release();
        }
    }

    /// True if frames were committed that no [`kick`](Self::kick) has sent yet.
    pub fn needs_kick(&self) -> bool {
        self.tx_unkicked > 0
    }

    /// Has the kernel send what the TX ring holds: `sendto(fd, NULL, 0, MSG_DONTWAIT)` until
    /// it has taken every descriptor (each call sends at most 32 in copy mode, the only mode
    /// veth has). Then frees the slots it completed.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::WouldBlock`] when three calls in a row took nothing (a full device
    /// queue: `EAGAIN`, `EBUSY`, `ENOBUFS`): what is left goes at the next kick. Any other
    /// error of `sendto`.
    pub fn kick(&mut self) -> io::Result<()> {
        // Calls that took nothing (a full device queue, or the kernel returning early) are
        // counted; a few in a row and the rest waits for the next kick.
        let mut idle = 0;
        while self.tx_unkicked > 0 {
            // Copy mode (all veth offers) sends only from sendmsg, whatever the ring's
            // need_wakeup flag says: no check, always the system call.
            // SAFETY: a zero-length sendto with no buffer is the TX wake-up of af_xdp.rst;
            // the kernel reads the frames from the UMEM, which outlives the call.
            let ret = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                    ptr::null(),
                    0,
                )
            };
            let err = (ret < 0).then(io::Error::last_os_error);
            let pending = self
                .tx
                .ours
                .wrapping_sub(self.tx.consumer().load(Ordering::Acquire))
                as usize;
            if pending < self.tx_unkicked {
                idle = 0;
            } else {
                idle += 1;
            }
            self.tx_unkicked = pending;
            match err.as_ref().and_then(io::Error::raw_os_error) {
                None | Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                | Some(libc::ENOBUFS) => {}
                Some(_) => return Err(err.unwrap_or_else(|| io::Error::other("sendto"))),
            }
            if idle >= 3 && self.tx_unkicked > 0 {
                self.reap();
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "XDP transmit queue full",
                ));
            }
        }
        self.reap();
        Ok(())
    }

    /// The kernel's counters for this socket, and ours.
    ///
    /// # Errors
    ///
    /// Any error of `getsockopt(XDP_STATISTICS)`.
    pub fn stats(&self) -> io::Result<XdpStats> {
        let mut s = [0u64; 6];
        let mut len = std::mem::size_of_val(&s) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into the array (struct
        // xdp_statistics is six u64 counters; older kernels write fewer).
        cvt(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                SOL_XDP,
                XDP_STATISTICS,
                s.as_mut_ptr().cast(),
                &mut len,
            )
        })?;
        Ok(XdpStats {
            rx_dropped: s[0] + s[1],
            rx_ring_full: s[3],
            rx_fill_ring_empty: s[4],
            tx_invalid: s[2] + self.stats_tx_invalid_local,
        })
    }
}

/// The UMEM mapping, unmapped on drop (after the socket, by field order).
struct Umem(NonNull<u8>, usize);

impl Umem {
    /// `len` bytes at `off`, lent by the socket (a received chunk, user space's until it goes
    /// back to the fill ring, which needs `&mut` of the socket).
    ///
    /// # Panics
    ///
    /// If the range leaves the UMEM (a descriptor the kernel would never write).
    fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.1),
            "descriptor outside the UMEM"
        );
        // SAFETY: inside the mapping (checked), which lives as long as self.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().add(off), len) }
    }
}

impl Drop for Umem {
    fn drop(&mut self) {
        // SAFETY: the anonymous mapping made in XdpSocket::open, unmapped once, when no
        // slice of it is lent any more (lending borrows the socket).
        unsafe { libc::munmap(self.0.as_ptr().cast(), self.1) };
    }
}

fn chunk_base(addr: u64, chunk: usize) -> u64 {
    addr & !(chunk as u64 - 1)
}

fn pow2(n: usize) -> io::Result<u32> {
    n.checked_next_power_of_two()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n <= 1 << 20)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "XDP ring too large"))
}

/// Adds the interface, the step and, for the usual causes, what to do.
fn explain(ifname: &str, step: &str, e: io::Error) -> io::Error {
    let hint = match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => " (needs CAP_BPF and CAP_NET_ADMIN: run as root)",
        Some(libc::ENOSYS) | Some(libc::EAFNOSUPPORT) => {
            " (this kernel has no bpf(2) or AF_XDP: CONFIG_BPF_SYSCALL, CONFIG_XDP_SOCKETS)"
        }
        Some(libc::EOPNOTSUPP) => " (the interface does not support this XDP mode)",
        Some(libc::EBUSY) | Some(libc::EEXIST) => {
            " (another XDP program or AF_XDP socket holds the interface)"
        }
        _ => "",
    };
    io::Error::new(e.kind(), format!("AF_XDP on {ifname}: {step}: {e}{hint}"))
}

fn setsockopt<T>(fd: RawFd, opt: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: the kernel reads size_of::<T>() bytes of `v`, a plain C struct or integer.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            SOL_XDP,
            opt,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// bpf(2) with `attr`, a prefix of `union bpf_attr` for `cmd` (the kernel zero-fills the rest).
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: the kernel reads (and for some commands writes) size_of::<T>() bytes of
    // `attr`, a #[repr(C)] prefix of union bpf_attr for this command.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    let fd = cvt(libc::c_int::try_from(ret).map_err(io::Error::other)?)?;
    // SAFETY: for the commands used with it (map create, program load, link create) a
    // non-negative result is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bpf_map_create() -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
    }
    let mut name = [0u8; 16];
    name[..8].copy_from_slice(b"aoe_xsks");
    bpf(
        BPF_MAP_CREATE,
        &mut Attr {
            map_type: BPF_MAP_TYPE_XSKMAP,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            map_flags: 0,
            inner_map_fd: 0,
            numa_node: 0,
            map_name: name,
        },
    )
}

fn bpf_map_update(map: RawFd, key: u32, value: u32) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut attr = Attr {
        map_fd: map as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: &value as *const u32 as u64,
        flags: 0,
    };
    // SAFETY: the kernel reads the attr and the two u32s it points to, all alive here.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_ELEM,
            (&mut attr as *mut Attr).cast::<libc::c_void>(),
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One `struct bpf_insn`: opcode, dst register (low nibble) and src register (high nibble),
/// offset, immediate.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// The program of the module docs, with the map's descriptor in its `ld_imm64`.
fn program(map_fd: RawFd) -> [Insn; 15] {
    const LDXW: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
    const LDXH: u8 = 0x69; // BPF_LDX | BPF_MEM | BPF_H
    const MOV64X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
    const MOV64K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const ADD64K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
    const JGTX: u8 = 0x2d; // BPF_JMP | BPF_JGT | BPF_X
    const JNEK: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
    const LDDW: u8 = 0x18; // BPF_LD | BPF_DW | BPF_IMM
    const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
    const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
                           // The ethertype as a u16 load sees it: its big-endian bytes read in the host's order.
    let aoe = i32::from(u16::from_ne_bytes(crate::ETH_P_AOE.to_be_bytes()));
    [
        insn(LDXW, 2, 1, 0, 0),
        insn(LDXW, 3, 1, 4, 0),
        insn(MOV64X, 4, 2, 0, 0),
        insn(ADD64K, 4, 0, 0, crate::ETH_HLEN as i32),
        insn(JGTX, 4, 3, 8, 0),
        insn(LDXH, 4, 2, 12, 0),
        insn(JNEK, 4, 0, 6, aoe),
        insn(LDXW, 2, 1, 16, 0),
        insn(LDDW, 1, BPF_PSEUDO_MAP_FD, 0, map_fd),
        insn(0, 0, 0, 0, 0),
        insn(MOV64K, 3, 0, 0, XDP_PASS),
        insn(CALL, 0, 0, 0, BPF_FUNC_REDIRECT_MAP),
        insn(EXIT, 0, 0, 0, 0),
        insn(MOV64K, 0, 0, 0, XDP_PASS),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

fn bpf_prog_load(map_fd: RawFd) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let insns = program(map_fd);
    // The kernel only needs a license string; ours (the helper used is not GPL-only).
    let license = b"MIT OR Apache-2.0\0";
    let mut name = [0u8; 16];
    name[..7].copy_from_slice(b"aoe_xdp");
    let mut log = vec![0u8; 0];
    let mut attr = Attr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: BPF_F_XDP_HAS_FRAGS,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: BPF_XDP,
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(fd),
        Err(e)
            if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::EACCES) =>
        {
            // Again with the verifier's log, for the error message.
            log.resize(1 << 16, 0);
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let again = bpf(BPF_PROG_LOAD, &mut attr);
            let text =
                String::from_utf8_lossy(&log[..log.iter().position(|&b| b == 0).unwrap_or(0)])
                    .trim()
                    .to_string();
            match again {
                Ok(fd) => Ok(fd),
                Err(_) => Err(io::Error::new(e.kind(), format!("{e}; verifier: {text}"))),
            }
        }
        Err(e) => Err(e),
    }
}

fn bpf_link_xdp(prog: RawFd, ifindex: u32, mode: XdpMode) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
    }
    bpf(
        BPF_LINK_CREATE,
        &mut Attr {
            prog_fd: prog as u32,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            flags: match mode {
                XdpMode::Native => XDP_FLAGS_DRV_MODE,
                XdpMode::Generic => XDP_FLAGS_SKB_MODE,
            },
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_jumps_land_on_the_pass_exit() {
        let p = program(7);
        // Both conditional jumps (4 and 6) target instruction 13, r0 = XDP_PASS.
        assert_eq!(4 + 1 + p[4].off as usize, 13);
        assert_eq!(6 + 1 + p[6].off as usize, 13);
        assert_eq!((p[13].code, p[13].imm), (0xb7, XDP_PASS));
        // The map load carries the descriptor and the pseudo-map source register.
        assert_eq!((p[8].imm, p[8].regs >> 4), (7, BPF_PSEUDO_MAP_FD));
        // The ethertype compared is 0x88A2 as stored on the wire.
        assert_eq!((p[6].imm as u16).to_ne_bytes(), [0x88, 0xa2]);
    }

    #[test]
    fn rings_round_to_powers_of_two() {
        assert_eq!(pow2(1).unwrap(), 1);
        assert_eq!(pow2(100).unwrap(), 128);
        assert!(pow2(usize::MAX).is_err());
    }

    #[test]
    fn bad_sizes_are_refused_before_anything_is_opened() {
        // No interface is looked up (this one does not exist), nothing is loaded.
        for (cap, rx, tx) in [
            (10, 16, 16),
            (MAX_FRAME + 1, 16, 16),
            (1514, 0, 16),
            (1514, 16, 0),
        ] {
            let cfg = XdpConfig {
                frame_cap: cap,
                rx_frames: rx,
                tx_frames: tx,
                mode: XdpModeWanted::Auto,
            };
            let e = XdpSocket::open("nosuchif0", cfg).err().expect("refused");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
            assert!(e.to_string().contains("nosuchif0"), "{e}");
        }
    }

    #[test]
    fn chunk_base_masks_the_offset() {
        assert_eq!(chunk_base(2048 + 256, 2048), 2048);
        assert_eq!(chunk_base(4096 * 3 + 17, 4096), 4096 * 3);
    }
}
