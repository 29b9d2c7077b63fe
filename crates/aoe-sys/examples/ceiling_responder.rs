//! A minimal AoE responder for measuring the I/O path alone (issue 15, "the target's fast
//! path"): it answers Query Config (AoEr11 §3.2) and ATA READ SECTORS (EXT) (§3.1, 0x20 and
//! 0x24) for one shelf.slot from a buffer in memory, through either [`PacketRing`]
//! (`TPACKET_V2`, what `aoe serve` uses) or [`XdpSocket`] (AF_XDP), with the same loop, so
//! that the two compare per frame with no page cache, engine or worker in the way. Replies
//! are built in the transmit slot while the request is read; nothing is allocated per frame.
//!
//! Not a target: no writes, no Query Config string, no checks beyond what a
//! benchmark needs (an out-of-range read gets an ATA ABRT error reply). Headers are laid out
//! by hand from AoEr11 here, on purpose, so the measurement depends on no other crate.
//!
//! ```text
//! ceiling_responder IFACE SHELF SLOT ring|xdp [native|generic|auto] [MIB|file:PATH]
//! ```
//!
//! With `file:PATH` each read is one `pread(2)` from that file into the transmit slot (the
//! least a file-backed target does per request), and IDENTIFY DEVICE (0xEC) is answered with
//! the capacity, so that `aoe bench` (which asks for it) can load it as well.
//!
//! Runs until killed; prints the I/O mode it got, and on SIGINT/SIGTERM the frames answered.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aoe_sys::{
    poll, PacketRing, PacketSocket, PollFd, XdpConfig, XdpMode, XdpModeWanted, XdpSocket,
};

/// Replies the loop builds per batch.
const BATCH: usize = 64;
/// AoE header (10) and ATA header (12) after Ethernet (14): AoEr11 §2, §3.1.
const ATA_HDR: usize = 36;
/// Buffer count advertised in Query Config: what the generator may keep in flight.
const BUFCNT: u16 = 256;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// The part of each I/O path the loop needs.
trait Io {
    fn recv_batch(&mut self, max: usize) -> usize;
    fn frame_and_slot(&mut self, i: usize) -> (&[u8], Option<&mut [u8]>);
    fn commit(&mut self, len: usize) -> io::Result<()>;
    fn kick(&mut self) -> io::Result<()>;
    fn fd(&self) -> RawFd;
}

struct Ring(PacketSocket, PacketRing);

