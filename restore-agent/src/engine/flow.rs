//! The per-Mac flow behind [`super::restore_mac`].

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use plist::Value;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};

use crate::bootchain::driver::{wait_for_device, Driver, DriverOptions, Outcome, Progress};
use crate::bootchain::images::{ImageError, ImageProvider};
use crate::bootchain::plan::Stage as BootStage;
use crate::bootchain::BootchainError;
use crate::catalog_fetch::CatalogFetcher;
use crate::download::Live;
use crate::identity::{self, AppleMode, DeviceIdentity};
use crate::ipsw::{pick_local_ipsw, Ipsw, LocalFile, PartialFile, RemoteConfig, RemoteFile};
use crate::manifest::BuildManifest;
use crate::personalize::{IpswSource, PersonalizeError, Personalizer, RestorePlan};
use crate::restored::options::{random_uuid, StartRestoreParams};
use crate::restored::{RestoreConfig, RestoredClient};
use crate::tss::TssParams;
use crate::tss_client::{BlockingTssClient, Signing, TssClient};
use crate::usb::{DeviceInfo, UsbBus};
use crate::usbmux::edge::{EdgeConfig, MuxHandle};

use super::context::{
    lock_pub as lock, off_runtime, EngineContext, EnginePersonalizer, SharedFile, TssOffRuntime,
};
use super::failure::{self, Failure, RestoreTrail};
use super::report::{CheckpointRecord, EraseRecord, FailureRecord, MacReport};
use super::{
    erase_code, Behavior, BuildPin, EngineConfig, EngineEvent, EraseConfirmer, EraseDecision,
    PathOrUrl, Stage,
};

/// Upper bound for handing the last queued bytes (ReceivedFinalStatusMsg) to USB before the
/// usbmux link closes.
const FINAL_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// How many catalog builds `--latest` tries before giving up (newest first).
const MAX_BUILDS_TRIED: usize = 6;

/// What the first attempt found out and the second reuses.
struct Prepared {
    ecid: u64,
    board: String,
    manifest: Arc<BuildManifest>,
    file: SharedFile,
    ipsw_name: String,
    /// The download the IPSW is read from while it runs, if it was not complete in the cache.
    download: Option<Arc<Live>>,
}

/// An opened IPSW: the reader, its name for messages, its manifest, and the download it is
/// read from while it runs.
type Firmware = (SharedFile, String, Arc<BuildManifest>, Option<Arc<Live>>);

struct Run {
    cfg: Arc<EngineConfig>,
    bus: Arc<dyn UsbBus>,
    events: UnboundedSender<EngineEvent>,
    report: MacReport,
    attempt: u32,
    behavior: Behavior,
}

impl Run {
    fn send(&self, e: EngineEvent) {
        let _ = self.events.send(e);
    }

    fn stage(&mut self, stage: Stage) {
        self.report.enter(stage, self.attempt, self.behavior);
        self.send(EngineEvent::Stage { stage });
    }

    fn message(&self, m: impl Into<String>) {
        let m = m.into();
        info!("{m}");
        self.send(EngineEvent::Message(m));
    }

    fn finish(mut self, result: Result<(), Failure>) -> MacReport {
        let now = super::report::unix_seconds(SystemTime::now());
        self.report.close_stage(now);
        self.report.finished = now;
        self.report.behavior = self.behavior;
        match result {
            Ok(()) => {
                self.report.result = "succeeded".into();
                self.report.enter(Stage::Done, self.attempt, self.behavior);
                self.report.close_stage(now);
                self.send(EngineEvent::Stage { stage: Stage::Done });
                self.send(EngineEvent::Succeeded);
            }
            Err(f) => {
                self.report.result = "failed".into();
                self.report.failure = Some(record(&f));
                self.send(failed_event(&f));
            }
        }
        self.report
    }
}

fn record(f: &Failure) -> FailureRecord {
    FailureRecord {
        cause: f.cause.clone(),
        next_step: f.next_step.clone(),
        erase_could_fix: f.erase_could_fix,
    }
}

