#!/usr/bin/env bash
# ceph-down.sh - stops the cluster scripts/ceph-up.sh started under DIR (default
# /tmp/aoe-ceph), by the pids it recorded there and nothing else, and removes DIR.
# Idempotent: nothing running is fine.
set -uo pipefail
dir=${1:-/tmp/aoe-ceph}
for d in osd mgr mon; do
    f=$dir/$d.pid
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "ceph-down: $d (pid $pid) did not stop in 10 s; SIGKILL"
            kill -9 "$pid" 2>/dev/null
        fi
    fi
    rm -f "$f"
done
# Only a directory ceph-up.sh made: never remove something else by a mistyped argument.
if [ -f "$dir/ceph.conf" ] || [ -d "$dir/mon" ]; then
    rm -rf "$dir"
fi
echo "ceph-down: stopped $dir"
