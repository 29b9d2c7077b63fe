#!/usr/bin/env bash
# bench-compare.sh - compare AoE targets, generators and whole paths in one run.
#
# For each MTU it makes two private network namespaces joined by a veth pair (never the
# host's interfaces; both are removed on exit, Ctrl-C included) and puts a backing file on
# tmpfs. Then:
#
# 1. Targets under load generators: for each (mode, window, target) it starts the target
#    alone in one namespace and drives it from the other, for TIME seconds, with each
#    generator in GENS: `aoe bench --json` ("aoe") and scripts/bench/aoegen.c ("c"), a minimal
#    independent generator in C compiled here with gcc, the cross-check that `aoe bench` is not
#    the limit. The target's user+system CPU time comes from /proc/PID/stat before and after.
#    Targets and generators are interleaved per cell, so a busy machine slows them alike.
#    With RATE or RATE_MB, each cell then runs again at equal load: every target offered the
#    same MB/s by `aoe bench --rate`, so that CPU per GB compares the work a byte costs each
#    target rather than how fast it saturates (on a veth the sender pays for the receiver's
#    delivery, so a saturated target runs at ~100% of its core whatever its MB/s). A second
#    table gives the achieved MB/s, the target's CPU-s per GB, the system and softirq time of
#    the target's CPU (/proc/stat, PIN=1 or fifo only: then the target has CPU 0 to itself
#    while it runs), p50/p99 latency from the send and p99 from the rate's schedule.
# 2. Whole paths (PATHS=1): `aoe serve` (and the other INIT_TARGETS) with `aoe initiator` in the
#    other namespace, reading and writing the whole file through the device file (dd bs=1M
#    iflag=direct / oflag=direct) and through the initiator's NBD socket (nbdcopy); and the
#    baseline a user would pick instead, nbdkit serving the same file over TCP on the same
#    veth, read and written with nbdcopy. Ratios: against the best raw `aoe bench` figure for
#    the same target and direction at that MTU, and against nbdkit.
#
# Usage: sudo scripts/bench-compare.sh            (all settings from the environment)
#   AOE=target/release/aoe    the aoe binary (generator, `aoe` target, initiator)
#   TARGETS="vblade aoe ggaoed"  targets in order; a name without a built-in command needs
#                             TARGET_CMD_<name>='cmd ... {shelf} {slot} {netif} {file}'
#   GENS="aoe c"              load generators: `aoe bench`, the C cross-check; any other name
#                             needs GEN_AOE_<name>='aoe-binary [bench flags...]', another
#                             `aoe bench` (an older build, other flags), e.g.
#                             GENS="aoe c old" GEN_AOE_old=/tmp/aoe-old
#   MTUS="1500 9000"  MODES="read randread write"  WINDOWS="16 64"  TIME=3  SIZE_MB=512
#   RANDBS=4096       request size for randread/randwrite (capped by the MTU); read and write
#                     use the MTU's most
#   RUNS=1            rounds per cell, each running every generator once (interleaved); the
#                     median MB/s is reported (the lower middle
#                     for an even count)
#   RATE="0.25 0.5"   equal-load rows at these fractions of RATE_BASE's saturated `aoe bench`
#                     MB/s in the same cell, measured just before in the same run (needs
#                     "aoe" in GENS); RATE_BASE=vblade (default: the slowest target of the cell)
#   RATE_MB="200"     equal-load rows at these absolute MB/s instead (10^6 bytes per second)
#                     Each load runs RUNS rounds, targets interleaved, their order reversed
#                     every other round; medians per column. A target that reaches less than
#                     95% of the asked rate is marked: its row is a saturated one.
#   PIN=0             1: target on CPU 0, generator/initiator/client on CPU 1 (taskset);
#                     fifo: the same, both also SCHED_FIFO 10 (chrt), for a machine loaded
#                     by other work (not the default: it starves that work meanwhile). A side
#                     that saturates its CPU is throttled by the kernel's realtime bandwidth
#                     (sched_rt_runtime_us 950000 of 1000000): off its CPU for up to 50 ms
#                     once a second, which both generators' 20 ms timers see as a whole
#                     window of (spurious) retransmits (docs/PERFORMANCE.md, "Retransmits
#                     against aoe serve below its buffer count"; DROPS tells them apart)
#   PATHS=1           0: skip the initiator and nbdkit rows
#   INIT_TARGETS="aoe vblade"  targets the initiator is measured against
#   PERF_STAT=1       with RATE/RATE_MB: `perf stat` of the target over each equal-load run,
#                     per request (task-clock us, context switches, system calls) in
#                     OUT.perfstat.tsv
#   PERF_DIR=path     record `perf record -g` of the target and of the generator per cell
#                     (perf is given 60 s to write its file: on a loaded machine the build ids
#                     of a 55 MB binary with debug info took more than the 3 s other
#                     processes get, and the kill left files without samples)
#                     there (PATH.target.data, PATH.gen.data, and a top-20 .txt of each);
#                     with RATE/RATE_MB also of the target over each equal-load run
#                     (eq-MTU-MODE-wW-LOAD-TARGET-rROUND.target.data, a top-40 .txt)
#                     (a perf attached to the target, here and for GEN_STAT and PERF_STAT,
#                     starts disabled and is enabled through its control fifo before the
#                     generator starts; with PIN=fifo it runs at SCHED_FIFO 20)
#   GEN_STAT=dir      `perf stat` of the generator and of the target over each generator run
#                     (dir/CELL-ROUND.gen.csv, .target.csv) and one row per run in
#                     dir/stat.tsv: per request, each side's task-clock (us), context
#                     switches, system calls, and the calls that shape the reply pattern
#                     (the generator's recvmmsg calls that returned replies and its ppoll
#                     sleeps; the target's poll/ppoll waits, recvmmsg, and sendmmsg/sendto,
#                     a transmit ring's kick being a sendto, and its pread/preadv2
#                     calls), and each CPU's idle share (%, /proc/stat) from 1 s into the
#                     run to 0.5 s before its end (with PIN: CPU 0 the target's, CPU 1 the
#                     generator's; a side that spins counts as busy); on a veth each side's
#                     task-clock includes the delivery of its frames into the other's socket
#   DROPS=dir         where each generator run's retransmits come from: `perf record` of the
#                     kernel's skb:kfree_skb tracepoint for AoE frames (ethertype 0x88a2),
#                     system-wide, over the run (a frame dropped in the target's or the
#                     generator's receive ring is FULL_RING/SOCKET_RCVBUFF in tpacket_rcv /
#                     packet_rcv, a full backlog CPU_BACKLOG, a veth drop its own location),
#                     /proc/net/softnet_stat's drops and both veth ends' drop counters; one
#                     row per run in dir/drops.tsv with the generator's retransmits and, from
#                     `aoe bench`, its late replies (answers to a send it had already sent
#                     again: the retransmit was spurious) and its own socket's drops,
#                     and, for `aoe serve` (its control socket /run/aoe/serve-PID.sock),
#                     the target's rx_dropped (its receive ring full) and duplicate writes
#                     over the run. A full packet ring is not a kfree_skb on every kernel
#                     (6.18: not), so the tracepoint speaks for the veth and the backlog
#   OUT=path          also write the markdown tables there, and every round of every
#                     generator row (with p50) to path.runs.tsv
#   FILE_DIR=/dev/shm where the backing file lives; a disk file system (e.g. /var/tmp, the
#                     file read into the page cache first) is where `aoe serve` reads with
#                     RWF_NOWAIT through io_uring, which tmpfs does not support
# Needs root, iproute2, util-linux (nsenter, taskset), jq, gcc, and the targets; PATHS=1 also
# fuse3, nbdkit and libnbd-bin (nbdcopy, nbdinfo); PERF_DIR linux-perf.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/bench/lib.sh"
AOE=${AOE:-target/release/aoe}
TARGETS=${TARGETS:-vblade aoe ggaoed}
GENS=${GENS:-aoe c}
MTUS=${MTUS:-1500 9000}
MODES=${MODES:-read randread write}
WINDOWS=${WINDOWS:-16 64}
TIME=${TIME:-3}
SIZE_MB=${SIZE_MB:-512}
RANDBS=${RANDBS:-4096}
RUNS=${RUNS:-1}
PIN=${PIN:-0}
PATHS=${PATHS:-1}
INIT_TARGETS=${INIT_TARGETS:-aoe vblade}
PERF_DIR=${PERF_DIR:-}
PERF_STAT=${PERF_STAT:-}
GEN_STAT=${GEN_STAT:-}
DROPS=${DROPS:-}
FILE_DIR=${FILE_DIR:-/dev/shm}
OUT=${OUT:-}
RATE=${RATE:-}
RATE_MB=${RATE_MB:-}
RATE_BASE=${RATE_BASE:-}
SHELF=1 SLOT=1

