#!/usr/bin/env bash
# read-timeline.sh - where the time of one `dd iflag=direct` read (or, MODE=write, one `dd
# oflag=direct` write) through `aoe initiator` goes.
#
# Two private network namespaces joined by a veth pair (removed on exit, Ctrl-C included), a
# backing file on tmpfs served by `aoe serve`, `aoe initiator` with its FUSE device file; then
# `perf record -a` of a few tracepoints during COUNT reads of BS each (sched_switch, the read
# system calls, netif_receive_skb on both ends of the veth) and, per read, the time from dd's
# read() to: the target receiving the first and the last request frame, the initiator
# receiving the first and the last answer, and read() returning. Prints the medians and the
# 10th and 90th percentiles over the reads, and each program's share of both CPUs during them
# (swapper = idle). The tracepoints cost some time of their own (a read takes 10-20% longer
# traced): compare the milestones of one run, not the totals with untraced runs.
#
# For reads it also prints the gap between two reads on the wire: from one read's last
# answer at the initiator to the next read's first request at the target and its first
# answer, step by step (each step's time from that last answer, medians), with who had to
# be woken in it (sched_waking and sched_switch): the FUSE reply, dd's read() returning and
# entering the next, a fuser thread on its CPU and taking the request off /dev/fuse, the
# network thread woken and on its CPU, the first request at the target, the target's
# serving thread woken and on its CPU (where it slept: not where it spun or was busy), the
# first answer. TARGET=vblade traces
# the same against vblade (on PATH) instead of `aoe serve`.
#
# MODE=write: COUNT writes of BS from a tmpfs file of random data to the device file, and per
# write the time from dd's write() to: the initiator's FUSE thread taking the request off
# /dev/fuse (its read() returning BS bytes or more), the target receiving the first and the
# last write frame, the initiator receiving the first and the last answer, the FUSE reply
# (the initiator's writev() to /dev/fuse), and write() returning; and dd's own time between
# two writes (its read of the source); then when each party of the chain was woken in a write
# and how long it took to be on its CPU (a fuser thread, the network thread, the target's
# thread). perf's own events are not recorded (`--exclude-perf`: before session 33 perf traced
# its own writes of the trace, 40% of both CPUs, and the chain ran on one CPU). Under --fuse-uring (INIT_ARGS, with ENABLE_URING=Y) the
# ring hands requests over without read() and writev(): those two read 0 and write()'s return.
#
# Usage: sudo scripts/bench/read-timeline.sh
#   AOE=target/release/aoe (target)   INIT_AOE=$AOE (initiator)   MTU=9000   BS=1M
#   COUNT=200 (reads traced)   SIZE_MB=512 (backing file)   KEEP=dir (keep perf.data there)
#   MODE=read (or write)   INIT_ARGS="" (extra `aoe initiator` flags)
#   ENABLE_URING=Y  set /sys/module/fuse/parameters/enable_uring for the run (restored on exit)
#   TARGET=aoe (or vblade)   TARGET_ARGS="" (extra `aoe serve` flags, e.g. --spin-us 200)
#   MORE_EVENTS="" (more tracepoints for the KEEP file, e.g. syscalls:sys_enter_poll,syscalls:sys_exit_poll)
# Needs root, iproute2, util-linux (nsenter), fuse3, python3, perf (Debian: linux-perf).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"
AOE=${AOE:-target/release/aoe}
INIT_AOE=${INIT_AOE:-$AOE}
MTU=${MTU:-9000}
BS=${BS:-1M}
COUNT=${COUNT:-200}
SIZE_MB=${SIZE_MB:-512}
KEEP=${KEEP:-}
MODE=${MODE:-read}
TARGET=${TARGET:-aoe}
TARGET_ARGS=${TARGET_ARGS:-}
SHELF=1 SLOT=1

