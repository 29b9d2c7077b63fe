#!/usr/bin/env bash
# bench-rbd.sh - an RBD-backed `aoe serve` export against `rbd bench` on the same image and
# pattern, in one run, with `aoe bench` as the generator (issue 13's goal: at least 0.8x).
#
# It makes two private network namespaces joined by a veth pair with scripts/bench/lib.sh
# (never the host's interfaces; both removed on exit, Ctrl-C included), starts a one-node cluster with
# scripts/ceph-up.sh inside the target's namespace (on its own loopback; stopped with
# scripts/ceph-down.sh on exit), creates an image and writes it once over its whole length
# (so reads reach the OSD, not librbd's answer for never-written objects). Then for each
# (mode, window) it runs, interleaved so a busy machine slows them alike:
#   rbd      `rbd bench` in the target's namespace: --io-size BS --io-threads WINDOW,
#            --rbd-cache=false (as `aoe serve` runs librbd), for TIME seconds; the sequential
#            modes with --io-pattern full-seq (RBD_SEQ): one stream with WINDOW requests in
#            flight, as `aoe bench` reads and writes. `rbd bench`'s own default, `seq`, is
#            WINDOW streams, each in its own slice of the image, so spread over WINDOW
#            objects and placement groups at once, a different load on the OSD;
#   before   (if BEFORE= names a binary) that older `aoe serve` on the image, driven from the
#            other namespace by `aoe bench --bs BS --window WINDOW --time TIME`;
#   after    $AOE serve likewise.
# RUNS times, and prints a markdown table of the median MB/s (10^6 bytes/s) of each, with the
# AoE cells' ratio to the `rbd bench` median, their retransmits (summed over the runs) and
# the target's CPU time (all its threads, librbd's included) per GB moved (median).
#
# Usage: sudo scripts/bench-rbd.sh          (settings from the environment)
#   AOE=target/release/aoe   the aoe binary, built with --features aoe-cli/rbd (also the generator)
#   BEFORE=path              an older aoe (rbd feature) to compare, e.g. main's build
#   BEFORE_ARGS=""           its extra `aoe serve` options (a build before the asynchronous
#                            store, 2026-12-02, needs "--workers 16": workers >= window)
#   AFTER_ARGS=""            extra `aoe serve` options of $AOE
#   MTU=9000  BS=8k  WINDOWS="16 64"  MODES="read randread write randwrite"  TIME=5
#   RBD_SEQ=full-seq         `rbd bench --io-pattern` of the sequential modes (seq: see above)
#   IMAGE_MB=512             image size (written once before the reads)
#   RUNS=3                   rounds (rbd, before, after, interleaved); each cell is the median
#   MIN_RTO_US=1000000       `aoe bench --min-rto-us`: an OSD's latency swings far past the
#                            generator's 5 ms default floor, and each early copy is one more
#                            request for the cluster (`rbd bench` never sends one twice)
#   CEPH_STORE=bluestore     passed to ceph-up.sh (bluestore on a sparse file, or memstore)
#   OUT=path                 also write the table there
#   PERF_DIR=dir             also `perf record -g` the AoE target and the OSD during each
#                            AoE cell (dir/MODE-WINDOW-WHO-RUN.{target,osd}.data), with a
#                            top-25 `perf report --no-children` summary of each beside it,
#                            and `perf stat` context switches and task clock per thread of
#                            the target (dir/NAME.target.stat) and in all of `rbd bench`
#                            (dir/MODE-WINDOW-rbd-RUN.stat), to weigh the hand-offs, and
#                            each target thread's time on a CPU and waiting for one
#                            (dir/NAME.target.sched, from /proc/PID/task/TID/schedstat)
#   PERF_RECORD=1            0: with PERF_DIR, `perf stat` only (cheap counters): `perf
#                            record -g` of the OSD during the AoE cells alone slows the
#                            OSD for them and not for `rbd bench`, so take ratios without it
# Needs root, iproute2, util-linux (nsenter), jq, ceph-mon/-mgr/-osd, ceph-common.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
. "$here/bench/lib.sh"
AOE=${AOE:-target/release/aoe}
BEFORE=${BEFORE:-}
BEFORE_ARGS=${BEFORE_ARGS:-}
AFTER_ARGS=${AFTER_ARGS:-}
MTU=${MTU:-9000}
BS=${BS:-8k}
WINDOWS=${WINDOWS:-16 64}
MODES=${MODES:-read randread write randwrite}
TIME=${TIME:-5}
IMAGE_MB=${IMAGE_MB:-512}
MIN_RTO_US=${MIN_RTO_US:-1000000}
RBD_SEQ=${RBD_SEQ:-full-seq}
RUNS=${RUNS:-3}
OUT=${OUT:-}
PERF_DIR=${PERF_DIR:-}
PERF_RECORD=${PERF_RECORD:-1}
SHELF=1 SLOT=1 IMAGE=rbd/aoebench