impl Io for Ring {
    fn recv_batch(&mut self, max: usize) -> usize {
        self.1.recv_batch(max)
    }
    fn frame_and_slot(&mut self, i: usize) -> (&[u8], Option<&mut [u8]>) {
        self.1.frame_and_slot(i)
    }
    fn commit(&mut self, len: usize) -> io::Result<()> {
        self.1.commit(len)
    }
    fn kick(&mut self) -> io::Result<()> {
        self.1.kick()
    }
    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Io for XdpSocket {
    fn recv_batch(&mut self, max: usize) -> usize {
        XdpSocket::recv_batch(self, max)
    }
    fn frame_and_slot(&mut self, i: usize) -> (&[u8], Option<&mut [u8]>) {
        XdpSocket::frame_and_slot(self, i)
    }
    fn commit(&mut self, len: usize) -> io::Result<()> {
        XdpSocket::commit(self, len)
    }
    fn kick(&mut self) -> io::Result<()> {
        XdpSocket::kick(self)
    }
    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

struct Responder {
    shelf: u16,
    slot: u8,
    mac: [u8; 6],
    mtu: usize,
    /// What reads are answered from: `data`, or `file` (then `data` is empty).
    data: Vec<u8>,
    file: Option<std::fs::File>,
    /// Bytes served.
    len: usize,
}

impl Responder {
    /// The IDENTIFY DEVICE page (ATA8-ACS 7.16), only what an initiator reads of it: LBA and
    /// LBA48 supported (words 49, 83, 86) and the capacity (words 60-61, 100-103), words
    /// little-endian.
    fn identify(&self, page: &mut [u8]) {
        page.fill(0);
        let sectors = (self.len / 512) as u64;
        let mut word = |w: usize, v: u16| page[2 * w..2 * w + 2].copy_from_slice(&v.to_le_bytes());
        word(49, 1 << 9);
        let lba28 = sectors.min(0x0fff_ffff);
        word(60, lba28 as u16);
        word(61, (lba28 >> 16) as u16);
        word(83, 0x4000 | 1 << 10);
        word(86, 1 << 10);
        for i in 0..4 {
            word(100 + i, (sectors >> (16 * i)) as u16);
        }
    }

    /// The reply to `req` in `out`: its length, or None to ignore the frame (not ours, not a
    /// request, or a command this responder does not serve).
    fn answer(&self, req: &[u8], out: &mut [u8]) -> Option<usize> {
        if req.len() < 24 || req[14] & 0x08 != 0 {
            return None;
        }
        let shelf = u16::from_be_bytes([req[16], req[17]]);
        if (shelf != self.shelf && shelf != 0xffff) || (req[18] != self.slot && req[18] != 0xff) {
            return None;
        }
        // Ethernet: back to the sender, from us; AoE header copied with the response flag.
        out[..6].copy_from_slice(&req[6..12]);
        out[6..12].copy_from_slice(&self.mac);
        out[12..24].copy_from_slice(&req[12..24]);
        out[14] = 0x10 | 0x08;
        out[15] = 0;
        out[16..18].copy_from_slice(&self.shelf.to_be_bytes());
        out[18] = self.slot;
        match req[19] {
            // Query Config, read (ccmd 0): buffer count, firmware, sectors per frame.
            1 if req.len() >= 32 && req[29] & 0x0f == 0 => {
                out[24..26].copy_from_slice(&BUFCNT.to_be_bytes());
                out[26..28].copy_from_slice(&1u16.to_be_bytes());
                out[28] = ((self.mtu - ATA_HDR + 14) / 512).min(255) as u8;
                out[29] = 0x10;
                out[30..32].fill(0);
                Some(60)
            }
            0 if req.len() >= ATA_HDR => {
                let count = usize::from(req[26]);
                let cmd = req[27];
                let mut lba = [0u8; 8];
                lba[..6].copy_from_slice(&req[28..34]);
                let lba = u64::from_le_bytes(lba) as usize;
                out[24..ATA_HDR].copy_from_slice(&req[24..ATA_HDR]);
                let end = lba.checked_add(count).map(|e| e * 512);
                let len = ATA_HDR + count * 512;
                if cmd == 0xec && len <= out.len() {
                    out[25] = 0;
                    out[27] = 0x40; // DRDY
                    self.identify(&mut out[ATA_HDR..ATA_HDR + 512]);
                    return Some(ATA_HDR + 512);
                }
                if !matches!(cmd, 0x20 | 0x24)
                    || end.is_none_or(|e| e > self.len)
                    || len > out.len()
                {
                    out[25] = 0x04; // ABRT
                    out[27] = 0x41; // DRDY | ERR
                    return Some(60);
                }
                out[25] = 0;
                out[27] = 0x40; // DRDY
                let data = &mut out[ATA_HDR..len];
                match &self.file {
                    // One pread(2) straight into the slot, as `aoe serve` reads a file export.
                    Some(f) => {
                        if f.read_exact_at(data, (lba * 512) as u64).is_err() {
                            out[25] = 0x40; // UNC
                            out[27] = 0x41; // DRDY | ERR
                            return Some(60);
                        }
                    }
                    None => data.copy_from_slice(&self.data[lba * 512..lba * 512 + count * 512]),
                }
                Some(len.max(60))
            }
            _ => None,
        }
    }

    fn run(&self, io: &mut dyn Io) -> io::Result<u64> {
        let mut answered = 0u64;
        while !STOP.load(Ordering::Relaxed) {
            let n = io.recv_batch(BATCH);
            if n == 0 {
                let mut fds = [PollFd::new(io.fd())];
                match poll(&mut fds, Some(Duration::from_millis(100))) {
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            for i in 0..n {
                loop {
                    let (req, slot) = io.frame_and_slot(i);
                    let Some(slot) = slot else {
                        // Every slot in flight: send, then wait for one.
                        let _ = io.kick();
                        std::thread::yield_now();
                        continue;
                    };
                    if let Some(len) = self.answer(req, slot) {
                        io.commit(len)?;
                        answered += 1;
                    }
                    break;
                }
            }
            loop {
                match io.kick() {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(answered)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage =
        "usage: ceiling_responder IFACE SHELF SLOT ring|xdp [native|generic|auto] [MIB|file:PATH]";
    if args.len() < 5 || args.len() > 7 {
        eprintln!("{usage}");
        std::process::exit(2);
    }
    let parse = |s: &str, what: &str| -> u64 {
        s.parse().unwrap_or_else(|_| {
            eprintln!("ceiling_responder: bad {what} {s:?}\n{usage}");
            std::process::exit(2)
        })
    };
    let ifname = &args[1];
    let shelf = u16::try_from(parse(&args[2], "shelf")).unwrap_or(u16::MAX);
    let slot = u8::try_from(parse(&args[3], "slot")).unwrap_or(u8::MAX);
    if shelf == u16::MAX || slot == u8::MAX {
        eprintln!("ceiling_responder: shelf below 65535 and slot below 255\n{usage}");
        std::process::exit(2);
    }
    let mode = match args.get(5).map(String::as_str) {
        None | Some("auto") => XdpModeWanted::Auto,
        Some("native") => XdpModeWanted::Only(XdpMode::Native),
        Some("generic") => XdpModeWanted::Only(XdpMode::Generic),
        Some(m) => {
            eprintln!("ceiling_responder: unknown XDP mode {m:?}\n{usage}");
            std::process::exit(2)
        }
    };
    // MIB of memory, or file:PATH to read with pread(2) instead.
    let (mib, file) = match args.get(6).map(|s| (s, s.strip_prefix("file:"))) {
        Some((_, Some(path))) => {
            let f = std::fs::File::open(path).unwrap_or_else(|e| {
                eprintln!("ceiling_responder: {path}: {e}");
                std::process::exit(1)
            });
            (0, Some(f))
        }
        Some((s, None)) => (parse(s, "size in MiB") as usize, None),
        None => (1024, None),
    };
    let len = match &file {
        Some(f) => f.metadata().map_or(0, |m| m.len() as usize),
        None => mib << 20,
    };
    let info = aoe_sys::interface_info(ifname).unwrap_or_else(|e| {
        eprintln!("ceiling_responder: {ifname}: {e}");
        std::process::exit(1)
    });
    // Every sector stamped with its LBA, so a reader can check what it got.
    let mut data = vec![0u8; mib << 20];
    for (lba, s) in data.chunks_mut(512).enumerate() {
        s[..8].copy_from_slice(&(lba as u64).to_le_bytes());
    }
    let r = Responder {
        shelf,
        slot,
        mac: info.mac,
        mtu: info.mtu as usize,
        data,
        file,
        len,
    };
    let cap = aoe_sys::frame_capacity(info.mtu);
    let mut io: Box<dyn Io> = match args[4].as_str() {
        "ring" => {
            let (sock, ring) =
                PacketSocket::open_with_ring(ifname, 60, 1024).unwrap_or_else(|e| fail(ifname, e));
            let _ = sock.set_qdisc_bypass(true);
            eprintln!("ceiling_responder: e{shelf}.{slot} on {ifname}: TPACKET_V2 rings");
            Box::new(Ring(sock, ring))
        }
        "xdp" => {
            let cfg = XdpConfig {
                frame_cap: cap,
                rx_frames: 1024,
                tx_frames: 1024,
                mode,
            };
            let x = XdpSocket::open(ifname, cfg).unwrap_or_else(|e| fail(ifname, e));
            eprintln!(
                "ceiling_responder: e{shelf}.{slot} on {ifname}: AF_XDP, {:?} mode",
                x.mode()
            );
            Box::new(x)
        }
        m => {
            eprintln!("ceiling_responder: unknown I/O {m:?}\n{usage}");
            std::process::exit(2)
        }
    };
    install_signals();
    match r.run(io.as_mut()) {
        Ok(n) => eprintln!("ceiling_responder: {n} frames answered"),
        Err(e) => fail(ifname, e),
    }
}

fn fail(ifname: &str, e: io::Error) -> ! {
    eprintln!("ceiling_responder: {ifname}: {e}");
    std::process::exit(1)
}

fn install_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler is async-signal-safe (one atomic store); sigaction without
        // SA_RESTART, so poll returns EINTR and the loop sees STOP.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}
