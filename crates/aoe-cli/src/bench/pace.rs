//! Pacing for `--rate` and `--rate-iops`: a token bucket in the form of a schedule (GCRA,
//! the "virtual scheduling" form of a token bucket), fed by the clock the caller passes in.
//!
//! Request `k` is due when the bytes (and requests) issued before it are paid for at the asked
//! rate: `start + max(bytes_before * 1e9 / rate, k * 1e9 / iops)` nanoseconds, computed from
//! the totals each time, so rounding never accumulates into drift. A request may go once its
//! due time has come; the loop that drives the pacer waits (poll timeout) until
//! [`Pacer::next_due`] and never sleeps a fixed amount.
//!
//! The bucket's depth bounds a burst: when the generator falls behind the schedule by more
//! than `depth` (the target stalled, the window was full, the loop was descheduled), the
//! schedule is moved forward so that at most `depth` worth of requests (plus one) can go at
//! once afterwards. The schedule only ever moves later, so over any run the requests issued
//! by time `t` never cost more than `rate * t` plus one request.
//!
//! [`Pacer::intended`] keeps the unshifted schedule: latency measured from it counts the time
//! a request waited because the target was behind (coordinated omission), where latency from
//! the actual send does not.

use std::time::{Duration, Instant};

/// How much the generator may ask: bytes per second, requests per second, or both (then a
/// request waits for both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rate {
    /// Bytes per second, if limited.
    pub bytes_per_s: Option<u64>,
    /// Requests per second, if limited.
    pub iops: Option<u64>,
}

impl Rate {
    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.bytes_per_s.is_some() || self.iops.is_some()
    }
}

/// The bucket's default depth in milliseconds: how far behind its schedule the generator may
/// fall and still catch up with a burst (which the window bounds: at most `--window`
/// requests are ever in flight). Longer than the stalls a target shows on a loaded two-CPU
/// machine: at load 5, 1 KiB random reads at 50 MB/s from an unpinned `aoe serve` achieved
/// 68-80% of the rate with a 2 ms bucket, 95-100% with 20 ms and 99.5-100% with 100 ms; and
/// short next to a run.
pub const DEFAULT_DEPTH_MS: u64 = 50;

/// The schedule of a paced phase.
#[derive(Debug, Clone)]
pub struct Pacer {
    start: Instant,
    rate: Rate,
    depth_ns: u128,
    /// Bytes and requests issued so far.
    bytes: u64,
    requests: u64,
    /// How far the schedule was moved forward after falling more than `depth` behind.
    shift_ns: u128,
}

impl Pacer {
    /// A schedule starting at `start` (the first request is due then) with bucket depth
    /// `depth`.
    pub fn new(start: Instant, rate: Rate, depth: Duration) -> Pacer {
        Pacer {
            start,
            rate,
            depth_ns: depth.as_nanos(),
            bytes: 0,
            requests: 0,
            shift_ns: 0,
        }
    }

    /// Nanoseconds after `start` at which the next request is due by the unshifted schedule.
    fn schedule_ns(&self) -> u128 {
        let by_bytes = self.rate.bytes_per_s.map_or(0, |r| {
            (u128::from(self.bytes) * 1_000_000_000).div_ceil(u128::from(r.max(1)))
        });
        let by_requests = self.rate.iops.map_or(0, |r| {
            (u128::from(self.requests) * 1_000_000_000).div_ceil(u128::from(r.max(1)))
        });
        by_bytes.max(by_requests)
    }

    fn at(&self, ns: u128) -> Instant {
        // Saturating: a schedule centuries away (a rate of 1 byte/s) stays in the future.
        let ns = u64::try_from(ns).unwrap_or(u64::MAX);
        self.start
            .checked_add(Duration::from_nanos(ns))
            .unwrap_or(self.start + Duration::from_secs(1 << 40))
    }

    /// When the next request may go.
    pub fn next_due(&self) -> Instant {
        self.at(self.schedule_ns() + self.shift_ns)
    }

    /// Whether the next request may go at `now`.
    pub fn ready(&self, now: Instant) -> bool {
        now >= self.next_due()
    }

    /// When the next request was meant to go by the rate alone (no shift after a stall): the
    /// time its latency counts from when coordinated omission is accounted for.
    pub fn intended(&self) -> Instant {
        self.at(self.schedule_ns())
    }

