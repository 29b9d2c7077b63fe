//! PacketSocket over real veth links between network namespaces made by aoe-testkit.
//!
//! Needs root. Every frame stays on veth links inside namespaces these tests create and
//! delete; nothing is bound to the host's own interfaces.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use aoe_sys::{
    frame_capacity, interface_info, list_interfaces, poll, run_in_netns, PacketSocket, PollFd,
    RecvBatch, RecvMeta, ETH_P_AOE,
};
use aoe_testkit::{require_root, Bridge, End, Netns, VethPair};

const WAIT: Duration = Duration::from_secs(5);
/// How long a "nothing arrives" check waits.
const QUIET: Duration = Duration::from_millis(300);
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ALL: u16 = 0x0003;

/// Two namespaces joined by a veth pair. Field order is drop order: the link goes first.
struct Link {
    veth: VethPair,
    a: Netns,
    b: Netns,
}

fn link(mtu: u32) -> Link {
    require_root();
    let a = Netns::new("aoesys").expect("create namespace a");
    let b = Netns::new("aoesys").expect("create namespace b");
    let veth = VethPair::new(&a, &b, mtu).expect("create veth pair");
    Link { veth, a, b }
}

/// Opens a socket for `ethertype` on `ifname` inside `ns` (from a helper thread that entered
/// the namespace; the socket stays in that namespace).
fn open_in(ns: &Netns, ifname: &str, ethertype: u16) -> PacketSocket {
    run_in_netns(&ns.path(), || {
        PacketSocket::open_ethertype(ifname, ethertype)
    })
    .expect("enter namespace")
    .unwrap_or_else(|e| panic!("open {ifname} in {}: {e}", ns.name()))
}

/// An Ethernet frame of `len` bytes: dst, src, ethertype, then a recognisable pattern
/// starting with `seed`.
fn frame(dst: [u8; 6], src: [u8; 6], ethertype: u16, len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst); // destination MAC
    f.extend_from_slice(&src); // source MAC
    f.extend_from_slice(&ethertype.to_be_bytes()); // ethertype
    let mut x = seed;
    while f.len() < len {
        f.push(x);
        x = x.wrapping_mul(31).wrapping_add(7);
    }
    f.truncate(len);
    f
}

fn wait_readable(sock: &PacketSocket, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(sock.as_raw_fd())];
        if poll(&mut fds, Some(left)).expect("poll") > 0 {
            return true;
        }
        if left.is_zero() {
            return false;
        }
    }
}

/// Waits up to `timeout` for one frame.
fn recv_within(sock: &PacketSocket, buf: &mut [u8], timeout: Duration) -> Option<RecvMeta> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(meta) = sock.recv(buf).expect("recv") {
            return Some(meta);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !wait_readable(sock, left) {
            return None;
        }
    }
}

/// Receives with recv_batch until `want` frames arrived or the wait ran out.
fn recv_batch_within(sock: &PacketSocket, batch: &mut RecvBatch, want: usize) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while got.len() < want {
        let n = sock.recv_batch(batch).expect("recv_batch");
        assert_eq!(n, batch.len());
        for (data, meta) in batch.iter() {
            assert!(!meta.truncated);
            assert_eq!(data.len(), meta.len);
            got.push(data.to_vec());
        }
        if n == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !wait_readable(sock, left) {
                break;
            }
        }
    }
    got
}

