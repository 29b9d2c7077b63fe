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
//!   was told about. If the store cannot keep it, the engine's list is put back and the
//!   request is not answered: the initiator retransmits, and no host is told it holds a
//!   reservation that the next gateway would not know.

use super::*;

impl Daemon {
    /// The timer's look at shared stores (once per [`REFRESH`]): a changed size is taken and
    /// announced on every interface of the export (unless started with `--no-announce`).
    pub(super) fn poll_shared_stores(&mut self) {
        let mut announce = Vec::new();
        for (id, rt) in self.exports.iter_mut() {
            let Some(sh) = rt.shared.as_ref().filter(|_| !rt.retiring) else {
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
                if !self.ifaces[idx].exports.contains(&id) {
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

/// After the engine handled a Reserve/Release request on an export with a shared store:
/// if the reserve list changed from `before`, stores it there. False (and the engine's
/// list back to `before`) if the store refused or failed: the reply must not go out.
pub(super) fn keep_reservation(
    rt: &mut ExportRt,
    before: Vec<MacAddr>,
    logs: &mut RateLimiter,
) -> bool {
    let Some(sh) = rt.shared.as_ref() else {
        return true;
    };
    if rt.engine.state().reserve == before {
        return true;
    }
    let list = mask_list(&rt.engine.state().reserve);
    match sh.set_reservation(&rt.engine.state().reserve) {
        Ok(()) => {
            tracing::info!(
                export = %rt.spec.addr(),
                reserve = %list,
                "reservation stored in the shared store"
            );
            true
        }
        Err(e) => {
            if let Some(a) = logs.check(Instant::now(), "reservation not stored") {
                tracing::warn!(
                    export = %rt.spec.addr(),
                    reserve = %list,
                    error = %e,
                    "cannot store the reservation in the shared store; request not answered{a}"
                );
            }
            let _ = rt.engine.set_reserve(before);
            false
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
