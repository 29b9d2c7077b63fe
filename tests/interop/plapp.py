#!/usr/bin/env python3
"""plapp.py - application write patterns for power-loss.sh -W (session 35).

Each workload (KIND) lives in a directory of its own on the file system made through the
initiator, and logs to a file on the host's own disk, one line per event, written with
os.write (no user-space buffer) before the next step starts:

    S KEY GEN T  the step that makes version GEN of KEY durable has started (T: the
                 CLOCK_REALTIME seconds, as the rig's RUN/killed-at, session 36)
    D KEY GEN T  ... and returned 0: acknowledged (the application would now tell its user)

The host kills the guest (or the initiator) once every workload has a few D lines, then
mounts the file system again and runs `check`, which holds every D line as a promise:

  replace        the atomic-replace pattern (the one editors, package managers and config
                 writers use): write rN.tmp, fsync it, rename it over rN, fsync the
                 directory; 8 names, versions in turn. After the loss every name exists and
                 holds one whole version of its own (header and bytes), at least the last
                 acknowledged one, at most the last started (POSIX rename(2): "a link named
                 new shall remain visible ... and refer either to the file referred to by
                 new or old"; the acknowledgement is the directory's fsync, which makes the
                 rename durable on ext4, XFS and btrfs).
  inplace        overwrites in place of a file whose blocks are all written (no allocation,
                 no size change): 16 KiB at a block, then fdatasync(2), which needs no
                 journal commit here ("does not flush modified metadata unless that
                 metadata is needed in order to allow a subsequent data retrieval"), so only
                 the data and a cache flush make it durable.
  prealloc       the same into a file made by fallocate(2) (unwritten extents): the first
                 write to a block converts its extent, metadata that fdatasync must commit.
  odirect        the written file again, opened O_DIRECT|O_DSYNC, no fsync at all: each
                 pwrite that returned is durable (open(2): O_DSYNC "as though each write(2)
                 was followed by a call to fdatasync(2)"; the file system sends the block
                 layer REQ_FUA or a flush after it).
  sqlite-wal     sqlite3 with journal_mode=WAL, synchronous=FULL: a transaction per row
  sqlite-delete  ... with journal_mode=DELETE (the rollback journal), synchronous=EXTRA:
                 a row (seq N, a payload of its own) inserted and a counter row set to N,
                 then COMMIT. After the loss PRAGMA integrity_check says ok, the rows are
                 exactly 1..K with their payloads, the counter is K, and K is at least the
                 last acknowledged N and at most the last started ("Atomic Commit In
                 SQLite", sqlite.org/atomiccommit.html; "synchronous=FULL ... ensures that
                 an operating system crash or power failure will not corrupt the database",
                 and in WAL mode commits are durable, sqlite.org/pragma.html#pragma_synchronous).
  sqlite-delete-full  journal_mode=DELETE with synchronous=FULL, checked as the others:
                 not in `all`, because it does not promise what the check holds it to. In
                 DELETE mode the commit is the journal's unlink, and FULL does not sync the
                 directory after it; EXTRA does ("EXTRA provides additional durability if
                 the commit is followed closely by a power loss", the same page). Session 35
                 found it: on btrfs a COMMIT acknowledged just before the power loss was
                 rolled back (the journal back, hot), integrity_check ok.

When it happened (session 36, s36/plbtrfs): `check` reads the rig's LOGDIR/killed-at (K, the
time just before the SIGKILL; R, the killed process reaped) and places each violation's S and
D lines against them, and says per KIND how many D lines came after K. An acknowledgement
logged after R came while the target was dead. If then the device under the file system had
failed writes with EIO (the rig found the loop device's "I/O error" lines in the kernel log
since the kill and set PLAPP_LOWER_EIO=1), the success was the file system's own, given over
the error our stack answered: such a violation is printed as KERNEL and not counted. Found
so: btrfs over loop (direct I/O) over the initiator's device file, the guest killed, a
prealloc fdatasync returned 0 exactly at deadsecs (K+5.0 s), when the initiator failed the
dead device's I/O, btrfs aborting its log commit (walk_down_log_tree, errno=-5) in the same
second; 4 runs in 28 (s36/plbtrfs). Every D line before R is held as before.

For the inplace, prealloc and odirect files the check is per 512-byte sector: each holds
that sector of an allowed version of its block (the last acknowledged one, or a version
started after it: a write cut off may be torn at sector boundaries, no finer).

Usage: plapp.py setup DIR KIND...   (each KIND in DIR/KIND, made and made durable)
       plapp.py run DIR LOGDIR KIND...  (a process per KIND, until one step fails; exit 1
                                        when every one has failed, 0 if any ran out)
       plapp.py check DIR LOGDIR KIND... (prints a line per KIND; exit 1 on a violation)
The contents are a function of (KIND, KEY, GEN) only, so `check` needs no copy of them.

PLAPP_NOSYNC=1 in `run`'s environment is the control: every step logs its acknowledgement
without the call that makes it durable (no fsync, no fdatasync, no O_DSYNC, sqlite's
synchronous=OFF), so a power loss must make `check` fail for every KIND; if it did not,
the check could not tell a durable acknowledgement from one that is not.
"""

