//! # aoe-sys: the operating-system layer
//!
//! This is the bottom layer of the AoE suite and **the only crate in the workspace that contains
//! `unsafe` code**. It wraps the handful of Linux system calls the daemons need behind small,
//! safe, `std::io`-flavoured types:
//!
//! * [`PacketSocket`]: an `AF_PACKET`/`SOCK_RAW` socket bound to one interface and to the AoE
//!   ethertype [`ETH_P_AOE`] (0x88A2), with a classic BPF filter so that the kernel never queues
//!   anything else; single-frame [`recv`](PacketSocket::recv)/[`send`](PacketSocket::send) and
//!   batched `recvmmsg(2)`/`sendmmsg(2)` through [`RecvBatch`] and
//!   [`send_batch`](PacketSocket::send_batch).
//! * [`PacketRing`]: `PACKET_MMAP` receive and transmit rings (`TPACKET_V2`) on a
//!   [`PacketSocket`]: frames in without a system call, out with one `send()` per batch. The
//!   target uses both with whole frames; `aoe bench` a receive ring of header-sized slots
//!   (replies read without a system call or a payload copy) and a transmit ring.
//! * [`XdpSocket`]: an `AF_XDP` socket with its UMEM and rings on queue 0 of an interface,
//!   and the XDP program (hand-assembled, loaded with bpf(2), no libbpf) that steers AoE
//!   frames into it; the same receive-lend, build-in-slot and kick shape as [`PacketRing`].
//!   A measured prototype: docs/PERFORMANCE.md ("AF_XDP, tried and measured") says why the target does not use
//!   it on veth.
//! * [`interface_info`] and [`list_interfaces`]: name, index, MAC address, MTU and flags of the
//!   network interfaces of the calling thread's network namespace.
//! * [`LinkEvents`]: an rtnetlink socket in the link group, so a daemon hears at once that an
//!   interface was created, deleted, renamed, moved or set up or down (`RTM_NEWLINK`,
//!   `RTM_DELLINK`).
//! * [`EventFd`], [`poll`] and [`TimerFd`]: the wake-up primitive, the readiness wait and the
//!   periodic timer a single-threaded poll loop needs so that worker threads can hand it
//!   completions.
//! * [`SlotReads`]: io_uring reads with `RWF_NOWAIT` straight into a [`PacketRing`]'s
//!   transmit slots, one `io_uring_enter` for a batch of them.
//! * [`fuse_uring::FuseUring`]: the daemon's side of FUSE over io_uring (Linux 6.14+): ring
//!   entries registered on a `/dev/fuse` connection, requests in, answers committed, payload
//!   blocks lent out without a copy.
//! * [`pread_nowait`] and [`pwrite_nowait`]: positional file I/O with `RWF_NOWAIT`, so an
//!   event loop serves page-cached data inline and hands only what would block to workers.
//! * [`recv_append_nowait`]: what a stream socket holds now appended to a vector without
//!   waiting, for the NBD export's write payloads read on the initiator's network thread.
//! * [`dio_alignment`]: the alignment O_DIRECT needs on a file (`statx` `STATX_DIOALIGN`, or a
//!   block device's logical block size from `BLKSSZGET`).
//! * [`sigpipe_default`] and [`die_of_sigpipe`]: a closed standard output ends a tool quietly,
//!   by `SIGPIPE`, as it ends a C tool (Rust starts with `SIGPIPE` ignored).
//! * [`exit_now`]: `_exit(2)` for a daemon that leaves a library's threads running on purpose
//!   (librados' after a stop that lost work), so no C++ static destructor runs under them.
//! * [`enter_netns`] and [`run_in_netns`]: `setns(2)` into a named network namespace, used by
//!   the integration tests and by daemons started with `--netns`.
//!
//! What it deliberately does **not** do: it knows nothing about the AoE header beyond the
//! ethertype (parsing lives in `aoe-wire`), it builds no frames (callers hand it complete
//! Ethernet frames, destination, source and type included), and it starts no threads except the
//! short-lived one inside [`run_in_netns`]. Errors are plain [`std::io::Error`]s; a few carry a
//! message naming the interface or file they concern.
//!
//! Everything here is Linux-only.
//!
//! ## Network namespaces
//!
//! Sockets and interface queries act on the network namespace of the **calling thread** at the
//! moment the socket is created. A [`PacketSocket`] keeps the namespace it was opened in for its
//! whole life, so a socket opened inside [`run_in_netns`] may then be used from any thread.

