//! The server side of the NBD protocol, sans I/O: parsing what a client sends and encoding
//! what the server answers, for the fixed newstyle handshake and the transmission phase.
//!
//! Reference: the NBD protocol specification, `doc/proto.md` of the NBD project
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>); section names
//! below are its headings. Nothing here reads or writes a socket: [`Handshake`] is fed
//! option requests and appends reply bytes to a buffer, [`Session::check`] turns a parsed
//! [`Request`] into a [`Command`] or the NBD error the spec prescribes, and the `*_reply`
//! functions encode transmission replies.
//!
//! Deliberately not implemented: TLS (`NBD_OPT_STARTTLS` answers `NBD_REP_ERR_UNSUP`),
//! extended headers, metadata contexts and `NBD_CMD_BLOCK_STATUS`, `NBD_CMD_TRIM`,
//! `NBD_CMD_CACHE`, `NBD_CMD_RESIZE`. None of them is advertised.

use std::fmt;

/// "Newstyle negotiation": the first magic, `NBDMAGIC`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "Newstyle negotiation": the second magic (`IHAVEOPT`), also leading every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// "Option haggling": magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// "Request message": magic of a (compact) request header.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// "Simple reply message".
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// "Structured reply chunk message".
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags: `NBD_FLAG_FIXED_NEWSTYLE`.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flags: `NBD_FLAG_NO_ZEROES`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags: `NBD_FLAG_C_FIXED_NEWSTYLE`.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flags: `NBD_FLAG_C_NO_ZEROES`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags ("Transmission flags").
pub mod tflags {
    /// `NBD_FLAG_HAS_FLAGS`: always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_SEND_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`: only with structured replies.
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Option types ("Option types").
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME`.
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`.
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`.
    pub const LIST: u32 = 3;
    /// `NBD_OPT_STARTTLS`.
    pub const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO`.
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`.
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`.
    pub const STRUCTURED_REPLY: u32 = 8;
}

/// Option reply types ("Option reply types").
pub mod rep {
    /// `NBD_REP_ACK`.
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER`.
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`.
    pub const INFO: u32 = 3;
    /// `NBD_REP_ERR_UNSUP`.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// `NBD_REP_ERR_INVALID`.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// `NBD_REP_ERR_UNKNOWN`.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// `NBD_REP_ERR_TOO_BIG`.
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// Information types of `NBD_REP_INFO` ("Option reply types", `NBD_REP_INFO`).
pub mod info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME`.
    pub const NAME: u16 = 1;
    /// `NBD_INFO_DESCRIPTION`.
    pub const DESCRIPTION: u16 = 2;
    /// `NBD_INFO_BLOCK_SIZE`.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Request types ("Request types").
pub mod cmd {
    /// `NBD_CMD_READ`.
    pub const READ: u16 = 0;
    /// `NBD_CMD_WRITE`.
    pub const WRITE: u16 = 1;
    /// `NBD_CMD_DISC`.
    pub const DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`.
    pub const FLUSH: u16 = 3;
    /// `NBD_CMD_TRIM`.
    pub const TRIM: u16 = 4;
    /// `NBD_CMD_WRITE_ZEROES`.
    pub const WRITE_ZEROES: u16 = 6;
}

/// Command flags ("Command flags").
pub mod cflags {
    /// `NBD_CMD_FLAG_FUA`.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`.
    pub const DF: u16 = 1 << 2;
}

