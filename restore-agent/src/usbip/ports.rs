//! The client's decisions about vhci ports, sans-IO: which exported device needs an import,
//! and which port a device may be attached to now.
//!
//! # Why a freed port is not yet a free port
//!
//! When a Mac re-enumerates, the server closes the old connection and vhci-hcd marks the port
//! free at once (`status` shows 4), but the USB core has not yet seen the disconnect: that
//! happens later, when the hub thread (`hub_wq`) reads the root hub's port change. vhci-hcd
//! clears only the port's CONNECTION bit on a disconnect, never ENABLE. If the next incarnation
//! is attached to the port before `hub_wq` looked, the hub sees "connected, enabled, connect
//! change" with the old `usb_device` still registered, re-reads its descriptors and — when they
//! did not change, as from iBSS to iBEC (both 05ac:1281 with the same serial string) — keeps the
//! old device ("resuscitates" it, `hub_port_connect_change`). No remove and no add uevent is
//! sent: the agent waits for a re-enumeration that the kernel decided never happened. Under
//! TCG with two Macs re-enumerating at once, `hub_wq` is busy enumerating one port while the
//! other is freed and re-attached, which is how `ci/demo --macs 2` lost a Mac. So a port is
//! usable only once the kernel has also dropped its device there (its sysfs directory
//! `usbB/B-P` is gone).

use super::wire::VhciPort;

/// What one device of one server is attached as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    /// The incarnation (`busnum << 16 | devnum` as the server reported it).
    pub devid: u32,
    /// The vhci port (the `port` column of vhci-hcd's `status`).
    pub port: u32,
}

/// `enum usbip_device_status` values in vhci-hcd's `status` table.
const VDEV_ST_NOTASSIGNED: u32 = 5;
const VDEV_ST_USED: u32 = 6;
const VDEV_ST_ERROR: u32 = 7;

/// Does the server's device `exported_devid` need an import, given what was attached for it
/// last (`attached`) and the vhci table now (`rows`)?
///
/// vhci-hcd shows a port as NOTASSIGNED, with devid 0, from the attach until the USB core sends
/// its first request; the device is ours all along, and importing it again would only be
/// refused by the server ("in use"). A port in ERROR is being torn down: the next table says
/// free, and that is when to import again.
pub fn needs_import(attached: Option<Attached>, exported_devid: u32, rows: &[VhciPort]) -> bool {
    let Some(a) = attached else { return true };
    if a.devid != exported_devid {
        // A new incarnation (the Mac re-enumerated).
        return true;
    }
    match rows.iter().find(|p| p.port == a.port) {
        Some(p) if p.status == VDEV_ST_NOTASSIGNED || p.status == VDEV_ST_ERROR => false,
        Some(p) if p.status == VDEV_ST_USED => p.devid != a.devid,
        // Free (the kernel dropped the connection) or the port vanished: import again.
        _ => true,
    }
}

/// Where the kernel's `usb_device` on vhci port `port` lives: its hub half and 1-based root-hub
/// port number. The `status` table lists each half's ports in order (hs 0..n, then ss n..2n),
/// so the root-hub port is the row's position within its half.
pub fn root_hub_port(rows: &[VhciPort], port: u32) -> Option<(&str, u32)> {
    let row = rows.iter().find(|p| p.port == port)?;
    let index = rows
        .iter()
        .filter(|p| p.hub == row.hub)
        .position(|p| p.port == port)?;
    Some((row.hub.as_str(), u32::try_from(index).ok()? + 1))
}

/// The hub half a vhci root hub serves, from its sysfs `speed` (Mb/s).
pub fn hub_of_root_speed(speed: &str) -> Option<&'static str> {
    match speed.trim().parse::<u32>().ok()? {
        5000.. => Some("ss"),
        1..=4999 => Some("hs"),
        0 => None,
    }
}

/// The answer of [`choose_port`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortChoice {
    Use(u32),
    /// The preferred port will be usable soon (or every free port still has a device the USB
    /// core has not dropped yet): look again shortly.
    Wait,
    /// No port of that hub half is free.
    NoneFree,
}

