#!/usr/bin/env bash
# scripts/bench/xdp-ceiling.sh - the ceiling of the target's frame path, TPACKET_V2 rings against
# AF_XDP (issue 15): crates/aoe-sys/examples/ceiling_responder answers ATA reads from memory
# through either, scripts/bench/aoegen.c loads it, and vblade (serving a tmpfs file) can run
# beside them as the yardstick. Interleaved rounds, each I/O path in turn per case.
#
# Usage: scripts/bench/xdp-ceiling.sh            (from the repository, as root)
# Environment:
#   CASES   "MTU:MODE:BS:WINDOW ..." (default "1500:randread:1024:16 1500:randread:1024:64
#           9000:read:8192:16")
#   IOS     I/O paths, any of ring xdp xdp-generic vblade (default "ring xdp")
#   TIME    seconds per run (default 5); ROUNDS (default 3)
#   PERF    a directory: also `perf record -g` the responder's CPU for one run of each
#           path and case, into PERF/<case>-<io>.data
# Responder on CPU 0, generator on CPU 1. Prints one TSV line per run: case, io, round,
# MB/s, the responder's task-clock CPU-s per GB (perf stat), the generator's CPU-s per GB
# (its own rusage), p99 us, retransmits, load average (1 min) at the start.
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=scripts/bench/lib.sh
. "$HERE/bench/lib.sh"

CASES=${CASES:-"1500:randread:1024:16 1500:randread:1024:64 9000:read:8192:16"}
IOS=${IOS:-"ring xdp"}
TIME=${TIME:-5}
ROUNDS=${ROUNDS:-3}
PERF=${PERF:-}
SHELF=7 SLOT=3 MIB=256
SPAN=$((MIB * 2048))
IP_T=10.231.0.1 IP_I=10.231.0.2
[ "$(id -u)" = 0 ] || { echo "xdp-ceiling.sh: needs root (namespaces, XDP)" >&2; exit 1; }
for t in ip nsenter taskset jq gcc perf; do
    command -v "$t" >/dev/null || { echo "xdp-ceiling.sh: missing $t" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/xdp-ceiling.XXXXXX)
bench_names xc
stop_pid() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
cleanup() { bench_unlink; rm -rf "$WORK"; }
trap cleanup EXIT
TGT_PIN=(taskset -c 0) GEN_PIN=(taskset -c 1)

echo "building the responder and the C generator" >&2
(cd "$ROOT" && nice -n 10 cargo build -q --release -p aoe-sys --example ceiling_responder)
RESP=$ROOT/target/release/examples/ceiling_responder
gcc -O2 -Wall -o "$WORK/aoegen" "$HERE/bench/aoegen.c"
FILE=/dev/shm/xdp-ceiling.$$
if [[ " $IOS " == *" vblade "* ]]; then
    head -c $((MIB << 20)) /dev/zero >"$FILE"
    trap 'cleanup; rm -f "$FILE"' EXIT
fi

# Starts path $1 in the target namespace; sets PID once it serves.
start() {
    : >"$WORK/resp.log"
    case $1 in
        ring) bg_t "$RESP" "$IF_T" $SHELF $SLOT ring auto $MIB 2>"$WORK/resp.log" ;;
        xdp) bg_t "$RESP" "$IF_T" $SHELF $SLOT xdp native $MIB 2>"$WORK/resp.log" ;;
        xdp-generic) bg_t "$RESP" "$IF_T" $SHELF $SLOT xdp generic $MIB 2>"$WORK/resp.log" ;;
        vblade) bg_t vblade $SHELF $SLOT "$IF_T" "$FILE" >"$WORK/resp.log" 2>&1 ;;
        *) echo "xdp-ceiling.sh: unknown I/O path $1" >&2; exit 2 ;;
    esac
    PID=$!
    [ "$1" = vblade ] && return 0 # the generator's Query Config retries until it answers
    for _ in $(seq 1 100); do
        grep -q "ceiling_responder: e" "$WORK/resp.log" && return 0
        kill -0 "$PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "xdp-ceiling.sh: $1 did not start:" >&2; cat "$WORK/resp.log" >&2; exit 1
}

printf 'case\tio\tround\tMB/s\tresp_cpu_s_per_GB\tgen_cpu_s_per_GB\tp99_us\tretrans\tload1\n'
for c in $CASES; do
    IFS=: read -r mtu mode bs w <<<"$c"
    bench_link "$mtu"
    for r in $(seq 1 "$ROUNDS"); do
        order=$IOS
        # Alternate the order each round, so neither path always runs first.
        [ $((r % 2)) = 0 ] && order=$(printf '%s\n' $IOS | tac | tr '\n' ' ')
        for io in $order; do
            start "$io"
            load=$(cut -d' ' -f1 /proc/loadavg)
            perf stat -e task-clock -x, -o "$WORK/stat" -p "$PID" &
            ppid=$!
            if [ -n "$PERF" ] && [ "$r" = 1 ]; then
                mkdir -p "$PERF"
                perf record -q -g -C 0 -o "$PERF/${mtu}-${mode}-w${w}-${io}.data" &
                rpid=$!
            fi
            out=$(in_i "$WORK/aoegen" "$IF_I" $SHELF $SLOT "$mode" "$bs" "$w" "$TIME" $SPAN) || {
                echo "xdp-ceiling.sh: generator failed against $io; its log:" >&2
                cat "$WORK/resp.log" >&2; exit 1; }
            kill -INT "$ppid"; wait "$ppid" || true
            if [ -n "${rpid:-}" ]; then kill -INT "$rpid"; wait "$rpid" || true; rpid=""; fi
            stop_pid "$PID"
            msec=$(awk -F, '/task-clock/ { print $1 }' "$WORK/stat")
            jq -r --arg c "$c" --arg io "$io" --arg r "$r" --arg msec "$msec" --arg load "$load" '
                (.bytes / 1e9) as $gb |
                [$c, $io, $r, .mb_per_s,
                 (($msec | tonumber) / 1000 / $gb * 1000 | round / 1000),
                 (.generator_cpu_s / $gb * 1000 | round / 1000),
                 .latency_us.p99, .retransmits, $load] | @tsv' <<<"$out"
        done
    done
done
