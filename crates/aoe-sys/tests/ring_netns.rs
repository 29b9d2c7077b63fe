//! `PacketRing` (TPACKET_V2 receive and transmit rings) over a veth link between two
//! namespaces made by aoe-testkit: as the load generator uses it (`with_slots`: a receive
//! ring of header-sized slots, a transmit ring, or either alone), and as the target uses it
//! (a socket opened with its ring before the bind gets the very first frame; a reply built
//! in a transmit slot goes out only once committed). Needs root; nothing touches the host's
//! interfaces.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use aoe_sys::{poll, run_in_netns, PacketRing, PacketSocket, PollFd, ETH_P_AOE};
use aoe_testkit::{require_root, Netns, VethPair};

const WAIT: Duration = Duration::from_secs(5);

fn open_in(ns: &Netns, ifname: &str) -> PacketSocket {
    run_in_netns(&ns.path(), || PacketSocket::open(ifname))
        .expect("enter namespace")
        .unwrap_or_else(|e| panic!("open {ifname} in {}: {e}", ns.name()))
}

/// Two namespaces named after `prefix`, joined by a veth pair of `mtu`, with a socket open
/// on each end: `tx` on a, `rx` on b, and their MACs. Bind `_veth` and `_ns` by name:
/// dropping them removes the link.
struct Link {
    tx: PacketSocket,
    rx: PacketSocket,
    src: [u8; 6],
    dst: [u8; 6],
    _veth: VethPair,
    _ns: (Netns, Netns),
}

fn link(prefix: &str, mtu: u32) -> Link {
    let a = Netns::new(prefix).expect("namespace a");
    let b = Netns::new(prefix).expect("namespace b");
    let veth = VethPair::new(&a, &b, mtu).expect("veth pair");
    let tx = open_in(&a, veth.a_name());
    let rx = open_in(&b, veth.b_name());
    let (src, dst) = (tx.info().mac, rx.info().mac);
    Link {
        tx,
        rx,
        src,
        dst,
        _veth: veth,
        _ns: (a, b),
    }
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

/// Receives from the ring until `want` frames came or WAIT passed: (stored bytes, wire
/// length).
fn drain_within(sock: &PacketSocket, ring: &mut PacketRing, want: usize) -> Vec<(Vec<u8>, usize)> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        let n = ring.recv_batch(want - got.len());
        for i in 0..n {
            got.push((ring.frame(i).to_vec(), ring.wire_len(i)));
        }
        if n == 0 {
            let mut fds = [PollFd::new(sock.as_raw_fd())];
            poll(&mut fds, Some(Duration::from_millis(50))).expect("poll");
        }
    }
    got
}

/// Receives one frame through the socket itself (no receive ring), or panics after WAIT.
fn recv_one(sock: &PacketSocket) -> Vec<u8> {
    let mut buf = vec![0u8; 9014];
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(m) = sock.recv(&mut buf).expect("recv") {
            return buf[..m.len].to_vec();
        }
        assert!(Instant::now() < deadline, "no frame through recv");
        let mut fds = [PollFd::new(sock.as_raw_fd())];
        poll(&mut fds, Some(Duration::from_millis(50))).expect("poll");
    }
}

/// The send-only socket `open` makes (`PacketSocket::open_sender` or `open_linear_sender`)
/// and an AoE tap (`open_tap`, as `aoe trace` uses) on the link's end a, in its namespace;
/// `rx` and the tap get 8 MiB receive buffers, so a batch up to the MTU fits.
fn sender_and_tap(
    link: &Link,
    open: fn(&str) -> std::io::Result<PacketSocket>,
) -> (PacketSocket, PacketSocket) {
    link.rx.set_recv_buffer(8 << 20).expect("receive buffer");
    let name = link.tx.info().name.clone();
    let (sender, tap) = run_in_netns(&link._ns.0.path(), || {
        (open(&name), PacketSocket::open_tap(&name, ETH_P_AOE))
    })
    .expect("enter namespace");
    let sender = sender.expect("send-only socket");
    let tap = tap.expect("tap");
    tap.set_recv_buffer(8 << 20).expect("tap buffer");
    (sender, tap)
}

