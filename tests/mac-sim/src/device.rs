//! The simulated Mac: which firmware currently answers on USB (SecureROM DFU, Port DFU, iBSS,
//! iBEC, restore OS), and the reboots between them, each ending in a detach and a re-attach
//! with new descriptors (protocol.md §0.3, §2.4, §3.3–3.5).

use std::time::{Duration, Instant};

use crate::board::Board;
use crate::descriptors::{
    Descriptors, Identity, UsbMode, EP_RECOVERY_CONSOLE_IN, EP_RECOVERY_OUT, PID_RESTORE,
};
use crate::dfu::{DfuConfig, DfuMachine, DfuState};
use crate::faults::{Faults, Stage, StartMode};
use crate::iboot::{Iboot, IbootEvent, IbootStage};
use crate::restore::RestoreOs;
use crate::wire::{Enumeration, LinkChange, Reply, Setup, SimDevice};

/// ROM version shown in `SRTG` (an M1-era SecureROM tag).
pub const ROM_TAG: &str = "iBoot-6723.100.10";

/// How long the Mac takes for the steps a host waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// From dropping off the bus to re-appearing with the next firmware (ROM → iBSS,
    /// iBSS → iBEC, failed boot → Recovery, Port DFU → DFU).
    pub boot: Duration,
    /// From `bootx` to the restore OS appearing (much longer on real Macs).
    pub restore_boot: Duration,
    /// After a complete DFU upload, boot even without a USB reset (front ends that cannot
    /// pass resets on rely on this).
    pub reset_grace: Duration,
}

impl Default for Timing {
    /// Near real devices: a couple of seconds per reboot (idevicerestore allows 10 s).
    fn default() -> Self {
        Timing {
            boot: Duration::from_millis(2000),
            restore_boot: Duration::from_millis(5000),
            reset_grace: Duration::from_millis(1000),
        }
    }
}

impl Timing {
    /// Short delays for tests.
    pub fn fast() -> Self {
        Timing {
            boot: Duration::from_millis(20),
            restore_boot: Duration::from_millis(30),
            reset_grace: Duration::from_millis(50),
        }
    }
}

/// What answers in Recovery: the simulated iBoot, or a test's replacement.
pub trait BootStage: Send {
    fn control(&mut self, setup: &Setup, data: &[u8]) -> (Reply, Option<IbootEvent>);
    fn bulk_out(&mut self, endpoint: u8, data: &[u8]) -> (Reply, Option<IbootEvent>);
    fn bulk_in(&mut self, endpoint: u8, max_len: usize) -> Reply;
    fn env(&self, name: &str) -> Option<String>;
    /// The ApNonce of this boot, for checking tickets' `BNCH` (stages that check nothing ignore it).
    fn set_ap_nonce(&mut self, _nonce: &[u8]) {}
}

impl BootStage for Iboot {
    fn control(&mut self, setup: &Setup, data: &[u8]) -> (Reply, Option<IbootEvent>) {
        Iboot::control(self, setup, data)
    }
    fn bulk_out(&mut self, endpoint: u8, data: &[u8]) -> (Reply, Option<IbootEvent>) {
        Iboot::bulk_out(self, endpoint, data)
    }
    fn bulk_in(&mut self, endpoint: u8, max_len: usize) -> Reply {
        Iboot::bulk_in(self, endpoint, max_len)
    }
    fn env(&self, name: &str) -> Option<String> {
        Iboot::env(self, name).map(str::to_string)
    }
    fn set_ap_nonce(&mut self, nonce: &[u8]) {
        Iboot::set_ap_nonce(self, nonce)
    }
}

/// Builds the firmware for boot stage 1 or 2 of the Mac with this ECID.
pub type StageFactory = Box<dyn Fn(u8, &Board, u64, &Faults) -> Box<dyn BootStage> + Send>;
/// Decides whether an uploaded iBSS (suffix stripped) boots.
pub type ImageCheck = Box<dyn Fn(&[u8], &Board) -> Result<(), String> + Send>;

