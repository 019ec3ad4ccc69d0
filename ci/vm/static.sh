#!/usr/bin/env bash
# Build restore-agent and mac-sim as static x86_64 musl binaries (release profile) for the VM
# tests, plus the libusb-edge test pair (restore-agent example usb-probe, mac-sim example
# usbip-demo: a plain test device with stalls and NAKed bulk IN that a Mac model lacks).
# Copies them to out/vm/bin and prints that directory on stdout.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

TARGET=x86_64-unknown-linux-musl
need_pkg musl-gcc musl-tools
# linux/*.h for libusb's usbfs backend: musl-gcc ships no kernel headers.
need_pkg /usr/include/linux/usbdevice_fs.h linux-libc-dev
need_rust_target "$TARGET"

# An include dir with only the kernel headers, so musl-gcc does not pick up glibc's.
KH="$VM_CACHE/musl-kernel-headers"
musl_kernel_headers "$KH" x86_64-linux-gnu
export CFLAGS_x86_64_unknown_linux_musl="-isystem $KH"
# Never build libusb's udev backend: the image has no udevd, and libusb's netlink backend is
# what delivers hotplug there (see restore-agent/src/usb/rusb_edge.rs).
export LIBUDEV_NO_PKG_CONFIG=1

cd "$VM_ROOT"
T0="$(now_s)"
log "cargo build --release --target $TARGET (restore-agent, mac-sim)"
cargo build --release --locked --target "$TARGET" -p restore-agent -p mac-sim --bins >&2
cargo build --release --locked --target "$TARGET" -p restore-agent \
    --example usb-probe >&2
cargo build --release --locked --target "$TARGET" -p mac-sim --example usbip-demo >&2
REL="$VM_ROOT/target/$TARGET/release"
BIN="$VM_OUT/vm/bin"
mkdir -p "$BIN"
install -m 0755 "$REL/restore-agent" "$REL/mac-sim" \
    "$REL/examples/usbip-demo" "$REL/examples/usb-probe" "$BIN/"
for b in restore-agent mac-sim usbip-demo usb-probe; do
    file -b "$BIN/$b" 2>/dev/null | grep -q 'static' ||
        ldd "$BIN/$b" 2>&1 | grep -q 'not a dynamic' ||
        log "warning: $BIN/$b may not be static"
done
log "built in $(elapsed "$T0") s: $BIN/{restore-agent,mac-sim,usbip-demo,usb-probe}"
echo "$BIN"
