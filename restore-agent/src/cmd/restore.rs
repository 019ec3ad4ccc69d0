//! `restore-agent restore`: wait for a Mac, revive it (erase only after the code shown is typed
//! on this terminal), print progress to stderr and the final report as one JSON line on stdout.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use restore_agent::bootchain::driver;
use restore_agent::catalog::MESU_MACOS_IPSW_CATALOG_URL;
use restore_agent::catalog_fetch::{CatalogFetchConfig, IPSW_ME_BASE_URL};
use restore_agent::engine::{
    self, Behavior, BuildPin, EngineConfig, EngineEvent, EraseConfirmer, EraseDecision, PathOrUrl,
    Timeouts,
};
use restore_agent::http::HttpConfig;
use restore_agent::identity::{self, report::hex_ecid};
use restore_agent::tss_client::TssClientConfig;
use restore_agent::usb::rusb_edge::RusbBus;
use restore_agent::usb::UsbBus;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Restore the newest macOS build Apple signs for this Mac (the default).
    #[arg(long, conflicts_with_all = ["build", "ipsw"])]
    pub latest: bool,
    /// Restore this build from the catalog (e.g. 25C56).
    #[arg(long, conflicts_with = "ipsw")]
    pub build: Option<String>,
    /// Restore this IPSW (a local path or an http(s) URL).
    #[arg(long)]
    pub ipsw: Option<String>,
    /// Erase the Mac instead of reviving it. Still asks for the code shown on screen.
    #[arg(long)]
    pub erase: bool,
    /// Only this Mac (ECID in hex, with or without 0x).
    #[arg(long, value_parser = parse_ecid)]
    pub ecid: Option<u64>,
    /// Directory of downloaded IPSWs (file name = the URL's last part).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Signing server (default: Apple's); a URL with no path gets /TSS/controller?action=2.
    #[arg(long)]
    pub tss_url: Option<String>,
    /// Apple's macOS IPSW catalog.
    #[arg(long, default_value = MESU_MACOS_IPSW_CATALOG_URL)]
    pub catalog_url: String,
    /// The ipsw.me API used when Apple's catalog fails.
    #[arg(long, default_value = IPSW_ME_BASE_URL)]
    pub fallback_url: String,
    /// PEM file with an extra trusted CA (private mirrors, tests).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Seconds to wait for a Mac in DFU to appear.
    #[arg(long, default_value_t = 60)]
    pub wait: u64,
    /// Accept a Mac that is in Recovery instead of DFU.
    #[arg(long)]
    pub allow_recovery: bool,
    /// Seconds to wait for the erase code to be typed before refusing.
    #[arg(long, default_value_t = 300)]
    pub confirm_timeout: u64,
}

fn parse_ecid(s: &str) -> Result<u64, String> {
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u64::from_str_radix(hex, 16).map_err(|e| format!("not a hexadecimal ECID ({s}): {e}"))
}

/// The engine's configuration from the command line.
pub fn config(args: &Args) -> EngineConfig {
    let http = HttpConfig {
        extra_ca: args.ca_file.clone(),
        ..HttpConfig::default()
    };
    let pin = match (&args.build, &args.ipsw) {
        (_, Some(p)) => BuildPin::Ipsw(PathOrUrl::parse(p)),
        (Some(b), None) => BuildPin::Build(b.clone()),
        (None, None) => BuildPin::Latest,
    };
    EngineConfig {
        cache_dir: args.cache.clone(),
        local_ipsw_dirs: Vec::new(),
        catalog: CatalogFetchConfig {
            catalog_url: args.catalog_url.clone(),
            fallback_url: Some(args.fallback_url.clone()),
            http: http.clone(),
            ..CatalogFetchConfig::default()
        },
        tss: TssClientConfig {
            server: args.tss_url.clone(),
            http: http.clone(),
            ..TssClientConfig::default()
        },
        http,
        pin,
        timeouts: Timeouts::default(),
        allow_recovery_start: args.allow_recovery,
        ..EngineConfig::default()
    }
}

/// Asks on the controlling terminal (`/dev/tty`), never on stdin: a script piping input into
/// the agent must not be able to confirm an erase. No terminal, no erase.
pub struct ConsoleConfirmer {
    pub timeout: Duration,
}

impl EraseConfirmer for ConsoleConfirmer {
    fn confirm_erase(&self, ecid: u64, code: &str, reason: &str) -> EraseDecision {
        let tty = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/tty")
        {
            Ok(t) => t,
            Err(e) => {
                return EraseDecision::Refused {
                    how: format!("no controlling terminal to confirm on ({e})"),
                }
            }
        };
        let mut out = match tty.try_clone() {
            Ok(o) => o,
            Err(e) => {
                return EraseDecision::Refused {
                    how: format!("cannot write to the terminal ({e})"),
                }
            }
        };
        let _ = write!(
            out,
            "\n*** ERASE the Mac with ECID {}? ALL DATA ON IT WILL BE LOST.\n    Why: {reason}\n    Type {code} and Enter to erase; anything else refuses ({} s): ",
            hex_ecid(ecid),
            self.timeout.as_secs()
        );
        let _ = out.flush();
        let (tx, rx) = std::sync::mpsc::channel();
        // The read cannot be interrupted; on timeout the thread is left waiting for a line
        // that no longer matters (the process ends soon after).
        std::thread::spawn(move || {
            let mut line = String::new();
            let r = BufReader::new(tty).read_line(&mut line).map(|_| line);
            let _ = tx.send(r);
        });
        match rx.recv_timeout(self.timeout) {
            Ok(Ok(line)) if line.trim().eq_ignore_ascii_case(code) => EraseDecision::Confirmed {
                how: "console /dev/tty".into(),
                at: SystemTime::now(),
            },
            Ok(Ok(_)) => EraseDecision::Refused {
                how: "console /dev/tty (wrong code)".into(),
            },
            Ok(Err(e)) => EraseDecision::Refused {
                how: format!("console /dev/tty unreadable ({e})"),
            },
            Err(RecvTimeoutError::Timeout) => {
                let _ = writeln!(out, "\n(no answer: not erasing)");
                EraseDecision::TimedOut
            }
            Err(RecvTimeoutError::Disconnected) => EraseDecision::TimedOut,
        }
    }
}

