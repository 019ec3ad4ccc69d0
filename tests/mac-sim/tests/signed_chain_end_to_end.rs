//! make-ipsw → TSS request from the IPSW's manifest → the simulated TSS signs → images stitched
//! from the IPSW's IM4P files → the simulated Mac boots them from DFU to restore mode. And the
//! Mac refuses what a real one would: a ticket for another nonce, a tampered ticket.

mod common;
mod tss_request;

use std::fs::File;
use std::io::Read;

use common::{setup, Host, ECID};
use mac_sim::board::Board;
use mac_sim::descriptors::UsbMode;
use mac_sim::device::{SimMac, Timing};
use mac_sim::faults::{Faults, StartMode};
use mac_sim::images::{self, LOCAL_POLICY, LPOL_IM4P, RESTORE_REWRITES};
use mac_sim::img4::{self, FourCc};
use mac_sim::ipsw::{make_ipsw, with_fourcc, IpswOptions};
use mac_sim::services::tss::{TssConfig, TssService};
use mac_sim::wire::{LinkChange, Reply};
use plist::{Dictionary, Value};
use sha2::{Digest, Sha384};

const BOOT_ARGS: &str = "rd=md0 nand-enable-reformat=1 -progress -restore";

struct Ipsw {
    dir: std::path::PathBuf,
    zip: zip::ZipArchive<File>,
    manifest_path: std::path::PathBuf,
    identity: Dictionary,
}

