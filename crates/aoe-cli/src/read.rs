//! `aoe read`: copy a whole AoE device (or a range) to a file with raw frames, one request in
//! flight. A diagnostic and demo tool that needs no initiator daemon; `aoe initiator` is the
//! real client.
//!
//! On a terminal it shows its progress on standard error, a line redrawn in place; with
//! standard error not a terminal (a script, a log, a pipe) it prints only its one-line
//! summary at the end.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aoe_sys::PacketSocket;
use aoe_wire::{
    max_sectors_for_mtu, AtaFlags, AtaRepr, Body, Command, ConfigCommand, ConfigRepr, HeaderRepr,
    Identify, MacAddr, Message, Tag, TargetAddr,
};
use clap::Args;

/// Read an AoE device into a file with raw frames (no initiator needed).
#[derive(Debug, Args)]
pub struct ReadArgs {
    /// Shelf.
    shelf: u16,
    /// Slot.
    slot: u8,
    /// Network interface the target is on.
    netif: String,
    /// Output file (`-` for standard output).
    output: PathBuf,
    /// First sector to read.
    #[arg(long, default_value_t = 0)]
    lba: u64,
    /// Sectors to read, at least 1 (default: to the end of the device).
    // 0 reached the socket and the device before a word was said of it (session 29's audit
    // of the flags), and would have written an empty file: a usage error naming the range.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Seconds to wait for each answer before giving up (retransmitting every 200 ms),
    /// 1 to 3600.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
}

struct Client {
    sock: PacketSocket,
    mac: MacAddr,
    tag: u32,
    timeout: Duration,
    buf: Vec<u8>,
}

impl Client {
    /// Sends `frame` (with a fresh tag patched in) until a response with that tag arrives;
    /// returns the response length in `self.buf`.
    fn exchange(&mut self, build: &dyn Fn(Tag) -> Vec<u8>) -> Result<usize> {
        let deadline = Instant::now() + self.timeout;
        loop {
            self.tag = (self.tag + 1) | Tag::USER_BIT;
            let tag = Tag(self.tag);
            let frame = build(tag);
            self.sock.send(&frame).context("send")?;
            let resend = Instant::now() + Duration::from_millis(200);
            while Instant::now() < resend {
                let mut fds = [aoe_sys::PollFd::new(std::os::fd::AsRawFd::as_raw_fd(
                    &self.sock,
                ))];
                aoe_sys::poll(&mut fds, Some(Duration::from_millis(20)))?;
                while let Some(meta) = self.sock.recv(&mut self.buf)? {
                    let Ok(m) = Message::parse(&self.buf[..meta.len]) else {
                        continue;
                    };
                    if m.header.response && m.header.tag == tag && m.header.dst == self.mac {
                        if let Some(e) = m.header.error {
                            bail!("target answered with AoE error {}: {e}", u8::from(e));
                        }
                        return Ok(meta.len);
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!("no answer within {:?}", self.timeout);
            }
        }
    }
}

/// Runs `aoe read`.
pub fn run(a: ReadArgs) -> Result<()> {
    // Shelf 0xffff and slot 0xff are the broadcast values (AoEr11 section 2.1): every target
    // (or every slot of a shelf) would answer, and the copy would come from whichever
    // answered first.
    if a.shelf == TargetAddr::BROADCAST_SHELF || a.slot == TargetAddr::BROADCAST_SLOT {
        return Err(crate::tools::usage(format!(
            "aoe read {} {}: {} is a broadcast address; name one target (shelf 0-65534, \
             slot 0-254; `aoe stat` or `aoeping` show them)",
            a.shelf,
            a.slot,
            TargetAddr::new(a.shelf, a.slot)
        )));
    }
    let sock = PacketSocket::open(&a.netif)
        .with_context(|| format!("cannot open AoE socket on {}", a.netif))?;
    let info = sock.info().clone();
    let mac = MacAddr(info.mac);
    let addr = TargetAddr::new(a.shelf, a.slot);
    let mut c = Client {
        sock,
        mac,
        tag: std::process::id() << 8,
        timeout: Duration::from_secs(a.timeout),
        buf: vec![0u8; aoe_sys::frame_capacity(info.mtu)],
    };
    // Query Config (broadcast) finds the target's MAC and its sectors per frame.
    let n = c
        .exchange(&|tag| {
            let h = HeaderRepr::request(MacAddr::BROADCAST, mac, addr, Command::QueryConfig, tag);
            Message {
                header: h,
                body: Body::Config(ConfigRepr::request(ConfigCommand::Read, b"")),
            }
            .to_vec()
            .expect("fits")
        })
        .with_context(|| format!("{addr}: Query Config"))?;
    let m = Message::parse(&c.buf[..n])?;
    let target = m.header.src;
    let Body::Config(cfg) = m.body else {
        bail!("{addr}: unexpected answer to Query Config");
    };
    let per_frame = max_sectors_for_mtu(info.mtu).min(cfg.sector_count).max(1) as u64;
    let ata = |tag: Tag, cmd: u8, flags: AtaFlags, count: u8, lba: u64| {
        let h = HeaderRepr::request(target, mac, addr, Command::Ata, tag);
        Message {
            header: h,
            body: Body::Ata(AtaRepr {
                aflags: flags,
                err_feature: 0,
                sector_count: count,
                cmd_status: cmd,
                lba,
                data: &[],
            }),
        }
        .to_vec()
        .expect("fits")
    };
    let n = c
        .exchange(&|tag| ata(tag, 0xec, AtaFlags::empty(), 1, 0))
        .with_context(|| format!("{addr}: IDENTIFY"))?;
    let id = Identify::parse(&c.buf[aoe_wire::ATA_HEADER_LEN..n])?;
    let sectors = crate::tools::lba48_capacity(addr, id.sectors(), false);
    if a.lba > sectors {
        bail!(
            "{addr}: lba {} is beyond the device ({sectors} sectors)",
            a.lba
        );
    }
    let count = a.count.unwrap_or(sectors - a.lba);
    // Checked: `--count` near 2^64 wrapped the sum below the end, and nothing was read
    // though the summary said it all was.
    if a.lba.checked_add(count).is_none_or(|end| end > sectors) {
        bail!(
            "{addr}: {count} sectors at {} exceed the device ({sectors} sectors)",
            a.lba
        );
    }
    let to_file = a.output.as_os_str() != "-";
    let mut out: Box<dyn Write> = if to_file {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&a.output)
                .with_context(|| format!("cannot create {}", a.output.display()))?,
        ))
    } else {
        Box::new(std::io::stdout().lock())
    };
    let mut progress = Progress::new(addr, count * 512, std::io::stderr().is_terminal());
    let copied = copy(
        &mut c,
        &ata,
        addr,
        a.lba,
        count,
        per_frame,
        &mut out,
        &mut progress,
    );
    progress.clear();
    drop(out);
    if let Err(e) = copied {
        // No partial copy left behind to be taken for the device's contents.
        if to_file {
            let _ = std::fs::remove_file(&a.output);
            return Err(e.context(format!("{} removed", a.output.display())));
        }
        return Err(e);
    }
    eprintln!(
        "{addr}: read {count} sectors ({} bytes) from {target} via {}",
        count * 512,
        a.netif
    );
    Ok(())
}

