//! A pool of I/O worker threads with a bounded queue: a flood of requests or a slow disk
//! cannot grow it without limit; a full queue refuses the job and the caller drops the
//! request (an AoE initiator retransmits). Workers take queued jobs round-robin by
//! [`Job::source`] ([`FairQueue`] says why and what order it keeps).

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::{Backend, Completions, FairQueue};

/// One operation and where its data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `offset` into `buf[at..at + len]`.
    Read {
        /// Byte offset in the backend.
        offset: u64,
        /// Where in [`Job::buf`] the data goes.
        at: Range<usize>,
    },
    /// Write `buf[from]` at `offset`.
    Write {
        /// Byte offset in the backend.
        offset: u64,
        /// Where in [`Job::buf`] the data is.
        from: Range<usize>,
    },
    /// fdatasync.
    Flush,
    /// Write `len` zero bytes at `offset` (no buffer).
    WriteZeroes {
        /// Byte offset in the backend.
        offset: u64,
        /// Bytes to zero.
        len: u64,
    },
}

/// Work for the pool.
#[derive(Debug)]
pub struct Job {
    /// The store.
    pub backend: Arc<dyn Backend>,
    /// What to do.
    pub op: Op,
    /// The caller's handle, returned in [`Done`].
    pub user: u64,
    /// Who asked (the target: the initiator's MAC and the export): queued jobs are taken
    /// round-robin by source, in order within one.
    pub source: u64,
    /// The buffer reads fill and writes take their data from; returned in [`Done`].
    pub buf: Vec<u8>,
}

/// A finished job.
#[derive(Debug)]
pub struct Done {
    /// The caller's handle.
    pub user: u64,
    /// The job's buffer, filled for reads.
    pub buf: Vec<u8>,
    /// What happened.
    pub result: io::Result<()>,
}

/// The queue the workers share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when a job is queued while a worker waits, and at the pool's end.
    work: Condvar,
    /// `State::queue.len()`, readable without the lock ([`Pool::queued`]).
    queued: AtomicUsize,
}

#[derive(Debug)]
struct State {
    queue: FairQueue<Job>,
    /// Workers waiting on `work`: a submit signals only if one does.
    idle: usize,
    /// The pool is being dropped: workers finish what is queued and stop.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker never panics holding the lock (it runs jobs outside it), so a poisoned
        // lock still guards a consistent queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next job, waiting for one; None once the pool is closed and drained.
    fn take(&self) -> Option<Job> {
        let mut st = self.lock();
        loop {
            if let Some(job) = st.queue.pop() {
                self.queued.store(st.queue.len(), Ordering::Relaxed);
                return Some(job);
            }
            if st.closed {
                return None;
            }
            st.idle += 1;
            st = self.work.wait(st).unwrap_or_else(|e| e.into_inner());
            st.idle -= 1;
        }
    }
}