fn iboot_factory() -> StageFactory {
    Box::new(|stage, board, ecid, faults| {
        let s = if stage == 1 {
            IbootStage::Stage1
        } else {
            IbootStage::Stage2
        };
        Box::new(Iboot::new(s, board, faults).with_ecid(ecid))
    })
}

enum Firmware {
    Dfu(DfuMachine),
    PortDfu(DfuMachine),
    Iboot {
        stage: u8,
        fw: Box<dyn BootStage>,
    },
    /// The restore OS; None when no scenario was configured (bulk IN only NAKs).
    Restore(Option<RestoreOs>),
}

/// Boots the restore OS (usbmux + restored scenario) each time the Mac reaches restore mode.
pub type RestoreFactory = Box<dyn FnMut(&Board, &Identity) -> RestoreOs + Send>;

/// Where the Mac goes at its next boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Mode(UsbMode),
    /// Cable pulled (fault): off the bus for good.
    Gone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Attached,
    /// Off the bus; re-attaches in `next` at `at`.
    Rebooting {
        next: UsbMode,
        at: Instant,
    },
    Gone,
}

pub struct SimMac {
    board: Board,
    identity: Identity,
    faults: Faults,
    timing: Timing,
    firmware: Firmware,
    descriptors: Descriptors,
    link: Link,
    /// A reboot the firmware asked for; carried out (detach) at the next poll.
    pending: Option<Next>,
    /// When the cable was pulled (for `replug_after`).
    gone_since: Option<Instant>,
    /// When a manifested DFU image was first noticed without a reset following it.
    manifest_seen: Option<Instant>,
    configuration: u8,
    alt: [u8; 2],
    received_bytes: u64,
    /// usbmux bytes received since restore mode started.
    restore_bytes: u64,
    /// `disconnect_at` fires on the first non-standard transfer of a stage.
    stage_touched: bool,
    boots: u64,
    port_nonce: [u8; 32],
    /// None: the ROM's own check, bound to this unit's ECID and current ApNonce.
    ibss_check: Option<ImageCheck>,
    stage_factory: StageFactory,
    restore_factory: Option<RestoreFactory>,
}

/// splitmix64: deterministic per ECID and boot, so tests can predict nonces.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill(seed: u64, out: &mut [u8]) {
    let mut s = seed;
    for chunk in out.chunks_mut(8) {
        let v = splitmix(&mut s).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// A plausible 10-character Mac serial number derived from the ECID.
fn serial_number(ecid: u64) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKLMNPQRSTUVWXYZ";
    let mut s = ecid ^ 0x5eed_5e71_a100_0000;
    (0..10)
        .map(|_| ALPHABET[(splitmix(&mut s) % ALPHABET.len() as u64) as usize] as char)
        .collect()
}

impl SimMac {
    pub fn new(board: Board, ecid: u64, start: StartMode, faults: Faults, timing: Timing) -> Self {
        let mut identity = Identity {
            cpid: board.cpid,
            bdid: board.bdid,
            security_domain: board.security_domain,
            chip_revision: 0x11,
            fuse_mode: 0x03,
            security_epoch: 0x01,
            ecid,
            rom_tag: ROM_TAG.to_string(),
            serial_number: serial_number(ecid),
            port_prev: 0x02,
            ap_nonce: [0; 32],
            sep_nonce: [0; 20],
            restore_pid: faults.restore_pid.unwrap_or(PID_RESTORE),
        };
        fill(ecid ^ 0xa9, &mut identity.ap_nonce);
        fill(ecid ^ 0x5e9, &mut identity.sep_nonce);
        let mut port_nonce = [0; 32];
        fill(ecid ^ 0xace3, &mut port_nonce);
        let start = faults.start.unwrap_or(start);
        let mode = match start {
            StartMode::Dfu => UsbMode::Dfu,
            StartMode::PortDfu => UsbMode::PortDfu,
            StartMode::Recovery => UsbMode::Recovery(1),
            StartMode::Restore => UsbMode::Restore,
        };
        let mut mac = SimMac {
            descriptors: Descriptors::new(mode, &identity),
            board,
            identity,
            faults,
            timing,
            firmware: Firmware::Restore(None),
            link: Link::Attached,
            pending: None,
            gone_since: None,
            manifest_seen: None,
            configuration: 0,
            alt: [0; 2],
            received_bytes: 0,
            restore_bytes: 0,
            stage_touched: false,
            boots: 0,
            port_nonce,
            ibss_check: None,
            stage_factory: iboot_factory(),
            restore_factory: None,
        };
        mac.enter(mode);
        mac
    }

