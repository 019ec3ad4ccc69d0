//! Drive the simulated iBSS/iBEC the way a host does (protocol.md §3.1–§3.4): raw setup packets
//! on EP0, file uploads on bulk OUT 0x04, console on bulk IN 0x81. Images come from
//! `write_bootchain`, read back from disk like a host would.

use std::collections::HashMap;
use std::path::PathBuf;

use mac_sim::board::Board;
use mac_sim::faults::Faults;
use mac_sim::iboot::{Iboot, IbootEvent, IbootStage, RET_ERROR, RET_OK};
use mac_sim::images::{self, write_bootchain};
use mac_sim::wire::{Reply, Setup};

/// The host side, written from §3 independently of `iboot.rs`.
struct Host {
    dev: Iboot,
    /// Every event the device reported, in order.
    events: Vec<IbootEvent>,
}

fn setup(bytes: [u8; 8]) -> Setup {
    Setup::from_bytes(bytes)
}

impl Host {
    fn new(dev: Iboot) -> Self {
        Host {
            dev,
            events: Vec::new(),
        }
    }

    fn control(&mut self, s: Setup, data: &[u8]) -> Reply {
        let (reply, ev) = self.dev.control(&s, data);
        self.events.extend(ev);
        reply
    }

    /// `40/bReq 0 0 len` with the command and its NUL.
    fn command_raw(&mut self, b_request: u8, cmd: &str) -> Reply {
        let mut data = cmd.as_bytes().to_vec();
        data.push(0);
        let len = (data.len() as u16).to_le_bytes();
        self.control(setup([0x40, b_request, 0, 0, 0, 0, len[0], len[1]]), &data)
    }

    fn command(&mut self, cmd: &str) {
        let b_request = match cmd {
            "go" | "bootx" | "reset" => 1,
            _ => 0,
        };
        assert_eq!(
            self.command_raw(b_request, cmd),
            Reply::Ack(vec![]),
            "{cmd}"
        );
    }

    /// `C0/00 0 0 255`.
    fn read_reply(&mut self) -> Vec<u8> {
        match self.control(setup([0xC0, 0, 0, 0, 0, 0, 0xFF, 0]), &[]) {
            Reply::Ack(d) => d,
            other => panic!("C0/00 answered {other:?}"),
        }
    }

    fn getenv(&mut self, name: &str) -> String {
        self.command(&format!("getenv {name}"));
        let r = self.read_reply();
        let nul = r.iter().position(|&b| b == 0).expect("NUL-terminated");
        String::from_utf8(r[..nul].to_vec()).unwrap()
    }

    fn getret(&mut self) -> u8 {
        self.read_reply()[0]
    }

    /// `41/00`, 0x8000-byte chunks on 0x04, ZLP when the length is a multiple of 512.
    fn upload_with(&mut self, data: &[u8], chunk: usize, zlp: bool) {
        let r = self.control(setup([0x41, 0, 0, 0, 0, 0, 0, 0]), &[]);
        assert_eq!(r, Reply::Ack(vec![]));
        for c in data.chunks(chunk) {
            let (r, ev) = self.dev.bulk_out(0x04, c);
            assert_eq!(r, Reply::Ack(vec![]));
            assert!(ev.is_none());
        }
        if zlp {
            let (r, _) = self.dev.bulk_out(0x04, &[]);
            assert_eq!(r, Reply::Ack(vec![]));
        }
    }

    fn upload(&mut self, data: &[u8]) {
        self.upload_with(data, 0x8000, data.len() % 512 == 0);
    }

    fn console(&mut self) -> String {
        let mut out = Vec::new();
        loop {
            match self.dev.bulk_in(0x81, 4096) {
                Reply::Ack(d) => {
                    assert!(d.len() <= 4096);
                    out.extend(d)
                }
                Reply::Nak => break,
                Reply::Stall => panic!("console stalled"),
            }
        }
        String::from_utf8(out).unwrap()
    }
}

struct Chain {
    board: Board,
    files: HashMap<String, Vec<u8>>,
    order: Vec<String>,
}

