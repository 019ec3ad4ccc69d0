//! Standard USB descriptors (USB 2.0 §9.6): wire format, and the GET_DESCRIPTOR reads that fetch
//! them through a [`UsbTransport`].
//!
//! The wire half is sans-IO and symmetric in the style of smoltcp's `wire` module: every
//! descriptor has a `parse` that accepts any byte slice without panicking and an `emit` that
//! produces bytes `parse` gives back unchanged (`parse(emit(x)) == x`). Parsing is strict about
//! structure (lengths, types) and lenient about content: values a device may legitimately choose
//! are kept as they are, and class-specific descriptors (DFU functional 0x21, interface
//! association 0x0b, …) are kept as raw bytes beside the standard descriptor they follow.

use std::time::Duration;

use super::{ControlSetup, TransportError, UsbTransport};

/// bDescriptorType values used here.
pub const TYPE_DEVICE: u8 = 0x01;
pub const TYPE_CONFIGURATION: u8 = 0x02;
pub const TYPE_STRING: u8 = 0x03;
pub const TYPE_INTERFACE: u8 = 0x04;
pub const TYPE_ENDPOINT: u8 = 0x05;
/// DFU functional descriptor (DFU 1.1 §4.1.3); kept raw.
pub const TYPE_DFU_FUNCTIONAL: u8 = 0x21;

/// bmRequestType for a standard, device-recipient IN request.
pub const REQUEST_TYPE_STANDARD_IN: u8 = 0x80;
/// bRequest GET_DESCRIPTOR.
pub const REQUEST_GET_DESCRIPTOR: u8 = 0x06;
/// US English, the language every Apple mode offers and the fallback when string 0 is unreadable.
pub const LANGID_EN_US: u16 = 0x0409;
/// Descriptor reads are answered by the device's ROM at once; a slow answer means trouble.
pub const DESCRIPTOR_TIMEOUT: Duration = Duration::from_secs(2);

/// Why descriptor bytes could not be parsed or emitted, or could not be read from a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error("USB descriptor truncated: {what} needs {needed} bytes, got {got}")]
    Truncated {
        what: &'static str,
        needed: usize,
        got: usize,
    },
    #[error("USB descriptor has bDescriptorType {found:#04x} where {what} ({expected:#04x}) was expected")]
    WrongType {
        what: &'static str,
        expected: u8,
        found: u8,
    },
    #[error("USB {what} descriptor has an invalid bLength {length}")]
    BadLength { what: &'static str, length: u8 },
    #[error(
        "USB configuration descriptor has wTotalLength {0}, shorter than its own 9-byte header"
    )]
    BadTotalLength(u16),
    #[error("USB configuration descriptor lists an endpoint before any interface")]
    EndpointOutsideInterface,
    #[error("cannot emit a USB {what} descriptor: {len} bytes exceeds the field's maximum {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("reading a USB descriptor failed: {0}")]
    Transport(#[from] TransportError),
}

fn need(what: &'static str, buf: &[u8], needed: usize) -> Result<(), DescriptorError> {
    if buf.len() < needed {
        return Err(DescriptorError::Truncated {
            what,
            needed,
            got: buf.len(),
        });
    }
    Ok(())
}