#[test]
fn sixty_byte_frame_crosses_a_1500_link_both_ways() {
    let l = link(1500);
    let sa = open_in(&l.a, l.veth.a_name(), ETH_P_AOE);
    let sb = open_in(&l.b, l.veth.b_name(), ETH_P_AOE);
    assert_eq!(sa.info().mtu, 1500);
    assert_eq!(sa.info().mac, l.veth.a_mac());
    assert_eq!(sb.info().mac, l.veth.b_mac());
    assert_eq!(sa.ethertype(), ETH_P_AOE);

    // A -> B with recv.
    let f = frame(l.veth.b_mac(), l.veth.a_mac(), ETH_P_AOE, 60, 1);
    sa.send(&f).expect("send 60-byte frame");
    let mut buf = vec![0u8; frame_capacity(1500)];
    let meta = recv_within(&sb, &mut buf, WAIT).expect("B receives the frame");
    assert_eq!(
        meta,
        RecvMeta {
            len: 60,
            truncated: false,
            src: l.veth.a_mac()
        }
    );
    assert_eq!(&buf[..meta.len], &f[..]);

    // B -> A with recv_batch, broadcast destination.
    let g = frame([0xff; 6], l.veth.b_mac(), ETH_P_AOE, 60, 2);
    sb.send(&g).expect("send broadcast");
    let mut batch = RecvBatch::new(4, frame_capacity(1500));
    let got = recv_batch_within(&sa, &mut batch, 1);
    assert_eq!(got, vec![g]);
    assert_eq!(batch.meta(0).src, l.veth.b_mac());

    // The sender does not see its own frames.
    assert_eq!(sb.recv(&mut buf).unwrap(), None);
    assert!(!wait_readable(&sb, QUIET));
}

#[test]
fn jumbo_frame_crosses_a_9000_link() {
    let l = link(9000);
    let sa = open_in(&l.a, l.veth.a_name(), ETH_P_AOE);
    let sb = open_in(&l.b, l.veth.b_name(), ETH_P_AOE);
    assert_eq!(sb.info().mtu, 9000);
    let cap = frame_capacity(sb.info().mtu);
    assert_eq!(cap, 9014);

    let f = frame(l.veth.b_mac(), l.veth.a_mac(), ETH_P_AOE, 9014, 3);
    sa.send(&f).expect("send 9014-byte frame");
    let mut buf = vec![0u8; cap];
    let meta = recv_within(&sb, &mut buf, WAIT).expect("B receives the jumbo frame");
    assert_eq!(meta.len, 9014);
    assert!(!meta.truncated);
    assert_eq!(&buf[..meta.len], &f[..]);

    // The same through recv_batch.
    sa.send(&f).expect("send again");
    let mut batch = RecvBatch::new(2, cap);
    assert_eq!(recv_batch_within(&sb, &mut batch, 1), vec![f.clone()]);

    // Too small a buffer: truncated, reported, no panic; len never exceeds the buffer.
    sa.send(&f).expect("send once more");
    let mut small = [0u8; 100];
    let meta = recv_within(&sb, &mut small, WAIT).expect("receive truncated");
    assert!(meta.truncated);
    assert_eq!(meta.len, 100);
    assert_eq!(&small[..], &f[..100]);

    // And in a batch with small slots.
    sa.send(&f).expect("send for small batch");
    let mut small_batch = RecvBatch::new(2, 64);
    assert!(wait_readable(&sb, WAIT));
    assert_eq!(sb.recv_batch(&mut small_batch).unwrap(), 1);
    assert!(small_batch.meta(0).truncated);
    assert_eq!(small_batch.frame(0), &f[..64]);

    // One byte over MTU + 14 is refused by the kernel, as an error rather than a panic.
    let too_big = frame(l.veth.b_mac(), l.veth.a_mac(), ETH_P_AOE, 9015, 4);
    let err = sa.send(&too_big).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EMSGSIZE), "{err}");
}

#[test]
fn send_batch_and_recv_batch_keep_order() {
    let l = link(1500);
    let sa = open_in(&l.a, l.veth.a_name(), ETH_P_AOE);
    let sb = open_in(&l.b, l.veth.b_name(), ETH_P_AOE);
    let frames: Vec<Vec<u8>> = (0..70u8)
        .map(|i| {
            frame(
                l.veth.b_mac(),
                l.veth.a_mac(),
                ETH_P_AOE,
                60 + usize::from(i),
                i,
            )
        })
        .collect();
    let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    // 70 frames: more than one internal sendmmsg chunk of 64.
    assert_eq!(sa.send_batch(&refs).expect("send_batch"), 70);
    assert_eq!(sa.send_batch(&[]).unwrap(), 0);
    let mut batch = RecvBatch::new(16, frame_capacity(1500));
    let got = recv_batch_within(&sb, &mut batch, 70);
    assert_eq!(got, frames);
}

