#!/usr/bin/env bash
# Cross-checks with tools nobody here wrote (issue #6 item 5): Debian's own `irecovery -q`
# (libirecovery) and `usbmuxd` + `idevice_id -l` (libimobiledevice) look at the simulated Mac
# through the guest kernel's USB stack, exactly as they would look at a Mac on a cable.
#
#   DFU       irecovery -q prints the identity mac-sim's serial string and nonce string carry
#   Recovery  the same for iBoot (MODE: Recovery, SRNM instead of SRTG)
#   restore   usbmuxd configures the usbmux interface, does the VERSION handshake and its
#             lockdown preflight (QueryType on port 62078, answered by restored), and
#             idevice_id -l lists the Mac under the serial number its iSerialNumber carries.
#
# Debian 12 ships libirecovery 1.0.0 and usbmuxd 1.1.1, both from June 2020, before the first
# Apple Silicon Mac: irecovery prints no product/model for any Apple Silicon board, and usbmuxd
# ignores the 05ac:1901 restore-mode PID. Both are shown here and explained, with the source
# lines, in tests/mac-sim/README.md ("Cross-checks"); the restore-mode check therefore also runs
# with `--fault restore-pid=0x12ac`, the iOS-range PID an M1 MacBook Pro was seen with.
#
# One boot for all checks. The Debian binaries run with their own shared libraries (ldd
# closure + the dynamic loader) copied into the initramfs; the guest has no udevd, so each tool
# starts after the device is attached (libusb's udev backend still enumerates sysfs, but gets
# no hotplug events without udevd).
#
# usage: xcheck-test.sh      env: XCHECK_BOARD (j274ap), XCHECK_ECID (hex), MACRESCUE_SKIP_BUILD=1,
#                                 and those of run.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

BOARD="${XCHECK_BOARD:-j274ap}"
ECID="${XCHECK_ECID:-000012345678ABCD}"
# A board libirecovery 1.2.1 (2024-10) has no entry for (a 2025 MacBook Pro); empty to skip.
UNKNOWN_BOARD="${XCHECK_UNKNOWN_BOARD-j604ap}"
NAME=xcheck
WORK="$VM_OUT/vm/$NAME"
OVERLAY="$WORK/overlay"

need_pkg irecovery irecovery
need_pkg /usr/sbin/usbmuxd usbmuxd
need_pkg idevice_id libimobiledevice-utils
need_pkg ldd libc-bin

FIXTURES="$VM_ROOT/../shared/fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests"
[[ -d "$FIXTURES" ]] || FIXTURES="${MACRESCUE_SHARED:-}/fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests"
MANIFEST="$(find "$FIXTURES" -maxdepth 1 -iname "${BOARD}.BuildManifest.plist" | head -n 1)"
[[ -n "$MANIFEST" ]] || die "no fixture BuildManifest for board $BOARD in $FIXTURES"
SCENARIO="$VM_ROOT/tests/mac-sim/scenarios/mac-revive.toml"

rm -rf "$OVERLAY"
mkdir -p "$OVERLAY/shared/fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests" \
    "$OVERLAY/xcheck" "$OVERLAY/var"
cp "$MANIFEST" "$OVERLAY/shared/fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests/"
if [[ -n "$UNKNOWN_BOARD" ]]; then
    UMANIFEST="$(find "$FIXTURES" -maxdepth 1 -iname "${UNKNOWN_BOARD}.BuildManifest.plist" | head -n 1)"
    [[ -n "$UMANIFEST" ]] || die "no fixture BuildManifest for board $UNKNOWN_BOARD in $FIXTURES"
    cp "$UMANIFEST" "$OVERLAY/shared/fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests/"
