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
# then, on the same veth with addresses, nbdkit's file plugin over TCP read and written with
# nbdcopy (what a user would pick instead). Every cell is the median of RUNS runs and is
# printed with the load average, since this is meant for a shared machine: compare figures
# of one run only. The initiator's CPU-seconds per GB are given for dev and nbd reads and,
# in their own column (WRITES=1), for dev and nbd writes.
#
# Usage: sudo scripts/bench-initiator.sh
#   AOE=target/release/aoe   MTUS="1500 9000"   TARGETS="aoe vblade" (others: TARGET_CMD_<name>,
#   as in bench-compare.sh)   SIZE_MB=1024
#   TIME=5 (raw generator seconds)   RUNS=3   WRITES=1   WINDOW=64 (raw generator window)
#   DD_BS=1M (dd's block size)   DD_IFLAG=direct DD_OFLAG=direct (dd's iflag/oflag on the
#             device file; empty: through the page cache, e.g. DD_OFLAG= for buffered writes)
#   NBDKIT=1 (also nbdkit over TCP)   INIT_ARGS="" (extra `aoe initiator` flags)
#   INITS="$AOE"  initiator binaries to compare (e.g. INITS="target/release/aoe /tmp/aoe-old");
#             with more than one, each run measures them in turn (interleaved, not one after
#             the other), every row names its binary, and the target and raw generator stay $AOE
#   PERF=dir  record `perf record -g` of the initiator during dev and nbd reads into dir
#   (write rows: the initiator's CPU-seconds per GB written, dev / nbd, beside MB/s)
#   PERFSTAT=1  also print the initiator's system calls, context switches and page faults per MiB read
#             (perf stat), figures a loaded machine does not disturb
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
RUNS=${RUNS:-3}
WRITES=${WRITES:-1}
WINDOW=${WINDOW:-64}
NBDKIT=${NBDKIT:-1}
DD_BS=${DD_BS:-1M}
DD_IFLAG=${DD_IFLAG-direct}
DD_OFLAG=${DD_OFLAG-direct}
INIT_ARGS=${INIT_ARGS:-}
PERF=${PERF:-}
PERFSTAT=${PERFSTAT:-0}
SHELF=1 SLOT=1