fn failed_event(f: &Failure) -> EngineEvent {
    EngineEvent::Failed {
        cause: f.cause.clone(),
        next_step: f.next_step.clone(),
        erase_could_fix: f.erase_could_fix,
    }
}

fn worker(e: String) -> Failure {
    Failure::new(
        e,
        "restart the station software and run again; report it if it repeats",
    )
}

pub(super) async fn run(
    cfg: Arc<EngineConfig>,
    bus: Arc<dyn UsbBus>,
    device: DeviceInfo,
    confirmer: Arc<dyn EraseConfirmer>,
    events: UnboundedSender<EngineEvent>,
    first: Behavior,
) -> MacReport {
    let mut run = Run {
        cfg,
        bus,
        events,
        report: MacReport::new(first),
        attempt: 1,
        behavior: Behavior::Revive,
    };
    let prepared = match prepare(&mut run, &device).await {
        Ok(p) => p,
        Err(f) => return run.finish(Err(f)),
    };
    let mut device = device;
    if first == Behavior::Erase {
        // Asked to erase from the start: still only after a person confirms it.
        let reason = "an Erase restore was requested";
        if !ask(&mut run, &confirmer, prepared.ecid, reason).await {
            return run.finish(Err(Failure::new(
                "the erase was not confirmed at the station, so nothing was changed on the Mac",
                "run again and type the code shown, or run without --erase to revive the Mac",
            )));
        }
        run.behavior = Behavior::Erase;
    }
    loop {
        let result = attempt(&mut run, &prepared, &device).await;
        let f = match result {
            Ok(()) => {
                let settled = settle_download(&mut run, &prepared).await;
                return run.finish(settled);
            }
            Err(f) => f,
        };
        if run.behavior != Behavior::Revive || !f.erase_could_fix {
            return run.finish(Err(f));
        }
        warn!("revive failed, an erase could fix it: {f}");
        run.send(failed_event(&f));
        run.report.revive_failure = Some(record(&f));
        if !ask(&mut run, &confirmer, prepared.ecid, &f.cause).await {
            let mut f = f;
            f.next_step = format!(
                "{} — the erase was not confirmed, so the Mac was left as it is",
                f.next_step
            );
            return run.finish(Err(f));
        }
        run.message("erase confirmed: put the Mac back into DFU mode to start the Erase restore");
        let ecid = prepared.ecid;
        let bus = Arc::clone(&run.bus);
        let timeout = run.cfg.timeouts.back_in_dfu;
        let back = off_runtime(move || {
            wait_for_device(&*bus, Some(ecid), timeout, identity::read_identity)
        })
        .await;
        device = match back {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => return run.finish(Err(failure::bootchain(&e))),
            Err(e) => return run.finish(Err(worker(e))),
        };
        run.behavior = Behavior::Erase;
        run.attempt += 1;
    }
}

/// Asks the confirmer (on a thread: it blocks on a person) and records the decision.
async fn ask(run: &mut Run, confirmer: &Arc<dyn EraseConfirmer>, ecid: u64, reason: &str) -> bool {
    let code = erase_code(ecid);
    let asked = SystemTime::now();
    run.message(format!(
        "an Erase restore needs confirmation at the station (code {code}): {reason}"
    ));
    // A person answers within minutes: the question waits on a thread of its own, never on a
    // runtime worker another Mac's restore needs.
    let c = Arc::clone(confirmer);
    let (code2, reason2) = (code.clone(), reason.to_string());
    let decision = off_runtime(move || c.confirm_erase(ecid, &code2, &reason2))
        .await
        .unwrap_or(EraseDecision::TimedOut);
    let rec = EraseRecord::new(reason, &code, asked, &decision);
    run.message(format!(
        "erase {} ({})",
        rec.decision,
        rec.how.as_deref().unwrap_or("no answer")
    ));
    run.report.erase_decision = Some(rec);
    matches!(decision, EraseDecision::Confirmed { .. })
}