/// Structured reply flags and types ("Structured reply flags", "Structured reply types").
pub mod chunk {
    /// `NBD_REPLY_FLAG_DONE`.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// `NBD_REPLY_TYPE_NONE`.
    pub const NONE: u16 = 0;
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    pub const OFFSET_DATA: u16 = 1;
    /// `NBD_REPLY_TYPE_ERROR`.
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// Error values ("Error values"): what goes in a reply's error field. They equal Linux
/// errno numbers, but the protocol defines them, not the platform.
pub mod err {
    /// `NBD_EPERM`.
    pub const EPERM: u32 = 1;
    /// `NBD_EIO`.
    pub const EIO: u32 = 5;
    /// `NBD_ENOMEM`.
    pub const ENOMEM: u32 = 12;
    /// `NBD_EINVAL`.
    pub const EINVAL: u32 = 22;
    /// `NBD_ENOSPC`.
    pub const ENOSPC: u32 = 28;
    /// `NBD_EOVERFLOW`.
    pub const EOVERFLOW: u32 = 75;
    /// `NBD_ENOTSUP`.
    pub const ENOTSUP: u32 = 95;
    /// `NBD_ESHUTDOWN`.
    pub const ESHUTDOWN: u32 = 108;
}

/// Maps an errno from the block layer to the NBD error value ("Error values": a server
/// SHOULD map errors it cannot represent to `NBD_EIO`; EDQUOT and EFBIG to `NBD_ENOSPC`).
pub fn nbd_error(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => err::EPERM,
        libc::ENOMEM => err::ENOMEM,
        libc::EINVAL => err::EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => err::ENOSPC,
        libc::EOVERFLOW => err::EOVERFLOW,
        libc::ENOTSUP => err::ENOTSUP,
        libc::ESHUTDOWN => err::ESHUTDOWN,
        _ => err::EIO,
    }
}

/// Longest string the spec allows ("Conventions": names and messages MUST be no longer
/// than 4096 bytes).
pub const MAX_STRING: usize = 4096;

/// Option data longer than this is refused with `NBD_REP_ERR_TOO_BIG` (after being read
/// and discarded). Every option we understand fits in a few kilobytes.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;

/// Block size constraints ("Block size constraints"), in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum: the AoE sector size, 512.
    pub min: u32,
    /// Preferred: a power of two, at least `min`.
    pub preferred: u32,
    /// Maximum payload of one request.
    pub max: u32,
}

/// The largest read or write payload we accept (`NBD_INFO_BLOCK_SIZE` maximum).
pub const MAX_PAYLOAD: u32 = 32 << 20;

impl BlockSizes {
    /// Constraints for an AoE device carrying `payload` bytes of data per frame: 512
    /// minimum, the payload rounded down to a power of two (at least 512) as preferred
    /// size, [`MAX_PAYLOAD`] as maximum. The spec requires a power-of-two preferred size,
    /// and a jumbo-frame payload (8704 bytes, say) is not one.
    pub fn for_payload(payload: usize) -> BlockSizes {
        let p = payload.clamp(512, MAX_PAYLOAD as usize) as u32;
        BlockSizes {
            min: 512,
            preferred: 1 << (31 - p.leading_zeros()),
            max: MAX_PAYLOAD,
        }
    }
}

/// An export as the handshake offers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// Its name (`eX.Y`, `eX.YpN`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`, `NBD_REP_SERVER` details).
    pub description: String,
    /// Block size constraints.
    pub block: BlockSizes,
}

/// Where the handshake finds exports; asked afresh for every option, so an export whose
/// device went down vanishes from the list and comes back with it.
pub trait Exports {
    /// Every export, in a stable order.
    fn list(&self) -> Vec<Export>;
    /// The export named `name`, if it exists now.
    fn lookup(&self, name: &str) -> Option<Export> {
        self.list().into_iter().find(|e| e.name == name)
    }
}

/// What a protocol violation is, and whose fault: always the client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Client flags with a bit we did not offer ("Client flags": the server MUST drop the
    /// connection).
    #[error("client flags {0:#x} include unknown bits")]
    UnknownClientFlags(u32),
    /// An option request not starting with `IHAVEOPT`.
    #[error("option request magic {0:#018x} is not IHAVEOPT")]
    BadOptionMagic(u64),
    /// A request not starting with the request magic.
    #[error("request magic {0:#010x} is not NBD_REQUEST_MAGIC")]
    BadRequestMagic(u32),
    /// Fewer bytes than a header needs.
    #[error("truncated: needed {needed} bytes, got {got}")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        got: usize,
    },
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

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
    no_zeroes: bool,
    structured: bool,
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