/// Each of `frames` (sent from end a) arrives unchanged and in order at the peer, and the
/// same bytes at the tap.
fn assert_peer_and_tap_get(link: &Link, tap: &PacketSocket, frames: &[Vec<u8>]) {
    for f in frames {
        assert_eq!(
            &recv_one(&link.rx),
            f,
            "frame of {} bytes at the peer",
            f.len()
        );
    }
    for f in frames {
        assert_eq!(&recv_one(tap), f, "frame of {} bytes at the tap", f.len());
    }
}

/// A frame sent to end a reaches its AoE socket and not `sender` (`what`, in the message).
fn assert_sender_receives_nothing(link: &Link, sender: &PacketSocket, what: &str) {
    let back = frame(link.src, link.dst, 200, 9);
    link.rx.send(&back).expect("send back");
    assert_eq!(recv_one(&link.tx), back);
    let mut buf = vec![0u8; 9014];
    assert!(
        sender.recv(&mut buf).expect("recv on the sender").is_none(),
        "{what} received a frame"
    );
}

#[test]
fn header_slots_keep_the_headers_and_the_wire_length_then_give_the_socket_back() {
    require_root();
    let Link {
        tx,
        rx,
        src,
        dst,
        _veth,
        _ns,
    } = link("aoering", 9000);

    // More frames than the ring's first block holds, so the walk crosses blocks: big ones
    // are cut to the slot, small ones are whole, order is kept.
    let mut ring = PacketRing::with_slots(&rx, 64, 2048, 0, 0).expect("receive ring");
    assert!(ring.rx_frames() >= 2048);
    assert_eq!(ring.tx_frames(), 0);
    let sizes: Vec<usize> = (0..600).map(|i| [60, 1514, 9014, 100][i % 4]).collect();
    for (i, &len) in sizes.iter().enumerate() {
        tx.send(&frame(dst, src, len, i as u8)).expect("send");
    }
    let got = drain_within(&rx, &mut ring, sizes.len());
    assert_eq!(got.len(), sizes.len(), "every frame reached the ring");
    for (i, ((data, wire), &len)) in got.iter().zip(&sizes).enumerate() {
        assert_eq!(*wire, len, "frame {i}: wire length");
        assert!(
            data.len() >= len.min(64),
            "frame {i}: {} bytes stored",
            data.len()
        );
        let want = frame(dst, src, len, i as u8);
        assert_eq!(data[..], want[..data.len()], "frame {i}: stored bytes");
    }
    // The ring goes around: frames given back are reused.
    for round in 0..4u8 {
        for i in 0..700u32 {
            tx.send(&frame(dst, src, 200, round ^ i as u8))
                .expect("send");
        }
        let got = drain_within(&rx, &mut ring, 700);
        assert_eq!(got.len(), 700, "round {round}");
        assert!(got
            .iter()
            .all(|(d, w)| *w == 200 && d.len() >= 64 && d.len() < 200));
    }

    // Dropped, the ring is removed and the socket receives through recv again; a second
    // ring can be made afterwards (what `aoe bench verify` does between its phases).
    drop(ring);
    tx.send(&frame(dst, src, 1000, 9)).expect("send");
    assert_eq!(recv_one(&rx), frame(dst, src, 1000, 9));
    let mut again = PacketRing::with_slots(&rx, 64, 16, 0, 0).expect("a second ring");
    tx.send(&frame(dst, src, 300, 5)).expect("send");
    let got = drain_within(&rx, &mut again, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, 300);
}

