#!/usr/bin/env bash
# Assemble a macrescue image for PLATFORM from Debian's kernel, the static agent and
# macrescue-init. PLATFORM is x86_64 or aarch64 (UEFI USB stick) or rpi (Raspberry Pi 4/5 SD
# card, aarch64). One code path for all three: only the kernel source, the module list, the
# console names and the boot partition's contents differ.
#
#   out/image/ARCH/initramfs.img        /init, /bin/modprobe → /init, the driver modules real
#                                       stations need; restore-agent and busybox sh as a second
#                                       stage the init inflates (initramfs-{stage2,boot}.* are
#                                       its two parts)
#   out/image/ARCH/macrescue.efi        unified kernel image (systemd's stub + kernel + cmdline
#                                       + initramfs), unsigned (x86_64, aarch64)
#   out/macrescue-ARCH.img              GPT: ESP (FAT32, EFI/BOOT/BOOTX64.EFI or BOOTAA64.EFI)
#                                       + data partition (exFAT, GPT name and label MACRESCUE)
#   out/macrescue-rpi.img               hybrid MBR/GPT: FAT32 boot partition (Pi firmware,
#                                       config.txt, cmdline.txt, kernel, DTBs, initramfs) + the
#                                       same data partition
#   out/macrescue-ARCH.img.{zst,xz}     the download (xz for GUI imagers)
#
# Reproducible: same inputs (kernel package, binaries, SOURCE_DATE_EPOCH) → same bytes. Every
# timestamp is SOURCE_DATE_EPOCH (default: the last commit), every owner root, every random
# identifier (disk/partition GUIDs, FAT and exFAT serials) a constant.
#
# Interface (kept stable for callers such as nix/): the platform is the only argument, every
# other input is an environment variable; stdout is the image path and nothing else.
# usage: image/build.sh [x86_64 | aarch64 | rpi]
# env:   MACRESCUE_IMAGE_OUT      output dir for the parts (default out/image/PLATFORM)
#        MACRESCUE_IMAGE          image path (default out/macrescue-PLATFORM.img)
#        MACRESCUE_STATION        station command baked into the kernel command line
#        MACRESCUE_IMAGE_SHELL=0  leave busybox (the emergency shell) out
#        MACRESCUE_KERNEL_ARGS    extra kernel command-line words (e.g. usb-storage.delay_use=0)
#        MACRESCUE_DATA_MIB       size of the data partition (default 64; the init grows it to
#                                 fill the medium on first boot)
#        MACRESCUE_SKIP_BUILD=1   use the binaries already built
#        MACRESCUE_KERNEL_SUITE   arm64: the Debian suite whose kernel to use (trixie-backports)
#        MACRESCUE_IMAGE_KIND=reference  the boot-time reference instead (same kernel, same
#                                 stick layout, busybox /init that prints the kernel uptime and
#                                 powers off): out/macrescue-reference-PLATFORM.img
#        MACRESCUE_SB_KEY, MACRESCUE_SB_CERT  PEM key and certificate: sign the UKI for Secure
#                                 Boot with sbsign (sbsigntool) before it goes on the ESP
# Given inputs instead of Debian's kernel and a cargo build (what the Nix flake uses, nix/):
#        MACRESCUE_KERNEL_DIR=DIR vmlinuz, kernel.version, busybox and modules/lib/modules/KV
#                                 (with depmod's index), i.e. ci/vm/kernel.sh's output layout
#        MACRESCUE_BIN_DIR=DIR    DIR/restore-agent and DIR/macrescue-init for the target;
#                                 nothing is compiled
#        MACRESCUE_DATAPART=FILE  a macrescue-datapart that runs on the build machine (formats
#                                 the data partition; default: built for the host here)
#        MACRESCUE_EFI_STUB=FILE  systemd-boot's linuxx64/linuxaa64.efi.stub (default: Debian's)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/../ci/vm/lib.sh"

