//! The NBD front-end: every device that is up is served as an NBD export named `eX.Y`, and
//! each partition found on it as `eX.YpN`, over a Unix socket and/or TCP, so qemu,
//! nbd-client and the libnbd tools (nbdinfo, nbdcopy) can use AoE disks.
//!
//! ```text
//!  client ──► reader thread: handshake ([`proto::Handshake`]), then per request:
//!             parse + check ([`proto::Session::check`]) ──► net::Handle::io ──► AoE window
//!                                                                                   │
//!  client ◄── writer thread ◄── channel ◄── reply made in the completion ◄──────────┘
//! ```
//! One reader and one writer thread per connection: the reader submits each request as
//! it arrives (up to [`MAX_INFLIGHT`] requests / [`MAX_INFLIGHT_BYTES`] bytes in flight),
//! completions make a reply header on the network thread. A read's reply goes out from
//! there, its data straight from the slots of the receive ring the answers arrived in
//! (`sendmsg(2)` with one iovec per frame's payload, [`BlockDevice::read_held`]), when the
//! socket takes it; what it does not take, and every reply while the writer is busy, is
//! queued for the writer, which sends what has queued up with one `writev(2)`. Replies go
//! out in completion order, not request order (NBD allows that: the cookie matches them
//! up).
//!
//! The protocol itself (handshake, options, requests, replies) is sans-I/O in [`proto`];
//! byte-granular reads and writes over 512-byte sectors go through the initiator's
//! block-device handle, [`aoe_initiator::blockdev::BlockDevice`].
//!
//! A device that goes down fails the requests in flight on it with EIO (after the
//! engine's `deadsecs`), new requests fail at once, and it disappears from `NBD_OPT_LIST`
//! and `NBD_OPT_GO`; when it comes back, existing connections work again and it is listed
//! again. A misbehaving client only ever loses its own connection.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod proto;

use std::io::{self, BufRead, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{Context, Result};
use aoe_proto::initiator::DeviceState;
use aoe_wire::TargetAddr;
use nix::sys::socket::MsgFlags;

use aoe_initiator::blockdev::BlockDevice;
use aoe_initiator::net::{lock, Handle, Shared};
use proto::{
    BlockSizes, Command, Export, Exports, Handshake, OptionHeader, Request, Session, Step,
};

/// Requests in flight per connection before the reader waits for completions.
pub const MAX_INFLIGHT: usize = 128;
/// Payload bytes in flight per connection before the reader waits.
pub const MAX_INFLIGHT_BYTES: u64 = 128 << 20;
/// Payload bytes in flight over all connections before a connection's reader waits
/// ([`Budget`]): four connections' worth (nbdcopy opens four by default). A connection with
/// nothing in flight may always take one request, so none starves; with at most
/// [`MAX_CONNECTIONS`] connections the initiator's NBD memory is bounded (session 17's
/// audit: four clients that never read their replies held 553 MB, N clients N times that).
pub const MAX_TOTAL_INFLIGHT_BYTES: u64 = 4 * MAX_INFLIGHT_BYTES;
/// Open NBD connections over both listeners; one more is closed at once, with a warning.
pub const MAX_CONNECTIONS: usize = 64;

/// Connections open now ([`MAX_CONNECTIONS`]).
static CONNECTIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Where to listen.
#[derive(Debug, Clone, Default)]
pub struct NbdOptions {
    /// A Unix socket path (a stale socket there is replaced).
    pub unix: Option<PathBuf>,
    /// A TCP address (the CLI refuses non-loopback addresses unless told otherwise).
    pub tcp: Option<SocketAddr>,
}

/// The running listeners; [`Server::stop`] removes the Unix socket.
pub struct Server {
    unix: Option<PathBuf>,
}

impl Server {
    /// Stops accepting (by removing the Unix socket path; the accept threads end with the
    /// process).
    pub fn stop(self) {
        if let Some(p) = self.unix {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The exports: devices that are up, and their partitions.
#[derive(Clone)]
struct Devices(Arc<Mutex<Shared>>);

impl Devices {
    /// The device and first sector behind export `name`.
    fn resolve(&self, name: &str) -> Option<(TargetAddr, u64)> {
        let s = lock(&self.0);
        for (a, e) in &s.devices {
            if e.info.state != DeviceState::Up {
                continue;
            }
            let base = a.to_string();
            if name == base {
                return Some((*a, 0));
            }
            for p in &e.partitions {
                if name == format!("{base}p{}", p.number) {
                    return Some((*a, p.start));
                }
            }
        }
        None
    }
}

impl Exports for Devices {
    fn list(&self) -> Vec<Export> {
        let s = lock(&self.0);
        let mut v = Vec::new();
        for (a, e) in &s.devices {
            if e.info.state != DeviceState::Up || e.info.sectors == 0 {
                continue;
            }
            let block = BlockSizes::for_payload(e.info.payload);
            let model = e
                .info
                .identify
                .as_ref()
                .map(|i| format!(" {}", i.model.trim()))
                .unwrap_or_default();
            v.push(Export {
                name: a.to_string(),
                size: e.info.sectors * 512,
                description: format!("AoE {a}{model}"),
                block,
            });
            for p in &e.partitions {
                v.push(Export {
                    name: format!("{a}p{}", p.number),
                    size: p.sectors * 512,
                    description: format!("AoE {a} partition {}", p.number),
                    block,
                });
            }
        }
        v
    }
}

/// A connected client socket of either kind.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::Unix(s) => s.as_fd(),
            Conn::Tcp(s) => s.as_fd(),
        }
    }
    fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(b),
            Conn::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(b),
            Conn::Tcp(s) => s.write(b),
        }
    }
    fn write_vectored(&mut self, b: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write_vectored(b),
            Conn::Tcp(s) => s.write_vectored(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// Starts the listeners named in `opts`, serving the devices in `shared` through `net`.
pub fn start(opts: &NbdOptions, shared: Arc<Mutex<Shared>>, net: Handle) -> Result<Server> {
    let devices = Devices(shared);
    if let Some(path) = &opts.unix {
        remove_stale_socket(path)?;
        let l = UnixListener::bind(path)
            .with_context(|| format!("--nbd: cannot listen on {}", path.display()))?;
        let (d, n) = (devices.clone(), net.clone());
        std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || {
                for c in l.incoming() {
                    match c {
                        Ok(s) => spawn_conn(Conn::Unix(s), "unix".into(), d.clone(), n.clone()),
                        Err(e) => tracing::warn!(error = %e, "nbd: accept failed"),
                    }
                }
            })
            .context("cannot start the NBD listener thread")?;
        tracing::info!(socket = %path.display(), "NBD server listening");
    }
    if let Some(addr) = opts.tcp {
        let l = TcpListener::bind(addr)
            .with_context(|| format!("--nbd-tcp: cannot listen on {addr}"))?;
        let (d, n) = (devices.clone(), net.clone());
        std::thread::Builder::new()
            .name("nbd-accept-tcp".into())
            .spawn(move || {
                for c in l.incoming() {
                    match c {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            let peer = s
                                .peer_addr()
                                .map(|a| a.to_string())
                                .unwrap_or_else(|_| "tcp".into());
                            spawn_conn(Conn::Tcp(s), peer, d.clone(), n.clone())
                        }
                        Err(e) => tracing::warn!(error = %e, "nbd: accept failed"),
                    }
                }
            })
            .context("cannot start the NBD TCP listener thread")?;
        tracing::info!(%addr, "NBD server listening on TCP");
    }
    Ok(Server {
        unix: opts.unix.clone(),
    })
}

