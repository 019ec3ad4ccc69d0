//! The simulated Mac's iBoot in recovery mode: iBSS (boot stage 1) and iBEC (boot stage 2), the
//! device side of protocol.md §3.
//!
//! Sans-IO: the device model hands in EP0 requests and bulk transfers and gets back the USB reply
//! plus, when the command changes the machine's state, an [`IbootEvent`] it carries out
//! (re-enumerate as the next stage, boot the restore OS, reboot).
//!
//! How uploads are checked (§3.2). The host starts a file with `41/00 0 0 0`, then sends bulk OUT
//! transfers on 0x04 of at most 0x8000 bytes. A transfer whose length is not a multiple of 512
//! bytes ends with a short packet and so ends the file; when the file length is a multiple of 512 the
//! host must end it with a zero-length transfer. The simulator applies that literally:
//! * a command that consumes the buffer while the last transfer was a non-zero multiple of 512
//!   (no ZLP yet) fails: "upload not finished";
//! * a ZLP or data after the file has ended, without a new `41/00`, marks the upload broken and
//!   the consuming command fails (an extra ZLP means the host's chunking is off by one transfer);
//! * a transfer larger than 0x8000 bytes is stalled and breaks the upload;
//! * bulk data with no `41/00` at all is stalled.
//!
//! Command failures (unknown command, bad image, wrong stage) complete the control transfer,
//! set the return value read by `C0/00` to 1 and print a line on the console (bulk IN 0x81), as
//! the real iBoot answers rather than crashing. Malformed command packets (no NUL, not
//! printable, longer than 256 bytes) are stalled. A failed `go` or `bootx` reports
//! [`IbootEvent::BootFailed`] and iBoot keeps answering; after a successful `go`, `bootx`,
//! `reboot` or `reset` this iBoot no longer runs: it stalls every request (console output not
//! yet read can still be drained).

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use crate::board::Board;
use crate::faults::Faults;
use crate::images::{self, ImageError, VerifiedImage};
use crate::img4::FourCc;
use crate::wire::{Reply, Setup};

/// Which iBoot runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IbootStage {
    /// iBSS, `boot-stage` = 1.
    Stage1,
    /// iBEC, `boot-stage` = 2.
    Stage2,
}

/// A state change the device model must carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IbootEvent {
    /// `go` with a valid iBEC: detach and come back as iBEC.
    JumpToNextStage,
    /// Valid `bootx`: detach and come back as the restore OS.
    BootRestoreOs,
    /// `go`/`bootx` refused; iBoot stays in recovery and keeps answering.
    BootFailed(String),
    /// `reboot`/`reset`.
    Reboot,
}

/// Largest bulk OUT transfer iBoot's receive buffer takes (§3.2).
pub const MAX_CHUNK: usize = 0x8000;
/// Bulk max packet size at high speed: transfers that are a multiple of it need a ZLP.
pub const MAX_PACKET: usize = 512;
/// Longest command packet, NUL included (§3.1: commands of 256+ characters are rejected).
pub const MAX_COMMAND: usize = 256;
/// Bulk endpoints of the recovery interface.
pub const EP_UPLOAD: u8 = 0x04;
pub const EP_CONSOLE: u8 = 0x81;

/// `getret` values.
pub const RET_OK: u8 = 0;
pub const RET_ERROR: u8 = 1;

/// Simulated iBoot version string (`build-version`).
pub const BUILD_VERSION: &str = "iBoot-13822.61.10";
/// Largest ramdisk iBEC accepts (`ramdisk-size`), 1 GiB.
pub const RAMDISK_SIZE: u64 = 0x4000_0000;

