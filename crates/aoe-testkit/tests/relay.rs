//! The fault-injecting relay of the test kit, checked between two raw sockets. Needs root
//! (network namespaces): its own test binary, built with the `root-tests` feature
//! (scripts/test.sh), so `cargo test` as an ordinary user runs every unit test of the kit.

use std::time::{Duration, Instant};

use aoe_sys::PacketSocket;
use aoe_testkit::relay::{Faults, Field, RelayLink};
use aoe_testkit::Netns;

/// A 60-byte AoE frame from `src`, broadcast, with `seq` in the tag field.
fn frame(src: [u8; 6], seq: u32) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&aoe_sys::ETH_P_AOE.to_be_bytes());
    f[14] = 0x10;
    f[20..24].copy_from_slice(&seq.to_be_bytes());
    f
}

/// Tags of the frames arriving on `sock` within `wait`.
fn received(sock: &PacketSocket, wait: Duration) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        while let Some(m) = sock.recv(&mut buf).unwrap() {
            got.push(buf[..m.len].to_vec());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    got
}

fn seqs(frames: &[Vec<u8>]) -> Vec<u32> {
    frames
        .iter()
        .map(|f| u32::from_be_bytes([f[20], f[21], f[22], f[23]]))
        .collect()
}

/// The relay between two raw sockets: clean, then each fault at probability 1, with
/// its counter. Needs root (namespaces).
#[test]
fn relays_frames_with_each_fault_and_counts_them() {
    aoe_testkit::require_root();
    let t = Netns::new("aoerlt").unwrap();
    let i = Netns::new("aoerli").unwrap();
    let link = RelayLink::new(&t, &i, 1500, 9).unwrap();
    let open = |ns: &Netns, name: &str| {
        let name = name.to_owned();
        aoe_sys::run_in_netns(&ns.path(), move || PacketSocket::open(&name))
            .unwrap()
            .unwrap()
    };
    let ts = open(&t, link.target_if());
    let is = open(&i, link.initiator_if());
    let me = link.initiator_mac();
    let ctl = link.control();
    let wait = Duration::from_millis(300);
    let send = |seqs: std::ops::Range<u32>| {
        for s in seqs {
            is.send(&frame(me, s)).unwrap();
            // Paced, so that none is dropped by a full queue.
            std::thread::sleep(Duration::from_micros(200));
        }
    };

    send(0..50);
    let got = received(&ts, wait);
    assert_eq!(seqs(&got), (0..50).collect::<Vec<_>>(), "clean, in order");
    assert_eq!(got[7], frame(me, 7), "bytes unchanged");
    assert_eq!(ctl.counters().to_target, 50);

    ctl.set_faults(Faults::lossy(1.0, 0.0, 0.0));
    send(50..60);
    assert!(received(&ts, wait).is_empty(), "loss 1.0");
    assert_eq!(ctl.counters().lost, 10);

    ctl.set_faults(Faults::lossy(0.0, 1.0, 0.0));
    send(60..65);
    assert_eq!(
        seqs(&received(&ts, wait)),
        [60, 60, 61, 61, 62, 62, 63, 63, 64, 64]
    );
    assert_eq!(ctl.counters().duplicated, 5);

    // Every frame held back: each goes out after the next one, or after 20 ms alone.
    ctl.set_faults(Faults::lossy(0.0, 0.0, 1.0));
    for s in 65..67 {
        is.send(&frame(me, s)).unwrap();
    }
    let got = seqs(&received(&ts, wait));
    assert_eq!(got.len(), 2, "reordered frames lost: {got:?}");
    assert!(ctl.counters().reordered >= 1);

    ctl.set_faults(Faults {
        corrupt: 1.0,
        corrupt_field: Some(Field::Tag),
        ..Faults::default()
    });
    send(70..71);
    let got = received(&ts, wait);
    assert_eq!(got.len(), 1);
    assert_ne!(seqs(&got), [70], "tag not corrupted");
    assert_eq!(got[0][24..], frame(me, 70)[24..], "only the tag changed");
    assert_eq!(ctl.counters().corrupted, 1);

    ctl.set_faults(Faults {
        delay: Duration::from_millis(150),
        ..Faults::default()
    });
    send(80..81);
    assert!(
        received(&ts, Duration::from_millis(50)).is_empty(),
        "not delayed"
    );
    assert_eq!(seqs(&received(&ts, wait)), [80], "delayed frame lost");

    ctl.set_faults(Faults::default());
    ctl.set_link(false);
    send(90..95);
    assert!(received(&ts, wait).is_empty(), "cut");
    assert_eq!(ctl.counters().cut, 5);
    ctl.cut_for(Duration::ZERO).join().unwrap();
    assert!(ctl.link_up());

    // The other direction, target to initiator.
    let tm = link.target_mac();
    for s in 100..110 {
        ts.send(&frame(tm, s)).unwrap();
    }
    assert_eq!(seqs(&received(&is, wait)), (100..110).collect::<Vec<_>>());
    assert_eq!(ctl.counters().to_initiator, 10);
}
