//! PacketRing (the target's TPACKET_V2 receive and transmit rings) over a veth link between
//! two namespaces made by aoe-testkit: a socket opened with its ring before the bind gets the
//! very first frame, and a reply built in a transmit slot goes out only once committed.
//! Needs root; nothing touches the host's interfaces.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use aoe_sys::{poll, run_in_netns, PacketRing, PacketSocket, PollFd, ETH_P_AOE};
use aoe_testkit::{require_root, Netns, VethPair};

const WAIT: Duration = Duration::from_secs(5);

/// An AoE-typed frame of `len` bytes whose byte 14 on is `seed` and a pattern.
fn frame(dst: [u8; 6], src: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETH_P_AOE.to_be_bytes());
    let mut x = seed;
    while f.len() < len {
        f.push(x);
        x = x.wrapping_mul(31).wrapping_add(7);
    }
    f
}

/// Waits until the ring lends at least one frame; returns how many.
fn recv_within(sock: &PacketSocket, ring: &mut PacketRing) -> usize {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = ring.recv_batch(64);
        if n > 0 || Instant::now() >= deadline {
            return n;
        }
        let mut fds = [PollFd::new(sock.as_raw_fd())];
        poll(&mut fds, Some(Duration::from_millis(50))).expect("poll");
    }
}

/// Frames that reach `sock` within `wait`.
fn frames_within(sock: &PacketSocket, wait: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 9100];
    let mut got = Vec::new();
    while Instant::now() < deadline {
        match sock.recv(&mut buf).expect("recv") {
            Some(m) => got.push(buf[..m.len].to_vec()),
            None => {
                let mut fds = [PollFd::new(sock.as_raw_fd())];
                let left = deadline.saturating_duration_since(Instant::now());
                poll(&mut fds, Some(left.min(Duration::from_millis(50)))).expect("poll");
            }
        }
    }
    got
}

#[test]
fn a_reply_built_in_a_transmit_slot_goes_out_once_committed() {
    require_root();
    let a = Netns::new("aoepr").expect("namespace a");
    let b = Netns::new("aoepr").expect("namespace b");
    let veth = VethPair::new(&a, &b, 1500).expect("veth pair");
    let (a_if, b_if) = (veth.a_name().to_owned(), veth.b_name().to_owned());
    let (sock, mut ring) = run_in_netns(&a.path(), move || {
        PacketSocket::open_with_ring(&a_if, 60, 64)
    })
    .expect("enter namespace")
    .expect("open with ring");
    let peer = run_in_netns(&b.path(), move || PacketSocket::open(&b_if))
        .expect("enter namespace")
        .expect("open peer");
    let (me, them) = (sock.info().mac, peer.info().mac);

    // The first frame after the bind is in the ring.
    let req = frame(me, them, 100, 1);
    peer.send(&req).expect("send request");
    assert_eq!(recv_within(&sock, &mut ring), 1, "request not in the ring");
    let (got, slot) = ring.frame_and_slot(0);
    assert_eq!(got, &req[..]);
    let slot = slot.expect("an empty transmit ring has a free slot");
    assert!(slot.len() >= 1514);

    // Built but not committed: nothing goes out, and the same slot is lent again.
    let first = slot.as_ptr();
    slot[..60].copy_from_slice(&frame(them, me, 60, 9));
    ring.kick().expect("kick");
    assert!(frames_within(&peer, Duration::from_millis(300)).is_empty());
    let (_, slot) = ring.frame_and_slot(0);
    let slot = slot.expect("still free");
    assert_eq!(slot.as_ptr(), first, "an uncommitted slot is lent again");

    // Built and committed: it goes out as built, and the next slot is another.
    let reply = frame(them, me, 1000, 2);
    slot[..reply.len()].copy_from_slice(&reply);
    ring.commit(reply.len()).expect("commit");
    assert!(ring.needs_kick());
    ring.kick().expect("kick");
    assert_eq!(
        frames_within(&peer, Duration::from_millis(500)),
        vec![reply]
    );
    let (_, next) = ring.frame_and_slot(0);
    assert_ne!(next.expect("free").as_ptr(), first);

    // Too long for a slot: refused, nothing marked.
    assert!(ring.commit(ring.tx_frame_cap() + 1).is_err());
    assert!(!ring.needs_kick());
}
