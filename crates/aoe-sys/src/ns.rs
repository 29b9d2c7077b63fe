//! Network namespaces (`setns(2)`) and process limits.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::cvt;

/// Moves the **calling thread** into the network namespace at `path` (usually
/// `/run/netns/NAME`, as made by `ip netns add NAME`), with `setns(fd, CLONE_NEWNET)`.
///
/// Only this thread changes namespace; other threads of the process stay where they are, and
/// threads it spawns afterwards start in the new namespace. Sockets opened before keep their
/// namespace. Needs `CAP_SYS_ADMIN`. Prefer [`run_in_netns`], which confines the change to a
/// throw-away thread, unless the whole thread is meant to live in the namespace.
///
/// # Errors
///
/// `NotFound` naming the path if it does not exist; `InvalidInput` if it is not a network
/// namespace file (`EINVAL`); `PermissionDenied` without the capability.
pub fn enter_netns(path: &Path) -> io::Result<()> {
    let file = File::open(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot open network namespace {}: {e}", path.display()),
        )
    })?;
    // SAFETY: setns(2) takes an open fd (borrowed from `file`, alive for the call) and a flag.
    cvt(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }).map_err(|e| {
        let kind = if e.raw_os_error() == Some(libc::EINVAL) {
            io::ErrorKind::InvalidInput
        } else {
            e.kind()
        };
        io::Error::new(
            kind,
            format!("cannot enter network namespace {}: {e}", path.display()),
        )
    })?;
    Ok(())
}

/// Runs `f` on a new thread that first [enters](enter_netns) the network namespace at `path`,
/// and returns its result. The calling thread's namespace is untouched.
///
/// Typical use: open a [`PacketSocket`](crate::PacketSocket) inside a namespace, then use it
/// from anywhere (a socket keeps the namespace it was created in).
///
/// # Errors
///
/// The error of [`enter_netns`]; `f` is then not run. A panic in `f` is propagated.
pub fn run_in_netns<T, F>(path: &Path, f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || -> io::Result<T> {
            enter_netns(path)?;
            Ok(f())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, for daemons serving many exports or
/// targets (each packet socket, eventfd and backing file is a descriptor). The soft limit
/// is 1024 on most hosts (and under systemd, whose hard limit is 524288: systemd.exec(5),
/// `LimitNOFILE=`, asks daemons that need more to raise their own soft limit, since 1024
/// stays for programs that still use `select(2)`); `aoe serve` holds one descriptor per
/// export, so 1024 exports failed to start with EMFILE (session 35). Returns the soft
/// limit in force afterwards.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a writable rlimit that outlives the call.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a readable rlimit that outlives the call.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok(lim.rlim_cur)
}

/// errno of an open or socket call past `RLIMIT_NOFILE` ("Too many open files").
pub const EMFILE: i32 = libc::EMFILE;

/// errno of an open or socket call past the system-wide limit on open files
/// (`fs.file-max`: "Too many open files in system").
pub const ENFILE: i32 = libc::ENFILE;

/// The process's `RLIMIT_NOFILE`: (soft, hard).
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a writable rlimit that outlives the call.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    Ok((lim.rlim_cur, lim.rlim_max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_namespace_is_not_found_and_named() {
        let err = run_in_netns(Path::new("/run/netns/no-such-aoe-ns"), || ()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("no-such-aoe-ns"), "{err}");
    }

    #[test]
    fn a_regular_file_is_not_a_namespace() {
        let err = run_in_netns(Path::new("/proc/self/status"), || ()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    }

    #[test]
    fn own_namespace_can_be_entered_on_a_thread() {
        // Entering the namespace we are already in is allowed, with CAP_SYS_ADMIN.
        if aoe_testkit::is_root() {
            let got = run_in_netns(Path::new("/proc/self/ns/net"), || 7).unwrap();
            assert_eq!(got, 7);
        }
    }

    #[test]
    fn nofile_limit_can_be_raised() {
        let soft = raise_nofile_limit().unwrap();
        assert_eq!(nofile_limit().unwrap(), (soft, soft));
    }
}