fn ipsw(board: &str, tag: &str) -> Ipsw {
    let dir = std::env::temp_dir().join(format!("mac-sim-chain-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("test.ipsw");
    let mut opts = IpswOptions::new(board);
    opts.os_size = 4096;
    make_ipsw(&opts, &out).unwrap();
    let mut zip = zip::ZipArchive::new(File::open(&out).unwrap()).unwrap();
    let mut bm = Vec::new();
    zip.by_name("BuildManifest.plist")
        .unwrap()
        .read_to_end(&mut bm)
        .unwrap();
    let manifest_path = dir.join("BuildManifest.plist");
    std::fs::write(&manifest_path, &bm).unwrap();
    let m = Value::from_reader_xml(&bm[..]).unwrap();
    let identity = m.as_dictionary().unwrap()["BuildIdentities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_dictionary().unwrap().clone())
        .find(|i| i["Manifest"].as_dictionary().unwrap().contains_key("iBSS"))
        .unwrap();
    Ipsw {
        dir,
        zip,
        manifest_path,
        identity,
    }
}

impl Drop for Ipsw {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Ipsw {
    /// The IM4P a host sends for `name`: the file at Info.Path, 4CC rewritten for Restore*.
    fn im4p(&mut self, name: &str) -> Vec<u8> {
        let path = self.identity["Manifest"].as_dictionary().unwrap()[name]
            .as_dictionary()
            .unwrap()["Info"]
            .as_dictionary()
            .unwrap()["Path"]
            .as_string()
            .unwrap()
            .to_string();
        let mut data = Vec::new();
        self.zip
            .by_name(&path)
            .unwrap()
            .read_to_end(&mut data)
            .unwrap();
        match RESTORE_REWRITES.iter().find(|(n, _)| *n == name) {
            Some((_, cc)) => with_fourcc(&data, FourCc::parse(cc).unwrap()),
            None => data,
        }
    }
}

struct Chain(Vec<(String, Vec<u8>)>);

impl Chain {
    fn get(&self, name: &str) -> &[u8] {
        &self.0.iter().find(|(n, _)| n == name).unwrap().1
    }
}

/// Personalize the whole boot chain through the TSS for this Mac's ECID and nonce.
fn personalize(ipsw: &mut Ipsw, board: &Board, svc: &TssService, nonce: &[u8]) -> Chain {
    let req = tss_request::main_request(&ipsw.identity, ECID, nonce, true, false);
    let reply = svc.evaluate(&tss_request::xml(&req));
    assert_eq!(reply.status, 0, "{}", reply.message);
    let ticket = reply.ticket.unwrap();
    let nsih = Sha384::digest(&ticket).to_vec();
    let lp = tss_request::local_policy_request(&ipsw.identity, ECID, nonce, &nsih);
    let lp_reply = svc.evaluate(&tss_request::xml(&lp));
    assert_eq!(lp_reply.status, 0, "{}", lp_reply.message);
    let lp_ticket = lp_reply.ticket.unwrap();
    let mut out = Vec::new();
    for name in images::bootchain_names(board) {
        let img = if name == LOCAL_POLICY {
            img4::stitch(&LPOL_IM4P, &lp_ticket, None)
        } else {
            img4::stitch(&ipsw.im4p(&name), &ticket, None)
        };
        out.push((name, img));
    }
    Chain(out)
}

fn send(h: &mut Host, image: &[u8], cmd: &str) {
    h.upload(image);
    assert_eq!(h.command(cmd, 0), Reply::Ack(vec![]), "{cmd}");
    assert_eq!(h.getret(), 0, "{cmd} failed");
}

fn mac(board: &Board) -> Host {
    Host::with(SimMac::new(
        board.clone(),
        ECID,
        StartMode::Dfu,
        Faults::default(),
        Timing::fast(),
    ))
}

fn boot(board_config: &str) {
    let board = Board::load(board_config).unwrap();
    let mut ipsw = ipsw(board_config, board_config);
    let svc = TssService::new(TssConfig::from_files(&[&ipsw.manifest_path]).unwrap());
    let mut h = mac(&board);
    let nonce = h.mac.identity().ap_nonce.to_vec();
    let chain = personalize(&mut ipsw, &board, &svc, &nonce);
    // Every image verifies with the Mac's own check, bound to its ECID and nonce.
    for (name, img) in &chain.0 {
        images::verify_image_with_nonce(img, &board, Some(ECID), Some(&nonce), &[])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // DFU → stage 1.
    let st = h.dfu_upload(chain.get("iBSS"), 0x800, true);
    assert_eq!(st.last().unwrap()[4], 8, "{st:?}");
    h.reset();
    assert_eq!(h.take_link(), [LinkChange::Detach]);
    assert_eq!(h.advance(30), [LinkChange::Attach]);
    assert_eq!(h.mac.mode(), UsbMode::Recovery(1));
    h.set_configuration(1);
    send(&mut h, chain.get("Ap,LocalPolicy"), "lpolrestore");
    for c in images::stage1_components(&board) {
        send(&mut h, chain.get(&c.name), "firmware");
    }
    h.command("setenv auto-boot false", 0);
    h.command("saveenv", 0);
    h.command(&format!("setenvnp boot-args {BOOT_ARGS}"), 0);
    send(&mut h, chain.get("RestoreLogo"), "setpicture 4");
    h.upload(chain.get("iBEC"));
    assert_eq!(h.command("go", 1), Reply::Ack(vec![]));
    assert_eq!(h.take_link(), [LinkChange::Detach], "{board_config}");
    assert_eq!(h.advance(30), [LinkChange::Attach]);
    assert_eq!(h.mac.mode(), UsbMode::Recovery(2));
    // Stage 2 → restore mode.
    h.set_configuration(1);
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
fn tss_signed_chain_boots_a_mac_mini_m1() {
    boot("j274ap");
}

#[test]
fn tss_signed_chain_boots_a_macbook_pro_m2_pro() {
    boot("j414sap");
}

#[test]
fn the_rom_refuses_a_ticket_for_another_nonce_or_a_tampered_one() {
    let board = Board::load("j274ap").unwrap();
    let mut ipsw = ipsw("j274ap", "refuse");
    let svc = TssService::new(TssConfig::from_files(&[&ipsw.manifest_path]).unwrap());
    let mut h = mac(&board);
    let nonce = h.mac.identity().ap_nonce.to_vec();

    // Personalized for an earlier nonce: the ROM refuses it (DFU error state 10) and its
    // check says why.
    let stale = personalize(&mut ipsw, &board, &svc, &[0x77; 32]);
    let e =
        images::validate_ibss_for(stale.get("iBSS"), &board, Some(ECID), Some(&nonce)).unwrap_err();
    assert!(e.contains("nonce"), "{e}");
    let st = h.dfu_upload(stale.get("iBSS"), 0x800, true);
    assert_eq!(st.last().unwrap()[4], 10, "{st:?}");
    h.reset();
    assert!(h.advance(200).is_empty(), "a refused iBSS does not boot");

    // One byte of the ticket's signed part changed (the iBSS digest): signature fails.
    let good = personalize(&mut ipsw, &board, &svc, &nonce);
    let mut bad = good.get("iBSS").to_vec();
    let im4p = ipsw.im4p("iBSS");
    let dgst = Sha384::digest(&im4p);
    let pos = bad.windows(48).position(|w| w == &dgst[..]).unwrap();
    bad[pos + 5] ^= 0x10;
    let e = images::validate_ibss_for(&bad, &board, Some(ECID), Some(&nonce)).unwrap_err();
    assert!(e.contains("signature"), "{e}");
    // The payload changed instead: the digest check fails.
    let mut bad = good.get("iBSS").to_vec();
    let p = bad
        .windows(im4p.len())
        .position(|w| w == &im4p[..])
        .unwrap();
    let last = p + im4p.len() - 1;
    bad[last] ^= 1;
    let e = images::validate_ibss_for(&bad, &board, Some(ECID), Some(&nonce)).unwrap_err();
    assert!(e.contains("digest"), "{e}");
    // Another Mac's ECID.
    let e = images::validate_ibss_for(good.get("iBSS"), &board, Some(ECID + 1), Some(&nonce))
        .unwrap_err();
    assert!(e.contains("ECID"), "{e}");
    // And the good one boots.
    let st = h.dfu_upload(good.get("iBSS"), 0x800, true);
    assert_eq!(st.last().unwrap()[4], 8, "{st:?}");
}

#[test]
fn iboot_refuses_tickets_for_the_nonce_before_a_reboot() {
    let board = Board::load("j274ap").unwrap();
    let mut ipsw = ipsw("j274ap", "nonce");
    let svc = TssService::new(TssConfig::from_files(&[&ipsw.manifest_path]).unwrap());
    let faults = Faults {
        change_nonce_on_boot: true,
        ..Faults::default()
    };
    let mut h = Host::with(SimMac::new(
        board.clone(),
        ECID,
        StartMode::Dfu,
        faults,
        Timing::fast(),
    ));
    let dfu_nonce = h.mac.identity().ap_nonce.to_vec();
    let first = personalize(&mut ipsw, &board, &svc, &dfu_nonce);
    let st = h.dfu_upload(first.get("iBSS"), 0x800, true);
    assert_eq!(st.last().unwrap()[4], 8, "{st:?}");
    h.reset();
    h.take_link();
    assert_eq!(h.advance(30), [LinkChange::Attach]);
    assert_eq!(h.mac.mode(), UsbMode::Recovery(1));
    h.set_configuration(1);
    let new_nonce = h.mac.identity().ap_nonce.to_vec();
    assert_ne!(new_nonce, dfu_nonce);
    // The first ticket names the DFU nonce: iBSS refuses images personalized with it.
    h.upload(first.get("Ap,LocalPolicy"));
    assert_eq!(h.command("lpolrestore", 0), Reply::Ack(vec![]));
    assert_eq!(h.getret(), 1, "stale BNCH accepted");
    assert!(matches!(
        images::verify_image_with_nonce(
            first.get("Ap,LocalPolicy"),
            &board,
            Some(ECID),
            Some(&new_nonce),
            &[]
        ),
        Err(images::ImageError::Ticket(
            mac_sim::ticket::TicketError::NonceMismatch { .. }
        ))
    ));
    // Re-personalized for the new nonce (what a host does after iBSS): accepted.
    let second = personalize(&mut ipsw, &board, &svc, &new_nonce);
    send(&mut h, second.get("Ap,LocalPolicy"), "lpolrestore");
    for c in images::stage1_components(&board) {
        send(&mut h, second.get(&c.name), "firmware");
    }
}