fn expect_type(what: &'static str, expected: u8, found: u8) -> Result<(), DescriptorError> {
    if found != expected {
        return Err(DescriptorError::WrongType {
            what,
            expected,
            found,
        });
    }
    Ok(())
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The 18-byte device descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceDescriptor {
    pub bcd_usb: u16,
    pub device_class: u8,
    pub device_subclass: u8,
    pub device_protocol: u8,
    pub max_packet_size0: u8,
    pub vendor_id: u16,
    pub product_id: u16,
    pub bcd_device: u16,
    pub manufacturer_index: u8,
    pub product_index: u8,
    pub serial_number_index: u8,
    pub num_configurations: u8,
}

impl DeviceDescriptor {
    pub const LEN: usize = 18;

    /// Parse the first 18 bytes of `buf` (trailing bytes are ignored: a device may append).
    pub fn parse(buf: &[u8]) -> Result<Self, DescriptorError> {
        need("device descriptor", buf, Self::LEN)?;
        if usize::from(buf[0]) != Self::LEN {
            return Err(DescriptorError::BadLength {
                what: "device",
                length: buf[0],
            });
        }
        expect_type("device descriptor", TYPE_DEVICE, buf[1])?;
        Ok(Self {
            bcd_usb: le16(buf, 2),
            device_class: buf[4],
            device_subclass: buf[5],
            device_protocol: buf[6],
            max_packet_size0: buf[7],
            vendor_id: le16(buf, 8),
            product_id: le16(buf, 10),
            bcd_device: le16(buf, 12),
            manufacturer_index: buf[14],
            product_index: buf[15],
            serial_number_index: buf[16],
            num_configurations: buf[17],
        })
    }

    pub fn emit(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = Self::LEN as u8;
        b[1] = TYPE_DEVICE;
        b[2..4].copy_from_slice(&self.bcd_usb.to_le_bytes());
        b[4] = self.device_class;
        b[5] = self.device_subclass;
        b[6] = self.device_protocol;
        b[7] = self.max_packet_size0;
        b[8..10].copy_from_slice(&self.vendor_id.to_le_bytes());
        b[10..12].copy_from_slice(&self.product_id.to_le_bytes());
        b[12..14].copy_from_slice(&self.bcd_device.to_le_bytes());
        b[14] = self.manufacturer_index;
        b[15] = self.product_index;
        b[16] = self.serial_number_index;
        b[17] = self.num_configurations;
        b
    }
}

/// A descriptor this module does not interpret (class- or vendor-specific), kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawDescriptor {
    pub descriptor_type: u8,
    /// The bytes after bLength and bDescriptorType.
    pub data: Vec<u8>,
}

impl RawDescriptor {
    fn emit_into(&self, out: &mut Vec<u8>) -> Result<(), DescriptorError> {
        let len = self.data.len() + 2;
        let b_length = u8::try_from(len).map_err(|_| DescriptorError::TooLong {
            what: "class-specific",
            len,
            max: 255,
        })?;
        out.push(b_length);
        out.push(self.descriptor_type);
        out.extend_from_slice(&self.data);
        Ok(())
    }
}

/// One endpoint descriptor (7 bytes; audio-class endpoints carry 2 more, kept in `tail`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointDescriptor {
    /// Address with the direction bit (0x81 = IN 1).
    pub address: u8,
    pub attributes: u8,
    pub max_packet_size: u16,
    pub interval: u8,
    /// Bytes beyond the standard 7 inside this descriptor's bLength.
    pub tail: Vec<u8>,
    /// Class-specific descriptors following this endpoint.
    pub extra: Vec<RawDescriptor>,
}

impl EndpointDescriptor {
    const LEN: usize = 7;

    pub fn is_in(&self) -> bool {
        self.address & 0x80 != 0
    }

    /// Transfer type from bmAttributes: 0 control, 1 isochronous, 2 bulk, 3 interrupt.
    pub fn transfer_type(&self) -> u8 {
        self.attributes & 0x03
    }
}

/// One alternate setting of an interface (9-byte interface descriptor plus what follows it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AltSetting {
    pub alternate_setting: u8,
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
    pub interface_index: u8,
    /// Bytes beyond the standard 9 inside the interface descriptor's bLength.
    pub tail: Vec<u8>,
    /// Class-specific descriptors between this interface descriptor and its first endpoint
    /// (the DFU functional descriptor lives here).
    pub extra: Vec<RawDescriptor>,
    pub endpoints: Vec<EndpointDescriptor>,
}

/// An interface: its number and alternate settings in descriptor order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Interface {
    pub number: u8,
    pub alt_settings: Vec<AltSetting>,
}

/// A configuration descriptor with everything wTotalLength covers, as a tree.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConfigDescriptor {
    pub configuration_value: u8,
    pub configuration_index: u8,
    pub attributes: u8,
    /// In 2 mA units (bMaxPower).
    pub max_power: u8,
    /// Bytes beyond the standard 9 inside the configuration descriptor's bLength.
    pub tail: Vec<u8>,
    /// Descriptors between the configuration header and the first interface.
    pub extra: Vec<RawDescriptor>,
    /// Interfaces in order of first appearance. On emit all alternate settings of an
    /// interface are written together, which is how every real device orders them.
    pub interfaces: Vec<Interface>,
}