    /// Replace the iBSS check (tests that do not build real IMG4 files).
    pub fn with_ibss_check(mut self, check: ImageCheck) -> Self {
        self.ibss_check = Some(check);
        self
    }

    /// Replace the simulated iBoot (tests that script stage 1/2 themselves). Applies from the
    /// next boot, and to the current stage if the Mac is in Recovery now.
    pub fn with_stage_factory(mut self, factory: StageFactory) -> Self {
        self.stage_factory = factory;
        if let Firmware::Iboot { stage, .. } = self.firmware {
            let mut fw = (self.stage_factory)(stage, &self.board, self.identity.ecid, &self.faults);
            fw.set_ap_nonce(&self.identity.ap_nonce);
            self.firmware = Firmware::Iboot { stage, fw };
        }
        self
    }

    /// Run a restore OS (see [`crate::restore`]) whenever the Mac boots into restore mode.
    pub fn with_restore(mut self, factory: RestoreFactory) -> Self {
        self.restore_factory = Some(factory);
        if let Firmware::Restore(None) = self.firmware {
            if self.descriptors.mode == UsbMode::Restore {
                self.firmware = Firmware::Restore(
                    self.restore_factory
                        .as_mut()
                        .map(|f| f(&self.board, &self.identity)),
                );
            }
        }
        self
    }

    /// The running restore OS, in restore mode.
    pub fn restore_os(&self) -> Option<&RestoreOs> {
        match &self.firmware {
            Firmware::Restore(os) => os.as_ref(),
            _ => None,
        }
    }

    pub fn board(&self) -> &Board {
        &self.board
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn mode(&self) -> UsbMode {
        self.descriptors.mode
    }

    pub fn descriptors(&self) -> &Descriptors {
        &self.descriptors
    }

    /// Number of boots so far (0 = still the firmware it was plugged in with).
    pub fn boots(&self) -> u64 {
        self.boots
    }

    /// Bytes of payload received over the whole session (DFU data and bulk OUT).
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes
    }

    /// DFU state while the SecureROM or port controller answers.
    pub fn dfu_state(&self) -> Option<DfuState> {
        match &self.firmware {
            Firmware::Dfu(m) | Firmware::PortDfu(m) => Some(m.state()),
            _ => None,
        }
    }

    /// An iBoot environment variable while iBoot answers.
    pub fn env(&self, name: &str) -> Option<String> {
        match &self.firmware {
            Firmware::Iboot { fw, .. } => fw.env(name),
            _ => None,
        }
    }

    /// Switch firmware and descriptors to `mode` (the Mac has just booted it).
    fn enter(&mut self, mode: UsbMode) {
        self.firmware = match mode {
            UsbMode::Dfu => Firmware::Dfu(DfuMachine::new(DfuConfig::secure_rom(
                self.faults.verify_crc,
            ))),
            UsbMode::PortDfu => Firmware::PortDfu(DfuMachine::new(DfuConfig::port_dfu())),
            UsbMode::Recovery(stage) => {
                let mut fw =
                    (self.stage_factory)(stage, &self.board, self.identity.ecid, &self.faults);
                fw.set_ap_nonce(&self.identity.ap_nonce);
                Firmware::Iboot { stage, fw }
            }
            UsbMode::Restore => Firmware::Restore(
                self.restore_factory
                    .as_mut()
                    .map(|f| f(&self.board, &self.identity)),
            ),
        };
        let mut shown = self.identity.clone();
        if mode == UsbMode::PortDfu {
            // The port controller has its own nonce.
            shown.ap_nonce = self.port_nonce;
        }
        self.descriptors = Descriptors::new(mode, &shown);
        self.configuration = 0;
        self.alt = [0; 2];
        self.stage_touched = false;
        self.manifest_seen = None;
    }

