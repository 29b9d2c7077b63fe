//! `aoe-sancheck [-v]`: checks every interface and every path to every AoE device with raw
//! frames, the way aoetools' `aoe-sancheck.c` does; needs no initiator.
//!
//! How aoetools finds a path that cannot carry the payload: on each interface it broadcasts
//! a Query Config (tag `0x80000000`), and for each new answer (shelf, slot, target MAC) sends
//! IDENTIFY DEVICE requests padded to every payload size the local MTU allows, from
//! `(mtu - 36) & ~511` bytes down to 512, the tag carrying a per-path id (`tag >> 16`) and the
//! size in sectors (`tag & 0xff`). A switch or port with a smaller MTU drops the large ones;
//! the largest answered size is what the path can carry. It stops 5 s after the last useful
//! answer. The report is its `printsancheck`: an interface summary, then one line per device
//! (`eX.Y`, number of target MACs, the target's advertised payload, local interfaces) and
//! the warnings: mismatched local vs remote interface counts, `The path IF->MAC is only
//! capable of N byte payloads` (when the largest answered size is below `(mtu - 32) / 512`
//! sectors), an MTU too small for the advertised payload, and MTUs that differ between the
//! interfaces reaching one device. With `-v`, each interface's paths.
//!
//! Difference: aoetools only probes interfaces whose name starts with `eth` (its `ethlist`);
//! this probes every non-loopback interface, in name order. Give interfaces `eth` names to
//! compare the two.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;
use aoe_sys::PacketSocket;
use aoe_wire::{
    AtaRepr, Body, Command, ConfigCommand, ConfigPacket, ConfigRepr, HeaderRepr, MacAddr, Message,
    Tag, TargetAddr,
};
use clap::Args;

use super::{aoe_frame, json_str, mac_hex, stop_flag};

/// Check interfaces and paths to AoE devices: status, MTU, payload each path carries.
#[derive(Debug, Args)]
pub struct SancheckArgs {
    /// Also list each interface's paths (device, target MAC, largest sectors answered).
    #[arg(short = 'v')]
    verbose: bool,
    /// Print JSON instead of aoetools' report.
    #[arg(long)]
    json: bool,
    /// Seconds to wait after the last useful answer (aoetools: 5), 1 to 3600.
    #[arg(long, default_value_t = 5, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    wait: u64,
}

/// One path: a target MAC answering for shelf.slot on a local interface (aoetools' `Lun`).
#[derive(Debug, Clone)]
struct Lun {
    mac: [u8; 6],
    id: u32,
    /// Sectors per frame the target advertised (Query Config `scnt`).
    nsect: u32,
    /// Largest probe size (sectors) answered.
    maxsect: u32,
}

struct Eth {
    name: String,
    up: bool,
    mtu: u32,
    pci: String,
    sock: Option<PacketSocket>,
    /// Keyed by (shelf, slot, mac).
    luns: BTreeMap<(u16, u8, [u8; 6]), Lun>,
}

impl Eth {
    /// The answers from `shelf.slot` on this interface, one per target MAC, highest MAC
    /// first (the order aoetools walks its list in).
    fn luns_of(&self, shelf: u16, slot: u8) -> impl Iterator<Item = (&(u16, u8, [u8; 6]), &Lun)> {
        self.luns
            .iter()
            .rev()
            .filter(move |(k, _)| k.0 == shelf && k.1 == slot)
    }
}

/// aoetools' `getpciid`: `/sys/class/net/IF/device/{vendor,device}` without the `0x`.
fn pci_id(name: &str) -> String {
    let read = |f: &str| -> Option<String> {
        let s = std::fs::read_to_string(format!("/sys/class/net/{name}/device/{f}")).ok()?;
        s.get(2..6).map(str::to_string)
    };
    match (read("vendor"), read("device")) {
        (Some(v), Some(d)) => format!("{v}:{d}"),
        _ => String::new(),
    }
}

/// A device's summary line and warnings (aoetools' `sancheck(maj, min)`).
struct Report {
    shelf: u16,
    slot: u8,
    macs: usize,
    payload: u32,
    ifs: Vec<String>,
    warnings: Vec<String>,
    paths: Vec<(String, [u8; 6], u32)>,
}

