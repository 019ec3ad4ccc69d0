//! End to end in one process: the agent's usbmux edge, restored client and ASR streamer
//! against the simulated Mac's restore mode (mac-sim's device-side usbmux, scenario player and
//! ASR sink), over the in-process USB bus. Both shipped scenarios, every fault knob, and a
//! multi-GiB generated image (`#[ignore]`: CI runs it in release mode).

mod restore_sim_support;
mod support;

use std::sync::Arc;
use std::time::Duration;

use mac_sim::restore::restored::Outcome;
use mac_sim::restore::scenario::{DataRequest, ImageSpec, Scenario, Step};
use restore_agent::asr::ImageSource;
use restore_agent::ipsw::RandomAccess;
use restore_agent::restored::options::RestoreBehavior;
use restore_agent::restored::{RestoreOutcome, RestoredClient, RestoredError};
use restore_agent::usb::UsbBus;
use restore_agent::usbmux::edge::{EdgeConfig, EdgeError, MuxHandle};
use restore_sim_support::*;

/// Bounds the whole host side of one restore; nothing in these tests should come near it.
/// Large images get 60 s more per GiB (each scenario streams the image twice).
fn host_deadline(image_len: u64) -> Duration {
    Duration::from_secs(60 + 60 * (image_len >> 30))
}
/// How long the simulated Mac waits for the host at any one point.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(5);
/// Not a multiple of the ASR chunk, so the short last chunk is exercised; above 1 MiB because
/// mac-revive reads OOB data at 1 MiB.
const OS_SIZE: u64 = (3 << 20) + 12_345;

