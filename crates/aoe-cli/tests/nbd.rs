//! Integration: `aoe initiator --nbd SOCKET` with real NBD clients (libnbd's `nbdinfo` and
//! `nbdcopy`, `qemu-io`, `qemu-img`) and with a raw client that misbehaves, against vblade
//! and against `aoe serve`.
//!
//! Each test makes two network namespaces joined by a veth pair: two targets (shelf 1,
//! slots 1 and 2) in one, `aoe initiator --root TMP --nbd TMP/nbd.sock` in the other.
//! AoE frames never leave that link; the Unix socket lives in the shared mount namespace,
//! so the clients run on the host side. What the clients write is checked in the
//! targets' backing files.
//!
//! These tests need root and the clients (`scripts/install-deps.sh` installs them); a
//! missing tool is a failure, never a skip.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use aoe_testkit::{require_root, wait_until, Netns, NsChild, TxBytes, VethPair};

const AOE: &str = env!("CARGO_BIN_EXE_aoe");
/// Sectors per backing file: not a power of two, so an off-by-some size shows.
const SECTORS: u64 = 16 * 1024 + 3;
/// The MBR partition on slot 1: start and length in sectors.
const PART: (u64, u64) = (2048, 4096);

#[derive(Debug, Clone, Copy)]
enum Target {
    Vblade,
    AoeServe,
}

fn require_tools() {
    require_root();
    aoe_testkit::require_tools(&[
        ("nbdinfo", "libnbd-bin"),
        ("nbdcopy", "libnbd-bin"),
        ("qemu-io", "qemu-utils"),
        ("qemu-img", "qemu-utils"),
        ("vblade", "vblade"),
        ("fusermount3", "fuse3"),
        ("nsenter", "util-linux"),
    ]);
}

/// Deterministic bytes, different per `seed`.
fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn packet_sockets(ns: &Netns) -> usize {
    ns.run("cat", &["/proc/net/packet"])
        .map(|s| s.lines().count().saturating_sub(1))
        .unwrap_or(0)
}

fn run(cmd: &mut Command) -> Output {
    let label = format!("{cmd:?}");
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {label}: {e}"))
}

/// Field order: processes stop before the link and namespaces go.
struct Rig {
    kind: Target,
    initiator: Option<NsChild>,
    targets: Vec<Option<NsChild>>,
    files: Vec<PathBuf>,
    root: PathBuf,
    sock: PathBuf,
    target_if: String,
    _veth: VethPair,
    _init_ns: Netns,
    target_ns: Netns,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn start(kind: Target) -> Rig {
        Rig::start_with(kind, &[])
    }

    /// [`Rig::start`] with `extra` options for `aoe initiator`.
    fn start_with(kind: Target, extra: &[&str]) -> Rig {
        require_tools();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut files = Vec::new();
        for slot in 1..=2u32 {
            let f = dir.path().join(format!("slot{slot}.img"));
            let mut data = pattern(slot, (SECTORS * 512) as usize);
            if slot == 1 {
                // One MBR primary partition (type 0x83).
                data[446..462].fill(0);
                data[446 + 4] = 0x83;
                data[446 + 8..446 + 12].copy_from_slice(&(PART.0 as u32).to_le_bytes());
                data[446 + 12..446 + 16].copy_from_slice(&(PART.1 as u32).to_le_bytes());
                data[462..510].fill(0);
                data[510] = 0x55;
                data[511] = 0xaa;
            }
            fs::write(&f, data).expect("backing file");
            files.push(f);
        }
        let root = dir.path().join("etherd");
        let sock = dir.path().join("nbd.sock");
        let target_ns = Netns::new("aoent").expect("target namespace");
        let init_ns = Netns::new("aoeni").expect("initiator namespace");
        let veth = VethPair::new(&target_ns, &init_ns, 1500).expect("veth pair");
        let init_if = veth.b_name().to_owned();
        let mut rig = Rig {
            kind,
            initiator: None,
            targets: vec![None, None],
            files,
            root,
            sock,
            target_if: veth.a_name().to_owned(),
            _veth: veth,
            _init_ns: init_ns,
            target_ns,
            _dir: dir,
        };
        for i in 0..2 {
            rig.start_target(i);
        }
        let mut cmd = rig._init_ns.command(AOE);
        cmd.arg("initiator")
            .arg("--root")
            .arg(&rig.root)
            .args(["--iflist", &init_if, "--deadsecs", "4", "--nbd"])
            .arg(&rig.sock)
            // 127.0.0.1 of the initiator's own namespace: no clash between tests.
            .args(["--nbd-tcp", "127.0.0.1:10809"])
            .args(extra)
            .env("AOE_LOG", "debug");
        let mut init = NsChild::spawn_command(cmd).expect("start aoe initiator");
        let sock = rig.sock.clone();
        let ready = wait_until(Duration::from_secs(10), || {
            sock.exists() || !init.is_running()
        });
        assert!(
            ready && init.is_running(),
            "aoe initiator did not start:\n{}",
            init.output_so_far()
        );
        rig.initiator = Some(init);
        let up = wait_until(Duration::from_secs(15), || {
            let l = rig.list();
            l.contains("export=\"e1.1\"")
                && l.contains("export=\"e1.2\"")
                && l.contains("export=\"e1.1p1\"")
        });
        assert!(up, "exports did not appear: {}{}", rig.list(), rig.logs());
        rig
    }

