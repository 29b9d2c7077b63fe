#!/bin/sh
# install-links.sh DIR [AOE]: make the aoetools names (aoe-stat, aoeping, aoecfg, ...) and
# vblade links to the `aoe` binary in DIR, so each behaves as that tool (multi-call by
# argv[0]). AOE defaults to the `aoe` found on PATH, else this checkout's release build
# (target/release/aoe, what `cargo build --release` and scripts/demo.sh make). Existing links
# are replaced; existing regular files (for example aoetools' own programs) are left alone
# unless FORCE=1.
set -eu
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
	echo "usage: $0 DIR [PATH-TO-aoe]" >&2
	exit 2
fi
dir=$1
aoe=${2:-$(command -v aoe || true)}
built=$(cd "$(dirname "$0")/.." && pwd)/target/release/aoe
if [ $# -lt 2 ] && [ -z "$aoe" ] && [ -x "$built" ]; then
	aoe=$built
fi
if [ -z "$aoe" ] || [ ! -x "$aoe" ]; then
	echo "$0: no aoe binary on PATH or in target/release (build it: cargo build --release -p aoe-cli; or give its path as the second argument)" >&2
	exit 1
fi
case $aoe in /*) ;; *) aoe=$(cd "$(dirname "$aoe")" && pwd)/$(basename "$aoe") ;; esac
mkdir -p "$dir"
for name in aoe-discover aoe-stat aoe-interfaces aoe-flush aoe-revalidate aoe-version \
	aoe-sancheck aoeping aoecfg aoe-mkdevs aoe-mkshelf coraid-update sos-linux vblade; do
	target=$dir/$name
	if [ -e "$target" ] && [ ! -L "$target" ] && [ "${FORCE:-0}" != 1 ]; then
		echo "$0: $target exists and is not a link; skipped (FORCE=1 replaces it)" >&2
		continue
	fi
	ln -sfn "$aoe" "$target"
	echo "$target -> $aoe"
done
