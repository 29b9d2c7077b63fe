//! A raw AoE client for tests: it speaks AoEr11 frames on an `AF_PACKET` socket opened on a
//! veth end inside a [`Netns`], so a test knows exactly which request was sent and which was
//! acknowledged, something a full initiator hides.
//!
//! What it does: ATA READ SECTORS EXT, WRITE SECTORS EXT and FLUSH CACHE EXT, and Query
//! Config, built with `aoe_wire`'s `Repr` types; each request gets a fresh tag and replies
//! are matched by tag (and source MAC once the target is known), as the Linux driver matches
//! them (`aoecmd_ata_rsp`: `getframe(d, be32_to_cpu(hin->tag))`). At most
//! [`window`](AoeClient::window) requests are outstanding (the target's advertised buffer
//! count bounds it, AoEr11 section 3.2), and one without a reply within the retransmit
//! timeout is sent again, same tag and bytes, as the driver's `rexmit_timer` does.
//!
//! What it does not do: no congestion control, no MTU discovery, no LBA28 commands, no
//! splitting of I/O into frames (a request must fit one frame: the caller picks sector
//! counts the MTU allows, `aoe_wire::max_sectors_for_mtu`), and no failover between
//! interfaces or targets.
//!
//! Raw frames: for tests of how a target answers what a well-behaved client never sends
//! (any [`Body`], any shelf.slot, bursts past the buffer count, MAC masks, reservations),
//! [`raw_frame`](AoeClient::raw_frame), [`send_raw`](AoeClient::send_raw) and
//! [`collect_raw`](AoeClient::collect_raw) build, send and match frames by tag, with no
//! window and no retransmission; the replies come back as bytes. Raw frames and the requests
//! above are not mixed on one client: `collect_raw` drops every reply but those it waits for.
//!
//! Note on retransmission: a retransmitted WRITE may reach the target twice. A caller that
//! sends another write to the same sectors after the first one's reply must allow for the
//! late copy (see [`AoeClient::retransmitted`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use aoe_sys::{PacketSocket, PollFd};
use aoe_wire::ata::status;
use aoe_wire::{
    AtaCommand, AtaFlags, AtaRepr, Body, Command, ConfigCommand, ConfigRepr, ErrorCode, HeaderRepr,
    MacAddr, Message, Tag, TargetAddr, SECTOR_SIZE,
};

use crate::Netns;

/// A request the client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// READ SECTORS EXT (0x24) of `count` sectors from `lba`.
    Read {
        /// First sector.
        lba: u64,
        /// Sectors, 1-255.
        count: u8,
    },
    /// WRITE SECTORS EXT (0x34) of `data` (whole sectors, at most 255) at `lba`.
    Write {
        /// First sector.
        lba: u64,
        /// The sectors to write.
        data: Vec<u8>,
    },
    /// FLUSH CACHE EXT (0xEA): every write completed before it is on stable storage.
    Flush,
    /// Query Config, CCmd 0 (read the config string).
    QueryConfig,
}

