//! `restore-agent download`: fetch a firmware file into the station's cache with parallel,
//! resumable range requests; progress on stderr, the final path on stdout.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use restore_agent::catalog::{self, FirmwareEntry};
use restore_agent::catalog_fetch::{self, CatalogFetchConfig, CatalogFetcher};
use restore_agent::download::{DownloadOptions, Downloader, Event, Progress};
use restore_agent::http::HttpConfig;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model (product type, e.g. Mac14,2) whose build to download (with --build).
    #[arg(long, requires = "build", conflicts_with = "url")]
    pub model: Option<String>,
    /// Build to download (with --model), e.g. 25C56.
    #[arg(long, requires = "model")]
    pub build: Option<String>,
    /// Download this URL.
    #[arg(long, required_unless_present = "model")]
    pub url: Option<String>,
    /// Apple's macOS IPSW catalog (with --model/--build).
    #[arg(long, default_value = catalog::MESU_MACOS_IPSW_CATALOG_URL)]
    pub catalog_url: String,
    /// The ipsw.me API used when Apple's catalog fails (base URL, or a URL with {model}).
    #[arg(long, default_value = catalog_fetch::IPSW_ME_BASE_URL)]
    pub fallback_url: String,
    /// Use Apple's catalog only.
    #[arg(long)]
    pub no_fallback: bool,
    /// The shared cache directory.
    #[arg(long, default_value = "/var/cache/macrescue")]
    pub cache: PathBuf,
    /// Parallel connections.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub connections: u16,
    /// Expected SHA-1 (40 hex digits); the file is deleted if it does not match.
    #[arg(long, value_parser = parse_sha1)]
    pub sha1: Option<[u8; 20]>,
    /// Extra trusted CA certificates (PEM), e.g. for a local mirror.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Seconds without data before a connection counts as stalled.
    #[arg(long, default_value_t = 20)]
    pub stall_timeout: u64,
    /// How often to record progress for resuming, in milliseconds.
    #[arg(long, default_value_t = 2000, hide = true)]
    pub save_every_ms: u64,
}

fn parse_sha1(s: &str) -> Result<[u8; 20], String> {
    let mut out = [0u8; 20];
    hex::decode_to_slice(s.trim(), &mut out)
        .map_err(|_| format!("{s:?} is not a SHA-1 (40 hexadecimal digits)"))?;
    Ok(out)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let http = HttpConfig {
        extra_ca: args.ca_file.clone(),
        ..HttpConfig::default()
    };
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let (url, catalog_sha1) = match (&args.url, &args.model, &args.build) {
        (Some(url), _, _) => (url.clone(), None),
        (None, Some(model), Some(build)) => {
            let entry = rt.block_on(find_build(&args, &http, model, build))?;
            if entry.sha1.is_none() {
                eprintln!(
                    "warning: the catalog gives no SHA-1 for {model} {build}; the download can only be checked for size"
                );
            }
            (entry.url, entry.sha1)
        }
        _ => bail!("give --url, or --model with --build"),
    };
    if url.starts_with("protected:") {
        bail!("{url} is a protected (encrypted) firmware URL, which cannot be downloaded");
    }
    let mut opts = DownloadOptions::new(url, &args.cache);
    opts.connections = usize::from(args.connections);
    opts.sha1 = args.sha1.or(catalog_sha1);
    opts.stall_timeout = Duration::from_secs(args.stall_timeout.max(1));
    opts.save_every = Duration::from_millis(args.save_every_ms.max(10));
    let started = std::time::Instant::now();
    let downloader = Downloader::new(&http, opts)?.on_event(Arc::new(print_event));
    let done = rt.block_on(downloader.run())?;
    let secs = started.elapsed().as_secs_f64();
    if done.from_cache {
        eprintln!("already in the cache (SHA-1 {})", hex::encode(done.sha1));
    } else {
        eprintln!(
            "done: {} fetched in {:.1} s ({}/s), SHA-1 {}",
            size(done.fetched),
            secs,
            size((done.fetched as f64 / secs.max(0.001)) as u64),
            hex::encode(done.sha1)
        );
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", done.path.display())?;
    Ok(())
}

/// The catalog entry for `model` and `build` (URL and SHA-1).
async fn find_build(
    args: &Args,
    http: &HttpConfig,
    model: &str,
    build: &str,
) -> anyhow::Result<FirmwareEntry> {
    let fetcher = CatalogFetcher::new(CatalogFetchConfig {
        catalog_url: args.catalog_url.clone(),
        fallback_url: (!args.no_fallback).then(|| args.fallback_url.clone()),
        http: http.clone(),
        ..CatalogFetchConfig::default()
    })?;
    let fetched = fetcher.builds_for(model).await?;
    if let Some(note) = fetched.fallback_note() {
        eprintln!("note: {note}");
    }
    let offered: Vec<&str> = fetched.entries.iter().map(|e| e.build.as_str()).collect();
    match fetched
        .entries
        .iter()
        .find(|e| e.build.eq_ignore_ascii_case(build))
    {
        Some(e) => Ok(e.clone()),
        None => bail!(
            "the catalog offers no build {build} for {model} (it offers: {}); pick one from `restore-agent firmwares --model {model}`",
            offered.join(", ")
        ),
    }
}

fn print_event(e: &Event) {
    let line = match e {
        Event::WaitingForOtherDownload { .. } => {
            "another restore is downloading this file; waiting for it".to_string()
        }
        Event::AlreadyCached { path } => format!("found {} in the cache", path.display()),
        Event::Resuming { have, total } => {
            format!("resuming: {} of {} already here", size(*have), size(*total))
        }
        Event::StartingOver { reason } => format!("starting over: {reason}"),
        Event::Progress(p) => progress_line(p),
        Event::Retrying { offset, reason } => format!("retrying at byte {offset}: {reason}"),
        Event::Racing { range } => format!(
            "bytes {}-{} are slow; fetching them again on another connection",
            range.start, range.end
        ),
        Event::Verifying { done, total } => {
            format!("verifying SHA-1: {} of {}", size(*done), size(*total))
        }
    };
    // A closed stderr must not abort a download.
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn progress_line(p: &Progress) -> String {
    let pct = if p.total == 0 {
        100.0
    } else {
        p.done as f64 * 100.0 / p.total as f64
    };
    let eta = match p.eta {
        Some(d) => duration(d),
        None => "unknown".into(),
    };
    format!(
        "downloading: {} of {} ({pct:.1}%) at {}/s, {} connections, {eta} left",
        size(p.done),
        size(p.total),
        size(p.bytes_per_sec as u64),
        p.connections
    )
}

fn size(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes_and_durations() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(13 << 30), "13.0 GiB");
        assert_eq!(duration(Duration::from_secs(59)), "59s");
        assert_eq!(duration(Duration::from_secs(271)), "4m31s");
        assert_eq!(duration(Duration::from_secs(7300)), "2h01m");
    }

    #[test]
    fn sha1_arguments() {
        assert!(parse_sha1("da39a3ee5e6b4b0d3255bfef95601890afd80709").is_ok());
        assert!(parse_sha1("da39").is_err());
    }
}
