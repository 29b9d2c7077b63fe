//! The log copy of the `err` lines, rate-limited where a dying target repeats one.
//!
//! The Linux driver writes every retransmission to its `err` character device and nowhere
//! else: `resend()` in `aoecmd.c` formats `"%15s e%ld.%d oldtag=%08x@%08lx newtag=%08x
//! s=%pm d=%pm nout=%d"` with `"retransmit"` and hands it to `aoechr_error()`, a frame at a
//! time, with no rate limit (`aoechr.c` keeps up to `NMSG` = 100 unread messages). Our `err`
//! file gets every line the same way ([`crate::net::Shared::push_err`]); what is limited here
//! is only the daemon's log, where each `err` line is also written at INFO: a target that
//! dies with a full window made 448 `retransmit` lines in 10 s there.
//!
//! Lines a peer's silence or errors repeat (retransmissions, I/O errors answered by the
//! target) are limited with [`aoe_proto::ratelimit::RateLimiter`] to one per kind per
//! [`LOG_INTERVAL`], the next one carrying the count suppressed in between
//! (`(37 similar lines suppressed)`); a kind that goes quiet with lines suppressed gets that
//! count in a line of its own once the interval has passed ([`ErrLog::flush`]), so no count
//! is lost. A retransmission's kind is its device, the interface it went out of (`s=`) and
//! whether it was fast (later frames answered) or a timeout, so a line from each path of
//! a multipath device and of each cause still shows. Every other line is logged as it
//! comes: they are one per event (a device up or down, a size change).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use aoe_proto::ratelimit::RateLimiter;

/// One line per kind of repeated `err` line per interval in the log.
pub const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Kinds kept at most; beyond it the table starts again (counts pending are flushed first).
/// Kinds come from device addresses and interface MACs, so a peer announcing ever new
/// shelf.slot addresses must not grow it without bound.
const MAX_KINDS: usize = 4096;

/// What a repeated line is counted under: the line's text up to its varying fields, e.g.
/// `retransmit e7.3 s=02:00:00:00:00:01` or `e7.3: I/O error`, which the summary line
/// repeats.
type Kind = String;

/// The rate limiter for the log copy of `err` lines.
#[derive(Debug)]
pub struct ErrLog {
    limiter: RateLimiter<Kind>,
    /// When each kind may log again (its last line plus [`LOG_INTERVAL`]): the limiter
    /// counts every refused check as a suppressed line, so [`ErrLog::flush`] asks it only
    /// once that time has come.
    next: BTreeMap<Kind, Instant>,
    /// Kinds with suppressed lines not yet reported.
    pending: BTreeSet<Kind>,
}

impl Default for ErrLog {
    fn default() -> Self {
        ErrLog {
            limiter: RateLimiter::new(LOG_INTERVAL),
            next: BTreeMap::new(),
            pending: BTreeSet::new(),
        }
    }
}

impl ErrLog {
    /// What to log for `line` at `now`: the line (with the count suppressed since the last
    /// one of its kind), or `None` when it is counted instead.
    pub fn filter(&mut self, now: Instant, line: &str) -> Option<String> {
        let Some(kind) = kind_of(line) else {
            return Some(line.to_owned());
        };
        if self.next.len() >= MAX_KINDS && !self.next.contains_key(&kind) {
            let later = self.next.values().max().copied().unwrap_or(now).max(now);
            for l in self.flush(later) {
                tracing::info!(target: "aoe::err", "{l}");
            }
            *self = ErrLog::default();
        }
        match self.limiter.check(now, kind.clone()) {
            Some(a) => {
                self.pending.remove(&kind);
                self.next.insert(kind, now + LOG_INTERVAL);
                Some(format!("{line}{a}"))
            }
            None => {
                self.pending.insert(kind);
                None
            }
        }
    }

    /// Summary lines for kinds that went quiet with lines suppressed and whose interval has
    /// passed: `KIND (N similar lines suppressed)`.
    pub fn flush(&mut self, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        let due: Vec<Kind> = self
            .pending
            .iter()
            .filter(|k| self.next.get(*k).is_none_or(|&t| t <= now))
            .cloned()
            .collect();
        for k in due {
            self.pending.remove(&k);
            if let Some(a) = self.limiter.check(now, k.clone()) {
                self.next.insert(k.clone(), now + LOG_INTERVAL);
                if a.suppressed > 0 {
                    out.push(format!("{k}{a}"));
                }
            }
        }
        out
    }
}

