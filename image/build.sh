#!/usr/bin/env bash
# Assemble the macrescue USB-stick image for ARCH (x86_64 for now) from Debian's kernel, the
# static agent and macrescue-init:
#
#   out/image/ARCH/initramfs.cpio.zst   /init, /sbin/modprobe → /init, restore-agent, busybox sh,
#                                       the driver modules real stations need
#   out/image/ARCH/macrescue.efi        unified kernel image (systemd's stub + kernel + cmdline
#                                       + initramfs), unsigned
#   out/macrescue-ARCH.img              GPT: ESP (FAT32, EFI/BOOT/BOOTX64.EFI) + data partition
#                                       (exFAT, GPT name and label MACRESCUE)
#   out/macrescue-ARCH.img.{zst,xz}     the download (xz for GUI imagers)
#
# Reproducible: same inputs (kernel package, binaries, SOURCE_DATE_EPOCH) → same bytes. Every
# timestamp is SOURCE_DATE_EPOCH (default: the last commit), every owner root, every random
# identifier (disk/partition GUIDs, FAT and exFAT serials) a constant.
#
# usage: image/build.sh [x86_64]
# env:   MACRESCUE_IMAGE_OUT      output dir for the parts (default out/image/ARCH)
#        MACRESCUE_IMAGE          image path (default out/macrescue-ARCH.img)
#        MACRESCUE_STATION        station command baked into the kernel command line
#        MACRESCUE_IMAGE_SHELL=0  leave busybox (the emergency shell) out
#        MACRESCUE_KERNEL_ARGS    extra kernel command-line words (e.g. usb-storage.delay_use=0)
#        MACRESCUE_DATA_MIB       size of the data partition (default 64; grown on first boot
#                                 in a later slice)
#        MACRESCUE_SKIP_BUILD=1   use the binaries already built
#        MACRESCUE_IMAGE_KIND=reference  the boot-time reference instead (same kernel, same
#                                 stick layout, busybox /init that prints the kernel uptime and
#                                 powers off): out/macrescue-reference-ARCH.img
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/../ci/vm/lib.sh"

ARCH="$(vm_arch "${1:-x86_64}")"
[[ "$ARCH" == x86_64 ]] || die "only x86_64 images exist so far (aarch64 and Raspberry Pi are later slices of issue #5)"
TARGET=x86_64-unknown-linux-musl
KIND="${MACRESCUE_IMAGE_KIND:-station}"
case "$KIND" in
    station) PARTS="${MACRESCUE_IMAGE_OUT:-$VM_OUT/image/$ARCH}"
        IMAGE="${MACRESCUE_IMAGE:-$VM_OUT/macrescue-$ARCH.img}" ;;
    reference) PARTS="${MACRESCUE_IMAGE_OUT:-$VM_OUT/image/reference-$ARCH}"
        IMAGE="${MACRESCUE_IMAGE:-$VM_OUT/macrescue-reference-$ARCH.img}" ;;
    *) die "MACRESCUE_IMAGE_KIND must be station or reference" ;;
esac
KDEST="$VM_OUT/image/kernel-$ARCH"
# Reports, logs and the IPSW cache live on the data partition (the init mounts it at /data).
STATION="${MACRESCUE_STATION:-restore-agent station --data /data --cache /data/ipsw}"
DATA_MIB="${MACRESCUE_DATA_MIB:-64}"
ESP_MIB=64
# Drivers a station PC needs: USB host controllers and mass storage (the stick itself, IPSW
# disks), the data partition's file systems, common wired NICs, and vhci-hcd for the simulated
# Mac in tests. Their dependency closure comes along.
MODULES="xhci-pci ehci-pci ohci-pci uhci-hcd usb-storage uas sd_mod vfat exfat nls_cp437
 nls_ascii nls_utf8 nls_iso8859-1 virtio_net virtio_pci e1000 e1000e r8169 vhci-hcd"
STUB=/usr/lib/systemd/boot/efi/linuxx64.efi.stub

need_pkg cpio cpio
need_pkg zstd zstd
need_pkg xz xz-utils
need_pkg objcopy binutils
need_pkg mcopy mtools
need_pkg mkfs.vfat dosfstools
need_pkg mkfs.exfat exfatprogs
need_pkg sfdisk fdisk
need_pkg "$STUB" systemd-boot-efi

if [[ -z "${SOURCE_DATE_EPOCH:-}" ]]; then
    SOURCE_DATE_EPOCH="$(git -C "$VM_ROOT" log -1 --format=%ct 2>/dev/null || echo 1700000000)"