/// Progress on a terminal: `eX.Y: 12.0 of 64.0 MiB (18%), 9.5 MB/s` on standard error,
/// redrawn in place at most five times a second; nothing at all when `live` is false.
struct Progress {
    live: bool,
    addr: TargetAddr,
    total: u64,
    start: Instant,
    next: Instant,
}

impl Progress {
    fn new(addr: TargetAddr, total: u64, live: bool) -> Progress {
        let now = Instant::now();
        Progress {
            live,
            addr,
            total,
            start: now,
            next: now,
        }
    }

    /// `done` bytes copied so far.
    fn update(&mut self, done: u64) {
        let now = Instant::now();
        if !self.live || now < self.next {
            return;
        }
        self.next = now + Duration::from_millis(200);
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let secs = now.duration_since(self.start).as_secs_f64().max(1e-3);
        eprint!(
            "\r{}: {:.1} of {:.1} MiB ({}%), {:.1} MB/s   ",
            self.addr,
            mib(done),
            mib(self.total),
            (done * 100).checked_div(self.total).unwrap_or(100),
            done as f64 / secs / 1e6
        );
    }

    /// Clears the line before the summary or an error is printed.
    fn clear(&mut self) {
        if self.live {
            eprint!("\r{:78}\r", "");
        }
    }
}

/// Reads `count` sectors from `start` into `out`, `per_frame` at a time.
#[allow(clippy::too_many_arguments)]
fn copy(
    c: &mut Client,
    ata: &dyn Fn(Tag, u8, AtaFlags, u8, u64) -> Vec<u8>,
    addr: TargetAddr,
    start: u64,
    count: u64,
    per_frame: u64,
    out: &mut dyn Write,
    progress: &mut Progress,
) -> Result<()> {
    let mut lba = start;
    let end = start + count;
    while lba < end {
        let k = per_frame.min(end - lba);
        let n = c
            .exchange(&|tag| ata(tag, 0x24, AtaFlags::EXTENDED, k as u8, lba))
            .with_context(|| format!("{addr}: read at lba {lba}"))?;
        let m = Message::parse(&c.buf[..n])?;
        let Body::Ata(r) = m.body else {
            bail!("{addr}: unexpected answer to a read");
        };
        if r.cmd_status & aoe_wire::ata::status::FAILURE_MASK != 0 {
            bail!(
                "{addr}: read at lba {lba} failed: ATA status {:#04x} error {:#04x}",
                r.cmd_status,
                r.err_feature
            );
        }
        let len = (k as usize) * 512;
        if r.data.len() < len {
            bail!("{addr}: short read answer at lba {lba}");
        }
        out.write_all(&r.data[..len])?;
        lba += k;
        progress.update((lba - start) * 512);
    }
    out.flush()?;
    Ok(())
}
