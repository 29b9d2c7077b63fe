//! `aoe bench`: throughput of AoE targets measured in one run, on a private topology.
//!
//! It builds two network namespaces joined by a veth pair (nothing touches the host's
//! interfaces), puts a backing file on tmpfs, and for each target in turn (`aoe serve` by
//! default, and `vblade` as the reference) starts it in one namespace and drives it from the
//! other with a windowed load generator: `--window` requests in flight, each as large as the
//! MTU allows, retransmitted with a fresh tag after 50 ms. It reports MB/s (10^6 bytes),
//! requests per second, the target's CPU seconds per GB, and each target's ratio to vblade.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aoe_sys::{PacketSocket, PollFd, RecvBatch};
use aoe_wire::{
    max_sectors_for_mtu, AtaFlags, AtaRepr, Body, Command as AoeCommand, ConfigCommand, ConfigRepr,
    HeaderRepr, MacAddr, Message, Tag, TargetAddr,
};
use clap::{Args, ValueEnum};

/// Measure target throughput against vblade in one run (private namespaces, tmpfs file).
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// MTU of the veth pair.
    #[arg(long, default_value_t = 9000)]
    mtu: u32,
    /// Backing file size in MiB (on /dev/shm).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Pattern::SeqRead)]
    pattern: Pattern,
    /// Sectors per request (default: as many as the MTU allows).
    #[arg(long)]
    sectors: Option<u8>,
    /// Targets to measure, in order: `aoe`, `vblade`, or a command template with {shelf}
    /// {slot} {netif} {file}.
    #[arg(long, value_delimiter = ',', default_value = "vblade,aoe")]
    targets: Vec<String>,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// What the generator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Pattern {
    /// Sequential reads.
    SeqRead,
    /// Random reads, aligned to the request size.
    RandRead,
    /// Sequential writes.
    SeqWrite,
}

struct Topology {
    t: String,
    i: String,
    t_if: String,
    i_if: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let st = Command::new("ip")
        .args(args)
        .status()
        .context("cannot run ip")?;
    if !st.success() {
        bail!("ip {} failed", args.join(" "));
    }
    Ok(())
}

impl Topology {
    fn new(mtu: u32) -> Result<Topology> {
        let id = std::process::id();
        let t = Topology {
            t: format!("aoebenchT{id}"),
            i: format!("aoebenchI{id}"),
            t_if: format!("bT{id}"),
            i_if: format!("bI{id}"),
        };
        ip(&["netns", "add", &t.t])?;
        ip(&["netns", "add", &t.i])?;
        let mtu = mtu.to_string();
        ip(&[
            "link", "add", &t.t_if, "netns", &t.t, "mtu", &mtu, "type", "veth", "peer", "name",
            &t.i_if, "netns", &t.i, "mtu", &mtu,
        ])?;
        ip(&["-n", &t.t, "link", "set", &t.t_if, "up"])?;
        ip(&["-n", &t.i, "link", "set", &t.i_if, "up"])?;
        Ok(t)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.t]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.i]).status();
    }
}

