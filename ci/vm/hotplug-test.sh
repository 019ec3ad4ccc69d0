#!/usr/bin/env bash
# The hotplug-without-udev test: inside a QEMU guest with no udev and no network, the agent
# watches for USB devices while the simulated Mac plugs itself into vhci-hcd over USB/IP on
# 127.0.0.1, then "reboots" (leaves the bus) and comes back with another product id. Passes when
# the agent reported, for one location: arrived(first PID) -> left -> arrived(second PID).
#
# usage: hotplug-test.sh [--real]
#   default: the stand-ins (restore-agent's example watch-devices, mac-sim's example usbip-demo)
#   --real:  the product commands
#              restore-agent devices --watch --json
#              mac-sim usbip --board j274ap --start dfu --attach
# env overrides: MACRESCUE_WATCH_CMD, MACRESCUE_SIM_CMD, MACRESCUE_EXPECT_PIDS ("0x1227 0x1281"),
#                MACRESCUE_GUEST_WAIT (seconds the guest waits for the sequence, default 20),
#                MACRESCUE_SKIP_BUILD=1 (reuse the static binaries), and those of run.sh.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

WATCH_CMD="watch-devices"
SIM_CMD="usbip-demo --attach --first-pid 0x1227 --second-pid 0x1281"
if [[ "${1:-}" == --real ]]; then
    WATCH_CMD="restore-agent devices --watch --json"
    SIM_CMD="mac-sim usbip --board j274ap --start dfu --attach"
fi
WATCH_CMD="${MACRESCUE_WATCH_CMD:-$WATCH_CMD}"
SIM_CMD="${MACRESCUE_SIM_CMD:-$SIM_CMD}"
read -r FIRST_PID SECOND_PID <<<"${MACRESCUE_EXPECT_PIDS:-0x1227 0x1281}"

WORK="$VM_OUT/vm/hotplug"
mkdir -p "$WORK"

# The guest side. Runs under busybox sh; only busybox tools are available.
cat >"$WORK/guest.sh" <<GUEST
#!/bin/sh
WATCH_CMD='$WATCH_CMD'
SIM_CMD='$SIM_CMD'
FIRST='$FIRST_PID'
SECOND='$SECOND_PID'
GUEST_WAIT='${MACRESCUE_GUEST_WAIT:-20}'
GUEST
cat >>"$WORK/guest.sh" <<'GUEST'
up() { cut -d' ' -f1 /proc/uptime; }
# One "event location product" line per JSON event, whatever the key order.
field() { sed -n "s/.*\"$1\" *: *\"\{0,1\}\([^\",}]*\).*/\1/p" | tr 'A-F' 'a-f'; }
sequence() {
    while read -r line; do
        echo "$(echo "$line" | field event) $(echo "$line" | field location) $(echo "$line" | field product_id)"
    done </tmp/events
}
matched() {
    sequence | awk -v a="$FIRST" -v b="$SECOND" '
        s == 0 && $1 == "arrived" && $3 == a { loc = $2; s = 1; next }
        s == 1 && $1 == "left" && $2 == loc { s = 2; next }
        s == 2 && $1 == "arrived" && $2 == loc && $3 == b { s = 3 }
        END { exit s == 3 ? 0 : 1 }'
}

echo "guest: [$(up)] starting: $WATCH_CMD"
$WATCH_CMD >/tmp/events 2>/tmp/watch.err &
# Let the watcher subscribe before anything is plugged in.
usleep 300000
echo "guest: [$(up)] starting: $SIM_CMD"
$SIM_CMD >/tmp/sim.log 2>&1 &
# Checking spawns a few processes, which is slow under TCG: bound the wait by guest uptime.
deadline=$(( $(up | cut -d. -f1) + ${GUEST_WAIT:-20} ))
ok=1
while :; do
    if matched; then ok=0; break; fi
    [ "$(up | cut -d. -f1)" -lt "$deadline" ] || break
    usleep 200000
done
echo "guest: [$(up)] events seen by the agent:"
sed 's/^/guest:   /' /tmp/events
echo "guest: --- watcher stderr"; sed 's/^/guest:   /' /tmp/watch.err
echo "guest: --- simulator log"; sed 's/^/guest:   /' /tmp/sim.log
if [ "$ok" -eq 0 ]; then
    echo "guest: hotplug sequence arrived($FIRST) -> left -> arrived($SECOND) at one location: OK"
else
    echo "guest: expected arrived($FIRST) -> left -> arrived($SECOND) at one location: NOT SEEN"
    echo "guest: --- kernel log (usb)"; dmesg | grep -i -E 'usb|vhci' | tail -30 | sed 's/^/guest:   /'
fi
exit $ok
GUEST

run_vm_test hotplug "$WORK/guest.sh"
