//! USB descriptors and identity strings of a simulated Mac in each mode, shaped like the real
//! ones (protocol.md §1, fixtures/usb): iManufacturer 2, iProduct 3, iSerialNumber 4, and the
//! nonce string at index 1 where libirecovery reads it.

use crate::wire::{Enumeration, Speed};

pub const APPLE_VID: u16 = 0x05ac;
pub const PID_DFU: u16 = 0x1227;
pub const PID_PORT_DFU: u16 = 0xf014;
/// iBoot in Recovery; libirecovery's first-choice recovery PID and the one seen in issue logs.
pub const PID_RECOVERY: u16 = 0x1281;
/// Restore OS of an Apple Silicon Mac (usbmuxd's `PID_APPLE_SILICON_RESTORE_LOW`).
pub const PID_RESTORE: u16 = 0x1901;

/// Bulk OUT endpoint iBoot receives files on (libirecovery sends uploads there).
pub const EP_RECOVERY_OUT: u8 = 0x04;
/// Bulk IN endpoint of the iBoot console (interface 1, alt setting 1).
pub const EP_RECOVERY_CONSOLE_IN: u8 = 0x81;
/// usbmux endpoints in restore mode (the same addresses iOS devices use).
pub const EP_MUX_OUT: u8 = 0x04;
pub const EP_MUX_IN: u8 = 0x85;

/// SecureROM DFU transfer size (libirecovery's block size).
pub const DFU_TRANSFER_SIZE: u16 = 0x800;
/// Port DFU (`SMALL_PKT`) transfer size.
pub const PORT_DFU_TRANSFER_SIZE: u16 = 0x40;

pub const STR_NONCE: u8 = 1;
pub const STR_MANUFACTURER: u8 = 2;
pub const STR_PRODUCT: u8 = 3;
pub const STR_SERIAL: u8 = 4;
pub const STR_CONFIGURATION: u8 = 5;
pub const STR_INTERFACE: u8 = 6;

/// Which firmware answers on the bus; decides every descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsbMode {
    Dfu,
    PortDfu,
    /// iBoot in Recovery; the number is the boot stage (1 = iBSS, 2 = iBEC).
    Recovery(u8),
    Restore,
}

impl UsbMode {
    pub fn product_id(self) -> u16 {
        match self {
            UsbMode::Dfu => PID_DFU,
            UsbMode::PortDfu => PID_PORT_DFU,
            UsbMode::Recovery(_) => PID_RECOVERY,
            UsbMode::Restore => PID_RESTORE,
        }
    }

    fn product_name(self) -> &'static str {
        match self {
            UsbMode::Dfu => "Apple Mobile Device (DFU Mode)",
            UsbMode::PortDfu => "Apple Mobile Device (Port DFU Mode)",
            UsbMode::Recovery(_) => "Apple Mobile Device (Recovery Mode)",
            UsbMode::Restore => "Apple Mobile Device (Restore Mode)",
        }
    }
}

/// The values a Mac shows in its identity strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub cpid: u32,
    pub bdid: u32,
    pub security_domain: u32,
    pub chip_revision: u8,
    pub fuse_mode: u8,
    pub security_epoch: u8,
    pub ecid: u64,
    /// ROM version shown as `SRTG:[…]` while the SecureROM is in control.
    pub rom_tag: String,
    /// The Mac's serial number, shown as `SRNM:[…]` by iBoot.
    pub serial_number: String,
    /// Port controller product revision (`PREV:`), Port DFU only.
    pub port_prev: u8,
    pub ap_nonce: [u8; 32],
    pub sep_nonce: [u8; 20],
    /// The PID the restore OS enumerates with: 0x1901–0x1905 on most Apple Silicon Macs, but
    /// an M1 MacBook Pro was seen as 05ac:12ac in restore mode (field-notes.md §1.4), the
    /// iOS range that usbmuxd releases before 2021 (Debian 12's 1.1.1) accept.
    pub restore_pid: u16,
}

impl Identity {
    /// The product ID this Mac shows in `mode`.
    pub fn product_id(&self, mode: UsbMode) -> u16 {
        match mode {
            UsbMode::Restore => self.restore_pid,
            _ => mode.product_id(),
        }
    }