#![warn(missing_docs)]

use std::io;

mod event;
mod exit;
mod file;
pub mod fuse_uring;
mod iface;
mod link;
mod ns;
mod packet;
mod ring;
mod stream;
mod uring;
mod xdp;

pub use event::{poll, poll_precise, set_timer_slack, thread_cpu_time, EventFd, PollFd, TimerFd};
pub use exit::{die_of_sigpipe, exit_now, sigpipe_default};
pub use file::{
    block_device_read_only, block_device_sectors, dio_alignment, disk_write_cache,
    drop_cached_range, flock, is_btrfs, is_btrfs_at, is_local_disk_fs, is_local_disk_fs_at,
    is_memory_fs, lock_range_ofd, logical_block_size, pread_nowait, pwrite_nowait, pwritev_all,
    pwritev_nowait, resident_pages, try_lock_range_ofd, write_back_range, DioAlign, DioAlignSource,
    Flock, NoWait, OfdRangeLock, MAX_WRITEV,
};
pub use iface::{interface_info, list_interfaces, InterfaceInfo};
pub use link::{LinkEvent, LinkEvents};
pub use ns::{enter_netns, nofile_limit, raise_nofile_limit, run_in_netns, EMFILE, ENFILE};
pub use packet::{PacketSocket, PacketStats, RecvBatch, RecvMeta, RECV_BUFFER_BYTES};
pub use ring::{PacketRing, RingStats, SlotPart, MAX_SLOT_PARTS};
pub use stream::recv_append_nowait;
pub use uring::{SlotRead, SlotReads};
pub use xdp::{XdpConfig, XdpMode, XdpModeWanted, XdpSocket, XdpStats};

/// The AoE ethertype, registered with the IEEE as 0x88A2 (AoEr11 §2, "Ethernet Type").
pub const ETH_P_AOE: u16 = 0x88A2;

/// Length of an Ethernet II header: destination (6), source (6), ethertype (2).
pub const ETH_HLEN: usize = 14;

/// Buffer size, in bytes, that holds any frame an interface with this MTU can send or receive.
///
/// The MTU counts the payload after the Ethernet header, so a frame is at most `mtu + 14` bytes:
/// 1514 for a standard 1500-byte MTU, 9014 for 9000-byte jumbo frames. The frame check sequence
/// never reaches user space, and on interfaces with VLAN offload the 802.1Q tag is stripped by
/// the kernel before an `AF_PACKET` socket sees the frame, so neither is counted.
pub fn frame_capacity(mtu: u32) -> usize {
    // u32 always fits in usize on the 32- and 64-bit Linux targets we support.
    (mtu as usize).saturating_add(ETH_HLEN)
}

/// Turns a `-1` return of a libc call into the thread's `errno` as an [`io::Error`].
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Like [`cvt`] for calls returning `ssize_t`.
fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        // Non-negative ssize_t always fits in usize.
        Ok(ret as usize)
    }
}

/// Asks the CPU to bring the cache line at `p` into its caches (x86-64 `prefetcht0`), so
/// that a load of it a little later finds it there instead of waiting for memory. A hint
/// only: any address may be given, nothing is read through it, nothing faults; on other
/// architectures it does nothing. The target's engine takes it to fetch the line of its
/// duplicate-write index a write will look up while it computes the write's digest.
#[inline]
pub fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it neither faults, whatever the address, nor changes
    // memory or registers; SSE, which it belongs to, is part of every x86-64 CPU.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_capacity_adds_ethernet_header() {
        assert_eq!(frame_capacity(1500), 1514);
        assert_eq!(frame_capacity(9000), 9014);
        assert_eq!(frame_capacity(0), 14);
        assert_eq!(frame_capacity(u32::MAX), u32::MAX as usize + 14);
    }

    /// A hint only: no address faults, mapped or not, and memory is unchanged.
    #[test]
    fn prefetch_of_any_address_is_harmless() {
        let v = [7u8; 64];
        prefetch(v.as_ptr());
        prefetch(std::ptr::null());
        prefetch(std::ptr::without_provenance(usize::MAX));
        assert_eq!(v, [7u8; 64]);
    }

    #[test]
    fn ethertype_is_aoe() {
        assert_eq!(ETH_P_AOE, 0x88a2);
    }
}
