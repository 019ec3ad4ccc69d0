//! Who is on the cable: Apple USB mode from VID:PID, the SecureROM/iBoot serial string, nonces,
//! and the Mac model behind CPID+BDID.
//!
//! [`DeviceIdentity::from_strings`] is the sans-IO core (strings in, identity out);
//! [`read_identity`] fetches those strings from an opened device through the USB seam.

pub mod devices;
pub mod mode;
pub mod report;
pub mod serial;
pub mod situation;

pub use mode::AppleMode;
pub use report::IdentityReport;
pub use situation::Situation;

use crate::usb::descriptor::{self, DescriptorError};
use crate::usb::{DeviceInfo, TransportError, UsbBus, UsbTransport};

/// What kind of machine a CPID+BDID row describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// An Apple Silicon Mac: what macrescue restores.
    AppleSiliconMac,
    /// Apple's macOS virtual machine: a Mac, but never on a USB cable.
    VirtualMac,
    /// An Intel Mac's T2-side board: restored through bridgeOS, out of scope.
    IntelT2Mac,
    /// Shares an Apple Silicon CPID but is not a Mac (Vision Pro, Studio Display, research VM…).
    NotAMac,
}

impl ModelKind {
    /// The snake_case name used in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::AppleSiliconMac => "apple_silicon_mac",
            ModelKind::VirtualMac => "virtual_mac",
            ModelKind::IntelT2Mac => "intel_t2_mac",
            ModelKind::NotAMac => "not_a_mac",
        }
    }
}

/// One row of the CPID+BDID table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MacModel {
    pub product_type: &'static str,
    pub board_config: &'static str,
    pub name: &'static str,
    pub cpid: u32,
    pub bdid: u32,
    pub kind: ModelKind,
}

/// Everything read from a device (or a serial string) about its identity.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceIdentity {
    pub mode: Option<AppleMode>,
    /// The Mac's chip ID. In Port DFU this is unpacked from BDID (§1.5), not the serial's CPID.
    pub cpid: Option<u32>,
    pub cprv: Option<u32>,
    pub cpfm: Option<u32>,
    pub scep: Option<u32>,
    /// The Mac's board ID. In Port DFU this is unpacked from BDID (§1.5).
    pub bdid: Option<u32>,
    pub ecid: Option<u64>,
    pub ibfl: Option<u32>,
    pub prev: Option<u32>,
    pub srtg: Option<String>,
    pub srnm: Option<String>,
    /// ApNonce exactly as the device prints it. In Port DFU TSS wants it reversed: use
    /// [`DeviceIdentity::ap_nonce_for_tss`].
    pub ap_nonce: Option<Vec<u8>>,
    pub sep_nonce: Option<Vec<u8>>,
    /// The raw iSerialNumber string.
    pub serial: String,
    pub model: Option<&'static MacModel>,
    /// Security domain (`SDOM:`), when printed.
    pub sdom: Option<u32>,
    pub imei: Option<String>,
    /// Present on devices exploited by third-party tools; recorded, never acted on.
    pub pwnd: Option<String>,
    /// `CPID:` as printed. Differs from `cpid` only in Port DFU, where it is the port
    /// controller's own chip.
    pub raw_cpid: Option<u32>,
    /// `BDID:` as printed (truncated to 32 bits). In Port DFU it packs the Mac's CPID and BDID.
    pub raw_bdid: Option<u32>,
    /// String descriptor 1 (where the nonces live), when it could be read.
    pub nonce_string: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("reading the device's identity over USB failed: {0}")]
    Transport(#[from] TransportError),
    #[error("unknown Apple device: CPID {cpid:#06x} BDID {bdid:#04x} is not in macrescue's table (a Mac newer than this build?); a restore can still proceed with an IPSW whose BuildManifest lists this board")]
    UnknownModel { cpid: u32, bdid: u32 },
    #[error("the device sent a malformed USB descriptor ({0}); replug the cable, or try another cable or port")]
    Descriptor(DescriptorError),
    #[error("the device's serial string carries no CPID/BDID ({serial:?}): is this an Apple device in DFU or Recovery mode?")]
    Unidentified { serial: String },
    #[error("{product_type} ({name}) is not an Apple Silicon Mac: macrescue cannot restore it")]
    NotAMac {
        product_type: &'static str,
        name: &'static str,
        kind: ModelKind,
    },
}

impl From<DescriptorError> for IdentityError {
    fn from(e: DescriptorError) -> Self {
        // Keep transport failures recognisable (`is_gone` during re-enumeration).
        match e {
            DescriptorError::Transport(t) => IdentityError::Transport(t),
            other => IdentityError::Descriptor(other),
        }
    }
}

/// Port DFU (§1.5): the Mac's own CPID and BDID are packed into the port controller's BDID.
pub fn unpack_port_dfu_bdid(raw_bdid: u32) -> (u32, u32) {
    ((raw_bdid >> 8) & 0xFFFF, (raw_bdid >> 24) & 0xFF)
}

