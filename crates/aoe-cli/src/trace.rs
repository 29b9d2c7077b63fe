//! `aoe trace IFACE`: AoE frames on an interface as they pass, one decoded line each.
//!
//! Like `tcpdump -i IFACE ether proto 0x88a2`, but every AoEr11 field is named (tcpdump's
//! `print-aoe.c` and Wireshark's `packet-aoe.c` are the references for what is shown) and a
//! frame that does not parse is named malformed, with the reason `aoe_wire`'s parser gives.
//! The capture socket is an `ETH_P_ALL` tap with an AoE filter (`PacketSocket::open_tap`), so
//! frames this host sends are shown as well as those it receives. `-w FILE` also writes the
//! frames shown (those `-t` and `--mac` pass) to a classic pcap file of link type Ethernet,
//! which tcpdump, tshark and Wireshark read.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use aoe_sys::PacketSocket;
use aoe_wire::{
    AtaCommand, AtaFlags, AtaRepr, Body, Command, ConfigCommand, ConfigRepr, DirectiveCommand,
    Frame, HeaderRepr, MacAddr, MacMaskRepr, MaskCommand, MaskError, Message, ReserveCommand,
    ReserveRepr, TargetAddr, AOE_VERSION,
};
use clap::Args;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::DataLink;

/// Largest frame captured whole: pcap's customary snap length, above the longest AoE frame
/// at any MTU (127 sectors at a veth's largest MTU, 65535: 65,060 bytes; the one-byte sector
/// count allows no more than 255 below 131 KB, which no link gives).
const SNAPLEN: usize = 65_535;

/// Arguments of `aoe trace`.
#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Network interface to watch.
    pub iface: String,
    /// Only frames for this target, SHELF.SLOT or eSHELF.SLOT; broadcasts that reach it
    /// (shelf 65535, or its shelf and slot 255) are shown too.
    #[arg(short = 't', long = "target", value_name = "SHELF.SLOT")]
    pub target: Option<String>,
    /// Only frames from or to this MAC address.
    #[arg(long, value_name = "MAC")]
    pub mac: Option<MacAddr>,
    /// Stop after COUNT frames (counting those the filters pass), at least 1 [default:
    /// until interrupted].
    // 0 listened and stopped at once with "0 frames" (session 29's audit of the flags):
    // a usage error naming the range, as `aoe target monitor -c 0` is.
    #[arg(short = 'c', long, value_name = "COUNT", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Also write the frames shown to FILE as pcap (link type Ethernet), for tshark/Wireshark.
    #[arg(short = 'w', long = "write", value_name = "FILE")]
    pub write: Option<PathBuf>,
}

/// `-t` as a filter: a single shelf and slot (wildcards are no filter).
fn parse_target(s: &str) -> Result<TargetAddr> {
    s.parse::<TargetAddr>()
        .map_err(|e| crate::tools::usage(format!("-t {s}: {e}")))
}

