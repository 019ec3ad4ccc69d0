//! Restore plans for every fixture Mac manifest, and for a full-IPSW-shaped manifest made from
//! one: identity choice, stage lists exactly as `bootchain::plan` uploads them, paths and 4CCs.

use std::path::PathBuf;

use plist::{Dictionary, Value};
use restore_agent::bootchain::plan as steps;
use restore_agent::img4::fourcc;
use restore_agent::manifest::{BuildIdentity, BuildManifest, ManifestError, RestoreBehavior};
use restore_agent::personalize::plan::{fourcc_text, PlannedComponent};
use restore_agent::personalize::{RestorePlan, RestorePlanError, TicketKind};

fn shared() -> PathBuf {
    std::env::var_os("MACRESCUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")))
}

fn preflight_dir() -> PathBuf {
    shared().join("fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests")
}

fn every_manifest() -> Vec<(String, BuildManifest)> {
    let mut v: Vec<(String, BuildManifest)> = std::fs::read_dir(preflight_dir())
        .unwrap()
        .map(|e| {
            let m = BuildManifest::from_path(&e.unwrap().path()).unwrap();
            (m.identities[0].info.device_class.clone(), m)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn names(list: &[PlannedComponent]) -> Vec<&str> {
    list.iter().map(|c| c.component.as_str()).collect()
}

/// The stage lists from the manifest flags alone (§3.3, §3.4), independently of the plan code.
fn expected_stages(id: &BuildIdentity) -> (Vec<String>, Vec<String>) {
    let mut s1 = vec!["Ap,LocalPolicy".to_string()];
    s1.extend(
        id.components
            .iter()
            .filter(|c| c.is_loaded_by_iboot_stage1 == Some(true) && c.is_loaded_by_iboot.is_some())
            .map(|c| c.name.clone()),
    );
    s1.extend(["RestoreLogo".into(), "iBEC".into()]);
    let mut s2 = vec!["RestoreLogo".to_string()];
    s2.extend(
        id.components
            .iter()
            .filter(|c| {
                c.is_loaded_by_iboot == Some(true) && c.is_loaded_by_iboot_stage1 != Some(true)
            })
            .map(|c| c.name.clone()),
    );
    s2.extend(["RestoreRamDisk".into(), "RestoreDeviceTree".into()]);
    if id.has("RestoreSEP") {
        s2.push("RestoreSEP".into());
    }
    s2.push("RestoreKernelCache".into());
    (s1, s2)
}

fn check_components(board: &str, id: &BuildIdentity, list: &[PlannedComponent]) {
    for c in list {
        if c.component == "Ap,LocalPolicy" {
            assert_eq!(c.path, None);
            assert_eq!(c.fourcc, Some(*b"lpol"));
            assert_eq!(c.ticket, TicketKind::LocalPolicy);
            continue;
        }
        let entry = id.component(&c.component).unwrap();
        assert_eq!(c.ticket, TicketKind::Main, "{board} {}", c.component);
        assert_eq!(c.path, entry.path, "{board} {}", c.component);
        assert!(c.path.is_some(), "{board} {} has no path", c.component);
        let Some(tag) = c.fourcc else {
            // Newer components (AOP2, Ap,GFX1Firmware, …) are in no table and carry no
            // Img4PayloadType: the IM4P keeps its own tag, which is fine only without a rewrite.
            assert!(
                fourcc::restore_rewrite(&c.component).is_none(),
                "{board} {}",
                c.component
            );
            assert!(entry.img4_payload_type.is_none(), "{board} {}", c.component);
            continue;
        };
        assert!(
            tag.iter().all(|b| b.is_ascii_alphanumeric()),
            "{board} {}: {tag:?}",
            c.component
        );
        if let Some(rewrite) = fourcc::restore_rewrite(&c.component) {
            assert_eq!(tag, rewrite, "{board} {}", c.component);
        }
        if let Some(t) = &entry.img4_payload_type {
            assert_eq!(fourcc_text(tag), *t, "{board} {}", c.component);
        }
    }
}

#[test]
fn every_fixture_board_gets_a_plan_matching_the_boot_chain() {
    let mut planned = 0;
    for (board, m) in every_manifest() {
        let plan = match RestorePlan::new(&m, &board, RestoreBehavior::Update) {
            Ok(p) => p,
            Err(e) => {
                // The Intel and T2 manifests carry only Erase firmware identities without iBSS.
                assert!(board == "j160ap" || board == "x86legacyap", "{board}: {e}");
                assert!(
                    matches!(
                        e,
                        RestorePlanError::Manifest(ManifestError::NoIdentity { .. })
                    ),
                    "{board}: {e:?}"
                );
                continue;
            }
        };
        planned += 1;
        let id = plan.identity_in(&m).unwrap();
        // The identity the driver boots with.
        let driver_id = m
            .select_boot_identity(&board, RestoreBehavior::Update)
            .unwrap();
        assert_eq!(id.index, driver_id.index, "{board}");
        assert_eq!(plan.identity.variant, "Customer Software Update", "{board}");
        assert_eq!(plan.identity.restore_behavior.as_deref(), Some("Update"));
        assert_eq!(plan.identity.build.as_deref(), Some("25C56"));
        assert_eq!(plan.identity.macos_variant, None);
        assert!(
            !plan.variants.macos_customer,
            "{board}: Preflight manifests have none"
        );
        assert!(plan.variants.software_update_only, "{board}");

        // Stage lists: exactly the uploads of the driver's step lists, in order.
        assert_eq!(
            names(&plan.dfu),
            steps::components(&[&steps::dfu(id).unwrap()])
        );
        assert_eq!(
            names(&plan.stage1),
            steps::components(&[&steps::stage1(id, true).unwrap()])
        );
        assert_eq!(
            names(&plan.stage2),
            steps::components(&[&steps::stage2(id).unwrap()])
        );
        let all = steps::components(&[
            &steps::dfu(id).unwrap(),
            &steps::stage1(id, true).unwrap(),
            &steps::stage2(id).unwrap(),
        ]);
        let boot: Vec<&str> = plan
            .boot_components()
            .iter()
            .map(|c| c.component.as_str())
            .collect();
        assert_eq!(boot, all, "{board}");
        // …and what the manifest flags say, computed independently.
        let (s1, s2) = expected_stages(id);
        assert_eq!(names(&plan.dfu), ["iBSS"], "{board}");
        assert_eq!(names(&plan.stage1), s1, "{board}");
        assert_eq!(names(&plan.stage2), s2, "{board}");

        for list in [&plan.dfu, &plan.stage1, &plan.stage2] {
            check_components(&board, id, list);
        }

        // Restore mode: the OS image of this identity; no global manifest without MacOSVariant.
        let os = plan.restore.iter().find(|i| i.component == "OS").unwrap();
        assert_eq!(
            os.path,
            id.component("OS").and_then(|c| c.path.clone()),
            "{board}"
        );
        assert!(os.path.is_some(), "{board}");
        let gm = plan
            .restore
            .iter()
            .find(|i| i.component == "__GlobalManifest__")
            .unwrap();
        assert_eq!(gm.path, None);
    }
    assert_eq!(planned, 43);
}

#[test]
fn erase_on_a_software_update_manifest_asks_for_the_full_ipsw() {
    for (board, m) in every_manifest() {
        let e = RestorePlan::new(&m, &board, RestoreBehavior::Erase).unwrap_err();
        if board == "j160ap" || board == "x86legacyap" {
            assert!(
                matches!(
                    e,
                    RestorePlanError::Manifest(ManifestError::NotBootable { .. })
                ),
                "{board}: {e:?}"
            );
            continue;
        }
        assert!(
            matches!(e, RestorePlanError::EraseNeedsFullIpsw { .. }),
            "{board}: {e:?}"
        );
        let text = e.to_string();
        assert!(text.contains("full restore IPSW"), "{text}");
        assert!(text.contains("without --erase"), "{text}");
    }
}

#[test]
fn unknown_board_is_refused_with_the_available_ones() {
    let m = BuildManifest::from_path(&preflight_dir().join("J274AP.BuildManifest.plist")).unwrap();
    let e = RestorePlan::new(&m, "j999ap", RestoreBehavior::Update).unwrap_err();
    assert!(
        matches!(
            e,
            RestorePlanError::Manifest(ManifestError::UnknownBoard { .. })
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("j274ap"), "{e}");
}

/// A manifest shaped like a full restore IPSW's (§9.6): Erase, Upgrade and `macOS Customer`
/// identities with `Info.MacOSVariant`, made from the J274AP fixture's bootable identity.
pub fn full_ipsw_manifest() -> Vec<u8> {
    let v = Value::from_file(preflight_dir().join("J274AP.BuildManifest.plist")).unwrap();
    let mut root = v.into_dictionary().unwrap();
    let ids = root
        .get("BuildIdentities")
        .unwrap()
        .as_array()
        .unwrap()
        .clone();
    let base = ids[1].as_dictionary().unwrap().clone();
    let make = |variant: &str, behavior: &str, ramdisk: &str| {
        let mut id: Dictionary = base.clone();
        let info = id.get_mut("Info").unwrap().as_dictionary_mut().unwrap();
        info.insert("Variant".into(), variant.into());
        info.insert("RestoreBehavior".into(), behavior.into());
        info.insert("MacOSVariant".into(), "macOS Customer".into());
        let manifest = id.get_mut("Manifest").unwrap().as_dictionary_mut().unwrap();
        for (name, path) in [("RestoreRamDisk", ramdisk), ("OS", "094-00000-001.dmg")] {
            manifest
                .get_mut(name)
                .unwrap()
                .as_dictionary_mut()
                .unwrap()
                .get_mut("Info")
                .unwrap()
                .as_dictionary_mut()
                .unwrap()
                .insert("Path".into(), path.into());
        }
        Value::Dictionary(id)
    };
    root.insert(
        "BuildIdentities".into(),
        Value::Array(vec![
            make(
                "Customer Erase Install (IPSW)",
                "Erase",
                "094-00000-002.dmg",
            ),
            make(
                "Customer Upgrade Install (IPSW)",
                "Update",
                "094-00000-003.dmg",
            ),
            make("macOS Customer", "Erase", "094-00000-004.dmg"),
        ]),
    );
    let mut out = Vec::new();
    Value::Dictionary(root).to_writer_xml(&mut out).unwrap();
    out
}

#[test]
fn full_ipsw_erase_and_update_pick_their_identities() {
    let m = BuildManifest::from_bytes(&full_ipsw_manifest()).unwrap();
    for (behavior, variant, index, ramdisk) in [
        (
            RestoreBehavior::Erase,
            "Customer Erase Install (IPSW)",
            0,
            "094-00000-002.dmg",
        ),
        (
            RestoreBehavior::Update,
            "Customer Upgrade Install (IPSW)",
            1,
            "094-00000-003.dmg",
        ),
    ] {
        let plan = RestorePlan::new(&m, "J274AP", behavior).unwrap();
        assert_eq!(plan.identity.variant, variant);
        assert_eq!(plan.identity.index, index);
        assert_eq!(
            plan.identity.restore_behavior.as_deref(),
            Some(behavior.as_str())
        );
        assert_eq!(
            plan.identity.macos_variant.as_deref(),
            Some("macOS Customer")
        );
        assert!(plan.variants.macos_customer);
        assert!(!plan.variants.software_update_only);
        let rd = plan
            .stage2
            .iter()
            .find(|c| c.component == "RestoreRamDisk")
            .unwrap();
        assert_eq!(rd.path.as_deref(), Some(ramdisk), "{behavior}");
        assert_eq!(rd.fourcc, Some(*b"rdsk"));
        let path = |name: &str| {
            plan.restore
                .iter()
                .find(|i| i.component == name)
                .unwrap()
                .path
                .clone()
        };
        assert_eq!(path("OS").as_deref(), Some("094-00000-001.dmg"));
        assert_eq!(
            path("__GlobalManifest__").as_deref(),
            Some("Firmware/Manifests/restore/macOS Customer/apticket.j274ap.im4m")
        );
        let lp = plan
            .restore
            .iter()
            .find(|i| i.component == "RecoveryOSLocalPolicy")
            .unwrap();
        // §4.8 / §10: Erase uses the macOS Customer identity, Update the Update one.
        match behavior {
            RestoreBehavior::Erase => {
                assert!(lp.purpose.contains("\"macOS Customer\""), "{}", lp.purpose)
            }
            RestoreBehavior::Update => {
                assert!(
                    lp.purpose.contains("\"Customer Upgrade Install (IPSW)\""),
                    "{}",
                    lp.purpose
                )
            }
        }
        let text = plan.to_text();
        assert!(text.contains(variant), "{text}");
        assert!(text.contains("apticket.j274ap.im4m"), "{text}");
        assert!(text.contains("macOS Customer identity: present"), "{text}");
    }
}

#[test]
fn json_has_the_documented_shape() {
    let m = BuildManifest::from_path(&preflight_dir().join("J704AP.BuildManifest.plist")).unwrap();
    let plan = RestorePlan::new(&m, "j704ap", RestoreBehavior::Update).unwrap();
    let j = plan.to_json();
    assert_eq!(j["identity"]["variant"], "Customer Software Update");
    assert_eq!(j["identity"]["restore_behavior"], "Update");
    assert_eq!(j["identity"]["macos_variant"], serde_json::Value::Null);
    assert_eq!(j["identity"]["build"], "25C56");
    assert_eq!(j["variants"]["macos_customer"], false);
    assert_eq!(j["stages"]["dfu"][0]["component"], "iBSS");
    assert_eq!(
        j["stages"]["dfu"][0]["path"],
        "Firmware/dfu/iBSS.j704.RELEASE.im4p"
    );
    assert_eq!(j["stages"]["dfu"][0]["fourcc"], "ibss");
    assert_eq!(j["stages"]["stage1"][0]["component"], "Ap,LocalPolicy");
    assert_eq!(j["stages"]["stage1"][0]["path"], serde_json::Value::Null);
    assert_eq!(j["stages"]["stage1"][0]["ticket"], "local-policy");
    let s2 = j["stages"]["stage2"].as_array().unwrap();
    assert_eq!(s2.len(), plan.stage2.len());
    assert_eq!(s2.last().unwrap()["component"], "RestoreKernelCache");
    assert_eq!(s2.last().unwrap()["fourcc"], "rkrn");
    assert!(j["stages"]["restore"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["component"] == "OS"));
}

#[test]
fn an_identity_missing_a_boot_component_is_refused_by_name() {
    let bytes = full_ipsw_manifest();
    let mut root = Value::from_reader_xml(&bytes[..])
        .unwrap()
        .into_dictionary()
        .unwrap();
    let ids = root
        .get_mut("BuildIdentities")
        .unwrap()
        .as_array_mut()
        .unwrap();
    for id in ids.iter_mut() {
        id.as_dictionary_mut()
            .unwrap()
            .get_mut("Manifest")
            .unwrap()
            .as_dictionary_mut()
            .unwrap()
            .remove("RestoreKernelCache");
    }
    let mut out = Vec::new();
    Value::Dictionary(root).to_writer_xml(&mut out).unwrap();
    let m = BuildManifest::from_bytes(&out).unwrap();
    let e = RestorePlan::new(&m, "j274ap", RestoreBehavior::Erase).unwrap_err();
    assert!(matches!(e, RestorePlanError::Steps(_)), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("RestoreKernelCache") && text.contains("Customer Erase Install (IPSW)"),
        "{text}"
    );
}