    fn start_target(&mut self, i: usize) {
        let slot = (i + 1).to_string();
        let mut cmd = match self.kind {
            Target::Vblade => Command::new("vblade"),
            Target::AoeServe => {
                let mut c = Command::new(AOE);
                c.arg("serve");
                c
            }
        };
        cmd.args(["1", &slot, &self.target_if]).arg(&self.files[i]);
        let before = packet_sockets(&self.target_ns);
        let mut t = self.target_ns.spawn(cmd).expect("start target");
        let bound = wait_until(Duration::from_secs(10), || {
            packet_sockets(&self.target_ns) > before || !t.is_running()
        });
        assert!(
            bound && t.is_running(),
            "target did not start:\n{}",
            t.output_so_far()
        );
        self.targets[i] = Some(t);
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    fn list(&self) -> String {
        let o = run(Command::new("timeout").args(["20", "nbdinfo", "--list", &self.uri("")]));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn logs(&self) -> String {
        let init = self
            .initiator
            .as_ref()
            .map(NsChild::output_so_far)
            .unwrap_or_default();
        let tail: Vec<&str> = init.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("\n--- initiator (tail):\n{}", tail.join("\n"))
    }

    /// Runs a client under a timeout; asserts success and returns stdout + stderr.
    fn client(&self, program: &str, args: &[&str]) -> String {
        let o = run(Command::new("timeout")
            .args(["-k", "5", "120", program])
            .args(args));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.status.success(),
            "{program} {args:?} failed ({}):\n{text}{}",
            o.status,
            self.logs()
        );
        text
    }

    fn backing(&self, i: usize) -> Vec<u8> {
        fs::read(&self.files[i]).expect("read backing file")
    }

    fn connect(&self, export: &str, structured: bool) -> Client {
        Client::connect(&self.sock, export, structured)
    }

    /// The device's `state` attribute (`up`, `down`, `down,closewait`), None if absent.
    fn state(&self, dev: &str) -> Option<String> {
        fs::read_to_string(self.root.join(format!("sysfs/block/etherd!{dev}/state")))
            .ok()
            .map(|s| s.trim().to_string())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(mut i) = self.initiator.take() {
            let _ = i.stop();
        }
        for t in self.targets.iter_mut() {
            if let Some(mut t) = t.take() {
                let _ = t.stop();
            }
        }
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.root)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

// ------------------------------------------------------------------------------------------
// A raw NBD client, to send what real clients never do

struct Client {
    s: UnixStream,
    structured: bool,
}

/// A reply: cookie, error, data.
type Reply = (u64, u32, Vec<u8>);

impl Client {
    fn raw(sock: &Path) -> UnixStream {
        let s = UnixStream::connect(sock).expect("connect to the NBD socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    /// Fixed newstyle handshake with NBD_OPT_GO (and structured replies if asked).
    fn connect(sock: &Path, export: &str, structured: bool) -> Client {
        let mut s = Self::raw(sock);
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        if structured {
            send_option(&mut s, 8, &[]);
            assert_eq!(read_option_reply(&mut s).1, 1);
        }
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        send_option(&mut s, 7, &d);
        loop {
            let (_, kind, _) = read_option_reply(&mut s);
            assert!(kind < 1 << 31, "GO {export} failed: reply type {kind:#x}");
            if kind == 1 {
                break;
            }
        }
        Client { s, structured }
    }

    fn send(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// Reads one reply; `read_len` says how much data a simple read reply carries.
    fn reply(&mut self, read_len: impl Fn(u64) -> usize) -> Reply {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).expect("reply");
        match u32::from_be_bytes(m) {
            0x6744_6698 => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).unwrap();
                let err = u32::from_be_bytes(h[0..4].try_into().unwrap());
                let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
                let mut data = vec![0u8; if err == 0 { read_len(cookie) } else { 0 }];
                self.s.read_exact(&mut data).unwrap();
                (cookie, err, data)
            }
            0x668e_33ef => {
                assert!(self.structured, "structured reply without negotiation");
                let mut h = [0u8; 16];
                self.s.read_exact(&mut h).unwrap();
                let flags = u16::from_be_bytes([h[0], h[1]]);
                assert_eq!(flags & 1, 1, "one chunk per reply, flagged done");
                let kind = u16::from_be_bytes([h[2], h[3]]);
                let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
                let mut p = vec![0u8; len];
                self.s.read_exact(&mut p).unwrap();
                match kind {
                    0 => (cookie, 0, Vec::new()),
                    1 => (cookie, 0, p[8..].to_vec()),
                    0x8001 => (
                        cookie,
                        u32::from_be_bytes(p[0..4].try_into().unwrap()),
                        vec![],
                    ),
                    k => panic!("unexpected chunk type {k:#x}"),
                }
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }

    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send(0, 0, 1, offset, len, &[]);
        let (c, e, d) = self.reply(|_| len as usize);
        assert_eq!(c, 1);
        if e == 0 {
            Ok(d)
        } else {
            Err(e)
        }
    }

    fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.send(1, flags, 2, offset, data.len() as u32, data);
        let (c, e, _) = self.reply(|_| 0);
        assert_eq!(c, 2);
        e
    }
}

fn send_option(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

fn read_option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("option reply");
    assert_eq!(&h[..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut d = vec![0u8; len];
    s.read_exact(&mut d).unwrap();
    (opt, kind, d)
}

/// True once the server has closed `s` (read returns EOF or a reset).
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return true,
            Ok(_) => continue,
        }
    }
}

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EIO: u32 = 5;

// ------------------------------------------------------------------------------------------
// The scenarios

fn real_clients(kind: Target) {
    let rig = Rig::start(kind);
    let size = SECTORS * 512;

    // nbdinfo --list: every device and partition, with its size.
    let list = rig.list();
    for (name, bytes) in [("e1.1", size), ("e1.2", size), ("e1.1p1", PART.1 * 512)] {
        let at = list
            .find(&format!("export=\"{name}\":"))
            .unwrap_or_else(|| panic!("{name} not listed:\n{list}"));
        let rest = &list[at..];
        let end = rest[1..].find("export=").map_or(rest.len(), |e| e + 1);
        assert!(
            rest[..end].lines().any(|l| l
                .split_whitespace()
                .take(2)
                .eq(["export-size:", &bytes.to_string()])),
            "{name} should be {bytes} bytes:\n{list}"
        );
    }
    // nbdinfo on one export: block sizes.
    let info = rig.client("nbdinfo", &[&rig.uri("e1.1")]);
    for needle in [
        "block_size_minimum: 512",
        "block_size_preferred: 1024",
        "block_size_maximum: 33554432",
        "can_flush: true",
        "can_fua: true",
        "can_zero: true",
        "can_multi_conn: true",
    ] {
        assert!(info.contains(needle), "nbdinfo lacks {needle:?}:\n{info}");
    }

    // The TCP listener, from inside the initiator's namespace.
    let o =
        run(rig
            ._init_ns
            .command("timeout")
            .args(["20", "nbdinfo", "nbd://127.0.0.1:10809/e1.2"]));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains(&format!("export-size: {size}")),
        "nbdinfo over TCP ({}):\n{text}{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );

    // qemu-io: patterns at several offsets, unaligned and large, read back.
    let writes: [(u8, u64, u64); 6] = [
        (0xab, 0, 4096),
        (0xcd, 12345, 1000),
        (0x5a, 1 << 20, 3 << 20),
        (0x11, (6 << 20) + 511, 2),
        (0x22, size - 700, 700),
        (0x33, 5 << 20, 40 << 10),
    ];
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for (p, off, len) in writes {
        args.push("-c".into());
        args.push(format!("write -P {p:#x} {off} {len}"));
    }
    args.push("-c".into());
    args.push("flush".into());
    for (p, off, len) in writes {
        args.push("-c".into());
        args.push(format!("read -P {p:#x} {off} {len}"));
    }
    args.push(rig.uri("e1.1"));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = rig.client("qemu-io", &argv);
    assert!(
        !out.contains("fail") && !out.contains("error"),
        "qemu-io:\n{out}"
    );
    let img = rig.backing(0);
    for (p, off, len) in writes {
        let r = &img[off as usize..(off + len) as usize];
        assert!(
            r.iter().all(|b| *b == p),
            "backing file at {off}+{len} is not {p:#x}"
        );
    }
    // Bytes next to the unaligned writes are untouched.
    let orig = pattern(1, size as usize);
    let odd = (6 << 20) + 511;
    assert_eq!(img[odd - 1], orig[odd - 1]);
    assert_eq!(img[odd + 2], orig[odd + 2]);
    assert_eq!(img[12344], orig[12344]);
    assert_eq!(img[13345], orig[13345]);

    // qemu-img convert: the AoE disk to a local file, a local file back; checksums match.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("copy.img");
    rig.client(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &rig.uri("e1.1"),
            local.to_str().unwrap(),
        ],
    );
    assert!(
        fs::read(&local).unwrap() == rig.backing(0),
        "copy of e1.1 differs"
    );
    let src = dir.path().join("src.img");
    fs::write(&src, pattern(77, size as usize)).unwrap();
    rig.client(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &rig.uri("e1.2"),
        ],
    );
    assert!(
        rig.backing(1) == pattern(77, size as usize),
        "e1.2 after qemu-img convert differs"
    );

    // nbdcopy between two exports.
    rig.client("nbdcopy", &[&rig.uri("e1.1"), &rig.uri("e1.2")]);
    assert!(
        rig.backing(0) == rig.backing(1),
        "nbdcopy e1.1 -> e1.2 differs"
    );

    // A partition export is a window on the device.
    rig.client(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 8192",
            &rig.uri("e1.1p1"),
        ],
    );
    let img = rig.backing(0);
    let start = (PART.0 * 512) as usize;
    assert!(img[start..start + 8192].iter().all(|b| *b == 0x77));
}

