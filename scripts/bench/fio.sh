#!/usr/bin/env bash
# scripts/bench/fio.sh - fio (an independent load generator) through `aoe initiator` against
# `aoe serve` and vblade, and against nbdkit over TCP on the same link, in one run.
#
# For each MTU: two private network namespaces joined by a veth pair (never the host's
# interfaces; both removed on exit, Ctrl-C included) and one backing file on tmpfs. Each run
# (RUNS of them, the targets in turn within a run, so the figures are interleaved) measures:
#   <target> dev   fio ioengine=libaio direct=1 on the FUSE device file of `aoe initiator`
#   <target> nbd   fio ioengine=nbd on the initiator's NBD export (Unix socket)
#   nbdkit tcp     fio ioengine=nbd on nbdkit's file plugin over TCP on the same veth
# with the workloads WORKLOADS (name:rw:bs:iodepth), TIME seconds each (time_based). A cell
# is the median over the runs of MB/s, IOPS, completion latency p50/p99 (us) and the
# CPU-seconds per GB moved of the target (aoe serve, vblade or nbdkit), the initiator (aoe
# initiator; none for nbdkit) and fio itself. Ratios: our dev and nbd paths through `aoe
# serve` to nbdkit (the end-to-end goal of issue 15: >= 0.75x at MTU 9000) and to the same
# path through vblade.
#
# Usage: sudo scripts/bench/fio.sh
#   AOE=target/release/aoe   MTUS="9000 1500"   TARGETS="aoe vblade"   NBDKIT=1
#   SIZE_MB=1024   TIME=5   RUNS=2   PATHS="dev nbd"
#   WORKLOADS="read1m-qd1:read:1m:1 read1m-qd16:read:1m:16 write1m-qd1:write:1m:1
#              write1m-qd16:write:1m:16 randread4k-qd32:randread:4k:32
#              randwrite4k-qd32:randwrite:4k:32"
#   JSON_DIR=dir  keep every fio JSON report there
#   INITS="a b"   alternate initiators within each run (same target start): INIT_AOE_<name>
#                 (binary, default AOE) and INIT_ARGS_<name> (extra arguments) per name; the
#                 table's target column reads <target>/<name>
#   ENABLE_URING=Y  set /sys/module/fuse/parameters/enable_uring for the run (restored on
#                 exit), for an initiator given --fuse-uring
#   CELLS=file    keep every run's figures (one line per cell and run: MTU|target|path|workload,
#                 MB/s, IOPS, p50, p99, CPU-s/GB target, initiator, fio), for per-run ratios
# Needs root, iproute2, util-linux (nsenter), jq, fuse3, fio (Debian: fio), vblade, nbdkit,
# libnbd-bin (nbdinfo).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"
AOE=${AOE:-target/release/aoe}
MTUS=${MTUS:-9000 1500}
TARGETS=${TARGETS:-aoe vblade}
NBDKIT=${NBDKIT:-1}
SIZE_MB=${SIZE_MB:-1024}
TIME=${TIME:-5}
RUNS=${RUNS:-2}
PATHS=${PATHS:-dev nbd}
WORKLOADS=${WORKLOADS:-read1m-qd1:read:1m:1 read1m-qd16:read:1m:16 write1m-qd1:write:1m:1 write1m-qd16:write:1m:16 randread4k-qd32:randread:4k:32 randwrite4k-qd32:randwrite:4k:32}
JSON_DIR=${JSON_DIR:-}
CELLS=${CELLS:-}
INITS=${INITS:-}
ENABLE_URING=${ENABLE_URING:-}
URING_PARAM=/sys/module/fuse/parameters/enable_uring URING_OLD=
SHELF=1 SLOT=1