die() { echo "read-timeline: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (namespaces, raw sockets, FUSE, perf -a)"
for t in ip nsenter perf python3 dd fusermount3; do
    command -v "$t" >/dev/null || die "missing $t"
done
[ -x "$AOE" ] || die "no aoe binary at $AOE"
[ -x "$INIT_AOE" ] || die "no initiator binary at $INIT_AOE"
AOE=$(readlink -f "$AOE") INIT_AOE=$(readlink -f "$INIT_AOE")
case $COUNT in '' | *[!0-9]*) die "COUNT must be a whole number, not '$COUNT'" ;; esac
[ "$COUNT" -ge 20 ] || die "COUNT must be at least 20 (the first 5 reads are left out)"
case $MODE in read | write) ;; *) die "MODE must be read or write, not '$MODE'" ;; esac
case $TARGET in aoe | vblade) ;; *) die "TARGET must be aoe or vblade, not '$TARGET'" ;; esac
[ "$TARGET" = aoe ] || command -v vblade >/dev/null || die "missing vblade"
# shellcheck disable=SC2034 # read by lib.sh's target_cmd
[ -n "$TARGET_ARGS" ] && TARGET_CMD_aoeargs="$AOE serve $TARGET_ARGS {shelf} {slot} {netif} {file}"

bench_workspace rt read-timeline
ENABLE_URING=${ENABLE_URING:-}
URING_PARAM=/sys/module/fuse/parameters/enable_uring URING_OLD=
cleanup_more() { [ -n "$URING_OLD" ] && echo "$URING_OLD" >"$URING_PARAM"; }
if [ -n "$ENABLE_URING" ]; then
    [ -w "$URING_PARAM" ] || die "no $URING_PARAM (a kernel without FUSE over io_uring?)"
    URING_OLD=$(cat "$URING_PARAM"); echo "$ENABLE_URING" >"$URING_PARAM"
fi
IP_T=10.93.0.1 IP_I=10.93.0.2

head -c $((SIZE_MB << 20)) /dev/urandom >"$FILE"
bench_link "$MTU"
TNAME=$TARGET
[ "$TARGET" = aoe ] && [ -n "$TARGET_ARGS" ] && TNAME=aoeargs
start_target "$TNAME" || die "the target did not answer"
start_initiator
DEV=$ROOT/e$SHELF.$SLOT
BYTES=$(numfmt --from=iec "$BS")
if [ "$MODE" = read ]; then
    # One untimed pass first: the window opens, the page cache holds the file.
    dd if="$DEV" of=/dev/null bs="$BS" count="$COUNT" iflag=direct 2>/dev/null
    echo "load $(load); $COUNT reads of $BS at MTU $MTU; target $TARGET $TARGET_ARGS ($AOE), initiator $INIT_AOE ${INIT_ARGS:-}" >&2
    perf record -q -a -o "$WORK/perf.data" \
        -e sched:sched_switch,sched:sched_waking,net:netif_receive_skb --exclude-perf \
        -e syscalls:sys_enter_read,syscalls:sys_exit_read,syscalls:sys_enter_writev --exclude-perf \
        -- dd if="$DEV" of=/dev/null bs="$BS" count="$COUNT" iflag=direct 2>&1 | tail -1 >&2
else
    SRC=$WORK/src
    head -c $((COUNT * BYTES)) /dev/urandom >"$SRC"
    # One untimed pass first, as for reads.
    dd if="$SRC" of="$DEV" bs="$BS" count="$COUNT" oflag=direct conv=notrunc 2>/dev/null
    echo "load $(load); $COUNT writes of $BS at MTU $MTU; target $AOE, initiator $INIT_AOE" >&2
    perf record -q -a -o "$WORK/perf.data" \
        -e sched:sched_switch,sched:sched_waking,net:netif_receive_skb --exclude-perf \
        -e syscalls:sys_enter_read,syscalls:sys_exit_read --exclude-perf \
        -e syscalls:sys_enter_write,syscalls:sys_exit_write,syscalls:sys_enter_writev --exclude-perf \
        ${MORE_EVENTS:+-e "$MORE_EVENTS" --exclude-perf} \
        -- dd if="$SRC" of="$DEV" bs="$BS" count="$COUNT" oflag=direct conv=notrunc 2>&1 | tail -1 >&2
