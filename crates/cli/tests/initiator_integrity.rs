//! Data-integrity regressions of `aoe initiator` (issue 9), against `aoe serve` on a veth
//! link between two namespaces the tests create (see `common`):
//!
//! - concurrent unaligned writes to different bytes of the same sectors, through the
//!   device file, a partition file and NBD at once, all land (the sector range locks);
//! - SIGTERM while the device is in use (ext4 mounted on the `--loop` device) does not
//!   stop the daemon: it keeps serving and exits once the file system is unmounted, or at
//!   once on SIGQUIT;
//! - a second `aoe initiator` on a ROOT that is already mounted refuses to start.

mod common;
use common::*;

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aoe_testkit::wait_until;

// ------------------------------------------------------------------------------------------
// Concurrent unaligned writes

/// First sector of partition 1 in the backing file's MBR.
const PART_START: u64 = 2048;
/// Sectors of partition 1.
const PART_SECTORS: u64 = 8192;
/// The bytes the writers share: 64 sectors from 3 sectors into partition 1.
const REGION: u64 = (PART_START + 3) * 512;
const REGION_LEN: usize = 64 * 512;

/// A backing file of SECTORS holding `pattern(1, ..)` with an MBR at sector 0 whose
/// partition 1 is at [PART_START, PART_START + PART_SECTORS).
fn backing_with_partition(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut b = pattern(1, (SECTORS * 512) as usize);
    b[..512].fill(0);
    let e = &mut b[446..462];
    e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[4] = 0x83;
    e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[8..12].copy_from_slice(&(PART_START as u32).to_le_bytes());
    e[12..16].copy_from_slice(&(PART_SECTORS as u32).to_le_bytes());
    b[510] = 0x55;
    b[511] = 0xaa;
    let f = dir.join("parted.img");
    fs::write(&f, &b).unwrap();
    (f, b)
}

/// The region cut into pieces of 1 to 37 bytes (so almost none is aligned), dealt to
/// `writers` writers in turn: (offset in the region, length, writer).
fn pieces(writers: usize) -> Vec<(usize, usize, usize)> {
    let lens = pattern(77, REGION_LEN);
    let mut v = Vec::new();
    let mut off = 0;
    let mut i = 0;
    while off < REGION_LEN {
        let len = (1 + lens[i] as usize % 37).min(REGION_LEN - off);
        v.push((off, len, i % writers));
        off += len;
        i += 1;
    }
    v
}

/// A minimal NBD client on a Unix socket: fixed newstyle handshake with `NBD_OPT_GO`, then
/// simple replies only.
fn nbd_connect(sock: &Path, export: &str) -> UnixStream {
    let mut s = UnixStream::connect(sock).expect("connect to the NBD socket");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    let mut o = b"IHAVEOPT".to_vec();
    o.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    o.extend_from_slice(&(d.len() as u32).to_be_bytes());
    o.extend_from_slice(&d);
    s.write_all(&o).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("option reply");
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).unwrap();
        assert!(kind < 1 << 31, "NBD_OPT_GO {export}: error reply {kind:#x}");
        if kind == 1 {
            return s;
        }
    }
}

/// Sends every write (`NBD_CMD_WRITE`, cookie = index) from one thread while this one
/// reads the replies, so the server has up to its cap of them in flight at once; returns
/// (cookie, error) of those that failed.
fn nbd_pipelined_writes(s: UnixStream, writes: Vec<(u64, Vec<u8>)>) -> Vec<(u64, u32)> {
    let n = writes.len();
    let mut w = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut out = Vec::new();
        for (i, (off, data)) in writes.iter().enumerate() {
            out.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            out.extend_from_slice(&0u16.to_be_bytes());
            out.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
            out.extend_from_slice(&(i as u64).to_be_bytes());
            out.extend_from_slice(&off.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
        }
        w.write_all(&out).unwrap();
    });
    let mut r = s;
    let mut errs = Vec::new();
    for _ in 0..n {
        let mut h = [0u8; 16];
        r.read_exact(&mut h).expect("NBD write reply");
        assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes(), "simple reply magic");
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        if err != 0 {
            errs.push((u64::from_be_bytes(h[8..16].try_into().unwrap()), err));
        }
    }
    sender.join().unwrap();
    // NBD_CMD_DISC
    let mut d = 0x2560_9513u32.to_be_bytes().to_vec();
    d.extend_from_slice(&[0, 0, 0, 2]);
    d.extend_from_slice(&[0u8; 20]);
    let _ = r.write_all(&d);
    errs
}

