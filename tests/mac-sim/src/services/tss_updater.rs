//! The simulated TSS's side of firmware-updater requests (protocol.md §4.9): a request that
//! asks for `@<X>,Ticket` (with `@BBTicket`) instead of `@ApImg4Ticket`. Implemented from the
//! notes alone, like the rest of the simulator.
//!
//! Supported coprocessors and what must be present (else STATUS 100), by request key:
//! * `Timer` (USB-C retimers, tag N): `Timer,{ChipID,BoardID,ECID,SecurityDomain},N` integers,
//!   `Timer,Nonce,N` data, `Timer,{SecurityMode,ProductionMode},N` booleans;
//! * `Baobab` (TCON): `Baobab,{ChipID,BoardID,ManifestEpoch,SecurityDomain}` integers,
//!   `Baobab,ECID` and `Baobab,UpdateNonce` data, `Baobab,ProductionMode` boolean;
//! * `BMU`: `BMU,{BoardID,ChipID,UniqueID}` integers, `BMU,Nonce` data, `BMU,ProductionMode`;
//! * `Rap` (Rose): `Rap,{BoardID,ChipID,ECID,SecurityDomain}` integers, `Rap,Nonce` data,
//!   `Rap,{ProductionMode,SecurityMode}` booleans.
//!
//! The build is the identity (of any configured BuildManifest) whose `<X>,*` components are
//! all in the request with the manifest's Digest, and whose identity-level `<X>,ChipID[,N]`
//! (when it has one) equals the request's. A missing component is 100; a digest of another
//! build, or no such identity at all, is 94. Entries must have `Info` removed; `Timer`, `Rap`
//! and `BMU` entries carry the EPRO/ESEC their RestoreRequestRules give for a production,
//! secure AP; `Baobab` entries carry `EPRO` = `Baobab,ProductionMode`.
//!
//! The ticket is an IM4M signed with the test key: CHIP/BORD/ECID/SDOM of the coprocessor,
//! `BNCH` = its nonce, one object per `<X>,*` component.

use std::collections::HashSet;

use plist::{Dictionary, Value};

use super::tss::{uint, Modes, TssConfig, TssReply};
use crate::images::fourcc_for;
use crate::ticket::{self, ComponentEntry, TicketSpec};

/// The `<X>,Ticket` a request asks for, if it is a firmware-updater request.
pub fn requested_ticket(req: &Dictionary) -> Option<String> {
    req.iter()
        .filter(|(_, v)| v.as_boolean() == Some(true))
        .find_map(|(k, _)| {
            let name = k.strip_prefix('@')?;
            name.ends_with(",Ticket").then(|| name.to_string())
        })
}

/// The coprocessor parameters of one request, read per the module documentation.
struct Coprocessor {
    chip: u64,
    board: u64,
    ecid: u64,
    security_domain: u64,
    nonce: Vec<u8>,
    production: bool,
    security: bool,
    /// `<X>,ChipID[,N]`: the identity-level key that must match the request's chip.
    chip_key: String,
}

fn get<'a>(req: &'a Dictionary, k: &str) -> Result<&'a Value, TssReply> {
    req.get(k)
        .ok_or_else(|| TssReply::malformed(format!("{k} is missing")))
}

fn int(req: &Dictionary, k: &str) -> Result<u64, TssReply> {
    match get(req, k)? {
        Value::Integer(i) => i
            .as_unsigned()
            .ok_or_else(|| TssReply::malformed(format!("{k} is negative"))),
        _ => Err(TssReply::malformed(format!("{k} is not an integer"))),
    }
}

fn data(req: &Dictionary, k: &str) -> Result<Vec<u8>, TssReply> {
    match get(req, k)? {
        Value::Data(d) if !d.is_empty() => Ok(d.clone()),
        Value::Data(_) => Err(TssReply::malformed(format!("{k} is empty"))),
        _ => Err(TssReply::malformed(format!("{k} is not data"))),
    }
}

fn boolean(req: &Dictionary, k: &str) -> Result<bool, TssReply> {
    match get(req, k)? {
        Value::Boolean(b) => Ok(*b),
        _ => Err(TssReply::malformed(format!("{k} is not a boolean"))),
    }
}

