#!/usr/bin/env bash
# bench-initiator.sh - the initiator's data path against the raw generator and nbdkit, in one run.
#
# For each MTU: two private network namespaces joined by a veth pair (never the host's
# interfaces; both removed on exit, Ctrl-C included) and one backing file on tmpfs. For each
# AoE target (`aoe serve`, vblade), started alone in one namespace, it measures from the other:
#   raw      `aoe bench --mode read` (the generator: what the link and target can give)
#   dev      dd bs=1M iflag=direct from the FUSE device file of `aoe initiator`
#   nbd      nbdcopy from the initiator's NBD export to null:
#   dev-w    dd bs=1M oflag=direct to the device file      (WRITES=1)
#   nbd-w    nbdcopy from a tmpfs file to the NBD export   (WRITES=1)
# and, on the same veth with addresses, nbdkit's file plugin over TCP (started beside the
# target) read and written with nbdcopy (what a user would pick instead). The raw generator,
# each initiator and nbdkit take turns in RUNS rounds: every cell is the median of RUNS runs,
# its ratios the median of each round's ratio to the raw read and to nbdkit's transfer of the
# same round (what this minute of a shared machine gives each path), printed with the load
# average: compare figures of one run only. Each transfer's own MB/s is on stderr ("run ...").
# The initiator's CPU-seconds per GB are given for dev and nbd reads and, in their own column
# (WRITES=1), for dev and nbd writes.
#
# Usage: sudo scripts/bench-initiator.sh
#   AOE=target/release/aoe   MTUS="1500 9000"   TARGETS="aoe vblade" (others: TARGET_CMD_<name>,
#   as in bench-compare.sh)   SIZE_MB=1024
#   TIME=5 (raw generator seconds)   RUNS=3 (rounds counted; even: ABBA balanced)
#   WARMUP=1 (a first round of every item, not counted: no counted transfer is the first
#             after the target's or nbdkit's start)   ORDER=abba (the even rounds in reverse
#             order; fixed: always raw, the initiators in INITS's order, nbdkit)
#   WRITES=1   READS=1 (0: writes only, no raw
#             generator, dev or nbd reads)   WINDOW=64 (raw generator window)
#   RAW_ARGS="" (extra `aoe bench` flags for the raw cells, e.g. --rx-whole: the generator
#             receives each answer's data, as the initiator must, instead of its headers only)
#   DD_BS=1M (dd's block size)   DD_IFLAG=direct DD_OFLAG=direct (dd's iflag/oflag on the
#             device file; empty: through the page cache, e.g. DD_OFLAG= for buffered writes)
#   NBDKIT=1 (also nbdkit over TCP)   NBDKIT_ARGS="" (extra nbdkit flags, e.g. "-t 4": its
#             threads a connection)   INIT_ARGS="" (extra `aoe initiator` flags)
#   NBDCOPY_ARGS="" (extra nbdcopy flags for every nbdcopy, ours and nbdkit's alike, e.g.
#             "--connections=1" or "--requests=4": what the client's depth does to both paths)
#   INITS="$AOE"  initiator binaries to compare (e.g. INITS="target/release/aoe /tmp/aoe-old");
#             with more than one, each round measures them in turn (interleaved, not one after
#             the other), every row names its binary, and the target and raw generator stay $AOE;
#             an entry that is not a file is a name: INIT_AOE_<name> (binary, default AOE) and
#             INIT_ARGS_<name> (its own extra arguments, after INIT_ARGS), as in bench/fio.sh, e.g.
#             INITS="fuser ring" INIT_ARGS_ring=--fuse-uring ENABLE_URING=Y; NBD_TCP_<name>=1: that
#             name's NBD cells go over TCP (--nbd-tcp on its namespace's loopback) instead of the
#             Unix socket, e.g. INITS="unix tcp" NBD_TCP_tcp=1
#   ENABLE_URING=Y  set /sys/module/fuse/parameters/enable_uring for the run (restored on exit)
#   PERF=dir  record `perf record -g` of the initiator during dev and nbd reads into dir
#   (write rows: the initiator's CPU-seconds per GB written, dev / nbd, beside MB/s)
#   PERFALL=dir  record `perf record -a -g` (both CPUs: initiator, target, client, kernel) during
#             every dev and nbd transfer, read and written, and nbdkit's, into dir/<cell>.data,
#             and print per transfer each process's CPU-ms per MiB, user and kernel, and by
#             what it went to (copies, the veth's delivery, wake-ups, ...: bench/perf-split.sh)
#   WAKES=dir  record the whole machine's wake-ups (sched_waking, waker and wakee), its IPIs
#             and softirq context during every dev and nbd transfer and nbdkit's, into
#             dir/<cell>.data, and print per transfer the wake-ups per MiB by waker -> wakee
#             pair, the cross-CPU ones and the IPIs per MiB (wakes_during in bench/lib.sh)
#   FAULTS=dir  per dev and nbd transfer, the initiator's and the target's page faults (minor,
#             major), mmap/munmap/madvise/brk/mremap calls and CPU-ms per MiB (perf stat), the
#             machine's steal time per MiB (/proc/stat), and from `perf record -g -d` of the
#             initiator (dir/<cell>.data, its maps at the end in dir/<cell>.maps) its page
#             allocations by order and its faults by mapping (faults_during in bench/lib.sh)
#   XCOPY=1  before, 0.25 s into and after each dev and nbd transfer, what copying 256 KiB blocks that the
#             other CPU has just written costs, both ways, against the same CPU (ms per MiB,
#             scripts/bench/xcopy.c, compiled with gcc): the initiator's copy of ring data the
#             sender's softirq wrote on its own CPU costs that on top; on this VM it moves 10x
#             with the host's placement of the vCPUs
#   WARM_MB=1024  before each dev and nbd transfer (and nbdkit's), touch this many MiB of fresh
#             memory and free it (scripts/bench/freemem.c), printing what its first touch cost
#             per MiB: this VM's balloon hands free pages back to the host (free page reporting),
#             and the first write to such a page costs a host fault charged as the writer's own
#             CPU; the NBD socket's buffers are fresh pages for every reply, so the first NBD read
#             of an invocation after a quiet spell paid it (the "NBD read slow mode", 2-3x the
#             initiator's CPU per MiB). Warming first gives every cell the same backed pages.
#             0: off (every earlier session's runs).
#   COLD_MB=0  hold this many MiB of touched memory during each dev and nbd transfer (and
#             nbdkit's): the kernel then hands out pages from further down its free lists, those
#             the host took back, so the slow mode comes on purpose (what it costs each path)
#   RETX=1  also print, per write cell, the ATA frames the initiator sent and retransmitted
#             (its --metrics counters, scraped over the namespace's loopback): zero loss
#             means 0 retransmits
#   PERFSTAT=1  also print the initiator's system calls, context switches and page faults per MiB read
#             (perf stat), and the machine's steal time per MiB (/proc/stat), figures a loaded machine does not disturb; PERFSTAT=thread: the same
#             per thread name of the initiator (aoe-net, nbd-conn, ...), summed over its threads
#   INIT_LOG=1  after each run of an initiator, print on stderr the counters its network thread
#             logs as it stops (frames through the transmit ring and the linear sender, the
#             linear sender's full send buffers, kicks, polls, timeouts)
#   PERFSTATALL=1  instead, per transfer (nbdkit's included), from /proc/stat: each CPU's busy
#             share, and the whole machine's busy CPU and softirq time per MiB moved (which CPU
#             is full; what the parties in the table do not account for is someone else's)
#   (always, with reads: the raw generator's own CPU-seconds per GB and the target's during it,
#             on stderr: what the path's floor costs)
# Needs root, iproute2, util-linux (nsenter), jq, fuse3, libnbd-bin (nbdcopy), vblade,
# nbdkit (Debian: nbdkit), and perf for PERF (Debian: linux-perf).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/bench/lib.sh"
AOE=${AOE:-target/release/aoe}
MTUS=${MTUS:-1500 9000}
TARGETS=${TARGETS:-aoe vblade}
SIZE_MB=${SIZE_MB:-1024}
TIME=${TIME:-5}
NBDCOPY_ARGS=${NBDCOPY_ARGS:-}
RUNS=${RUNS:-3}
WRITES=${WRITES:-1}
READS=${READS:-1}
WINDOW=${WINDOW:-64}
NBDKIT=${NBDKIT:-1}
DD_BS=${DD_BS:-1M}
DD_IFLAG=${DD_IFLAG-direct}
DD_OFLAG=${DD_OFLAG-direct}
INIT_ARGS=${INIT_ARGS:-}
RAW_ARGS=${RAW_ARGS:-}
PERF=${PERF:-}
PERFSTAT=${PERFSTAT:-0}
PERFSTATALL=${PERFSTATALL:-0}
PERFALL=${PERFALL:-}
WAKES=${WAKES:-}
FAULTS=${FAULTS:-}
XCOPY=${XCOPY:-0}
WARM_MB=${WARM_MB:-1024}
COLD_MB=${COLD_MB:-0}
RETX=${RETX:-0}
INIT_LOG=${INIT_LOG:-0}
WARMUP=${WARMUP:-1}
ORDER=${ORDER:-abba}
METRICS_ADDR=127.0.0.1:9477
[ "$RETX" = 1 ] && INIT_ARGS+=" --metrics $METRICS_ADDR"
SHELF=1 SLOT=1

