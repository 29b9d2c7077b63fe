//! Export lifecycle: opening exports and interfaces, applying a (re)loaded configuration,
//! the duplicate shelf.slot probe, retiring exports, and checking a config without serving.

use super::*;

pub(super) struct ExportRt {
    pub(super) spec: ExportSpec,
    pub(super) engine: Engine,
    /// The store, through the asynchronous interface (a file on the worker pool, or a
    /// natively asynchronous store).
    pub(super) backend: Arc<dyn AsyncBackend>,
    pub(super) state_file: Option<StateFile>,
    /// The interface each in-flight token answers on, and the [`tick`](Self::tick) it was
    /// handed to the store at.
    pub(super) token_iface: Vec<(usize, u32)>,
    /// The daemon's once-a-second tick ([`Daemon::log_stuck`]), copied here so that noting
    /// a request handed to the store costs no clock read.
    pub(super) tick: u32,
    /// In [`Daemon::busy`] (see there).
    pub(super) listed_busy: bool,
    /// In [`Daemon::touched`] (see there).
    pub(super) listed_touched: bool,
    /// Requests have waited on the store longer than [`super::STUCK_AFTER`]: (the tick it
    /// was first seen, the tick of the last warning, the longest wait seen, in ticks).
    pub(super) stuck: Option<(u32, u32, u32)>,
    /// How long the oldest request in flight has waited on the store, in ticks (seconds),
    /// as of the last tick: the `oldest_request_secs` of the status and metrics.
    pub(super) oldest: u32,
    /// No longer configured: takes no new frames, goes away once its I/O has drained.
    pub(super) retiring: bool,
    /// While retiring: the exports of the same store opened in its place that inherited
    /// its writes in flight ([`WriteOrder::inherit`]), told as each of them ends.
    pub(super) heirs: Vec<u32>,
    /// Requests dropped because the worker queue was full.
    pub(super) pool_full_drops: u64,
    /// Drop counts last logged: (over the buffer count, worker queue full, over the
    /// source's fair share of the buffer count).
    pub(super) drops_logged: (u64, u64, u64),
    /// Replies too long for their interface's frame last logged
    /// ([`aoe_proto::target::Stats::replies_too_long`]).
    pub(super) too_long_logged: u64,
    /// Writes submitted to the store, and writes waiting for an overlapping one (see
    /// [`super::order`]).
    pub(super) writes: WriteOrder<Request>,
    /// The store's side channel when several gateways share it (an `rbd:` image): see
    /// [`super::shared`]. The same store as `backend` for an `rbd:` export.
    pub(super) shared: Option<Arc<dyn crate::backing::SharedStore>>,
    /// A reserve list being stored in `shared`, whose Reserve/Release reply waits for it.
    pub(super) reserve_pending: Option<super::shared::PendingReserve>,
    /// The device, inode and (for an export to the end of a file) size the path named when
    /// it was opened ([`file_identity`]).
    pub(super) file: Option<(u64, u64, u64)>,
    /// The path no longer named the file opened at the last look ([`super::paths`]): the
    /// status's `path_replaced`, warned about once.
    pub(super) path_replaced: bool,
    /// Whether the file was warned about as shorter (true) or longer (false) than when the
    /// export opened it ([`super::paths`]); None while it has that size. Warned again only
    /// when that changes (writes past a shortened end grow it back look by look).
    pub(super) size_warned: Option<bool>,
    /// Reads of the current receive batch held back for a store that
    /// [merges](aoe_store::AsyncBackend::merges_reads) contiguous ones: handed over together
    /// at the batch's end ([`Daemon::submit_gathered_reads`]), so always empty between
    /// batches.
    pub(super) gathered: Vec<Request>,
}

impl ExportRt {
    /// True once another gateway took this export's shared store over (an `rbd:` image
    /// whose lock it broke): the export is not answered any more, so that initiators
    /// re-send to that gateway (see [`super::shared`]).
    pub(super) fn handed_over(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.handed_over())
    }
}

/// The device and inode `spec.path` names now; `None` for an `rbd:` image or a path that
/// does not resolve. A reload compares it with the open export's: a file replaced under
/// the same path (a restored image, `mv new.img disk.img`) is a changed export, reopened,
/// not one that keeps serving the deleted file behind a "configuration reloaded". So is a
/// file grown or shrunk under an export without a `length` (to the end of the file): it is
/// reopened at its new size, and its start's announcement lets initiators re-IDENTIFY it,
/// where the export used to keep the size it had at start until a restart. A block
/// device's size is not in its metadata but in its sysfs `size` (sectors), so a grown
/// logical volume or loop device (`losetup -c`) counts too. (An `rbd:` image's size is
/// re-read on IDENTIFY.)
pub(super) fn file_identity(spec: &ExportSpec) -> Option<(u64, u64, u64)> {
    file_look(spec).map(|(identity, _)| identity)
}

/// [`file_identity`], and whether the path names a block device (whose size it gives in
/// sectors), from one `stat(2)`.
pub(super) fn file_look(spec: &ExportSpec) -> Option<((u64, u64, u64), bool)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if spec.rbd_image().is_some() {
        return None;
    }
    let m = std::fs::metadata(&spec.path).ok()?;
    let block = m.file_type().is_block_device();
    let size = if spec.length.is_some() {
        0
    } else if block {
        aoe_sys::block_device_sectors(m.rdev()).unwrap_or(0)
    } else {
        m.size()
    };
    Some(((m.dev(), m.ino(), size), block))
}

