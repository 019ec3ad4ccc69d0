//! One handler per DataType a Mac restore may request (protocol.md §7.7).
//!
//! A handler turns a [`DataRequest`] into a [`Reply`]: plists for the main connection or the
//! request's DataPort, a FileData stream, a raw byte stream, or an ASR session. The client
//! ([`super::client`]) delivers it. Any DataType not listed in [`handle`] is an error naming
//! it, so a restore never waits on a request nobody answers.

use std::time::{SystemTime, UNIX_EPOCH};

use plist::{Dictionary, Value};

use super::context::{ContextError, LocalPolicyArgs, RestoreContext, UrlRequest};
use super::cpio;
use super::messages::DataRequest;
use super::RestoredError;

/// Size of one `FileData` chunk.
pub const FILE_DATA_CHUNK: usize = 8192;
/// ASR's port when the request names none.
pub const DEFAULT_ASR_PORT: u16 = 12345;

/// Where a reply goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// Always on the main restored connection.
    Main,
    /// On a fresh connection to the request's DataPort, else the main connection.
    DataPortOrMain,
}

/// What to send for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// XML plists, framed.
    Plists(Destination, Vec<Dictionary>),
    /// A binary plist, framed (URLAsset and friends).
    BinaryPlist(Destination, Dictionary),
    /// `{FileData: ≤8192 bytes}` frames then `{FileDataDone: true}`.
    FileData(Destination, Vec<u8>),
    /// Raw bytes on the DataPort, then close (BootabilityBundle).
    Raw(Vec<u8>),
    /// An ASR session on the DataPort (default 12345).
    Asr,
}

fn one(k: &str, v: Value) -> Dictionary {
    let mut d = Dictionary::new();
    d.insert(k.into(), v);
    d
}

fn plist(dest: Destination, d: Dictionary) -> Reply {
    Reply::Plists(dest, vec![d])
}

fn arg_bool(args: &Dictionary, k: &str) -> bool {
    args.get(k).and_then(Value::as_boolean).unwrap_or(false)
}

fn arg_str(args: &Dictionary, k: &str) -> Option<String> {
    args.get(k).and_then(Value::as_string).map(str::to_owned)
}

fn arg_data(args: &Dictionary, k: &str) -> Vec<u8> {
    args.get(k)
        .and_then(Value::as_data)
        .map(<[u8]>::to_vec)
        .unwrap_or_default()
}

/// `Manifest` of an identity.
pub fn identity_manifest(identity: &Dictionary) -> Option<&Dictionary> {
    identity.get("Manifest").and_then(Value::as_dictionary)
}

/// `Info.<key>` of an identity.
pub fn identity_info<'a>(identity: &'a Dictionary, key: &str) -> Option<&'a str> {
    identity
        .get("Info")
        .and_then(Value::as_dictionary)
        .and_then(|i| i.get(key))
        .and_then(Value::as_string)
}

/// `Manifest.<component>.Info.Path`.
pub fn component_path(identity: &Dictionary, component: &str) -> Option<String> {
    identity_manifest(identity)?
        .get(component)?
        .as_dictionary()?
        .get("Info")?
        .as_dictionary()?
        .get("Path")?
        .as_string()
        .map(str::to_owned)
}

fn component_flag(entry: &Value, flag: &str) -> bool {
    entry
        .as_dictionary()
        .and_then(|e| e.get("Info"))
        .and_then(Value::as_dictionary)
        .and_then(|i| i.get(flag))
        .and_then(Value::as_boolean)
        .unwrap_or(false)
}