/// Four writers at once on the same 64 sectors, each owning every fourth piece of 1 to 37
/// bytes (so neighbouring pieces of one sector belong to different writers): the whole
/// device file and the partition file through FUSE (pwrite, one piece at a time), and the
/// device and partition exports through NBD (all pieces in flight at once). Every byte must
/// end up as its owner wrote it, in the backing file and read back through the device.
/// Before the sector range locks, the read-modify-writes of one sector overwrote each
/// other's bytes with stale ones.
#[test]
fn concurrent_unaligned_writes_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let (file, orig) = backing_with_partition(dir.path());
    let mut rig = Rig::start_with(Target::AoeServe, 1500, InitOpts::default(), Some(file), &[]);
    let sock = rig.dir.path().join("nbd.sock");
    rig.restart_initiator(&["--nbd", sock.to_str().unwrap()]);
    let part = rig.root.join(format!("{DEV}p1"));
    assert!(
        wait_until(Duration::from_secs(10), || part.exists() && sock.exists()),
        "no {} or NBD socket{}",
        part.display(),
        rig.logs()
    );

    const WRITERS: usize = 4;
    let new: Vec<Vec<u8>> = (0..WRITERS)
        .map(|w| pattern(1000 + w as u64, REGION_LEN))
        .collect();
    let pieces = pieces(WRITERS);
    let mut want = orig[REGION as usize..][..REGION_LEN].to_vec();
    for &(off, len, w) in &pieces {
        want[off..off + len].copy_from_slice(&new[w][off..off + len]);
    }
    let part_off = REGION - PART_START * 512;
    // Writer w: its pieces as (offset in its file or export, bytes).
    let mine = |w: usize, base: u64| -> Vec<(u64, Vec<u8>)> {
        pieces
            .iter()
            .filter(|p| p.2 == w)
            .map(|&(off, len, _)| (base + off as u64, new[w][off..off + len].to_vec()))
            .collect()
    };
    let t0 = Instant::now();
    let mut fuse = Vec::new();
    for (w, path, base) in [(0, rig.dev(), REGION), (1, part.clone(), part_off)] {
        let writes = mine(w, base);
        fuse.push(std::thread::spawn(move || {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            for (off, data) in writes {
                f.write_all_at(&data, off)
                    .unwrap_or_else(|e| panic!("pwrite {} at {off}: {e}", path.display()));
            }
        }));
    }
    let mut nbd = Vec::new();
    for (w, export, base) in [
        (2, DEV.to_string(), REGION),
        (3, format!("{DEV}p1"), part_off),
    ] {
        let writes = mine(w, base);
        let s = nbd_connect(&sock, &export);
        nbd.push(std::thread::spawn(move || nbd_pipelined_writes(s, writes)));
    }
    for t in fuse {
        t.join().expect("FUSE writer");
    }
    for t in nbd {
        let errs = t.join().expect("NBD writer");
        assert!(errs.is_empty(), "NBD writes failed: {errs:?}");
    }
    eprintln!(
        "{} pieces by {WRITERS} writers in {:?}",
        pieces.len(),
        t0.elapsed()
    );

    let check = |got: &[u8], what: &str| {
        let bad: Vec<usize> = (0..REGION_LEN).filter(|&i| got[i] != want[i]).collect();
        assert!(
            bad.is_empty(),
            "{what}: {} of {REGION_LEN} bytes lost, first at region offset {} (piece {:?})",
            bad.len(),
            bad[0],
            pieces.iter().find(|p| p.0 <= bad[0] && bad[0] < p.0 + p.1)
        );
    };
    let f = fs::File::open(&rig.file).unwrap();
    let mut got = vec![0u8; REGION_LEN];
    f.read_exact_at(&mut got, REGION).unwrap();
    check(&got, "backing file");
    check(
        &read_at(&rig.dev(), REGION, REGION_LEN).unwrap(),
        "read back through the device",
    );
    // Nothing outside the region changed.
    let all = fs::read(&rig.file).unwrap();
    assert!(
        all[..REGION as usize] == orig[..REGION as usize],
        "bytes before the region changed"
    );
    assert!(
        all[REGION as usize + REGION_LEN..] == orig[REGION as usize + REGION_LEN..],
        "bytes after the region changed"
    );
    rig.finish();
}