import mmap
import os
import random
import sqlite3
import sys
import time

NAMES = 8              # replace: r0 .. r7
BS = 16384             # inplace, prealloc, odirect: block size of a write
NBLK = 256             # ... blocks in the file (4 MiB)
SECTOR = 512
STEPS = 100000         # a bound on a writer that never meets an error
BLOCK_KINDS = ("inplace", "prealloc", "odirect")
KINDS = ("replace",) + BLOCK_KINDS + ("sqlite-wal", "sqlite-delete", "sqlite-delete-full")
NOSYNC = os.environ.get("PLAPP_NOSYNC") == "1"


def data(kind, key, gen, n):
    """The n bytes of version gen of key (deterministic: seeded by the three)."""
    return random.Random(f"{kind}/{key}/{gen}").randbytes(n)


def block(kind, b, gen):
    if gen == 0 and kind == "prealloc":
        return bytes(BS)  # unwritten extents read as zeros
    return data(kind, b, gen, BS)


def replace_bytes(i, gen):
    head = b"r%d g%d\n" % (i, gen)
    return head + data("replace", i, gen, 3000 + (gen * 7919 + i * 104729) % 60000)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(path, payload, sync=True):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, payload)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def sqlite_sync(kind):
    """The synchronous level of kind (OFF in the control, PLAPP_NOSYNC)."""
    return "OFF" if NOSYNC else "EXTRA" if kind == "sqlite-delete" else "FULL"


def sqlite_open(path, kind, sync="FULL"):
    con = sqlite3.connect(path, isolation_level=None, timeout=60)
    mode = "wal" if kind == "sqlite-wal" else "delete"
    got = con.execute(f"PRAGMA journal_mode={mode}").fetchone()[0]
    if got != mode:
        raise RuntimeError(f"journal_mode {got}, not {mode}")
    con.execute(f"PRAGMA synchronous={sync}")
    return con


def setup(d, kind):
    os.makedirs(d)
    if kind == "replace":
        for i in range(NAMES):
            write_all(os.path.join(d, f"r{i}"), replace_bytes(i, 0))
    elif kind in BLOCK_KINDS:
        path = os.path.join(d, "f")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        if kind == "prealloc":
            os.posix_fallocate(fd, 0, BS * NBLK)
        else:
            for b in range(NBLK):
                os.pwrite(fd, block(kind, b, 0), b * BS)
        os.fsync(fd)
        os.close(fd)
    else:
        con = sqlite_open(os.path.join(d, "db"), kind)
        con.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        con.execute("CREATE TABLE c (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)")
        con.execute("INSERT INTO c VALUES (1, 0)")
        con.close()
    fsync_dir(d)
    fsync_dir(os.path.dirname(d))


class Log:
    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def put(self, tag, key, gen):
        # time.time() is CLOCK_REALTIME, the clock of the rig's `date +%s.%N` (killed-at).
        os.write(self.fd, f"{tag} {key} {gen} {time.time():.6f}\n".encode())


