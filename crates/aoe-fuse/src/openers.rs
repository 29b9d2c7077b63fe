//! A queue lane of its own for each open of a device file: the source
//! ([`Handle::new_source`]) its I/O is submitted from, named by the FUSE file handle the
//! open answers.
//!
//! The engine serves a device's queued I/O in turn among its sources, 256 KiB at a time
//! (`aoe_proto::initiator::queue`). With every device file of the mount one source, two
//! processes on one file queued behind each other: a backup reading with 64 requests of
//! 256 KiB in flight (the mount's `max_background`, 16 MiB) held a database's 4 KiB read
//! until all of them had gone out. Now each open is a source, taken at `OPEN` and given back
//! at `RELEASE`.
//!
//! Why per open file (the FUSE file handle) and not per process (the request header's pid):
//! - the header's pid is the calling *thread's* id: a process's threads would each be a
//!   source, and a process with many threads would get that many shares; an open file
//!   description is what its threads (and `fork`ed children sharing the descriptor) use
//!   together, as one NBD connection is one client whatever its depth;
//! - the kernel's own requests carry a file handle but not their cause's pid: write-back of
//!   pages dirtied through a shared mapping (also of a file opened in the direct I/O mode,
//!   `FUSE_DIRECT_IO_ALLOW_MMAP`, which puts the inode in the cached mode) is sent by a
//!   flusher kworker with the handle of one of the inode's writable opens
//!   (fs/fuse/file.c `fuse_write_file_get`), read-ahead with the reader's handle;
//! - a handle has an end, `RELEASE`, sent once the kernel holds no request of it (each
//!   request pins the open file: fs/fuse/file.c `fuse_file_put`); a pid has none that FUSE
//!   sees, so a table by pid would need an age limit and could hand a live process's lane
//!   to another.
//!
//! Ordering: each source keeps its own order (the engine's overlap rule holds within a
//! lane), and the write fence holds across sources. Ops of different opens in flight at
//! once are concurrent, and the kernel sends no write while an overlapping one it must see
//! land first is unanswered: a page is written back again only after its write-back was
//! answered (`fuse_writepage_add`, "secondary" requests; newer kernels wait on the folio's
//! write-back), and a direct write first waits for the write-back of its range
//! (`fuse_direct_io`, `filemap_write_and_wait_range`); buffered writes are written through
//! one at a time under the inode lock (no `FUSE_WRITEBACK_CACHE`, [`crate::fs`]). An op
//! submitted after another completed sees it: its frames were all answered, and a late copy
//! of it is fenced (aoe-proto's `sim_sources_writing_overlapping_ranges_undo_nothing_acknowledged`).
//!
//! At most [`FILE_SOURCES`] opens have a source of their own at once; the opens beyond share
//! the mount's one source (the lane all the files had before), and a warning says so once:
//! a process opening a file 100000 times costs [`FILE_SOURCES`] lanes and handles, not
//! 100000. A lane exists in the engine only while its source has I/O queued.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use aoe_initiator::net::Handle;

/// Opens with a source of their own at once: beyond, opens share the mount's source.
/// Four times the NBD server's connection places (64): an open costs a handle here and a
/// lane in the engine only while it has I/O queued.
pub(crate) const FILE_SOURCES: u32 = 256;

/// The file-handle bit of an open in the kernel's direct I/O mode (`FOPEN_DIRECT_IO`,
/// [`crate::fs::AoeFs::open_node`]).
const DIRECT_BIT: u64 = 1;

/// The file handle answered to an open: its source's slot (0: the mount's shared source)
/// above the direct-mode bit.
pub(crate) fn file_handle(slot: u32, direct: bool) -> u64 {
    (u64::from(slot) << 1) | if direct { DIRECT_BIT } else { 0 }
}

/// Whether file handle `fh` is an open in the kernel's direct I/O mode.
pub(crate) fn is_direct(fh: u64) -> bool {
    fh & DIRECT_BIT != 0
}

/// The source slot of file handle `fh` (0: the shared source, also for a handle not ours).
fn slot_of(fh: u64) -> u32 {
    u32::try_from(fh >> 1)
        .ok()
        .filter(|s| *s <= FILE_SOURCES)
        .unwrap_or(0)
}

/// Which of the slots `1..=cap` are taken; the free ones handed out lowest first.
#[derive(Debug)]
struct Slots {
    taken: Vec<bool>,
    /// Free slots, the lowest last (taken first).
    free: Vec<u32>,
}

