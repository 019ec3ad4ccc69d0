//! What a technician should be told about a device: one variant per situation the station can
//! meet, each with a plain-language message saying what is going on and what to do.

use std::fmt;

use super::{AppleMode, DeviceIdentity, MacModel, ModelKind};

/// How to enter DFU, from Apple's procedure (support.apple.com/108900 as quoted in
/// docs/field-notes.md §4.2); the DFU port per model is on support.apple.com/120694.
pub const ENTER_DFU_HOWTO: &str = "shut the Mac down and connect this cable to its DFU port \
(support.apple.com/120694). Laptop: on mains power, press Power briefly, then at once hold \
left Control + left Option + right Shift + Power for 10 seconds, release Control, Option and \
Shift and keep holding Power for another 10 seconds. Desktop: unplug its power, hold Power \
while plugging power back in, and keep holding for up to 10 seconds";

/// A device's situation, derived from its [`DeviceIdentity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Situation {
    /// A known Apple Silicon Mac in DFU: ready for macrescue.
    MacInDfu(&'static MacModel),
    /// A known Apple Silicon Mac in Recovery (iBoot). Expected mid-restore, otherwise the
    /// technician put it in Recovery instead of DFU.
    MacInRecovery(&'static MacModel),
    /// The Mac's USB-C port controller is in DFU, not the Mac.
    MacInPortDfu(&'static MacModel),
    /// A known Apple Silicon Mac, mode not known (identified from a string only).
    Mac(&'static MacModel),
    /// A device running a restore ramdisk (usbmux): a restore is under way or was cut off.
    RestoreMode,
    /// Legacy WTF mode: an old iOS device, never a Mac.
    Wtf,
    /// Shares an Apple Silicon chip ID but is not a Mac (Vision Pro, Studio Display, …).
    NotAMac(&'static MacModel),
    /// An Intel Mac's T2 chip.
    IntelT2Mac(&'static MacModel),
    /// Apple's virtual Mac: never on a cable.
    VirtualMac(&'static MacModel),
    /// CPID and BDID read, but not in the table.
    UnknownModel {
        cpid: u32,
        bdid: u32,
        mode: Option<AppleMode>,
    },
    /// The serial string did not yield CPID and BDID.
    Unidentified { mode: Option<AppleMode> },
}

impl Situation {
    pub fn of(id: &DeviceIdentity) -> Situation {
        match id.mode {
            Some(AppleMode::Wtf) => return Situation::Wtf,
            Some(AppleMode::Restore) if id.model.is_none() => return Situation::RestoreMode,
            _ => {}
        }
        let Some(model) = id.model else {
            return match (id.cpid, id.bdid) {
                (Some(cpid), Some(bdid)) => Situation::UnknownModel {
                    cpid,
                    bdid,
                    mode: id.mode,
                },
                _ => Situation::Unidentified { mode: id.mode },
            };
        };
        match model.kind {
            ModelKind::NotAMac => Situation::NotAMac(model),
            ModelKind::IntelT2Mac => Situation::IntelT2Mac(model),
            ModelKind::VirtualMac => Situation::VirtualMac(model),
            ModelKind::AppleSiliconMac => match id.mode {
                Some(AppleMode::Dfu) => Situation::MacInDfu(model),
                Some(AppleMode::Recovery) => Situation::MacInRecovery(model),
                Some(AppleMode::PortDfu) => Situation::MacInPortDfu(model),
                _ => Situation::Mac(model),
            },
        }
    }

    /// True when the device is an Apple Silicon Mac macrescue knows (whatever its mode).
    pub fn is_known_mac(&self) -> bool {
        matches!(
            self,
            Situation::MacInDfu(_)
                | Situation::MacInRecovery(_)
                | Situation::MacInPortDfu(_)
                | Situation::Mac(_)
        )
    }

    /// True when macrescue can start on the device as it is.
    pub fn is_ready(&self) -> bool {
        matches!(self, Situation::MacInDfu(_))
    }
}

fn who(m: &MacModel) -> String {
    format!("{} [{}, {}]", m.name, m.product_type, m.board_config)
}

impl fmt::Display for Situation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Situation::MacInDfu(m) => write!(f, "{} is in DFU mode: ready", who(m)),
            Situation::MacInRecovery(m) => write!(
                f,
                "the Mac is in Recovery, not DFU ({}; expected only while macrescue is loading \
                 iBSS/iBEC): to start a restore, {ENTER_DFU_HOWTO}",
                who(m)
            ),
            Situation::MacInPortDfu(m) => write!(
                f,
                "the Mac's USB-C port controller is in Port DFU (05ac:f014), not the Mac itself \
                 ({}): its port firmware must be restored first, after which the Mac shows up \
                 in DFU; if you meant to put the Mac in DFU, {ENTER_DFU_HOWTO}",
                who(m)
            ),
            Situation::Mac(m) => write!(f, "{} (mode unknown)", who(m)),
            Situation::RestoreMode => write!(
                f,
                "the device is running a restore ramdisk (restore mode): a restore is in \
                 progress or was interrupted; let it finish, or to start over {ENTER_DFU_HOWTO}"
            ),
            Situation::Wtf => write!(
                f,
                "this is an old iOS device in WTF mode, not a Mac: macrescue only restores Apple \
                 Silicon Macs"
            ),
            Situation::NotAMac(m) => write!(
                f,
                "this is not a Mac ({}, {}, board {}): macrescue only restores Apple Silicon \
                 Macs; use Apple Configurator or Finder for this device",
                m.name, m.product_type, m.board_config
            ),
            Situation::IntelT2Mac(m) => write!(
                f,
                "this is the T2 chip of an Intel Mac (board {}): T2 Macs are restored through \
                 bridgeOS, which macrescue does not do; use Apple Configurator",
                m.board_config
            ),
            Situation::VirtualMac(m) => write!(
                f,
                "this identifies as {} ({}), Apple's virtual Mac: restore it from its host, not \
                 over USB",
                m.name, m.product_type
            ),
            Situation::UnknownModel { cpid, bdid, .. } => write!(
                f,
                "unknown Apple device: CPID {cpid:#06x} BDID {bdid:#04x} is not in macrescue's \
                 table (a Mac newer than this build, or not a Mac); update macrescue, or proceed \
                 only with an IPSW whose BuildManifest lists this board"
            ),
            Situation::Unidentified { .. } => write!(
                f,
                "could not read CPID/BDID from the device's serial string: is it an Apple device \
                 in DFU or Recovery mode? If it is a Mac, {ENTER_DFU_HOWTO}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(mode: Option<AppleMode>, serial: &str) -> Situation {
        DeviceIdentity::from_strings(mode, serial, None).situation()
    }

    #[test]
    fn situations_and_messages() {
        let s = id(Some(AppleMode::Dfu), "CPID:8112 BDID:28");
        assert!(s.is_ready() && s.is_known_mac());
        assert_eq!(
            s.to_string(),
            "MacBook Air (M2, 2022) [Mac14,2, j413ap] is in DFU mode: ready"
        );

        let s = id(Some(AppleMode::Recovery), "CPID:8112 BDID:28");
        assert!(matches!(s, Situation::MacInRecovery(_)));
        assert!(!s.is_ready() && s.is_known_mac());
        let text = s.to_string();
        assert!(
            text.starts_with("the Mac is in Recovery, not DFU (MacBook Air (M2, 2022) [Mac14,2"),
            "{text}"
        );
        assert!(text.contains("in Recovery, not DFU"), "{text}");
        assert!(
            text.contains("Control + left Option + right Shift"),
            "{text}"
        );

        let s = id(Some(AppleMode::PortDfu), "BDID:28811200");
        assert!(matches!(s, Situation::MacInPortDfu(m) if m.board_config == "j413ap"));
        assert!(s.to_string().contains("Port DFU"));

        let s = id(Some(AppleMode::Dfu), "CPID:8112 BDID:42");
        assert!(!s.is_known_mac());
        assert!(s
            .to_string()
            .starts_with("this is not a Mac (Apple Vision Pro, RealityDevice14,1"));

        assert!(matches!(
            id(Some(AppleMode::Dfu), "CPID:8012 BDID:0F"),
            Situation::IntelT2Mac(_)
        ));
        assert!(matches!(
            id(None, "CPID:FE00 BDID:20"),
            Situation::VirtualMac(_)
        ));
        assert_eq!(
            id(Some(AppleMode::Dfu), "CPID:8103 BDID:99"),
            Situation::UnknownModel {
                cpid: 0x8103,
                bdid: 0x99,
                mode: Some(AppleMode::Dfu)
            }
        );
        assert!(id(None, "CPID:8103 BDID:99")
            .to_string()
            .contains("CPID 0x8103 BDID 0x99"));
        assert_eq!(
            id(Some(AppleMode::Restore), "00008103-000C69AA3AF3801C"),
            Situation::RestoreMode
        );
        assert_eq!(id(Some(AppleMode::Wtf), ""), Situation::Wtf);
        assert_eq!(id(None, "hello"), Situation::Unidentified { mode: None });
        assert!(matches!(id(None, "CPID:8103 BDID:22"), Situation::Mac(_)));
    }
}
