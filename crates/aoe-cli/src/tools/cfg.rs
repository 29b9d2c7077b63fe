//! `aoecfg [-c read|test|prefix|set|fset] [-s STR] [-t SECS] [SHELF SLOT] [NETIF]`: one Query
//! Config request with raw frames, answers printed as aoetools' `aoecfg.c` (release 36) does.
//!
//! As aoetools: the default address is the broadcast one (shelf 0xffff, slot 0xff) and the
//! default interface `eth0`; with a full address it prints the first answer as `STRING` and
//! exits, otherwise every answer as `SHELF.SLOT<TAB>STRING` until `-t` seconds have passed
//! (for ever without `-t`); a timeout exits 0; an error answer prints `*badcmd*` etc.;
//! usage errors print aoecfg's usage line and exit 1. Differences: replies shorter than 60
//! bytes are accepted (aoetools drops them), requests are not padded to 1056 bytes, an
//! interface name that does not exist is reported by name, Ctrl-C exits 130 quietly, and a
//! SHELF, SLOT or `-t` that is not a whole number in range is a usage error (exit 2): aoecfg
//! reads SHELF and SLOT with `strtoul` and casts them to the header's 16 and 8 bits, so
//! `aoecfg 65537 1` asks shelf 1 and `abc` is shelf 0 (checked against aoetools 36 in a
//! namespace), and a negative `-t` fails in `select` while junk waits for ever.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::usage;
use aoe_wire::{
    Body, Command, ConfigCommand, ConfigPacket, ConfigRepr, HeaderRepr, MacAddr, Message, Tag,
    TargetAddr,
};
use clap::Args;

use super::{aoe_frame, is_answer, open_socket, recv_until, stop_flag};

/// Read or set AoE config strings with raw Query Config frames.
#[derive(Debug, Args)]
#[command(
    after_help = "Commands (AoEr11 Query Config CCmd): read (0), test (1: answer only \
if the string is equal), prefix (2: answer only if it starts with -s), set (3: set if empty), \
fset (4: force set).\nOutput and exit codes as aoetools' aoecfg."
)]
pub struct CfgArgs {
    /// Config command: read, test, prefix, set or fset.
    #[arg(short = 'c', value_name = "CMD")]
    cmd: Option<String>,
    /// The config string to send.
    #[arg(short = 's', value_name = "STR", allow_hyphen_values = true)]
    string: Option<String>,
    /// Seconds to wait for answers (default: for ever; exits 0 when they have passed).
    #[arg(short = 't', value_name = "SECS", allow_hyphen_values = true)]
    timeout: Option<String>,
    /// Accepted and ignored, as by aoetools.
    #[arg(short = 'v', hide = true)]
    verbose: bool,
    /// Print each answer as a JSON object on a line of its own (target, shelf, slot, mac,
    /// buffer_count, firmware_version, sectors_per_frame, aoe_version, string, error)
    /// instead of aoecfg's text. Without it the output is aoecfg's, byte for byte.
    #[arg(long)]
    json: bool,
    /// [SHELF SLOT] [NETIF] (NETIF defaults to eth0).
    // The brackets are usage text for --help, not links.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(value_name = "ARGS", num_args = 0..)]
    args: Vec<String>,
}

const USAGE: &str = "usage: aoecfg [-c cmd] [-s cfgstr] [-t timeout] [shelf slot] [net]";

fn usage_exit() -> ! {
    eprintln!("{USAGE}");
    super::exit_quietly(1)
}

/// aoecfg.c `errtab`: what it prints for an error answer, by error code & 7.
const ERRTAB: [&str; 7] = [
    "*GOK*",
    "*badcmd*",
    "*badarg*",
    "*baddev*",
    "*badcfg*",
    "*badvers*",
    "*GOK*",
];

