#!/usr/bin/env bash
# test.sh - the whole test suite, as CI runs it (.ci/run calls exactly this). Needs root:
# the interop tests build network namespaces and veth pairs and run real AoE peers (vblade,
# aoetools, tshark, the Linux kernel's aoe driver in a qemu guest) over them.
#
#   1. installs the Debian packages the peers come from (idempotent, scripts/install-deps.sh)
#   2. rustfmt, clippy -D warnings and rustdoc -D warnings (no broken or private links)
#   3. every crate's tests, unit to interop (cargo test --workspace --release, with the
#      root-tests features that build the test binaries needing root)
#   4. the fuzz targets, FUZZ_SECONDS each (default 30)
# It fails loudly on the first failure; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test.sh: must run as root (network namespaces, AF_PACKET)" >&2; exit 1; }

# The test binaries that need root are behind each crate's `root-tests` feature, so that
# plain `cargo test` as an ordinary user builds and passes everything else.
root_tests=aoe-sys/root-tests,aoe-store/root-tests,aoe-testkit/root-tests,aoe-cli/root-tests
# The Ceph RBD backend (a cargo feature, off by default) and its tests against a one-node
# cluster that the tests start on 127.0.0.1 (scripts/ceph-up.sh).
root_tests=$root_tests,aoe-cli/rbd

step() { printf '\n==== %s ====\n' "$*"; }

step "dependencies"
bash scripts/install-deps.sh

step "rustfmt"
cargo fmt --all --check

step "clippy"
cargo clippy --workspace --all-targets --release --features "$root_tests" -- -D warnings

step "rustdoc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --release --features "$root_tests"

step "tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --release --features "$root_tests" 2>&1 | tee "$log"
passed=$(awk '/^test result:/ {for (i=1;i<=NF;i++) if ($i ~ /^passed;?$/) s+=$(i-1)} END {print s+0}' "$log")
failed=$(awk '/^test result:/ {for (i=1;i<=NF;i++) if ($i ~ /^failed;?$/) s+=$(i-1)} END {print s+0}' "$log")

step "fuzz"
bash scripts/fuzz.sh "${FUZZ_SECONDS:-30}"

step "summary"
echo "$passed passed, $failed failed"
