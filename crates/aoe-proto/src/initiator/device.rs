//! A device's state (lifecycle, targets, payload) and the operations and frames in flight.

use super::*;

/// The device's lifecycle (the driver's `DEVFL_UP`; identifying = up not yet set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Life {
    Identifying,
    Up,
    Down,
}

#[derive(Debug)]
pub(super) struct Device {
    pub(super) addr: TargetAddr,
    pub(super) life: Life,
    pub(super) open: bool,
    pub(super) targets: Vec<Target>,
    pub(super) next_target: usize,
    pub(super) identify: Option<IdentifyInfo>,
    /// The raw IDENTIFY page of the latest answer (`d->ident`); empty before one.
    pub(super) identify_page: Vec<u8>,
    pub(super) sectors: u64,
    pub(super) lba48: bool,
    pub(super) firmware_version: u16,
    pub(super) config: Vec<u8>,
    /// Sectors per frame: min over all paths (`maxbcnt`).
    pub(super) payload: u8,
    /// Operations with frames not yet sent: per source, each in submission order
    /// ([`Queues`]).
    pub(super) queue: Queues,
    /// Frames (keys of `Engine::outstanding`) whose next copy waits for a free window slot
    /// (the driver's `rexmitq`); sent before any new frame.
    pub(super) rexmitq: VecDeque<u32>,
    pub(super) stats: DeviceStats,
    /// A revalidate's IDENTIFY is pending: its answer emits [`Event::Revalidated`].
    pub(super) revalidating: bool,
    /// When a response from another MAC than the frame's was last logged, and how many
    /// were not logged since (the log is rate-limited like `pr_err_ratelimited`).
    pub(super) other_mac_logged: Option<Instant>,
    pub(super) other_mac_unlogged: u64,
    /// When a change of the data frame size that a config response caused was last logged,
    /// and how many were not logged since: a peer alternating its sector count in config
    /// responses changes it with every frame it sends ([`Config::peer_log_interval`]).
    pub(super) payload_logged: Option<Instant>,
    pub(super) payload_unlogged: u64,
    /// When a size change was last logged, and the changes since that were not: a peer
    /// answering the IDENTIFYs an unopened device gets after each config response can
    /// change its size with every answer (`identify_done`).
    pub(super) size_logged: Option<Instant>,
    pub(super) size_unlogged: u64,
}

impl Device {
    pub(super) fn new(addr: TargetAddr) -> Device {
        Device {
            addr,
            life: Life::Down,
            open: false,
            targets: Vec::new(),
            next_target: 0,
            identify: None,
            identify_page: Vec::new(),
            sectors: 0,
            lba48: false,
            firmware_version: 0,
            config: Vec::new(),
            payload: 0,
            queue: Queues::default(),
            rexmitq: VecDeque::new(),
            stats: DeviceStats::default(),
            revalidating: false,
            other_mac_logged: None,
            other_mac_unlogged: 0,
            payload_logged: None,
            payload_unlogged: 0,
            size_logged: None,
            size_unlogged: 0,
        }
    }

    pub(super) fn target_idx(&self, mac: MacAddr) -> Option<usize> {
        self.targets.iter().position(|t| t.mac == mac)
    }

    /// `setdbcnt`: the payload is the minimum over every path. The driver takes it over
    /// every target MAC; here only over the MACs that are paths ([`Vet::Path`]): one being
    /// asked IDENTIFY, or refused as another disk, never gets the device's frames, so its
    /// sector count (a hostile peer's 1, or a second target on a 1500-byte port of a 9000
    /// segment) must not shrink the frames that go to the real paths.
    pub(super) fn recompute_payload(&mut self) -> Option<String> {
        let min = self
            .targets
            .iter()
            .filter(|t| t.vet == Vet::Path)
            .flat_map(|t| t.paths.iter().map(|p| p.sectors))
            .min()
            .unwrap_or(0);
        if min != self.payload {
            self.payload = min;
            return Some(format!(
                "{}: setting {} byte data frames",
                self.addr,
                min as usize * SECTOR_SIZE
            ));
        }
        None
    }

    /// Takes out a target MAC that is not a path and is not being asked IDENTIFY, to make
    /// room for a new one at [`Config::max_targets`]: one refused as another disk first,
    /// else one left pending while the device is up (every IDENTIFY it was sent went
    /// unanswered). Paths, and MACs whose IDENTIFY is out or that wait for the device to
    /// come up, stay. Nothing refers to a target by index across calls but `next_target`,
    /// which keeps pointing at the same target. The driver has no cap (`addtgt` grows
    /// its array), so it never needs this. Returns the MAC taken out.
    pub(super) fn forget_idle_target(&mut self) -> Option<MacAddr> {
        let refused = self
            .targets
            .iter()
            .position(|t| matches!(t.vet, Vet::Refused { .. }));
        let i = refused.or_else(|| {
            (self.life == Life::Up)
                .then(|| self.targets.iter().position(|t| t.vet == Vet::Pending))
                .flatten()
        })?;
        if self.next_target > i {
            self.next_target -= 1;
        }
        Some(self.targets.remove(i).mac)
    }

