//! Query Config Information (AoE command 1): an 8-byte argument and a config string.
//!
//! ```text
//!  payload offset: 0..2          2..4              4             5                6..8           8..
//!                  | buffer count | firmware version | sector count | ver(4)|ccmd(4) | string length | string
//! ```

use core::fmt;

use crate::error::{check_len, check_room, Result};
use crate::Error;

mod field {
    use core::ops::Range;
    pub const BUFFER_COUNT: Range<usize> = 0..2;
    pub const FIRMWARE: Range<usize> = 2..4;
    pub const SECTOR_COUNT: usize = 4;
    pub const VER_CCMD: usize = 5;
    pub const STRING_LEN: Range<usize> = 6..8;
    pub const STRING: usize = 8;
}

/// Length of the argument before the config string.
pub const ARG_LEN: usize = 8;

/// Longest config string AoEr11 allows (tcpdump `AOEV1_MAX_CONFSTR_LEN`, vblade `Nconfig`).
pub const MAX_CONFIG_LEN: usize = 1024;

open_enum! {
    /// CCmd, the low nibble of payload byte 5.
    pub enum ConfigCommand(u8) {
        /// 0: read the config string.
        Read = 0,
        /// 1: answer only if the string equals the request's exactly.
        Test = 1,
        /// 2: answer only if the request's string is a prefix of the target's.
        TestPrefix = 2,
        /// 3: set the string if the target's is empty, else error 4.
        Set = 3,
        /// 4: set the string unconditionally.
        ForceSet = 4,
    }
}

/// A view of a Query Config payload.
#[derive(Debug, Clone)]
pub struct ConfigPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> ConfigPacket<T> {
    /// Wraps without checking.
    pub const fn new_unchecked(buffer: T) -> Self {
        ConfigPacket { buffer }
    }

    /// Wraps after checking the argument and that the string its length names is present.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        check_len(p.buffer.as_ref(), ARG_LEN)?;
        let len = p.string_len() as usize;
        if len > MAX_CONFIG_LEN {
            return Err(Error::ConfigTooLong { len });
        }
        check_len(p.buffer.as_ref(), ARG_LEN + len)?;
        Ok(p)
    }

    /// Buffer count: how many requests the target can queue.
    pub fn buffer_count(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::BUFFER_COUNT];
        u16::from_be_bytes([b[0], b[1]])
    }
    /// Firmware version.
    pub fn firmware_version(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::FIRMWARE];
        u16::from_be_bytes([b[0], b[1]])
    }
    /// Sector count: the most sectors one ATA command may carry.
    pub fn sector_count(&self) -> u8 {
        self.buffer.as_ref()[field::SECTOR_COUNT]
    }
    /// AoE protocol version (high nibble of byte 5).
    pub fn aoe_version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_CCMD] >> 4
    }
    /// CCmd (low nibble of byte 5).
    pub fn ccmd(&self) -> ConfigCommand {
        ConfigCommand::from(self.buffer.as_ref()[field::VER_CCMD] & 0x0f)
    }
    /// Config string length.
    pub fn string_len(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::STRING_LEN];
        u16::from_be_bytes([b[0], b[1]])
    }
    /// The config string.
    pub fn string(&self) -> &[u8] {
        let len = self.string_len() as usize;
        &self.buffer.as_ref()[field::STRING..field::STRING + len]
    }
}

/// The meaning of a Query Config payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigRepr<'a> {
    /// Buffer count (responses; 0 in requests).
    pub buffer_count: u16,
    /// Firmware version (responses).
    pub firmware_version: u16,
    /// Maximum sectors per ATA command (responses).
    pub sector_count: u8,
    /// AoE version the target speaks (responses: 1).
    pub aoe_version: u8,
    /// CCmd.
    pub ccmd: ConfigCommand,
    /// The config string, at most 1024 bytes.
    pub config: &'a [u8],
}

impl<'a> ConfigRepr<'a> {
    /// A request with the given CCmd and string.
    pub fn request(ccmd: ConfigCommand, config: &'a [u8]) -> Self {
        ConfigRepr {
            buffer_count: 0,
            firmware_version: 0,
            sector_count: 0,
            aoe_version: 0,
            ccmd,
            config,
        }
    }