impl Request {
    /// The AoE message for this request, from `src` to `dst` for `target` with `tag`.
    fn frame(
        &self,
        dst: MacAddr,
        src: MacAddr,
        target: TargetAddr,
        tag: Tag,
    ) -> io::Result<Vec<u8>> {
        let ata = |cmd: AtaCommand, aflags: AtaFlags, lba: u64, count: u8, data: &[u8]| {
            let body = Body::Ata(AtaRepr {
                aflags: aflags | AtaFlags::EXTENDED,
                err_feature: 0,
                sector_count: count,
                cmd_status: cmd.into(),
                lba,
                data,
            });
            let header = HeaderRepr::request(dst, src, target, Command::Ata, tag);
            Message { header, body }.to_vec()
        };
        let frame = match self {
            Request::Read { lba, count } => ata(
                AtaCommand::ReadSectorsExt,
                AtaFlags::empty(),
                *lba,
                *count,
                &[],
            ),
            Request::Write { lba, data } => {
                let count = data.len() / SECTOR_SIZE;
                ata(
                    AtaCommand::WriteSectorsExt,
                    AtaFlags::WRITE,
                    *lba,
                    count as u8,
                    data,
                )
            }
            Request::Flush => ata(AtaCommand::FlushCacheExt, AtaFlags::empty(), 0, 0, &[]),
            Request::QueryConfig => {
                let body = Body::Config(ConfigRepr::request(ConfigCommand::Read, b""));
                let header = HeaderRepr::request(dst, src, target, Command::QueryConfig, tag);
                Message { header, body }.to_vec()
            }
        };
        frame.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e}")))
    }

    /// A short description for messages (no write data).
    pub fn describe(&self) -> String {
        match self {
            Request::Read { lba, count } => format!("READ of {count} sectors at {lba}"),
            Request::Write { lba, data } => {
                format!("WRITE of {} sectors at {lba}", data.len() / SECTOR_SIZE)
            }
            Request::Flush => "FLUSH CACHE EXT".into(),
            Request::QueryConfig => "Query Config".into(),
        }
    }

    /// Sectors of data the reply carries (reads) or the request carries (writes).
    fn sectors(&self) -> usize {
        match self {
            Request::Read { count, .. } => usize::from(*count),
            Request::Write { data, .. } => data.len() / SECTOR_SIZE,
            Request::Flush | Request::QueryConfig => 0,
        }
    }

    fn check(&self) -> io::Result<()> {
        let bad = |what: String| Err(io::Error::new(io::ErrorKind::InvalidInput, what));
        match self {
            Request::Read { count: 0, .. } => bad("a read of 0 sectors".into()),
            Request::Write { data, .. }
                if data.is_empty() || data.len() % SECTOR_SIZE != 0 || data.len() > 255 * 512 =>
            {
                bad(format!(
                    "a write of {} bytes: not 1-255 whole sectors",
                    data.len()
                ))
            }
            _ => Ok(()),
        }
    }
}

/// A reply, matched to the request with the same tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The request's tag.
    pub tag: Tag,
    /// Who answered.
    pub src: MacAddr,
    /// The AoE error, when the E flag is set.
    pub error: Option<ErrorCode>,
    /// What the reply carries.
    pub body: ReplyBody,
}

/// The part of a [`Reply`] after the AoE header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyBody {
    /// An ATA reply.
    Ata {
        /// ATA status register.
        status: u8,
        /// ATA error register.
        error: u8,
        /// Read data: the sectors asked for (the frame's padding cut off), or all the frame
        /// carried if that is less. Empty for writes and flushes.
        data: Vec<u8>,
    },
    /// A Query Config reply.
    Config {
        /// Buffer count: requests the target accepts outstanding.
        buffer_count: u16,
        /// Firmware version.
        firmware_version: u16,
        /// Sectors per ATA command the target accepts.
        sector_count: u8,
        /// The config string.
        config: Vec<u8>,
    },
    /// Any other reply.
    Other,
}

impl Reply {
    /// True for a reply without an AoE error and, for ATA, without any of the status bits
    /// the Linux driver treats as failure (`ktiocomplete`: `cmdstat & 0xa9`).
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
            && match &self.body {
                ReplyBody::Ata { status: s, .. } => s & status::FAILURE_MASK == 0,
                _ => true,
            }
    }

    /// Read data (empty for anything but an ATA reply).
    pub fn data(&self) -> &[u8] {
        match &self.body {
            ReplyBody::Ata { data, .. } => data,
            _ => &[],
        }
    }
}

struct Pending {
    frame: Vec<u8>,
    sectors: usize,
    deadline: Instant,
    write: bool,
}

/// A raw AoE client for one target (shelf.slot) on one interface.
pub struct AoeClient {
    sock: PacketSocket,
    me: MacAddr,
    target: TargetAddr,
    dst: MacAddr,
    window: usize,
    rto: Duration,
    next_tag: u32,
    pending: HashMap<u32, Pending>,
    ready: VecDeque<Reply>,
    buf: Vec<u8>,
    retransmits: u64,
    retransmitted_writes: Vec<Tag>,
}

impl std::fmt::Debug for AoeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AoeClient")
            .field("interface", &self.sock.info().name)
            .field("target", &self.target)
            .field("dst", &self.dst)
            .field("outstanding", &self.pending.len())
            .finish()
    }
}

