//! The target engine: one exported device (shelf.slot) as a deterministic state machine.
//!
//! The driver hands every received frame to [`Engine::handle_frame`] together with a reply
//! buffer. The engine either ignores the frame, writes a complete reply into the buffer, or
//! asks for disk I/O with an [`IoRequest`] carrying a token. The driver performs the I/O
//! (reading straight into the reply buffer after the 36-byte ATA header, so read data is
//! never copied) and calls [`Engine::complete`] with the token and the result; the engine then
//! writes the reply header in front of the data.
//!
//! Behaviour follows AoEr11 as `docs/PROTOCOL.md` (sections 1.1-1.6, and 4) describes it:
//! - Query Config CCmd 0-4; test/prefix stay silent on a mismatch; set on a non-empty string
//!   gets error 4 unless it is the stored string (vblade `confcmd`, ggaoed: a retried set
//!   succeeds); the sector count follows the receiving interface's MTU. Deliberate
//!   departure: at most [`QUERY_ANSWERS_PER_SOURCE`] queries per source MAC are answered
//!   per period ([`Engine::next_query_period`]; vblade answers all), so a query flood
//!   cannot keep the target from serving ATA requests. Another: a set longer than a reply
//!   on the export's smallest-MTU interface carries gets error 2
//!   ([`Engine::config_capacity`]; vblade stores it and then cannot answer there).
//! - Mac Mask List read/edit as vblade `aoemask`: MError with the failing directive's index,
//!   DCmd 0 in listed entries, error 2 for an unknown MCmd, the list capped at one reply frame
//!   ([`Engine::mask_capacity`]); a non-empty list silently drops other sources. Departure:
//!   an add of a group MAC fails with MError 1 (vblade adds it and then answers nobody).
//! - Reserve/Release read/set/force set. A non-reserving MAC gets error 6 for ATA commands
//!   other than IDENTIFY (vblade `aoeata`) and for Reserve/Release set (vblade `aoesrr`), as
//!   vblade and ggaoed do. Deliberate extension: it also gets error 6 for Query Config set and
//!   force set and for Mac Mask List edits, which vblade and ggaoed let anyone do; a
//!   reservation here keeps other hosts from rewriting the string or from masking the
//!   reserving host out. Reads (config, mask list, reserve list) stay open to all. A set
//!   longer than one reply frame of every interface carries gets error 2
//!   ([`Engine::reserve_capacity`]).
//! - Version other than 1: error 5. Unknown command (vendor included): error 1.
//! - ATA READ/WRITE SECTORS (EXT), IDENTIFY, CHECK POWER MODE, FLUSH CACHE (EXT) (a real
//!   flush: [`IoKind::Flush`]), SMART RETURN STATUS / READ DATA / ENABLE / DISABLE; anything
//!   else is aborted (status DRDY|ERR, error ABRT). Out-of-range LBAs get IDNF and never
//!   reach the disk.
//! - Departure from vblade: a request under the key (source MAC, tag, command, LBA, count)
//!   of a write admitted within the last few seconds (a network duplicate) is dropped while
//!   that write is in flight or once a later write overlapped its sectors, and executed
//!   again only when nothing overwrote them since (the same data lands again), so a late
//!   copy never overwrites a newer write ([`DedupConfig`], the `dedup` module).

use std::fmt;
use std::num::NonZeroU64;
use std::time::Instant;

mod dedup;
pub use dedup::{DedupConfig, DEFAULT_DEDUP_ENTRIES, DEFAULT_DEDUP_WINDOW};
mod share;
pub use share::MAX_IDLE_SOURCES;

use aoe_wire::ata::{error_bits, smart, status, AtaPacket, ARG_LEN as ATA_ARG_LEN};
use aoe_wire::macmask::DirectiveCommand;
use aoe_wire::{
    max_sectors_for_mtu, AtaCommand, AtaFlags, AtaRepr, Body, Command, ConfigCommand, ConfigRepr,
    Directive, Error as WireError, ErrorCode, Frame, HeaderRepr, Identify, MacAddr, MacMaskRepr,
    MaskCommand, MaskError, Message, ReserveCommand, ReserveRepr, Tag, TargetAddr, AOE_VERSION,
    ATA_HEADER_LEN, MAX_CONFIG_LEN, MIN_FRAME_LEN, SECTOR_SIZE,
};

/// Most MACs the mask list holds; the one-byte directive count of a read response can carry
/// no more than 255.
pub const MAX_MASK_ENTRIES: usize = 255;

/// Firmware version this target reports in Query Config responses.
pub const FIRMWARE_VERSION: u16 = 0x0001;

/// What is exported and how it is advertised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// Shelf and slot.
    pub addr: TargetAddr,
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// Refuse writes (ATA ABRT).
    pub read_only: bool,
    /// Buffer count advertised in Query Config: how many requests may be in flight. The
    /// engine enforces it: see [`DropReason::OverBufferCount`].
    pub buffer_count: u16,
    /// Firmware version in Query Config responses.
    pub firmware_version: u16,
    /// Upper bound on the advertised sectors per command (the MTU bound applies too).
    pub max_sectors: u8,
    /// IDENTIFY model string.
    pub model: String,
    /// IDENTIFY serial string; unique per export.
    pub serial: String,
    /// IDENTIFY firmware string.
    pub firmware: String,
}

/// State a target keeps across restarts (the daemon persists it when
/// [`Engine::take_state_changed`] says it changed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PersistentState {
    /// The Query Config string.
    pub config: Vec<u8>,
    /// The Mac Mask List; empty means everyone.
    pub mask: Vec<MacAddr>,
    /// The reserve list; empty means not reserved.
    pub reserve: Vec<MacAddr>,
}

/// A network interface the export is served on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interface {
    /// The interface's MAC: the source of every reply sent on it.
    pub mac: MacAddr,
    /// The interface's MTU, which bounds the sectors per frame.
    pub mtu: u32,
}

/// Opaque handle of an I/O in flight, returned to [`Engine::complete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub u32);

/// Disk work the engine asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoKind {
    /// Read `len` bytes at byte `offset` into `reply[ATA_HEADER_LEN..ATA_HEADER_LEN + len]`.
    Read {
        /// Byte offset in the export.
        offset: u64,
        /// Bytes to read.
        len: usize,
    },
    /// Write `frame[data]` (the request frame's payload) at byte `offset`.
    Write {
        /// Byte offset in the export.
        offset: u64,
        /// Range of the data in the request frame.
        data: std::ops::Range<usize>,
    },
    /// Make everything written so far durable (fdatasync).
    Flush,
}

/// A request for disk I/O, completed later with [`Engine::complete`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoRequest {
    /// Hand back to [`Engine::complete`].
    pub token: Token,
    /// What to do.
    pub kind: IoKind,
}

/// Why a frame got no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not an AoE frame, or too short for the common header.
    Malformed,
    /// A response (another target's announcement, say): targets answer only requests.
    Response,
    /// Addressed to another shelf.slot, or to another MAC.
    NotForUs,
    /// The source is not on a non-empty Mac Mask List.
    Masked,
    /// Query Config test or prefix that did not match: AoEr11 says stay silent.
    ConfigMismatch,
    /// The interface index is not one the engine knows.
    UnknownInterface,
    /// Disk I/O beyond the advertised buffer count. AoEr11 section 3.2 defines Buffer
    /// Count as "the maximum number of outstanding messages the server can queue for
    /// processing" and lets the target drop the excess; the initiator retransmits. The count
    /// holds per interface the request came in on: the Linux aoe driver keeps up to Buffer
    /// Count requests outstanding per target MAC (`aoetgt.maxout`, aoecmd.c), so an
    /// initiator using two ports of a multipath export keeps twice as many in flight.
    /// vblade likewise bounds per target (its `-b` sizes the socket buffer), so several
    /// initiators share one window: memory stays bounded whatever number of MACs send.
    /// Within the window each source gets a fair share when it is contended: see
    /// [`DropReason::OverFairShare`].
    OverBufferCount,
    /// Disk I/O from a source that already holds its fair share of the buffer count (the
    /// count divided among the sources active on the interface) while another source was
    /// turned away for a full pool: the slots freed are kept for that one. Dropped silently
    /// like [`DropReason::OverBufferCount`]; the rule and why are in the `share` module's
    /// documentation (docs/ARCHITECTURE.md, "The buffer count").
    OverFairShare,
    /// A Query Config beyond what one source gets answered per period
    /// ([`QUERY_ANSWERS_PER_SOURCE`]). A deliberate departure from vblade, which answers
    /// every query: a flood of broadcast queries otherwise keeps the target busy sending
    /// answers while the kernel drops legitimate ATA requests with the flood (issue 14).
    QueryRateLimited,
    /// A copy of a write whose disk I/O is still in flight (a network duplicate): the
    /// write's own reply answers it when the I/O completes ([`DedupConfig`]).
    DuplicateInFlight,
    /// A request under the key of an answered write whose sectors a later write overlapped
    /// (a late network duplicate): executed, it could put the old data back over the newer
    /// write's; answered, it would claim a write that did not run. Dropped unanswered
    /// ([`DedupConfig`]).
    DuplicateSuperseded,
    /// A reply longer than the reply buffer (the interface's frame): a config string, mask
    /// or reserve list stored while the interface carried it, before its MTU fell or a
    /// reload added a smaller interface. Not sent; counted
    /// ([`Stats::replies_too_long`]), not logged per frame, since a peer chooses how many
    /// such requests it sends: the daemon reports the count once a second.
    ReplyTooLong,
}

