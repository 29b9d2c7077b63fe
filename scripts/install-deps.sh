#!/usr/bin/env bash
# install-deps.sh - install (idempotently) everything the demo and the test suite need on a
# fresh Debian machine: the real AoE peers we test against (vblade, aoetools, tshark, the
# Linux kernel's aoe driver run in a qemu/TCG guest, the power-loss guest), FUSE and the
# loop/filesystem tools.
# Safe to run again: it installs only what is missing. Needs root.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "install-deps.sh: must run as root (apt-get)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
APT="apt-get -o DPkg::Lock::Timeout=600 -y -qq --no-install-recommends"

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

have_cmd vblade   || need+=(vblade)
have_cmd aoeping  || need+=(aoetools)
have_cmd tshark   || need+=(tshark)
have_cmd fusermount3 || need+=(fuse3)
have_cmd ip       || need+=(iproute2)
have_cmd jq       || need+=(jq)         # scripts/bench-compare.sh reads aoe bench --json
have_cmd mkfs.ext4 || need+=(e2fsprogs)
have_cmd sfdisk   || need+=(fdisk)      # conformance_files.rs writes MBR tables with logical partitions
have_cmd cpio     || need+=(cpio)
have_cmd modprobe || need+=(kmod)
have_cmd file     || need+=(file)
have_cmd losetup  || need+=(mount)
have_cmd nbdinfo  || need+=(libnbd-bin)   # nbdinfo, nbdcopy: NBD clients for the initiator's --nbd
have_cmd nbdkit   || need+=(nbdkit)       # bench-compare.sh, bench-initiator.sh: the NBD-over-TCP baseline
have_cmd nbdfuse  || need+=(libnbd-bin)   # kernel-initiator.sh -B: a file with unreadable sectors (with nbdkit's eval plugin)
have_cmd fio      || need+=(fio)          # tests/fio.rs, scripts/bench/fio.sh: an independent generator and verifier
have_cmd gcc      || need+=(gcc)          # scripts/bench-compare.sh compiles scripts/bench/aoegen.c
have_cmd perf     || need+=(linux-perf)   # scripts/bench-compare.sh PERF_DIR=: profiles per cell
have_cmd setsid   || need+=(util-linux)
have_cmd zsh      || need+=(zsh)        # ops.rs: zsh -n on the generated completions
have_cmd fish     || need+=(fish)       # ops.rs: fish -n on the generated completions
have_cmd man      || need+=(man-db)     # ops.rs: man --warnings -l on the generated pages
have_cmd groff    || need+=(groff-base)
have_cmd systemd-analyze || need+=(systemd)  # ops.rs: systemd-analyze verify on the units
have_cmd debugfs  || need+=(e2fsprogs)  # aoe demo reads the image on the target's side
have_cmd cc       || need+=(gcc)       # builds the send-refusing LD_PRELOAD shim of target_backlog.rs
have_cmd strip    || need+=(binutils)  # power-loss.sh: the target binary for the guest, without debug info
have_cmd e2fsck   || need+=(e2fsprogs) # power-loss.sh: the data disk's ext4 after the power loss
have_cmd xfs_repair || need+=(xfsprogs)  # power-loss.sh -e xfs: mkfs.xfs, xfs_repair -n after the power loss
have_cmd btrfs    || need+=(btrfs-progs)  # power-loss.sh -e btrfs: mkfs.btrfs, btrfs check after the power loss
have_cmd sqlite3  || need+=(sqlite3)      # power-loss.sh -W sqlite-*: PRAGMA integrity_check after the power loss
have_cmd python3  || need+=(python3)      # power-loss.sh -W: tests/interop/plapp.py, the applications' writers
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q static || need+=(busybox-static)
[ -e /usr/lib/ipxe/qemu/efi-virtio.rom ] || need+=(ipxe-qemu)
# Ceph RBD exports (the `rbd` feature): librbd/librados headers and libraries to build it, and
# a one-node cluster for its tests (scripts/ceph-up.sh).
have_pkg librbd-dev || need+=(librbd-dev)
have_cmd ceph-mon || need+=(ceph-mon)
have_cmd ceph-mgr || need+=(ceph-mgr)
have_cmd ceph-osd || need+=(ceph-osd)
have_cmd rbd      || need+=(ceph-common)
# tests/rbd.rs: a librbd client that takes a gateway's lock without blocklisting it.
have_pkg python3-rbd || need+=(python3-rbd)
have_cmd uuidgen  || need+=(uuid-runtime)
# ops_metrics.rs: `promtool check metrics` on both /metrics endpoints. The package is the
# Prometheus server too: on a host booted with systemd its unit starts (port 9090); stop and
# disable it there if it is not wanted (`systemctl disable --now prometheus`).
have_cmd promtool || need+=(prometheus)

# qemu-system-x86 (for the kernel aoe initiator guest). Some images ship a newer qemu-utils
# from backports that Breaks Debian's qemu-system-common; install both from the same
# release then, so qemu-img/qemu-io/qemu-nbd stay available.
qemu_extra=()
if ! have_cmd qemu-system-x86_64; then
    need+=(qemu-system-x86)
fi
# qemu-io, qemu-img (tests/nbd.rs: NBD clients of the initiator) are in qemu-utils, only a
# Recommends of qemu-system-x86: --no-install-recommends leaves them out on a fresh machine.
have_cmd qemu-io || need+=(qemu-utils)

if [ ${#need[@]} -gt 0 ]; then
    echo "install-deps: apt-get install ${need[*]}"
    if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || [ -n "$(find /var/lib/apt/lists -maxdepth 0 -mmin +1440 2>/dev/null)" ]; then
        apt-get -o DPkg::Lock::Timeout=600 update -qq
    fi
    if printf '%s\n' "${need[@]}" | grep -qx qemu-system-x86; then
        sysver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
        utilsver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
        if [ -n "$utilsver" ] && [ "$utilsver" != "$sysver" ]; then
            qemu_extra=(--allow-downgrades "qemu-utils=$sysver" "qemu-block-extra=$sysver")
        fi
    fi
    # tshark asks whether non-root users may capture; answer no without a prompt
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    $APT install "${need[@]}" "${qemu_extra[@]}"
fi

for t in vblade aoeping aoecfg aoe-stat tshark qemu-system-x86_64 qemu-io qemu-img fusermount3 mkfs.ext4 ip nbdinfo nbdcopy nbdkit nbdfuse fio \
         ceph-mon ceph-mgr ceph-osd rbd uuidgen; do
    have_cmd "$t" || { echo "install-deps: $t still missing after install" >&2; exit 1; }
done
[ -e /usr/include/rbd/librbd.h ] || { echo "install-deps: librbd-dev still missing after install" >&2; exit 1; }
echo "install-deps: all dependencies present"
