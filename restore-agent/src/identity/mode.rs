//! Apple USB modes by VID:PID (protocol.md §1.1).

pub const APPLE_VID: u16 = 0x05ac;

/// The firmware that currently owns the USB port of an Apple device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AppleMode {
    /// SecureROM DFU (05ac:1227).
    Dfu,
    /// USB-C port controller DFU (05ac:f014).
    PortDfu,
    /// iBoot / iBSS / iBEC in recovery (05ac:1280–1283).
    Recovery,
    /// Restore ramdisk speaking usbmux (05ac:1901–1905, 1290–12af).
    Restore,
    /// Legacy WTF mode (05ac:1222); never a Mac.
    Wtf,
}

impl AppleMode {
    pub fn from_ids(vendor_id: u16, product_id: u16) -> Option<AppleMode> {
        if vendor_id != APPLE_VID {
            return None;
        }
        match product_id {
            0x1227 => Some(AppleMode::Dfu),
            0xf014 => Some(AppleMode::PortDfu),
            0x1280..=0x1283 => Some(AppleMode::Recovery),
            0x1901..=0x1905 | 0x1290..=0x12af => Some(AppleMode::Restore),
            0x1222 => Some(AppleMode::Wtf),
            _ => None,
        }
    }
}
