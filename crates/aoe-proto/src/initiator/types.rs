//! The engine's public types: configuration, I/O requests and errors, what it emits
//! (frames, events) and what it reports (device and target information, statistics).

use super::*;

/// Tunables. Defaults are the Linux driver's, except loss recovery (`rto_min`,
/// `min_window`, `fast_retransmit`; `docs/PROTOCOL.md` 4, "Loss recovery").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// How long a frame may stay unanswered before its device is declared down
    /// (`aoe_deadsecs`, 180 s). [`Duration::ZERO`] retries forever, as the driver documents.
    pub deadsecs: Duration,
    /// Cap on outstanding frames per target MAC (`aoe_maxout`). The default is 128, what the
    /// driver's admin guide (`Documentation/admin-guide/aoe/aoe.rst`) documents and users
    /// read; the driver's code (`aoecmd.c`) uses 64. A target's buffer count caps it further.
    pub maxout: u16,
    /// Period of the discovery beacon (the driver's `discover_timer`, 60 s). Zero disables it.
    pub discover_interval: Duration,
    /// Lowest retransmission timeout, under the one that follows the target (RFC 6298's
    /// `srtt + 4 * rttvar`, at least `2 * srtt`), so a quiet 100 µs link does not time out
    /// on scheduling noise. The driver's timer ticks every 100 ms (`TIMERTICK`), which acts
    /// as its floor and turns every random loss into a 100 ms stall.
    ///
    /// The default is 500 µs (it was 20 ms). The timer is the backstop: it restarts with
    /// every answer from the frame's target (RFC 6298 5.3), so it fires only once the
    /// target has been silent for a whole timeout; losses among answered frames are found
    /// from the answers to frames sent after them (RACK, [`Config::fast_retransmit`]). A
    /// target that answers some frames in microseconds and others in milliseconds (`aoe
    /// serve`: page cache and worker pool) raises the estimate and RACK's reordering window
    /// through its slow answers, including those of frames copied anyway (the answer to
    /// the earlier copy is a sample of it, and undoes the copy's window cut).
    pub rto_min: Duration,
    /// Highest retransmission timeout, also the cap of the per-frame exponential backoff.
    pub rto_max: Duration,
    /// A frame unanswered this long taints its target, so new frames go to the others
    /// (`HARD_SCORN_SECS`, 10 s; the driver also scorns after `deadsecs / targets`). A
    /// target is also tainted after `nframes` timeouts in a row without an answer.
    pub scorn_after: Duration,
    /// Most devices (shelf.slot) the engine keeps. A config response for a new shelf.slot
    /// beyond it is refused (counted in [`Stats::devices_refused`], one rate-limited log
    /// line), so a flood of config responses for random addresses costs bounded memory and
    /// work. The driver has no such cap but runs out of minor numbers at 65536 devices
    /// (`N_DEVS` in `aoeblk.c`); devices already known are never dropped for a newcomer.
    pub max_devices: usize,
    /// Most target MACs one device keeps (the driver starts with `NTARGETS` = 4 and grows
    /// the table without a bound in `grow_targets`). A config response from a new MAC beyond
    /// it is refused ([`Stats::targets_refused`], one rate-limited log line).
    pub max_targets: usize,
    /// At most one line per kind per this interval for what a peer can provoke (bad frames,
    /// unexpected responses, refused devices), with the count suppressed in between, like
    /// the driver's `pr_info_ratelimited`. Zero logs every line.
    pub peer_log_interval: Duration,
    /// The window of a target never shrinks below this many frames (or its `nframes`, if
    /// smaller) for a loss. It is halved at most once per loss episode, and only for signs
    /// of congestion (a timeout, or over a quarter of the window lost), and grows back by one
    /// frame per window. The driver sets it to 1 on every timeout.
    pub min_window: u16,
    /// An outstanding frame is presumed lost once this many frames sent after it to the
    /// same target MAC were answered and it has been out as long as the latest of them took
    /// plus RACK's reordering window (RFC 8985 6.2; `Target::reo_wnd`): its copy goes out
    /// then, without waiting for the timer. 1 is RACK's rule; RFC 5681 3.2's duplicate-ACK
    /// threshold would be 3. 0 turns it off. The driver waits for the timer.
    pub fast_retransmit: u16,
    /// Hold a write back while a copy of an earlier write to any of its sectors may still
    /// reach the target (`Engine::fences`: sent, and neither answered nor out for max(1 s,
    /// RTO)), so a delayed original whose retransmitted copy completed its write cannot
    /// land on top of a newer write. On by default; the Linux driver has no such fence.
    /// Overlapping writes then go one after another, each waiting up to a second for a
    /// lost copy of the one before. Off only for tests that show the hazard. The target's
    /// duplicate-write table covers network duplicates (same tag) either way.
    pub fence_writes: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            deadsecs: Duration::from_secs(180),
            maxout: 128,
            discover_interval: Duration::from_secs(60),
            rto_min: Duration::from_micros(500),
            rto_max: Duration::from_secs(5),
            scorn_after: Duration::from_secs(10),
            max_devices: 256,
            max_targets: 16,
            peer_log_interval: Duration::from_secs(1),
            min_window: 8,
            fast_retransmit: 1,
            fence_writes: true,
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