/// Query Config requests one source MAC gets answered per period of
/// [`Engine::next_query_period`] (the daemon starts one every second). An initiator sends
/// one per interface on discovery and one per beacon (the Linux driver's `aoecmd_cfg`,
/// every 60 s) or revalidate; aoetools send one per command.
pub const QUERY_ANSWERS_PER_SOURCE: u32 = 32;

/// Sources counted apart per period; queries from further ones share one allowance of
/// [`QUERY_ANSWERS_PER_SOURCE`], so random source MACs get no more than one source does.
const QUERY_SOURCES: usize = 64;

/// Query Config answers given per source in the current period.
#[derive(Debug, Default)]
struct QueryLimit {
    sources: Vec<(MacAddr, u32)>,
    others: u32,
}

impl QueryLimit {
    /// Counts a query from `src`; true if it is answered.
    fn admit(&mut self, src: MacAddr) -> bool {
        let i = match self.sources.iter().position(|e| e.0 == src) {
            Some(i) => Some(i),
            None if self.sources.len() < QUERY_SOURCES => {
                self.sources.push((src, 0));
                Some(self.sources.len() - 1)
            }
            None => None,
        };
        let n = match i {
            Some(i) => &mut self.sources[i].1,
            None => &mut self.others,
        };
        *n = n.saturating_add(1);
        *n <= QUERY_ANSWERS_PER_SOURCE
    }
}

/// What [`Engine::handle_frame`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Send nothing.
    Drop(DropReason),
    /// Send the first `n` bytes of the reply buffer.
    Reply(usize),
    /// Do disk I/O, then call [`Engine::complete`]; keep the request frame (for writes) and
    /// the reply buffer (for reads) until then.
    Io(IoRequest),
}

/// How a disk operation failed, as far as the reply cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoFailure {
    /// The medium failed (EIO): the reply reports an uncorrectable error.
    Medium,
    /// Anything else (ENOSPC, EROFS, ...): the command is aborted.
    Aborted,
}

/// Counters for metrics and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests answered (replies and completions).
    pub replies: u64,
    /// Frames dropped, any reason.
    pub dropped: u64,
    /// Replies with the AoE error flag.
    pub aoe_errors: u64,
    /// ATA commands answered with ERR status.
    pub ata_errors: u64,
    /// Sectors read.
    pub sectors_read: u64,
    /// Sectors written.
    pub sectors_written: u64,
    /// Flushes performed.
    pub flushes: u64,
    /// Most I/Os in flight at once.
    pub max_in_flight: u32,
    /// Requests dropped because the buffer count was reached (also counted in `dropped`).
    pub over_buffer_count: u64,
    /// Requests dropped because their source held its fair share of the buffer count while
    /// another source waited ([`DropReason::OverFairShare`]; also counted in `dropped`, not
    /// in `over_buffer_count`).
    pub over_fair_share: u64,
    /// Requests for this export that parsed, by command.
    pub requests: RequestCounts,
    /// Replies with the AoE error flag (`aoe_errors`), by error code.
    pub aoe_error_codes: AoeErrorCounts,
    /// Query Config requests left unanswered by the per-source limit (also in `dropped`).
    pub queries_limited: u64,
    /// The duplicate-write table ([`DedupConfig`]; network duplicates of writes).
    pub dedup: DedupCounts,
    /// WRITE SECTORS (EXT) addressed to a wildcard shelf or slot, aborted unexecuted
    /// (also in `ata_errors`).
    pub wildcard_writes_refused: u64,
    /// Replies not sent because they were longer than the reply buffer
    /// ([`DropReason::ReplyTooLong`]; also counted in `dropped`).
    pub replies_too_long: u64,
}

/// What the duplicate-write table did ([`DedupConfig`]), since the export started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DedupCounts {
    /// Requests under the key of an answered write whose sectors nothing overwrote since
    /// (a copy, or a reused tag), executed again: the same data lands again.
    pub executed_again: u64,
    /// Copies of a write still on its way to the disk, dropped (its reply answers both).
    pub dropped_in_flight: u64,
    /// Requests under the key of an answered write that a later write overlapped, dropped
    /// unanswered: run, a copy would undo the newer write.
    pub dropped_superseded: u64,
    /// Writes forgotten inside the window because the table was full: a late copy of one
    /// would be executed. Rising steadily, `--dedup-entries` is too small for the write rate.
    pub evicted: u64,
}

/// I/Os in flight by kind ([`Engine::in_flight_kinds`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InFlight {
    /// Reads.
    pub reads: u32,
    /// Sectors they read.
    pub read_sectors: u64,
    /// Writes (WRITE SECTORS and write-zeroes alike).
    pub writes: u32,
    /// Sectors they write.
    pub write_sectors: u64,
    /// Cache flushes.
    pub flushes: u32,
}

impl std::fmt::Display for InFlight {
    /// `3 writes (6 sectors), 1 read (2 sectors), 1 flush`: the kinds present.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural = |n: u32| if n == 1 { "" } else { "s" };
        let mut parts = Vec::new();
        if self.writes > 0 {
            parts.push(format!(
                "{} write{} ({} sectors)",
                self.writes,
                plural(self.writes),
                self.write_sectors
            ));
        }
        if self.reads > 0 {
            parts.push(format!(
                "{} read{} ({} sectors)",
                self.reads,
                plural(self.reads),
                self.read_sectors
            ));
        }
        if self.flushes > 0 {
            parts.push(format!(
                "{} flush{}",
                self.flushes,
                if self.flushes == 1 { "" } else { "es" }
            ));
        }
        if parts.is_empty() {
            return f.write_str("nothing");
        }
        f.write_str(&parts.join(", "))
    }
}

/// Requests for an export by command (AoEr11 section 2.3 `Command`, and for ATA the command
/// register, section 3.1): what was asked, whatever the answer (a reply, an error, or I/O).
/// Requests dropped before their body parsed (masked, for another target, malformed
/// headers) are not here but in [`Stats::dropped`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// ATA READ SECTORS (EXT).
    pub ata_read: u64,
    /// ATA WRITE SECTORS (EXT).
    pub ata_write: u64,
    /// ATA IDENTIFY DEVICE.
    pub ata_identify: u64,
    /// ATA FLUSH CACHE (EXT).
    pub ata_flush: u64,
    /// Other ATA commands (SMART, CHECK POWER MODE, unknown ones).
    pub ata_other: u64,
    /// Query Config read, test and test-prefix (CCmd 0-2).
    pub config_query: u64,
    /// Query Config set and force set (CCmd 3, 4).
    pub config_set: u64,
    /// Mac Mask List (command 2).
    pub mac_mask: u64,
    /// Reserve/Release (command 3).
    pub reserve: u64,
    /// Unknown AoE commands (answered with error 1).
    pub unknown: u64,
}

/// Replies with the AoE error flag by error code (AoEr11 section 2.4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AoeErrorCounts {
    /// 1: unrecognized command code.
    pub unrecognized_command: u64,
    /// 2: bad argument parameter.
    pub bad_argument: u64,
    /// 3: device unavailable.
    pub device_unavailable: u64,
    /// 4: config string present.
    pub config_string_present: u64,
    /// 5: unsupported version.
    pub unsupported_version: u64,
    /// 6: target is reserved.
    pub target_reserved: u64,
}