die() { echo "bench/fio.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (namespaces, raw sockets, FUSE)"
for t in ip nsenter jq awk fio fusermount3 nbdinfo; do
    command -v "$t" >/dev/null || die "missing $t (Debian: iproute2, util-linux, jq, gawk, fio, fuse3, libnbd-bin)"
done
[ "$NBDKIT" = 1 ] && { command -v nbdkit >/dev/null || die "missing nbdkit (Debian: nbdkit)"; }
[ -x "$AOE" ] || die "no aoe binary at $AOE (cargo build --release, or set AOE=)"
AOE=$(readlink -f "$AOE")

bench_workspace bf bench-fio
IP_T=10.92.0.1 IP_I=10.92.0.2
cleanup_more() { [ -z "$URING_OLD" ] || echo "$URING_OLD" >"$URING_PARAM"; }

ticks_of() { [ -n "$1" ] && cpu_ticks "$1" || echo 0; } # pid or ""

# One fio run: path (dev, nbd, tcp), workload spec; appends
# "key mbps iops p50us p99us tgt_cpu_s_per_gb init_cpu_s_per_gb fio_cpu_s_per_gb" to $WORK/cells.
fio_cell() { # key path rw bs depth
    local key=$1 path=$2 rw=$3 bs=$4 depth=$5 out=$WORK/fio.json
    local -a eng
    case $path in
        dev) eng=(--ioengine=libaio --direct=1 --filename="$ROOT/e$SHELF.$SLOT") ;;
        nbd) eng=(--ioengine=nbd "--uri=nbd+unix:///e$SHELF.$SLOT?socket=$SOCK") ;;
        tcp) eng=(--ioengine=nbd "--uri=nbd://$IP_T:10809") ;;
    esac
    local tp=${TARGET_PID:-$KIT_PID} t0 i0 t1 i1
    t0=$(ticks_of "$tp") i0=$(ticks_of "$INIT_PID")
    if ! in_i fio --name=cell "${eng[@]}" --rw="$rw" --bs="$bs" --iodepth="$depth" \
        --size="${SIZE_MB}m" --time_based --runtime="$TIME" --numjobs=1 \
        --output-format=json --output="$out" >"$WORK/fio.err" 2>&1; then
        echo "bench/fio.sh: fio $key failed:" >&2; sed 's/^/    /' "$WORK/fio.err" "$out" >&2 || true
        echo "$key 0 0 0 0 0 0 0" >>"$WORK/cells"; return 0
    fi
    t1=$(ticks_of "$tp") i1=$(ticks_of "$INIT_PID")
    [ -n "$JSON_DIR" ] && cp "$out" "$JSON_DIR/$key-$(date +%s%N).json"
    jq -r --arg key "$key" --argjson dt $((t1 - t0)) --argjson di $((i1 - i0)) \
        --argjson hz "$HZ" --argjson init "$([ -n "$INIT_PID" ] && echo 1 || echo 0)" '
        .jobs[0] as $j
        | ($j.read.io_bytes + $j.write.io_bytes) as $b
        | (if $j.read.io_bytes > 0 then $j.read else $j.write end) as $d
        | ($j.job_runtime / 1000) as $secs
        | [$key,
           ($d.bw_bytes / 1e6 | floor),
           ($d.iops | floor),
           ($d.clat_ns.percentile["50.000000"] / 1000 | floor),
           ($d.clat_ns.percentile["99.000000"] / 1000 | floor),
           (if $b > 0 then ($dt / $hz) / ($b / 1e9) else 0 end | . * 100 | round / 100),
           (if $init == 1 and $b > 0 then ($di / $hz) / ($b / 1e9) else "-" end
              | if type == "number" then . * 100 | round / 100 else . end),
           (if $b > 0 then (($j.usr_cpu + $j.sys_cpu) / 100 * $secs) / ($b / 1e9) else 0 end
              | . * 100 | round / 100)]
        | map(tostring) | join(" ")' "$out" >>"$WORK/cells"
}

workloads() { # target path: every workload on it
    local w name rw bs depth
    for w in $WORKLOADS; do
        IFS=: read -r name rw bs depth <<<"$w"
        fio_cell "$MTU|$1|$2|$name" "$2" "$rw" "$bs" "$depth"
    done
}