impl Daemon {
    /// Exports currently served: (address, interface names, sectors).
    pub fn exports(&self) -> Vec<(aoe_wire::TargetAddr, Vec<String>, u64)> {
        let mut v: Vec<_> = self
            .exports
            .values()
            .filter(|e| !e.retiring)
            .map(|e| {
                (
                    e.spec.addr(),
                    e.spec.interfaces.clone(),
                    e.engine.config().sectors,
                )
            })
            .collect();
        v.sort();
        v
    }

    /// The index of interface `name`, opening its socket if it has none yet, with ring slots
    /// for the buffer counts `config` serves there.
    pub(super) fn iface_index(&mut self, name: &str, config: &ServeConfig) -> Result<usize> {
        if let Some(i) = self.ifaces.iter().position(|i| i.name == name) {
            return Ok(i);
        }
        let buffers: usize = config
            .exports
            .iter()
            .filter(|e| e.interfaces.iter().any(|i| i == name))
            .map(|e| e.buffer_count as usize)
            .sum();
        let (sock, batch) = super::send::open_socket(self.io, name, ring_frames(buffers))
            .with_context(|| format!("cannot open AoE socket on interface {name}"))?;
        self.ifaces.push(IfaceRt::new(name, sock, batch));
        Ok(self.ifaces.len() - 1)
    }

    /// Brings the running set of exports in line with `config`: unchanged exports keep
    /// running untouched, changed and removed ones retire (after their in-flight I/O), new
    /// ones start. Everything new is opened before anything changes, so a bad config leaves
    /// the running one as it was. The stores are opened here, on the calling thread: what
    /// the start does; a reload opens them on a thread of its own
    /// ([`Daemon::start_apply`]).
    pub(super) fn apply(&mut self, config: ServeConfig) -> Result<()> {
        check_config(&config)?;
        let running = self.running();
        let (keep, new_rts) = self.opener().open_config(&config, &running)?;
        self.commit(config, keep, new_rts)
    }

    /// Starts a reload to `config`: checked here, its stores opened (and the running ones'
    /// files looked at, [`file_identity`]) on a thread of its own, so that a slow `open(2)`
    /// (a busy FUSE server, a hung NFS mount, an RBD cluster that is slow to answer) does
    /// not stop the loop, which keeps serving every export meanwhile. The loop takes the
    /// result when it comes ([`Daemon::poll_reload`]) and commits it between two batches.
    /// An error (here or on the thread) keeps the running configuration and is logged.
    pub(super) fn start_apply(&mut self, config: ServeConfig, path: PathBuf) {
        if let Err(e) = check_config(&config) {
            tracing::error!(
                "reload refused, keeping the running configuration: {e:#}{}",
                crate::nofile_hint(&e)
            );
            return;
        }
        let running = self.running();
        let opener = self.opener();
        let event = self.event.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("aoe-reload".into())
            .spawn(move || {
                let opened = opener.open_config(&config, &running);
                let _ = tx.send(opened.map(|(keep, new_rts)| (config, keep, new_rts)));
                // The loop polls the completions' eventfd: it wakes and takes the result.
                let _ = event.notify();
            });
        match spawned {
            Ok(_) => {
                self.reloading = Some(Reloading {
                    rx: Some(rx),
                    taking_over: None,
                    path: Some(path),
                    since: self.ticks,
                    warned: None,
                })
            }
            Err(e) => tracing::error!(
                "reload refused, keeping the running configuration: no thread to open the \
                 stores: {e}"
            ),
        }
    }

    /// Commits a reload whose stores are open, if its thread is done
    /// ([`Daemon::start_apply`]); a thread that ended without a result (it panicked) is
    /// logged as a refused reload. A commit that waits for the gateway it took an image
    /// over from to fall silent ([`TakingOver`]), a reload's or the start's, is carried on
    /// here, on the loop's tick. The start's, refused, stops the daemon
    /// ([`Daemon::start_refused`]): a start that cannot serve what it was given fails, as it
    /// did when the wait was a loop before the event loop.
    pub(super) fn poll_reload(&mut self) {
        let Some(r) = &mut self.reloading else {
            return;
        };
        let done = if let Some(t) = &mut r.taking_over {
            if t.tick == self.ticks {
                return;
            }
            t.tick = self.ticks;
            let t = r.taking_over.take().expect("a take-over under way");
            self.take_over_step(t)
        } else {
            let got = match r.rx.as_ref().map(|rx| rx.try_recv()) {
                Some(Ok(got)) => got,
                Some(Err(std::sync::mpsc::TryRecvError::Empty)) => return,
                Some(Err(std::sync::mpsc::TryRecvError::Disconnected)) | None => Err(
                    anyhow::anyhow!("the thread opening the stores ended without a result"),
                ),
            };
            got.and_then(|(config, keep, new_rts)| {
                // Not here, on the loop, if the commit waits for a gateway to fall silent:
                // the loop's tick probes again ([`Daemon::take_over_step`]) while every
                // running export keeps being served, and its status, signals and state
                // files keep being looked at.
                self.first_probe(config, keep, new_rts, During::Reload)
            })
        };
        let ok = match done {
            Ok(Some(t)) => {
                // The take-over wait goes on at the next tick.
                if let Some(r) = &mut self.reloading {
                    r.taking_over = Some(t);
                }
                return;
            }
            Ok(None) => true,
            Err(e) => {
                if self.reloading.as_ref().is_some_and(|r| r.path.is_none()) {
                    tracing::error!("cannot start: {e:#}");
                    self.start_refused = Some(e);
                } else {
                    tracing::error!(
                        "reload refused, keeping the running configuration: {e:#}{}",
                        crate::nofile_hint(&e)
                    );
                }
                false
            }
        };
        if let Some(Reloading {
            path: Some(path), ..
        }) = self.reloading.take()
        {
            if ok {
                tracing::info!(config = %path.display(), "configuration reloaded");
            }
        }
    }

