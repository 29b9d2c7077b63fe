//! The event loop: sockets in, engines, worker pool, sockets out.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aoe_proto::target::{
    Engine, ExportConfig, Interface, IoFailure, IoKind, Outcome, PersistentState, Token,
    FIRMWARE_VERSION,
};
use aoe_store::{Backend, Done, FileBackend, Job, Op, OpenOptions, Pool};
use aoe_sys::{EventFd, PacketSocket, PollFd, RecvBatch};
use aoe_wire::{MacAddr, ATA_HEADER_LEN};

use crate::config::{ExportSpec, ServeConfig};
use crate::probe::{Duplicate, Probe};
use crate::state::{StateFile, StateWriter};

/// Frames taken from a socket per recvmmsg.
const BATCH: usize = 64;
/// How often interface MTUs are re-read.
const REFRESH: Duration = Duration::from_secs(1);
/// How long the loop keeps polling its sockets without sleeping after the last frame.
/// While an initiator keeps requests in flight the next ones are microseconds away, and
/// sleeping in poll() costs a wake-up on another core for every batch: initiator and target
/// then take turns instead of working at once.
const SPIN: Duration = Duration::from_micros(100);
/// Jobs the worker pool queues at most, over all exports. Each export already keeps at
/// most its buffer count in flight per interface ([`aoe_proto::target::DropReason::OverBufferCount`]);
/// this bounds the sum, so many exports or many interfaces cannot grow the queue (and the
/// frame buffers it holds) without limit either. A request refused here is dropped and
/// counted; the initiator retransmits.
const POOL_QUEUE: usize = 8192;
/// Replies an interface holds at most while its socket's send queue is full. The loop never
/// sleeps on a full queue: it keeps the replies here, asks poll() for POLLOUT and goes on
/// receiving and completing. A reply that finds the backlog full is dropped and counted;
/// the initiator retransmits the request (AoE has no other recovery, AoEr11 section 2).
const SEND_BACKLOG: usize = 4096;
/// The longest stretch spent spinning before the loop's other duties (signals, reloads,
/// state files, MTU refresh) get their turn.
const SPIN_MAX: Duration = Duration::from_millis(10);

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

struct IfaceRt {
    name: String,
    sock: PacketSocket,
    batch: RecvBatch,
    frame_cap: usize,
    iface: Interface,
    /// Exports served here (ids).
    exports: Vec<u32>,
    /// Replies waiting to be sent, oldest first: buffer and length. At most
    /// [`SEND_BACKLOG`].
    out: VecDeque<(Vec<u8>, usize)>,
    /// Replies the socket refused with an error other than a full queue.
    send_failures: u64,
    /// Replies dropped because the backlog was full.
    backlog_drops: u64,
    /// (send_failures, backlog_drops) last logged.
    drops_logged: (u64, u64),
}

impl IfaceRt {
    /// Queues a reply for sending, or drops it (counted) when the backlog is full; the
    /// buffer goes back to `spare` then.
    fn queue(&mut self, buf: Vec<u8>, n: usize, spare: &mut Vec<Vec<u8>>) {
        if self.out.len() >= SEND_BACKLOG {
            self.backlog_drops += 1;
            spare.push(buf);
        } else {
            self.out.push_back((buf, n));
        }
    }
}

struct ExportRt {
    spec: ExportSpec,
    engine: Engine,
    backend: Arc<dyn Backend>,
    state_file: Option<StateFile>,
    /// The interface each in-flight token answers on.
    token_iface: Vec<usize>,
    /// No longer configured: takes no new frames, goes away once its I/O has drained.
    retiring: bool,
    /// Requests dropped because the worker queue was full.
    pool_full_drops: u64,
    /// Drop counts last logged: (over the buffer count, worker queue full).
    drops_logged: (u64, u64),
}