    /// Records a request of `bytes` issued at `now` (call only when [`ready`](Self::ready))
    /// and returns its intended time ([`intended`](Self::intended) before the call).
    pub fn take(&mut self, now: Instant, bytes: u64) -> Instant {
        let intended = self.intended();
        let due_ns = self.schedule_ns() + self.shift_ns;
        let now_ns = now.saturating_duration_since(self.start).as_nanos();
        let late = now_ns.saturating_sub(due_ns);
        if late > self.depth_ns {
            // Fallen behind by more than the bucket holds: what is beyond it is forgotten.
            self.shift_ns += late - self.depth_ns;
        }
        self.bytes += bytes;
        self.requests += 1;
        intended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPTH: Duration = Duration::from_millis(DEFAULT_DEPTH_MS);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Takes every request that is ready at `now`, `bytes` each; returns how many.
    fn drain(p: &mut Pacer, now: Instant, bytes: u64) -> u64 {
        let mut n = 0;
        while p.ready(now) {
            p.take(now, bytes);
            n += 1;
            assert!(n < 1_000_000, "the bucket never empties");
        }
        n
    }

    #[test]
    fn first_request_goes_at_once_and_no_burst_follows() {
        let t0 = Instant::now();
        let mut p = Pacer::new(
            t0,
            Rate {
                bytes_per_s: Some(1_000_000),
                iops: None,
            },
            ms(2),
        );
        // 1000 bytes at 1 MB/s: one request per millisecond, the first at the start.
        assert_eq!(drain(&mut p, t0, 1000), 1);
        assert_eq!(p.next_due(), t0 + ms(1));
        assert!(!p.ready(t0 + Duration::from_micros(999)));
        assert_eq!(drain(&mut p, t0 + ms(1), 1000), 1);
    }

    #[test]
    fn steady_state_issues_exactly_the_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(
            t0,
            Rate {
                bytes_per_s: Some(3_000_000),
                iops: None,
            },
            DEPTH,
        );
        // Woken every 70 us (an odd period, not a multiple of the 1/3 ms interval) for 1 s:
        // the requests due at 0, 1/3 ms, ..., 999.67 ms, 3000 of 1000 bytes.
        let mut total = 0;
        let mut now = t0;
        while now < t0 + Duration::from_secs(1) {
            total += drain(&mut p, now, 1000);
            now += Duration::from_micros(70);
        }
        assert_eq!(total, 3000);
        // The next one exactly a second after the start: no drift from rounding.
        assert_eq!(p.next_due(), t0 + Duration::from_secs(1));
    }

    #[test]
    fn iops_and_bytes_both_limit() {
        let t0 = Instant::now();
        let rate = Rate {
            bytes_per_s: Some(1_000_000),
            iops: Some(100),
        };
        let mut p = Pacer::new(t0, rate, DEPTH);
        // 1000-byte requests: the byte rate allows 1000/s, the IOPS limit 100/s.
        assert_eq!(drain(&mut p, t0, 1000), 1);
        assert_eq!(p.next_due(), t0 + ms(10));
        // 100000-byte requests: now the byte rate is the tighter one (10/s).
        let mut p = Pacer::new(t0, rate, DEPTH);
        p.take(t0, 100_000);
        assert_eq!(p.next_due(), t0 + ms(100));
    }

    #[test]
    fn a_stall_bursts_at_most_the_depth_afterwards() {
        let t0 = Instant::now();
        let mut p = Pacer::new(
            t0,
            Rate {
                bytes_per_s: None,
                iops: Some(1000),
            },
            ms(3),
        );
        assert_eq!(drain(&mut p, t0, 512), 1);
        // The target stalls (nothing taken) for 100 ms: 100 requests' worth of schedule
        // passes, but only the depth (3 ms: 3 requests) and the one due now go at once.
        let late = t0 + ms(100);
        assert_eq!(drain(&mut p, late, 512), 4);
        // Then the rate again, not a catch-up.
        assert_eq!(drain(&mut p, late + Duration::from_micros(500), 512), 0);
        assert_eq!(drain(&mut p, late + ms(1), 512), 1);
        // The intended time still counts from the unshifted schedule: the next request was
        // meant for t0 + 6 ms, long before now.
        assert_eq!(p.intended(), t0 + ms(6));
    }

    #[test]
    fn a_small_oversleep_does_not_lose_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(
            t0,
            Rate {
                bytes_per_s: None,
                iops: Some(10_000),
            },
            DEPTH,
        );
        // Woken 1 ms late every time (poll's millisecond rounding): 10 requests per wake,
        // 10000 in a second all the same.
        let mut total = 0;
        for i in 0..=1000 {
            total += drain(&mut p, t0 + ms(i), 4096);
        }
        assert_eq!(total, 10_001);
    }

    #[test]
    fn absurd_rates_stay_in_range() {
        let t0 = Instant::now();
        let mut p = Pacer::new(
            t0,
            Rate {
                bytes_per_s: Some(1),
                iops: None,
            },
            DEPTH,
        );
        p.take(t0, u64::from(u32::MAX));
        assert!(!p.ready(t0 + Duration::from_secs(1_000_000)));
        let mut p = Pacer::new(
            t0,
            Rate {
                bytes_per_s: Some(u64::MAX),
                iops: Some(u64::MAX),
            },
            DEPTH,
        );
        assert_eq!(drain(&mut p, t0, 1), 1);
        assert!(p.ready(t0 + ms(1)));
    }
}
