#!/usr/bin/env bash
# bench-compare.sh - compare AoE targets in one run with `aoe bench` as the load generator.
#
# For each MTU it makes two private network namespaces joined by a veth pair (never the
# host's interfaces; both are removed on exit, Ctrl-C included), puts a backing file on
# tmpfs, and for each (mode, window, target) starts the target alone in one namespace,
# drives it from the other with `aoe bench --json` for TIME seconds, and reads the target's
# user+system CPU time from /proc/PID/stat before and after. Targets are interleaved per
# configuration, so a busy machine slows them alike.
#
# Usage: sudo scripts/bench-compare.sh            (all settings from the environment)
#   AOE=target/release/aoe    the aoe binary (generator, and the `aoe` target)
#   TARGETS="vblade aoe ggaoed"  targets in order; a name without a built-in command needs
#                             TARGET_CMD_<name>='cmd ... {shelf} {slot} {netif} {file}'
#   MTUS="1500 9000"  MODES="read randread"  WINDOWS="16 64"  TIME=5  SIZE_MB=1024
#   RANDBS=4096       request size for randread (capped by the MTU); read uses the MTU's most
#   RUNS=1            repetitions per cell; the median MB/s is reported
#   PIN=0             1: target on CPU 0, generator on CPU 1 (taskset)
#   OLD_AOE=path      also run that binary's old self-contained `aoe bench` against vblade
#                     (read rows only), to compare the generators
#   OUT=path          also write the markdown table there
# Needs root, iproute2, util-linux (nsenter, taskset), jq, and the targets themselves.
set -euo pipefail

AOE=${AOE:-target/release/aoe}
TARGETS=${TARGETS:-vblade aoe ggaoed}
MTUS=${MTUS:-1500 9000}
MODES=${MODES:-read randread}
WINDOWS=${WINDOWS:-16 64}
TIME=${TIME:-5}
SIZE_MB=${SIZE_MB:-1024}
RANDBS=${RANDBS:-4096}
RUNS=${RUNS:-1}
PIN=${PIN:-0}
OLD_AOE=${OLD_AOE:-}
OUT=${OUT:-}
SHELF=1 SLOT=1

