//! Exports whose store several gateways share (an `rbd:` image, issue 13): the side channel
//! of [`crate::backing::SharedStore`], used from the event loop's timer and from dispatch.
//!
//! - A resize is announced: the timer compares the store's size (as its monitor last read
//!   it, no cluster call here) with the engine's and, on a change, sends the unsolicited
//!   Query Config response of the export's start again (vblade `aoead`, broadcast or to the
//!   mask list). The Linux driver re-IDENTIFYs an up device nobody holds open on any config
//!   response (aoecmd.c `aoecmd_cfg_rsp`: `if (d->nopen == 0) aoecmd_ata_id(d)`), and so does
//!   `aoe initiator`, so both see the new size without a `revalidate`.
//! - The reservation lives in the store: a Reserve/Release set that changes the list is
//!   stored there before its reply goes out, so a gateway that takes the image over from a
//!   dead one (and reads it when it opens the export) enforces the reservation the initiator
//!   was told about. Storing it is a round trip to the cluster, done off the event loop (the
//!   store's own thread): meanwhile the engine keeps the old list, further Reserve/Release
//!   requests to the export are dropped (the initiator retransmits) and everything else,
//!   this export's I/O and other exports, is served. Once stored, the engine takes the new
//!   list and the reply goes out; if the store cannot keep it, the reply goes out as AoE
//!   error 3 (device unavailable) and the list stays as it was, so no host is told it holds
//!   a reservation that the next gateway would not know.
//! - A reservation changed through another gateway of the same store is taken as soon as
//!   the store has seen it (an RBD image: librbd's update watch, then a read of the
//!   metadata), checked before every frame handed to the export.

use super::*;

impl Daemon {
    /// Whether spinning for the next frames after a batch (`ServeConfig::spin`) pays, from what the
    /// batch waited for. It pays for a file export, whose store answers within the spin
    /// (often from the page cache, or a worker within microseconds), while a steady
    /// initiator's next frames arrive within it too. It does not for a shared store's
    /// (RBD) requests: they complete on librbd's threads after a round trip to the OSDs,
    /// hundreds of microseconds, and a loop spinning meanwhile (for [`SPIN_MAX`] at a time,
    /// as frames keep coming) takes a core from the librbd threads and the OSD those
    /// requests wait for (`perf record` of `aoe serve` under `scripts/bench-rbd.sh`, window
    /// 16: the event loop thread had 39% of the process's samples, in `recv_batch` and the
    /// system calls around it, librbd's messenger 35%). So: spin if the batch brought frames
    /// for a file export ([`Daemon::batch_file_frames`]) or file requests are still at the
    /// workers, unless [`Daemon::spin_yields`]. Otherwise the loop sleeps in poll() and is
    /// woken by the socket or the completions' eventfd.
    pub(super) fn spin_pays(&mut self) -> bool {
        let (rbd, file) = self.outstanding();
        // File replies pending; or file frames came and no RBD request waits.
        file || (self.batch_file_frames && !rbd)
    }

    /// True while shared-store (RBD) requests are outstanding and no file request is: the
    /// spin stops then, so that librbd's threads get the CPU, even if file frames came
    /// before (a daemon serving files and RBD images on two cores, issue 13).
    pub(super) fn spin_yields(&mut self) -> bool {
        let (rbd, file) = self.outstanding();
        rbd && !file
    }

    /// Whether requests are in flight: (to shared stores, to file stores). Only the
    /// exports in [`Daemon::busy`] can have any (a token is handed out only for a frame
    /// `dispatch` gave the engine); those with none left are dropped from it here. Until
    /// session 35 every export was asked, each turn and each spin turn: with 4096 exports
    /// that was a large part of the loop's time beside one busy export.
    fn outstanding(&mut self) -> (bool, bool) {
        let (mut rbd, mut file) = (false, false);
        let exports = &mut self.exports;
        self.busy.retain(|id| {
            let Some(e) = exports.get_mut(id) else {
                return false;
            };
            if e.engine.in_flight() == 0 {
                e.listed_busy = false;
                return false;
            }
            if e.shared.is_some() {
                rbd = true;
            } else {
                file = true;
            }
            true
        });
        (rbd, file)
    }

    /// The timer's look at shared stores (once per [`REFRESH`]): a changed size is taken and
    /// announced on every interface of the export (unless started with `--no-announce`), a
    /// changed reservation taken.
    pub(super) fn poll_shared_stores(&mut self) {
        let mut announce = Vec::new();
        for (id, rt) in self.exports.iter_mut() {
            if rt.shared.is_none() || rt.retiring || rt.handed_over() {
                continue;
            }
            // Also taken before each frame; here for an export no frame reached, so that
            // its status and state file show the list the store holds.
            take_reservation_update(rt);
            // Saved at the next turn (`persist_state` looks only where frames went).
            self.persist_all = true;
            let Some(sh) = rt.shared.as_ref() else {
                continue;
            };
            let sectors = sh.size_seen() / 512;
            let old = rt.engine.config().sectors;
            if rt.engine.set_sectors(sectors) {
                tracing::info!(
                    export = %rt.spec.addr(),
                    old,
                    sectors,
                    announce = rt.spec.announce,
                    "store resized; announcing it"
                );
                if rt.spec.announce {
                    announce.push(*id);
                }
            }
        }
        for id in announce {
            for idx in 0..self.ifaces.len() {
                if !self.ifaces[idx].exports.iter().any(|r| r.id == id) {
                    continue;
                }
                let Some(rt) = self.exports.get(&id) else {
                    continue;
                };
                for frame in rt.engine.announcements(idx) {
                    let n = frame.len();
                    self.ifaces[idx].queue(frame, n, &mut self.spare);
                }
            }
        }
        self.flush_sends();
    }
}