fn raw_clients(kind: Target) {
    let mut rig = Rig::start(kind);
    let size = SECTORS * 512;

    for structured in [false, true] {
        let mut c = rig.connect("e1.2", structured);
        // Unaligned write and read, served by read-modify-write.
        let before = rig.backing(1);
        let data = pattern(9 + u32::from(structured), 1500);
        assert_eq!(c.write(777, &data, 1), 0);
        assert_eq!(c.read(777, 1500).unwrap(), data);
        let img = rig.backing(1);
        assert_eq!(&img[777..2277], &data[..]);
        assert_eq!(img[776], before[776]);
        assert_eq!(img[2277], before[2277]);
        // Write zeroes (type 6), unaligned, really written.
        c.send(6, 0, 3, 1000, 5000, &[]);
        assert_eq!(c.reply(|_| 0), (3, 0, vec![]));
        assert!(rig.backing(1)[1000..6000].iter().all(|b| *b == 0));
        // Out of range: EINVAL for reads, ENOSPC for writes (payload skipped).
        assert_eq!(c.read(size - 512, 1024), Err(EINVAL));
        assert_eq!(c.read(u64::MAX - 10, 512), Err(EINVAL));
        assert_eq!(c.write(size, &[1u8; 512], 0), ENOSPC);
        // Oversize: more than the advertised 32 MiB maximum.
        assert_eq!(c.read(0, (32 << 20) + 512), Err(EINVAL));
        // Unknown command, TRIM (not advertised), unknown flag.
        for (kind, flags) in [(0x77u16, 0u16), (4, 0), (0, 0x100)] {
            c.send(kind, flags, 4, 0, 512, &[]);
            assert_eq!(
                c.reply(|_| 0),
                (4, EINVAL, vec![]),
                "type {kind} flags {flags:#x}"
            );
        }
        // Many requests in flight, replies matched by cookie.
        for i in 0..64u64 {
            c.send(0, 0, 100 + i, i * 4096, 4096, &[]);
        }
        let img = rig.backing(1);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..64 {
            let (cookie, e, d) = c.reply(|_| 4096);
            assert_eq!(e, 0);
            let i = cookie - 100;
            assert_eq!(d, &img[(i * 4096) as usize..((i + 1) * 4096) as usize]);
            seen.insert(cookie);
        }
        assert_eq!(seen.len(), 64);
        // Flush, then a clean disconnect.
        c.send(3, 0, 5, 0, 0, &[]);
        assert_eq!(c.reply(|_| 0), (5, 0, vec![]));
        c.send(2, 0, 6, 0, 0, &[]);
        assert!(closed(&mut c.s));
    }

    // Handshake abuse: wrong option magic, unknown client flags -> closed.
    let mut s = Client::raw(&rig.sock);
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"IHAVEOPX\0\0\0\x03\0\0\0\0").unwrap();
    assert!(closed(&mut s), "bad option magic should close");
    let mut s = Client::raw(&rig.sock);
    s.read_exact(&mut g).unwrap();
    s.write_all(&0x80u32.to_be_bytes()).unwrap();
    assert!(closed(&mut s), "unknown client flags should close");
    // Unknown export: NBD_REP_ERR_UNKNOWN, and the option phase goes on.
    let mut s = Client::raw(&rig.sock);
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    send_option(&mut s, 7, b"\0\0\0\x04e9.9\0\0");
    assert_eq!(read_option_reply(&mut s).1, (1 << 31) + 6);
    send_option(&mut s, 2, &[]);
    assert_eq!(read_option_reply(&mut s).1, 1);
    // Wrong request magic in transmission: closed.
    let mut c = rig.connect("e1.1", false);
    c.s.write_all(&[0x25, 0x60, 0x95, 0x14]).unwrap();
    c.s.write_all(&[0u8; 24]).unwrap();
    assert!(closed(&mut c.s), "bad request magic should close");
    // Disconnect in the middle of a request and of a write payload.
    let mut c = rig.connect("e1.1", true);
    c.s.write_all(&[0x25, 0x60, 0x95, 0x13, 0, 0]).unwrap();
    drop(c);
    let mut c = rig.connect("e1.1", true);
    c.send(1, 0, 1, 0, 1 << 20, &[7u8; 1000]);
    drop(c);
    // Disconnect with reads in flight.
    let mut c = rig.connect("e1.1", false);
    for i in 0..32 {
        c.send(0, 0, i, 0, 1 << 20, &[]);
    }
    drop(c);

    // The daemon still serves.
    let mut c = rig.connect("e1.1", false);
    assert!(c.read(0, 512).is_ok());
    assert!(rig.list().contains("export=\"e1.2\""));

    // A device that goes down: in-flight and new requests fail with EIO, it leaves the
    // list; held by its client as an open file holds it (the driver counts every opener),
    // it shows `down,closewait` and stays down while the client is connected, its target
    // back or not, and comes back once the client has gone (the last close's Query
    // Config). On the code before (NBD clients not counted as opens): `down`, and the
    // same connection read again once the target was back.
    let mut c2 = rig.connect("e1.2", true);
    if let Some(mut t) = rig.targets[1].take() {
        let _ = t.stop();
    }
    assert_eq!(c2.read(0, 4096), Err(EIO), "read on a dead target");
    let gone = wait_until(Duration::from_secs(10), || {
        !rig.list().contains("export=\"e1.2\"")
    });
    assert!(gone, "e1.2 still listed while down:\n{}", rig.list());
    assert_eq!(c2.read(0, 4096), Err(EIO), "read on a down device");
    assert!(c.read(0, 512).is_ok(), "e1.1 is still up");
    let closewait = wait_until(Duration::from_secs(10), || {
        rig.state("e1.2").as_deref() == Some("down,closewait")
    });
    assert!(
        closewait,
        "e1.2 state {:?} while down with a client connected, want down,closewait{}",
        rig.state("e1.2"),
        rig.logs()
    );
    rig.start_target(1);
    fs::write(rig.root.join("discover"), "\n").expect("echo > discover");
    assert_eq!(c2.read(0, 4096), Err(EIO), "held down while connected");
    assert_eq!(rig.state("e1.2").as_deref(), Some("down,closewait"));
    drop(c2);
    let back = wait_until(Duration::from_secs(20), || {
        rig.list().contains("export=\"e1.2\"")
    });
    assert!(
        back,
        "e1.2 did not come back once its client left:\n{}{}",
        rig.list(),
        rig.logs()
    );
    assert_eq!(rig.state("e1.2").as_deref(), Some("up"));
    let img = rig.backing(1);
    let mut c2 = rig.connect("e1.2", true);
    assert_eq!(
        c2.read(0, 4096).unwrap(),
        &img[..4096],
        "a new connection, device back"
    );
    let running = rig.initiator.as_mut().is_some_and(NsChild::is_running);
    assert!(running, "initiator died:{}", rig.logs());
}