die() { echo "bench-compare: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (namespaces, raw sockets)"
for t in ip nsenter taskset jq awk gcc; do
    command -v "$t" >/dev/null || die "missing $t (Debian: iproute2, util-linux, jq, gawk, gcc)"
done
if [ "$PATHS" = 1 ]; then
    for t in nbdkit nbdcopy nbdinfo fusermount3; do
        command -v "$t" >/dev/null || die "missing $t (Debian: nbdkit, libnbd-bin, fuse3); or PATHS=0"
    done
fi
[ "$PIN" != fifo ] || command -v chrt >/dev/null || die "missing chrt (Debian: util-linux)"
[ -z "$PERF_DIR" ] || { command -v perf >/dev/null || die "missing perf (Debian: linux-perf)"; }
[ -z "$PERF_STAT" ] || { command -v perf >/dev/null || die "missing perf (Debian: linux-perf)"; }
[ -x "$AOE" ] || die "no aoe binary at $AOE (cargo build --release, or set AOE=)"
[ -z "$RATE" ] || [ -z "$RATE_MB" ] || die "RATE and RATE_MB: one or the other"
for f in $RATE $RATE_MB; do
    awk -v f="$f" 'BEGIN { exit !(f ~ /^[0-9]*\.?[0-9]+$/ && f > 0) }' ||
        die "RATE/RATE_MB: '$f' is not a positive number"
done
[ -z "$RATE" ] || case " $GENS " in *" aoe "*) ;; *) die "RATE needs GENS with aoe (its saturated MB/s)" ;; esac
AOE=$(readlink -f "$AOE")
[ -z "$PERF_DIR" ] || { mkdir -p "$PERF_DIR"; PERF_DIR=$(readlink -f "$PERF_DIR"); }
[ -z "$GEN_STAT" ] || { command -v perf >/dev/null || die "missing perf (Debian: linux-perf)"; }
[ -z "$GEN_STAT" ] || [ -z "$PERF_DIR" ] || die "GEN_STAT and PERF_DIR: one or the other"
[ -z "$GEN_STAT" ] || { mkdir -p "$GEN_STAT"; GEN_STAT=$(readlink -f "$GEN_STAT"); }
[ -z "$DROPS" ] || { command -v perf >/dev/null || die "missing perf (Debian: linux-perf)"; }
[ -z "$DROPS" ] || { mkdir -p "$DROPS"; DROPS=$(readlink -f "$DROPS"); }
# The events of GEN_STAT: for both sides, then the generator's and the target's own calls.
# A recvmmsg that returned replies is an exit with ret > 0 (perf stat's --filter).
STAT_EV=(-e task-clock,context-switches,raw_syscalls:sys_enter)
GEN_EV=("${STAT_EV[@]}" -e syscalls:sys_exit_recvmmsg --filter 'ret > 0'
    -e syscalls:sys_enter_recvmmsg,syscalls:sys_enter_ppoll,syscalls:sys_enter_sendmmsg)
TGT_EV=("${STAT_EV[@]}" -e syscalls:sys_exit_recvmmsg --filter 'ret > 0'
    -e syscalls:sys_enter_poll,syscalls:sys_enter_ppoll,syscalls:sys_enter_sendmmsg
    -e syscalls:sys_enter_sendto,syscalls:sys_enter_pread64,syscalls:sys_enter_preadv2)

TAG=$$
bench_names cmp
IP_T=10.231.0.1 IP_I=10.231.0.2 NBD_PORT=10809
FILE=$FILE_DIR/aoe-bench-compare-$TAG.img
SRC=/dev/shm/aoe-bench-compare-$TAG.src
WORK=$(mktemp -d /tmp/aoe-bench-compare.XXXXXX)
ROOT=$WORK/root
TARGET_PID="" INIT_PID=""

