//! Issue ATA Command (AoE command 0): a 12-byte argument, then sector data.
//!
//! ```text
//!  payload offset: 0       1            2             3           4..10        10..12    12..
//!                  | aflags | err/feature | sector count | cmd/status | lba0..lba5 | reserved | data
//! ```
//! LBA bytes are little-endian (vblade `getlba`, Linux `put_lba`).

use core::fmt;

use bitflags::bitflags;

use crate::error::{check_len, check_room, Result};
use crate::SECTOR_SIZE;

mod field {
    use core::ops::{Range, RangeFrom};
    pub const AFLAGS: usize = 0;
    pub const ERR_FEATURE: usize = 1;
    pub const SECTOR_COUNT: usize = 2;
    pub const CMD_STATUS: usize = 3;
    pub const LBA: Range<usize> = 4..10;
    pub const RESERVED: Range<usize> = 10..12;
    pub const DATA: RangeFrom<usize> = 12..;
}

/// Length of the ATA argument before the data.
pub const ARG_LEN: usize = 12;

bitflags! {
    /// AFlags (payload byte 0). 0x80, 0x20, 0x08 and 0x04 must be zero (tcpdump
    /// `aoev1_aflag_bitmap_str`, Linux `AOEAFL_*`); unknown bits are retained.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct AtaFlags: u8 {
        /// E: LBA48 extended command.
        const EXTENDED = 0x40;
        /// D: the device/head register bit.
        const DEVICE = 0x10;
        /// A: asynchronous write; the target may answer before the data is on the medium.
        const ASYNC = 0x02;
        /// W: the command writes data carried in this frame.
        const WRITE = 0x01;
    }
}

open_enum! {
    /// ATA command opcodes AoE peers use (ATA8-ACS names).
    pub enum AtaCommand(u8) {
        /// READ SECTORS (LBA28).
        ReadSectors = 0x20,
        /// READ SECTORS EXT (LBA48).
        ReadSectorsExt = 0x24,
        /// WRITE SECTORS (LBA28).
        WriteSectors = 0x30,
        /// WRITE SECTORS EXT (LBA48).
        WriteSectorsExt = 0x34,
        /// SMART, subcommand in the feature register (aoeping `-S`).
        Smart = 0xB0,
        /// CHECK POWER MODE.
        CheckPowerMode = 0xE5,
        /// FLUSH CACHE.
        FlushCache = 0xE7,
        /// FLUSH CACHE EXT.
        FlushCacheExt = 0xEA,
        /// IDENTIFY DEVICE: returns one 512-byte page.
        IdentifyDevice = 0xEC,
    }
}

/// ATA status register bits (response `cmd/status`).
pub mod status {
    /// ERR: an error occurred, see the error register.
    pub const ERR: u8 = 0x01;
    /// DRQ: data request.
    pub const DRQ: u8 = 0x08;
    /// DF: device fault.
    pub const DF: u8 = 0x20;
    /// DRDY: device ready.
    pub const DRDY: u8 = 0x40;
    /// BSY: busy.
    pub const BSY: u8 = 0x80;
    /// The bits the Linux initiator treats as failure (`ktiocomplete`: `cmdstat & 0xa9`).
    pub const FAILURE_MASK: u8 = BSY | DF | DRQ | ERR;
}

/// ATA error register bits (response `err/feature`).
pub mod error_bits {
    /// ABRT: command aborted (unsupported command or bad parameter).
    pub const ABRT: u8 = 0x04;
    /// IDNF: the address is out of range.
    pub const IDNF: u8 = 0x10;
    /// UNC: uncorrectable data error (a failed read).
    pub const UNC: u8 = 0x40;
}

/// SMART subcommands (feature register of command 0xB0), as aoeping `-S` names them.
pub mod smart {
    /// SMART READ DATA.
    pub const READ_DATA: u8 = 0xD0;
    /// SMART EXECUTE OFF-LINE IMMEDIATE.
    pub const OFFLINE_IMMEDIATE: u8 = 0xD4;
    /// SMART READ LOG.
    pub const READ_LOG: u8 = 0xD5;
    /// SMART WRITE LOG.
    pub const WRITE_LOG: u8 = 0xD6;
    /// SMART ENABLE OPERATIONS.
    pub const ENABLE: u8 = 0xD8;
    /// SMART DISABLE OPERATIONS.
    pub const DISABLE: u8 = 0xD9;
    /// SMART RETURN STATUS.
    pub const RETURN_STATUS: u8 = 0xDA;
    /// LBA mid/high signature every SMART command carries (0x4F, 0xC2); RETURN STATUS echoes
    /// it when no threshold is exceeded and answers 0xF4/0x2C when one is.
    pub const SIGNATURE: (u8, u8) = (0x4F, 0xC2);
}