    /// The iSerialNumber string for `mode` (protocol.md §1.3).
    pub fn serial_string(&self, mode: UsbMode) -> String {
        let common = |ibfl: u8, bdid: String| {
            format!(
                "SDOM:{:02X} CPID:{:04X} CPRV:{:02X} CPFM:{:02X} SCEP:{:02X} BDID:{bdid} ECID:{:016X} IBFL:{ibfl:02X}",
                self.security_domain,
                self.cpid,
                self.chip_revision,
                self.fuse_mode,
                self.security_epoch,
                self.ecid
            )
        };
        match mode {
            UsbMode::Dfu => format!(
                "{} SRTG:[{}]",
                common(0x3c, format!("{:02X}", self.bdid)),
                self.rom_tag
            ),
            UsbMode::PortDfu => format!(
                "{} PREV:{:02X} SRTG:[{}]",
                common(0x3c, format!("{:08X}", self.port_dfu_bdid())),
                self.port_prev,
                self.rom_tag
            ),
            // iBoot drops SRTG (pymobiledevice3 reads its presence as "still in DFU") and adds
            // the serial number; bit 0 of IBFL is set in the one real recovery string we have.
            UsbMode::Recovery(_) => format!(
                "{} SRNM:[{}]",
                common(0x3d, format!("{:02X}", self.bdid)),
                self.serial_number
            ),
            UsbMode::Restore => self.serial_number.clone(),
        }
    }

    /// Port DFU packs the board and chip into BDID: the agent decodes
    /// `cpid = (BDID >> 8) & 0xFFFF`, `bdid = (BDID >> 24) & 0xFF`. The low byte's meaning
    /// is not documented; the port number (1) is put there (inference).
    pub fn port_dfu_bdid(&self) -> u32 {
        ((self.bdid & 0xff) << 24) | ((self.cpid & 0xffff) << 8) | 0x01
    }

    /// String descriptor 1, where libirecovery reads the nonces.
    pub fn nonce_string(&self) -> String {
        format!(
            "NONC:{} SNON:{}",
            hex::encode_upper(self.ap_nonce),
            hex::encode_upper(self.sep_nonce)
        )
    }
}

/// One interface alternate setting, for SET_INTERFACE / GET_INTERFACE checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AltSetting {
    pub interface: u8,
    pub alternate: u8,
}

/// Everything the device answers GET_DESCRIPTOR with in one mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptors {
    pub mode: UsbMode,
    pub product_id: u16,
    pub device: Vec<u8>,
    pub configuration: Vec<u8>,
    /// String descriptors by index (index 0 is the language list, built separately).
    pub strings: Vec<(u8, String)>,
    pub alt_settings: Vec<AltSetting>,
}

fn interface(num: u8, alt: u8, n_ep: u8, class: [u8; 3], istr: u8) -> [u8; 9] {
    [9, 4, num, alt, n_ep, class[0], class[1], class[2], istr]
}

fn bulk_endpoint(addr: u8) -> [u8; 7] {
    // High-speed bulk max packet size is 512.
    [7, 5, addr, 0x02, 0x00, 0x02, 0]
}