    fn boot_into(&mut self, mode: UsbMode) {
        self.boots += 1;
        if self.faults.change_nonce_on_boot {
            let seed = self.identity.ecid ^ self.boots.wrapping_mul(0x1000_0001);
            fill(seed ^ 0xa9, &mut self.identity.ap_nonce);
            fill(seed ^ 0x5e9, &mut self.identity.sep_nonce);
            fill(seed ^ 0xace3, &mut self.port_nonce);
        }
        tracing::info!(?mode, boots = self.boots, "simulated Mac booted");
        self.enter(mode);
    }

    fn current_stage(&self) -> Stage {
        match &self.firmware {
            Firmware::Dfu(_) | Firmware::PortDfu(_) => Stage::Dfu,
            Firmware::Iboot { stage: 1, .. } => Stage::Stage1,
            Firmware::Iboot { .. } => Stage::Stage2,
            // Reaching restore mode is past every fault stage but AfterBootx, which fires
            // on `bootx` itself.
            Firmware::Restore(_) => Stage::AfterBootx,
        }
    }

    /// Whether the Mac is still talking (not rebooting or gone).
    fn responsive(&self) -> bool {
        self.link == Link::Attached && self.pending.is_none()
    }

    /// The disconnect faults, checked on every non-standard transfer carrying `payload` bytes.
    fn fault_disconnects(&mut self, payload: usize) -> bool {
        if !self.stage_touched {
            self.stage_touched = true;
            let stage = self.current_stage();
            if self.faults.disconnect_at == Some(stage) && stage != Stage::AfterBootx {
                tracing::info!(?stage, "fault: Mac drops off the bus");
                self.pending = Some(Next::Gone);
                return true;
            }
        }
        if let Some(limit) = self.faults.disconnect_after_bytes {
            if self.received_bytes + payload as u64 > limit {
                tracing::info!(limit, "fault: Mac drops off the bus after byte limit");
                self.pending = Some(Next::Gone);
                return true;
            }
        }
        self.received_bytes += payload as u64;
        false
    }

    fn on_iboot_event(&mut self, ev: IbootEvent) {
        let stage = match &self.firmware {
            Firmware::Iboot { stage, .. } => *stage,
            _ => return,
        };
        let next = match ev {
            IbootEvent::JumpToNextStage => Next::Mode(UsbMode::Recovery(2.max(stage))),
            IbootEvent::BootRestoreOs if self.faults.disconnect_at == Some(Stage::AfterBootx) => {
                tracing::info!("fault: Mac vanishes after bootx");
                Next::Gone
            }
            IbootEvent::BootRestoreOs => Next::Mode(UsbMode::Restore),
            // A refused `go` is just a failed command: iBSS keeps answering.
            IbootEvent::BootFailed(why) if stage == 1 => {
                tracing::info!(%why, "iBSS refused to start iBEC");
                return;
            }
            IbootEvent::BootFailed(why) => {
                // A failed `bootx`: like a real Mac whose personalised boot fails, it
                // reboots and comes back in Recovery (idevicerestore then reports
                // "image personalization failed", protocol.md §3.4 step 12).
                tracing::info!(%why, "boot failed; Mac falls back to Recovery");
                Next::Mode(UsbMode::Recovery(1))
            }
            IbootEvent::Reboot => Next::Mode(UsbMode::Recovery(1)),
        };
        self.pending = Some(next);
    }