PLATFORM="${1:-x86_64}"
case "$PLATFORM" in
    rpi | raspi | raspberrypi) PLATFORM=rpi ARCH=aarch64 ;;
    *) ARCH="$(vm_arch "$PLATFORM")" PLATFORM="$ARCH" ;;
esac
TARGET="$ARCH-unknown-linux-musl"
KIND="${MACRESCUE_IMAGE_KIND:-station}"
case "$KIND" in
    station) PARTS="${MACRESCUE_IMAGE_OUT:-$VM_OUT/image/$PLATFORM}"
        IMAGE="${MACRESCUE_IMAGE:-$VM_OUT/macrescue-$PLATFORM.img}" ;;
    reference) PARTS="${MACRESCUE_IMAGE_OUT:-$VM_OUT/image/reference-$PLATFORM}"
        IMAGE="${MACRESCUE_IMAGE:-$VM_OUT/macrescue-reference-$PLATFORM.img}" ;;
    *) die "MACRESCUE_IMAGE_KIND must be station or reference" ;;
esac
# aarch64 and rpi share one kernel and module set (so one initramfs content).
KDEST="${MACRESCUE_KERNEL_DIR:-$VM_OUT/image/kernel-$ARCH}"
# Reports, logs and the IPSW cache live on the data partition (the init mounts it at /data).
# --ipsw-dir /media: other USB disks, mounted read-only there by the init, offer their IPSWs.
STATION="${MACRESCUE_STATION:-restore-agent station --data /data --cache /data/ipsw --ipsw-dir /media}"
DATA_MIB="${MACRESCUE_DATA_MIB:-64}"
# Drivers a station needs: USB host controllers and mass storage (the stick itself, IPSW
# disks), the data partition's file systems, common wired NICs, and vhci-hcd for the simulated
# Mac in tests. Their dependency closure comes along.
MODULES="usb-storage uas sd_mod vfat exfat nls_cp437 nls_ascii nls_utf8 nls_iso8859-1"
if [[ "$ARCH" == x86_64 ]]; then
    MODULES="xhci-pci ehci-pci ohci-pci uhci-hcd $MODULES virtio_net virtio_pci e1000 e1000e r8169
     vhci-hcd"
    STUB="${MACRESCUE_EFI_STUB:-/usr/lib/systemd/boot/efi/linuxx64.efi.stub}"
    OBJCOPY=objcopy
    EFI_BOOT=BOOTX64.EFI
    # The screen and a PC's serial port.
    CONSOLES="console=tty0 console=ttyS0,115200n8"
