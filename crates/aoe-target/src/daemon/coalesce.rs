//! How long the loop lets frames gather after a batch (`--coalesce-us`, the most), from the
//! rate they arrive at: a NIC's adaptive interrupt moderation, done in the loop's wait.
//!
//! A coalescing wait saves the wake-ups of the frames it gathers and adds its length to
//! their replies. It pays only where it gathers several: a wait of `w` collects about
//! `w / gap` frames, so the loop waits only where the mean gap of the last [`EPOCH`]
//! batches is at most half the most (two frames or more a wait), and then as long as
//! [`FRAMES`] of them take, never longer than the most. At a quarter of a peak load the
//! frames are further apart than that and every frame wakes the loop at once, as without
//! coalescing, so the latency there does not change; the fixed wait before (2026-12-04)
//! waited its whole length after every batch at every load.

use std::time::{Duration, Instant};

/// Batches per estimate of the arrival rate.
pub(super) const EPOCH: u32 = 32;
/// Frames a wait aims to gather.
pub(super) const FRAMES: u32 = 4;

/// The coalescing wait of the next batch, from the arrival rate of the last epoch.
#[derive(Debug, Clone)]
pub(super) struct Coalesce {
    /// The most (`ServeConfig::coalesce`); zero: never wait.
    max: Duration,
    /// The current epoch: when its first batch came, frames after it, batches.
    since: Option<Instant>,
    frames: u64,
    batches: u32,
    /// The mean gap between frames over the last epoch.
    gap: Option<Duration>,
}

impl Coalesce {
    pub(super) fn new(max: Duration) -> Coalesce {
        Coalesce {
            max,
            since: None,
            frames: 0,
            batches: 0,
            gap: None,
        }
    }

    /// A batch of `frames` frames was taken at `now`.
    pub(super) fn batch(&mut self, now: Instant, frames: usize) {
        let Some(since) = self.since else {
            // The first batch's frames came before the epoch began: they set its start.
            self.since = Some(now);
            return;
        };
        self.frames += frames as u64;
        self.batches += 1;
        if self.batches >= EPOCH {
            let span = now.saturating_duration_since(since);
            self.gap = Some(span / u32::try_from(self.frames.max(1)).unwrap_or(u32::MAX));
            self.since = Some(now);
            self.frames = 0;
            self.batches = 0;
        }
    }

    /// How long to let frames gather after the batch just taken: zero (wake for the next
    /// frame) unless a wait within the most gathers two frames or more.
    pub(super) fn wait(&self) -> Duration {
        match self.gap {
            Some(g) if !self.max.is_zero() && g * 2 <= self.max => (g * FRAMES).min(self.max),
            _ => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    /// A coalescer of at most `max` whose epoch starts at `t`.
    fn started(max: Duration, t: Instant) -> Coalesce {
        let mut c = Coalesce::new(max);
        c.batch(t, 1);
        c
    }

    /// One epoch of batches of `per` frames, `gap` apart per frame, after `t`; returns its
    /// end.
    fn epoch(c: &mut Coalesce, t: Instant, gap: Duration, per: usize) -> Instant {
        let mut t = t;
        for _ in 0..EPOCH {
            t += gap * per as u32;
            c.batch(t, per);
        }
        t
    }

    #[test]
    fn no_estimate_no_wait() {
        let mut c = Coalesce::new(32 * US);
        assert_eq!(c.wait(), Duration::ZERO);
        c.batch(Instant::now(), 3);
        assert_eq!(c.wait(), Duration::ZERO);
    }

    #[test]
    fn frames_closer_than_half_the_most_gather_four_or_the_most() {
        let t = Instant::now();
        // 12 us apart (1 KiB frames at half of vblade's peak): 48 us for four, 32 at most.
        let mut c = started(32 * US, t);
        epoch(&mut c, t, 12 * US, 1);
        assert_eq!(c.wait(), 32 * US);
        // 3 us apart, two a batch: four take 12 us.
        let mut c = started(32 * US, t);
        epoch(&mut c, t, 3 * US, 2);
        assert_eq!(c.wait(), 12 * US);
    }

    #[test]
    fn frames_further_apart_than_half_the_most_wake_the_loop_at_once() {
        // 24 us apart (a quarter of the peak): a 32 us wait gathers one or two, no wait.
        let t = Instant::now();
        let mut c = started(32 * US, t);
        let t = epoch(&mut c, t, 24 * US, 1);
        assert_eq!(c.wait(), Duration::ZERO);
        // 16 us apart: exactly two in the most, it waits.
        epoch(&mut c, t, 16 * US, 1);
        assert_eq!(c.wait(), 32 * US);
    }

    #[test]
    fn the_wait_follows_the_rate_both_ways_an_epoch_later() {
        let t = Instant::now();
        let mut c = started(40 * US, t);
        let t = epoch(&mut c, t, 50 * US, 1);
        assert_eq!(c.wait(), Duration::ZERO);
        let t = epoch(&mut c, t, 5 * US, 3);
        assert_eq!(c.wait(), 20 * US);
        // An idle second in the next epoch: its mean gap is long, no wait.
        c.batch(t + Duration::from_secs(1), 1);
        let t = epoch(&mut c, t + Duration::from_secs(1), 5 * US, 3);
        assert_eq!(c.wait(), Duration::ZERO);
        epoch(&mut c, t, 5 * US, 3);
        assert_eq!(c.wait(), 20 * US, "the epoch after is fast again");
    }

    #[test]
    fn zero_most_never_waits() {
        let t = Instant::now();
        let mut c = started(Duration::ZERO, t);
        epoch(&mut c, t, US, 4);
        assert_eq!(c.wait(), Duration::ZERO);
    }
}