struct Target {
    child: Child,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

struct Measure {
    mbps: f64,
    iops: f64,
    cpu_per_gb: f64,
    retransmits: u64,
}

/// Runs `aoe bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    if a.window == 0 || a.seconds == 0 || a.runs == 0 {
        bail!("--window, --seconds and --runs must be at least 1");
    }
    let file = PathBuf::from(format!("/dev/shm/aoe-bench-{}.img", std::process::id()));
    let f = std::fs::File::create(&file).context("cannot create the backing file on /dev/shm")?;
    f.set_len(a.size_mib << 20)?;
    // Fill it, so reads come from memory pages rather than holes.
    {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(&f);
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..a.size_mib {
            w.write_all(&chunk)?;
        }
    }
    let _cleanup = scopeguard(file.clone());
    let topo = Topology::new(a.mtu)?;
    let me = std::env::current_exe()?;
    let mut results: Vec<(String, Measure)> = Vec::new();
    for (n, spec) in a.targets.iter().enumerate() {
        let shelf = 1u16;
        let slot = n as u8 + 1;
        let cmd: Vec<String> = match spec.as_str() {
            "aoe" => vec![
                me.display().to_string(),
                "serve".into(),
                "{shelf}".into(),
                "{slot}".into(),
                "{netif}".into(),
                "{file}".into(),
            ],
            "vblade" => vec![
                "vblade".into(),
                "{shelf}".into(),
                "{slot}".into(),
                "{netif}".into(),
                "{file}".into(),
            ],
            other => other.split_whitespace().map(str::to_string).collect(),
        };
        let cmd: Vec<String> = cmd
            .iter()
            .map(|c| {
                c.replace("{shelf}", &shelf.to_string())
                    .replace("{slot}", &slot.to_string())
                    .replace("{netif}", &topo.t_if)
                    .replace("{file}", &file.display().to_string())
            })
            .collect();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", topo.t))
            .args(&cmd)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", cmd.join(" ")))?;
        let target = Target { child };
        let mut runs = Vec::new();
        for _ in 0..a.runs {
            runs.push(measure(
                &a,
                &topo,
                TargetAddr::new(shelf, slot),
                target.child.id(),
            )?);
        }
        drop(target);
        runs.sort_by(|x, y| x.mbps.total_cmp(&y.mbps));
        let m = runs.swap_remove(runs.len() / 2);
        results.push((spec.clone(), m));
    }
    let base = results
        .iter()
        .find(|(n, _)| n == "vblade")
        .map(|(_, m)| m.mbps);
    println!(
        "pattern {:?}, MTU {}, window {}, {} s x {} runs (median), {} MiB file on tmpfs",
        a.pattern, a.mtu, a.window, a.seconds, a.runs, a.size_mib
    );
    println!(
        "{:<10} {:>10} {:>10} {:>12} {:>10} {:>12}",
        "target", "MB/s", "IOPS", "CPU-s/GB", "rexmit", "vs vblade"
    );
    for (name, m) in &results {
        let ratio = base
            .map(|b| format!("{:.2}x", m.mbps / b))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<10} {:>10.1} {:>10.0} {:>12.2} {:>10} {:>12}",
            name, m.mbps, m.iops, m.cpu_per_gb, m.retransmits, ratio
        );
    }
    Ok(())
}

struct FileGuard(PathBuf);

impl Drop for FileGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn scopeguard(p: PathBuf) -> FileGuard {
    FileGuard(p)
}

