//! The `mac-sim` binary's offline subcommands.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mac-sim"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn boards_lists_fixture_boards() {
    let (ok, out, _) = run(&["boards"]);
    assert!(ok);
    assert!(
        out.lines()
            .any(|l| l.starts_with("j274ap ") && l.ends_with("CPID:8103 BDID:22")),
        "{out}"
    );
}

#[test]
fn describe_prints_descriptors_per_mode() {
    let (ok, out, _) = run(&[
        "describe", "--board", "j313ap", "--mode", "recovery", "--ecid", "0x10",
    ]);
    assert!(ok);
    assert!(
        out.starts_with("05ac:1281 Recovery (boot-stage 1)\n"),
        "{out}"
    );
    assert!(out.contains("string 4: SDOM:01 CPID:8103 CPRV:11 CPFM:03 SCEP:01 BDID:26 ECID:0000000000000010 IBFL:3D SRNM:["), "{out}");
    let (ok, out, _) = run(&["describe", "--board", "j274ap"]);
    assert!(ok);
    assert!(
        out.contains("device descriptor: 1201000200000040ac052712000002030401"),
        "{out}"
    );
    assert!(out.contains("SRTG:["));
    let (ok, out, _) = run(&["describe", "--board", "j274ap", "--mode", "portdfu"]);
    assert!(ok && out.starts_with("05ac:f014"), "{out}");
}

#[test]
fn bad_input_explains_itself() {
    let (ok, _, err) = run(&["describe", "--board", "j999ap"]);
    assert!(!ok);
    assert!(err.contains("known boards"), "{err}");
    let (ok, _, err) = run(&["usbip", "--board", "j274ap", "--fault", "explode"]);
    assert!(!ok);
    assert!(err.contains("unknown fault"), "{err}");
    let (ok, _, err) = run(&["describe", "--board", "j274ap", "--ecid", "xyz"]);
    assert!(!ok);
    assert!(err.contains("not a hex number"), "{err}");
}

#[test]
fn make_bootchain_writes_images() {
    let dir = std::env::temp_dir().join(format!("mac-sim-cli-chain-{}", std::process::id()));
    let (ok, out, err) = run(&[
        "make-bootchain",
        "--board",
        "j274ap",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let first = out.lines().next().unwrap();
    assert!(first.ends_with("iBSS.img4"), "{out}");
    let ibss = std::fs::read(first).unwrap();
    let board = mac_sim::board::Board::load("j274ap").unwrap();
    assert_eq!(mac_sim::images::validate_ibss(&ibss, &board), Ok(()));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Regression: `mac-sim boards | head` panicked on the closed pipe ("failed printing to
/// stdout") instead of stopping quietly.
#[test]
fn boards_stops_quietly_when_the_reader_goes_away() {
    let (reader, writer) = std::io::pipe().unwrap();
    // The reader is gone before the first line is written: every write fails with EPIPE.
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mac-sim"))
        .arg("boards")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