    /// The running exports as a reload compares them: (id, spec, file identity when
    /// opened).
    fn running(&self) -> Vec<Running> {
        self.exports
            .iter()
            .filter(|(_, rt)| !rt.retiring)
            .map(|(id, rt)| (*id, rt.spec.clone(), rt.file))
            .collect()
    }

    fn opener(&self) -> Opener {
        Opener {
            completions: self.completions.clone(),
            pool: self.pool.clone(),
            hostname: self.hostname.clone(),
        }
    }

    /// The second half of [`Daemon::apply`] at start: the duplicate probe, then
    /// [`Daemon::install`], through the reload's decision ([`Daemon::first_probe`]). A
    /// gateway that took its store over from another one (broke its lock) hears that one
    /// still answering until it noticed (seconds) and fell silent: the export waits for
    /// that ([`TakingOver`]) on the loop's tick, as a reload's does, while the start's
    /// other exports serve. Until session 29 the start waited in a loop here, before the
    /// event loop: up to 30 s in which nothing was served and SIGTERM was not read.
    fn commit(
        &mut self,
        config: ServeConfig,
        keep: Vec<u32>,
        new_rts: Vec<ExportRt>,
    ) -> Result<()> {
        if let Some(t) = self.first_probe(config, keep, new_rts, During::Start)? {
            self.reloading = Some(Reloading {
                rx: None,
                taking_over: Some(t),
                path: None,
                since: self.ticks,
                warned: None,
            });
        }
        Ok(())
    }

    /// The duplicate probe of a commit's new exports ([`Daemon::probe_new`]) and what
    /// follows from it ([`Daemon::settle`]): installed, refused, or a take-over wait to
    /// carry on from the loop's tick.
    fn first_probe(
        &mut self,
        config: ServeConfig,
        keep: Vec<u32>,
        new_rts: Vec<ExportRt>,
        during: During,
    ) -> Result<Option<Box<TakingOver>>> {
        let (dups, took_over) = self.probe_new(&config, &new_rts)?;
        let t = Box::new(TakingOver {
            config,
            keep,
            new_rts,
            took_over,
            during,
            since: None,
            until: Instant::now() + crate::backing::TAKEOVER_WAIT,
            heard: Vec::new(),
            probe: None,
            tick: self.ticks,
        });
        self.settle(t, dups)
    }

    /// The one decision after each duplicate probe of a commit, the first and every
    /// re-probe of a take-over wait alike. Refused if another gateway took one of the new
    /// exports' stores over meanwhile ([`TakingOver::handed_over`]); installed if nobody
    /// else answers, if someone who is not the gateway whose lock was broken does (then as
    /// a duplicate, refused unless `allow_duplicate`), or if the wait ran out (likewise);
    /// otherwise the wait goes on. At start, the first time it goes on, the new exports
    /// that wait for nobody are installed at once.
    fn settle(
        &mut self,
        mut t: Box<TakingOver>,
        dups: Vec<Duplicate>,
    ) -> Result<Option<Box<TakingOver>>> {
        t.refuse_if_handed_over()?;
        let now = Instant::now();
        if dups.is_empty() || !previous_gateway(&dups, &t.took_over) || now >= t.until {
            if dups.is_empty() && t.since.is_some() {
                tracing::info!("the other target stopped answering; serving");
            }
            let TakingOver {
                config,
                keep,
                new_rts,
                ..
            } = *t;
            return self.install(config, keep, new_rts, dups).map(|()| None);
        }
        if t.since.is_none() {
            log_takeover_wait(&dups);
            t.since = Some((now, crate::control::now_epoch()));
            if t.during == During::Start {
                self.install_unhindered(&mut t, &dups)?;
            }
        }
        t.heard = dups.into_iter().map(|d| (d, now)).collect();
        Ok(Some(t))
    }

    /// At start, while [`TakingOver`] waits: installs the new exports at addresses nobody
    /// else answers for (the probe found nothing for them), so they serve during the wait,
    /// and leaves `t` the rest. Requests for them that came during the probe waited in the
    /// serving sockets (nothing read those yet, [`Daemon::probe_new`]) and are answered by
    /// the loop; requests for a waiting export are read there and go unanswered (no route),
    /// as for a reload's, and its initiators retransmit.
    fn install_unhindered(&mut self, t: &mut TakingOver, dups: &[Duplicate]) -> Result<()> {
        let waits = |a: aoe_wire::TargetAddr| dups.iter().any(|d| d.addr == a);
        let (waiting, ready): (Vec<ExportRt>, Vec<ExportRt>) = std::mem::take(&mut t.new_rts)
            .into_iter()
            .partition(|rt| waits(rt.spec.addr()));
        t.new_rts = waiting;
        if ready.is_empty() {
            return Ok(());
        }
        let mut now = t.config.clone();
        now.exports.retain(|e| !waits(e.addr()));
        // Its places are those of the whole file; errors of the install name none.
        now.sources = Default::default();
        self.install(now, t.keep.clone(), ready, Vec::new())?;
        t.keep = self
            .exports
            .iter()
            .filter(|(_, rt)| !rt.retiring)
            .map(|(id, _)| *id)
            .collect();
        Ok(())
    }