#[test]
fn transmit_ring_alone_sends_every_pushed_frame_and_leaves_receiving_to_the_socket() {
    require_root();
    let Link {
        tx,
        rx,
        src,
        dst,
        _veth,
        _ns,
    } = link("aoering", 1500);
    rx.set_recv_buffer(8 << 20).expect("receive buffer");

    let mut ring = PacketRing::with_slots(&tx, 0, 0, 1514, 64).expect("transmit ring");
    assert_eq!(ring.rx_frames(), 0);
    assert!(ring.tx_frames() >= 64);
    // Nothing to receive through a ring that is not there.
    assert_eq!(ring.recv_batch(8), 0);
    // Several times round the ring, a batch per kick: each frame arrives once, in order.
    let mut sent = 0u32;
    for round in 0..10u32 {
        let mut batch = Vec::new();
        for k in 0..40u32 {
            let f = frame(
                dst,
                src,
                [60, 1514, 777][(k % 3) as usize],
                (round * 40 + k) as u8,
            );
            // A slot still held by the kernel: kick and wait for it.
            let deadline = Instant::now() + WAIT;
            while !ring.push(&f).expect("push") {
                ring.kick().ok();
                assert!(Instant::now() < deadline, "transmit slots never came back");
                std::thread::yield_now();
            }
            batch.push(f);
        }
        assert!(ring.needs_kick());
        ring.kick().expect("kick");
        assert!(!ring.needs_kick());
        for (k, f) in batch.iter().enumerate() {
            assert_eq!(&recv_one(&rx), f, "round {round} frame {k}");
        }
        sent += 40;
    }
    assert_eq!(sent, 400);
    assert_eq!(ring.stats().tx_rejected, 0);
    // A frame larger than a slot is refused before anything is copied.
    let err = ring.push(&vec![0u8; 1600]).expect_err("too large");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    // While the transmit ring exists every send on the socket goes through it (packet_sendmsg
    // calls tpacket_snd); dropped, it is removed and the socket's own sends go out again.
    assert!(
        tx.send(&frame(dst, src, 90, 1)).is_err(),
        "send beside a TX ring"
    );
    drop(ring);
    tx.send(&frame(dst, src, 90, 2))
        .expect("send after the ring");
    assert_eq!(recv_one(&rx), frame(dst, src, 90, 2));
    // Neither ring: refused.
    assert!(PacketRing::with_slots(&rx, 64, 0, 64, 0).is_err());
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

/// A file of `len` bytes on the disk file system (the target directory, not tmpfs, which
/// has no `RWF_NOWAIT`), every byte a function of its position, written back so its pages
/// can be dropped from the page cache.
fn disk_file(name: &str, len: usize) -> (std::fs::File, Vec<u8>) {
    use std::io::Write;
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}", std::process::id()));
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("create file");
    f.write_all(&data).expect("write file");
    f.sync_all().expect("fsync");
    std::fs::remove_file(&path).expect("unlink");
    (f, data)
}