impl Chain {
    fn get(&self, name: &str) -> &[u8] {
        self.files
            .get(name)
            .unwrap_or_else(|| panic!("no {name}.img4"))
    }
}

fn chain(board: &str, tag: &str) -> Chain {
    let b = Board::load(board).unwrap();
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "mac-sim-iboot-{}-{board}-{tag}",
        std::process::id()
    ));
    let paths = write_bootchain(&b, &dir).unwrap();
    let mut files = HashMap::new();
    let mut order = Vec::new();
    for p in &paths {
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        files.insert(name.clone(), std::fs::read(p).unwrap());
        order.push(name);
    }
    std::fs::remove_dir_all(&dir).unwrap();
    Chain {
        board: b,
        files,
        order,
    }
}

const BOOT_ARGS: &str = "rd=md0 nand-enable-reformat=1 -progress -restore";

fn stage1(c: &Chain) -> Host {
    Host::new(Iboot::new(IbootStage::Stage1, &c.board, &Faults::default()))
}

fn stage2(c: &Chain) -> Host {
    Host::new(Iboot::new(IbootStage::Stage2, &c.board, &Faults::default()))
}

/// §3.3 steps 2–9 (everything before `go`).
fn stage1_until_go(h: &mut Host, c: &Chain) {
    h.upload(c.get("Ap,LocalPolicy"));
    h.command("lpolrestore");
    assert_eq!(h.getret(), RET_OK);
    assert_eq!(h.getenv("boot-stage"), "1");
    for comp in images::stage1_components(&c.board) {
        h.upload(c.get(&comp.name));
        h.command("firmware");
        assert_eq!(h.getret(), RET_OK, "{}: {}", comp.name, h.console());
    }
    h.command("setenv auto-boot false");
    h.command("saveenv");
    h.command(&format!("setenvnp boot-args {BOOT_ARGS}"));
    h.upload(c.get("RestoreLogo"));
    h.command("setpicture 4");
    assert_eq!(h.getret(), RET_OK);
    h.command("bgcolor 0 0 0");
    h.upload(c.get("iBEC"));
}

/// §3.4 steps 2–10 (everything before `bootx`).
fn stage2_until_bootx(h: &mut Host, c: &Chain) {
    assert_eq!(h.getenv("build-version"), mac_sim::iboot::BUILD_VERSION);
    assert_eq!(h.getenv("build-style"), "RELEASE");
    assert_eq!(h.getenv("boot-stage"), "2");
    assert_eq!(h.getenv("radio-error"), "0");
    h.command("setenv auto-boot false");
    h.command("saveenv");
    h.upload(c.get("RestoreLogo"));
    h.command("setpicture 4");
    h.command("bgcolor 0 0 0");
    for comp in images::stage2_components(&c.board) {
        h.upload(c.get(&comp.name));
        h.command("firmware");
        assert_eq!(h.getret(), RET_OK, "{}: {}", comp.name, h.console());
    }
    assert_eq!(h.getenv("ramdisk-size"), "0x40000000");
    h.upload(c.get("RestoreRamDisk"));
    h.command("getenv ramdisk-delay");
    h.command("ramdisk");
    assert_eq!(h.getret(), RET_OK, "{}", h.console());
    h.upload(c.get("RestoreDeviceTree"));
    h.command("devicetree");
    assert_eq!(h.getret(), RET_OK, "{}", h.console());
    if c.board.component("RestoreSEP").is_some() {
        h.upload(c.get("RestoreSEP"));
        h.command("rsepfirmware");
        assert_eq!(h.getret(), RET_OK, "{}", h.console());
    }
    h.upload(c.get("RestoreKernelCache"));
    assert_eq!(
        h.control(setup([0x21, 1, 0, 0, 0, 0, 0, 0]), &[]),
        Reply::Ack(vec![])
    );
    h.command(&format!("setenv boot-args {BOOT_ARGS}"));
}

