//! The restore engine end to end against the simulated Mac: DFU → stage 1 → stage 2 → restore
//! mode → final status, with tickets from mac-sim's TSS (which signs with the key the simulated
//! Mac trusts), an IPSW from `make_ipsw`, and restored playing the shipped scenarios.
//!
//! Also: revive fails with a disk error → the confirmer is asked → erase only when confirmed;
//! TSS 94 and a Mac in Recovery are named failures.

pub(crate) mod support;

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mac_sim::board::Board;
use mac_sim::device::{SimMac, Timing};
use mac_sim::faults::{Faults, StartMode};
use mac_sim::ipsw::{make_ipsw, IpswOptions};
use mac_sim::restore::restored::Outcome as SimOutcome;
use mac_sim::restore::scenario::{Scenario, Step};
use mac_sim::restore::{RestoreConfig as SimRestoreConfig, RestoreHandle, RestoreOs};
use mac_sim::services::catalog::{self as sim_catalog, CatalogBuild, CatalogService};
use mac_sim::services::http::Server;
use mac_sim::services::tss::{TssConfig, TssService};
use restore_agent::catalog_fetch::CatalogFetchConfig;
use restore_agent::engine::{
    erase_code, restore_mac, BuildPin, EngineConfig, EngineEvent, EraseConfirmer, EraseDecision,
    MacReport, PathOrUrl, Stage, Timeouts,
};
use restore_agent::http::HttpConfig;
use restore_agent::tss_client::TssClientConfig;
use restore_agent::usb::{DeviceInfo, UsbBus};
use support::{shared, SimUsb, TempDir};

const ECID: u64 = 0x0011_2233_4455_6677;
const BOARD: &str = "j274ap";
/// Small system image: every test streams it through ASR.
const OS_SIZE: u64 = 1 << 20;

fn scenarios_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/mac-sim/scenarios"
    ))
}

pub(crate) struct Env {
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) dir: TempDir,
    pub(crate) ipsw: PathBuf,
    /// The OS image as the Mac must receive it.
    pub(crate) os_image: PathBuf,
    pub(crate) tss: Arc<TssService>,
    pub(crate) tss_server: Server,
    pub(crate) board: Board,
    pub(crate) os_size: u64,
}

/// The fixture manifests are software-update (preflight) manifests with one bootable identity;
/// a full IPSW has Erase, Upgrade and `macOS Customer` identities (§10). Derive them from it.
fn full_manifest(dir: &std::path::Path, newer: Option<&str>) -> PathBuf {
    let fixture = shared().join(
        "fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests/J274AP.BuildManifest.plist",
    );
    let mut m: plist::Dictionary = plist::from_file(&fixture).unwrap();
    let base = m["BuildIdentities"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(plist::Value::as_dictionary)
        .find(|i| i["Manifest"].as_dictionary().unwrap().contains_key("iBSS"))
        .unwrap()
        .clone();
    let with = |variant: &str, behavior: &str| {
        let mut id = base.clone();
        if newer.is_some() {
            // Another build has another UniqueBuildID: the simulated TSS does not know it.
            let ubid = id.get_mut("UniqueBuildID").unwrap();
            if let plist::Value::Data(d) = ubid {
                d[0] ^= 0xFF;
            }
        }
        let info = id.get_mut("Info").unwrap().as_dictionary_mut().unwrap();
        info.insert("Variant".into(), variant.into());
        info.insert("RestoreBehavior".into(), behavior.into());
        info.insert("MacOSVariant".into(), "macOS Customer".into());
        plist::Value::Dictionary(id)
    };
    m.insert(
        "BuildIdentities".into(),
        plist::Value::Array(vec![
            with("Customer Erase Install (IPSW)", "Erase"),
            with("Customer Upgrade Install (IPSW)", "Update"),
            with("macOS Customer", "Erase"),
        ]),
    );
    if let Some(build) = newer {
        m.insert("ProductBuildVersion".into(), build.into());
        m.insert("ProductVersion".into(), "26.3".into());
    }
    let out = dir.join(format!("BuildManifest-{}.plist", newer.unwrap_or("base")));
    plist::to_file_xml(&out, &m).unwrap();
    out
}

/// A full IPSW carries the BootabilityBundle restored asks for (§7.7); make_ipsw adds it as
/// extra entries (appending with the `zip` crate would drop the ZIP64 fields of a > 4 GiB OS
/// image).
fn bootability_bundle() -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "BootabilityBundle/Restore/Bootability/Bootability.dmg".into(),
            vec![0xB0u8; 3000],
        ),
        (
            "BootabilityBundle/Restore/Firmware/Bootability.dmg.trustcache".into(),
            b"trustcache".to_vec(),
        ),
    ]
}

pub(crate) const IPSW_NAME: &str = "UniversalMac_26.2_25C56_Restore.ipsw";

pub(crate) fn env(tag: &str) -> Env {
    env_with(tag, OS_SIZE)
}

pub(crate) fn env_with(tag: &str, os_size: u64) -> Env {
    env_opts(tag, os_size, false)
}

/// `sparse`: the OS image is mostly holes (mac-sim's sparse layout), so a multi-GiB IPSW and
/// the expected image cost a few MiB of disk.
pub(crate) fn env_opts(tag: &str, os_size: u64, sparse: bool) -> Env {
    let _ = shared();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = TempDir::new(tag);
    let ipsw = dir.0.join(IPSW_NAME);
    let mut opts = IpswOptions::new(BOARD);
    opts.os_size = os_size;
    opts.sparse_os = sparse;
    opts.extra_entries = bootability_bundle();
    opts.manifest = Some(full_manifest(&dir.0, None));
    let summary = make_ipsw(&opts, &ipsw).unwrap();
    // The image the simulated ASR sink compares against: the IPSW's own OS entry.
    let os_image = dir.0.join("os.dmg");
    if sparse {
        use mac_sim::ipsw::{os_fill, SPARSE_HEAD, SPARSE_PERIOD};
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&os_image).unwrap();
        f.set_len(os_size).unwrap();
        let mut buf = vec![0u8; SPARSE_HEAD as usize];
        for off in (0..os_size).step_by(SPARSE_PERIOD as usize) {
            let n = SPARSE_HEAD.min(os_size - off) as usize;
            os_fill(off, &mut buf[..n], true);
            f.write_all_at(&buf[..n], off).unwrap();
        }
    } else {
        let mut zip = zip::ZipArchive::new(std::fs::File::open(&ipsw).unwrap()).unwrap();
        let mut data = Vec::new();
        zip.by_name(&summary.os_paths[0])
            .unwrap()
            .read_to_end(&mut data)
            .unwrap();
        std::fs::write(&os_image, data).unwrap();
    }
    let tss = Arc::new(TssService::new(TssConfig {
        manifests: vec![summary.manifest.clone()],
        ..TssConfig::default()
    }));
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let tss_server = rt.block_on(tss.start(addr, None)).unwrap();
    Env {
        rt,
        dir,
        ipsw,
        os_image,
        tss,
        tss_server,
        board: Board::load(BOARD).unwrap(),
        os_size,
    }
}

