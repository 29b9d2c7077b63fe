//! The network thread: owns the sans-I/O initiator engine and the AF_PACKET sockets, runs
//! commands from the file system, and publishes device state for it to read.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use aoe_proto::initiator::{
    BlockOp, CountedMap, DeviceInfo, Engine, Event, FlushWhich, IoError, IoId, SourceId,
    SubmitError, TxFrame,
};
use aoe_proto::ratelimit::RateLimiter;
use aoe_sys::{EventFd, LinkEvents, PacketRing, PacketSocket, PollFd, RecvBatch};
use aoe_wire::{MacAddr, TargetAddr};
use crossbeam_channel::{Receiver, Sender};

use crate::blockdev::rangelock::RangeLocks;
use crate::errlog::ErrLog;
use crate::iostats::IoBytes;
use crate::partition::{self, Partition};

/// Called once with the outcome of an I/O: read data, or an errno.
pub type Done = Box<dyn FnOnce(Result<Option<Vec<u8>>, i32>) + Send>;

/// Called once with the outcome of a read whose bytes stay in the receive ring
/// ([`Handle::read_held`]): the read's bytes in order, as slices valid only during the call
/// (their slots go back to the kernel when it returns), or an errno.
pub type DoneHeld = Box<dyn FnOnce(Result<&[&[u8]], i32>) + Send>;

/// Work for the network thread.
pub enum Cmd {
    /// Block I/O on a device.
    Io {
        /// The device.
        dev: TargetAddr,
        /// What to do.
        op: BlockOp,
        /// Who submits it ([`Handle::new_source`]): the device's queue serves its sources
        /// in turn.
        source: SourceId,
        /// Called on completion.
        done: Done,
    },
    /// A read whose answers' payloads stay in the receive ring's slots until `done` has
    /// seen them ([`Handle::read_held`]).
    IoHeld {
        /// The device.
        dev: TargetAddr,
        /// First sector.
        lba: u64,
        /// Sectors (at least 1).
        sectors: u32,
        /// Who submits it.
        source: SourceId,
        /// Called on completion, on the network thread.
        done: DoneHeld,
    },
    /// Broadcast a Query Config on every allowed interface (and pick up new interfaces).
    Discover,
    /// Re-query and re-IDENTIFY a device, then re-read its partition table.
    Revalidate(TargetAddr, Sender<Result<(), String>>),
    /// Remove devices.
    Flush(FlushWhich, Sender<Vec<TargetAddr>>),
    /// Restrict AoE to these interfaces (empty: all).
    SetInterfaces(Vec<String>, Sender<Result<(), String>>),
    /// A device file was opened (true) or closed (false). Counted: the device is open while
    /// any file on it (device or partition, any number of opens) is.
    SetOpen(TargetAddr, bool),
    /// A read's buffer the front-end is done with, for the engine to fill a later read into
    /// ([`Engine::recycle_read_buffer`]).
    Recycle(Vec<u8>),
    /// A front-end's source of requests, served on the network thread from now on
    /// ([`Source`]).
    AddSource(Box<dyn Source>),
    /// Stop the thread.
    Stop,
}

/// What a [`Source`] waits for before the network thread runs it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// Its fd becoming readable (or an error or hang-up on it).
    Read,
    /// Nothing: run it on this pass of the loop (it has work it can do without reading).
    Now,
    /// Another thread's [`Handle::wake`] (it waits for room its own completions or
    /// another thread free); asked again on every pass of the loop.
    Wake,
}

/// A front-end's connection served on the network thread itself: a pollable fd and a
/// handler the loop calls when it is ready, so that a request goes from the client's
/// socket to [`Engine::submit`] on one thread, without a reader thread's wake-up and a
/// command channel's eventfd in between (the NBD server's transmission phase, `aoe-nbd`;
/// the FUSE ring under `--fuse-uring`, `aoe-fuse`).
///
/// On the network thread every [`Handle`] submits directly: [`Handle::io`],
/// [`Handle::read_held`] and everything built on them ([`crate::blockdev::BlockDevice`],
/// the range locks' continuations) queue the command on a list the loop runs before it
/// sleeps, with no channel and no eventfd.
///
/// A source must never block: it reads what its fd has with non-blocking calls, keeps a
/// partial request for the next readiness, and parks work that would wait (a cap on its
/// memory, a range lock: those continue from callbacks). It is dropped when
/// [`run`](Source::run) returns false, or when the thread stops.
pub trait Source: Send {
    /// The fd polled while [`interest`](Source::interest) is [`Interest::Read`].
    fn fd(&self) -> RawFd;
    /// What the source waits for now; asked before every `poll(2)` of the loop.
    fn interest(&mut self) -> Interest;
    /// Called on the network thread when the fd is ready or the source asked to run now.
    /// Reads, parses and submits what it can without blocking, and returns; false when the
    /// source is finished (the loop drops it).
    fn run(&mut self) -> bool;
    /// Called once as the thread stops, after the I/O still in flight has failed
    /// (`EIO`) and before the source is dropped: a source that answers its clients from
    /// the thread itself sends those answers here (the FUSE ring, `aoe-fuse`).
    fn stopping(&mut self) {}
}

thread_local! {
    /// This thread is the network thread (set by [`Net::run`]).
    static ON_NET: Cell<bool> = const { Cell::new(false) };
    /// Commands the network thread gave itself (through a [`Handle`], from a [`Source`] or
    /// a completion), run before it sleeps again.
    static LOCAL: RefCell<Vec<Cmd>> = const { RefCell::new(Vec::new()) };
}

/// Whether the calling thread is the network thread.
fn on_net() -> bool {
    ON_NET.with(Cell::get)
}

/// Fails a command that will never run (the network thread stopping or gone): its I/O
/// completes with EIO. Any other command is dropped, and with it any reply channel it
/// carries, so that whoever waits on one sees it closed.
fn fail_cmd(cmd: Cmd) {
    match cmd {
        Cmd::Io { done, .. } => done(Err(libc::EIO)),
        Cmd::IoHeld { done, .. } => done(Err(libc::EIO)),
        _ => {}
    }
}

/// A command in the network thread's channel. Dropped without being received, its I/O
/// fails with EIO ([`fail_cmd`]): crossbeam drops what is still queued when the last
/// receiver goes, so a command sent in the instant between the stop's last look at the
/// channel and the receiver's end ([`Net::shut_down`]) is failed there instead of being
/// dropped with its callback uncalled (a FUSE ring entry or an NBD reply waiting for ever).
struct Queued(Option<Cmd>);

impl Queued {
    /// The command, which the network thread runs from now on.
    fn into_cmd(mut self) -> Cmd {
        self.0.take().expect("a queued command is taken once")
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if let Some(cmd) = self.0.take() {
            fail_cmd(cmd);
        }
    }
}

/// Hands `each` the commands the network thread queued for itself, and those they queue
/// in turn, until none is left.
fn drain_local(mut each: impl FnMut(Cmd)) {
    loop {
        let local = LOCAL.with(|q| std::mem::take(&mut *q.borrow_mut()));
        if local.is_empty() {
            return;
        }
        local.into_iter().for_each(&mut each);
    }
}

fn local_pending() -> bool {
    LOCAL.with(|q| !q.borrow().is_empty())
}

/// A device as the file system shows it.
#[derive(Debug, Clone)]
pub struct DevEntry {
    /// The engine's view.
    pub info: DeviceInfo,
    /// Partitions found on it.
    pub partitions: Vec<Partition>,
    /// The loop device attached to it (`--loop`).
    pub loop_device: Option<String>,
    /// The raw IDENTIFY page of its latest answer (what `HDIO_GET_IDENTITY` returns).
    pub identify_page: Option<Vec<u8>>,
    /// The driver's `DEVFL_KICKME` ("slow polling network card catch"): frames for it wait
    /// because the network layer holds the send buffers, here a full socket send buffer
    /// (EAGAIN) on one of its interfaces with frames backlogged. Cleared when the backlog
    /// drains, as the driver's timer clears the flag and kicks the queue.
    pub kickme: bool,
}

/// What became of a partition scan ([`Shared::finish_scan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Its table is the device's now.
    Stored,
    /// A later scan was started, or the device is gone: dropped.
    Stale,
    /// It would change a partition that is open: the old table stays.
    Busy,
}

/// State shared between the network thread and the file system.
#[derive(Default)]
pub struct Shared {
    /// Known devices.
    pub devices: BTreeMap<TargetAddr, DevEntry>,
    /// The interface restriction as written (empty: all).
    pub iflist: Vec<String>,
    /// Interfaces in use.
    pub active_ifaces: Vec<String>,
    /// Diagnostic lines not yet read from `err` (at most [`ERR_LINES`]).
    pub err: VecDeque<String>,
    /// Readers of `err` waiting for a line, with their process IDs.
    pub err_waiters: Vec<(u32, Box<dyn ErrWaiter>)>,
    /// Opens of device (partition 0) and partition files through FUSE, by (device,
    /// partition); a `--loop` device holds one open of its `eX.Y`. What [`crate::in_use`]
    /// counts when asked to stop.
    pub open_files: BTreeMap<(TargetAddr, u32), u32>,
    /// NBD clients in transmission, by export name.
    pub nbd_clients: BTreeMap<String, u32>,
    /// The rate limit of the log copy of `err` lines.
    pub err_log: ErrLog,
    /// Bytes read and written per device (metrics).
    pub io_bytes: Arc<IoBytes>,
    /// Frames and lines dropped, by reason (metrics), as of the last publication.
    pub drops: Drops,
    /// Partition scans started (numbers them), and the number of the latest of each
    /// known device: [`Shared::start_scan`], [`Shared::finish_scan`].
    pub(crate) scans_started: u64,
    pub(crate) latest_scan: BTreeMap<TargetAddr, u64>,
}

/// What the initiator dropped, by reason: the engine's counters of frames that belong to no
/// device, frames the send path could not queue, and `err` lines lost to a full ring.
#[derive(Debug, Clone, Copy, Default)]
pub struct Drops {
    /// The engine's counters (malformed frames, unknown devices, caps reached, ...).
    pub engine: aoe_proto::initiator::Stats,
    /// Frames dropped with the send buffer full and the backlog at [`BACKLOG`].
    pub send_buffer_full: u64,
    /// Frames the kernel refused from a transmit ring (`TP_STATUS_WRONG_FORMAT`: longer
    /// than the interface's MTU, or malformed), summed over the interfaces' rings, those
    /// closed since included: not sent, and no socket error says so.
    pub tx_rejected: u64,
    /// `err` lines dropped because [`ERR_LINES`] were waiting unread.
    pub err_ring_full: u64,
}

/// A reader blocked on the `err` control file (a FUSE read, in `aoe-fuse`), answered once.
pub trait ErrWaiter: Send {
    /// Answers the read with a diagnostic line.
    fn line(self: Box<Self>, line: &[u8]);
    /// Answers the read with EINTR (its process has a signal pending, or the daemon stops).
    fn interrupted(self: Box<Self>);
}

/// Lines `err` keeps, like the driver's ring of 100 messages.
pub const ERR_LINES: usize = 100;

impl Shared {
    /// Queues a diagnostic line, handing it straight to a waiting reader if there is one,
    /// and logs it at INFO, lines a dead target repeats rate-limited ([`ErrLog`]).
    pub fn push_err(&mut self, line: String) {
        if let Some(l) = self.err_log.filter(Instant::now(), &line) {
            tracing::info!(target: "aoe::err", "{l}");
        }
        let mut line = line;
        line.push('\n');
        if let Some((_, w)) = self.err_waiters.pop() {
            w.line(line.as_bytes());
            return;
        }
        // aoechr.c `aoechr_error`: with NMSG (100) messages unread the new one is dropped,
        // so a burst cannot push out the lines that came before it.
        if self.err.len() >= ERR_LINES {
            self.drops.err_ring_full += 1;
            return;
        }
        self.err.push_back(line);
    }
}

impl Shared {
    /// Numbers a new partition scan of `dev`; it is the latest of `dev` from now on.
    fn start_scan(&mut self, dev: TargetAddr) -> u64 {
        self.scans_started += 1;
        self.latest_scan.insert(dev, self.scans_started);
        self.scans_started
    }

    /// Stores the partitions scan `n` of `dev` found, unless a later scan of `dev` was
    /// started since (or the device is gone): scans run on threads of their own, so the
    /// one an `up` started can finish after the one a resize or revalidate started next,
    /// and its table, read at the old size, must not replace the newer one.
    ///
    /// Nor while a partition that is open (a FUSE open of its `eX.YpN`, or an NBD client
    /// on that export) would move, shrink, grow or vanish: its open file and its NBD
    /// session would go on at the new place, or at the old one, while the other file shows
    /// the new table, and a file system on it would write over whatever is there now. The
    /// kernel refuses any re-read while a partition is open (`bdev_disk_changed`,
    /// `disk_scan_partitions`: `open_partitions` means `-EBUSY`, what `BLKRRPART` answers);
    /// here only a change to an open partition keeps the old table (whole), and a line in
    /// `err` says which is open. A new table that leaves every open partition where it was
    /// is taken (a partition added beside one in use).
    fn finish_scan(&mut self, dev: TargetAddr, n: u64, parts: Vec<Partition>) -> Scan {
        if self.latest_scan.get(&dev) != Some(&n) {
            return Scan::Stale;
        }
        let Some(e) = self.devices.get(&dev) else {
            return Scan::Stale;
        };
        let moved: Vec<String> = e
            .partitions
            .iter()
            .filter(|old| !parts.contains(old) && self.partition_open(dev, old.number))
            .map(|old| format!("{dev}p{}", old.number))
            .collect();
        if !moved.is_empty() {
            self.push_err(format!(
                "{dev}: partition table changed, not re-read while {} open (close it, then \
                 write {dev} to revalidate)",
                moved.join(", ")
            ));
            return Scan::Busy;
        }
        if let Some(e) = self.devices.get_mut(&dev) {
            e.partitions = parts;
        }
        Scan::Stored
    }

