#!/usr/bin/env bash
# Cross-compile the image's static binaries (restore-agent, macrescue-init) for aarch64 musl on
# an x86_64 Debian 12 host, with Debian's own packages only:
#   gcc-aarch64-linux-gnu   C compiler and linker for the C inside the Rust build (vendored
#                           libusb, ring's assembly and C)
#   musl-dev:arm64          musl's aarch64 headers, so that C is compiled against the same libc
#                           Rust links (glibc headers would give a silent ABI mix: struct and
#                           pthread type sizes differ)
#   linux-libc-dev:arm64    the kernel's aarch64 uapi headers (libusb's usbfs backend)
# Rust links with its own self-contained musl (crt objects and libc.a of the rust-std
# component), so the binaries are fully static. Debian's pinned compiler versions make the
# build reproducible like the x86_64 one; no toolchain comes from outside the registries.
#
# usage: image/cross.sh aarch64      (prints the release directory on stdout)
set -euo pipefail
source "$(dirname "$0")/../ci/vm/lib.sh"

ARCH="$(vm_arch "${1:-aarch64}")"
[[ "$ARCH" == aarch64 ]] || die "image/cross.sh builds aarch64 only (x86_64 is native: ci/vm/static.sh)"
TARGET=aarch64-unknown-linux-musl
CROSS=aarch64-linux-gnu

if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    [[ $(id -u) -eq 0 ]] || die "dpkg has no arm64 architecture and we are not root to add it"
    log "dpkg --add-architecture arm64"
    dpkg --add-architecture arm64
    apt-get update -qq >&2
    apt_updated=1
fi
need_pkg "$CROSS-gcc" "gcc-$CROSS"
need_pkg /usr/include/aarch64-linux-musl/stdio.h musl-dev:arm64
need_pkg /usr/include/aarch64-linux-gnu/asm/types.h linux-libc-dev:arm64
need_rust_target "$TARGET"

# musl's headers, then only the kernel's (not glibc's), then gcc's own (stddef.h, arm_neon.h).
KH="$VM_CACHE/musl-kernel-headers-$ARCH"
musl_kernel_headers "$KH" aarch64-linux-gnu
GCC_INC="$("$CROSS-gcc" -print-file-name=include)"
export CC_aarch64_unknown_linux_musl="$CROSS-gcc"
export AR_aarch64_unknown_linux_musl="$CROSS-ar"
export CFLAGS_aarch64_unknown_linux_musl="-nostdinc -isystem /usr/include/aarch64-linux-musl -isystem $KH -isystem $GCC_INC"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER="$CROSS-gcc"
# No udev backend in libusb: the image has no udevd; netlink uevents deliver hotplug.
export LIBUDEV_NO_PKG_CONFIG=1

# The C parts never use __DATE__/__TIME__ (the only thing gcc takes SOURCE_DATE_EPOCH for),
# but cc-rs makes every build script rerun when it changes, i.e. at every commit: keep it out.
unset SOURCE_DATE_EPOCH

cd "$VM_ROOT"
T0="$(now_s)"
log "cargo build --release --target $TARGET -p restore-agent -p macrescue-init"
cargo build --release --locked --target "$TARGET" -p restore-agent --bin restore-agent >&2
cargo build --release --locked --target "$TARGET" -p macrescue-init >&2
REL="$VM_ROOT/target/$TARGET/release"
for b in restore-agent macrescue-init; do
    # A dynamic interpreter would mean the musl self-contained link did not happen.
    if LC_ALL=C "$CROSS-readelf" -l "$REL/$b" 2>/dev/null | grep -q 'Requesting program interpreter'; then
        die "$REL/$b is dynamically linked"
    fi
done
log "built in $(elapsed "$T0") s: $REL/{restore-agent,macrescue-init}"
echo "$REL"
