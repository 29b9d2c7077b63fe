#!/bin/sh
# install.sh - install `aoe` with its multi-call links, man pages, shell completions and
# systemd units under PREFIX (default /usr/local), staged under DESTDIR (default: none) for
# packaging:
#   PREFIX/bin/aoe, PREFIX/bin/NAME -> aoe for every multi-call name (aoe-stat, vblade, ...;
#     an existing file that is not a link is left alone unless FORCE=1)
#   PREFIX/share/man/man1/*.1                      (aoe generate man)
#   PREFIX/share/bash-completion/completions/NAME  (aoe generate completions bash)
#   PREFIX/share/zsh/site-functions/_NAME          (zsh)
#   PREFIX/share/fish/vendor_completions.d/NAME.fish (fish)
#   PREFIX/lib/systemd/system/aoe-initiator.service, aoe-serve@.service (ExecStart with
#     PREFIX/bin/aoe; PREFIX=/usr puts them in /usr/lib/systemd/system)
#   SYSCONFDIR/aoe/ (default /etc/aoe, made empty: aoe-serve@NAME.service reads
#     /etc/aoe/NAME.toml)
# AOE=PATH names the binary to install; default target/release/aoe, built if missing.
# Needs root only for the directories it writes. Run `systemctl daemon-reload` afterwards.
set -eu
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
AOE=${AOE:-target/release/aoe}
if [ ! -x "$AOE" ]; then
	cargo build --release -q -p aoe-cli
fi
bindir=$DESTDIR$PREFIX/bin
mandir=$DESTDIR$PREFIX/share/man/man1
bashdir=$DESTDIR$PREFIX/share/bash-completion/completions
zshdir=$DESTDIR$PREFIX/share/zsh/site-functions
fishdir=$DESTDIR$PREFIX/share/fish/vendor_completions.d
unitdir=$DESTDIR$PREFIX/lib/systemd/system
confdir=$DESTDIR${SYSCONFDIR:-/etc}/aoe

install -d "$bindir" "$mandir" "$unitdir" "$confdir"
install -m 0755 "$AOE" "$bindir/aoe"
aoe=$bindir/aoe

"$aoe" generate man "$mandir" 2>/dev/null
"$aoe" generate completions bash --dir "$bashdir" 2>/dev/null
"$aoe" generate completions zsh --dir "$zshdir" 2>/dev/null
"$aoe" generate completions fish --dir "$fishdir" 2>/dev/null

# The multi-call names are the command names with a completion file, less aoe itself.
for f in "$bashdir"/*; do
	name=$(basename "$f")
	[ "$name" = aoe ] && continue
	target=$bindir/$name
	if [ -e "$target" ] && [ ! -L "$target" ] && [ "${FORCE:-0}" != 1 ]; then
		echo "$0: $target exists and is not a link; skipped (FORCE=1 replaces it)" >&2
		continue
	fi
	ln -sfn aoe "$target"
done

for u in dist/systemd/*.service; do
	sed "s|/usr/bin/aoe|$PREFIX/bin/aoe|g" "$u" >"$unitdir/$(basename "$u")"
	chmod 0644 "$unitdir/$(basename "$u")"
done
echo "installed aoe under $DESTDIR$PREFIX (binary, links, man pages, completions, units)"
