//! `aoeping [-i] [-I] [-v] [-s SECS] [-S CMD[:ARG]] [-t TAG] SHELF SLOT NETIF`: a Query Config,
//! then optionally IDENTIFY DEVICE and one SMART command, with raw frames; the output is
//! aoetools' `aoeping.c` (release 36) line for line.
//!
//! Differences, all deliberate: a reply shorter than 60 bytes is accepted (aoetools drops it,
//! so it waits forever for vblade's 32-byte answer on an unpadded veth); requests are the
//! shortest valid frames (aoetools sends a 1056-byte Query Config full of 0xED); a timeout
//! prints a message and exits 1 (aoetools dies of SIGALRM, status 142); Ctrl-C exits 130
//! quietly; `write_log` sets the ATA write flag (aoetools sets bit 0 of the AoE header's
//! flags byte instead); usage errors caught by the parser exit 2, among them a SHELF or SLOT
//! that is not a decimal number naming one target (aoeping reads them with `atoi` and, for
//! junk, a broadcast or an out-of-range address, may wait for ever: see [`parse_shelf`]).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use aoe_wire::{
    AtaFlags, AtaPacket, AtaRepr, Body, Command, ConfigCommand, ConfigRepr, HeaderRepr, MacAddr,
    Message, Tag, TargetAddr,
};
use clap::Args;

use super::{aoe_frame, atoi, hex_print, is_answer, mac_hex, open_socket, recv_until, stop_flag};

/// Ping an AoE target with raw frames: Query Config, and optionally IDENTIFY and SMART.
#[derive(Debug, Args)]
#[command(
    after_help = "Output as aoetools' aoeping. SMART commands: read_data, \
offline_immediate, read_log, write_log (512 bytes from stdin), enable, disable, return_status; \
`CMD:N` puts N in the LBA Low register (e.g. read_log:1).\nWithout -s it waits until an answer \
comes; Ctrl-C ends it (exit 130)."
)]
pub struct PingArgs {
    /// Dump the IDENTIFY DEVICE response as raw hex.
    #[arg(short = 'i')]
    identify_hex: bool,
    /// Print IDENTIFY DEVICE fields (serial, firmware, model).
    #[arg(short = 'I')]
    identify_fields: bool,
    /// Be verbose: the tag, the config query response in hex, the target's MAC.
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    verbose: u8,
    /// Seconds to wait for each answer (default: for ever).
    #[arg(short = 's', value_name = "SECS", allow_hyphen_values = true)]
    timeout: Option<String>,
    /// Perform a SMART command: CMD[:LBA_LOW].
    // The brackets are usage text for --help, not a link.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(short = 'S', value_name = "CMD[:ARG]")]
    smart: Option<String>,
    /// Starting AoE tag (the high bit is always set, as for every user-space AoE tool).
    #[arg(short = 't', value_name = "TAG", allow_hyphen_values = true)]
    tag: Option<String>,
    /// Print one JSON object instead of aoeping's text: the Query Config answer (as
    /// `aoecfg --json`) with the round-trip time, and with -i/-I the IDENTIFY fields, with
    /// -S the SMART registers (and data, hex). Without it the output is aoeping's.
    #[arg(long)]
    json: bool,
    /// Shelf (major) address, 0 to 65534.
    #[arg(value_parser = parse_shelf)]
    shelf: u16,
    /// Slot (minor) address, 0 to 254.
    #[arg(value_parser = parse_slot)]
    slot: u8,
    /// Network interface the target is reachable on.
    netif: String,
}

/// SHELF as a decimal number that names one target. aoeping reads it with `atoi`, so junk
/// (`abc`) pings shelf 0, and 65536 and up are sent wrapped but compared unwrapped with the
/// answer, as is the broadcast shelf 65535: it waits for ever (checked against aoetools 36's
/// aoeping in a namespace). Here each is a usage error instead; every valid address is sent
/// and printed as aoeping does.
fn parse_shelf(s: &str) -> Result<u16, String> {
    address(s, 0xfffe, "65535 is the broadcast shelf")
}

/// SLOT as [`parse_shelf`] reads SHELF: 0 to 254 (255 is the broadcast slot).
fn parse_slot(s: &str) -> Result<u8, String> {
    address(s, 0xfe, "255 is the broadcast slot").map(|v| v as u8)
}