pub(crate) fn fast_timeouts() -> Timeouts {
    let b = restore_agent::bootchain::Timeouts {
        discovery: Duration::from_secs(5),
        ibss_disconnect: Duration::from_secs(5),
        ibss_reconnect: Duration::from_secs(5),
        ibec_disconnect: Duration::from_secs(5),
        ibec_reconnect: Duration::from_secs(5),
        recovery_ibec_disconnect: Duration::from_secs(5),
        recovery_ibec_reconnect: Duration::from_secs(5),
        bootx_leave: Duration::from_secs(5),
        restore_mode: Duration::from_secs(5),
        transfer: Duration::from_secs(5),
        open_attempts: 20,
        open_interval: Duration::from_millis(20),
        max_pause: Duration::from_millis(5),
    };
    Timeouts {
        bootchain: b,
        restored_connect_attempts: 20,
        restored_connect_retry: Duration::from_millis(50),
        restored_query: Duration::from_secs(10),
        mux_handshake: Duration::from_secs(5),
        back_in_dfu: Duration::from_secs(10),
    }
}

pub(crate) fn http() -> HttpConfig {
    HttpConfig {
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(10),
        ..HttpConfig::default()
    }
}

impl Env {
    /// The simulated CDN serving this environment's IPSW at `rate` bytes/s per connection.
    pub(crate) fn slow_cdn(&self, rate: u64) -> mac_sim::services::cdn::Cdn {
        use mac_sim::services::cdn::{Cdn, CdnConfig, CdnFile, Source};
        self.rt
            .block_on(Cdn::start(
                "127.0.0.1:0".parse().unwrap(),
                None,
                CdnConfig {
                    files: vec![CdnFile {
                        name: IPSW_NAME.into(),
                        source: Source::Path(self.ipsw.clone()),
                    }],
                    rate: Some(rate),
                    faults: vec![],
                },
            ))
            .unwrap()
    }

    pub(crate) fn config(&self, pin: BuildPin) -> EngineConfig {
        EngineConfig {
            cache_dir: None,
            local_ipsw_dirs: Vec::new(),
            catalog: CatalogFetchConfig::default(),
            tss: TssClientConfig {
                server: Some(self.tss_server.url()),
                max_attempts: 2,
                retry_delay: Duration::from_millis(5),
                http: http(),
            },
            http: http(),
            pin,
            timeouts: fast_timeouts(),
            allow_recovery_start: false,
            ..EngineConfig::default()
        }
    }

    fn ipsw_pin(&self) -> BuildPin {
        BuildPin::Ipsw(PathOrUrl::Path(self.ipsw.clone()))
    }

    /// A shipped scenario adapted to this test: the image is the IPSW's OS entry, device
    /// requests for URLs go to a local server, and `end` replaces the final status.
    pub(crate) fn scenario(&self, name: &str, end: Option<Step>) -> Scenario {
        let path = scenarios_dir().join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&path).unwrap().replace(
            "http://gs.apple.com/",
            &format!("{}/", self.tss_server.url()),
        );
        let mut s = Scenario::parse(&text, &path).unwrap();
        s.image.size = self.os_size;
        s.image.seed = None;
        s.image.sha1 = None;
        s.image.path = Some(self.os_image.clone());
        if let Some(end) = end {
            let last = s
                .steps
                .iter()
                .rposition(|st| matches!(st, Step::StatusMsg { .. }))
                .unwrap();
            s.steps.truncate(last);
            s.steps.push(end);
        }
        s
    }
}

/// A Mac whose successive boots into restore mode play `scenarios` in order; handles of every
/// boot are kept.
pub(crate) fn mac(
    env: &Env,
    start: StartMode,
    scenarios: Vec<Scenario>,
    boots: Arc<Mutex<Vec<RestoreHandle>>>,
) -> SimMac {
    mac_with(env, start, Faults::default(), scenarios, boots)
}

pub(crate) fn mac_with(
    env: &Env,
    start: StartMode,
    faults: Faults,
    scenarios: Vec<Scenario>,
    boots: Arc<Mutex<Vec<RestoreHandle>>>,
) -> SimMac {
    mac_unit(env, ECID, start, faults, scenarios, boots)
}

pub(crate) fn mac_unit(
    env: &Env,
    ecid: u64,
    start: StartMode,
    faults: Faults,
    scenarios: Vec<Scenario>,
    boots: Arc<Mutex<Vec<RestoreHandle>>>,
) -> SimMac {
    let mut queue = scenarios.into_iter();
    let cfg = SimRestoreConfig {
        timeout: Duration::from_secs(10),
        ..SimRestoreConfig::default()
    };
    SimMac::new(env.board.clone(), ecid, start, faults, Timing::fast()).with_restore(Box::new(
        move |board, id| {
            let scenario = queue.next().expect("no more restore boots expected");
            let os = RestoreOs::start(
                scenario,
                mac_sim::restore::restored::DeviceInfo::of(board, id),
                cfg.clone(),
            );
            boots.lock().unwrap().push(os.handle());
            os
        },
    ))
}

pub(crate) fn find_mac(usb: &SimUsb) -> DeviceInfo {
    usb.devices().unwrap().into_iter().next().unwrap()
}

