#!/usr/bin/env bash
# Boot a macrescue USB-stick image in QEMU the way ci/boot does (UEFI firmware, the image as a
# USB stick on xHCI, user networking with restrict=on), for `nix run` and the flake's checks.
#
# usage: qemu.sh [--check] [--usb-host BUS-PORT] ARCH IMAGE [extra QEMU args…]
#   --check               no console: exit 0 once the serial console shows the station ready,
#                         non-zero with the console log on a panic or after the timeout
#   --usb-host BUS-PORT   pass a physical host port to the guest (the Mac's cable), e.g. 3-2
#                         or 1-1.4: survives the Mac re-enumerating (image/README.md)
# env:   MACRESCUE_OVMF_CODE, MACRESCUE_OVMF_VARS  UEFI firmware (the flake sets them)
#        MACRESCUE_QEMU_ACCEL   tcg (default) or kvm
#        MACRESCUE_BOOT_TIMEOUT seconds for --check (default 300)
#        MACRESCUE_BOOT_EXPECT  for --check: more console lines (fixed strings, one per line)
#                               that must appear besides "station ready"
set -euo pipefail

CHECK=0
USB_HOST=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --check) CHECK=1; shift ;;
        --usb-host) USB_HOST="$2"; shift 2 ;;
        -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
[[ $# -ge 2 ]] || { sed -n '5,5p' "$0" >&2; exit 2; }
ARCH="$1" IMAGE="$2"
shift 2
: "${MACRESCUE_OVMF_CODE:?set MACRESCUE_OVMF_CODE to the UEFI firmware code image}"
: "${MACRESCUE_OVMF_VARS:?set MACRESCUE_OVMF_VARS to the UEFI variable store template}"
ACCEL="${MACRESCUE_QEMU_ACCEL:-tcg}"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/macrescue-qemu.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
# Writable copies; aarch64 virt wants both flash images exactly 64 MiB.
cp "$MACRESCUE_OVMF_CODE" "$WORK/code.fd"
cp "$MACRESCUE_OVMF_VARS" "$WORK/vars.fd"
chmod u+w "$WORK/code.fd" "$WORK/vars.fd"
case "$ARCH" in
    x86_64) qemu=(qemu-system-x86_64 -M q35 -m 1024) ;;
    aarch64)
        truncate -s 64M "$WORK/code.fd" "$WORK/vars.fd"
        qemu=(qemu-system-aarch64 -M virt -cpu max -m 1024) ;;
    *) echo "qemu.sh: ARCH must be x86_64 or aarch64" >&2; exit 2 ;;
esac
qemu+=(-accel "$ACCEL" -smp 2 -nographic -no-reboot
    -drive if=pflash,format=raw,readonly=on,file="$WORK/code.fd"
    -drive if=pflash,format=raw,file="$WORK/vars.fd"
    -device qemu-xhci,id=xhci
    -drive if=none,id=stick,format=raw,file="$IMAGE",snapshot=on
    -device usb-storage,bus=xhci.0,drive=stick,removable=on
    -netdev user,id=net0,restrict=on -device virtio-net-pci,netdev=net0)
if [[ -n "$USB_HOST" ]]; then
    qemu+=(-device "usb-host,bus=xhci.0,hostbus=${USB_HOST%%-*},hostport=${USB_HOST#*-}")
fi
qemu+=("$@")

if [[ $CHECK == 0 ]]; then
    exec "${qemu[@]}"
fi

LOG="$WORK/console.log"
"${qemu[@]}" </dev/null >"$LOG" 2>&1 &
pid=$!
deadline=$((SECONDS + ${MACRESCUE_BOOT_TIMEOUT:-300}))
result=""
seen() {
    grep -aqF "MACRESCUE: station ready" "$LOG" || return 1
    local want
    while IFS= read -r want; do
        [[ -z "$want" ]] || grep -aqF -- "$want" "$LOG" || return 1
    done <<<"${MACRESCUE_BOOT_EXPECT:-}"
}
while [[ -z "$result" ]]; do
    if seen; then result=pass
    elif grep -q "Kernel panic" "$LOG"; then result="kernel panic"
    elif ! kill -0 "$pid" 2>/dev/null; then result="QEMU exited"
    elif [[ $SECONDS -ge $deadline ]]; then result="no station ready within ${MACRESCUE_BOOT_TIMEOUT:-300} s"
    else sleep 1
    fi
done
kill "$pid" 2>/dev/null || true
wait "$pid" 2>/dev/null || true
if [[ "$result" == pass ]]; then
    grep -a -e "MACRESCUE:" -e "/media" "$LOG" | tr -d '\r'
    exit 0
fi
tr -d '\r' <"$LOG" >&2
echo "boot check failed ($ARCH): $result" >&2
exit 1