impl AoeClient {
    /// Opens an AoE socket on `ifname` inside `ns` for talking to `target`. Requests go to
    /// the broadcast MAC until [`discover`](Self::discover) learns the target's. Window 16,
    /// retransmit timeout 1 s.
    pub fn open(ns: &Netns, ifname: &str, target: TargetAddr) -> io::Result<AoeClient> {
        let name = ifname.to_string();
        let sock = aoe_sys::run_in_netns(&ns.path(), move || PacketSocket::open(&name))??;
        sock.set_recv_buffer(16 << 20)?;
        let me = MacAddr(sock.info().mac);
        let buf = vec![0u8; aoe_sys::frame_capacity(sock.info().mtu).max(9100)];
        Ok(AoeClient {
            sock,
            me,
            target,
            dst: MacAddr::BROADCAST,
            window: 16,
            rto: Duration::from_secs(1),
            // Tags unique across clients of one test process, so a late reply to an earlier
            // client's request is never taken for this one's.
            next_tag: tag_base(),
            pending: HashMap::new(),
            ready: VecDeque::new(),
            buf,
            retransmits: 0,
            retransmitted_writes: Vec::new(),
        })
    }

    /// Sets the most requests outstanding at once (at least 1).
    pub fn set_window(&mut self, window: usize) {
        self.window = window.max(1);
    }

    /// The most requests outstanding at once.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Sets how long a request waits for its reply before it is sent again.
    pub fn set_retransmit_timeout(&mut self, rto: Duration) {
        self.rto = rto;
    }

    /// The target's MAC, once [`discover`](Self::discover) found it (broadcast before).
    pub fn target_mac(&self) -> MacAddr {
        self.dst
    }

    /// This client's own MAC (the interface's).
    pub fn mac(&self) -> MacAddr {
        self.me
    }

    /// The MTU of the interface, as it was when the socket was opened.
    pub fn mtu(&self) -> u32 {
        self.sock.info().mtu
    }

    /// Sends Query Config to the broadcast MAC (every 50 ms: the target may still be
    /// starting) until the target answers or `timeout` passes, then sends every later request
    /// to the MAC that answered. Returns the reply.
    pub fn discover(&mut self, timeout: Duration) -> io::Result<Reply> {
        self.dst = MacAddr::BROADCAST;
        let rto = std::mem::replace(&mut self.rto, Duration::from_millis(50));
        let r = self.call(&Request::QueryConfig, timeout);
        self.rto = rto;
        let r = r?;
        self.dst = r.src;
        Ok(r)
    }

    /// True if another request fits in the window.
    pub fn can_send(&self) -> bool {
        self.pending.len() < self.window
    }

    /// Requests sent and not answered yet.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// Frames sent again after a timeout, so far.
    pub fn retransmits(&self) -> u64 {
        self.retransmits
    }

    /// Tags of the writes that were sent more than once (so may land twice), so far.
    pub fn retransmitted(&self) -> &[Tag] {
        &self.retransmitted_writes
    }