    /// The start of a commit: the serving sockets of the new exports' interfaces opened,
    /// and the duplicate probe for the new exports (the running ones served meanwhile).
    /// Returns what it found, and the addresses of the new exports that took their store
    /// over from another gateway.
    fn probe_new(
        &mut self,
        config: &ServeConfig,
        new_rts: &[ExportRt],
    ) -> Result<(Vec<Duplicate>, Vec<aoe_wire::TargetAddr>)> {
        // The serving sockets open first, so requests that arrive during the probe wait in
        // them and are answered once it is over, instead of being lost.
        let names: Vec<String> = new_rts
            .iter()
            .flat_map(|rt| rt.spec.interfaces.clone())
            .collect();
        for name in names {
            self.iface_index(&name, config)?;
        }
        // Ask the segments before announcing anything new: a second target with one of our
        // addresses makes initiators mix two disks.
        let new_specs: Vec<&ExportSpec> = new_rts.iter().map(|rt| &rt.spec).collect();
        let dups = self.probe(&new_specs, config)?;
        let took_over = new_rts
            .iter()
            .filter(|rt| rt.shared.as_ref().is_some_and(|s| s.took_over()))
            .map(|rt| rt.spec.addr())
            .collect();
        Ok((dups, took_over))
    }

    /// One tick of a take-over wait (a reload's or the start's): refuses it if another
    /// gateway took a waiting export's store over meanwhile (the pending exports' stores
    /// are not in the daemon's table, so [`Daemon::poll_shared_stores`] does not look at
    /// them: looked at here, once a tick); finishes the probe under way if its wait is
    /// over (collecting what came meanwhile, without waiting) and decides
    /// ([`Daemon::settle`]); starts the next probe. Returns the wait to carry on with, or
    /// None once the commit is installed.
    fn take_over_step(&mut self, mut t: Box<TakingOver>) -> Result<Option<Box<TakingOver>>> {
        t.refuse_if_handed_over()?;
        if let Some(p) = &mut t.probe {
            p.collect()?;
            if Instant::now() < p.deadline() {
                return Ok(Some(t));
            }
            let dups = t.probe.take().expect("a probe under way").finish();
            t = match self.settle(t, dups)? {
                Some(t) => t,
                None => return Ok(None),
            };
        }
        let new_specs: Vec<&ExportSpec> = t.new_rts.iter().map(|rt| &rt.spec).collect();
        // Answers only: the initiators' requests on the segment are not copied to it.
        t.probe = Probe::start_responses(&new_specs, &t.config.exports, t.config.probe)?;
        if t.probe.is_none() {
            // No probe configured any more (cannot happen: the first one ran): serve.
            return self.settle(t, Vec::new());
        }
        Ok(Some(t))
    }

    /// The end of a commit, on the loop: `dups` (what the probe found) refuses it unless
    /// `allow_duplicate`; then the exports in `keep` stay, `new_rts` (opened already)
    /// start, the others retire.
    fn install(
        &mut self,
        config: ServeConfig,
        keep: Vec<u32>,
        new_rts: Vec<ExportRt>,
        dups: Vec<Duplicate>,
    ) -> Result<()> {
        if !dups.is_empty() {
            let what = dups
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            if !config.allow_duplicate {
                bail!(
                    "{what}: refusing to serve it (allow_duplicate = true or \
                     --allow-duplicate serves it anyway)"
                );
            }
            tracing::warn!(
                "{what}: serving it anyway (allow_duplicate); an initiator will take both as \
                 paths of one disk and mix their data"
            );
            self.watch.found_at_start(&dups, Instant::now());
        }
        // Commit.
        for (id, rt) in self.exports.iter_mut() {
            if !keep.contains(id) && !rt.retiring {
                tracing::info!("{}: export removed or changed; retiring", rt.spec.addr());
                rt.retiring = true;
            }
        }
        for i in &mut self.ifaces {
            i.set_routes(|routes| routes.retain(|r| keep.contains(&r.id)));
        }
        for mut rt in new_rts {
            let id = self.next_export_id;
            self.next_export_id += 1;
            rt.tick = self.ticks;
            self.inherit_writes(id, &mut rt);
            self.inherit_state(&mut rt);
            self.inherit_dedup(&mut rt);
            for name in rt.spec.interfaces.clone() {
                let idx = self.iface_index(&name, &config)?;
                rt.engine.set_interface(idx, self.ifaces[idx].iface);
                super::warn_if_state_too_long(&rt, &name, self.ifaces[idx].iface.mtu);
                let route = super::send::Route {
                    id,
                    addr: rt.spec.addr(),
                    file: rt.shared.is_none(),
                };
                self.ifaces[idx].set_routes(|routes| routes.push(route));
                let info = self.ifaces[idx].iface;
                tracing::info!(
                    path = %rt.spec.path.display(),
                    sectors = rt.engine.config().sectors,
                    interface = %name,
                    mac = %info.mac,
                    mtu = info.mtu,
                    read_only = rt.spec.read_only,
                    direct = rt.spec.direct_io,
                    sync = rt.spec.sync,
                    offset = rt.spec.offset,
                    mask = %mask_list(&rt.spec.allowed_macs),
                    "{}: exporting",
                    rt.spec.addr()
                );
                if rt.spec.announce {
                    for frame in rt.engine.announcements(idx) {
                        // The backlog gives Query Config responses a quarter of its places
                        // (`IfaceRt::queue`): past 1024 exports on one interface the rest
                        // of a start's announcements were dropped (4096 exports: 3072 of
                        // them, session 35). Sent as the places fill instead.
                        if self.ifaces[idx].out.len() >= super::CONTROL_BACKLOG {
                            self.flush_sends();
                        }
                        let n = frame.len();
                        self.ifaces[idx].queue(frame, n, &mut self.spare);
                    }
                }
            }
            self.exports.insert(id, rt);
        }
        self.size_socket_buffers();
        self.config = config;
        // The states the new exports inherited (`inherit_state`) are saved at the next turn.
        self.persist_all = true;
        self.flush_sends();
        Ok(())
    }

