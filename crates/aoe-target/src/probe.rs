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
//!
//! A target that comes up after us is not seen by that probe, so the running daemon repeats
//! it every `conflict_check_s` ([`Probe::start_watch`], the daemon's conflict watch): there
//! a duplicate is warned about and shown, not refused.

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

/// The longest probe a configuration may ask for: ten times what a loaded segment needs
/// ([`DEFAULT_PROBE`]); beyond it a start only waits longer (unstoppable at start: the
/// probe runs before the daemon's loop reads SIGTERM).
pub const MAX_PROBE: Duration = Duration::from_secs(10);

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

/// A probe in progress: frames sent, answers collected as they come. The daemon polls
/// [`fds`](Self::fds) next to its serving sockets, so running exports keep being served
/// during the wait of a reload.
pub struct Probe {
    socks: Vec<(String, PacketSocket)>,
    own: HashMap<MacAddr, String>,
    tag: Tag,
    wanted: HashSet<TargetAddr>,
    /// Each export of the whole configuration: its address and interfaces.
    exports: Vec<(TargetAddr, Vec<String>)>,
    deadline: Instant,
    found: Vec<Duplicate>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("wanted", &self.wanted)
            .field("found", &self.found)
            .finish_non_exhaustive()
    }
}

impl Probe {
    /// Sends a probe for every export of `new` on each of its interfaces. `all` is the whole
    /// configuration (running and new exports): its interfaces' MACs are ours, and it says
    /// which export each (address, interface) belongs to. `None`: nothing to probe (no new
    /// export, or a zero `timeout`).
    pub fn start(
        new: &[&ExportSpec],
        all: &[ExportSpec],
        timeout: Duration,
    ) -> Result<Option<Probe>> {
        Self::start_with(new, all, timeout, PacketSocket::open)
    }

    /// [`start`](Self::start) on sockets that take AoE responses only
    /// ([`PacketSocket::open_responses`]): finds other targets answering for `new`'s
    /// addresses, not two of our own exports meeting. A reload's take-over wait probes so
    /// (`daemon/exports.rs`, `TakingOver`), from the loop, for up to 30 s.
    pub fn start_responses(
        new: &[&ExportSpec],
        all: &[ExportSpec],
        timeout: Duration,
    ) -> Result<Option<Probe>> {
        Self::start_with(new, all, timeout, PacketSocket::open_responses)
    }

    /// The periodic re-check of a running daemon (its conflict watch, `daemon/conflict.rs`):
    /// probes every export of `all`, on sockets whose kernel filter takes AoE responses only
    /// ([`PacketSocket::open_responses`]), so the initiators' requests that arrive while it
    /// waits are not copied to it. It finds other targets answering, not two of our own
    /// exports meeting (that needs our probe, a request, heard on another interface: the
    /// start and reload probe's job).
    pub fn start_watch(all: &[ExportSpec], timeout: Duration) -> Result<Option<Probe>> {
        let new: Vec<&ExportSpec> = all.iter().collect();
        Self::start_with(&new, all, timeout, PacketSocket::open_responses)
    }

    fn start_with(
        new: &[&ExportSpec],
        all: &[ExportSpec],
        timeout: Duration,
        open: fn(&str) -> std::io::Result<PacketSocket>,
    ) -> Result<Option<Probe>> {
        if new.is_empty() || timeout.is_zero() {
            return Ok(None);
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
        let mut own = HashMap::new();
        for name in &names {
            let s = open(name)
                .with_context(|| format!("cannot open a probe socket on interface {name}"))?;
            own.insert(MacAddr(s.info().mac), name.to_string());
            socks.push((name.to_string(), s));
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
        Ok(Some(Probe {
            socks,
            own,
            tag,
            wanted: new.iter().map(|e| e.addr()).collect(),
            exports: all
                .iter()
                .map(|e| (e.addr(), e.interfaces.clone()))
                .collect(),
            deadline: Instant::now() + timeout,
            found: Vec::new(),
            buf: vec![0u8; 9216],
        }))
    }

    /// When the wait is over.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The probe's sockets, to poll for input.
    pub fn fds(&self) -> Vec<PollFd> {
        self.socks
            .iter()
            .map(|(_, s)| PollFd::new(s.as_raw_fd()))
            .collect()
    }

    /// Which export of the configuration serves `addr` on `iface`.
    fn owner(&self, addr: TargetAddr, iface: &str) -> Option<usize> {
        self.exports
            .iter()
            .position(|(a, ifs)| *a == addr && ifs.iter().any(|i| i == iface))
    }

    /// Takes in what arrived, without waiting.
    pub fn collect(&mut self) -> Result<()> {
        for k in 0..self.socks.len() {
            while let Some(meta) = self.socks[k]
                .1
                .recv(&mut self.buf)
                .context("probe receive")?
            {
                let Ok(m) = Message::parse(&self.buf[..meta.len.min(self.buf.len())]) else {
                    continue;
                };
                let h = m.header;
                if h.command != Command::QueryConfig
                    || h.tag != self.tag
                    || !self.wanted.contains(&h.target)
                {
                    continue;
                }
                let name = &self.socks[k].0;
                let d = match self.own.get(&h.src) {
                    // Another machine answered.
                    None if h.response => Duplicate {
                        addr: h.target,
                        interface: name.clone(),
                        mac: h.src,
                        ours: false,
                    },
                    // Our probe from interface `from`, heard on `name`: the two share a
                    // segment. A duplicate if different exports hold the address there.
                    Some(from) if !h.response && from != name => {
                        match (self.owner(h.target, from), self.owner(h.target, name)) {
                            (Some(a), Some(b)) if a != b => Duplicate {
                                addr: h.target,
                                interface: name.clone(),
                                mac: h.src,
                                ours: true,
                            },
                            _ => continue,
                        }
                    }
                    _ => continue,
                };
                if !self.found.contains(&d) {
                    self.found.push(d);
                }
            }
        }
        Ok(())
    }

    /// What the probe found.
    pub fn finish(self) -> Vec<Duplicate> {
        self.found
    }
}

/// Probes for every export of `new` (see [`Probe::start`]) and waits `timeout` for
/// answers.
pub fn probe(new: &[&ExportSpec], all: &[ExportSpec], timeout: Duration) -> Result<Vec<Duplicate>> {
    let Some(mut p) = Probe::start(new, all, timeout)? else {
        return Ok(Vec::new());
    };
    loop {
        p.collect()?;
        let now = Instant::now();
        if now >= p.deadline() {
            return Ok(p.finish());
        }
        aoe_sys::poll(&mut p.fds(), Some(p.deadline() - now)).context("probe poll")?;
    }
}
