//! The initiator engine: discovery, block I/O and failover for every AoE device seen, as a
//! deterministic state machine (the user-space counterpart of the Linux driver's core,
//! `drivers/block/aoe/aoecmd.c` and `aoedev.c`, version 85).
//!
//! The engine owns no socket, clock or thread. The daemon around it:
//! 1. registers its interfaces ([`Engine::add_interface`]),
//! 2. feeds every received AoE frame to [`Engine::handle_frame`],
//! 3. calls [`Engine::handle_timeout`] when [`Engine::poll_timeout`] says so,
//! 4. after any call, drains [`Engine::poll_transmit`] (frames to send) and
//!    [`Engine::poll_event`] (device changes, I/O completions, log lines).
//!
//! Block I/O enters through [`Engine::submit`], never blocks, and leaves as
//! [`Event::Completed`].
//!
//! ```text
//!  submit(BlockOp) -> per-device queue -> split into frames of `payload` sectors
//!        -> window per target MAC (slow start / congestion avoidance, collapse on timeout)
//!        -> path (target MAC x local interface) round-robin, tainted targets avoided
//!        -> poll_transmit ........ network ........ handle_frame(response, by tag)
//!        -> all frames of the op answered -> Event::Completed
//! ```
//!
//! Behaviour follows `docs/PROTOCOL.md` (sections 1.7 and 2.4-2.7; differences in 4):
//! - Discovery: broadcast Query Config on every interface when an interface is added, on
//!   [`Engine::discover`] and every [`Config::discover_interval`] (the driver's 60 s beacon).
//!   Any config response, asked for or not, adds the path it came on; a new (or down) device
//!   is IDENTIFYed and then up.
//! - Tags `(++lasttag & 0x7fff) << 16 | (ticks & 0xffff)`; bit 31 belongs to user tools and
//!   responses carrying it are ignored (`aoenet_rcv`).
//! - RTT per target (Jacobson/Karels), retransmission with a fresh tag on the next path,
//!   per-frame exponential backoff, device down after [`Config::deadsecs`].
//! - Beyond the driver: FLUSH CACHE (EXT) for [`BlockOp::Flush`] (the driver never flushes),
//!   and every I/O of a device that goes down or is flushed fails promptly instead of hanging.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use aoe_wire::ata::status;
use aoe_wire::{
    max_sectors_for_mtu, AtaCommand, AtaFlags, AtaRepr, Body, Command, ConfigCommand, ConfigRepr,
    ErrorCode, Frame, HeaderRepr, Identify, IdentifyInfo, MacAddr, Message, Tag, TargetAddr,
    ETHERTYPE_AOE, SECTOR_SIZE,
};

/// Most local interfaces one target MAC is used through (the driver's `NAOEIFS`).
pub const MAX_PATHS_PER_TARGET: usize = 8;

/// Payload used when a target advertises a sector count of 0 (the driver's `DEFAULTBCNT`,
/// 1024 bytes).
const DEFAULT_SECTORS: u8 = 2;

/// Highest taint a target reaches (the driver's `MAX_TAINT`).
const MAX_TAINT: u32 = 1000;

/// Initial RTT: 250 ms average as in the driver, 62.5 ms deviation (`docs/PROTOCOL.md` 2.4, 4).
const RTT_AVG_INIT_US: u64 = 250_000;
const RTT_DEV_INIT_US: u64 = 62_500;

/// Tunables. Defaults are the Linux driver's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// How long a frame may stay unanswered before its device is declared down
    /// (`aoe_deadsecs`, 180 s). [`Duration::ZERO`] retries forever, as the driver documents.
    pub deadsecs: Duration,
    /// Cap on outstanding frames per target MAC (`aoe_maxout`). 64 is the value in the
    /// driver's code; its documentation (`aoe.rst`) still says 128.
    pub maxout: u16,
    /// Period of the discovery beacon (the driver's `discover_timer`, 60 s). Zero disables it.
    pub discover_interval: Duration,
    /// Lowest retransmission timeout. The driver's timer ticks every 100 ms (`TIMERTICK`),
    /// which acts as a floor; without one a 100 µs veth RTT would retransmit every frame a
    /// slow disk holds for a millisecond.
    pub rto_min: Duration,
    /// Highest retransmission timeout, also the cap of the per-frame exponential backoff.
    pub rto_max: Duration,
    /// A frame unanswered this long taints its target, so new frames go to the others
    /// (`HARD_SCORN_SECS`, 10 s; the driver also scorns after `deadsecs / targets`). A
    /// target is also tainted after `nframes` timeouts in a row without an answer.
    pub scorn_after: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            deadsecs: Duration::from_secs(180),
            maxout: 64,
            discover_interval: Duration::from_secs(60),
            rto_min: Duration::from_millis(50),
            rto_max: Duration::from_secs(5),
            scorn_after: Duration::from_secs(10),
        }
    }
}

/// Identifies one submitted [`BlockOp`] in its [`Event::Completed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IoId(pub u64);

impl fmt::Display for IoId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "io#{}", self.0)
    }
}

/// A block operation on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockOp {
    /// Read `sectors` 512-byte sectors at `lba`; completes with the data.
    Read {
        /// First sector.
        lba: u64,
        /// Sectors to read (at least 1).
        sectors: u32,
    },
    /// Write `data` (a non-empty multiple of 512 bytes) at `lba`. It completes only when the
    /// target acknowledged every frame.
    Write {
        /// First sector.
        lba: u64,
        /// The data.
        data: Vec<u8>,
    },
    /// ATA FLUSH CACHE EXT (0xEA) if IDENTIFY advertises it (word 83 bit 13), else FLUSH CACHE
    /// (0xE7), as libata chooses. The Linux AoE driver never sends one; we do, so a write
    /// cache on the target is safe.
    Flush,
}

/// Why an operation failed. Whose fault it is is named per variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// The target's drive reported an error (status & 0xa9, `ktiocomplete`); not retried.
    #[error("ATA error: status {status:#04x}, error {error:#04x}")]
    Ata {
        /// ATA status register.
        status: u8,
        /// ATA error register.
        error: u8,
    },
    /// The target answered with the AoE error flag; not retried.
    #[error("AoE error: {0}")]
    Aoe(ErrorCode),
    /// The device went down (no answer within `deadsecs`, or no path left) with the
    /// operation outstanding: the network or the target failed (EIO).
    #[error("device down")]
    DeviceDown,
    /// The device was flushed ([`Engine::flush_devices`]) with the operation outstanding.
    #[error("device removed")]
    Removed,
}

/// Why [`Engine::submit`] refused an operation (the caller's mistake or a down device).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// No device with that address was discovered.
    #[error("no such device")]
    UnknownDevice,
    /// The device is down (or not yet identified): fail fast, as the driver does for a
    /// device without `DEVFL_UP`.
    #[error("device is down")]
    DeviceDown,
    /// A read of zero sectors, or a write of no data.
    #[error("empty operation")]
    Empty,
    /// Write data not a multiple of 512 bytes.
    #[error("write of {len} bytes is not a multiple of 512")]
    Unaligned {
        /// Bytes given.
        len: usize,
    },
    /// The range ends beyond the device.
    #[error("sectors {lba}+{sectors} beyond the device's {capacity}")]
    OutOfRange {
        /// First sector.
        lba: u64,
        /// Sectors asked for.
        sectors: u64,
        /// Device capacity in sectors.
        capacity: u64,
    },
}

/// Errors of device-level calls ([`Engine::revalidate`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// No device with that address was discovered.
    #[error("no such device")]
    UnknownDevice,
}

/// Which devices [`Engine::flush_devices`] removes (what `/dev/etherd/flush` accepts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushWhich {
    /// "all": every device that is not open.
    All,
    /// Empty write: only devices that are down (and not open).
    Down,
    /// The named devices (if not open).
    Named(Vec<TargetAddr>),
}

