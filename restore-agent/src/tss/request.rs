//! The four TSS requests a Mac restore makes (§4.4, §4.6, §4.7, §4.8).

use plist::{Dictionary, Value};

use super::params::{IdentityParams, RequestUuid, TssParams};
use super::{rules, TssError};
use crate::img4;

/// `@HostPlatformInfo`: we present ourselves like the macOS build of the reference tools.
pub const HOST_PLATFORM_INFO: &str = "mac";
/// `@VersionInfo`: the libauthinstall version current reference tools send.
pub const VERSION_INFO: &str = "libauthinstall-1104.0.9";

/// Strings copied to the top level by the Img4 tags, in order.
const IMG4_STRING_KEYS: &[&str] = &[
    "Ap,OSLongVersion",
    "Ap,OSReleaseType",
    "Ap,ProductMarketingVersion",
    "Ap,ProductType",
    "Ap,SDKPlatform",
    "Ap,Target",
    "Ap,TargetType",
    "Ap,Timestamp",
];

pub(super) fn new_request(uuid: &RequestUuid) -> Dictionary {
    let mut r = Dictionary::new();
    r.insert("@HostPlatformInfo".into(), HOST_PLATFORM_INFO.into());
    r.insert("@VersionInfo".into(), VERSION_INFO.into());
    r.insert("@UUID".into(), uuid.as_str().into());
    r
}

fn copy(req: &mut Dictionary, id: &IdentityParams, key: &str) {
    if let Some(v) = id.get(key) {
        req.insert(key.to_string(), v.clone());
    }
}

fn uint(v: u64) -> Value {
    Value::Integer(v.into())
}

fn add_common_tags(req: &mut Dictionary, id: &IdentityParams, params: &TssParams) {
    req.insert("ApECID".into(), uint(params.ecid));
    for key in ["UniqueBuildID", "ApChipID", "ApBoardID", "ApSecurityDomain"] {
        copy(req, id, key);
    }
}

fn add_img4_tags(
    req: &mut Dictionary,
    id: &IdentityParams,
    params: &TssParams,
) -> Result<(), TssError> {
    for key in IMG4_STRING_KEYS {
        copy(req, id, key);
    }
    let nonce = params.ap_nonce.clone().ok_or(TssError::MissingApNonce)?;
    req.insert("ApNonce".into(), Value::Data(nonce));
    req.insert("@ApImg4Ticket".into(), Value::Boolean(true));
    req.insert(
        "ApSecurityMode".into(),
        Value::Boolean(params.security_mode),
    );
    req.insert(
        "ApProductionMode".into(),
        Value::Boolean(params.production_mode),
    );
    match &params.sep_nonce {
        Some(n) => {
            req.insert("SepNonce".into(), Value::Data(n.clone()));
        }
        None => tracing::warn!("no SepNonce read from the Mac; requesting a ticket without it"),
    }
    for key in [
        "NeRDEpoch",
        "PearlCertificationRootPub",
        "AllowNeRDBoot",
        "PermitNeRDPivot",
    ] {
        copy(req, id, key);
    }
    if id.requires_uid_mode {
        // The reference tools send these fixed values when the identity asks for UID mode,
        // without knowing why (a documented workaround there); we mirror them.
        req.insert("UID_MODE".into(), Value::Boolean(false));
        req.insert("Ap,SikaFuse".into(), uint(0));
    }
    Ok(())
}

/// The main AP ticket request (`ApImg4Ticket`) for a Mac (§4.4).
pub fn main_ap_request(
    identity: &Dictionary,
    params: &TssParams,
    uuid: &RequestUuid,
) -> Result<Dictionary, TssError> {
    let id = IdentityParams::from_identity(identity)?;
    let mut req = new_request(uuid);
    add_common_tags(&mut req, &id, params);
    for (name, entry) in &id.manifest {
        if let Some(e) = rules::ap_entry(name, entry, params) {
            req.insert(name.clone(), Value::Dictionary(e));
        }
    }
    add_img4_tags(&mut req, &id, params)?;
    Ok(req)
}

/// The `{Digest, Trusted}` entry describing the embedded local policy.
fn local_policy_entry() -> Value {
    let mut d = Dictionary::new();
    d.insert("Digest".into(), Value::Data(img4::lpol_digest().to_vec()));
    d.insert("Trusted".into(), Value::Boolean(true));
    Value::Dictionary(d)
}

struct LocalPolicyInputs<'a> {
    local_boot: bool,
    next_stage_im4m_hash: Vec<u8>,
    recovery_os_policy_nonce_hash: Option<&'a [u8]>,
    volume_uuid: Option<[u8; 16]>,
}