stop_pid() { # pid [signal [seconds]]: signal, wait up to 3 s (or seconds), then SIGKILL
    local pid=$1 sig=${2:-TERM} secs=${3:-3}
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -"$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 1 $((secs * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
stop_target() {
    stop_pid "$TARGET_PID"; TARGET_PID=""
    # With OUT, each target's log (its stop line: frames per batch, the spin's wake-up cost).
    [ -z "$OUT" ] || [ ! -f "$WORK/target.log" ] || cat "$WORK/target.log" >>"$OUT.targets.log"
}
stop_initiator() {
    # SIGQUIT: stop at once even if a client still has a device open (README, initiator).
    stop_pid "$INIT_PID" QUIT; INIT_PID=""
    mountpoint -q "$ROOT" 2>/dev/null && fusermount3 -u "$ROOT" 2>/dev/null || true
}
cleanup() {
    set +e
    stop_initiator
    stop_target
    bench_unlink
    rm -f "$FILE" "$SRC"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

for g in $GENS; do
    case $g in aoe | c) continue ;; esac
    var="GEN_AOE_$g"
    [ -n "${!var:-}" ] || die "generator $g: set GEN_AOE_$g='aoe-binary [bench flags...]'"
    read -r -a words <<<"${!var}"
    [ -x "${words[0]}" ] || die "generator $g: ${words[0]} is not an executable"
done

echo "compiling the C generator ($HERE/bench/aoegen.c)" >&2
gcc -O2 -Wall -o "$WORK/aoegen" "$HERE/bench/aoegen.c"

case $PIN in
    0) ;;
    1) TGT_PIN=(taskset -c 0) GEN_PIN=(taskset -c 1) ;;
    # Real-time as well: under other builds a SCHED_OTHER target or generator is preempted
    # for milliseconds at a time, which shows as retransmits and halves a cell at random.
    fifo) TGT_PIN=(chrt -f 10 taskset -c 0) GEN_PIN=(chrt -f 10 taskset -c 1) ;;
    *) die "PIN=$PIN: 0, 1 or fifo" ;;
esac
# A perf attached to the running target (-p) must count from the generator's first request.
# It starts with its events disabled (-D -1) and the run waits until perf has answered the
# `enable` sent through its control fifo (perf's --control ... ack: the events are on).
# Under PIN=fifo perf runs at a real-time priority above both sides': otherwise the two
# SCHED_FIFO processes leave it no CPU, and it attaches late or not at all (2026-12-06,
# load 12-23: `PERF_DIR` recorded not one sample of either target in a 1500 randwrite
# cell, and `GEN_STAT` counted 1.65-1.97 of vblade's 3 system calls a request in some
# runs). It is asleep but for draining its buffers, so it takes little from the target.
PERF_PRIO=()
[ "$PIN" != fifo ] || PERF_PRIO=(chrt -f 20)
perf_attach() { # name perf-subcommand args...: background perf; its pid in PERF_PID
    local name=$1 sub=$2 ctl ack cfd afd a=""
    shift 2
    ctl="$WORK/$name.ctl" ack="$WORK/$name.ack"
    rm -f "$ctl" "$ack"
    mkfifo "$ctl" "$ack"
    "${PERF_PRIO[@]}" perf "$sub" -D -1 --control "fifo:$ctl,$ack" "$@" 2>/dev/null &
    PERF_PID=$!
    # Read-write opens of a fifo do not wait for the other end (Linux), so a perf that
    # failed to start makes the read time out instead of blocking the script.
    exec {cfd}<>"$ctl" {afd}<>"$ack"
    echo enable >&"$cfd"
    read -r -t 60 a <&"$afd" || true
    exec {cfd}>&- {afd}>&-
    rm -f "$ctl" "$ack"
    [ "$a" = ack ] || echo "bench-compare: perf $sub ($name) did not start counting within 60 s" >&2
}
EXTRA_GENS=$(for g in $GENS; do case $g in aoe | c) ;; *) printf '%s ' "$g" ;; esac; done)

# GEN_STAT's row for one run: the counts of both sides' perf stat per request (requests:
# the generator's bytes / bs, from out.json).
gen_stat_row() { # cell bs
    local cell=$1 bs=$2 req
    req=$(jq -r --argjson bs "$bs" '.bytes / $bs' "$WORK/out.json")
    [ -s "$GEN_STAT/stat.tsv" ] || printf '%s\n' "cell requests gen_task_us gen_cs gen_syscalls \
gen_recvmmsg gen_recvmmsg_nonempty replies_per_nonempty gen_ppoll gen_sendmmsg \
tgt_task_us tgt_cs tgt_syscalls tgt_poll tgt_recvmmsg_nonempty tgt_sendmmsg tgt_sendto \
tgt_pread tgt_preadv cpu0_idle_pct cpu1_idle_pct" |
        tr ' ' '\t' >"$GEN_STAT/stat.tsv"
    # perf stat -x, : value,unit,event,...; a tracepoint with a filter may carry it in the name.
    awk -F, -v cell="$cell" -v req="$req" -v OFS='\t' '
        FNR == 1 { side = (FILENAME ~ /gen\.csv$/) ? "g" : "t" }
        NF >= 3 && $1 ~ /^[0-9.]+$/ {
            ev = $3; sub(/:u$|:k$/, "", ev)
            if (ev == "syscalls:sys_exit_recvmmsg") ev = "rx_nonempty"
            v[side, ev] = $1
        }
        END {
            r = (req > 0) ? req : 1
            nz = v["g", "rx_nonempty"]
            printf "%s\t%d\t%.3f\t%.4f\t%.3f\t%.3f\t%.4f\t%.2f\t%.4f\t%.4f\t%.3f\t%.4f\t%.3f\t%.4f\t%.4f\t%.4f\t%.4f\t%.4f\t%.4f\n",
                cell, req, v["g", "task-clock"] * 1000 / r, v["g", "context-switches"] / r,
                v["g", "raw_syscalls:sys_enter"] / r, v["g", "syscalls:sys_enter_recvmmsg"] / r,
                nz / r, (nz > 0) ? req / nz : 0, v["g", "syscalls:sys_enter_ppoll"] / r,
                v["g", "syscalls:sys_enter_sendmmsg"] / r,
                v["t", "task-clock"] * 1000 / r, v["t", "context-switches"] / r,
                v["t", "raw_syscalls:sys_enter"] / r,
                (v["t", "syscalls:sys_enter_poll"] + v["t", "syscalls:sys_enter_ppoll"]) / r,
                v["t", "rx_nonempty"] / r, v["t", "syscalls:sys_enter_sendmmsg"] / r,
                v["t", "syscalls:sys_enter_sendto"] / r, v["t", "syscalls:sys_enter_pread64"] / r,
                v["t", "syscalls:sys_enter_preadv2"] / r
        }' "$GEN_STAT/$cell.gen.csv" "$GEN_STAT/$cell.target.csv" | tr -d '\n' >>"$GEN_STAT/stat.tsv"
    printf '\t%s\n' "$(tr ' ' '\t' <"$GEN_STAT/$cell.idle" 2>/dev/null || echo "-	-")" >>"$GEN_STAT/stat.tsv"
}

