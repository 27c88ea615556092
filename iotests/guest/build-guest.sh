#!/usr/bin/env bash
# Build the small Linux guest that iotests/test_vhost_guest.py boots under
# qemu-system-x86_64 (TCG) to drive a vhost-user-blk export with the real
# virtio-blk driver.
#
# Inputs, fetched with apt-get download into the cache (nothing installed):
#   linux-image-amd64  -> Debian's kernel and its modules
#   busybox-static     -> the guest's userland
# and, from the host: fio and the shared libraries it links.
#
# Output in ${QSD_GUEST_CACHE:-/var/tmp/qsd-guest}/out:
#   vmlinux    the kernel as an uncompressed ELF (qemu boots it through PVH,
#              which skips real-mode setup and in-guest decompression)
#   base.cpio  uncompressed newc initramfs: busybox, virtio modules, fio,
#              /init; padded to 512 bytes so a test appends its own cpio
#   stamp      the hash of every input; equal hash = nothing to do
#
# Usage: build-guest.sh [--refresh] [--check]
#   --refresh  re-read the Debian archive for newer kernel/busybox packages
#   --check    exit 0 if the guest is built and current, 1 otherwise
# Needs: apt-get, dpkg-deb, depmod/modprobe (kmod), python3, ldd, and
# network access the first time (or with --refresh).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=apt.sh
. "$HERE/apt.sh"
CACHE=$QSD_GUEST_CACHE
OUT=$CACHE/out
DEBS=$CACHE/debs
# Kernel modules the guest loads, in addition to their dependencies.
GUEST_MODULES=(virtio_pci virtio_blk)

REFRESH=0
CHECK=0
for arg in "$@"; do
    case $arg in
    --refresh) REFRESH=1 ;;
    --check) CHECK=1 ;;
    *)
        echo "build-guest: unknown argument $arg" >&2
        exit 2
        ;;
    esac
done

die() {
    echo "build-guest: $*" >&2
    exit 1
}

need_tool() {
    command -v "$1" >/dev/null 2>&1 || die "$1 is missing: install package $2"
}

# Download one package's .deb into $DEBS unless a version is cached;
# prints its path. With --refresh an older cached version is replaced.
fetch_deb() {
    local pkg=$1
    local cached
    cached=$(find "$DEBS" -maxdepth 1 -name "${pkg}_*.deb" | sort | tail -1)
    if [[ -n $cached && $REFRESH == 0 ]]; then
        echo "$cached"
        return
    fi
    (cd "$DEBS" && guest_apt download -q "$pkg" >&2)
    local newest
    newest=$(find "$DEBS" -maxdepth 1 -name "${pkg}_*.deb" -newer "$DEBS/.fetch" | tail -1)
    [[ -n $newest ]] || newest=$(find "$DEBS" -maxdepth 1 -name "${pkg}_*.deb" | sort | tail -1)
    [[ -n $newest ]] || die "could not download $pkg"
    find "$DEBS" -maxdepth 1 -name "${pkg}_*.deb" ! -path "$newest" -delete
    echo "$newest"
}

