#!/usr/bin/env bash
# Fetch Debian's current kernel and busybox-static for ARCH (x86_64 | aarch64) without installing
# them, and prepare what the VM tests boot:
#   out/vm/ARCH/kernel        x86_64: uncompressed vmlinux (PVH boot, ~3x faster under TCG than
#                             the bzImage); aarch64: the Image (Debian ships it uncompressed)
#   out/vm/ARCH/modules/      lib/modules/KV with the vhci-hcd closure + depmod output
#   out/vm/ARCH/busybox       static busybox
#   out/vm/ARCH/kernel.version
#   out/vm/ARCH/vmlinuz       the kernel as Debian ships it (EFI-stub bzImage / Image), for images
#   out/vm/ARCH/dtbs/         aarch64: the Broadcom (Raspberry Pi) device trees
# env: MACRESCUE_VM_MODULES (vhci-hcd) modules whose closure to keep; a name the kernel has
#                                      neither as a module nor built in is an error
#      MACRESCUE_KERNEL_DEST           output dir instead of out/vm/ARCH (image/ keeps its own set)
#      MACRESCUE_KERNEL_SUITE=backports  the kernel from this release's backports;
#      MACRESCUE_KERNEL_SUITE=SUITE    the kernel from another Debian suite (trixie-backports);
#                                      both through private package lists (extra_apt in lib.sh),
#                                      only .debs are downloaded and unpacked; busybox stays
# Downloads are cached in out/cache/debs; re-running with the same kernel does nothing.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ARCH="$(vm_arch "${1:-x86_64}")"
DEB_ARCH="$(deb_arch "$ARCH")"
DEST="${MACRESCUE_KERNEL_DEST:-$VM_OUT/vm/$ARCH}"
DEBS="$VM_CACHE/debs"
# The modules whose closure the guest needs (usb-common, usbcore, usbip-core come as deps).
MODULES="${MACRESCUE_VM_MODULES:-vhci-hcd}"

need_pkg apt-get apt
need_pkg dpkg-deb dpkg
need_pkg depmod kmod
need_pkg xz xz-utils

SUFFIX=""
if [[ "$DEB_ARCH" != "$(dpkg --print-architecture)" ]]; then
    SUFFIX=":$DEB_ARCH"
    if ! dpkg --print-foreign-architectures | grep -qx "$DEB_ARCH"; then
        log "dpkg --add-architecture $DEB_ARCH"
        dpkg --add-architecture "$DEB_ARCH"
        apt-get update -qq >&2
    fi
fi
if ! apt-cache show "linux-image-$DEB_ARCH$SUFFIX" >/dev/null 2>&1; then
    log "apt-get update (no package lists yet)"
    apt-get update -qq >&2
fi

# Where the kernel comes from: the system's lists, or another suite through private lists.
KAPT=()
KSUFFIX="$SUFFIX"
case "${MACRESCUE_KERNEL_SUITE:-}" in
    "") ;;
    [a-z]*) extra_apt "$DEB_ARCH" "$MACRESCUE_KERNEL_SUITE"; KAPT=("${EXTRA_APT[@]}"); KSUFFIX="" ;;
    *) die "MACRESCUE_KERNEL_SUITE must be empty, backports or a Debian suite (trixie-backports)" ;;
esac

# The ABI number (6.1.0-NN) changes with every Debian kernel update and old ones leave the
# mirror, so resolve it through the meta package every time.
PKG="$(apt-cache "${KAPT[@]}" depends "linux-image-$DEB_ARCH$KSUFFIX" |
    awk '/Depends: linux-image-[0-9]/ { sub(/:.*/, "", $2); print $2; exit }')"
