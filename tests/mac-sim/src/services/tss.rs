//! A simulated Apple TSS (`gs.apple.com/TSS/controller?action=2`) that checks requests the way
//! protocol.md §4 describes them and signs tickets with the simulator's test key
//! ([`crate::ticket`]), so the simulated Mac accepts what it issues and nothing else.
//!
//! The decision is sans-IO ([`TssService::evaluate`]: request body in, [`TssReply`] out); the
//! HTTP edge ([`TssService::start`]) adds request counting and faults.
//!
//! What is checked, in order, and the STATUS each failure gives (our choice where Apple's exact
//! code is unknown: structural problems are 100 "malformed", eligibility problems 94):
//! 1. the body is an XML plist dictionary — else 100;
//! 2. `@ApImg4Ticket` = true, `@HostPlatformInfo`/`@VersionInfo`/`@UUID` strings, `ApECID`,
//!    `ApChipID`, `ApBoardID`, `ApSecurityDomain` integers, `UniqueBuildID` data,
//!    `ApProductionMode`/`ApSecurityMode` booleans, and `ApNonce` data unless the request is a
//!    restore-mode local-policy one (`Ap,LocalBoot` = true, §4.8) — else 100;
//! 3. `UniqueBuildID` is an identity of one of the given BuildManifests whose `ApChipID`,
//!    `ApBoardID`, `ApSecurityDomain` equal the request's — else 94;
//! 4. the build (`ProductBuildVersion`) is signed (all are unless a set is configured) and the
//!    ECID is in the allow-list when one is configured — else 94;
//! 5. by kind:
//!    * local policy (`Ap,LocalPolicy` present, §4.6/§4.8): its `Digest` is SHA-384 of the
//!      22-byte lpol IM4P and `Trusted` is true, `Ap,NextStageIM4MHash` is 48 bytes of data,
//!      `Ap,LocalBoot` is a boolean; with LocalBoot, `Ap,RecoveryOSPolicyNonceHash` (data) and
//!      `Ap,VolumeUUID` (16 bytes) are present — else 100;
//!    * main AP ticket (§4.4/§4.5) when the request names `iBSS`, `iBEC` or `LLB`, else the
//!      recovery-OS root ticket (§4.7): every required manifest entry (for that kind) is present
//!      — else 100; every manifest entry the request carries has the manifest's `Digest` — else
//!      94 (an image of another build); `Trusted` and the rule-derived `EPRO`/`ESEC`/`DPRO`/`DSEC`
//!      are exactly what §4.5 gives for the request's modes — else 100.
//!
//! Requests for a coprocessor's `@<X>,Ticket` (firmware updaters, §4.9) are checked and signed
//! by [`crate::services::tss_updater`] instead.
//!
//! The ticket covers the request's ECID, `BNCH` = ApNonce, `snon` = SEP nonce, the modes, and
//! one object per component carried (DGST = the request's Digest, EPRO/ESEC as requested,
//! EKEY = Trusted). Local-policy tickets carry `lobo`, `nsih` (and `ronh`, `vuid`) in MANP and
//! an `lpol` object.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use plist::{Dictionary, Value};

use crate::images::{fourcc_for, LPOL_IM4P};
use crate::img4::{FourCc, PropValue};
use crate::services::http::{handler, Request, Responder, Server};
use crate::services::tss_updater;
use crate::ticket::{self, ComponentEntry, TicketSpec};

/// Entries never sent (§4.5).
const ALWAYS_SKIPPED: &[&str] = &[
    "BasebandFirmware",
    "SE,UpdatePayload",
    "BaseSystem",
    "Diags",
    "Ap,ExclaveOS",
];

/// Additionally skipped by the recovery-OS root request (§4.7).
const RECOVERY_SKIPPED: &[&str] = &[
    "ANS",
    "Ap,AudioBootChime",
    "Ap,CIO",
    "Ap,RestoreCIO",
    "Ap,RestoreTMU",
    "Ap,TMU",
    "Ap,rOSLogo1",
    "Ap,rOSLogo2",
    "AppleLogo",
    "DCP",
    "LLB",
    "RecoveryMode",
    "RestoreANS",
    "RestoreDCP",
    "RestoreDeviceTree",
    "RestoreKernelCache",
    "RestoreLogo",
    "RestoreRamDisk",
    "RestoreSEP",
    "SEP",
    "ftap",
    "ftsp",
    "iBEC",
    "iBSS",
    "rfta",
    "rfts",
];

