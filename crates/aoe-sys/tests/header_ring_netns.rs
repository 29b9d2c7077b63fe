//! HeaderRxRing (the load generator's TPACKET_V2 RX ring) over a veth link between two
//! namespaces made by aoe-testkit. Needs root; nothing touches the host's interfaces.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use aoe_sys::{poll, run_in_netns, HeaderRxRing, PacketSocket, PollFd, ETH_P_AOE};
use aoe_testkit::{require_root, Netns, VethPair};

const WAIT: Duration = Duration::from_secs(5);

fn open_in(ns: &Netns, ifname: &str) -> PacketSocket {
    run_in_netns(&ns.path(), || PacketSocket::open(ifname))
        .expect("enter namespace")
        .unwrap_or_else(|e| panic!("open {ifname} in {}: {e}", ns.name()))
}

/// An AoE-typed frame of `len` bytes whose byte 14 is `seed` (the rest a pattern).
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

/// Drains the ring until `want` frames came or WAIT passed: (stored bytes, wire length).
fn drain_within(
    sock: &PacketSocket,
    ring: &mut HeaderRxRing<'_>,
    want: usize,
) -> Vec<(Vec<u8>, usize)> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        let n = ring.drain(want - got.len(), |data, wire| {
            got.push((data.to_vec(), wire))
        });
        if n == 0 {
            let mut fds = [PollFd::new(sock.as_raw_fd())];
            poll(&mut fds, Some(Duration::from_millis(50))).expect("poll");
        }
    }
    got
}

#[test]
fn ring_keeps_the_headers_and_the_wire_length_then_gives_the_socket_back() {
    require_root();
    let a = Netns::new("aoering").expect("namespace a");
    let b = Netns::new("aoering").expect("namespace b");
    let veth = VethPair::new(&a, &b, 9000).expect("veth pair");
    let tx = open_in(&a, veth.a_name());
    let rx = open_in(&b, veth.b_name());
    let (src, dst) = (tx.info().mac, rx.info().mac);

    // More frames than the ring's first block holds, so the walk crosses blocks: big ones
    // are cut to the 64 stored bytes, small ones are whole, order is kept.
    let mut ring = HeaderRxRing::attach(&rx, 64, 2048).expect("attach the ring");
    assert!(ring.frames() >= 2048);
    let sizes: Vec<usize> = (0..600).map(|i| [60, 1514, 9014, 100][i % 4]).collect();
    for (i, &len) in sizes.iter().enumerate() {
        tx.send(&frame(dst, src, len, i as u8)).expect("send");
    }
    let got = drain_within(&rx, &mut ring, sizes.len());
    assert_eq!(got.len(), sizes.len(), "every frame reached the ring");
    for (i, ((data, wire), &len)) in got.iter().zip(&sizes).enumerate() {
        assert_eq!(*wire, len, "frame {i}: wire length");
        let want = frame(dst, src, len, i as u8);
        assert_eq!(data[..], want[..len.min(64)], "frame {i}: stored bytes");
    }
    // The ring goes around: frames given back are reused.
    for round in 0..4u8 {
        for i in 0..700u32 {
            tx.send(&frame(dst, src, 200, round ^ i as u8))
                .expect("send");
        }
        let got = drain_within(&rx, &mut ring, 700);
        assert_eq!(got.len(), 700, "round {round}");
        assert!(got.iter().all(|(d, w)| *w == 200 && d.len() == 64));
    }

    // Dropped, the ring is removed and the socket receives through recv again; a second
    // ring can be attached afterwards (what `aoe bench verify` does between its phases).
    drop(ring);
    tx.send(&frame(dst, src, 1000, 9)).expect("send");
    let mut buf = vec![0u8; 9014];
    let deadline = Instant::now() + WAIT;
    let meta = loop {
        if let Some(m) = rx.recv(&mut buf).expect("recv") {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "no frame through recv after the ring was dropped"
        );
        let mut fds = [PollFd::new(rx.as_raw_fd())];
        poll(&mut fds, Some(Duration::from_millis(50))).expect("poll");
    };
    assert_eq!(buf[..meta.len], frame(dst, src, 1000, 9)[..]);
    let mut again = HeaderRxRing::attach(&rx, 64, 16).expect("attach a second ring");
    tx.send(&frame(dst, src, 300, 5)).expect("send");
    let got = drain_within(&rx, &mut again, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, 300);
}
