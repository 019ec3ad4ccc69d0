//! iBSS uploads as libirecovery performs them, and the ROM's exact answers.

mod common;

use common::{ibss, setup, Host};
use mac_sim::descriptors::UsbMode;
use mac_sim::dfu::{suffix_for, DfuState};
use mac_sim::faults::{Faults, StartMode};
use mac_sim::wire::{LinkChange, Reply};

const DNLOAD_IDLE: [u8; 6] = [0, 0, 0, 0, 5, 0];

#[test]
fn valid_ibss_boots_stage1_with_a_new_serial() {
    let mut h = Host::new(StartMode::Dfu, Faults::default());
    let dfu_serial = h.serial();
    let dfu_nonces = h.string(1);
    // 3000 bytes: block 0 (0x800) + block 1 (952 + 16-byte suffix).
    let st = h.dfu_upload(&ibss(true, 3000), 0x800, true);
    assert_eq!(
        st,
        [
            DNLOAD_IDLE.to_vec(),
            DNLOAD_IDLE.to_vec(),
            vec![0, 0, 0, 0, 7, 0], // dfuMANIFEST
            vec![0, 0, 0, 0, 8, 0], // dfuMANIFEST-WAIT-RESET
        ]
    );
    assert!(h.take_link().is_empty(), "the ROM waits for the reset");
    h.reset();
    assert_eq!(h.take_link(), [LinkChange::Detach]);
    assert!(h.advance(10).is_empty());
    assert_eq!(h.advance(20), [LinkChange::Attach]);
    assert_eq!(h.product_id(), 0x1281);
    assert_eq!(h.mac.mode(), UsbMode::Recovery(1));
    let serial = h.serial();
    assert_ne!(serial, dfu_serial);
    assert!(!serial.contains("SRTG"), "{serial}");
    assert!(serial.contains("SRNM:["), "{serial}");
    assert_eq!(
        h.string(1),
        dfu_nonces,
        "nonces kept unless change-nonce is set"
    );
    assert_eq!(h.string(3), "Apple Mobile Device (Recovery Mode)");
}

#[test]
fn suffix_sent_alone_repeats_the_last_block_number() {
    let mut h = Host::new(StartMode::Dfu, Faults::default());
    // 0x800 + 0x7f8: last block + 16 > 0x800, so the suffix goes alone with wValue 1.
    let st = h.dfu_upload(&ibss(true, 0x800 + 0x7f8), 0x800, true);
    assert_eq!(st.len(), 5);
    assert!(st[..3].iter().all(|s| s == &DNLOAD_IDLE));
    h.reset();
    h.advance(30);
    assert_eq!(h.product_id(), 0x1281);
}

#[test]
fn invalid_ibss_leaves_the_mac_in_dfu() {
    let mut h = Host::new(StartMode::Dfu, Faults::default());
    let st = h.dfu_upload(&ibss(false, 3000), 0x800, true);
    // errFIRMWARE in dfuERROR, and it stays there.
    assert_eq!(st[2], [0x0a, 0, 0, 0, 10, 0]);
    assert_eq!(st[3], [0x0a, 0, 0, 0, 10, 0]);
    h.reset();
    assert!(h.advance(500).is_empty(), "no re-enumeration");
    assert_eq!(h.product_id(), 0x1227);
    assert!(h.serial().contains("SRTG:["));
    // After the reset the ROM takes a new upload.
    assert_eq!(h.dfu_state(), 2);
    h.dfu_upload(&ibss(true, 100), 0x800, true);
    h.reset();
    h.advance(30);
    assert_eq!(h.product_id(), 0x1281);
}

#[test]
fn default_image_check_rejects_junk() {
    // The real check (IMG4 with 4CC ibss) instead of the tests' GOOD prefix.
    let mac = mac_sim::device::SimMac::new(
        mac_sim::board::Board::load("j274ap").unwrap(),
        1,
        StartMode::Dfu,
        Faults::default(),
        mac_sim::device::Timing::fast(),
    );
    let mut h = Host::with(mac);
    let st = h.dfu_upload(&ibss(true, 500), 0x800, true);
    assert_eq!(st[1][4], 10);
}

