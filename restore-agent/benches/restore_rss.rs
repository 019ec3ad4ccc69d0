//! Peak memory while the engine restores one simulated Mac, for a small and a 16 GiB system
//! image (`cargo bench -p restore-agent --bench restore_rss`). Prints, never asserts. Goal:
//! < 64 MiB and flat in the image size.
//!
//! The IPSW and the image the simulated Mac checks against are sparse (mac-sim's sparse OS
//! layout), so 16 GiB cost a few MiB of disk; every byte still goes through the ZIP reader,
//! ASR's SHA-1 chunks, usbmux and the simulated USB bus.
//!
//! What is measured: the peak resident set (VmHWM, reset between runs with `clear_refs`) of
//! this process, which holds the agent *and* the simulated Mac (its usbmux device side,
//! restored server and ASR sink verifying every byte). That is an upper bound of the agent's
//! own peak; the agent alone cannot be separated in one process, and running it in its own
//! process needs the USB/IP + vhci-hcd setup of the VM tests. Flatness from 64 MiB to 16 GiB
//! is what shows that neither side buffers the image.
//!
//! Sizes: `MACRESCUE_BENCH_SMALL_MIB` (default 64), `MACRESCUE_BENCH_BIG_GIB` (default 16).

#[allow(dead_code, unused_imports)]
#[path = "../tests/engine_sim.rs"]
mod engine_sim;

mod measure;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine_sim::*;
use mac_sim::faults::StartMode;
use restore_agent::engine::{restore_mac, BuildPin, PathOrUrl};

use measure::{env_u64, peak_rss_kib, reset_peak_rss, MIB};

/// Restores one simulated Mac with an `os_size`-byte image; returns (ok, seconds, peak KiB).
fn run(os_size: u64) -> (bool, f64, Option<u64>) {
    let env = env_opts("bench-rss", os_size, true);
    let usb = Arc::new(support::SimUsb::new());
    let boots = Arc::new(Mutex::new(Vec::new()));
    usb.plug(Box::new(mac(
        &env,
        StartMode::Dfu,
        vec![env.scenario("mac-revive", None)],
        boots,
    )));
    let mut cfg = env.config(BuildPin::Ipsw(PathOrUrl::Path(env.ipsw.clone())));
    cfg.timeouts.restored_query = Duration::from_secs(600);
    let device = find_mac(&usb);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    reset_peak_rss();
    let t = Instant::now();
    let report = env.rt.block_on(async {
        let job = tokio::spawn(restore_mac(
            Arc::new(cfg),
            usb.clone(),
            device,
            never_asked(),
            tx,
        ));
        // Drain events as a station would (they are not kept).
        while rx.recv().await.is_some() {}
        job.await.expect("the engine task ran")
    });
    let secs = t.elapsed().as_secs_f64();
    let peak = peak_rss_kib();
    if !report.succeeded() {
        eprintln!("restore failed: {}", report.to_json_line());
    }
    (report.succeeded(), secs, peak)
}

fn main() {
    let small = env_u64("MACRESCUE_BENCH_SMALL_MIB", 64) * MIB;
    let big = env_u64("MACRESCUE_BENCH_BIG_GIB", 16) << 30;
    if !reset_peak_rss() {
        println!("(cannot reset VmHWM on this kernel: the second figure includes the first run)");
    }
    for size in [small, big] {
        let (ok, secs, peak) = run(size);
        let peak = peak.map_or("unknown".to_string(), |k| {
            format!("{:.1} MiB", k as f64 / 1024.0)
        });
        println!(
            "image {:>8.0} MiB: peak RSS (agent + simulated Mac) {peak}, {secs:.1} s, {}",
            size as f64 / MIB as f64,
            if ok { "restored" } else { "FAILED" }
        );
    }
    println!("goal: < 64 MiB for the agent, the same for both sizes");
}
