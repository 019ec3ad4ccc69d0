//! The real boot-chain driver (identity, DFU, iBoot recovery protocol, stage plans) against the
//! simulated Mac on the in-process bus: DFU → iBSS → stage 1 → iBEC → stage 2 → bootx →
//! restore mode, for many boards, and every fault knob of the simulator ending in a clear
//! result.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use mac_sim::board::Board;
use mac_sim::device::{SimMac, Timing};
use mac_sim::faults::{Faults, StartMode};
use mac_sim::images;
use restore_agent::bootchain::driver::{
    wait_for_device, BootchainError, Driver, DriverOptions, Outcome, Progress,
};
use restore_agent::bootchain::images::{ImageError, ImageProvider, PersonalizedDir};
use restore_agent::identity::{self, AppleMode};
use restore_agent::manifest::{BuildManifest, RestoreBehavior};
use restore_agent::usb::UsbBus;
use support::{fast_timeouts, manifest_path, SimUsb, TempDir};

const ECID: u64 = 0x001c_2b3a_4d5e_6f70;

struct Run {
    result: Result<Outcome, BootchainError>,
    progress: Vec<Progress>,
    usb: SimUsb,
}

/// An image source that records nonce changes (the TSS layer will refresh tickets there).
struct Recording {
    dir: PersonalizedDir,
    nonce_changes: usize,
}

impl ImageProvider for Recording {
    fn personalized(&mut self, component: &str) -> Result<Vec<u8>, ImageError> {
        self.dir.personalized(component)
    }
    fn nonces_changed(&mut self, ap: &[u8], sep: Option<&[u8]>) -> Result<(), ImageError> {
        self.nonce_changes += 1;
        self.dir.nonces_changed(ap, sep)
    }
}

fn images_for(board: &Board) -> TempDir {
    let dir = TempDir::new(&board.board_config);
    images::write_bootchain(board, dir.path()).unwrap();
    dir
}

/// Plug a simulated `board` Mac in (as `faults` say) and run the driver on it.
fn run_with(
    board_config: &str,
    faults: Faults,
    options: DriverOptions,
    prepare: impl FnOnce(&Path),
) -> (Run, usize) {
    let board = Board::load(board_config).unwrap();
    run_board(
        board,
        &manifest_path(board_config),
        faults,
        options,
        prepare,
    )
}

/// Like [`run_with`] for any simulated board and manifest file.
fn run_board(
    board: Board,
    manifest: &Path,
    faults: Faults,
    options: DriverOptions,
    prepare: impl FnOnce(&Path),
) -> (Run, usize) {
    let start = faults.start.unwrap_or(StartMode::Dfu);
    let dir = images_for(&board);
    prepare(dir.path());
    let usb = SimUsb::new();
    usb.plug(Box::new(SimMac::new(
        board,
        ECID,
        start,
        faults,
        Timing::fast(),
    )));
    let manifest = BuildManifest::from_path(manifest).unwrap();
    let device =
        wait_for_device(&usb, None, Duration::from_secs(2), identity::read_identity).unwrap();
    let mut images = Recording {
        dir: PersonalizedDir::new(dir.path()),
        nonce_changes: 0,
    };
    let mut progress = Vec::new();
    let mut record = |p: &Progress| progress.push(p.clone());
    let result = Driver::new(&usb, &mut images, &mut record, options).run(&device, &manifest);
    let changes = images.nonce_changes;
    (
        Run {
            result,
            progress,
            usb,
        },
        changes,
    )
}

fn options() -> DriverOptions {
    DriverOptions {
        wait_for_restore: true,
        timeouts: fast_timeouts(),
        ..DriverOptions::default()
    }
}

fn run(board: &str, faults: Faults) -> Run {
    run_with(board, faults, options(), |_| {}).0
}

fn uploads(progress: &[Progress]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for p in progress {
        if let Progress::Upload { component, .. } = p {
            if v.last() != Some(component) {
                v.push(component.clone());
            }
        }
    }
    v
}

