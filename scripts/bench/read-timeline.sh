#!/usr/bin/env bash
# read-timeline.sh - where the time of one `dd iflag=direct` read through `aoe initiator` goes.
#
# Two private network namespaces joined by a veth pair (removed on exit, Ctrl-C included), a
# backing file on tmpfs served by `aoe serve`, `aoe initiator` with its FUSE device file; then
# `perf record -a` of four tracepoints during COUNT reads of BS each (sched_switch, the read
# system calls, netif_receive_skb on both ends of the veth) and, per read, the time from dd's
# read() to: the target receiving the first and the last request frame, the initiator
# receiving the first and the last answer, and read() returning. Prints the medians and the
# 10th and 90th percentiles over the reads, and each program's share of both CPUs during them
# (swapper = idle). The tracepoints cost some time of their own (a read takes 10-20% longer
# traced): compare the milestones of one run, not the totals with untraced runs.
#
# Usage: sudo scripts/bench/read-timeline.sh
#   AOE=target/release/aoe (target)   INIT_AOE=$AOE (initiator)   MTU=9000   BS=1M
#   COUNT=200 (reads traced)   SIZE_MB=512 (backing file)   KEEP=dir (keep perf.data there)
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

bench_workspace rt read-timeline
IP_T=10.93.0.1 IP_I=10.93.0.2

head -c $((SIZE_MB << 20)) /dev/urandom >"$FILE"
bench_link "$MTU"
start_target aoe || die "the target did not answer"
start_initiator
DEV=$ROOT/e$SHELF.$SLOT
# One untimed pass first: the window opens, the page cache holds the file.
dd if="$DEV" of=/dev/null bs="$BS" count="$COUNT" iflag=direct 2>/dev/null
echo "load $(load); $COUNT reads of $BS at MTU $MTU; target $AOE, initiator $INIT_AOE" >&2
perf record -q -a -o "$WORK/perf.data" \
    -e sched:sched_switch,net:netif_receive_skb,syscalls:sys_enter_read,syscalls:sys_exit_read \
    -- dd if="$DEV" of=/dev/null bs="$BS" count="$COUNT" iflag=direct 2>&1 | tail -1 >&2
[ -n "$KEEP" ] && { mkdir -p "$KEEP"; cp "$WORK/perf.data" "$KEEP/"; }
perf script -i "$WORK/perf.data" -F comm,tid,cpu,time,event,trace 2>/dev/null >"$WORK/trace.txt"
BYTES=$(numfmt --from=iec "$BS")
python3 - "$WORK/trace.txt" "$IF_T" "$IF_I" "$BYTES" <<'EOF'
import bisect, re, sys
path, dev_t, dev_i, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
line = re.compile(r'\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)')
ev = []
for l in open(path):
    m = line.match(l)
    if m:
        comm, _, cpu, t, e, tr = m.groups()
        ev.append((float(t), comm, int(cpu), e, tr))
want = 'count: 0x%08x' % size
reads, start = [], None
for t, comm, cpu, e, tr in ev:
    if comm == 'dd' and e == 'syscalls:sys_enter_read' and want in tr:
        start = t
    elif comm == 'dd' and e == 'syscalls:sys_exit_read' and start is not None:
        reads.append((start, t))
        start = None
def length(tr):
    m = re.search(r'len=(\d+)', tr)
    return int(m.group(1)) if m else 0
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
print('%d reads; microseconds from dd entering read(), median (p10-p90):' % len(rows))
for k, name in enumerate(names):
    v = sorted(r[k] for r in rows)
    n = len(v)
    print('  %-32s %7.0f  (%.0f-%.0f)' % (name, v[n // 2], v[n // 10], v[9 * n // 10]))
t0, t1 = reads[5][0], reads[-1][1]
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
print('share of both CPUs during the reads: ' +
      ', '.join('%s %.1f%%' % (c, 100 * v / total)
                for c, v in sorted(occ.items(), key=lambda x: -x[1])[:8]))
EOF