impl RequestCounts {
    fn count(&mut self, body: &Body<'_>) {
        let n = match body {
            Body::Ata(a) => match a.command() {
                AtaCommand::ReadSectors | AtaCommand::ReadSectorsExt => &mut self.ata_read,
                AtaCommand::WriteSectors | AtaCommand::WriteSectorsExt => &mut self.ata_write,
                AtaCommand::IdentifyDevice => &mut self.ata_identify,
                AtaCommand::FlushCache | AtaCommand::FlushCacheExt => &mut self.ata_flush,
                _ => &mut self.ata_other,
            },
            Body::Config(c) => match c.ccmd {
                ConfigCommand::Set | ConfigCommand::ForceSet => &mut self.config_set,
                _ => &mut self.config_query,
            },
            Body::MacMask(_) => &mut self.mac_mask,
            Body::Reserve(_) => &mut self.reserve,
            Body::Unknown(_) => &mut self.unknown,
        };
        *n += 1;
    }
}

impl AoeErrorCounts {
    fn count(&mut self, code: ErrorCode) {
        let n = match code {
            ErrorCode::UnrecognizedCommand | ErrorCode::Unknown(_) => {
                &mut self.unrecognized_command
            }
            ErrorCode::BadArgument => &mut self.bad_argument,
            ErrorCode::DeviceUnavailable => &mut self.device_unavailable,
            ErrorCode::ConfigStringPresent => &mut self.config_string_present,
            ErrorCode::UnsupportedVersion => &mut self.unsupported_version,
            ErrorCode::TargetReserved => &mut self.target_reserved,
        };
        *n += 1;
    }
}

/// A request handed to the driver, in the slab at its token until [`Engine::complete`].
/// One cache line, aligned to one (64 bytes, pinned by a const assertion): `complete` reads it after
/// the disk work, when the batch's frames and the file's data have most often pushed it
/// out of the first-level cache, so it costs one line fetched rather than the two of the
/// 96 bytes it took with the reply header as a [`HeaderRepr`] (session 30's profile:
/// most of `complete`'s samples on the loads of it).
#[derive(Debug, Clone)]
#[repr(align(64))]
struct Pending {
    /// The reply's AoE header as it goes out (emitted by [`HeaderRepr::emit`] when the
    /// request was taken): `complete` copies it in front of the ATA header, where an ATA
    /// failure changes only the ATA status and error bytes, never the AoE header.
    header: [u8; aoe_wire::HEADER_LEN],
    ata: [u8; ATA_ARG_LEN],
    /// The interface the request came in on.
    iface: u32,
    /// The request's source: whose slot of the interface's buffer count it holds.
    src: share::SourceId,
    kind: PendingKind,
    /// A write's entry in the table of executed writes, finished with its reply (seqs
    /// start at 1).
    dedup: Option<NonZeroU64>,
}

// One line in the slab, `None` included (the kind's tag holds `Option`'s niche).
const _: () = assert!(std::mem::size_of::<Option<Pending>>() == 64);

/// What a [`Pending`] request is. The counts fit in 32 bits: the ATA sector count is one
/// byte (AoEr11 section 3.1), so a request moves at most 255 sectors.
#[derive(Debug, Clone, Copy)]
enum PendingKind {
    Read { sectors: u32 },
    Write { sectors: u32 },
    Flush,
}

/// The target engine for one export.
#[derive(Debug)]
pub struct Engine {
    cfg: ExportConfig,
    state: PersistentState,
    state_changed: bool,
    interfaces: Vec<Option<Interface>>,
    pending: Vec<Option<Pending>>,
    free: Vec<u32>,
    in_flight: u32,
    /// The buffer count's slots per interface index (each at most the buffer count) and
    /// their fair share among sources.
    shares: share::Shares,
    /// The interface of the frame being handled.
    cur_iface: usize,
    identify: [u8; 512],
    stats: Stats,
    queries: QueryLimit,
    /// Writes executed recently, by source, tag and range ([`DedupConfig`]).
    dedup: dedup::Dedup,
    /// The time the driver last gave ([`Engine::set_now`]); `None` until then, when entries
    /// of `dedup` are forgotten by number only.
    now: Option<Instant>,
}

/// Bytes an answer on an interface of `mtu` carries after the AoE header (10 bytes) and an
/// argument header of `arg` bytes.
fn room_at(mtu: u32, arg: usize) -> usize {
    (mtu as usize).saturating_sub(aoe_wire::HEADER_LEN - aoe_wire::ETHERNET_HEADER_LEN + arg)
}

/// Longest config string a Query Config answer carries on an interface of `mtu` (10-byte
/// AoE header, 8-byte config header), at most 1024 bytes (AoEr11 section 3.2).
pub fn config_capacity_at(mtu: u32) -> usize {
    room_at(mtu, aoe_wire::config::ARG_LEN).min(MAX_CONFIG_LEN)
}

/// Most Mac Mask List entries a read reply carries on an interface of `mtu` (10-byte AoE
/// header, 4-byte argument, 8 bytes a directive), at most 255 (the one-byte Dir Count).
pub fn mask_capacity_at(mtu: u32) -> usize {
    (room_at(mtu, aoe_wire::macmask::ARG_LEN) / aoe_wire::macmask::DIRECTIVE_LEN)
        .min(MAX_MASK_ENTRIES)
}

/// Most MACs a Reserve/Release reply carries on an interface of `mtu` (10-byte AoE header,
/// 2-byte argument, 6 bytes a MAC), at most 255 (the one-byte count).
pub fn reserve_capacity_at(mtu: u32) -> usize {
    (room_at(mtu, aoe_wire::reserve::ARG_LEN) / 6).min(255)
}

impl Engine {
    /// An engine for `cfg`, starting from `state` (the persisted config string, mask and
    /// reserve lists, or the default).
    pub fn new(cfg: ExportConfig, state: PersistentState) -> Engine {
        let identify = identify_page(&cfg);
        Engine {
            cfg,
            state,
            state_changed: false,
            interfaces: Vec::new(),
            pending: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            shares: share::Shares::default(),
            cur_iface: 0,
            identify,
            stats: Stats::default(),
            queries: QueryLimit::default(),
            dedup: dedup::Dedup::new(DedupConfig::default()),
            now: None,
        }
    }

    /// Tells the engine the time: the window of [`DedupConfig`] counts from it. The daemon
    /// calls it whenever it takes a batch of frames; the engine reads no clock.
    pub fn set_now(&mut self, now: Instant) {
        self.now = Some(now);
    }

    /// The address of the line of the duplicate-write table's index that `frame`, if it is
    /// an ATA write, will look up when [`handle_frame`](Self::handle_frame) takes it; `None`
    /// for any other frame (a read, a response, one too short to parse), and while the
    /// table is off or has no index yet. Nothing is read through the address: it is for a
    /// cache hint (`aoe_sys::prefetch`, x86-64 `prefetcht0`) that the driver issues for
    /// every frame of a receive batch before it handles the first, so that each write's
    /// line (most often not in the cache: the index is read at random) comes in behind the
    /// work on the frames before it. The driver issues the hint itself, inlined where it
    /// loops over the batch: held here as a function pointer it was an indirect call a
    /// write, never inlined, 20-51 ns a request in session 31's profiles
    /// (docs/PERFORMANCE.md, "Session 34: the target's own cost a request").
    pub fn dedup_line(&self, frame: &[u8]) -> Option<*const u8> {
        if !self.dedup.active() {
            return None;
        }
        let view = Frame::new_checked(frame).ok()?;
        let header = HeaderRepr::parse(&view).ok()?;
        if header.response || header.command != Command::Ata {
            return None;
        }
        let req = AtaRepr::parse(view.payload()).ok()?;
        if !req.aflags.contains(AtaFlags::WRITE) {
            return None;
        }
        let key = dedup::Key::of_write(header.src, header.tag.0, &req);
        self.dedup.line(self.dedup.hash(&key))
    }

    /// How long and how many executed writes are remembered to answer their copies.
    pub fn set_dedup(&mut self, cfg: DedupConfig) {
        self.dedup.set_config(cfg, self.now);
    }

