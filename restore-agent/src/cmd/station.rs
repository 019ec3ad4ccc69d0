//! `restore-agent station`: what the rescue image runs — every Mac plugged in gets restored,
//! with a dashboard on the console and a report per Mac.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use restore_agent::catalog::MESU_MACOS_IPSW_CATALOG_URL;
use restore_agent::catalog_fetch::{CatalogFetchConfig, IPSW_ME_BASE_URL};
use restore_agent::engine::{self, BuildPin, EngineConfig, PathOrUrl, Timeouts};
use restore_agent::http::HttpConfig;
use restore_agent::net::{self, NetConfig, NetStatus, SystemClock};
use restore_agent::station::api::{erase_code, EngineEvent, EraseConfirmer, EraseDecision};
use restore_agent::station::confirm::{
    ArmingConfirmer, ConsoleConfirmer, ConsolePort, GpioConfirmer, NoConfirmer,
};
use restore_agent::station::demo::{dfu_device, DemoJob, FakeBus};
use restore_agent::station::netinfo::NetInfo;
use restore_agent::station::settings::{self, FileSettings};
use restore_agent::station::{
    dashboard, gpio, Display, JobFuture, MacJob, NoNetwork, Station, StationConfig, StationInfo,
};
use restore_agent::tss_client::TssClientConfig;
use restore_agent::usb::rusb_edge::RusbBus;
use restore_agent::usb::{DeviceInfo, UsbBus};
use restore_agent::usbip::{UsbipClient, UsbipConfig};
use serde_json::json;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

#[derive(clap::Args)]
pub struct Args {
    /// Persistent storage: reports go to DIR/reports, per-Mac logs to DIR/logs; the config
    /// file is DIR/macrescue/config.toml.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// The config file (default: DATA/macrescue/config.toml). Flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Plain lines instead of the redrawn dashboard (automatic on serial consoles and pipes).
    #[arg(long)]
    pub line_mode: bool,
    /// How many Macs are worked on at once; more wait for a free slot (default 8).
    #[arg(long, value_name = "N")]
    pub max_macs: Option<usize>,
    /// A local tty where erase codes are shown and typed (repeatable: VGA tty and serial).
    /// Default: [station] consoles, else the consoles the init set up ($MACRESCUE_CONSOLES).
    #[arg(long = "console", value_name = "TTY")]
    pub consoles: Vec<PathBuf>,
    /// A GPIO erase button instead of a console: /dev/gpiochipN:LINE, header:LINE (a Raspberry
    /// Pi's 40-pin header, BCM GPIO number, found on any Pi model), or a sysfs value file.
    #[arg(long, value_name = "SPEC")]
    pub gpio_button: Option<String>,
    /// How long the GPIO button must be held, in seconds.
    #[arg(long, default_value_t = 3.0, value_name = "SECS")]
    pub hold_secs: f64,
    /// How long an erase question waits for an answer, in seconds (default 300).
    #[arg(long, value_name = "SECS")]
    pub confirm_timeout: Option<u64>,
    /// Fleet wipe: arm erase for the next N Macs (asks for one physical confirmation now).
    #[arg(long, value_name = "N")]
    pub arm_macs: Option<u32>,
    /// Fleet wipe: arm erase for T minutes (asks for one physical confirmation now).
    #[arg(long, value_name = "T")]
    pub arm_minutes: Option<u64>,
    /// Firmware cache directory (shown in the header, handed to the engine).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Also look for a matching `*.ipsw` below DIR (repeatable; the image passes /media, where
    /// its init mounts other USB disks read-only).
    #[arg(long = "ipsw-dir", value_name = "DIR")]
    pub ipsw_dirs: Vec<PathBuf>,
    /// Apple's macOS IPSW catalog, or a mirror.
    #[arg(long, value_name = "URL")]
    pub catalog_url: Option<String>,
    /// The ipsw.me fallback (`off` disables it).
    #[arg(long, value_name = "URL")]
    pub fallback_url: Option<String>,
    /// Signing server (default: Apple's).
    #[arg(long, value_name = "URL")]
    pub tss_url: Option<String>,
    /// PEM file with an extra trusted CA (private mirrors, tests).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// HTTP(S) proxy for every request.
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,
    /// `latest` (default), a build (25C56), or an IPSW path or URL.
    #[arg(long, value_name = "BUILD")]
    pub build: Option<String>,
    /// Accept Macs found in Recovery instead of DFU.
    #[arg(long)]
    pub allow_recovery: bool,
    /// Multiply every USB wait by F (default 1: real Macs; QEMU without acceleration: 20+).
    #[arg(long, value_name = "F")]
    pub usb_timeout_scale: Option<f64>,
    /// Import the devices of this USB/IP server (host[:port], repeatable).
    #[arg(long = "usbip", value_name = "HOST:PORT")]
    pub usbip: Vec<String>,
    /// Leave the network alone (links configured by someone else, or none).
    #[arg(long)]
    pub no_network: bool,
    /// A time server (host or host:port, repeatable), tried after DHCP's.
    #[arg(long = "ntp", value_name = "HOST")]
    pub ntp: Vec<String>,
    /// When no time server answers, continue with the RTC instead of waiting.
    #[arg(long)]
    pub allow_rtc: bool,
    /// Seconds to wait for SNTP before deciding (default 30).
    #[arg(long, value_name = "SECS")]
    pub clock_wait: Option<u64>,
    /// Test only: N fake Macs on a fake bus, no USB.
    #[arg(long, hide = true, value_name = "N")]
    pub demo_fake_macs: Option<u8>,
    /// Test only: pace of the fake Macs, in milliseconds per progress step.
    #[arg(long, hide = true, default_value_t = 300)]
    pub demo_step_ms: u64,
    /// Test only: stop after N Macs have finished.
    #[arg(long, hide = true)]
    pub exit_after: Option<u32>,
}