else
    # arm64 boards: PCI and DT-described (platform) xHCI/EHCI/OHCI, DesignWare dwc2 (the Pi 4's
    # USB-C port) and dwc3. Raspberry Pi 4: reset-raspberrypi (loads the VL805 xHCI's
    # firmware), sdhci-iproc (its SD card; Pi 3 and older: bcm2835 sdhost), bcm2835_wdt (reboot
    # and power-off go through the watchdog). NICs: the Pi 4's GENET (genet, its MDIO bus and
    # PHYs), the Pi 3's smsc95xx/lan78xx, PCIe r8169/e1000e, common USB adapters, virtio for
    # QEMU's virt machine. USB keyboards (usbhid): a board has no PS/2 keyboard for the
    # console's erase confirmation, the emergency shell and Ctrl-Alt-Del.
    # Raspberry Pi 5: its USB ports, Ethernet and 40-pin GPIO sit on the RP1 chip behind PCIe
    # (the root port needs the bcm2712-mip MSI controller): rp1_pci, RP1's clocks (clk-rp1) and
    # GPIO (pinctrl-rp1), its two dwc3 xHCIs, its Cadence GEM NIC (macb, Broadcom PHY); its SD
    # card: sdhci-brcmstb with the SoC's pinctrl and GPIO. Both Pis' SD slots are powered
    # through regulator-fixed / regulator-gpio nodes (fixed, gpio-regulator).
    MODULES="xhci-pci xhci-plat-hcd ehci-pci ehci-platform ohci-pci ohci-platform dwc2 dwc3
     dwc3-of-simple reset-raspberrypi sdhci-iproc bcm2835 bcm2835_wdt $MODULES virtio_net virtio_mmio
     genet mdio-bcm-unimac broadcom bcm7xxx smsc95xx lan78xx r8169 e1000e r8152 cdc_ether
     ax88179_178a usbhid hid-generic vhci-hcd
     fixed gpio-regulator rp1_pci clk-rp1 pinctrl-rp1 macb irq-bcm2712-mip sdhci-brcmstb
     pinctrl-brcmstb-bcm2712 gpio-brcmstb"
    # The kernel for both arm64 images: Debian 13's backports, resolved through its
    # linux-image-arm64 meta package on every build. Debian 12's 6.1 has no Pi 5 device tree
    # and bookworm-backports' 6.12 no RP1 drivers; trixie-backports' kernels (6.18 on) have
    # both (image/README.md, "aarch64 and Raspberry Pi").
    export MACRESCUE_KERNEL_SUITE="${MACRESCUE_KERNEL_SUITE:-trixie-backports}"
    # systemd-boot-efi:arm64 cannot be installed beside the amd64 one: unpacked from its .deb.
    STUB="${MACRESCUE_EFI_STUB:-$VM_CACHE/systemd-boot-efi-arm64/usr/lib/systemd/boot/efi/linuxaa64.efi.stub}"
    OBJCOPY=aarch64-linux-gnu-objcopy
    EFI_BOOT=BOOTAA64.EFI
    # UEFI: the screen and QEMU virt's / most servers' PL011. Pi 4 (upstream device tree, mini
    # UART on GPIO 14/15 with enable_uart=1): ttyS1; Pi 5 (debug UART connector): ttyAMA10.
    # A console= naming a device the board lacks is ignored.
    CONSOLES="console=tty0 console=ttyAMA0,115200"
    [[ "$PLATFORM" != rpi ]] || CONSOLES="console=tty1 console=ttyS1,115200 console=ttyAMA10,115200"
fi
# USB keyboards (the erase confirmation, the emergency shell, Ctrl-Alt-Del): usbhid, and besides
# hid-generic the HID drivers that claim common keyboards instead of it (the kernel's special-
# driver list: Apple, Logitech and its receivers, Microsoft, Lenovo, Cherry, Chicony). They load
# by modalias when a keyboard appears, never at boot without one.
MODULES+=" usbhid hid-generic hid-apple hid-logitech hid-logitech-dj hid-microsoft hid-lenovo
 hid-cherry hid-chicony"

need_pkg cpio cpio
need_pkg zstd zstd
need_pkg lz4 lz4
need_pkg xz xz-utils
need_pkg "$OBJCOPY" "$([[ $ARCH == x86_64 ]] && echo binutils || echo binutils-aarch64-linux-gnu)"
need_pkg mcopy mtools
need_pkg mkfs.vfat dosfstools
need_pkg mkfs.exfat exfatprogs
need_pkg sfdisk fdisk
if [[ "$ARCH" == x86_64 ]]; then
    need_pkg "$STUB" systemd-boot-efi
fi

if [[ -z "${SOURCE_DATE_EPOCH:-}" ]]; then
    SOURCE_DATE_EPOCH="$(git -C "$VM_ROOT" log -1 --format=%ct 2>/dev/null || echo 1700000000)"
fi
export SOURCE_DATE_EPOCH
T0="$(now_s)"

# --- inputs: kernel + modules (ci/vm/kernel.sh), static binaries -----------------------------
if [[ -z "${MACRESCUE_KERNEL_DIR:-}" ]]; then
    MACRESCUE_KERNEL_DEST="$KDEST" MACRESCUE_VM_MODULES="$(echo $MODULES)" \
        "$VM_ROOT/ci/vm/kernel.sh" "$ARCH"
