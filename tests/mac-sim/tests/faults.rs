//! Every fault knob, driven through raw transfers.

mod common;

use common::{ibss, setup, Host};
use mac_sim::descriptors::UsbMode;
use mac_sim::faults::{Faults, Stage, StartMode};
use mac_sim::wire::{LinkChange, Reply, SimDevice};

fn faults(specs: &[&str]) -> Faults {
    Faults::from_specs(specs).unwrap()
}

/// The Mac dropped off the bus and never came back.
fn assert_gone(h: &mut Host) {
    assert_eq!(h.take_link(), [LinkChange::Detach]);
    assert!(
        h.advance(1000).is_empty(),
        "a pulled cable does not re-attach"
    );
    assert!(!h.mac.attached());
}

#[test]
fn disconnect_at_dfu() {
    let mut h = Host::new(StartMode::Dfu, faults(&["disconnect-at=dfu"]));
    // Enumeration still works: the fault hits the first DFU request.
    assert!(h.serial().contains("SRTG"));
    assert_eq!(h.control(setup(0xa1, 5, 0, 0, 1), &[]), Reply::Stall);
    assert_gone(&mut h);
}

#[test]
fn disconnect_at_stage1() {
    let mut h = Host::new(StartMode::Dfu, faults(&["disconnect-at=stage1"]));
    h.boot_to_stage1();
    assert_eq!(h.command("getenv boot-stage", 0), Reply::Stall);
    assert_gone(&mut h);
}

#[test]
fn disconnect_at_stage1_on_bulk_too() {
    let mut h = Host::new(StartMode::Recovery, faults(&["disconnect-at=stage1"]));
    h.set_configuration(1);
    assert_eq!(h.bulk_out(0x04, &[0; 512]), Reply::Stall);
    assert_gone(&mut h);
}

#[test]
fn disconnect_at_stage2() {
    let mut h = Host::new(StartMode::Dfu, faults(&["disconnect-at=stage2"]));
    h.boot_to_stage1();
    // Stage 1 is untouched by the fault.
    assert_eq!(h.command("setenv auto-boot false", 0), Reply::Ack(vec![]));
    h.upload(b"iBEC");
    assert_eq!(h.command("go", 1), Reply::Ack(vec![]));
    h.advance(30);
    h.take_link();
    assert_eq!(h.mac.mode(), UsbMode::Recovery(2));
    h.set_configuration(1);
    assert_eq!(h.command("setenv auto-boot false", 0), Reply::Stall);
    assert_gone(&mut h);
}

#[test]
fn disconnect_after_bootx() {
    let mut h = Host::new(StartMode::Dfu, faults(&["disconnect-at=bootx"]));
    h.boot_to_stage2();
    h.upload(b"kernelcache");
    assert_eq!(h.command("bootx", 1), Reply::Ack(vec![]));
    assert_gone(&mut h);
    assert_ne!(h.mac.mode(), UsbMode::Restore);
}

#[test]
fn disconnect_after_bytes_in_dfu() {
    let mut h = Host::new(StartMode::Dfu, faults(&["disconnect-after-bytes=3000"]));
    assert_eq!(h.dnload(0, &[1; 0x800]), Reply::Ack(vec![]));
    assert_eq!(h.dfu_status()[4], 5);
    assert_eq!(h.dnload(1, &[1; 0x800]), Reply::Stall);
    assert_gone(&mut h);
    assert_eq!(h.mac.received_bytes(), 0x800);
}

#[test]
fn disconnect_after_bytes_in_bulk() {
    let f = Faults {
        disconnect_after_bytes: Some(100_000),
        ..Faults::default()
    };
    let mut h = Host::new(StartMode::Recovery, f);
    h.set_configuration(1);
    assert_eq!(h.control(setup(0x41, 0, 0, 0, 0), &[]), Reply::Ack(vec![]));
    for _ in 0..3 {
        assert_eq!(h.bulk_out(0x04, &[0; 0x8000]), Reply::Ack(vec![]));
    }
    assert_eq!(h.bulk_out(0x04, &[0; 0x8000]), Reply::Stall);
    assert_gone(&mut h);
    // Exactly at the limit is still fine.
    let mut h = Host::new(
        StartMode::Recovery,
        faults(&["disconnect-after-bytes=65536"]),
    );
    h.set_configuration(1);
    assert_eq!(h.bulk_out(0x04, &[0; 0x8000]), Reply::Ack(vec![]));
    assert_eq!(h.bulk_out(0x04, &[0; 0x8000]), Reply::Ack(vec![]));
    assert_eq!(h.bulk_out(0x04, &[0]), Reply::Stall);
}

