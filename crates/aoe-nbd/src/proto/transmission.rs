//! The transmission phase: request headers, their checks against the export, and the
//! simple and structured replies.

use super::*;

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
    /// The export is read-only (`NBD_FLAG_READ_ONLY` among the flags).
    pub read_only: bool,
    /// Block size constraints advertised.
    pub block: BlockSizes,
}

impl Session {
    /// The session for `e`: flush, FUA, write zeroes and multi-conn (every connection
    /// goes through one initiator engine, and a flush reaches the target's disk, so a
    /// flush on one connection covers writes completed on all), plus DF with structured
    /// replies (a read is always answered in one chunk). A read-only export advertises
    /// `NBD_FLAG_READ_ONLY` instead of FUA and write zeroes (which only writes use), as
    /// nbdkit's `-r` does; flush stays (it writes nothing).
    pub fn new(e: &Export, structured: bool) -> Session {
        let mut flags = tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::CAN_MULTI_CONN;
        if e.read_only {
            flags |= tflags::READ_ONLY;
        } else {
            flags |= tflags::SEND_FUA | tflags::SEND_WRITE_ZEROES;
        }
        if structured {
            flags |= tflags::SEND_DF;
        }
        Session {
            size: e.size,
            name: e.name.clone(),
            structured,
            flags,
            read_only: e.read_only,
            block: e.block,
        }
    }

    /// Validates a request ("Request types", "Error values"): unknown or unadvertised
    /// types and unknown flags are `NBD_EINVAL`; reads and writes longer than the
    /// advertised maximum `NBD_EINVAL` ("Block size constraints"); a read past the end
    /// `NBD_EINVAL`, a write or write-zeroes past the end `NBD_ENOSPC` ("Error values":
    /// SHOULD return ENOSPC for writes beyond the size of the device, EINVAL for reads).
    /// On a read-only export every write and write zeroes is `NBD_EPERM`, whatever its
    /// flags, range or length ("Error values": "a server SHOULD return EPERM if it receives
    /// a write or trim request on a read-only export"; a client that ignores the flag and
    /// sends FUA learns the real reason rather than EINVAL).
    pub fn check(&self, r: &Request) -> Result<Command, u32> {
        if self.read_only && matches!(r.kind, cmd::WRITE | cmd::WRITE_ZEROES) {
            return Err(err::EPERM);
        }
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
        let mut v = self.read_reply_head(cookie, offset, data.len());
        if !(self.structured && data.is_empty()) {
            v.extend_from_slice(data);
        }
        v
    }

    /// What [`Session::read_reply`] puts before the `len` bytes of data: the server writes
    /// it and the data with one `writev(2)`, so the data is never copied into a reply
    /// buffer. For a structured read of nothing it is the whole (NBD_REPLY_TYPE_NONE) reply.
    pub fn read_reply_head(&self, cookie: u64, offset: u64, len: usize) -> Vec<u8> {
        if !self.structured {
            return simple_reply(cookie, 0);
        }
        if len == 0 {
            return self.done_reply(cookie);
        }
        let mut v = Vec::with_capacity(28);
        v.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&chunk::FLAG_DONE.to_be_bytes());
        v.extend_from_slice(&chunk::OFFSET_DATA.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&((8 + len) as u32).to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v
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