fi
KV="$(cat "$KDEST/kernel.version")"
if [[ "$PLATFORM" == aarch64 && ! -f "$STUB" ]]; then
    # kernel.sh added the arm64 dpkg architecture, so apt can fetch arm64 packages now.
    (mkdir -p "$VM_CACHE/debs" && cd "$VM_CACHE/debs" &&
        apt-get download -qq systemd-boot-efi:arm64 2>&1 | grep -v unsandboxed >&2 || true)
    deb="$(ls -t "$VM_CACHE"/debs/systemd-boot-efi_*_arm64.deb 2>/dev/null | head -1 || true)"
    [[ -n "$deb" ]] || die "apt-get download systemd-boot-efi:arm64 failed"
    dpkg-deb -x "$deb" "$VM_CACHE/systemd-boot-efi-arm64"
    [[ -f "$STUB" ]] || die "$deb has no linuxaa64.efi.stub"
fi
if [[ "${MACRESCUE_SKIP_BUILD:-0}" != 1 && -z "${MACRESCUE_BIN_DIR:-}" ]]; then
    if [[ "$ARCH" == x86_64 ]]; then
        "$VM_ROOT/ci/vm/static.sh" >/dev/null
        log "cargo build --release --target $TARGET -p macrescue-init"
        (cd "$VM_ROOT" && cargo build --release --locked --target "$TARGET" -p macrescue-init >&2)
    else
        "$HERE/cross.sh" "$ARCH" >/dev/null
    fi
    if [[ -z "${MACRESCUE_DATAPART:-}" ]]; then
        # The data partition is formatted here, on the build machine, whatever the target.
        log "cargo build --release -p macrescue-init --bin macrescue-datapart (host)"
        (cd "$VM_ROOT" && cargo build --release --locked -p macrescue-init --bin macrescue-datapart >&2)
    fi
fi
REL="${MACRESCUE_BIN_DIR:-$VM_ROOT/target/$TARGET/release}"
for b in restore-agent macrescue-init; do
    [[ -x "$REL/$b" ]] || die "$REL/$b missing: build without MACRESCUE_SKIP_BUILD"
done
DATAPART="${MACRESCUE_DATAPART:-$VM_ROOT/target/release/macrescue-datapart}"
[[ -x "$DATAPART" ]] || die "$DATAPART missing: build without MACRESCUE_SKIP_BUILD"

# --- initramfs --------------------------------------------------------------------------------
# Two parts, concatenated (the kernel unpacks one after the other):
#   initramfs-stage2.cpio    uncompressed cpio the kernel only copies: the agent and busybox as
#                            lz4 frames under lib/macrescue/stage2/, inflated by the init on
#                            another CPU while the drivers load (image/init/src/stage2.rs)
#   initramfs-boot.cpio.lz4  lz4 (legacy format, the kernel's RD_LZ4): the init, the drivers,
#                            the symlinks to the second stage's programs
# The kernel decompresses the boot part before it starts /init, and a built-in crypto
# self-test waits for that in the middle of the kernel's own start: every byte here is on the
# way to the stick, and lz4 unpacks several times faster than zstd (image/README.md, "Where
# the time goes"). The reference uses the same compression.
mkdir -p "$PARTS"
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/macrescue-image.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
R="$STAGE/root" S="$STAGE/stage2"
S2="$S/lib/macrescue/stage2"
mkdir -p "$R"/{bin,sbin,dev,proc,sys,run,tmp,data,etc}
# stage2 PROGRAM DEST: PROGRAM as /DEST, inflated by the init.
stage2() {
    mkdir -p "$(dirname "$S2/$2")"
    lz4 -q -12 -f "$1" "$S2/$2.lz4"
}
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
    stage2 "$REL/restore-agent" bin/restore-agent
    # The kernel's request_module() helper; the init registers it in /proc/sys/kernel/modprobe
    # when it starts. Not at the kernel's default /sbin/modprobe: built-in crypto self-tests
    # ask for modules during the kernel's own start, and each such request would wait for the
    # whole initramfs to be unpacked and then run this binary for nothing (image/README.md).
    ln -s ../init "$R/bin/modprobe"
