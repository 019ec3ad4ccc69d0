//! TSS requests built by hand from a BuildManifest identity, following protocol.md §4.2–§4.7
//! independently of the server under test.
#![allow(dead_code)]

use plist::{Dictionary, Value};
use sha2::{Digest, Sha384};

/// The 22-byte local-policy IM4P (§5.5).
pub const LPOL: [u8; 22] = [
    0x30, 0x14, 0x16, 0x04, 0x49, 0x4D, 0x34, 0x50, 0x16, 0x04, 0x6C, 0x70, 0x6F, 0x6C, 0x16, 0x03,
    0x31, 0x2E, 0x30, 0x04, 0x01, 0x00,
];

/// A manifest's `"0x…"` string as a number.
pub fn hexval(v: &Value) -> u64 {
    let s = v.as_string().unwrap();
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

pub fn xml(d: &Dictionary) -> Vec<u8> {
    let mut out = Vec::new();
    plist::to_writer_xml(&mut out, &Value::Dictionary(d.clone())).unwrap();
    out
}

/// Common keys of every request (§4.2, §4.4).
fn base(id: &Dictionary, ecid: u64, nonce: &[u8], production: bool) -> Dictionary {
    let mut r = Dictionary::new();
    r.insert("@HostPlatformInfo".into(), "mac".into());
    r.insert("@VersionInfo".into(), "libauthinstall-1104.0.9".into());
    r.insert(
        "@UUID".into(),
        "01234567-89AB-CDEF-0123-456789ABCDEF".into(),
    );
    r.insert("@ApImg4Ticket".into(), true.into());
    r.insert("ApECID".into(), Value::Integer(ecid.into()));
    for k in ["ApChipID", "ApBoardID", "ApSecurityDomain"] {
        r.insert(k.into(), Value::Integer(hexval(&id[k]).into()));
    }
    r.insert("UniqueBuildID".into(), id["UniqueBuildID"].clone());
    r.insert("ApNonce".into(), Value::Data(nonce.to_vec()));
    r.insert("ApSepNonce".into(), Value::Data(vec![0x5E; 20]));
    r.insert("ApProductionMode".into(), production.into());
    r.insert("ApSecurityMode".into(), true.into());
    r
}

/// §4.5 written out independently of the server: the main AP request.
pub fn main_request(
    id: &Dictionary,
    ecid: u64,
    nonce: &[u8],
    production: bool,
    recovery: bool,
) -> Dictionary {
    let mut r = base(id, ecid, nonce, production);
    let skip = [
        "BasebandFirmware",
        "SE,UpdatePayload",
        "BaseSystem",
        "Diags",
        "Ap,ExclaveOS",
    ];
    let recovery_skip = [
        "iBSS",
        "iBEC",
        "LLB",
        "RestoreKernelCache",
        "RestoreDeviceTree",
        "RestoreRamDisk",
        "RestoreSEP",
        "RestoreLogo",
        "RestoreANS",
        "RestoreDCP",
        "Ap,RestoreCIO",
        "Ap,RestoreTMU",
        "ANS",
        "DCP",
        "SEP",
        "AppleLogo",
        "RecoveryMode",
        "Ap,CIO",
        "Ap,TMU",
        "Ap,AudioBootChime",
        "Ap,rOSLogo1",
        "Ap,rOSLogo2",
        "ftap",
        "ftsp",
        "rfta",
        "rfts",
    ];
    for (name, entry) in id["Manifest"].as_dictionary().unwrap() {
        let entry = entry.as_dictionary().unwrap();
        let Some(info) = entry.get("Info").and_then(|i| i.as_dictionary()) else {
            continue;
        };
        if skip.contains(&name.as_str()) || (recovery && recovery_skip.contains(&name.as_str())) {
            continue;
        }
        let rules = info.get("RestoreRequestRules").and_then(|r| r.as_array());
        let trusted = entry.get("Trusted").and_then(|t| t.as_boolean()) == Some(true);
        let ftab = info.get("IsFTAB").and_then(|t| t.as_boolean()) == Some(true);
        if !recovery && (ftab || (rules.is_none() && !trusted)) {
            continue;
        }
        let mut e = entry.clone();
        e.remove("Info");
        match rules {
            Some(rules) => {
                for rule in rules {
                    let rule = rule.as_dictionary().unwrap();
                    let ok = rule["Conditions"]
                        .as_dictionary()
                        .unwrap()
                        .iter()
                        .all(|(k, v)| {
                            let p = match k.as_str() {
                                "ApRawProductionMode" | "ApCurrentProductionMode" => {
                                    Some(production)
                                }
                                "ApRawSecurityMode" | "ApRequiresImage4" => Some(true),
                                _ => None,
                            };
                            p.is_some_and(|p| v.as_boolean() == Some(p))
                        });
                    if ok {
                        for (k, v) in rule["Actions"].as_dictionary().unwrap() {
                            e.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            None if !recovery => {
                e.insert("EPRO".into(), production.into());
                e.insert("ESEC".into(), true.into());
            }
            None => {}
        }
        if trusted && !e.contains_key("Digest") {
            e.insert("Digest".into(), Value::Data(vec![]));
        }
        r.insert(name.clone(), Value::Dictionary(e));
    }
    r
}

pub fn local_policy_request(id: &Dictionary, ecid: u64, nonce: &[u8], nsih: &[u8]) -> Dictionary {
    let mut r = base(id, ecid, nonce, true);
    r.insert("Ap,LocalBoot".into(), false.into());
    let mut lp = Dictionary::new();
    lp.insert("Digest".into(), Value::Data(Sha384::digest(LPOL).to_vec()));
    lp.insert("Trusted".into(), true.into());
    r.insert("Ap,LocalPolicy".into(), Value::Dictionary(lp));
    r.insert("Ap,NextStageIM4MHash".into(), Value::Data(nsih.to_vec()));
    r
}
