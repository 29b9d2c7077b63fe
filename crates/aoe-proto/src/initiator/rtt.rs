//! Per target MAC: the paths (local interfaces) it answers on, its RTT estimate
//! (Jacobson/Karels, the driver's `calc_rttavg`) and its window of outstanding frames
//! (`aoecmd_ata_rsp` growth, `rexmit_timer` collapse).

use super::*;

#[derive(Debug, Clone)]
pub(super) struct Iface {
    pub(super) name: String,
    pub(super) mac: MacAddr,
    pub(super) mtu: u32,
}

/// One local interface through which a target MAC answered (the driver's `aoeif`).
#[derive(Debug, Clone)]
pub(super) struct Path {
    pub(super) iface: usize,
    /// Sectors per frame on this path: min(MTU bound, target's sector count).
    pub(super) sectors: u8,
    /// Timeouts since the last answer (`lost`); the path is ejected after `2 * nframes`.
    pub(super) lost: u32,
}

#[derive(Debug, Clone)]
pub(super) struct Target {
    pub(super) mac: MacAddr,
    pub(super) paths: Vec<Path>,
    pub(super) next_path: usize,
    pub(super) buffer_count: u16,
    pub(super) sector_count: u8,
    pub(super) nframes: u16,
    pub(super) maxout: u16,
    pub(super) ssthresh: u16,
    pub(super) next_cwnd: u16,
    pub(super) nout: u16,
    pub(super) max_nout: u16,
    pub(super) taint: u32,
    pub(super) rtt_avg_us: u64,
    pub(super) rtt_dev_us: u64,
    pub(super) retransmits: u64,
    pub(super) answers: u64,
    /// Timeouts since the last answer.
    pub(super) silent: u32,
}

impl Target {
    pub(super) fn new(mac: MacAddr) -> Target {
        Target {
            mac,
            paths: Vec::new(),
            next_path: 0,
            buffer_count: 0,
            sector_count: 0,
            nframes: 1,
            maxout: 1,
            ssthresh: 1,
            next_cwnd: 1,
            nout: 0,
            max_nout: 0,
            taint: 0,
            rtt_avg_us: RTT_AVG_INIT_US,
            rtt_dev_us: RTT_DEV_INIT_US,
            retransmits: 0,
            answers: 0,
            silent: 0,
        }
    }

    /// `aoecmd_wreset` then `addtgt`: window at half its ceiling, slow start up to there.
    pub(super) fn wreset(&mut self) {
        self.ssthresh = (self.nframes / 2).max(1);
        self.maxout = (self.nframes / 2).max(1);
        self.next_cwnd = self.nframes;
    }

    pub(super) fn reset_rtt(&mut self) {
        self.rtt_avg_us = RTT_AVG_INIT_US;
        self.rtt_dev_us = RTT_DEV_INIT_US;
    }

    /// `calc_rttavg`: Jacobson/Karels with gain 1/8 for both average and deviation
    /// (RTTSCALE 8, RTTDSCALE 3), then window growth: slow start below `ssthresh`,
    /// afterwards one more frame per full window (`next_cwnd` countdown).
    pub(super) fn on_answer(&mut self, rtt: Duration) {
        let rtt = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        let err = rtt.abs_diff(self.rtt_avg_us);
        if rtt >= self.rtt_avg_us {
            self.rtt_avg_us += err / 8;
        } else {
            self.rtt_avg_us -= err / 8;
        }
        if err >= self.rtt_dev_us {
            self.rtt_dev_us += (err - self.rtt_dev_us) / 8;
        } else {
            self.rtt_dev_us -= (self.rtt_dev_us - err) / 8;
        }
        if self.maxout >= self.nframes {
            return;
        }
        if self.maxout < self.ssthresh {
            self.maxout += 1;
        } else if self.nout >= self.maxout {
            if self.next_cwnd == 0 {
                self.maxout += 1;
                self.next_cwnd = self.maxout;
            } else {
                self.next_cwnd -= 1;
            }
        }
    }

    /// `rexmit_timer`: any timeout halves the threshold and collapses the window to 1.
    pub(super) fn on_timeout(&mut self) {
        if self.maxout != 1 {
            self.ssthresh = (self.maxout / 2).max(1);
            self.maxout = 1;
        }
    }

    /// The driver's `scorn`: taint grows threefold, capped.
    pub(super) fn scorn(&mut self) {
        let n = self.taint;
        self.taint += 1;
        self.taint += self.taint * 2;
        self.taint = self.taint.max(n).min(MAX_TAINT);
    }

    pub(super) fn rto(&self, cfg: &Config) -> Duration {
        let us = 2 * self.rtt_avg_us + 8 * self.rtt_dev_us;
        Duration::from_micros(us).clamp(cfg.rto_min, cfg.rto_max.max(cfg.rto_min))
    }

    pub(super) fn usable(&self) -> bool {
        !self.paths.is_empty()
    }
}

/// Sectors per frame on a path: `aoecmd_cfg_rsp` takes the MTU bound, capped by the target's
/// sector count, with 1024 bytes when the target says 0.
pub(super) fn path_sectors(mtu_sectors: u8, target_sectors: u8) -> u8 {
    if target_sectors == 0 {
        mtu_sectors.min(DEFAULT_SECTORS)
    } else {
        mtu_sectors.min(target_sectors)
    }
}