/// Boolean actions a rule may set on an entry.
const RULE_KEYS: &[&str] = &["EPRO", "ESEC", "DPRO", "DSEC"];

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TssError {
    #[error("cannot read BuildManifest {path}: {source}")]
    Manifest {
        path: String,
        #[source]
        source: plist::Error,
    },
    #[error("BuildManifest {0} has no BuildIdentities array: not a BuildManifest")]
    NotAManifest(String),
}

/// What the server accepts.
#[derive(Debug, Clone, Default)]
pub struct TssConfig {
    /// BuildManifest roots (`BuildIdentities`, `ProductBuildVersion` …).
    pub manifests: Vec<Dictionary>,
    /// Builds (`ProductBuildVersion`) still signed; `None` = every known build.
    pub signed_builds: Option<HashSet<String>>,
    /// ECIDs allowed; `None` = any.
    pub ecid_allow: Option<HashSet<u64>>,
}

impl TssConfig {
    pub fn from_files<P: AsRef<Path>>(paths: &[P]) -> Result<TssConfig, TssError> {
        let mut manifests = Vec::new();
        for p in paths {
            let path = p.as_ref().display().to_string();
            let v = Value::from_file(p.as_ref()).map_err(|source| TssError::Manifest {
                path: path.clone(),
                source,
            })?;
            manifests.push(manifest_dict(v).ok_or(TssError::NotAManifest(path))?);
        }
        Ok(TssConfig {
            manifests,
            ..TssConfig::default()
        })
    }
}

fn manifest_dict(v: Value) -> Option<Dictionary> {
    let d = v.into_dictionary()?;
    d.get("BuildIdentities")?.as_array()?;
    Some(d)
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TssReply {
    pub status: u32,
    pub message: String,
    /// The signed IM4M on success.
    pub ticket: Option<Vec<u8>>,
    /// The key the ticket is returned under: `ApImg4Ticket`, or the `<X>,Ticket` a
    /// firmware-updater request asked for (§4.9).
    pub ticket_key: String,
}

impl TssReply {
    fn fail(status: u32, message: impl Into<String>) -> TssReply {
        TssReply {
            status,
            message: message.into(),
            ticket: None,
            ticket_key: String::new(),
        }
    }

    pub(super) fn malformed(why: impl std::fmt::Display) -> TssReply {
        TssReply::fail(100, format!("Malformed request: {why}"))
    }

    pub(super) fn not_eligible() -> TssReply {
        TssReply::fail(94, "This device isn't eligible for the requested build.")
    }

    /// `STATUS=…&MESSAGE=…[&REQUEST_STRING=<plist>]`, as Apple's body looks (§4.1).
    pub fn body(&self) -> Vec<u8> {
        let mut out = format!("STATUS={}&MESSAGE={}", self.status, self.message).into_bytes();
        if let Some(t) = &self.ticket {
            let mut d = Dictionary::new();
            d.insert(self.ticket_key.clone(), Value::Data(t.clone()));
            let mut xml = Vec::new();
            // Writing a dictionary of data into a Vec cannot fail.
            if plist::to_writer_xml(&mut xml, &Value::Dictionary(d)).is_ok() {
                out.extend_from_slice(b"&REQUEST_STRING=");
                out.extend_from_slice(&xml);
            }
        }
        out
    }
}

/// Fault knobs, changeable while the server runs.
#[derive(Debug, Default)]
pub struct TssFaults {
    /// Drop the connection without an answer for the next N requests.
    pub drop_next: AtomicU32,
    /// Answer every request with STATUS=94.
    pub always_94: AtomicBool,
    /// Answer every request with HTTP 500.
    pub http_500: AtomicBool,
}

/// The running service's shared state.
#[derive(Debug)]
pub struct TssService {
    pub config: TssConfig,
    pub faults: TssFaults,
    requests: AtomicU64,
    last_request: Mutex<Option<Dictionary>>,
}

pub(super) fn uint(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::Integer(i) => i.as_unsigned(),
        Value::String(s) => {
            let s = s.trim();
            match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => s.parse().ok(),
            }
        }
        _ => None,
    }
}

/// The request's mode parameters, as the rule conditions read them (§4.5).
pub(super) struct Modes {
    pub(super) production: bool,
    pub(super) security: bool,
}