/// Identify the Mac, pick the build, open the firmware.
async fn prepare(run: &mut Run, device: &DeviceInfo) -> Result<Prepared, Failure> {
    run.stage(Stage::Identify);
    let id = read_identity(run, device).await?;
    check_start_mode(&run.cfg, &id)?;
    let ecid = id.ecid.ok_or_else(|| {
        Failure::new(
            "the Mac did not report its ECID in its USB serial string",
            "unplug/replug the cable and run again",
        )
    })?;
    run.report.ecid = Some(format!("{ecid:016X}"));
    if let Some(m) = id.model {
        run.report.model = Some(m.name.to_string());
        run.report.product_type = Some(m.product_type.to_string());
        run.report.board = Some(m.board_config.to_string());
        run.send(EngineEvent::Identified {
            ecid,
            product_type: m.product_type.into(),
            board: m.board_config.into(),
            name: m.name.into(),
        });
    }

    run.stage(Stage::PickBuild);
    let (file, ipsw_name, manifest, download) = match run.cfg.pin.clone() {
        BuildPin::Ipsw(p) => {
            run.stage(Stage::Firmware);
            open_firmware(&run.cfg, &p, None, true).await?
        }
        pin => pick_from_catalog(run, &id, pin).await?,
    };
    let board =
        crate::bootchain::driver::board_of(&id, &manifest).map_err(|e| failure::bootchain(&e))?;
    if id.model.is_none() {
        run.report.board = Some(board.clone());
        run.send(EngineEvent::Identified {
            ecid,
            product_type: String::new(),
            board: board.clone(),
            name: String::new(),
        });
    }
    let version = manifest.product_version.clone().unwrap_or_default();
    let build = manifest.product_build_version.clone().unwrap_or_default();
    run.report.version = Some(version.clone());
    run.report.build = Some(build.clone());
    run.send(EngineEvent::Build { version, build });
    Ok(Prepared {
        ecid,
        board,
        manifest,
        file,
        ipsw_name,
        download,
    })
}

/// After a restore that read the IPSW while it downloaded: wait for the download's SHA-1
/// check, which decides the result (see [`super::firmware`]).
async fn settle_download(run: &mut Run, p: &Prepared) -> Result<(), Failure> {
    let Some(live) = p.download.clone() else {
        return Ok(());
    };
    if live.outcome().is_none() {
        run.message(
            "the Mac is restored; waiting for the firmware download to finish so its SHA-1 can be checked",
        );
    }
    let end = off_runtime(move || live.wait_end()).await.map_err(worker)?;
    let settled = super::firmware::settle(&end);
    match &settled {
        Ok(Some(note)) => {
            run.message(note.clone());
            run.report.firmware_download = Some(note.clone());
        }
        Ok(None) => {}
        Err(f) => run.report.firmware_download = Some(f.cause.clone()),
    }
    settled.map(|_| ())
}

async fn read_identity(run: &Run, device: &DeviceInfo) -> Result<DeviceIdentity, Failure> {
    let bus = Arc::clone(&run.bus);
    let dev = device.clone();
    off_runtime(move || {
        let mut t = bus.open(&dev)?;
        Ok::<_, crate::usb::TransportError>(identity::read_identity(t.as_mut()))
    })
    .await
    .map_err(worker)?
    .map_err(|e| {
        Failure::new(
            format!("cannot open the Mac over USB: {e}"),
            "unplug/replug the cable (no hub) and run again",
        )
    })?
    .map_err(|e| {
        Failure::new(
            e.to_string(),
            "check that this is an Apple Silicon Mac in DFU mode; unplug/replug and retry",
        )
    })
}

fn check_start_mode(cfg: &EngineConfig, id: &DeviceIdentity) -> Result<(), Failure> {
    match id.mode {
        Some(AppleMode::Dfu) => Ok(()),
        Some(AppleMode::Recovery) if cfg.allow_recovery_start => Ok(()),
        Some(AppleMode::Recovery) => Err(failure::bootchain(&BootchainError::InRecovery)),
        Some(AppleMode::PortDfu) => Err(failure::bootchain(&BootchainError::PortDfu)),
        _ => Err(failure::bootchain(&BootchainError::WrongStartMode(
            0,
            "neither DFU nor Recovery",
        ))),
    }
}

