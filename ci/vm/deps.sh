#!/usr/bin/env bash
# Host packages for the VM tests and the host-side USB/IP cross-check (Debian's `usbip` tool,
# used by tests/mac-sim/tests/usbip_server.rs when present). Safe to run repeatedly; CI calls
# it once before `cargo test` and the ci/vm scripts.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

need_pkg qemu-system-x86_64 qemu-system-x86
need_pkg cpio cpio
need_pkg depmod kmod
need_pkg xz xz-utils
need_pkg musl-gcc musl-tools
need_pkg /usr/include/linux/usbdevice_fs.h linux-libc-dev
need_pkg /usr/sbin/usbip usbip
log "host dependencies present"
