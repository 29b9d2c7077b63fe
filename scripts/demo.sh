#!/usr/bin/env bash
# demo.sh - the main job on a safe embedded default: build `aoe`, make two private network
# namespaces joined by a veth pair (nothing touches the host's interfaces), export a sparse
# 64 MiB image with `aoe serve`, look at it with aoetools' aoeping, read it back over AoE with
# `aoe read`, and check that what came back is byte for byte the image. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh: must run as root (network namespaces)" >&2; exit 1; }
bash scripts/install-deps.sh
cargo build --release -q -p aoe-cli
AOE=$PWD/target/release/aoe
MTU=${MTU:-1500}
TAG=$$
NS_T=aoedemoT$TAG; NS_I=aoedemoI$TAG; IF_T=dT$TAG; IF_I=dI$TAG
WORK=$(mktemp -d /tmp/aoedemo.XXXXXX)
TPID=""
cleanup() {
    set +e
    [ -n "$TPID" ] && kill "$TPID" 2>/dev/null && wait "$TPID" 2>/dev/null
    ip netns del "$NS_T" 2>/dev/null; ip netns del "$NS_I" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== network: $NS_T/$IF_T <-veth MTU $MTU-> $NS_I/$IF_I"
ip netns add "$NS_T"; ip netns add "$NS_I"
ip link add "$IF_T" netns "$NS_T" mtu "$MTU" type veth peer name "$IF_I" netns "$NS_I" mtu "$MTU"
ip -n "$NS_T" link set "$IF_T" up; ip -n "$NS_I" link set "$IF_I" up

echo "== backing file: sparse 64 MiB with a few written regions"
IMG=$WORK/disk.img
truncate -s 64M "$IMG"
printf 'hello from sector zero\n' | dd of="$IMG" conv=notrunc status=none
head -c 1048576 /dev/urandom | dd of="$IMG" bs=1M seek=20 conv=notrunc status=none
printf 'the last sector\n' | dd of="$IMG" bs=512 seek=$((64 * 2048 - 1)) conv=notrunc status=none

echo "== target: aoe serve 1 1 $IF_T $IMG"
nsenter --net=/run/netns/$NS_T "$AOE" serve 1 1 "$IF_T" "$IMG" 2>"$WORK/target.log" &
TPID=$!
for _ in $(seq 50); do grep -q exporting "$WORK/target.log" && break; sleep 0.1; done
sed 's/^/   /' "$WORK/target.log"

echo "== aoetools' aoeping -I 1 1 $IF_I (IDENTIFY as a third-party tool sees it)"
timeout 10 nsenter --net=/run/netns/$NS_I aoeping -I -s 5 1 1 "$IF_I" | sed 's/^/   /'

echo "== aoe read 1 1 $IF_I (the whole device over AoE)"
t0=$(date +%s.%N)
nsenter --net=/run/netns/$NS_I "$AOE" read 1 1 "$IF_I" "$WORK/back.img"
t1=$(date +%s.%N)
awk -v a="$t0" -v b="$t1" 'BEGIN{printf "   %.1f MB/s, one request in flight\n", 67.108864/(b-a)}'

a=$(sha256sum <"$IMG" | cut -d' ' -f1); b=$(sha256sum <"$WORK/back.img" | cut -d' ' -f1)
echo "   backing file sha256 $a"
echo "   read back    sha256 $b"
if [ "$a" = "$b" ]; then echo "DEMO OK: the image read over AoE is identical"; else echo "DEMO FAILED: contents differ"; exit 1; fi