/// Frames sent as two parts (headers, data; either part empty too, split anywhere) arrive
/// whole and in order, over more than one sendmmsg chunk, jumbo frames included.
#[test]
fn send_batch_parts_puts_both_parts_on_the_wire_in_order() {
    let l = link(9000);
    let sa = open_in(&l.a, l.veth.a_name(), ETH_P_AOE);
    let sb = open_in(&l.b, l.veth.b_name(), ETH_P_AOE);
    let frames: Vec<Vec<u8>> = (0..70u8)
        .map(|i| {
            let len = if i % 10 == 0 {
                9014
            } else {
                60 + usize::from(i)
            };
            frame(l.veth.b_mac(), l.veth.a_mac(), ETH_P_AOE, len, i)
        })
        .collect();
    let parts: Vec<[&[u8]; 2]> = frames
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let cut = match i % 4 {
                0 => 36,
                1 => f.len(),
                2 => 14,
                _ => 59,
            };
            [&f[..cut], &f[cut..]]
        })
        .collect();
    assert_eq!(sa.send_batch_parts(&parts).expect("send_batch_parts"), 70);
    assert_eq!(sa.send_batch_parts(&[]).unwrap(), 0);
    let mut batch = RecvBatch::new(16, frame_capacity(9000));
    let got = recv_batch_within(&sb, &mut batch, 70);
    assert_eq!(got, frames);
    // One byte over MTU + 14 in two parts is refused as the one-part send is.
    let too_big = frame(l.veth.b_mac(), l.veth.a_mac(), ETH_P_AOE, 9015, 4);
    let err = sa
        .send_batch_parts(&[[&too_big[..36], &too_big[36..]]])
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EMSGSIZE), "{err}");
}

#[test]
fn non_aoe_frames_are_not_received() {
    let l = link(1500);
    let ip_a = open_in(&l.a, l.veth.a_name(), ETH_P_IP);
    let ip_b = open_in(&l.b, l.veth.b_name(), ETH_P_IP);
    let aoe_a = open_in(&l.a, l.veth.a_name(), ETH_P_AOE);
    let aoe_b = open_in(&l.b, l.veth.b_name(), ETH_P_AOE);

    let ip_frame = frame(l.veth.b_mac(), l.veth.a_mac(), ETH_P_IP, 60, 9);
    ip_a.send(&ip_frame).expect("send IPv4-typed frame");
    // It did reach B (an IPv4 socket sees it) ...
    let mut buf = [0u8; 1514];
    let meta = recv_within(&ip_b, &mut buf, WAIT).expect("IPv4 socket on B receives it");
    assert_eq!(&buf[..meta.len], &ip_frame[..]);
    // ... but the AoE socket on B got nothing.
    assert!(
        !wait_readable(&aoe_b, QUIET),
        "AoE socket saw a 0x0800 frame"
    );
    assert_eq!(aoe_b.recv(&mut buf).unwrap(), None);

    // An AoE frame does arrive, and is the first thing the AoE socket sees; the IPv4 socket
    // does not see it.
    let aoe_frame = frame(l.veth.b_mac(), l.veth.a_mac(), ETH_P_AOE, 60, 10);
    aoe_a.send(&aoe_frame).expect("send AoE frame");
    let meta = recv_within(&aoe_b, &mut buf, WAIT).expect("AoE socket receives AoE");
    assert_eq!(&buf[..meta.len], &aoe_frame[..]);
    assert!(!wait_readable(&ip_b, QUIET), "IPv4 socket saw an AoE frame");

    let stats = aoe_b.stats().expect("PACKET_STATISTICS");
    assert_eq!(stats.packets, 1);
    assert_eq!(stats.drops, 0);

    // The ethertype sockets carry the 4-instruction BPF program ...
    assert_eq!(attached_filter_len(&aoe_b), 4);
    assert_eq!(attached_filter_len(&ip_b), 4);
    // ... an ETH_P_ALL capture socket none, and it sees both kinds of frame.
    let all_b = open_in(&l.b, l.veth.b_name(), ETH_P_ALL);
    assert_eq!(attached_filter_len(&all_b), 0);
    ip_a.send(&ip_frame).unwrap();
    aoe_a.send(&aoe_frame).unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let Some(meta) = recv_within(&all_b, &mut buf, WAIT) else {
            break;
        };
        seen.push(buf[..meta.len].to_vec());
    }
    assert_eq!(seen, vec![ip_frame, aoe_frame]);
}

