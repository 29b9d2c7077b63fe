//! Reserve/Release (AoE command 3): a 2-byte argument and a list of MACs.
//!
//! ```text
//!  payload: 0 RCmd | 1 NMacs | NMacs x 6-byte MAC
//! ```
//! (tcpdump `aoev1_rcmd_str`, vblade `aoesrr`.)

use core::fmt;

use crate::error::{check_len, check_room, Result};
use crate::{Error, MacAddr};

/// Length of the argument before the MAC list.
pub const ARG_LEN: usize = 2;

open_enum! {
    /// RCmd.
    pub enum ReserveCommand(u8) {
        /// 0: read the reserve list.
        Read = 0,
        /// 1: set the list; refused with error 6 unless the requester is on the current list.
        Set = 1,
        /// 2: force set the list.
        ForceSet = 2,
    }
}

/// A view of a Reserve/Release payload.
#[derive(Debug, Clone)]
pub struct ReservePacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> ReservePacket<T> {
    /// Wraps without checking.
    pub const fn new_unchecked(buffer: T) -> Self {
        ReservePacket { buffer }
    }
    /// Wraps after checking the argument and every MAC its count names.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        check_len(p.buffer.as_ref(), ARG_LEN)?;
        check_len(p.buffer.as_ref(), ARG_LEN + 6 * p.nmacs() as usize)?;
        Ok(p)
    }
    /// RCmd.
    pub fn rcmd(&self) -> ReserveCommand {
        ReserveCommand::from(self.buffer.as_ref()[0])
    }
    /// Number of MACs.
    pub fn nmacs(&self) -> u8 {
        self.buffer.as_ref()[1]
    }
    /// The `i`th MAC; `None` past the count.
    pub fn mac(&self, i: usize) -> Option<MacAddr> {
        if i >= self.nmacs() as usize {
            return None;
        }
        self.buffer
            .as_ref()
            .get(ARG_LEN + 6 * i..ARG_LEN + 6 * (i + 1))
            .map(MacAddr::from_bytes)
    }
}

/// The meaning of a Reserve/Release payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRepr {
    /// RCmd.
    pub rcmd: ReserveCommand,
    /// The MAC list (empty in a set: release).
    pub macs: Vec<MacAddr>,
}

impl ReserveRepr {
    /// Parses a Reserve/Release payload.
    pub fn parse(payload: &[u8]) -> Result<Self> {
        let p = ReservePacket::new_checked(payload)?;
        Ok(ReserveRepr {
            rcmd: p.rcmd(),
            macs: (0..p.nmacs() as usize).filter_map(|i| p.mac(i)).collect(),
        })
    }

    /// Bytes argument and list take.
    pub fn buffer_len(&self) -> usize {
        ARG_LEN + 6 * self.macs.len()
    }

    /// Writes argument and list.
    pub fn emit(&self, payload: &mut [u8]) -> Result<()> {
        if self.macs.len() > 255 {
            return Err(Error::TooManyEntries {
                count: self.macs.len(),
            });
        }
        check_room(payload, self.buffer_len())?;
        payload[0] = self.rcmd.into();
        payload[1] = self.macs.len() as u8;
        for (i, m) in self.macs.iter().enumerate() {
            payload[ARG_LEN + 6 * i..ARG_LEN + 6 * (i + 1)].copy_from_slice(&m.0);
        }
        Ok(())
    }
}

impl fmt::Display for ReserveRepr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reserve {:?} [", self.rcmd)?;
        for (i, m) in self.macs.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{m}")?;
        }
        f.write_str("]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set request with one MAC.
    const SET: [u8; 8] = [
        0x01, // RCmd: set
        0x01, // NMacs
        0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // MAC
    ];

    #[test]
    fn parse_emit_set() {
        let r = ReserveRepr::parse(&SET).unwrap();
        assert_eq!(r.rcmd, ReserveCommand::Set);
        assert_eq!(r.macs, vec![MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56])]);
        let mut out = [0u8; 8];
        r.emit(&mut out).unwrap();
        assert_eq!(out, SET);
    }

    #[test]
    fn release_is_empty_set() {
        let r = ReserveRepr::parse(&[0x01, 0x00]).unwrap();
        assert!(r.macs.is_empty());
        assert_eq!(
            ReserveRepr::parse(&[0x01, 0x02, 1, 2, 3, 4, 5, 6]).unwrap_err(),
            Error::Truncated { needed: 14, got: 8 }
        );
    }
}
