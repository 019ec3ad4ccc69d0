//! The restore plan: which build identity restores this Mac, and which component goes out at
//! which stage, with its IM4P path and 4CC (issue 3 item 4; protocol.md §2.4, §3.3, §3.4,
//! §7.7, §9.5, §9.6, §10).
//!
//! The boot-chain stages are read off the step lists of [`crate::bootchain::plan`] (the
//! uploads, in order), never recomputed from the manifest flags here: the plan a technician
//! reads is exactly what the driver will send.

use serde_json::{json, Value as Json};

use crate::bootchain::plan::{self as steps, PlanError, Step, LOCAL_POLICY};
use crate::img4::fourcc;
use crate::manifest::{BuildIdentity, BuildManifest, ManifestError, RestoreBehavior};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestorePlanError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Steps(#[from] PlanError),
    #[error("this BuildManifest is a software update (identities for {board}: {variants}): it can revive/update a Mac but not erase one. Erase needs the full restore IPSW (UniversalMac_<version>_<build>_Restore.ipsw): download it, or run without --erase")]
    EraseNeedsFullIpsw { board: String, variants: String },
}

/// Which ticket personalizes a boot-chain component (§5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketKind {
    /// The main `ApImg4Ticket` (§4.4).
    Main,
    /// The DFU-stage local-policy ticket (§4.6), only for `Ap,LocalPolicy`.
    LocalPolicy,
}

impl TicketKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TicketKind::Main => "main",
            TicketKind::LocalPolicy => "local-policy",
        }
    }
}

/// One upload of the boot chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedComponent {
    /// Manifest component name (`iBSS`, `Ap,RestoreTMU`, …).
    pub component: String,
    /// `Manifest.<component>.Info.Path`; `None` for `Ap,LocalPolicy`, whose IM4P is built in.
    pub path: Option<String>,
    /// The 4CC the stitched payload carries (restore rewrite, else `Img4PayloadType`, else
    /// the fixed table); `None` when no source names one (newer components such as `AOP2`):
    /// the IM4P then keeps the tag it has in the IPSW.
    pub fourcc: Option<[u8; 4]>,
    pub ticket: TicketKind,
}

/// Something restore mode will ask for (§7.7), for the technician's overview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanItem {
    pub component: String,
    pub path: Option<String>,
    pub purpose: String,
}

/// What the plan says about the chosen identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentitySummary {
    /// Position in `BuildIdentities`.
    pub index: usize,
    pub device_class: String,
    pub variant: String,
    pub restore_behavior: Option<String>,
    pub macos_variant: Option<String>,
    pub build: Option<String>,
}

/// The macOS markers of the manifest for this board (§2.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacosVariants {
    /// An identity with Variant exactly `macOS Customer` exists: idevicerestore's macOS path.
    pub macos_customer: bool,
    /// `Info.MacOSVariant` (of the chosen identity, else of the `macOS Customer` one): names
    /// the global manifest directory.
    pub macos_variant: Option<String>,
    /// Every identity of the board is a software update (Preflight manifests): no erase.
    pub software_update_only: bool,
}

/// The whole plan for one Mac.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePlan {
    pub board: String,
    pub behavior: RestoreBehavior,
    pub product_version: Option<String>,
    pub product_build: Option<String>,
    pub identity: IdentitySummary,
    pub variants: MacosVariants,
    pub dfu: Vec<PlannedComponent>,
    pub stage1: Vec<PlannedComponent>,
    pub stage2: Vec<PlannedComponent>,
    pub restore: Vec<PlanItem>,
}

/// The 4CC a component's stitched IMG4 carries (§5.2, §5.7).
pub fn component_fourcc(c: &crate::manifest::Component) -> Option<[u8; 4]> {
    fourcc::restore_rewrite(&c.name)
        .or_else(|| fourcc::component_fourcc(&c.name, c.img4_payload_type.as_deref()))
}

/// A 4CC for display: trailing NULs dropped (`OS\0\0` → `OS`), anything unprintable as `?`.
pub fn fourcc_text(tag: [u8; 4]) -> String {
    let end = tag.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    tag[..end]
        .iter()
        .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
        .collect()
}

/// The uploads of a step list, in order, as planned components.
pub fn uploads(identity: &BuildIdentity, steps: &[Step]) -> Vec<PlannedComponent> {
    steps::components(&[steps])
        .into_iter()
        .map(|name| {
            if name == LOCAL_POLICY {
                return PlannedComponent {
                    fourcc: fourcc::table_fourcc(LOCAL_POLICY),
                    component: name,
                    path: None,
                    ticket: TicketKind::LocalPolicy,
                };
            }
            let entry = identity.component(&name);
            PlannedComponent {
                path: entry.and_then(|c| c.path.clone()),
                fourcc: entry
                    .and_then(component_fourcc)
                    .or_else(|| fourcc::table_fourcc(&name)),
                component: name,
                ticket: TicketKind::Main,
            }
        })
        .collect()
}