/// Components of the identity whose `Info.<flag>` is true, in manifest order.
pub fn components_with_flag(identity: &Dictionary, flag: &str) -> Vec<String> {
    identity_manifest(identity)
        .map(|m| {
            m.iter()
                .filter(|(_, e)| component_flag(e, flag))
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default()
}

fn ctx_err(data_type: &str) -> impl Fn(ContextError) -> RestoredError + '_ {
    move |source| RestoredError::Context {
        data_type: data_type.to_owned(),
        source,
    }
}

/// Data types handled here (the rest fail with [`RestoredError::UnknownDataType`]).
pub const HANDLED: &[&str] = &[
    "SystemImageData",
    "RecoveryOSASRImage",
    "RootTicket",
    "RecoveryOSRootTicketData",
    "RecoveryOSLocalPolicy",
    "BuildIdentityDict",
    "PersonalizedBootObjectV3",
    "SourceBootObjectV4",
    "SourceBootObjectV5",
    "KernelCache",
    "DeviceTree",
    "SystemImageRootHash",
    "SystemImageCanonicalMetadata",
    "NORData",
    "FirmwareUpdaterPreflight",
    "FirmwareUpdaterData",
    "ReceiptManifest",
    "FDRTrustData",
    "FUDData",
    "PersonalizedData",
    "EANData",
    "BootabilityBundle",
    "BootabilityBundleV2",
    "URLAsset",
    "StreamedImageDecryptionKey",
    "HostSystemTime",
    "DeviceRestoreInfoPreflight",
    "RecoveryOSFileAssetImage",
    "RecoveryOSIBootFWFilesImages",
    "RecoveryOSImage",
    "RecoveryOSVersionData",
];

/// Builds the reply to one data request.
pub async fn handle<C: RestoreContext>(ctx: &C, req: &DataRequest) -> Result<Reply, RestoredError> {
    use Destination::*;
    let dt = req.data_type.as_str();
    let args = &req.arguments;
    let e = ctx_err(dt);
    Ok(match dt {
        "SystemImageData" | "RecoveryOSASRImage" => Reply::Asr,
        "RootTicket" => plist(
            DataPortOrMain,
            one(
                "RootTicketData",
                Value::Data(ctx.root_ticket().await.map_err(&e)?),
            ),
        ),
        "RecoveryOSRootTicketData" => plist(
            DataPortOrMain,
            one(
                "RootTicketData",
                Value::Data(ctx.recovery_os_root_ticket().await.map_err(&e)?),
            ),
        ),
        "RecoveryOSLocalPolicy" => {
            let policy = ctx
                .local_policy(LocalPolicyArgs {
                    next_stage_im4m_hash: arg_data(args, "Ap,NextStageIM4MHash"),
                    recovery_os_policy_nonce_hash: arg_data(args, "Ap,RecoveryOSPolicyNonceHash"),
                    volume_uuid: arg_data(args, "Ap,VolumeUUID"),
                })
                .await
                .map_err(&e)?;
            plist(DataPortOrMain, one("Ap,LocalPolicy", Value::Data(policy)))
        }
        "BuildIdentityDict" => {
            let variant = arg_str(args, "Variant");
            let identity = ctx
                .build_identity(arg_bool(args, "IsRecoveryOS"), variant.clone())
                .await
                .map_err(&e)?;
            let mut d = one("BuildIdentityDict", Value::Dictionary(identity));
            d.insert(
                "Variant".into(),
                Value::String(variant.unwrap_or_else(|| "Erase".into())),
            );
            plist(DataPortOrMain, d)
        }
        "PersonalizedBootObjectV3" => {
            let name = arg_str(args, "ImageName").ok_or_else(|| missing(dt, "ImageName"))?;
            let is_ros = arg_bool(args, "IsRecoveryOS");
            let data = match special_file(ctx, dt, &name, is_ros, None, args).await? {
                Some(d) => d,
                None => ctx.personalized(name, is_ros).await.map_err(&e)?,
            };
            Reply::FileData(DataPortOrMain, data)
        }
        "SourceBootObjectV4" | "SourceBootObjectV5" => {
            let name = arg_str(args, "ImageName").ok_or_else(|| missing(dt, "ImageName"))?;
            let is_ros = arg_bool(args, "IsRecoveryOS");
            let variant = arg_str(args, "Variant");
            let data = match special_file(ctx, dt, &name, is_ros, variant.clone(), args).await? {
                Some(d) => d,
                None => {
                    let identity = ctx.build_identity(is_ros, variant).await.map_err(&e)?;
                    let path = component_path(&identity, &name)
                        .ok_or_else(|| e(ContextError::NotFound(format!("component {name}"))))?;
                    ctx.raw_file(path).await.map_err(&e)?
                }
            };
            Reply::FileData(DataPortOrMain, data)
        }
        "KernelCache" => personalized_reply(ctx, dt, "KernelCache", "KernelCacheFile").await?,
        "DeviceTree" => personalized_reply(ctx, dt, "DeviceTree", "DeviceTreeFile").await?,
        "SystemImageRootHash" => {
            personalized_reply(ctx, dt, "SystemVolume", "SystemImageRootHashFile").await?
        }
        "SystemImageCanonicalMetadata" => {
            personalized_reply(
                ctx,
                dt,
                "Ap,SystemVolumeCanonicalMetadata",
                "SystemImageCanonicalMetadataFile",
            )
            .await?
        }
        "NORData" => plist(DataPortOrMain, nor_data(ctx, args).await?),
        "FirmwareUpdaterPreflight" | "FDRTrustData" | "DeviceRestoreInfoPreflight" => {
            plist(DataPortOrMain, Dictionary::new())
        }
        "FirmwareUpdaterData" => {
            let response = ctx.firmware_updater(args.clone()).await.map_err(&e)?;
            plist(DataPortOrMain, one("FirmwareResponseData", response))
        }
        "ReceiptManifest" => {
            let identity = ctx.build_identity(false, None).await.map_err(&e)?;
            let manifest = identity_manifest(&identity)
                .cloned()
                .ok_or_else(|| e(ContextError::NotFound("the identity's Manifest".into())))?;
            plist(
                DataPortOrMain,
                one("ReceiptManifest", Value::Dictionary(manifest)),
            )
        }
        "FUDData" => {
            image_set(
                ctx,
                dt,
                args,
                "FUDImageList",
                "FUDImageData",
                "IsFUDFirmware",
            )
            .await?
        }
        "EANData" => {
            image_set(
                ctx,
                dt,
                args,
                "EANImageList",
                "EANData",
                "IsEarlyAccessFirmware",
            )
            .await?
        }
        "PersonalizedData" => {
            let flag = arg_str(args, "ImageType").ok_or_else(|| missing(dt, "ImageType"))?;
            image_set(ctx, dt, args, "ImageList", "ImageData", &flag).await?
        }
        "BootabilityBundle" | "BootabilityBundleV2" => {
            if req.port.is_none() {
                return Err(missing(dt, "DataPort"));
            }
            Reply::Raw(bootability_bundle(ctx, dt).await?)
        }
        "URLAsset" | "StreamedImageDecryptionKey" => {
            let url = arg_str(args, "RequestURL").ok_or_else(|| missing(dt, "RequestURL"))?;
            let headers = args
                .get("RequestAdditionalHeaders")
                .and_then(Value::as_dictionary)
                .map(|h| {
                    h.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_string()?.to_owned())))
                        .collect()
                })
                .unwrap_or_default();
            let response = ctx
                .url_request(UrlRequest {
                    method: arg_str(args, "RequestMethod").unwrap_or_else(|| "GET".into()),
                    url,
                    headers,
                    body: arg_data(args, "RequestBody"),
                })
                .await
                .map_err(&e)?;
            let mut d = Dictionary::new();
            d.insert("ResponseBody".into(), Value::Data(response.body));
            d.insert("ResponseBodyDone".into(), Value::Boolean(true));
            d.insert(
                "ResponseHeaders".into(),
                Value::Dictionary(
                    response
                        .headers
                        .into_iter()
                        .map(|(k, v)| (k, Value::String(v)))
                        .collect(),
                ),
            );
            d.insert(
                "ResponseStatus".into(),
                Value::Integer(u64::from(response.status).into()),
            );
            Reply::BinaryPlist(DataPortOrMain, d)
        }
        "HostSystemTime" => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            plist(Main, one("SetHostTimeOnDevice", Value::Real(now)))
        }
        // Macs have no `RecoveryVariant` identity: answer "no asset" for the first step of the
        // iOS recovery-OS flow, as idevicerestore does; the others cannot be served.
        "RecoveryOSFileAssetImage" => {
            plist(Main, one("RecoveryOSNoAssetFound", Value::Boolean(true)))
        }
        "RecoveryOSIBootFWFilesImages" | "RecoveryOSImage" | "RecoveryOSVersionData" => {
            return Err(RestoredError::UnsupportedRequest {
                data_type: dt.to_owned(),
                why:
                    "it belongs to the iOS recovery-OS flow, which a Mac build has no identity for",
            })
        }
        other => return Err(RestoredError::UnknownDataType(other.to_owned())),
    })
}

