#!/bin/sh
# install-links.sh [--no-shadow] DIR [AOE]: make the aoetools names (aoe-stat, aoeping,
# aoecfg, ...) and vblade links to the `aoe` binary in DIR, so each behaves as that tool
# (multi-call by argv[0]). AOE defaults to the `aoe` found on PATH, else this checkout's
# release build (target/release/aoe, what `cargo build --release` and scripts/demo.sh make).
# Existing links are replaced; existing regular files (for example aoetools' own programs)
# are left alone unless FORCE=1.
#
# A name also found elsewhere on PATH (Debian's vblade and aoetools install /usr/sbin/vblade,
# /usr/sbin/aoe-stat, ...) is named: when DIR comes first on PATH (/usr/local/sbin does on
# Debian), the link shadows that program, and `vblade` then runs aoe. --no-shadow (or
# NO_SHADOW=1) makes no link for a name already found on PATH.
set -eu
no_shadow=${NO_SHADOW:-0}
if [ "${1:-}" = --no-shadow ]; then
	no_shadow=1
	shift
fi
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
	echo "usage: $0 [--no-shadow] DIR [PATH-TO-aoe]" >&2
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
absdir=$(cd "$dir" && pwd)
. "$(dirname "$0")/lib/on-path.sh"
shadowing=no
for name in aoe-discover aoe-stat aoe-interfaces aoe-flush aoe-revalidate aoe-version \
	aoe-sancheck aoeping aoecfg aoe-mkdevs aoe-mkshelf coraid-update sos-linux vblade; do
	target=$dir/$name
	if [ -e "$target" ] && [ ! -L "$target" ] && [ "${FORCE:-0}" != 1 ]; then
		echo "$0: $target exists and is not a link; skipped (FORCE=1 replaces it)" >&2
		continue
	fi
	other=$(elsewhere_on_path "$name" "$dir" "$absdir")
	if [ -n "$other" ] && [ "$no_shadow" = 1 ]; then
		echo "$0: $name is on PATH already (${other% *}); no link made (--no-shadow)" >&2
		continue
	fi
	ln -sfn "$aoe" "$target"
	case $other in
	*" shadowed")
		echo "$target -> $aoe (shadows ${other% *} on PATH)"
		shadowing=yes
		;;
	*" after") echo "$target -> $aoe (${other% *} comes first on PATH)" ;;
	*) echo "$target -> $aoe" ;;
	esac
done
if [ $shadowing = yes ]; then
	echo "$0: the names marked 'shadows' now run aoe instead of the program of that name; --no-shadow makes no link for a name already on PATH (or use a DIR later on PATH)" >&2
fi
