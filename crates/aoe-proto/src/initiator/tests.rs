//! Initiator engine tests: frames as byte vectors for the protocol details, then seeded
//! simulations against the target engine for the behaviour under loss, duplication,
//! reordering, path failure and target death.

use super::*;
use crate::sim::{Disk, LinkCfg, Rng, Sim, TargetSpec, Workload, INIT_MACS};
use aoe_wire::ata::error_bits;

const TMAC: MacAddr = MacAddr([0x02, 0xbb, 0, 0, 0, 1]);
const TMAC2: MacAddr = MacAddr([0x02, 0xbb, 0, 0, 0, 2]);
const HOST: MacAddr = INIT_MACS[0];
const DEV: TargetAddr = TargetAddr { shelf: 7, slot: 3 };

/// Loss recovery: RTT-following timeout, Karn's rule, fast retransmission, window floor.
mod loss;

/// Late copies of writes: an overlapping write waits for every copy of an earlier one.
mod fence;

/// Fairness between sources: one source's backlog does not hold up another's request.
mod fair;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// All frames the engine wants to send, as (iface, bytes).
fn drain(e: &mut Engine, now: Instant) -> Vec<(usize, Vec<u8>)> {
    let mut buf = vec![0u8; 9014];
    let mut out = Vec::new();
    while let Some(t) = e.poll_transmit(now, &mut buf) {
        out.push((t.iface, buf[..t.len].to_vec()));
    }
    out
}

fn events(e: &mut Engine) -> Vec<Event> {
    std::iter::from_fn(|| e.poll_event()).collect()
}

/// The engine's log lines that `keep` accepts, in order; other events are dropped.
fn log_lines(e: &mut Engine, keep: impl Fn(&str) -> bool) -> Vec<String> {
    events(e)
        .into_iter()
        .filter_map(|ev| match ev {
            Event::Log(l) if keep(&l) => Some(l),
            _ => None,
        })
        .collect()
}

/// The results of the operations that completed, in order; other events are dropped.
fn completions(e: &mut Engine) -> Vec<Result<Option<Vec<u8>>, IoError>> {
    events(e)
        .into_iter()
        .filter_map(|e| match e {
            Event::Completed { result, .. } => Some(result),
            _ => None,
        })
        .collect()
}

/// A Query Config response as a target sends it.
fn config_rsp(src: MacAddr, addr: TargetAddr, bufcnt: u16, scnt: u8, tag: u32) -> Vec<u8> {
    config_rsp_with(src, addr, bufcnt, scnt, tag, b"cfg")
}

/// [`config_rsp`] carrying config string `config`.
fn config_rsp_with(
    src: MacAddr,
    addr: TargetAddr,
    bufcnt: u16,
    scnt: u8,
    tag: u32,
    config: &[u8],
) -> Vec<u8> {
    let mut h = HeaderRepr::request(HOST, src, addr, Command::QueryConfig, Tag(tag));
    h.response = true;
    Message {
        header: h,
        body: Body::Config(ConfigRepr {
            buffer_count: bufcnt,
            firmware_version: 0x4019,
            sector_count: scnt,
            aoe_version: 1,
            ccmd: ConfigCommand::Read,
            config,
        }),
    }
    .to_vec()
    .unwrap()
}

/// The response to ATA request `req`: status, error and data set.
fn ata_rsp(req: &[u8], src: MacAddr, st: u8, err: u8, data: &[u8]) -> Vec<u8> {
    let m = Message::parse(req).unwrap();
    let Body::Ata(a) = m.body else {
        panic!("not ATA")
    };
    let h = m.header.response_to(src);
    Message {
        header: h,
        body: Body::Ata(AtaRepr {
            err_feature: err,
            cmd_status: st,
            data,
            ..a
        }),
    }
    .to_vec()
    .unwrap()
}

fn identify_page(sectors: u64) -> [u8; 512] {
    Identify {
        model: "m".into(),
        serial: "s".into(),
        firmware: "f".into(),
        sectors,
        write_cache: true,
        smart: false,
    }
    .build()
}

/// TMAC's good answer (DRDY) to IDENTIFY request `req`, for a disk of `sectors`.
fn identify_rsp(req: &[u8], sectors: u64) -> Vec<u8> {
    identify_rsp_from(req, TMAC, sectors)
}

/// `src`'s good answer (DRDY) to IDENTIFY request `req`, for a disk of `sectors`.
fn identify_rsp_from(req: &[u8], src: MacAddr, sectors: u64) -> Vec<u8> {
    ata_rsp(req, src, status::DRDY, 0, &identify_page(sectors))
}

/// Sets IDENTIFY word `w` and fixes the integrity checksum (word 255).
fn set_word(p: &mut [u8; 512], w: usize, v: u16) {
    p[2 * w..2 * w + 2].copy_from_slice(&v.to_le_bytes());
    p[511] = 0;
    let sum = p.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    p[511] = 0u8.wrapping_sub(sum);
}

/// An LBA28-only IDENTIFY page (words 83 and 86 without the LBA48 bit).
fn identify_page_lba28(sectors: u64) -> [u8; 512] {
    let mut p = identify_page(sectors);
    set_word(&mut p, 83, 0x4000); // valid, nothing supported
    set_word(&mut p, 86, 0x0000); // nothing enabled
    p[511] = 0;
    let sum = p.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    p[511] = 0u8.wrapping_sub(sum);
    p
}

/// An engine with one interface and device e7.3 up (bufcnt 16, 2 sectors per frame).
fn up_engine(sectors: u64, lba48: bool) -> (Engine, Instant) {
    up_engine_with(Config::default(), sectors, lba48)
}

fn up_engine_with(cfg: Config, sectors: u64, lba48: bool) -> (Engine, Instant) {
    let page = if lba48 {
        identify_page(sectors)
    } else {
        identify_page_lba28(sectors)
    };
    up_engine_with_page(cfg, &page)
}

/// An engine with DEV up, its IDENTIFY answered with `page`.
fn up_engine_with_page(cfg: Config, page: &[u8; 512]) -> (Engine, Instant) {
    let t0 = Instant::now();
    let mut e = Engine::new(cfg, t0);
    e.add_interface(0, "eth0", HOST, 1500);
    drain(&mut e, t0);
    e.handle_frame(t0, 0, &config_rsp(TMAC, DEV, 16, 2, 0));
    let tx = drain(&mut e, t0);
    assert_eq!(tx.len(), 1);
    e.handle_frame(t0, 0, &ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, page));
    assert!(events(&mut e).contains(&Event::DeviceUp(DEV)));
    (e, t0)
}

#[test]
fn discovery_query_is_broadcast_on_every_interface() {
    let t0 = Instant::now();
    let mut e = Engine::new(Config::default(), t0);
    e.add_interface(0, "eth0", HOST, 1500);
    e.add_interface(3, "eth3", INIT_MACS[1], 9000);
    let tx = drain(&mut e, t0);
    assert_eq!(tx.len(), 2, "one query per new interface");
    e.discover(t0);
    let tx = drain(&mut e, t0);
    assert_eq!(tx.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 3]);
    let f = &tx[0].1;
    assert_eq!(f.len(), 60, "padded");
    assert_eq!(&f[0..6], &[0xff; 6], "dst broadcast");
    assert_eq!(&f[6..12], &HOST.0, "src");
    assert_eq!(&f[12..14], &[0x88, 0xa2], "EtherType");
    assert_eq!(f[14], 0x10, "version 1, no flags");
    assert_eq!(&f[16..18], &[0xff, 0xff], "shelf 0xffff");
    assert_eq!(f[18], 0xff, "slot 0xff");
    assert_eq!(f[19], 1, "Query Config");
    assert_eq!(f[20] & 0x80, 0, "tag bit 31 clear");
    assert_eq!(
        &f[24..32],
        &[0; 8],
        "all zero like aoecmd_cfg_pkts: read, empty string"
    );
    // The beacon repeats after 60 s.
    assert_eq!(e.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    e.handle_timeout(t0 + Duration::from_secs(60));
    assert_eq!(drain(&mut e, t0).len(), 2);
}

#[test]
fn config_response_identify_then_up() {
    let t0 = Instant::now();
    let mut e = Engine::new(Config::default(), t0);
    e.add_interface(0, "eth0", HOST, 1500);
    drain(&mut e, t0);
    // Unsolicited announcement (tag 0) counts as discovery.
    e.handle_frame(t0, 0, &config_rsp(TMAC, DEV, 100, 2, 0));
    let tx = drain(&mut e, t0);
    assert_eq!(tx.len(), 1);
    let f = &tx[0].1;
    assert_eq!(&f[0..6], &TMAC.0, "unicast to the target MAC");
    assert_eq!(&f[16..20], &[0, 7, 3, 0], "e7.3, ATA");
    let tag = u32::from_be_bytes([f[20], f[21], f[22], f[23]]);
    assert_eq!(tag >> 16, 2, "lasttag 2 (1 went to the query)");
    assert_eq!(tag & 0x8000_0000, 0);
    assert_eq!(f[24], 0, "aflags");
    assert_eq!(f[26], 1, "scnt 1");
    assert_eq!(f[27], 0xec, "IDENTIFY DEVICE");
    assert_eq!(f[31], 0xa0, "lba3 device register");
    assert_eq!(
        e.submit(t0, DEV, BlockOp::Flush),
        Err(SubmitError::DeviceDown)
    );
    let d = e.device(DEV).unwrap();
    assert_eq!(d.state, DeviceState::Down);
    assert_eq!(
        d.targets[0].nframes, 100,
        "min(bufcnt 100, maxout 128, the admin guide's default)"
    );
    assert_eq!(d.targets[0].maxout, 50, "starts at half");
    assert_eq!(d.payload, 1024);
    assert_eq!(d.config, b"cfg");
    e.handle_frame(t0 + ms(1), 0, &identify_rsp(f, 5000));
    let ev = events(&mut e);
    assert!(ev.contains(&Event::DeviceUp(DEV)), "{ev:?}");
    assert!(ev.contains(&Event::Log("e7.3 up".into())));
    let d = e.device(DEV).unwrap();
    assert_eq!(d.state, DeviceState::Up);
    assert_eq!(d.sectors, 5000);
    assert_eq!(d.firmware_version, 0x4019);
    assert_eq!(d.identify.unwrap().model, "m");
    assert_eq!(d.interfaces, vec!["eth0".to_string()]);
}

#[test]
fn wildcard_config_response_rejected() {
    let t0 = Instant::now();
    let mut e = Engine::new(Config::default(), t0);
    e.add_interface(0, "eth0", HOST, 1500);
    drain(&mut e, t0);
    e.handle_frame(
        t0,
        0,
        &config_rsp(TMAC, TargetAddr::new(0xffff, 1), 16, 2, 0),
    );
    e.handle_frame(t0, 0, &config_rsp(TMAC, TargetAddr::new(1, 0xff), 16, 2, 0));
    assert!(e.devices().is_empty());
    assert!(drain(&mut e, t0).is_empty());
    assert_eq!(e.stats().wildcard_rejected, 2);
    assert!(events(&mut e)
        .iter()
        .any(|ev| matches!(ev, Event::Log(l) if l.contains("rejected"))));
}

/// Audit (s7): a config response from a group (multicast or broadcast) source MAC made that
/// address a target, and every IDENTIFY, read and write after it went to the group: to
/// every host on the segment. No target sends from a group address (IEEE 802: the I/G bit
/// marks a destination), so such a response is refused, counted and logged, and an ATA
/// response from one is not taken as an answer either.
#[test]
fn response_from_a_group_source_mac_is_refused() {
    let t0 = Instant::now();
    let mut e = Engine::new(Config::default(), t0);
    e.add_interface(0, "eth0", HOST, 1500);
    drain(&mut e, t0);
    for group in [MacAddr::BROADCAST, MacAddr([0x01, 0x00, 0x5e, 0, 0, 1])] {
        e.handle_frame(t0, 0, &config_rsp(group, DEV, 16, 2, 0));
        let tx = drain(&mut e, t0);
        assert!(
            tx.iter()
                .all(|(_, f)| MacAddr(f[..6].try_into().unwrap()) != group),
            "{group}: a frame went to the group address"
        );
        assert!(e.devices().is_empty(), "{group}: a device was made");
    }
    assert_eq!(e.stats().group_source, 2);
    assert!(events(&mut e)
        .iter()
        .any(|ev| matches!(ev, Event::Log(l) if l.contains("group source"))));
    // Up through TMAC; an answer to its IDENTIFY from a group source is not the answer.
    e.handle_frame(t0, 0, &config_rsp(TMAC, DEV, 16, 2, 0));
    let tx = drain(&mut e, t0);
    assert_eq!(tx.len(), 1);
    e.handle_frame(
        t0,
        0,
        &ata_rsp(
            &tx[0].1,
            MacAddr::BROADCAST,
            status::DRDY,
            0,
            &identify_page(5000),
        ),
    );
    assert_ne!(e.device(DEV).unwrap().state, DeviceState::Up);
    assert_eq!(e.stats().group_source, 3);
}

#[test]
fn read_is_split_into_payload_frames_lba48() {
    let (mut e, t0) = up_engine(1 << 40, true);
    let id = e
        .submit(
            t0,
            DEV,
            BlockOp::Read {
                lba: 0x1_2345_6789,
                sectors: 5,
            },
        )
        .unwrap();
    let tx = drain(&mut e, t0);
    assert_eq!(tx.len(), 3, "2 + 2 + 1 sectors");
    let counts: Vec<u8> = tx.iter().map(|(_, f)| f[26]).collect();
    assert_eq!(counts, vec![2, 2, 1]);
    let f = &tx[1].1;
    assert_eq!(f[24], 0x40, "aflags E");
    assert_eq!(f[27], 0x24, "READ SECTORS EXT");
    assert_eq!(
        &f[28..34],
        &[0x8b, 0x67, 0x45, 0x23, 0x01, 0x00],
        "lba+2, little-endian"
    );
    let mut tags: Vec<&[u8]> = tx.iter().map(|(_, f)| &f[20..24]).collect();
    tags.dedup();
    assert_eq!(tags.len(), 3, "unique tags");
    // Answer out of order; the data lands at its offset.
    for (i, (_, f)) in tx.iter().enumerate().rev() {
        let n = f[26] as usize * 512;
        e.handle_frame(
            t0 + ms(1),
            0,
            &ata_rsp(f, TMAC, status::DRDY, 0, &vec![i as u8 + 1; n]),
        );
    }
    let ev = events(&mut e);
    let Some(Event::Completed {
        id: got,
        result: Ok(Some(data)),
    }) = ev.last()
    else {
        panic!("{ev:?}")
    };
    assert_eq!(*got, id);
    assert_eq!(data.len(), 5 * 512);
    assert!(data[..1024].iter().all(|b| *b == 1));
    assert!(data[1024..2048].iter().all(|b| *b == 2));
    assert!(data[2048..].iter().all(|b| *b == 3));
}

#[test]
fn lba28_write_and_flush_encoding() {
    let (mut e, t0) = up_engine(100_000, false);
    let data: Vec<u8> = (0..1024).map(|i| i as u8).collect();
    let w = e
        .submit(
            t0,
            DEV,
            BlockOp::Write {
                lba: 0x0123_4567 & 0xffff,
                data: data.clone(),
            },
        )
        .unwrap();
    let tx = drain(&mut e, t0);
    assert_eq!(tx.len(), 1);
    let f = &tx[0].1;
    assert_eq!(f.len(), 36 + 1024);
    assert_eq!(f[24], 0x01, "aflags W, no E");
    assert_eq!(f[27], 0x30, "WRITE SECTORS");
    assert_eq!(
        &f[28..32],
        &[0x67, 0x45, 0x00, 0xe0],
        "lba3 = (lba3 & 0x0f) | 0xe0"
    );
    assert_eq!(&f[36..], &data[..]);
    let fl = e.submit(t0, DEV, BlockOp::Flush).unwrap();
    let tx2 = drain(&mut e, t0);
    assert_eq!(tx2[0].1[27], 0xe7, "FLUSH CACHE without LBA48");
    // The write completes only once acknowledged.
    assert!(events(&mut e).is_empty());
    e.handle_frame(t0, 0, &ata_rsp(f, TMAC, status::DRDY, 0, &[]));
    e.handle_frame(t0, 0, &ata_rsp(&tx2[0].1, TMAC, status::DRDY, 0, &[]));
    let ev = events(&mut e);
    assert!(ev.contains(&Event::Completed {
        id: w,
        result: Ok(None)
    }));
    assert!(ev.contains(&Event::Completed {
        id: fl,
        result: Ok(None)
    }));
}

/// Frames encoded into buffers handed back with `recycle_frame` (longer than the frame, full
/// of old bytes) are byte for byte the frames a fresh buffer gets: nothing stale reaches the
/// wire, neither in the ATA header, nor the data, nor the padding of a short request.
#[test]
fn recycled_frame_buffers_encode_the_same_frames() {
    let frames = |recycle: bool| {
        let (mut e, t0) = up_engine(100_000, true);
        if recycle {
            for _ in 0..8 {
                e.recycle_frame(vec![0xa5; 9014]);
            }
        }
        let data: Vec<u8> = (0..3072).map(|i| (i * 7) as u8).collect();
        e.submit(t0, DEV, BlockOp::Write { lba: 40, data }).unwrap();
        e.submit(t0, DEV, BlockOp::Read { lba: 9, sectors: 5 })
            .unwrap();
        e.submit(t0, DEV, BlockOp::Flush).unwrap();
        let mut out = Vec::new();
        while let Some((_, f)) = e.poll_transmit_frame(t0) {
            out.push(f);
        }
        out
    };
    let fresh = frames(false);
    assert_eq!(
        fresh.len(),
        3 + 3 + 1,
        "1 KiB frames at MTU 1500, then a flush"
    );
    assert_eq!(
        fresh[3].len(),
        60,
        "a read request is padded to the Ethernet minimum"
    );
    assert_eq!(frames(true), fresh);
}

/// `poll_transmit_parts` hands a write frame over as its 36 bytes of headers and the
/// write's own sectors behind them (no copy), other frames whole; each frame's two parts
/// put together are byte for byte what `poll_transmit_frame` gives. The data of a frame
/// still queued stays readable after its write completed and the caller dropped its copy.
#[test]
fn write_frames_hand_over_the_sectors_behind_their_headers() {
    let data: Vec<u8> = (0..3072).map(|i| (i * 13 + 5) as u8).collect();
    let submit = |e: &mut Engine, t0: Instant| {
        e.submit(
            t0,
            DEV,
            BlockOp::Write {
                lba: 40,
                data: data.clone(),
            },
        )
        .unwrap();
        e.submit(t0, DEV, BlockOp::Read { lba: 9, sectors: 5 })
            .unwrap();
    };
    let (mut whole, t0) = up_engine(100_000, true);
    submit(&mut whole, t0);
    let want: Vec<Vec<u8>> = std::iter::from_fn(|| whole.poll_transmit_frame(t0))
        .map(|(_, f)| f)
        .collect();
    let (mut e, t0) = up_engine(100_000, true);
    submit(&mut e, t0);
    let parts: Vec<TxFrame> = std::iter::from_fn(|| e.poll_transmit_parts(t0)).collect();
    assert_eq!(parts.len(), 3 + 3, "1 KiB frames at MTU 1500");
    for (i, f) in parts.iter().take(3).enumerate() {
        assert_eq!(
            f.head.len(),
            aoe_wire::HEADER_LEN + 12,
            "frame {i}: headers only"
        );
        assert_eq!(f.data(), &data[i * 1024..(i + 1) * 1024], "frame {i}");
    }
    for f in &parts[3..] {
        assert!(f.data.is_none(), "a read request carries no data");
        assert_eq!(f.head.len(), 60);
    }
    let joined: Vec<Vec<u8>> = parts
        .iter()
        .map(|f| [f.head.as_slice(), f.data()].concat())
        .collect();
    assert_eq!(joined, want);
    // Every write frame answered: the write completes, its frames' data still reads.
    for f in &parts[..3] {
        e.handle_frame(t0, 0, &ata_rsp(&joined_of(f), TMAC, status::DRDY, 0, &[]));
    }
    assert_eq!(completions(&mut e), vec![Ok(None)]);
    assert_eq!(parts[2].data(), &data[2048..3072]);
}

