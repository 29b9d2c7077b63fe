//! Property tests: emit -> parse round trips for every message, and no truncated or arbitrary
//! input ever panics the parser.

use aoe_wire::*;
use proptest::prelude::*;

fn mac() -> impl Strategy<Value = MacAddr> {
    any::<[u8; 6]>().prop_map(MacAddr)
}

fn header(command: Command) -> impl Strategy<Value = HeaderRepr> {
    (
        mac(),
        mac(),
        any::<bool>(),
        proptest::option::of(any::<u8>().prop_map(ErrorCode::from)),
        any::<u16>(),
        any::<u8>(),
        any::<u32>(),
    )
        .prop_map(
            move |(dst, src, response, error, shelf, slot, tag)| HeaderRepr {
                dst,
                src,
                version: 1,
                response,
                error,
                target: TargetAddr::new(shelf, slot),
                command,
                tag: Tag(tag),
            },
        )
}

/// A message with its body bytes owned, so the strategy can produce it.
#[derive(Debug, Clone)]
enum Owned {
    Ata {
        aflags: u8,
        err_feature: u8,
        sector_count: u8,
        cmd_status: u8,
        lba: u64,
        data: Vec<u8>,
    },
    Config {
        buffer_count: u16,
        firmware_version: u16,
        sector_count: u8,
        aoe_version: u8,
        ccmd: u8,
        config: Vec<u8>,
    },
    MacMask(MacMaskRepr),
    Reserve(ReserveRepr),
    Unknown(Vec<u8>),
}

fn owned_body() -> impl Strategy<Value = (Command, Owned)> {
    prop_oneof![
        (
            any::<u8>(),
            any::<u8>(),
            0u8..=4,
            any::<u8>(),
            0u64..(1 << 48),
            proptest::collection::vec(any::<u8>(), 0..600)
        )
            .prop_map(
                |(aflags, err_feature, sector_count, cmd_status, lba, data)| {
                    (
                        Command::Ata,
                        Owned::Ata {
                            aflags,
                            err_feature,
                            sector_count,
                            cmd_status,
                            lba,
                            data,
                        },
                    )
                }
            ),
        (
            any::<u16>(),
            any::<u16>(),
            any::<u8>(),
            0u8..16,
            0u8..16,
            proptest::collection::vec(any::<u8>(), 0..=1024)
        )
            .prop_map(
                |(buffer_count, firmware_version, sector_count, aoe_version, ccmd, config)| {
                    (
                        Command::QueryConfig,
                        Owned::Config {
                            buffer_count,
                            firmware_version,
                            sector_count,
                            aoe_version,
                            ccmd,
                            config,
                        },
                    )
                }
            ),
        (
            any::<u8>(),
            any::<u8>(),
            proptest::collection::vec((any::<u8>(), mac()), 0..40)
        )
            .prop_map(|(mcmd, merror, dirs)| {
                // With an MError the count is an index and no list follows: a message with
                // both is not one the format can carry.
                let merror = if dirs.is_empty() { merror } else { 0 };
                (
                    Command::MacMaskList,
                    Owned::MacMask(MacMaskRepr {
                        mcmd: mcmd.into(),
                        merror: merror.into(),
                        directives: dirs
                            .into_iter()
                            .map(|(c, mac)| Directive {
                                command: c.into(),
                                mac,
                            })
                            .collect(),
                    }),
                )
            }),
        (any::<u8>(), proptest::collection::vec(mac(), 0..40)).prop_map(|(rcmd, macs)| {
            (
                Command::ReserveRelease,
                Owned::Reserve(ReserveRepr {
                    rcmd: rcmd.into(),
                    macs,
                }),
            )
        }),
        (
            0xf0u8..=0xff,
            proptest::collection::vec(any::<u8>(), 0..100)
        )
            .prop_map(|(c, p)| (Command::Unknown(c), Owned::Unknown(p))),
    ]
}

fn message() -> impl Strategy<Value = (HeaderRepr, Owned)> {
    owned_body().prop_flat_map(|(cmd, body)| (header(cmd), Just(body)))
}

/// Makes an ATA body consistent with the request rules: a write request carries exactly its
/// sectors, other requests carry nothing.
fn normalise(h: &HeaderRepr, body: &mut Owned) {
    if let Owned::Ata {
        aflags,
        sector_count,
        data,
        ..
    } = body
    {
        if !h.response {
            if *aflags & 0x01 != 0 {
                data.resize(*sector_count as usize * 512, 0x5a);
            } else {
                data.clear();
            }
        }
    }
}