impl Modes {
    /// A checked component's ticket entry: EPRO/ESEC as the manifest's rules gave them
    /// (`expect`), else these modes.
    pub(super) fn component(
        &self,
        fourcc: FourCc,
        digest: Option<&[u8]>,
        expect: &Dictionary,
        trusted: Option<bool>,
    ) -> ComponentEntry {
        let rule = |k: &str| expect.get(k).and_then(Value::as_boolean);
        ComponentEntry {
            fourcc,
            digest: digest.unwrap_or_default().to_vec(),
            epro: rule("EPRO").unwrap_or(self.production),
            esec: rule("ESEC").unwrap_or(self.security),
            ekey: trusted,
        }
    }

    fn param(&self, condition: &str) -> Option<Value> {
        match condition {
            "ApRawProductionMode" | "ApCurrentProductionMode" => {
                Some(Value::Boolean(self.production))
            }
            "ApRawSecurityMode" => Some(Value::Boolean(self.security)),
            // `@ApImg4Ticket` = true is checked before rules apply.
            "ApRequiresImage4" => Some(Value::Boolean(true)),
            // DemotionPolicy and ApInRomDFU are never part of a host's request.
            _ => None,
        }
    }

    /// The boolean keys (`EPRO`, `ESEC` …) an entry must carry. `defaults`: entries without
    /// rules get EPRO/ESEC from the modes (main request only).
    pub(super) fn expected(&self, info: Option<&Dictionary>, defaults: bool) -> Dictionary {
        let mut out = Dictionary::new();
        match info
            .and_then(|i| i.get("RestoreRequestRules"))
            .and_then(Value::as_array)
        {
            Some(rules) => {
                for rule in rules.iter().filter_map(Value::as_dictionary) {
                    let fulfilled = rule
                        .get("Conditions")
                        .and_then(Value::as_dictionary)
                        .is_some_and(|c| {
                            c.iter()
                                .all(|(k, v)| self.param(k).is_some_and(|p| &p == v))
                        });
                    if !fulfilled {
                        continue;
                    }
                    if let Some(actions) = rule.get("Actions").and_then(Value::as_dictionary) {
                        for (k, v) in actions {
                            if let Some(b) = v.as_boolean() {
                                out.insert(k.clone(), Value::Boolean(b));
                            }
                        }
                    }
                }
            }
            None if defaults => {
                out.insert("EPRO".into(), Value::Boolean(self.production));
                out.insert("ESEC".into(), Value::Boolean(self.security));
            }
            None => {}
        }
        out
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Main,
    RecoveryRoot,
}

/// Manifest entries a request of `kind` must carry (§4.5, §4.7).
fn required(manifest: &Dictionary, kind: Kind) -> Vec<&str> {
    manifest
        .iter()
        .filter(|(name, entry)| {
            let Some(info) = entry
                .as_dictionary()
                .and_then(|e| e.get("Info"))
                .and_then(Value::as_dictionary)
            else {
                return false;
            };
            if ALWAYS_SKIPPED.contains(&name.as_str()) {
                return false;
            }
            match kind {
                Kind::Main => {
                    let ftab = info.get("IsFTAB").and_then(Value::as_boolean) == Some(true);
                    let rules = info.contains_key("RestoreRequestRules");
                    let trusted = entry
                        .as_dictionary()
                        .and_then(|e| e.get("Trusted"))
                        .and_then(Value::as_boolean)
                        == Some(true);
                    !ftab && (rules || trusted)
                }
                Kind::RecoveryRoot => !RECOVERY_SKIPPED.contains(&name.as_str()),
            }
        })
        .map(|(n, _)| n.as_str())
        .collect()
}

impl TssService {
    pub fn new(config: TssConfig) -> TssService {
        TssService {
            config,
            faults: TssFaults::default(),
            requests: AtomicU64::new(0),
            last_request: Mutex::new(None),
        }
    }

    /// Requests received over HTTP (including faulted ones).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The last well-formed request dictionary received.
    pub fn last_request(&self) -> Option<Dictionary> {
        self.last_request.lock().ok().and_then(|g| g.clone())
    }

    /// Decide on one request body.
    pub fn evaluate(&self, body: &[u8]) -> TssReply {
        let req = match Value::from_reader_xml(body) {
            Ok(Value::Dictionary(d)) => d,
            Ok(_) => return TssReply::malformed("the body is not a plist dictionary"),
            Err(e) => return TssReply::malformed(format!("the body is not an XML plist: {e}")),
        };
        if let Ok(mut g) = self.last_request.lock() {
            *g = Some(req.clone());
        }
        if let Some(key) = tss_updater::requested_ticket(&req) {
            return match tss_updater::evaluate(&self.config, &req, &key) {
                Ok(t) => TssReply {
                    status: 0,
                    message: "SUCCESS".into(),
                    ticket: Some(t),
                    ticket_key: key,
                },
                Err(r) => r,
            };
        }
        match self.evaluate_dict(&req) {
            Ok(t) => TssReply {
                status: 0,
                message: "SUCCESS".into(),
                ticket: Some(t),
                ticket_key: "ApImg4Ticket".into(),
            },
            Err(r) => r,
        }
    }