[ -n "$JSON_DIR" ] && mkdir -p "$JSON_DIR"
if [ -n "$ENABLE_URING" ]; then
    [ -w "$URING_PARAM" ] || die "no $URING_PARAM (a kernel without FUSE over io_uring?)"
    URING_OLD=$(cat "$URING_PARAM"); echo "$ENABLE_URING" >"$URING_PARAM"
fi
echo "backing file: $SIZE_MB MiB on tmpfs; $(nproc) CPUs; load $(load); fio $(fio --version)" >&2
head -c $((SIZE_MB << 20)) /dev/urandom >"$FILE"
: >"$WORK/cells"
LOADS=()
for MTU in $MTUS; do
    bench_link "$MTU"
    for run in $(seq 1 "$RUNS"); do
        for t in $TARGETS; do
            start_target "$t" || die "$t did not answer"
            for v in ${INITS:--}; do
                label=$t
                if [ "$v" != - ]; then
                    label=$t/$v
                    a="INIT_AOE_$v" g="INIT_ARGS_$v"
                    INIT_AOE=${!a:-$AOE} INIT_ARGS=${!g:-}
                fi
                start_initiator
                for p in $PATHS; do workloads "$label" "$p"; done
                stop_pid "$INIT_PID"; INIT_PID=""; fusermount3 -u -z "$ROOT" 2>/dev/null || true
            done
            stop_pid "$TARGET_PID"; TARGET_PID=""
        done
        if [ "$NBDKIT" = 1 ]; then
            start_nbdkit
            workloads nbdkit tcp
            stop_pid "$KIT_PID"; KIT_PID=""
        fi
        LOADS+=("$(load)")
        echo "MTU $MTU run $run done; load $(load)" >&2
    done
done

[ -n "$CELLS" ] && cp "$WORK/cells" "$CELLS"
# Medians per cell (each column on its own), then the table with ratios.
declare -A M=()
while read -r key; do
    line=$key
    for col in 2 3 4 5 6 7 8; do
        line+=" $(awk -v k="$key" -v c=$col '$1 == k { print $c }' "$WORK/cells" | median)"
    done
    M[$key]=$line
done < <(awk '{ print $1 }' "$WORK/cells" | awk '!seen[$0]++')
field() { [ -n "${M[$1]:-}" ] && echo "${M[$1]}" | cut -d' ' -f"$2" || echo 0; } # key column

echo
echo "fio $(fio --version | sed 's/^fio-//'), TIME=${TIME}s per cell, median of $RUNS interleaved runs; $(date -u +%F) $(nproc) CPUs; load during the runs: ${LOADS[*]}"
echo "dev = libaio direct=1 on the FUSE device file; nbd = fio's nbd engine on the initiator's Unix socket; tcp = nbd engine on nbdkit over TCP"
echo "CPU-s/GB = CPU-seconds per GB moved of the target / the initiator / fio; vs nbdkit, vs vblade: MB/s ratios (the same as IOPS ratios) of the same workload, path and MTU"
echo "| MTU | target | path | workload | MB/s | IOPS | p50 us | p99 us | CPU-s/GB target / initiator / fio | vs nbdkit | vs vblade |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for key in $(awk '{ print $1 }' "$WORK/cells" | awk '!seen[$0]++'); do
    IFS='|' read -r mtu tgt path name <<<"$key"
    mb=$(field "$key" 2) iops=$(field "$key" 3)
    variant=""; case $tgt in */*) variant=/${tgt#*/} ;; esac
    kit=$(field "$mtu|nbdkit|tcp|$name" 2) vb=$(field "$mtu|vblade$variant|$path|$name" 2)
    vk=-; vv=-
    [ "$tgt" != nbdkit ] && vk=$(ratio "$mb" "$kit")
    [ "${tgt%%/*}" = aoe ] && [ "$vb" != 0 ] && vv=$(ratio "$mb" "$vb")
    echo "| $mtu | $tgt | $path | $name | $mb | $iops | $(field "$key" 4) | $(field "$key" 5) | $(field "$key" 6) / $(field "$key" 7) / $(field "$key" 8) | $vk | $vv |"
done