/// Flags over the file over built-in defaults.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub engine: EngineConfig,
    pub consoles: Vec<PathBuf>,
    pub usbip: Vec<String>,
    pub max_macs: usize,
    pub confirm_timeout: Duration,
    /// `None`: networking off.
    pub net: Option<NetConfig>,
    pub require_clock: bool,
    pub clock_wait: Duration,
    /// Whose reachability the header shows.
    pub servers_label: String,
}

/// `latest`, a build number, or an IPSW path/URL.
fn parse_pin(v: &str) -> BuildPin {
    let v = v.trim();
    if v.is_empty() || v.eq_ignore_ascii_case("latest") {
        BuildPin::Latest
    } else if v.contains('/') || v.to_ascii_lowercase().ends_with(".ipsw") {
        BuildPin::Ipsw(PathOrUrl::parse(v))
    } else {
        BuildPin::Build(v.to_string())
    }
}

/// The USB timeout factor; nonsense (zero, negative, NaN) falls back to real-Mac timing rather
/// than to waits that end at once.
fn usb_timeout_scale(v: Option<f64>) -> f64 {
    match v {
        None => 1.0,
        Some(f) if f.is_finite() && f > 0.0 && f <= 1000.0 => f,
        Some(f) => {
            tracing::warn!("usb_timeout_scale = {f} is not a factor between 0 and 1000; using 1");
            1.0
        }
    }
}