fn local_policy_tags(
    id: &IdentityParams,
    params: &TssParams,
    uuid: &RequestUuid,
    lp: LocalPolicyInputs<'_>,
) -> Dictionary {
    let mut req = new_request(uuid);
    req.insert("@ApImg4Ticket".into(), Value::Boolean(true));
    req.insert("Ap,LocalBoot".into(), Value::Boolean(lp.local_boot));
    req.insert("Ap,LocalPolicy".into(), local_policy_entry());
    req.insert(
        "Ap,NextStageIM4MHash".into(),
        Value::Data(lp.next_stage_im4m_hash),
    );
    if let Some(h) = lp.recovery_os_policy_nonce_hash {
        req.insert(
            "Ap,RecoveryOSPolicyNonceHash".into(),
            Value::Data(h.to_vec()),
        );
    }
    if let Some(v) = lp.volume_uuid {
        req.insert("Ap,VolumeUUID".into(), Value::Data(v.to_vec()));
    }
    req.insert("ApECID".into(), uint(params.ecid));
    for key in ["ApChipID", "ApBoardID", "ApSecurityDomain"] {
        copy(&mut req, id, key);
    }
    if let Some(n) = &params.ap_nonce {
        req.insert("ApNonce".into(), Value::Data(n.clone()));
    }
    req.insert(
        "ApSecurityMode".into(),
        Value::Boolean(params.security_mode),
    );
    req.insert(
        "ApProductionMode".into(),
        Value::Boolean(params.production_mode),
    );
    req
}

/// The local-policy ticket request made in DFU (§4.6): it binds the default local policy to
/// the main ticket via `Ap,NextStageIM4MHash` = SHA-384 of that ticket.
pub fn local_policy_request(
    identity: &Dictionary,
    params: &TssParams,
    main_ticket: &[u8],
    uuid: &RequestUuid,
) -> Result<Dictionary, TssError> {
    let id = IdentityParams::from_identity(identity)?;
    if params.ap_nonce.is_none() {
        return Err(TssError::MissingApNonce);
    }
    Ok(local_policy_tags(
        &id,
        params,
        uuid,
        LocalPolicyInputs {
            local_boot: false,
            next_stage_im4m_hash: img4::sha384(main_ticket).to_vec(),
            recovery_os_policy_nonce_hash: None,
            volume_uuid: None,
        },
    ))
}

/// The "recoveryOS root ticket" request (§4.7).
pub fn recovery_os_root_request(
    identity: &Dictionary,
    params: &TssParams,
    uuid: &RequestUuid,
) -> Result<Dictionary, TssError> {
    let id = IdentityParams::from_identity(identity)?;
    let mut req = new_request(uuid);
    add_img4_tags(&mut req, &id, params)?;
    add_common_tags(&mut req, &id, params);
    for (name, entry) in &id.manifest {
        if let Some(e) = rules::recovery_entry(name, entry, params) {
            req.insert(name.clone(), Value::Dictionary(e));
        }
    }
    Ok(req)
}

/// The `Arguments` restored sends with DataType `RecoveryOSLocalPolicy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryOsLocalPolicyArgs {
    pub next_stage_im4m_hash: Vec<u8>,
    pub recovery_os_policy_nonce_hash: Vec<u8>,
    /// The volume UUID string as restored sends it.
    pub volume_uuid: String,
}

/// The RecoveryOSLocalPolicy ticket request made during restore (§4.8): local boot, no
/// ApNonce, bound to the installed volume.
pub fn recovery_os_local_policy_request(
    identity: &Dictionary,
    params: &TssParams,
    args: &RecoveryOsLocalPolicyArgs,
    uuid: &RequestUuid,
) -> Result<Dictionary, TssError> {
    let id = IdentityParams::from_identity(identity)?;
    let volume_uuid = super::params::parse_volume_uuid(&args.volume_uuid)?;
    let no_nonce = TssParams {
        ap_nonce: None,
        ..params.clone()
    };
    Ok(local_policy_tags(
        &id,
        &no_nonce,
        uuid,
        LocalPolicyInputs {
            local_boot: true,
            next_stage_im4m_hash: args.next_stage_im4m_hash.clone(),
            recovery_os_policy_nonce_hash: Some(&args.recovery_os_policy_nonce_hash),
            volume_uuid: Some(volume_uuid),
        },
    ))
}

/// Serialize a request as the XML plist the server expects.
pub fn to_xml(request: &Dictionary) -> Result<Vec<u8>, TssError> {
    let mut out = Vec::new();
    plist::to_writer_xml(&mut out, request).map_err(|e| TssError::Encode(e.to_string()))?;
    Ok(out)
}