fn joined_of(f: &TxFrame) -> Vec<u8> {
    [f.head.as_slice(), f.data()].concat()
}

/// A read buffer handed back with `recycle_read_buffer` (full of stale bytes) is filled by
/// a later read large enough for it, answered out of order, and the read completes with
/// exactly the target's bytes; a read larger than every kept buffer gets a new one.
#[test]
fn recycled_read_buffers_are_reused_and_hold_only_new_data() {
    let (mut e, t0) = up_engine(100_000, true);
    let bytes = |lba: u64, sectors: u64| -> Vec<u8> {
        (0..sectors * 512)
            .map(|i| ((lba * 512 + i) % 253) as u8)
            .collect()
    };
    // Reads `sectors` at `lba`, answering each batch of 1 KiB frames the window lets out
    // last to first; returns the engine's completed buffer.
    let read = |e: &mut Engine, lba: u64, sectors: u32| -> Vec<u8> {
        e.submit(t0, DEV, BlockOp::Read { lba, sectors }).unwrap();
        loop {
            let tx = drain(e, t0);
            assert!(!tx.is_empty(), "read {lba}+{sectors} stalled");
            for (_, req) in tx.iter().rev() {
                let m = Message::parse(req).unwrap();
                let Body::Ata(a) = m.body else {
                    panic!("not ATA")
                };
                let data = bytes(a.lba, u64::from(a.sector_count));
                e.handle_frame(t0, 0, &ata_rsp(req, TMAC, status::DRDY, 0, &data));
            }
            match completions(e).pop() {
                Some(Ok(Some(d))) => return d,
                Some(other) => panic!("read {lba}+{sectors}: {other:?}"),
                None => {}
            }
        }
    };
    let mut first = read(&mut e, 10, 6);
    assert!(first == bytes(10, 6));
    first.fill(0xee);
    let ptr = first.as_ptr();
    e.recycle_read_buffer(first);
    let second = read(&mut e, 77, 4);
    assert_eq!(second.as_ptr(), ptr, "the kept buffer was filled");
    assert!(
        second == bytes(77, 4),
        "only the new read's bytes, none stale"
    );
    // Too small for a read of 8 sectors: that one gets a new buffer, and the kept one
    // stays for a later small read.
    e.recycle_read_buffer(second);
    let third = read(&mut e, 500, 8);
    assert_ne!(third.as_ptr(), ptr);
    assert!(third == bytes(500, 8));
    let fourth = read(&mut e, 3, 2);
    assert_eq!(fourth.as_ptr(), ptr);
    assert!(fourth == bytes(3, 2));
}

/// A held read ([`BlockOp::ReadHeld`]) keeps the payload of every answer handed in with
/// a token in that frame (no copy): it completes with parts naming the frames, in order,
/// which rebuild the data exactly; an answer handed in without a token (the driver's
/// bound), or given up with `unhold`, is copied into the buffer at its place; the tokens
/// of a read that fails come back through `take_released`.
#[test]
fn held_reads_keep_payloads_in_the_frames_and_copy_what_is_given_up() {
    let (mut e, t0) = up_engine(100_000, true);
    let bytes = |lba: u64, sectors: u64| -> Vec<u8> {
        (0..sectors * 512)
            .map(|i| ((lba * 512 + i) % 251) as u8)
            .collect()
    };
    let id = e
        .submit(
            t0,
            DEV,
            BlockOp::ReadHeld {
                lba: 40,
                sectors: 8,
            },
        )
        .unwrap();
    // Four 1 KiB frames, answered last to first: the second (token-less) is copied, the
    // third is held and then given up before the first is answered.
    let tx = drain(&mut e, t0);
    assert_eq!(tx.len(), 4);
    let mut frames: Vec<(u64, Vec<u8>)> = Vec::new();
    for (k, (_, req)) in tx.iter().enumerate().rev() {
        let m = Message::parse(req).unwrap();
        let Body::Ata(a) = m.body else {
            panic!("not ATA")
        };
        let rsp = ata_rsp(req, TMAC, status::DRDY, 0, &bytes(a.lba, 2));
        let token = 100 + k as u64;
        if k == 0 {
            assert!(e.unhold(102, &frames[1].1), "frame 2 given up");
            assert!(!e.unhold(102, &frames[1].1), "only once");
            assert!(
                !events(&mut e)
                    .iter()
                    .any(|ev| matches!(ev, Event::CompletedHeld { .. })),
                "not complete yet"
            );
        }
        if k == 1 {
            e.handle_frame(t0, 0, &rsp);
        } else {
            assert!(e.handle_held_frame(t0, 0, &rsp, token), "frame {k} kept");
        }
        frames.push((token, rsp));
    }
    let done = events(&mut e)
        .into_iter()
        .find_map(|ev| match ev {
            Event::CompletedHeld { id: i, result } if i == id => Some(result),
            _ => None,
        })
        .expect("completed");
    let h = done.unwrap();
    assert_eq!(h.len, 8 * 512);
    let tokens: Vec<u64> = h.parts.iter().map(|p| p.token).collect();
    assert_eq!(tokens, vec![100, 103], "held parts, in order of the read");
    assert_eq!(
        h.buf.len(),
        8 * 512,
        "the token-less frame is in the buffer"
    );
    assert_eq!(h.copies.len(), 1, "the frame given up is a copy of its own");
    assert_eq!(h.copies[0].0, 2 * 1024);
    let held: Vec<(u64, Vec<u8>)> = frames.clone();
    let pieces = h
        .pieces(|t| held.iter().find(|f| f.0 == t).map(|f| f.1.as_slice()))
        .unwrap();
    assert!(
        pieces.concat() == bytes(40, 8),
        "the pieces are the data, in order"
    );
    // A read all of whose frames are held has no buffer at all.
    let id2 = e
        .submit(t0, DEV, BlockOp::ReadHeld { lba: 0, sectors: 2 })
        .unwrap();
    let tx = drain(&mut e, t0);
    let rsp = ata_rsp(&tx.last().unwrap().1, TMAC, status::DRDY, 0, &bytes(0, 2));
    assert!(e.handle_held_frame(t0, 0, &rsp, 7));
    let h = events(&mut e)
        .into_iter()
        .find_map(|ev| match ev {
            Event::CompletedHeld { id: i, result } if i == id2 => Some(result),
            _ => None,
        })
        .unwrap()
        .unwrap();
    assert!(h.buf.is_empty());
    assert!(
        h.pieces(|t| (t == 7).then_some(rsp.as_slice()))
            .unwrap()
            .concat()
            == bytes(0, 2)
    );
    // A frame given up after its read completed, before the completion is polled: the
    // completion carries the bytes itself.
    let id4 = e
        .submit(t0, DEV, BlockOp::ReadHeld { lba: 2, sectors: 2 })
        .unwrap();
    let tx = drain(&mut e, t0);
    let rsp4 = ata_rsp(&tx.last().unwrap().1, TMAC, status::DRDY, 0, &bytes(2, 2));
    assert!(e.handle_held_frame(t0, 0, &rsp4, 11));
    assert!(e.unhold(11, &rsp4), "copied into the waiting completion");
    let h = events(&mut e)
        .into_iter()
        .find_map(|ev| match ev {
            Event::CompletedHeld { id: i, result } if i == id4 => Some(result),
            _ => None,
        })
        .unwrap()
        .unwrap();
    assert!(h.parts.is_empty() && h.buf.is_empty());
    assert!(h.pieces(|_| None).unwrap().concat() == bytes(2, 2));
    assert!(!e.unhold(11, &rsp4), "its completion was polled");
    // A plain read never keeps a frame, token or not.
    e.submit(t0, DEV, BlockOp::Read { lba: 0, sectors: 2 })
        .unwrap();
    let tx = drain(&mut e, t0);
    let rsp = ata_rsp(&tx.last().unwrap().1, TMAC, status::DRDY, 0, &bytes(0, 2));
    assert!(!e.handle_held_frame(t0, 0, &rsp, 8));
    // A held read that fails gives its kept tokens back.
    let id3 = e
        .submit(t0, DEV, BlockOp::ReadHeld { lba: 0, sectors: 4 })
        .unwrap();
    let tx = drain(&mut e, t0);
    let tx = &tx[tx.len() - 2..];
    let ok = ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, &bytes(0, 2));
    assert!(e.handle_held_frame(t0, 0, &ok, 9));
    let bad = ata_rsp(
        &tx[1].1,
        TMAC,
        status::DRDY | status::ERR,
        error_bits::UNC,
        &[],
    );
    assert!(!e.handle_held_frame(t0, 0, &bad, 10));
    assert!(events(&mut e).iter().any(|ev| matches!(ev,
        Event::CompletedHeld { id: i, result: Err(_) } if *i == id3)));
    let mut rel = Vec::new();
    e.take_released(&mut rel);
    assert_eq!(rel, vec![9]);
    assert!(!e.unhold(9, &ok), "a released token is no read's");
}

/// The send-order list that finds the frames sent before an answered one keeps only what
/// may still be outstanding: after a long read answered in order it is empty, and while
/// answers come back in reverse order within each window (every answer has earlier
/// frames outstanding), it never grows past its bound.
#[test]
fn send_order_list_stays_bounded() {
    let (mut e, t0) = up_engine(100_000, true);
    let target = |e: &Engine| e.devices[&DEV].targets[0].sent_order.len();
    let bound = |e: &Engine| e.devices[&DEV].targets[0].sent_order_compact_at();
    for reverse in [false, true] {
        e.submit(
            t0,
            DEV,
            BlockOp::Read {
                lba: 0,
                sectors: 4000,
            },
        )
        .unwrap();
        let mut done = false;
        while !done {
            let tx = drain(&mut e, t0);
            assert!(!tx.is_empty(), "read stalled");
            let order: Vec<_> = if reverse {
                tx.iter().rev().collect()
            } else {
                tx.iter().collect()
            };
            for (_, req) in order {
                let m = Message::parse(req).unwrap();
                let Body::Ata(a) = m.body else {
                    panic!("not ATA")
                };
                let data = vec![0u8; a.sector_count as usize * 512];
                e.handle_frame(t0, 0, &ata_rsp(req, TMAC, status::DRDY, 0, &data));
                assert!(target(&e) <= bound(&e) + 1, "{} entries", target(&e));
            }
            done = completions(&mut e)
                .iter()
                .any(|r| matches!(r, Ok(Some(d)) if d.len() == 4000 * 512));
        }
        if !reverse {
            assert_eq!(target(&e), 0, "every entry answered and dropped");
        }
    }
}

/// Regression: vblade advertises LBA48 and FLUSH CACHE but not FLUSH CACHE EXT (word 83 =
/// 0x5400, captured in `crates/aoe-wire/testdata/captures.txt`) and aborts 0xEA, so every fsync
/// through the initiator failed with EIO against it. FLUSH CACHE EXT is sent only when
/// advertised, as libata does.
#[test]
fn flush_cache_on_lba48_without_flush_ext_like_vblade() {
    let t0 = Instant::now();
    let mut e = Engine::new(Config::default(), t0);
    e.add_interface(0, "eth0", HOST, 1500);
    drain(&mut e, t0);
    e.handle_frame(t0, 0, &config_rsp(TMAC, DEV, 16, 2, 0));
    let tx = drain(&mut e, t0);
    let mut page = identify_page(1000);
    page[166] = 0x00;
    page[167] = 0x54; // word 83: valid, FLUSH CACHE, LBA48; no FLUSH CACHE EXT (vblade)
    page[511] = 0;
    let sum = page.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    page[511] = 0u8.wrapping_sub(sum);
    e.handle_frame(t0, 0, &ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, &page));
    assert!(events(&mut e).contains(&Event::DeviceUp(DEV)));
    e.submit(t0, DEV, BlockOp::Read { lba: 0, sectors: 1 })
        .unwrap();
    let tx = drain(&mut e, t0);
    assert_eq!(tx[0].1[27], 0x24, "LBA48 reads still use READ SECTORS EXT");
    e.submit(t0, DEV, BlockOp::Flush).unwrap();
    let tx = drain(&mut e, t0);
    assert_eq!(tx[0].1[27], 0xe7, "FLUSH CACHE, not the unadvertised EXT");
}

#[test]
fn flush_ext_on_lba48() {
    let (mut e, t0) = up_engine(1000, true);
    e.submit(t0, DEV, BlockOp::Flush).unwrap();
    let tx = drain(&mut e, t0);
    assert_eq!(tx[0].1[27], 0xea);
    assert_eq!(tx[0].1[26], 0, "no data");
}

#[test]
fn ata_error_fails_without_retransmit() {
    let (mut e, t0) = up_engine(1000, true);
    let id = e
        .submit(t0, DEV, BlockOp::Read { lba: 0, sectors: 4 })
        .unwrap();
    let tx = drain(&mut e, t0);
    let rsp = ata_rsp(
        &tx[0].1,
        TMAC,
        status::DRDY | status::ERR,
        error_bits::UNC,
        &[],
    );
    e.handle_frame(t0, 0, &rsp);
    let ev = events(&mut e);
    assert!(ev.contains(&Event::Completed {
        id,
        result: Err(IoError::Ata {
            status: 0x41,
            error: 0x40
        })
    }));
    // The op's other frame is answered later and ignored; nothing is retransmitted.
    e.handle_frame(t0, 0, &ata_rsp(&tx[1].1, TMAC, status::DRDY, 0, &[0; 1024]));
    e.handle_timeout(t0 + Duration::from_secs(30));
    assert!(
        drain(&mut e, t0).iter().all(|(_, f)| f[19] == 1),
        "only beacon queries"
    );
    assert_eq!(e.device(DEV).unwrap().stats.retransmits, 0);
    assert_eq!(e.device(DEV).unwrap().targets[0].nout, 0);
}

#[test]
fn aoe_error_flag_fails_op() {
    let (mut e, t0) = up_engine(1000, true);
    let id = e.submit(t0, DEV, BlockOp::Flush).unwrap();
    let tx = drain(&mut e, t0);
    let mut rsp = ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, &[]);
    rsp[14] |= 0x04;
    rsp[15] = 6;
    e.handle_frame(t0, 0, &rsp);
    assert!(events(&mut e).contains(&Event::Completed {
        id,
        result: Err(IoError::Aoe(ErrorCode::TargetReserved))
    }));
}

#[test]
fn duplicate_and_foreign_responses_ignored() {
    let (mut e, t0) = up_engine(1000, true);
    let id = e
        .submit(t0, DEV, BlockOp::Read { lba: 0, sectors: 1 })
        .unwrap();
    let tx = drain(&mut e, t0);
    let good = ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, &[7; 512]);
    // The tag of this frame under another shelf.slot: not this device's frame
    // (`aoecmd_ata_rsp` looks the tag up in the device the header names); the frame stays
    // outstanding.
    let mut other_dev = ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, &[9; 512]);
    other_dev[18] = 4;
    e.handle_frame(t0, 0, &other_dev);
    // Short read data: same.
    e.handle_frame(t0, 0, &ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, &[9; 100]));
    // User-tool tag (bit 31).
    let mut user = good.clone();
    user[20] |= 0x80;
    e.handle_frame(t0, 0, &user);
    assert!(!events(&mut e)
        .iter()
        .any(|e| matches!(e, Event::Completed { .. })));
    e.handle_frame(t0, 0, &good);
    e.handle_frame(t0, 0, &good);
    let completions: Vec<_> = events(&mut e)
        .into_iter()
        .filter(|e| matches!(e, Event::Completed { .. }))
        .collect();
    assert_eq!(
        completions,
        vec![Event::Completed {
            id,
            result: Ok(Some(vec![7; 512]))
        }]
    );
    let s = e.device(DEV).unwrap().stats;
    assert_eq!(s.bad_responses, 1, "the short one");
    assert_eq!(s.unexpected_responses, 1, "the second good one");
    assert_eq!(e.stats().unknown_device, 1, "e7.4, which is not known");
    assert_eq!(e.stats().user_tags, 1);
}

/// Tags wrap: the driver's 15-bit counter (`newtag`) passes 0x7fff with frames of a read
/// outstanding on both sides of the wrap, which the outstanding-frame table finds by the
/// counter bits (`frames::TagMap`). Answered, every frame completes the read with its own
/// sectors, and a second answer to a tag already completed (stale) is counted as
/// unexpected and changes nothing. (In order: answers out of order would have RACK copy the
/// frames they overtook.)
#[test]
fn tags_wrap_with_frames_outstanding_on_both_sides() {
    let (mut e, t0) = up_engine(100_000, true);
    e.lasttag = 0x7fff - 3;
    // bufcnt 16, window 8: eight frames of two sectors each out at once.
    let id = e
        .submit(
            t0,
            DEV,
            BlockOp::Read {
                lba: 0,
                sectors: 16,
            },
        )
        .unwrap();
    let tx = drain(&mut e, t0);
    assert_eq!(tx.len(), 8);
    let counters: Vec<u32> = tx
        .iter()
        .map(|(_, f)| u32::from_be_bytes([f[20], f[21], f[22], f[23]]) >> 16)
        .collect();
    assert_eq!(counters, [0x7ffd, 0x7ffe, 0x7fff, 0, 1, 2, 3, 4]);
    let sector = |lba: u64| vec![lba as u8 + 1; 512];
    let answer = |f: &[u8]| {
        let lba = req_lba(f);
        let data = [sector(lba), sector(lba + 1)].concat();
        ata_rsp(f, TMAC, status::DRDY, 0, &data)
    };
    for (_, f) in &tx {
        e.handle_frame(t0, 0, &answer(f));
    }
    // Answering opened the window for nothing more: the read had eight frames.
    assert!(drain(&mut e, t0).is_empty());
    e.handle_frame(t0, 0, &answer(&tx[3].1));
    let want: Vec<u8> = (0..16).flat_map(sector).collect();
    assert_eq!(
        completions(&mut e),
        vec![Ok(Some(want))],
        "read {id} completes once"
    );
    let s = e.device(DEV).unwrap().stats;
    assert_eq!(s.unexpected_responses, 1, "the stale answer");
    assert_eq!(s.retransmits, 0);
}

/// Issue 11 item 3: a response is matched by device (shelf.slot) and tag, not by source
/// MAC (`aoecmd_ata_rsp` -> `getframe(d, tag)` never compares the source): a multi-port
/// target may answer from a port the frame was not sent to. It completes the frame, the
/// window of the target the frame went to is credited, and the mismatch is counted and
/// logged at most once per 5 s.
#[test]
fn response_from_another_mac_of_the_target_is_accepted() {
    let (mut e, t0) = up_engine(1000, true);
    let mut ids = Vec::new();
    let mut logs = 0;
    for i in 0..4u64 {
        let now = t0 + ms(1000 * i);
        let id = e
            .submit(now, DEV, BlockOp::Read { lba: i, sectors: 1 })
            .unwrap();
        let tx = drain(&mut e, now);
        assert_eq!(tx.len(), 1);
        assert_eq!(&tx[0].1[0..6], &TMAC.0, "sent to the target's known MAC");
        e.handle_frame(
            now,
            0,
            &ata_rsp(&tx[0].1, TMAC2, status::DRDY, 0, &[i as u8; 512]),
        );
        let ev = events(&mut e);
        assert!(
            ev.contains(&Event::Completed {
                id,
                result: Ok(Some(vec![i as u8; 512]))
            }),
            "{ev:?}"
        );
        logs += ev
            .iter()
            .filter(|e| matches!(e, Event::Log(l) if l.contains("response from 02:bb:00:00:00:02")))
            .count();
        ids.push(id);
    }
    assert_eq!(logs, 1, "rate-limited: one line for 4 responses within 5 s");
    let d = e.device(DEV).unwrap();
    assert_eq!(d.stats.other_mac_responses, 4);
    assert_eq!(d.stats.bad_responses, 0);
    assert_eq!(d.targets.len(), 1, "the answering MAC is not a new target");
    assert_eq!(
        d.targets[0].answers, 5,
        "IDENTIFY + 4 reads, credited to the target the frames went to"
    );
    assert_eq!(d.targets[0].nout, 0);
    // After 5 s the next one is logged again, with the count of those not logged.
    let now = t0 + ms(9000);
    e.submit(now, DEV, BlockOp::Read { lba: 9, sectors: 1 })
        .unwrap();
    let tx = drain(&mut e, now);
    e.handle_frame(
        now,
        0,
        &ata_rsp(&tx[0].1, TMAC2, status::DRDY, 0, &[0; 512]),
    );
    assert!(events(&mut e)
        .iter()
        .any(|e| matches!(e, Event::Log(l) if l.contains("(3 more since the last report)"))));
}