/// A running target.
pub struct Daemon {
    config_path: Option<PathBuf>,
    config: ServeConfig,
    ifaces: Vec<IfaceRt>,
    exports: HashMap<u32, ExportRt>,
    next_export_id: u32,
    pool: Pool,
    event: Arc<EventFd>,
    spare: Vec<Vec<u8>>,
    hostname: String,
    /// Saves state files off the event loop.
    state_writer: StateWriter,
}

impl Daemon {
    /// Opens every export and interface of `config`; refuses, naming the problem, an export
    /// that cannot be opened or an interface that does not exist. `config_path` is re-read
    /// on reload.
    pub fn new(config: ServeConfig, config_path: Option<PathBuf>) -> Result<Daemon> {
        config.check_static()?;
        let event = Arc::new(EventFd::new().context("cannot create eventfd")?);
        let ev = event.clone();
        let pool = Pool::new(
            config.workers,
            POOL_QUEUE,
            Arc::new(move || {
                let _ = ev.notify();
            }),
        )
        .context("cannot start I/O workers")?;
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let mut d = Daemon {
            config_path,
            config: ServeConfig::default(),
            ifaces: Vec::new(),
            exports: HashMap::new(),
            next_export_id: 0,
            pool,
            event,
            spare: Vec::new(),
            hostname,
            state_writer: StateWriter::new().context("cannot start the state writer")?,
        };
        d.apply(config)?;
        Ok(d)
    }

    /// Exports currently served: (address, interface names, sectors).
    pub fn exports(&self) -> Vec<(aoe_wire::TargetAddr, Vec<String>, u64)> {
        let mut v: Vec<_> = self
            .exports
            .values()
            .filter(|e| !e.retiring)
            .map(|e| {
                (
                    e.spec.addr(),
                    e.spec.interfaces.clone(),
                    e.engine.config().sectors,
                )
            })
            .collect();
        v.sort();
        v
    }

    fn iface_index(&mut self, name: &str) -> Result<usize> {
        if let Some(i) = self.ifaces.iter().position(|i| i.name == name) {
            return Ok(i);
        }
        let sock = PacketSocket::open(name)
            .with_context(|| format!("cannot open AoE socket on interface {name}"))?;
        let info = sock.info().clone();
        let frame_cap = aoe_sys::frame_capacity(info.mtu).max(aoe_wire::MIN_FRAME_LEN);
        // Best effort: a faster send path, as the memory-only responder measured.
        let _ = sock.set_qdisc_bypass(true);
        self.ifaces.push(IfaceRt {
            name: name.to_string(),
            batch: RecvBatch::new(BATCH, frame_cap),
            frame_cap,
            iface: Interface {
                mac: MacAddr(info.mac),
                mtu: info.mtu,
            },
            sock,
            exports: Vec::new(),
            out: VecDeque::new(),
            send_failures: 0,
            backlog_drops: 0,
            drops_logged: (0, 0),
        });
        Ok(self.ifaces.len() - 1)
    }