#[test]
fn walks_a_mac_mini_from_dfu_to_restore_mode() {
    let r = run("j274ap", Faults::default());
    let outcome = r.result.expect("boot chain");
    assert_eq!(outcome.ecid, Some(ECID));
    assert_eq!(outcome.board, "j274ap");
    let restore = outcome.restore_device.expect("restore-mode device");
    assert_eq!(
        AppleMode::from_ids(restore.vendor_id, restore.product_id),
        Some(AppleMode::Restore)
    );
    // Everything the simulated Mac needed, in the order protocol.md §3.3/§3.4 gives.
    let sent = uploads(&r.progress);
    assert_eq!(sent.first().map(String::as_str), Some("iBSS"));
    assert_eq!(sent.get(1).map(String::as_str), Some("Ap,LocalPolicy"));
    let pos = |c: &str| sent.iter().position(|s| s == c).unwrap_or(usize::MAX);
    assert!(pos("Ap,RestoreCIO") < pos("RestoreLogo"));
    assert!(pos("RestoreLogo") < pos("iBEC"));
    assert!(pos("iBEC") < pos("RestoreRamDisk"));
    assert!(pos("RestoreRamDisk") < pos("RestoreDeviceTree"));
    assert!(pos("RestoreDeviceTree") < pos("RestoreSEP"));
    assert_eq!(sent.last().map(String::as_str), Some("RestoreKernelCache"));
    assert!(r.progress.contains(&Progress::BootxSent));
}

#[test]
fn walks_every_fixture_board() {
    for board in Board::fixture_boards().unwrap() {
        if board == "vma2macosap" {
            // Apple's macOS VM never sits on a USB cable.
            continue;
        }
        let r = run(&board, Faults::default());
        let outcome = r
            .result
            .unwrap_or_else(|e| panic!("{board}: boot chain failed: {e}"));
        assert_eq!(outcome.board, board);
        assert!(outcome.restore_device.is_some(), "{board}");
    }
}

#[test]
fn a_mac_in_recovery_is_told_to_enter_dfu() {
    let faults = Faults {
        start: Some(StartMode::Recovery),
        ..Faults::default()
    };
    let e = run("j274ap", faults).result.unwrap_err();
    assert!(matches!(e, BootchainError::InRecovery), "{e}");
    assert!(e.to_string().contains("Recovery, not DFU"), "{e}");
}

#[test]
fn a_mac_in_recovery_can_be_walked_when_allowed() {
    let faults = Faults {
        start: Some(StartMode::Recovery),
        ..Faults::default()
    };
    let opts = DriverOptions {
        allow_recovery_start: true,
        ..options()
    };
    let (r, _) = run_with("j274ap", faults, opts, |_| {});
    let outcome = r.result.expect("boot chain from Recovery");
    assert!(outcome.restore_device.is_some());
}

#[test]
fn port_dfu_is_named() {
    let faults = Faults {
        start: Some(StartMode::PortDfu),
        ..Faults::default()
    };
    let e = run("j773sap", faults).result.unwrap_err();
    assert!(matches!(e, BootchainError::PortDfu), "{e}");
}

#[test]
fn a_changed_ap_nonce_is_reported_to_the_image_source() {
    let faults = Faults {
        change_nonce_on_boot: true,
        ..Faults::default()
    };
    let (r, changes) = run_with("j274ap", faults, options(), |_| {});
    r.result.expect("boot chain");
    assert!(changes >= 1, "nonce changes seen: {changes}");
    assert!(r.progress.contains(&Progress::ApNonceChanged));
}

#[test]
fn unchanged_nonces_do_not_refresh_tickets() {
    let (r, changes) = run_with("j274ap", Faults::default(), options(), |_| {});
    r.result.expect("boot chain");
    assert_eq!(changes, 0);
}

