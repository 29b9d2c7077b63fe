#!/usr/bin/env bash
# power-loss.sh - does an AoE target keep its durability promises when the machine under it
# stops? The target runs in a qemu/TCG guest (Debian's linux-image-6.1, busybox initramfs)
# whose kernel page cache is lost for real: the host SIGKILLs qemu in the middle of a write
# stream, then checks the disk image.
#
# Topology, all inside one network namespace this script creates and deletes (AoE frames
# never touch the host's interfaces):
#
#     guest: target on eth0 (virtio-net) == tap "pltap" --+
#                                                          +-- bridge "plbr"
#     host:  aoe initiator on "plini" <== veth ==> "plport" -+
#
# The guest's disks (virtio-blk): vda, the data disk, backed by a host file; vdb, read-only,
# an ext4 image with the target binary and the shared libraries `ldd` lists for it (copied
# from the host as they are: librbd, librados and the rest when the binary was built with
# the rbd feature; about 40 MB, read on demand by the guest, not unpacked into its RAM).
# vda has no volatile cache (qemu `write-cache=off`: the guest sees a write-through disk,
# and qemu writes each request to the host file before completing it), so what a killed
# qemu leaves in the host file is what the guest's kernel had handed to the disk. The guest
# keeps dirty pages until told otherwise: vm.dirty_writeback_centisecs=0 (no periodic
# writeback), dirty_expire_centisecs=360000, dirty ratios of 50/90 % (the writes here are a
# few MiB in 256 MiB).
#
# The export (-e): raw, the whole of vda (8 MiB of random bytes); ext4, the file data.bin
# (8 MiB of random bytes) on an ext4 file system made on vda by the host (mkfs.ext4 -d)
# and mounted by the guest with default options; xfs and btrfs, the same file on those
# (mkfs.xfs -p with a protofile, 320 MiB: xfsprogs' smallest; mkfs.btrfs --rootdir,
# 256 MiB; sparse on the host), mounted with default options (btrfs: data copy-on-write
# and checksums, so an overwrite is a new extent that only a transaction commit or an
# fsync's log tree makes reachable). -S sparse|prealloc (a file system export): the guest
# makes data.bin anew before the target starts, a hole (`truncate`) or preallocated
# unwritten extents (`fallocate`), then `sync`s; its old bytes are zeros, and every write
# allocates (ext4, XFS: a logged allocation or unwritten-extent conversion).
#
# The writes, from the host through `aoe initiator`'s device file ROOT/e1.1, in 64 KiB
# chunks at shuffled chunk positions, each chunk a separate `dd oflag=direct` (its own
# random bytes, from new.bin), so that a chunk counts as acknowledged when its dd exited 0:
#   A  16 chunks, then `sync -d` on the device file: FLUSH CACHE EXT; it succeeded.
#   B  16 chunks, acknowledged, never flushed.
#   C  a writer in the background, one chunk after another; once 4 of its chunks are
#      acknowledged the host SIGKILLs qemu. Chunks acknowledged before the kill join B's
#      rule; the one it was writing is in flight; the rest were never started.
# Then the host reads the image (raw: the file itself; a file system: loop-mounted, which
# replays the journal or log, then its own checker: `e2fsck -fn`, `xfs_repair -n`,
# `btrfs check --readonly`) and classifies every 512-byte sector of the 8 MiB as the
# old bytes, the new bytes of its chunk, or foreign. The rules, per target mode (-M):
#   every mode:   no foreign sector anywhere; sectors never written are old; A is new
#                 (it was acknowledged before a FLUSH that succeeded)
#   sync, direct: B and C's acknowledged chunks are new (O_SYNC: on stable storage when
#                 acknowledged; O_DIRECT: handed to a disk without a volatile cache, and in
#                 a file on such a disk O_DSYNC too, on btrfs O_DSYNC alone: the extent
#                 that makes it reachable is committed (btrfs's copy-on-write, a hole or
#                 unwritten extent: session 33))
#   buffered:     B and C's acknowledged chunks may be old or new, and at least one of
#                 their sectors must be old: the guest's dirty pages were really lost (else
#                 the test could not tell a FLUSH that syncs from one that does not)
#   in flight:    old or new, per sector
# -N (NBD, multi-connection): the writes go through the initiator's NBD server (`--nbd`)
# instead of its device file, each phase by libnbd's nbdcopy over 4 connections with up
# to 16 requests each, from a sparse copy of new.bin holding only that phase's chunks
# (`--destination-is-zero`: only the chunks are written; no `--flush`: nbdcopy sends no
# FLUSH), and A's FLUSH by `qemu-io -c flush` on a connection of its own: the NBD
# protocol's NBD_FLAG_CAN_MULTI_CONN, which the server advertises, promises that a FLUSH
# on one connection makes every write completed on any connection durable. Phase C is not
# run (nbdcopy says nothing of which of its writes were answered before a kill): B is the
# acknowledged, unflushed set.
# -r (report): print the same classification and exit 0 whatever it found (for peers that
# are not held to these rules, e.g. vblade, whose FLUSH does not sync: docs/PROTOCOL.md).
#
# -F FS (a file system made through the initiator, session 34): the export is raw (a sparse
# data disk of 64 MiB for ext4, 256 for btrfs, 320 for XFS), and the host makes FS on a
# loop device over the device file ROOT/e1.1 (mkfs.FS, no discard), mounts it with default
# options (ext4: noinit_itable, so that no background zeroing writes through the link) and
# writes a stream of files d/fN, each a piece of new.bin of a length of its own (up to 64
# KiB, most not a whole number of blocks), by `dd conv=fsync` and then an fsync of the
# directory (`sync d`): a file counts as acknowledged when both returned 0. A: 16 files one
# after another; C: a writer in the background; once 4 of its files are acknowledged the
# host kills (-K) the guest (qemu SIGKILLed: the target's machine loses power; default)
# or the initiator (SIGKILL, the file system mounted and written to). The kill must reach
# the writer as an error within a deadline (not a hang), the file system must unmount
# (lazily if it must) and the loop device detach. Then, for -K guest, the guest boots
# again on the same image and the same initiator finds the device again (`discover`); for
# -K initiator, a new initiator starts on the same ROOT. Through it, a loop device again:
# the file system mounts (replaying its journal or log), every acknowledged file has its
# exact bytes, no file the writer never started exists, btrfs scrub (read-only) finds no
# checksum error, and after the unmount the checker (`e2fsck -fn`, `xfs_repair -n`,
# `btrfs check --readonly`) finds it clean. In every target mode: an fsync that returned 0
# must have sent the target a FLUSH it answered after the data was durable. -B mounts with
# `nobarrier` (ext4, btrfs: no FLUSH is sent at all), a control that must FAIL in buffered
# mode with -K guest: it shows the rig can tell a file system whose FLUSH does not reach
# the target.
# -W KINDS (with -F, session 35): instead of the stream of new files, applications' write
# patterns, each KIND in a directory of its own and all at once, by tests/interop/plapp.py
# (see its header): replace (write a temporary file, fsync it, rename it over the old name,
# fsync the directory), inplace (overwrites of a written file, each followed by fdatasync),
# prealloc (the same into fallocate's unwritten extents), odirect (O_DIRECT|O_DSYNC writes,
# no fsync), sqlite-wal and sqlite-delete (sqlite3, synchronous=FULL and, for the rollback
# journal, EXTRA: a transaction a row); `all` for the six; sqlite-delete-full (DELETE with
# FULL, which may lose the last COMMIT: plapp.py) only by name. Each logs every step's
# start and acknowledgement to the host's disk
# before the next; the kill comes once every KIND has 10 acknowledged; after it `plapp.py
# check` holds every acknowledgement as a promise (and `sqlite3 DB 'PRAGMA
# integrity_check'` must say ok; each log line has its CLOCK_REALTIME, RUN/killed-at the
# kill's K and reap R, RUN/kernel-after-kill.log the host kernel's lines about the loop
# device since: an acknowledgement after R over the loop device's EIO is reported as the
# file system's, KERNEL, not counted; plapp.py's header), then the file system's checker as above. -X (with -W):
# the writers leave out every fsync, fdatasync and O_DSYNC (sqlite: synchronous=OFF) and
# still log acknowledgements (plapp.py's PLAPP_NOSYNC=1): the control that must FAIL for
# every KIND (the check can tell). -D: the loop
# device with --direct-io=on (no page cache of its own over the device file: its writes
# reach the initiator as O_DIRECT writes, its flushes as fsync). -P: a partition table
# (GPT, one partition from 1 MiB to the end) written through the device file, the
# initiator asked to re-read it (`revalidate`), and the file system on the partition file
# ROOT/e1.1p1 instead of the whole device.
# -Z MS (with -F): the file system made and 8 files written and fsynced in it, then mkfs
# again over it, and the guest killed MS milliseconds after that mkfs started. After the
# reboot the file system must be refused by mount, or mount with every file readable (the
# old files, if the old one is back, whole), btrfs scrub clean and the checker content:
# never "mounts with garbage". If mkfs had ended with 0 before the kill, it must mount,
# new and clean.
#
# Usage: power-loss.sh -b TARGET_BIN [-t aoe|vblade] [-e raw|ext4|xfs|btrfs] [-M buffered|sync|direct]
#                      [-S sparse|prealloc] [-L 512|4096] [-m MTU] [-c CACHE_DIR] [-T SECONDS]
#                      [-N] [-r] [-k] [-F ext4|xfs|btrfs [-K guest|initiator] [-B] [-W KINDS [-X] | -Z MS] [-D] [-P]] [-U]
#                      [-G SECS]
#   -b BIN    the target binary to copy into the guest (`aoe`, or vblade with -t vblade)
#   -t        how to start it: `aoe serve [-s|-d] 1 1 eth0 FILE` or `vblade [-s|-d] ...`
#   -e        the export: raw (default), ext4, xfs or btrfs
#   -M        buffered (default), sync (-s), direct (-d)
#   -S HOW    a file system export's data.bin made by the guest as a hole (sparse) or
#             preallocated (prealloc): see above
#   -L BYTES  the data disk's logical (and physical) sector size: 512 (default) or 4096.
#             With 4096 an AoE frame's 8704 bytes (MTU 9000) end mid-block, so -d takes
#             the target's read-patch-write path for partial blocks; ext4 gets 4 KiB blocks
#   -m MTU    of every link (default 9000: fewer frames for the emulated guest)
#   -I BIN    the `aoe` binary for the host's initiator (default: -b's, or `aoe` on PATH)
#   -c DIR    cache for the kernel package (default ${AOE_CACHE:-/var/tmp/aoe-test-cache})
#   -T SEC    hard overall timeout (default 480); every wait has its own deadline too
#   -N        write through the NBD server, several connections (see above)
#   -F FS     a file system made on the host through the initiator (see above); -e raw only
#   -K WHAT   with -F: kill the guest (default) or the initiator mid-stream
#   -B        with -F: mount with nobarrier (the control that must fail, see above)
#   -W KINDS  with -F: applications' write patterns (comma-separated, or all; see above)
#   -X        with -W: the writers without their syncs (the control that must fail)
#   -Z MS     with -F: the guest killed MS milliseconds into a second mkfs (see above)
#   -G SECS   the guest's init starts the target SECS seconds late, at each boot: a target
#             slow to start (a loaded TCG guest took 5 s), which the rig must wait for
#   -D        with -F: losetup --direct-io=on
#   -P        with -F: the file system on the partition file e1.1p1 (see above)
#   -U        the initiator takes its files' requests through FUSE over io_uring
#             (`--fuse-uring`: the caller sets /sys/module/fuse/parameters/enable_uring)
#   -r        report only (see above)
#   -k        keep the run directory (images, console, logs)
# AOE_LOG in the environment: the host initiator's log filter (default info).
#
# Run time: 8-20 s on an idle two-core machine (the guest boots in 6-8 s; the writes take
# about a second), about 30 s with two runs at a time at load average 8. -F: 35-80 s (with
# -K guest the guest boots twice).
#
# Needs root, iproute2, qemu-system-x86_64, busybox (static), cpio, kmod, e2fsprogs,
# util-linux (losetup, mount), xfsprogs and btrfs-progs (for -e xfs|btrfs), perl, python3
# and sqlite3 (for -W), fdisk (sfdisk, for -P), apt-get (the first run downloads the kernel package;
# later runs use the cache). Exit status: 0 PASS, 1 FAIL (the last line says why), 2 usage.
set -uo pipefail

