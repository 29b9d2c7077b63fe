//! The Ethernet header and the common AoE header shared by every message (AoEr11 section 2).
//!
//! ```text
//!  0      6      12     14        15     16      18     19       20     24
//!  | dst  | src  | type | ver|flg | error| major | minor| command| tag  | arg...
//! ```

use core::fmt;

use crate::error::{check_len, check_room, Result};
use crate::{Error, MacAddr, AOE_VERSION, ETHERTYPE_AOE, HEADER_LEN};

mod field {
    use core::ops::{Range, RangeFrom};
    pub const DST: Range<usize> = 0..6;
    pub const SRC: Range<usize> = 6..12;
    pub const ETHERTYPE: Range<usize> = 12..14;
    pub const VER_FLAGS: usize = 14;
    pub const ERROR: usize = 15;
    pub const MAJOR: Range<usize> = 16..18;
    pub const MINOR: usize = 18;
    pub const COMMAND: usize = 19;
    pub const TAG: Range<usize> = 20..24;
    pub const PAYLOAD: RangeFrom<usize> = 24..;
}

/// Header flag R: the frame is a response (Linux `AOEFL_RSP`).
pub const FLAG_RESPONSE: u8 = 0x08;
/// Header flag E: the frame reports an error in the error field (Linux `AOEFL_ERR`).
pub const FLAG_ERROR: u8 = 0x04;

open_enum! {
    /// The AoE command code (header byte 19). Codes 0xF0 and up are vendor-specific and are
    /// carried as `Unknown`.
    pub enum Command(u8) {
        /// Issue ATA Command (0).
        Ata = 0,
        /// Query Config Information (1).
        QueryConfig = 1,
        /// Mac Mask List (2).
        MacMaskList = 2,
        /// Reserve/Release (3).
        ReserveRelease = 3,
    }
}

impl Command {
    /// True for the vendor-specific range 0xF0-0xFF (Linux `AOECMD_VEND_MIN`).
    pub fn is_vendor(self) -> bool {
        u8::from(self) >= 0xF0
    }
}

open_enum! {
    /// Error codes of the header's error field, valid when the E flag is set. AoEr11 defines
    /// 1-6 (tcpdump `aoev1_errcode_str`; the Linux driver knows only 1-5).
    pub enum ErrorCode(u8) {
        /// 1: Unrecognized command code.
        UnrecognizedCommand = 1,
        /// 2: Bad argument parameter.
        BadArgument = 2,
        /// 3: Device unavailable.
        DeviceUnavailable = 3,
        /// 4: Config string present (Query Config "set" on a non-empty string).
        ConfigStringPresent = 4,
        /// 5: Unsupported version.
        UnsupportedVersion = 5,
        /// 6: Target is reserved (Reserve/Release).
        TargetReserved = 6,
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::UnrecognizedCommand => f.write_str("unrecognized command code"),
            ErrorCode::BadArgument => f.write_str("bad argument parameter"),
            ErrorCode::DeviceUnavailable => f.write_str("device unavailable"),
            ErrorCode::ConfigStringPresent => f.write_str("config string present"),
            ErrorCode::UnsupportedVersion => f.write_str("unsupported version"),
            ErrorCode::TargetReserved => f.write_str("target is reserved"),
            ErrorCode::Unknown(c) => write!(f, "unknown error {c}"),
        }
    }
}

/// The 32-bit tag an initiator puts in a request and the target echoes unchanged.
///
/// Linux reserves bit 31 for user-space tools (aoeping, aoecfg) so their tags never collide
/// with the driver's (`aoecmd.c newtag`, `aoenet_rcv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Tag(pub u32);

impl Tag {
    /// Bit 31, set in tags of user-space tools.
    pub const USER_BIT: u32 = 0x8000_0000;
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#010x}", self.0)
    }
}

/// A target address: shelf (the header's major, 16 bits) and slot (minor, 8 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetAddr {
    /// Shelf (major).
    pub shelf: u16,
    /// Slot (minor).
    pub slot: u8,
}

impl TargetAddr {
    /// Shelf 0xffff: every shelf (mdlayher `BroadcastMajor`, iPXE `AOE_MAJOR_BROADCAST`).
    pub const BROADCAST_SHELF: u16 = 0xffff;
    /// Slot 0xff: every slot (mdlayher `BroadcastMinor`).
    pub const BROADCAST_SLOT: u8 = 0xff;
    /// The address every target answers: shelf 0xffff, slot 0xff.
    pub const BROADCAST: TargetAddr = TargetAddr {
        shelf: Self::BROADCAST_SHELF,
        slot: Self::BROADCAST_SLOT,
    };