#[test]
fn a_bound_socket_without_its_filter_still_receives_only_its_ethertype() {
    let l = link(1500);
    let ip_a = open_in(&l.a, l.veth.a_name(), ETH_P_IP);
    let aoe_a = open_in(&l.a, l.veth.a_name(), ETH_P_AOE);
    let aoe_b = open_in(&l.b, l.veth.b_name(), ETH_P_AOE);
    let ip_b = open_in(&l.b, l.veth.b_name(), ETH_P_IP);
    assert_eq!(attached_filter_len(&aoe_b), 4);
    aoe_b.detach_filter().expect("detach the filter");
    assert_eq!(attached_filter_len(&aoe_b), 0);
    // Detaching twice: the kernel says there is nothing to detach.
    assert!(aoe_b.detach_filter().is_err());

    // The binding alone keeps other ethertypes out ...
    let ip_frame = frame(l.veth.b_mac(), l.veth.a_mac(), ETH_P_IP, 60, 3);
    ip_a.send(&ip_frame).expect("send IPv4-typed frame");
    let mut buf = [0u8; 1514];
    let meta = recv_within(&ip_b, &mut buf, WAIT).expect("IPv4 socket on B receives it");
    assert_eq!(&buf[..meta.len], &ip_frame[..]);
    assert!(
        !wait_readable(&aoe_b, QUIET),
        "AoE socket saw a 0x0800 frame"
    );
    // ... and AoE still comes in.
    let aoe_frame = frame(l.veth.b_mac(), l.veth.a_mac(), ETH_P_AOE, 60, 4);
    aoe_a.send(&aoe_frame).expect("send AoE frame");
    let meta = recv_within(&aoe_b, &mut buf, WAIT).expect("AoE socket receives AoE");
    assert_eq!(&buf[..meta.len], &aoe_frame[..]);

    // A capture socket would see everything without its filter: refused.
    let tap = run_in_netns(&l.b.path(), || {
        PacketSocket::open_tap(l.veth.b_name(), ETH_P_AOE)
    })
    .expect("enter namespace")
    .expect("open a tap");
    let err = tap.detach_filter().expect_err("a tap keeps its filter");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(attached_filter_len(&tap), 4);
}

/// An initiator's socket (`open_responses`) gets AoE responses only: a request frame (the
/// response flag clear), a non-AoE frame and a runt AoE frame without a flags byte are never
/// queued to it (its `PACKET_STATISTICS` count nothing), while a plain AoE socket on the
/// same interface sees the request; a response arrives.
#[test]
fn response_socket_never_receives_requests() {
    let l = link(1500);
    let aoe_a = open_in(&l.a, l.veth.a_name(), ETH_P_AOE);
    let ip_a = open_in(&l.a, l.veth.a_name(), ETH_P_IP);
    let resp_b = run_in_netns(&l.b.path(), || {
        PacketSocket::open_responses(l.veth.b_name())
    })
    .expect("enter namespace")
    .expect("open response socket");
    let plain_b = open_in(&l.b, l.veth.b_name(), ETH_P_AOE);
    assert_eq!(resp_b.ethertype(), ETH_P_AOE);
    assert_eq!(attached_filter_len(&resp_b), 6);

    // An AoE request: byte 14 is version 1, flags 0 (a broadcast Query Config's).
    let mut request = frame([0xff; 6], l.veth.a_mac(), ETH_P_AOE, 60, 11);
    request[14] = 0x10;
    // The same with the error flag but not the response flag: still a request.
    let mut request_err = request.clone();
    request_err[14] = 0x14;
    aoe_a.send(&request).expect("send request");
    aoe_a.send(&request_err).expect("send request with E");
    ip_a.send(&frame(l.veth.b_mac(), l.veth.a_mac(), ETH_P_IP, 60, 12))
        .expect("send IPv4 frame");
    // The plain AoE socket on B shows both requests arrived ...
    let mut buf = [0u8; 1514];
    for want in [&request, &request_err] {
        let meta = recv_within(&plain_b, &mut buf, WAIT).expect("plain socket sees a request");
        assert_eq!(&buf[..meta.len], &want[..]);
    }
    // ... the response socket got nothing.
    assert!(
        !wait_readable(&resp_b, QUIET),
        "response socket saw a request"
    );
    assert_eq!(resp_b.recv(&mut buf).unwrap(), None);

    // A response (version 1, R) arrives, and is the first thing it sees.
    let mut response = frame(l.veth.b_mac(), l.veth.a_mac(), ETH_P_AOE, 60, 13);
    response[14] = 0x18;
    aoe_a.send(&response).expect("send response");
    let meta = recv_within(&resp_b, &mut buf, WAIT).expect("response socket gets a response");
    assert_eq!(&buf[..meta.len], &response[..]);
    let stats = resp_b.stats().expect("PACKET_STATISTICS");
    assert_eq!(stats.packets, 1, "only the response passed the filter");
    assert_eq!(stats.drops, 0);
}

