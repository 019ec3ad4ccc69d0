//! The whole boot chain with the simulated iBoot proper and personalized IMG4 images:
//! DFU (iBSS) → stage 1 (§3.3) → `go` → stage 2 (§3.4) → `bootx` → restore mode.

mod common;

use common::{setup, Host, ECID};
use mac_sim::board::Board;
use mac_sim::descriptors::UsbMode;
use mac_sim::device::{SimMac, Timing};
use mac_sim::faults::{Faults, StartMode};
use mac_sim::images;
use mac_sim::wire::{LinkChange, Reply};

const BOOT_ARGS: &str = "rd=md0 nand-enable-reformat=1 -progress -restore";

fn real_mac(board: &Board, faults: Faults) -> Host {
    Host::with(SimMac::new(
        board.clone(),
        ECID,
        StartMode::Dfu,
        faults,
        Timing::fast(),
    ))
}

struct Chain(Vec<(String, Vec<u8>)>);

impl Chain {
    fn get(&self, name: &str) -> &[u8] {
        &self.0.iter().find(|(n, _)| n == name).unwrap().1
    }
}

fn send(h: &mut Host, image: &[u8], cmd: &str) {
    h.upload(image);
    assert_eq!(h.command(cmd, 0), Reply::Ack(vec![]), "{cmd}");
    assert_eq!(h.getret(), 0, "{cmd} failed");
}

fn dfu_to_stage1(h: &mut Host, chain: &Chain) {
    let st = h.dfu_upload(chain.get("iBSS"), 0x800, true);
    assert_eq!(st.last().unwrap()[4], 8, "{st:?}");
    h.reset();
    assert_eq!(h.take_link(), [LinkChange::Detach]);
    assert_eq!(h.advance(30), [LinkChange::Attach]);
    assert_eq!(h.mac.mode(), UsbMode::Recovery(1));
    assert_eq!(h.set_configuration(1), Reply::Ack(vec![]));
}

fn stage1_until_go(h: &mut Host, board: &Board, chain: &Chain) {
    send(h, chain.get("Ap,LocalPolicy"), "lpolrestore");
    assert_eq!(h.getenv("boot-stage"), "1");
    for c in images::stage1_components(board) {
        send(h, chain.get(&c.name), "firmware");
    }
    for cmd in [
        "setenv auto-boot false".to_string(),
        "saveenv".into(),
        format!("setenvnp boot-args {BOOT_ARGS}"),
    ] {
        assert_eq!(h.command(&cmd, 0), Reply::Ack(vec![]));
    }
    send(h, chain.get("RestoreLogo"), "setpicture 4");
    h.command("bgcolor 0 0 0", 0);
    h.upload(chain.get("iBEC"));
}

fn run_chain(board_config: &str) {
    let board = Board::load(board_config).unwrap();
    let chain = Chain(images::bootchain_images(&board, ECID));
    let mut h = real_mac(&board, Faults::default());
    dfu_to_stage1(&mut h, &chain);
    stage1_until_go(&mut h, &board, &chain);
    assert_eq!(h.command("go", 1), Reply::Ack(vec![]));
    assert_eq!(h.take_link(), [LinkChange::Detach], "{board_config}");
    assert_eq!(h.advance(30), [LinkChange::Attach]);
    assert_eq!(h.mac.mode(), UsbMode::Recovery(2));
    h.set_configuration(1);
    assert_eq!(h.getenv("boot-stage"), "2");
    h.command("setenv auto-boot false", 0);
    h.command("saveenv", 0);
    send(&mut h, chain.get("RestoreLogo"), "setpicture 4");
    for c in images::stage2_components(&board) {
        send(&mut h, chain.get(&c.name), "firmware");
    }
    send(&mut h, chain.get("RestoreRamDisk"), "ramdisk");
    send(&mut h, chain.get("RestoreDeviceTree"), "devicetree");
    if board.component("RestoreSEP").is_some() {
        send(&mut h, chain.get("RestoreSEP"), "rsepfirmware");
    }
    h.upload(chain.get("RestoreKernelCache"));
    assert_eq!(h.control(setup(0x21, 1, 0, 0, 0), &[]), Reply::Ack(vec![]));
    h.command(&format!("setenv boot-args {BOOT_ARGS}"), 0);
    assert_eq!(h.command("bootx", 1), Reply::Ack(vec![]));
    assert_eq!(h.take_link(), [LinkChange::Detach]);
    assert_eq!(h.advance(40), [LinkChange::Attach]);
    assert_eq!(h.product_id(), 0x1901, "{board_config}");
}

#[test]
fn mac_mini_m1_boots_to_restore_mode() {
    run_chain("j274ap");
}

#[test]
fn macbook_pro_m2_pro_boots_to_restore_mode() {
    run_chain("j414sap");
}

#[test]
fn real_ibss_for_another_board_stays_in_dfu() {
    let board = Board::load("j274ap").unwrap();
    let other = Board::load("j313ap").unwrap();
    let chain = Chain(images::bootchain_images(&other, ECID));
    let mut h = real_mac(&board, Faults::default());
    let st = h.dfu_upload(chain.get("iBSS"), 0x800, true);
    assert_eq!(st.last().unwrap(), &[0x0a, 0, 0, 0, 10, 0]);
    h.reset();
    assert!(h.advance(200).is_empty());
    // iBEC is not an iBSS either.
    let chain = Chain(images::bootchain_images(&board, ECID));
    let st = h.dfu_upload(chain.get("iBEC"), 0x800, true);
    assert_eq!(st.last().unwrap()[4], 10);
}

#[test]
fn ibec_for_another_ecid_is_refused_and_ibss_keeps_answering() {
    let board = Board::load("j274ap").unwrap();
    let chain = Chain(images::bootchain_images(&board, ECID));
    let foreign = Chain(images::bootchain_images(&board, ECID + 1));
    let mut h = real_mac(&board, Faults::default());
    dfu_to_stage1(&mut h, &chain);
    stage1_until_go(&mut h, &board, &chain);
    h.upload(foreign.get("iBEC"));
    assert_eq!(h.command("go", 1), Reply::Ack(vec![]));
    assert_eq!(h.getret(), 1);
    assert!(h.advance(100).is_empty(), "a refused go does not reboot");
    assert_eq!(h.mac.mode(), UsbMode::Recovery(1));
    // The right iBEC still works.
    h.upload(chain.get("iBEC"));
    h.command("go", 1);
    assert_eq!(h.take_link(), [LinkChange::Detach]);
}