/// The text aoecfg prints for the answer `f` (without the newline): the config string up to
/// its length or first NUL (`%.*s`), or the error's name. An answer too short for its
/// Query Config header or the string its length names prints as an empty string.
pub fn answer_text(f: &[u8]) -> String {
    let Some(h) = aoe_frame(f) else {
        return String::new();
    };
    if h.is_error() {
        return ERRTAB[usize::from(h.error() & 7) % ERRTAB.len()].to_string();
    }
    let Ok(c) = ConfigPacket::new_checked(h.payload()) else {
        return String::new();
    };
    let s = c.string().split(|&b| b == 0).next().unwrap_or(&[]);
    String::from_utf8_lossy(s).into_owned()
}

/// One answer as `--json` prints it: the header's address and source MAC, the Query Config
/// fields (AoEr11 section 3.2), the string (lossy UTF-8, up to its length or first NUL, as
/// aoecfg prints it) and, for an error answer, the error's name and code instead.
pub fn answer_json(f: &[u8]) -> serde_json::Value {
    let Some(h) = aoe_frame(f) else {
        return serde_json::Value::Null;
    };
    let mut v = serde_json::json!({
        "target": format!("e{}.{}", h.major(), h.minor()),
        "shelf": h.major(),
        "slot": h.minor(),
        "mac": h.src().to_string(),
    });
    if h.is_error() {
        v["error"] = answer_text(f).trim_matches('*').into();
        v["error_code"] = h.error().into();
    } else if let Ok(c) = ConfigPacket::new_checked(h.payload()) {
        v["buffer_count"] = c.buffer_count().into();
        v["firmware_version"] = format!("{:#06x}", c.firmware_version()).into();
        v["sectors_per_frame"] = c.sector_count().into();
        v["aoe_version"] = c.aoe_version().into();
        v["string"] = answer_text(f).into();
        v["error"] = serde_json::Value::Null;
    }
    v
}

/// SHELF or SLOT as aoecfg's `strtoul(s, 0, 0)` reads it (decimal, `0x` hex, leading-`0`
/// octal), but only a whole number from 0 to `max` (`max` itself is the broadcast address,
/// every shelf or slot): anything else is a usage error naming it, where aoecfg would send
/// the number cut to the field's width (AoEr11 section 2: a 16-bit major, an 8-bit minor).
fn address(s: &str, what: &str, max: u64) -> Result<u64> {
    let t = s.trim();
    let (radix, body) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    match u64::from_str_radix(body, radix) {
        Ok(v) if v <= max && !body.starts_with(['+', '-']) => Ok(v),
        _ => Err(usage(format!(
            "{what} {s}: not a {what} address (0 to {max}; {max} asks every {what})"
        ))),
    }
}

