#!/usr/bin/env bash
# bench-engine-ab.sh - two builds of the engines' criterion benchmarks, interleaved.
#
# Runs the bench binaries OLD and NEW (built with `cargo bench -p aoe-proto --bench engines
# --no-run`, then copied away) in turn, ROUNDS times each, and prints per run and benchmark
# the fastest and the median sample in us per iteration, from criterion's sample.json. On a
# shared machine the fastest sample is the one least disturbed by other processes; the
# medians move with the load. Prints the load average with every run.
#
# Usage: scripts/bench-engine-ab.sh OLD NEW [FILTER]
#   FILTER="initiator engine" (criterion's benchmark filter)   ROUNDS=4
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 OLD-BENCH-BINARY NEW-BENCH-BINARY [FILTER]" >&2; exit 2; }
OLD=$(readlink -f "$1") NEW=$(readlink -f "$2") FILTER=${3:-initiator engine}
ROUNDS=${ROUNDS:-4}
for b in "$OLD" "$NEW"; do [ -x "$b" ] || { echo "bench-engine-ab: no binary at $b" >&2; exit 1; }; done
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
for r in $(seq 1 "$ROUNDS"); do
    for v in old new; do
        bin=$OLD; [ "$v" = new ] && bin=$NEW
        load=$(cut -d' ' -f1 /proc/loadavg)
        rm -rf target/criterion
        "$bin" --bench "$FILTER" --warm-up-time 1 --measurement-time 3 --noplot >/dev/null 2>&1
        python3 - "$r" "$v" "$load" <<'PY'
import glob, json, statistics, sys
for f in sorted(glob.glob('target/criterion/*/*/new/sample.json')):
    d = json.load(open(f))
    per = [t / i for t, i in zip(d['times'], d['iters'])]
    name = f.split('/')[3]
    print(f"round {sys.argv[1]}\t{sys.argv[2]}\tload {sys.argv[3]}\t{name}\t"
          f"fastest {min(per) / 1000:.3f} us\tmedian {statistics.median(per) / 1000:.3f} us")
PY
    done
done
