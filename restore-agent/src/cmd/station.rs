//! `restore-agent station`: what the rescue image runs — every Mac plugged in gets restored,
//! with a dashboard on the console and a report per Mac.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use restore_agent::engine::{self, EngineConfig};
use restore_agent::station::api::{erase_code, EngineEvent, EraseConfirmer, EraseDecision};
use restore_agent::station::confirm::{
    ArmingConfirmer, ConsoleConfirmer, GpioConfirmer, NoConfirmer,
};
use restore_agent::station::demo::{dfu_device, DemoJob, FakeBus};
use restore_agent::station::{
    dashboard, gpio, Display, JobFuture, MacJob, NoNetwork, Station, StationConfig,
};
use restore_agent::usb::rusb_edge::RusbBus;
use restore_agent::usb::{DeviceInfo, UsbBus};
use serde_json::json;
use tokio::sync::mpsc::UnboundedSender;

#[derive(clap::Args)]
pub struct Args {
    /// Persistent storage: reports go to DIR/reports, per-Mac logs to DIR/logs.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Plain lines instead of the redrawn dashboard (automatic on serial consoles and pipes).
    #[arg(long)]
    pub line_mode: bool,
    /// How many Macs are worked on at once; more wait for a free slot.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub max_macs: usize,
    /// A local tty where erase codes are shown and typed (repeatable: VGA tty and serial).
    #[arg(long = "console", value_name = "TTY")]
    pub consoles: Vec<PathBuf>,
    /// A GPIO erase button instead of a console: /dev/gpiochipN:LINE, or a sysfs value file.
    #[arg(long, value_name = "SPEC")]
    pub gpio_button: Option<String>,
    /// How long the GPIO button must be held, in seconds.
    #[arg(long, default_value_t = 3.0, value_name = "SECS")]
    pub hold_secs: f64,
    /// How long an erase question waits for an answer, in seconds.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub confirm_timeout: u64,
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

pub fn run(args: Args) -> anyhow::Result<()> {
    let display = if args.line_mode || dashboard::want_line_mode() {
        Display::Lines
    } else {
        Display::Terminal { width: None }
    };
    let timeout = Duration::from_secs(args.confirm_timeout);
    let physical: Arc<dyn EraseConfirmer> = if !args.consoles.is_empty() {
        Arc::new(
            ConsoleConfirmer::open(&args.consoles, timeout)
                .context("cannot open the erase-confirmation console")?,
        )
    } else if let Some(spec) = &args.gpio_button {
        let line = gpio::open_button(spec).context("cannot open the GPIO erase button")?;
        Arc::new(
            GpioConfirmer::new(line, Duration::from_secs_f64(args.hold_secs), timeout)
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

    let (bus, job, probe): (Arc<dyn UsbBus>, Arc<dyn MacJob>, bool) = match args.demo_fake_macs {
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
                cfg: Arc::new(EngineConfig {
                    cache_dir: args.cache.clone(),
                    local_ipsw_dirs: args.ipsw_dirs.clone(),
                    ..EngineConfig::default()
                }),
            }),
            true,
        ),
    };
    let cfg = StationConfig {
        data_dir: args.data,
        max_macs: args.max_macs,
        display,
        cache_label: args
            .cache
            .map(|c| c.display().to_string())
            .unwrap_or_else(|| "none".into()),
        probe_ecid: probe,
        exit_after: args.exit_after,
        ..StationConfig::default()
    };
    let station = Station::new(
        cfg,
        bus,
        job,
        arming,
        Arc::new(NoNetwork),
        Box::new(std::io::stdout()),
    );
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let summary = rt.block_on(station.run(async {
        let _ = tokio::signal::ctrl_c().await;
    }))?;
    println!(
        "station stopped: {} Macs restored, {} failed",
        summary.done, summary.failed
    );
    Ok(())
}

/// The per-Mac job in production: the restore engine.
struct EngineJob {
    cfg: Arc<EngineConfig>,
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
        Box::pin(async move {
            let report = engine::restore_mac(cfg, bus, device, confirmer, events).await;
            serde_json::to_value(&report).unwrap_or_else(
                |e| json!({ "error": format!("the engine's report could not be serialised: {e}") }),
            )
        })
    }
}