fi
export SOURCE_DATE_EPOCH
T0="$(now_s)"

# --- inputs: kernel + modules (ci/vm/kernel.sh), static binaries -----------------------------
MACRESCUE_KERNEL_DEST="$KDEST" MACRESCUE_VM_MODULES="$(echo $MODULES)" \
    "$VM_ROOT/ci/vm/kernel.sh" "$ARCH"
KV="$(cat "$KDEST/kernel.version")"
if [[ "${MACRESCUE_SKIP_BUILD:-0}" != 1 ]]; then
    "$VM_ROOT/ci/vm/static.sh" >/dev/null
    log "cargo build --release --target $TARGET -p macrescue-init"
    (cd "$VM_ROOT" && cargo build --release --locked --target "$TARGET" -p macrescue-init >&2)
fi
REL="$VM_ROOT/target/$TARGET/release"
for b in restore-agent macrescue-init; do
    [[ -x "$REL/$b" ]] || die "$REL/$b missing: build without MACRESCUE_SKIP_BUILD"
done

# --- initramfs --------------------------------------------------------------------------------
mkdir -p "$PARTS"
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/macrescue-image.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
R="$STAGE/root"
mkdir -p "$R"/{bin,sbin,dev,proc,sys,run,tmp,data,etc}
if [[ "$KIND" == reference ]]; then
    # The issue's yardstick: how fast the same kernel reaches a busybox shell from the stick.
    install -m 0755 "$KDEST/busybox" "$R/bin/busybox"
    ln -s busybox "$R/bin/sh"
    cat >"$R/init" <<'REF'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
read up _ </proc/uptime
echo "MACRESCUE-REFERENCE: shell ready $up s after kernel start"
/bin/busybox poweroff -f
REF
    chmod 0755 "$R/init"
else
    install -m 0755 "$REL/macrescue-init" "$R/init"
    install -m 0755 "$REL/restore-agent" "$R/bin/restore-agent"
    # The kernel's request_module() runs /sbin/modprobe: the init answers under that name.
    ln -s ../init "$R/sbin/modprobe"
fi
if [[ "$KIND" == station && "${MACRESCUE_IMAGE_SHELL:-1}" == 1 ]]; then
    install -m 0755 "$KDEST/busybox" "$R/bin/busybox"
    # Only the applets a technician needs to look around; no busybox init or modprobe.
    for a in sh ls cat dmesg mount umount ps kill ip df free less vi cp mv rm mkdir sync \
        poweroff reboot halt lsusb; do
        ln -s busybox "$R/bin/$a"
    done
fi
[[ "$KIND" == reference ]] || cp -a "$KDEST/modules/lib" "$R/"
cat >"$R/etc/os-release" <<OSR
NAME="macrescue"
ID=macrescue
PRETTY_NAME="macrescue rescue station"
HOME_URL="https://github.com/macrescue/macrescue"
OSR
cp "$R/etc/os-release" "$STAGE/os-release"
find "$R" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
INITRD="$PARTS/initramfs.cpio.zst"
(cd "$R" && find . -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    zstd -q -19 -T1 --no-check -f -o "$INITRD.tmp"
mv "$INITRD.tmp" "$INITRD"

# --- unified kernel image ----------------------------------------------------------------------
# console=tty0 and ttyS0: the screen and a serial cable both get the station (init writes to
# every console). panic=10: a station that crashes comes back by itself.
# vhci-hcd (the station's USB/IP client) has no device to be matched by modalias: load it at
# boot, before the station (loading it later, from the running station, hung the guest).
CMDLINE="console=tty0 console=ttyS0,115200n8 quiet loglevel=4 panic=10 macrescue.modules=vhci-hcd macrescue.station=\"$STATION\""
[[ "$KIND" == station ]] || CMDLINE="console=tty0 console=ttyS0,115200n8 quiet loglevel=4 panic=10"
CMDLINE+="${MACRESCUE_KERNEL_ARGS:+ $MACRESCUE_KERNEL_ARGS}"
printf '%s' "$CMDLINE" >"$STAGE/cmdline.txt"
VMLINUZ="$KDEST/vmlinuz"
align() { echo $(((($1) + 0xfff) & ~0xfff)); }
# Sections go after the stub's own image; the initrd follows the kernel wherever it ends.
LINUX_VMA=$((0x2000000))
INITRD_VMA="$(align $((LINUX_VMA + $(stat -c %s "$VMLINUZ"))))"
UKI="$PARTS/macrescue.efi"
objcopy \
    --add-section .osrel="$STAGE/os-release" --change-section-vma .osrel=0x20000 \
    --add-section .cmdline="$STAGE/cmdline.txt" --change-section-vma .cmdline=0x30000 \
    --add-section .linux="$VMLINUZ" --change-section-vma .linux="$LINUX_VMA" \
    --add-section .initrd="$INITRD" --change-section-vma .initrd="$INITRD_VMA" \
    "$STUB" "$UKI.tmp"
# objcopy stamps the PE header with the current time (it ignores SOURCE_DATE_EPOCH) and fills
# in the optional PE checksum over that. Pin the stamp and zero the checksum ("not computed",
# which UEFI loaders and sbsign accept; firmware never verifies it).
le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $((($1 >> 8) & 255)) $((($1 >> 16) & 255)) $((($1 >> 24) & 255)); }
PE="$(od -An -tu4 -j60 -N4 "$UKI.tmp" | tr -d ' ')"
printf "$(le32 "$SOURCE_DATE_EPOCH")" | dd of="$UKI.tmp" bs=1 seek=$((PE + 8)) conv=notrunc status=none
printf "$(le32 0)" | dd of="$UKI.tmp" bs=1 seek=$((PE + 24 + 64)) conv=notrunc status=none
mv "$UKI.tmp" "$UKI"

