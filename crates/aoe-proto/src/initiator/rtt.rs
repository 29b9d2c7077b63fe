//! Per target MAC: the paths (local interfaces) it answers on, its RTT estimate and
//! retransmission timeout (RFC 6298 rather than the driver's `calc_rttavg`/`rto`), and its
//! window of outstanding frames (`aoecmd_ata_rsp` growth; a timeout or a burst of losses
//! halves it at most once per loss episode, down to a floor, where the driver's
//! `rexmit_timer` sets it to 1 on every timeout). `docs/PROTOCOL.md` 4 ("Loss recovery")
//! says why we differ.

use super::*;

#[derive(Debug, Clone)]
pub(super) struct Iface {
    pub(super) name: String,
    pub(super) mac: MacAddr,
    pub(super) mtu: u32,
}

/// One local interface through which a target MAC answered (the driver's `aoeif`).
#[derive(Debug, Clone)]
pub(super) struct Path {
    pub(super) iface: usize,
    /// Sectors per frame on this path: min(MTU bound, target's sector count).
    pub(super) sectors: u8,
    /// Timeouts since the last answer (`lost`); the path is ejected after `2 * nframes`.
    pub(super) lost: u32,
    /// This path's own round trip (RFC 6298's estimator over the samples of answers that
    /// came in through it): how long its frames may take before answers on the target's
    /// other paths say they are lost (`Engine::later_frame_answered`). The driver keeps one
    /// estimate per target (`calc_rttavg`), and so does [`Target`] for its timer.
    pub(super) rtt: PathRtt,
    /// Frames on this path presumed lost (by the timer or by later answers) since an answer
    /// last came in through it: while it is not 0 the path takes one of `2^dark` of its
    /// turns (up to 1 in [`DARK_SHARE_MIN`]; `Target::take_path`), so a path gone dark
    /// while the others answer swallows a few frames, not a third of the window, and the
    /// first answer through it gives it its whole share again (session 36: the three-path
    /// test's cut paths took 4150 frames each in 4 s, every one then copied).
    pub(super) dark: u32,
    /// Turns it passed up since it last took one, while dark.
    pub(super) skipped: u32,
}

/// A dark path's smallest share of its turns (`Path::dark`): one in this many.
pub(super) const DARK_SHARE_MIN: u32 = 64;

impl Path {
    /// A path through local interface `iface`, carrying `sectors` per frame.
    pub(super) fn new(iface: usize, sectors: u8) -> Path {
        Path {
            iface,
            sectors,
            lost: 0,
            rtt: PathRtt::default(),
            dark: 0,
            skipped: 0,
        }
    }

    /// An answer came in through it: it is alive, its whole share back.
    pub(super) fn answered(&mut self) {
        self.lost = 0;
        self.dark = 0;
        self.skipped = 0;
    }
}

/// One path's smoothed RTT and its deviation (RFC 6298 2.2-2.3, gains 1/8 and 1/4), in
/// microseconds; `None` before its first sample.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PathRtt(Option<(u64, u64)>);

impl PathRtt {
    /// One RTT sample of a frame answered through this path.
    pub(super) fn sample(&mut self, rtt: Duration) {
        let rtt = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        self.0 = Some(match self.0 {
            None => (rtt, rtt / 2),
            Some((avg, dev)) => {
                let err = rtt.abs_diff(avg);
                let dev = if err >= dev {
                    dev + (err - dev) / 4
                } else {
                    dev - (dev - err) / 4
                };
                let avg = if rtt >= avg {
                    avg + err / 8
                } else {
                    avg - err / 8
                };
                (avg, dev)
            }
        });
    }

    /// How long a frame on this path may be out before answers to frames sent after it on
    /// *other* paths presume it lost: `srtt + 4 * rttvar` of this path (RFC 6298 2.3's
    /// bound, without its floor), or [`UNSAMPLED_PATH_WAIT`] before its first sample.
    pub(super) fn overtaken_after(&self) -> Duration {
        match self.0 {
            Some((avg, dev)) => Duration::from_micros(avg.saturating_add(dev.saturating_mul(4))),
            None => UNSAMPLED_PATH_WAIT,
        }
    }
}