    /// The devices an NBD client is connected to (on the device's export or one of its
    /// partitions'), with the busy reason `flush` logs for them: a flush must not remove a
    /// device under its NBD clients, as it does not under an open file (`aoedev_flush`
    /// skips a device with `nopen`).
    pub(crate) fn nbd_held(&self) -> BTreeMap<TargetAddr, String> {
        let mut held = BTreeMap::new();
        for (export, &n) in &self.nbd_clients {
            let dev = export.split_once('p').map_or(export.as_str(), |(d, _)| d);
            if let (Ok(a), true) = (dev.parse::<TargetAddr>(), n > 0) {
                held.insert(a, format!("NBD client on {export}"));
            }
        }
        held
    }

    /// Whether partition `number` of `dev` is open: its file through FUSE, or its export
    /// (`eX.YpN`) by an NBD client.
    fn partition_open(&self, dev: TargetAddr, number: u32) -> bool {
        let open = |n: Option<&u32>| n.is_some_and(|&n| n > 0);
        open(self.open_files.get(&(dev, number)))
            || open(self.nbd_clients.get(&format!("{dev}p{number}")))
    }

    /// Answers EINTR to readers of `err` whose process has a signal pending or is gone. A
    /// FUSE request the daemon has taken cannot be killed until it is answered, so without
    /// this `timeout cat err` or Ctrl-C would hang like an unkillable read.
    pub fn interrupt_err_waiters(&mut self) {
        let mut i = 0;
        while i < self.err_waiters.len() {
            if signal_pending(self.err_waiters[i].0) {
                let (_, w) = self.err_waiters.swap_remove(i);
                w.interrupted();
            } else {
                i += 1;
            }
        }
    }

    /// Logs the counts of `err` lines suppressed from the log by kinds gone quiet.
    pub fn flush_err_log(&mut self, now: Instant) {
        for l in self.err_log.flush(now) {
            tracing::info!(target: "aoe::err", "{l}");
        }
    }
}

/// True if process `pid` is gone or has a signal pending (`SigPnd`/`ShdPnd` in
/// /proc/PID/status).
fn signal_pending(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true;
    };
    status.lines().any(|l| {
        (l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
            && l.split_whitespace()
                .nth(1)
                .is_some_and(|v| !v.trim_start_matches('0').is_empty())
    })
}

/// Locks the shared state, surviving a poisoned lock (a panicking FUSE callback must not
/// take the daemon down with it).
pub fn lock(s: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// The shared state if no one else holds it now (poisoned or not), else `None`: for the
/// network thread's housekeeping, which must never wait for a front-end
/// (`Net::housekeeping`).
pub fn try_lock(s: &Mutex<Shared>) -> Option<MutexGuard<'_, Shared>> {
    match s.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// Cached copies of a device's sectors kept outside the initiator that a write through
/// another front-end must drop before it is answered: the FUSE device files' page cache
/// (`aoe-fuse`), which an NBD client's write does not pass through. On a real block device
/// every writer goes through the one page cache of the device, and a direct write drops
/// its range from it before it returns (Linux `kiocb_invalidate_post_direct_write`); the
/// NBD front-end's writes do the same through [`Handle::drop_cached`].
pub trait CachedViews: Send + Sync {
    /// Sectors `[lba, lba + sectors)` of `dev` were written (the target answered): drop
    /// every cached copy of them, then run `then`, on any thread (at once where nothing
    /// holds a copy). `then` must run even if the copies cannot be dropped.
    fn written(&self, dev: TargetAddr, lba: u64, sectors: u64, then: Box<dyn FnOnce() + Send>);
}

/// The file system's handle on the network thread.
#[derive(Clone)]
pub struct Handle {
    tx: Sender<Queued>,
    wake: Arc<EventFd>,
    locks: RangeLocks,
    /// Who keeps cached copies of sectors ([`Handle::set_cached_views`]), once set.
    views: Arc<OnceLock<Box<dyn CachedViews>>>,
    bytes: Arc<IoBytes>,
    /// Whom the I/O submitted through this handle (and its clones) comes from: the
    /// device's queue serves its sources in turn ([`Engine::submit_from`]).
    source: SourceId,
    /// The last source id given out ([`Handle::new_source`]).
    sources: Arc<AtomicU32>,
}

impl Handle {
    /// Sends a command and wakes the thread; on the network thread itself (a [`Source`],
    /// a completion), queues it for the loop to run before it sleeps, without the channel
    /// and the eventfd.
    pub fn send(&self, cmd: Cmd) {
        if on_net() {
            LOCAL.with(|q| q.borrow_mut().push(cmd));
        } else {
            // The network thread gone (stopped), the command comes back and is dropped
            // here: nothing will run it, so its I/O fails ([`Queued`]) rather than leave
            // its caller waiting for ever.
            if self.tx.send(Queued(Some(cmd))).is_ok() {
                let _ = self.wake.notify();
            }
        }
    }

    /// Wakes the network thread so it asks its [`Source`]s again what they wait for
    /// (nothing to do on the network thread itself: it asks before it sleeps).
    pub fn wake(&self) {
        if !on_net() {
            let _ = self.wake.notify();
        }
    }

    /// A handle whose I/O (and that of its clones) comes from a source of its own: an NBD
    /// connection, an open device file. A device's queued commands are served in turn among
    /// their sources, 256 KiB each, so that one source's backlog does not hold up
    /// another's next request; each source's own keep their order. The handle from
    /// [`Net::handle`] and its clones are [`SourceId::DEFAULT`] (the control paths).
    pub fn new_source(&self) -> Handle {
        // 1 up to ENGINE's id less one, then round again: DEFAULT and ENGINE never. Two
        // sources sharing an id after 4 billion others share a lane, nothing worse.
        let id = self.sources.fetch_add(1, Ordering::Relaxed) % (SourceId::ENGINE.0 - 1) + 1;
        Handle {
            source: SourceId(id),
            ..self.clone()
        }
    }

    /// The source this handle's I/O comes from.
    pub fn source(&self) -> SourceId {
        self.source
    }

    /// Submits I/O.
    pub fn io(&self, dev: TargetAddr, op: BlockOp, done: Done) {
        let done = self.bytes.counting(dev, &op, done);
        let source = self.source;
        self.send(Cmd::Io {
            dev,
            op,
            source,
            done,
        });
    }

    /// Reads `sectors` sectors at `lba`, the answers' payloads left in the receive ring where
    /// the kernel put them ([`BlockOp::ReadHeld`]): `done` gets them as slices, on the
    /// network thread, and must be done with them when it returns (a front-end writes them
    /// to its client there, or copies them). Where a slot is needed back first, or the
    /// interface has no ring, those bytes are copied as for any read.
    pub fn read_held(&self, dev: TargetAddr, lba: u64, sectors: u32, done: DoneHeld) {
        let done = self.bytes.counting_held(dev, done);
        self.send(Cmd::IoHeld {
            dev,
            lba,
            sectors,
            source: self.source,
            done,
        });
    }

    /// Hands a read's buffer back once the front-end is done with it (the reply sent), so
    /// the engine fills a later read into pages already in memory instead of fresh ones
    /// ([`Engine::recycle_read_buffer`]). Does not wake the thread: the buffer is taken in
    /// with the next command or frame.
    pub fn recycle(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 {
        } else if on_net() {
            LOCAL.with(|q| q.borrow_mut().push(Cmd::Recycle(buf)));
        } else {
            let _ = self.tx.send(Queued(Some(Cmd::Recycle(buf))));
        }
    }

    /// The sector range locks every front-end takes around its I/O (one table per
    /// daemon, shared by the FUSE files and the NBD server).
    pub fn locks(&self) -> &RangeLocks {
        &self.locks
    }

    /// Sets who keeps cached copies of sectors (the FUSE mount, once); a second call
    /// changes nothing.
    pub fn set_cached_views(&self, views: Box<dyn CachedViews>) {
        let _ = self.views.set(views);
    }

    /// Drops every cached copy of sectors `[lba, lba + sectors)` of `dev` that
    /// [`CachedViews`] keep, then runs `then` (at once where none is set).
    pub fn drop_cached(
        &self,
        dev: TargetAddr,
        lba: u64,
        sectors: u64,
        then: Box<dyn FnOnce() + Send>,
    ) {
        match self.views.get() {
            Some(v) => v.written(dev, lba, sectors, then),
            None => then(),
        }
    }
}

/// Frames per interface waiting for room in its socket's send buffer.
pub const BACKLOG: usize = 256;

/// Most frames taken from one interface per pass of the loop. A flood arriving faster than
/// the engine digests it must not keep the thread in the receive loop: between batches it
/// runs commands (the front-ends' I/O), timers and sends, so a legitimate device keeps
/// being served while the socket's receive buffer overflows and the kernel drops the rest.
pub const RX_BUDGET: usize = 256;

/// Frames taken from a socket per `recvmmsg(2)`, and at most sent per `sendmmsg(2)` chunk
/// (what `aoe serve` and independent generators batch): one system call per batch instead
/// of one per frame, the engine's answers sent after each batch so the window refills.
pub const RX_BATCH: usize = 64;

/// Bytes of each slot of the `recvmmsg` batch ([`Net::rxb`]) at first: a 9000-byte MTU plus
/// the Ethernet header, with room to spare. An interface of a larger MTU that receives
/// without a ring grows the slots to its frames ([`fit_recv_batch`]); a frame longer than a
/// slot is cut, counted as truncated and ignored, so without that a read at MTU 65535
/// (127 sectors, 65,060-byte answers) would never complete there.
const FRAME_BUF: usize = 9216 + 14;

/// Makes `rxb`'s slots hold a whole frame of an `mtu`-byte interface, replacing the batch
/// with one of larger slots if they are shorter (the frames it held were handled already:
/// it is only read between `recv_batch` and the end of the same pass). Never shrinks it.
fn fit_recv_batch(rxb: &mut RecvBatch, mtu: u32) {
    let cap = aoe_sys::frame_capacity(mtu);
    if rxb.frame_size() < cap {
        *rxb = RecvBatch::new(rxb.capacity(), cap);
    }
}

/// Shortest time between two copies of the device list into [`Shared`] made only because
/// I/O completed (device events publish at once): copying every device's information after
/// every completion would cost `--max-devices` copies per I/O.
const IO_PUBLISH_INTERVAL: Duration = Duration::from_millis(250);

/// Shortest time between two rounds of the network thread's housekeeping on the shared
/// state ([`Net::housekeeping`]): a reader of `err` interrupted by a signal is answered
/// within this (or the loop's one-second wake-up when idle), and the loop, which turns
/// thousands of times a second under I/O, does not read `/proc` for every blocked reader
/// of `err` or take the lock the front-ends' attribute reads take on every turn.
const HOUSEKEEPING: Duration = Duration::from_millis(20);

/// Log lines about frames (send failures, full buffers): one per kind per second.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

struct Iface {
    name: String,
    /// The interface's index when its socket was opened: a new interface of the same name
    /// (deleted and re-created) has another and needs a new socket.
    index: u32,
    sock: PacketSocket,
    /// The socket's receive ring ([`RxRing`]), or `None` where it could not be made: the
    /// socket then receives with `recvmmsg(2)` into [`Net`]'s batch.
    ring: Option<RxRing>,
    /// The interface's transmit ring on a send-only socket of its own ([`TxRing`]), or
    /// `None` where it could not be made: every frame then goes out with `sendmmsg(2)` on
    /// `sock`, as do the frames the ring does not take ([`TxRing::takes`]).
    txr: Option<TxRing>,
    /// Frames the socket refused with EAGAIN (send buffer full), sent in order once poll
    /// reports `POLLOUT`; at most [`BACKLOG`], the rest are dropped. The engine's own
    /// buffers ([`Engine::poll_transmit_parts`]): queueing copies nothing.
    backlog: VecDeque<TxFrame>,
    /// A send-only socket with `PACKET_VNET_HDR` ([`PacketSocket::open_linear_sender`]) for
    /// frames carrying [`LINEAR_MIN_DATA`] bytes of write data or more, and for what the
    /// transmit ring does not take; `None` where the kernel refuses one (`sock` sends
    /// those instead, and the ring takes the write frames).
    linear: Option<PacketSocket>,
    /// Frames sent through `linear`.
    linear_sent: u64,
    /// Batches the linear sender refused for a full send buffer (the rest then waits in
    /// `backlog` for `POLLOUT`).
    linear_full: u64,
    /// The interface vanished and is kept for the devices that rely on it alone (said
    /// once, [`Net::sync_interfaces`]).
    gone: bool,
}

/// Write data from which a frame goes out with `sendmmsg(2)` from the write's own buffer
/// through [`Iface::linear`] instead of being copied into a transmit ring slot: at MTU 9000
/// (8.5 KiB a frame) the copy into the slot that this saves costs more than the
/// per-message work of `sendmmsg` it brings back (the kernel copies the frame into its skb
/// either way); at MTU 1500 (1 KiB a frame) the ring's batch is cheaper
/// (docs/PERFORMANCE.md, "Written bytes onto the wire without our copy", and "The
/// initiator's transmit ring").
const LINEAR_MIN_DATA: usize = 4096;

/// Bytes of receive ring per interface: the 8 MiB receive buffer's worth of frames the
/// `recvmmsg` path asks for, in slots of the interface's frame size (920 slots at MTU 9000,
/// 5,200 at 1500). Held reads ([`Handle::read_held`]) keep up to half of them out of the
/// kernel's hands ([`may_hold`], [`must_copy_out`]), so the kernel always has at least the
/// 4 MiB that was the whole ring before reads were held.
const RX_RING_BYTES: usize = 8 << 20;

/// Whether a receive ring with `held` of its `slots` slots held may hold one more for a
/// read ([`Handle::read_held`]); if not, the frame's payload is copied as for any read.
/// Half the ring: the kernel keeps the other half to deliver into.
fn may_hold(held: usize, slots: usize) -> bool {
    held < slots / 2
}

/// Whether a slot held `behind` slots behind the receive ring's head (round the ring; 0: a
/// whole lap) must be given up now: its payload copied out, the slot given back. The
/// kernel stops delivering when its head meets a held slot (and drops what arrives), so no
/// slot stays held once the head is half a lap past it, however slow its reader.
fn must_copy_out(behind: usize, slots: usize) -> bool {
    behind == 0 || behind >= slots / 2
}

/// Fewest slots of a receive ring, whatever the MTU.
const RX_RING_MIN_SLOTS: usize = 256;

/// A `PACKET_RX_RING` on an interface's socket ([`PacketRing`], receive slots only): the
/// kernel writes each response into a slot shared with this process as it arrives, so the
/// network thread takes a batch without a system call and without the socket's per-frame
/// `recvmsg` work (the skb queue, the hardened user copy's checks). On a veth the copy into
/// the slot runs in the sender's context, the target's. Measured against `recvmmsg` at MTU
/// 9000 and 1500 in `scripts/bench-initiator.sh` (docs/PERFORMANCE.md, "The initiator's path").
struct RxRing {
    ring: PacketRing,
    /// The largest frame a slot holds: the interface's frame size when the ring was made.
    cap: usize,
    /// Per slot, the token of the frame held there ([`Engine::handle_held_frame`]).
    tokens: Vec<u64>,
    /// The held slots' (token, slot), oldest first (holds come in ring order); entries
    /// already released are skipped when met.
    order: VecDeque<(u64, usize)>,
}

impl RxRing {
    /// Gives up held slot `slot`: the engine copies the part it keeps there out
    /// ([`Engine::unhold`]), the slot goes back to the kernel.
    fn copy_out(
        &mut self,
        engine: &mut Engine,
        holds: &mut CountedMap<u64, (usize, usize)>,
        slot: usize,
    ) {
        let token = self.tokens[slot];
        if let Some(frame) = self.ring.held_frame(slot) {
            engine.unhold(token, frame);
        }
        holds.remove(&token);
        self.ring.release_held(slot);
    }

    /// Gives up every held slot half a lap or more behind the head ([`must_copy_out`]);
    /// returns how many.
    fn copy_out_old(
        &mut self,
        engine: &mut Engine,
        holds: &mut CountedMap<u64, (usize, usize)>,
    ) -> usize {
        let n = self.ring.rx_slots();
        let head = self.ring.rx_slot_ahead(0);
        let mut given = 0;
        while let Some(&(token, slot)) = self.order.front() {
            if !self.ring.is_held(slot) || self.tokens[slot] != token {
                self.order.pop_front();
                continue;
            }
            if !must_copy_out((head + n - slot) % n, n) {
                break;
            }
            self.order.pop_front();
            self.copy_out(engine, holds, slot);
            given += 1;
        }
        given
    }

    /// Gives up every held slot (the ring is about to go).
    fn copy_out_all(&mut self, engine: &mut Engine, holds: &mut CountedMap<u64, (usize, usize)>) {
        while let Some((token, slot)) = self.order.pop_front() {
            if self.ring.is_held(slot) && self.tokens[slot] == token {
                self.copy_out(engine, holds, slot);
            }
        }
    }

    /// `packet_poll` calls the socket readable while the slot before the kernel's head is
    /// not the kernel's: with no frame waiting (the kernel's head is ours) and that slot
    /// held, a wait would end at once, and again, until the read holding it finished. Gives
    /// that slot up; the others stay held.
    /// Says whether it gave one up.
    fn before_wait(
        &mut self,
        engine: &mut Engine,
        holds: &mut CountedMap<u64, (usize, usize)>,
    ) -> bool {
        if self.ring.held_count() == 0 || self.ring.rx_ready() {
            return false;
        }
        let n = self.ring.rx_slots();
        let prev = self.ring.rx_slot_ahead(n - 1);
        if !self.ring.is_held(prev) {
            return false;
        }
        self.copy_out(engine, holds, prev);
        true
    }
}

impl RxRing {
    /// A receive ring on `sock` for frames of an `mtu`-byte interface. A ring set up on a
    /// bound socket drops what the socket had queued (packet(7) `packet_set_ring` purges
    /// it): made when the socket is new, or after an MTU change, where the frames lost are
    /// retransmitted like any lost on the wire.
    fn new(sock: &PacketSocket, mtu: u32) -> std::io::Result<RxRing> {
        let cap = aoe_sys::frame_capacity(mtu);
        let slots = (RX_RING_BYTES / cap.max(1)).max(RX_RING_MIN_SLOTS);
        let ring = PacketRing::with_slots(sock, cap, slots, 0, 0)?;
        let tokens = vec![0; ring.rx_slots()];
        Ok(RxRing {
            ring,
            cap,
            tokens,
            order: VecDeque::new(),
        })
    }
}

/// A receive ring for a socket, or `None` (logged) where the kernel refuses one: the socket
/// then receives with `recvmmsg(2)`.
fn rx_ring(sock: &PacketSocket, name: &str, mtu: u32) -> Option<RxRing> {
    match RxRing::new(sock, mtu) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::info!(interface = %name, error = %e, "no receive ring: receiving with recvmmsg");
            None
        }
    }
}