impl DeviceIdentity {
    /// Identity from the strings a device shows: `serial` (iSerialNumber) and `nonce_string`
    /// (string descriptor 1). Nonces are looked for in both; string 1 wins, as it is where
    /// libirecovery reads them. Never fails: unknown models leave `model` as `None`.
    pub fn from_strings(
        mode: Option<AppleMode>,
        serial: &str,
        nonce_string: Option<&str>,
    ) -> DeviceIdentity {
        let s = serial::parse(serial);
        let n = nonce_string.map(serial::parse).unwrap_or_default();
        let (cpid, bdid) = if mode == Some(AppleMode::PortDfu) {
            match s.bdid.map(unpack_port_dfu_bdid) {
                Some((c, b)) => (Some(c), Some(b)),
                None => (None, None),
            }
        } else {
            (s.cpid, s.bdid)
        };
        let model = match (cpid, bdid) {
            (Some(c), Some(b)) => devices::lookup(c, b),
            _ => None,
        };
        DeviceIdentity {
            mode,
            cpid,
            cprv: s.cprv,
            cpfm: s.cpfm,
            scep: s.scep,
            bdid,
            ecid: s.ecid,
            ibfl: s.ibfl,
            prev: s.prev,
            srtg: s.srtg,
            srnm: s.srnm,
            ap_nonce: n.nonc.or(s.nonc),
            sep_nonce: n.snon.or(s.snon),
            serial: serial.to_string(),
            model,
            sdom: s.sdom,
            imei: s.imei,
            pwnd: s.pwnd,
            raw_cpid: s.cpid,
            raw_bdid: s.bdid,
            nonce_string: nonce_string.map(str::to_string),
        }
    }

    /// The model, or why there is none.
    pub fn require_model(&self) -> Result<&'static MacModel, IdentityError> {
        if let Some(m) = self.model {
            return Ok(m);
        }
        match (self.cpid, self.bdid) {
            (Some(cpid), Some(bdid)) => Err(IdentityError::UnknownModel { cpid, bdid }),
            _ => Err(IdentityError::Unidentified {
                serial: self.serial.clone(),
            }),
        }
    }

    /// The model if it is an Apple Silicon Mac (what macrescue restores), or why not.
    pub fn require_mac(&self) -> Result<&'static MacModel, IdentityError> {
        let m = self.require_model()?;
        if m.kind != ModelKind::AppleSiliconMac {
            return Err(IdentityError::NotAMac {
                product_type: m.product_type,
                name: m.name,
                kind: m.kind,
            });
        }
        Ok(m)
    }

    /// ApNonce in the byte order TSS expects: as printed, except in Port DFU where
    /// idevicerestore reverses it (`dfu_get_portdfu_nonce`, protocol.md §1.4).
    pub fn ap_nonce_for_tss(&self) -> Option<Vec<u8>> {
        let mut n = self.ap_nonce.clone()?;
        if self.mode == Some(AppleMode::PortDfu) {
            n.reverse();
        }
        Some(n)
    }

    /// IBFL bit 2: the boot ROM speaks Image4 (every Apple Silicon Mac does).
    pub fn image4_supported(&self) -> Option<bool> {
        self.ibfl.map(|f| f & 0x04 != 0)
    }

    /// What this device is and what a technician should do about it.
    pub fn situation(&self) -> Situation {
        Situation::of(self)
    }

    /// The JSON-friendly view.
    pub fn report(&self) -> IdentityReport {
        IdentityReport::from_identity(self)
    }
}

/// Read mode, serial string, nonces and model from an opened device.
///
/// An unknown model is not an error here (`model` stays `None`; see
/// [`DeviceIdentity::require_model`]): the caller decides whether it can proceed.
pub fn read_identity(transport: &mut dyn UsbTransport) -> Result<DeviceIdentity, IdentityError> {
    let info = transport.info().clone();
    let mode = AppleMode::from_ids(info.vendor_id, info.product_id);
    let device = descriptor::read_device_descriptor(transport)?;
    if (device.vendor_id, device.product_id) != (info.vendor_id, info.product_id) {
        tracing::warn!(
            "device descriptor says {:04x}:{:04x} but the device was found as {:04x}:{:04x}",
            device.vendor_id,
            device.product_id,
            info.vendor_id,
            info.product_id
        );
    }
    let language = descriptor::first_language(transport)?;
    let serial = if device.serial_number_index == 0 {
        tracing::warn!("device at {} has no serial string", info.location);
        String::new()
    } else {
        descriptor::read_string(transport, device.serial_number_index, language)?
    };
    // String 1 carries the nonces (libirecovery `irecv_copy_nonce_with_tag`). Devices without
    // it (or stalling it) still identify from the serial string alone.
    let nonce_string = match descriptor::read_string(transport, 1, language) {
        Ok(s) => Some(s),
        Err(DescriptorError::Transport(e)) if e.is_gone() => return Err(e.into()),
        Err(e) => {
            tracing::debug!("string descriptor 1 unreadable: {e}");
            None
        }
    };
    let identity = DeviceIdentity::from_strings(mode, &serial, nonce_string.as_deref());
    tracing::debug!(?identity, "identified device at {}", info.location);
    Ok(identity)
}

