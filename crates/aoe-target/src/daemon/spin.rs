//! How long the event loop spins after a batch before it sleeps in poll(): chosen by what
//! each choice would have cost the target's CPU over the last [`EPOCH`] idle stretches.
//!
//! An idle stretch (the loop has served what came and waits for the next frame) ends one
//! of two ways. A spin that sees the next frame `gap` after the last costs `gap` of CPU; a
//! loop that sleeps costs the sleep and the wake-up, [`SpinWindow::set_wake_cost`], which
//! the daemon measures on its own thread (a sample of its sleeps, the thread's CPU time
//! across poll()). A spin of `w` that finds nothing costs `w` and the wake-up after it.
//! So a spin pays only while the gaps it catches are shorter than a wake-up: spinning
//! through a 7 us gap to save a 2 us wake-up triples the CPU of the wait. The window for
//! the next epoch is the one, among a few candidates (none, the wake-up cost, half, the
//! same, double, the most), that would have cost the least CPU over the epoch's gaps.
//!
//! The rule before (2026-12-03) grew the window whenever the next frame came within the
//! most, as the kernel's cpuidle haltpoll governor does (`drivers/cpuidle/governors/
//! haltpoll.c`), which weighs the wake-up's latency, not its CPU: at half of a target's
//! peak load the frames come every few microseconds, always within 25 us, and the loop
//! never slept (93-94% of its core busy against vblade's 48-55%, docs/PERFORMANCE.md,
//! "Equal load").
//!
//! A gap measured across a sleep includes the wake-up's latency, and a gap longer than a
//! spin is only known to be longer: the cost of a longer window is judged from such gaps
//! only where they are known to be within it. While the loop does not spin at all it
//! learns nothing of gaps shorter than a wake-up, so every [`PROBE_AFTER`] epochs it
//! spins one epoch with the wake-up's cost as its window; the epoch's gaps then decide as
//! any other.

use std::time::Duration;

/// Idle stretches per decision.
pub(super) const EPOCH: usize = 32;
/// Epochs without spinning before one probe epoch spins.
pub(super) const PROBE_AFTER: u32 = 16;
/// What a sleep and wake-up costs until the daemon measured it.
pub(super) const DEFAULT_WAKE_COST: Duration = Duration::from_micros(4);
/// How long the loop takes, after its spin ends (or at once without one), to be asleep in
/// poll(): a frame that comes sooner makes poll() return without a sleep or a wake-up, as if
/// the spin had caught it. An estimate: a batch's sends, the loop's housekeeping and the
/// system call's entry. With the paced generator at half load the frames come in bursts, and
/// without a spin the loop slept after only 16-20% of the requests (`perf stat`, 2026-12-04),
/// which a model charging a wake-up for every stretch took for 100%.
pub(super) const POLL_ENTRY: Duration = Duration::from_micros(2);

/// One idle stretch as the loop saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Stretch {
    /// From the last frame to the next, nanoseconds (saturated at `u32::MAX`).
    gap: u32,
    /// The spin's window then, nanoseconds; a gap longer than it was measured across a
    /// sleep (latency included).
    spun: u32,
    /// The spin saw the next frame (`gap <= spun`).
    caught: bool,
}

/// The spin window between [`Duration::ZERO`] and the configured most (`--spin-us`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SpinWindow {
    /// How long the loop spins now for the next frame after a batch.
    now: Duration,
    /// The most (`ServeConfig::spin`); zero: never spin.
    max: Duration,
    /// What a sleep and its wake-up cost the loop's CPU (a running lower octile).
    wake: Duration,
    /// The current epoch's stretches.
    seen: [Stretch; EPOCH],
    len: usize,
    /// Epochs decided without spinning since the last probe.
    idle_epochs: u32,
    /// Epochs decided, and of them with a window other than zero (logged at the stop).
    epochs: u64,
    spinning_epochs: u64,
}

fn ns(d: Duration) -> u32 {
    u32::try_from(d.as_nanos()).unwrap_or(u32::MAX)
}

impl SpinWindow {
    /// A window that starts at its most, `max`.
    pub(super) fn new(max: Duration) -> SpinWindow {
        SpinWindow {
            now: max,
            max,
            wake: DEFAULT_WAKE_COST,
            seen: [Stretch::default(); EPOCH],
            len: 0,
            idle_epochs: 0,
            epochs: 0,
            spinning_epochs: 0,
        }
    }

    /// How long to spin after the next batch.
    pub(super) fn get(&self) -> Duration {
        self.now
    }

    /// What a sleep and wake-up costs, as the policy now weighs it.
    pub(super) fn wake_cost(&self) -> Duration {
        self.wake
    }

    /// Epochs decided, and how many of them chose to spin.
    pub(super) fn epochs(&self) -> (u64, u64) {
        (self.epochs, self.spinning_epochs)
    }