die() { echo "bench-compare: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (namespaces, raw sockets)"
for t in ip nsenter taskset jq awk; do
    command -v "$t" >/dev/null || die "missing $t (Debian: iproute2, util-linux, jq, gawk)"
done
[ -x "$AOE" ] || die "no aoe binary at $AOE (cargo build --release, or set AOE=)"
AOE=$(readlink -f "$AOE")
[ -z "$OLD_AOE" ] || OLD_AOE=$(readlink -f "$OLD_AOE")

TAG=$$
NS_T=aoecmpT$TAG NS_I=aoecmpI$TAG IF_T=cmpT$TAG IF_I=cmpI$TAG
FILE=/dev/shm/aoe-bench-compare-$TAG.img
WORK=$(mktemp -d /tmp/aoe-bench-compare.XXXXXX)
TARGET_PID=""

stop_target() {
    if [ -n "$TARGET_PID" ] && kill -0 "$TARGET_PID" 2>/dev/null; then
        kill -TERM "$TARGET_PID" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 "$TARGET_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$TARGET_PID" 2>/dev/null || true
        wait "$TARGET_PID" 2>/dev/null || true
    fi
    TARGET_PID=""
}
cleanup() {
    set +e
    stop_target
    ip netns del "$NS_T" 2>/dev/null     # deleting a namespace deletes its veth end
    ip netns del "$NS_I" 2>/dev/null
    rm -f "$FILE"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# user+system ticks of a process (fields 14 and 15 of /proc/PID/stat, after the comm field).
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

target_cmd() { # name -> command words on stdout, one per line
    local name=$1 tmpl
    case $name in
        aoe) tmpl="$AOE serve {shelf} {slot} {netif} {file}" ;;
        vblade) tmpl="vblade {shelf} {slot} {netif} {file}" ;;
        *) local var="TARGET_CMD_$name"; tmpl=${!var:-} ;;
    esac
    [ -n "$tmpl" ] || return 1
    tmpl=${tmpl//\{shelf\}/$SHELF}; tmpl=${tmpl//\{slot\}/$SLOT}
    tmpl=${tmpl//\{netif\}/$IF_T}; tmpl=${tmpl//\{file\}/$FILE}
    printf '%s\n' $tmpl
}

setup_link() { # mtu
    ip netns del "$NS_T" 2>/dev/null || true
    ip netns del "$NS_I" 2>/dev/null || true
    ip netns add "$NS_T"; ip netns add "$NS_I"
    ip link add "$IF_T" netns "$NS_T" mtu "$1" type veth peer name "$IF_I" netns "$NS_I" mtu "$1"
    for ns in "$NS_T" "$NS_I"; do
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 >/dev/null 2>&1 || true
        ip -n "$ns" link set lo up
    done
    ip -n "$NS_T" link set "$IF_T" up; ip -n "$NS_I" link set "$IF_I" up
}

GEN_PIN=() TGT_PIN=()
[ "$PIN" = 1 ] && { TGT_PIN=(taskset -c 0); GEN_PIN=(taskset -c 1); }
gen() { nsenter --net="/run/netns/$NS_I" -- "${GEN_PIN[@]}" "$AOE" bench "$IF_I" "$@"; }

start_target() { # name -> sets TARGET_PID, returns 1 if it never answers
    local -a cmd
    mapfile -t cmd < <(target_cmd "$1")
    nsenter --net="/run/netns/$NS_T" -- "${TGT_PIN[@]}" "${cmd[@]}" >"$WORK/target.log" 2>&1 &
    TARGET_PID=$!        # nsenter and taskset exec, so this is the target's own PID
    for _ in $(seq 1 50); do
        gen --target "$SHELF.$SLOT" --size 512 >/dev/null 2>&1 && return 0
        kill -0 "$TARGET_PID" 2>/dev/null || break
        sleep 0.2
    done
    echo "bench-compare: $1 did not answer; its log:" >&2; sed 's/^/    /' "$WORK/target.log" >&2
    stop_target; return 1
}

echo "backing file: $SIZE_MB MiB on tmpfs ($FILE)" >&2
head -c $((SIZE_MB << 20)) /dev/urandom >"$FILE"

ROWS=()
row() { ROWS+=("$1"); echo "$1" >&2; }
median() { sort -g | awk '{ a[NR] = $0 } END { print a[int((NR + 1) / 2)] }'; }

for mtu in $MTUS; do
    setup_link "$mtu"
    maxbs=$(( (mtu - 36) / 512 * 512 ))
    for mode in $MODES; do
        bs=$maxbs; [ "$mode" = randread ] && bs=$(( RANDBS < maxbs ? RANDBS : maxbs ))
        for w in $WINDOWS; do
            for t in $TARGETS; do
                if ! target_cmd "$t" >/dev/null; then
                    row "| $mtu | $mode | $bs | $w | $t | not installed (set TARGET_CMD_$t) | | | | | |"
                    continue
                fi
                start_target "$t" || { row "| $mtu | $mode | $bs | $w | $t | did not start | | | | | |"; continue; }
                : >"$WORK/runs"
                for _ in $(seq 1 "$RUNS"); do
                    c0=$(cpu_ticks "$TARGET_PID")
                    gen --target "$SHELF.$SLOT" --mode "$mode" --bs "$bs" --window "$w" \
                        --time "$TIME" --json >"$WORK/out.json"
                    c1=$(cpu_ticks "$TARGET_PID")
                    jq -r --argjson cpu "$(( c1 - c0 ))" --argjson hz "$HZ" \
                        '[.mb_per_s, .iops, .latency_us.p99, .retransmits,
                          (if .bytes > 0 then ($cpu / $hz) / (.bytes / 1e9) else 0 end),
                          (100 * .generator_cpu_s / .seconds), .target.buffer_count] | @tsv' \
                        "$WORK/out.json" >>"$WORK/runs"
                done
                stop_target
                med=$(awk '{ print $1 }' "$WORK/runs" | median)
                line=$(awk -v m="$med" '$1 == m { print; exit }' "$WORK/runs")
                row "$(awk -v mtu="$mtu" -v mode="$mode" -v bs="$bs" -v w="$w" -v t="$t" \
                    '{ printf "| %s | %s | %s | %s | %s (%s buffers) | %.0f | %.0f | %.0f | %d | %.2f | %.0f%% |", mtu, mode, bs, w, t, $7, $1, $2, $3, $4, $5, $6 }' <<<"$line")"
            done
            if [ -n "$OLD_AOE" ] && [ "$mode" = read ]; then
                # The old self-contained bench: its own namespaces, vblade, MTU-sized requests.
                old=$("$OLD_AOE" bench --targets vblade --mtu "$mtu" --window "$w" --seconds "$TIME" \
                      --runs "$RUNS" --size-mib "$SIZE_MB" --pattern seq-read 2>&1 | awk '$1 == "vblade" { print $2, $3, $4, $5 }')
                row "$(awk -v mtu="$mtu" -v bs="$maxbs" -v w="$w" \
                    '{ printf "| %s | read | %s | %s | vblade, old `aoe bench` as generator | %.0f | %.0f | - | %d | %.2f | - |", mtu, bs, w, $1, $2, $4, $3 }' <<<"$old")"
            fi
        done
    done
done

{
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, kernel $(uname -r); TIME=$TIME s per cell, RUNS=$RUNS, $SIZE_MB MiB file on tmpfs, PIN=$PIN"
    echo
    echo "| MTU | mode | bs | window | target | MB/s | IOPS | p99 us | retransmits | target CPU-s/GB | generator CPU |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
} >"$WORK/table.md"
cat "$WORK/table.md"
[ -z "$OUT" ] || cp "$WORK/table.md" "$OUT"
