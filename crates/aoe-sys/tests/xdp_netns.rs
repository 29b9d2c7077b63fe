//! `XdpSocket` (AF_XDP, the hand-assembled XDP program, its XSKMAP and link) over a veth link
//! between two namespaces made by aoe-testkit: AoE frames sent from the peer reach the socket
//! and replies built in its transmit slots reach the peer, at MTU 1500 (one chunk a frame) and
//! 9000 (chains of chunks both ways), in native and generic mode; frames of any other
//! ethertype still reach the kernel's stack; dropping the socket detaches the program. Needs
//! root; nothing touches the host's interfaces.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use aoe_sys::{
    poll, run_in_netns, PacketSocket, PollFd, XdpConfig, XdpMode, XdpModeWanted, XdpSocket,
    ETH_P_AOE,
};
use aoe_testkit::{require_root, Netns, VethPair};

const WAIT: Duration = Duration::from_secs(5);

/// A frame of `len` bytes with this ethertype whose payload is a pattern seeded by `seed`.
fn frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    let mut x = seed;
    while f.len() < len {
        f.push(x);
        x = x.wrapping_mul(31).wrapping_add(7);
    }
    f
}

/// Frames received through the socket itself within `wait` (at most `want`).
fn recv_some(sock: &PacketSocket, want: usize, wait: Duration) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; 9014];
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        match sock.recv(&mut buf).expect("recv") {
            Some(m) => got.push(buf[..m.len].to_vec()),
            None => {
                let mut fds = [PollFd::new(sock.as_raw_fd())];
                poll(&mut fds, Some(Duration::from_millis(20))).expect("poll");
            }
        }
    }
    got
}

/// Frames the XDP socket lends within WAIT (at most `want`), copied out.
fn xdp_recv(x: &mut XdpSocket, want: usize) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        let n = x.recv_batch(want - got.len());
        for i in 0..n {
            got.push(x.frame(i).to_vec());
        }
        if n == 0 {
            let mut fds = [PollFd::new(x.as_raw_fd())];
            poll(&mut fds, Some(Duration::from_millis(20))).expect("poll");
        }
    }
    got
}