/// How long a frame on a path with no RTT sample yet may be out before answers on the
/// target's other paths presume it lost: a path is added by a config response through it,
/// so its first data frames are answered within one round trip of it, however long; a
/// second is longer than any LAN's and short next to `deadsecs`.
pub(super) const UNSAMPLED_PATH_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub(super) struct Target {
    pub(super) mac: MacAddr,
    /// Whether it is a path of its device yet: a MAC that answers for a device already up
    /// is first asked IDENTIFY, and taken only if its capacity is the device's
    /// ([`Vet`], `Engine::vet_targets`).
    pub(super) vet: Vet,
    pub(super) paths: Vec<Path>,
    pub(super) next_path: usize,
    pub(super) buffer_count: u16,
    pub(super) sector_count: u8,
    pub(super) nframes: u16,
    pub(super) maxout: u16,
    pub(super) ssthresh: u16,
    pub(super) next_cwnd: u16,
    pub(super) nout: u16,
    pub(super) max_nout: u16,
    pub(super) taint: u32,
    /// Times it was scorned since its taint last rose from 0: the "tainted" line is said
    /// once when it rises, and this count with the "well again" line when the taint is
    /// back at 0 (a full window timing out at once scorned it once per frame, 64 lines).
    pub(super) scorned: u32,
    pub(super) rtt_avg_us: u64,
    pub(super) rtt_dev_us: u64,
    /// False until the first RTT sample, which replaces the initial estimate (RFC 6298 2.2).
    pub(super) sampled: bool,
    /// Send order of frames to this target: each frame (and each copy of it) takes the next
    /// number, so an answer tells which outstanding frames were sent before it.
    pub(super) next_seq: u64,
    /// Frames sent before this number belong to the current loss episode (NewReno's
    /// `recover`, RFC 6582): their losses do not start another.
    pub(super) recover_seq: u64,
    /// Frames lost in the current episode, the window when it began, and whether it has
    /// cut the window (at most once).
    pub(super) episode_losses: u32,
    pub(super) episode_window: u16,
    pub(super) episode_cut: bool,
    /// Window reductions (loss episodes).
    pub(super) reductions: u64,
    /// Retransmissions triggered by later frames' answers, not by the timer.
    pub(super) fast_retransmits: u64,
    /// Answers that came while a frame sent to it before them was still unanswered.
    pub(super) overtaking_answers: u64,
    pub(super) retransmits: u64,
    pub(super) answers: u64,
    /// Timeouts since the last answer.
    pub(super) silent: u32,
    /// When its timer first found it silent (no answer for a whole timeout) since its last
    /// answer: the frames queued behind the one copied then sleep as long again as the
    /// silence has lasted (`Target::silent_backoff`).
    pub(super) silent_since: Option<Instant>,
    /// Its last answer was to a copy sent after it fell silent for a whole timeout (a
    /// probe, `Outstanding::after_silence`): if it answers nothing more for a timeout, the
    /// frames it still holds unanswered are lost, not queued (`Engine::frame_timed_out`).
    pub(super) probe_answered: bool,
    /// The highest send order (`next_seq`) of an answered copy: a held copy sent before it
    /// is not queued behind it (`Held`).
    pub(super) answered_seq: Option<u64>,
    /// When it last answered anything (a held copy included).
    pub(super) last_answer: Option<Instant>,
    /// When a frame or copy last went to it: with `last_answer`, where the tail loss
    /// probe's timer counts from (`Engine::tail_probe_at`).
    pub(super) last_sent: Option<Instant>,
    /// A tail loss probe went out since its last answer: one per silence, the RTO after it.
    pub(super) tail_probe_out: bool,
    /// Tail loss probes sent (`Engine::tail_probes`).
    pub(super) tail_probes: u64,
    /// The shortest (and longest) recent RTT samples: RACK's `min_RTT`.
    pub(super) rtt_range: RttRange,
    /// How late, over the shortest RTT, answers to frames presumed lost came, smoothed
    /// (`Target::spurious_copy`): the reordering window (`Target::reo_wnd`).
    pub(super) late_us: u64,
    /// Copies found spurious: the target answered an earlier copy after the copy was sent
    /// (Eifel detection, RFC 3522, with the tag as the timestamp).
    pub(super) spurious: u64,
    /// The window, threshold and countdown before the current episode's cut, restored if a
    /// copy of that episode turns out spurious (Eifel response, RFC 4015; F-RTO's undo,
    /// RFC 5682 3.1 step 3b).
    pub(super) undo: Option<(u16, u16, u16)>,
    /// (send order, tag) of every copy sent to it, in send order, so an answer finds the
    /// frames sent before it without a scan of every outstanding frame
    /// (`Engine::later_frame_answered`). Entries of copies no longer outstanding under that
    /// tag and send order are dropped from the front as they reach it, and all at once when
    /// they outnumber the window ([`Target::sent_order_compact_at`]).
    pub(super) sent_order: VecDeque<(u64, u32)>,
}