die() { echo "bench-rbd: $*" >&2; exit 1; }
# The binary first: a wrong build is found before anything needs root.
[ -x "$AOE" ] || die "no aoe binary at $AOE (cargo build --release --features aoe-cli/rbd)"
AOE=$(readlink -f "$AOE")
# A binary without the rbd feature refuses every rbd: export, and each cell would read as
# 0 MB/s: stop here instead. `aoe --version` names the features (older builds: the librbd
# the rbd feature links, in the ELF dynamic section).
# (Output captured first: under pipefail, grep -q quitting early would fail the writer.)
has_rbd() {
    local v
    v=$("$1" --version 2>/dev/null || true)
    grep -q '^features:.*\brbd\b' <<<"$v" && return 0
    command -v readelf >/dev/null || return 1
    v=$(readelf -d "$1" 2>/dev/null || true)
    grep -q 'NEEDED.*librbd' <<<"$v"
}
has_rbd "$AOE" || die "$AOE was built without the rbd feature: cargo build --release -p aoe-cli --features aoe-cli/rbd"
[ "$(id -u)" = 0 ] || die "must run as root (namespaces, raw sockets)"
for t in ip nsenter jq awk rbd ceph; do
    command -v "$t" >/dev/null || die "missing $t (Debian: iproute2, util-linux, jq, gawk, ceph-common)"
done
[ -z "$PERF_DIR" ] || { mkdir -p "$PERF_DIR"; PERF_DIR=$(readlink -f "$PERF_DIR"); command -v perf >/dev/null || die "PERF_DIR needs perf (Debian: linux-perf)"; }
[ -z "$BEFORE" ] || { [ -x "$BEFORE" ] || die "no binary at BEFORE=$BEFORE"; BEFORE=$(readlink -f "$BEFORE"); }
[ -z "$BEFORE" ] || has_rbd "$BEFORE" || die "BEFORE=$BEFORE was built without the rbd feature: cargo build --release -p aoe-cli --features aoe-cli/rbd"

case $BS in
    *k | *K) BS_BYTES=$(( ${BS%[kK]} * 1024 )) ;;
    *) BS_BYTES=$BS ;;
esac

bench_names rbd
# lib.sh puts these on the veth pair; nothing here uses them (AoE is below IP, and the
# cluster is on the target namespace's loopback).
IP_T=10.213.0.1 IP_I=10.213.0.2
WORK=$(mktemp -d /tmp/aoe-bench-rbd.XXXXXX)
CEPH=$WORK/ceph
CONF=$CEPH/ceph.conf
TARGET_PID=""