fn full_sequence(board: &str) {
    let c = chain(board, "full");
    // Files come in host order, starting with iBSS and the local policy.
    assert_eq!(c.order[..2], ["iBSS", "Ap,LocalPolicy"]);
    assert!(images::validate_ibss(c.get("iBSS"), &c.board).is_ok());

    let mut h = stage1(&c);
    stage1_until_go(&mut h, &c);
    assert!(h.events.is_empty());
    assert!(h.dev.local_policy_loaded());
    let loaded: Vec<String> = h.dev.loaded_firmware().map(str::to_string).collect();
    let mut want: Vec<String> = images::stage1_components(&c.board)
        .iter()
        .map(|c| c.name.clone())
        .collect();
    want.sort();
    assert_eq!(loaded, want);
    assert_eq!(h.dev.env("auto-boot"), Some("false"));
    assert_eq!(h.dev.saved_env("auto-boot"), Some("false"));
    assert_eq!(h.dev.env("boot-args"), Some(BOOT_ARGS));
    assert_eq!(h.dev.saved_env("boot-args"), Some(""));
    assert_eq!(h.dev.display().1, Some((0, 0, 0)));
    assert_eq!(h.dev.display().0.unwrap().to_string(), "rlgo");
    h.command("go");
    assert_eq!(h.events, [IbootEvent::JumpToNextStage]);
    // iBSS has handed over: nothing answers any more.
    assert_eq!(h.command_raw(0, "getenv boot-stage"), Reply::Stall);

    let mut h = stage2(&c);
    stage2_until_bootx(&mut h, &c);
    assert!(h.events.is_empty(), "{:?}", h.events);
    let has_sep = c.board.component("RestoreSEP").is_some();
    assert_eq!(h.dev.restore_images(), (true, true, has_sep));
    h.command("bootx");
    let console = h.console();
    assert_eq!(h.events, [IbootEvent::BootRestoreOs], "{console}");
    assert_eq!(h.dev.env("boot-args"), Some(BOOT_ARGS));
}

#[test]
fn full_restore_sequence_j274ap() {
    full_sequence("j274ap");
}

#[test]
fn full_restore_sequence_j414sap_with_iboot_data_stage1() {
    let c = chain("j414sap", "names");
    assert!(c.order.contains(&"iBootDataStage1".to_string()));
    full_sequence("j414sap");
}

#[test]
fn full_restore_sequence_on_every_fixture_board() {
    for b in Board::fixture_boards().unwrap() {
        full_sequence(&b);
    }
}

#[test]
fn go_without_local_policy_fails() {
    let c = chain("j274ap", "nolpol");
    let mut h = stage1(&c);
    for comp in images::stage1_components(&c.board) {
        h.upload(c.get(&comp.name));
        h.command("firmware");
    }
    h.upload(c.get("iBEC"));
    h.command("go");
    let IbootEvent::BootFailed(why) = &h.events[0] else {
        panic!("{:?}", h.events)
    };
    assert!(why.contains("no local policy"), "{why}");
    assert_eq!(h.getret(), RET_ERROR);
    assert!(h.console().contains("iBEC will not start"));
    // iBSS is still alive and answering.
    assert_eq!(h.getenv("boot-stage"), "1");
}

#[test]
fn go_without_stage1_firmware_fails() {
    let c = chain("j414sap", "nofw");
    let mut h = stage1(&c);
    h.upload(c.get("Ap,LocalPolicy"));
    h.command("lpolrestore");
    h.upload(c.get("Ap,RestoreCIO"));
    h.command("firmware");
    h.upload(c.get("iBEC"));
    h.command("go");
    assert_eq!(
        h.events,
        [IbootEvent::BootFailed(
            "go: stage-1 firmware not loaded: Ap,RestoreTMU, RestoreANS, RestoreDCP, iBootDataStage1"
                .into()
        )]
    );
}

#[test]
fn go_with_the_wrong_image_fails() {
    let c = chain("j274ap", "goibss");
    let mut h = stage1(&c);
    stage1_until_go(&mut h, &c);
    h.upload(c.get("iBSS"));
    h.command("go");
    assert_eq!(
        h.events,
        [IbootEvent::BootFailed(
            "go: image type is 'ibss', expected 'ibec'".into()
        )]
    );
}