BIN="" TKIND=aoe EXPORT=raw MODE=buffered MTU=9000 INIT_BIN="" LBS=512 SPARSE=""
CACHE=${AOE_CACHE:-/var/tmp/aoe-test-cache}
TOTAL=480 REPORT=0 KEEP=0 NBD=0 HOSTFS="" KILL=guest NOBARRIER=0 URING=0 APPS="" LODIO=0 PART=0 NOSYNC=0 MKFSKILL="" TDELAY=0
usage() { sed -n '2,/^# later runs use the cache/p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while getopts "b:t:e:M:S:L:m:I:c:T:F:K:W:Z:G:BDPXUNrkh" o; do
    case $o in
        b) BIN=$OPTARG ;; t) TKIND=$OPTARG ;; e) EXPORT=$OPTARG ;; M) MODE=$OPTARG ;; L) LBS=$OPTARG ;;
        S) SPARSE=$OPTARG ;;
        m) MTU=$OPTARG ;; I) INIT_BIN=$OPTARG ;; c) CACHE=$OPTARG ;; T) TOTAL=$OPTARG ;;
        N) NBD=1 ;; r) REPORT=1 ;; k) KEEP=1 ;;
        F) HOSTFS=$OPTARG ;; K) KILL=$OPTARG ;; B) NOBARRIER=1 ;; U) URING=1 ;;
        W) APPS=$OPTARG ;; D) LODIO=1 ;; P) PART=1 ;; X) NOSYNC=1 ;; Z) MKFSKILL=$OPTARG ;; G) TDELAY=$OPTARG ;;
        *) usage ;;
    esac
done
bad() { echo "power-loss.sh: $*" >&2; exit 2; }
[ -n "$BIN" ] || bad "-b TARGET_BIN is required"
[ -x "$BIN" ] || bad "-b $BIN is not an executable"
case $TKIND in aoe|vblade) ;; *) bad "-t wants aoe or vblade, not $TKIND" ;; esac
case $EXPORT in raw|ext4|xfs|btrfs) ;; *) bad "-e wants raw, ext4, xfs or btrfs, not $EXPORT" ;; esac
case $MODE in buffered) MFLAG="" ;; sync) MFLAG=-s ;; direct) MFLAG=-d ;;
    *) bad "-M wants buffered, sync or direct, not $MODE" ;; esac
case $LBS in 512|4096) ;; *) bad "-L wants 512 or 4096, not $LBS" ;; esac
case $SPARSE in "") ;; sparse|prealloc) [ "$EXPORT" != raw ] || bad "-S needs a file system export (-e)" ;;
    *) bad "-S wants sparse or prealloc, not $SPARSE" ;; esac
case $HOSTFS in "") [ "$KILL" = guest ] && [ "$NOBARRIER$LODIO$PART" = 000 ] && [ -z "$APPS" ] ||
        bad "-K, -B, -W, -D and -P need -F" ;;
    ext4|xfs|btrfs) [ "$EXPORT" = raw ] && [ "$NBD" = 0 ] || bad "-F needs -e raw and no -N" ;;
    *) bad "-F wants ext4, xfs or btrfs, not $HOSTFS" ;; esac
