//! DFU → iBSS (stage 1) → iBEC (stage 2) → restore OS, and the fall-backs, on a simulated clock
//! and on the in-process bus.

mod common;

use std::time::Duration;

use common::{ibss, new_mac, setup, Host};
use mac_sim::descriptors::UsbMode;
use mac_sim::faults::{Faults, StartMode};
use mac_sim::inproc::{BusEvent, SimBus};
use mac_sim::wire::{LinkChange, Reply, Setup, SimDevice};

#[test]
fn full_chain_to_restore_mode() {
    let mut h = Host::new(StartMode::Dfu, Faults::default());
    h.boot_to_stage1();
    assert_eq!(h.command("getenv boot-stage", 0), Reply::Ack(vec![]));
    assert_eq!(h.in_data(setup(0xc0, 0, 0, 0, 255)), b"1\0");
    h.upload(&vec![0x11; 0x8000 * 2 + 5]);
    assert_eq!(h.command("go", 1), Reply::Ack(vec![]));
    assert_eq!(h.take_link(), [LinkChange::Detach]);
    // While rebooting nothing answers.
    assert_eq!(
        h.mac.control(&setup(0x80, 6, 0x100, 0, 18), &[]),
        Reply::Stall
    );
    assert_eq!(h.advance(30), [LinkChange::Attach]);
    assert_eq!(h.mac.mode(), UsbMode::Recovery(2));
    assert_eq!(h.product_id(), 0x1281);
    assert!(!h.serial().contains("SRTG"));
    h.set_configuration(1);
    h.upload(b"kernelcache");
    assert_eq!(h.control(setup(0x21, 1, 0, 0, 0), &[]), Reply::Ack(vec![]));
    assert_eq!(h.command("bootx", 1), Reply::Ack(vec![]));
    assert_eq!(h.take_link(), [LinkChange::Detach]);
    assert!(
        h.advance(20).is_empty(),
        "restore OS takes longer than iBoot"
    );
    assert_eq!(h.advance(20), [LinkChange::Attach]);
    assert_eq!(h.product_id(), 0x1901);
    assert_eq!(h.mac.mode(), UsbMode::Restore);
    let Reply::Ack(config) = h.descriptor(2, 0, 0, 255) else {
        panic!()
    };
    assert_eq!(config[9..18], [9, 4, 0, 0, 2, 0xff, 0xfe, 0x02, 0]);
    h.set_configuration(1);
    // usbmux traffic is a later issue.
    assert_eq!(h.mac.bulk_in(0x85, 4096), Reply::Nak);
    assert_eq!(h.bulk_out(0x04, b"mux"), Reply::Stall);
    assert_eq!(h.mac.boots(), 3);
}

#[test]
fn failed_boot_falls_back_to_recovery() {
    let mut h = Host::new(StartMode::Dfu, Faults::default());
    h.boot_to_stage2();
    // bootx without images: iBoot reports BootFailed, the Mac comes back in Recovery.
    assert_eq!(h.command("bootx", 1), Reply::Ack(vec![]));
    assert_eq!(h.take_link(), [LinkChange::Detach]);
    assert_eq!(h.advance(30), [LinkChange::Attach]);
    assert_eq!(h.mac.mode(), UsbMode::Recovery(1));
    assert_eq!(h.product_id(), 0x1281);
}

#[test]
fn reboot_command_restarts_recovery() {
    let mut h = Host::new(StartMode::Recovery, Faults::default());
    h.set_configuration(1);
    assert_eq!(h.command("reboot", 1), Reply::Ack(vec![]));
    assert_eq!(h.take_link(), [LinkChange::Detach]);
    assert_eq!(h.advance(30), [LinkChange::Attach]);
    assert_eq!(h.mac.mode(), UsbMode::Recovery(1));
}

#[test]
fn recovery_bulk_needs_configuration_and_right_endpoint() {
    let mut h = Host::new(StartMode::Recovery, Faults::default());
    assert_eq!(h.bulk_out(0x04, b"x"), Reply::Stall, "not configured");
    h.set_configuration(1);
    assert_eq!(h.bulk_out(0x02, b"x"), Reply::Stall);
    assert_eq!(h.bulk_out(0x04, b"x"), Reply::Ack(vec![]));
    assert_eq!(h.mac.bulk_in(0x81, 4096), Reply::Ack(b"] ".to_vec()));
    assert_eq!(h.mac.bulk_in(0x82, 4096), Reply::Stall);
    assert_eq!(h.mac.received_bytes(), 1);
}

