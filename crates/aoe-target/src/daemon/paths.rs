//! Whether each export's path still names the file it serves.
//!
//! A file renamed over (`mv new.img disk.img`) or removed while it is served keeps being
//! read and written through the open descriptor, the old inode, until a reload (SIGHUP)
//! reopens the path, as vblade does (it holds its descriptor too). That is the right thing
//! to serve, since the initiators' data is there, but an operator who replaced the image
//! wants to be told: once per export, a warning saying which path no longer names the
//! served file and that a reload reopens it; and the status and metrics say so
//! (`path_replaced`, `aoe_target_path_replaced`) while it lasts.
//!
//! An export sized by its file (no `length`) keeps the size it was opened with until a
//! reload, whatever happens to the file: truncated shorter (by `truncate`, or by a `cp` over
//! it, which truncates the same inode before it writes), its reads past the new end fail;
//! grown, the initiators keep seeing the old size. Either is warned about once (again if
//! it turns into the other), naming the sizes and the reload (SIGHUP) that serves the new
//! one.
//!
//! The look is a `stat(2)` of every path, which on a hung network file system does not
//! return: it runs on a thread of its own, started every [`CHECK_EVERY`] ticks when the last
//! one has answered, never on the event loop (the reload's opens moved to a thread for the
//! same reason).

use std::sync::mpsc;

use super::*;

/// Ticks (seconds) between two looks at the paths.
pub(super) const CHECK_EVERY: u32 = 5;

/// A look at the paths under way: its answers, once the thread is done.
pub(super) type PathCheck = mpsc::Receiver<Vec<Look>>;

/// What a look found for one export.
#[derive(Debug)]
pub(super) struct Look {
    id: u32,
    /// If its path no longer names the file opened, what it names.
    replaced: Option<&'static str>,
    /// For an export sized by its file, the path still naming it: its size now (bytes; a
    /// block device's in sectors, as [`exports::file_identity`] gives it) and whether it
    /// is a block device.
    size: Option<(u64, bool)>,
}

impl Daemon {
    /// The refresh tick's look: takes the answers of the last look if it is done, and starts
    /// the next every [`CHECK_EVERY`] ticks if none is under way.
    pub(super) fn check_paths(&mut self) {
        if let Some(rx) = &self.path_check {
            match rx.try_recv() {
                Ok(answers) => {
                    self.path_check = None;
                    self.take_path_answers(answers);
                }
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => self.path_check = None,
            }
        }
        if self.ticks % CHECK_EVERY != 0 {
            return;
        }
        let looks: Vec<(u32, ExportSpec, (u64, u64, u64))> = self
            .exports
            .iter()
            .filter(|(_, rt)| !rt.retiring)
            .filter_map(|(id, rt)| rt.file.map(|f| (*id, rt.spec.clone(), f)))
            .collect();
        if looks.is_empty() {
            return;
        }
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("aoe-path-check".into())
            .spawn(move || {
                let answers = looks
                    .into_iter()
                    .map(|(id, spec, (dev, ino, opened_size))| {
                        let now = exports::file_look(&spec);
                        let replaced = match now {
                            Some(((d, i, _), _)) if (d, i) == (dev, ino) => None,
                            Some(_) => Some("names another file now (renamed over or replaced)"),
                            None => Some("no longer names a file (removed or renamed)"),
                        };
                        // A size of 0: an export with a length of its own (not sized by
                        // its file), or a block device whose size could not be read.
                        let size = match now {
                            Some(((_, _, size), block))
                                if replaced.is_none() && opened_size != 0 =>
                            {
                                Some((size, block))
                            }
                            _ => None,
                        };
                        Look { id, replaced, size }
                    })
                    .collect();
                let _ = tx.send(answers);
            });
        if spawned.is_ok() {
            self.path_check = Some(rx);
        }
    }

    /// Notes each answer on its export; warns once when a path stops naming the served file
    /// (again after it named it once more).
    fn take_path_answers(&mut self, answers: Vec<Look>) {
        for Look { id, replaced, size } in answers {
            let Some(rt) = self.exports.get_mut(&id) else {
                continue;
            };
            let opened = rt.file.map_or(0, |f| f.2);
            match size {
                Some((now, block)) if now != opened && opened != 0 => {
                    let shorter = now < opened;
                    if rt.size_warned != Some(shorter) && !rt.retiring {
                        let a = rt.spec.addr();
                        let unit = if block { "sectors" } else { "bytes" };
                        let what = if shorter {
                            "reads past its new end fail (an ATA error) and writes there \
                             extend it"
                        } else {
                            "initiators see the old size"
                        };
                        tracing::warn!(
                            "{}.{}: {} is {now} {unit} now, {opened} when the export opened it \
                             (truncated, grown, or copied over): {what}; a reload (SIGHUP) \
                             serves the new size",
                            a.shelf,
                            a.slot,
                            rt.spec.path.display()
                        );
                    }
                    rt.size_warned = Some(shorter);
                }
                _ => rt.size_warned = None,
            }
            if let (Some(what), false, false) = (replaced, rt.path_replaced, rt.retiring) {
                let a = rt.spec.addr();
                tracing::warn!(
                    "{}.{}: {} {what}; the export goes on reading and writing the file it \
                     opened, not what the path names, until a reload (SIGHUP) reopens the path",
                    a.shelf,
                    a.slot,
                    rt.spec.path.display()
                );
            }
            rt.path_replaced = replaced.is_some();
        }
    }
}
