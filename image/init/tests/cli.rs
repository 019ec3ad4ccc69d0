//! The binary's two faces outside a booted image: refusing to run as anything but PID 1, and
//! answering as `/sbin/modprobe` for the kernel.

use std::os::unix::process::CommandExt;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_macrescue-init");

#[test]
fn refuses_to_run_unless_pid_1() {
    let out = Command::new(BIN).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("must run as PID 1"),
        "unexpected message: {err}"
    );
}

#[test]
fn as_modprobe_reports_a_module_that_is_not_in_the_image() {
    // A name no kernel has: nothing is loaded on the test host whatever its modules are.
    let name = "macrescue-test-no-such-module";
    let out = Command::new(BIN)
        .arg0("/sbin/modprobe")
        .args(["--", name])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("no module in this image provides \"{name}\"")),
        "unexpected message: {err}"
    );

    // -q, as the kernel's request_module() passes it, keeps the failure silent.
    let out = Command::new(BIN)
        .arg0("modprobe")
        .args(["-q", "--", name])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.is_empty());
}
