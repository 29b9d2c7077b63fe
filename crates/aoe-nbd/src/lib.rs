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
//! completions make a reply header on the network thread and hand it, with a read's data
//! as the engine assembled it, to the writer, which sends what has queued up with one
//! `writev(2)` (the data is never copied into a reply buffer). Replies go out in completion
//! order, not request order (NBD allows that: the cookie matches them up).
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
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{Context, Result};
use aoe_proto::initiator::DeviceState;
use aoe_wire::TargetAddr;

use aoe_initiator::blockdev::BlockDevice;
use aoe_initiator::net::{lock, Handle, Shared};
use proto::{
    BlockSizes, Command, Export, Exports, Handshake, OptionHeader, Request, Session, Step,
};

/// Requests in flight per connection before the reader waits for completions.
pub const MAX_INFLIGHT: usize = 128;
/// Payload bytes in flight per connection before the reader waits.
pub const MAX_INFLIGHT_BYTES: u64 = 128 << 20;

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
    let r = std::thread::Builder::new()
        .name("nbd-conn".into())
        .spawn(move || {
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

/// Requests in flight on one connection, with a cap.
#[derive(Default)]
struct Inflight {
    state: Mutex<(usize, u64)>,
    cv: Condvar,
}

impl Inflight {
    fn acquire(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.0 > 0 && (s.0 >= MAX_INFLIGHT || s.1 + bytes > MAX_INFLIGHT_BYTES) {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.0 += 1;
        s.1 += bytes;
    }
    fn release(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 -= 1;
        s.1 -= bytes;
        self.cv.notify_all();
    }
    fn wait_idle(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.0 > 0 {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
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
/// rest from the socket directly into the vector's spare capacity (the standard streams
/// fill it without zeroing it first, and without a bounce through the read buffer).
fn read_payload(r: &mut BufReader<Conn>, len: usize) -> io::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(len);
    let ahead = r.buffer();
    let n = ahead.len().min(len);
    data.extend_from_slice(&ahead[..n]);
    r.consume(n);
    let rest = (len - n) as u64;
    if rest > 0 {
        match r.get_mut() {
            Conn::Unix(s) => s.take(rest).read_to_end(&mut data)?,
            Conn::Tcp(s) => s.take(rest).read_to_end(&mut data)?,
        };
    }
    if data.len() < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(data)
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
    let (tx, rx) = crossbeam_channel::unbounded::<Reply>();
    let recycle = net.clone();
    let inflight = Arc::new(Inflight::default());
    let shut = w.try_clone()?;
    let inf = inflight.clone();
    let writer = std::thread::Builder::new()
        .name("nbd-writer".into())
        .spawn(move || {
            let mut w = w;
            let mut ok = true;
            let mut batch = Vec::with_capacity(WRITE_BATCH);
            while let Ok(first) = rx.recv() {
                batch.push(first);
                while batch.len() < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                ok = ok && write_replies(&mut w, &batch).is_ok();
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
    drop(tx);
    let _ = writer.join();
    result
}

fn requests(
    r: &mut BufReader<Conn>,
    tx: &crossbeam_channel::Sender<Reply>,
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
                let _ = tx.send(Reply {
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
                let _ = tx.send(Reply {
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
                bd.read(
                    offset,
                    len as usize,
                    Box::new(move |res| match res {
                        Ok(d) => {
                            let head = s.read_reply_head(cookie, offset, d.len());
                            reply(head, d)
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
    }
}