#[test]
fn stall_command() {
    let mut h = Host::new(
        StartMode::Recovery,
        faults(&["stall-command=setenv auto-boot"]),
    );
    h.set_configuration(1);
    assert_eq!(h.command("setenv auto-boot false", 0), Reply::Stall);
    assert_eq!(h.command("saveenv", 0), Reply::Ack(vec![]));
    // A stalled command is not a disconnect.
    assert!(h.take_link().is_empty());
    let mut h = Host::new(StartMode::Recovery, faults(&["stall-command=go"]));
    h.set_configuration(1);
    h.upload(b"iBEC");
    assert_eq!(h.command("go", 1), Reply::Stall);
    assert!(h.advance(100).is_empty(), "a stalled go does not boot iBEC");
}

#[test]
fn stall_dfu_get_status() {
    let mut h = Host::new(StartMode::Dfu, faults(&["stall-dfu=getstatus"]));
    assert_eq!(h.dfu_state(), 2);
    assert_eq!(h.dnload(0, &[0; 64]), Reply::Ack(vec![]));
    assert_eq!(h.control(setup(0xa1, 3, 0, 0, 6), &[]), Reply::Stall);
    assert_eq!(h.control(setup(0xa1, 3, 0, 0, 6), &[]), Reply::Stall);
    assert_eq!(
        h.dfu_state(),
        3,
        "still dfuDNLOAD-SYNC: GET_STATUS never got through"
    );
}

#[test]
fn start_modes() {
    let h = Host::new(StartMode::Dfu, faults(&["start=recovery"]));
    assert_eq!(h.product_id(), 0x1281);
    let h = Host::new(StartMode::Dfu, faults(&["start=portdfu"]));
    assert_eq!(h.product_id(), 0xf014);
    let h = Host::new(StartMode::Recovery, faults(&["start=dfu"]));
    assert_eq!(h.product_id(), 0x1227);
}

#[test]
fn change_nonce_on_boot() {
    let mut h = Host::new(StartMode::Dfu, faults(&["change-nonce"]));
    let before = h.string(1);
    h.boot_to_stage1();
    let after = h.string(1);
    assert_ne!(before, after);
    assert_eq!(after.len(), before.len());
    assert!(after.starts_with("NONC:") && after.contains(" SNON:"));
    h.upload(b"iBEC");
    h.command("go", 1);
    h.advance(30);
    assert_ne!(h.string(1), after, "a new nonce on every boot");
    // Deterministic per ECID and boot, so two identical runs agree.
    let mut h2 = Host::new(StartMode::Dfu, faults(&["change-nonce"]));
    h2.boot_to_stage1();
    assert_eq!(h2.string(1), after);
}

#[test]
fn refuse_ibss_keeps_the_mac_in_dfu() {
    let mut h = Host::new(StartMode::Dfu, faults(&["refuse-ibss"]));
    let st = h.dfu_upload(&ibss(true, 3000), 0x800, true);
    assert_eq!(st[2], [0x0a, 0, 0, 0, 10, 0]);
    h.reset();
    assert!(h.advance(500).is_empty());
    assert_eq!(h.product_id(), 0x1227);
    assert_eq!(h.dfu_state(), 2);
}

#[test]
fn crc_check_knob() {
    let img = ibss(true, 100);
    let mut data = img.clone();
    data.extend(mac_sim::dfu::SUFFIX_FIXED);
    data.extend([0xde, 0xad, 0xbe, 0xef]);
    let run = |f: Faults| {
        let mut h = Host::new(StartMode::Dfu, f);
        h.dnload(0, &data);
        h.dnload(1, &[]);
        h.dfu_status()
    };
    assert_eq!(run(Faults::default()), [0x07, 0, 0, 0, 10, 0]);
    assert_eq!(run(faults(&["no-crc-check"])), [0, 0, 0, 0, 7, 0]);
    assert_eq!(run(faults(&["crc-check=off"])), [0, 0, 0, 0, 7, 0]);
}

#[test]
fn struct_and_cli_agree() {
    assert_eq!(
        faults(&["disconnect-at=stage2"]).disconnect_at,
        Some(Stage::Stage2)
    );
}