    /// One measurement of what a sleep and its wake-up cost the loop's CPU. The estimate
    /// steps towards it, never past it: up by a 128th of itself, down by seven 128ths, so it
    /// settles where one measurement in eight is lower (a running lower octile). The
    /// measurements spread widely on a loaded machine (2-30 us, 2026-12-04): a wake-up that
    /// finds another process on the CPU pays its caches and the switch, which the loop's
    /// total CPU per GB shows it does not pay on average (without a spin it took less CPU
    /// per GB than with one in every equal-load cell), so the lower part is the wake-up's
    /// own cost, and a sleep preempted on its way back moves it no more than any other.
    pub(super) fn set_wake_cost(&mut self, cost: Duration) {
        let step = (self.wake / 128).max(Duration::from_nanos(1));
        self.wake = if cost > self.wake {
            (self.wake + step).min(cost)
        } else {
            self.wake.saturating_sub(step * 7).max(cost)
        };
    }

    /// The spin saw the next frame `gap` after the last.
    pub(super) fn caught(&mut self, gap: Duration) {
        self.push(Stretch {
            gap: ns(gap),
            spun: ns(self.now),
            caught: true,
        });
    }

    /// The spin (of the window [`get`](Self::get) gave, zero included) saw no frame, the
    /// loop slept, and the next frame came `gap` after the last (as the loop saw it when it
    /// woke).
    pub(super) fn after_sleep(&mut self, gap: Duration) {
        self.push(Stretch {
            gap: ns(gap),
            spun: ns(self.now),
            caught: false,
        });
    }

    fn push(&mut self, s: Stretch) {
        self.seen[self.len] = s;
        self.len += 1;
        if self.len == EPOCH {
            self.decide();
            self.len = 0;
        }
    }

    /// What the epoch's stretches would have cost with a window of `w`, nanoseconds.
    fn cost(&self, w: Duration) -> u64 {
        let (w, wake) = (u64::from(ns(w)), u64::from(ns(self.wake)));
        let entry = u64::from(ns(POLL_ENTRY));
        self.seen[..self.len]
            .iter()
            .map(|s| {
                let (gap, spun) = (u64::from(s.gap), u64::from(s.spun));
                // A gap the spin caught is known, and so is one that ended before the loop
                // was asleep (poll() returned at once); one it slept through is known to be
                // longer than the spin, and is taken as measured (a wake-up's latency longer
                // than it was, so a longer window is judged on the safe side).
                let exact = s.caught || gap <= spun + entry;
                if (exact && gap <= w + entry) || (w > spun && gap <= w) {
                    gap
                } else {
                    w + wake
                }
            })
            .sum()
    }

