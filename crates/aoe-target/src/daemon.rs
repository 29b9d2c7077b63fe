//! The target daemon: the event loop (sockets in, engines, worker pool, sockets out) here;
//! export lifecycle in [`exports`], I/O dispatch and completion in [`dispatch`], the send
//! backlog in [`send`].

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aoe_proto::ratelimit::RateLimiter;
use aoe_proto::target::{
    Engine, ExportConfig, Interface, IoFailure, IoKind, Outcome, PersistentState, Token,
    FIRMWARE_VERSION,
};
use aoe_store::{AsyncBackend, Completions, Done, Op, Pool, Request, StoreError};
use aoe_sys::{EventFd, LinkEvents, PacketSocket, PollFd, RecvBatch, TimerFd};
use aoe_wire::{MacAddr, ATA_HEADER_LEN};

use crate::config::{ExportSpec, IoMode, ServeConfig};
use crate::probe::{Duplicate, Probe};
use crate::state::{StateFile, StateWriter};

mod coalesce;
mod conflict;
mod dispatch;
mod exports;
mod order;
mod paths;
mod send;
mod shared;
mod spin;

pub use exports::validate;
use exports::ExportRt;
use order::WriteOrder;
use send::{Batch, IfaceRt};

/// Frames taken from a socket per recvmmsg.
const BATCH: usize = 64;
/// How often interface MTUs are re-read.
const REFRESH: Duration = Duration::from_secs(1);
/// Jobs the worker pool queues at most, over all exports. Each export already keeps at
/// most its buffer count in flight per interface ([`aoe_proto::target::DropReason::OverBufferCount`]);
/// this bounds the sum, so many exports or many interfaces cannot grow the queue (and the
/// frame buffers it holds) without limit either. A request refused here is dropped and
/// counted; the initiator retransmits.
const POOL_QUEUE: usize = 8192;
// One export's advertised window must fit the queue on its own.
const _: () = assert!(crate::config::MAX_BUFFER_COUNT as usize <= POOL_QUEUE);
/// Replies an interface holds at most while its socket's send queue is full. The loop never
/// sleeps on a full queue: it keeps the replies here, asks poll() for POLLOUT and goes on
/// receiving and completing. A reply that finds the backlog full is dropped and counted;
/// the initiator retransmits the request (AoE has no other recovery, AoEr11 section 2).
const SEND_BACKLOG: usize = 4096;
/// Places of [`SEND_BACKLOG`] replies other than ATA may take (see `IfaceRt::queue`).
const CONTROL_BACKLOG: usize = SEND_BACKLOG / 4;
/// Most batches [`Daemon::receive`] takes from one interface before the loop answers
/// completed I/O and sends: a flood arriving as fast as it is read must not starve them.
const RX_BATCHES: usize = 16;
/// The longest stretch spent spinning before the loop's other duties (signals, reloads,
/// state files, MTU refresh) get their turn.
const SPIN_MAX: Duration = Duration::from_millis(10);
/// Waits the loop skips at most in a row because frames were already in a receive ring
/// ([`IfaceRt::rx_ready`]).
const MAX_WAITS_SKIPPED: u32 = 64;
/// One sleep in this many is measured for [`spin::SpinWindow::set_wake_cost`]: two
/// `CLOCK_THREAD_CPUTIME_ID` reads, each a system call (not in the vDSO). One in 16 cost
/// 0.1 us a request at a partial load (2026-12-04 profile); the estimate moves by 1/128 of
/// itself a sample, so hundreds of samples a second still follow the machine's load.
const WAKE_SAMPLE: u32 = 64;
/// How soon the loop kicks a transmit ring again that the kernel refused or took only part
/// of (a full device queue, or a send buffer held by frames still queued below): the kernel
/// signals no POLLOUT for frames still marked in the ring.
const KICK_RETRY: Duration = Duration::from_millis(1);

/// How the outside world steers a running daemon: stop and reload requests, from signals
/// (SIGTERM/SIGINT stop, SIGHUP reloads) or from a test.
#[derive(Debug, Clone)]
pub struct Control {
    stop: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
    wake: Arc<UnixStream>,
    wake_rx: Arc<UnixStream>,
}

impl Control {
    /// A control with no signal handlers.
    pub fn new() -> io::Result<Control> {
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        Ok(Control {
            stop: Arc::new(AtomicBool::new(false)),
            reload: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(tx),
            wake_rx: Arc::new(rx),
        })
    }

    /// A control driven by SIGTERM and SIGINT (stop) and SIGHUP (reload).
    pub fn with_signals() -> io::Result<Control> {
        let c = Control::new()?;
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, c.stop.clone())?;
            signal_hook::low_level::pipe::register(sig, c.wake.try_clone()?)?;
        }
        signal_hook::flag::register(signal_hook::consts::SIGHUP, c.reload.clone())?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGHUP, c.wake.try_clone()?)?;
        Ok(c)
    }

    /// Asks the daemon to stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = (&*self.wake).write_byte();
    }

    /// Asks the daemon to reload its configuration file.
    pub fn reload(&self) {
        self.reload.store(true, Ordering::SeqCst);
        let _ = (&*self.wake).write_byte();
    }

    fn drain(&self) {
        let mut b = [0u8; 64];
        while matches!((&*self.wake_rx).read(&mut b), Ok(n) if n > 0) {}
    }
}

trait WriteByte {
    fn write_byte(self) -> io::Result<()>;
}

impl WriteByte for &UnixStream {
    fn write_byte(self) -> io::Result<()> {
        use std::io::Write;
        let mut s = self;
        s.write_all(&[1])
    }
}

/// The hasher of [`Daemon::exports`], whose keys are ids the daemon hands out itself (no
/// one else chooses them, so nothing to flood): a multiplication instead of SipHash, looked
/// up several times per frame (0.8% of the target's samples under writes).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        // Fibonacci hashing: the high bits, which hashbrown's control bytes take, vary too.
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The error of a stop that lost work ([`Daemon::run`] after its drain): requests still in a
/// store or a state file not saved. The stores, their threads and the buffers they write
/// into are left running on purpose (an RBD image's requests wait in librbd), so the
/// process must end without running library destructors under those threads: `aoe serve`
/// ends with [`aoe_sys::exit_now`] on it, status 1 as for any error.
#[derive(Debug)]
pub struct WorkLost(String);

impl std::fmt::Display for WorkLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WorkLost {}

