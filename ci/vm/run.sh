#!/usr/bin/env bash
# Boot an initramfs made by initramfs.sh under QEMU and succeed only if the guest printed the
# success marker.
#
# usage: run.sh INITRD [LOG]
# env:   VM_ARCH (x86_64)
#        MACRESCUE_QEMU_ACCEL   accelerator (default tcg: /dev/kvm on some CI hosts is a
#                               software paravirt backend ~100x slower than TCG; pass kvm only
#                               on hosts with real VT-x/AMD-V)
#        MACRESCUE_VM_TIMEOUT   hard limit in seconds (default 120)
#        MACRESCUE_VM_QUIET=1   do not stream the console; print it only on failure
set -euo pipefail
source "$(dirname "$0")/lib.sh"

[[ $# -ge 1 ]] || die "usage: $0 INITRD [LOG]"
INITRD="$1"
LOG="${2:-${INITRD%.cpio.gz}.console.log}"
ARCH="$(vm_arch "${VM_ARCH:-x86_64}")"
KERNEL="$VM_OUT/vm/$ARCH/kernel"
ACCEL="${MACRESCUE_QEMU_ACCEL:-tcg}"
TIMEOUT="${MACRESCUE_VM_TIMEOUT:-120}"
PASS_MARKER="MACRESCUE-VM-RESULT: PASS"
[[ -f "$INITRD" ]] || die "initramfs $INITRD not found"
[[ -f "$KERNEL" ]] || die "kernel $KERNEL not found: run ci/vm/kernel.sh $ARCH"

case "$ARCH" in
    x86_64)
        need_pkg qemu-system-x86_64 qemu-system-x86
        QEMU=(qemu-system-x86_64 -M pc)
        CONSOLE=ttyS0
        ;;
    aarch64)
        need_pkg qemu-system-aarch64 qemu-system-arm
        # -cpu max is ~5x slower under TCG (pointer authentication emulation).
        QEMU=(qemu-system-aarch64 -M virt -cpu cortex-a72)
        CONSOLE=ttyAMA0
        ;;
esac
need_pkg timeout coreutils

QEMU+=(-accel "$ACCEL" -m 512 -smp 2 -nographic -no-reboot -nic none
    -kernel "$KERNEL" -initrd "$INITRD"
    -append "console=$CONSOLE quiet panic=-1")

log "${QEMU[*]}"
T0="$(now_s)"
set +e
if [[ "${MACRESCUE_VM_QUIET:-0}" == 1 ]]; then
    timeout -k 5 "$TIMEOUT" "${QEMU[@]}" </dev/null >"$LOG" 2>&1
else
    timeout -k 5 "$TIMEOUT" "${QEMU[@]}" </dev/null 2>&1 | tee "$LOG"
fi
RC=${PIPESTATUS[0]}
set -e
# Serial output has CRLF line ends.
if tr -d '\r' <"$LOG" | grep -qx "$PASS_MARKER"; then
    log "PASS in $(elapsed "$T0") s (console log: $LOG)"
    exit 0
fi
[[ "${MACRESCUE_VM_QUIET:-0}" == 1 ]] && cat "$LOG" >&2
if [[ $RC -eq 124 || $RC -eq 137 ]]; then
    log "FAIL: no result after ${TIMEOUT} s (QEMU killed); console log: $LOG"
else
    log "FAIL after $(elapsed "$T0") s (QEMU exit $RC); console log: $LOG"
fi
exit 1