def run(d, kind, log):
    gen = 0
    if kind == "replace":
        for gen in range(1, STEPS):
            i = gen % NAMES
            log.put("S", i, gen)
            tmp = os.path.join(d, f"r{i}.tmp")
            write_all(tmp, replace_bytes(i, gen), not NOSYNC)
            os.rename(tmp, os.path.join(d, f"r{i}"))
            if not NOSYNC:
                fsync_dir(d)
            log.put("D", i, gen)
    elif kind in BLOCK_KINDS:
        path = os.path.join(d, "f")
        flags = os.O_WRONLY | (os.O_DIRECT if kind == "odirect" else 0)
        flags |= os.O_DSYNC if kind == "odirect" and not NOSYNC else 0
        fd = os.open(path, flags)
        buf = mmap.mmap(-1, BS)  # page-aligned, as O_DIRECT wants
        rng = random.Random(f"{kind}/order")
        for gen in range(1, STEPS):
            b = rng.randrange(NBLK)
            buf[:] = block(kind, b, gen)
            log.put("S", b, gen)
            if os.pwrite(fd, buf, b * BS) != BS:
                raise OSError("short write")
            if kind != "odirect" and not NOSYNC:
                os.fdatasync(fd)
            log.put("D", b, gen)
    else:
        con = sqlite_open(os.path.join(d, "db"), kind, sqlite_sync(kind))
        for gen in range(1, STEPS):
            log.put("S", "q", gen)
            con.execute("BEGIN")
            con.execute("INSERT INTO t VALUES (?, ?)", (gen, data(kind, "q", gen, 500 + gen * 37 % 3000)))
            con.execute("UPDATE c SET v = ? WHERE id = 1", (gen,))
            con.execute("COMMIT")
            log.put("D", "q", gen)
    return gen


STAMPS = {}  # (tag, key, gen) -> the CLOCK_REALTIME of its log line (read_log fills it)
KILL = {}    # the rig's killed-at: K (before the SIGKILL), R (the killed process reaped)


def read_log(path):
    """Per key: the last acknowledged generation (0: none), and the generations started."""
    acked, started = {}, {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) not in (3, 4):
                continue  # a line cut by the kill (cannot happen with one write; be safe)
            tag, key, gen = parts[0], parts[1], int(parts[2])
            if len(parts) == 4:
                STAMPS[(tag, key, gen)] = float(parts[3])
            started.setdefault(key, set()).add(gen)
            if tag == "D":
                acked[key] = max(acked.get(key, 0), gen)
    return acked, started


def read_kill(path):
    """The rig's killed-at lines `K T` and `R T`, if the file is there."""
    try:
        for line in open(path):
            parts = line.split()
            if len(parts) == 2:
                KILL[parts[0]] = float(parts[1])
    except OSError:
        pass


def late(key, gens):
    """Whether every step of `gens` was acknowledged after the rig reaped the killed process,
    while the device below the file system failed its writes with EIO (PLAPP_LOWER_EIO=1:
    the kernel log since the kill has the loop device's I/O errors). Such an acknowledgement
    is the file system's own: the target was dead, our stack said EIO, and it said 0."""
    r = KILL.get("R")
    if r is None or os.environ.get("PLAPP_LOWER_EIO") != "1":
        return False
    return all(STAMPS.get(("D", str(key), g), 0) > r for g in gens) and bool(gens)


def when(key, gen):
    """Where the step (key, gen) stands against the kill: its S and D lines' times,
    relative to the rig's K line (written just before the SIGKILL) and R (reaped)."""
    s, d = STAMPS.get(("S", str(key), gen)), STAMPS.get(("D", str(key), gen))
    k, r = KILL.get("K"), KILL.get("R")
    if k is None or d is None:
        return ""
    out = f" [g{gen}: S at K{s - k:+.3f}s, D at K{d - k:+.3f}s" if s is not None else f" [g{gen}: D at K{d - k:+.3f}s"
    if r is not None:
        out += f", the kill reaped at K{r - k:+.3f}s"
    verdict = ("D after the kill was reaped: acknowledged after the target was dead" if r is not None and d > r
               else "D after K, before the reap" if d > k else "D before the kill")
    return out + f": {verdict}]"


def allowed(acked, started, key):
    low = acked.get(key, 0)
    return [low] + sorted(g for g in started.get(key, ()) if g > low)


