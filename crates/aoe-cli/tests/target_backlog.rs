//! `aoe serve` on a send queue that stays full (issue 9, item 10, target half): the replies
//! wait in the interface's bounded backlog, the loop keeps receiving, and once the socket
//! takes frames again every reply goes out exactly once, nothing dropped.
//!
//! Why a shim: the target sets `PACKET_QDISC_BYPASS`, and on a veth the kernel releases a
//! frame's send-buffer charge as soon as it is forwarded, so neither a qdisc nor a small
//! `SO_SNDBUF` makes `sendmmsg` fail with `EAGAIN`. The test builds a tiny `LD_PRELOAD` shim
//! (C, with `cc`) that wraps `sendmmsg`, `send` and `sendto` (crates/aoe-sys/src/packet.rs uses
//! `sendmmsg` for replies and `send` for the probe) and returns -1/`EAGAIN` while a gate
//! file named by `AOE_SHIM_GATE` exists, as a full socket buffer or device queue would
//! (packet(7), send(2)). It records each refused call in `AOE_SHIM_COUNTS`: calls, frames,
//! and the largest batch, so the test knows the daemon really went through the shim.
//!
//! What it pins: the daemon used to sleep 1 ms per try, up to 200 tries, when the queue was
//! full, then dropped the replies ("send queue full for 200 ms; replies dropped"); the
//! initiator had to retransmit (the Linux driver's `rexmit_timer`, AoEr11 section 2: AoE has
//! no other recovery). Now a refused reply is kept and sent when poll() reports POLLOUT.
//! Here: 32 READs are answered while sends are refused; the 32 replies must all be held in
//! one batch, a Query Config sent meanwhile must join that batch (so the loop received it
//! while holding them), and once sends are allowed every request is answered exactly once,
//! with the right data, without the client retransmitting, and nothing logs "dropped".
//!
//! Needs root; all frames stay on a veth pair between two namespaces the test creates.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use aoe_sys::PacketSocket;
use aoe_testkit::aoeclient::{AoeClient, Reply, ReplyBody, Request};
use aoe_testkit::{require_root, wait_until, Netns, NsChild, VethPair};
use aoe_wire::{max_sectors_for_mtu, Message, TargetAddr, SECTOR_SIZE};

const AOE: &str = env!("CARGO_BIN_EXE_aoe");
const MTU: u32 = 1500;
const ADDR: TargetAddr = TargetAddr::new(2, 7);
/// READ requests outstanding while sends are refused: within the default buffer count
/// (128) and within one `sendmmsg` chunk (64), so the held replies form one batch.
const READS: usize = 32;
/// The shortest time sends stay refused: longer than the old daemon's 200 tries of 1 ms.
const REFUSAL: Duration = Duration::from_millis(400);
/// Export size in sectors.
const SECTORS: u64 = 256;

/// The `LD_PRELOAD` shim. While the file `$AOE_SHIM_GATE` exists, `sendmmsg`, `send` and
/// `sendto` fail with `EAGAIN` without calling the kernel. Each refused call updates
/// `$AOE_SHIM_COUNTS` ("calls frames largest_batch") by write-and-rename, so a reader never
/// sees a torn line; to keep the busy retry path cheap it rewrites the file only when the
/// largest batch grows, every 256th refused call, and at the first call let through after
/// refusals (the final totals).
const SHIM_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static unsigned long calls, frames, largest;
static int unreported;