/// Who submitted a [`BlockOp`]: an NBD connection, an open device file, a control path. A
/// device's queued ops are served in turn among their sources, 256 KiB at a time, each
/// source's own in the order submitted ([`Engine::submit_from`]); one source's backlog
/// does not hold up another's next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SourceId(pub u32);

impl SourceId {
    /// What [`Engine::submit`] submits from.
    pub const DEFAULT: SourceId = SourceId(0);
    /// The engine's own commands (IDENTIFY).
    pub const ENGINE: SourceId = SourceId(u32::MAX);
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
    /// Like [`BlockOp::Read`], into the caller's buffer (its capacity at least `sectors` x
    /// 512 bytes), filled where it is: it completes with that buffer (its block unmoved),
    /// and on failure the buffer goes home ([`Lent`]). For an owner that must get that
    /// very buffer back (a FUSE-over-io_uring entry's payload, registered with the kernel).
    ReadInto {
        /// First sector.
        lba: u64,
        /// Sectors to read (at least 1).
        sectors: u32,
        /// Where the bytes go.
        buf: Lent,
    },
    /// Like [`BlockOp::Write`], with data lent by its owner ([`Lent`]): the engine gives the
    /// buffer back once it and every frame carrying it are done with it, so an owner that
    /// must get that very buffer back (a FUSE-over-io_uring entry's payload, registered
    /// with the kernel) hands it over without a copy.
    WriteLent {
        /// First sector.
        lba: u64,
        /// The data.
        data: Lent,
    },
    /// Like [`BlockOp::Read`], leaving each answer's payload where the driver received it
    /// when the driver offers that ([`Engine::handle_held_frame`]): it completes with
    /// [`Event::CompletedHeld`], whose parts name the driver's receive slots, instead of a
    /// copy of every byte into one buffer. Frames handed in with
    /// [`Engine::handle_frame`] (or given up, [`Engine::unhold`]) are copied as for a read.
    ReadHeld {
        /// First sector.
        lba: u64,
        /// Sectors to read (at least 1).
        sectors: u32,
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
    /// A [`BlockOp::ReadInto`] buffer too small for the read.
    #[error("read buffer of {capacity} bytes for {need}")]
    BufferTooSmall {
        /// The buffer's capacity.
        capacity: usize,
        /// Bytes of the read.
        need: usize,
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

/// A frame [`Engine::poll_transmit_parts`] hands over, in two parts sent back to back with
/// one vectored send: `head`, the frame's own bytes (the whole frame, padded, when it
/// carries no write data), and `data`, the sectors a write frame carries, borrowed from
/// the write instead of copied into the frame.
#[derive(Debug, Clone)]
pub struct TxFrame {
    /// Send on this interface (the index given to [`Engine::add_interface`]).
    pub iface: usize,
    /// The Ethernet, AoE and ATA headers (and, without `data`, the rest of the frame).
    pub head: Vec<u8>,
    /// The write data that follows `head` on the wire.
    pub data: Option<TxData>,
}

impl TxFrame {
    /// The data part, empty for a frame without one.
    pub fn data(&self) -> &[u8] {
        self.data.as_ref().map_or(&[], TxData::as_slice)
    }

    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.data().len()
    }

    /// Never true for a frame the engine made (at least 60 bytes).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Write data lent by its owner ([`BlockOp::WriteLent`]): dropped, it hands its buffer to
/// its `home` instead of freeing it (whoever drops the last reference, whenever: after the
/// write completed or failed, when the last frame carrying it was sent). A clone is an
/// ordinary copy of the bytes with no home; equality compares the bytes.
pub struct Lent {
    data: Vec<u8>,
    home: Option<LentHome>,
}

/// Where a [`Lent`] buffer goes when dropped.
pub type LentHome = Box<dyn FnOnce(Vec<u8>) + Send + Sync>;

impl Lent {
    /// `data`, to go to `home` when dropped.
    pub fn new(data: Vec<u8>, home: LentHome) -> Lent {
        Lent {
            data,
            home: Some(home),
        }
    }

    /// `data` with no home: freed when dropped, like an ordinary write's buffer.
    pub fn owned(data: Vec<u8>) -> Lent {
        Lent { data, home: None }
    }

    /// Cuts the bytes to `n` (the buffer itself stays: it goes home whole).
    pub fn truncate(&mut self, n: usize) {
        self.data.truncate(n);
    }

    /// Bytes the buffer holds without growing.
    pub fn capacity(&self) -> usize {
        self.data.capacity()
    }

    /// The buffer and its home, taken apart (the home is not called).
    pub fn into_parts(mut self) -> (Vec<u8>, Option<LentHome>) {
        (std::mem::take(&mut self.data), self.home.take())
    }
}

impl std::ops::Deref for Lent {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            home(std::mem::take(&mut self.data));
        }
    }
}

impl Clone for Lent {
    fn clone(&self) -> Lent {
        Lent::owned(self.data.clone())
    }
}

impl PartialEq for Lent {
    fn eq(&self, other: &Lent) -> bool {
        self.data == other.data
    }
}

impl Eq for Lent {}

impl fmt::Debug for Lent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lent")
            .field("len", &self.data.len())
            .field("lent", &self.home.is_some())
            .finish()
    }
}