#[test]
fn a_rejected_ibss_keeps_the_mac_in_dfu() {
    let faults = Faults {
        refuse_ibss: true,
        ..Faults::default()
    };
    let e = run("j274ap", faults).result.unwrap_err();
    // The ROM rejects the image and never leaves DFU: named, not a hang.
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            BootchainError::Dfu(_)
                | BootchainError::StillInDfu
                | BootchainError::DidNotLeave { .. }
        ),
        "{msg}"
    );
}

#[test]
fn an_ibss_for_another_board_is_rejected_by_the_rom() {
    let other = Board::load("j313ap").unwrap();
    let (r, _) = run_with("j274ap", Faults::default(), options(), |dir| {
        let tmp = TempDir::new("other");
        images::write_bootchain(&other, tmp.path()).unwrap();
        std::fs::copy(tmp.path().join("iBSS.img4"), dir.join("iBSS.img4")).unwrap();
    });
    let e = r.result.unwrap_err();
    assert!(
        matches!(
            e,
            BootchainError::Dfu(_)
                | BootchainError::StillInDfu
                | BootchainError::DidNotLeave { .. }
        ),
        "{e}"
    );
}

fn disconnect_at(stage: mac_sim::faults::Stage) -> BootchainError {
    let faults = Faults {
        disconnect_at: Some(stage),
        ..Faults::default()
    };
    run("j274ap", faults).result.unwrap_err()
}

#[test]
fn unplugged_in_dfu_is_a_named_error() {
    let e = disconnect_at(mac_sim::faults::Stage::Dfu);
    let msg = e.to_string();
    assert!(
        matches!(e, BootchainError::Transport { .. } | BootchainError::Dfu(_)),
        "{msg}"
    );
}

#[test]
fn unplugged_in_stage1_is_a_named_error() {
    let e = disconnect_at(mac_sim::faults::Stage::Stage1);
    assert!(
        matches!(
            e,
            BootchainError::Transport { .. } | BootchainError::Recovery(_)
        ),
        "{e}"
    );
}

#[test]
fn unplugged_in_stage2_is_a_named_error() {
    let e = disconnect_at(mac_sim::faults::Stage::Stage2);
    assert!(
        matches!(
            e,
            BootchainError::Transport { .. } | BootchainError::Recovery(_)
        ),
        "{e}"
    );
}

#[test]
fn unplugged_after_bootx_means_no_restore_mode() {
    // The Mac leaves after bootx but never comes back as a restore-mode device.
    let faults = Faults {
        disconnect_at: Some(mac_sim::faults::Stage::AfterBootx),
        ..Faults::default()
    };
    let r = run("j274ap", faults);
    match r.result {
        Err(BootchainError::NoRestoreMode(_)) => {}
        // The disconnect may hit while the restore-mode device first talks: also named.
        other => panic!("expected NoRestoreMode, got {other:?}"),
    }
}

#[test]
fn unplugged_mid_upload_is_a_named_error() {
    let faults = Faults {
        disconnect_after_bytes: Some(200_000),
        ..Faults::default()
    };
    let e = run("j274ap", faults).result.unwrap_err();
    assert!(
        matches!(
            e,
            BootchainError::Transport { .. } | BootchainError::Recovery(_) | BootchainError::Dfu(_)
        ),
        "{e}"
    );
}

#[test]
fn a_stalled_command_is_a_named_error() {
    let faults = Faults {
        stall_command: Some("lpolrestore".into()),
        ..Faults::default()
    };
    let e = run("j274ap", faults).result.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("lpolrestore"), "{msg}");
}

#[test]
fn a_missing_image_names_the_file() {
    let (r, _) = run_with("j274ap", Faults::default(), options(), |dir| {
        std::fs::remove_file(dir.join("RestoreSEP.img4")).unwrap();
    });
    let e = r.result.unwrap_err();
    assert!(e.to_string().contains("RestoreSEP"), "{e}");
}