/// What the confirmer saw and answers.
pub(crate) struct TestConfirmer {
    answer: EraseDecision,
    asked: Mutex<Vec<(u64, String, String)>>,
    /// Plugged in when the erase is confirmed: the technician puts the Mac back in DFU.
    on_confirm: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl EraseConfirmer for TestConfirmer {
    fn confirm_erase(&self, ecid: u64, code: &str, reason: &str) -> EraseDecision {
        self.asked
            .lock()
            .unwrap()
            .push((ecid, code.to_string(), reason.to_string()));
        if matches!(self.answer, EraseDecision::Confirmed { .. }) {
            if let Some(f) = self.on_confirm.lock().unwrap().take() {
                f();
            }
        }
        self.answer.clone()
    }
}

fn confirmer(answer: EraseDecision) -> Arc<TestConfirmer> {
    Arc::new(TestConfirmer {
        answer,
        asked: Mutex::new(Vec::new()),
        on_confirm: Mutex::new(None),
    })
}

fn run(
    env: &Env,
    cfg: EngineConfig,
    usb: &Arc<SimUsb>,
    confirm: Arc<TestConfirmer>,
) -> (MacReport, Vec<EngineEvent>) {
    let device = find_mac(usb);
    let usb = Arc::clone(usb);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let report = env.rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(120),
            restore_mac(Arc::new(cfg), usb, device, confirm, tx),
        )
        .await
        .expect("the engine finishes in time")
    });
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    (report, events)
}

fn stages(events: &[EngineEvent]) -> Vec<Stage> {
    let mut v: Vec<Stage> = Vec::new();
    for e in events {
        if let EngineEvent::Stage { stage } = e {
            if v.last() != Some(stage) {
                v.push(*stage);
            }
        }
    }
    v
}

pub(crate) fn never_asked() -> Arc<TestConfirmer> {
    confirmer(EraseDecision::Refused { how: "test".into() })
}

#[test]
fn revive_succeeds_from_dfu_to_the_final_status() {
    let env = env("revive");
    let usb = Arc::new(SimUsb::new());
    let boots = Arc::new(Mutex::new(Vec::new()));
    usb.plug(Box::new(mac(
        &env,
        StartMode::Dfu,
        vec![env.scenario("mac-revive", None)],
        boots.clone(),
    )));
    let confirm = never_asked();
    let (report, events) = run(&env, env.config(env.ipsw_pin()), &usb, confirm.clone());
    assert!(report.succeeded(), "{}", report.to_json_line());
    let boots = boots.lock().unwrap();
    assert_eq!(boots.len(), 1);
    assert_eq!(boots[0].wait(Duration::from_secs(5)), SimOutcome::Succeeded);
    assert!(confirm.asked.lock().unwrap().is_empty());
    assert_eq!(
        stages(&events),
        [
            Stage::Identify,
            Stage::PickBuild,
            Stage::Firmware,
            Stage::Tickets,
            Stage::Dfu,
            Stage::Stage1,
            Stage::Stage2,
            Stage::RestoreMode,
            Stage::Done
        ]
    );
    assert!(matches!(events.last(), Some(EngineEvent::Succeeded)));
    assert_eq!(report.ecid.as_deref(), Some("0011223344556677"));
    assert_eq!(report.board.as_deref(), Some(BOARD));
    assert_eq!(report.build.as_deref(), Some("25C56"));
    assert!(report.erase_decision.is_none());
    assert!(!report.checkpoints.is_empty());
    let json: serde_json::Value = serde_json::from_str(&report.to_json_line()).unwrap();
    assert_eq!(json["result"], "succeeded");
    assert_eq!(json["behavior"], "Revive");
}

fn disk_failure() -> Step {
    Step::StatusMsg {
        status: 27,
        log: Some("mount_filesystems: failed to mount the Data volume (APFS error 49)".into()),
        amr_error: None,
    }
}

/// How long a test waits for mac-sim's outcome of a failed restore. The simulated Mac reports
/// it as it goes, and it goes once the host has acknowledged the failure status, or after its
/// 10 s timeout when the host stopped reading first (the engine is done with that Mac as soon
/// as it has the status). 5 s failed once in CI.
const FAILED_RESTORE_WAIT: Duration = Duration::from_secs(15);

#[test]
fn a_disk_failure_asks_for_an_erase_and_erases_only_when_confirmed() {
    let env = env("erase-yes");
    let usb = Arc::new(SimUsb::new());
    let boots = Arc::new(Mutex::new(Vec::new()));
    usb.plug(Box::new(mac(
        &env,
        StartMode::Dfu,
        vec![env.scenario("mac-revive", Some(disk_failure()))],
        boots.clone(),
    )));
    let confirm = confirmer(EraseDecision::Confirmed {
        how: "console test".into(),
        at: SystemTime::now(),
    });
    // The technician re-enters DFU after confirming: the Mac shows up again (same ECID) in DFU.
    {
        let usb2 = Arc::clone(&usb);
        let second = mac(
            &env,
            StartMode::Dfu,
            vec![env.scenario("mac-erase", None)],
            boots.clone(),
        );
        *confirm.on_confirm.lock().unwrap() = Some(Box::new(move || {
            usb2.plug(Box::new(second));
        }));
    }
    let (report, events) = run(&env, env.config(env.ipsw_pin()), &usb, confirm.clone());
    assert!(report.succeeded(), "{}", report.to_json_line());
    let asked = confirm.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].0, ECID);
    assert_eq!(asked[0].1, erase_code(ECID));
    assert!(asked[0].2.contains("27"), "{}", asked[0].2);
    let boots = boots.lock().unwrap();
    assert_eq!(boots.len(), 2);
    assert_eq!(
        boots[0].wait(FAILED_RESTORE_WAIT),
        SimOutcome::DeviceFailed { status: 27 }
    );
    assert_eq!(boots[1].wait(Duration::from_secs(5)), SimOutcome::Succeeded);
    let d = report.erase_decision.as_ref().unwrap();
    assert_eq!(d.decision, "confirmed");
    assert_eq!(d.how.as_deref(), Some("console test"));
    assert!(report.revive_failure.as_ref().unwrap().erase_could_fix);
    assert!(events.iter().any(|e| matches!(
        e,
        EngineEvent::Failed {
            erase_could_fix: true,
            ..
        }
    )));
    assert_eq!(
        format!("{:?}", report.behavior),
        "Erase",
        "the last attempt erased"
    );
}

