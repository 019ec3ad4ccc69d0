# Shared helpers for the ci/vm scripts (sourced, not run).
# CI runs these on a fresh Debian 12 as root with no stdin: install what is missing, quietly.

VM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VM_OUT="${MACRESCUE_OUT:-$VM_ROOT/out}"
VM_CACHE="$VM_OUT/cache"
export DEBIAN_FRONTEND=noninteractive

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

apt_updated=0
# need_pkg COMMAND-OR-PATH PACKAGE: install PACKAGE unless COMMAND (or PATH) is already there.
need_pkg() {
    local probe="$1" pkg="$2"
    if [[ "$probe" == /* ]]; then [[ -e "$probe" ]] && return 0
    else command -v "$probe" >/dev/null 2>&1 && return 0; fi
    [[ $(id -u) -eq 0 ]] || die "$pkg is missing and we are not root to install it"
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        apt-get update -qq >&2
        apt_updated=1
    fi
    log "installing $pkg"
    apt-get install -y -qq --no-install-recommends "$pkg" >&2
}

# need_rust_target TARGET: Rust's standard library for TARGET, added by rustup when missing.
need_rust_target() {
    command -v cargo >/dev/null || die "cargo not found: install Rust with rustup first"
    rustup target list --installed 2>/dev/null | grep -qx "$1" && return 0
    log "rustup target add $1"
    rustup target add "$1" >&2
}

# musl_kernel_headers DIR GNU_TRIPLE: makes DIR an include dir with only the kernel's uapi
# headers (asm/ from /usr/include/GNU_TRIPLE), so a musl C build never picks up glibc's.
musl_kernel_headers() {
    mkdir -p "$1"
    ln -sfn /usr/include/linux "$1/linux"
    ln -sfn /usr/include/asm-generic "$1/asm-generic"
    ln -sfn "/usr/include/$2/asm" "$1/asm"
}

# Debian architecture name for a Rust/QEMU one.
deb_arch() {
    case "$1" in
        x86_64 | amd64) echo amd64 ;;
        aarch64 | arm64) echo arm64 ;;
        *) die "unsupported architecture $1 (x86_64 or aarch64)" ;;
    esac
}

# Canonical (x86_64/aarch64) name.
vm_arch() {
    case "$1" in
        x86_64 | amd64) echo x86_64 ;;
        aarch64 | arm64) echo aarch64 ;;
        *) die "unsupported architecture $1 (x86_64 or aarch64)" ;;
    esac
}

now_s() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now_s)" 'BEGIN { printf "%.1f", b - a }'; }

# run_vm_test NAME GUEST_SCRIPT: kernel.sh, static.sh (skipped with MACRESCUE_SKIP_BUILD=1),
# initramfs.sh and run.sh for an x86_64 guest running GUEST_SCRIPT; logs how long each took.
# Output goes to out/vm/NAME/. Returns run.sh's status.
run_vm_test() {
    local name="$1" script="$2" here t t_all t_kernel t_build t_initrd t_vm rc
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    local work="$VM_OUT/vm/$name"
    mkdir -p "$work"
    t_all="$(now_s)"
    t="$(now_s)"; "$here/kernel.sh" x86_64; t_kernel="$(elapsed "$t")"
    t="$(now_s)"
    [[ "${MACRESCUE_SKIP_BUILD:-0}" == 1 ]] || "$here/static.sh" >/dev/null
    t_build="$(elapsed "$t")"
    t="$(now_s)"; "$here/initramfs.sh" "$work/initrd.cpio.gz" "$script"; t_initrd="$(elapsed "$t")"
    t="$(now_s)"
    rc=0
    "$here/run.sh" "$work/initrd.cpio.gz" "$work/console.log" || rc=$?
    t_vm="$(elapsed "$t")"
    log "timings (s): kernel.sh $t_kernel, static.sh $t_build, initramfs.sh $t_initrd, VM run $t_vm, total $(elapsed "$t_all")"
    if [[ $rc -eq 0 ]]; then log "$name test PASSED"; else log "$name test FAILED"; fi
    return $rc
}

# extra_apt DEB_ARCH [SUITE]: sets EXTRA_APT to apt-get/apt-cache options for a private package
# index of SUITE's main component (default or "backports": this Debian release's backports)
# and this release's non-free-firmware for DEB_ARCH, kept in out/cache/apt-extra-DEB_ARCH-SUITE
# beside (never instead of) the system's own lists. The arm64 images take the kernel from the
# next release's backports (Raspberry Pi 5: RP1 drivers) and the Pi's boot firmware from
# non-free-firmware; neither is in a stock Debian 12 sources list. The mirror is the one the
# system's sources already use. Only package indexes and .debs are fetched: nothing from SUITE
# is installed.
extra_apt() {
    local arch="$1" suite="${2:-}" codename mirror dir
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    [[ -n "$codename" ]] || die "cannot tell the Debian release from /etc/os-release"
    [[ -n "$suite" && "$suite" != backports ]] || suite="$codename-backports"
    [[ "$suite" =~ ^[a-z]+(-[a-z]+)?$ ]] || die "not a Debian suite name: $suite"
    dir="$VM_CACHE/apt-extra-$arch-$suite"
    # deb822 paragraphs (URIs:/Suites:) or one-line "deb URI SUITE ..." entries.
    mirror="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk -v c="$codename" 'BEGIN { RS = "" } { u = ""; s = 0
            n = split($0, l, "\n"); for (i = 1; i <= n; i++) {
                if (l[i] ~ /^URIs:/) { split(l[i], f, " "); u = f[2] }
                if (l[i] ~ /^Suites:/) { m = split(l[i], f, " "); for (j = 2; j <= m; j++) if (f[j] == c) s = 1 } }
            if (s && u != "") { print u; exit } }')"
    [[ -n "$mirror" ]] || mirror="$(awk -v c="$codename" '$1 == "deb" && $3 == c { print $2; exit }' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)"
    [[ -n "$mirror" ]] || die "no Debian mirror for $codename in /etc/apt/sources.list*"
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
    local want="deb [arch=$arch signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main
deb [arch=$arch signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $codename non-free-firmware"
    [[ -f "$dir/sources.list" && "$(cat "$dir/sources.list")" == "$want" ]] || {
        echo "$want" >"$dir/sources.list"
        rm -f "$dir/lists/"*_Packages* "$dir/updated" 2>/dev/null || true
    }
    EXTRA_APT=(-o "Dir::Etc::sourcelist=$dir/sources.list" -o Dir::Etc::sourceparts=-
        -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache"
        -o "APT::Architecture=$arch" -o "APT::Architectures::=$arch")
    # Refreshed when older than 30 minutes: a kernel update in backports replaces the old
    # package by the next run, and the several builds of one run (kernel.sh is a separate
    # process each time, so a variable would not carry over) share one refresh.
    if [[ "${EXTRA_APT_UPDATED:-}" != "$arch $suite" &&
        -z "$(find "$dir/updated" -mmin -30 2>/dev/null)" ]]; then
        log "apt-get update ($suite main, $codename non-free-firmware for $arch, private lists)"
        if ! apt-get "${EXTRA_APT[@]}" update -qq >&2; then
            # A suite newer than the system is signed with keys that Debian 12's
            # debian-archive-keyring has only since 2023.3+deb12u2 (12.11): update it, retry.
            [[ $(id -u) -eq 0 ]] ||
                die "apt-get update of $suite failed (a newer debian-archive-keyring may help)"
            log "apt-get update of $suite failed: updating debian-archive-keyring, then again"
            apt-get update -qq >&2
            apt-get install -y -qq --no-install-recommends debian-archive-keyring >&2
            apt-get "${EXTRA_APT[@]}" update -qq >&2 || die "apt-get update of $suite failed"
        fi
        touch "$dir/updated"
        export EXTRA_APT_UPDATED="$arch $suite"
    fi
}