/// A request header ("Request message": magic, command flags, type, cookie, offset,
/// length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Request type.
    pub kind: u16,
    /// Opaque cookie (the spec's former "handle"), echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl Request {
    /// Bytes on the wire.
    pub const LEN: usize = 28;

    /// Parses a 28-byte request header.
    pub fn parse(b: &[u8]) -> Result<Request, ProtocolError> {
        if b.len() < Self::LEN {
            return Err(ProtocolError::Truncated {
                needed: Self::LEN,
                got: b.len(),
            });
        }
        let magic = be32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(ProtocolError::BadRequestMagic(magic));
        }
        Ok(Request {
            flags: be16(&b[4..6]),
            kind: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            len: be32(&b[24..28]),
        })
    }

    /// Encodes the header (for tests and clients).
    pub fn emit(&self) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Payload bytes that follow this header on the wire: the length of a write, else 0.
    /// They must be consumed even when the request is refused, to stay in step.
    pub fn payload_len(&self) -> u32 {
        if self.kind == cmd::WRITE {
            self.len
        } else {
            0
        }
    }
}

/// A valid request, ready to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// Write the payload at `offset`; with `fua`, flush before replying.
    Write {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u32,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
    },
    /// Write `len` zero bytes at `offset` (really written: AoE has no unmap).
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u32,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
    },
    /// Flush the device's write cache.
    Flush,
    /// `NBD_CMD_DISC`: finish what is in flight, then close; no reply.
    Disconnect,
}

/// The transmission phase's state for one connection: export size, negotiated features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Export size in bytes.
    pub size: u64,
    /// Export name.
    pub name: String,
    /// Structured replies negotiated.
    pub structured: bool,
    /// The transmission flags sent.
    pub flags: u16,
    /// Block size constraints advertised.
    pub block: BlockSizes,
}

impl Session {
    /// The session for `e`: flush, FUA, write zeroes and multi-conn (every connection
    /// goes through one initiator engine, and a flush reaches the target's disk, so a
    /// flush on one connection covers writes completed on all), plus DF with structured
    /// replies (a read is always answered in one chunk).
    pub fn new(e: &Export, structured: bool) -> Session {
        let mut flags = tflags::HAS_FLAGS
            | tflags::SEND_FLUSH
            | tflags::SEND_FUA
            | tflags::SEND_WRITE_ZEROES
            | tflags::CAN_MULTI_CONN;
        if structured {
            flags |= tflags::SEND_DF;
        }
        Session {
            size: e.size,
            name: e.name.clone(),
            structured,
            flags,
            block: e.block,
        }
    }

    /// Validates a request ("Request types", "Error values"): unknown or unadvertised
    /// types and unknown flags are `NBD_EINVAL`; reads and writes longer than the
    /// advertised maximum `NBD_EINVAL` ("Block size constraints"); a read past the end
    /// `NBD_EINVAL`, a write or write-zeroes past the end `NBD_ENOSPC` ("Error values":
    /// SHOULD return ENOSPC for writes beyond the size of the device, EINVAL for reads).
    pub fn check(&self, r: &Request) -> Result<Command, u32> {
        let allowed = match r.kind {
            cmd::READ if self.structured => cflags::DF,
            cmd::READ => 0,
            cmd::WRITE => cflags::FUA,
            cmd::WRITE_ZEROES => cflags::FUA | cflags::NO_HOLE,
            cmd::FLUSH | cmd::DISC => 0,
            _ => return Err(err::EINVAL),
        };
        if r.flags & !allowed != 0 {
            return Err(err::EINVAL);
        }
        let fua = r.flags & cflags::FUA != 0;
        let in_range = r
            .offset
            .checked_add(u64::from(r.len))
            .is_some_and(|end| end <= self.size);
        match r.kind {
            cmd::READ | cmd::WRITE if r.len > self.block.max => Err(err::EINVAL),
            cmd::READ if !in_range => Err(err::EINVAL),
            cmd::WRITE | cmd::WRITE_ZEROES if !in_range => Err(err::ENOSPC),
            cmd::READ => Ok(Command::Read {
                offset: r.offset,
                len: r.len,
            }),
            cmd::WRITE => Ok(Command::Write {
                offset: r.offset,
                len: r.len,
                fua,
            }),
            cmd::WRITE_ZEROES => Ok(Command::WriteZeroes {
                offset: r.offset,
                len: r.len,
                fua,
            }),
            cmd::FLUSH => Ok(Command::Flush),
            _ => Ok(Command::Disconnect),
        }
    }

