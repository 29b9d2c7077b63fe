#!/usr/bin/env bash
# kernel-initiator.sh - run an AoE target against the Linux kernel's own AoE initiator
# (drivers/block/aoe from Debian's linux-image-6.1 package) booted in a qemu/TCG guest
# with a busybox initramfs, and check the data path end to end.
#
# Topology, all inside one network namespace this script creates and deletes (AoE frames
# never touch the host's interfaces):
#
#     guest eth0 (virtio-net) == tap "kitap" --+
#                                              +-- bridge "kibr"
#     target on "kitgt" <== veth ==> "kiport" -+
#
# Usage: kernel-initiator.sh -t TEMPLATE [-m MTU] [-s SHELF] [-l SLOT] [-z MiB]
#                            [-c CACHE_DIR] [-T SECONDS] [-k] [-r POOL/IMAGE] [-g] [-K]
#                            [-R SECONDS] [-F] [-S] [-P] [-B LBA:COUNT] [-W] [-L SECTORS]
#                            [-O] [-H replace|move|idle|alone] [-X] [-I AOE]
#                            [-N mtu|mac|recreate|rename|netns]
#                            [-M tap|target|shared]
#   -t TEMPLATE  target command line, run by bash inside the namespace; placeholders
#                {SHELF} {SLOT} {IFACE} {FILE}, and {CONFIG} (a configuration file for
#                `aoe serve --config` serving {FILE} as {SHELF}.{SLOT} on {IFACE}). E.g.
#                  -t 'target/release/aoe serve {SHELF} {SLOT} {IFACE} {FILE}'
#                  -t 'vblade {SHELF} {SLOT} {IFACE} {FILE}'
#   -m MTU       MTU of every link, the guest's too (default 1500)
#   -s/-l        AoE shelf and slot (default 1 / 1)
#   -z MiB       backing file size (default 32); it is filled with random bytes
#   -c DIR       cache for the kernel package (default ${AOE_CACHE:-/var/tmp/aoe-test-cache})
#   -T SECONDS   hard overall timeout (default 600)
#   -k           keep the run directory (logs, console, backing file)
#   -r POOL/IMAGE  RBD mode (issue 13): start a one-node Ceph cluster (scripts/ceph-up.sh)
#                on the loopback of the namespace, put the random data in with
#                `rbd import` as POOL/IMAGE, make {FILE} `rbd:POOL/IMAGE` and offer the
#                placeholders {CEPH_CONF} and {CEPH_KEYRING}; the host checks below are made
#                on what `rbd export` gives after the target stopped, not on a backing file.
#                After its checks the guest asks for a resize: the host runs `rbd resize`
#                (16 MiB more) and the guest must see the new size, from the target's
#                announcement (the driver re-IDENTIFYs an idle device on a config response)
#                within 30 s, else after writing e{SHELF}.{SLOT} to /dev/etherd/revalidate
#   -g           grow (file mode): the same resize step, the host growing the backing file by
#                16 MiB with truncate(1) and sending the target SIGHUP (aoe serve reopens a
#                grown export and announces it; vblade ignores SIGHUP)
#   -K           kill: the guest asks for it before its pattern write; the host SIGKILLs the
#                target, the guest starts the write a second later (frames go unanswered, the
#                driver retransmits), and the host starts the target again 3 s after the kill;
#                the write must complete and every check below hold
#   -W           kill mid-stream: like -K, but the guest writes the pattern region one 64 KiB
#                dd oflag=direct after the other, without pause, and asks for the kill after
#                the second: the host SIGKILLs the target while the guest's writes stream
#                (one is in flight, or goes out to the dead target), restarts it 3 s later,
#                and every write the guest saw complete, and the rest, must be in the file
#   -O           OSD killed mid-stream (with -r): the guest streams its writes as with -W,
#                and the host SIGKILLs the cluster's one OSD instead of the target, starting
#                it again OSD_DOWN_S (8) seconds later; the writes wait (librados holds them)
#                and every check below holds on \`rbd export\`
#   -H MODE      hand-over between two gateways of the image (with -r; session 27). A second
#                veth, "kitgt2" (its own MAC), joins the bridge; gateway B is the template
#                with {IFACE} kitgt2. MODE:
#                replace  the guest streams its writes as with -W; at KILL_ME the host
#                         SIGKILLs gateway A and starts B at once (same image and shelf.slot):
#                         B breaks the dead A's lock and announces itself, the driver adds
#                         it as a second target of the device and moves the frames A does
#                         not answer to it; no write may fail
#                move     the same, but A is left running (a planned move, or an operator's
#                         mistake): B breaks A's live lock (the cluster blocklists A), A
#                         fences itself and stops answering, B's duplicate probe waits for
#                         A to fall silent, then announces; no write may fail; at the end
#                         A must still run and say it lost the lock
#                idle     the same move while A is idle, before the guest boots: A has no
#                         write to be refused and notices through its watch (0.9 s after
#                         the break, 2026-12-06); B serves once its probe hears nobody else
#                         (were A still answering, B would probe again for up to 30 s: the
#                         count of "waiting for it to stop" lines in B's log is printed);
#                         the guest then finds e{SHELF}.{SLOT} through B alone and every
#                         check holds
#                alone    a fenced gateway with nobody to take over: the flow of -P (the
#                         driver loaded with aoe_deadsecs=PAUSE_DEADSECS), but at PAUSE_ME
#                         the host starts B on shelf.slot+1 (another address, so nothing
#                         serves the guest's): A fences itself and falls silent, and a write
#                         must fail (EIO after aoe_deadsecs: an error, not a hang); at
#                         CONT_ME the host stops B and A and starts A again (it takes the
#                         lock back), the guest rediscovers the device and every check below
#                         holds
#                The guest prints the driver's view of the device's targets at the end
#                (debugfs: each target's MAC, taint, in flight): what it made of A.
#                replace, move and idle also check a reservation across the hand-over: before
#                the guest boots, the host (a third port, "kihost", with python3 raw
#                frames) reserves e{SHELF}.{SLOT} through A for the guest's MAC (Reserve/
#                Release set); the guest, the holder, writes through A and then B; after
#                it finished, an ATA write from kihost's MAC must get AoE error 6 (target
#                reserved) from B, and not land (the md5 checks of the image)
#   -R SECONDS   reload: the template must use {CONFIG}. The pattern region is 4 MiB, and
#                the guest writes it over and over with dd oflag=direct, in passes of
#                sector-stamped data (every 8 bytes of a sector say its LBA and pass), for at
#                least SECONDS of the host's clock, then once more with the final pass (the
#                pattern); meanwhile the host rewrites {CONFIG} and sends SIGHUP, waiting for
#                each reload to be done before the next: the written export's buffer_count
#                alternates 16/17 (the export is reopened: "retiring"), and every second
#                reload adds or removes a second export (slot+1, its own file). At least 3
#                reloads must be done while the guest writes; every sector of the region must
#                then hold the final pass, read back in the guest and in the host file (on a
#                mismatch the host says which pass each wrong sector holds).
#   -F           full disk (file mode): the backing file lives on a tmpfs of its own, the
#                pattern region is a hole (punched with fallocate) and the tmpfs is filled
#                with a filler file to FULL_FREE_KIB (256 KiB) of free space. The guest
#                writes the pattern one 64 KiB dd oflag=direct at a time: the first writes
#                must succeed and one before the last must fail (the target's ENOSPC must
#                reach the driver as an error, never as an acknowledgement), what was
#                acknowledged must read back (iflag=direct) as written; then the host
#                removes the filler, the guest writes the whole pattern again (retrying until
#                it succeeds, within its step's budget) and every check below holds.
#   -S           shrink (file mode): after the checks below, the guest asks for it; the host
#                stops the target (SIGTERM), keeps a copy of the file for the checks,
#                truncates the file by 8 MiB and starts the target again on it; the idle
#                device's size must follow (from the target's announcement, else after
#                /dev/etherd/revalidate), its last sector must read, and the md5 of the whole
#                shrunk device in the guest must equal the shrunk file's
#   -P           pause: the driver is loaded with aoe_deadsecs=PAUSE_DEADSECS (10); before its
#                pattern write the guest asks the host to SIGSTOP the target, then writes the
#                region with zeros 64 KiB at a time until a write fails (the device goes down
#                after aoe_deadsecs); the host then sends SIGCONT, the guest writes discover until
#                the device is up again and writes the pattern, and every check below holds
#                (the zeros the stopped target had queued must not land over the pattern)
#   -X           4Kn (file mode, not with -F or -B): the backing file lives on ext4 on a loop
#                device with 4096-byte logical sectors (losetup -b 4096, mkfs.ext4 -b 4096), so
#                an O_DIRECT target (aoe serve -d) must read-modify-write the guest's 512-byte
#                sectors; with -L SECTORS not a multiple of 8 the file ends in a partial 4 KiB
#                block, which the guest's last piece writes and reads (eleventh audit)
#   -B LBA:COUNT bad range (file mode, alone): the target is given {FILE} through nbdfuse and
#                nbdkit's eval plugin, whose reads overlapping sectors LBA..LBA+COUNT-1 fail
#                with EIO (a disk with unreadable sectors there; writes go through). The
#                guest reads each sector from LBA-3 to LBA+COUNT+2 alone (O_DIRECT, rd512.c):
#                exactly the bad ones must fail, the others read as the file holds them.
#                The whole-device md5s (guest and host) leave out the 4 KiB pages holding
#                bad sectors (a buffered read fails whole pages). Needs nbdkit, nbdfuse, gcc;
#                the template should open {FILE} with O_DIRECT (aoe serve -d): a buffered
#                target reads the host's pages whole too.
#   -N EVENT     a link event mid-stream (session 33): like -W, but at KILL_ME the host
#                changes the target's link instead of killing the target: "mtu" lowers
#                kitgt's MTU alone to 1500 (with -m 9000: the driver's frames no longer fit),
#                "mac" gives kitgt a new MAC address, "recreate" deletes the kitgt/kiport veth
#                pair and makes it again (a new index and MAC; kiport back on the bridge),
#                "rename" renames kitgt to kitgtR for LINKEV_AWAY_S (4) seconds and back
#                (the target's interface keeps its index and MAC), "netns" moves kitgt to
#                a namespace of its own (aoekio-PID) for LINKEV_AWAY_S seconds and back,
#                then sets it up (session 35: the same index and MAC, but the interface
#                was unregistered from the target's namespace, unbinding its socket).
#                The guest writes the pattern over and over for LINKEV_AWAY_S + 12 s, and
#                the event must be done before its last write: the writes must complete,
#                no "I/O error" line may be in the guest's dmesg, and every check below hold
#   -M LINK      multipath (session 35, file mode): the guest gets a second NIC (eth1, tap
#                "kitap2") on a second bridge ("kibr2") with a second veth to the target
#                ("kitgt2"/"kiport2"); the driver is loaded with aoe_iflist=eth0,eth1. A
#                template with {CONFIG} serves the export on both kitgt and kitgt2 (one
#                process); any other is started twice, on kitgt and on kitgt2 (two
#                processes on one file: two vblades, or two `aoe serve`). The guest must
#                see two targets (two MACs) for e{SHELF}.{SLOT} in the driver's debugfs
#                before it writes. Then as -W, but the guest writes the pattern over and
#                over for MP_DOWN_S + MP_AFTER_S + 2 seconds, and at KILL_ME the host sets
#                LINK down for MP_DOWN_S (12) seconds, past the driver's HARD_SCORN_SECS
#                (10: the target is scorned and its frames go to the other), then up:
#                "tap" is the guest's second tap (kitap2; the target sees nothing), "target"
#                is the target's second interface (kitgt2; its link goes down and up).
#                "shared": one segment instead of two, the guest's second tap on kibr
#                too and no kitgt2 (one target, one MAC, reached through both of the
#                guest's NICs: one aoetgt with eth0 and eth1 in its ifs[], checked in the
#                debugfs before the writes); kitap2 is cut, and the frames are counted
#                on the taps (what the guest sent on each NIC) instead of the target's
#                interfaces. No
#                write may fail, no "I/O error" line may be in the guest's dmesg, the
#                link must come back before the guest's last write, and path 2 must be
#                used again: from 10 s after it came back to the end of the writes, the
#                frames received on kitgt2 at least a quarter of those on kitgt (the host
#                counts each interface's rx_packets at the cut, the return, 10 s later and
#                the end, and prints them with the driver's view of its targets)
#   -I AOE       ours beside the driver (file mode; twelfth audit): `AOE initiator` (the aoe
#                binary given) on a fourth port of the bridge ("kiini"), its FUSE ROOT in the
#                run directory, serves the same export to the host. When the guest starts its
#                pattern write (TWO_ME) the host writes a second 1 MiB pattern through it,
#                one 64 KiB after the guest's region, with dd oflag=direct conv=fsync, its
#                first sector S last, while the guest writes its own pattern over and over
#                (two initiators, one target, disjoint regions, at once) until S reads
#                (iflag=direct) as the host wrote it. The guest then writes S again with its own sector G and syncs
#                (TWO_OVER); the host must then read G at S through ours, and writes S a
#                third time (H); the guest waits until it reads H. So each initiator's write
#                acknowledged after the other's is the one that stays (the whole-device md5s
#                expect the second pattern with H at S), and at the end ours must read the
#                guest's pattern region as the guest wrote it.
#   -L SECTORS   large disk (file mode, alone): the backing file is the -z MiB of random
#                data followed by a hole up to SECTORS sectors (a sparse file; 2^32 + 16387
#                is past 2 TiB). The whole-device md5s and their checks cover the first -z
#                MiB only. After the pattern the guest writes 16 sectors from the pattern
#                across sector 2^28 (the end of LBA28's reach), across 2^32 when the device
#                is that large, and ending at the last sector, each with dd oflag=direct,
#                and reads each back (iflag=direct); a write at sector SECTORS (past the
#                end) must fail. The host finds each piece in the file at its offset and no
#                data anywhere else past the first -z MiB (SEEK_DATA).
#
# Checks: the guest discovers e{SHELF}.{SLOT} with the backing file's size and the payload
# the MTU allows; the md5 of the whole device read in the guest equals the host file's; a
# 1 MiB random pattern written with dd oflag=direct at an unaligned-to-MiB offset reads back
# (iflag=direct) identical; the host file (with -r: the `rbd export`) holds it at that
# offset; the full md5 after the write, in the guest and on the host, equals the expected one.
#
# Budgets: the guest's kernel must start its init within 180 s of qemu's start (the host
# checks); then each guest step has a budget (60 s; whole-device reads 60 s + 4 s per MiB,
# 188 s for 32 MiB, i.e. under 256 KiB/s fails) and the whole guest the time left of -T
# less a 60 s margin for the host's checks (the guest's watchdog; ki.conf gives it as a
# time of the host's clock). The guest measures its budgets on the emulated RTC, which
# follows the host's clock, not on its own clock (which a loaded host can put far off). A
# step over its budget fails naming it, so a stall is a clear failure well before -T.
#
# On a failure or a timeout the output says where it stopped: the guest prints a timestamped
# "T STEP" line before each step; its watchdog prints the step it was in, the aoe driver's
# debugfs state, its messages (retransmits, /dev/etherd/err), the blocked tasks (sysrq w)
# and dmesg, then powers off. The host, on a signal (timeout) or a failed guest, prints the
# guest's KI: lines and console tail, the target's log tail, its threads and (aoe serve) its
# status and counters from the control socket, and the namespace's link counters. A passing
# run prints the step times, the driver's retransmit count and the target's counters.
#
# Needs root, iproute2, qemu-system-x86_64, busybox (static), cpio, kmod, apt-get (first run
# downloads the kernel package; later runs use the cache); with -r also ceph-mon, ceph-mgr,
# ceph-osd, ceph-common, uuid-runtime. Exit status: 0 PASS, 1 FAIL (the last line says why),
# 2 usage.
set -uo pipefail