impl Descriptors {
    pub fn new(mode: UsbMode, id: &Identity) -> Descriptors {
        let pid = id.product_id(mode);
        let vid = APPLE_VID.to_le_bytes();
        let p = pid.to_le_bytes();
        // bcdDevice 0.00 as in the one real DFU listing (fixtures/usb [1]).
        let device = vec![
            18,
            1,
            0x00,
            0x02,
            0,
            0,
            0,
            64,
            vid[0],
            vid[1],
            p[0],
            p[1],
            0x00,
            0x00,
            STR_MANUFACTURER,
            STR_PRODUCT,
            STR_SERIAL,
            1,
        ];
        let mut body: Vec<u8> = Vec::new();
        let mut alts = Vec::new();
        let mut n_interfaces = 1;
        match mode {
            UsbMode::Dfu | UsbMode::PortDfu => {
                let ts = if mode == UsbMode::Dfu {
                    DFU_TRANSFER_SIZE
                } else {
                    PORT_DFU_TRANSFER_SIZE
                }
                .to_le_bytes();
                body.extend(interface(0, 0, 0, [0xfe, 0x01, 0x02], 0));
                // DFU functional descriptor: bitCanDnload only — not manifestation tolerant,
                // so the ROM waits in dfuMANIFEST-WAIT-RESET for the host's reset.
                body.extend([9, 0x21, 0x01, 10, 0, ts[0], ts[1], 0x10, 0x01]);
                alts.push(AltSetting {
                    interface: 0,
                    alternate: 0,
                });
            }
            UsbMode::Recovery(_) => {
                n_interfaces = 2;
                body.extend(interface(0, 0, 1, [0xff, 0xff, 0x00], STR_INTERFACE));
                body.extend(bulk_endpoint(EP_RECOVERY_OUT));
                body.extend(interface(1, 0, 0, [0xff, 0xff, 0x00], 0));
                body.extend(interface(1, 1, 1, [0xff, 0xff, 0x00], 0));
                body.extend(bulk_endpoint(EP_RECOVERY_CONSOLE_IN));
                for (i, a) in [(0, 0), (1, 0), (1, 1)] {
                    alts.push(AltSetting {
                        interface: i,
                        alternate: a,
                    });
                }
            }
            UsbMode::Restore => {
                body.extend(interface(0, 0, 2, [0xff, 0xfe, 0x02], 0));
                body.extend(bulk_endpoint(EP_MUX_OUT));
                body.extend(bulk_endpoint(EP_MUX_IN));
                alts.push(AltSetting {
                    interface: 0,
                    alternate: 0,
                });
            }
        }
        let total = u16::try_from(9 + body.len())
            .expect("a handful of descriptors is far below 64 KiB")
            .to_le_bytes();
        let mut configuration = vec![
            9,
            2,
            total[0],
            total[1],
            n_interfaces,
            1,
            STR_CONFIGURATION,
            0x80,
            250,
        ];
        configuration.extend(body);
        let mut strings = vec![
            (STR_MANUFACTURER, "Apple Inc.".to_string()),
            (STR_PRODUCT, mode.product_name().to_string()),
            (STR_SERIAL, id.serial_string(mode)),
            (STR_CONFIGURATION, mode.product_name().to_string()),
        ];
        match mode {
            UsbMode::Dfu | UsbMode::PortDfu | UsbMode::Recovery(_) => {
                strings.push((STR_NONCE, id.nonce_string()));
            }
            UsbMode::Restore => {}
        }
        if let UsbMode::Recovery(_) = mode {
            strings.push((STR_INTERFACE, "Apple USB Serial Interface".to_string()));
        }
        strings.sort();
        Descriptors {
            mode,
            product_id: pid,
            device,
            configuration,
            strings,
            alt_settings: alts,
        }
    }

    pub fn enumeration(&self) -> Enumeration {
        Enumeration {
            vendor_id: APPLE_VID,
            product_id: self.product_id,
            speed: Speed::High,
            device_descriptor: self.device.clone(),
            configurations: vec![self.configuration.clone()],
        }
    }