die() { echo "bench-initiator: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (namespaces, raw sockets, FUSE)"
for t in ip nsenter jq awk dd nbdcopy fusermount3; do
    command -v "$t" >/dev/null || die "missing $t (Debian: iproute2, util-linux, jq, gawk, coreutils, libnbd-bin, fuse3)"
done
[ "$NBDKIT" = 1 ] && { command -v nbdkit >/dev/null || die "missing nbdkit (Debian: nbdkit)"; }
[ -x "$AOE" ] || die "no aoe binary at $AOE (cargo build --release, or set AOE=)"
[ "$XCOPY" = 1 ] && { command -v gcc >/dev/null || die "missing gcc for XCOPY=1 (Debian: gcc)"; }
AOE=$(readlink -f "$AOE")
INITS=${INITS:-$AOE}
INIT_BINS=() INIT_EXTRA=() INIT_NAMES=()
for b in $INITS; do
    if [ -f "$b" ]; then
        INIT_BINS+=("$(readlink -f "$b")") INIT_EXTRA+=("") INIT_NAMES+=("$(readlink -f "$b")")
    else
        # A name: its binary and arguments from INIT_AOE_<name> and INIT_ARGS_<name>.
        a="INIT_AOE_$b" g="INIT_ARGS_$b"
        [ -x "${!a:-$AOE}" ] || die "no initiator binary for $b (INIT_AOE_$b=${!a:-})"
        INIT_BINS+=("$(readlink -f "${!a:-$AOE}")") INIT_EXTRA+=("${!g:-}") INIT_NAMES+=("$b")
        # NBD_TCP_<name>=1: this initiator's NBD cells over TCP on its namespace's loopback.
        t="NBD_TCP_$b"; [ "${!t:-0}" = 1 ] && INIT_EXTRA[-1]+=" --nbd-tcp 127.0.0.1:10810"
    fi
done
INIT_AOE=${INIT_BINS[0]}
INIT_ARGS0=$INIT_ARGS
ENABLE_URING=${ENABLE_URING:-}
URING_PARAM=/sys/module/fuse/parameters/enable_uring URING_OLD=

bench_workspace bi bench-initiator
[ "$XCOPY" = 1 ] && gcc -O2 -Wall -pthread -o "$WORK/xcopy" "$HERE/bench/xcopy.c"
if [ "$WARM_MB" != 0 ] || [ "$COLD_MB" != 0 ]; then
    command -v gcc >/dev/null || die "missing gcc for WARM_MB/COLD_MB (Debian: gcc; WARM_MB=0 to go without)"
    gcc -O2 -Wall -o "$WORK/freemem" "$HERE/bench/freemem.c"
    avail=$(awk '/^MemAvailable:/ { print int($2 / 1024) }' /proc/meminfo)
    [ $(( WARM_MB + COLD_MB + 2 * SIZE_MB )) -lt "$avail" ] ||
        die "WARM_MB=$WARM_MB COLD_MB=$COLD_MB and two files of $SIZE_MB MiB do not fit the $avail MiB available"
fi
IP_T=10.91.0.1 IP_I=10.91.0.2
SRC=/dev/shm/aoe-bench-initiator-$TAG.src
cleanup_more() {
    [ -n "$URING_OLD" ] && echo "$URING_OLD" >"$URING_PARAM"
    rm -f "$SRC"
}

# CPU-seconds per GB of $1 ticks spent moving RUNS times SIZE_MB MiB (cpu_ticks, HZ: lib.sh).
per_gb() {
    awk -v t="$1" -v hz="$HZ" -v b=$(( RUNS * (SIZE_MB << 20) )) \
        'BEGIN { printf "%.2f\n", (t / hz) / (b / 1e9) }'
}
child_ticks() { awk '{ sub(/^.*\) /, ""); print $14 + $15 }' "/proc/$1/stat"; } # pid
# MB/s of moving SIZE_MB MiB in the seconds a command took.
timed() { # cmd... -> MB/s on stdout; the command's CPU ticks (children waited for) to $WORK/cl
    local t0 t1 k0 me=$BASHPID
    # This shell's cutime + cstime before and after: the client (dd, or nsenter and its
    # nbdcopy) it reaped in between.
    k0=$(child_ticks "$me")
    t0=$(date +%s.%N); "$@" >/dev/null 2>&1 || { echo 0; return; }; t1=$(date +%s.%N)
    echo $(( $(child_ticks "$me") - k0 )) >>"$WORK/cl"
    awk -v b=$((SIZE_MB << 20)) -v a="$t0" -v z="$t1" 'BEGIN { printf "%.0f\n", b / (z - a) / 1e6 }'
}

# The client's CPU ticks that `timed` noted since the last call (and forgets them).
client_ticks() {
    awk '{ s += $1 } END { print s + 0 }' "$WORK/cl" 2>/dev/null || echo 0
    : >"$WORK/cl"
}
# The command, with each CPU's busy share, the whole machine's busy CPU and the softirq time
# per MiB moved noted from /proc/stat (PERFSTATALL): one line per transfer on stderr, beside
# the table's per-party CPU-s/GB (whatever else runs on the machine is in the busy figure).
sys_during() { # name cmd...
    local name=$1; shift
    grep '^cpu[0-9]' /proc/stat >"$WORK/cpu0"
    "$@"
    grep '^cpu[0-9]' /proc/stat >"$WORK/cpu1"
    # /proc/stat: user nice system idle iowait irq softirq steal, in ticks.
    paste -d' ' "$WORK/cpu0" "$WORK/cpu1" | awk -v hz="$HZ" -v mib="$SIZE_MB" -v n="$name" '{
        k = (NF - 2) / 2; t0 = 0; t1 = 0
        for (i = 2; i <= 9; i++) { t0 += $i; t1 += $(i + k + 1) }
        idle = ($(5 + k + 1) + $(6 + k + 1)) - ($5 + $6)
        out = out sprintf("%s busy %.0f%%, ", $1, (t1 - t0) > 0 ? 100 * (1 - idle / (t1 - t0)) : 0)
        busy += (t1 - t0) - idle; si += $(8 + k + 1) - $8; st += $(9 + k + 1) - $9 }
        END { printf "proc stat %s: %sbusy %.2f CPU-ms/MiB, of it softirq %.3f, steal %.3f\n",
              n, out, busy / hz * 1000 / mib, si / hz * 1000 / mib, st / hz * 1000 / mib }' >&2
}
# Before a transfer (outside what perf_during measures): WARM_MB's touch of fresh memory,
# and COLD_MB's hold of memory, released by mem_after once the transfer is done.
HOLD_PID=""
mem_before() { # name
    [ "$WARM_MB" = 0 ] || echo "freemem $1: $("$WORK/freemem" warm "$WARM_MB")" >&2
    [ "$COLD_MB" = 0 ] && return 0
    local line
    coproc HOLD { exec "$WORK/freemem" hold "$COLD_MB"; }
    HOLD_PID=$HOLD_PID
    # Its one line once every page is touched (or nothing, if it failed).
    read -r -t 120 -u "${HOLD[0]}" line || die "freemem hold $COLD_MB did not report"
    echo "freemem $1: $line" >&2
}
mem_after() {
    [ -n "$HOLD_PID" ] || return 0
    exec {HOLD[1]}>&-
    wait "$HOLD_PID" 2>/dev/null || true
    HOLD_PID=""
}
perf_during() { # name cmd... : the command, with perf recording the initiator if PERF is set
    local name=$1 out; shift
    mem_before "$name"
    out=$(perf_during_xcopy "$name" "$@")
    mem_after
    run_line "$name" "$out"
    echo "$out"
}
# Every transfer's own MB/s on stderr, with the time and the load (the table keeps medians):
# which run of a cell was the slow one, and in which order it ran.
run_line() { # name MB/s
    echo "run $(date -u +%T) $1: $2 MB/s, load $(load)" >&2
}
perf_during_xcopy() { # name cmd...
    local name=$1; shift
    [ "$XCOPY" = 1 ] || { perf_during_inner "$name" "$@"; return; }
    xcopy_line "$name before"
    # One probe during the transfer too (0.25 s in, taking some 10-50 ms of a CPU from it).
    (sleep 0.25; xcopy_line "$name during") &
    local probe=$!
    perf_during_inner "$name" "$@"
    wait "$probe" 2>/dev/null || true
    xcopy_line "$name after"
}
# What copying 256 KiB just written by the other CPU costs now, both ways, against the same
# CPU (scripts/bench/xcopy.c; XCOPY=1): one line on stderr.
xcopy_line() { # label
    local a b
    a=$("$WORK/xcopy" 1 0) b=$("$WORK/xcopy" 0 1)
    echo "xcopy $1: written on cpu1 copied on cpu0 ${a#* cross }, cpu0 -> cpu1 ${b#* cross } ms/MiB (same CPU ${a#same }" | sed 's/ cross [0-9.]*$/)/' >&2
}
perf_during_inner() { # name cmd...
    local name=$1; shift
    if [ -n "$FAULTS" ]; then
        FAULTS_PIDS="$INIT_PID $TARGET_PID" faults_during "$FAULTS" "$name" "$SIZE_MB" "$@"
    elif [ -n "$WAKES" ]; then
        WAKES_PIDS="$INIT_PID $TARGET_PID" wakes_during "$WAKES" "$name" "$SIZE_MB" "$@"
    elif [ "$PERFSTATALL" = 1 ]; then
        sys_during "$name" "$@"
    elif [ -n "$PERFALL" ]; then
        mkdir -p "$PERFALL"
        beside_perf record -q -a -g -o "$PERFALL/$name.data" -- "$@"
        # Per process, CPU-ms per MiB by what it went to (bench/perf-split.sh), on stderr.
        "$HERE/bench/perf-split.sh" "$PERFALL/$name.data" "$SIZE_MB" \
            ${INIT_PID:+initiator=$INIT_PID} ${TARGET_PID:+target=$TARGET_PID} 2>/dev/null |
            sed "s/^/perf split $name: /" >&2 || true
    elif [ "$PERFSTAT" = thread ]; then
        beside_perf stat -x, --per-thread -e raw_syscalls:sys_enter,context-switches,task-clock \
            -p "$INIT_PID" -o "$WORK/stat" -- "$@"
        # --per-thread lines: comm-tid,value,unit,event,...; summed by thread name.
        awk -F, -v mib="$SIZE_MB" -v n="$name" '
            NF >= 4 && $1 !~ /^#/ { c = $1; sub(/-[0-9]+$/, "", c); names[c] = 1
                if ($4 == "raw_syscalls:sys_enter") sc[c] += $2
                if ($4 == "context-switches") cs[c] += $2
                if ($4 == "task-clock") tc[c] += $2 }
            END { for (c in names) if (tc[c] > 0)
                printf "perf stat %s thread %s: %.1f syscalls/MiB, %.1f context switches/MiB, %.2f CPU-ms/MiB\n",
                    n, c, sc[c] / mib, cs[c] / mib, tc[c] / mib }' "$WORK/stat" >&2
    elif [ "$PERFSTAT" = 1 ]; then
        local st0
        st0=$(awk '/^cpu / { print $9 }' /proc/stat)
        beside_perf stat -x, -e raw_syscalls:sys_enter,context-switches,page-faults,task-clock \
            -p "$INIT_PID" -o "$WORK/stat" -- "$@"
        # Steal: the ticks the host ran something else while a vCPU of this guest was runnable.
        awk -F, -v mib="$SIZE_MB" -v n="$name" -v st="$(( $(awk '/^cpu / { print $9 }' /proc/stat) - st0 ))" -v hz="$HZ" '
            $3 == "raw_syscalls:sys_enter" { sc = $1 } $3 == "context-switches" { cs = $1 }
            $3 == "page-faults" { pf = $1 } $3 == "task-clock" { tc = $1 }
            END { printf "perf stat %s: %.1f syscalls/MiB, %.1f context switches/MiB, %.1f page faults/MiB, %.2f CPU-ms/MiB; machine steal %.3f CPU-ms/MiB\n",
                  n, sc / mib, cs / mib, pf / mib, tc / mib, st / hz * 1000 / mib }' "$WORK/stat" >&2
    elif [ -n "$PERF" ]; then
        mkdir -p "$PERF"
        beside_perf record -q -g -p "$INIT_PID" -o "$PERF/$name.data" -- "$@"
    else
        "$@"
    fi
}

