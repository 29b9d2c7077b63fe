//! Frame parse and emit: the per-frame work of every AoE hot path (target, initiator, `aoe
//! bench`). Run with `cargo bench -p aoe-wire`; numbers are per frame.

use std::hint::black_box;

use aoe_wire::{
    AtaFlags, AtaPacket, AtaRepr, Body, Command, ConfigCommand, ConfigRepr, Frame, HeaderRepr,
    MacAddr, Message, Tag, TargetAddr,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const HOST: MacAddr = MacAddr([0x02, 0xaa, 0, 0, 0, 1]);
const TARGET: MacAddr = MacAddr([0x02, 0xbb, 0, 0, 0, 1]);
const ADDR: TargetAddr = TargetAddr { shelf: 1, slot: 1 };
/// 17 sectors: what one MTU 9000 frame carries.
const SECTORS: u8 = 17;

fn ata(write: bool, response: bool, data: &[u8]) -> Message<'_> {
    let mut header = HeaderRepr::request(TARGET, HOST, ADDR, Command::Ata, Tag(0x1234_5678));
    if response {
        header = header.response_to(TARGET);
    }
    Message {
        header,
        body: Body::Ata(AtaRepr {
            aflags: if write {
                AtaFlags::EXTENDED | AtaFlags::WRITE
            } else {
                AtaFlags::EXTENDED
            },
            err_feature: 0,
            sector_count: SECTORS,
            // READ / WRITE SECTORS EXT.
            cmd_status: if response {
                0x40
            } else if write {
                0x34
            } else {
                0x24
            },
            lba: 0x1234_5678,
            data,
        }),
    }
}

fn config() -> Message<'static> {
    Message {
        header: HeaderRepr::request(
            MacAddr::BROADCAST,
            HOST,
            TargetAddr::BROADCAST,
            Command::QueryConfig,
            Tag(7),
        ),
        body: Body::Config(ConfigRepr::request(ConfigCommand::Read, b"")),
    }
}

fn parse(c: &mut Criterion) {
    let data = vec![0x5a; usize::from(SECTORS) * 512];
    let read_req = ata(false, false, &[]).to_vec().unwrap();
    let read_rsp = ata(false, true, &data).to_vec().unwrap();
    let write_req = ata(true, false, &data).to_vec().unwrap();
    let cfg = config().to_vec().unwrap();
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ata read request (Message)", |b| {
        b.iter(|| Message::parse(black_box(&read_req)).unwrap().header.tag)
    });
    g.bench_function("ata read reply 8704 B (Message)", |b| {
        b.iter(|| Message::parse(black_box(&read_rsp)).unwrap().header.tag)
    });
    g.bench_function("ata write request 8704 B (Message)", |b| {
        b.iter(|| Message::parse(black_box(&write_req)).unwrap().header.tag)
    });
    g.bench_function("ata read reply (Frame + AtaPacket views)", |b| {
        b.iter(|| {
            let f = Frame::new_checked(black_box(&read_rsp[..])).unwrap();
            let a = AtaPacket::new_checked(f.payload()).unwrap();
            (f.tag(), a.cmd_status(), a.sector_count())
        })
    });
    g.bench_function("query config (Message)", |b| {
        b.iter(|| Message::parse(black_box(&cfg)).unwrap().header.tag)
    });
    g.finish();
}

fn emit(c: &mut Criterion) {
    let data = vec![0x5a; usize::from(SECTORS) * 512];
    let mut buf = vec![0u8; 9014];
    let mut g = c.benchmark_group("emit");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ata read request", |b| {
        let m = ata(false, false, &[]);
        b.iter(|| black_box(&m).emit(&mut buf).unwrap())
    });
    g.bench_function("ata read reply header (data in place)", |b| {
        let m = ata(false, true, &[]);
        b.iter(|| black_box(&m).emit(&mut buf).unwrap())
    });
    g.bench_function("ata write request 8704 B", |b| {
        let m = ata(true, false, &data);
        b.iter(|| black_box(&m).emit(&mut buf).unwrap())
    });
    g.bench_function("query config", |b| {
        let m = config();
        b.iter(|| black_box(&m).emit(&mut buf).unwrap())
    });
    g.bench_function("patch tag and LBA of a built request", |b| {
        let mut f = ata(false, false, &[]).to_vec().unwrap();
        let mut lba = 0u64;
        b.iter(|| {
            lba = lba.wrapping_add(17);
            let mut fr = Frame::new_checked(&mut f[..]).unwrap();
            fr.set_tag(Tag(lba as u32));
            AtaPacket::new_checked(fr.payload_mut())
                .unwrap()
                .set_lba(black_box(lba));
        })
    });
    g.finish();
}

criterion_group!(benches, parse, emit);
criterion_main!(benches);
