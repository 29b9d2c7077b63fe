#!/usr/bin/env bash
# bench-multipath.sh - `aoe initiator` over 1, 2, 3 ... paths to one `aoe serve` (session 36).
#
# Topology, in namespaces this script creates and removes (never the host's interfaces):
#
#     initiator ns:  mp0 ==veth== mpp0 -+
#                    mp1 ==veth== mpp1 -+-- bridge "mpbr" (target ns) <- aoe serve on mpbr
#                    ...                +
#
# One target MAC (the bridge's) reached through every initiator interface: one target with
# N paths in the initiator (its `netif` lists them). For each round, each path count in
# PATHS and each initiator binary in INITS (interleaved; the even rounds in reverse order,
# ABBA), the initiator is started with --iflist of the first N interfaces, and once its
# device is up with N interfaces, measures
#   read   dd if=DEV of=/dev/null bs=1M iflag=direct (SIZE_MB)
#   write  dd if=SRC of=DEV bs=1M oflag=direct conv=notrunc (SIZE_MB, from tmpfs)
# then stops. Each cell is the median MB/s over RUNS rounds, with the initiator's CPU-s/GB
# and its retransmissions (its log's "retransmit" lines at INFO, suppressed counts added).
# The target is $AOE throughout. Prints the load average with every round.
#
# Usage: sudo scripts/bench-multipath.sh
#   AOE=target/release/aoe   INITS="$AOE"   PATHS="1 2 3"   MTU=9000   SIZE_MB=256   RUNS=2
#   RATE=""  a rate for each path both ways (tc tbf on both ends of each veth, e.g. 500mbit):
#            paths with a bandwidth of their own, as two NICs, instead of veths limited only
#            by the CPUs
#   Wrap it in `flock /tmp/aoe-bench.lock` on a shared machine.
set -euo pipefail

AOE=${AOE:-target/release/aoe}
INITS=${INITS:-$AOE}
PATHS=${PATHS:-"1 2 3"}
MTU=${MTU:-9000}
SIZE_MB=${SIZE_MB:-256}
RUNS=${RUNS:-2}
RATE=${RATE:-}
SHELF=7 SLOT=3
TAG=$$
NS_T=mpT$TAG NS_I=mpI$TAG
WORK=$(mktemp -d /tmp/aoe-mpath.XXXXXX)
FILE=/dev/shm/aoe-mpath-$TAG.img
SRC=/dev/shm/aoe-mpath-src-$TAG.img
ROOT=$WORK/root
TARGET_PID="" INIT_PID=""
read -r -a INIT_BINS <<<"$INITS"
read -r -a NPATHS <<<"$PATHS"
MAXP=0
for n in "${NPATHS[@]}"; do [ "$n" -gt "$MAXP" ] && MAXP=$n; done