/// A view of the ATA argument and data (the frame payload after the common header).
#[derive(Debug, Clone)]
pub struct AtaPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> AtaPacket<T> {
    /// Wraps without checking.
    pub const fn new_unchecked(buffer: T) -> Self {
        AtaPacket { buffer }
    }

    /// Wraps after checking that the 12-byte argument is present.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        check_len(p.buffer.as_ref(), ARG_LEN)?;
        Ok(p)
    }

    /// AFlags.
    pub fn aflags(&self) -> AtaFlags {
        AtaFlags::from_bits_retain(self.buffer.as_ref()[field::AFLAGS])
    }

    /// Err/Feature: feature register in a request, error register in a response.
    pub fn err_feature(&self) -> u8 {
        self.buffer.as_ref()[field::ERR_FEATURE]
    }

    /// Sector count.
    pub fn sector_count(&self) -> u8 {
        self.buffer.as_ref()[field::SECTOR_COUNT]
    }

    /// Cmd/Status: ATA command in a request, ATA status in a response.
    pub fn cmd_status(&self) -> u8 {
        self.buffer.as_ref()[field::CMD_STATUS]
    }

    /// The six LBA bytes as a 48-bit number (little-endian on the wire).
    pub fn lba(&self) -> u64 {
        let b = &self.buffer.as_ref()[field::LBA];
        let mut v = [0u8; 8];
        v[..6].copy_from_slice(b);
        u64::from_le_bytes(v)
    }

    /// Everything after the argument: write data, read data, or Ethernet padding.
    pub fn data(&self) -> &[u8] {
        &self.buffer.as_ref()[field::DATA]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> AtaPacket<T> {
    /// Sets AFlags.
    pub fn set_aflags(&mut self, f: AtaFlags) {
        self.buffer.as_mut()[field::AFLAGS] = f.bits();
    }
    /// Sets Err/Feature.
    pub fn set_err_feature(&mut self, v: u8) {
        self.buffer.as_mut()[field::ERR_FEATURE] = v;
    }
    /// Sets the sector count.
    pub fn set_sector_count(&mut self, v: u8) {
        self.buffer.as_mut()[field::SECTOR_COUNT] = v;
    }
    /// Sets Cmd/Status.
    pub fn set_cmd_status(&mut self, v: u8) {
        self.buffer.as_mut()[field::CMD_STATUS] = v;
    }
    /// Sets the six LBA bytes from the low 48 bits of `lba`.
    pub fn set_lba(&mut self, lba: u64) {
        self.buffer.as_mut()[field::LBA].copy_from_slice(&lba.to_le_bytes()[..6]);
    }
    /// Zeroes the two reserved bytes.
    pub fn clear_reserved(&mut self) {
        self.buffer.as_mut()[field::RESERVED].fill(0);
    }
    /// The 12-byte argument, writable.
    pub fn arg_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[..ARG_LEN]
    }
    /// The data area, writable (a disk read lands here).
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::DATA]
    }
}

/// The meaning of an ATA argument; `data` borrows the frame's data area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtaRepr<'a> {
    /// AFlags.
    pub aflags: AtaFlags,
    /// Feature (request) or error register (response).
    pub err_feature: u8,
    /// Sector count.
    pub sector_count: u8,
    /// ATA command (request) or status (response).
    pub cmd_status: u8,
    /// The 48-bit LBA field as carried (see [`AtaRepr::effective_lba`]).
    pub lba: u64,
    /// Data after the argument. On parse this is everything the frame holds, which may include
    /// Ethernet padding: use [`AtaRepr::write_data`] for the payload a write carries.
    pub data: &'a [u8],
}

impl<'a> AtaRepr<'a> {
    /// Parses an ATA payload.
    pub fn parse(payload: &'a [u8]) -> Result<Self> {
        let p = AtaPacket::new_checked(payload)?;
        Ok(AtaRepr {
            aflags: p.aflags(),
            err_feature: p.err_feature(),
            sector_count: p.sector_count(),
            cmd_status: p.cmd_status(),
            lba: p.lba(),
            data: &payload[ARG_LEN..],
        })
    }

    /// The address the command targets. For LBA28 commands (E clear) only 28 bits count: the
    /// top nibble of lba3 is the device register, which the Linux driver sets to 0xe0
    /// (`put_lba`: `lba3 = (lba3 & 0x0f) | 0xe0`).
    pub fn effective_lba(&self) -> u64 {
        if self.aflags.contains(AtaFlags::EXTENDED) {
            self.lba & 0xffff_ffff_ffff
        } else {
            self.lba & 0x0fff_ffff
        }
    }

