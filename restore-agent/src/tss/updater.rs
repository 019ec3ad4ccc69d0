//! Firmware-updater TSS requests made during restore (DataType `FirmwareUpdaterData`,
//! protocol.md §4.9): restored names a coprocessor (`MessageArgUpdaterName`) and reports its
//! identifiers (`MessageArgInfo`); we ask Apple for that coprocessor's ticket and answer with
//! the ticket plus, when asked, the firmware bytes it needs.
//!
//! Sans-IO in two steps: [`updater_request`] turns the arguments and the build identity into
//! an [`UpdaterPlan`] (the request dictionary, the ticket to expect, the firmware to attach);
//! the caller posts the request and reads the plan's component files, and
//! [`firmware_response`] assembles `FirmwareResponseData` from the answer and those files.

use std::collections::BTreeMap;
use std::io::Cursor;

use plist::{Dictionary, Value};

use super::params::{coerce_uint, IdentityParams, RequestUuid};
use super::request::new_request;
use super::rules::{self, apply_restore_request_rules_from, remove_keeping_order};
use super::{TssError, TssResponse};
use crate::ftab::{tag_text, Ftab};

/// What restored sent with a `FirmwareUpdaterData` request, checked for shape.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdaterArgs {
    /// `MessageArgUpdaterName` (`AppleTypeCRetimer`, `AppleTCON`, `T200`, …).
    pub name: String,
    /// `MessageArgInfo`: the coprocessor's identifiers.
    pub info: Dictionary,
    /// `DeviceGeneratedRequest`: keys the device wants in the request verbatim.
    pub device_request: Option<Dictionary>,
    /// `DeviceGeneratedTags.ResponseTags`.
    pub response_tags: Vec<String>,
    /// `DeviceGeneratedTags.BuildIdentityTags` (Cryptex1).
    pub build_identity_tags: Vec<String>,
}

fn bad_args(updater: &str, what: impl Into<String>) -> TssError {
    TssError::UpdaterArguments {
        updater: updater.to_string(),
        what: what.into(),
    }
}

fn cannot_build(updater: &str, what: impl Into<String>) -> TssError {
    TssError::UpdaterRequest {
        updater: updater.to_string(),
        what: what.into(),
    }
}

fn strings(updater: &str, v: Option<&Value>, key: &str) -> Result<Vec<String>, TssError> {
    match v {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_string()
                    .map(str::to_string)
                    .ok_or_else(|| bad_args(updater, format!("{key} holds a non-string")))
            })
            .collect(),
        Some(_) => Err(bad_args(updater, format!("{key} is not an array"))),
    }
}

impl UpdaterArgs {
    /// Check the `Arguments` dictionary of a `FirmwareUpdaterData` request (untrusted device
    /// input: never panics).
    pub fn parse(arguments: &Dictionary) -> Result<UpdaterArgs, TssError> {
        let name = match arguments.get("MessageArgUpdaterName") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(bad_args(
                    "an unnamed updater",
                    "MessageArgUpdaterName is not a string",
                ))
            }
            None => {
                return Err(bad_args(
                    "an unnamed updater",
                    "MessageArgUpdaterName is missing",
                ))
            }
        };
        match arguments.get("MessageArgType") {
            Some(Value::String(s)) if s == "FirmwareResponseData" => {}
            Some(Value::String(s)) => {
                return Err(bad_args(
                    &name,
                    format!("MessageArgType is {s:?}, not \"FirmwareResponseData\""),
                ))
            }
            Some(_) => return Err(bad_args(&name, "MessageArgType is not a string")),
            None => return Err(bad_args(&name, "MessageArgType is missing")),
        }
        let info = match arguments.get("MessageArgInfo") {
            Some(Value::Dictionary(d)) => d.clone(),
            Some(_) => return Err(bad_args(&name, "MessageArgInfo is not a dictionary")),
            None => return Err(bad_args(&name, "MessageArgInfo is missing")),
        };
        let device_request = match arguments.get("DeviceGeneratedRequest") {
            Some(Value::Dictionary(d)) => Some(d.clone()),
            Some(_) => {
                return Err(bad_args(
                    &name,
                    "DeviceGeneratedRequest is not a dictionary",
                ))
            }
            None => None,
        };
        let (response_tags, build_identity_tags) = match arguments.get("DeviceGeneratedTags") {
            Some(Value::Dictionary(t)) => (
                strings(
                    &name,
                    t.get("ResponseTags"),
                    "DeviceGeneratedTags.ResponseTags",
                )?,
                strings(
                    &name,
                    t.get("BuildIdentityTags"),
                    "DeviceGeneratedTags.BuildIdentityTags",
                )?,
            ),
            Some(_) => return Err(bad_args(&name, "DeviceGeneratedTags is not a dictionary")),
            None => (Vec::new(), Vec::new()),
        };
        Ok(UpdaterArgs {
            name,
            info,
            device_request,
            response_tags,
            build_identity_tags,
        })
    }

    /// Whether the device asked for firmware bytes (`FirmwareData` in `ResponseTags`).
    pub fn wants_firmware_data(&self) -> bool {
        self.response_tags.iter().any(|t| t == "FirmwareData")
    }
}