case $KILL in guest|initiator) ;; *) bad "-K wants guest or initiator, not $KILL" ;; esac
[ "$NOBARRIER" = 0 ] || [ "$HOSTFS" != xfs ] || bad "-B: XFS has no nobarrier option since Linux 4.19"
APPKINDS="replace inplace prealloc odirect sqlite-wal sqlite-delete"
[ "$APPS" != all ] || APPS=${APPKINDS// /,}
for k in ${APPS//,/ }; do [[ " $APPKINDS sqlite-delete-full " == *" $k "* ]] || bad "-W: unknown kind $k (one of $APPKINDS sqlite-delete-full, or all)"; done
APPS=${APPS//,/ }
[ "$NOSYNC" = 0 ] || [ -n "$APPS" ] || bad "-X needs -W"
[ -z "$MKFSKILL" ] || { [[ $MKFSKILL =~ ^[0-9]+$ ]] && [ -n "$HOSTFS" ] && [ "$KILL" = guest ] && [ -z "$APPS" ]; } ||
    bad "-Z wants milliseconds, with -F and -K guest, without -W"
for n in "$MTU" "$TOTAL" "$TDELAY"; do [[ $n =~ ^[0-9]+$ ]] || bad "not a number: $n"; done
if [ -z "$INIT_BIN" ]; then
    if [ "$TKIND" = aoe ]; then INIT_BIN=$BIN; else INIT_BIN=$(command -v aoe || true); fi
fi
[ -n "$INIT_BIN" ] && [ -x "$INIT_BIN" ] || bad "no aoe binary for the initiator: give -I BIN"

# Hard overall timeout: the body runs under timeout(1), whose SIGTERM runs the body's trap
# (qemu, initiator, loop device, namespace); SIGKILL 30 s later if that hangs.
if [ -z "${_PL_BODY:-}" ]; then
    _PL_BODY=1 timeout -k 30 "$TOTAL" bash "$0" "$@"
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "FAIL: overall timeout of ${TOTAL}s hit"; exit 1; fi
    exit $rc
fi

T0=$(date +%s)
say() { echo "### [$(( $(date +%s) - T0 ))s] $*"; }
fail() { echo "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || fail "must run as root (network namespaces, tap and loop devices)"
for t in ip nsenter setsid timeout file qemu-system-x86_64 cpio gzip modprobe depmod apt-get dpkg \
         flock mkfs.ext4 e2fsck losetup mount umount mountpoint perl shuf ldd strip dd sync; do
    command -v "$t" >/dev/null || fail "missing tool $t (scripts/install-deps.sh installs it)"
done
case $EXPORT${HOSTFS:+-$HOSTFS} in
    xfs|raw-xfs) FSTOOLS="mkfs.xfs xfs_repair" ;; btrfs|raw-btrfs) FSTOOLS="mkfs.btrfs btrfs" ;; *) FSTOOLS="" ;;
esac
for t in $FSTOOLS; do
    command -v "$t" >/dev/null || fail "missing tool $t (scripts/install-deps.sh installs it)"
done
for t in $([ -n "$APPS" ] && echo python3 sqlite3) $([ "$PART" = 1 ] && echo sfdisk); do
    command -v "$t" >/dev/null || fail "missing tool $t (scripts/install-deps.sh installs it)"
done
[ -z "$APPS" ] || python3 -c 'import sqlite3' 2>/dev/null || fail "python3 has no sqlite3 module (Debian's python3 has it)"
if [ "$NBD" = 1 ]; then
    for t in nbdcopy qemu-io truncate; do
        command -v "$t" >/dev/null || fail "missing tool $t (scripts/install-deps.sh installs it)"
    done
fi
BUSYBOX=$(command -v busybox || true)
[ -n "$BUSYBOX" ] && file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' \
    || fail "need a statically linked busybox (Debian package busybox-static)"
[ -e /dev/net/tun ] || fail "no /dev/net/tun (tap devices)"

NS=aoepl-$$
RUN=$(mktemp -d "${TMPDIR:-/tmp}/aoe-power-loss.XXXXXX") || fail "mktemp"
CONSOLE=$RUN/console.log ROOT=$RUN/root
QEMU_PID="" INIT_PID="" WRITER_PID="" LOOP="" MNT="" HIST_PID=""
SHELF=1 SLOT=1
DEV=$ROOT/e$SHELF.$SLOT

# lib.sh: stop PID (TERM, then KILL), sweep_netns PREFIX and drop_netns NS.
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
# Namespaces of earlier runs that were SIGKILLed before their cleanup ran.
sweep_netns aoepl
# unmount_root: the initiator's FUSE mount, if it is still there. Not `mountpoint`: on the
# mount of an initiator that was SIGKILLed its stat fails (ENOTCONN), and the mount was
# left behind (session 34, after a -F run whose initiator stop ran into the 5 s SIGKILL).
unmount_root() {
    grep -qs " $ROOT fuse" /proc/mounts && umount -l "$ROOT"
    return 0
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    [ -n "$WRITER_PID" ] && kill -KILL -- "-$WRITER_PID" 2>/dev/null
    [ -n "$QEMU_PID" ] && kill -KILL -- "$QEMU_PID" 2>/dev/null
    [ -n "$HIST_PID" ] && kill "$HIST_PID" 2>/dev/null
    # The host's file system (-F) and its loop device before the initiator under them.
    [ -n "$MNT" ] && mountpoint -q "$MNT" 2>/dev/null && { timeout 60 umount "$MNT" || umount -l "$MNT"; }
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
    [ -n "$INIT_PID" ] && stop "$INIT_PID"
    unmount_root
    drop_netns "$NS"
    if [ "$KEEP" = 1 ]; then echo "### run directory kept: $RUN"; else rm -rf "$RUN"; fi
    exit $rc
}
diagnose() {
    echo "### diagnostics at $(( $(date +%s) - T0 ))s"
    if [ -s "$CONSOLE" ]; then
        echo "### guest console (tail):"; tr -d '\r' <"$CONSOLE" | tail -n 25 | sed 's/^/    /'
    else
        echo "### guest console: empty or not started"
    fi
    if [ -f "$RUN/initiator.log" ]; then
        echo "### initiator log (tail):"; tail -n 15 "$RUN/initiator.log" | sed 's/^/    /'
    fi
    [ -f "$ROOT/sysfs/block/etherd!e$SHELF.$SLOT/state" ] &&
        echo "### device state: $(timeout 5 cat "$ROOT/sysfs/block/etherd!e$SHELF.$SLOT/state")"
    return 0
}
trap cleanup EXIT
trap 'echo "FAIL: interrupted by a signal ($(( $(date +%s) - T0 ))s)"; diagnose; exit 1' INT TERM HUP
# die MESSAGE: fail with the diagnostics.
die() { diagnose; fail "$*"; }

# ---------------------------------------------------------------- kernel (cached)
# shellcheck source=guest-kernel.sh
. "$(dirname "$0")/guest-kernel.sh"
guest_kernel "$CACHE"

# ---------------------------------------------------------------- data
CH=65536                   # bytes per chunk, one dd each
NCH=128                    # chunks in the region: 8 MiB
NA=16 NB=16 NC_ACK=4       # phase A and B chunks; C's acknowledged chunks before the kill
REGION=$((CH * NCH))
OLD=$RUN/old.bin NEW=$RUN/new.bin IMG=$RUN/data.img
if [ -n "$HOSTFS" ]; then
    # -F: the export is the host's file system, new.bin the files' bytes (chunk N, file fN).
    case $HOSTFS in ext4) REGION=$((64 << 20)) ;; btrfs) REGION=$((256 << 20)) ;; xfs) REGION=$((320 << 20)) ;; esac
    head -c $((CH * NCH)) /dev/urandom >"$NEW" && truncate -s $REGION "$IMG" || fail "cannot write the patterns"
    GFILE=/dev/vda
elif ! { head -c $REGION "$([ -n "$SPARSE" ] && echo /dev/zero || echo /dev/urandom)" >"$OLD" &&
    head -c $REGION /dev/urandom >"$NEW"; }; then
    fail "cannot write the patterns"
elif [ "$EXPORT" = raw ]; then
    cp "$OLD" "$IMG" || fail "cannot write $IMG"
    GFILE=/dev/vda
else
    mkdir -p "$RUN/fs" && cp "$OLD" "$RUN/fs/data.bin" || fail "cannot write the $EXPORT seed"
    case $EXPORT in
    ext4) mkfs.ext4 -q -F -L pldata $([ "$LBS" = 4096 ] && echo -b 4096) -d "$RUN/fs" "$IMG" 32M ;;
    xfs) # A protofile (mkfs.xfs(8) -p): the root directory with data.bin, copied in.
        printf '%s\n' pldata "0 0" "d--755 0 0" "data.bin ---644 0 0 $RUN/fs/data.bin" '$' '$' >"$RUN/proto" &&
            truncate -s 320M "$IMG" &&
            mkfs.xfs -q -f -L pldata -s size="$LBS" -p "$RUN/proto" "$IMG" ;;
    btrfs) truncate -s 256M "$IMG" &&
        mkfs.btrfs -q -f -L pldata --rootdir "$RUN/fs" "$IMG" ;;
    esac >"$RUN/mkfs.log" 2>&1 || { cat "$RUN/mkfs.log"; fail "mkfs.$EXPORT of the data disk failed"; }
    rm -rf "$RUN/fs"
    GFILE=/mnt/data.bin
fi
# The order the chunks are written in: A, then B, then C's.
shuf -i 0-$((NCH - 1)) >"$RUN/order" || fail "shuf"

# ---------------------------------------------------------------- the guest's tools disk
# The target binary (debug info stripped) and its shared libraries, as ldd lists them.
TD=$RUN/tools
mkdir -p "$TD/lib" || fail "mkdir $TD"
strip -o "$TD/target" "$BIN" 2>/dev/null || cp "$BIN" "$TD/target" || fail "cannot copy $BIN"
LIBS=$(ldd "$BIN" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
[ -n "$LIBS" ] || fail "ldd $BIN lists no libraries (a static binary needs no tools disk: not supported)"
for l in $LIBS; do cp -L "$l" "$TD/lib/" || fail "cannot copy $l"; done
mkfs.ext4 -q -F -L pltools -d "$TD" "$RUN/tools.img" $(( $(du -sm "$TD" | cut -f1) + 16 ))M \
    >"$RUN/mkfs-tools.log" 2>&1 || { cat "$RUN/mkfs-tools.log"; fail "mkfs.ext4 of the tools disk failed"; }
say "tools disk: $(basename "$BIN") and $(echo "$LIBS" | wc -w) libraries, $(du -sm "$TD" | cut -f1) MiB"
rm -rf "$TD"

# ---------------------------------------------------------------- initramfs
IR=$RUN/initramfs
guest_initramfs "$IR" mnt tools lib64
guest_modules "$IR/lib/modules" virtio_pci virtio_net virtio_blk ext4 $([ "$EXPORT" = xfs ] || [ "$EXPORT" = btrfs ] && echo "$EXPORT")
say "kernel $(basename "$KDIR") ($KVER), modules: $(tr '\n' ' ' <"$IR/lib/modules/order")"
if [ "$TKIND" = aoe ]; then
    TCMD="/tools/target serve $MFLAG $SHELF $SLOT eth0 $GFILE"
else
    TCMD="/tools/target $MFLAG $SHELF $SLOT eth0 $GFILE"
fi
cat >"$IR/etc/pl.conf" <<EOF
MTU=$MTU
EXPORT=$EXPORT
SPARSE=$SPARSE
REGION=$REGION
TCMD="$TCMD"
TDELAY=$TDELAY
EOF
cat >"$IR/init" <<'EOF'
#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
. /etc/pl.conf
out() { echo "PL:$*"; }
hang() { while :; do sleep 3600; done; }
die() { out "GUEST_FAIL $*"; hang; }
out "BOOTED"
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m || die "insmod $m"; done
# Dirty pages stay in memory until a sync asks for them (see the script's header).
echo 0 >/proc/sys/vm/dirty_writeback_centisecs
echo 360000 >/proc/sys/vm/dirty_expire_centisecs
echo 50 >/proc/sys/vm/dirty_background_ratio
echo 90 >/proc/sys/vm/dirty_ratio
i=0; while [ ! -b /dev/vdb ] || [ ! -b /dev/vda ] || [ ! -e /sys/class/net/eth0 ]; do
    i=$((i+1)); [ $i -gt 300 ] && die "no vda, vdb or eth0"; sleep 0.1
done
mount -t ext4 -o ro /dev/vdb /tools || die "mount the tools disk"
ln -s /tools/lib/ld-linux-x86-64.so.2 /lib64/ld-linux-x86-64.so.2
export LD_LIBRARY_PATH=/tools/lib
if [ "$EXPORT" != raw ]; then mount -t "$EXPORT" /dev/vda /mnt || die "mount the data disk ($EXPORT)"; fi
# -S: data.bin anew, a hole or unwritten extents, on the disk before the target starts.
case $SPARSE in
    sparse) rm /mnt/data.bin && truncate -s "$REGION" /mnt/data.bin && sync || die "sparse data.bin" ;;
    prealloc) rm /mnt/data.bin && fallocate -l "$REGION" /mnt/data.bin && sync || die "preallocated data.bin" ;;
