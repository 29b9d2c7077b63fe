//! The initiator engine against the target engine over two links the input controls: which
//! queued frame is delivered next, dropped, duplicated or corrupted, when time moves on,
//! which reads and writes are submitted, and the MTU of each end of each link, changed under
//! frames in flight. Checked:
//! - no panic;
//! - every frame the initiator emits parses and fits its interface's MTU at that moment,
//!   answer included (a read's sectors plus the 36-byte header);
//! - every read that succeeds returns the export's bytes (writes only ever write the bytes
//!   already there, so the expected content never changes);
//! - once the links are reliable again, every submitted operation completes (no hang).
#![no_main]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aoe_proto::initiator::{BlockOp, Config, Engine, Event, FlushWhich, IoId};
use aoe_proto::target::{
    self, ExportConfig, Interface, IoKind, Outcome, PersistentState, FIRMWARE_VERSION,
};
use aoe_wire::{Body, Command, MacAddr, Message, TargetAddr, ATA_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

const SECTORS: u64 = 96;
const DEV: TargetAddr = TargetAddr { shelf: 3, slot: 1 };
const INIT_MACS: [MacAddr; 2] = [MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2])];
const TARGET_MACS: [MacAddr; 2] = [MacAddr([2, 0, 0, 0, 1, 1]), MacAddr([2, 0, 0, 0, 1, 2])];
const MTUS: [u32; 6] = [548, 1000, 1500, 4000, 9000, 600];

/// The export's content: every byte a function of its offset.
fn byte_at(offset: usize) -> u8 {
    ((offset / 512) as u8).wrapping_mul(31) ^ (offset % 251) as u8
}

fn expected(lba: u64, sectors: u32) -> Vec<u8> {
    let start = lba as usize * 512;
    (start..start + sectors as usize * 512).map(byte_at).collect()
}

struct Net {
    init: Engine,
    target: target::Engine,
    disk: Vec<u8>,
    now: Instant,
    /// MTU of (initiator end, target end) of each link; 0 = the initiator's end removed.
    mtu: [(u32, u32); 2],
    /// Frames on their way to the target / to the initiator: (link, bytes).
    to_target: Vec<(usize, Vec<u8>)>,
    to_init: Vec<(usize, Vec<u8>)>,
    /// Submitted operations not yet completed: id -> (lba, sectors, is a read).
    ops: BTreeMap<IoId, (u64, u32, bool)>,
}

impl Net {
    fn new(start: Instant) -> Net {
        let mut init = Engine::new(
            Config {
                deadsecs: Duration::from_secs(3),
                ..Config::default()
            },
            start,
        );
        let mut target = target::Engine::new(
            ExportConfig {
                addr: DEV,
                sectors: SECTORS,
                read_only: false,
                buffer_count: 8,
                firmware_version: FIRMWARE_VERSION,
                max_sectors: 255,
                model: "fuzz".into(),
                serial: "fuzz".into(),
                firmware: "0".into(),
            },
            PersistentState::default(),
        );
        for k in 0..2 {
            init.add_interface(k, &format!("if{k}"), INIT_MACS[k], 1500);
            target.set_interface(
                k,
                Interface {
                    mac: TARGET_MACS[k],
                    mtu: 1500,
                },
            );
        }
        let disk = (0..SECTORS as usize * 512).map(byte_at).collect();
        Net {
            init,
            target,
            disk,
            now: start,
            mtu: [(1500, 1500); 2],
            to_target: Vec::new(),
            to_init: Vec::new(),
            ops: BTreeMap::new(),
        }
    }

    /// Takes what the initiator wants to send and what it has to report, checking both.
    fn collect(&mut self) {
        let mut buf = vec![0u8; 9014];
        while let Some(t) = self.init.poll_transmit(self.now, &mut buf) {
            let frame = &buf[..t.len];
            let mtu = self.mtu[t.iface].0;
            assert!(mtu > 0, "frame sent on a removed interface");
            assert!(
                frame.len() <= mtu as usize + 14,
                "{}-byte frame on an interface with MTU {mtu}",
                frame.len()
            );
            let m = Message::parse(frame).expect("the initiator's frame parses");
            if let (Command::Ata, Body::Ata(a)) = (m.header.command, &m.body) {
                if !a.aflags.contains(aoe_wire::AtaFlags::WRITE) {
                    let answer = ATA_HEADER_LEN + a.sector_count as usize * 512;
                    assert!(
                        answer <= mtu as usize,
                        "asks for {} sectors at MTU {mtu}",
                        a.sector_count
                    );
                }
            }
            self.to_target.push((t.iface, frame.to_vec()));
        }
        while let Some(ev) = self.init.poll_event() {
            if let Event::Completed { id, result } = ev {
                let (lba, sectors, read) = self.ops.remove(&id).expect("a submitted op");
                if let (true, Ok(data)) = (read, result) {
                    let data = data.expect("a read returns data");
                    assert!(
                        data == expected(lba, sectors),
                        "read of {sectors} sectors at {lba} returned wrong bytes"
                    );
                }
            }
        }
    }