/// The extremes of a series of times over the last one to two [`RTT_RANGE_PERIOD`]s (two
/// buckets, the older dropped as a new one starts): a windowed min and max, as RACK keeps
/// a windowed minimum RTT (RFC 8985 6.2, `RACK.min_RTT`).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RttRange {
    start: Option<Instant>,
    cur: Option<(u64, u64)>,
    prev: Option<(u64, u64)>,
}

/// How long one bucket of [`RttRange`] lasts: long enough to remember a disk's slow answers
/// between two of them on a busy host, short enough to forget one stall within seconds.
const RTT_RANGE_PERIOD: Duration = Duration::from_secs(1);

impl RttRange {
    fn add(&mut self, now: Instant, us: u64) {
        if self
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= RTT_RANGE_PERIOD)
        {
            // A bucket older than two periods says nothing about now.
            let fresh = self
                .start
                .is_some_and(|s| now.saturating_duration_since(s) < 2 * RTT_RANGE_PERIOD);
            self.prev = if fresh { self.cur } else { None };
            self.cur = None;
            self.start = Some(now);
        }
        self.cur = Some(
            self.cur
                .map_or((us, us), |(lo, hi)| (lo.min(us), hi.max(us))),
        );
    }

    /// (min, max) in microseconds, if any sample is recent.
    pub(super) fn get(&self) -> Option<(u64, u64)> {
        match (self.cur, self.prev) {
            (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
            (x, y) => x.or(y),
        }
    }
}

impl Target {
    pub(super) fn new(mac: MacAddr) -> Target {
        Target {
            mac,
            vet: Vet::Path,
            paths: Vec::new(),
            next_path: 0,
            buffer_count: 0,
            sector_count: 0,
            nframes: 1,
            maxout: 1,
            ssthresh: 1,
            next_cwnd: 1,
            nout: 0,
            max_nout: 0,
            taint: 0,
            scorned: 0,
            rtt_avg_us: RTT_AVG_INIT_US,
            rtt_dev_us: RTT_DEV_INIT_US,
            sampled: false,
            next_seq: 0,
            recover_seq: 0,
            episode_losses: 0,
            episode_window: 0,
            episode_cut: false,
            reductions: 0,
            fast_retransmits: 0,
            overtaking_answers: 0,
            retransmits: 0,
            answers: 0,
            silent: 0,
            silent_since: None,
            probe_answered: false,
            answered_seq: None,
            last_answer: None,
            last_sent: None,
            tail_probe_out: false,
            tail_probes: 0,
            rtt_range: RttRange::default(),
            late_us: 0,
            spurious: 0,
            undo: None,
            sent_order: VecDeque::new(),
        }
    }

    /// Length of [`Target::sent_order`] beyond which its stale entries are dropped: a few
    /// times the frames it can have out, so a frame waiting at the front for long (while
    /// later ones come and go) costs bounded memory and scan time.
    pub(super) fn sent_order_compact_at(&self) -> usize {
        64 + 4 * usize::from(self.nframes.max(self.nout))
    }

