//! Wake-ups and readiness: `eventfd(2)` and a thin `poll(2)` wrapper.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::{cvt, cvt_size};

/// A non-blocking, close-on-exec `eventfd(2)`: a counter other threads bump with
/// [`notify`](Self::notify) to wake a thread sleeping in [`poll`] on it.
///
/// It is `Send + Sync`: share it with `Arc` between worker threads and the poll loop.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// Creates an eventfd with counter 0 (`EFD_NONBLOCK | EFD_CLOEXEC`).
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd(2) takes only integers; the result is checked by cvt.
        let raw = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: `raw` was just returned by eventfd(2), is open and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(EventFd { fd })
    }

    /// Adds 1 to the counter, making the fd readable. Never blocks: if the counter is already
    /// at its maximum (`EAGAIN`), a wake-up is pending anyway and this returns `Ok`.
    pub fn notify(&self) -> io::Result<()> {
        let one: u64 = 1;
        loop {
            // SAFETY: `one` is 8 readable bytes, the size eventfd(2) requires for a write.
            let ret = unsafe {
                libc::write(
                    self.fd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    mem::size_of::<u64>(),
                )
            };
            match cvt_size(ret) {
                Ok(_) => return Ok(()),
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Ok(()),
                    _ => return Err(e),
                },
            }
        }
    }

    /// Reads and resets the counter, returning how many notifications arrived since the last
    /// drain (0 if none, without blocking).
    pub fn drain(&self) -> io::Result<u64> {
        drain_counter(&self.fd)
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// One entry for [`poll`]: which fd, whether to wait for it to become readable (and, with
/// [`with_events`](Self::with_events), writable), and the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollFd {
    /// The file descriptor. A negative value is ignored by poll(2) and never becomes ready.
    pub fd: RawFd,
    /// Wait for `POLLIN`. With `false` only errors and hang-ups are reported.
    pub readable: bool,
    /// Set by [`poll`]: the fd is readable, or has an error or hang-up pending (a read will
    /// report it). Cleared when nothing happened.
    pub ready: bool,
    /// Wait for `POLLOUT` too.
    pub want_writable: bool,
    /// Set by [`poll`] for an entry with [`want_writable`](Self::want_writable): the fd can
    /// take a write (`POLLOUT`). Cleared otherwise.
    pub writable: bool,
}

impl PollFd {
    /// An entry that waits for `fd` to become readable.
    pub fn new(fd: RawFd) -> PollFd {
        PollFd::with_events(fd, true, false)
    }

    /// An entry that waits for `fd` to become readable (`POLLIN`) and/or writable
    /// (`POLLOUT`), as asked.
    pub fn with_events(fd: RawFd, readable: bool, writable: bool) -> PollFd {
        PollFd {
            fd,
            readable,
            ready: false,
            want_writable: writable,
            writable: false,
        }
    }
}

/// Waits until at least one entry is ready or `timeout` passes (`None`: forever), and returns
/// how many entries are ready (readable, writable or both), setting their
/// [`ready`](PollFd::ready) and [`writable`](PollFd::writable) flags.
///
/// The timeout is rounded up to whole milliseconds (so a tiny timeout still sleeps instead of
/// spinning) and capped at `i32::MAX` ms. A signal interrupting the wait (`EINTR`) returns
/// `Ok(0)` with no entry ready, like a timeout: callers loop anyway.
pub fn poll(fds: &mut [PollFd], timeout: Option<Duration>) -> io::Result<usize> {
    wait(fds, timeout, false)
}

/// [`poll`] with the timeout kept to the nanosecond (`ppoll(2)`), for a loop that must wake at
/// a given time (a paced load generator's next request), not up to a millisecond later. A zero
/// timeout returns at once: the caller must not loop on it while idle.
pub fn poll_precise(fds: &mut [PollFd], timeout: Option<Duration>) -> io::Result<usize> {
    wait(fds, timeout, true)
}

/// The CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`): user and system
/// time, not the time it slept. A system call, not the vDSO: a loop that wants to know what
/// its own sleep and wake-up cost reads it around a sample of its waits, not every one.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if ret != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Sets the calling thread's timer slack (`PR_SET_TIMERSLACK`): how much later than asked
/// the kernel may end its timed sleeps ([`poll_precise`]'s timeout among them) to merge
/// wake-ups. The default is 50 us, too coarse for a wait of a few tens of microseconds.
/// Zero restores the default.
pub fn set_timer_slack(slack: Duration) -> io::Result<()> {
    let ns = libc::c_ulong::try_from(slack.as_nanos()).unwrap_or(libc::c_ulong::MAX);
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory of ours.
    cvt(unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns, 0, 0, 0) }).map(|_| ())
}