    /// Delivers frame `i` of the queue towards the target; the link drops a frame larger
    /// than either end's MTU.
    fn deliver_to_target(&mut self, i: usize) {
        if self.to_target.is_empty() {
            return;
        }
        let (link, frame) = self.to_target.remove(i % self.to_target.len());
        let (a, b) = self.mtu[link];
        if frame.len() > a.min(b) as usize + 14 {
            return;
        }
        let mut reply = vec![0u8; 9014];
        let n = match self.target.handle_frame(link, &frame, &mut reply) {
            Outcome::Drop(_) => return,
            Outcome::Reply(n) => n,
            Outcome::Io(io) => {
                match io.kind {
                    IoKind::Read { offset, len } => {
                        let o = offset as usize;
                        reply[ATA_HEADER_LEN..ATA_HEADER_LEN + len]
                            .copy_from_slice(&self.disk[o..o + len]);
                    }
                    IoKind::Write { offset, data } => {
                        let o = offset as usize;
                        self.disk[o..o + data.len()].copy_from_slice(&frame[data]);
                    }
                    IoKind::Flush => {}
                }
                match self.target.complete(io.token, Ok(()), &mut reply) {
                    Some(n) => n,
                    None => return,
                }
            }
        };
        self.to_init.push((link, reply[..n].to_vec()));
    }

    fn deliver_to_init(&mut self, i: usize) {
        if self.to_init.is_empty() {
            return;
        }
        let (link, frame) = self.to_init.remove(i % self.to_init.len());
        let (a, b) = self.mtu[link];
        if a == 0 || frame.len() > a.min(b) as usize + 14 {
            return;
        }
        self.init.handle_frame(self.now, link, &frame);
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        if self.init.poll_timeout().is_some_and(|t| t <= self.now) {
            self.init.handle_timeout(self.now);
        }
    }

    fn submit(&mut self, lba: u64, sectors: u32, write: bool) {
        let op = if write {
            BlockOp::Write {
                lba,
                data: expected(lba, sectors),
            }
        } else {
            BlockOp::Read { lba, sectors }
        };
        if let Ok(id) = self.init.submit(self.now, DEV, op) {
            self.ops.insert(id, (lba, sectors, !write));
        }
    }

    fn set_mtu(&mut self, link: usize, init: Option<u32>, target: Option<u32>) {
        if let Some(m) = init {
            self.mtu[link].0 = m;
            self.init
                .add_interface(link, &format!("if{link}"), INIT_MACS[link], m);
        }
        if let Some(m) = target {
            self.mtu[link].1 = m;
            self.target.set_interface(
                link,
                Interface {
                    mac: TARGET_MACS[link],
                    mtu: m,
                },
            );
        }
    }

    /// Everything delivered in order, both ways, until the links are quiet.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            self.collect();
            if self.to_target.is_empty() && self.to_init.is_empty() {
                return;
            }
            while !self.to_target.is_empty() {
                self.deliver_to_target(0);
            }
            while !self.to_init.is_empty() {
                self.deliver_to_init(0);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut net = Net::new(Instant::now());
    // Discovery and IDENTIFY on a clean link, so most inputs start with the device up.
    net.settle();
    let mut input = data.iter().copied();
    let mut next = move || input.next();
    while let Some(op) = next() {
        let arg = next().unwrap_or(0) as usize;
        match op % 14 {
            0..=2 => net.deliver_to_target(arg),
            3..=5 => net.deliver_to_init(arg),
            6 => {
                // Duplicate a frame in flight.
                let q = if arg & 1 == 0 {
                    &mut net.to_target
                } else {
                    &mut net.to_init
                };
                if !q.is_empty() {
                    let f = q[(arg >> 1) % q.len()].clone();
                    q.push(f);
                }
            }
            7 => {
                // Lose one, or corrupt a byte of its Ethernet or AoE header before the tag.
                // (AoE has no integrity check: a changed tag, LBA, flag or data byte is
                // taken for real, so those are left alone.)
                let corrupt = next().unwrap_or(0);
                let q = if arg & 1 == 0 {
                    &mut net.to_target
                } else {
                    &mut net.to_init
                };
                if !q.is_empty() {
                    let i = (arg >> 1) % q.len();
                    if corrupt == 0 {
                        q.remove(i);
                    } else {
                        let f = &mut q[i].1;
                        let at = corrupt as usize % f.len().min(20);
                        f[at] ^= corrupt;
                    }
                }
            }
            8 => net.advance(Duration::from_millis(arg as u64 * 20)),
            9 | 10 => {
                let lba = next().unwrap_or(0) as u64 % (SECTORS + 4);
                let sectors = (arg % 40) as u32 + 1;
                net.submit(lba, sectors, op % 14 == 10);
            }
            11 => {
                let link = arg & 1;
                let mtu = MTUS[(arg >> 1) % MTUS.len()];
                match (arg >> 4) % 3 {
                    0 => net.set_mtu(link, Some(mtu), None),
                    1 => net.set_mtu(link, None, Some(mtu)),
                    _ => net.set_mtu(link, Some(mtu), Some(mtu)),
                }
            }
            12 => {
                let link = arg & 1;
                if net.mtu[link].0 == 0 {
                    let mtu = net.mtu[link].1;
                    net.set_mtu(link, Some(mtu), None);
                } else {
                    net.mtu[link].0 = 0;
                    net.init.remove_interface(link);
                }
            }
            _ => match arg % 4 {
                0 => net.init.discover(net.now),
                1 => {
                    let _ = net.init.revalidate(net.now, DEV);
                }
                2 => {
                    net.init.flush_devices(FlushWhich::Down);
                }
                _ => net.init.set_open(DEV, arg & 4 != 0),
            },
        }
        net.collect();
    }
    // Reliable links from here on, and time moving: every operation must end, answered or
    // failed, within deadsecs of its last frame.
    for _ in 0..1_000 {
        if net.ops.is_empty() {
            break;
        }
        net.settle();
        let t = net.init.poll_timeout().unwrap_or(net.now + Duration::from_secs(1));
        net.advance(t.saturating_duration_since(net.now).max(Duration::from_millis(1)));
    }
    net.collect();
    assert!(
        net.ops.is_empty(),
        "{} operations never completed",
        net.ops.len()
    );
});