#[test]
fn bad_crc_and_missing_suffix_are_rejected() {
    let mut h = Host::new(StartMode::Dfu, Faults::default());
    let img = ibss(true, 100);
    let mut data = img.clone();
    let mut s = suffix_for(&img);
    s[12] ^= 0xff;
    data.extend(s);
    assert_eq!(h.dnload(0, &data), Reply::Ack(vec![]));
    assert_eq!(h.dfu_status(), DNLOAD_IDLE);
    assert_eq!(h.dnload(1, &[]), Reply::Ack(vec![]));
    assert_eq!(h.dfu_status(), [0x07, 0, 0, 0, 10, 0], "errVERIFY");
    // libirecovery: state 10 → CLR_STATUS.
    assert_eq!(h.control(setup(0x21, 4, 0, 0, 0), &[]), Reply::Ack(vec![]));
    assert_eq!(h.dfu_state(), 2);
    let st = h.dfu_upload(&img, 0x800, false);
    assert_eq!(st[1], [0x02, 0, 0, 0, 10, 0], "errFILE without suffix");
}

#[test]
fn out_of_sequence_and_oversize_blocks_stall_into_dfu_error() {
    let mut h = Host::new(StartMode::Dfu, Faults::default());
    assert_eq!(h.dnload(1, &[0; 64]), Reply::Stall);
    assert_eq!(h.dfu_status(), [0x0f, 0, 0, 0, 10, 0]);
    assert_eq!(h.mac.dfu_state(), Some(DfuState::Error));
    let mut h = Host::new(StartMode::Dfu, Faults::default());
    assert_eq!(h.dnload(0, &vec![0; 0x801]), Reply::Stall);
    let mut h = Host::new(StartMode::Dfu, Faults::default());
    assert_eq!(h.dnload(0, &[0; 0x800]), Reply::Ack(vec![]));
    assert_eq!(h.dfu_status(), DNLOAD_IDLE);
    assert_eq!(h.dnload(0, &[0; 0x800]), Reply::Stall, "block 0 twice");
    // Manifest request with the wrong block count.
    let mut h = Host::new(StartMode::Dfu, Faults::default());
    h.dnload(0, &[0; 0x10]);
    assert_eq!(h.dnload(5, &[]), Reply::Stall);
    // ABORT from dfuIDLE is fine, UPLOAD is not supported.
    let mut h = Host::new(StartMode::Dfu, Faults::default());
    assert_eq!(h.control(setup(0x21, 6, 0, 0, 0), &[]), Reply::Ack(vec![]));
    assert_eq!(h.control(setup(0xa1, 2, 0, 0, 64), &[]), Reply::Stall);
    assert_eq!(h.dfu_state(), 10);
}

#[test]
fn manifested_image_boots_after_grace_without_reset() {
    // USB/IP front ends may not pass the reset on.
    let mut h = Host::new(StartMode::Dfu, Faults::default());
    h.dfu_upload(&ibss(true, 100), 0x800, true);
    assert!(h.advance(40).is_empty());
    assert_eq!(h.advance(20), [LinkChange::Detach]);
    assert_eq!(h.advance(30), [LinkChange::Attach]);
    assert_eq!(h.product_id(), 0x1281);
}

#[test]
fn port_dfu_takes_small_blocks_and_comes_back_as_dfu() {
    let mut h = Host::new(StartMode::PortDfu, Faults::default());
    let port_nonce = h.string(1);
    let fw: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
    assert_eq!(
        h.dnload(0, &[0; 0x41]),
        Reply::Stall,
        "Port DFU blocks are 64 bytes"
    );
    let mut h = Host::new(StartMode::PortDfu, Faults::default());
    let st = h.dfu_upload(&fw, 0x40, false);
    assert_eq!(st.len(), 16 + 2);
    assert!(st[..16].iter().all(|s| s == &DNLOAD_IDLE));
    assert_eq!(st[16][4], 7);
    h.reset();
    assert_eq!(h.take_link(), [LinkChange::Detach]);
    h.advance(30);
    assert_eq!(h.product_id(), 0x1227);
    assert!(h.serial().contains(" BDID:22 "));
    assert_ne!(
        h.string(1),
        port_nonce,
        "the SoC's nonce, not the port controller's"
    );
}