impl ConfigDescriptor {
    pub const HEADER_LEN: usize = 9;
    const INTERFACE_LEN: usize = 9;

    /// wTotalLength of a configuration header (for the two-step read).
    pub fn total_length(header: &[u8]) -> Result<u16, DescriptorError> {
        need("configuration descriptor header", header, Self::HEADER_LEN)?;
        expect_type("configuration descriptor", TYPE_CONFIGURATION, header[1])?;
        let total = le16(header, 2);
        if usize::from(total) < Self::HEADER_LEN {
            return Err(DescriptorError::BadTotalLength(total));
        }
        Ok(total)
    }

    /// Parse a configuration and the descriptors wTotalLength covers. Bytes past wTotalLength
    /// are ignored; bNumInterfaces/bNumEndpoints are not trusted (the tree is what the bytes
    /// contain), so a device that miscounts still parses.
    pub fn parse(buf: &[u8]) -> Result<Self, DescriptorError> {
        let total = usize::from(Self::total_length(buf)?);
        let b_length = buf[0];
        if usize::from(b_length) < Self::HEADER_LEN || b_length as usize > total {
            return Err(DescriptorError::BadLength {
                what: "configuration",
                length: b_length,
            });
        }
        need("configuration descriptor (wTotalLength)", buf, total)?;
        let buf = &buf[..total];
        let mut config = ConfigDescriptor {
            configuration_value: buf[5],
            configuration_index: buf[6],
            attributes: buf[7],
            max_power: buf[8],
            tail: buf[Self::HEADER_LEN..usize::from(b_length)].to_vec(),
            extra: Vec::new(),
            interfaces: Vec::new(),
        };

        // Where the current alternate setting sits in `config.interfaces`, once there is one.
        let mut current: Option<(usize, usize)> = None;
        let mut at = usize::from(b_length);
        while at < buf.len() {
            let rest = &buf[at..];
            need("descriptor header in configuration", rest, 2)?;
            let len = usize::from(rest[0]);
            if len < 2 {
                return Err(DescriptorError::BadLength {
                    what: "nested",
                    length: rest[0],
                });
            }
            need("nested descriptor", rest, len)?;
            let d = &rest[..len];
            match d[1] {
                TYPE_INTERFACE => {
                    if len < Self::INTERFACE_LEN {
                        return Err(DescriptorError::BadLength {
                            what: "interface",
                            length: d[0],
                        });
                    }
                    let alt = AltSetting {
                        alternate_setting: d[3],
                        class: d[5],
                        subclass: d[6],
                        protocol: d[7],
                        interface_index: d[8],
                        tail: d[Self::INTERFACE_LEN..].to_vec(),
                        extra: Vec::new(),
                        endpoints: Vec::new(),
                    };
                    let number = d[2];
                    let i = match config.interfaces.iter().position(|i| i.number == number) {
                        Some(i) => i,
                        None => {
                            config.interfaces.push(Interface {
                                number,
                                alt_settings: Vec::new(),
                            });
                            config.interfaces.len() - 1
                        }
                    };
                    config.interfaces[i].alt_settings.push(alt);
                    current = Some((i, config.interfaces[i].alt_settings.len() - 1));
                }
                TYPE_ENDPOINT => {
                    if len < EndpointDescriptor::LEN {
                        return Err(DescriptorError::BadLength {
                            what: "endpoint",
                            length: d[0],
                        });
                    }
                    let (i, a) = current.ok_or(DescriptorError::EndpointOutsideInterface)?;
                    config.interfaces[i].alt_settings[a]
                        .endpoints
                        .push(EndpointDescriptor {
                            address: d[2],
                            attributes: d[3],
                            max_packet_size: le16(d, 4),
                            interval: d[6],
                            tail: d[EndpointDescriptor::LEN..].to_vec(),
                            extra: Vec::new(),
                        });
                }
                other => {
                    let raw = RawDescriptor {
                        descriptor_type: other,
                        data: d[2..].to_vec(),
                    };
                    match current {
                        None => config.extra.push(raw),
                        Some((i, a)) => {
                            let alt = &mut config.interfaces[i].alt_settings[a];
                            match alt.endpoints.last_mut() {
                                Some(ep) => ep.extra.push(raw),
                                None => alt.extra.push(raw),
                            }
                        }
                    }
                }
            }
            at += len;
        }
        Ok(config)
    }

