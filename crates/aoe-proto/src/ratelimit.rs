//! Rate-limited log lines: at most one line per kind per interval, with a count of the lines
//! suppressed since the last one, so a peer that sends a frame per microsecond cannot turn
//! each into a log line (disk, CPU and the operator's attention).
//!
//! Sans-I/O like the engines: the caller passes the time in, so the target daemon, the
//! initiator daemon and the initiator engine (in simulated time) share it. The Linux driver
//! does the same with `printk_ratelimited` / `pr_info_ratelimited` around the messages a
//! remote peer can provoke (`aoecmd.c`: "unexpected rsp", "bad config"); unlike printk's
//! global bucket, each kind here has its own, so one noisy kind cannot hide another.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use aoe_proto::ratelimit::RateLimiter;
//!
//! let t0 = Instant::now();
//! let mut lim = RateLimiter::new(Duration::from_secs(1));
//! assert_eq!(lim.check(t0, "bad frame").map(|a| a.suppressed), Some(0));
//! assert!(lim.check(t0, "bad frame").is_none()); // counted, not logged
//! assert!(lim.check(t0, "other kind").is_some()); // kinds are independent
//! let a = lim.check(t0 + Duration::from_secs(1), "bad frame").unwrap();
//! assert_eq!(a.suppressed, 1);
//! assert_eq!(a.to_string(), " (1 similar line suppressed)");
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

/// One log line per kind per interval. Kinds are keys from a fixed set chosen by the code
/// (e.g. `&'static str`), never from peer data, so the table stays as small as that set.
#[derive(Debug, Clone)]
pub struct RateLimiter<K: Ord = &'static str> {
    interval: Duration,
    kinds: BTreeMap<K, Slot>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// When the next line of this kind may be logged.
    next: Instant,
    /// Lines of this kind refused since the last one logged.
    suppressed: u64,
}

/// Permission to log one line; [`fmt::Display`] gives the suffix that reports what was
/// suppressed before it (empty if nothing was).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Allowed {
    /// Lines of the same kind suppressed since the previous one logged.
    pub suppressed: u64,
}

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.suppressed {
            0 => Ok(()),
            1 => f.write_str(" (1 similar line suppressed)"),
            n => write!(f, " ({n} similar lines suppressed)"),
        }
    }
}

impl<K: Ord> RateLimiter<K> {
    /// A limiter letting one line per kind through every `interval` (zero: every line).
    pub fn new(interval: Duration) -> Self {
        RateLimiter {
            interval,
            kinds: BTreeMap::new(),
        }
    }

    /// The interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Whether a line of `kind` may be logged at `now`: `Some` (with the count suppressed
    /// since the last one) at most once per interval per kind, `None` otherwise (the line is
    /// counted). Time going backwards is treated as no time passing.
    pub fn check(&mut self, now: Instant, kind: K) -> Option<Allowed> {
        match self.kinds.get_mut(&kind) {
            Some(s) if now < s.next => {
                s.suppressed += 1;
                None
            }
            Some(s) => {
                let a = Allowed {
                    suppressed: s.suppressed,
                };
                *s = Slot {
                    next: now + self.interval,
                    suppressed: 0,
                };
                Some(a)
            }
            None => {
                self.kinds.insert(
                    kind,
                    Slot {
                        next: now + self.interval,
                        suppressed: 0,
                    },
                );
                Some(Allowed { suppressed: 0 })
            }
        }
    }

    /// Lines of `kind` suppressed and not yet reported.
    pub fn pending(&self, kind: &K) -> u64 {
        self.kinds.get(kind).map_or(0, |s| s.suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn one_line_per_kind_per_interval_with_the_count() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(ms(1000));
        assert_eq!(l.check(t0, "a"), Some(Allowed { suppressed: 0 }));
        for i in 1..=999 {
            assert_eq!(l.check(t0 + ms(i), "a"), None, "at {i} ms");
        }
        assert_eq!(l.pending(&"a"), 999);
        // Another kind has its own bucket.
        assert!(l.check(t0 + ms(5), "b").is_some());
        let a = l.check(t0 + ms(1000), "a").unwrap();
        assert_eq!(a.suppressed, 999);
        assert_eq!(a.to_string(), " (999 similar lines suppressed)");
        assert_eq!(l.pending(&"a"), 0);
        // The next interval starts at the line logged, not at the first of the burst.
        assert!(l.check(t0 + ms(1999), "a").is_none());
        assert_eq!(l.check(t0 + ms(2000), "a").unwrap().suppressed, 1);
    }

    #[test]
    fn a_quiet_kind_logs_every_line() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(ms(100));
        for i in 0..10 {
            let a = l.check(t0 + ms(100 * i), "x").expect("one a period passes");
            assert_eq!(a.suppressed, 0);
            assert_eq!(a.to_string(), "");
        }
    }

    #[test]
    fn zero_interval_and_time_going_backwards() {
        let t0 = Instant::now() + ms(10_000);
        let mut l = RateLimiter::new(Duration::ZERO);
        assert!(l.check(t0, 1u8).is_some());
        assert!(l.check(t0, 1u8).is_some());
        let mut l = RateLimiter::new(ms(100));
        assert!(l.check(t0, 1u8).is_some());
        assert!(l.check(t0 - ms(5000), 1u8).is_none());
        assert_eq!(l.check(t0 + ms(100), 1u8).unwrap().suppressed, 1);
    }
}