/// Which request builder an updater name selects (§4.9 table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdaterKind {
    /// `AppleTypeCRetimer`: USB-C retimers (`Timer,*`).
    Timer,
    /// `AppleTCON`: the display's timing controller (`Baobab,*`).
    Tcon,
    /// `T200`: battery management, "Veridian" (`BMU,*`).
    Veridian,
    /// `Rose`: ultra-wideband (`Rap,*`).
    Rose,
    /// `SE`: the secure element.
    Se,
    /// `Savage`: the Face ID sensor.
    Savage,
    /// `Savage` with `YonkersDeviceInfo`.
    Yonkers,
    /// `Cryptex1`, `Cryptex1LocalPolicy`.
    Cryptex1,
    /// `Ace3`, `PS190`, `Centauri`, `Vinyl`, Jasmine and any name we do not know: the device's
    /// own request, as is.
    Generic,
}

impl UpdaterKind {
    pub fn of(args: &UpdaterArgs) -> UpdaterKind {
        match args.name.as_str() {
            "AppleTypeCRetimer" => UpdaterKind::Timer,
            "AppleTCON" => UpdaterKind::Tcon,
            "T200" => UpdaterKind::Veridian,
            "Rose" => UpdaterKind::Rose,
            "SE" => UpdaterKind::Se,
            "Savage"
                if matches!(
                    args.info.get("YonkersDeviceInfo"),
                    Some(Value::Dictionary(_))
                ) =>
            {
                UpdaterKind::Yonkers
            }
            "Savage"
                if matches!(
                    args.info.get("JasmineIR1DeviceInfo"),
                    Some(Value::Dictionary(_))
                ) =>
            {
                UpdaterKind::Generic
            }
            "Savage" => UpdaterKind::Savage,
            "Cryptex1" | "Cryptex1LocalPolicy" => UpdaterKind::Cryptex1,
            _ => UpdaterKind::Generic,
        }
    }
}

/// The firmware bytes that go with the ticket, by manifest component name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirmwarePlan {
    /// Not requested, or never sent for this updater.
    None,
    /// The component's file as is (`Baobab,TCON`, `SE,Firmware`/`SE,UpdatePayload`).
    Raw { component: String },
    /// The FTAB of `rtkit_os` with the `rrko` entry of `restore_rtkit_os` appended.
    RtkitFtab {
        rtkit_os: String,
        restore_rtkit_os: Option<String>,
    },
    /// The `BMU,FirmwareMap` plist plus `fw_map_digest` = that entry's Digest, as a binary plist.
    BmuFirmwareMap { component: String, digest: Vec<u8> },
    /// The Savage patch behind a 16-byte header carrying its length (LE u32 at offset 4).
    SavagePatch { component: String },
    /// `{YonkersFirmware: <patch>}`.
    YonkersPatch { component: String },
}

impl FirmwarePlan {
    /// The manifest components whose files [`firmware_response`] needs.
    pub fn components(&self) -> Vec<&str> {
        match self {
            FirmwarePlan::None => Vec::new(),
            FirmwarePlan::Raw { component }
            | FirmwarePlan::BmuFirmwareMap { component, .. }
            | FirmwarePlan::SavagePatch { component }
            | FirmwarePlan::YonkersPatch { component } => vec![component],
            FirmwarePlan::RtkitFtab {
                rtkit_os,
                restore_rtkit_os,
            } => std::iter::once(rtkit_os.as_str())
                .chain(restore_rtkit_os.as_deref())
                .collect(),
        }
    }
}

/// One updater request, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdaterPlan {
    /// The updater name as restored sent it (for messages).
    pub updater: String,
    pub kind: UpdaterKind,
    pub request: Dictionary,
    /// The key the ticket comes back under (`Timer,Ticket`, `Baobab,Ticket`, …).
    pub ticket: String,
    pub firmware: FirmwarePlan,
}

/// `Info.Path` of a manifest component of `identity`.
pub fn component_path(identity: &Dictionary, component: &str) -> Option<String> {
    identity
        .get("Manifest")?
        .as_dictionary()?
        .get(component)?
        .as_dictionary()?
        .get("Info")?
        .as_dictionary()?
        .get("Path")?
        .as_string()
        .map(str::to_string)
}

/// Request parameters: the identity's (§4.3) — the whole `Manifest` is kept aside.
fn identity_parameters(identity: &Dictionary) -> Result<(Dictionary, Dictionary), TssError> {
    let id = IdentityParams::from_identity(identity)?;
    Ok((id.values, id.manifest))
}

fn merge(into: &mut Dictionary, from: &Dictionary) {
    for (k, v) in from {
        into.insert(k.clone(), v.clone());
    }
}

#[derive(Clone, Copy)]
enum Ty {
    Uint,
    Data,
    Bool,
}