/// Issue 11 item 3, what the driver does about a corrupted tag that happens to match
/// another outstanding read of the same device: nothing beyond the tag. `aoecmd_ata_rsp`
/// and `ktiocomplete` check the data length only (a runt read is an error), never the LBA
/// or sector count echoed in the response; vblade answers reads with sector count 0, so
/// that field could not be checked anyway. We do the same: such a response completes the
/// frame whose tag it carries.
#[test]
fn response_is_matched_by_tag_only_like_the_driver() {
    let (mut e, t0) = up_engine(1000, true);
    let a = e
        .submit(
            t0,
            DEV,
            BlockOp::Read {
                lba: 10,
                sectors: 1,
            },
        )
        .unwrap();
    let tx = drain(&mut e, t0);
    // The same tag with another LBA and a zero sector count in the ATA header.
    let mut rsp = ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, &[3; 512]);
    rsp[26] = 0; // sector count, as vblade answers
    rsp[28] = 99; // lba0
    e.handle_frame(t0, 0, &rsp);
    assert!(events(&mut e).contains(&Event::Completed {
        id: a,
        result: Ok(Some(vec![3; 512]))
    }));
}

#[test]
fn retransmit_uses_fresh_tag_and_cuts_window_to_floor() {
    let (mut e, t0) = up_engine(1000, true);
    e.submit(t0, DEV, BlockOp::Read { lba: 0, sectors: 1 })
        .unwrap();
    let tx = drain(&mut e, t0);
    let first = tx[0].1.clone();
    let deadline = e.poll_timeout().unwrap();
    // RTO: the IDENTIFY's ~0 ms sample pulled the 250 ms/62.5 ms estimate down.
    assert!(deadline > t0 && deadline <= t0 + Duration::from_secs(2));
    e.handle_timeout(deadline);
    let tx = drain(&mut e, deadline);
    let again = &tx.iter().find(|(_, f)| f[19] == 0).unwrap().1;
    assert_eq!(&again[24..], &first[24..], "same request");
    assert_ne!(&again[20..24], &first[20..24], "fresh tag");
    let old = u32::from_be_bytes(first[20..24].try_into().unwrap());
    let new = u32::from_be_bytes(again[20..24].try_into().unwrap());
    let ev = events(&mut e);
    let want = format!("retransmit e7.3 oldtag={old:08x} newtag={new:08x}");
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::Log(l) if l.starts_with(&want))),
        "{ev:?}"
    );
    let d = e.device(DEV).unwrap();
    // Halved, but not below `min_window` (8); the driver would set it to 1.
    assert_eq!(d.targets[0].maxout, 8);
    assert_eq!(d.stats.retransmits, 1);
    // The late answer to the old tag completes the read (the same request: the timeout was
    // too soon); the copy's answer then comes late, and is counted and ignored.
    e.handle_frame(
        deadline,
        0,
        &ata_rsp(&first, TMAC, status::DRDY, 0, &[1; 512]),
    );
    e.handle_frame(
        deadline,
        0,
        &ata_rsp(again, TMAC, status::DRDY, 0, &[2; 512]),
    );
    let done = completions(&mut e);
    assert_eq!(done, vec![Ok(Some(vec![1; 512]))]);
    assert_eq!(e.device(DEV).unwrap().stats.unexpected_responses, 1);
}

#[test]
fn submit_errors() {
    let (mut e, t0) = up_engine(1000, true);
    let other = TargetAddr::new(1, 1);
    assert_eq!(
        e.submit(t0, other, BlockOp::Flush),
        Err(SubmitError::UnknownDevice)
    );
    assert_eq!(
        e.submit(t0, DEV, BlockOp::Read { lba: 0, sectors: 0 }),
        Err(SubmitError::Empty)
    );
    assert_eq!(
        e.submit(
            t0,
            DEV,
            BlockOp::Write {
                lba: 0,
                data: vec![0; 100]
            }
        ),
        Err(SubmitError::Unaligned { len: 100 })
    );
    assert_eq!(
        e.submit(
            t0,
            DEV,
            BlockOp::Read {
                lba: 999,
                sectors: 2
            }
        ),
        Err(SubmitError::OutOfRange {
            lba: 999,
            sectors: 2,
            capacity: 1000
        })
    );
    assert_eq!(
        e.submit(
            t0,
            DEV,
            BlockOp::Read {
                lba: u64::MAX,
                sectors: 2
            }
        ),
        Err(SubmitError::OutOfRange {
            lba: u64::MAX,
            sectors: 2,
            capacity: 1000
        })
    );
}

#[test]
fn window_bounds_outstanding_frames_and_queue_waits() {
    let (mut e, t0) = up_engine(100_000, true);
    // bufcnt 16 -> nframes 16, window starts at 8.
    for i in 0..20 {
        e.submit(
            t0,
            DEV,
            BlockOp::Read {
                lba: i * 2,
                sectors: 2,
            },
        )
        .unwrap();
    }
    let tx = drain(&mut e, t0);
    assert_eq!(tx.len(), 8, "window 8");
    assert_eq!(e.device(DEV).unwrap().ops_outstanding, 20);
    // Each answer opens the window (slow start below ssthresh 8? no: at 8, congestion
    // avoidance) and sends the next queued frame.
    e.handle_frame(t0, 0, &ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, &[0; 1024]));
    assert_eq!(drain(&mut e, t0).len(), 1);
}

#[test]
fn mtu_9000_gives_17_sector_payload() {
    let t0 = Instant::now();
    let mut e = Engine::new(Config::default(), t0);
    e.add_interface(0, "eth0", HOST, 9000);
    drain(&mut e, t0);
    e.handle_frame(t0, 0, &config_rsp(TMAC, DEV, 16, 17, 0));
    assert_eq!(e.device(DEV).unwrap().payload, 17 * 512);
    let tx = identifies(&drain(&mut e, t0));
    e.handle_frame(t0, 0, &identify_rsp(&tx[0].1, 1000));
    // A target that allows fewer sectors caps the path, once it is a path (its IDENTIFY
    // answered with the device's capacity).
    e.handle_frame(t0, 0, &config_rsp(TMAC2, DEV, 16, 8, 0));
    assert_eq!(e.device(DEV).unwrap().payload, 17 * 512);
    let tx = identifies(&drain(&mut e, t0));
    let (_, req) = tx.iter().find(|(m, _)| *m == TMAC2).expect("TMAC2 asked");
    e.handle_frame(t0, 0, &identify_rsp_from(req, TMAC2, 1000));
    assert_eq!(e.device(DEV).unwrap().payload, 8 * 512);
    // An MTU change recomputes it.
    e.add_interface(0, "eth0", HOST, 1500);
    assert_eq!(e.device(DEV).unwrap().payload, 1024);
}

/// The LBA of an LBA48 ATA request frame.
fn req_lba(f: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..6].copy_from_slice(&f[28..34]);
    u64::from_le_bytes(b)
}

/// How an op completes: the data read (None for other ops), or the error.
type IoResult = Result<Option<Vec<u8>>, IoError>;

/// Answers the frames `tx` and every frame those answers let out, each with its LBA's low
/// byte in all its data, checking that none asks for more than one sector. Returns the LBAs
/// asked for, sorted, and how op `id` completed.
fn answer_one_sector_frames(
    e: &mut Engine,
    now: Instant,
    mut tx: Vec<(usize, Vec<u8>)>,
    id: IoId,
) -> (Vec<u64>, Option<IoResult>) {
    let mut lbas = Vec::new();
    let mut done = None;
    while !tx.is_empty() {
        for (_, f) in &tx {
            assert_eq!(f[26], 1, "a frame larger than the path: {f:02x?}");
            let lba = req_lba(f);
            lbas.push(lba);
            let data = [lba as u8; 512];
            e.handle_frame(now, 0, &ata_rsp(f, TMAC, status::DRDY, 0, &data));
        }
        tx = drain(e, now);
        for ev in events(e) {
            if let Event::Completed { id: got, result } = ev {
                assert_eq!(got, id);
                done = Some(result);
            }
        }
    }
    lbas.sort_unstable();
    (lbas, done)
}

/// A 4-sector read from `lba` sent as two 2-sector frames, then the MTU lowered to 1000
/// (one sector per frame) under them. Returns the engine, the op and the two frames.
fn read_in_flight_at_mtu_shrink(lba: u64) -> (Engine, Instant, IoId, Vec<(usize, Vec<u8>)>) {
    let (mut e, t0) = up_engine(1000, true);
    let id = e
        .submit(t0, DEV, BlockOp::Read { lba, sectors: 4 })
        .unwrap();
    let tx = drain(&mut e, t0);
    assert_eq!(
        tx.iter().map(|(_, f)| f[26]).collect::<Vec<_>>(),
        vec![2, 2]
    );
    e.add_interface(0, "eth0", HOST, 1000);
    assert_eq!(e.device(DEV).unwrap().payload, 512);
    (e, t0, id, tx)
}

/// Frames in flight when the MTU shrinks (a target such as vblade then cannot send the
/// answer to a 2-sector read) are resent with what fits the path; the rest goes out in new
/// frames, and the read completes with every sector in its place.
#[test]
fn retransmit_after_mtu_shrink_splits_the_frame() {
    let (mut e, _, id, _) = read_in_flight_at_mtu_shrink(10);
    // The 2-sector frames are never answered: they time out and come back one sector
    // long; from then on every frame is answered, including those the answers let out.
    let now = e.poll_timeout().unwrap();
    e.handle_timeout(now);
    let tx = drain(&mut e, now);
    let (lbas, done) = answer_one_sector_frames(&mut e, now, tx, id);
    let data = done.expect("read completed").expect("read ok").unwrap();
    let want: Vec<u8> = (10u8..14).flat_map(|l| [l; 512]).collect();
    assert!(data == want, "sectors out of place");
    assert_eq!(lbas, vec![10, 11, 12, 13]);
    assert_eq!(e.device(DEV).unwrap().stats.unexpected_responses, 0);
}

/// Session 35: a window of frames sized before the MTU shrank is resized in one log line
/// for its target, with the count, whether the frames time out (vblade cannot answer them)
/// or the target refuses them (`aoe serve` aborts them). Before, one line a frame: "N
/// sectors of tag ... resent in new frames" or "...-sector frame tag ... refused after the
/// payload shrank", as many as the window had out.
#[test]
fn frames_resized_at_an_mtu_shrink_are_said_in_one_line_per_target() {
    for refuse in [false, true] {
        let (mut e, t0) = up_engine(1000, true);
        let id = e
            .submit(
                t0,
                DEV,
                BlockOp::Read {
                    lba: 0,
                    sectors: 64,
                },
            )
            .unwrap();
        let tx = drain(&mut e, t0);
        let out = tx.len();
        assert!(out >= 4, "{out} frames out");
        assert!(tx.iter().all(|(_, f)| f[26] == 2), "2-sector frames");
        e.add_interface(0, "eth0", HOST, 1000);
        let mut logs: Vec<String> = Vec::new();
        let mut done = None;
        let take = |e: &mut Engine, logs: &mut Vec<String>, done: &mut Option<IoResult>| {
            for ev in events(e) {
                match ev {
                    Event::Log(l) => logs.push(l),
                    Event::Completed { id: got, result } if got == id => *done = Some(result),
                    _ => {}
                }
            }
        };
        let mut now = t0;
        if refuse {
            for (_, f) in &tx {
                e.handle_frame(t0, 0, &ata_rsp(f, TMAC, 0x41, error_bits::ABRT, &[]));
            }
        }
        // Every 1-sector frame is answered; the 2-sector ones never are (they time out
        // when not refused), until the read completes.
        for _ in 0..1000 {
            take(&mut e, &mut logs, &mut done);
            if done.is_some() {
                break;
            }
            let tx = drain(&mut e, now);
            let small: Vec<_> = tx.iter().filter(|(_, f)| f[26] == 1).collect();
            if small.is_empty() {
                now = e.poll_timeout().expect("a timer while the read is out");
                e.handle_timeout(now);
                continue;
            }
            for (_, f) in small {
                let lba = req_lba(f);
                e.handle_frame(
                    now,
                    0,
                    &ata_rsp(f, TMAC, status::DRDY, 0, &[lba as u8; 512]),
                );
            }
        }
        let data = done.expect("read completed").expect("read ok").unwrap();
        let want: Vec<u8> = (0u8..64).flat_map(|l| [l; 512]).collect();
        assert!(data == want, "sectors out of place");
        let said: Vec<&String> = logs
            .iter()
            .filter(|l| l.contains("resent in new frames") || l.contains("refused after"))
            .collect();
        assert_eq!(said.len(), 1, "one line for the target: {said:#?}");
        let want = format!(
            "{DEV}: {out} frames to {TMAC} sized before the payload shrank to 1 sectors ({} \
             refused by the target): {} sectors resent in new frames",
            if refuse { out } else { 0 },
            // Refused, a frame's 2 sectors go out anew; timed out, its copy carries 1.
            if refuse { 2 * out } else { out },
        );
        assert_eq!(said[0], &want);
    }
}

/// A target that checks the sector count against its new, smaller MTU aborts the frames
/// sized before the change (`aoe serve` does): their sectors are sent again in frames that
/// fit, and the read succeeds. An abort of a frame that fits still fails the op.
#[test]
fn abort_of_a_frame_sized_before_the_mtu_shrank_resends_it() {
    let (mut e, t0, id, tx) = read_in_flight_at_mtu_shrink(20);
    for (_, f) in &tx {
        e.handle_frame(t0, 0, &ata_rsp(f, TMAC, 0x41, error_bits::ABRT, &[]));
    }
    assert!(
        !events(&mut e)
            .iter()
            .any(|ev| matches!(ev, Event::Completed { .. })),
        "the read failed on an abort caused by the MTU change"
    );
    let tx = drain(&mut e, t0);
    let (lbas, done) = answer_one_sector_frames(&mut e, t0, tx, id);
    assert_eq!(lbas, vec![20, 21, 22, 23]);
    let want: Vec<u8> = (20u8..24).flat_map(|l| [l; 512]).collect();
    assert!(done.expect("completed").expect("read ok").unwrap() == want);

    // A 1-sector frame aborted at payload 1 is a real error.
    let id = e
        .submit(t0, DEV, BlockOp::Read { lba: 5, sectors: 1 })
        .unwrap();
    let tx = drain(&mut e, t0);
    e.handle_frame(t0, 0, &ata_rsp(&tx[0].1, TMAC, 0x41, error_bits::ABRT, &[]));
    assert!(events(&mut e).contains(&Event::Completed {
        id,
        result: Err(IoError::Ata {
            status: 0x41,
            error: error_bits::ABRT
        })
    }));
}

#[test]
fn mtu_too_small_for_a_sector_takes_device_down() {
    let (mut e, t0) = up_engine(1000, true);
    let id = e
        .submit(t0, DEV, BlockOp::Read { lba: 0, sectors: 8 })
        .unwrap();
    e.add_interface(0, "eth0", HOST, 500);
    let ev = events(&mut e);
    assert!(ev.contains(&Event::DeviceDown(DEV)), "{ev:?}");
    assert!(ev.contains(&Event::Completed {
        id,
        result: Err(IoError::DeviceDown)
    }));
    assert_eq!(e.device(DEV).unwrap().payload, 0);
}

#[test]
fn flush_devices_skips_open_and_fails_io() {
    let (mut e, t0) = up_engine(1000, true);
    let id = e.submit(t0, DEV, BlockOp::Flush).unwrap();
    assert!(e.flush_devices(FlushWhich::Down).is_empty(), "device is up");
    e.set_open(DEV, true);
    assert!(e.flush_devices(FlushWhich::All).is_empty(), "open");
    e.set_open(DEV, false);
    assert_eq!(e.flush_devices(FlushWhich::Named(vec![DEV])), vec![DEV]);
    let ev = events(&mut e);
    assert!(ev.contains(&Event::Completed {
        id,
        result: Err(IoError::Removed)
    }));
    assert!(ev.contains(&Event::DeviceRemoved(DEV)));
    assert!(e.devices().is_empty());
    assert_eq!(
        e.poll_timeout(),
        Some(t0 + Duration::from_secs(60)),
        "no frame timers left"
    );
}

/// A device held by a user named in `flush_devices_except` (an NBD client) is skipped by
/// every kind of flush and logged as busy with the reason given, also when that user has
/// it open too (an NBD client is an opener: the named reason is the one logged).
#[test]
fn flush_devices_skips_held_devices() {
    let (mut e, _t0) = up_engine(1000, true);
    let held: BTreeMap<TargetAddr, String> = [(DEV, "NBD client on e7.3".to_string())].into();
    for open in [false, true] {
        e.set_open(DEV, open);
        for which in [FlushWhich::All, FlushWhich::Named(vec![DEV])] {
            assert!(e.flush_devices_except(which, &held).is_empty());
        }
        assert!(e.device(DEV).is_some());
        let ev = events(&mut e);
        assert!(ev.contains(&Event::Log(
            "e7.3: busy (NBD client on e7.3), not flushed".into()
        )));
        assert!(!ev.contains(&Event::Log("e7.3: busy (open), not flushed".into())));
    }
    e.set_open(DEV, false);
    assert_eq!(e.flush_devices(FlushWhich::All), vec![DEV]);
}

#[test]
fn random_bytes_never_panic() {
    let (mut e, t0) = up_engine(1000, true);
    e.submit(t0, DEV, BlockOp::Read { lba: 0, sectors: 3 })
        .unwrap();
    let tx = drain(&mut e, t0);
    let valid = ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, &[0; 1024]);
    let cfg = config_rsp(TMAC, DEV, 16, 2, 0);
    let mut rng = Rng::new(99);
    for i in 0..20_000u64 {
        let base = if i % 2 == 0 { &valid } else { &cfg };
        let mut f = base.clone();
        let len = rng.below(f.len() as u64 + 1) as usize;
        f.truncate(len);
        for _ in 0..rng.below(4) {
            if !f.is_empty() {
                let at = rng.below(f.len() as u64) as usize;
                f[at] = rng.next() as u8;
            }
        }
        e.handle_frame(t0, (i % 3) as usize, &f);
        e.handle_timeout(t0 + ms(i));
        drain(&mut e, t0);
        events(&mut e);
    }
}

proptest::proptest! {
    #[test]
    fn arbitrary_frames_never_panic(frame in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
        let (mut e, t0) = up_engine(1000, true);
        e.handle_frame(t0, 0, &frame);
        let mut f = frame.clone();
        if f.len() >= 20 {
            f[12] = 0x88;
            f[13] = 0xa2;
            f[14] = 0x18;
        }
        e.handle_frame(t0, 0, &f);
    }
}

// ------------------------------------------------------------------ simulations

fn spec(
    addr: TargetAddr,
    sectors: u64,
    bufcnt: u16,
    ifaces: Vec<(MacAddr, u32, usize)>,
) -> TargetSpec {
    TargetSpec {
        addr,
        sectors,
        buffer_count: bufcnt,
        ifaces,
        io_delay: Duration::from_micros(300),
        disk: None,
    }
}

