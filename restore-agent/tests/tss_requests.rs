//! TSS request builders checked against every fixture Mac BuildManifest. The checks re-read
//! the rules of §4 independently of the implementation (skip lists, RestoreRequestRules,
//! defaults), so a misreading in one place shows up as a mismatch.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plist::{Dictionary, Value};
use restore_agent::img4;
use restore_agent::tss::{self, RecoveryOsLocalPolicyArgs, RequestUuid, TssError, TssParams};
use sha2::{Digest, Sha384};

const UUID: &str = "6B608AE8-F88E-0D75-62B0-1DB5A2323A7A";
const ECID: u64 = 0x001C_2A3B_4C5D_6E7F;

fn shared() -> PathBuf {
    std::env::var_os("MACRESCUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")))
}

fn manifests_dir() -> PathBuf {
    shared().join("fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests")
}

/// The restore identity (the one carrying iBSS) of a BuildManifest, if it has one.
fn restore_identity(path: &Path) -> Option<Dictionary> {
    let manifest: Dictionary = plist::from_file(path).unwrap();
    manifest
        .get("BuildIdentities")?
        .as_array()?
        .iter()
        .filter_map(Value::as_dictionary)
        .find(|id| {
            id.get("Manifest")
                .and_then(Value::as_dictionary)
                .is_some_and(|m| m.contains_key("iBSS"))
        })
        .cloned()
}

/// Parsed once for all tests in this file: reading 40+ manifests is the slow part.
fn all_restore_identities() -> &'static [(String, Dictionary)] {
    static IDS: OnceLock<Vec<(String, Dictionary)>> = OnceLock::new();
    IDS.get_or_init(|| {
        let mut out: Vec<_> = std::fs::read_dir(manifests_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "plist"))
            .filter_map(|p| {
                let name = p.file_name()?.to_string_lossy().into_owned();
                Some((name, restore_identity(&p)?))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    })
}

fn params() -> TssParams {
    TssParams::new(ECID, Some(vec![0xA5; 32]), Some(vec![0x5A; 20]))
}

fn uuid() -> RequestUuid {
    RequestUuid::parse(UUID).unwrap()
}

fn uint(v: &Value) -> u64 {
    match v {
        Value::Integer(i) => i.as_unsigned().unwrap(),
        Value::String(s) => u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap(),
        other => panic!("not a number: {other:?}"),
    }
}

fn boolean(d: &Dictionary, k: &str) -> Option<bool> {
    d.get(k).and_then(Value::as_boolean)
}

/// Our own reading of a rule's conditions for the parameters idevicerestore sends.
fn rule_fires(rule: &Dictionary, p: &TssParams) -> bool {
    let conds = rule
        .get("Conditions")
        .and_then(Value::as_dictionary)
        .unwrap();
    conds.iter().all(|(k, v)| {
        let have = match k.as_str() {
            "ApRawProductionMode" | "ApCurrentProductionMode" => p.production_mode,
            "ApRawSecurityMode" => p.security_mode,
            "ApRequiresImage4" => p.supports_img4,
            _ => return false, // DemotionPolicy / ApInRomDFU are never sent
        };
        v.as_boolean() == Some(have)
    })
}

const AP_SKIP: [&str; 5] = [
    "BasebandFirmware",
    "SE,UpdatePayload",
    "BaseSystem",
    "Diags",
    "Ap,ExclaveOS",
];