    /// The whole configuration, with wTotalLength, bNumInterfaces and bNumEndpoints computed.
    pub fn emit(&self) -> Result<Vec<u8>, DescriptorError> {
        let mut out = Vec::new();
        let header_len = checked_len("configuration", Self::HEADER_LEN + self.tail.len())?;
        let num_interfaces =
            u8::try_from(self.interfaces.len()).map_err(|_| DescriptorError::TooLong {
                what: "configuration (bNumInterfaces)",
                len: self.interfaces.len(),
                max: 255,
            })?;
        out.extend_from_slice(&[
            header_len,
            TYPE_CONFIGURATION,
            0, // wTotalLength, patched below
            0,
            num_interfaces,
            self.configuration_value,
            self.configuration_index,
            self.attributes,
            self.max_power,
        ]);
        out.extend_from_slice(&self.tail);
        for raw in &self.extra {
            raw.emit_into(&mut out)?;
        }
        for interface in &self.interfaces {
            for alt in &interface.alt_settings {
                let num_endpoints =
                    u8::try_from(alt.endpoints.len()).map_err(|_| DescriptorError::TooLong {
                        what: "interface (bNumEndpoints)",
                        len: alt.endpoints.len(),
                        max: 255,
                    })?;
                out.extend_from_slice(&[
                    checked_len("interface", Self::INTERFACE_LEN + alt.tail.len())?,
                    TYPE_INTERFACE,
                    interface.number,
                    alt.alternate_setting,
                    num_endpoints,
                    alt.class,
                    alt.subclass,
                    alt.protocol,
                    alt.interface_index,
                ]);
                out.extend_from_slice(&alt.tail);
                for raw in &alt.extra {
                    raw.emit_into(&mut out)?;
                }
                for ep in &alt.endpoints {
                    let mps = ep.max_packet_size.to_le_bytes();
                    out.extend_from_slice(&[
                        checked_len("endpoint", EndpointDescriptor::LEN + ep.tail.len())?,
                        TYPE_ENDPOINT,
                        ep.address,
                        ep.attributes,
                        mps[0],
                        mps[1],
                        ep.interval,
                    ]);
                    out.extend_from_slice(&ep.tail);
                    for raw in &ep.extra {
                        raw.emit_into(&mut out)?;
                    }
                }
            }
        }
        let total = u16::try_from(out.len()).map_err(|_| DescriptorError::TooLong {
            what: "configuration (wTotalLength)",
            len: out.len(),
            max: usize::from(u16::MAX),
        })?;
        out[2..4].copy_from_slice(&total.to_le_bytes());
        Ok(out)
    }

    /// The alternate setting `alt` of interface `number`, if the configuration has it.
    pub fn alt_setting(&self, number: u8, alt: u8) -> Option<&AltSetting> {
        self.interfaces
            .iter()
            .find(|i| i.number == number)?
            .alt_settings
            .iter()
            .find(|a| a.alternate_setting == alt)
    }
}

fn checked_len(what: &'static str, len: usize) -> Result<u8, DescriptorError> {
    u8::try_from(len).map_err(|_| DescriptorError::TooLong {
        what,
        len,
        max: 255,
    })
}

/// Decode a string descriptor (UTF-16LE after a 2-byte header).
///
/// Lenient where devices are sloppy: a reply shorter than bLength (the host asked for fewer
/// bytes) is decoded as far as it goes, an odd trailing byte is dropped, and unpaired
/// surrogates become U+FFFD.
pub fn parse_string(buf: &[u8]) -> Result<String, DescriptorError> {
    need("string descriptor", buf, 2)?;
    if buf[0] < 2 {
        return Err(DescriptorError::BadLength {
            what: "string",
            length: buf[0],
        });
    }
    expect_type("string descriptor", TYPE_STRING, buf[1])?;
    let end = usize::from(buf[0]).min(buf.len());
    let units: Vec<u16> = buf[2..end]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    Ok(String::from_utf16_lossy(&units))
}

