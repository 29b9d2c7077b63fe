//! The send backlog: replies queued per interface, flushed when the socket has room
//! (POLLOUT), dropped and counted when full; reply buffers are recycled.

use super::*;

pub(super) struct IfaceRt {
    pub(super) name: String,
    pub(super) sock: PacketSocket,
    pub(super) batch: RecvBatch,
    pub(super) frame_cap: usize,
    pub(super) iface: Interface,
    /// Exports served here (ids).
    pub(super) exports: Vec<u32>,
    /// Replies waiting to be sent, oldest first: buffer and length. At most
    /// [`SEND_BACKLOG`].
    pub(super) out: VecDeque<(Vec<u8>, usize)>,
    /// Replies the socket refused with an error other than a full queue.
    pub(super) send_failures: u64,
    /// Replies dropped because the backlog was full.
    pub(super) backlog_drops: u64,
    /// (send_failures, backlog_drops) last logged.
    pub(super) drops_logged: (u64, u64),
}

impl IfaceRt {
    /// Queues a reply for sending, or drops it (counted) when the backlog is full; the
    /// buffer goes back to `spare` then. Replies other than ATA (Query Config, mask and
    /// reservation answers) get only the first [`CONTROL_BACKLOG`] places: anyone can ask
    /// for those by broadcast as fast as the link allows, and their answers must not crowd
    /// out the data replies a legitimate initiator waits for (a full backlog drops them,
    /// and each drop costs that initiator a retransmit timeout).
    pub(super) fn queue(&mut self, buf: Vec<u8>, n: usize, spare: &mut Vec<Vec<u8>>) {
        let ata = buf.get(19) == Some(&0); // AoE header: command 0 = ATA
        let cap = if ata { SEND_BACKLOG } else { CONTROL_BACKLOG };
        if self.out.len() >= cap {
            self.backlog_drops += 1;
            spare.push(buf);
        } else {
            self.out.push_back((buf, n));
        }
    }
}

impl Daemon {
    /// Sizes each socket's receive buffer so the advertised buffer counts are honest: every
    /// export's window of full frames fits, with room for the kernel's per-frame overhead.
    pub(super) fn size_socket_buffers(&mut self) {
        for i in &self.ifaces {
            let frames: usize = i
                .exports
                .iter()
                .filter_map(|id| self.exports.get(id))
                .map(|e| e.spec.buffer_count as usize)
                .sum();
            let per_frame = i.frame_cap + 1024;
            let want = (frames * per_frame * 2).max(4 << 20);
            if let Err(e) = i.sock.set_recv_buffer(want) {
                tracing::warn!(interface = %i.name, error = %e, "cannot size receive buffer");
            }
            let _ = i.sock.set_send_buffer(want);
        }
    }

    pub(super) fn take_buffer(&mut self, cap: usize) -> Vec<u8> {
        match self.spare.pop() {
            Some(mut b) => {
                if b.len() < cap {
                    b.resize(cap, 0);
                }
                b
            }
            None => vec![0u8; cap],
        }
    }

    /// Sends what the interfaces' backlogs hold, as far as their sockets take it, without
    /// waiting: a full send queue leaves the rest for the next turn, when poll() reports
    /// the socket writable (POLLOUT) again.
    pub(super) fn flush_sends(&mut self) {
        for i in &mut self.ifaces {
            while !i.out.is_empty() {
                let frames: Vec<&[u8]> = i.out.iter().take(BATCH).map(|(b, n)| &b[..*n]).collect();
                let sent = match i.sock.send_batch(&frames) {
                    Ok(0) => break,
                    Ok(k) => k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // Skip the frame that failed; the initiator retransmits. Counted and
                        // logged once a second by log_drops.
                        if let Some(a) = self.logs.check(Instant::now(), "send failed") {
                            tracing::debug!(interface = %i.name, error = %e, "send failed{a}");
                        }
                        i.send_failures += 1;
                        1
                    }
                };
                for _ in 0..sent {
                    if let Some((b, _)) = i.out.pop_front() {
                        self.spare.push(b);
                    }
                }
            }
        }
        // Keep a bounded cache of buffers.
        self.spare.truncate(1024);
    }

    /// At stop: sends what is left, waiting for POLLOUT up to `limit`.
    pub(super) fn drain_sends(&mut self, limit: Duration) {
        let start = Instant::now();
        self.flush_sends();
        while self.ifaces.iter().any(|i| !i.out.is_empty()) {
            let Some(left) = limit.checked_sub(start.elapsed()) else {
                let n: usize = self.ifaces.iter().map(|i| i.out.len()).sum();
                tracing::warn!(
                    replies = n,
                    "send queues still full at exit; replies dropped"
                );
                return;
            };
            let mut fds: Vec<PollFd> = self
                .ifaces
                .iter()
                .filter(|i| !i.out.is_empty())
                .map(|i| PollFd::with_events(i.sock.as_raw_fd(), false, true))
                .collect();
            let _ = aoe_sys::poll(&mut fds, Some(left));
            self.flush_sends();
        }
    }
}