#[derive(Debug, thiserror::Error)]
enum HostError {
    #[error(transparent)]
    Edge(#[from] EdgeError),
    #[error(transparent)]
    Restored(#[from] RestoredError),
    #[error("the host side did not finish within {0:?}")]
    Hang(Duration),
}

/// Writes the image the host streams to a file the device compares against, so what arrives
/// is checked against what the IPSW holds, byte for byte.
fn expect_image(scenario: &mut Scenario, image: &ImageSource, dir: &Scratch) {
    let path = dir.0.join("expected-os.img");
    let mut data = vec![0u8; usize::try_from(image.len()).unwrap()];
    image.read_at(0, &mut data).unwrap();
    std::fs::write(&path, &data).unwrap();
    scenario.image = ImageSpec {
        size: image.len(),
        seed: None,
        path: Some(path),
        sha1: None,
    };
}

fn behavior(scenario: &Scenario) -> RestoreBehavior {
    match scenario.behavior.as_str() {
        "Erase" => RestoreBehavior::Erase,
        _ => RestoreBehavior::Update,
    }
}

/// The agent's whole restore-mode path: find the usbmux interface, open the mux, run
/// restored (with the reverse proxy), stream ASR.
async fn run_host(
    rig: &Rig,
    ctx: Arc<IpswContext>,
    b: RestoreBehavior,
) -> Result<RestoreOutcome, HostError> {
    let transport = rig.usb.open(&rig.device()).unwrap();
    let ctx_len = ctx.image().len();
    let work = async {
        let mux = Arc::new(MuxHandle::open(transport, EdgeConfig::default()).await?);
        let params = ctx.params(b);
        let result = async {
            let client = RestoredClient::connect(ctx, mux.clone(), host_config()).await?;
            client.restore(params).await
        }
        .await;
        mux.close(Duration::from_secs(5)).await;
        Ok(result?)
    };
    let deadline = host_deadline(ctx_len);
    tokio::time::timeout(deadline, work)
        .await
        .unwrap_or(Err(HostError::Hang(deadline)))
}

struct Run {
    host: Result<RestoreOutcome, HostError>,
    device: Outcome,
    rig: Rig,
}

/// Restores with `scenario`, streaming the IPSW's OS entry (or `image`).
async fn restore(mut scenario: Scenario, image: Option<ImageSource>) -> Run {
    let dir = Scratch::new(&scenario.name);
    let ipsw = synthetic_ipsw(&dir, OS_SIZE);
    let b = behavior(&scenario);
    let ctx = Arc::new(IpswContext::open(&ipsw, b, image.clone()));
    if image.is_none() {
        expect_image(&mut scenario, &ctx.image(), &dir);
    }
    let rig = Rig::plug(scenario, DEVICE_TIMEOUT);
    let host = run_host(&rig, ctx, b).await;
    let handle = rig.handle();
    let device = tokio::task::spawn_blocking(move || handle.wait(DEVICE_TIMEOUT * 3))
        .await
        .unwrap();
    Run { host, device, rig }
}

fn assert_clean(run: &Run) {
    let v = run.rig.handle().violations();
    assert_eq!(v.total(), 0, "protocol violations: {v:?}");
}

fn shipped(name: &str) -> Scenario {
    Scenario::shipped(name).unwrap()
}

fn assert_success(run: &Run) {
    let report = run.rig.handle().report();
    let outcome = match &run.host {
        Ok(o) => o,
        Err(e) => panic!(
            "host failed: {e}\ndevice: {:?}\n{}",
            run.device,
            report.log.join("\n")
        ),
    };
    assert_eq!(run.device, Outcome::Succeeded, "{}", report.log.join("\n"));
    assert_clean(run);
    assert!(!outcome.asr_sessions.is_empty());
    let asr = report.asr.expect("the device ran an ASR session");
    let size = outcome.asr_sessions[0].image_size;
    assert_eq!(asr.bytes, size);
    assert_eq!(asr.chunks, size.div_ceil(131_072));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revive_restores_end_to_end_from_an_ipsw_entry() {
    let run = restore(shipped("mac-revive"), None).await;
    assert_success(&run);
    let outcome = run.host.as_ref().unwrap();
    // RecoveryOSASRImage and SystemImageData each stream the whole OS entry.
    assert_eq!(outcome.asr_sessions.len(), 2);
    for s in &outcome.asr_sessions {
        assert_eq!(s.image_size, OS_SIZE);
        assert_eq!(s.payload_bytes, OS_SIZE);
        assert!(s.checksum_chunks);
    }
    let served = run.rig.handle().report().served;
    for dt in [
        "BuildIdentityDict",
        "RecoveryOSRootTicketData",
        "RecoveryOSLocalPolicy",
        "PersonalizedBootObjectV3",
        "SourceBootObjectV4",
        "BootabilityBundle",
        "SystemImageData",
        "ReceiptManifest",
        "URLAsset",
    ] {
        assert!(
            served.iter().any(|s| s == dt),
            "{dt} not served: {served:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_restores_end_to_end_from_an_ipsw_entry() {
    let run = restore(shipped("mac-erase"), None).await;
    assert_success(&run);
    let outcome = run.host.as_ref().unwrap();
    assert!(outcome
        .asr_sessions
        .iter()
        .all(|s| s.payload_bytes == OS_SIZE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_acks_still_restore() {
    let mut s = shipped("mac-erase");
    s.faults.ack_delay_ms = 2;
    let run = restore(s, None).await;
    assert_success(&run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mac_that_drops_off_mid_asr_ends_in_a_named_error() {
    let mut s = shipped("mac-erase");
    s.faults.disconnect_after_asr_bytes = Some(1 << 20);
    let run = restore(s, None).await;
    let err = run.host.as_ref().expect_err("the restore cannot succeed");
    assert!(
        matches!(
            err,
            HostError::Restored(
                RestoredError::Asr { .. } | RestoredError::ConnectionLost | RestoredError::Io(_)
            )
        ),
        "{err}"
    );
    assert!(matches!(run.device, Outcome::Fault(_)), "{:?}", run.device);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rst_on_the_restored_connection_ends_in_a_named_error() {
    let mut s = shipped("mac-revive");
    s.faults.rst_main_after_step = Some(3);
    let run = restore(s, None).await;
    let err = run.host.as_ref().expect_err("the restore cannot succeed");
    assert!(
        matches!(
            err,
            HostError::Restored(RestoredError::ConnectionLost | RestoredError::Io(_))
        ),
        "{err}"
    );
    assert!(matches!(run.device, Outcome::Fault(_)), "{:?}", run.device);
    assert_clean(&run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rst_on_the_asr_connection_ends_in_a_named_error() {
    let mut s = shipped("mac-erase");
    s.faults.rst_asr_after_bytes = Some(1 << 20);
    let run = restore(s, None).await;
    let err = run.host.as_ref().expect_err("the restore cannot succeed");
    assert!(
        matches!(
            err,
            HostError::Restored(
                RestoredError::Asr { .. }
                    | RestoredError::DeviceFailed { status: 14, .. }
                    | RestoredError::ConnectionLost
            )
        ),
        "{err}"
    );
    assert!(matches!(run.device, Outcome::Fault(_)), "{:?}", run.device);
    assert_clean(&run);
}

/// Index of the first SystemImageData request, where faults are injected.
fn before_system_image(s: &Scenario) -> usize {
    s.steps
        .iter()
        .position(|st| matches!(st, Step::DataRequestMsg(r) if r.data_type == "SystemImageData"))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_side_error_status_is_reported() {
    let mut s = shipped("mac-revive");
    let at = before_system_image(&s);
    s.steps.insert(
        at,
        Step::StatusMsg {
            status: 14,
            log: Some("simulated: could not create the system volume".into()),
            amr_error: None,
        },
    );
    let run = restore(s, None).await;
    match run
        .host
        .as_ref()
        .expect_err("the device failed the restore")
    {
        HostError::Restored(RestoredError::DeviceFailed { status, log, .. }) => {
            assert_eq!(*status, 14);
            assert!(log.as_deref().unwrap_or("").contains("system volume"));
        }
        other => panic!("unexpected host error: {other}"),
    }
    assert_eq!(run.device, Outcome::DeviceFailed { status: 14 });
    assert_clean(&run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_data_type_aborts_at_once_naming_it() {
    let mut s = shipped("mac-erase");
    let at = before_system_image(&s);
    s.steps.insert(
        at,
        Step::DataRequestMsg(DataRequest {
            data_type: "FrobnicatorData".into(),
            arguments: Default::default(),
            data_port: None,
            expect_variant: None,
            expect_host_abort: true,
            expect_ticket: None,
            expect_firmware: None,
        }),
    );
    let run = restore(s, None).await;
    match run.host.as_ref().expect_err("the host must abort") {
        HostError::Restored(RestoredError::UnknownDataType(dt)) => {
            assert_eq!(dt, "FrobnicatorData")
        }
        other => panic!("unexpected host error: {other}"),
    }
    assert_eq!(
        run.device,
        Outcome::HostAborted {
            data_type: "FrobnicatorData".into()
        }
    );
    assert_clean(&run);
}

/// A multi-GiB image generated on both sides (the scenario's seed generator on the device, a
/// generated `RandomAccess` on the host): nothing that size is stored. Release mode only:
/// `cargo test --release -p restore-agent --test restore_sim -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "multi-GiB; CI runs it in release mode"]
async fn multi_gib_image_streams_end_to_end() {
    const SIZE: u64 = (2 << 30) + 4096 + 77;
    let mut s = shipped("mac-erase");
    let seed = s.image.seed.unwrap_or(0x5eed);
    s.image = ImageSpec {
        size: SIZE,
        seed: Some(seed),
        path: None,
        sha1: None,
    };
    let image: ImageSource = Arc::new(SeedImage { seed, len: SIZE });
    let run = restore(s, Some(image)).await;
    assert_success(&run);
    let outcome = run.host.as_ref().unwrap();
    assert!(outcome.asr_sessions.iter().all(|a| a.payload_bytes == SIZE));
}

/// The board of the firmware-updater scenario: a MacBook Air M2 (J413AP) has USB-C retimers
/// with FTAB firmware and a TCON.
const UPDATER_BOARD: &str = "j413ap";

/// A simulated TSS knowing the IPSW's (digest-rewritten) BuildManifest, and a client for it.
async fn sim_tss(
    ipsw: &std::path::Path,
) -> (
    Arc<mac_sim::services::tss::TssService>,
    mac_sim::services::http::Server,
    restore_agent::tss_client::TssClient,
) {
    use mac_sim::services::tss::{TssConfig, TssService};
    use restore_agent::ipsw::{Ipsw, LocalFile};
    let archive = Ipsw::open(Arc::new(LocalFile::open(ipsw).unwrap())).unwrap();
    let manifest: plist::Dictionary =
        plist::from_bytes(&archive.build_manifest().unwrap()).unwrap();
    let tss = Arc::new(TssService::new(TssConfig {
        manifests: vec![manifest],
        ..TssConfig::default()
    }));
    let server = tss
        .start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let client =
        restore_agent::tss_client::TssClient::new(restore_agent::tss_client::TssClientConfig {
            server: Some(server.url()),
            max_attempts: 2,
            retry_delay: Duration::from_millis(5),
            ..Default::default()
        })
        .unwrap();
    (tss, server, client)
}

/// Plays the firmware-updater scenario against the agent's restored client, with updater
/// requests going to the simulated TSS. `refuse`: the TSS answers every request with 94.
async fn updaters(refuse: bool) -> (Run, Arc<mac_sim::services::tss::TssService>) {
    let scenario = shipped("mac-firmware-updaters");
    let dir = Scratch::new(&scenario.name);
    let ipsw = synthetic_ipsw_for(&dir, UPDATER_BOARD, OS_SIZE);
    let (tss, _server, client) = sim_tss(&ipsw).await;
    tss.faults
        .always_94
        .store(refuse, std::sync::atomic::Ordering::Relaxed);
    let b = behavior(&scenario);
    let ctx = Arc::new(IpswContext::open_for(UPDATER_BOARD, &ipsw, b, None).with_tss(client));
    let rig = Rig::plug_board(UPDATER_BOARD, scenario, DEVICE_TIMEOUT);
    let host = run_host(&rig, ctx, b).await;
    let handle = rig.handle();
    let device = tokio::task::spawn_blocking(move || handle.wait(DEVICE_TIMEOUT * 3))
        .await
        .unwrap();
    (Run { host, device, rig }, tss)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_updaters_get_signed_tickets_and_firmware_from_the_tss() {
    let (run, tss) = updaters(false).await;
    let report = run.rig.handle().report();
    if let Err(e) = &run.host {
        panic!("host failed: {e}\n{}", report.log.join("\n"));
    }
    assert_eq!(run.device, Outcome::Succeeded, "{}", report.log.join("\n"));
    assert_clean(&run);
    // Both replies validated on the device: signed ticket bound to the coprocessor's nonce,
    // an FTAB ending in rrko for the retimer, bytes for the TCON.
    let served: Vec<_> = report
        .served
        .iter()
        .filter(|s| *s == "FirmwareUpdaterData")
        .collect();
    assert_eq!(served.len(), 2, "{:?}", report.served);
    assert_eq!(tss.requests(), 2);
    let last = tss.last_request().unwrap();
    assert_eq!(
        last.get("@Baobab,Ticket"),
        Some(&plist::Value::Boolean(true))
    );
    assert!(last.contains_key("Baobab,TCON"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_firmware_ticket_fails_naming_the_updater() {
    let (run, _tss) = updaters(true).await;
    let err = run.host.as_ref().expect_err("the TSS refused");
    let text = err.to_string();
    assert!(
        text.contains("AppleTypeCRetimer") && text.contains("94"),
        "{text}"
    );
    assert!(!matches!(run.device, Outcome::Succeeded));
}