    /// A target address.
    pub const fn new(shelf: u16, slot: u8) -> Self {
        TargetAddr { shelf, slot }
    }

    /// True if a request addressed to `self` reaches the target at `target`, treating shelf
    /// 0xffff and slot 0xff as wildcards as vblade `aoe()` does.
    pub fn reaches(&self, target: TargetAddr) -> bool {
        (self.shelf == Self::BROADCAST_SHELF || self.shelf == target.shelf)
            && (self.slot == Self::BROADCAST_SLOT || self.slot == target.slot)
    }

    /// True if either part is a wildcard. The Linux driver refuses such an address in a
    /// response (`aoecmd_cfg_rsp`).
    pub fn is_wildcard(&self) -> bool {
        self.shelf == Self::BROADCAST_SHELF || self.slot == Self::BROADCAST_SLOT
    }
}

impl fmt::Display for TargetAddr {
    /// The Linux device name, `e<shelf>.<slot>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}.{}", self.shelf, self.slot)
    }
}

/// A string that is not a device name `eX.Y` (or `X.Y`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseTargetError(pub String);

impl fmt::Display for ParseTargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "'{}' is not an AoE device name (expected e<shelf>.<slot>, shelf 0-65534, slot 0-254)",
            self.0
        )
    }
}

impl std::error::Error for ParseTargetError {}

impl core::str::FromStr for TargetAddr {
    type Err = ParseTargetError;

    /// Parses `e7.3` or `7.3`; wildcard values are refused, as they name no single device.
    fn from_str(s: &str) -> core::result::Result<Self, Self::Err> {
        let err = || ParseTargetError(s.to_string());
        let body = s.strip_prefix('e').unwrap_or(s);
        let (sh, sl) = body.split_once('.').ok_or_else(err)?;
        let shelf: u16 = sh.parse().map_err(|_| err())?;
        let slot: u8 = sl.parse().map_err(|_| err())?;
        let addr = TargetAddr { shelf, slot };
        if addr.is_wildcard() {
            return Err(err());
        }
        Ok(addr)
    }
}