/// Reads and resets the 8-byte counter of a non-blocking eventfd(2) or timerfd(2): the
/// notifications or expirations since the last read, 0 if none (`EAGAIN`).
fn drain_counter(fd: &OwnedFd) -> io::Result<u64> {
    let mut value: u64 = 0;
    loop {
        // SAFETY: `value` is 8 writable bytes, the size eventfd(2) and timerfd(2) require
        // for a read.
        let ret = unsafe {
            libc::read(
                fd.as_raw_fd(),
                (&mut value as *mut u64).cast(),
                mem::size_of::<u64>(),
            )
        };
        match cvt_size(ret) {
            Ok(_) => return Ok(value),
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            },
        }
    }
}

fn wait(fds: &mut [PollFd], timeout: Option<Duration>, precise: bool) -> io::Result<usize> {
    let to_raw = |p: &PollFd| libc::pollfd {
        fd: p.fd,
        events: if p.readable { libc::POLLIN } else { 0 }
            | if p.want_writable { libc::POLLOUT } else { 0 },
        revents: 0,
    };
    // A loop that waits between frames calls this once a wake-up: no allocation for the
    // usual few descriptors.
    let empty = libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    };
    let mut small = [empty; 8];
    let mut large = Vec::new();
    let raw: &mut [libc::pollfd] = if fds.len() <= small.len() {
        for (r, p) in small.iter_mut().zip(fds.iter()) {
            *r = to_raw(p);
        }
        &mut small[..fds.len()]
    } else {
        large.extend(fds.iter().map(to_raw));
        &mut large
    };
    let nfds = libc::nfds_t::try_from(raw.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many fds for poll"))?;
    let ret = if precise {
        let ts = timeout.map(|d| libc::timespec {
            tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
            // Below 10^9: fits a c_long.
            tv_nsec: d.subsec_nanos() as libc::c_long,
        });
        let tsp = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: `raw` holds exactly `nfds` writable pollfd entries and outlives the call;
        // `tsp` is null or points to `ts`, alive until the call returns; no signal mask.
        unsafe { libc::ppoll(raw.as_mut_ptr(), nfds, tsp, std::ptr::null()) }
    } else {
        let timeout_ms = match timeout {
            None => -1,
            Some(d) => {
                let ms = d.as_nanos().div_ceil(1_000_000);
                libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
            }
        };
        // SAFETY: `raw` holds exactly `nfds` writable pollfd entries and outlives the call.
        unsafe { libc::poll(raw.as_mut_ptr(), nfds, timeout_ms) }
    };
    for p in fds.iter_mut() {
        p.ready = false;
        p.writable = false;
    }
    match cvt(ret) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(0),
        Err(e) => return Err(e),
    }
    let mut n = 0;
    for (p, r) in fds.iter_mut().zip(raw.iter()) {
        p.ready = r.revents & !libc::POLLOUT != 0;
        p.writable = r.revents & libc::POLLOUT != 0;
        n += usize::from(p.ready || p.writable);
    }
    Ok(n)
}

/// A periodic `timerfd(2)` on `CLOCK_MONOTONIC`, non-blocking: readable once per period
/// (missed periods add up), for a loop that sleeps in [`poll`] without a timeout and still
/// wants a turn every so often. A poll(2) with a timeout arms an hrtimer and cancels it on
/// every call; the timerfd's timer is armed once.
#[derive(Debug)]
pub struct TimerFd {
    fd: OwnedFd,
}

impl TimerFd {
    /// A timer that fires every `period` from now on.
    pub fn periodic(period: Duration) -> io::Result<TimerFd> {
        // SAFETY: timerfd_create takes only integers; the result is checked by cvt.
        let raw = cvt(unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        })?;
        // SAFETY: `raw` was just returned by timerfd_create, is open and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(period.as_secs()).unwrap_or(libc::time_t::MAX),
            // Below 10^9: fits a c_long.
            tv_nsec: period.subsec_nanos() as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        // SAFETY: `spec` is a valid itimerspec for the call; no old value is asked for.
        cvt(unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) })?;
        Ok(TimerFd { fd })
    }

    /// Reads and resets the expirations since the last call (0 if none, without blocking).
    pub fn drain(&self) -> io::Result<u64> {
        drain_counter(&self.fd)
    }
}

