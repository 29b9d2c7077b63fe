#!/bin/sh
# install.sh [--uninstall] - install `aoe` with its multi-call links, man pages, shell
# completions and systemd units under PREFIX (default /usr/local), staged under DESTDIR
# (default: none) for packaging:
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
#   PREFIX/share/aoe/install-manifest: what this script put there (below)
# AOE=PATH names the binary to install; default target/release/aoe, built if missing.
# Needs root only for the directories it writes. Run `systemctl daemon-reload` afterwards.
#
# A link named like a program found elsewhere on PATH (Debian's /usr/sbin/vblade,
# aoetools' /usr/sbin/aoe-stat, ...) is said to shadow it when PREFIX/bin comes first on
# PATH; NO_SHADOW=1 makes no link for a name already found on PATH.
#
# --uninstall (same PREFIX, DESTDIR, SYSCONFDIR) removes what the manifest lists and
# nothing else: each file only if its content is still what was installed (sha256), each
# link only if it still points where it was made to, each directory only if install made it
# and it is empty. Anything changed since is kept and named (exit status 1). Run twice, the
# second finds nothing to do (exit status 0).
set -eu
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
bindir=$DESTDIR$PREFIX/bin
mandir=$DESTDIR$PREFIX/share/man/man1
bashdir=$DESTDIR$PREFIX/share/bash-completion/completions
zshdir=$DESTDIR$PREFIX/share/zsh/site-functions
fishdir=$DESTDIR$PREFIX/share/fish/vendor_completions.d
unitdir=$DESTDIR$PREFIX/lib/systemd/system
confdir=$DESTDIR${SYSCONFDIR:-/etc}/aoe
manifestdir=$DESTDIR$PREFIX/share/aoe
manifest=$manifestdir/install-manifest

# Manifest lines, one per thing installed, paths without DESTDIR (the installed system's):
#   f SHA256 PATH     a file and its content's hash
#   l TARGET PATH     a symbolic link and what it points to
#   d - PATH          a directory install made (removed only when empty)
# Paths hold no newline (install.sh's own names); spaces are allowed (the rest of the line).

uninstall() {
	if [ ! -f "$manifest" ]; then
		echo "$0: nothing to uninstall under $DESTDIR$PREFIX (no $manifest)"
		exit 0
	fi
	kept=$(mktemp)
	# Files and links first, then directories deepest first.
	while read -r kind what path; do
		p=$DESTDIR$path
		case $kind in
		f)
			if [ -L "$p" ] || { [ -e "$p" ] && [ ! -f "$p" ]; }; then
				echo "$0: $p is no longer the file install.sh put there; kept" >&2
				echo "$kind $what $path" >>"$kept"
			elif [ -f "$p" ]; then
				sum=$(sha256sum <"$p" | cut -d' ' -f1)
				if [ "$sum" = "$what" ]; then
					rm -f "$p"
				else
					echo "$0: $p changed since it was installed; kept" >&2
					echo "$kind $what $path" >>"$kept"
				fi
			fi
			;;
		l)
			if [ -L "$p" ]; then
				if [ "$(readlink "$p")" = "$what" ]; then
					rm -f "$p"
				else
					echo "$0: $p now points to $(readlink "$p"), not $what; kept" >&2
					echo "$kind $what $path" >>"$kept"
				fi
			elif [ -e "$p" ]; then
				echo "$0: $p is no longer the link install.sh made; kept" >&2
				echo "$kind $what $path" >>"$kept"
			fi
			;;
		esac
	done <"$manifest"
	dirs=$(mktemp)
	grep '^d ' "$manifest" >"$dirs" || true
	if [ -s "$kept" ]; then
		# What is left stays listed, so that a run after the operator has looked at it
		# finishes the job.
		cat "$kept" "$dirs" >"$manifest"
	else
		rm -f "$manifest"
	fi
	# Directories install made, deepest first, each only if empty; one that is not holds
	# something install did not put there (a config in /etc/aoe, a kept file), which is
	# said for /etc/aoe alone (a staged install lists /usr and the like too).
	awk '{ print length($0) "\t" $0 }' "$dirs" | sort -rn | cut -f2- |
		while read -r kind what path; do
			p=$DESTDIR$path
			if [ -d "$p" ] && ! rmdir "$p" 2>/dev/null && [ "$p" = "$confdir" ]; then
				echo "$0: $p is not empty; kept" >&2
			fi
		done
	rm -f "$dirs"
	if [ -s "$kept" ]; then
		rm -f "$kept"
		echo "$0: kept what changed since install (listed above; still in $manifest)" >&2
		exit 1
	fi
	rm -f "$kept"
	echo "uninstalled aoe from $DESTDIR$PREFIX"
	exit 0
}

