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
# env: MACRESCUE_VM_MODULES (vhci-hcd) modules whose closure to keep
#      MACRESCUE_KERNEL_DEST           output dir instead of out/vm/ARCH (image/ keeps its own set)
#      MACRESCUE_KERNEL_SUITE=backports  the kernel from this release's backports (private
#                                      package lists, see extra_apt in lib.sh); busybox stays
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

# Where the kernel comes from: the system's lists, or backports through private lists.
KAPT=()
KSUFFIX="$SUFFIX"
case "${MACRESCUE_KERNEL_SUITE:-}" in
    "") ;;
    backports) extra_apt "$DEB_ARCH"; KAPT=("${EXTRA_APT[@]}"); KSUFFIX="" ;;
    *) die "MACRESCUE_KERNEL_SUITE must be empty or backports" ;;
esac

# The ABI number (6.1.0-NN) changes with every Debian kernel update and old ones leave the
# mirror, so resolve it through the meta package every time.
PKG="$(apt-cache "${KAPT[@]}" depends "linux-image-$DEB_ARCH$KSUFFIX" |
    awk '/Depends: linux-image-[0-9]/ { sub(/:.*/, "", $2); print $2; exit }')"
[[ -n "$PKG" ]] || die "cannot resolve linux-image-$DEB_ARCH to a versioned kernel package"
VERSION="$(apt-cache "${KAPT[@]}" policy "$PKG$KSUFFIX" | awk '/Candidate:/ { print $2; exit }')"
KV="${PKG#linux-image-}"
STAMP="$PKG $VERSION $MODULES"

if [[ -f "$DEST/.stamp" && "$(cat "$DEST/.stamp")" == "$STAMP" && -f "$DEST/kernel" && -f "$DEST/vmlinuz" ]]; then
    log "up to date: $PKG $VERSION in $DEST"
    exit 0
fi

mkdir -p "$DEBS"
(
    cd "$DEBS"
    for p in "$PKG" busybox-static; do
        if ! ls "${p}"_*_"${DEB_ARCH}".deb >/dev/null 2>&1 ||
            { [[ "$p" == "$PKG" ]] && ! ls "${p}_${VERSION//:/%3a}_${DEB_ARCH}.deb" >/dev/null 2>&1; }; then
            log "apt-get download $p$SUFFIX"
            # As root apt warns that the download is unsandboxed; that is expected here.
            if [[ "$p" == "$PKG" ]]; then
                apt-get "${KAPT[@]}" download -qq "$p$KSUFFIX" 2>&1 | grep -v 'unsandboxed' >&2 || true
            else
                apt-get download -qq "$p$SUFFIX" 2>&1 | grep -v 'unsandboxed' >&2 || true
            fi
        fi
    done
)
KDEB="$DEBS/${PKG}_${VERSION//:/%3a}_${DEB_ARCH}.deb"
[[ -f "$KDEB" ]] || KDEB="$(ls -t "$DEBS/${PKG}"_*_"${DEB_ARCH}".deb | head -1)"
BDEB="$(ls -t "$DEBS"/busybox-static_*_"${DEB_ARCH}".deb | head -1)"
[[ -f "$KDEB" && -f "$BDEB" ]] || die "download of $PKG / busybox-static failed"

WORK="$DEST/.extract"
rm -rf "$WORK" "$DEST/modules"
mkdir -p "$WORK/k" "$WORK/b" "$DEST/modules"
log "extracting $(basename "$KDEB")"
dpkg-deb -x "$KDEB" "$WORK/k"
dpkg-deb -x "$BDEB" "$WORK/b"
install -m 0755 "$WORK/b/bin/busybox" "$DEST/busybox"

# Debian's package ships no modules.dep (postinst makes it): make one to ask for the closure.
MODDIR="$(dirname "$(find "$WORK/k" -type d -path "*/modules/$KV" | head -1)")"
[[ -d "$MODDIR/$KV" ]] || die "no lib/modules/$KV in $KDEB"
MROOT="${MODDIR%/lib/modules}"
depmod -b "$MROOT" "$KV" 2>/dev/null
DST_MOD="$DEST/modules/lib/modules/$KV"
mkdir -p "$DST_MOD"
for m in $MODULES; do
    modprobe -d "$MROOT" -S "$KV" --show-depends "$m"
done | awk '$1 == "insmod" { print $2 }' | sort -u | while read -r ko; do
    rel="${ko#"$MODDIR/$KV/"}"
    mkdir -p "$DST_MOD/$(dirname "$rel")"
    cp "$ko" "$DST_MOD/$rel"
done
cp "$MODDIR/$KV"/modules.{order,builtin,builtin.modinfo} "$DST_MOD/" 2>/dev/null || true
depmod -b "$DEST/modules" "$KV" 2>/dev/null
log "modules: $(cd "$DST_MOD" && find . -name '*.ko*' -printf '%f ' )"

VMLINUZ="$(find "$WORK/k/boot" -name "vmlinuz-$KV" | head -1)"
[[ -f "$VMLINUZ" ]] || die "no /boot/vmlinuz-$KV in $KDEB"
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
    find "$WORK/k" -path "*/linux-image-$KV/broadcom/*.dtb" -exec cp {} "$DEST/dtbs/" \;
fi
echo "$KV" >"$DEST/kernel.version"
rm -rf "$WORK"
echo "$STAMP" >"$DEST/.stamp"
log "ready: $DEST (kernel $KV, $(du -h "$DEST/kernel" | cut -f1))"