# The initiator's counters summed over its devices (--metrics): frames sent, retransmitted,
# presumed lost by timeout, later answers and tail probe, and losses answered after all
# (spurious), and answers that overtook an earlier frame (-1 where the binary does not count
# them); all 0 without RETX=1.
retx_counts() {
    [ "$RETX" = 1 ] || { echo "0 0 0 0 0 0 0"; return; }
    in_i curl -s "http://$METRICS_ADDR/metrics" | awk '
        /^aoe_initiator_frames_sent(_total)?[{ ]/ { s += $NF }
        /^aoe_initiator_retransmits(_total)?[{ ]/ { r += $NF }
        /^aoe_initiator_losses(_total)?[{ ].*found_by="timeout"/ { t += $NF }
        /^aoe_initiator_losses(_total)?[{ ].*found_by="later_answers"/ { l += $NF }
        /^aoe_initiator_losses(_total)?[{ ].*found_by="tail_probe"/ { p += $NF }
        /^aoe_initiator_spurious_losses(_total)?[{ ]/ { u += $NF }
        /^aoe_initiator_overtaking_answers(_total)?[{ ]/ { o += $NF; seen = 1 }
        END { printf "%d %d %d %d %d %d %d\n", s, r, t, l, p, u, seen ? o : -1 }'
}
# The counts (retx_counts) once at least "$1" frames were sent. The endpoint reads what the
# initiator's network thread last published, which it does at most every 250 ms while I/O
# completes and within its next wake-up (a second) after the I/O stops: scraped at once after
# a transfer, it left out the transfer's last quarter second. Until session 36 this printed
# "0 of 1 frames" for NBD writes at MTU 9000, 64 MiB taking less than that: the counts
# before and after were the same stale publication. So wait (5 s at most) until the count
# covers the frames the transfers so far needed at least (frames_floor).
retx_wait() { # frames
    local n c
    for n in $(seq 50); do
        c=$(retx_counts)
        [ "${c%% *}" -ge "$1" ] && { echo "$c"; return; }
        sleep 0.1
    done
    echo "bench-initiator: the initiator's frame count stayed at ${c%% *}, under $1" >&2
    echo "$c"
}
# The fewest ATA frames a transfer of the whole SIZE_MB needs at MTU "$1": each carries at
# most the whole 512-byte sectors that fit after the Ethernet (14), AoE (10) and ATA (12)
# headers (AoEr11 section 3.1), 2 at 1500 and 17 at 9000.
frames_floor() { # mtu
    local per=$(( ($1 - 36) / 512 * 512 ))
    echo $(( ((SIZE_MB << 20) + per - 1) / per ))
}
# Prints on stderr what the counts moved since "$2" (retx_counts), once the count covers "$3"
# frames (retx_wait).
retx_report() { # cell counts-before frames
    [ "$RETX" = 1 ] || return 0
    local now; now=$(retx_wait "$3")
    awk -v c="$1" -v a="$2" -v b="$now" 'BEGIN { split(a, x, " "); split(b, y, " ");
        printf "retransmits %s: %d of %d frames (timeout %d, later answers %d, tail probe %d; answered after all %d); answers overtaking %s\n",
            c, y[2] - x[2], y[1] - x[1], y[3] - x[3], y[4] - x[4], y[5] - x[5], y[6] - x[6], y[7] < 0 ? "-" : y[7] - x[7] }' >&2
}

ROWS=()
row() { ROWS+=("$1"); echo "$1" >&2; }
# One nbdkit transfer: its MB/s, under `perf_during` with PERFSTATALL, PERFALL or WAKES (the
# whole machine: nbdkit, nbdcopy and the kernel), for the same accounts as our cells; with
# WARM_MB or COLD_MB as our cells have them whatever is recorded.
kit_one() { # name cmd...
    local name=$1 v; shift
    if [ "$PERFSTATALL" = 1 ] || [ -n "$PERFALL" ] || [ -n "$WAKES" ]; then
        perf_during "$name" timed "$@"
    else
        mem_before "$name"; v=$(timed "$@"); mem_after; run_line "$name" "$v"; echo "$v"
    fi
}
# One raw generator run: its MB/s on stdout; the bytes it moved, its own CPU ticks and the
# target's appended to $WORK/raw (what the path's floor costs per GB: `raw_cpu`).
raw_read() {
    local me=$BASHPID k0 t0 json
    k0=$(child_ticks "$me") t0=$(cpu_ticks "$TARGET_PID")
    # shellcheck disable=SC2086 # RAW_ARGS: flags, split on purpose
    json=$(in_i "$AOE" bench "$IF_I" --target "$SHELF.$SLOT" --mode read --window "$WINDOW" \
        --time "$TIME" $RAW_ARGS --json)
    echo "$(jq -r '.bytes' <<<"$json") $(( $(child_ticks "$me") - k0 )) $(( $(cpu_ticks "$TARGET_PID") - t0 ))" >>"$WORK/raw"
    jq -r '.mb_per_s | floor' <<<"$json"
}
# The raw generator's and the target's CPU-seconds per GB over the runs noted in $WORK/raw
# (then forgotten), on stderr beside the perf stat lines.
raw_cpu() { # mtu target
    [ -s "$WORK/raw" ] || return 0
    awk -v hz="$HZ" -v m="$1" -v t="$2" '{ b += $1; g += $2; s += $3 }
        END { if (b > 0) printf "raw %s %s: CPU-s/GB generator %.2f, target %.2f (%d runs)\n", m, t, g / hz / (b / 1e9), s / hz / (b / 1e9), NR }' \
        "$WORK/raw" >&2
    : >"$WORK/raw"
}

if [ -n "$ENABLE_URING" ]; then
    [ -w "$URING_PARAM" ] || die "no $URING_PARAM (a kernel without FUSE over io_uring?)"
    URING_OLD=$(cat "$URING_PARAM"); echo "$ENABLE_URING" >"$URING_PARAM"
fi
echo "backing file: $SIZE_MB MiB on tmpfs; $(nproc) CPUs; load $(load)" >&2
head -c $((SIZE_MB << 20)) /dev/urandom >"$FILE"
[ "$WRITES" = 1 ] && head -c $((SIZE_MB << 20)) /dev/urandom >"$SRC"
URI0="nbd+unix:///e$SHELF.$SLOT?socket=$SOCK" URI=$URI0

# One round's turn of the raw generator (run r): its MB/s noted in RV (every run) and RR (by run).
raw_round() { # run
    local v
    v=$(raw_read)
    run_line "raw-$t-$mtu-$1" "$v"
    RV+="$v " RR[$1]=$v
}
# One round's turn of nbdkit (run r): a read and (WRITES=1) a write, noted in KV (every run),
# KR (by run) and nbdkit's (KT) and the client's (KC) CPU ticks.
kit_round() { # run
    local r=$1 s0 s1 v
    : >"$WORK/cl"
    s0=$(cpu_ticks "$KIT_PID")
    v=$(kit_one "kit-$t-$mtu-$r" in_i nbdcopy $NBDCOPY_ARGS "nbd://$IP_T:10809" null:)
    s1=$(cpu_ticks "$KIT_PID")
    KV[r]+="$v " KR[r,$r]=$v KT[r]=$(( ${KT[r]:-0} + s1 - s0 )) KC[r]=$(( ${KC[r]:-0} + $(client_ticks) ))
    [ "$WRITES" = 1 ] || return 0
    v=$(kit_one "kitw-$t-$mtu-$r" in_i nbdcopy $NBDCOPY_ARGS "$SRC" "nbd://$IP_T:10809")
    s0=$(cpu_ticks "$KIT_PID")
    KV[w]+="$v " KR[w,$r]=$v KT[w]=$(( ${KT[w]:-0} + s0 - s1 )) KC[w]=$(( ${KC[w]:-0} + $(client_ticks) ))
}
# One round's turn of initiator k (run r): started, dev and nbd reads, dev and nbd writes,
# stopped. Each transfer's MB/s noted in V (every run) and VR (by run), and the CPU ticks the
# initiator (TK), the target (TT) and the client (TC) spent in it.
init_round() { # k run
    local k=$1 r=$2 c v c0 d0 c1 d1 rc= fr=0
    local -a cells=()
    INIT_AOE=${INIT_BINS[$k]} INIT_ARGS="$INIT_ARGS0 ${INIT_EXTRA[$k]}"
    URI=$URI0
    case "$INIT_ARGS" in *--nbd-tcp\ 127.0.0.1:10810*) URI="nbd://127.0.0.1:10810/e$SHELF.$SLOT" ;; esac
    [ "$READS" = 1 ] && cells+=(dev nbd)
    [ "$WRITES" = 1 ] && cells+=(devw nbdw)
    start_initiator
    : >"$WORK/cl"
    for c in "${cells[@]}"; do
        c0=$(cpu_ticks "$INIT_PID") d0=$(cpu_ticks "$TARGET_PID")
        case $c in devw | nbdw) [ "$RETX" = 1 ] && rc=$(retx_wait "$fr") ;; esac
        case $c in
            dev) v=$(perf_during "dev-$t-$mtu-$k-$r" timed \
                dd if="$ROOT/e$SHELF.$SLOT" of=/dev/null bs="$DD_BS" iflag="${DD_IFLAG:+$DD_IFLAG,}count_bytes" \
                count=$((SIZE_MB << 20))) ;;
            nbd) v=$(perf_during "nbd-$t-$mtu-$k-$r" timed in_i nbdcopy $NBDCOPY_ARGS "$URI" null:) ;;
            devw) v=$(perf_during "devw-$t-$mtu-$k-$r" timed dd if="$SRC" \
                of="$ROOT/e$SHELF.$SLOT" bs="$DD_BS" ${DD_OFLAG:+oflag=$DD_OFLAG} conv=notrunc) ;;
            nbdw) v=$(perf_during "nbdw-$t-$mtu-$k-$r" timed in_i nbdcopy $NBDCOPY_ARGS "$SRC" "$URI") ;;
        esac
        c1=$(cpu_ticks "$INIT_PID") d1=$(cpu_ticks "$TARGET_PID")
        V[$c,$k]+="$v " VR[$c,$k,$r]=$v
        TK[$c,$k]=$(( ${TK[$c,$k]:-0} + c1 - c0 )) TT[$c,$k]=$(( ${TT[$c,$k]:-0} + d1 - d0 ))
        TC[$c,$k]=$(( ${TC[$c,$k]:-0} + $(client_ticks) ))
        fr=$(( fr + $(frames_floor "$mtu") ))
        [ -z "$rc" ] || retx_report "$c-$t-$mtu-$k-$r" "$rc" "$fr"
    done
    stop_pid "$INIT_PID"; INIT_PID=""; fusermount3 -u -z "$ROOT" 2>/dev/null || true
    [ "$INIT_LOG" = 1 ] && grep -E 'transmit ring"?|network thread loop' "$WORK/init.log" |
        sed "s/^/initiator log $t-$mtu-$k-$r: /" >&2 || true
}
# The median over the runs of a cell's MB/s over its reference's in the same round (raw: the
# raw generator's read; r, w: nbdkit's read, write), as "0.93x", or "-". With an even count
# (ABBA wants one) the geometric mean of the two middle ratios, not the lower one: with four
# rounds the lower middle is the second lowest.
same_round() { # cell k raw|r|w
    local c=$1 k=$2 ref=$3 r a b out=""
    for r in $(seq 1 "$RUNS"); do
        a=${VR[$c,$k,$r]:-}
        if [ "$ref" = raw ]; then b=${RR[$r]:-}; else b=${KR[$ref,$r]:-}; fi
        [ -n "$a" ] && [ -n "$b" ] && [ "$b" != 0 ] && out+="$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.4f", a / b }') "
    done
    [ -n "$out" ] || { echo -; return; }
    printf '%s\n' $out | sort -g | awk '{ a[NR] = $1 }
        END { m = (NR % 2) ? a[(NR + 1) / 2] : sqrt(a[NR / 2] * a[NR / 2 + 1]); printf "%.2fx\n", m }'
}