/// Runs until `dev` is up, writing to "discover" every 2 s meanwhile (a lost announcement
/// would otherwise wait for the 60 s beacon).
fn bring_up(sim: &mut Sim, dev: TargetAddr) {
    for _ in 0..10 {
        if sim.run_until(Duration::from_secs(2), |s| s.is_up(dev)) {
            return;
        }
        let now = sim.now;
        sim.init.discover(now);
        sim.flush();
    }
    panic!("{dev} did not come up: {:?}", sim.events);
}

/// Random I/O over a lossy (5/7.5/10 %), duplicating (3 %), reordering (200-550 µs delay)
/// link, 16 seeds x 300 ops of 1-24 sectors (payload 2): every read returns the last data
/// written; duplicates are counted, never applied twice; windows stay bounded.
#[test]
fn sim_lossy_link_random_io() {
    let mut unexpected = 0;
    let mut retransmits = 0;
    for seed in 1..=16u64 {
        let loss = [5.0, 7.5, 10.0][seed as usize % 3];
        let mut sim = Sim::new(seed, LinkCfg::lossy(loss, 3.0), Config::default(), &[1500]);
        let t = sim.add_target(spec(DEV, 4096, 16, vec![(TMAC, 1500, 0)]));
        sim.targets[t].io_delay = Duration::from_micros(100 + 100 * seed);
        bring_up(&mut sim, DEV);
        let mut w = Workload::new(DEV, 4096, 24, 8);
        w.run(&mut sim, 300, Duration::from_secs(600));
        assert_eq!(w.done, 300);
        assert!(w.reads_checked > 60);
        // Whatever the initiator reads now is what the target's disk holds.
        assert!(
            *sim.targets[t].disk.borrow() == w.shadow,
            "seed {seed}: disk diverged"
        );
        let d = sim.device(DEV);
        unexpected += d.stats.unexpected_responses;
        retransmits += d.stats.retransmits;
        assert_eq!(d.stats.ops_failed, 0);
    }
    assert!(unexpected > 0, "duplicates were seen and ignored");
    assert!(retransmits > 0, "losses were recovered by retransmission");
}

/// Where the late copies of the late-copies workload come from. AoE has no sequence numbers,
/// so an old write executed after a newer write to the same sectors undoes it; the old
/// write's copy is made either by the network or by the initiator (docs/PROTOCOL.md
/// section 4, "Late copies of writes", cases 1 and 2), and each kind has its own guard.
#[derive(Clone, Copy, Debug)]
pub(super) enum LateCopies {
    /// The network's: 10 % of frames delivered twice, the second copy up to 30 ms late, on
    /// the engine's default retransmission timer (which, learnt from these delays, rarely
    /// fires while an original is still on its way). Only the target can tell such a copy
    /// from a new write: `aoe serve`'s duplicate-write table (case 1).
    ByTheNetwork,
    /// The initiator's: no duplication, but the retransmission timer capped at 5 ms
    /// (`Config::rto_max`) under the same 0.2-30 ms delays, so writes are retransmitted
    /// while their originals are still on the way and an original can land after its copy
    /// was answered and a newer write ran. The target sees a new tag; only the initiator's
    /// write fence prevents it (case 2).
    ByTheInitiator,
}

/// The late-copies set-up for `seed`: a 32-sector disk behind a link of 0.2-30 ms one-way
/// delays and 3 % loss, duplicating 10 % of frames ([`LateCopies::ByTheNetwork`]) or
/// retransmitting early (`rto_max` 5 ms, [`LateCopies::ByTheInitiator`]); the initiator's
/// write fence and the target's duplicate-write table on or off. The device is up; returns
/// the simulation and the target's index.
pub(super) fn late_copies_sim(
    seed: u64,
    copies: LateCopies,
    fence: bool,
    dedup: bool,
) -> (Sim, usize) {
    let (dup_pct, rto_max) = match copies {
        LateCopies::ByTheNetwork => (10.0, Config::default().rto_max),
        LateCopies::ByTheInitiator => (0.0, Duration::from_millis(5)),
    };
    let link = LinkCfg {
        loss_pct: 3.0,
        dup_pct,
        delay_min: Duration::from_micros(200),
        delay_max: Duration::from_millis(30),
    };
    let cfg = Config {
        fence_writes: fence,
        rto_max,
        ..Config::default()
    };
    let mut sim = Sim::new(seed, link, cfg, &[1500]);
    let t = sim.add_target(spec(DEV, 32, 16, vec![(TMAC, 1500, 0)]));
    if !dedup {
        sim.targets[t].eng.set_dedup(crate::target::DedupConfig {
            window: Duration::ZERO,
            entries: 0,
        });
    }
    bring_up(&mut sim, DEV);
    (sim, t)
}

/// The text of a caught panic (a `String` or `&str` payload), or "".
pub(super) fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

/// Late copies (issue 14, integrity): one-way delays from 0.2 to 30 ms and 3 % loss on a
/// small disk written over and over (1-4 sectors at random on 32, 1000 ops a seed), with
/// the copies of [`LateCopies`]. The disk must end as the last completed writes left it,
/// and every read must see them.
///
/// Runs the workload for seeds `1..=seeds` with the initiator's write fence and the
/// target's duplicate-write table each on or off, its ops from `sources` sources; returns
/// the seeds whose disk differs from the shadow after the copies still in the network
/// landed (or whose read returned stale data), with the retransmissions and late answers
/// seen.
pub(super) fn late_copies(
    fence: bool,
    dedup: bool,
    sources: u32,
    copies: LateCopies,
    seeds: u64,
) -> (Vec<(u64, String)>, u64, u64) {
    let mut retransmits = 0;
    let mut unexpected = 0;
    let mut undone = Vec::new();
    for seed in 1..=seeds {
        // A stale read panics in `Workload::reap`; that seed counts as undone too.
        let run = std::panic::catch_unwind(|| {
            let (mut sim, t) = late_copies_sim(seed, copies, fence, dedup);
            let mut w = Workload::new(DEV, 32, 4, 4);
            w.sources = sources;
            w.run(&mut sim, 1000, Duration::from_secs(600));
            assert_eq!(w.done, 1000);
            // Copies still in the network land now, then the disk is compared.
            sim.run_for(Duration::from_secs(5));
            let same = *sim.targets[t].disk.borrow() == w.shadow;
            let d = sim.device(DEV);
            assert_eq!(d.stats.ops_failed, 0);
            (same, d.stats.retransmits, d.stats.unexpected_responses)
        });
        match run {
            Ok((same, r, u)) => {
                retransmits += r;
                unexpected += u;
                if !same {
                    undone.push((seed, "disk differs from the last writes".to_owned()));
                }
            }
            Err(e) => {
                let why = panic_text(&*e);
                undone.push((seed, why));
            }
        }
    }
    (undone, retransmits, unexpected)
}

/// Seeds a late-copies test runs: each seed is 1000 ops, about 12 ms of test time.
const LATE_SEEDS: u64 = 40;

/// Each guard against its own kind of copy: the target's duplicate-write table (on, as
/// `aoe serve` runs) against the network's duplicates, and the write fence alone (the
/// table off, as vblade and ggaoed run) against the initiator's retransmissions. No seed
/// may lose an acknowledged write. The two controls below show that each workload does
/// lose one without its guard, so that this test keeps proving something.
///
/// Until session 24 the fence-alone case ran under the network's duplicates on seeds
/// 1..=12, which it passed by chance: seeds 21, 35, 37, 47, 56 and 65 of 1..=80 lost a
/// write there, the network's copies being outside what a fence can see (found by the
/// fairness work, docs/TEST-AUDIT.md "Session 24: fairness between clients").
#[test]
fn sim_late_copies_never_undo_newer_writes() {
    for (dedup, copies) in [
        (true, LateCopies::ByTheNetwork),
        (false, LateCopies::ByTheInitiator),
    ] {
        let (undone, retransmits, unexpected) = late_copies(true, dedup, 1, copies, LATE_SEEDS);
        assert!(
            undone.is_empty(),
            "dedup table {dedup}, copies {copies:?}: seeds {undone:?}: a late copy undid a newer write"
        );
        assert!(
            retransmits > 0 && unexpected > 0,
            "dedup table {dedup}, copies {copies:?}: copies were made and answered late"
        );
    }
}

/// The fence's control: without the fence and the target's table, some seed's late
/// original (its retransmitted copy answered first) undoes a newer write (seeds 25, 27
/// and 35 of 1..=40 when written). If this ever finds none, the workload no longer
/// reproduces the hazard and the fence-alone case above proves nothing.
#[test]
fn sim_late_copies_undo_newer_writes_without_fence_or_dedup() {
    let (undone, _, _) = late_copies(false, false, 1, LateCopies::ByTheInitiator, LATE_SEEDS);
    assert!(
        undone
            .iter()
            .any(|(_, why)| why.contains("stale") || why.contains("disk differs")),
        "no seed lost a write with neither guard ({undone:?}): the workload no longer \
         reproduces it"
    );
}

/// The table's control, and the fence's limit: with the fence on but the target's table
/// off, the network's late duplicates undo newer writes on some seeds (21, 35 and 37 of
/// 1..=40 when written): an initiator cannot tell that the network copied a frame, so
/// against a target without the table (vblade, ggaoed) a LAN that duplicates and delays
/// frames can lose acknowledged writes whatever the initiator does (docs/PROTOCOL.md
/// section 4, case 1). If this ever finds none, the table-on case above proves nothing.
#[test]
fn sim_network_duplicates_undo_newer_writes_without_the_targets_table() {
    let (undone, _, _) = late_copies(true, false, 1, LateCopies::ByTheNetwork, LATE_SEEDS);
    assert!(
        undone
            .iter()
            .any(|(_, why)| why.contains("stale") || why.contains("disk differs")),
        "no seed lost a write to the network's duplicates ({undone:?}): the workload no \
         longer reproduces them"
    );
}

/// A window from a small buffer count and one from a small `maxout`.
#[test]
fn sim_window_never_exceeds_min_bufcnt_maxout() {
    for (bufcnt, maxout) in [(4u16, 64u16), (32, 3)] {
        let cfg = Config {
            maxout,
            ..Config::default()
        };
        let mut sim = Sim::new(bufcnt as u64, LinkCfg::lossy(2.0, 1.0), cfg, &[1500]);
        sim.add_target(spec(DEV, 2048, bufcnt, vec![(TMAC, 1500, 0)]));
        bring_up(&mut sim, DEV);
        let mut w = Workload::new(DEV, 2048, 32, 16);
        w.run(&mut sim, 60, Duration::from_secs(600));
        let t = &sim.device(DEV).targets[0];
        let cap = bufcnt.min(maxout);
        assert!(
            t.max_nout <= cap && t.max_nout >= 2,
            "max_nout {} cap {cap}",
            t.max_nout
        );
        // (Sim::flush asserted the bound after every step as well.)
    }
}

/// Jumbo frames: 17 sectors per frame, a 40-sector read takes 3 frames.
#[test]
fn sim_mtu_9000_jumbo_payload() {
    let mut sim = Sim::new(5, LinkCfg::perfect(), Config::default(), &[9000]);
    sim.add_target(spec(DEV, 1024, 16, vec![(TMAC, 9000, 0)]));
    bring_up(&mut sim, DEV);
    assert_eq!(sim.device(DEV).payload, 8704);
    let sent = sim.device(DEV).stats.frames_sent;
    let id = sim
        .submit(
            DEV,
            BlockOp::Read {
                lba: 10,
                sectors: 40,
            },
        )
        .unwrap();
    assert!(sim.run_until(Duration::from_secs(1), |s| s.completions.contains_key(&id)));
    assert_eq!(sim.device(DEV).stats.frames_sent - sent, 3);
    let mut w = Workload::new(DEV, 1024, 60, 4);
    w.run(&mut sim, 40, Duration::from_secs(60));
}

/// Two devices (two target engines) on one segment, I/O to both at once.
#[test]
fn sim_two_devices() {
    let dev2 = TargetAddr::new(7, 4);
    let mut sim = Sim::new(11, LinkCfg::lossy(5.0, 2.0), Config::default(), &[1500]);
    sim.add_target(spec(DEV, 1024, 16, vec![(TMAC, 1500, 0)]));
    sim.add_target(spec(dev2, 512, 8, vec![(TMAC2, 1500, 0)]));
    bring_up(&mut sim, DEV);
    bring_up(&mut sim, dev2);
    let mut w1 = Workload::new(DEV, 1024, 16, 4);
    let mut w2 = Workload::new(dev2, 512, 16, 4);
    let (mut b1, mut b2) = (60, 60);
    let limit = sim.now + Duration::from_secs(300);
    loop {
        w1.reap(&mut sim);
        w2.reap(&mut sim);
        w1.fill(&mut sim, &mut b1);
        w2.fill(&mut sim, &mut b2);
        if b1 == 0 && b2 == 0 && w1.idle() && w2.idle() {
            break;
        }
        assert!(sim.step(limit), "stuck");
    }
    assert_eq!((w1.done, w2.done), (60, 60));
}

/// Multipath: one device behind two target engines (two NICs, one shared disk), reached
/// through two local interfaces. One path dies mid-run; I/O continues on the other and
/// every operation completes correctly.
#[test]
fn sim_multipath_path_dies() {
    for seed in [21u64, 22] {
        let cfg = Config {
            deadsecs: Duration::from_secs(60),
            ..Config::default()
        };
        let mut sim = Sim::new(seed, LinkCfg::lossy(3.0, 1.0), cfg, &[1500, 1500]);
        let a = sim.add_target(spec(DEV, 2048, 16, vec![(TMAC, 1500, 0)]));
        let disk: Disk = sim.targets[a].disk.clone();
        sim.add_target(TargetSpec {
            disk: Some(disk),
            ..spec(DEV, 2048, 16, vec![(TMAC2, 1500, 1)])
        });
        bring_up(&mut sim, DEV);
        assert!(sim.run_until(Duration::from_secs(5), |s| s.device(DEV).targets.len() == 2));
        let mut ifs = sim.device(DEV).interfaces;
        ifs.sort();
        assert_eq!(ifs, vec!["eth0".to_string(), "eth1".to_string()]);
        let mut w = Workload::new(DEV, 2048, 16, 12);
        w.run(&mut sim, 60, Duration::from_secs(60));
        let d = sim.device(DEV);
        assert!(d.targets.iter().all(|t| t.max_nout > 0), "both paths used");
        // Segment 1 goes dark.
        sim.seg_up[1] = false;
        let start = sim.now;
        w.run(&mut sim, 200, Duration::from_secs(600));
        assert_eq!(w.done, 260);
        assert!(sim.is_up(DEV));
        assert!(
            sim.now - start < Duration::from_secs(60),
            "no wait for deadsecs"
        );
        let d = sim.device(DEV);
        assert!(d.stats.retransmits > 0);
        assert!(sim.logs().any(|l| l.starts_with("retransmit e7.3")));
        assert_eq!(d.stats.ops_failed, 0);
        let dead = d.targets.iter().find(|t| t.mac == TMAC2).unwrap();
        assert!(dead.taint > 0, "the silent target is tainted: {dead:?}");
        let answers = dead.answers;
        // The path comes back: probes (one per 100 ms tick) untaint it and it carries I/O
        // again. With fast retransmission and an RTO near the RTT 200 ops take only a few
        // hundred ms, so run in rounds until it is clean. Probes start once the copies
        // lost on the dark path gave their slots back, up to a second after they were sent
        // (a silent target's copies are held that long: `Held`).
        sim.seg_up[1] = true;
        for _ in 0..10 {
            w.run(&mut sim, 200, Duration::from_secs(600));
            sim.run_for(Duration::from_millis(200));
            let d = sim.device(DEV);
            let t = d.targets.iter().find(|t| t.mac == TMAC2).unwrap();
            if t.taint == 0 && t.answers > answers + 20 {
                break;
            }
        }
        let back = sim.device(DEV);
        let back = back.targets.iter().find(|t| t.mac == TMAC2).unwrap();
        assert_eq!(back.taint, 0, "{back:?}");
        assert!(back.answers > answers + 20, "{back:?}");
    }
}

/// Seventeenth audit (session 34): a target whose frames time out together is said
/// "tainted" once, and "well again" once when its taint is back at 0, with how often it
/// was scorned meanwhile. Before, every frame of the window that timed out past
/// `scorn_after` scorned the target again and logged "target ... tainted (N)" each time:
/// 64 lines at one instant when a target's MAC changed under writes (session 33's `rig.py
/// gone8`), each of them in the daemon's log and the `err` file. Here both paths of a
/// multipath device go dark for 12 s (longer than `scorn_after`, 10 s) with a full window
/// out, then both come back.
#[test]
fn sim_a_target_is_said_tainted_once_and_well_again_once() {
    let cfg = Config {
        deadsecs: Duration::from_secs(60),
        ..Config::default()
    };
    let mut sim = Sim::new(23, LinkCfg::perfect(), cfg, &[1500, 1500]);
    let a = sim.add_target(spec(DEV, 4096, 16, vec![(TMAC, 1500, 0)]));
    let disk: Disk = sim.targets[a].disk.clone();
    sim.add_target(TargetSpec {
        disk: Some(disk),
        ..spec(DEV, 4096, 16, vec![(TMAC2, 1500, 1)])
    });
    bring_up(&mut sim, DEV);
    assert!(sim.run_until(Duration::from_secs(5), |s| s.device(DEV).targets.len() == 2));
    let mut w = Workload::new(DEV, 4096, 16, 32);
    w.run(&mut sim, 200, Duration::from_secs(60));
    sim.seg_up = vec![false, false];
    let mut budget = 32;
    w.fill(&mut sim, &mut budget);
    sim.run_for(Duration::from_secs(12));
    sim.seg_up = vec![true, true];
    w.run(&mut sim, 400, Duration::from_secs(600));
    for _ in 0..20 {
        sim.run_for(Duration::from_millis(500));
        if sim.device(DEV).targets.iter().all(|t| t.taint == 0) {
            break;
        }
    }
    let d = sim.device(DEV);
    assert_eq!(d.stats.ops_failed, 0);
    assert!(d.targets.iter().all(|t| t.taint == 0), "{:#?}", d.targets);
    let mut tainted_in_all = 0;
    for mac in [TMAC, TMAC2] {
        let said = |what: &str| -> Vec<String> {
            sim.logs()
                .filter(|l| l.contains(&format!("target {mac} {what}")))
                .map(str::to_owned)
                .collect()
        };
        let (tainted, well) = (said("tainted"), said("well again"));
        assert!(
            tainted.len() <= 1,
            "one line per change of state: {tainted:#?}"
        );
        assert_eq!(tainted.len(), well.len(), "{tainted:#?} {well:#?}");
        for l in &well {
            assert!(!l.contains("tainted 0 times"), "{l}");
        }
        tainted_in_all += tainted.len();
    }
    assert!(
        tainted_in_all > 0,
        "no target was tainted: the rig tests nothing"
    );
}