/// Encode a string descriptor. At most 126 UTF-16 code units fit in bLength.
pub fn emit_string(s: &str) -> Result<Vec<u8>, DescriptorError> {
    let units: Vec<u16> = s.encode_utf16().collect();
    let len = 2 + units.len() * 2;
    let b_length = checked_len("string", len)?;
    let mut out = Vec::with_capacity(len);
    out.push(b_length);
    out.push(TYPE_STRING);
    for u in units {
        out.extend_from_slice(&u.to_le_bytes());
    }
    Ok(out)
}

/// Decode string descriptor 0: the list of supported language IDs.
pub fn parse_language_ids(buf: &[u8]) -> Result<Vec<u16>, DescriptorError> {
    need("language ID descriptor", buf, 2)?;
    if buf[0] < 2 {
        return Err(DescriptorError::BadLength {
            what: "language ID",
            length: buf[0],
        });
    }
    expect_type("language ID descriptor", TYPE_STRING, buf[1])?;
    let end = usize::from(buf[0]).min(buf.len());
    Ok(buf[2..end]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect())
}

/// Encode string descriptor 0. At most 126 language IDs fit.
pub fn emit_language_ids(ids: &[u16]) -> Result<Vec<u8>, DescriptorError> {
    let len = 2 + ids.len() * 2;
    let mut out = vec![checked_len("language ID", len)?, TYPE_STRING];
    for id in ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
    Ok(out)
}

/// The GET_DESCRIPTOR setup for descriptor `kind` number `index` (wIndex = language for strings).
pub fn get_descriptor_setup(kind: u8, index: u8, language: u16) -> ControlSetup {
    ControlSetup::new(
        REQUEST_TYPE_STANDARD_IN,
        REQUEST_GET_DESCRIPTOR,
        u16::from(kind) << 8 | u16::from(index),
        language,
    )
}

/// Read and parse the device descriptor.
pub fn read_device_descriptor(
    transport: &mut dyn UsbTransport,
) -> Result<DeviceDescriptor, DescriptorError> {
    let bytes = transport.control_in(
        get_descriptor_setup(TYPE_DEVICE, 0, 0),
        DeviceDescriptor::LEN as u16,
        DESCRIPTOR_TIMEOUT,
    )?;
    DeviceDescriptor::parse(&bytes)
}

/// Read configuration descriptor `index` (0-based, not bConfigurationValue): the 9-byte header
/// first for wTotalLength, then the whole tree.
pub fn read_config_descriptor(
    transport: &mut dyn UsbTransport,
    index: u8,
) -> Result<ConfigDescriptor, DescriptorError> {
    let setup = get_descriptor_setup(TYPE_CONFIGURATION, index, 0);
    let header = transport.control_in(
        setup,
        ConfigDescriptor::HEADER_LEN as u16,
        DESCRIPTOR_TIMEOUT,
    )?;
    let total = ConfigDescriptor::total_length(&header)?;
    let bytes = transport.control_in(setup, total, DESCRIPTOR_TIMEOUT)?;
    ConfigDescriptor::parse(&bytes)
}

/// Read the language IDs (string descriptor 0).
pub fn read_language_ids(transport: &mut dyn UsbTransport) -> Result<Vec<u16>, DescriptorError> {
    let bytes = transport.control_in(
        get_descriptor_setup(TYPE_STRING, 0, 0),
        255,
        DESCRIPTOR_TIMEOUT,
    )?;
    parse_language_ids(&bytes)
}

/// Read string descriptor `index` in `language`.
pub fn read_string(
    transport: &mut dyn UsbTransport,
    index: u8,
    language: u16,
) -> Result<String, DescriptorError> {
    let bytes = transport.control_in(
        get_descriptor_setup(TYPE_STRING, index, language),
        255,
        DESCRIPTOR_TIMEOUT,
    )?;
    parse_string(&bytes)
}