fn refused_or_timed_out(tag: &str, answer: EraseDecision, expect: &str) {
    let env = env(tag);
    let usb = Arc::new(SimUsb::new());
    let boots = Arc::new(Mutex::new(Vec::new()));
    usb.plug(Box::new(mac(
        &env,
        StartMode::Dfu,
        // A second boot would play an erase; it must never happen.
        vec![
            env.scenario("mac-revive", Some(disk_failure())),
            env.scenario("mac-erase", None),
        ],
        boots.clone(),
    )));
    let confirm = confirmer(answer);
    let (report, _events) = run(&env, env.config(env.ipsw_pin()), &usb, confirm.clone());
    assert!(!report.succeeded());
    assert_eq!(confirm.asked.lock().unwrap().len(), 1);
    let boots = boots.lock().unwrap();
    // Only the revive's restore OS ever ran, and it saw only the Update StartRestore: an Erase
    // request would have been rejected by the Update scenario.
    assert_eq!(boots.len(), 1);
    assert_eq!(
        boots[0].wait(FAILED_RESTORE_WAIT),
        SimOutcome::DeviceFailed { status: 27 }
    );
    assert!(
        !boots[0]
            .report()
            .log
            .iter()
            .any(|l| l.contains("\"Erase\"")),
        "{:?}",
        boots[0].report().log
    );
    assert_eq!(format!("{:?}", report.behavior), "Revive");
    let d = report.erase_decision.as_ref().unwrap();
    assert_eq!(d.decision, expect);
    let f = report.failure.as_ref().unwrap();
    assert!(f.erase_could_fix);
    assert!(f.next_step.contains("not confirmed"), "{}", f.next_step);
}

#[test]
fn a_refused_erase_erases_nothing() {
    refused_or_timed_out(
        "erase-no",
        EraseDecision::Refused {
            how: "console test".into(),
        },
        "refused",
    );
}

#[test]
fn an_unanswered_erase_erases_nothing() {
    refused_or_timed_out("erase-timeout", EraseDecision::TimedOut, "timed out");
}

#[test]
fn an_unsigned_build_is_a_named_failure_before_dfu() {
    let env = env("tss94");
    env.tss.faults.always_94.store(true, Ordering::Relaxed);
    let usb = Arc::new(SimUsb::new());
    let boots = Arc::new(Mutex::new(Vec::new()));
    let m = mac(&env, StartMode::Dfu, vec![], boots.clone());
    usb.plug(Box::new(m));
    let confirm = never_asked();
    let (report, events) = run(&env, env.config(env.ipsw_pin()), &usb, confirm.clone());
    assert!(!report.succeeded());
    let f = report.failure.as_ref().unwrap();
    assert!(f.cause.contains("no longer signed"), "{}", f.cause);
    assert!(f.cause.contains("94"), "{}", f.cause);
    assert!(f.next_step.contains("latest"), "{}", f.next_step);
    assert!(!f.erase_could_fix);
    assert!(confirm.asked.lock().unwrap().is_empty());
    assert!(!stages(&events).contains(&Stage::Dfu));
    assert!(boots.lock().unwrap().is_empty());
}

#[test]
fn a_pinned_build_comes_from_the_catalog_and_the_cache() {
    let env = env("latest");
    // Two builds offered; the pinned one is cached.
    let newest = "https://cdn.invalid/UniversalMac_26.3_25D99_Restore.ipsw";
    let older = format!("https://cdn.invalid/{IPSW_NAME}");
    let catalog = CatalogService::from_builds(vec![
        CatalogBuild {
            product_type: "Macmini9,1".into(),
            version: "26.3".into(),
            build: "25D99".into(),
            url: newest.into(),
            sha1: None,
        },
        CatalogBuild {
            product_type: "Macmini9,1".into(),
            version: "26.2".into(),
            build: "25C56".into(),
            url: older.clone(),
            sha1: None,
        },
    ]);
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = env.rt.block_on(catalog.start(addr, None)).unwrap();
    // Only the pinned build is in the cache: picking it must not touch the (unreachable) CDN.
    let cache = env.dir.0.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::copy(&env.ipsw, cache.join(IPSW_NAME)).unwrap();
    let mut cfg = env.config(BuildPin::Build("25C56".into()));
    cfg.cache_dir = Some(cache);
    cfg.catalog = CatalogFetchConfig {
        catalog_url: sim_catalog::mesu_url(&server),
        fallback_url: None,
        timeout: Duration::from_secs(5),
        http: http(),
    };
    let usb = Arc::new(SimUsb::new());
    let boots = Arc::new(Mutex::new(Vec::new()));
    usb.plug(Box::new(mac(
        &env,
        StartMode::Dfu,
        vec![env.scenario("mac-revive", None)],
        boots.clone(),
    )));
    let (report, events) = run(&env, cfg, &usb, never_asked());
    assert!(report.succeeded(), "{}", report.to_json_line());
    assert!(events
        .iter()
        .any(|e| matches!(e, EngineEvent::Build { build, .. } if build == "25C56")));
}

#[test]
fn a_catalog_build_on_another_usb_disk_is_used_instead_of_downloading() {
    let env = env("usbdisk");
    let catalog = CatalogService::from_builds(vec![CatalogBuild {
        product_type: "Macmini9,1".into(),
        version: "26.2".into(),
        build: "25C56".into(),
        url: format!("https://cdn.invalid/{IPSW_NAME}"),
        sha1: None,
    }]);
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = env.rt.block_on(catalog.start(addr, None)).unwrap();
    // As the image's init mounts a technician's stick: another name, in a folder, no cache.
    let media = env.dir.0.join("media");
    let on_disk = media.join("sdb1/ipsw/macOS 26.2 for the mini.ipsw");
    std::fs::create_dir_all(on_disk.parent().unwrap()).unwrap();
    std::fs::copy(&env.ipsw, &on_disk).unwrap();
    let mut cfg = env.config(BuildPin::Latest);
    cfg.local_ipsw_dirs = vec![media];
    cfg.catalog = CatalogFetchConfig {
        catalog_url: sim_catalog::mesu_url(&server),
        fallback_url: None,
        timeout: Duration::from_secs(5),
        http: http(),
    };
    let usb = Arc::new(SimUsb::new());
    let boots = Arc::new(Mutex::new(Vec::new()));
    usb.plug(Box::new(mac(
        &env,
        StartMode::Dfu,
        vec![env.scenario("mac-revive", None)],
        boots.clone(),
    )));
    // The CDN does not resolve: success means the disk's copy was used.
    let (report, events) = run(&env, cfg, &usb, never_asked());
    assert!(report.succeeded(), "{}", report.to_json_line());
    let said = format!("is on this station: {}", on_disk.display());
    assert!(
        events
            .iter()
            .any(|e| matches!(e, EngineEvent::Message(m) if m.ends_with(&said))),
        "{events:?}"
    );
}

