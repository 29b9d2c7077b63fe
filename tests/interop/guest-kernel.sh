# guest-kernel.sh - sourced by the qemu/TCG guest scripts (kernel-initiator.sh,
# power-loss.sh): Debian's linux-image-6.1 kernel and the few modules a busybox guest loads,
# downloaded once into a cache directory.
#
# The caller defines fail MESSAGE and say MESSAGE before it sources this file.
#
#   guest_kernel CACHE     sets KDIR (the cached kernel: KDIR/vmlinuz) and KVER; downloads
#                          the package the first time (apt-get download, no root filesystem
#                          touched) under CACHE/guest-v3, holding CACHE/.lock meanwhile
#   guest_modules DEST MODULE...
#                          copies MODULE... and what each depends on into DEST, with
#                          DEST/order listing them in load order (dependencies first)
#   guest_initramfs DIR [SUBDIR...]
#                          the initramfs tree's skeleton in DIR (bin, dev, proc, sys, tmp, etc,
#                          lib/modules and SUBDIR...), with the static busybox BUSYBOX (set by
#                          the caller's preflight check) and a link for each of its applets
#   guest_initramfs_pack DIR OUT
#                          DIR as a gzipped newc cpio archive at OUT, for qemu's -initrd
#
# The cache keeps, per package, the kernel image and, per module of GUEST_MODULES, its
# modules.dep chain; the 400 MB package tree is dropped. (The first layout, without
# virtio_blk and ext4, lived directly under CACHE; the second, guest-v2, without xfs and
# btrfs (power-loss.sh -e xfs|btrfs, session 33); both are left alone for older checkouts.)

GUEST_MODULES="virtio_pci virtio_net virtio_blk ext4 xfs btrfs aoe"

guest_kernel() {
    local cache=$1 kpkg m b path
    mkdir -p "$cache/guest-v3" || fail "cannot create cache directory $cache"
    exec 9>"$cache/.lock"
    flock -w 300 9 || fail "cache $cache is locked by another run for more than 300 s"
    KDIR=$(ls -d "$cache"/guest-v3/linux-image-6.1.0-*-amd64 2>/dev/null | sort -V | while read -r d; do
        [ -e "$d/.done" ] && echo "$d"; done | tail -1)
    if [ -z "$KDIR" ]; then
        kpkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -1)
        [ -n "$kpkg" ] || fail "no linux-image-6.1.0-*-amd64 package known to apt (apt-get update?)"
        say "downloading $kpkg into $cache/guest-v3 (once)"
        KDIR=$cache/guest-v3/$kpkg
        rm -rf "$KDIR" && mkdir -p "$KDIR/dl" || fail "cannot write $KDIR"
        (cd "$KDIR/dl" && apt-get download "$kpkg" >/dev/null 2>&1) || fail "apt-get download $kpkg failed"
        dpkg -x "$KDIR"/dl/*.deb "$KDIR/root" || fail "dpkg -x $kpkg failed"
        KVER=$(ls "$KDIR/root/lib/modules" | head -1)
        depmod -b "$KDIR/root" "$KVER" || fail "depmod failed"
        cp "$KDIR/root/boot/vmlinuz-$KVER" "$KDIR/vmlinuz" || fail "no vmlinuz in $kpkg"
        mkdir -p "$KDIR/modules/deps"
        for m in $GUEST_MODULES; do
            # Built-in modules have no insmod line: their chain is empty.
            modprobe -d "$KDIR/root" -S "$KVER" --show-depends "$m" >"$KDIR/dl/$m.dep" ||
                fail "modprobe --show-depends $m failed for $kpkg"
            awk '$1 == "insmod" {print $2}' "$KDIR/dl/$m.dep" | while read -r path; do
                b=$(basename "$path")
                [ -e "$KDIR/modules/$b" ] || cp "$path" "$KDIR/modules/$b"
                echo "$b"
            done >"$KDIR/modules/deps/$m"
        done
        grep -qx aoe.ko "$KDIR/modules/deps/aoe" || fail "aoe.ko not found in $kpkg"
        echo "$KVER" >"$KDIR/version"
        rm -rf "$KDIR/root" "$KDIR/dl"
        touch "$KDIR/.done"
    fi
    flock -u 9
    exec 9>&-
    KVER=$(cat "$KDIR/version")
}

guest_modules() {
    local dest=$1 m b
    shift
    mkdir -p "$dest" || fail "cannot create $dest"
    : >"$dest/order"
    for m in "$@"; do
        [ -f "$KDIR/modules/deps/$m" ] || fail "module $m is not in the kernel cache (GUEST_MODULES)"
        while read -r b; do
            grep -qx "$b" "$dest/order" && continue
            cp "$KDIR/modules/$b" "$dest/$b" && echo "$b" >>"$dest/order" || fail "cannot copy $b"
        done <"$KDIR/modules/deps/$m"
    done
}

guest_initramfs() {
    local dir=$1 a
    shift
    mkdir -p "$dir"/{bin,dev,proc,sys,tmp,etc,lib/modules} || fail "mkdir $dir"
    for a in "$@"; do mkdir -p "$dir/$a" || fail "mkdir $dir/$a"; done
    cp "$BUSYBOX" "$dir/bin/busybox" || fail "cannot copy $BUSYBOX"
    for a in $("$dir/bin/busybox" --list); do [ "$a" = busybox ] || ln -s busybox "$dir/bin/$a"; done
}

guest_initramfs_pack() {
    (cd "$1" && find . | cpio -o -H newc --quiet | gzip -1) >"$2" || fail "cannot build initramfs"
}