#[test]
fn nbd_real_clients_vblade() {
    real_clients(Target::Vblade);
}

#[test]
fn nbd_real_clients_aoe_serve() {
    real_clients(Target::AoeServe);
}

#[test]
fn nbd_bad_clients_vblade() {
    raw_clients(Target::Vblade);
}

#[test]
fn nbd_bad_clients_aoe_serve() {
    raw_clients(Target::AoeServe);
}

/// Audit 4 (session 21): `flush` skips a device an NBD client is connected to (on the
/// device's export or on one of its partitions'), as it skips one whose file is open (the
/// driver's `aoedev_flush` skips a device with `nopen`). On the code before, `echo all >
/// ROOT/flush` removed both devices under their clients, whose reads then failed with EIO
/// (errno 5 in the reply) until a discover found the devices again.
#[test]
fn nbd_client_holds_its_device_against_flush() {
    let rig = Rig::start(Target::AoeServe);
    let mut part = rig.connect("e1.1p1", false);
    let mut whole = rig.connect("e1.2", true);
    fs::write(rig.root.join("flush"), "all\n").expect("echo all > flush");
    for dev in ["e1.1", "e1.2"] {
        let line = format!("{dev}: busy (NBD client on ");
        assert!(
            wait_until(Duration::from_secs(5), || rig.logs().contains(&line)),
            "no {line:?} after the flush{}",
            rig.logs()
        );
        assert!(
            rig.root.join(dev).exists(),
            "{dev} flushed under its client"
        );
    }
    let b1 = rig.backing(0);
    let start = (PART.0 * 512) as usize;
    assert_eq!(
        part.read(0, 4096),
        Ok(b1[start..start + 4096].to_vec()),
        "e1.1p1 after the flush{}",
        rig.logs()
    );
    assert_eq!(
        whole.read(512, 4096),
        Ok(rig.backing(1)[512..512 + 4096].to_vec()),
        "e1.2 after the flush{}",
        rig.logs()
    );
    // Disconnected, the devices go with the next flush (the server counts a client out
    // when its connection has closed, after the client's close returned).
    drop(part);
    drop(whole);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let _ = fs::write(rig.root.join("flush"), "all\n");
            !rig.root.join("e1.1").exists() && !rig.root.join("e1.2").exists()
        }),
        "devices not flushed once their clients left{}",
        rig.logs()
    );
}

/// Regression (fifteenth audit): a write through the NBD server is seen by a read of the
/// device or partition file open in the kernel's cached mode as soon as it is answered.
/// Every front-end of one initiator is one device, as the Linux driver's block device is
/// one page cache that every local writer goes through (and a direct write drops its range
/// from). On the code before, a cached open of `ROOT/e1.1` kept what it had read before an
/// NBD client's write, answered and flushed: its reads returned the old bytes for as long
/// as the kernel kept the pages (3 of 3 here; by hand, 1917 of 1922 reads right after a
/// write, with cached readers beside). Each write here is answered only after its sectors
/// are dropped from every cached device and partition file that covers them, so each read
/// is made at once after the answer, without waiting: whole disk and partition exports,
/// writes of one unaligned piece and aligned ones, FUA, and a write of zeros.
#[test]
fn nbd_writes_are_seen_at_once_by_cached_opens_of_the_device_and_partition_files() {
    use std::os::unix::fs::FileExt;
    let rig = Rig::start(Target::AoeServe);
    let whole = fs::File::open(rig.root.join("e1.1")).expect("open ROOT/e1.1 cached");
    let part = fs::File::open(rig.root.join("e1.1p1")).expect("open ROOT/e1.1p1 cached");
    let pread = |f: &fs::File, off: u64, len: usize| {
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, off)
            .expect("pread of a device file");
        b
    };
    let mut nbd_whole = rig.connect("e1.1", true);
    let mut nbd_part = rig.connect("e1.1p1", false);
    let p0 = PART.0 * 512;
    // In the partition, 100 sectors and 100 bytes in; 8 KiB read around each write.
    let (at, len) = (100 * 512 + 100, 5000usize);
    let (lo, span) = (at - 1636, 8192usize);
    let b = rig.backing(0);
    let mut want = b[(p0 + lo) as usize..(p0 + lo) as usize + span].to_vec();
    assert_eq!(pread(&whole, p0 + lo, span), want, "e1.1 before any write");
    assert_eq!(pread(&part, lo, span), want, "e1.1p1 before any write");
    // (what, through the partition's export, FUA, zeros): FUA writes an aligned piece.
    let steps = [
        ("an unaligned write to e1.1", false, false, false),
        ("an unaligned write to e1.1p1", true, false, false),
        ("an aligned FUA write to e1.1", false, true, false),
        ("a write of zeros to e1.1p1", true, false, true),
    ];
    for (i, &(what, in_part, fua, zeros)) in steps.iter().enumerate() {
        let (off, n) = if fua { (100 * 512, 4096) } else { (at, len) };
        let data = if zeros {
            vec![0u8; n]
        } else {
            pattern(100 + i as u32, n)
        };
        let (nbd, base) = if in_part {
            (&mut nbd_part, 0)
        } else {
            (&mut nbd_whole, p0)
        };
        let e = if zeros {
            nbd.send(6, 0, 3, base + off, n as u32, &[]);
            let (c, e, _) = nbd.reply(|_| 0);
            assert_eq!(c, 3);
            e
        } else {
            nbd.write(base + off, &data, if fua { 1 } else { 0 })
        };
        assert_eq!(e, 0, "{what} failed{}", rig.logs());
        let r = (off - lo) as usize;
        want[r..r + n].copy_from_slice(&data);
        // At once: the answer came after the cached copies were dropped.
        let seen_whole = pread(&whole, p0 + lo, span);
        let seen_part = pread(&part, lo, span);
        let file = rig.backing(0)[(p0 + lo) as usize..(p0 + lo) as usize + span].to_vec();
        assert_eq!(file, want, "the backing file after {what}{}", rig.logs());
        assert!(
            seen_whole == want,
            "a cached open of ROOT/e1.1 read old bytes after {what} was answered"
        );
        assert!(
            seen_part == want,
            "a cached open of ROOT/e1.1p1 read old bytes after {what} was answered"
        );
    }
}