#[test]
fn a_mac_in_recovery_is_a_named_failure() {
    let env = env("recovery");
    let usb = Arc::new(SimUsb::new());
    let boots = Arc::new(Mutex::new(Vec::new()));
    usb.plug(Box::new(mac(
        &env,
        StartMode::Recovery,
        vec![],
        boots.clone(),
    )));
    let confirm = never_asked();
    let (report, events) = run(&env, env.config(env.ipsw_pin()), &usb, confirm.clone());
    assert!(!report.succeeded());
    let f = report.failure.as_ref().unwrap();
    assert!(f.cause.contains("Recovery, not DFU"), "{}", f.cause);
    assert!(f.next_step.contains("DFU"), "{}", f.next_step);
    assert!(!f.erase_could_fix);
    assert!(confirm.asked.lock().unwrap().is_empty());
    assert!(matches!(
        events.last(),
        Some(EngineEvent::Failed {
            erase_could_fix: false,
            ..
        })
    ));
    assert!(boots.lock().unwrap().is_empty());
}

#[test]
fn latest_skips_a_build_apple_no_longer_signs() {
    let env = env("latest");
    let cache = env.dir.0.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    // The newest build in the catalog (26.3, 25D99) is unknown to the signing server.
    let newest_name = "UniversalMac_26.3_25D99_Restore.ipsw";
    let mut opts = IpswOptions::new(BOARD);
    opts.os_size = 4096;
    opts.manifest = Some(full_manifest(&env.dir.0, Some("25D99")));
    make_ipsw(&opts, &cache.join(newest_name)).unwrap();
    std::fs::copy(&env.ipsw, cache.join(IPSW_NAME)).unwrap();
    let catalog = CatalogService::from_builds(vec![
        CatalogBuild {
            product_type: "Macmini9,1".into(),
            version: "26.3".into(),
            build: "25D99".into(),
            url: format!("https://cdn.invalid/{newest_name}"),
            sha1: None,
        },
        CatalogBuild {
            product_type: "Macmini9,1".into(),
            version: "26.2".into(),
            build: "25C56".into(),
            url: format!("https://cdn.invalid/{IPSW_NAME}"),
            sha1: None,
        },
    ]);
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = env.rt.block_on(catalog.start(addr, None)).unwrap();
    let mut cfg = env.config(BuildPin::Latest);
    cfg.cache_dir = Some(cache);
    cfg.catalog = CatalogFetchConfig {
        catalog_url: sim_catalog::mesu_url(&server),
        fallback_url: None,
        timeout: Duration::from_secs(5),
        http: http(),
    };
    let usb = Arc::new(SimUsb::new());
    let boots = Arc::new(Mutex::new(Vec::new()));
    usb.plug(Box::new(mac(
        &env,
        StartMode::Dfu,
        vec![env.scenario("mac-revive", None)],
        boots.clone(),
    )));
    let (report, events) = run(&env, cfg, &usb, never_asked());
    assert!(report.succeeded(), "{}", report.to_json_line());
    assert_eq!(report.build.as_deref(), Some("25C56"));
    assert!(events.iter().any(|e| matches!(
        e,
        EngineEvent::Message(m) if m.contains("25D99") && m.contains("no longer signed")
    )));
    assert_eq!(
        boots.lock().unwrap()[0].wait(Duration::from_secs(5)),
        SimOutcome::Succeeded
    );
}

#[test]
fn a_mac_in_port_dfu_is_a_named_failure() {
    let env = env("portdfu");
    let usb = Arc::new(SimUsb::new());
    let boots = Arc::new(Mutex::new(Vec::new()));
    usb.plug(Box::new(mac(
        &env,
        StartMode::PortDfu,
        vec![],
        boots.clone(),
    )));
    let (report, _) = run(&env, env.config(env.ipsw_pin()), &usb, never_asked());
    let f = report.failure.as_ref().unwrap();
    assert!(f.cause.contains("Port DFU"), "{}", f.cause);
    assert!(f.next_step.contains("DFU port"), "{}", f.next_step);
    assert!(!f.erase_could_fix);
    assert!(boots.lock().unwrap().is_empty());
}

#[test]
fn a_usb_drop_in_stage_2_is_a_named_failure_and_never_asks_to_erase() {
    let env = env("drop");
    let usb = Arc::new(SimUsb::new());
    let boots = Arc::new(Mutex::new(Vec::new()));
    let faults = Faults {
        disconnect_at: Some(mac_sim::faults::Stage::Stage2),
        ..Faults::default()
    };
    usb.plug(Box::new(mac_with(
        &env,
        StartMode::Dfu,
        faults,
        vec![],
        boots.clone(),
    )));
    let confirm = never_asked();
    let (report, events) = run(&env, env.config(env.ipsw_pin()), &usb, confirm.clone());
    assert!(!report.succeeded());
    let f = report.failure.as_ref().unwrap();
    assert!(!f.erase_could_fix, "{f:?}");
    assert!(
        f.next_step.contains("cable") || f.next_step.contains("DFU"),
        "{f:?}"
    );
    assert!(stages(&events).contains(&Stage::Stage1));
    assert!(!stages(&events).contains(&Stage::RestoreMode));
    assert!(confirm.asked.lock().unwrap().is_empty());
}