fn file_name_of(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let name = path.rsplit('/').next().unwrap_or("");
    // A name from a server must not climb out of the cache directory.
    if name.is_empty() || name == "." || name == ".." {
        "firmware.ipsw".into()
    } else {
        name.to_string()
    }
}

/// The IPSW at `p`: a local file, the cached copy of a URL, the URL read while it downloads
/// into the cache (`download`, with a cache directory), or the URL read remotely.
async fn open_firmware(
    cfg: &EngineConfig,
    p: &PathOrUrl,
    sha1: Option<[u8; 20]>,
    download: bool,
) -> Result<Firmware, Failure> {
    let cfg2 = cfg.clone();
    let p = p.clone();
    let live = match (&p, &cfg.cache_dir) {
        (PathOrUrl::Url(url), Some(dir)) if download && !dir.join(file_name_of(url)).is_file() => {
            let live = cfg
                .downloads
                .join_or_start(url, dir, sha1, &cfg.http, &cfg.download)
                .map_err(|e| {
                    Failure::new(
                        format!("cannot start downloading {url}: {e}"),
                        "check the URL and the cache directory, or give a local IPSW with --ipsw",
                    )
                })?;
            Some(live)
        }
        _ => None,
    };
    let live2 = live.clone();
    let read_ahead = cfg.download.read_ahead;
    off_runtime(move || -> Result<_, Failure> {
        let (file, name): (SharedFile, String) = match (&p, live2.clone()) {
            (PathOrUrl::Path(path), _) => {
                let f = LocalFile::open(path).map_err(|e| {
                    Failure::new(
                        format!("cannot open the IPSW {}: {e}", path.display()),
                        "check the path given with --ipsw",
                    )
                })?;
                (SharedFile(Arc::new(f)), path.display().to_string())
            }
            (PathOrUrl::Url(url), Some(live)) => {
                let f = PartialFile::open(live, read_ahead).map_err(|e| {
                    Failure::new(
                        format!("cannot download {url}: {e}"),
                        "check the station's network (cable, DNS, proxy) and the cache directory, or give a local IPSW with --ipsw",
                    )
                })?;
                info!("reading {} while it downloads", f.path().display());
                (SharedFile(Arc::new(f)), url.clone())
            }
            (PathOrUrl::Url(url), None) => {
                let cached = cfg2
                    .cache_dir
                    .as_ref()
                    .map(|d| d.join(file_name_of(url)))
                    .filter(|p| p.is_file());
                match cached {
                    Some(path) => {
                        info!("using the cached IPSW {}", path.display());
                        let f = LocalFile::open(&path).map_err(|e| {
                            Failure::new(
                                format!("cannot open the cached IPSW {}: {e}", path.display()),
                                "delete the cached file and run again",
                            )
                        })?;
                        (SharedFile(Arc::new(f)), path.display().to_string())
                    }
                    None => {
                        let rc = RemoteConfig {
                            http: cfg2.http.clone(),
                            ..RemoteConfig::default()
                        };
                        let f = RemoteFile::open(url, rc).map_err(|e| {
                            Failure::new(
                                format!("cannot reach the IPSW at {url}: {e}"),
                                "check the station's network (cable, DNS, proxy), or give a local IPSW with --ipsw",
                            )
                        })?;
                        (SharedFile(Arc::new(f)), url.clone())
                    }
                }
            }
        };
        let ipsw = Ipsw::open(file.clone()).map_err(|e| {
            Failure::new(
                format!("{name} is not a readable IPSW: {e}"),
                "download the IPSW again",
            )
        })?;
        let bytes = ipsw.build_manifest().map_err(|e| {
            Failure::new(
                format!("{name} has no readable BuildManifest: {e}"),
                "download the IPSW again",
            )
        })?;
        let manifest = BuildManifest::from_bytes(&bytes).map_err(|e| {
            Failure::new(
                format!("the BuildManifest of {name} is damaged: {e}"),
                "download the IPSW again",
            )
        })?;
        Ok((file, name, Arc::new(manifest), live2))
    })
    .await
    .map_err(worker)?
}