#[test]
fn default_iboot_answers_boot_stage() {
    // The simulated iBoot proper (not the tests' scripted one).
    let mac = mac_sim::device::SimMac::new(
        mac_sim::board::Board::load("j313ap").unwrap(),
        7,
        StartMode::Recovery,
        Faults::default(),
        mac_sim::device::Timing::fast(),
    );
    let mut h = Host::with(mac);
    h.set_configuration(1);
    assert_eq!(h.mac.env("boot-stage").as_deref(), Some("1"));
    assert_eq!(h.command("getenv boot-stage", 0), Reply::Ack(vec![]));
    let Reply::Ack(v) = h.control(setup(0xc0, 0, 0, 0, 255), &[]) else {
        panic!()
    };
    assert_eq!(v.split(|b| *b == 0).next().unwrap(), b"1");
}

fn attached(ev: &BusEvent, pid: u16) -> bool {
    matches!(ev, BusEvent::Attached { enumeration, .. } if enumeration.product_id == pid)
}

#[test]
fn chain_on_the_in_process_bus() {
    let bus = SimBus::new();
    let rx = bus.subscribe();
    let p1 = bus.plug(Box::new(new_mac(StartMode::Dfu, Faults::default())));
    let p2 = bus.plug(Box::new(new_mac(StartMode::Recovery, Faults::default())));
    let t = Duration::from_secs(5);
    assert!(SimBus::wait_for(&rx, t, |e| attached(e, 0x1227)).is_some());
    assert!(SimBus::wait_for(&rx, t, |e| attached(e, 0x1281)).is_some());

    let dnload = |block: u16, data: &[u8]| {
        bus.control(
            p1,
            &Setup {
                request_type: 0x21,
                request: 1,
                value: block,
                index: 0,
                length: data.len() as u16,
            },
            data,
        )
        .unwrap()
    };
    let img = ibss(true, 200);
    let mut data = img.clone();
    data.extend(mac_sim::dfu::suffix_for(&img));
    assert_eq!(dnload(0, &data), Reply::Ack(vec![]));
    assert_eq!(dnload(1, &[]), Reply::Ack(vec![]));
    bus.reset(p1).unwrap();
    assert_eq!(
        SimBus::wait_for(&rx, t, |_| true),
        Some(BusEvent::Detached { port: p1 })
    );
    assert!(matches!(
        bus.reset(p1),
        Err(mac_sim::inproc::BusError::Gone(1))
    ));
    let ev = SimBus::wait_for(&rx, t, |_| true).unwrap();
    assert!(attached(&ev, 0x1281), "{ev:?}");
    assert_eq!(bus.attached().len(), 2);
    // The other Mac is untouched.
    assert_eq!(bus.enumeration(p2).unwrap().product_id, 0x1281);
}

#[test]
fn pulled_cable_on_the_bus_is_gone_for_good() {
    let bus = SimBus::new();
    let rx = bus.subscribe();
    let f = Faults::from_specs(&["disconnect-at=dfu"]).unwrap();
    let p = bus.plug(Box::new(new_mac(StartMode::Dfu, f)));
    let t = Duration::from_secs(5);
    assert!(SimBus::wait_for(&rx, t, |e| attached(e, 0x1227)).is_some());
    let get_state = setup(0xa1, 5, 0, 0, 1);
    assert_eq!(bus.control(p, &get_state, &[]), Ok(Reply::Stall));
    assert_eq!(
        SimBus::wait_for(&rx, t, |_| true),
        Some(BusEvent::Detached { port: p })
    );
    assert_eq!(
        bus.control(p, &get_state, &[]),
        Err(mac_sim::inproc::BusError::Gone(p))
    );
    assert_eq!(
        SimBus::wait_for(&rx, Duration::from_millis(200), |_| true),
        None
    );
    assert!(bus.attached().is_empty());
}