    fn standard_request(&mut self, setup: &Setup, data: &[u8]) -> Reply {
        let ack = || Reply::Ack(Vec::new());
        match (setup.request_type, setup.request) {
            (0x80, 0x06) => {
                let [index, kind] = setup.value.to_le_bytes();
                let d = match kind {
                    1 => Some(self.descriptors.device.clone()),
                    2 if index == 0 => Some(self.descriptors.configuration.clone()),
                    // Any language ID gets the English strings: hosts that skip string 0
                    // and ask with langid 0 still get an answer.
                    3 => self.descriptors.string(index),
                    _ => None,
                };
                match d {
                    Some(mut d) => {
                        d.truncate(setup.length.into());
                        Reply::Ack(d)
                    }
                    None => Reply::Stall,
                }
            }
            // GET_STATUS (device: bus powered, no remote wakeup; interface; endpoint: not halted)
            (0x80..=0x82, 0x00) => Reply::Ack(vec![0, 0]),
            (0x80, 0x08) => Reply::Ack(vec![self.configuration]),
            (0x00, 0x09) if setup.value <= 1 => {
                self.configuration = setup.value as u8;
                self.alt = [0; 2];
                ack()
            }
            (0x00, 0x05) => ack(), // SET_ADDRESS (vhci keeps it, real hosts send it)
            (0x01, 0x0b) if self.configuration == 1 => {
                let (i, a) = (u8::try_from(setup.index), u8::try_from(setup.value));
                if let (Ok(i @ 0..=1), Ok(a)) = (i, a) {
                    if !self.descriptors.has_alt_setting(i, a) {
                        return Reply::Stall;
                    }
                    self.alt[usize::from(i)] = a;
                    ack()
                } else {
                    Reply::Stall
                }
            }
            (0x81, 0x0a) if self.configuration == 1 => {
                let i = u8::try_from(setup.index).unwrap_or(u8::MAX);
                if self.descriptors.interfaces().contains(&i) {
                    Reply::Ack(vec![self.alt.get(usize::from(i)).copied().unwrap_or(0)])
                } else {
                    Reply::Stall
                }
            }
            // CLEAR_FEATURE(ENDPOINT_HALT) — libusb_clear_halt.
            (0x02, 0x01) if setup.value == 0 => ack(),
            _ => {
                tracing::debug!(?setup, len = data.len(), "standard request stalled");
                Reply::Stall
            }
        }
    }

    fn command_stalled(&self, setup: &Setup, data: &[u8]) -> bool {
        let Some(stall) = &self.faults.stall_command else {
            return false;
        };
        if setup.request_type != 0x40 || setup.request > 1 {
            return false;
        }
        let cmd = data.split(|b| *b == 0).next().unwrap_or_default();
        cmd.starts_with(stall.as_bytes())
    }
}

impl SimDevice for SimMac {
    fn enumeration(&self) -> Enumeration {
        self.descriptors.enumeration()
    }

    fn control(&mut self, setup: &Setup, data_out: &[u8]) -> Reply {
        if !self.responsive() {
            return Reply::Stall;
        }
        if setup.request_type & 0x60 == 0 {
            return self.standard_request(setup, data_out);
        }
        let payload = match (&self.firmware, setup.request_type, setup.request) {
            (Firmware::Dfu(_) | Firmware::PortDfu(_), 0x21, 1) => data_out.len(),
            _ => 0,
        };
        if self.fault_disconnects(payload) {
            return Reply::Stall;
        }
        if let Firmware::Dfu(_) | Firmware::PortDfu(_) = self.firmware {
            if self.faults.stall_dfu_request == Some(setup.request) {
                return Reply::Stall;
            }
        }
        if self.command_stalled(setup, data_out) {
            return Reply::Stall;
        }
        let board = &self.board;
        let refuse = self.faults.refuse_ibss;
        let check = &self.ibss_check;
        let (ecid, nonce) = (self.identity.ecid, self.identity.ap_nonce);
        match &mut self.firmware {
            Firmware::Dfu(m) => m.control(setup, data_out, |image| {
                if refuse {
                    Err("fault: the ROM refuses every iBSS".into())
                } else if let Some(check) = check {
                    check(image, board)
                } else {
                    crate::images::validate_ibss_for(image, board, Some(ecid), Some(&nonce))
                }
            }),
            // The port controller takes any non-empty firmware (its format is not simulated).
            Firmware::PortDfu(m) => m.control(setup, data_out, |_| Ok(())),
            Firmware::Iboot { fw, .. } => {
                let (reply, ev) = fw.control(setup, data_out);
                if let Some(ev) = ev {
                    self.on_iboot_event(ev);
                }
                reply
            }
            Firmware::Restore(_) => Reply::Stall,
        }
    }