/// The IPSWs already on the station (the cache first, then other USB disks), read once per Mac:
/// a catalog build found among them is not downloaded.
async fn local_ipsws(cfg: &EngineConfig) -> Vec<crate::ipsw::LocalIpsw> {
    let dirs: Vec<std::path::PathBuf> = cfg
        .cache_dir
        .iter()
        .chain(&cfg.local_ipsw_dirs)
        .cloned()
        .collect();
    if dirs.is_empty() {
        return Vec::new();
    }
    off_runtime(move || crate::ipsw::local_ipsws(&dirs))
        .await
        .unwrap_or_default()
}

fn tss_params(id: &DeviceIdentity, ecid: u64) -> TssParams {
    TssParams::new(ecid, id.ap_nonce_for_tss(), id.sep_nonce.clone())
}

/// The build from the catalog: the pinned one, or the newest one Apple signs for this Mac.
async fn pick_from_catalog(
    run: &mut Run,
    id: &DeviceIdentity,
    pin: BuildPin,
) -> Result<Firmware, Failure> {
    let Some(model) = id.model else {
        return Err(Failure::new(
            "this Mac is not in macrescue's model table, so its builds cannot be looked up",
            "give the IPSW for this Mac with --ipsw",
        ));
    };
    let fetcher = CatalogFetcher::new(run.cfg.catalog.clone()).map_err(|e| {
        Failure::new(
            e.to_string(),
            "check the station's HTTP settings (CA file, proxy)",
        )
    })?;
    let builds = fetcher.builds_for(model.product_type).await.map_err(|e| {
        Failure::new(
            e.to_string(),
            "check the station's network, or give the IPSW with --ipsw",
        )
    })?;
    if let Some(note) = builds.fallback_note() {
        run.message(note);
    }
    let candidates: Vec<_> = match &pin {
        BuildPin::Build(b) => builds
            .entries
            .iter()
            .filter(|e| e.build.eq_ignore_ascii_case(b))
            .cloned()
            .collect(),
        _ => builds
            .entries
            .iter()
            .take(MAX_BUILDS_TRIED)
            .cloned()
            .collect(),
    };
    if candidates.is_empty() {
        return Err(Failure::new(
            match &pin {
                BuildPin::Build(b) => {
                    format!("build {b} is not offered for {}", model.product_type)
                }
                _ => format!(
                    "the catalog offers no macOS build for {}",
                    model.product_type
                ),
            },
            "pick a build from `restore-agent firmwares`, or give the IPSW with --ipsw",
        ));
    }
    let tss = TssClient::new(run.cfg.tss.clone())
        .map_err(|e| Failure::new(e.to_string(), "check the station's HTTP settings"))?;
    let ecid = id.ecid.unwrap_or_default();
    let params = tss_params(id, ecid);
    let mut refused = Vec::new();
    let on_station = local_ipsws(&run.cfg).await;
    for entry in candidates {
        run.stage(Stage::Firmware);
        let source = match pick_local_ipsw(&on_station, model.product_type, &entry.build) {
            Some(path) => {
                run.message(format!(
                    "macOS {} ({}) is on this station: {}",
                    entry.version,
                    entry.build,
                    path.display()
                ));
                PathOrUrl::Path(path)
            }
            None => PathOrUrl::Url(entry.url.clone()),
        };
        // Candidates are only looked at (manifest, signing); the chosen one is downloaded
        // unless it is already on the station.
        let (file, name, manifest, _) = open_firmware(&run.cfg, &source, None, false).await?;
        let board = model.board_config;
        let plan = RestorePlan::new(&manifest, board, Behavior::Revive.manifest())
            .map_err(|e| Failure::new(e.to_string(), "pick another build, or use --ipsw"))?;
        let identity = plan
            .identity_in(&manifest)
            .ok_or_else(|| worker("the chosen build identity vanished".into()))?;
        run.stage(Stage::PickBuild);
        match tss.is_signed(&identity.raw, &params).await {
            Ok(Signing::Signed) => {
                run.message(format!(
                    "macOS {} ({}) is signed for this Mac",
                    entry.version, entry.build
                ));
                if run.cfg.cache_dir.is_some() && matches!(source, PathOrUrl::Url(_)) {
                    drop(file);
                    return open_firmware(
                        &run.cfg,
                        &PathOrUrl::Url(entry.url.clone()),
                        entry.sha1,
                        true,
                    )
                    .await;
                }
                return Ok((file, name, manifest, None));
            }
            Ok(Signing::NotSigned { status, message }) => {
                run.message(format!(
                    "macOS {} ({}) is no longer signed (TSS status {status}: {message})",
                    entry.version, entry.build
                ));
                refused.push(entry.build.clone());
                if matches!(pin, BuildPin::Build(_)) {
                    return Err(Failure::new(
                        format!(
                            "Apple no longer signs macOS {} ({}) for this Mac (TSS status {status}: {message})",
                            entry.version, entry.build
                        ),
                        "restore the latest signed build (--latest)",
                    ));
                }
            }
            Err(e) => return Err(Failure::new(
                e.to_string(),
                "check the station's network connection to Apple's signing server, then run again",
            )),
        }
    }
    Err(Failure::new(
        format!(
            "Apple signs none of the newest builds for this Mac (tried {})",
            refused.join(", ")
        ),
        "check the station's clock and network; give a current IPSW with --ipsw",
    ))
}

