//! Backing stores for AoE exports, and the worker pool that serves them asynchronously.
//!
//! Layer: beside the protocol engines, below the target daemon. A [`Backend`] is a byte range
//! of a file or block device addressed in bytes; [`Pool`] runs reads, writes and flushes on
//! worker threads so the daemon's event loop never waits on the disk, and hands finished jobs
//! back through a channel plus a caller-supplied wake-up (an eventfd in the daemon).
//!
//! The daemon sees every store through [`AsyncBackend`] (submit a [`Request`], collect its
//! [`Done`] from [`Completions`] after a wake-up): a synchronous [`Backend`] through
//! [`PoolBackend`] on the worker pool, a natively asynchronous store (Ceph RBD, in `aoe-rbd`)
//! directly.
//!
//! What it does not do: know about frames or AoE. The daemon says where in its buffers the
//! data lives ([`Op`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod aio;
mod fair;
mod file;
mod pool;
mod range_lock;

pub use aio::{read_runs, AsyncBackend, Completions, PoolBackend, ReadRun, Request};
pub use fair::FairQueue;
pub use file::{FileBackend, OpenOptions, UnalignedEdges};
pub use pool::{Done, Job, Op, Pool};

use std::io;

/// Why a store operation failed, sorted by what the reply to the initiator must say (the
/// target daemon maps it to an ATA status in one function, `ata_failure`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The medium failed (EIO): the disk's fault, reported as an uncorrectable error.
    #[error("medium error: {0}")]
    Medium(io::Error),
    /// The backing file ended before the range (shrunk under the export): the operator's.
    #[error("short read: {0}")]
    ShortRead(io::Error),
    /// Anything else (ENOSPC, EROFS, a range past the end, ...): the command is aborted.
    #[error("{0}")]
    Other(io::Error),
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> StoreError {
        if e.raw_os_error() == Some(libc::EIO) {
            StoreError::Medium(e)
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            StoreError::ShortRead(e)
        } else {
            StoreError::Other(e)
        }
    }
}

/// What a store was doing when a system call failed, with the call's own error as its
/// [`source`](std::error::Error::source): the store hands it on as an `io::Error` of the
/// same kind (`io::Error::new(kind, Failed { .. })`), whose `source()` is that original
/// error, so a caller can still ask for its errno (`raw_os_error`, EMFILE for the target's
/// open-file hint). Until session 36 the stores wrote the errno's text into a new
/// `io::Error` and its number was lost. Its own text names the step and the path only, as
/// the errno's text follows it in a chain (`{:#}` of anyhow: `cannot open x.img: No such
/// file or directory (os error 2)`).
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct Failed {
    what: String,
    #[source]
    source: io::Error,
}

impl Failed {
    /// `source` under `what` (the step and the path), as an `io::Error` of `source`'s kind.
    pub fn wrap(source: io::Error, what: String) -> io::Error {
        io::Error::new(source.kind(), Failed { what, source })
    }
}

