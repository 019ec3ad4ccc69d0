//! Download and restore overlapped, against the serial baseline measured in the same run
//! (`cargo bench -p restore-agent --bench overlap`). Prints, never asserts.
//!
//! Setup: the simulated CDN serves the IPSW with a per-connection rate limit; the in-process
//! simulated Mac runs DFU → stage 1 → stage 2 → restore mode with the real engine.
//!
//! * serial: the downloader fetches the whole IPSW into the cache, then the engine restores
//!   from the cached file (what a station did before the engine read partial files);
//! * overlapped: the engine starts with an empty cache and restores from the partial file
//!   while it downloads.
//!
//! For each: total time and the time to the first DFU byte (the first upload progress of
//! iBSS). Goal: overlapped ≈ max(download, restore), first DFU byte within seconds.
//!
//! Scale with `MACRESCUE_BENCH_OS_MIB` (OS image, default 64), `MACRESCUE_BENCH_RATE_MIB` (per
//! connection, default 4), `MACRESCUE_BENCH_CONNECTIONS` (default 4).

#[allow(dead_code, unused_imports)]
#[path = "../tests/engine_sim.rs"]
mod engine_sim;

mod measure;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine_sim::*;
use mac_sim::faults::StartMode;
use restore_agent::download::{DownloadOptions, Downloader};
use restore_agent::engine::{restore_mac, BuildPin, EngineEvent, PathOrUrl, Stage};

use measure::{env_u64, MIB};

struct Timed {
    total: f64,
    first_dfu_byte: f64,
    ok: bool,
}

/// One restore of a fresh simulated Mac with the IPSW at `url`, through `cache`.
fn restore(env: &Env, url: &str, cache: &std::path::Path, connections: usize) -> Timed {
    let usb = Arc::new(support::SimUsb::new());
    let boots = Arc::new(Mutex::new(Vec::new()));
    usb.plug(Box::new(mac(
        env,
        StartMode::Dfu,
        vec![env.scenario("mac-revive", None)],
        boots,
    )));
    let mut cfg = env.config(BuildPin::Ipsw(PathOrUrl::Url(url.to_string())));
    cfg.cache_dir = Some(cache.to_path_buf());
    cfg.download.connections = connections;
    cfg.timeouts.restored_query = Duration::from_secs(300);
    let device = find_mac(&usb);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    env.rt.block_on(async {
        let start = Instant::now();
        let job = tokio::spawn(restore_mac(
            Arc::new(cfg),
            usb.clone(),
            device,
            never_asked(),
            tx,
        ));
        let mut in_dfu = false;
        let mut first = None;
        while let Some(e) = rx.recv().await {
            match e {
                EngineEvent::Stage { stage } => in_dfu = stage == Stage::Dfu,
                EngineEvent::Progress { done, .. } if in_dfu && done > 0 && first.is_none() => {
                    first = Some(start.elapsed().as_secs_f64());
                }
                _ => {}
            }
        }
        let report = job.await.expect("the engine task ran");
        if !report.succeeded() {
            eprintln!("restore failed: {}", report.to_json_line());
        }
        Timed {
            total: start.elapsed().as_secs_f64(),
            first_dfu_byte: first.unwrap_or(f64::NAN),
            ok: report.succeeded(),
        }
    })
}

fn main() {
    let os_mib = env_u64("MACRESCUE_BENCH_OS_MIB", 64);
    let rate = env_u64("MACRESCUE_BENCH_RATE_MIB", 4) * MIB;
    let connections = env_u64("MACRESCUE_BENCH_CONNECTIONS", 4) as usize;
    let env = env_with("bench-overlap", os_mib * MIB);
    let size = std::fs::metadata(&env.ipsw).unwrap().len();
    let cdn = env.slow_cdn(rate);
    let url = cdn.url(IPSW_NAME);
    println!(
        "IPSW {:.1} MiB, CDN {} MiB/s per connection, {connections} connections",
        size as f64 / MIB as f64,
        rate / MIB
    );

    // Serial: download fully, then restore from the cache.
    let serial_cache = env.dir.0.join("serial-cache");
    let t = Instant::now();
    let mut o = DownloadOptions::new(&url, &serial_cache);
    o.connections = connections;
    o.chunk_size = Some(8 * MIB);
    env.rt
        .block_on(Downloader::new(&http(), o).unwrap().run())
        .expect("serial download");
    let download = t.elapsed().as_secs_f64();
    let cached = restore(&env, &url, &serial_cache, connections);
    let serial = download + cached.total;

    // Overlapped: an empty cache.
    let overlap_cache = env.dir.0.join("overlap-cache");
    let overlapped = restore(&env, &url, &overlap_cache, connections);

    println!("download alone:               {download:7.2} s");
    println!("restore from the cache alone: {:7.2} s", cached.total);
    println!(
        "serial (download, then restore): {serial:7.2} s, first DFU byte after {:6.2} s",
        download + cached.first_dfu_byte
    );
    println!(
        "overlapped (restore while downloading): {:7.2} s, first DFU byte after {:6.2} s{}",
        overlapped.total,
        overlapped.first_dfu_byte,
        if overlapped.ok && cached.ok {
            ""
        } else {
            "  (A RESTORE FAILED: see above)"
        }
    );
    println!(
        "overlapped / serial = {:.2}; overlapped / max(download, restore) = {:.2}",
        overlapped.total / serial,
        overlapped.total / download.max(cached.total)
    );
}