fn missing(data_type: &str, field: &'static str) -> RestoredError {
    RestoredError::BadRequest {
        data_type: data_type.to_owned(),
        field,
    }
}

async fn personalized_reply<C: RestoreContext>(
    ctx: &C,
    dt: &str,
    component: &str,
    key: &str,
) -> Result<Reply, RestoredError> {
    let img4 = ctx
        .personalized(component.to_owned(), false)
        .await
        .map_err(ctx_err(dt))?;
    Ok(plist(
        Destination::DataPortOrMain,
        one(key, Value::Data(img4)),
    ))
}

/// The pseudo image names of boot-object requests; `None` for a real component.
async fn special_file<C: RestoreContext>(
    ctx: &C,
    dt: &str,
    name: &str,
    is_recovery_os: bool,
    variant: Option<String>,
    args: &Dictionary,
) -> Result<Option<Vec<u8>>, RestoredError> {
    let e = ctx_err(dt);
    let path = match name {
        "__RestoreVersion__" => "RestoreVersion.plist".to_owned(),
        "__SystemVersion__" => "SystemVersion.plist".to_owned(),
        "__GlobalManifest__" => {
            let identity = ctx
                .build_identity(is_recovery_os, variant.clone())
                .await
                .map_err(&e)?;
            let device_class = identity_info(&identity, "DeviceClass").ok_or_else(|| {
                e(ContextError::NotFound(
                    "the identity's Info.DeviceClass".into(),
                ))
            })?;
            let variant = match variant {
                Some(v) => v,
                None => identity_info(&identity, "MacOSVariant")
                    .ok_or_else(|| {
                        e(ContextError::NotFound(
                            "the identity's Info.MacOSVariant".into(),
                        ))
                    })?
                    .to_owned(),
            };
            // macOS 27 may name the file differently (§7.11); defaults give the classic name.
            let prefix = arg_str(args, "GlobalManifestPrefix").unwrap_or_else(|| "apticket".into());
            let suffix = arg_str(args, "GlobalManifestSuffix").unwrap_or_default();
            format!("Firmware/Manifests/restore/{variant}/{prefix}.{device_class}{suffix}.im4m")
        }
        _ => return Ok(None),
    };
    ctx.raw_file(path).await.map(Some).map_err(e)
}