# Each CPU's idle share (idle + iowait ticks of /proc/stat, in %) over the middle of a
# generator run: from 1 s after its start to 0.5 s before its end, so that neither perf's
# attach nor the generator's start and drain count. Written to dir/CELL.idle as "cpu0 cpu1".
idle_sampler() { # cell
    local a b
    sleep 1
    a=$(awk '$1 ~ /^cpu[01]$/ { printf "%s %s ", $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)
    sleep "$(awk -v t="$TIME" 'BEGIN { d = t - 1.5; print (d > 0.2) ? d : 0.2 }')"
    b=$(awk '$1 ~ /^cpu[01]$/ { printf "%s %s ", $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN {
        split(a, x, " "); split(b, y, " ")
        for (i = 0; i < 2; i++) {
            t = y[2 * i + 2] - x[2 * i + 2]
            printf "%s%.1f", (i ? " " : ""), (t > 0) ? 100 * (y[2 * i + 1] - x[2 * i + 1]) / t : -1
        }
        print ""
    }' >"$GEN_STAT/$1.idle"
}

# DROPS: the counters read before and after a run: softnet_stat's drops (second column,
# hex, summed over CPUs), then rx_dropped and tx_dropped of the target's and the
# generator's veth ends.
# Then, from an `aoe serve` target's control socket (else "- -"), its interface's rx_dropped
# (frames the kernel dropped at its receive ring) and its duplicate writes (a retransmitted
# write whose first copy it had already done: the retransmit was spurious).
drop_counters() {
    local sn tc="- -" ctl="/run/aoe/serve-$TARGET_PID.sock"
    sn=$(awk '{ s += strtonum("0x" $2) } END { print s }' /proc/net/softnet_stat)
    [ ! -S "$ctl" ] || tc=$("$AOE" target --socket "$ctl" --json status 2>/dev/null |
        jq -r '"\(.interfaces[0].rx_dropped // "-") \(.exports[0].counters.duplicate_writes | (.executed_again + .dropped_in_flight + .dropped_superseded))"' 2>/dev/null) || tc="- -"
    echo "$sn $(ip -n "$NS_T" -s -j link show "$IF_T" | jq -r '.[0].stats64 | "\(.rx.dropped) \(.tx.dropped)"') \
$(ip -n "$NS_I" -s -j link show "$IF_I" | jq -r '.[0].stats64 | "\(.rx.dropped) \(.tx.dropped)"') $tc"
}
# DROPS's row for one run: cell, the generator's retransmits, late replies and socket drops
# (aoe bench only), the kernel's drops of AoE frames by location and reason, the counters'
# deltas.
drops_row() { # cell before after
    local cell=$1 by
    [ -s "$DROPS/drops.tsv" ] || printf 'cell\tretransmits\tlate_replies\tgen_rx_drops\tkfree_skb\tby_location\tsoftnet_drops\tveth_t_rx_tx\tveth_i_rx_tx\ttarget_rx_dropped\ttarget_dup_writes\n' >"$DROPS/drops.tsv"
    by=$(perf script -i "$DROPS/$cell.data" -F trace 2>/dev/null |
        sed -n 's/.*location=\([^ ]*\) reason: \(.*\)/\1:\2/p' | sed 's/+0x[0-9a-f]*//' |
        sort | uniq -c | sort -rn | awk '{ printf "%s%s=%s", (NR > 1 ? "," : ""), $2, $1 }')
    awk -v OFS='\t' -v cell="$cell" -v b="$2" -v a="$3" -v by="${by:--}" \
        -v j="$(jq -r '[.retransmits, (.late_replies // "-"), (.rx_drops // "-")] | @tsv' "$WORK/out.json" 2>/dev/null || printf '-\t-\t-')" 'BEGIN {
        split(b, x, " "); split(a, y, " "); n = 0
        if (by != "-") { m = split(by, p, ","); for (i = 1; i <= m; i++) { split(p[i], q, "="); n += q[2] } }
        print cell, j, n, by, y[1] - x[1], (y[2] - x[2]) "/" (y[3] - x[3]), (y[4] - x[4]) "/" (y[5] - x[5]),
            (x[6] == "-" || y[6] == "-") ? "-" : y[6] - x[6], (x[7] == "-" || y[7] == "-") ? "-" : y[7] - x[7]
    }' >>"$DROPS/drops.tsv"
}