    /// Sends `req` with a fresh tag and returns the tag. Fails with `WouldBlock` when the
    /// window is full ([`poll`](Self::poll) for replies first) and with `InvalidInput` for a
    /// request that does not fit one frame.
    pub fn send(&mut self, req: &Request) -> io::Result<Tag> {
        req.check()?;
        if !self.can_send() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("window of {} requests full", self.window),
            ));
        }
        let (tag, frame) = self.tagged_frame(req)?;
        self.transmit(&frame)?;
        self.track(tag, frame, req, Instant::now() + self.rto);
        Ok(tag)
    }

    /// `req` as a frame with a fresh tag ([`send`](Self::send), [`send_burst`](Self::send_burst));
    /// `InvalidInput` for a request that does not fit one frame.
    fn tagged_frame(&mut self, req: &Request) -> io::Result<(Tag, Vec<u8>)> {
        req.check()?;
        let max = aoe_wire::max_sectors_for_mtu(self.mtu());
        if req.sectors() > usize::from(max) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} sectors do not fit one frame at MTU {} (at most {max})",
                    req.sectors(),
                    self.mtu()
                ),
            ));
        }
        self.next_tag = self.next_tag.wrapping_add(1);
        let tag = Tag(self.next_tag);
        let dst = match req {
            Request::QueryConfig => MacAddr::BROADCAST,
            _ => self.dst,
        };
        Ok((tag, req.frame(dst, self.me, self.target, tag)?))
    }

    /// Counts `frame` (request `req`, sent) as outstanding until its reply, retransmitted
    /// after `deadline`.
    fn track(&mut self, tag: Tag, frame: Vec<u8>, req: &Request, deadline: Instant) {
        self.pending.insert(
            tag.0,
            Pending {
                frame,
                sectors: req.sectors(),
                deadline,
                write: matches!(req, Request::Write { .. }),
            },
        );
    }

    /// Waits up to `wait` for replies to outstanding requests and returns those that arrived
    /// (possibly none), retransmitting requests whose timeout passed meanwhile.
    pub fn poll(&mut self, wait: Duration) -> io::Result<Vec<Reply>> {
        let deadline = Instant::now() + wait;
        let mut got: Vec<Reply> = self.ready.drain(..).collect();
        loop {
            self.receive(&mut got)?;
            self.retransmit_expired()?;
            let now = Instant::now();
            if !got.is_empty() || now >= deadline || self.pending.is_empty() {
                return Ok(got);
            }
            let next_rto = self.pending.values().map(|p| p.deadline).min();
            let until = next_rto.map_or(deadline, |d| d.min(deadline));
            let mut fds = [PollFd::new(self.sock.as_raw_fd())];
            aoe_sys::poll(&mut fds, Some(until.saturating_duration_since(now)))?;
        }
    }

    /// Sends `req` (waiting for room in the window first) and waits for its reply, up to
    /// `timeout` in all; replies to other requests that arrive meanwhile are kept for the
    /// next [`poll`](Self::poll). `TimedOut` if no reply came.
    pub fn call(&mut self, req: &Request, timeout: Duration) -> io::Result<Reply> {
        let deadline = Instant::now() + timeout;
        while !self.can_send() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out(req, timeout));
            }
            // Each reply frees its request's place in the window.
            let got = self.poll(left)?;
            self.ready.extend(got);
        }
        let tag = self.send(req)?;
        loop {
            if let Some(i) = self.ready.iter().position(|r| r.tag == tag) {
                return Ok(self.ready.remove(i).unwrap_or_else(|| unreachable!()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.pending.remove(&tag.0);
                return Err(timed_out(req, timeout));
            }
            let got = self.poll(left)?;
            self.ready.extend(got);
        }
    }

    /// Sends every request, keeping the window full, and returns the replies in request
    /// order. `TimedOut` if they did not all arrive within `timeout`.
    pub fn run(&mut self, reqs: &[Request], timeout: Duration) -> io::Result<Vec<Reply>> {
        let deadline = Instant::now() + timeout;
        let mut tags = Vec::with_capacity(reqs.len());
        let mut replies: HashMap<u32, Reply> = HashMap::new();
        let mut next = 0;
        while replies.len() < reqs.len() {
            while next < reqs.len() && self.can_send() {
                tags.push(self.send(&reqs[next])?);
                next += 1;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(too_few_replies(replies.len(), reqs.len(), timeout));
            }
            for r in self.poll(left)? {
                replies.insert(r.tag.0, r);
            }
        }
        Ok(tags.iter().filter_map(|t| replies.remove(&t.0)).collect())
    }

    /// Sends every request at once, whatever the window, as one burst (`sendmmsg` batches,
    /// as [`send_raw`](Self::send_raw)), and returns their tags in request order. They are
    /// outstanding as if sent by [`send`](Self::send): [`poll`](Self::poll) matches their
    /// replies and sends them again after the retransmit timeout. For tests that need
    /// requests to reach the target together (say while it is stopped, so that it takes
    /// them in as one receive batch): [`run`](Self::run) sends each as the window allows,
    /// and a fast target may take each in as it lands.
    pub fn send_burst(&mut self, reqs: &[Request]) -> io::Result<Vec<Tag>> {
        let mut frames = Vec::with_capacity(reqs.len());
        for req in reqs {
            frames.push(self.tagged_frame(req)?);
        }
        self.send_raw(&frames)?;
        let deadline = Instant::now() + self.rto;
        let tags = frames.iter().map(|(tag, _)| *tag).collect();
        for ((tag, frame), req) in frames.into_iter().zip(reqs) {
            self.track(tag, frame, req, deadline);
        }
        Ok(tags)
    }

    /// Waits for the replies to `tags` (requests sent already, say by
    /// [`send_burst`](Self::send_burst)), retransmitting as [`poll`](Self::poll) does, and
    /// returns them in the order of `tags`; replies to other requests that arrive meanwhile
    /// are kept for the next [`poll`](Self::poll). `TimedOut` if they did not all arrive
    /// within `timeout`.
    pub fn replies_to(&mut self, tags: &[Tag], timeout: Duration) -> io::Result<Vec<Reply>> {
        let deadline = Instant::now() + timeout;
        let want: HashSet<u32> = tags.iter().map(|t| t.0).collect();
        let mut replies: HashMap<u32, Reply> = HashMap::new();
        let mut others = Vec::new();
        let mut got: Vec<Reply> = self.ready.drain(..).collect();
        let result = loop {
            for r in got.drain(..) {
                if want.contains(&r.tag.0) {
                    replies.insert(r.tag.0, r);
                } else {
                    others.push(r);
                }
            }
            if replies.len() == want.len() {
                break Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(too_few_replies(replies.len(), want.len(), timeout));
            }
            if let Some(t) = want
                .iter()
                .find(|t| !replies.contains_key(t) && !self.pending.contains_key(t))
            {
                break Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("tag {t:#x} is not outstanding: no reply will come"),
                ));
            }
            match self.poll(left) {
                Ok(g) => got = g,
                Err(e) => break Err(e),
            }
        };
        self.ready.extend(others);
        result?;
        Ok(tags.iter().filter_map(|t| replies.remove(&t.0)).collect())
    }

    /// Forgets every outstanding request (say the target was killed) and returns their
    /// tags; their replies, should any still come, are ignored.
    pub fn abandon(&mut self) -> Vec<Tag> {
        let mut tags: Vec<Tag> = self.pending.drain().map(|(t, _)| Tag(t)).collect();
        tags.sort_by_key(|t| t.0);
        self.ready.clear();
        tags
    }

    /// A request frame from this client to `dst` for `target` carrying `body`, with a fresh
    /// tag; the AoE command follows the body (`Body::Unknown` goes out as command 0xf0). Not
    /// sent: see [`send_raw`](Self::send_raw).
    pub fn raw_frame(
        &mut self,
        dst: MacAddr,
        target: TargetAddr,
        body: Body<'_>,
    ) -> io::Result<(Tag, Vec<u8>)> {
        let command = match &body {
            Body::Ata(_) => Command::Ata,
            Body::Config(_) => Command::QueryConfig,
            Body::MacMask(_) => Command::MacMaskList,
            Body::Reserve(_) => Command::ReserveRelease,
            Body::Unknown(_) => Command::Unknown(0xf0),
        };
        self.next_tag = self.next_tag.wrapping_add(1);
        let tag = Tag(self.next_tag);
        let header = HeaderRepr::request(dst, self.me, target, command, tag);
        let frame = Message { header, body }
            .to_vec()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e}")))?;
        Ok((tag, frame))
    }

    /// Sends raw frames as one burst (`sendmmsg` batches), all of them, in order.
    pub fn send_raw(&self, frames: &[(Tag, Vec<u8>)]) -> io::Result<()> {
        let refs: Vec<&[u8]> = frames.iter().map(|(_, f)| &f[..]).collect();
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut sent = 0;
        while sent < refs.len() {
            match self.sock.send_batch(&refs[sent..]) {
                Ok(n) => sent += n,
                // A full device queue is transient on a veth.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Collects the first response, from any MAC, to each of the tags of `frames` (sent
    /// already), until all arrived or `wait` passed; the replies as bytes, in arrival order.
    pub fn collect_raw(
        &mut self,
        frames: &[(Tag, Vec<u8>)],
        wait: Duration,
    ) -> io::Result<Vec<Vec<u8>>> {
        let want: HashSet<u32> = frames.iter().map(|(t, _)| t.0).collect();
        self.collect_where(&want, wait, |_| true)
    }

    /// The first response to each tag in `want` whose header passes `accept`.
    fn collect_where(
        &mut self,
        want: &HashSet<u32>,
        wait: Duration,
        accept: impl Fn(&HeaderRepr) -> bool,
    ) -> io::Result<Vec<Vec<u8>>> {
        let mut seen = HashSet::new();
        let mut got = Vec::new();
        let deadline = Instant::now() + wait;
        while seen.len() < want.len() {
            while let Some(meta) = self.sock.recv(&mut self.buf)? {
                let f = &self.buf[..meta.len.min(self.buf.len())];
                if let Ok(m) = Message::parse(f) {
                    let tag = m.header.tag.0;
                    if m.header.response
                        && want.contains(&tag)
                        && accept(&m.header)
                        && seen.insert(tag)
                    {
                        got.push(f.to_vec());
                    }
                }
            }
            let now = Instant::now();
            if seen.len() == want.len() || now >= deadline {
                break;
            }
            let mut fds = [PollFd::new(self.sock.as_raw_fd())];
            aoe_sys::poll(&mut fds, Some(deadline - now))?;
        }
        Ok(got)
    }

    /// Every response carrying `tag` (from any MAC and shelf.slot: a request to a wildcard
    /// address is answered by each export it reaches), until `n` arrived or `wait` passed.
    pub fn collect_tag(&mut self, tag: Tag, n: usize, wait: Duration) -> io::Result<Vec<Vec<u8>>> {
        let mut got = Vec::new();
        let deadline = Instant::now() + wait;
        loop {
            while let Some(meta) = self.sock.recv(&mut self.buf)? {
                let f = &self.buf[..meta.len.min(self.buf.len())];
                if let Ok(m) = Message::parse(f) {
                    if m.header.response && m.header.tag == tag {
                        got.push(f.to_vec());
                    }
                }
            }
            let now = Instant::now();
            if got.len() >= n || now >= deadline {
                return Ok(got);
            }
            let mut fds = [PollFd::new(self.sock.as_raw_fd())];
            aoe_sys::poll(&mut fds, Some(deadline - now))?;
        }
    }

    /// [`send_raw`](Self::send_raw), then [`collect_raw`](Self::collect_raw).
    pub fn exchange_raw(
        &mut self,
        frames: &[(Tag, Vec<u8>)],
        wait: Duration,
    ) -> io::Result<Vec<Vec<u8>>> {
        self.send_raw(frames)?;
        self.collect_raw(frames, wait)
    }

    /// One raw request to `dst` for `target` and its reply, if one came within `wait`.
    pub fn raw_call(
        &mut self,
        dst: MacAddr,
        target: TargetAddr,
        body: Body<'_>,
        wait: Duration,
    ) -> io::Result<Option<Vec<u8>>> {
        let f = self.raw_frame(dst, target, body)?;
        Ok(self.exchange_raw(&[f], wait)?.pop())
    }

    /// Broadcasts a Query Config for `target` (each with a tag of its own, so a late answer
    /// to an earlier one does not count) until one is answered, by `from` if given, or
    /// `within` passes; the MAC that answered.
    pub fn raw_wait_answer(
        &mut self,
        target: TargetAddr,
        from: Option<MacAddr>,
        within: Duration,
    ) -> io::Result<Option<MacAddr>> {
        let deadline = Instant::now() + within;
        loop {
            let body = Body::Config(ConfigRepr::request(ConfigCommand::Read, b""));
            let f = self.raw_frame(MacAddr::BROADCAST, target, body)?;
            self.send_raw(std::slice::from_ref(&f))?;
            let want = HashSet::from([f.0 .0]);
            let got = self.collect_where(&want, Duration::from_millis(300), |h| {
                h.target == target && from.is_none_or(|m| m == h.src)
            })?;
            if let Some(m) = got.first().and_then(|r| Message::parse(r).ok()) {
                return Ok(Some(m.header.src));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    fn transmit(&self, frame: &[u8]) -> io::Result<()> {
        // A full device queue is transient on a veth: retry for up to a second.
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match self.sock.send(frame) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(200));
                }
                r => return r,
            }
        }
    }

    fn receive(&mut self, got: &mut Vec<Reply>) -> io::Result<()> {
        while let Some(meta) = self.sock.recv(&mut self.buf)? {
            let frame = &self.buf[..meta.len.min(self.buf.len())];
            let Ok(m) = Message::parse(frame) else {
                continue;
            };
            let h = &m.header;
            if !h.response || (!self.dst.is_broadcast() && h.src != self.dst) {
                continue;
            }
            let Some(p) = self.pending.remove(&h.tag.0) else {
                continue;
            };
            let body = match &m.body {
                Body::Ata(a) => {
                    let n = p.sectors * SECTOR_SIZE;
                    let data = if p.write {
                        &[][..]
                    } else {
                        &a.data[..n.min(a.data.len())]
                    };
                    ReplyBody::Ata {
                        status: a.cmd_status,
                        error: a.err_feature,
                        data: data.to_vec(),
                    }
                }
                Body::Config(c) => ReplyBody::Config {
                    buffer_count: c.buffer_count,
                    firmware_version: c.firmware_version,
                    sector_count: c.sector_count,
                    config: c.config.to_vec(),
                },
                _ => ReplyBody::Other,
            };
            got.push(Reply {
                tag: h.tag,
                src: h.src,
                error: h.error,
                body,
            });
        }
        Ok(())
    }

    fn retransmit_expired(&mut self) -> io::Result<()> {
        let now = Instant::now();
        let mut again = Vec::new();
        for (tag, p) in self.pending.iter_mut() {
            if p.deadline <= now {
                p.deadline = now + self.rto;
                again.push((*tag, p.frame.clone(), p.write));
            }
        }
        for (tag, frame, write) in again {
            self.transmit(&frame)?;
            self.retransmits += 1;
            if write && !self.retransmitted_writes.contains(&Tag(tag)) {
                self.retransmitted_writes.push(Tag(tag));
            }
        }
        Ok(())
    }
}

fn timed_out(req: &Request, timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no reply to {} within {timeout:?}", req.describe()),
    )
}