#[test]
fn wrong_fourcc_is_refused_by_the_consuming_command() {
    let c = chain("j274ap", "fourcc");
    let mut h = stage1(&c);
    h.upload(c.get("RestoreLogo"));
    h.command("lpolrestore");
    assert_eq!(h.getret(), RET_ERROR);
    assert!(!h.dev.local_policy_loaded());
    assert_eq!(
        h.console(),
        "lpolrestore: image type is 'rlgo', expected 'lpol'\n"
    );
    // A stage-2 component is not something iBSS loads.
    h.upload(c.get("ANE"));
    h.command("firmware");
    assert_eq!(h.getret(), RET_ERROR);
    assert!(h
        .console()
        .starts_with("firmware: image type is 'anef', expected 'rcio' or"));
    h.upload(c.get("iBEC"));
    h.command("setpicture 4");
    assert_eq!(h.getret(), RET_ERROR);
    assert_eq!(
        h.console(),
        "setpicture: image type is 'ibec', expected 'rlgo' or 'logo'\n"
    );
    assert_eq!(h.dev.loaded_firmware().count(), 0);
}

#[test]
fn images_for_another_mac_are_refused() {
    let mine = chain("j274ap", "mine");
    let other = chain("j414sap", "other");
    let mut h = stage1(&mine);
    h.upload(other.get("Ap,LocalPolicy"));
    h.command("lpolrestore");
    assert_eq!(h.getret(), RET_ERROR);
    assert!(h.console().contains("personalized for another Mac"));

    // ECID-bound tickets must name this unit.
    let imgs = images::bootchain_images(&mine.board, 0xAABB);
    let lpol = &imgs.iter().find(|(n, _)| n == "Ap,LocalPolicy").unwrap().1;
    let mut h = Host::new(
        Iboot::new(IbootStage::Stage1, &mine.board, &Faults::default()).with_ecid(0xCCDD),
    );
    h.upload(lpol);
    h.command("lpolrestore");
    assert_eq!(h.getret(), RET_ERROR);
    assert!(h.console().contains("ECID 0xaabb"));
    let mut h = Host::new(
        Iboot::new(IbootStage::Stage1, &mine.board, &Faults::default()).with_ecid(0xAABB),
    );
    h.upload(lpol);
    h.command("lpolrestore");
    assert_eq!(h.getret(), RET_OK);
}

#[test]
fn corrupted_upload_is_refused() {
    let c = chain("j274ap", "corrupt");
    let mut h = stage1(&c);
    let mut lpol = c.get("Ap,LocalPolicy").to_vec();
    lpol.truncate(lpol.len() - 3);
    h.upload(&lpol);
    h.command("lpolrestore");
    assert_eq!(h.getret(), RET_ERROR);
    assert!(h.console().contains("truncated"));
}

#[test]
fn missing_zlp_leaves_the_upload_unfinished() {
    let c = chain("j274ap", "nozlp");
    let rd = c.get("RestoreRamDisk");
    assert_eq!(rd.len(), 0x10000);
    let mut h = stage2(&c);
    h.upload_with(rd, 0x8000, false);
    h.command("ramdisk");
    assert_eq!(h.getret(), RET_ERROR);
    assert_eq!(
        h.console(),
        "ramdisk: upload not finished: 65536 bytes is a multiple of 512, so the host must end the file with a zero-length packet\n"
    );
    // The ZLP arriving late finishes it.
    let (r, _) = h.dev.bulk_out(0x04, &[]);
    assert_eq!(r, Reply::Ack(vec![]));
    h.command("ramdisk");
    assert_eq!(h.getret(), RET_OK);
    // Device tree: a single 0x2000-byte chunk also needs its ZLP.
    let dt = c.get("RestoreDeviceTree");
    assert_eq!(dt.len(), 0x2000);
    h.upload_with(dt, 0x8000, false);
    h.command("devicetree");
    assert_eq!(h.getret(), RET_ERROR);
    h.upload(dt);
    h.command("devicetree");
    assert_eq!(h.getret(), RET_OK);
}