/// A view of an AoE Ethernet frame: the Ethernet header, the common AoE header and the
/// command-specific payload after byte 24.
#[derive(Debug, Clone)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wraps a buffer without checking it; getters may panic on short buffers.
    /// Use [`Frame::new_checked`] on untrusted input.
    pub const fn new_unchecked(buffer: T) -> Frame<T> {
        Frame { buffer }
    }

    /// Wraps a buffer after checking that it holds the 24 header bytes. EtherType is checked
    /// too: a frame that is not AoE is refused.
    pub fn new_checked(buffer: T) -> Result<Frame<T>> {
        let f = Self::new_unchecked(buffer);
        f.check_len()?;
        let ethertype = f.ethertype();
        if ethertype != ETHERTYPE_AOE {
            return Err(Error::NotAoe { ethertype });
        }
        Ok(f)
    }

    /// Checks that every header getter is in bounds.
    pub fn check_len(&self) -> Result<()> {
        check_len(self.buffer.as_ref(), HEADER_LEN)
    }

    /// Consumes the view, returning the buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The whole frame.
    pub fn as_bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Destination MAC.
    pub fn dst(&self) -> MacAddr {
        MacAddr::from_bytes(&self.buffer.as_ref()[field::DST])
    }

    /// Source MAC.
    pub fn src(&self) -> MacAddr {
        MacAddr::from_bytes(&self.buffer.as_ref()[field::SRC])
    }

    /// EtherType.
    pub fn ethertype(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::ETHERTYPE];
        u16::from_be_bytes([b[0], b[1]])
    }

    /// Protocol version, the high nibble of byte 14.
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_FLAGS] >> 4
    }

    /// The flag nibble, the low nibble of byte 14 (R=0x08, E=0x04; 0x02 and 0x01 MBZ).
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::VER_FLAGS] & 0x0f
    }

    /// The R flag: this is a response.
    pub fn is_response(&self) -> bool {
        self.flags() & FLAG_RESPONSE != 0
    }

    /// The E flag: the error field is valid.
    pub fn is_error(&self) -> bool {
        self.flags() & FLAG_ERROR != 0
    }

    /// The raw error field.
    pub fn error(&self) -> u8 {
        self.buffer.as_ref()[field::ERROR]
    }

    /// Major (shelf).
    pub fn major(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::MAJOR];
        u16::from_be_bytes([b[0], b[1]])
    }

    /// Minor (slot).
    pub fn minor(&self) -> u8 {
        self.buffer.as_ref()[field::MINOR]
    }

    /// Shelf and slot together.
    pub fn target(&self) -> TargetAddr {
        TargetAddr::new(self.major(), self.minor())
    }

    /// Command code.
    pub fn command(&self) -> Command {
        Command::from(self.buffer.as_ref()[field::COMMAND])
    }

    /// Tag.
    pub fn tag(&self) -> Tag {
        let b = &self.buffer.as_ref()[field::TAG];
        Tag(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The command-specific bytes after the common header (including any padding).
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    /// Sets the destination MAC.
    pub fn set_dst(&mut self, mac: MacAddr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&mac.0);
    }

    /// Sets the source MAC.
    pub fn set_src(&mut self, mac: MacAddr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&mac.0);
    }

    /// Sets the EtherType.
    pub fn set_ethertype(&mut self, t: u16) {
        self.buffer.as_mut()[field::ETHERTYPE].copy_from_slice(&t.to_be_bytes());
    }

    /// Sets version and flag nibbles.
    pub fn set_version_flags(&mut self, version: u8, flags: u8) {
        self.buffer.as_mut()[field::VER_FLAGS] = (version << 4) | (flags & 0x0f);
    }

    /// Sets the error field.
    pub fn set_error(&mut self, e: u8) {
        self.buffer.as_mut()[field::ERROR] = e;
    }

    /// Sets major (shelf).
    pub fn set_major(&mut self, m: u16) {
        self.buffer.as_mut()[field::MAJOR].copy_from_slice(&m.to_be_bytes());
    }

    /// Sets minor (slot).
    pub fn set_minor(&mut self, m: u8) {
        self.buffer.as_mut()[field::MINOR] = m;
    }

    /// Sets the command code.
    pub fn set_command(&mut self, c: Command) {
        self.buffer.as_mut()[field::COMMAND] = c.into();
    }

    /// Sets the tag.
    pub fn set_tag(&mut self, t: Tag) {
        self.buffer.as_mut()[field::TAG].copy_from_slice(&t.0.to_be_bytes());
    }

    /// The command-specific bytes, writable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD]
    }
}

/// The meaning of the Ethernet and common AoE headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderRepr {
    /// Destination MAC.
    pub dst: MacAddr,
    /// Source MAC.
    pub src: MacAddr,
    /// Protocol version (1 for AoEr11).
    pub version: u8,
    /// The R flag.
    pub response: bool,
    /// The error, present exactly when the E flag is set.
    pub error: Option<ErrorCode>,
    /// Shelf and slot.
    pub target: TargetAddr,
    /// Command code.
    pub command: Command,
    /// Tag.
    pub tag: Tag,
}

impl HeaderRepr {
    /// Parses the header of a checked frame. The error byte is read only when E is set;
    /// reserved flag bits are ignored, as every implementation does.
    pub fn parse<T: AsRef<[u8]>>(frame: &Frame<T>) -> Result<HeaderRepr> {
        frame.check_len()?;
        Ok(HeaderRepr {
            dst: frame.dst(),
            src: frame.src(),
            version: frame.version(),
            response: frame.is_response(),
            error: frame.is_error().then(|| ErrorCode::from(frame.error())),
            target: frame.target(),
            command: frame.command(),
            tag: frame.tag(),
        })
    }

    /// A request header with version 1 and no flags.
    pub fn request(
        dst: MacAddr,
        src: MacAddr,
        target: TargetAddr,
        command: Command,
        tag: Tag,
    ) -> Self {
        HeaderRepr {
            dst,
            src,
            version: AOE_VERSION,
            response: false,
            error: None,
            target,
            command,
            tag,
        }
    }

    /// The header of the response to this request: addresses swapped (the responder's own
    /// MAC as source), R set, everything else echoed.
    pub fn response_to(&self, own_mac: MacAddr) -> Self {
        HeaderRepr {
            dst: self.src,
            src: own_mac,
            version: AOE_VERSION,
            response: true,
            error: None,
            target: self.target,
            command: self.command,
            tag: self.tag,
        }
    }

