//! The `restore-agent` binary as a technician runs it: output, exit status, error wording.

use std::process::Command;

fn agent(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_restore-agent"))
        .args(args)
        // A shell with this left set must still get a one-line error, not a backtrace.
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run restore-agent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn identify_json_for_a_mac_mini() {
    let (code, out, _) = agent(&[
        "identify",
        "--json",
        "--serial",
        "CPID:8103 CPRV:11 CPFM:03 SCEP:01 BDID:22 ECID:001C2B3A4D5E6F70 IBFL:3C SRTG:[iBoot-8419.0.151.0.1]",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["product_type"], "Macmini9,1");
    assert_eq!(v["board_config"], "j274ap");
    assert_eq!(v["name"], "Mac mini (M1, 2020)");
    assert_eq!(v["cpid"], "0x8103");
    assert_eq!(v["bdid"], "0x22");
    assert_eq!(v["ecid"], "0x001c2b3a4d5e6f70");
}

#[test]
fn identify_says_when_it_is_not_a_mac_and_fails() {
    let (code, out, err) = agent(&["identify", "--serial", "CPID:8112 BDID:42 ECID:01"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("not a Mac") || err.contains("not a Mac"),
        "{out}\n{err}"
    );
    assert!(out.contains("Apple Vision Pro"), "{out}");
    assert!(!err.contains("backtrace"), "{err}");
}

#[test]
fn identify_names_an_unknown_chip_and_board() {
    let (code, out, err) = agent(&["identify", "--serial", "CPID:8152 BDID:30 ECID:01"]);
    assert_eq!(code, 1);
    let all = format!("{out}{err}");
    assert!(all.contains("0x8152") && all.contains("0x30"), "{all}");
    assert!(!all.contains("backtrace"), "{all}");
}

#[test]
fn errors_are_one_line_without_a_backtrace() {
    // Whatever the host's USB, a missing manifest fails cleanly before any USB access.
    let (code, _, err) = agent(&[
        "bootchain",
        "--manifest",
        "/nonexistent/BuildManifest.plist",
        "--images",
        "/nonexistent",
        "--wait",
        "1",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: ") || err.contains("\nerror: "),
        "{err}"
    );
    assert!(!err.contains("backtrace"), "{err}");
}
