//! Any bytes as an NBD client's transmission-phase stream, cut into requests by
//! `aoe_nbd::incoming::Incoming` the way the network thread does (non-blocking reads of any
//! size, a write's payload kept or skipped as its header decides, a kept payload taken
//! either through the read buffer or straight into its vector), against the same stream cut
//! in one piece: the same headers, payloads and skips, in the same order, whatever the
//! pieces ("Transmission": a 28-byte request header, then `length` bytes of payload for
//! `NBD_CMD_WRITE` only). Input: 1 byte of piece sizes (1-256), 1 byte of the largest
//! payload kept in 512-byte units (a longer write's payload is skipped, as a refused write's
//! is), then the stream. Never a panic.
#![no_main]

use aoe_nbd::incoming::{Incoming, Item};
use aoe_nbd::proto::Request;
use libfuzzer_sys::fuzz_target;

/// What follows a header: a payload to keep, to skip, or nothing; None ends the stream (a
/// header that does not parse closes the connection).
fn follows(head: &[u8], cap: usize) -> Option<(usize, bool)> {
    let r = Request::parse(head).ok()?;
    let n = r.payload_len() as usize;
    Some((n, n <= cap))
}

/// The stream cut in one piece: the items the cutter must give.
fn reference(stream: &[u8], cap: usize) -> Vec<Item> {
    let mut out = Vec::new();
    let mut rest = stream;
    while rest.len() >= Request::LEN {
        let head: [u8; Request::LEN] = rest[..Request::LEN].try_into().unwrap();
        rest = &rest[Request::LEN..];
        out.push(Item::Head(head));
        let Some((n, keep)) = follows(&head, cap) else {
            break;
        };
        if n == 0 {
            continue;
        }
        if rest.len() < n {
            break;
        }
        out.push(if keep {
            Item::Payload(rest[..n].to_vec())
        } else {
            Item::Discarded
        });
        rest = &rest[n..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [piece, cap, stream @ ..] = data else {
        return;
    };
    let piece = usize::from(*piece) + 1;
    let cap = usize::from(*cap) * 512;
    let want = reference(stream, cap);
    let mut got = Vec::new();
    let mut inc = Incoming::new();
    let mut at = 0;
    let mut turn = 0usize;
    'stream: while at < stream.len() {
        // One "read": up to `piece` bytes, alternately straight into a kept payload's
        // vector, as the network thread's `recv` into spare capacity does.
        let end = (at + piece).min(stream.len());
        turn += 1;
        if turn % 2 == 0 {
            if let Some((v, left)) = inc.payload() {
                let k = left.min(end - at);
                v.extend_from_slice(&stream[at..at + k]);
                at += k;
                if let Some(item) = inc.payload_done() {
                    got.push(item);
                }
                continue;
            }
        }
        let mut buf = &stream[at..end];
        at = end;
        while !buf.is_empty() {
            let (k, item) = inc.take(buf);
            assert!(k > 0 && k <= buf.len(), "took {k} of {}", buf.len());
            buf = &buf[k..];
            let Some(item) = item else {
                continue;
            };
            if let Item::Head(h) = &item {
                let next = follows(h, cap);
                got.push(item);
                match next {
                    None => break 'stream,
                    Some((0, _)) => {}
                    Some((n, true)) => inc.expect_payload(n),
                    Some((n, false)) => inc.expect_discard(n as u64),
                }
            } else {
                got.push(item);
            }
        }
    }
    assert_eq!(got, want);
});