    /// The scenario's ECID allow-list (a Mac Apple would refuse), for every kind of request.
    fn check_ecid(&self, ecid: u64) -> Result<(), TssReply> {
        match &self.config.ecid_allow {
            Some(allow) if !allow.contains(&ecid) => {
                tracing::info!("TSS: ECID {ecid:#x} is not allowed");
                Err(TssReply::not_eligible())
            }
            _ => Ok(()),
        }
    }

    fn evaluate_dict(&self, req: &Dictionary) -> Result<Vec<u8>, TssReply> {
        fn local_policy_request(req: &Dictionary) -> bool {
            req.contains_key("Ap,LocalPolicy")
        }
        let get_bool = |k: &str| match req.get(k) {
            Some(Value::Boolean(b)) => Ok(*b),
            Some(_) => Err(TssReply::malformed(format!("{k} is not a boolean"))),
            None => Err(TssReply::malformed(format!("{k} is missing"))),
        };
        let get_uint = |k: &str| match req.get(k) {
            Some(Value::Integer(i)) => i
                .as_unsigned()
                .ok_or_else(|| TssReply::malformed(format!("{k} is negative"))),
            Some(_) => Err(TssReply::malformed(format!("{k} is not an integer"))),
            None => Err(TssReply::malformed(format!("{k} is missing"))),
        };
        let get_data = |k: &str| match req.get(k) {
            Some(Value::Data(d)) => Ok(d.clone()),
            Some(_) => Err(TssReply::malformed(format!("{k} is not data"))),
            None => Err(TssReply::malformed(format!("{k} is missing"))),
        };
        for k in ["@HostPlatformInfo", "@VersionInfo", "@UUID"] {
            match req.get(k) {
                Some(Value::String(_)) => {}
                Some(_) => return Err(TssReply::malformed(format!("{k} is not a string"))),
                None => return Err(TssReply::malformed(format!("{k} is missing"))),
            }
        }
        if !get_bool("@ApImg4Ticket")? {
            return Err(TssReply::malformed("@ApImg4Ticket is false"));
        }
        let ecid = get_uint("ApECID")?;
        let chip = get_uint("ApChipID")?;
        let board = get_uint("ApBoardID")?;
        let sdom = get_uint("ApSecurityDomain")?;
        // protocol.md §4.6/§4.8: local-policy requests carry no manifest parameters, so they
        // name no build; they are bound to the main ticket by Ap,NextStageIM4MHash instead.
        let ubid = if local_policy_request(req) && !req.contains_key("UniqueBuildID") {
            None
        } else {
            Some(get_data("UniqueBuildID")?)
        };
        let modes = Modes {
            production: get_bool("ApProductionMode")?,
            security: get_bool("ApSecurityMode")?,
        };
        let local_policy = req.contains_key("Ap,LocalPolicy");
        let local_boot = match req.get("Ap,LocalBoot") {
            None if !local_policy => false,
            _ => get_bool("Ap,LocalBoot")?,
        };
        let ap_nonce = if local_policy && local_boot {
            None
        } else {
            Some(get_data("ApNonce")?)
        };
        let sep_nonce = match req.get("SepNonce").or_else(|| req.get("ApSepNonce")) {
            Some(Value::Data(d)) => Some(d.clone()),
            Some(_) => return Err(TssReply::malformed("SepNonce is not data")),
            None => None,
        };

        let mut spec = TicketSpec {
            chip: chip as u32,
            board: board as u32,
            ecid,
            security_domain: sdom as u32,
            production: modes.production,
            security: modes.security,
            ap_nonce,
            sep_nonce,
            extra: Vec::new(),
            components: Vec::new(),
        };
        let Some(ubid) = ubid else {
            self.check_ecid(ecid)?;
            local_policy_ticket(req, local_boot, &mut spec)?;
            return Ok(ticket::sign_im4m(&spec));
        };
        // The build and identity.
        let mut found = None;
        for m in &self.config.manifests {
            let ids = m.get("BuildIdentities").and_then(Value::as_array);
            for id in ids.into_iter().flatten().filter_map(Value::as_dictionary) {
                if id.get("UniqueBuildID").and_then(Value::as_data) != Some(ubid.as_slice()) {
                    continue;
                }
                if uint(id.get("ApChipID")) == Some(chip)
                    && uint(id.get("ApBoardID")) == Some(board)
                    && uint(id.get("ApSecurityDomain")) == Some(sdom)
                {
                    found = Some((m, id));
                }
            }
        }
        let (build, identity) = found.ok_or_else(|| {
            tracing::info!(
                "TSS: unknown build {} for chip {chip:#x} board {board:#x}",
                hex::encode(&ubid)
            );
            TssReply::not_eligible()
        })?;
        let build_number = build
            .get("ProductBuildVersion")
            .and_then(Value::as_string)
            .unwrap_or_default();
        if let Some(signed) = &self.config.signed_builds {
            if !signed.contains(build_number) {
                tracing::info!("TSS: build {build_number} is not signed");
                return Err(TssReply::not_eligible());
            }
        }
        self.check_ecid(ecid)?;
        if local_policy {
            local_policy_ticket(req, local_boot, &mut spec)?;
            return Ok(ticket::sign_im4m(&spec));
        }

        let manifest = identity
            .get("Manifest")
            .and_then(Value::as_dictionary)
            .ok_or_else(|| TssReply::fail(126, "Internal error: identity has no Manifest"))?;
        let kind = if ["iBSS", "iBEC", "LLB"].iter().any(|k| req.contains_key(k)) {
            Kind::Main
        } else {
            Kind::RecoveryRoot
        };
        for name in required(manifest, kind) {
            if !req.contains_key(name) {
                return Err(TssReply::malformed(format!(
                    "required component {name} is missing"
                )));
            }
        }
        let mut seen = HashSet::new();
        for (name, entry) in manifest {
            let Some(got) = req.get(name) else { continue };
            let got = got
                .as_dictionary()
                .ok_or_else(|| TssReply::malformed(format!("{name} is not a dictionary")))?;
            let entry = entry.as_dictionary();
            let info = entry
                .and_then(|e| e.get("Info"))
                .and_then(Value::as_dictionary);
            let want_digest = entry.and_then(|e| e.get("Digest")).and_then(Value::as_data);
            let got_digest = match got.get("Digest") {
                Some(Value::Data(d)) => Some(d.as_slice()),
                Some(_) => return Err(TssReply::malformed(format!("{name}.Digest is not data"))),
                None => None,
            };
            let trusted = entry
                .and_then(|e| e.get("Trusted"))
                .and_then(Value::as_boolean);
            match (want_digest, got_digest) {
                (Some(w), Some(g)) if w == g => {}
                (Some(_), Some(_)) => {
                    tracing::info!("TSS: digest of {name} does not match build {build_number}");
                    return Err(TssReply::not_eligible());
                }
                (Some(_), None) => {
                    return Err(TssReply::malformed(format!("{name} has no Digest")))
                }
                // Trusted without a manifest digest: an empty Digest is sent (§4.5).
                (None, Some([])) | (None, None) => {}
                (None, Some(_)) => {
                    tracing::info!("TSS: {name} has a digest the build does not have");
                    return Err(TssReply::not_eligible());
                }
            }
            if got.get("Trusted").and_then(Value::as_boolean) != trusted {
                return Err(TssReply::malformed(format!(
                    "{name}.Trusted does not match the manifest"
                )));
            }
            let expect = modes.expected(info, kind == Kind::Main);
            for k in RULE_KEYS {
                if got.get(k) != expect.get(k) {
                    return Err(TssReply::malformed(format!(
                        "{name}.{k} is {:?}, the manifest's RestoreRequestRules give {:?}",
                        got.get(k).and_then(Value::as_boolean),
                        expect.get(k).and_then(Value::as_boolean)
                    )));
                }
            }
            if got.contains_key("Info") {
                return Err(TssReply::malformed(format!(
                    "{name} still carries Info (it must be removed)"
                )));
            }
            let fourcc = fourcc_for(
                name,
                info.and_then(|i| i.get("Img4PayloadType"))
                    .and_then(Value::as_string),
            );
            if !seen.insert(fourcc) {
                continue;
            }
            spec.components
                .push(modes.component(fourcc, got_digest, &expect, trusted));
        }
        Ok(ticket::sign_im4m(&spec))
    }