    /// Brings the running set of exports in line with `config`: unchanged exports keep
    /// running untouched, changed and removed ones retire (after their in-flight I/O), new
    /// ones start. Everything new is opened before anything changes, so a bad config leaves
    /// the running one as it was.
    fn apply(&mut self, config: ServeConfig) -> Result<()> {
        config.check_static()?;
        for e in &config.exports {
            for i in &e.interfaces {
                aoe_sys::interface_info(i)
                    .with_context(|| format!("e{}.{}: no such interface {i}", e.shelf, e.slot))?;
            }
        }
        let keep: Vec<u32> = self
            .exports
            .iter()
            .filter(|(_, rt)| !rt.retiring && config.exports.contains(&rt.spec))
            .map(|(id, _)| *id)
            .collect();
        let mut new_rts = Vec::new();
        for spec in &config.exports {
            if keep.iter().any(|id| self.exports[id].spec == *spec) {
                continue;
            }
            new_rts.push(self.open_export(spec, &config)?);
        }
        // The serving sockets open first, so requests that arrive during the probe wait in
        // them and are answered once it is over, instead of being lost.
        let names: Vec<String> = new_rts
            .iter()
            .flat_map(|rt| rt.spec.interfaces.clone())
            .collect();
        for name in names {
            self.iface_index(&name)?;
        }
        // Ask the segments before announcing anything new: a second target with one of our
        // addresses makes initiators mix two disks.
        let new_specs: Vec<&ExportSpec> = new_rts.iter().map(|rt| &rt.spec).collect();
        let dups = self.probe(&new_specs, &config)?;
        if !dups.is_empty() {
            let what = dups
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            if !config.allow_duplicate {
                bail!(
                    "{what}: refusing to serve it (allow_duplicate = true or \
                     --allow-duplicate serves it anyway)"
                );
            }
            tracing::warn!("{what}: serving it anyway (allow_duplicate)");
        }
        // Commit.
        for (id, rt) in self.exports.iter_mut() {
            if !keep.contains(id) && !rt.retiring {
                tracing::info!(export = %rt.spec.addr(), "export removed or changed; retiring");
                rt.retiring = true;
            }
        }
        for i in &mut self.ifaces {
            i.exports.retain(|id| keep.contains(id));
        }
        for mut rt in new_rts {
            let id = self.next_export_id;
            self.next_export_id += 1;
            for name in rt.spec.interfaces.clone() {
                let idx = self.iface_index(&name)?;
                rt.engine.set_interface(idx, self.ifaces[idx].iface);
                self.ifaces[idx].exports.push(id);
                let info = self.ifaces[idx].iface;
                tracing::info!(
                    export = %rt.spec.addr(),
                    path = %rt.spec.path.display(),
                    sectors = rt.engine.config().sectors,
                    interface = %name,
                    mac = %info.mac,
                    mtu = info.mtu,
                    "exporting"
                );
                if rt.spec.announce {
                    for frame in rt.engine.announcements(idx) {
                        let n = frame.len();
                        self.ifaces[idx].queue(frame, n, &mut self.spare);
                    }
                }
            }
            self.exports.insert(id, rt);
        }
        self.size_socket_buffers();
        self.config = config;
        self.flush_sends();
        Ok(())
    }

    /// Runs the duplicate probe for `new`; running exports keep being served while it waits
    /// (on a reload), new interfaces keep their frames queued until the probe is over.
    fn probe(&mut self, new: &[&ExportSpec], config: &ServeConfig) -> Result<Vec<Duplicate>> {
        let Some(mut p) = Probe::start(new, &config.exports, config.probe)? else {
            return Ok(Vec::new());
        };
        let addrs: Vec<String> = new.iter().map(|e| e.addr().to_string()).collect();
        tracing::info!(
            exports = %addrs.join(","),
            wait_ms = config.probe.as_millis() as u64,
            "probing the segment for duplicate addresses"
        );
        loop {
            p.collect()?;
            let now = Instant::now();
            if now >= p.deadline() {
                return Ok(p.finish());
            }
            let serving: Vec<usize> = (0..self.ifaces.len())
                .filter(|&i| !self.ifaces[i].exports.is_empty())
                .collect();
            let mut fds = p.fds();
            fds.extend(serving.iter().map(|&i| {
                let iface = &self.ifaces[i];
                PollFd::with_events(iface.sock.as_raw_fd(), true, !iface.out.is_empty())
            }));
            fds.push(PollFd::new(self.event.as_raw_fd()));
            aoe_sys::poll(&mut fds, Some(p.deadline() - now)).context("poll")?;
            let _ = self.event.drain();
            for i in serving {
                self.receive(i);
            }
            self.complete_io();
            self.flush_sends();
        }
    }

