//! `BuildManifest.plist`: build identities, their components, and which identity restores which
//! Mac (protocol.md §9.6, §10, §2.5).
//!
//! Parsing keeps the manifest's dictionary order (the boot chain uploads components in that
//! order) and never panics: anything malformed becomes a [`ManifestError`] or an absent field.
//!
//! # Identity selection
//!
//! [`BuildManifest::select_identity`] follows idevicerestore, tightened with the
//! `Info.RestoreBehavior` check pymobiledevice3 does, as ordered tiers over the identities whose
//! `Info.DeviceClass` equals the board (case-insensitive); variants containing "Research" never
//! qualify:
//!
//! * **Erase**: (1) `Variant` contains "Erase Install (IPSW)"; (2) `RestoreBehavior` is "Erase".
//! * **Update**: (1) `Variant` contains "Upgrade Install (IPSW)"; (2) `RestoreBehavior` is
//!   "Update"; (3) any identity without a `RestoreBehavior` (idevicerestore's "first identity for
//!   the board" fallback, except that we never fall back to an identity explicitly marked
//!   "Erase": a technician asking for an update must not get an erase).
//!
//! An identity whose `RestoreBehavior` contradicts the wanted behaviour is skipped in every tier.
//!
//! [`BuildManifest::select_boot_identity`] walks the same tiers but only accepts an identity that
//! has both `iBSS` and `iBEC`: software-update manifests (the Preflight ones) list a
//! "macOS Customer Software Update" identity first that carries no iBSS, and a DFU boot needs the
//! "Customer Software Update" one after it.

use std::path::Path;

use plist::{Dictionary, Value};

/// Erase (clean install) or Update (keep data when possible), §10.
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

    fn variant_marker(self) -> &'static str {
        match self {
            RestoreBehavior::Erase => "Erase Install (IPSW)",
            RestoreBehavior::Update => "Upgrade Install (IPSW)",
        }
    }
}

impl std::fmt::Display for RestoreBehavior {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The Variant of the identity that marks a macOS (rather than iOS-style) restore (§2.5).
pub const MACOS_CUSTOMER_VARIANT: &str = "macOS Customer";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read the BuildManifest {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("the BuildManifest is not a valid property list: {0}")]
    Plist(String),
    #[error("this is not a BuildManifest (no BuildIdentities array): is it Restore.plist or Info.plist? Use the BuildManifest.plist from the IPSW")]
    NotAManifest,
    #[error("BuildIdentities[{index}] is malformed: {reason}")]
    BadIdentity { index: usize, reason: &'static str },
    #[error("this IPSW has no build identity for board {board}: it is for {available}. Use the IPSW for this Mac")]
    UnknownBoard { board: String, available: String },
    #[error("this IPSW has no {behavior} build identity for board {board} (its identities: {variants}){hint}")]
    NoIdentity {
        board: String,
        behavior: RestoreBehavior,
        variants: String,
        hint: &'static str,
    },
    #[error("this IPSW has no {behavior} build identity for board {board} that can boot from DFU (none has both iBSS and iBEC; identities: {variants})")]
    NotBootable {
        board: String,
        behavior: RestoreBehavior,
        variants: String,
    },
    #[error(
        "this IPSW is not for a {product_type}: it supports {supported}. Use the IPSW for this Mac"
    )]
    UnsupportedProduct {
        product_type: String,
        supported: String,
    },
    #[error("no build identity in this IPSW matches chip {cpid:#06x} board {bdid:#04x}: it is for {available}")]
    UnknownChip {
        cpid: u32,
        bdid: u32,
        available: String,
    },
}

/// One entry of an identity's `Manifest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    pub name: String,
    pub path: Option<String>,
    pub is_loaded_by_iboot: Option<bool>,
    pub is_loaded_by_iboot_stage1: Option<bool>,
    pub is_firmware_payload: Option<bool>,
    pub img4_payload_type: Option<String>,
    pub trusted: Option<bool>,
}

impl Component {
    /// Sent during stage 1 (§3.3 step 4): `IsLoadedByiBootStage1` true and an `IsLoadedByiBoot`
    /// boolean present (either value), as idevicerestore checks.
    pub fn is_stage1_firmware(&self) -> bool {
        self.is_loaded_by_iboot_stage1 == Some(true) && self.is_loaded_by_iboot.is_some()
    }

