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