pub fn resolve(args: &Args, file: &FileSettings, env_consoles: Option<&str>) -> Resolved {
    let st = &file.station;
    let data = args.data.as_deref();
    let pick = |flag: &Option<String>, f: &Option<String>| flag.clone().or_else(|| f.clone());
    let ca = args
        .ca_file
        .clone()
        .or_else(|| st.ca_file.as_deref().map(|p| settings::resolve(data, p)));
    let proxy = pick(&args.proxy, &st.proxy).filter(|p| !settings::is_off(p));
    let http = HttpConfig {
        extra_ca: ca,
        proxy: proxy.clone(),
        ..HttpConfig::default()
    };
    let catalog_url = pick(&args.catalog_url, &st.catalog_url);
    let fallback = match pick(&args.fallback_url, &st.fallback_url) {
        Some(f) if settings::is_off(&f) => None,
        Some(f) => Some(f),
        None => Some(IPSW_ME_BASE_URL.to_string()),
    };
    let tss_url = pick(&args.tss_url, &st.tss_url);
    let pin = pick(&args.build, &st.build)
        .map(|b| parse_pin(&b))
        .unwrap_or(BuildPin::Latest);
    let engine = EngineConfig {
        cache_dir: args.cache.clone(),
        catalog: CatalogFetchConfig {
            catalog_url: catalog_url
                .clone()
                .unwrap_or_else(|| MESU_MACOS_IPSW_CATALOG_URL.to_string()),
            fallback_url: fallback,
            http: http.clone(),
            ..CatalogFetchConfig::default()
        },
        tss: TssClientConfig {
            server: tss_url.clone(),
            http: http.clone(),
            ..TssClientConfig::default()
        },
        http,
        pin,
        timeouts: Timeouts::default().scaled(usb_timeout_scale(
            args.usb_timeout_scale.or(st.usb_timeout_scale),
        )),
        allow_recovery_start: args.allow_recovery || st.allow_recovery.unwrap_or(false),
        local_ipsw_dirs: args.ipsw_dirs.clone(),
        ..EngineConfig::default()
    };
    let consoles = if !args.consoles.is_empty() {
        args.consoles.clone()
    } else if !st.consoles.0.is_empty() {
        st.consoles.0.iter().map(PathBuf::from).collect()
    } else {
        env_consoles
            .unwrap_or("")
            .split(',')
            .filter(|c| !c.is_empty())
            .map(PathBuf::from)
            .collect()
    };
    let usbip = if args.usbip.is_empty() {
        st.usbip.0.clone()
    } else {
        args.usbip.clone()
    };
    let n = &file.net;
    let net_on = !args.no_network && n.enabled.unwrap_or(true);
    // The reachability check asks the servers restores will use.
    let configured: Vec<String> = [catalog_url.as_deref(), tss_url.as_deref()]
        .into_iter()
        .flatten()
        .filter_map(restore_agent::net::status::reach_target)
        .collect();
    let servers_label = if configured.is_empty() {
        "Apple".to_string()
    } else {
        "servers".to_string()
    };
    let net = net_on.then(|| {
        let mut c = NetConfig {
            interfaces: (!n.interfaces.0.is_empty()).then(|| n.interfaces.0.clone()),
            ntp_servers: if args.ntp.is_empty() {
                n.ntp.0.clone()
            } else {
                args.ntp.clone()
            },
            proxy,
            ..NetConfig::default()
        };
        if let Some(f) = &n.ntp_fallback {
            c.ntp_fallback = (!settings::is_off(f)).then(|| f.clone());
        }
        if !configured.is_empty() {
            let mut t = configured.clone();
            t.dedup();
            c.reachability_targets = t;
        }
        c
    });
    Resolved {
        engine,
        consoles,
        usbip,
        max_macs: args.max_macs.or(st.max_macs).unwrap_or(8),
        confirm_timeout: Duration::from_secs(
            args.confirm_timeout.or(st.confirm_timeout).unwrap_or(300),
        ),
        net,
        require_clock: !(args.allow_rtc || n.require_clock == Some(false)),
        clock_wait: Duration::from_secs(args.clock_wait.or(n.clock_wait).unwrap_or(30)),
        servers_label,
    }
}

/// Set by the init when it starts the station before the data partition, and with it the
/// config file, is mounted: the file it names exists until the init has handled that partition.
const DATA_PENDING_ENV: &str = "MACRESCUE_DATA_PENDING";
/// A station started by hand with a stale variable must not wait forever.
const DATA_PENDING_MAX: Duration = Duration::from_secs(600);

