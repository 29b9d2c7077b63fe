//! A whole AoE message: header plus the body its command selects.

use core::fmt;

use crate::ata::ARG_LEN as ATA_ARG_LEN;
use crate::error::{check_room, Result};
use crate::{
    AtaFlags, AtaRepr, Command, ConfigRepr, Error, Frame, HeaderRepr, MacMaskRepr, ReserveRepr,
    HEADER_LEN, MIN_FRAME_LEN,
};

/// The command-specific part of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<'a> {
    /// Command 0.
    Ata(AtaRepr<'a>),
    /// Command 1.
    Config(ConfigRepr<'a>),
    /// Command 2.
    MacMask(MacMaskRepr),
    /// Command 3.
    Reserve(ReserveRepr),
    /// Any other command (vendor-specific 0xF0-0xFF or unassigned): the raw payload, kept.
    Unknown(&'a [u8]),
}

/// A parsed AoE message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    /// Ethernet and AoE headers.
    pub header: HeaderRepr,
    /// The body.
    pub body: Body<'a>,
}

impl<'a> Message<'a> {
    /// Parses a whole Ethernet frame.
    ///
    /// The body is parsed by command code; its length fields are checked against the frame.
    /// Truncation errors count from the start of the Ethernet frame.
    ///
    /// ATA data: a write request (W set, R clear) must carry `sector count * 512` bytes, and
    /// its `data` is exactly those; other requests carry none (trailing bytes are padding).
    /// A response's `data` is everything after the argument, since a response's sector count
    /// need not describe it (vblade answers a read with the count of sectors remaining).
    pub fn parse(frame: &'a [u8]) -> Result<Message<'a>> {
        let f = Frame::new_checked(frame)?;
        let header = HeaderRepr::parse(&f)?;
        let body = Self::parse_body(&header, &frame[HEADER_LEN..])?;
        Ok(Message { header, body })
    }

    /// Parses the body of a frame whose header a caller has already parsed into `header`
    /// from `payload`, the frame's bytes after the header ([`Frame::payload`]): what
    /// [`Message::parse`] does after the header, with the same checks and the same errors
    /// (truncation counted from the start of the Ethernet frame). A receiver that looks at
    /// the header first (a target deciding whether the frame is for it at all) parses it
    /// once this way instead of twice.
    pub fn parse_body(header: &HeaderRepr, payload: &'a [u8]) -> Result<Body<'a>> {
        match header.command {
            Command::Ata => AtaRepr::parse(payload).and_then(|mut a| {
                if !header.response {
                    // A request carries exactly the data its sector count names when it
                    // writes, and none otherwise: what follows is Ethernet padding.
                    a.data = if a.aflags.contains(AtaFlags::WRITE) {
                        let n = a.transfer_len();
                        a.data.get(..n).ok_or(Error::Truncated {
                            needed: ATA_ARG_LEN + n,
                            got: ATA_ARG_LEN + a.data.len(),
                        })?
                    } else {
                        &[]
                    };
                }
                Ok(Body::Ata(a))
            }),
            Command::QueryConfig => ConfigRepr::parse(payload).map(Body::Config),
            Command::MacMaskList => MacMaskRepr::parse(payload).map(Body::MacMask),
            Command::ReserveRelease => ReserveRepr::parse(payload).map(Body::Reserve),
            Command::Unknown(_) => Ok(Body::Unknown(payload)),
        }
        .map_err(|e| match e {
            Error::Truncated { needed, got } => Error::Truncated {
                needed: needed + HEADER_LEN,
                got: got + HEADER_LEN,
            },
            other => other,
        })
    }

    /// Bytes of the frame before padding.
    pub fn unpadded_len(&self) -> usize {
        HEADER_LEN
            + match &self.body {
                Body::Ata(a) => a.buffer_len(),
                Body::Config(c) => c.buffer_len(),
                Body::MacMask(m) => m.buffer_len(),
                Body::Reserve(r) => r.buffer_len(),
                Body::Unknown(p) => p.len(),
            }
    }

    /// Bytes [`Message::emit`] writes: the frame, padded to the 60-byte Ethernet minimum.
    pub fn buffer_len(&self) -> usize {
        self.unpadded_len().max(MIN_FRAME_LEN)
    }

    /// Writes the frame into `buf`, zero-padding it to 60 bytes, and returns its length.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize> {
        let len = self.buffer_len();
        check_room(buf, len)?;
        self.header.emit(buf)?;
        let payload = &mut buf[HEADER_LEN..];
        match &self.body {
            Body::Ata(a) => a.emit(payload)?,
            Body::Config(c) => c.emit(payload)?,
            Body::MacMask(m) => m.emit(payload)?,
            Body::Reserve(r) => r.emit(payload)?,
            Body::Unknown(p) => payload[..p.len()].copy_from_slice(p),
        }
        buf[self.unpadded_len()..len].fill(0);
        Ok(len)
    }

    /// Emits into a new vector.
    pub fn to_vec(&self) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.buffer_len()];
        let n = self.emit(&mut v)?;
        v.truncate(n);
        Ok(v)
    }
}

impl fmt::Display for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.header)?;
        match &self.body {
            Body::Ata(a) => write!(f, "{a}"),
            Body::Config(c) => write!(f, "{c}"),
            Body::MacMask(m) => write!(f, "{m}"),
            Body::Reserve(r) => write!(f, "{r}"),
            Body::Unknown(p) => write!(f, "{} payload bytes", p.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConfigCommand, MacAddr, Tag, TargetAddr};

    #[test]
    fn short_config_reply_is_padded() {
        let h = HeaderRepr::request(
            MacAddr([2, 0, 0, 0, 0, 2]),
            MacAddr([2, 0, 0, 0, 0, 1]),
            TargetAddr::new(1, 1),
            Command::QueryConfig,
            Tag(7),
        )
        .response_to(MacAddr([2, 0, 0, 0, 0, 1]));
        let m = Message {
            header: h,
            body: Body::Config(ConfigRepr {
                buffer_count: 16,
                firmware_version: 0x4019,
                sector_count: 2,
                aoe_version: 1,
                ccmd: ConfigCommand::Read,
                config: b"",
            }),
        };
        assert_eq!(m.unpadded_len(), 32);
        let v = m.to_vec().unwrap();
        assert_eq!(v.len(), 60);
        assert!(v[32..].iter().all(|b| *b == 0));
        assert_eq!(Message::parse(&v).unwrap(), m);
    }

    #[test]
    fn truncation_counts_from_frame_start() {
        let mut v = vec![0u8; 24];
        v[12] = 0x88;
        v[13] = 0xa2;
        v[14] = 0x10;
        v[19] = 1; // Query Config with no argument
        assert_eq!(
            Message::parse(&v).unwrap_err(),
            Error::Truncated {
                needed: 32,
                got: 24
            }
        );
    }

    #[test]
    fn vendor_command_kept() {
        let mut v = vec![0u8; 30];
        v[12] = 0x88;
        v[13] = 0xa2;
        v[14] = 0x10;
        v[19] = 0xf1;
        v[24..30].copy_from_slice(b"vendor");
        let m = Message::parse(&v).unwrap();
        assert_eq!(m.header.command, Command::Unknown(0xf1));
        assert_eq!(m.body, Body::Unknown(b"vendor"));
    }
}