const GLOBAL_MANIFEST_PURPOSE: &str =
    "PersonalizedBootObjectV3 / SourceBootObjectV4: the global manifest, sent as is";
const NO_GLOBAL_MANIFEST_PURPOSE: &str = "PersonalizedBootObjectV3 / SourceBootObjectV4: \
    no Info.MacOSVariant in this manifest, so no global manifest path (full IPSWs have one)";

fn global_manifest_path(macos_variant: &str, device_class: &str) -> String {
    format!("Firmware/Manifests/restore/{macos_variant}/apticket.{device_class}.im4m")
}

impl RestorePlan {
    /// Choose the identity the driver will boot (`select_boot_identity`) and lay out every
    /// stage.
    pub fn new(
        manifest: &BuildManifest,
        board: &str,
        behavior: RestoreBehavior,
    ) -> Result<Self, RestorePlanError> {
        let board_ids = manifest.identities_for_board(board);
        let software_update_only = !board_ids.is_empty()
            && board_ids
                .iter()
                .all(|i| i.info.variant.contains("Software Update"));
        let identity = match manifest.select_boot_identity(board, behavior) {
            Ok(i) => i,
            Err(ManifestError::NoIdentity { variants, .. })
                if behavior == RestoreBehavior::Erase && software_update_only =>
            {
                return Err(RestorePlanError::EraseNeedsFullIpsw {
                    board: board.to_string(),
                    variants,
                })
            }
            Err(e) => return Err(e.into()),
        };
        let customer = manifest.macos_customer_identity(board);
        let macos_variant = identity
            .info
            .macos_variant
            .clone()
            .or_else(|| customer.and_then(|c| c.info.macos_variant.clone()));

        let dfu = uploads(identity, &steps::dfu(identity)?);
        // Macs always come back from iBSS with a Recovery PID (§2.4), so the stage-1 list is
        // the one with `go`; the uploads are the same either way.
        let stage1 = uploads(identity, &steps::stage1(identity, true)?);
        let stage2 = uploads(identity, &steps::stage2(identity)?);

        let mut restore = vec![
            PlanItem {
                component: "OS".into(),
                path: identity.component("OS").and_then(|c| c.path.clone()),
                purpose: "SystemImageData / RecoveryOSASRImage: streamed over ASR as is".into(),
            },
            PlanItem {
                component: "__GlobalManifest__".into(),
                path: macos_variant
                    .as_deref()
                    .map(|v| global_manifest_path(v, &identity.info.device_class)),
                purpose: if macos_variant.is_some() {
                    GLOBAL_MANIFEST_PURPOSE.into()
                } else {
                    NO_GLOBAL_MANIFEST_PURPOSE.into()
                },
            },
            PlanItem {
                component: "__RestoreVersion__".into(),
                path: Some("RestoreVersion.plist".into()),
                purpose: "PersonalizedBootObjectV3: sent as is".into(),
            },
            PlanItem {
                component: "__SystemVersion__".into(),
                path: Some("SystemVersion.plist".into()),
                purpose: "PersonalizedBootObjectV3: sent as is".into(),
            },
            PlanItem {
                component: "RecoveryOSRootTicketData".into(),
                path: None,
                purpose: "the recoveryOS root ticket (TSS, §4.7) over this identity".into(),
            },
        ];
        let lp_identity = match behavior {
            RestoreBehavior::Erase => customer.map_or_else(
                || "the macOS Customer identity (missing from this manifest)".to_string(),
                |c| format!("the \"{}\" identity", c.info.variant),
            ),
            RestoreBehavior::Update => format!("the \"{}\" identity", identity.info.variant),
        };
        restore.push(PlanItem {
            component: "RecoveryOSLocalPolicy".into(),
            path: None,
            purpose: format!(
                "the built-in lpol IM4P with a local-boot ticket (TSS, §4.8) over {lp_identity}"
            ),
        });

        Ok(RestorePlan {
            board: identity.info.device_class.clone(),
            behavior,
            product_version: manifest.product_version.clone(),
            product_build: manifest.product_build_version.clone(),
            identity: IdentitySummary {
                index: identity.index,
                device_class: identity.info.device_class.clone(),
                variant: identity.info.variant.clone(),
                restore_behavior: identity.info.restore_behavior.clone(),
                macos_variant: identity.info.macos_variant.clone(),
                build: identity
                    .info
                    .build_number
                    .clone()
                    .or_else(|| manifest.product_build_version.clone()),
            },
            variants: MacosVariants {
                macos_customer: customer.is_some(),
                macos_variant,
                software_update_only,
            },
            dfu,
            stage1,
            stage2,
            restore,
        })
    }