#[test]
fn extra_zlp_or_data_after_the_end_breaks_the_upload() {
    let c = chain("j274ap", "extrazlp");
    let lpol = c.get("Ap,LocalPolicy");
    assert_ne!(lpol.len() % 512, 0);
    let mut h = stage1(&c);
    h.upload_with(lpol, 0x8000, true);
    h.command("lpolrestore");
    assert_eq!(h.getret(), RET_ERROR);
    assert!(h.console().contains("an extra zero-length packet"));
    // Small chunks that are not multiples of 512 end the file early.
    let logo = c.get("RestoreLogo");
    h.upload_with(logo, 1000, false);
    h.command("setpicture 4");
    assert_eq!(h.getret(), RET_ERROR);
    assert!(h
        .console()
        .contains("arrived after the 1000-byte file had ended"));
    // A fresh upload recovers.
    h.upload(logo);
    h.command("setpicture 4");
    assert_eq!(h.getret(), RET_OK);
}

#[test]
fn oversized_chunks_and_stray_bulk_data_are_stalled() {
    let c = chain("j274ap", "chunks");
    let mut h = stage2(&c);
    let rd = c.get("RestoreRamDisk");
    // No 41/00 yet.
    assert_eq!(h.dev.bulk_out(0x04, &rd[..512]).0, Reply::Stall);
    // A 0x10000-byte transfer does not fit iBoot's buffer.
    assert_eq!(
        h.control(setup([0x41, 0, 0, 0, 0, 0, 0, 0]), &[]),
        Reply::Ack(vec![])
    );
    assert_eq!(h.dev.bulk_out(0x04, rd).0, Reply::Stall);
    h.command("ramdisk");
    assert_eq!(h.getret(), RET_ERROR);
    assert!(h
        .console()
        .contains("exceeds the 0x8000-byte receive buffer"));
    // Wrong endpoint.
    assert_eq!(h.dev.bulk_out(0x02, &rd[..100]).0, Reply::Stall);
    // 41/00 with a data stage is not the upload request.
    assert_eq!(
        h.control(setup([0x41, 0, 0, 0, 0, 0, 1, 0]), &[0]),
        Reply::Stall
    );
}

#[test]
fn malformed_commands_are_stalled_unknown_ones_fail() {
    let c = chain("j274ap", "syntax");
    let mut h = stage1(&c);
    let long = "setenv boot-args ".to_string() + &"x".repeat(256 - 17);
    assert_eq!(long.len(), 256);
    assert_eq!(h.command_raw(0, &long), Reply::Stall);
    assert!(h
        .console()
        .contains("longer than the 256-byte command buffer"));
    assert_eq!(h.dev.env("boot-args"), Some(""));
    // 255 characters + NUL is the longest accepted.
    let ok = "setenv boot-args ".to_string() + &"x".repeat(255 - 17);
    assert_eq!(h.command_raw(0, &ok), Reply::Ack(vec![]));
    assert_eq!(h.dev.env("boot-args").unwrap().len(), 255 - 17);
    // No NUL.
    assert_eq!(
        h.control(setup([0x40, 0, 0, 0, 0, 0, 7, 0]), b"saveenv"),
        Reply::Stall
    );
    // Non-printable byte.
    assert_eq!(
        h.control(setup([0x40, 0, 0, 0, 0, 0, 5, 0]), b"go\x01x\0"),
        Reply::Stall
    );
    assert_eq!(
        h.console(),
        "command rejected: command is not NUL-terminated\n\
         command rejected: byte 0x01 is not printable ASCII\n"
    );
    // Unknown command: completes, fails, explains.
    h.command("frobnicate now");
    assert_eq!(h.getret(), RET_ERROR);
    assert_eq!(h.console(), "Command 'frobnicate' not found\n");
    // Unknown requests stall.
    assert_eq!(
        h.control(setup([0xC0, 5, 0, 0, 0, 0, 0xFF, 0]), &[]),
        Reply::Stall
    );
    assert!(h.events.is_empty());
}