    /// The reply to a successful command without data (write, write-zeroes, flush).
    pub fn done_reply(&self, cookie: u64) -> Vec<u8> {
        if self.structured {
            structured_chunk(chunk::FLAG_DONE, chunk::NONE, cookie, &[], &[])
        } else {
            simple_reply(cookie, 0)
        }
    }

    /// The reply to a successful read of `data` at `offset`: a simple reply followed by
    /// the data, or (structured, "NBD_REPLY_TYPE_OFFSET_DATA") one data chunk flagged
    /// done. A structured read of nothing is answered with NBD_REPLY_TYPE_NONE.
    pub fn read_reply(&self, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
        if !self.structured {
            let mut v = simple_reply(cookie, 0);
            v.extend_from_slice(data);
            return v;
        }
        if data.is_empty() {
            return self.done_reply(cookie);
        }
        structured_chunk(
            chunk::FLAG_DONE,
            chunk::OFFSET_DATA,
            cookie,
            &offset.to_be_bytes(),
            data,
        )
    }

    /// The reply to a failed command: a simple reply carrying the error, or
    /// ("NBD_REPLY_TYPE_ERROR") an error chunk with a message, flagged done.
    pub fn error_reply(&self, cookie: u64, error: u32, message: &str) -> Vec<u8> {
        if !self.structured {
            return simple_reply(cookie, error);
        }
        let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
        let mut head = Vec::with_capacity(6);
        head.extend_from_slice(&error.to_be_bytes());
        head.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        structured_chunk(chunk::FLAG_DONE, chunk::ERROR, cookie, &head, msg)
    }
}

/// A simple reply header ("Simple reply message": magic, error, cookie).
pub fn simple_reply(cookie: u64, error: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v
}