/// A multipath device (two targets, one disk, one interface each), a window of 16 out on
/// each, both paths dark for `dark`, then only the paths in `back` come back, under writes.
/// Asserts no op failed, the device never went down, and the disk holds every acknowledged
/// write (the shadow). Before session 34's fix, with the second path left dark, the device
/// went down at `deadsecs` ("tag ... unanswered for 60 s") though the first path answered:
/// the earliest frame at the first target waited for a window slot held by frames sent while
/// it was dark, whose timers backed off because they were not the earliest.
fn multipath_dark_then_back(seed: u64, dark: Duration, back: [bool; 2]) {
    let cfg = Config {
        deadsecs: Duration::from_secs(60),
        ..Config::default()
    };
    let mut sim = Sim::new(seed, LinkCfg::perfect(), cfg, &[1500, 1500]);
    let a = sim.add_target(spec(DEV, 4096, 16, vec![(TMAC, 1500, 0)]));
    let disk: Disk = sim.targets[a].disk.clone();
    sim.add_target(TargetSpec {
        disk: Some(disk.clone()),
        ..spec(DEV, 4096, 16, vec![(TMAC2, 1500, 1)])
    });
    bring_up(&mut sim, DEV);
    assert!(sim.run_until(Duration::from_secs(5), |s| s.device(DEV).targets.len() == 2));
    let mut w = Workload::new(DEV, 4096, 16, 32);
    w.run(&mut sim, 200, Duration::from_secs(60));
    sim.seg_up = vec![false, false];
    let mut budget = 32;
    w.fill(&mut sim, &mut budget);
    sim.run_for(dark);
    sim.seg_up = back.to_vec();
    // 400 more ops, within 50 s of virtual time: well inside `deadsecs` of the first frame
    // sent into the dark. `Workload::run` panics on an op that fails.
    w.run(&mut sim, 400, Duration::from_secs(50));
    let d = sim.device(DEV);
    assert_eq!(d.stats.ops_failed, 0);
    assert_eq!(d.state, DeviceState::Up, "{d:#?}");
    assert!(
        !sim.logs().any(|l| l.contains(" down:")),
        "the device went down: {:#?}",
        sim.logs()
            .filter(|l| l.contains(" down:"))
            .collect::<Vec<_>>()
    );
    // Let the copies still in the network land, then the disk must be the shadow.
    sim.run_for(Duration::from_secs(5));
    assert!(
        *disk.borrow() == w.shadow,
        "the disk lost an acknowledged write"
    );
}

/// Each path back alone, for two seeds: which target holds the earliest frame when the
/// paths go dark is the seed's, and each case failed on the base code with one of them
/// (seed 2 with the first path back, 23 with the second, at 1, 3 and 12 s).
fn multipath_dark_one_path_back(dark: Duration) {
    for seed in [2, 23] {
        for back in [[true, false], [false, true]] {
            multipath_dark_then_back(seed, dark, back);
        }
    }
}

#[test]
fn sim_multipath_dark_1s_one_path_back() {
    multipath_dark_one_path_back(Duration::from_secs(1));
}

#[test]
fn sim_multipath_dark_3s_one_path_back() {
    multipath_dark_one_path_back(Duration::from_secs(3));
}

#[test]
fn sim_multipath_dark_12s_one_path_back() {
    multipath_dark_one_path_back(Duration::from_secs(12));
}

/// Both paths back: passed before the fix too (pins it).
fn multipath_dark_both_back(dark: Duration) {
    for seed in [2, 23] {
        multipath_dark_then_back(seed, dark, [true, true]);
    }
}

#[test]
fn sim_multipath_dark_1s_both_paths_back() {
    multipath_dark_both_back(Duration::from_secs(1));
}

#[test]
fn sim_multipath_dark_3s_both_paths_back() {
    multipath_dark_both_back(Duration::from_secs(3));
}

#[test]
fn sim_multipath_dark_12s_both_paths_back() {
    multipath_dark_both_back(Duration::from_secs(12));
}

/// Session 35 (eighteenth audit, item 3): one target (one MAC) reached over two paths, the
/// second 100 ms longer each way (a relay or bridge whose thread the scheduler holds back),
/// under writes with 64 ops in flight. Answers on the short path overtake frames sent
/// earlier on the long one, so fast retransmission presumes those lost (RACK) and copies
/// them; their originals' answers come in later on the long path. Before, each such
/// presumption counted as a loss of the long path, and the originals' answers reset the
/// loss count of the path of the frame's latest copy (the short one), so after `2 *
/// nframes` the long path was ejected from the target ("ejecting if 1 ... after 257
/// losses"; seed 2 here; `faults.rs` `multipath_three_paths_dark_in_turn_under_a_window_of_writes`
/// saw it on real daemons within a second of the start, no path ever dark) and not used
/// again until the 60 s beacon. The driver counts a path's losses in `rexmit_timer` alone
/// (timeouts) and clears them on an answer received through it (`ktiocomplete`: `getif(t,
/// skb->dev)`); so now does the engine. Asserted for three seeds: no "ejecting" line, both
/// interfaces still the device's, no op failed (the workload panics on one), the disk the
/// shadow.
#[test]
fn sim_a_slower_path_of_one_target_is_not_ejected_for_reordering() {
    for seed in [1, 2, 3] {
        let cfg = Config {
            deadsecs: Duration::from_secs(60),
            ..Config::default()
        };
        let mut sim = Sim::new(seed, LinkCfg::perfect(), cfg, &[1500, 1500]);
        sim.seg_delay = vec![Duration::ZERO, ms(100)];
        // One MAC on both segments: a target port behind a bridge both paths reach.
        let a = sim.add_target(spec(DEV, 8192, 128, vec![(TMAC, 1500, 0), (TMAC, 1500, 1)]));
        let disk: Disk = sim.targets[a].disk.clone();
        bring_up(&mut sim, DEV);
        assert!(
            sim.run_until(Duration::from_secs(5), |s| s.device(DEV).interfaces.len()
                == 2)
        );
        let mut w = Workload::new(DEV, 8192, 128, 64);
        w.run(&mut sim, 3000, Duration::from_secs(120));
        let ejected: Vec<&str> = sim.logs().filter(|l| l.contains("ejecting")).collect();
        assert!(
            ejected.is_empty(),
            "seed {seed}: a path was ejected: {ejected:#?}"
        );
        let d = sim.device(DEV);
        assert_eq!(d.interfaces.len(), 2, "seed {seed}: {:?}", d.interfaces);
        assert_eq!(d.stats.ops_failed, 0);
        assert!(
            sim.logs().any(|l| l.contains("later frames answered")),
            "seed {seed}: no frame was presumed lost from later answers: the rig tests nothing"
        );
        sim.run_for(Duration::from_secs(5));
        assert!(
            *disk.borrow() == w.shadow,
            "seed {seed}: the disk lost an acknowledged write"
        );
    }
}

/// Session 36's multipath rig: one target (one MAC, a bridge all three paths reach) over
/// three paths whose segments add one-way `delays` to the link's 200 µs, its disk answering
/// after `io_delay` (None: the spec's default), `deadsecs` 60 s and `cfg` otherwise as
/// given; the device up with all three paths. Returns the simulator and the target's disk.
fn three_path_sim(
    seed: u64,
    cfg: Config,
    delays: Vec<Duration>,
    io_delay: Option<Duration>,
) -> (Sim, Disk) {
    let cfg = Config {
        deadsecs: Duration::from_secs(60),
        ..cfg
    };
    let mut sim = Sim::new(seed, LinkCfg::perfect(), cfg, &[1500, 1500, 1500]);
    sim.seg_delay = delays;
    let mut t = spec(
        DEV,
        8192,
        128,
        vec![(TMAC, 1500, 0), (TMAC, 1500, 1), (TMAC, 1500, 2)],
    );
    if let Some(d) = io_delay {
        t.io_delay = d;
    }
    let a = sim.add_target(t);
    let disk: Disk = sim.targets[a].disk.clone();
    bring_up(&mut sim, DEV);
    assert!(
        sim.run_until(Duration::from_secs(5), |s| s.device(DEV).interfaces.len()
            == 3)
    );
    (sim, disk)
}

/// Session 36: one target (one MAC, a bridge both paths reach) over three paths of
/// different lengths (one-way 0, 5 and 20 ms more than the link's 200 µs), no loss, a
/// window of 64 ops of up to 128 sectors, three seeds. Every frame is answered, so every
/// copy is needless: the engine's fast retransmission compared each frame with every frame
/// sent after it to the same target, and the answers on the shorter paths overtook the
/// longer paths' frames, each then copied (`Engine::later_frame_answered`; 15870 copies in
/// the three-path test of the real daemons, session 35). Asserted: no copy of any kind
/// (the target's `retransmits`, timeouts and tail probes included), every path still the
/// device's, no op failed, the disk the shadow. The target answers in arrival order (no
/// disk latency), so a copy can only come from one path's frames overtaken by another's.
#[test]
fn sim_paths_of_different_lengths_cost_no_copies_without_loss() {
    for seed in [1, 2, 3] {
        // Answers in arrival order (a disk that reorders is `reo_wnd`'s business, the
        // same over one path): any copy here is one path's frames overtaken by another's.
        let (mut sim, disk) = three_path_sim(
            seed,
            Config::default(),
            vec![Duration::ZERO, ms(5), ms(20)],
            Some(Duration::ZERO),
        );
        let mut w = Workload::new(DEV, 8192, 128, 64);
        w.run(&mut sim, 3000, Duration::from_secs(120));
        sim.run_for(Duration::from_secs(5));
        let d = sim.device(DEV);
        let t = &d.targets[0];
        assert_eq!(
            (t.retransmits, t.fast_retransmits, t.tail_probes, t.spurious),
            (0, 0, 0, 0),
            "seed {seed}: copies (all, from later answers, tail probes; found spurious) \
             over three clean paths of different lengths, {} answers; first lines: {:#?}",
            t.answers,
            sim.logs()
                .filter(|l| l.contains("retransmit"))
                .take(5)
                .collect::<Vec<_>>()
        );
        assert_eq!(d.interfaces.len(), 3, "seed {seed}: {:?}", d.interfaces);
        assert_eq!(d.stats.ops_failed, 0);
        assert!(
            *disk.borrow() == w.shadow,
            "seed {seed}: the disk lost an acknowledged write"
        );
    }
}

/// The three paths of [`sim_paths_of_different_lengths_cost_no_copies_without_loss`]
/// (the target's disk latency up to 300 µs), the longest losing `loss` percent of its
/// frames each way, 3000 ops in a window of 64: the longest op and the target's figures.
fn three_paths_one_lossy(seed: u64, loss: f64) -> (Duration, TargetInfo) {
    let cfg = Config {
        // The write fence holds a write over sectors of a lost copy for up to a second
        // (`Config::fence_writes`), by design and whatever found the loss; the link here
        // drops a lost frame for good, so no late copy can land.
        fence_writes: false,
        ..Config::default()
    };
    let (mut sim, disk) = three_path_sim(seed, cfg, vec![Duration::ZERO, ms(5), ms(20)], None);
    sim.seg_loss = vec![0.0, 0.0, loss];
    let mut w = Workload::new(DEV, 8192, 128, 64);
    w.run(&mut sim, 3000, Duration::from_secs(120));
    sim.run_for(Duration::from_secs(5));
    let d = sim.device(DEV);
    assert_eq!(d.stats.ops_failed, 0);
    assert_eq!(d.interfaces.len(), 3, "seed {seed}: {:?}", d.interfaces);
    assert!(
        *disk.borrow() == w.shadow,
        "seed {seed}: the disk lost an acknowledged write"
    );
    (w.longest, d.targets[0].clone())
}

/// Session 36, the other half of the rule above: the same three paths, the longest (20 ms
/// more each way) losing 3% of its frames each way. Its losses must still be found from
/// later answers (on their own path, or once a frame has been out longer than its path's
/// round trip allows), not left to the timer, which every answer on the other paths
/// restarts. Asserted for three seeds: frames were copied from later answers, and the
/// longest op took at most 500 ms (a dozen round trips of the lossy path) longer than the
/// longest of the same seed without loss (some 400 ms, the window's queue behind the
/// long path), no op failed, every path still the device's, the disk the shadow.
#[test]
fn sim_a_lossy_path_among_clean_ones_is_recovered_from_later_answers() {
    for seed in [1, 2, 3] {
        let (clean, _) = three_paths_one_lossy(seed, 0.0);
        let (lossy, t) = three_paths_one_lossy(seed, 3.0);
        eprintln!(
            "seed {seed}: longest op {clean:?} clean, {lossy:?} lossy; copies {} (from later \
             answers {}, tail probes {}, spurious {}), {} answers",
            t.retransmits, t.fast_retransmits, t.tail_probes, t.spurious, t.answers
        );
        assert!(
            t.fast_retransmits > 0,
            "seed {seed}: nothing found lost from later answers: the rig tests nothing"
        );
        assert!(
            lossy <= clean + ms(500),
            "seed {seed}: an op took {lossy:?} with one path losing 3%, {clean:?} without"
        );
    }
}

/// Session 36: one target over three paths, one of them dark (its segment cut both ways,
/// no link event on our side) for a whole run of 1000 ops while the others answer. The
/// engine sent every third frame into it, round-robin (the driver's `ifrotate`), and each
/// was then found lost and copied: 4150 frames per path and 4 s dark in the three-path
/// test of the real daemons. A path with frames presumed lost since its last answer now
/// takes one of `2^dark` of its turns (`Target::take_path`). Asserted for three seeds:
/// under 1 in 20 of the frames sent in the run went into the dark path (the base: 1 in 3),
/// every op done, every path still the device's, and once the segment is back, 200 more
/// ops go through, the disk the shadow.
#[test]
fn sim_a_dark_path_among_answering_ones_gets_few_frames() {
    for seed in [1, 2, 3] {
        let (mut sim, disk) =
            three_path_sim(seed, Config::default(), vec![Duration::ZERO; 3], None);
        let mut w = Workload::new(DEV, 8192, 128, 64);
        w.run(&mut sim, 100, Duration::from_secs(30));
        let before = sim.device(DEV).targets[0].retransmits;
        let sent = sim.sent_on.clone();
        sim.seg_up[2] = false;
        w.run(&mut sim, 1000, Duration::from_secs(60));
        let d = sim.device(DEV);
        let copies = d.targets[0].retransmits - before;
        let on: Vec<u64> = sim.sent_on.iter().zip(&sent).map(|(a, b)| a - b).collect();
        eprintln!(
            "seed {seed}: frames sent per path while path 2 was dark {on:?}, {copies} copies"
        );
        assert!(
            on[2] * 20 < on[0] + on[1],
            "seed {seed}: frames sent per path while path 2 was dark {on:?} ({copies} \
             copies, from later answers {}; {} ops in {:?})",
            d.targets[0].fast_retransmits,
            w.done,
            sim.now - sim.base,
        );
        assert_eq!(d.interfaces.len(), 3, "seed {seed}: {:?}", d.interfaces);
        sim.seg_up[2] = true;
        let answers = sim.device(DEV).targets[0].answers;
        w.run(&mut sim, 200, Duration::from_secs(30));
        let d = sim.device(DEV);
        assert_eq!(d.stats.ops_failed, 0);
        assert!(d.targets[0].answers > answers);
        sim.run_for(Duration::from_secs(5));
        assert!(
            *disk.borrow() == w.shadow,
            "seed {seed}: the disk lost an acknowledged write"
        );
    }
}

/// Session 35: a link cut under a window of ops, its interface then running again and the
/// daemon saying so (`Engine::interface_up`, from rtnetlink): the time from the link event to
/// the first op answered. Returns it, after checking that every op then completes, the
/// device stays up and the disk holds every acknowledged write.
fn link_back_first_answer(seed: u64, dark: Duration, event: bool) -> Duration {
    let cfg = Config {
        deadsecs: Duration::from_secs(60),
        ..Config::default()
    };
    let mut sim = Sim::new(seed, LinkCfg::perfect(), cfg, &[1500]);
    let a = sim.add_target(spec(DEV, 4096, 16, vec![(TMAC, 1500, 0)]));
    let disk: Disk = sim.targets[a].disk.clone();
    bring_up(&mut sim, DEV);
    let mut w = Workload::new(DEV, 4096, 16, 32);
    w.run(&mut sim, 200, Duration::from_secs(60));
    sim.seg_up[0] = false;
    let mut budget = 32;
    w.fill(&mut sim, &mut budget);
    sim.run_for(dark);
    assert!(sim.completions.is_empty(), "answered over a dead link");
    sim.seg_up[0] = true;
    let back = sim.now;
    if event {
        sim.init.interface_up(back, 0);
        sim.flush();
    }
    assert!(
        sim.run_until(Duration::from_secs(30), |s| !s.completions.is_empty()),
        "nothing answered within 30 s of the link back"
    );
    let first = sim.completions.values().map(|(at, _)| *at).min().unwrap() - back;
    w.run(&mut sim, 200, Duration::from_secs(50));
    let d = sim.device(DEV);
    assert_eq!(d.stats.ops_failed, 0);
    assert_eq!(d.state, DeviceState::Up, "{d:#?}");
    sim.run_for(Duration::from_secs(5));
    assert!(
        *disk.borrow() == w.shadow,
        "the disk lost an acknowledged write"
    );
    first
}

/// Session 35: the frames that went into a dead link go out again at the link event that
/// says it runs again, not when their timers, backed off through the silence up to
/// `rto_max` (5 s), next run. Before (session 34's `interface_up` sent only a Query
/// Config), the first answer after a cut of 3, 4.4, 6 or 9 s came 0.6-1.9 s after the
/// event (the timers alone); with it, 0.4-0.7 ms (a round trip).
#[test]
fn sim_frames_sent_into_a_dead_link_go_again_at_its_link_event() {
    let mut without = Vec::new();
    for (seed, dark_ms) in [(5, 3000), (6, 6000), (7, 9000), (8, 4400)] {
        let dark = Duration::from_millis(dark_ms);
        let first = link_back_first_answer(seed, dark, true);
        assert!(
            first < Duration::from_millis(50),
            "{dark:?} dark: the first answer came {first:?} after the link event"
        );
        without.push(link_back_first_answer(seed, dark, false));
    }
    // Without the event, the timers alone bring the frames out (the fallback, as before).
    assert!(
        without.iter().all(|d| *d < Duration::from_secs(6)),
        "{without:?}"
    );
}

/// Removing interfaces: I/O moves to the remaining path; without any path the device goes
/// down at once and nothing hangs.
#[test]
fn sim_remove_interface() {
    let mut sim = Sim::new(61, LinkCfg::perfect(), Config::default(), &[1500, 1500]);
    sim.add_target(spec(DEV, 512, 16, vec![(TMAC, 1500, 0), (TMAC2, 1500, 1)]));
    bring_up(&mut sim, DEV);
    assert!(sim.run_until(Duration::from_secs(5), |s| s.device(DEV).targets.len() == 2));
    let mut w = Workload::new(DEV, 512, 16, 8);
    w.fill(&mut sim, &mut 8);
    sim.init.remove_interface(1);
    sim.seg_up[1] = false;
    w.run(&mut sim, 40, Duration::from_secs(30));
    assert!(sim.is_up(DEV));
    assert_eq!(sim.device(DEV).interfaces, vec!["eth0".to_string()]);
    let id = sim
        .submit(
            DEV,
            BlockOp::Read {
                lba: 0,
                sectors: 64,
            },
        )
        .unwrap();
    sim.init.remove_interface(0);
    sim.flush();
    assert_eq!(sim.completions[&id].1, Err(IoError::DeviceDown));
    assert_eq!(sim.device(DEV).state, DeviceState::Down);
}