    /// Sent during stage 2 (§3.4 step 5): loaded by iBoot but not already sent in stage 1.
    pub fn is_stage2_firmware(&self) -> bool {
        self.is_loaded_by_iboot == Some(true) && self.is_loaded_by_iboot_stage1 != Some(true)
    }
}

/// `Info` of a build identity (the fields macrescue uses).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentityInfo {
    pub device_class: String,
    pub variant: String,
    pub restore_behavior: Option<String>,
    pub macos_variant: Option<String>,
    pub build_number: Option<String>,
    pub build_train: Option<String>,
    pub requires_uid_mode: Option<bool>,
}

/// One element of `BuildIdentities`.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildIdentity {
    /// Position in `BuildIdentities`.
    pub index: usize,
    pub ap_chip_id: Option<u64>,
    pub ap_board_id: Option<u64>,
    pub ap_security_domain: Option<u64>,
    pub info: IdentityInfo,
    /// Manifest entries, in manifest order.
    pub components: Vec<Component>,
    /// The identity dictionary as read (TSS needs all of it later).
    pub raw: Dictionary,
}

impl BuildIdentity {
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }

    pub fn has(&self, name: &str) -> bool {
        self.component(name).is_some()
    }

    pub fn is_for_board(&self, board: &str) -> bool {
        self.info.device_class.eq_ignore_ascii_case(board)
    }

    /// Components uploaded in stage 1, manifest order.
    pub fn stage1_components(&self) -> impl Iterator<Item = &Component> {
        self.components.iter().filter(|c| c.is_stage1_firmware())
    }

    /// Components uploaded in stage 2 before the ramdisk, manifest order.
    pub fn stage2_components(&self) -> impl Iterator<Item = &Component> {
        self.components.iter().filter(|c| c.is_stage2_firmware())
    }

    /// idevicerestore's `is_mac` for Port DFU hints (§2.5): the identity names a MacOSVariant.
    pub fn is_mac(&self) -> bool {
        self.info.macos_variant.is_some()
    }

    /// Can this identity take a Mac from DFU to `bootx`?
    pub fn is_bootable(&self) -> bool {
        self.has("iBSS") && self.has("iBEC")
    }

    fn behavior_allows(&self, behavior: RestoreBehavior) -> bool {
        match &self.info.restore_behavior {
            Some(b) => b == behavior.as_str(),
            None => true,
        }
    }

    fn is_research(&self) -> bool {
        self.info.variant.contains("Research")
    }
}

/// A parsed `BuildManifest.plist`.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildManifest {
    pub product_version: Option<String>,
    pub product_build_version: Option<String>,
    pub supported_product_types: Vec<String>,
    pub identities: Vec<BuildIdentity>,
}

impl BuildManifest {
    pub fn from_path(path: &Path) -> Result<Self, ManifestError> {
        let bytes = std::fs::read(path).map_err(|e| ManifestError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_bytes(&bytes)
    }

    /// Parse XML or binary plist bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ManifestError> {
        let value = Value::from_reader(std::io::Cursor::new(bytes))
            .map_err(|e| ManifestError::Plist(e.to_string()))?;
        let root = value.as_dictionary().ok_or(ManifestError::NotAManifest)?;
        let identities = root
            .get("BuildIdentities")
            .and_then(Value::as_array)
            .ok_or(ManifestError::NotAManifest)?;
        let identities = identities
            .iter()
            .enumerate()
            .map(|(index, v)| parse_identity(index, v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            product_version: string(root, "ProductVersion"),
            product_build_version: string(root, "ProductBuildVersion"),
            supported_product_types: root
                .get("SupportedProductTypes")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_string().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            identities,
        })
    }

    /// Identities for `board` (its `DeviceClass`, e.g. `j274ap`), manifest order.
    pub fn identities_for_board(&self, board: &str) -> Vec<&BuildIdentity> {
        self.identities
            .iter()
            .filter(|i| i.is_for_board(board))
            .collect()
    }