fn address(s: &str, max: u16, broadcast: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(v) if v <= u32::from(max) => Ok(v as u16),
        Ok(v) if v == u32::from(max) + 1 => Err(format!(
            "{broadcast}, which names no one target; use aoecfg to ask every target"
        )),
        _ => Err(format!("not a decimal number from 0 to {max}")),
    }
}

/// aoeping.c `smarts[]`: name, features register, data direction (1 = in, 2 = out).
const SMARTS: [(&str, u8, u8); 7] = [
    ("read_data", 0xd0, 1),
    ("offline_immediate", 0xd4, 0),
    ("read_log", 0xd5, 1),
    ("write_log", 0xd6, 2),
    ("enable", 0xd8, 0),
    ("disable", 0xd9, 0),
    ("return_status", 0xda, 0),
];

/// aoeping.c `smartcmd_lookup`: with a `:`, the first command whose name starts with the text
/// before it (so `read:1` is `read_data`); without, an exact name.
fn smart_lookup(name: &str) -> Option<(u8, u8)> {
    SMARTS.iter().find_map(|&(n, cmd, data)| {
        let hit = match name.find(':') {
            Some(i) => n.starts_with(&name[..i]),
            None => n == name,
        };
        hit.then_some((cmd, data))
    })
}

/// aoeping.c `pp_idtext`: characters up to a NUL or a character that is neither graphic nor
/// a space.
fn idtext(prefix: &str, b: &[u8]) -> String {
    let mut s = String::from(prefix);
    for &c in b {
        if c == 0 || !(c.is_ascii_graphic() || c == b' ') {
            break;
        }
        s.push(c as char);
    }
    s.push('\n');
    s
}

/// aoeping.c `disk_identify` with `-I`: the data swapped byte by byte in pairs, then
/// `hd_driveid` fields read in host (little-endian) order.
pub fn identify_fields(data: &[u8]) -> String {
    let mut d = [0u8; 512];
    let n = data.len().min(512);
    d[..n].copy_from_slice(&data[..n]);
    for w in d.chunks_exact_mut(2) {
        w.swap(0, 1);
    }
    let word = |i: usize| u16::from_le_bytes([d[2 * i], d[2 * i + 1]]);
    let mut s = String::from("device identify fields:\n");
    s.push_str(&format!("vendor_specific_0: 0x{:X}\n", word(7)));
    s.push_str(&format!("vendor_specific_1: 0x{:X}\n", word(8)));
    s.push_str(&format!("vendor_specific_2: 0x{:X}\n", word(9)));
    s.push_str(&idtext("serial_number: ", &d[20..40]));
    s.push_str(&idtext("firmware_rev: ", &d[46..54]));
    s.push_str(&idtext("model: ", &d[54..94]));
    s
}

/// The ATA part of an answer, through aoe-wire's [`AtaPacket`] view; `None` if the frame is
/// too short for it.
fn ata_answer(f: &[u8]) -> Option<AtaPacket<&[u8]>> {
    aoe_frame(f)?;
    AtaPacket::new_checked(&f[aoe_wire::HEADER_LEN..]).ok()
}

struct Pinger {
    sock: aoe_sys::PacketSocket,
    mac: MacAddr,
    buf: Vec<u8>,
    timeout: Option<Duration>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    what: String,
}

impl Pinger {
    /// Sends `frame` once, as aoeping does, and waits for the answer with `tag` from
    /// `shelf.slot`; returns its length in `self.buf`.
    fn exchange(&mut self, frame: &[u8], shelf: u16, slot: u8, tag: u32) -> Result<usize> {
        self.sock.send(frame)?;
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let got = recv_until(&self.sock, &mut self.buf, deadline, &self.stop, |f| {
            is_answer(f, shelf, slot, tag)
                && aoe_frame(f).is_some_and(|h| h.major() == shelf && h.minor() == slot)
        })?;
        match got {
            Some(n) => Ok(n),
            None => bail!(
                "no answer from {} within {} s",
                self.what,
                self.timeout.unwrap_or_default().as_secs()
            ),
        }
    }

    fn ata(&self, dst: MacAddr, addr: TargetAddr, tag: u32, a: AtaRepr<'_>) -> Vec<u8> {
        let h = HeaderRepr::request(dst, self.mac, addr, Command::Ata, Tag(tag));
        Message {
            header: h,
            body: Body::Ata(a),
        }
        .to_vec()
        .expect("an ATA request fits")
    }
}