const READ_ONLY_ENV: &[&str] = &["boot-stage", "build-version", "build-style"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Upload {
    /// No `41/00` yet: bulk data has nowhere to go.
    Idle,
    /// Receiving; every transfer so far was a full multiple of 512, the end is not known yet.
    Receiving,
    /// Ended by a short transfer or a ZLP: a command may consume it.
    Complete,
    /// The host broke the transfer rules; the reason is what the consuming command reports.
    Broken(String),
}

/// One iBoot (iBSS or iBEC) instance; a new stage is a new instance.
#[derive(Debug)]
pub struct Iboot {
    stage: IbootStage,
    board: Board,
    faults: Faults,
    ecid: Option<u64>,
    /// This boot's ApNonce: tickets carrying `BNCH` must match it.
    ap_nonce: Option<Vec<u8>>,
    env: BTreeMap<String, String>,
    non_persistent: HashSet<String>,
    saved_env: BTreeMap<String, String>,
    /// What `C0/00` returns: the last getenv value (NUL-terminated) or the return value.
    reply: Vec<u8>,
    console: VecDeque<u8>,
    upload: Upload,
    buffer: Vec<u8>,
    local_policy: bool,
    /// Manifest names of components accepted by `firmware`.
    loaded: BTreeSet<String>,
    picture: Option<FourCc>,
    bgcolor: Option<(u8, u8, u8)>,
    ramdisk: bool,
    devicetree: bool,
    sep: bool,
    /// Set once iBoot has handed over (go/bootx/reboot): nothing answers any more.
    finished: bool,
}

impl Iboot {
    pub fn new(stage: IbootStage, board: &Board, faults: &Faults) -> Iboot {
        let mut env = BTreeMap::new();
        let stage_no = match stage {
            IbootStage::Stage1 => "1",
            IbootStage::Stage2 => "2",
        };
        for (k, v) in [
            ("boot-stage", stage_no),
            ("build-version", BUILD_VERSION),
            ("build-style", "RELEASE"),
            ("auto-boot", "true"),
            ("boot-args", ""),
            ("ramdisk-delay", "0"),
            ("radio-error", "0"),
        ] {
            env.insert(k.to_string(), v.to_string());
        }
        env.insert("ramdisk-size".into(), format!("{RAMDISK_SIZE:#x}"));
        let saved_env = env.clone();
        Iboot {
            stage,
            board: board.clone(),
            faults: faults.clone(),
            ecid: None,
            ap_nonce: None,
            env,
            non_persistent: HashSet::new(),
            saved_env,
            reply: vec![RET_OK, 0, 0, 0],
            console: VecDeque::new(),
            upload: Upload::Idle,
            buffer: Vec::new(),
            local_policy: false,
            loaded: BTreeSet::new(),
            picture: None,
            bgcolor: None,
            ramdisk: false,
            devicetree: false,
            sep: false,
            finished: false,
        }
    }

    /// Also require tickets to name this ECID (tickets with ECID 0 stay valid for any unit).
    /// Check tickets' `BNCH` against this nonce (the Mac's current ApNonce).
    pub fn set_ap_nonce(&mut self, nonce: &[u8]) {
        self.ap_nonce = Some(nonce.to_vec());
    }

    pub fn with_ecid(mut self, ecid: u64) -> Iboot {
        self.ecid = Some(ecid);
        self
    }

    /// Start with the variables a previous stage saved with `saveenv` (NVRAM survives the jump
    /// from iBSS to iBEC); the stage's own read-only variables are kept.
    pub fn with_nvram(mut self, nvram: &BTreeMap<String, String>) -> Iboot {
        for (k, v) in nvram {
            if !READ_ONLY_ENV.contains(&k.as_str()) {
                self.env.insert(k.clone(), v.clone());
                self.saved_env.insert(k.clone(), v.clone());
            }
        }
        self
    }

    /// What `saveenv` persisted, to hand to the next stage with [`Iboot::with_nvram`].
    pub fn nvram(&self) -> &BTreeMap<String, String> {
        &self.saved_env
    }

    pub fn stage(&self) -> IbootStage {
        self.stage
    }

    /// Current value of an environment variable.
    pub fn env(&self, name: &str) -> Option<&str> {
        self.env.get(name).map(String::as_str)
    }

    /// Value as of the last `saveenv` (what would survive a reboot).
    pub fn saved_env(&self, name: &str) -> Option<&str> {
        self.saved_env.get(name).map(String::as_str)
    }

    pub fn local_policy_loaded(&self) -> bool {
        self.local_policy
    }

    /// Manifest names of the components loaded with `firmware`.
    pub fn loaded_firmware(&self) -> impl Iterator<Item = &str> {
        self.loaded.iter().map(String::as_str)
    }

    /// The picture shown (`setpicture`) and background colour (`bgcolor`).
    pub fn display(&self) -> (Option<FourCc>, Option<(u8, u8, u8)>) {
        (self.picture, self.bgcolor)
    }

    /// Whether ramdisk, device tree and SEP firmware were accepted.
    pub fn restore_images(&self) -> (bool, bool, bool) {
        (self.ramdisk, self.devicetree, self.sep)
    }

    fn say(&mut self, line: &str) {
        tracing::debug!(stage = ?self.stage, "iboot console: {line}");
        self.console.extend(line.bytes());
        self.console.push_back(b'\n');
    }

    fn set_ret(&mut self, ret: u8) {
        self.reply = vec![ret, 0, 0, 0];
    }

    fn fail(&mut self, msg: &str) {
        self.say(msg);
        self.set_ret(RET_ERROR);
    }

    pub fn control(&mut self, setup: &Setup, data: &[u8]) -> (Reply, Option<IbootEvent>) {
        if self.finished {
            return (Reply::Stall, None);
        }
        match (setup.request_type, setup.request) {
            (0x40, 0 | 1) => self.command_packet(setup, data),
            (0xC0, 0) if setup.value == 0 && setup.index == 0 => {
                let mut r = self.reply.clone();
                r.truncate(usize::from(setup.length));
                (Reply::Ack(r), None)
            }
            (0x41, 0) if setup.value == 0 && setup.index == 0 && setup.length == 0 => {
                self.upload = Upload::Receiving;
                self.buffer.clear();
                (Reply::Ack(Vec::new()), None)
            }
            // idevicerestore's zero-length `21/01` after the kernel cache (and after `go` when
            // iBEC is re-sent in recovery) completes without effect.
            (0x21, 1) if setup.length == 0 => (Reply::Ack(Vec::new()), None),
            _ => {
                tracing::debug!(?setup, "iboot: unsupported control request");
                (Reply::Stall, None)
            }
        }
    }

    pub fn bulk_out(&mut self, endpoint: u8, data: &[u8]) -> (Reply, Option<IbootEvent>) {
        if self.finished || endpoint != EP_UPLOAD {
            return (Reply::Stall, None);
        }
        if data.len() > MAX_CHUNK {
            let why = format!(
                "upload broken: a {}-byte transfer exceeds the {MAX_CHUNK:#x}-byte receive buffer",
                data.len()
            );
            self.say(&why);
            self.upload = Upload::Broken(why);
            return (Reply::Stall, None);
        }
        match &self.upload {
            Upload::Idle => {
                self.say("bulk data without an upload request (41/00): dropped");
                return (Reply::Stall, None);
            }
            Upload::Receiving => {
                self.buffer.extend_from_slice(data);
                if data.is_empty() || data.len() % MAX_PACKET != 0 {
                    self.upload = Upload::Complete;
                }
            }
            Upload::Complete => {
                let why = if data.is_empty() {
                    format!(
                        "upload broken: an extra zero-length packet followed the {}-byte file, which had already ended",
                        self.buffer.len()
                    )
                } else {
                    format!(
                        "upload broken: {} more bytes arrived after the {}-byte file had ended, without a new upload request",
                        data.len(),
                        self.buffer.len()
                    )
                };
                self.say(&why);
                self.upload = Upload::Broken(why);
            }
            Upload::Broken(_) => {}
        }
        (Reply::Ack(Vec::new()), None)
    }

    pub fn bulk_in(&mut self, endpoint: u8, max_len: usize) -> Reply {
        if endpoint != EP_CONSOLE {
            return Reply::Stall;
        }
        if self.console.is_empty() {
            return Reply::Nak;
        }
        let n = max_len.min(self.console.len());
        Reply::Ack(self.console.drain(..n).collect())
    }

    fn command_packet(&mut self, setup: &Setup, data: &[u8]) -> (Reply, Option<IbootEvent>) {
        let line = match check_command_syntax(setup, data) {
            Ok(l) => l,
            Err(why) => {
                self.say(&format!("command rejected: {why}"));
                return (Reply::Stall, None);
            }
        };
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some(stall) = &self.faults.stall_command {
            if line == *stall || first == stall {
                tracing::debug!(%line, "iboot: fault injection stalls this command");
                return (Reply::Stall, None);
            }
        }
        tracing::debug!(stage = ?self.stage, %line, "iboot command");
        let event = self.execute(&line);
        (Reply::Ack(Vec::new()), event)
    }

    fn execute(&mut self, line: &str) -> Option<IbootEvent> {
        let mut words = line.split_whitespace();
        let Some(cmd) = words.next() else {
            // An empty line is a no-op, as at a prompt.
            self.set_ret(RET_OK);
            return None;
        };
        let args: Vec<&str> = words.collect();
        self.set_ret(RET_OK);
        let stage1 = self.stage == IbootStage::Stage1;
        match cmd {
            "getenv" => self.getenv(&args),
            "setenv" | "setenvnp" => self.setenv(line, cmd == "setenvnp"),
            "saveenv" => {
                // Non-persistent variables keep whatever value was saved before.
                for (k, v) in &self.env {
                    if !self.non_persistent.contains(k) {
                        self.saved_env.insert(k.clone(), v.clone());
                    }
                }
            }
            "lpolrestore" => {
                if self.consume("lpolrestore", &[FourCc(*b"lpol")]).is_some() {
                    self.local_policy = true;
                    self.say("local policy restored");
                }
            }
            "firmware" => self.firmware(),
            "setpicture" => {
                if args.len() > 1 || args.first().is_some_and(|a| parse_num(a).is_none()) {
                    self.fail("usage: setpicture [flags]");
                } else if let Some(v) =
                    self.consume("setpicture", &[FourCc(*b"rlgo"), FourCc(*b"logo")])
                {
                    self.picture = Some(v.fourcc);
                }
            }
            "bgcolor" => {
                let rgb: Vec<u8> = args
                    .iter()
                    .filter_map(|a| parse_num(a).and_then(|v| u8::try_from(v).ok()))
                    .collect();
                match rgb[..] {
                    [r, g, b] if args.len() == 3 => self.bgcolor = Some((r, g, b)),
                    _ => self.fail("usage: bgcolor <red> <green> <blue> (0-255 each)"),
                }
            }
            "ramdisk" | "devicetree" | "rsepfirmware" | "bootx" if stage1 => {
                self.fail(&format!("{cmd}: not available in iBSS (boot-stage 1)"))
            }
            "ramdisk" => {
                if let Some(v) = self.consume("ramdisk", &[FourCc(*b"rdsk")]) {
                    let max = self
                        .env("ramdisk-size")
                        .and_then(parse_num)
                        .unwrap_or(RAMDISK_SIZE);
                    if v.payload_len as u64 > max {
                        self.fail(&format!(
                            "ramdisk: {} bytes exceed ramdisk-size {max:#x}",
                            v.payload_len
                        ));
                    } else {
                        self.ramdisk = true;
                    }
                }
            }
            "devicetree" => {
                self.devicetree |= self.consume("devicetree", &[FourCc(*b"rdtr")]).is_some();
            }
            "rsepfirmware" => {
                self.sep |= self.consume("rsepfirmware", &[FourCc(*b"rsep")]).is_some();
            }
            "go" if !stage1 => self.fail("go: not available in iBEC (boot-stage 2)"),
            "go" => return Some(self.go()),
            "bootx" => return Some(self.bootx()),
            "reboot" | "reset" => {
                self.finished = true;
                return Some(IbootEvent::Reboot);
            }
            other => self.fail(&format!("Command '{other}' not found")),
        }
        None
    }

    fn getenv(&mut self, args: &[&str]) {
        match args {
            [name] => {
                let mut v = self.env(name).unwrap_or("").as_bytes().to_vec();
                v.push(0);
                self.reply = v;
            }
            _ => self.fail("usage: getenv <name>"),
        }
    }

    fn setenv(&mut self, line: &str, non_persistent: bool) {
        // The value is the rest of the line, spaces included (boot-args has several words).
        let rest = line.split_once(' ').map(|x| x.1).unwrap_or("").trim_start();
        let (name, value) = match rest.split_once(' ') {
            Some((n, v)) => (n, v),
            None => (rest, ""),
        };
        if name.is_empty() {
            self.fail("usage: setenv <name> <value>");
            return;
        }
        if READ_ONLY_ENV.contains(&name) {
            self.fail(&format!("setenv: '{name}' is read-only"));
            return;
        }
        self.env.insert(name.to_string(), value.to_string());
        if non_persistent {
            self.non_persistent.insert(name.to_string());
        } else {
            self.non_persistent.remove(name);
        }
    }

    /// Verify the uploaded buffer for `cmd`; on failure report it and return `None`.
    fn consume(&mut self, cmd: &str, expected: &[FourCc]) -> Option<VerifiedImage> {
        match self.check_buffer(expected) {
            Ok(v) => Some(v),
            Err(why) => {
                self.fail(&format!("{cmd}: {why}"));
                None
            }
        }
    }

    fn check_buffer(&self, expected: &[FourCc]) -> Result<VerifiedImage, String> {
        match &self.upload {
            Upload::Idle => Err("no image uploaded".into()),
            Upload::Receiving if self.buffer.is_empty() => {
                Err("upload started but no data arrived".into())
            }
            Upload::Receiving => Err(format!(
                "upload not finished: {} bytes is a multiple of {MAX_PACKET}, so the host must end the file with a zero-length packet",
                self.buffer.len()
            )),
            Upload::Broken(why) => Err(why.clone()),
            Upload::Complete => images::verify_image_with_nonce(
                &self.buffer,
                &self.board,
                self.ecid,
                self.ap_nonce.as_deref(),
                expected,
            )
                .map_err(|e: ImageError| e.to_string()),
        }
    }

    /// Components `firmware` accepts in this stage, with their 4CCs. iBSS takes only the
    /// stage-1 set; iBEC takes any iBoot-loaded component.
    fn firmware_candidates(&self) -> Vec<(String, FourCc)> {
        let comps = match self.stage {
            IbootStage::Stage1 => images::stage1_components(&self.board),
            IbootStage::Stage2 => {
                let mut c = images::stage1_components(&self.board);
                c.extend(images::stage2_components(&self.board));
                c
            }
        };
        comps
            .into_iter()
            .map(|c| (c.name.clone(), images::component_fourcc(c)))
            .collect()
    }

    fn firmware(&mut self) {
        let candidates = self.firmware_candidates();
        let ccs: Vec<FourCc> = candidates.iter().map(|c| c.1).collect();
        if ccs.is_empty() {
            // An empty list would mean "any type" to verify_image.
            self.fail("firmware: this Mac loads no firmware in this stage");
            return;
        }
        if let Some(v) = self.consume("firmware", &ccs) {
            if let Some((name, _)) = candidates.iter().find(|c| c.1 == v.fourcc) {
                self.say(&format!("loaded firmware '{}' ({name})", v.fourcc));
                self.loaded.insert(name.clone());
            }
        }
    }

    fn missing(&self, needed: Vec<&crate::board::Component>) -> Vec<String> {
        needed
            .into_iter()
            .filter(|c| !self.loaded.contains(&c.name))
            .map(|c| c.name.clone())
            .collect()
    }

    fn boot_failed(&mut self, why: String) -> IbootEvent {
        self.fail(&why);
        IbootEvent::BootFailed(why)
    }

    fn go(&mut self) -> IbootEvent {
        if let Err(e) = self.check_buffer(&[FourCc(*b"ibec")]) {
            return self.boot_failed(format!("go: {e}"));
        }
        if !self.local_policy {
            return self.boot_failed(
                "go: no local policy (Ap,LocalPolicy + lpolrestore): iBEC will not start".into(),
            );
        }
        let missing = self.missing(images::stage1_components(&self.board));
        if !missing.is_empty() {
            return self.boot_failed(format!(
                "go: stage-1 firmware not loaded: {}",
                missing.join(", ")
            ));
        }
        self.finished = true;
        IbootEvent::JumpToNextStage
    }

    fn bootx(&mut self) -> IbootEvent {
        if let Err(e) = self.check_buffer(&[FourCc(*b"rkrn")]) {
            return self.boot_failed(format!("bootx: no valid kernel cache loaded: {e}"));
        }
        let mut missing = Vec::new();
        if !self.ramdisk {
            missing.push("RestoreRamDisk".to_string());
        }
        if !self.devicetree {
            missing.push("RestoreDeviceTree".to_string());
        }
        if !self.sep && self.board.component("RestoreSEP").is_some() {
            missing.push("RestoreSEP".to_string());
        }
        missing.extend(self.missing(images::stage2_components(&self.board)));
        if !missing.is_empty() {
            return self.boot_failed(format!("bootx: not loaded: {}", missing.join(", ")));
        }
        self.finished = true;
        IbootEvent::BootRestoreOs
    }
}

/// iBoot's checks on a command packet: the length matches the setup, it fits the 256-byte
/// buffer, ends in its only NUL, and is printable ASCII.
fn check_command_syntax(setup: &Setup, data: &[u8]) -> Result<String, String> {
    if usize::from(setup.length) != data.len() {
        return Err(format!(
            "setup announces {} bytes but {} arrived",
            setup.length,
            data.len()
        ));
    }
    if data.len() > MAX_COMMAND {
        return Err(format!(
            "{} bytes is longer than the {MAX_COMMAND}-byte command buffer",
            data.len()
        ));
    }
    let Some((&0, text)) = data.split_last() else {
        return Err("command is not NUL-terminated".into());
    };
    if let Some(b) = text.iter().find(|b| !(0x20..=0x7E).contains(*b)) {
        return Err(format!("byte {b:#04x} is not printable ASCII"));
    }
    // Printable ASCII is valid UTF-8.
    Ok(text.iter().map(|&b| b as char).collect())
}

fn parse_num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd_setup(len: usize) -> Setup {
        Setup {
            request_type: 0x40,
            request: 0,
            value: 0,
            index: 0,
            length: len as u16,
        }
    }

    fn iboot() -> Iboot {
        Iboot::new(
            IbootStage::Stage1,
            &Board::load("j274ap").unwrap(),
            &Faults::default(),
        )
    }

    #[test]
    fn syntax_checks() {
        let ok = b"getenv boot-stage\0";
        assert_eq!(
            check_command_syntax(&cmd_setup(ok.len()), ok).unwrap(),
            "getenv boot-stage"
        );
        assert!(check_command_syntax(&cmd_setup(3), b"abc").is_err());
        assert!(check_command_syntax(&cmd_setup(4), b"a\0c\0").is_err());
        assert!(check_command_syntax(&cmd_setup(4), b"a\tc\0").is_err());
        assert!(check_command_syntax(&cmd_setup(5), b"abc\0").is_err());
        assert!(check_command_syntax(&cmd_setup(0), b"").is_err());
        let mut long = vec![b'a'; 255];
        long.push(0);
        assert!(check_command_syntax(&cmd_setup(256), &long).is_ok());
        long.insert(0, b'a');
        assert!(check_command_syntax(&cmd_setup(257), &long).is_err());
    }

    #[test]
    fn setenv_keeps_spaces_and_tracks_persistence() {
        let mut i = iboot();
        i.execute("setenvnp boot-args rd=md0 -progress -restore");
        i.execute("setenv auto-boot false");
        assert_eq!(i.env("boot-args"), Some("rd=md0 -progress -restore"));
        i.execute("saveenv");
        assert_eq!(i.saved_env("auto-boot"), Some("false"));
        assert_eq!(i.saved_env("boot-args"), Some(""), "setenvnp is not saved");
        i.execute("setenv boot-stage 2");
        assert_eq!(i.env("boot-stage"), Some("1"));
        assert_eq!(i.reply, [RET_ERROR, 0, 0, 0]);
    }

    #[test]
    fn firmware_with_nothing_expected_refuses_everything() {
        let mut board = Board::load("j274ap").unwrap();
        for c in &mut board.components {
            c.loaded_by_stage1 = false;
        }
        let img = images::bootchain_images(&board, images::ECID_ANY)
            .into_iter()
            .find(|(n, _)| n == "RestoreDCP")
            .unwrap()
            .1;
        let mut i = Iboot::new(IbootStage::Stage1, &board, &Faults::default());
        i.upload = Upload::Complete;
        i.buffer = img;
        i.execute("firmware");
        assert_eq!(i.reply[0], RET_ERROR);
        assert_eq!(i.loaded.len(), 0);
    }

    #[test]
    fn nvram_carries_to_the_next_stage() {
        let mut i = iboot();
        i.execute("setenv auto-boot false");
        i.execute("setenvnp boot-args -v");
        i.execute("saveenv");
        let board = Board::load("j274ap").unwrap();
        let next = Iboot::new(IbootStage::Stage2, &board, &Faults::default()).with_nvram(i.nvram());
        assert_eq!(next.env("auto-boot"), Some("false"));
        assert_eq!(next.env("boot-args"), Some(""));
        assert_eq!(next.env("boot-stage"), Some("2"));
    }

    #[test]
    fn bgcolor_and_parse_num() {
        let mut i = iboot();
        i.execute("bgcolor 0 0x10 255");
        assert_eq!(i.bgcolor, Some((0, 16, 255)));
        i.execute("bgcolor 0 0 256");
        assert_eq!(i.reply[0], RET_ERROR);
        i.execute("bgcolor 1 2");
        assert_eq!(i.reply[0], RET_ERROR);
        assert_eq!(i.bgcolor, Some((0, 16, 255)));
    }
}