/// A running target.
pub struct Daemon {
    config_path: Option<PathBuf>,
    /// The command line's settings next to `--config`, applied to every reload.
    overrides: crate::config::Overrides,
    config: ServeConfig,
    ifaces: Vec<IfaceRt>,
    exports: HashMap<u32, ExportRt, BuildHasherDefault<IdHasher>>,
    next_export_id: u32,
    /// Workers for the exports on synchronous stores (files, block devices).
    pool: Arc<Pool>,
    /// Where every store's finished requests arrive; a push writes [`Daemon::event`].
    completions: Arc<Completions>,
    event: Arc<EventFd>,
    /// Fires every [`REFRESH`]: the loop's once-a-second duties, without a timeout on its
    /// sleeps.
    refresh_timer: TimerFd,
    /// The rtnetlink link group, polled beside the refresh timer: an interface deleted and
    /// created again, given a new address or MTU, renamed or moved is looked at at once
    /// ([`Daemon::refresh_interfaces`]) rather than at the next tick, which stays as the
    /// fallback. `None` if it could not be opened (said once) or failed since.
    links: Option<LinkEvents>,
    /// The wait's poll set (kept for its capacity).
    poll_fds: Vec<PollFd>,
    spare: Vec<Vec<u8>>,
    /// Writes waiting for an overlapping write (all exports): they count against
    /// [`POOL_QUEUE`] as the pool's own queue does.
    waiting_writes: usize,
    hostname: String,
    /// A reload whose stores a thread is opening ([`Daemon::start_apply`]).
    reloading: Option<Reloading>,
    /// A SIGHUP came while a reload was under way: reload again once it is done.
    reload_again: bool,
    /// Seconds counted by the refresh timer's expirations: the clock of
    /// [`Daemon::log_stuck`].
    ticks: u32,
    /// A look at whether the exports' paths still name their files, under way on a thread
    /// ([`paths`]).
    path_check: Option<paths::PathCheck>,
    /// Saves state files off the event loop.
    state_writer: StateWriter,
    /// Where the loop publishes snapshots for metrics and the control socket.
    observer: Arc<crate::control::Observer>,
    started: Instant,
    /// Log lines any sender can provoke (dropped frames, failed I/O it asked for): one per
    /// kind per [`LOG_INTERVAL`], with the count suppressed in between.
    logs: RateLimiter,
    /// How interfaces move frames, from the configuration at start (a reload keeps it).
    io: IoMode,
    /// How long the loop keeps polling after the last frame ([`ServeConfig::spin`]; while
    /// an initiator keeps requests in flight the next ones are microseconds away, and
    /// sleeping in poll() costs a wake-up on another core for every batch), from the
    /// configuration at start (a reload keeps it).
    spin: Duration,
    /// How long frames gather at most after a batch the spin does not follow
    /// ([`ServeConfig::coalesce`]; zero: never).
    coalesce: Duration,
    /// How long the next coalescing wait is, at most `coalesce`, from the rate frames
    /// arrive at ([`coalesce::Coalesce`]).
    coalescer: coalesce::Coalesce,
    /// The next wait is a coalescing one of this long ([`Daemon::coalesce`]): set after a
    /// batch, cleared by the wait.
    coalesce_next: Duration,
    /// How long a stop waits for the I/O in flight ([`ServeConfig::drain`]).
    drain: Duration,
    /// How long the loop spins now, at most `spin`: the window that would have cost the
    /// least CPU over the last idle stretches, a wake-up priced at what the loop's sleeps
    /// cost ([`spin::SpinWindow`]).
    spin_window: spin::SpinWindow,
    /// Waits skipped in a row (frames were in a receive ring), at most [`MAX_WAITS_SKIPPED`].
    waits_skipped: u32,
    /// Sleeps that waited for the next frame, to sample one in [`WAKE_SAMPLE`].
    sleeps: u32,
    /// When the last frame came before the loop went to sleep in poll() (the spin found
    /// nothing within its window, or the window was zero): the next frame's gap adapts
    /// `spin_window`.
    slept_after: Option<Instant>,
    /// The duplicate-write table's settings ([`ServeConfig::dedup`]), fixed at start.
    dedup: aoe_proto::target::DedupConfig,
    /// True if the frames received since the loop last slept reached a file export: what
    /// [`Daemon::spin_pays`] asks.
    batch_file_frames: bool,
    /// When the receive call that took the frames being dispatched found them: the time
    /// [`Daemon::dispatch`] gives the export's engine (`Engine::set_now`) before each frame.
    rx_now: Instant,
    /// Exports frames were dispatched to that may still have requests in flight (each
    /// with `listed_busy` set): what `outstanding` looks at (`daemon/shared.rs`).
    busy: Vec<u32>,
    /// Exports frames were dispatched to since the last [`Daemon::persist_state`] (each
    /// with `listed_touched` set): whose state may have changed.
    touched: Vec<u32>,
    /// Set where a state changed outside `dispatch`: the next `persist_state` looks at
    /// every export.
    persist_all: bool,
    /// [`IfaceRt::routes_for`]'s answer for the frame being routed, kept for its capacity.
    route_scratch: Vec<usize>,
    /// While the loop spins: the clock as the spin's last turn read it, which
    /// [`Daemon::receive`] gives the engines as the time of the frames it takes (a turn's
    /// work later: microseconds against a window of seconds) rather than reading the clock
    /// again. `None` outside the spin: `receive` reads the clock when it finds frames.
    spin_now: Option<Instant>,
    /// Receive batches that held frames, and the frames they held, over the daemon's life:
    /// logged at the stop (frames per batch, what a benchmark wants to know of how the loop
    /// met its load).
    rx_batches: u64,
    rx_frames: u64,
    /// With rings: the io_uring the reads of a receive batch go through, one
    /// `io_uring_enter` for all of them ([`Daemon::finish_staged`]); `None` where io_uring
    /// is unavailable (logged once), and each read is one `preadv2` as before.
    uring: Option<aoe_sys::SlotReads>,
    /// Results of the last io_uring batch (kept for its capacity).
    uring_out: Vec<(usize, io::Result<aoe_sys::NoWait>)>,
    /// Exports whose [`ExportRt::gathered`] holds reads of the current receive batch.
    gathering: Vec<u32>,
    /// The staged writes of one run (`run_staged_writes`; kept for its capacity).
    write_run: Vec<usize>,
    /// The staged reads of one run and their slots (`run_staged_reads`; kept for their
    /// capacity, [`aoe_sys::MAX_SLOT_PARTS`]).
    read_members: Vec<usize>,
    read_parts: Vec<aoe_sys::SlotPart>,
    /// The address conflict watch: probes every [`ServeConfig::conflict_check`] for another
    /// target answering for one of our addresses ([`conflict`]).
    watch: conflict::Watch,
    /// The start's take-over wait was refused ([`Daemon::poll_reload`]): the loop stops and
    /// [`Daemon::run`] fails with this, after the exports that served meanwhile drained.
    start_refused: Option<anyhow::Error>,
}

/// What a reload's thread opened: the configuration, the running exports that stay, the new
/// ones.
type ReloadOpened = (ServeConfig, Vec<u32>, Vec<ExportRt>);

/// A reload under way ([`Daemon::start_apply`]), or the start's commit waiting for a
/// gateway whose lock it broke to fall silent ([`exports::TakingOver`]): one wait, one
/// decision path, for both.
struct Reloading {
    /// Where its thread sends the opened stores; None for the start's (opened already).
    rx: Option<std::sync::mpsc::Receiver<Result<ReloadOpened>>>,
    /// Its stores are open and its commit waits for a gateway whose lock it broke to fall
    /// silent ([`exports::TakingOver`]); `rx` is done with.
    taking_over: Option<Box<exports::TakingOver>>,
    /// The config file, for the log; None for the start's commit.
    path: Option<PathBuf>,
    /// The tick it began at, and that of the last warning that it is still opening its
    /// stores ([`Daemon::log_slow_reload`]).
    since: u32,
    warned: Option<u32>,
}

