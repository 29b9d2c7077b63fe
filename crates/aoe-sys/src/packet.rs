//! `AF_PACKET` raw sockets bound to one interface and one ethertype (packet(7)).

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

use crate::iface::{info_by_index, info_by_name, InterfaceInfo};
use crate::ring::VNET_HDR_LEN;
use crate::{cvt, cvt_size, ETH_P_AOE};

/// What the kernel told us about one received frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecvMeta {
    /// Bytes of the frame stored in the buffer, starting with the Ethernet destination address.
    /// Never more than the buffer's length, so `&buf[..meta.len]` cannot panic.
    pub len: usize,
    /// The frame was longer than the buffer and its tail was cut off (the kernel reports the
    /// full length because we pass `MSG_TRUNC`, packet(7)).
    pub truncated: bool,
    /// Source MAC address, from the `sll_addr` of the `sockaddr_ll` the kernel filled in.
    pub src: [u8; 6],
}

/// Counters from `PACKET_STATISTICS` (packet(7)); reading them resets them in the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketStats {
    /// Frames that passed the filter since the last read, including dropped ones.
    pub packets: u32,
    /// Frames dropped since the last read because the receive buffer was full.
    pub drops: u32,
}

/// `struct tpacket_stats` from `<linux/if_packet.h>` (not in the libc crate).
#[repr(C)]
#[derive(Default)]
struct TpacketStats {
    tp_packets: libc::c_uint,
    tp_drops: libc::c_uint,
}

/// Snap length returned by the filter's accept instruction: accept the whole frame.
/// (`tcpdump -dd ether proto 0x88a2` uses the same 262144.)
const BPF_ACCEPT_LEN: u32 = 0x4_0000;

/// The classic BPF program that accepts only frames whose ethertype is `ethertype`:
///
/// ```text
/// ldh [12]                  ; A = ethertype (bytes 12..14 of the Ethernet header)
/// jeq #ethertype, 0, 1      ; equal: fall through, else skip one
/// ret #262144               ; accept the whole frame
/// ret #0                    ; drop
/// ```
fn ethertype_filter(ethertype: u16) -> [libc::sock_filter; 4] {
    // Opcode values from <linux/filter.h> / <linux/bpf_common.h>; all fit in 16 bits.
    let ldh_abs = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
    let jeq_k = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let ret_k = (libc::BPF_RET | libc::BPF_K) as u16;
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    [
        insn(ldh_abs, 0, 0, 12),
        insn(jeq_k, 0, 1, u32::from(ethertype)),
        insn(ret_k, 0, 0, BPF_ACCEPT_LEN),
        insn(ret_k, 0, 0, 0),
    ]
}

/// The AoE response flag in the header's version/flags byte (AoEr11 section 2: `R`, bit 3
/// of the low nibble; `aoe_wire`'s `FLAG_RESPONSE`).
const AOE_FLAG_RESPONSE: u32 = 0x08;

/// The classic BPF program of [`PacketSocket::open_responses`]: AoE frames with the response
/// flag set, nothing else (a frame too short to have the flags byte is dropped, as a load
/// past the end ends a classic BPF program with 0):
///
/// ```text
/// ldh [12]                  ; A = ethertype
/// jeq #0x88a2, 0, 3         ; AoE: fall through, else drop
/// ldb [14]                  ; A = version/flags byte of the AoE header
/// jset #0x08, 0, 1          ; response flag set: accept, else drop
/// ret #262144               ; accept the whole frame
/// ret #0                    ; drop
/// ```
fn response_filter() -> [libc::sock_filter; 6] {
    let ldh_abs = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
    let ldb_abs = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    let jeq_k = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let jset_k = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    let ret_k = (libc::BPF_RET | libc::BPF_K) as u16;
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    [
        insn(ldh_abs, 0, 0, 12),
        insn(jeq_k, 0, 3, u32::from(ETH_P_AOE)),
        insn(ldb_abs, 0, 0, 14),
        insn(jset_k, 0, 1, AOE_FLAG_RESPONSE),
        insn(ret_k, 0, 0, BPF_ACCEPT_LEN),
        insn(ret_k, 0, 0, 0),
    ]
}

/// The receive buffer that `aoe trace`, the tools' sockets ([`PacketSocket::open`] for
/// `aoecfg`, `aoeping`) and the initiator's interface sockets ask for
/// ([`PacketSocket::set_recv_buffer`]): 8 MiB. A broadcast Query Config is answered by
/// every export on the segment at once, and the kernel's default (212992 bytes, about 270
/// small frames on a veth link) dropped all but 256 of 1024 exports' answers to `aoecfg`
/// (session 35); 8 MiB holds more than 10000 such answers, or 920 frames of MTU 9000. A
/// wish: without `CAP_NET_ADMIN` `net.core.rmem_max` caps it. Until session 36 each of the
/// four callers wrote its own `8 << 20`.
pub const RECV_BUFFER_BYTES: usize = 8 << 20;