# --- ESP (FAT32) -------------------------------------------------------------------------------
ESP="$STAGE/esp.img"
rm -f "$ESP"
mkfs.vfat -F 32 -n MRESCUE-EFI -i 4d524553 --invariant -C "$ESP" $((ESP_MIB * 1024)) >/dev/null
touch -d "@$SOURCE_DATE_EPOCH" "$UKI"
mmd -i "$ESP" ::/EFI ::/EFI/BOOT
mcopy -m -i "$ESP" "$UKI" ::/EFI/BOOT/BOOTX64.EFI
[[ "$(stat -c %s "$UKI")" -lt $(((ESP_MIB - 2) * 1024 * 1024)) ]] || die "UKI does not fit the ${ESP_MIB} MiB ESP"

# --- data partition (exFAT) --------------------------------------------------------------------
DATA="$STAGE/data.img"
truncate -s "${DATA_MIB}M" "$DATA"
mkfs.exfat -L MACRESCUE "$DATA" >/dev/null
"$HERE/exfat-serial.sh" "$DATA" 4d524553

# --- GPT disk ----------------------------------------------------------------------------------
# 1 MiB alignment; the backup GPT needs the last 33 sectors.
ESP_START=2048
DATA_START=$((ESP_START + ESP_MIB * 2048))
TOTAL_SECTORS=$((DATA_START + DATA_MIB * 2048 + 2048))
rm -f "$IMAGE.tmp"
truncate -s $((TOTAL_SECTORS * 512)) "$IMAGE.tmp"
sfdisk -q --no-reread --no-tell-kernel "$IMAGE.tmp" <<GPT
label: gpt
label-id: 6D616372-6573-4375-A500-000000000001
first-lba: 2048
start=$ESP_START, size=$((ESP_MIB * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=6D616372-6573-4375-A500-0000000000E5, name="ESP"
start=$DATA_START, size=$((DATA_MIB * 2048)), type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, uuid=6D616372-6573-4375-A500-0000000000DA, name="MACRESCUE"
GPT
dd if="$ESP" of="$IMAGE.tmp" bs=512 seek="$ESP_START" conv=notrunc,sparse status=none
dd if="$DATA" of="$IMAGE.tmp" bs=512 seek="$DATA_START" conv=notrunc,sparse status=none
mv "$IMAGE.tmp" "$IMAGE"
zstd -q -19 -T1 -f "$IMAGE" -o "$IMAGE.zst"
# .xz too: every GUI imager (balenaEtcher, Raspberry Pi Imager) opens it without unpacking.
xz -9 -T1 -c "$IMAGE" >"$IMAGE.xz"

size() { stat -c %s "$1"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }
log "built in $(elapsed "$T0") s (kernel $KV, SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"
log "initramfs  $(mib "$(size "$INITRD")")  $INITRD"
log "UKI        $(mib "$(size "$UKI")")  $UKI (kernel $(mib "$(size "$VMLINUZ")"))"
log "image      $(mib "$(size "$IMAGE")")  $IMAGE"
log "download   $(mib "$(size "$IMAGE.zst")")  $IMAGE.zst, $(mib "$(size "$IMAGE.xz")") .xz"
(cd "$(dirname "$IMAGE")" && sha256sum "$(basename "$IMAGE")") >&2
echo "$IMAGE"