/// Runs `aoe trace` until `-c` frames were shown, or SIGINT/SIGTERM.
pub fn run(a: TraceArgs) -> Result<()> {
    let want = a.target.as_deref().map(parse_target).transpose()?;
    let sock = PacketSocket::open_tap(&a.iface, aoe_sys::ETH_P_AOE)
        .with_context(|| format!("cannot open a capture socket on {}", a.iface))?;
    // A large receive buffer so a burst is not dropped while a line is printed.
    let _ = sock.set_recv_buffer(aoe_sys::RECV_BUFFER_BYTES);
    let mut pcap = match &a.write {
        Some(path) => {
            let f =
                File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
            let header = PcapHeader {
                datalink: DataLink::ETHERNET,
                snaplen: SNAPLEN as u32,
                ..PcapHeader::default()
            };
            Some(
                PcapWriter::with_header(BufWriter::new(f), header)
                    .with_context(|| format!("cannot write {}", path.display()))?,
            )
        }
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("signal handler")?;
    }
    eprintln!(
        "aoe trace: listening on {} (AoE, EtherType 0x88a2)",
        a.iface
    );

    let mut buf = vec![0u8; SNAPLEN];
    let mut shown: u64 = 0;
    let mut out = io::stdout().lock();
    'outer: while !stop.load(Ordering::Relaxed) && a.count.is_none_or(|c| shown < c) {
        let mut fds = [aoe_sys::PollFd::new(sock.as_raw_fd())];
        match aoe_sys::poll(&mut fds, Some(Duration::from_millis(200))) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("poll"),
        }
        while let Some(meta) = sock.recv(&mut buf).context("receive")? {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let frame = &buf[..meta.len];
            if !passes(frame, want, a.mac) {
                continue;
            }
            let line = describe(now, frame, meta.truncated);
            if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
                if e.kind() == io::ErrorKind::BrokenPipe {
                    break 'outer;
                }
                return Err(e).context("write to standard output");
            }
            if let Some(w) = pcap.as_mut() {
                let orig = if meta.truncated {
                    SNAPLEN + 1
                } else {
                    meta.len
                };
                w.write_packet(&PcapPacket::new(now, orig as u32, frame))
                    .context("write pcap")?;
            }
            shown += 1;
            if a.count.is_some_and(|c| shown >= c) || stop.load(Ordering::Relaxed) {
                break;
            }
        }
    }
    if let Some(w) = pcap {
        let mut inner = w.into_writer();
        inner.flush().context("flush pcap")?;
    }
    eprintln!("aoe trace: {shown} frames");
    Ok(())
}

/// Whether the frame passes `-t` and `--mac`. A frame too short for the addresses it would
/// be filtered on passes (a malformed frame is worth seeing); one too short for a MAC filter
/// does not.
fn passes(frame: &[u8], want: Option<TargetAddr>, mac: Option<MacAddr>) -> bool {
    if let Some(m) = mac {
        if frame.len() < 12 {
            return false;
        }
        let dst = MacAddr::from_bytes(&frame[0..6]);
        let src = MacAddr::from_bytes(&frame[6..12]);
        if dst != m && src != m {
            return false;
        }
    }
    if let Some(t) = want {
        if let Ok(f) = Frame::new_checked(frame) {
            // A frame to `t`, or a broadcast that reaches it (AoEr11 section 2).
            return f.target().reaches(t);
        }
        return false;
    }
    true
}

/// `HH:MM:SS.micro` of the time of day in UTC, as tcpdump prints it (`-tttt` without the
/// date).
fn clock(t: Duration) -> String {
    let s = t.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        t.subsec_micros()
    )
}

/// One line for a captured frame.
pub fn describe(now: Duration, frame: &[u8], truncated: bool) -> String {
    let mut line = clock(now);
    if frame.len() < 14 {
        let _ = write!(
            line,
            " MALFORMED: {} bytes, shorter than an Ethernet header",
            frame.len()
        );
        return line;
    }
    let dst = MacAddr::from_bytes(&frame[0..6]);
    let src = MacAddr::from_bytes(&frame[6..12]);
    let _ = write!(line, " {src} > {dst}");
    let header = Frame::new_checked(frame).and_then(|f| HeaderRepr::parse(&f));
    if let Ok(h) = &header {
        let _ = write!(
            line,
            " {}.{} tag {} {}",
            h.target.shelf,
            h.target.slot,
            h.tag,
            flags(h)
        );
    }
    if truncated {
        let _ = write!(line, " MALFORMED: longer than {SNAPLEN} bytes, cut");
        return line;
    }
    if let Ok(h) = &header {
        if h.version != AOE_VERSION {
            let _ = write!(line, " MALFORMED: AoE version {}, AoEr11 is 1", h.version);
            return line;
        }
    }
    match Message::parse(frame) {
        Ok(m) => {
            line.push(' ');
            body(&mut line, &m);
        }
        Err(e) => {
            let cmd = header.map(|h| command_name(h.command)).unwrap_or_default();
            let _ = write!(line, " MALFORMED {cmd}: {e}");
        }
    }
    line
}

