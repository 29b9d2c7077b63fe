//! A control group of a test's own, to run a daemon under resource limits as a service
//! manager would (`MemoryMax=`, `CPUQuota=`, `TasksMax=`), removed on drop.
//!
//! Works on both layouts a host may have: the unified hierarchy (cgroup v2, `/sys/fs/cgroup`
//! with `cgroup.controllers` naming the controller), where the group is made under the root
//! and the controller enabled in the root's `cgroup.subtree_control` if it is not; and the
//! per-controller hierarchies of cgroup v1 (`/sys/fs/cgroup/pids`, `/sys/fs/cgroup/memory`,
//! ...), where it is made under the group this process is in, so whatever limits that one
//! has still apply. The limit files differ by layout ([`Cgroup::v2`] says which one it is):
//! v2 `pids.max` / `memory.max` / `memory.peak` / `cpu.max`, v1 `pids.max` /
//! `memory.limit_in_bytes` / `memory.max_usage_in_bytes` / `cpu.cfs_quota_us`.
//!
//! A process joins with [`Cgroup::wrap`]: `sh` writes its own pid into `cgroup.procs` and
//! execs the program, so the program is in the group from its first instruction (its
//! threads and memory all counted there, none charged elsewhere first).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A child control group of one controller, removed (`rmdir`) on drop once its processes
/// have gone; the test must end them first (an [`crate::NsChild`] dropped before it).
#[derive(Debug)]
pub struct Cgroup {
    dir: PathBuf,
    v2: bool,
}

impl Cgroup {
    /// Makes a group `aoe-test-PID-N` for `controller` (`pids`, `memory`, `cpu`). Fails
    /// with the reason where the host has no such controller to delegate.
    pub fn new(controller: &str) -> io::Result<Cgroup> {
        let name = format!("aoe-test-{}-{}", std::process::id(), crate::next_id());
        let unified = Path::new("/sys/fs/cgroup");
        let listed = fs::read_to_string(unified.join("cgroup.controllers")).unwrap_or_default();
        if listed.split_whitespace().any(|c| c == controller) {
            let sub = unified.join("cgroup.subtree_control");
            let on = fs::read_to_string(&sub)?;
            if !on.split_whitespace().any(|c| c == controller) {
                fs::write(&sub, format!("+{controller}"))?;
            }
            let dir = unified.join(name);
            fs::create_dir(&dir)?;
            return Ok(Cgroup { dir, v2: true });
        }
        let base = Path::new("/sys/fs/cgroup").join(controller);
        if !base.join("cgroup.procs").exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no {controller} controller: neither in /sys/fs/cgroup/cgroup.controllers \
                     (cgroup v2) nor mounted at {} (cgroup v1)",
                    base.display()
                ),
            ));
        }
        // v1: lines `ID:CONTROLLERS:PATH` of /proc/self/cgroup; this process's group in
        // that hierarchy.
        let own = fs::read_to_string("/proc/self/cgroup")?
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
                ctrls
                    .split(',')
                    .any(|c| c == controller)
                    .then(|| path.trim_start_matches('/').to_owned())
            })
            .next()
            .unwrap_or_default();
        let dir = base.join(own).join(name);
        fs::create_dir(&dir)?;
        Ok(Cgroup { dir, v2: false })
    }

    /// Whether this is a cgroup v2 group (else v1), which decides the limit files' names.
    pub fn v2(&self) -> bool {
        self.v2
    }

    /// The group's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `value` to the group's file `file` (`pids.max`, `memory.max`, ...).
    pub fn write(&self, file: &str, value: &str) -> io::Result<()> {
        fs::write(self.dir.join(file), value)
            .map_err(|e| io::Error::new(e.kind(), format!("{}/{file}: {e}", self.dir.display())))
    }

    /// The group's file `file`, trimmed.
    pub fn read(&self, file: &str) -> io::Result<String> {
        fs::read_to_string(self.dir.join(file)).map(|s| s.trim().to_owned())
    }

    /// The value of `key` in a flat-keyed file (`pids.events`, `memory.events`,
    /// `cpu.stat`, v1's `memory.oom_control`); None if the key is not there.
    pub fn stat(&self, file: &str, key: &str) -> Option<u64> {
        self.read(file).ok()?.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
    }

    /// `cmd` (program, arguments, environment) run through `sh`, which moves itself into
    /// this group and execs the program: the pid is the program's, and it is in the group
    /// before it starts.
    pub fn wrap(&self, cmd: &Command) -> Command {
        let mut w = Command::new("sh");
        w.arg("-c")
            .arg(r#"echo $$ > "$0" && exec "$@""#)
            .arg(self.dir.join("cgroup.procs"))
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(v) => w.env(key, v),
                None => w.env_remove(key),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            w.current_dir(dir);
        }
        w
    }

    /// Forks and thread creations refused at `pids.max` so far (`pids.events`' `max`).
    pub fn refused(&self) -> Option<u64> {
        self.stat("pids.events", "max")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // A process that was just killed leaves the group a moment later.
        let gone = crate::wait_until(Duration::from_secs(10), || {
            fs::remove_dir(&self.dir).is_ok() || !self.dir.exists()
        });
        if !gone {
            eprintln!(
                "cannot remove cgroup {}: processes left",
                self.dir.display()
            );
        }
    }
}
