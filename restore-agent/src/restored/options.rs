//! The StartRestore request for a Mac (protocol.md §7.4) and the capability dictionaries that
//! tell restored which messages this host understands (§7.5, §7.11).
//!
//! The tables are kept exactly as Apple Configurator sends them (via idevicerestore): restored
//! runs `is_host_compatible` against them and aborts on a missing *required* type, so a key
//! added or dropped here can make a restore fail before it starts.

use plist::{Dictionary, Value};

/// Whether the restore wipes the Mac or installs over what is there (§10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreBehavior {
    Erase,
    Update,
}

impl RestoreBehavior {
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreBehavior::Erase => "Erase",
            RestoreBehavior::Update => "Update",
        }
    }
}

/// What the StartRestore options take from the session.
#[derive(Debug, Clone, PartialEq)]
pub struct StartRestoreParams {
    pub behavior: RestoreBehavior,
    /// The selected build identity's `Info.MacOSVariant`.
    pub macos_variant: String,
    /// `Info.MinimumSystemPartition` of the selected identity, if present.
    pub minimum_system_partition: Option<u64>,
    /// `Info.SystemPartitionPadding` of the selected identity, if present.
    pub system_partition_padding: Option<Dictionary>,
    /// `RestoreProtocolVersion` from the device's QueryType answer.
    pub restore_protocol_version: u64,
    /// Session identifier: a random uppercase GUID ([`random_uuid`]).
    pub uuid: String,
}

/// `Label` sent with every request; restored logs it.
pub const LABEL: &str = "macrescue";

/// SupportedDataTypes as idevicerestore/AC2 send them, plus the macOS 27 additions.
///
/// §7.11 decisions: `BootabilityBundleV2` = false (Apple's own host sends false, and the table
/// marks device-required types false — restored fails `is_host_compatible` without it);
/// `SourceBootObjectV5` = true and `DeviceRestoreInfoPreflight` = true (Apple's values). All
/// three are handled by [`super::handlers`].
pub fn supported_data_types() -> Dictionary {
    const TRUE: &[&str] = &[
        "AuthInstallCACert",
        "Cryptex1LocalPolicy",
        "FirmwareUpdaterDataV3",
        "FirmwareUpdaterPreflight",
        "HostSystemTime",
        "MessageUseStreamedImageFile",
        "NitrogenFWData",
        "OverlayRootDataForKey",
        "OverlayRootDataForKeyIndex",
        "PeppyFWData",
        "PersonalizedData",
        "RamdiskFWData",
        "ReceiptManifest",
        "RecoveryOSASRImage",
        "RecoveryOSAppleLogo",
        "RecoveryOSDeviceTree",
        "RecoveryOSFileAssetImage",
        "RecoveryOSIBEC",
        "RecoveryOSIBootFWFilesImages",
        "RecoveryOSImage",
        "RecoveryOSKernelCache",
        "RecoveryOSLocalPolicy",
        "RecoveryOSRootTicketData",
        "RecoveryOSStaticTrustCache",
        "RecoveryOSVersionData",
        "RestoreLocalPolicy",
        "URLAsset",
        "UpdateVolumeOverlayRootDataCount",
        // §7.11 (macOS 27), Apple's values.
        "SourceBootObjectV5",
        "DeviceRestoreInfoPreflight",
    ];
    const FALSE: &[&str] = &[
        "BasebandBootData",
        "BasebandData",
        "BasebandStackData",
        "BasebandUpdaterOutputData",
        "BootabilityBundle",
        "BuildIdentityDict",
        "BuildIdentityDictV2",
        "DataType",
        "DiagData",
        "EANData",
        "FDRMemoryCommit",
        "FDRTrustData",
        "FUDData",
        "FileData",
        "FileDataDone",
        "FirmwareUpdaterData",
        "FirmwareUpdaterDataV2",
        "GrapeFWData",
        "HPMFWData",
        "KernelCache",
        "NORData",
        "OpalFWData",
        "OverlayRootDataCount",
        "PersonalizedBootObjectV3",
        "ProvisioningData",
        "RecoveryOSOverlayRootDataCount",
        "RootData",
        "RootTicket",
        "S3EOverride",
        "SourceBootObjectV3",
        "SourceBootObjectV4",
        "SsoServiceTicket",
        "StockholmPostflight",
        "SystemImageCanonicalMetadata",
        "SystemImageData",
        "SystemImageRootHash",
        "USBCFWData",
        "USBCOverride",
        // §7.11 (macOS 27): required by the device, Apple's host sends false.
        "BootabilityBundleV2",
    ];
    flags(TRUE, FALSE)
}

/// SupportedMessageTypes, plus `RestoreProtocol` (§7.11, Apple's value true).
pub fn supported_message_types() -> Dictionary {
    const TRUE: &[&str] = &[
        "AsyncDataRequestMsg",
        "AsyncWait",
        "CheckpointMsg",
        "CrashLog",
        "FDRSubmit",
        "RestoreAttestation",
        "RestoredCrash",
        "RestoreProtocol",
    ];
    const FALSE: &[&str] = &[
        "BBUpdateStatusMsg",
        "DataRequestMsg",
        "MsgType",
        "PreviousRestoreLogMsg",
        "ProgressMsg",
        "ProvisioningAck",
        "ProvisioningInfo",
        "ProvisioningStatusMsg",
        "ReceivedFinalStatusMsg",
        "StatusMsg",
    ];
    flags(TRUE, FALSE)
}