/// `req`/`rsp`, and the error flag with its code and meaning.
fn flags(h: &HeaderRepr) -> String {
    let mut s = String::from(if h.response { "rsp" } else { "req" });
    if let Some(e) = h.error {
        let _ = write!(s, " error {} ({e})", u8::from(e));
    }
    s
}

fn command_name(c: Command) -> String {
    match c {
        Command::Ata => "ata".into(),
        Command::QueryConfig => "config".into(),
        Command::MacMaskList => "macmask".into(),
        Command::ReserveRelease => "reserve".into(),
        Command::Unknown(v) if c.is_vendor() => format!("vendor-cmd {v:#04x}"),
        Command::Unknown(v) => format!("cmd {v:#04x}"),
    }
}

fn body(line: &mut String, m: &Message<'_>) {
    line.push_str(&command_name(m.header.command));
    match &m.body {
        Body::Ata(a) => ata(line, m.header.response, a),
        Body::Config(c) => config(line, c),
        Body::MacMask(mm) => macmask(line, mm),
        Body::Reserve(r) => reserve(line, r),
        Body::Unknown(p) => {
            let _ = write!(line, " {} payload bytes", p.len());
        }
    }
}

fn ata_name(c: AtaCommand) -> String {
    match c {
        AtaCommand::ReadSectors => "read".into(),
        AtaCommand::ReadSectorsExt => "read-ext".into(),
        AtaCommand::WriteSectors => "write".into(),
        AtaCommand::WriteSectorsExt => "write-ext".into(),
        AtaCommand::Smart => "smart".into(),
        AtaCommand::CheckPowerMode => "check-power".into(),
        AtaCommand::FlushCache => "flush".into(),
        AtaCommand::FlushCacheExt => "flush-ext".into(),
        AtaCommand::IdentifyDevice => "identify".into(),
        AtaCommand::Unknown(v) => format!("cmd {v:#04x}"),
    }
}

/// AFlags as letters (tcpdump `aoev1_aflag_bitmap_str`: E, D, A, W), unknown bits in hex.
fn aflags(f: AtaFlags) -> String {
    let mut s = String::new();
    for (bit, ch) in [
        (AtaFlags::EXTENDED, 'E'),
        (AtaFlags::DEVICE, 'D'),
        (AtaFlags::ASYNC, 'A'),
        (AtaFlags::WRITE, 'W'),
    ] {
        if f.contains(bit) {
            s.push(ch);
        }
    }
    let rest = f.bits() & !AtaFlags::all().bits();
    if rest != 0 {
        let _ = write!(s, "+{rest:#04x}");
    }
    if s.is_empty() {
        s.push('-');
    }
    s
}

/// A request shows the command, LBA and count; a response the status and error registers
/// (the same bytes as command and feature: AoEr11 section 3.1).
fn ata(line: &mut String, response: bool, a: &AtaRepr<'_>) {
    if response {
        let _ = write!(
            line,
            " status {:#04x} error {:#04x} lba {} count {} aflags {} data {}",
            a.cmd_status,
            a.err_feature,
            a.effective_lba(),
            a.sector_count,
            aflags(a.aflags),
            a.data.len()
        );
    } else {
        let _ = write!(
            line,
            " {} lba {} count {} aflags {} feature {:#04x} data {}",
            ata_name(a.command()),
            a.effective_lba(),
            a.sector_count,
            aflags(a.aflags),
            a.err_feature,
            a.data.len()
        );
    }
}

fn config(line: &mut String, c: &ConfigRepr<'_>) {
    let ccmd = match c.ccmd {
        ConfigCommand::Read => "read".into(),
        ConfigCommand::Test => "test".into(),
        ConfigCommand::TestPrefix => "test-prefix".into(),
        ConfigCommand::Set => "set".into(),
        ConfigCommand::ForceSet => "force-set".into(),
        ConfigCommand::Unknown(v) => format!("ccmd {v}"),
    };
    let _ = write!(
        line,
        " {ccmd} bufcnt {} firmware {:#06x} maxsectors {} aoe {} string {:?}",
        c.buffer_count,
        c.firmware_version,
        c.sector_count,
        c.aoe_version,
        String::from_utf8_lossy(c.config)
    );
}