async fn nor_data<C: RestoreContext>(
    ctx: &C,
    args: &Dictionary,
) -> Result<Dictionary, RestoredError> {
    let dt = "NORData";
    let e = ctx_err(dt);
    let identity = ctx.build_identity(false, None).await.map_err(&e)?;
    let manifest = identity_manifest(&identity)
        .ok_or_else(|| e(ContextError::NotFound("the identity's Manifest".into())))?;
    // The all_flash manifest names files; map each back to its component by path.
    let names: Vec<String> = match ctx.raw_file("Firmware/all_flash/manifest".into()).await {
        Ok(list) => String::from_utf8_lossy(&list)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .filter_map(|file| {
                let path = format!("Firmware/all_flash/{file}");
                manifest
                    .keys()
                    .find(|k| component_path(&identity, k).as_deref() == Some(path.as_str()))
                    .cloned()
            })
            .collect(),
        Err(ContextError::NotFound(_)) => manifest
            .iter()
            .filter(|(_, v)| {
                component_flag(v, "IsFirmwarePayload")
                    || (component_flag(v, "IsSecondaryFirmwarePayload")
                        && component_flag(v, "IsLoadedByiBoot"))
            })
            .map(|(k, _)| k.clone())
            .collect(),
        Err(other) => return Err(e(other)),
    };
    let mut names: Vec<String> = names
        .into_iter()
        .filter(|n| n != "LLB" && n != "RestoreSEP")
        .collect();
    // iBoot goes first in the array form.
    if let Some(i) = names.iter().position(|n| n == "iBoot") {
        let iboot = names.remove(i);
        names.insert(0, iboot);
    }
    let mut reply = Dictionary::new();
    if manifest.contains_key("LLB") {
        let llb = ctx.personalized("LLB".into(), false).await.map_err(&e)?;
        reply.insert("LlbImageData".into(), Value::Data(llb));
    }
    let flash_v1 = args.contains_key("FlashVersion1");
    let mut array = Vec::new();
    let mut dict = Dictionary::new();
    for name in names {
        let img4 = ctx.personalized(name.clone(), false).await.map_err(&e)?;
        if flash_v1 {
            dict.insert(name, Value::Data(img4));
        } else {
            array.push(Value::Data(img4));
        }
    }
    reply.insert(
        "NorImageData".into(),
        if flash_v1 {
            Value::Dictionary(dict)
        } else {
            Value::Array(array)
        },
    );
    for (component, key) in [
        ("RestoreSEP", "RestoreSEPImageData"),
        ("SEP", "SEPImageData"),
        ("SepStage1", "SEPPatchImageData"),
    ] {
        if manifest.contains_key(component) {
            let img4 = ctx
                .personalized(component.into(), false)
                .await
                .map_err(&e)?;
            reply.insert(key.into(), Value::Data(img4));
        }
    }
    Ok(reply)
}

