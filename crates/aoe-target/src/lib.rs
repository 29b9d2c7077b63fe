//! The AoE target daemon: exports files and block devices as shelf.slot.
//!
//! Layer: the I/O driver around [`aoe_proto::target::Engine`]. It owns the sockets
//! (`aoe-sys`), the backing stores and their worker pool (`aoe-store`), configuration,
//! persistent state, signals and logs. The protocol decisions are the engine's.
//!
//! ```text
//!   AF_PACKET socket --recvmmsg--> Daemon::dispatch --frame--> Engine::handle_frame
//!        ^                                                      |        |
//!        |                                        Reply(n) <----+        +----> Io(token, op)
//!        |                                           |                           |
//!        +--------sendmmsg------- send queue <-------+                   Pool (worker threads)
//!                                     ^                                          |
//!                                     +---- Engine::complete(token) <--- eventfd wake-up
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backing;
pub mod config;
pub mod control;
mod daemon;
pub mod probe;
pub mod state;

pub use backing::CEPH_CONNECT_TIMEOUT;
pub use config::{CephOptions, ExportSpec, IoMode, Overrides, ServeConfig};
pub use daemon::{validate, Control, Daemon, WorkLost};

/// What to add to an error caused by EMFILE or ENFILE ("Too many open files", "... in
/// system"): the limit it ran into and how to raise it, since the error alone names neither
/// (session 35: 1024 exports under the usual soft limit of 1024 ended in `cannot open FILE:
/// Too many open files (os error 24)` and nothing else). Empty for other errors. The binary
/// raises the soft limit to the hard one at start (`aoe_sys::raise_nofile_limit`), so what
/// is left to raise is the hard limit, or for ENFILE the system's `fs.file-max`.
///
/// Found by the errno of an `io::Error` in `e`'s chain: the stores keep the call's own
/// error as the source of theirs (`aoe_store::Failed`). Until session 36 they kept only its
/// text and this matched "(os error 24)" in the text.
pub fn nofile_hint(e: &anyhow::Error) -> String {
    let errno = e.chain().find_map(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .filter(|n| [aoe_sys::EMFILE, aoe_sys::ENFILE].contains(n))
    });
    match errno {
        Some(aoe_sys::EMFILE) => nofile_text(aoe_sys::nofile_limit().ok()),
        Some(_) => ": the system's limit on open files (fs.file-max) is reached: raise it \
                    (`sysctl fs.file-max=N`) or close files elsewhere"
            .to_owned(),
        None => String::new(),
    }
}

/// The text of [`nofile_hint`] for the limits `(soft, hard)`, if known.
fn nofile_text(limits: Option<(u64, u64)>) -> String {
    let limit = limits.map_or_else(
        || "the open-file limit (RLIMIT_NOFILE)".to_owned(),
        |(soft, hard)| format!("the open-file limit (RLIMIT_NOFILE) of {soft} (hard {hard})"),
    );
    format!(
        ": {limit} is reached: each export, interface and device holds descriptors; raise \
         the hard limit (`ulimit -Hn N` as root before the start, LimitNOFILE= in a systemd \
         unit)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emfile_names_the_limit_and_other_errors_nothing() {
        let e = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::EMFILE))
            .context("e1.2: cannot open x.img");
        let hint = nofile_hint(&e);
        assert!(hint.contains("RLIMIT_NOFILE"), "{hint}");
        assert!(hint.contains("ulimit -Hn"), "{hint}");
        let other = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(nofile_hint(&other), "");
        // As aoe-store names the file: its own error, the errno's as its source.
        let named = aoe_store::Failed::wrap(
            std::io::Error::from_raw_os_error(libc::EMFILE),
            "cannot open x.img".to_owned(),
        );
        let named = anyhow::Error::from(named).context("e1.2");
        assert!(nofile_hint(&named).contains("RLIMIT_NOFILE"));
        let system = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::ENFILE));
        assert!(nofile_hint(&system).contains("fs.file-max"));
        // The text alone is not the errno: a message that quotes it is no EMFILE.
        let quoted = anyhow::anyhow!("cannot open x.img: Too many open files (os error 24)");
        assert_eq!(nofile_hint(&quoted), "");
        assert_eq!(
            nofile_text(Some((1024, 4096))),
            ": the open-file limit (RLIMIT_NOFILE) of 1024 (hard 4096) is reached: each \
             export, interface and device holds descriptors; raise the hard limit (`ulimit \
             -Hn N` as root before the start, LimitNOFILE= in a systemd unit)"
        );
    }
}
