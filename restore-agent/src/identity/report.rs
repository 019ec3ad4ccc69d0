//! A flat, serialisable view of a [`DeviceIdentity`] for JSON output and logs.
//!
//! Numbers are hex strings the way technicians and Apple's tools print them (`"0x8103"`, ECID
//! always 16 digits), so the JSON can be grepped and compared with `irecovery -q` output.
//! Unknown values are left out rather than written as `null`.

use serde::Serialize;

use super::{AppleMode, DeviceIdentity};

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct IdentityReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<AppleMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bdid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ecid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub board_config: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ap_nonce: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sep_nonce: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub srtg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub srnm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cprv: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpfm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scep: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ibfl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sdom: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
    /// Port DFU only: the nonce in the order TSS wants (reversed from `ap_nonce`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ap_nonce_tss: Option<String>,
    pub serial: String,
    /// The plain-language situation ([`super::Situation`]).
    pub message: String,
}

pub fn hex_cpid(v: u32) -> String {
    format!("{v:#06x}")
}

pub fn hex_byte(v: u32) -> String {
    format!("{v:#04x}")
}

pub fn hex_ecid(v: u64) -> String {
    format!("{v:#018x}")
}

impl IdentityReport {
    pub fn from_identity(id: &DeviceIdentity) -> IdentityReport {
        let m = id.model;
        IdentityReport {
            location: None,
            mode: id.mode,
            cpid: id.cpid.map(hex_cpid),
            bdid: id.bdid.map(hex_byte),
            ecid: id.ecid.map(hex_ecid),
            product_type: m.map(|m| m.product_type),
            board_config: m.map(|m| m.board_config),
            name: m.map(|m| m.name),
            kind: m.map(|m| m.kind.as_str()),
            ap_nonce: id.ap_nonce.as_deref().map(hex::encode),
            sep_nonce: id.sep_nonce.as_deref().map(hex::encode),
            srtg: id.srtg.clone(),
            srnm: id.srnm.clone(),
            cprv: id.cprv.map(hex_byte),
            cpfm: id.cpfm.map(hex_byte),
            scep: id.scep.map(hex_byte),
            ibfl: id.ibfl.map(hex_byte),
            sdom: id.sdom.map(hex_byte),
            prev: id.prev.map(hex_byte),
            ap_nonce_tss: if id.mode == Some(AppleMode::PortDfu) {
                id.ap_nonce_for_tss().map(hex::encode)
            } else {
                None
            },
            serial: id.serial.clone(),
            message: id.situation().to_string(),
        }
    }

    pub fn with_location(mut self, location: impl ToString) -> Self {
        self.location = Some(location.to_string());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keys_and_formats() {
        let id = DeviceIdentity::from_strings(
            Some(AppleMode::Dfu),
            "CPID:8103 CPRV:11 CPFM:03 SCEP:01 BDID:22 ECID:1C2B3A4D5E6F70 IBFL:3C SRTG:[iBoot-4479.0.0.100.4]",
            Some("NONC:a1b2 SNON:0c"),
        );
        let v = serde_json::to_value(id.report().with_location("1-1.4")).unwrap();
        assert_eq!(v["location"], "1-1.4");
        assert_eq!(v["mode"], "dfu");
        assert_eq!(v["cpid"], "0x8103");
        assert_eq!(v["bdid"], "0x22");
        assert_eq!(v["ecid"], "0x001c2b3a4d5e6f70");
        assert_eq!(v["product_type"], "Macmini9,1");
        assert_eq!(v["board_config"], "j274ap");
        assert_eq!(v["name"], "Mac mini (M1, 2020)");
        assert_eq!(v["kind"], "apple_silicon_mac");
        assert_eq!(v["ap_nonce"], "a1b2");
        assert_eq!(v["sep_nonce"], "0c");
        assert_eq!(v["srtg"], "iBoot-4479.0.0.100.4");
        assert_eq!(v["cprv"], "0x11");
        assert_eq!(v["ibfl"], "0x3c");
        assert!(v.get("srnm").is_none());
        assert!(v.get("ap_nonce_tss").is_none());
        assert_eq!(
            v["message"],
            "Mac mini (M1, 2020) [Macmini9,1, j274ap] is in DFU mode: ready"
        );
    }

    #[test]
    fn port_dfu_report_has_tss_nonce() {
        let id =
            DeviceIdentity::from_strings(Some(AppleMode::PortDfu), "BDID:22810300 NONC:0102", None);
        let v = serde_json::to_value(id.report()).unwrap();
        assert_eq!(v["mode"], "port_dfu");
        assert_eq!(v["cpid"], "0x8103");
        assert_eq!(v["ap_nonce"], "0102");
        assert_eq!(v["ap_nonce_tss"], "0201");
        assert!(v.get("location").is_none());
    }
}