/// One progress line for an event, or nothing.
pub fn event_line(e: &EngineEvent) -> Option<String> {
    Some(match e {
        EngineEvent::Stage { stage } => format!("== {stage:?}"),
        EngineEvent::Identified {
            ecid,
            product_type,
            board,
            name,
        } => format!(
            "Mac: {name} {product_type} {board} ECID {}",
            hex_ecid(*ecid)
        ),
        EngineEvent::Build { version, build } => format!("macOS {version} ({build})"),
        EngineEvent::Progress {
            what, done, total, ..
        } => match total {
            Some(t) if *t > 0 => format!("  {what}: {}%", done.saturating_mul(100) / t),
            _ => return None,
        },
        EngineEvent::Checkpoint { name, result } => format!("  checkpoint {name}: {result}"),
        EngineEvent::Message(m) => m.clone(),
        EngineEvent::Failed {
            cause, next_step, ..
        } => format!("FAILED: {cause}\n  next: {next_step}"),
        EngineEvent::Succeeded => "restore succeeded".into(),
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let bus: Arc<dyn UsbBus> = Arc::new(RusbBus::new().context("cannot access USB")?);
    eprintln!(
        "restore: waiting up to {} s for a Mac in DFU{}…",
        args.wait,
        args.ecid
            .map(|e| format!(" with ECID {}", hex_ecid(e)))
            .unwrap_or_default()
    );
    let device = driver::wait_for_device(
        &*bus,
        args.ecid,
        Duration::from_secs(args.wait),
        identity::read_identity,
    )?;
    let cfg = Arc::new(config(&args));
    let confirmer = Arc::new(ConsoleConfirmer {
        timeout: Duration::from_secs(args.confirm_timeout.max(1)),
    });
    let first = if args.erase {
        Behavior::Erase
    } else {
        Behavior::Revive
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let report = runtime.block_on(async move {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let printer = tokio::spawn(async move {
            let mut last = String::new();
            while let Some(e) = rx.recv().await {
                if let Some(line) = event_line(&e) {
                    // Percent lines repeat; print each once.
                    if line != last {
                        eprintln!("{line}");
                        last = line;
                    }
                }
            }
        });
        let report = engine::restore_mac_with(cfg, bus, device, confirmer, tx, first).await;
        let _ = printer.await;
        report
    });
    println!("{}", report.to_json_line());
    if report.succeeded() {
        Ok(())
    } else {
        let cause = report
            .failure
            .as_ref()
            .map(|f| f.cause.clone())
            .unwrap_or_else(|| "the restore failed".into());
        anyhow::bail!("{cause}")
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

    #[test]
    fn the_build_choice_follows_the_flags() {
        assert_eq!(config(&parse(&[])).pin, BuildPin::Latest);
        assert_eq!(config(&parse(&["--latest"])).pin, BuildPin::Latest);
        assert_eq!(
            config(&parse(&["--build", "25C56"])).pin,
            BuildPin::Build("25C56".into())
        );
        assert_eq!(
            config(&parse(&["--ipsw", "https://h/x.ipsw"])).pin,
            BuildPin::Ipsw(PathOrUrl::Url("https://h/x.ipsw".into()))
        );
        assert!(Cli::try_parse_from(["x", "--latest", "--build", "1"]).is_err());
        let a = parse(&[
            "--ecid",
            "0x1122",
            "--tss-url",
            "http://127.0.0.1:9",
            "--cache",
            "/c",
        ]);
        assert_eq!(a.ecid, Some(0x1122));
        let c = config(&a);
        assert_eq!(c.tss.server.as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(c.cache_dir, Some(PathBuf::from("/c")));
    }

    #[test]
    fn progress_lines_name_the_failure_and_the_next_step() {
        let l = event_line(&EngineEvent::Failed {
            cause: "the Mac is in Recovery".into(),
            next_step: "enter DFU".into(),
            erase_could_fix: false,
        })
        .unwrap();
        assert!(l.contains("FAILED: the Mac is in Recovery"));
        assert!(l.contains("next: enter DFU"));
        assert_eq!(
            event_line(&EngineEvent::Progress {
                what: "system image".into(),
                done: 50,
                total: Some(200),
                rate_bps: None
            })
            .as_deref(),
            Some("  system image: 25%")
        );
    }
}