/// Slots of a transmit ring: more than the frames one pass of the loop emits for a
/// window of reads at MTU 1500 (four 256 KiB requests, 256 frames each, go out as their
/// window opens); kicked early when it fills.
const TX_RING_SLOTS: usize = 512;

/// A `PACKET_TX_RING` on a send-only socket of the interface ([`PacketSocket::open_sender`],
/// [`PacketRing::sender`]): the network thread copies each frame, headers and write data,
/// into a slot and sends a whole batch with one `send()` kick, where `sendmmsg(2)` paid per
/// frame for the message header's copy and checks, the iovec import and `packet_snd`'s skb
/// set-up. The ring's `virtio_net_hdr` makes the kernel copy the frame into the skb's
/// linear part, as the target's ring does (without it veth copies the ring's fragments into
/// new pages). Measured against `sendmmsg` and against a ring of request frames alone with
/// write data left to `sendmmsg` (docs/PERFORMANCE.md, "The initiator's transmit ring"):
/// the copy of a write's data into the slot costs less than `sendmmsg`'s per-frame work.
struct TxRing {
    /// The send-only socket, open as long as its ring (which holds a duplicate of it).
    _sock: PacketSocket,
    ring: PacketRing,
    /// Frames this interface's earlier rings took (made again after an MTU change), so
    /// the count logged at the end is the interface's.
    marked_before: u64,
    /// Kicks of this ring, and those cut short by a full send buffer or device queue.
    kicks: u64,
    short_kicks: u64,
    /// The last kick failed with an error other than a full queue (`ENETDOWN`: the
    /// interface is down). The frames stay marked, but the loop does not re-kick them
    /// every [`KICK_RETRY`] ([`Iface::waits`]): the next frame sent (a retransmit, a
    /// discover) kicks again, and the first kick that goes through clears this. Before
    /// (session 27, operator's audit), a down interface kept the loop waking every
    /// millisecond.
    down: bool,
}

impl TxRing {
    fn new(name: &str, mtu: u32) -> std::io::Result<TxRing> {
        let sock = PacketSocket::open_sender(name)?;
        let ring = PacketRing::sender(&sock, aoe_sys::frame_capacity(mtu), TX_RING_SLOTS)?;
        Ok(TxRing {
            _sock: sock,
            ring,
            marked_before: 0,
            kicks: 0,
            short_kicks: 0,
            down: false,
        })
    }

    /// Frames this interface's transmit rings have taken so far.
    fn sent(&self) -> u64 {
        self.marked_before + self.ring.stats().tx_marked
    }

    /// Whether `f` fits a slot; a longer one (the MTU grew and no ring of the new size
    /// could be made) goes out with `sendmmsg`.
    fn takes(&self, f: &TxFrame) -> bool {
        f.len() <= self.ring.tx_frame_cap()
    }

    /// Copies `f` into a slot, kicking the ring once first if it is full; false if it is
    /// still full (the kernel holds every slot).
    fn push(&mut self, f: &TxFrame) -> bool {
        let parts = [f.head.as_slice(), f.data()];
        match self.ring.push_parts(&parts) {
            Ok(true) => true,
            Ok(false) => {
                let _ = self.ring.kick();
                self.ring.push_parts(&parts).unwrap_or(false)
            }
            // Longer than a slot: `takes` said otherwise, so never.
            Err(_) => false,
        }
    }
}

/// A transmit ring for an interface, or `None` (logged) where the kernel refuses one: its
/// frames then go out with `sendmmsg(2)`.
fn tx_ring(name: &str, mtu: u32) -> Option<TxRing> {
    match TxRing::new(name, mtu) {
        Ok(r) => {
            tracing::debug!(interface = %name, slots = r.ring.tx_frames(), cap = r.ring.tx_frame_cap(), "sending through a transmit ring");
            Some(r)
        }
        Err(e) => {
            tracing::info!(interface = %name, error = %e, "no transmit ring: sending with sendmmsg");
            None
        }
    }
}

/// A send-only socket with `PACKET_VNET_HDR` for an interface ([`Iface::linear`]), or
/// `None` (logged) where the kernel refuses one.
fn linear_sender(name: &str) -> Option<PacketSocket> {
    match PacketSocket::open_linear_sender(name) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::info!(interface = %name, error = %e, "no linear sender: write frames through the transmit ring");
            None
        }
    }
}

/// What became of a frame the socket refused ([`Iface::refused`]).
enum Sent {
    /// The send buffer is full: keep it and wait for `POLLOUT`.
    Full,
    /// Gone (sent into a full device queue, ENOBUFS, or another error): the retransmit
    /// timer covers it, as for a frame lost on the wire.
    Lost,
}

impl Iface {
    /// Gives the receive ring's held slots back (the engine copies out the parts it keeps)
    /// and makes a new ring for `mtu`'s frames on the interface's socket, the old one
    /// first (the kernel takes one ring per socket); none if it cannot be made.
    fn renew_rx_ring(
        &mut self,
        mtu: u32,
        engine: &mut Engine,
        holds: &mut CountedMap<u64, (usize, usize)>,
    ) {
        if let Some(r) = self.ring.as_mut() {
            r.copy_out_all(engine, holds);
        }
        self.ring = None;
        self.ring = rx_ring(&self.sock, &self.name, mtu);
    }

    /// Makes a new transmit socket and ring for `mtu`'s frames (frames still marked in the
    /// old ring are lost with it, and retransmitted), carrying the interface's count of
    /// frames sent over; returns the frames the old ring rejected, for the interface's
    /// count of those.
    fn renew_tx_ring(&mut self, mtu: u32) -> u64 {
        let old = self.txr.take();
        let before = old.as_ref().map_or(0, TxRing::sent);
        self.txr = tx_ring(&self.name, mtu);
        if let Some(t) = self.txr.as_mut() {
            t.marked_before = before;
        }
        old.map_or(0, |t| t.ring.stats().tx_rejected)
    }

