//! A copy of the running test binary, to be killed by a signal mid-test.
//!
//! For tests of what a test process killed by a signal (a run stopped by hand or by a
//! time-out) leaves behind: its destructors never run, so whatever they would have cleaned
//! up (a FUSE mount, a network namespace, the `aoe serve` it started) is left to someone
//! else. The test starts a copy of its own binary running the same test with an environment
//! variable set ([`KilledCopy::spawn`]); the copy sees the variable, sets things up, says
//! what it made ([`hold`]) and waits; the test kills it ([`KilledCopy::kill`]) and checks
//! what is left.

use std::ffi::OsStr;
use std::io::{self, BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// What the copy prints before the words it passes back.
const MARK: &str = "AOE-KILLED-COPY";

/// The copy's side: prints `words` for [`KilledCopy::spawn`] to return, then waits to be
/// killed (it panics if it is not within 10 minutes).
pub fn hold(words: &[String]) -> ! {
    println!("{MARK} {}", words.join(" "));
    std::thread::sleep(Duration::from_secs(600));
    panic!("the copy of the test binary was not killed");
}

/// A copy of the running test binary running one test. Dropping it SIGKILLs the copy and the
/// processes named with [`also_kill`](Self::also_kill), then runs the
/// [`on_drop`](Self::on_drop) clean-ups, so that a failing test leaks nothing.
pub struct KilledCopy {
    child: Child,
    pids: Vec<u32>,
    on_drop: Vec<Box<dyn FnOnce()>>,
}

impl KilledCopy {
    /// Runs `test` (its full name, as `--exact` takes it) in a copy of this test binary with
    /// `env` set to `value`, and waits until the copy calls [`hold`]; returns the copy and
    /// the words it passed.
    ///
    /// # Errors
    ///
    /// The copy cannot start, or ends its output without calling [`hold`] (it is killed).
    pub fn spawn(
        test: &str,
        env: &str,
        value: impl AsRef<OsStr>,
    ) -> io::Result<(KilledCopy, Vec<String>)> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(env, value)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let copy = KilledCopy {
            child,
            pids: Vec::new(),
            on_drop: Vec::new(),
        };
        for line in BufReader::new(stdout).lines() {
            // The words follow libtest's "test NAME ... " on the same line.
            if let Some((_, words)) = line?.split_once(MARK) {
                let words = words.split_whitespace().map(str::to_owned).collect();
                return Ok((copy, words));
            }
        }
        Err(io::Error::other(format!(
            "the copy running {test} ended its output without saying what it holds"
        )))
    }

    /// The copy's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs `pid` too when this guard is dropped (a process the copy started).
    pub fn also_kill(&mut self, pid: u32) {
        self.pids.push(pid);
    }

    /// Runs `f` when this guard is dropped, after the SIGKILLs (e.g. an unmount).
    pub fn on_drop(&mut self, f: impl FnOnce() + 'static) {
        self.on_drop.push(Box::new(f));
    }

    /// SIGKILLs the copy and waits for it to end.
    pub fn kill(&mut self) -> io::Result<()> {
        self.child.kill()?;
        self.child.wait().map(drop)
    }
}

impl Drop for KilledCopy {
    fn drop(&mut self) {
        let _ = self.kill();
        for &pid in &self.pids {
            crate::signal(pid, "KILL");
        }
        for f in self.on_drop.drain(..) {
            f();
        }
    }
}