def check(d, kind, logpath):
    """A list of violations; prints a summary line."""
    acked, started = read_log(logpath)
    nacked = sum(1 for _ in open(logpath) if _.startswith("D "))
    bad = []
    if kind == "replace":
        newer = 0
        for i in range(NAMES):
            path = os.path.join(d, f"r{i}")
            ok = allowed(acked, started, str(i))
            try:
                got = open(path, "rb").read()
            except OSError as e:
                bad.append(f"r{i}: {e.strerror} (acknowledged g{ok[0]})")
                continue
            head = got.split(b"\n", 1)[0]
            try:
                gen = int(head.split(b" g")[1])
            except (IndexError, ValueError):
                bad.append(f"r{i}: {len(got)} bytes, no header (acknowledged g{ok[0]})")
                continue
            if gen not in ok:
                bad.append(("KERNEL " if late(i, [ok[0]]) else "")
                           + f"r{i}: holds g{gen}, acknowledged g{ok[0]}, allowed {ok}" + when(i, ok[0]))
            elif got != replace_bytes(i, gen):
                bad.append(f"r{i}: g{gen} damaged ({len(got)} bytes, not {len(replace_bytes(i, gen))})")
            elif gen > ok[0]:
                newer += 1
        print(f"### replace: {nacked} renames acknowledged; {NAMES - len(bad)} of {NAMES} names whole, "
              f"{newer} of them a version started after the last acknowledged")
    elif kind in BLOCK_KINDS:
        try:
            got = open(os.path.join(d, "f"), "rb").read()
        except OSError as e:
            print(f"### {kind}: {nacked} writes acknowledged; the file: {e.strerror}")
            return [f"{kind}: the file: {e.strerror}"]
        if len(got) != BS * NBLK:
            return [f"{kind}: the file has {len(got)} bytes, not {BS * NBLK}"]
        torn = newer = 0
        for b in range(NBLK):
            ok = allowed(acked, started, str(b))
            have = got[b * BS:(b + 1) * BS]
            vers = {g: block(kind, b, g) for g in ok}
            seen = set()
            for s in range(0, BS, SECTOR):
                m = [g for g, v in vers.items() if v[s:s + SECTOR] == have[s:s + SECTOR]]
                if not m:
                    old = [g for g in started.get(str(b), set()) | {0} if g < ok[0]
                           and block(kind, b, g)[s:s + SECTOR] == have[s:s + SECTOR]]
                    bad.append(("KERNEL " if late(b, [ok[0]]) else "") + f"block {b} sector {s // SECTOR}: "
                               + (f"holds g{old[-1]}, older than the acknowledged g{ok[0]}" if old
                                  else f"foreign bytes (acknowledged g{ok[0]}, allowed {ok})")
                               + when(b, ok[0]))
                    break
                seen.add(m[0])
            if len(seen) > 1:
                torn += 1
            elif seen and max(seen) > ok[0]:
                newer += 1
        print(f"### {kind}: {nacked} writes acknowledged; {NBLK} blocks checked per sector, "
              f"{len(bad)} bad, {torn} torn between allowed versions, {newer} newer than acknowledged")
    else:
        low = max(acked.values(), default=0)
        high = max((max(s) for s in started.values()), default=0)
        try:
            # mode=rw: a database that is gone is an error, not a new empty one.
            con = sqlite3.connect(f"file:{os.path.join(d, 'db')}?mode=rw", uri=True,
                                  isolation_level=None, timeout=60)
            ic = [r[0] for r in con.execute("PRAGMA integrity_check")]
            seqs = [r[0] for r in con.execute("SELECT seq FROM t ORDER BY seq")]
            counter = con.execute("SELECT v FROM c WHERE id = 1").fetchone()[0]
            wrong = [s for s, p in con.execute("SELECT seq, payload FROM t")
                     if p != data(kind, "q", s, 500 + s * 37 % 3000)]
            con.close()
        except sqlite3.Error as e:
            print(f"### {kind}: {nacked} commits acknowledged; the database: {e}")
            return [f"{kind}: the database does not open or read: {e}"]
        k = len(seqs)
        if ic != ["ok"]:
            bad.append(f"integrity_check: {'; '.join(map(str, ic[:5]))}")
        if seqs != list(range(1, k + 1)):
            bad.append(f"the rows are not 1..{k}: {[s for i, s in enumerate(seqs, 1) if s != i][:5]} ...")
        if k < low:
            missing = low - k
            bad.append(("KERNEL " if late("q", range(k + 1, low + 1)) else "")
                       + f"{missing} committed rows missing: {k} rows, the last acknowledged COMMIT was seq {low}"
                       + "".join(when("q", g) for g in range(k + 1, low + 1)))
        if k > high:
            bad.append(f"{k} rows, more than the {high} transactions started")
        if counter != k:
            bad.append(f"the counter row says {counter}, the table has {k} rows")
        if wrong:
            bad.append(f"{len(wrong)} rows with damaged payloads, the first seq {wrong[0]}")
        print(f"### {kind}: integrity_check {' '.join(map(str, ic[:1]))}; {k} rows; "
              f"the last acknowledged COMMIT seq {low}, the last started {high}")
    return [f"{kind}: {b}" for b in bad]