impl Slots {
    fn new(cap: u32) -> Slots {
        Slots {
            taken: vec![false; cap as usize + 1],
            free: (1..=cap).rev().collect(),
        }
    }

    /// A free slot, or None when all are taken.
    fn take(&mut self) -> Option<u32> {
        let s = self.free.pop()?;
        self.taken[s as usize] = true;
        Some(s)
    }

    /// Gives slot `s` back; false (nothing done) if it was not taken (0, out of range, or
    /// given back already).
    fn give_back(&mut self, s: u32) -> bool {
        match self.taken.get_mut(s as usize) {
            Some(t) if *t && s > 0 => {
                *t = false;
                self.free.push(s);
                true
            }
            _ => false,
        }
    }
}

/// The sources of a mount's open device files.
pub(crate) struct Openers {
    /// The mount's own source: opens beyond [`FILE_SOURCES`], and anything without a
    /// handle of ours.
    shared: Handle,
    /// Slot `s`'s handle at `s - 1`, made the first time the slot is taken and kept for the
    /// next open given it (a source is a number: one reused after `RELEASE` names no I/O
    /// left, since the kernel releases an open only once none of its requests is pending).
    handles: Box<[OnceLock<Handle>]>,
    slots: Mutex<Slots>,
    /// The shared-source fallback was warned about.
    warned: AtomicBool,
}

impl Openers {
    /// Sources for a mount whose shared source is `shared`.
    pub(crate) fn new(shared: Handle) -> Openers {
        Openers {
            shared,
            handles: (0..FILE_SOURCES).map(|_| OnceLock::new()).collect(),
            slots: Mutex::new(Slots::new(FILE_SOURCES)),
            warned: AtomicBool::new(false),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A source for a new open: its slot (0, the shared source, once all are taken).
    pub(crate) fn open(&self) -> u32 {
        let slot = self.slots().take();
        match slot {
            Some(s) => {
                self.handles[s as usize - 1].get_or_init(|| self.shared.new_source());
                s
            }
            None => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "more than {FILE_SOURCES} device files open at once: the opens beyond \
                         share one queue lane (served in turn with the others as one client)"
                    );
                }
                0
            }
        }
    }

    /// The release of the open with file handle `fh`: its slot is free again.
    pub(crate) fn release(&self, fh: u64) {
        let s = slot_of(fh);
        if s > 0 {
            self.slots().give_back(s);
        }
    }

    /// The handle to submit the I/O of the open with file handle `fh` through.
    pub(crate) fn handle(&self, fh: u64) -> &Handle {
        match slot_of(fh) {
            0 => &self.shared,
            s => self.handles[s as usize - 1].get().unwrap_or(&self.shared),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_handles_carry_the_slot_and_the_mode() {
        for slot in [0, 1, 2, FILE_SOURCES] {
            for direct in [false, true] {
                let fh = file_handle(slot, direct);
                assert_eq!(slot_of(fh), slot);
                assert_eq!(is_direct(fh), direct);
            }
        }
        // The handles before per-open sources (0 cached, 1 direct) are the shared slot's.
        assert_eq!((slot_of(0), is_direct(0)), (0, false));
        assert_eq!((slot_of(1), is_direct(1)), (0, true));
        // Not ours: the shared source.
        assert_eq!(slot_of(file_handle(FILE_SOURCES + 1, false)), 0);
        assert_eq!(slot_of(u64::MAX), 0);
    }

    /// A process opening a file 100000 times holds every slot, then shares slot 0; the
    /// slots come back at release, and one given back twice is free once.
    #[test]
    fn slots_are_capped_and_come_back() {
        let mut s = Slots::new(4);
        let got: Vec<Option<u32>> = (0..100_000).map(|_| s.take()).collect();
        assert_eq!(&got[..5], &[Some(1), Some(2), Some(3), Some(4), None]);
        assert!(got[5..].iter().all(Option::is_none));
        assert_eq!(s.free.capacity(), 4, "nothing grew with the refused opens");
        assert!(s.give_back(3));
        assert!(!s.give_back(3), "given back twice");
        assert!(!s.give_back(0) && !s.give_back(9));
        assert_eq!(s.take(), Some(3));
        assert_eq!(s.take(), None);
        for k in 1..=4 {
            assert!(s.give_back(k));
        }
        assert_eq!(s.take(), Some(4), "the last given back first");
    }
}
