//! Streams an in-memory system image through the agent's usbmux edge + restored + ASR against
//! the simulated Mac, in one process, and separates what the **host** spends from what the
//! simulated Mac spends. Prints; asserts nothing.
//!
//! `cargo bench -p restore-agent --bench restore_stream` (size: `RESTORE_BENCH_MIB`, default
//! 1024; the image is held in memory). Numbers:
//!
//! * **host CPU s/GiB** — CPU time of the agent's own threads (the tokio runtime that runs
//!   restored + ASR + the usbmux driver, ASR's read-ahead, and the usbmux reader and writer
//!   threads) per GiB of payload, *minus* the time those threads spend inside the USB
//!   transport: in this benchmark a bulk transfer is a call straight into the simulated Mac,
//!   which parses the mux packet, checks the TCP rules and buffers the bytes on the caller's
//!   thread. Thread CPU clocks (`CLOCK_THREAD_CPUTIME_ID`) are read around every transport
//!   call and at every host thread's exit.
//! * **host capacity** — GiB / host CPU s, in MB/s: the rate one core could feed a link at
//!   with the agent's code alone; its ratio to USB 2.0's ~60 MB/s is the figure of merit
//!   (issue #4: ≥ 10×).
//! * **wall** — payload bytes / elapsed time end to end, including the simulated Mac (its ASR
//!   sink hashes and compares every byte, and its 128 KiB TCP window, as a real device
//!   advertises, bounds what is in flight). On 2 cores host and simulator compete.
//! * **simulator CPU** — the rest of the process's CPU over the same interval.
//! * Baselines measured in the same run on the same bytes: one `memcpy` pass handed across
//!   threads over a bounded channel in 128 KiB chunks (the least any streamer must do), the
//!   same plus SHA-1 per chunk (the least with checksum chunks), and the raw simulated-bus
//!   bulk OUT loop (bus + device cost of 48 KiB transfers without any protocol).

#[path = "../tests/restore_sim_support/mod.rs"]
mod restore_sim_support;
#[path = "../tests/support/mod.rs"]
mod support;

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mac_sim::restore::restored::Outcome;
use mac_sim::restore::scenario::{fill_image, ImageSpec, Scenario, Step};
use mac_sim::wire::{Enumeration, LinkChange, Reply, Setup, SimDevice, Speed};
use restore_agent::asr::{ImageSource, RandomAccess};
use restore_agent::restored::options::RestoreBehavior;
use restore_agent::restored::RestoredClient;
use restore_agent::usb::{ControlSetup, DeviceInfo, TransportError, UsbBus, UsbTransport};
use restore_agent::usbmux::edge::{EdgeConfig, MuxHandle};
use restore_sim_support::*;
use sha1::{Digest, Sha1};
use support::SimUsb;

/// USB 2.0 high speed in practice (protocol.md: ~60 MB/s after protocol overhead).
const USB2_BYTES_PER_SEC: f64 = 60e6;
const GIB: f64 = (1u64 << 30) as f64;
const CHUNK: usize = 131_072;

// ----- CPU clocks ----------------------------------------------------------------------------

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass; both clocks used here exist on
    // every Linux the agent runs on.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn process_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// CPU of host threads, summed as each one exits, and CPU they spent inside the transport.
struct HostMeter {
    exited_ns: AtomicU64,
    inside_transport_ns: AtomicU64,
    live: AtomicUsize,
}

static METER: HostMeter = HostMeter {
    exited_ns: AtomicU64::new(0),
    inside_transport_ns: AtomicU64::new(0),
    live: AtomicUsize::new(0),
};

/// Adds the thread's whole CPU time to [`METER`] when the thread exits.
struct ExitTally;

impl Drop for ExitTally {
    fn drop(&mut self) {
        METER.exited_ns.fetch_add(thread_cpu_ns(), Ordering::SeqCst);
        METER.live.fetch_sub(1, Ordering::SeqCst);
    }
}

thread_local! {
    static TALLY: RefCell<Option<ExitTally>> = const { RefCell::new(None) };
}

/// Counts the calling thread as a host thread (idempotent).
fn host_thread() {
    TALLY.with(|t| {
        let mut t = t.borrow_mut();
        if t.is_none() {
            METER.live.fetch_add(1, Ordering::SeqCst);
            *t = Some(ExitTally);
        }
    });
}

fn timed<R>(f: impl FnOnce() -> R) -> R {
    host_thread();
    let t0 = thread_cpu_ns();
    let r = f();
    METER
        .inside_transport_ns
        .fetch_add(thread_cpu_ns() - t0, Ordering::Relaxed);
    r
}

