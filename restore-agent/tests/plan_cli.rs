//! `restore-agent plan` as a technician runs it: JSON shape, the TSS request with and without
//! the Mac's real ECID/nonces, the text output, and the refusals.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn shared() -> PathBuf {
    std::env::var_os("MACRESCUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")))
}

fn fixture(board: &str) -> String {
    shared()
        .join(format!(
            "fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests/{board}.BuildManifest.plist"
        ))
        .display()
        .to_string()
}

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_restore-agent"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap()
}

fn json(args: &[&str]) -> Value {
    let out = agent(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn json_plan_with_placeholder_tss_request() {
    let m = fixture("J274AP");
    let j = json(&["plan", "--manifest", &m, "--board", "J274AP", "--json"]);
    let id = &j["identity"];
    assert_eq!(id["variant"], "Customer Software Update");
    assert_eq!(id["restore_behavior"], "Update");
    assert_eq!(id["macos_variant"], Value::Null);
    assert_eq!(id["build"], "25C56");
    for stage in ["dfu", "stage1", "stage2"] {
        let list = j["stages"][stage].as_array().unwrap();
        assert!(!list.is_empty(), "{stage}");
        for c in list {
            assert!(c["component"].is_string(), "{stage}: {c}");
            assert!(
                c.get("path").is_some() && c.get("fourcc").is_some(),
                "{stage}: {c}"
            );
        }
    }
    assert_eq!(j["stages"]["dfu"][0]["component"], "iBSS");
    assert_eq!(
        j["stages"]["dfu"][0]["path"],
        "Firmware/dfu/iBSS.j274.RELEASE.im4p"
    );
    assert_eq!(j["stages"]["dfu"][0]["fourcc"], "ibss");
    let last = j["stages"]["stage1"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["component"], "iBEC");

    let r = &j["tss_request"];
    assert_eq!(r["ApECID"], 0);
    assert_eq!(r["ApNonce"], "00".repeat(32));
    assert_eq!(r["SepNonce"], "00".repeat(20));
    assert_eq!(r["ApChipID"], 0x8103);
    assert_eq!(r["ApBoardID"], 0x22);
    assert_eq!(r["@ApImg4Ticket"], true);
    assert_eq!(r["@HostPlatformInfo"], "mac");
    assert!(r["iBSS"]["Digest"].is_string(), "{}", r["iBSS"]);
    assert_eq!(r["iBSS"]["EPRO"], true);
    assert_eq!(
        j["tss_placeholders"],
        serde_json::json!(["ecid", "ap_nonce", "sep_nonce", "uuid"])
    );
}

#[test]
fn real_ecid_and_nonces_go_into_the_request() {
    let m = fixture("J313AP");
    let ap = "11".repeat(32);
    let sep = "22".repeat(20);
    let j = json(&[
        "plan",
        "--manifest",
        &m,
        "--board",
        "j313ap",
        "--ecid",
        "0x001C2B3A4D5E6F70",
        "--ap-nonce",
        &ap,
        "--sep-nonce",
        &sep,
        "--json",
    ]);
    let r = &j["tss_request"];
    assert_eq!(r["ApECID"], 0x001c_2b3a_4d5e_6f70u64);
    assert_eq!(r["ApNonce"], ap);
    assert_eq!(r["SepNonce"], sep);
    assert_eq!(j["tss_placeholders"], serde_json::json!(["uuid"]));
}

#[test]
fn text_plan_says_what_is_a_placeholder() {
    let m = fixture("J704AP");
    let out = agent(&["plan", "--manifest", &m, "--board", "j704ap"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("identity #1: \"Customer Software Update\""),
        "{text}"
    );
    assert!(text.contains("DFU (SecureROM):"), "{text}");
    assert!(
        text.contains("Firmware/dfu/iBEC.j704.RELEASE.im4p"),
        "{text}"
    );
    assert!(text.contains("[local-policy ticket]"), "{text}");
    assert!(
        text.contains("placeholder ecid, ap_nonce, sep_nonce"),
        "{text}"
    );
    assert!(text.contains("component entries"), "{text}");
}

#[test]
fn erase_on_a_software_update_says_a_full_ipsw_is_needed() {
    let m = fixture("J274AP");
    let out = agent(&["plan", "--manifest", &m, "--board", "j274ap", "--erase"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("full restore IPSW"), "{err}");
}

#[test]
fn bad_arguments_are_refused_with_a_reason() {
    let m = fixture("J274AP");
    let out = agent(&[
        "plan",
        "--manifest",
        &m,
        "--board",
        "j274ap",
        "--ap-nonce",
        "xyz",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not hex"));
    let out = agent(&["plan", "--manifest", &m, "--board", "j999ap"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("j274ap"));
    let out = agent(&["plan", "--board", "j274ap"]);
    assert!(!out.status.success(), "--ipsw or --manifest is required");
}