#[test]
fn getenv_and_getret_replies() {
    let c = chain("j274ap", "env");
    let mut h = stage1(&c);
    h.command("getenv boot-stage");
    assert_eq!(h.read_reply(), b"1\0");
    h.command("getenv no-such-var");
    assert_eq!(h.read_reply(), b"\0");
    h.command("saveenv");
    assert_eq!(h.read_reply(), [RET_OK, 0, 0, 0]);
    // The host's wLength bounds the reply.
    h.command("getenv build-version");
    assert_eq!(
        h.control(setup([0xC0, 0, 0, 0, 0, 0, 3, 0]), &[]),
        Reply::Ack(b"iBo".to_vec())
    );
    h.command("setenv build-style DEBUG");
    assert_eq!(h.getret(), RET_ERROR);
    assert_eq!(h.getenv("build-style"), "RELEASE");
    // Console is empty again → NAK; other IN endpoints stall.
    let _ = h.console();
    assert_eq!(h.dev.bulk_in(0x81, 64), Reply::Nak);
    assert_eq!(h.dev.bulk_in(0x83, 64), Reply::Stall);
}

#[test]
fn console_reads_are_bounded_by_max_len() {
    let c = chain("j274ap", "console");
    let mut h = stage1(&c);
    h.command("nope");
    assert_eq!(h.dev.bulk_in(0x81, 4), Reply::Ack(b"Comm".to_vec()));
    assert_eq!(
        h.dev.bulk_in(0x81, 4096),
        Reply::Ack(b"and 'nope' not found\n".to_vec())
    );
    assert_eq!(h.dev.bulk_in(0x81, 4096), Reply::Nak);
}

#[test]
fn bootx_without_kernel_fails() {
    let c = chain("j274ap", "nokernel");
    let mut h = stage2(&c);
    stage2_until_bootx(&mut h, &c);
    // Replace the kernel in the buffer with the SEP image: the kernel is no longer there.
    h.upload(c.get("RestoreSEP"));
    h.command("bootx");
    assert_eq!(
        h.events,
        [IbootEvent::BootFailed(
            "bootx: no valid kernel cache loaded: image type is 'rsep', expected 'rkrn'".into()
        )]
    );
    // Nothing uploaded at all.
    let mut h = stage2(&c);
    h.command("bootx");
    assert_eq!(
        h.events,
        [IbootEvent::BootFailed(
            "bootx: no valid kernel cache loaded: no image uploaded".into()
        )]
    );
}

#[test]
fn bootx_without_the_rest_of_the_chain_fails() {
    let c = chain("j274ap", "partial");
    let mut h = stage2(&c);
    h.upload(c.get("AOP"));
    h.command("firmware");
    h.upload(c.get("RestoreKernelCache"));
    h.command("bootx");
    assert_eq!(
        h.events,
        [IbootEvent::BootFailed(
            "bootx: not loaded: RestoreRamDisk, RestoreDeviceTree, RestoreSEP, ANE, AVE, \
             Ap,RestoreDCP2, GFX, PMP, RestoreTrustCache, SIO, iBootData"
                .into()
        )]
    );
    assert_eq!(h.getret(), RET_ERROR);
}

#[test]
fn stage_specific_commands() {
    let c = chain("j274ap", "stages");
    let mut h = stage1(&c);
    h.upload(c.get("RestoreRamDisk"));
    h.command("ramdisk");
    assert_eq!(h.getret(), RET_ERROR);
    assert_eq!(
        h.console(),
        "ramdisk: not available in iBSS (boot-stage 1)\n"
    );
    h.command("bootx");
    assert!(
        h.events.is_empty(),
        "bootx in iBSS is refused without an event"
    );
    let mut h = stage2(&c);
    h.upload(c.get("iBEC"));
    h.command("go");
    assert_eq!(h.getret(), RET_ERROR);
    assert!(h.events.is_empty());
}