    /// What became of the first frame of a batch the socket refused with `e`.
    fn refused(&self, e: &std::io::Error, logs: &mut RateLimiter) -> Sent {
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Sent::Full;
        }
        if let Some(a) = logs.check(Instant::now(), "send failed") {
            tracing::debug!(interface = %self.name, error = %e, "send failed{a}");
        }
        Sent::Lost
    }

    /// Sends backlogged frames (and kicks frames left marked in the transmit ring) until
    /// the socket or the ring is full again; the header buffers of those done with go to
    /// `spent`.
    fn flush(&mut self, logs: &mut RateLimiter, spent: &mut Vec<Vec<u8>>) {
        if let Some(t) = &mut self.txr {
            if t.ring.needs_kick() {
                kick(t, &self.name, logs);
            }
        }
        if self.backlog.is_empty() {
            return;
        }
        let mut frames: Vec<TxFrame> = self.backlog.drain(..).collect();
        self.send_now(&mut frames, logs, spent);
        // Came from the backlog: never more than BACKLOG.
        self.backlog.extend(frames);
    }

    /// Sends the first frames of `frames` (each its headers and its write data, sent from
    /// where they lie: [`PacketSocket::send_batch_linear`] through the linear sender, or
    /// [`PacketSocket::send_batch_parts`] on `sock` without one) with one `sendmmsg(2)`: how
    /// many are done with (sent, or lost to an error other than a full buffer), and
    /// whether the socket is full.
    fn send_some(&mut self, frames: &[[&[u8]; 2]], logs: &mut RateLimiter) -> (usize, bool) {
        if frames.is_empty() {
            return (0, false);
        }
        let r = match &self.linear {
            Some(l) => l.send_batch_linear(frames),
            None => self.sock.send_batch_parts(frames),
        };
        match r {
            Ok(n) if n > 0 => {
                if self.linear.is_some() {
                    self.linear_sent += n as u64;
                }
                (n, false)
            }
            // The kernel took none without an error: try again once poll says so.
            Ok(_) => {
                self.linear_full += u64::from(self.linear.is_some());
                (0, true)
            }
            Err(e) => match self.refused(&e, logs) {
                Sent::Full => {
                    self.linear_full += u64::from(self.linear.is_some());
                    (0, true)
                }
                Sent::Lost => (1, false),
            },
        }
    }

    /// Sends what it can of `frames` now, in their order: the frames before the first one
    /// the transmit ring does not take (no ring, a frame longer than its slots, the ring
    /// full, a frame with [`LINEAR_MIN_DATA`] bytes of write data or more where the linear
    /// sender exists) into the ring's slots, one kick for all ([`TxRing`]), then that frame
    /// and every one after it in `sendmmsg(2)` batches, through the linear sender
    /// ([`Iface::linear`]) if there is one. What is left in `frames` was refused by a full
    /// send buffer and must be queued; the header buffers of the frames done with (sent or
    /// lost) go to `spent`.
    ///
    /// The order matters to loss detection: the engine presumes a frame lost once frames
    /// sent after it are answered (`Config::fast_retransmit`, RACK).
    /// When the ring took every small frame of a batch and was kicked before the full
    /// frames went out with `sendmmsg`, the 1 KiB tail frame of each 256 KiB NBD write
    /// overtook the 30 full frames sent before it: each of their answers came after a
    /// later one's, the engine walked them all for every such answer, and some were
    /// copied for nothing (docs/PERFORMANCE.md, "Writes at MTU 9000: frames in order").
    fn send_now(
        &mut self,
        frames: &mut Vec<TxFrame>,
        logs: &mut RateLimiter,
        spent: &mut Vec<Vec<u8>>,
    ) {
        let linear = self.linear.is_some();
        if let Some(t) = &mut self.txr {
            let mut full = false;
            let mut taken = 0;
            for f in frames.iter_mut() {
                if !t.takes(f) || (linear && f.data().len() >= LINEAR_MIN_DATA) {
                    break;
                }
                if !t.push(f) {
                    full = true;
                    break;
                }
                spent.push(std::mem::take(&mut f.head));
                taken += 1;
            }
            if taken > 0 {
                frames.drain(..taken);
                kick(t, &self.name, logs);
            }
            if full {
                if let Some(a) = logs.check(Instant::now(), "transmit ring full") {
                    tracing::debug!(
                        interface = %self.name,
                        "transmit ring full: the rest with sendmmsg{a}"
                    );
                }
            }
        }
        // Frames still marked in the ring (a kick the send buffer cut short, now or before)
        // would be overtaken by whatever `sendmmsg` sends now: the rest waits in the
        // backlog until a kick has sent them ([`Iface::flush`], on the `KICK_RETRY` timer).
        if self.txr.as_ref().is_some_and(|t| t.ring.needs_kick()) {
            return;
        }
        let mut done = 0;
        {
            let parts: Vec<[&[u8]; 2]> = frames
                .iter()
                .map(|f| [f.head.as_slice(), f.data()])
                .collect();
            while done < parts.len() {
                let end = parts.len().min(done + RX_BATCH);
                let (n, full) = self.send_some(&parts[done..end], logs);
                done += n;
                if full {
                    if let Some(a) = logs.check(Instant::now(), "send buffer full") {
                        tracing::debug!(
                            interface = %self.name,
                            "send buffer full: queueing frames until POLLOUT{a}"
                        );
                    }
                    break;
                }
            }
        }
        spent.extend(frames.drain(..done).map(|f| f.head));
    }

    /// Sends `frames` now if nothing is waiting before them ([`send_now`](Self::send_now));
    /// what is refused is queued behind the backlog, or dropped with the backlog full. The
    /// header buffers of frames done with (sent, lost or dropped) go to `spent`, and
    /// `frames` is left empty. Returns the number dropped.
    fn send_or_queue(
        &mut self,
        frames: &mut Vec<TxFrame>,
        logs: &mut RateLimiter,
        spent: &mut Vec<Vec<u8>>,
    ) -> u32 {
        if self.backlog.is_empty() {
            self.send_now(frames, logs, spent);
        }
        let mut dropped = 0;
        for f in frames.drain(..) {
            if self.backlog.len() >= BACKLOG {
                dropped += 1;
                spent.push(f.head);
            } else {
                self.backlog.push_back(f);
            }
        }
        dropped
    }

    /// Frames wait for the network layer: in the backlog, or marked in the transmit ring
    /// and not yet taken by the kernel (what [`DevEntry::kickme`] reports).
    fn backlogged(&self) -> bool {
        let (pollout, marked) = self.waits();
        pollout || marked
    }

    /// What the loop waits for on this interface besides frames: `POLLOUT` on its socket
    /// while frames wait in the backlog (refused by `sendmmsg`), and a short timer
    /// ([`KICK_RETRY`]) while frames stay marked in the transmit ring (the kernel signals
    /// no `POLLOUT` for a kick the send buffer cut short).
    fn waits(&self) -> (bool, bool) {
        let marked = self
            .txr
            .as_ref()
            .is_some_and(|t| !t.down && t.ring.needs_kick());
        // While frames stay marked the backlog waits for them, not for room in the socket
        // (`send_now`): the timer, not `POLLOUT`, which would wake the loop at once.
        (!self.backlog.is_empty() && !marked, marked)
    }
}

/// How soon the loop kicks a transmit ring again while frames wait for it ([`Iface::waits`]).
const KICK_RETRY: Duration = Duration::from_millis(1);

/// Kicks `t`'s marked slots out. A full send buffer or device queue leaves them marked for
/// the next kick ([`Iface::waits`]); other errors (the interface went down) are logged, and
/// the slots likewise stay marked: the engine's retransmit timer covers their frames as
/// for any lost on the wire, and a later kick sends what is still marked.
fn kick(t: &mut TxRing, name: &str, logs: &mut RateLimiter) {
    t.kicks += 1;
    match t.ring.kick() {
        Ok(()) => t.down = false,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            t.down = false;
            t.short_kicks += 1;
            if let Some(a) = logs.check(Instant::now(), "send buffer full") {
                tracing::debug!(
                    interface = %name,
                    "send buffer full: frames wait in the transmit ring{a}"
                );
            }
        }
        Err(e) => {
            t.down = true;
            if let Some(a) = logs.check(Instant::now(), "kick failed") {
                tracing::debug!(interface = %name, error = %e, "transmit ring kick failed{a}");
            }
        }
    }
}

/// How the network thread's loop went, logged when it stops: answers per wake-up and how
/// often it waited on a re-kick ([`KICK_RETRY`]), beside each transmit ring's own kicks and
/// kicks cut short (logged per interface), for docs/PERFORMANCE.md's accounts of where the
/// path waits.
#[derive(Debug, Default, Clone, Copy)]
struct LoopCounts {
    /// Passes of the loop that went to sleep in `poll(2)`.
    polls: u64,
    /// Of those, woken by the timeout with nothing ready (the engine's timer, or a re-kick).
    timeouts: u64,
    /// Of those, while frames waited in a transmit ring for a re-kick.
    rekick_waits: u64,
    /// Frames received and answered to the engine, and the interface passes that took any.
    frames_in: u64,
    rx_passes: u64,
    /// Commands (front-end I/O among them) taken from the channel.
    commands: u64,
    /// Frames found waiting, and taken, when a timer was due ([`Net::run`]): answers that
    /// would otherwise have been timed out.
    frames_before_timers: u64,
    /// Frames held in the receive ring for a read's reply ([`Handle::read_held`]), the
    /// most held at once, and those given up and copied: at the bound ([`may_hold`]), half
    /// a lap behind the head ([`must_copy_out`]), or before a wait ([`RxRing::before_wait`]).
    held: u64,
    held_max: u64,
    held_bound: u64,
    copied_old: u64,
    copied_wait: u64,
}

/// The network thread's state.
pub struct Net {
    engine: Engine,
    shared: Arc<Mutex<Shared>>,
    rx: Receiver<Queued>,
    wake: Arc<EventFd>,
    handle: Handle,
    ifaces: Vec<Option<Iface>>,
    pending: CountedMap<IoId, Done>,
    /// Held reads in flight ([`Cmd::IoHeld`]).
    pending_held: CountedMap<IoId, DoneHeld>,
    /// Frames held for reads, by token: (interface index, receive slot).
    holds: CountedMap<u64, (usize, usize)>,
    /// The next frame's token.
    next_token: u64,
    /// Tokens the engine gave back ([`Engine::take_released`]).
    released: Vec<u64>,
    /// Front-ends' connections served on this thread ([`Source`]).
    sources: Vec<Box<dyn Source>>,
    /// Open files per device (the driver's `nopen`); the engine only hears open/closed.
    opens: HashMap<TargetAddr, u32>,
    /// Frames received with one `recvmmsg(2)`.
    rxb: RecvBatch,
    /// Frames taken from the engine for each interface index, sent together.
    tx: Vec<Vec<TxFrame>>,
    /// Header buffers of frames sent, handed back to the engine ([`Engine::recycle_frame`]).
    spent: Vec<Vec<u8>>,
    loop_devices: bool,
    root: std::path::PathBuf,
    /// Names in the interface list that did not exist at the last sync (said once on `err`).
    missing: Vec<String>,
    /// Some interface had frames backlogged at the last publish (see [`DevEntry::kickme`]).
    backlogged: bool,
    /// When the device list was last copied into [`Shared`].
    published: Instant,
    /// Frames dropped by [`Iface::send_or_queue`] so far (published in [`Drops`]).
    send_dropped: u64,
    /// I/O completed since then.
    unpublished: bool,
    /// Log lines about frames, one per kind per [`LOG_INTERVAL`].
    logs: RateLimiter,
    /// The loop's counters ([`LoopCounts`]).
    counts: LoopCounts,
    /// When [`Net::housekeeping`] last ran.
    housekept: Instant,
    /// Frames refused by the transmit rings of interfaces closed since (see
    /// [`Drops::tx_rejected`]).
    tx_rejected_closed: u64,
    /// Interfaces taken out of the list that some device that is up still reaches its
    /// targets through alone, by index, with the time they were taken out: kept in use
    /// until each such device has a path through another interface, or [`RETIRE_GRACE`]
    /// has passed ([`Net::sync_interfaces`]).
    retiring: BTreeMap<usize, Instant>,
    /// The rtnetlink link group ([`LinkEvents`]), polled beside the sockets: an interface
    /// created, deleted, renamed, moved or set up is looked at at once ([`Net::link_events`])
    /// rather than at the next [`RESCAN`], which stays as the fallback. `None` if it could
    /// not be opened (said once) or failed since.
    links: Option<LinkEvents>,
    /// Whether each interface was last said to be running (up with a carrier), by index,
    /// from the link events: a change to running is a link that came back.
    link_running: HashMap<u32, bool>,
}

/// How long an interface taken out of the list, in the same change that listed a new one,
/// stays in use while a device that is up has no path through any other
/// ([`Net::sync_interfaces`]): time for the Query Config sent on the new interface to be
/// answered, so that an administrator moving AoE to another interface does not fail the
/// I/O in flight. The driver's `aoe_iflist`
/// never takes a target's interfaces away: it filters what is received and where config
/// queries go (`aoenet_rcv`, `aoecmd_cfg_pkts`: `is_aoe_netif`), so the I/O goes on through
/// a target's new interface once its config answer adds it, or fails after `deadsecs`.
pub const RETIRE_GRACE: Duration = Duration::from_secs(10);

/// How often the network thread looks for interfaces that appeared, vanished or changed
/// (the `iflist` is a name filter; a listed name may appear at any time). A list of the
/// namespace's interfaces every few seconds, not a busy poll.
pub const RESCAN: Duration = Duration::from_secs(5);

/// Maps an I/O failure to the errno the file system returns.
pub fn errno_of(e: &IoError) -> i32 {
    match e {
        IoError::Ata { .. } | IoError::Aoe(_) | IoError::DeviceDown | IoError::Removed => libc::EIO,
        _ => libc::EIO,
    }
}

fn errno_of_submit(e: &SubmitError) -> i32 {
    match e {
        SubmitError::UnknownDevice => libc::ENODEV,
        SubmitError::DeviceDown => libc::EIO,
        SubmitError::OutOfRange { .. } => libc::ENOSPC,
        _ => libc::EINVAL,
    }
}