/// Number of instructions of the socket's classic BPF filter (0 if none), read back with
/// `SO_GET_FILTER` (socket(7)) and a zero-length buffer.
fn attached_filter_len(sock: &PacketSocket) -> u32 {
    let mut len: libc::socklen_t = 0;
    // SAFETY: with optlen 0 the kernel writes nothing to optval (NULL is fine) and stores
    // the program length in `len`, a valid socklen_t that outlives the call.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_GET_FILTER,
            std::ptr::null_mut(),
            &mut len,
        )
    };
    assert_eq!(ret, 0, "{}", io::Error::last_os_error());
    len
}

#[test]
fn frames_cross_a_bridge_between_three_hosts() {
    require_root();
    let hub = Netns::new("aoesys").unwrap();
    let hosts: Vec<Netns> = (0..3).map(|_| Netns::new("aoesys").unwrap()).collect();
    let links: Vec<VethPair> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| VethPair::new_named(h, "eth0", &hub, &format!("port{i}"), 9000).unwrap())
        .collect();
    let bridge = Bridge::new(&hub).unwrap();
    for l in &links {
        bridge.add_port(l.b_name()).unwrap();
    }
    let socks: Vec<PacketSocket> = hosts
        .iter()
        .map(|h| open_in(h, "eth0", ETH_P_AOE))
        .collect();

    // A jumbo broadcast from host 0 reaches hosts 1 and 2.
    let f = frame([0xff; 6], links[0].a_mac(), ETH_P_AOE, 9014, 13);
    socks[0].send(&f).unwrap();
    let mut buf = vec![0u8; frame_capacity(9000)];
    for s in &socks[1..] {
        let meta = recv_within(s, &mut buf, WAIT).expect("broadcast through the bridge");
        assert_eq!(&buf[..meta.len], &f[..]);
        assert_eq!(meta.src, links[0].a_mac());
    }
    // A unicast reply from host 2 reaches host 0 (the bridge learned its MAC) and not host 1.
    let g = frame(links[0].a_mac(), links[2].a_mac(), ETH_P_AOE, 60, 14);
    socks[2].send(&g).unwrap();
    let meta = recv_within(&socks[0], &mut buf, WAIT).expect("unicast through the bridge");
    assert_eq!(&buf[..meta.len], &g[..]);
    assert!(!wait_readable(&socks[1], QUIET));
}

#[test]
fn socket_sees_only_its_own_interface() {
    require_root();
    let c = Netns::new("aoesys").unwrap();
    let l = link(1500);
    // A second link into namespace a, from a third namespace.
    let other = VethPair::new(&c, &l.a, 1500).unwrap();
    let on_first = open_in(&l.a, l.veth.a_name(), ETH_P_AOE);
    let on_second = open_in(&l.a, other.b_name(), ETH_P_AOE);
    let from_c = open_in(&c, other.a_name(), ETH_P_AOE);

    let f = frame([0xff; 6], other.a_mac(), ETH_P_AOE, 60, 11);
    from_c.send(&f).unwrap();
    let mut buf = [0u8; 1514];
    let meta = recv_within(&on_second, &mut buf, WAIT).expect("frame on the second link");
    assert_eq!(&buf[..meta.len], &f[..]);
    assert!(
        !wait_readable(&on_first, QUIET),
        "socket bound elsewhere saw it"
    );
}

