//! Executes the boot-chain plans against a [`UsbBus`]: DFU upload of iBSS, stage 1, stage 2,
//! following the Mac across its re-enumerations (protocol.md §2.4, §3.3–§3.5).
//!
//! The Mac is followed by its physical port ([`DeviceInfo::location`]), which survives the
//! re-enumerations while address, PID and serial change; a device arriving elsewhere is accepted
//! only if it reports the same ECID. Hotplug is subscribed to before anything can make the Mac
//! re-enumerate, and the device list is consulted after subscribing, so no arrival is missed.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::bootchain::images::{ImageError, ImageProvider};
use crate::bootchain::plan::{self, Await, EnvCheck, PlanError, Stage, Step};
use crate::dfu::{DfuAction, DfuError, DfuOptions, DfuReply, DfuUpload};
use crate::identity::{self, AppleMode, DeviceIdentity, IdentityError, ModelKind};
use crate::manifest::{BuildManifest, ManifestError, RestoreBehavior};
use crate::recovery::{self, RecoveryError, RecoveryTransfer};
use crate::usb::{DeviceInfo, HotplugEvent, TransportError, UsbBus, UsbTransport};

/// How long to wait for what (§3.5). Production values by default; tests pass short ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// Initial device discovery ([`wait_for_device`]).
    pub discovery: Duration,
    /// After the iBSS upload: disconnect, then reconnect.
    pub ibss_disconnect: Duration,
    pub ibss_reconnect: Duration,
    /// After `go` in stage 1: disconnect, then reconnect.
    pub ibec_disconnect: Duration,
    pub ibec_reconnect: Duration,
    /// After `go` on a Mac that started in Recovery.
    pub recovery_ibec_disconnect: Duration,
    pub recovery_ibec_reconnect: Duration,
    /// After `bootx`: leave recovery.
    pub bootx_leave: Duration,
    /// After leaving recovery: a restore-mode device appears.
    pub restore_mode: Duration,
    /// Each USB transfer (libirecovery's default).
    pub transfer: Duration,
    /// Opening a re-enumerated device: attempts and the pause between them.
    pub open_attempts: u32,
    pub open_interval: Duration,
    /// Upper bound for every protocol pause (DFU status polls, the 1 s before `go`, the 2 s
    /// after `ramdisk`). Production: no bound; tests shrink it to keep the suite fast.
    pub max_pause: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            discovery: Duration::from_secs(10),
            ibss_disconnect: Duration::from_secs(10),
            ibss_reconnect: Duration::from_secs(10),
            ibec_disconnect: Duration::from_secs(10),
            ibec_reconnect: Duration::from_secs(10),
            recovery_ibec_disconnect: Duration::from_secs(60),
            recovery_ibec_reconnect: Duration::from_secs(60),
            bootx_leave: Duration::from_secs(30),
            restore_mode: Duration::from_secs(300),
            transfer: recovery::DEFAULT_TIMEOUT,
            open_attempts: 20,
            open_interval: Duration::from_secs(4),
            max_pause: Duration::from_secs(3600),
        }
    }
}

impl Timeouts {
    /// Every wait for the Mac multiplied by `factor`: slow hosts (QEMU without acceleration,
    /// USB/IP over a busy link) re-enumerate and answer many times slower than a real Mac on
    /// a real port. The number of open attempts and the protocol pauses stay as they are.
    pub fn scaled(&self, factor: f64) -> Timeouts {
        let s = |d: Duration| d.mul_f64(factor);
        Timeouts {
            discovery: s(self.discovery),
            ibss_disconnect: s(self.ibss_disconnect),
            ibss_reconnect: s(self.ibss_reconnect),
            ibec_disconnect: s(self.ibec_disconnect),
            ibec_reconnect: s(self.ibec_reconnect),
            recovery_ibec_disconnect: s(self.recovery_ibec_disconnect),
            recovery_ibec_reconnect: s(self.recovery_ibec_reconnect),
            bootx_leave: s(self.bootx_leave),
            restore_mode: s(self.restore_mode),
            transfer: s(self.transfer),
            open_attempts: self.open_attempts,
            open_interval: s(self.open_interval),
            max_pause: self.max_pause,
        }
    }
}

/// Reads a device's identity; [`identity::read_identity`] in production.
pub type IdentityReader = fn(&mut dyn UsbTransport) -> Result<DeviceIdentity, IdentityError>;

#[derive(Debug, Clone)]
pub struct DriverOptions {
    pub behavior: RestoreBehavior,
    /// Accept a Mac that is in Recovery instead of DFU.
    pub allow_recovery_start: bool,
    /// After `bootx`, wait for the restore-mode device (05ac:1901–1905 / 1290–12af).
    pub wait_for_restore: bool,
    pub timeouts: Timeouts,
    pub read_identity: IdentityReader,
}

impl Default for DriverOptions {
    fn default() -> Self {
        Self {
            behavior: RestoreBehavior::Update,
            allow_recovery_start: false,
            wait_for_restore: false,
            timeouts: Timeouts::default(),
            read_identity: identity::read_identity,
        }
    }
}

/// What happens, for the progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The Mac and the build identity chosen for it.
    Found {
        ecid: Option<u64>,
        board: String,
        mode: AppleMode,
        variant: String,
    },
    Stage(Stage),
    Upload {
        component: String,
        sent: usize,
        total: usize,
    },
    Command(String),
    Env {
        name: String,
        value: String,
    },
    Waiting(&'static str),
    Reconnected {
        mode: AppleMode,
        product_id: u16,
    },
    ApNonceChanged,
    BootxSent,
    RestoreMode {
        product_id: u16,
    },
}