/// Interval of [`Daemon`]'s rate-limited log lines.
const LOG_INTERVAL: Duration = Duration::from_secs(1);
/// A request waiting on its store this many ticks (seconds, [`REFRESH`]) counts as stuck
/// ([`Daemon::log_stuck`]): longer than a disk's or a healthy Ceph cluster's slowest answer
/// under load, and far shorter than the Linux aoe driver's `aoe_deadsecs` (180 s, after
/// which it fails the device; docs/PROTOCOL.md), so that the warning comes while an
/// initiator still retransmits.
const STUCK_AFTER: u32 = 5;
/// While requests stay stuck, one warning per export this many ticks apart.
const STUCK_REPEAT: u32 = 10;

impl Daemon {
    /// Opens every export and interface of `config`; refuses, naming the problem, an export
    /// that cannot be opened or an interface that does not exist. `config_path` is re-read
    /// on reload.
    pub fn new(config: ServeConfig, config_path: Option<PathBuf>) -> Result<Daemon> {
        config.check_static()?;
        let event = Arc::new(EventFd::new().context("cannot create eventfd")?);
        let ev = event.clone();
        // One completion queue for every store, the worker pool's and librbd's callbacks
        // alike: each push writes the eventfd the loop polls.
        let completions = Completions::new(Arc::new(move || {
            let _ = ev.notify();
        }));
        let pool = Arc::new(
            Pool::with_completions(config.workers, POOL_QUEUE, completions.clone())
                .context("cannot start I/O workers")?,
        );
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let mut d = Daemon {
            config_path,
            overrides: Default::default(),
            config: ServeConfig::default(),
            ifaces: Vec::new(),
            exports: HashMap::default(),
            next_export_id: 0,
            pool,
            completions,
            event,
            refresh_timer: TimerFd::periodic(REFRESH).context("cannot create a timerfd")?,
            links: LinkEvents::new()
                .inspect_err(|e| {
                    tracing::warn!(
                        error = %e,
                        "cannot listen to link events (rtnetlink): interface changes are \
                         found by the look every second"
                    )
                })
                .ok(),
            poll_fds: Vec::new(),
            spare: Vec::new(),
            waiting_writes: 0,
            ticks: 0,
            path_check: None,
            reloading: None,
            reload_again: false,
            hostname,
            state_writer: StateWriter::new().context("cannot start the state writer")?,
            observer: crate::control::Observer::new(),
            started: Instant::now(),
            logs: RateLimiter::new(LOG_INTERVAL),
            io: config.io,
            spin: config.spin,
            drain: config.drain,
            coalesce: config.coalesce,
            coalesce_next: Duration::ZERO,
            coalescer: coalesce::Coalesce::new(config.coalesce),
            spin_window: spin::SpinWindow::new(config.spin),
            slept_after: None,
            sleeps: 0,
            waits_skipped: 0,
            dedup: config.dedup,
            batch_file_frames: false,
            route_scratch: Vec::new(),
            busy: Vec::new(),
            touched: Vec::new(),
            persist_all: false,
            rx_now: Instant::now(),
            spin_now: None,
            rx_batches: 0,
            rx_frames: 0,
            uring: None,
            uring_out: Vec::with_capacity(BATCH),
            gathering: Vec::new(),
            write_run: Vec::with_capacity(BATCH),
            read_members: Vec::with_capacity(aoe_sys::MAX_SLOT_PARTS),
            read_parts: Vec::with_capacity(aoe_sys::MAX_SLOT_PARTS),
            watch: conflict::Watch::default(),
            start_refused: None,
        };
        if config.io == IoMode::Rings {
            match aoe_sys::SlotReads::new(BATCH as u32) {
                Ok(u) => d.uring = Some(u),
                Err(e) => tracing::warn!(
                    error = %e,
                    "io_uring unavailable; cached reads use one preadv2 each"
                ),
            }
        }
        d.apply(config)?;
        Ok(d)
    }

