//! How the process ends: by `SIGPIPE` for the command-line tools (a closed standard output
//! ends them as it ends `cat`), or at once with `_exit(2)` for a daemon that leaves a
//! library's threads running on purpose ([`exit_now`]).
//!
//! Rust programs start with `SIGPIPE` ignored, so a write to a pipe whose reader has gone
//! fails with `EPIPE`, and `println!` turns that failure into a panic (`aoe bench ... | head -1`
//! printed a backtrace). The daemons want it ignored (a gone NBD client or control-socket
//! client is an error on that connection, not the end of the process); a tool that prints a
//! report wants what every C tool has: the default action, the process ended by the signal,
//! quietly, its shell status 141.

/// Restores `SIGPIPE`'s default action for the whole process, so a write to a pipe or stream
/// socket whose reader has gone ends the process (for tools whose only such writes are their
/// standard output; never for a daemon).
pub fn sigpipe_default() {
    // SAFETY: signal(2) with SIG_DFL changes only the process's disposition of SIGPIPE; it
    // installs no handler, so no code of ours runs in signal context.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Ends the process as a tool with the default `SIGPIPE` action ends when it writes to a
/// closed pipe: by the signal (shell status 141), without a message. For a process that keeps
/// `SIGPIPE` ignored and has just seen its standard output fail with `EPIPE`.
pub fn die_of_sigpipe() -> ! {
    sigpipe_default();
    // SAFETY: raise(3) sends SIGPIPE to the calling thread; its action is now the default
    // (end the process), so it does not return unless the signal is blocked in this thread.
    unsafe {
        libc::raise(libc::SIGPIPE);
    }
    // Blocked: the status a shell would have shown.
    std::process::exit(128 + libc::SIGPIPE)
}

/// Ends the process at once with status `code` (`_exit(2)`): no `atexit` handler and no C++
/// static destructor runs. For a daemon that leaves a library's threads running on purpose,
/// e.g. librados' with requests still in flight after a drain gave up: `exit(3)` destroys
/// that library's globals under its running threads, and librados then aborts
/// ("terminate called after throwing an instance of 'boost::wrapexcept<boost::bad_get>'",
/// SIGABRT instead of the status the daemon chose; TEST-AUDIT, session 31). Standard output
/// is flushed first; standard error is unbuffered.
pub fn exit_now(code: i32) -> ! {
    use std::io::Write as _;
    let _ = std::io::stdout().lock().flush();
    // SAFETY: _exit(2) ends the process; it touches no memory of ours and never returns.
    unsafe { libc::_exit(code) }
}