[[ -n "$PKG" ]] || die "cannot resolve linux-image-$DEB_ARCH to a versioned kernel package"
VERSION="$(apt-cache "${KAPT[@]}" policy "$PKG$KSUFFIX" | awk '/Candidate:/ { print $2; exit }')"
KV="${PKG#linux-image-}"
# Since 6.19 Debian splits the kernel: linux-image-KV only depends on linux-base-KV (config,
# DTBs), linux-binary-KV (the signed vmlinuz) and linux-modules-KV, all under
# /usr/lib/modules/KV. Older ones ship everything in linux-image-KV itself (/boot, /usr/lib).
PKGS=("$PKG")
while read -r p; do PKGS+=("$p"); done < <(apt-cache "${KAPT[@]}" depends "$PKG$KSUFFIX" |
    awk -v kv="$KV" '$1 == "Depends:" && $2 ~ /^linux-(base|binary|modules)-/ {
        sub(/:.*/, "", $2); if (substr($2, length($2) - length(kv) + 1) == kv) print $2 }' | sort -u)
STAMP="${PKGS[*]} $VERSION $MODULES"

if [[ -f "$DEST/.stamp" && "$(cat "$DEST/.stamp")" == "$STAMP" && -f "$DEST/kernel" && -f "$DEST/vmlinuz" ]]; then
    log "up to date: $PKG $VERSION in $DEST"
    exit 0
fi

mkdir -p "$DEBS"
KDEBS=()
for p in "${PKGS[@]}"; do
    deb="$DEBS/${p}_${VERSION//:/%3a}_${DEB_ARCH}.deb"
    if [[ ! -f "$deb" ]]; then
        log "apt-get download $p=$VERSION"
        # As root apt warns that the download is unsandboxed; that is expected here.
        (cd "$DEBS" && apt-get "${KAPT[@]}" download -qq "$p$KSUFFIX=$VERSION" 2>&1 |
            grep -v 'unsandboxed' >&2 || true)
    fi
    [[ -f "$deb" ]] || die "download of $p $VERSION failed"
    KDEBS+=("$deb")
done
if ! ls "$DEBS"/busybox-static_*_"${DEB_ARCH}".deb >/dev/null 2>&1; then
    log "apt-get download busybox-static$SUFFIX"
    (cd "$DEBS" && apt-get download -qq "busybox-static$SUFFIX" 2>&1 |
        grep -v 'unsandboxed' >&2 || true)
fi
BDEB="$(ls -t "$DEBS"/busybox-static_*_"${DEB_ARCH}".deb 2>/dev/null | head -1 || true)"
[[ -f "$BDEB" ]] || die "download of busybox-static failed"

WORK="$DEST/.extract"
rm -rf "$WORK" "$DEST/modules"
mkdir -p "$WORK/k" "$WORK/b" "$DEST/modules"
for deb in "${KDEBS[@]}"; do
    log "extracting $(basename "$deb")"
    dpkg-deb -x "$deb" "$WORK/k"
done
dpkg-deb -x "$BDEB" "$WORK/b"
install -m 0755 "$WORK/b/bin/busybox" "$DEST/busybox"

# Debian's package ships no modules.dep (postinst makes it): make one to ask for the closure.
MODDIR="$(dirname "$(find "$WORK/k" -type d -path "*/modules/$KV" | head -1)")"
[[ -d "$MODDIR/$KV" ]] || die "no lib/modules/$KV in ${PKGS[*]}"
MROOT="${MODDIR%/lib/modules}"
depmod -b "$MROOT" "$KV" 2>/dev/null
DST_MOD="$DEST/modules/lib/modules/$KV"
mkdir -p "$DST_MOD"
for m in $MODULES; do
    # "builtin NAME" for built-in drivers; nothing and a failure for a name the kernel lacks.
    modprobe -d "$MROOT" -S "$KV" --show-depends "$m" 2>/dev/null ||
        die "kernel $KV has no module $m (neither loadable nor built in): fix the module list"
done >"$WORK/closure"
awk '$1 == "insmod" { print $2 }' "$WORK/closure" | sort -u | while read -r ko; do
    rel="${ko#"$MODDIR/$KV/"}"
    mkdir -p "$DST_MOD/$(dirname "$rel")"
    cp "$ko" "$DST_MOD/$rel"