def main():
    if len(sys.argv) < 4 or sys.argv[1] not in ("setup", "run", "check"):
        sys.exit("usage: plapp.py setup DIR KIND... | run|check DIR LOGDIR KIND... (see its header)")
    cmd, root = sys.argv[1], sys.argv[2]
    if cmd == "setup":
        kinds = sys.argv[3:]
    else:
        logdir, kinds = sys.argv[3], sys.argv[4:]
    for k in kinds:
        if k not in KINDS:
            sys.exit(f"plapp.py: unknown kind {k} (one of {', '.join(KINDS)})")
    if cmd == "setup":
        for k in kinds:
            setup(os.path.join(root, k), k)
        return
    if cmd == "check":
        read_kill(os.path.join(logdir, "killed-at"))
        bad = []
        for k in kinds:
            bad += check(os.path.join(root, k), k, os.path.join(logdir, f"clog.{k}"))
            if "K" in KILL:
                # The steps acknowledged after the rig's K line: each is a promise the check
                # holds, yet one whose D line follows the reap was answered by a dead target.
                late = sorted(t - KILL["K"] for (tag, key, g), t in STAMPS.items()
                              if tag == "D" and t > KILL["K"] and True)
                STAMPS.clear()
                print(f"### {k}: {len(late)} D lines after K"
                      + (f" (at K{', K'.join(f'+{x:.3f}s' for x in late[:5])})" if late else "")
                      + (f"; the kill reaped at K+{KILL['R'] - KILL['K']:.3f}s" if "R" in KILL else ""))
        # An acknowledgement the file system gave after the target was dead, over our EIO
        # (late()), is reported, not counted: the check holds our stack to its answers.
        kernel = [b.replace("KERNEL ", "", 1) for b in bad if b.split(": ", 1)[1].startswith("KERNEL ")]
        bad = [b for b in bad if not b.split(": ", 1)[1].startswith("KERNEL ")]
        for b in kernel:
            print(f"### KERNEL: {b}: the file system acknowledged it after the target died, "
                  "its device having failed writes with EIO (kernel-after-kill.log)")
        # The first three of each kind, and how many more (a lost file is 256 lines).
        shown = {}
        for b in bad:
            k = b.split(":", 1)[0]
            shown[k] = shown.get(k, 0) + 1
            if shown[k] <= 3:
                print(f"### VIOLATION: {b}")
        for k, n in shown.items():
            if n > 3:
                print(f"### VIOLATION: {k}: ... and {n - 3} more")
        sys.exit(1 if bad else 0)
    # run: a process per kind, each with its own log.
    pids = {}
    for k in kinds:
        pid = os.fork()
        if pid == 0:
            log = Log(os.path.join(logdir, f"clog.{k}"))
            try:
                n = run(os.path.join(root, k), k, log)
                print(f"{k}: ran out after {n} steps", flush=True)
                os._exit(0)
            except (OSError, sqlite3.Error, RuntimeError) as e:
                print(f"{k}: failed: {e}", flush=True)
                os._exit(1)
        pids[pid] = k
    ok = False
    for _ in kinds:
        _, status = os.wait()
        ok = ok or os.waitstatus_to_exitcode(status) == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