    /// Runs until `control` says stop; then waits for in-flight I/O and returns.
    pub fn run(&mut self, control: &Control) -> Result<()> {
        if !self.coalesce.is_zero() {
            // The coalescing wait is tens of microseconds: the default slack (50 us) would
            // double it.
            if let Err(e) = aoe_sys::set_timer_slack(Duration::from_micros(1)) {
                tracing::warn!(error = %e, "cannot shorten the timer slack; coalescing waits may run 50 us long");
            }
        }
        self.read_rx_drops();
        self.observer.publish(self.snapshot());
        let wake = control.wake.clone();
        self.observer.set_waker(Box::new(move || {
            let _ = (&*wake).write_byte();
        }));
        let mut ready: Vec<bool> = Vec::new();
        loop {
            if control.stop.load(Ordering::SeqCst) || self.start_refused.is_some() {
                break;
            }
            if control.reload.swap(false, Ordering::SeqCst) {
                if self.reloading.is_some() {
                    self.reload_again = true;
                } else {
                    self.reload();
                }
            }
            if self.reloading.is_some() {
                self.poll_reload();
                if self.reloading.is_none() && std::mem::take(&mut self.reload_again) {
                    self.reload();
                }
            }
            // After a batch the spin did not follow, with `--coalesce-us` and frames close
            // enough together ([`coalesce::Coalesce`]): a wait on a timer, not on the
            // sockets, so that the frames of the next few microseconds come in one wake-up
            // (the worker completions and the control still wake it at once).
            let coalesce_wait = std::mem::take(&mut self.coalesce_next);
            let coalescing = !coalesce_wait.is_zero();
            let wait = if self.ifaces.iter().any(|i| i.old.is_some()) {
                // A replaced socket still holds frames the wait does not watch.
                Some(Duration::ZERO)
            } else if self.ifaces.iter().any(IfaceRt::kick_pending) {
                Some(KICK_RETRY)
            } else {
                // No timer armed for the sleep: the refresh timer's fd wakes it once a second.
                None
            };
            // A sample of the sleeps that wait for the next frame: what they cost the loop's
            // own CPU (the system call, the switch out and back) is what a spin must save to
            // pay ([`spin::SpinWindow`]). The clock is a system call, so one sleep in
            // [`WAKE_SAMPLE`], not all.
            // A coalescing wait is not the sleep a spin saves (it ends on a timer, which
            // costs more: 7-15 us against 4-5 on the loaded machine, 2026-12-04), so it is
            // not sampled.
            // Frames that came while the loop worked are taken without the wait's system
            // call, as a loop that asks its socket first does (vblade's `read`): half of the
            // waits at a partial load returned at once (`perf stat`, 2026-12-04). At most
            // [`MAX_WAITS_SKIPPED`] in a row, so that the completions, the control socket and
            // the refresh timer are looked at under any load.
            let n = self.ifaces.len();
            ready.clear();
            ready.resize(n, false);
            let mut skip = false;
            if !coalescing && self.waits_skipped < MAX_WAITS_SKIPPED {
                for (r, i) in ready.iter_mut().zip(&self.ifaces) {
                    *r = i.rx_ready();
                    skip |= *r;
                }
            }
            self.waits_skipped = if skip { self.waits_skipped + 1 } else { 0 };
            let sample = !skip && self.slept_after.is_some() && !coalescing && {
                self.sleeps = self.sleeps.wrapping_add(1);
                self.sleeps % WAKE_SAMPLE == 0
            };
            let cpu = sample.then(|| (aoe_sys::thread_cpu_time(), Instant::now()));
            let (mut completions, mut woken, mut refresh) = (false, false, false);
            let mut linked = false;
            if skip {
                // The frames are read below; nothing else is looked at this turn.
            } else {
                // poll(2), not epoll: an epoll registration stays on the socket's wait queue,
                // so every frame delivered runs ep_poll_callback in the sender's softirq,
                // charged to the initiator's CPU, even while the loop spins (saturated
                // MB/s 3-13% lower, run e2). The refresh timer's fd instead of a timeout:
                // no hrtimer armed and cancelled for each sleep. A coalescing wait does not
                // watch the sockets: it ends on its timer.
                let fds = &mut self.poll_fds;
                fds.clear();
                fds.extend(
                    self.ifaces.iter().map(|i| {
                        PollFd::with_events(i.sock.as_raw_fd(), !coalescing, i.wants_out())
                    }),
                );
                fds.push(PollFd::new(self.event.as_raw_fd()));
                fds.push(PollFd::new(control.wake_rx.as_raw_fd()));
                fds.push(PollFd::new(self.refresh_timer.as_raw_fd()));
                if let Some(l) = &self.links {
                    fds.push(PollFd::new(l.as_raw_fd()));
                }
                if coalescing {
                    let wait = wait.unwrap_or(REFRESH).min(coalesce_wait);
                    aoe_sys::poll_precise(fds, Some(wait)).context("poll")?;
                } else {
                    aoe_sys::poll(fds, wait).context("poll")?;
                }
                (completions, woken, refresh) = (fds[n].ready, fds[n + 1].ready, fds[n + 2].ready);
                linked = fds.get(n + 3).is_some_and(|f| f.ready);
                for (r, fd) in ready.iter_mut().zip(fds.iter()) {
                    *r = fd.ready;
                }
            }
            let woke = self.slept_after.map(|_| Instant::now());
            if let (Some((cpu, wall)), Some(woke)) = (cpu, woke) {
                let used = aoe_sys::thread_cpu_time().saturating_sub(cpu);
                // Only a wait that slept (off the CPU most of its time) measures a wake-up.
                if !used.is_zero() && woke - wall >= used * 2 {
                    self.spin_window.set_wake_cost(used);
                }
            }
            if woken {
                control.drain();
            }
            if completions {
                let _ = self.event.drain();
            }
            if refresh {
                let n = self.refresh_timer.drain().unwrap_or(1);
                self.ticks = self.ticks.wrapping_add(n.clamp(1, 3600) as u32);
            }
            // Completions are answered after the receive below in any case; before it only
            // if the eventfd said some came (an empty look at the queue is cache lines a
            // request touches for nothing, 2026-12-04 profile).
            if completions {
                self.complete_io();
            }
            let mut frames = 0;
            self.batch_file_frames = false;
            // The frames' time for the engines: the wake-up's clock read, not one more.
            self.spin_now = woke;
            for (idx, &fd_ready) in ready.iter().enumerate() {
                if idx < self.ifaces.len()
                    && (fd_ready || coalescing || self.ifaces[idx].old.is_some())
                {
                    let got = self.receive(idx);
                    if got == 0 && fd_ready {
                        // Woken with nothing to read: an error pending on the socket
                        // (POLLERR), which a ring's reads never clear.
                        self.take_socket_error(idx);
                    }
                    frames += got;
                }
            }
            self.spin_now = None;
            self.complete_io();
            self.flush_sends();
            if frames > 0 {
                if let (Some(t), Some(woke)) = (self.slept_after.take(), woke) {
                    // A coalescing wait's end is the timer's, not the first frame's: the
                    // frames' spacing is what a spin would have waited for each.
                    self.spin_window.after_sleep(if coalescing {
                        coalesce_wait / u32::try_from(frames).unwrap_or(u32::MAX)
                    } else {
                        woke - t
                    });
                }
                let spins = !self.spin.is_zero() && self.spin_pays();
                // Coalesce where the spin does not run: frames further apart than a wake-up.
                if !self.coalesce.is_zero() {
                    self.coalescer
                        .batch(woke.unwrap_or_else(Instant::now), frames);
                    if !spins || self.spin_window.get().is_zero() {
                        self.coalesce_next = self.coalescer.wait();
                    }
                }
                if spins {
                    self.slept_after = self.spin(control);
                }
            }
            self.persist_state(refresh);
            if refresh || self.observer.wanted() {
                self.read_rx_drops();
                self.observer.publish(self.snapshot());
            }
            if linked && !refresh && self.link_events() {
                self.refresh_interfaces("link event");
            }
            if refresh {
                if linked {
                    let _ = self.link_events();
                }
                self.watch.tick(&self.config, Instant::now());
                self.refresh_interfaces("tick");
                self.poll_shared_stores();
                self.log_drops();
                self.log_stuck();
                self.log_slow_reload();
                self.check_paths();
                for e in self.exports.values_mut() {
                    e.engine.next_query_period();
                }
                let gone: Vec<u32> = self
                    .exports
                    .iter()
                    .filter(|(_, e)| e.retiring && e.engine.in_flight() == 0)
                    .map(|(id, _)| *id)
                    .collect();
                for id in gone {
                    self.exports.remove(&id);
                    // Nothing of it is in flight, so nothing is inherited from it any more;
                    // should anything be, it is not waited for past the export's end.
                    self.forget_export(id);
                }
            }
        }
        let stopping = Instant::now();
        let left = self.drain_io(self.drain);
        self.drain_sends(Duration::from_secs(1));
        let unsynced = self.sync_exports(self.drain.saturating_sub(stopping.elapsed()));
        self.persist_state(true);
        let state_saved = self.state_writer.wait_idle(Duration::from_secs(30));
        if !state_saved {
            tracing::error!(
                "state files not saved (a save failed, or still running after 30 s); exiting anyway"
            );
        }
        self.log_drops();
        let (epochs, spinning) = self.spin_window.epochs();
        tracing::info!(
            frames = self.rx_frames,
            batches = self.rx_batches,
            wake_cost_ns = self.spin_window.wake_cost().as_nanos() as u64,
            spin_epochs = spinning,
            epochs,
            "received {} frames in {} receive batches; a wake-up cost {} ns, the spin ran in \
             {spinning} of {epochs} epochs",
            self.rx_frames,
            self.rx_batches,
            self.spin_window.wake_cost().as_nanos()
        );
        if left.is_empty() && unsynced.is_empty() && state_saved {
            tracing::info!("stopped");
            return match self.start_refused.take() {
                Some(e) => Err(e),
                None => Ok(()),
            };
        }
        // The stop lost work, and a service manager must see it (exit status 1). A thread
        // stuck in a store's I/O or a state file's write is left to the process exit:
        // dropping the pool or the writer would join it and wait as long as it is stuck.
        std::mem::forget(self.pool.clone());
        // Likewise the stores: an RBD image closed with requests still in librbd waits in
        // rbd_close until the cluster answers them (an OSD stopped: for ever, after "stopped
        // with work lost" was said), and the buffers librbd writes into must not be freed
        // under it. The process exit closes the cluster connections; the image's lock is
        // then broken by the next gateway as a killed one's is.
        for (_, rt) in self.exports.drain() {
            std::mem::forget(rt);
        }
        self.state_writer.detach();
        let mut lost: Vec<String> = left
            .iter()
            .map(|(addr, what)| format!("{addr}: {what}"))
            .collect();
        lost.extend(unsynced);
        if !state_saved {
            lost.push("state files not saved".into());
        }
        tracing::error!("stopped with work lost");
        Err(WorkLost(format!(
            "stopped after {} s with work lost: {}",
            self.drain.as_secs(),
            lost.join("; ")
        ))
        .into())
    }