fn coprocessor(req: &Dictionary, prefix: &str) -> Result<Coprocessor, TssReply> {
    match prefix {
        "Timer" => {
            // The tag N comes from the request's own keys; exactly one retimer per request.
            let tags: HashSet<&str> = req
                .keys()
                .filter_map(|k| k.strip_prefix("Timer,ECID,"))
                .collect();
            let tag = match tags.len() {
                1 => tags.into_iter().next().unwrap_or_default().to_string(),
                0 => return Err(TssReply::malformed("Timer,ECID,<tag> is missing")),
                _ => return Err(TssReply::malformed("more than one Timer,ECID,<tag>")),
            };
            let k = |w: &str| format!("Timer,{w},{tag}");
            Ok(Coprocessor {
                chip: int(req, &k("ChipID"))?,
                board: int(req, &k("BoardID"))?,
                ecid: int(req, &k("ECID"))?,
                security_domain: int(req, &k("SecurityDomain"))?,
                nonce: data(req, &k("Nonce"))?,
                production: boolean(req, &k("ProductionMode"))?,
                security: boolean(req, &k("SecurityMode"))?,
                chip_key: k("ChipID"),
            })
        }
        "Baobab" => {
            let ecid = data(req, "Baobab,ECID")?;
            int(req, "Baobab,ManifestEpoch")?;
            Ok(Coprocessor {
                chip: int(req, "Baobab,ChipID")?,
                board: int(req, "Baobab,BoardID")?,
                // The TCON's ECID is data; the ticket carries its low 8 bytes, big-endian.
                ecid: ecid
                    .iter()
                    .rev()
                    .take(8)
                    .rev()
                    .fold(0, |a, &b| (a << 8) | u64::from(b)),
                security_domain: int(req, "Baobab,SecurityDomain")?,
                nonce: data(req, "Baobab,UpdateNonce")?,
                production: boolean(req, "Baobab,ProductionMode")?,
                security: true,
                chip_key: "Baobab,ChipID".into(),
            })
        }
        "BMU" => Ok(Coprocessor {
            chip: int(req, "BMU,ChipID")?,
            board: int(req, "BMU,BoardID")?,
            ecid: int(req, "BMU,UniqueID")?,
            security_domain: 1,
            nonce: data(req, "BMU,Nonce")?,
            production: boolean(req, "BMU,ProductionMode")?,
            security: true,
            chip_key: "BMU,ChipID".into(),
        }),
        "Rap" => Ok(Coprocessor {
            chip: int(req, "Rap,ChipID")?,
            board: int(req, "Rap,BoardID")?,
            ecid: int(req, "Rap,ECID")?,
            security_domain: int(req, "Rap,SecurityDomain")?,
            nonce: data(req, "Rap,Nonce")?,
            production: boolean(req, "Rap,ProductionMode")?,
            security: boolean(req, "Rap,SecurityMode")?,
            chip_key: "Rap,ChipID".into(),
        }),
        other => Err(TssReply::malformed(format!(
            "the simulated TSS does not sign {other},Ticket"
        ))),
    }
}

/// Check one `<X>,*` entry of the request against the manifest's and return the ticket
/// object for it.
fn check_entry(
    prefix: &str,
    name: &str,
    want: &Dictionary,
    got: &Value,
    cop: &Coprocessor,
) -> Result<ComponentEntry, TssReply> {
    let got = got
        .as_dictionary()
        .ok_or_else(|| TssReply::malformed(format!("{name} is not a dictionary")))?;
    if got.contains_key("Info") {
        return Err(TssReply::malformed(format!(
            "{name} still carries Info (it must be removed)"
        )));
    }
    let want_digest = want.get("Digest").and_then(Value::as_data);
    let got_digest = match got.get("Digest") {
        Some(Value::Data(d)) => Some(d.as_slice()),
        Some(_) => return Err(TssReply::malformed(format!("{name}.Digest is not data"))),
        None => None,
    };
    match (want_digest, got_digest) {
        (Some(w), Some(g)) if w == g => {}
        (Some(_), Some(_)) => {
            tracing::info!("TSS: digest of {name} is not this build's");
            return Err(TssReply::not_eligible());
        }
        (Some(_), None) => return Err(TssReply::malformed(format!("{name} has no Digest"))),
        (None, Some([])) | (None, None) => {}
        (None, Some(_)) => return Err(TssReply::not_eligible()),
    }
    let info = want.get("Info").and_then(Value::as_dictionary);
    let expect = if prefix == "Baobab" {
        let mut d = Dictionary::new();
        d.insert("EPRO".into(), Value::Boolean(cop.production));
        d
    } else {
        // §4.9: retimer, Rose and BMU rules are evaluated for a production, secure AP.
        Modes {
            production: true,
            security: true,
        }
        .expected(info, false)
    };
    for k in ["EPRO", "ESEC"] {
        if got.get(k) != expect.get(k) {
            return Err(TssReply::malformed(format!(
                "{name}.{k} is {:?}, expected {:?}",
                got.get(k).and_then(Value::as_boolean),
                expect.get(k).and_then(Value::as_boolean)
            )));
        }
    }
    let trusted = want.get("Trusted").and_then(Value::as_boolean);
    if got.get("Trusted").and_then(Value::as_boolean) != trusted {
        return Err(TssReply::malformed(format!(
            "{name}.Trusted does not match the manifest"
        )));
    }
    let modes = Modes {
        production: cop.production,
        security: cop.security,
    };
    Ok(modes.component(fourcc_for(name, None), got_digest, &expect, trusted))
}