/// The list / single / all pattern shared by FUDData, PersonalizedData and EANData.
async fn image_set<C: RestoreContext>(
    ctx: &C,
    dt: &str,
    args: &Dictionary,
    list_key: &str,
    data_key: &str,
    flag: &str,
) -> Result<Reply, RestoredError> {
    let e = ctx_err(dt);
    let identity = ctx.build_identity(false, None).await.map_err(&e)?;
    let names = components_with_flag(&identity, flag);
    let reply = if args.contains_key(list_key) {
        one(
            list_key,
            Value::Array(names.into_iter().map(Value::String).collect()),
        )
    } else if let Some(name) = arg_str(args, "ImageName") {
        let img4 = ctx.personalized(name.clone(), false).await.map_err(&e)?;
        let mut d = one(data_key, Value::Data(img4));
        d.insert("ImageName".into(), Value::String(name));
        d
    } else {
        let mut all = Dictionary::new();
        for name in names {
            let img4 = ctx.personalized(name.clone(), false).await.map_err(&e)?;
            all.insert(name, Value::Data(img4));
        }
        one(data_key, Value::Dictionary(all))
    };
    Ok(plist(Destination::DataPortOrMain, reply))
}

/// The BootabilityBundle cpio stream (§7.7.1). V2 uses the same IPSW paths: the "V2 IPSW
/// paths" of §7.11 are not known yet (§12.17).
async fn bootability_bundle<C: RestoreContext>(
    ctx: &C,
    dt: &str,
) -> Result<Vec<u8>, RestoredError> {
    const PREFIX: &str = "BootabilityBundle/Restore/Bootability/";
    const TRUST_CACHE: &str = "BootabilityBundle/Restore/Firmware/Bootability.dmg.trustcache";
    let e = ctx_err(dt);
    let mut out = Vec::new();
    let mut ino = 1;
    for path in ctx.list_files(PREFIX.into()).await.map_err(&e)? {
        let Some(name) = path.strip_prefix(PREFIX) else {
            continue;
        };
        if name.is_empty() || name.ends_with('/') {
            continue;
        }
        let data = ctx.raw_file(path.clone()).await.map_err(&e)?;
        cpio::push_entry(&mut out, ino, cpio::MODE_FILE, 1, name, &data);
        ino += 1;
    }
    match ctx.raw_file(TRUST_CACHE.into()).await {
        Ok(data) => cpio::push_entry(
            &mut out,
            ino,
            cpio::MODE_FILE,
            1,
            "Bootability.trustcache",
            &data,
        ),
        Err(ContextError::NotFound(_)) => {}
        Err(other) => return Err(e(other)),
    }
    cpio::push_trailer(&mut out);
    Ok(out)
}