/// Regression (fifteenth audit): a write through a device or partition file is seen by a
/// cached open of the other (the partition's through the whole disk's file and the other
/// way round), direct or cached. The writer's own cache is the kernel's (a cached write
/// updates it; a direct write's range is dropped after its answer, as before); the
/// other file's range is dropped after the answer too, so the reads here wait for it
/// (20 s at most; at once in every run by hand). On the code before, the other file kept
/// its old pages for as long as the kernel kept them, as two Linux block devices of one
/// disk do (a partition's has a page cache of its own): "a cached open of ROOT/e1.1 still
/// read the old bytes 20 s after a direct write through ROOT/e1.1p1".
#[test]
fn a_write_through_a_device_or_partition_file_is_seen_by_the_others_cached_open() {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const O_DIRECT: i32 = 0o40000;
    let rig = Rig::start(Target::AoeServe);
    let path = |f: &str| rig.root.join(f);
    let whole = fs::File::open(path("e1.1")).expect("open ROOT/e1.1 cached");
    let part = fs::File::open(path("e1.1p1")).expect("open ROOT/e1.1p1 cached");
    let pread = |f: &fs::File, off: u64| {
        let mut b = vec![0u8; 4096];
        f.read_exact_at(&mut b, off)
            .expect("pread of a device file");
        b
    };
    let p0 = PART.0 * 512;
    // (writer, direct); each writes 4 KiB at the partition's sector 100 (aligned, as
    // O_DIRECT needs).
    let cases = [
        ("e1.1p1", true),
        ("e1.1p1", false),
        ("e1.1", true),
        ("e1.1", false),
    ];
    for (i, &(file, direct)) in cases.iter().enumerate() {
        let off = 100 * 512;
        // Both caches hold the range before the write.
        pread(&whole, p0 + off);
        pread(&part, off);
        let data = pattern(200 + i as u32, 4096);
        let mut o = fs::OpenOptions::new();
        o.write(true);
        if direct {
            o.custom_flags(O_DIRECT);
        }
        let w = o.open(path(file)).expect("open the writer");
        let at = if file == "e1.1" { p0 + off } else { off };
        w.write_all_at(&data, at)
            .expect("write through the device file");
        drop(w);
        let how = if direct { "direct" } else { "cached" };
        for (name, f, at) in [("e1.1", &whole, p0 + off), ("e1.1p1", &part, off)] {
            assert!(
                wait_until(Duration::from_secs(20), || pread(f, at) == data),
                "a cached open of ROOT/{name} still read the old bytes 20 s after a {how} \
                 write through ROOT/{file}"
            );
        }
    }
}

/// Threads of process `pid` named `name` (/proc/PID/task/*/comm).
fn threads_named(pid: u32, name: &str) -> usize {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name)
                })
                .count()
        })
        .unwrap_or(0)
}

/// A connection's handshake thread ends once the transmission phase is handed to the
/// network thread, and its writer thread starts only when a reply has to wait for room in
/// the socket: N connected clients whose replies went out at once leave no thread at all;
/// a client that lets a large read's reply wait gets its writer, and the whole reply. Their
/// end (the log line, the writer's end, the count the flush test relies on) happens on the
/// network thread. A client that connects and never speaks is dropped after the handshake
/// limit (10 s). On the code before: an `nbd-conn` and an `nbd-writer` thread per client for
/// as long as it stayed connected, and the silent client held its thread until it went away.
#[test]
fn nbd_connections_leave_no_handshake_thread() {
    let rig = Rig::start(Target::AoeServe);
    let pid = rig.initiator.as_ref().unwrap().pid();
    let exports = ["e1.1", "e1.2", "e1.1p1"];
    let mut clients: Vec<Client> = (0..9)
        .map(|i| rig.connect(exports[i % 3], i % 2 == 0))
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        assert!(c.read(0, 4096).is_ok(), "client {i}{}", rig.logs());
    }
    assert!(
        wait_until(Duration::from_secs(10), || threads_named(pid, "nbd-conn")
            == 0),
        "{} nbd-conn threads with 9 clients connected{}",
        threads_named(pid, "nbd-conn"),
        rig.logs()
    );
    assert_eq!(threads_named(pid, "nbd-writer"), 0, "{}", rig.logs());
    // 8 MiB asked for and not read yet: more than the socket holds, so the rest waits for
    // the writer.
    let big = 8 << 20;
    clients[0].send(0, 0, 7, 0, big, &[]);
    assert!(
        wait_until(Duration::from_secs(10), || threads_named(pid, "nbd-writer")
            == 1),
        "no writer thread for a reply larger than the socket{}",
        rig.logs()
    );
    let (cookie, err, data) = clients[0].reply(|_| big as usize);
    assert_eq!((cookie, err), (7, 0));
    assert!(data == rig.backing(0)[..big as usize], "the 8 MiB read");
    // A client that never speaks after the greeting: closed by the server (EOF) within the
    // limit, not by this side's 30 s read timeout.
    let mut silent = Client::raw(&rig.sock);
    let mut g = [0u8; 18];
    silent.read_exact(&mut g).unwrap();
    let mut b = [0u8; 1];
    // A signal to this process (a child of another test ending) interrupts the read.
    let r = loop {
        match silent.read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r,
        }
    };
    match r {
        Ok(0) => {}
        other => panic!(
            "a silent client after the greeting: {other:?}{}",
            rig.logs()
        ),
    }
    let ends = || {
        let log = rig.initiator.as_ref().unwrap().output_so_far();
        log.matches("nbd: connection closed").count()
            + log.matches("nbd: connection dropped").count()
    };
    let ended_before = ends();
    drop(clients);
    assert!(
        wait_until(Duration::from_secs(10), || {
            threads_named(pid, "nbd-writer") == 0 && ends() >= ended_before + 9
        }),
        "after the clients left: {} writer threads, {} ends logged{}",
        threads_named(pid, "nbd-writer"),
        ends() - ended_before,
        rig.initiator.as_ref().unwrap().output_so_far()
    );
    // Still served.
    let mut again = rig.connect("e1.2", false);
    assert_eq!(again.read(0, 512), Ok(rig.backing(1)[..512].to_vec()));
}