/// The ticket objects when `identity` is the request's build, else why not.
fn match_identity(
    req: &Dictionary,
    identity: &Dictionary,
    prefix: &str,
    cop: &Coprocessor,
) -> Option<Result<Vec<ComponentEntry>, TssReply>> {
    let manifest = identity.get("Manifest")?.as_dictionary()?;
    let entries: Vec<(&String, &Dictionary)> = manifest
        .iter()
        .filter(|(n, _)| n.starts_with(&format!("{prefix},")))
        .filter_map(|(n, e)| Some((n, e.as_dictionary()?)))
        .collect();
    if entries.is_empty() {
        return None;
    }
    if let Some(chip) = identity.get(&cop.chip_key) {
        if uint(Some(chip)) != Some(cop.chip) {
            return None;
        }
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (name, want) in entries {
        let Some(got) = req.get(name.as_str()) else {
            return Some(Err(TssReply::malformed(format!(
                "required component {name} is missing"
            ))));
        };
        match check_entry(prefix, name, want, got, cop) {
            Ok(c) => {
                if seen.insert(c.fourcc) {
                    out.push(c);
                }
            }
            Err(e) => return Some(Err(e)),
        }
    }
    Some(Ok(out))
}

/// Decide on a firmware-updater request asking for `ticket_key`; the signed IM4M on success.
pub fn evaluate(
    config: &TssConfig,
    req: &Dictionary,
    ticket_key: &str,
) -> Result<Vec<u8>, TssReply> {
    for k in ["@HostPlatformInfo", "@VersionInfo", "@UUID"] {
        match req.get(k) {
            Some(Value::String(_)) => {}
            _ => {
                return Err(TssReply::malformed(format!(
                    "{k} is missing or not a string"
                )))
            }
        }
    }
    if req.get("@BBTicket").and_then(Value::as_boolean) != Some(true) {
        return Err(TssReply::malformed("@BBTicket is not true"));
    }
    let prefix = ticket_key.strip_suffix(",Ticket").unwrap_or(ticket_key);
    let cop = coprocessor(req, prefix)?;
    if let Some(allow) = &config.ecid_allow {
        if !allow.contains(&cop.ecid) {
            tracing::info!("TSS: {prefix} ECID {:#x} is not allowed", cop.ecid);
            return Err(TssReply::not_eligible());
        }
    }
    let mut first_error = None;
    for m in &config.manifests {
        let build = m
            .get("ProductBuildVersion")
            .and_then(Value::as_string)
            .unwrap_or_default();
        if let Some(signed) = &config.signed_builds {
            if !signed.contains(build) {
                continue;
            }
        }
        let ids = m.get("BuildIdentities").and_then(Value::as_array);
        for id in ids.into_iter().flatten().filter_map(Value::as_dictionary) {
            match match_identity(req, id, prefix, &cop) {
                Some(Ok(components)) => {
                    tracing::info!("TSS: signing {ticket_key} for build {build}");
                    return Ok(ticket::sign_im4m(&TicketSpec {
                        chip: cop.chip as u32,
                        board: cop.board as u32,
                        ecid: cop.ecid,
                        security_domain: cop.security_domain as u32,
                        production: cop.production,
                        security: cop.security,
                        ap_nonce: Some(cop.nonce.clone()),
                        sep_nonce: None,
                        extra: Vec::new(),
                        components,
                    }));
                }
                Some(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                None => {}
            }
        }
    }
    Err(first_error.unwrap_or_else(|| {
        tracing::info!(
            "TSS: no known build has {prefix} firmware for chip {:#x}",
            cop.chip
        );
        TssReply::not_eligible()
    }))
}
