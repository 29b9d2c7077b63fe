//! Bytes read and written per device, for metrics: counted as each I/O submitted through a
//! [`crate::net::Handle`] (the FUSE files, the NBD exports, the partition scan) completes
//! successfully, the way the kernel's `/proc/diskstats` counts what its block layer
//! completed. Failed I/O moves no bytes and is not counted. The engine counts frames and
//! operations ([`aoe_proto::initiator::DeviceStats`]); bytes are counted here, outside the
//! network thread's own loop.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aoe_proto::initiator::BlockOp;
use aoe_wire::TargetAddr;

use crate::net::{Done, DoneHeld};

/// Bytes moved per device: `(read, written)`.
#[derive(Debug, Default)]
pub struct IoBytes {
    by_dev: Mutex<BTreeMap<TargetAddr, (u64, u64)>>,
}

impl IoBytes {
    /// `done`, counting the bytes of `op` on `dev` when it succeeds.
    pub fn counting(self: &Arc<Self>, dev: TargetAddr, op: &BlockOp, done: Done) -> Done {
        let written = match op {
            BlockOp::Write { data, .. } => data.len() as u64,
            BlockOp::WriteLent { data, .. } => data.len() as u64,
            BlockOp::Read { .. } | BlockOp::ReadInto { .. } | BlockOp::ReadHeld { .. } => 0,
            BlockOp::Flush => return done,
        };
        let me = self.clone();
        Box::new(move |r| {
            if let Ok(data) = &r {
                let read = data.as_ref().map_or(0, |d| d.len() as u64);
                let mut m = me.by_dev.lock().unwrap_or_else(|e| e.into_inner());
                let e = m.entry(dev).or_default();
                e.0 += read;
                e.1 += written;
            }
            done(r)
        })
    }

    /// Like [`counting`](Self::counting), for a held read ([`crate::net::Handle::read_held`]).
    pub fn counting_held(self: &Arc<Self>, dev: TargetAddr, done: DoneHeld) -> DoneHeld {
        let me = self.clone();
        Box::new(move |r| {
            if let Ok(pieces) = &r {
                let read: u64 = pieces.iter().map(|p| p.len() as u64).sum();
                let mut m = me.by_dev.lock().unwrap_or_else(|e| e.into_inner());
                m.entry(dev).or_default().0 += read;
            }
            done(r)
        })
    }

    /// `(read, written)` bytes of `dev` so far.
    pub fn of(&self, dev: TargetAddr) -> (u64, u64) {
        self.by_dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&dev)
            .copied()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successful_reads_and_writes_count_their_bytes() {
        let b = Arc::new(IoBytes::default());
        let dev = TargetAddr::new(1, 2);
        let noop: fn() -> Done = || Box::new(|_| {});
        b.counting(dev, &BlockOp::Read { lba: 0, sectors: 2 }, noop())(Ok(Some(vec![0; 1024])));
        let w = BlockOp::Write {
            lba: 0,
            data: vec![0; 512],
        };
        b.counting(dev, &w, noop())(Ok(None));
        // Failures and flushes move no bytes.
        b.counting(dev, &w, noop())(Err(libc::EIO));
        b.counting(dev, &BlockOp::Flush, noop())(Ok(None));
        assert_eq!(b.of(dev), (1024, 512));
        assert_eq!(b.of(TargetAddr::new(1, 3)), (0, 0));
    }
}