/// Sixth audit (session 23): a client that sends many reads and goes away without
/// reading a reply (or sending `NBD_CMD_DISC`) has its connection ended once a reply
/// cannot be written, not after every request it left in the socket has been run. On the
/// code before, the requests still queued in the server's socket were read and each one's
/// 8 MiB read from the target, for nobody (a Python client's seven such connections kept
/// the link busy at 87 MB/s for minutes after it exited, and another client's 4 KiB reads
/// took up to 9 s each): "the connection of a client that went away still runs".
#[test]
fn nbd_client_gone_with_requests_queued_ends_its_connection() {
    let rig = Rig::start(Target::AoeServe);
    let len: u32 = 8 << 20;
    let mut c = rig.connect("e1.2", false);
    // 6000 reads of 8 MiB (48 GB), from a thread: the socket takes what it holds, the
    // rest waits until the close below ends the write.
    let mut w = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut b = Vec::with_capacity(6000 * 28);
        for cookie in 0..6000u64 {
            b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            b.extend_from_slice(&0u16.to_be_bytes());
            b.extend_from_slice(&0u16.to_be_bytes());
            b.extend_from_slice(&cookie.to_be_bytes());
            b.extend_from_slice(&0u64.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
        }
        let _ = w.write_all(&b);
    });
    // Served: the first reply's bytes are here.
    let mut first = [0u8; 1];
    c.s.read_exact(&mut first).expect("a first reply");
    c.s.shutdown(std::net::Shutdown::Both).unwrap();
    sender.join().unwrap();
    drop(c);
    // Its end counts the client out of its device, which `flush` then removes (a device
    // with a client is skipped, `nbd_client_holds_its_device_against_flush`).
    assert!(
        wait_until(Duration::from_secs(20), || {
            let _ = fs::write(rig.root.join("flush"), "e1.2\n");
            !rig.root.join("e1.2").exists()
        }),
        "the connection of a client that went away still runs 20 s after its close{}",
        rig.logs()
    );
    // Still served once found again.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let _ = fs::write(rig.root.join("discover"), "\n");
            rig.list().contains("export=\"e1.2\"")
        }),
        "e1.2 not found again{}",
        rig.logs()
    );
    let mut again = rig.connect("e1.2", false);
    assert_eq!(again.read(0, 512), Ok(rig.backing(1)[..512].to_vec()));
}

/// Session 24 (docs/TEST-AUDIT.md "Sixth audit, the initiator's side", item 1, and
/// "Session 24: fairness between clients"): four clients with reads queued must not hold
/// up a fifth's small read for their whole backlog. Four connections send 8 reads of
/// 8 MiB each (256 MiB) and read no reply; once the target is serving them, a fifth
/// reads 4 KiB. Counted, not timed: the bytes the target sent between the small read's
/// request and its reply. With one first-in-first-out queue per device (before) the read
/// waited for nearly the whole backlog ("served 249 MiB"); served in turn among the
/// connections, a frame each, it waits for a few frames of each.
#[test]
fn nbd_small_read_is_not_queued_behind_other_clients_backlog() {
    let rig = Rig::start(Target::AoeServe);
    let len: u32 = 8 << 20;
    let mut small = rig.connect("e1.2", false);
    let hogs: Vec<Client> = (0..4).map(|_| rig.connect("e1.2", false)).collect();
    let mut tx = TxBytes::new(&rig.target_ns, &rig.target_if);
    let start = tx.get();
    for (h, c) in hogs.iter().enumerate() {
        let mut b = Vec::new();
        for cookie in 0..8u64 {
            b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            b.extend_from_slice(&0u16.to_be_bytes());
            b.extend_from_slice(&0u16.to_be_bytes());
            b.extend_from_slice(&(cookie + 100 * h as u64).to_be_bytes());
            b.extend_from_slice(&0u64.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
        }
        // 224 bytes: the socket takes them at once.
        (&c.s).write_all(&b).unwrap();
    }
    let backlog = 4 * 8 * u64::from(len);
    // The hogs' reads are queued and being served.
    assert!(
        wait_until(Duration::from_secs(20), || tx.get() - start > 4 << 20),
        "the four clients' reads not served{}",
        rig.logs()
    );
    let before = tx.get();
    let offset = 3 << 20;
    let got = small.read(offset, 4096).expect("the small read");
    let served = tx.get() - before;
    assert_eq!(
        got,
        rig.backing(1)[offset as usize..offset as usize + 4096].to_vec()
    );
    let total = tx.get() - start;
    eprintln!(
        "served {served} bytes between the small read's request and its reply, {total} in all"
    );
    assert!(
        served < 32 << 20 && total < backlog,
        "the target served {} MiB of the others' {} MiB backlog between the small read's \
         request and its reply ({} MiB in all so far){}",
        served >> 20,
        backlog >> 20,
        total >> 20,
        rig.logs()
    );
    drop(hogs);
}

/// Session 24 (docs/TEST-AUDIT.md "Sixth audit, the initiator's side", "NBD connection
/// flood", and "Session 24: fairness between clients"): one local user opening connections
/// and sending nothing held all [`MAX_CONNECTIONS`](aoe_nbd::MAX_CONNECTIONS) places for
/// the handshake limit, and again after it, keeping every other user out. Now a peer (a
/// Unix socket's by uid, a TCP one's by address) has at most
/// [`HANDSHAKES_PER_PEER`](aoe_nbd::HANDSHAKES_PER_PEER) connections in their handshake:
/// root's 64 silent connections get 8 greetings, and `nbdinfo` run as another user
/// (nobody) is served meanwhile. Counted, not timed. On the code before: 64 greetings
/// ("64 of root's silent connections greeted").
#[test]
fn nbd_one_peer_in_handshakes_cannot_keep_others_out() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let rig = Rig::start(Target::AoeServe);
    // Another user reaches the socket: its directory searchable, the socket writable.
    let dir = rig.sock.parent().unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o711)).unwrap();
    fs::set_permissions(&rig.sock, fs::Permissions::from_mode(0o777)).unwrap();
    let mut greeted = 0;
    let held: Vec<UnixStream> = (0..64)
        .map(|_| {
            let mut s = Client::raw(&rig.sock);
            let mut g = [0u8; 18];
            if s.read_exact(&mut g).is_ok() {
                greeted += 1;
            }
            s
        })
        .collect();
    assert!(
        greeted <= 8,
        "{greeted} of root's silent connections greeted{}",
        rig.logs()
    );
    let o = Command::new("timeout")
        .args(["20", "nbdinfo", "--list", &rig.uri("")])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("nbdinfo");
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("e1.2"),
        "nbdinfo as nobody while root holds its handshakes: {}{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        rig.logs()
    );
    drop(held);
}