/// An `AF_PACKET`/`SOCK_RAW` socket bound to one interface that receives only frames of one
/// ethertype, by default AoE ([`ETH_P_AOE`]).
///
/// Frames are whole Ethernet frames in both directions: the caller reads and writes the
/// destination and source MAC addresses and the ethertype itself. The socket is non-blocking
/// (wait with [`poll`](crate::poll) on [`as_raw_fd`](AsRawFd::as_raw_fd)) and close-on-exec.
///
/// How the socket is set up so that nothing but AoE frames from the chosen interface is ever
/// queued to it:
///
/// 1. `socket(AF_PACKET, SOCK_RAW, 0)`: with protocol 0 the kernel delivers nothing yet
///    (packet(7): frames arrive only once a protocol is set by `socket` or `bind`), so frames of
///    other interfaces cannot slip in before `bind`.
/// 2. `SO_ATTACH_FILTER` with a 4-instruction classic BPF program that accepts only the
///    ethertype (see `ethertype_filter` in the source); attached before `bind`.
/// 3. Anything queued before the filter was attached is drained (with step 1 there should be
///    nothing; this guards against a kernel that behaves otherwise).
/// 4. `PACKET_IGNORE_OUTGOING` (Linux 4.20+), best effort: a socket bound to a single
///    ethertype does not see outgoing frames anyway (only `ETH_P_ALL` taps do), but this keeps
///    that true for [`ETH_P_ALL`](libc::ETH_P_ALL) sockets opened with
///    [`open_ethertype`](Self::open_ethertype).
/// 5. `bind` with `sll_ifindex` = the interface and `sll_protocol` = `htons(ethertype)`.
///
/// The socket lives in the network namespace of the thread that opened it, whichever thread
/// uses it afterwards.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    info: InterfaceInfo,
    ethertype: u16,
}

impl PacketSocket {
    /// Opens an AoE socket (ethertype [`ETH_P_AOE`]) on interface `ifname` of the calling
    /// thread's network namespace. Needs `CAP_NET_RAW`.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::NotFound`] naming the interface if it does not exist,
    /// [`io::ErrorKind::PermissionDenied`] without `CAP_NET_RAW`, or any other error of the
    /// system calls listed on [`PacketSocket`].
    pub fn open(ifname: &str) -> io::Result<PacketSocket> {
        Self::open_ethertype(ifname, ETH_P_AOE)
    }

    /// Like [`open`](Self::open) for another ethertype, e.g. 0x0800 to watch IPv4 in a test.
    ///
    /// With `ETH_P_ALL` (0x0003) no filter is attached and the socket sees every incoming frame
    /// of the interface (the filter would compare against 0x0003 and drop everything).
    pub fn open_ethertype(ifname: &str, ethertype: u16) -> io::Result<PacketSocket> {
        let sock = Self::open_unbound(ifname, ethertype)?;
        if libc::c_int::from(ethertype) != libc::ETH_P_ALL {
            sock.attach_filter(&ethertype_filter(ethertype))?;
        }
        sock.drain_queue();
        // Best effort: the option is missing before Linux 4.20 (ENOPROTOOPT) and changes
        // nothing for a socket bound to a single ethertype, so no error here is fatal.
        let _ = sock.setsockopt_int(libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1);
        sock.bind()?;
        Ok(sock)
    }