/// A port of hub half `hub` to attach to: `preferred` (where this device was, so the Mac keeps
/// its USB location) while `keep_waiting`, else the first usable one. A port is usable when
/// vhci-hcd shows it free *and* the USB core has dropped the device it had (`lingering(port)`
/// is false; see the module docs).
pub fn choose_port(
    rows: &[VhciPort],
    hub: &str,
    preferred: Option<u32>,
    lingering: impl Fn(u32) -> bool,
    keep_waiting: bool,
) -> PortChoice {
    let free: Vec<u32> = rows
        .iter()
        .filter(|p| p.hub == hub && p.is_free())
        .map(|p| p.port)
        .collect();
    if free.is_empty() {
        return PortChoice::NoneFree;
    }
    match preferred {
        Some(p) if free.contains(&p) && !lingering(p) => return PortChoice::Use(p),
        Some(_) if keep_waiting => return PortChoice::Wait,
        _ => {}
    }
    match free.into_iter().find(|&p| !lingering(p)) {
        Some(p) => PortChoice::Use(p),
        None => PortChoice::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usbip::wire::parse_vhci_status;

    const TABLE: &str = "hub port sta spd dev      sockfd local_busid\n\
                         hs  0000 006 003 00010002 000003 3-1\n\
                         hs  0001 005 000 00000000 000000 0-0\n\
                         hs  0002 004 000 00000000 000000 0-0\n\
                         hs  0003 007 000 00000000 000000 0-0\n\
                         ss  0004 004 000 00000000 000000 0-0\n\
                         ss  0005 004 000 00000000 000000 0-0\n";

    fn rows() -> Vec<VhciPort> {
        parse_vhci_status(TABLE)
    }

    #[test]
    fn a_device_is_imported_when_new_or_gone_only() {
        let r = rows();
        let at = |devid, port| Some(Attached { devid, port });
        // Never attached.
        assert!(needs_import(None, 0x1_0002, &r));
        // In use with our devid: ours.
        assert!(!needs_import(at(0x1_0002, 0), 0x1_0002, &r));
        // The server lists a new incarnation: import it.
        assert!(needs_import(at(0x1_0002, 0), 0x1_0003, &r));
        // Just attached, the kernel has not talked to it yet (devid shows 0): ours, no re-import.
        assert!(!needs_import(at(0x1_0005, 1), 0x1_0005, &r));
        // Freed: the kernel dropped the connection.
        assert!(needs_import(at(0x1_0005, 2), 0x1_0005, &r));
        // Being torn down: wait for the next table.
        assert!(!needs_import(at(0x1_0005, 3), 0x1_0005, &r));
        // Someone else's device on our port now.
        assert!(needs_import(at(0x1_0009, 0), 0x1_0009, &r));
        // A port the table does not have.
        assert!(needs_import(at(0x1_0002, 42), 0x1_0002, &r));
    }

    #[test]
    fn root_hub_ports_count_within_each_half() {
        let r = rows();
        assert_eq!(root_hub_port(&r, 0), Some(("hs", 1)));
        assert_eq!(root_hub_port(&r, 3), Some(("hs", 4)));
        assert_eq!(root_hub_port(&r, 4), Some(("ss", 1)));
        assert_eq!(root_hub_port(&r, 5), Some(("ss", 2)));
        assert_eq!(root_hub_port(&r, 6), None);
        assert_eq!(hub_of_root_speed("480\n"), Some("hs"));
        assert_eq!(hub_of_root_speed("5000\n"), Some("ss"));
        assert_eq!(hub_of_root_speed("10000"), Some("ss"));
        assert_eq!(hub_of_root_speed("0"), None);
        assert_eq!(hub_of_root_speed("fast"), None);
    }

    #[test]
    fn a_freed_port_whose_device_lingers_is_not_used() {
        let r = rows();
        // The Mac was on port 2; vhci says free but the USB core still has its device there:
        // attaching now would let the kernel keep the old device (module docs).
        assert_eq!(
            choose_port(&r, "hs", Some(2), |p| p == 2, true),
            PortChoice::Wait
        );
        assert_eq!(
            choose_port(&r, "hs", Some(2), |_| false, true),
            PortChoice::Use(2)
        );
        // Waited long enough: any usable port, but still never a lingering one.
        assert_eq!(
            choose_port(&r, "hs", Some(2), |p| p == 2, false),
            PortChoice::Wait
        );
        assert_eq!(
            choose_port(&r, "ss", Some(4), |p| p == 4, false),
            PortChoice::Use(5)
        );
        // The preferred port is taken by another device: wait for it a while, then move.
        assert_eq!(
            choose_port(&r, "hs", Some(0), |_| false, true),
            PortChoice::Wait
        );
        assert_eq!(
            choose_port(&r, "hs", Some(0), |_| false, false),
            PortChoice::Use(2)
        );
        // A new device takes the first usable port.
        assert_eq!(
            choose_port(&r, "ss", None, |_| false, true),
            PortChoice::Use(4)
        );
        let full = parse_vhci_status("hs 0000 006 003 00010002 000003 3-1\n");
        assert_eq!(
            choose_port(&full, "hs", None, |_| false, true),
            PortChoice::NoneFree
        );
    }
}
