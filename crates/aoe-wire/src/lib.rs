//! AoEr11 wire format: every ATA-over-Ethernet message as a zero-copy view and a `Repr`.
//!
//! Layer: the bottom of the stack. This crate only parses and emits bytes. It knows nothing of
//! sockets, disks, clocks or threads, and has no `unsafe`.
//!
//! Shape (after smoltcp's `wire` module):
//! - A *view* (`Frame`, `AtaPacket`, `ConfigPacket`, `MacMaskPacket`, `ReservePacket`) wraps a
//!   buffer `T: AsRef<[u8]>`; `new_checked` validates the length once, after which no getter
//!   panics. Setters need `T: AsMut<[u8]>`. Views are what the hot path uses: a target writes a
//!   reply header in place in front of data a disk read put there.
//! - A *`Repr`* (`HeaderRepr`, `AtaRepr`, `ConfigRepr`, ...) is the parsed meaning, with
//!   `parse`, `buffer_len` and `emit`. [`Message`] ties a header and a body together and pads
//!   emitted frames to the 60-byte Ethernet minimum.
//! - Open value spaces (commands, ATA opcodes, error codes) are enums with an `Unknown` variant,
//!   so vendor commands and future codes are carried, never rejected.
//!
//! The layout follows AoEr11 as reconstructed in `docs/PROTOCOL.md` section 1 (tcpdump
//! `print-aoe.c`, vblade `dat.h`, Linux `drivers/block/aoe/aoe.h`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[macro_use]
mod macros;

pub mod ata;
pub mod config;
mod error;
mod ethernet;
pub mod header;
pub mod identify;
pub mod macmask;
mod message;
pub mod reserve;

pub use ata::{AtaCommand, AtaFlags, AtaPacket, AtaRepr};
pub use config::{ConfigCommand, ConfigPacket, ConfigRepr, MAX_CONFIG_LEN};
pub use error::{Error, Result};
pub use ethernet::{MacAddr, ParseMacError};
pub use header::{Command, ErrorCode, Frame, HeaderRepr, Tag, TargetAddr};
pub use identify::{Identify, IdentifyInfo};
pub use macmask::{
    Directive, DirectiveCommand, MacMaskPacket, MacMaskRepr, MaskCommand, MaskError,
};
pub use message::{Body, Message};
pub use reserve::{ReserveCommand, ReservePacket, ReserveRepr};

/// EtherType registered for ATA over Ethernet (IEEE; vblade `linux.c`, mdlayher `aoe.go`).
pub const ETHERTYPE_AOE: u16 = 0x88A2;

/// AoE protocol version carried in the header's high nibble (AoEr11: version 1).
pub const AOE_VERSION: u8 = 1;

/// Length of the Ethernet header (destination, source, EtherType).
pub const ETHERNET_HEADER_LEN: usize = 14;

/// Length of the Ethernet header plus the common AoE header ("Naoehdr = 24" in vblade `dat.h`).
pub const HEADER_LEN: usize = 24;

/// Length of an ATA frame up to its data ("Natahdr = 36": common header + 12-byte ATA arg).
pub const ATA_HEADER_LEN: usize = 36;

/// Length of a Query Config frame up to its config string ("Ncfghdr = 32").
pub const CONFIG_HEADER_LEN: usize = 32;

/// The Ethernet minimum frame length without FCS. Emitted frames are padded to it: vblade sends
/// shorter replies, which aoetools and some NICs drop.
pub const MIN_FRAME_LEN: usize = 60;

/// Bytes in one ATA sector as AoE transfers it.
pub const SECTOR_SIZE: usize = 512;

/// Largest number of whole sectors one ATA frame can carry on a link of the given MTU.
///
/// The MTU counts everything after the Ethernet header, so the AoE headers take
/// `ATA_HEADER_LEN - ETHERNET_HEADER_LEN` = 22 bytes of it (the Linux driver's
/// `(mtu - sizeof(struct aoe_hdr) - sizeof(struct aoe_atahdr)) / 512`, vblade `confcmd`).
/// Saturates at 255, the largest value the one-byte sector count field can carry.
pub fn max_sectors_for_mtu(mtu: u32) -> u8 {
    let room = (mtu as usize).saturating_sub(ATA_HEADER_LEN - ETHERNET_HEADER_LEN);
    (room / SECTOR_SIZE).min(255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_per_mtu() {
        assert_eq!(max_sectors_for_mtu(1500), 2);
        assert_eq!(max_sectors_for_mtu(9000), 17);
        assert_eq!(max_sectors_for_mtu(1000), 1);
        assert_eq!(max_sectors_for_mtu(100), 0);
        assert_eq!(max_sectors_for_mtu(0), 0);
        assert_eq!(max_sectors_for_mtu(u32::MAX), 255);
    }
}