/// The target disappears: after `deadsecs` the device is down and every op has failed (none
/// hangs); submit fails at once. The target returns, discovery brings the device back up,
/// and the data written before is intact.
#[test]
fn sim_target_disappears_then_returns() {
    let deadsecs = Duration::from_secs(5);
    let cfg = Config {
        deadsecs,
        ..Config::default()
    };
    let mut sim = Sim::new(31, LinkCfg::lossy(5.0, 2.0), cfg, &[1500]);
    let t = sim.add_target(spec(DEV, 1024, 16, vec![(TMAC, 1500, 0)]));
    bring_up(&mut sim, DEV);
    let mut w = Workload::new(DEV, 1024, 16, 6);
    w.run(&mut sim, 80, Duration::from_secs(120));
    sim.set_target_up(t, false);
    let gone = sim.now;
    let mut ids = Vec::new();
    for i in 0..10u64 {
        let id = sim
            .submit(
                DEV,
                BlockOp::Write {
                    lba: i * 40,
                    data: vec![0xee; 40 * 512],
                },
            )
            .unwrap();
        ids.push(id);
    }
    assert!(sim.run_until(Duration::from_secs(60), |s| ids
        .iter()
        .all(|id| s.completions.contains_key(id))));
    let down_at = sim.now;
    assert!(down_at - gone >= deadsecs && down_at - gone < deadsecs + Duration::from_secs(1));
    for id in &ids {
        assert_eq!(sim.completions[id].1, Err(IoError::DeviceDown));
    }
    assert!(sim.events.iter().any(|(_, e)| *e == Event::DeviceDown(DEV)));
    assert!(sim.logs().any(|l| l.starts_with("e7.3 down: ")));
    assert_eq!(sim.device(DEV).state, DeviceState::Down);
    sim.init.set_open(DEV, true);
    assert_eq!(sim.device(DEV).state, DeviceState::DownCloseWait);
    assert_eq!(
        sim.submit(DEV, BlockOp::Read { lba: 0, sectors: 1 }),
        Err(SubmitError::DeviceDown)
    );
    // Nothing left to retransmit: only the beacon timer remains.
    sim.run_for(Duration::from_secs(2));
    assert_eq!(sim.device(DEV).targets[0].nout, 0);
    // The target comes back and announces itself, and a discover and the 60 s beacon find
    // it; but the device is open, so it is not IDENTIFYed and stays "down,closewait"
    // (`aoecmd_cfg_rsp` IDENTIFYs only when `nopen == 0`; the admin guide: it "cannot come
    // up again until it has been closed"). This test used to bring it up here, while open:
    // issue 11 item 1.
    sim.set_target_up(t, true);
    sim.announce(t);
    let now = sim.now;
    sim.init.discover(now);
    sim.flush();
    let back = sim.now;
    sim.run_for(Duration::from_secs(65));
    assert_eq!(sim.device(DEV).state, DeviceState::DownCloseWait);
    assert!(!sim
        .events
        .iter()
        .any(|(at, e)| *at >= back && *e == Event::DeviceUp(DEV)));
    // The last close sends a Query Config for e7.3 (`aoeblk_release` -> `aoecmd_cfg`); its
    // answer IDENTIFYs the device, which comes up without a discover.
    // The link stops losing frames here: that one query (or its answer) lost would leave
    // the device for the 60 s beacon, which depends on the seed, not on the close.
    sim.link.loss_pct = 0.0;
    sim.init.set_open(DEV, false);
    sim.flush();
    assert!(sim.run_until(Duration::from_secs(5), |s| s.is_up(DEV)));
    let id = sim
        .submit(
            DEV,
            BlockOp::Read {
                lba: 0,
                sectors: 1024,
            },
        )
        .unwrap();
    assert!(sim.run_until(Duration::from_secs(60), |s| s.completions.contains_key(&id)));
    let data = sim.completions[&id].1.clone().unwrap().unwrap();
    assert!(data == w.shadow, "data intact after the outage");
}

/// deadsecs = 0: retry forever; the device survives a long outage.
#[test]
fn sim_deadsecs_zero_retries_forever() {
    let cfg = Config {
        deadsecs: Duration::ZERO,
        ..Config::default()
    };
    let mut sim = Sim::new(41, LinkCfg::perfect(), cfg, &[1500]);
    let t = sim.add_target(spec(DEV, 256, 16, vec![(TMAC, 1500, 0)]));
    bring_up(&mut sim, DEV);
    sim.set_target_up(t, false);
    let id = sim
        .submit(
            DEV,
            BlockOp::Write {
                lba: 3,
                data: vec![5; 512],
            },
        )
        .unwrap();
    sim.run_for(Duration::from_secs(400));
    assert!(!sim.completions.contains_key(&id));
    assert!(sim.is_up(DEV));
    sim.set_target_up(t, true);
    assert!(sim.run_until(Duration::from_secs(10), |s| s.completions.contains_key(&id)));
    assert_eq!(sim.completions[&id].1, Ok(None));
    assert_eq!(sim.targets[t].disk.borrow()[3 * 512], 5);
}

/// Revalidate: a grown export shows its new size.
#[test]
fn sim_revalidate_sees_new_size() {
    let mut sim = Sim::new(51, LinkCfg::perfect(), Config::default(), &[1500]);
    sim.add_target(spec(DEV, 1000, 16, vec![(TMAC, 1500, 0)]));
    bring_up(&mut sim, DEV);
    assert_eq!(sim.device(DEV).sectors, 1000);
    // Replace the target with a bigger one (same MAC), as an export grown in place.
    let disk = sim.targets[0].disk.clone();
    disk.borrow_mut().resize(3000 * 512, 0);
    sim.targets.clear();
    sim.add_target(TargetSpec {
        disk: Some(disk),
        ..spec(DEV, 3000, 16, vec![(TMAC, 1500, 0)])
    });
    let now = sim.now;
    sim.init.revalidate(now, DEV).unwrap();
    sim.flush();
    assert!(sim.run_until(Duration::from_secs(5), |s| s.device(DEV).sectors == 3000));
    assert!(sim.events.iter().any(|(_, e)| *e
        == Event::DeviceResized {
            dev: DEV,
            old_sectors: 1000,
            new_sectors: 3000
        }));
    assert_eq!(
        sim.init.revalidate(now, TargetAddr::new(9, 9)),
        Err(DeviceError::UnknownDevice)
    );
}

// ------------------------------------------------------------------ issue 11: the driver's rules

/// Replaces the sim's only target by one of `sectors` sectors on the same disk (grown in
/// place, as an export file that was extended); its announcement is lost.
fn grow_target(sim: &mut Sim, sectors: u64) {
    let disk = sim.targets[0].disk.clone();
    disk.borrow_mut().resize(sectors as usize * 512, 0);
    sim.targets.clear();
    sim.seg_up[0] = false;
    sim.add_target(TargetSpec {
        disk: Some(disk),
        ..spec(DEV, sectors, 16, vec![(TMAC, 1500, 0)])
    });
    sim.seg_up[0] = true;
}

/// Item 2: an up device nobody has open is re-IDENTIFYed on every config response
/// (`aoecmd_cfg_rsp`: `if (d->nopen == 0) aoecmd_ata_id(d)`), so a target that grew is seen
/// on the next 60 s beacon without `revalidate`; an open one is not re-read until closed.
#[test]
fn sim_beacon_reidentifies_an_idle_device() {
    let mut sim = Sim::new(61, LinkCfg::perfect(), Config::default(), &[1500]);
    sim.add_target(spec(DEV, 1000, 16, vec![(TMAC, 1500, 0)]));
    bring_up(&mut sim, DEV);
    // Open: the beacon's answer changes nothing users see.
    sim.init.set_open(DEV, true);
    grow_target(&mut sim, 2000);
    sim.run_for(Duration::from_secs(61));
    assert_eq!(sim.device(DEV).sectors, 1000, "open: not re-IDENTIFYed");
    assert_eq!(sim.device(DEV).state, DeviceState::Up);
    // Closed: the close's query is answered and re-IDENTIFYs it; so does the next beacon's.
    sim.init.set_open(DEV, false);
    sim.flush();
    assert!(sim.run_until(Duration::from_secs(1), |s| s.device(DEV).sectors == 2000));
    grow_target(&mut sim, 3000);
    let t = sim.now;
    assert!(sim.run_until(Duration::from_secs(61), |s| s.device(DEV).sectors == 3000));
    assert!(sim.now - t > Duration::from_secs(50), "found by the beacon");
    assert!(sim.events.iter().any(|(_, e)| *e
        == Event::DeviceResized {
            dev: DEV,
            old_sectors: 2000,
            new_sectors: 3000
        }));
    assert_eq!(sim.device(DEV).state, DeviceState::Up);
}

/// Items 1 and 7: the last close sends a Query Config for the device's shelf.slot,
/// broadcast, on every interface (`aoeblk_release` -> `aoecmd_cfg(major, minor)`), whether
/// it is up or down; an open down device is not IDENTIFYed by config responses.
#[test]
fn last_close_queries_the_device_on_every_interface() {
    let (mut e, t0) = up_engine(1000, true);
    e.add_interface(1, "eth1", INIT_MACS[1], 9000);
    drain(&mut e, t0);
    e.set_open(DEV, true);
    e.set_open(DEV, true);
    assert!(drain(&mut e, t0).is_empty());
    e.set_open(DEV, false);
    let tx = drain(&mut e, t0);
    assert_eq!(tx.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1]);
    for (_, f) in &tx {
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[16..20], &[0, 7, 3, 1], "e7.3, Query Config");
    }
    // Down while open: config responses do not IDENTIFY it.
    e.set_open(DEV, true);
    e.handle_timeout(t0 + Duration::from_secs(1));
    let down = e.submit(t0, DEV, BlockOp::Read { lba: 0, sectors: 1 });
    assert!(down.is_ok());
    drain(&mut e, t0);
    // The timer run at each deadline until `deadsecs` (one run 200 s later would be a stall
    // of the initiator, which does not count: `a_stall_of_the_initiator_...`).
    let mut at = t0;
    while e.device(DEV).unwrap().state == DeviceState::Up {
        at = e
            .poll_timeout()
            .expect("a timer while the read waits")
            .max(at + ms(1));
        assert!(at < t0 + Duration::from_secs(200), "never went down");
        e.handle_timeout(at);
        drain(&mut e, at);
    }
    assert_eq!(e.device(DEV).unwrap().state, DeviceState::DownCloseWait);
    let now = t0 + Duration::from_secs(201);
    drain(&mut e, now);
    e.handle_frame(now, 0, &config_rsp(TMAC, DEV, 16, 2, 0));
    assert!(drain(&mut e, now).is_empty(), "no IDENTIFY while open");
    assert_eq!(e.device(DEV).unwrap().state, DeviceState::DownCloseWait);
    // The last close: a query; its answer IDENTIFYs; the device comes up.
    e.set_open(DEV, false);
    let tx = drain(&mut e, now);
    assert_eq!(tx.len(), 2);
    assert_eq!(e.device(DEV).unwrap().state, DeviceState::Down);
    e.handle_frame(now, 0, &config_rsp(TMAC, DEV, 16, 2, 0));
    let tx = drain(&mut e, now);
    assert_eq!(tx.len(), 1);
    assert_eq!(tx[0].1[27], 0xec, "IDENTIFY");
    e.handle_frame(now, 0, &identify_rsp(&tx[0].1, 1000));
    assert_eq!(e.device(DEV).unwrap().state, DeviceState::Up);
}

/// Item 4: LBA48 as `ataid_complete` decides it: bit 10 of word 83 or of word 86, without
/// looking at word 83's validity bits; the capacity then comes from words 100-103.
#[test]
fn lba48_from_word_83_or_86_without_validity_gate() {
    let big = 0x1_0000_0000u64; // beyond LBA28
    for (w83, w86) in [
        (0x0400u16, 0x0000u16), // bit 10, validity bits 00
        (0xc400, 0x0000),       // bit 10, validity bits 11
        (0x0000, 0x0400),       // word 86 only
    ] {
        let t0 = Instant::now();
        let mut e = Engine::new(Config::default(), t0);
        e.add_interface(0, "eth0", HOST, 1500);
        drain(&mut e, t0);
        e.handle_frame(t0, 0, &config_rsp(TMAC, DEV, 16, 2, 0));
        let tx = drain(&mut e, t0);
        let mut page = identify_page(big);
        set_word(&mut page, 83, w83);
        set_word(&mut page, 86, w86);
        e.handle_frame(t0, 0, &ata_rsp(&tx[0].1, TMAC, status::DRDY, 0, &page));
        let d = e.device(DEV).unwrap();
        assert_eq!(d.state, DeviceState::Up);
        assert_eq!(d.sectors, big, "words 83/86 = {w83:#06x}/{w86:#06x}");
        e.submit(
            t0,
            DEV,
            BlockOp::Read {
                lba: big - 1,
                sectors: 1,
            },
        )
        .unwrap();
        let tx = drain(&mut e, t0);
        assert_eq!(tx[0].1[27], 0x24, "READ SECTORS EXT");
    }
}

/// Item 5: `aoe_maxout` defaults to 128, what the admin guide documents (the driver's code
/// has 64): a target with 200 buffers gets a window ceiling of 128.
#[test]
fn maxout_default_is_the_admin_guides_128() {
    assert_eq!(Config::default().maxout, 128);
    let t0 = Instant::now();
    let mut e = Engine::new(Config::default(), t0);
    e.add_interface(0, "eth0", HOST, 1500);
    e.handle_frame(t0, 0, &config_rsp(TMAC, DEV, 200, 2, 0));
    assert_eq!(e.device(DEV).unwrap().targets[0].nframes, 128);
}

/// Item 7: revalidate as `revalidate` in aoechr.c: clean slate (payload forgotten, windows
/// reset), an IDENTIFY, and a Query Config for the shelf.slot broadcast on every interface;
/// the payload is re-learnt from the answer, and [`Event::Revalidated`] tells the daemon to
/// re-read the partition table even when the size did not change.
#[test]
fn revalidate_queries_every_interface_and_relearns_the_payload() {
    let t0 = Instant::now();
    let mut e = Engine::new(Config::default(), t0);
    e.add_interface(0, "eth0", HOST, 9000);
    e.add_interface(1, "eth1", INIT_MACS[1], 9000);
    drain(&mut e, t0);
    e.handle_frame(t0, 0, &config_rsp(TMAC, DEV, 16, 17, 0));
    let tx = drain(&mut e, t0);
    e.handle_frame(t0, 0, &identify_rsp(&tx[0].1, 1000));
    events(&mut e);
    assert_eq!(e.device(DEV).unwrap().payload, 17 * 512);
    e.revalidate(t0, DEV).unwrap();
    let tx = drain(&mut e, t0);
    let ident: Vec<_> = tx.iter().filter(|t| t.1[19] == 0).collect();
    let queries: Vec<_> = tx.iter().filter(|t| t.1[19] == 1).collect();
    assert_eq!(ident.len(), 1, "one IDENTIFY");
    assert_eq!(ident[0].1[27], 0xec);
    assert_eq!(queries.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1]);
    for (_, f) in &queries {
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[16..19], &[0, 7, 3], "for e7.3 only");
    }
    let d = e.device(DEV).unwrap();
    assert_eq!(
        d.payload, 1024,
        "forgotten: the driver's DEFAULTBCNT until the answer"
    );
    assert_eq!(
        d.targets[0].maxout, 8,
        "window reset (the engine's wreset: half of 16)"
    );
    // Same size: no resize, but Revalidated.
    e.handle_frame(t0, 0, &identify_rsp(&ident[0].1, 1000));
    let ev = events(&mut e);
    assert!(ev.contains(&Event::Revalidated(DEV)), "{ev:?}");
    assert!(!ev.iter().any(|e| matches!(e, Event::DeviceResized { .. })));
    // The target now says 8 sectors per frame: re-learnt from its answer.
    e.handle_frame(t0, 0, &config_rsp(TMAC, DEV, 16, 8, 0));
    assert_eq!(e.device(DEV).unwrap().payload, 8 * 512);
    // A later IDENTIFY (the beacon's) is not a revalidate.
    let tx = drain(&mut e, t0);
    let ident: Vec<_> = tx.iter().filter(|t| t.1[19] == 0).collect();
    assert_eq!(
        ident.len(),
        1,
        "re-IDENTIFY of an idle device on the config answer"
    );
    e.handle_frame(t0, 0, &identify_rsp(&ident[0].1, 1000));
    assert!(!events(&mut e).contains(&Event::Revalidated(DEV)));
}

// ------------------------------------------------------------------------------------------
// Floods (issue 14): caps on devices and target MACs, rate-limited peer log lines

/// A flood of config responses for random shelf.slot from random MACs stops adding devices
/// and MACs at the caps: the frames beyond are counted, one log line per interval says so,
/// and nothing is sent for them (no IDENTIFY to a phantom beyond the cap). Devices already
/// known keep working and a known MAC still refreshes its device.
#[test]
fn config_response_flood_stops_at_the_device_and_target_caps() {
    let (mut e, t0) = up_engine(1000, true);
    let cfg = Config {
        max_devices: 8,
        max_targets: 3,
        ..Config::default()
    };
    // The same engine state with small caps: rebuild it through the public calls.
    let mut small = Engine::new(cfg, t0);
    small.add_interface(0, "eth0", HOST, 1500);
    drain(&mut small, t0);
    small.handle_frame(t0, 0, &config_rsp(TMAC, DEV, 16, 2, 0));
    let tx = drain(&mut small, t0);
    small.handle_frame(t0, 0, &identify_rsp(&tx[0].1, 1000));
    assert!(events(&mut small).contains(&Event::DeviceUp(DEV)));
    let mut rng = Rng::new(14);
    let mut sent = 0;
    for i in 0..20_000u32 {
        let now = t0 + Duration::from_micros(u64::from(i) * 50); // 1 s in all
        let addr = TargetAddr::new((rng.below(0xffff)) as u16, rng.below(0xff) as u8);
        let src = MacAddr([2, 0xcc, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
        let f = config_rsp(src, addr, 16, 2, 0);
        small.handle_frame(now, 0, &f);
        e.handle_frame(now, 0, &f);
        sent += drain(&mut small, now).len();
        // New MACs for the real device.
        small.handle_frame(now, 0, &config_rsp(src, DEV, 16, 2, 0));
    }
    assert_eq!(small.devices().len(), 8, "devices at the cap");
    assert_eq!(
        small.device(DEV).unwrap().targets.len(),
        3,
        "MACs at the cap"
    );
    assert!(small.devices().iter().all(|d| d.targets.len() <= 3));
    assert!(
        sent <= 7 + 2 + 2,
        "{sent} frames sent for the flood: one IDENTIFY per device admitted, one per new \
         MAC of the device up (asked before it becomes a path)"
    );
    let st = small.stats();
    assert!(st.devices_refused > 19_000, "{st:?}");
    assert!(st.targets_refused > 19_000, "{st:?}");
    let logs = log_lines(&mut small, |l| l.contains("refused"));
    // One line per kind per second of flood (1 s of simulated time: at most 2 each).
    assert!(
        (2..=4).contains(&logs.len()),
        "{} refusal lines: {logs:?}",
        logs.len()
    );
    // The default cap (256) holds too.
    assert_eq!(e.devices().len(), Config::default().max_devices);
    // The real device still reads.
    let id = small
        .submit(t0, DEV, BlockOp::Read { lba: 0, sectors: 1 })
        .unwrap();
    let tx = drain(&mut small, t0);
    let (_, req) = tx.iter().find(|(_, f)| f[19] == 0).expect("read request");
    let mac = MacAddr(req[0..6].try_into().unwrap());
    small.handle_frame(t0, 0, &ata_rsp(req, mac, status::DRDY, 0, &[7u8; 512]));
    assert!(events(&mut small).iter().any(
        |ev| matches!(ev, Event::Completed { id: i, result: Ok(Some(d)) } if *i == id && d[0] == 7)
    ));
}

/// Lines a peer provokes at will (here: responses with unknown tags) are rate-limited: one
/// per second, the next carrying the count suppressed.
#[test]
fn unexpected_responses_log_one_line_per_interval() {
    let (mut e, t0) = up_engine(1000, true);
    events(&mut e);
    let req = {
        e.submit(t0, DEV, BlockOp::Read { lba: 0, sectors: 1 })
            .unwrap();
        drain(&mut e, t0).remove(0).1
    };
    for i in 0..1000u32 {
        let mut f = ata_rsp(&req, TMAC, status::DRDY, 0, &[0u8; 512]);
        f[20..24].copy_from_slice(&(0x7000_0000 | i).to_be_bytes());
        e.handle_frame(t0 + Duration::from_millis(u64::from(i) * 2), 0, &f);
    }
    let lines = log_lines(&mut e, |l| l.starts_with("unexpected rsp"));
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1].ends_with("(499 similar lines suppressed)"),
        "{lines:?}"
    );
    assert_eq!(e.device(DEV).unwrap().stats.unexpected_responses, 1000);
}

