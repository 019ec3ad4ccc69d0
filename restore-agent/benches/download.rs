//! Download benchmark against the simulated CDN (`cargo bench -p restore-agent --bench
//! download`). Prints, never asserts:
//!
//! * throughput with 8 connections and with 1 under a per-connection rate limit, and their
//!   ratio (goal ≥ 6×: Apple's CDN limits each flow);
//! * peak RSS of a multi-GiB download next to a baseline from the same run (goal: flat,
//!   < 64 MiB).
//!
//! Scale with `MACRESCUE_BENCH_MIB` (parallel file, default 256; the single-stream file is an
//! eighth of it so both take about as long), `MACRESCUE_BENCH_RATE_MIB` (per connection,
//! default 4), `MACRESCUE_BENCH_BIG_MIB` (memory run, unthrottled, default 4096; 0 skips it).

mod measure;
use std::path::{Path, PathBuf};
use std::time::Instant;

use mac_sim::services::cdn::{generated_sha1, Cdn, CdnConfig, CdnFile};
use restore_agent::download::storage::free_space;
use restore_agent::download::{DownloadOptions, Downloader};
use restore_agent::http::HttpConfig;

use measure::{env_u64, peak_rss_kib, reset_peak_rss, MIB};

struct Run {
    secs: f64,
    bytes: u64,
}

impl Run {
    fn mib_s(&self) -> f64 {
        self.bytes as f64 / MIB as f64 / self.secs
    }
}

async fn download(
    cdn: &Cdn,
    name: &str,
    seed: u64,
    size: u64,
    connections: usize,
    dir: &Path,
) -> Run {
    let mut o = DownloadOptions::new(cdn.url(name), dir);
    o.connections = connections;
    o.sha1 = Some(generated_sha1(seed, size));
    let d = Downloader::new(&HttpConfig::default(), o).expect("client");
    let t = Instant::now();
    let done = match d.run().await {
        Ok(done) => done,
        Err(e) => {
            let _ = std::fs::remove_dir_all(dir);
            panic!("download failed: {e}");
        }
    };
    // The SHA-1 pass is part of a real download; it is included in the time.
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&done.path);
    Run {
        secs,
        bytes: done.fetched,
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful: run a tiny
    // version there so the bench at least compiles and works.
    let quick = !std::env::args().any(|a| a == "--bench");
    let size = env_u64("MACRESCUE_BENCH_MIB", if quick { 8 } else { 256 }) * MIB;
    let rate = env_u64("MACRESCUE_BENCH_RATE_MIB", 4) * MIB;
    let mut big = env_u64("MACRESCUE_BENCH_BIG_MIB", if quick { 16 } else { 4096 }) * MIB;
    let single = (size / 8).max(MIB);
    let dir: PathBuf = std::env::var_os("MACRESCUE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("macrescue-bench-{}", std::process::id()))
        });
    std::fs::create_dir_all(&dir).expect("bench directory");
    // The disk is shared: never fill it (keep 2 GiB spare), scale the memory run down instead.
    let free = free_space(&dir).unwrap_or(0);
    let spare = 2 << 30;
    if big + size + spare > free {
        let fits = free.saturating_sub(size + spare) / MIB * MIB;
        println!(
            "note: only {} MiB free in {}; the memory run uses {} MiB instead of {} MiB",
            free / MIB,
            dir.display(),
            fits / MIB,
            big / MIB
        );
        big = fits;
    }

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let limited = Cdn::start(
            "127.0.0.1:0".parse().unwrap(),
            None,
            CdnConfig {
                files: vec![
                    CdnFile::generated("parallel.ipsw", size, 1),
                    CdnFile::generated("single.ipsw", single, 2),
                    CdnFile::generated("warmup.ipsw", MIB, 3),
                ],
                rate: Some(rate),
                faults: vec![],
            },
        )
        .await
        .expect("CDN");
        let open = Cdn::start(
            "127.0.0.1:0".parse().unwrap(),
            None,
            CdnConfig {
                files: vec![CdnFile::generated("big.ipsw", big, 4)],
                rate: None,
                faults: vec![],
            },
        )
        .await
        .expect("CDN");

        println!(
            "download benchmark: simulated CDN on 127.0.0.1, {:.1} MiB/s per connection",
            rate as f64 / MIB as f64
        );
        // Baseline: everything set up and one small download done.
        download(&limited, "warmup.ipsw", 3, MIB, 8, &dir).await;
        let baseline = peak_rss_kib();

        let par = download(&limited, "parallel.ipsw", 1, size, 8, &dir).await;
        println!(
            "  8 connections: {:>6} MiB in {:>6.2} s = {:>7.2} MiB/s",
            par.bytes / MIB,
            par.secs,
            par.mib_s()
        );
        let one = download(&limited, "single.ipsw", 2, single, 1, &dir).await;
        println!(
            "  1 connection:  {:>6} MiB in {:>6.2} s = {:>7.2} MiB/s",
            one.bytes / MIB,
            one.secs,
            one.mib_s()
        );
        println!(
            "  ratio 8:1 = {:.2}x (goal >= 6x){}",
            par.mib_s() / one.mib_s(),
            if quick {
                " [smoke run under `cargo test`: files too small for a meaningful ratio]"
            } else {
                ""
            }
        );

        if big > 0 {
            let fresh = reset_peak_rss();
            let run = download(&open, "big.ipsw", 4, big, 8, &dir).await;
            let peak = peak_rss_kib();
            let fmt = |k: Option<u64>| k.map_or("unknown".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
            println!(
                "  {} MiB unthrottled with 8 connections: {:.2} s = {:.1} MiB/s (incl. SHA-1)",
                big / MIB,
                run.secs,
                run.mib_s()
            );
            println!(
                "  peak RSS: baseline {} | during the {} MiB download {}{} (goal flat, < 64 MiB; process includes the simulated CDN)",
                fmt(baseline),
                big / MIB,
                fmt(peak),
                if fresh { "" } else { " (peak since start)" }
            );
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}
