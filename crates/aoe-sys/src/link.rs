//! Link events: an rtnetlink socket subscribed to the link group (`RTMGRP_LINK`).
//!
//! The kernel multicasts an `RTM_NEWLINK` to the group for each interface created, set up
//! or down, renamed, given a new address or MTU, or moved into the namespace, and an
//! `RTM_DELLINK` for each one deleted or moved out (`rtmsg_ifinfo` from `netdev_state_change`,
//! `dev_change_flags`, `dev_change_name`, `unregister_netdevice`; rtnetlink(7)). The daemons
//! poll this socket beside their packet sockets, so an interface that comes back is taken at
//! once instead of at their next periodic look (kept as the fallback: a group message can be
//! lost when the socket's buffer is full, which is reported here as [`LinkEvents::drain`]'s
//! overrun).
//!
//! Only the fixed part of each message (`ifinfomsg`: index and flags) and the name
//! attribute (`IFLA_IFNAME`) are read; the caller looks the interface up again itself.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::cvt;

/// What happened to one interface, as the kernel said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEvent {
    /// `RTM_DELLINK`: the interface was deleted, or moved to another namespace.
    pub deleted: bool,
    /// The interface index (`ifi_index`).
    pub index: u32,
    /// `IFLA_IFNAME`, when the message carries it (it always does from Linux).
    pub name: Option<String>,
    /// `ifi_flags`: `IFF_UP`, `IFF_LOWER_UP` (carrier), `IFF_RUNNING` (operational
    /// state up), ...
    pub flags: u32,
}

impl LinkEvent {
    /// Up and with a carrier (`IFF_UP` and `IFF_LOWER_UP`, or `IFF_RUNNING`): frames sent
    /// now can arrive. The kernel sets `IFF_LOWER_UP` with the carrier (`netif_carrier_ok`)
    /// and sends it only once the device's queue is active (`__dev_open` activates it when
    /// the carrier is already on, as a veth's is; otherwise the carrier's `linkwatch` event
    /// does, and then says so), while `IFF_RUNNING` follows the operational state, which
    /// `linkwatch` sets later: up to a second later where another link changed in the
    /// second before, anywhere on the machine (its rate limit). Until session 36 only
    /// `IFF_RUNNING` counted, and the frames that had gone into a dead link waited for it:
    /// 0.65 s after `ip link set up` in one of six rounds of
    /// `writes_go_on_across_the_initiators_link_set_down_and_up`, while the link carried
    /// frames from the `IFF_UP | IFF_LOWER_UP` event on.
    pub fn running(&self) -> bool {
        let up = libc::IFF_UP as u32;
        let carrier = (libc::IFF_LOWER_UP | libc::IFF_RUNNING) as u32;
        !self.deleted && self.flags & up != 0 && self.flags & carrier != 0
    }
}

/// A non-blocking rtnetlink socket in the calling thread's network namespace, member of
/// the link group. Poll its fd for reading, then [`drain`](Self::drain) it.
#[derive(Debug)]
pub struct LinkEvents {
    fd: OwnedFd,
    buf: Vec<u8>,
}

/// Room for one read: the kernel sizes a link message at a few KiB (`if_nlmsg_size`);
/// a read takes one datagram, which may carry several messages.
const BUF: usize = 32 << 10;

impl LinkEvents {
    /// Opens the socket (`AF_NETLINK`, `NETLINK_ROUTE`, bound to `RTMGRP_LINK`).
    pub fn new() -> io::Result<Self> {
        // SAFETY: socket(2) takes only integers; the result is checked by cvt.
        let raw = cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        })?;
        // SAFETY: `raw` was just returned by socket(2), is open and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value (pid 0: the kernel
        // assigns one).
        let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: `addr` is a valid sockaddr_nl and the length passed is its size.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        Ok(LinkEvents {
            fd,
            buf: vec![0; BUF],
        })
    }

    /// Reads every message queued now, without waiting. `Ok((events, overrun))`: the link
    /// messages in order, and whether the kernel dropped some because the socket's buffer
    /// was full (`ENOBUFS`): then the caller must look at every interface itself.
    pub fn drain(&mut self) -> io::Result<(Vec<LinkEvent>, bool)> {
        let mut events = Vec::new();
        let mut overrun = false;
        loop {
            // SAFETY: `buf` is `buf.len()` writable bytes owned by self; recv(2) writes at
            // most that many.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => return Ok((events, overrun)),
                    Some(libc::ENOBUFS) => {
                        overrun = true;
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Ok((events, overrun));
            }
            parse(&self.buf[..n as usize], &mut events);
        }
    }
}