/// The language to read strings in: the device's first language ID, or US English when
/// string 0 cannot be read or is empty (libusb's ASCII helper behaves the same way).
pub fn first_language(transport: &mut dyn UsbTransport) -> Result<u16, TransportError> {
    match read_language_ids(transport) {
        Ok(ids) => Ok(ids.first().copied().unwrap_or(LANGID_EN_US)),
        // A device that left the bus will not answer the string read either: say so now.
        Err(DescriptorError::Transport(e)) if e.is_gone() => Err(e),
        Err(e) => {
            tracing::debug!("language IDs unreadable ({e}); using 0x0409");
            Ok(LANGID_EN_US)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Device descriptor of an Apple device in DFU mode, as an Apple ROM reports it
    /// (iManufacturer 2, iProduct 3, iSerialNumber 4 per the tr4mpass#45 lsusb dump).
    const DFU_DEVICE: [u8; 18] = [
        18, 1, 0x00, 0x02, 0, 0, 0, 64, 0xac, 0x05, 0x27, 0x12, 0x00, 0x00, 2, 3, 4, 1,
    ];

    /// DFU configuration: one interface (0/0, class FE/01/00) with a DFU functional descriptor.
    fn dfu_config_bytes() -> Vec<u8> {
        vec![
            9, 2, 27, 0, 1, 1, 0, 0x80, 250, // configuration
            9, 4, 0, 0, 0, 0xfe, 0x01, 0x00, 0, // interface 0 alt 0
            9, 0x21, 0x0b, 0xff, 0x00, 0x00, 0x08, 0x10, 0x01, // DFU functional
        ]
    }

    #[test]
    fn device_descriptor_parses_and_round_trips() {
        let d = DeviceDescriptor::parse(&DFU_DEVICE).unwrap();
        assert_eq!(d.vendor_id, 0x05ac);
        assert_eq!(d.product_id, 0x1227);
        assert_eq!(d.bcd_usb, 0x0200);
        assert_eq!(d.max_packet_size0, 64);
        assert_eq!(d.serial_number_index, 4);
        assert_eq!(d.num_configurations, 1);
        assert_eq!(d.emit(), DFU_DEVICE);
        assert_eq!(DeviceDescriptor::parse(&d.emit()).unwrap(), d);
    }

    #[test]
    fn device_descriptor_rejects_malformed() {
        assert_eq!(
            DeviceDescriptor::parse(&DFU_DEVICE[..17]),
            Err(DescriptorError::Truncated {
                what: "device descriptor",
                needed: 18,
                got: 17
            })
        );
        let mut b = DFU_DEVICE;
        b[0] = 12;
        assert!(matches!(
            DeviceDescriptor::parse(&b),
            Err(DescriptorError::BadLength { length: 12, .. })
        ));
        let mut b = DFU_DEVICE;
        b[1] = 2;
        assert!(matches!(
            DeviceDescriptor::parse(&b),
            Err(DescriptorError::WrongType { found: 2, .. })
        ));
        assert!(DeviceDescriptor::parse(&[]).is_err());
    }

    #[test]
    fn dfu_config_keeps_functional_descriptor_raw() {
        let bytes = dfu_config_bytes();
        let c = ConfigDescriptor::parse(&bytes).unwrap();
        assert_eq!(c.configuration_value, 1);
        assert_eq!(c.attributes, 0x80);
        assert_eq!(c.max_power, 250);
        assert_eq!(c.interfaces.len(), 1);
        let alt = c.alt_setting(0, 0).unwrap();
        assert_eq!((alt.class, alt.subclass, alt.protocol), (0xfe, 0x01, 0x00));
        assert_eq!(
            alt.extra,
            vec![RawDescriptor {
                descriptor_type: TYPE_DFU_FUNCTIONAL,
                data: vec![0x0b, 0xff, 0x00, 0x00, 0x08, 0x10, 0x01],
            }]
        );
        assert!(alt.endpoints.is_empty());
        assert_eq!(c.emit().unwrap(), bytes);
    }

    /// Recovery mode (0x1281/0x1282-like): interface 0 with bulk OUT 0x04, interface 1 with two
    /// alternate settings, the second carrying bulk IN 0x81 (protocol.md §1.2).
    fn recovery_config_bytes() -> Vec<u8> {
        let mut b = vec![
            9, 2, 0, 0, 2, 1, 5, 0xc0, 250, // configuration (wTotalLength patched)
            9, 4, 0, 0, 1, 0xff, 0xff, 0x51, 6, // interface 0 alt 0
            7, 5, 0x04, 2, 0x00, 0x02, 0, // bulk OUT 4, 512
            9, 4, 1, 0, 0, 0xff, 0xff, 0x51, 6, // interface 1 alt 0
            9, 4, 1, 1, 2, 0xff, 0xff, 0x51, 6, // interface 1 alt 1
            7, 5, 0x81, 2, 0x00, 0x02, 0, // bulk IN 1
            7, 5, 0x03, 2, 0x00, 0x02, 0, // bulk OUT 3
            4, 0x24, 0xaa, 0xbb, // a class-specific descriptor after an endpoint
        ];
        let total = b.len() as u16;
        b[2..4].copy_from_slice(&total.to_le_bytes());
        b
    }

    #[test]
    fn recovery_config_tree() {
        let bytes = recovery_config_bytes();
        let c = ConfigDescriptor::parse(&bytes).unwrap();
        assert_eq!(c.interfaces.len(), 2);
        assert_eq!(c.interfaces[1].alt_settings.len(), 2);
        let if0 = c.alt_setting(0, 0).unwrap();
        assert_eq!(if0.endpoints.len(), 1);
        assert_eq!(if0.endpoints[0].address, 0x04);
        assert!(!if0.endpoints[0].is_in());
        assert_eq!(if0.endpoints[0].transfer_type(), 2);
        assert_eq!(if0.endpoints[0].max_packet_size, 512);
        let if1 = c.alt_setting(1, 1).unwrap();
        assert_eq!(if1.endpoints[0].address, 0x81);
        assert!(if1.endpoints[0].is_in());
        assert_eq!(
            if1.endpoints[1].extra,
            vec![RawDescriptor {
                descriptor_type: 0x24,
                data: vec![0xaa, 0xbb]
            }]
        );
        assert!(c.alt_setting(1, 2).is_none());
        assert!(c.alt_setting(2, 0).is_none());
        assert_eq!(c.emit().unwrap(), bytes);
        assert_eq!(ConfigDescriptor::parse(&c.emit().unwrap()).unwrap(), c);
    }

    #[test]
    fn config_ignores_bytes_past_total_length_and_wrong_counts() {
        let mut bytes = dfu_config_bytes();
        bytes[4] = 7; // bNumInterfaces lies
        bytes.extend_from_slice(&[0xde, 0xad]);
        let c = ConfigDescriptor::parse(&bytes).unwrap();
        assert_eq!(c.interfaces.len(), 1);
    }

    #[test]
    fn interleaved_alt_settings_group_under_their_interface() {
        let mut b = vec![
            9, 2, 0, 0, 2, 1, 0, 0x80, 50, //
            9, 4, 0, 0, 0, 0xff, 0, 0, 0, //
            9, 4, 1, 0, 0, 0xff, 0, 0, 0, //
            9, 4, 0, 1, 0, 0xff, 0, 0, 0, //
        ];
        let total = b.len() as u16;
        b[2..4].copy_from_slice(&total.to_le_bytes());
        let c = ConfigDescriptor::parse(&b).unwrap();
        assert_eq!(c.interfaces[0].number, 0);
        assert_eq!(c.interfaces[0].alt_settings.len(), 2);
        assert_eq!(c.interfaces[1].number, 1);
        assert_eq!(ConfigDescriptor::parse(&c.emit().unwrap()).unwrap(), c);
    }

    #[test]
    fn config_rejects_malformed() {
        let good = recovery_config_bytes();
        // Shorter than wTotalLength.
        assert!(matches!(
            ConfigDescriptor::parse(&good[..good.len() - 1]),
            Err(DescriptorError::Truncated { .. })
        ));
        // wTotalLength below the header size.
        let mut b = good.clone();
        b[2..4].copy_from_slice(&5u16.to_le_bytes());
        assert_eq!(
            ConfigDescriptor::parse(&b),
            Err(DescriptorError::BadTotalLength(5))
        );
        // A zero bLength would loop forever in a naive walker.
        let mut b = dfu_config_bytes();
        b[18] = 0;
        assert!(matches!(
            ConfigDescriptor::parse(&b),
            Err(DescriptorError::BadLength { length: 0, .. })
        ));
        // Nested descriptor running past the end.
        let mut b = dfu_config_bytes();
        b[18] = 10;
        assert!(matches!(
            ConfigDescriptor::parse(&b),
            Err(DescriptorError::Truncated { .. })
        ));
        // Endpoint before any interface.
        let mut b = vec![9, 2, 16, 0, 0, 1, 0, 0x80, 50, 7, 5, 0x81, 2, 0, 2, 0];
        assert_eq!(
            ConfigDescriptor::parse(&b),
            Err(DescriptorError::EndpointOutsideInterface)
        );
        // Short endpoint.
        b = vec![
            9, 2, 24, 0, 1, 1, 0, 0x80, 50, 9, 4, 0, 0, 1, 0xff, 0, 0, 0, 6, 5, 0x81, 2, 0, 2,
        ];
        assert!(matches!(
            ConfigDescriptor::parse(&b),
            Err(DescriptorError::BadLength {
                what: "endpoint",
                ..
            })
        ));
        // Wrong type.
        let mut b = good;
        b[1] = 1;
        assert!(matches!(
            ConfigDescriptor::parse(&b),
            Err(DescriptorError::WrongType { .. })
        ));
    }

    #[test]
    fn config_emit_rejects_oversized_parts() {
        let mut c = ConfigDescriptor::parse(&dfu_config_bytes()).unwrap();
        c.extra.push(RawDescriptor {
            descriptor_type: 0x24,
            data: vec![0; 254],
        });
        assert!(matches!(
            c.emit(),
            Err(DescriptorError::TooLong {
                what: "class-specific",
                len: 256,
                ..
            })
        ));
    }

    #[test]
    fn string_round_trip_and_leniency() {
        let s = "CPID:8103 CPRV:11 ECID:001C2B3A4D5E6F70 SRTG:[iBoot-6723.0.0.1.1]";
        let b = emit_string(s).unwrap();
        assert_eq!(b[0] as usize, 2 + 2 * s.len());
        assert_eq!(&b[..6], &[b.len() as u8, 3, b'C', 0, b'P', 0]);
        assert_eq!(parse_string(&b).unwrap(), s);
        // Non-ASCII survives (surrogate pair included).
        let u = "Ünïcode 🍎";
        assert_eq!(parse_string(&emit_string(u).unwrap()).unwrap(), u);
        // Odd bLength: the dangling byte is dropped.
        assert_eq!(parse_string(&[5, 3, b'A', 0, b'B']).unwrap(), "A");
        // Reply shorter than bLength.
        assert_eq!(parse_string(&[10, 3, b'A', 0]).unwrap(), "A");
        // Bytes after bLength ignored.
        assert_eq!(parse_string(&[4, 3, b'A', 0, b'B', 0]).unwrap(), "A");
        // Lone surrogate.
        assert_eq!(parse_string(&[4, 3, 0x00, 0xd8]).unwrap(), "\u{fffd}");
        assert_eq!(parse_string(&[2, 3]).unwrap(), "");
    }

    #[test]
    fn string_rejects_malformed() {
        assert!(matches!(
            parse_string(&[1, 3]),
            Err(DescriptorError::BadLength { length: 1, .. })
        ));
        assert!(matches!(
            parse_string(&[4, 2, 0, 0]),
            Err(DescriptorError::WrongType { found: 2, .. })
        ));
        assert!(matches!(
            parse_string(&[4]),
            Err(DescriptorError::Truncated { .. })
        ));
        let long = "x".repeat(127);
        assert!(matches!(
            emit_string(&long),
            Err(DescriptorError::TooLong { len: 256, .. })
        ));
        assert_eq!(emit_string(&"x".repeat(126)).unwrap().len(), 254);
    }

    #[test]
    fn language_ids() {
        let b = emit_language_ids(&[0x0409, 0x0407]).unwrap();
        assert_eq!(b, vec![6, 3, 0x09, 0x04, 0x07, 0x04]);
        assert_eq!(parse_language_ids(&b).unwrap(), vec![0x0409, 0x0407]);
        assert_eq!(parse_language_ids(&[3, 3, 9]).unwrap(), Vec::<u16>::new());
        assert!(parse_language_ids(&[0, 3]).is_err());
        assert!(emit_language_ids(&[0; 127]).is_err());
    }

    #[test]
    fn get_descriptor_setup_fields() {
        assert_eq!(
            get_descriptor_setup(TYPE_STRING, 4, 0x0409),
            ControlSetup::new(0x80, 6, 0x0304, 0x0409)
        );
        assert_eq!(
            get_descriptor_setup(TYPE_CONFIGURATION, 0, 0),
            ControlSetup::new(0x80, 6, 0x0200, 0)
        );
    }
}