    fn open_export(&self, spec: &ExportSpec, config: &ServeConfig) -> Result<ExportRt> {
        let backend = FileBackend::open(
            &spec.path,
            &OpenOptions {
                read_only: spec.read_only,
                direct: spec.direct_io,
                sync: spec.sync,
                offset_sectors: spec.offset,
                length_sectors: spec.length,
            },
        )
        .with_context(|| format!("{}", spec.addr()))?;
        let sectors = backend.sectors();
        let state_file = config
            .state_dir
            .as_ref()
            .map(|d| StateFile::new(d, spec.addr()));
        let state = match &state_file {
            Some(f) => f
                .load(&spec.allowed_macs)
                .with_context(|| format!("{}: cannot load state", spec.addr()))?,
            None => PersistentState {
                mask: spec.allowed_macs.clone(),
                ..Default::default()
            },
        };
        let serial = format!("{}.{}:{}", spec.shelf, spec.slot, self.hostname);
        let engine = Engine::new(
            ExportConfig {
                addr: spec.addr(),
                sectors,
                read_only: spec.read_only,
                buffer_count: spec.buffer_count,
                firmware_version: FIRMWARE_VERSION,
                max_sectors: 255,
                model: "aoe-rs target".into(),
                serial,
                firmware: env!("CARGO_PKG_VERSION").into(),
            },
            state,
        );
        Ok(ExportRt {
            spec: spec.clone(),
            engine,
            backend: Arc::new(backend),
            state_file,
            token_iface: Vec::new(),
            retiring: false,
            pool_full_drops: 0,
            drops_logged: (0, 0),
        })
    }

    /// Sizes each socket's receive buffer so the advertised buffer counts are honest: every
    /// export's window of full frames fits, with room for the kernel's per-frame overhead.
    fn size_socket_buffers(&mut self) {
        for i in &self.ifaces {
            let frames: usize = i
                .exports
                .iter()
                .filter_map(|id| self.exports.get(id))
                .map(|e| e.spec.buffer_count as usize)
                .sum();
            let per_frame = i.frame_cap + 1024;
            let want = (frames * per_frame * 2).max(4 << 20);
            if let Err(e) = i.sock.set_recv_buffer(want) {
                tracing::warn!(interface = %i.name, error = %e, "cannot size receive buffer");
            }
            let _ = i.sock.set_send_buffer(want);
        }
    }

    /// Runs until `control` says stop; then waits for in-flight I/O and returns.
    pub fn run(&mut self, control: &Control) -> Result<()> {
        let mut last_refresh = Instant::now();
        loop {
            if control.stop.load(Ordering::SeqCst) {
                break;
            }
            if control.reload.swap(false, Ordering::SeqCst) {
                self.reload();
            }
            // POLLOUT only where replies wait: a socket with room is always writable.
            let mut fds: Vec<PollFd> = self
                .ifaces
                .iter()
                .map(|i| PollFd::with_events(i.sock.as_raw_fd(), true, !i.out.is_empty()))
                .collect();
            fds.push(PollFd::new(self.event.as_raw_fd()));
            fds.push(PollFd::new(control.wake_rx.as_raw_fd()));
            aoe_sys::poll(&mut fds, Some(REFRESH)).context("poll")?;
            let n = self.ifaces.len();
            if fds[n + 1].ready {
                control.drain();
            }
            if fds[n].ready {
                let _ = self.event.drain();
            }
            self.complete_io();
            let mut frames = 0;
            for (idx, fd) in fds.iter().enumerate().take(n) {
                if fd.ready {
                    frames += self.receive(idx);
                }
            }
            self.complete_io();
            self.flush_sends();
            if frames > 0 {
                self.spin(control);
            }
            self.persist_state();
            if last_refresh.elapsed() >= REFRESH {
                last_refresh = Instant::now();
                self.refresh_interfaces();
                self.log_drops();
                self.exports
                    .retain(|_, e| !(e.retiring && e.engine.in_flight() == 0));
            }
        }
        self.drain_io(Duration::from_secs(30));
        self.drain_sends(Duration::from_secs(1));
        self.persist_state();
        if !self.state_writer.wait_idle(Duration::from_secs(30)) {
            tracing::error!("state files still being written after 30 s; exiting anyway");
        }
        self.log_drops();
        tracing::info!("stopped");
        Ok(())
    }