impl AsRawFd for LinkEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// `struct nlmsghdr`: length (u32), type (u16), flags (u16), sequence (u32), port (u32).
const NLMSG_HDR: usize = 16;
/// `struct ifinfomsg`: family (u8), pad (u8), type (u16), index (i32), flags (u32),
/// change (u32).
const IFINFO: usize = 16;
/// `struct rtattr`: length (u16), type (u16).
const RTA_HDR: usize = 4;
/// The interface name attribute (`linux/if_link.h`; not in the libc crate for glibc).
const IFLA_IFNAME: u16 = 3;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// `NLMSG_ALIGN` / `RTA_ALIGN`: 4 bytes.
fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends the link messages of one datagram to `out`; anything malformed ends the walk.
fn parse(mut b: &[u8], out: &mut Vec<LinkEvent>) {
    while b.len() >= NLMSG_HDR {
        let Some(len) = u32_at(b, 0).map(|l| l as usize) else {
            return;
        };
        let Some(ty) = u16_at(b, 4) else {
            return;
        };
        if len < NLMSG_HDR || len > b.len() {
            return;
        }
        let msg = &b[NLMSG_HDR..len];
        if (ty == libc::RTM_NEWLINK || ty == libc::RTM_DELLINK) && msg.len() >= IFINFO {
            let index = u32_at(msg, 4).unwrap_or(0);
            let flags = u32_at(msg, 8).unwrap_or(0);
            let mut name = None;
            let mut a = &msg[IFINFO..];
            while a.len() >= RTA_HDR {
                let alen = u16_at(a, 0).unwrap_or(0) as usize;
                let aty = u16_at(a, 2).unwrap_or(0);
                if alen < RTA_HDR || alen > a.len() {
                    break;
                }
                if aty == IFLA_IFNAME {
                    let v = &a[RTA_HDR..alen];
                    let v = v.split(|&c| c == 0).next().unwrap_or(v);
                    name = Some(String::from_utf8_lossy(v).into_owned());
                }
                a = &a[align4(alen).min(a.len())..];
            }
            out.push(LinkEvent {
                deleted: ty == libc::RTM_DELLINK,
                index,
                name,
                flags,
            });
        }
        b = &b[align4(len).min(b.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One RTM_NEWLINK as the kernel sends it, cut to the name attribute.
    fn newlink(ty: u16, index: u32, flags: u32, name: &str) -> Vec<u8> {
        let mut attr = Vec::new();
        let alen = RTA_HDR + name.len() + 1;
        attr.extend_from_slice(&(alen as u16).to_ne_bytes()); // rta_len
        attr.extend_from_slice(&IFLA_IFNAME.to_ne_bytes()); // rta_type
        attr.extend_from_slice(name.as_bytes());
        attr.push(0); // NUL
        attr.resize(align4(attr.len()), 0);
        // An attribute the walk skips: IFLA_MTU (4), 4 bytes.
        attr.extend_from_slice(&8u16.to_ne_bytes());
        attr.extend_from_slice(&4u16.to_ne_bytes());
        attr.extend_from_slice(&1500u32.to_ne_bytes());
        let len = NLMSG_HDR + IFINFO + attr.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes()); // nlmsg_len
        m.extend_from_slice(&ty.to_ne_bytes()); // nlmsg_type
        m.extend_from_slice(&0u16.to_ne_bytes()); // nlmsg_flags
        m.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_seq
        m.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
        m.push(0); // ifi_family AF_UNSPEC
        m.push(0); // pad
        m.extend_from_slice(&1u16.to_ne_bytes()); // ifi_type ARPHRD_ETHER
        m.extend_from_slice(&index.to_ne_bytes()); // ifi_index
        m.extend_from_slice(&flags.to_ne_bytes()); // ifi_flags
        m.extend_from_slice(&0u32.to_ne_bytes()); // ifi_change
        m.extend_from_slice(&attr);
        m
    }

    #[test]
    fn link_messages_parse_with_index_flags_and_name() {
        let up = (libc::IFF_UP | libc::IFF_RUNNING) as u32;
        let mut d = newlink(libc::RTM_NEWLINK, 7, up, "veth-a");
        d.extend(newlink(libc::RTM_DELLINK, 8, 0, "b"));
        let mut out = Vec::new();
        parse(&d, &mut out);
        assert_eq!(
            out,
            vec![
                LinkEvent {
                    deleted: false,
                    index: 7,
                    name: Some("veth-a".into()),
                    flags: up
                },
                LinkEvent {
                    deleted: true,
                    index: 8,
                    name: Some("b".into()),
                    flags: 0
                },
            ]
        );
        assert!(out[0].running());
        assert!(!out[1].running());
    }

    /// Session 36: `ip link set up` of a veth whose peer is up sends `IFF_UP |
    /// IFF_LOWER_UP` at once and `IFF_RUNNING` only at the next `linkwatch` run (the flags
    /// 0x11003 and then 0x11043 of the probe's initiator log, 0.65 s apart): the first
    /// already says frames can go. Up without a carrier, or a carrier while down, does not.
    #[test]
    fn up_with_a_carrier_is_running_before_the_operational_state_says_so() {
        let event = |flags: u32| LinkEvent {
            deleted: false,
            index: 2,
            name: None,
            flags,
        };
        let (up, lower, running) = (
            libc::IFF_UP as u32,
            libc::IFF_LOWER_UP as u32,
            libc::IFF_RUNNING as u32,
        );
        assert!(
            event(0x11003).running(),
            "IFF_UP | IFF_LOWER_UP, not yet IFF_RUNNING"
        );
        assert!(event(0x11043).running());
        assert!(event(up | running).running());
        assert!(!event(up).running(), "up without a carrier");
        assert!(!event(lower).running(), "a carrier while down");
        assert!(!event(0x1002).running(), "the event of `ip link set down`");
        assert!(!LinkEvent {
            deleted: true,
            ..event(up | lower)
        }
        .running());
    }

    #[test]
    fn every_truncation_ends_the_walk_without_a_panic() {
        let d = newlink(libc::RTM_NEWLINK, 7, 0, "veth-a");
        for n in 0..d.len() {
            let mut out = Vec::new();
            parse(&d[..n], &mut out);
            assert!(out.is_empty(), "{n}: {out:?}");
        }
        // A length field that lies (longer than the datagram, or shorter than a header).
        let mut bad = d.clone();
        bad[0..4].copy_from_slice(&(d.len() as u32 + 1).to_ne_bytes());
        let mut out = Vec::new();
        parse(&bad, &mut out);
        assert!(out.is_empty());
        bad[0..4].copy_from_slice(&3u32.to_ne_bytes());
        parse(&bad, &mut out);
        assert!(out.is_empty());
    }
}