/// Copy `params[from]` into `req[to]` coerced to `ty` (libplist's `plist_dict_copy_*`): a
/// missing value is left out; a value of the wrong type is an error naming it.
fn copy_typed(
    updater: &str,
    req: &mut Dictionary,
    params: &Dictionary,
    to: &str,
    from: &str,
    ty: Ty,
) -> Result<(), TssError> {
    let Some(v) = params.get(from) else {
        return Ok(());
    };
    let out = match ty {
        Ty::Uint => coerce_uint(v).map(|n| Value::Integer(n.into())),
        Ty::Data => v.as_data().map(|d| Value::Data(d.to_vec())),
        Ty::Bool => match v {
            Value::Boolean(b) => Some(Value::Boolean(*b)),
            other => coerce_uint(other).map(|n| Value::Boolean(n != 0)),
        },
    };
    let want = match ty {
        Ty::Uint => "a number",
        Ty::Data => "data",
        Ty::Bool => "a boolean",
    };
    let out = out.ok_or_else(|| cannot_build(updater, format!("{from} is not {want}")))?;
    req.insert(to.to_string(), out);
    Ok(())
}

fn copy(
    updater: &str,
    req: &mut Dictionary,
    params: &Dictionary,
    key: &str,
    ty: Ty,
) -> Result<(), TssError> {
    copy_typed(updater, req, params, key, key, ty)
}

fn require(updater: &str, req: &Dictionary, keys: &[&str]) -> Result<(), TssError> {
    for key in keys {
        if !req.contains_key(key) {
            return Err(cannot_build(
                updater,
                format!("{key} is missing (neither the Mac's MessageArgInfo nor the build identity has it)"),
            ));
        }
    }
    Ok(())
}

/// A manifest entry as the rule-applying updater builders send it: rules applied against the
/// request parameters, an empty Digest for a Trusted entry without one, `Info` removed.
fn ruled_entry(entry: &Dictionary, params: &Dictionary) -> Dictionary {
    let mut out = entry.clone();
    if let Some(r) = rules::rules(entry) {
        apply_restore_request_rules_from(&mut out, r, params);
    }
    if rules::is_true(entry, "Trusted") && !entry.contains_key("Digest") {
        out.insert("Digest".into(), Value::Data(Vec::new()));
    }
    remove_keeping_order(&mut out, "Info");
    out
}

/// Every manifest entry whose name starts with `prefix`, through `f`.
fn add_entries(
    req: &mut Dictionary,
    manifest: &Dictionary,
    prefix: &str,
    mut f: impl FnMut(&Dictionary) -> Dictionary,
) -> usize {
    let mut n = 0;
    for (name, entry) in manifest {
        if let (true, Some(e)) = (name.starts_with(prefix), entry.as_dictionary()) {
            req.insert(name.clone(), Value::Dictionary(f(e)));
            n += 1;
        }
    }
    n
}

fn ap_modes(params: &mut Dictionary) {
    for key in ["ApProductionMode", "ApSecurityMode", "ApSupportsImg4"] {
        params.insert(key.into(), Value::Boolean(true));
    }
}

fn wants(args: &UpdaterArgs, plan: FirmwarePlan) -> FirmwarePlan {
    if args.wants_firmware_data() {
        plan
    } else {
        FirmwarePlan::None
    }
}

/// Build the TSS request for one `FirmwareUpdaterData` request (§4.9) against the restore's
/// build identity.
pub fn updater_request(
    identity: &Dictionary,
    args: &UpdaterArgs,
    uuid: &RequestUuid,
) -> Result<UpdaterPlan, TssError> {
    let kind = UpdaterKind::of(args);
    let name = args.name.as_str();
    let mut req = new_request(uuid);
    let (ticket, firmware) = match kind {
        UpdaterKind::Timer => timer(identity, args, &mut req)?,
        UpdaterKind::Tcon => tcon(identity, args, &mut req)?,
        UpdaterKind::Veridian => veridian(identity, args, &mut req)?,
        UpdaterKind::Rose => rose(identity, args, &mut req)?,
        UpdaterKind::Se => se(identity, args, &mut req)?,
        UpdaterKind::Savage => savage(identity, args, &mut req)?,
        UpdaterKind::Yonkers => yonkers(identity, args, &mut req)?,
        UpdaterKind::Cryptex1 => cryptex1(identity, args, &mut req)?,
        UpdaterKind::Generic => {
            let ticket = args.response_tags.first().cloned().ok_or_else(|| {
                cannot_build(name, "DeviceGeneratedTags.ResponseTags names no ticket")
            })?;
            let dgr = args.device_request.as_ref().ok_or_else(|| {
                cannot_build(name, "restored sent no DeviceGeneratedRequest to forward")
            })?;
            merge(&mut req, dgr);
            (ticket, FirmwarePlan::None)
        }
    };
    tracing::debug!(
        updater = name,
        ?kind,
        ticket,
        "firmware-updater TSS request built"
    );
    Ok(UpdaterPlan {
        updater: args.name.clone(),
        kind,
        request: req,
        ticket,
        firmware,
    })
}

type Built = (String, FirmwarePlan);

fn has_component(manifest: &Dictionary, name: &str) -> bool {
    manifest.contains_key(name)
}