    fn bulk_out(&mut self, endpoint: u8, data: &[u8]) -> Reply {
        if !self.responsive() {
            return Reply::Stall;
        }
        let ok_ep = match &self.firmware {
            Firmware::Iboot { .. } => endpoint == EP_RECOVERY_OUT,
            Firmware::Restore(_) => endpoint == crate::descriptors::EP_MUX_OUT,
            _ => false,
        };
        if !ok_ep || self.configuration != 1 {
            return Reply::Stall;
        }
        if matches!(self.firmware, Firmware::Restore(_)) {
            let before = self.restore_bytes;
            self.restore_bytes += data.len() as u64;
            if let Some(limit) = self.faults.disconnect_in_restore_after_bytes {
                if before < limit && self.restore_bytes > limit {
                    tracing::info!(limit, "fault: Mac drops off the bus in restore mode");
                    self.pending = Some(Next::Gone);
                    return Reply::Stall;
                }
            }
        }
        if let Firmware::Restore(os) = &mut self.firmware {
            return match os {
                Some(os) => os.bulk_out(data),
                None => Reply::Stall,
            };
        }
        if self.fault_disconnects(data.len()) {
            return Reply::Stall;
        }
        if let Firmware::Iboot { fw, .. } = &mut self.firmware {
            let (reply, ev) = fw.bulk_out(endpoint, data);
            if let Some(ev) = ev {
                self.on_iboot_event(ev);
            }
            return reply;
        }
        Reply::Stall
    }

    fn bulk_in(&mut self, endpoint: u8, max_len: usize) -> Reply {
        if !self.responsive() || self.configuration != 1 {
            return Reply::Stall;
        }
        match &self.firmware {
            Firmware::Iboot { .. } if endpoint == EP_RECOVERY_CONSOLE_IN => {}
            Firmware::Restore(os) if endpoint == crate::descriptors::EP_MUX_IN => {
                return match os {
                    Some(os) => os.bulk_in(max_len),
                    None => Reply::Nak,
                };
            }
            _ => return Reply::Stall,
        }
        if self.fault_disconnects(0) {
            return Reply::Stall;
        }
        match &mut self.firmware {
            Firmware::Iboot { fw, .. } => fw.bulk_in(endpoint, max_len),
            _ => Reply::Stall,
        }
    }

    fn reset(&mut self) {
        if self.link != Link::Attached {
            return;
        }
        self.configuration = 0;
        self.alt = [0; 2];
        if self.pending.is_some() {
            return;
        }
        match &mut self.firmware {
            Firmware::Dfu(m) => {
                if m.reset().is_some() {
                    self.pending = Some(Next::Mode(UsbMode::Recovery(1)));
                }
                self.manifest_seen = None;
            }
            Firmware::PortDfu(m) => {
                if m.reset().is_some() {
                    self.pending = Some(Next::Mode(UsbMode::Dfu));
                }
                self.manifest_seen = None;
            }
            _ => {}
        }
    }