fi
if [[ "$KIND" == station && "${MACRESCUE_IMAGE_SHELL:-1}" == 1 ]]; then
    stage2 "$KDEST/busybox" bin/busybox
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
mkdir -p "$S"
find "$R" "$S" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
# newc cpio of directory $1, reproducibly, on stdout.
cpio_of() {
    (cd "$1" && find . -print0 | LC_ALL=C sort -z |
        cpio --null --create --format=newc --owner=0:0 --reproducible --quiet)
}
INITRD="$PARTS/initramfs.img"
rm -f "$PARTS/initramfs.cpio.zst"
cpio_of "$R" | lz4 -q -l -12 -f - "$PARTS/initramfs-boot.cpio.lz4"
PIECES=("$PARTS/initramfs-boot.cpio.lz4")
rm -f "$PARTS/initramfs-stage2.cpio"
if [[ -n "$(find "$S" -type f -print -quit)" ]]; then
    cpio_of "$S" >"$PARTS/initramfs-stage2.cpio"
    # Uncompressed first: the kernel's lz4 reader takes everything after its start as lz4.
    PIECES=("$PARTS/initramfs-stage2.cpio" "${PIECES[@]}")
fi
cat "${PIECES[@]}" >"$INITRD.tmp"
mv "$INITRD.tmp" "$INITRD"
echo "$SOURCE_DATE_EPOCH" >"$PARTS/source-date-epoch"

# --- kernel command line -----------------------------------------------------------------------
# The screen and a serial cable both get the station (init writes to every console).
# panic=10: a station that crashes comes back by itself.
# macrescue.modules: the stick's storage stack loads while the host controllers come up, not
# after the stick appears; usb-storage.delay_use=0: probe the stick when it enumerates, not a
# second later (the init rescans SCSI hosts if a slow stick showed no disk; image/README.md).
# vhci-hcd (the station's USB/IP client) is not listed: the init loads it before the station
# starts when the station is set up for USB/IP (--usbip, or usbip in the config file).
CMDLINE="$CONSOLES quiet loglevel=4 panic=10"
[[ "$KIND" != station ]] || CMDLINE+=" macrescue.station=\"$STATION\" macrescue.modules=usb-storage,uas,sd_mod,exfat usb-storage.delay_use=0"
CMDLINE+="${MACRESCUE_KERNEL_ARGS:+ $MACRESCUE_KERNEL_ARGS}"
printf '%s' "$CMDLINE" >"$STAGE/cmdline.txt"
VMLINUZ="$KDEST/vmlinuz"
BOOT_MIB=64
# Debian's arm64 Image is uncompressed and grows (6.12: 42 MiB, 7.3: 49 MiB): room for years.
[[ "$ARCH" == x86_64 ]] || BOOT_MIB=96

if [[ "$PLATFORM" != rpi ]]; then
# --- unified kernel image ----------------------------------------------------------------------
align() { echo $(((($1) + 0xfff) & ~0xfff)); }
# Sections go after the stub's own image; the initrd follows the kernel wherever it ends.
LINUX_VMA=$((0x2000000))
INITRD_VMA="$(align $((LINUX_VMA + $(stat -c %s "$VMLINUZ"))))"
UKI="$PARTS/macrescue.efi"
"$OBJCOPY" \
    --add-section .osrel="$STAGE/os-release" --change-section-vma .osrel=0x20000 \
    --add-section .cmdline="$STAGE/cmdline.txt" --change-section-vma .cmdline=0x30000 \
    --add-section .linux="$VMLINUZ" --change-section-vma .linux="$LINUX_VMA" \
    --add-section .initrd="$INITRD" --change-section-vma .initrd="$INITRD_VMA" \
    "$STUB" "$UKI.tmp"