/// Sectors of a write one frame carries: a range of the write's buffer, shared with the
/// operation (which keeps it for retransmissions) until the frame is sent.
#[derive(Debug, Clone)]
pub struct TxData {
    pub(super) buf: Arc<Lent>,
    pub(super) start: usize,
    pub(super) end: usize,
}

impl TxData {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or(&[])
    }
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
    /// The IDENTIFY sent by [`Engine::revalidate`] was answered: the size is current, and the
    /// daemon re-reads the partition table (writing `revalidate` is how a partition added on
    /// the target shows up without flush and discover).
    Revalidated(TargetAddr),
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
    /// A [`BlockOp::ReadHeld`] finished: on success its bytes, part in the driver's
    /// receive slots and part copied; every token of it is the driver's to release after
    /// this (and, on failure, in [`Engine::take_released`]).
    CompletedHeld {
        /// What [`Engine::submit`] returned.
        id: IoId,
        /// The outcome.
        result: Result<HeldRead, IoError>,
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
    /// Responses whose tag matched a frame of this device but whose read data was short;
    /// ignored, the frame stays outstanding.
    pub bad_responses: u64,
    /// Responses accepted from a MAC other than the one the frame was sent to (a multi-port
    /// target answering from another port). The driver matches by device and tag only
    /// (`aoecmd_ata_rsp`, `getframe`); so do we, and count them here.
    pub other_mac_responses: u64,
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
    /// Current retransmission timeout: `avg + 4*dev`, at least `2*avg`, within the
    /// configured bounds.
    pub rto: Duration,
    /// Frames sent to this target found lost, by their timer or by later answers. Each is
    /// copied, unless its own answer comes while the copy waits for a window slot or for a
    /// sign that it is due ([`DeviceStats::retransmits`] counts the copies sent).
    pub retransmits: u64,
    /// Of those, sent because later frames were answered first ([`Config::fast_retransmit`]).
    pub fast_retransmits: u64,
    /// Answers that came while a frame sent to this target before them was still
    /// unanswered: frames that left or were answered out of order, or were lost (not
    /// counted for the answer to a copy sent after a silent timeout). On a veth to a target
    /// that answers in order, 0 unless a frame was lost or copied.
    pub overtaking_answers: u64,
    /// Of those, sent as tail loss probes: the target answered nothing for two smoothed
    /// RTTs while nothing more was to go to it (RACK-TLP, RFC 8985 7).
    pub tail_probes: u64,
    /// Times the window was cut for a loss (at most once per loss episode).
    pub window_cuts: u64,
    /// Frames found lost (or their copies sent) that the target answered after all: the
    /// loss was presumed, the frame was late (Eifel detection; each undoes its episode's
    /// window cut). On a lossless link every loss counted is one of these.
    pub spurious: u64,
    /// ATA responses received from this target.
    pub answers: u64,
    /// Whether frames go to it: a MAC that appears for a device already up is asked
    /// IDENTIFY first.
    pub vetting: Vetting,
}