    /// Distinct boards of this manifest, as "j274ap (CPID 0x8103 BDID 0x22)", for messages.
    pub fn boards(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for i in &self.identities {
            let label = match (i.ap_chip_id, i.ap_board_id) {
                (Some(c), Some(b)) => {
                    format!("{} (CPID {c:#06x} BDID {b:#04x})", i.info.device_class)
                }
                _ => i.info.device_class.clone(),
            };
            if !out.contains(&label) {
                out.push(label);
            }
        }
        out
    }

    fn boards_text(&self) -> String {
        let boards = self.boards();
        if boards.is_empty() {
            "no boards at all".to_string()
        } else {
            boards.join(", ")
        }
    }

    /// Identities for `board` in selection order (module docs), deduplicated.
    fn candidates(&self, board: &str, behavior: RestoreBehavior) -> Vec<&BuildIdentity> {
        let eligible: Vec<&BuildIdentity> = self
            .identities_for_board(board)
            .into_iter()
            .filter(|i| !i.is_research() && i.behavior_allows(behavior))
            .collect();
        fn push<'a>(i: &'a BuildIdentity, out: &mut Vec<&'a BuildIdentity>) {
            if !out.iter().any(|o| o.index == i.index) {
                out.push(i);
            }
        }
        let mut out: Vec<&BuildIdentity> = Vec::new();
        let marker = behavior.variant_marker();
        // idevicerestore tries an exact Variant match before the partial one.
        for i in eligible.iter().filter(|i| i.info.variant == marker) {
            push(i, &mut out);
        }
        for i in eligible.iter().filter(|i| i.info.variant.contains(marker)) {
            push(i, &mut out);
        }
        for i in eligible
            .iter()
            .filter(|i| i.info.restore_behavior.as_deref() == Some(behavior.as_str()))
        {
            push(i, &mut out);
        }
        if behavior == RestoreBehavior::Update {
            for i in eligible
                .iter()
                .filter(|i| i.info.restore_behavior.is_none())
            {
                push(i, &mut out);
            }
        }
        out
    }

    fn variants_text(&self, board: &str) -> String {
        let v: Vec<String> = self
            .identities_for_board(board)
            .iter()
            .map(|i| format!("\"{}\"", i.info.variant))
            .collect();
        v.join(", ")
    }

    fn check_board(&self, board: &str) -> Result<(), ManifestError> {
        if self.identities_for_board(board).is_empty() {
            return Err(ManifestError::UnknownBoard {
                board: board.to_string(),
                available: self.boards_text(),
            });
        }
        Ok(())
    }

    /// The identity idevicerestore would restore `board` with (module docs).
    pub fn select_identity(
        &self,
        board: &str,
        behavior: RestoreBehavior,
    ) -> Result<&BuildIdentity, ManifestError> {
        self.check_board(board)?;
        self.candidates(board, behavior)
            .into_iter()
            .next()
            .ok_or_else(|| self.no_identity(board, behavior))
    }

    /// The identity to boot `board` from DFU with: the first selection candidate that has iBSS
    /// and iBEC (module docs).
    pub fn select_boot_identity(
        &self,
        board: &str,
        behavior: RestoreBehavior,
    ) -> Result<&BuildIdentity, ManifestError> {
        self.check_board(board)?;
        let candidates = self.candidates(board, behavior);
        if candidates.is_empty() {
            return Err(self.no_identity(board, behavior));
        }
        candidates
            .into_iter()
            .find(|i| i.is_bootable())
            .ok_or_else(|| ManifestError::NotBootable {
                board: board.to_string(),
                behavior,
                variants: self.variants_text(board),
            })
    }

    fn no_identity(&self, board: &str, behavior: RestoreBehavior) -> ManifestError {
        ManifestError::NoIdentity {
            board: board.to_string(),
            behavior,
            variants: self.variants_text(board),
            hint: match behavior {
                RestoreBehavior::Erase => {
                    " — a software-update manifest cannot erase; use the full IPSW, or restore without --erase"
                }
                RestoreBehavior::Update => "",
            },
        }
    }

    /// idevicerestore requires the product type in `SupportedProductTypes` (§9.6). A manifest
    /// without the list does not restrict.
    pub fn check_product(&self, product_type: &str) -> Result<(), ManifestError> {
        if self.supported_product_types.is_empty()
            || self
                .supported_product_types
                .iter()
                .any(|p| p == product_type)
        {
            Ok(())
        } else {
            Err(ManifestError::UnsupportedProduct {
                product_type: product_type.to_string(),
                supported: self.supported_product_types.join(", "),
            })
        }
    }

    /// The `macOS Customer` identity of `board` (exact Variant), which marks a macOS restore.
    pub fn macos_customer_identity(&self, board: &str) -> Option<&BuildIdentity> {
        self.identities_for_board(board)
            .into_iter()
            .find(|i| i.info.variant == MACOS_CUSTOMER_VARIANT)
    }

    /// idevicerestore's "macOS restore path" detection (§2.5).
    pub fn is_macos_restore(&self, board: &str) -> bool {
        self.macos_customer_identity(board).is_some()
    }

    /// The board (`DeviceClass`, lowercase) of the identities built for chip `cpid` and board
    /// `bdid`: the fallback for a Mac missing from macrescue's CPID+BDID table.
    pub fn board_for_chip(&self, cpid: u32, bdid: u32) -> Result<String, ManifestError> {
        self.identities
            .iter()
            .find(|i| {
                i.ap_chip_id == Some(u64::from(cpid))
                    && i.ap_board_id == Some(u64::from(bdid))
                    && !i.info.device_class.is_empty()
            })
            .map(|i| i.info.device_class.to_ascii_lowercase())
            .ok_or_else(|| ManifestError::UnknownChip {
                cpid,
                bdid,
                available: self.boards_text(),
            })
    }
}