#[test]
fn reads_go_straight_into_transmit_slots_and_a_given_up_slot_leaves_no_hole() {
    use aoe_sys::{NoWait, SlotRead, SlotReads};
    use std::os::fd::AsFd;
    require_root();
    let Link {
        tx,
        rx,
        src,
        dst,
        _veth,
        _ns,
    } = link("aoeur", 1500);
    rx.set_recv_buffer(8 << 20).expect("receive buffer");
    let mut ring = PacketRing::with_slots(&tx, 0, 0, 1514, 64).expect("transmit ring");
    let mut reads = SlotReads::new(4).expect("io_uring");

    // Six frames, each an Ethernet header followed by 1000 bytes of the file read into its
    // slot: more reads than the io_uring's 4 entries, so they go in two submissions. The
    // file's third 64 KiB is not in the page cache: its read would wait for the disk, so
    // with RWF_NOWAIT it comes back at once as WouldBlock, and its slot is given up. (The
    // whole file is dropped and the rest read back: a written file sits in large folios,
    // which POSIX_FADV_DONTNEED does not drop in part.)
    let (file, data) = disk_file("slot-reads", 6 << 16);
    // SAFETY: posix_fadvise only reads its integer arguments.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
    let offset = |j: usize| (j as u64) << 16;
    for j in [0, 1, 3, 4, 5] {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut [0u8; 1000], offset(j))
            .expect("read into the page cache");
    }
    for j in 0..6 {
        let slot = ring.slot_ahead(j).expect("free slot");
        slot[..14].copy_from_slice(&frame(dst, src, 14, 0));
        slot[14] = j as u8;
    }
    let mut out = Vec::new();
    let mut list: Vec<SlotRead> = (0..6)
        .map(|j| SlotRead {
            file: file.as_fd(),
            offset: offset(j),
            slot: j,
            at: 15,
            len: 1000,
            user: j,
        })
        .collect();
    // A slot past the ring and a range past the slot are refused, not started.
    list.push(SlotRead {
        slot: ring.tx_frames(),
        user: 100,
        ..list[0]
    });
    list.push(SlotRead {
        at: ring.tx_frame_cap() - 10,
        user: 101,
        ..list[0]
    });
    reads
        .read_into_slots(&mut ring, list, &mut out)
        .expect("read_into_slots");
    out.sort_by_key(|(u, _)| *u);
    let results: Vec<String> = out.iter().map(|(u, r)| format!("{u}: {r:?}")).collect();
    assert_eq!(out.len(), 8, "one result per read: {results:?}");
    for (u, r) in &out {
        match u {
            2 => assert!(
                matches!(r, Ok(NoWait::WouldBlock)),
                "the uncached read: {r:?}"
            ),
            100 | 101 => assert_eq!(
                r.as_ref().map_err(std::io::Error::kind).unwrap_err(),
                std::io::ErrorKind::InvalidInput
            ),
            _ => assert!(matches!(r, Ok(NoWait::Done(1000))), "read {u}: {r:?}"),
        }
    }
    // Marked in order, the reply of the given-up slot left out: the ones after it move down
    // one slot each, and nothing is sent before the kick.
    let mut skipped = 0;
    for j in 0..6 {
        if j == 2 {
            skipped += 1;
            continue;
        }
        ring.commit_from(skipped, 1015).expect("commit");
    }
    assert!(frames_within(&rx, Duration::from_millis(200)).is_empty());
    ring.kick().expect("kick");
    let got = frames_within(&rx, Duration::from_millis(500));
    let want: Vec<Vec<u8>> = [0, 1, 3, 4, 5]
        .iter()
        .map(|&j| {
            let mut f = frame(dst, src, 14, 0);
            f.push(j as u8);
            f.extend_from_slice(&data[(j << 16)..(j << 16) + 1000]);
            f
        })
        .collect();
    assert_eq!(got.len(), want.len(), "frames sent");
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g == w, "frame {k} differs");
    }
}

/// Issue 15: with both rings the socket carries a `virtio_net_hdr` before each frame
/// (`PACKET_VNET_HDR`, so that a transmitted frame is copied into the skb rather than
/// attached as ring pages veth then copies again). The header must never show: frames of
/// every size up to a jumbo frame arrive byte for byte, and received frames start at their
/// destination address.
#[test]
fn both_rings_send_and_receive_frames_unchanged() {
    require_root();
    let Link {
        tx,
        rx,
        src,
        dst,
        _veth,
        _ns,
    } = link("aoevnet", 9000);
    rx.set_recv_buffer(8 << 20).expect("receive buffer");
    let mut ring = PacketRing::new(&tx, 9014, 64, 64).expect("both rings");
    assert!(ring.tx_frame_cap() >= 9014);
    let sizes = [60usize, 61, 1514, 2047, 2048, 2049, 4000, 9014];
    for (k, &len) in sizes.iter().enumerate() {
        let f = frame(dst, src, len, k as u8);
        assert!(ring.push(&f).expect("push"), "a free slot");
        ring.kick().expect("kick");
        assert_eq!(recv_one(&rx), f, "frame of {len} bytes");
    }
    for (k, &len) in sizes.iter().enumerate() {
        let f = frame(src, dst, len, 100 + k as u8);
        rx.send(&f).expect("send to the ring");
        let got = drain_within(&tx, &mut ring, 1);
        assert_eq!(got.len(), 1, "frame of {len} bytes not received");
        assert_eq!(got[0].0, f, "frame of {len} bytes received changed");
        assert_eq!(got[0].1, len, "wire length");
    }
}

