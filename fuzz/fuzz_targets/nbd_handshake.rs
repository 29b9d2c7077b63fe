//! Any bytes as what an NBD client sends during the fixed newstyle handshake, fed to the
//! initiator's server side (`aoe_nbd::proto::Handshake`) the way its connection
//! loop does: 4 bytes of client flags, then option headers (`IHAVEOPT`, option, length)
//! each followed by its data; data over `MAX_OPTION_DATA` is skipped and answered with
//! `too_big`. Never a panic; every byte the server sends before the transmission phase is a
//! sequence of well-formed option replies (magic, the option asked, a length that matches);
//! `NBD_OPT_EXPORT_NAME` and `NBD_OPT_GO` enter transmission only on an export that exists,
//! with its size (NBD spec, "Fixed newstyle negotiation", "Option haggling").
#![no_main]

use aoe_nbd::proto::{
    opt, BlockSizes, Export, Exports, Handshake, OptionHeader, Step, MAX_OPTION_DATA,
    OPT_REPLY_MAGIC,
};
use libfuzzer_sys::fuzz_target;

struct Two;

impl Exports for Two {
    fn list(&self) -> Vec<Export> {
        ["e7.3", "e7.3p1"]
            .iter()
            .enumerate()
            .map(|(i, n)| Export {
                name: (*n).to_string(),
                size: (64 << 20) >> i,
                description: format!("AoE {n}"),
                block: BlockSizes::for_payload(1024),
                // One of each: `--nbd-read-only` exports advertise NBD_FLAG_READ_ONLY
                // and leave FUA and WRITE_ZEROES out of their transmission flags.
                read_only: i == 1,
            })
            .collect()
    }
}

/// Checks that `out` is a sequence of option replies to `option`; returns how many.
fn replies(mut out: &[u8], option: u32) -> usize {
    let mut n = 0;
    while !out.is_empty() {
        assert!(out.len() >= 20, "short option reply: {out:?}");
        assert_eq!(
            u64::from_be_bytes(out[0..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        assert_eq!(u32::from_be_bytes(out[8..12].try_into().unwrap()), option);
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert!(out.len() >= 20 + len, "reply length {len} past the output");
        out = &out[20 + len..];
        n += 1;
    }
    n
}

fuzz_target!(|data: &[u8]| {
    let Some((flags, mut rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let mut hs = Handshake::new();
    if hs.client_flags(*flags).is_err() {
        return; // The connection is dropped.
    }
    let exports = Two;
    loop {
        let Ok(h) = OptionHeader::parse(rest) else {
            return; // Bad magic or the client stopped: closed.
        };
        rest = &rest[OptionHeader::LEN..];
        let mut out = Vec::new();
        let step = if h.len > MAX_OPTION_DATA {
            // The loop discards the data (as much as there is) and answers.
            rest = &rest[rest.len().min(h.len as usize)..];
            hs.too_big(h.option, &mut out)
        } else {
            let Some(d) = rest.get(..h.len as usize) else {
                return;
            };
            rest = &rest[h.len as usize..];
            hs.option(h.option, d, &exports, &mut out)
        };
        match step {
            Step::Continue => {
                assert!(
                    replies(&out, h.option) > 0,
                    "no reply to option {}",
                    h.option
                );
            }
            Step::Close => {
                if h.option != opt::EXPORT_NAME {
                    replies(&out, h.option);
                }
                return;
            }
            Step::Transmit(s) => {
                let e = exports
                    .lookup(&s.name)
                    .unwrap_or_else(|| panic!("transmission on unknown export {:?}", s.name));
                assert_eq!(s.size, e.size);
                if h.option == opt::GO {
                    replies(&out, h.option);
                } else {
                    assert_eq!(h.option, opt::EXPORT_NAME);
                    assert!(out.len() == 10 || out.len() == 134, "{} bytes", out.len());
                    assert_eq!(u64::from_be_bytes(out[0..8].try_into().unwrap()), e.size);
                }
                return;
            }
        }
    }
});
