//! The threads that read partition tables and run `losetup` for the network thread: a pool
//! that grows while work waits, up to a cap, and shrinks when idle.
//!
//! A partition scan blocks its thread on I/O through the network thread (an EBR chain is
//! read one sector after another), and `losetup` reads the device through this daemon, so
//! neither may run on the network thread. Until session 36 each device that came up got a
//! thread of its own: 1024 devices appearing together (one `aoe serve` of 1024 exports)
//! started up to 1031 threads at once, and under a cgroup's `pids.max` (or `ulimit -u`) the
//! spawns that failed left their devices without partition files, with only a warning in the
//! log. Here a job waits in a queue until a thread takes it. A thread is started when the
//! jobs queued outnumber the idle threads, up to [`THREADS`] at once; past that, one more
//! each [`STALL`] in which no queued job could start (threads held by devices that stopped
//! answering, each until its I/O fails after `deadsecs`), up to [`MAX_THREADS`]. The
//! kernel's concurrency-managed workqueues likewise add a worker when the running ones
//! block, up to a work queue's `max_active` (256 by default, `WQ_DFL_ACTIVE`), and the
//! Linux driver's partition scan runs in one (aoecmd.c `aoecmd_sleepwork` calls
//! `aoeblk_gdalloc`, whose `device_add_disk` reads the table). A thread that finds no work
//! for [`IDLE`] ends. A spawn that fails leaves the job queued: a thread of the pool takes
//! it when one is free, and the next [`ScanPool::submit`] or [`ScanPool::retry`] (the
//! network thread's housekeeping calls it every 20 ms) tries to start one again, so no job
//! is dropped for want of a thread, only delayed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A job: a partition scan, a loop device's attach or detach.
pub(crate) type Job = Box<dyn FnOnce() + Send + 'static>;

/// How a thread is started: [`std::thread::Builder::spawn`] with the pool's name (tests
/// put one that fails in its place).
pub(crate) type Spawner =
    Box<dyn Fn(Box<dyn FnOnce() + Send>) -> std::io::Result<()> + Send + Sync>;

/// Threads the pool starts at once while jobs wait. A scan takes a few round trips, so 32
/// threads scan 1024 devices in under a second on a veth link (docs/PERFORMANCE.md, "The
/// initiator with 1024 devices"), and leave the rest of a `pids.max` to the daemon's other
/// threads.
pub(crate) const THREADS: usize = 32;

/// Most threads, reached one each [`STALL`] while no queued job can start: the kernel's
/// `WQ_DFL_ACTIVE`.
pub(crate) const MAX_THREADS: usize = 256;

/// How long queued jobs wait with every thread busy before one more is started past
/// [`THREADS`].
pub(crate) const STALL: Duration = Duration::from_secs(1);

/// How long a thread waits for work before it ends: short, so that the threads a burst
/// of scans started give their places under a `pids.max` back to the daemon's other
/// threads (an NBD connection's) soon after (the kernel's idle workers linger 5 minutes,
/// but take no task slot from a process).
pub(crate) const IDLE: Duration = Duration::from_secs(1);

/// Least time between two tries to start a thread after one failed.
const RETRY: Duration = Duration::from_millis(50);

/// A pool of threads running [`Job`]s in the order submitted.
pub(crate) struct ScanPool {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    work: Condvar,
    /// Jobs wait with no idle thread to take them (a spawn failed, or every thread is
    /// busy): [`ScanPool::retry`] looks at this first, without the lock.
    starved: AtomicBool,
    spawn: Spawner,
    /// [`THREADS`], [`MAX_THREADS`], [`IDLE`], [`STALL`] (tests make them smaller).
    soft: usize,
    cap: usize,
    idle: Duration,
    stall: Duration,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// Threads running (working or idle).
    threads: usize,
    /// Threads waiting for work.
    idle: usize,
    /// Threads started that have not looked at the queue yet: each takes a job, so they
    /// count as idle ones when deciding whether to start another.
    starting: usize,
    /// Most threads ever running at once.
    peak: usize,
    /// When a thread last took a job from the queue, or a thread was started.
    moved: Option<Instant>,
    /// The last failed spawn, and the failures since the last success.
    failed_at: Option<Instant>,
    failures: u64,
    /// The pool was dropped: idle threads end at once.
    stopping: bool,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ScanPool {
    /// A pool whose threads are named `name`, at most [`MAX_THREADS`].
    pub(crate) fn new(name: &'static str) -> ScanPool {
        let spawn: Spawner = Box::new(move |f| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map(drop)
        });
        ScanPool::with(spawn, (THREADS, MAX_THREADS), IDLE, STALL)
    }