    /// Moves the writes `old` remembers to answer their copies (its duplicate-write table)
    /// into this engine's empty one, leaving `old`'s empty; returns how many. The daemon
    /// calls it for an export reopened in place of `old` (same address, store and offset),
    /// before its first frame: with an empty table, a late copy of a write `old` had
    /// answered and a newer write had overlapped since would run as new and put the older
    /// data back. `old` must admit no more writes (a retiring export).
    pub fn take_dedup(&mut self, old: &mut Engine) -> usize {
        let now = self.now.or(old.now);
        self.dedup.take(&mut old.dedup, now)
    }

    /// The current [`DedupConfig`].
    pub fn dedup_config(&self) -> DedupConfig {
        self.dedup.config()
    }

    /// Executed writes remembered now (at most [`DedupConfig::entries`]).
    pub fn dedup_entries(&self) -> usize {
        self.dedup.len()
    }

    /// Starts a new period for the per-source limit of Query Config answers
    /// ([`QUERY_ANSWERS_PER_SOURCE`]) and for the fair share of the buffer count (a source
    /// that asked for no I/O during the period that ends is no longer active:
    /// [`DropReason::OverFairShare`]); the daemon calls it every second.
    pub fn next_query_period(&mut self) {
        self.queries = QueryLimit::default();
        self.shares.next_period();
    }

    /// The export's configuration.
    pub fn config(&self) -> &ExportConfig {
        &self.cfg
    }

    /// The state to persist.
    pub fn state(&self) -> &PersistentState {
        &self.state
    }

    /// True once after a change of config string, mask or reserve list.
    #[must_use = "the flag is cleared: a changed state must be saved"]
    pub fn take_state_changed(&mut self) -> bool {
        std::mem::take(&mut self.state_changed)
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        let mut st = self.stats;
        st.dedup.evicted = self.dedup.evicted();
        st
    }