fi
[ -n "$KEEP" ] && { mkdir -p "$KEEP"; cp "$WORK/perf.data" "$KEEP/"; }
# The network thread's counters as it stops (polls, commands, frames; its spins with --spin-us).
# The initiator's threads (fuser, network, ring side threads), to tell its wake-ups from those
# of another initiator on the machine with the same thread names.
ITIDS=$(ls "/proc/$INIT_PID/task" | tr '\n' ' ')
stop_pid "$INIT_PID"; INIT_PID=""; fusermount3 -u -z "$ROOT" 2>/dev/null || true
grep -E 'network thread loop' "$WORK/init.log" | sed 's/^.*network thread loop/initiator:/' >&2 || true
perf script -i "$WORK/perf.data" -F comm,tid,cpu,time,event,trace 2>/dev/null >"$WORK/trace.txt"
TTIDS=$(ls "/proc/$TARGET_PID/task" | tr '\n' ' ')
python3 - "$WORK/trace.txt" "$IF_T" "$IF_I" "$BYTES" "$MODE" "$TTIDS" "$ITIDS" <<'EOF'
import bisect, re, sys
path, dev_t, dev_i, size, mode = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
target_tids = set(sys.argv[6].split())
init_tids = set(sys.argv[7].split())
line = re.compile(r'\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)')
ev = []
for l in open(path):
    m = line.match(l)
    if m:
        comm, _, cpu, t, e, tr = m.groups()
        ev.append((float(t), comm, int(cpu), e, tr))
want = 'count: 0x%08x' % size
def length(tr):
    m = re.search(r'len=(\d+)', tr)
    return int(m.group(1)) if m else 0
