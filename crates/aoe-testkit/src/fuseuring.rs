//! `/sys/module/fuse/parameters/enable_uring` set for the tests that need it and restored
//! afterwards: the kernel offers FUSE over io_uring to a new mount only while it is `Y`
//! (fs/fuse/dev_uring.c), and a test must not leave the machine changed.
//!
//! The guards share the setting across every test process on the machine, not only within
//! one (session 34's merge saw one test binary set `N` under another's mount, and restore
//! the other's value): a [`FuseUring::enabled`] guard holds a lock file shared
//! (`flock(2)`, `LOCK_SH`), a [`FuseUring::disabled`] one exclusively, so a disabled guard
//! waits until no enabled guard is held anywhere and holds the others off while it lives.
//! The first enabled holder remembers the value it found in a state file beside the lock,
//! with the process ids of the holders; the last one gone writes it back. A holder that
//! died without its drop (a killed test) is dropped from the list by the next holder, which
//! keeps the value the first one found, so the machine is still left as found.
//!
//! The files live in `/run` (`AOE_TESTKIT_FUSE_URING_DIR` names another directory, and
//! `AOE_TESTKIT_FUSE_URING_PARAM` another parameter file: for the tests of this module).

use std::fs::{File, OpenOptions};
use std::io;
use std::path::PathBuf;

use aoe_sys::Flock;

/// The module parameter.
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// The parameter's path ([`ENABLE_URING`] unless the environment names another).
fn param() -> PathBuf {
    std::env::var_os("AOE_TESTKIT_FUSE_URING_PARAM")
        .map_or_else(|| ENABLE_URING.into(), PathBuf::from)
}

/// The lock (`.lock`: shared by enabled guards, exclusive for a disabled one), the mutex
/// around the state file (`.mutex`) and the state file (`.state`).
fn file(ext: &str) -> PathBuf {
    let dir =
        std::env::var_os("AOE_TESTKIT_FUSE_URING_DIR").map_or_else(|| "/run".into(), PathBuf::from);
    dir.join(format!("aoe-testkit-fuse-uring.{ext}"))
}

fn locked(ext: &str, kind: Flock) -> io::Result<File> {
    let path = file(ext);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    aoe_sys::flock(&f, kind)
        .map_err(|e| io::Error::new(e.kind(), format!("flock {}: {e}", path.display())))?;
    Ok(f)
}

fn read() -> io::Result<String> {
    let p = param();
    std::fs::read_to_string(&p)
        .map(|s| s.trim().to_string())
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{}: {e} (a kernel without FUSE over io_uring?)",
                    p.display()
                ),
            )
        })
}

fn write(v: &str) -> io::Result<()> {
    let p = param();
    std::fs::write(&p, v).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot write {v} to {}: {e}", p.display()),
        )
    })
}

/// The state file: the value the first enabled holder found, and the holders' pids (one
/// line each, a pid once per guard).
struct State {
    found: String,
    pids: Vec<u32>,
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl State {
    /// The state file, its dead holders dropped; `None` if there is none (or it is empty).
    fn load() -> io::Result<Option<State>> {
        let text = match std::fs::read_to_string(file("state")) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut lines = text.lines();
        let Some(found) = lines.next().filter(|f| !f.is_empty()) else {
            return Ok(None);
        };
        let pids = lines
            .filter_map(|l| l.trim().parse().ok())
            .filter(|&p| alive(p))
            .collect();
        Ok(Some(State {
            found: found.to_string(),
            pids,
        }))
    }

    fn store(&self) -> io::Result<()> {
        let mut text = format!("{}\n", self.found);
        for p in &self.pids {
            text.push_str(&format!("{p}\n"));
        }
        std::fs::write(file("state"), text)
    }

    fn remove() -> io::Result<()> {
        match std::fs::remove_file(file("state")) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

enum Hold {
    /// An enabled guard: the lock held shared.
    Shared(#[allow(dead_code)] File),
    /// A disabled guard: the lock held alone, and the value to write back.
    Alone(#[allow(dead_code)] File, String),
}

/// The parameter held at a value; restored on drop.
pub struct FuseUring {
    hold: Hold,
}

impl FuseUring {
    /// Sets the parameter to `Y` while the guard lives (waiting while a disabled guard is
    /// held in any process).
    ///
    /// # Errors
    ///
    /// The parameter does not exist (a kernel before 6.14, or built without it) or cannot
    /// be written (not root), or the lock files cannot be made.
    pub fn enabled() -> io::Result<FuseUring> {
        let mutex = locked("mutex", Flock::Exclusive)?;
        let lock = locked("lock", Flock::Shared)?;
        let mut state = match State::load()? {
            Some(s) => s,
            None => State {
                found: String::new(),
                pids: Vec::new(),
            },
        };
        if state.pids.is_empty() {
            // The first holder (or the first after holders that died): the value found is
            // kept from a dead first holder's state, else read now.
            if state.found.is_empty() {
                state.found = read()?;
            }
            write("Y")?;
        }
        state.pids.push(std::process::id());
        state.store()?;
        drop(mutex);
        Ok(FuseUring {
            hold: Hold::Shared(lock),
        })
    }

    /// Sets the parameter to `N` while the guard lives (no enabled guard is held meanwhile,
    /// in any process).
    ///
    /// # Errors
    ///
    /// As [`enabled`](Self::enabled).
    pub fn disabled() -> io::Result<FuseUring> {
        let lock = locked("lock", Flock::Exclusive)?;
        // No enabled guard lives; a state file left is that of holders that died, and holds
        // the value found before them.
        let old = match State::load()? {
            Some(s) => {
                State::remove()?;
                s.found
            }
            None => read()?,
        };
        write("N")?;
        Ok(FuseUring {
            hold: Hold::Alone(lock, old),
        })
    }
}

impl Drop for FuseUring {
    fn drop(&mut self) {
        match &self.hold {
            Hold::Shared(_) => {
                // Written back before the shared lock goes (with the guard's fields after
                // this), so a disabled guard waiting for it finds the value restored.
                let Ok(_mutex) = locked("mutex", Flock::Exclusive) else {
                    return;
                };
                let Ok(Some(mut state)) = State::load() else {
                    return;
                };
                let me = std::process::id();
                if let Some(i) = state.pids.iter().position(|&p| p == me) {
                    state.pids.remove(i);
                }
                if state.pids.is_empty() {
                    let _ = write(&state.found);
                    let _ = State::remove();
                } else {
                    let _ = state.store();
                }
            }
            Hold::Alone(_, old) => {
                let _ = write(old);
            }
        }
    }
}