/// Whether a target MAC is a path of its device ([`TargetInfo::vetting`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vetting {
    /// A path: the device's frames go to it.
    Path,
    /// A new MAC of a device up whose IDENTIFY is pending or out.
    Checking,
    /// Its IDENTIFY reported another capacity (`Some`) than the device's, or failed
    /// (`None`): another disk at the same shelf.slot, not used. Asked again at its next
    /// Query Config response.
    OtherDisk(Option<u64>),
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
    /// The config string from the latest Query Config response taken while the device
    /// was not open (as [`DeviceInfo::firmware_version`]).
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
    /// Responses refused because their source MAC is a group (multicast or broadcast)
    /// address: no target sends from one, and requests to it would reach every host.
    pub group_source: u64,
    /// ATA responses for devices the engine does not know.
    pub unknown_device: u64,
    /// Frames dropped by `poll_transmit` because the buffer was too small.
    pub tx_buffer_too_small: u64,
    /// Config responses for a new shelf.slot refused with [`Config::max_devices`] known.
    pub devices_refused: u64,
    /// Config responses from a new target MAC refused with [`Config::max_targets`] known
    /// for that device.
    pub targets_refused: u64,
    /// New target MACs of a device up not taken as paths: their IDENTIFY reported another
    /// capacity than the device's (another disk at the same shelf.slot), or failed.
    pub targets_other_disk: u64,
    /// Target MACs that were not paths (refused as another disk, or silent to their
    /// IDENTIFYs) taken out at [`Config::max_targets`] to admit a new MAC.
    pub targets_forgotten: u64,
    /// Writes held back because a copy of an earlier write to some of their sectors could
    /// still reach the target (each counted once).
    pub writes_fenced: u64,
}

/// A part of a [`BlockOp::ReadHeld`] left in a frame the driver holds: bytes
/// `off..off + len` of the frame it handed in with `token` are the read's bytes at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldPart {
    /// Byte offset in the read.
    pub at: usize,
    /// The driver's token for the frame ([`Engine::handle_held_frame`]).
    pub token: u64,
    /// Offset of the payload in the frame.
    pub off: usize,
    /// Bytes.
    pub len: usize,
}