/// `rx_ready` says whether `recv_batch` would lend a frame, without taking it: false on an
/// empty ring, true once a frame came (waited for with poll, which answers from the same
/// status word), still true until the frame is lent, false again after, and true for the
/// next frame; poll(2) calls the socket readable while a frame is lent, and not after
/// `release_lent` (the target's loop woke at once after each batch for this).
#[test]
fn rx_ready_tells_a_waiting_frame_without_taking_it() {
    require_root();
    let Link {
        tx,
        rx,
        src,
        dst,
        _veth,
        _ns,
    } = link("aoevrdy", 1500);
    let mut ring = PacketRing::new(&tx, 1514, 64, 64).expect("both rings");
    assert!(!ring.rx_ready(), "an empty ring");
    for k in 0..2u8 {
        let f = frame(src, dst, 60, k);
        rx.send(&f).expect("send to the ring");
        let mut fds = [PollFd::new(tx.as_raw_fd())];
        assert_eq!(
            poll(&mut fds, Some(WAIT)).expect("poll"),
            1,
            "frame {k} came"
        );
        assert!(ring.rx_ready(), "frame {k} waits");
        assert!(ring.rx_ready(), "asking takes nothing");
        assert_eq!(ring.recv_batch(8), 1);
        assert_eq!(ring.frame(0), &f[..]);
        assert!(!ring.rx_ready(), "frame {k} lent, nothing else waits");
        // The kernel's poll still calls the socket readable while the frame is lent (the
        // slot before its next one is not TP_STATUS_KERNEL), and not once it is given back.
        let mut fds = [PollFd::new(tx.as_raw_fd())];
        assert_eq!(
            poll(&mut fds, Some(Duration::ZERO)).expect("poll"),
            1,
            "lent"
        );
        ring.release_lent();
        assert_eq!(
            poll(&mut fds, Some(Duration::ZERO)).expect("poll"),
            0,
            "given back"
        );
    }
}

/// Issue 14 (fixes round): a kick that the socket's send buffer cuts short (the kernel's
/// tpacket_snd stops at the first frame it cannot charge to the buffer and returns the
/// bytes sent so far, a success) leaves `needs_kick` true, so the caller kicks again until
/// every frame is out, as the target's loop does while `needs_kick` holds. The link's
/// sender holds its frames in a slow tbf qdisc (each charged to the socket until the qdisc
/// lets it go) and has a small SO_SNDBUF; 64 frames of 1514 bytes are pushed and kicked
/// once. On main `kick` took the partial send for the whole and cleared `needs_kick`: the
/// rest stayed marked in the ring (until the next push and kick, a retransmission's reply
/// in the target) and the peer got about a dozen of the 64.
#[test]
fn a_kick_cut_short_by_the_send_buffer_leaves_the_rest_to_kick() {
    require_root();
    let a = Netns::new("aoekick").expect("namespace a");
    let b = Netns::new("aoekick").expect("namespace b");
    let veth = VethPair::new(&a, &b, 1500).expect("veth pair");
    // 20 Mbit/s: 64 full frames take about 40 ms to leave.
    a.run(
        "tc",
        &[
            "qdisc",
            "add",
            "dev",
            veth.a_name(),
            "root",
            "tbf",
            "rate",
            "20mbit",
            "burst",
            "4kb",
            "limit",
            "1mb",
        ],
    )
    .expect("tc qdisc add tbf");
    let tx = open_in(&a, veth.a_name());
    let rx = open_in(&b, veth.b_name());
    rx.set_recv_buffer(8 << 20).expect("receive buffer");
    let (src, dst) = (tx.info().mac, rx.info().mac);
    let mut ring = PacketRing::with_slots(&tx, 0, 0, 1514, 64).expect("transmit ring");
    // Room for a few frames in flight (the kernel doubles it and keeps a floor).
    tx.set_send_buffer(8 << 10).expect("send buffer");
    let frames: Vec<Vec<u8>> = (0..64u8).map(|k| frame(dst, src, 1514, k)).collect();
    for f in &frames {
        assert!(ring.push(f).expect("push"), "a free slot");
    }
    let first = ring.kick();
    // The caller's loop: kick again while frames are left, a millisecond apart (the
    // target's KICK_RETRY), for at most WAIT.
    let deadline = Instant::now() + WAIT;
    while ring.needs_kick() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
        match ring.kick() {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("kick: {e}"),
        }
    }
    let got = frames_within(&rx, Duration::from_secs(2));
    assert_eq!(
        got.len(),
        frames.len(),
        "{} of {} frames reached the peer (first kick: {first:?}, needs_kick: {})",
        got.len(),
        frames.len(),
        ring.needs_kick()
    );
    assert_eq!(got, frames, "order and bytes");
    drop(ring);
    drop((tx, rx));
    drop(veth);
}