/// A structured reply chunk ("Structured reply chunk message": magic, flags, type,
/// cookie, length, payload), the payload given in two parts to avoid a copy.
pub fn structured_chunk(flags: u16, kind: u16, cookie: u64, head: &[u8], data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + head.len() + data.len());
    v.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&((head.len() + data.len()) as u32).to_be_bytes());
    v.extend_from_slice(head);
    v.extend_from_slice(data);
    v
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.kind {
            cmd::READ => "READ",
            cmd::WRITE => "WRITE",
            cmd::DISC => "DISC",
            cmd::FLUSH => "FLUSH",
            cmd::TRIM => "TRIM",
            cmd::WRITE_ZEROES => "WRITE_ZEROES",
            _ => "?",
        };
        write!(
            f,
            "{name}({}) cookie {:#x} offset {} len {} flags {:#x}",
            self.kind, self.cookie, self.offset, self.len, self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Two;
    impl Exports for Two {
        fn list(&self) -> Vec<Export> {
            ["e1.1", "e1.1p1"]
                .iter()
                .enumerate()
                .map(|(i, n)| Export {
                    name: n.to_string(),
                    size: 1 << (20 - i),
                    description: String::new(),
                    block: BlockSizes::for_payload(1024),
                })
                .collect()
        }
    }

    /// Splits a buffer of option replies into (option, type, data).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            assert_eq!(be64(&b[0..8]), OPT_REPLY_MAGIC);
            let len = be32(&b[16..20]) as usize;
            v.push((be32(&b[8..12]), be32(&b[12..16]), b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        v
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    #[test]
    fn greeting_bytes() {
        assert_eq!(
            greeting(),
            [
                b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', // NBDMAGIC
                b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T', // IHAVEOPT
                0x00, 0x03, // fixed newstyle | no zeroes
            ]
        );
    }

    #[test]
    fn client_flags() {
        let mut h = Handshake::new();
        assert_eq!(h.client_flags([0, 0, 0, 3]), Ok(()));
        assert!(h.no_zeroes);
        assert_eq!(h.client_flags([0, 0, 0, 1]), Ok(()));
        assert!(!h.no_zeroes);
        assert_eq!(
            h.client_flags([0, 0, 0, 4]),
            Err(ProtocolError::UnknownClientFlags(4))
        );
    }

    #[test]
    fn option_header() {
        let b = [
            b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T', // magic
            0, 0, 0, 7, // NBD_OPT_GO
            0, 0, 0, 10, // length
        ];
        assert_eq!(
            OptionHeader::parse(&b),
            Ok(OptionHeader { option: 7, len: 10 })
        );
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(
            OptionHeader::parse(&bad),
            Err(ProtocolError::BadOptionMagic(_))
        ));
        for n in 0..16 {
            assert!(matches!(
                OptionHeader::parse(&b[..n]),
                Err(ProtocolError::Truncated { needed: 16, .. })
            ));
        }
    }

    #[test]
    fn list_exports() {
        let mut h = Handshake::new();
        let mut out = Vec::new();
        assert_eq!(h.option(opt::LIST, &[], &Two, &mut out), Step::Continue);
        let r = replies(&out);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0], (3, rep::SERVER, b"\0\0\0\x04e1.1".to_vec()));
        assert_eq!(r[1], (3, rep::SERVER, b"\0\0\0\x06e1.1p1".to_vec()));
        assert_eq!(r[2], (3, rep::ACK, vec![]));
        // Data with NBD_OPT_LIST: invalid.
        out.clear();
        h.option(opt::LIST, b"x", &Two, &mut out);
        assert_eq!(replies(&out)[0].1, rep::ERR_INVALID);
    }

    #[test]
    fn go_replies_info_then_ack() {
        let mut h = Handshake::new();
        let mut out = Vec::new();
        assert_eq!(
            h.option(opt::STRUCTURED_REPLY, &[], &Two, &mut out),
            Step::Continue
        );
        assert_eq!(replies(&out), vec![(8, rep::ACK, vec![])]);
        out.clear();
        let step = h.option(opt::GO, &go_data("e1.1", &[info::NAME]), &Two, &mut out);
        let Step::Transmit(s) = step else {
            panic!("GO did not start transmission: {step:?}")
        };
        assert!(s.structured);
        assert_eq!(s.size, 1 << 20);
        let r = replies(&out);
        assert_eq!(r.len(), 4);
        // NBD_INFO_EXPORT: type 0, size, flags.
        let mut export = vec![0, 0];
        export.extend_from_slice(&(1u64 << 20).to_be_bytes());
        export.extend_from_slice(&0x01cdu16.to_be_bytes()); // flags|flush|fua|wz|df|multi
        assert_eq!(r[0], (7, rep::INFO, export));
        // NBD_INFO_BLOCK_SIZE: 512, 1024, 32 MiB.
        assert_eq!(
            r[1],
            (7, rep::INFO, vec![0, 3, 0, 0, 2, 0, 0, 0, 4, 0, 2, 0, 0, 0])
        );
        assert_eq!(r[2], (7, rep::INFO, b"\0\x01e1.1".to_vec()));
        assert_eq!(r[3], (7, rep::ACK, vec![]));
    }

    #[test]
    fn info_does_not_transmit_and_unknown_export_is_an_error() {
        let mut h = Handshake::new();
        let mut out = Vec::new();
        assert_eq!(
            h.option(opt::INFO, &go_data("e1.1p1", &[]), &Two, &mut out),
            Step::Continue
        );
        let r = replies(&out);
        assert_eq!(r.last().map(|x| x.1), Some(rep::ACK));
        assert_eq!(&r[0].2[2..10], &(1u64 << 19).to_be_bytes());
        out.clear();
        assert_eq!(
            h.option(opt::GO, &go_data("e9.9", &[]), &Two, &mut out),
            Step::Continue
        );
        assert_eq!(replies(&out)[0].1, rep::ERR_UNKNOWN);
        // Lengths that do not add up.
        for bad in [
            vec![0, 0, 0, 9, b'e'],
            vec![0, 0, 0, 0, 0, 2, 0, 1],
            vec![0, 0, 0, 0, 0, 0, 0],
            vec![],
        ] {
            out.clear();
            assert_eq!(h.option(opt::GO, &bad, &Two, &mut out), Step::Continue);
            assert_eq!(replies(&out)[0].1, rep::ERR_INVALID, "{bad:?}");
        }
    }

    #[test]
    fn export_name_old_clients() {
        let mut h = Handshake::new();
        h.client_flags([0, 0, 0, 1]).unwrap();
        let mut out = Vec::new();
        let step = h.option(opt::EXPORT_NAME, b"e1.1", &Two, &mut out);
        assert!(matches!(step, Step::Transmit(_)));
        // size, flags (no DF without structured replies), 124 zeroes.
        assert_eq!(out.len(), 8 + 2 + 124);
        assert_eq!(&out[..8], &(1u64 << 20).to_be_bytes());
        assert_eq!(&out[8..10], &0x014du16.to_be_bytes());
        let mut h = Handshake::new();
        h.client_flags([0, 0, 0, 3]).unwrap();
        out.clear();
        h.option(opt::EXPORT_NAME, b"e1.1", &Two, &mut out);
        assert_eq!(out.len(), 10);
        // Unknown export: close, no reply possible.
        out.clear();
        assert_eq!(
            h.option(opt::EXPORT_NAME, b"nope", &Two, &mut out),
            Step::Close
        );
        assert!(out.is_empty());
    }

    #[test]
    fn abort_acks_and_unknown_options_are_unsupported() {
        let mut h = Handshake::new();
        let mut out = Vec::new();
        assert_eq!(h.option(opt::ABORT, &[], &Two, &mut out), Step::Close);
        assert_eq!(replies(&out), vec![(2, rep::ACK, vec![])]);
        for o in [opt::STARTTLS, 9, 10, 11, 0xdead] {
            out.clear();
            assert_eq!(h.option(o, &[], &Two, &mut out), Step::Continue);
            assert_eq!(replies(&out)[0].1, rep::ERR_UNSUP);
        }
        out.clear();
        assert_eq!(h.too_big(opt::GO, &mut out), Step::Continue);
        assert_eq!(replies(&out)[0].1, rep::ERR_TOO_BIG);
        assert_eq!(h.too_big(opt::EXPORT_NAME, &mut out), Step::Close);
    }

    #[test]
    fn request_parse_and_emit() {
        let b = [
            0x25, 0x60, 0x95, 0x13, // magic
            0x00, 0x01, // flags: FUA
            0x00, 0x01, // type: WRITE
            1, 2, 3, 4, 5, 6, 7, 8, // cookie
            0, 0, 0, 0, 0, 0, 0x10, 0, // offset 4096
            0, 0, 2, 0, // length 512
        ];
        let r = Request::parse(&b).unwrap();
        assert_eq!(
            r,
            Request {
                flags: 1,
                kind: cmd::WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                len: 512
            }
        );
        assert_eq!(r.emit(), b);
        assert_eq!(r.payload_len(), 512);
        let mut bad = b;
        bad[3] = 0x14;
        assert_eq!(
            Request::parse(&bad),
            Err(ProtocolError::BadRequestMagic(0x2560_9514))
        );
        for n in 0..28 {
            assert!(Request::parse(&b[..n]).is_err());
        }
    }

    fn session(structured: bool) -> Session {
        Session::new(&Two.list()[0], structured)
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 9,
            offset,
            len,
        }
    }

    #[test]
    fn request_checks() {
        let s = session(false);
        let size = s.size;
        assert_eq!(
            s.check(&req(cmd::READ, 0, 0, 4096)),
            Ok(Command::Read {
                offset: 0,
                len: 4096
            })
        );
        // Unaligned requests are served (read-modify-write underneath).
        assert_eq!(
            s.check(&req(cmd::WRITE, cflags::FUA, 3, 5)),
            Ok(Command::Write {
                offset: 3,
                len: 5,
                fua: true
            })
        );
        // Past the end: EINVAL for reads, ENOSPC for writes.
        assert_eq!(s.check(&req(cmd::READ, 0, size, 1)), Err(err::EINVAL));
        assert_eq!(s.check(&req(cmd::READ, 0, u64::MAX, 2)), Err(err::EINVAL));
        assert_eq!(s.check(&req(cmd::WRITE, 0, size - 1, 2)), Err(err::ENOSPC));
        assert_eq!(
            s.check(&req(cmd::WRITE_ZEROES, 0, size, 512)),
            Err(err::ENOSPC)
        );
        // Exactly up to the end is fine.
        assert!(s.check(&req(cmd::READ, 0, size - 512, 512)).is_ok());
        // Oversize.
        assert_eq!(
            s.check(&req(cmd::READ, 0, 0, MAX_PAYLOAD + 1)),
            Err(err::EINVAL)
        );
        assert_eq!(
            s.check(&req(cmd::WRITE, 0, 0, MAX_PAYLOAD + 1)),
            Err(err::EINVAL)
        );
        // Unknown / unadvertised commands and flags.
        for k in [cmd::TRIM, 5, 7, 8, 0x1234] {
            assert_eq!(s.check(&req(k, 0, 0, 512)), Err(err::EINVAL), "type {k}");
        }
        assert_eq!(
            s.check(&req(cmd::READ, cflags::FUA, 0, 512)),
            Err(err::EINVAL)
        );
        assert_eq!(
            s.check(&req(cmd::READ, cflags::DF, 0, 512)),
            Err(err::EINVAL)
        );
        assert!(session(true)
            .check(&req(cmd::READ, cflags::DF, 0, 512))
            .is_ok());
        assert_eq!(s.check(&req(cmd::WRITE, 1 << 9, 0, 512)), Err(err::EINVAL));
        assert_eq!(s.check(&req(cmd::FLUSH, 0, 0, 0)), Ok(Command::Flush));
        assert_eq!(s.check(&req(cmd::DISC, 0, 0, 0)), Ok(Command::Disconnect));
        // The payload of a refused write still has to be read.
        assert_eq!(req(cmd::WRITE, 0, size, 100).payload_len(), 100);
        assert_eq!(req(cmd::READ, 0, 0, 100).payload_len(), 0);
    }

    #[test]
    fn simple_replies() {
        let s = session(false);
        assert_eq!(
            s.error_reply(0x0102, err::ENOSPC, "x"),
            [
                0x67, 0x44, 0x66, 0x98, // magic
                0, 0, 0, 28, // ENOSPC
                0, 0, 0, 0, 0, 0, 1, 2, // cookie
            ]
        );
        assert_eq!(s.done_reply(7), simple_reply(7, 0));
        let r = s.read_reply(7, 0, b"ab");
        assert_eq!(&r[..16], simple_reply(7, 0));
        assert_eq!(&r[16..], b"ab");
    }

    #[test]
    fn structured_replies() {
        let s = session(true);
        assert_eq!(
            s.read_reply(5, 512, b"xy"),
            [
                0x66, 0x8e, 0x33, 0xef, // magic
                0, 1, // flags: done
                0, 1, // type: OFFSET_DATA
                0, 0, 0, 0, 0, 0, 0, 5, // cookie
                0, 0, 0, 10, // length
                0, 0, 0, 0, 0, 0, 2, 0, // offset
                b'x', b'y',
            ]
        );
        assert_eq!(
            s.done_reply(5),
            [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0]
        );
        assert_eq!(s.read_reply(5, 0, b""), s.done_reply(5));
        assert_eq!(
            s.error_reply(5, err::EIO, "io"),
            [
                0x66, 0x8e, 0x33, 0xef, // magic
                0, 1, // done
                0x80, 0x01, // type: ERROR
                0, 0, 0, 0, 0, 0, 0, 5, // cookie
                0, 0, 0, 8, // length
                0, 0, 0, 5, // EIO
                0, 2, // message length
                b'i', b'o',
            ]
        );
    }

    #[test]
    fn block_sizes() {
        assert_eq!(
            BlockSizes::for_payload(1024),
            BlockSizes {
                min: 512,
                preferred: 1024,
                max: 32 << 20
            }
        );
        assert_eq!(BlockSizes::for_payload(8704).preferred, 8192);
        assert_eq!(BlockSizes::for_payload(0).preferred, 512);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(nbd_error(libc::EIO), err::EIO);
        assert_eq!(nbd_error(libc::ENODEV), err::EIO);
        assert_eq!(nbd_error(libc::ENOSPC), err::ENOSPC);
        assert_eq!(nbd_error(libc::EINVAL), err::EINVAL);
    }
}
