//! A `PACKET_RX_RING` (TPACKET_V2, packet(7) and the kernel's
//! Documentation/networking/packet_mmap.rst) that keeps only the first bytes of each frame:
//! the receive side of `aoe bench`'s load generator.
//!
//! With a ring the kernel writes each frame into memory shared with user space and flips the
//! frame's status word; the generator reads replies without a system call per frame or per
//! batch, and of a read reply only the headers are copied (the kernel truncates to the ring
//! frame and reports the wire length in `tp_len`). TPACKET_V2 rather than V3: V3 hands
//! frames to user space a block at a time, when a block fills or its retire timer (at least
//! 1 ms) fires, which at a window of 16 requests would hold replies back for the timer.
//!
//! This module is the generator's; the target's rings (another module) are separate.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{cvt, PacketSocket};

/// `PACKET_RX_RING` from `<linux/if_packet.h>`.
const PACKET_RX_RING: libc::c_int = 5;
/// `PACKET_VERSION` from `<linux/if_packet.h>`.
const PACKET_VERSION: libc::c_int = 10;
/// `TPACKET_V2` in `enum tpacket_versions`.
const TPACKET_V2: libc::c_int = 1;
/// `TP_STATUS_USER`: the frame belongs to user space.
const TP_STATUS_USER: u32 = 1;
/// `TP_STATUS_KERNEL`: the frame is free for the kernel.
const TP_STATUS_KERNEL: u32 = 0;
/// `TPACKET_ALIGNMENT`.
const ALIGN: usize = 16;
/// Ring frames per 4 KiB-aligned block are computed from this block size.
const BLOCK: usize = 1 << 16;

/// `struct tpacket_req` (`<linux/if_packet.h>`).
#[repr(C)]
#[derive(Default)]
struct TpacketReq {
    tp_block_size: libc::c_uint,
    tp_block_nr: libc::c_uint,
    tp_frame_size: libc::c_uint,
    tp_frame_nr: libc::c_uint,
}

/// `struct tpacket2_hdr` (`<linux/if_packet.h>`), at the start of every ring frame. Only
/// the lengths and the MAC offset are read; the rest is there for the layout.
#[repr(C)]
#[allow(dead_code)]
struct Tpacket2Hdr {
    tp_status: u32,
    tp_len: u32,
    tp_snaplen: u32,
    tp_mac: u16,
    tp_net: u16,
    tp_sec: u32,
    tp_nsec: u32,
    tp_vlan_tci: u16,
    tp_vlan_tpid: u16,
    tp_padding: [u8; 4],
}

const fn align(x: usize) -> usize {
    (x + ALIGN - 1) & !(ALIGN - 1)
}

/// Where `tpacket_rcv` puts the MAC header of a `SOCK_RAW` frame: the V2 header and a
/// `sockaddr_ll`, aligned, then at least 16 bytes, aligned, minus the 14-byte Ethernet header.
const MAC_OFFSET: usize =
    align(align(mem::size_of::<Tpacket2Hdr>()) + mem::size_of::<libc::sockaddr_ll>() + 16) - 14;

/// An RX ring on a [`PacketSocket`] that stores at most `snap` bytes of each frame.
///
/// While the ring exists the socket's received frames go into it, not to
/// [`recv`](PacketSocket::recv)/[`recv_batch`](PacketSocket::recv_batch); sending is unchanged.
/// Dropping the ring unmaps it and removes it from the socket, which then receives as before.
/// Wait for frames with [`poll`](crate::poll) on the socket.
pub struct HeaderRxRing<'a> {
    sock: &'a PacketSocket,
    map: *mut u8,
    map_len: usize,
    snap: usize,
    frame_size: usize,
    frames_per_block: usize,
    frame_nr: usize,
    next: usize,
}