static void report(void) {
    const char *path = getenv("AOE_SHIM_COUNTS");
    char tmp[4096], line[96];
    if (path == NULL || snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
        return;
    int n = snprintf(line, sizeof line, "%lu %lu %lu\n", calls, frames, largest);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    int ok = write(fd, line, (size_t)n) == n;
    close(fd);
    if (ok && rename(tmp, path) == 0)
        unreported = 0;
}

/* True (and counted) when the call is to be refused. Keeps errno as it was. */
static int refuse(unsigned long batch) {
    const char *gate = getenv("AOE_SHIM_GATE");
    struct stat st;
    int saved = errno;
    int shut = gate != NULL && stat(gate, &st) == 0;
    if (!shut) {
        if (unreported)
            report();
        errno = saved;
        return 0;
    }
    calls++;
    frames += batch;
    unreported = 1;
    if (batch > largest) {
        largest = batch;
        report();
    } else if (calls % 256 == 1) {
        report();
    }
    errno = EAGAIN;
    return 1;
}

int sendmmsg(int fd, struct mmsghdr *msgs, unsigned int vlen, int flags) {
    static int (*real)(int, struct mmsghdr *, unsigned int, int);
    if (refuse(vlen))
        return -1;
    if (real == NULL)
        real = (int (*)(int, struct mmsghdr *, unsigned int, int))dlsym(RTLD_NEXT, "sendmmsg");
    return real(fd, msgs, vlen, flags);
}

ssize_t send(int fd, const void *buf, size_t len, int flags) {
    static ssize_t (*real)(int, const void *, size_t, int);
    if (refuse(1))
        return -1;
    if (real == NULL)
        real = (ssize_t (*)(int, const void *, size_t, int))dlsym(RTLD_NEXT, "send");
    return real(fd, buf, len, flags);
}

ssize_t sendto(int fd, const void *buf, size_t len, int flags, __CONST_SOCKADDR_ARG addr,
               socklen_t alen) {
    static ssize_t (*real)(int, const void *, size_t, int, __CONST_SOCKADDR_ARG, socklen_t);
    if (refuse(1))
        return -1;
    if (real == NULL)
        real = (ssize_t (*)(int, const void *, size_t, int, __CONST_SOCKADDR_ARG, socklen_t))
            dlsym(RTLD_NEXT, "sendto");
    return real(fd, buf, len, flags, addr, alen);
}
"#;

/// Compiles the shim into `dir` and returns the path of the shared object.
fn build_shim(dir: &Path) -> PathBuf {
    let cc = Command::new("cc").arg("--version").output();
    assert!(
        cc.is_ok_and(|o| o.status.success()),
        "cc not found: this test builds an LD_PRELOAD shim with it (install the Debian package gcc)"
    );
    let src = dir.join("shim.c");
    let so = dir.join("shim.so");
    std::fs::write(&src, SHIM_C).unwrap();
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-Wall", "-Werror", "-o"])
        .arg(&so)
        .arg(&src)
        .arg("-ldl")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cc could not build the shim: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    so
}

/// What the shim refused so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Refused {
    /// Send calls refused.
    calls: u64,
    /// Frames in those calls.
    frames: u64,
    /// The most frames one refused call carried.
    largest_batch: u64,
}

/// Reads the shim's counts (all zero before its first refusal).
fn refused(path: &Path) -> Refused {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Refused::default();
    };
    let n: Vec<u64> = text
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    assert_eq!(n.len(), 3, "shim counts {text:?}");
    Refused {
        calls: n[0],
        frames: n[1],
        largest_batch: n[2],
    }
}

