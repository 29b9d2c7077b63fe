//! The transmission phase's incoming byte stream cut into requests, whatever pieces it
//! arrives in: sans-I/O, so the network thread can feed it what one non-blocking read
//! returned and come back at the next readiness for the rest ("Transmission": a request
//! header of 28 bytes, then, for `NBD_CMD_WRITE` only, `length` bytes of payload).
//!
//! The caller decides what follows a header: the payload to keep ([`Incoming::expect_payload`]),
//! to skip ([`Incoming::expect_discard`], a refused write, which must still be read to stay
//! in step), or nothing. A payload may also be received straight into its vector
//! ([`Incoming::payload`]), so the bytes are not copied through the read buffer.

use crate::proto::Request;

/// One request's bytes, taken from the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    /// A whole request header (not yet parsed: a bad magic is the caller's to meet).
    Head([u8; Request::LEN]),
    /// A whole write payload, as [`Incoming::expect_payload`] asked for.
    Payload(Vec<u8>),
    /// A refused write's payload, skipped ([`Incoming::expect_discard`]).
    Discarded,
}

enum Body {
    /// A header comes next.
    Head,
    /// A payload of `len` bytes, `data` what came so far.
    Payload { data: Vec<u8>, len: usize },
    /// Bytes to skip.
    Discard { left: u64 },
}

/// Where the stream stands between two reads.
pub struct Incoming {
    head: [u8; Request::LEN],
    have: usize,
    body: Body,
}

impl Default for Incoming {
    fn default() -> Incoming {
        Incoming {
            head: [0; Request::LEN],
            have: 0,
            body: Body::Head,
        }
    }
}

impl Incoming {
    /// A stream at a request boundary.
    pub fn new() -> Incoming {
        Incoming::default()
    }

    /// Takes bytes from the front of `input` up to the end of the current header or
    /// payload; returns how many it took and the item they completed, if any. Call again
    /// with the rest (after acting on the item: a header decides what follows it).
    pub fn take(&mut self, input: &[u8]) -> (usize, Option<Item>) {
        match &mut self.body {
            Body::Head => {
                let k = (Request::LEN - self.have).min(input.len());
                self.head[self.have..self.have + k].copy_from_slice(&input[..k]);
                self.have += k;
                if self.have < Request::LEN {
                    return (k, None);
                }
                self.have = 0;
                (k, Some(Item::Head(self.head)))
            }
            Body::Payload { data, len } => {
                let k = (*len - data.len()).min(input.len());
                data.extend_from_slice(&input[..k]);
                (k, self.payload_done())
            }
            Body::Discard { left } => {
                let k = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(input.len());
                *left -= k as u64;
                if *left > 0 {
                    return (k, None);
                }
                self.body = Body::Head;
                (k, Some(Item::Discarded))
            }
        }
    }

    /// The header just taken is followed by `len` payload bytes to keep (`len` > 0).
    pub fn expect_payload(&mut self, len: usize) {
        debug_assert!(matches!(self.body, Body::Head) && self.have == 0);
        self.body = Body::Payload {
            data: Vec::with_capacity(len),
            len,
        };
    }

    /// The header just taken is followed by `len` payload bytes to skip (`len` > 0).
    pub fn expect_discard(&mut self, len: u64) {
        debug_assert!(matches!(self.body, Body::Head) && self.have == 0);
        self.body = Body::Discard { left: len };
    }

    /// The payload being gathered and how many bytes it still misses, for a read straight
    /// into its spare capacity; then [`payload_done`](Self::payload_done).
    pub fn payload(&mut self) -> Option<(&mut Vec<u8>, usize)> {
        match &mut self.body {
            Body::Payload { data, len } => {
                let left = *len - data.len();
                Some((data, left))
            }
            _ => None,
        }
    }

    /// The payload, once whole (the stream is then at a request boundary again).
    pub fn payload_done(&mut self) -> Option<Item> {
        match &self.body {
            Body::Payload { data, len } if data.len() == *len => {}
            _ => return None,
        }
        match std::mem::replace(&mut self.body, Body::Head) {
            Body::Payload { data, .. } => Some(Item::Payload(data)),
            _ => None,
        }
    }

    /// Whether the stream stopped inside a request (part of a header or of a payload):
    /// an end of stream here cut a request short.
    #[cfg(test)]
    pub fn mid_request(&self) -> bool {
        self.have > 0 || !matches!(self.body, Body::Head)
    }

