//! `restore-agent plan`: what a restore of this Mac would do, from a BuildManifest alone: the
//! identity, every component per stage with its path and 4CC, and the main TSS request.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use plist::Value;
use restore_agent::ipsw::LocalFile;
use restore_agent::manifest::{BuildManifest, RestoreBehavior};
use restore_agent::personalize::{ComponentSource, IpswSource, RestorePlan};
use restore_agent::tss::{self, RequestUuid, TssParams};
use serde_json::{json, Value as Json};

/// Placeholder ApNonce: 32 bytes, the size Apple Silicon Macs report.
const PLACEHOLDER_AP_NONCE: [u8; 32] = [0; 32];
/// Placeholder SepNonce: 20 bytes, the size Apple Silicon Macs report.
const PLACEHOLDER_SEP_NONCE: [u8; 20] = [0; 20];
/// A fixed `@UUID` so two plans of the same build compare equal; the agent sends a fresh one.
const PLACEHOLDER_UUID: &str = "00000000-0000-0000-0000-000000000000";

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["ipsw", "manifest"])))]
pub struct Args {
    /// A local IPSW (its BuildManifest.plist is read without unpacking it).
    #[arg(long, value_name = "PATH")]
    pub ipsw: Option<PathBuf>,
    /// A BuildManifest.plist on its own.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// The Mac's board config, e.g. j274ap (see `restore-agent devices` / `identify`).
    #[arg(long, value_name = "BOARDCONFIG")]
    pub board: String,
    /// Plan an Erase (clean install) instead of an Update (revive, keeps data when possible).
    #[arg(long)]
    pub erase: bool,
    /// The Mac's ECID in hex (placeholder 0 otherwise).
    #[arg(long, value_name = "HEX")]
    pub ecid: Option<String>,
    /// The Mac's ApNonce (NONC) in hex (placeholder zeros otherwise).
    #[arg(long, value_name = "HEX")]
    pub ap_nonce: Option<String>,
    /// The Mac's SepNonce (SNON) in hex (placeholder zeros otherwise).
    #[arg(long, value_name = "HEX")]
    pub sep_nonce: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_hex(what: &str, s: &str) -> anyhow::Result<Vec<u8>> {
    let s = s.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    hex::decode(s).with_context(|| format!("--{what} {s:?} is not hex (e.g. 0a1b2c…)"))
}

fn parse_ecid(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    u64::from_str_radix(t, 16)
        .with_context(|| format!("--ecid {s:?} is not a hex ECID (as `devices` prints it)"))
}

/// The manifest, and the opened IPSW when one was given (to check its files).
fn read_manifest(args: &Args) -> anyhow::Result<(BuildManifest, Option<IpswSource<LocalFile>>)> {
    if let Some(path) = &args.manifest {
        return Ok((BuildManifest::from_path(path)?, None));
    }
    if let Some(path) = &args.ipsw {
        let source = IpswSource::open_path(path)?;
        let bytes = source.ipsw().build_manifest()?;
        let manifest = BuildManifest::from_bytes(&bytes)
            .with_context(|| format!("reading BuildManifest.plist from {}", path.display()))?;
        return Ok((manifest, Some(source)));
    }
    bail!("give --ipsw or --manifest")
}

/// Boot-chain and restore files the plan names that the IPSW lacks: (component, path).
fn missing_files(plan: &RestorePlan, source: &IpswSource<LocalFile>) -> Vec<(String, String)> {
    let boot = plan
        .boot_components()
        .into_iter()
        .filter_map(|c| Some((c.component.clone(), c.path.clone()?)));
    let restore = plan
        .restore
        .iter()
        .filter_map(|i| Some((i.component.clone(), i.path.clone()?)));
    boot.chain(restore)
        .filter(|(_, path)| !matches!(source.contains(path), Ok(true)))
        .collect()
}

/// A TSS request value as JSON. Data becomes lowercase hex (the request's digests and nonces
/// read best that way); integers stay numbers.
pub fn plist_to_json(v: &Value) -> Json {
    match v {
        Value::Array(a) => a.iter().map(plist_to_json).collect(),
        Value::Dictionary(d) => d
            .iter()
            .map(|(k, v)| (k.clone(), plist_to_json(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
        Value::Boolean(b) => json!(b),
        Value::Data(d) => json!(hex::encode(d)),
        Value::Date(d) => json!(d.to_xml_format()),
        Value::Real(r) => json!(r),
        Value::Integer(i) => i
            .as_unsigned()
            .map(|u| json!(u))
            .or_else(|| i.as_signed().map(|s| json!(s)))
            .unwrap_or(Json::Null),
        Value::String(s) => json!(s),
        Value::Uid(u) => json!(u.get()),
        _ => Json::Null,
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (manifest, ipsw) = read_manifest(&args)?;
    let behavior = if args.erase {
        RestoreBehavior::Erase
    } else {
        RestoreBehavior::Update
    };
    let board = args.board.to_ascii_lowercase();
    let plan = RestorePlan::new(&manifest, &board, behavior)?;
    let identity = plan
        .identity_in(&manifest)
        .context("the chosen identity vanished from the manifest")?;

    let mut placeholders = Vec::new();
    let ecid = match &args.ecid {
        Some(s) => parse_ecid(s)?,
        None => {
            placeholders.push("ecid");
            0
        }
    };
    let ap_nonce = match &args.ap_nonce {
        Some(s) => parse_hex("ap-nonce", s)?,
        None => {
            placeholders.push("ap_nonce");
            PLACEHOLDER_AP_NONCE.to_vec()
        }
    };
    let sep_nonce = match &args.sep_nonce {
        Some(s) => parse_hex("sep-nonce", s)?,
        None => {
            placeholders.push("sep_nonce");
            PLACEHOLDER_SEP_NONCE.to_vec()
        }
    };
    placeholders.push("uuid");
    let params = TssParams::new(ecid, Some(ap_nonce), Some(sep_nonce));
    let uuid = RequestUuid::parse(PLACEHOLDER_UUID)?;
    let request = tss::main_ap_request(&identity.raw, &params, &uuid)?;
    let missing = ipsw.as_ref().map(|source| missing_files(&plan, source));

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.json {
        let mut doc = plan.to_json();
        doc["tss_request"] = plist_to_json(&Value::Dictionary(request));
        doc["tss_placeholders"] = json!(placeholders);
        if let Some(missing) = &missing {
            doc["missing_from_ipsw"] = missing
                .iter()
                .map(|(c, p)| json!({"component": c, "path": p}))
                .collect();
        }
        serde_json::to_writer_pretty(&mut out, &doc)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", plan.to_text())?;
        if let (Some(missing), Some(source)) = (&missing, &ipsw) {
            if missing.is_empty() {
                writeln!(out, "\nevery file above is in {}", source.name())?;
            } else {
                writeln!(
                    out,
                    "\nMISSING from {} (a restore would stop before DFU; download the IPSW again):",
                    source.name()
                )?;
                for (c, p) in missing {
                    writeln!(out, "  {c:<36} {p}")?;
                }
            }
        }
        writeln!(out, "\nmain TSS request (§4.4):")?;
        if placeholders.len() > 1 {
            writeln!(
                out,
                "  NOTE: placeholder {} — give --ecid/--ap-nonce/--sep-nonce from `restore-agent devices` for the Mac's real request",
                placeholders.join(", ")
            )?;
        }
        let mut components = Vec::new();
        for (k, v) in &request {
            match v {
                Value::Dictionary(_) => components.push(k.as_str()),
                other => writeln!(out, "  {k:<28} {}", plist_to_json(other))?,
            }
        }
        writeln!(
            out,
            "  {} component entries: {}",
            components.len(),
            components.join(", ")
        )?;
    }
    out.flush()?;
    Ok(())
}