/// Bytes a simple generator makes for the export, so every sector differs.
fn contents(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Every AoE response with one of `tags` that the sniffer saw, counted per tag.
fn responses_seen(sniffer: &PacketSocket, tags: &[u32]) -> HashMap<u32, usize> {
    let mut seen: HashMap<u32, usize> = tags.iter().map(|t| (*t, 0)).collect();
    let mut buf = vec![0u8; 9100];
    while let Some(meta) = sniffer.recv(&mut buf).unwrap() {
        let Ok(m) = Message::parse(&buf[..meta.len.min(buf.len())]) else {
            continue;
        };
        if m.header.response {
            if let Some(n) = seen.get_mut(&m.header.tag.0) {
                *n += 1;
            }
        }
    }
    seen
}

#[test]
fn replies_wait_in_the_backlog_while_sends_are_refused() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let shim = build_shim(dir.path());
    let gate = dir.path().join("gate");
    let counts = dir.path().join("counts");
    let file = dir.path().join("export.img");
    let image = contents(SECTORS as usize * SECTOR_SIZE);
    std::fs::File::create(&file)
        .unwrap()
        .write_all_at(&image, 0)
        .unwrap();

    let t = Netns::new("aoeblt").unwrap();
    let i = Netns::new("aoebli").unwrap();
    let veth = VethPair::new(&t, &i, MTU).unwrap();
    let mut cmd = Command::new(AOE);
    // The shim counts sendmmsg batches, so this pins the mmsg path's backlog; with the
    // default `--io rings` replies wait in the transmit ring and leave with one send() kick.
    cmd.args(["serve", "--io", "mmsg", "2", "7", veth.a_name()])
        .arg(&file)
        .env("LD_PRELOAD", &shim)
        .env("AOE_SHIM_GATE", &gate)
        .env("AOE_SHIM_COUNTS", &counts);
    let mut target = NsChild::spawn(&t, cmd).unwrap();

    // A second socket on the client's end sees every reply the target sends, duplicates too.
    let name = veth.b_name().to_string();
    let sniffer = aoe_sys::run_in_netns(&i.path(), move || PacketSocket::open(&name))
        .unwrap()
        .unwrap();
    sniffer.set_recv_buffer(16 << 20).unwrap();
    let mut client = AoeClient::open(&i, veth.b_name(), ADDR).unwrap();
    let found = client.discover(Duration::from_secs(10));
    assert!(
        found.is_ok(),
        "aoe serve never answered Query Config: {}",
        target.output_so_far()
    );
    assert_eq!(
        refused(&counts),
        Refused::default(),
        "the shim refused sends before the gate was shut"
    );
    client.set_window(READS + 1);
    // Far beyond the test's own length: any retransmission is a failure, not a recovery.
    client.set_retransmit_timeout(Duration::from_secs(60));
    let retransmits_before = client.retransmits();

    // Shut the gate: every send of the target fails with EAGAIN from now on.
    std::fs::write(&gate, b"").unwrap();
    let shut_at = Instant::now();
    let count = max_sectors_for_mtu(MTU).min(2);
    let mut reads: HashMap<u32, u64> = HashMap::new();
    for k in 0..READS as u64 {
        let lba = k * u64::from(count);
        let tag = client.send(&Request::Read { lba, count }).unwrap();
        reads.insert(tag.0, lba);
    }
    // All 32 replies held, offered to the socket in one batch.
    let held = wait_until(Duration::from_secs(20), || {
        refused(&counts).largest_batch >= READS as u64
    });
    let after_reads = refused(&counts);
    // A request sent while they are held: its reply joins the batch only if the loop went on
    // receiving instead of sleeping on the full queue.
    let query = client.send(&Request::QueryConfig).unwrap();
    let kept_receiving = held
        && wait_until(Duration::from_secs(20), || {
            refused(&counts).largest_batch > READS as u64
        });
    std::thread::sleep(REFUSAL.saturating_sub(shut_at.elapsed()));
    let early = client.poll(Duration::ZERO).unwrap();
    let shut_for = shut_at.elapsed();
    std::fs::remove_file(&gate).unwrap();
    let opened_at = Instant::now();

    // Sends allowed again: every reply should come without a retransmission.
    let mut replies: HashMap<u32, Reply> = early.into_iter().map(|r| (r.tag.0, r)).collect();
    let early_replies = replies.len();
    let deadline = opened_at + Duration::from_secs(20);
    while replies.len() < READS + 1 && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        for r in client.poll(left).unwrap() {
            replies.insert(r.tag.0, r);
        }
    }
    let all_in = opened_at.elapsed();
    let retransmits = client.retransmits() - retransmits_before;
    // Once the daemon has exited, everything it sent is in the sniffer's queue.
    let stopped = target.stop();
    let log = target.output_so_far();
    let mut tags: Vec<u32> = reads.keys().copied().collect();
    tags.push(query.0);
    let seen = responses_seen(&sniffer, &tags);
    let total = refused(&counts);
    println!(
        "sends refused for {shut_for:?}: {} calls, {} frames, largest batch {} (after the \
         reads: {}); {} of {} replies within {all_in:?} of reopening, {early_replies} while \
         refused, {retransmits} retransmits",
        total.calls,
        total.frames,
        total.largest_batch,
        after_reads.largest_batch,
        replies.len(),
        READS + 1
    );

    assert!(stopped.is_ok(), "stopping aoe serve: {stopped:?}");
    assert!(
        total.calls > 0,
        "the shim refused nothing: the daemon did not send through it (LD_PRELOAD not \
         honoured?): {log}"
    );
    assert_eq!(
        early_replies, 0,
        "replies got through while sends were refused"
    );
    assert!(
        held,
        "the {READS} read replies were never held together (largest refused batch {}): \
         replies were dropped or sent one by one: {log}",
        after_reads.largest_batch
    );
    assert!(
        kept_receiving,
        "the Query Config sent while replies were held did not join them (largest refused \
         batch {}): the loop stopped receiving while the send queue was full: {log}",
        total.largest_batch
    );
    assert!(
        !log.contains("dropped"),
        "aoe serve dropped frames while sends were refused: {log}"
    );
    assert_eq!(
        retransmits, 0,
        "the client had to retransmit: replies were lost: {log}"
    );
    assert_eq!(
        replies.len(),
        READS + 1,
        "{} of {} requests answered within 20 s of sends being allowed again: {log}",
        replies.len(),
        READS + 1
    );
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "replies not seen exactly once (tag, times): {twice:?}"
    );
    for (tag, lba) in &reads {
        let r = &replies[tag];
        assert!(r.is_ok(), "READ at {lba} failed: {r:?}");
        let at = *lba as usize * SECTOR_SIZE;
        let want = &image[at..at + usize::from(count) * SECTOR_SIZE];
        assert!(r.data() == want, "READ at {lba} returned the wrong data");
    }
    assert!(
        matches!(replies[&query.0].body, ReplyBody::Config { .. }),
        "Query Config answered with {:?}",
        replies[&query.0]
    );
}