/// A frame [`Engine::poll_transmit`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Send on this interface (the index given to [`Engine::add_interface`]).
    pub iface: usize,
    /// Bytes of the buffer to send (at least 60: frames are padded).
    pub len: usize,
}

/// Something the daemon should know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The device answered IDENTIFY and takes I/O.
    DeviceUp(TargetAddr),
    /// The device went down; its outstanding I/O has failed.
    DeviceDown(TargetAddr),
    /// The device was removed by [`Engine::flush_devices`].
    DeviceRemoved(TargetAddr),
    /// A re-IDENTIFY (revalidate or rediscovery) found a new capacity.
    DeviceResized {
        /// The device.
        dev: TargetAddr,
        /// Capacity before, in sectors.
        old_sectors: u64,
        /// Capacity now, in sectors.
        new_sectors: u64,
    },
    /// A submitted operation finished: read data for reads, `None` for writes and flushes.
    Completed {
        /// What [`Engine::submit`] returned.
        id: IoId,
        /// The outcome.
        result: Result<Option<Vec<u8>>, IoError>,
    },
    /// One diagnostic line, like the driver's `/dev/etherd/err` ("retransmit e7.3 oldtag=...").
    Log(String),
}

/// A device's state as `/sys/block/etherd!eX.Y/state` shows it (`docs/PROTOCOL.md` 2.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Identified and taking I/O.
    Up,
    /// Down (dead, never identified, or identifying after a rediscovery).
    Down,
    /// Down while still open ("down,closewait").
    DownCloseWait,
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceState::Up => "up",
            DeviceState::Down => "down",
            DeviceState::DownCloseWait => "down,closewait",
        })
    }
}

/// Counters of one device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// ATA frames sent, retransmissions included.
    pub frames_sent: u64,
    /// Retransmissions.
    pub retransmits: u64,
    /// Responses whose tag matched nothing outstanding: late (already retransmitted and
    /// answered) or duplicated by the network. Counted and ignored, never applied twice.
    pub unexpected_responses: u64,
    /// Responses whose tag matched but whose source MAC, shelf.slot or data length did not;
    /// ignored, the frame stays outstanding.
    pub bad_responses: u64,
    /// Frames answered with an ATA error status.
    pub ata_errors: u64,
    /// Frames answered with the AoE error flag.
    pub aoe_errors: u64,
    /// Operations completed successfully.
    pub ops_ok: u64,
    /// Operations failed.
    pub ops_failed: u64,
}

/// One target MAC of a device (the driver's `struct aoetgt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetInfo {
    /// The target's MAC.
    pub mac: MacAddr,
    /// Names of the local interfaces it is reached through.
    pub interfaces: Vec<String>,
    /// Buffer count from Query Config.
    pub buffer_count: u16,
    /// `min(buffer count, maxout)`: the window's ceiling.
    pub nframes: u16,
    /// The current window.
    pub maxout: u16,
    /// Slow-start threshold.
    pub ssthresh: u16,
    /// Frames outstanding now.
    pub nout: u16,
    /// Most frames ever outstanding at once.
    pub max_nout: u16,
    /// Taint (0 = healthy; raised by `scorn`, lowered by answers).
    pub taint: u32,
    /// Smoothed RTT.
    pub rtt_avg: Duration,
    /// RTT mean deviation.
    pub rtt_dev: Duration,
    /// Current retransmission timeout, `2*avg + 8*dev` within the configured bounds.
    pub rto: Duration,
    /// Retransmissions of frames sent to this target.
    pub retransmits: u64,
    /// ATA responses received from this target.
    pub answers: u64,
}

/// What `/sys/block/etherd!eX.Y` and debugfs show of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Shelf and slot.
    pub addr: TargetAddr,
    /// State.
    pub state: DeviceState,
    /// Capacity in sectors (0 until identified).
    pub sectors: u64,
    /// What IDENTIFY said, once it answered.
    pub identify: Option<IdentifyInfo>,
    /// Firmware version from Query Config (`firmware-version`, "0x%04x").
    pub firmware_version: u16,
    /// The config string from the latest Query Config response.
    pub config: Vec<u8>,
    /// Bytes of data per frame (`payload`, the driver's `maxbcnt`).
    pub payload: usize,
    /// The target MACs and their windows.
    pub targets: Vec<TargetInfo>,
    /// Local interfaces across all targets, without repeats (`netif`).
    pub interfaces: Vec<String>,
    /// Open, as told by [`Engine::set_open`].
    pub open: bool,
    /// Operations submitted and not yet completed.
    pub ops_outstanding: usize,
    /// Counters.
    pub stats: DeviceStats,
}

/// Engine-wide counters (frames that belong to no device).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames that did not parse.
    pub malformed: u64,
    /// Responses ignored because their tag has bit 31 set (user tools').
    pub user_tags: u64,
    /// Config responses refused for claiming shelf 0xffff or slot 0xff.
    pub wildcard_rejected: u64,
    /// ATA responses for devices the engine does not know.
    pub unknown_device: u64,
    /// Frames dropped by `poll_transmit` because the buffer was too small.
    pub tx_buffer_too_small: u64,
}

// ---------------------------------------------------------------------------- internals

#[derive(Debug, Clone)]
struct Iface {
    name: String,
    mac: MacAddr,
    mtu: u32,
}

/// One local interface through which a target MAC answered (the driver's `aoeif`).
#[derive(Debug, Clone)]
struct Path {
    iface: usize,
    /// Sectors per frame on this path: min(MTU bound, target's sector count).
    sectors: u8,
    /// Timeouts since the last answer (`lost`); the path is ejected after `2 * nframes`.
    lost: u32,
}

#[derive(Debug, Clone)]
struct Target {
    mac: MacAddr,
    paths: Vec<Path>,
    next_path: usize,
    buffer_count: u16,
    sector_count: u8,
    nframes: u16,
    maxout: u16,
    ssthresh: u16,
    next_cwnd: u16,
    nout: u16,
    max_nout: u16,
    taint: u32,
    rtt_avg_us: u64,
    rtt_dev_us: u64,
    retransmits: u64,
    answers: u64,
    /// Timeouts since the last answer.
    silent: u32,
}

impl Target {
    fn new(mac: MacAddr) -> Target {
        Target {
            mac,
            paths: Vec::new(),
            next_path: 0,
            buffer_count: 0,
            sector_count: 0,
            nframes: 1,
            maxout: 1,
            ssthresh: 1,
            next_cwnd: 1,
            nout: 0,
            max_nout: 0,
            taint: 0,
            rtt_avg_us: RTT_AVG_INIT_US,
            rtt_dev_us: RTT_DEV_INIT_US,
            retransmits: 0,
            answers: 0,
            silent: 0,
        }
    }

    /// `aoecmd_wreset` then `addtgt`: window at half its ceiling, slow start up to there.
    fn wreset(&mut self) {
        self.ssthresh = (self.nframes / 2).max(1);
        self.maxout = (self.nframes / 2).max(1);
        self.next_cwnd = self.nframes;
    }

    fn reset_rtt(&mut self) {
        self.rtt_avg_us = RTT_AVG_INIT_US;
        self.rtt_dev_us = RTT_DEV_INIT_US;
    }

    /// `calc_rttavg`: Jacobson/Karels with gain 1/8 for both average and deviation
    /// (RTTSCALE 8, RTTDSCALE 3), then window growth: slow start below `ssthresh`,
    /// afterwards one more frame per full window (`next_cwnd` countdown).
    fn on_answer(&mut self, rtt: Duration) {
        let rtt = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        let err = rtt.abs_diff(self.rtt_avg_us);
        if rtt >= self.rtt_avg_us {
            self.rtt_avg_us += err / 8;
        } else {
            self.rtt_avg_us -= err / 8;
        }
        if err >= self.rtt_dev_us {
            self.rtt_dev_us += (err - self.rtt_dev_us) / 8;
        } else {
            self.rtt_dev_us -= (self.rtt_dev_us - err) / 8;
        }
        if self.maxout >= self.nframes {
            return;
        }
        if self.maxout < self.ssthresh {
            self.maxout += 1;
        } else if self.nout >= self.maxout {
            if self.next_cwnd == 0 {
                self.maxout += 1;
                self.next_cwnd = self.maxout;
            } else {
                self.next_cwnd -= 1;
            }
        }
    }