done
cp "$MODDIR/$KV"/modules.{order,builtin,builtin.modinfo} "$DST_MOD/" 2>/dev/null || true
depmod -b "$DEST/modules" "$KV" 2>/dev/null
log "modules: $(cd "$DST_MOD" && find . -name '*.ko*' -printf '%f ' )"
# The init hands compressed modules (.ko.xz since Debian's 6.12) to the kernel as they are
# (finit_module with MODULE_INIT_COMPRESSED_FILE): the kernel must decompress them itself.
if [[ -n "$(find "$DST_MOD" -name '*.ko.*' -print -quit)" ]]; then
    KCONFIG="$(find "$WORK/k" \( -path "*/boot/config-$KV" -o -path "*/modules/$KV/config" \) | head -1)"
    [[ -n "$KCONFIG" ]] && grep -qx 'CONFIG_MODULE_DECOMPRESS=y' "$KCONFIG" ||
        die "kernel $KV has compressed modules but no CONFIG_MODULE_DECOMPRESS: the init cannot load them"
fi

VMLINUZ="$(find "$WORK/k" \( -path "*/boot/vmlinuz-$KV" -o -path "*/modules/$KV/vmlinuz" \) | head -1)"
[[ -f "$VMLINUZ" ]] || die "no /boot/vmlinuz-$KV or /usr/lib/modules/$KV/vmlinuz in ${PKGS[*]}"
cp "$VMLINUZ" "$DEST/vmlinuz"
if [[ "$ARCH" == x86_64 ]]; then
    # The bzImage spends most of its TCG boot time in the decompressor; the payload inside is
    # a plain ELF vmlinux that QEMU can start directly through its PVH entry point.
    OFF="$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$VMLINUZ" | head -1 | cut -d: -f1 || true)"
    if [[ -n "$OFF" ]]; then
        tail -c +$((OFF + 1)) "$VMLINUZ" | xz -dc --single-stream >"$DEST/kernel.tmp" 2>/dev/null || true
    else
        need_pkg zstd zstd
        OFF="$(LC_ALL=C grep -obUaP '\x28\xb5\x2f\xfd' "$VMLINUZ" | head -1 | cut -d: -f1 || true)"
        [[ -n "$OFF" ]] && { tail -c +$((OFF + 1)) "$VMLINUZ" | zstd -dcq >"$DEST/kernel.tmp" 2>/dev/null || true; }
    fi
    if [[ -s "$DEST/kernel.tmp" && "$(head -c 4 "$DEST/kernel.tmp" | od -An -tx1 | tr -d ' ')" == 7f454c46 ]]; then
        mv "$DEST/kernel.tmp" "$DEST/kernel"
    else
        log "warning: could not unpack vmlinux; booting the compressed bzImage (slower)"
        rm -f "$DEST/kernel.tmp"
        cp "$VMLINUZ" "$DEST/kernel"
    fi
else
    cp "$VMLINUZ" "$DEST/kernel"
fi
if [[ "$ARCH" == aarch64 ]]; then
    # Device trees for boards whose firmware loads them from the boot partition (Raspberry Pi).
    rm -rf "$DEST/dtbs"
    mkdir -p "$DEST/dtbs"
    # /usr/lib/linux-image-KV/ up to 6.18, /usr/lib/modules/KV/dtb/ (linux-base-KV) since.
    find "$WORK/k" \( -path "*/linux-image-$KV/broadcom/*.dtb" -o -path "*/modules/$KV/dtb/broadcom/*.dtb" \) \
        -exec cp {} "$DEST/dtbs/" \;
fi
echo "$KV" >"$DEST/kernel.version"
rm -rf "$WORK"
echo "$STAMP" >"$DEST/.stamp"
log "ready: $DEST (kernel $KV, $(du -h "$DEST/kernel" | cut -f1))"
