//! The initiator engine against the target engine over two links the input controls, through
//! aoe-proto's simulated link (`aoe_proto::sim`, hand-driven): which queued frame is
//! delivered next, dropped, duplicated or corrupted, when time moves on, which reads and
//! writes are submitted, and the MTU of each end of each link, changed under frames in
//! flight. Checked:
//! - no panic;
//! - what the simulation checks after every step: every frame the initiator emits parses and
//!   fits its interface's MTU at that moment, answer included (a read's sectors plus the
//!   36-byte header), and each target's window stays within `min(bufcnt, maxout)`;
//! - every read that succeeds returns the export's bytes (writes only ever write the bytes
//!   already there, so the expected content never changes);
//! - once the links are reliable again, every submitted operation completes (no hang).
//!
//! Each input runs twice: with the write fence (`Config::fence_writes`) on and off.
#![no_main]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use aoe_proto::initiator::{BlockOp, Config, FlushWhich, IoId};
use aoe_proto::sim::{LinkCfg, Sim, TargetSpec, Toward};
use aoe_wire::{MacAddr, TargetAddr};
use libfuzzer_sys::fuzz_target;

const SECTORS: u64 = 96;
const DEV: TargetAddr = TargetAddr { shelf: 3, slot: 1 };
const TARGET_MACS: [MacAddr; 2] = [MacAddr([2, 0, 0, 0, 1, 1]), MacAddr([2, 0, 0, 0, 1, 2])];
const MTUS: [u32; 6] = [548, 1000, 1500, 4000, 9000, 600];

/// The export's content: every byte a function of its offset.
fn byte_at(offset: usize) -> u8 {
    ((offset / 512) as u8).wrapping_mul(31) ^ (offset % 251) as u8
}

fn expected(lba: u64, sectors: u32) -> Vec<u8> {
    let start = lba as usize * 512;
    (start..start + sectors as usize * 512)
        .map(byte_at)
        .collect()
}

struct Net {
    sim: Sim,
    /// Submitted operations not yet completed: id -> (lba, sectors, is a read).
    ops: BTreeMap<IoId, (u64, u32, bool)>,
}

impl Net {
    fn new(fence_writes: bool) -> Net {
        let cfg = Config {
            deadsecs: DEADSECS,
            fence_writes,
            ..Config::default()
        };
        let mut sim = Sim::new(0, LinkCfg::perfect(), cfg, &[1500, 1500]);
        sim.hold = true;
        sim.add_target(TargetSpec {
            addr: DEV,
            sectors: SECTORS,
            buffer_count: 8,
            ifaces: vec![(TARGET_MACS[0], 1500, 0), (TARGET_MACS[1], 1500, 1)],
            io_delay: Duration::ZERO,
            disk: Some(Rc::new(RefCell::new(
                (0..SECTORS as usize * 512).map(byte_at).collect(),
            ))),
        });
        Net {
            sim,
            ops: BTreeMap::new(),
        }
    }