/// The kind of a line that repeats while a target is dead or failing, or `None` for a line
/// logged every time.
fn kind_of(line: &str) -> Option<Kind> {
    if let Some(rest) = line.strip_prefix("retransmit ") {
        // `retransmit eX.Y oldtag=.. newtag=.. s=MAC d=MAC nout=N[ (later frames answered)]`
        let dev = rest.split_whitespace().next()?;
        let src = rest.split_whitespace().find(|w| w.starts_with("s="))?;
        let fast = if line.ends_with("(later frames answered)") {
            " (later frames answered)"
        } else {
            ""
        };
        return Some(format!("retransmit {dev} {src}{fast}"));
    }
    // `eX.Y: I/O error: ...` (an ATA or AoE error answered by the target).
    let (dev, rest) = line.split_once(": ")?;
    if rest.starts_with("I/O error") && dev.starts_with('e') && !dev.contains(' ') {
        return Some(format!("{dev}: I/O error"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rexmit(dev: &str, src: &str, n: u32, fast: bool) -> String {
        format!(
            "retransmit {dev} oldtag={n:08x} newtag={:08x} s={src} d=02:00:00:00:00:99 nout=4{}",
            n + 1,
            if fast { " (later frames answered)" } else { "" }
        )
    }

    const S1: &str = "02:00:00:00:00:01";
    const S2: &str = "02:00:00:00:00:02";

    /// The case: a dead target's retransmissions, hundreds a second, become one line
    /// a second in the log with the count, and the count of the last burst comes out too.
    #[test]
    fn a_retransmission_storm_is_one_line_a_second_with_the_count() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut l = ErrLog::default();
        let mut logged = Vec::new();
        // 448 in 10 s (the figure), one every 22 ms.
        for i in 0..448u32 {
            let t = ms(u64::from(i) * 22);
            if let Some(line) = l.filter(t, &rexmit("e1.1", S1, i, false)) {
                logged.push(line);
            }
            // The network thread flushes on every pass of its loop.
            for _ in 0..3 {
                logged.extend(l.flush(t + Duration::from_millis(7)));
            }
        }
        logged.extend(l.flush(ms(448 * 22 + 1000)));
        assert!(logged.len() <= 12, "{} lines: {logged:#?}", logged.len());
        assert!(logged[0].starts_with("retransmit e1.1 oldtag=00000000"));
        assert!(!logged[0].contains("suppressed"));
        // Every retransmission is accounted for: logged, or counted in a later line.
        let counted = logged.iter().filter(|l| l.contains("oldtag=")).count() as u64
            + logged.iter().map(|l| suppressed(l)).sum::<u64>();
        assert_eq!(counted, 448, "{logged:#?}");
        assert_eq!(
            logged.last().unwrap().split(" (").next(),
            Some("retransmit e1.1 s=02:00:00:00:00:01"),
            "the summary line names the kind: {logged:#?}"
        );
        // Nothing left to report.
        assert!(l.flush(ms(60_000)).is_empty());
    }

    fn suppressed(line: &str) -> u64 {
        line.rsplit_once(" (")
            .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn each_path_device_and_cause_has_its_own_line() {
        let t0 = Instant::now();
        let mut l = ErrLog::default();
        assert!(l.filter(t0, &rexmit("e1.1", S1, 1, false)).is_some());
        assert!(l.filter(t0, &rexmit("e1.1", S1, 2, false)).is_none());
        assert!(l.filter(t0, &rexmit("e1.1", S2, 3, false)).is_some());
        assert!(l.filter(t0, &rexmit("e1.1", S1, 4, true)).is_some());
        assert!(l.filter(t0, &rexmit("e1.2", S1, 5, false)).is_some());
        assert!(l.filter(t0, "e1.1: I/O error: ATA error").is_some());
        assert!(l.filter(t0, "e1.1: I/O error: ATA error").is_none());
        // Lines of one event each are never held back.
        for _ in 0..3 {
            assert_eq!(l.filter(t0, "e1.1 up").as_deref(), Some("e1.1 up"));
            assert!(l.filter(t0, "e1.1 down: no answer").is_some());
        }
        let summary = l.flush(t0 + LOG_INTERVAL);
        assert_eq!(
            summary,
            [
                "e1.1: I/O error (1 similar line suppressed)",
                "retransmit e1.1 s=02:00:00:00:00:01 (1 similar line suppressed)",
            ]
        );
    }

    #[test]
    fn the_table_of_kinds_stays_bounded() {
        let t0 = Instant::now();
        let mut l = ErrLog::default();
        for i in 0..3 * MAX_KINDS as u32 {
            let dev = format!("e{}.{}", i / 255, i % 255);
            let _ = l.filter(t0, &rexmit(&dev, S1, i, false));
            let _ = l.filter(t0, &rexmit(&dev, S1, i, false));
            assert!(l.pending.len() <= MAX_KINDS && l.next.len() <= MAX_KINDS);
        }
    }
}
