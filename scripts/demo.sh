#!/usr/bin/env bash
# demo.sh - the main job in one command: builds `aoe` and runs `aoe demo` (see `aoe demo
# --help`): two private network namespaces joined by a veth pair (the host's interfaces are
# not touched), a sparse image exported by `aoe serve`, `aoe initiator` on the other side,
# discovery, aoe-stat, an ext4 file system made, written, checked and read back through the
# device, the figures, and everything removed again, also on Ctrl-C. Needs root.
# Arguments go to `aoe demo` (--size MIB, --write MIB, --mtu BYTES, --no-install).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh: must run as root (network namespaces, mounts)" >&2; exit 1; }
echo "demo.sh: building aoe (cargo build --release -p aoe-cli; minutes the first time)" >&2
cargo build --release -q -p aoe-cli
exec ./target/release/aoe demo "$@"