/// A station the init started early (see [`DATA_PENDING_ENV`]) waits here until the data
/// partition is handled, and meanwhile runs DHCP on every wired link, so the address is there
/// when the config file is; [`run`] then applies the file's `[net]` settings (which may take
/// links away or switch networking off). The network started here, if any; without one,
/// networking (if on) starts from the config file as usual.
fn wait_for_data(rt: &tokio::runtime::Runtime, args: &Args) -> Option<net::NetHandle> {
    let pending = PathBuf::from(std::env::var_os(DATA_PENDING_ENV)?);
    if !pending.exists() {
        return None;
    }
    let network = !args.no_network && args.demo_fake_macs.is_none();
    rt.block_on(async {
        // Until the config file is read, contact nothing it might rule out: no time server
        // (the file may name others or forbid the fallback), no reachability check (no proxy
        // is known yet). DHCP only.
        let cfg = NetConfig {
            set_clock: false,
            reachability_targets: Vec::new(),
            ..NetConfig::default()
        };
        let handle = if network {
            net::start(cfg, Arc::new(SystemClock))
                .map_err(|e| tracing::warn!("cannot start networking before the config file: {e}"))
                .ok()
        } else {
            None
        };
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let deadline = tokio::time::Instant::now() + DATA_PENDING_MAX;
        while pending.exists() && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                Some(()) = async { term.as_mut()?.recv().await } => {
                    // The init restarts the station with other settings: leave no address
                    // behind that those settings might not want.
                    if let Some(h) = handle {
                        h.stop().await;
                    }
                    std::process::exit(0);
                }
            }
        }
        // The working directory was opened before the data partition was mounted over it.
        if let Ok(dir) = std::env::current_dir() {
            let _ = std::env::set_current_dir(dir);
        }
        handle
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let mut early = wait_for_data(&rt, &args);
    let display = if args.line_mode || dashboard::want_line_mode() {
        Display::Lines
    } else {
        Display::Terminal { width: None }
    };
    let config_path = args
        .config
        .clone()
        .or_else(|| args.data.as_ref().map(|d| d.join(settings::CONFIG_PATH)));
    let file = match &config_path {
        Some(p) => FileSettings::load(p).unwrap_or_else(|e| {
            println!("station: {e}");
            FileSettings::default()
        }),
        None => FileSettings::default(),
    };
    for k in file.unknown_keys() {
        println!("station: unknown setting {k} in the config file; it is ignored");
    }
    let env_consoles = std::env::var("MACRESCUE_CONSOLES").ok();
    let r = resolve(&args, &file, env_consoles.as_deref());

    let physical: Arc<dyn EraseConfirmer> = if !r.consoles.is_empty() {
        // A console that cannot be opened (no VGA on this machine) must not stop the others.
        let mut ports = Vec::new();
        for c in &r.consoles {
            match ConsolePort::open_tty(c) {
                Ok(p) => ports.push(p),
                Err(e) => println!(
                    "station: console {} cannot ask for erase confirmations: {e}",
                    c.display()
                ),
            }
        }
        if ports.is_empty() {
            anyhow::bail!(
                "cannot open any erase-confirmation console ({:?})",
                r.consoles
            );
        }
        Arc::new(ConsoleConfirmer::new(ports, r.confirm_timeout))
    } else if let Some(spec) = &args.gpio_button {
        let line = gpio::open_button(spec).context("cannot open the GPIO erase button")?;
        Arc::new(
            GpioConfirmer::new(
                line,
                Duration::from_secs_f64(args.hold_secs),
                r.confirm_timeout,
            )
            .with_notice(Box::new(std::io::stdout())),
        )
    } else {
        Arc::new(NoConfirmer)
    };
    let arming = Arc::new(ArmingConfirmer::new(physical));
    if args.arm_macs.is_some() || args.arm_minutes.is_some() {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let window = args.arm_minutes.map(|m| Duration::from_secs(m * 60));
        match arming.arm(&erase_code(seed), args.arm_macs, window) {
            EraseDecision::Confirmed { how, .. } => println!("fleet erase armed by {how}"),
            other => anyhow::bail!(
                "fleet erase not armed ({other:?}): nothing will be erased without asking"
            ),
        }
    }

    let demo = args.demo_fake_macs.is_some();
    let summary = rt.block_on(async {
        // Networking first: DHCP, DNS and the clock before the first TLS handshake.
        let (gate_tx, gate_rx) = watch::channel(r.net.is_none() || demo);
        // The ready lines wait for the station itself (USB watched), not just the network.
        let (ready_tx, ready_rx) = watch::channel(false);
        let mut _net = None;
        let info: Arc<dyn StationInfo> = match (&r.net, demo) {
            (Some(cfg), false) => {
                let handle = match early.take() {
                    Some(h) => {
                        h.reconfigure(cfg.clone())
                            .await
                            .context("networking stopped before the config file was read")?;
                        h
                    }
                    None => net::start(cfg.clone(), Arc::new(SystemClock))
                        .context("cannot start networking")?,
                };
                let info = Arc::new(NetInfo::new(handle.status(), r.servers_label.clone()));
                tokio::spawn(report_network(handle.status(), info.clone(), ready_rx));
                tokio::spawn(clock_gate(
                    handle.status(),
                    r.clock_wait,
                    r.require_clock,
                    info.clone(),
                    gate_tx,
                ));
                _net = Some(handle);
                info
            }
            _ => {
                if let Some(h) = early.take() {
                    h.stop().await;
                }
                if !demo {
                    let mut ready = ready_rx;
                    tokio::spawn(async move {
                        if ready.wait_for(|r| *r).await.is_ok() {
                            println!("MACRESCUE: station ready (networking off)");
                        }
                    });
                }
                Arc::new(NoNetwork)
            }
        };
        if !r.usbip.is_empty() && !demo {
            UsbipClient::spawn(UsbipConfig {
                servers: r.usbip.clone(),
                ..UsbipConfig::default()
            })
            .context("cannot start the USB/IP client")?;
            println!(
                "station: importing the USB devices of {}",
                r.usbip.join(", ")
            );
        }
        let (bus, job, probe): (Arc<dyn UsbBus>, Arc<dyn MacJob>, bool) = match args.demo_fake_macs
        {
            Some(n) => (
                Arc::new(FakeBus::new(
                    (1..=n).map(|p| dfu_device(p, p + 1)).collect(),
                )),
                Arc::new(DemoJob {
                    step: Duration::from_millis(args.demo_step_ms),
                }),
                false,
            ),
            None => (
                Arc::new(RusbBus::new().context("cannot access USB")?),
                Arc::new(EngineJob {
                    cfg: Arc::new(r.engine.clone()),
                    gate: gate_rx,
                }),
                true,
            ),
        };
        let cfg = StationConfig {
            data_dir: args.data.clone(),
            max_macs: r.max_macs,
            display,
            cache_label: args
                .cache
                .as_ref()
                .map(|c| c.display().to_string())
                .unwrap_or_else(|| "none".into()),
            probe_ecid: probe,
            exit_after: args.exit_after,
            ..StationConfig::default()
        };
        let station = Station::new(cfg, bus, job, arming, info, Box::new(std::io::stdout()))
            .with_ready(ready_tx);
        if !demo {
            // The benchmark's baseline: the idle station, before any Mac.
            println!(
                "station: agent peak RSS before any Mac {} KiB",
                restore_agent::station::usage::peak_rss_kib()
            );
        }
        let summary = station
            .run(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        anyhow::Ok(summary)
    })?;
    println!(
        "station stopped: {} Macs restored, {} failed",
        summary.done, summary.failed
    );
    Ok(())
}

/// Prints the line the boot test waits for once DHCP gave an address, and every change of
/// the network summary afterwards (line-mode consoles never redraw the header).
async fn report_network(
    mut rx: watch::Receiver<NetStatus>,
    info: Arc<NetInfo>,
    mut station_ready: watch::Receiver<bool>,
) {
    if station_ready.wait_for(|r| *r).await.is_err() {
        return;
    }
    let mut ready = false;
    let mut last = String::new();
    loop {
        let st = rx.borrow_and_update().clone();
        if !ready {
            if let Some((link, d)) = st
                .links
                .iter()
                .find_map(|l| l.dhcp.as_ref().map(|d| (l.name.clone(), d.clone())))
            {
                // The kernel's clock: ci/boot --benchmark measures boot time up to this line.
                let since_boot = std::fs::read_to_string("/proc/uptime")
                    .ok()
                    .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
                    .map(|s| format!(", {s:.2} s after kernel start"))
                    .unwrap_or_default();
                println!(
                    "MACRESCUE: station ready, address {}/{} from DHCP on {link}{since_boot}",
                    d.address, d.prefix_len
                );
                ready = true;
            }
        }
        let now = info.network();
        if now != last {
            println!("station: network {now}");
            last = now;
        }
        // Re-read now and then: the clock note changes outside the status channel.
        if let Ok(Err(_)) = tokio::time::timeout(Duration::from_secs(2), rx.changed()).await {
            return;
        }
    }
}

/// Opens the gate for restores once the clock can be trusted for TLS: set by SNTP, or — only
/// when configured — the RTC after `wait` without any time server answering.
async fn clock_gate(
    mut rx: watch::Receiver<NetStatus>,
    wait: Duration,
    require: bool,
    info: Arc<NetInfo>,
    gate: watch::Sender<bool>,
) {
    let mut said = false;
    loop {
        match net::wait_for_clock(&mut rx, wait).await {
            Ok(s) => {
                info.set_clock_note(None);
                println!(
                    "station: clock set by SNTP from {} (stepped {:+.1} s)",
                    s.server, s.step_secs
                );
                let _ = gate.send(true);
                return;
            }
            Err(net::NetError::Stopped) => return,
            Err(e) if !require => {
                if !said {
                    info.set_clock_note(Some("RTC (no time server answered)".into()));
                    println!(
                        "station: {e}. Continuing with the hardware clock (RTC) as configured \
                         ([net] require_clock = false); certificate checks trust it"
                    );
                    let _ = gate.send(true);
                    said = true;
                }
            }
            Err(e) => {
                if !said {
                    info.set_clock_note(Some("NOT set: restores wait for a time server".into()));
                    println!("station: {e}. Restores wait until the clock is set");
                    said = true;
                }
            }
        }
    }
}

/// The per-Mac job in production: the restore engine, once the clock can be trusted.
struct EngineJob {
    cfg: Arc<EngineConfig>,
    gate: watch::Receiver<bool>,
}

impl MacJob for EngineJob {
    fn start(
        &self,
        bus: Arc<dyn UsbBus>,
        device: DeviceInfo,
        confirmer: Arc<dyn EraseConfirmer>,
        events: UnboundedSender<EngineEvent>,
    ) -> JobFuture {
        let cfg = Arc::clone(&self.cfg);
        let mut gate = self.gate.clone();
        Box::pin(async move {
            if !*gate.borrow() {
                let _ = events.send(EngineEvent::Message(
                    "waiting for the clock to be set (SNTP) before contacting the servers".into(),
                ));
                let _ = gate.wait_for(|ok| *ok).await;
            }
            let report = engine::restore_mac(cfg, bus, device, confirmer, events).await;
            serde_json::to_value(&report).unwrap_or_else(
                |e| json!({ "error": format!("the engine's report could not be serialised: {e}") }),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(v: &[&str]) -> Args {
        Cli::try_parse_from(std::iter::once("x").chain(v.iter().copied()))
            .unwrap()
            .args
    }

    const FILE: &str = r#"
[station]
catalog_url = "https://10.0.2.100:8001/c.xml"
fallback_url = "off"
tss_url = "https://10.0.2.100:8003/TSS/controller?action=2"
ca_file = "macrescue/ca.pem"
usbip = "10.0.2.100:3240"
build = "25C56"
max_macs = 2
usb_timeout_scale = 20
[net]
require_clock = false
clock_wait = 4
ntp_fallback = "off"
"#;

    #[test]
    fn the_file_sets_and_flags_override() {
        let file = FileSettings::parse(FILE, std::path::Path::new("c")).unwrap();
        let r = resolve(
            &parse(&["--data", "/data"]),
            &file,
            Some("/dev/ttyS0,/dev/tty0"),
        );
        assert_eq!(
            r.engine.catalog.catalog_url,
            "https://10.0.2.100:8001/c.xml"
        );
        assert_eq!(r.engine.catalog.fallback_url, None);
        assert_eq!(
            r.engine.tss.server.as_deref(),
            Some("https://10.0.2.100:8003/TSS/controller?action=2")
        );
        assert_eq!(
            r.engine.http.extra_ca,
            Some(PathBuf::from("/data/macrescue/ca.pem"))
        );
        assert_eq!(r.engine.tss.http.extra_ca, r.engine.http.extra_ca);
        assert_eq!(r.engine.pin, BuildPin::Build("25C56".into()));
        assert_eq!(r.usbip, vec!["10.0.2.100:3240"]);
        assert_eq!(r.max_macs, 2);
        assert_eq!(
            r.consoles,
            vec![PathBuf::from("/dev/ttyS0"), PathBuf::from("/dev/tty0")]
        );
        assert!(!r.require_clock);
        assert_eq!(r.clock_wait, Duration::from_secs(4));
        let net = r.net.unwrap();
        assert_eq!(net.ntp_fallback, None);
        assert_eq!(
            net.reachability_targets,
            vec!["10.0.2.100:8001", "10.0.2.100:8003"]
        );
        assert_eq!(r.servers_label, "servers");
        assert_eq!(
            r.engine.timeouts.bootchain.ibec_reconnect,
            Duration::from_secs(200)
        );
        assert_eq!(r.engine.timeouts.mux_handshake, Duration::from_secs(200));
        assert_eq!(
            r.engine.timeouts.bootchain.open_attempts,
            Timeouts::default().bootchain.open_attempts
        );
        assert_eq!(
            r.engine.timeouts.back_in_dfu,
            Timeouts::default().back_in_dfu
        );

        let r = resolve(
            &parse(&[
                "--max-macs",
                "5",
                "--build",
                "latest",
                "--console",
                "/dev/ttyS1",
                "--no-network",
                "--tss-url",
                "http://127.0.0.1:9",
                "--usb-timeout-scale",
                "1.5",
            ]),
            &file,
            Some("/dev/ttyS0"),
        );
        assert_eq!(r.max_macs, 5);
        assert_eq!(r.engine.pin, BuildPin::Latest);
        assert_eq!(r.consoles, vec![PathBuf::from("/dev/ttyS1")]);
        assert!(r.net.is_none());
        assert_eq!(r.engine.tss.server.as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(
            r.engine.timeouts.bootchain.ibss_reconnect,
            Duration::from_secs(15)
        );
        // Relative to nothing without --data.
        assert_eq!(
            r.engine.http.extra_ca,
            Some(PathBuf::from("macrescue/ca.pem"))
        );
    }

    #[test]
    fn defaults_are_apples_servers_with_networking_on() {
        let r = resolve(&parse(&[]), &FileSettings::default(), None);
        assert_eq!(r.engine.catalog.catalog_url, MESU_MACOS_IPSW_CATALOG_URL);
        assert_eq!(
            r.engine.catalog.fallback_url.as_deref(),
            Some(IPSW_ME_BASE_URL)
        );
        assert_eq!(r.engine.tss.server, None);
        assert!(r.consoles.is_empty() && r.usbip.is_empty());
        assert!(r.require_clock);
        assert_eq!(r.max_macs, 8);
        assert_eq!(r.confirm_timeout, Duration::from_secs(300));
        // Real Macs keep the spec's timing.
        assert_eq!(r.engine.timeouts, Timeouts::default());
        assert_eq!(usb_timeout_scale(Some(0.0)), 1.0);
        assert_eq!(usb_timeout_scale(Some(f64::NAN)), 1.0);
        assert_eq!(usb_timeout_scale(Some(-3.0)), 1.0);
        assert_eq!(usb_timeout_scale(Some(50.0)), 50.0);
        let net = r.net.unwrap();
        assert_eq!(net.ntp_fallback.as_deref(), Some("time.apple.com"));
        assert_eq!(r.servers_label, "Apple");
        assert_eq!(
            parse_pin("UniversalMac.ipsw"),
            BuildPin::Ipsw(PathOrUrl::parse("UniversalMac.ipsw"))
        );
        assert_eq!(
            parse_pin("https://h/x"),
            BuildPin::Ipsw(PathOrUrl::parse("https://h/x"))
        );
    }
}
