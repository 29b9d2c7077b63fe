//! The fixed newstyle handshake: greeting, option haggling (`NBD_OPT_*` requests and
//! their replies) up to `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`.

use super::*;

/// The server's first 18 bytes ("Fixed newstyle negotiation"): `NBDMAGIC`, `IHAVEOPT`,
/// handshake flags (fixed newstyle, no zeroes).
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// An option request header ("Option haggling": `IHAVEOPT`, option, length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option.
    pub option: u32,
    /// Bytes of data that follow.
    pub len: u32,
}

impl OptionHeader {
    /// Bytes on the wire.
    pub const LEN: usize = 16;

    /// Parses the 16-byte header.
    pub fn parse(b: &[u8]) -> Result<OptionHeader, ProtocolError> {
        if b.len() < Self::LEN {
            return Err(ProtocolError::Truncated {
                needed: Self::LEN,
                got: b.len(),
            });
        }
        let magic = be64(&b[0..8]);
        if magic != IHAVEOPT {
            return Err(ProtocolError::BadOptionMagic(magic));
        }
        Ok(OptionHeader {
            option: be32(&b[8..12]),
            len: be32(&b[12..16]),
        })
    }
}

/// Appends one option reply ("Option haggling": magic, option, reply type, length, data).
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// What to do after an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send the output and read the next option.
    Continue,
    /// Send the output and enter the transmission phase on this export.
    Transmit(Session),
    /// Send the output (if any) and close the connection.
    Close,
}

/// The server side of the fixed newstyle handshake ("Fixed newstyle negotiation").
#[derive(Debug, Default)]
pub struct Handshake {
    pub(super) no_zeroes: bool,
    pub(super) structured: bool,
}

impl Handshake {
    /// A handshake whose greeting ([`greeting`]) has been sent.
    pub fn new() -> Handshake {
        Handshake::default()
    }

