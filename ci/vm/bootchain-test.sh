#!/usr/bin/env bash
# The boot chain in a minimal VM (kept from the first ci/demo; `ci/demo` now restores a Mac in
# the real image): boot a real Linux kernel in QEMU with the static restore-agent and mac-sim
# inside; the simulated Mac attaches itself to the guest kernel's
# vhci-hcd over USB/IP on 127.0.0.1, and the agent — through the kernel's USB stack, libusb and
# netlink hotplug, no udev — walks it from DFU through iBSS and iBEC to bootx and restore mode.
# The console streams to this terminal; exit 0 only if the agent reached restore mode and its
# hotplug watcher saw every re-enumeration at one USB location.
#
# usage: ci/vm/bootchain-test.sh [--board BOARD] [--ecid HEX] [--start dfu|recovery|portdfu] [--fault SPEC]...
#                [--allow-recovery] [--expect-failure TEXT]
#   --fault SPEC          a mac-sim fault knob (see `mac-sim usbip --help`), e.g. disconnect-at=stage2
#   --expect-failure TEXT the run passes only if the agent fails with a message containing TEXT
# env: MACRESCUE_SKIP_BUILD=1 (reuse out/vm/bin), MACRESCUE_QEMU_ACCEL, MACRESCUE_VM_TIMEOUT
source "$(dirname "$0")/../lib.sh"
source "$ROOT/ci/vm/lib.sh"

BOARD=j274ap
ECID=0x001c2b3a4d5e6f70
START=dfu
FAULTS=""
AGENT_FLAGS=""
EXPECT_FAILURE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --board) BOARD="$2"; shift 2 ;;
        --ecid) ECID="$2"; shift 2 ;;
        --start) START="$2"; shift 2 ;;
        --fault) FAULTS="$FAULTS --fault $2"; shift 2 ;;
        --allow-recovery) AGENT_FLAGS="$AGENT_FLAGS --allow-recovery"; shift ;;
        --expect-failure) EXPECT_FAILURE="$2"; shift 2 ;;
        -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "bootchain-test: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

require_rust
FIXTURES="$ROOT/../shared/fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests"
[ -d "$FIXTURES" ] || FIXTURES="${MACRESCUE_SHARED:-}/fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests"
MANIFEST=$(find "$FIXTURES" -maxdepth 1 -iname "${BOARD}.BuildManifest.plist" | head -n 1)
[ -n "$MANIFEST" ] || { echo "bootchain-test: no fixture BuildManifest for board $BOARD in $FIXTURES" >&2; exit 2; }

NAME=bootchain
WORK="$VM_OUT/vm/$NAME"
OVERLAY="$WORK/overlay"
rm -rf "$OVERLAY"
GUEST_FIXTURES="/shared/fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests"
mkdir -p "$OVERLAY$GUEST_FIXTURES"
cp "$MANIFEST" "$OVERLAY$GUEST_FIXTURES/"
GUEST_MANIFEST="$GUEST_FIXTURES/$(basename "$MANIFEST")"

cat >"$WORK/guest.sh" <<GUEST
#!/bin/sh
BOARD='$BOARD'
ECID='$ECID'
START='$START'
FAULTS='$FAULTS'
AGENT_FLAGS='$AGENT_FLAGS'
EXPECT_FAILURE='$EXPECT_FAILURE'
MANIFEST='$GUEST_MANIFEST'
GUEST
cat >>"$WORK/guest.sh" <<'GUEST'
export MACRESCUE_SHARED=/shared
say() { echo "demo: $*"; }

# Watch hotplug the way a station does (libusb on netlink uevents; this guest has no udev).
restore-agent devices --watch --json >/tmp/events 2>/tmp/watch.err &
WATCHER=$!
mac-sim make-bootchain --board "$BOARD" --out /tmp/images >/tmp/images.log 2>&1 || {
    say "mac-sim make-bootchain failed:"; cat /tmp/images.log; exit 1; }
say "plugging in a simulated $BOARD (ECID $ECID) in $START mode over USB/IP${FAULTS:+ with$FAULTS}"
mac-sim usbip --board "$BOARD" --ecid "$ECID" --start "$START" $FAULTS --attach >/tmp/sim.log 2>&1 &
say "restore-agent bootchain --manifest $MANIFEST --images /tmp/images$AGENT_FLAGS"
restore-agent -v bootchain --manifest "$MANIFEST" --images /tmp/images --wait 60 \
    --restore-timeout 60 $AGENT_FLAGS >/tmp/agent.out 2>/tmp/agent.err &
AGENT=$!
# Stream the agent's progress while it runs.
tail -f /tmp/agent.err /tmp/agent.out 2>/dev/null | sed 's/^/agent: /' &
TAIL=$!
wait $AGENT
rc=$?
sleep 1
kill $TAIL $WATCHER 2>/dev/null
say "agent exit status $rc"

# One "event location product" line per JSON event, whatever the key order.
field() { sed -n "s/.*\"$1\" *: *\"\{0,1\}\([^\",}]*\).*/\1/p" | tr 'A-F' 'a-f'; }
while read -r line; do
    echo "$(echo "$line" | field event) $(echo "$line" | field location) $(echo "$line" | field product_id)"
done </tmp/events >/tmp/sequence
say "hotplug events seen by 'restore-agent devices --watch':"
sed 's/^/demo:   /' /tmp/sequence
say "--- simulator log (tail)"; tail -n 15 /tmp/sim.log | sed 's/^/demo:   /'

if [ -n "$EXPECT_FAILURE" ]; then
    if [ "$rc" -ne 0 ] && cat /tmp/agent.out /tmp/agent.err | grep -qF "$EXPECT_FAILURE"; then
        say "the agent failed as expected with: $EXPECT_FAILURE"
        exit 0
    fi
    say "expected a failure mentioning '$EXPECT_FAILURE', got exit $rc"
    exit 1
fi
[ "$rc" -eq 0 ] || { say "the agent did not finish the boot chain"; exit 1; }
cat /tmp/agent.out /tmp/agent.err | grep -q "reached restore mode" || { say "no restore-mode line from the agent"; exit 1; }
# DFU (1227) -> iBSS (1281) -> iBEC (1281) -> restore mode (19xx), all at one location.
if awk '
    s == 0 && $1 == "arrived" && $3 == "0x1227" { loc = $2; s = 1; next }
    s == 1 && $1 == "left" && $2 == loc { s = 2; next }
    s == 2 && $1 == "arrived" && $2 == loc && $3 == "0x1281" { s = 3; next }
    s == 3 && $1 == "left" && $2 == loc { s = 4; next }
    s == 4 && $1 == "arrived" && $2 == loc && $3 == "0x1281" { s = 5; next }
    s == 5 && $1 == "left" && $2 == loc { s = 6; next }
    s == 6 && $1 == "arrived" && $2 == loc && $3 ~ /^0x19/ { s = 7 }
    END { exit s == 7 ? 0 : 1 }' /tmp/sequence; then
    say "hotplug without udev: every re-enumeration seen at one location"
else
    say "the watcher did not see DFU -> iBSS -> iBEC -> restore mode at one location"
    exit 1
fi
say "the simulated Mac is in restore mode: DFU to bootx done"
GUEST

export MACRESCUE_VM_OVERLAY="$OVERLAY"
export MACRESCUE_VM_TIMEOUT="${MACRESCUE_VM_TIMEOUT:-300}"
run_vm_test "$NAME" "$WORK/guest.sh"