/// Runs `aoeping`.
pub fn run(a: PingArgs) -> Result<()> {
    let timeout = match &a.timeout {
        Some(s) => {
            let t = atoi(s);
            if t < 1 {
                eprintln!("aoeping Error: timeout seconds must be one or more");
                super::exit_quietly(1);
            }
            Some(Duration::from_secs(t as u64))
        }
        None => None,
    };
    let mut tag = a.tag.as_deref().map_or(0, |t| atoi(t) as u32) | 1 << 31;
    let (shelf, slot) = (a.shelf, a.slot);
    let mut out = std::io::stdout().lock();
    let mut json = serde_json::Map::new();
    if a.verbose > 0 && !a.json {
        write!(
            out,
            "tag: {tag:x}\neth: {}\nshelf: {shelf}\nslot: {slot}\n",
            a.netif
        )?;
        out.flush()?;
    }
    let smart = a.smart.as_deref().and_then(smart_lookup);
    let sock = open_socket(&a.netif)?;
    let mac = MacAddr(sock.info().mac);
    let mut p = Pinger {
        buf: vec![0u8; aoe_sys::frame_capacity(sock.info().mtu).max(2048)],
        sock,
        mac,
        timeout,
        stop: stop_flag()?,
        what: format!("e{shelf}.{slot} on {}", a.netif),
    };
    let addr = TargetAddr::new(shelf, slot);

    // find_blade: a broadcast Query Config (read).
    let q = Message {
        header: HeaderRepr::request(
            MacAddr::BROADCAST,
            mac,
            addr,
            Command::QueryConfig,
            Tag(tag),
        ),
        body: Body::Config(ConfigRepr::request(ConfigCommand::Read, b"")),
    }
    .to_vec()
    .expect("a Query Config request fits");
    let t0 = Instant::now();
    let n = p.exchange(&q, shelf, slot, tag)?;
    let rtt = t0.elapsed();
    tag = tag.wrapping_add(1);
    let answer = aoe_frame(&p.buf[..n]).expect("an AoE answer");
    let target = answer.src();
    if a.json {
        if let serde_json::Value::Object(m) = super::cfg::answer_json(&p.buf[..n]) {
            json.extend(m);
        }
        json.insert("interface".into(), a.netif.clone().into());
        json.insert("rtt_ms".into(), (rtt.as_secs_f64() * 1000.0).into());
    }
    if a.verbose > 0 && !a.json {
        let mut s = String::from("config query response:\n");
        hex_print(&mut s, &p.buf[..n], " ");
        s.push('\n');
        s.push_str(&format!(
            "found e{}.{} with mac {}\n",
            answer.major(),
            answer.minor(),
            mac_hex(&target.0)
        ));
        out.write_all(s.as_bytes())?;
        out.flush()?;
    }

    let mut smartable = false;
    if a.identify_hex || a.identify_fields || a.smart.is_some() {
        // disk_identify: IDENTIFY DEVICE, one sector, device register 0xa0 in LBA byte 3.
        let f = p.ata(
            target,
            addr,
            tag,
            AtaRepr {
                aflags: AtaFlags::empty(),
                err_feature: 0,
                sector_count: 1,
                cmd_status: 0xec,
                lba: 0xa0 << 24,
                data: &[],
            },
        );
        let n = p.exchange(&f, shelf, slot, tag)?;
        let mut data = [0u8; 512];
        let answer = ata_answer(&p.buf[..n]);
        let got = answer.as_ref().map_or(&[][..], |a| a.data());
        let got = &got[..got.len().min(512)];
        data[..got.len()].copy_from_slice(got);
        // Word 82 bit 0: SMART feature set supported (ATA-8 ACS).
        smartable = data[164] & 1 != 0;
        if a.json {
            if let Ok(id) = aoe_wire::Identify::parse(&data) {
                json.insert(
                    "identify".into(),
                    serde_json::json!({
                        "model": id.model,
                        "serial": id.serial,
                        "firmware": id.firmware,
                        "sectors": id.sectors(),
                        "lba48": id.lba48,
                        "smart": smartable,
                    }),
                );
            }
        } else if a.identify_fields {
            out.write_all(identify_fields(&data).as_bytes())?;
        } else if a.identify_hex {
            let mut s = String::from("device identify response:\n");
            hex_print(&mut s, &data, " ");
            out.write_all(s.as_bytes())?;
        }
        out.flush()?;
        tag = tag.wrapping_add(1);
    }

    if let Some(name) = &a.smart {
        if !smartable {
            eprintln!("Error: e{shelf}.{slot} does not support SMART");
            super::exit_quietly(1);
        }
        let Some((feature, dir)) = smart else {
            eprintln!("aoeping Error: no such SMART command: {name}");
            super::exit_quietly(1);
        };
        // smart_registers: features, LBA Mid/High = 0x4f/0xc2 (the SMART signature), and
        // LBA Low from the text after `:` (strtol base 0).
        let lba_low = name
            .find(':')
            .map_or(0, |i| super::strtoul(&name[i + 1..]) as u8);
        let mut data = Vec::new();
        let mut aflags = AtaFlags::empty();
        if dir == 2 {
            let mut d = [0u8; 512];
            let mut stdin = std::io::stdin().lock();
            let mut got = 0;
            while got < 512 {
                match stdin.read(&mut d[got..])? {
                    0 => break,
                    k => got += k,
                }
            }
            data = d.to_vec();
            aflags |= AtaFlags::WRITE;
        }
        let f = p.ata(
            target,
            addr,
            tag,
            AtaRepr {
                aflags,
                err_feature: feature,
                sector_count: u8::from(dir != 0),
                cmd_status: 0xb0,
                lba: u64::from(lba_low) | 0x4f << 8 | 0xc2 << 16,
                data: &data,
            },
        );
        let n = p.exchange(&f, shelf, slot, tag)?;
        // The ATA registers of the answer (show_smart_regs prints them in this order); an
        // answer too short for them reads as zeros.
        let r = ata_answer(&p.buf[..n]);
        let (err, count, status, lba) = r.as_ref().map_or((0, 0, 0, 0), |a| {
            (a.err_feature(), a.sector_count(), a.cmd_status(), a.lba())
        });
        if err & aoe_wire::ata::error_bits::ABRT != 0 {
            eprintln!("SMART command aborted on target.");
            super::exit_quietly(1);
        }
        let regs = [
            ("Features", err),
            ("Sector Count", count),
            ("LBA Low", lba as u8),
            ("LBA Mid", (lba >> 8) as u8),
            ("LBA High", (lba >> 16) as u8),
            ("Status", status),
        ];
        if a.json {
            let mut r = serde_json::Map::new();
            for (name, v) in regs {
                r.insert(name.to_lowercase().replace(' ', "_"), v.into());
            }
            let mut sm = serde_json::json!({ "command": name, "registers": r });
            if dir == 1 {
                let got = ata_answer(&p.buf[..n]);
                let d = got.as_ref().map_or(&[][..], |a| a.data());
                let hex: String = d[..d.len().min(512)]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                sm["data"] = hex.into();
            }
            json.insert("smart".into(), sm);
            writeln!(out, "{}", serde_json::Value::Object(json))?;
            out.flush()?;
            return Ok(());
        }
        let mut s = String::from("ATA registers:\n");
        for (name, v) in regs {
            s.push_str(&format!("{name:>20}: 0x{v:02x}\n"));
        }
        if dir == 1 {
            s.push_str("SMART data:\n");
            let mut d = [0u8; 512];
            let got = r.as_ref().map_or(&[][..], |a| a.data());
            let got = &got[..got.len().min(512)];
            d[..got.len()].copy_from_slice(got);
            hex_print(&mut s, &d, " ");
        }
        out.write_all(s.as_bytes())?;
        out.flush()?;
    }
    if a.json {
        writeln!(out, "{}", serde_json::Value::Object(json))?;
        out.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_names_as_aoeping_looks_them_up() {
        assert_eq!(smart_lookup("read_data"), Some((0xd0, 1)));
        assert_eq!(smart_lookup("read:1"), Some((0xd0, 1)));
        assert_eq!(smart_lookup("read_log:0x01"), Some((0xd5, 1)));
        assert_eq!(smart_lookup("read"), None);
        assert_eq!(smart_lookup("bogus"), None);
    }

    #[test]
    fn identify_text_fields() {
        let mut d = [0u8; 512];
        // Words 10..19: serial "1.2:vm" (ATA strings are byte-swapped per word).
        d[20..26].copy_from_slice(b".1:2mv");
        d[14] = 0x12; // word 7, printed after aoeping's swap as 0x1200
        let s = identify_fields(&d);
        assert!(s.contains("serial_number: 1.2:vm\n"), "{s}");
        assert!(s.contains("vendor_specific_0: 0x1200\n"), "{s}");
    }
}