    /// `rexmit_timer`: any timeout halves the threshold and collapses the window to 1.
    fn on_timeout(&mut self) {
        if self.maxout != 1 {
            self.ssthresh = (self.maxout / 2).max(1);
            self.maxout = 1;
        }
    }

    /// The driver's `scorn`: taint grows threefold, capped.
    fn scorn(&mut self) {
        let n = self.taint;
        self.taint += 1;
        self.taint += self.taint * 2;
        self.taint = self.taint.max(n).min(MAX_TAINT);
    }

    fn rto(&self, cfg: &Config) -> Duration {
        let us = 2 * self.rtt_avg_us + 8 * self.rtt_dev_us;
        Duration::from_micros(us).clamp(cfg.rto_min, cfg.rto_max.max(cfg.rto_min))
    }

    fn usable(&self) -> bool {
        !self.paths.is_empty()
    }
}

/// The device's lifecycle (the driver's `DEVFL_UP`; identifying = up not yet set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    Identifying,
    Up,
    Down,
}

#[derive(Debug)]
struct Device {
    addr: TargetAddr,
    life: Life,
    open: bool,
    targets: Vec<Target>,
    next_target: usize,
    identify: Option<IdentifyInfo>,
    sectors: u64,
    lba48: bool,
    firmware_version: u16,
    config: Vec<u8>,
    /// Sectors per frame: min over all paths (`maxbcnt`).
    payload: u8,
    /// Operations with frames not yet sent, in submission order.
    queue: VecDeque<u64>,
    stats: DeviceStats,
}

impl Device {
    fn new(addr: TargetAddr) -> Device {
        Device {
            addr,
            life: Life::Down,
            open: false,
            targets: Vec::new(),
            next_target: 0,
            identify: None,
            sectors: 0,
            lba48: false,
            firmware_version: 0,
            config: Vec::new(),
            payload: 0,
            queue: VecDeque::new(),
            stats: DeviceStats::default(),
        }
    }

    fn target_idx(&self, mac: MacAddr) -> Option<usize> {
        self.targets.iter().position(|t| t.mac == mac)
    }

    /// `setdbcnt`: the payload is the minimum over every path.
    fn recompute_payload(&mut self) -> Option<String> {
        let min = self
            .targets
            .iter()
            .flat_map(|t| t.paths.iter().map(|p| p.sectors))
            .min()
            .unwrap_or(0);
        if min != self.payload {
            self.payload = min;
            return Some(format!(
                "{}: setting {} byte data frames",
                self.addr,
                min as usize * SECTOR_SIZE
            ));
        }
        None
    }

    /// `newframe`: the next target (round-robin) with room in its window, skipping tainted
    /// targets unless every usable one is tainted.
    fn pick_target(&mut self) -> Option<usize> {
        let n = self.targets.len();
        let all_tainted = self
            .targets
            .iter()
            .filter(|t| t.usable())
            .all(|t| t.taint > 0);
        for k in 0..n {
            let i = (self.next_target + k) % n;
            let t = &self.targets[i];
            if t.usable() && t.nout < t.maxout && (t.taint == 0 || all_tainted) {
                self.next_target = i + 1;
                return Some(i);
            }
        }
        None
    }

    fn state(&self) -> DeviceState {
        match (self.life, self.open) {
            (Life::Up, _) => DeviceState::Up,
            (_, true) => DeviceState::DownCloseWait,
            (_, false) => DeviceState::Down,
        }
    }
}

#[derive(Debug)]
enum OpKind {
    Read(Vec<u8>),
    Write(Vec<u8>),
    Flush,
    /// Internal: IDENTIFY DEVICE at discovery or revalidation.
    Identify,
    /// Internal: a one-sector read to see whether a tainted target answers again.
    Probe,
}

impl OpKind {
    fn internal(&self) -> bool {
        matches!(self, OpKind::Identify | OpKind::Probe)
    }
}

#[derive(Debug)]
struct Op {
    dev: TargetAddr,
    kind: OpKind,
    lba: u64,
    /// Sectors in all (1 for non-data commands, so one frame is sent).
    sectors: u64,
    /// Sectors handed to frames so far.
    issued: u64,
    /// (offset, sectors) ranges taken back from frames too large for the path they were to
    /// be retransmitted on (its MTU shrank under them); sent again before `issued` moves.
    reissue: Vec<(u64, u64)>,
    /// Frames sent and not answered.
    frames_out: u32,
}

impl Op {
    /// True while some of the op's sectors still wait for a frame.
    fn unsent(&self) -> bool {
        self.issued < self.sectors || !self.reissue.is_empty()
    }
}

/// One frame outstanding, keyed by its tag (the driver's `struct frame`).
#[derive(Debug, Clone)]
struct Outstanding {
    dev: TargetAddr,
    op: u64,
    target: MacAddr,
    iface: usize,
    /// Sector offset within the op.
    offset: u64,
    count: u8,
    sent: Instant,
    first_sent: Instant,
    deadline: Instant,
    retransmits: u32,
}

/// The initiator engine. See the module documentation for how a daemon drives it.
#[derive(Debug)]
pub struct Engine {
    cfg: Config,
    start: Instant,
    last_now: Instant,
    interfaces: BTreeMap<usize, Iface>,
    devices: BTreeMap<TargetAddr, Device>,
    ops: BTreeMap<u64, Op>,
    outstanding: BTreeMap<u32, Outstanding>,
    next_op: u64,
    lasttag: u32,
    next_discover: Option<Instant>,
    transmit: VecDeque<(usize, Vec<u8>)>,
    events: VecDeque<Event>,
    stats: Stats,
}

