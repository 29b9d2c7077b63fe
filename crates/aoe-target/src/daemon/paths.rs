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
//! The look is a `stat(2)` of every path, which on a hung network file system does not
//! return: it runs on a thread of its own, started every [`CHECK_EVERY`] ticks when the last
//! one has answered, never on the event loop (the reload's opens moved to a thread for the
//! same reason).

use std::sync::mpsc;

use super::*;

/// Ticks (seconds) between two looks at the paths.
pub(super) const CHECK_EVERY: u32 = 5;

/// A look at the paths under way: its answers, once the thread is done: each export's id
/// and, if its path no longer names the file opened, what it names.
pub(super) type PathCheck = mpsc::Receiver<Vec<(u32, Option<&'static str>)>>;

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
        let looks: Vec<(u32, ExportSpec, (u64, u64))> = self
            .exports
            .iter()
            .filter(|(_, rt)| !rt.retiring)
            .filter_map(|(id, rt)| {
                rt.file
                    .map(|(dev, ino, _)| (*id, rt.spec.clone(), (dev, ino)))
            })
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
                    .map(|(id, spec, opened)| {
                        let now = exports::file_identity(&spec).map(|(dev, ino, _)| (dev, ino));
                        let replaced = match now {
                            Some(now) if now == opened => None,
                            Some(_) => Some("names another file now (renamed over or replaced)"),
                            None => Some("no longer names a file (removed or renamed)"),
                        };
                        (id, replaced)
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
    fn take_path_answers(&mut self, answers: Vec<(u32, Option<&'static str>)>) {
        for (id, replaced) in answers {
            let Some(rt) = self.exports.get_mut(&id) else {
                continue;
            };
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