# One generator run; prints "MB/s IOPS p99 retransmits bytes generator-CPU-s seconds p50".
run_gen() { # gen mode bs window cell
    local g=$1 mode=$2 bs=$3 w=$4 cell=$5 perf=() tperf="" isamp="" dperf="" d0=""
    if [ -n "$DROPS" ]; then
        d0=$(drop_counters)
        perf record -q -a -e skb:kfree_skb --filter 'protocol == 0x88a2' \
            -o "$DROPS/$cell.data" 2>/dev/null &
        dperf=$!
        # perf takes a while to attach on a loaded machine (see PERF_STAT).
        sleep 1
    fi
    if [ -n "$GEN_STAT" ]; then
        perf=(perf stat -x, -o "$GEN_STAT/$cell.gen.csv" "${GEN_EV[@]}" --)
        perf_attach tstat stat -x, -o "$GEN_STAT/$cell.target.csv" "${TGT_EV[@]}" -p "$TARGET_PID"
        tperf=$PERF_PID
        rm -f "$GEN_STAT/$cell.idle"
        idle_sampler "$cell" &
        isamp=$!
    elif [ -n "$PERF_DIR" ]; then
        perf=(perf record -q -g -o "$PERF_DIR/$cell.gen.data" --)
        perf_attach trecord record -q -g -p "$TARGET_PID" -o "$PERF_DIR/$cell.target.data"
        tperf=$PERF_PID
    fi
    case $g in
        aoe)
            local wflag=(); case $mode in *write) wflag=(--write) ;; esac
            in_i "${perf[@]}" "$AOE" bench "$IF_I" --target "$SHELF.$SLOT" --mode "$mode" \
                "${wflag[@]}" --bs "$bs" --window "$w" --time "$TIME" --json ;;
        c)
            in_i "${perf[@]}" "$WORK/aoegen" "$IF_I" "$SHELF" "$SLOT" "$mode" "$bs" "$w" "$TIME" \
                $((SIZE_MB * 2048)) ;;
        *)
            local var="GEN_AOE_$g" wflag=() words
            read -r -a words <<<"${!var}"
            case $mode in *write) wflag=(--write) ;; esac
            in_i "${perf[@]}" "${words[0]}" bench "$IF_I" --target "$SHELF.$SLOT" --mode "$mode" \
                "${wflag[@]}" --bs "$bs" --window "$w" --time "$TIME" --json "${words[@]:1}" ;;
    esac >"$WORK/out.json" 2>"$WORK/gen.err" || {
        sed 's/^/    /' "$WORK/gen.err" >&2
        echo "0 0 0 0 0 0 1 0"
        [ -z "$tperf" ] || stop_pid "$tperf" INT 60
        [ -z "$dperf" ] || stop_pid "$dperf" INT 60
        [ -z "$isamp" ] || wait "$isamp" 2>/dev/null || true
        return
    }
    if [ -n "$dperf" ]; then
        stop_pid "$dperf" INT 60
        drops_row "$cell" "$d0" "$(drop_counters)"
    fi
    if [ -n "$GEN_STAT" ]; then
        stop_pid "$tperf" INT 60
        wait "$isamp" 2>/dev/null || true
        gen_stat_row "$cell" "$bs"
    elif [ -n "$tperf" ]; then
        stop_pid "$tperf" INT 60
        for d in target gen; do
            perf report -i "$PERF_DIR/$cell.$d.data" --no-children --stdio -g none \
                --percent-limit 1 2>/dev/null | grep -v '^#' | grep . | head -20 >"$PERF_DIR/$cell.$d.txt" || true
        done
    fi
    jq -r '[.mb_per_s, .iops, .latency_us.p99, .retransmits, .bytes, .generator_cpu_s, .seconds,
            .latency_us.p50] | @tsv' \
        "$WORK/out.json"
}

FILE_FS=$(stat -f -c %T "$FILE_DIR")
echo "backing file: $SIZE_MB MiB on $FILE_FS ($FILE)" >&2
head -c $((SIZE_MB << 20)) /dev/urandom >"$FILE"
cat "$FILE" >/dev/null
[ "$PATHS" = 1 ] && head -c $((SIZE_MB << 20)) /dev/urandom >"$SRC"

GENROWS=$WORK/gen.tsv PATHROWS=$WORK/path.tsv RUNROWS=$WORK/runs.tsv
EQROWS=$WORK/eq.tsv EQRUNS=$WORK/eqruns.tsv
: >"$GENROWS"; : >"$PATHROWS"; : >"$RUNROWS"; : >"$EQROWS"; : >"$EQRUNS"
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)

gen_cells() { # mtu
    local mtu=$1 maxbs=$(( ($1 - 36) / 512 * 512 )) bs mode w t g
    for mode in $MODES; do
        bs=$maxbs
        case $mode in rand*) bs=$(( RANDBS < maxbs ? RANDBS : maxbs )) ;; esac
        for w in $WINDOWS; do
            for t in $TARGETS; do
                if ! target_cmd "$t" >/dev/null; then
                    echo "bench-compare: $t: not installed (set TARGET_CMD_$t); skipped" >&2
                    continue
                fi
                # A write cell leaves the file's pages dirty: written back during the next
                # cell, they cost it up to half its MB/s (2026-12-03, MTU 9000 reads after
                # MTU 1500 writes). Each cell starts with the file on disk.
                sync "$FILE"
                start_target "$t" || continue
                local bufs
                bufs=$(bench --target "$SHELF.$SLOT" --size 512 --json | jq .target.buffer_count)
                # Rounds outside, generators inside: each round runs every generator once, so
                # a burst of load from elsewhere falls on all of them alike.
                for g in $GENS; do : >"$WORK/runs.$g"; done
                for r in $(seq 1 "$RUNS"); do
                    for g in $GENS; do
                        c0=$(cpu_ticks "$TARGET_PID")
                        out=$(run_gen "$g" "$mode" "$bs" "$w" "$mtu-$mode-w$w-$t-$g-$r")
                        c1=$(cpu_ticks "$TARGET_PID")
                        echo "$out $(( c1 - c0 ))" >>"$WORK/runs.$g"
                        echo "$out $(( c1 - c0 ))" | awk -v OFS='\t' -v mtu="$mtu" -v mode="$mode" \
                            -v w="$w" -v t="$t" -v g="$g" -v r="$r" -v hz="$HZ" '{
                            tcpu = ($5 > 0) ? ($9 / hz) / ($5 / 1e9) : 0
                            gcpu = ($5 > 0) ? $6 / ($5 / 1e9) : 0
                            print mtu, mode, w, t, g, r, $1, $8, $3, $4, tcpu, 100 * $6 / $7, gcpu
                        }' >>"$RUNROWS"
                    done
                done
                for g in $GENS; do
                    med=$(awk '{ print $1 }' "$WORK/runs.$g" | median)
                    awk -v m="$med" '$1 == m { print; exit }' "$WORK/runs.$g" | awk -v OFS='\t' \
                        -v mtu="$mtu" -v mode="$mode" -v bs="$bs" -v w="$w" -v t="$t" -v g="$g" \
                        -v bufs="$bufs" -v hz="$HZ" '{
                            tcpu = ($5 > 0) ? ($9 / hz) / ($5 / 1e9) : 0
                            gcpu = ($5 > 0) ? $6 / ($5 / 1e9) : 0
                            print mtu, mode, bs, w, t, bufs, g, $1, $2, $3, $4, tcpu, 100 * $6 / $7, gcpu
                        }' | tee -a "$GENROWS" >&2
                done
                stop_target
            done
            [ -z "$RATE$RATE_MB" ] || eq_cells "$mtu" "$mode" "$bs" "$w"
        done
    done
}

# Ticks of one CPU's line in /proc/stat: "system softirq busy" (busy: all but idle and iowait).
# They count whatever ran on that CPU: with PIN the target has it to itself while it runs,
# but while it sleeps other work (other benchmarks on a shared machine) may run there too.
cpu_stat() { # cpu
    awk -v c="cpu$1" '$1 == c { print $4, $8, $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat
}