# A pass per MTU and target: the items (the raw generator, each initiator, nbdkit) take turns
# in every round, a discarded warm-up round first (WARMUP=1), in ABBA order (ORDER=abba: the
# even rounds reversed), so that no item is always first after a start or after the same
# neighbour, and every cell has its references measured beside it in the same round.
for mtu in $MTUS; do
    bench_link "$mtu"
    for t in $TARGETS; do
        start_target "$t" || die "$t did not answer"
        [ "$NBDKIT" = 1 ] && start_nbdkit
        ITEMS=()
        [ "$READS" = 1 ] && ITEMS+=(raw)
        ITEMS+=("${!INIT_BINS[@]}")
        [ "$NBDKIT" = 1 ] && ITEMS+=(kit)
        declare -A V=() VR=() TK=() TT=() TC=() RR=() KV=() KR=() KT=() KC=()
        RV=""
        for run in $(seq $(( WARMUP ? 0 : 1 )) "$RUNS"); do
            if [ "$run" = 1 ]; then
                # The warm-up round (run 0) is not counted.
                V=() VR=() TK=() TT=() TC=() RR=() KV=() KR=() KT=() KC=() RV=""
                : >"$WORK/raw"
            fi
            order=("${ITEMS[@]}")
            if [ "$ORDER" = abba ] && [ $(( run % 2 )) = 0 ]; then
                order=(); for it in "${ITEMS[@]}"; do order=("$it" "${order[@]}"); done
            fi
            echo "round $run ($([ "$run" = 0 ] && echo "warm-up, not counted" || echo counted)): ${order[*]}" >&2
            for it in "${order[@]}"; do
                case $it in
                    raw) raw_round "$run" ;;
                    kit) kit_round "$run" ;;
                    *) init_round "$it" "$run" ;;
                esac
            done
        done
        [ "$NBDKIT" = 1 ] && { stop_pid "$KIT_PID"; KIT_PID=""; }
        stop_pid "$TARGET_PID"; TARGET_PID=""
        raw=-
        [ -n "$RV" ] && raw=$(printf '%s\n' $RV | median) && raw_cpu "$mtu" "$t"
        for k in "${!INIT_BINS[@]}"; do
            med() { [ -n "${V[$1,$k]:-}" ] && printf '%s\n' ${V[$1,$k]} | median || echo -; }
            dev=$(med dev) nbd=$(med nbd) devw=$(med devw) nbdw=$(med nbdw)
            label=$t
            [ "${#INIT_BINS[@]}" -gt 1 ] && label="$t, initiator ${INIT_NAMES[$k]}"
            # CPU-s/GB of one party (array name) over the cells present: dev / nbd [/ devw / nbdw]
            cpus() {
                local -n a=$1
                local out c
                for c in dev nbd devw nbdw; do
                    [ -n "${a[$c,$k]:-}" ] && out+="${out:+ / }$(per_gb "${a[$c,$k]}")"
                done
                echo "${out:--}"
            }
            # Against nbdkit in the same round: dev / nbd reads [/ dev / nbd writes].
            kit=-
            if [ "$NBDKIT" = 1 ]; then
                kit=""
                [ "$READS" = 1 ] && kit="$(same_round dev "$k" r) / $(same_round nbd "$k" r)"
                [ "$WRITES" = 1 ] && kit+="${kit:+ / }$(same_round devw "$k" w) / $(same_round nbdw "$k" w)"
            fi
            row "| $mtu | $label | $raw | $dev ($(same_round dev "$k" raw)) | $nbd ($(same_round nbd "$k" raw)) | $devw | $nbdw | $kit | $(cpus TK) | $(cpus TT) | $(cpus TC) | $(load) |"
        done
        if [ "$NBDKIT" = 1 ]; then
            kmed() { [ -n "${KV[$1]:-}" ] && printf '%s\n' ${KV[$1]} | median || echo -; }
            kcpu=- kccpu=-
            [ -n "${KV[r]:-}" ] && kcpu=$(per_gb "${KT[r]}") kccpu=$(per_gb "${KC[r]}")
            [ -n "${KV[w]:-}" ] && kcpu+=" / $(per_gb "${KT[w]}")" kccpu+=" / $(per_gb "${KC[w]}")"
            row "| $mtu | nbdkit (TCP), beside $t | | | $(kmed r) | | $(kmed w) | | | $kcpu | $kccpu | $(load) |"
        fi
        unset V VR TK TT TC RR KV KR KT KC
    done