impl Engine {
    /// A new engine. Discovery starts when interfaces are added (each new interface gets a
    /// broadcast Query Config); the beacon repeats every [`Config::discover_interval`].
    pub fn new(cfg: Config, now: Instant) -> Engine {
        let next_discover = (!cfg.discover_interval.is_zero()).then(|| now + cfg.discover_interval);
        let cfg = Config {
            maxout: cfg.maxout.max(1),
            ..cfg
        };
        Engine {
            cfg,
            start: now,
            last_now: now,
            interfaces: BTreeMap::new(),
            devices: BTreeMap::new(),
            ops: BTreeMap::new(),
            outstanding: BTreeMap::new(),
            next_op: 0,
            lasttag: 0,
            next_discover,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Engine-wide counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Registers interface `idx` (any number the daemon likes, e.g. its ifindex), or updates
    /// its name, MAC and MTU. A new interface gets a broadcast Query Config at once; an MTU
    /// change recomputes the payload of every path through it.
    pub fn add_interface(&mut self, idx: usize, name: &str, mac: MacAddr, mtu: u32) {
        let new = !self.interfaces.contains_key(&idx);
        self.interfaces.insert(
            idx,
            Iface {
                name: name.to_string(),
                mac,
                mtu,
            },
        );
        let mtu_sectors = max_sectors_for_mtu(mtu);
        let mut logs = Vec::new();
        let mut pathless = Vec::new();
        for d in self.devices.values_mut() {
            for t in &mut d.targets {
                let scnt = t.sector_count;
                for p in t.paths.iter_mut().filter(|p| p.iface == idx) {
                    p.sectors = path_sectors(mtu_sectors, scnt);
                }
                // An MTU too small for one sector makes the path useless.
                t.paths.retain(|p| p.sectors > 0);
            }
            logs.extend(d.recompute_payload());
            if d.life != Life::Down && !d.targets.iter().any(Target::usable) {
                pathless.push(d.addr);
            }
        }
        for l in logs {
            self.log(l);
        }
        for addr in pathless {
            self.device_down(addr, "no path can carry a sector");
        }
        if new {
            let now = self.last_now;
            self.queue_config_query(now, idx, MacAddr::BROADCAST, TargetAddr::BROADCAST);
        }
    }

    /// Forgets interface `idx`: paths through it are dropped; frames outstanding on it are
    /// retransmitted elsewhere when they time out. A device left without any path goes down
    /// (its I/O fails rather than waiting for `deadsecs`).
    pub fn remove_interface(&mut self, idx: usize) {
        if self.interfaces.remove(&idx).is_none() {
            return;
        }
        let mut logs = Vec::new();
        let mut pathless = Vec::new();
        for d in self.devices.values_mut() {
            for t in &mut d.targets {
                t.paths.retain(|p| p.iface != idx);
            }
            logs.extend(d.recompute_payload());
            if d.life != Life::Down && !d.targets.iter().any(Target::usable) {
                pathless.push(d.addr);
            }
        }
        for l in logs {
            self.log(l);
        }
        for addr in pathless {
            self.device_down(addr, "no path left");
        }
    }

    /// Queues a broadcast Query Config (dst ff:ff:ff:ff:ff:ff, shelf 0xffff, slot 0xff) on
    /// every interface (`aoecmd_cfg_pkts`; writing `/dev/etherd/discover`), and restarts the
    /// beacon period.
    pub fn discover(&mut self, now: Instant) {
        self.touch(now);
        let ifaces: Vec<usize> = self.interfaces.keys().copied().collect();
        for idx in ifaces {
            self.queue_config_query(now, idx, MacAddr::BROADCAST, TargetAddr::BROADCAST);
        }
        if !self.cfg.discover_interval.is_zero() {
            self.next_discover = Some(now + self.cfg.discover_interval);
        }
    }

    /// Handles one frame received on interface `iface`. Anything that is not an AoE response
    /// addressed to us is ignored; no byte sequence makes this panic.
    pub fn handle_frame(&mut self, now: Instant, iface: usize, frame: &[u8]) {
        self.touch(now);
        let Some(local) = self.interfaces.get(&iface) else {
            return;
        };
        let local_mac = local.mac;
        let Ok(view) = Frame::new_checked(frame) else {
            self.stats.malformed += 1;
            return;
        };
        if view.ethertype() != ETHERTYPE_AOE || !view.is_response() {
            // Not AoE, or another initiator's request seen on a shared segment.
            return;
        }
        if view.dst() != local_mac && !view.dst().is_multicast() {
            return;
        }
        if view.tag().0 & Tag::USER_BIT != 0 {
            // `aoenet_rcv`: bit 31 tags belong to aoeping/aoecfg.
            self.stats.user_tags += 1;
            return;
        }
        let msg = match Message::parse(frame) {
            Ok(m) => m,
            Err(e) => {
                self.stats.malformed += 1;
                self.log(format!("bad frame from {} on if {iface}: {e}", view.src()));
                return;
            }
        };
        match msg.body {
            Body::Config(cfg) => self.config_response(now, iface, &msg.header, &cfg),
            Body::Ata(ata) => self.ata_response(now, iface, &msg.header, &ata),
            _ => {}
        }
    }

    /// Retransmits frames whose timeout passed, declares devices down after `deadsecs`, probes
    /// tainted targets and sends the discovery beacon. Call it when [`Engine::poll_timeout`]
    /// is reached (calling it early is harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.touch(now);
        if self.next_discover.is_some_and(|t| now >= t) {
            self.discover(now);
        }
        let expired: Vec<u32> = self
            .outstanding
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(tag, _)| *tag)
            .collect();
        for tag in expired {
            // An earlier expiry in this loop may have taken the device down.
            if self.outstanding.contains_key(&tag) {
                self.frame_timed_out(now, tag);
            }
        }
        self.probe_tainted(now);
        let addrs: Vec<TargetAddr> = self.devices.keys().copied().collect();
        for a in addrs {
            self.pump(now, a);
        }
    }

    /// When [`Engine::handle_timeout`] must next be called: the earliest frame deadline or
    /// the discovery beacon. `None` if nothing is pending.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let frames = self.outstanding.values().map(|f| f.deadline).min();
        match (frames, self.next_discover) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Writes the next frame to send into `buf` (which must hold the interface's MTU + 14
    /// bytes) and says on which interface to send it. Call until `None` after every other
    /// call. A frame that does not fit `buf` is dropped, counted, and recovered by
    /// retransmission.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        self.touch(now);
        while let Some((iface, frame)) = self.transmit.pop_front() {
            if frame.len() > buf.len() {
                self.stats.tx_buffer_too_small += 1;
                continue;
            }
            buf[..frame.len()].copy_from_slice(&frame);
            return Some(Transmit {
                iface,
                len: frame.len(),
            });
        }
        None
    }

    /// The next event, if any. Drain after every call.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Queues a block operation. Never blocks: frames go out as the window allows, and the
    /// result arrives as [`Event::Completed`]. Fails at once for unknown or down devices
    /// and for malformed requests.
    pub fn submit(
        &mut self,
        now: Instant,
        dev: TargetAddr,
        op: BlockOp,
    ) -> Result<IoId, SubmitError> {
        self.touch(now);
        let d = self.devices.get(&dev).ok_or(SubmitError::UnknownDevice)?;
        if d.life != Life::Up {
            return Err(SubmitError::DeviceDown);
        }
        let (kind, lba, sectors) = match op {
            BlockOp::Read { lba, sectors } => {
                if sectors == 0 {
                    return Err(SubmitError::Empty);
                }
                let buf = vec![0u8; sectors as usize * SECTOR_SIZE];
                (OpKind::Read(buf), lba, sectors as u64)
            }
            BlockOp::Write { lba, data } => {
                if data.is_empty() {
                    return Err(SubmitError::Empty);
                }
                if data.len() % SECTOR_SIZE != 0 {
                    return Err(SubmitError::Unaligned { len: data.len() });
                }
                let n = (data.len() / SECTOR_SIZE) as u64;
                (OpKind::Write(data), lba, n)
            }
            BlockOp::Flush => (OpKind::Flush, 0, 1),
        };
        if !matches!(kind, OpKind::Flush) && lba.checked_add(sectors).is_none_or(|e| e > d.sectors)
        {
            return Err(SubmitError::OutOfRange {
                lba,
                sectors,
                capacity: d.sectors,
            });
        }
        let id = self.new_op(dev, kind, lba, sectors, false);
        self.pump(now, dev);
        Ok(IoId(id))
    }

    /// Like writing "eX.Y" to `/dev/etherd/revalidate`: resets every target's RTT estimate
    /// and window, sends each target MAC a Query Config and, if the device is up,
    /// re-IDENTIFYs it so a grown export shows its new size ([`Event::DeviceResized`]).
    /// A down device comes back up when the query is answered.
    pub fn revalidate(&mut self, now: Instant, dev: TargetAddr) -> Result<(), DeviceError> {
        self.touch(now);
        let d = self
            .devices
            .get_mut(&dev)
            .ok_or(DeviceError::UnknownDevice)?;
        let mut queries = Vec::new();
        for t in &mut d.targets {
            t.reset_rtt();
            t.wreset();
            if let Some(p) = t.paths.first() {
                queries.push((p.iface, t.mac));
            }
        }
        let up = d.life == Life::Up;
        for (iface, mac) in queries {
            self.queue_config_query(now, iface, mac, dev);
        }
        if up {
            self.queue_identify(now, dev);
        }
        Ok(())
    }

