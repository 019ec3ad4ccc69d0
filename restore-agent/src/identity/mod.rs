//! Who is on the cable: Apple USB mode from VID:PID, the SecureROM/iBoot serial string, nonces,
//! and the Mac model behind CPID+BDID.
//!
//! SKELETON: the types and signatures below are the agreed API; the identity helper fills in the
//! bodies (and may add fields/variants, but not rename these).

pub mod mode;

pub use mode::AppleMode;

use crate::usb::{TransportError, UsbTransport};

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
    pub cpid: Option<u32>,
    pub cprv: Option<u32>,
    pub cpfm: Option<u32>,
    pub scep: Option<u32>,
    pub bdid: Option<u32>,
    pub ecid: Option<u64>,
    pub ibfl: Option<u32>,
    pub prev: Option<u32>,
    pub srtg: Option<String>,
    pub srnm: Option<String>,
    pub ap_nonce: Option<Vec<u8>>,
    pub sep_nonce: Option<Vec<u8>>,
    /// The raw iSerialNumber string.
    pub serial: String,
    pub model: Option<&'static MacModel>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("reading the device's identity over USB failed: {0}")]
    Transport(#[from] TransportError),
    #[error("unknown Apple device: CPID {cpid:#06x} BDID {bdid:#04x} is not in macrescue's table (a Mac newer than this build?); a restore can still proceed with an IPSW whose BuildManifest lists this board")]
    UnknownModel { cpid: u32, bdid: u32 },
}

/// Read mode, serial string, nonces and model from an opened device.
pub fn read_identity(_transport: &mut dyn UsbTransport) -> Result<DeviceIdentity, IdentityError> {
    todo!("identity helper")
}