# One paced `aoe bench` run against the running target; appends a row to EQRUNS.
eq_run() { # mtu mode bs w load asked_mb target round
    local mtu=$1 mode=$2 bs=$3 w=$4 load=$5 mb=$6 t=$7 r=$8 c0 c1 s0 s1 w0 w1 wflag=() bytes
    case $mode in *write) wflag=(--write) ;; esac
    bytes=$(awk -v m="$mb" 'BEGIN { printf "%d", m * 1e6 }')
    c0=$(cpu_ticks "$TARGET_PID") s0=$(cpu_stat 0) w0=$(date +%s.%N)
    local pstat=""
    if [ -n "$PERF_STAT" ]; then
        # Started together with the generator, a perf stat missed up to half of a 3 s run
        # on a loaded machine (2026-12-04: half the reads a request counted): perf_attach
        # waits until it counts.
        perf_attach eqstat stat -x, -e task-clock,context-switches,raw_syscalls:sys_enter \
            -p "$TARGET_PID" -o "$WORK/pstat"
        pstat=$PERF_PID
    fi
    local precord="" pdata="$PERF_DIR/eq-$mtu-$mode-w$w-$load-$t-r$r.target"
    if [ -n "$PERF_DIR" ]; then
        perf_attach eqrecord record -q -g -p "$TARGET_PID" -o "$pdata.data"
        precord=$PERF_PID
    fi
    in_i "$AOE" bench "$IF_I" --target "$SHELF.$SLOT" --mode "$mode" "${wflag[@]}" --bs "$bs" \
        --window "$w" --time "$TIME" --rate "$bytes" --json >"$WORK/eq.json" 2>"$WORK/gen.err" || {
        sed 's/^/    /' "$WORK/gen.err" >&2
        [ -z "$pstat" ] || { kill -INT "$pstat" 2>/dev/null; wait "$pstat" 2>/dev/null; }
        [ -z "$precord" ] || stop_pid "$precord" INT 60
        return 0; }
    c1=$(cpu_ticks "$TARGET_PID") s1=$(cpu_stat 0) w1=$(date +%s.%N)
    if [ -n "$precord" ]; then
        stop_pid "$precord" INT 60
        perf report -i "$pdata.data" --no-children --stdio -g none --percent-limit 0.5 \
            2>/dev/null | grep -v '^#' | grep . | head -40 >"$pdata.txt" || true
    fi
    if [ -n "$pstat" ]; then
        kill -INT "$pstat" 2>/dev/null; wait "$pstat" 2>/dev/null || true
        # Per request: task-clock us, context switches, system calls of the target.
        awk -F, -v OFS='\t' -v cell="$mtu $mode w$w @$load $t r$r" \
            -v req="$(jq -r ".bytes / $bs" "$WORK/eq.json")" '
            $3 == "task-clock" { tc = $1 } $3 == "context-switches" { cs = $1 }
            $3 ~ /sys_enter/ { sc = $1 }
            END { if (req > 0) print cell, req, tc * 1000 / req, cs / req, sc / req }' \
            "$WORK/pstat" >>"${OUT:-$WORK/out}.perfstat.tsv"
    fi
    # Fields: mtu mode bs window load asked target round | MB/s fraction p50 p99 p99-sched
    # retransmits bytes seconds | target ticks | cpu0 system softirq busy ticks.
    jq -r '[.mb_per_s, .rate.achieved_fraction, .latency_us.p50, .latency_us.p99,
            .rate.latency_from_schedule_us.p99, .retransmits, .bytes, .seconds] | @tsv' \
        "$WORK/eq.json" | awk -v OFS='\t' -v mtu="$mtu" -v mode="$mode" -v bs="$bs" -v w="$w" \
        -v load="$load" -v mb="$mb" -v t="$t" -v r="$r" -v tc=$(( c1 - c0 )) -v hz="$HZ" \
        -v s0="$s0" -v s1="$s1" -v wall="$(awk -v a="$w0" -v b="$w1" 'BEGIN { print b - a }')" \
        -v pin="$PIN" '{
            split(s0, a, " "); split(s1, b, " "); gb = $7 / 1e9
            sys = (b[1] - a[1]) / hz; sirq = (b[2] - a[2]) / hz; busy = (b[3] - a[3]) / hz
            if (pin == "0") { sys = -1; sirq = -1; busy = -1 }
            print mtu, mode, bs, w, load, mb, t, r, $1, $2, (gb > 0) ? (tc / hz) / gb : 0,
                (gb > 0 && sys >= 0) ? sys / gb : -1, (gb > 0 && sirq >= 0) ? sirq / gb : -1,
                (busy >= 0 && wall > 0) ? 100 * busy / wall : -1, $3, $4, $5, $6
        }' | tee -a "$EQRUNS" >&2
}