    /// The identity the plan chose, from the manifest it was made from.
    pub fn identity_in<'m>(&self, manifest: &'m BuildManifest) -> Option<&'m BuildIdentity> {
        manifest
            .identities
            .iter()
            .find(|i| i.index == self.identity.index)
    }

    /// Every boot-chain component, first use first, without repeats (what must exist before
    /// DFU starts).
    pub fn boot_components(&self) -> Vec<&PlannedComponent> {
        let mut out: Vec<&PlannedComponent> = Vec::new();
        for c in self.dfu.iter().chain(&self.stage1).chain(&self.stage2) {
            if !out.iter().any(|o| o.component == c.component) {
                out.push(c);
            }
        }
        out
    }

    /// The plan as JSON (the `plan --json` schema, minus the TSS request).
    pub fn to_json(&self) -> Json {
        let comps = |list: &[PlannedComponent]| -> Json {
            list.iter()
                .map(|c| {
                    json!({
                        "component": c.component,
                        "path": c.path,
                        "fourcc": c.fourcc.map(fourcc_text),
                        "ticket": c.ticket.as_str(),
                    })
                })
                .collect()
        };
        let restore: Json = self
            .restore
            .iter()
            .map(|i| json!({"component": i.component, "path": i.path, "purpose": i.purpose}))
            .collect();
        json!({
            "board": self.board,
            "behavior": self.behavior.as_str(),
            "product_version": self.product_version,
            "product_build": self.product_build,
            "identity": {
                "index": self.identity.index,
                "device_class": self.identity.device_class,
                "variant": self.identity.variant,
                "restore_behavior": self.identity.restore_behavior,
                "macos_variant": self.identity.macos_variant,
                "build": self.identity.build,
            },
            "variants": {
                "macos_customer": self.variants.macos_customer,
                "macos_variant": self.variants.macos_variant,
                "software_update_only": self.variants.software_update_only,
            },
            "stages": {
                "dfu": comps(&self.dfu),
                "stage1": comps(&self.stage1),
                "stage2": comps(&self.stage2),
                "restore": restore,
            },
        })
    }

    /// The plan for a technician, one line per component.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        // Writing to a String cannot fail.
        let _ = writeln!(
            s,
            "macOS {} ({}) for board {}, {}",
            opt(&self.product_version),
            opt(&self.product_build),
            self.board,
            match self.behavior {
                RestoreBehavior::Erase => "Erase (clean install)",
                RestoreBehavior::Update => "Update (revive, keep data when possible)",
            }
        );
        let _ = writeln!(
            s,
            "identity #{}: \"{}\" (RestoreBehavior {}, MacOSVariant {}, build {})",
            self.identity.index,
            self.identity.variant,
            opt(&self.identity.restore_behavior),
            opt(&self.identity.macos_variant),
            opt(&self.identity.build)
        );
        let _ = writeln!(
            s,
            "macOS Customer identity: {}; MacOSVariant: {}{}",
            if self.variants.macos_customer {
                "present"
            } else {
                "absent"
            },
            opt(&self.variants.macos_variant),
            if self.variants.software_update_only {
                "; software-update manifest (Update only; Erase needs the full IPSW)"
            } else {
                ""
            }
        );
        for (title, list) in [
            ("DFU (SecureROM)", &self.dfu),
            ("stage 1 (iBSS)", &self.stage1),
            ("stage 2 (iBEC)", &self.stage2),
        ] {
            let _ = writeln!(s, "\n{title}:");
            for c in list {
                let _ = writeln!(
                    s,
                    "  {:<36} {:<5} {}{}",
                    c.component,
                    c.fourcc.map(fourcc_text).unwrap_or_else(|| "(own)".into()),
                    c.path
                        .clone()
                        .unwrap_or_else(|| "(built in: 22-byte lpol IM4P)".into()),
                    match c.ticket {
                        TicketKind::LocalPolicy => "  [local-policy ticket]",
                        TicketKind::Main => "",
                    }
                );
            }
        }
        let _ = writeln!(s, "\nrestore mode:");
        for i in &self.restore {
            let _ = writeln!(
                s,
                "  {:<26} {}\n  {:<26} {}",
                i.component,
                i.path.clone().unwrap_or_else(|| "-".into()),
                "",
                i.purpose
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fourcc_text_trims_and_escapes() {
        assert_eq!(fourcc_text(*b"ibss"), "ibss");
        assert_eq!(fourcc_text(*b"OS\0\0"), "OS");
        assert_eq!(fourcc_text([b'a', 0x01, b'b', b'c']), "a?bc");
    }
}
