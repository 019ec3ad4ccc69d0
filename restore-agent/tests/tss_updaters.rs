//! Firmware-updater TSS requests (protocol.md §4.9) built from real fixture BuildManifests:
//! exact keys per updater, RestoreRequestRules re-evaluated here independently, FirmwareData
//! assembly, and the named errors. Boards: J773s (Mac mini M4 Pro, retimers), J314s (MacBook
//! Pro, TCON), the iPhone13,2 manifest (BMU, Rose, SE, Savage/Yonkers), and every fixture Mac.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use plist::{Dictionary, Value};
use restore_agent::ftab::{Ftab, FtabEntry};
use restore_agent::tss::{
    self, FirmwarePlan, RequestUuid, TssError, TssResponse, UpdaterArgs, UpdaterKind,
};

const UUID: &str = "6B608AE8-F88E-0D75-62B0-1DB5A2323A7A";

fn shared() -> PathBuf {
    std::env::var_os("MACRESCUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")))
}

fn mac_manifest(board: &str) -> PathBuf {
    shared().join(format!(
        "fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests/{board}.BuildManifest.plist"
    ))
}

/// The identity of a manifest that carries `component`.
fn identity_with(path: &PathBuf, component: &str) -> Dictionary {
    let m: Dictionary = plist::from_file(path).unwrap();
    m["BuildIdentities"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_dictionary)
        .find(|id| {
            id["Manifest"]
                .as_dictionary()
                .unwrap()
                .contains_key(component)
        })
        .unwrap_or_else(|| panic!("{} has no {component}", path.display()))
        .clone()
}

fn iphone() -> PathBuf {
    shared().join("fixtures/manifests/iOS_26.2.1_23C71_iPhone13,2/BuildManifest.plist")
}