    fn decide(&mut self) {
        self.epochs += 1;
        let candidates = [
            self.now,
            Duration::ZERO,
            self.wake.min(self.max),
            self.now / 2,
            (self.now * 2).min(self.max),
            self.max,
        ];
        // The current window wins ties (no change without a reason), then the shorter.
        let mut best = (self.cost(self.now), self.now);
        for &w in &candidates[1..] {
            let c = self.cost(w);
            if c < best.0 || (c == best.0 && w < best.1 && best.1 != self.now) {
                best = (c, w);
            }
        }
        self.now = best.1;
        if self.now.is_zero() {
            self.idle_epochs += 1;
            if self.idle_epochs >= PROBE_AFTER {
                self.idle_epochs = 0;
                self.now = self.wake.min(self.max);
            }
        } else {
            self.idle_epochs = 0;
            self.spinning_epochs += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    /// A window whose wake-up cost is `wake`.
    fn window(max: Duration, wake: Duration) -> SpinWindow {
        let mut w = SpinWindow::new(max);
        w.wake = wake;
        w
    }

    #[test]
    fn the_wake_up_cost_follows_its_measurements() {
        let mut w = SpinWindow::new(25 * US);
        assert_eq!(w.wake_cost(), DEFAULT_WAKE_COST);
        for _ in 0..100 {
            w.set_wake_cost(2 * US);
        }
        assert_eq!(w.wake_cost(), 2 * US);
        // An outlier moves it by a 128th, however far out.
        w.set_wake_cost(500 * US);
        assert_eq!(w.wake_cost(), Duration::from_nanos(2015));
        // Spread samples, one in eight at 3 us, the rest 5 to 30: it settles near the lower
        // end, not near the mean (about 12 us) nor the median (10).
        for _ in 0..400 {
            for c in [3, 5, 8, 10, 10, 12, 20, 30] {
                w.set_wake_cost(c * US);
            }
        }
        assert!(
            w.wake_cost() >= 3 * US && w.wake_cost() <= 5 * US,
            "{:?}",
            w.wake_cost()
        );
        // And rises when every wake-up costs more.
        for _ in 0..2000 {
            w.set_wake_cost(9 * US);
        }
        assert!(
            w.wake_cost().abs_diff(9 * US) < US / 10,
            "{:?}",
            w.wake_cost()
        );
    }

    /// `n` idle stretches of `gap` each, caught by the spin where its window covers them.
    fn steady(w: &mut SpinWindow, gap: Duration, n: usize) {
        for _ in 0..n {
            if gap <= w.get() {
                w.caught(gap);
            } else {
                w.after_sleep(gap);
            }
        }
    }

    #[test]
    fn a_steady_gap_longer_than_a_wake_up_stops_the_spin() {
        // Half load: the next frame 7 us after the last, a wake-up costs 2 us. The rule
        // before kept spinning 25 us (every gap came within it) and paid 7 us a stretch;
        // this one sleeps and pays 2.
        let mut w = window(25 * US, 2 * US);
        assert_eq!(w.get(), 25 * US);
        steady(&mut w, 7 * US, EPOCH);
        assert_eq!(w.get(), Duration::ZERO);
        // And stays asleep, but for the probe epoch, which finds the same gaps.
        for _ in 0..4 * PROBE_AFTER {
            steady(&mut w, 7 * US, EPOCH);
            assert!(w.get() <= 2 * US, "{:?}", w.get());
        }
        let (epochs, spinning) = w.epochs();
        assert_eq!(epochs, 1 + 4 * u64::from(PROBE_AFTER));
        assert_eq!(spinning, 0);
    }

    #[test]
    fn a_steady_gap_shorter_than_a_wake_up_keeps_the_spin() {
        // Saturated: the next frames come 1 us after the last; sleeping would cost 4.
        let mut w = window(25 * US, 4 * US);
        for _ in 0..10 {
            steady(&mut w, US, EPOCH);
            assert_eq!(w.get(), 25 * US);
        }
    }

    #[test]
    fn a_probe_brings_the_spin_back_when_the_gaps_shorten() {
        let mut w = window(25 * US, 3 * US);
        steady(&mut w, 50 * US, EPOCH);
        assert_eq!(w.get(), Duration::ZERO);
        // Gaps now 1 us, but the sleeping loop measures them with its wake-up's latency
        // (5 us here): they look longer than a wake-up, and it keeps sleeping until the
        // probe epoch spins and sees them as they are.
        let mut epochs = 0;
        while w.get().is_zero() {
            steady(&mut w, 6 * US, EPOCH);
            epochs += 1;
            assert!(epochs <= PROBE_AFTER, "no probe");
        }
        assert_eq!(w.get(), 3 * US);
        steady(&mut w, US, EPOCH);
        assert!(w.get() >= 3 * US, "{:?}", w.get());
    }

    #[test]
    fn a_mixed_load_spins_only_as_long_as_a_wake_up() {
        // Three gaps in four 3 us, the rest 40 us, a wake-up 5 us: a spin of 5 us catches
        // the short ones for 3 us each and gives up on the long ones after 5 (152 us an
        // epoch); spinning 25 us wastes 25 on each long one (312); not spinning pays a
        // wake-up for every gap (160): 3 us is past the loop's way into poll().
        let mut w = window(25 * US, 5 * US);
        for _ in 0..EPOCH / 4 {
            for _ in 0..3 {
                w.caught(3 * US);
            }
            w.after_sleep(40 * US);
        }
        assert_eq!(w.get(), 5 * US);
        // Half and half: 5 us (208 us an epoch) no longer beats sleeping (160), nor does
        // 2.5 us (168: the 3 us gaps end before the loop is asleep, but the long ones still
        // cost the spin).
        for _ in 0..EPOCH / 2 {
            w.caught(3 * US);
            w.after_sleep(40 * US);
        }
        assert_eq!(w.get(), Duration::ZERO);
    }

    #[test]
    fn gaps_shorter_than_the_way_into_poll_need_no_spin() {
        // Bursts: frames 1 us apart, then 30 us of nothing, a wake-up 5 us. Without a spin
        // the loop takes the 1 us frames on its way into poll() (no sleep, no wake-up) and
        // sleeps through the 30 us; a spin of 25 us pays for the 30 us gaps too. The model
        // before charged a wake-up for every gap and kept the spin.
        let mut w = window(25 * US, 5 * US);
        for _ in 0..EPOCH / 4 {
            for _ in 0..3 {
                w.caught(US);
            }
            w.after_sleep(30 * US);
        }
        assert_eq!(w.get(), Duration::ZERO);
    }

    #[test]
    fn never_past_the_most() {
        let mut w = window(10 * US, 30 * US);
        for _ in 0..5 {
            steady(&mut w, 8 * US, EPOCH);
            assert_eq!(w.get(), 10 * US);
        }
    }

    #[test]
    fn no_spin_configured_never_spins() {
        let mut w = window(Duration::ZERO, 3 * US);
        for gap in [0, 1, 50, 1000] {
            for _ in 0..PROBE_AFTER as usize * EPOCH {
                w.after_sleep(gap * US);
                assert_eq!(w.get(), Duration::ZERO);
            }
        }
    }
}