    /// Opens an AoE socket on `ifname` as [`open`](Self::open) does, with a
    /// [`PacketRing`](crate::PacketRing) of at least `frames` receive and as many transmit
    /// slots, each holding a frame of the interface's MTU
    /// ([`frame_capacity`](crate::frame_capacity), at least `min_frame` bytes), set up
    /// *before* the socket is bound.
    ///
    /// Why before: a ring set up on a bound socket takes it off the network meanwhile
    /// (`packet_set_ring` unregisters the protocol hook and waits in `synchronize_net`, an
    /// RCU grace period, milliseconds on a busy host, once per ring) and then purges its
    /// receive queue (`skb_queue_purge`), so the frames a peer sent right then are lost: the
    /// first Query Config after `aoe serve --io rings` started went unanswered. Bound
    /// afterwards, the socket delivers every frame from the bind on into the ring.
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open), and as [`PacketRing::new`](crate::PacketRing::new) when the
    /// rings cannot be set up (the socket is closed then; open one without rings instead).
    pub fn open_with_ring(
        ifname: &str,
        min_frame: usize,
        frames: usize,
    ) -> io::Result<(PacketSocket, crate::PacketRing)> {
        let sock = Self::open_unbound(ifname, ETH_P_AOE)?;
        sock.attach_filter(&ethertype_filter(ETH_P_AOE))?;
        let _ = sock.setsockopt_int(libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1);
        let cap = crate::frame_capacity(sock.info.mtu).max(min_frame);
        let ring = crate::PacketRing::new(&sock, cap, frames, frames)?;
        sock.bind()?;
        Ok((sock, ring))
    }

    /// Makes the socket take no more frames (a filter that accepts none); what it already
    /// holds stays readable. For handing an interface over to a new socket: bind the new
    /// one, stop the old one, read the old one until it is empty.
    ///
    /// # Errors
    ///
    /// Any error of `setsockopt(SO_ATTACH_FILTER)`.
    pub fn stop_receiving(&self) -> io::Result<()> {
        // BPF_RET | BPF_K with k = 0: keep 0 bytes, i.e. drop the frame.
        self.attach_filter(&[libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: 0,
        }])
    }

    /// Like [`open`](Self::open), for an initiator: an AoE socket whose filter also drops
    /// AoE requests (frames without the response flag), so a flood of requests on the
    /// segment (broadcast Query Configs, ATA requests for any target) never takes room in
    /// its receive queue from the answers it waits for. The kernel runs the filter before it
    /// queues a frame (socket(7), `SO_ATTACH_FILTER`), so a dropped request costs no
    /// wake-up, copy or queue space; nor is it counted in [`stats`](Self::stats).
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open).
    pub fn open_responses(ifname: &str) -> io::Result<PacketSocket> {
        let sock = Self::open_unbound(ifname, ETH_P_AOE)?;
        sock.attach_filter(&response_filter())?;
        sock.drain_queue();
        // Best effort, as in `open_ethertype`.
        let _ = sock.setsockopt_int(libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1);
        sock.bind()?;
        Ok(sock)
    }

    /// Opens a send-only raw socket on `ifname`: bound to the interface with protocol 0,
    /// so the kernel delivers nothing to it (packet(7): a packet socket receives only once a
    /// protocol is set), and with no filter to run. For a
    /// [`PacketRing::sender`](crate::PacketRing::sender) transmit ring beside a receiving
    /// socket on the same interface: while a socket has a transmit ring every send on it
    /// goes through the ring, so the receiving socket keeps `sendmmsg` for the frames the
    /// ring does not take. Its frames pass the interface's `ETH_P_ALL` taps (`aoe trace`,
    /// tcpdump) like any other; a socket bound to one ethertype does not see them.
    /// [`ethertype`](Self::ethertype) reports 0.
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open).
    pub fn open_sender(ifname: &str) -> io::Result<PacketSocket> {
        let sock = Self::open_unbound(ifname, 0)?;
        sock.bind()?;
        Ok(sock)
    }

    /// Opens a send-only socket like [`open_sender`](Self::open_sender) with
    /// `PACKET_VNET_HDR` set, for [`send_batch_linear`](Self::send_batch_linear): each frame
    /// goes behind a `virtio_net_hdr` whose `hdr_len` is the whole frame, and `packet_snd`
    /// (net/packet/af_packet.c) makes that many bytes the skb's linear part, so the frame
    /// is copied once from where it lies into one allocation. Without the header it copies
    /// all but the link-layer header into page fragments it allocates per frame
    /// (`alloc_skb_with_frags`), which a veth then delivers from.
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open); the `setsockopt(2)` error where the kernel has no
    /// `PACKET_VNET_HDR`.
    pub fn open_linear_sender(ifname: &str) -> io::Result<PacketSocket> {
        let sock = Self::open_sender(ifname)?;
        crate::ring::set_int(sock.fd.as_raw_fd(), crate::ring::PACKET_VNET_HDR, 1)?;
        Ok(sock)
    }

    /// Opens a capture tap for `aoe trace`: an `ETH_P_ALL` socket on `ifname` with the same
    /// ethertype filter as [`open`](Self::open), without `PACKET_IGNORE_OUTGOING`, so it sees
    /// the AoE frames the host sends as well as those it receives (packet(7): outgoing frames
    /// reach only `ETH_P_ALL` taps, as tcpdump's do). [`ethertype`](Self::ethertype) reports
    /// `ETH_P_ALL`, the bound protocol.
    pub fn open_tap(ifname: &str, ethertype: u16) -> io::Result<PacketSocket> {
        let sock = Self::open_unbound(ifname, libc::ETH_P_ALL as u16)?;
        sock.attach_filter(&ethertype_filter(ethertype))?;
        sock.drain_queue();
        sock.bind()?;
        Ok(sock)
    }

    /// The part [`open_ethertype`](Self::open_ethertype) and [`open_tap`](Self::open_tap)
    /// share: a non-blocking `AF_PACKET` raw socket and the interface `ifname` as seen from
    /// it, with `ethertype` as the protocol the caller will bind; no filter, not yet bound.
    fn open_unbound(ifname: &str, ethertype: u16) -> io::Result<PacketSocket> {
        // SAFETY: socket(2) takes only integers; the result is checked by cvt.
        let raw = cvt(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        })
        .map_err(raw_socket_refused)?;
        // SAFETY: `raw` was just returned by socket(2), is open and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Query through the packet socket itself so the answer is about its own namespace.
        let info = info_by_name(fd.as_raw_fd(), ifname)?;
        Ok(PacketSocket {
            fd,
            info,
            ethertype,
        })
    }

    /// The interface as it was when the socket was opened (or last
    /// [refreshed](Self::refresh_info)).
    pub fn info(&self) -> &InterfaceInfo {
        &self.info
    }

    /// The ethertype this socket is bound to ([`ETH_P_AOE`] unless opened with
    /// [`open_ethertype`](Self::open_ethertype)).
    pub fn ethertype(&self) -> u16 {
        self.ethertype
    }

    /// Re-reads the interface's name, MAC, MTU and flags (e.g. after `ip link set mtu` or
    /// `down`), looking it up by index in the socket's own namespace.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::NotFound`] if the interface has been deleted; the stored info is then
    /// left as it was.
    pub fn refresh_info(&mut self) -> io::Result<&InterfaceInfo> {
        self.info = info_by_index(self.fd.as_raw_fd(), self.info.index)?;
        Ok(&self.info)
    }

    /// Sets the receive buffer to `bytes` with `SO_RCVBUFFORCE` (needs `CAP_NET_ADMIN`, ignores
    /// `net.core.rmem_max`), falling back to `SO_RCVBUF` (capped by `rmem_max`) when not
    /// permitted. The kernel doubles the value for its bookkeeping (socket(7)).
    pub fn set_recv_buffer(&self, bytes: usize) -> io::Result<()> {
        self.set_buffer(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, bytes)
    }

    /// Sets the send buffer like [`set_recv_buffer`](Self::set_recv_buffer), with
    /// `SO_SNDBUFFORCE` falling back to `SO_SNDBUF`.
    pub fn set_send_buffer(&self, bytes: usize) -> io::Result<()> {
        self.set_buffer(libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, bytes)
    }

    /// `PACKET_QDISC_BYPASS` (packet(7), Linux 3.14+): hand frames straight to the driver,
    /// skipping the qdisc layer. Faster, but the caller then sees `ENOBUFS`/`WouldBlock` when
    /// the driver queue is full instead of the qdisc absorbing bursts.
    pub fn set_qdisc_bypass(&self, on: bool) -> io::Result<()> {
        self.setsockopt_int(
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            libc::c_int::from(on),
        )
    }

    /// Removes the ethertype filter (`SO_DETACH_FILTER`, socket(7)) from a socket bound to a
    /// single ethertype, where binding already limits delivery to that ethertype (packet(7):
    /// the kernel hands a bound socket only frames of its protocol), so the filter only
    /// repeats the check. It runs in the softirq of whoever sent the frame, which on a veth
    /// link is the peer's transmit path: `aoe bench` drops it so that the target it measures
    /// does not pay for it (about 1-2% of vblade's CPU per reply, perf record). Sockets bound
    /// to [`ETH_P_ALL`](libc::ETH_P_ALL) keep theirs, as without it they would see every
    /// frame.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] for an `ETH_P_ALL` socket; those of `setsockopt`
    /// (`ENOENT`: no filter attached).
    pub fn detach_filter(&self) -> io::Result<()> {
        if libc::c_int::from(self.ethertype) == libc::ETH_P_ALL {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an ETH_P_ALL socket needs its ethertype filter",
            ));
        }
        self.setsockopt_int(libc::SOL_SOCKET, libc::SO_DETACH_FILTER, 0)
    }

    /// Reads and clears the socket's pending error (`SO_ERROR`, socket(7)); `Ok(None)` if
    /// there was none.
    ///
    /// The kernel sets `ENETDOWN` on a packet socket bound to an interface that is down, or
    /// goes down (`packet_do_bind`, `packet_notifier` in net/packet/af_packet.c), and poll(2)
    /// reports `POLLERR` until a receive call or this option reads it. A socket read only
    /// through its PACKET_MMAP ring never makes that call, so its owner must: otherwise
    /// every poll returns at once, for good, after one link flap.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        let mut err: libc::c_int = 0;
        let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `err` is a writable c_int of `len` bytes and `len` a valid socklen_t the
        // kernel may update; both outlive the call.
        cvt(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut len,
            )
        })?;
        Ok((err != 0).then(|| io::Error::from_raw_os_error(err)))
    }

    /// Reads and resets the kernel's `PACKET_STATISTICS` counters for this socket.
    pub fn stats(&self) -> io::Result<PacketStats> {
        let mut st = TpacketStats::default();
        let mut len = mem::size_of::<TpacketStats>() as libc::socklen_t;
        // SAFETY: `st` is a writable tpacket_stats of `len` bytes and `len` is a valid
        // socklen_t the kernel may update; both outlive the call.
        cvt(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut st as *mut TpacketStats).cast(),
                &mut len,
            )
        })?;
        Ok(PacketStats {
            packets: st.tp_packets,
            drops: st.tp_drops,
        })
    }

    /// Receives one frame into `buf` without blocking.
    ///
    /// Returns `Ok(None)` when no frame is queued (`EWOULDBLOCK`). A frame longer than `buf`
    /// is cut to `buf.len()` bytes and reported with `truncated: true`; size buffers with
    /// [`frame_capacity`](crate::frame_capacity) to avoid that. `EINTR` is retried.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<RecvMeta>> {
        loop {
            let mut addr = zeroed_sockaddr_ll();
            let mut addr_len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` is writable for `buf.len()` bytes; `addr`/`addr_len` describe a
            // writable sockaddr_ll; all outlive the call. MSG_TRUNC makes the kernel return the
            // real frame length but still write at most `buf.len()` bytes.
            let ret = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                    (&mut addr as *mut libc::sockaddr_ll).cast(),
                    &mut addr_len,
                )
            };
            match cvt_size(ret) {
                Ok(full) => return Ok(Some(meta_from(full, buf.len(), false, &addr))),
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Ok(None),
                    _ => return Err(e),
                },
            }
        }
    }

    /// Receives up to [`batch.capacity()`](RecvBatch::capacity) frames with one
    /// `recvmmsg(2)` call (`MSG_DONTWAIT`), returning how many arrived (0 if none was queued).
    /// The frames are then available through [`RecvBatch::frame`] and [`RecvBatch::meta`]
    /// for indices below the returned count.
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.prepare();
        if batch.hdrs.is_empty() {
            return Ok(0);
        }
        let vlen = libc::c_uint::try_from(batch.hdrs.len()).unwrap_or(libc::c_uint::MAX);
        // Until the call returns, any header may be written; narrowed to `n + 1` below.
        batch.dirty = batch.hdrs.len();
        let ret = loop {
            // SAFETY: `new` pointed every header at its own iovec, sockaddr_ll and slice of
            // `batch.buf`, all owned by `batch` and never moved or resized since, and `prepare`
            // reset the fields the last call wrote; `batch` is exclusively borrowed for the
            // call, and `vlen` is at most the number of headers. A NULL timeout is allowed.
            let ret = unsafe {
                libc::recvmmsg(
                    self.fd.as_raw_fd(),
                    batch.hdrs.as_mut_ptr(),
                    vlen,
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    ptr::null_mut(),
                )
            };
            match cvt(ret) {
                Ok(n) => break n,
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => {
                        // Nothing received: the first header failed, the rest were not reached.
                        batch.dirty = 1;
                        return Ok(0);
                    }
                    _ => return Err(e),
                },
            }
        };
        let n = usize::try_from(ret).unwrap_or(0).min(batch.hdrs.len());
        batch.dirty = (n + 1).min(batch.hdrs.len());
        for i in 0..n {
            let hdr = &batch.hdrs[i];
            let truncated = hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            batch.metas[i] = meta_from(
                hdr.msg_len as usize,
                batch.frame_size,
                truncated,
                &batch.addrs[i],
            );
        }
        batch.received = n;
        Ok(n)
    }

    /// Sends one complete Ethernet frame (destination, source, ethertype, payload) out of the
    /// bound interface.
    ///
    /// `EINTR` is retried. A full socket buffer (`EAGAIN`) or a full device/qdisc queue
    /// (`ENOBUFS`) is reported as [`io::ErrorKind::WouldBlock`]: poll and try again, or drop
    /// the frame as AoE's retransmission allows. A frame longer than MTU + 14 fails with
    /// `EMSGSIZE`, one shorter than 14 bytes with `EINVAL`.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: `frame` is readable for `frame.len()` bytes for the duration of the call.
            let ret = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            match cvt_size(ret) {
                Ok(n) if n == frame.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!(
                            "short send on {}: {n} of {} bytes",
                            self.info.name,
                            frame.len()
                        ),
                    ))
                }
                Err(e) => match classify_send_error(e) {
                    SendError::Retry => continue,
                    SendError::Fail(e) => return Err(e),
                },
            }
        }
    }

    /// Sends several frames with `sendmmsg(2)` (in chunks of up to 64 per system call) and
    /// returns how many were sent, in order.
    ///
    /// Stops early and returns the count so far when the kernel accepts only part of a chunk.
    /// If not even the first frame could be sent, returns the error as [`send`](Self::send)
    /// would (`WouldBlock` for a full queue).
    pub fn send_batch(&self, frames: &[&[u8]]) -> io::Result<usize> {
        self.send_batch_with(frames, false, |f| [*f])
    }

    /// Sends several frames, each given as two parts put on the wire back to back (headers
    /// and the data behind them; either may be empty), with `sendmmsg(2)` and two iovecs
    /// per frame, in chunks of up to 64 per system call: a frame's data is sent from where
    /// it lies, never copied into a frame buffer first. Returns how many were sent, in
    /// order, as [`send_batch`](Self::send_batch) does, and fails as it does when not even
    /// the first frame could be sent.
    pub fn send_batch_parts(&self, frames: &[[&[u8]; 2]]) -> io::Result<usize> {
        self.send_batch_with(frames, false, |f| *f)
    }

    /// Like [`send_batch_parts`](Self::send_batch_parts) on a socket opened with
    /// [`open_linear_sender`](Self::open_linear_sender): each frame goes behind a
    /// `virtio_net_hdr` (no checksum offload, no GSO, `hdr_len` the frame's length), so the
    /// kernel copies it from its parts straight into a linear skb. On any other socket the
    /// header would go on the wire.
    pub fn send_batch_linear(&self, frames: &[[&[u8]; 2]]) -> io::Result<usize> {
        self.send_batch_with(frames, true, |f| *f)
    }

    /// The loop behind [`send_batch`](Self::send_batch),
    /// [`send_batch_parts`](Self::send_batch_parts) and
    /// [`send_batch_linear`](Self::send_batch_linear): each frame is the `P` parts (one or
    /// two iovecs) `parts` gives for it, behind a `virtio_net_hdr` of its own if `vnet`,
    /// sent in chunks of up to 64 frames per `sendmmsg(2)`; stops at the first chunk the
    /// kernel takes only part of.
    fn send_batch_with<T, const P: usize>(
        &self,
        frames: &[T],
        vnet: bool,
        parts: impl Fn(&T) -> [&[u8]; P],
    ) -> io::Result<usize> {
        const CHUNK: usize = 64;
        const { assert!(P == 1 || P == 2) };
        let per = P + usize::from(vnet);
        let mut sent = 0;
        for chunk in frames.chunks(CHUNK) {
            // virtio_net_hdr per frame: flags and gso_type 0, hdr_len (bytes 2..4, host
            // order as packet sockets read it) the frame's length, the rest 0.
            let mut vh = [[0u8; VNET_HDR_LEN]; CHUNK];
            // SAFETY: iovec is a pointer and a length; all-zero (NULL, 0) is valid.
            let mut iovs: [libc::iovec; 3 * CHUNK] = unsafe { mem::zeroed() };
            // SAFETY: mmsghdr is integers and NULL-able pointers; all-zero is valid.
            let mut hdrs: [libc::mmsghdr; CHUNK] = unsafe { mem::zeroed() };
            for ((frame_iovs, frame), h) in iovs.chunks_exact_mut(per).zip(chunk).zip(&mut vh) {
                let ps = parts(frame);
                let (first, rest) = frame_iovs.split_at_mut(usize::from(vnet));
                if let Some(iov) = first.first_mut() {
                    let len: usize = ps.iter().map(|p| p.len()).sum();
                    // (Past 65535 bytes, which no MTU gives, the rest would be fragments.)
                    let len = u16::try_from(len).unwrap_or(u16::MAX);
                    h[2..4].copy_from_slice(&len.to_ne_bytes());
                    *iov = libc::iovec {
                        iov_base: h.as_mut_ptr().cast(),
                        iov_len: VNET_HDR_LEN,
                    };
                }
                for (iov, part) in rest.iter_mut().zip(ps) {
                    *iov = libc::iovec {
                        iov_base: part.as_ptr() as *mut libc::c_void,
                        iov_len: part.len(),
                    };
                }
            }
            let iov_base = iovs.as_mut_ptr();
            for (i, hdr) in hdrs.iter_mut().take(chunk.len()).enumerate() {
                hdr.msg_hdr.msg_iov = iov_base.wrapping_add(per * i);
                hdr.msg_hdr.msg_iovlen = per;
            }
            // SAFETY: the first `chunk.len()` headers each point at their `per` iovecs in
            // `iovs` (per * 64 <= 192), which point at headers in `vh` and at parts
            // borrowed from `frames` (an empty part is a valid zero-length iovec); all
            // outlive the call.
            let n = match unsafe { self.sendmmsg_chunk(&mut hdrs[..chunk.len()]) } {
                Ok(n) => n,
                Err(e) if sent == 0 => return Err(e),
                Err(_) => return Ok(sent),
            };
            sent += n.min(chunk.len());
            if n < chunk.len() {
                break;
            }
        }
        Ok(sent)
    }

    /// One `sendmmsg(2)` of `hdrs` (at most 64), retried on `EINTR` and the other errors
    /// [`classify_send_error`] calls transient; returns how many messages the kernel took.
    /// No destination address: the bound ifindex and protocol are used (packet(7)).
    ///
    /// # Safety
    ///
    /// Every header's `msg_iov`/`msg_iovlen` must describe iovecs that point at readable
    /// memory of their lengths, alive for the call; the kernel only reads them (send path).
    unsafe fn sendmmsg_chunk(&self, hdrs: &mut [libc::mmsghdr]) -> io::Result<usize> {
        // Callers pass chunks of at most 64.
        let vlen = hdrs.len() as libc::c_uint;
        loop {
            // SAFETY: `hdrs` holds `vlen` headers whose iovecs are valid for reading (this
            // function's contract); the kernel writes only each header's `msg_len`.
            let ret = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    vlen,
                    libc::MSG_DONTWAIT,
                )
            };
            match cvt(ret) {
                Ok(n) => return Ok(usize::try_from(n).unwrap_or(0)),
                Err(e) => match classify_send_error(e) {
                    SendError::Retry => continue,
                    SendError::Fail(e) => return Err(e),
                },
            }
        }
    }

    fn attach_filter(&self, program: &[libc::sock_filter]) -> io::Result<()> {
        let prog = libc::sock_fprog {
            len: libc::c_ushort::try_from(program.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program too long"))?,
            filter: program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `prog` points at `program.len()` instructions that stay alive for the call;
        // the kernel copies the program (SO_ATTACH_FILTER, socket(7)) and never writes to it.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&prog as *const libc::sock_fprog).cast(),
                mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        })
        .map(drop)
    }

    /// Discards whatever was queued before the filter was attached.
    fn drain_queue(&self) {
        let mut scratch = [0u8; 1];
        // Bounded so a flood cannot keep us here forever; MSG_TRUNC with a 1-byte buffer
        // dequeues whole frames cheaply.
        for _ in 0..4096 {
            // SAFETY: `scratch` is writable for its length; NULL address pointers are allowed.
            let ret = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    scratch.as_mut_ptr().cast(),
                    scratch.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    ptr::null_mut(),
                    ptr::null_mut(),
                )
            };
            if ret < 0 {
                break;
            }
        }
    }

    fn bind(&self) -> io::Result<()> {
        let mut addr = zeroed_sockaddr_ll();
        addr.sll_family = libc::AF_PACKET as libc::c_ushort;
        addr.sll_protocol = self.ethertype.to_be();
        addr.sll_ifindex = libc::c_int::try_from(self.info.index).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "interface index out of range")
        })?;
        // SAFETY: `addr` is a valid sockaddr_ll of the size passed, alive for the call.
        cvt(unsafe {
            libc::bind(
                self.fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })
        .map(drop)
    }

    fn set_buffer(&self, force: libc::c_int, plain: libc::c_int, bytes: usize) -> io::Result<()> {
        // The kernel doubles the value; keep the doubled value inside an int.
        let val = libc::c_int::try_from(bytes)
            .unwrap_or(libc::c_int::MAX)
            .min(libc::c_int::MAX / 2);
        match self.setsockopt_int(libc::SOL_SOCKET, force, val) {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                self.setsockopt_int(libc::SOL_SOCKET, plain, val)
            }
            other => other,
        }
    }

    fn setsockopt_int(
        &self,
        level: libc::c_int,
        name: libc::c_int,
        val: libc::c_int,
    ) -> io::Result<()> {
        // SAFETY: `val` is a readable c_int whose size is passed; it outlives the call.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&val as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })
        .map(drop)
    }
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for PacketSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

enum SendError {
    Retry,
    Fail(io::Error),
}

/// EINTR: retry; EAGAIN and ENOBUFS: WouldBlock; anything else as is.
fn classify_send_error(e: io::Error) -> SendError {
    match e.raw_os_error() {
        Some(libc::EINTR) => SendError::Retry,
        Some(libc::ENOBUFS) => SendError::Fail(io::Error::new(
            io::ErrorKind::WouldBlock,
            "transmit queue full (ENOBUFS)",
        )),
        _ => SendError::Fail(e),
    }
}

fn zeroed_sockaddr_ll() -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain integers and byte arrays; all-zero is valid.
    unsafe { mem::zeroed() }
}

fn meta_from(full: usize, cap: usize, truncated: bool, addr: &libc::sockaddr_ll) -> RecvMeta {
    let mut src = [0u8; 6];
    src.copy_from_slice(&addr.sll_addr[..6]);
    RecvMeta {
        len: full.min(cap),
        truncated: truncated || full > cap,
        src,
    }
}

/// Buffers for receiving many frames with one `recvmmsg(2)` call
/// ([`PacketSocket::recv_batch`]).
///
/// Holds `count` slots of `frame_size` bytes each, in one allocation. After a receive, slots
/// `0..len()` hold frames; the rest read as empty.
pub struct RecvBatch {
    frame_size: usize,
    buf: Vec<u8>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_ll>,
    hdrs: Vec<libc::mmsghdr>,
    metas: Vec<RecvMeta>,
    received: usize,
    /// How many leading headers the kernel may have written since [`prepare`](Self::prepare)
    /// last reset them: `recvmmsg` fills headers in order and stops at the first that fails,
    /// so after a call that returned `n` it is at most `n + 1`.
    dirty: usize,
}

// SAFETY: the raw pointers inside `iovs` and `hdrs` only ever point into `buf`, `iovs` and
// `addrs`, which the batch owns; they are set once by `new` (into heap buffers that are never
// resized, so moving the batch moves no target), used only under `&mut self` by
// `recv_batch`, and never dereferenced by shared-reference methods. So moving the batch to
// another thread, or reading it from several, is as safe as for the owned Vecs themselves.
unsafe impl Send for RecvBatch {}
// SAFETY: as above: `&RecvBatch` methods only read `buf` and `metas`; no interior mutability.
unsafe impl Sync for RecvBatch {}

impl RecvBatch {
    /// A batch of `count` slots of `frame_size` bytes; use
    /// [`frame_capacity(mtu)`](crate::frame_capacity) for `frame_size`.
    ///
    /// # Panics
    ///
    /// If `count * frame_size` overflows `usize` (like `Vec::with_capacity`).
    pub fn new(count: usize, frame_size: usize) -> Self {
        let total = count
            .checked_mul(frame_size)
            .expect("RecvBatch::new: count * frame_size overflows usize");
        let mut batch = RecvBatch {
            frame_size,
            buf: vec![0; total],
            // SAFETY: iovec is a pointer and a length; all-zero (NULL, 0) is valid.
            iovs: (0..count).map(|_| unsafe { mem::zeroed() }).collect(),
            addrs: (0..count).map(|_| zeroed_sockaddr_ll()).collect(),
            // SAFETY: mmsghdr is integers and NULL-able pointers; all-zero is valid.
            hdrs: (0..count).map(|_| unsafe { mem::zeroed() }).collect(),
            metas: vec![RecvMeta::default(); count],
            received: 0,
            dirty: 0,
        };
        batch.point_all();
        batch
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Size of each slot in bytes.
    pub fn frame_size(&self) -> usize {
        self.frame_size
    }

    /// Number of frames received by the last [`PacketSocket::recv_batch`].
    pub fn len(&self) -> usize {
        self.received
    }

    /// True if the last receive got no frame.
    pub fn is_empty(&self) -> bool {
        self.received == 0
    }

    /// Frame `i` of the last receive (`meta(i).len` bytes). Empty for `len() <= i < capacity()`.
    ///
    /// # Panics
    ///
    /// If `i >= capacity()`, like slice indexing.
    pub fn frame(&self, i: usize) -> &[u8] {
        let start = i * self.frame_size;
        &self.buf[start..start + self.metas[i].len]
    }

    /// Frame `i` of the last receive, writable (e.g. to turn a request into a reply in place).
    ///
    /// # Panics
    ///
    /// If `i >= capacity()`.
    pub fn frame_mut(&mut self, i: usize) -> &mut [u8] {
        let start = i * self.frame_size;
        let len = self.metas[i].len;
        &mut self.buf[start..start + len]
    }

    /// Metadata of frame `i` of the last receive (all zero for `len() <= i < capacity()`).
    ///
    /// # Panics
    ///
    /// If `i >= capacity()`.
    pub fn meta(&self, i: usize) -> RecvMeta {
        self.metas[i]
    }

    /// The full length of frame `i` of the last receive as it was on the wire, even when
    /// the slot was smaller and the frame was cut (`recvmmsg` with `MSG_TRUNC` reports the
    /// real length in `msg_len`, packet(7)); 0 for `len() <= i < capacity()`.
    ///
    /// A caller that needs only the headers can receive into small slots, saving the copy of
    /// the payload, and still learn how much payload there was.
    ///
    /// # Panics
    ///
    /// If `i >= capacity()`.
    pub fn wire_len(&self, i: usize) -> usize {
        if i < self.received {
            self.hdrs[i].msg_len as usize
        } else {
            0
        }
    }

    /// The frames of the last receive with their metadata.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], RecvMeta)> + '_ {
        (0..self.received).map(move |i| (self.frame(i), self.metas[i]))
    }

    /// Points every header at its slot, sockaddr and iovec: once, in [`new`](Self::new).
    ///
    /// The pointers come from `Vec::as_mut_ptr`, which does not materialize a reference to
    /// the buffer, so they stay valid across the later reads of `buf` and `addrs` and the
    /// `&mut` borrows of `buf` (`frame_mut`) and `hdrs` (`prepare`); `iovs` is never written
    /// again, and no Vec is ever resized, so no buffer moves.
    fn point_all(&mut self) {
        let frame_size = self.frame_size;
        let base = self.buf.as_mut_ptr();
        for (i, iov) in self.iovs.iter_mut().enumerate() {
            *iov = libc::iovec {
                // `i * frame_size` is within `buf` (or equal to its length when frame_size is
                // 0), so the pointer stays in bounds; wrapping_add needs no unsafe.
                iov_base: base.wrapping_add(i * frame_size).cast(),
                iov_len: frame_size,
            };
        }
        let iov_base = self.iovs.as_mut_ptr();
        let addr_base = self.addrs.as_mut_ptr();
        for (i, hdr) in self.hdrs.iter_mut().enumerate() {
            hdr.msg_len = 0;
            hdr.msg_hdr.msg_name = addr_base.wrapping_add(i).cast();
            hdr.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            hdr.msg_hdr.msg_iov = iov_base.wrapping_add(i);
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = ptr::null_mut();
            hdr.msg_hdr.msg_controllen = 0;
            hdr.msg_hdr.msg_flags = 0;
        }
        self.dirty = 0;
    }

    /// Forgets the last receive and resets what the kernel may have written in the headers
    /// (`msg_len`, `msg_namelen`, `msg_flags`, `msg_controllen`; recvmmsg(2) writes nothing
    /// else of a header, and nothing of a header past the first one that failed). Only the
    /// headers the last call reached are touched: resetting all 64 of a generator's batch on
    /// every call, most of them unused, was 5% of `aoe bench`'s CPU at MTU 1500 random
    /// writes (docs/PERFORMANCE.md, session 25).
    fn prepare(&mut self) {
        self.metas[..self.received].fill(RecvMeta::default());
        self.received = 0;
        let namelen = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        for hdr in &mut self.hdrs[..self.dirty] {
            hdr.msg_len = 0;
            hdr.msg_hdr.msg_namelen = namelen;
            hdr.msg_hdr.msg_controllen = 0;
            hdr.msg_hdr.msg_flags = 0;
        }
        self.dirty = 0;
    }
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("capacity", &self.capacity())
            .field("frame_size", &self.frame_size)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

/// socket(AF_PACKET, SOCK_RAW) refused for want of privilege (packet(7): only processes
/// with CAP_NET_RAW may open packet sockets; EPERM): the same error with what to do, so a
/// user who ran the command without root is told why rather than only "Operation not
/// permitted". Other errors pass unchanged.
fn raw_socket_refused(e: io::Error) -> io::Error {
    if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) {
        io::Error::new(
            e.kind(),
            format!(
                "{e}: AoE frames need a raw packet socket, which only root or a process with \
                 CAP_NET_RAW may open"
            ),
        )
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_matches_tcpdump_dd() {
        // `tcpdump -dd ether proto 0x88a2`:
        // { 0x28, 0, 0, 0x0000000c }, { 0x15, 0, 1, 0x000088a2 },
        // { 0x6, 0, 0, 0x00040000 }, { 0x6, 0, 0, 0x00000000 },
        let want: [(u16, u8, u8, u32); 4] = [
            (0x28, 0, 0, 0x0c),
            (0x15, 0, 1, 0x88a2),
            (0x06, 0, 0, 0x4_0000),
            (0x06, 0, 0, 0),
        ];
        let got = ethertype_filter(ETH_P_AOE);
        for (g, w) in got.iter().zip(want) {
            assert_eq!((g.code, g.jt, g.jf, g.k), w);
        }
    }

    #[test]
    fn response_filter_is_the_documented_program() {
        // `tcpdump -dd 'ether proto 0x88a2 and ether[14] & 8 != 0'` compiles to the same
        // checks: ldh [12], jeq 0x88a2, ldb [14], jset 8, ret 262144, ret 0.
        let want: [(u16, u8, u8, u32); 6] = [
            (0x28, 0, 0, 0x0c),
            (0x15, 0, 3, 0x88a2),
            (0x30, 0, 0, 0x0e),
            (0x45, 0, 1, 0x08),
            (0x06, 0, 0, 0x4_0000),
            (0x06, 0, 0, 0),
        ];
        let got = response_filter();
        for (g, w) in got.iter().zip(want) {
            assert_eq!((g.code, g.jt, g.jf, g.k), w);
        }
    }

    #[test]
    fn meta_reports_truncation_and_source() {
        let mut addr = zeroed_sockaddr_ll();
        addr.sll_addr[..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        let m = meta_from(100, 60, false, &addr);
        assert_eq!(
            m,
            RecvMeta {
                len: 60,
                truncated: true,
                src: [2, 0, 0, 0, 0, 1]
            }
        );
        assert!(!meta_from(60, 60, false, &addr).truncated);
        assert!(meta_from(60, 60, true, &addr).truncated);
    }

    #[test]
    fn prepare_resets_what_the_kernel_wrote_and_keeps_the_pointers() {
        let mut b = RecvBatch::new(4, 64);
        let full = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        let before: Vec<_> = b
            .hdrs
            .iter()
            .map(|h| (h.msg_hdr.msg_name, h.msg_hdr.msg_iov))
            .collect();
        let bufs: Vec<_> = b.iovs.iter().map(|v| (v.iov_base, v.iov_len)).collect();
        // What a recvmmsg that returned 2 leaves behind (the third header reached, failed).
        for h in &mut b.hdrs[..3] {
            h.msg_len = 60;
            h.msg_hdr.msg_namelen = 18;
            h.msg_hdr.msg_flags = libc::MSG_TRUNC;
        }
        b.metas[0] = meta_from(60, 64, false, &zeroed_sockaddr_ll());
        b.metas[1] = b.metas[0];
        b.received = 2;
        b.dirty = 3;
        // Moving the batch moves no buffer the headers point into.
        let mut b = Box::new(b);
        b.prepare();
        assert_eq!(b.len(), 0);
        for (i, h) in b.hdrs.iter().enumerate() {
            assert_eq!(h.msg_len, 0, "header {i}");
            assert_eq!(h.msg_hdr.msg_namelen, full, "header {i}");
            assert_eq!(h.msg_hdr.msg_flags, 0, "header {i}");
            assert_eq!(h.msg_hdr.msg_controllen, 0, "header {i}");
            assert_eq!((h.msg_hdr.msg_name, h.msg_hdr.msg_iov), before[i]);
            assert_eq!(b.meta(i), RecvMeta::default());
            assert_eq!(b.wire_len(i), 0);
        }
        let base = b.buf.as_ptr();
        for (i, v) in b.iovs.iter().enumerate() {
            assert_eq!((v.iov_base, v.iov_len), bufs[i]);
            assert_eq!(v.iov_base.cast_const(), base.wrapping_add(i * 64).cast());
        }
    }

    #[test]
    fn empty_batch_reads_as_empty() {
        let b = RecvBatch::new(4, 1514);
        assert_eq!(b.capacity(), 4);
        assert_eq!(b.len(), 0);
        assert!(b.frame(3).is_empty());
        assert_eq!(b.iter().count(), 0);
        let zero = RecvBatch::new(0, 1514);
        assert_eq!(zero.capacity(), 0);
    }

    #[test]
    fn wire_len_is_zero_without_a_frame() {
        let b = RecvBatch::new(2, 64);
        assert_eq!(b.wire_len(0), 0);
        assert_eq!(b.wire_len(1), 0);
    }

    #[test]
    fn batch_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<RecvBatch>();
        check::<PacketSocket>();
    }
}