fn borrow(body: &Owned) -> Body<'_> {
    match body {
        Owned::Ata {
            aflags,
            err_feature,
            sector_count,
            cmd_status,
            lba,
            data,
        } => Body::Ata(AtaRepr {
            aflags: AtaFlags::from_bits_retain(*aflags),
            err_feature: *err_feature,
            sector_count: *sector_count,
            cmd_status: *cmd_status,
            lba: *lba,
            data,
        }),
        Owned::Config {
            buffer_count,
            firmware_version,
            sector_count,
            aoe_version,
            ccmd,
            config,
        } => Body::Config(ConfigRepr {
            buffer_count: *buffer_count,
            firmware_version: *firmware_version,
            sector_count: *sector_count,
            aoe_version: *aoe_version,
            ccmd: ConfigCommand::from(*ccmd),
            config,
        }),
        Owned::MacMask(m) => Body::MacMask(m.clone()),
        Owned::Reserve(r) => Body::Reserve(r.clone()),
        Owned::Unknown(p) => Body::Unknown(p),
    }
}

/// The shortest prefix of the emitted frame that must still parse: the whole unpadded frame,
/// except where the layout leaves the end open (ATA response data, vendor payloads).
fn structural_len(m: &Message<'_>) -> usize {
    match &m.body {
        Body::Ata(_) if m.header.response => ATA_HEADER_LEN,
        Body::Unknown(_) => HEADER_LEN,
        _ => m.unpadded_len(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn emit_parse_round_trip((h, mut body) in message()) {
        normalise(&h, &mut body);
        let m = Message { header: h, body: borrow(&body) };
        let bytes = m.to_vec().unwrap();
        prop_assert!(bytes.len() >= MIN_FRAME_LEN);
        prop_assert_eq!(bytes.len(), m.buffer_len());
        let back = Message::parse(&bytes).unwrap();
        prop_assert_eq!(back.header, m.header);
        match (&back.body, &m.body) {
            // Open-ended bodies come back with the padding as trailing zeros.
            (Body::Ata(b), Body::Ata(a)) if h.response => {
                prop_assert_eq!(AtaRepr { data: &[], ..*b }, AtaRepr { data: &[], ..*a });
                prop_assert!(b.data.starts_with(a.data));
                prop_assert!(b.data[a.data.len()..].iter().all(|x| *x == 0));
            }
            (Body::Unknown(b), Body::Unknown(a)) => {
                prop_assert!(b.starts_with(a));
                prop_assert!(b[a.len()..].iter().all(|x| *x == 0));
            }
            (b, a) => prop_assert_eq!(b, a),
        }
    }

    #[test]
    fn truncated_prefixes_are_errors((h, mut body) in message()) {
        normalise(&h, &mut body);
        let m = Message { header: h, body: borrow(&body) };
        let bytes = m.to_vec().unwrap();
        let must = structural_len(&m);
        for n in 0..bytes.len() {
            let r = Message::parse(&bytes[..n]);
            if n < must {
                prop_assert!(
                    matches!(r, Err(Error::Truncated { .. })),
                    "prefix of {} of {} bytes parsed: {:?}", n, must, r
                );
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
        if bytes.len() >= 14 {
            bytes[12] = 0x88;
            bytes[13] = 0xa2;
        }
        if let Ok(m) = Message::parse(&bytes) {
            // Whatever parses can be emitted again and parses to the same header.
            let again = m.to_vec().unwrap();
            prop_assert_eq!(Message::parse(&again).unwrap().header, m.header);
        }
    }
}

proptest! {
    /// `Message::parse_body` (the target's engine parses the header once and then only the
    /// body) gives what `Message::parse` gives, body and error alike, for every prefix of a
    /// valid message (the truncated ones included) and for arbitrary AoE bytes.
    #[test]
    fn parse_body_after_the_header_is_parse((h, mut body) in message(),
                                            junk in proptest::collection::vec(any::<u8>(), 0..600)) {
        normalise(&h, &mut body);
        let m = Message { header: h, body: borrow(&body) };
        let bytes = m.to_vec().unwrap();
        let mut frames: Vec<&[u8]> = (0..=bytes.len()).map(|n| &bytes[..n]).collect();
        let mut other = junk.clone();
        if other.len() >= 14 {
            other[12] = 0x88;
            other[13] = 0xa2;
        }
        frames.push(&other);
        for f in frames {
            let Ok(view) = Frame::new_checked(f) else { continue };
            let Ok(header) = HeaderRepr::parse(&view) else { continue };
            let whole = Message::parse(f).map(|m| m.body);
            prop_assert_eq!(Message::parse_body(&header, view.payload()), whole);
        }
    }
}