/// The agent's transport with the simulated device's share of every call measured.
struct Metered(Box<dyn UsbTransport>);

impl UsbTransport for Metered {
    fn info(&self) -> &DeviceInfo {
        self.0.info()
    }
    fn control_in(
        &mut self,
        setup: ControlSetup,
        length: u16,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        timed(|| self.0.control_in(setup, length, timeout))
    }
    fn control_out(
        &mut self,
        setup: ControlSetup,
        data: &[u8],
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        timed(|| self.0.control_out(setup, data, timeout))
    }
    fn bulk_out(
        &mut self,
        endpoint: u8,
        data: &[u8],
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        timed(|| self.0.bulk_out(endpoint, data, timeout))
    }
    fn bulk_in(
        &mut self,
        endpoint: u8,
        max_len: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        timed(|| self.0.bulk_in(endpoint, max_len, timeout))
    }
    fn set_configuration(&mut self, configuration: u8) -> Result<(), TransportError> {
        timed(|| self.0.set_configuration(configuration))
    }
    fn claim_interface(&mut self, interface: u8, alt_setting: u8) -> Result<(), TransportError> {
        timed(|| self.0.claim_interface(interface, alt_setting))
    }
    fn release_interface(&mut self, interface: u8) -> Result<(), TransportError> {
        timed(|| self.0.release_interface(interface))
    }
    fn reset(&mut self) -> Result<(), TransportError> {
        timed(|| self.0.reset())
    }
    fn bulk_handle(&self) -> Option<Box<dyn UsbTransport>> {
        self.0
            .bulk_handle()
            .map(|t| Box::new(Metered(t)) as Box<dyn UsbTransport>)
    }
}

// ----- the image -----------------------------------------------------------------------------

/// The system image, generated once into memory (the simulated Mac checks it against the same
/// generator).
struct MemImage(Vec<u8>);