/// A Query Config response from the known target MAC while the device is open changes
/// neither its firmware version nor its config string: `aoecmd_cfg_rsp` takes what the
/// users see (`d->fw_ver`) only when `d->nopen == 0` ("don't change users' perspective";
/// the driver keeps no config string at all). The engine used to overwrite the string
/// on every response, from any MAC, open or not.
#[test]
fn config_response_keeps_an_open_devices_config_string() {
    let (mut e, t0) = up_engine(1000, true);
    let rsp = |fw: u16, s: &[u8]| {
        let mut h = HeaderRepr::request(HOST, TMAC, DEV, Command::QueryConfig, Tag(0));
        h.response = true;
        Message {
            header: h,
            body: Body::Config(ConfigRepr {
                buffer_count: 16,
                firmware_version: fw,
                sector_count: 2,
                aoe_version: 1,
                ccmd: ConfigCommand::Read,
                config: s,
            }),
        }
        .to_vec()
        .unwrap()
    };
    e.set_open(DEV, true);
    drain(&mut e, t0);
    e.handle_frame(t0 + ms(1), 0, &rsp(0x1234, b"other host's string"));
    let d = e.device(DEV).unwrap();
    assert_eq!(d.firmware_version, 0x4019, "open: firmware version kept");
    assert_eq!(d.config, b"cfg", "open: config string kept");
    // Closed again, the next response is taken, as the firmware version is.
    e.set_open(DEV, false);
    drain(&mut e, t0 + ms(2));
    e.handle_frame(t0 + ms(3), 0, &rsp(0x1234, b"new"));
    let d = e.device(DEV).unwrap();
    assert_eq!(d.firmware_version, 0x1234);
    assert_eq!(d.config, b"new");
}

/// A home for lent buffers that records what comes back.
fn home_of(back: &std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) -> LentHome {
    let back = back.clone();
    Box::new(move |b| back.lock().unwrap().push(b))
}

/// `ReadInto`: the read completes with the caller's very buffer (its block unmoved, filled
/// with the target's bytes); failed, the buffer goes home instead; too small, it is refused
/// and goes home at once.
#[test]
fn read_into_fills_the_lent_buffer_or_sends_it_home() {
    let (mut e, t0) = up_engine(1000, true);
    let back = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let buf = vec![0xeeu8; 8192];
    let ptr = buf.as_ptr();
    let buf = Lent::new(buf, home_of(&back));
    e.submit(
        t0,
        DEV,
        BlockOp::ReadInto {
            lba: 4,
            sectors: 4,
            buf,
        },
    )
    .unwrap();
    let want: Vec<u8> = (0..2048).map(|i| (i % 251) as u8).collect();
    for (_, req) in drain(&mut e, t0) {
        let m = Message::parse(&req).unwrap();
        let Body::Ata(a) = m.body else { continue };
        let at = (a.lba as usize - 4) * 512;
        let n = usize::from(a.sector_count) * 512;
        e.handle_frame(
            t0,
            0,
            &ata_rsp(&req, TMAC, status::DRDY, 0, &want[at..at + n]),
        );
    }
    match completions(&mut e).pop() {
        Some(Ok(Some(d))) => {
            assert_eq!(d.as_ptr(), ptr, "filled where it is");
            assert!(d == want);
        }
        other => panic!("read: {other:?}"),
    }
    assert!(back.lock().unwrap().is_empty(), "completed: not sent home");

    // An ATA error: the buffer goes home.
    let buf = vec![0u8; 4096];
    let ptr = buf.as_ptr();
    e.submit(
        t0,
        DEV,
        BlockOp::ReadInto {
            lba: 0,
            sectors: 4,
            buf: Lent::new(buf, home_of(&back)),
        },
    )
    .unwrap();
    let tx = drain(&mut e, t0);
    let rsp = ata_rsp(
        &tx[0].1,
        TMAC,
        status::DRDY | status::ERR,
        error_bits::UNC,
        &[],
    );
    e.handle_frame(t0, 0, &rsp);
    assert!(matches!(
        completions(&mut e).pop(),
        Some(Err(IoError::Ata { .. }))
    ));
    let got = back
        .lock()
        .unwrap()
        .pop()
        .expect("the failed read's buffer came home");
    assert_eq!(got.as_ptr(), ptr);

    // Too small for 4 sectors: refused, home at once.
    let r = e.submit(
        t0,
        DEV,
        BlockOp::ReadInto {
            lba: 0,
            sectors: 4,
            buf: Lent::new(vec![0; 1024], home_of(&back)),
        },
    );
    assert_eq!(
        r,
        Err(SubmitError::BufferTooSmall {
            capacity: 1024,
            need: 2048
        })
    );
    assert_eq!(back.lock().unwrap().len(), 1);
}

/// `WriteLent`: the buffer goes home once the write is done with it, not before.
#[test]
fn write_lent_goes_home_after_the_write() {
    let (mut e, t0) = up_engine(1000, true);
    let back = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let data: Vec<u8> = (0..4096).map(|i| (i % 199) as u8).collect();
    let ptr = data.as_ptr();
    e.submit(
        t0,
        DEV,
        BlockOp::WriteLent {
            lba: 8,
            data: Lent::new(data, home_of(&back)),
        },
    )
    .unwrap();
    let tx = drain(&mut e, t0);
    assert!(back.lock().unwrap().is_empty(), "still in flight");
    for (_, req) in &tx {
        e.handle_frame(t0, 0, &ata_rsp(req, TMAC, status::DRDY, 0, &[]));
    }
    assert_eq!(completions(&mut e).pop(), Some(Ok(None)));
    let got = back.lock().unwrap().pop().expect("home after the write");
    assert_eq!(got.as_ptr(), ptr);
}

/// [`CountedHasher`] spreads numbers counted up one by one over every low-bit bucket (a
/// hash table of 2^k buckets gets one of 2^k consecutive keys in each), wherever the count
/// starts, and gives different keys different hashes.
#[test]
fn counted_hasher_spreads_consecutive_keys_over_the_low_bits() {
    use std::hash::{BuildHasher, BuildHasherDefault};
    let b = BuildHasherDefault::<CountedHasher>::default();
    for start in [0u64, 1 << 20, u64::MAX - 5000] {
        for bits in [4u32, 8, 12] {
            let n = 1u64 << bits;
            let mut seen: Vec<u64> = (0..n)
                .map(|i| b.hash_one(start.wrapping_add(i)) & (n - 1))
                .collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len() as u64, n, "start {start}, {bits} bits");
        }
    }
    assert_ne!(b.hash_one(IoId(1)), b.hash_one(IoId(2)));
}

/// Sixth audit (session 23): a second MAC announces the unopened device again and answers
/// each IDENTIFY that follows with another size. Every change still goes out as an event,
/// but the `size changed` line is logged about once per `peer_log_interval`, with the
/// count of the changes not logged: on the code before, 1000 lines for 1000 answers.
#[test]
fn identify_answers_flapping_the_size_are_logged_once_an_interval() {
    let (mut e, t0) = up_engine(1000, true);
    events(&mut e);
    let mut lines = Vec::new();
    let mut resized = 0;
    for i in 0..1000u64 {
        let now = t0 + ms(i / 4);
        e.handle_frame(now, 0, &config_rsp(TMAC2, DEV, 16, 2, 0));
        let tx = drain(&mut e, now);
        let req = tx
            .iter()
            .map(|(_, f)| f)
            .find(|f| {
                let m = Message::parse(f).unwrap();
                matches!(m.body, Body::Ata(a) if a.cmd_status == 0xec)
            })
            .unwrap_or_else(|| panic!("no IDENTIFY after config response {i}"));
        let size = if i % 2 == 0 { 2000 } else { 1000 };
        let rsp = ata_rsp(req, TMAC2, status::DRDY, 0, &identify_page(size));
        e.handle_frame(now, 0, &rsp);
        for ev in events(&mut e) {
            match ev {
                Event::Log(l) if l.contains("size changed") => lines.push(l),
                Event::DeviceResized { .. } => resized += 1,
                _ => {}
            }
        }
    }
    assert_eq!(resized, 1000, "every change is an event");
    assert!(
        lines.len() <= 2,
        "{} size-change lines for 1000 IDENTIFY answers in 0.25 s: {:?}",
        lines.len(),
        &lines[..lines.len().min(3)]
    );
    // After the interval the next change is logged, with the count of those that were not.
    let later = t0 + Duration::from_secs(2);
    e.handle_frame(later, 0, &config_rsp(TMAC2, DEV, 16, 2, 0));
    let tx = drain(&mut e, later);
    let req = &tx.last().expect("an IDENTIFY").1;
    e.handle_frame(later, 0, &identify_rsp_from(req, TMAC2, 2000));
    let l = log_lines(&mut e, |l| l.contains("size changed"));
    assert!(
        l.len() == 1 && l[0].contains("999 more changes since the last report"),
        "{l:?}"
    );
}

/// Sixth audit (session 23): an IDENTIFY page claiming more sectors than its commands can
/// address. Without the LBA48 bit the capacity is words 60-61, 32 bits, while an LBA28
/// command carries 28: a target claiming 0xffff_ffff sectors had a write at sector
/// 2^28 + 5 sent as a write to sector 5 (the LBA cut to 28 bits, as `put_lba` cuts it),
/// overwriting the start of the disk. With LBA48 the capacity is 64 bits and the command
/// carries 48. Each capacity is capped at what its commands reach (ATA: words 60-61 hold
/// at most 0x0fff_ffff, words 100-103 the 48-bit maximum), so such I/O is refused as past
/// the end, and a byte size (sectors * 512) cannot overflow. On the code before: "a write
/// past sector 2^28 went out as a write to sector 5".
#[test]
fn identify_capacity_beyond_the_commands_reach_is_capped() {
    let mut page = identify_page_lba28(1000);
    set_word(&mut page, 60, 0xffff);
    set_word(&mut page, 61, 0xffff);
    let (mut e, t0) = up_engine_with_page(Config::default(), &page);
    assert_eq!(
        e.device(DEV).unwrap().sectors,
        0x0fff_ffff,
        "LBA28 capacity"
    );
    let w = e.submit(
        t0,
        DEV,
        BlockOp::Write {
            lba: (1 << 28) + 5,
            data: vec![7u8; 512],
        },
    );
    let sent: Vec<u32> = drain(&mut e, t0)
        .iter()
        .filter(|(_, f)| f[27] == 0x30)
        .map(|(_, f)| u32::from_le_bytes(f[28..32].try_into().unwrap()) & 0x0fff_ffff)
        .collect();
    assert!(
        w.is_err() && sent.is_empty(),
        "a write past sector 2^28 went out as a write to sector {sent:?} ({w:?})"
    );

    // LBA48: words 100-103 claim 2^64 - 1 sectors.
    let mut page = identify_page(1000);
    for w in 100..104 {
        set_word(&mut page, w, 0xffff);
    }
    let (mut e, t0) = up_engine_with_page(Config::default(), &page);
    assert_eq!(e.device(DEV).unwrap().sectors, 1 << 48, "LBA48 capacity");
    assert!(e
        .submit(
            t0,
            DEV,
            BlockOp::Read {
                lba: 1 << 48,
                sectors: 1
            }
        )
        .is_err());
}

/// An engine with DEV up (1000 sectors) and open, after TMAC2 answered Query Config for
/// it: the IDENTIFY requests that answer sent, with the MAC each goes to.
fn open_device_and_new_mac() -> (Engine, Instant, Vec<(MacAddr, Vec<u8>)>) {
    let (mut e, t0) = up_engine(1000, true);
    e.set_open(DEV, true);
    events(&mut e);
    e.handle_frame(t0, 0, &config_rsp(TMAC2, DEV, 16, 2, 0));
    let asks = identifies(&drain(&mut e, t0));
    (e, t0, asks)
}

/// The IDENTIFY requests among `tx`, with the MAC each goes to.
fn identifies(tx: &[(usize, Vec<u8>)]) -> Vec<(MacAddr, Vec<u8>)> {
    tx.iter()
        .filter_map(|(_, f)| {
            let m = Message::parse(f).unwrap();
            matches!(m.body, Body::Ata(a) if a.cmd_status == 0xec)
                .then(|| (MacAddr(f[0..6].try_into().unwrap()), f.clone()))
        })
        .collect()
}

/// Eighth audit (session 25): a second target at the device's shelf.slot (vblade started
/// by mistake with another file) answers Query Config from its own MAC. The driver, and
/// this engine before, took it as a second path and spread the device's frames over both
/// disks. Now the new MAC is asked IDENTIFY first; another capacity refuses it with one
/// line and a count, and no frame of the device goes to it. On the code before: "a read
/// went to the other disk's MAC".
#[test]
fn a_new_mac_with_another_capacity_is_not_taken_as_a_path() {
    let (mut e, t0, asks) = open_device_and_new_mac();
    let (_, req) = asks
        .iter()
        .find(|(m, _)| *m == TMAC2)
        .expect("an IDENTIFY to the new MAC");
    // Until it answers, the device's frames go to the MAC it was identified through.
    for lba in 0..4 {
        e.submit(t0, DEV, BlockOp::Read { lba, sectors: 2 })
            .unwrap();
    }
    for (_, f) in drain(&mut e, t0) {
        assert_eq!(&f[0..6], &TMAC.0, "a read went to the MAC being checked");
    }
    e.handle_frame(t0, 0, &identify_rsp_from(req, TMAC2, 2000));
    let lines = log_lines(&mut e, |l| l.contains(&TMAC2.to_string()));
    assert!(
        lines.len() == 1 && lines[0].contains("not taken as a path") && lines[0].contains("2000"),
        "{lines:?}"
    );
    assert_eq!(e.stats().targets_other_disk, 1);
    let d = e.device(DEV).unwrap();
    assert_eq!(d.sectors, 1000, "the device keeps its own capacity");
    let t2 = d.targets.iter().find(|t| t.mac == TMAC2).unwrap();
    assert_eq!(t2.vetting, Vetting::OtherDisk(Some(2000)));
    // Reads from now on go to TMAC alone.
    for lba in 10..30 {
        e.submit(t0, DEV, BlockOp::Read { lba, sectors: 2 })
            .unwrap();
    }
    let tx = drain(&mut e, t0);
    assert!(!tx.is_empty());
    for (_, f) in tx {
        assert_eq!(&f[0..6], &TMAC.0, "a read went to the other disk's MAC");
    }
    // Its next Query Config response asks again, and a refusal within the log interval
    // is counted without another line.
    let now = t0 + ms(10);
    e.handle_frame(now, 0, &config_rsp(TMAC2, DEV, 16, 2, 0));
    let asks = identifies(&drain(&mut e, now));
    let (_, req) = asks.iter().find(|(m, _)| *m == TMAC2).expect("asked again");
    e.handle_frame(now, 0, &identify_rsp_from(req, TMAC2, 2000));
    assert!(log_lines(&mut e, |l| l.contains("not taken")).is_empty());
    assert_eq!(e.stats().targets_other_disk, 2);
}

/// The other side: a second MAC of the same disk (a second NIC of the target, or a second
/// `aoe serve` gateway of one `rbd:` image) reports the device's capacity and becomes a
/// path; frames then go to both.
#[test]
fn a_new_mac_with_the_same_capacity_becomes_a_path() {
    let (mut e, t0, asks) = open_device_and_new_mac();
    assert_eq!(
        asks.len(),
        1,
        "an open device is not re-identified; the new MAC is asked"
    );
    assert_eq!(asks[0].0, TMAC2);
    assert_eq!(e.device(DEV).unwrap().targets[1].vetting, Vetting::Checking);
    e.handle_frame(t0, 0, &identify_rsp_from(&asks[0].1, TMAC2, 1000));
    assert!(!log_lines(&mut e, |l| l.contains("taken as a path")).is_empty());
    assert_eq!(e.device(DEV).unwrap().targets[1].vetting, Vetting::Path);
    for lba in 0..8 {
        e.submit(t0, DEV, BlockOp::Read { lba, sectors: 2 })
            .unwrap();
    }
    let tx = drain(&mut e, t0);
    assert!(tx.iter().any(|(_, f)| f[0..6] == TMAC.0));
    assert!(
        tx.iter().any(|(_, f)| f[0..6] == TMAC2.0),
        "no frame to the second path"
    );
    assert_eq!(e.stats().targets_other_disk, 0);
}

/// A new MAC that never answers its IDENTIFY is asked [`VET_TRIES`] times, one timeout
/// apart, then left until its next Query Config response; it never gets the device's
/// frames, and the device stays up.
#[test]
fn a_new_mac_that_never_answers_is_asked_a_few_times_and_never_used() {
    let (mut e, t0, asks) = open_device_and_new_mac();
    let mut asked = asks.len();
    let mut now = t0;
    for _ in 0..200 {
        let Some(at) = e.poll_timeout() else { break };
        now = at.max(now + ms(1));
        if now > t0 + Duration::from_secs(30) {
            break;
        }
        e.handle_timeout(now);
        asked += identifies(&drain(&mut e, now))
            .iter()
            .filter(|(m, _)| *m == TMAC2)
            .count();
    }
    assert_eq!(asked, usize::from(VET_TRIES));
    let d = e.device(DEV).unwrap();
    assert_eq!(d.state, DeviceState::Up);
    assert_eq!(d.targets[1].vetting, Vetting::Checking);
    e.submit(now, DEV, BlockOp::Read { lba: 0, sectors: 2 })
        .unwrap();
    for (_, f) in drain(&mut e, now) {
        assert_eq!(&f[0..6], &TMAC.0);
    }
    // The next Query Config response asks again.
    e.handle_frame(now, 0, &config_rsp(TMAC2, DEV, 16, 2, 0));
    assert_eq!(identifies(&drain(&mut e, now)).len(), 1);
}

/// At discovery the device is identified through the first MAC that answers; a second
/// MAC answering meanwhile is asked once the device is up, and one of another disk is
/// refused then.
#[test]
fn a_second_mac_during_the_first_identify_is_checked_once_up() {
    let t0 = Instant::now();
    let mut e = Engine::new(Config::default(), t0);
    e.add_interface(0, "eth0", HOST, 1500);
    drain(&mut e, t0);
    e.handle_frame(t0, 0, &config_rsp(TMAC, DEV, 16, 2, 0));
    e.handle_frame(t0, 0, &config_rsp(TMAC2, DEV, 16, 2, 0));
    let asks = identifies(&drain(&mut e, t0));
    assert_eq!(asks.len(), 1);
    assert_eq!(asks[0].0, TMAC, "identified through the first MAC");
    e.handle_frame(t0, 0, &identify_rsp(&asks[0].1, 1000));
    let asks = identifies(&drain(&mut e, t0));
    assert_eq!(asks.len(), 1);
    assert_eq!(asks[0].0, TMAC2, "the second MAC asked once up");
    e.handle_frame(t0, 0, &identify_rsp_from(&asks[0].1, TMAC2, 4000));
    assert_eq!(e.stats().targets_other_disk, 1);
    assert_eq!(e.device(DEV).unwrap().sectors, 1000);
}

// ------------------------------------------------------------------------------------------
// Ninth audit: a MAC that is not a path weighs on nothing

/// An engine at MTU 9000 with DEV up (1000 sectors, unopened) through TMAC, which says 17
/// sectors per frame: the device's frames carry 8704 bytes.
fn up_engine_9000() -> (Engine, Instant) {
    let t0 = Instant::now();
    let mut e = Engine::new(Config::default(), t0);
    e.add_interface(0, "eth0", HOST, 9000);
    drain(&mut e, t0);
    e.handle_frame(t0, 0, &config_rsp_with(TMAC, DEV, 16, 17, 0, b"ours"));
    let tx = identifies(&drain(&mut e, t0));
    assert_eq!(tx.len(), 1);
    e.handle_frame(t0, 0, &identify_rsp(&tx[0].1, 1000));
    assert!(events(&mut e).contains(&Event::DeviceUp(DEV)));
    assert_eq!(e.device(DEV).unwrap().payload, 17 * 512);
    (e, t0)
}