esac
ip link set eth0 mtu "$MTU" || die "MTU $MTU on eth0"
ip link set eth0 up || die "eth0 up"
out "WRITE_CACHE $(cat /sys/block/vda/queue/write_cache)"
out "SECTOR $(cat /sys/block/vda/queue/logical_block_size)"
out "TARGET $TCMD"
{ [ "$TDELAY" -gt 0 ] && sleep "$TDELAY"; $TCMD; } 2>&1 | sed 's/^/PL:TGT /' &
out SERVING
# The guest's dirty page count, when it changes: the host logs the last one before the kill.
last=""
while :; do
    d=$(sed -n 's/^Dirty: *\([0-9]*\).*/\1/p' /proc/meminfo)
    [ "$d" != "$last" ] && out "DIRTY_KB $d" && last=$d
    sleep 0.2
done
EOF
chmod +x "$IR/init"
INITRD=$RUN/initramfs.cpio.gz
guest_initramfs_pack "$IR" "$INITRD"

# ---------------------------------------------------------------- network
ip netns add "$NS" || fail "ip netns add $NS"
nsx() { nsenter --net="/run/netns/$NS" -- "$@"; }
nsx sh -c 'echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6'
ip -n "$NS" link set lo up
ip -n "$NS" link add plbr type bridge stp_state 0 forward_delay 0 || fail "bridge"
ip -n "$NS" tuntap add dev pltap mode tap || fail "tap"
ip -n "$NS" link add plport type veth peer name plini || fail "veth"
for l in pltap plport plini plbr; do ip -n "$NS" link set "$l" mtu "$MTU" || fail "MTU $MTU on $l"; done
ip -n "$NS" link set pltap master plbr && ip -n "$NS" link set plport master plbr || fail "bridge ports"
for l in plbr pltap plport plini; do ip -n "$NS" link set "$l" up || fail "$l up"; done

# ---------------------------------------------------------------- guest
# boot_guest: qemu on the data disk image as it is, its console in $CONSOLE.
# no_timer_check: under TCG at load the guest's timer interrupt can miss the kernel's
# boot-time check, which then panics ("IO-APIC + timer doesn't work!", seen at load 12 in
# session 34); the check is for broken hardware, not an emulator that is slow.
boot_guest() {
say "booting the guest (qemu TCG, MTU $MTU): $TKIND, export $EXPORT${SPARSE:+ ($SPARSE)}, mode $MODE, $LBS-byte sectors"
# nsenter itself, not the nsx function: `nsx ... &` forks a subshell whose pid $! would be,
# and a SIGKILL to it left qemu running (session 34: every earlier "power loss" read the
# image beside a live guest). nsenter and setsid exec without forking (setsid: not a group
# leader), so $! is qemu's pid, as in kernel-initiator.sh.
nsenter --net="/run/netns/$NS" -- setsid qemu-system-x86_64 -nographic -no-reboot -accel tcg -cpu max -smp 1 -m 256 \
    -kernel "$KDIR/vmlinuz" -initrd "$INITRD" \
    -append "console=ttyS0 quiet loglevel=4 panic=-1 rdinit=/init no_timer_check" \
    -drive if=none,id=d0,file="$IMG",format=raw \
    -device virtio-blk-pci,drive=d0,write-cache=off,logical_block_size=$LBS,physical_block_size=$LBS,romfile= \
    -drive if=none,id=d1,file="$RUN/tools.img",format=raw,readonly=on \
    -device virtio-blk-pci,drive=d1,romfile= \
    -netdev tap,id=n0,ifname=pltap,script=no,downscript=no \
    -device virtio-net-pci,netdev=n0,mac=52:54:00:ae:0e:02,romfile= \
    </dev/null >"$CONSOLE" 2>&1 &
QEMU_PID=$!
QEMU_T0=$(date +%s)
}
# kill_guest: the power loss. SIGKILL to qemu, then no qemu may be left in the namespace.
kill_guest() {
    { kill -KILL "$QEMU_PID"; wait "$QEMU_PID"; } 2>/dev/null
    QEMU_PID=""
    local p
    for p in $(ip netns pids "$NS" 2>/dev/null); do
        [ "$(cat "/proc/$p/comm" 2>/dev/null)" = qemu-system-x86 ] && die "qemu (pid $p) survived the SIGKILL meant to cut the guest's power"
    done
    return 0
}
boot_guest
# wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds; fails naming WHAT after SECONDS
# or as soon as qemu or the guest's init has failed.
wait_for() {
    local budget=$1 what=$2 t
    shift 2
    t=$(( $(date +%s) + budget ))
    until "$@"; do
        grep -q 'PL:GUEST_FAIL' "$CONSOLE" && die "guest: $(tr -d '\r' <"$CONSOLE" | sed -n 's/^.*PL:GUEST_FAIL //p' | head -1)"
        kill -0 "$QEMU_PID" 2>/dev/null || die "qemu exited while waiting for $what"
        [ "$(date +%s)" -lt "$t" ] || die "$what: not within ${budget}s"
        sleep 0.2
    done
}
# Boot: 3-8 s here unloaded, 23 s at worst seen with four guests on two cores.
# PL:SERVING says the target was started, not that it answers: on a loaded host `aoe serve`
# took 4 s more to start in the guest, then probed 1 s for duplicate addresses, as vblade
# may take its time. So the guest serves once the target answers a Query Config and an
# IDENTIFY (`aoe ping`, raw frames on the initiator's link). Session 35 (docs/TEST-AUDIT.md,
# row 8): after a -Z reboot the initiator, which had had nothing in flight at the power loss,
# still had the device up, the rig mounted at once, the mount's read waited for a target
# not yet answering, and at --deadsecs 5 the device went down and the read failed with EIO
# ("unable to read superblock"): the initiator as told, the rig too early.
target_answers() { nsx "$INIT_BIN" ping -s 1 "$SHELF" "$SLOT" plini >/dev/null 2>&1; }
guest_serving() {
wait_for 180 "the guest's init" grep -q 'PL:BOOTED' "$CONSOLE"
wait_for 120 "the guest's target" grep -q 'PL:SERVING' "$CONSOLE"
wait_for 120 "the guest's target answering AoE (aoe ping $SHELF $SLOT plini)" target_answers
}
guest_serving
say "guest serving $(( $(date +%s) - QEMU_T0 ))s after qemu's start; disk write cache: $(tr -d '\r' <"$CONSOLE" | sed -n 's/^.*PL:WRITE_CACHE //p'), logical sector $(tr -d '\r' <"$CONSOLE" | sed -n 's/^.*PL:SECTOR //p') bytes"

# ---------------------------------------------------------------- initiator
mkdir -p "$ROOT"
# --deadsecs 5: once the guest is gone, the writer's last request fails within seconds.
SOCK=$RUN/nbd.sock
start_initiator() {
# nsenter, not nsx: $! must be the initiator's pid (see boot_guest).
nsenter --net="/run/netns/$NS" -- env AOE_LOG="${AOE_LOG:-info}" "$INIT_BIN" initiator --root "$ROOT" --iflist plini --deadsecs 5 \
    $([ "$NBD" = 1 ] && echo --nbd "$SOCK") $([ "$URING" = 1 ] && echo --fuse-uring) >>"$RUN/initiator.log" 2>&1 </dev/null &
INIT_PID=$!
}
start_initiator
up() { [ -e "$DEV" ] && [ "$(cat "$ROOT/sysfs/block/etherd!e$SHELF.$SLOT/state" 2>/dev/null)" = up ]; }
wait_for 60 "the initiator's device $DEV up" up
[ "$(stat -c %s "$DEV")" = "$REGION" ] || die "$DEV has $(stat -c %s "$DEV") bytes, not $REGION"
say "device $DEV up (payload $(cat "$ROOT/sysfs/block/etherd!e$SHELF.$SLOT/payload") bytes per frame)"