fi
cp "$SCENARIO" "$OVERLAY/xcheck/scenario.toml"
ln -s ../run "$OVERLAY/var/run"
# The Debian binaries and every shared object they load, at the paths the loader expects.
TOOLS=(/usr/bin/irecovery /usr/sbin/usbmuxd /usr/bin/idevice_id)
for f in "${TOOLS[@]}" $(ldd "${TOOLS[@]}" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\/.*ld-linux/ { print $1 }' | sort -u); do
    mkdir -p "$OVERLAY$(dirname "$f")"
    cp -L "$f" "$OVERLAY$f"
done
# Debian 13's irecovery (libirecovery 1.2.1, 2024) knows the Apple Silicon Macs: it checks
# that mac-sim's CPID/BDID pairs are the ones libirecovery's own device table names. It is
# fetched with a private apt state (the host's sources stay Debian 12) and runs in the guest
# through its own loader, next to Debian 12's libraries.
TRIXIE="$VM_CACHE/trixie-apt"
TRIXIE_PKGS="irecovery libirecovery-1.0-5 libimobiledevice-glue-1.0-0 libplist-2.0-4 libusb-1.0-0
    libudev1 libcap2 libreadline8t64 libtinfo6 libc6"
TAPT=(-o "Dir::Etc::SourceList=$TRIXIE/sources.list" -o Dir::Etc::SourceParts=/nonexistent
    -o "Dir::State::Lists=$TRIXIE/lists" -o "Dir::State::Status=$TRIXIE/status"
    -o "Dir::Cache=$TRIXIE/cache" -o Debug::NoLocking=1 -o APT::Architectures::=amd64
    -o Acquire::Languages=none -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
    -o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false
    -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false)
mkdir -p "$TRIXIE/lists/partial" "$TRIXIE/cache/archives/partial" "$TRIXIE/debs"
touch "$TRIXIE/status"
echo "deb http://deb.debian.org/debian trixie main" >"$TRIXIE/sources.list"
# Resolve the closure afresh only when a package is missing (versions move on the mirror).
# shellcheck disable=SC2086
if ! (cd "$TRIXIE/debs" && for p in $TRIXIE_PKGS; do ls "${p}"_*.deb >/dev/null 2>&1 || exit 1; done); then
    log "apt-get update (Debian 13 lists, private state in $TRIXIE)"
    apt-get "${TAPT[@]}" update -qq >&2
    rm -f "$TRIXIE/debs"/*.deb
    (cd "$TRIXIE/debs" && apt-get "${TAPT[@]}" download -qq $TRIXIE_PKGS 2>&1 | grep -v unsandboxed >&2 || true)
fi
TROOT="$TRIXIE/root"
rm -rf "$TROOT"
mkdir -p "$TROOT"
for d in "$TRIXIE/debs"/*.deb; do dpkg-deb -x "$d" "$TROOT"; done
TLD="$TROOT/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
[[ -x "$TLD" && -x "$TROOT/usr/bin/irecovery" ]] || die "Debian 13 irecovery closure incomplete in $TRIXIE/debs"
TLIBS="$TROOT/usr/lib/x86_64-linux-gnu"
mkdir -p "$OVERLAY/opt/trixie/lib"
cp -L "$TLD" "$OVERLAY/opt/trixie/lib/"
cp "$TROOT/usr/bin/irecovery" "$OVERLAY/opt/trixie/irecovery"
"$TLD" --library-path "$TLIBS" --list "$TROOT/usr/bin/irecovery" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' |
    while read -r lib; do
        [[ "$lib" == "$TLIBS"/* ]] || die "Debian 13 irecovery would load $lib from the host: add its package to TRIXIE_PKGS"
        cp -L "$lib" "$OVERLAY/opt/trixie/lib/"
    done

log "Debian tools: irecovery $(dpkg-query -W -f '${Version}' irecovery)," \
    "usbmuxd $(dpkg-query -W -f '${Version}' usbmuxd)," \
    "libimobiledevice-utils $(dpkg-query -W -f '${Version}' libimobiledevice-utils);" \
    "Debian 13 irecovery $(dpkg-deb -f "$(ls "$TRIXIE/debs"/irecovery_*.deb)" Version)" \
    "($(du -sh "$OVERLAY" | cut -f1) with libraries)"

cat >"$WORK/guest.sh" <<GUEST
#!/bin/sh
BOARD='$BOARD'
ECID='$ECID'
UNKNOWN_BOARD='$UNKNOWN_BOARD'
GUEST
cat >>"$WORK/guest.sh" <<'GUEST'
export MACRESCUE_SHARED=/shared
export PATH=/bin:/usr/bin:/usr/sbin
say() { echo "xcheck: $*"; }
fail() { say "FAIL: $*"; exit 1; }
lower() { tr 'A-F' 'a-f'; }

# wait_pid PID: wait until an Apple device with product ID PID is enumerated (up to 20 s).
wait_pid() {
    n=0
    while [ $n -lt 100 ]; do
        grep -qx "$1" /sys/bus/usb/devices/*/idProduct 2>/dev/null && return 0
        sleep 0.2; n=$((n + 1))
    done
    return 1
}
# plug PORT PID ARGS…: start mac-sim on 127.0.0.1:PORT, attached to vhci-hcd, and wait for PID.
plug() {
    port=$1; pid=$2; shift 2
    mac-sim usbip --board "${PLUG_BOARD:-$BOARD}" --ecid "$ECID" --listen "127.0.0.1:$port" --attach "$@" \
        >"/tmp/sim-$port.log" 2>&1 &
    SIM=$!
    wait_pid "$pid" || { cat "/tmp/sim-$port.log"; fail "05ac:$pid did not enumerate"; }
}
unplug() {
    kill "$SIM" 2>/dev/null; wait "$SIM" 2>/dev/null
    n=0
    while grep -qx 05ac /sys/bus/usb/devices/*/idVendor 2>/dev/null; do
        n=$((n + 1)); [ $n -lt 100 ] || fail "the simulated Mac did not leave the bus"
        sleep 0.2
    done
}
# field NAME FILE: the value of "NAME:…" in mac-sim describe's identity strings.
field() { tr ' ' '\n' <"$2" | sed -n "s/^$1://p" | head -n 1 | tr -d '[]'; }

# expect_irecovery MODE-WORD DESCRIBE-MODE PID PORT: the whole `irecovery -q` output must be
# exactly what libirecovery 1.0.0 prints for the identity mac-sim shows in that mode.
expect_irecovery() {
    word=$1; mode=$2; pid=$3; port=$4
    mac-sim describe --board "$BOARD" --ecid "$ECID" --mode "$mode" >/tmp/desc-$mode ||
        fail "mac-sim describe failed"
    sed -n 's/^string 4: //p' /tmp/desc-$mode >/tmp/serial-$mode
    sed -n 's/^string 1: //p' /tmp/desc-$mode >/tmp/nonce-$mode
    srtg=$(field SRTG /tmp/serial-$mode); srnm=$(field SRNM /tmp/serial-$mode)
    {
        echo "CPID: 0x$(field CPID /tmp/serial-$mode | lower)"
        echo "CPRV: 0x$(field CPRV /tmp/serial-$mode | lower)"
        echo "BDID: 0x$(field BDID /tmp/serial-$mode | lower)"
        echo "ECID: 0x$(echo "$ECID" | lower)"
        echo "CPFM: 0x$(field CPFM /tmp/serial-$mode | lower)"
        echo "SCEP: 0x$(field SCEP /tmp/serial-$mode | lower)"
        echo "IBFL: 0x$(field IBFL /tmp/serial-$mode | lower)"
        echo "SRTG: ${srtg:-N/A}"
        echo "SRNM: ${srnm:-N/A}"
        echo "IMEI: N/A"
        echo "NONC: $(field NONC /tmp/nonce-$mode | lower)"
        echo "SNON: $(field SNON /tmp/nonce-$mode | lower)"
        echo "MODE: $word"
    } >/tmp/want-$mode
    plug "$port" "$pid" --start "$mode"
    irecovery -v -q >/tmp/got-$mode 2>/tmp/got-$mode.err
    rc=$?
    say "--- irecovery -v -q, simulated $BOARD in $word (exit $rc):"
    sed 's/^/xcheck:   /' /tmp/got-$mode /tmp/got-$mode.err
    unplug
    [ $rc -eq 0 ] || fail "irecovery -q failed in $word"
    if ! diff -u /tmp/want-$mode /tmp/got-$mode; then
        fail "irecovery -q disagrees with the identity mac-sim shows in $word (diff above)"
    fi
    # The identity must also be the board's and the ECID we asked for, not just self-consistent.
    grep -qx "CPID: 0x$CPID" /tmp/got-$mode && grep -qx "BDID: 0x$BDID" /tmp/got-$mode &&
        grep -qix "ECID: 0x$ECID" /tmp/got-$mode || fail "wrong CPID/BDID/ECID in $word"
    grep -q "Connected to" /tmp/got-$mode.err && say "libirecovery knows this board (line above)" ||
        say "libirecovery 1.0.0 has no product/model for CPID 0x$CPID BDID 0x$BDID" \
            "(no 'Connected to' line; see tests/mac-sim/README.md, Cross-checks)"
    say "irecovery -q in $word: every field matches"
}

mac-sim boards | grep -i "^$BOARD " >/tmp/board || fail "mac-sim does not know $BOARD"
CPID=$(sed -n 's/.*CPID:\([0-9A-Fa-f]*\).*/\1/p' /tmp/board | lower)
BDID=$(sed -n 's/.*BDID:\([0-9A-Fa-f]*\).*/\1/p' /tmp/board | lower)
say "board $BOARD: CPID 0x$CPID BDID 0x$BDID, ECID 0x$ECID"

expect_irecovery DFU dfu 1227 3241
expect_irecovery Recovery recovery 1281 3242

# Debian 13's irecovery -q adds PRODUCT, MODEL and NAME from libirecovery's device table
# (CPID + BDID -> product type, board). MODEL must be the simulated board and PRODUCT one of
# the product types Apple's BuildManifest lists for it; the rest as with Debian 12's.
irecovery13() { /opt/trixie/lib/ld-linux-x86-64.so.2 --library-path /opt/trixie/lib /opt/trixie/irecovery "$@"; }
plug 3245 1227 --start dfu
irecovery13 -q >/tmp/got13 2>&1; rc=$?
unplug
say "--- Debian 13 irecovery -q, simulated $BOARD in DFU (exit $rc):"
sed 's/^/xcheck:   /' /tmp/got13
[ $rc -eq 0 ] || fail "Debian 13 irecovery -q failed"
grep -v -e '^PRODUCT: ' -e '^MODEL: ' -e '^NAME: ' /tmp/got13 | diff -u /tmp/want-dfu - ||
    fail "Debian 13 irecovery -q disagrees with the identity mac-sim shows in DFU"
grep -qix "MODEL: $BOARD" /tmp/got13 || fail "libirecovery's table does not map CPID 0x$CPID BDID 0x$BDID to $BOARD"
product=$(sed -n 's/^PRODUCT: //p' /tmp/got13)
bm=$(find /shared/fixtures -iname "$BOARD.BuildManifest.plist" | head -n 1)
[ -n "$product" ] && grep -q "<string>$product</string>" "$bm" ||
    fail "PRODUCT '$product' is not a product type of $BOARD's BuildManifest"
say "Debian 13 irecovery names the simulated Mac $product ($BOARD), as Apple's manifest does"
# A board newer than libirecovery 1.2.1's table: the identity still reads, no name is made up.
if [ -n "$UNKNOWN_BOARD" ]; then
    PLUG_BOARD=$UNKNOWN_BOARD plug 3246 1227 --start dfu
    irecovery13 -q >/tmp/got13u 2>&1; rc=$?
    unplug
    say "--- Debian 13 irecovery -q, simulated $UNKNOWN_BOARD (not in its table) in DFU (exit $rc):"
    sed 's/^/xcheck:   /' /tmp/got13u
    mac-sim boards | grep -i "^$UNKNOWN_BOARD " >/tmp/uboard
    ucpid=$(sed -n 's/.*CPID:\([0-9A-Fa-f]*\).*/\1/p' /tmp/uboard | lower)
    [ $rc -eq 0 ] && grep -qx "CPID: 0x$ucpid" /tmp/got13u && grep -qix "ECID: 0x$ECID" /tmp/got13u &&
        grep -qx "MODE: DFU" /tmp/got13u || fail "Debian 13 irecovery -q misread $UNKNOWN_BOARD"
    ! grep -q '^PRODUCT: ' /tmp/got13u || say "libirecovery now knows $UNKNOWN_BOARD"
fi

# usbmuxd. Started after the device is attached: without udevd libusb gets no hotplug events,
# but enumerates what is there when usbmuxd registers its callback (LIBUSB_HOTPLUG_ENUMERATE).
UDID=$(mac-sim describe --board "$BOARD" --ecid "$ECID" --mode restore | sed -n 's/^string 4: //p')
[ -n "$UDID" ] || fail "mac-sim describe shows no restore-mode serial"
# start_usbmuxd: run it and wait until it answers on /var/run/usbmuxd, i.e. until its initial
# enumeration (done before the main loop accepts clients) is over.
start_usbmuxd() {
    # Where usbmuxd keeps pairing records; it refuses to start without it.
    mkdir -p /var/lib/lockdown
    usbmuxd -f -v >"/tmp/usbmuxd-$1.log" 2>&1 &
    MUXD=$!
    n=0
    until idevice_id -l >/dev/null 2>&1; do
        n=$((n + 1)); [ $n -lt 100 ] || { cat "/tmp/usbmuxd-$1.log"; fail "usbmuxd did not start"; }
        sleep 0.2
    done
}
stop_usbmuxd() { kill "$MUXD" 2>/dev/null; wait "$MUXD" 2>/dev/null; rm -f /var/run/usbmuxd /var/run/usbmuxd.pid; }

plug 3243 1901 --start restore --scenario /xcheck/scenario.toml
start_usbmuxd 1901
idevice_id -l >/tmp/list-1901 2>&1
say "--- idevice_id -l, simulated $BOARD in restore mode as 05ac:1901:"
[ -s /tmp/list-1901 ] && sed 's/^/xcheck:   /' /tmp/list-1901 || say "  (no device)"
if grep -q "Found new device" /tmp/usbmuxd-1901.log; then
    say "usbmuxd took 05ac:1901"
else
    say "usbmuxd 1.1.1 ignores 05ac:1901 (its PID filter predates Apple Silicon; see tests/mac-sim/README.md)"
fi
stop_usbmuxd
unplug

plug 3244 12ac --start restore --scenario /xcheck/scenario.toml --fault restore-pid=0x12ac
start_usbmuxd 12ac
n=0
until idevice_id -l >/tmp/list-12ac 2>&1 && grep -q "^$UDID" /tmp/list-12ac; do
    n=$((n + 1))
    if [ $n -ge 150 ]; then
        say "--- usbmuxd log"; sed 's/^/xcheck:   /' /tmp/usbmuxd-12ac.log
        say "--- mac-sim log"; sed 's/^/xcheck:   /' /tmp/sim-3244.log
        fail "idevice_id -l did not list $UDID within 30 s"
    fi
    sleep 0.2
done
say "--- idevice_id -l, simulated $BOARD in restore mode as 05ac:12ac:"
sed 's/^/xcheck:   /' /tmp/list-12ac
say "--- usbmuxd -f -v:"
sed 's/^/xcheck:   /' /tmp/usbmuxd-12ac.log
grep -q "Found new device with v/p 05ac:12ac" /tmp/usbmuxd-12ac.log || fail "usbmuxd did not take the device"
grep -q "Got serial '$UDID'" /tmp/usbmuxd-12ac.log || fail "usbmuxd read another serial than $UDID"
grep -q "Finished preflight" /tmp/usbmuxd-12ac.log || fail "usbmuxd's preflight did not finish"
# The preflight's QueryType session ends in a reset without Goodbye; a Mac's restored then
# waits for the real session (idevicerestore runs under this very usbmuxd), so must mac-sim.
n=0
until grep -q "session ended by the host before StartRestore" /tmp/sim-3244.log; do
    n=$((n + 1)); [ $n -lt 50 ] && ! grep -q "restore scenario ended" /tmp/sim-3244.log || break
    sleep 0.2
done
if grep -q "restore scenario ended" /tmp/sim-3244.log ||
    ! grep -q "session ended by the host before StartRestore" /tmp/sim-3244.log; then
    sed 's/^/xcheck:   /' /tmp/sim-3244.log
    fail "usbmuxd's preflight session did not end cleanly on the simulated Mac"
fi
stop_usbmuxd
unplug
say "--- mac-sim (restore mode) log:"
sed 's/^/xcheck:   /' /tmp/sim-3244.log
say "usbmuxd lists the simulated Mac in restore mode as $UDID"
GUEST

export MACRESCUE_VM_OVERLAY="$OVERLAY"
export MACRESCUE_VM_TIMEOUT="${MACRESCUE_VM_TIMEOUT:-180}"
run_vm_test "$NAME" "$WORK/guest.sh"