    /// The ATA command of a request.
    pub fn command(&self) -> AtaCommand {
        AtaCommand::from(self.cmd_status)
    }

    /// Bytes the sector count covers.
    pub fn transfer_len(&self) -> usize {
        self.sector_count as usize * SECTOR_SIZE
    }

    /// The write payload: the first `sector_count * 512` bytes of data, or a `Truncated`
    /// error if the frame carries fewer.
    pub fn write_data(&self) -> Result<&'a [u8]> {
        let n = self.transfer_len();
        check_len(self.data, n).map_err(|_| crate::Error::Truncated {
            needed: crate::ATA_HEADER_LEN + n,
            got: crate::ATA_HEADER_LEN + self.data.len(),
        })?;
        Ok(&self.data[..n])
    }

    /// Bytes the argument and data take.
    pub fn buffer_len(&self) -> usize {
        ARG_LEN + self.data.len()
    }

    /// Writes argument and data into `payload`.
    pub fn emit(&self, payload: &mut [u8]) -> Result<()> {
        check_room(payload, self.buffer_len())?;
        let mut p = AtaPacket::new_unchecked(&mut *payload);
        p.set_aflags(self.aflags);
        p.set_err_feature(self.err_feature);
        p.set_sector_count(self.sector_count);
        p.set_cmd_status(self.cmd_status);
        p.set_lba(self.lba);
        p.clear_reserved();
        payload[ARG_LEN..ARG_LEN + self.data.len()].copy_from_slice(self.data);
        Ok(())
    }
}

impl fmt::Display for AtaRepr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ATA aflags {:#04x} err/feat {:#04x} count {} cmd/stat {:#04x} lba {} data {}B",
            self.aflags.bits(),
            self.err_feature,
            self.sector_count,
            self.cmd_status,
            self.lba,
            self.data.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// READ SECTORS EXT of 2 sectors at LBA 0x0102030405, as the Linux driver sends it.
    const READ_EXT: [u8; 12] = [
        0x40, // aflags: E (LBA48)
        0x00, // feature
        0x02, // sector count
        0x24, // READ SECTORS EXT
        0x05, 0x04, 0x03, 0x02, 0x01, 0x00, // lba0..lba5, little-endian
        0x00, 0x00, // reserved
    ];

    #[test]
    fn parse_read_ext() {
        let a = AtaRepr::parse(&READ_EXT).unwrap();
        assert_eq!(a.aflags, AtaFlags::EXTENDED);
        assert_eq!(a.sector_count, 2);
        assert_eq!(a.command(), AtaCommand::ReadSectorsExt);
        assert_eq!(a.lba, 0x01_0203_0405);
        assert_eq!(a.effective_lba(), 0x01_0203_0405);
        assert_eq!(a.transfer_len(), 1024);
        assert!(a.data.is_empty());
        let mut out = [0u8; 12];
        a.emit(&mut out).unwrap();
        assert_eq!(out, READ_EXT);
    }

    #[test]
    fn lba28_masks_device_register() {
        // READ SECTORS (LBA28) at 0x0345678 with lba3 = 0xe0 | 0x0: device bits set.
        let b = [0x00, 0, 1, 0x20, 0x78, 0x56, 0x34, 0xe0, 0, 0, 0, 0];
        let a = AtaRepr::parse(&b).unwrap();
        assert_eq!(a.lba, 0xe0_345678);
        assert_eq!(a.effective_lba(), 0x0034_5678);
    }

    #[test]
    fn write_data_requires_full_sectors() {
        let mut b = vec![0x41, 0, 2, 0x34, 0, 0, 0, 0, 0, 0, 0, 0];
        b.extend(std::iter::repeat_n(0xab, 1000));
        let a = AtaRepr::parse(&b).unwrap();
        assert!(a.aflags.contains(AtaFlags::WRITE));
        assert_eq!(
            a.write_data().unwrap_err(),
            crate::Error::Truncated {
                needed: 36 + 1024,
                got: 36 + 1000
            }
        );
        b.extend([0xab; 30]);
        let a = AtaRepr::parse(&b).unwrap();
        assert_eq!(a.write_data().unwrap().len(), 1024);
    }

    #[test]
    fn unknown_flag_bits_kept() {
        let mut b = READ_EXT;
        b[0] = 0xff;
        let a = AtaRepr::parse(&b).unwrap();
        assert_eq!(a.aflags.bits(), 0xff);
    }
}