/// Removes a leftover socket at `path` (from a daemon that died: nothing accepts on it);
/// refuses to take the socket of a server that still listens there (another `aoe
/// initiator` on another ROOT, say), or anything that is not a socket.
fn remove_stale_socket(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() && UnixStream::connect(path).is_ok() => {
            anyhow::bail!(
                "--nbd: {} is in use by a running server (another aoe initiator?); stop it or \
                 pick another path",
                path.display()
            )
        }
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("--nbd: cannot remove stale socket {}", path.display())),
        Ok(_) => anyhow::bail!(
            "--nbd: {} exists and is not a socket; remove it or pick another path",
            path.display()
        ),
        Err(_) => Ok(()),
    }
}

fn spawn_conn(c: Conn, peer: String, devices: Devices, net: Handle) {
    use std::sync::atomic::Ordering;
    if CONNECTIONS.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
        CONNECTIONS.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(%peer, "nbd: {MAX_CONNECTIONS} connections open already; this one is closed");
        c.shutdown();
        return;
    }
    /// Counts the connection out when its thread ends (or is never started).
    struct Counted;
    impl Drop for Counted {
        fn drop(&mut self) {
            CONNECTIONS.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let counted = Counted;
    let r = std::thread::Builder::new()
        .name("nbd-conn".into())
        .spawn(move || {
            let _counted = counted;
            let shut = c.try_clone();
            match serve(c, &peer, &devices, &net) {
                Ok(()) => tracing::debug!(%peer, "nbd: connection closed"),
                Err(e) => tracing::info!(%peer, error = %e, "nbd: connection dropped"),
            }
            if let Ok(s) = shut {
                s.shutdown();
            }
        });
    if let Err(e) = r {
        tracing::warn!(error = %e, "nbd: cannot start a connection thread");
    }
}

/// Serves one connection: handshake, then transmission.
fn serve(c: Conn, peer: &str, devices: &Devices, net: &Handle) -> io::Result<()> {
    let mut w = c.try_clone()?;
    let mut r = BufReader::with_capacity(READ_BUF, c);
    let Some(session) = handshake(&mut r, &mut w, devices)? else {
        return Ok(());
    };
    let Some((dev, base)) = devices.resolve(&session.name) else {
        return Ok(());
    };
    tracing::info!(%peer, export = %session.name, structured = session.structured, "nbd: client connected");
    let _client = Client::count(&devices.0, &session.name);
    transmission(r, w, Arc::new(session), dev, base, net)
}

/// One client in transmission on an export, counted in [`Shared::nbd_clients`] while it
/// lives (so the daemon does not stop under it on SIGTERM, see [`aoe_initiator::in_use`]).
struct Client {
    shared: Arc<Mutex<Shared>>,
    export: String,
}

impl Client {
    fn count(shared: &Arc<Mutex<Shared>>, export: &str) -> Client {
        *lock(shared)
            .nbd_clients
            .entry(export.to_string())
            .or_insert(0) += 1;
        Client {
            shared: shared.clone(),
            export: export.to_string(),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let mut s = lock(&self.shared);
        if let Some(n) = s.nbd_clients.get_mut(&self.export) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.nbd_clients.remove(&self.export);
            }
        }
    }
}