# Equal load for one cell: every target at the same offered MB/s, RUNS rounds interleaved.
eq_cells() { # mtu mode bs w
    local mtu=$1 mode=$2 bs=$3 w=$4 base="" f mb t r order loads=()
    if [ -n "$RATE_MB" ]; then
        for f in $RATE_MB; do loads+=("${f}MB $f"); done
    else
        base=$(awk -F'\t' -v mtu="$mtu" -v mode="$mode" -v w="$w" -v b="$RATE_BASE" '
            $1 == mtu && $2 == mode && $4 == w && $7 == "aoe" && (b == "" || $5 == b) && $8 > 0 {
                if (m == "" || $8 < m) m = $8 } END { print m }' "$GENROWS")
        if [ -z "$base" ]; then
            echo "bench-compare: no saturated MB/s of ${RATE_BASE:-any target} in $mtu $mode w$w; no equal-load rows" >&2
            return 0
        fi
        for f in $RATE; do loads+=("$f $(awk -v f="$f" -v b="$base" 'BEGIN { printf "%.1f", f * b }')"); done
    fi
    for l in "${loads[@]}"; do
        read -r f mb <<<"$l"
        for r in $(seq 1 "$RUNS"); do
            order=$TARGETS
            [ $(( r % 2 )) = 1 ] || order=$(printf '%s\n' $TARGETS | tac | tr '\n' ' ')
            for t in $order; do
                target_cmd "$t" >/dev/null || continue
                sync "$FILE"
                start_target "$t" || continue
                eq_run "$mtu" "$mode" "$bs" "$w" "$f" "$mb" "$t" "$r"
                stop_target
            done
        done
        # Medians per column over the rounds, per target.
        for t in $TARGETS; do
            awk -F'\t' -v mtu="$mtu" -v mode="$mode" -v w="$w" -v f="$f" -v t="$t" \
                '$1 == mtu && $2 == mode && $4 == w && $5 == f && $7 == t' "$EQRUNS" >"$WORK/eq.cell"
            [ -s "$WORK/eq.cell" ] || continue
            local row="$mtu	$mode	$bs	$w	$f	$mb	$t" c
            for c in $(seq 9 18); do
                row="$row	$(cut -f"$c" "$WORK/eq.cell" | median)"
            done
            printf '%s\t%s\n' "$row" "$(wc -l <"$WORK/eq.cell")" >>"$EQROWS"
        done
    done
}

# One transfer on the initiator side; appends a row. Args: mtu op path target cmd...
measure_path() {
    local mtu=$1 op=$2 path=$3 t=$4; shift 4
    local c0 c1 i0=0 i1=0 tm real user sys
    sync "$FILE" # the last write's dirty pages out first (see gen_cells)
    c0=$(cpu_ticks "$TARGET_PID")
    [ -z "$INIT_PID" ] || i0=$(cpu_ticks "$INIT_PID")
    tm=$( { TIMEFORMAT='%R %U %S'; time in_i "$@" >/dev/null 2>"$WORK/client.err"; } 2>&1 ) || {
        echo "bench-compare: $path $op failed:" >&2; sed 's/^/    /' "$WORK/client.err" >&2; return 0; }
    c1=$(cpu_ticks "$TARGET_PID")
    [ -z "$INIT_PID" ] || i1=$(cpu_ticks "$INIT_PID")
    read -r real user sys <<<"$tm"
    awk -v OFS='\t' -v mtu="$mtu" -v op="$op" -v path="$path" -v t="$t" -v bytes=$((SIZE_MB << 20)) \
        -v real="$real" -v cl="$(awk -v u="$user" -v s="$sys" 'BEGIN { print u + s }')" \
        -v tc=$(( c1 - c0 )) -v ic=$(( i1 - i0 )) -v hz="$HZ" 'BEGIN {
            gb = bytes / 1e9
            print mtu, op, path, t, bytes / real / 1e6, (tc / hz) / gb, (ic / hz + cl) / gb
        }' | tee -a "$PATHROWS" >&2
}

path_cells() { # mtu
    local mtu=$1 t dev nbd
    for t in $INIT_TARGETS; do
        target_cmd "$t" >/dev/null || continue
        start_target "$t" || continue
        mkdir -p "$ROOT"
        bg_i "$AOE" initiator --root "$ROOT" --iflist "$IF_I" --nbd "$WORK/nbd.sock" \
            >"$WORK/initiator.log" 2>&1
        INIT_PID=$!
        dev=$ROOT/e$SHELF.$SLOT nbd="nbd+unix:///e$SHELF.$SLOT?socket=$WORK/nbd.sock"
        for _ in $(seq 1 100); do [ -e "$dev" ] && [ -S "$WORK/nbd.sock" ] && break; sleep 0.1; done
        if [ ! -e "$dev" ]; then
            echo "bench-compare: aoe initiator did not bring up $dev; its log:" >&2
            sed 's/^/    /' "$WORK/initiator.log" >&2
        else
            measure_path "$mtu" read "device file (dd)" "$t" \
                dd if="$dev" of=/dev/null bs=1M iflag=direct
            measure_path "$mtu" write "device file (dd)" "$t" \
                dd if="$SRC" of="$dev" bs=1M oflag=direct conv=notrunc
            measure_path "$mtu" read "initiator NBD (nbdcopy)" "$t" \
                nbdcopy --no-extents "$nbd" null:
            measure_path "$mtu" write "initiator NBD (nbdcopy)" "$t" nbdcopy --no-extents "$SRC" "$nbd"
        fi
        stop_initiator
        stop_target
    done
    # The TCP baseline: nbdkit's file plugin on the same file and link.
    bg_t nbdkit -f -i "$IP_T" -p "$NBD_PORT" file "$FILE" >"$WORK/target.log" 2>&1
    TARGET_PID=$!
    for _ in $(seq 1 50); do
        in_i nbdinfo --size "nbd://$IP_T:$NBD_PORT" >/dev/null 2>&1 && break; sleep 0.1
    done
    measure_path "$mtu" read "nbdkit TCP (nbdcopy)" nbdkit \
        nbdcopy --no-extents "nbd://$IP_T:$NBD_PORT" null:
    measure_path "$mtu" write "nbdkit TCP (nbdcopy)" nbdkit nbdcopy --no-extents "$SRC" "nbd://$IP_T:$NBD_PORT"
    stop_target
}

for mtu in $MTUS; do
    bench_link "$mtu"
    gen_cells "$mtu"
    [ "$PATHS" = 1 ] && path_cells "$mtu"
done