    /// `aoecmd_cleanslate` (revalidate): every target's RTT estimate and window start over,
    /// and the payload is forgotten until the next Query Config response sets it again
    /// (`maxbcnt = 0`; meanwhile frames carry the driver's `DEFAULTBCNT`, 2 sectors, or
    /// less if a path cannot carry that much).
    pub(super) fn cleanslate(&mut self) {
        for t in &mut self.targets {
            t.reset_rtt();
            t.wreset();
        }
        self.payload = self.payload.min(DEFAULT_SECTORS);
    }

    /// `newframe`: the next target (round-robin) with room in its window, skipping tainted
    /// targets unless every usable one is tainted.
    pub(super) fn pick_target(&mut self) -> Option<usize> {
        let n = self.targets.len();
        let all_tainted = self
            .targets
            .iter()
            .filter(|t| t.usable())
            .all(|t| t.taint > 0);
        for k in 0..n {
            let i = (self.next_target + k) % n;
            let t = &self.targets[i];
            if t.usable() && t.nout < t.maxout && (t.taint == 0 || all_tainted) {
                self.next_target = i + 1;
                return Some(i);
            }
        }
        None
    }

    pub(super) fn state(&self) -> DeviceState {
        match (self.life, self.open) {
            (Life::Up, _) => DeviceState::Up,
            (_, true) => DeviceState::DownCloseWait,
            (_, false) => DeviceState::Down,
        }
    }
}

#[derive(Debug)]
pub(super) enum OpKind {
    Read(Vec<u8>),
    /// Shared with the frames carrying it ([`TxData`]) until they are sent.
    Write(Arc<Lent>),
    Flush,
    /// Internal: IDENTIFY DEVICE at discovery or revalidation.
    Identify,
    /// Internal: a one-sector read to see whether a tainted target answers again.
    Probe,
    /// Internal: IDENTIFY DEVICE sent to one new target MAC of a device already up, whose
    /// answer decides whether it becomes a path ([`Vet`], `Engine::vet_targets`).
    Verify,
}

impl OpKind {
    pub(super) fn internal(&self) -> bool {
        matches!(self, OpKind::Identify | OpKind::Probe | OpKind::Verify)
    }
}

#[derive(Debug)]
pub(super) struct Op {
    pub(super) dev: TargetAddr,
    /// Whose op it is: its lane in the device's queue.
    pub(super) source: SourceId,
    pub(super) kind: OpKind,
    pub(super) lba: u64,
    /// Sectors in all (1 for non-data commands, so one frame is sent).
    pub(super) sectors: u64,
    /// Sectors handed to frames so far.
    pub(super) issued: u64,
    /// (offset, sectors) ranges taken back from frames too large for the path they were to
    /// be retransmitted on (its MTU shrank under them); sent again before `issued` moves.
    pub(super) reissue: Vec<(u64, u64)>,
    /// Frames sent and not answered.
    pub(super) frames_out: u32,
    /// Held back at least once by a fence (`Engine::pick_queued`), counted in
    /// [`Stats::writes_fenced`].
    pub(super) fenced: bool,
    /// Where a [`BlockOp::ReadInto`] buffer goes if the read fails.
    pub(super) home: ReadHome,
    /// A [`BlockOp::ReadHeld`]'s parts left in the driver's frames and those given up
    /// (None: any other op; its `buf` unused until completion, the op's own buffer holds
    /// the frames handed in without a token).
    pub(super) held: Option<HeldRead>,
}

/// Where a [`BlockOp::ReadInto`] buffer goes if the read fails (none for other ops).
#[derive(Default)]
pub(super) struct ReadHome(pub(super) Option<LentHome>);

impl fmt::Debug for ReadHome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "ReadHome(lent)"
        } else {
            "ReadHome(none)"
        })
    }
}

impl Op {
    /// True while some of the op's sectors still wait for a frame.
    pub(super) fn unsent(&self) -> bool {
        self.issued < self.sectors || !self.reissue.is_empty()
    }
}