/// The result of a successful run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub ecid: Option<u64>,
    pub board: String,
    pub variant: String,
    /// The restore-mode device, when asked to wait for it.
    pub restore_device: Option<DeviceInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum BootchainError {
    #[error("no Apple device in DFU appeared within {0} s: connect the Mac's DFU port to this machine and put it in DFU mode")]
    NoDevice(u64),
    #[error("the Mac is in Recovery, not DFU: shut it down, then enter DFU (hold the DFU key combination while connecting), or allow starting from Recovery (--allow-recovery; on a station: allow_recovery = true under [station] in /data/macrescue/config.toml)")]
    InRecovery,
    #[error("the Mac's USB-C port controller is in Port DFU (05ac:f014): macrescue cannot restore it yet — connect the Mac's DFU port instead (support.apple.com/120694)")]
    PortDfu,
    #[error(
        "the Apple device 05ac:{0:04x} is not in DFU or Recovery ({1}); put the Mac in DFU mode"
    )]
    WrongStartMode(u16, &'static str),
    #[error("the device on the cable is a {0}, not an Apple Silicon Mac")]
    NotAMac(&'static str),
    #[error("the device did not report its chip and board (CPID/BDID) in its serial string \"{0}\"; unplug/replug and retry")]
    NoChipIds(String),
    #[error("USB failed while {during}: {source}")]
    Transport {
        during: String,
        #[source]
        source: TransportError,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Dfu(#[from] DfuError),
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(
        "the Mac accepted only {accepted} of {sent} bytes of {component}; unplug/replug and retry"
    )]
    ShortUpload {
        component: String,
        sent: usize,
        accepted: usize,
    },
    #[error("the Mac did not restart within {secs} s after {after}; unplug/replug, re-enter DFU and retry")]
    DidNotLeave { after: &'static str, secs: u64 },
    #[error("the Mac did not come back within {secs} s after {after}; re-enter DFU and retry")]
    DidNotReturn { after: &'static str, secs: u64 },
    #[error("the Mac came back in DFU after iBSS: the ROM rejected iBSS (personalized for another Mac or an old ApNonce?)")]
    StillInDfu,
    #[error("the Mac came back in {mode:?} after {after}, expected Recovery: iBEC was most likely rejected (personalization?)")]
    UnexpectedMode {
        after: &'static str,
        mode: AppleMode,
    },
    #[error("the Mac rebooted into {0:?} after bootx: image personalization most likely failed")]
    RebootedAfterBootx(AppleMode),
    #[error("the Mac left Recovery after bootx but no restore-mode device appeared within {0} s")]
    NoRestoreMode(u64),
    #[error("lost the USB hotplug feed: {0}")]
    Hotplug(String),
    #[error("internal error in the boot-chain driver: {0}")]
    Internal(&'static str),
}

fn transport(during: impl Into<String>) -> impl FnOnce(TransportError) -> BootchainError {
    let during = during.into();
    move |source| BootchainError::Transport { during, source }
}

/// Wait up to `timeout` for an Apple device in DFU (or Recovery / Port DFU, so the caller can
/// tell the technician what is wrong), optionally with a given ECID.
pub fn wait_for_device(
    bus: &dyn UsbBus,
    ecid: Option<u64>,
    timeout: Duration,
    read_identity: IdentityReader,
) -> Result<DeviceInfo, BootchainError> {
    let rx = bus
        .watch()
        .map_err(transport("subscribing to USB hotplug"))?;
    let deadline = Instant::now() + timeout;
    let candidate = |d: &DeviceInfo| -> bool {
        if !matches!(
            AppleMode::from_ids(d.vendor_id, d.product_id),
            Some(AppleMode::Dfu | AppleMode::Recovery | AppleMode::PortDfu)
        ) {
            return false;
        }
        let Some(want) = ecid else { return true };
        match bus.open(d) {
            Ok(mut t) => read_identity(t.as_mut()).ok().and_then(|i| i.ecid) == Some(want),
            Err(e) => {
                tracing::debug!("cannot open {:?} to read its ECID: {e}", d);
                false
            }
        }
    };
    let present = bus.devices().map_err(transport("listing USB devices"))?;
    if let Some(d) = present.into_iter().find(|d| candidate(d)) {
        return Ok(d);
    }
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(HotplugEvent::Arrived(d)) if candidate(&d) => return Ok(d),
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => {
                return Err(BootchainError::NoDevice(timeout.as_secs()))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(BootchainError::Hotplug(
                    "the USB event source stopped".into(),
                ))
            }
        }
    }
}

/// The board config (`DeviceClass`) of a Mac: from macrescue's table, else from the manifest's
/// ApChipID/ApBoardID (a Mac newer than our table).
pub fn board_of(
    identity: &DeviceIdentity,
    manifest: &BuildManifest,
) -> Result<String, BootchainError> {
    if let Some(model) = identity.model {
        return match model.kind {
            ModelKind::AppleSiliconMac => Ok(model.board_config.to_string()),
            _ => Err(BootchainError::NotAMac(model.name)),
        };
    }
    match (identity.cpid, identity.bdid) {
        (Some(cpid), Some(bdid)) => Ok(manifest.board_for_chip(cpid, bdid)?),
        _ => Err(BootchainError::NoChipIds(identity.serial.clone())),
    }
}

/// The device currently being talked to.
struct Current {
    info: DeviceInfo,
    transport: Box<dyn UsbTransport>,
    identity: DeviceIdentity,
}

pub struct Driver<'a> {
    bus: &'a dyn UsbBus,
    images: &'a mut dyn ImageProvider,
    progress: &'a mut dyn FnMut(&Progress),
    options: DriverOptions,
}

impl<'a> Driver<'a> {
    pub fn new(
        bus: &'a dyn UsbBus,
        images: &'a mut dyn ImageProvider,
        progress: &'a mut dyn FnMut(&Progress),
        options: DriverOptions,
    ) -> Self {
        Self {
            bus,
            images,
            progress,
            options,
        }
    }

    /// Take the Mac at `device` from DFU (or Recovery, if allowed) to `bootx`.
    pub fn run(
        &mut self,
        device: &DeviceInfo,
        manifest: &BuildManifest,
    ) -> Result<Outcome, BootchainError> {
        // Subscribe before the first transfer: from here on no re-enumeration can be missed.
        let rx = self
            .bus
            .watch()
            .map_err(transport("subscribing to USB hotplug"))?;
        let mode = match AppleMode::from_ids(device.vendor_id, device.product_id) {
            Some(AppleMode::Dfu) => AppleMode::Dfu,
            Some(AppleMode::Recovery) if self.options.allow_recovery_start => AppleMode::Recovery,
            Some(AppleMode::Recovery) => return Err(BootchainError::InRecovery),
            Some(AppleMode::PortDfu) => return Err(BootchainError::PortDfu),
            Some(AppleMode::Restore) => {
                return Err(BootchainError::WrongStartMode(
                    device.product_id,
                    "restore mode",
                ))
            }
            Some(AppleMode::Wtf) | None => {
                return Err(BootchainError::WrongStartMode(
                    device.product_id,
                    "unknown mode",
                ))
            }
        };
        let mut cur = self.open(device, mode)?;
        let board = board_of(&cur.identity, manifest)?;
        if let Some(model) = cur.identity.model {
            manifest.check_product(model.product_type)?;
        }
        let identity = manifest.select_boot_identity(&board, self.options.behavior)?;
        (self.progress)(&Progress::Found {
            ecid: cur.identity.ecid,
            board: board.clone(),
            mode,
            variant: identity.info.variant.clone(),
        });
        let dfu_plan = plan::dfu(identity)?;
        let stage1 = plan::stage1(identity, true)?;
        let stage2 = plan::stage2(identity)?;
        let from_recovery = plan::recovery_ibec(identity)?;
        let needed = match mode {
            AppleMode::Dfu => plan::components(&[&dfu_plan, &stage1, &stage2]),
            _ => plan::components(&[&stage1, &stage2, &from_recovery]),
        };
        for c in &needed {
            self.images.check_available(c)?;
        }

        let ecid = cur.identity.ecid;
        if mode == AppleMode::Dfu {
            cur = self
                .execute(Stage::Dfu, &dfu_plan, cur, &rx)?
                .into_device()?;
            cur = self
                .execute(Stage::Stage1, &stage1, cur, &rx)?
                .into_device()?;
        } else {
            let boot_stage = self.getenv(&mut cur, "boot-stage")?;
            tracing::info!("the Mac started in Recovery with boot-stage {boot_stage:?}");
            // iBEC already running: straight to stage 2. iBSS running (an interrupted earlier
            // run): stage 1. iBoot proper: send iBEC the way idevicerestore does for a device
            // found in Recovery.
            match boot_stage.as_str() {
                "2" => {}
                "1" => {
                    cur = self
                        .execute(Stage::Stage1, &stage1, cur, &rx)?
                        .into_device()?
                }
                _ => {
                    cur = self
                        .execute(Stage::Stage1, &from_recovery, cur, &rx)?
                        .into_device()?
                }
            }
        }
        let restore_device = self
            .execute(Stage::Stage2, &stage2, cur, &rx)?
            .into_booted()?;
        Ok(Outcome {
            ecid,
            board,
            variant: identity.info.variant.clone(),
            restore_device,
        })
    }

    fn pause(&self, d: Duration) {
        std::thread::sleep(d.min(self.options.timeouts.max_pause));
    }

    /// Open a device and read its identity, retrying while it settles after an enumeration.
    fn open(&mut self, info: &DeviceInfo, mode: AppleMode) -> Result<Current, BootchainError> {
        let t = &self.options.timeouts;
        let attempts = t.open_attempts.max(1);
        let mut attempt = 0;
        let (mut transport, identity) = loop {
            attempt += 1;
            let result = self
                .bus
                .open(info)
                .map_err(BootchainError::from_open)
                .and_then(|mut tr| {
                    let id = (self.options.read_identity)(tr.as_mut())?;
                    Ok((tr, id))
                });
            match result {
                Ok(ok) => break ok,
                Err(e) if attempt < attempts && e.is_retryable() => {
                    tracing::debug!("opening {} failed (attempt {attempt}): {e}", info.location);
                    self.pause(t.open_interval);
                }
                Err(e) => return Err(e),
            }
        };
        // libirecovery's open selects configuration 1 (the edge skips it when already active).
        transport
            .set_configuration(1)
            .map_err(transport_err("selecting USB configuration 1"))?;
        transport
            .claim_interface(0, 0)
            .map_err(transport_err("claiming the Mac's USB interface"))?;
        if mode == AppleMode::Recovery && info.product_id > 0x1281 {
            // libirecovery also selects the console interface on these PIDs.
            if let Err(e) = transport
                .claim_interface(recovery::CONSOLE_INTERFACE, recovery::CONSOLE_ALT_SETTING)
            {
                tracing::warn!("cannot claim the iBoot console interface: {e}");
            }
        }
        tracing::info!(
            "opened {:04x}:{:04x} at {} (ECID {:?})",
            info.vendor_id,
            info.product_id,
            info.location,
            identity.ecid.map(|e| format!("{e:016X}"))
        );
        Ok(Current {
            info: info.clone(),
            transport,
            identity,
        })
    }

    fn execute(
        &mut self,
        stage: Stage,
        steps: &[Step],
        mut cur: Current,
        rx: &Receiver<HotplugEvent>,
    ) -> Result<Executed, BootchainError> {
        (self.progress)(&Progress::Stage(stage));
        tracing::info!("{stage}: {} steps", steps.len());
        for step in steps {
            match step {
                Step::SetConfiguration(c) => {
                    // The kernel refuses SET_CONFIGURATION while an interface is claimed.
                    let _ = cur.transport.release_interface(0);
                    cur.transport
                        .set_configuration(*c)
                        .map_err(transport_err("setting USB configuration 1"))?;
                    cur.transport
                        .claim_interface(0, 0)
                        .map_err(transport_err("claiming the Mac's USB interface"))?;
                }
                Step::DfuUpload { component } => {
                    let image = self.images.personalized(component)?;
                    self.dfu_upload(&mut cur, component, image)?;
                }
                Step::Upload { component } => {
                    let image = self.images.personalized(component)?;
                    self.upload(&mut cur, component, &image)?;
                }
                Step::Command(text) => self.command(&mut cur, text)?,
                Step::Getenv { name, check } => {
                    let value = self.getenv(&mut cur, name)?;
                    match check {
                        EnvCheck::Log => {}
                        EnvCheck::Expect(want) if value != *want => tracing::warn!(
                            "iBoot reports {name} = {value:?}, expected {want:?}; continuing"
                        ),
                        EnvCheck::Expect(_) => {}
                        EnvCheck::RadioError => {
                            if value.trim().parse::<i64>().is_ok_and(|v| v > 0) {
                                let text = self.getenv(&mut cur, "radio-error-string")?;
                                tracing::warn!("iBoot reports radio-error {value}: {text}");
                            }
                        }
                    }
                }
                Step::Sleep(d) => self.pause(*d),
                Step::KernelCacheNotify => {
                    let RecoveryTransfer::ControlOut {
                        setup,
                        data,
                        timeout,
                    } = recovery::kernelcache_notify()
                    else {
                        unreachable!("kernelcache_notify is a control OUT")
                    };
                    // idevicerestore ignores the result of this request as well.
                    if let Err(e) = cur.transport.control_out(setup, &data, timeout) {
                        tracing::debug!("21/01 notify after upload failed (ignored): {e}");
                    }
                }
                Step::Await(a) => return self.await_step(*a, cur, rx),
            }
        }
        Ok(Executed::Device(Box::new(cur)))
    }

    fn command(&mut self, cur: &mut Current, text: &str) -> Result<(), BootchainError> {
        let RecoveryTransfer::ControlOut {
            setup,
            data,
            timeout,
        } = recovery::command(text)?
        else {
            unreachable!("recovery::command builds a control OUT")
        };
        (self.progress)(&Progress::Command(text.to_string()));
        tracing::debug!("iBoot command: {text}");
        match cur
            .transport
            .control_out(setup, &data, timeout.min(self.options.timeouts.transfer))
        {
            Ok(_) => Ok(()),
            // go/bootx/reset make iBoot jump away; the transfer may fail as the device leaves.
            Err(e) if setup.request == 1 => {
                tracing::debug!("`{text}` transfer reported {e} (device leaving; ignored)");
                Ok(())
            }
            Err(e) => Err(transport_err(format!("sending the iBoot command `{text}`"))(e)),
        }
    }

    fn getenv(&mut self, cur: &mut Current, name: &str) -> Result<String, BootchainError> {
        let [cmd, read] = recovery::getenv(name)?;
        let text = format!("getenv {name}");
        for t in [cmd, read] {
            match t {
                RecoveryTransfer::ControlOut {
                    setup,
                    data,
                    timeout,
                } => {
                    cur.transport
                        .control_out(setup, &data, timeout.min(self.options.timeouts.transfer))
                        .map_err(transport_err(format!("sending `{text}`")))?;
                }
                RecoveryTransfer::ControlIn { setup, length } => {
                    let value = match cur.transport.control_in(
                        setup,
                        length,
                        self.options.timeouts.transfer,
                    ) {
                        Ok(bytes) => recovery::parse_env_reply(&bytes),
                        // An unset variable may be refused; idevicerestore only logs these.
                        Err(TransportError::Stall) => String::new(),
                        Err(e) => {
                            return Err(transport_err(format!("reading the reply to `{text}`"))(e))
                        }
                    };
                    tracing::info!("iBoot {name} = {value:?}");
                    (self.progress)(&Progress::Env {
                        name: name.to_string(),
                        value: value.clone(),
                    });
                    return Ok(value);
                }
                _ => {}
            }
        }
        Ok(String::new())
    }

    fn upload(
        &mut self,
        cur: &mut Current,
        component: &str,
        image: &[u8],
    ) -> Result<(), BootchainError> {
        let timeout = self.options.timeouts.transfer;
        (self.progress)(&Progress::Upload {
            component: component.to_string(),
            sent: 0,
            total: image.len(),
        });
        for t in recovery::upload(image.len()) {
            match t {
                RecoveryTransfer::ControlOut { setup, data, .. } => {
                    cur.transport
                        .control_out(setup, &data, timeout)
                        .map_err(transport_err(format!("starting the upload of {component}")))?;
                }
                RecoveryTransfer::BulkOut { endpoint, range } => {
                    let chunk = &image[range.clone()];
                    let accepted = cur
                        .transport
                        .bulk_out(endpoint, chunk, timeout)
                        .map_err(transport_err(format!("uploading {component}")))?;
                    if accepted != chunk.len() {
                        return Err(BootchainError::ShortUpload {
                            component: component.to_string(),
                            sent: chunk.len(),
                            accepted,
                        });
                    }
                    if !chunk.is_empty() {
                        (self.progress)(&Progress::Upload {
                            component: component.to_string(),
                            sent: range.end,
                            total: image.len(),
                        });
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn dfu_upload(
        &mut self,
        cur: &mut Current,
        component: &str,
        image: Vec<u8>,
    ) -> Result<(), BootchainError> {
        let timeout = self.options.timeouts.transfer;
        let mut up = DfuUpload::new(image, DfuOptions { port_dfu: false })?;
        let total = up.total();
        let mut reported = usize::MAX;
        loop {
            let reply = match up.next() {
                DfuAction::ControlIn { setup, length } => cur
                    .transport
                    .control_in(setup, length, timeout)
                    .map(DfuReply::Data),
                DfuAction::ControlOut { setup, data } => cur
                    .transport
                    .control_out(setup, &data, timeout)
                    .map(DfuReply::Written),
                DfuAction::Reset => cur.transport.reset().map(|()| DfuReply::Done),
                DfuAction::Sleep(d) => {
                    self.pause(d);
                    Ok(DfuReply::Done)
                }
                DfuAction::Done => return Ok(()),
            };
            up.on_reply(reply)?;
            if up.bytes_sent() != reported {
                reported = up.bytes_sent();
                (self.progress)(&Progress::Upload {
                    component: component.to_string(),
                    sent: reported,
                    total,
                });
            }
        }
    }

    fn await_step(
        &mut self,
        step: Await,
        cur: Current,
        rx: &Receiver<HotplugEvent>,
    ) -> Result<Executed, BootchainError> {
        let t = self.options.timeouts.clone();
        let (after, leave, back) = match step {
            Await::AfterIbss => ("the iBSS upload", t.ibss_disconnect, t.ibss_reconnect),
            Await::AfterIbec => ("iBEC", t.ibec_disconnect, t.ibec_reconnect),
            Await::AfterIbecFromRecovery => (
                "iBEC",
                t.recovery_ibec_disconnect,
                t.recovery_ibec_reconnect,
            ),
            Await::AfterBootx => return self.await_bootx(cur, rx),
        };
        (self.progress)(&Progress::Waiting(match step {
            Await::AfterIbss => "the Mac to restart into iBSS",
            _ => "the Mac to restart into iBEC",
        }));
        let old = cur.info.clone();
        let old_identity = cur.identity.clone();
        // Close the old handle so the OS can let go of the vanishing device.
        drop(cur);
        let mut elsewhere = Vec::new();
        let early = self.wait_departure(&old, rx, leave, after, &mut elsewhere)?;
        let info =
            self.wait_arrival(&old, old_identity.ecid, rx, back, after, early, &elsewhere)?;
        let mode = AppleMode::from_ids(info.vendor_id, info.product_id);
        match (step, mode) {
            (_, Some(AppleMode::Recovery)) => {}
            (Await::AfterIbss, Some(AppleMode::Dfu)) => return Err(BootchainError::StillInDfu),
            (_, Some(mode)) => return Err(BootchainError::UnexpectedMode { after, mode }),
            (_, None) => {
                return Err(BootchainError::WrongStartMode(
                    info.product_id,
                    "unknown mode",
                ))
            }
        }
        let new = self.open(&info, AppleMode::Recovery)?;
        (self.progress)(&Progress::Reconnected {
            mode: AppleMode::Recovery,
            product_id: info.product_id,
        });
        if let (Some(e_old), Some(e_new)) = (old_identity.ecid, new.identity.ecid) {
            if e_old != e_new {
                tracing::warn!("a Mac with ECID {e_new:016X} took the place of {e_old:016X}");
            }
        }
        if let Some(ap) = &new.identity.ap_nonce {
            if old_identity.ap_nonce.as_ref() != Some(ap) {
                tracing::info!("ApNonce changed after {after}: {}", hex::encode(ap));
                (self.progress)(&Progress::ApNonceChanged);
                self.images
                    .nonces_changed(ap, new.identity.sep_nonce.as_deref())?;
            }
        }
        Ok(Executed::Device(Box::new(new)))
    }

    fn await_bootx(
        &mut self,
        cur: Current,
        rx: &Receiver<HotplugEvent>,
    ) -> Result<Executed, BootchainError> {
        let t = self.options.timeouts.clone();
        (self.progress)(&Progress::BootxSent);
        (self.progress)(&Progress::Waiting("the Mac to leave Recovery"));
        let old = cur.info.clone();
        let ecid = cur.identity.ecid;
        drop(cur);
        let mut elsewhere = Vec::new();
        let early = self.wait_departure(&old, rx, t.bootx_leave, "bootx", &mut elsewhere)?;
        if !self.options.wait_for_restore {
            return Ok(Executed::Booted(None));
        }
        (self.progress)(&Progress::Waiting("the restore ramdisk to come up"));
        let info =
            match self.wait_arrival(&old, ecid, rx, t.restore_mode, "bootx", early, &elsewhere) {
                Ok(info) => info,
                Err(BootchainError::DidNotReturn { .. }) => {
                    return Err(BootchainError::NoRestoreMode(t.restore_mode.as_secs()))
                }
                Err(e) => return Err(e),
            };
        match AppleMode::from_ids(info.vendor_id, info.product_id) {
            Some(AppleMode::Restore) => {
                (self.progress)(&Progress::RestoreMode {
                    product_id: info.product_id,
                });
                Ok(Executed::Booted(Some(info)))
            }
            Some(mode) => Err(BootchainError::RebootedAfterBootx(mode)),
            None => Err(BootchainError::WrongStartMode(
                info.product_id,
                "unknown mode",
            )),
        }
    }

    /// Wait until `old` leaves the bus. Returns a re-arrival at the same port if that was seen
    /// first (the departure event can be lost on some hosts). Apple devices arriving at other
    /// ports meanwhile are collected in `elsewhere`: the Mac may come back on another port
    /// before the host notices it left this one (a USB/IP client that could not wait for the
    /// old port, a busy hub thread), and that arrival must not be lost.
    fn wait_departure(
        &mut self,
        old: &DeviceInfo,
        rx: &Receiver<HotplugEvent>,
        timeout: Duration,
        after: &'static str,
        elsewhere: &mut Vec<DeviceInfo>,
    ) -> Result<Option<DeviceInfo>, BootchainError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(HotplugEvent::Left(d)) if d.location == old.location => return Ok(None),
                Ok(HotplugEvent::Arrived(d))
                    if d.location == old.location && !same_enumeration(&d, old) =>
                {
                    return Ok(Some(d))
                }
                Ok(HotplugEvent::Arrived(d)) if is_apple(&d) => elsewhere.push(d),
                Ok(HotplugEvent::Left(d)) => elsewhere.retain(|e| !same_enumeration(e, &d)),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(BootchainError::Hotplug(
                        "the USB event source stopped".into(),
                    ))
                }
            }
        }
        // No departure seen: trust the device list over the silence.
        let present = self
            .bus
            .devices()
            .map_err(transport_err("listing USB devices"))?;
        if present.iter().any(|d| same_enumeration(d, old)) {
            return Err(BootchainError::DidNotLeave {
                after,
                secs: timeout.as_secs(),
            });
        }
        Ok(None)
    }

    /// Wait for the Mac to show up again: at the same port, or elsewhere with the same ECID
    /// (including the devices `elsewhere` that arrived while it was leaving).
    #[allow(clippy::too_many_arguments)]
    fn wait_arrival(
        &mut self,
        old: &DeviceInfo,
        ecid: Option<u64>,
        rx: &Receiver<HotplugEvent>,
        timeout: Duration,
        after: &'static str,
        early: Option<DeviceInfo>,
        elsewhere: &[DeviceInfo],
    ) -> Result<DeviceInfo, BootchainError> {
        if let Some(d) = early {
            return Ok(d);
        }
        let deadline = Instant::now() + timeout;
        let present = self
            .bus
            .devices()
            .map_err(transport_err("listing USB devices"))?;
        if let Some(d) = present
            .iter()
            .find(|d| d.location == old.location && is_apple(d) && !same_enumeration(d, old))
        {
            return Ok(d.clone());
        }
        for d in elsewhere {
            if present.iter().any(|p| same_enumeration(p, d)) && self.has_ecid(d, ecid) {
                return Ok(d.clone());
            }
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(HotplugEvent::Arrived(d)) if is_apple(&d) => {
                    if d.location == old.location || self.has_ecid(&d, ecid) {
                        return Ok(d);
                    }
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(BootchainError::DidNotReturn {
                        after,
                        secs: timeout.as_secs(),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(BootchainError::Hotplug(
                        "the USB event source stopped".into(),
                    ))
                }
            }
        }
    }

    fn has_ecid(&self, d: &DeviceInfo, ecid: Option<u64>) -> bool {
        let Some(want) = ecid else { return false };
        if !matches!(
            AppleMode::from_ids(d.vendor_id, d.product_id),
            Some(AppleMode::Dfu | AppleMode::Recovery)
        ) {
            return false;
        }
        match self.bus.open(d) {
            Ok(mut t) => {
                (self.options.read_identity)(t.as_mut())
                    .ok()
                    .and_then(|i| i.ecid)
                    == Some(want)
            }
            Err(_) => false,
        }
    }
}

fn is_apple(d: &DeviceInfo) -> bool {
    AppleMode::from_ids(d.vendor_id, d.product_id).is_some()
}

/// The very same enumeration (not merely the same port).
fn same_enumeration(a: &DeviceInfo, b: &DeviceInfo) -> bool {
    a.location == b.location && a.address == b.address && a.product_id == b.product_id
}

fn transport_err(during: impl Into<String>) -> impl FnOnce(TransportError) -> BootchainError {
    transport(during)
}

enum Executed {
    Device(Box<Current>),
    Booted(Option<DeviceInfo>),
}

impl Executed {
    fn into_device(self) -> Result<Current, BootchainError> {
        match self {
            Executed::Device(c) => Ok(*c),
            Executed::Booted(_) => Err(BootchainError::Internal("a plan booted the Mac early")),
        }
    }

    fn into_booted(self) -> Result<Option<DeviceInfo>, BootchainError> {
        match self {
            Executed::Booted(d) => Ok(d),
            Executed::Device(_) => Err(BootchainError::Internal("stage 2 ended without bootx")),
        }
    }
}

impl BootchainError {
    fn from_open(e: TransportError) -> BootchainError {
        transport("opening the Mac over USB")(e)
    }

    /// Worth another attempt while a device settles after enumeration.
    fn is_retryable(&self) -> bool {
        match self {
            BootchainError::Transport { source, .. } => !matches!(
                source,
                TransportError::Access | TransportError::Unavailable(_)
            ),
            // A device that just enumerated may still stall or garble its first descriptors.
            BootchainError::Identity(
                IdentityError::Transport(_) | IdentityError::Descriptor(_),
            ) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usb::{ControlSetup, UsbLocation};
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::mpsc::{channel, Sender};
    use std::sync::{Arc, Mutex};

    const NONCE1: [u8; 4] = [0xAA, 0xBB, 0xCC, 0xDD];
    const NONCE2: [u8; 4] = [0x11, 0x22, 0x33, 0x44];
    const ECID: u64 = 0x001C_2B3A_4D5E_6F70;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Firmware {
        Rom,
        IBoot,
        Ibss,
        Ibec,
        Gone,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum AfterIbss {
        Recovery,
        Dfu,
        Nothing,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum AfterBootx {
        Restore,
        Recovery,
        Nothing,
    }

    struct Mac {
        location: UsbLocation,
        address: u8,
        pid: u16,
        firmware: Firmware,
        ecid: u64,
        cpid: u32,
        bdid: u32,
        nonce: Vec<u8>,
        nonce_after_ibss: Vec<u8>,
        after_ibss: AfterIbss,
        after_bootx: AfterBootx,
        /// Re-enumerate on this port instead of the original one.
        move_to: Option<UsbLocation>,
        /// When moving: the arrival on the new port is reported before the departure from the
        /// old one (a host whose hub thread is slow to notice the old port).
        arrive_before_leaving: bool,
        senders: Vec<Sender<HotplugEvent>>,
        trace: Vec<String>,
        dfu_ops: Vec<String>,
        uploads: Vec<(String, Vec<u8>)>,
        dfu_image: Vec<u8>,
        last_getenv: Option<String>,
        zlps: Vec<String>,
        /// `go` sent to iBoot proper: jump once the 21/01 that follows it arrives.
        go_pending: bool,
        /// What GET_STATE answers.
        dfu_state: u8,
        /// iBoot stalls this command.
        stall_command: Option<&'static str>,
        /// boot-stage iBSS reports (real iBSS: "1").
        ibss_boot_stage: &'static str,
    }

    impl Mac {
        fn info(&self) -> DeviceInfo {
            DeviceInfo {
                location: self.location.clone(),
                address: self.address,
                vendor_id: 0x05ac,
                product_id: self.pid,
            }
        }

        fn emit(&mut self, e: HotplugEvent) {
            self.senders.retain(|s| s.send(e.clone()).is_ok());
        }

        fn reenumerate(&mut self, firmware: Firmware, pid: Option<u16>) {
            let old = self.info();
            let late_departure = self.arrive_before_leaving && self.move_to.is_some();
            if !late_departure {
                self.emit(HotplugEvent::Left(old.clone()));
            }
            self.firmware = firmware;
            self.address += 1;
            if let Some(loc) = self.move_to.take() {
                self.location = loc;
            }
            match pid {
                Some(pid) => {
                    self.pid = pid;
                    let new = self.info();
                    self.emit(HotplugEvent::Arrived(new));
                }
                None => self.firmware = Firmware::Gone,
            }
            if late_departure {
                self.emit(HotplugEvent::Left(old));
            }
        }

        fn serial(&self) -> String {
            format!(
                "CPID:{:04X} BDID:{:02X} ECID:{:016X} NONC:{}",
                self.cpid,
                self.bdid,
                self.ecid,
                hex::encode_upper(&self.nonce)
            )
        }

        fn getenv(&self, name: &str) -> String {
            match (name, self.firmware) {
                ("boot-stage", Firmware::Ibss) => self.ibss_boot_stage.into(),
                ("boot-stage", Firmware::Ibec) => "2".into(),
                ("boot-stage", _) => "0".into(),
                ("build-version", _) => "iBoot-13822.61.10".into(),
                ("build-style", _) => "RELEASE".into(),
                ("radio-error", _) => "0".into(),
                ("ramdisk-size", _) => "0x20000000".into(),
                _ => String::new(),
            }
        }
    }

    type Shared = Arc<Mutex<Mac>>;

    struct FakeBus {
        mac: Shared,
        others: Vec<DeviceInfo>,
        /// Opens of the Mac that fail with Busy before one succeeds (the kernel still holds it).
        busy_opens: Mutex<u32>,
    }

    struct FakeTransport {
        mac: Shared,
        info: DeviceInfo,
    }

    impl FakeTransport {
        fn live(&self) -> Result<std::sync::MutexGuard<'_, Mac>, TransportError> {
            let m = self.mac.lock().unwrap();
            if m.firmware == Firmware::Gone || m.info() != self.info {
                return Err(TransportError::Disconnected);
            }
            Ok(m)
        }
    }

    impl UsbTransport for FakeTransport {
        fn info(&self) -> &DeviceInfo {
            &self.info
        }

        fn control_in(
            &mut self,
            setup: ControlSetup,
            length: u16,
            _timeout: Duration,
        ) -> Result<Vec<u8>, TransportError> {
            let mut m = self.live()?;
            match (setup.request_type, setup.request) {
                (0x80, 6) => Ok(m.serial().into_bytes()),
                (0xA1, 5) => {
                    m.dfu_ops.push("GET_STATE".into());
                    Ok(vec![m.dfu_state])
                }
                (0xA1, 3) => {
                    m.dfu_ops.push("GET_STATUS".into());
                    Ok(vec![0, 0, 0, 0, 5, 0])
                }
                (0xC0, 0) => {
                    assert_eq!(length, 255);
                    m.trace.push("read".into());
                    let name = m.last_getenv.take().unwrap_or_default();
                    let mut v = m.getenv(&name).into_bytes();
                    v.push(0);
                    Ok(v)
                }
                other => panic!("unexpected control IN {other:?}"),
            }
        }

        fn control_out(
            &mut self,
            setup: ControlSetup,
            data: &[u8],
            timeout: Duration,
        ) -> Result<usize, TransportError> {
            let mut m = self.live()?;
            match (setup.request_type, setup.request) {
                (0x21, 4 | 6) if m.firmware == Firmware::Rom => {
                    m.dfu_ops.push(format!("REQ {}", setup.request));
                    Ok(0)
                }
                (0x21, 1) if m.firmware == Firmware::Rom => {
                    m.dfu_ops
                        .push(format!("DNLOAD {} {}", setup.value, data.len()));
                    // Blocks carry the image; the suffix is the last 16 bytes of the last one.
                    m.dfu_image.extend_from_slice(data);
                    Ok(data.len())
                }
                (0x21, 1) => {
                    assert!(data.is_empty());
                    assert_eq!(timeout, Duration::from_millis(5000));
                    m.trace.push("notify 21/01".into());
                    if m.go_pending {
                        m.go_pending = false;
                        m.reenumerate(Firmware::Ibec, Some(0x1281));
                    }
                    Ok(0)
                }
                (0x41, 0) => {
                    assert!(data.is_empty());
                    m.uploads.push((String::new(), Vec::new()));
                    Ok(0)
                }
                (0x40, req) => {
                    assert_eq!(data.last(), Some(&0));
                    let text = String::from_utf8(data[..data.len() - 1].to_vec()).unwrap();
                    if m.stall_command == Some(text.as_str()) {
                        return Err(TransportError::Stall);
                    }
                    m.trace.push(if req == 1 {
                        format!("cmd1 {text}")
                    } else {
                        format!("cmd {text}")
                    });
                    if let Some(name) = text.strip_prefix("getenv ") {
                        m.last_getenv = Some(name.to_string());
                    }
                    match (text.as_str(), m.firmware) {
                        ("go", Firmware::IBoot) => m.go_pending = true,
                        ("go", Firmware::Ibss) => m.reenumerate(Firmware::Ibec, Some(0x1281)),
                        ("bootx", Firmware::Ibec) => match m.after_bootx {
                            AfterBootx::Restore => m.reenumerate(Firmware::Gone, Some(0x1901)),
                            AfterBootx::Recovery => m.reenumerate(Firmware::IBoot, Some(0x1281)),
                            AfterBootx::Nothing => m.reenumerate(Firmware::Gone, None),
                        },
                        _ => {}
                    }
                    Ok(data.len())
                }
                other => panic!("unexpected control OUT {other:?}"),
            }
        }

        fn bulk_out(
            &mut self,
            endpoint: u8,
            data: &[u8],
            _timeout: Duration,
        ) -> Result<usize, TransportError> {
            let mut m = self.live()?;
            assert_eq!(endpoint, 0x04);
            let (name, buf) = m.uploads.last_mut().expect("bulk without 41/00");
            if data.is_empty() {
                let n = name.clone();
                m.zlps.push(n);
                return Ok(0);
            }
            buf.extend_from_slice(data);
            if name.is_empty() {
                let end = buf.iter().position(|&b| b == b'|').unwrap();
                *name = String::from_utf8(buf[..end].to_vec()).unwrap();
                let line = format!("upload {name}");
                m.trace.push(line);
            }
            Ok(data.len())
        }

        fn bulk_in(&mut self, _: u8, _: usize, _: Duration) -> Result<Vec<u8>, TransportError> {
            Err(TransportError::Timeout(Duration::ZERO))
        }

        fn set_configuration(&mut self, configuration: u8) -> Result<(), TransportError> {
            let mut m = self.live()?;
            m.trace.push(format!("setconfig {configuration}"));
            Ok(())
        }

        fn claim_interface(&mut self, _: u8, _: u8) -> Result<(), TransportError> {
            self.live().map(|_| ())
        }

        fn release_interface(&mut self, _: u8) -> Result<(), TransportError> {
            self.live().map(|_| ())
        }

        fn reset(&mut self) -> Result<(), TransportError> {
            let mut m = self.live()?;
            m.dfu_ops.push("RESET".into());
            match m.after_ibss {
                AfterIbss::Recovery => {
                    m.nonce = m.nonce_after_ibss.clone();
                    m.reenumerate(Firmware::Ibss, Some(0x1281))
                }
                AfterIbss::Dfu => m.reenumerate(Firmware::Rom, Some(0x1227)),
                AfterIbss::Nothing => m.reenumerate(Firmware::Gone, None),
            }
            Ok(())
        }
    }

    impl UsbBus for FakeBus {
        fn devices(&self) -> Result<Vec<DeviceInfo>, TransportError> {
            let m = self.mac.lock().unwrap();
            let mut v = self.others.clone();
            if m.firmware != Firmware::Gone {
                v.push(m.info());
            }
            Ok(v)
        }

        fn open(&self, device: &DeviceInfo) -> Result<Box<dyn UsbTransport>, TransportError> {
            let m = self.mac.lock().unwrap();
            if m.firmware == Firmware::Gone || m.info() != *device {
                return Err(TransportError::Disconnected);
            }
            let mut busy = self.busy_opens.lock().unwrap();
            if *busy > 0 {
                *busy -= 1;
                return Err(TransportError::Busy);
            }
            Ok(Box::new(FakeTransport {
                mac: self.mac.clone(),
                info: device.clone(),
            }))
        }

        fn watch(&self) -> Result<Receiver<HotplugEvent>, TransportError> {
            let (tx, rx) = channel();
            self.mac.lock().unwrap().senders.push(tx);
            Ok(rx)
        }
    }

    fn fake_identity(t: &mut dyn UsbTransport) -> Result<DeviceIdentity, IdentityError> {
        let bytes = t.control_in(
            ControlSetup::new(0x80, 6, 0x0303, 0x0409),
            255,
            Duration::ZERO,
        )?;
        let serial = String::from_utf8(bytes).unwrap();
        let mut id = DeviceIdentity {
            mode: AppleMode::from_ids(t.info().vendor_id, t.info().product_id),
            serial: serial.clone(),
            ..Default::default()
        };
        for tok in serial.split(' ') {
            let (k, v) = tok.split_once(':').unwrap();
            match k {
                "CPID" => id.cpid = u32::from_str_radix(v, 16).ok(),
                "BDID" => id.bdid = u32::from_str_radix(v, 16).ok(),
                "ECID" => id.ecid = u64::from_str_radix(v, 16).ok(),
                "NONC" => id.ap_nonce = hex::decode(v).ok(),
                _ => {}
            }
        }
        Ok(id)
    }

    #[derive(Default)]
    struct FakeImages {
        missing: Option<&'static str>,
        nonces: Vec<Vec<u8>>,
        fetched: Vec<String>,
    }

    fn image_for(component: &str) -> Vec<u8> {
        let size = match component {
            "iBSS" => 5000,
            "RestoreRamDisk" => 2 * 0x8000 + 512,
            "RestoreKernelCache" => 0x8000 + 77,
            _ => 300,
        };
        let mut v = format!("{component}|").into_bytes();
        v.resize(size, 0xA5);
        v
    }

    impl ImageProvider for FakeImages {
        fn personalized(&mut self, component: &str) -> Result<Vec<u8>, ImageError> {
            self.fetched.push(component.to_string());
            Ok(image_for(component))
        }

        fn nonces_changed(
            &mut self,
            ap_nonce: &[u8],
            _sep_nonce: Option<&[u8]>,
        ) -> Result<(), ImageError> {
            self.nonces.push(ap_nonce.to_vec());
            Ok(())
        }

        fn check_available(&self, component: &str) -> Result<(), ImageError> {
            if self.missing == Some(component) {
                return Err(ImageError::Missing {
                    component: component.into(),
                    path: format!("/x/{component}.img4"),
                });
            }
            Ok(())
        }
    }

    fn manifest(board: &str) -> BuildManifest {
        let shared = std::env::var_os("MACRESCUE_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")));
        BuildManifest::from_path(&shared.join(format!(
            "fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests/{board}.BuildManifest.plist"
        )))
        .unwrap()
    }

    fn mac(pid: u16, firmware: Firmware) -> Shared {
        Arc::new(Mutex::new(Mac {
            location: UsbLocation {
                bus: 1,
                ports: vec![2],
            },
            address: 5,
            pid,
            firmware,
            ecid: ECID,
            cpid: 0x8103,
            bdid: 0x22,
            nonce: NONCE1.to_vec(),
            nonce_after_ibss: NONCE1.to_vec(),
            after_ibss: AfterIbss::Recovery,
            after_bootx: AfterBootx::Restore,
            move_to: None,
            arrive_before_leaving: false,
            senders: Vec::new(),
            trace: Vec::new(),
            dfu_ops: Vec::new(),
            uploads: Vec::new(),
            dfu_image: Vec::new(),
            last_getenv: None,
            zlps: Vec::new(),
            go_pending: false,
            dfu_state: 2,
            stall_command: None,
            ibss_boot_stage: "1",
        }))
    }

    fn short_timeouts() -> Timeouts {
        let t = Duration::from_millis(200);
        Timeouts {
            discovery: t,
            ibss_disconnect: t,
            ibss_reconnect: t,
            ibec_disconnect: t,
            ibec_reconnect: t,
            recovery_ibec_disconnect: t,
            recovery_ibec_reconnect: t,
            bootx_leave: t,
            restore_mode: t,
            transfer: t,
            open_attempts: 2,
            open_interval: Duration::ZERO,
            max_pause: Duration::ZERO,
        }
    }

    fn options() -> DriverOptions {
        DriverOptions {
            behavior: RestoreBehavior::Update,
            allow_recovery_start: false,
            wait_for_restore: true,
            timeouts: short_timeouts(),
            read_identity: fake_identity,
        }
    }

    struct Run {
        result: Result<Outcome, BootchainError>,
        progress: Vec<Progress>,
        images: FakeImages,
    }

    fn run(bus: &FakeBus, images: FakeImages, options: DriverOptions) -> Run {
        let mut images = images;
        let mut progress = Vec::new();
        let device = bus.mac.lock().unwrap().info();
        let m = manifest("J274AP");
        let result = {
            let mut cb = |p: &Progress| progress.push(p.clone());
            let mut d = Driver::new(bus, &mut images, &mut cb, options);
            d.run(&device, &m)
        };
        Run {
            result,
            progress,
            images,
        }
    }

    fn bus(mac: Shared) -> FakeBus {
        FakeBus {
            mac,
            others: vec![DeviceInfo {
                location: UsbLocation {
                    bus: 1,
                    ports: vec![3],
                },
                address: 9,
                vendor_id: 0x1d6b,
                product_id: 0x0002,
            }],
            busy_opens: Mutex::new(0),
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn fw(names: &[&str]) -> Vec<String> {
        names
            .iter()
            .flat_map(|n| [format!("upload {n}"), "cmd firmware".to_string()])
            .collect()
    }

    fn stage1_trace() -> Vec<String> {
        let mut v = s(&[
            "setconfig 1",
            "upload Ap,LocalPolicy",
            "cmd lpolrestore",
            "cmd getenv boot-stage",
            "read",
        ]);
        v.extend(fw(&[
            "Ap,RestoreCIO",
            "Ap,RestoreTMU",
            "RestoreANS",
            "RestoreDCP",
        ]));
        v.extend(s(&[
            "cmd setenv auto-boot false",
            "cmd saveenv",
            "cmd setenvnp boot-args rd=md0 nand-enable-reformat=1 -progress -restore",
            "upload RestoreLogo",
            "cmd setpicture 4",
            "cmd bgcolor 0 0 0",
            "upload iBEC",
            "cmd1 go",
        ]));
        v
    }

    fn stage2_trace() -> Vec<String> {
        let mut v = s(&[
            "cmd getenv build-version",
            "read",
            "cmd getenv build-style",
            "read",
            "cmd getenv boot-stage",
            "read",
            "cmd getenv radio-error",
            "read",
            "cmd setenv auto-boot false",
            "cmd saveenv",
            "upload RestoreLogo",
            "cmd setpicture 4",
            "cmd bgcolor 0 0 0",
        ]);
        v.extend(fw(&[
            "ANE",
            "AOP",
            "AVE",
            "Ap,RestoreDCP2",
            "GFX",
            "PMP",
            "RestoreTrustCache",
            "SIO",
            "iBootData",
        ]));
        v.extend(s(&[
            "cmd getenv ramdisk-size",
            "read",
            "upload RestoreRamDisk",
            "cmd getenv ramdisk-delay",
            "cmd ramdisk",
            "upload RestoreDeviceTree",
            "cmd devicetree",
            "upload RestoreSEP",
            "cmd rsepfirmware",
            "upload RestoreKernelCache",
            "notify 21/01",
            "cmd setenv boot-args rd=md0 nand-enable-reformat=1 -progress -restore",
            "cmd1 bootx",
        ]));
        v
    }

    #[test]
    fn dfu_to_restore_mode_in_exact_order() {
        let mac = mac(0x1227, Firmware::Rom);
        let bus = bus(mac.clone());
        let r = run(&bus, FakeImages::default(), options());
        let outcome = r.result.unwrap();
        assert_eq!(outcome.ecid, Some(ECID));
        assert_eq!(outcome.board, "j274ap");
        assert_eq!(outcome.variant, "Customer Software Update");
        let restore = outcome.restore_device.unwrap();
        assert_eq!(restore.product_id, 0x1901);
        assert_eq!(
            restore.location,
            UsbLocation {
                bus: 1,
                ports: vec![2]
            }
        );

        let m = mac.lock().unwrap();
        // DFU: 5000 bytes = 2 full blocks + 904 (+16 suffix fits), then finish and reset.
        assert_eq!(
            m.dfu_ops,
            s(&[
                "GET_STATE",
                "DNLOAD 0 2048",
                "GET_STATUS",
                "DNLOAD 1 2048",
                "GET_STATUS",
                "DNLOAD 2 920",
                "GET_STATUS",
                "DNLOAD 3 0",
                "GET_STATUS",
                "GET_STATUS",
                "RESET"
            ])
        );
        assert_eq!(&m.dfu_image[..5000], &image_for("iBSS")[..]);
        assert_eq!(&m.dfu_image[5000..5012], &crate::dfu::DFU_SUFFIX_FIXED);

        // "setconfig 1" also opens every enumeration (libirecovery's open does the same).
        let mut expected = s(&["setconfig 1", "setconfig 1"]);
        expected.extend(stage1_trace());
        expected.push("setconfig 1".into());
        expected.extend(stage2_trace());
        assert_eq!(m.trace, expected);
        // Every upload arrived byte for byte; ZLP only for the 512-multiple ramdisk.
        for (name, bytes) in &m.uploads {
            assert_eq!(bytes, &image_for(name), "{name}");
        }
        assert_eq!(m.zlps, s(&["RestoreRamDisk"]));
        drop(m);

        assert!(r.images.nonces.is_empty());
        assert_eq!(r.images.fetched[0], "iBSS");
        assert!(r.progress.contains(&Progress::Found {
            ecid: Some(ECID),
            board: "j274ap".into(),
            mode: AppleMode::Dfu,
            variant: "Customer Software Update".into()
        }));
        assert!(r.progress.contains(&Progress::Upload {
            component: "iBSS".into(),
            sent: 5000,
            total: 5000
        }));
        assert!(r.progress.contains(&Progress::Upload {
            component: "RestoreRamDisk".into(),
            sent: 0x8000,
            total: 2 * 0x8000 + 512
        }));
        assert!(r.progress.contains(&Progress::BootxSent));
        assert!(r
            .progress
            .contains(&Progress::RestoreMode { product_id: 0x1901 }));
        let stages: Vec<_> = r
            .progress
            .iter()
            .filter_map(|p| match p {
                Progress::Stage(s) => Some(*s),
                _ => None,
            })
            .collect();
        assert_eq!(stages, vec![Stage::Dfu, Stage::Stage1, Stage::Stage2]);
    }

    #[test]
    fn without_waiting_for_restore_returns_once_the_mac_left() {
        let mac = mac(0x1227, Firmware::Rom);
        mac.lock().unwrap().after_bootx = AfterBootx::Nothing;
        let mut o = options();
        o.wait_for_restore = false;
        let r = run(&bus(mac), FakeImages::default(), o);
        assert_eq!(r.result.unwrap().restore_device, None);
    }

    #[test]
    fn changed_nonce_after_ibss_is_reported_to_the_image_provider() {
        let mac = mac(0x1227, Firmware::Rom);
        mac.lock().unwrap().nonce_after_ibss = NONCE2.to_vec();
        let r = run(&bus(mac), FakeImages::default(), options());
        r.result.unwrap();
        assert_eq!(r.images.nonces, vec![NONCE2.to_vec()]);
        assert!(r.progress.contains(&Progress::ApNonceChanged));
    }

    #[test]
    fn recovery_start_is_refused_unless_allowed() {
        let mac = mac(0x1281, Firmware::IBoot);
        let r = run(&bus(mac.clone()), FakeImages::default(), options());
        let err = r.result.unwrap_err();
        assert!(matches!(err, BootchainError::InRecovery));
        assert!(err.to_string().contains("enter DFU"), "{err}");
        assert!(mac.lock().unwrap().trace.is_empty());
    }

    #[test]
    fn recovery_start_from_iboot_sends_ibec_then_stage2() {
        let mac = mac(0x1281, Firmware::IBoot);
        let mut o = options();
        o.allow_recovery_start = true;
        let r = run(&bus(mac.clone()), FakeImages::default(), o);
        r.result.unwrap();
        let mut expected = s(&[
            "setconfig 1",
            "cmd getenv boot-stage",
            "read",
            "upload iBEC",
            "cmd1 go",
            "notify 21/01",
            "setconfig 1",
        ]);
        expected.extend(stage2_trace());
        assert_eq!(mac.lock().unwrap().trace, expected);
    }

    #[test]
    fn recovery_start_with_ibec_running_goes_straight_to_stage2() {
        let mac = mac(0x1281, Firmware::Ibec);
        let mut o = options();
        o.allow_recovery_start = true;
        let r = run(&bus(mac.clone()), FakeImages::default(), o);
        r.result.unwrap();
        let mut expected = s(&["setconfig 1", "cmd getenv boot-stage", "read"]);
        expected.extend(stage2_trace());
        assert_eq!(mac.lock().unwrap().trace, expected);
    }

    #[test]
    fn recovery_start_with_ibss_running_runs_stage1() {
        let mac = mac(0x1281, Firmware::Ibss);
        let mut o = options();
        o.allow_recovery_start = true;
        let r = run(&bus(mac.clone()), FakeImages::default(), o);
        r.result.unwrap();
        let mut expected = s(&["setconfig 1", "cmd getenv boot-stage", "read"]);
        expected.extend(stage1_trace());
        expected.push("setconfig 1".into());
        expected.extend(stage2_trace());
        assert_eq!(mac.lock().unwrap().trace, expected);
    }

    #[test]
    fn rebooting_into_recovery_after_bootx_blames_personalization() {
        let mac = mac(0x1227, Firmware::Rom);
        mac.lock().unwrap().after_bootx = AfterBootx::Recovery;
        let err = run(&bus(mac), FakeImages::default(), options())
            .result
            .unwrap_err();
        assert!(matches!(
            err,
            BootchainError::RebootedAfterBootx(AppleMode::Recovery)
        ));
        assert_eq!(
            err.to_string(),
            "the Mac rebooted into Recovery after bootx: image personalization most likely failed"
        );
    }

    #[test]
    fn no_restore_device_after_bootx_times_out() {
        let mac = mac(0x1227, Firmware::Rom);
        mac.lock().unwrap().after_bootx = AfterBootx::Nothing;
        let err = run(&bus(mac), FakeImages::default(), options())
            .result
            .unwrap_err();
        assert!(matches!(err, BootchainError::NoRestoreMode(_)), "{err}");
    }

    #[test]
    fn staying_in_dfu_after_ibss_is_an_error() {
        let mac = mac(0x1227, Firmware::Rom);
        mac.lock().unwrap().after_ibss = AfterIbss::Dfu;
        let err = run(&bus(mac.clone()), FakeImages::default(), options())
            .result
            .unwrap_err();
        assert!(matches!(err, BootchainError::StillInDfu), "{err}");
        assert_eq!(mac.lock().unwrap().trace, s(&["setconfig 1"]));
    }

    #[test]
    fn not_coming_back_after_ibss_times_out() {
        let mac = mac(0x1227, Firmware::Rom);
        mac.lock().unwrap().after_ibss = AfterIbss::Nothing;
        let err = run(&bus(mac), FakeImages::default(), options())
            .result
            .unwrap_err();
        assert!(
            matches!(
                err,
                BootchainError::DidNotReturn {
                    after: "the iBSS upload",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn follows_the_same_ecid_to_another_port() {
        let mac = mac(0x1227, Firmware::Rom);
        mac.lock().unwrap().move_to = Some(UsbLocation {
            bus: 2,
            ports: vec![1, 4],
        });
        let r = run(&bus(mac.clone()), FakeImages::default(), options());
        r.result.unwrap();
        assert_eq!(mac.lock().unwrap().trace[2..7], stage1_trace()[..5]);
    }

    #[test]
    fn follows_a_mac_that_arrived_on_another_port_before_it_left_this_one() {
        // Seen with two Macs over USB/IP: the hub thread reported the Mac on its new vhci port
        // before the departure from the old one; that arrival must not be consumed unnoticed.
        let mac = mac(0x1227, Firmware::Rom);
        {
            let mut m = mac.lock().unwrap();
            m.move_to = Some(UsbLocation {
                bus: 1,
                ports: vec![4],
            });
            m.arrive_before_leaving = true;
        }
        let r = run(&bus(mac.clone()), FakeImages::default(), options());
        r.result.unwrap();
        let m = mac.lock().unwrap();
        assert_eq!(m.trace[2..7], stage1_trace()[..5]);
        assert_eq!(m.location.ports, vec![4]);
    }

    #[test]
    fn a_missing_image_stops_before_anything_is_sent() {
        let mac = mac(0x1227, Firmware::Rom);
        let images = FakeImages {
            missing: Some("RestoreKernelCache"),
            ..Default::default()
        };
        let err = run(&bus(mac.clone()), images, options())
            .result
            .unwrap_err();
        assert!(err.to_string().contains("RestoreKernelCache"), "{err}");
        let m = mac.lock().unwrap();
        assert!(m.dfu_ops.is_empty());
        assert_eq!(m.trace, s(&["setconfig 1"]));
    }

    #[test]
    fn unknown_board_is_resolved_from_the_manifest_or_named() {
        // Not in a table (the fake reader never sets `model`): the manifest maps 8103/22.
        let mac_ok = mac(0x1227, Firmware::Rom);
        assert!(run(&bus(mac_ok), FakeImages::default(), options())
            .result
            .is_ok());
        let other = mac(0x1227, Firmware::Rom);
        other.lock().unwrap().bdid = 0x99;
        let err = run(&bus(other), FakeImages::default(), options())
            .result
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("0x99") && text.contains("j274ap"), "{text}");
    }

    #[test]
    fn port_dfu_and_restore_mode_are_refused_at_start() {
        let pd = mac(0xf014, Firmware::Rom);
        let err = run(&bus(pd), FakeImages::default(), options())
            .result
            .unwrap_err();
        assert!(matches!(err, BootchainError::PortDfu));
        let rm = mac(0x1901, Firmware::Rom);
        let err = run(&bus(rm), FakeImages::default(), options())
            .result
            .unwrap_err();
        assert!(matches!(err, BootchainError::WrongStartMode(0x1901, _)));
    }

    #[test]
    fn wait_for_device_finds_present_arriving_or_times_out() {
        let m = mac(0x1227, Firmware::Rom);
        let b = bus(m.clone());
        let t = Duration::from_millis(100);
        let found = wait_for_device(&b, None, t, fake_identity).unwrap();
        assert_eq!(found.product_id, 0x1227);
        assert_eq!(
            wait_for_device(&b, Some(ECID), t, fake_identity).unwrap(),
            found
        );
        assert!(matches!(
            wait_for_device(&b, Some(1), t, fake_identity),
            Err(BootchainError::NoDevice(_))
        ));
        // Arrival after subscribing.
        m.lock().unwrap().firmware = Firmware::Gone;
        let m2 = m.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let mut g = m2.lock().unwrap();
            g.firmware = Firmware::Rom;
            let info = g.info();
            g.emit(HotplugEvent::Arrived(info));
        });
        let found = wait_for_device(&b, None, Duration::from_secs(5), fake_identity).unwrap();
        h.join().unwrap();
        assert_eq!(found.address, 5);
    }

    #[test]
    fn rom_error_state_is_reported_after_clr_status() {
        let mac = mac(0x1227, Firmware::Rom);
        mac.lock().unwrap().dfu_state = 10;
        let err = run(&bus(mac.clone()), FakeImages::default(), options())
            .result
            .unwrap_err();
        assert!(
            matches!(err, BootchainError::Dfu(DfuError::RomError)),
            "{err}"
        );
        assert_eq!(mac.lock().unwrap().dfu_ops, s(&["GET_STATE", "REQ 4"]));
    }

    #[test]
    fn a_refused_command_names_the_command() {
        let mac = mac(0x1227, Firmware::Rom);
        mac.lock().unwrap().stall_command = Some("ramdisk");
        let err = run(&bus(mac.clone()), FakeImages::default(), options())
            .result
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "USB failed while sending the iBoot command `ramdisk`: the device refused the request (USB stall)"
        );
        assert_eq!(
            mac.lock().unwrap().trace.last().map(String::as_str),
            Some("cmd getenv ramdisk-delay")
        );
    }

    #[test]
    fn an_unexpected_boot_stage_is_only_logged() {
        let mac = mac(0x1227, Firmware::Rom);
        mac.lock().unwrap().ibss_boot_stage = "7";
        let r = run(&bus(mac), FakeImages::default(), options());
        assert!(r.result.is_ok());
        assert!(r.progress.contains(&Progress::Env {
            name: "boot-stage".into(),
            value: "7".into()
        }));
    }

    #[test]
    fn opening_retries_while_the_device_settles() {
        let b = bus(mac(0x1227, Firmware::Rom));
        *b.busy_opens.lock().unwrap() = 1;
        assert!(run(&b, FakeImages::default(), options()).result.is_ok());
        // short_timeouts allows 2 attempts per open: 2 refusals in a row fail with Busy.
        let b = bus(mac(0x1227, Firmware::Rom));
        *b.busy_opens.lock().unwrap() = 2;
        let err = run(&b, FakeImages::default(), options())
            .result
            .unwrap_err();
        assert!(
            matches!(
                &err,
                BootchainError::Transport {
                    source: TransportError::Busy,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn production_timeouts_match_the_spec() {
        let t = Timeouts::default();
        assert_eq!(t.ibss_disconnect, Duration::from_secs(10));
        assert_eq!(t.ibss_reconnect, Duration::from_secs(10));
        assert_eq!(t.ibec_reconnect, Duration::from_secs(10));
        assert_eq!(t.recovery_ibec_disconnect, Duration::from_secs(60));
        assert_eq!(t.recovery_ibec_reconnect, Duration::from_secs(60));
        assert_eq!(t.bootx_leave, Duration::from_secs(30));
        assert_eq!(t.restore_mode, Duration::from_secs(300));
        assert_eq!(t.open_attempts, 20);
        assert_eq!(t.open_interval, Duration::from_secs(4));
        let _ = HashMap::<u8, u8>::new();
    }
}
