//! How long the event loop spins after a batch: adapted to what the spins found, as the
//! kernel's cpuidle haltpoll governor adapts its poll time (`drivers/cpuidle/governors/
//! haltpoll.c`: grow the window when the wake-up came soon after it, shrink it when it came
//! long after the most it may be).
//!
//! Spinning costs the CPU time it spins: a loop that spins its full window after every
//! batch while the initiator sends the next one 300 us later (a generator that cannot keep
//! up, a machine other work loads) spends most of its time spinning for nothing. Sleeping
//! costs a wake-up, which the sender's CPU mostly pays. Measured with
//! scripts/bench/target-cpu.sh at load average 12 (docs/PERFORMANCE.md, "The target's fast path"): the
//! fixed 100 us spin was 30-37% of the target's CPU time at window 16.

use std::time::Duration;

/// The spin window between [`Duration::ZERO`] and the configured most (`--spin-us`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SpinWindow {
    /// How long the loop spins now for the next frame after a batch.
    now: Duration,
    /// The most (`ServeConfig::spin`); zero: never spin.
    max: Duration,
}

impl SpinWindow {
    /// A window that starts at its most, `max`.
    pub(super) fn new(max: Duration) -> SpinWindow {
        SpinWindow { now: max, max }
    }

    /// How long to spin after the next batch.
    pub(super) fn get(&self) -> Duration {
        self.now
    }

    /// The smallest window other than zero: an eighth of the most. Growing starts here,
    /// and shrinking below it stops the spin.
    fn floor(&self) -> Duration {
        self.max / 8
    }

    /// The loop slept (the spin found no frame within its window, or there was none) and
    /// the next frame came `gap` after the last one. Within the most: a longer spin would
    /// have caught it without a wake-up, so the window doubles (from [`floor`](Self::floor)
    /// if it was zero), up to the most. Beyond the most: spinning even that long would have
    /// been for nothing, so the window halves, to zero below the floor. A gap the window
    /// already covered (the spin ended for another reason) changes nothing.
    pub(super) fn after_sleep(&mut self, gap: Duration) {
        if gap <= self.now {
            return;
        }
        self.now = if gap <= self.max {
            (self.now * 2).max(self.floor()).min(self.max)
        } else {
            let half = self.now / 2;
            if half < self.floor() {
                Duration::ZERO
            } else {
                half
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn long_gaps_stop_the_spin_and_short_ones_bring_it_back() {
        let mut w = SpinWindow::new(100 * US);
        assert_eq!(w.get(), 100 * US);
        // The initiator's next frames come 300 us after the last: halve, to zero below
        // the floor (12.5 us).
        for want in [50, 25, 12] {
            w.after_sleep(300 * US);
            assert_eq!(w.get().as_micros(), want);
        }
        w.after_sleep(300 * US);
        assert_eq!(w.get(), Duration::ZERO);
        w.after_sleep(300 * US);
        assert_eq!(w.get(), Duration::ZERO);
        // Frames come 30 us after the last again: grow from the floor until the window
        // covers the gap (a spin that long catches them, and the loop no longer sleeps).
        w.after_sleep(30 * US);
        assert_eq!(w.get(), 12500 * Duration::from_nanos(1));
        for want in [25, 50, 50] {
            w.after_sleep(30 * US);
            assert_eq!(w.get().as_micros(), want);
        }
        // Up to the most, never past it.
        for want in [100, 100] {
            w.after_sleep(90 * US);
            assert_eq!(w.get().as_micros(), want);
        }
    }

    #[test]
    fn a_gap_the_window_covered_changes_nothing() {
        let mut w = SpinWindow::new(100 * US);
        w.after_sleep(80 * US);
        assert_eq!(w.get(), 100 * US);
        w.after_sleep(100 * US);
        assert_eq!(w.get(), 100 * US);
    }

    #[test]
    fn no_spin_configured_never_spins() {
        let mut w = SpinWindow::new(Duration::ZERO);
        for gap in [0, 1, 50, 1000] {
            w.after_sleep(gap * US);
            assert_eq!(w.get(), Duration::ZERO);
        }
    }
}
