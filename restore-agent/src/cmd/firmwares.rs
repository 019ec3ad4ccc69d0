//! `restore-agent firmwares`: the builds offered for a Mac model, newest first, from Apple's
//! catalog (ipsw.me as fallback), optionally with whether Apple signs each one for a given
//! Mac right now (asked of TSS, never of a third party: protocol.md §9.4).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use restore_agent::catalog::{self, FirmwareEntry};
use restore_agent::catalog_fetch::{self, CatalogFetchConfig, CatalogFetcher};
use restore_agent::http::HttpConfig;
use restore_agent::ipsw::{Ipsw, RemoteConfig, RemoteFile};
use restore_agent::manifest::{BuildManifest, RestoreBehavior};
use restore_agent::tss::TssParams;
use restore_agent::tss_client::{BlockingTssClient, Signing, TssClientConfig};

/// Placeholder nonce lengths of Apple Silicon Macs (ApNonce SHA-384 truncated to 32 bytes,
/// SepNonce 20 bytes): signing does not depend on the nonce value.
const AP_NONCE_LEN: usize = 32;
const SEP_NONCE_LEN: usize = 20;

#[derive(clap::Args)]
pub struct Args {
    /// Product type, e.g. Mac14,2 (`restore-agent devices` shows it).
    #[arg(long)]
    pub model: String,
    /// Apple's macOS IPSW catalog.
    #[arg(long, default_value = catalog::MESU_MACOS_IPSW_CATALOG_URL)]
    pub catalog_url: String,
    /// The ipsw.me API used when Apple's catalog fails (base URL, or a URL with {model}).
    #[arg(long, default_value = catalog_fetch::IPSW_ME_BASE_URL)]
    pub fallback_url: String,
    /// Use Apple's catalog only.
    #[arg(long)]
    pub no_fallback: bool,
    /// PEM file with an extra trusted CA (private mirrors, tests).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Seconds to wait for each catalog source.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Print a JSON array of {version, build, url, sha1} (plus `signed` with --signed).
    #[arg(long)]
    pub json: bool,
    /// Ask Apple's signing server whether each build is signed for the Mac given by --ecid
    /// and --board (reads each build's BuildManifest over HTTP ranges).
    #[arg(long, requires_all = ["ecid", "board"])]
    pub signed: bool,
    /// The Mac's ECID in hex (for --signed).
    #[arg(long)]
    pub ecid: Option<String>,
    /// The Mac's board config, e.g. j274ap (for --signed).
    #[arg(long)]
    pub board: Option<String>,
    /// Signing server (default: Apple's); a URL with no path gets /TSS/controller?action=2.
    #[arg(long)]
    pub tss_url: Option<String>,
    /// ApNonce in hex (default: a placeholder; signing does not depend on it).
    #[arg(long)]
    pub ap_nonce: Option<String>,
    /// SepNonce in hex (default: a placeholder).
    #[arg(long)]
    pub sep_nonce: Option<String>,
}

/// One line of output.
#[derive(serde::Serialize)]
struct Row<'a> {
    version: &'a str,
    build: &'a str,
    url: &'a str,
    sha1: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signed: Option<Option<bool>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signing_error: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let http = HttpConfig {
        extra_ca: args.ca_file.clone(),
        ..HttpConfig::default()
    };
    let config = CatalogFetchConfig {
        catalog_url: args.catalog_url.clone(),
        fallback_url: (!args.no_fallback).then(|| args.fallback_url.clone()),
        timeout: Duration::from_secs(args.timeout.max(1)),
        http: http.clone(),
    };
    let fetcher = CatalogFetcher::new(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the network runtime")?;
    let fetched = runtime.block_on(fetcher.builds_for(&args.model))?;
    drop(runtime);
    if let Some(note) = fetched.fallback_note() {
        eprintln!("note: {note}");
    }

    let signing = if args.signed {
        Some(check_signing(&args, &http, &fetched.entries)?)
    } else {
        None
    };

    let rows: Vec<Row> = fetched
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let check = signing.as_ref().map(|s| &s[i]);
            Row {
                version: &e.version,
                build: &e.build,
                url: &e.url,
                sha1: e.sha1_hex(),
                signed: check.map(|c| c.as_ref().ok().copied()),
                signing_error: check.and_then(|c| c.as_ref().err().cloned()),
            }
        })
        .collect();

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
    } else {
        writeln!(out, "Builds for {} (from {}):", args.model, fetched.source)?;
        for r in &rows {
            let signed = match r.signed {
                None => String::new(),
                Some(Some(true)) => "signed      ".into(),
                Some(Some(false)) => "not signed  ".into(),
                Some(None) => "unknown     ".into(),
            };
            writeln!(
                out,
                "{:<10} {:<10} {signed}{:<40} {}",
                r.version,
                r.build,
                r.sha1.as_deref().unwrap_or("(no SHA-1)"),
                r.url
            )?;
            if let Some(e) = &r.signing_error {
                writeln!(out, "           signing unknown: {e}")?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// Per entry: signed or not, or why it could not be told.
fn check_signing(
    args: &Args,
    http: &HttpConfig,
    entries: &[FirmwareEntry],
) -> anyhow::Result<Vec<Result<bool, String>>> {
    // `requires_all` on --signed makes both present.
    let (Some(ecid), Some(board)) = (&args.ecid, &args.board) else {
        bail!("--signed needs --ecid and --board");
    };
    let ecid = parse_hex_u64(ecid).with_context(|| format!("--ecid {ecid:?}"))?;
    let ap_nonce = nonce(args.ap_nonce.as_deref(), AP_NONCE_LEN).context("--ap-nonce")?;
    let sep_nonce = nonce(args.sep_nonce.as_deref(), SEP_NONCE_LEN).context("--sep-nonce")?;
    let params = TssParams::new(ecid, Some(ap_nonce), Some(sep_nonce));
    let tss = BlockingTssClient::new(TssClientConfig {
        server: args.tss_url.clone(),
        http: http.clone(),
        ..TssClientConfig::default()
    })?;
    let remote = RemoteConfig {
        http: http.clone(),
        ..RemoteConfig::default()
    };
    Ok(entries
        .iter()
        .map(|entry| {
            let answer = (|| -> anyhow::Result<bool> {
                let file = RemoteFile::open(&entry.url, remote.clone())?;
                let manifest = Ipsw::open(file)?.build_manifest()?;
                let manifest = BuildManifest::from_bytes(&manifest)?;
                let identity = manifest.select_identity(board, RestoreBehavior::Update)?;
                Ok(match tss.is_signed(&identity.raw, &params)? {
                    Signing::Signed => true,
                    Signing::NotSigned { .. } => false,
                })
            })();
            answer.map_err(|e| {
                tracing::warn!(build = %entry.build, "signing check failed: {e:#}");
                format!("{e:#}")
            })
        })
        .collect())
}

fn parse_hex_u64(s: &str) -> anyhow::Result<u64> {
    let hex = s.trim().trim_start_matches("0x").trim_start_matches("0X");
    u64::from_str_radix(hex, 16).context("not a hexadecimal number")
}

fn nonce(hex_text: Option<&str>, placeholder_len: usize) -> anyhow::Result<Vec<u8>> {
    match hex_text {
        None => Ok(vec![0; placeholder_len]),
        Some(t) => hex::decode(t.trim()).context("not hexadecimal"),
    }
}