/// Worker threads that run [`Job`]s and report [`Done`]s.
pub struct Pool {
    shared: Arc<Shared>,
    done: Arc<Completions>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl Pool {
    /// Starts `threads` workers that take jobs from a queue of at most `queue` jobs. `wake`
    /// is called after each job completes, from the worker thread (the daemon passes an
    /// eventfd notify so its poll loop wakes up). The queue of finished jobs is not bounded
    /// here: it never holds more than the jobs submitted and not yet taken back, which the
    /// caller bounds (the target by its buffer counts).
    pub fn new(
        threads: usize,
        queue: usize,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> io::Result<Pool> {
        Pool::with_completions(threads, queue, Completions::new(wake))
    }

    /// Like [`Pool::new`], but finished jobs go to `done`, a queue the caller may share
    /// with other stores (the daemon's one completion queue for every export).
    pub fn with_completions(
        threads: usize,
        queue: usize,
        done: Arc<Completions>,
    ) -> io::Result<Pool> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: FairQueue::new(queue.max(1)),
                idle: 0,
                closed: false,
            }),
            work: Condvar::new(),
            queued: AtomicUsize::new(0),
        });
        let mut pool = Pool {
            shared,
            done,
            workers: Vec::new(),
        };
        for i in 0..threads.max(1) {
            let shared = pool.shared.clone();
            let done = pool.done.clone();
            // On an error `pool` is dropped: the workers started so far are stopped.
            let h = std::thread::Builder::new()
                .name(format!("aoe-io-{i}"))
                .spawn(move || {
                    while let Some(mut job) = shared.take() {
                        let result = run(&mut job);
                        done.push(Done {
                            user: job.user,
                            buf: job.buf,
                            result,
                        });
                    }
                })?;
            pool.workers.push(h);
        }
        Ok(pool)
    }

    /// Queues a job without waiting; gives it back if the queue is full.
    pub fn try_submit(&self, job: Job) -> Result<(), Job> {
        let mut st = self.shared.lock();
        if st.closed {
            return Err(job);
        }
        st.queue.push(job.source, job)?;
        self.shared.queued.store(st.queue.len(), Ordering::Relaxed);
        let wake = st.idle > 0;
        drop(st);
        if wake {
            self.shared.work.notify_one();
        }
        Ok(())
    }

    /// Jobs queued and not yet taken by a worker.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// A finished job, if any, without waiting.
    pub fn try_done(&self) -> Option<Done> {
        self.done.try_pop()
    }

    /// Waits for a finished job.
    pub fn wait_done(&self, timeout: std::time::Duration) -> Option<Done> {
        self.done.wait(timeout)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn run(job: &mut Job) -> io::Result<()> {
    match &job.op {
        Op::Read { offset, at } => {
            let buf = job.buf.get_mut(at.clone()).ok_or_else(bad_range)?;
            job.backend.read_at(buf, *offset)
        }
        Op::Write { offset, from } => {
            let buf = job.buf.get(from.clone()).ok_or_else(bad_range)?;
            job.backend.write_at(buf, *offset)
        }
        Op::Flush => job.backend.flush(),
        Op::WriteZeroes { offset, len } => job.backend.write_zeroes(*offset, *len),
    }
}

fn bad_range() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "job range outside its buffer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemBackend;
    use std::time::Duration;

    #[test]
    fn jobs_complete_with_their_buffers() {
        let mem = Arc::new(MemBackend::new(4096));
        let woke = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = woke.clone();
        let pool = Pool::new(
            2,
            16,
            Arc::new(move || {
                w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }),
        )
        .unwrap();
        let mut buf = vec![0u8; 612];
        buf[100..612].fill(7);
        pool.try_submit(Job {
            backend: mem.clone(),
            op: Op::Write {
                offset: 512,
                from: 100..612,
            },
            user: 1,
            source: 0,
            buf,
        })
        .unwrap();
        let d = pool.wait_done(Duration::from_secs(5)).unwrap();
        assert_eq!(d.user, 1);
        d.result.unwrap();
        pool.try_submit(Job {
            backend: mem.clone(),
            op: Op::Read {
                offset: 512,
                at: 36..548,
            },
            user: 2,
            source: 0,
            buf: vec![0u8; 600],
        })
        .unwrap();
        let d = pool.wait_done(Duration::from_secs(5)).unwrap();
        assert!(d.buf[36..548].iter().all(|x| *x == 7));
        // Out of range: an error, nothing written.
        pool.try_submit(Job {
            backend: mem.clone(),
            op: Op::Write {
                offset: 4000,
                from: 0..512,
            },
            user: 3,
            source: 0,
            buf: vec![1u8; 512],
        })
        .unwrap();
        let d = pool.wait_done(Duration::from_secs(5)).unwrap();
        assert!(d.result.is_err());
        assert!(mem.snapshot()[3584..].iter().all(|x| *x == 0));
        pool.try_submit(Job {
            backend: mem,
            op: Op::Flush,
            user: 4,
            source: 0,
            buf: Vec::new(),
        })
        .unwrap();
        pool.wait_done(Duration::from_secs(5))
            .unwrap()
            .result
            .unwrap();
        // `Completions::push` hands the job over and then calls the wake-up, so the last
        // job can be taken before its wake-up has run: wait for the count, not for the job.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while woke.load(std::sync::atomic::Ordering::SeqCst) < 4
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(woke.load(std::sync::atomic::Ordering::SeqCst), 4);
    }

    /// A backend whose reads wait until the test opens the gate.
    #[derive(Debug)]
    struct Gate(std::sync::Mutex<bool>, std::sync::Condvar);

    impl Backend for Gate {
        fn len(&self) -> u64 {
            512
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
            let mut open = self.0.lock().unwrap();
            while !*open {
                open = self.1.wait(open).unwrap();
            }
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_queue_gives_the_job_back() {
        let gate = Arc::new(Gate(Default::default(), Default::default()));
        let pool = Pool::new(1, 2, Arc::new(|| {})).unwrap();
        let job = |user| Job {
            backend: gate.clone(),
            op: Op::Read {
                offset: 0,
                at: 0..0,
            },
            user,
            source: 0,
            buf: Vec::new(),
        };
        // One job blocks the worker, two wait in the queue, the fourth is refused.
        let mut accepted = 0;
        let mut refused = Vec::new();
        for u in 0..4 {
            match pool.try_submit(job(u)) {
                Ok(()) => accepted += 1,
                Err(j) => refused.push(j.user),
            }
            if u == 0 {
                // Let the worker take the first job off the queue.
                while pool.queued() != 0 {
                    std::thread::yield_now();
                }
            }
        }
        assert_eq!((accepted, refused), (3, vec![3]));
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        for _ in 0..3 {
            pool.wait_done(Duration::from_secs(5)).unwrap();
        }
    }
}
