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

mod consts;
mod handshake;
mod transmission;

pub use consts::*;
pub use handshake::*;
pub use transmission::*;

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
    /// Served read-only: `NBD_FLAG_READ_ONLY` is advertised and writes are refused with
    /// `NBD_EPERM` ([`Session::check`]).
    pub read_only: bool,
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
                    read_only: false,
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

    /// A read-only export ("Transmission flags": `NBD_FLAG_READ_ONLY`, "the export is
    /// read-only"; "Error values": a server SHOULD return `NBD_EPERM` for a write or trim
    /// on a read-only export) advertises the flag and neither FUA nor write zeroes, keeps
    /// flush and multi-conn, and refuses writes and write zeroes, in range or not, with
    /// `EPERM`; reads, flushes and the disconnect are served as on a writable one.
    #[test]
    fn a_read_only_export_advertises_it_and_refuses_writes_with_eperm() {
        let mut e = Two.list()[0].clone();
        assert_eq!(Session::new(&e, false).flags & tflags::READ_ONLY, 0);
        e.read_only = true;
        for structured in [false, true] {
            let s = Session::new(&e, structured);
            assert_eq!(
                s.flags & !tflags::SEND_DF,
                tflags::HAS_FLAGS | tflags::READ_ONLY | tflags::SEND_FLUSH | tflags::CAN_MULTI_CONN
            );
            let size = s.size;
            for r in [
                req(cmd::WRITE, 0, 0, 512),
                req(cmd::WRITE, cflags::FUA, 0, 512),
                req(cmd::WRITE, 0, size, 512),
                req(cmd::WRITE_ZEROES, 0, 0, 512),
                req(cmd::WRITE_ZEROES, cflags::NO_HOLE, size - 512, 512),
            ] {
                assert_eq!(s.check(&r), Err(err::EPERM), "{r:?}");
            }
            assert!(s.check(&req(cmd::READ, 0, 0, 512)).is_ok());
            assert_eq!(s.check(&req(cmd::FLUSH, 0, 0, 0)), Ok(Command::Flush));
            assert_eq!(s.check(&req(cmd::DISC, 0, 0, 0)), Ok(Command::Disconnect));
            assert_eq!(s.check(&req(cmd::TRIM, 0, 0, 512)), Err(err::EINVAL));
        }
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