    /// The newest retiring instance of the export at `addr` (the one a reopened export
    /// replaces), if any: its state and duplicate-write table pass to the new one.
    fn newest_retiring(&mut self, addr: aoe_wire::TargetAddr) -> Option<&mut ExportRt> {
        self.exports
            .iter_mut()
            .filter(|(_, old)| old.retiring && old.spec.addr() == addr)
            .max_by_key(|(id, _)| **id)
            .map(|(_, old)| old)
    }

    /// A reopened export (the same shelf.slot: the state belongs to the address, as its
    /// state file does) takes the config string, Mac Mask List and reserve list of the
    /// newest retiring instance of that address, as they are in memory: what initiators
    /// last set, acknowledged, whether or not it has reached a state file (there may be
    /// none, the save may still be queued or failing). Loaded from the file alone, a reload
    /// that reopened an export (a grown file, a changed buffer count) dropped a config
    /// string set since start without `--state-dir`, set the mask list back to the
    /// configured one and released a reservation. Two things still come from the new
    /// configuration: the mask list when `allowed_macs` changed (it re-seeds the list, as at
    /// a start), and the reservation of a shared store (the image holds it).
    fn inherit_state(&mut self, rt: &mut ExportRt) {
        let addr = rt.spec.addr();
        let Some(old) = self.newest_retiring(addr) else {
            return;
        };
        let new = rt.engine.state();
        let mut state = old.engine.state().clone();
        if old.spec.allowed_macs != rt.spec.allowed_macs {
            state.mask = new.mask.clone();
        }
        if rt.shared.is_some() {
            state.reserve = new.reserve.clone();
        }
        if rt.engine.replace_state(state) {
            tracing::info!(
                "{addr}: the reopened export keeps the config string, mask and reserve lists \
                 of the one it replaces"
            );
        }
    }

    /// A reopened export takes (moves) the duplicate-write table of the newest retiring
    /// instance of its address, if that one served the same store from the same offset (a
    /// request's LBA then names the same bytes in both). Started empty, a late network copy
    /// of a write the old instance had answered, arriving after the reload, ran as a new
    /// write, and if a newer write had overlapped it before the reload, put the older data
    /// back over an acknowledged write (tenth audit, `target_peers.rs`
    /// `late_duplicate_of_a_write_across_a_reload_does_not_overwrite_a_newer_write`).
    /// Moved, not copied: a copy per reopen held a full table per retiring instance, and
    /// a SIGHUP storm under writes (`probe_ms = 0`, 850 reopens in 15 s) took the daemon
    /// from 30 to 145 MB.
    fn inherit_dedup(&mut self, rt: &mut ExportRt) {
        let addr = rt.spec.addr();
        let Some(old) = self.newest_retiring(addr) else {
            return;
        };
        if !same_store(old, rt) {
            // Tenth audit: the open device of an initiator switches disks here, and nothing
            // in AoE can tell it (an announcement carries the size, which neither the
            // driver nor `aoe initiator` takes for an open device). Said, at least.
            tracing::warn!(
                "{addr}: now serves another disk than before the reload ({}, was {}): an \
                 initiator that has it open is not told and reads and writes the new one from \
                 now on; stop its users (unmount, close) before pointing an export at another \
                 file, or give the new disk another shelf.slot",
                rt.spec.path.display(),
                old.spec.path.display()
            );
            return;
        }
        if old.spec.offset != rt.spec.offset {
            return;
        }
        let n = rt.engine.take_dedup(&mut old.engine);
        if n > 0 {
            tracing::debug!(
                writes = n,
                "{addr}: the reopened export remembers the writes the one it replaces admitted"
            );
        }
    }

    /// Gives `rt`, about to be served as export `id`, the writes still in flight or waiting
    /// on every retiring export of the same store ([`same_store`]): its overlapping writes
    /// and reads wait for them ([`super::order`] says why), and each retiring one reports
    /// to it as they end ([`ExportRt::heirs`]).
    fn inherit_writes(&mut self, id: u32, rt: &mut ExportRt) {
        let base = rt.spec.offset * 512;
        for (&old_id, old) in self.exports.iter_mut() {
            if !old.retiring || !same_store(old, rt) {
                continue;
            }
            // Ranges are export offsets: the store's byte is the same, the export's
            // window may have moved.
            let old_base = old.spec.offset * 512;
            let before = rt.writes.inherited();
            rt.writes.inherit(
                old_id,
                old.writes.pending().map(|(t, r)| {
                    let (s, e) = (r.start + old_base, r.end + old_base);
                    (t, s.saturating_sub(base)..e.saturating_sub(base))
                }),
            );
            let n = rt.writes.inherited() - before;
            if n > 0 {
                old.heirs.push(id);
                tracing::info!(
                    writes = n,
                    "{}: writes still in flight on the retiring export of the same store; \
                     requests to their sectors wait for them",
                    rt.spec.addr()
                );
            }
        }
    }