/// Runs `aoecfg`.
pub fn run(a: CfgArgs) -> Result<()> {
    let ccmd = match a.cmd.as_deref() {
        None | Some("read") => ConfigCommand::Read,
        Some("test") => ConfigCommand::Test,
        Some("prefix") => ConfigCommand::TestPrefix,
        Some("set") => ConfigCommand::Set,
        Some("fset") => ConfigCommand::ForceSet,
        Some(_) => usage_exit(),
    };
    let timeout = match a.timeout.as_deref() {
        None => 0,
        Some(t) => match t.trim().parse::<u32>() {
            Ok(v) => u64::from(v),
            Err(_) => {
                return Err(usage(format!(
                    "-t {t}: not a number of seconds (0 to {}; 0 waits for ever)",
                    u32::MAX
                )))
            }
        },
    };
    let (mut shelf, mut slot, mut net) = (0xffffu16, 0xffu8, "eth0".to_string());
    let rest: &[String] = match a.args.as_slice() {
        [s, l, rest @ ..] if rest.len() <= 1 => {
            shelf = address(s, "shelf", 0xffff)? as u16;
            slot = address(l, "slot", 0xff)? as u8;
            rest
        }
        [_, _, ..] => usage_exit(),
        one => one,
    };
    if let Some(n) = rest.first() {
        if n.starts_with(|c: char| c.is_ascii_digit()) {
            eprintln!("aoecfg Error: \"{n}\" is not a valid network interface");
            usage_exit();
        }
        net = n.clone();
    }
    let single = shelf != 0xffff && slot != 0xff;
    let cfg = a.string.unwrap_or_default();
    let sock = open_socket(&net)?;
    let mac = MacAddr(sock.info().mac);
    // aoe_tag(): the microseconds of the current time with the high bit set.
    let usec = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_micros());
    let tag = usec | 1 << 31;
    let q = Message {
        header: HeaderRepr::request(
            MacAddr::BROADCAST,
            mac,
            TargetAddr::new(shelf, slot),
            Command::QueryConfig,
            Tag(tag),
        ),
        body: Body::Config(ConfigRepr::request(ccmd, cfg.as_bytes())),
    }
    .to_vec()
    .map_err(|e| anyhow::anyhow!("config string too long: {e}"))?;
    sock.send(&q)?;
    let deadline = (timeout > 0).then(|| Instant::now() + Duration::from_secs(timeout));
    let stop = stop_flag()?;
    let mut buf = vec![0u8; aoe_sys::frame_capacity(sock.info().mtu).max(2048)];
    let mut out = std::io::stdout().lock();
    loop {
        let got = recv_until(&sock, &mut buf, deadline, &stop, |f| {
            is_answer(f, shelf, slot, tag)
                && aoe_frame(f).is_some_and(|h| h.major() != 0xffff && h.minor() != 0xff)
        })?;
        let Some(n) = got else {
            return Ok(());
        };
        let f = &buf[..n];
        let text = answer_text(f);
        let Some(h) = aoe_frame(f) else {
            continue;
        };
        if a.json {
            writeln!(out, "{}", answer_json(f))?;
        } else if single {
            writeln!(out, "{text}")?;
        } else {
            writeln!(out, "{}.{}\t{text}", h.major(), h.minor())?;
        }
        out.flush()?;
        if single {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_aoecfg_prints_them() {
        let me = MacAddr([2, 0, 0, 0, 0, 1]);
        let mut header =
            HeaderRepr::request(me, me, TargetAddr::new(1, 2), Command::QueryConfig, Tag(7));
        header.response = true;
        let body = Body::Config(ConfigRepr::request(ConfigCommand::Read, b"abc"));
        let mut f = Message { header, body }.to_vec().unwrap();
        assert_eq!(answer_text(&f), "abc");
        let j = answer_json(&f);
        assert_eq!(j["target"], "e1.2");
        assert_eq!(j["string"], "abc");
        assert_eq!(j["mac"], "02:00:00:00:00:01");
        assert!(j["error"].is_null());
        let mut view = aoe_wire::Frame::new_checked(&mut f[..]).unwrap();
        view.set_version_flags(1, 0x0c);
        view.set_error(4);
        assert_eq!(answer_text(&f), "*badcfg*");
        let j = answer_json(&f);
        assert_eq!(
            (&j["error"], &j["error_code"]),
            (&"badcfg".into(), &4.into())
        );
    }

    #[test]
    fn addresses_in_strtoul_bases_and_range() {
        assert_eq!(address("0x10", "shelf", 0xffff).unwrap(), 16);
        assert_eq!(address("010", "shelf", 0xffff).unwrap(), 8);
        assert_eq!(address("0", "slot", 0xff).unwrap(), 0);
        assert_eq!(address("255", "slot", 0xff).unwrap(), 255);
        for bad in ["256", "-1", "+1", "", "0x", "08", "1 2", "x"] {
            assert!(address(bad, "slot", 0xff).is_err(), "{bad}");
        }
    }

    #[test]
    fn atoi_and_strtoul_like_c() {
        use super::super::{atoi, strtoul};
        assert_eq!(atoi("12x"), 12);
        assert_eq!(atoi("x"), 0);
        assert_eq!(strtoul("0x10"), 16);
        assert_eq!(strtoul("010"), 8);
        assert_eq!(strtoul("7"), 7);
    }
}