    /// I/Os handed out and not yet completed.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// The tokens of the I/Os in flight (handed out, and neither completed nor aborted).
    pub fn in_flight_tokens(&self) -> impl Iterator<Item = Token> + '_ {
        self.pending
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_some())
            .map(|(i, _)| Token(i as u32))
    }

    /// The LBA (as the initiator addressed it, relative to the export) and sector count of
    /// the ATA request in flight under `token`, for a log line that names what failed.
    pub fn in_flight_lba(&self, token: Token) -> Option<(u64, u8)> {
        let p = self.pending.get(token.0 as usize)?.as_ref()?;
        let a = aoe_wire::AtaRepr::parse(&p.ata).ok()?;
        Some((a.effective_lba(), a.sector_count))
    }

    /// The I/Os in flight by kind: what a stop that cannot wait for them leaves unanswered.
    pub fn in_flight_kinds(&self) -> InFlight {
        let mut f = InFlight::default();
        for p in self.pending.iter().flatten() {
            match p.kind {
                PendingKind::Read { sectors } => {
                    f.reads += 1;
                    f.read_sectors += u64::from(sectors);
                }
                PendingKind::Write { sectors } => {
                    f.writes += 1;
                    f.write_sectors += u64::from(sectors);
                }
                PendingKind::Flush => f.flushes += 1,
            }
        }
        f
    }

    /// Registers (or updates, on an MTU change) the interface with index `idx`.
    pub fn set_interface(&mut self, idx: usize, iface: Interface) {
        if self.interfaces.len() <= idx {
            self.interfaces.resize(idx + 1, None);
        }
        self.interfaces[idx] = Some(iface);
    }

    /// Sets the capacity in sectors (a resized backing store, e.g. `rbd resize` of an RBD
    /// image: issue 13); true if it changed. The IDENTIFY page is rebuilt, so the next
    /// IDENTIFY carries the new size: the Linux driver re-sends IDENTIFY on `revalidate`
    /// (aoecmd.c `aoecmd_ata_id`) and `ataid_complete` sets the new capacity when it differs.
    /// READ/WRITE bounds follow at once.
    pub fn set_sectors(&mut self, sectors: u64) -> bool {
        if sectors == self.cfg.sectors {
            return false;
        }
        self.cfg.sectors = sectors;
        self.identify = identify_page(&self.cfg);
        true
    }

    /// Replaces the whole persistent state (config string, Mac Mask List, reserve list) with
    /// `state`; true if it changed, and then [`Engine::take_state_changed`] says so too. The
    /// daemon hands a reopened export the state of the instance it replaces with it.
    pub fn replace_state(&mut self, state: PersistentState) -> bool {
        if self.state == state {
            return false;
        }
        self.state = state;
        self.state_changed = true;
        true
    }

    /// Replaces the reserve list (AoEr11 Reserve/Release) with `macs`, as a store shared by
    /// several targets holds it (an `rbd:` export keeps it in the image: issue 13); true if
    /// it changed, and then [`Engine::take_state_changed`] says so too. The daemon also
    /// restores the previous list with it when such a store could not keep a new one.
    pub fn set_reserve(&mut self, macs: Vec<MacAddr>) -> bool {
        if self.state.reserve == macs {
            return false;
        }
        self.state.reserve = macs;
        self.state_changed = true;
        true
    }

    /// Sectors per ATA command advertised on an interface: what its MTU carries, capped by
    /// the configuration.
    pub fn sectors_per_frame(&self, iface: &Interface) -> u8 {
        max_sectors_for_mtu(iface.mtu).min(self.cfg.max_sectors)
    }

    /// The unsolicited Query Config responses to send when the export starts on interface
    /// `idx` (vblade `aoead`): one broadcast, or one unicast to each MAC of a non-empty mask
    /// list. Each is a complete, padded frame; none if it would be longer than the
    /// interface carries.
    #[must_use = "the announcements must be broadcast"]
    pub fn announcements(&self, idx: usize) -> Vec<Vec<u8>> {
        let Some(iface) = self.interface(idx) else {
            return Vec::new();
        };
        let dsts: Vec<MacAddr> = if self.state.mask.is_empty() {
            vec![MacAddr::BROADCAST]
        } else {
            self.state.mask.clone()
        };
        dsts.into_iter()
            .filter_map(|dst| {
                let header = HeaderRepr {
                    dst,
                    src: iface.mac,
                    version: AOE_VERSION,
                    response: true,
                    error: None,
                    target: self.cfg.addr,
                    command: Command::QueryConfig,
                    tag: Tag(0),
                };
                let m = Message {
                    header,
                    body: Body::Config(self.config_reply(&iface, ConfigCommand::Read)),
                };
                // One too long for the interface (a stored string longer than it carries,
                // which the daemon warns about) would only be refused by the kernel.
                m.to_vec()
                    .ok()
                    .filter(|f| f.len() <= iface.mtu as usize + aoe_wire::ETHERNET_HEADER_LEN)
            })
            .collect()
    }

    fn interface(&self, idx: usize) -> Option<Interface> {
        self.interfaces.get(idx).copied().flatten()
    }

    fn config_reply(&self, iface: &Interface, ccmd: ConfigCommand) -> ConfigRepr<'_> {
        ConfigRepr {
            buffer_count: self.cfg.buffer_count,
            firmware_version: self.cfg.firmware_version,
            sector_count: self.sectors_per_frame(iface),
            aoe_version: AOE_VERSION,
            ccmd,
            config: &self.state.config,
        }
    }

    /// Handles one received frame from interface `idx`; `reply` must hold a full frame of
    /// that interface (MTU + 14 bytes).
    #[must_use = "the reply must be sent or the I/O performed"]
    pub fn handle_frame(&mut self, idx: usize, frame: &[u8], reply: &mut [u8]) -> Outcome {
        self.cur_iface = idx;
        let outcome = self.dispatch(idx, frame, reply);
        match &outcome {
            Outcome::Drop(DropReason::OverBufferCount) => {
                self.stats.dropped += 1;
                self.stats.over_buffer_count += 1;
            }
            Outcome::Drop(DropReason::OverFairShare) => {
                self.stats.dropped += 1;
                self.stats.over_fair_share += 1;
            }
            Outcome::Drop(DropReason::QueryRateLimited) => {
                self.stats.dropped += 1;
                self.stats.queries_limited += 1;
            }
            Outcome::Drop(DropReason::ReplyTooLong) => {
                self.stats.dropped += 1;
                self.stats.replies_too_long += 1;
            }
            Outcome::Drop(_) => self.stats.dropped += 1,
            Outcome::Reply(_) => self.stats.replies += 1,
            Outcome::Io(_) => {}
        }
        outcome
    }

    fn dispatch(&mut self, idx: usize, frame: &[u8], reply: &mut [u8]) -> Outcome {
        let Some(iface) = self.interface(idx) else {
            return Outcome::Drop(DropReason::UnknownInterface);
        };
        let Ok(view) = Frame::new_checked(frame) else {
            return Outcome::Drop(DropReason::Malformed);
        };
        let Ok(header) = HeaderRepr::parse(&view) else {
            return Outcome::Drop(DropReason::Malformed);
        };
        if header.response {
            return Outcome::Drop(DropReason::Response);
        }
        if !header.target.reaches(self.cfg.addr) {
            return Outcome::Drop(DropReason::NotForUs);
        }
        if header.dst != iface.mac && !header.dst.is_broadcast() {
            return Outcome::Drop(DropReason::NotForUs);
        }
        if !self.state.mask.is_empty() && !self.state.mask.contains(&header.src) {
            return Outcome::Drop(DropReason::Masked);
        }
        // Before any parsing or reply: an unanswered query costs what a frame for another
        // shelf.slot costs.
        if header.command == Command::QueryConfig && !self.queries.admit(header.src) {
            return Outcome::Drop(DropReason::QueryRateLimited);
        }
        // Replies carry the export's own address, never the wildcard the request used.
        let mut rsp = header.response_to(iface.mac);
        rsp.target = self.cfg.addr;
        if header.version != AOE_VERSION {
            return self.aoe_error(&rsp, ErrorCode::UnsupportedVersion, view.payload(), reply);
        }
        // The header parsed above is the message's: only the body is parsed now.
        let body = match Message::parse_body(&header, view.payload()) {
            Ok(b) => b,
            Err(e) => return self.malformed_body(&rsp, e, view.payload(), reply),
        };
        self.stats.requests.count(&body);
        match body {
            Body::Ata(ata) => self.ata(&iface, &rsp, &ata, header.target.is_wildcard(), reply),
            Body::Config(cfg) => self.query_config(&iface, &rsp, &cfg, view.payload(), reply),
            Body::MacMask(m) => self.mac_mask(&rsp, &m, reply),
            Body::Reserve(r) => self.reserve(&rsp, &r, reply),
            Body::Unknown(p) => self.aoe_error(&rsp, ErrorCode::UnrecognizedCommand, p, reply),
        }
    }

    /// A request whose header parsed but whose body did not.
    fn malformed_body(
        &mut self,
        rsp: &HeaderRepr,
        err: WireError,
        payload: &[u8],
        reply: &mut [u8],
    ) -> Outcome {
        if rsp.command == Command::Ata && payload.len() >= ATA_ARG_LEN {
            // A write whose frame is shorter than its sector count: abort the command.
            let mut arg = [0u8; ATA_ARG_LEN];
            arg.copy_from_slice(&payload[..ATA_ARG_LEN]);
            return self.ata_status(
                rsp,
                &arg,
                status::DRDY | status::ERR,
                error_bits::ABRT,
                reply,
            );
        }
        tracing::debug!(error = %err, "malformed {:?} request", rsp.command);
        self.aoe_error(rsp, ErrorCode::BadArgument, payload, reply)
    }

    /// Answers with the E flag and `code`, echoing the request's argument (vblade echoes the
    /// request; ATA write data is not echoed).
    fn aoe_error(
        &mut self,
        rsp: &HeaderRepr,
        code: ErrorCode,
        payload: &[u8],
        reply: &mut [u8],
    ) -> Outcome {
        self.stats.aoe_errors += 1;
        self.stats.aoe_error_codes.count(code);
        let echo_len = match rsp.command {
            Command::Ata => ATA_ARG_LEN,
            Command::QueryConfig => aoe_wire::config::ARG_LEN,
            Command::MacMaskList => aoe_wire::macmask::ARG_LEN,
            Command::ReserveRelease => aoe_wire::reserve::ARG_LEN,
            Command::Unknown(_) => 0,
        }
        .min(payload.len());
        let header = HeaderRepr {
            error: Some(code),
            ..*rsp
        };
        // The echoed argument must describe the echoed bytes: lists and strings are not
        // echoed, so their counts become zero.
        let mut echo = [0u8; ATA_ARG_LEN];
        echo[..echo_len].copy_from_slice(&payload[..echo_len]);
        // (Also when the request was cut short inside the count field: a partial count padded
        // with zeros would claim bytes that are not there.)
        match rsp.command {
            Command::QueryConfig => echo[6..8].fill(0),
            Command::MacMaskList => echo[3] = 0,
            Command::ReserveRelease => echo[1] = 0,
            _ => {}
        }
        let m = Message {
            header,
            body: Body::Unknown(&echo[..echo_len]),
        };
        match m.emit(reply) {
            Ok(n) => Outcome::Reply(n),
            Err(_) => Outcome::Drop(DropReason::Malformed),
        }
    }

    fn emit(&mut self, header: HeaderRepr, body: Body<'_>, reply: &mut [u8]) -> Outcome {
        match (Message { header, body }).emit(reply) {
            Ok(n) => Outcome::Reply(n),
            Err(_) => Outcome::Drop(DropReason::ReplyTooLong),
        }
    }

    // ---------------------------------------------------------------- Query Config

    fn query_config(
        &mut self,
        iface: &Interface,
        rsp: &HeaderRepr,
        req: &ConfigRepr<'_>,
        payload: &[u8],
        reply: &mut [u8],
    ) -> Outcome {
        if matches!(req.ccmd, ConfigCommand::Set | ConfigCommand::ForceSet)
            && req.config.len() > self.config_capacity()
        {
            return self.aoe_error(rsp, ErrorCode::BadArgument, payload, reply);
        }
        let current = &self.state.config;
        match req.ccmd {
            ConfigCommand::Read => {}
            ConfigCommand::Test => {
                if req.config != current.as_slice() {
                    return Outcome::Drop(DropReason::ConfigMismatch);
                }
            }
            ConfigCommand::TestPrefix => {
                if !current.starts_with(req.config) {
                    return Outcome::Drop(DropReason::ConfigMismatch);
                }
            }
            ConfigCommand::Set => {
                // vblade `confcmd` and ggaoed refuse a set only when a *different* string is
                // stored: a retried set (its reply was lost) succeeds.
                if !current.is_empty() && current.as_slice() != req.config {
                    return self.aoe_error(rsp, ErrorCode::ConfigStringPresent, payload, reply);
                }
                if self.reserved_against(rsp.dst) {
                    return self.aoe_error(rsp, ErrorCode::TargetReserved, payload, reply);
                }
                self.set_config(req.config);
            }
            ConfigCommand::ForceSet => {
                if self.reserved_against(rsp.dst) {
                    return self.aoe_error(rsp, ErrorCode::TargetReserved, payload, reply);
                }
                self.set_config(req.config);
            }
            ConfigCommand::Unknown(_) => {
                return self.aoe_error(rsp, ErrorCode::BadArgument, payload, reply);
            }
        }
        let body = Body::Config(self.config_reply(iface, req.ccmd));
        // `self` is borrowed by `body`; emit through a free function.
        match (Message { header: *rsp, body }).emit(reply) {
            Ok(n) => Outcome::Reply(n),
            Err(_) => Outcome::Drop(DropReason::ReplyTooLong),
        }
    }

    fn set_config(&mut self, s: &[u8]) {
        debug_assert!(s.len() <= MAX_CONFIG_LEN);
        if self.state.config != s {
            self.state.config = s.to_vec();
            self.state_changed = true;
        }
    }

    /// True if a reserve list exists and `mac` is not on it.
    fn reserved_against(&self, mac: MacAddr) -> bool {
        !self.state.reserve.is_empty() && !self.state.reserve.contains(&mac)
    }

    // ---------------------------------------------------------------- Mac Mask List

    /// Most MACs the Mac Mask List may hold: what one read reply carries at the smallest MTU
    /// of the export's interfaces (10-byte AoE header, 4-byte argument, 8 bytes a directive),
    /// and at most 255 (the one-byte Dir Count). An add past it fails with MError 3 (list
    /// full), so a read reply always fits the frame it is sent in.
    pub fn mask_capacity(&self) -> usize {
        self.smallest(mask_capacity_at).unwrap_or(0)
    }

    /// `at` of the smallest MTU of the export's interfaces; None with no interface yet.
    fn smallest(&self, at: fn(u32) -> usize) -> Option<usize> {
        self.interfaces.iter().flatten().map(|i| at(i.mtu)).min()
    }

    /// Longest config string a Query Config set may store: what one reply carries at the
    /// smallest MTU of the export's interfaces (10-byte AoE header, 8-byte config header),
    /// and at most 1024 bytes (AoEr11 section 3.2). Past it a set fails with AoE error 2
    /// (bad argument), as a string over 1024 bytes does, so a read reply always fits the
    /// frame it is sent in: without the cap a string set through a jumbo-frame interface
    /// made every Query Config answer on an interface under MTU 1042 too long to send, and
    /// the export vanished from discovery there (vblade the same: its answer is refused by
    /// the socket). With no interface yet, 1024.
    pub fn config_capacity(&self) -> usize {
        self.smallest(config_capacity_at).unwrap_or(MAX_CONFIG_LEN)
    }

    /// Most MACs a Reserve/Release set may store: what one reply carries at the smallest MTU
    /// of the export's interfaces (10-byte AoE header, 2-byte argument, 6 bytes a MAC), and
    /// at most 255 (the one-byte count). A longer list gets AoE error 2 (bad argument), so a
    /// read reply always fits the frame it is sent in: a list set through a jumbo-frame
    /// interface was otherwise stored, and every Reserve/Release answer on an interface of a
    /// smaller MTU was too long to send (s22 audit, the counterpart of
    /// [`config_capacity`](Self::config_capacity)). With no interface yet, 255.
    pub fn reserve_capacity(&self) -> usize {
        self.smallest(reserve_capacity_at).unwrap_or(255)
    }

    /// Mac Mask List read and edit, as vblade `aoemask` answers them:
    /// - an edit applies its directives in order; the first that fails (a bad DCmd: MError 2;
    ///   an add to a full list: MError 3; an add of a group (multicast or broadcast) MAC,
    ///   which vblade accepts: MError 1, unspecified, as AoEr11 3.4 has no closer code) stops
    ///   it, and the reply carries the MError with Dir
    ///   Count set to the index of the failing directive and no list (directives before it
    ///   stay applied);
    /// - a read, and a successful edit, return the list with DCmd 0 in every entry;
    /// - an unknown MCmd gets AoE error 2 (bad argument).
    fn mac_mask(&mut self, rsp: &HeaderRepr, req: &MacMaskRepr, reply: &mut [u8]) -> Outcome {
        match req.mcmd {
            MaskCommand::Read => {}
            MaskCommand::Edit => {
                if self.reserved_against(rsp.dst) {
                    let arg = [0, u8::from(req.mcmd), 0, req.directives.len() as u8];
                    return self.aoe_error(rsp, ErrorCode::TargetReserved, &arg, reply);
                }
                let capacity = self.mask_capacity();
                let before = self.state.mask.clone();
                let mut failed = None;
                for (i, d) in req.directives.iter().enumerate() {
                    match d.command {
                        DirectiveCommand::NoDirective => {}
                        // No frame has a group source address, so a group MAC in the
                        // list would only shut everyone out; vblade adds it.
                        DirectiveCommand::Add if d.mac.is_multicast() => {
                            failed = Some((i, MaskError::Unspecified));
                            break;
                        }
                        DirectiveCommand::Add => {
                            if !self.state.mask.contains(&d.mac) {
                                if self.state.mask.len() >= capacity {
                                    failed = Some((i, MaskError::ListFull));
                                    break;
                                }
                                self.state.mask.push(d.mac);
                            }
                        }
                        DirectiveCommand::Delete => self.state.mask.retain(|m| *m != d.mac),
                        DirectiveCommand::Unknown(_) => {
                            failed = Some((i, MaskError::BadDirective));
                            break;
                        }
                    }
                }
                if self.state.mask != before {
                    self.state_changed = true;
                }
                if let Some((index, merror)) = failed {
                    let body = MacMaskRepr {
                        mcmd: req.mcmd,
                        merror,
                        directives: Vec::new(),
                    };
                    let out = self.emit(*rsp, Body::MacMask(body), reply);
                    if let Outcome::Reply(_) = out {
                        // Dir Count: the failing directive's index (< 255, the request's
                        // own count bounds it).
                        reply[aoe_wire::HEADER_LEN + 3] = index as u8;
                    }
                    return out;
                }
            }
            MaskCommand::Unknown(_) => {
                let arg = [0, u8::from(req.mcmd), 0, 0];
                return self.aoe_error(rsp, ErrorCode::BadArgument, &arg, reply);
            }
        }
        let body = MacMaskRepr {
            mcmd: req.mcmd,
            merror: MaskError::None,
            directives: self
                .state
                .mask
                .iter()
                .map(|mac| Directive {
                    command: DirectiveCommand::NoDirective,
                    mac: *mac,
                })
                .collect(),
        };
        self.emit(*rsp, Body::MacMask(body), reply)
    }

    // ---------------------------------------------------------------- Reserve/Release

    fn reserve(&mut self, rsp: &HeaderRepr, req: &ReserveRepr, reply: &mut [u8]) -> Outcome {
        match req.rcmd {
            ReserveCommand::Read => {}
            ReserveCommand::Set | ReserveCommand::ForceSet => {
                // No frame comes from a group source (IEEE 802 I/G bit): a reservation
                // naming one could never be held, only shut others out. Bad argument, as
                // a Mac Mask List add of one is refused.
                if req.macs.iter().any(MacAddr::is_multicast)
                    || req.macs.len() > self.reserve_capacity()
                {
                    let arg = [u8::from(req.rcmd), 0];
                    return self.aoe_error(rsp, ErrorCode::BadArgument, &arg, reply);
                }
                if req.rcmd == ReserveCommand::Set && self.reserved_against(rsp.dst) {
                    let arg = [u8::from(req.rcmd), 0];
                    return self.aoe_error(rsp, ErrorCode::TargetReserved, &arg, reply);
                }
                if self.state.reserve != req.macs {
                    self.state.reserve = req.macs.clone();
                    self.state_changed = true;
                }
            }
            ReserveCommand::Unknown(_) => {
                let arg = [u8::from(req.rcmd), 0];
                return self.aoe_error(rsp, ErrorCode::BadArgument, &arg, reply);
            }
        }
        let body = ReserveRepr {
            rcmd: req.rcmd,
            macs: self.state.reserve.clone(),
        };
        self.emit(*rsp, Body::Reserve(body), reply)
    }

    // ---------------------------------------------------------------- ATA

    fn ata(
        &mut self,
        iface: &Interface,
        rsp: &HeaderRepr,
        req: &AtaRepr<'_>,
        wildcard: bool,
        reply: &mut [u8],
    ) -> Outcome {
        let mut arg = [0u8; ATA_ARG_LEN];
        // Cannot fail: the argument is 12 bytes and `data` is not emitted here.
        let _ = AtaRepr { data: &[], ..*req }.emit(&mut arg);
        let cmd = req.command();
        if cmd != AtaCommand::IdentifyDevice && self.reserved_against(rsp.dst) {
            return self.aoe_error(rsp, ErrorCode::TargetReserved, &arg, reply);
        }
        let abort = status::DRDY | status::ERR;
        // A write sent to a wildcard shelf or slot reaches every export that matches it (and,
        // on a LAN, every target): one frame would write them all. The Linux driver never
        // sends ATA to a wildcard address, so such a write is a mistake or an attack; it is
        // aborted before anything else looks at it (docs/PROTOCOL.md 1.7).
        if wildcard && matches!(cmd, AtaCommand::WriteSectors | AtaCommand::WriteSectorsExt) {
            self.stats.wildcard_writes_refused += 1;
            return self.ata_status(rsp, &arg, abort, error_bits::ABRT, reply);
        }
        match cmd {
            AtaCommand::ReadSectors
            | AtaCommand::ReadSectorsExt
            | AtaCommand::WriteSectors
            | AtaCommand::WriteSectorsExt => {
                let write = matches!(cmd, AtaCommand::WriteSectors | AtaCommand::WriteSectorsExt);
                self.read_write(iface, rsp, req, &arg, write, reply)
            }
            AtaCommand::IdentifyDevice => {
                let id = self.identify;
                self.ata_data_reply(rsp, &arg, &id, reply)
            }
            AtaCommand::CheckPowerMode => {
                // Sector count 0xFF: active or idle.
                arg[2] = 0xff;
                self.ata_status(rsp, &arg, status::DRDY, 0, reply)
            }
            AtaCommand::FlushCache | AtaCommand::FlushCacheExt => {
                self.start_io(rsp, &arg, IoKind::Flush, PendingKind::Flush)
            }
            AtaCommand::Smart => self.smart(rsp, req, &mut arg, reply),
            AtaCommand::Unknown(_) => self.ata_status(rsp, &arg, abort, error_bits::ABRT, reply),
        }
    }

    fn read_write(
        &mut self,
        iface: &Interface,
        rsp: &HeaderRepr,
        req: &AtaRepr<'_>,
        arg: &[u8; ATA_ARG_LEN],
        write: bool,
        reply: &mut [u8],
    ) -> Outcome {
        let abort = status::DRDY | status::ERR;
        let count = req.sector_count as u64;
        // The frame must carry the whole transfer; count 0 (256 or 65536 sectors in ATA) never
        // fits a frame, nor does more than the interface MTU allows.
        let max = max_sectors_for_mtu(iface.mtu) as u64;
        if count == 0 || count > max || ATA_HEADER_LEN + req.transfer_len() > reply.len() {
            return self.ata_status(rsp, arg, abort, error_bits::ABRT, reply);
        }
        if write != req.aflags.contains(AtaFlags::WRITE) {
            return self.ata_status(rsp, arg, abort, error_bits::ABRT, reply);
        }
        let lba = req.effective_lba();
        if lba
            .checked_add(count)
            .is_none_or(|end| end > self.cfg.sectors)
        {
            return self.ata_status(rsp, arg, abort, error_bits::IDNF | error_bits::ABRT, reply);
        }
        let offset = lba * SECTOR_SIZE as u64;
        if write {
            if self.cfg.read_only {
                return self.ata_status(rsp, arg, abort, error_bits::ABRT, reply);
            }
            let len = req.transfer_len();
            // A copy of a write admitted moments ago (a network duplicate) is dropped while
            // that write is in flight or once a newer write overlapped it: run then, it would
            // put the old data back over acknowledged new data. No digest of the data: the
            // daemon's batch pass already hinted the index line (`dedup_line`).
            let key = dedup::Key::of_write(rsp.dst, rsp.tag.0, req);
            let admitted = match self.dedup.admit(self.now, key) {
                Ok(a) => a,
                Err(dedup::Seen::Superseded) => {
                    self.stats.dedup.dropped_superseded += 1;
                    return Outcome::Drop(DropReason::DuplicateSuperseded);
                }
                Err(_) => {
                    self.stats.dedup.dropped_in_flight += 1;
                    return Outcome::Drop(DropReason::DuplicateInFlight);
                }
            };
            let out = self.start_io(
                rsp,
                arg,
                IoKind::Write {
                    offset,
                    data: ATA_HEADER_LEN..ATA_HEADER_LEN + len,
                },
                PendingKind::Write {
                    sectors: u32::from(req.sector_count),
                },
            );
            if let Some(a) = admitted {
                match &out {
                    Outcome::Io(io) => {
                        if a.again {
                            self.stats.dedup.executed_again += 1;
                        }
                        if let Some(p) = self
                            .pending
                            .get_mut(io.token.0 as usize)
                            .and_then(Option::as_mut)
                        {
                            p.dedup = NonZeroU64::new(a.seq);
                        }
                    }
                    // Not executed (over the buffer count): it stays its key's write, not
                    // run, so that a copy runs unless a later write overlapped it.
                    _ => self.dedup.forget(a.seq),
                }
            }
            out
        } else {
            let len = req.transfer_len();
            self.start_io(
                rsp,
                arg,
                IoKind::Read { offset, len },
                PendingKind::Read {
                    sectors: u32::from(req.sector_count),
                },
            )
        }
    }

    fn smart(
        &mut self,
        rsp: &HeaderRepr,
        req: &AtaRepr<'_>,
        arg: &mut [u8; ATA_ARG_LEN],
        reply: &mut [u8],
    ) -> Outcome {
        let abort = status::DRDY | status::ERR;
        match req.err_feature {
            // Non-data SMART commands. aoetools' aoeping reads a 512-byte data area after
            // the ATA header of every SMART reply and ignores shorter frames, so these replies
            // carry a zeroed sector (trailing bytes an ATA reply's reader may ignore).
            smart::RETURN_STATUS => {
                // LBA mid/high 0x4F/0xC2: no threshold exceeded.
                arg[5] = smart::SIGNATURE.0;
                arg[6] = smart::SIGNATURE.1;
                self.ata_data_reply(rsp, arg, &[0u8; 512], reply)
            }
            smart::ENABLE | smart::DISABLE | smart::OFFLINE_IMMEDIATE => {
                self.ata_data_reply(rsp, arg, &[0u8; 512], reply)
            }
            smart::READ_DATA => {
                let page = smart_data_page();
                self.ata_data_reply(rsp, arg, &page, reply)
            }
            _ => self.ata_status(rsp, arg, abort, error_bits::ABRT, reply),
        }
    }

    /// Hands out a token for disk work, or drops the request if the interface it came in
    /// on already has the buffer count in flight, or its source its fair share of it while
    /// another waits (the `share` module).
    fn start_io(
        &mut self,
        rsp: &HeaderRepr,
        arg: &[u8; ATA_ARG_LEN],
        kind: IoKind,
        pending: PendingKind,
    ) -> Outcome {
        let iface = self.cur_iface;
        // The reply goes back to the request's source (`rsp.dst`).
        let src = match self
            .shares
            .admit(iface, rsp.dst, u32::from(self.cfg.buffer_count))
        {
            Ok(id) => id,
            Err(share::Refusal::Full) => return Outcome::Drop(DropReason::OverBufferCount),
            Err(share::Refusal::OverShare) => return Outcome::Drop(DropReason::OverFairShare),
        };
        let mut header = [0u8; aoe_wire::HEADER_LEN];
        let _ = rsp.emit(&mut header);
        let p = Pending {
            header,
            ata: *arg,
            // Interface indexes are the daemon's, a handful.
            iface: iface as u32,
            src,
            kind: pending,
            dedup: None,
        };
        let token = match self.free.pop() {
            Some(t) => {
                self.pending[t as usize] = Some(p);
                t
            }
            None => {
                self.pending.push(Some(p));
                (self.pending.len() - 1) as u32
            }
        };
        self.in_flight += 1;
        self.stats.max_in_flight = self.stats.max_in_flight.max(self.in_flight);
        Outcome::Io(IoRequest {
            token: Token(token),
            kind,
        })
    }

    /// Gives up disk work without replying (the driver could not queue it): the token is
    /// free again and the request counts as dropped; the initiator retransmits. False for a
    /// token that is not in flight.
    pub fn abort(&mut self, token: Token) -> bool {
        let Some(p) = self
            .pending
            .get_mut(token.0 as usize)
            .and_then(Option::take)
        else {
            return false;
        };
        self.free.push(token.0);
        self.in_flight -= 1;
        self.shares.release(p.iface as usize, p.src);
        self.stats.dropped += 1;
        if let Some(seq) = p.dedup {
            self.dedup.forget(seq.get());
        }
        true
    }

    /// Completes disk work: writes the reply header (and, on failure, an ATA error) into
    /// `reply`, whose data area a read has filled, and returns the length to send. `None`
    /// for a token that is not in flight.
    #[must_use = "the reply written to the buffer must be sent"]
    pub fn complete(
        &mut self,
        token: Token,
        result: Result<(), IoFailure>,
        reply: &mut [u8],
    ) -> Option<usize> {
        let p = self.pending.get_mut(token.0 as usize)?.take()?;
        self.free.push(token.0);
        self.in_flight -= 1;
        self.shares.release(p.iface as usize, p.src);
        self.stats.replies += 1;
        let (st, err) = match result {
            Ok(()) => (status::DRDY, 0),
            Err(IoFailure::Medium) => (status::DRDY | status::ERR, error_bits::UNC),
            Err(IoFailure::Aborted) => (status::DRDY | status::ERR, error_bits::ABRT),
        };
        if let Some(seq) = p.dedup {
            self.dedup.finish(seq.get());
        }
        let data_len = match (p.kind, result) {
            (PendingKind::Read { sectors }, Ok(())) => {
                self.stats.sectors_read += u64::from(sectors);
                sectors as usize * SECTOR_SIZE
            }
            (PendingKind::Write { sectors }, Ok(())) => {
                self.stats.sectors_written += u64::from(sectors);
                0
            }
            (PendingKind::Flush, Ok(())) => {
                self.stats.flushes += 1;
                0
            }
            (_, Err(_)) => {
                self.stats.ata_errors += 1;
                0
            }
        };
        // `reply` holds the header and at least 60 bytes, as `handle_frame` checked when it
        // took the request (the same buffer, or one of the same length).
        reply[..aoe_wire::HEADER_LEN].copy_from_slice(&p.header);
        Some(write_ata_tail(&p.ata, st, err, data_len, reply))
    }

    /// An ATA reply without data.
    fn ata_status(
        &mut self,
        rsp: &HeaderRepr,
        arg: &[u8; ATA_ARG_LEN],
        st: u8,
        err: u8,
        reply: &mut [u8],
    ) -> Outcome {
        if st & status::ERR != 0 {
            self.stats.ata_errors += 1;
        }
        if reply.len() < MIN_FRAME_LEN {
            return Outcome::Drop(DropReason::Malformed);
        }
        Outcome::Reply(write_ata_reply(rsp, arg, st, err, 0, reply))
    }

    /// An ATA reply carrying `data` (IDENTIFY, SMART READ DATA).
    fn ata_data_reply(
        &mut self,
        rsp: &HeaderRepr,
        arg: &[u8; ATA_ARG_LEN],
        data: &[u8],
        reply: &mut [u8],
    ) -> Outcome {
        if reply.len() < ATA_HEADER_LEN + data.len() {
            return Outcome::Drop(DropReason::Malformed);
        }
        reply[ATA_HEADER_LEN..ATA_HEADER_LEN + data.len()].copy_from_slice(data);
        Outcome::Reply(write_ata_reply(
            rsp,
            arg,
            status::DRDY,
            0,
            data.len(),
            reply,
        ))
    }
}