stop_pid() { # pid: SIGTERM, 10 s to go, then SIGKILL
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 0
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
stop_target() { stop_pid "$TARGET_PID"; TARGET_PID=""; }
cleanup() {
    set +e
    stop_target
    [ -d "$CEPH" ] && in_t bash "$here/ceph-down.sh" "$CEPH" >/dev/null 2>&1
    bench_unlink
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

bench_link "$MTU"

echo "bench-rbd: starting a one-node cluster in $NS_T" >&2
in_t timeout -k 5 300 bash "$here/ceph-up.sh" "$CEPH" >&2
in_t rbd -c "$CONF" create "$IMAGE" --size "${IMAGE_MB}M"
echo "bench-rbd: writing the ${IMAGE_MB} MiB image once" >&2
in_t rbd -c "$CONF" bench "$IMAGE" --io-type write --io-pattern seq --io-size 4M \
    --io-threads 4 --io-total "${IMAGE_MB}M" --rbd-cache=false >/dev/null

start_gateway() { # binary extra-args -> sets TARGET_PID, returns 1 if it never answers
    local bin=$1; shift
    # shellcheck disable=SC2086
    bg_t "$bin" serve --ceph-conf "$CONF" --client-id admin \
        --keyring "$CEPH/ceph.client.admin.keyring" $* "$SHELF" "$SLOT" "$IF_T" "rbd:$IMAGE" \
        >"$WORK/target.log" 2>&1
    TARGET_PID=$!
    for _ in $(seq 1 100); do
        bench --target "$SHELF.$SLOT" --size 64k >/dev/null 2>&1 && return 0
        kill -0 "$TARGET_PID" 2>/dev/null || break
        sleep 0.2
    done
    echo "bench-rbd: $bin did not answer; its log:" >&2; sed 's/^/    /' "$WORK/target.log" >&2
    stop_target; return 1
}

# rbd bench for TIME seconds: it has no time limit of its own, so it gets far more bytes
# than it can move and is stopped with SIGINT, on which it still prints its summary
# (`elapsed: N ops: N ops/sec: X bytes/sec: ...`); MB/s = ops/sec x io size. Without a
# summary, its per-second lines (SEC OPS OPS/SEC BYTES/SEC, OPS cumulative) give the rate.
rbd_bench() { # mode window -> MB/s
    local type=read pattern=$RBD_SEQ
    case $1 in
        read) ;; randread) pattern=rand ;;
        write) type=write ;; randwrite) type=write pattern=rand ;;
    esac
    local -a stat=()
    [ -z "$PERF_DIR" ] || stat=(perf stat -e context-switches,task-clock
        -o "$PERF_DIR/$1-$2-rbd-$(wc -l <"$WORK/rbd.runs").stat")
    in_t timeout -s INT -k 5 $((TIME + 1)) "${stat[@]}" stdbuf -oL rbd -c "$CONF" bench "$IMAGE" \
        --io-type "$type" --io-pattern "$pattern" --io-size "$BS_BYTES" --io-threads "$2" \
        --io-total 100G --rbd-cache=false >"$WORK/rbd.out" 2>&1 || true
    awk -v bs="$BS_BYTES" '$1 ~ /^[0-9]+$/ && $2 ~ /^[0-9]+$/ { sec = $1; ops = $2 }
        $1 == "elapsed:" && $5 == "ops/sec:" { rate = $6 }
        END { if (rate > 0) printf "%.1f", rate * bs / 1e6
              else if (sec > 0) printf "%.1f", ops * bs / sec / 1e6; else print "0" }' "$WORK/rbd.out"
}


aoe_bench() { # mode window -> "MB/s retransmits target-CPU-seconds-per-GB"
    local -a w=()
    local t0 t1
    case $1 in write | randwrite) w=(--write) ;; esac
    t0=$(cpu_ticks "$TARGET_PID")
    bench --target "$SHELF.$SLOT" --mode "$1" "${w[@]}" --bs "$BS_BYTES" --window "$2" \
        --min-rto-us "$MIN_RTO_US" --time "$TIME" --json >"$WORK/out.json" 2>"$WORK/gen.err" || { echo "0 - -"; return; }
    t1=$(cpu_ticks "$TARGET_PID")
    jq -r --argjson cpu "$(( t1 - t0 ))" --argjson hz "$HZ" \
        '"\(.mb_per_s * 10 | round / 10) \(.retransmits) \(if .bytes > 0 then ($cpu / $hz / (.bytes / 1e9) * 10 | round / 10) else "-" end)"' "$WORK/out.json"
}

