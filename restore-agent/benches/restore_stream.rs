//! Streams a generated system image through the agent's usbmux edge + restored + ASR against
//! the simulated Mac, in one process, and prints throughput and CPU time per GiB next to a
//! baseline measured in the same run: the raw in-process USB bulk loop (same image generator,
//! same simulated bus, no protocol). Prints; asserts nothing.
//!
//! `cargo bench -p restore-agent --bench restore_stream` (size: `RESTORE_BENCH_MIB`, default
//! 1024). CPU is the whole process (getrusage): the simulated Mac's side — verifying every
//! byte and chunk SHA-1 — runs in it too, so the host's own share is lower than shown.

#[path = "../tests/restore_sim_support/mod.rs"]
mod restore_sim_support;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mac_sim::restore::restored::Outcome;
use mac_sim::restore::scenario::{fill_image, ImageSpec, Scenario, Step};
use mac_sim::wire::{Enumeration, LinkChange, Reply, Setup, SimDevice, Speed};
use restore_agent::asr::ImageSource;
use restore_agent::restored::options::RestoreBehavior;
use restore_agent::restored::RestoredClient;
use restore_agent::usb::UsbBus;
use restore_agent::usbmux::edge::{EdgeConfig, MuxHandle};
use restore_sim_support::*;
use support::SimUsb;

/// USB 2.0 high speed in practice (protocol.md: ~60 MB/s after protocol overhead).
const USB2_BYTES_PER_SEC: f64 = 60e6;
const GIB: f64 = (1u64 << 30) as f64;

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct we pass; zeroed is a valid `rusage`.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer cannot fail in a way that leaves it unset.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

struct Measure {
    bytes: u64,
    wall: Duration,
    cpu: f64,
}

impl Measure {
    fn print(&self, name: &str) {
        let rate = self.bytes as f64 / self.wall.as_secs_f64();
        let gib = self.bytes as f64 / GIB;
        println!(
            "{name:<34} {:>8.1} MB/s  {:>6.2} CPU s/GiB  {:>5.1}x USB 2.0 (60 MB/s)  ({:.2} GiB in {:.2} s)",
            rate / 1e6,
            self.cpu / gib,
            rate / USB2_BYTES_PER_SEC,
            gib,
            self.wall.as_secs_f64(),
        );
    }
}

/// A device that takes any bulk OUT and says nothing: the bus without a protocol.
struct Sink {
    received: Arc<AtomicU64>,
}

impl SimDevice for Sink {
    fn enumeration(&self) -> Enumeration {
        Enumeration {
            vendor_id: 0x05ac,
            product_id: 0x0001,
            speed: Speed::High,
            device_descriptor: vec![18, 1],
            configurations: vec![],
        }
    }
    fn control(&mut self, _: &Setup, _: &[u8]) -> Reply {
        Reply::Ack(vec![])
    }
    fn bulk_out(&mut self, _: u8, data: &[u8]) -> Reply {
        self.received
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Reply::Ack(vec![])
    }
    fn bulk_in(&mut self, _: u8, _: usize) -> Reply {
        Reply::Nak
    }
    fn reset(&mut self) {}
    fn poll_link(&mut self, _: Instant) -> Option<LinkChange> {
        None
    }
    fn attached(&self) -> bool {
        true
    }
}

/// The image generator and the bulk OUT loop alone, in mux-sized transfers.
fn baseline(size: u64, seed: u64) -> Measure {
    let usb = SimUsb::new();
    let received = Arc::new(AtomicU64::new(0));
    usb.plug(Box::new(Sink {
        received: received.clone(),
    }));
    let dev = usb.devices().unwrap().remove(0);
    let mut t = usb.open(&dev).unwrap();
    let mut buf = vec![0u8; 49_152 - 28];
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        fill_image(seed, off, &mut buf[..n]);
        t.bulk_out(0x04, &buf[..n], Duration::from_secs(1)).unwrap();
        off += n as u64;
    }
    let m = Measure {
        bytes: received.load(Ordering::Relaxed),
        wall: t0.elapsed(),
        cpu: cpu_seconds() - cpu0,
    };
    assert_eq!(m.bytes, size);
    m
}

/// A whole restore whose only data request is the system image.
async fn restored(size: u64, seed: u64, checksums: bool) -> Measure {
    let mut s = Scenario::shipped("mac-erase").unwrap();
    s.image = ImageSpec {
        size,
        seed: Some(seed),
        path: None,
        sha1: None,
    };
    s.asr.checksum_chunks = checksums;
    s.steps.retain(|st| match st {
        Step::DataRequestMsg(r) => r.data_type == "SystemImageData",
        Step::StatusMsg { .. } => true,
        _ => false,
    });
    let dir = Scratch::new("bench");
    let ipsw = synthetic_ipsw(&dir, 1 << 20);
    let image: ImageSource = Arc::new(SeedImage { seed, len: size });
    let ctx = Arc::new(IpswContext::open(
        &ipsw,
        RestoreBehavior::Erase,
        Some(image),
    ));
    let rig = Rig::plug(s, Duration::from_secs(30));
    let transport = rig.usb.open(&rig.device()).unwrap();
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mux = Arc::new(
        MuxHandle::open(transport, EdgeConfig::default())
            .await
            .unwrap(),
    );
    let params = ctx.params(RestoreBehavior::Erase);
    let client = RestoredClient::connect(ctx, mux.clone(), host_config())
        .await
        .unwrap();
    let outcome = client.restore(params).await;
    mux.close(Duration::from_secs(5)).await;
    let wall = t0.elapsed();
    let cpu = cpu_seconds() - cpu0;
    let outcome = outcome.unwrap_or_else(|e| panic!("the restore failed: {e}"));
    let handle = rig.handle();
    let device = tokio::task::spawn_blocking(move || handle.wait(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(device, Outcome::Succeeded);
    assert_eq!(rig.handle().violations().total(), 0);
    Measure {
        bytes: outcome.asr_sessions.iter().map(|a| a.payload_bytes).sum(),
        wall,
        cpu,
    }
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent; keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let mib: u64 = std::env::var("RESTORE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 16 } else { 1024 });
    let size = mib << 20;
    let seed = 0x5eed;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "restore_stream: {mib} MiB generated image, {} CPUs",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let base = baseline(size, seed);
    base.print("baseline: raw SimUsb bulk loop");
    let with = rt.block_on(restored(size, seed, true));
    with.print("usbmux + restored + ASR (SHA-1)");
    let without = rt.block_on(restored(size, seed, false));
    without.print("usbmux + restored + ASR (no SHA-1)");
    println!(
        "protocol stack vs baseline: {:.2}x the wall time, {:.2}x the CPU",
        with.wall.as_secs_f64() / base.wall.as_secs_f64(),
        with.cpu / base.cpu.max(1e-9)
    );
}