fn string(d: &Dictionary, key: &str) -> Option<String> {
    d.get(key).and_then(Value::as_string).map(str::to_string)
}

fn boolean(d: &Dictionary, key: &str) -> Option<bool> {
    d.get(key).and_then(Value::as_boolean)
}

/// A uint the way libplist reads manifest values: integers as they are, strings with
/// `strtoull(s, 0)` rules (`0x` hex, leading `0` octal, else decimal).
pub fn manifest_uint(v: &Value) -> Option<u64> {
    match v {
        Value::Integer(i) => i.as_unsigned(),
        Value::String(s) => parse_c_uint(s.trim()),
        _ => None,
    }
}

fn parse_c_uint(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

fn parse_identity(index: usize, v: &Value) -> Result<BuildIdentity, ManifestError> {
    let d = v.as_dictionary().ok_or(ManifestError::BadIdentity {
        index,
        reason: "not a dictionary",
    })?;
    let info = d
        .get("Info")
        .and_then(Value::as_dictionary)
        .ok_or(ManifestError::BadIdentity {
            index,
            reason: "no Info dictionary",
        })?;
    let info = IdentityInfo {
        device_class: string(info, "DeviceClass").ok_or(ManifestError::BadIdentity {
            index,
            reason: "no Info.DeviceClass string",
        })?,
        variant: string(info, "Variant").unwrap_or_default(),
        restore_behavior: string(info, "RestoreBehavior"),
        macos_variant: string(info, "MacOSVariant"),
        build_number: string(info, "BuildNumber"),
        build_train: string(info, "BuildTrain"),
        requires_uid_mode: boolean(info, "RequiresUIDMode"),
    };
    let components = match d.get("Manifest") {
        None => Vec::new(),
        Some(m) => m
            .as_dictionary()
            .ok_or(ManifestError::BadIdentity {
                index,
                reason: "Manifest is not a dictionary",
            })?
            .iter()
            .map(|(name, entry)| parse_component(name, entry))
            .collect(),
    };
    Ok(BuildIdentity {
        index,
        ap_chip_id: d.get("ApChipID").and_then(manifest_uint),
        ap_board_id: d.get("ApBoardID").and_then(manifest_uint),
        ap_security_domain: d.get("ApSecurityDomain").and_then(manifest_uint),
        info,
        components,
        raw: d.clone(),
    })
}

fn parse_component(name: &str, entry: &Value) -> Component {
    let entry = entry.as_dictionary();
    let info = entry
        .and_then(|e| e.get("Info"))
        .and_then(Value::as_dictionary);
    let info_bool = |key| info.and_then(|i| boolean(i, key));
    Component {
        name: name.to_string(),
        path: info.and_then(|i| string(i, "Path")),
        is_loaded_by_iboot: info_bool("IsLoadedByiBoot"),
        is_loaded_by_iboot_stage1: info_bool("IsLoadedByiBootStage1"),
        is_firmware_payload: info_bool("IsFirmwarePayload"),
        img4_payload_type: info.and_then(|i| string(i, "Img4PayloadType")),
        trusted: entry.and_then(|e| boolean(e, "Trusted")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    pub(crate) fn shared() -> PathBuf {
        std::env::var_os("MACRESCUE_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")))
    }

    fn manifests_dir() -> PathBuf {
        shared().join("fixtures/manifests")
    }

    fn all_plists() -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).expect("fixture directory readable") {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "plist") {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(&manifests_dir(), &mut out);
        out.sort();
        out
    }

    fn preflight(board_file: &str) -> BuildManifest {
        BuildManifest::from_path(
            &manifests_dir()
                .join("macOS_26.2_25C56_PreflightBuildManifests")
                .join(format!("{board_file}.BuildManifest.plist")),
        )
        .unwrap()
    }

    #[test]
    fn every_fixture_plist_parses_or_is_rejected_cleanly() {
        let files = all_plists();
        assert!(files.len() >= 50, "fixtures missing: {}", files.len());
        let mut manifests = 0;
        for f in &files {
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            match BuildManifest::from_path(f) {
                Ok(m) => {
                    manifests += 1;
                    assert!(name.ends_with("BuildManifest.plist"), "{name}");
                    assert!(!m.identities.is_empty(), "{name}");
                    assert!(m.product_version.is_some(), "{name}");
                }
                Err(e) => {
                    assert_eq!(e, ManifestError::NotAManifest, "{name}");
                    assert!(!name.contains("BuildManifest"), "{name}");
                }
            }
        }
        // 45 Preflight + BootabilityBundle + 2 iOS.
        assert_eq!(manifests, 48);
    }

    #[test]
    fn every_mac_preflight_manifest_selects_the_identity_with_ibss() {
        let dir = manifests_dir().join("macOS_26.2_25C56_PreflightBuildManifests");
        let mut macs = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let m = BuildManifest::from_path(&path).unwrap();
            assert_eq!(m.product_version.as_deref(), Some("26.2"));
            assert_eq!(m.product_build_version.as_deref(), Some("25C56"));
            assert!(m.supported_product_types.iter().any(|p| p == "Macmini9,1"));
            let first = &m.identities[0];
            let board = first.info.device_class.clone();
            let file_board = path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .split('.')
                .next()
                .unwrap()
                .to_ascii_lowercase();
            assert_eq!(board, file_board);
            let cpid = first.ap_chip_id.unwrap() as u32;
            let bdid = first.ap_board_id.unwrap() as u32;
            assert_eq!(m.board_for_chip(cpid, bdid).unwrap(), board);
            // Upper-case lookups work (DeviceClass is compared case-insensitively).
            let upper = board.to_ascii_uppercase();
            if cpid == 0x8012 {
                // T2 boards (J160, X86LEGACY): not Apple Silicon, erase-only firmware identities.
                assert!(m
                    .select_boot_identity(&board, RestoreBehavior::Update)
                    .is_err());
                continue;
            }
            macs += 1;
            let sel = m.select_identity(&upper, RestoreBehavior::Update).unwrap();
            assert_eq!(sel.info.variant, "macOS Customer Software Update");
            let boot = m
                .select_boot_identity(&upper, RestoreBehavior::Update)
                .unwrap();
            assert_eq!(boot.info.variant, "Customer Software Update");
            assert_eq!(boot.info.restore_behavior.as_deref(), Some("Update"));
            assert!(boot.is_bootable());
            let err = m
                .select_boot_identity(&board, RestoreBehavior::Erase)
                .unwrap_err();
            assert!(
                matches!(&err, ManifestError::NoIdentity { board: b, behavior: RestoreBehavior::Erase, .. } if *b == upper || *b == board)
            );
            assert!(err.to_string().contains(&board), "{err}");
            assert!(!m.is_macos_restore(&board));
            // Every Mac sends RestoreLogo, the ramdisk, device tree and kernel cache in stage 2.
            for c in [
                "RestoreLogo",
                "RestoreRamDisk",
                "RestoreDeviceTree",
                "RestoreKernelCache",
            ] {
                assert!(boot.has(c), "{board} lacks {c}");
            }
        }
        assert_eq!(macs, 43);
    }

    #[test]
    fn j274_components_in_manifest_order() {
        let m = preflight("J274AP");
        let id = m
            .select_boot_identity("j274ap", RestoreBehavior::Update)
            .unwrap();
        let s1: Vec<&str> = id.stage1_components().map(|c| c.name.as_str()).collect();
        assert_eq!(
            s1,
            ["Ap,RestoreCIO", "Ap,RestoreTMU", "RestoreANS", "RestoreDCP"]
        );
        let s2: Vec<&str> = id.stage2_components().map(|c| c.name.as_str()).collect();
        assert_eq!(
            s2,
            [
                "ANE",
                "AOP",
                "AVE",
                "Ap,RestoreDCP2",
                "GFX",
                "PMP",
                "RestoreTrustCache",
                "SIO",
                "iBootData"
            ]
        );
        assert_eq!(id.ap_chip_id, Some(0x8103));
        assert_eq!(id.ap_board_id, Some(0x22));
        let ibss = id.component("iBSS").unwrap();
        assert_eq!(
            ibss.path.as_deref(),
            Some("Firmware/dfu/iBSS.j274.RELEASE.im4p")
        );
        assert_eq!(
            id.component("RestoreLogo")
                .unwrap()
                .img4_payload_type
                .as_deref(),
            Some("rlgo")
        );
        assert_eq!(id.info.build_number.as_deref(), Some("25C56"));
    }

    #[test]
    fn ios_manifests_follow_idevicerestore_variant_rules() {
        let m = BuildManifest::from_path(
            &manifests_dir().join("iOS_26.2.1_23C71_iPhone13,2/BuildManifest.plist"),
        )
        .unwrap();
        let e = m.select_identity("D53GAP", RestoreBehavior::Erase).unwrap();
        assert_eq!(e.info.variant, "Customer Erase Install (IPSW)");
        assert_eq!(e.index, 0);
        let u = m
            .select_identity("d53gap", RestoreBehavior::Update)
            .unwrap();
        assert_eq!(u.info.variant, "Customer Upgrade Install (IPSW)");
        assert_eq!(u.index, 2);
        let u = m
            .select_identity("d53pap", RestoreBehavior::Update)
            .unwrap();
        assert_eq!(u.index, 3);
        assert_eq!(m.board_for_chip(0x8101, 0x0E).unwrap(), "d53pap");
        // Not a Mac board.
        let err = m
            .select_identity("j274ap", RestoreBehavior::Update)
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("j274ap"), "{text}");
        assert!(text.contains("d53gap (CPID 0x8101 BDID 0x0c)"), "{text}");
        assert!(text.contains("d53pap"), "{text}");
        assert!(m.check_product("iPhone13,2").is_ok());
        let err = m.check_product("Macmini9,1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "this IPSW is not for a Macmini9,1: it supports iPhone13,2, iPhone13,3. Use the IPSW for this Mac"
        );
        let err = m.board_for_chip(0x8103, 0x22).unwrap_err();
        assert!(matches!(
            err,
            ManifestError::UnknownChip {
                cpid: 0x8103,
                bdid: 0x22,
                ..
            }
        ));

        let old = BuildManifest::from_path(
            &manifests_dir().join("iOS_13.5.1_17F80_iPhone9,x/BuildManifest.plist"),
        )
        .unwrap();
        let e = old
            .select_boot_identity("d101ap", RestoreBehavior::Erase)
            .unwrap();
        assert_eq!(
            (e.index, e.info.variant.as_str()),
            (0, "Customer Erase Install (IPSW)")
        );
        let u = old
            .select_boot_identity("d101ap", RestoreBehavior::Update)
            .unwrap();
        assert_eq!(u.index, 4);
    }

    #[test]
    fn research_identities_are_never_selected() {
        let xml = manifest_xml(&[
            (
                "j274ap",
                "Research Customer Erase Install (IPSW)",
                None,
                true,
            ),
            (
                "j274ap",
                "Customer Erase Install (IPSW)",
                Some("Erase"),
                true,
            ),
        ]);
        let m = BuildManifest::from_bytes(xml.as_bytes()).unwrap();
        assert_eq!(
            m.select_identity("j274ap", RestoreBehavior::Erase)
                .unwrap()
                .index,
            1
        );
        let xml = manifest_xml(&[(
            "j274ap",
            "Research Customer Upgrade Install (IPSW)",
            None,
            true,
        )]);
        let m = BuildManifest::from_bytes(xml.as_bytes()).unwrap();
        assert!(m
            .select_identity("j274ap", RestoreBehavior::Update)
            .is_err());
    }

    #[test]
    fn update_never_falls_back_to_an_erase_identity() {
        let xml = manifest_xml(&[
            ("j274ap", "macOS Customer", Some("Erase"), true),
            (
                "j274ap",
                "Customer Erase Install (IPSW)",
                Some("Erase"),
                true,
            ),
        ]);
        let m = BuildManifest::from_bytes(xml.as_bytes()).unwrap();
        assert!(m.is_macos_restore("J274AP"));
        assert_eq!(m.macos_customer_identity("j274ap").unwrap().index, 0);
        assert!(matches!(
            m.select_identity("j274ap", RestoreBehavior::Update),
            Err(ManifestError::NoIdentity { .. })
        ));
        assert_eq!(
            m.select_identity("j274ap", RestoreBehavior::Erase)
                .unwrap()
                .index,
            1
        );
        // Without RestoreBehavior, idevicerestore's first-identity fallback applies.
        let xml = manifest_xml(&[
            ("j293ap", "Something", None, false),
            ("j293ap", "Other", None, true),
        ]);
        let m = BuildManifest::from_bytes(xml.as_bytes()).unwrap();
        assert_eq!(
            m.select_identity("j293ap", RestoreBehavior::Update)
                .unwrap()
                .index,
            0
        );
        assert_eq!(
            m.select_boot_identity("j293ap", RestoreBehavior::Update)
                .unwrap()
                .index,
            1
        );
        // A full macOS IPSW layout: Erase, Upgrade, macOS Customer.
        let xml = manifest_xml(&[
            (
                "j313ap",
                "Customer Erase Install (IPSW)",
                Some("Erase"),
                true,
            ),
            (
                "j313ap",
                "Customer Upgrade Install (IPSW)",
                Some("Update"),
                true,
            ),
            ("j313ap", "macOS Customer", Some("Erase"), true),
        ]);
        let m = BuildManifest::from_bytes(xml.as_bytes()).unwrap();
        assert_eq!(
            m.select_boot_identity("j313ap", RestoreBehavior::Erase)
                .unwrap()
                .index,
            0
        );
        assert_eq!(
            m.select_boot_identity("j313ap", RestoreBehavior::Update)
                .unwrap()
                .index,
            1
        );
        assert!(m.is_macos_restore("j313ap"));
    }

    #[test]
    fn bootability_bundle_manifest_cannot_boot() {
        let m = BuildManifest::from_path(
            &manifests_dir()
                .join("macOS_26.2_25C56_SharedSupport/BootabilityBundle/BuildManifest.plist"),
        )
        .unwrap();
        assert_eq!(m.identities.len(), 1);
        assert_eq!(m.identities[0].info.device_class, "bootabilityap");
        let err = m
            .select_boot_identity("bootabilityap", RestoreBehavior::Update)
            .unwrap_err();
        assert!(matches!(err, ManifestError::NotBootable { .. }), "{err}");
    }

    #[test]
    fn uint_parsing_follows_strtoull() {
        assert_eq!(manifest_uint(&Value::String("0x8103".into())), Some(0x8103));
        assert_eq!(manifest_uint(&Value::String("0X0C".into())), Some(12));
        assert_eq!(manifest_uint(&Value::String("34".into())), Some(34));
        assert_eq!(manifest_uint(&Value::String("010".into())), Some(8));
        assert_eq!(manifest_uint(&Value::String("0".into())), Some(0));
        assert_eq!(manifest_uint(&Value::String("zz".into())), None);
        assert_eq!(manifest_uint(&Value::Integer(0x22.into())), Some(0x22));
        assert_eq!(manifest_uint(&Value::Integer((-1i64).into())), None);
        assert_eq!(manifest_uint(&Value::Boolean(true)), None);
    }

    #[test]
    fn malformed_inputs_give_errors() {
        assert!(matches!(
            BuildManifest::from_bytes(b"not a plist"),
            Err(ManifestError::Plist(_))
        ));
        assert!(matches!(
            BuildManifest::from_bytes(b""),
            Err(ManifestError::Plist(_))
        ));
        let arr = r#"<?xml version="1.0"?><plist version="1.0"><array/></plist>"#;
        assert_eq!(
            BuildManifest::from_bytes(arr.as_bytes()),
            Err(ManifestError::NotAManifest)
        );
        let wrong = r#"<plist version="1.0"><dict><key>BuildIdentities</key><string>x</string></dict></plist>"#;
        assert_eq!(
            BuildManifest::from_bytes(wrong.as_bytes()),
            Err(ManifestError::NotAManifest)
        );
        let bad_id = r#"<plist version="1.0"><dict><key>BuildIdentities</key><array><string>x</string></array></dict></plist>"#;
        assert!(matches!(
            BuildManifest::from_bytes(bad_id.as_bytes()),
            Err(ManifestError::BadIdentity { index: 0, .. })
        ));
        let no_class = r#"<plist version="1.0"><dict><key>BuildIdentities</key><array><dict><key>Info</key><dict/></dict></array></dict></plist>"#;
        assert!(matches!(
            BuildManifest::from_bytes(no_class.as_bytes()),
            Err(ManifestError::BadIdentity { index: 0, .. })
        ));
        // Odd component shapes are tolerated, not fatal.
        let odd = r#"<plist version="1.0"><dict><key>BuildIdentities</key><array><dict><key>Info</key><dict><key>DeviceClass</key><string>j1ap</string></dict><key>Manifest</key><dict><key>A</key><string>x</string><key>B</key><dict><key>Info</key><dict><key>IsLoadedByiBoot</key><string>YES</string></dict></dict></dict></dict></array></dict></plist>"#;
        let m = BuildManifest::from_bytes(odd.as_bytes()).unwrap();
        assert_eq!(m.identities[0].components.len(), 2);
        assert_eq!(m.identities[0].components[1].is_loaded_by_iboot, None);
        // Truncations of a real manifest never panic.
        let real = std::fs::read(
            manifests_dir()
                .join("macOS_26.2_25C56_PreflightBuildManifests/J313AP.BuildManifest.plist"),
        )
        .unwrap();
        for cut in (0..real.len()).step_by(7919) {
            let _ = BuildManifest::from_bytes(&real[..cut]);
        }
    }

    /// A minimal manifest: (board, variant, RestoreBehavior, has iBSS+iBEC).
    pub(crate) fn manifest_xml(ids: &[(&str, &str, Option<&str>, bool)]) -> String {
        let mut s = String::from(
            r#"<?xml version="1.0" encoding="UTF-8"?><plist version="1.0"><dict><key>ProductVersion</key><string>26.2</string><key>BuildIdentities</key><array>"#,
        );
        for (board, variant, behavior, boot) in ids {
            s.push_str("<dict><key>ApChipID</key><string>0x8103</string><key>ApBoardID</key><string>0x22</string><key>Info</key><dict>");
            s.push_str(&format!(
                "<key>DeviceClass</key><string>{board}</string><key>Variant</key><string>{variant}</string>"
            ));
            if let Some(b) = behavior {
                s.push_str(&format!("<key>RestoreBehavior</key><string>{b}</string>"));
            }
            s.push_str("</dict><key>Manifest</key><dict>");
            if *boot {
                s.push_str("<key>iBSS</key><dict><key>Info</key><dict><key>Path</key><string>iBSS.im4p</string></dict></dict>");
                s.push_str("<key>iBEC</key><dict><key>Info</key><dict><key>Path</key><string>iBEC.im4p</string></dict></dict>");
            }
            s.push_str("</dict></dict>");
        }
        s.push_str("</array></dict></plist>");
        s
    }
}