/// Writes an ATA reply header in front of `data_len` bytes already in place and pads to the
/// Ethernet minimum with zeros (never with stale bytes of an earlier frame). The argument is
/// the request's echoed, with status and error registers set.
fn write_ata_reply(
    header: &HeaderRepr,
    arg: &[u8; ATA_ARG_LEN],
    st: u8,
    err: u8,
    data_len: usize,
    reply: &mut [u8],
) -> usize {
    // Callers checked that `reply` holds 36 + data_len and at least 60 bytes.
    let _ = header.emit(reply);
    write_ata_tail(arg, st, err, data_len, reply)
}

/// The ATA header and padding of a reply whose AoE header is in place: as
/// [`write_ata_reply`], for [`Engine::complete`], which copies the header's bytes.
fn write_ata_tail(
    arg: &[u8; ATA_ARG_LEN],
    st: u8,
    err: u8,
    data_len: usize,
    reply: &mut [u8],
) -> usize {
    let mut a = AtaPacket::new_unchecked(&mut reply[aoe_wire::HEADER_LEN..]);
    a.arg_mut().copy_from_slice(arg);
    a.set_err_feature(err);
    a.set_cmd_status(st);
    let len = ATA_HEADER_LEN + data_len;
    if len < MIN_FRAME_LEN {
        reply[len..MIN_FRAME_LEN].fill(0);
    }
    len.max(MIN_FRAME_LEN)
}