/// The token of a reservation's completion in the daemon's completion queue (the export's
/// id in the high half, as for I/O). Engine tokens are slab indices below the buffer count,
/// so never this.
pub(super) const RESERVE_TOKEN: u32 = u32::MAX;

/// A Reserve/Release reply waiting for its reserve list to be stored.
pub(super) struct PendingReserve {
    /// The list to take once stored.
    list: Vec<MacAddr>,
    /// The interface the request came in on, and the reply's length.
    iface: usize,
    len: usize,
}

/// Takes a reserve list that changed in the shared store (through another gateway) into
/// the engine.
pub(super) fn take_reservation_update(rt: &mut ExportRt) {
    let Some(list) = rt.shared.as_ref().and_then(|sh| sh.reservation_update()) else {
        return;
    };
    if rt.engine.set_reserve(list) {
        tracing::info!(
            export = %rt.spec.addr(),
            reserve = %mask_list(&rt.engine.state().reserve),
            "reservation changed in the shared store; enforcing it"
        );
    }
}

/// The engine answered a Reserve/Release request on an export with a shared store with
/// `reply` (`len` bytes, to go out on `iface`) and a reserve list other than `before`:
/// the engine goes back to `before` and the new list is handed to the store; the reply
/// waits in the completion queue until the store has it ([`Daemon::reservation_stored`]).
pub(super) fn store_reservation(
    rt: &mut ExportRt,
    id: u32,
    iface: usize,
    before: Vec<MacAddr>,
    reply: Vec<u8>,
    len: usize,
    completions: &Arc<Completions>,
) {
    let list = rt.engine.state().reserve.clone();
    let _ = rt.engine.set_reserve(before);
    let Some(sh) = rt.shared.as_ref() else {
        return;
    };
    rt.reserve_pending = Some(PendingReserve {
        list: list.clone(),
        iface,
        len,
    });
    let completions = completions.clone();
    let user = (u64::from(id) << 32) | u64::from(RESERVE_TOKEN);
    sh.store_reservation(
        &list,
        Box::new(move |result| {
            completions.push(Done {
                user,
                buf: reply,
                result,
            })
        }),
    );
}

impl Daemon {
    /// A reserve list handed to the shared store is stored (`result` Ok): the engine takes
    /// it and the waiting reply goes out. Or it is not: the reply goes out as AoE error 3
    /// (device unavailable; AoEr11 section 2.1), the engine's list unchanged.
    pub(super) fn reservation_stored(&mut self, id: u32, mut buf: Vec<u8>, result: io::Result<()>) {
        let Some(rt) = self.exports.get_mut(&id) else {
            self.spare.push(buf);
            return;
        };
        let Some(p) = rt.reserve_pending.take() else {
            self.spare.push(buf);
            return;
        };
        let list = mask_list(&p.list);
        // Refused because another gateway took the store over: not answered, as nothing
        // else of this export is; the initiator re-sends it to that gateway.
        if result.is_err() && rt.handed_over() {
            self.spare.push(buf);
            return;
        }
        match result {
            Ok(()) => {
                if rt.engine.set_reserve(p.list) {
                    self.persist_all = true;
                }
                // Rate-limited: any peer may force-set the list, and one that flips it
                // every frame got a line per cluster round trip (docs/TEST-AUDIT.md,
                // sixth audit, row 4). `aoe target show-reserve` shows the list held now.
                if let Some(a) = self.logs.check(Instant::now(), "reservation stored") {
                    tracing::info!(
                        export = %rt.spec.addr(),
                        reserve = %list,
                        "reservation stored in the shared store{a}"
                    );
                }
            }
            Err(e) => {
                if let Some(a) = self.logs.check(Instant::now(), "reservation not stored") {
                    tracing::warn!(
                        export = %rt.spec.addr(),
                        reserve = %list,
                        error = %e,
                        "cannot store the reservation in the shared store; \
                         answered with AoE error 3 (device unavailable){a}"
                    );
                }
                let Some(Ok(mut f)) = buf.get_mut(..p.len).map(aoe_wire::Frame::new_checked) else {
                    self.spare.push(buf);
                    return;
                };
                let (version, flags) = (f.version(), f.flags());
                f.set_version_flags(version, flags | aoe_wire::header::FLAG_ERROR);
                f.set_error(aoe_wire::ErrorCode::DeviceUnavailable.into());
            }
        }
        if p.iface < self.ifaces.len() {
            self.ifaces[p.iface].queue(buf, p.len, &mut self.spare);
            self.flush_sends();
        } else {
            self.spare.push(buf);
        }
    }
}

/// A reserve list for the log: `none` when empty, else the addresses joined by commas.
fn mask_list(macs: &[MacAddr]) -> String {
    if macs.is_empty() {
        return "none".to_owned();
    }
    macs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