/// The initiator's transmit path: a transmit ring on a send-only socket
/// (`PacketSocket::open_sender`, `PacketRing::sender`) beside the socket that receives.
/// Frames pushed in two parts (headers, data) arrive whole and unchanged at every size up
/// to the MTU, a batch per kick, through the `virtio_net_hdr` (a wrong data offset in the
/// slot would shift every byte); an `ETH_P_ALL` tap (`aoe trace`) sees them leave; the
/// sender receives nothing sent to it; the receiving AoE socket on the same interface keeps
/// its own `send`; and a socket bound to an ethertype is refused a sender ring (it would
/// read the header before each frame it receives).
#[test]
fn a_sender_ring_sends_frames_in_parts_that_taps_see_and_receives_nothing() {
    require_root();
    let link = link("aoesend", 9000);
    let (sender, tap) = sender_and_tap(&link, PacketSocket::open_sender);
    let (src, dst) = (link.src, link.dst);
    assert_eq!(sender.ethertype(), 0);
    let err = PacketRing::sender(&link.tx, 128, 16).expect_err("a receiving socket");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);

    let mut ring = PacketRing::sender(&sender, 9014, 64).expect("sender ring");
    assert!(ring.has_vnet_hdr(), "PACKET_VNET_HDR on the sender ring");
    assert!(ring.tx_frame_cap() >= 9014);
    let sizes = [60usize, 61, 1514, 2047, 2049, 4000, 8750, 9014];
    let frames: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(k, &len)| frame(dst, src, len, k as u8))
        .collect();
    for f in &frames {
        // Headers and data apart, as the initiator's engine hands a write frame over.
        let (head, data) = f.split_at(36.min(f.len()));
        assert!(ring.push_parts(&[head, data]).expect("push"), "a free slot");
    }
    assert_eq!(ring.stats().tx_marked, sizes.len() as u64);
    ring.kick().expect("kick");
    assert!(!ring.needs_kick());
    assert_peer_and_tap_get(&link, &tap, &frames);
    // Parts longer than a slot together are refused before anything is copied.
    let big = vec![0u8; 9000];
    let err = ring.push_parts(&[&big, &big]).expect_err("too large");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);

    // A frame sent to the interface reaches the AoE socket and not the sender.
    assert_sender_receives_nothing(&link, &sender, "the send-only socket");
    // The receiving socket has no transmit ring: its own sends go out as before.
    let f = frame(dst, src, 300, 10);
    link.tx.send(&f).expect("send beside a sender ring");
    assert_eq!(recv_one(&link.rx), f);
}