    /// Handles the client's 32-bit flags. An unknown bit means the connection MUST be
    /// dropped ("Client flags"). A client without `NBD_FLAG_C_FIXED_NEWSTYLE` is served
    /// as fixed newstyle anyway, which the spec permits.
    pub fn client_flags(&mut self, b: [u8; 4]) -> Result<(), ProtocolError> {
        let f = u32::from_be_bytes(b);
        if f & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(ProtocolError::UnknownClientFlags(f));
        }
        self.no_zeroes = f & FLAG_C_NO_ZEROES != 0;
        Ok(())
    }

    /// True once `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// Answers option data that was too long to read ([`MAX_OPTION_DATA`]); the caller
    /// discarded it.
    pub fn too_big(&mut self, option: u32, out: &mut Vec<u8>) -> Step {
        if option == opt::EXPORT_NAME {
            // No way to report an error to NBD_OPT_EXPORT_NAME: close.
            return Step::Close;
        }
        option_reply(out, option, rep::ERR_TOO_BIG, b"option data too long");
        Step::Continue
    }

    /// Handles one option with its data, appending replies to `out`.
    pub fn option(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &dyn Exports,
        out: &mut Vec<u8>,
    ) -> Step {
        match option {
            // "NBD_OPT_EXPORT_NAME": no option reply; size, flags and (unless no-zeroes)
            // 124 zero bytes, or close if the export does not exist.
            opt::EXPORT_NAME => {
                let Ok(name) = std::str::from_utf8(data) else {
                    return Step::Close;
                };
                let Some(e) = exports.lookup(name) else {
                    return Step::Close;
                };
                let s = Session::new(&e, self.structured);
                out.extend_from_slice(&e.size.to_be_bytes());
                out.extend_from_slice(&s.flags.to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Step::Transmit(s)
            }
            // "NBD_OPT_ABORT": the server MUST reply with NBD_REP_ACK.
            opt::ABORT => {
                option_reply(out, option, rep::ACK, &[]);
                Step::Close
            }
            // "NBD_OPT_LIST": one NBD_REP_SERVER per export, then NBD_REP_ACK; data
            // MUST be empty.
            opt::LIST => {
                if !data.is_empty() {
                    option_reply(out, option, rep::ERR_INVALID, b"NBD_OPT_LIST takes no data");
                    return Step::Continue;
                }
                for e in exports.list() {
                    let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    option_reply(out, option, rep::SERVER, &d);
                }
                option_reply(out, option, rep::ACK, &[]);
                Step::Continue
            }
            // "NBD_OPT_STRUCTURED_REPLY": no data; ACK.
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_reply(out, option, rep::ERR_INVALID, b"option takes no data");
                } else {
                    self.structured = true;
                    option_reply(out, option, rep::ACK, &[]);
                }
                Step::Continue
            }
            opt::INFO | opt::GO => self.info_or_go(option, data, exports, out),
            // STARTTLS, metadata contexts, extended headers and anything newer.
            _ => {
                option_reply(out, option, rep::ERR_UNSUP, b"option not supported");
                Step::Continue
            }
        }
    }

    /// "NBD_OPT_INFO and NBD_OPT_GO": data is a 32-bit name length, the name, a 16-bit
    /// count of information requests and that many 16-bit types. Replies: NBD_REP_INFO
    /// (NBD_INFO_EXPORT always; NBD_INFO_BLOCK_SIZE always, since the minimum of 512 is a
    /// constraint the client should know; name and description when asked), then
    /// NBD_REP_ACK; NBD_REP_ERR_UNKNOWN for an unknown export, NBD_REP_ERR_INVALID for
    /// malformed data.
    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &dyn Exports,
        out: &mut Vec<u8>,
    ) -> Step {
        let Some(req) = parse_info_request(data) else {
            option_reply(out, option, rep::ERR_INVALID, b"malformed info request");
            return Step::Continue;
        };
        let Some(e) = exports.lookup(&req.name) else {
            let msg = format!("no export named {:?} (is the device up?)", req.name);
            option_reply(out, option, rep::ERR_UNKNOWN, msg.as_bytes());
            return Step::Continue;
        };
        let s = Session::new(&e, self.structured);
        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&info::EXPORT.to_be_bytes());
        d.extend_from_slice(&e.size.to_be_bytes());
        d.extend_from_slice(&s.flags.to_be_bytes());
        option_reply(out, option, rep::INFO, &d);
        let mut d = Vec::with_capacity(14);
        d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&e.block.min.to_be_bytes());
        d.extend_from_slice(&e.block.preferred.to_be_bytes());
        d.extend_from_slice(&e.block.max.to_be_bytes());
        option_reply(out, option, rep::INFO, &d);
        if req.infos.contains(&info::NAME) {
            let mut d = info::NAME.to_be_bytes().to_vec();
            d.extend_from_slice(e.name.as_bytes());
            option_reply(out, option, rep::INFO, &d);
        }
        if req.infos.contains(&info::DESCRIPTION) {
            let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(e.description.as_bytes());
            option_reply(out, option, rep::INFO, &d);
        }
        option_reply(out, option, rep::ACK, &[]);
        if option == opt::GO {
            Step::Transmit(s)
        } else {
            Step::Continue
        }
    }
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// Information types asked for.
    pub infos: Vec<u16>,
}

/// Parses `NBD_OPT_INFO`/`NBD_OPT_GO` data; None if the lengths do not add up exactly, the
/// name is not UTF-8 or is longer than [`MAX_STRING`].
pub fn parse_info_request(d: &[u8]) -> Option<InfoRequest> {
    let n = be32(d.get(0..4)?) as usize;
    if n > MAX_STRING {
        return None;
    }
    let name = std::str::from_utf8(d.get(4..4 + n)?).ok()?.to_string();
    let rest = d.get(4 + n..)?;
    let count = be16(rest.get(0..2)?) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return None;
    }
    let infos = list.chunks_exact(2).map(be16).collect();
    Some(InfoRequest { name, infos })
}
