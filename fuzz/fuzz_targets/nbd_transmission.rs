//! Any bytes as an NBD client's transmission phase, fed to the initiator's request parser
//! and checker (`aoe_nbd::proto::{Request, Session}`) the way its connection loop
//! does: input = 1 byte of session settings (bit 0: structured replies), 8 bytes of export
//! size (big-endian; its top bit says a read-only export, `--nbd-read-only`), then 28-byte request headers, a write's payload after its header.
//! Never a panic; a request that passes `check` lies within the export and within the
//! advertised maximum payload, uses only flags allowed for its type, and every reply the
//! session builds for it starts with the right magic and echoes its cookie (NBD spec,
//! "Transmission", "Request types", "Error values", "Block size constraints").
#![no_main]

use aoe_nbd::proto::{
    cmd, err, BlockSizes, Command, Export, Request, Session, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
};
use libfuzzer_sys::fuzz_target;

fn assert_reply(s: &Session, reply: &[u8], cookie: u64) {
    let magic = u32::from_be_bytes(reply[0..4].try_into().unwrap());
    // Both reply headers carry the cookie at bytes 8..16.
    let at = 8;
    if s.structured {
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
    } else {
        assert_eq!(magic, SIMPLE_REPLY_MAGIC);
    }
    assert_eq!(
        u64::from_be_bytes(reply[at..at + 8].try_into().unwrap()),
        cookie
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&settings, rest)) = data.split_first() else {
        return;
    };
    let Some((size, mut rest)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let e = Export {
        name: "e7.3".into(),
        size: u64::from_be_bytes(*size) & !(1 << 63),
        description: String::new(),
        block: BlockSizes::for_payload(usize::from(settings >> 1) * 512),
        read_only: size[0] & 0x80 != 0,
    };
    let e_read_only = e.read_only;
    let s = Session::new(&e, settings & 1 != 0);
    while let Ok(r) = Request::parse(rest) {
        rest = &rest[Request::LEN..];
        // A write's payload follows, refused or not (the loop reads it to stay in step).
        let payload = r.payload_len() as usize;
        let Some(body) = rest.get(..payload) else {
            return;
        };
        rest = &rest[payload..];
        match s.check(&r) {
            Ok(c) => {
                assert!(
                    !(e_read_only && matches!(r.kind, cmd::WRITE | cmd::WRITE_ZEROES)),
                    "{r:?} accepted on a read-only export"
                );
                let (offset, len) = match c {
                    Command::Read { offset, len } => {
                        assert_eq!(r.kind, cmd::READ);
                        let data = &body[..0];
                        assert_reply(&s, &s.read_reply(r.cookie, offset, data), r.cookie);
                        (offset, len)
                    }
                    Command::Write { offset, len, .. } => {
                        assert_eq!(r.kind, cmd::WRITE);
                        assert_eq!(body.len(), len as usize);
                        (offset, len)
                    }
                    Command::WriteZeroes { offset, len, .. } => {
                        assert_eq!(r.kind, cmd::WRITE_ZEROES);
                        (offset, len)
                    }
                    Command::Flush | Command::Disconnect => (0, 0),
                };
                assert!(
                    offset
                        .checked_add(u64::from(len))
                        .is_some_and(|end| end <= s.size),
                    "{r:?} accepted past the end {}",
                    s.size
                );
                if matches!(r.kind, cmd::READ | cmd::WRITE) {
                    assert!(len <= s.block.max, "{r:?} over the maximum {}", s.block.max);
                }
                assert_reply(&s, &s.done_reply(r.cookie), r.cookie);
            }
            Err(e) if e == err::EPERM => {
                // A read-only export refuses writes and write zeroes, and only those.
                assert!(
                    e_read_only && matches!(r.kind, cmd::WRITE | cmd::WRITE_ZEROES),
                    "EPERM for {r:?} (read-only {e_read_only})"
                );
                assert_reply(&s, &s.error_reply(r.cookie, e, "refused"), r.cookie);
            }
            Err(e) => {
                assert!(e == err::EINVAL || e == err::ENOSPC, "error {e} for {r:?}");
                assert_reply(&s, &s.error_reply(r.cookie, e, "refused"), r.cookie);
            }
        }
    }
});