    /// Parses a Query Config payload.
    pub fn parse(payload: &'a [u8]) -> Result<Self> {
        let p = ConfigPacket::new_checked(payload)?;
        let len = p.string_len() as usize;
        Ok(ConfigRepr {
            buffer_count: p.buffer_count(),
            firmware_version: p.firmware_version(),
            sector_count: p.sector_count(),
            aoe_version: p.aoe_version(),
            ccmd: p.ccmd(),
            config: &payload[ARG_LEN..ARG_LEN + len],
        })
    }

    /// Bytes argument and string take.
    pub fn buffer_len(&self) -> usize {
        ARG_LEN + self.config.len()
    }

    /// Writes argument and string into `payload`.
    pub fn emit(&self, payload: &mut [u8]) -> Result<()> {
        if self.config.len() > MAX_CONFIG_LEN {
            return Err(Error::ConfigTooLong {
                len: self.config.len(),
            });
        }
        check_room(payload, self.buffer_len())?;
        payload[field::BUFFER_COUNT].copy_from_slice(&self.buffer_count.to_be_bytes());
        payload[field::FIRMWARE].copy_from_slice(&self.firmware_version.to_be_bytes());
        payload[field::SECTOR_COUNT] = self.sector_count;
        payload[field::VER_CCMD] = (self.aoe_version << 4) | (u8::from(self.ccmd) & 0x0f);
        payload[field::STRING_LEN].copy_from_slice(&(self.config.len() as u16).to_be_bytes());
        payload[field::STRING..field::STRING + self.config.len()].copy_from_slice(self.config);
        Ok(())
    }
}

impl fmt::Display for ConfigRepr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Config {:?} bufcnt {} fw {:#06x} scnt {} aoe v{} string {:?}",
            self.ccmd,
            self.buffer_count,
            self.firmware_version,
            self.sector_count,
            self.aoe_version,
            String::from_utf8_lossy(self.config)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vblade-style response: 16 buffers, firmware 0x4019, 2 sectors, AoE v1, read, "abc".
    const RESPONSE: [u8; 11] = [
        0x00, 0x10, // buffer count 16
        0x40, 0x19, // firmware 0x4019
        0x02, // sector count
        0x10, // AoE version 1, CCmd 0 (read)
        0x00, 0x03, // string length
        b'a', b'b', b'c', // string
    ];

    #[test]
    fn parse_emit_response() {
        let c = ConfigRepr::parse(&RESPONSE).unwrap();
        assert_eq!(c.buffer_count, 16);
        assert_eq!(c.firmware_version, 0x4019);
        assert_eq!(c.sector_count, 2);
        assert_eq!(c.aoe_version, 1);
        assert_eq!(c.ccmd, ConfigCommand::Read);
        assert_eq!(c.config, b"abc");
        let mut out = [0u8; 11];
        c.emit(&mut out).unwrap();
        assert_eq!(out, RESPONSE);
    }

    #[test]
    fn string_length_checked() {
        assert_eq!(
            ConfigRepr::parse(&RESPONSE[..10]).unwrap_err(),
            Error::Truncated {
                needed: 11,
                got: 10
            }
        );
        let mut long = vec![0u8; 8 + 1025];
        long[6..8].copy_from_slice(&1025u16.to_be_bytes());
        assert_eq!(
            ConfigRepr::parse(&long).unwrap_err(),
            Error::ConfigTooLong { len: 1025 }
        );
        let big = [0u8; 1025];
        let c = ConfigRepr::request(ConfigCommand::Set, &big);
        assert_eq!(
            c.emit(&mut [0u8; 2000]).unwrap_err(),
            Error::ConfigTooLong { len: 1025 }
        );
    }

    #[test]
    fn ccmd_values() {
        for (v, c) in [
            (0, ConfigCommand::Read),
            (1, ConfigCommand::Test),
            (2, ConfigCommand::TestPrefix),
            (3, ConfigCommand::Set),
            (4, ConfigCommand::ForceSet),
            (9, ConfigCommand::Unknown(9)),
        ] {
            assert_eq!(ConfigCommand::from(v), c);
        }
    }
}
