//! `/sys/module/fuse/parameters/enable_uring` set for the tests that need it and restored
//! afterwards: the kernel offers FUSE over io_uring to a new mount only while it is `Y`
//! (fs/fuse/dev_uring.c), and a test must not leave the machine changed.
//!
//! Within one test process the guards share the setting: the first [`FuseUring::enabled`]
//! remembers the old value and sets `Y`, the last one dropped writes the old value back. A
//! [`FuseUring::disabled`] guard (for the test of the refusal) waits until no enabled guard
//! is held, and holds the others off while it lives.

use std::io;
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The module parameter.
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

static MODE: RwLock<()> = RwLock::new(());
/// Enabled guards held, and the value to restore when the last goes.
static HELD: Mutex<(usize, Option<String>)> = Mutex::new((0, None));

enum Hold {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] RwLockWriteGuard<'static, ()>, String),
}

/// The parameter held at a value; restored on drop.
pub struct FuseUring {
    hold: Hold,
}

fn read() -> io::Result<String> {
    std::fs::read_to_string(ENABLE_URING)
        .map(|s| s.trim().to_string())
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{ENABLE_URING}: {e} (a kernel without FUSE over io_uring?)"),
            )
        })
}

fn write(v: &str) -> io::Result<()> {
    std::fs::write(ENABLE_URING, v)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot write {v} to {ENABLE_URING}: {e}")))
}

impl FuseUring {
    /// Sets the parameter to `Y` while the guard lives.
    ///
    /// # Errors
    ///
    /// The parameter does not exist (a kernel before 6.14, or built without it) or cannot
    /// be written (not root).
    pub fn enabled() -> io::Result<FuseUring> {
        let g = MODE.read().unwrap_or_else(|e| e.into_inner());
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if held.0 == 0 {
            let old = read()?;
            write("Y")?;
            held.1 = Some(old);
        }
        held.0 += 1;
        Ok(FuseUring {
            hold: Hold::Shared(g),
        })
    }

    /// Sets the parameter to `N` while the guard lives (no enabled guard is held meanwhile).
    ///
    /// # Errors
    ///
    /// As [`enabled`](Self::enabled).
    pub fn disabled() -> io::Result<FuseUring> {
        let g = MODE.write().unwrap_or_else(|e| e.into_inner());
        let old = read()?;
        write("N")?;
        Ok(FuseUring {
            hold: Hold::Alone(g, old),
        })
    }
}

impl Drop for FuseUring {
    fn drop(&mut self) {
        match &self.hold {
            Hold::Shared(_) => {
                let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
                held.0 -= 1;
                if held.0 == 0 {
                    if let Some(old) = held.1.take() {
                        let _ = write(&old);
                    }
                }
            }
            Hold::Alone(_, old) => {
                let _ = write(old);
            }
        }
    }
}