def pct(rows, names, what):
    print('%d %s; microseconds from dd entering %s(), median (p10-p90):' % (len(rows), what, what[:-1]))
    for k, name in enumerate(names):
        v = sorted(r[k] for r in rows)
        n = len(v)
        print('  %-36s %7.0f  (%.0f-%.0f)' % (name, v[n // 2], v[n // 10], v[9 * n // 10]))
def party(comm, pid):
    """The chain's parties by thread: 'fuser' (a fuser-N thread), 'net' (aoe-net), 'target'."""
    if pid in init_tids and comm.startswith('fuser'):
        return 'fuser'
    if pid in init_tids and comm == 'aoe-net':
        return 'net'
    if pid in target_tids:
        return 'target'
    return None
def shares(t0, t1):
    occ, last = {}, {}
    for t, comm, cpu, e, tr in ev:
        if e != 'sched:sched_switch' or t < t0 or t > t1:
            continue
        nxt = re.search(r'next_comm=(.+?) next_pid', tr).group(1)
        if cpu in last:
            s0, c = last[cpu]
            c = 'idle' if c.startswith('swapper') else c
            occ[c] = occ.get(c, 0) + (t - s0)
        last[cpu] = (t, nxt)
    total = sum(occ.values()) or 1
    print('share of both CPUs during the %ss: ' % mode +
          ', '.join('%s %.1f%%' % (c, 100 * v / total)
                    for c, v in sorted(occ.items(), key=lambda x: -x[1])[:8]))
if mode == 'write':
    writes, start, fuse_reads, replies = [], None, [], []
    for t, comm, cpu, e, tr in ev:
        if comm == 'dd' and e == 'syscalls:sys_enter_write' and want in tr:
            start = t
        elif comm == 'dd' and e == 'syscalls:sys_exit_write' and start is not None:
            writes.append((start, t))
            start = None
        elif comm != 'dd' and e == 'syscalls:sys_exit_read':
            m = re.search(r'0x([0-9a-f]+)', tr)
            if m and int(m.group(1), 16) >= size:
                fuse_reads.append(t)
        elif comm != 'dd' and e == 'syscalls:sys_enter_writev':
            replies.append(t)
    frames = [t for t, c, cpu, e, tr in ev
              if e == 'net:netif_receive_skb' and 'dev=%s ' % dev_t in tr and length(tr) > 500]
    answers = [t for t, c, cpu, e, tr in ev
               if e == 'net:netif_receive_skb' and 'dev=%s ' % dev_i in tr]
    def first(xs, a, b):
        r = xs[bisect.bisect_left(xs, a):bisect.bisect_right(xs, b)]
        return r
    rows = []
    for i, (a, b) in enumerate(writes[5:], 5):
        fr = first(fuse_reads, a, b)
        f = first(frames, a, b)
        s = first(answers, a, b)
        if not (f and s):
            continue
        rp = first(replies, s[-1], b)
        gap = a - writes[i - 1][1]
        # No read() of /dev/fuse and no writev() under --fuse-uring (the ring takes the
        # request and its answer): those two milestones then read 0 and write()'s return.
        rows.append([(x - a) * 1e6 for x in (fr[0] if fr else a, f[0], f[-1], s[0], s[-1],
                                             rp[0] if rp else b, b)] + [gap * 1e6, len(f), len(s)])
    if not rows:
        sys.exit('read-timeline: no write with frames found in the trace')
    pct(rows, ['request off /dev/fuse', 'first write frame at the target',
               'last write frame at the target', 'first answer at the initiator',
               'last answer at the initiator', 'FUSE reply (writev)', 'write() returns',
               'dd between writes (before)', 'write frames per write', 'answers per write'],
        'writes')
    # The wake-ups in each write's chain: when the party was woken (sched_waking) and when it
    # was on its CPU (sched_switch to it); a party already on its CPU (busy or spinning) has
    # no wake-up in that write and is left out of that line's median (the count says how
    # many writes had one).
    wakes, ons = {}, {}
    for t, comm, cpu, e, tr in ev:
        if e == 'sched:sched_waking':
            m = re.search(r'comm=(.+?) pid=(\d+)', tr)
            if m:
                wakes.setdefault(party(m.group(1), m.group(2)), []).append(t)
        elif e == 'sched:sched_switch':
            m = re.search(r'next_comm=(.+?) next_pid=(\d+)', tr)
            if m:
                ons.setdefault(party(m.group(1), m.group(2)), []).append(t)
    steps = [('fuser', 'a fuser thread'), ('net', 'the network thread'), ('target', "the target's thread")]
    lines = {k: ([], []) for k, _ in steps}
    for a, b in writes[5:]:
        for k, _ in steps:
            w = first(wakes.get(k, []), a, b)
            if not w:
                continue
            o = first(ons.get(k, []), w[0], b)
            lines[k][0].append((w[0] - a) * 1e6)
            if o:
                lines[k][1].append((o[0] - w[0]) * 1e6)
    n = len(writes) - 5
    print('wake-ups in a write (the first of each party), microseconds, median (p10-p90):')
    for k, name in steps:
        w, o = sorted(lines[k][0]), sorted(lines[k][1])
        if not w:
            print('  %-22s not woken in any write' % name)
            continue
        q = lambda v, f: v[int(f * len(v))] if v else 0
        print('  %-22s woken at %5.0f (%.0f-%.0f), on its CPU %4.0f (%.0f-%.0f) later; in %d of %d writes'
              % (name, q(w, .5), q(w, .1), q(w, .9), q(o, .5), q(o, .1), q(o, .9), len(w), n))
    shares(writes[5][0], writes[-1][1])
    sys.exit(0)
reads, start = [], None
for t, comm, cpu, e, tr in ev:
    if comm == 'dd' and e == 'syscalls:sys_enter_read' and want in tr:
        start = t
    elif comm == 'dd' and e == 'syscalls:sys_exit_read' and start is not None:
        reads.append((start, t))
        start = None
reqs = [t for t, c, cpu, e, tr in ev if e == 'net:netif_receive_skb' and 'dev=%s ' % dev_t in tr]
answers = [t for t, c, cpu, e, tr in ev
           if e == 'net:netif_receive_skb' and 'dev=%s ' % dev_i in tr and length(tr) > 500]
rows = []
for a, b in reads[5:]:
    r = reqs[bisect.bisect_left(reqs, a):bisect.bisect_right(reqs, b)]
    s = answers[bisect.bisect_left(answers, a):bisect.bisect_right(answers, b)]
    if r and s:
        rows.append([(x - a) * 1e6 for x in (r[0], r[-1], s[0], s[-1], b)] + [len(r), len(s)])
if not rows:
    sys.exit('read-timeline: no read with frames found in the trace')
names = ['first request at the target', 'last request at the target',
         'first answer at the initiator', 'last answer at the initiator',
         'read() returns', 'request frames per read', 'answer frames per read']
pct(rows, names, 'reads')
shares(reads[5][0], reads[-1][1])

# The gap between two reads, step by step from the previous read's last answer (t0).
def after(xs, a, b=None):
    i = bisect.bisect_left(xs, a)
    if i < len(xs) and (b is None or xs[i] <= b):
        return xs[i]
    return None
def last_before(xs, a, b):
    i = bisect.bisect_right(xs, b) - 1
    return xs[i] if i >= 0 and xs[i] >= a else None
on_cpu = {}  # who -> times it was switched in
waking = {}  # who -> times a wake-up of it was made
def who(comm, tid):
    if tid in target_tids:
        return 'target'
    if comm.startswith('fuser'):
        return 'fuser'
    if comm in ('aoe-net', 'dd'):
        return comm
    return None
fuse_out, replies = [], []
for t, comm, cpu, e, tr in ev:
    if e == 'sched:sched_switch':
        m = re.search(r'next_comm=(.+?) next_pid=(\d+)', tr)
        w = who(m.group(1), m.group(2)) if m else None
        if w:
            on_cpu.setdefault(w, []).append(t)
    elif e == 'sched:sched_waking':
        m = re.search(r'comm=(.+?) pid=(\d+)', tr)
        w = who(m.group(1), m.group(2)) if m else None
        if w:
            waking.setdefault(w, []).append(t)
    elif e == 'syscalls:sys_exit_read' and comm.startswith('fuser'):
        fuse_out.append(t)
    elif e == 'syscalls:sys_enter_writev' and comm != 'dd':
        replies.append(t)
reads_end = [b for a, b in reads]
gaps = []
woke = {'fuser': 0, 'aoe-net': 0, 'target': 0}
for i in range(6, len(reads)):
    pa, pb = reads[i - 1]
    a, b = reads[i]
    s_prev = answers[bisect.bisect_left(answers, pa):bisect.bisect_right(answers, pb)]
    r = reqs[bisect.bisect_left(reqs, a):bisect.bisect_right(reqs, b)]
    s = answers[bisect.bisect_left(answers, a):bisect.bisect_right(answers, b)]
    if not (s_prev and r and s):
        continue
    t0 = s_prev[-1]
    rep = last_before(replies, t0, pb)
    # A wake-up is a sched_waking of the party in the step (a thread preempted and put back
    # has none); its time on the CPU the first switch-in after it.
    f_wk = after(waking.get('fuser', []), a, r[0])
    f_on = after(on_cpu.get('fuser', []), f_wk, r[0]) if f_wk else None
    f_out = after(fuse_out, a, r[0])
    n_wk = after(waking.get('aoe-net', []), f_out or a, r[0])
    n_on = after(on_cpu.get('aoe-net', []), n_wk, r[0]) if n_wk else None
    t_wk = after(waking.get('target', []), r[0], s[0])
    t_on = after(on_cpu.get('target', []), t_wk, s[0]) if t_wk else None
    woke['fuser'] += f_wk is not None
    woke['aoe-net'] += n_wk is not None
    woke['target'] += t_wk is not None
    row = [rep, pb, a, f_wk, f_on, f_out, n_wk, n_on, r[0], t_wk, t_on, s[0]]
    gaps.append([None if x is None else (x - t0) * 1e6 for x in row])
if gaps:
    names = ['FUSE reply (writev) of the last request', 'read() returns', 'next read() entered',
             'a fuser thread woken', 'it is on its CPU',
             'fuser takes a request (read() of /dev/fuse)',
             'aoe-net woken (after that)', 'it is on its CPU', 'first request at the target',
             'the target woken (asleep, not spinning)', 'it is on its CPU',
             'first answer at the initiator']
    print('%d gaps between reads; microseconds from the last answer of the read before, '
          'median (p10-p90) over the reads where the step was seen:' % len(gaps))
    for k, name in enumerate(names):
        v = sorted(g[k] for g in gaps if g[k] is not None)
        if not v:
            print('  %-44s  never' % name)
            continue
        n = len(v)
        print('  %-44s %7.0f  (%.0f-%.0f)  in %d of %d' % (name, v[n // 2], v[n // 10],
                                                          v[9 * n // 10], n, len(gaps)))
    print('  woken within the gap: ' + ', '.join('%s %d of %d' % (k, v, len(gaps))
                                                  for k, v in woke.items()))
EOF