fn round_trip(mtu: u32, mode: XdpMode) {
    require_root();
    let a = Netns::new("aoexdp").expect("namespace a");
    let b = Netns::new("aoexdp").expect("namespace b");
    let veth = VethPair::new(&a, &b, mtu).expect("veth pair");
    let cap = aoe_sys::frame_capacity(mtu);
    let peer = run_in_netns(&a.path(), || PacketSocket::open(veth.a_name()))
        .expect("enter a")
        .expect("AoE socket in a");
    // 64 jumbo replies queued at once: more than the default receive buffer.
    peer.set_recv_buffer(8 << 20).expect("receive buffer");
    let other = 0x88b5; // IEEE local experimental ethertype: must pass to the stack
    let b_other = run_in_netns(&b.path(), || {
        PacketSocket::open_ethertype(veth.b_name(), other)
    })
    .expect("enter b")
    .expect("experimental-type socket in b");
    let cfg = XdpConfig {
        frame_cap: cap,
        rx_frames: 256,
        tx_frames: 64,
        mode: XdpModeWanted::Only(mode),
    };
    let mut x = run_in_netns(&b.path(), || XdpSocket::open(veth.b_name(), cfg))
        .expect("enter b")
        .unwrap_or_else(|e| panic!("AF_XDP socket on {} ({mode:?}): {e}", veth.b_name()));
    assert_eq!(x.mode(), mode);
    assert_eq!(x.tx_frame_cap(), cap);
    let (pa, pb) = (peer.info().mac, b_other.info().mac);

    // Requests of every size up to the MTU, more than the RX ring holds, so chunks go back
    // through the fill ring; each is answered by a reply built in a transmit slot: the
    // request's bytes reversed in order, resized to another length.
    let sizes = [60usize, 1514.min(cap), cap, 100, cap - 1, 4000.min(cap)];
    let mut sent = 0;
    for round in 0..8 {
        let mut reqs = Vec::new();
        for k in 0..64 {
            let f = frame(
                pb,
                pa,
                ETH_P_AOE,
                sizes[k % sizes.len()],
                (round * 64 + k) as u8,
            );
            peer.send(&f).expect("send request");
            reqs.push(f);
        }
        let got = xdp_recv(&mut x, reqs.len());
        assert_eq!(
            got.len(),
            reqs.len(),
            "round {round}: requests through AF_XDP"
        );
        assert_eq!(got, reqs, "round {round}: request bytes");
        // Replies: built in place from the lent frames, a kick per batch of 16.
        let mut want = Vec::new();
        for (k, req) in reqs.iter().enumerate() {
            let len = sizes[(k + 1) % sizes.len()];
            let reply = frame(pa, pb, ETH_P_AOE, len, req[14] ^ 0x5a);
            let deadline = Instant::now() + WAIT;
            loop {
                if x.push(&reply).expect("push") {
                    break;
                }
                x.kick().ok();
                assert!(Instant::now() < deadline, "transmit slots never came back");
                std::thread::yield_now();
            }
            want.push(reply);
            if k % 16 == 15 {
                x.kick().expect("kick");
            }
        }
        x.kick().expect("kick");
        assert!(!x.needs_kick());
        let back = recv_some(&peer, want.len(), WAIT);
        assert_eq!(back.len(), want.len(), "round {round}: replies");
        assert_eq!(back, want, "round {round}: reply bytes");
        sent += want.len();
    }
    assert_eq!(sent, 8 * 64);
    // A reply built in the slot frame_and_slot lends, while the request is read.
    let req = frame(pb, pa, ETH_P_AOE, 200, 77);
    peer.send(&req).expect("send");
    let deadline = Instant::now() + WAIT;
    while x.recv_batch(1) == 0 {
        assert!(Instant::now() < deadline, "request never came");
        let mut fds = [PollFd::new(x.as_raw_fd())];
        poll(&mut fds, Some(Duration::from_millis(20))).expect("poll");
    }
    let (r, slot) = x.frame_and_slot(0);
    let slot = slot.expect("a free slot");
    slot[..6].copy_from_slice(&r[6..12]);
    slot[6..12].copy_from_slice(&r[..6]);
    slot[12..200].copy_from_slice(&r[12..200]);
    x.commit(200).expect("commit");
    x.kick().expect("kick");
    let back = recv_some(&peer, 1, WAIT);
    assert_eq!(back, vec![frame(pa, pb, ETH_P_AOE, 200, 77)]);
    // Too long for a slot: refused, nothing sent.
    assert_eq!(
        x.push(&vec![0u8; cap + 1]).expect_err("too long").kind(),
        std::io::ErrorKind::InvalidInput
    );

    // Another ethertype is not the program's business: it reaches the stack.
    let f = frame(pb, pa, other, 300, 3);
    let peer_other = run_in_netns(&a.path(), || {
        PacketSocket::open_ethertype(veth.a_name(), other)
    })
    .expect("enter a")
    .expect("experimental-type socket in a");
    peer_other.send(&f).expect("send other");
    assert_eq!(recv_some(&b_other, 1, WAIT), vec![f]);
    let st = x.stats().expect("stats");
    assert_eq!((st.rx_dropped, st.tx_invalid), (0, 0), "{st:?}");

    // Dropped: the program is detached, so AoE frames reach an ordinary socket again.
    drop(x);
    let b_aoe = run_in_netns(&b.path(), || PacketSocket::open(veth.b_name()))
        .expect("enter b")
        .expect("AoE socket in b");
    // Sent again every 200 ms until one arrives: a frame sent while the veth is still taking
    // its XDP path down can be lost (the whole suite's run at 2026-12-04 21:34 got nothing
    // within 5 s from a single send; the test passed alone three times after, and in every
    // suite run before). What is asserted is that frames come through again, within WAIT.
    let f = frame(pb, pa, ETH_P_AOE, 120, 9);
    let deadline = Instant::now() + WAIT;
    let got = loop {
        peer.send(&f).expect("send after drop");
        let got = recv_some(&b_aoe, 1, Duration::from_millis(200));
        if !got.is_empty() || Instant::now() >= deadline {
            break got;
        }
    };
    assert_eq!(
        got,
        vec![f],
        "no AoE frame reached an ordinary socket after the detach"
    );
}

#[test]
fn aoe_frames_round_trip_through_af_xdp_native_mtu_1500() {
    round_trip(1500, XdpMode::Native);
}

#[test]
fn aoe_frames_round_trip_through_af_xdp_native_mtu_9000() {
    round_trip(9000, XdpMode::Native);
}

#[test]
fn aoe_frames_round_trip_through_af_xdp_generic_mtu_1500() {
    round_trip(1500, XdpMode::Generic);
}

#[test]
fn aoe_frames_round_trip_through_af_xdp_generic_mtu_9000() {
    round_trip(9000, XdpMode::Generic);
}

#[test]
fn auto_mode_takes_native_on_veth() {
    require_root();
    let a = Netns::new("aoexdp").expect("namespace a");
    let b = Netns::new("aoexdp").expect("namespace b");
    let veth = VethPair::new(&a, &b, 1500).expect("veth pair");
    let cfg = XdpConfig {
        frame_cap: 1514,
        rx_frames: 16,
        tx_frames: 16,
        mode: XdpModeWanted::Auto,
    };
    let x = run_in_netns(&b.path(), || XdpSocket::open(veth.b_name(), cfg))
        .expect("enter b")
        .expect("AF_XDP socket");
    assert_eq!(x.mode(), XdpMode::Native);
    // A second program on the same interface is refused with a message that says so.
    let e = run_in_netns(&b.path(), || XdpSocket::open(veth.b_name(), cfg))
        .expect("enter b")
        .err()
        .expect("second attach refused");
    assert!(e.to_string().contains(veth.b_name()), "{e}");
}