    /// The observer this daemon publishes its state to (metrics, control socket).
    pub fn observer(&self) -> Arc<crate::control::Observer> {
        self.observer.clone()
    }

    /// Brings each interface's count of frames the kernel dropped at its socket up to date
    /// (a system call per interface: once per published snapshot, not per frame).
    fn read_rx_drops(&mut self) {
        for i in &mut self.ifaces {
            i.read_rx_drops();
        }
    }

    /// The state as it is now, from the counters the engine and the loop already keep.
    fn snapshot(&self) -> crate::control::Snapshot {
        use crate::control::{ExportCounters, ExportStatus, IfaceStatus, Snapshot};
        let now = Instant::now();
        let mut exports: Vec<ExportStatus> = self
            .exports
            .values()
            .filter(|e| !e.retiring)
            .map(|e| {
                let st = e.engine.stats();
                let ps = e.engine.state();
                let a = e.spec.addr();
                ExportStatus {
                    target: format!("{}.{}", a.shelf, a.slot),
                    shelf: a.shelf,
                    slot: a.slot,
                    interfaces: e.spec.interfaces.clone(),
                    path: e.spec.path.display().to_string(),
                    sectors: e.engine.config().sectors,
                    offset: e.spec.offset,
                    read_only: e.spec.read_only,
                    direct: e.spec.direct_io,
                    sync: e.spec.sync,
                    buffer_count: e.spec.buffer_count,
                    in_flight: e.engine.in_flight(),
                    max_in_flight: st.max_in_flight,
                    config_string: String::from_utf8_lossy(&ps.config).into_owned(),
                    mask: ps.mask.iter().map(ToString::to_string).collect(),
                    reserve: ps.reserve.iter().map(ToString::to_string).collect(),
                    failed: e.backend.failed(),
                    oldest_request_secs: e.oldest,
                    path_replaced: e.path_replaced,
                    conflicts: self.watch.conflicts.of(a, now),
                    counters: ExportCounters {
                        replies: st.replies,
                        aoe_errors: st.aoe_errors,
                        ata_errors: st.ata_errors,
                        bytes_read: st.sectors_read * 512,
                        bytes_written: st.sectors_written * 512,
                        flushes: st.flushes,
                        dropped: st.dropped,
                        dropped_over_buffer_count: st.over_buffer_count,
                        dropped_queue_full: e.pool_full_drops,
                        dropped_over_fair_share: st.over_fair_share,
                        dropped_reply_too_long: st.replies_too_long,
                        requests: st.requests.into(),
                        aoe_error_codes: st.aoe_error_codes.into(),
                        duplicate_writes: st.dedup.into(),
                        wildcard_writes_refused: st.wildcard_writes_refused,
                    },
                }
            })
            .collect();
        exports.sort_by_key(|e| (e.shelf, e.slot));
        let saves = self.state_writer.health();
        Snapshot {
            taken: crate::control::now_epoch(),
            pid: std::process::id(),
            uptime: self.started.elapsed().as_secs_f64(),
            config_file: self.config_path.as_ref().map(|p| p.display().to_string()),
            workers: self.config.workers,
            exports,
            interfaces: self
                .ifaces
                .iter()
                .map(|i| IfaceStatus {
                    name: i.name.clone(),
                    mtu: i.iface.mtu,
                    send_failed: i.send_failures,
                    backlog_full: i.backlog_drops,
                    rx_dropped: i.rx_drops,
                    tx_rejected: i.ring().map_or(0, |r| r.stats().tx_rejected),
                })
                .collect(),
            state_files_failing: saves.failing,
            state_save_failures: saves.failures,
            conflict_probes: self.watch.probes,
            pending: self
                .reloading
                .as_ref()
                .and_then(|r| r.taking_over.as_ref())
                .map_or_else(Vec::new, |t| t.status(now)),
            reload: self.reloading.as_ref().and_then(|r| {
                Some(crate::control::ReloadStatus {
                    config: r.path.as_ref()?.display().to_string(),
                    phase: if r.taking_over.is_some() {
                        "taking_over"
                    } else {
                        "opening"
                    }
                    .into(),
                    secs: u64::from(self.ticks.wrapping_sub(r.since)),
                })
            }),
        }
    }

    /// Sets the command line's settings that every reload applies over the file's
    /// ([`crate::config::Overrides`]); the caller applied them to the starting
    /// configuration already.
    pub fn set_overrides(&mut self, o: crate::config::Overrides) {
        self.overrides = o;
    }

    fn reload(&mut self) {
        let Some(path) = self.config_path.clone() else {
            // Exports from the command line: nothing to read again, but their files are
            // looked at as a reload does, so that one grown, shrunk or replaced under its
            // path is reopened and announced (a SIGHUP used to be ignored here, and a grown
            // image needed a restart to be served at its new size).
            let cfg = self.config.clone();
            self.apply_reloaded(cfg, std::path::Path::new("(command line)"));
            return;
        };
        let loaded = ServeConfig::load(&path).map(|mut c| {
            self.overrides.apply(&mut c);
            c
        });
        match loaded.map_err(anyhow::Error::from) {
            Ok(cfg) if cfg.control != self.config.control => {
                let was = self.config.control.clone();
                let shown = |c: &Option<PathBuf>| {
                    c.as_ref()
                        .map_or("the default".to_string(), |p| p.display().to_string())
                };
                tracing::warn!(
                    "reload: control = {} is read at start; the socket stays at {} until \
                     aoe serve restarts",
                    shown(&cfg.control),
                    shown(&was)
                );
                self.apply_reloaded(
                    ServeConfig {
                        control: was,
                        ..cfg
                    },
                    &path,
                );
            }
            Ok(cfg) => self.apply_reloaded(cfg, &path),
            Err(e) => tracing::error!(
                "reload refused, keeping the running configuration: {e:#}{}",
                crate::nofile_hint(&e)
            ),
        }
    }