/// True if `frame` is an AoE ATA request for IDENTIFY DEVICE (whoever it is addressed to):
/// the daemon re-reads its store's size before handing such a frame to [`Engine::handle_frame`],
/// so a resize shows on the initiator's next IDENTIFY. A frame too short for the AoE and ATA
/// headers, or not AoE, is false. The daemon asks it of every frame, so it reads only the
/// fixed headers (the R flag, the command, the ATA command register 0xEC), as
/// [`is_reserve_request`] does: a whole [`Message::parse`] here was a second parse of every
/// request, the engine's being the first. A frame it takes for IDENTIFY that the engine
/// then refuses (a W flag with a sector count the frame does not carry) costs only the
/// store's size read again.
pub fn is_identify_request(frame: &[u8]) -> bool {
    let Ok(f) = Frame::new_checked(frame) else {
        return false;
    };
    if f.is_response() || f.command() != Command::Ata {
        return false;
    }
    AtaPacket::new_checked(f.payload())
        .is_ok_and(|a| AtaCommand::from(a.cmd_status()) == AtaCommand::IdentifyDevice)
}

/// True if `frame` is an AoE Reserve/Release request (command 3, whoever it is addressed
/// to): the daemon notes the reserve list before handing such a frame to
/// [`Engine::handle_frame`], so a change can be stored where other targets of the same
/// store see it before the reply goes out. Only the fixed header is looked at.
pub fn is_reserve_request(frame: &[u8]) -> bool {
    match Frame::new_checked(frame) {
        Ok(f) => {
            f.ethertype() == aoe_wire::ETHERTYPE_AOE
                && !f.is_response()
                && f.command() == Command::ReserveRelease
        }
        Err(_) => false,
    }
}

