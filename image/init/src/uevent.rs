//! Kernel uevents as they arrive on a `NETLINK_KOBJECT_UEVENT` socket.
//!
//! A kernel message is `ACTION@DEVPATH\0KEY=VALUE\0KEY=VALUE\0…`. udevd re-broadcasts events
//! on another multicast group with a binary `libudev\0` header; we never join that group, but
//! such a message is rejected explicitly rather than misread.

use std::collections::BTreeMap;

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    pub action: String,
    pub devpath: String,
    pub vars: BTreeMap<String, String>,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum UeventError {
    #[error("uevent from udevd (libudev header), not from the kernel")]
    Libudev,
    #[error("uevent without an ACTION@DEVPATH header")]
    NoHeader,
}

impl Uevent {
    pub fn parse(buf: &[u8]) -> Result<Self, UeventError> {
        if buf.starts_with(b"libudev\0") {
            return Err(UeventError::Libudev);
        }
        let mut fields = buf.split(|&b| b == 0);
        let header = fields.next().ok_or(UeventError::NoHeader)?;
        let header = String::from_utf8_lossy(header);
        let (action, devpath) = header.split_once('@').ok_or(UeventError::NoHeader)?;
        if action.is_empty() || !devpath.starts_with('/') {
            return Err(UeventError::NoHeader);
        }
        let vars = fields
            .filter_map(|f| {
                let f = String::from_utf8_lossy(f);
                let (k, v) = f.split_once('=')?;
                (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
            })
            .collect();
        Ok(Self {
            action: action.to_string(),
            devpath: devpath.to_string(),
            vars,
        })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    /// The modalias of a device being added: what to load a driver for.
    pub fn modalias_to_load(&self) -> Option<&str> {
        (self.action == "add")
            .then(|| self.get("MODALIAS"))
            .flatten()
            .filter(|m| !m.is_empty())
    }

    /// The name of an input device that appeared (`QEMU QEMU USB Keyboard`): the input core's
    /// `inputN` device, not its `eventN`/`mouseN` handler nodes (those carry no `NAME`).
    pub fn added_input_device(&self) -> Option<&str> {
        (self.action == "add" && self.get("SUBSYSTEM") == Some("input"))
            .then(|| self.get("NAME"))
            .flatten()
            .map(|n| n.trim_matches('"'))
            .filter(|n| !n.is_empty())
    }

    /// `DEVNAME` of a partition that appeared (`sda2`).
    pub fn added_partition(&self) -> Option<&str> {
        (self.action == "add"
            && self.get("SUBSYSTEM") == Some("block")
            && self.get("DEVTYPE") == Some("partition"))
        .then(|| self.get("DEVNAME"))
        .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_usb_interface_add() {
        let msg = b"add@/devices/pci0000:00/0000:00:04.0/usb2/2-1/2-1:1.0\0ACTION=add\0\
DEVPATH=/devices/pci0000:00/0000:00:04.0/usb2/2-1/2-1:1.0\0SUBSYSTEM=usb\0DEVTYPE=usb_interface\0\
PRODUCT=46f4/1/0\0TYPE=0/0/0\0INTERFACE=8/6/80\0\
MODALIAS=usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00\0SEQNUM=1234\0";
        let e = Uevent::parse(msg).unwrap();
        assert_eq!(e.action, "add");
        assert_eq!(
            e.devpath,
            "/devices/pci0000:00/0000:00:04.0/usb2/2-1/2-1:1.0"
        );
        assert_eq!(e.get("SEQNUM"), Some("1234"));
        assert_eq!(
            e.modalias_to_load(),
            Some("usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00")
        );
        assert_eq!(e.added_partition(), None);
        assert_eq!(e.vars.len(), 9);
    }

    #[test]
    fn recognises_partitions_and_ignores_removals() {
        let add =
            b"add@/devices/x/block/sda/sda2\0ACTION=add\0SUBSYSTEM=block\0DEVTYPE=partition\0\
DEVNAME=sda2\0PARTN=2\0PARTNAME=MACRESCUE\0";
        assert_eq!(Uevent::parse(add).unwrap().added_partition(), Some("sda2"));
        let remove = b"remove@/devices/x/2-1:1.0\0ACTION=remove\0MODALIAS=usb:v1\0";
        let e = Uevent::parse(remove).unwrap();
        assert_eq!(e.modalias_to_load(), None);
        assert_eq!(e.added_partition(), None);
    }

    #[test]
    fn names_input_devices_once() {
        // A USB keyboard as usbhid + hid-generic announce it: the input device, then its
        // handler's node (evdev), which has no NAME.
        let input = b"add@/devices/pci0000:00/0000:00:02.0/usb2/2-2/2-2:1.0/0003:0627:0001.0001/input/input3\0\
ACTION=add\0SUBSYSTEM=input\0PRODUCT=3/627/1/111\0NAME=\"QEMU QEMU USB Keyboard\"\0\
PHYS=\"usb-0000:00:02.0-2/input0\"\0EV=120013\0MODALIAS=input:b0003v0627p0001e0111-e0,1,4,11,14,k\0";
        let e = Uevent::parse(input).unwrap();
        assert_eq!(e.added_input_device(), Some("QEMU QEMU USB Keyboard"));
        let node = b"add@/devices/x/input/input3/event3\0ACTION=add\0SUBSYSTEM=input\0\
MAJOR=13\0MINOR=67\0DEVNAME=input/event3\0";
        assert_eq!(Uevent::parse(node).unwrap().added_input_device(), None);
        let gone = b"remove@/devices/x/input/input3\0ACTION=remove\0SUBSYSTEM=input\0NAME=\"K\"\0";
        assert_eq!(Uevent::parse(gone).unwrap().added_input_device(), None);
        let unnamed = b"add@/devices/x/input/input4\0ACTION=add\0SUBSYSTEM=input\0NAME=\"\"\0";
        assert_eq!(Uevent::parse(unnamed).unwrap().added_input_device(), None);
    }

    #[test]
    fn rejects_udev_and_headerless_messages() {
        assert_eq!(
            Uevent::parse(b"libudev\0\xfe\xed\xca\xfe"),
            Err(UeventError::Libudev)
        );
        assert_eq!(Uevent::parse(b""), Err(UeventError::NoHeader));
        assert_eq!(Uevent::parse(b"add\0A=b"), Err(UeventError::NoHeader));
        assert_eq!(Uevent::parse(b"@/devices"), Err(UeventError::NoHeader));
        assert_eq!(Uevent::parse(b"add@devices"), Err(UeventError::NoHeader));
        // Fields without = or with an empty key are skipped, invalid UTF-8 is tolerated.
        let e = Uevent::parse(b"change@/d\0junk\0=x\0K=\xff\0").unwrap();
        assert_eq!(e.vars.len(), 1);
        assert_eq!(e.get("K"), Some("\u{fffd}"));
    }
}
