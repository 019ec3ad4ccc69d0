#!/usr/bin/env bash
# Build a gzip'd initramfs: busybox, the vhci-hcd module closure, our static binaries, the
# given guest script (as /guest.sh) and an /init that prepares the guest, runs the script and
# powers off after printing the result marker that ci/vm/run.sh waits for.
#
# usage: initramfs.sh OUT.cpio.gz GUEST_SCRIPT
# env:   VM_ARCH (x86_64)            architecture of kernel.sh's output to take modules from
#        MACRESCUE_BIN_DIR           where the static binaries are (default: static.sh's output)
#        MACRESCUE_VM_BINS           binaries to copy into /bin
#                                    (default: restore-agent mac-sim and the stand-ins,
#                                    missing optional ones are skipped)
#        MACRESCUE_VM_OVERLAY        a directory copied over the initramfs root (data files)
set -euo pipefail
source "$(dirname "$0")/lib.sh"

[[ $# -eq 2 ]] || die "usage: $0 OUT.cpio.gz GUEST_SCRIPT"
OUT="$(realpath -m "$1")"
SCRIPT="$2"
[[ -f "$SCRIPT" ]] || die "guest script $SCRIPT not found"
ARCH="$(vm_arch "${VM_ARCH:-x86_64}")"
KDIR="$VM_OUT/vm/$ARCH"
BIN_DIR="${MACRESCUE_BIN_DIR:-$VM_OUT/vm/bin}"
BINS="${MACRESCUE_VM_BINS-restore-agent mac-sim usbip-demo usb-probe}"
REQUIRED="restore-agent mac-sim"

need_pkg cpio cpio
need_pkg gzip gzip
[[ -f "$KDIR/kernel.version" ]] || "$(dirname "$0")/kernel.sh" "$ARCH"
KV="$(cat "$KDIR/kernel.version")"

STAGE="$(mktemp -d "${TMPDIR:-/tmp}/macrescue-initramfs.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"/{bin,dev,proc,sys,tmp,run}
install -m 0755 "$KDIR/busybox" "$STAGE/bin/busybox"
cp -a "$KDIR/modules/lib" "$STAGE/"
for b in $BINS; do
    if [[ -x "$BIN_DIR/$b" ]]; then
        install -m 0755 "$BIN_DIR/$b" "$STAGE/bin/$b"
    elif [[ " $REQUIRED " == *" $b "* ]]; then
        die "$BIN_DIR/$b missing: run ci/vm/static.sh first"
    fi
done
install -m 0755 "$SCRIPT" "$STAGE/guest.sh"
if [[ -n "${MACRESCUE_VM_OVERLAY:-}" ]]; then
    [[ -d "$MACRESCUE_VM_OVERLAY" ]] || die "overlay $MACRESCUE_VM_OVERLAY is not a directory"
    cp -a "$MACRESCUE_VM_OVERLAY/." "$STAGE/"
fi

cat >"$STAGE/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
# DEVTMPFS_MOUNT is off in Debian's kernel: mount it, so /dev/bus/usb appears for libusb.
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
ip link set lo up || ifconfig lo 127.0.0.1 up
echo "guest: kernel $(uname -r), $(nproc) cpu"
if ! modprobe vhci-hcd; then
    echo "guest: modprobe vhci-hcd failed"
fi
cd /tmp
sh /guest.sh
rc=$?
if [ "$rc" -eq 0 ]; then
    echo "MACRESCUE-VM-RESULT: PASS"
else
    echo "MACRESCUE-VM-RESULT: FAIL (guest script exit $rc)"
fi
sync
poweroff -f
INIT
chmod 0755 "$STAGE/init"

mkdir -p "$(dirname "$OUT")"
(cd "$STAGE" && find . -print0 | sort -z | cpio --null -o -H newc -R 0:0 --quiet | gzip -1 >"$OUT.tmp")
mv "$OUT.tmp" "$OUT"
log "initramfs $OUT ($(du -h "$OUT" | cut -f1), kernel modules $KV)"