    /// A copy sent as number `seq` was answered at `now`. True if that ends a silence
    /// (`silent_since`): the timers of the frames that slept through it restart
    /// (`Engine::restart_timers`).
    pub(super) fn answered_copy(&mut self, seq: u64, now: Instant) -> bool {
        let ended_silence = self.silent_since.is_some();
        self.answered_seq = Some(self.answered_seq.map_or(seq, |s| s.max(seq)));
        self.last_answer = Some(now);
        self.tail_probe_out = false;
        self.silent = 0;
        self.silent_since = None;
        self.probe_answered = false;
        ended_silence
    }

    /// How long a frame that waits behind the one copied at a silent target sleeps before
    /// its timer looks again: as long as the silence has lasted, between one timeout and
    /// `rto_max`, so the timer's runs back off exponentially over a silence as RFC 6298
    /// 5.5 backs off a timer, however few copies go out (a full window of held copies
    /// lets one go out per [`SILENT_HOLD`](super::retransmit)). Starts the silence's clock
    /// at `now` if it is not running.
    pub(super) fn silent_backoff(&mut self, now: Instant, cfg: &Config) -> Duration {
        let since = *self.silent_since.get_or_insert(now);
        let rto = self.rto(cfg);
        now.saturating_duration_since(since)
            .clamp(rto, cfg.rto_max.max(rto))
    }

    /// Whether a copy of the frame whose last copy went here as number `seq`, and timed
    /// out, should go out now (given a free slot): the target answered a frame sent after
    /// it (so it skipped it: lost), or it has answered nothing for a smoothed RTT (lost,
    /// or the target stalled; either way nothing tells us it is merely queued). While the
    /// target keeps answering frames sent before it, it is most likely queued behind
    /// them, and its own answer is on its way: a copy would only be work for the target,
    /// and with the window full the spurious copy of one frame after another.
    pub(super) fn copy_due_after_timeout(&self, seq: u64, now: Instant) -> bool {
        self.answered_seq.is_some_and(|s| s > seq)
            || self.last_answer.is_none_or(|t| {
                now.saturating_duration_since(t) >= Duration::from_micros(self.rtt_avg_us)
            })
    }

    /// When a copy after a timeout turns due by time alone (`copy_due_after_timeout`): a
    /// smoothed RTT after the last answer. `None` if it never answered.
    pub(super) fn copy_due_at(&self) -> Option<Instant> {
        Some(self.last_answer? + Duration::from_micros(self.rtt_avg_us))
    }

    /// `aoecmd_wreset` then `addtgt`: window at half its ceiling, slow start up to there.
    pub(super) fn wreset(&mut self) {
        self.ssthresh = (self.nframes / 2).max(1);
        self.maxout = (self.nframes / 2).max(1);
        self.next_cwnd = self.nframes;
    }

    pub(super) fn reset_rtt(&mut self) {
        self.rtt_avg_us = RTT_AVG_INIT_US;
        self.rtt_dev_us = RTT_DEV_INIT_US;
        self.sampled = false;
        self.rtt_range = RttRange::default();
        self.late_us = 0;
    }

    /// The send-order number of the next frame to this target.
    pub(super) fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// An answer: an RTT sample unless the frame was retransmitted (`None`, Karn's rule),
    /// then window growth as the driver's `aoecmd_ata_rsp`: slow start below `ssthresh`,
    /// afterwards one more frame per full window (`next_cwnd` countdown).
    ///
    /// The estimator is RFC 6298's: the first sample sets the average and half of it as
    /// the deviation; later ones move the average by 1/8 and the deviation by 1/4 of the
    /// error. (The driver's `calc_rttavg` moves both by 1/8 from a 250 ms start, so on a
    /// 150 µs link it takes some 50 answers to forget the start.)
    ///
    /// Karn's rule: a retransmission carries a fresh tag, so its answer is not ambiguous as
    /// in TCP, but the target answers the original and the copy back to back when only the
    /// answer was slow, and the copy's short "RTT" would pull the estimate, and with it the
    /// timeout, below the real round trip: more spurious retransmissions.
    pub(super) fn on_answer(&mut self, now: Instant, rtt: Option<Duration>) {
        if let Some(rtt) = rtt {
            self.sample(now, rtt);
        }
        if self.maxout >= self.nframes {
            return;
        }
        if self.maxout < self.ssthresh {
            self.maxout += 1;
        } else if self.nout >= self.maxout {
            if self.next_cwnd == 0 {
                self.maxout += 1;
                self.next_cwnd = self.maxout;
            } else {
                self.next_cwnd -= 1;
            }
        }
    }