/// Sixth audit (session 23): a client that connects again and again while the
/// [`MAX_CONNECTIONS`](aoe_nbd::MAX_CONNECTIONS) places are taken (here by 64 of its own
/// connections, clients of an export: since session 24 a peer has at most
/// [`HANDSHAKES_PER_PEER`](aoe_nbd::HANDSHAKES_PER_PEER) in their handshake, see
/// `nbd_one_peer_in_handshakes_cannot_keep_others_out`) has each attempt closed, and the warning is
/// written about once a second with the count of the attempts not logged. On the code
/// before: one line per attempt ("500 warnings for 500 refused connections").
#[test]
fn nbd_connection_flood_is_logged_once_a_second() {
    let rig = Rig::start(Target::AoeServe);
    let warnings = || {
        rig.initiator
            .as_ref()
            .unwrap()
            .output_so_far()
            .matches("connections open already")
            .count()
    };
    let before = warnings();
    // The 64 places, each held by a client of e1.2.
    let held: Vec<Client> = (0..64).map(|_| rig.connect("e1.2", false)).collect();
    let t0 = std::time::Instant::now();
    let mut refused = 0;
    for _ in 0..500 {
        let mut s = Client::raw(&rig.sock);
        if closed(&mut s) {
            refused += 1;
        }
    }
    let secs = t0.elapsed().as_secs() as usize;
    assert_eq!(refused, 500, "attempts over the cap not closed");
    drop(held);
    let lines = warnings() - before;
    assert!(
        (1..=secs + 2).contains(&lines),
        "{lines} warnings for 500 refused connections in {secs} s{}",
        rig.logs()
    );
}

/// Session 34: `aoe initiator --nbd-read-only` serves every NBD export read-only. AoE
/// cannot say that a target refuses writes (`aoe serve -r` and `vblade -r` abort each one
/// with an ATA error), so the initiator is told. Clients see `NBD_FLAG_READ_ONLY` (nbdinfo's
/// `is_read_only: true`, neither FUA nor write zeroes), a write or write zeroes gets
/// `NBD_EPERM` (NBD protocol, "Error values"), nbdcopy and qemu-io refuse to write, reads
/// and flushes are served, and the backing files are untouched. Before, the option did not
/// exist (the base binary refuses it: the initiator does not start), and no export was
/// ever read-only.
#[test]
fn nbd_read_only_exports_say_so_and_refuse_writes_with_eperm() {
    let rig = Rig::start_with(Target::AoeServe, &["--nbd-read-only"]);
    let before = [rig.backing(0), rig.backing(1)];
    for export in ["e1.1", "e1.1p1", "e1.2"] {
        let info = rig.client("nbdinfo", &[&rig.uri(export)]);
        for needle in [
            "is_read_only: true",
            "can_fua: false",
            "can_zero: false",
            "can_flush: true",
        ] {
            assert!(
                info.contains(needle),
                "nbdinfo {export} lacks {needle:?}:\n{info}"
            );
        }
    }
    // A raw client that ignores the flag: EPERM for writes and write zeroes (with FUA
    // too), and the connection serves on.
    const EPERM: u32 = 1;
    for structured in [false, true] {
        let mut c = rig.connect("e1.2", structured);
        assert_eq!(c.write(0, &[0x5a; 4096], 0), EPERM);
        assert_eq!(c.write(512, &[0x5a; 512], 1), EPERM, "write with FUA");
        c.send(6, 0, 3, 0, 4096, &[]);
        assert_eq!(c.reply(|_| 0), (3, EPERM, vec![]), "write zeroes");
        assert_eq!(
            c.read(0, 4096),
            Ok(before[1][..4096].to_vec()),
            "read after the refused writes{}",
            rig.logs()
        );
        c.send(3, 0, 4, 0, 0, &[]);
        assert_eq!(c.reply(|_| 0), (4, 0, vec![]), "flush");
    }
    // Real clients: nbdcopy into the export and qemu-io's write fail; qemu-io reads.
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path().join("src.img");
    fs::write(&src, vec![0xa5; (PART.1 * 512) as usize]).expect("source file");
    let o = run(Command::new("timeout")
        .args(["-k", "5", "60", "nbdcopy"])
        .arg(&src)
        .arg(rig.uri("e1.1p1")));
    assert!(
        !o.status.success(),
        "nbdcopy wrote to a read-only export:\n{}{}",
        String::from_utf8_lossy(&o.stderr),
        rig.logs()
    );
    let o = run(Command::new("timeout")
        .args([
            "-k",
            "5",
            "60",
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 4096",
        ])
        .arg(rig.uri("e1.1")));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success() || text.contains("Permission denied") || text.contains("read-only"),
        "qemu-io wrote to a read-only export ({}):\n{text}",
        o.status
    );
    let p = before[0][4096];
    let read = format!("read -P {p:#x} 4096 1");
    let out = rig.client(
        "qemu-io",
        &["-r", "-f", "raw", "-c", &read, &rig.uri("e1.1")],
    );
    assert!(
        !out.contains("fail") && !out.contains("error"),
        "qemu-io -r:\n{out}"
    );
    assert!(
        rig.backing(0) == before[0] && rig.backing(1) == before[1],
        "a backing file changed under read-only exports{}",
        rig.logs()
    );
}