#[test]
fn interface_info_matches_ip_link() {
    let l = link(9000);
    let ifname = l.veth.a_name().to_owned();
    let (info, all, missing) = run_in_netns(&l.a.path(), || {
        (
            interface_info(&ifname),
            list_interfaces(),
            interface_info("nosuchif0"),
        )
    })
    .unwrap();
    let info = info.expect("interface_info in namespace");

    // `ip -br link show dev X`: "X@ifN  UP  aa:bb:cc:dd:ee:ff <...>"
    let br = l.a.ip(&["-br", "link", "show", "dev", &ifname]).unwrap();
    let words: Vec<&str> = br.split_whitespace().collect();
    assert!(words[0].starts_with(&ifname), "{br}");
    assert_eq!(words[1], "UP", "{br}");
    assert_eq!(aoe_testkit::parse_mac(words[2]), Some(info.mac), "{br}");
    assert_eq!(info.mac, l.veth.a_mac());

    // `ip -o link show dev X`: "IDX: X@ifN: <...> mtu 9000 ..."
    let line = l.a.ip(&["-o", "link", "show", "dev", &ifname]).unwrap();
    let index: u32 = line.split(':').next().unwrap().trim().parse().unwrap();
    assert_eq!(info.index, index, "{line}");
    assert!(line.contains(" mtu 9000 "), "{line}");
    assert_eq!(info.mtu, 9000);
    assert_eq!(info.name, ifname);
    assert!(info.up);
    assert!(!info.loopback);

    // The namespace holds exactly lo and our veth end, sorted by index.
    let all = all.expect("list_interfaces in namespace");
    let names: Vec<&str> = all.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["lo", ifname.as_str()]);
    assert!(all[0].loopback && all[0].up);
    assert_eq!(all[1], info);

    let missing = missing.unwrap_err();
    assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    assert!(missing.to_string().contains("nosuchif0"), "{missing}");

    // Opening a socket on a missing interface fails the same way.
    let err = run_in_netns(&l.a.path(), || PacketSocket::open("nosuchif0"))
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    assert!(err.to_string().contains("nosuchif0"), "{err}");
}

#[test]
fn refresh_info_follows_mtu_and_link_state() {
    let l = link(1500);
    let mut sa = open_in(&l.a, l.veth.a_name(), ETH_P_AOE);
    assert!(sa.info().up);

    l.veth.set_mtu(4000).unwrap();
    // Refreshed from this thread, which is not in the namespace: it asks through the socket.
    assert_eq!(sa.refresh_info().unwrap().mtu, 4000);
    l.veth.set_link(End::A, false).unwrap();
    let info = sa.refresh_info().unwrap().clone();
    assert!(!info.up);
    assert_eq!(info.name, l.veth.a_name());
    assert_eq!(info.mac, l.veth.a_mac());
    l.veth.set_link(End::A, true).unwrap();
    assert!(sa.refresh_info().unwrap().up);
}

#[test]
fn buffer_and_qdisc_options_apply() {
    let l = link(1500);
    let sa = open_in(&l.a, l.veth.a_name(), ETH_P_AOE);
    let sb = open_in(&l.b, l.veth.b_name(), ETH_P_AOE);
    sb.set_recv_buffer(4 << 20).expect("SO_RCVBUFFORCE");
    sa.set_send_buffer(1 << 20).expect("SO_SNDBUFFORCE");
    sa.set_recv_buffer(usize::MAX)
        .expect("huge values are clamped");
    sa.set_qdisc_bypass(true).expect("PACKET_QDISC_BYPASS");

    let f = frame(l.veth.b_mac(), l.veth.a_mac(), ETH_P_AOE, 60, 12);
    sa.send(&f).expect("send with qdisc bypass");
    let mut buf = [0u8; 1514];
    let meta = recv_within(&sb, &mut buf, WAIT).expect("receive");
    assert_eq!(&buf[..meta.len], &f[..]);

    // Runt frames (shorter than an Ethernet header) are an error, not a panic.
    assert!(sa.send(&[0u8; 5]).is_err());
}