    /// A pool starting its threads with `spawn`: `soft` at once while jobs wait, then one
    /// each `stall` in which no queued job could start, at most `cap`; each ends after
    /// `idle` without work.
    pub(crate) fn with(
        spawn: Spawner,
        (soft, cap): (usize, usize),
        idle: Duration,
        stall: Duration,
    ) -> ScanPool {
        let soft = soft.max(1);
        ScanPool {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                starved: AtomicBool::new(false),
                spawn,
                soft,
                cap: cap.max(soft),
                idle,
                stall,
            }),
        }
    }

    /// Queues `job`; it runs on a thread of the pool, one started for it if every thread
    /// is busy and the cap allows.
    pub(crate) fn submit(&self, job: Job) {
        let mut s = lock(&self.inner.state);
        s.queue.push_back(job);
        if s.idle > 0 {
            self.inner.work.notify_one();
        }
        Inner::grow(&self.inner, s, true);
    }

    /// For jobs that wait with no thread to take them: tries again to start a thread after
    /// a spawn failed (at most every [`RETRY`]), and past [`THREADS`] starts one more if
    /// no queued job could start for [`STALL`]. Cheap when no job waits: one atomic load.
    pub(crate) fn retry(&self) {
        if !self.inner.starved.load(Ordering::Relaxed) {
            return;
        }
        let s = lock(&self.inner.state);
        Inner::grow(&self.inner, s, false);
    }

    /// (threads running, jobs queued, most threads at once): for tests and the stop log.
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        let s = lock(&self.inner.state);
        (s.threads, s.queue.len(), s.peak)
    }
}

impl Drop for ScanPool {
    /// Idle threads end at once; jobs still queued are run first (a loop device's detach
    /// among them), each failing fast once the network thread is gone.
    fn drop(&mut self) {
        lock(&self.inner.state).stopping = true;
        self.inner.work.notify_all();
    }
}

