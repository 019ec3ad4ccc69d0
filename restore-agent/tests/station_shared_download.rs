//! Four Macs at once needing the same build: the station runs their jobs concurrently and the
//! cache lock makes one download serve all of them (the simulated CDN counts the bytes).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mac_sim::services::cdn::{generated_sha1, Cdn, CdnConfig, CdnFile};
use restore_agent::download::{DownloadOptions, Downloader, Event};
use restore_agent::http::HttpConfig;
use restore_agent::station::api::{EngineEvent, EraseConfirmer, Stage};
use restore_agent::station::demo::{dfu_device, FakeBus};
use restore_agent::station::{Display, JobFuture, MacJob, NoNetwork, Station, StationConfig};
use restore_agent::usb::{DeviceInfo, UsbBus};
use serde_json::json;
use tokio::sync::mpsc::UnboundedSender;

const NAME: &str = "UniversalMac_26.2_25C56_Restore.ipsw";
const SIZE: u64 = 1 << 20;
const SEED: u64 = 77;

/// The firmware stage of a per-Mac job: fetch the build into the shared cache.
struct FirmwareJob {
    url: String,
    cache: PathBuf,
}

impl MacJob for FirmwareJob {
    fn start(
        &self,
        _bus: Arc<dyn UsbBus>,
        _device: DeviceInfo,
        _confirmer: Arc<dyn EraseConfirmer>,
        events: UnboundedSender<EngineEvent>,
    ) -> JobFuture {
        let mut o = DownloadOptions::new(&self.url, &self.cache);
        o.connections = 2;
        o.chunk_size = Some(256 * 1024);
        o.lock_poll = Duration::from_millis(20);
        o.progress_every = Duration::from_millis(20);
        o.save_every = Duration::from_millis(20);
        o.sha1 = Some(generated_sha1(SEED, SIZE));
        Box::pin(async move {
            let _ = events.send(EngineEvent::Stage {
                stage: Stage::Firmware,
            });
            let ev = events.clone();
            let d = Downloader::new(&HttpConfig::default(), o)
                .unwrap()
                .on_event(Arc::new(move |e: &Event| {
                    if let Event::Progress(p) = e {
                        let _ = ev.send(EngineEvent::Progress {
                            what: "firmware".into(),
                            done: p.done,
                            total: Some(p.total),
                            rate_bps: None,
                        });
                    }
                }));
            match d.run().await {
                Ok(got) => {
                    let _ = events.send(EngineEvent::Succeeded);
                    json!({ "from_cache": got.from_cache, "fetched": got.fetched, "size": got.size })
                }
                Err(e) => {
                    let _ = events.send(EngineEvent::Failed {
                        cause: e.to_string(),
                        next_step: "check the network".into(),
                        erase_could_fix: false,
                    });
                    json!({ "error": e.to_string() })
                }
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_macs_share_one_download_of_their_build() {
    let cdn = Cdn::start(
        "127.0.0.1:0".parse().unwrap(),
        None,
        CdnConfig {
            files: vec![CdnFile::generated(NAME, SIZE, SEED)],
            // Slow enough that every Mac's job starts while the first download runs.
            rate: Some(2 << 20),
            faults: vec![],
        },
    )
    .await
    .unwrap();
    let cache = std::env::temp_dir().join(format!("station-shared-dl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&cache).unwrap();
    let station = Station::new(
        StationConfig {
            display: Display::Lines,
            probe_ecid: false,
            exit_after: Some(4),
            ..StationConfig::default()
        },
        Arc::new(FakeBus::new(
            (1..=4).map(|p| dfu_device(p, p + 1)).collect(),
        )),
        Arc::new(FirmwareJob {
            url: cdn.url(NAME),
            cache: cache.clone(),
        }),
        Arc::new(restore_agent::engine::NeverErase),
        Arc::new(NoNetwork),
        Box::new(std::io::sink()),
    );
    let summary =
        tokio::time::timeout(Duration::from_secs(30), station.run(std::future::pending()))
            .await
            .expect("the station finished")
            .unwrap();
    assert_eq!(summary.done, 4, "{:?}", summary.report_values);
    let downloaded: Vec<bool> = summary
        .report_values
        .iter()
        .map(|r| r["engine"]["from_cache"] == false)
        .collect();
    assert_eq!(
        downloaded.iter().filter(|d| **d).count(),
        1,
        "exactly one Mac's job downloaded: {:?}",
        summary.report_values
    );
    assert_eq!(
        cdn.totals().body_bytes,
        SIZE,
        "the build crossed the network once"
    );
    std::fs::remove_dir_all(&cache).unwrap();
}