case ${1:-} in
--uninstall) uninstall ;;
"") ;;
*)
	echo "usage: $0 [--uninstall]   (PREFIX, DESTDIR, SYSCONFDIR, AOE, FORCE, NO_SHADOW from the environment)" >&2
	exit 2
	;;
esac

AOE=${AOE:-target/release/aoe}
if [ ! -x "$AOE" ]; then
	cargo build --release -q -p aoe-cli
fi

new=$(mktemp)
stage=$(mktemp -d)
trap 'rm -rf "$stage" "$new"' EXIT
# Record a path as installed: strip DESTDIR.
record() { # KIND WHAT PATH
	echo "$1 $2 ${3#"$DESTDIR"}" >>"$new"
}
# Make directory $1 and its missing parents, recording those it made.
mkdirs() {
	d=$1
	missing=
	while [ ! -d "$d" ]; do
		missing="$d
$missing"
		d=$(dirname "$d")
	done
	install -d "$1"
	printf '%s' "$missing" | while IFS= read -r m; do
		[ -n "$m" ] && record d - "$m"
	done
	return 0
}
put() { # MODE SRC DEST
	install -m "$1" "$2" "$3"
	record f "$(sha256sum <"$3" | cut -d' ' -f1)" "$3"
}
. scripts/lib/on-path.sh

# DESTDIR itself is the packager's: made if missing, not listed.
[ -z "$DESTDIR" ] || install -d "$DESTDIR"
for d in "$bindir" "$mandir" "$bashdir" "$zshdir" "$fishdir" "$unitdir" "$confdir" "$manifestdir"; do
	mkdirs "$d"
done
put 0755 "$AOE" "$bindir/aoe"
aoe=$bindir/aoe

mkdir -p "$stage/man" "$stage/bash" "$stage/zsh" "$stage/fish" "$stage/units"
"$aoe" generate man "$stage/man" 2>/dev/null
"$aoe" generate completions bash --dir "$stage/bash" 2>/dev/null
"$aoe" generate completions zsh --dir "$stage/zsh" 2>/dev/null
"$aoe" generate completions fish --dir "$stage/fish" 2>/dev/null
for pair in "man:$mandir" "bash:$bashdir" "zsh:$zshdir" "fish:$fishdir"; do
	for f in "$stage/${pair%%:*}"/*; do
		put 0644 "$f" "${pair#*:}/$(basename "$f")"
	done
done

# The multi-call names are the command names with a completion file, less aoe itself.
shadowing=
for f in "$stage/bash"/*; do
	name=$(basename "$f")
	[ "$name" = aoe ] && continue
	target=$bindir/$name
	if [ -e "$target" ] && [ ! -L "$target" ] && [ "${FORCE:-0}" != 1 ]; then
		echo "$0: $target exists and is not a link; skipped (FORCE=1 replaces it)" >&2
		continue
	fi
	other=$(elsewhere_on_path "$name" "$PREFIX/bin")
	if [ -n "$other" ]; then
		if [ "${NO_SHADOW:-0}" = 1 ]; then
			echo "$0: $name is on PATH already (${other% *}); no link made (NO_SHADOW=1)" >&2
			continue
		fi
		case $other in
		*" shadowed") shadowing="$shadowing $target:${other% *}" ;;
		esac
	fi
	ln -sfn aoe "$target"
	record l aoe "$target"
done
if [ -n "$shadowing" ]; then
	for s in $shadowing; do
		echo "$0: ${s%%:*} shadows ${s#*:} on PATH" >&2
	done
	echo "$0: those names now run aoe; NO_SHADOW=1 $0 makes no link for a name already on PATH (or choose another PREFIX)" >&2
fi

for u in dist/systemd/*.service; do
	sed "s|/usr/bin/aoe|$PREFIX/bin/aoe|g" "$u" >"$stage/units/$(basename "$u")"
	put 0644 "$stage/units/$(basename "$u")" "$unitdir/$(basename "$u")"
done

# An earlier install's entries this one did not write again stay listed (a name dropped
# since is still removed by --uninstall); a directory already listed is not listed twice.
if [ -f "$manifest" ]; then
	while read -r kind what path; do
		grep -qxF -- "$path" <<EOF || echo "$kind $what $path" >>"$new"
$(cut -d' ' -f3- "$new")
EOF
	done <"$manifest"
fi
cp "$new" "$manifest"
chmod 0644 "$manifest"
echo "installed aoe under $DESTDIR$PREFIX (binary, links, man pages, completions, units; $manifest lists them for --uninstall)"