    fn apply_reloaded(&mut self, mut cfg: ServeConfig, path: &std::path::Path) {
        // The I/O mode is fixed at start (`--io`): a reload keeps the running one.
        cfg.io = self.io;
        cfg.spin = self.spin;
        cfg.coalesce = self.coalesce;
        cfg.drain = self.drain;
        cfg.dedup = self.dedup;
        self.start_apply(cfg, path.to_path_buf());
    }

    /// Serves frames as they come, without sleeping, until none came for the spin window
    /// ([`spin::SpinWindow`], at most `spin`), or for at most [`SPIN_MAX`], or until a stop
    /// or reload is asked for, or until only RBD requests are outstanding
    /// ([`Daemon::spin_yields`]). Returns when the last frame came if it ended because none
    /// came within the window (the loop sleeps next, and the next frame's gap adapts the
    /// window); `None` if it ended for another reason.
    fn spin(&mut self, control: &Control) -> Option<Instant> {
        let window = self.spin_window.get();
        let start = Instant::now();
        if window.is_zero() {
            return Some(start);
        }
        self.spin_now = Some(start);
        let ended = self.spin_turns(control, window, start);
        self.spin_now = None;
        ended
    }

    /// The turns of [`Daemon::spin`], which returns what they return.
    fn spin_turns(
        &mut self,
        control: &Control,
        window: Duration,
        start: Instant,
    ) -> Option<Instant> {
        let mut last = start;
        loop {
            if control.stop.load(Ordering::Relaxed)
                || control.reload.load(Ordering::Relaxed)
                || self.spin_yields()
            {
                return None;
            }
            let mut frames = 0;
            for idx in 0..self.ifaces.len() {
                frames += self.receive(idx);
            }
            // Worker completions are answered here too, not only after the spin.
            self.complete_io();
            self.flush_sends();
            // One clock read a turn, which the next turn's `receive` reuses.
            let now = Instant::now();
            self.spin_now = Some(now);
            if frames > 0 {
                self.spin_window.caught(now - last);
                last = now;
            } else if now - last >= window {
                return Some(last);
            }
            if now - start >= SPIN_MAX {
                return None;
            }
            if frames == 0 {
                std::hint::spin_loop();
            }
        }
    }

    /// Reads and clears the error pending on interface `idx`'s socket, logging it (at most
    /// once a second). With a PACKET_MMAP ring nothing else reads it: the `ENETDOWN` the
    /// kernel leaves on the socket when its interface is or goes down (a link flap, a
    /// target started before the network) made every poll return at once, the loop one
    /// busy core for as long as the process lived (session 27, operator's audit:
    /// `ip link set IF down; ip link set IF up` under `aoe serve`). `recvmmsg` reads and
    /// clears it itself, so `--io mmsg` had no such loop.
    fn take_socket_error(&mut self, idx: usize) {
        let i = &self.ifaces[idx];
        if !matches!(i.batch, Batch::Ring(_)) {
            return;
        }
        if let Ok(Some(e)) = i.sock.take_error() {
            if let Some(a) = self.logs.check(Instant::now(), "socket error") {
                tracing::warn!(interface = %i.name, error = %e, "interface socket error{a}");
            }
        }
    }

    /// Takes every frame waiting on interface `idx` to the exports it is addressed to
    /// ([`IfaceRt::routes_for`]) and gives the ring's slots back ([`IfaceRt::release_rx`]: a
    /// slot still lent would end the loop's next wait at once); returns how many.
    fn receive(&mut self, idx: usize) -> usize {
        let n = self.receive_batches(idx);
        if n > 0 {
            self.ifaces[idx].release_rx();
        }
        n
    }

    /// The batches of [`Daemon::receive`].
    fn receive_batches(&mut self, idx: usize) -> usize {
        let mut total = 0;
        for _ in 0..RX_BATCHES {
            let got = {
                let i = &mut self.ifaces[idx];
                match i.recv() {
                    Ok(n) => n,
                    Err(e) => {
                        if let Some(a) = self.logs.check(Instant::now(), "receive failed") {
                            tracing::warn!(interface = %i.name, error = %e, "receive failed{a}");
                        }
                        0
                    }
                }
            };
            if got == 0 {
                return total;
            }
            if total == 0 {
                // The window of the engines' duplicate-write tables counts from here: a
                // clock read per call that found frames, not per frame, and none for the
                // spin's empty turns.
                // Given to each engine as `dispatch` hands it a frame ([`Daemon::rx_now`]),
                // not to every export of the interface here: beside 4096 idle exports that
                // loop was most of a frame's cost (session 35).
                self.rx_now = self.spin_now.unwrap_or_else(Instant::now);
            }
            total += got;
            self.rx_batches += 1;
            self.rx_frames += got as u64;
            // One pass over the batch's headers first: each write's line of its export's
            // duplicate-write table is asked for now and comes in while the frames before it
            // are handled ([`Engine::dedup_line`](aoe_proto::target::Engine::dedup_line)).
            if got > 1 {
                self.prefetch_batch(idx, got);
            }
            for f in 0..got {
                if self.ifaces[idx].meta(f).truncated {
                    if let Some(a) = self.logs.check(Instant::now(), "oversized frame") {
                        tracing::debug!(
                            interface = %self.ifaces[idx].name,
                            "oversized frame dropped{a}"
                        );
                    }
                    continue;
                }
                let mut routes = std::mem::take(&mut self.route_scratch);
                self.ifaces[idx].routes_for(f, &mut routes);
                for &k in &routes {
                    let route = self.ifaces[idx].exports[k];
                    self.batch_file_frames |= route.file;
                    self.dispatch(idx, f, route.id);
                }
                self.route_scratch = routes;
            }
            // The batch's reads, then its replies into the transmit ring, in order; the
            // reads held back for merging stores go to them now, together.
            self.finish_staged(idx);
            self.submit_gathered_reads();
            if got < BATCH {
                return total;
            }
        }
        total
    }

    /// Hints the duplicate-write table's lines the writes among the first `got` frames of
    /// interface `idx` will look up, for the exports each is addressed to. The first frame's
    /// line is not hinted: nothing would come before it to hide it.
    fn prefetch_batch(&self, idx: usize, got: usize) {
        let iface = &self.ifaces[idx];
        for f in 1..got {
            // Reads (most frames of a read load) cost a look at two header bytes.
            if iface.meta(f).truncated || !dispatch::may_write(iface.frame(f)) {
                continue;
            }
            iface.each_route(f, |k| {
                // The hint inlined here (`prefetcht0`), not called through a pointer.
                if let Some(line) = self
                    .exports
                    .get(&iface.exports[k].id)
                    .and_then(|e| e.engine.dedup_line(iface.frame(f)))
                {
                    aoe_sys::prefetch(line);
                }
            });
        }
    }