impl Net {
    /// A network thread state for `engine`, publishing into `shared`.
    pub fn new(
        engine: Engine,
        shared: Arc<Mutex<Shared>>,
        loop_devices: bool,
        root: std::path::PathBuf,
    ) -> std::io::Result<Net> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let wake = Arc::new(EventFd::new()?);
        let handle = Handle {
            tx,
            wake: wake.clone(),
            locks: RangeLocks::new(),
            views: Arc::new(OnceLock::new()),
            bytes: lock(&shared).io_bytes.clone(),
            source: SourceId::DEFAULT,
            sources: Arc::new(AtomicU32::new(0)),
        };
        Ok(Net {
            engine,
            shared,
            rx,
            wake,
            handle,
            ifaces: Vec::new(),
            pending: CountedMap::default(),
            pending_held: CountedMap::default(),
            holds: CountedMap::default(),
            next_token: 1,
            released: Vec::new(),
            sources: Vec::new(),
            opens: HashMap::new(),
            rxb: RecvBatch::new(RX_BATCH, FRAME_BUF),
            tx: Vec::new(),
            spent: Vec::new(),
            loop_devices,
            root,
            missing: Vec::new(),
            backlogged: false,
            published: Instant::now(),
            send_dropped: 0,
            unpublished: false,
            logs: RateLimiter::new(LOG_INTERVAL),
            counts: LoopCounts::default(),
            housekept: Instant::now(),
            tx_rejected_closed: 0,
            retiring: BTreeMap::new(),
            links: None,
            link_running: HashMap::new(),
        })
    }

    /// A handle for the file system.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Opens sockets on the allowed interfaces: those named in `iflist`, or every
    /// non-loopback interface of the namespace when it is empty. Interfaces that vanished
    /// or are no longer allowed are dropped; one re-created under the same name (a new
    /// index) gets a new socket.
    ///
    /// `iflist` is a name filter, as the driver's `aoe_iflist` is (`aoenet.c`
    /// `is_aoe_netif` compares names only): a name that does not exist (yet) is kept and
    /// used once an interface of that name appears, found by the periodic rescan in
    /// [`Net::run`] ([`RESCAN`]); one listed name that is missing or vanishes never stops
    /// the others from being synced. A missing name is said once on `err` (again if it
    /// comes back and goes away again). Returns the number of interfaces newly opened, or
    /// opened again after they were deleted and created again under their names.
    /// `found_by` names what made it look, for its log lines ("link event" when a link
    /// event did, "rescan" otherwise).
    pub fn sync_interfaces(&mut self, found_by: &'static str) -> Result<usize, String> {
        let iflist = lock(&self.shared).iflist.clone();
        let all = aoe_sys::list_interfaces().map_err(|e| format!("cannot list interfaces: {e}"))?;
        let missing: Vec<String> = iflist
            .iter()
            .filter(|n| !all.iter().any(|i| &i.name == *n))
            .cloned()
            .collect();
        for name in missing.iter().filter(|n| !self.missing.contains(n)) {
            lock(&self.shared).push_err(format!(
                "interfaces: {name} does not exist (yet); used once it appears"
            ));
        }
        self.missing = missing;
        let wanted: Vec<_> = all
            .iter()
            .filter(|i| {
                if iflist.is_empty() {
                    !i.loopback
                } else {
                    iflist.contains(&i.name)
                }
            })
            .cloned()
            .collect();
        // Devices that are up, by the names of the interfaces their paths use.
        let up: Vec<Vec<String>> = self
            .engine
            .devices()
            .into_iter()
            .filter(|d| d.state == aoe_proto::initiator::DeviceState::Up)
            .map(|d| d.interfaces)
            .collect();
        // A listed interface not open yet: it is sent a Query Config below, and may offer
        // the devices new paths within milliseconds.
        let fresh = wanted.iter().any(|w| {
            !self
                .ifaces
                .iter()
                .flatten()
                .any(|i| i.name == w.name && i.index == w.index)
        });
        let now = Instant::now();
        let mut opened = 0;
        for (idx, slot) in self.ifaces.iter_mut().enumerate() {
            if let Some(i) = slot {
                // Deleted and created again under its name (a new index: a veth pair
                // re-made, a USB NIC plugged back) since the last look: the old sockets
                // are unbound for good (the kernel's `packet_notifier`), so new ones take
                // their place in the same slot, and the engine keeps the interface and the
                // paths through it: the I/O in flight is retransmitted on the new sockets
                // and fails only after `deadsecs`, as across a link that went down and up.
                // Before session 33 the interface was dropped and opened anew, and every
                // device reached through it alone went down at once ("no path left"),
                // failing its I/O with EIO though the new interface was there.
                let recreated = !all.iter().any(|w| w.name == i.name && w.index == i.index);
                if let Some(w) = wanted
                    .iter()
                    .find(|w| recreated && w.name == i.name && w.index != i.index)
                {
                    match PacketSocket::open_responses(&w.name) {
                        Ok(sock) => {
                            let _ = sock.set_recv_buffer(8 << 20);
                            tracing::warn!(
                                interface = %i.name,
                                old_index = i.index,
                                new_index = w.index,
                                found_by,
                                "interface deleted and created again: using the new one"
                            );
                            // Each ring holds its own duplicate of its socket: the old
                            // receive ring is emptied after the old socket is replaced.
                            i.sock = sock;
                            i.renew_rx_ring(w.mtu, &mut self.engine, &mut self.holds);
                            self.tx_rejected_closed += i.renew_tx_ring(w.mtu);
                            i.linear = linear_sender(&w.name);
                            i.index = w.index;
                            i.gone = false;
                            self.retiring.remove(&idx);
                            // Counted as opened: the caller sends a Query Config, which
                            // finds the targets on the new link (a re-made veth pair gives
                            // the target's end a new MAC address too). The engine learns
                            // the interface's new address and MTU below, as for any known
                            // interface.
                            opened += 1;
                            continue;
                        }
                        Err(e) => tracing::warn!(
                            interface = %w.name,
                            error = %e,
                            "interface created again, but no AoE socket could be opened on it"
                        ),
                    }
                }
                let same = wanted
                    .iter()
                    .any(|w| w.name == i.name && w.index == i.index);
                let exists = all.iter().any(|w| w.name == i.name && w.index == i.index);
                // Taken out of the list (it still exists) while a device that is up
                // reaches its targets through it alone, and an interface new to the list
                // may give it another path: kept for now ([`RETIRE_GRACE`]). With no new
                // interface listed, none is coming: the device goes down at once, as
                // before, and its I/O fails without waiting for `deadsecs`.
                let relied_on = up.iter().any(|names| {
                    names.contains(&i.name)
                        && names.iter().all(|n| !wanted.iter().any(|w| &w.name == n))
                });
                let retiring = self.retiring.contains_key(&idx);
                if !same && exists && relied_on && (fresh || retiring) {
                    let since = *self.retiring.entry(idx).or_insert_with(|| {
                        tracing::info!(
                            interface = %i.name,
                            "interface no longer listed; still used until the devices on \
                             it have a path through another"
                        );
                        now
                    });
                    if now.saturating_duration_since(since) < RETIRE_GRACE {
                        continue;
                    }
                }
                // Vanished (deleted; a USB NIC unplugged; moved to another namespace) while
                // its name is still allowed and a device that is up reaches its targets
                // through it alone: kept, as a link that is down is, so that the device's
                // I/O waits for an interface of that name (taken in its place above) and
                // fails only after `deadsecs`, when the device goes down and nothing
                // relies on it any more. Before session 33 the device went down at the
                // rescan that missed it ("no path left"), failing its I/O at once.
                let allowed = iflist.is_empty() || iflist.contains(&i.name);
                if !exists && allowed && relied_on {
                    if !i.gone {
                        i.gone = true;
                        tracing::warn!(
                            interface = %i.name,
                            "interface is gone: the devices reached through it alone wait \
                             for an interface of that name, and fail after deadsecs"
                        );
                    }
                    continue;
                }
                // Listed again, or going now: no longer retiring.
                self.retiring.remove(&idx);
                if !same {
                    tracing::info!(interface = %i.name, "interface gone or no longer used");
                    self.tx_rejected_closed +=
                        i.txr.as_ref().map_or(0, |t| t.ring.stats().tx_rejected);
                    if let Some(r) = i.ring.as_mut() {
                        r.copy_out_all(&mut self.engine, &mut self.holds);
                    }
                    self.engine.remove_interface(idx);
                    *slot = None;
                }
            }
        }
        for w in wanted {
            let known = self
                .ifaces
                .iter()
                .enumerate()
                .find(|(_, s)| s.as_ref().is_some_and(|i| i.name == w.name))
                .map(|(i, _)| i);
            match known {
                Some(idx) => {
                    // MTU may have changed.
                    self.engine
                        .add_interface(idx, &w.name, MacAddr(w.mac), w.mtu);
                    // A ring whose slots are smaller than the new frames would cut them:
                    // make one of the new size (the old one goes first, the kernel takes
                    // one ring per socket).
                    if let Some(i) = self.ifaces[idx].as_mut() {
                        if i.ring
                            .as_ref()
                            .is_some_and(|r| r.cap < aoe_sys::frame_capacity(w.mtu))
                        {
                            i.renew_rx_ring(w.mtu, &mut self.engine, &mut self.holds);
                        }
                        // Without a ring (none could be made, now or before), the batch.
                        if i.ring.is_none() {
                            fit_recv_batch(&mut self.rxb, w.mtu);
                        }
                        // The transmit ring likewise: a new socket and ring (frames still
                        // marked in the old one are lost with it, and retransmitted);
                        // without one, frames longer than the old slots go out with
                        // sendmmsg.
                        if i.txr
                            .as_ref()
                            .is_some_and(|t| t.ring.tx_frame_cap() < aoe_sys::frame_capacity(w.mtu))
                        {
                            self.tx_rejected_closed += i.renew_tx_ring(w.mtu);
                        }
                    }
                }
                // Responses only: the kernel's filter drops requests (a flood of broadcast
                // queries or ATA requests on the segment) before they take queue space.
                None => match PacketSocket::open_responses(&w.name) {
                    Ok(sock) => {
                        let _ = sock.set_recv_buffer(8 << 20);
                        let idx =
                            self.ifaces
                                .iter()
                                .position(Option::is_none)
                                .unwrap_or_else(|| {
                                    self.ifaces.push(None);
                                    self.ifaces.len() - 1
                                });
                        tracing::info!(interface = %w.name, mtu = w.mtu, found_by, "using interface");
                        self.engine
                            .add_interface(idx, &w.name, MacAddr(w.mac), w.mtu);
                        let ring = rx_ring(&sock, &w.name, w.mtu);
                        if ring.is_none() {
                            fit_recv_batch(&mut self.rxb, w.mtu);
                        }
                        let txr = tx_ring(&w.name, w.mtu);
                        self.ifaces[idx] = Some(Iface {
                            name: w.name.clone(),
                            index: w.index,
                            sock,
                            ring,
                            txr,
                            backlog: VecDeque::new(),
                            linear: linear_sender(&w.name),
                            linear_sent: 0,
                            linear_full: 0,
                            gone: false,
                        });
                        opened += 1;
                    }
                    Err(e) => {
                        tracing::warn!(interface = %w.name, error = %e, "cannot open AoE socket")
                    }
                },
            }
        }
        lock(&self.shared).active_ifaces = self
            .ifaces
            .iter()
            .flatten()
            .map(|i| i.name.clone())
            .collect();
        Ok(opened)
    }

    /// Runs until [`Cmd::Stop`].
    pub fn run(mut self) {
        ON_NET.with(|f| f.set(true));
        // Before the first look, so that nothing created in between is missed.
        self.links = LinkEvents::new()
            .inspect_err(|e| {
                tracing::warn!(
                    error = %e,
                    "cannot listen to link events (rtnetlink): interfaces that come back \
                     are found by the rescan every {} s",
                    RESCAN.as_secs()
                )
            })
            .ok();
        let _ = self.sync_interfaces("rescan");
        self.engine.discover(Instant::now());
        let mut last_scan = Instant::now();
        loop {
            let mut changed = false;
            while let Ok(cmd) = self.rx.try_recv() {
                let cmd = cmd.into_cmd();
                if matches!(cmd, Cmd::Stop) {
                    for i in self.ifaces.iter().flatten() {
                        if let Some(t) = &i.txr {
                            tracing::info!(
                                interface = %i.name,
                                frames = t.sent(),
                                rejected = t.ring.stats().tx_rejected,
                                kicks = t.kicks,
                                short_kicks = t.short_kicks,
                                linear = i.linear_sent,
                                linear_full = i.linear_full,
                                "frames sent through the transmit ring"
                            );
                        }
                    }
                    let c = self.counts;
                    // Slots still held and held reads unanswered as the thread stops: 0
                    // once every reader is answered (tests check that none leak).
                    let held_now: usize = self
                        .ifaces
                        .iter()
                        .flatten()
                        .filter_map(|i| i.ring.as_ref())
                        .map(|r| r.ring.held_count())
                        .sum();
                    tracing::info!(
                        polls = c.polls,
                        timeouts = c.timeouts,
                        rekick_waits = c.rekick_waits,
                        commands = c.commands,
                        frames_in = c.frames_in,
                        rx_passes = c.rx_passes,
                        frames_before_timers = c.frames_before_timers,
                        held = c.held,
                        held_max = c.held_max,
                        held_bound = c.held_bound,
                        held_now,
                        held_pending = self.pending_held.len(),
                        copied_old = c.copied_old,
                        copied_wait = c.copied_wait,
                        "network thread loop"
                    );
                    self.shut_down();
                    return;
                }
                self.command(cmd);
                self.counts.commands += 1;
                changed = true;
            }
            // What this thread gave itself: its sources' requests, and the next step of a
            // completion (a flush after a FUA write, the write of a read-modify-write, a
            // range lock's waiter), each of which may queue more.
            drain_local(|cmd| {
                self.command(cmd);
                self.counts.commands += 1;
            });
            let mut now = Instant::now();
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                // Answers that arrived while this thread was away from its sockets (since
                // poll returned, or descheduled on a busy machine) are taken before any
                // timer runs: a frame whose answer waits in the receive ring is late to be
                // looked at, not lost, and a copy of it would cost the target a second
                // write and the window a cut. Without this, a 2 ms delay of this thread
                // at a 1 ms smoothed RTT (a full window of writes) timed frames out.
                let mut early = 0;
                for idx in 0..self.ifaces.len() {
                    early += self.receive(idx, now);
                }
                self.counts.frames_before_timers += early as u64;
                now = Instant::now();
                if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                    self.engine.handle_timeout(now);
                }
            }
            self.transmit(now);
            let (state, io) = self.events();
            changed |= state;
            // Completions change only counters the front-ends do not read: they are
            // published at most every IO_PUBLISH_INTERVAL (the loop wakes every second).
            self.unpublished |= io;
            // `kickme` follows the send backlogs: publish when one fills or drains.
            let backlogged = self.ifaces.iter().flatten().any(Iface::backlogged);
            if changed
                || backlogged != self.backlogged
                || (self.unpublished && self.published.elapsed() >= IO_PUBLISH_INTERVAL)
            {
                self.backlogged = backlogged;
                self.publish();
            }
            if self.housekeeping() && !self.retiring.is_empty() {
                // A retiring interface goes once no device relies on it alone, or at the
                // end of its grace (`sync_interfaces` decides).
                let _ = self.sync_interfaces("rescan");
            }
            if last_scan.elapsed() > RESCAN {
                last_scan = Instant::now();
                // An interface that just appeared gets a Query Config broadcast at once, so
                // its targets are found without waiting for the next beacon (the driver
                // only finds them then, or on an aoe-discover).
                if self.sync_interfaces("rescan").is_ok_and(|n| n > 0) {
                    self.engine.discover(Instant::now());
                }
                self.publish();
            }
            // Never sleep on a full send buffer: wait for room (POLLOUT) together with
            // frames and commands, and kick a transmit ring again within KICK_RETRY while
            // frames stay marked in it.
            let mut rekick = false;
            let mut fds: Vec<PollFd> = self
                .ifaces
                .iter()
                .map(|i| {
                    let (pollout, marked) = i.as_ref().map_or((false, false), Iface::waits);
                    rekick |= marked;
                    PollFd::with_events(
                        i.as_ref().map_or(-1, |i| i.sock.as_raw_fd()),
                        true,
                        pollout && i.as_ref().is_some_and(|i| i.linear.is_none()),
                    )
                })
                .collect();
            // The backlog goes out through the linear sender where there is one: room in
            // its send buffer is what the backlog waits for (interface index, after the
            // interfaces' own entries).
            let mut linear_waits = Vec::new();
            for (idx, i) in self.ifaces.iter().enumerate() {
                if let Some(l) = i
                    .as_ref()
                    .filter(|i| i.waits().0)
                    .and_then(|i| i.linear.as_ref())
                {
                    fds.push(PollFd::with_events(l.as_raw_fd(), false, true));
                    linear_waits.push(idx);
                }
            }
            let mut timeout = self
                .engine
                .poll_timeout()
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            if rekick {
                timeout = timeout.min(KICK_RETRY);
            }
            for r in self
                .ifaces
                .iter_mut()
                .flatten()
                .filter_map(|i| i.ring.as_mut())
            {
                self.counts.copied_wait +=
                    u64::from(r.before_wait(&mut self.engine, &mut self.holds));
            }
            let links_fd = self.links.as_ref().map(|l| {
                fds.push(PollFd::new(l.as_raw_fd()));
                fds.len() - 1
            });
            // The sources: polled for reading, run on this pass, or left to a wake-up.
            let mut run_now = false;
            let mut src_fds: Vec<Option<usize>> = Vec::with_capacity(self.sources.len());
            for s in &mut self.sources {
                match s.interest() {
                    Interest::Read => {
                        src_fds.push(Some(fds.len()));
                        fds.push(PollFd::new(s.fd()));
                    }
                    Interest::Now => {
                        run_now = true;
                        src_fds.push(None);
                    }
                    Interest::Wake => src_fds.push(None),
                }
            }
            if run_now || local_pending() {
                timeout = Duration::ZERO;
            }
            fds.push(PollFd::new(self.wake.as_raw_fd()));
            self.counts.polls += 1;
            self.counts.rekick_waits += u64::from(rekick);
            if aoe_sys::poll(&mut fds, Some(timeout)).is_err() {
                continue;
            }
            if !fds.iter().any(|f| f.ready || f.writable) {
                self.counts.timeouts += 1;
            }
            if fds.last().is_some_and(|f| f.ready) {
                let _ = self.wake.drain();
            }
            let now = Instant::now();
            for (idx, fd) in fds.iter().enumerate().take(self.ifaces.len()) {
                if !fd.ready && !fd.writable {
                    continue;
                }
                let Some(i) = &mut self.ifaces[idx] else {
                    continue;
                };
                if fd.writable {
                    i.flush(&mut self.logs, &mut self.spent);
                }
                if self.receive(idx, now) == 0 && fd.ready {
                    self.take_socket_error(idx);
                }
            }
            let n = self.ifaces.len();
            for (k, &idx) in linear_waits.iter().enumerate() {
                if fds.get(n + k).is_some_and(|f| f.writable) {
                    if let Some(i) = &mut self.ifaces[idx] {
                        i.flush(&mut self.logs, &mut self.spent);
                    }
                }
            }
            self.run_sources(&fds, &src_fds);
            if links_fd.is_some_and(|k| fds[k].ready) && self.link_events() {
                last_scan = Instant::now();
            }
        }
    }

    /// Reads the link events queued ([`Net::links`]) and acts on them at once: any event
    /// runs [`Net::sync_interfaces`] (an interface created again under a listed name is
    /// taken in its slot, one gone is said, one renamed away is dropped or waited for),
    /// with a Query Config on what it opened; an interface in use that is running again
    /// (up with a carrier: `ip link set DEV up`, the peer of a veth set up, a cable back)
    /// gets a Query Config ([`Engine::interface_up`]). An event of an interface created or
    /// set down alone does nothing until it runs. Before session 34 all of it waited for the
    /// next [`RESCAN`] (up to 5 s). True if the interfaces were looked at.
    fn link_events(&mut self) -> bool {
        let Some(links) = &mut self.links else {
            return false;
        };
        let (events, overrun) = match links.drain() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "link events (rtnetlink) failed: interfaces that come back are found \
                     by the rescan every {} s",
                    RESCAN.as_secs()
                );
                self.links = None;
                return false;
            }
        };
        // An interface created or set down is left to the event that says it is running
        // (or to the rescan): opened on its creation, while still down, the re-made
        // interface of `conformance_files`' iflist test was never found to have its target.
        let acts = overrun || events.iter().any(|e| e.deleted || e.running());
        let mut back = Vec::new();
        for e in &events {
            // Deleted or moved to another namespace: the kernel unbound the sockets for
            // good. Forgetting the index makes the next look open new ones on an interface
            // of the name, also one moved back with the same index.
            if e.deleted {
                for i in self.ifaces.iter_mut().flatten() {
                    if i.index == e.index {
                        i.index = 0;
                    }
                }
            }
            let running = e.running();
            let was = if e.deleted {
                self.link_running.remove(&e.index)
            } else {
                self.link_running.insert(e.index, running)
            };
            // Unknown before (created now, or first heard of): running now is a return
            // too, for a slot that waits for its name.
            if running && was != Some(true) {
                back.push(e.index);
            }
        }
        tracing::debug!(?events, overrun, "link events");
        if !acts {
            return false;
        }
        let now = Instant::now();
        let synced = self.sync_interfaces("link event");
        if synced.is_ok_and(|n| n > 0) {
            self.engine.discover(now);
        }
        for index in back {
            let slot = self
                .ifaces
                .iter()
                .position(|s| s.as_ref().is_some_and(|i| i.index == index));
            if let Some((idx, Some(i))) = slot.map(|idx| (idx, &self.ifaces[idx])) {
                tracing::info!(interface = %i.name, "link event: interface running again");
                self.engine.interface_up(now, idx);
            }
        }
        self.publish();
        true
    }

    /// Runs the sources whose fd is ready (`src_fds`: each source's entry in `fds`, None
    /// for one not polled) and those that asked to run now or were woken; drops those that
    /// finished. A source that waits for a wake-up ([`Interest::Wake`]) is asked again
    /// first: its wake-up is what brought the loop here, or it stays parked.
    fn run_sources(&mut self, fds: &[PollFd], src_fds: &[Option<usize>]) {
        if self.sources.is_empty() {
            return;
        }
        let mut k = 0;
        self.sources.retain_mut(|s| {
            let polled = src_fds.get(k).copied().flatten();
            k += 1;
            let go = match polled {
                Some(p) => fds.get(p).is_some_and(|f| f.ready),
                None => s.interest() == Interest::Now,
            };
            !go || s.run()
        });
    }

    /// Reads and clears the error pending on interface `idx`'s receive socket (a wake-up
    /// with no frame to read), logging it at most once a second. With a receive ring
    /// nothing else reads it: the `ENETDOWN` the kernel leaves on a packet socket whose
    /// interface is or goes down (`packet_do_bind`, `packet_notifier`) is reported by
    /// poll(2) as POLLERR until read, so after a link flap, or on an interface down at
    /// start, every poll returned at once and the loop held a core for good (session 27,
    /// operator's audit). `recvmmsg` clears it itself.
    fn take_socket_error(&mut self, idx: usize) {
        let Some(Some(i)) = self.ifaces.get(idx) else {
            return;
        };
        if i.ring.is_none() {
            return;
        }
        if let Ok(Some(e)) = i.sock.take_error() {
            if let Some(a) = self.logs.check(Instant::now(), "socket error") {
                tracing::warn!(interface = %i.name, error = %e, "interface socket error{a}");
            }
        }
    }

    /// Hands the engine what interface `idx` received, up to [`RX_BUDGET`] frames, with
    /// the time `now`. Returns how many it took.
    fn receive(&mut self, idx: usize, now: Instant) -> usize {
        let Some(Some(i)) = self.ifaces.get_mut(idx) else {
            return 0;
        };
        let mut taken = 0;
        while taken < RX_BUDGET {
            let n = match &mut i.ring {
                Some(r) => {
                    self.counts.copied_old +=
                        r.copy_out_old(&mut self.engine, &mut self.holds) as u64;
                    let n = r.ring.recv_batch(RX_BATCH);
                    let slots = r.ring.rx_slots();
                    for k in 0..n {
                        if r.ring.meta(k).truncated {
                            continue;
                        }
                        if !may_hold(r.ring.held_count(), slots) {
                            self.counts.held_bound += 1;
                            self.engine.handle_frame(now, idx, r.ring.frame(k));
                            continue;
                        }
                        let token = self.next_token;
                        if self
                            .engine
                            .handle_held_frame(now, idx, r.ring.frame(k), token)
                        {
                            self.next_token += 1;
                            let slot = r.ring.hold(k);
                            r.tokens[slot] = token;
                            r.order.push_back((token, slot));
                            self.holds.insert(token, (idx, slot));
                            self.counts.held += 1;
                            self.counts.held_max =
                                self.counts.held_max.max(r.ring.held_count() as u64);
                        }
                    }
                    n
                }
                None => {
                    let n = i.sock.recv_batch(&mut self.rxb).unwrap_or(0);
                    for (frame, meta) in self.rxb.iter() {
                        if !meta.truncated {
                            self.engine.handle_frame(now, idx, frame);
                        }
                    }
                    n
                }
            };
            taken += n;
            if n < RX_BATCH {
                break;
            }
        }
        if taken > 0 {
            self.counts.frames_in += taken as u64;
            self.counts.rx_passes += 1;
        }
        // The engine copied what it keeps: the slots go back to the kernel now, not at the
        // next wake-up.
        if let Some(r) = &mut i.ring {
            r.ring.recv_batch(0);
        }
        taken
    }

    /// Answers EINTR to readers of `err` whose process has a signal pending and logs the
    /// suppressed-line counts of kinds gone quiet, at most every [`HOUSEKEEPING`], and only
    /// if no front-end holds the shared state at this moment (else on a later turn): the
    /// network thread must never wait on an observer (an attribute read, a metrics scrape,
    /// `aoe-stat`) with frames to answer. Says whether it ran.
    fn housekeeping(&mut self) -> bool {
        let now = Instant::now();
        if now.saturating_duration_since(self.housekept) < HOUSEKEEPING {
            return false;
        }
        let Some(mut s) = try_lock(&self.shared) else {
            return false;
        };
        self.housekept = now;
        s.interrupt_err_waiters();
        s.flush_err_log(now);
        true
    }

    /// Sends what the engine has to send. A socket whose send buffer is full (EAGAIN) gets
    /// its frames queued, up to [`BACKLOG`], and the loop waits for `POLLOUT` on it while
    /// it keeps receiving and answering commands; frames beyond that are dropped and left
    /// to the retransmit timer, as AoE expects of a lossy link (the driver's `aoenet_xmit`
    /// likewise drops what `dev_queue_xmit` refuses).
    fn transmit(&mut self, now: Instant) {
        for i in self.ifaces.iter_mut().flatten() {
            i.flush(&mut self.logs, &mut self.spent);
        }
        let mut dropped = 0u32;
        if self.tx.len() < self.ifaces.len() {
            self.tx.resize_with(self.ifaces.len(), Vec::new);
        }
        let mut any = false;
        while let Some(frame) = self.engine.poll_transmit_parts(now) {
            if let Some(q) = self.tx.get_mut(frame.iface) {
                q.push(frame);
                any = true;
            } else {
                self.spent.push(frame.head);
            }
        }
        if any {
            for (idx, q) in self.tx.iter_mut().enumerate() {
                match self.ifaces.get_mut(idx) {
                    Some(Some(i)) if !q.is_empty() => {
                        dropped += i.send_or_queue(q, &mut self.logs, &mut self.spent)
                    }
                    _ => self.spent.extend(q.drain(..).map(|f| f.head)),
                }
            }
        }
        for f in self.spent.drain(..) {
            self.engine.recycle_frame(f);
        }
        if dropped > 0 {
            self.send_dropped += u64::from(dropped);
            if let Some(a) = self.logs.check(now, "frames dropped") {
                tracing::debug!(dropped, "send buffers full: frames dropped{a}");
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        let now = Instant::now();
        match cmd {
            Cmd::IoHeld {
                dev,
                lba,
                sectors,
                source,
                done,
            } => match self
                .engine
                .submit_from(now, dev, BlockOp::ReadHeld { lba, sectors }, source)
            {
                Ok(id) => {
                    self.pending_held.insert(id, done);
                }
                Err(e) => done(Err(errno_of_submit(&e))),
            },
            // A held read completes only through Cmd::IoHeld's callback.
            Cmd::Io {
                dev,
                op: BlockOp::ReadHeld { lba, sectors },
                source,
                done,
            } => self.command(Cmd::Io {
                dev,
                op: BlockOp::Read { lba, sectors },
                source,
                done,
            }),
            Cmd::Io {
                dev,
                op,
                source,
                done,
            } => match self.engine.submit_from(now, dev, op, source) {
                Ok(id) => {
                    self.pending.insert(id, done);
                }
                Err(e) => done(Err(errno_of_submit(&e))),
            },
            Cmd::Discover => {
                let _ = self.sync_interfaces("rescan");
                self.engine.discover(now);
            }
            Cmd::Revalidate(dev, tx) => {
                let r = self
                    .engine
                    .revalidate(now, dev)
                    .map_err(|e| format!("{dev}: {e}"));
                let _ = tx.send(r);
            }
            Cmd::Flush(which, tx) => {
                let held = lock(&self.shared).nbd_held();
                let removed = self.engine.flush_devices_except(which, &held);
                let _ = tx.send(removed);
            }
            Cmd::SetInterfaces(list, tx) => {
                let r = check_iflist(&list).and_then(|()| {
                    let old = std::mem::replace(&mut lock(&self.shared).iflist, list);
                    self.sync_interfaces("rescan").inspect_err(|_| {
                        lock(&self.shared).iflist = old;
                        let _ = self.sync_interfaces("rescan");
                    })
                });
                let _ = tx.send(r.map(|_| ()));
            }
            Cmd::SetOpen(dev, open) => {
                let n = self.opens.entry(dev).or_insert(0);
                *n = if open { *n + 1 } else { n.saturating_sub(1) };
                let busy = *n > 0;
                if !busy {
                    self.opens.remove(&dev);
                }
                // Idempotent in the engine; repeating it also covers a device that appeared
                // after the first open.
                self.engine.set_open(dev, busy);
            }
            Cmd::Recycle(buf) => self.engine.recycle_read_buffer(buf),
            Cmd::AddSource(s) => self.sources.push(s),
            Cmd::Stop => {}
        }
    }

    /// Handles engine events; says whether device state may have changed, and whether I/O
    /// completed.
    fn events(&mut self) -> (bool, bool) {
        let mut changed = false;
        let mut io = false;
        while let Some(ev) = self.engine.poll_event() {
            match ev {
                Event::Completed { id, result } => {
                    if let Some(done) = self.pending.remove(&id) {
                        done(result.map_err(|e| errno_of(&e)));
                    }
                    io = true;
                }
                Event::CompletedHeld { id, result } => {
                    let done = self.pending_held.remove(&id);
                    match result {
                        Ok(h) => {
                            let (ifaces, holds) = (&self.ifaces, &self.holds);
                            let pieces = h.pieces(|t| {
                                let (idx, slot) = *holds.get(&t)?;
                                let r = ifaces.get(idx)?.as_ref()?.ring.as_ref()?;
                                (r.tokens[slot] == t).then_some(())?;
                                r.ring.held_frame(slot)
                            });
                            if let Some(done) = done {
                                match &pieces {
                                    Some(p) => done(Ok(p)),
                                    None => done(Err(libc::EIO)),
                                }
                            }
                            drop(pieces);
                            for p in &h.parts {
                                self.release_token(p.token);
                            }
                            self.engine.recycle_read_buffer(h.buf);
                        }
                        Err(e) => {
                            if let Some(done) = done {
                                done(Err(errno_of(&e)));
                            }
                        }
                    }
                    io = true;
                }
                Event::Log(line) => lock(&self.shared).push_err(line),
                Event::DeviceUp(dev) => {
                    // (The engine logs the state change itself.)
                    self.publish();
                    self.scan_partitions(dev);
                    changed = true;
                }
                Event::DeviceResized { dev, .. } => {
                    self.publish();
                    self.scan_partitions(dev);
                    changed = true;
                }
                // `revalidate` re-reads the partition table even when the size is the
                // same, so a partition added on the target appears without flush and
                // discover.
                Event::Revalidated(dev) => {
                    self.publish();
                    self.scan_partitions(dev);
                    changed = true;
                }
                Event::DeviceDown(dev) => {
                    self.detach_loop(dev);
                    changed = true;
                }
                Event::DeviceRemoved(dev) => {
                    self.detach_loop(dev);
                    changed = true;
                }
            }
        }
        self.engine.take_released(&mut self.released);
        let mut released = std::mem::take(&mut self.released);
        for t in released.drain(..) {
            self.release_token(t);
        }
        self.released = released;
        (changed, io)
    }

    /// Gives the slot held under `token` back to the kernel (a token no longer held:
    /// nothing; its slot may hold another frame by now).
    fn release_token(&mut self, token: u64) {
        let Some((idx, slot)) = self.holds.remove(&token) else {
            return;
        };
        if let Some(r) = self
            .ifaces
            .get_mut(idx)
            .and_then(|i| i.as_mut())
            .and_then(|i| i.ring.as_mut())
        {
            if r.tokens[slot] == token {
                r.ring.release_held(slot);
            }
        }
    }

    /// Copies the engine's device list into the shared state, keeping partitions and loop
    /// devices of devices that stay.
    fn publish(&mut self) {
        self.published = Instant::now();
        self.unpublished = false;
        let devices = self.engine.devices();
        let backlogged: Vec<&str> = self
            .ifaces
            .iter()
            .flatten()
            .filter(|i| i.backlogged())
            .map(|i| i.name.as_str())
            .collect();
        let mut s = lock(&self.shared);
        s.drops.engine = self.engine.stats();
        s.drops.send_buffer_full = self.send_dropped;
        s.drops.tx_rejected = self.tx_rejected_closed
            + self
                .ifaces
                .iter()
                .flatten()
                .filter_map(|i| i.txr.as_ref())
                .map(|t| t.ring.stats().tx_rejected)
                .sum::<u64>();
        let mut next = BTreeMap::new();
        for info in devices {
            let old = s.devices.remove(&info.addr);
            let (partitions, loop_device) = old
                .map(|o| (o.partitions, o.loop_device))
                .unwrap_or_default();
            let identify_page = self.engine.identify_page(info.addr).map(<[u8]>::to_vec);
            let kickme = info
                .interfaces
                .iter()
                .any(|i| backlogged.contains(&i.as_str()));
            next.insert(
                info.addr,
                DevEntry {
                    info,
                    partitions,
                    loop_device,
                    identify_page,
                    kickme,
                },
            );
        }
        s.latest_scan.retain(|dev, _| next.contains_key(dev));
        s.devices = next;
    }

    /// Reads the partition table of `dev` (MBR primaries, the EBR chain of extended
    /// partitions, GPT: [`partition::scan_with`]) from a thread of its own, through the
    /// same I/O path as the files: an EBR can be anywhere on the device, so the reads follow
    /// each other and the network thread must keep running meanwhile.
    fn scan_partitions(&mut self, dev: TargetAddr) {
        let shared = self.shared.clone();
        let capacity = self.engine.device(dev).map_or(0, |d| d.sectors);
        let sectors = (partition::SCAN_SECTORS as u64).min(capacity) as u32;
        if sectors == 0 {
            return;
        }
        let loop_devices = self.loop_devices;
        let path = self.root.join(dev.to_string());
        let handle = self.handle.clone();
        let n = lock(&shared).start_scan(dev);
        let scan = move || {
            // Blocks until the I/O completes; the network thread answers every I/O (EIO
            // when it stops), or drops it with its channel, which ends the wait too.
            let read = |lba: u64, sectors: u32| -> Option<Vec<u8>> {
                let (tx, rx) = crossbeam_channel::bounded(1);
                handle.io(
                    dev,
                    BlockOp::Read { lba, sectors },
                    Box::new(move |r| {
                        let _ = tx.send(r);
                    }),
                );
                rx.recv().ok()?.ok()?
            };
            let parts = match read(0, sectors) {
                Some(head) => partition::scan_with(&head, capacity, &mut |lba| read(lba, 1)),
                None => Vec::new(),
            };
            let found = parts.len();
            let mut s = lock(&shared);
            let scan = s.finish_scan(dev, n, parts);
            if scan != Scan::Stale {
                if found > 0 && scan == Scan::Stored {
                    tracing::info!(partitions = found, "{dev}: partition table found");
                }
                if loop_devices && s.devices.get(&dev).is_some_and(|e| e.loop_device.is_none()) {
                    drop(s);
                    attach_loop(shared.clone(), dev, path);
                }
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("aoe-partscan".into())
            .spawn(scan)
        {
            tracing::warn!(error = %e, "{dev}: cannot start the partition scan");
        }
    }

    fn detach_loop(&mut self, dev: TargetAddr) {
        let lo = lock(&self.shared)
            .devices
            .get_mut(&dev)
            .and_then(|e| e.loop_device.take());
        if let Some(lo) = lo {
            detach_loop_device(&lo);
        }
    }

    /// The end of the thread ([`Cmd::Stop`]): the commands queued behind the stop fail (no
    /// turn of the loop will run them), then the I/O in flight, so that a source answering
    /// on this thread (the FUSE ring) can still send those answers before it is dropped.
    /// Before, commands behind the stop were dropped with their callbacks uncalled, and a
    /// caller waiting on one waited for ever.
    ///
    /// The channel's receiver ends here, not with the thread: a command sent after this
    /// fails at once in [`Handle::send`], and one sent in the instant between the last
    /// look at the channel and the receiver's end fails as the receiver drops it
    /// ([`Queued`]); what those failures queue on this thread fails with the I/O in
    /// flight ([`Net::fail_all`]).
    fn shut_down(&mut self) {
        drop(std::mem::replace(&mut self.rx, crossbeam_channel::never()));
        self.fail_all();
        for s in &mut self.sources {
            s.stopping();
        }
        self.sources.clear();
    }

    fn fail_all(&mut self) {
        for (_, done) in self.pending.drain() {
            done(Err(libc::EIO));
        }
        for (_, done) in self.pending_held.drain() {
            done(Err(libc::EIO));
        }
        // What those completions queued next (a flush after a FUA write, a waiter's I/O)
        // fails too, so that no front-end waits for an answer that cannot come.
        drain_local(fail_cmd);
        let loops: Vec<String> = lock(&self.shared)
            .devices
            .values_mut()
            .filter_map(|e| e.loop_device.take())
            .collect();
        for lo in loops {
            detach_loop_device(&lo);
        }
    }
}

/// Refuses an interface list entry that can never name an interface (empty, longer than
/// the 15 bytes of `IFNAMSIZ`, or with `/`, NUL or whitespace); names that merely do not
/// exist are accepted (see [`Net::sync_interfaces`]).
pub fn check_iflist(list: &[String]) -> Result<(), String> {
    for n in list {
        if n.is_empty()
            || n.len() > 15
            || n.contains(|c: char| c == '/' || c == '\0' || c.is_whitespace())
        {
            return Err(format!(
                "{} cannot be an interface name (1 to 15 bytes, no '/' or whitespace)",
                shown_name(n)
            ));
        }
    }
    Ok(())
}

/// Most bytes of a refused name that an error shows.
const SHOWN_NAME_MAX: usize = 64;

/// `n` quoted and escaped for an error line, cut to [`SHOWN_NAME_MAX`] bytes (at a
/// character boundary) with its length after it: anyone who may write `interfaces` can
/// write 4 KiB at a time, and each refusal goes to `err` and the log.
fn shown_name(n: &str) -> String {
    if n.len() <= SHOWN_NAME_MAX {
        return format!("{n:?}");
    }
    let mut end = SHOWN_NAME_MAX;
    while !n.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &n[..end], n.len())
}

/// Attaches a loop device with partition scan to a device file, from a thread of its own:
/// losetup reads the file through this daemon, so the network thread must keep running.
/// A thread that cannot start (a cgroup's `pids.max` reached) is a line in `err`, not a
/// panic.
fn attach_loop(shared: Arc<Mutex<Shared>>, dev: TargetAddr, path: std::path::PathBuf) {
    let errs = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("aoe-losetup".into())
        .spawn(move || {
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show", "--partscan"])
                .arg(&path)
                .output();
            match out {
                Ok(o) if o.status.success() => {
                    let lo = String::from_utf8_lossy(&o.stdout).trim().to_string();
                    let mut s = lock(&shared);
                    s.push_err(format!("{dev} attached to {lo}"));
                    match s.devices.get_mut(&dev) {
                        Some(e) => e.loop_device = Some(lo),
                        None => {
                            drop(s);
                            detach_loop_device(&lo);
                        }
                    }
                }
                Ok(o) => lock(&shared).push_err(format!(
                    "{dev}: losetup failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => lock(&shared).push_err(format!("{dev}: cannot run losetup: {e}")),
            }
        });
    if let Err(e) = spawned {
        lock(&errs).push_err(format!("{dev}: cannot start losetup's thread: {e}"));
    }
}

/// Called on the network thread: a thread that cannot start (a cgroup's `pids.max`
/// reached) is logged and the loop device left attached; this panicked the network thread
/// until session 36.
fn detach_loop_device(lo: &str) {
    let lo = lo.to_string();
    // Detach lazily (the kernel finishes once the last user closes it); off the network
    // thread since it may read through us.
    let spawned = std::thread::Builder::new()
        .name("aoe-losetup".into())
        .spawn(move || {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &lo])
                .status();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the thread that detaches a loop device");
    }
}

#[cfg(test)]
mod err_ring_tests {
    use super::*;

    /// aoechr.c `aoechr_error`: a full ring drops the new line, not the oldest, so the
    /// lines before a burst (an `up`, say) stay readable; each dropped line is counted.
    /// The old ring dropped the oldest.
    /// The bound on held receive slots: a ring lends at most half its slots to reads (the
    /// frame after that is copied), and a held slot is given up (copied out) once the
    /// head is half a lap past it, or a whole lap (the head met it), so the kernel always
    /// has half the ring to deliver into, however slow a reader.
    #[test]
    fn held_slots_are_bounded() {
        for slots in [256, 460, 920, 5200] {
            let mut held = 0;
            while may_hold(held, slots) {
                held += 1;
            }
            assert_eq!(held, slots / 2, "{slots} slots: half lent, then copies");
            assert!(!may_hold(slots, slots));
            assert!(must_copy_out(0, slots), "the head met it");
            assert!(!must_copy_out(1, slots));
            assert!(!must_copy_out(slots / 2 - 1, slots));
            assert!(must_copy_out(slots / 2, slots));
            assert!(must_copy_out(slots - 1, slots));
        }
    }

    /// Issue 15 (frames above MTU 9000): an interface that receives with `recvmmsg` (no
    /// ring) gets slots that hold its whole frames. The batch had fixed 9,230-byte slots,
    /// so at MTU 65535 every 127-sector answer (65,060 bytes) was cut and ignored and a
    /// read never completed; before `fit_recv_batch` the first assertion below failed
    /// (9230 < 65549). Slots are never shrunk, and not replaced when they already fit.
    #[test]
    fn the_recv_batch_holds_a_whole_frame_of_any_mtu() {
        let mut rxb = RecvBatch::new(RX_BATCH, FRAME_BUF);
        for mtu in [12000, 16384, 65535] {
            fit_recv_batch(&mut rxb, mtu);
            assert!(
                rxb.frame_size() >= aoe_sys::frame_capacity(mtu),
                "MTU {mtu}"
            );
            let answer = aoe_wire::ATA_HEADER_LEN
                + usize::from(aoe_wire::max_sectors_for_mtu(mtu)) * aoe_wire::SECTOR_SIZE;
            assert!(
                rxb.frame_size() >= answer,
                "MTU {mtu}: {answer}-byte answers"
            );
            assert_eq!(rxb.capacity(), RX_BATCH);
        }
        fit_recv_batch(&mut rxb, 1500);
        assert_eq!(rxb.frame_size(), aoe_sys::frame_capacity(65535));
        let mut small = RecvBatch::new(RX_BATCH, FRAME_BUF);
        fit_recv_batch(&mut small, 9000);
        assert_eq!(small.frame_size(), FRAME_BUF);
    }

    #[test]
    fn a_full_err_ring_drops_the_new_line() {
        let mut s = Shared::default();
        for i in 0..ERR_LINES + 5 {
            s.push_err(format!("line {i}"));
        }
        assert_eq!(s.err.len(), ERR_LINES);
        assert_eq!(s.err.front().map(String::as_str), Some("line 0\n"));
        assert_eq!(s.err.back().map(String::as_str), Some("line 99\n"));
        assert_eq!(s.drops.err_ring_full, 5);
        s.err.pop_front();
        s.push_err("after".into());
        assert_eq!(s.err.back().map(String::as_str), Some("after\n"));
    }
}

#[cfg(test)]
mod scan_order_tests {
    use super::*;
    use aoe_proto::initiator::{DeviceState, DeviceStats};

    const DEV: TargetAddr = TargetAddr { shelf: 1, slot: 2 };

    fn known(s: &mut Shared, sectors: u64) {
        let info = DeviceInfo {
            addr: DEV,
            state: DeviceState::Up,
            sectors,
            identify: None,
            firmware_version: 0,
            config: Vec::new(),
            payload: 1024,
            targets: Vec::new(),
            interfaces: Vec::new(),
            open: false,
            ops_outstanding: 0,
            stats: DeviceStats::default(),
        };
        s.devices.insert(
            DEV,
            DevEntry {
                info,
                partitions: Vec::new(),
                loop_device: None,
                identify_page: None,
                kickme: false,
            },
        );
    }

    fn part(sectors: u64) -> Vec<Partition> {
        vec![Partition {
            number: 1,
            start: 2048,
            sectors,
        }]
    }

    /// The scan an `up` started and the one a resize started right after run on threads
    /// of their own; when the first finishes last, its table (read at the old size) used
    /// to replace the second's. The latest scan's table stays.
    #[test]
    fn an_older_partition_scan_finishing_last_does_not_win() {
        let mut s = Shared::default();
        known(&mut s, 4096);
        let up = s.start_scan(DEV);
        let resized = s.start_scan(DEV);
        assert_eq!(s.finish_scan(DEV, resized, part(8192)), Scan::Stored);
        assert_eq!(
            s.finish_scan(DEV, up, part(2048)),
            Scan::Stale,
            "older scan dropped"
        );
        assert_eq!(s.devices[&DEV].partitions, part(8192));
        // A scan of a device that is gone stores nothing.
        let gone = s.start_scan(DEV);
        s.devices.clear();
        assert_eq!(s.finish_scan(DEV, gone, part(1)), Scan::Stale);
    }

    /// `flush` skips a device an NBD client is connected to, on the device or on one of
    /// its partitions, as it skips one with an open file: on the code before, `echo all >
    /// ROOT/flush` removed it and the client's reads failed with EIO until a discover.
    #[test]
    fn an_nbd_client_holds_its_device_against_flush() {
        let mut s = Shared::default();
        assert!(s.nbd_held().is_empty());
        s.nbd_clients.insert(format!("{DEV}p2"), 1);
        s.nbd_clients.insert("e9.9".into(), 2);
        s.nbd_clients.insert("e7.7".into(), 0);
        let held = s.nbd_held();
        let e99 = TargetAddr { shelf: 9, slot: 9 };
        assert_eq!(held.keys().copied().collect::<Vec<_>>(), vec![DEV, e99]);
        assert_eq!(held[&DEV], format!("NBD client on {DEV}p2"));
    }

    /// A re-read table that moves, resizes or drops a partition that is open (its file
    /// through FUSE, or its NBD export) is not taken: the open file would go on at the new
    /// place, the NBD session at the old one, and a file system on it would write over
    /// whatever is there now. The kernel refuses any re-read while a partition is open
    /// (`bdev_disk_changed`: EBUSY). On the code before, every scan replaced the table.
    #[test]
    fn a_scan_does_not_move_an_open_partition() {
        let p = |number, start, sectors| Partition {
            number,
            start,
            sectors,
        };
        let mut s = Shared::default();
        known(&mut s, 65536);
        let n = s.start_scan(DEV);
        assert_eq!(s.finish_scan(DEV, n, vec![p(1, 2048, 4096)]), Scan::Stored);
        s.open_files.insert((DEV, 1), 1);
        // Moved, resized, gone (a scan that could not read the table finds none).
        for new in [
            vec![p(1, 8192, 4096)],
            vec![p(1, 2048, 2048)],
            vec![p(2, 2048, 4096)],
            Vec::new(),
        ] {
            let n = s.start_scan(DEV);
            assert_eq!(s.finish_scan(DEV, n, new.clone()), Scan::Busy, "{new:?}");
            assert_eq!(s.devices[&DEV].partitions, vec![p(1, 2048, 4096)]);
        }
        let line = s.err.back().expect("a line in err");
        assert!(line.contains(&format!("{DEV}p1 open")), "{line}");
        // A partition added beside the open one is taken; so is anything once closed.
        let both = vec![p(1, 2048, 4096), p(2, 8192, 4096)];
        let n = s.start_scan(DEV);
        assert_eq!(s.finish_scan(DEV, n, both.clone()), Scan::Stored);
        assert_eq!(s.devices[&DEV].partitions, both);
        // The whole device open does not hold the table.
        s.open_files.clear();
        s.open_files.insert((DEV, 0), 3);
        let n = s.start_scan(DEV);
        assert_eq!(s.finish_scan(DEV, n, vec![p(1, 8192, 4096)]), Scan::Stored);
        // An NBD client on a partition export holds it as an open file does.
        s.nbd_clients.insert(format!("{DEV}p1"), 1);
        let n = s.start_scan(DEV);
        assert_eq!(s.finish_scan(DEV, n, vec![p(1, 2048, 4096)]), Scan::Busy);
        assert_eq!(s.devices[&DEV].partitions, vec![p(1, 8192, 4096)]);
        s.nbd_clients.clear();
        let n = s.start_scan(DEV);
        assert_eq!(s.finish_scan(DEV, n, vec![p(1, 2048, 4096)]), Scan::Stored);
    }
}

#[cfg(test)]
mod iflist_tests {
    use super::*;

    /// Issue 14 (fixes round): a refused entry is echoed in `err`, the log and `--iflist`'s
    /// error at most 64 bytes long, escaped, with its length: a 4 KiB write to `interfaces`
    /// was echoed whole into each.
    #[test]
    fn a_refused_name_is_echoed_capped_and_escaped() {
        let long = "x".repeat(4000) + "\u{1b}[31m";
        let e = check_iflist(std::slice::from_ref(&long)).unwrap_err();
        assert!(e.len() < 200, "{} bytes: {e}", e.len());
        assert!(e.contains("(4005 bytes)"), "{e}");
        assert!(e.starts_with(&format!("\"{}\"...", "x".repeat(64))), "{e}");
        // A control character inside the shown part is escaped, and a cut never splits a
        // character.
        let odd = "é".repeat(40) + "\n" + &"y".repeat(100);
        let e = check_iflist(&[odd]).unwrap_err();
        assert!(e.starts_with(&format!("\"{}\"...", "é".repeat(32))), "{e}");
        let e = check_iflist(&["a\nb".into()]).unwrap_err();
        assert!(e.starts_with("\"a\\nb\" cannot be"), "{e}");
        // Short names are shown whole, as before.
        let e = check_iflist(&["eth0 x".into()]).unwrap_err();
        assert!(e.starts_with("\"eth0 x\" cannot be"), "{e}");
        assert!(check_iflist(&["eth0".into(), "veth1".into()]).is_ok());
    }
}

#[cfg(test)]
mod housekeeping_tests {
    use super::*;
    use aoe_proto::initiator::{BlockOp, Config};

    fn net() -> (Net, Arc<Mutex<Shared>>) {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let engine = Engine::new(Config::default(), Instant::now());
        let net = Net::new(engine, shared.clone(), false, "/nonexistent".into()).unwrap();
        (net, shared)
    }

    /// A read whose result `io` records, and the record.
    fn recorded_read(h: &Handle) -> Arc<Mutex<Option<Result<(), i32>>>> {
        let got = Arc::new(Mutex::new(None));
        let g = got.clone();
        h.io(
            TargetAddr { shelf: 1, slot: 2 },
            BlockOp::Read { lba: 0, sectors: 1 },
            Box::new(move |r| *g.lock().unwrap() = Some(r.map(drop))),
        );
        got
    }

    /// Commands the network thread will never run fail their I/O with EIO: those queued
    /// behind its stop, and those sent once it is gone. Before, both were dropped with
    /// their callbacks uncalled (a front-end waiting on one waited for ever; with the
    /// FUSE ring's old thread, a stop that did not end): each assertion below saw None.
    #[test]
    fn io_the_stopped_network_thread_cannot_run_fails() {
        let (mut net, _shared) = net();
        let h = net.handle();
        let queued = recorded_read(&h);
        assert_eq!(*queued.lock().unwrap(), None, "queued, not yet run");
        net.shut_down();
        assert_eq!(
            *queued.lock().unwrap(),
            Some(Err(libc::EIO)),
            "queued behind the stop"
        );
        drop(net);
        let late = recorded_read(&h);
        assert_eq!(
            *late.lock().unwrap(),
            Some(Err(libc::EIO)),
            "sent after the thread is gone"
        );
    }

    /// A command sent after the stop's last look at the channel but before the thread's
    /// end (its state dropped) fails too: on the code before it was taken into the channel
    /// and dropped with it, its callback never called ("sent between the stop and the
    /// end": None).
    #[test]
    fn io_sent_between_the_stop_and_the_end_fails() {
        let (mut net, _shared) = net();
        let h = net.handle();
        net.shut_down();
        let between = recorded_read(&h);
        drop(net);
        assert_eq!(
            *between.lock().unwrap(),
            Some(Err(libc::EIO)),
            "sent between the stop and the end"
        );
        // Through the channel, the same: a command dropped unreceived fails its I/O.
        let (tx, rx) = crossbeam_channel::unbounded();
        let got = Arc::new(Mutex::new(None));
        let g = got.clone();
        tx.send(Queued(Some(Cmd::Io {
            dev: TargetAddr { shelf: 1, slot: 2 },
            op: BlockOp::Flush,
            source: SourceId::DEFAULT,
            done: Box::new(move |r| *g.lock().unwrap() = Some(r.map(drop))),
        })))
        .unwrap();
        drop(rx);
        assert_eq!(
            *got.lock().unwrap(),
            Some(Err(libc::EIO)),
            "dropped unreceived"
        );
    }

    /// On the network thread a handle queues its commands on the thread's own list, with
    /// neither the channel nor a wake-up of itself (an eventfd write and a `poll` that
    /// returns at once, per NBD request before); from another thread it uses both, and
    /// its `wake` notifies only from another thread.
    #[test]
    fn on_the_network_thread_commands_go_on_its_own_list() {
        let (net, _shared) = net();
        let h = net.handle();
        let t = std::thread::spawn(move || {
            ON_NET.with(|f| f.set(true));
            h.send(Cmd::Discover);
            h.recycle(vec![0u8; 16]);
            h.wake();
            let mut n = 0;
            drain_local(|_| n += 1);
            n
        });
        assert_eq!(t.join().unwrap(), 2);
        assert!(net.rx.is_empty());
        assert_eq!(net.wake.drain().unwrap(), 0, "no wake-up of itself");
        let h = net.handle();
        h.send(Cmd::Discover);
        h.wake();
        assert_eq!(net.rx.len(), 1);
        assert_eq!(net.wake.drain().unwrap(), 2);
        assert!(!local_pending());
    }

    /// The network thread's housekeeping on the shared state must not wait while a front-end
    /// holds it (a FUSE thread answering an attribute read, a metrics scrape): it skips the
    /// turn and runs on a later one. Its old form (`lock`, every turn of the loop) waited:
    /// with `lock` in place of `try_lock` this test fails at the deadline below.
    #[test]
    fn housekeeping_never_waits_for_a_front_end() {
        let (mut net, shared) = net();
        net.housekept = Instant::now() - HOUSEKEEPING;
        let held = lock(&shared);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let t = std::thread::spawn(move || {
            let ran = net.housekeeping();
            let _ = tx.send(ran);
            net
        });
        let ran = rx.recv_timeout(Duration::from_secs(5));
        drop(held);
        let mut net = t.join().unwrap();
        assert_eq!(
            ran,
            Ok(false),
            "housekeeping waited for the lock (or ran under it)"
        );
        // With the lock free it runs, then not again before HOUSEKEEPING has passed.
        assert!(net.housekeeping());
        assert!(!net.housekeeping());
    }
}