die() { echo "bench-initiator: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (namespaces, raw sockets, FUSE)"
for t in ip nsenter jq awk dd nbdcopy fusermount3; do
    command -v "$t" >/dev/null || die "missing $t (Debian: iproute2, util-linux, jq, gawk, coreutils, libnbd-bin, fuse3)"
done
[ "$NBDKIT" = 1 ] && { command -v nbdkit >/dev/null || die "missing nbdkit (Debian: nbdkit)"; }
[ -x "$AOE" ] || die "no aoe binary at $AOE (cargo build --release, or set AOE=)"
AOE=$(readlink -f "$AOE")
INITS=${INITS:-$AOE}
INIT_BINS=()
for b in $INITS; do
    [ -x "$b" ] || die "no initiator binary at $b"
    INIT_BINS+=("$(readlink -f "$b")")
done
INIT_AOE=${INIT_BINS[0]}

TAG=$$
bench_names bi
IP_T=10.91.0.1 IP_I=10.91.0.2
FILE=/dev/shm/aoe-bench-initiator-$TAG.img
SRC=/dev/shm/aoe-bench-initiator-$TAG.src
WORK=$(mktemp -d /tmp/aoe-bench-initiator.XXXXXX)
ROOT=$WORK/root SOCK=$WORK/nbd.sock
TARGET_PID="" INIT_PID="" KIT_PID=""

stop_pid() { # pid
    local p=$1
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 0
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -QUIT "$p" 2>/dev/null || true
    sleep 0.2
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}
stop_all() {
    stop_pid "$INIT_PID"; INIT_PID=""
    fusermount3 -u -z "$ROOT" 2>/dev/null || true
    stop_pid "$TARGET_PID"; TARGET_PID=""
    stop_pid "$KIT_PID"; KIT_PID=""
}
cleanup() {
    set +e
    stop_all
    bench_unlink
    rm -f "$FILE" "$SRC"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

load() { cut -d' ' -f1 /proc/loadavg; }
# CPU-seconds per GB of $1 ticks spent moving RUNS times SIZE_MB MiB (cpu_ticks, HZ: lib.sh).
per_gb() {
    awk -v t="$1" -v hz="$HZ" -v b=$(( RUNS * (SIZE_MB << 20) )) \
        'BEGIN { printf "%.2f\n", (t / hz) / (b / 1e9) }'
}
# MB/s of moving SIZE_MB MiB in the seconds a command took.
timed() { # cmd... -> MB/s on stdout
    local t0 t1
    t0=$(date +%s.%N); "$@" >/dev/null 2>&1 || { echo 0; return; }; t1=$(date +%s.%N)
    awk -v b=$((SIZE_MB << 20)) -v a="$t0" -v z="$t1" 'BEGIN { printf "%.0f\n", b / (z - a) / 1e6 }'
}

start_initiator() {
    mkdir -p "$ROOT"
    # shellcheck disable=SC2086
    nsenter --net="/run/netns/$NS_I" -- "$INIT_AOE" initiator --root "$ROOT" --iflist "$IF_I" --nbd "$SOCK" $INIT_ARGS \
        >"$WORK/init.log" 2>&1 &
    INIT_PID=$!
    for _ in $(seq 1 100); do
        [ -e "$ROOT/e$SHELF.$SLOT" ] && [ -S "$SOCK" ] && return 0
        sleep 0.1
    done
    sed 's/^/    /' "$WORK/init.log" >&2; die "the initiator found no device"
}
perf_during() { # name cmd... : the command, with perf recording the initiator if PERF is set
    local name=$1; shift
    if [ "$PERFSTAT" = 1 ]; then
        perf stat -x, -e raw_syscalls:sys_enter,context-switches,page-faults,task-clock -p "$INIT_PID" \
            -o "$WORK/stat" >/dev/null 2>&1 &
        local pp=$!; sleep 0.3
        "$@"
        kill -INT "$pp"; wait "$pp" 2>/dev/null || true
        awk -F, -v mib="$SIZE_MB" -v n="$name" '
            $3 == "raw_syscalls:sys_enter" { sc = $1 } $3 == "context-switches" { cs = $1 }
            $3 == "page-faults" { pf = $1 } $3 == "task-clock" { tc = $1 }
            END { printf "perf stat %s: %.1f syscalls/MiB, %.1f context switches/MiB, %.1f page faults/MiB, %.2f CPU-ms/MiB\n",
                  n, sc / mib, cs / mib, pf / mib, tc / mib }' "$WORK/stat" >&2
    elif [ -n "$PERF" ]; then
        mkdir -p "$PERF"
        perf record -q -g -p "$INIT_PID" -o "$PERF/$name.data" >/dev/null 2>&1 &
        local pp=$!; sleep 0.3
        "$@"
        kill -INT "$pp"; wait "$pp" 2>/dev/null || true
    else
        "$@"
    fi
}

ROWS=()
row() { ROWS+=("$1"); echo "$1" >&2; }
cell() { # label cmd... : median MB/s of RUNS runs
    local label=$1; shift
    local v
    v=$(for _ in $(seq 1 "$RUNS"); do timed "$@"; done | median)
    echo "$v"
}
raw_read() {
    in_i "$AOE" bench "$IF_I" --target "$SHELF.$SLOT" --mode read --window "$WINDOW" \
        --time "$TIME" --json | jq -r '.mb_per_s | floor'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }

echo "backing file: $SIZE_MB MiB on tmpfs; $(nproc) CPUs; load $(load)" >&2
head -c $((SIZE_MB << 20)) /dev/urandom >"$FILE"
[ "$WRITES" = 1 ] && head -c $((SIZE_MB << 20)) /dev/urandom >"$SRC"
URI="nbd+unix:///e$SHELF.$SLOT?socket=$SOCK"

for mtu in $MTUS; do
    bench_link "$mtu"
    for t in $TARGETS; do
        start_target "$t" || die "$t did not answer"
        raw=$(for _ in $(seq 1 "$RUNS"); do raw_read; done | median)
        # Per initiator binary (index k): MB/s of each run, and the CPU ticks the initiator (TK)
        # and the target (TT) spent in dev and nbd reads (and the initiator in writes).
        declare -A V=() TK=() TT=()
        for run in $(seq 1 "$RUNS"); do
            for k in "${!INIT_BINS[@]}"; do
                INIT_AOE=${INIT_BINS[$k]}
                start_initiator
                c0=$(cpu_ticks "$INIT_PID") d0=$(cpu_ticks "$TARGET_PID")
                V[dev,$k]+="$(perf_during "dev-$t-$mtu-$k-$run" timed \
                    dd if="$ROOT/e$SHELF.$SLOT" of=/dev/null bs="$DD_BS" iflag="${DD_IFLAG:+$DD_IFLAG,}count_bytes" \
                    count=$((SIZE_MB << 20))) "
                c1=$(cpu_ticks "$INIT_PID") d1=$(cpu_ticks "$TARGET_PID")
                TK[dev,$k]=$(( ${TK[dev,$k]:-0} + c1 - c0 )) TT[dev,$k]=$(( ${TT[dev,$k]:-0} + d1 - d0 ))
                V[nbd,$k]+="$(perf_during "nbd-$t-$mtu-$k-$run" timed in_i nbdcopy "$URI" null:) "
                c2=$(cpu_ticks "$INIT_PID") d2=$(cpu_ticks "$TARGET_PID")
                TK[nbd,$k]=$(( ${TK[nbd,$k]:-0} + c2 - c1 )) TT[nbd,$k]=$(( ${TT[nbd,$k]:-0} + d2 - d1 ))
                if [ "$WRITES" = 1 ]; then
                    V[devw,$k]+="$(timed dd if="$SRC" of="$ROOT/e$SHELF.$SLOT" bs="$DD_BS" \
                        ${DD_OFLAG:+oflag=$DD_OFLAG} conv=notrunc) "
                    c3=$(cpu_ticks "$INIT_PID")
                    TK[devw,$k]=$(( ${TK[devw,$k]:-0} + c3 - c2 ))
                    V[nbdw,$k]+="$(timed in_i nbdcopy "$SRC" "$URI") "
                    c4=$(cpu_ticks "$INIT_PID")
                    TK[nbdw,$k]=$(( ${TK[nbdw,$k]:-0} + c4 - c3 ))
                fi
                stop_pid "$INIT_PID"; INIT_PID=""; fusermount3 -u -z "$ROOT" 2>/dev/null || true
            done
        done
        stop_pid "$TARGET_PID"; TARGET_PID=""
        for k in "${!INIT_BINS[@]}"; do
            med() { [ -n "${V[$1,$k]:-}" ] && printf '%s\n' ${V[$1,$k]} | median || echo -; }
            dev=$(med dev) nbd=$(med nbd) devw=$(med devw) nbdw=$(med nbdw)
            label=$t
            [ "${#INIT_BINS[@]}" -gt 1 ] && label="$t, initiator ${INIT_BINS[$k]}"
            wcpu=-
            [ "$WRITES" = 1 ] && wcpu="$(per_gb "${TK[devw,$k]}") / $(per_gb "${TK[nbdw,$k]}")"
            row "| $mtu | $label | $raw | $dev ($(ratio "$dev" "$raw")) | $nbd ($(ratio "$nbd" "$raw")) | $devw | $nbdw | $(per_gb "${TK[dev,$k]}") / $(per_gb "${TK[nbd,$k]}") | $wcpu | $(per_gb "${TT[dev,$k]}") / $(per_gb "${TT[nbd,$k]}") | $(load) |"
        done
        unset V TK TT
    done
    if [ "$NBDKIT" = 1 ]; then
        nsenter --net="/run/netns/$NS_T" -- nbdkit -f -i 10.91.0.1 -p 10809 file "$FILE" >"$WORK/nbdkit.log" 2>&1 &
        KIT_PID=$!
        for _ in $(seq 1 50); do in_i nbdinfo --size nbd://10.91.0.1:10809 >/dev/null 2>&1 && break; sleep 0.1; done
        kr=$(cell kit in_i nbdcopy nbd://10.91.0.1:10809 null:)
        kw=-
        [ "$WRITES" = 1 ] && kw=$(cell kitw in_i nbdcopy "$SRC" nbd://10.91.0.1:10809)
        stop_pid "$KIT_PID"; KIT_PID=""
        row "| $mtu | nbdkit (TCP) | | | $kr | | $kw | | | | $(load) |"
    fi
done

echo
echo "MB/s, median of $RUNS; raw = aoe bench read window $WINDOW; dev = dd bs=$DD_BS iflag=${DD_IFLAG:-(none)} oflag=${DD_OFLAG:-(none)} on the FUSE file; nbd = nbdcopy; $(date -u +%F) $(nproc) CPUs"
echo "initiator CPU = the aoe initiator's user+system CPU-seconds per GB read (dev / nbd): the figure a loaded machine disturbs least;"
echo "initiator write CPU = the same per GB written (dev / nbd);"
echo "target CPU = the same of the target, which on a veth also pays for delivering its replies into the initiator's socket"
echo "| MTU | target | raw read | dev read | nbd read | dev write | nbd write | initiator CPU-s/GB | initiator write CPU-s/GB | target CPU-s/GB | load |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