/// The driver's view of the shared personalizer.
struct SharedProvider(Arc<Mutex<EnginePersonalizer>>);

impl ImageProvider for SharedProvider {
    fn personalized(&mut self, component: &str) -> Result<Vec<u8>, ImageError> {
        lock(&self.0).personalized(component)
    }
    fn nonces_changed(
        &mut self,
        ap_nonce: &[u8],
        sep_nonce: Option<&[u8]>,
    ) -> Result<(), ImageError> {
        lock(&self.0).nonces_changed(ap_nonce, sep_nonce)
    }
    fn check_available(&self, component: &str) -> Result<(), ImageError> {
        lock(&self.0).check_available(component)
    }
}

fn personalize_failure(e: &PersonalizeError) -> Failure {
    match e {
        PersonalizeError::NotSigned { .. } => Failure::new(
            e.to_string(),
            "Apple refused to sign this build for this Mac (TSS 94): restore the latest signed build (--latest)",
        ),
        PersonalizeError::Transport { .. } => Failure::new(
            e.to_string(),
            "check the station's network connection to Apple's signing server, then run again",
        ),
        PersonalizeError::Source { .. } | PersonalizeError::Img4 { .. } => {
            Failure::new(e.to_string(), "download the IPSW again")
        }
        _ => Failure::new(e.to_string(), "run again; if it repeats, try another build"),
    }
}

