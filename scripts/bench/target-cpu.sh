#!/bin/bash
# scripts/bench/target-cpu.sh - the target's own cost for a fixed transfer, two builds of
# `aoe serve` interleaved: `perf stat` of the target (task-clock, and system calls through
# the raw_syscalls:sys_enter tracepoint) while `aoe bench --size` moves the same data.
# On a shared machine MB/s swing with the load; CPU time per byte moved swings much less.
#
#   sudo OLD=/tmp/aoe-old NEW=target/release/aoe [ROUNDS=3] [FILE_DIR=/dev/shm] \
#       [OLD_ARGS='--spin-us 0'] [NEW_ARGS=...] \
#       scripts/bench/target-cpu.sh "MTU MODE BS WINDOW SIZE" ...
#
# OLD_ARGS and NEW_ARGS are extra `aoe serve` options for each build (one binary with two
# settings: OLD=NEW=target/release/aoe OLD_ARGS='--dedup-window-ms 0'). Cells e.g. "1500
# randread 1k 16 64M" "9000 read 8704 16 256M" "9000 write 8704 16 256M". FILE_DIR is where
# the backing file (SIZE_MB MiB of random data, read once into the page cache) lives: /dev/shm (tmpfs)
# by default as in bench-compare.sh; a disk file system (e.g. /var/tmp) is where the target
# reads with RWF_NOWAIT (preadv2 or io_uring), which tmpfs does not support. One line per
# run: mtu mode bs window build round task-clock-ms syscalls syscalls-per-request MB/s, then
# the target's user and system CPU ms over its whole life (/proc/PID/stat, in clock ticks:
# the user part is what the target's own code costs, the kernel's share apart), and the
# target's context switches over the transfer and per request (each is a sleep in poll()
# and the wake-up after it: how often the loop waited rather than spun), and the frames per
# receive batch over the target's life (from the line `aoe serve` logs at its stop; "-" for
# a build or target that does not log it).
# PERF_DIR=dir also records `perf record -g` of the target for every run into
# dir/MTU-MODE-BS-WINDOW-BUILD-ROUND.data (`perf report -i ... --no-children`).
# Needs linux-perf and jq.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/lib.sh

NEW=$(readlink -f "${NEW:-target/release/aoe}")
OLD=$(readlink -f "${OLD:?OLD=path of the other aoe binary}")
ROUNDS=${ROUNDS:-3}
FILE_DIR=${FILE_DIR:-/dev/shm}
SIZE_MB=${SIZE_MB:-512}
AOE=$NEW SHELF=1 SLOT=1 IP_T=10.213.0.1 IP_I=10.213.0.2
TARGET_CMD_old="$OLD serve ${OLD_ARGS:-} {shelf} {slot} {netif} {file}"
TARGET_CMD_new="$NEW serve ${NEW_ARGS:-} {shelf} {slot} {netif} {file}"
command -v perf >/dev/null || { echo "missing perf (Debian: linux-perf)" >&2; exit 1; }
bench_names tc
WORK=$(mktemp -d)
FILE=$FILE_DIR/aoe-target-cpu-$$.img
TARGET_PID=""
stop_pid() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
cleanup() { [ -z "$TARGET_PID" ] || stop_pid "$TARGET_PID"; bench_unlink; rm -rf "$WORK" "$FILE"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
head -c $((SIZE_MB << 20)) /dev/urandom >"$FILE"
cat "$FILE" >/dev/null

echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), load $(cut -d' ' -f1-3 /proc/loadavg), file in $FILE_DIR ($(stat -f -c %T "$FILE_DIR"))"
echo "# mtu mode bs window build round task_ms syscalls syscalls_per_req MB/s user_ms sys_ms cs cs_per_req frames_per_batch"
for cell in "$@"; do
    read -r mtu mode bs win size <<<"$cell"
    # Writes overwrite the scratch file: `aoe bench` wants that confirmed.
    confirm=()
    case $mode in *write) confirm=(--write) ;; esac
    bench_link "$mtu"
    for round in $(seq 1 "$ROUNDS"); do
        for build in old new; do
            start_target "$build"
            perf stat -x, -e task-clock,raw_syscalls:sys_enter,context-switches -p "$TARGET_PID" \
                -o "$WORK/perf.txt" &
            perf_pid=$!
            rec_pid=""
            if [ -n "${PERF_DIR:-}" ]; then
                mkdir -p "$PERF_DIR"
                perf record -q -g -p "$TARGET_PID" \
                    -o "$PERF_DIR/$mtu-$mode-$bs-$win-$build-$round.data" 2>/dev/null &
                rec_pid=$!
            fi
            sleep 0.3
            out=$(bench --target "$SHELF.$SLOT" --mode "$mode" --bs "$bs" --window "$win" \
                --size "$size" "${confirm[@]}" --json)
            kill -INT "$perf_pid"; wait "$perf_pid" || true
            read -r ut st < <(awk -v hz="$HZ" '{ sub(/^.*\) /, ""); printf "%d %d\n", $12 * 1000 / hz, $13 * 1000 / hz }' "/proc/$TARGET_PID/stat")
            if [ -n "$rec_pid" ]; then kill -INT "$rec_pid"; wait "$rec_pid" || true; fi
            stop_pid "$TARGET_PID"; TARGET_PID=""
            fpb=$(sed -n 's/.*received \([0-9]*\) frames in \([0-9]*\) receive batches.*/\1 \2/p' \
                "$WORK/target.log" | awk '$2 > 0 { printf "%.2f", $1 / $2; ok = 1 } END { if (!ok) print "-" }')
            ms=$(awk -F, '$3 == "task-clock" { printf "%.0f", $1 }' "$WORK/perf.txt")
            sc=$(awk -F, '$3 ~ /sys_enter/ { print $1 }' "$WORK/perf.txt")
            reqs=$(echo "$out" | jq .requests)
            mbs=$(echo "$out" | jq '.mb_per_s | round')
            cs=$(awk -F, '$3 == "context-switches" { print $1 }' "$WORK/perf.txt")
            per=$(awk -v s="$sc" -v r="${reqs:-0}" 'BEGIN { if (r > 0) printf "%.2f", s / r; else print "-" }')
            csper=$(awk -v s="$cs" -v r="${reqs:-0}" 'BEGIN { if (r > 0) printf "%.3f", s / r; else print "-" }')
            echo "$mtu $mode $bs $win $build $round $ms $sc $per ${mbs:-?} $ut $st $cs $csper $fpb"
        done
    done
done