    /// One RTT sample: the RFC 6298 estimate and the recent range ([`RttRange`]).
    pub(super) fn sample(&mut self, now: Instant, rtt: Duration) {
        let rtt = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        self.rtt_range.add(now, rtt);
        if !self.sampled {
            self.sampled = true;
            self.rtt_avg_us = rtt;
            self.rtt_dev_us = rtt / 2;
            return;
        }
        let err = rtt.abs_diff(self.rtt_avg_us);
        if err >= self.rtt_dev_us {
            self.rtt_dev_us += (err - self.rtt_dev_us) / 4;
        } else {
            self.rtt_dev_us -= (self.rtt_dev_us - err) / 4;
        }
        if rtt >= self.rtt_avg_us {
            self.rtt_avg_us += err / 8;
        } else {
            self.rtt_avg_us -= err / 8;
        }
    }

    /// A frame sent as number `seq` was lost: its timer ran out (`timeout`), or frames sent
    /// after it were answered first. Losses of frames sent before the episode's first loss
    /// was seen belong to that episode (NewReno's `recover`, RFC 6582), and an episode cuts
    /// the window at most once: it is halved, never below `min(floor, nframes)`, and slow
    /// start ends there; it grows back by one frame per full window ([`Target::on_answer`]).
    ///
    /// What cuts it is a sign of congestion, not any loss: a timeout (the path went silent
    /// for a whole RTO), or more than a quarter of the episode's window lost (a queue that
    /// overflowed drops frames in bursts). A few frames found lost by later answers, while
    /// the path keeps answering, are random loss and leave the window alone.
    ///
    /// The driver's `rexmit_timer` instead sets the window to 1 on every timeout: on a
    /// segment that drops 5% of frames at random that keeps the window near 1 and the link
    /// idle. Returns true if the window was cut.
    pub(super) fn on_loss(&mut self, seq: u64, floor: u16, timeout: bool) -> bool {
        if seq >= self.recover_seq {
            self.recover_seq = self.next_seq;
            self.episode_losses = 0;
            self.episode_cut = false;
            self.episode_window = self.maxout;
            self.undo = None;
        }
        self.episode_losses += 1;
        if self.episode_cut || (!timeout && self.episode_losses * 4 <= self.episode_window as u32) {
            return false;
        }
        let floor = floor.clamp(1, self.nframes.max(1));
        self.undo = Some((self.maxout, self.ssthresh, self.next_cwnd));
        self.maxout = (self.maxout / 2).max(floor);
        self.ssthresh = self.maxout;
        self.next_cwnd = self.maxout;
        self.episode_cut = true;
        self.reductions += 1;
        true
    }

    /// The driver's `scorn`: taint grows threefold, capped.
    pub(super) fn scorn(&mut self) {
        let n = self.taint;
        self.taint += 1;
        self.taint += self.taint * 2;
        self.taint = self.taint.max(n).min(MAX_TAINT);
    }

    /// RFC 6298's `srtt + 4 * rttvar` (2.3), at least twice the smoothed RTT (so a steady
    /// link, whose deviation decays to 0, does not retransmit every frame that is a little
    /// late), within [`Config::rto_min`] and [`Config::rto_max`]. The estimate includes the
    /// samples of frames presumed lost and answered after all ([`Target::spurious_copy`]),
    /// so a target whose slow answers were copied raises it. The timer is only the backstop
    /// ([`Config::rto_min`]). The driver uses `2 * rttavg + 8 * rttdev` on a 100 ms timer
    /// tick (`rexmit_timer`).
    pub(super) fn rto(&self, cfg: &Config) -> Duration {
        let us = (self.rtt_avg_us + 4 * self.rtt_dev_us).max(2 * self.rtt_avg_us);
        Duration::from_micros(us).clamp(cfg.rto_min, cfg.rto_max.max(cfg.rto_min))
    }