# objcopy stamps the PE header with the current time (it ignores SOURCE_DATE_EPOCH) and fills
# in the optional PE checksum over that. Pin the stamp and zero the checksum ("not computed",
# which UEFI loaders and sbsign accept; firmware never verifies it). The offsets hold for both
# stubs: the checksum precedes the optional-header fields whose size differs between PE formats.
le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $((($1 >> 8) & 255)) $((($1 >> 16) & 255)) $((($1 >> 24) & 255)); }
PE="$(od -An -tu4 -j60 -N4 "$UKI.tmp" | tr -d ' ')"
printf "$(le32 "$SOURCE_DATE_EPOCH")" | dd of="$UKI.tmp" bs=1 seek=$((PE + 8)) conv=notrunc status=none
printf "$(le32 0)" | dd of="$UKI.tmp" bs=1 seek=$((PE + 24 + 64)) conv=notrunc status=none
mv "$UKI.tmp" "$UKI"
if [[ -n "${MACRESCUE_SB_KEY:-}" || -n "${MACRESCUE_SB_CERT:-}" ]]; then
    [[ -f "${MACRESCUE_SB_KEY:-}" && -f "${MACRESCUE_SB_CERT:-}" ]] ||
        die "Secure Boot signing needs both MACRESCUE_SB_KEY and MACRESCUE_SB_CERT (PEM files)"
    need_pkg sbsign sbsigntool
    # One Authenticode signature covers kernel, initramfs and command line together.
    sbsign --key "$MACRESCUE_SB_KEY" --cert "$MACRESCUE_SB_CERT" --output "$UKI.signed" "$UKI" 2>/dev/null
    mv "$UKI.signed" "$UKI"
    log "UKI signed for Secure Boot with $(basename "$MACRESCUE_SB_CERT")"
fi

# --- ESP (FAT32) -------------------------------------------------------------------------------
BOOTFS="$STAGE/esp.img"
rm -f "$BOOTFS"
mkfs.vfat -F 32 -n MRESCUE-EFI -i 4d524553 --invariant -C "$BOOTFS" $((BOOT_MIB * 1024)) >/dev/null
touch -d "@$SOURCE_DATE_EPOCH" "$UKI"
mmd -i "$BOOTFS" ::/EFI ::/EFI/BOOT
mcopy -m -i "$BOOTFS" "$UKI" "::/EFI/BOOT/$EFI_BOOT"
[[ "$(stat -c %s "$UKI")" -lt $(((BOOT_MIB - 2) * 1024 * 1024)) ]] || die "UKI does not fit the ${BOOT_MIB} MiB ESP"
else
# --- Raspberry Pi boot partition (FAT32) -------------------------------------------------------
# The Pi's own firmware boots it, no UEFI: the GPU firmware (start4.elf + fixup4.dat on a
# Pi 4; a Pi 5 has it in its EEPROM) reads config.txt, loads the kernel, the initramfs and the
# board's device tree from this partition and passes cmdline.txt.
# Given inputs (Nix): MACRESCUE_RPI_FIRMWARE is a folder with start4.elf, fixup4.dat, bootcode.bin.
FWFILES="${MACRESCUE_RPI_FIRMWARE:-}"
if [[ -z "$FWFILES" ]]; then
    FWDIR="$VM_CACHE/raspi-firmware"
    FWDEB="$(ls -t "$VM_CACHE"/debs/raspi-firmware_*_all.deb 2>/dev/null | head -1 || true)"
    if [[ -z "$FWDEB" || ! -f "$FWDIR/.stamp" || "$(cat "$FWDIR/.stamp")" != "$(basename "$FWDEB")" ]]; then
        extra_apt arm64 "$MACRESCUE_KERNEL_SUITE"
        (mkdir -p "$VM_CACHE/debs" && cd "$VM_CACHE/debs" &&
            apt-get "${EXTRA_APT[@]}" download -qq raspi-firmware 2>&1 | grep -v unsandboxed >&2 || true)
        FWDEB="$(ls -t "$VM_CACHE"/debs/raspi-firmware_*_all.deb 2>/dev/null | head -1 || true)"
        [[ -n "$FWDEB" ]] || die "apt-get download raspi-firmware (non-free-firmware) failed"
        rm -rf "$FWDIR"
        dpkg-deb -x "$FWDEB" "$FWDIR"
        basename "$FWDEB" >"$FWDIR/.stamp"
    fi
    FWFILES="$FWDIR/usr/lib/raspi-firmware"
