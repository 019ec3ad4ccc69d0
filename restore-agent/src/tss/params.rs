//! Inputs to TSS requests: what we read from the Mac ([`TssParams`]) and what we take from
//! the build identity ([`IdentityParams`], §4.3).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use plist::{Dictionary, Value};

use super::TssError;

/// What the Mac told us (plus the modes we ask for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TssParams {
    pub ecid: u64,
    /// `NONC` from the DFU/Recovery serial string.
    pub ap_nonce: Option<Vec<u8>>,
    /// `SNON` from the DFU/Recovery serial string.
    pub sep_nonce: Option<Vec<u8>>,
    pub production_mode: bool,
    pub security_mode: bool,
    pub supports_img4: bool,
    /// Never set by idevicerestore; kept so RestoreRequestRules on it can be evaluated.
    pub demotion_policy: Option<String>,
    /// Never set by idevicerestore; see `demotion_policy`.
    pub in_rom_dfu: Option<bool>,
}

impl TssParams {
    /// Parameters for a production Mac, as idevicerestore sends them.
    pub fn new(ecid: u64, ap_nonce: Option<Vec<u8>>, sep_nonce: Option<Vec<u8>>) -> Self {
        TssParams {
            ecid,
            ap_nonce,
            sep_nonce,
            production_mode: true,
            security_mode: true,
            supports_img4: true,
            demotion_policy: None,
            in_rom_dfu: None,
        }
    }
}

/// The `@UUID` of a request: 36 uppercase hex characters and dashes. Random in production;
/// tests pass a fixed one so requests are reproducible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestUuid(String);