    /// RACK-TLP's probe timeout (RFC 8985 7.2): twice the smoothed RTT, at least
    /// [`Config::rto_min`]. `None` before the first sample (RFC 8985 leaves it to the RTO
    /// then) or where it is not shorter than the RTO, which then comes first anyway: a
    /// probe only shortens the wait where the target's answer times spread, and
    /// `srtt + 4 * rttvar` is well over twice the RTT (`aoe serve`'s worker pool).
    pub(super) fn pto(&self, cfg: &Config) -> Option<Duration> {
        let pto = Duration::from_micros(self.rtt_avg_us.saturating_mul(2)).max(cfg.rto_min);
        (self.sampled && pto < self.rto(cfg)).then_some(pto)
    }

    /// The shortest recent RTT sample (RACK's `min_RTT`), the smoothed RTT without one.
    fn min_rtt_us(&self) -> u64 {
        self.rtt_range.get().map_or(self.rtt_avg_us, |(lo, _)| lo)
    }

    /// RACK's reordering window (RFC 8985 6.2): how much longer than a frame sent after it
    /// an earlier frame may take before it is presumed lost. RACK starts at `min_RTT / 4`,
    /// widens it when DSACKs report spurious retransmissions (`reo_wnd_mult`), never beyond
    /// the smoothed RTT, and narrows it again after 16 recoveries without one. Here the
    /// answer to a frame presumed lost tells how late it was (its sample over the shortest
    /// one); the window is 5/4 of a smoothed lateness ([`Target::late_us`], gain 1/4 per
    /// spurious copy, shrinking by 1/16 per loss found), at least `min_RTT / 4` and at most
    /// `srtt + 4 * rttvar` (RACK's cap is the smoothed RTT, which a target with slow
    /// answers among fast ones exceeds). A link that reorders now and then (the relay
    /// holds a frame up to 20 ms) must not hold every recovery back for that long: hence
    /// smoothed, and shrinking with every loss, where a maximum would keep one outlier.
    pub(super) fn reo_wnd(&self) -> Duration {
        let late = self.late_us + self.late_us / 4;
        let cap = self.rtt_avg_us + 4 * self.rtt_dev_us;
        Duration::from_micros(late.min(cap).max(self.min_rtt_us() / 4))
    }

    /// A loss found from later answers, not (yet) proven spurious: RACK's persistence, the
    /// reordering window narrows.
    pub(super) fn loss_found(&mut self) {
        self.late_us -= self.late_us / 16;
    }

    /// A frame presumed lost (its copy sent, or waiting to go) was answered after all, `rtt`
    /// after it was sent: the presumption was wrong (Eifel detection, RFC 3522, the tag
    /// standing for the timestamp). Its sample enters the estimate (raising the timeout);
    /// how late it was widens the reordering window ([`Target::reo_wnd`]); and if the
    /// current loss episode cut the window, the cut is undone (Eifel response, RFC 4015;
    /// F-RTO, RFC 5682, undoes a spurious timeout's cut the same way): the target was slow,
    /// not congested.
    pub(super) fn spurious_copy(&mut self, now: Instant, rtt: Duration) {
        self.spurious += 1;
        self.sample(now, rtt);
        let rtt = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        let late = rtt.saturating_sub(self.min_rtt_us());
        if late >= self.late_us {
            self.late_us += (late - self.late_us) / 4;
        } else {
            self.late_us -= (self.late_us - late) / 4;
        }
        if let Some((maxout, ssthresh, next_cwnd)) = self.undo.take() {
            self.maxout = self.maxout.max(maxout).min(self.nframes.max(1));
            self.ssthresh = ssthresh;
            self.next_cwnd = next_cwnd;
        }
    }