done

echo
echo "MB/s, median of $RUNS rounds (the lower middle of an even count)$([ "$WARMUP" = 1 ] && echo " after a discarded warm-up round"), order $ORDER; (x) = the median of each round's ratio to the raw read of the same round"
echo "(of an even count the geometric mean of the two middle ratios);"
echo "raw = aoe bench read window $WINDOW${RAW_ARGS:+ $RAW_ARGS}; dev = dd bs=$DD_BS iflag=${DD_IFLAG:-(none)} oflag=${DD_OFLAG:-(none)} on the FUSE file; nbd = nbdcopy; $(date -u +%F) $(nproc) CPUs"
echo "CPU-s/GB = user+system CPU-seconds per GB moved, per cell: dev read / nbd read / dev write / nbd write (nbdkit: read / write),"
echo "the figures a loaded machine disturbs least; initiator = aoe initiator; target = aoe serve, vblade or nbdkit, which on"
echo "a veth also pays for delivering its replies into the initiator's socket; client = dd or nbdcopy (with nsenter)"
echo "/ nbdkit = the same, to nbdkit's read (dev read / nbd read) and write (dev write / nbd write) of the same round"
echo "| MTU | target | raw read | dev read | nbd read | dev write | nbd write | / nbdkit, same round | initiator CPU-s/GB | target CPU-s/GB | client CPU-s/GB | load |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