/// One frame outstanding, keyed by its tag (the driver's `struct frame`).
#[derive(Debug, Clone)]
pub(super) struct Outstanding {
    pub(super) dev: TargetAddr,
    pub(super) op: u64,
    pub(super) target: MacAddr,
    pub(super) iface: usize,
    /// Sector offset within the op.
    pub(super) offset: u64,
    pub(super) count: u8,
    pub(super) sent: Instant,
    pub(super) first_sent: Instant,
    pub(super) deadline: Instant,
    pub(super) retransmits: u32,
    /// Send order at the target (`Target::next_seq`) of this copy.
    pub(super) seq: u64,
    /// Answers to frames sent to the same target after this copy (fast retransmit).
    pub(super) later_answered: u16,
    /// This copy was sent because its target fell silent for a whole timeout
    /// (`Engine::frame_timed_out`): its answer says the target is alive, not that the
    /// frames sent before it are lost (`Engine::later_frame_answered`).
    pub(super) after_silence: bool,
    /// Tags and send times of earlier copies sent to the same target MAC: an answer to one
    /// of them completes the frame too (`Engine::answered_frame`).
    pub(super) earlier: Vec<(u32, Instant)>,
    /// Set while the frame's next copy waits for a window slot (`Device::rexmitq`): the
    /// frame's last copy, under this frame's key, is then held (`Engine::held`), and
    /// `target`, `iface`, `sent` and `seq` are that copy's.
    pub(super) waiting: Option<CopyWhy>,
}

/// Why a frame's next copy is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CopyWhy {
    /// Its last copy's timer ran out: the copy goes to another target if one has room,
    /// with its timeout doubled.
    Timeout,
    /// Later frames to the same target were answered first (fast retransmit).
    LaterAnswered,
    /// The target answered nothing for a probe timeout while nothing more was to go to it:
    /// a copy of the latest frame out there, whose answer reveals the others lost
    /// (`Engine::tail_probes`).
    TailProbe,
    /// The interface its last copy went out on (or the only one its target is reached
    /// through) came back up while the target had answered nothing since: that copy went
    /// into a dead link (`Engine::link_back`). Due at once, to the same target first,
    /// with the target's timeout not backed off.
    LinkUp,
}

/// What [`Engine::resized`](super::Engine) counts for one target of a device since the
/// payload shrank: frames sized before, how many of them the target refused (aborted), and
/// the sectors they carried that went out again in new frames.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Resized {
    pub(super) frames: u32,
    pub(super) refused: u32,
    pub(super) sectors: u64,
}

/// A copy of a frame the target may still hold although it no longer stands for the frame
/// (another copy replaced it, or the frame completed on another copy's answer). It keeps its
/// slot in its target's window (`Target::nout`) until its own answer comes or it is presumed
/// lost: at `due` if the target has since answered a frame sent after it (so it is not
/// queued behind), else once the target has been silent on it until `silent_until` (a
/// stalled target answers nothing; a cut link neither). The driver frees a copy's slot when
/// it resends the frame (`rexmit_timer`: `t->nout--`).
#[derive(Debug, Clone)]
pub(super) struct Held {
    pub(super) dev: TargetAddr,
    pub(super) target: MacAddr,
    /// The copy's send order at its target (`Target::next_seq`).
    pub(super) seq: u64,
    /// When the copy was sent: its answer is an RTT sample of it.
    pub(super) sent: Instant,
    /// Held because it was presumed lost (its timer ran out, or later frames were answered
    /// first): its answer proves that wrong (`Target::spurious_copy`). False for a copy
    /// held because another copy of its frame was answered first.
    pub(super) presumed_lost: bool,
    pub(super) due: Instant,
    pub(super) silent_until: Instant,
    /// When the timer looks at it next: the earlier of `due` and `silent_until`, then
    /// `silent_until`.
    pub(super) check_at: Instant,
}

/// A copy of a write that may still reach the target (`Engine::fences`): sent, and neither
/// answered nor out so long that it is presumed gone. The target would execute it whenever
/// it arrives, so no other write to its sectors may be sent before then.
#[derive(Debug, Clone)]
pub(super) struct Fence {
    pub(super) dev: TargetAddr,
    /// The op the copy belongs to: its own frames do not wait for each other.
    pub(super) op: u64,
    /// The sectors it writes: `lba..end`.
    pub(super) lba: u64,
    pub(super) end: u64,
    /// When it is presumed gone: sent plus `SILENT_HOLD` (1 s) or its target's RTO, whichever
    /// is longer, as a held copy's slot is freed (`Held::silent_until`).
    pub(super) gone_at: Instant,
}

/// A copy presumed lost whose window slot was freed without its answer (`Engine::ghosts`):
/// kept a while so that its answer, if it still comes, is known for what it is.
#[derive(Debug, Clone)]
pub(super) struct Ghost {
    pub(super) dev: TargetAddr,
    pub(super) target: MacAddr,
    pub(super) sent: Instant,
}
