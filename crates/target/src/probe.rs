//! The duplicate-address probe: before a new export is announced, ask its segments whether
//! someone already serves its shelf.slot.
//!
//! Two targets with one shelf.slot on a segment are one disk to an initiator: the Linux aoe
//! driver files every Query Config response for e*X*.*Y* under one device and adds each
//! responding MAC as another path to it (`aoecmd_cfg_rsp`, `addtgt`), so reads and writes
//! then land on either disk. vblade does not look; we send a broadcast Query Config
//! (AoEr11 section 3.2, command 1 "read") addressed to the export's own shelf.slot on each of
//! its interfaces and treat an answer from a MAC that is not one of our own interfaces' as
//! a duplicate. Answers from our own MACs do not count: one export served on several
//! interfaces of one switch (multipath) is legitimate. Our own probe heard on another of our
//! interfaces shows the two share a segment, which makes two *different* exports with one
//! shelf.slot on those interfaces a duplicate too.
//!
//! Targets answer a Query Config at once (vblade and the Linux driver's peers answer from
//! their receive path), so the wait is short: [`DEFAULT_PROBE`] covers a loaded host or a
//! switch that learns slowly, and is what a start or a reload with new exports costs.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aoe_sys::{PacketSocket, PollFd};
use aoe_wire::{
    Body, Command, ConfigCommand, ConfigRepr, HeaderRepr, MacAddr, Message, Tag, TargetAddr,
};

use crate::config::ExportSpec;

/// How long the probe waits for answers when none is configured.
pub const DEFAULT_PROBE: Duration = Duration::from_secs(1);

/// Another target answering for one of our addresses, or two of our exports meeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    /// The address served twice.
    pub addr: TargetAddr,
    /// Our interface that heard it.
    pub interface: String,
    /// Who answered (or, for two of our own exports, our interface's MAC that probed).
    pub mac: MacAddr,
    /// True when the other party is another export of this very configuration.
    pub ours: bool,
}

impl std::fmt::Display for Duplicate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ours {
            write!(
                f,
                "{} is configured as two different exports on interfaces that share a segment \
                 (our probe from {} was heard on {})",
                self.addr, self.mac, self.interface
            )
        } else {
            write!(
                f,
                "{} is already served on the segment of {} by {}",
                self.addr, self.interface, self.mac
            )
        }
    }
}

/// Probes for every export of `new` on each of its interfaces and waits `timeout` for
/// answers. `all` is the whole configuration (running and new exports): its interfaces'
/// MACs are ours, and it says which export each (address, interface) belongs to.
pub fn probe(new: &[&ExportSpec], all: &[ExportSpec], timeout: Duration) -> Result<Vec<Duplicate>> {
    if new.is_empty() || timeout.is_zero() {
        return Ok(Vec::new());
    }
    // Every interface of the configuration listens (a probe heard there shows a shared
    // segment); the new exports' interfaces also send.
    let mut names: Vec<&str> = all
        .iter()
        .flat_map(|e| e.interfaces.iter().map(String::as_str))
        .collect();
    names.sort_unstable();
    names.dedup();
    let mut socks = Vec::new();
    let mut own: HashMap<MacAddr, &str> = HashMap::new();
    for name in &names {
        let s = PacketSocket::open(name)
            .with_context(|| format!("cannot open a probe socket on interface {name}"))?;
        own.insert(MacAddr(s.info().mac), name);
        socks.push((*name, s));
    }
    // Bit 31 set: the tag space Linux leaves to user-space tools (aoecmd.c newtag).
    let tag = Tag(0x8000_0000 | (std::process::id() & 0x7fff_0000) | 0x0d0b);
    for spec in new {
        for (name, s) in socks
            .iter()
            .filter(|(n, _)| spec.interfaces.iter().any(|i| i == n))
        {
            let h = HeaderRepr::request(
                MacAddr::BROADCAST,
                MacAddr(s.info().mac),
                spec.addr(),
                Command::QueryConfig,
                tag,
            );
            let body = Body::Config(ConfigRepr::request(ConfigCommand::Read, b""));
            let frame = Message { header: h, body }
                .to_vec()
                .context("cannot build the probe frame")?;
            s.send(&frame)
                .with_context(|| format!("cannot send the probe on interface {name}"))?;
        }
    }
    // Which export (index in `all`) serves each address on each interface.
    let owner = |addr: TargetAddr, iface: &str| {
        all.iter()
            .position(|e| e.addr() == addr && e.interfaces.iter().any(|i| i == iface))
    };
    let wanted: HashSet<TargetAddr> = new.iter().map(|e| e.addr()).collect();
    let mut found = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 9216];
    loop {
        for (name, s) in &socks {
            while let Some(meta) = s.recv(&mut buf).context("probe receive")? {
                let Ok(m) = Message::parse(&buf[..meta.len.min(buf.len())]) else {
                    continue;
                };
                let h = m.header;
                if h.command != Command::QueryConfig || h.tag != tag || !wanted.contains(&h.target)
                {
                    continue;
                }
                let d = match own.get(&h.src) {
                    // Another machine answered.
                    None if h.response => Duplicate {
                        addr: h.target,
                        interface: name.to_string(),
                        mac: h.src,
                        ours: false,
                    },
                    // Our probe from interface `from`, heard on `name`: the two share a
                    // segment. A duplicate if different exports hold the address there.
                    Some(from) if !h.response && from != name => {
                        match (owner(h.target, from), owner(h.target, name)) {
                            (Some(a), Some(b)) if a != b => Duplicate {
                                addr: h.target,
                                interface: name.to_string(),
                                mac: h.src,
                                ours: true,
                            },
                            _ => continue,
                        }
                    }
                    _ => continue,
                };
                if !found.contains(&d) {
                    found.push(d);
                }
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(found);
        }
        let mut fds: Vec<PollFd> = socks
            .iter()
            .map(|(_, s)| PollFd::new(s.as_raw_fd()))
            .collect();
        aoe_sys::poll(&mut fds, Some(deadline - now)).context("probe poll")?;
    }
}