    fn poll_link(&mut self, now: Instant) -> Option<LinkChange> {
        match self.link {
            Link::Gone => {
                // The technician plugs the cable back in with the Mac in DFU; the pull was a
                // one-time event.
                let after = self.faults.replug_after?;
                let gone = *self.gone_since.get_or_insert(now);
                if now.duration_since(gone) < after {
                    return None;
                }
                tracing::info!("fault: the cable is plugged back in, the Mac in DFU");
                self.faults.replug_after = None;
                self.faults.disconnect_at = None;
                self.faults.disconnect_after_bytes = None;
                self.faults.disconnect_in_restore_after_bytes = None;
                self.gone_since = None;
                self.boot_into(UsbMode::Dfu);
                self.link = Link::Attached;
                Some(LinkChange::Attach)
            }
            Link::Rebooting { next, at } => {
                if now < at {
                    return None;
                }
                self.boot_into(next);
                self.link = Link::Attached;
                Some(LinkChange::Attach)
            }
            Link::Attached => {
                if let Firmware::Restore(Some(os)) = &self.firmware {
                    if os.gone() && self.pending.is_none() {
                        tracing::info!("fault: Mac drops off the bus in restore mode");
                        self.pending = Some(Next::Gone);
                    } else if self.faults.dfu_after_failure
                        && self.pending.is_none()
                        && matches!(
                            os.handle().wait(Duration::ZERO),
                            crate::restore::restored::Outcome::DeviceFailed { .. }
                        )
                    {
                        tracing::info!("the restore failed; the Mac is put back into DFU");
                        self.pending = Some(Next::Mode(UsbMode::Dfu));
                    }
                }
                if self.pending.is_none() {
                    let manifested = match &self.firmware {
                        Firmware::Dfu(m) | Firmware::PortDfu(m) => m.accepted_image().is_some(),
                        _ => false,
                    };
                    if manifested {
                        let seen = *self.manifest_seen.get_or_insert(now);
                        if now.duration_since(seen) >= self.timing.reset_grace {
                            tracing::debug!("no USB reset after manifestation; booting anyway");
                            self.reset();
                        }
                    }
                }
                match self.pending.take()? {
                    Next::Gone => {
                        self.link = Link::Gone;
                    }
                    Next::Mode(next) => {
                        self.link = Link::Rebooting {
                            next,
                            at: now + self.delay_for(next),
                        };
                    }
                }
                Some(LinkChange::Detach)
            }
        }
    }

    fn attached(&self) -> bool {
        self.link == Link::Attached
    }
}