die() { echo "bench-multipath: $*" >&2; exit 1; }
# stop_pid, cpu_ticks and median: the bench scripts' own (scripts/bench/lib.sh).
. "$(dirname "$0")/bench/lib.sh"
cleanup() {
    set +e
    stop_pid "$INIT_PID"
    fusermount3 -u -z "$ROOT" 2>/dev/null
    stop_pid "$TARGET_PID"
    ip netns del "$NS_I" 2>/dev/null
    ip netns del "$NS_T" 2>/dev/null
    rm -rf "$WORK" "$FILE" "$SRC"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

for b in "${INIT_BINS[@]}" "$AOE"; do [ -x "$b" ] || die "no binary $b"; done
ip netns add "$NS_T"; ip netns add "$NS_I"
ip -n "$NS_T" link add mpbr type bridge
ip -n "$NS_T" link set mpbr mtu "$MTU" up
for ((i = 0; i < MAXP; i++)); do
    ip -n "$NS_I" link add "mp$i" mtu "$MTU" type veth peer name "mpp$i" mtu "$MTU" netns "$NS_T"
    ip -n "$NS_T" link set "mpp$i" master mpbr up
    ip -n "$NS_I" link set "mp$i" up
    if [ -n "$RATE" ]; then
        ip netns exec "$NS_I" tc qdisc add dev "mp$i" root tbf rate "$RATE" burst 1mb latency 20ms
        ip netns exec "$NS_T" tc qdisc add dev "mpp$i" root tbf rate "$RATE" burst 1mb latency 20ms
    fi
done
ip -n "$NS_T" link set mpbr mtu "$MTU"
head -c $((SIZE_MB << 20)) /dev/urandom >"$SRC"
truncate -s $((SIZE_MB << 20)) "$FILE"
nsenter --net="/run/netns/$NS_T" -- "$AOE" serve "$SHELF" "$SLOT" mpbr "$FILE" >"$WORK/target.log" 2>&1 &
TARGET_PID=$!
DEV=$ROOT/e$SHELF.$SLOT
NETIF=$ROOT/sysfs/block/etherd!e$SHELF.$SLOT/netif

start_initiator() { # binary npaths
    local ifs="" i
    for ((i = 0; i < $2; i++)); do ifs+="mp$i "; done
    mkdir -p "$ROOT"
    nsenter --net="/run/netns/$NS_I" -- "$1" initiator --root "$ROOT" --iflist "$ifs" \
        >"$WORK/init.log" 2>&1 &
    INIT_PID=$!
    for _ in $(seq 1 300); do
        if [ -e "$DEV" ] && [ "$(tr ', ' '\n\n' <"$NETIF" 2>/dev/null | grep -c .)" -ge "$2" ]; then
            return 0
        fi
        [ -e "$ROOT/discover" ] && echo >"$ROOT/discover" 2>/dev/null || true
        sleep 0.1
    done
    sed 's/^/    /' "$WORK/init.log" >&2; die "the device did not come up over $2 paths"
}
retransmits() { # as faults.rs counts them: lines with oldtag=, plus "(N similar lines suppressed)"
    { grep 'INFO' "$WORK/init.log" | grep 'retransmit ' || true; } | awk '{
        c = index($0, "oldtag=") > 0
        if (index($0, " similar line")) { s = $0; sub(/ similar line.*/, "", s); sub(/.*\(/, "", s); c += s }
        n += c } END { print n + 0 }'
}
timed() { # cmd... -> MB/s
    local t0 t1
    t0=$(date +%s.%N); "$@" >/dev/null 2>&1 || { echo 0; return; }; t1=$(date +%s.%N)
    awk -v b=$((SIZE_MB << 20)) -v a="$t0" -v z="$t1" 'BEGIN { printf "%.0f\n", b / (z - a) / 1e6 }'
}
declare -A V C R
one() { # k npaths round
    local k=$1 n=$2 r=$3 c0 c1 v
    start_initiator "${INIT_BINS[$k]}" "$n"
    c0=$(cpu_ticks "$INIT_PID")
    v=$(timed dd if="$DEV" of=/dev/null bs=1M iflag=direct count=$SIZE_MB)
    c1=$(cpu_ticks "$INIT_PID")
    V[r,$n,$k]+="$v " C[r,$n,$k]=$(( ${C[r,$n,$k]:-0} + c1 - c0 ))
    local r0; r0=$(retransmits)
    v=$(timed dd if="$SRC" of="$DEV" bs=1M oflag=direct conv=notrunc)
    c0=$(cpu_ticks "$INIT_PID")
    V[w,$n,$k]+="$v " C[w,$n,$k]=$(( ${C[w,$n,$k]:-0} + c0 - c1 ))
    R[r,$n,$k]=$(( ${R[r,$n,$k]:-0} + r0 )) R[w,$n,$k]=$(( ${R[w,$n,$k]:-0} + $(retransmits) - r0 ))
    echo "round $r, ${INIT_BINS[$k]}, $n paths: read ${V[r,$n,$k]}, write ${V[w,$n,$k]} MB/s (so far); load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    stop_pid "$INIT_PID"; INIT_PID=""; fusermount3 -u -z "$ROOT" 2>/dev/null || true
}
for ((r = 1; r <= RUNS; r++)); do
    order=()
    for n in "${NPATHS[@]}"; do for k in "${!INIT_BINS[@]}"; do order+=("$k:$n"); done; done
    if ((r % 2 == 0)); then
        rev=(); for ((j = ${#order[@]} - 1; j >= 0; j--)); do rev+=("${order[j]}"); done; order=("${rev[@]}")
    fi
    for e in "${order[@]}"; do one "${e%%:*}" "${e##*:}" "$r"; done
done
HZ=$(getconf CLK_TCK)
echo "MTU $MTU${RATE:+, each path $RATE}, $SIZE_MB MiB each way, $RUNS rounds (median MB/s); initiator CPU-s/GB; retransmits summed over the rounds; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| initiator | paths | read MB/s | write MB/s | read CPU-s/GB | write CPU-s/GB | retransmits read / write |"
echo "|---|---|---|---|---|---|---|"
for n in "${NPATHS[@]}"; do
    for k in "${!INIT_BINS[@]}"; do
        rd=$(tr ' ' '\n' <<<"${V[r,$n,$k]}" | grep . | median)
        wr=$(tr ' ' '\n' <<<"${V[w,$n,$k]}" | grep . | median)
        gb=$(awk -v s="$SIZE_MB" -v r="$RUNS" 'BEGIN { print s * r / 1024 }')
        cr=$(awk -v t="${C[r,$n,$k]}" -v h="$HZ" -v g="$gb" 'BEGIN { printf "%.2f", t / h / g }')
        cw=$(awk -v t="${C[w,$n,$k]}" -v h="$HZ" -v g="$gb" 'BEGIN { printf "%.2f", t / h / g }')
        echo "| ${INIT_BINS[$k]} | $n | $rd | $wr | $cr | $cw | ${R[r,$n,$k]} / ${R[w,$n,$k]} |"
    done
done
