# on-path.sh, sourced by install.sh and install-links.sh (POSIX sh).
#
# elsewhere_on_path NAME DIR...: the first program NAME on PATH outside DIR (given under
# each of its spellings, e.g. as written and absolute), if any, and whether DIR comes
# before it on PATH: prints "PROGRAM shadowed" (a link NAME in DIR would run instead of
# it), "PROGRAM after" (it would still run) or nothing.
elsewhere_on_path() {
	eop_name=$1
	shift
	eop_before=no
	IFS=:
	for eop_p in $PATH; do
		[ -n "$eop_p" ] || continue
		for eop_d in "$@"; do
			if [ "$eop_p" = "$eop_d" ]; then
				eop_before=yes
				continue 2
			fi
		done
		if [ -x "$eop_p/$eop_name" ] && [ ! -d "$eop_p/$eop_name" ]; then
			unset IFS
			if [ $eop_before = yes ]; then
				echo "$eop_p/$eop_name shadowed"
			else
				echo "$eop_p/$eop_name after"
			fi
			return 0
		fi
	done
	unset IFS
}