    /// Serve on `addr` (HTTP, or HTTPS with `tls`). Must be called inside a tokio runtime.
    pub async fn start(
        self: &Arc<Self>,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> io::Result<Server> {
        let me = Arc::clone(self);
        Server::start(
            addr,
            tls,
            handler(move |req, resp| {
                let me = Arc::clone(&me);
                async move { me.serve(req, resp).await }
            }),
        )
        .await
    }

    async fn serve(&self, req: Request, resp: Responder) -> io::Result<()> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let text = [("Content-Type", "text/html; charset=utf-8".to_string())];
        let dropping = self
            .faults
            .drop_next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if dropping {
            tracing::info!("TSS fault: dropping the connection");
            resp.abort();
            return Ok(());
        }
        if self.faults.http_500.load(Ordering::Relaxed) {
            return resp.send(500, &text, b"Internal Server Error").await;
        }
        if req.method != "POST" || req.path != "/TSS/controller" {
            return resp.send(404, &text, b"Not Found").await;
        }
        if !req.query.split('&').any(|p| p == "action=2") {
            return resp
                .send(200, &text, &TssReply::malformed("action must be 2").body())
                .await;
        }
        let reply = if self.faults.always_94.load(Ordering::Relaxed) {
            TssReply::not_eligible()
        } else {
            self.evaluate(&req.body)
        };
        tracing::info!("TSS: STATUS={} {}", reply.status, reply.message);
        resp.send(200, &text, &reply.body()).await
    }
}

fn local_policy_ticket(
    req: &Dictionary,
    local_boot: bool,
    spec: &mut TicketSpec,
) -> Result<(), TssReply> {
    let lp = req
        .get("Ap,LocalPolicy")
        .and_then(Value::as_dictionary)
        .ok_or_else(|| TssReply::malformed("Ap,LocalPolicy is not a dictionary"))?;
    let want = ticket::sha384(&LPOL_IM4P);
    if lp.get("Digest").and_then(Value::as_data) != Some(want.as_slice()) {
        return Err(TssReply::malformed(
            "Ap,LocalPolicy.Digest is not SHA-384 of the local-policy IM4P",
        ));
    }
    if lp.get("Trusted").and_then(Value::as_boolean) != Some(true) {
        return Err(TssReply::malformed("Ap,LocalPolicy.Trusted is not true"));
    }
    let data = |k: &str| match req.get(k) {
        Some(Value::Data(d)) => Ok(d.clone()),
        Some(_) => Err(TssReply::malformed(format!("{k} is not data"))),
        None => Err(TssReply::malformed(format!("{k} is missing"))),
    };
    let nsih = data("Ap,NextStageIM4MHash")?;
    if nsih.len() != 48 {
        return Err(TssReply::malformed(
            "Ap,NextStageIM4MHash is not a SHA-384 hash",
        ));
    }
    let cc = |s: &[u8; 4]| FourCc(*s);
    spec.extra
        .push((cc(b"lobo"), PropValue::Boolean(local_boot)));
    spec.extra.push((cc(b"nsih"), PropValue::Data(nsih)));
    if local_boot {
        let ronh = data("Ap,RecoveryOSPolicyNonceHash")?;
        let vuid = data("Ap,VolumeUUID")?;
        if vuid.len() != 16 {
            return Err(TssReply::malformed("Ap,VolumeUUID is not 16 bytes"));
        }
        spec.extra.push((cc(b"ronh"), PropValue::Data(ronh)));
        spec.extra.push((cc(b"vuid"), PropValue::Data(vuid)));
    }
    spec.components.push(ComponentEntry {
        fourcc: cc(b"lpol"),
        digest: want,
        epro: spec.production,
        esec: spec.security,
        ekey: Some(true),
    });
    Ok(())
}

/// Split a TSS response body into STATUS, MESSAGE and the plist (for tests and tools).
pub fn parse_reply_body(body: &[u8]) -> Option<(u32, String, Option<Dictionary>)> {
    let text = std::str::from_utf8(body).ok()?;
    let rest = text.strip_prefix("STATUS=")?;
    let (status, rest) = rest.split_once('&')?;
    let rest = rest.strip_prefix("MESSAGE=")?;
    let (message, plist) = match rest.split_once("&REQUEST_STRING=") {
        Some((m, p)) => (
            m,
            Value::from_reader_xml(p.as_bytes())
                .ok()
                .and_then(Value::into_dictionary),
        ),
        None => (rest, None),
    };
    Some((status.parse().ok()?, message.to_string(), plist))
}