    /// Runs the duplicate probe for `new`; running exports keep being served while it waits
    /// (on a reload), new interfaces keep their frames queued until the probe is over.
    pub(super) fn probe(
        &mut self,
        new: &[&ExportSpec],
        config: &ServeConfig,
    ) -> Result<Vec<Duplicate>> {
        let Some(mut p) = Probe::start(new, &config.exports, config.probe)? else {
            return Ok(Vec::new());
        };
        let addrs: Vec<String> = new.iter().map(|e| e.addr().to_string()).collect();
        tracing::info!(
            wait_ms = config.probe.as_millis() as u64,
            "{}: probing the segment for duplicate addresses",
            addrs.join(",")
        );
        loop {
            p.collect()?;
            let now = Instant::now();
            if now >= p.deadline() {
                return Ok(p.finish());
            }
            let serving: Vec<usize> = (0..self.ifaces.len())
                .filter(|&i| !self.ifaces[i].exports.is_empty())
                .collect();
            let mut fds = p.fds();
            fds.extend(serving.iter().map(|&i| {
                let iface = &self.ifaces[i];
                PollFd::with_events(iface.sock.as_raw_fd(), true, !iface.out.is_empty())
            }));
            fds.push(PollFd::new(self.event.as_raw_fd()));
            aoe_sys::poll(&mut fds, Some(p.deadline() - now)).context("poll")?;
            let _ = self.event.drain();
            for i in serving {
                self.receive(i);
            }
            self.complete_io();
            self.flush_sends();
        }
    }
}

/// A commit (a reload's, or the start's) whose stores are open and whose duplicate probe
/// heard, for an `rbd:` export that took its image over (broke another gateway's lock),
/// only other targets at that export's address: the gateway whose lock was broken, until
/// it notices (seconds) and falls silent. Its commit waits for that, for up to
/// [`crate::backing::TAKEOVER_WAIT`], probing again from the loop's once-a-second tick
/// ([`Daemon::take_over_step`]); until then nothing of a reload is served (its exports are
/// not in the daemon's table, so nothing is answered or announced for them) and the running
/// configuration serves on; at start the exports that wait for nobody serve. `aoe target
/// status` shows each waiting export ([`TakingOver::status`]).
/// Session 28: a reload's wait was a loop inside the commit; the probe's loop read the
/// serving sockets, but nothing else the event loop does ran for up to 30 s (the status
/// and metrics, state files, signals, further reloads). Session 29: the start's too.
pub(super) struct TakingOver {
    config: ServeConfig,
    keep: Vec<u32>,
    new_rts: Vec<ExportRt>,
    /// The new exports' addresses that took their store over.
    took_over: Vec<aoe_wire::TargetAddr>,
    during: During,
    /// When the wait began (monotonic, and seconds since the epoch for the status); None
    /// until a probe heard the other gateway.
    since: Option<(Instant, f64)>,
    /// When the wait gives up (the commit is then refused as a duplicate, unless
    /// `allow_duplicate`).
    until: Instant,
    /// What the last finished probe heard, and when.
    heard: Vec<(Duplicate, Instant)>,
    /// The probe under way, if any.
    probe: Option<Probe>,
    /// The daemon tick this wait last looked at: one step a tick.
    pub(super) tick: u32,
}

/// Whose commit a [`TakingOver`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum During {
    /// The daemon's start.
    Start,
    /// A reload (SIGHUP).
    Reload,
}

impl TakingOver {
    /// Refuses the commit if another gateway took the store of one of its new exports over
    /// (broke the lock this one took) while it waited: installed, that export would be
    /// fenced at once and answer nothing (README, "Fencing and failover"). Until session 29
    /// that was noticed only after the install.
    fn refuse_if_handed_over(&self) -> Result<()> {
        if let Some(rt) = self.new_rts.iter().find(|rt| rt.handed_over()) {
            bail!(
                "{}: another gateway took {} over (broke this gateway's lock) while it waited \
                 for the old one to fall silent; not serving it",
                rt.spec.addr(),
                rt.spec.path.display()
            );
        }
        Ok(())
    }

    /// The waiting exports as `aoe target status` shows them.
    pub(super) fn status(&self, now: Instant) -> Vec<crate::control::PendingExport> {
        let Some((since, epoch)) = self.since else {
            return Vec::new();
        };
        self.new_rts
            .iter()
            .filter(|rt| self.took_over.contains(&rt.spec.addr()))
            .map(|rt| {
                let a = rt.spec.addr();
                crate::control::PendingExport {
                    target: format!("{}.{}", a.shelf, a.slot),
                    interfaces: rt.spec.interfaces.clone(),
                    path: rt.spec.path.display().to_string(),
                    during: match self.during {
                        During::Start => "start",
                        During::Reload => "reload",
                    }
                    .into(),
                    since: epoch,
                    waiting_secs: now.saturating_duration_since(since).as_secs(),
                    gives_up_in_secs: self.until.saturating_duration_since(now).as_secs(),
                    waiting_for: self
                        .heard
                        .iter()
                        .filter(|(d, _)| d.addr == a)
                        .map(|(d, at)| crate::control::AddressConflict {
                            mac: d.mac.to_string(),
                            interface: d.interface.clone(),
                            last_seen_secs: now.saturating_duration_since(*at).as_secs(),
                        })
                        .collect(),
                }
            })
            .collect()
    }
}