    /// Whether a payload (kept or skipped) is being read.
    pub fn in_payload(&self) -> bool {
        !matches!(self.body, Body::Head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{cmd, REQUEST_MAGIC};

    fn req(kind: u16, cookie: u64, len: u32) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[6..8].copy_from_slice(&kind.to_be_bytes());
        b[8..16].copy_from_slice(&cookie.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        b
    }

    /// What a server does with the stream: a write's payload kept, or skipped when its
    /// cookie is odd (a refused write); the items seen, in order.
    fn drive(inc: &mut Incoming, mut input: &[u8], out: &mut Vec<Item>) {
        while !input.is_empty() {
            let (k, item) = inc.take(input);
            input = &input[k..];
            if let Some(item) = item {
                if let Item::Head(h) = &item {
                    let r = Request::parse(h).unwrap();
                    if r.payload_len() > 0 {
                        if r.cookie % 2 == 1 {
                            inc.expect_discard(u64::from(r.payload_len()));
                        } else {
                            inc.expect_payload(r.payload_len() as usize);
                        }
                    }
                }
                out.push(item);
            }
        }
    }

    fn stream() -> (Vec<u8>, Vec<Item>) {
        let p1: Vec<u8> = (0..1000u32).map(|i| (i % 253) as u8).collect();
        let p2: Vec<u8> = (0..77u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut s = Vec::new();
        s.extend_from_slice(&req(cmd::READ, 1, 4096));
        s.extend_from_slice(&req(cmd::WRITE, 2, 1000));
        s.extend_from_slice(&p1);
        s.extend_from_slice(&req(cmd::WRITE, 3, 50));
        s.extend_from_slice(&[0xee; 50]);
        s.extend_from_slice(&req(cmd::WRITE, 4, 77));
        s.extend_from_slice(&p2);
        s.extend_from_slice(&req(cmd::FLUSH, 5, 0));
        let want = vec![
            Item::Head(req(cmd::READ, 1, 4096)),
            Item::Head(req(cmd::WRITE, 2, 1000)),
            Item::Payload(p1),
            Item::Head(req(cmd::WRITE, 3, 50)),
            Item::Discarded,
            Item::Head(req(cmd::WRITE, 4, 77)),
            Item::Payload(p2),
            Item::Head(req(cmd::FLUSH, 5, 0)),
        ];
        (s, want)
    }

    /// The stream cut in two at every byte (inside headers, inside payloads, on every
    /// boundary) gives the same requests and payloads as the stream in one piece.
    #[test]
    fn a_stream_split_at_every_byte_gives_the_same_requests() {
        let (s, want) = stream();
        for cut in 0..=s.len() {
            let mut inc = Incoming::new();
            let mut got = Vec::new();
            drive(&mut inc, &s[..cut], &mut got);
            drive(&mut inc, &s[cut..], &mut got);
            assert_eq!(got, want, "cut at {cut}");
            assert!(!inc.mid_request());
        }
    }

    /// One byte at a time: each header and payload completes on its last byte.
    #[test]
    fn a_stream_fed_byte_by_byte_gives_the_same_requests() {
        let (s, want) = stream();
        let mut inc = Incoming::new();
        let mut got = Vec::new();
        for b in s.chunks(1) {
            drive(&mut inc, b, &mut got);
        }
        assert_eq!(got, want);
    }

    /// A payload taken partly from the read buffer and partly straight into its vector
    /// (as the network thread receives it) arrives whole, and the bytes after it are the
    /// next request's.
    #[test]
    fn payloads_received_straight_into_their_vector_arrive_whole() {
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 249) as u8).collect();
        for buffered in [0usize, 1, 4096, 299_999] {
            let mut inc = Incoming::new();
            let mut input = req(cmd::WRITE, 2, payload.len() as u32).to_vec();
            input.extend_from_slice(&payload[..buffered]);
            let (k, item) = inc.take(&input);
            assert_eq!(k, 28);
            assert!(matches!(item, Some(Item::Head(_))));
            inc.expect_payload(payload.len());
            let (k, item) = inc.take(&input[28..]);
            assert_eq!((k, item), (buffered, None));
            // The rest in pieces of 65536, as recv returns them.
            let mut at = buffered;
            while let Some((data, left)) = inc.payload() {
                let n = left.min(65536);
                data.extend_from_slice(&payload[at..at + n]);
                at += n;
                if let Some(item) = inc.payload_done() {
                    assert_eq!(item, Item::Payload(payload.clone()), "buffered {buffered}");
                    break;
                }
                assert!(inc.mid_request());
            }
            assert!(!inc.mid_request());
            let (k, item) = inc.take(&req(cmd::FLUSH, 9, 0));
            assert_eq!(k, 28);
            assert_eq!(item, Some(Item::Head(req(cmd::FLUSH, 9, 0))));
        }
    }

    /// A stream that ends inside a header or a payload is seen as cut mid-request; one
    /// that ends between requests is not.
    #[test]
    fn an_end_mid_header_or_mid_payload_is_told_apart_from_a_clean_end() {
        let (s, _) = stream();
        // Offsets of request boundaries in `stream()`.
        let bounds = [
            0,
            28,
            56 + 1000,
            56 + 1000 + 78,
            56 + 1000 + 78 + 105,
            s.len(),
        ];
        for cut in 0..=s.len() {
            let mut inc = Incoming::new();
            let mut got = Vec::new();
            drive(&mut inc, &s[..cut], &mut got);
            assert_eq!(inc.mid_request(), !bounds.contains(&cut), "cut at {cut}");
        }
    }
}