    /// A frame sent on local interface `iface` was lost: the path's loss count grows, and
    /// a path with more than `2 * nframes` losses since its last answer is ejected if the
    /// target has another (`ejectif` in `rexmit_timer`). Returns the log line.
    pub(super) fn path_lost(&mut self, dev: TargetAddr, iface: usize) -> Option<String> {
        let nframes = self.nframes as u32;
        let npaths = self.paths.len();
        let pi = self.paths.iter().position(|p| p.iface == iface)?;
        self.paths[pi].lost += 1;
        if self.paths[pi].lost > 2 * nframes && npaths > 1 {
            let p = self.paths.remove(pi);
            return Some(format!(
                "{dev}: ejecting if {} from target {} after {} losses",
                p.iface, self.mac, p.lost
            ));
        }
        None
    }

    /// The path the next frame (or copy) goes out on: the paths in turn, as the driver's
    /// `ifrotate`, but a path with frames presumed lost since its last answer
    /// ([`Path::dark`]) passes up all but one of `2^dark` of its turns. If every path
    /// passes, the next in turn is taken all the same. Returns its index in `paths`.
    pub(super) fn take_path(&mut self) -> usize {
        let n = self.paths.len().max(1);
        for _ in 0..n {
            let i = self.next_path % n;
            self.next_path = self.next_path.wrapping_add(1);
            let Some(p) = self.paths.get_mut(i) else {
                return 0;
            };
            if p.dark == 0 {
                return i;
            }
            p.skipped += 1;
            if p.skipped >= (1u32 << p.dark.min(31)).min(DARK_SHARE_MIN) {
                p.skipped = 0;
                return i;
            }
        }
        let i = self.next_path % n;
        self.next_path = self.next_path.wrapping_add(1);
        i
    }

    /// A frame sent through local interface `iface` was presumed lost: that path is dark
    /// until an answer comes in through it ([`Path::dark`]).
    pub(super) fn path_dark(&mut self, iface: usize) {
        if let Some(p) = self.paths.iter_mut().find(|p| p.iface == iface) {
            p.dark = p.dark.saturating_add(1);
        }
    }

    /// A path of its device with an interface to reach it through: frames may go to it.
    pub(super) fn usable(&self) -> bool {
        !self.paths.is_empty() && self.vet == Vet::Path
    }
}

/// Whether a target MAC is a path of its device. The driver takes every MAC that answers
/// Query Config for a shelf.slot as a path (`aoecmd_cfg_rsp` adds a target per MAC, with no
/// look at what it serves), so a second target at the same address (another disk, started
/// by mistake) has its answers mixed with the first's. Here a MAC that appears while its
/// device is up (or identifying through another MAC) is asked IDENTIFY first, and becomes
/// a path only if the capacity it reports is the device's. Two disks of the same capacity
/// cannot be told apart this way; the serial cannot be compared, as two `aoe serve`
/// gateways of one `rbd:` image are legitimate paths of one disk with serials of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Vet {
    /// A path: frames go to it.
    Path,
    /// Waiting to be asked: its IDENTIFY goes out once the device is up.
    Pending,
    /// Its IDENTIFY is out (`tries` sent so far).
    Out { tries: u8 },
    /// It answered with another capacity (`sectors`), or an error: not a path. Its next
    /// Query Config response asks again (an image grown on one gateway and not yet seen
    /// through the other, an open device that has not been revalidated).
    Refused { sectors: Option<u64> },
}

/// IDENTIFYs sent to a new MAC before it is left pending until its next Query Config
/// response (each unanswered for its timeout).
pub(super) const VET_TRIES: u8 = 4;

/// Sectors per frame on a path: `aoecmd_cfg_rsp` takes the MTU bound, capped by the target's
/// sector count, with 1024 bytes when the target says 0.
pub(super) fn path_sectors(mtu_sectors: u8, target_sectors: u8) -> u8 {
    if target_sectors == 0 {
        mtu_sectors.min(DEFAULT_SECTORS)
    } else {
        mtu_sectors.min(target_sectors)
    }
}