fn proto_err(e: proto::ProtocolError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The fixed newstyle handshake; None when the client aborted or asked for an unknown
/// export with `NBD_OPT_EXPORT_NAME`.
fn handshake(
    r: &mut impl Read,
    w: &mut impl Write,
    devices: &Devices,
) -> io::Result<Option<Session>> {
    w.write_all(&proto::greeting())?;
    let mut hs = Handshake::new();
    let mut flags = [0u8; 4];
    r.read_exact(&mut flags)?;
    hs.client_flags(flags).map_err(proto_err)?;
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; OptionHeader::LEN];
        r.read_exact(&mut h)?;
        let h = OptionHeader::parse(&h).map_err(proto_err)?;
        out.clear();
        let step = if h.len > proto::MAX_OPTION_DATA {
            discard(r, u64::from(h.len))?;
            hs.too_big(h.option, &mut out)
        } else {
            let mut data = vec![0u8; h.len as usize];
            r.read_exact(&mut data)?;
            hs.option(h.option, &data, devices, &mut out)
        };
        w.write_all(&out)?;
        w.flush()?;
        match step {
            Step::Continue => {}
            Step::Close => return Ok(None),
            Step::Transmit(s) => return Ok(Some(s)),
        }
    }
}

fn discard(r: &mut impl Read, n: u64) -> io::Result<()> {
    let got = io::copy(&mut r.take(n), &mut io::sink())?;
    if got < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Payload bytes in flight over all connections, with a cap ([`MAX_TOTAL_INFLIGHT_BYTES`]).
struct Budget {
    limit: u64,
    state: Mutex<BudgetState>,
    cv: Condvar,
}

struct BudgetState {
    bytes: u64,
    /// Some reader waits on `cv` (as [`InflightState::waiting`]).
    waiting: bool,
}

/// The process's one [`Budget`].
static BUDGET: Budget = Budget::new(MAX_TOTAL_INFLIGHT_BYTES);

impl Budget {
    const fn new(limit: u64) -> Budget {
        Budget {
            limit,
            state: Mutex::new(BudgetState {
                bytes: 0,
                waiting: false,
            }),
            cv: Condvar::new(),
        }
    }
    /// Takes `bytes`, waiting while they would pass the limit, unless `alone()` (asked at
    /// each wake-up: the connection has nothing else in flight, so it may always make
    /// progress, even while other connections' stuck replies hold the budget).
    fn take(&self, bytes: u64, alone: impl Fn() -> bool) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.bytes + bytes > self.limit && !alone() {
            s.waiting = true;
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.bytes += bytes;
    }
    fn give(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.bytes -= bytes;
        if s.waiting {
            s.waiting = false;
            self.cv.notify_all();
        }
    }
}

/// Requests in flight on one connection, with a cap, and their bytes in the process's
/// [`Budget`].
struct Inflight {
    state: Mutex<InflightState>,
    cv: Condvar,
    budget: &'static Budget,
}

impl Default for Inflight {
    fn default() -> Inflight {
        Inflight::with_budget(&BUDGET)
    }
}

#[derive(Default)]
struct InflightState {
    requests: usize,
    bytes: u64,
    /// The connection's reader waits on `cv` (a release must wake it): a condition
    /// variable's notify is a system call even with nobody waiting, one per reply.
    waiting: bool,
}

impl Inflight {
    fn with_budget(budget: &'static Budget) -> Inflight {
        Inflight {
            state: Mutex::default(),
            cv: Condvar::new(),
            budget,
        }
    }
    /// Waits for room on this connection, then in the process's budget (the connection's
    /// lock is not held while it waits there: its completions keep releasing).
    fn acquire(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.requests > 0 && (s.requests >= MAX_INFLIGHT || s.bytes + bytes > MAX_INFLIGHT_BYTES)
        {
            s.waiting = true;
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.requests += 1;
        s.bytes += bytes;
        drop(s);
        // Lock order: the budget's, then the connection's (release never holds both).
        self.budget.take(bytes, || {
            self.state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .requests
                == 1
        });
    }
    /// Counts the request out of the connection first, then out of the budget, whose
    /// wake-up then finds the connection as it is now.
    fn release(&self, bytes: u64) {
        {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.requests -= 1;
            s.bytes -= bytes;
            if s.waiting {
                s.waiting = false;
                self.cv.notify_all();
            }
        }
        self.budget.give(bytes);
    }
    fn wait_idle(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.requests > 0 {
            s.waiting = true;
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Replies on their way to a connection's client. A reply without data (a write's, a
/// flush's, an error) is sent at once by the thread that completes it (the network
/// thread), with one non-blocking `send(2)`, when nothing is queued before it and the
/// writer thread is not writing; everything else (reads' data, what the socket did not
/// take) is queued for the writer thread. Handing a 16-byte write reply to the writer cost
/// a wake-up of that thread per request (futex calls and context switches: 2-3% of the
/// initiator's samples under nbdcopy writes); its copy into the socket is no more than the
/// queueing. A read's reply is sent the same way from the receive ring's slots
/// ([`Replies::push_pieces`]): the kernel's copy into the socket replaces the engine's copy
/// into a read buffer on the same thread (docs/PERFORMANCE.md, "NBD replies from the
/// receive ring").
///
/// A mutex-guarded queue and a condition variable rather than a channel: the writer takes
/// everything queued in one lock, and a completion wakes it only when it waits.
struct Replies {
    state: Mutex<RepliesState>,
    cv: Condvar,
    /// The connection's socket, for the replies sent at once.
    sock: Conn,
    inflight: Arc<Inflight>,
}

#[derive(Default)]
struct RepliesState {
    queue: Vec<Reply>,
    /// The writer is parked on `cv` (a push must wake it).
    waiting: bool,
    /// The writer is writing a batch it took: the socket is its until it is done.
    busy: bool,
    /// No more replies will come: the writer ends once the queue is empty.
    closed: bool,
}

impl Replies {
    fn new(sock: Conn, inflight: Arc<Inflight>) -> Replies {
        Replies {
            state: Mutex::default(),
            cv: Condvar::new(),
            sock,
            inflight,
        }
    }

    fn push(&self, mut r: Reply) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if r.data.is_empty() && s.queue.is_empty() && !s.busy {
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            // A failure other than a full buffer is the writer's to meet and report.
            if let Ok(n) = nix::sys::socket::send(self.sock.as_raw_fd(), &r.head, flags) {
                if n == r.head.len() {
                    drop(s);
                    self.inflight.release(r.held);
                    return;
                }
                // The rest goes first, by the writer: nothing else is queued.
                r.head.drain(..n);
            }
        }
        s.queue.push(r);
        if s.waiting {
            s.waiting = false;
            self.cv.notify_one();
        }
    }

    /// A read's reply, its data given as slices of the initiator's receive ring that are
    /// valid only during this call ([`BlockDevice::read_held`]). Sent at once from these
    /// slices with non-blocking `sendmsg(2)` calls when nothing is queued before it and the
    /// writer is not writing, so the bytes go from the ring into the socket with the
    /// kernel's one copy; whatever the socket does not take (full, or the writer busy) is
    /// copied and queued for the writer, since the slots go back to the kernel when this
    /// returns.
    fn push_pieces(&self, head: Vec<u8>, pieces: &[&[u8]], held: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let total = head.len() + pieces.iter().map(|p| p.len()).sum::<usize>();
        let mut sent = 0;
        if s.queue.is_empty() && !s.busy {
            sent = send_now(self.sock.as_raw_fd(), &head, pieces);
            if sent == total {
                drop(s);
                self.inflight.release(held);
                return;
            }
        }
        s.queue.push(Reply {
            head: Vec::new(),
            data: rest_after(&head, pieces, sent),
            held,
        });
        if s.waiting {
            s.waiting = false;
            self.cv.notify_one();
        }
    }

    fn close(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.closed = true;
        self.cv.notify_one();
    }

    /// Waits for replies and moves them all into `batch` (empty), the socket the writer's
    /// until [`Replies::written`]; false once closed and drained.
    fn take(&self, batch: &mut Vec<Reply>) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.busy = false;
        while s.queue.is_empty() {
            if s.closed {
                return false;
            }
            s.waiting = true;
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        std::mem::swap(&mut s.queue, batch);
        s.busy = true;
        true
    }
}

/// A reply for the writer thread: its header (or the whole reply), a read's data handed
/// over as the engine assembled it, and the in-flight bytes it holds.
struct Reply {
    head: Vec<u8>,
    data: Vec<u8>,
    held: u64,
}

/// Bytes of the connection's read buffer: request headers (28 bytes) and the handshake go
/// through it, a write's payload only as far as it was read ahead with a header; the rest
/// goes from the socket straight into the write's buffer ([`read_payload`]). A buffer as
/// large as a copy tool's writes (256 KiB) held most of each payload, copied once more.
const READ_BUF: usize = 16 << 10;

/// Reads a write's `len` bytes of payload: what the read buffer holds of it, then the
/// rest from the socket directly into the vector's spare capacity, without zeroing it
/// first and without a bounce through the read buffer, in one `recv(2)` with
/// `MSG_WAITALL` ([`aoe_sys::recv_exact_append`]). `read_to_end` on a `Take` of the
/// socket, used before, starts at 8 KiB a read and doubles: six or seven `recvfrom(2)`
/// calls per 256 KiB payload, 28 per MiB written.
fn read_payload(r: &mut BufReader<Conn>, len: usize) -> io::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(len);
    let ahead = r.buffer();
    let n = ahead.len().min(len);
    data.extend_from_slice(&ahead[..n]);
    r.consume(n);
    let fd = r.get_ref().as_fd();
    aoe_sys::recv_exact_append(fd, &mut data, len - n)?;
    Ok(data)
}

/// Most iovecs per `sendmsg(2)` (`UIO_MAXIOV`): a 256 KiB read at MTU 1500 is 256 slots.
const IOV_MAX: usize = 1024;

/// Sends `head` and `pieces` on the socket `fd` without blocking, as far as its buffer
/// takes them; returns the bytes sent (a failure other than a full buffer is left to the
/// writer thread to meet and report, as for replies without data).
fn send_now(fd: RawFd, head: &[u8], pieces: &[&[u8]]) -> usize {
    let mut iov: Vec<IoSlice<'_>> = std::iter::once(head)
        .chain(pieces.iter().copied())
        .filter(|p| !p.is_empty())
        .map(IoSlice::new)
        .collect();
    let mut rest = &mut iov[..];
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    let mut sent = 0;
    while !rest.is_empty() {
        let k = rest.len().min(IOV_MAX);
        match nix::sys::socket::sendmsg::<()>(fd, &rest[..k], &[], flags, None) {
            Ok(0) => break,
            Ok(n) => {
                sent += n;
                IoSlice::advance_slices(&mut rest, n);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    sent
}

/// The bytes of `head` then `pieces` after the first `sent`, copied.
fn rest_after(head: &[u8], pieces: &[&[u8]], mut sent: usize) -> Vec<u8> {
    let total = head.len() + pieces.iter().map(|p| p.len()).sum::<usize>();
    let mut out = Vec::with_capacity(total.saturating_sub(sent));
    for p in std::iter::once(head).chain(pieces.iter().copied()) {
        if sent >= p.len() {
            sent -= p.len();
            continue;
        }
        out.extend_from_slice(&p[sent..]);
        sent = 0;
    }
    out
}

/// Replies the writer takes per `writev(2)`.
const WRITE_BATCH: usize = 64;

/// Send buffer asked for on a Unix-socket connection: many replies of a copy tool's
/// request size (nbdcopy: 256 KiB, 64 in flight per connection), so the writer hands over
/// what has queued up without blocking part way through a reply until the client has read
/// (the default, `net.core.wmem_default`, is about 200 KiB: less than one such reply, and
/// the writer blocked in every one of them, two context switches each). The kernel caps it
/// at `net.core.wmem_max`, which is no error: its value then stands. TCP keeps its
/// autotuning.
const UNIX_SNDBUF: usize = 4 << 20;

/// Writes the replies, heads and data, with as few `writev(2)` calls as the socket allows:
/// a read's data goes from the buffer the AoE frames were gathered in straight to the
/// socket, never copied into a reply buffer.
fn write_replies(w: &mut impl Write, replies: &[Reply]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = replies
        .iter()
        .flat_map(|r| [IoSlice::new(&r.head), IoSlice::new(&r.data)])
        .filter(|s| !s.is_empty())
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The transmission phase ("Transmission"): read requests, submit them, let completions
/// queue replies for the writer thread. Ends on `NBD_CMD_DISC`, end of stream, a bad
/// magic or a write error; requests still in flight are finished first (`NBD_CMD_DISC`:
/// the server MUST complete outstanding requests).
fn transmission(
    mut r: BufReader<Conn>,
    w: Conn,
    session: Arc<Session>,
    dev: TargetAddr,
    base: u64,
    net: &Handle,
) -> io::Result<()> {
    if let Conn::Unix(s) = &w {
        let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::SndBuf, &UNIX_SNDBUF);
    }
    // Each message carries the in-flight bytes it holds; the writer releases them once
    // the reply is written, so a client that stops reading replies stops being read.
    let inflight = Arc::new(Inflight::default());
    let tx = Arc::new(Replies::new(w.try_clone()?, inflight.clone()));
    let rx = tx.clone();
    let recycle = net.clone();
    let shut = w.try_clone()?;
    let inf = inflight.clone();
    let writer = std::thread::Builder::new()
        .name("nbd-writer".into())
        .spawn(move || {
            let mut w = w;
            let mut ok = true;
            let mut batch = Vec::new();
            while rx.take(&mut batch) {
                for chunk in batch.chunks(WRITE_BATCH) {
                    ok = ok && write_replies(&mut w, chunk).is_ok();
                }
                for m in batch.drain(..) {
                    inf.release(m.held);
                    // A read's buffer goes back to the engine for a later read to fill.
                    recycle.recycle(m.data);
                }
                if !ok {
                    // Unblocks the reader; replies still due are dropped (but released).
                    shut.shutdown();
                }
            }
        })?;
    let bd = BlockDevice::new(net.clone(), dev, base);
    let result = requests(&mut r, &tx, &session, &bd, &inflight);
    inflight.wait_idle();
    tx.close();
    let _ = writer.join();
    result
}

fn requests(
    r: &mut BufReader<Conn>,
    tx: &Arc<Replies>,
    session: &Arc<Session>,
    bd: &BlockDevice,
    inflight: &Arc<Inflight>,
) -> io::Result<()> {
    loop {
        let mut h = [0u8; Request::LEN];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        // A bad magic means we lost the framing: nothing sensible can be replied.
        let req = Request::parse(&h).map_err(proto_err)?;
        let cmd = match session.check(&req) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(request = %req, error = e, "nbd: request refused");
                discard(r, u64::from(req.payload_len()))?;
                inflight.acquire(0);
                tx.push(Reply {
                    head: session.error_reply(req.cookie, e, "request refused"),
                    data: Vec::new(),
                    held: 0,
                });
                continue;
            }
        };
        let cookie = req.cookie;
        // Payload bytes held in memory while in flight.
        let bytes = match cmd {
            Command::Read { len, .. } | Command::Write { len, .. } => u64::from(len),
            _ => 0,
        };
        let reply = {
            let tx = tx.clone();
            move |head: Vec<u8>, data: Vec<u8>| {
                tx.push(Reply {
                    head,
                    data,
                    held: bytes,
                });
            }
        };
        let status = {
            let s = session.clone();
            move |r: Result<(), i32>| match r {
                Ok(()) => s.done_reply(cookie),
                Err(e) => s.error_reply(cookie, proto::nbd_error(e), "AoE I/O failed"),
            }
        };
        match cmd {
            Command::Disconnect => return Ok(()),
            Command::Read { offset, len } => {
                inflight.acquire(bytes);
                let s = session.clone();
                let tx = tx.clone();
                // The data goes from the receive ring's slots into the socket on the
                // network thread (or is copied for the writer, see Replies::push_pieces).
                bd.read_held(
                    offset,
                    len as usize,
                    Box::new(move |res| match res {
                        Ok(pieces) => {
                            let n = pieces.iter().map(|p| p.len()).sum();
                            let head = s.read_reply_head(cookie, offset, n);
                            tx.push_pieces(head, pieces, bytes)
                        }
                        Err(e) => reply(
                            s.error_reply(cookie, proto::nbd_error(e), "AoE read failed"),
                            Vec::new(),
                        ),
                    }),
                );
            }
            Command::Write { offset, len, fua } => {
                let data = read_payload(r, len as usize)?;
                inflight.acquire(bytes);
                let done = bd.then_flush(fua, Box::new(move |res| reply(status(res), Vec::new())));
                bd.write(offset, data, done);
            }
            Command::WriteZeroes { offset, len, fua } => {
                inflight.acquire(bytes);
                let done = bd.then_flush(fua, Box::new(move |res| reply(status(res), Vec::new())));
                bd.write_zeroes(offset, u64::from(len), done);
            }
            Command::Flush => {
                inflight.acquire(bytes);
                bd.flush(Box::new(move |res| reply(status(res), Vec::new())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A socket that takes at most `max` bytes per call, like a full send buffer does.
    struct Dribble {
        out: Vec<u8>,
        max: usize,
    }

    impl Write for Dribble {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let n = b.len().min(self.max);
            self.out.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(self.max - n);
                self.out.extend_from_slice(&b[..k]);
                n += k;
                if n == self.max {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A write's payload read partly from what the read buffer holds and partly straight
    /// from the socket arrives whole, the bytes after it stay for the next request, and a
    /// payload cut short by the end of the stream is an error, not a short write.
    #[test]
    fn payloads_read_past_the_buffer_arrive_whole() {
        for len in [
            1usize,
            100,
            READ_BUF - 28,
            READ_BUF,
            3 * READ_BUF + 17,
            256 << 10,
        ] {
            let (a, mut b) = UnixStream::pair().unwrap();
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let writer = std::thread::spawn(move || {
                b.write_all(&[7u8; 28]).unwrap();
                b.write_all(&payload).unwrap();
                b.write_all(b"next").unwrap();
                payload
            });
            let mut r = BufReader::with_capacity(READ_BUF, Conn::Unix(a));
            let mut head = [0u8; 28];
            r.read_exact(&mut head).unwrap();
            let got = read_payload(&mut r, len).unwrap();
            let payload = writer.join().unwrap();
            assert!(got == payload, "len {len}");
            let mut next = [0u8; 4];
            r.read_exact(&mut next).unwrap();
            assert_eq!(&next, b"next", "len {len}");
        }
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&[1u8; 5000]).unwrap();
        drop(b);
        let mut r = BufReader::with_capacity(READ_BUF, Conn::Unix(a));
        let e = read_payload(&mut r, 6000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Short writes anywhere (inside a head, inside data, across replies) lose or repeat
    /// no byte: the replies arrive whole and in order.
    #[test]
    fn short_writev_keeps_the_stream_whole() {
        let replies: Vec<Reply> = (0..5u8)
            .map(|i| Reply {
                head: vec![i; 16],
                data: if i % 2 == 0 {
                    (0..1000).map(|j| (j % 251) as u8 ^ i).collect()
                } else {
                    Vec::new()
                },
                held: 0,
            })
            .collect();
        let want: Vec<u8> = replies
            .iter()
            .flat_map(|r| r.head.iter().chain(&r.data).copied())
            .collect();
        for max in [1, 7, 16, 17, 999, 4096] {
            let mut w = Dribble {
                out: Vec::new(),
                max,
            };
            write_replies(&mut w, &replies).unwrap();
            assert!(w.out == want, "max {max}");
        }
        // A read's reply sent from the ring's slots and cut short anywhere (inside the
        // head, inside a slot's piece, on a boundary, before an empty piece): what the
        // socket took and the copied rest the writer sends make the reply whole.
        let head = vec![0xa5u8; 16];
        let data: Vec<u8> = (0..3000).map(|j| (j % 249) as u8).collect();
        let pieces: Vec<&[u8]> = vec![
            &data[..1024],
            &data[1024..1024],
            &data[1024..2048],
            &data[2048..],
        ];
        let mut whole = head.clone();
        whole.extend_from_slice(&data);
        for sent in 0..=whole.len() {
            let rest = rest_after(&head, &pieces, sent);
            for max in [1, 999, 4096] {
                let mut w = Dribble {
                    out: whole[..sent].to_vec(),
                    max,
                };
                let queued = [Reply {
                    head: Vec::new(),
                    data: rest.clone(),
                    held: 0,
                }];
                write_replies(&mut w, &queued).unwrap();
                assert!(w.out == whole, "sent {sent} max {max}");
            }
        }
    }

    /// A read's reply from the ring's slots goes out at once when the socket has room and
    /// releases its request; into a full socket, the part it takes goes out and the rest is
    /// copied and queued for the writer, so the stream stays whole; with the writer busy
    /// it is all queued; more slots than one `sendmsg` takes (`IOV_MAX`) go out whole.
    #[test]
    fn read_replies_from_slots_go_out_whole() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let inflight = Arc::new(Inflight::default());
        let q = Replies::new(Conn::Unix(a), inflight.clone());
        // 1500 pieces of 7 bytes: two sendmsg calls.
        let data: Vec<u8> = (0..1500 * 7).map(|j| (j % 241) as u8).collect();
        let pieces: Vec<&[u8]> = data.chunks(7).collect();
        inflight.acquire(0);
        q.push_pieces(vec![1; 16], &pieces, 0);
        assert_eq!(requests_in_flight(&inflight), 0, "sent at once");
        let mut got = vec![0u8; 16 + data.len()];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got[..16], &[1; 16]);
        assert!(got[16..] == data[..]);

        // A socket with room for part of the reply only.
        let flags = MsgFlags::MSG_DONTWAIT;
        let mut filled = 0;
        while let Ok(n) = nix::sys::socket::send(q.sock.as_raw_fd(), &[7u8; 4096], flags) {
            filled += n;
        }
        let mut filler = vec![0u8; 64 << 10];
        b.read_exact(&mut filler).unwrap();
        filled -= filler.len();
        let big: Vec<u8> = (0..256 << 10).map(|j| (j % 239) as u8).collect();
        let pieces: Vec<&[u8]> = big.chunks(8704).collect();
        inflight.acquire(0);
        q.push_pieces(vec![2; 16], &pieces, 0);
        assert_eq!(requests_in_flight(&inflight), 1, "the rest is queued");
        // The writer's turn: a reply pushed now queues behind it.
        let mut batch = Vec::new();
        assert!(q.take(&mut batch));
        inflight.acquire(0);
        q.push_pieces(vec![3; 16], &[&[9u8; 100][..]], 0);
        assert_eq!(
            requests_in_flight(&inflight),
            2,
            "queued behind the busy writer"
        );
        let reader = std::thread::spawn(move || {
            let mut all = vec![0u8; filled + 16 + (256 << 10) + 16 + 100];
            b.read_exact(&mut all).unwrap();
            all
        });
        let mut w = q.sock.try_clone().unwrap();
        write_replies(&mut w, &batch).unwrap();
        let mut rest = Vec::new();
        assert!(q.take(&mut rest));
        write_replies(&mut w, &rest).unwrap();
        let all = reader.join().unwrap();
        assert!(all[..filled].iter().all(|&x| x == 7));
        let all = &all[filled..];
        assert_eq!(&all[..16], &[2; 16]);
        assert!(all[16..16 + big.len()] == big[..]);
        let all = &all[16 + big.len()..];
        assert_eq!(&all[..16], &[3; 16]);
        assert_eq!(&all[16..], &[9; 100]);
    }

    fn reply(byte: u8, data: Vec<u8>) -> Reply {
        Reply {
            head: vec![byte; 16],
            data,
            held: 0,
        }
    }

    /// The process-wide budget: a connection with requests in flight waits while the
    /// total would pass the limit, until another connection releases; a connection with
    /// nothing in flight always gets its one request, and one whose other requests end
    /// while it waits goes on alone, however full the budget (stuck clients cannot starve
    /// it).
    #[test]
    fn the_budget_over_all_connections_holds_and_never_starves() {
        let budget: &'static Budget = Box::leak(Box::new(Budget::new(100)));
        let stuck = Arc::new(Inflight::with_budget(budget));
        let other = Arc::new(Inflight::with_budget(budget));
        stuck.acquire(95);
        stuck.acquire(5); // 100: full
        other.acquire(50); // alone on its connection: allowed past the limit
        assert_eq!(budget.state.lock().unwrap().bytes, 150);
        let (tx, rx) = std::sync::mpsc::channel();
        let o = other.clone();
        let t = std::thread::spawn(move || {
            o.acquire(10);
            tx.send(()).unwrap();
        });
        // It waits: the budget is past its limit and the connection has a request in
        // flight (a wait of 300 ms that must see nothing; the release below must end it).
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        // One of the stuck connection's requests ends: 145 + 10 > 100, still waiting.
        stuck.release(5);
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        // Its own first request ends: now alone, it goes on though the stuck connection
        // still holds 95 and the total passes the limit (95 + 10).
        other.release(50);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a connection alone was starved");
        t.join().unwrap();
        assert_eq!(budget.state.lock().unwrap().bytes, 105);
        assert_eq!(requests_in_flight(&other), 1);
    }

    fn requests_in_flight(i: &Inflight) -> usize {
        i.state.lock().unwrap().requests
    }

    /// A reply without data goes out at once, from the thread that completes it, and
    /// releases its request; one with data waits for the writer.
    #[test]
    fn data_less_replies_are_sent_at_once() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let inflight = Arc::new(Inflight::default());
        let q = Replies::new(Conn::Unix(a), inflight.clone());
        inflight.acquire(0);
        inflight.acquire(0);
        q.push(reply(1, Vec::new()));
        assert_eq!(requests_in_flight(&inflight), 1);
        let mut got = [0u8; 16];
        b.read_exact(&mut got).unwrap();
        assert_eq!(got, [1; 16]);
        q.push(reply(2, vec![9; 100]));
        assert_eq!(requests_in_flight(&inflight), 1);
        let mut batch = Vec::new();
        assert!(q.take(&mut batch));
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].data, vec![9; 100]);
    }

    /// With the socket full, or the writer writing, a reply without data is queued whole
    /// behind what is there, never written into the middle of another reply or dropped.
    #[test]
    fn data_less_replies_queue_behind_a_full_socket_or_a_busy_writer() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let flags = MsgFlags::MSG_DONTWAIT;
        let mut filled = 0;
        while let Ok(n) = nix::sys::socket::send(a.as_raw_fd(), &[7u8; 4096], flags) {
            filled += n;
        }
        let inflight = Arc::new(Inflight::default());
        let q = Replies::new(Conn::Unix(a), inflight.clone());
        inflight.acquire(0);
        q.push(reply(3, Vec::new()));
        assert_eq!(requests_in_flight(&inflight), 1, "queued, not released");
        let mut batch = Vec::new();
        assert!(q.take(&mut batch));
        // The client reads what filled the socket, so there is room now; but the writer
        // holds the socket (it took reply 3): this one queues too, though nothing is
        // queued before it.
        let mut filler = vec![0u8; filled];
        b.read_exact(&mut filler).unwrap();
        assert!(filler.iter().all(|&x| x == 7));
        inflight.acquire(0);
        q.push(reply(4, Vec::new()));
        assert_eq!(requests_in_flight(&inflight), 2, "queued behind the writer");
        let mut w = q.sock.try_clone().unwrap();
        write_replies(&mut w, &batch).unwrap();
        let mut rest = Vec::new();
        assert!(q.take(&mut rest));
        assert_eq!(rest.len(), 1);
        write_replies(&mut w, &rest).unwrap();
        let mut all = [0u8; 32];
        b.read_exact(&mut all).unwrap();
        assert_eq!(&all[..16], &[3; 16]);
        assert_eq!(&all[16..], &[4; 16]);
    }
}
