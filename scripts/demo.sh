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
# Its own target directory: a plain build into target/release would replace a binary built there
# with other features (`--features aoe-cli/rbd` for the RBD tests and benchmarks) by one
# without them, and a later run of those would find no RBD support.
echo "demo.sh: building aoe (cargo build --release -p aoe-cli --target-dir target/demo; minutes the first time)" >&2
cargo build --release -q -p aoe-cli --target-dir target/demo
exec ./target/demo/release/aoe demo "$@"