    /// Removes devices, like writing to `/dev/etherd/flush` (`aoedev_flush`): "all", the
    /// named ones, or (empty write) those that are down. Open devices are skipped, as the
    /// driver skips busy ones. Outstanding I/O of a removed device fails with
    /// [`IoError::Removed`]. Returns the devices removed.
    pub fn flush_devices(&mut self, which: FlushWhich) -> Vec<TargetAddr> {
        let chosen: Vec<TargetAddr> = self
            .devices
            .values()
            .filter(|d| match &which {
                FlushWhich::All => true,
                FlushWhich::Down => d.life != Life::Up,
                FlushWhich::Named(names) => names.contains(&d.addr),
            })
            .map(|d| d.addr)
            .collect();
        let mut removed = Vec::new();
        for addr in chosen {
            if self.devices.get(&addr).is_some_and(|d| d.open) {
                self.log(format!("{addr}: busy (open), not flushed"));
                continue;
            }
            self.fail_device_io(addr, IoError::Removed);
            self.devices.remove(&addr);
            self.events.push_back(Event::DeviceRemoved(addr));
            removed.push(addr);
        }
        removed
    }

    /// Every known device with its state, paths, windows and counters, in shelf.slot order.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.devices.values().map(|d| self.info(d)).collect()
    }

    /// One device's information.
    pub fn device(&self, dev: TargetAddr) -> Option<DeviceInfo> {
        self.devices.get(&dev).map(|d| self.info(d))
    }

    /// Tells the engine whether the device is open (a front-end holds it), so a down device
    /// shows "down,closewait" and is not flushed. Closing a down device sends it a Query
    /// Config so it can come back (`aoeblk_release`).
    pub fn set_open(&mut self, dev: TargetAddr, open: bool) {
        let Some(d) = self.devices.get_mut(&dev) else {
            return;
        };
        let was = d.open;
        d.open = open;
        if was && !open && d.life == Life::Down {
            let queries: Vec<(usize, MacAddr)> = d
                .targets
                .iter()
                .filter_map(|t| t.paths.first().map(|p| (p.iface, t.mac)))
                .collect();
            let now = self.last_now;
            for (iface, mac) in queries {
                self.queue_config_query(now, iface, mac, dev);
            }
        }
    }

    // ------------------------------------------------------------------ internals

    fn touch(&mut self, now: Instant) {
        if now > self.last_now {
            self.last_now = now;
        }
    }

    fn log(&mut self, line: String) {
        tracing::debug!("{line}");
        self.events.push_back(Event::Log(line));
    }

    /// `newtag`: `(++lasttag & 0x7fff) << 16 | (ticks & 0xffff)`, bit 31 clear, skipping any
    /// tag still outstanding so tags stay unique.
    fn new_tag(&mut self, now: Instant) -> u32 {
        let ticks = now.saturating_duration_since(self.start).as_millis() as u32;
        loop {
            self.lasttag = self.lasttag.wrapping_add(1);
            let tag = ((self.lasttag & 0x7fff) << 16) | (ticks & 0xffff);
            if !self.outstanding.contains_key(&tag) {
                return tag;
            }
        }
    }

    fn queue_config_query(&mut self, now: Instant, iface: usize, dst: MacAddr, addr: TargetAddr) {
        let Some(local) = self.interfaces.get(&iface) else {
            return;
        };
        let src = local.mac;
        let tag = self.new_tag(now);
        let msg = Message {
            header: HeaderRepr::request(dst, src, addr, Command::QueryConfig, Tag(tag)),
            body: Body::Config(ConfigRepr::request(ConfigCommand::Read, b"")),
        };
        if let Ok(v) = msg.to_vec() {
            self.transmit.push_back((iface, v));
        }
    }

    /// `aoecmd_cfg_rsp`: records the target MAC and the path, sizes the window and payload,
    /// and IDENTIFYs a new or down device.
    fn config_response(
        &mut self,
        now: Instant,
        iface: usize,
        h: &HeaderRepr,
        cfg: &ConfigRepr<'_>,
    ) {
        if h.target.is_wildcard() {
            self.stats.wildcard_rejected += 1;
            self.log(format!(
                "{}: config response claims wildcard shelf {} slot {}, rejected",
                h.src, h.target.shelf, h.target.slot
            ));
            return;
        }
        if let Some(e) = h.error {
            self.log(format!("{}: config error from {}: {e}", h.target, h.src));
            return;
        }
        if h.target.shelf == 0xfff {
            self.log(format!(
                "{}: shelf 0xfff from {}: check shelf dip switches",
                h.target, h.src
            ));
        }
        let Some(mtu) = self.interfaces.get(&iface).map(|i| i.mtu) else {
            return;
        };
        let maxout = self.cfg.maxout;
        let d = self
            .devices
            .entry(h.target)
            .or_insert_with(|| Device::new(h.target));
        d.firmware_version = cfg.firmware_version;
        d.config = cfg.config.to_vec();
        let ti = match d.target_idx(h.src) {
            Some(i) => i,
            None => {
                d.targets.push(Target::new(h.src));
                d.targets.len() - 1
            }
        };
        let t = &mut d.targets[ti];
        let nframes = cfg.buffer_count.clamp(1, maxout);
        let fresh = t.buffer_count == 0 && t.paths.is_empty();
        t.buffer_count = cfg.buffer_count;
        t.sector_count = cfg.sector_count;
        if t.nframes != nframes || fresh {
            t.nframes = nframes;
            t.wreset();
        }
        let sectors = path_sectors(max_sectors_for_mtu(mtu), cfg.sector_count);
        for p in &mut t.paths {
            p.sectors = path_sectors(
                max_sectors_for_mtu(self.interfaces.get(&p.iface).map_or(0, |i| i.mtu)),
                cfg.sector_count,
            );
        }
        let npaths = t.paths.len();
        match t.paths.iter().position(|p| p.iface == iface) {
            Some(i) => t.paths[i].lost = 0,
            // A path whose MTU cannot carry one sector is useless.
            None if sectors > 0 && npaths < MAX_PATHS_PER_TARGET => t.paths.push(Path {
                iface,
                sectors,
                lost: 0,
            }),
            None => {}
        }
        let log = d.recompute_payload();
        let identify = d.life == Life::Down && d.payload > 0;
        if identify {
            d.life = Life::Identifying;
        }
        if let Some(l) = log {
            self.log(l);
        }
        if identify {
            self.queue_identify(now, h.target);
        }
    }

    /// Queues IDENTIFY DEVICE (scnt 1) at the head of the device's queue.
    fn queue_identify(&mut self, now: Instant, dev: TargetAddr) {
        let pending = self
            .ops
            .values()
            .any(|o| o.dev == dev && matches!(o.kind, OpKind::Identify));
        if !pending {
            self.new_op(dev, OpKind::Identify, 0, 1, true);
        }
        self.pump(now, dev);
    }

    fn new_op(
        &mut self,
        dev: TargetAddr,
        kind: OpKind,
        lba: u64,
        sectors: u64,
        front: bool,
    ) -> u64 {
        let id = self.next_op;
        self.next_op += 1;
        self.ops.insert(
            id,
            Op {
                dev,
                kind,
                lba,
                sectors,
                issued: 0,
                reissue: Vec::new(),
                frames_out: 0,
            },
        );
        if let Some(d) = self.devices.get_mut(&dev) {
            if front {
                d.queue.push_front(id);
            } else {
                d.queue.push_back(id);
            }
        }
        id
    }

    /// Sends queued frames while some target's window has room.
    fn pump(&mut self, now: Instant, addr: TargetAddr) {
        loop {
            let Some(d) = self.devices.get_mut(&addr) else {
                return;
            };
            if d.life == Life::Down || d.payload == 0 {
                return;
            }
            let Some(&op_id) = d.queue.front() else {
                return;
            };
            let Some(op) = self.ops.get_mut(&op_id) else {
                d.queue.pop_front();
                continue;
            };
            if d.life == Life::Identifying && !matches!(op.kind, OpKind::Identify) {
                return;
            }
            let Some(ti) = d.pick_target() else {
                return;
            };
            let payload = d.payload as u64;
            // (offset within the op, sector count)
            let (offset, count) = match (op.reissue.last_mut(), &op.kind) {
                (Some(r), _) => {
                    let n = r.1.min(payload);
                    let offset = r.0;
                    *r = (r.0 + n, r.1 - n);
                    if r.1 == 0 {
                        op.reissue.pop();
                    }
                    (offset, n as u8)
                }
                (None, OpKind::Read(_) | OpKind::Write(_)) => {
                    let n = (op.sectors - op.issued).min(payload);
                    op.issued += n;
                    (op.issued - n, n as u8)
                }
                // IDENTIFY returns one sector; FLUSH CACHE moves none.
                (None, OpKind::Identify | OpKind::Probe) => {
                    op.issued = op.sectors;
                    (0, 1)
                }
                (None, OpKind::Flush) => {
                    op.issued = op.sectors;
                    (0, 0)
                }
            };
            op.frames_out += 1;
            if !op.unsent() {
                d.queue.pop_front();
            }
            self.send_new(now, addr, op_id, ti, offset, count);
        }
    }

    /// Sends one new frame of `op` to target `ti`.
    fn send_new(
        &mut self,
        now: Instant,
        addr: TargetAddr,
        op: u64,
        ti: usize,
        offset: u64,
        count: u8,
    ) {
        let tag = self.new_tag(now);
        let Some(d) = self.devices.get_mut(&addr) else {
            return;
        };
        let t = &mut d.targets[ti];
        t.nout += 1;
        t.max_nout = t.max_nout.max(t.nout);
        let rto = t.rto(&self.cfg);
        let iface = t.paths[t.next_path % t.paths.len()].iface;
        t.next_path = t.next_path.wrapping_add(1);
        let f = Outstanding {
            dev: addr,
            op,
            target: t.mac,
            iface,
            offset,
            count,
            sent: now,
            first_sent: now,
            deadline: self.deadline(now, now, rto),
            retransmits: 0,
        };
        self.emit_frame(tag, &f);
        self.outstanding.insert(tag, f);
    }

    fn deadline(&self, now: Instant, first_sent: Instant, rto: Duration) -> Instant {
        let d = now + rto;
        if self.cfg.deadsecs.is_zero() {
            d
        } else {
            d.min((first_sent + self.cfg.deadsecs).max(now))
        }
    }

    /// Builds the ATA request for frame `f` under `tag` and queues it.
    fn emit_frame(&mut self, tag: u32, f: &Outstanding) {
        let (Some(d), Some(op), Some(local)) = (
            self.devices.get_mut(&f.dev),
            self.ops.get(&f.op),
            self.interfaces.get(&f.iface),
        ) else {
            return;
        };
        let lba = op.lba + f.offset;
        let (cmd, aflags, data): (AtaCommand, AtaFlags, &[u8]) = match &op.kind {
            OpKind::Read(_) | OpKind::Probe => (
                if d.lba48 {
                    AtaCommand::ReadSectorsExt
                } else {
                    AtaCommand::ReadSectors
                },
                AtaFlags::empty(),
                &[],
            ),
            OpKind::Write(buf) => {
                let s = f.offset as usize * SECTOR_SIZE;
                let e = s + f.count as usize * SECTOR_SIZE;
                (
                    if d.lba48 {
                        AtaCommand::WriteSectorsExt
                    } else {
                        AtaCommand::WriteSectors
                    },
                    AtaFlags::WRITE,
                    buf.get(s..e).unwrap_or(&[]),
                )
            }
            // libata's choice (`ata_id_has_flush_ext`): FLUSH CACHE EXT only when IDENTIFY
            // word 83 bit 13 advertises it, not merely because the device is LBA48. vblade
            // advertises LBA48 and FLUSH CACHE (word 83 = 0x5400) but aborts 0xEA.
            OpKind::Flush => (
                if d.identify.as_ref().is_some_and(|i| i.flush_cache_ext) {
                    AtaCommand::FlushCacheExt
                } else {
                    AtaCommand::FlushCache
                },
                AtaFlags::empty(),
                &[],
            ),
            OpKind::Identify => (AtaCommand::IdentifyDevice, AtaFlags::empty(), &[]),
        };
        let data_cmd = matches!(op.kind, OpKind::Read(_) | OpKind::Write(_) | OpKind::Probe);
        let lba = if data_cmd { lba } else { 0 };
        let (aflags, lba_field) = match op.kind {
            // `ata_id`: lba3 = 0xa0 (device register, LBA bit clear).
            OpKind::Identify => (aflags, 0xa0u64 << 24),
            _ if d.lba48 => (aflags | AtaFlags::EXTENDED, lba),
            // `put_lba` for LBA28: lba3 = (lba3 & 0x0f) | 0xe0.
            _ => (aflags, (lba & 0x0fff_ffff) | (0xe0 << 24)),
        };
        let msg = Message {
            header: HeaderRepr::request(f.target, local.mac, f.dev, Command::Ata, Tag(tag)),
            body: Body::Ata(AtaRepr {
                aflags,
                err_feature: 0,
                sector_count: f.count,
                cmd_status: u8::from(cmd),
                lba: lba_field,
                data,
            }),
        };
        if let Ok(v) = msg.to_vec() {
            d.stats.frames_sent += 1;
            self.transmit.push_back((f.iface, v));
        }
    }

    /// A response to an ATA request (`aoecmd_ata_rsp`, `ktiocomplete`).
    fn ata_response(&mut self, now: Instant, iface: usize, h: &HeaderRepr, ata: &AtaRepr<'_>) {
        let Some(f) = self.outstanding.get(&h.tag.0) else {
            match self.devices.get_mut(&h.target) {
                Some(d) => d.stats.unexpected_responses += 1,
                None => self.stats.unknown_device += 1,
            }
            self.log(format!(
                "unexpected rsp {} tag={:08x} from {} on if {iface} (late or duplicate)",
                h.target, h.tag.0, h.src
            ));
            return;
        };
        let f = f.clone();
        let is_read = self
            .ops
            .get(&f.op)
            .map(|o| match o.kind {
                OpKind::Read(_) | OpKind::Probe => f.count as usize * SECTOR_SIZE,
                OpKind::Identify => aoe_wire::identify::IDENTIFY_LEN,
                _ => 0,
            })
            .unwrap_or(0);
        let failed = h.error.is_some() || ata.cmd_status & status::FAILURE_MASK != 0;
        if h.src != f.target || h.target != f.dev || (!failed && ata.data.len() < is_read) {
            if let Some(d) = self.devices.get_mut(&f.dev) {
                d.stats.bad_responses += 1;
            }
            self.log(format!(
                "bad rsp {} tag={:08x} from {}: expected {} from {}{}",
                h.target,
                h.tag.0,
                h.src,
                f.dev,
                f.target,
                if ata.data.len() < is_read {
                    " (short data)"
                } else {
                    ""
                }
            ));
            return;
        }
        self.outstanding.remove(&h.tag.0);
        let addr = f.dev;
        if let Some(d) = self.devices.get_mut(&addr) {
            if let Some(ti) = d.target_idx(f.target) {
                let t = &mut d.targets[ti];
                t.on_answer(now.saturating_duration_since(f.sent));
                t.nout = t.nout.saturating_sub(1);
                t.answers += 1;
                t.silent = 0;
                if t.taint > 0 {
                    t.taint /= 2;
                }
                if let Some(p) = t.paths.iter_mut().find(|p| p.iface == f.iface) {
                    p.lost = 0;
                }
            }
            if h.error.is_some() {
                d.stats.aoe_errors += 1;
            } else if failed {
                d.stats.ata_errors += 1;
            }
        }
        // A data frame sized before the MTU shrank, refused by a target that now checks its
        // sector count against the smaller MTU (`aoe serve` aborts it): a size problem, not
        // a media error. Its sectors go out again in frames that fit.
        let data_op = self
            .ops
            .get(&f.op)
            .is_some_and(|o| matches!(o.kind, OpKind::Read(_) | OpKind::Write(_)));
        let payload = self.devices.get(&addr).map_or(0, |d| d.payload);
        if failed && data_op && f.count > payload && payload > 0 {
            if let Some(op) = self.ops.get_mut(&f.op) {
                op.frames_out = op.frames_out.saturating_sub(1);
            }
            self.reissue(addr, f.op, f.offset, f.count as u64);
            self.log(format!(
                "{addr}: {}-sector frame tag {:08x} refused after the payload shrank to {payload}; resent in new frames",
                f.count, h.tag.0
            ));
            self.pump(now, addr);
            return;
        }
        let result = match h.error {
            Some(code) => Err(IoError::Aoe(code)),
            None if failed => Err(IoError::Ata {
                status: ata.cmd_status,
                error: ata.err_feature,
            }),
            None => Ok(()),
        };
        self.frame_done(now, &f, result, ata.data);
        self.pump(now, addr);
    }

    /// Applies one frame's outcome to its operation.
    fn frame_done(
        &mut self,
        now: Instant,
        f: &Outstanding,
        result: Result<(), IoError>,
        data: &[u8],
    ) {
        let Some(op) = self.ops.get_mut(&f.op) else {
            return; // the op already failed; this was an orphan
        };
        op.frames_out = op.frames_out.saturating_sub(1);
        if let Err(e) = result {
            match op.kind {
                OpKind::Identify => {
                    self.ops.remove(&f.op);
                    self.identify_failed(f.dev, &format!("IDENTIFY failed: {e}"));
                }
                OpKind::Probe => {
                    self.ops.remove(&f.op);
                }
                _ => {
                    self.log(format!("{}: I/O error: {e}", f.dev));
                    self.finish_op(f.op, Err(e));
                }
            }
            return;
        }
        match &mut op.kind {
            OpKind::Read(buf) => {
                let s = f.offset as usize * SECTOR_SIZE;
                let n = f.count as usize * SECTOR_SIZE;
                if let (Some(dst), Some(src)) = (buf.get_mut(s..s + n), data.get(..n)) {
                    dst.copy_from_slice(src);
                }
            }
            OpKind::Identify => {
                self.ops.remove(&f.op);
                self.identify_done(now, f.dev, data);
                return;
            }
            OpKind::Probe => {
                self.ops.remove(&f.op);
                return;
            }
            OpKind::Write(_) | OpKind::Flush => {}
        }
        if op.frames_out == 0 && !op.unsent() {
            self.finish_op(f.op, Ok(()));
        }
    }

    /// Completes a user operation: removes it (and its unsent rest) and reports it.
    fn finish_op(&mut self, id: u64, result: Result<(), IoError>) {
        let Some(op) = self.ops.remove(&id) else {
            return;
        };
        if let Some(d) = self.devices.get_mut(&op.dev) {
            d.queue.retain(|q| *q != id);
            match result {
                Ok(()) => d.stats.ops_ok += 1,
                Err(_) => d.stats.ops_failed += 1,
            }
        }
        if op.kind.internal() {
            return;
        }
        let result = result.map(|()| match op.kind {
            OpKind::Read(buf) => Some(buf),
            _ => None,
        });
        self.events.push_back(Event::Completed {
            id: IoId(id),
            result,
        });
    }

    /// `ataid_complete`: capacity and LBA48 from the page; up (or resized).
    fn identify_done(&mut self, now: Instant, addr: TargetAddr, page: &[u8]) {
        let info = match Identify::parse(page) {
            Ok(i) => i,
            Err(e) => {
                self.identify_failed(addr, &format!("bad IDENTIFY page: {e}"));
                return;
            }
        };
        let Some(d) = self.devices.get_mut(&addr) else {
            return;
        };
        let old = d.sectors;
        let new = info.sectors();
        d.sectors = new;
        d.lba48 = info.lba48;
        d.identify = Some(info);
        let mac = d.targets.first().map(|t| t.mac).unwrap_or_default();
        let fw = d.firmware_version;
        match d.life {
            Life::Identifying => {
                d.life = Life::Up;
                self.log(format!("{mac} {addr} v{fw:x} has {new} sectors"));
                self.log(format!("{addr} up"));
                self.events.push_back(Event::DeviceUp(addr));
                if old != 0 && old != new {
                    self.events.push_back(Event::DeviceResized {
                        dev: addr,
                        old_sectors: old,
                        new_sectors: new,
                    });
                }
            }
            Life::Up if old != new => {
                self.log(format!("{addr}: size changed from {old} to {new} sectors"));
                self.events.push_back(Event::DeviceResized {
                    dev: addr,
                    old_sectors: old,
                    new_sectors: new,
                });
            }
            _ => {}
        }
        self.pump(now, addr);
    }

    fn identify_failed(&mut self, addr: TargetAddr, why: &str) {
        let Some(d) = self.devices.get_mut(&addr) else {
            return;
        };
        match d.life {
            Life::Identifying => {
                d.life = Life::Down;
                self.log(format!("{addr}: {why}"));
            }
            Life::Up => self.log(format!("{addr}: revalidate: {why}")),
            Life::Down => {}
        }
    }

    /// `rexmit_timer` for one frame: dead device after `deadsecs`, else a fresh tag on the
    /// next path, with window collapse, scorn and path ejection as the driver does.
    fn frame_timed_out(&mut self, now: Instant, tag: u32) {
        let Some(f) = self.outstanding.get(&tag).cloned() else {
            return;
        };
        let addr = f.dev;
        let probe = self
            .ops
            .get(&f.op)
            .is_some_and(|o| matches!(o.kind, OpKind::Probe));
        if probe || !self.ops.contains_key(&f.op) || !self.devices.contains_key(&addr) {
            // An orphan of a failed op, or an unanswered probe (the next timer run sends
            // another): give the window slot back, never retransmit.
            self.outstanding.remove(&tag);
            if probe {
                self.ops.remove(&f.op);
            }
            self.release_slot(&f);
            return;
        }
        let waited = now.saturating_duration_since(f.first_sent);
        if !self.cfg.deadsecs.is_zero() && waited >= self.cfg.deadsecs {
            let identifying = self
                .devices
                .get(&addr)
                .is_some_and(|d| d.life == Life::Identifying);
            if identifying {
                self.outstanding.remove(&tag);
                self.release_slot(&f);
                self.ops.remove(&f.op);
                self.identify_failed(addr, "IDENTIFY unanswered");
                return;
            }
            self.device_down(
                addr,
                &format!("tag {tag:08x} unanswered for {} s", waited.as_secs()),
            );
            return;
        }
        let cfg = self.cfg.clone();
        let Some(d) = self.devices.get_mut(&addr) else {
            return;
        };
        let ntargets = d.targets.iter().filter(|t| t.usable()).count().max(1) as u32;
        let mut logs = Vec::new();
        let Some(old_ti) = d.target_idx(f.target) else {
            self.outstanding.remove(&tag);
            return;
        };
        {
            let t = &mut d.targets[old_ti];
            t.on_timeout();
            t.retransmits += 1;
            let scorn_at = if cfg.deadsecs.is_zero() {
                cfg.scorn_after
            } else {
                cfg.scorn_after.min(cfg.deadsecs / ntargets)
            };
            // The driver scorns only after `deadsecs / targets` (or 10 s) of waiting; since we
            // move a timed-out frame to another target at once, no frame may wait that long,
            // so a target that let `nframes` timeouts pass without one answer is scorned too.
            t.silent += 1;
            if ntargets > 1 && (waited > scorn_at || t.silent >= t.nframes as u32) {
                t.scorn();
                t.silent = 0;
                logs.push(format!("{addr}: target {} tainted ({})", t.mac, t.taint));
            }
            let nframes = t.nframes as u32;
            let npaths = t.paths.len();
            if let Some(pi) = t.paths.iter().position(|p| p.iface == f.iface) {
                t.paths[pi].lost += 1;
                if t.paths[pi].lost > 2 * nframes && npaths > 1 {
                    let p = t.paths.remove(pi);
                    logs.push(format!(
                        "{addr}: ejecting if {} from target {} after {} losses",
                        p.iface, t.mac, p.lost
                    ));
                }
            }
        }
        // The next path: another target with room (untainted unless all are), else the
        // same target's next interface (`resend` -> `ifrotate`, `reassign_frame`).
        let n = d.targets.len();
        let all_tainted = d.targets.iter().filter(|t| t.usable()).all(|t| t.taint > 0);
        let mut new_ti = old_ti;
        for k in 1..n {
            let i = (old_ti + k) % n;
            let t = &d.targets[i];
            if t.usable() && t.nout < t.nframes && (t.taint == 0 || all_tainted) {
                new_ti = i;
                break;
            }
        }
        if !d.targets[new_ti].usable() {
            for l in logs {
                self.log(l);
            }
            self.device_down(addr, "no path left");
            return;
        }
        if new_ti != old_ti {
            d.targets[old_ti].nout = d.targets[old_ti].nout.saturating_sub(1);
            let t = &mut d.targets[new_ti];
            t.nout += 1;
            t.max_nout = t.max_nout.max(t.nout);
        }
        let t = &mut d.targets[new_ti];
        let path = &t.paths[t.next_path % t.paths.len()];
        let (iface, path_sectors) = (path.iface, path.sectors);
        t.next_path = t.next_path.wrapping_add(1);
        let rto = backoff(t.rto(&cfg), f.retransmits + 1, cfg.rto_max);
        let mac = t.mac;
        d.stats.retransmits += 1;
        self.outstanding.remove(&tag);
        let newtag = self.new_tag(now);
        let src = self
            .interfaces
            .get(&iface)
            .map(|i| i.mac)
            .unwrap_or_default();
        let mut nf = Outstanding {
            target: mac,
            iface,
            sent: now,
            deadline: self.deadline(now, f.first_sent, rto),
            retransmits: f.retransmits + 1,
            ..f
        };
        // The path's MTU shrank since the frame was sized (or it moves to a path with a
        // smaller one): resent whole, neither the request (a write) nor the answer (a read)
        // would fit, and it would time out for ever. Keep what fits; the rest goes back to
        // the op and out in new frames as the window allows. (The Linux driver resends the
        // frame unchanged.)
        if nf.count > path_sectors {
            let rest = (nf.count - path_sectors) as u64;
            self.reissue(addr, f.op, nf.offset + path_sectors as u64, rest);
            nf.count = path_sectors;
            logs.push(format!(
                "{addr}: {rest} sectors of tag {tag:08x} resent in new frames ({path_sectors} fit if {iface})"
            ));
        }
        for l in logs {
            self.log(l);
        }
        let nout = self
            .devices
            .get(&addr)
            .map_or(0, |d| d.targets[new_ti].nout);
        self.log(format!(
            "retransmit {addr} oldtag={tag:08x} newtag={newtag:08x} s={src} d={mac} nout={nout}"
        ));
        self.emit_frame(newtag, &nf);
        self.outstanding.insert(newtag, nf);
    }

    /// Hands sectors `offset..offset + sectors` of op `id` back to be sent again in frames
    /// of the device's current payload, ahead of the ops queued behind it.
    fn reissue(&mut self, addr: TargetAddr, id: u64, offset: u64, sectors: u64) {
        if let Some(op) = self.ops.get_mut(&id) {
            op.reissue.push((offset, sectors));
        }
        if let Some(d) = self.devices.get_mut(&addr) {
            if !d.queue.contains(&id) {
                d.queue.push_front(id);
            }
        }
    }

    fn release_slot(&mut self, f: &Outstanding) {
        if let Some(d) = self.devices.get_mut(&f.dev) {
            if let Some(ti) = d.target_idx(f.target) {
                d.targets[ti].nout = d.targets[ti].nout.saturating_sub(1);
            }
        }
    }

    /// `probe`: a one-sector read to each tainted target with nothing outstanding; every
    /// answer halves the taint (the driver decrements it; halving recovers a path that came
    /// back within a few answers instead of up to 1000).
    fn probe_tainted(&mut self, now: Instant) {
        let mut probes = Vec::new();
        for d in self.devices.values() {
            if d.life != Life::Up || d.sectors == 0 {
                continue;
            }
            for (ti, t) in d.targets.iter().enumerate() {
                if t.taint > 0 && t.nout == 0 && t.usable() {
                    probes.push((d.addr, ti));
                }
            }
        }
        for (addr, ti) in probes {
            let id = self.next_op;
            self.next_op += 1;
            self.ops.insert(
                id,
                Op {
                    dev: addr,
                    kind: OpKind::Probe,
                    lba: 0,
                    sectors: 1,
                    issued: 1,
                    reissue: Vec::new(),
                    frames_out: 1,
                },
            );
            self.send_new(now, addr, id, ti, 0, 1);
        }
    }

    /// `aoedev_downdev`: the device is down; all its I/O fails at once.
    fn device_down(&mut self, addr: TargetAddr, why: &str) {
        let Some(d) = self.devices.get_mut(&addr) else {
            return;
        };
        let was_up = d.life == Life::Up;
        d.life = Life::Down;
        for t in &mut d.targets {
            t.wreset();
            t.taint = 0;
        }
        self.log(format!("{addr} down: {why}"));
        self.fail_device_io(addr, IoError::DeviceDown);
        if was_up {
            self.events.push_back(Event::DeviceDown(addr));
        }
    }

    /// Drops every outstanding frame and queued op of `addr`, failing user ops with `err`.
    fn fail_device_io(&mut self, addr: TargetAddr, err: IoError) {
        self.outstanding.retain(|_, f| f.dev != addr);
        if let Some(d) = self.devices.get_mut(&addr) {
            d.queue.clear();
            for t in &mut d.targets {
                t.nout = 0;
            }
        }
        let ids: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, o)| o.dev == addr)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.finish_op(id, Err(err.clone()));
        }
    }

    fn info(&self, d: &Device) -> DeviceInfo {
        let name = |i: usize| {
            self.interfaces
                .get(&i)
                .map_or_else(|| format!("if{i}"), |f| f.name.clone())
        };
        let mut interfaces: Vec<String> = Vec::new();
        let targets = d
            .targets
            .iter()
            .map(|t| {
                let names: Vec<String> = t.paths.iter().map(|p| name(p.iface)).collect();
                for n in &names {
                    if !interfaces.contains(n) {
                        interfaces.push(n.clone());
                    }
                }
                TargetInfo {
                    mac: t.mac,
                    interfaces: names,
                    buffer_count: t.buffer_count,
                    nframes: t.nframes,
                    maxout: t.maxout,
                    ssthresh: t.ssthresh,
                    nout: t.nout,
                    max_nout: t.max_nout,
                    taint: t.taint,
                    rtt_avg: Duration::from_micros(t.rtt_avg_us),
                    rtt_dev: Duration::from_micros(t.rtt_dev_us),
                    rto: t.rto(&self.cfg),
                    retransmits: t.retransmits,
                    answers: t.answers,
                }
            })
            .collect();
        DeviceInfo {
            addr: d.addr,
            state: d.state(),
            sectors: d.sectors,
            identify: d.identify.clone(),
            firmware_version: d.firmware_version,
            config: d.config.clone(),
            payload: d.payload as usize * SECTOR_SIZE,
            targets,
            interfaces,
            open: d.open,
            ops_outstanding: self
                .ops
                .values()
                .filter(|o| o.dev == d.addr && !o.kind.internal())
                .count(),
            stats: d.stats,
        }
    }
}

/// Sectors per frame on a path: `aoecmd_cfg_rsp` takes the MTU bound, capped by the target's
/// sector count, with 1024 bytes when the target says 0.
fn path_sectors(mtu_sectors: u8, target_sectors: u8) -> u8 {
    if target_sectors == 0 {
        mtu_sectors.min(DEFAULT_SECTORS)
    } else {
        mtu_sectors.min(target_sectors)
    }
}

/// `rto * 2^n`, capped.
fn backoff(rto: Duration, n: u32, max: Duration) -> Duration {
    rto.checked_mul(1u32 << n.min(16))
        .unwrap_or(max)
        .min(max.max(rto))
}

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