    fn reload(&mut self) {
        let Some(path) = self.config_path.clone() else {
            tracing::warn!("SIGHUP ignored: not started with --config");
            return;
        };
        match ServeConfig::load(&path).map_err(anyhow::Error::from) {
            Ok(cfg) => match self.apply(cfg) {
                Ok(()) => tracing::info!(config = %path.display(), "configuration reloaded"),
                Err(e) => {
                    tracing::error!("reload refused, keeping the running configuration: {e:#}")
                }
            },
            Err(e) => tracing::error!("reload refused, keeping the running configuration: {e:#}"),
        }
    }

    fn take_buffer(&mut self, cap: usize) -> Vec<u8> {
        match self.spare.pop() {
            Some(mut b) => {
                if b.len() < cap {
                    b.resize(cap, 0);
                }
                b
            }
            None => vec![0u8; cap],
        }
    }

    /// Serves frames as they come, without sleeping, until none came for [`SPIN`] (or for
    /// at most [`SPIN_MAX`], or until a stop or reload is asked for).
    fn spin(&mut self, control: &Control) {
        let start = Instant::now();
        let mut last = start;
        while last.elapsed() < SPIN
            && start.elapsed() < SPIN_MAX
            && !control.stop.load(Ordering::Relaxed)
            && !control.reload.load(Ordering::Relaxed)
        {
            let mut frames = 0;
            for idx in 0..self.ifaces.len() {
                frames += self.receive(idx);
            }
            // Worker completions are answered here too, not only after the spin.
            self.complete_io();
            self.flush_sends();
            if frames > 0 {
                last = Instant::now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Takes every frame waiting on interface `idx` to its exports; returns how many.
    fn receive(&mut self, idx: usize) -> usize {
        let mut total = 0;
        loop {
            let got = {
                let i = &mut self.ifaces[idx];
                match i.sock.recv_batch(&mut i.batch) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(interface = %i.name, error = %e, "receive failed");
                        0
                    }
                }
            };
            if got == 0 {
                return total;
            }
            total += got;
            for f in 0..got {
                if self.ifaces[idx].batch.meta(f).truncated {
                    tracing::debug!(interface = %self.ifaces[idx].name, "oversized frame dropped");
                    continue;
                }
                let ids = self.ifaces[idx].exports.clone();
                for id in ids {
                    self.dispatch(idx, f, id);
                }
            }
            if got < BATCH {
                return total;
            }
        }
    }

    fn dispatch(&mut self, idx: usize, f: usize, id: u32) {
        let cap = self.ifaces[idx].frame_cap;
        let mut reply = self.take_buffer(cap);
        let Some(rt) = self.exports.get_mut(&id) else {
            self.spare.push(reply);
            return;
        };
        let frame = self.ifaces[idx].batch.frame(f);
        match rt.engine.handle_frame(idx, frame, &mut reply[..cap]) {
            Outcome::Reply(n) => self.ifaces[idx].queue(reply, n, &mut self.spare),
            Outcome::Drop(reason) => {
                tracing::trace!(export = %rt.spec.addr(), %reason, "frame dropped");
                self.spare.push(reply);
            }
            Outcome::Io(req) => {
                // Fast path: data in the page cache is read (and a write that need not wait is
                // written) right here with RWF_NOWAIT; only I/O that would block goes to a
                // worker. Either way the event loop never waits on the disk.
                let inline = match &req.kind {
                    IoKind::Read { offset, len } => rt
                        .backend
                        .try_read_at(&mut reply[ATA_HEADER_LEN..ATA_HEADER_LEN + len], *offset),
                    IoKind::Write { offset, data } => {
                        rt.backend.try_write_at(&frame[data.clone()], *offset)
                    }
                    IoKind::Flush => Ok(false),
                };
                let result = match inline {
                    Ok(false) => None,
                    Ok(true) => Some(Ok(())),
                    Err(e) => {
                        tracing::warn!(export = %rt.spec.addr(), error = %e, "I/O failed");
                        Some(Err(io_failure(&e)))
                    }
                };
                if let Some(result) = result {
                    match rt.engine.complete(req.token, result, &mut reply) {
                        Some(n) => self.ifaces[idx].queue(reply, n, &mut self.spare),
                        None => self.spare.push(reply),
                    }
                    return;
                }
                let t = req.token.0 as usize;
                if rt.token_iface.len() <= t {
                    rt.token_iface.resize(t + 1, 0);
                }
                rt.token_iface[t] = idx;
                let op = match req.kind {
                    IoKind::Read { offset, len } => Op::Read {
                        offset,
                        at: ATA_HEADER_LEN..ATA_HEADER_LEN + len,
                    },
                    IoKind::Write { offset, data } => {
                        // The receive batch is reused: the write data travels in the reply
                        // buffer, whose header the completion then overwrites.
                        reply[..frame.len()].copy_from_slice(frame);
                        Op::Write { offset, from: data }
                    }
                    IoKind::Flush => Op::Flush,
                };
                let job = Job {
                    backend: rt.backend.clone(),
                    op,
                    user: (u64::from(id) << 32) | u64::from(req.token.0),
                    buf: reply,
                };
                if let Err(job) = self.pool.try_submit(job) {
                    rt.engine.abort(req.token);
                    self.spare.push(job.buf);
                    rt.pool_full_drops += 1;
                }
            }
        }
    }

    fn complete_io(&mut self) {
        while let Some(done) = self.pool.try_done() {
            self.finish(done);
        }
    }

    /// Turns a finished job into a reply queued on the interface its request came from.
    fn finish(&mut self, done: Done) {
        let id = (done.user >> 32) as u32;
        let token = Token(done.user as u32);
        let mut buf = done.buf;
        let Some(rt) = self.exports.get_mut(&id) else {
            self.spare.push(buf);
            return;
        };
        let result = done.result.map_err(|e| {
            tracing::warn!(export = %rt.spec.addr(), error = %e, "I/O failed");
            io_failure(&e)
        });
        let idx = rt.token_iface.get(token.0 as usize).copied().unwrap_or(0);
        match rt.engine.complete(token, result, &mut buf) {
            Some(n) if idx < self.ifaces.len() => self.ifaces[idx].queue(buf, n, &mut self.spare),
            _ => self.spare.push(buf),
        }
    }

    /// Sends what the interfaces' backlogs hold, as far as their sockets take it, without
    /// waiting: a full send queue leaves the rest for the next turn, when poll() reports
    /// the socket writable (POLLOUT) again.
    fn flush_sends(&mut self) {
        for i in &mut self.ifaces {
            while !i.out.is_empty() {
                let frames: Vec<&[u8]> = i.out.iter().take(BATCH).map(|(b, n)| &b[..*n]).collect();
                let sent = match i.sock.send_batch(&frames) {
                    Ok(0) => break,
                    Ok(k) => k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // Skip the frame that failed; the initiator retransmits. Counted and
                        // logged once a second by log_drops.
                        tracing::debug!(interface = %i.name, error = %e, "send failed");
                        i.send_failures += 1;
                        1
                    }
                };
                for _ in 0..sent {
                    if let Some((b, _)) = i.out.pop_front() {
                        self.spare.push(b);
                    }
                }
            }
        }
        // Keep a bounded cache of buffers.
        self.spare.truncate(1024);
    }