TEMPLATE=""
MTU=1500
SHELF=1
SLOT=1
SIZE_MB=32
CACHE=${AOE_CACHE:-/var/tmp/aoe-test-cache}
TOTAL=600
KEEP=0
RBD=""
GROW=0
KILL=0
PAUSE=0
PAUSE_DEADSECS=10
RELOAD=0
FULL=0
FULL_FREE_KIB=256
SHRINK=0
BAD=""
LARGE=0
OSDKILL=0
OSD_DOWN_S=8
HANDOVER=""
X4K=0
X4K_LOOP=""
OURS=""
OURS_PID=""
LINKEV=""
MP=""
MP_DOWN_S=12
MP_AFTER_S=20
usage() { sed -n '2,/^# 2 usage/p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while getopts "t:m:s:l:z:c:T:r:R:B:L:H:I:N:M:kgKWFSPOXh" o; do
    case $o in
        t) TEMPLATE=$OPTARG ;; m) MTU=$OPTARG ;; s) SHELF=$OPTARG ;; l) SLOT=$OPTARG ;;
        z) SIZE_MB=$OPTARG ;; c) CACHE=$OPTARG ;; T) TOTAL=$OPTARG ;; k) KEEP=1 ;;
        r) RBD=$OPTARG ;; g) GROW=1 ;; K) KILL=1 ;; W) KILL=2 ;; R) RELOAD=$OPTARG ;; O) KILL=2 OSDKILL=1 ;; F) FULL=1 ;; S) SHRINK=1 ;; P) PAUSE=1 ;;
        B) BAD=$OPTARG ;; L) LARGE=$OPTARG ;; H) HANDOVER=$OPTARG ;; X) X4K=1 ;; I) OURS=$OPTARG ;;
        N) LINKEV=$OPTARG KILL=2 ;;
        M) MP=$OPTARG ;;
        *) usage ;;
    esac
done
[ -n "$TEMPLATE" ] || { echo "kernel-initiator.sh: -t TEMPLATE is required" >&2; usage; }
for n in "$MTU" "$SHELF" "$SLOT" "$SIZE_MB" "$TOTAL" "$RELOAD" "$LARGE"; do
    [[ $n =~ ^[0-9]+$ ]] || { echo "kernel-initiator.sh: not a number: $n" >&2; exit 2; }
done
[ "$SIZE_MB" -ge 8 ] || { echo "kernel-initiator.sh: -z must be at least 8 (MiB)" >&2; exit 2; }
[ "$RELOAD" = 0 ] || [[ $TEMPLATE == *'{CONFIG}'* ]] ||
    { echo "kernel-initiator.sh: -R needs a template with {CONFIG} (aoe serve --config {CONFIG})" >&2; exit 2; }
[ "$RELOAD" = 0 ] || [ -z "$RBD" ] || { echo "kernel-initiator.sh: -R and -r do not go together" >&2; exit 2; }
[ "$FULL" = 0 ] || { [ -z "$RBD" ] && [ "$RELOAD" = 0 ] && [ "$GROW" = 0 ]; } ||
    { echo "kernel-initiator.sh: -F goes with none of -r, -R, -g" >&2; exit 2; }
[ "$SHRINK" = 0 ] || { [ -z "$RBD" ] && [ "$GROW" = 0 ] && [ "$SIZE_MB" -ge 24 ]; } ||
    { echo "kernel-initiator.sh: -S goes with neither -r nor -g, and wants -z 24 or more" >&2; exit 2; }
case $LINKEV in
    ""|mtu|mac|recreate|rename|netns) ;;
    *) echo "kernel-initiator.sh: -N wants mtu, mac, recreate, rename or netns, not $LINKEV" >&2; exit 2 ;;
esac
[ -z "$LINKEV" ] || { [ -z "$RBD" ] && [ -z "$HANDOVER" ] && [ -z "$OURS" ]; } ||
    { echo "kernel-initiator.sh: -N goes with none of -r, -H, -I" >&2; exit 2; }
if [ -n "$MP" ]; then
    [[ $MP =~ ^(tap|target|shared)$ ]] || { echo "kernel-initiator.sh: -M wants tap, target or shared, not $MP" >&2; exit 2; }
    [ -z "$RBD$HANDOVER$OURS$LINKEV$BAD" ] && [ "$RELOAD$GROW$KILL$FULL$SHRINK$PAUSE$LARGE" = 0000000 ] ||
        { echo "kernel-initiator.sh: -M goes with none of -r, -H, -I, -N, -B, -R, -g, -K, -W, -F, -S, -P, -L" >&2; exit 2; }
    KILL=2
fi
BAD_LBA=0 BAD_COUNT=0
if [ -n "$BAD" ]; then
    [[ $BAD =~ ^([0-9]+):([1-9][0-9]*)$ ]] ||
        { echo "kernel-initiator.sh: -B wants LBA:COUNT, not $BAD" >&2; exit 2; }
    BAD_LBA=${BASH_REMATCH[1]} BAD_COUNT=${BASH_REMATCH[2]}
    [ -z "$RBD" ] && [ "$RELOAD" = 0 ] && [ "$GROW$KILL$FULL$SHRINK$PAUSE" = 00000 ] ||
        { echo "kernel-initiator.sh: -B goes with none of -r, -R, -g, -K, -F, -S, -P" >&2; exit 2; }
    [ "$BAD_LBA" -ge 8 ] && [ $(( (BAD_LBA + BAD_COUNT + 8) * 512 )) -le $(( (SIZE_MB << 20) / 2 )) ] ||
        { echo "kernel-initiator.sh: -B: the range must start at sector 8 or later and end in the first half of the device (the pattern is mid-device)" >&2; exit 2; }
fi
if [ -n "$HANDOVER" ]; then
    [[ $HANDOVER =~ ^(replace|move|idle|alone)$ ]] ||
        { echo "kernel-initiator.sh: -H wants replace, move, idle or alone, not $HANDOVER" >&2; exit 2; }
    [ -n "$RBD" ] && [ "$RELOAD" = 0 ] && [ "$GROW$KILL$FULL$SHRINK$PAUSE$LARGE" = 000000 ] && [ -z "$BAD" ] ||
        { echo "kernel-initiator.sh: -H needs -r and goes with none of -R, -g, -K, -W, -O, -F, -S, -P, -B, -L" >&2; exit 2; }
    # replace and move: the streaming write of -W; alone: the flow of -P; idle: the plain
    # pattern write (B is serving before the guest boots).
    case $HANDOVER in alone) PAUSE=1 ;; idle) ;; *) KILL=2 ;; esac
fi
[ "$X4K" = 0 ] || { [ -z "$RBD$BAD" ] && [ "$FULL" = 0 ]; } ||
    { echo "kernel-initiator.sh: -X goes with none of -r, -F, -B" >&2; exit 2; }
[ "$OSDKILL" = 0 ] || [ -n "$RBD" ] ||
    { echo "kernel-initiator.sh: -O needs -r (it kills the cluster's OSD)" >&2; exit 2; }
if [ "$LARGE" != 0 ]; then
    [ -z "$RBD$BAD" ] && [ "$RELOAD" = 0 ] && [ "$GROW$KILL$FULL$SHRINK$PAUSE" = 00000 ] ||
        { echo "kernel-initiator.sh: -L goes with none of -r, -R, -g, -K, -W, -F, -S, -P, -B" >&2; exit 2; }
    [ "$LARGE" -gt $(( (1 << 28) + 16 )) ] && [ "$LARGE" -lt $(( 1 << 48 )) ] ||
        { echo "kernel-initiator.sh: -L wants more than 2^28 + 16 sectors (and fewer than 2^48)" >&2; exit 2; }
fi
[ -z "$RBD" ] || [[ $RBD =~ ^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+){1,2}$ ]] ||
    { echo "kernel-initiator.sh: -r wants POOL/IMAGE or POOL/NAMESPACE/IMAGE, not $RBD" >&2; exit 2; }

# Hard overall timeout: run the body under timeout(1), which sends SIGTERM; the body's trap
# then cleans up (namespace, qemu, target). -k: SIGKILL 30 s later if that hangs.
if [ -z "${_KI_BODY:-}" ]; then
    _KI_BODY=1 timeout -k 30 "$TOTAL" bash "$0" "$@"
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "FAIL: overall timeout of ${TOTAL}s hit"
        exit 1
    fi
    exit $rc
fi

T0=$(date +%s)
say() { echo "### [$(( $(date +%s) - T0 ))s] $*"; }
fail() { echo "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || fail "must run as root (network namespaces, tap devices)"
for t in ip nsenter setsid timeout file qemu-system-x86_64 cpio gzip modprobe depmod md5sum apt-get dpkg flock; do
    command -v "$t" >/dev/null || fail "missing tool $t (scripts/install-deps.sh installs it)"
done
if [ -n "$BAD" ]; then
    for t in nbdkit:nbdkit nbdfuse:libnbd-bin gcc:gcc; do
        command -v "${t%%:*}" >/dev/null || fail "-B: missing tool ${t%%:*} (Debian package ${t#*:})"
    done
fi
BUSYBOX=$(command -v busybox || true)
[ -n "$BUSYBOX" ] && file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' \
    || fail "need a statically linked busybox (Debian package busybox-static)"
[ -e /dev/net/tun ] || fail "no /dev/net/tun (tap devices)"
CEPH_UP=$(dirname "$0")/../../scripts/ceph-up.sh
CEPH_DOWN=$(dirname "$0")/../../scripts/ceph-down.sh
if [ -n "$RBD" ]; then
    [ -f "$CEPH_UP" ] && [ -f "$CEPH_DOWN" ] || fail "-r: no $CEPH_UP / $CEPH_DOWN"
    for t in ceph-mon:ceph-mon ceph-mgr:ceph-mgr ceph-osd:ceph-osd rbd:ceph-common uuidgen:uuid-runtime; do
        command -v "${t%%:*}" >/dev/null || fail "-r: missing tool ${t%%:*} (Debian package ${t#*:}, scripts/install-deps.sh)"
    done
fi

NS=aoeki-$$
# -N netns: where the target's interface goes for LINKEV_AWAY_S seconds.
NS_AWAY=aoekio-$$
LINKEV_AWAY_S=4
RUN=$(mktemp -d "${TMPDIR:-/tmp}/aoe-kernel-initiator.XXXXXX") || fail "mktemp"
CONSOLE=$RUN/console.log
TARGET_PID="" QEMU_PID="" B_PID=""
# The guest's watchdog fires this long before the host's timeout, leaving the host time to
# stop the target and print its side.
GUEST_MARGIN=60

# lib.sh: stop PID (TERM, then KILL), sweep_netns PREFIX and drop_netns NS.
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
# Namespaces of earlier runs that were SIGKILLed before their cleanup ran.
sweep_netns aoeki
sweep_netns aoekio
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    [ -n "$QEMU_PID" ] && stop "$QEMU_PID"
    [ -n "$TARGET_PID" ] && stop "-$TARGET_PID"
    [ -n "$B_PID" ] && stop "-$B_PID"
    # -I: our initiator (it unmounts its ROOT when it stops); a lazy unmount if it could not.
    [ -n "$OURS_PID" ] && stop "-$OURS_PID"
    mountpoint -q "$RUN/ours" 2>/dev/null && { fusermount3 -u "$RUN/ours" 2>/dev/null || umount -l "$RUN/ours"; }
    # The cluster's daemons run in our namespace; ceph-down.sh stops them by their pid files.
    [ -n "$RBD" ] && [ -d "$RUN/ceph" ] && bash "$CEPH_DOWN" "$RUN/ceph" >/dev/null 2>&1
    drop_netns "$NS"
    drop_netns "$NS_AWAY"
    # -F: the backing file's tmpfs (the target that held it open is stopped above).
    mountpoint -q "$RUN/full" 2>/dev/null && umount "$RUN/full"
    # -X: the 4Kn ext4 and its loop device.
    mountpoint -q "$RUN/x4k" 2>/dev/null && umount "$RUN/x4k"
    [ -n "$X4K_LOOP" ] && losetup -d "$X4K_LOOP"
    # -B: the nbdfuse mount (its nbdfuse and nbdkit end with it).
    mountpoint -q "$RUN/bad" 2>/dev/null && { fusermount3 -u "$RUN/bad" 2>/dev/null || umount -l "$RUN/bad"; }
    if [ "$KEEP" = 1 ]; then echo "### run directory kept: $RUN"; else rm -rf "$RUN"; fi
    exit $rc
}
# diagnose: what the host can see of a run that did not finish, cheaply and bounded in time
# (timeout(1) sends SIGKILL 30 s after SIGTERM): the guest's KI: lines (the step it reached)
# and console tail, the target's log tail, threads and counters (aoe serve's control socket),
# the namespace's link counters.
diagnose() {
    echo "### diagnostics at $(( $(date +%s) - T0 ))s"
    diagnose_guest
    diagnose_host
}
diagnose_guest() {
    if [ -s "$CONSOLE" ]; then
        echo "### guest (KI: lines):"
        tr -d '\r' <"$CONSOLE" | grep 'KI:' | sed 's/^.*KI:/    /'
        echo "### guest console (tail, other lines):"
        tr -d '\r' <"$CONSOLE" | grep -v 'KI:' | tail -n 15 | sed 's/^/    /'
        echo "### console last written $(( $(date +%s) - $(stat -c %Y "$CONSOLE") ))s ago"
    else
        echo "### guest console: empty or not started"
    fi
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        echo "### qemu:"; ps -o pid,stat,pcpu,time,etime -p "$QEMU_PID" | sed 's/^/    /'
    fi
}
# target_ctl ARGS...: `aoe target ARGS` on the running target's control socket, indented
# (aoe serve only: vblade has none). /proc/PID/exe is the binary even if it was rebuilt since.
target_ctl() {
    timeout 5 "/proc/$TARGET_PID/exe" target --socket "/run/aoe/serve-$TARGET_PID.sock" "$@" 2>&1 |
        sed 's/^/    /'
    [ "${PIPESTATUS[0]}" = 0 ] || echo "    (aoe target $*: no answer within 5 s)"
}
diagnose_host() {
    if [ -f "$RUN/target.log" ]; then
        echo "### target log (tail):"; tail -n 20 "$RUN/target.log" | sed 's/^/    /'
    fi
    if [ -n "$TARGET_PID" ] && kill -0 "$TARGET_PID" 2>/dev/null; then
        echo "### target threads:"
        ps -L -o tid,stat,pcpu,time,wchan:24,comm -p "$TARGET_PID" | sed 's/^/    /'
        if [ -S "/run/aoe/serve-$TARGET_PID.sock" ]; then
            echo "### target status and counters (aoe target):"
            target_ctl status; target_ctl --json stats
        fi
    fi
    if [ -e "/run/netns/$NS" ]; then
        echo "### links (packets, bytes, dropped; as ip -s link counts them):"
        # ip netns exec mounts the namespace's own /sys (nsenter would show the host's).
        timeout 5 ip netns exec "$NS" sh -c 'cd /sys/class/net && for l in *; do
            s=$l/statistics; r() { cat "$s/$1"; }
            echo "$l: rx $(r rx_packets) $(r rx_bytes) $(r rx_dropped) tx $(r tx_packets) $(r tx_bytes) $(r tx_dropped)"
        done' 2>&1 | sed 's/^/    /'
    fi
}
trap cleanup EXIT
trap 'echo "FAIL: interrupted by a signal ($(( $(date +%s) - T0 ))s)"; diagnose; exit 1' INT TERM HUP