/// Ninth audit (session 26): a MAC being asked IDENTIFY, or refused as another disk, never
/// gets the device's frames, yet its Query Config answers set the device's frame size as a
/// path's do (the driver's `setdbcnt`, a minimum over every target): a hostile peer saying
/// 1 sector, or a second target on a 1500-byte port of a 9000 segment, cut the frames from
/// 8704 bytes to 512 or 1024, for as long as it kept answering; it also rewrote the
/// device's config string. Now only paths count; a second MAC of the same disk, once taken
/// as a path, counts as before (its smaller frames then apply to every path). On the code
/// before: "the frame size moved to 512 on a MAC being asked".
#[test]
fn a_mac_that_is_not_a_path_does_not_move_the_frame_size_or_config() {
    let (mut e, t0) = up_engine_9000();
    e.handle_frame(t0, 0, &config_rsp_with(TMAC2, DEV, 1, 1, 0, b"theirs"));
    let d = e.device(DEV).unwrap();
    assert_eq!(
        d.payload,
        17 * 512,
        "the frame size moved to {} on a MAC being asked",
        d.payload
    );
    assert_eq!(
        d.config, b"ours",
        "the config string is a MAC's being asked"
    );
    let asks = identifies(&drain(&mut e, t0));
    let (_, req) = asks.iter().find(|(m, _)| *m == TMAC2).expect("TMAC2 asked");
    e.handle_frame(t0, 0, &identify_rsp_from(req, TMAC2, 2000));
    assert_eq!(e.stats().targets_other_disk, 1);
    // Refused, and answering again and again (each answer asks it again).
    for i in 1..50u64 {
        let now = t0 + ms(i);
        e.handle_frame(now, 0, &config_rsp_with(TMAC2, DEV, 1, 1, 0, b"theirs"));
        let d = e.device(DEV).unwrap();
        assert_eq!(
            d.payload,
            17 * 512,
            "the frame size moved on another disk's MAC"
        );
        assert_eq!(d.config, b"ours");
        drain(&mut e, now);
    }
    // Reads go out in 17-sector frames, to TMAC.
    e.submit(
        t0,
        DEV,
        BlockOp::Read {
            lba: 0,
            sectors: 34,
        },
    )
    .unwrap();
    let tx = drain(&mut e, t0 + ms(50));
    let reads: Vec<_> = tx.iter().filter(|(_, f)| f[27] == 0x24).collect();
    assert_eq!(reads.len(), 2, "two 17-sector frames for 34 sectors");
    assert!(reads.iter().all(|(_, f)| f[0..6] == TMAC.0));

    // A second MAC of the same disk saying 2 sectors: its sector count counts once it is
    // a path, and the device's frames shrink for both.
    const TMAC3: MacAddr = MacAddr([0x02, 0xbb, 0, 0, 0, 3]);
    let now = t0 + ms(60);
    e.handle_frame(now, 0, &config_rsp(TMAC3, DEV, 16, 2, 0));
    assert_eq!(e.device(DEV).unwrap().payload, 17 * 512);
    let asks = identifies(&drain(&mut e, now));
    let (_, req) = asks.iter().find(|(m, _)| *m == TMAC3).expect("TMAC3 asked");
    e.handle_frame(now, 0, &identify_rsp_from(req, TMAC3, 1000));
    assert_eq!(
        e.device(DEV).unwrap().payload,
        2 * 512,
        "a new path's smaller frames not taken"
    );
}

/// Ninth audit (session 26): at `max_targets`, MACs that are not paths kept their places
/// for ever, so a few boxes of another disk at the device's shelf.slot (or MACs a peer made
/// up, answering IDENTIFY with another size or not at all) kept a legitimate second path,
/// or a replacement target with a new MAC, out. Now a MAC refused as another disk, or
/// silent to every IDENTIFY, gives way to a new MAC; paths and a MAC whose IDENTIFY is
/// out do not. On the code before: "the second path of the same disk was refused".
#[test]
fn macs_that_are_not_paths_give_way_to_a_new_one_at_the_target_cap() {
    let cfg = Config {
        max_targets: 3,
        ..Config::default()
    };
    let (mut e, t0) = up_engine_with(cfg, 1000, true);
    const OTHER: MacAddr = MacAddr([0x02, 0xcc, 0, 0, 0, 1]);
    const SILENT: MacAddr = MacAddr([0x02, 0xcc, 0, 0, 0, 2]);
    const SAME: MacAddr = MacAddr([0x02, 0xbb, 0, 0, 0, 3]);
    const LATE: MacAddr = MacAddr([0x02, 0xcc, 0, 0, 0, 4]);
    // OTHER: another disk, refused.
    e.handle_frame(t0, 0, &config_rsp(OTHER, DEV, 16, 2, 0));
    let asks = identifies(&drain(&mut e, t0));
    let (_, req) = asks.iter().find(|(m, _)| *m == OTHER).unwrap();
    e.handle_frame(t0, 0, &identify_rsp_from(req, OTHER, 2000));
    assert_eq!(e.stats().targets_other_disk, 1);
    // SILENT: its IDENTIFY out, not answered yet.
    e.handle_frame(t0, 0, &config_rsp(SILENT, DEV, 16, 2, 0));
    drain(&mut e, t0);
    assert_eq!(e.device(DEV).unwrap().targets.len(), 3);
    // SAME (a second MAC of the disk): OTHER gives way.
    e.handle_frame(t0, 0, &config_rsp(SAME, DEV, 16, 2, 0));
    let asks = identifies(&drain(&mut e, t0));
    let same = asks.iter().find(|(m, _)| *m == SAME);
    assert!(
        same.is_some(),
        "the second path of the same disk was refused: {:?}; {:?}",
        e.stats(),
        log_lines(&mut e, |l| l.contains("refused"))
    );
    e.handle_frame(t0, 0, &identify_rsp_from(&same.unwrap().1, SAME, 1000));
    let d = e.device(DEV).unwrap();
    let macs: Vec<MacAddr> = d.targets.iter().map(|t| t.mac).collect();
    assert_eq!(macs, [TMAC, SILENT, SAME]);
    assert_eq!(d.targets[2].vetting, Vetting::Path);
    assert_eq!(e.stats().targets_forgotten, 1);
    let lines = log_lines(&mut e, |l| l.contains("forgotten"));
    assert!(
        lines.len() == 1 && lines[0].contains(&OTHER.to_string()),
        "{lines:?}"
    );
    // LATE now finds paths and a MAC being asked: refused, nothing sent to it.
    e.handle_frame(t0, 0, &config_rsp(LATE, DEV, 16, 2, 0));
    assert!(identifies(&drain(&mut e, t0)).is_empty());
    assert_eq!(e.stats().targets_refused, 1);
    // SILENT never answers: once its IDENTIFYs are given up, it gives way to LATE.
    let mut now = t0;
    while e.device(DEV).unwrap().targets[1].vetting == Vetting::Checking
        && now < t0 + Duration::from_secs(60)
    {
        let Some(at) = e.poll_timeout() else { break };
        now = at.max(now + ms(1));
        e.handle_timeout(now);
        drain(&mut e, now);
        if e.stats().targets_refused == 1 {
            // Still asking: LATE still refused.
            e.handle_frame(now, 0, &config_rsp(LATE, DEV, 16, 2, 0));
            drain(&mut e, now);
            if e.device(DEV).unwrap().targets.iter().any(|t| t.mac == LATE) {
                break;
            }
        }
    }
    e.handle_frame(now, 0, &config_rsp(LATE, DEV, 16, 2, 0));
    let d = e.device(DEV).unwrap();
    let macs: Vec<MacAddr> = d.targets.iter().map(|t| t.mac).collect();
    assert_eq!(macs, [TMAC, SAME, LATE], "the silent MAC did not give way");
    assert_eq!(e.stats().targets_forgotten, 2);
    // Frames keep going to the two paths only.
    for lba in 0..16 {
        e.submit(
            now,
            DEV,
            BlockOp::Read {
                lba: lba * 2,
                sectors: 2,
            },
        )
        .unwrap();
    }
    let tx = drain(&mut e, now);
    assert!(tx
        .iter()
        .filter(|(_, f)| f[27] == 0x24)
        .all(|(_, f)| f[0..6] == TMAC.0 || f[0..6] == SAME.0));
}

/// Takes DEV down the way a dead target does: a read whose frames nobody answers, the
/// timer run until `deadsecs` has passed. Returns the time it went down.
fn down_by_deadsecs(e: &mut Engine, t0: Instant) -> Instant {
    e.submit(t0, DEV, BlockOp::Read { lba: 0, sectors: 2 })
        .unwrap();
    drain(e, t0);
    let mut now = t0;
    while e.device(DEV).unwrap().state != DeviceState::Down {
        let at = e.poll_timeout().expect("a timer while the read waits");
        now = at.max(now + ms(1));
        assert!(
            now < t0 + Duration::from_secs(60),
            "the device never went down"
        );
        e.handle_timeout(now);
        drain(e, now);
    }
    events(e);
    now
}

/// Tenth audit (the ninth's Left list): a device down and not open was identified through
/// whichever MAC answered the next Query Config first, even one refused before as another
/// disk (vblade over another file at the same shelf.slot): the device became that disk,
/// and its real target was refused at its own answer a moment later. Now, as the driver
/// sends IDENTIFY to the device's current target (`aoecmd_ata_id`), a refused MAC's answer
/// identifies the device through the path it had; only if that path stays silent for
/// `deadsecs` does the other MAC's next answer identify it. On the code before: "the
/// IDENTIFY went to the MAC refused as another disk".
#[test]
fn a_down_device_is_identified_through_its_path_not_a_mac_refused_before() {
    const OTHER: MacAddr = MacAddr([0x02, 0xcc, 0, 0, 0, 1]);
    let cfg = Config {
        deadsecs: Duration::from_secs(3),
        ..Config::default()
    };
    let (mut e, t0) = up_engine_with(cfg, 1000, true);
    e.handle_frame(t0, 0, &config_rsp(OTHER, DEV, 16, 2, 0));
    let asks = identifies(&drain(&mut e, t0));
    let (_, req) = asks.iter().find(|(m, _)| *m == OTHER).unwrap();
    e.handle_frame(t0, 0, &identify_rsp_from(req, OTHER, 2000));
    assert_eq!(e.stats().targets_other_disk, 1);
    let down = down_by_deadsecs(&mut e, t0);

    // The next discover: the other disk answers first, then the device's target.
    e.handle_frame(down, 0, &config_rsp(OTHER, DEV, 16, 2, 0));
    e.handle_frame(down, 0, &config_rsp(TMAC, DEV, 16, 2, 0));
    let asks = identifies(&drain(&mut e, down));
    assert!(
        asks.iter().all(|(m, _)| *m == TMAC) && !asks.is_empty(),
        "the IDENTIFY went to the MAC refused as another disk: {:?}",
        asks.iter().map(|(m, _)| m.to_string()).collect::<Vec<_>>()
    );
    e.handle_frame(down, 0, &identify_rsp_from(&asks[0].1, TMAC, 1000));
    assert!(events(&mut e).contains(&Event::DeviceUp(DEV)));
    let d = e.device(DEV).unwrap();
    assert_eq!(d.sectors, 1000, "the device is its own disk again");
    // The other MAC is vetted again, and refused again.
    let asks = identifies(&drain(&mut e, down));
    let (_, req) = asks.iter().find(|(m, _)| *m == OTHER).expect("OTHER asked");
    e.handle_frame(down, 0, &identify_rsp_from(req, OTHER, 2000));
    assert_eq!(e.stats().targets_other_disk, 2);
    let d = e.device(DEV).unwrap();
    let paths: Vec<MacAddr> = d
        .targets
        .iter()
        .filter(|t| t.vetting == Vetting::Path)
        .map(|t| t.mac)
        .collect();
    assert_eq!(paths, [TMAC]);

    // Down again, and this time the device's target stays silent: its IDENTIFY fails
    // after deadsecs, and the other MAC's next answer identifies the device.
    let down = down_by_deadsecs(&mut e, down);
    e.handle_frame(down, 0, &config_rsp(OTHER, DEV, 16, 2, 0));
    let asks = identifies(&drain(&mut e, down));
    assert!(asks.iter().all(|(m, _)| *m == TMAC) && !asks.is_empty());
    let mut now = down;
    let mut given_up = false;
    while !given_up {
        let at = e.poll_timeout().expect("a timer while IDENTIFY waits");
        now = at.max(now + ms(1));
        assert!(
            now < down + Duration::from_secs(60),
            "IDENTIFY never given up"
        );
        e.handle_timeout(now);
        drain(&mut e, now);
        given_up = !log_lines(&mut e, |l| l.contains("IDENTIFY unanswered")).is_empty();
    }
    e.handle_frame(now, 0, &config_rsp(OTHER, DEV, 16, 2, 0));
    let asks = identifies(&drain(&mut e, now));
    let (_, req) = asks
        .iter()
        .find(|(m, _)| *m == OTHER)
        .expect("the other MAC identifies the device once its path stayed silent");
    e.handle_frame(now, 0, &identify_rsp_from(req, OTHER, 2000));
    assert!(events(&mut e).contains(&Event::DeviceUp(DEV)));
    assert_eq!(e.device(DEV).unwrap().sectors, 2000);
}

/// Session 36 (limits): an initiator stopped or starved for longer than `deadsecs` (SIGSTOP,
/// a cgroup freezer, `cpu.max`) while a frame is out must not, on waking, take the device
/// down before it has sent one copy: its timer ran late, the target was not silent for
/// `deadsecs` of time the initiator could observe. It goes down `deadsecs` after the stall
/// if the target stays silent. On the code before: down at the first timer run after the
/// stall, no copy sent ("down at once after a stall of the initiator").
#[test]
fn a_stall_of_the_initiator_does_not_count_toward_deadsecs() {
    let cfg = Config {
        deadsecs: Duration::from_secs(3),
        ..Config::default()
    };
    let (mut e, t0) = up_engine_with(cfg, 1000, true);
    e.submit(t0, DEV, BlockOp::Read { lba: 0, sectors: 2 })
        .unwrap();
    assert!(!drain(&mut e, t0).is_empty(), "the read went out");
    // The daemon is stopped from t0 to 8 s later: no timer runs meanwhile.
    let woke = t0 + Duration::from_secs(8);
    e.handle_timeout(woke);
    assert_ne!(
        e.device(DEV).unwrap().state,
        DeviceState::Down,
        "down at once after a stall of the initiator"
    );
    assert!(
        !drain(&mut e, woke).is_empty(),
        "no copy sent after the stall"
    );
    // The target stays silent: down about `deadsecs` after the stall, not before.
    let mut now = woke;
    while e.device(DEV).unwrap().state != DeviceState::Down {
        let at = e.poll_timeout().expect("a timer while the read waits");
        now = at.max(now + ms(1));
        assert!(now < woke + Duration::from_secs(30), "never went down");
        e.handle_timeout(now);
        drain(&mut e, now);
    }
    assert!(
        now >= woke + Duration::from_secs(2),
        "down {:?} after the stall",
        now - woke
    );
}

/// Session 36 (s36/linkback): a write cut by the link going down while the answers to its
/// later frames are on the wire, so that its earlier frames are presumed lost from them
/// (fast retransmission, `CopyWhy::LaterAnswered`), and the window is full of copies that
/// went into the dead link, when the link comes back. On real daemons
/// (`initiator_integrity.rs` `writes_go_on_across_the_initiators_link_set_down_and_up`,
/// s36/leftovers) the first resend after the link event came 0.75 s late. The rig: a window
/// of writes on a hand-driven link, the answers to its later half delivered and those to
/// its earlier half lost as the link goes down, then `dark` and the link event. Returns the
/// time from the event to the first copy sent, after checking that some frame was presumed
/// lost from later answers, that the write completes and that the disk holds it.
fn link_back_with_fast_retransmit_copies(seed: u64, dark: Duration) -> Duration {
    use crate::sim::Toward;
    let cfg = Config {
        deadsecs: Duration::from_secs(60),
        ..Config::default()
    };
    let mut sim = Sim::new(seed, LinkCfg::perfect(), cfg, &[1500]);
    let a = sim.add_target(spec(DEV, 4096, 8, vec![(TMAC, 1500, 0)]));
    let disk: Disk = sim.targets[a].disk.clone();
    bring_up(&mut sim, DEV);
    let mut w = Workload::new(DEV, 4096, 16, 16);
    w.run(&mut sim, 200, Duration::from_secs(60));
    sim.run_for(ms(10));
    sim.hold = true;
    let data: Vec<u8> = (0..64 * 512).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    let id = sim
        .submit(
            DEV,
            BlockOp::Write {
                lba: 0,
                data: data.clone(),
            },
        )
        .unwrap();
    while sim.on_wire(Toward::Target) > 0 {
        sim.deliver(Toward::Target, 0);
    }
    sim.run_for(ms(2));
    // The send order of the frame the i-th answer on the wire answers.
    let seq_of = |sim: &mut Sim, i: usize| {
        let tag = Message::parse(sim.frame_mut(Toward::Initiator, i).unwrap())
            .unwrap()
            .header
            .tag
            .0;
        sim.init.outstanding.get(tag).map_or(0, |f| f.seq)
    };
    let n = sim.on_wire(Toward::Initiator);
    assert!(n >= 4, "only {n} frames out");
    let mut seqs: Vec<u64> = (0..n).map(|i| seq_of(&mut sim, i)).collect();
    seqs.sort_unstable();
    let split = seqs[n / 2];
    sim.seg_up[0] = false;
    // The later half arrives, the earlier half is lost with the link.
    while sim.on_wire(Toward::Initiator) > 0 {
        if seq_of(&mut sim, 0) >= split {
            sim.deliver(Toward::Initiator, 0);
        } else {
            sim.lose(Toward::Initiator, 0);
        }
    }
    sim.hold = false;
    sim.run_for(dark);
    assert!(
        sim.logs().any(|l| l.contains("(later frames answered)")),
        "seed {seed}: no frame was presumed lost from later answers: the rig tests nothing"
    );
    assert!(sim.completions.is_empty(), "answered over a dead link");
    sim.seg_up[0] = true;
    let back = sim.now;
    let before = sim.events.len();
    sim.init.interface_up(back, 0);
    sim.flush();
    assert!(
        sim.run_until(Duration::from_secs(30), |s| s.completions.contains_key(&id)),
        "seed {seed}: the write did not complete within 30 s of the link back"
    );
    assert!(sim.completions[&id].1.is_ok(), "{:?}", sim.completions[&id]);
    let first = sim.events[before..]
        .iter()
        .find(|(_, e)| matches!(e, Event::Log(l) if l.starts_with("retransmit")))
        .map(|(at, _)| *at - back)
        .expect("nothing resent after the link event");
    sim.run_for(Duration::from_secs(2));
    assert_eq!(sim.device(DEV).state, DeviceState::Up);
    assert!(
        disk.borrow()[..data.len()] == data[..],
        "seed {seed}: the disk does not hold the write"
    );
    first
}

/// Every copy waiting when the link comes back goes out at the event, whatever it waits
/// for (`Engine::link_back`), the copies that went into the dead link giving their window
/// slots up at once. Before, with a cut shorter than `SILENT_HOLD`, the first copy went out
/// only when time freed those slots (the copies' `SILENT_HOLD`).
#[test]
fn sim_copies_waiting_at_the_link_event_go_at_once() {
    for seed in [1, 2, 3, 4] {
        for dark in [ms(300), ms(700)] {
            let first = link_back_with_fast_retransmit_copies(seed, dark);
            assert!(
                first < ms(5),
                "seed {seed}, {dark:?} dark: the first copy went out {first:?} after the link event"
            );
        }
    }
}