# ---------------------------------------------------------------- -F: a file system through the initiator
if [ -n "$HOSTFS" ]; then
    MNT=$RUN/mnt
    mkdir -p "$MNT" || die "mkdir $MNT"
    case $HOSTFS in
        ext4) FSCK_CMD="e2fsck -fn" MOPT=noinit_itable ;;
        xfs) FSCK_CMD="xfs_repair -n" MOPT="" ;;
        btrfs) FSCK_CMD="btrfs check --readonly" MOPT="" ;;
    esac
    [ "$NOBARRIER" = 1 ] && MOPT=${MOPT:+$MOPT,}nobarrier
    # -P: the file system on the first partition's file; -D: the loop device's direct I/O.
    FSDEV=$DEV LOFLAGS=""
    [ "$LODIO" = 1 ] && LOFLAGS=--direct-io=on
    fsdev_there() { [ -e "$FSDEV" ]; }
    # guest_back: after a kill of the guest, boot it again on the same disk image, wait
    # until its target answers, and have the same initiator, which gave the device up,
    # find it again (`discover` once a second) and its partition file with -P.
    guest_back() {
        local t
        boot_guest
        guest_serving
        t=$(( $(date +%s) + 60 ))
        until up; do
            echo >"$ROOT/discover" 2>/dev/null
            [ "$(date +%s)" -lt "$t" ] || die "the initiator did not find $DEV again within 60 s of discover"
            sleep 1
        done
        if [ "$PART" = 1 ]; then wait_for 60 "the partition file $FSDEV again" fsdev_there; fi
    }
    if [ "$PART" = 1 ]; then
        FSDEV=${DEV}p1
        echo 'start=2048, type=linux' | timeout 60 sfdisk -q --label gpt "$DEV" >"$RUN/sfdisk.log" 2>&1 ||
            { cat "$RUN/sfdisk.log"; die "sfdisk on $DEV failed"; }
        echo "e$SHELF.$SLOT" >"$ROOT/revalidate" || die "revalidate e$SHELF.$SLOT"
        wait_for 60 "the partition file $FSDEV after revalidate" fsdev_there
        say "GPT written through $DEV, $FSDEV has $(stat -c %s "$FSDEV") bytes"
    fi
    # fs_mount: a loop device over the device (or partition) file, FS mounted on $MNT.
    fs_mount() {
        LOOP=$(losetup -f --show $LOFLAGS "$FSDEV") || die "losetup $LOFLAGS $FSDEV"
        timeout 120 mount -t "$HOSTFS" ${MOPT:+-o "$MOPT"} "$LOOP" "$MNT" ||
            die "$HOSTFS on $LOOP over $FSDEV does not mount${1:+ $1}"
    }
    LOOP=$(losetup -f --show $LOFLAGS "$FSDEV") || die "losetup $LOFLAGS $FSDEV"
    [ "$LODIO" = 1 ] && { [ "$(cat "/sys/block/${LOOP#/dev/}/loop/dio")" = 1 ] || die "$LOOP over $FSDEV: direct I/O refused (loop/dio is 0)"; }
    mkfs_host() {
        case $HOSTFS in
            ext4) mkfs.ext4 -q -F -L plhost -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 "$1" ;;
            xfs) mkfs.xfs -q -f -K -L plhost "$1" ;;
            btrfs) mkfs.btrfs -q -f -K -L plhost "$1" ;;
        esac
    }
    # fs_gone: after the umount, until the file system is really gone (its /sys/fs entry),
    # so that the checker may open the device exclusively. A process that entered a mount
    # namespace of its own (`unshare -m`, `ip netns exec`) while it was mounted holds a copy
    # of the mount (the -e path below; session 35: `btrfs check` once found the loop device
    # busy); the copies are named if it lives on.
    fs_gone() {
        local sb i
        case $HOSTFS in
            btrfs) sb=/sys/fs/btrfs/$(blkid -s UUID -o value "$LOOP") ;;
            *) sb=/sys/fs/$HOSTFS/${LOOP#/dev/} ;;
        esac
        for i in $(seq 200); do [ -e "$sb" ] || return 0; sleep 0.1; done
        die "$LOOP unmounted, but its file system lives on (mounted in the namespaces of pids $(grep -l " $LOOP " /proc/[0-9]*/mountinfo 2>/dev/null | cut -d/ -f3 | tr '\n' ' '))"
    }
    # state_history: the device's state (its sysfs file) at each change, with the time,
    # every 0.1 s until killed (-Z: from the kill to the mount after the reboot).
    state_history() {
        local last="" st
        while :; do
            st=$(cat "$ROOT/sysfs/block/etherd!e$SHELF.$SLOT/state" 2>&1)
            [ "$st" = "$last" ] || { echo "$(date -u +%T.%3N) $st"; last=$st; }
            sleep 0.1
        done
    }
    # mount_failed_report: -Z's mount after the reboot failed although mkfs had ended (row
    # 8 of docs/TEST-AUDIT.md's session 35). What tells its causes apart: whether $LOOP is
    # still bound to our device file (another rig's `losetup -d` of a name it no longer
    # owns would leave it unbound), the kernel's lines about $LOOP since we attached it
    # (loop devices are the machine's: a line of another rig's loop0 from before is not
    # ours), the superblock's sector read again through the loop device and straight from
    # the device file (buffered and O_DIRECT: an error from our initiator, or one kept by
    # the page cache), a second mount, the device's states since the kill, and the
    # initiator's log since the kill.
    mount_failed_report() {
        local lo=${LOOP#/dev/}
        kill "$HIST_PID" 2>/dev/null
        HIST_PID=""
        # The state now too: the sampler may not have seen the last change before the mount.
        echo "$(date -u +%T.%3N) $(cat "$ROOT/sysfs/block/etherd!e$SHELF.$SLOT/state" 2>&1) (at the report)" >>"$RUN/state-history"
        echo "### $LOOP attached at kernel time $KT_ATTACH; now: $(losetup -n -l -O NAME,BACK-FILE,AUTOCLEAR,DIO "$LOOP" 2>&1 | tr -s ' ')$([ -e "/sys/block/$lo/loop/backing_file" ] || echo " (NOT BOUND)"), $(cat "/sys/block/$lo/size" 2>/dev/null) sectors, held by $(ls "/sys/block/$lo/holders" 2>/dev/null | tr '\n' ' ')"
        echo "### the kernel's lines about $lo since then:"
        dmesg 2>/dev/null | awk -v t="$KT_ATTACH" -v lo="$lo" '{ s = $0; sub(/^\[ */, "", s); if (s + 0 >= t && $0 ~ (lo "([^0-9]|$)")) print "    " $0 }' | tail -n 20
        sb_read() {
            local e
            if e=$(timeout 60 dd if="$1" of=/dev/null bs=1024 skip=1 count=1 ${2:+"$2"} status=none 2>&1); then
                echo ok
            else
                echo "FAILS: $(echo "$e" | tr '\n' ' ')"
            fi
        }
        echo "### the superblock read again: through $LOOP (O_DIRECT) $(sb_read "$LOOP" iflag=direct); $FSDEV buffered $(sb_read "$FSDEV"); $FSDEV O_DIRECT $(sb_read "$FSDEV" iflag=direct)"
        if timeout 120 mount -t "$HOSTFS" "$LOOP" "$MNT" 2>"$RUN/mount-again.log"; then
            echo "### a second mount of $LOOP: it mounts (the first failure was transient)"
            timeout 60 umount "$MNT" || umount -l "$MNT"
        else
            echo "### a second mount of $LOOP fails too: $(tr '\n' ' ' <"$RUN/mount-again.log")"
        fi
        echo "### the device's state since the kill (UTC):"
        sed 's/^/    /' "$RUN/state-history"
        echo "### the initiator's log since the kill (AOE_LOG=${AOE_LOG:-info}; the last 80 lines):"
        tail -n "+$(( ILOG_AT + 1 ))" "$RUN/initiator.log" | tail -n 80 | cut -c1-300 | sed 's/^/    /'
    }
    mkfs_host "$LOOP" >"$RUN/mkfs-host.log" 2>&1 || { cat "$RUN/mkfs-host.log"; die "mkfs.$HOSTFS on $LOOP over $FSDEV failed"; }
    losetup -d "$LOOP" && LOOP=""
    fs_mount
    mkdir "$MNT/d" && timeout 60 sync -f "$MNT/d" || die "mkdir d and syncfs on the new $HOSTFS failed"
    say "$HOSTFS made and mounted through the initiator (loop${LOFLAGS:+ $LOFLAGS} over $FSDEV${MOPT:+, -o $MOPT}); writing ${APPS:-files}"
    # wfile N: file d/fN, bytes of chunk N of new.bin, flen N long; its data fsynced, then
    # the directory's entry: acknowledged when it returns 0.
    flen() { echo $(( CH - ($1 * 1237) % 6000 )); }
    wfile() {
        timeout 60 dd if="$NEW" of="$MNT/d/f$1" bs=$CH iflag=skip_bytes,count_bytes skip=$(( $1 * CH )) \
            count="$(flen "$1")" conv=fsync status=none && timeout 60 sync "$MNT/d"
    }
    LEDGER=$RUN/ledger CLOG=$RUN/clog
    : >"$LEDGER"
    : >"$CLOG"
    TW=$(date +%s)
    if [ -n "$MKFSKILL" ]; then
        # -Z: 8 files on the file system, then mkfs again over it, the guest killed MS in.
        for c in $(sed -n "1,8p" "$RUN/order"); do wfile "$c" || die "the old $HOSTFS: file f$c failed"; done
        timeout 120 umount "$MNT" || die "umount the old $HOSTFS"
        losetup -d "$LOOP"
        LOOP=$(losetup -f --show $LOFLAGS "$FSDEV") || die "losetup $LOFLAGS $FSDEV"
        say "the old $HOSTFS with 8 fsynced files; mkfs.$HOSTFS again on $LOOP, the guest killed ${MKFSKILL} ms in"
        mkfs_host "$LOOP" </dev/null >"$RUN/mkfs-again.log" 2>&1 &
        MKFS_PID=$!
        sleep "$(awk "BEGIN {print $MKFSKILL / 1000}")"
        MKFS_RAN=1
        kill -0 "$MKFS_PID" 2>/dev/null || MKFS_RAN=0
        kill_guest
        # For row 8 of docs/TEST-AUDIT.md's session 35 (a superblock read failing with EIO
        # after the reboot, twice, not explained): from here to the mount, the device's
        # state at each change, and where the initiator's log stood.
        ILOG_AT=$(wc -l <"$RUN/initiator.log")
        state_history >"$RUN/state-history" 2>&1 &
        HIST_PID=$!
        wait "$MKFS_PID"
        MRC=$?
        say "qemu SIGKILLed $([ "$MKFS_RAN" = 1 ] && echo "while mkfs ran" || echo "after mkfs had ended"); mkfs's status $MRC: $(tail -n 2 "$RUN/mkfs-again.log" | tr '\n' ' ' | cut -c1-160)"
        OLDLOOP=$LOOP
        losetup -d "$LOOP"
        # Held open (udev's probe of the device mkfs closed, reading through the dead
        # target until deadsecs), the kernel detaches it at its last close.
        say "$OLDLOOP: losetup -d; $([ -e "/sys/block/${OLDLOOP#/dev/}/loop/backing_file" ] && echo "held open, detached at its last close" || echo "detached")"
        LOOP=""
        CONSOLE=$RUN/console2.log
        guest_back
        KT_ATTACH=$(cut -d' ' -f1 /proc/uptime)
        LOOP=$(losetup -f --show $LOFLAGS "$FSDEV") || die "losetup $LOFLAGS $FSDEV"
        say "the guest is back, $DEV up; $LOOP over $FSDEV$([ "$LOOP" != "$OLDLOOP" ] && [ -e "/sys/block/${OLDLOOP#/dev/}/loop/backing_file" ] && echo " (the old $OLDLOOP still attached to $(cat "/sys/block/${OLDLOOP#/dev/}/loop/backing_file" 2>/dev/null))")"
        WHAT="mkfs.$HOSTFS through the initiator over an older one, the guest killed ${MKFSKILL} ms in (target $TKIND $MODE)"
        if ! timeout 120 mount -t "$HOSTFS" "$LOOP" "$MNT" 2>"$RUN/mount-after.log"; then
            if [ "$MKFS_RAN" = 0 ] && [ "$MRC" = 0 ]; then
                # die, not fail, with everything row 8 needs to be told apart: our
                # initiator answering a read with an error while up, the device file's page
                # cache, or the loop device not ours / no longer bound.
                mount_failed_report
                die "$WHAT: mkfs had ended with 0 before the kill, yet the file system does not mount on $LOOP: $(tr '\n' ' ' <"$RUN/mount-after.log")"
            fi
            kill "$HIST_PID" 2>/dev/null
            HIST_PID=""
            echo "PASS: $WHAT: the file system is refused ($(tr '\n' ' ' <"$RUN/mount-after.log" | cut -c1-160))"
            exit 0
        fi
        kill "$HIST_PID" 2>/dev/null
        HIST_PID=""
        # It mounts: every file must read, the old files be whole, and the checker be content.
        NFILES=$(find "$MNT" -xdev -type f | wc -l)
        READERR=0
        timeout 300 find "$MNT" -xdev -type f -exec cat {} + >/dev/null 2>"$RUN/read.log" || READERR=1
        OLDFS=absent BAD=""
        if [ -d "$MNT/d" ]; then
            OLDFS=present
            for c in $(sed -n "1,8p" "$RUN/order"); do
                dd if="$NEW" of="$RUN/expect" bs=$CH iflag=skip_bytes,count_bytes skip=$(( c * CH )) \
                    count="$(flen "$c")" status=none || fail "dd of the expected bytes"
                cmp -s "$RUN/expect" "$MNT/d/f$c" || BAD="$BAD f$c"
            done
        fi
        SCRUB=0
        if [ "$HOSTFS" = btrfs ]; then
            timeout 300 btrfs scrub start -B -r "$MNT" >"$RUN/scrub.log" 2>&1
            SCRUB=$?
        fi
        timeout 120 umount "$MNT" || die "umount $MNT after the check"
        fs_gone
        timeout 300 $FSCK_CMD "$LOOP" >"$RUN/fsck.log" 2>&1
        FSCK=$?
        say "mounts: $NFILES files, all read: $([ $READERR = 0 ] && echo yes || echo no); the old directory d: $OLDFS; $FSCK_CMD: exit status $FSCK$([ "$HOSTFS" = btrfs ] && echo ", btrfs scrub $SCRUB")"
        losetup -d "$LOOP" && LOOP=""
        [ "$MKFS_RAN" = 1 ] || [ "$MRC" != 0 ] || [ "$OLDFS" = absent ] || fail "$WHAT: mkfs had ended with 0 before the kill, yet the old files are back"
        [ -z "$BAD" ] || fail "$WHAT: it mounts the old file system with its fsynced files damaged:$BAD"
        [ "$READERR" = 0 ] || { cat "$RUN/read.log"; fail "$WHAT: it mounts, but files do not read"; }
        [ "$SCRUB" = 0 ] || { cat "$RUN/scrub.log"; fail "$WHAT: it mounts, but btrfs scrub finds errors"; }
        [ "$FSCK" = 0 ] || { tail -n 30 "$RUN/fsck.log"; fail "$WHAT: it mounts, but $FSCK_CMD finds it damaged (garbage mounted)"; }
        echo "PASS: $WHAT: it mounts and checks clean (the old file system: $OLDFS)"
        exit 0
    fi
    if [ -n "$APPS" ]; then
        # -W: the applications' patterns, each in MNT/d/KIND, its log RUN/clog.KIND.
        PLAPP=$(dirname "$0")/plapp.py
        timeout 120 python3 "$PLAPP" setup "$MNT/d" $APPS || die "plapp.py setup $APPS failed"
        say "-W: $APPS set up ($(( $(date +%s) - TW ))s)"
        for k in $APPS; do : >"$RUN/clog.$k"; done
        PLAPP_NOSYNC=$NOSYNC setsid python3 "$PLAPP" run "$MNT/d" "$RUN" $APPS </dev/null >"$RUN/writer.log" 2>&1 &
        WRITER_PID=$!
        NW_ACK=10
        apps_acked() {
            local k
            for k in $APPS; do [ "$(grep -c '^D' "$RUN/clog.$k")" -ge $NW_ACK ] || return 1; done
        }
        wait_for 180 "every -W kind with $NW_ACK steps acknowledged" apps_acked
        for k in $APPS; do cp "$RUN/clog.$k" "$RUN/clog.$k.before-kill"; done
        : >"$RUN/clog.before-kill"
    else
    for c in $(sed -n "1,${NA}p" "$RUN/order"); do
        wfile "$c" || die "phase A: file f$c failed"
        echo "A $c" >>"$LEDGER"
    done
    say "phase A: $NA files written and fsynced ($(( $(date +%s) - TW ))s)"
    export -f wfile flen
    export NEW MNT CH
    setsid bash -c 'for c in "$@"; do echo "S $c $(date +%s.%N)" >>'"$CLOG"'; wfile "$c" || { echo "writer: file f$c failed" >&2; exit 1; }; echo "D $c $(date +%s.%N)" >>'"$CLOG"'; done' \
        writer $(sed -n "$((NA + 1)),\$p" "$RUN/order") </dev/null >"$RUN/writer.log" 2>&1 &
    WRITER_PID=$!
    wait_for 120 "phase C: $NC_ACK files acknowledged" sh -c "[ \$(grep -c '^D' '$CLOG') -ge $NC_ACK ]"
    cp "$CLOG" "$RUN/clog.before-kill"
    fi
    ACKED=$( [ -n "$APPS" ] && for k in $APPS; do echo "$k $(grep -c '^D' "$RUN/clog.$k.before-kill")"; done | paste -sd, - ||
        echo "$(grep -c '^D' "$RUN/clog.before-kill") of phase C's files")
    TK=$(date +%s)
    # The kernel log's length at the kill: what the host's stack said after it (-W: whether
    # the loop device reported the dead target's EIO up to the file system).
    # (The printk clock is the monotonic one /proc/uptime shows, near enough: 1 s of slack.)
    KLOG0=$(cut -d' ' -f1 /proc/uptime)
    echo "K $(date +%s.%N)" >"$RUN/killed-at"
    if [ "$KILL" = guest ]; then
        DIRTY=$(tr -d '\r' <"$CONSOLE" | sed -n 's/^.*PL:DIRTY_KB //p' | tail -1)
        kill_guest
        # R: the killed process reaped (plapp.py check places each D line against K and R).
        echo "R $(date +%s.%N)" >>"$RUN/killed-at"
        say "qemu SIGKILLed with $ACKED acknowledged; the guest's last dirty count ${DIRTY:-?} kB"
    else
        { kill -KILL "$INIT_PID"; wait "$INIT_PID"; } 2>/dev/null
        echo "R $(date +%s.%N)" >>"$RUN/killed-at"
        INIT_PID=""
        say "the initiator SIGKILLed with $ACKED acknowledged"
    fi
    # The writer must learn of it (an error), not hang: --deadsecs 5 fails a dead target's
    # requests; a dead initiator's FUSE connection fails them at once.
    t=$(( $(date +%s) + 90 ))
    while kill -0 "$WRITER_PID" 2>/dev/null; do
        [ "$(date +%s)" -lt "$t" ] || die "the writer still runs 90 s after the kill (hung: $(ps -o stat=,wchan= -g "$WRITER_PID" | tr '\n' ' '))"
        sleep 0.2
    done
    wait "$WRITER_PID" 2>/dev/null
    WRC=$?
    WRITER_PID=""
    say "the writer ended $(( $(date +%s) - TK ))s after the kill, status $WRC: $(tr '\n' ' ' <"$RUN/writer.log" | cut -c1-200)"
    [ "$WRC" != 0 ] || die "the writer finished every file: the kill came too late to cut it off"
    # The host kernel's lines since the kill about our loop device and its file system.
    dmesg 2>/dev/null | awk -v t0="$KLOG0" '{ s = $0; sub(/^\[ */, "", s); split(s, a, "]"); if (a[1] + 1 >= t0) print }' |
        grep -F -e "${LOOP##*/}" >"$RUN/kernel-after-kill.log"
    # Not in the control (-X): without their syncs the writers' acknowledgements promise
    # nothing, and the control must count every one the loss took, late ones included.
    LOWER_EIO=0
    if [ "$NOSYNC" = 0 ] && grep -q "I/O error, dev ${LOOP##*/}," "$RUN/kernel-after-kill.log"; then
        LOWER_EIO=1
    fi
    timeout 60 umount "$MNT" 2>"$RUN/umount.log" ||
        { say "umount after the kill failed ($(tr '\n' ' ' <"$RUN/umount.log")); lazily"; umount -l "$MNT"; }
    losetup -d "$LOOP" 2>/dev/null
    LOOP=""
    if [ "$KILL" = guest ]; then
        # The target's machine comes back with the disk as the power loss left it; the
        # initiator, which gave the device up (down), is asked to find it again.
        CONSOLE=$RUN/console2.log
        guest_back
        say "the guest is back; the same initiator has $DEV up again"
    else
        # A new initiator on the same ROOT (it removes the dead one's FUSE mount).
        start_initiator
        wait_for 60 "the new initiator's device $DEV up" up
        [ "$PART" = 1 ] && wait_for 60 "the partition file $FSDEV again" fsdev_there
        say "a new initiator has $DEV up"
    fi
    fs_mount "after the kill"
    BAD="" NOK=0 STRAY="" APPBAD=0
    if [ -n "$APPS" ]; then
        # Every acknowledgement logged before the kill was reaped is a promise; one logged
        # after it, while the loop device failed writes with EIO, is the file system's own
        # (plapp.py's header: KERNEL, reported, not counted).
        for k in sqlite-wal sqlite-delete sqlite-delete-full; do
            [[ " $APPS " == *" $k "* ]] || continue
            IC=$(timeout 120 sqlite3 "$MNT/d/$k/db" 'PRAGMA integrity_check' 2>&1 | head -5 | tr '\n' ' ')
            say "sqlite3 $k/db 'PRAGMA integrity_check': $IC"
            [ "$IC" = "ok " ] || { echo "### VIOLATION: $k: sqlite3 integrity_check: $IC"; APPBAD=1; }
        done
        # PLAPP_LOWER_EIO: the loop device failed writes with EIO after the kill (the kernel
        # log says so): an acknowledgement logged after the kill was reaped then came from
        # the file system, over an error our stack reported (plapp.py's header).
        PLAPP_LOWER_EIO=$LOWER_EIO timeout 300 python3 "$PLAPP" check "$MNT/d" "$RUN" $APPS || APPBAD=1
        INFLIGHT=""
    else
    # Every acknowledged file: its exact bytes; no file the writer never started.
    for c in $(awk '{print $2}' "$LEDGER") $(awk '$1 == "D" {print $2}' "$RUN/clog.before-kill"); do
        dd if="$NEW" of="$RUN/expect" bs=$CH iflag=skip_bytes,count_bytes skip=$(( c * CH )) \
            count="$(flen "$c")" status=none || fail "dd of the expected bytes"
        if cmp -s "$RUN/expect" "$MNT/d/f$c"; then NOK=$((NOK + 1)); else
            BAD="$BAD f$c($( [ -e "$MNT/d/f$c" ] && echo "$(stat -c %s "$MNT/d/f$c") bytes, differs" || echo missing))"
        fi
    done
    STARTED=" $(awk '$1 == "S" {print $2}' "$CLOG" | tr '\n' ' ') $(awk '{print $2}' "$LEDGER" | tr '\n' ' ') "
    STRAY=""
    for f in "$MNT"/d/*; do
        [ -e "$f" ] || continue
        n=${f##*/f}
        [[ $STARTED == *" $n "* ]] || STRAY="$STRAY ${f##*/}"
    done
    INFLIGHT=$(awk '$1 == "S" {s = $2} END {print s}' "$CLOG")
    say "after the kill: $NOK acknowledged files intact; the one in flight (f$INFLIGHT): $( [ -e "$MNT/d/f$INFLIGHT" ] && echo "$(stat -c %s "$MNT/d/f$INFLIGHT") bytes" || echo absent)"
    fi
    SCRUB=0
    if [ "$HOSTFS" = btrfs ]; then
        timeout 300 btrfs scrub start -B -r "$MNT" >"$RUN/scrub.log" 2>&1
        SCRUB=$?
        say "btrfs scrub (read-only): exit status $SCRUB, $(grep -i 'error summary' "$RUN/scrub.log" | tr -s ' ')"
    fi
    timeout 120 umount "$MNT" || die "umount $MNT after the check"
    fs_gone
    timeout 300 $FSCK_CMD "$LOOP" >"$RUN/fsck.log" 2>&1
    FSCK=$?
    say "$FSCK_CMD $LOOP (over $FSDEV): exit status $FSCK"
    losetup -d "$LOOP" && LOOP=""
    echo "### total $(( $(date +%s) - T0 ))s"
    WHAT="$HOSTFS made through the initiator${APPS:+ (${APPS// /, })}, $KILL killed (target $TKIND $MODE${MOPT:+, -o $MOPT}$([ "$URING" = 1 ] && echo ", FUSE over io_uring")$([ "$LODIO" = 1 ] && echo ", loop direct I/O")$([ "$PART" = 1 ] && echo ", on the partition file")$([ "$NOSYNC" = 1 ] && echo ", writers without their syncs"))"
    [ "$APPBAD" = 0 ] || fail "$WHAT: acknowledged application writes lost or damaged (see VIOLATION above)"
    [ -z "$BAD" ] || fail "$WHAT: fsynced files lost or damaged:$BAD"
    [ -z "$STRAY" ] || fail "$WHAT: files the writer never started:$STRAY"
    [ "$SCRUB" = 0 ] || { cat "$RUN/scrub.log"; fail "$WHAT: btrfs scrub found errors"; }
    [ "$FSCK" = 0 ] || { cat "$RUN/fsck.log"; fail "$WHAT: $FSCK_CMD finds the file system damaged"; }
    echo "PASS: $WHAT: $([ -n "$APPS" ] && echo "every acknowledged step held" || echo "$NOK fsynced files intact"), the file system clean"
    exit 0
fi

# ---------------------------------------------------------------- writes
# wchunk N: chunk N of new.bin to the device, O_DIRECT; acknowledged when it returns 0.
wchunk() {
    timeout 60 dd if="$NEW" of="$DEV" bs=$CH skip="$1" seek="$1" count=1 oflag=direct conv=notrunc status=none
}
LEDGER=$RUN/ledger
: >"$LEDGER"
TW=$(date +%s)
CLOG=$RUN/clog
: >"$CLOG"
if [ "$NBD" = 1 ]; then
    URI="nbd+unix:///e$SHELF.$SLOT?socket=$SOCK"
    # nbdphase P FIRST LAST: chunks FIRST..LAST of the order, through nbdcopy (see -N).
    nbdphase() {
        local sparse=$RUN/phase-$1.bin c
        truncate -s "$REGION" "$sparse" || die "truncate $sparse"
        for c in $(sed -n "$2,$3p" "$RUN/order"); do
            dd if="$NEW" of="$sparse" bs=$CH skip="$c" seek="$c" count=1 conv=notrunc status=none ||
                die "dd into $sparse"
        done
        timeout 120 nbdcopy --destination-is-zero --connections=4 --requests=16 "$sparse" "$URI" ||
            die "phase $1: nbdcopy to $URI failed"
        sed -n "$2,$3p" "$RUN/order" | sed "s/^/$1 /" >>"$LEDGER"
    }
    nbdphase A 1 "$NA"
    timeout 60 qemu-io -f raw -c flush "$URI" >"$RUN/flush.log" 2>&1 ||
        { cat "$RUN/flush.log"; die "FLUSH (qemu-io -c flush on $URI) failed"; }
    say "phase A: $NA chunks acknowledged on 4 NBD connections, then a FLUSH on a fifth that succeeded ($(( $(date +%s) - TW ))s)"
    nbdphase B $((NA + 1)) $((NA + NB))
    say "phase B: $NB chunks acknowledged, not flushed"
    cp "$CLOG" "$RUN/clog.before-kill"
    DIRTY=$(tr -d '\r' <"$CONSOLE" | sed -n 's/^.*PL:DIRTY_KB //p' | tail -1)
    kill_guest
    say "qemu SIGKILLed after phase B (no phase C with -N); the guest's last dirty count ${DIRTY:-?} kB"
else # through the device file, one dd a chunk
for c in $(sed -n "1,${NA}p" "$RUN/order"); do
    wchunk "$c" || die "phase A: write of chunk $c failed"
    echo "A $c" >>"$LEDGER"
done
timeout 60 sync -d "$DEV" || die "FLUSH (sync -d $DEV) failed"
say "phase A: $NA chunks acknowledged, then a FLUSH that succeeded ($(( $(date +%s) - TW ))s)"
for c in $(sed -n "$((NA + 1)),$((NA + NB))p" "$RUN/order"); do
    wchunk "$c" || die "phase B: write of chunk $c failed"
    echo "B $c" >>"$LEDGER"
done
say "phase B: $NB chunks acknowledged, not flushed"
# Phase C: a writer of its own (own process group), logging each chunk's start and end.
export -f wchunk
export NEW DEV CH
setsid bash -c 'for c in "$@"; do echo "S $c" >>'"$CLOG"'; wchunk "$c" || exit 1; echo "D $c" >>'"$CLOG"'; done' \
    writer $(sed -n "$((NA + NB + 1)),\$p" "$RUN/order") </dev/null >"$RUN/writer.log" 2>&1 &
WRITER_PID=$!
wait_for 120 "phase C: $NC_ACK chunks acknowledged" sh -c "[ \$(grep -c '^D' '$CLOG') -ge $NC_ACK ]"
# What was acknowledged before the kill is what the log said before it.
cp "$CLOG" "$RUN/clog.before-kill"
DIRTY=$(tr -d '\r' <"$CONSOLE" | sed -n 's/^.*PL:DIRTY_KB //p' | tail -1)
# (Braces: bash's "Killed" notice for its own job goes to the same /dev/null.)
kill_guest
say "qemu SIGKILLed with $(grep -c '^D' "$RUN/clog.before-kill") of phase C's chunks acknowledged, writing the next; the guest's last dirty count ${DIRTY:-?} kB"
{ kill -KILL -- "-$WRITER_PID"; wait "$WRITER_PID"; } 2>/dev/null
WRITER_PID=""
fi
stop "$INIT_PID"
wait "$INIT_PID" 2>/dev/null
INIT_PID=""
unmount_root

# ---------------------------------------------------------------- what the disk holds
AFTER=$RUN/after.bin
if [ "$EXPORT" = raw ]; then
    cp "$IMG" "$AFTER" || fail "cannot read $IMG"
else
    LOOP=$(losetup -f --show "$IMG") || fail "losetup $IMG"
    MNT=$RUN/mnt
    mkdir -p "$MNT"
    # A read-write mount replays the journal (btrfs: the log tree), as the guest's next
    # boot would.
    mount -t "$EXPORT" "$LOOP" "$MNT" || fail "the data disk's $EXPORT does not mount after the power loss"
    cp "$MNT/data.bin" "$AFTER" || fail "cannot read data.bin"
    # btrfs: a read of a block whose checksum does not match fails (EIO) and is counted.
    [ "$EXPORT" = btrfs ] && btrfs device stats "$MNT" >"$RUN/btrfs-stats.log" 2>&1
    umount "$MNT" || fail "umount $MNT"
    # A process that `ip netns exec` or `unshare -m` started beside us while it was mounted
    # holds a copy of the mount in its own namespace (this machine's / is a private mount),
    # and the file system would live on, behind e2fsck, until that process exits: removing
    # the mount point detaches such copies; /sys/fs/ext4/loopN (xfs: /sys/fs/xfs/loopN;
    # btrfs: /sys/fs/btrfs/UUID) is there while it lives (thirteenth audit,
    # tests/interop/ext4-check.sh).
    rmdir "$MNT" && MNT=""
    case $EXPORT in
        btrfs) SB=/sys/fs/btrfs/$(blkid -s UUID -o value "$LOOP") ;;
        *) SB=/sys/fs/$EXPORT/${LOOP#/dev/} ;;
    esac
    for _ in $(seq 200); do [ -e "$SB" ] || break; sleep 0.1; done
    [ -e "$SB" ] && fail "$LOOP unmounted, but its file system lives on (mounted in the namespaces of pids $(grep -l " $EXPORT $LOOP " /proc/[0-9]*/mountinfo 2>/dev/null | cut -d/ -f3 | tr '\n' ' '))"
    losetup -d "$LOOP" && LOOP=""
    case $EXPORT in
        ext4) FSCK_CMD="e2fsck -fn" ;; xfs) FSCK_CMD="xfs_repair -n" ;; btrfs) FSCK_CMD="btrfs check --readonly" ;;
    esac
    $FSCK_CMD "$IMG" >"$RUN/fsck.log" 2>&1
    FSCK=$?
    say "$EXPORT after log replay: $FSCK_CMD exit status $FSCK"
    [ $FSCK = 0 ] || { cat "$RUN/fsck.log"; fail "$FSCK_CMD finds the data disk's file system damaged"; }
    if [ -s "$RUN/btrfs-stats.log" ]; then
        grep -q '[1-9]' <(awk '{print $2}' "$RUN/btrfs-stats.log") &&
            { cat "$RUN/btrfs-stats.log"; fail "btrfs counted errors reading data.bin after the power loss"; }
    fi