fi
DTBDIR="$KDEST/dtbs"
B="$STAGE/boot"
mkdir -p "$B"
for f in start4.elf fixup4.dat bootcode.bin; do
    install -m 0644 "$FWFILES/$f" "$B/$f"
done
# Pi 4 B, Pi 400, Compute Module 4 (on its IO board), Pi 5 B. The firmware picks by board.
# A Pi 5 with the BCM2712 D0 stepping (2 and 16 GB, later 4 and 8 GB boards; other pin
# controller) looks for bcm2712d0-rpi-5-b.dtb first: upstream calls it bcm2712-d-rpi-5-b.
for d in bcm2711-rpi-4-b bcm2711-rpi-400 bcm2711-rpi-cm4-io bcm2712-rpi-5-b; do
    [[ -f "$DTBDIR/$d.dtb" ]] || die "kernel $KV has no $d.dtb"
    install -m 0644 "$DTBDIR/$d.dtb" "$B/$d.dtb"
done
if [[ -f "$DTBDIR/bcm2712-d-rpi-5-b.dtb" ]]; then
    install -m 0644 "$DTBDIR/bcm2712-d-rpi-5-b.dtb" "$B/bcm2712d0-rpi-5-b.dtb"
else
    log "warning: kernel $KV has no bcm2712-d-rpi-5-b.dtb: D0 Pi 5 boards get the C1 tree"
fi
# Debian's arm64 vmlinuz is a plain (uncompressed) Image, which every Pi firmware loads.
install -m 0644 "$VMLINUZ" "$B/vmlinuz"
install -m 0644 "$INITRD" "$B/initramfs.img"
cat >"$B/config.txt" <<'CFG'
# macrescue on a Raspberry Pi 4 / 400 / CM4 / 5 (read by the Pi's firmware at power-on)
[all]
arm_64bit=1
kernel=vmlinuz
initramfs initramfs.img followkernel
# Serial console on GPIO 14 (TX) / 15 (RX), 115200 8N1; the station shows there too.
enable_uart=1
# Upstream kernel: no firmware KMS overlay; the console is the firmware's simple framebuffer.
disable_overscan=1
# Uncomment to ignore an HDMI screen and run headless:
#hdmi_ignore_hotplug=1
CFG
printf '%s\n' "$CMDLINE" >"$B/cmdline.txt"
BOOTFS="$STAGE/boot.img"
rm -f "$BOOTFS"
mkfs.vfat -F 32 -n MRESCUE-PI -i 4d524553 --invariant -C "$BOOTFS" $((BOOT_MIB * 1024)) >/dev/null
find "$B" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$B" && LC_ALL=C ls | while read -r f; do mcopy -m -i "$BOOTFS" "$f" "::/$f"; done)
[[ "$(du -sb "$B" | cut -f1)" -lt $(((BOOT_MIB - 2) * 1024 * 1024)) ]] || die "boot files do not fit the ${BOOT_MIB} MiB partition"
cp "$B/config.txt" "$B/cmdline.txt" "$PARTS/"
fi

# --- data partition (exFAT) --------------------------------------------------------------------
DATA="$STAGE/data.img"
truncate -s "${DATA_MIB}M" "$DATA"
# Our formatter, not mkfs.exfat: its FAT and allocation bitmap are reserved for 2 TiB, so the
# init can grow the file system in place on first boot (image/README.md, "Data partition").
# Deterministic: fixed serial, no timestamps.
"$DATAPART" format "$DATA" --label MACRESCUE --serial 4d524553 2>/dev/null

