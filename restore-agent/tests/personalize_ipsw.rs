//! Personalization and `plan --ipsw` reading straight out of an IPSW (a ZIP written by an
//! independent ZIP library, with stored and deflated entries).

use std::io::{Cursor, Write};
use std::path::PathBuf;
use std::process::Command;

use plist::{Dictionary, Value};
use restore_agent::img4::{self, der, der::Tag, im4p};
use restore_agent::ipsw::Ipsw;
use restore_agent::manifest::{BuildManifest, RestoreBehavior};
use restore_agent::personalize::{
    ComponentSource, IpswSource, Personalizer, RestorePlan, SourceError, TssTransport,
    TssTransportError,
};
use restore_agent::tss::TssParams;
use zip::write::SimpleFileOptions;
use zip::CompressionMethod;

fn manifest_path() -> PathBuf {
    std::env::var_os("MACRESCUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")))
        .join("fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests/J274AP.BuildManifest.plist")
}

const SKIPPED: &str = "Firmware/dcp/ipad13dcp_restore.im4p";

/// An IPSW with the J274AP manifest and every boot-chain file but one; RestoreLogo's file is
/// stored, the rest deflated.
fn ipsw_bytes() -> Vec<u8> {
    let manifest = BuildManifest::from_path(&manifest_path()).unwrap();
    let plan = RestorePlan::new(&manifest, "j274ap", RestoreBehavior::Update).unwrap();
    let deflated = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    let stored = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    w.start_file("BuildManifest.plist", deflated).unwrap();
    w.write_all(&std::fs::read(manifest_path()).unwrap())
        .unwrap();
    let mut written = Vec::new();
    for c in plan.boot_components() {
        let Some(path) = c.path.clone() else { continue };
        if path == SKIPPED || written.contains(&path) || path.starts_with("..") {
            continue;
        }
        let opts = if c.component == "RestoreLogo" {
            stored
        } else {
            deflated
        };
        w.start_file(path.as_str(), opts).unwrap();
        w.write_all(&im4p::build(*b"test", "zip", path.repeat(40).as_bytes()))
            .unwrap();
        written.push(path);
    }
    w.finish().unwrap().into_inner()
}

struct OneTicket;

impl TssTransport for OneTicket {
    fn request(&mut self, _xml: &[u8]) -> Result<Vec<u8>, TssTransportError> {
        let int = |v| der::element(Tag::INTEGER, &der::encode_uint(v));
        let manp = der::property(
            *b"MANP",
            &der::element(Tag::SET, &der::property(*b"ECID", &int(5))),
        );
        let manb = der::property(*b"MANB", &der::element(Tag::SET, &manp));
        let ticket = der::constructed(
            Tag::SEQUENCE,
            &[
                &der::element(Tag::IA5_STRING, b"IM4M"),
                &int(0),
                &der::element(Tag::SET, &manb),
            ],
        );
        let mut d = Dictionary::new();
        d.insert("ApImg4Ticket".into(), Value::Data(ticket));
        let mut body = b"STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING=".to_vec();
        plist::to_writer_xml(&mut body, &Value::Dictionary(d)).unwrap();
        Ok(body)
    }
}

#[test]
fn personalizes_from_stored_and_deflated_entries() {
    let source = IpswSource::new(Ipsw::open(ipsw_bytes()).unwrap(), "UniversalMac_test.ipsw");
    let manifest = BuildManifest::from_bytes(&source.ipsw().build_manifest().unwrap()).unwrap();
    let id = manifest
        .select_boot_identity("j274ap", RestoreBehavior::Update)
        .unwrap();
    let params = TssParams::new(5, Some(vec![1; 32]), Some(vec![2; 20]));
    let mut p = Personalizer::new(source, id, OneTicket, params);
    for (component, path, tag) in [
        ("iBSS", "Firmware/dfu/iBSS.j274.RELEASE.im4p", *b"test"),
        (
            "RestoreLogo",
            "Firmware/all_flash/applelogo@1x~mac-USBc.im4p",
            *b"rlgo",
        ),
    ] {
        let image = p.personalize(component).unwrap();
        let parts = img4::parse_img4(&image).unwrap();
        let payload = im4p::parse(&image[parts.im4p.clone()]).unwrap();
        assert_eq!(payload.fourcc, tag, "{component}");
        assert_eq!(
            &image[parts.im4p.start..][payload.payload],
            path.repeat(40).as_bytes(),
            "{component}"
        );
    }

    // The one file left out is named, with the IPSW, before anything is sent.
    let e = p.check("RestoreDCP").unwrap_err().to_string();
    assert!(
        e.contains(SKIPPED) && e.contains("UniversalMac_test.ipsw"),
        "{e}"
    );
    assert!(p.check("iBEC").is_ok());
    assert!(matches!(
        p.source().read(SKIPPED),
        Err(SourceError::Missing { .. })
    ));
    assert!(!p.source().contains(SKIPPED).unwrap());
}

#[test]
fn plan_reads_the_manifest_from_an_ipsw() {
    let path = std::env::temp_dir().join(format!("macrescue-plan-{}.ipsw", std::process::id()));
    std::fs::write(&path, ipsw_bytes()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_restore-agent"))
        .args(["plan", "--ipsw"])
        .arg(&path)
        .args(["--board", "j274ap", "--json"])
        .output()
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["identity"]["variant"], "Customer Software Update");
    assert_eq!(j["stages"]["dfu"][0]["component"], "iBSS");
    // The file left out of the IPSW is reported for both components made from it.
    let missing: Vec<(String, String)> = j["missing_from_ipsw"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["component"].as_str().unwrap().to_string(),
                m["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        missing.contains(&("RestoreDCP".into(), SKIPPED.into())),
        "{missing:?}"
    );
    assert!(
        missing.contains(&("Ap,RestoreDCP2".into(), SKIPPED.into())),
        "{missing:?}"
    );
    assert!(
        missing.contains(&("__RestoreVersion__".into(), "RestoreVersion.plist".into())),
        "{missing:?}"
    );
    assert!(
        !missing.iter().any(|(c, _)| c == "iBSS" || c == "iBEC"),
        "{missing:?}"
    );

    // Not a ZIP: the technician learns what is wrong with the file.
    let bad = std::env::temp_dir().join(format!("macrescue-plan-bad-{}.ipsw", std::process::id()));
    std::fs::write(&bad, b"<html>not found</html>").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_restore-agent"))
        .args(["plan", "--ipsw"])
        .arg(&bad)
        .args(["--board", "j274ap"])
        .output()
        .unwrap();
    std::fs::remove_file(&bad).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a ZIP archive"), "{err}");
}