impl RequestUuid {
    /// A fresh identifier. It only has to be unique per request, not secret, so std's
    /// randomly keyed hasher (seeded from the OS) mixed with the clock and a counter suffices.
    pub fn random() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let half = |salt: u64| {
            let mut h = RandomState::new().build_hasher();
            h.write_u128(nanos);
            h.write_u64(count);
            h.write_u64(salt);
            h.finish()
        };
        let bits = (u128::from(half(1)) << 64) | u128::from(half(2));
        let hex = format!("{bits:032X}");
        RequestUuid(format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        ))
    }

    /// A given identifier (for tests and replay), checked for the expected shape.
    pub fn parse(s: &str) -> Result<Self, TssError> {
        let ok = s.len() == 36
            && s.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_digit() || ('A'..='F').contains(&c),
            });
        if ok {
            Ok(RequestUuid(s.to_string()))
        } else {
            Err(TssError::BadRequestUuid(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Parse a volume UUID string (as restored sends it) into the 16 raw bytes TSS wants.
pub fn parse_volume_uuid(s: &str) -> Result<[u8; 16], TssError> {
    let bad = || TssError::BadVolumeUuid(s.to_string());
    let canonical = s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if !canonical {
        return Err(bad());
    }
    let digits: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
    let mut out = [0u8; 16];
    for (i, pair) in digits.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).map_err(|_| bad())?;
        // `canonical` proved there are exactly 32 digits, so `i` < 16.
        out[i] = u8::from_str_radix(text, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Parameters copied from a build identity (§4.3), already coerced to the types TSS wants.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityParams {
    /// Typed values by parameter name, in the order they were found.
    pub values: Dictionary,
    /// The identity's `Manifest` dictionary (component entries).
    pub manifest: Dictionary,
    /// `Info.RequiresUIDMode`.
    pub requires_uid_mode: bool,
}

const STRING_KEYS: &[&str] = &[
    "Ap,OSLongVersion",
    "Ap,OSReleaseType",
    "Ap,ProductMarketingVersion",
    "Ap,ProductType",
    "Ap,SDKPlatform",
    "Ap,Target",
    "Ap,TargetType",
    "Ap,Timestamp",
];

const UINT_KEYS: &[&str] = &[
    "ApSecurityDomain",
    "BMU,BoardID",
    "BMU,ChipID",
    "BbChipID",
    "SE,ChipID",
    "Savage,ChipID",
    "Savage,PatchEpoch",
    "Yonkers,BoardID",
    "Yonkers,ChipID",
    "Yonkers,PatchEpoch",
    "Rap,BoardID",
    "Rap,ChipID",
    "Rap,SecurityDomain",
    "Baobab,BoardID",
    "Baobab,ChipID",
    "Baobab,ManifestEpoch",
    "Baobab,SecurityDomain",
    "eUICC,ChipID",
    "NeRDEpoch",
    "Timer,BoardID,1",
    "Timer,BoardID,2",
    "Timer,ChipID,1",
    "Timer,ChipID,2",
    "Timer,SecurityDomain,1",
    "Timer,SecurityDomain,2",
];

const DATA_KEYS: &[&str] = &[
    "BbActivationManifestKeyHash",
    "BbCalibrationManifestKeyHash",
    "BbFactoryActivationManifestKeyHash",
    "BbFDRSecurityKeyHash",
    "BbProvisioningManifestKeyHash",
    "BbSkeyId",
    "PearlCertificationRootPub",
];

const ANY_KEYS: &[&str] = &[
    "Cryptex1,ChipID",
    "Cryptex1,Type",
    "Cryptex1,SubType",
    "Cryptex1,ProductClass",
    "Cryptex1,UseProductClass",
    "Cryptex1,NonceDomain",
    "Cryptex1,Version",
    "Cryptex1,PreauthorizationVersion",
    "Cryptex1,FakeRoot",
    "Cryptex1,SystemOS",
    "Cryptex1,SystemVolume",
    "Cryptex1,SystemTrustCache",
    "Cryptex1,AppOS",
    "Cryptex1,AppVolume",
    "Cryptex1,AppTrustCache",
    "Cryptex1,MobileAssetBrainOS",
    "Cryptex1,MobileAssetBrainVolume",
    "Cryptex1,MobileAssetBrainTrustCache",
    "USBPortController1,BoardID",
    "USBPortController1,ChipID",
    "USBPortController1,SecurityDomain",
];

/// Manifest numbers are often strings like `"0x6000"`; read them the way C's
/// `strtoull(s, NULL, 0)` does (hex with `0x`, octal with a leading `0`, else decimal),
/// because that is what the reference tools send.
pub fn coerce_uint(value: &Value) -> Option<u64> {
    match value {
        Value::Integer(i) => i.as_unsigned(),
        Value::String(s) => {
            let s = s.trim();
            if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                u64::from_str_radix(hex, 16).ok()
            } else if s.len() > 1 && s.starts_with('0') {
                u64::from_str_radix(&s[1..], 8).ok()
            } else {
                s.parse().ok()
            }
        }
        _ => None,
    }
}

impl IdentityParams {
    /// Read the parameters from one build identity.
    pub fn from_identity(identity: &Dictionary) -> Result<Self, TssError> {
        let mut values = Dictionary::new();

        match identity.get("UniqueBuildID") {
            Some(Value::Data(d)) => {
                values.insert("UniqueBuildID".into(), Value::Data(d.clone()));
            }
            _ => {
                return Err(TssError::BadIdentity {
                    key: "UniqueBuildID",
                    why: "missing or not data",
                })
            }
        }
        for key in ["ApChipID", "ApBoardID"] {
            let v = identity
                .get(key)
                .and_then(coerce_uint)
                .ok_or(TssError::BadIdentity {
                    key,
                    why: "missing or not a number",
                })?;
            values.insert(key.into(), Value::Integer(v.into()));
        }
        for &key in STRING_KEYS {
            match identity.get(key) {
                Some(Value::String(s)) => {
                    values.insert(key.into(), Value::String(s.clone()));
                }
                Some(_) => tracing::warn!(key, "build identity value is not a string; left out"),
                None => {}
            }
        }
        for &key in UINT_KEYS {
            if let Some(v) = identity.get(key) {
                match coerce_uint(v) {
                    Some(n) => {
                        values.insert(key.into(), Value::Integer(n.into()));
                    }
                    None => tracing::warn!(key, "build identity value is not a number; left out"),
                }
            }
        }
        for &key in DATA_KEYS {
            match identity.get(key) {
                Some(Value::Data(d)) => {
                    values.insert(key.into(), Value::Data(d.clone()));
                }
                Some(_) => tracing::warn!(key, "build identity value is not data; left out"),
                None => {}
            }
        }
        if let Some(Value::Boolean(b)) = identity.get("AllowNeRDBoot") {
            values.insert("AllowNeRDBoot".into(), Value::Boolean(*b));
        }
        if values.contains_key("NeRDEpoch") {
            values.insert("PermitNeRDPivot".into(), Value::Data(Vec::new()));
        }
        for &key in ANY_KEYS {
            if let Some(v) = identity.get(key) {
                values.insert(key.into(), v.clone());
            }
        }

        let info = identity.get("Info").and_then(Value::as_dictionary);
        let requires_uid_mode = info
            .and_then(|i| i.get("RequiresUIDMode"))
            .and_then(Value::as_boolean)
            .unwrap_or(false);
        let manifest = identity
            .get("Manifest")
            .and_then(Value::as_dictionary)
            .cloned()
            .ok_or(TssError::BadIdentity {
                key: "Manifest",
                why: "missing or not a dictionary",
            })?;
        Ok(IdentityParams {
            values,
            manifest,
            requires_uid_mode,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strtoull_like_coercion() {
        let s = |x: &str| coerce_uint(&Value::String(x.into()));
        assert_eq!(s("0x6000"), Some(0x6000));
        assert_eq!(s("0X0e"), Some(14));
        assert_eq!(s("0x01"), Some(1));
        assert_eq!(s("42"), Some(42));
        assert_eq!(s("010"), Some(8));
        assert_eq!(s("0"), Some(0));
        assert_eq!(s("zz"), None);
        assert_eq!(s("0x"), None);
        assert_eq!(coerce_uint(&Value::Integer(7u64.into())), Some(7));
        assert_eq!(coerce_uint(&Value::Integer((-1i64).into())), None);
        assert_eq!(coerce_uint(&Value::Boolean(true)), None);
    }

    #[test]
    fn uuids() {
        let r = RequestUuid::random();
        assert!(RequestUuid::parse(r.as_str()).is_ok(), "{}", r.as_str());
        assert_ne!(RequestUuid::random(), RequestUuid::random());
        assert!(RequestUuid::parse("6b608ae8-f88e-0d75-62b0-1db5a2323a7a").is_err());
        assert!(RequestUuid::parse("6B608AE8-F88E-0D75-62B0-1DB5A2323A7A").is_ok());
        assert!(RequestUuid::parse("6B608AE8F88E0D7562B01DB5A2323A7A").is_err());

        assert_eq!(
            parse_volume_uuid("00112233-4455-6677-8899-aabbccddeeFF").unwrap(),
            [
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xAA, 0xBB, 0xCC, 0xDD,
                0xEE, 0xFF
            ]
        );
        for bad in [
            "",
            "00112233-4455-6677-8899-aabbccddee",
            "0011223344556677-8899-aabbccddeeff0",
            "0011223-44455-6677-8899-aabbccddeeff",
            "00112233-4455-6677-8899-aabbccddeegg",
            "00112233-4455-6677-8899-aabbccddee\u{e9}",
        ] {
            assert!(parse_volume_uuid(bad).is_err(), "{bad}");
        }
    }
}