impl SimMac {
    fn delay_for(&self, next: UsbMode) -> Duration {
        if next == UsbMode::Restore {
            self.timing.restore_boot
        } else {
            self.timing.boot
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(start: StartMode, faults: Faults) -> SimMac {
        SimMac::new(
            Board::load("j274ap").unwrap(),
            0x001C2B3A4D5E6F70,
            start,
            faults,
            Timing::fast(),
        )
    }

    #[test]
    fn restore_pid_knob_changes_only_restore_mode() {
        let m = mac(StartMode::Restore, Faults::default());
        assert_eq!(m.enumeration().product_id, 0x1901);
        let faults = Faults::from_specs(&["restore-pid=0x12ac"]).unwrap();
        let m = mac(StartMode::Restore, faults.clone());
        let e = m.enumeration();
        assert_eq!(e.product_id, 0x12ac);
        // The device descriptor (idProduct at bytes 10..12) says the same as the USB/IP export.
        assert_eq!(e.device_descriptor[10..12], [0xac, 0x12]);
        assert_eq!(mac(StartMode::Dfu, faults).enumeration().product_id, 0x1227);
    }

    #[test]
    fn restore_mode_stalls_usbmuxd_mode_requests() {
        // usbmuxd (since 2021) asks GET_MODE (C0/45, 4 bytes) and may send SET_MODE (C0/52);
        // nothing says a Mac's restore OS implements them, and on a stall usbmuxd completes
        // initialization in the current mode instead of waiting for a mode switch.
        let mut m = mac(StartMode::Restore, Faults::default());
        for (request, index, length) in [(0x45, 0, 4), (0x52, 1, 1)] {
            let setup = Setup {
                request_type: 0xc0,
                request,
                value: 0,
                index,
                length,
            };
            assert_eq!(m.control(&setup, &[]), Reply::Stall);
        }
    }

    #[test]
    fn identity_follows_board_and_ecid() {
        let m = mac(StartMode::Dfu, Faults::default());
        assert_eq!(m.identity().cpid, 0x8103);
        assert_eq!(m.identity().bdid, 0x22);
        assert_eq!(m.identity().serial_number.len(), 10);
        assert_eq!(m.mode(), UsbMode::Dfu);
        let other = SimMac::new(
            Board::load("j274ap").unwrap(),
            2,
            StartMode::Dfu,
            Faults::default(),
            Timing::fast(),
        );
        assert_ne!(other.identity().ap_nonce, m.identity().ap_nonce);
        assert_ne!(other.identity().serial_number, m.identity().serial_number);
    }

    #[test]
    fn start_fault_overrides_start_mode() {
        let f = Faults {
            start: Some(StartMode::Recovery),
            ..Faults::default()
        };
        let m = mac(StartMode::Dfu, f);
        assert_eq!(m.mode(), UsbMode::Recovery(1));
        assert_eq!(m.env("boot-stage").as_deref(), Some("1"));
    }

    #[test]
    fn restore_mode_forwards_the_mux_endpoints_to_the_restore_os() {
        use crate::restore::scenario::Scenario;
        use crate::restore::{RestoreConfig, RestoreOs};
        let latest = std::sync::Arc::new(std::sync::Mutex::new(None));
        let cfg = RestoreConfig {
            timeout: Duration::from_millis(200),
            ..RestoreConfig::default()
        };
        let scenario = Scenario::shipped("mac-revive").unwrap();
        let mut m = mac(StartMode::Recovery, Faults::default()).with_restore(RestoreOs::factory(
            scenario,
            cfg,
            latest.clone(),
        ));
        m.pending = Some(Next::Mode(UsbMode::Restore));
        let t0 = Instant::now();
        assert_eq!(m.poll_link(t0), Some(LinkChange::Detach));
        assert_eq!(
            m.poll_link(t0 + Duration::from_millis(100)),
            Some(LinkChange::Attach)
        );
        assert_eq!(m.mode(), UsbMode::Restore);
        let set_config = Setup {
            request_type: 0,
            request: 9,
            value: 1,
            index: 0,
            length: 0,
        };
        assert_eq!(m.control(&set_config, &[]), Reply::Ack(vec![]));
        let ep_in = crate::descriptors::EP_MUX_IN;
        let ep_out = crate::descriptors::EP_MUX_OUT;
        assert_eq!(m.bulk_in(ep_in, 16384), Reply::Nak);
        let version = [0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(m.bulk_out(ep_out, &version), Reply::Ack(vec![]));
        assert_eq!(m.bulk_in(ep_in, 16384), Reply::Ack(version.to_vec()));
        assert!(m.restore_os().is_some());
        let handle = latest.lock().unwrap().clone().unwrap();
        assert_eq!(handle.stats().packets_in, 1);
        // Leaving restore mode ends the scenario thread instead of leaving it waiting.
        m.pending = Some(Next::Mode(UsbMode::Recovery(1)));
        let t1 = Instant::now();
        m.poll_link(t1);
        m.poll_link(t1 + Duration::from_millis(100));
        assert!(matches!(
            handle.wait(Duration::from_secs(2)),
            crate::restore::restored::Outcome::Broken(_)
        ));
    }

    #[test]
    fn restore_mode_without_a_scenario_only_naks() {
        let mut m = mac(StartMode::Recovery, Faults::default());
        m.pending = Some(Next::Mode(UsbMode::Restore));
        let t0 = Instant::now();
        m.poll_link(t0);
        m.poll_link(t0 + Duration::from_millis(100));
        m.configuration = 1;
        assert_eq!(m.bulk_in(crate::descriptors::EP_MUX_IN, 512), Reply::Nak);
        assert_eq!(
            m.bulk_out(crate::descriptors::EP_MUX_OUT, &[0; 20]),
            Reply::Stall
        );
    }

    #[test]
    fn reboot_detaches_then_attaches_after_boot_delay() {
        let mut m = mac(StartMode::Recovery, Faults::default());
        m.pending = Some(Next::Mode(UsbMode::Recovery(2)));
        let t0 = Instant::now();
        assert_eq!(m.poll_link(t0), Some(LinkChange::Detach));
        assert!(!m.attached());
        assert_eq!(m.poll_link(t0 + Duration::from_millis(5)), None);
        assert_eq!(
            m.poll_link(t0 + Duration::from_millis(20)),
            Some(LinkChange::Attach)
        );
        assert_eq!(m.mode(), UsbMode::Recovery(2));
        assert_eq!(m.env("boot-stage").as_deref(), Some("2"));
        assert_eq!(m.boots(), 1);
    }
}