fn timer(
    identity: &Dictionary,
    args: &UpdaterArgs,
    req: &mut Dictionary,
) -> Result<Built, TssError> {
    let u = args.name.as_str();
    let (mut params, manifest) = identity_parameters(identity)?;
    ap_modes(&mut params);
    let info0 = match args.info.get("InfoArray") {
        Some(Value::Array(a)) => match a.first() {
            Some(Value::Dictionary(d)) => d,
            _ => {
                return Err(bad_args(
                    u,
                    "MessageArgInfo.InfoArray[0] is not a dictionary",
                ))
            }
        },
        Some(_) => return Err(bad_args(u, "MessageArgInfo.InfoArray is not an array")),
        None => return Err(bad_args(u, "MessageArgInfo.InfoArray is missing")),
    };
    let tag = info0
        .get("TagNumber")
        .and_then(coerce_uint)
        .ok_or_else(|| bad_args(u, "MessageArgInfo.InfoArray[0].TagNumber is missing"))?;
    let ticket = match info0.get("TicketName") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err(bad_args(
                u,
                "MessageArgInfo.InfoArray[0].TicketName is missing",
            ))
        }
    };
    let hwid = match info0.get("HardwareID") {
        Some(Value::Dictionary(d)) => d.clone(),
        Some(_) => return Err(bad_args(u, "InfoArray[0].HardwareID is not a dictionary")),
        None => {
            return Err(bad_args(
                u,
                "MessageArgInfo.InfoArray[0].HardwareID is missing",
            ))
        }
    };
    let k = |what: &str| format!("Timer,{what},{tag}");
    for (what, from, ty) in [
        ("ChipID", "ChipID", Ty::Uint),
        ("BoardID", "BoardID", Ty::Uint),
        ("ECID", "ECID", Ty::Uint),
        ("Nonce", "Nonce", Ty::Data),
        ("SecurityMode", "SecurityMode", Ty::Bool),
        ("SecurityDomain", "SecurityDomain", Ty::Uint),
        ("ProductionMode", "ProductionStatus", Ty::Bool),
    ] {
        copy_typed(u, &mut params, &hwid, &k(what), from, ty)?;
    }
    match args.info.get("APInfo") {
        Some(Value::Dictionary(ap)) => merge(&mut params, ap),
        _ => return Err(bad_args(u, "MessageArgInfo.APInfo is missing")),
    }

    req.insert("@BBTicket".into(), Value::Boolean(true));
    req.insert(format!("@{ticket}"), Value::Boolean(true));
    for (what, ty) in [
        ("BoardID", Ty::Uint),
        ("ChipID", Ty::Uint),
        ("SecurityDomain", Ty::Uint),
        ("SecurityMode", Ty::Bool),
        ("ProductionMode", Ty::Bool),
        ("ECID", Ty::Uint),
        ("Nonce", Ty::Data),
    ] {
        copy(u, req, &params, &k(what), ty)?;
    }
    require(
        u,
        req,
        &[&k("ChipID"), &k("BoardID"), &k("ECID"), &k("Nonce")],
    )?;
    if add_entries(req, &manifest, "Timer,", |e| ruled_entry(e, &params)) == 0 {
        return Err(cannot_build(
            u,
            "the build identity has no Timer,* components",
        ));
    }
    if let Some(dgr) = &args.device_request {
        merge(req, dgr);
    }
    let rtkit_os = k("RTKitOS");
    if args.wants_firmware_data() && !has_component(&manifest, &rtkit_os) {
        return Err(cannot_build(
            u,
            format!("the build identity has no {rtkit_os} firmware"),
        ));
    }
    let restore = k("RestoreRTKitOS");
    let restore_rtkit_os = has_component(&manifest, &restore).then_some(restore);
    Ok((
        ticket,
        wants(
            args,
            FirmwarePlan::RtkitFtab {
                rtkit_os,
                restore_rtkit_os,
            },
        ),
    ))
}

fn tcon(
    identity: &Dictionary,
    args: &UpdaterArgs,
    req: &mut Dictionary,
) -> Result<Built, TssError> {
    let u = args.name.as_str();
    let (mut params, manifest) = identity_parameters(identity)?;
    merge(&mut params, &args.info);
    req.insert("@BBTicket".into(), Value::Boolean(true));
    req.insert("@Baobab,Ticket".into(), Value::Boolean(true));
    for (key, ty) in [
        ("Baobab,BoardID", Ty::Uint),
        ("Baobab,ChipID", Ty::Uint),
        ("Baobab,ECID", Ty::Data),
        ("Baobab,Life", Ty::Uint),
        ("Baobab,ManifestEpoch", Ty::Uint),
        ("Baobab,ProductionMode", Ty::Bool),
        ("Baobab,SecurityDomain", Ty::Uint),
        ("Baobab,UpdateNonce", Ty::Data),
    ] {
        copy(u, req, &params, key, ty)?;
    }
    require(
        u,
        req,
        &[
            "Baobab,BoardID",
            "Baobab,ChipID",
            "Baobab,ECID",
            "Baobab,UpdateNonce",
        ],
    )?;
    // The TCON's own production fuse decides EPRO, not the AP's rules.
    let production = matches!(req.get("Baobab,ProductionMode"), Some(Value::Boolean(true)));
    let n = add_entries(req, &manifest, "Baobab,", |e| {
        let mut out = e.clone();
        remove_keeping_order(&mut out, "Info");
        out.insert("EPRO".into(), Value::Boolean(production));
        out
    });
    if n == 0 {
        return Err(cannot_build(
            u,
            "the build identity has no Baobab,* components",
        ));
    }
    if let Some(dgr) = &args.device_request {
        merge(req, dgr);
    }
    if args.wants_firmware_data() && !has_component(&manifest, "Baobab,TCON") {
        return Err(cannot_build(
            u,
            "the build identity has no Baobab,TCON firmware",
        ));
    }
    Ok((
        "Baobab,Ticket".into(),
        wants(
            args,
            FirmwarePlan::Raw {
                component: "Baobab,TCON".into(),
            },
        ),
    ))
}