    /// Queues changed state for the writer thread: the loop never waits on fsync. Looks at
    /// the exports frames went to since the last call ([`Daemon::touched`]), or at every
    /// export when `all` or [`Daemon::persist_all`] (a reload's inherited states, a
    /// reservation a shared store kept, the once-a-second tick, the stop). Until session 35
    /// every export was looked at each turn.
    fn persist_state(&mut self, all: bool) {
        let all = all || std::mem::take(&mut self.persist_all);
        // Taken and put back cleared: the list keeps its capacity, so that the loop
        // allocates nothing a turn.
        let mut touched = std::mem::take(&mut self.touched);
        for id in &touched {
            if let Some(rt) = self.exports.get_mut(id) {
                rt.listed_touched = false;
            }
        }
        if all {
            for rt in self.exports.values_mut() {
                save_if_changed(&self.state_writer, rt);
            }
        } else {
            for id in &touched {
                if let Some(rt) = self.exports.get_mut(id) {
                    save_if_changed(&self.state_writer, rt);
                }
            }
        }
        touched.clear();
        self.touched = touched;
    }

    /// Logs requests dropped since the last call, at most once per export per call (the
    /// loop calls it once a second): a flood is visible without a log line per frame.
    fn log_drops(&mut self) {
        for rt in self.exports.values_mut() {
            let st = rt.engine.stats();
            let now = (st.over_buffer_count, rt.pool_full_drops, st.over_fair_share);
            if now != rt.drops_logged {
                tracing::warn!(
                    buffer_count = rt.spec.buffer_count,
                    over_buffer_count = now.0 - rt.drops_logged.0,
                    over_fair_share = now.2 - rt.drops_logged.2,
                    queue_full = now.1 - rt.drops_logged.1,
                    total_over_buffer_count = now.0,
                    total_over_fair_share = now.2,
                    total_queue_full = now.1,
                    "{}: requests dropped (the initiator retransmits)",
                    rt.spec.addr()
                );
                rt.drops_logged = now;
            }
            // Replies the engine could not build: longer than the interface's frame. Each
            // is a request a peer chose to send, so a count a second, not a line a frame.
            if st.replies_too_long != rt.too_long_logged {
                tracing::warn!(
                    not_sent = st.replies_too_long - rt.too_long_logged,
                    total_not_sent = st.replies_too_long,
                    "{}: replies not sent: the reply does not fit the interface's frame (a \
                     config string, mask or reserve list longer than its MTU now carries)",
                    rt.spec.addr()
                );
                rt.too_long_logged = st.replies_too_long;
            }
        }
        for i in &mut self.ifaces {
            let now = (i.send_failures, i.backlog_drops);
            if now != i.drops_logged {
                tracing::warn!(
                    interface = %i.name,
                    send_failed = now.0 - i.drops_logged.0,
                    backlog_full = now.1 - i.drops_logged.1,
                    total_send_failed = now.0,
                    total_backlog_full = now.1,
                    "replies dropped (the initiator retransmits)"
                );
                i.drops_logged = now;
            }
        }
    }

    /// Warns of requests waiting on their store longer than [`STUCK_AFTER`] (an RBD
    /// cluster whose OSDs stopped answering, a hung disk or NFS mount under a file): one
    /// line per export every [`STUCK_REPEAT`] seconds while it lasts, and one when none is
    /// left waiting that long. Before it, a stuck store said nothing until a stop; the
    /// initiator only saw its requests time out. Called once a tick; the ages count in
    /// ticks, so are whole seconds, at most one over the true age.
    /// Warns while a reload's stores have been opening for [`STUCK_AFTER`] ticks or more,
    /// every [`STUCK_REPEAT`]: an `open(2)` that does not return (a hung NFS mount, a FUSE
    /// server that stopped answering) would otherwise leave the reload pending in silence,
    /// with every later SIGHUP queued behind it ([`Daemon::reload_again`]). The running
    /// exports keep serving meanwhile.
    fn log_slow_reload(&mut self) {
        let now = self.ticks;
        let Some(r) = &mut self.reloading else {
            return;
        };
        if r.taking_over.is_some() {
            // Its stores are open; the take-over wait logs on its own and is bounded.
            return;
        }
        let age = now.wrapping_sub(r.since);
        if age < STUCK_AFTER || r.warned.is_some_and(|w| now.wrapping_sub(w) < STUCK_REPEAT) {
            return;
        }
        let Some(path) = &r.path else {
            return;
        };
        tracing::warn!(
            config = %path.display(),
            "the reload is still opening its stores after {age} s (an open(2) or an RBD \
             connection that does not return); the running exports keep serving, and a \
             SIGHUP meanwhile waits for it"
        );
        r.warned = Some(now);
    }

    fn log_stuck(&mut self) {
        let now = self.ticks;
        for rt in self.exports.values_mut() {
            rt.tick = now;
            let (mut n, mut oldest) = (0u32, 0u32);
            if rt.engine.in_flight() > 0 {
                for t in rt.engine.in_flight_tokens() {
                    let Some(&(_, since)) = rt.token_iface.get(t.0 as usize) else {
                        continue;
                    };
                    let age = now.wrapping_sub(since);
                    oldest = oldest.max(age);
                    n += u32::from(age >= STUCK_AFTER);
                }
            }
            rt.oldest = oldest;
            match rt.stuck {
                Some((first, _, longest)) if n == 0 => {
                    tracing::warn!(
                        longest_secs = longest,
                        "{}: no request waits on the backend longer than {STUCK_AFTER} s any \
                         more (it was stuck for {} s, requests waited up to {longest} s)",
                        rt.spec.addr(),
                        now.wrapping_sub(first)
                    );
                    rt.stuck = None;
                }
                _ if n == 0 => {}
                Some((first, last, longest)) => {
                    let longest = longest.max(oldest);
                    let last = if now.wrapping_sub(last) >= STUCK_REPEAT {
                        stuck_line(rt, n, oldest);
                        now
                    } else {
                        last
                    };
                    rt.stuck = Some((first, last, longest));
                }
                None => {
                    stuck_line(rt, n, oldest);
                    rt.stuck = Some((now, now, oldest));
                }
            }
        }
    }