impl<'a> HeaderRxRing<'a> {
    /// Attaches a ring of at least `frames` frames holding `snap` bytes of each frame (from the
    /// Ethernet destination address on) to `sock`.
    ///
    /// # Errors
    ///
    /// Those of `setsockopt(PACKET_VERSION / PACKET_RX_RING)` and `mmap`, e.g. `EBUSY` if the
    /// socket already has a ring.
    pub fn attach(sock: &'a PacketSocket, snap: usize, frames: usize) -> io::Result<Self> {
        let fd = sock.as_raw_fd();
        let frame_size = align(MAC_OFFSET + snap.max(14));
        if frame_size > BLOCK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ring frames of {snap} bytes do not fit a {BLOCK}-byte block"),
            ));
        }
        let frames_per_block = BLOCK / frame_size;
        let blocks = frames.max(1).div_ceil(frames_per_block);
        let frame_nr = blocks * frames_per_block;
        setsockopt_int(fd, PACKET_VERSION, TPACKET_V2)?;
        let req = TpacketReq {
            tp_block_size: BLOCK as libc::c_uint,
            tp_block_nr: blocks as libc::c_uint,
            tp_frame_size: frame_size as libc::c_uint,
            tp_frame_nr: frame_nr as libc::c_uint,
        };
        set_ring(fd, &req)?;
        let map_len = blocks * BLOCK;
        // SAFETY: a fresh shared mapping of the ring the kernel just allocated for `fd`
        // (packet_mmap.rst: one mmap of tp_block_size * tp_block_nr bytes); no existing memory
        // is affected, and the result is checked against MAP_FAILED.
        let map = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            let _ = set_ring(fd, &TpacketReq::default());
            return Err(e);
        }
        Ok(HeaderRxRing {
            sock,
            map: map.cast(),
            map_len,
            snap,
            frame_size,
            frames_per_block,
            frame_nr,
            next: 0,
        })
    }

    /// Frames in the ring.
    pub fn frames(&self) -> usize {
        self.frame_nr
    }

    /// Hands up to `max` frames the kernel has filled, in arrival order, to `f` as (the stored
    /// bytes, at most `snap` of them; the frame's length on the wire), and gives each back to
    /// the kernel after `f` returns. Returns how many it handed over; 0 means none is waiting.
    pub fn drain(&mut self, max: usize, mut f: impl FnMut(&[u8], usize)) -> usize {
        let mut n = 0;
        while n < max {
            let hdr = self.frame_ptr(self.next);
            // SAFETY: `hdr` points at the start of a ring frame inside the live mapping,
            // 16-byte aligned, so its first four bytes are an aligned u32 the kernel also
            // accesses as one word (tp_status); reading it atomically with Acquire pairs with
            // the kernel's smp_wmb() before it sets TP_STATUS_USER.
            let status = unsafe { &*hdr.cast::<AtomicU32>() };
            if status.load(Ordering::Acquire) & TP_STATUS_USER == 0 {
                break;
            }
            // SAFETY: the frame is ours (TP_STATUS_USER) until we store TP_STATUS_KERNEL, so
            // the kernel does not write it meanwhile; the header lies within the frame.
            let (len, snaplen, mac) = unsafe {
                let h = &*hdr.cast::<Tpacket2Hdr>();
                (
                    h.tp_len as usize,
                    h.tp_snaplen as usize,
                    usize::from(h.tp_mac),
                )
            };
            let mac = mac.min(self.frame_size);
            // The ring frame may hold a few bytes more than asked (alignment); hand over `snap`.
            let stored = snaplen.min(self.frame_size - mac).min(self.snap);
            // SAFETY: `mac + stored <= frame_size`, so the slice lies inside this frame of the
            // mapping, which we own until the status store below and which outlives the call.
            let data = unsafe { std::slice::from_raw_parts(hdr.add(mac), stored) };
            f(data, len);
            status.store(TP_STATUS_KERNEL, Ordering::Release);
            self.next = (self.next + 1) % self.frame_nr;
            n += 1;
        }
        n
    }

    fn frame_ptr(&self, i: usize) -> *mut u8 {
        let off =
            (i / self.frames_per_block) * BLOCK + (i % self.frames_per_block) * self.frame_size;
        // `off + frame_size <= map_len` for every i < frame_nr; wrapping_add needs no unsafe.
        self.map.wrapping_add(off)
    }
}

impl Drop for HeaderRxRing<'_> {
    fn drop(&mut self) {
        // SAFETY: `map`/`map_len` are exactly the mapping made in `attach`, and no slice into
        // it outlives `drain`.
        unsafe { libc::munmap(self.map.cast(), self.map_len) };
        // Unmapped, the ring can be freed: a zero-block request removes it (packet_set_ring).
        let _ = set_ring(self.sock.as_raw_fd(), &TpacketReq::default());
    }
}

fn setsockopt_int(fd: RawFd, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    // SAFETY: `val` is a readable c_int for the duration of the call and its size is passed.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            opt,
            (&val as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn set_ring(fd: RawFd, req: &TpacketReq) -> io::Result<()> {
    // SAFETY: `req` is a readable struct tpacket_req for the duration of the call; the kernel
    // copies it.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            PACKET_RX_RING,
            (req as *const TpacketReq).cast(),
            mem::size_of::<TpacketReq>() as libc::socklen_t,
        )
    })
    .map(drop)
}