fn check(eths: &[Eth], shelf: u16, slot: u8) -> Report {
    let (mut mtu, mut nsect) = (0u32, 0u32);
    let mut macs: Vec<[u8; 6]> = Vec::new();
    let mut ifs = Vec::new();
    let mut paths = Vec::new();
    for e in eths {
        let mut found = false;
        for l in e.luns_of(shelf, slot) {
            found = true;
            mtu = if mtu == 0 { e.mtu } else { mtu.max(e.mtu) };
            if !macs.contains(&l.1.mac) {
                macs.push(l.1.mac);
            }
            nsect = l.1.nsect;
            paths.push((e.name.clone(), l.1.mac, l.1.maxsect * 512));
        }
        if found {
            ifs.push(e.name.clone());
        }
    }
    let mut warnings = Vec::new();
    if macs.len() != ifs.len() {
        warnings.push("Mismatched number of local vs remote interfaces".to_string());
    }
    for e in eths {
        let mut found = false;
        for l in e.luns_of(shelf, slot) {
            found = true;
            if l.1.maxsect < e.mtu.saturating_sub(32) / 512 {
                warnings.push(format!(
                    "The path {}->{} is only capable of {} byte payloads",
                    e.name,
                    mac_hex(&l.1.mac),
                    l.1.maxsect * 512
                ));
            }
        }
        if found {
            if e.mtu < nsect * 512 + 36 {
                warnings.push(format!(
                    "{}: MTU ({}) not set optimally for device's capable payload",
                    e.name, e.mtu
                ));
            }
            if e.mtu < mtu {
                warnings.push(format!(
                    "{}: MTU different from other interfaces ({} vs. {})",
                    e.name, e.mtu, mtu
                ));
            }
        }
    }
    Report {
        shelf,
        slot,
        macs: macs.len(),
        payload: nsect * 512,
        ifs,
        warnings,
        paths,
    }
}

/// Sends aoetools' `jprobe`: IDENTIFY requests padded to each payload size the MTU allows.
fn probe(e: &Eth, shelf: u16, slot: u8, l: &Lun) {
    let Some(sock) = &e.sock else { return };
    let mut n = (e.mtu as usize).saturating_sub(36) & !511;
    while n > 0 {
        // IDENTIFY DEVICE of one sector, the frame padded with zeros to carry `n` bytes.
        let mut f = vec![0u8; aoe_wire::ATA_HEADER_LEN + n];
        let tag = Tag((l.id << 16) | (n / 512) as u32);
        let header = HeaderRepr::request(
            MacAddr(l.mac),
            MacAddr(sock.info().mac),
            TargetAddr::new(shelf, slot),
            Command::Ata,
            tag,
        );
        let body = Body::Ata(AtaRepr {
            aflags: aoe_wire::AtaFlags::empty(),
            err_feature: 0,
            sector_count: 1,
            cmd_status: 0xec,
            lba: 0,
            data: &[],
        });
        Message { header, body }
            .emit(&mut f)
            .expect("an IDENTIFY request fits its padded frame");
        if let Err(err) = sock.send(&f) {
            eprintln!("{}: write failed: {err}", e.name);
        }
        std::thread::sleep(Duration::from_micros(100));
        n -= 512;
    }
}