fi
[ "$(stat -c %s "$AFTER")" = "$REGION" ] || fail "the region has $(stat -c %s "$AFTER") bytes, not $REGION"

# The rules (header): per chunk, a class; per sector, old, new or foreign.
#   A: flushed; B: acknowledged; CA: C acknowledged before the kill; CF: C started, not
#   acknowledged (in flight); U: never written.
perl -e '
    my ($old, $new, $after, $ledger, $clog, $clog0, $ch, $mode, $report) = @ARGV;
    sub slurp { local $/; open(my $f, "<", $_[0]) or die "$_[0]: $!"; binmode $f; my $d = <$f>; $d }
    my ($o, $n, $a) = (slurp($old), slurp($new), slurp($after));
    my %class;
    for (split /\n/, slurp($ledger)) { my ($p, $c) = split; $class{$c} = $p; }
    # Started at any time: in flight; acknowledged in the log as it was before the kill: CA.
    for (split /\n/, slurp($clog)) { my ($s, $c) = split; $class{$c} = "CF" if $s eq "S"; }
    for (split /\n/, slurp($clog0)) { my ($s, $c) = split; $class{$c} = "CA" if $s eq "D"; }
    my (%cnt, @foreign);
    for my $c (0 .. length($o) / $ch - 1) {
        my $k = $class{$c} // "U";
        for (my $off = $c * $ch; $off < ($c + 1) * $ch; $off += 512) {
            my $g = substr($a, $off, 512);
            my $v = $g eq substr($n, $off, 512) ? "new" : $g eq substr($o, $off, 512) ? "old" : "foreign";
            $cnt{$k}{$v}++;
            push @foreign, $off / 512 if $v eq "foreign";
        }
    }
    my @fails;
    my %name = (A => "A (flushed)", B => "B (acknowledged, unflushed)", CA => "C acknowledged before the kill",
                CF => "C in flight", U => "never written");
    for my $k (qw(A B CA CF U)) {
        my $h = $cnt{$k} or next;
        printf "### %-32s sectors: %5d new, %5d old, %d foreign\n", $name{$k}, $h->{new} // 0, $h->{old} // 0, $h->{foreign} // 0;
    }
    push @fails, scalar(@foreign) . " foreign sectors (neither the old nor the new bytes), the first at sector $foreign[0]" if @foreign;
    push @fails, "$cnt{A}{old} sectors of phase A are old although a FLUSH after them succeeded" if $cnt{A}{old};
    push @fails, "$cnt{U}{new} sectors never written hold new bytes" if $cnt{U}{new};
    my $acked_old = ($cnt{B}{old} // 0) + ($cnt{CA}{old} // 0);
    if ($mode ne "buffered") {
        my $flag = $mode eq "sync" ? "-s (O_SYNC)" : "-d (O_DIRECT)";
        push @fails, "$acked_old acknowledged sectors (B, C) are old: $flag writes must survive once acknowledged" if $acked_old;
    } elsif (!$acked_old) {
        push @fails, "no acknowledged, unflushed sector was lost: the guest'"'"'s page cache survived the kill, so this run cannot tell a FLUSH that syncs from one that does not";
    }
    printf "### acknowledged but unflushed sectors lost: %d of %d\n", $acked_old, ($cnt{B}{new} // 0) + ($cnt{CA}{new} // 0) + $acked_old;
    if (@fails) {
        print "### VIOLATION: $_\n" for @fails;
        exit($report ? 0 : 1);
    }
    exit 0;
'  "$OLD" "$NEW" "$AFTER" "$LEDGER" "$CLOG" "$RUN/clog.before-kill" "$CH" "$MODE" "$REPORT"
CHECK=$?
VIA=""
[ "$NBD" = 1 ] && VIA=", through NBD on several connections"
echo "### total $(( $(date +%s) - T0 ))s"
[ $CHECK = 0 ] || fail "power loss of $TKIND ($MODE, $EXPORT${SPARSE:+ $SPARSE} export, $LBS-byte sectors$VIA): see VIOLATION above"
if [ "$REPORT" = 1 ]; then
    echo "REPORT: power loss of $TKIND ($MODE, $EXPORT${SPARSE:+ $SPARSE} export, $LBS-byte sectors$VIA), findings above"
else
    echo "PASS: power loss of $TKIND ($MODE, $EXPORT${SPARSE:+ $SPARSE} export, $LBS-byte sectors$VIA) at MTU $MTU"
fi
exit 0