impl RandomAccess for MemImage {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "past the end"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

// ----- reporting -----------------------------------------------------------------------------

fn mbps(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / seconds.max(1e-9) / 1e6
}

struct Baseline {
    name: &'static str,
    bytes: u64,
    cpu_s: f64,
}

impl Baseline {
    fn per_gib(&self) -> f64 {
        self.cpu_s / (self.bytes as f64 / GIB)
    }
    fn print(&self) {
        let cap = mbps(self.bytes, self.cpu_s);
        println!(
            "  {:<44} {:>6.3} CPU s/GiB  capacity {:>7.0} MB/s = {:>6.1}x USB 2.0",
            self.name,
            self.per_gib(),
            cap,
            cap * 1e6 / USB2_BYTES_PER_SEC
        );
    }
}

struct Run {
    bytes: u64,
    wall: Duration,
    host_cpu_s: f64,
    sim_cpu_s: f64,
}

impl Run {
    fn print(&self, name: &str, floor: &Baseline) {
        let gib = self.bytes as f64 / GIB;
        let wall = mbps(self.bytes, self.wall.as_secs_f64());
        let cap = mbps(self.bytes, self.host_cpu_s);
        println!(
            "  {name} ({gib:.2} GiB in {:.2} s)",
            self.wall.as_secs_f64()
        );
        println!(
            "    host CPU      {:>6.3} s/GiB  -> host capacity {:>7.0} MB/s = {:>5.1}x USB 2.0 (goal >= 10x)",
            self.host_cpu_s / gib,
            cap,
            cap * 1e6 / USB2_BYTES_PER_SEC
        );
        println!(
            "    wall          {:>7.1} MB/s end to end = {:>5.1}x USB 2.0 (host + simulated Mac on the same cores)",
            wall,
            wall * 1e6 / USB2_BYTES_PER_SEC
        );
        println!(
            "    simulator CPU {:>6.3} s/GiB; host CPU = {:.2}x the \"{}\" baseline",
            self.sim_cpu_s / gib,
            (self.host_cpu_s / gib) / floor.per_gib().max(1e-9),
            floor.name
        );
    }
}

// ----- baselines -----------------------------------------------------------------------------

/// One copy out of the image per 128 KiB chunk (optionally hashed), handed to a second thread
/// over a bounded channel that drops it: the floor of any streamer.
fn copy_baseline(image: &Arc<MemImage>, sha1: bool) -> Baseline {
    let size = image.len();
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, Option<[u8; 20]>)>(32);
    let cpu0 = process_cpu_ns();
    let img = image.clone();
    let producer = std::thread::spawn(move || {
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(CHUNK as u64) as usize;
            let mut buf = vec![0u8; n];
            img.read_at(off, &mut buf).unwrap();
            let sum = sha1.then(|| Sha1::digest(&buf).into());
            tx.send((buf, sum)).unwrap();
            off += n as u64;
        }
    });
    let mut got = 0u64;
    for (buf, _) in rx {
        got += buf.len() as u64;
    }
    producer.join().unwrap();
    assert_eq!(got, size);
    Baseline {
        name: if sha1 {
            "memcpy + SHA-1 per chunk + channel"
        } else {
            "memcpy + channel"
        },
        bytes: size,
        cpu_s: (process_cpu_ns() - cpu0) as f64 / 1e9,
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

/// The simulated bus alone: mux-sized bulk OUT transfers of the image into a sink.
fn bus_baseline(image: &Arc<MemImage>) -> Baseline {
    let size = image.len();
    let usb = SimUsb::new();
    let received = Arc::new(AtomicU64::new(0));
    usb.plug(Box::new(Sink {
        received: received.clone(),
    }));
    let dev = usb.devices().unwrap().remove(0);
    let mut t = usb.open(&dev).unwrap();
    let cpu0 = process_cpu_ns();
    let mut off = 0usize;
    while (off as u64) < size {
        let n = (size as usize - off).min(49_152);
        t.bulk_out(0x04, &image.0[off..off + n], Duration::from_secs(1))
            .unwrap();
        off += n;
    }
    assert_eq!(received.load(Ordering::Relaxed), size);
    Baseline {
        name: "simulated bus: 48 KiB bulk OUT loop",
        bytes: size,
        cpu_s: (process_cpu_ns() - cpu0) as f64 / 1e9,
    }
}

// ----- the restore ---------------------------------------------------------------------------

/// A whole restore whose only data request is the system image, on a runtime of its own so
/// its threads can be counted as the host's.
fn restore(image: &Arc<MemImage>, seed: u64, checksums: bool) -> Run {
    let size = image.len();
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
    let source: ImageSource = image.clone();
    let ctx = Arc::new(IpswContext::open(
        &ipsw,
        RestoreBehavior::Erase,
        Some(source),
    ));
    let rig = Rig::plug(s, Duration::from_secs(60));
    let transport: Box<dyn UsbTransport> = Box::new(Metered(rig.usb.open(&rig.device()).unwrap()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("host-rt")
        .on_thread_start(host_thread)
        .enable_all()
        .build()
        .unwrap();
    let exited0 = METER.exited_ns.load(Ordering::SeqCst);
    let inside0 = METER.inside_transport_ns.load(Ordering::SeqCst);
    let cpu0 = process_cpu_ns();
    let t0 = Instant::now();
    let outcome = rt
        .block_on(rt.spawn(async move {
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
            outcome
        }))
        .unwrap();
    let wall = t0.elapsed();
    // Every host thread adds its CPU when it exits: the runtime's at shutdown, the usbmux
    // reader and writer once the link is closed.
    rt.shutdown_timeout(Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    while METER.live.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        METER.live.load(Ordering::SeqCst),
        0,
        "host threads still running"
    );
    let process = (process_cpu_ns() - cpu0) as f64 / 1e9;
    let host_total = (METER.exited_ns.load(Ordering::SeqCst) - exited0) as f64 / 1e9;
    let inside = (METER.inside_transport_ns.load(Ordering::SeqCst) - inside0) as f64 / 1e9;
    let outcome = outcome.unwrap_or_else(|e| panic!("the restore failed: {e}"));
    assert_eq!(
        rig.handle().wait(Duration::from_secs(30)),
        Outcome::Succeeded
    );
    assert_eq!(rig.handle().violations().total(), 0);
    let host = host_total - inside;
    Run {
        bytes: outcome.asr_sessions.iter().map(|a| a.payload_bytes).sum(),
        wall,
        host_cpu_s: host,
        sim_cpu_s: process - host,
    }
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent; keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let mib: u64 = std::env::var("RESTORE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 16 } else { 1024 });
    let seed = 0x5eed;
    let mut data = vec![0u8; (mib << 20) as usize];
    fill_image(seed, 0, &mut data);
    let image = Arc::new(MemImage(data));
    println!(
        "restore_stream: {mib} MiB in-memory image, {} CPUs; USB 2.0 = 60 MB/s",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("baselines (same bytes, this run):");
    let copy = copy_baseline(&image, false);
    copy.print();
    let copy_sha = copy_baseline(&image, true);
    copy_sha.print();
    bus_baseline(&image).print();
    println!("usbmux + restored + ASR against the simulated Mac:");
    restore(&image, seed, true).print("with SHA-1 checksum chunks", &copy_sha);
    restore(&image, seed, false).print("without checksum chunks", &copy);
}
