#!/usr/bin/env bash
# The libusb edge against a device the guest's kernel really enumerated: the stand-in simulator
# (mac-sim example usbip-demo) attaches itself to vhci-hcd over USB/IP on 127.0.0.1, and
# restore-agent's example usb-probe runs control, stall, claim, bulk OUT, a NAKed bulk IN that
# must time out (exercising USB/IP UNLINK), the device leaving under an open handle,
# re-enumeration at the same location, and a port reset.
#
# usage: transport-test.sh      env: MACRESCUE_SKIP_BUILD=1, and those of run.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

WORK="$VM_OUT/vm/transport"
mkdir -p "$WORK"
cat >"$WORK/guest.sh" <<'GUEST'
#!/bin/sh
usbip-demo --attach >/tmp/sim.log 2>&1 &
usb-probe
rc=$?
if [ "$rc" -ne 0 ]; then
    echo "guest: --- simulator log"; sed 's/^/guest:   /' /tmp/sim.log
    echo "guest: --- kernel log (usb)"; dmesg | grep -i -E 'usb|vhci' | tail -30 | sed 's/^/guest:   /'
fi
exit $rc
GUEST
run_vm_test transport "$WORK/guest.sh"