fn macmask(line: &mut String, m: &MacMaskRepr) {
    let mcmd = match m.mcmd {
        MaskCommand::Read => "read".into(),
        MaskCommand::Edit => "edit".into(),
        MaskCommand::Unknown(v) => format!("mcmd {v}"),
    };
    let merror = match m.merror {
        MaskError::None => "none".into(),
        MaskError::Unspecified => "unspecified".into(),
        MaskError::BadDirective => "bad-directive".into(),
        MaskError::ListFull => "list-full".into(),
        MaskError::Unknown(v) => format!("{v}"),
    };
    let _ = write!(line, " {mcmd} merror {merror} directives [");
    for (i, d) in m.directives.iter().enumerate() {
        let dcmd = match d.command {
            DirectiveCommand::NoDirective => "none".into(),
            DirectiveCommand::Add => "add".into(),
            DirectiveCommand::Delete => "delete".into(),
            DirectiveCommand::Unknown(v) => format!("dcmd {v}"),
        };
        let sep = if i > 0 { ", " } else { "" };
        let _ = write!(line, "{sep}{dcmd} {}", d.mac);
    }
    line.push(']');
}

fn reserve(line: &mut String, r: &ReserveRepr) {
    let rcmd = match r.rcmd {
        ReserveCommand::Read => "read".into(),
        ReserveCommand::Set => "set".into(),
        ReserveCommand::ForceSet => "force-set".into(),
        ReserveCommand::Unknown(v) => format!("rcmd {v}"),
    };
    let _ = write!(line, " {rcmd} macs [");
    for (i, m) in r.macs.iter().enumerate() {
        let sep = if i > 0 { ", " } else { "" };
        let _ = write!(line, "{sep}{m}");
    }
    line.push(']');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query_reply() -> Vec<u8> {
        let h = HeaderRepr::request(
            MacAddr([2, 0, 0, 0, 0, 1]),
            MacAddr([2, 0, 0, 0, 0, 2]),
            TargetAddr::new(7, 3),
            Command::QueryConfig,
            aoe_wire::Tag(5),
        )
        .response_to(MacAddr([2, 0, 0, 0, 0, 1]));
        Message {
            header: h,
            body: Body::Config(ConfigRepr {
                buffer_count: 16,
                firmware_version: 0x4019,
                sector_count: 2,
                aoe_version: 1,
                ccmd: ConfigCommand::Read,
                config: b"hi",
            }),
        }
        .to_vec()
        .unwrap()
    }

    #[test]
    fn config_reply_line_names_every_field() {
        let l = describe(Duration::from_secs(3661), &query_reply(), false);
        assert_eq!(
            l,
            "01:01:01.000000 02:00:00:00:00:01 > 02:00:00:00:00:02 7.3 tag 0x00000005 rsp \
             config read bufcnt 16 firmware 0x4019 maxsectors 2 aoe 1 string \"hi\""
        );
    }

    #[test]
    fn truncated_reserve_list_is_malformed() {
        let mut f = query_reply();
        f[19] = 3; // Reserve/Release
        f[24] = 0; // read
        f[25] = 200; // 200 MACs in a 60-byte frame
        let l = describe(Duration::ZERO, &f, false);
        assert!(l.contains("MALFORMED reserve: truncated AoE frame"), "{l}");
    }

    #[test]
    fn filters() {
        let f = query_reply();
        assert!(passes(&f, Some(TargetAddr::new(7, 3)), None));
        assert!(!passes(&f, Some(TargetAddr::new(7, 4)), None));
        assert!(TargetAddr::BROADCAST.reaches(TargetAddr::new(7, 4)));
        assert!(TargetAddr {
            shelf: 7,
            slot: 255
        }
        .reaches(TargetAddr::new(7, 4)));
        assert!(passes(&f, None, Some(MacAddr([2, 0, 0, 0, 0, 1]))));
        assert!(!passes(&f, None, Some(MacAddr([2, 0, 0, 0, 0, 9]))));
    }
}