/// One restore attempt with `run.behavior`, from tickets to the final status.
async fn attempt(run: &mut Run, p: &Prepared, device: &DeviceInfo) -> Result<(), Failure> {
    let behavior = run.behavior;
    info!(
        ?behavior,
        attempt = run.attempt,
        "starting a restore attempt"
    );
    run.stage(Stage::Tickets);
    // Nonces are read afresh: a second attempt follows a new DFU entry with new nonces.
    let id = read_identity(run, device).await?;
    check_start_mode(&run.cfg, &id)?;
    let plan = RestorePlan::new(&p.manifest, &p.board, behavior.manifest())
        .map_err(|e| Failure::new(e.to_string(), "use the IPSW for this Mac (or --latest)"))?;
    let identity = plan
        .identity_in(&p.manifest)
        .ok_or_else(|| worker("the chosen build identity vanished".into()))?
        .clone();
    let params = tss_params(&id, p.ecid);
    let file = p.file.clone();
    let name = p.ipsw_name.clone();
    let tss_cfg = run.cfg.tss.clone();
    let ident = identity.clone();
    let boot: Vec<String> = plan
        .boot_components()
        .iter()
        .map(|c| c.component.clone())
        .collect();
    let personalizer = off_runtime(move || -> Result<EnginePersonalizer, Failure> {
        let ipsw = Ipsw::open(file).map_err(|e| {
            Failure::new(
                format!("{name} is not a readable IPSW: {e}"),
                "download the IPSW again",
            )
        })?;
        let tss = BlockingTssClient::new(tss_cfg)
            .map_err(|e| Failure::new(e.to_string(), "check the station's HTTP settings"))?;
        let mut pz = Personalizer::new(
            IpswSource::new(ipsw, name),
            &ident,
            TssOffRuntime::new(tss),
            params,
        );
        // Every missing file at once, before the Mac is touched.
        let missing = pz.check_all(boot.iter().map(String::as_str));
        if !missing.is_empty() {
            let all: Vec<String> = missing.iter().map(|e| e.to_string()).collect();
            return Err(Failure::new(all.join("; "), "download the IPSW again"));
        }
        // The main ticket now: a refusal (94) or no network is named before DFU starts.
        pz.main_ticket().map_err(|e| personalize_failure(&e))?;
        Ok(pz)
    })
    .await
    .map_err(worker)??;
    let personalizer = Arc::new(Mutex::new(personalizer));

    // DFU, stage 1, stage 2 on a thread of their own (the driver is synchronous).
    let (stage_tx, mut stage_rx) = tokio::sync::mpsc::unbounded_channel::<Stage>();
    let events = run.events.clone();
    let bus = Arc::clone(&run.bus);
    let manifest = Arc::clone(&p.manifest);
    let dev = device.clone();
    let options = DriverOptions {
        behavior: behavior.manifest(),
        allow_recovery_start: run.cfg.allow_recovery_start,
        wait_for_restore: true,
        timeouts: run.cfg.timeouts.bootchain.clone(),
        read_identity: identity::read_identity,
    };
    let shared = Arc::clone(&personalizer);
    let mut driver_job = Box::pin(off_runtime(move || -> Result<Outcome, BootchainError> {
        let mut provider = SharedProvider(shared);
        let mut progress = |pr: &Progress| match pr {
            Progress::Stage(s) => {
                let _ = stage_tx.send(match s {
                    BootStage::Dfu => Stage::Dfu,
                    BootStage::Stage1 => Stage::Stage1,
                    BootStage::Stage2 => Stage::Stage2,
                });
            }
            Progress::Upload {
                component,
                sent,
                total,
            } => {
                let _ = events.send(EngineEvent::Progress {
                    what: component.clone(),
                    done: *sent as u64,
                    total: Some(*total as u64),
                    rate_bps: None,
                });
            }
            Progress::ApNonceChanged => {
                let _ = events.send(EngineEvent::Message(
                    "the Mac's ApNonce changed: fetching fresh tickets".into(),
                ));
            }
            Progress::BootxSent => {
                let _ = events.send(EngineEvent::Message(
                    "bootx sent: waiting for the restore system".into(),
                ));
            }
            _ => {}
        };
        Driver::new(&*bus, &mut provider, &mut progress, options).run(&dev, &manifest)
    }));
    let outcome = loop {
        tokio::select! {
            r = &mut driver_job => break r,
            Some(s) = stage_rx.recv() => run.stage(s),
        }
    };
    while let Ok(s) = stage_rx.try_recv() {
        run.stage(s);
    }
    let outcome = outcome
        .map_err(worker)?
        .map_err(|e| failure::bootchain(&e))?;
    let restore_device = outcome.restore_device.ok_or_else(|| {
        failure::bootchain(&BootchainError::NoRestoreMode(
            run.cfg.timeouts.bootchain.restore_mode.as_secs(),
        ))
    })?;

    // Restore mode.
    run.stage(Stage::RestoreMode);
    let bus = Arc::clone(&run.bus);
    let transport = off_runtime(move || bus.open(&restore_device))
        .await
        .map_err(worker)?
        .map_err(|e| {
            Failure::new(
                format!("cannot open the Mac in restore mode over USB: {e}"),
                "the USB link dropped: check the cable (no hub), re-enter DFU and run again",
            )
        })?;
    let edge = EdgeConfig {
        handshake_timeout: run.cfg.timeouts.mux_handshake,
        ..EdgeConfig::default()
    };
    let mux = MuxHandle::open(transport, edge).await.map_err(|e| {
        Failure::new(
            format!("cannot talk usbmux to the restore-mode Mac: {e}"),
            "the USB link dropped: check the cable (no hub), re-enter DFU and run again",
        )
    })?;
    let mux = Arc::new(mux);
    let recovery_identity = p
        .manifest
        .macos_customer_identity(&p.board)
        .map(|i| i.raw.clone());
    let local_policy_identity = match behavior {
        Behavior::Erase => recovery_identity
            .clone()
            .unwrap_or_else(|| identity.raw.clone()),
        Behavior::Revive => identity.raw.clone(),
    };
    let ctx = Arc::new(EngineContext {
        personalizer: Arc::clone(&personalizer),
        ipsw: Arc::new(
            Ipsw::open(p.file.clone())
                .map_err(|e| Failure::new(e.to_string(), "download the IPSW again"))?,
        ),
        identity: identity.raw.clone(),
        recovery_identity,
        local_policy_identity,
        tss: TssClient::new(run.cfg.tss.clone())
            .map_err(|e| Failure::new(e.to_string(), "check the station's HTTP settings"))?,
        http: run
            .cfg
            .http
            .client()
            .map_err(|e| Failure::new(e.to_string(), "check the station's HTTP settings"))?,
        events: run.events.clone(),
        trail: Mutex::new(RestoreTrail::default()),
        checkpoints: Mutex::new(Vec::new()),
    });
    let t = &run.cfg.timeouts;
    let config = RestoreConfig {
        expected_ecid: Some(p.ecid),
        connect_attempts: t.restored_connect_attempts,
        connect_retry_delay: t.restored_connect_retry,
        query_timeout: t.restored_query,
        ..RestoreConfig::default()
    };
    let params = StartRestoreParams {
        behavior: behavior.restored(),
        macos_variant: identity
            .info
            .macos_variant
            .clone()
            .unwrap_or_else(|| "macOS Customer".into()),
        minimum_system_partition: identity
            .raw
            .get("Info")
            .and_then(Value::as_dictionary)
            .and_then(|i| i.get("MinimumSystemPartition"))
            .and_then(Value::as_unsigned_integer),
        system_partition_padding: identity
            .raw
            .get("Info")
            .and_then(Value::as_dictionary)
            .and_then(|i| i.get("SystemPartitionPadding"))
            .and_then(Value::as_dictionary)
            .cloned(),
        restore_protocol_version: 0,
        uuid: random_uuid(),
    };
    let result = match RestoredClient::connect(Arc::clone(&ctx), Arc::clone(&mux), config).await {
        Ok(client) => client.restore(params).await,
        Err(e) => Err(e),
    };
    // Drain before closing: restored waits for ReceivedFinalStatusMsg, and an aborted session's
    // RSTs must reach the Mac too. The Mac reboots by itself afterwards.
    mux.close(FINAL_DRAIN).await;
    for (name, result) in lock(&ctx.checkpoints).drain(..) {
        run.report.checkpoints.push(CheckpointRecord {
            attempt: run.attempt,
            name,
            result,
        });
    }
    match result {
        Ok(outcome) => {
            info!(served = ?outcome.data_served, "restore finished");
            Ok(())
        }
        Err(e) => {
            let trail = lock(&ctx.trail).clone();
            Err(failure::restored(&e, &trail))
        }
    }
}