fn flags(on: &[&str], off: &[&str]) -> Dictionary {
    let mut d = Dictionary::new();
    for k in on {
        d.insert((*k).into(), Value::Boolean(true));
    }
    for k in off {
        d.insert((*k).into(), Value::Boolean(false));
    }
    d.sort_keys();
    d
}

/// idevicerestore's SystemPartitionPadding when the identity has none.
pub fn default_system_partition_padding() -> Dictionary {
    let mut d = Dictionary::new();
    for (k, v) in [
        ("8", 80),
        ("16", 160),
        ("32", 320),
        ("64", 640),
        ("128", 1280),
        ("256", 1280),
        ("512", 1280),
        ("768", 1280),
        ("1024", 1280),
    ] {
        d.insert(k.into(), Value::Integer(v.into()));
    }
    d
}

/// The Mac RestoreOptions of §7.4, exactly.
///
/// `SupportedHostProtocols` (§7.11) is not sent: its placement is unknown (§12.17) and
/// restored versions up to 26 do not ask for it.
pub fn restore_options(p: &StartRestoreParams) -> Dictionary {
    let mut d = Dictionary::new();
    let b = |v: bool| Value::Boolean(v);
    let u = |v: u64| Value::Integer(v.into());
    d.insert("AutoBootDelay".into(), u(0));
    d.insert(
        "SupportedDataTypes".into(),
        Value::Dictionary(supported_data_types()),
    );
    d.insert(
        "SupportedMessageTypes".into(),
        Value::Dictionary(supported_message_types()),
    );
    d.insert("AddSystemPartitionPadding".into(), b(true));
    d.insert("AllowUntetheredRestore".into(), b(false));
    d.insert("AuthInstallEnableSso".into(), b(false));
    d.insert(
        "AuthInstallRecoveryOSVariant".into(),
        Value::String(p.macos_variant.clone()),
    );
    d.insert(
        "AuthInstallRestoreBehavior".into(),
        Value::String(p.behavior.as_str().into()),
    );
    d.insert("BasebandUpdaterOutputPath".into(), b(true));
    d.insert("DisableUserAuthentication".into(), b(true));
    d.insert("FitSystemPartitionToContent".into(), b(true));
    d.insert("FlashNOR".into(), b(true));
    d.insert("FormatForAPFS".into(), b(true));
    d.insert("FormatForLwVM".into(), b(false));
    d.insert("InstallDiags".into(), b(false));
    d.insert("InstallRecoveryOS".into(), b(true));
    d.insert("MacOSSwapPerformed".into(), b(true));
    d.insert("MacOSVariantPresent".into(), b(true));
    d.insert("MinimumBatteryVoltage".into(), u(0));
    d.insert("RecoveryOSUnpack".into(), b(true));
    d.insert("ShouldRestoreSystemImage".into(), b(true));
    d.insert("SkipPreflightPersonalization".into(), b(false));
    d.insert("UpdateBaseband".into(), b(true));
    // Unexplained constant that "worked with multiple macOS versions" (§7.4, §12.8).
    d.insert("recoveryOSPartitionSize".into(), u(58201));
    if let Some(size) = p.minimum_system_partition {
        d.insert("SystemPartitionSize".into(), u(size));
    }
    let mut async_types = Dictionary::new();
    for (k, v) in [
        ("BasebandData", false),
        ("RecoveryOSASRImage", false),
        ("StreamedImageDecryptionKey", false),
        ("SystemImageData", false),
        ("URLAsset", true),
    ] {
        async_types.insert(k.into(), b(v));
    }
    d.insert(
        "SupportedAsyncDataTypes".into(),
        Value::Dictionary(async_types),
    );
    d.insert("RootToInstall".into(), b(false));
    d.insert("UUID".into(), Value::String(p.uuid.clone()));
    d.insert("CreateFilesystemPartitions".into(), b(true));
    d.insert("SystemImage".into(), b(true));
    d.insert(
        "RestoreBootArgs".into(),
        Value::String("rd=md0 nand-enable-reformat=1 -progress -restore".into()),
    );
    d.insert(
        "SystemPartitionPadding".into(),
        Value::Dictionary(
            p.system_partition_padding
                .clone()
                .unwrap_or_else(default_system_partition_padding),
        ),
    );
    d
}

/// `{Request: "StartRestore", Label, RestoreOptions, RestoreProtocolVersion}`.
pub fn start_restore_request(p: &StartRestoreParams) -> Dictionary {
    let mut d = request("StartRestore");
    d.insert(
        "RestoreOptions".into(),
        Value::Dictionary(restore_options(p)),
    );
    d.insert(
        "RestoreProtocolVersion".into(),
        Value::Integer(p.restore_protocol_version.into()),
    );
    d
}