#[test]
fn a_broken_kernel_cache_reboots_into_recovery_and_says_so() {
    let (r, _) = run_with("j274ap", Faults::default(), options(), |dir| {
        let p = dir.join("RestoreKernelCache.img4");
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n / 2] ^= 0xff;
        std::fs::write(&p, b).unwrap();
    });
    let e = r.result.unwrap_err();
    assert!(
        matches!(
            e,
            BootchainError::RebootedAfterBootx(_) | BootchainError::Recovery(_)
        ),
        "{e}"
    );
}

#[test]
fn erase_needs_an_erase_identity() {
    // The fixture manifests are software-update manifests: asking for an erase must say so.
    let opts = DriverOptions {
        behavior: RestoreBehavior::Erase,
        ..options()
    };
    let (r, _) = run_with("j274ap", Faults::default(), opts, |_| {});
    let e = r.result.unwrap_err();
    assert!(e.to_string().contains("erase"), "{e}");
    drop(r.usb);
}

#[test]
fn the_bus_sees_the_mac_in_restore_mode_afterwards() {
    let r = run("j313ap", Faults::default());
    r.result.expect("boot chain");
    let devices = r.usb.devices().unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(
        AppleMode::from_ids(devices[0].vendor_id, devices[0].product_id),
        Some(AppleMode::Restore)
    );
}

/// A Mac newer than macrescue's model table: CPID 0x8152 / BDID 0x30 are in no table row.
fn unknown_mac() -> Board {
    let mut board = Board::load("j274ap").unwrap();
    board.cpid = 0x8152;
    board.bdid = 0x30;
    board
}

/// The j274ap fixture manifest with its identities' chip and board IDs replaced.
fn manifest_with_ids(dir: &Path, cpid: &str, bdid: &str) -> PathBuf {
    let mut root = plist::Value::from_file(manifest_path("j274ap")).unwrap();
    let ids = root
        .as_dictionary_mut()
        .and_then(|d| d.get_mut("BuildIdentities"))
        .and_then(|v| v.as_array_mut())
        .unwrap();
    for id in ids.iter_mut().filter_map(|v| v.as_dictionary_mut()) {
        id.insert("ApChipID".into(), plist::Value::String(cpid.into()));
        id.insert("ApBoardID".into(), plist::Value::String(bdid.into()));
    }
    let path = dir.join("BuildManifest.plist");
    root.to_file_xml(&path).unwrap();
    path
}

#[test]
fn a_mac_newer_than_the_table_is_restored_from_a_manifest_that_lists_its_board() {
    let tmp = TempDir::new("unknown-mac");
    let manifest = manifest_with_ids(tmp.path(), "0x8152", "0x30");
    let (r, _) = run_board(
        unknown_mac(),
        &manifest,
        Faults::default(),
        options(),
        |_| {},
    );
    let outcome = r.result.expect("boot chain with the manifest fallback");
    assert_eq!(outcome.board, "j274ap");
    assert!(outcome.restore_device.is_some());
}

#[test]
fn a_mac_newer_than_the_table_without_a_matching_manifest_names_its_ids() {
    let tmp = TempDir::new("unknown-mac-nomatch");
    let manifest = manifest_with_ids(tmp.path(), "0x8103", "0x22");
    let (r, _) = run_board(
        unknown_mac(),
        &manifest,
        Faults::default(),
        options(),
        |_| {},
    );
    let e = r.result.unwrap_err().to_string();
    assert!(e.contains("8152") && e.contains("30"), "{e}");
}

#[test]
fn a_stalled_dfu_status_request_is_a_named_error() {
    let faults = Faults::from_specs(&["stall-dfu=getstatus"]).unwrap();
    let e = run("j274ap", faults).result.unwrap_err();
    assert!(
        matches!(e, BootchainError::Dfu(_) | BootchainError::Transport { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("stall"), "{e}");
}