/// Check one component entry of a request against its manifest entry.
fn check_entry(
    board: &str,
    name: &str,
    manifest_entry: &Dictionary,
    got: &Dictionary,
    p: &TssParams,
    defaults: bool,
) {
    assert!(!got.contains_key("Info"), "{board} {name}: Info leaked");
    let rules = manifest_entry
        .get("Info")
        .and_then(Value::as_dictionary)
        .and_then(|i| i.get("RestoreRequestRules"))
        .and_then(Value::as_array);
    let mut expected = manifest_entry.clone();
    expected.remove("Info");
    match rules {
        Some(rules) => {
            for rule in rules.iter().filter_map(Value::as_dictionary) {
                if rule_fires(rule, p) {
                    for (k, v) in rule.get("Actions").and_then(Value::as_dictionary).unwrap() {
                        expected.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        None if defaults => {
            expected.insert("EPRO".into(), Value::Boolean(p.production_mode));
            expected.insert("ESEC".into(), Value::Boolean(p.security_mode));
        }
        None => {}
    }
    if boolean(manifest_entry, "Trusted") == Some(true) && !manifest_entry.contains_key("Digest") {
        expected.insert("Digest".into(), Value::Data(vec![]));
    }
    // Compare as sets of key/value pairs (rule application may reorder keys).
    let mut want: Vec<_> = expected.iter().collect();
    let mut have: Vec<_> = got.iter().collect();
    want.sort_by(|a, b| a.0.cmp(b.0));
    have.sort_by(|a, b| a.0.cmp(b.0));
    assert_eq!(have, want, "{board} {name}");
}

fn check_main_request(board: &str, identity: &Dictionary, p: &TssParams) {
    let req = tss::main_ap_request(identity, p, &uuid()).unwrap();
    let manifest = identity
        .get("Manifest")
        .and_then(Value::as_dictionary)
        .unwrap();
    let info = identity.get("Info").and_then(Value::as_dictionary).unwrap();

    // Required top-level keys with their types and values.
    assert_eq!(req.get("@HostPlatformInfo"), Some(&Value::from("mac")));
    assert_eq!(
        req.get("@VersionInfo"),
        Some(&Value::from("libauthinstall-1104.0.9"))
    );
    assert_eq!(req.get("@UUID"), Some(&Value::from(UUID)));
    assert_eq!(
        req.get("ApECID").and_then(Value::as_unsigned_integer),
        Some(ECID)
    );
    assert_eq!(req.get("UniqueBuildID"), identity.get("UniqueBuildID"));
    assert!(matches!(req.get("UniqueBuildID"), Some(Value::Data(d)) if !d.is_empty()));
    for key in ["ApChipID", "ApBoardID", "ApSecurityDomain"] {
        let got = req.get(key).and_then(Value::as_unsigned_integer);
        assert_eq!(got, Some(uint(identity.get(key).unwrap())), "{board} {key}");
    }
    assert_eq!(
        req.get("ApNonce"),
        Some(&Value::Data(p.ap_nonce.clone().unwrap()))
    );
    assert_eq!(
        req.get("SepNonce"),
        Some(&Value::Data(p.sep_nonce.clone().unwrap()))
    );
    assert_eq!(boolean(&req, "@ApImg4Ticket"), Some(true));
    assert_eq!(boolean(&req, "ApSecurityMode"), Some(p.security_mode));
    assert_eq!(boolean(&req, "ApProductionMode"), Some(p.production_mode));
    for key in [
        "Ap,OSLongVersion",
        "Ap,ProductMarketingVersion",
        "Ap,ProductType",
        "Ap,SDKPlatform",
        "Ap,Target",
        "Ap,TargetType",
    ] {
        assert_eq!(req.get(key), identity.get(key), "{board} {key}");
        if let Some(v) = req.get(key) {
            assert!(v.as_string().is_some(), "{board} {key} is not a string");
        }
    }
    let uid_mode = boolean(info, "RequiresUIDMode") == Some(true);
    assert_eq!(
        boolean(&req, "UID_MODE"),
        uid_mode.then_some(false),
        "{board}"
    );
    assert_eq!(
        req.get("Ap,SikaFuse").and_then(Value::as_unsigned_integer),
        uid_mode.then_some(0),
        "{board}"
    );

    // Components: included exactly when the skip rules allow, each built per the rules.
    for (name, entry) in manifest {
        let entry = entry.as_dictionary().unwrap();
        let entry_info = entry.get("Info").and_then(Value::as_dictionary);
        let allowed = !AP_SKIP.contains(&name.as_str())
            && entry_info.is_some_and(|i| {
                boolean(i, "IsFTAB") != Some(true)
                    && (i.contains_key("RestoreRequestRules")
                        || boolean(entry, "Trusted") == Some(true))
            });
        match req.get(name) {
            Some(Value::Dictionary(got)) => {
                assert!(allowed, "{board}: {name} must not be requested");
                check_entry(board, name, entry, got, p, true);
            }
            Some(other) => panic!("{board}: {name} is not a dict: {other:?}"),
            None => assert!(!allowed, "{board}: {name} is missing"),
        }
    }
    // Nothing else at the top level.
    let known = [
        "@HostPlatformInfo",
        "@VersionInfo",
        "@UUID",
        "ApECID",
        "UniqueBuildID",
        "ApChipID",
        "ApBoardID",
        "ApSecurityDomain",
        "Ap,OSLongVersion",
        "Ap,OSReleaseType",
        "Ap,ProductMarketingVersion",
        "Ap,ProductType",
        "Ap,SDKPlatform",
        "Ap,Target",
        "Ap,TargetType",
        "Ap,Timestamp",
        "ApNonce",
        "SepNonce",
        "@ApImg4Ticket",
        "ApSecurityMode",
        "ApProductionMode",
        "NeRDEpoch",
        "PearlCertificationRootPub",
        "AllowNeRDBoot",
        "PermitNeRDPivot",
        "UID_MODE",
        "Ap,SikaFuse",
    ];
    for key in req.keys() {
        assert!(
            known.contains(&key.as_str()) || manifest.contains_key(key),
            "{board}: unexpected top-level key {key}"
        );
    }
    // The request serializes and reads back unchanged.
    let xml = tss::to_xml(&req).unwrap();
    assert!(xml.starts_with(b"<?xml"));
    let back: Dictionary = plist::from_bytes(&xml).unwrap();
    assert_eq!(back, req);
}

#[test]
fn main_request_for_every_fixture_mac() {
    let ids = all_restore_identities();
    assert!(
        ids.len() >= 40,
        "only {} restore identities found",
        ids.len()
    );
    let mut p = params();
    for (board, identity) in ids {
        check_main_request(board, identity, &p);
    }
    // Rules must follow the parameters, not hard-code production/security, and must not
    // confuse the two.
    for (production, security) in [(false, true), (true, false)] {
        p.production_mode = production;
        p.security_mode = security;
        for (board, identity) in ids {
            check_main_request(board, identity, &p);
        }
    }
}

#[test]
fn recovery_root_request_for_every_fixture_mac() {
    const RECOVERY_SKIP: [&str; 26] = [
        "ANS",
        "Ap,AudioBootChime",
        "Ap,CIO",
        "Ap,RestoreCIO",
        "Ap,RestoreTMU",
        "Ap,TMU",
        "Ap,rOSLogo1",
        "Ap,rOSLogo2",
        "AppleLogo",
        "DCP",
        "LLB",
        "RecoveryMode",
        "RestoreANS",
        "RestoreDCP",
        "RestoreDeviceTree",
        "RestoreKernelCache",
        "RestoreLogo",
        "RestoreRamDisk",
        "RestoreSEP",
        "SEP",
        "ftap",
        "ftsp",
        "iBEC",
        "iBSS",
        "rfta",
        "rfts",
    ];
    let p = params();
    for (board, identity) in all_restore_identities() {
        let req = tss::recovery_os_root_request(identity, &p, &uuid()).unwrap();
        let manifest = identity
            .get("Manifest")
            .and_then(Value::as_dictionary)
            .unwrap();
        assert_eq!(boolean(&req, "@ApImg4Ticket"), Some(true));
        assert_eq!(
            req.get("ApECID").and_then(Value::as_unsigned_integer),
            Some(ECID)
        );
        assert!(req.contains_key("ApNonce") && req.contains_key("UniqueBuildID"));
        for (name, entry) in manifest {
            let entry = entry.as_dictionary().unwrap();
            let allowed =
                !AP_SKIP.contains(&name.as_str()) && !RECOVERY_SKIP.contains(&name.as_str());
            match req.get(name).and_then(Value::as_dictionary) {
                Some(got) => {
                    assert!(
                        allowed,
                        "{board}: {name} must not be in the recovery request"
                    );
                    check_entry(board, name, entry, got, &p, false);
                }
                None => assert!(!allowed, "{board}: {name} missing from recovery request"),
            }
        }
    }
}

fn j314s() -> Dictionary {
    all_restore_identities()
        .iter()
        .find(|(name, _)| name == "J314sAP.BuildManifest.plist")
        .map(|(_, id)| id.clone())
        .unwrap()
}

fn keys(d: &Dictionary) -> Vec<&str> {
    d.keys().map(String::as_str).collect()
}

#[test]
fn golden_main_request_j314s() {
    let req = tss::main_ap_request(&j314s(), &params(), &uuid()).unwrap();
    let components = [
        "ANE",
        "ANS",
        "AOP",
        "AVE",
        "Ap,AudioBootChime",
        "Ap,AudioPowerAttachChime",
        "Ap,BaseSystemTrustCache",
        "Ap,CIO",
        "Ap,DCP2",
        "Ap,RestoreCIO",
        "Ap,RestoreDCP2",
        "Ap,RestoreTMU",
        "Ap,SystemVolumeCanonicalMetadata",
        "Ap,TMU",
        "Ap,rOSLogo1",
        "Ap,rOSLogo2",
        "AppleLogo",
        "BaseSystemVolume",
        "BatteryCharging0",
        "BatteryCharging1",
        "BatteryFull",
        "BatteryLow0",
        "BatteryLow1",
        "BatteryPlugin",
        "DCP",
        "DeviceTree",
        "GFX",
        "ISP",
        "InputDevice",
        "KernelCache",
        "LLB",
        "OS",
        "PMP",
        "RecoveryMode",
        "RestoreANS",
        "RestoreDCP",
        "RestoreDeviceTree",
        "RestoreKernelCache",
        "RestoreLogo",
        "RestoreRamDisk",
        "RestoreSEP",
        "RestoreTrustCache",
        "SEP",
        "SIO",
        "StaticTrustCache",
        "SystemVolume",
        "ftap",
        "ftsp",
        "iBEC",
        "iBSS",
        "iBoot",
        "iBootData",
        "rfta",
        "rfts",
    ];
    let mut want = vec![
        "@HostPlatformInfo",
        "@VersionInfo",
        "@UUID",
        "ApECID",
        "UniqueBuildID",
        "ApChipID",
        "ApBoardID",
        "ApSecurityDomain",
    ];
    want.extend(components);
    want.extend([
        "Ap,OSLongVersion",
        "Ap,ProductMarketingVersion",
        "Ap,ProductType",
        "Ap,SDKPlatform",
        "Ap,Target",
        "Ap,TargetType",
        "ApNonce",
        "@ApImg4Ticket",
        "ApSecurityMode",
        "ApProductionMode",
        "SepNonce",
    ]);
    assert_eq!(keys(&req), want);
    assert_eq!(
        req.get("ApChipID").and_then(Value::as_unsigned_integer),
        Some(0x6000)
    );
    assert_eq!(
        req.get("ApBoardID").and_then(Value::as_unsigned_integer),
        Some(0x08)
    );
    assert_eq!(
        req.get("ApSecurityDomain")
            .and_then(Value::as_unsigned_integer),
        Some(1)
    );
    assert_eq!(
        req.get("Ap,ProductType"),
        Some(&Value::from("MacBookPro18,3"))
    );
    assert_eq!(req.get("Ap,Target"), Some(&Value::from("J314sAP")));

    let entry = |name: &str| req.get(name).and_then(Value::as_dictionary).unwrap();
    // iBSS: its DPRO rule needs a demotion policy we never send, so only EPRO/ESEC are set.
    assert_eq!(
        keys(entry("iBSS")),
        ["BuildString", "Digest", "Trusted", "EPRO", "ESEC"]
    );
    assert_eq!(boolean(entry("iBSS"), "EPRO"), Some(true));
    assert_eq!(boolean(entry("iBSS"), "ESEC"), Some(true));
    assert_eq!(
        entry("iBSS").get("BuildString"),
        Some(&Value::from("iBoot-13822.61.10~45"))
    );
    // RestoreSEP: DSEC rules need a demotion policy; ESEC rule comes before EPRO rule.
    assert_eq!(
        keys(entry("RestoreSEP")),
        ["Digest", "TBMDigests", "Trusted", "ESEC", "EPRO"]
    );
    // rfta has no Digest in the manifest: an empty one is added (matches the
    // "No Digest data, using empty value for entry rfta" debug line in issue #511).
    assert_eq!(keys(entry("rfta")), ["Trusted", "EPRO", "ESEC", "Digest"]);
    assert_eq!(entry("rfta").get("Digest"), Some(&Value::Data(vec![])));
    // InputDevice is not Trusted but has rules: included, with its Trusted=false kept.
    assert_eq!(boolean(entry("InputDevice"), "Trusted"), Some(false));
    assert!(
        !entry("InputDevice").contains_key("Digest")
            || entry("InputDevice")
                .get("Digest")
                .and_then(Value::as_data)
                .is_some_and(|d| !d.is_empty())
    );
}

#[test]
fn trusted_entry_without_rules_gets_default_flags() {
    let mut id = j314s();
    let manifest = id
        .get_mut("Manifest")
        .and_then(Value::as_dictionary_mut)
        .unwrap();
    let mut extra = Dictionary::new();
    extra.insert("Digest".into(), Value::Data(vec![1, 2, 3]));
    extra.insert("Trusted".into(), Value::Boolean(true));
    extra.insert("Info".into(), Value::Dictionary(Dictionary::new()));
    manifest.insert("Ap,NewThing".into(), Value::Dictionary(extra));
    let mut p = params();
    p.production_mode = false;
    let req = tss::main_ap_request(&id, &p, &uuid()).unwrap();
    let got = req
        .get("Ap,NewThing")
        .and_then(Value::as_dictionary)
        .unwrap();
    assert_eq!(keys(got), ["Digest", "Trusted", "EPRO", "ESEC"]);
    assert_eq!(boolean(got, "EPRO"), Some(false));
    assert_eq!(boolean(got, "ESEC"), Some(true));
    // Baobab,TCON has neither rules nor Trusted: left out.
    assert!(!req.contains_key("Baobab,TCON"));
}

#[test]
fn uid_mode_only_when_the_identity_requires_it() {
    let id = restore_identity(&manifests_dir().join("J433AP.BuildManifest.plist")).unwrap();
    let req = tss::main_ap_request(&id, &params(), &uuid()).unwrap();
    assert_eq!(req.get("UID_MODE"), Some(&Value::Boolean(false)));
    assert_eq!(
        req.get("Ap,SikaFuse").and_then(Value::as_unsigned_integer),
        Some(0)
    );
    let req = tss::main_ap_request(&j314s(), &params(), &uuid()).unwrap();
    assert!(!req.contains_key("UID_MODE") && !req.contains_key("Ap,SikaFuse"));
}

#[test]
fn missing_inputs_are_explained() {
    let no_nonce = TssParams::new(ECID, None, Some(vec![1]));
    assert!(matches!(
        tss::main_ap_request(&j314s(), &no_nonce, &uuid()),
        Err(TssError::MissingApNonce)
    ));
    let mut id = j314s();
    id.insert("ApChipID".into(), Value::from("not a number"));
    assert!(matches!(
        tss::main_ap_request(&id, &params(), &uuid()),
        Err(TssError::BadIdentity {
            key: "ApChipID",
            ..
        })
    ));
    let mut id = j314s();
    id.remove("UniqueBuildID");
    assert!(matches!(
        tss::main_ap_request(&id, &params(), &uuid()),
        Err(TssError::BadIdentity {
            key: "UniqueBuildID",
            ..
        })
    ));
    let mut id = j314s();
    id.remove("Manifest");
    assert!(tss::main_ap_request(&id, &params(), &uuid()).is_err());
}

fn lpol_entry() -> Value {
    let mut d = Dictionary::new();
    d.insert(
        "Digest".into(),
        Value::Data(Sha384::digest(img4::LPOL_IM4P).to_vec()),
    );
    d.insert("Trusted".into(), Value::Boolean(true));
    Value::Dictionary(d)
}

#[test]
fn local_policy_request_binds_the_main_ticket() {
    let ticket = std::fs::read(shared().join("fixtures/tss/PyIMG4-IM4M.der")).unwrap();
    let req = tss::local_policy_request(&j314s(), &params(), &ticket, &uuid()).unwrap();
    assert_eq!(
        keys(&req),
        [
            "@HostPlatformInfo",
            "@VersionInfo",
            "@UUID",
            "@ApImg4Ticket",
            "Ap,LocalBoot",
            "Ap,LocalPolicy",
            "Ap,NextStageIM4MHash",
            "ApECID",
            "ApChipID",
            "ApBoardID",
            "ApSecurityDomain",
            "ApNonce",
            "ApSecurityMode",
            "ApProductionMode",
        ]
    );
    assert_eq!(req.get("Ap,LocalBoot"), Some(&Value::Boolean(false)));
    assert_eq!(req.get("Ap,LocalPolicy"), Some(&lpol_entry()));
    assert_eq!(
        req.get("Ap,NextStageIM4MHash"),
        Some(&Value::Data(Sha384::digest(&ticket).to_vec()))
    );
    assert_eq!(
        req.get("ApChipID").and_then(Value::as_unsigned_integer),
        Some(0x6000)
    );
    assert_eq!(req.get("ApNonce"), Some(&Value::Data(vec![0xA5; 32])));
    let no_nonce = TssParams::new(ECID, None, None);
    assert!(matches!(
        tss::local_policy_request(&j314s(), &no_nonce, &ticket, &uuid()),
        Err(TssError::MissingApNonce)
    ));
}

#[test]
fn recovery_os_local_policy_request() {
    let args = RecoveryOsLocalPolicyArgs {
        next_stage_im4m_hash: vec![0x11; 48],
        recovery_os_policy_nonce_hash: vec![0x22; 48],
        volume_uuid: "0A1B2C3D-4E5F-6071-8293-A4B5C6D7E8F9".into(),
    };
    let req = tss::recovery_os_local_policy_request(&j314s(), &params(), &args, &uuid()).unwrap();
    assert_eq!(
        keys(&req),
        [
            "@HostPlatformInfo",
            "@VersionInfo",
            "@UUID",
            "@ApImg4Ticket",
            "Ap,LocalBoot",
            "Ap,LocalPolicy",
            "Ap,NextStageIM4MHash",
            "Ap,RecoveryOSPolicyNonceHash",
            "Ap,VolumeUUID",
            "ApECID",
            "ApChipID",
            "ApBoardID",
            "ApSecurityDomain",
            "ApSecurityMode",
            "ApProductionMode",
        ]
    );
    assert_eq!(req.get("Ap,LocalBoot"), Some(&Value::Boolean(true)));
    assert_eq!(req.get("Ap,LocalPolicy"), Some(&lpol_entry()));
    assert_eq!(
        req.get("Ap,NextStageIM4MHash"),
        Some(&Value::Data(vec![0x11; 48]))
    );
    assert_eq!(
        req.get("Ap,RecoveryOSPolicyNonceHash"),
        Some(&Value::Data(vec![0x22; 48]))
    );
    assert_eq!(
        req.get("Ap,VolumeUUID"),
        Some(&Value::Data(vec![
            0x0A, 0x1B, 0x2C, 0x3D, 0x4E, 0x5F, 0x60, 0x71, 0x82, 0x93, 0xA4, 0xB5, 0xC6, 0xD7,
            0xE8, 0xF9
        ]))
    );
    let bad = RecoveryOsLocalPolicyArgs {
        volume_uuid: "not-a-uuid".into(),
        ..args
    };
    assert!(matches!(
        tss::recovery_os_local_policy_request(&j314s(), &params(), &bad, &uuid()),
        Err(TssError::BadVolumeUuid(_))
    ));
}

/// `<key>` names in the order they appear in a (possibly partial) plist text.
fn excerpt_keys(text: &str) -> Vec<String> {
    text.split("<key>")
        .skip(1)
        .filter_map(|s| s.split_once("</key>").map(|(k, _)| k.to_string()))
        .collect()
}

#[test]
fn key_order_matches_real_requests() {
    let text = std::fs::read_to_string(
        shared().join("fixtures/tss/tss-request-response-excerpts-from-issues.txt"),
    )
    .unwrap();
    let sections: Vec<&str> = text.split("==========").collect();
    let section = |tag: &str| *sections.iter().find(|s| s.contains(tag)).unwrap();
    let req = tss::main_ap_request(&j314s(), &params(), &uuid()).unwrap();
    let ours = keys(&req);
    let pos = |k: &str| ours.iter().position(|o| *o == k);

    // Head of a real request (issue #693): @VersionInfo, @UUID, common tags, then components.
    let head = excerpt_keys(section("issues/693"));
    let head_common: Vec<&str> = head
        .iter()
        .map(String::as_str)
        .take_while(|k| !k.starts_with("AOP"))
        .collect();
    assert_eq!(
        head_common,
        [
            "@VersionInfo",
            "@UUID",
            "ApECID",
            "UniqueBuildID",
            "ApChipID",
            "ApBoardID",
            "ApSecurityDomain"
        ]
    );
    let mut last = 0;
    for k in head_common {
        let p = pos(k).unwrap();
        assert!(p >= last, "{k} out of order");
        last = p;
    }
    assert!(pos("AOP").unwrap() > pos("ApSecurityDomain").unwrap());

    // Tail of a real request (issue #666): the Img4 tags come last, in this order.
    let tail = excerpt_keys(section("issues/666"));
    let cut = tail.iter().position(|k| k == "@ServerVersion").unwrap();
    let tail: Vec<&str> = tail[..cut]
        .iter()
        .map(String::as_str)
        .filter(|k| pos(k).is_some())
        .collect();
    assert_eq!(
        tail,
        [
            "Ap,OSLongVersion",
            "ApNonce",
            "@ApImg4Ticket",
            "ApSecurityMode",
            "ApProductionMode",
            "SepNonce"
        ]
    );
    let mut last = 0;
    for k in tail {
        let p = pos(k).unwrap();
        assert!(p >= last, "{k} out of order");
        last = p;
    }
}