fn d(pairs: Vec<(&str, Value)>) -> Dictionary {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn b(x: bool) -> Value {
    Value::Boolean(x)
}
fn u(x: u64) -> Value {
    Value::Integer(x.into())
}
fn data(x: &[u8]) -> Value {
    Value::Data(x.to_vec())
}
fn s(x: &str) -> Value {
    Value::String(x.into())
}

fn args(name: &str, info: Dictionary, extra: Vec<(&str, Value)>) -> Dictionary {
    let mut a = d(vec![
        ("MessageArgType", s("FirmwareResponseData")),
        ("MessageArgUpdaterName", s(name)),
        ("MessageArgInfo", Value::Dictionary(info)),
    ]);
    for (k, v) in extra {
        a.insert(k.into(), v);
    }
    a
}

fn tags(response: &[&str]) -> (&'static str, Value) {
    (
        "DeviceGeneratedTags",
        Value::Dictionary(d(vec![(
            "ResponseTags",
            Value::Array(response.iter().map(|t| s(t)).collect()),
        )])),
    )
}

fn build(identity: &Dictionary, a: &Dictionary) -> Result<tss::UpdaterPlan, TssError> {
    let parsed = UpdaterArgs::parse(a)?;
    tss::updater_request(identity, &parsed, &RequestUuid::parse(UUID).unwrap())
}

fn keys(d: &Dictionary) -> BTreeSet<String> {
    d.keys().cloned().collect()
}

fn manifest(identity: &Dictionary) -> &Dictionary {
    identity["Manifest"].as_dictionary().unwrap()
}

fn with_prefix(identity: &Dictionary, prefix: &str) -> BTreeSet<String> {
    manifest(identity)
        .keys()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect()
}

/// §4.5's rule semantics, re-read: a condition holds when the parameter it names (after the
/// documented renaming) is present and equal.
fn expected_flags(entry: &Dictionary, params: &Dictionary) -> Dictionary {
    let mut out = Dictionary::new();
    let rules = entry
        .get("Info")
        .and_then(Value::as_dictionary)
        .and_then(|i| i.get("RestoreRequestRules"))
        .and_then(Value::as_array);
    for rule in rules.into_iter().flatten().filter_map(Value::as_dictionary) {
        let holds = rule["Conditions"]
            .as_dictionary()
            .unwrap()
            .iter()
            .all(|(k, v)| {
                let p = match k.as_str() {
                    "ApRawProductionMode" | "ApCurrentProductionMode" => "ApProductionMode",
                    "ApRawSecurityMode" => "ApSecurityMode",
                    "ApRequiresImage4" => "ApSupportsImg4",
                    "ApDemotionPolicyOverride" => "DemotionPolicy",
                    "ApInRomDFU" => "ApInRomDFU",
                    _ => return false,
                };
                params.get(p) == Some(v)
            });
        if holds {
            for (k, v) in rule["Actions"].as_dictionary().unwrap() {
                if let Value::Boolean(_) = v {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
    }
    out
}

/// Every `prefix` entry of the identity is in the request: Info gone, Digest and Trusted as in
/// the manifest, rule flags as `params` give them.
fn check_ruled_entries(req: &Dictionary, identity: &Dictionary, prefix: &str, params: &Dictionary) {
    for name in with_prefix(identity, prefix) {
        let m = manifest(identity)[&name].as_dictionary().unwrap();
        let got = req[&name]
            .as_dictionary()
            .unwrap_or_else(|| panic!("{name}"));
        assert!(!got.contains_key("Info"), "{name} keeps Info");
        assert_eq!(got.get("Digest"), m.get("Digest"), "{name}.Digest");
        assert_eq!(got.get("Trusted"), m.get("Trusted"), "{name}.Trusted");
        let flags = expected_flags(m, params);
        for k in ["EPRO", "ESEC", "DPRO", "DSEC"] {
            assert_eq!(got.get(k), flags.get(k), "{name}.{k}");
        }
    }
}

fn ap_true() -> Dictionary {
    d(vec![
        ("ApProductionMode", b(true)),
        ("ApSecurityMode", b(true)),
        ("ApSupportsImg4", b(true)),
    ])
}

fn timer_info(tag: u64, chip: u64, ap: Dictionary) -> Dictionary {
    d(vec![
        (
            "InfoArray",
            Value::Array(vec![Value::Dictionary(d(vec![
                ("TagNumber", u(tag)),
                ("TicketName", s("Timer,Ticket")),
                (
                    "HardwareID",
                    Value::Dictionary(d(vec![
                        ("ChipID", u(chip)),
                        ("BoardID", u(1)),
                        ("ECID", u(0x0011_2233_4455_6677)),
                        ("Nonce", data(&[0x4E; 32])),
                        ("SecurityMode", b(true)),
                        ("SecurityDomain", u(1)),
                        ("ProductionStatus", b(true)),
                    ])),
                ),
            ]))]),
        ),
        ("APInfo", Value::Dictionary(ap)),
    ])
}

fn standard() -> BTreeSet<String> {
    ["@HostPlatformInfo", "@VersionInfo", "@UUID", "@BBTicket"]
        .iter()
        .map(|k| k.to_string())
        .collect()
}

#[test]
fn retimer_request_on_a_mac_mini_m4_pro() {
    let id = identity_with(&mac_manifest("J773sAP"), "Timer,RTKitOS,2");
    let a = args(
        "AppleTypeCRetimer",
        timer_info(2, 26128, d(vec![("ApChipID", u(0x6041))])),
        vec![tags(&["Timer,Ticket", "FirmwareData"])],
    );
    let plan = build(&id, &a).unwrap();
    assert_eq!(plan.kind, UpdaterKind::Timer);
    assert_eq!(plan.ticket, "Timer,Ticket");
    let r = &plan.request;
    let mut want = standard();
    want.insert("@Timer,Ticket".into());
    for k in [
        "BoardID",
        "ChipID",
        "SecurityDomain",
        "SecurityMode",
        "ProductionMode",
        "ECID",
        "Nonce",
    ] {
        want.insert(format!("Timer,{k},2"));
    }
    want.extend(with_prefix(&id, "Timer,"));
    assert_eq!(keys(r), want);
    assert_eq!(r["@BBTicket"], b(true));
    assert_eq!(r["@UUID"], s(UUID));
    assert_eq!(r["Timer,ChipID,2"], u(26128));
    assert_eq!(r["Timer,ECID,2"], u(0x0011_2233_4455_6677));
    assert_eq!(r["Timer,Nonce,2"], data(&[0x4E; 32]));
    assert_eq!(r["Timer,ProductionMode,2"], b(true));
    assert_eq!(r["Timer,SecurityMode,2"], b(true));
    // Every Timer entry (all tags, the PHY firmware too), rules with the AP modes = true.
    check_ruled_entries(r, &id, "Timer,", &ap_true());
    assert_eq!(
        r["Timer,RTKitOS,2"].as_dictionary().unwrap()["EPRO"],
        b(true)
    );
    assert_eq!(
        plan.firmware,
        FirmwarePlan::RtkitFtab {
            rtkit_os: "Timer,RTKitOS,2".into(),
            restore_rtkit_os: Some("Timer,RestoreRTKitOS,2".into()),
        }
    );

    // APInfo is merged into the rule parameters: a development AP turns EPRO off.
    let dev = args(
        "AppleTypeCRetimer",
        timer_info(1, 26128, d(vec![("ApProductionMode", b(false))])),
        vec![],
    );
    let plan = build(&id, &dev).unwrap();
    let mut params = ap_true();
    params.insert("ApProductionMode".into(), b(false));
    check_ruled_entries(&plan.request, &id, "Timer,", &params);
    assert_eq!(
        plan.request["Timer,RTKitOS,1"].as_dictionary().unwrap()["EPRO"],
        b(false)
    );
    // No FirmwareData in ResponseTags: none is planned.
    assert_eq!(plan.firmware, FirmwarePlan::None);
}

#[test]
fn retimer_device_request_overrides_and_errors() {
    let id = identity_with(&mac_manifest("J413AP"), "Timer,RTKitOS,1");
    let a = args(
        "AppleTypeCRetimer",
        timer_info(1, 0x6610, Dictionary::new()),
        vec![(
            "DeviceGeneratedRequest",
            Value::Dictionary(d(vec![("Timer,Nonce,1", data(&[9; 20]))])),
        )],
    );
    assert_eq!(
        build(&id, &a).unwrap().request["Timer,Nonce,1"],
        data(&[9; 20])
    );

    let mut no_ticket = timer_info(1, 0x6610, Dictionary::new());
    if let Value::Array(a) = no_ticket.get_mut("InfoArray").unwrap() {
        a[0].as_dictionary_mut().unwrap().remove("TicketName");
    }
    let e = build(&id, &args("AppleTypeCRetimer", no_ticket, vec![])).unwrap_err();
    assert!(
        matches!(&e, TssError::UpdaterArguments { updater, what }
            if updater == "AppleTypeCRetimer" && what.contains("TicketName")),
        "{e}"
    );
    assert!(e.to_string().contains("AppleTypeCRetimer"));

    let mut no_ap = timer_info(1, 0x6610, Dictionary::new());
    no_ap.remove("APInfo");
    let e = build(&id, &args("AppleTypeCRetimer", no_ap, vec![])).unwrap_err();
    assert!(matches!(&e, TssError::UpdaterArguments { what, .. } if what.contains("APInfo")));

    // A tag the build has no firmware for, with FirmwareData asked: named.
    let e = build(
        &id,
        &args(
            "AppleTypeCRetimer",
            timer_info(7, 0x6610, Dictionary::new()),
            vec![tags(&["Timer,Ticket", "FirmwareData"])],
        ),
    )
    .unwrap_err();
    assert!(
        matches!(&e, TssError::UpdaterRequest { what, .. } if what.contains("Timer,RTKitOS,7")),
        "{e}"
    );

    // A Mac without retimers: the request cannot be built, and says so.
    let j274 = identity_with(&mac_manifest("J274AP"), "iBSS");
    let e = build(&j274, &a).unwrap_err();
    assert!(
        matches!(&e, TssError::UpdaterRequest { updater, what }
            if updater == "AppleTypeCRetimer" && what.contains("Timer,")),
        "{e}"
    );
}

#[test]
fn tcon_request_on_a_macbook_pro() {
    let id = identity_with(&mac_manifest("J314sAP"), "Baobab,TCON");
    let info = d(vec![
        ("Baobab,ChipID", u(2133)),
        ("Baobab,ECID", data(&[0xEC; 8])),
        ("Baobab,Life", u(3)),
        ("Baobab,ProductionMode", b(true)),
        ("Baobab,UpdateNonce", data(&[0xAB; 20])),
    ]);
    let plan = build(
        &id,
        &args(
            "AppleTCON",
            info,
            vec![tags(&["Baobab,Ticket", "FirmwareData"])],
        ),
    )
    .unwrap();
    assert_eq!(plan.kind, UpdaterKind::Tcon);
    assert_eq!(plan.ticket, "Baobab,Ticket");
    let mut want = standard();
    want.insert("@Baobab,Ticket".into());
    for k in [
        "BoardID",
        "ChipID",
        "ECID",
        "Life",
        "ManifestEpoch",
        "ProductionMode",
        "SecurityDomain",
        "UpdateNonce",
    ] {
        want.insert(format!("Baobab,{k}"));
    }
    want.extend(with_prefix(&id, "Baobab,"));
    assert_eq!(keys(&plan.request), want);
    // BoardID, ManifestEpoch, SecurityDomain come from the build identity (§4.3).
    assert_eq!(plan.request["Baobab,BoardID"], u(6));
    assert_eq!(plan.request["Baobab,ManifestEpoch"], u(0));
    assert_eq!(plan.request["Baobab,SecurityDomain"], u(1));
    assert_eq!(plan.request["Baobab,ECID"], data(&[0xEC; 8]));
    let tcon = plan.request["Baobab,TCON"].as_dictionary().unwrap();
    let m = manifest(&id)["Baobab,TCON"].as_dictionary().unwrap();
    assert_eq!(tcon.get("Digest"), m.get("Digest"));
    assert_eq!(tcon.get("EPRO"), Some(&b(true)));
    assert!(!tcon.contains_key("Info"));
    assert_eq!(
        plan.firmware,
        FirmwarePlan::Raw {
            component: "Baobab,TCON".into()
        }
    );

    // Without the TCON's nonce the request cannot be built; the error names it.
    let e = build(
        &id,
        &args("AppleTCON", d(vec![("Baobab,ECID", data(&[1]))]), vec![]),
    )
    .unwrap_err();
    assert!(
        matches!(&e, TssError::UpdaterRequest { updater, what }
            if updater == "AppleTCON" && what.contains("Baobab,UpdateNonce")),
        "{e}"
    );
}

#[test]
fn bmu_rose_se_savage_yonkers_on_the_iphone_manifest() {
    let id = identity_with(&iphone(), "BMU,FirmwareMap");
    // T200 (Veridian)
    let plan = build(
        &id,
        &args(
            "T200",
            d(vec![
                ("ChipID", u(57601)),
                ("Nonce", data(&[5; 32])),
                ("ProductionMode", b(true)),
                ("UniqueID", u(0x1122)),
            ]),
            vec![tags(&["BMU,Ticket", "FirmwareData"])],
        ),
    )
    .unwrap();
    let mut want = standard();
    want.extend(
        [
            "@BMU,Ticket",
            "BMU,BoardID",
            "BMU,ChipID",
            "BMU,Nonce",
            "BMU,ProductionMode",
            "BMU,UniqueID",
        ]
        .map(String::from),
    );
    want.extend(with_prefix(&id, "BMU,"));
    assert_eq!(keys(&plan.request), want);
    assert_eq!(plan.request["BMU,BoardID"], u(5715));
    assert_eq!(plan.request["BMU,ChipID"], u(57601));
    // The BMU request carries no AP modes, so no rule could fire (none exist anyway).
    check_ruled_entries(&plan.request, &id, "BMU,", &Dictionary::new());
    let digest = manifest(&id)["BMU,FirmwareMap"].as_dictionary().unwrap()["Digest"]
        .as_data()
        .unwrap()
        .to_vec();
    assert_eq!(
        plan.firmware,
        FirmwarePlan::BmuFirmwareMap {
            component: "BMU,FirmwareMap".into(),
            digest: digest.clone()
        }
    );
    // FirmwareData: the map as a binary plist plus fw_map_digest.
    let mut map_xml = Vec::new();
    plist::to_writer_xml(
        &mut map_xml,
        &Value::Dictionary(d(vec![("fw", s("x1653.bin"))])),
    )
    .unwrap();
    let resp = response("BMU,Ticket");
    let files = BTreeMap::from([("BMU,FirmwareMap".to_string(), map_xml)]);
    let out = tss::firmware_response(&plan, &resp, &files).unwrap();
    assert_eq!(out["BMU,Ticket"], data(&[0x30, 0x00]));
    let fw = out["FirmwareData"].as_data().unwrap();
    assert!(fw.starts_with(b"bplist00"));
    let back: Dictionary = plist::from_bytes(fw).unwrap();
    assert_eq!(
        back,
        d(vec![
            ("fw", s("x1653.bin")),
            ("fw_map_digest", data(&digest))
        ])
    );

    // Rose: every Rap,* entry with rules evaluated against AP modes = true.
    let rose_info = d(vec![
        ("Rap,ChipID", u(8198)),
        ("Rap,ECID", u(77)),
        ("Rap,Nonce", data(&[7; 32])),
        ("Rap,ProductionMode", b(true)),
        ("Rap,SecurityMode", b(true)),
        ("Rap,FdrRootCaDigest", data(&[8; 48])),
    ]);
    let plan = build(&id, &args("Rose", rose_info, vec![tags(&["FirmwareData"])])).unwrap();
    let mut want = standard();
    want.extend(
        [
            "@Rap,Ticket",
            "Rap,BoardID",
            "Rap,ChipID",
            "Rap,ECID",
            "Rap,Nonce",
            "Rap,ProductionMode",
            "Rap,SecurityDomain",
            "Rap,SecurityMode",
            "Rap,FdrRootCaDigest",
        ]
        .map(String::from),
    );
    want.extend(with_prefix(&id, "Rap,"));
    assert_eq!(keys(&plan.request), want);
    check_ruled_entries(&plan.request, &id, "Rap,", &ap_true());
    assert_eq!(plan.ticket, "Rap,Ticket");
    assert!(
        matches!(&plan.firmware, FirmwarePlan::RtkitFtab { rtkit_os, .. } if rtkit_os == "Rap,RTKitOS")
    );

    // SE: production keys kept, development ones dropped; SE2 when the device asks for it.
    let se_info = d(vec![
        ("SE,ChipID", u(0xD2)),
        ("SE,ID", data(&[1; 8])),
        ("SE,Nonce", data(&[2; 32])),
        ("SE,RootKeyIdentifier", data(&[3; 32])),
    ]);
    let plan = build(
        &id,
        &args("SE", se_info.clone(), vec![tags(&["FirmwareData"])]),
    )
    .unwrap();
    let mut want = standard();
    want.extend(
        [
            "@SE,Ticket",
            "SE,ChipID",
            "SE,ID",
            "SE,Nonce",
            "SE,RootKeyIdentifier",
        ]
        .map(String::from),
    );
    want.extend(with_prefix(&id, "SE,"));
    assert_eq!(keys(&plan.request), want);
    for name in with_prefix(&id, "SE,") {
        let e = plan.request[&name].as_dictionary().unwrap();
        assert!(!e.contains_key("Info") && !e.contains_key("DevelopmentUpdatePayloadHash"));
    }
    assert_eq!(plan.ticket, "SE,Ticket");
    assert_eq!(
        plan.firmware,
        FirmwarePlan::Raw {
            component: "SE,UpdatePayload".into()
        }
    );
    let se2 = build(
        &id,
        &args(
            "SE",
            se_info,
            vec![(
                "DeviceGeneratedRequest",
                Value::Dictionary(d(vec![("@SE2,Ticket", b(true))])),
            )],
        ),
    )
    .unwrap();
    assert_eq!(se2.ticket, "SE2,Ticket");
    assert!(!se2.request.contains_key("@SE,Ticket"));

    // Savage: the patch follows the part's revision and production fuse.
    let savage_info = d(vec![
        ("Savage,UID", data(&[1; 16])),
        ("Savage,PatchEpoch", u(0)),
        ("Savage,ChipID", u(1)),
        ("Savage,AllowOfflineBoot", b(false)),
        ("Savage,ReadFWKey", b(true)),
        ("Savage,ProductionMode", b(true)),
        ("Savage,Nonce", data(&[2; 32])),
        ("Savage,ReadECKey", b(true)),
        ("Savage,Revision", data(&[0x30])),
    ]);
    let plan = build(
        &id,
        &args("Savage", savage_info, vec![tags(&["FirmwareData"])]),
    )
    .unwrap();
    assert_eq!(plan.kind, UpdaterKind::Savage);
    assert!(plan.request.contains_key("Savage,B2-Prod-Patch"));
    assert_eq!(
        plan.request["SEP"].as_dictionary().unwrap()["Digest"],
        manifest(&id)["SEP"].as_dictionary().unwrap()["Digest"]
    );
    let resp = response("Savage,Ticket");
    let files = BTreeMap::from([("Savage,B2-Prod-Patch".to_string(), vec![0xAA; 5])]);
    let out = tss::firmware_response(&plan, &resp, &files).unwrap();
    assert_eq!(
        out["FirmwareData"],
        data(&[0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA])
    );

    // Yonkers (Savage with YonkersDeviceInfo): a development part of fab revision 0x1A01.
    let yonkers = d(vec![(
        "YonkersDeviceInfo",
        Value::Dictionary(d(vec![
            ("Yonkers,AllowOfflineBoot", b(false)),
            ("Yonkers,BoardID", u(0)),
            ("Yonkers,ChipID", u(0x414)),
            ("Yonkers,ECID", u(9)),
            ("Yonkers,Nonce", data(&[4; 32])),
            ("Yonkers,PatchEpoch", u(0)),
            ("Yonkers,ProductionMode", b(false)),
            ("Yonkers,ReadECKey", b(true)),
            ("Yonkers,ReadFWKey", b(true)),
            ("Yonkers,FabRevision", u(6657)),
        ])),
    )]);
    let plan = build(&id, &args("Savage", yonkers, vec![tags(&["FirmwareData"])])).unwrap();
    assert_eq!(plan.kind, UpdaterKind::Yonkers);
    assert_eq!(plan.ticket, "Yonkers,Ticket");
    assert_eq!(
        plan.firmware,
        FirmwarePlan::YonkersPatch {
            component: "Yonkers,SysTopPatch0".into()
        }
    );
}

fn response(ticket: &str) -> TssResponse {
    TssResponse {
        status: 0,
        message: "SUCCESS".into(),
        tickets: d(vec![(ticket, data(&[0x30, 0x00]))]),
    }
}

fn ftab(entries: &[(&[u8; 4], &[u8])]) -> Vec<u8> {
    Ftab {
        tag: *b"rkos",
        entries: entries
            .iter()
            .map(|(t, d)| FtabEntry {
                tag: **t,
                data: d.to_vec(),
            })
            .collect(),
    }
    .to_bytes()
    .unwrap()
}

#[test]
fn retimer_firmware_is_rtkitos_with_the_restore_entry_appended() {
    let id = identity_with(&mac_manifest("J413AP"), "Timer,RTKitOS,1");
    let plan = build(
        &id,
        &args(
            "AppleTypeCRetimer",
            timer_info(1, 0x6610, Dictionary::new()),
            vec![tags(&["Timer,Ticket", "FirmwareData"])],
        ),
    )
    .unwrap();
    let rtkit = ftab(&[(b"rkos", b"os"), (b"rrko", b"old-restore")]);
    let restore = ftab(&[(b"rkos", b"other"), (b"rrko", b"restore-os")]);
    let files = BTreeMap::from([
        ("Timer,RTKitOS,1".to_string(), rtkit),
        ("Timer,RestoreRTKitOS,1".to_string(), restore),
    ]);
    let out = tss::firmware_response(&plan, &response("Timer,Ticket"), &files).unwrap();
    let t = Ftab::parse(out["FirmwareData"].as_data().unwrap()).unwrap();
    assert_eq!(t.tag, *b"rkos");
    let got: Vec<(&[u8], &[u8])> = t
        .entries
        .iter()
        .map(|e| (&e.tag[..], e.data.as_slice()))
        .collect();
    assert_eq!(
        got,
        vec![
            (&b"rkos"[..], &b"os"[..]),
            (b"rrko", b"old-restore"),
            (b"rrko", b"restore-os")
        ]
    );

    // A reply without the ticket, a firmware that is not an FTAB: named errors.
    let e = tss::firmware_response(&plan, &response("Other,Ticket"), &files).unwrap_err();
    assert!(matches!(&e, TssError::MissingTicket(t) if t == "Timer,Ticket"));
    let mut bad = files.clone();
    bad.insert("Timer,RTKitOS,1".into(), b"UARP not an ftab".to_vec());
    let e = tss::firmware_response(&plan, &response("Timer,Ticket"), &bad).unwrap_err();
    assert!(
        matches!(&e, TssError::UpdaterFirmware { updater, what }
            if updater == "AppleTypeCRetimer" && what.contains("Timer,RTKitOS,1")),
        "{e}"
    );
    let mut no_rrko = files.clone();
    no_rrko.insert("Timer,RestoreRTKitOS,1".into(), ftab(&[(b"rkos", b"x")]));
    let e = tss::firmware_response(&plan, &response("Timer,Ticket"), &no_rrko).unwrap_err();
    assert!(e.to_string().contains("rrko"), "{e}");
}

#[test]
fn generic_and_cryptex_requests() {
    let id = identity_with(&mac_manifest("J514sAP"), "iBSS");
    let dgr = d(vec![
        ("@USBPortController1,Ticket", b(true)),
        ("USBPortController1,ECID", u(5)),
        ("USBPortController1,Nonce", data(&[6; 32])),
    ]);
    for name in ["Ace3", "PS190", "SomethingNew"] {
        let plan = build(
            &id,
            &args(
                name,
                d(vec![("Ignored", b(true))]),
                vec![
                    tags(&["USBPortController1,Ticket"]),
                    ("DeviceGeneratedRequest", Value::Dictionary(dgr.clone())),
                ],
            ),
        )
        .unwrap();
        assert_eq!(plan.kind, UpdaterKind::Generic);
        assert_eq!(plan.ticket, "USBPortController1,Ticket");
        let mut want: BTreeSet<String> = ["@HostPlatformInfo", "@VersionInfo", "@UUID"]
            .map(String::from)
            .into();
        want.extend(keys(&dgr));
        assert_eq!(
            keys(&plan.request),
            want,
            "{name}: only the device's request"
        );
        assert_eq!(plan.firmware, FirmwarePlan::None);
    }
    let e = build(
        &id,
        &args("Ace3", Dictionary::new(), vec![tags(&["X,Ticket"])]),
    )
    .unwrap_err();
    assert!(
        matches!(&e, TssError::UpdaterRequest { updater, what }
            if updater == "Ace3" && what.contains("DeviceGeneratedRequest")),
        "{e}"
    );

    // Cryptex1: identity keys named by BuildIdentityTags, the device's request, AP defaults.
    let plan = build(
        &id,
        &args(
            "Cryptex1",
            d(vec![("ApECID", u(0x42))]),
            vec![
                (
                    "DeviceGeneratedTags",
                    Value::Dictionary(d(vec![
                        ("ResponseTags", Value::Array(vec![s("Cryptex1,Ticket")])),
                        (
                            "BuildIdentityTags",
                            Value::Array(vec![s("Cryptex1,ChipID"), s("Cryptex1,Type")]),
                        ),
                    ])),
                ),
                (
                    "DeviceGeneratedRequest",
                    Value::Dictionary(d(vec![("Cryptex1,Nonce", data(&[1; 32]))])),
                ),
            ],
        ),
    )
    .unwrap();
    let r = &plan.request;
    assert_eq!(plan.ticket, "Cryptex1,Ticket");
    assert_eq!(r["@Cryptex1,Ticket"], b(true));
    assert_eq!(r["ApECID"], u(0x42));
    assert_eq!(r["ApProductionMode"], b(true));
    assert_eq!(r["ApSecurityMode"], b(true));
    assert_eq!(r["Cryptex1,ChipID"], id["Cryptex1,ChipID"]);
    assert_eq!(r["Cryptex1,Nonce"], data(&[1; 32]));
    assert!(r.contains_key("ApChipID") && r.contains_key("ApBoardID"));
}

#[test]
fn malformed_arguments_are_named() {
    let id = identity_with(&mac_manifest("J314sAP"), "Baobab,TCON");
    let cases: Vec<(Dictionary, &str)> = vec![
        (Dictionary::new(), "MessageArgUpdaterName"),
        (
            d(vec![
                ("MessageArgUpdaterName", s("AppleTCON")),
                ("MessageArgType", s("Preflight")),
                ("MessageArgInfo", Value::Dictionary(Dictionary::new())),
            ]),
            "MessageArgType",
        ),
        (
            d(vec![
                ("MessageArgUpdaterName", s("AppleTCON")),
                ("MessageArgType", s("FirmwareResponseData")),
                ("MessageArgInfo", s("not a dict")),
            ]),
            "MessageArgInfo",
        ),
        (
            args(
                "AppleTCON",
                Dictionary::new(),
                vec![("DeviceGeneratedRequest", u(1))],
            ),
            "DeviceGeneratedRequest",
        ),
        (
            args(
                "AppleTCON",
                Dictionary::new(),
                vec![(
                    "DeviceGeneratedTags",
                    Value::Dictionary(d(vec![("ResponseTags", Value::Array(vec![u(1)]))])),
                )],
            ),
            "ResponseTags",
        ),
    ];
    for (a, what_has) in cases {
        let e = build(&id, &a).unwrap_err();
        assert!(
            matches!(&e, TssError::UpdaterArguments { what, .. } if what.contains(what_has)),
            "{what_has}: {e}"
        );
    }
    // A value of the wrong type from the device is named too.
    let e = build(
        &id,
        &args(
            "AppleTCON",
            d(vec![
                ("Baobab,ECID", s("not data")),
                ("Baobab,UpdateNonce", data(&[1])),
            ]),
            vec![],
        ),
    )
    .unwrap_err();
    assert!(
        matches!(&e, TssError::UpdaterRequest { what, .. } if what.contains("Baobab,ECID")),
        "{e}"
    );
}

/// Every fixture Mac: each retimer tag, the TCON, and the generic builder give requests that
/// follow §4.9 (re-checked here key by key).
#[test]
fn every_fixture_mac_builds_its_updater_requests() {
    let dir = shared().join("fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests");
    let mut timers = 0;
    let mut tcons = 0;
    let mut boards = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let m: Dictionary = plist::from_file(&path).unwrap();
        let Some(ids) = m.get("BuildIdentities").and_then(Value::as_array) else {
            continue;
        };
        let board = path.file_name().unwrap().to_string_lossy().into_owned();
        for id in ids.iter().filter_map(Value::as_dictionary) {
            if !manifest(id).contains_key("iBSS") {
                continue;
            }
            boards += 1;
            // Retimers: one request per tag the identity describes.
            let tags_present: BTreeSet<u64> = manifest(id)
                .keys()
                .filter_map(|k| k.strip_prefix("Timer,RTKitOS,")?.parse().ok())
                .collect();
            for tag in tags_present {
                let chip = id
                    .get(&format!("Timer,ChipID,{tag}"))
                    .and_then(Value::as_unsigned_integer)
                    .unwrap_or(0x6610);
                let plan = build(
                    id,
                    &args(
                        "AppleTypeCRetimer",
                        timer_info(tag, chip, Dictionary::new()),
                        vec![tags(&["Timer,Ticket", "FirmwareData"])],
                    ),
                )
                .unwrap_or_else(|e| panic!("{board} tag {tag}: {e}"));
                let r = &plan.request;
                assert_eq!(r["@Timer,Ticket"], b(true), "{board}");
                assert_eq!(r["@BBTicket"], b(true), "{board}");
                for k in ["ChipID", "BoardID", "ECID", "Nonce", "SecurityDomain"] {
                    assert!(r.contains_key(&format!("Timer,{k},{tag}")), "{board} {k}");
                }
                check_ruled_entries(r, id, "Timer,", &ap_true());
                assert!(!r.contains_key("ApECID") && !r.contains_key("Baobab,TCON"));
                timers += 1;
            }
            if manifest(id).contains_key("Baobab,TCON") {
                let plan = build(
                    id,
                    &args(
                        "AppleTCON",
                        d(vec![
                            ("Baobab,ECID", data(&[1; 8])),
                            ("Baobab,UpdateNonce", data(&[2; 20])),
                            ("Baobab,ProductionMode", b(true)),
                        ]),
                        vec![],
                    ),
                )
                .unwrap_or_else(|e| panic!("{board} TCON: {e}"));
                for name in with_prefix(id, "Baobab,") {
                    let e = plan.request[&name].as_dictionary().unwrap();
                    assert_eq!(e.get("EPRO"), Some(&b(true)), "{board} {name}");
                    assert!(!e.contains_key("Info"));
                }
                assert_eq!(plan.request.get("Baobab,ChipID"), id.get("Baobab,ChipID"));
                tcons += 1;
            }
        }
    }
    assert!(boards >= 40, "only {boards} fixture Macs");
    assert!(timers >= 60, "only {timers} retimer requests");
    assert!(tcons >= 20, "only {tcons} TCON requests");
}