    pub fn string_text(&self, index: u8) -> Option<&str> {
        self.strings
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, s)| s.as_str())
    }

    /// The full string descriptor (before wLength truncation); index 0 lists US English only.
    pub fn string(&self, index: u8) -> Option<Vec<u8>> {
        if index == 0 {
            return Some(vec![4, 3, 0x09, 0x04]);
        }
        let text = self.string_text(index)?;
        // A descriptor's bLength is one byte: at most 126 UTF-16 units fit.
        let units: Vec<u16> = text.encode_utf16().take(126).collect();
        let mut d = Vec::with_capacity(2 + units.len() * 2);
        d.push((2 + units.len() * 2) as u8);
        d.push(3);
        for u in units {
            d.extend(u.to_le_bytes());
        }
        Some(d)
    }

    pub fn has_alt_setting(&self, interface: u8, alternate: u8) -> bool {
        self.alt_settings
            .iter()
            .any(|a| a.interface == interface && a.alternate == alternate)
    }

    /// The interfaces of the configuration (distinct interface numbers).
    pub fn interfaces(&self) -> Vec<u8> {
        let mut v: Vec<u8> = self.alt_settings.iter().map(|a| a.interface).collect();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn identity() -> Identity {
        Identity {
            cpid: 0x8103,
            bdid: 0x22,
            security_domain: 1,
            chip_revision: 0x11,
            fuse_mode: 0x03,
            security_epoch: 0x01,
            ecid: 0x001C2B3A4D5E6F70,
            rom_tag: "iBoot-6723.100.10".into(),
            serial_number: "C07SIMULATED".into(),
            port_prev: 0x02,
            ap_nonce: [0xab; 32],
            sep_nonce: [0x5e; 20],
            restore_pid: PID_RESTORE,
        }
    }

    #[test]
    fn serial_strings_per_mode() {
        let id = identity();
        assert_eq!(
            id.serial_string(UsbMode::Dfu),
            "SDOM:01 CPID:8103 CPRV:11 CPFM:03 SCEP:01 BDID:22 ECID:001C2B3A4D5E6F70 IBFL:3C SRTG:[iBoot-6723.100.10]"
        );
        assert_eq!(
            id.serial_string(UsbMode::Recovery(1)),
            "SDOM:01 CPID:8103 CPRV:11 CPFM:03 SCEP:01 BDID:22 ECID:001C2B3A4D5E6F70 IBFL:3D SRNM:[C07SIMULATED]"
        );
        assert_eq!(
            id.serial_string(UsbMode::PortDfu),
            "SDOM:01 CPID:8103 CPRV:11 CPFM:03 SCEP:01 BDID:22810301 ECID:001C2B3A4D5E6F70 IBFL:3C PREV:02 SRTG:[iBoot-6723.100.10]"
        );
        let packed = id.port_dfu_bdid();
        assert_eq!(
            ((packed >> 8) & 0xffff, (packed >> 24) & 0xff),
            (0x8103, 0x22)
        );
    }

    #[test]
    fn nonce_string_sizes() {
        let s = identity().nonce_string();
        let (n, sn) = s.split_once(' ').unwrap();
        assert_eq!(n.len(), 5 + 64);
        assert_eq!(sn.len(), 5 + 40);
        assert!(s.starts_with("NONC:ABAB"));
    }

    #[test]
    fn dfu_descriptors() {
        let d = Descriptors::new(UsbMode::Dfu, &identity());
        assert_eq!(
            d.device,
            [18, 1, 0, 2, 0, 0, 0, 64, 0xac, 0x05, 0x27, 0x12, 0, 0, 2, 3, 4, 1]
        );
        assert_eq!(
            d.configuration,
            [
                9, 2, 27, 0, 1, 1, 5, 0x80, 250, // config
                9, 4, 0, 0, 0, 0xfe, 1, 2, 0, // interface
                9, 0x21, 1, 10, 0, 0x00, 0x08, 0x10, 0x01 // DFU functional
            ]
        );
        assert_eq!(
            d.string(3).unwrap()[..6],
            [62, 3, b'A', 0, b'p', 0] // "Apple Mobile Device (DFU Mode)" = 30 chars
        );
        assert_eq!(d.string(0).unwrap(), [4, 3, 9, 4]);
        assert_eq!(d.string(9), None);
        let pd = Descriptors::new(UsbMode::PortDfu, &identity());
        assert_eq!(pd.device[10..12], [0x14, 0xf0]);
        assert_eq!(pd.configuration[23..25], [0x40, 0x00]);
    }

    #[test]
    fn recovery_and_restore_descriptors() {
        let r = Descriptors::new(UsbMode::Recovery(1), &identity());
        assert_eq!(r.device[10..12], [0x81, 0x12]);
        let c = &r.configuration;
        assert_eq!(u16::from_le_bytes([c[2], c[3]]) as usize, c.len());
        assert_eq!(c[4], 2, "two interfaces");
        assert_eq!(c[9..18], [9, 4, 0, 0, 1, 0xff, 0xff, 0, 6]);
        assert_eq!(c[18..25], [7, 5, 0x04, 2, 0, 2, 0]);
        assert_eq!(c[34..43], [9, 4, 1, 1, 1, 0xff, 0xff, 0, 0]);
        assert_eq!(c[43..50], [7, 5, 0x81, 2, 0, 2, 0]);
        assert!(r.has_alt_setting(1, 1) && !r.has_alt_setting(1, 2));
        assert_eq!(r.interfaces(), [0, 1]);

        let m = Descriptors::new(UsbMode::Restore, &identity());
        assert_eq!(m.device[10..12], [0x01, 0x19]);
        assert_eq!(
            m.configuration[9..],
            [
                9, 4, 0, 0, 2, 0xff, 0xfe, 2, 0, //
                7, 5, 0x04, 2, 0, 2, 0, //
                7, 5, 0x85, 2, 0, 2, 0
            ]
        );
        assert_eq!(m.string(1), None, "no nonce string in restore mode");
    }

    #[test]
    fn long_strings_are_capped_to_one_byte_length() {
        let mut id = identity();
        id.serial_number = "X".repeat(300);
        let d = Descriptors::new(UsbMode::Recovery(1), &id);
        let s = d.string(STR_SERIAL).unwrap();
        assert_eq!(s[0] as usize, s.len());
        assert_eq!(s.len(), 254);
    }
}