/// An empty cache and a slow CDN: the engine downloads the IPSW into the cache while it
/// restores from the partial file. DFU starts before the download is complete, every byte
/// crosses the network once, and the restore ends only after the SHA-1 check.
/// Returns the report, whether the download was complete when DFU started, the cached file's
/// length, the IPSW's size and the body bytes the CDN sent.
fn restore_while_downloading(tag: &str, sha1_ok: bool) -> (MacReport, bool, Option<u64>, u64, u64) {
    use sha1::Digest;
    // 20 MiB at 1 MiB/s per connection on 2 (+1 for the restore's reads) connections: the
    // download takes about 7 s, the boot chain needs about 1 MiB of it (about 1 s).
    let env = env_with(tag, 20 << 20);
    let size = std::fs::metadata(&env.ipsw).unwrap().len();
    let mut sha1 = sha1::Sha1::digest(std::fs::read(&env.ipsw).unwrap()).to_vec();
    if !sha1_ok {
        sha1[0] ^= 1;
    }
    let cdn = env.slow_cdn(1 << 20);
    let catalog = CatalogService::from_builds(vec![CatalogBuild {
        product_type: "Macmini9,1".into(),
        version: "26.2".into(),
        build: "25C56".into(),
        url: cdn.url(IPSW_NAME),
        sha1: Some(hex::encode(&sha1)),
    }]);
    let server = env
        .rt
        .block_on(catalog.start("127.0.0.1:0".parse().unwrap(), None))
        .unwrap();
    let cache = env.dir.0.join("cache");
    let mut cfg = env.config(BuildPin::Latest);
    cfg.cache_dir = Some(cache.clone());
    cfg.download.connections = 2;
    cfg.download.chunk_size = 1 << 20;
    cfg.download.read_ahead = 1 << 20;
    cfg.catalog = CatalogFetchConfig {
        catalog_url: sim_catalog::mesu_url(&server),
        fallback_url: None,
        timeout: Duration::from_secs(5),
        http: http(),
    };
    let usb = Arc::new(SimUsb::new());
    let boots = Arc::new(Mutex::new(Vec::new()));
    usb.plug(Box::new(mac(
        &env,
        StartMode::Dfu,
        vec![env.scenario("mac-revive", None)],
        boots.clone(),
    )));
    let device = find_mac(&usb);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let finished = cache.join(IPSW_NAME);
    let (report, complete_at_dfu) = env.rt.block_on(async {
        let job = tokio::spawn(restore_mac(
            Arc::new(cfg),
            usb.clone(),
            device,
            never_asked(),
            tx,
        ));
        let mut complete_at_dfu = None;
        while let Some(e) = rx.recv().await {
            if e == (EngineEvent::Stage { stage: Stage::Dfu }) && complete_at_dfu.is_none() {
                complete_at_dfu = Some(finished.exists());
            }
        }
        let report = tokio::time::timeout(Duration::from_secs(120), job)
            .await
            .expect("the engine finishes in time")
            .unwrap();
        (report, complete_at_dfu.expect("DFU started"))
    });
    let body = cdn.totals().body_bytes;
    let _ = boots.lock().unwrap()[0].wait(Duration::from_secs(5));
    let cached = std::fs::metadata(&finished).ok().map(|m| m.len());
    (report, complete_at_dfu, cached, size, body)
}

#[test]
fn an_empty_cache_downloads_while_the_mac_is_restored() {
    let (report, complete_at_dfu, cached, size, body) = restore_while_downloading("overlap", true);
    assert!(report.succeeded(), "{}", report.to_json_line());
    assert!(
        !complete_at_dfu,
        "DFU started only after the whole IPSW was downloaded"
    );
    assert_eq!(cached, Some(size));
    assert!(
        report
            .firmware_download
            .as_deref()
            .unwrap_or("")
            .contains("matched the catalog's SHA-1"),
        "{}",
        report.to_json_line()
    );
    // The catalog's look at the candidate (remote ranges in 1 MiB blocks) reads the ZIP
    // directory and the manifest once more; nothing of the bulk is fetched twice.
    assert!(
        body >= size && body < size + (4 << 20),
        "{body} bytes crossed the network for a {size}-byte IPSW"
    );
}

#[test]
fn a_download_that_fails_its_sha1_after_the_restore_used_it_fails_the_restore() {
    let (report, _, cached, _, _) = restore_while_downloading("overlap-corrupt", false);
    assert!(!report.succeeded(), "{}", report.to_json_line());
    let failure = report.failure.as_ref().unwrap();
    assert!(
        failure.cause.contains("failed its SHA-1 check afterwards"),
        "{}",
        failure.cause
    );
    assert!(failure.next_step.contains("downloaded afresh"));
    assert_eq!(cached, None, "the corrupt copy was deleted");
}

/// The station's production job: the engine (as `restore-agent station` runs it).
struct EngineJob(Arc<EngineConfig>);

impl restore_agent::station::MacJob for EngineJob {
    fn start(
        &self,
        bus: Arc<dyn UsbBus>,
        device: DeviceInfo,
        confirmer: Arc<dyn EraseConfirmer>,
        events: tokio::sync::mpsc::UnboundedSender<EngineEvent>,
    ) -> restore_agent::station::JobFuture {
        let cfg = Arc::clone(&self.0);
        Box::pin(async move {
            let report = restore_mac(cfg, bus, device, confirmer, events).await;
            serde_json::to_value(&report).unwrap()
        })
    }
}

/// The cable is pulled during `stage` (mac-sim's fault knobs drop the Mac off the bus there),
/// then the Mac is plugged in again in DFU: the station names the first failure and restores
/// the Mac on its second appearance. Returns the stage the first run failed in.
fn unplugged_then_replugged(tag: &str, os_size: u64, faults: Faults) -> String {
    use restore_agent::station::{Display, NoNetwork, Station, StationConfig};
    let env = env_with(tag, os_size);
    let data = env.dir.0.join("station");
    let usb = Arc::new(SimUsb::new());
    let boots = Arc::new(Mutex::new(Vec::new()));
    usb.plug(Box::new(mac_with(
        &env,
        StartMode::Dfu,
        faults,
        vec![env.scenario("mac-revive", None)],
        boots.clone(),
    )));
    let station = Station::new(
        StationConfig {
            display: Display::Lines,
            probe_ecid: false,
            exit_after: Some(2),
            data_dir: Some(data.clone()),
            ..StationConfig::default()
        },
        usb.clone(),
        Arc::new(EngineJob(Arc::new(env.config(env.ipsw_pin())))),
        Arc::new(restore_agent::engine::NeverErase),
        Arc::new(NoNetwork),
        Box::new(std::io::sink()),
    );
    let summary = env.rt.block_on(async {
        let run = tokio::spawn(station.run(std::future::pending()));
        // The technician sees the station report the Mac lost and plugs it back in (in DFU).
        let reports = data.join("reports");
        let t = std::time::Instant::now();
        while std::fs::read_dir(&reports).map_or(0, |d| d.count()) == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "no report of the first run"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        usb.plug(Box::new(mac(
            &env,
            StartMode::Dfu,
            vec![env.scenario("mac-revive", None)],
            boots.clone(),
        )));
        tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .expect("the station finishes both runs")
            .unwrap()
            .unwrap()
    });
    let reports = &summary.report_values;
    assert_eq!(reports.len(), 2, "{reports:?}");
    let engine: Vec<_> = reports.iter().map(|r| &r["engine"]).collect();
    let failed: Vec<_> = engine.iter().filter(|r| r["result"] == "failed").collect();
    let succeeded: Vec<_> = engine
        .iter()
        .filter(|r| r["result"] == "succeeded")
        .collect();
    assert_eq!((failed.len(), succeeded.len()), (1, 1), "{reports:?}");
    assert_eq!(succeeded[0]["ecid"], "0011223344556677");
    assert_eq!(
        failed[0]["failure"]["erase_could_fix"], false,
        "{reports:?}"
    );
    let last = boots
        .lock()
        .unwrap()
        .last()
        .map(|b| b.wait(Duration::from_secs(5)));
    assert_eq!(last, Some(SimOutcome::Succeeded));
    let stages = failed[0]["stages"].as_array().unwrap();
    stages.last().unwrap()["stage"]
        .as_str()
        .unwrap()
        .to_string()
}