/// True if every duplicate in `dups` is another target at an address in `took_over`:
/// presumably the gateway whose lock was broken, still answering until it notices.
fn previous_gateway(dups: &[Duplicate], took_over: &[aoe_wire::TargetAddr]) -> bool {
    dups.iter().all(|d| !d.ours && took_over.contains(&d.addr))
}

/// The line a take-over wait starts with.
fn log_takeover_wait(dups: &[Duplicate]) {
    tracing::info!(
        wait_s = crate::backing::TAKEOVER_WAIT.as_secs(),
        "{}: another target still answers (the gateway whose lock was broken, until it \
         notices); waiting for it to stop",
        dups.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    );
}

/// A running export as a reload compares it: id, spec, and its [`file_identity`] when it
/// was opened.
type Running = (u32, ExportSpec, Option<(u64, u64, u64)>);

/// Checks of a configuration that touch no store: static settings, overlapping writable
/// exports, interfaces that exist.
fn check_config(config: &ServeConfig) -> Result<()> {
    config.check_static()?;
    config.check_overlaps()?;
    for (n, e) in config.exports.iter().enumerate() {
        for i in &e.interfaces {
            check_interface(e, i)
                .map_err(|err| placed_at(config.sources.interface_place(n, i), err))?;
        }
    }
    Ok(())
}

/// `err`, found for key `key` of export `n` of `config`, led by that key's
/// `FILE:LINE:COLUMN` when it came from a file (the TOML parser's errors and
/// [`ServeConfig::check_static`]'s name it so; a missing file or interface named only the
/// export until session 28, its `[[export]]` header until session 29).
fn placed(config: &ServeConfig, n: usize, key: &str, err: anyhow::Error) -> anyhow::Error {
    placed_at(config.sources.export_place(n, key), err)
}

/// `err` led by `at` (`FILE:LINE:COLUMN`), if known, as a context: the chain under it (an
/// `io::Error` and its errno, for [`crate::nofile_hint`]) is kept. Until session 36 it was
/// a new error of the chain's text.
fn placed_at(at: Option<String>, err: anyhow::Error) -> anyhow::Error {
    match at {
        Some(at) => err.context(at),
        None => err,
    }
}

/// Checks interface `name` of export `e` as `aoe serve` (start, reload, `--check`) does:
/// it must exist and have an Ethernet address. An interface without one (a tun device, an
/// IP tunnel: `SIOCGIFHWADDR` gives no 6-byte address) carries no Ethernet frames, so an
/// AoE target there would answer nothing; it is refused. A loopback interface and one
/// that is down are served, with a warning each: loopback reaches only initiators on this
/// host (tests use it), and an interface brought up later (a target started before the
/// network at boot) is served from then on. Until session 27 all three were taken without
/// a word, and a down one cost a core (see `IfaceRt::send_down`).
fn check_interface(e: &ExportSpec, name: &str) -> Result<()> {
    let info = aoe_sys::interface_info(name)
        .with_context(|| format!("e{}.{}: no such interface {name:?}", e.shelf, e.slot))?;
    if info.loopback {
        tracing::warn!(
            "e{}.{}: {name} is a loopback interface: only initiators on this host, on {name}, \
             reach the export",
            e.shelf,
            e.slot
        );
    } else if info.mac == [0; 6] {
        bail!(
            "e{}.{}: interface {name} has no Ethernet address (a tun device or IP tunnel?): \
             AoE is carried in Ethernet frames; name an Ethernet, veth, bridge, bond or VLAN \
             interface",
            e.shelf,
            e.slot
        );
    }
    if !info.up {
        tracing::warn!(
            "e{}.{}: interface {name} is down: nothing is announced or answered there until \
             it is up (ip link set {name} up)",
            e.shelf,
            e.slot
        );
    }
    Ok(())
}

/// What opening exports needs, apart from the loop: a reload's thread takes one.
#[derive(Clone)]
pub(super) struct Opener {
    completions: Arc<Completions>,
    pool: Arc<Pool>,
    hostname: String,
}

impl Opener {
    /// Which of the `running` exports stay (unchanged spec, and the path still names the
    /// file they opened, at the size they opened), and the others of `config` opened. May
    /// block on the stores (a `stat`, an `open(2)`, an RBD connection).
    fn open_config(
        &self,
        config: &ServeConfig,
        running: &[Running],
    ) -> Result<(Vec<u32>, Vec<ExportRt>)> {
        let keep: Vec<u32> = running
            .iter()
            .filter(|(_, spec, file)| config.exports.contains(spec) && *file == file_identity(spec))
            .map(|(id, _, _)| *id)
            .collect();
        let mut new_rts = Vec::new();
        for (n, spec) in config.exports.iter().enumerate() {
            if running
                .iter()
                .any(|(id, s, _)| keep.contains(id) && s == spec)
            {
                continue;
            }
            new_rts.push(
                self.open_export(spec, config)
                    .map_err(|err| placed(config, n, "path", err))?,
            );
        }
        Ok((keep, new_rts))
    }