    /// Bytes the header takes (24).
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes the header into the first 24 bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<()> {
        check_room(buf, HEADER_LEN)?;
        let mut f = Frame::new_unchecked(buf);
        f.set_dst(self.dst);
        f.set_src(self.src);
        f.set_ethertype(ETHERTYPE_AOE);
        let mut flags = 0;
        if self.response {
            flags |= FLAG_RESPONSE;
        }
        if self.error.is_some() {
            flags |= FLAG_ERROR;
        }
        f.set_version_flags(self.version, flags);
        f.set_error(self.error.map(u8::from).unwrap_or(0));
        f.set_major(self.target.shelf);
        f.set_minor(self.target.slot);
        f.set_command(self.command);
        f.set_tag(self.tag);
        Ok(())
    }
}

impl fmt::Display for HeaderRepr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AoE v{} {} {} -> {} {} cmd {:?} tag {}",
            self.version,
            if self.response { "rsp" } else { "req" },
            self.src,
            self.dst,
            self.target,
            self.command,
            self.tag
        )?;
        if let Some(e) = self.error {
            write!(f, " error {} ({})", u8::from(e), e)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Query Config broadcast as aoecfg sends it.
    const QUERY: [u8; 24] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // dst: broadcast
        0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // src
        0x88, 0xa2, // EtherType AoE
        0x10, // version 1, no flags
        0x00, // error
        0xff, 0xff, // major: every shelf
        0xff, // minor: every slot
        0x01, // command: Query Config
        0x80, 0x00, 0x12, 0x34, // tag (user bit set)
    ];

    #[test]
    fn parse_query_header() {
        let f = Frame::new_checked(&QUERY[..]).unwrap();
        let h = HeaderRepr::parse(&f).unwrap();
        assert_eq!(h.dst, MacAddr::BROADCAST);
        assert_eq!(h.src, MacAddr([2, 0, 0, 0, 0, 1]));
        assert_eq!(h.version, 1);
        assert!(!h.response);
        assert_eq!(h.error, None);
        assert_eq!(h.target, TargetAddr::BROADCAST);
        assert_eq!(h.command, Command::QueryConfig);
        assert_eq!(h.tag, Tag(0x8000_1234));
        let mut out = [0u8; 24];
        h.emit(&mut out).unwrap();
        assert_eq!(out, QUERY);
    }

    #[test]
    fn error_flag_and_code() {
        let mut b = QUERY;
        b[14] = 0x1c; // R|E
        b[15] = 6;
        let h = HeaderRepr::parse(&Frame::new_checked(&b[..]).unwrap()).unwrap();
        assert!(h.response);
        assert_eq!(h.error, Some(ErrorCode::TargetReserved));
        // E clear: error byte ignored.
        b[14] = 0x18;
        let h = HeaderRepr::parse(&Frame::new_checked(&b[..]).unwrap()).unwrap();
        assert_eq!(h.error, None);
    }

    #[test]
    fn not_aoe_and_truncated() {
        let mut b = QUERY;
        b[12] = 0x08;
        b[13] = 0x00;
        assert_eq!(
            Frame::new_checked(&b[..]).unwrap_err(),
            Error::NotAoe { ethertype: 0x0800 }
        );
        for n in 0..24 {
            assert_eq!(
                Frame::new_checked(&QUERY[..n]).unwrap_err(),
                Error::Truncated { needed: 24, got: n }
            );
        }
    }

    #[test]
    fn wildcard_matching() {
        let t = TargetAddr::new(7, 3);
        assert!(TargetAddr::BROADCAST.reaches(t));
        assert!(TargetAddr::new(7, 0xff).reaches(t));
        assert!(TargetAddr::new(0xffff, 3).reaches(t));
        assert!(!TargetAddr::new(8, 3).reaches(t));
        assert!(!TargetAddr::new(7, 4).reaches(t));
        assert_eq!(t.to_string(), "e7.3");
        assert_eq!("e7.3".parse::<TargetAddr>().unwrap(), t);
        assert_eq!("7.3".parse::<TargetAddr>().unwrap(), t);
        assert!("e65535.1".parse::<TargetAddr>().is_err());
        assert!("e1.255".parse::<TargetAddr>().is_err());
        assert!("e1".parse::<TargetAddr>().is_err());
        assert!("ex.1".parse::<TargetAddr>().is_err());
    }

    #[test]
    fn vendor_commands_are_carried() {
        assert_eq!(Command::from(0xf3), Command::Unknown(0xf3));
        assert!(Command::from(0xf3).is_vendor());
        assert!(!Command::Ata.is_vendor());
        assert_eq!(u8::from(Command::Unknown(0x42)), 0x42);
    }
}