fn drop_at(stage: mac_sim::faults::Stage) -> Faults {
    Faults {
        disconnect_at: Some(stage),
        ..Faults::default()
    }
}

#[test]
fn unplugged_in_dfu_the_mac_is_picked_up_again_and_finished() {
    let failed_in =
        unplugged_then_replugged("unplug-dfu", OS_SIZE, drop_at(mac_sim::faults::Stage::Dfu));
    assert_eq!(failed_in, "Dfu");
}

#[test]
fn unplugged_in_stage1_the_mac_is_picked_up_again_and_finished() {
    let s = unplugged_then_replugged(
        "unplug-s1",
        OS_SIZE,
        drop_at(mac_sim::faults::Stage::Stage1),
    );
    assert_eq!(s, "Stage1");
}

#[test]
fn unplugged_in_stage2_the_mac_is_picked_up_again_and_finished() {
    let s = unplugged_then_replugged(
        "unplug-s2",
        OS_SIZE,
        drop_at(mac_sim::faults::Stage::Stage2),
    );
    assert_eq!(s, "Stage2");
}

#[test]
fn unplugged_during_asr_the_mac_is_picked_up_again_and_finished() {
    // Restored's messages are a few KiB; byte 2 Mi of usbmux traffic lies in the 4 MiB image.
    let s = unplugged_then_replugged(
        "unplug-asr",
        4 << 20,
        Faults {
            disconnect_in_restore_after_bytes: Some(2 << 20),
            ..Faults::default()
        },
    );
    assert_eq!(s, "RestoreMode");
}

#[test]
fn unplugged_after_bootx_the_mac_is_picked_up_again_and_finished() {
    let s = unplugged_then_replugged(
        "unplug-bootx",
        OS_SIZE,
        drop_at(mac_sim::faults::Stage::AfterBootx),
    );
    assert!(s == "Stage2" || s == "RestoreMode", "{s}");
}

/// `n` Macs on one station with an empty cache and a slow CDN: every Mac is restored and the
/// IPSW crosses the network once (one download, read by all of them while it runs), with the
/// Macs restored at the same time.
fn macs_share_one_download(n: u64) {
    use restore_agent::station::{Display, NoNetwork, Station, StationConfig};
    let env = env_with(&format!("share-{n}"), 8 << 20);
    let size = std::fs::metadata(&env.ipsw).unwrap().len();
    let cdn = env.slow_cdn(2 << 20);
    let usb = Arc::new(SimUsb::new());
    let boots = Arc::new(Mutex::new(Vec::new()));
    for i in 0..n {
        usb.plug(Box::new(mac_unit(
            &env,
            ECID + i,
            StartMode::Dfu,
            Faults::default(),
            vec![env.scenario("mac-revive", None)],
            boots.clone(),
        )));
    }
    let mut cfg = env.config(BuildPin::Ipsw(PathOrUrl::Url(cdn.url(IPSW_NAME))));
    cfg.cache_dir = Some(env.dir.0.join("cache"));
    cfg.download.connections = 2;
    cfg.download.chunk_size = 1 << 20;
    cfg.download.read_ahead = 1 << 20;
    // A serial console's view: plain lines.
    let screen = Screen::default();
    let station = Station::new(
        StationConfig {
            display: Display::Lines,
            probe_ecid: false,
            exit_after: Some(n as u32),
            ..StationConfig::default()
        },
        usb.clone(),
        Arc::new(EngineJob(Arc::new(cfg))),
        Arc::new(restore_agent::engine::NeverErase),
        Arc::new(NoNetwork),
        Box::new(screen.clone()),
    );
    let summary = env.rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(180),
            station.run(std::future::pending()),
        )
        .await
        .expect("the station finishes every Mac")
        .unwrap()
    });
    let ecids: std::collections::BTreeSet<String> = summary
        .report_values
        .iter()
        .filter(|r| r["engine"]["result"] == "succeeded")
        .map(|r| r["engine"]["ecid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ecids.len() as u64, n, "{:?}", summary.report_values);
    for b in boots.lock().unwrap().iter() {
        assert_eq!(b.wait(Duration::from_secs(5)), SimOutcome::Succeeded);
    }
    let lines = String::from_utf8(screen.0.lock().unwrap().clone()).unwrap();
    assert!(!lines.contains('\x1b'), "escape codes on a serial console");
    // At once, not one after another: every Mac is on screen before the first one's report
    // (the cache lock alone would also give one download if the Macs took turns).
    let first_report = lines
        .lines()
        .position(|l| l.contains(": report "))
        .expect("report lines");
    for i in 0..n {
        let ecid = format!("0x{:016X}", ECID + i);
        let shown = lines.lines().position(|l| l.contains(&ecid));
        assert!(
            shown.is_some_and(|at| at < first_report),
            "{ecid} not shown before the first report (line {first_report}):\n{lines}"
        );
    }
    let body = cdn.totals().body_bytes;
    // Racing a slow part near the end may fetch up to a part twice; a second download would
    // double the total.
    assert!(
        body >= size && body <= size + (2 << 20),
        "{body} bytes crossed the network for {n} Macs and a {size}-byte IPSW"
    );
}

#[test]
fn two_macs_at_once_share_one_download() {
    macs_share_one_download(2);
}

#[test]
fn four_macs_at_once_share_one_download() {
    macs_share_one_download(4);
}

/// The station stops (power cut, crash) halfway through the download the restore reads from;
/// the next start resumes the download from its record instead of fetching it again, and
/// restores the Mac.
#[test]
fn a_restarted_station_resumes_the_half_done_download() {
    use mac_sim::services::cdn::bytes_served_twice;
    let env = env_with("resume", 8 << 20);
    let size = std::fs::metadata(&env.ipsw).unwrap().len();
    let cdn = env.slow_cdn(1 << 20);
    let cache = env.dir.0.join("cache");
    let config = || {
        let mut cfg = env.config(BuildPin::Ipsw(PathOrUrl::Url(cdn.url(IPSW_NAME))));
        cfg.cache_dir = Some(cache.clone());
        cfg.download.connections = 2;
        cfg.download.chunk_size = 1 << 20;
        cfg.download.read_ahead = 1 << 20;
        cfg.download.save_every = Duration::from_millis(20);
        Arc::new(cfg)
    };
    let usb = Arc::new(SimUsb::new());
    let boots = Arc::new(Mutex::new(Vec::new()));

    // First start: stopped once half the file has arrived.
    usb.plug(Box::new(mac(
        &env,
        StartMode::Dfu,
        vec![env.scenario("mac-revive", None)],
        boots.clone(),
    )));
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    first.spawn(restore_mac(
        config(),
        usb.clone(),
        find_mac(&usb),
        never_asked(),
        tx,
    ));
    let t = std::time::Instant::now();
    while cdn.totals().body_bytes < size / 2 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the download never got going"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    first.shutdown_timeout(Duration::from_secs(1));
    assert!(
        !cache.join(IPSW_NAME).exists(),
        "stopped before the download ended"
    );

    // Second start with a Mac in DFU (another unit: the first is left where it stopped).
    let port = usb.plug(Box::new(mac_unit(
        &env,
        ECID + 1,
        StartMode::Dfu,
        Faults::default(),
        vec![env.scenario("mac-revive", None)],
        boots.clone(),
    )));
    let device = usb
        .devices()
        .unwrap()
        .into_iter()
        .find(|d| d.location.ports == vec![port as u8])
        .unwrap();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let report = env.rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(120),
            restore_mac(config(), usb.clone(), device, never_asked(), tx),
        )
        .await
        .expect("the second start finishes")
    });
    assert!(report.succeeded(), "{}", report.to_json_line());
    assert_eq!(
        std::fs::metadata(cache.join(IPSW_NAME)).unwrap().len(),
        size
    );
    // What was on disk and recorded is never fetched again; only parts in flight at the stop
    // (at most one 1 MiB part per connection, three connections) may be.
    let twice = bytes_served_twice(&cdn.served(IPSW_NAME));
    assert!(
        twice <= 3 << 20,
        "{twice} bytes were fetched twice (IPSW {size} bytes)"
    );
    assert!(cdn.totals().body_bytes < size + (3 << 20));
}