    pub(super) fn open_export(&self, spec: &ExportSpec, config: &ServeConfig) -> Result<ExportRt> {
        let crate::backing::Opened {
            backend,
            sectors,
            shared,
        } = crate::backing::open(spec, &self.completions)?;
        let file = file_identity(spec);
        let backend = backend.into_async(&self.pool);
        let state_file = config
            .state_dir
            .as_ref()
            .map(|d| StateFile::new(d, spec.addr()));
        let state = load_state(state_file.as_ref(), spec)?;
        // A shared store's reservation is the one every gateway of it enforces: it replaces
        // what this gateway's state file remembers.
        let state = match &shared {
            Some(sh) => PersistentState {
                reserve: sh
                    .reservation()
                    .with_context(|| format!("{}: cannot read the reservation", spec.addr()))?,
                ..state
            },
            None => state,
        };
        let serial = format!("{}.{}:{}", spec.shelf, spec.slot, self.hostname);
        let mut engine = Engine::new(
            ExportConfig {
                addr: spec.addr(),
                sectors,
                read_only: spec.read_only,
                buffer_count: spec.buffer_count,
                firmware_version: FIRMWARE_VERSION,
                max_sectors: 255,
                model: "aoe-rs target".into(),
                serial,
                firmware: env!("CARGO_PKG_VERSION").into(),
            },
            state,
        );
        engine.set_dedup(config.dedup);
        Ok(ExportRt {
            spec: spec.clone(),
            engine,
            backend,
            state_file,
            token_iface: Vec::new(),
            tick: 0,
            listed_busy: false,
            listed_touched: false,
            stuck: None,
            oldest: 0,
            retiring: false,
            heirs: Vec::new(),
            pool_full_drops: 0,
            drops_logged: (0, 0, 0),
            too_long_logged: 0,
            writes: WriteOrder::default(),
            shared,
            reserve_pending: None,
            file,
            path_replaced: false,
            size_warned: None,
            gathered: Vec::new(),
        })
    }
}

/// True if `a` and `b` export the same store: the same file or block device (device and
/// inode of what the path named when each was opened), or the same `rbd:` image name. A
/// path replaced by another file between the two opens is another store (nothing to order
/// between them).
fn same_store(a: &ExportRt, b: &ExportRt) -> bool {
    match (a.file, b.file) {
        (Some(x), Some(y)) => (x.0, x.1) == (y.0, y.1),
        (None, None) => a.spec.path == b.spec.path,
        _ => false,
    }
}

/// Checks a config fully, as `aoe serve` does at start, without serving: files open with
/// the right sizes, interfaces exist, and no writable export overlaps another
/// ([`ServeConfig::check_overlaps`]).
pub fn validate(config: &ServeConfig) -> Result<()> {
    check_config(config)?;
    // Held open to the end, as a start holds them: until session 35 each was closed before
    // the next opened, so `--check` said ok for 1024 exports that the start refused with
    // EMFILE under a soft open-file limit of 1024.
    let mut opened = Vec::with_capacity(config.exports.len());
    for (n, e) in config.exports.iter().enumerate() {
        // Nothing is submitted: a queue nobody reads is enough to open the store.
        opened.push(
            crate::backing::open(e, &Completions::new(Arc::new(|| {})))
                .map_err(|err| placed(config, n, "path", err))?,
        );
        // The state file as a start loads it (read only; a missing one is the initial
        // state): until session 29's audit `--check --state-dir` said ok for a state file
        // that does not parse, or a "directory" that is a file, and the start refused them.
        let state_file = config
            .state_dir
            .as_ref()
            .map(|d| StateFile::new(d, e.addr()));
        load_state(state_file.as_ref(), e)?;
    }
    Ok(())
}

/// The persistent state export `spec` starts with: its state file's ([`StateFile::load`],
/// the initial state when the file is missing), or without `--state-dir` its configured
/// MAC mask alone. The start ([`Opener::open_export`]) and `--check` ([`validate`]) load
/// it alike.
fn load_state(state_file: Option<&StateFile>, spec: &ExportSpec) -> Result<PersistentState> {
    match state_file {
        Some(f) => f
            .load(&spec.allowed_macs)
            .with_context(|| format!("{}: cannot load state", spec.addr())),
        None => Ok(PersistentState {
            mask: spec.allowed_macs.clone(),
            ..Default::default()
        }),
    }
}

/// Ring slots for an interface serving `buffers` buffers in all: twice that (every request
/// an initiator may have in flight, and a retransmitted copy of each), at least
/// [`super::send::RING_FRAMES`], at most twice [`POOL_QUEUE`](super::POOL_QUEUE) (see
/// [`held_buffers`]).
pub(super) fn ring_frames(buffers: usize) -> usize {
    (2 * held_buffers(buffers)).max(super::send::RING_FRAMES)
}

/// The requests an interface serving `buffers` buffers in all (the sum of its exports'
/// buffer counts) may have waiting at once: that sum, but never more than the worker
/// queue takes over all exports ([`POOL_QUEUE`](super::POOL_QUEUE)), since a request past
/// it is dropped however many slots the ring has. Until session 35 the rings and socket
/// buffers grew with the sum alone: 128 buffers an export made 4096 exports take 3.3 GB
/// of resident ring memory (800 KiB an export) for requests the queue would refuse.
pub(super) fn held_buffers(buffers: usize) -> usize {
    buffers.min(super::POOL_QUEUE)
}

/// The MAC mask list as the "exporting" log line shows it: `any` when empty (everyone is
/// answered), else the addresses joined by commas.
fn mask_list(macs: &[aoe_wire::MacAddr]) -> String {
    if macs.is_empty() {
        return "any".to_owned();
    }
    macs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
