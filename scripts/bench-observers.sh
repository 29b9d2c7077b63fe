#!/usr/bin/env bash
# bench-observers.sh - does watching a device disturb its I/O? Whole-path NBD writes (and
# reads) through `aoe serve` + `aoe initiator`, each run with one observer reading at RATE
# per second, its retransmissions, window cuts, MB/s and CPU-seconds per GB beside a run
# with none.
#
# Two private network namespaces joined by a veth pair (never the host's interfaces; both
# removed on exit), one backing file on tmpfs. Observers (OBSERVERS=, in this order):
#   none     nothing reads
#   debug    cat ROOT/sysfs/kernel/debug/aoe/eX.Y (the debugfs-style file)
#   attrs    cat every ROOT/sysfs/block/etherd!eX.Y/* attribute
#   stat     aoe stat --root ROOT (aoetools' aoe-stat)
#   imetrics the initiator's Prometheus endpoint (curl)
#   tmetrics the target's Prometheus endpoint (curl)
#   tstats   aoe target stats (the control socket)
#   err      one `cat ROOT/err` blocked in read for the whole transfer (not RATE a second:
#            how a user watches the diagnostics)
#   shell    /bin/true started the same way (a process started RATE times a second: the
#            control for what any observer costs the machine)
# Each cell, from the initiator's metrics before and after: copies sent (retransmissions),
# losses presumed and how many of them were answered after all (spurious), window cuts (the
# last three need a build with aoe_initiator_losses; older ones show 0); MB/s; and the
# initiator's and target's CPU-seconds per GB.
#
# Usage: sudo scripts/bench-observers.sh
#   AOE=target/release/aoe  INITS="$AOE" (initiator binaries, interleaved per round)
#   MTU=9000 SIZE_MB=512 ROUNDS=2 RATE=20 DIR=w (w: nbdcopy writes; r: reads to null:)
#   OBSERVERS="none debug attrs stat imetrics tmetrics tstats err shell"
#   DUMP=1 (print the initiator's loss and RTT metrics after each cell, on stderr)
#   KEEPLOG=PREFIX (keep each initiator's log as PREFIX.ROUND.BINARY: its network-thread
#             loop counters are logged when it stops)
# Needs root, iproute2, util-linux (nsenter), nbdcopy (libnbd-bin), curl, fuse3.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/bench/lib.sh"
AOE=$(readlink -f "${AOE:-target/release/aoe}")
INITS=${INITS:-$AOE}
MTU=${MTU:-9000}
SIZE_MB=${SIZE_MB:-512}
ROUNDS=${ROUNDS:-2}
RATE=${RATE:-20}
DIR=${DIR:-w}
OBSERVERS=${OBSERVERS:-none debug attrs stat imetrics tmetrics tstats err shell}
SHELF=1 SLOT=1
die() { echo "bench-observers: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
for t in ip nsenter nbdcopy curl fusermount3; do command -v "$t" >/dev/null || die "missing $t"; done

TAG=$$
bench_names bo
IP_T=10.93.0.1 IP_I=10.93.0.2
WORK=$(mktemp -d /tmp/aoe-bench-observers.XXXXXX)
FILE=/dev/shm/aoe-bench-observers-$TAG.img SRC=/dev/shm/aoe-bench-observers-$TAG.src
ROOT=$WORK/root SOCK=$WORK/nbd.sock CTL=$WORK/target.sock
TPORT=9711 IPORT=9712
TPID= IPID= OPID=
stop_pid() { if [ -n "${1:-}" ]; then kill "$1" 2>/dev/null; wait "$1" 2>/dev/null || true; fi; }
cleanup() {
    stop_pid "$OPID"; stop_pid "$IPID"; stop_pid "$TPID"
    umount -l "$ROOT" 2>/dev/null || true
    bench_unlink; rm -rf "$WORK" "$FILE" "$SRC"
}
trap cleanup EXIT INT TERM

truncate -s "${SIZE_MB}M" "$FILE"
head -c "${SIZE_MB}M" /dev/urandom >"$SRC"
bench_link "$MTU"
bg_t "$AOE" serve --metrics "127.0.0.1:$TPORT" --control "$CTL" "$SHELF" "$SLOT" "$IF_T" "$FILE" >"$WORK/target.log" 2>&1
TPID=$!

start_initiator() { # binary
    mkdir -p "$ROOT"
    bg_i "$1" initiator --root "$ROOT" --iflist "$IF_I" --nbd "$SOCK" --metrics "127.0.0.1:$IPORT" >"$WORK/init.log" 2>&1
    IPID=$!
    for _ in $(seq 1 100); do [ -e "$ROOT/e$SHELF.$SLOT" ] && [ -S "$SOCK" ] && return; sleep 0.1; done
    cat "$WORK/init.log" >&2; die "the initiator found no device"
}

observe_once() { # kind
    local dev=e$SHELF.$SLOT
    case $1 in
        debug) cat "$ROOT/sysfs/kernel/debug/aoe/$dev" ;;
        attrs) for f in "$ROOT/sysfs/block/etherd!$dev"/*; do cat "$f"; done ;;
        stat) "$AOE" stat --root "$ROOT" ;;
        imetrics) in_i curl -s "http://127.0.0.1:$IPORT/metrics" ;;
        tmetrics) in_t curl -s "http://127.0.0.1:$TPORT/metrics" ;;
        tstats) "$AOE" target --socket "$CTL" stats ;;
        shell) /bin/true ;;
    esac >/dev/null 2>&1 || true
}
observer() { # kind: RATE reads a second until killed
    [ "$1" = err ] && exec cat "$ROOT/err" >/dev/null
    local period
    period=$(awk -v r="$RATE" 'BEGIN { printf "%.4f", 1 / r }')
    while :; do observe_once "$1"; sleep "$period"; done
}

# Sum of an initiator metric's samples (name regex).
imetric() { in_i curl -s "http://127.0.0.1:$IPORT/metrics" | awk -v m="$1" '$1 ~ "^"m"(_total)?({|$)" { s += $NF } END { printf "%d", s }'; }

now() { date +%s.%N; }
echo "| initiator | observer | MB/s | copies sent/GB | losses presumed/GB | of them spurious | window cuts/GB | initiator CPU-s/GB | target CPU-s/GB | load |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
    for bin in $INITS; do
        start_initiator "$(readlink -f "$bin")"
        for obs in $OBSERVERS; do
            OPID=
            if [ "$obs" != none ]; then observer "$obs" & OPID=$!; fi
            r1=$(imetric aoe_initiator_retransmits) w1=$(imetric aoe_initiator_window_cuts)
            p1=$(imetric aoe_initiator_losses) s1=$(imetric aoe_initiator_spurious_losses)
            c1=$(cpu_ticks "$IPID") d1=$(cpu_ticks "$TPID") t1=$(now)
            if [ "$DIR" = w ]; then
                in_i nbdcopy "$SRC" "nbd+unix:///e$SHELF.$SLOT?socket=$SOCK"
            else
                in_i nbdcopy "nbd+unix:///e$SHELF.$SLOT?socket=$SOCK" null:
            fi
            t2=$(now) c2=$(cpu_ticks "$IPID") d2=$(cpu_ticks "$TPID")
            r2=$(imetric aoe_initiator_retransmits) w2=$(imetric aoe_initiator_window_cuts)
            p2=$(imetric aoe_initiator_losses) s2=$(imetric aoe_initiator_spurious_losses)
            stop_pid "$OPID"; OPID=
            [ -n "${DUMP:-}" ] && in_i curl -s "http://127.0.0.1:$IPORT/metrics" | grep -E '^aoe_initiator_(losses|window_cuts|spurious|retransmits|rtt)' >&2
            awk -v b="$(basename "$bin")" -v o="$obs" -v mb="$SIZE_MB" \
                -v dt="$(awk -v a="$t1" -v b="$t2" 'BEGIN { print b - a }')" \
                -v r=$((r2 - r1)) -v w=$((w2 - w1)) -v p=$((p2 - p1)) -v sp=$((s2 - s1)) -v ci=$((c2 - c1)) -v ct=$((d2 - d1)) -v hz="$HZ" \
                -v l="$(cut -d' ' -f1-3 /proc/loadavg)" \
                'BEGIN { gb = mb * 1048576 / 1e9;
                         printf "| %s | %s | %.0f | %.1f | %.1f | %d | %.1f | %.2f | %.2f | %s |\n",
                                b, o, mb * 1.048576 / dt, r / gb, p / gb, sp, w / gb, ci / hz / gb, ct / hz / gb, l }'
        done
        stop_pid "$IPID"; IPID=
        [ -n "${KEEPLOG:-}" ] && cp "$WORK/init.log" "$KEEPLOG.$round.$(basename "$bin")"
        umount -l "$ROOT" 2>/dev/null || true
    done
done
echo "nbdcopy $([ "$DIR" = w ] && echo writes || echo reads) of $SIZE_MB MiB at MTU $MTU, observers at $RATE/s; $(date -u '+%F %H:%M') UTC, $(nproc) CPUs"