/// Open `device` on `bus` and read its identity.
pub fn probe(bus: &dyn UsbBus, device: &DeviceInfo) -> Result<DeviceIdentity, IdentityError> {
    let mut transport = bus.open(device)?;
    read_identity(transport.as_mut())
}

/// Whether `device` is an Apple device in a mode macrescue knows (DFU, Port DFU, Recovery,
/// restore, WTF): those are the ones worth opening.
pub fn is_apple_mode_device(device: &DeviceInfo) -> bool {
    AppleMode::from_ids(device.vendor_id, device.product_id).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    const M1_AIR_DFU: &str = "CPID:8103 CPRV:11 CPFM:03 SCEP:01 BDID:26 ECID:0005681C34D3001E IBFL:3C SRTG:[iBoot-4479.0.0.100.4]";

    #[test]
    fn from_strings_identifies_a_mac() {
        let id = DeviceIdentity::from_strings(Some(AppleMode::Dfu), M1_AIR_DFU, None);
        assert_eq!(id.cpid, Some(0x8103));
        assert_eq!(id.bdid, Some(0x26));
        assert_eq!(id.raw_cpid, Some(0x8103));
        assert_eq!(id.ecid, Some(0x0005_681c_34d3_001e));
        assert_eq!(id.model.unwrap().board_config, "j313ap");
        assert_eq!(id.require_mac().unwrap().product_type, "MacBookAir10,1");
        assert_eq!(id.image4_supported(), Some(true));
        assert_eq!(id.serial, M1_AIR_DFU);
    }

    #[test]
    fn nonce_string_wins_over_serial() {
        let serial = format!("{M1_AIR_DFU} NONC:aaaa SNON:bbbb");
        let id =
            DeviceIdentity::from_strings(Some(AppleMode::Dfu), &serial, Some("NONC:0102 SNON:"));
        assert_eq!(id.ap_nonce, Some(vec![1, 2]));
        // String 1's SNON is garbled, so the serial's is used.
        assert_eq!(id.sep_nonce, Some(vec![0xbb, 0xbb]));
        let id = DeviceIdentity::from_strings(Some(AppleMode::Dfu), &serial, None);
        assert_eq!(id.ap_nonce, Some(vec![0xaa, 0xaa]));
    }

    #[test]
    fn port_dfu_unpacks_bdid_and_reverses_nonce_for_tss() {
        // Mac mini M4 (0x8132/0x2A) behind a port controller: BDID = bdid<<24 | cpid<<8 | x.
        let id = DeviceIdentity::from_strings(
            Some(AppleMode::PortDfu),
            "CPID:1234 BDID:2A813200 ECID:000C69AA3AF3801C PREV:05",
            Some("NONC:01020304"),
        );
        assert_eq!((id.cpid, id.bdid), (Some(0x8132), Some(0x2a)));
        assert_eq!(
            (id.raw_cpid, id.raw_bdid),
            (Some(0x1234), Some(0x2a81_3200))
        );
        assert_eq!(id.model.unwrap().product_type, "Mac16,10");
        assert_eq!(id.prev, Some(5));
        assert_eq!(id.ap_nonce, Some(vec![1, 2, 3, 4]));
        assert_eq!(id.ap_nonce_for_tss(), Some(vec![4, 3, 2, 1]));
        // Outside Port DFU the order is untouched.
        let dfu = DeviceIdentity::from_strings(Some(AppleMode::Dfu), "NONC:0102", None);
        assert_eq!(dfu.ap_nonce_for_tss(), Some(vec![1, 2]));
        // Port DFU without BDID: no guessing from the controller's CPID.
        let bare = DeviceIdentity::from_strings(Some(AppleMode::PortDfu), "CPID:8132", None);
        assert_eq!((bare.cpid, bare.bdid), (None, None));
    }

    #[test]
    fn require_model_errors() {
        let id = DeviceIdentity::from_strings(None, "CPID:8103 BDID:99", None);
        let e = id.require_model().unwrap_err();
        assert_eq!(
            e,
            IdentityError::UnknownModel {
                cpid: 0x8103,
                bdid: 0x99
            }
        );
        let text = e.to_string();
        assert!(text.contains("0x8103") && text.contains("0x99"), "{text}");
        assert!(matches!(
            DeviceIdentity::from_strings(None, "CPID:8103", None).require_model(),
            Err(IdentityError::Unidentified { .. })
        ));
        let vision = DeviceIdentity::from_strings(None, "CPID:8112 BDID:42", None);
        assert_eq!(vision.require_model().unwrap().kind, ModelKind::NotAMac);
        assert!(matches!(
            vision.require_mac(),
            Err(IdentityError::NotAMac {
                product_type: "RealityDevice14,1",
                ..
            })
        ));
    }

    #[test]
    fn port_dfu_unpack() {
        assert_eq!(unpack_port_dfu_bdid(0x2281_0300), (0x8103, 0x22));
        assert_eq!(unpack_port_dfu_bdid(0), (0, 0));
        assert_eq!(unpack_port_dfu_bdid(u32::MAX), (0xffff, 0xff));
    }
}
