//! The engines' hot paths, without I/O: the target engine turning a read request into disk
//! work and its completion into a reply, and the initiator engine issuing a read and
//! completing it from the reply. Run with `cargo bench -p aoe-proto`; numbers are per request.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aoe_proto::initiator::{self, BlockOp, Event};
use aoe_proto::target::{self, ExportConfig, Interface, Outcome, PersistentState};
use aoe_wire::{
    AtaFlags, AtaRepr, Body, Command, ConfigCommand, ConfigRepr, HeaderRepr, Identify, MacAddr,
    Message, Tag, TargetAddr,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const HOST: MacAddr = MacAddr([0x02, 0xaa, 0, 0, 0, 1]);
const TMAC: MacAddr = MacAddr([0x02, 0xbb, 0, 0, 0, 1]);
const ADDR: TargetAddr = TargetAddr { shelf: 1, slot: 1 };
/// 17 sectors: what one MTU 9000 frame carries.
const SECTORS: u8 = 17;
const MTU: u32 = 9000;
const DISK: u64 = 1 << 21;

fn read_request(lba: u64) -> Vec<u8> {
    Message {
        header: HeaderRepr::request(TMAC, HOST, ADDR, Command::Ata, Tag(0x8000_0001)),
        body: Body::Ata(AtaRepr {
            aflags: AtaFlags::EXTENDED,
            err_feature: 0,
            sector_count: SECTORS,
            // READ SECTORS EXT.
            cmd_status: 0x24,
            lba,
            data: &[],
        }),
    }
    .to_vec()
    .unwrap()
}

/// A WRITE SECTORS EXT of `SECTORS` sectors at `lba` under `tag`, its data `fill`.
fn write_request(lba: u64, tag: u32, fill: u8) -> Vec<u8> {
    let data = vec![fill; usize::from(SECTORS) * 512];
    Message {
        header: HeaderRepr::request(TMAC, HOST, ADDR, Command::Ata, Tag(tag)),
        body: Body::Ata(AtaRepr {
            aflags: AtaFlags::EXTENDED | AtaFlags::WRITE,
            err_feature: 0,
            sector_count: SECTORS,
            // WRITE SECTORS EXT.
            cmd_status: 0x34,
            lba,
            data: &data,
        }),
    }
    .to_vec()
    .unwrap()
}

fn target_engine() -> target::Engine {
    let mut e = target::Engine::new(
        ExportConfig {
            addr: ADDR,
            sectors: DISK,
            read_only: false,
            buffer_count: 64,
            firmware_version: target::FIRMWARE_VERSION,
            max_sectors: 255,
            model: "bench".into(),
            serial: "bench-1".into(),
            firmware: "1".into(),
        },
        PersistentState::default(),
    );
    e.set_interface(
        0,
        Interface {
            mac: TMAC,
            mtu: MTU,
        },
    );
    e
}

fn target(c: &mut Criterion) {
    let mut g = c.benchmark_group("target engine");
    g.throughput(Throughput::Elements(1));
    g.bench_function("read request -> disk work -> reply header", |b| {
        let mut e = target_engine();
        let req = read_request(4096);
        let mut reply = vec![0u8; 9014];
        b.iter(|| {
            let Outcome::Io(io) = e.handle_frame(0, black_box(&req), &mut reply) else {
                panic!("a read must ask for disk work");
            };
            e.complete(io.token, Ok(()), &mut reply).unwrap()
        })
    });
    // What `aoe serve` asks of every frame before the engine sees it: is it an IDENTIFY
    // (the store's size is then read again)? A read request, the common answer no.
    g.bench_function("read request: the daemon's IDENTIFY check", |b| {
        let req = read_request(4096);
        b.iter(|| target::is_identify_request(black_box(&req)))
    });
    // The duplicate-write table on (the default): the table's lookup per write (no digest
    // of the data since session 20), a new tag each time as an initiator sends them, with
    // the cache hint `aoe serve` gives the engine for each frame of a batch first.
    g.bench_function(
        "write request (8.5 KiB, dedup) -> disk work -> reply header",
        |b| {
            let mut e = target_engine();
            let mut reqs: Vec<Vec<u8>> = (0..64u32)
                .map(|k| write_request(u64::from(k) * 17, 0x1000_0000 + k, k as u8))
                .collect();
            let mut reply = vec![0u8; 9014];
            let mut tag = 0x1000_0000u32;
            let mut k = 0;
            let now = Instant::now();
            b.iter(|| {
                e.set_now(now);
                let req = &mut reqs[k % 64];
                k += 1;
                tag = tag.wrapping_add(1);
                // The tag: bytes 6..10 of the AoE header, after the 14-byte Ethernet one.
                req[20..24].copy_from_slice(&tag.to_be_bytes());
                if let Some(line) = e.dedup_line(black_box(req)) {
                    aoe_sys::prefetch(line);
                }
                let Outcome::Io(io) = e.handle_frame(0, black_box(req), &mut reply) else {
                    panic!("a write must ask for disk work");
                };
                e.complete(io.token, Ok(()), &mut reply).unwrap()
            })
        },
    );
    // The duplicate-write table's rare path at its worst: a copy of an answered write behind
    // 1024 later writes (MAX_SCAN), the last of them overlapping it, so each copy walks them
    // all and is dropped (the table unchanged: every iteration walks as far).
    g.bench_function("write copy -> walk of 1024 later writes -> dropped", |b| {
        let mut e = target_engine();
        let now = Instant::now();
        e.set_now(now);
        let mut reply = vec![0u8; 9014];
        let mut run = |e: &mut target::Engine, req: &[u8]| {
            let Outcome::Io(io) = e.handle_frame(0, req, &mut reply) else {
                panic!("a write must ask for disk work");
            };
            e.complete(io.token, Ok(()), &mut reply).unwrap();
        };
        let copy = write_request(0, 0x2000_0000, 1);
        run(&mut e, &copy);
        for k in 1..1024u32 {
            run(
                &mut e,
                &write_request(u64::from(k) * 17, 0x2000_0000 + k, 2),
            );
        }
        run(&mut e, &write_request(0, 0x2000_0400, 3));
        b.iter(|| {
            let out = e.handle_frame(0, black_box(&copy), &mut reply);
            assert!(matches!(out, Outcome::Drop(_)), "{out:?}");
        })
    });
    g.bench_function("query config -> reply", |b| {
        let mut e = target_engine();
        let q = Message {
            header: HeaderRepr::request(
                MacAddr::BROADCAST,
                HOST,
                TargetAddr::BROADCAST,
                Command::QueryConfig,
                Tag(0x8000_0002),
            ),
            body: Body::Config(ConfigRepr::request(ConfigCommand::Read, b"")),
        }
        .to_vec()
        .unwrap();
        let mut reply = vec![0u8; 9014];
        b.iter(|| e.handle_frame(0, black_box(&q), &mut reply))
    });
    g.finish();
}

/// The answer to ATA request `req` with `data`, as the target sends it.
fn ata_reply(req: &[u8], data: &[u8]) -> Vec<u8> {
    let m = Message::parse(req).unwrap();
    let Body::Ata(a) = m.body else {
        panic!("not ATA")
    };
    Message {
        header: m.header.response_to(TMAC),
        body: Body::Ata(AtaRepr {
            // DRDY.
            cmd_status: 0x40,
            data,
            ..a
        }),
    }
    .to_vec()
    .unwrap()
}

/// An initiator engine with e1.1 up on one MTU 9000 interface (64 buffers, 17 sectors).
fn initiator_engine(now: Instant) -> initiator::Engine {
    initiator_engine_mtu(now, MTU)
}

/// [`initiator_engine`] on an interface of `mtu` (at 1500: 2 sectors a frame).
fn initiator_engine_mtu(now: Instant, mtu: u32) -> initiator::Engine {
    let mut e = initiator::Engine::new(initiator::Config::default(), now);
    e.add_interface(0, "eth0", HOST, mtu);
    let mut buf = vec![0u8; 9014];
    while e.poll_transmit(now, &mut buf).is_some() {}
    let mut h = HeaderRepr::request(HOST, TMAC, ADDR, Command::QueryConfig, Tag(0));
    h.response = true;
    let cfg = Message {
        header: h,
        body: Body::Config(ConfigRepr {
            buffer_count: 64,
            firmware_version: 1,
            sector_count: SECTORS,
            aoe_version: 1,
            ccmd: ConfigCommand::Read,
            config: b"",
        }),
    }
    .to_vec()
    .unwrap();
    e.handle_frame(now, 0, &cfg);
    let t = e
        .poll_transmit(now, &mut buf)
        .expect("IDENTIFY after config");
    let page = Identify {
        model: "bench".into(),
        serial: "bench-1".into(),
        firmware: "1".into(),
        sectors: DISK,
        write_cache: true,
        smart: false,
    }
    .build();
    e.handle_frame(now, 0, &ata_reply(&buf[..t.len], &page));
    assert!(std::iter::from_fn(|| e.poll_event()).any(|ev| ev == Event::DeviceUp(ADDR)));
    e
}

/// Submits a read of `sectors` and answers every frame the engine sends from `template`
/// (a reply with a full frame of data) with the request's tag, until it completes.
fn read_through(
    e: &mut initiator::Engine,
    now: Instant,
    buf: &mut [u8],
    rsp: &mut [u8],
    sectors: u32,
) {
    e.submit(now, ADDR, BlockOp::Read { lba: 0, sectors })
        .unwrap();
    loop {
        while e.poll_transmit(now, buf).is_some() {
            // Echo the tag (bytes 20..24); count and LBA of a full frame match the template.
            rsp[20..24].copy_from_slice(&buf[20..24]);
            let n = usize::from(buf[26]) * 512 + 36;
            e.handle_frame(now, 0, &rsp[..n.max(60)]);
        }
        while let Some(ev) = e.poll_event() {
            if let Event::Completed { result, .. } = ev {
                black_box(result.unwrap());
                return;
            }
        }
    }
}

/// Submits `op` and answers the frames the engine sends in the order sent, but only once
/// the window is full: every frame the engine lets out is queued, the oldest is answered,
/// [`initiator::Engine::poll_timeout`] is asked (as the daemon does after every batch) and
/// the frames that answer let out are queued behind the others, until the op completes.
/// With the target's 64 buffers about 64 frames are outstanding at each answer, as on a
/// busy link, where [`read_through`] has one at a time.
fn windowed(
    e: &mut initiator::Engine,
    now: Instant,
    buf: &mut [u8],
    rsp: &mut [u8],
    queue: &mut std::collections::VecDeque<([u8; 4], usize)>,
    op: BlockOp,
) {
    e.submit(now, ADDR, op).unwrap();
    loop {
        while e.poll_transmit(now, buf).is_some() {
            let tag = [buf[20], buf[21], buf[22], buf[23]];
            // A read's answer carries its sectors; a write's (ATA flag W, byte 24) none.
            let n = if buf[24] & 1 != 0 {
                36
            } else {
                usize::from(buf[26]) * 512 + 36
            };
            queue.push_back((tag, n.max(60)));
        }
        black_box(e.poll_timeout());
        while let Some(ev) = e.poll_event() {
            if let Event::Completed { result, .. } = ev {
                black_box(result.unwrap());
                return;
            }
        }
        let Some((tag, n)) = queue.pop_front() else {
            panic!("nothing outstanding and the op not done")
        };
        rsp[20..24].copy_from_slice(&tag);
        e.handle_frame(now, 0, &rsp[..n]);
    }
}

/// [`windowed`] for a [`BlockOp::ReadHeld`] answered through
/// [`initiator::Engine::handle_held_frame`], as the daemon's network thread hands in each
/// frame of its receive ring (one token a frame), and completed as the device file's
/// reply is built: [`initiator::HeldRead::pieces`] of the frames kept. `clock` moves on a
/// microsecond an answer, from one call to the next.
fn windowed_held(
    e: &mut initiator::Engine,
    clock: &mut Instant,
    buf: &mut [u8],
    rsp: &mut [u8],
    queue: &mut std::collections::VecDeque<([u8; 4], usize)>,
    token: &mut u64,
    sectors: u32,
) {
    let mut now = *clock;
    e.submit(now, ADDR, BlockOp::ReadHeld { lba: 0, sectors })
        .unwrap();
    loop {
        while e.poll_transmit(now, buf).is_some() {
            let tag = [buf[20], buf[21], buf[22], buf[23]];
            let n = usize::from(buf[26]) * 512 + 36;
            queue.push_back((tag, n.max(60)));
        }
        black_box(e.poll_timeout());
        while let Some(ev) = e.poll_event() {
            if let Event::CompletedHeld { result, .. } = ev {
                let h = result.unwrap();
                let frame: &[u8] = rsp;
                black_box(h.pieces(|_| Some(frame)).unwrap().len());
                *clock = now;
                return;
            }
        }
        let Some((tag, n)) = queue.pop_front() else {
            panic!("nothing outstanding and the op not done")
        };
        rsp[20..24].copy_from_slice(&tag);
        // A microsecond an answer, about the rate at MTU 1500: RTT samples, RTOs and
        // deadlines as on the wire (with a clock that stands still every deadline after
        // a smaller RTO lands before the last ones).
        now += Duration::from_micros(1);
        *token += 1;
        black_box(e.handle_held_frame(now, 0, &rsp[..n], *token));
    }
}

fn initiator(c: &mut Criterion) {
    let now = Instant::now();
    let data = vec![0x5a; usize::from(SECTORS) * 512];
    let mut g = c.benchmark_group("initiator engine");
    for (name, sectors) in [
        ("read 8704 B (one frame)", 17u32),
        ("read 1 MiB (121 frames)", 2048),
    ] {
        g.throughput(Throughput::Bytes(u64::from(sectors) * 512));
        g.bench_function(name, |b| {
            let mut e = initiator_engine(now);
            let mut buf = vec![0u8; 9014];
            let mut rsp = ata_reply(&read_request(0), &data);
            b.iter(|| read_through(&mut e, now, &mut buf, &mut rsp, sectors))
        });
    }
    // The window full: about 64 frames outstanding at each answer.
    let sectors = 2048u32;
    g.throughput(Throughput::Bytes(u64::from(sectors) * 512));
    g.bench_function("read 1 MiB, 64 frames out", |b| {
        let mut e = initiator_engine(now);
        let mut buf = vec![0u8; 9014];
        let mut rsp = ata_reply(&read_request(0), &data);
        let mut q = std::collections::VecDeque::new();
        b.iter(|| {
            let op = BlockOp::Read { lba: 0, sectors };
            windowed(&mut e, now, &mut buf, &mut rsp, &mut q, op)
        })
    });
    // The device file's read at MTU 1500: one 256 KiB FUSE request, 256 frames of 2
    // sectors, answers left in the receive ring (`BlockOp::ReadHeld`).
    let held = 512u32;
    g.throughput(Throughput::Bytes(u64::from(held) * 512));
    g.bench_function("held read 256 KiB at MTU 1500, 64 frames out", |b| {
        let mut e = initiator_engine_mtu(now, 1500);
        let mut buf = vec![0u8; 1514];
        let mut rsp = ata_reply(&read_request(0), &data[..1024]);
        let mut q = std::collections::VecDeque::new();
        let mut token = 0u64;
        let mut clock = now;
        b.iter(|| {
            windowed_held(
                &mut e, &mut clock, &mut buf, &mut rsp, &mut q, &mut token, held,
            )
        })
    });
    g.throughput(Throughput::Bytes(u64::from(sectors) * 512));
    g.bench_function("write 1 MiB, 64 frames out", |b| {
        let mut e = initiator_engine(now);
        let mut buf = vec![0u8; 9014];
        let req = write_request(0, 1, 0x5a);
        let mut rsp = ata_reply(&req, &[]);
        let wdata = vec![0x5a; sectors as usize * 512];
        let mut q = std::collections::VecDeque::new();
        b.iter(|| {
            // The previous write's copies were all answered: no fence holds it back.
            let op = BlockOp::Write {
                lba: 0,
                data: wdata.clone(),
            };
            windowed(&mut e, now, &mut buf, &mut rsp, &mut q, op)
        })
    });
    g.finish();
}

criterion_group!(benches, target, initiator);
criterion_main!(benches);