    /// At stop: sends what is left, waiting for POLLOUT up to `limit`.
    fn drain_sends(&mut self, limit: Duration) {
        let start = Instant::now();
        self.flush_sends();
        while self.ifaces.iter().any(|i| !i.out.is_empty()) {
            let Some(left) = limit.checked_sub(start.elapsed()) else {
                let n: usize = self.ifaces.iter().map(|i| i.out.len()).sum();
                tracing::warn!(
                    replies = n,
                    "send queues still full at exit; replies dropped"
                );
                return;
            };
            let mut fds: Vec<PollFd> = self
                .ifaces
                .iter()
                .filter(|i| !i.out.is_empty())
                .map(|i| PollFd::with_events(i.sock.as_raw_fd(), false, true))
                .collect();
            let _ = aoe_sys::poll(&mut fds, Some(left));
            self.flush_sends();
        }
    }

    /// Queues changed state for the writer thread: the loop never waits on fsync.
    fn persist_state(&mut self) {
        for rt in self.exports.values_mut() {
            if !rt.engine.take_state_changed() {
                continue;
            }
            if let Some(f) = &rt.state_file {
                self.state_writer
                    .save(f, rt.engine.state(), &rt.spec.allowed_macs);
            }
        }
    }

    /// Logs requests dropped since the last call, at most once per export per call (the
    /// loop calls it once a second): a flood is visible without a log line per frame.
    fn log_drops(&mut self) {
        for rt in self.exports.values_mut() {
            let now = (rt.engine.stats().over_buffer_count, rt.pool_full_drops);
            if now != rt.drops_logged {
                tracing::warn!(
                    export = %rt.spec.addr(),
                    buffer_count = rt.spec.buffer_count,
                    over_buffer_count = now.0 - rt.drops_logged.0,
                    queue_full = now.1 - rt.drops_logged.1,
                    total_over_buffer_count = now.0,
                    total_queue_full = now.1,
                    "requests dropped (the initiator retransmits)"
                );
                rt.drops_logged = now;
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

    fn refresh_interfaces(&mut self) {
        for (idx, i) in self.ifaces.iter_mut().enumerate() {
            let Ok(info) = i.sock.refresh_info() else {
                continue;
            };
            if info.mtu != i.iface.mtu {
                tracing::info!(interface = %i.name, old = i.iface.mtu, new = info.mtu, "MTU changed");
                i.iface.mtu = info.mtu;
                i.frame_cap = aoe_sys::frame_capacity(info.mtu).max(aoe_wire::MIN_FRAME_LEN);
                i.batch = RecvBatch::new(BATCH, i.frame_cap);
                for id in &i.exports {
                    if let Some(rt) = self.exports.get_mut(id) {
                        rt.engine.set_interface(idx, i.iface);
                    }
                }
            }
        }
    }

    fn drain_io(&mut self, limit: Duration) {
        let start = Instant::now();
        while self.exports.values().any(|e| e.engine.in_flight() > 0) {
            if start.elapsed() > limit {
                tracing::error!("I/O still in flight after {limit:?}; exiting anyway");
                return;
            }
            if let Some(done) = self.pool.wait_done(Duration::from_millis(100)) {
                self.finish(done);
                self.complete_io();
                self.flush_sends();
            }
        }
    }
}

/// How an I/O error shows in the ATA reply: EIO and a short read are medium errors (UNC),
/// everything else aborts the command.
fn io_failure(e: &io::Error) -> IoFailure {
    const EIO: i32 = 5;
    if e.raw_os_error() == Some(EIO) || e.kind() == io::ErrorKind::UnexpectedEof {
        IoFailure::Medium
    } else {
        IoFailure::Aborted
    }
}

/// Checks a config fully, as `aoe serve` does at start, without serving: files open with
/// the right sizes and interfaces exist.
pub fn validate(config: &ServeConfig) -> Result<()> {
    config.check_static()?;
    for e in &config.exports {
        for i in &e.interfaces {
            if aoe_sys::interface_info(i).is_err() {
                bail!("e{}.{}: no such interface {i}", e.shelf, e.slot);
            }
        }
        FileBackend::open(
            &e.path,
            &OpenOptions {
                read_only: e.read_only,
                direct: e.direct_io,
                sync: e.sync,
                offset_sectors: e.offset,
                length_sectors: e.length,
            },
        )
        .with_context(|| format!("{}", e.addr()))?;
    }
    Ok(())
}