# --- disk --------------------------------------------------------------------------------------
# 1 MiB alignment; the backup GPT needs the last 33 sectors.
BOOT_START=2048
DATA_START=$((BOOT_START + BOOT_MIB * 2048))
TOTAL_SECTORS=$((DATA_START + DATA_MIB * 2048 + 2048))
# The Pi's boot partition is basic data (the Pi firmware looks for FAT; an ESP type would make
# UEFI PCs offer the card), a PC's is the ESP.
BOOT_TYPE=C12A7328-F81F-11D2-BA4B-00A0C93EC93B BOOT_NAME=ESP
[[ "$PLATFORM" != rpi ]] || BOOT_TYPE=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7 BOOT_NAME=RPI-BOOT
rm -f "$IMAGE.tmp"
truncate -s $((TOTAL_SECTORS * 512)) "$IMAGE.tmp"
sfdisk -q --no-reread --no-tell-kernel "$IMAGE.tmp" <<GPT
label: gpt
label-id: 6D616372-6573-4375-A500-000000000001
first-lba: 2048
start=$BOOT_START, size=$((BOOT_MIB * 2048)), type=$BOOT_TYPE, uuid=6D616372-6573-4375-A500-0000000000E5, name="$BOOT_NAME"
start=$DATA_START, size=$((DATA_MIB * 2048)), type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, uuid=6D616372-6573-4375-A500-0000000000DA, name="MACRESCUE"
GPT
if [[ "$PLATFORM" == rpi ]]; then
    # Hybrid MBR: the Pi firmware reads the MBR (older Pi 4 boot EEPROMs know no GPT), Linux
    # reads the GPT (the init finds the data partition by its GPT name, as on the stick).
    # Entry 1: the FAT32 boot partition (0x0c, LBA), entry 2: the data partition (0x07,
    # exFAT), entry 3: 0xee over the GPT's own sectors, which makes Linux use the GPT.
    mbr_entry() { # START SECTORS TYPE → 16 bytes (CHS fields "beyond 8 GiB", LBA only)
        printf '\\x00\\xfe\\xff\\xff\\x%02x\\xfe\\xff\\xff%s%s' "$3" "$(le32 "$1")" "$(le32 "$2")"
    }
    le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $((($1 >> 8) & 255)) $((($1 >> 16) & 255)) $((($1 >> 24) & 255)); }
    printf "$(mbr_entry "$BOOT_START" $((BOOT_MIB * 2048)) 0x0c)$(mbr_entry "$DATA_START" $((DATA_MIB * 2048)) 0x07)$(mbr_entry 1 $((BOOT_START - 1)) 0xee)" |
        dd of="$IMAGE.tmp" bs=1 seek=446 count=48 conv=notrunc status=none
    # Disk signature (MBR offset 440): fixed, like the GUIDs.
    printf '\x4d\x52\x45\x53' | dd of="$IMAGE.tmp" bs=1 seek=440 conv=notrunc status=none
fi
dd if="$BOOTFS" of="$IMAGE.tmp" bs=512 seek="$BOOT_START" conv=notrunc,sparse status=none
dd if="$DATA" of="$IMAGE.tmp" bs=512 seek="$DATA_START" conv=notrunc,sparse status=none
mv "$IMAGE.tmp" "$IMAGE"
zstd -q -19 -T1 -f "$IMAGE" -o "$IMAGE.zst"
# .xz too: every GUI imager (balenaEtcher, Raspberry Pi Imager) opens it without unpacking.
xz -9 -T1 -c "$IMAGE" >"$IMAGE.xz"

size() { stat -c %s "$1"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }
log "built $PLATFORM in $(elapsed "$T0") s (kernel $KV, SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"
log "initramfs  $(mib "$(size "$INITRD")")  $INITRD"
[[ "$PLATFORM" == rpi ]] || log "UKI        $(mib "$(size "$UKI")")  $UKI (kernel $(mib "$(size "$VMLINUZ")"))"
log "image      $(mib "$(size "$IMAGE")")  $IMAGE"
log "download   $(mib "$(size "$IMAGE.zst")")  $IMAGE.zst, $(mib "$(size "$IMAGE.xz")") .xz"
(cd "$(dirname "$IMAGE")" && sha256sum "$(basename "$IMAGE")") >&2
echo "$IMAGE"