/// IDENTIFY word 53 (field validity): bit 0 vouches for words 54-58, bit 1 for 64-70, bit 2
/// for 88. None of them is filled here, so the word claims nothing (vblade's `atainit`
/// leaves it zero too).
const IDENTIFY_WORD53: u16 = 0x0000;

/// IDENTIFY word 93 (hardware reset result) as vblade's `atainit` and ggaoed set it: 0x400b,
/// bit 14 set and bit 15 clear (word valid), device 0 passed diagnostics (bit 3), device 0
/// number determined by jumper (bits 2:1 = 01), bit 0 set.
const IDENTIFY_WORD93: u16 = 0x400b;

/// The IDENTIFY DEVICE page of an export: the common page of [`Identify::build`] with words 53
/// and 93 as vblade and ggaoed report them, and the integrity checksum (word 255) redone.
fn identify_page(cfg: &ExportConfig) -> [u8; 512] {
    let mut p = Identify {
        model: cfg.model.clone(),
        serial: cfg.serial.clone(),
        firmware: cfg.firmware.clone(),
        sectors: cfg.sectors,
        write_cache: true,
        smart: true,
    }
    .build();
    p[106..108].copy_from_slice(&IDENTIFY_WORD53.to_le_bytes());
    p[186..188].copy_from_slice(&IDENTIFY_WORD93.to_le_bytes());
    // Word 255: signature 0xA5, then a checksum byte making the page sum to zero mod 256.
    p[510] = 0xa5;
    let sum = p[..511].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    p[511] = 0u8.wrapping_sub(sum);
    p
}

/// A SMART READ DATA page: no attributes, offline collection never started, self-test
/// passed, SMART capabilities word and a valid checksum in byte 511.
fn smart_data_page() -> [u8; 512] {
    let mut p = [0u8; 512];
    p[0] = 0x10; // data structure revision
    p[362] = 0x00; // off-line data collection status: never started
    p[363] = 0x00; // self-test execution status: passed
    p[367] = 0x00; // off-line collection capability: none
    p[368] = 0x03; // SMART capability: saves data over power cycles, supports autosave
    p[370] = 0x01; // error logging supported
    let sum = p[..511].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    p[511] = 0u8.wrapping_sub(sum);
    p
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DropReason::Malformed => "malformed frame",
            DropReason::Response => "response frame",
            DropReason::NotForUs => "addressed elsewhere",
            DropReason::Masked => "source not on the mac mask list",
            DropReason::ConfigMismatch => "config test did not match",
            DropReason::UnknownInterface => "unknown interface",
            DropReason::OverBufferCount => "buffer count reached",
            DropReason::OverFairShare => "source holds its share of the buffer count",
            DropReason::QueryRateLimited => "query answers for this source used up",
            DropReason::DuplicateInFlight => "copy of a write in flight",
            DropReason::DuplicateSuperseded => "copy of a write overwritten since",
            DropReason::ReplyTooLong => "reply does not fit the reply buffer",
        })
    }
}

#[cfg(test)]
mod tests;