    /// Reads the link events queued ([`Daemon::links`]). True if any came (or some were
    /// lost to a full buffer): the caller looks at the interfaces now. Before session 34
    /// an interface created again, or given a new address or MTU, was found only by the
    /// next tick (up to a second).
    fn link_events(&mut self) -> bool {
        let Some(links) = &mut self.links else {
            return false;
        };
        match links.drain() {
            Ok((events, overrun)) => {
                tracing::debug!(?events, overrun, "link events");
                for e in events.iter().filter(|e| e.deleted) {
                    for i in &mut self.ifaces {
                        if i.sock.info().index == e.index {
                            i.unbound = true;
                        }
                    }
                }
                overrun || !events.is_empty()
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "link events (rtnetlink) failed: interface changes are found by the \
                     look every second"
                );
                self.links = None;
                false
            }
        }
    }

    /// The refresh tick's look at every interface (once a second, and at once on a link
    /// event, [`Daemon::link_events`]): an MTU change rebuilds
    /// the socket's buffers and is announced (below); a changed MAC address (`ip link set DEV address`) becomes the
    /// source of the replies, and the frames sent to it are taken, at once; an interface
    /// deleted and created again under its name (a veth pair re-made, a USB NIC plugged
    /// back, a bond re-created: a new index) gets a new socket. A packet socket is bound
    /// to an index, and the kernel unbinds it for good when that index goes
    /// (`packet_notifier`, `NETDEV_UNREGISTER`: `po->ifindex = -1`), so before session 33
    /// the export answered nothing there, for ever, while its log said only "Network is
    /// down" once; and after a MAC change it kept answering from the old address and
    /// dropped every request sent to the new one (`Engine::handle_frame` takes frames to
    /// its interface's MAC or to the broadcast address). In each case the exports announce
    /// themselves again, as at start, so initiators find the new address without waiting
    /// for their next discovery, and learn the new sector count of a lowered MTU (AoEr11
    /// 3.2, the Query Config answer's Sector Count; the driver's `aoecmd_cfg_rsp` takes the
    /// smaller of it and its own MTU's): before session 33 an MTU lowered on the target's
    /// side alone (9000 to 1500 under writes) left the initiator sending 8 KiB frames the
    /// link dropped until `deadsecs` put the device down.
    /// `cause` ("tick" or "link event") is said in the lines of what it found.
    fn refresh_interfaces(&mut self, cause: &'static str) {
        let mut rebuilt = false;
        for (idx, i) in self.ifaces.iter_mut().enumerate() {
            let refreshed = if i.unbound {
                Err(std::io::Error::other("unbound"))
            } else {
                i.sock.refresh_info().cloned()
            };
            let info = match refreshed {
                Ok(info) => info,
                Err(_) => match aoe_sys::interface_info(&i.name) {
                    // The bound index is gone; an interface of the name is there again.
                    Ok(new) => {
                        let frames = match &i.batch {
                            Batch::Ring(r) => r.rx_frames(),
                            Batch::Mmsg(_) => send::RING_FRAMES,
                        };
                        let old_index = i.sock.info().index;
                        match i.reopen(self.io, frames) {
                            Ok(()) => {
                                i.unbound = false;
                                tracing::warn!(
                                    interface = %i.name,
                                    old_index,
                                    new_index = new.index,
                                    mac = %MacAddr(i.sock.info().mac),
                                    found_by = cause,
                                    "interface deleted and created again: serving the new one"
                                );
                                rebuilt = true;
                                i.gone = false;
                                Self::interface_changed(&mut self.exports, &mut self.spare, idx, i);
                            }
                            Err(e) => tracing::error!(
                                interface = %i.name,
                                error = %e,
                                "interface created again, but no socket could be opened on \
                                 it: nothing is answered there; retried every second"
                            ),
                        }
                        continue;
                    }
                    Err(_) => {
                        if !i.gone {
                            i.gone = true;
                            tracing::warn!(
                                interface = %i.name,
                                "interface is gone: nothing is answered there until an \
                                 interface of that name exists again"
                            );
                        }
                        continue;
                    }
                },
            };
            let changed = info.mac != i.iface.mac.0 || info.mtu != i.iface.mtu;
            if info.mac != i.iface.mac.0 {
                tracing::warn!(
                    interface = %i.name,
                    old = %i.iface.mac,
                    new = %MacAddr(info.mac),
                    "MAC address changed: replies come from the new one"
                );
                i.iface.mac = MacAddr(info.mac);
            }
            if info.mtu != i.iface.mtu {
                tracing::info!(interface = %i.name, old = i.iface.mtu, new = info.mtu, "MTU changed");
                i.iface.mtu = info.mtu;
                i.frame_cap = send::frame_cap(info.mtu);
                let frames = match &i.batch {
                    Batch::Ring(r) => r.rx_frames(),
                    Batch::Mmsg(_) => send::RING_FRAMES,
                };
                i.rebuild(self.io, frames);
                rebuilt = true;
                for r in &i.exports {
                    if let Some(rt) = self.exports.get_mut(&r.id) {
                        warn_if_state_too_long(rt, &i.name, i.iface.mtu);
                    }
                }
            }
            if changed {
                Self::interface_changed(&mut self.exports, &mut self.spare, idx, i);
            }
        }
        if rebuilt {
            // A new socket starts with the kernel's default buffer sizes.
            self.size_socket_buffers();
        }
    }

    /// Tells the exports on interface `idx` its new address and MTU, and queues their
    /// announcements there (those with `announce`), as the start does.
    fn interface_changed(
        exports: &mut HashMap<u32, ExportRt, BuildHasherDefault<IdHasher>>,
        spare: &mut Vec<Vec<u8>>,
        idx: usize,
        i: &mut IfaceRt,
    ) {
        for r in i.exports.clone() {
            if let Some(rt) = exports.get_mut(&r.id) {
                rt.engine.set_interface(idx, i.iface);
                if rt.spec.announce && !rt.retiring {
                    for frame in rt.engine.announcements(idx) {
                        let n = frame.len();
                        i.queue(frame, n, spare);
                    }
                }
            }
        }
    }
}

/// Warns if the export's stored config string, Mac Mask List or reserve list (a state file,
/// a set before an MTU fell or before a smaller interface was added) makes its answer
/// longer than interface `name` of `mtu` carries: those answers cannot be sent there (for
/// the config string: the export is not discovered on it) until the list or string is
/// shortened. The engine refuses sets that would not fit (`Engine::config_capacity`,
/// `mask_capacity`, `reserve_capacity`, from the same per-MTU capacities used here).
fn warn_if_state_too_long(rt: &ExportRt, name: &str, mtu: u32) {
    use aoe_proto::target::{config_capacity_at, mask_capacity_at, reserve_capacity_at};
    let st = rt.engine.state();
    let too_long = [
        (
            "config string",
            st.config.len(),
            config_capacity_at(mtu),
            "bytes",
        ),
        (
            "Mac Mask List",
            st.mask.len(),
            mask_capacity_at(mtu),
            "entries",
        ),
        (
            "reserve list",
            st.reserve.len(),
            reserve_capacity_at(mtu),
            "entries",
        ),
    ];
    for (what, len, cap, unit) in too_long {
        if len > cap {
            tracing::warn!(
                interface = %name,
                mtu,
                "{}: its {what} of {len} {unit} is longer than an answer on {name} carries \
                 ({cap} {unit} at MTU {mtu}): those answers are not sent there{}",
                rt.spec.addr(),
                if what == "config string" {
                    " (the export is not discovered on it) until a shorter string is set"
                } else {
                    " until the list is shortened"
                }
            );
        }
    }
}

/// The warning of [`Daemon::log_stuck`]: `n` requests of `rt` waiting on the store longer
/// than [`STUCK_AFTER`], the oldest for `oldest` seconds.
fn stuck_line(rt: &ExportRt, n: u32, oldest: u32) {
    tracing::warn!(
        waiting = n,
        oldest_secs = oldest,
        in_flight = rt.engine.in_flight(),
        path = %rt.spec.path.display(),
        "{}: {n} requests waiting on the backend, the oldest for {oldest} s",
        rt.spec.addr()
    );
}

/// Queues an export's state for the writer thread if its engine says it changed.
fn save_if_changed(writer: &StateWriter, rt: &mut ExportRt) {
    if !rt.engine.take_state_changed() {
        return;
    }
    if let Some(f) = &rt.state_file {
        writer.save(f, rt.engine.state(), &rt.spec.allowed_macs);
    }
}