/// A byte-addressed store an export reads and writes.
///
/// Implementations are shared between worker threads, so methods take `&self` and must be
/// safe to call concurrently on disjoint or overlapping ranges (positional I/O).
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Size in bytes.
    fn len(&self) -> u64;

    /// True for a zero-length store.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` from byte `offset`. A range past the end is an error
    /// (`InvalidInput`), never a short read.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes `buf` at byte `offset`. A range past the end is an error (`InvalidInput`), so
    /// nothing outside the export is ever written.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every completed write durable (fdatasync).
    fn flush(&self) -> io::Result<()>;

    /// Writes `len` zero bytes at `offset`; by default with [`Backend::write_at`] in pieces
    /// of at most 64 KiB (checked against the size first, so nothing is written for a range
    /// past the end).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        const PIECE: u64 = 64 * 1024;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "zeroed range overflows"))?;
        if end > self.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} is outside the export of {} bytes",
                    self.len()
                ),
            ));
        }
        let zeroes = vec![0u8; len.min(PIECE) as usize];
        let mut at = offset;
        while at < end {
            let n = (end - at).min(PIECE) as usize;
            self.write_at(&zeroes[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Reads like [`Backend::read_at`] if that can be done without blocking (the data is
    /// cached); `Ok(false)` if it would block and the caller should use a worker instead.
    fn try_read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<bool> {
        Ok(false)
    }

    /// Where a read of `len` bytes at `offset` may be tried without blocking by the caller's
    /// own means (the target's io_uring batch, `RWF_NOWAIT`): the file and the byte position
    /// in it. `Ok(None)`: use [`try_read_at`](Self::try_read_at) (or a worker) instead, as
    /// for O_DIRECT, a memory file system and a store that is not a file. A range outside the
    /// store is the error [`read_at`](Self::read_at) would give.
    fn nowait_read_source(
        &self,
        _offset: u64,
        _len: usize,
    ) -> io::Result<Option<(std::os::fd::BorrowedFd<'_>, u64)>> {
        Ok(None)
    }

    /// Where a read of `len` bytes at `offset` may be done by the caller's own means without
    /// waiting for a device, several contiguous ones in one call (the target's `preadv2`
    /// of a receive batch's contiguous reads): the file, the byte position in it, and whether
    /// the read needs `RWF_NOWAIT` for that. By default [`nowait_read_source`]'s answer,
    /// with `RWF_NOWAIT`; a file on a memory file system, whose reads never wait for a
    /// device, needs none. `Ok(None)`: use [`try_read_at`](Self::try_read_at) (or a worker).
    ///
    /// [`nowait_read_source`]: Self::nowait_read_source
    fn inline_read_source(&self, offset: u64, len: usize) -> io::Result<Option<ReadSource<'_>>> {
        Ok(self
            .nowait_read_source(offset, len)?
            .map(|(fd, pos)| ReadSource {
                fd,
                pos,
                nowait: true,
            }))
    }

    /// Writes like [`Backend::write_at`] if that can be done without waiting for a device or
    /// a server (a file on a local disk without `RWF_NOWAIT` writes may still wait briefly:
    /// see [`FileBackend`]'s); `Ok(false)` if it would block (nothing, or only part, may
    /// have been written: the caller writes the whole range again through a worker).
    fn try_write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<bool> {
        Ok(false)
    }

    /// [`try_write_at`](Self::try_write_at) of the slices of `bufs` (at most
    /// [`aoe_sys::MAX_WRITEV`]) one after the other from `offset`: the contiguous writes of a
    /// receive batch in one system call where the store can (a file: one `pwritev`). Same
    /// answers: `Ok(false)`, nothing or part written, the caller writes every slice again
    /// through a worker; an error, the caller tries each slice alone to learn which fails.
    /// The default writes the slices one by one.
    fn try_write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<bool> {
        let mut at = offset;
        for b in bufs {
            if !self.try_write_at(b, at)? {
                return Ok(false);
            }
            at += b.len() as u64;
        }
        Ok(true)
    }

    /// True if writes are refused.
    fn read_only(&self) -> bool;

    /// True while the store has latched a write-back failure and refuses writes and flushes
    /// (see [`FileBackend::failed`]); for status and metrics.
    fn failed(&self) -> bool {
        false
    }
}

/// Where a store's read may be done without a worker ([`Backend::inline_read_source`]).
#[derive(Debug, Clone, Copy)]
pub struct ReadSource<'a> {
    /// The file to read.
    pub fd: std::os::fd::BorrowedFd<'a>,
    /// The byte position of the read in it.
    pub pos: u64,
    /// True if only a read with `RWF_NOWAIT` is sure not to wait (the data may not be
    /// cached); false where reads never wait for a device (a memory file system).
    pub nowait: bool,
}

/// Checks that `len` bytes at `offset` lie inside a store of `size` bytes.
pub(crate) fn check_range(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} is outside the export of {size} bytes"),
        )),
    }
}

/// A store held in memory, for tests and benchmarks.
#[derive(Debug)]
pub struct MemBackend {
    data: std::sync::RwLock<Vec<u8>>,
}

impl MemBackend {
    /// A zero-filled store of `len` bytes.
    pub fn new(len: usize) -> MemBackend {
        MemBackend {
            data: std::sync::RwLock::new(vec![0; len]),
        }
    }

    /// A copy of the contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().map(|d| d.clone()).unwrap_or_default()
    }
}

impl Backend for MemBackend {
    fn len(&self) -> u64 {
        self.data.read().map(|d| d.len() as u64).unwrap_or(0)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self
            .data
            .read()
            .map_err(|_| io::Error::other("memory store poisoned"))?;
        check_range(offset, buf.len(), d.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self
            .data
            .write()
            .map_err(|_| io::Error::other("memory store poisoned"))?;
        check_range(offset, buf.len(), d.len() as u64)?;
        let o = offset as usize;
        d[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn read_only(&self) -> bool {
        false
    }
}