/// Runs `aoe-sancheck`.
pub fn run(a: SancheckArgs) -> Result<()> {
    let stop = stop_flag()?;
    let mut infos: Vec<_> = aoe_sys::list_interfaces()?
        .into_iter()
        .filter(|i| !i.loopback)
        .collect();
    infos.sort_by(|x, y| x.name.cmp(&y.name));
    if !a.json {
        print!("Probing...");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
    let mut eths: Vec<Eth> = infos
        .into_iter()
        .map(|i| {
            let sock = match PacketSocket::open(&i.name) {
                Ok(s) => Some(s),
                Err(err) => {
                    eprintln!("skipping {}: {err}", i.name);
                    None
                }
            };
            if let Some(s) = &sock {
                let _ = s.set_recv_buffer(4 << 20);
            }
            Eth {
                pci: pci_id(&i.name),
                name: i.name,
                up: i.up,
                mtu: i.mtu,
                sock,
                luns: BTreeMap::new(),
            }
        })
        .collect();
    // discover: a broadcast Query Config, tag 0x80000000, padded to 60 bytes.
    for e in &mut eths {
        let Some(sock) = &e.sock else { continue };
        let header = HeaderRepr::request(
            MacAddr::BROADCAST,
            MacAddr(sock.info().mac),
            TargetAddr::new(0xffff, 0xff),
            Command::QueryConfig,
            Tag(0x8000_0000),
        );
        let body = Body::Config(ConfigRepr::request(ConfigCommand::Read, b""));
        let f = Message { header, body }
            .to_vec()
            .expect("a Query Config request fits");
        if let Err(err) = sock.send(&f) {
            eprintln!("skipping {}, discover failure: {err}", e.name);
            e.sock = None;
        }
    }
    let mut next_id = 0u32;
    let wait = Duration::from_secs(a.wait);
    let mut last = Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    while last.elapsed() < wait {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            super::exit_quietly(130);
        }
        let mut fds: Vec<aoe_sys::PollFd> = eths
            .iter()
            .filter_map(|e| e.sock.as_ref())
            .map(|s| aoe_sys::PollFd::new(std::os::fd::AsRawFd::as_raw_fd(s)))
            .collect();
        if fds.is_empty() {
            break;
        }
        let left = wait.saturating_sub(last.elapsed());
        let _ = aoe_sys::poll(&mut fds, Some(left.min(Duration::from_millis(100))));
        for e in eths.iter_mut() {
            while let Some(sock) = &e.sock {
                let Ok(Some(meta)) = sock.recv(&mut buf) else {
                    break;
                };
                let f = &buf[..meta.len];
                // jinput: responses without error, tag high bit set.
                let Some(h) = aoe_frame(f) else {
                    continue;
                };
                if !h.is_response() || h.is_error() || h.tag().0 & 0x8000_0000 == 0 {
                    continue;
                }
                let (shelf, slot, mac, tag) = (h.major(), h.minor(), h.src().0, h.tag().0);
                let key = (shelf, slot, mac);
                match h.command() {
                    Command::QueryConfig => {
                        let Ok(c) = ConfigPacket::new_checked(h.payload()) else {
                            continue;
                        };
                        if e.luns.contains_key(&key) {
                            continue;
                        }
                        let l = Lun {
                            mac,
                            id: 0x8000 | next_id,
                            nsect: u32::from(c.sector_count()),
                            maxsect: 0,
                        };
                        next_id += 1;
                        probe(e, shelf, slot, &l);
                        e.luns.insert(key, l);
                        last = Instant::now();
                    }
                    Command::Ata => {
                        let Some(l) = e.luns.get_mut(&key) else {
                            continue;
                        };
                        if l.id != tag >> 16 {
                            continue;
                        }
                        l.maxsect = l.maxsect.max(tag & 0xff);
                        last = Instant::now();
                    }
                    _ => {}
                }
            }
        }
    }
    let mut targets: Vec<(u16, u8)> = eths
        .iter()
        .flat_map(|e| e.luns.keys().map(|k| (k.0, k.1)))
        .collect();
    targets.sort();
    targets.dedup();
    let reports: Vec<Report> = targets.iter().map(|&(s, l)| check(&eths, s, l)).collect();
    let mut o = String::new();
    if a.json {
        o.push_str("{\"interfaces\":[");
        for (i, e) in eths.iter().enumerate() {
            let _ = write!(
                o,
                "{}{{\"name\":{},\"up\":{},\"mtu\":{},\"pci_id\":{}}}",
                if i > 0 { "," } else { "" },
                json_str(&e.name),
                e.up,
                e.mtu,
                json_str(&e.pci)
            );
        }
        o.push_str("],\"devices\":[");
        for (i, r) in reports.iter().enumerate() {
            let paths: Vec<String> = r
                .paths
                .iter()
                .map(|(n, m, p)| {
                    format!(
                        "{{\"netif\":{},\"mac\":{},\"max_payload\":{p}}}",
                        json_str(n),
                        json_str(&mac_hex(m))
                    )
                })
                .collect();
            let _ = write!(
                o,
                "{}{{\"device\":\"e{}.{}\",\"macs\":{},\"payload\":{},\"interfaces\":[{}],\
                 \"paths\":[{}],\"warnings\":[{}]}}",
                if i > 0 { "," } else { "" },
                r.shelf,
                r.slot,
                r.macs,
                r.payload,
                r.ifs
                    .iter()
                    .map(|s| json_str(s))
                    .collect::<Vec<_>>()
                    .join(","),
                paths.join(","),
                r.warnings
                    .iter()
                    .map(|s| json_str(s))
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
        o.push_str("]}\n");
    } else {
        let bar = "==========================================\n";
        o.push_str("done.\n");
        o.push_str(bar);
        o.push_str("INTERFACE SUMMARY\n");
        o.push_str(bar);
        o.push_str("Name\tStatus\tMTU\tPCI ID\n");
        for e in &eths {
            let _ = writeln!(
                o,
                "{}\t{}\t{}\t{}",
                e.name,
                if e.up { "UP" } else { "DN" },
                e.mtu,
                e.pci
            );
        }
        o.push_str(bar);
        o.push_str("DEVICE SUMMARY\n");
        o.push_str(bar);
        o.push_str("Device\tMacs\tPayload\tLocal Interfaces\n");
        for r in &reports {
            let _ = writeln!(
                o,
                "e{}.{}\t{:4}\t{}\t{}",
                r.shelf,
                r.slot,
                r.macs,
                r.payload,
                r.ifs.join(",")
            );
            for w in &r.warnings {
                let _ = writeln!(o, "   {w}");
            }
        }
        if a.verbose {
            for e in &eths {
                let _ = writeln!(o, "{}:", e.name);
                // aoetools keeps each interface's paths in descending order.
                for (k, l) in e.luns.iter().rev() {
                    let _ = writeln!(o, "e{}.{} {} {}", k.0, k.1, mac_hex(&l.mac), l.maxsect);
                }
                o.push('\n');
            }
        }
    }
    print!("{o}");
    Ok(())
}