fn veridian(
    identity: &Dictionary,
    args: &UpdaterArgs,
    req: &mut Dictionary,
) -> Result<Built, TssError> {
    let u = args.name.as_str();
    let (mut params, manifest) = identity_parameters(identity)?;
    merge(&mut params, &args.info);
    req.insert("@BBTicket".into(), Value::Boolean(true));
    req.insert("@BMU,Ticket".into(), Value::Boolean(true));
    copy(u, req, &params, "BMU,BoardID", Ty::Uint)?;
    copy_typed(u, req, &params, "BMU,ChipID", "ChipID", Ty::Uint)?;
    copy_typed(u, req, &params, "BMU,Nonce", "Nonce", Ty::Data)?;
    copy_typed(
        u,
        req,
        &params,
        "BMU,ProductionMode",
        "ProductionMode",
        Ty::Bool,
    )?;
    copy_typed(u, req, &params, "BMU,UniqueID", "UniqueID", Ty::Uint)?;
    require(
        u,
        req,
        &["BMU,BoardID", "BMU,ChipID", "BMU,Nonce", "BMU,UniqueID"],
    )?;
    if add_entries(req, &manifest, "BMU,", |e| ruled_entry(e, &params)) == 0 {
        return Err(cannot_build(
            u,
            "the build identity has no BMU,* components",
        ));
    }
    if let Some(dgr) = &args.device_request {
        merge(req, dgr);
    }
    let firmware = if args.wants_firmware_data() {
        let digest = manifest
            .get("BMU,FirmwareMap")
            .and_then(Value::as_dictionary)
            .and_then(|e| e.get("Digest"))
            .and_then(Value::as_data)
            .ok_or_else(|| cannot_build(u, "the build identity has no BMU,FirmwareMap Digest"))?;
        FirmwarePlan::BmuFirmwareMap {
            component: "BMU,FirmwareMap".into(),
            digest: digest.to_vec(),
        }
    } else {
        FirmwarePlan::None
    };
    Ok(("BMU,Ticket".into(), firmware))
}

fn rose(
    identity: &Dictionary,
    args: &UpdaterArgs,
    req: &mut Dictionary,
) -> Result<Built, TssError> {
    let u = args.name.as_str();
    let (mut params, manifest) = identity_parameters(identity)?;
    ap_modes(&mut params);
    // The device's own request replaces its MessageArgInfo when it sends one.
    match &args.device_request {
        Some(dgr) => merge(req, dgr),
        None => merge(&mut params, &args.info),
    }
    req.insert("@BBTicket".into(), Value::Boolean(true));
    req.insert("@Rap,Ticket".into(), Value::Boolean(true));
    for (key, ty) in [
        ("Rap,BoardID", Ty::Uint),
        ("Rap,ChipID", Ty::Uint),
        ("Rap,ECID", Ty::Uint),
        ("Rap,Nonce", Ty::Data),
        ("Rap,ProductionMode", Ty::Bool),
        ("Rap,SecurityDomain", Ty::Uint),
        ("Rap,SecurityMode", Ty::Bool),
        ("Rap,FdrRootCaDigest", Ty::Data),
    ] {
        copy(u, req, &params, key, ty)?;
    }
    require(
        u,
        req,
        &["Rap,BoardID", "Rap,ChipID", "Rap,ECID", "Rap,Nonce"],
    )?;
    if add_entries(req, &manifest, "Rap,", |e| ruled_entry(e, &params)) == 0 {
        return Err(cannot_build(
            u,
            "the build identity has no Rap,* components",
        ));
    }
    if args.wants_firmware_data() && !has_component(&manifest, "Rap,RTKitOS") {
        return Err(cannot_build(
            u,
            "the build identity has no Rap,RTKitOS firmware",
        ));
    }
    let restore_rtkit_os =
        has_component(&manifest, "Rap,RestoreRTKitOS").then(|| "Rap,RestoreRTKitOS".to_string());
    Ok((
        "Rap,Ticket".into(),
        wants(
            args,
            FirmwarePlan::RtkitFtab {
                rtkit_os: "Rap,RTKitOS".into(),
                restore_rtkit_os,
            },
        ),
    ))
}