/// The linear sender (`open_linear_sender`, `send_batch_linear`: what the initiator sends
/// full-size write frames with, from the write's own buffer) puts each frame on the wire
/// exactly as given in its two parts, behind no `virtio_net_hdr` of its own, at every size
/// up to the MTU's; a tap sees the same bytes; it receives nothing. Sent with
/// `send_batch_parts` on the same socket, the 10-byte header would be read as the frame's
/// start and the frames would differ (or be refused): checked by sending through
/// `send_batch_parts` on it, which fails here.
#[test]
fn a_linear_sender_sends_frames_from_their_parts_unchanged() {
    require_root();
    let link = link("aoelin", 9000);
    let (sender, tap) = sender_and_tap(&link, PacketSocket::open_linear_sender);
    let (src, dst) = (link.src, link.dst);
    let sizes = [60usize, 61, 1514, 4132, 8740, 9014];
    let frames: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(k, &len)| frame(dst, src, len, 40 + k as u8))
        .collect();
    // Headers and data apart, as the initiator's engine hands a write frame over; one
    // frame with no data part at all.
    let parts: Vec<[&[u8]; 2]> = frames
        .iter()
        .enumerate()
        .map(|(k, f)| {
            let cut = if k == 1 { f.len() } else { 36 };
            let (head, data) = f.split_at(cut);
            [head, data]
        })
        .collect();
    assert_eq!(
        sender.send_batch_linear(&parts).expect("send"),
        frames.len()
    );
    assert_peer_and_tap_get(&link, &tap, &frames);
    // A frame longer than the MTU's is refused, as by any packet socket.
    let big = frame(dst, src, 9100, 1);
    let (head, data) = big.split_at(36);
    assert!(
        sender.send_batch_linear(&[[head, data]]).is_err(),
        "9100 bytes on MTU 9000"
    );
    // Nothing is delivered to it.
    assert_sender_receives_nothing(&link, &sender, "the linear sender");
}

/// A held receive slot (`hold`, what the initiator does for a read whose reply is still to
/// be sent) is never reused while held: the frames after it cycle through the other slots,
/// `recv_batch` stops at it instead of lending its old frame again, the kernel drops what
/// arrives when its head meets it (so the held bytes stay as they were), and once it is
/// released (`release_held`) the ring delivers into it again.
#[test]
fn a_held_slot_is_not_reused_until_released() {
    require_root();
    let Link {
        tx,
        rx,
        src,
        dst,
        _veth,
        _ns,
    } = link("aoehold", 1500);
    let mut ring = PacketRing::new(&tx, 1514, 8, 0).expect("receive ring");
    let n = ring.rx_slots();
    let first = frame(src, dst, 200, 0);
    rx.send(&first).expect("send");
    assert_eq!(recv_within(&tx, &mut ring), 1, "the first frame");
    assert_eq!(ring.frame(0), &first[..]);
    let slot = ring.hold(0);
    assert!(ring.is_held(slot));
    assert_eq!(ring.held_count(), 1);
    // A lap and a half of frames: the n - 1 other slots take the first ones.
    let later: Vec<Vec<u8>> = (1..=n + n / 2)
        .map(|k| frame(src, dst, 200, (k % 250) as u8 + 1))
        .collect();
    for f in &later {
        rx.send(f).expect("send");
    }
    let got = drain_within(&tx, &mut ring, n - 1);
    assert_eq!(got.len(), n - 1, "the other slots");
    for (k, (g, _)) in got.iter().enumerate() {
        assert_eq!(g, &later[k], "frame {} in order", k + 1);
    }
    assert_eq!(ring.recv_batch(n), 0, "stops at the held slot");
    assert!(!ring.rx_ready(), "the held slot is not a new frame");
    assert_eq!(
        ring.held_frame(slot).expect("held"),
        &first[..],
        "unchanged"
    );
    ring.release_held(slot);
    assert!(!ring.is_held(slot));
    assert_eq!(ring.held_count(), 0);
    // The ring delivers again (frames the kernel had not yet met the held slot with may
    // come first); the held frame never comes back as a new one.
    let last = frame(src, dst, 200, 0xff);
    rx.send(&last).expect("send");
    let deadline = Instant::now() + WAIT;
    let mut seen_last = false;
    while !seen_last {
        assert!(
            Instant::now() < deadline,
            "nothing delivered after the release"
        );
        for (g, _) in drain_within(&tx, &mut ring, 1) {
            assert_ne!(g, first, "the held frame lent again");
            assert!(g == last || later[n - 1..].contains(&g), "a frame sent");
            seen_last |= g == last;
        }
    }
}
