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
#   PERF    a directory: also `perf record -g` both CPUs during the first round of each
#           path and case, into PERF/<mtu>-<mode>-w<window>-<io>.data (report with
#           --comm ceiling_respond,aoegen,vblade: the builds sharing the machine are in it too);
#           the figures of those runs are disturbed by the recording
# Responder on CPU 0, generator on CPU 1, both SCHED_FIFO. Prints one TSV line per run: case, io, round,
# MB/s, the responder's task-clock CPU-s per GB (perf stat), the generator's CPU-s per GB
# (its own rusage), their sum, p99 us, retransmits, load average (1 min) at the start.
# On veth a frame's receive work (softirq: veth NAPI and XDP, or the backlog and tpacket_rcv)
# runs on the sender's CPU and is charged to the sender: the request's to the generator, the
# reply's to the responder. The sum is the pair's whole cost; the responder's column alone
# is not the target's.
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
# Real-time (SCHED_FIFO 10), the same for every path: under the niced builds that share this
# machine, ordinary priorities wait milliseconds for a CPU after each wake-up.
TGT_PIN=(chrt -f 10 taskset -c 0) GEN_PIN=(chrt -f 10 taskset -c 1)

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

printf 'case\tio\tround\tMB/s\tresp_cpu_s_per_GB\tgen_cpu_s_per_GB\tsum\tp99_us\tretrans\tload1\n'
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
            # perf stat counts the responder while the generator (its workload) runs, from
            # the generator's start: it starts the workload once its counters are set.
            rec=(perf stat -e task-clock -x, -o "$WORK/stat" -p "$PID" --)
            if [ -n "$PERF" ] && [ "$r" = 1 ]; then
                # The generator as perf's workload: recording starts before it does (setting
                # perf up takes seconds on a loaded machine) and stops when it ends.
                mkdir -p "$PERF"
                rec+=(perf record -q -g -C 0,1 -o "$PERF/${mtu}-${mode}-w${w}-${io}.data" --)
            fi
            out=$("${rec[@]}" nsenter --net="/run/netns/$NS_I" -- "${GEN_PIN[@]}" \
                "$WORK/aoegen" "$IF_I" $SHELF $SLOT "$mode" "$bs" "$w" "$TIME" $SPAN) || {
                echo "xdp-ceiling.sh: generator failed against $io; its log:" >&2
                cat "$WORK/resp.log" >&2; exit 1; }
            stop_pid "$PID"
            msec=$(awk -F, '/task-clock/ { print $1 }' "$WORK/stat")
            jq -r --arg c "$c" --arg io "$io" --arg r "$r" --arg msec "$msec" --arg load "$load" '
                (.bytes / 1e9) as $gb |
                (($msec | tonumber) / 1000 / $gb) as $resp | (.generator_cpu_s / $gb) as $gen |
                [$c, $io, $r, .mb_per_s,
                 ($resp * 1000 | round / 1000), ($gen * 1000 | round / 1000),
                 (($resp + $gen) * 1000 | round / 1000),
                 .latency_us.p99, .retransmits, $load] | @tsv' <<<"$out"
        done
    done
done