/// A [`BlockOp::ReadHeld`]'s bytes: `len` of them, the [`HeldPart`]s in frames the driver
/// holds (in order of `at`), the parts given up ([`Engine::unhold`]) copied on their own,
/// and the rest (frames handed in without a token) in `buf` at their own offsets (`buf`
/// is empty when there are none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeldRead {
    /// Bytes of the read.
    pub len: usize,
    /// The parts in held frames, sorted by `at`.
    pub parts: Vec<HeldPart>,
    /// Parts given up by the driver: (offset in the read, bytes).
    pub copies: Vec<(usize, Vec<u8>)>,
    /// The bytes of frames handed in without a token, at their offsets in the read (`len`
    /// long, or empty).
    pub buf: Vec<u8>,
}

impl HeldRead {
    /// Takes the part kept in the frame handed in with `token` out of the held parts and
    /// copies its bytes from `frame` (that frame's bytes) into `copies`: a copy of its own,
    /// since placed into a read-sized buffer it would cost zeroing the buffer up to it and
    /// past it. None if no part has that token; Some(false) if the part does not lie inside
    /// `frame` (it is taken out all the same: its bytes are lost).
    pub(crate) fn copy_out(&mut self, token: u64, frame: &[u8]) -> Option<bool> {
        let i = self.parts.iter().position(|p| p.token == token)?;
        let p = self.parts.remove(i);
        let src = frame.get(p.off..p.off + p.len);
        if let Some(src) = src {
            self.copies.push((p.at, src.to_vec()));
        }
        Some(src.is_some())
    }

    /// The read's bytes in order, as slices of the held frames, which `frame(token)` gives
    /// (the whole frame handed in with that token), of the copies and of `buf`; None if a
    /// token has no frame, a part lies outside its frame, or a byte is in none of them.
    pub fn pieces<'a>(&'a self, frame: impl Fn(u64) -> Option<&'a [u8]>) -> Option<Vec<&'a [u8]>> {
        let mut items: Vec<(usize, &'a [u8])> =
            Vec::with_capacity(self.parts.len() + self.copies.len());
        for part in &self.parts {
            let f = frame(part.token)?;
            items.push((part.at, f.get(part.off..part.off + part.len)?));
        }
        if !self.copies.is_empty() {
            items.extend(self.copies.iter().map(|(at, c)| (*at, c.as_slice())));
            items.sort_by_key(|i| i.0);
        }
        let mut out = Vec::with_capacity(items.len() * 2 + 1);
        let mut p = 0;
        for (at, bytes) in items {
            if at < p {
                return None;
            }
            if at > p {
                out.push(self.buf.get(p..at)?);
            }
            out.push(bytes);
            p = at + bytes.len();
        }
        if p < self.len {
            out.push(self.buf.get(p..self.len)?);
        }
        Some(out)
    }
}

/// A hasher for the numbers a daemon and the engine choose themselves and count up one by
/// one (receive-slot tokens, [`IoId`]s): one multiplication by an odd constant (Fibonacci
/// hashing), which spreads consecutive numbers over the low bits a hash table indexes by
/// and mixes the high bits its control bytes use. SipHash, the default, defends against
/// keys an attacker chooses; these keys nobody outside chooses, and at a map lookup or two
/// per frame its cost showed in the initiator's profile (about 3% of the network thread's
/// samples on NBD reads at MTU 9000). Not for keys a peer can pick: a MAC, a tag.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountedHasher(u64);

impl CountedHasher {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
}

impl std::hash::Hasher for CountedHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(Self::K);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(32) ^ n).wrapping_mul(Self::K);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` keyed by numbers counted up by their owner ([`CountedHasher`]).
pub type CountedMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<CountedHasher>>;