impl AsRawFd for TimerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn thread_cpu_time_counts_work_not_sleep() {
        let a = thread_cpu_time();
        std::thread::sleep(Duration::from_millis(30));
        let b = thread_cpu_time();
        // Asleep: far less CPU than wall time.
        assert!(b - a < Duration::from_millis(15), "{:?}", b - a);
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(20) {
            std::hint::spin_loop();
        }
        assert!(thread_cpu_time() > b);
        set_timer_slack(Duration::from_micros(1)).unwrap();
        set_timer_slack(Duration::ZERO).unwrap();
    }

    #[test]
    fn eventfd_counts_and_drains() {
        let ev = EventFd::new().unwrap();
        assert_eq!(ev.drain().unwrap(), 0);
        ev.notify().unwrap();
        ev.notify().unwrap();
        ev.notify().unwrap();
        assert_eq!(ev.drain().unwrap(), 3);
        assert_eq!(ev.drain().unwrap(), 0);
    }

    #[test]
    fn poll_times_out_when_nothing_is_ready() {
        let ev = EventFd::new().unwrap();
        let mut fds = [PollFd::new(ev.as_raw_fd())];
        let start = Instant::now();
        assert_eq!(poll(&mut fds, Some(Duration::from_millis(30))).unwrap(), 0);
        assert!(start.elapsed() >= Duration::from_millis(25));
        assert!(!fds[0].ready);
        // Sub-millisecond timeouts are rounded up, not turned into a busy 0.
        assert_eq!(poll(&mut fds, Some(Duration::from_micros(1))).unwrap(), 0);
    }

    #[test]
    fn poll_sees_notify_from_another_thread() {
        let ev = Arc::new(EventFd::new().unwrap());
        let idle = EventFd::new().unwrap();
        let waker = {
            let ev = Arc::clone(&ev);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                ev.notify().unwrap();
            })
        };
        let mut fds = [PollFd::new(idle.as_raw_fd()), PollFd::new(ev.as_raw_fd())];
        let n = poll(&mut fds, Some(Duration::from_secs(10))).unwrap();
        waker.join().unwrap();
        assert_eq!(n, 1);
        assert!(!fds[0].ready);
        assert!(fds[1].ready);
        assert_eq!(ev.drain().unwrap(), 1);
        // Drained: no longer ready.
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 0);
    }

    #[test]
    fn poll_ignores_negative_fds_and_empty_sets() {
        let mut fds = [PollFd::new(-1)];
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 0);
        assert_eq!(poll(&mut [], Some(Duration::ZERO)).unwrap(), 0);
    }

    #[test]
    fn poll_reports_hangup_even_when_not_waiting_for_input() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(b);
        let mut fds = [PollFd::with_events(a.as_raw_fd(), false, false)];
        assert_eq!(poll(&mut fds, Some(Duration::from_secs(5))).unwrap(), 1);
        assert!(fds[0].ready);
    }

    #[test]
    fn poll_reports_writable_only_when_asked() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut fds = [PollFd::new(a.as_raw_fd())];
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 0);
        let mut fds = [PollFd::with_events(a.as_raw_fd(), true, true)];
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 1);
        assert!(fds[0].writable && !fds[0].ready);
    }

    #[test]
    fn poll_reports_writable_again_once_a_full_queue_drains() {
        use std::io::{Read, Write};
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let chunk = [0u8; 4096];
        let mut queued = 0usize;
        while let Ok(n) = a.write(&chunk) {
            queued += n;
        }
        let mut fds = [PollFd::with_events(a.as_raw_fd(), false, true)];
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 0);
        assert!(!fds[0].writable);
        let mut buf = vec![0u8; queued];
        let mut read = 0;
        while read < queued {
            match b.read(&mut buf[read..]) {
                Ok(n) => read += n,
                Err(_) => break,
            }
        }
        assert_eq!(poll(&mut fds, Some(Duration::from_secs(5))).unwrap(), 1);
        assert!(fds[0].writable);
    }

    #[test]
    fn timerfd_fires_each_period_and_drains() {
        let t = TimerFd::periodic(Duration::from_millis(5)).unwrap();
        assert_eq!(t.drain().unwrap(), 0);
        let mut fds = [PollFd::new(t.as_raw_fd())];
        assert_eq!(poll(&mut fds, None).unwrap(), 1);
        assert!(t.drain().unwrap() >= 1);
        // Drained: not ready until the next period.
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 0);
        assert_eq!(poll(&mut fds, None).unwrap(), 1);
    }

    #[test]
    fn poll_of_more_fds_than_fit_on_the_stack_reports_the_right_one() {
        let evs: Vec<EventFd> = (0..11).map(|_| EventFd::new().unwrap()).collect();
        let mut fds: Vec<PollFd> = evs.iter().map(|e| PollFd::new(e.as_raw_fd())).collect();
        for k in [0, 7, 8, 10] {
            evs[k].notify().unwrap();
            assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 1, "fd {k}");
            for (j, f) in fds.iter().enumerate() {
                assert_eq!(f.ready, j == k, "fd {j} after notifying {k}");
            }
            evs[k].drain().unwrap();
        }
    }

    #[test]
    fn eventfd_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<EventFd>();
    }
}