impl Inner {
    /// Starts threads while the jobs queued outnumber the idle threads, up to the soft
    /// cap, and past it one if the queue has not moved for the stall time. After a failed
    /// spawn, `submit` tries again at once (the failure may have passed) but `retry` only
    /// every [`RETRY`]. Leaves `starved` set while jobs wait with no idle thread.
    fn grow<'a>(this: &'a Arc<Inner>, mut s: MutexGuard<'a, State>, submitted: bool) {
        loop {
            let waiting = s.queue.len() > s.idle + s.starting;
            this.starved.store(waiting, Ordering::Relaxed);
            if !waiting {
                return;
            }
            let stalled = s.moved.is_none_or(|t| t.elapsed() >= this.stall);
            let room = s.threads < this.soft || (s.threads < this.cap && stalled && !submitted);
            if !room {
                return;
            }
            if !submitted && s.failed_at.is_some_and(|t| t.elapsed() < RETRY) {
                return;
            }
            s.threads += 1;
            s.starting += 1;
            let me = this.clone();
            // Started outside the lock: a thread's creation may take a while, and a
            // worker that ends takes the lock.
            drop(s);
            let started = (this.spawn)(Box::new(move || me.work()));
            s = lock(&this.state);
            match started {
                Ok(()) => {
                    s.peak = s.peak.max(s.threads);
                    s.moved = Some(Instant::now());
                    if s.failures > 0 {
                        tracing::info!(failures = s.failures, "partition scan threads start again");
                    }
                    s.failed_at = None;
                    s.failures = 0;
                }
                Err(e) => {
                    s.threads -= 1;
                    s.starting -= 1;
                    if s.failures == 0 {
                        tracing::warn!(
                            error = %e,
                            threads = s.threads,
                            queued = s.queue.len(),
                            "cannot start a thread for partition scans (a pids.max or \
                             ulimit -u reached?); the scans wait and the start is retried"
                        );
                    }
                    s.failures += 1;
                    s.failed_at = Some(Instant::now());
                    return;
                }
            }
        }
    }

    /// A thread's life: jobs until none comes for [`Inner::idle`].
    fn work(self: Arc<Inner>) {
        let mut s = lock(&self.state);
        s.starting -= 1;
        loop {
            if let Some(job) = s.queue.pop_front() {
                s.moved = Some(Instant::now());
                if s.queue.len() <= s.idle + s.starting {
                    self.starved.store(false, Ordering::Relaxed);
                }
                drop(s);
                job();
                s = lock(&self.state);
                continue;
            }
            if s.stopping {
                break;
            }
            s.idle += 1;
            let (next, timeout) = self
                .work
                .wait_timeout(s, self.idle)
                .unwrap_or_else(|e| e.into_inner());
            s = next;
            s.idle -= 1;
            if timeout.timed_out() && s.queue.is_empty() {
                break;
            }
        }
        s.threads -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn threads(name: &'static str) -> Spawner {
        Box::new(move |f| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map(drop)
        })
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < end, "not within 10 s: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// 1000 jobs that each block until released: the pool grows to its cap, not to a
    /// thread a job (the per-device threads of the base: one each), and every job runs.
    #[test]
    fn blocked_jobs_grow_the_pool_to_its_cap_and_all_run() {
        let pool = ScanPool::with(threads("t-cap"), (8, 8), Duration::from_secs(5), STALL);
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..1000 {
            let (gate, ran) = (gate.clone(), ran.clone());
            pool.submit(Box::new(move || {
                let (m, c) = &*gate;
                let mut open = m.lock().unwrap();
                while !*open {
                    open = c.wait(open).unwrap();
                }
                ran.fetch_add(1, Ordering::SeqCst);
            }));
        }
        wait_for("each of 8 threads holds a job", || pool.counts().1 == 992);
        let (threads, _, peak) = pool.counts();
        assert_eq!((threads, peak), (8, 8), "grown to the cap while jobs wait");
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        wait_for("1000 jobs run", || ran.load(Ordering::SeqCst) == 1000);
        assert_eq!(pool.counts().2, 8, "never more than the cap");
    }

    /// One thread a job waiting, not more: threads started but not yet running count as
    /// taking a job each (the first pool started all 32 for a single device's scan, since
    /// the job stayed queued until its new thread ran).
    #[test]
    fn a_thread_is_started_per_job_waiting_not_per_look() {
        let started: Arc<Mutex<Vec<Job>>> = Arc::default();
        let st = started.clone();
        let spawn: Spawner = Box::new(move |f| {
            st.lock().unwrap().push(f);
            Ok(())
        });
        let pool = ScanPool::with(spawn, (8, 8), Duration::from_secs(5), STALL);
        pool.submit(Box::new(|| {}));
        assert_eq!(pool.counts().0, 1, "one job, one thread");
        pool.submit(Box::new(|| {}));
        pool.retry();
        assert_eq!(pool.counts().0, 2, "two jobs, two threads");
        // The threads run: they take the two jobs and end once idle.
        for f in started.lock().unwrap().drain(..) {
            std::thread::spawn(f);
        }
        wait_for("both jobs taken", || pool.counts().1 == 0);
    }

    /// Every spawn fails for a while (a full `pids.max`): the jobs wait instead of being
    /// dropped, and run once a retry can start a thread.
    #[test]
    fn failed_spawns_leave_jobs_queued_until_a_retry_starts_a_thread() {
        let fail = Arc::new(AtomicBool::new(true));
        let f = fail.clone();
        let spawn: Spawner = Box::new(move |job| {
            if f.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
            }
            std::thread::Builder::new().spawn(job).map(drop)
        });
        let pool = ScanPool::with(spawn, (4, 4), Duration::from_secs(5), STALL);
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..100 {
            let ran = ran.clone();
            pool.submit(Box::new(move || {
                ran.fetch_add(1, Ordering::SeqCst);
            }));
        }
        assert_eq!(
            pool.counts(),
            (0, 100, 0),
            "nothing started, nothing dropped"
        );
        pool.retry();
        assert_eq!(pool.counts().1, 100);
        fail.store(false, Ordering::SeqCst);
        wait_for("a retry past RETRY starts threads", || {
            pool.retry();
            ran.load(Ordering::SeqCst) == 100
        });
    }

    /// Threads without work end after the idle time; a job after that starts one again.
    #[test]
    fn idle_threads_end_and_new_work_starts_one() {
        let pool = ScanPool::with(threads("t-idle"), (4, 4), Duration::from_millis(20), STALL);
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..10 {
            let ran = ran.clone();
            pool.submit(Box::new(move || {
                ran.fetch_add(1, Ordering::SeqCst);
            }));
        }
        wait_for("all idle threads end", || {
            ran.load(Ordering::SeqCst) == 10 && pool.counts().0 == 0
        });
        let r = ran.clone();
        pool.submit(Box::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
        }));
        wait_for("the new job runs", || ran.load(Ordering::SeqCst) == 11);
    }

    /// Jobs that hold their threads (devices that stopped answering) past the soft cap: one
    /// more thread each stall time while the queue does not move, up to the cap, so the
    /// scans behind them still run; and none past the cap.
    #[test]
    fn a_stalled_queue_grows_the_pool_past_the_soft_cap_one_thread_at_a_time() {
        let stall = Duration::from_millis(30);
        let pool = ScanPool::with(threads("t-stall"), (2, 4), Duration::from_secs(5), stall);
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let ran = Arc::new(AtomicUsize::new(0));
        let stuck = |gate: Arc<(Mutex<bool>, Condvar)>| -> Job {
            Box::new(move || {
                let (m, c) = &*gate;
                let mut open = m.lock().unwrap();
                while !*open {
                    open = c.wait(open).unwrap();
                }
            })
        };
        // Three jobs that never finish (until the gate opens), then ten quick ones.
        for _ in 0..3 {
            pool.submit(stuck(gate.clone()));
        }
        for _ in 0..10 {
            let ran = ran.clone();
            pool.submit(Box::new(move || {
                ran.fetch_add(1, Ordering::SeqCst);
            }));
        }
        assert_eq!(pool.counts().0, 2, "the soft cap at once");
        // The third stuck job takes the third thread; the fourth thread runs the rest.
        wait_for(
            "the quick jobs run on threads added past the soft cap",
            || {
                pool.retry();
                ran.load(Ordering::SeqCst) == 10
            },
        );
        assert_eq!(pool.counts().2, 4, "grown to the cap, one stall at a time");
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }
}