/// `TimedOut` for a wait that had `got` of the `want` replies it waited for after `timeout`
/// ([`AoeClient::run`], [`AoeClient::replies_to`]).
fn too_few_replies(got: usize, want: usize, timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{got} of {want} replies within {timeout:?}"),
    )
}

/// A tag base unique to this client within the process: 2^20 tags per client.
fn tag_base() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed).wrapping_shl(20)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const T: TargetAddr = TargetAddr::new(3, 4);

    fn ata_of(frame: &[u8]) -> (HeaderRepr, AtaFlags, u8, u8, u64, Vec<u8>) {
        let m = Message::parse(frame).unwrap();
        let Body::Ata(a) = m.body else {
            panic!("not ATA: {m:?}")
        };
        let data = match a.aflags.contains(AtaFlags::WRITE) {
            true => a.write_data().unwrap().to_vec(),
            false => Vec::new(),
        };
        (
            m.header,
            a.aflags,
            a.cmd_status,
            a.sector_count,
            a.lba,
            data,
        )
    }

    #[test]
    fn requests_emit_as_the_driver_sends_them() {
        let data: Vec<u8> = (0..1024).map(|i| i as u8).collect();
        let w = Request::Write {
            lba: 77,
            data: data.clone(),
        };
        let f = w.frame(MacAddr::BROADCAST, ME, T, Tag(9)).unwrap();
        let (h, flags, cmd, count, lba, got) = ata_of(&f);
        assert_eq!((h.tag, h.target, h.src, h.response), (Tag(9), T, ME, false));
        assert_eq!(flags, AtaFlags::EXTENDED | AtaFlags::WRITE);
        assert_eq!((cmd, count, lba), (0x34, 2, 77));
        assert_eq!(got, data);

        let r = Request::Read { lba: 5, count: 2 };
        let (_, flags, cmd, count, lba, _) = ata_of(&r.frame(ME, ME, T, Tag(1)).unwrap());
        assert_eq!((flags, cmd, count, lba), (AtaFlags::EXTENDED, 0x24, 2, 5));

        let (_, _, cmd, count, _, _) = ata_of(&Request::Flush.frame(ME, ME, T, Tag(2)).unwrap());
        assert_eq!((cmd, count), (0xea, 0));

        let q = Request::QueryConfig
            .frame(MacAddr::BROADCAST, ME, T, Tag(3))
            .unwrap();
        let m = Message::parse(&q).unwrap();
        assert_eq!(m.header.command, Command::QueryConfig);
        assert!(matches!(m.body, Body::Config(c) if c.ccmd == ConfigCommand::Read));
    }

    #[test]
    fn rejects_requests_that_are_not_whole_sectors() {
        assert!(Request::Read { lba: 0, count: 0 }.check().is_err());
        for len in [0, 100, 513, 256 * 512] {
            let w = Request::Write {
                lba: 0,
                data: vec![0; len],
            };
            assert!(w.check().is_err(), "{len} bytes");
        }
        assert!(Request::Write {
            lba: 0,
            data: vec![0; 512]
        }
        .check()
        .is_ok());
        assert_eq!(
            Request::Write {
                lba: 8,
                data: vec![0; 1024]
            }
            .describe(),
            "WRITE of 2 sectors at 8"
        );
    }
}