{
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, kernel $(uname -r); load average $LOAD0 at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end; TIME=$TIME s per cell, RUNS=$RUNS, $SIZE_MB MiB file on $FILE_FS, PIN=$PIN"
    echo
    echo "Targets under load generators (generator \`aoe\` = \`aoe bench\`, \`c\` = scripts/bench/aoegen.c$(
        for g in $EXTRA_GENS; do v="GEN_AOE_$g"; printf ', `%s` = `%s bench ...`' "$g" "${!v}"; done)):"
    echo
    # generator CPU: its user+system CPU time over the run's time (100% = one CPU busy all
    # along: then it, not the target, may be what limits the MB/s), and per GB moved.
    echo "| MTU | mode | bs | window | target (buffers) | generator | MB/s | IOPS | p99 us | retransmits | target CPU-s/GB | generator CPU | generator CPU-s/GB |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s | %s (%s) | %s | %.0f | %.0f | %.0f | %d | %.2f | %.0f%% | %.2f |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14 }' "$GENROWS"
    echo
    echo "Ratios in the same run: \`aoe bench\` against the C generator (same target, cell), and \`aoe serve\` against vblade (\`aoe bench\` rows):"
    echo
    echo "| MTU | mode | window | target | aoe bench / C |$(for g in $EXTRA_GENS; do printf ' %s / C |' "$g"; done) aoe/vblade MB/s | aoe/vblade CPU-s per GB |"
    echo "|---|---|---|---|---|$(for g in $EXTRA_GENS; do printf -- '---|'; done)---|---|"
    awk -F'\t' -v extra="$EXTRA_GENS" '
        { k = $1 SUBSEP $2 SUBSEP $4; mb[k, $5, $7] = $8; cpu[k, $5, $7] = $12
          if (!(k in seen)) { seen[k] = 1; keys[++nk] = k }
          if (!(($5) in tseen)) { tseen[$5] = 1; ts[++nt] = $5 } }
        function r(a, b) { return (b > 0 && a != "") ? sprintf("%.2fx", a / b) : "-" }
        END {
            ne = split(extra, xs, " ")
            for (i = 1; i <= nk; i++) {
                split(keys[i], p, SUBSEP)
                for (j = 1; j <= nt; j++) {
                    t = ts[j]
                    if (!((keys[i], t, "aoe") in mb)) continue
                    av = (t == "aoe") ? r(mb[keys[i], "aoe", "aoe"], mb[keys[i], "vblade", "aoe"]) : "-"
                    ac = (t == "aoe") ? r(cpu[keys[i], "aoe", "aoe"], cpu[keys[i], "vblade", "aoe"]) : "-"
                    xr = ""
                    for (x = 1; x <= ne; x++) xr = xr " " r(mb[keys[i], t, xs[x]], mb[keys[i], t, "c"]) " |"
                    printf "| %s | %s | %s | %s | %s |%s %s | %s |\n", p[1], p[2], p[3], t,
                        r(mb[keys[i], t, "aoe"], mb[keys[i], t, "c"]), xr, av, ac
                }
            }
        }' "$GENROWS"
    if [ -s "$EQROWS" ]; then
        echo
        echo "Equal load: every target offered the same MB/s by \`aoe bench --rate\` ($(
            if [ -n "$RATE_MB" ]; then echo "RATE_MB=\"$RATE_MB\" MB/s"
            else echo "load = the fraction of ${RATE_BASE:-the slowest target}'s saturated MB/s in the same cell above"; fi
            )), medians of the rounds per column; CPU 0 = the target's own CPU while it runs (PIN=$PIN; - when not pinned); latency from the send, p99 sched from the rate's schedule; * = below 95% of the asked rate:"
        echo
        echo "| MTU | mode | bs | window | load | asked MB/s | target | MB/s | target CPU-s/GB | CPU 0 sys s/GB | CPU 0 softirq s/GB | CPU 0 busy | p50 us | p99 us | p99 sched us | retransmits | rounds |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        awk -F'\t' 'function o(x, fmt) { return (x < 0) ? "-" : sprintf(fmt, x) }
            { printf "| %s | %s | %s | %s | %s | %.1f | %s | %.1f%s | %.3f | %s | %s | %s | %.0f | %.0f | %.0f | %d | %d |\n",
                $1, $2, $3, $4, $5, $6, $7, $8, ($9 < 0.95) ? " *" : "", $10, o($11, "%.3f"),
                o($12, "%.3f"), o($13, "%.0f%%"), $14, $15, $16, $17, $18 }' "$EQROWS"
        echo
        eqbase=${RATE_BASE:-$(set -- $TARGETS; echo "$1")}
        echo "Equal load, each target against $eqbase in the same cell and load (below 1 = less CPU per GB, lower latency):"
        echo
        echo "| MTU | mode | window | load | target | CPU-s/GB | CPU 0 sys+softirq per GB | p50 | p99 | p99 sched |"
        echo "|---|---|---|---|---|---|---|---|---|---|"
        awk -F'\t' -v b="$eqbase" '
            { k = $1 SUBSEP $2 SUBSEP $4 SUBSEP $5; rows[++n] = $0
              if ($7 == b) { cpu[k] = $10; ks[k] = ($11 < 0) ? -1 : $11 + $12; p50[k] = $14; p99[k] = $15; ps[k] = $16 } }
            function r(a, x) { return (x > 0 && a >= 0) ? sprintf("%.2fx", a / x) : "-" }
            END { for (i = 1; i <= n; i++) { split(rows[i], f, "\t"); k = f[1] SUBSEP f[2] SUBSEP f[4] SUBSEP f[5]
                if (f[7] == b || !(k in cpu)) continue
                printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", f[1], f[2], f[4], f[5], f[7],
                    r(f[10], cpu[k]), r((f[11] < 0) ? -1 : f[11] + f[12], ks[k]), r(f[14], p50[k]),
                    r(f[15], p99[k]), r(f[16], ps[k]) } }' "$EQROWS"
    fi
    if [ -s "$PATHROWS" ]; then
        echo
        echo "Whole paths, the $SIZE_MB MiB file per transfer (client CPU: \`aoe initiator\` plus dd or nbdcopy; raw = the best \`aoe bench\` seq read or write MB/s against the same target at that MTU):"
        echo
        echo "| MTU | op | path | target | MB/s | target CPU-s/GB | client CPU-s/GB | vs raw generator | vs nbdkit TCP |"
        echo "|---|---|---|---|---|---|---|---|---|"
        awk -F'\t' 'NR == FNR { if ($7 == "aoe" && ($2 == "read" || $2 == "write")) {
                          k = $1 SUBSEP $2 SUBSEP $5; if ($8 > raw[k]) raw[k] = $8 }; next }
            { rows[++n] = $0; if ($4 == "nbdkit") tcp[$1, $2] = $5 }
            function r(a, b) { return (b > 0) ? sprintf("%.2fx", a / b) : "-" }
            END { for (i = 1; i <= n; i++) { split(rows[i], f, "\t")
                printf "| %s | %s | %s | %s | %.0f | %.2f | %.2f | %s | %s |\n", f[1], f[2], f[3], f[4],
                    f[5], f[6], f[7], (f[4] == "nbdkit") ? "-" : r(f[5], raw[f[1], f[2], f[4]]),
                    (f[4] == "nbdkit") ? "-" : r(f[5], tcp[f[1], f[2]]) } }' "$GENROWS" "$PATHROWS"
    fi
} >"$WORK/table.md"
cat "$WORK/table.md"
[ -z "$OUT" ] || {
    cp "$WORK/table.md" "$OUT"
    { printf 'mtu\tmode\twindow\ttarget\tgenerator\tround\tMB/s\tp50_us\tp99_us\tretransmits\ttarget_cpu_s_per_GB\tgenerator_cpu_pct\tgenerator_cpu_s_per_GB\n'
      cat "$RUNROWS"; } >"$OUT.runs.tsv"
    if [ -s "$EQRUNS" ]; then
        { printf 'mtu\tmode\tbs\twindow\tload\tasked_MB/s\ttarget\tround\tMB/s\tachieved_fraction\ttarget_cpu_s_per_GB\tcpu0_sys_s_per_GB\tcpu0_softirq_s_per_GB\tcpu0_busy_pct\tp50_us\tp99_us\tp99_sched_us\tretransmits\n'
          cat "$EQRUNS"; } >"$OUT.eq.tsv"
    fi
}