/// SE chips whose firmware is `SE,UpdatePayload` (the reference tools' list).
const SE_UPDATE_PAYLOAD_CHIPS: &[u64] = &[0x73, 0x64, 0xC8, 0xD2, 0x2C, 0x36, 0x37];

fn se(identity: &Dictionary, args: &UpdaterArgs, req: &mut Dictionary) -> Result<Built, TssError> {
    let u = args.name.as_str();
    let (mut params, manifest) = identity_parameters(identity)?;
    let chip = match args.info.get("SE,ChipID") {
        Some(Value::Integer(i)) => i.as_unsigned(),
        _ => None,
    };
    let component = match chip {
        Some(0x20211) => "SE,Firmware",
        Some(c) if SE_UPDATE_PAYLOAD_CHIPS.contains(&c) => "SE,UpdatePayload",
        _ if has_component(&manifest, "SE,UpdatePayload") => "SE,UpdatePayload",
        _ if has_component(&manifest, "SE,Firmware") => "SE,Firmware",
        _ => {
            return Err(cannot_build(
                u,
                "the build identity has neither SE,Firmware nor SE,UpdatePayload",
            ))
        }
    };
    merge(&mut params, &args.info);
    req.insert("@BBTicket".into(), Value::Boolean(true));
    copy(u, req, &params, "SE,ChipID", Ty::Uint)?;
    copy(u, req, &params, "SE,ID", Ty::Data)?;
    copy(u, req, &params, "SE,Nonce", Ty::Data)?;
    copy(u, req, &params, "SE,RootKeyIdentifier", Ty::Data)?;
    require(
        u,
        req,
        &["SE,ChipID", "SE,ID", "SE,Nonce", "SE,RootKeyIdentifier"],
    )?;
    let dev = matches!(params.get("SE,IsDev"), Some(Value::Boolean(true)));
    let (drop_a, drop_b) = if dev {
        ("ProductionCMAC", "ProductionUpdatePayloadHash")
    } else {
        ("DevelopmentCMAC", "DevelopmentUpdatePayloadHash")
    };
    add_entries(req, &manifest, "SE,", |e| {
        let mut out = e.clone();
        for k in ["Info", drop_a, drop_b] {
            remove_keeping_order(&mut out, k);
        }
        out
    });
    if let Some(dgr) = &args.device_request {
        merge(req, dgr);
    }
    let ticket = if req.contains_key("@SE2,Ticket") {
        "SE2,Ticket"
    } else {
        if !req.contains_key("@SE,Ticket") {
            req.insert("@SE,Ticket".into(), Value::Boolean(true));
        }
        "SE,Ticket"
    };
    Ok((
        ticket.into(),
        wants(
            args,
            FirmwarePlan::Raw {
                component: component.into(),
            },
        ),
    ))
}

fn sep_digest(u: &str, manifest: &Dictionary) -> Result<Value, TssError> {
    let d = manifest
        .get("SEP")
        .and_then(Value::as_dictionary)
        .and_then(|e| e.get("Digest"))
        .and_then(Value::as_data)
        .ok_or_else(|| cannot_build(u, "the build identity has no SEP Digest"))?;
    let mut e = Dictionary::new();
    e.insert("Digest".into(), Value::Data(d.to_vec()));
    Ok(Value::Dictionary(e))
}

fn savage(
    identity: &Dictionary,
    args: &UpdaterArgs,
    req: &mut Dictionary,
) -> Result<Built, TssError> {
    let u = args.name.as_str();
    let (mut params, manifest) = identity_parameters(identity)?;
    merge(&mut params, &args.info);
    req.insert("@BBTicket".into(), Value::Boolean(true));
    req.insert("@Savage,Ticket".into(), Value::Boolean(true));
    copy(u, req, &params, "Savage,UID", Ty::Data)?;
    req.insert("SEP".into(), sep_digest(u, &manifest)?);
    for (key, ty) in [
        ("Savage,PatchEpoch", Ty::Uint),
        ("Savage,ChipID", Ty::Uint),
        ("Savage,AllowOfflineBoot", Ty::Bool),
        ("Savage,ReadFWKey", Ty::Bool),
        ("Savage,ProductionMode", Ty::Bool),
    ] {
        copy(u, req, &params, key, ty)?;
    }
    let production = matches!(req.get("Savage,ProductionMode"), Some(Value::Boolean(true)));
    let pd = if production { "Prod" } else { "Dev" };
    let rev = match params.get("Savage,Revision") {
        Some(Value::Data(d)) => d.first().copied(),
        _ => None,
    };
    let stepping = match rev {
        Some(r) if ((r | 0x10) & 0xF0) == 0x30 => "B2",
        Some(r) if (r & 0xF0) == 0xA0 => "BA",
        _ => "B0",
    };
    let component = format!("Savage,{stepping}-{pd}-Patch");
    let mut entry = manifest
        .get(&component)
        .and_then(Value::as_dictionary)
        .cloned()
        .ok_or_else(|| cannot_build(u, format!("the build identity has no {component}")))?;
    remove_keeping_order(&mut entry, "Info");
    req.insert(component.clone(), Value::Dictionary(entry));
    copy(u, req, &params, "Savage,Nonce", Ty::Data)?;
    copy(u, req, &params, "Savage,ReadECKey", Ty::Bool)?;
    require(
        u,
        req,
        &[
            "Savage,UID",
            "Savage,PatchEpoch",
            "Savage,ChipID",
            "Savage,AllowOfflineBoot",
            "Savage,ReadFWKey",
            "Savage,ProductionMode",
            "Savage,Nonce",
            "Savage,ReadECKey",
        ],
    )?;
    if let Some(dgr) = &args.device_request {
        merge(req, dgr);
    }
    Ok((
        "Savage,Ticket".into(),
        wants(args, FirmwarePlan::SavagePatch { component }),
    ))
}