fn measure(a: &BenchArgs, topo: &Topology, addr: TargetAddr, pid: u32) -> Result<Measure> {
    let ifname = topo.i_if.clone();
    let sock = aoe_sys::run_in_netns(
        &PathBuf::from(format!("/run/netns/{}", topo.i)),
        move || PacketSocket::open(&ifname),
    )??;
    sock.set_recv_buffer(32 << 20)?;
    let _ = sock.set_qdisc_bypass(true);
    let me = MacAddr(sock.info().mac);
    let mtu = sock.info().mtu;
    let mut tag = 0x4000_0000u32;
    // Find the target and how many sectors it takes per request.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mac, scnt) = loop {
        tag += 1;
        let h = HeaderRepr::request(
            MacAddr::BROADCAST,
            me,
            addr,
            AoeCommand::QueryConfig,
            Tag(tag),
        );
        let f = Message {
            header: h,
            body: Body::Config(ConfigRepr::request(ConfigCommand::Read, b"")),
        }
        .to_vec()?;
        sock.send(&f)?;
        std::thread::sleep(Duration::from_millis(50));
        let mut buf = vec![0u8; 9216];
        let mut found = None;
        while let Some(meta) = sock.recv(&mut buf)? {
            if let Ok(m) = Message::parse(&buf[..meta.len]) {
                if let (true, Body::Config(c)) =
                    (m.header.response && m.header.tag.0 == tag, m.body)
                {
                    found = Some((m.header.src, c.sector_count));
                }
            }
        }
        if let Some(x) = found {
            break x;
        }
        if Instant::now() > deadline {
            bail!("target {addr} did not answer");
        }
    };
    let per = a
        .sectors
        .unwrap_or(max_sectors_for_mtu(mtu).min(scnt))
        .max(1);
    let total_sectors = (a.size_mib << 20) / 512;
    let slots = total_sectors / per as u64;
    let write_data = vec![0xa5u8; per as usize * 512];
    let mut next_lba = 0u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut lba_for = |next: &mut u64| -> u64 {
        match a.pattern {
            Pattern::RandRead => {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng % slots) * per as u64
            }
            _ => {
                let l = *next;
                *next = (*next + per as u64) % (slots * per as u64);
                l
            }
        }
    };
    let mut outstanding: HashMap<u32, (u64, Instant)> = HashMap::new();
    let build = |tag: u32, lba: u64| -> Vec<u8> {
        let write = a.pattern == Pattern::SeqWrite;
        let h = HeaderRepr::request(mac, me, addr, AoeCommand::Ata, Tag(tag));
        Message {
            header: h,
            body: Body::Ata(AtaRepr {
                aflags: if write {
                    AtaFlags::EXTENDED | AtaFlags::WRITE
                } else {
                    AtaFlags::EXTENDED
                },
                err_feature: 0,
                sector_count: per,
                cmd_status: if write { 0x34 } else { 0x24 },
                lba,
                data: if write { &write_data } else { &[] },
            }),
        }
        .to_vec()
        .expect("request fits")
    };
    let mut batch = RecvBatch::new(64, aoe_sys::frame_capacity(mtu));
    let cpu0 = cpu_seconds(pid);
    let start = Instant::now();
    let end = start + Duration::from_secs(a.seconds);
    let mut done = 0u64;
    let mut retransmits = 0u64;
    let mut to_send: Vec<Vec<u8>> = Vec::new();
    while Instant::now() < end {
        while outstanding.len() + to_send.len() < a.window {
            tag = tag.wrapping_add(1) & 0x7fff_ffff;
            let lba = lba_for(&mut next_lba);
            outstanding.insert(tag, (lba, Instant::now()));
            to_send.push(build(tag, lba));
        }
        if !to_send.is_empty() {
            let refs: Vec<&[u8]> = to_send.iter().map(|f| &f[..]).collect();
            let n = sock.send_batch(&refs).unwrap_or(0);
            to_send.drain(..n);
        }
        let mut fds = [PollFd::new(sock.as_raw_fd())];
        aoe_sys::poll(&mut fds, Some(Duration::from_millis(5)))?;
        let n = sock.recv_batch(&mut batch)?;
        for k in 0..n {
            let f = batch.frame(k);
            if f.len() < 24 {
                continue;
            }
            let t = u32::from_be_bytes([f[20], f[21], f[22], f[23]]);
            if f[14] & 0x08 != 0 && outstanding.remove(&t).is_some() {
                done += 1;
            }
        }
        // Retransmit what waited too long, with a fresh tag.
        let now = Instant::now();
        let late: Vec<u32> = outstanding
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) > Duration::from_millis(50))
            .map(|(t, _)| *t)
            .collect();
        for t in late {
            if let Some((lba, _)) = outstanding.remove(&t) {
                tag = tag.wrapping_add(1) & 0x7fff_ffff;
                outstanding.insert(tag, (lba, now));
                to_send.push(build(tag, lba));
                retransmits += 1;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    let bytes = done as f64 * per as f64 * 512.0;
    // Let the target drain what is still in flight before the next run.
    std::thread::sleep(Duration::from_millis(200));
    while sock.recv_batch(&mut batch)? > 0 {}
    Ok(Measure {
        mbps: bytes / secs / 1e6,
        iops: done as f64 / secs,
        cpu_per_gb: if bytes > 0.0 {
            cpu / (bytes / 1e9)
        } else {
            0.0
        },
        retransmits,
    })
}
