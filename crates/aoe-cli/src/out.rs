//! Standard output for the subcommands that keep `SIGPIPE` ignored (`aoe serve`, `aoe target`):
//! `println!` panics when the pipe's reader has gone (`aoe target monitor | head -3`); these
//! end the process quietly instead, by the signal, as a C tool ends (aoe-sys `sigpipe`).
//! The other tools (`aoe bench`, `aoe read`, the aoetools, `aoe generate`) restore `SIGPIPE`'s
//! default action at start (`main`), which also covers what libraries print for them.

use std::io::Write;

/// Writes `args` to standard output and flushes it; a closed pipe ends the process by
/// `SIGPIPE`, any other failure with a message and status 1.
pub fn write(args: std::fmt::Arguments<'_>) {
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|()| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            aoe_sys::die_of_sigpipe();
        }
        eprintln!("aoe: write to standard output: {e}");
        std::process::exit(1);
    }
}

/// `println!` that ends the process quietly on a closed standard output ([`fn@write`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that ends the process quietly on a closed standard output ([`fn@write`]).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*))
    };
}