fn yonkers(
    identity: &Dictionary,
    args: &UpdaterArgs,
    req: &mut Dictionary,
) -> Result<Built, TssError> {
    let u = args.name.as_str();
    let (mut params, manifest) = identity_parameters(identity)?;
    if let Some(Value::Dictionary(y)) = args.info.get("YonkersDeviceInfo") {
        merge(&mut params, y);
    }
    req.insert("@BBTicket".into(), Value::Boolean(true));
    req.insert("@Yonkers,Ticket".into(), Value::Boolean(true));
    req.insert("SEP".into(), sep_digest(u, &manifest)?);
    for key in [
        "Yonkers,AllowOfflineBoot",
        "Yonkers,BoardID",
        "Yonkers,ChipID",
        "Yonkers,ECID",
        "Yonkers,Nonce",
        "Yonkers,PatchEpoch",
        "Yonkers,ProductionMode",
        "Yonkers,ReadECKey",
        "Yonkers,ReadFWKey",
    ] {
        let v = params
            .get(key)
            .ok_or_else(|| cannot_build(u, format!("{key} is missing from YonkersDeviceInfo")))?;
        req.insert(key.into(), v.clone());
    }
    let production = match params.get("Yonkers,ProductionMode") {
        Some(Value::Boolean(b)) => *b,
        Some(v) => coerce_uint(v).is_some_and(|n| n != 0),
        None => false,
    };
    let fab = params
        .get("Yonkers,FabRevision")
        .and_then(coerce_uint)
        .unwrap_or(0);
    let (component, entry) =
        manifest
            .iter()
            .filter(|(n, _)| n.starts_with("Yonkers,"))
            .filter_map(|(n, e)| Some((n, e.as_dictionary()?)))
            .find(|(_, e)| {
                let epro_ok = match e.get("EPRO") {
                    Some(Value::Boolean(b)) => *b == production,
                    _ => true,
                };
                let fab_ok = match e.get("FabRevision") {
                    Some(Value::Integer(i)) => i.as_unsigned() == Some(fab),
                    _ => true,
                };
                epro_ok && fab_ok
            })
            .ok_or_else(|| {
                cannot_build(
                    u,
                    format!(
                    "the build identity has no Yonkers patch for a {} part, fab revision {fab:#x}",
                    if production { "production" } else { "development" }
                ),
                )
            })?;
    let mut entry = entry.clone();
    remove_keeping_order(&mut entry, "Info");
    let component = component.clone();
    req.insert(component.clone(), Value::Dictionary(entry));
    if let Some(dgr) = &args.device_request {
        merge(req, dgr);
    }
    Ok((
        "Yonkers,Ticket".into(),
        wants(args, FirmwarePlan::YonkersPatch { component }),
    ))
}

