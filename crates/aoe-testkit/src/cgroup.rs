//! A pids cgroup for a test: processes started in it share a cap on tasks (threads and
//! processes), as a service's `TasksMax=` (systemd.resource-control(5)) or a container's
//! `pids.max` sets, and fork or `pthread_create` past it fail with EAGAIN
//! (Documentation/admin-guide/cgroup-v1/pids.rst, cgroup-v2.rst "PID").
//!
//! cgroup v2 is used where its root offers the pids controller, else the v1 hierarchy at
//! `/sys/fs/cgroup/pids`; neither there is an error naming both (a test fails with it).
//! Root only. The group is removed on drop once its processes have ended.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A cgroup with a `pids.max`, removed on drop.
pub struct PidsCgroup {
    dir: PathBuf,
}

/// Where pids cgroups can be made: the v2 root if it has the pids controller (enabled for
/// its children here), else the v1 pids hierarchy.
fn pids_hierarchy() -> io::Result<PathBuf> {
    let v2 = Path::new("/sys/fs/cgroup");
    let controllers = std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "pids") {
        std::fs::write(v2.join("cgroup.subtree_control"), "+pids")?;
        return Ok(v2.to_path_buf());
    }
    let v1 = v2.join("pids");
    if v1.join("cgroup.procs").exists() {
        return Ok(v1);
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no pids cgroup controller: neither /sys/fs/cgroup/cgroup.controllers (v2) lists \
         pids nor is /sys/fs/cgroup/pids (v1) mounted",
    ))
}

impl PidsCgroup {
    /// A new cgroup `PREFIX-PID-N` whose processes may hold at most `max` tasks.
    pub fn new(prefix: &str, max: u32) -> io::Result<PidsCgroup> {
        let dir = pids_hierarchy()?.join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir)?;
        let cg = PidsCgroup { dir };
        std::fs::write(cg.dir.join("pids.max"), max.to_string())?;
        Ok(cg)
    }

    /// The group's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// `cmd` (program, arguments and environment changes) started inside the group: a
    /// shell writes its own pid into `cgroup.procs` and execs the program, so the pid stays
    /// the program's and everything it starts is counted from its first thread.
    pub fn command(&self, cmd: &Command) -> Command {
        let mut wrapped = Command::new("sh");
        wrapped
            .args(["-c", "echo $$ > \"$0\" && exec \"$@\""])
            .arg(self.dir.join("cgroup.procs"))
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(v) => wrapped.env(key, v),
                None => wrapped.env_remove(key),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
    }

    /// A number the group reports (`pids.current`, `pids.peak` where the kernel has it,
    /// `pids.max`); None if it cannot be read.
    pub fn read(&self, file: &str) -> Option<u64> {
        std::fs::read_to_string(self.dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Forks and thread creations refused at `pids.max` so far (`pids.events`' `max`).
    pub fn refused(&self) -> Option<u64> {
        let events = std::fs::read_to_string(self.dir.join("pids.events")).ok()?;
        events
            .lines()
            .find_map(|l| l.strip_prefix("max "))?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for PidsCgroup {
    /// Removes the group once its last process has ended (rmdir fails with EBUSY until
    /// then; up to 10 s).
    fn drop(&mut self) {
        let gone = crate::wait_until(Duration::from_secs(10), || {
            std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists()
        });
        if !gone {
            eprintln!(
                "cannot remove cgroup {}: processes left",
                self.dir.display()
            );
        }
    }
}