/// A `Write` the test reads back.
#[derive(Clone, Default)]
struct Screen(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Screen {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The terminal dashboard of a station restoring two simulated Macs with the real engine, as a
/// person sees it: a frame with both Macs at work and the final one are shown in a real
/// terminal (tmux) and read back from its screen.
#[test]
fn the_dashboard_of_real_restores_shows_in_a_terminal() {
    use restore_agent::station::{Display, NoNetwork, Station, StationConfig};
    use std::process::Command;
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("tmux is not installed: skipping the terminal check (apt-get install tmux)");
        return;
    }
    let env = env("dashboard");
    let usb = Arc::new(SimUsb::new());
    let boots = Arc::new(Mutex::new(Vec::new()));
    for i in 0..2 {
        usb.plug(Box::new(mac_unit(
            &env,
            ECID + i,
            StartMode::Dfu,
            Faults::default(),
            vec![env.scenario("mac-revive", None)],
            boots.clone(),
        )));
    }
    let screen = Screen::default();
    let station = Station::new(
        StationConfig {
            display: Display::Terminal { width: Some(110) },
            probe_ecid: false,
            exit_after: Some(2),
            ..StationConfig::default()
        },
        usb.clone(),
        Arc::new(EngineJob(Arc::new(env.config(env.ipsw_pin())))),
        Arc::new(restore_agent::engine::NeverErase),
        Arc::new(NoNetwork),
        Box::new(screen.clone()),
    );
    let summary = env.rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(120),
            station.run(std::future::pending()),
        )
        .await
        .expect("the station finishes both Macs")
        .unwrap()
    });
    assert_eq!(summary.report_values.len(), 2);
    let raw = String::from_utf8(screen.0.lock().unwrap().clone()).unwrap();
    let frames: Vec<&str> = raw.split("\x1b[H").filter(|f| !f.is_empty()).collect();
    let busy = frames
        .iter()
        .find(|f| {
            f.contains("\r\n1-1 ")
                && f.contains("\r\n1-2 ")
                && f.contains("Macs: 2 working")
                && f.matches("Macmini9,1").count() == 2
        })
        .expect("a frame with both Macs identified and at work");
    let last = frames.last().unwrap();

    let show = |tag: &str, frame: &str| -> String {
        let file = env.dir.0.join(format!("{tag}.ans"));
        std::fs::write(&file, format!("\x1b[H\x1b[2J\x1b[H{frame}")).unwrap();
        let server = format!("engine-dash-{}-{tag}", std::process::id());
        let tmux = |args: &[&str]| {
            Command::new("tmux")
                .arg("-L")
                .arg(&server)
                .args(args)
                .output()
                .unwrap()
        };
        let cmd = format!("cat {}; sleep 30", file.display());
        let started = tmux(&["new-session", "-d", "-x", "120", "-y", "30", &cmd]);
        assert!(started.status.success(), "{started:?}");
        let t = std::time::Instant::now();
        let mut text = String::new();
        while t.elapsed() < Duration::from_secs(10) {
            let cap = tmux(&["capture-pane", "-p", "-t", "0"]);
            text = String::from_utf8_lossy(&cap.stdout).into_owned();
            if text.contains("PORT") {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = tmux(&["kill-server"]);
        text
    };
    let during = show("busy", busy);
    for (port, ecid) in [("1-1", "0x0011223344556677"), ("1-2", "0x0011223344556678")] {
        assert!(
            during.lines().any(|l| l.starts_with(&format!("{port} "))
                && l.contains("Macmini9,1")
                && l.contains(ecid)),
            "no row for {port} on the screen:\n{during}"
        );
    }
    assert!(during.contains("Macs: 2 working"), "{during}");
    assert!(
        !during.contains('\x1b'),
        "escape codes shown as text:\n{during}"
    );
    let after = show("last", last);
    assert!(
        after.contains("2 done, 0 failed"),
        "the final screen:\n{after}"
    );
}