# ---------------------------------------------------------------- kernel (cached)
# guest-kernel.sh: the kernel image and the modules the guest loads (virtio-net, aoe and
# their dependencies, in load order), downloaded once into the cache.
# shellcheck source=guest-kernel.sh
. "$(dirname "$0")/guest-kernel.sh"
guest_kernel "$CACHE"

# ---------------------------------------------------------------- data and expectations
FILE=$RUN/backing.img
PAT=$RUN/pattern.bin
if [ "$FULL" = 1 ]; then
    # A tmpfs of its own, the backing file's size and 2 MiB more (filled below).
    mkdir "$RUN/full" && mount -t tmpfs -o size=$((SIZE_MB + 2))m aoeki-full "$RUN/full" ||
        fail "-F: cannot mount a tmpfs on $RUN/full"
    FILE=$RUN/full/backing.img
fi
if [ "$X4K" = 1 ]; then
    # A sparse image for the file system: room for the data, the pattern and the journal.
    truncate -s $(( 2 * SIZE_MB + 64 ))M "$RUN/x4k.img" || fail "-X: cannot make the ext4 image"
    X4K_LOOP=$(losetup --find --show --sector-size 4096 "$RUN/x4k.img") ||
        fail "-X: losetup --sector-size 4096"
    mkfs.ext4 -q -F -b 4096 "$X4K_LOOP" >/dev/null 2>&1 || fail "-X: mkfs.ext4 on $X4K_LOOP"
    mkdir "$RUN/x4k" && mount "$X4K_LOOP" "$RUN/x4k" || fail "-X: mount $X4K_LOOP"
    FILE=$RUN/x4k/backing.img
    say "-X: backing file on ext4 on $X4K_LOOP ($(cat /sys/block/"${X4K_LOOP#/dev/}"/queue/logical_block_size)-byte logical sectors)"
fi
head -c $((SIZE_MB << 20)) /dev/urandom >"$FILE" || fail "cannot write backing file"
if [ "$LARGE" != 0 ]; then
    # -L: a hole from the random data up to LARGE sectors.
    truncate -s $((LARGE * 512)) "$FILE" || fail "-L: cannot make $FILE $LARGE sectors long"
    # The pieces the guest writes (first sector each, 16 sectors): across 2^28, across 2^32
    # if the device is that large, and ending at the last sector.
    LARGE_LBAS="$(( (1 << 28) - 8 ))"
    [ "$LARGE" -le $(( (1 << 32) + 8 )) ] || LARGE_LBAS="$LARGE_LBAS $(( (1 << 32) - 8 ))"
    LARGE_LBAS="$LARGE_LBAS $((LARGE - 16))"
fi
# head_of FILE: the part of FILE the md5s cover (with -L the first -z MiB; else all of it).
head_of() {
    if [ "$LARGE" != 0 ]; then head -c $((SIZE_MB << 20)) "$1"; else cat "$1"; fi
}
# The pattern region: 1 MiB of random bytes; with -R 4 MiB, and the passes before it
# (pass1.bin ...) and it (the last pass) sector-stamped: every 8 bytes of sector i of the
# region hold the little-endian (device LBA | pass << 48), so a wrong sector says which pass
# it holds.
PAT_BYTES=$((1 << 20))
RELOAD_PASSES=3
BS=65536
SEEK=$(( (SIZE_MB << 20) / BS / 2 + 3 ))        # mid-device, not MiB-aligned
OFF=$((SEEK * BS))
# stamp PASS: the region's sectors stamped with PASS, on stdout.
stamp() {
    python3 -c 'import struct, sys
lba0, n, p = (int(a) for a in sys.argv[1:])
out = sys.stdout.buffer
for i in range(n):
    out.write(struct.pack("<Q", (lba0 + i) | (p << 48)) * 64)' "$((OFF / 512))" "$((PAT_BYTES / 512))" "$1"
}
if [ "$RELOAD" != 0 ]; then
    command -v python3 >/dev/null || fail "-R: missing tool python3 (to stamp the sectors)"
    PAT_BYTES=$((4 << 20))
    for p in $(seq 1 "$RELOAD_PASSES"); do stamp "$p" >"$RUN/pass$p.bin" || fail "cannot stamp pass $p"; done
    stamp $((RELOAD_PASSES + 1)) >"$PAT" || fail "cannot write pattern"
else
    head -c "$PAT_BYTES" /dev/urandom >"$PAT" || fail "cannot write pattern"
fi
PAT_MD5=$(md5sum <"$PAT" | cut -d' ' -f1)
if [ "$FULL" = 1 ]; then
    # The pattern region becomes a hole (it reads as zeros, and writing it needs new
    # pages), and the file system is filled to FULL_FREE_KIB free: the first pattern
    # writes fit, a later one finds no space.
    fallocate -p -o "$OFF" -l "$PAT_BYTES" "$FILE" || fail "-F: cannot punch a hole in $FILE"
    dd if=/dev/zero of="$RUN/full/filler" bs=64k 2>/dev/null
    free_kib=$(df -k --output=avail "$RUN/full" | tail -1 | tr -d ' ')
    [ "$free_kib" = 0 ] || fail "-F: $free_kib KiB still free on the filled tmpfs"
    truncate -s -${FULL_FREE_KIB}K "$RUN/full/filler" || fail "-F: cannot shrink the filler"
    say "-F: pattern region punched; $(df -k --output=avail "$RUN/full" | tail -1 | tr -d ' ') KiB free on the backing file's tmpfs"
fi
# -B: the whole-device md5s leave out the 4 KiB pages [CUT_LO, CUT_HI) (in sectors) that
# hold a bad sector; without -B nothing is left out.
CUT_LO=$(( BAD_LBA / 8 * 8 )) CUT_HI=$(( (BAD_LBA + BAD_COUNT + 7) / 8 * 8 ))
# md5_of FILE: the md5 of FILE, with -B less the cut pages.
md5_of() {
    if [ -n "$BAD" ]; then
        { head -c $((CUT_LO * 512)) "$1"; tail -c +$((CUT_HI * 512 + 1)) "$1"; } | md5sum | cut -d' ' -f1
    else
        head_of "$1" | md5sum | cut -d' ' -f1
    fi
}
H_BEFORE=$(md5_of "$FILE")
{ head -c "$OFF" "$FILE"; cat "$PAT"; head_of "$FILE" | tail -c +$((OFF + PAT_BYTES + 1)); } >"$RUN/expected.img" ||
    fail "cannot write $RUN/expected.img"
if [ -n "$OURS" ]; then
    # -I: the host's pattern (PAT2, one 64 KiB after the guest's), its first sector S, the
    # guest's sector G and the host's last word H for S; the image expects PAT2 with H at S.
    SEEK2=$((SEEK + PAT_BYTES / BS + 1)) OFF2=$(( (SEEK + PAT_BYTES / BS + 1) * BS ))
    S_LBA=$((OFF2 / 512))
    [ $((OFF2 + PAT_BYTES)) -le $((SIZE_MB << 20)) ] || fail "-I: -z $SIZE_MB leaves no room for the second pattern"
    head -c "$PAT_BYTES" /dev/urandom >"$RUN/pat2.bin" && head -c 512 "$RUN/pat2.bin" >"$RUN/pat2s.bin" &&
        head -c 512 /dev/urandom >"$RUN/g.bin" && head -c 512 /dev/urandom >"$RUN/h.bin" ||
        fail "-I: cannot write the second pattern"
    { cat "$RUN/h.bin"; tail -c +513 "$RUN/pat2.bin"; } >"$RUN/pat2-final.bin"
    { head -c "$OFF2" "$RUN/expected.img"; cat "$RUN/pat2-final.bin"; tail -c +$((OFF2 + PAT_BYTES + 1)) "$RUN/expected.img"; } \
        >"$RUN/expected2.img" && mv "$RUN/expected2.img" "$RUN/expected.img" || fail "-I: cannot write the expected image"
    PAT2_FINAL_MD5=$(md5sum <"$RUN/pat2-final.bin" | cut -d' ' -f1)
fi
EXP_AFTER=$(md5_of "$RUN/expected.img")
rm -f "$RUN/expected.img"
# The guest's budget for reading the whole device (a step that takes longer fails, naming
# it): a minute plus 4 s per MiB, i.e. slower than 256 KiB/s is a failure. Unloaded, a
# 32 MiB read takes 3-6 s; with four TCG guests and two busy loops on two cores, 6-14 s.
READ_BUDGET=$(( 60 + 4 * SIZE_MB ))
# The kernel uses min((mtu - 36) / 512, target's sector count) sectors per frame.
EXP_PAYLOAD=$(( (MTU - 36) / 512 * 512 ))
say "backing file ${SIZE_MB} MiB md5 $H_BEFORE; pattern md5 $PAT_MD5 at byte $OFF"

# ---------------------------------------------------------------- initramfs
IR=$RUN/initramfs
guest_initramfs "$IR"
guest_modules "$IR/lib/modules" virtio_pci virtio_net aoe
say "kernel $(basename "$KDIR") ($KVER), modules: $(tr '\n' ' ' <"$IR/lib/modules/order")"
cp "$PAT" "$IR/pattern.bin"
if [ -n "$BAD" ]; then
    # -B: the guest's one-sector O_DIRECT reader (rd512.c says why busybox dd will not do).
    gcc -static -O2 -o "$IR/rd512" "$(dirname "$0")/rd512.c" || fail "-B: cannot build rd512 (gcc -static; libc6-dev)"
fi
[ "$RELOAD" = 0 ] || cp "$RUN"/pass*.bin "$IR/"
[ -z "$OURS" ] || cp "$RUN/pat2s.bin" "$RUN/g.bin" "$RUN/h.bin" "$IR/"
# The size the guest must see after a resize (-r, -g: 16 MiB more; -S: 8 MiB less), or none.
RESIZE_TO=$( { [ -n "$RBD" ] || [ "$GROW" = 1 ]; } && echo $(( (SIZE_MB + 16) << 20 )) )
[ "$SHRINK" = 0 ] || RESIZE_TO=$(( (SIZE_MB - 8) << 20 ))
cat >"$IR/etc/ki.conf" <<EOF
SHELF=$SHELF
SLOT=$SLOT
MTU=$MTU
BS=$BS
SEEK=$SEEK
RESIZE_TO=$RESIZE_TO
SHRINK=$SHRINK
KILL=$KILL
PAUSE=$PAUSE
AOE_PARAMS="$( [ "$PAUSE" = 1 ] && echo "aoe_deadsecs=$PAUSE_DEADSECS" )"
FULL=$FULL
RELOAD=$RELOAD
RELOAD_PASSES=$RELOAD_PASSES
PAT_COUNT=$((PAT_BYTES / BS))
READ_BUDGET=$READ_BUDGET
BAD_LBA=$BAD_LBA
BAD_COUNT=$BAD_COUNT
CUT_LO=$CUT_LO
CUT_HI=$CUT_HI
SIZE_MB=$SIZE_MB
LARGE=$LARGE
LARGE_LBAS="${LARGE_LBAS:-}"
HANDOVER=$HANDOVER
LINKEV=$LINKEV
STREAM_S=$( if [ -n "$LINKEV" ]; then echo $((LINKEV_AWAY_S + 12)); elif [ -n "$MP" ]; then echo $((MP_DOWN_S + MP_AFTER_S + 2)); else echo 0; fi )
MP=$( [ -n "$MP" ] && echo 1 || echo 0 )
MP_SHARED=$( [ "$MP" = shared ] && echo 1 || echo 0 )
TWO=$( [ -n "$OURS" ] && echo 1 || echo 0 )
S_LBA=${S_LBA:-0}
EOF
cat >"$IR/init" <<'EOF'
#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
. /etc/ki.conf
DEV=/dev/etherd/e$SHELF.$SLOT
SYS="/sys/block/etherd!e$SHELF.$SLOT"
out() { echo "KI:$*"; }
up() { cut -d' ' -f1 /proc/uptime; }
# The host's clock, in seconds: the emulated CMOS RTC follows it (qemu's default -rtc
# clock=host). The guest's own clock can be far off under a loaded host: TSC calibration
# under TCG once put its uptime at 238 s 10 s after qemu's start. Budgets count in this one.
hnow() { cat /sys/class/rtc/rtc0/since_epoch 2>/dev/null || date +%s; }
# step NAME BUDGET: a timestamped line (guest uptime, host clock) before each step, which
# must end within BUDGET seconds of the host's clock (the watchdog below checks); the
# watchdog and die name the step.
step() { h=$(hnow); echo "$1 $h $2" >/tmp/step; out "T $1 $(up) $h"; }
where() { set -- $(cat /tmp/step); echo "$1, $(( $(hnow) - $2 ))s in; uptime $(up)s"; }
# What the guest knows of where it stopped: the device's state, the driver's view of the
# target (debugfs: in flight, window, rtt), its retransmit messages, the blocked tasks.
diag() {
    out "DIAG in step $(where); device state $(cat "$SYS/state" 2>/dev/null)"
    cat "/sys/kernel/debug/aoe/e$SHELF.$SLOT" 2>/dev/null | sed 's/^/KI:DIAG aoe: /'
    out "DIAG $(grep -c . /tmp/err.log 2>/dev/null) driver messages (/dev/etherd/err), the last:"
    tail -n 15 /tmp/err.log 2>/dev/null | sed 's/^/KI:DIAG err: /'
    echo w >/proc/sysrq-trigger 2>/dev/null
    dmesg | tail -n +"$(cat /tmp/dmesg0 2>/dev/null || echo 1)" | tail -n 80 | sed 's/^/KI:DIAG dmesg: /'
}
die() { out "GUEST_FAIL $* (step $(where))"; diag; poweroff -f; sleep 60; }
# The whole device's md5; with -B less the 4 KiB pages [CUT_LO, CUT_HI) (in sectors).
devmd5() {
    if [ "$LARGE" != 0 ]; then
        dd if=$DEV bs=1048576 count="$SIZE_MB" 2>/dev/null | md5sum | cut -d' ' -f1
    elif [ "$BAD_COUNT" = 0 ]; then
        md5sum < $DEV | cut -d' ' -f1
    else
        { dd if=$DEV bs=4096 count=$((CUT_LO / 8)) 2>/dev/null
          dd if=$DEV bs=4096 skip=$((CUT_HI / 8)) 2>/dev/null; } | md5sum | cut -d' ' -f1
    fi
}
# The watchdog: each step within its budget, the whole run before DEADLINE, a time of the
# host's clock GUEST_MARGIN seconds before its timeout (read from the RTC, so the seconds a
# loaded host takes to get the guest's kernel started count too). A step over its budget
# is reported, with diag.
(
    while sleep 1; do
        now=$(hnow)
        set -- $(cat /tmp/step 2>/dev/null)
        [ $# = 3 ] || continue
        if [ "$now" -ge "$DEADLINE" ]; then
            out "GUEST_FAIL guest watchdog: the run's deadline, ${GUEST_MARGIN}s before the host's timeout (step $(where))"
        elif [ $((now - $2)) -gt "$3" ]; then
            out "GUEST_FAIL step $1 took more than its budget of $3 s (step $(where))"
        else
            continue
        fi
        diag; poweroff -f
    done
) &
step boot 60
out "CLOCK $(date +%s) $(hnow)"
for m in $(cat /lib/modules/order); do
    [ "$m" = aoe.ko ] && continue
    insmod /lib/modules/$m || die "insmod $m"
done
i=0; while [ ! -e /sys/class/net/eth0 ]; do i=$((i+1)); [ $i -gt 100 ] && die "no eth0"; sleep 0.1; done
ip link set eth0 mtu "$MTU" || die "cannot set MTU $MTU on eth0"
ip link set eth0 up || die "eth0 up"
# diag prints dmesg from here on (the boot's lines are of no interest).
echo $(( $(dmesg | wc -l) + 1 )) >/tmp/dmesg0
IFL=eth0
if [ "$MP" = 1 ]; then
    # -M: the second path's NIC.
    i=0; while [ ! -e /sys/class/net/eth1 ]; do i=$((i+1)); [ $i -gt 100 ] && die "no eth1"; sleep 0.1; done
    ip link set eth1 mtu "$MTU" && ip link set eth1 up || die "eth1 up (MTU $MTU)"
    IFL=eth0,eth1
fi
insmod /lib/modules/aoe.ko aoe_iflist=$IFL $AOE_PARAMS || die "insmod aoe.ko"
# The driver's messages (retransmits, "down"): only this device reports them.
cat /dev/etherd/err >/tmp/err.log 2>/dev/null &
step discover 90
i=0
while [ ! -b "$DEV" ] || [ "$(cat "$SYS/size" 2>/dev/null || echo 0)" = 0 ]; do
    [ $((i % 20)) = 0 ] && [ -e /dev/etherd/discover ] && echo > /dev/etherd/discover
    i=$((i+1)); [ $i -gt 600 ] && die "$DEV did not appear within 60 s"
    sleep 0.1
done
out "T discovered $(up)"
out "BYTES $(blockdev --getsize64 $DEV)"
out "PAYLOAD $(cat "$SYS/payload" 2>/dev/null)"
out "STATE $(cat "$SYS/state" 2>/dev/null)"
if [ "$MP" = 1 ]; then
    # -M: both targets (one MAC per path) known to the driver before the writes; the
    # debugfs lists a target as MAC:nout:maxout:nframes (%pm: 12 hex digits).
    # -M shared: one target, both NICs in its interfaces (the debugfs line "\teth0,eth1").
    step two_paths 60
    i=0
    until if [ "$MP_SHARED" = 1 ]; then grep -qE 'eth0,eth1|eth1,eth0' "/sys/kernel/debug/aoe/e$SHELF.$SLOT" 2>/dev/null
          else [ "$(grep -cE '^[0-9a-f]{12}:' "/sys/kernel/debug/aoe/e$SHELF.$SLOT" 2>/dev/null)" -ge 2 ]; fi; do
        [ $((i % 20)) = 0 ] && echo > /dev/etherd/discover
        i=$((i + 1)); sleep 0.1
    done
    out "MP_TARGETS $(grep -E '^[0-9a-f]{12}:|^	[a-z]' "/sys/kernel/debug/aoe/e$SHELF.$SLOT" | tr '\n\t' '  ')"
fi
out "DRIVER aoe_deadsecs=$(cat /sys/module/aoe/parameters/aoe_deadsecs 2>/dev/null) aoe_maxout=$(cat /sys/module/aoe/parameters/aoe_maxout 2>/dev/null)"
step md5_before "$READ_BUDGET"
out "MD5_BEFORE $(devmd5)"
if [ "$BAD_COUNT" != 0 ]; then
    # -B: each sector around and in the bad range read alone, past the page cache.
    step bad_scan 120
    s=$((BAD_LBA - 3))
    while [ $s -lt $((BAD_LBA + BAD_COUNT + 3)) ]; do
        if /rd512 $DEV $s >/tmp/sec 2>/tmp/dd.err; then
            out "SECTOR $s $(md5sum </tmp/sec | cut -d' ' -f1)"
        else
            out "SECTOR $s failed: $(tr '\n' ' ' </tmp/dd.err)"
        fi
        s=$((s + 1))
    done
fi
if [ "$RELOAD" != 0 ]; then
    # The host reloads the target's configuration from this line until RELOAD_STOP.
    step reload_writes $((RELOAD + 180))
    out "RELOAD_ME"
    t0=$(hnow) n=0
    while [ $(( $(hnow) - t0 )) -lt "$RELOAD" ] || [ $n -lt "$RELOAD_PASSES" ]; do
        p=$(( n % RELOAD_PASSES + 1 )); n=$((n + 1))
        dd if=/pass$p.bin of=$DEV bs=$BS seek=$SEEK conv=notrunc oflag=direct 2>/tmp/dd.err ||
            { cat /tmp/dd.err; die "pass $n (pass$p.bin, oflag=direct) failed"; }
    done
    out "RELOAD_PASSES_WRITTEN $n in $(( $(hnow) - t0 )) s"
fi
# A hand-over (-H) waits for gateway B to start and for the driver to give up on A.
step pattern_write "$( [ -n "$HANDOVER" ] && echo 180 || echo 60 )"
# -I: the host writes its pattern through our initiator from this line, beside ours.
[ "$TWO" = 0 ] || out "TWO_ME"
if [ "$KILL" = 1 ]; then
    # The host SIGKILLs the target when it reads this line and starts it again 3 s later.
    out "KILL_ME"
    sleep 1
fi
if [ "$PAUSE" = 1 ]; then
    # The host SIGSTOPs the target when it reads this line (it looks twice a second, later
    # on a loaded host): zeros are written over the region 64 KiB at a time, round and
    # round, until one fails; those before the stop are acknowledged, which is fine.
    out "PAUSE_ME"
    step paused_write 120
    n=0
    while dd if=/dev/zero of=$DEV bs=$BS seek=$((SEEK + n % PAT_COUNT)) count=1 conv=notrunc \
            oflag=direct 2>/tmp/dd.err; do
        n=$((n + 1))
        [ $n -gt 1000 ] && die "-P: 1000 writes acknowledged after the target was to be stopped"
    done
    out "PAUSED_WRITE_FAILED after $n acknowledged: $(tr '\n' ' ' </tmp/dd.err) state $(cat "$SYS/state")"
    out "CONT_ME"
    step up_again 60
    i=0
    until [ "$(cut -d, -f1 "$SYS/state")" = up ]; do
        [ $((i % 20)) = 0 ] && echo > /dev/etherd/discover
        i=$((i + 1)); sleep 0.1
    done
    out "UP_AGAIN after $i polls"
    step pattern_write "$( [ -n "$HANDOVER" ] && echo 180 || echo 60 )"
fi
if [ "$FULL" = 1 ]; then
    # One 64 KiB write at a time, up to the first that fails: it must fail (the backing
    # file system is full), and not first or last.
    n=0
    while [ $n -lt "$PAT_COUNT" ] && dd if=/pattern.bin of=$DEV bs=$BS skip=$n seek=$((SEEK + n)) \
            count=1 conv=notrunc oflag=direct 2>/tmp/dd.err; do
        n=$((n + 1))
    done
    [ $n -lt "$PAT_COUNT" ] || die "-F: all $PAT_COUNT pattern writes acknowledged on a full disk"
    [ $n -gt 0 ] || die "-F: the first pattern write failed (want some space left)"
    out "FULL_FAILED_AT $n $(tr '\n' ' ' </tmp/dd.err)"
    # What was acknowledged reads back as written.
    got=$(dd if=$DEV bs=$BS skip=$SEEK count=$n iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    want=$(dd if=/pattern.bin bs=$BS count=$n 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$got" = "$want" ] || die "-F: the $n acknowledged writes read back as $got, not $want"
    out "FULL_ACKED_READBACK $n ok"
    # The host removes the filler when it reads this line; the write is tried until then.
    out "FREE_ME"
    i=0
    until dd if=/pattern.bin of=$DEV bs=$BS seek=$SEEK conv=notrunc oflag=direct 2>/tmp/dd.err; do
        i=$((i + 1)); [ $i -gt 40 ] && { cat /tmp/dd.err; die "-F: the pattern write still fails after the space was freed"; }
        sleep 1
    done
    out "FULL_REWRITTEN after $i failed tries"
elif [ "$KILL" = 2 ]; then
    # -W: one 64 KiB direct write after the other; the host kills the target when it
    # reads KILL_ME, while the following writes stream. With STREAM_S (-N) the pattern is
    # written over and over (the same bytes) until STREAM_S seconds of the host's clock
    # have passed, so that the host's link event falls among the writes.
    n=0 t0=$(hnow)
    while [ $n -lt "$PAT_COUNT" ] || [ $(( $(hnow) - t0 )) -lt "$STREAM_S" ]; do
        [ $n = 2 ] && out "KILL_ME"
        k=$((n % PAT_COUNT))
        dd if=/pattern.bin of=$DEV bs=$BS skip=$k seek=$((SEEK + k)) count=1 conv=notrunc \
                oflag=direct 2>/tmp/dd.err ||
            { cat /tmp/dd.err; die "-W: pattern write $n (oflag=direct) failed"; }
        n=$((n + 1))
    done
    out "STREAM_WRITTEN $n"
    # The driver's "I/O error" lines since the module was loaded (a request failed up to
    # the block layer: the -N and -M modes promise none).
    out "IO_ERRORS $(dmesg | tail -n +"$(cat /tmp/dmesg0)" | grep -c 'I/O error')"
else
    dd if=/pattern.bin of=$DEV bs=$BS seek=$SEEK conv=notrunc oflag=direct 2>/tmp/dd.err ||
        { cat /tmp/dd.err; die "pattern write (oflag=direct) failed"; }
fi
[ "$RELOAD" = 0 ] || out "RELOAD_STOP"
if [ "$TWO" = 1 ]; then
    # -I: S as the host wrote it last, read past every cache (iflag=direct).
    s_is() { [ "$(dd if=$DEV bs=512 skip=$S_LBA count=1 iflag=direct 2>/dev/null | md5sum)" = "$(md5sum <"$1")" ]; }
    # The pattern again and again (the same bytes) until the host's is all there: the host
    # starts after TWO_ME and writes S last, so all of its writes fall while the guest
    # writes (during the first pattern write above, or in this loop).
    step two_host_pattern 120
    n=0
    until s_is /pat2s.bin; do
        dd if=/pattern.bin of=$DEV bs=$BS seek=$SEEK conv=notrunc oflag=direct 2>/tmp/dd.err ||
            { cat /tmp/dd.err; die "-I: pattern write (oflag=direct) beside the host's failed"; }
        n=$((n + 1))
    done
    out "TWO_HOST_SEEN after $n more pattern writes"
    dd if=/g.bin of=$DEV bs=512 seek=$S_LBA count=1 conv=notrunc oflag=direct 2>/tmp/dd.err ||
        { cat /tmp/dd.err; die "-I: the write of G over the host's S failed"; }
    sync
    s_is /g.bin || die "-I: S does not read back as G right after its write"
    out "TWO_OVER"
    step two_host_last 120
    until s_is /h.bin; do sleep 0.2; done
    out "TWO_H_SEEN"
fi
if [ "$LARGE" != 0 ]; then
    # -L: 16 sectors of the pattern (the i-th 8 KiB of it) at each LBA, read back past the
    # page cache; then a write past the end.
    step large 120
    i=0
    for l in $LARGE_LBAS; do
        dd if=/pattern.bin of=$DEV bs=512 skip=$((i * 16)) seek="$l" count=16 conv=notrunc \
                oflag=direct 2>/tmp/dd.err ||
            { cat /tmp/dd.err; die "-L: the write of 16 sectors at $l failed"; }
        got=$(dd if=$DEV bs=512 skip="$l" count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
        want=$(dd if=/pattern.bin bs=512 skip=$((i * 16)) count=16 2>/dev/null | md5sum | cut -d' ' -f1)
        [ "$got" = "$want" ] || die "-L: 16 sectors at $l read back as $got, written $want"
        out "LARGE_PIECE $l ok"
        i=$((i + 1))
    done
    if dd if=/pattern.bin of=$DEV bs=512 seek="$LARGE" count=1 conv=notrunc oflag=direct 2>/tmp/dd.err; then
        die "-L: a write at sector $LARGE (past the end) succeeded"
    fi
    out "LARGE_PAST_END refused: $(tr '\n' ' ' </tmp/dd.err)"
fi
step sync 60
sync
step readback 60
out "READBACK_MD5 $(dd if=$DEV bs=$BS skip=$SEEK count=$PAT_COUNT iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
step drop_caches 60
blockdev --flushbufs $DEV; echo 3 > /proc/sys/vm/drop_caches
step md5_after "$READ_BUDGET"
out "MD5_AFTER $(devmd5)"
if [ -n "$RESIZE_TO" ]; then
    step resize 180
    # RBD mode (-r) or -g: the host resizes the image or file when it reads this line.
    out "RESIZE_ME"
    how=announced i=0
    while [ "$(blockdev --getsize64 $DEV)" != "$RESIZE_TO" ]; do
        i=$((i+1))
        [ $i -gt 300 ] && die "size $(blockdev --getsize64 $DEV) 150 s after rbd resize, want $RESIZE_TO"
        if [ $i -ge 60 ] && [ $((i % 10)) = 0 ]; then
            how=revalidate
            echo "e$SHELF.$SLOT" > /dev/etherd/revalidate
        fi
        sleep 0.5
    done
    out "RESIZED $(blockdev --getsize64 $DEV) $how"
    if [ "$SHRINK" = 1 ]; then
        dd if=$DEV of=/dev/null bs=512 skip=$((RESIZE_TO / 512 - 1)) count=1 iflag=direct 2>/tmp/dd.err ||
            { cat /tmp/dd.err; die "the shrunk device's last sector does not read"; }
        out "MD5_SHRUNK $(md5sum < $DEV | cut -d' ' -f1)"
    fi
fi
step done 60
if [ -n "$HANDOVER" ] || [ "$MP" = 1 ]; then
    # The driver's view of the device's targets (MAC, taint, ...) after the hand-over.
    cat "/sys/kernel/debug/aoe/e$SHELF.$SLOT" 2>/dev/null | sed 's/^/KI:TARGETS /'
fi
out "RETRANSMITS $(grep -c retransmit /tmp/err.log)"
# The driver's messages themselves (a retransmit answered late shows as "unexpected rsp").
head -n 20 /tmp/err.log | sed 's/^ */KI:ERR /'
dmesg | grep -i aoe | sed 's/^/KI:DMESG /'
out GUEST_DONE
poweroff -f
sleep 60
EOF
chmod +x "$IR/init"

# ---------------------------------------------------------------- network
ip netns add "$NS" || fail "ip netns add $NS"
nsx() { nsenter --net="/run/netns/$NS" -- "$@"; }
nsx sh -c 'echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6'
ip -n "$NS" link set lo up
ip -n "$NS" link add kibr type bridge stp_state 0 forward_delay 0 || fail "bridge"
ip -n "$NS" tuntap add dev kitap mode tap || fail "tap"
ip -n "$NS" link add kiport type veth peer name kitgt || fail "veth"
LINKS="kitap kiport kitgt"
if [ -n "$HANDOVER" ]; then
    # -H: gateway B's own port on the bridge, so its own MAC on the segment.
    ip -n "$NS" link add kiport2 type veth peer name kitgt2 || fail "veth kitgt2"
    LINKS="$LINKS kiport2 kitgt2"
    if [ "$HANDOVER" != alone ]; then
        # The host's own port, for the reservation's raw frames.
        ip -n "$NS" link add kiport3 type veth peer name kihost || fail "veth kihost"
        LINKS="$LINKS kiport3 kihost"
    fi
fi
BRIDGES=kibr
if [ "$MP" = shared ]; then
    # -M shared: the guest's second tap on the one bridge.
    ip -n "$NS" tuntap add dev kitap2 mode tap || fail "tap kitap2"
    LINKS="$LINKS kitap2"
elif [ -n "$MP" ]; then
    # -M: the second path, a bridge of its own: the guest's second tap and the target's
    # second veth.
    ip -n "$NS" link add kibr2 type bridge stp_state 0 forward_delay 0 || fail "bridge kibr2"
    ip -n "$NS" tuntap add dev kitap2 mode tap || fail "tap kitap2"
    ip -n "$NS" link add kiport2 type veth peer name kitgt2 || fail "veth kitgt2"
    LINKS="$LINKS kitap2 kiport2 kitgt2"
    BRIDGES="kibr kibr2"
fi
if [ -n "$OURS" ]; then
    # -I: our initiator's own port on the bridge.
    ip -n "$NS" link add kiport4 type veth peer name kiini || fail "veth kiini"
    LINKS="$LINKS kiport4 kiini"
fi
for l in $LINKS $BRIDGES; do ip -n "$NS" link set "$l" mtu "$MTU" || fail "MTU $MTU on $l"; done
for l in $LINKS; do
    [[ $l == kiport* || $l == kitap* ]] || continue
    br=kibr
    [ -n "$MP" ] && [ "$MP" != shared ] && [[ $l == kiport2 || $l == kitap2 ]] && br=kibr2
    ip -n "$NS" link set "$l" master "$br" || fail "bridge port $l"
done
for l in $BRIDGES $LINKS; do ip -n "$NS" link set "$l" up || fail "$l up"; done

# ---------------------------------------------------------------- Ceph (-r only)
CEPH_CONF="" CEPH_KEYRING="" TFILE=$FILE
if [ -n "$RBD" ]; then
    say "RBD mode: one-node Ceph cluster in the namespace, rbd import of the data as $RBD"
    nsx bash "$CEPH_UP" "$RUN/ceph" >"$RUN/ceph-up.log" 2>&1 ||
        { cat "$RUN/ceph-up.log"; fail "ceph-up.sh failed"; }
    CEPH_CONF=$RUN/ceph/ceph.conf
    CEPH_KEYRING=$RUN/ceph/ceph.client.admin.keyring
    rbdx() { nsx timeout -k 5 300 rbd -c "$CEPH_CONF" "$@"; }
    if [[ $RBD == */*/* ]]; then
        rbdx namespace create "${RBD%/*}" >/dev/null 2>&1 || fail "rbd namespace create ${RBD%/*}"
    fi
    rbdx import --no-progress "$FILE" "$RBD" >"$RUN/rbd.log" 2>&1 ||
        { cat "$RUN/rbd.log"; fail "rbd import into $RBD failed"; }
    # From here the host side of every check is `rbd export`, never this file.
    mv "$FILE" "$RUN/seed.img"
    TFILE=rbd:$RBD
fi

# ---------------------------------------------------------------- bad range (-B only)
if [ -n "$BAD" ]; then
    # The file through nbdkit's eval plugin (one shell per request: reads overlapping the
    # range fail with EIO, the rest and every write go to the file) and nbdfuse, whose
    # mount shows it as $RUN/bad/nbd. Unmounted by cleanup.
    mkdir "$RUN/bad" || fail "-B: mkdir $RUN/bad"
    b0=$((BAD_LBA * 512)) b1=$(( (BAD_LBA + BAD_COUNT) * 512 ))
    nbdfuse "$RUN/bad" --command nbdkit -s eval \
        get_size="echo $(stat -c %s "$FILE")" can_write='exit 0' can_flush='exit 0' \
        flush="sync $FILE" \
        pread="if [ \$4 -lt $b1 ] && [ \$((\$4 + \$3)) -gt $b0 ]; then echo \"EIO bad range: \$3 bytes at \$4\" >&2; exit 1; fi
exec dd if=$FILE skip=\$4 count=\$3 iflag=skip_bytes,count_bytes status=none" \
        pwrite="exec dd of=$FILE seek=\$4 oflag=seek_bytes conv=notrunc status=none" \
        >"$RUN/nbdfuse.log" 2>&1 &
    i=0
    until [ -e "$RUN/bad/nbd" ]; do
        i=$((i + 1)); [ $i -gt 100 ] && { cat "$RUN/nbdfuse.log"; fail "-B: nbdfuse did not mount $RUN/bad"; }
        sleep 0.1
    done
    TFILE=$RUN/bad/nbd
    say "-B: sectors $BAD_LBA..$((BAD_LBA + BAD_COUNT - 1)) fail reads in $TFILE (nbdkit eval, nbdfuse)"
fi

# ---------------------------------------------------------------- target
TCMD=${TEMPLATE//\{SHELF\}/$SHELF}
TCMD=${TCMD//\{SLOT\}/$SLOT}
TCMD=${TCMD//\{IFACE\}/kitgt}
TCMD=${TCMD//\{FILE\}/$TFILE}
TCMD=${TCMD//\{CEPH_CONF\}/$CEPH_CONF}
TCMD=${TCMD//\{CEPH_KEYRING\}/$CEPH_KEYRING}
# {CONFIG}: the export as a configuration file. write_config K writes variant K (-R): the
# export's buffer_count 16 + K % 2 (each reload reopens it), a second export (slot+1, a file
# of its own) in variants 2, 3, 6, 7, ...
CONF=$RUN/serve.toml
# -M: the export on both paths' interfaces.
CONF_IFACES='"kitgt"'
[ -z "$MP" ] || [ "$MP" = shared ] || CONF_IFACES='"kitgt", "kitgt2"'
write_config() {
    local k=$1
    {
        printf 'probe_ms = 0\n\n[[export]]\npath = "%s"\nshelf = %s\nslot = %s\ninterfaces = [%s]\nbuffer_count = %s\n' \
            "$TFILE" "$SHELF" "$SLOT" "$CONF_IFACES" $((16 + k % 2))
        if [ $(( k / 2 % 2 )) = 1 ]; then
            printf '\n[[export]]\npath = "%s"\nshelf = %s\nslot = %s\ninterfaces = ["kitgt"]\n' \
                "$RUN/extra.img" "$SHELF" $((SLOT + 1))
        fi
    } >"$CONF.new" && mv "$CONF.new" "$CONF"
}
if [[ $TEMPLATE == *'{CONFIG}'* ]]; then
    truncate -s 8M "$RUN/extra.img" || fail "cannot make $RUN/extra.img"
    write_config 0 || fail "cannot write $CONF"
fi
TCMD=${TCMD//\{CONFIG\}/$CONF}
# -H: gateway B, the same template on kitgt2 (its own MAC); for "alone" at slot+1, so that
# nobody serves the guest's address once A is fenced.
TCMD_B=${TEMPLATE//\{SHELF\}/$SHELF}
TCMD_B=${TCMD_B//\{SLOT\}/$( [ "$HANDOVER" = alone ] && echo $((SLOT + 1)) || echo "$SLOT" )}
TCMD_B=${TCMD_B//\{IFACE\}/kitgt2}
TCMD_B=${TCMD_B//\{FILE\}/$TFILE}
TCMD_B=${TCMD_B//\{CEPH_CONF\}/$CEPH_CONF}
TCMD_B=${TCMD_B//\{CEPH_KEYRING\}/$CEPH_KEYRING}
# start_b: gateway B in the background, its log in target-b.log.
start_b() {
    nsenter --net="/run/netns/$NS" -- setsid bash -c "exec $TCMD_B" >>"$RUN/target-b.log" 2>&1 </dev/null &
    B_PID=$!
}
# reloads_done: "configuration reloaded" lines in the target's log.
reloads_done() { grep -c 'configuration reloaded' "$RUN/target.log"; }
say "target: $TCMD"
# setsid: the target leads its own process group, so stop() reaches any children too.
# nsenter and setsid exec without forking (setsid: we are not a group leader), so $! is the
# target's pid and its process group id.
nsenter --net="/run/netns/$NS" -- setsid bash -c "exec $TCMD" >"$RUN/target.log" 2>&1 </dev/null &
TARGET_PID=$!
sleep 1
kill -0 "$TARGET_PID" 2>/dev/null || { cat "$RUN/target.log"; TARGET_PID=""; fail "target exited at start"; }
if [ -n "$MP" ] && [ "$MP" != shared ] && [[ $TEMPLATE != *'{CONFIG}'* ]]; then
    # -M without {CONFIG}: a second process of the template on kitgt2, the same file.
    start_b
    sleep 1
    kill -0 "$B_PID" 2>/dev/null || { cat "$RUN/target-b.log"; B_PID=""; fail "-M: the second target (on kitgt2) exited at start"; }
    say "-M: a second target on kitgt2 (pid $B_PID): $TCMD_B"
fi
# mp_rx: the frames received so far on the two paths' interfaces, as "N1 N2" (-M; ip
# netns exec mounts the namespace's own /sys): the target's (kitgt, kitgt2), or with
# -M shared the guest's taps (kitap, kitap2: what the guest sent on eth0 and eth1).
MP_IFS="kitgt kitgt2"
[ "$MP" != shared ] || MP_IFS="kitap kitap2"
mp_rx() {
    # shellcheck disable=SC2086
    ip netns exec "$NS" sh -c 'for l in "$@"; do printf "%s " "$(cat /sys/class/net/$l/statistics/rx_packets)"; done' - $MP_IFS
}
if [ -n "$OURS" ]; then
    mkdir -p "$RUN/ours"
    OURS_DEV=$RUN/ours/e$SHELF.$SLOT
    nsenter --net="/run/netns/$NS" -- setsid "$OURS" initiator --root "$RUN/ours" --iflist kiini \
        >"$RUN/ours.log" 2>&1 </dev/null &
    OURS_PID=$!
    i=0
    until [ "$(stat -c %s "$OURS_DEV" 2>/dev/null || echo 0)" = $((SIZE_MB << 20)) ]; do
        kill -0 "$OURS_PID" 2>/dev/null || { cat "$RUN/ours.log"; OURS_PID=""; fail "-I: our initiator exited at start"; }
        i=$((i + 1)); [ $i -gt 120 ] && { tail -20 "$RUN/ours.log"; fail "-I: $OURS_DEV not there with $((SIZE_MB << 20)) bytes 60 s after our initiator's start"; }
        sleep 0.5
    done
    say "-I: our initiator (pid $OURS_PID) serves $OURS_DEV on kiini"
fi
# ours_dd ARGS: dd on our initiator's device file (-I), bounded in time.
ours_dd() { timeout -k 5 120 dd "$@" 2>>"$RUN/ours-dd.err"; }

# raw_aoe IFACE reserve MAC | write LBA: one AoE request from IFACE (broadcast, to
# e$SHELF.$SLOT), retried once a second for 10 s until answered; prints the answer as
# "MAC ERROR_FLAG AOE_ERROR" (-H: the reservation across the hand-over). reserve sets the
# reserve list to MAC (RCmd 1); write is one sector of 0xee at LBA (WRITE SECTORS EXT).
raw_aoe() {
    nsx python3 -c 'import os, socket, struct, sys, time
ifn, what, arg, shelf, slot = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88a2))
s.bind((ifn, 0x88a2)); s.settimeout(1.0)
src = s.getsockname()[4]
tag = 0x80000000 | (os.getpid() & 0xffffff)
if what == "reserve":
    cmd, body = 3, struct.pack("!BB", 1, 1) + bytes.fromhex(arg.replace(":", ""))
else:
    lba = int(arg)
    cmd, body = 0, struct.pack("<BBBB6sH", 0x41, 0, 1, 0x34, lba.to_bytes(6, "little"), 0) + b"\xee" * 512
frame = b"\xff" * 6 + src + struct.pack("!HBBHBBI", 0x88a2, 0x10, 0, shelf, slot, cmd, tag) + body
frame += b"\0" * max(0, 60 - len(frame))
for _ in range(10):
    s.send(frame)
    end = time.time() + 1.0
    while time.time() < end:
        try:
            r = s.recv(9000)
        except socket.timeout:
            break
        if len(r) >= 24 and r[12:14] == b"\x88\xa2" and r[14] & 0x08 and struct.unpack("!I", r[20:24])[0] == tag:
            print(r[6:12].hex(), int(bool(r[14] & 0x04)), r[15]); sys.exit(0)
sys.exit(1)' "$@" "$SHELF" "$SLOT"
}
GUEST_MAC=52:54:00:ae:0e:01
if [ -n "$HANDOVER" ] && [ "$HANDOVER" != alone ]; then
    rsv=$(raw_aoe kihost reserve "$GUEST_MAC") || { diagnose_host; fail "-H: no answer from gateway A to the Reserve"; }
    [ "$(echo "$rsv" | cut -d' ' -f2)" = 0 ] || fail "-H: gateway A refused the Reserve: $rsv"
    say "-H: e$SHELF.$SLOT reserved for the guest ($GUEST_MAC) through gateway A ($(echo "$rsv" | cut -d' ' -f1)); image metadata aoe.reserve: $(rbdx image-meta get "$RBD" aoe.reserve 2>&1)"
fi
if [ "$HANDOVER" = idle ]; then
    start_b
    say "-H idle: gateway B (pid $B_PID) started on kitgt2 while A serves, idle"
    i=0
    until grep -q 'e[0-9.]*: exporting' "$RUN/target-b.log"; do
        kill -0 "$B_PID" 2>/dev/null || { cat "$RUN/target-b.log"; B_PID=""; fail "-H idle: gateway B exited at start"; }
        i=$((i + 1)); [ $i -gt 240 ] && { diagnose_host; cat "$RUN/target-b.log"; fail "-H idle: gateway B not serving 120 s after its start"; }
        sleep 0.5
    done
    say "-H idle: gateway B serves, $((i / 2)) s after its start; $(grep -c 'waiting for it to stop' "$RUN/target-b.log") probe-wait line(s) in its log"
fi

# ---------------------------------------------------------------- guest
# The guest's watchdog: the host's timeout less its margin, in the host's clock.
DEADLINE=$(( T0 + TOTAL - GUEST_MARGIN ))
WATCHDOG=$(( DEADLINE - $(date +%s) ))
[ "$WATCHDOG" -ge 60 ] || fail "-T $TOTAL leaves the guest ${WATCHDOG}s after the setup; give more"
printf 'DEADLINE=%s\nGUEST_MARGIN=%s\n' "$DEADLINE" "$GUEST_MARGIN" >>"$IR/etc/ki.conf"
INITRD=$RUN/initramfs.cpio.gz
guest_initramfs_pack "$IR" "$INITRD"
say "booting the guest (qemu TCG, MTU $MTU, guest watchdog ${WATCHDOG}s)"
# setsid, as for the target: timeout(1) signals its whole process group, and the guest is
# stopped by cleanup, after the diagnostics (so they see it running). no_timer_check: under
# TCG at load the guest's timer interrupt can miss the kernel's boot-time check, which then
# panics ("IO-APIC + timer doesn't work!"; power-loss.sh's guest, load 12, session 34).
nsenter --net="/run/netns/$NS" -- setsid qemu-system-x86_64 -nographic -no-reboot -accel tcg -cpu max -smp 1 -m 256 \
    -kernel "$KDIR/vmlinuz" -initrd "$INITRD" \
    -append "console=ttyS0 quiet loglevel=4 panic=-1 rdinit=/init no_timer_check" \
    -netdev tap,id=n0,ifname=kitap,script=no,downscript=no \
    -device virtio-net-pci,netdev=n0,mac=$GUEST_MAC,romfile= \
    $( [ -n "$MP" ] && echo "-netdev tap,id=n1,ifname=kitap2,script=no,downscript=no -device virtio-net-pci,netdev=n1,mac=52:54:00:ae:0e:02,romfile=" ) \
    </dev/null >"$CONSOLE" 2>&1 &
QEMU_PID=$!
QEMU_T0=$(date +%s)
# Until the guest's init runs, its own watchdog cannot: the host gives the kernel's boot
# BOOT_BUDGET seconds (it takes 3-8 s here, 23 s at worst with four guests and two busy loops
# on two cores). In RBD mode the guest asks for the resize once its data checks are done.
BOOT_BUDGET=180
booted=0 resized=0 killed=0 freed=0 paused=0 conted=0 two=0 over=0
# -R: reloads sent, when the last was sent, and how many were done when the guest stopped.
reloads_sent=0 reload_t=0 reloads_during=""
while kill -0 "$QEMU_PID" 2>/dev/null; do
    if [ $booted = 0 ]; then
        if grep -q 'KI:T boot' "$CONSOLE"; then
            booted=1
            sleep 0.5 # for its CLOCK line
            g_up=$(tr -d '\r' <"$CONSOLE" | sed -n 's/^.*KI:T boot \([^ ]*\).*/\1/p')
            read -r g_clock g_rtc < <(tr -d '\r' <"$CONSOLE" | sed -n 's/^.*KI:CLOCK //p')
            say "guest init started $(( $(date +%s) - QEMU_T0 ))s after qemu (guest uptime ${g_up}s; its clock $(( ${g_clock:-0} - $(date +%s) ))s off ours, its RTC $(( ${g_rtc:-0} - $(date +%s) ))s)"
        elif [ $(( $(date +%s) - QEMU_T0 )) -gt $BOOT_BUDGET ]; then
            diagnose
            fail "the guest's kernel did not start its init within ${BOOT_BUDGET}s of qemu's start (console above)"
        fi
    fi
    if [ -n "$RBD" ] && [ $resized = 0 ] && grep -q 'KI:RESIZE_ME' "$CONSOLE"; then
        rbdx resize --no-progress --size $((SIZE_MB + 16))M "$RBD" >"$RUN/rbd.log" 2>&1 ||
            { cat "$RUN/rbd.log"; fail "rbd resize of $RBD failed"; }
        say "rbd resize of $RBD to $((SIZE_MB + 16)) MiB"
        resized=1
    fi
    if [ "$GROW" = 1 ] && [ $resized = 0 ] && grep -q 'KI:RESIZE_ME' "$CONSOLE"; then
        truncate -s +16M "$FILE" || fail "truncate -s +16M $FILE failed"
        kill -HUP "$TARGET_PID" 2>/dev/null || fail "SIGHUP to the target failed"
        say "backing file grown to $(( SIZE_MB + 16 )) MiB; SIGHUP sent to the target"
        resized=1
    fi
    if [ "$RELOAD" != 0 ] && [ -z "$reloads_during" ] && grep -q 'KI:RELOAD_ME' "$CONSOLE"; then
        if grep -q 'KI:RELOAD_STOP' "$CONSOLE"; then
            reloads_during=$(reloads_done)
            say "the guest's writes are done: $reloads_during reloads done, $reloads_sent sent while it wrote"
        elif [ "$(reloads_done)" -ge "$reloads_sent" ]; then
            reloads_sent=$((reloads_sent + 1)) reload_t=$(date +%s)
            write_config "$reloads_sent" || fail "cannot write $CONF"
            kill -HUP "$TARGET_PID" 2>/dev/null || fail "SIGHUP to the target failed"
        elif [ $(( $(date +%s) - reload_t )) -gt 20 ]; then
            diagnose
            fail "reload $reloads_sent not done 20 s after its SIGHUP"
        fi
    fi
    if [ -n "$OURS" ] && [ $two = 0 ] && grep -q 'KI:TWO_ME' "$CONSOLE"; then
        # -I: PAT2 but its first sector S, then S: each 64 KiB piece acknowledged (O_DIRECT)
        # and flushed (fsync, a FLUSH CACHE EXT) before the next; in the background, beside
        # the guest's writes.
        (
            ours_dd if="$RUN/pat2.bin" of="$OURS_DEV" bs=512 skip=1 seek=$((S_LBA + 1)) count=127 conv=notrunc,fsync oflag=direct &&
            for k in $(seq 1 $((PAT_BYTES / BS - 1))); do
                ours_dd if="$RUN/pat2.bin" of="$OURS_DEV" bs=$BS skip=$k seek=$((SEEK2 + k)) count=1 conv=notrunc,fsync oflag=direct || exit 1
            done &&
            ours_dd if="$RUN/pat2s.bin" of="$OURS_DEV" bs=512 seek=$S_LBA count=1 conv=notrunc,fsync oflag=direct
            echo $? >"$RUN/two.rc"
        ) &
        say "-I: the host writes its pattern through our initiator (byte $OFF2), beside the guest's"
        two=1
    fi
    if [ -n "$OURS" ] && [ $over = 0 ] && grep -q 'KI:TWO_OVER' "$CONSOLE"; then
        # -I: the guest's G, acknowledged after our S, is what ours reads; then our H over it.
        ours_dd if="$OURS_DEV" of="$RUN/s-read.bin" bs=512 skip=$S_LBA count=1 iflag=direct
        if cmp -s "$RUN/s-read.bin" "$RUN/g.bin"; then TWO_SAW_G=yes; else TWO_SAW_G=no; fi
        ours_dd if="$RUN/h.bin" of="$OURS_DEV" bs=512 seek=$S_LBA count=1 conv=notrunc,fsync oflag=direct
        TWO_H_RC=$?
        say "-I: ours read S after the guest's write: G $TWO_SAW_G; wrote H over it (dd status $TWO_H_RC)"
        over=1
    fi
    if [ "$FULL" = 1 ] && [ $freed = 0 ] && grep -q 'KI:FREE_ME' "$CONSOLE"; then
        rm -f "$RUN/full/filler" || fail "-F: cannot remove the filler"
        say "-F: filler removed, $(df -k --output=avail "$RUN/full" | tail -1 | tr -d ' ') KiB free"
        freed=1
    fi
    if [ "$SHRINK" = 1 ] && [ $resized = 0 ] && grep -q 'KI:RESIZE_ME' "$CONSOLE"; then
        stop "-$TARGET_PID"
        wait "$TARGET_PID" 2>/dev/null
        # What the guest wrote, for the checks below; the target then serves the rest.
        cp "$FILE" "$RUN/before-shrink.img" || fail "-S: cannot copy $FILE"
        truncate -s $(( (SIZE_MB - 8) << 20 )) "$FILE" || fail "-S: truncate of $FILE failed"
        nsenter --net="/run/netns/$NS" -- setsid bash -c "exec $TCMD" >>"$RUN/target.log" 2>&1 </dev/null &
        TARGET_PID=$!
        say "-S: target stopped, backing file cut to $(( SIZE_MB - 8 )) MiB, target started again (pid $TARGET_PID)"
        resized=1
    fi
    if [ "$HANDOVER" = alone ] && [ $paused = 0 ] && grep -q 'KI:PAUSE_ME' "$CONSOLE"; then
        start_b
        say "-H alone: gateway B (pid $B_PID) started at e$SHELF.$((SLOT + 1)) on kitgt2: it breaks A's lock; nobody serves e$SHELF.$SLOT once A is fenced"
        paused=1
    fi
    if [ "$HANDOVER" = alone ] && [ $conted = 0 ] && grep -q 'KI:CONT_ME' "$CONSOLE"; then
        grep -q "lost the image's exclusive lock" "$RUN/target.log" ||
            { diagnose; fail "-H alone: the guest's write failed but gateway A never said it lost the lock"; }
        stop "-$B_PID"; wait "$B_PID" 2>/dev/null; B_PID=""
        stop "-$TARGET_PID"; wait "$TARGET_PID" 2>/dev/null
        nsenter --net="/run/netns/$NS" -- setsid bash -c "exec $TCMD" >>"$RUN/target.log" 2>&1 </dev/null &
        TARGET_PID=$!
        say "-H alone: B and the fenced A stopped, A started again (pid $TARGET_PID): it takes the lock back"
        conted=1
    fi
    if [ -z "$HANDOVER" ] && [ "$PAUSE" = 1 ] && [ $paused = 0 ] && grep -q 'KI:PAUSE_ME' "$CONSOLE"; then
        kill -STOP -- "-$TARGET_PID" || fail "-P: SIGSTOP to the target failed"
        say "-P: target stopped (SIGSTOP)"
        paused=1
    fi
    if [ -z "$HANDOVER" ] && [ "$PAUSE" = 1 ] && [ $conted = 0 ] && grep -q 'KI:CONT_ME' "$CONSOLE"; then
        kill -CONT -- "-$TARGET_PID" || fail "-P: SIGCONT to the target failed"
        say "-P: target continued (SIGCONT)"
        conted=1
    fi
    if [ "$OSDKILL" = 1 ] && [ $killed = 0 ] && grep -q 'KI:KILL_ME' "$CONSOLE"; then
        osd=$(cat "$RUN/ceph/osd.pid")
        kill -KILL "$osd" 2>/dev/null || fail "-O: cannot kill the OSD (pid $osd)"
        say "-O: OSD (pid $osd) SIGKILLed; starting it again in ${OSD_DOWN_S} s"
        sleep "$OSD_DOWN_S"
        nsx ceph-osd -c "$CEPH_CONF" -i 0 -f >>"$RUN/ceph/log/osd.out" 2>&1 &
        echo $! >"$RUN/ceph/osd.pid"
        say "-O: OSD started again (pid $(cat "$RUN/ceph/osd.pid"))"
        killed=1
    fi
    if [ -n "$HANDOVER" ] && [ "$KILL" != 0 ] && [ $killed = 0 ] && grep -q 'KI:KILL_ME' "$CONSOLE"; then
        if [ "$HANDOVER" = replace ]; then
            kill -KILL -- "-$TARGET_PID" 2>/dev/null
            wait "$TARGET_PID" 2>/dev/null
            start_b
            say "-H replace: gateway A SIGKILLed, gateway B (pid $B_PID) started on kitgt2"
            TARGET_PID=$B_PID B_PID=""
        else
            start_b
            say "-H move: gateway B (pid $B_PID) started on kitgt2 while A serves"
        fi
        killed=1
    fi
    if [ -n "$LINKEV" ] && [ $killed = 0 ] && grep -q 'KI:KILL_ME' "$CONSOLE"; then
        case $LINKEV in
            mtu) ip -n "$NS" link set kitgt mtu 1500 ;;
            mac) ip -n "$NS" link set kitgt address 02:00:00:00:33:16 ;;
            recreate)
                ip -n "$NS" link del kitgt
                ip -n "$NS" link add kiport type veth peer name kitgt &&
                    ip -n "$NS" link set kiport mtu "$MTU" && ip -n "$NS" link set kitgt mtu "$MTU" &&
                    ip -n "$NS" link set kiport master kibr && ip -n "$NS" link set kiport up &&
                    ip -n "$NS" link set kitgt up ;;
            rename)
                ip -n "$NS" link set kitgt name kitgtR && sleep "$LINKEV_AWAY_S" &&
                    ip -n "$NS" link set kitgtR name kitgt ;;
            netns)
                ip netns add "$NS_AWAY" && ip -n "$NS" link set kitgt netns "$NS_AWAY" &&
                    sleep "$LINKEV_AWAY_S" && ip -n "$NS_AWAY" link set kitgt netns "$NS" &&
                    ip -n "$NS" link set kitgt mtu "$MTU" && ip -n "$NS" link set kitgt up ;;
        esac || fail "-N $LINKEV: the link event failed"
        # The event must have fallen among the writes: the guest still streaming.
        grep -q 'KI:STREAM_WRITTEN' "$CONSOLE" &&
            fail "-N $LINKEV: the guest's stream of writes ended before the link event was done (not mid-stream)"
        say "-N $LINKEV: done on kitgt mid-stream"
        killed=1
    fi
    if [ -n "$MP" ] && [ $killed = 0 ] && grep -q 'KI:KILL_ME' "$CONSOLE"; then
        mp_link=$( [ "$MP" = target ] && echo kitgt2 || echo kitap2 )
        mp_at_cut=$(mp_rx)
        ip -n "$NS" link set "$mp_link" down || fail "-M: cannot set $mp_link down"
        say "-M $MP: $mp_link down for ${MP_DOWN_S}s mid-stream (rx $MP_IFS: $mp_at_cut)"
        sleep "$MP_DOWN_S"
        mp_at_back=$(mp_rx)
        ip -n "$NS" link set "$mp_link" up || fail "-M: cannot set $mp_link up"
        mp_back_t=$(date +%s)
        grep -q 'KI:STREAM_WRITTEN' "$CONSOLE" &&
            fail "-M $MP: the guest's stream of writes ended before $mp_link was back (not mid-stream)"
        say "-M $MP: $mp_link up again (rx $MP_IFS: $mp_at_back)"
        killed=1
    fi
    if [ -n "$MP" ] && [ $killed = 1 ] && [ -z "${mp_at_10:-}" ] && [ $(( $(date +%s) - mp_back_t )) -ge 10 ]; then
        mp_at_10=$(mp_rx)
        grep -q 'KI:STREAM_WRITTEN' "$CONSOLE" &&
            fail "-M $MP: the guest's stream of writes ended within 10 s of $mp_link's return"
        say "-M $MP: 10 s after the return (rx $MP_IFS: $mp_at_10)"
    fi
    if [ -n "$MP" ] && [ -n "${mp_at_10:-}" ] && [ -z "${mp_at_end:-}" ] && grep -q 'KI:STREAM_WRITTEN' "$CONSOLE"; then
        mp_at_end=$(mp_rx)
        say "-M $MP: the guest's writes done (rx $MP_IFS: $mp_at_end)"
    fi
    if [ -z "$MP" ] && [ -z "$LINKEV" ] && [ -z "$HANDOVER" ] && [ "$OSDKILL" = 0 ] && [ "$KILL" != 0 ] && [ $killed = 0 ] && grep -q 'KI:KILL_ME' "$CONSOLE"; then
        kill -KILL -- "-$TARGET_PID" 2>/dev/null
        wait "$TARGET_PID" 2>/dev/null
        say "target SIGKILLed; starting it again in 3 s"
        sleep 3
        nsenter --net="/run/netns/$NS" -- setsid bash -c "exec $TCMD" >>"$RUN/target.log" 2>&1 </dev/null &
        TARGET_PID=$!
        say "target started again (pid $TARGET_PID)"
        killed=1
    fi
    sleep 0.5
done
wait "$QEMU_PID"
QRC=$?
QEMU_PID=""
say "guest finished (qemu exit status $QRC) $(( $(date +%s) - QEMU_T0 ))s after qemu's start"
# A guest that failed: the target's side while it still runs (the guest's is printed below).
# One that finished: the target's own account of the run (aoe serve), printed below.
if ! grep -q 'KI:GUEST_DONE' "$CONSOLE"; then
    diagnose_host
elif [ -S "/run/aoe/serve-$TARGET_PID.sock" ]; then
    { target_ctl status; target_ctl stats; } >"$RUN/target-ctl.txt"
fi

kill -0 "$TARGET_PID" 2>/dev/null || { echo "### target log:"; cat "$RUN/target.log"; fail "target died during the run"; }
OURS_SAW_PAT=""
if [ -n "$OURS" ]; then
    # -I: the guest's pattern as ours reads it (the target still serves), then ours stops.
    OURS_SAW_PAT=$(ours_dd if="$OURS_DEV" bs=$BS skip="$SEEK" count=$((PAT_BYTES / BS)) iflag=direct | md5sum | cut -d' ' -f1)
    kill -0 "$OURS_PID" 2>/dev/null || { tail -30 "$RUN/ours.log"; OURS_PID=""; fail "-I: our initiator died during the run"; }
    stop "-$OURS_PID"; wait "$OURS_PID" 2>/dev/null; OURS_PID=""
fi
RESERVED_WRITE=""
if [ -n "$HANDOVER" ] && [ "$HANDOVER" != alone ] && grep -q 'KI:GUEST_DONE' "$CONSOLE"; then
    # Another host's write through the gateway that took over: refused by the reservation
    # made through A (at LBA 8, inside the md5 checks: it must not land).
    RESERVED_WRITE=$(raw_aoe kihost write 8) || RESERVED_WRITE="no answer"
    say "-H: a write from kihost's MAC after the hand-over: answered by $RESERVED_WRITE (MAC, error flag, AoE error)"
fi
if [ -n "$B_PID" ]; then
    kill -0 "$B_PID" 2>/dev/null || { echo "### gateway B's log:"; cat "$RUN/target-b.log"; fail "gateway B died during the run"; }
    stop "-$B_PID"
    wait "$B_PID" 2>/dev/null
    B_PID=""
fi
stop "-$TARGET_PID"
wait "$TARGET_PID" 2>/dev/null
TARGET_PID=""

# The target has stopped (and flushed): what the image holds now is what `rbd export` says.
if [ -n "$RBD" ]; then
    rbdx export --no-progress "$RBD" "$FILE" >"$RUN/rbd.log" 2>&1 ||
        { cat "$RUN/rbd.log"; fail "rbd export of $RBD failed"; }
    say "rbd export of $RBD: $(stat -c %s "$FILE") bytes"
    [ "$(stat -c %s "$FILE")" = $(( (SIZE_MB + 16) << 20 )) ] ||
        fail "rbd export of $RBD has $(stat -c %s "$FILE") bytes, not the $((SIZE_MB + 16)) MiB it was resized to"
    # The checks below are on the original extent.
    truncate -s $((SIZE_MB << 20)) "$FILE"
elif [ "$SHRINK" = 1 ]; then
    [ "$(stat -c %s "$FILE")" = $(( (SIZE_MB - 8) << 20 )) ] ||
        fail "-S: the backing file has $(stat -c %s "$FILE") bytes, not $((SIZE_MB - 8)) MiB"
    H_SHRUNK=$(md5sum <"$FILE" | cut -d' ' -f1)
    cmp -s "$FILE" <(head -c $(( (SIZE_MB - 8) << 20 )) "$RUN/before-shrink.img") ||
        fail "-S: the shrunk file is not the start of the file before the shrink"
    # The checks below are on the file as the guest left it before the shrink.
    FILE=$RUN/before-shrink.img
elif [ "$GROW" = 1 ]; then
    [ "$(stat -c %s "$FILE")" = $(( (SIZE_MB + 16) << 20 )) ] ||
        fail "the backing file has $(stat -c %s "$FILE") bytes, not the $((SIZE_MB + 16)) MiB it was grown to"
    truncate -s $((SIZE_MB << 20)) "$FILE"
fi

# ---------------------------------------------------------------- verdict
g() { tr -d '\r' <"$CONSOLE" | sed -n "s/^.*KI:$1 //p" | tail -1; }
H_REGION=$(dd if="$FILE" bs=$BS skip="$SEEK" count=$((PAT_BYTES / BS)) 2>/dev/null | md5sum | cut -d' ' -f1)
H_AFTER=$(md5_of "$FILE")
echo "### guest:"
tr -d '\r' <"$CONSOLE" | grep 'KI:' | sed 's/^.*KI:/    /'
[ -n "$RBD" ] && echo "### host side: \`rbd export $RBD\`"
echo "### host: size $((SIZE_MB << 20)) md5 before $H_BEFORE, pattern $PAT_MD5 at $OFF, region now $H_REGION,"
echo "###       md5 after $H_AFTER (expected $EXP_AFTER); expected payload $EXP_PAYLOAD"
echo "### target log (tail):"
tail -n 5 "$RUN/target.log" | sed 's/^/    /'
if [ -s "$RUN/target-ctl.txt" ]; then
    echo "### target status and counters after the guest finished:"
    cat "$RUN/target-ctl.txt"
fi
echo "### total $(( $(date +%s) - T0 ))s"

if grep -q 'KI:GUEST_FAIL' "$CONSOLE"; then
    echo "### guest console (tail, other lines):"
    tr -d '\r' <"$CONSOLE" | grep -v 'KI:' | tail -n 15 | sed 's/^/    /'
    fail "guest: $(g GUEST_FAIL)"
fi
grep -q 'KI:GUEST_DONE' "$CONSOLE" || { tr -d '\r' <"$CONSOLE" | tail -n 30; fail "guest did not finish (qemu exit status $QRC)"; }
WANT_BYTES=$((SIZE_MB << 20))
[ "$LARGE" = 0 ] || WANT_BYTES=$((LARGE * 512))
[ "$(g BYTES)" = "$WANT_BYTES" ] || fail "guest device size $(g BYTES) != backing file size $WANT_BYTES"
[ "$(g PAYLOAD)" = "$EXP_PAYLOAD" ] || fail "guest payload $(g PAYLOAD) bytes per frame != $EXP_PAYLOAD (what MTU $MTU allows)"
[ "$(g MD5_BEFORE)" = "$H_BEFORE" ] || fail "whole-device md5 in the guest $(g MD5_BEFORE) != backing file $H_BEFORE"
if [ "$RELOAD" != 0 ]; then
    echo "### reloads: $(grep -c 'configuration reloaded' "$RUN/target.log") done in all, ${reloads_during:-?} while the guest wrote; $(grep -c 'retiring' "$RUN/target.log") retiring lines; $(g RELOAD_PASSES_WRITTEN)"
    if [ "$H_REGION" != "$PAT_MD5" ]; then
        # Which pass each wrong sector of the region holds (a stamp is LBA | pass << 48).
        python3 -c 'import struct, sys, collections
f, off, n, final = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
seen = collections.Counter(); first = []
with open(f, "rb") as h:
    h.seek(off)
    for i in range(n // 512):
        sec = h.read(512); lba = off // 512 + i
        w = struct.unpack("<Q", sec[:8])[0]
        ok_stamp = sec == sec[:8] * 64 and w & ((1 << 48) - 1) == lba
        what = "pass %d" % (w >> 48) if ok_stamp else "no stamp"
        if what != "pass %d" % final:
            seen[what] += 1
            if len(first) < 8: first.append("LBA %d: %s" % (lba, what))
print("### wrong sectors in the host file:", dict(seen), "; first:", ", ".join(first))' \
            "$FILE" "$OFF" "$PAT_BYTES" $((RELOAD_PASSES + 1))
    fi
    [ -n "$reloads_during" ] || fail "the guest never said RELOAD_STOP"
    [ "$reloads_during" -ge 3 ] || fail "only $reloads_during reloads done while the guest wrote (want 3 or more)"
fi
if [ -n "$OURS" ]; then
    [ $two = 1 ] || fail "-I: the guest never said TWO_ME"
    [ "$(cat "$RUN/two.rc" 2>/dev/null)" = 0 ] ||
        { cat "$RUN/ours-dd.err"; tail -20 "$RUN/ours.log"; fail "-I: the host's pattern write through our initiator failed (status $(cat "$RUN/two.rc" 2>/dev/null))"; }
    grep -q 'KI:TWO_OVER' "$CONSOLE" || fail "-I: the guest never read S as the host wrote it (its step two_host_pattern)"
    [ "${TWO_SAW_G:-}" = yes ] ||
        fail "-I: after the guest's write of G to S was acknowledged (and synced), our initiator read S as $(od -An -tx1 -N8 "$RUN/s-read.bin" 2>/dev/null), not G ($(od -An -tx1 -N8 "$RUN/g.bin"))"
    [ "${TWO_H_RC:-1}" = 0 ] || { cat "$RUN/ours-dd.err"; fail "-I: our write of H over the guest's G failed"; }
    grep -q 'KI:TWO_H_SEEN' "$CONSOLE" || fail "-I: the guest never read our H at S (its step two_host_last)"
    H_REGION2=$(dd if="$FILE" bs=$BS skip="$SEEK2" count=$((PAT_BYTES / BS)) 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$H_REGION2" = "$PAT2_FINAL_MD5" ] ||
        fail "-I: host backing file at byte $OFF2 md5 $H_REGION2 != the host's pattern with H at S $PAT2_FINAL_MD5"
    [ "$OURS_SAW_PAT" = "$PAT_MD5" ] ||
        fail "-I: our initiator read the guest's pattern region as md5 $OURS_SAW_PAT, not $PAT_MD5"
    say "-I: two initiators on one export: each one's later write stayed; ours read the guest's pattern"
fi
[ "$(g READBACK_MD5)" = "$PAT_MD5" ] || fail "pattern read back (iflag=direct) md5 $(g READBACK_MD5) != written $PAT_MD5"
[ "$H_REGION" = "$PAT_MD5" ] || fail "host backing file at byte $OFF md5 $H_REGION != pattern $PAT_MD5"
[ "$(g MD5_AFTER)" = "$EXP_AFTER" ] || fail "whole-device md5 in the guest after the write $(g MD5_AFTER) != expected $EXP_AFTER"
[ "$H_AFTER" = "$EXP_AFTER" ] || fail "host backing file md5 after the write $H_AFTER != expected $EXP_AFTER"
if [ -n "$RESIZE_TO" ]; then
    resized=$(g RESIZED)
    [ "${resized%% *}" = "$RESIZE_TO" ] ||
        fail "guest size after the resize: ${resized:-none} (want $RESIZE_TO)"
    say "guest saw the new size: $resized"
fi
if [ "$LARGE" != 0 ]; then
    # Each piece where the guest wrote it, and no data past the random part elsewhere (the
    # file system's extents: a 4 KiB block around each piece).
    i=0 pieces=""
    for l in $LARGE_LBAS; do
        [ -n "$(g "LARGE_PIECE $l")" ] || fail "-L: the guest did not write the piece at $l"
        got=$(dd if="$FILE" bs=512 skip="$l" count=16 2>/dev/null | md5sum | cut -d' ' -f1)
        want=$(dd if="$PAT" bs=512 skip=$((i * 16)) count=16 2>/dev/null | md5sum | cut -d' ' -f1)
        [ "$got" = "$want" ] || fail "-L: the host file at sector $l holds $got, the guest wrote $want"
        pieces="$pieces $l"
        i=$((i + 1))
    done
    stray=$(python3 -c 'import os, sys
f, start, pieces = sys.argv[1], int(sys.argv[2]), [int(p) * 512 for p in sys.argv[3].split()]
fd = os.open(f, os.O_RDONLY); size = os.fstat(fd).st_size; off = start; stray = []
while off < size:
    try:
        d = os.lseek(fd, off, os.SEEK_DATA)
    except OSError:
        break
    h = os.lseek(fd, d, os.SEEK_HOLE)
    # Data within a 4 KiB block of a piece is the piece (the blocks are whole).
    if not any(p - 4096 < h and d < p + 8192 + 4096 for p in pieces):
        stray.append("%d+%d" % (d, h - d))
    off = h
print(" ".join(stray))' "$FILE" $((SIZE_MB << 20)) "$pieces") || fail "-L: cannot list the data extents of $FILE"
    [ -z "$stray" ] || fail "-L: data in the host file where nothing was written (byte+length): $stray"
    say "-L: pieces across sectors$pieces written and read back in the guest and found in the file, nothing elsewhere; $(g LARGE_PAST_END)"
fi
if [ "$SHRINK" = 1 ]; then
    [ "$(g MD5_SHRUNK)" = "$H_SHRUNK" ] ||
        fail "-S: whole shrunk device md5 in the guest $(g MD5_SHRUNK) != shrunk file $H_SHRUNK"
    say "-S: the guest reads the shrunk device whole, as the file holds it"
fi
if [ "$RELOAD" != 0 ]; then
    say "$reloads_during reloads of the target's configuration during the guest's writes; every sector of the region holds the last pass"
fi
if [ "$PAUSE" = 1 ] && [ -z "$HANDOVER" ]; then
    [ $conted = 1 ] || fail "-P: the guest never asked for the target to continue"
    say "-P: $(g PAUSED_WRITE_FAILED); $(g UP_AGAIN); the pattern written after it is what every check found"
fi
if [ "$FULL" = 1 ]; then
    [ $freed = 1 ] || fail "-F: the guest never asked for the space to be freed"
    say "-F: the write that found the disk full failed in the guest ($(g FULL_FAILED_AT)); the acknowledged ones read back; $(g FULL_REWRITTEN); $(grep -c -i 'no space' "$RUN/target.log") no-space lines in the target's log"
fi
if [ -n "$BAD" ]; then
    # Exactly the bad sectors failed; every other sector read as the file holds it.
    s=$((BAD_LBA - 3)) wrong=""
    while [ $s -lt $((BAD_LBA + BAD_COUNT + 3)) ]; do
        got=$(tr -d '\r' <"$CONSOLE" | sed -n "s/^.*KI:SECTOR $s //p" | tail -1)
        if [ "$s" -ge "$BAD_LBA" ] && [ "$s" -lt $((BAD_LBA + BAD_COUNT)) ]; then
            [[ $got == failed* ]] || wrong="$wrong $s (bad, read as '${got:-nothing}')"
        else
            want=$(dd if="$FILE" bs=512 skip="$s" count=1 2>/dev/null | md5sum | cut -d' ' -f1)
            [ "$got" = "$want" ] || wrong="$wrong $s (good, '${got:-nothing}', file $want)"
        fi
        s=$((s + 1))
    done
    [ -z "$wrong" ] || fail "-B: sectors read wrong in the guest:$wrong"
    say "-B: sectors $BAD_LBA..$((BAD_LBA + BAD_COUNT - 1)) failed in the guest and no other; $(grep -c 'I/O failed' "$RUN/target.log") I/O-failure lines in the target's log"
fi
if [ -n "$HANDOVER" ]; then
    echo "### gateway B's log (tail):"
    tail -n 8 "$RUN/target-b.log" 2>/dev/null | sed 's/^/    /'
    grep -q 'breaking it' "$RUN/target-b.log" || fail "-H $HANDOVER: gateway B did not say it broke A's lock"
    if [ "$HANDOVER" != replace ]; then
        grep -q "lost the image's exclusive lock" "$RUN/target.log" ||
            fail "-H $HANDOVER: gateway A did not say it lost the lock"
    fi
    if [ "$HANDOVER" != alone ]; then
        b_mac=$(ip -n "$NS" link show kitgt2 2>/dev/null | awk '/link\/ether/ {print $2}')
        [ "$RESERVED_WRITE" = "$(echo "${b_mac:-?}" | tr -d :) 1 6" ] ||
            fail "-H $HANDOVER: another host's write after the hand-over was answered '$RESERVED_WRITE', want gateway B (${b_mac:-?}) with AoE error 6 (target reserved)"
        say "-H $HANDOVER: the reservation made through A held on B: another host's write got error 6 from B, the guest (the holder) wrote through B"
    fi
    if [ "$HANDOVER" = alone ]; then
        say "-H alone: A fenced with nobody serving e$SHELF.$SLOT: $(g PAUSED_WRITE_FAILED); $(g UP_AGAIN) after A restarted; the pattern written then is what every check found"
    elif [ "$HANDOVER" = idle ]; then
        say "-H idle: B took over from the idle A before the guest started ($(grep -c 'waiting for it to stop' "$RUN/target-b.log") probe-wait lines in B's log); the guest found the device through B and every check held"
    else
        [ $killed = 1 ] || fail "-H $HANDOVER: the guest never asked for the hand-over"
        say "-H $HANDOVER: gateway B took over during the pattern write, no write failed ($(g STREAM_WRITTEN) writes); driver messages: $(g RETRANSMITS) retransmits; $(grep -c 'waiting for it to stop' "$RUN/target-b.log") probe-wait lines in B's log"
    fi
elif [ "$OSDKILL" = 1 ]; then
    [ $killed = 1 ] || fail "-O: the guest never asked for the kill"
    say "OSD killed and restarted during the pattern write; $(g STREAM_WRITTEN) writes; driver messages: $(g RETRANSMITS) retransmits; $(grep -c 'waiting on the backend' "$RUN/target.log") backend-wait lines in the target's log"
elif [ -n "$MP" ]; then
    [ $killed = 1 ] || fail "-M $MP: the guest never asked for the cut"
    [ -n "${mp_at_end:-}" ] || fail "-M $MP: no count of frames at the end of the guest's writes"
    [ "$(g IO_ERRORS)" = 0 ] || fail "-M $MP: $(g IO_ERRORS) \"I/O error\" lines in the guest's dmesg (want none)"
    read -r c1 c2 <<<"$mp_at_cut"; read -r b1 b2 <<<"$mp_at_back"
    read -r t1 t2 <<<"$mp_at_10"; read -r e1 e2 <<<"$mp_at_end"
    echo "### -M $MP: frames received on $MP_IFS (path 1 / path 2):"
    echo "    before the cut: $c1 / $c2; while $mp_link was down: $((b1 - c1)) / $((b2 - c2));"
    echo "    the first 10 s back: $((t1 - b1)) / $((t2 - b2)); from then to the end of the writes: $((e1 - t1)) / $((e2 - t2))"
    tr -d '\r' <"$CONSOLE" | grep 'KI:TARGETS' | sed 's/^.*KI:TARGETS /    driver at the end: /'
    [ $((e2 - t2)) -gt 0 ] && [ $(( (e2 - t2) * 4 )) -ge $((e1 - t1)) ] ||
        fail "-M $MP: path 2 not used again: from 10 s after $mp_link came back to the end of the writes, $((e2 - t2)) frames on path 2 against $((e1 - t1)) on path 1 ($MP_IFS; want at least a quarter)"
    say "-M $MP: $mp_link down ${MP_DOWN_S}s during the writes, $(g STREAM_WRITTEN) writes, none failed, no I/O error in the guest's dmesg; driver messages: $(g RETRANSMITS) retransmits; path 2 used again"
elif [ -n "$LINKEV" ]; then
    [ $killed = 1 ] || fail "-N $LINKEV: the guest never asked for the link event"
    [ "$(g IO_ERRORS)" = 0 ] || fail "-N $LINKEV: $(g IO_ERRORS) \"I/O error\" lines in the guest's dmesg (want none)"
    say "-N $LINKEV: the target's link changed during the pattern write, $(g STREAM_WRITTEN) writes; driver messages: $(g RETRANSMITS) retransmits; no I/O error in the guest's dmesg"
    echo "### the target's lines about its interface:"
    grep -E 'link event|kitgt' "$RUN/target.log" | tail -n 8 | sed 's/^/    /'
elif [ "$KILL" != 0 ]; then
    [ $killed = 1 ] || fail "-K/-W: the guest never asked for the kill"
    say "target killed and restarted during the pattern write; driver messages: $(g RETRANSMITS) retransmits"
fi
echo "PASS: kernel AoE initiator ($KVER) against '$TCMD' at MTU $MTU"
exit 0