#[test]
fn stalled_command_fault() {
    let c = chain("j274ap", "fault");
    let faults = Faults {
        stall_command: Some("lpolrestore".into()),
        ..Faults::default()
    };
    let mut h = Host::new(Iboot::new(IbootStage::Stage1, &c.board, &faults));
    h.upload(c.get("Ap,LocalPolicy"));
    assert_eq!(h.command_raw(0, "lpolrestore"), Reply::Stall);
    assert!(!h.dev.local_policy_loaded());
    // Other commands still work; a whole-line match works too.
    assert_eq!(h.getenv("boot-stage"), "1");
    let faults = Faults {
        stall_command: Some("setenv auto-boot false".into()),
        ..Faults::default()
    };
    let mut h = Host::new(Iboot::new(IbootStage::Stage1, &c.board, &faults));
    assert_eq!(h.command_raw(0, "setenv auto-boot false"), Reply::Stall);
    assert_eq!(h.dev.env("auto-boot"), Some("true"));
    assert_eq!(
        h.command_raw(0, "setenv auto-boot true"),
        Reply::Ack(vec![])
    );
}

#[test]
fn reboot_and_reset_end_iboot() {
    let c = chain("j274ap", "reboot");
    for cmd in ["reboot", "reset"] {
        let mut h = stage2(&c);
        h.command(cmd);
        assert_eq!(h.events, [IbootEvent::Reboot]);
        assert_eq!(h.command_raw(0, "getenv boot-stage"), Reply::Stall);
        assert_eq!(h.dev.bulk_out(0x04, &[1]).0, Reply::Stall);
    }
}

#[test]
fn random_traffic_never_panics() {
    let c = chain("j274ap", "random");
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let words = [
        "getenv",
        "setenv",
        "setenvnp",
        "saveenv",
        "lpolrestore",
        "firmware",
        "setpicture",
        "bgcolor",
        "ramdisk",
        "devicetree",
        "rsepfirmware",
        "go",
        "bootx",
        "reboot",
        "x",
    ];
    let imgs: Vec<&Vec<u8>> = c.files.values().collect();
    for stage in [IbootStage::Stage1, IbootStage::Stage2] {
        let mut dev = Iboot::new(stage, &c.board, &Faults::default());
        for _ in 0..3000 {
            match next() % 6 {
                0 => {
                    let n = (next() % 300) as usize;
                    let data: Vec<u8> = (0..n).map(|_| next() as u8).collect();
                    let raw = next().to_le_bytes();
                    let _ = dev.control(&Setup::from_bytes(raw), &data);
                }
                1 => {
                    let mut cmd = words[(next() % words.len() as u64) as usize].to_string();
                    for _ in 0..next() % 4 {
                        cmd.push_str(&format!(" {}", next() % 300));
                    }
                    cmd.push('\0');
                    let s = Setup {
                        request_type: 0x40,
                        request: (next() % 2) as u8,
                        value: 0,
                        index: 0,
                        length: cmd.len() as u16,
                    };
                    let (_, ev) = dev.control(&s, cmd.as_bytes());
                    // Once iBoot has handed over nothing answers: start a fresh one so the
                    // rest of the run still exercises commands.
                    if matches!(
                        ev,
                        Some(
                            IbootEvent::Reboot
                                | IbootEvent::JumpToNextStage
                                | IbootEvent::BootRestoreOs
                        )
                    ) {
                        dev = Iboot::new(stage, &c.board, &Faults::default());
                    }
                }
                2 => {
                    let _ = dev.control(&setup([0x41, 0, 0, 0, 0, 0, 0, 0]), &[]);
                }
                3 => {
                    let img = imgs[(next() % imgs.len() as u64) as usize];
                    let mut chunk = img[..img.len().min(0x8000)].to_vec();
                    if next() % 3 == 0 && !chunk.is_empty() {
                        let i = (next() as usize) % chunk.len();
                        chunk[i] ^= 0x55;
                    }
                    chunk.truncate((next() as usize) % (chunk.len() + 1));
                    let _ = dev.bulk_out(0x04, &chunk);
                }
                4 => {
                    let _ = dev.bulk_in(0x81, (next() % 5000) as usize);
                }
                _ => {
                    let _ = dev.control(&setup([0xC0, 0, 0, 0, 0, 0, 0xFF, 0]), &[]);
                }
            }
        }
    }
}