/// `{Request: name, Label}`.
pub fn request(name: &str) -> Dictionary {
    let mut d = Dictionary::new();
    d.insert("Request".into(), Value::String(name.into()));
    d.insert("Label".into(), Value::String(LABEL.into()));
    d
}

/// A random uppercase GUID (RFC 4122 version 4 layout).
pub fn random_uuid() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    // SystemRandom only fails when the OS has no entropy source at all; then a fixed-but-valid
    // GUID is still a usable session label (it only has to differ between restores in logs).
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        b = *b"macrescue-nornd!";
    }
    format_uuid(b)
}

fn format_uuid(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode_upper(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> StartRestoreParams {
        StartRestoreParams {
            behavior: RestoreBehavior::Erase,
            macos_variant: "macOS Customer".into(),
            minimum_system_partition: Some(32768),
            system_partition_padding: None,
            restore_protocol_version: 15,
            uuid: "00000000-0000-4000-8000-000000000000".into(),
        }
    }

    #[test]
    fn capability_tables_have_the_listed_sizes_and_values() {
        let dt = supported_data_types();
        // 28 true + 38 false from §7.5, 3 from §7.11.
        assert_eq!(dt.len(), 28 + 38 + 3);
        assert_eq!(
            dt.values().filter(|v| v.as_boolean() == Some(true)).count(),
            30
        );
        assert_eq!(dt.get("BootabilityBundle"), Some(&Value::Boolean(false)));
        assert_eq!(dt.get("BootabilityBundleV2"), Some(&Value::Boolean(false)));
        assert_eq!(dt.get("URLAsset"), Some(&Value::Boolean(true)));
        assert_eq!(dt.get("SourceBootObjectV5"), Some(&Value::Boolean(true)));
        let mt = supported_message_types();
        assert_eq!(mt.len(), 18);
        assert_eq!(mt.get("StatusMsg"), Some(&Value::Boolean(false)));
        assert_eq!(mt.get("RestoreProtocol"), Some(&Value::Boolean(true)));
    }

    #[test]
    fn options_match_the_mac_set() {
        let o = restore_options(&params());
        let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut want = vec![
            "AutoBootDelay",
            "SupportedDataTypes",
            "SupportedMessageTypes",
            "AddSystemPartitionPadding",
            "AllowUntetheredRestore",
            "AuthInstallEnableSso",
            "AuthInstallRecoveryOSVariant",
            "AuthInstallRestoreBehavior",
            "BasebandUpdaterOutputPath",
            "DisableUserAuthentication",
            "FitSystemPartitionToContent",
            "FlashNOR",
            "FormatForAPFS",
            "FormatForLwVM",
            "InstallDiags",
            "InstallRecoveryOS",
            "MacOSSwapPerformed",
            "MacOSVariantPresent",
            "MinimumBatteryVoltage",
            "RecoveryOSUnpack",
            "ShouldRestoreSystemImage",
            "SkipPreflightPersonalization",
            "UpdateBaseband",
            "recoveryOSPartitionSize",
            "SystemPartitionSize",
            "SupportedAsyncDataTypes",
            "RootToInstall",
            "UUID",
            "CreateFilesystemPartitions",
            "SystemImage",
            "RestoreBootArgs",
            "SystemPartitionPadding",
        ];
        want.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(
            o.get("AuthInstallRestoreBehavior")
                .and_then(Value::as_string),
            Some("Erase")
        );
        assert_eq!(
            o.get("SystemPartitionSize")
                .and_then(Value::as_unsigned_integer),
            Some(32768)
        );
        assert_eq!(
            o.get("recoveryOSPartitionSize")
                .and_then(Value::as_unsigned_integer),
            Some(58201)
        );
        let pad = o
            .get("SystemPartitionPadding")
            .and_then(Value::as_dictionary)
            .unwrap();
        assert_eq!(
            pad.get("1024").and_then(Value::as_unsigned_integer),
            Some(1280)
        );
        let mut p = params();
        p.behavior = RestoreBehavior::Update;
        p.minimum_system_partition = None;
        let o = restore_options(&p);
        assert_eq!(o.len(), 31);
        assert_eq!(
            o.get("AuthInstallRestoreBehavior")
                .and_then(Value::as_string),
            Some("Update")
        );
        let r = start_restore_request(&p);
        assert_eq!(
            r.get("Request").and_then(Value::as_string),
            Some("StartRestore")
        );
        assert_eq!(
            r.get("RestoreProtocolVersion")
                .and_then(Value::as_unsigned_integer),
            Some(15)
        );
    }

    #[test]
    fn uuid_shape() {
        let u = random_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(u, u.to_uppercase());
        assert_eq!(&u[14..15], "4");
        assert_ne!(random_uuid(), u);
        assert_eq!(
            format_uuid([0xff; 16]),
            "FFFFFFFF-FFFF-4FFF-BFFF-FFFFFFFFFFFF"
        );
    }
}