    /// Sends what the initiator has to send and checks the operations it completed.
    fn collect(&mut self) {
        self.sim.flush();
        for (id, (_, result)) in std::mem::take(&mut self.sim.completions) {
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

    fn submit(&mut self, lba: u64, sectors: u32, write: bool) {
        let op = if write {
            BlockOp::Write {
                lba,
                data: expected(lba, sectors),
            }
        } else {
            BlockOp::Read { lba, sectors }
        };
        if let Ok(id) = self.sim.submit(DEV, op) {
            self.ops.insert(id, (lba, sectors, !write));
        }
    }

    /// Everything delivered in order, both ways, until the links are quiet.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            self.collect();
            if self.sim.on_wire(Toward::Target) + self.sim.on_wire(Toward::Initiator) == 0 {
                return;
            }
            while self.sim.on_wire(Toward::Target) > 0 {
                self.sim.deliver(Toward::Target, 0);
            }
            while self.sim.on_wire(Toward::Initiator) > 0 {
                self.sim.deliver(Toward::Initiator, 0);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // Each input runs with the write fence on (the default) and off: the fence changes which
    // writes go out when, and either way every operation must end.
    run(data, true);
    run(data, false);
});

fn run(data: &[u8], fence_writes: bool) {
    let mut net = Net::new(fence_writes);
    // Discovery and IDENTIFY on a clean link, so most inputs start with the device up.
    net.settle();
    let mut input = data.iter().copied();
    let mut next = move || input.next();
    while let Some(op) = next() {
        let arg = next().unwrap_or(0) as usize;
        let toward = if arg & 1 == 0 {
            Toward::Target
        } else {
            Toward::Initiator
        };
        match op % 14 {
            0..=2 => net.sim.deliver(Toward::Target, arg),
            3..=5 => net.sim.deliver(Toward::Initiator, arg),
            // Duplicate a frame in flight.
            6 => net.sim.duplicate(toward, arg >> 1),
            7 => {
                // Lose one, or corrupt a byte of its Ethernet or AoE header before the tag.
                // (AoE has no integrity check: a changed tag, LBA, flag or data byte is
                // taken for real, so those are left alone.)
                let corrupt = next().unwrap_or(0);
                if corrupt == 0 {
                    net.sim.lose(toward, arg >> 1);
                } else if let Some(f) = net.sim.frame_mut(toward, arg >> 1) {
                    let at = corrupt as usize % f.len().min(20);
                    f[at] ^= corrupt;
                }
            }
            8 => net.sim.run_for(Duration::from_millis(arg as u64 * 20)),
            9 | 10 => {
                let lba = next().unwrap_or(0) as u64 % (SECTORS + 4);
                let sectors = (arg % 40) as u32 + 1;
                net.submit(lba, sectors, op % 14 == 10);
            }
            11 => {
                let link = arg & 1;
                let mtu = MTUS[(arg >> 1) % MTUS.len()];
                let (init, target) = match (arg >> 4) % 3 {
                    0 => (true, false),
                    1 => (false, true),
                    _ => (true, true),
                };
                if init {
                    net.sim.set_initiator_mtu(link, mtu);
                }
                if target {
                    net.sim.set_target_mtu(0, link, mtu);
                }
            }
            12 => {
                let link = arg & 1;
                if net.sim.initiator_mtu(link) == 0 {
                    let mtu = net.sim.target_mtu(0, link);
                    net.sim.set_initiator_mtu(link, mtu);
                } else {
                    net.sim.remove_initiator_interface(link);
                }
            }
            _ => {
                let now = net.sim.now;
                match arg % 4 {
                    0 => net.sim.init.discover(now),
                    1 => {
                        let _ = net.sim.init.revalidate(now, DEV);
                    }
                    2 => {
                        let _ = net.sim.init.flush_devices(FlushWhich::Down);
                    }
                    _ => net.sim.init.set_open(DEV, arg & 4 != 0),
                }
            }
        }
        net.collect();
    }
    // Reliable links from here on, and time moving on the engine's own timer: some operation
    // must end, answered or failed, within deadsecs (the driver's rule: a frame unanswered
    // for `aoe_deadsecs` takes the device down, EIO) plus a bounded margin of the links
    // becoming reliable or of the one before it ending, until none is left, and without the
    // timer spinning: a target that answers nothing gets backed-off timeouts, so a few
    // hundred timer runs cover `deadsecs` (RFC 6298 5.5). Not every operation within that
    // of the links becoming reliable: with the write fence, overlapping writes go one after
    // another, and each may wait up to a second for a lost copy of the one before, so N of
    // them may take N seconds (the kept input initiator_engine-s8-fence-liveness: seven such
    // writes over a path whose MTU shrank, which drops every first copy).
    let reliable_at = net.sim.now;
    let mut progress_at = reliable_at;
    let mut pending = net.ops.len();
    let mut runs = 0;
    while !net.ops.is_empty() && runs < MAX_TIMER_RUNS {
        net.settle();
        if net.ops.is_empty() {
            break;
        }
        if net.ops.len() < pending {
            pending = net.ops.len();
            progress_at = net.sim.now;
        }
        let now = net.sim.now;
        let t = net
            .sim
            .init
            .poll_timeout()
            .unwrap_or(now + Duration::from_secs(1));
        net.sim.run_for(
            t.saturating_duration_since(now)
                .max(Duration::from_millis(1)),
        );
        runs += 1;
        let waited = net.sim.now.saturating_duration_since(progress_at);
        assert!(
            net.ops.is_empty() || waited <= DEADSECS + LIVENESS_MARGIN,
            "liveness: {} operations outstanding, none completed for {:?} of simulated time \
             ({:?} after the links became reliable; deadsecs {DEADSECS:?}, margin \
             {LIVENESS_MARGIN:?}), {runs} timer runs, fence_writes {fence_writes}",
            net.ops.len(),
            waited,
            net.sim.now.saturating_duration_since(reliable_at),
        );
    }
    net.collect();
    assert!(
        net.ops.is_empty(),
        "liveness: {} operations outstanding after {runs} timer runs, {:?} of simulated time \
         after the links became reliable (deadsecs {DEADSECS:?}, fence_writes \
         {fence_writes}): the timer spins",
        net.ops.len(),
        net.sim.now.saturating_duration_since(reliable_at),
    );
}

/// The engine's `deadsecs` here.
const DEADSECS: Duration = Duration::from_secs(3);

/// How long beyond `deadsecs` the operations may go without one of them ending (counted
/// from the links becoming reliable, then from the last one that ended): a frame may go
/// out only once a slot frees, which a copy presumed lost keeps for up to a second
/// (`SILENT_HOLD` in the engine), a write may wait a second for a fence, and the device may
/// still be identifying.
const LIVENESS_MARGIN: Duration = Duration::from_secs(3);

/// Timer runs allowed for that: a frame's backed-off timeouts number about
/// log2(deadsecs / rto_min), some dozen, and each held copy, copy waiting for a slot or
/// write waiting for a fence adds a few.
const MAX_TIMER_RUNS: usize = 1000;
