//! The stores keep the errno of a failed system call: `FileBackend::open`'s error has the
//! call's own `io::Error` as its source (`aoe_store::Failed`), so the target can tell EMFILE
//! from its number (`aoe_target::nofile_hint`). Until session 36 the store wrote the errno's
//! text into a new `io::Error` and the number was lost (`raw_os_error` None in the chain).
//!
//! A test binary of its own: it lowers its own process's soft RLIMIT_NOFILE (with
//! prlimit(1), since this crate has no unsafe code) and must not share the process with
//! other tests.

use std::error::Error as _;
use std::io;
use std::process::Command;

use aoe_store::{FileBackend, OpenOptions};

/// The errno of the first `io::Error` in `e`'s source chain (`e` itself included) that has one.
fn chain_errno(e: &io::Error) -> Option<i32> {
    let mut at: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = at {
        if let Some(n) = c
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            return Some(n);
        }
        at = c.source();
    }
    None
}

#[test]
fn a_failed_open_keeps_its_errno_and_kind() {
    // ENOENT: the kind and the number, and the text names the path and the errno.
    let e = FileBackend::open(
        std::path::Path::new("/nonexistent/x.img"),
        &OpenOptions::default(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    assert_eq!(chain_errno(&e), Some(libc::ENOENT), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/x.img"), "{e}");
    assert!(
        e.source()
            .is_some_and(|s| s.to_string().contains("os error 2")),
        "{e:?}"
    );

    // EMFILE: the soft open-file limit lowered to the lowest free descriptor, so the next
    // open(2) (which takes the lowest free one) is past it.
    let image = tempfile::NamedTempFile::new().unwrap();
    image.as_file().set_len(8 * 512).unwrap();
    let lowest_free = {
        let probe = std::fs::File::open("/dev/null").unwrap();
        std::os::fd::AsRawFd::as_raw_fd(&probe)
    };
    let st = Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={lowest_free}:"))
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(st.success(), "prlimit: {st}");
    let e = FileBackend::open(image.path(), &OpenOptions::default()).unwrap_err();
    assert_eq!(chain_errno(&e), Some(libc::EMFILE), "{e:?}");
    assert!(
        e.to_string().contains(&image.path().display().to_string()),
        "{e}"
    );
}
