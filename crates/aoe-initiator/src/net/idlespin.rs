//! The network thread's spin after it answered its clients' last I/O (`aoe initiator
//! --spin-us`, off by default): a reader that reads one request at a time (`dd bs=1M
//! iflag=direct` through a device file) sends its next request a few tens of microseconds
//! after the answer to the last, and a thread asleep in poll(2) by then costs a wake-up
//! (on this project's VMs an IPI to a halted vCPU, docs/PERFORMANCE.md "Wake-ups per MiB")
//! in the chain of wake-ups each such read waits on ("The initiator's reads at MTU 9000").
//!
//! The spin starts only when a pass of the loop completed I/O and nothing of the clients'
//! is left in flight, and lasts at most the window; it never starts on an idle thread, so
//! an initiator with no I/O sleeps as before. It adapts as the target's spin does by the
//! next frame (`aoe-target` `daemon/spin.rs`), but by a simpler rule: [`MISSES`] spins in
//! a row that ended without a request turn it off for [`OFF_STRETCHES`] idle stretches
//! (a client whose gaps are longer than the window, or that stopped), after which one
//! stretch spins again to see whether the gaps shortened.
//!
//! This is not read-ahead: nothing is sent to a target before a client asks, so every
//! read is served by the target after the request (another initiator may write between).

use std::time::Duration;

/// Spins in a row that saw no request before the spin goes off.
pub(super) const MISSES: u32 = 2;
/// Idle stretches (ends of a client's I/O) the spin stays off after [`MISSES`].
pub(super) const OFF_STRETCHES: u32 = 64;

/// When the network thread spins after its clients' last I/O completed, and what it got.
#[derive(Debug, Clone, Default)]
pub(super) struct IdleSpin {
    /// The window (`--spin-us`); zero: never spin.
    max: Duration,
    /// Spins in a row without a request.
    misses: u32,
    /// Idle stretches left before the spin is tried again.
    off_for: u32,
    /// Spins that saw a request, spins that did not, and their time (logged at the stop).
    pub(super) caught: u64,
    pub(super) missed: u64,
    pub(super) spun: Duration,
}

impl IdleSpin {
    /// A spin of at most `max` (zero: off).
    pub(super) fn new(max: Duration) -> IdleSpin {
        IdleSpin {
            max,
            ..IdleSpin::default()
        }
    }

    /// The clients' I/O has just all completed and the loop is about to sleep: how long to
    /// spin first (zero: sleep at once). Call once per such stretch, then [`Self::end`].
    pub(super) fn start(&mut self) -> Duration {
        if self.max.is_zero() {
            return Duration::ZERO;
        }
        if self.off_for > 0 {
            self.off_for -= 1;
            return Duration::ZERO;
        }
        self.max
    }

    /// How a spin that [`Self::start`] gave a window ended: `caught` if something became
    /// ready within it, after `spun`.
    pub(super) fn end(&mut self, caught: bool, spun: Duration) {
        self.spun += spun;
        if caught {
            self.caught += 1;
            self.misses = 0;
        } else {
            self.missed += 1;
            self.misses += 1;
            if self.misses >= MISSES {
                self.misses = 0;
                self.off_for = OFF_STRETCHES;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_micros(150);

    #[test]
    fn zero_never_spins() {
        let mut s = IdleSpin::new(Duration::ZERO);
        for _ in 0..10 {
            assert_eq!(s.start(), Duration::ZERO);
        }
    }

    #[test]
    fn a_client_within_the_window_keeps_it() {
        let mut s = IdleSpin::new(W);
        for _ in 0..1000 {
            assert_eq!(s.start(), W);
            s.end(true, Duration::from_micros(40));
        }
        assert_eq!((s.caught, s.missed), (1000, 0));
    }

    #[test]
    fn two_misses_turn_it_off_and_one_probe_comes_back() {
        let mut s = IdleSpin::new(W);
        // One miss alone (a reader that paused once) keeps the window.
        assert_eq!(s.start(), W);
        s.end(false, W);
        assert_eq!(s.start(), W);
        s.end(true, Duration::from_micros(10));
        // Two in a row: off for OFF_STRETCHES stretches, then one probe.
        for _ in 0..MISSES {
            assert_eq!(s.start(), W);
            s.end(false, W);
        }
        for _ in 0..OFF_STRETCHES {
            assert_eq!(s.start(), Duration::ZERO);
        }
        assert_eq!(s.start(), W);
    }

    /// A client whose requests always come later than the window: the spin's share of the
    /// stretches is bounded (MISSES spins in every MISSES + OFF_STRETCHES), so its CPU is
    /// too, whatever the client does.
    #[test]
    fn a_slow_client_is_spun_for_rarely() {
        let mut s = IdleSpin::new(W);
        let mut spins = 0;
        let n = 10 * (MISSES + OFF_STRETCHES);
        for _ in 0..n {
            if !s.start().is_zero() {
                spins += 1;
                s.end(false, W);
            }
        }
        assert_eq!(spins, 10 * MISSES);
    }
}