# perf record -g of the target and of the OSD for the length of one AoE cell, then a summary.
perf_start() { # name -> PERF_PIDS
    PERF_PIDS=()
    [ -n "$PERF_DIR" ] || return 0
    local osd
    osd=$(cat "$CEPH/osd.pid")
    if [ "$PERF_RECORD" = 1 ]; then
        perf record -q -g -o "$PERF_DIR/$1.target.data" -p "$TARGET_PID" >/dev/null 2>&1 &
        PERF_PIDS+=($!)
        perf record -q -g -o "$PERF_DIR/$1.osd.data" -p "$osd" >/dev/null 2>&1 &
        PERF_PIDS+=($!)
    fi
    perf stat -e context-switches,task-clock --per-thread -p "$TARGET_PID" \
        -o "$PERF_DIR/$1.target.stat" >/dev/null 2>&1 &
    PERF_PIDS+=($!)
    schedstat >"$WORK/sched0"
}
schedstat() { # the target's threads: name-TID run-ns wait-ns
    local t
    for t in /proc/"$TARGET_PID"/task/*; do
        printf '%s-%s %s\n' "$(cat "$t/comm")" "${t##*/}" "$(cut -d' ' -f1,2 "$t/schedstat")"
    done 2>/dev/null
}
perf_stop() { # name
    [ -n "$PERF_DIR" ] || return 0
    local p
    for p in "${PERF_PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    # Per thread: ns on a CPU and ns runnable but waiting for one (/proc/PID/task/TID/schedstat).
    schedstat | awk 'NR == FNR { run[$1] = $2; wait[$1] = $3; next }
        { printf "%-20s %8.1f ms on CPU %8.1f ms waiting for a CPU\n", $1, ($2 - run[$1]) / 1e6, ($3 - wait[$1]) / 1e6 }' \
        "$WORK/sched0" - >"$PERF_DIR/$1.target.sched" || true
    [ "$PERF_RECORD" = 1 ] || return 0
    for who in target osd; do
        {
            perf report -i "$PERF_DIR/$1.$who.data" --no-children --sort comm -g none --stdio 2>/dev/null \
                | grep -E '^ +[0-9]' | head -8
            echo
            perf report -i "$PERF_DIR/$1.$who.data" --no-children --sort comm,dso,symbol -g none --stdio 2>/dev/null \
                | grep -E '^ +[0-9]' | sed 's/ *$//' | cut -c1-160 | head -25
        } >"$PERF_DIR/$1.$who.top" || true
    done
}

ROWS=()
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
for mode in $MODES; do
    for w in $WINDOWS; do
        : >"$WORK/rbd.runs"; : >"$WORK/before.runs"; : >"$WORK/after.runs"
        for _ in $(seq 1 "$RUNS"); do
            rbd_bench "$mode" "$w" >>"$WORK/rbd.runs"; echo >>"$WORK/rbd.runs"
            for who in before after; do
                if [ "$who" = before ]; then
                    [ -n "$BEFORE" ] || continue
                    start_gateway "$BEFORE" "$BEFORE_ARGS" || { echo "0 0 -" >>"$WORK/$who.runs"; continue; }
                else
                    start_gateway "$AOE" "$AFTER_ARGS" || { echo "0 0 -" >>"$WORK/$who.runs"; continue; }
                fi
                run_no=$(wc -l <"$WORK/$who.runs")
                perf_start "$mode-$w-$who-$run_no"
                aoe_bench "$mode" "$w" >>"$WORK/$who.runs"
                perf_stop "$mode-$w-$who-$run_no"
                stop_target
            done
        done
        r=$(awk 'NF { print $1 }' "$WORK/rbd.runs" | median)
        cells=("$r ($(awk 'NF { printf "%s%s", s, $1; s = "/" }' "$WORK/rbd.runs"))")
        for who in before after; do
            if [ ! -s "$WORK/$who.runs" ]; then cells+=("-"); continue; fi
            mb=$(awk '{ print $1 }' "$WORK/$who.runs" | median)
            rx=$(awk '{ n += ($2 == "-" ? 0 : $2) } END { print n }' "$WORK/$who.runs")
            all=$(awk '{ printf "%s%s", s, $1; s = "/" }' "$WORK/$who.runs")
            ratio=$(awk -v a="$mb" -v b="$r" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
            cpu=$(awk '$3 != "-" && $3 != "" { print $3 }' "$WORK/$who.runs" | median)
            cells+=("$mb ($all) **${ratio}x**, $rx retx, ${cpu:--} CPU-s/GB")
        done
        line="| $mode | $w | ${cells[0]} | ${cells[1]} | ${cells[2]} |"
        ROWS+=("$line"); echo "$line" >&2
    done
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)

{
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, kernel $(uname -r); MTU $MTU, bs $BS, TIME=$TIME s per cell, RUNS=$RUNS (median), min RTO $MIN_RTO_US us, ${IMAGE_MB} MiB image, ${CEPH_STORE:-bluestore}, rbd bench's sequential pattern $RBD_SEQ; load average $LOAD0 at the start, $LOAD1 at the end"
    echo
    echo "| pattern | window | \`rbd bench\` MB/s (runs) | before: MB/s (runs), ratio, retransmits, target CPU-s/GB | after: likewise |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
} >"$WORK/table.md"
cat "$WORK/table.md"
[ -z "$OUT" ] || cp "$WORK/table.md" "$OUT"
