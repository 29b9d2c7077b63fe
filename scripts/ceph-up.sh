#!/usr/bin/env bash
# ceph-up.sh - a throwaway one-node Ceph cluster (one monitor, one manager, one OSD) on
# 127.0.0.1, for the RBD export tests and for trying `aoe serve ... rbd:POOL/IMAGE` by hand.
#
#   scripts/ceph-up.sh [DIR]        (default DIR: /tmp/aoe-ceph)
#
# Everything lives under DIR: DIR/ceph.conf and DIR/ceph.client.admin.keyring are what a
# client needs (`rbd -c DIR/ceph.conf ...`, `aoe serve --ceph-conf DIR/ceph.conf ...`), and the
# daemons' pids are in DIR/*.pid for scripts/ceph-down.sh. cephx authentication is on. The pool
# `rbd` is created and initialised for RBD; no image is made.
#
# Environment: CEPH_MON_PORT (msgr2 port of the monitor, default 3300: choose another to run
# two clusters at once), CEPH_STORE (bluestore, the default, on a sparse file in DIR; or
# memstore, in the OSD's memory). It takes about 15 s and 1 GB of memory on an idle machine.
# Idempotent: a cluster already running under DIR is left as it is. Needs ceph-mon, ceph-mgr,
# ceph-osd, ceph-common (scripts/install-deps.sh) and uuidgen.
set -euo pipefail

dir=${1:-/tmp/aoe-ceph}
port=${CEPH_MON_PORT:-3300}
store=${CEPH_STORE:-bluestore}
conf=$dir/ceph.conf
start=$SECONDS

say() { printf 'ceph-up [%3ds] %s\n' "$((SECONDS - start))" "$*"; }
die() { echo "ceph-up: $*" >&2; exit 1; }
alive() { [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }
# Retries a command until it succeeds, at most $1 tenths of a second.
until_ok() {
    local n=$1; shift
    for _ in $(seq 1 "$n"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    return 1
}

for t in ceph-mon ceph-mgr ceph-osd ceph ceph-authtool monmaptool rbd uuidgen; do
    command -v "$t" >/dev/null || die "$t not found (scripts/install-deps.sh installs it)"
done

if alive mon && alive mgr && alive osd && timeout 10 ceph -c "$conf" health >/dev/null 2>&1; then
    say "already running under $dir"
    exit 0
fi
# A half-started or dead cluster: stop whatever of it runs and start again from nothing.
if [ -d "$dir" ]; then
    bash "$(dirname "$0")/ceph-down.sh" "$dir" >/dev/null
fi
mkdir -p "$dir"/{run,log,crash,mon,mgr/ceph-x,osd/ceph-0}

fsid=$(uuidgen)
cat >"$conf" <<CONF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
mon initial members = a
public network = 127.0.0.0/8
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = $dir/run
admin socket = $dir/run/\$cluster-\$name.\$pid.asok
log file = $dir/log/\$cluster-\$name.log
crash dir = $dir/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
mgr initial modules =
[client]
keyring = $dir/ceph.client.admin.keyring
[mon]
mon data = $dir/mon/\$cluster-\$id
mon cluster log file = $dir/log/\$cluster.\$channel.log
[mgr]
mgr data = $dir/mgr/\$cluster-\$id
[osd]
osd data = $dir/osd/\$cluster-\$id
osd objectstore = $store
bluestore block create = true
bluestore block size = 10737418240
osd memory target = 939524096
memstore device bytes = 2147483648
osd crush update on start = true
CONF

# Keys: the monitors' own, and an administrator's that the monitor learns at mkfs.
ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$dir/ceph.client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/ceph.client.admin.keyring" >/dev/null
monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" --enable-all-features \
    --set-min-mon-release pacific "$dir/monmap" >/dev/null
ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring"
ceph-mon -c "$conf" -i a -f >"$dir/log/mon.out" 2>&1 &
echo $! >"$dir/mon.pid"
until_ok 300 timeout 5 ceph -c "$conf" mon stat || die "monitor did not form a quorum (see $dir/log)"
say "monitor up on 127.0.0.1:$port"

ceph -c "$conf" auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    -o "$dir/mgr/ceph-x/keyring"
ceph-mgr -c "$conf" -i x -f >"$dir/log/mgr.out" 2>&1 &
echo $! >"$dir/mgr.pid"

osd_uuid=$(uuidgen)
[ "$(ceph -c "$conf" osd new "$osd_uuid")" = 0 ] || die "the new OSD did not get id 0"
ceph -c "$conf" auth get-or-create osd.0 mon 'allow profile osd' mgr 'allow profile osd' \
    osd 'allow *' -o "$dir/osd/ceph-0/keyring"
ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >"$dir/log/osd-mkfs.out" 2>&1 ||
    die "OSD mkfs failed (see $dir/log/osd-mkfs.out)"
ceph-osd -c "$conf" -i 0 -f >"$dir/log/osd.out" 2>&1 &
echo $! >"$dir/osd.pid"
osd_up() { ceph -c "$conf" osd dump | grep -q '^osd.0 up .* in '; }
until_ok 600 osd_up || die "osd.0 did not come up (see $dir/log)"
say "osd.0 up ($store)"

ceph -c "$conf" osd pool create rbd 8 8 replicated >/dev/null 2>&1
rbd -c "$conf" pool init rbd
pgs_clean() { ceph -c "$conf" pg stat | grep -qE '^([0-9]+) pgs: \1 active\+clean;'; }
until_ok 600 pgs_clean || die "placement groups not active+clean (see $dir/log)"
mgr_up() { ceph -c "$conf" mgr stat | grep -q '"available": true'; }
until_ok 300 mgr_up || die "manager not available (see $dir/log)"
say "cluster ready: pool rbd; client config $conf"