fn cryptex1(
    identity: &Dictionary,
    args: &UpdaterArgs,
    req: &mut Dictionary,
) -> Result<Built, TssError> {
    let u = args.name.as_str();
    let ticket = args
        .response_tags
        .first()
        .cloned()
        .unwrap_or_else(|| "Cryptex1,Ticket".into());
    let mut params = args.info.clone();
    for key in &args.build_identity_tags {
        if let Some(v) = identity.get(key) {
            params.insert(key.clone(), v.clone());
        }
    }
    for key in ["ApProductionMode", "ApSecurityMode"] {
        if !params.contains_key(key) {
            params.insert(key.into(), Value::Boolean(true));
        }
    }
    for key in ["ApChipID", "ApBoardID"] {
        if !params.contains_key(key) {
            if let Some(n) = identity.get(key).and_then(coerce_uint) {
                params.insert(key.into(), Value::Integer(n.into()));
            }
        }
    }
    let dgr = args
        .device_request
        .as_ref()
        .ok_or_else(|| cannot_build(u, "restored sent no DeviceGeneratedRequest"))?;
    merge(&mut params, dgr);

    copy(u, req, &params, "ApECID", Ty::Uint)?;
    copy(u, req, &params, "UniqueBuildID", Ty::Data)?;
    copy(u, req, &params, "ApChipID", Ty::Uint)?;
    copy(u, req, &params, "ApBoardID", Ty::Uint)?;
    copy(u, req, &params, "ApSecurityDomain", Ty::Uint)?;
    if params.contains_key("Ap,LocalPolicy") {
        req.insert("@ApImg4Ticket".into(), Value::Boolean(true));
        copy(u, req, &params, "Ap,LocalBoot", Ty::Bool)?;
        if let Some(v) = params.get("Ap,LocalPolicy") {
            req.insert("Ap,LocalPolicy".into(), v.clone());
        }
        for key in [
            "Ap,NextStageIM4MHash",
            "Ap,RecoveryOSPolicyNonceHash",
            "Ap,VolumeUUID",
        ] {
            copy(u, req, &params, key, Ty::Data)?;
        }
        for (key, ty) in [
            ("ApECID", Ty::Uint),
            ("ApChipID", Ty::Uint),
            ("ApBoardID", Ty::Uint),
            ("ApSecurityDomain", Ty::Uint),
            ("ApNonce", Ty::Data),
            ("ApSecurityMode", Ty::Bool),
            ("ApProductionMode", Ty::Bool),
        ] {
            copy(u, req, &params, key, ty)?;
        }
        copy(u, req, &params, "Ap,NextStageCryptex1IM4MHash", Ty::Data)?;
        require(u, req, &["Ap,LocalBoot", "Ap,NextStageIM4MHash"])?;
    } else {
        req.insert("@Cryptex1,Ticket".into(), Value::Boolean(true));
        copy(u, req, &params, "ApSecurityMode", Ty::Bool)?;
        copy(u, req, &params, "ApProductionMode", Ty::Bool)?;
        for (k, v) in &params {
            if k.starts_with("Cryptex1") {
                req.insert(k.clone(), v.clone());
            }
        }
    }
    Ok((ticket, FirmwarePlan::None))
}

fn firmware_error(plan: &UpdaterPlan, what: impl Into<String>) -> TssError {
    TssError::UpdaterFirmware {
        updater: plan.updater.clone(),
        what: what.into(),
    }
}

/// `FirmwareResponseData` for the device: Apple's answer (which must hold the plan's ticket)
/// plus `FirmwareData` built from `files` (component name → file bytes) as the plan says.
pub fn firmware_response(
    plan: &UpdaterPlan,
    response: &TssResponse,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<Dictionary, TssError> {
    if response.tickets.get(&plan.ticket).is_none() {
        return Err(TssError::MissingTicket(plan.ticket.clone()));
    }
    let mut out = response.tickets.clone();
    let file = |c: &str| {
        files
            .get(c)
            .ok_or_else(|| firmware_error(plan, format!("the {c} firmware file was not read")))
    };
    let data = match &plan.firmware {
        FirmwarePlan::None => return Ok(out),
        FirmwarePlan::Raw { component } => Value::Data(file(component)?.clone()),
        FirmwarePlan::RtkitFtab {
            rtkit_os,
            restore_rtkit_os,
        } => {
            let mut table = Ftab::parse(file(rtkit_os)?)
                .map_err(|e| firmware_error(plan, format!("{rtkit_os}: {e}")))?;
            if table.tag != *b"rkos" {
                tracing::warn!(
                    component = %rtkit_os,
                    tag = %tag_text(table.tag),
                    "firmware table is not tagged rkos; sending it anyway"
                );
            }
            if let Some(restore) = restore_rtkit_os {
                let rt = Ftab::parse(file(restore)?)
                    .map_err(|e| firmware_error(plan, format!("{restore}: {e}")))?;
                let rrko = rt
                    .entry(*b"rrko")
                    .ok_or_else(|| firmware_error(plan, format!("{restore} has no rrko entry")))?;
                table.push(*b"rrko", rrko.to_vec());
            }
            Value::Data(
                table
                    .to_bytes()
                    .map_err(|e| firmware_error(plan, e.to_string()))?,
            )
        }
        FirmwarePlan::BmuFirmwareMap { component, digest } => {
            let mut map = Value::from_reader(Cursor::new(file(component)?))
                .ok()
                .and_then(Value::into_dictionary)
                .ok_or_else(|| {
                    firmware_error(plan, format!("{component} is not a plist dictionary"))
                })?;
            map.insert("fw_map_digest".into(), Value::Data(digest.clone()));
            let mut bin = Vec::new();
            plist::to_writer_binary(&mut bin, &Value::Dictionary(map))
                .map_err(|e| firmware_error(plan, format!("{component}: {e}")))?;
            Value::Data(bin)
        }
        FirmwarePlan::SavagePatch { component } => {
            let patch = file(component)?;
            let len = u32::try_from(patch.len())
                .map_err(|_| firmware_error(plan, format!("{component} exceeds 4 GiB")))?;
            let mut data = vec![0u8; 16];
            data[4..8].copy_from_slice(&len.to_le_bytes());
            data.extend_from_slice(patch);
            Value::Data(data)
        }
        FirmwarePlan::YonkersPatch { component } => {
            let mut d = Dictionary::new();
            d.insert(
                "YonkersFirmware".into(),
                Value::Data(file(component)?.clone()),
            );
            Value::Dictionary(d)
        }
    };
    out.insert("FirmwareData".into(), data);
    Ok(out)
}