# The versioned kernel package linux-image-amd64 points at in the archive
# (linux-image-amd64 itself is an empty metapackage).
kernel_package() {
    guest_apt_cache depends linux-image-amd64 |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

fetch_inputs() {
    mkdir -p "$DEBS"
    local have_kernel have_busybox
    have_kernel=$(find "$DEBS" -maxdepth 1 -name 'linux-image-[0-9]*.deb' | head -1)
    have_busybox=$(find "$DEBS" -maxdepth 1 -name 'busybox-static_*.deb' | head -1)
    if [[ $REFRESH == 1 || -z $have_kernel || -z $have_busybox ]]; then
        need_tool apt-get apt
        touch "$DEBS/.fetch"
        guest_apt_update
        local kpkg
        kpkg=$(kernel_package)
        [[ -n $kpkg ]] || die "linux-image-amd64 has no kernel dependency in the archive"
        if [[ $REFRESH == 1 ]]; then
            find "$DEBS" -maxdepth 1 -name 'linux-image-[0-9]*.deb' ! -name "${kpkg}_*" -delete
        fi
        fetch_deb "$kpkg" >/dev/null
        fetch_deb busybox-static >/dev/null
    fi
    KERNEL_DEB=$(find "$DEBS" -maxdepth 1 -name 'linux-image-[0-9]*.deb' | sort | tail -1)
    BUSYBOX_DEB=$(find "$DEBS" -maxdepth 1 -name 'busybox-static_*.deb' | sort | tail -1)
    [[ -n $KERNEL_DEB && -n $BUSYBOX_DEB ]] || die "kernel or busybox package missing in $DEBS"
}

# fio and the shared objects it loads (resolved paths, one per line), with
# the path each must have inside the guest: "host-path guest-path".
fio_files() {
    local fio
    fio=$(command -v fio) || die "fio is missing: install package fio"
    echo "$(readlink -f "$fio") /bin/fio"
    ldd "$fio" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
        while read -r lib; do
            echo "$(readlink -f "$lib") $lib"
        done
}

# The hash of everything the output depends on.
input_stamp() {
    {
        sha256sum "$HERE/build-guest.sh" "$HERE/init" "$HERE/apt.sh"
        stat -L -c '%n %s %Y' "$KERNEL_DEB" "$BUSYBOX_DEB"
        fio_files | while read -r host guest; do
            stat -L -c "%s %Y $guest" "$host"
        done
        echo "modules ${GUEST_MODULES[*]}"
    } | sha256sum | cut -d' ' -f1
}

# vmlinuz is a bzImage whose payload is an XZ (6.1) or ZSTD (6.12) stream;
# qemu's PVH boot wants the ELF inside.
extract_vmlinux() {
    python3 - "$1" "$2" <<'EOF'
import lzma, subprocess, sys

image = open(sys.argv[1], "rb").read()
starts = {"xz": image.find(b"\xfd7zXZ\x00"), "zstd": image.find(b"\x28\xb5\x2f\xfd")}
found = sorted((off, kind) for kind, off in starts.items() if off >= 0)
if not found:
    sys.exit("no XZ or ZSTD payload in " + sys.argv[1])
off, kind = found[0]
if kind == "xz":
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(image[off:])
else:
    elf = subprocess.run(["zstd", "-dcq"], input=image[off:], capture_output=True,
                         check=False).stdout
if elf[:4] != b"\x7fELF":
    sys.exit("the kernel payload is not an ELF file")
open(sys.argv[2], "wb").write(elf)
EOF
}

# Copy GUEST_MODULES and their dependencies from the kernel tree $1 into the
# root $2; write /etc/modules-load, the insmod order for /init.
copy_modules() {
    local ktree=$1 root=$2 kver=$3
    depmod -b "$ktree" "$kver"
    mkdir -p "$root/lib/modules/$kver" "$root/etc"
    : >"$root/etc/modules-load"
    local m kind ko rel
    for m in "${GUEST_MODULES[@]}"; do
        modprobe -d "$ktree" -S "$kver" --show-depends "$m" ||
            die "module $m is not in kernel $kver"
    done | while read -r kind ko _; do
        # "insmod /path/x.ko" or "builtin x"; builtins need nothing.
        [[ $kind == insmod ]] || continue
        rel=${ko#"$ktree"/lib/modules/"$kver"/}
        grep -qxF "$rel" "$root/etc/modules-load" && continue
        mkdir -p "$root/lib/modules/$kver/$(dirname "$rel")"
        cp "$ko" "$root/lib/modules/$kver/$rel"
        echo "$rel" >>"$root/etc/modules-load"
    done
    # Compressed modules (6.12 ships .ko.xz) are unpacked: busybox insmod
    # may be built without decompression.
    find "$root/lib/modules" -name '*.ko.xz' -exec xz -d {} +
    find "$root/lib/modules" -name '*.ko.zst' -exec zstd -dq --rm {} +
    sed -i -e 's/\.ko\.xz$/.ko/' -e 's/\.ko\.zst$/.ko/' "$root/etc/modules-load"
}

build() {
    local tmp=$CACHE/build.tmp
    rm -rf "$tmp"
    mkdir -p "$tmp/kernel" "$tmp/busybox" "$tmp/root"
    dpkg-deb -x "$KERNEL_DEB" "$tmp/kernel"
    dpkg-deb -x "$BUSYBOX_DEB" "$tmp/busybox"
    local kver
    kver=$(ls "$tmp/kernel/lib/modules")
    [[ $(wc -w <<<"$kver") == 1 ]] || die "expected one kernel version, got: $kver"
    extract_vmlinux "$tmp/kernel/boot/vmlinuz-$kver" "$tmp/vmlinux"

    local root=$tmp/root
    mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc,lib64,test}
    cp "$tmp/busybox/bin/busybox" "$root/bin/busybox"
    copy_modules "$tmp/kernel" "$root" "$kver"
    local host guest
    while read -r host guest; do
        mkdir -p "$root$(dirname "$guest")"
        cp "$host" "$root$guest"
    done < <(fio_files)
    install -m 0755 "$HERE/init" "$root/init"
    echo "$kver" >"$root/etc/kernel-version"

    # newc, owned by root, uncompressed: the kernel unpacks it faster than
    # it would gunzip under TCG.
    (cd "$root" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc -R 0:0 --quiet) >"$tmp/base.cpio"
    local size pad
    size=$(stat -c %s "$tmp/base.cpio")
    pad=$(((512 - size % 512) % 512))
    head -c "$pad" /dev/zero >>"$tmp/base.cpio"

    mkdir -p "$OUT"
    mv "$tmp/vmlinux" "$OUT/vmlinux"
    mv "$tmp/base.cpio" "$OUT/base.cpio"
    echo "$kver" >"$OUT/kernel-version"
    rm -rf "$tmp"
}

main() {
    if [[ $CHECK == 1 ]]; then
        KERNEL_DEB=$(find "$DEBS" -maxdepth 1 -name 'linux-image-[0-9]*.deb' 2>/dev/null | head -1)
        BUSYBOX_DEB=$(find "$DEBS" -maxdepth 1 -name 'busybox-static_*.deb' 2>/dev/null | head -1)
        [[ -n $KERNEL_DEB && -n $BUSYBOX_DEB && -f $OUT/stamp ]] || exit 1
        [[ $(cat "$OUT/stamp") == "$(input_stamp)" ]] && exit 0
        exit 1
    fi
    need_tool dpkg-deb dpkg
    need_tool depmod kmod
    need_tool cpio cpio
    need_tool python3 python3
    fetch_inputs
    local stamp
    stamp=$(input_stamp)
    if [[ -f $OUT/stamp && $(cat "$OUT/stamp") == "$stamp" &&
        -f $OUT/vmlinux && -f $OUT/base.cpio ]]; then
        echo "build-guest: guest in $OUT is up to date"
        return
    fi
    local t0=$SECONDS
    rm -f "$OUT/stamp"
    build
    echo "$stamp" >"$OUT/stamp"
    echo "build-guest: built $OUT (kernel $(cat "$OUT/kernel-version")," \
        "initramfs $(du -h "$OUT/base.cpio" | cut -f1)) in $((SECONDS - t0))s"
}

main