/// Session 36: `--nbd-read-only=NAME,...` makes the named exports read-only and leaves the
/// others writable: a device's name covers the device and its partitions (`e1.1`,
/// `e1.1p1`), another device (`e1.2`) stays writable. The read-only ones advertise
/// `NBD_FLAG_READ_ONLY` and refuse writes with `NBD_EPERM`, as the bare flag's exports do;
/// the writable one takes a write that reaches its backing file. Base: the initiator does
/// not start (clap: `unexpected value 'e1.1' for '--nbd-read-only'`).
#[test]
fn nbd_read_only_by_name_covers_the_named_device_and_its_partitions_only() {
    let rig = Rig::start_with(Target::AoeServe, &["--nbd-read-only=e1.1"]);
    let before = [rig.backing(0), rig.backing(1)];
    for (export, read_only) in [("e1.1", true), ("e1.1p1", true), ("e1.2", false)] {
        let info = rig.client("nbdinfo", &[&rig.uri(export)]);
        let needle = format!("is_read_only: {read_only}");
        assert!(
            info.contains(&needle),
            "nbdinfo {export} lacks {needle:?}:\n{info}"
        );
    }
    const EPERM: u32 = 1;
    for export in ["e1.1", "e1.1p1"] {
        let mut c = rig.connect(export, true);
        assert_eq!(c.write(0, &[0x5a; 4096], 0), EPERM, "write to {export}");
    }
    let mut c = rig.connect("e1.2", true);
    assert_eq!(
        c.write(0, &[0x5a; 4096], 0),
        0,
        "write to e1.2{}",
        rig.logs()
    );
    c.send(3, 0, 4, 0, 0, &[]);
    assert_eq!(c.reply(|_| 0), (4, 0, vec![]), "flush");
    let after = rig.backing(1);
    assert!(
        after[..4096].iter().all(|&b| b == 0x5a) && after[4096..] == before[1][4096..],
        "e1.2's backing file does not hold the write{}",
        rig.logs()
    );
    assert!(
        rig.backing(0) == before[0],
        "e1.1's backing file changed under a read-only export{}",
        rig.logs()
    );
}

/// Session 36: a name in `--nbd-read-only=...` that no export can have (not `eX.Y` or
/// `eX.YpN` as the exports are named) is a usage error naming it, not a list that silently
/// covers nothing. Base: clap refuses any value (`unexpected value`), without the reason.
#[test]
fn nbd_read_only_refuses_a_name_that_is_no_export_name() {
    for bad in ["disk1", "1.1", "e1.1p0", "e1.1,"] {
        let o = run(Command::new(AOE)
            .args(["initiator", "--root", "/nonexistent/aoe-s36", "--nbd"])
            .arg("/nonexistent/aoe-s36.sock")
            .arg(format!("--nbd-read-only={bad}")));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{bad}: {err}");
        assert!(
            err.contains("not an NBD export name") && err.contains(bad),
            "{bad}: {err}"
        );
    }
}

/// Session 36 (docs/PERFORMANCE.md "NBD read replies without the copy into the Unix
/// socket: the ceiling", docs/TEST-AUDIT.md "Session 36: NBD read replies and the receive
/// ring's reuse"): a read's reply goes out from the slots of the initiator's receive ring
/// (`Replies::push_pieces` in aoe-nbd), and those slots go back to the kernel for the next
/// frames, as the engine's copies of given-up parts go back to its pool. Whatever a reply
/// leaves in the client's socket must be the client's own bytes, not a reference to memory
/// the initiator fills again: a reply handed over by page reference (`vmsplice` +
/// `splice`, `MSG_SPLICE_PAGES`) and released at once reads back later frames. A client
/// asks for two reads of 64 KiB and reads only the first reply's header; a second client
/// then reads the other device whole (8 MiB: 8192 frames of 1 KiB at MTU 1500, more than
/// a lap of the ring's 5,200 slots, every slot filled again) in reads of 256 KiB and checks
/// each; then the first reads its two replies, which must equal the backing file. On
/// session 36's prototype, which splices every reply and releases at once, it failed in
/// 3 of 3 runs ("the second client's read at 0 differs from the backing file", once at
/// 1572864); on the session's base it passes.
#[test]
fn nbd_read_replies_left_in_the_socket_survive_the_rings_next_lap() {
    let rig = Rig::start(Target::AoeServe);
    let part: u32 = 64 << 10;
    let mut lag = rig.connect("e1.2", false);
    let mut tx = TxBytes::new(&rig.target_ns, &rig.target_if);
    let start = tx.get();
    for cookie in 0..2u64 {
        lag.send(0, 0, cookie, cookie * u64::from(part), part, &[]);
    }
    // Both replies are answered before the ring's next lap begins: the target has sent
    // their 128 KiB.
    assert!(
        wait_until(Duration::from_secs(20), || tx.get() - start
            >= 2 * u64::from(part)),
        "the lagging client's reads not served{}",
        rig.logs()
    );
    // The first reply's header, read; its 64 KiB of data stay in the socket.
    let mut head = [0u8; 16];
    lag.s
        .read_exact(&mut head)
        .expect("the first reply's header");
    assert_eq!(head[..4], 0x6744_6698u32.to_be_bytes(), "a simple reply");
    assert_eq!(head[4..8], [0; 4], "the first read failed{}", rig.logs());
    let first = u64::from_be_bytes(head[8..16].try_into().unwrap());
    // A lap of the ring and more, read and checked by another client.
    let whole = rig.backing(0);
    let mut other = rig.connect("e1.1", false);
    let step = 256 << 10;
    let mut off = 0;
    while off < whole.len() {
        let len = step.min(whole.len() - off);
        let got = other
            .read(off as u64, len as u32)
            .expect("the other device's read");
        assert!(
            got == whole[off..off + len],
            "the second client's read at {off} differs from the backing file{}",
            rig.logs()
        );
        off += len;
    }
    let want = rig.backing(1);
    let mut data = vec![0u8; part as usize];
    lag.s.read_exact(&mut data).expect("the first reply's data");
    let mut replies = vec![(first, data)];
    let (cookie, err, data) = lag.reply(|_| part as usize);
    assert_eq!(err, 0, "the lagging client's read {cookie} failed");
    replies.push((cookie, data));
    for (cookie, data) in replies {
        let at = (cookie * u64::from(part)) as usize;
        let bad = data
            .iter()
            .zip(&want[at..at + part as usize])
            .position(|(a, b)| a != b);
        assert!(
            bad.is_none(),
            "the lagging client's reply {cookie} differs from the backing file at byte {} \
             of {part}: its bytes were taken from the receive ring after the ring's next lap \
             filled it again{}",
            bad.unwrap_or(0),
            rig.logs()
        );
    }
}
