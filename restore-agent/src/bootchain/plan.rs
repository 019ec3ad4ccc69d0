//! The boot chain as data: what to send in DFU, in stage 1 (iBSS) and in stage 2 (iBEC), in
//! exactly idevicerestore's order (protocol.md §2.4, §3.3, §3.4). Pure: a build identity in,
//! a list of [`Step`]s out. The driver executes them.

use std::fmt;
use std::time::Duration;

use crate::manifest::BuildIdentity;
use crate::recovery::RESTORE_BOOT_ARGS;

/// The personalized local-policy image sent before `lpolrestore`. Not a manifest component:
/// it is built from the embedded lpol IM4P and its own ticket (§5.5, §4.6).
pub const LOCAL_POLICY: &str = "Ap,LocalPolicy";

/// Which part of the boot chain a plan covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// SecureROM DFU: iBSS only.
    Dfu,
    /// iBSS running as iBoot stage 1.
    Stage1,
    /// iBEC running as iBoot stage 2.
    Stage2,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Dfu => "DFU",
            Stage::Stage1 => "stage 1 (iBSS)",
            Stage::Stage2 => "stage 2 (iBEC)",
        })
    }
}

/// What to do with a getenv reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvCheck {
    /// Informational: log it.
    Log,
    /// Expect this value; a mismatch is only logged (idevicerestore does the same).
    Expect(&'static str),
    /// `radio-error`: when it is a number above 0, also read `radio-error-string`.
    RadioError,
}

/// What the driver waits for after the device stops answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Await {
    /// After the DFU upload: iBSS comes back (in Recovery, §2.4).
    AfterIbss,
    /// After `go` in stage 1: iBEC comes back in Recovery.
    AfterIbec,
    /// After `go` on a Mac that was already in Recovery when we started (longer timeouts).
    AfterIbecFromRecovery,
    /// After `bootx`: the device leaves Recovery (then, optionally, restore mode appears).
    AfterBootx,
}

/// One action of the boot chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Set configuration 1 on the re-enumerated device.
    SetConfiguration(u8),
    /// Upload a personalized component over DFU (SecureROM).
    DfuUpload {
        component: String,
    },
    /// Upload a personalized component with the recovery-mode mechanism (§3.2).
    Upload {
        component: String,
    },
    /// Send an iBoot command whose reply (if any) is not read.
    Command(String),
    /// `getenv NAME` and read the reply.
    Getenv {
        name: &'static str,
        check: EnvCheck,
    },
    Sleep(Duration),
    /// The zero-length `21/01` (5000 ms) after RestoreKernelCache (and after `go` when iBEC is
    /// sent to a Mac that started in Recovery).
    KernelCacheNotify,
    Await(Await),
}

impl Step {
    fn upload(component: &str) -> Step {
        Step::Upload {
            component: component.to_string(),
        }
    }
    fn cmd(text: &str) -> Step {
        Step::Command(text.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the build identity \"{variant}\" for {board} has no {component}, which the {stage} needs; it cannot boot a Mac from DFU (use the IPSW matching this Mac)")]
    MissingComponent {
        board: String,
        variant: String,
        component: &'static str,
        stage: Stage,
    },
}

fn require(
    identity: &BuildIdentity,
    component: &'static str,
    stage: Stage,
) -> Result<(), PlanError> {
    if identity.has(component) {
        Ok(())
    } else {
        Err(PlanError::MissingComponent {
            board: identity.info.device_class.clone(),
            variant: identity.info.variant.clone(),
            component,
            stage,
        })
    }
}

/// DFU: upload iBSS, which resets the device (§2.4).
pub fn dfu(identity: &BuildIdentity) -> Result<Vec<Step>, PlanError> {
    require(identity, "iBSS", Stage::Dfu)?;
    Ok(vec![
        Step::DfuUpload {
            component: "iBSS".to_string(),
        },
        Step::Await(Await::AfterIbss),
    ])
}

/// Stage 1, iBSS running (§3.3). `in_recovery`: the device answers with a Recovery PID, which
/// is what makes idevicerestore send `go` (it always does for an Apple Silicon Mac).
pub fn stage1(identity: &BuildIdentity, in_recovery: bool) -> Result<Vec<Step>, PlanError> {
    require(identity, "RestoreLogo", Stage::Stage1)?;
    require(identity, "iBEC", Stage::Stage1)?;
    let mut steps = vec![
        Step::SetConfiguration(1),
        Step::upload(LOCAL_POLICY),
        Step::cmd("lpolrestore"),
        Step::Getenv {
            name: "boot-stage",
            check: EnvCheck::Expect("1"),
        },
    ];
    for c in identity.stage1_components() {
        steps.push(Step::upload(&c.name));
        steps.push(Step::cmd("firmware"));
    }
    steps.extend([
        Step::cmd("setenv auto-boot false"),
        Step::cmd("saveenv"),
        Step::Command(format!("setenvnp boot-args {RESTORE_BOOT_ARGS}")),
        Step::upload("RestoreLogo"),
        Step::cmd("setpicture 4"),
        Step::cmd("bgcolor 0 0 0"),
        Step::upload("iBEC"),
    ]);
    if in_recovery {
        // Macs have build major >= 20, so no 21/01 after `go` (§2.4).
        steps.push(Step::Sleep(Duration::from_secs(1)));
        steps.push(Step::cmd("go"));
    }
    steps.push(Step::Await(Await::AfterIbec));
    Ok(steps)
}

/// A Mac found in Recovery running iBoot proper (not iBSS/iBEC): send iBEC and jump to it
/// (idevicerestore `recovery_send_ibec`, which sends the `21/01` after `go` regardless of the
/// build).
pub fn recovery_ibec(identity: &BuildIdentity) -> Result<Vec<Step>, PlanError> {
    require(identity, "iBEC", Stage::Stage1)?;
    Ok(vec![
        Step::upload("iBEC"),
        Step::cmd("go"),
        Step::KernelCacheNotify,
        Step::Await(Await::AfterIbecFromRecovery),
    ])
}

/// Stage 2, iBEC running (§3.4), ending with `bootx`.
pub fn stage2(identity: &BuildIdentity) -> Result<Vec<Step>, PlanError> {
    for c in ["RestoreRamDisk", "RestoreDeviceTree", "RestoreKernelCache"] {
        require(identity, c, Stage::Stage2)?;
    }
    let mut steps = vec![
        Step::Getenv {
            name: "build-version",
            check: EnvCheck::Log,
        },
        Step::Getenv {
            name: "build-style",
            check: EnvCheck::Log,
        },
        Step::Getenv {
            name: "boot-stage",
            check: EnvCheck::Expect("2"),
        },
        Step::Getenv {
            name: "radio-error",
            check: EnvCheck::RadioError,
        },
        Step::cmd("setenv auto-boot false"),
        Step::cmd("saveenv"),
    ];
    if identity.has("RestoreLogo") {
        steps.extend([
            Step::upload("RestoreLogo"),
            Step::cmd("setpicture 4"),
            Step::cmd("bgcolor 0 0 0"),
        ]);
    }
    for c in identity.stage2_components() {
        steps.push(Step::upload(&c.name));
        steps.push(Step::cmd("firmware"));
    }
    steps.extend([
        Step::Getenv {
            name: "ramdisk-size",
            check: EnvCheck::Log,
        },
        Step::upload("RestoreRamDisk"),
        // idevicerestore sends this query but never reads the reply.
        Step::cmd("getenv ramdisk-delay"),
        Step::cmd("ramdisk"),
        Step::Sleep(Duration::from_secs(2)),
        Step::upload("RestoreDeviceTree"),
        Step::cmd("devicetree"),
    ]);
    if identity.has("RestoreSEP") {
        steps.push(Step::upload("RestoreSEP"));
        steps.push(Step::cmd("rsepfirmware"));
    }
    steps.extend([
        Step::upload("RestoreKernelCache"),
        Step::KernelCacheNotify,
        Step::Command(format!("setenv boot-args {RESTORE_BOOT_ARGS}")),
        Step::cmd("bootx"),
        Step::Await(Await::AfterBootx),
    ]);
    Ok(steps)
}

/// Every image the plans upload, in first-use order without repeats: what must be available
/// before the first byte goes out.
pub fn components(plans: &[&[Step]]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for plan in plans {
        for step in plan.iter() {
            if let Step::Upload { component } | Step::DfuUpload { component } = step {
                if !out.contains(component) {
                    out.push(component.clone());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{BuildManifest, RestoreBehavior};
    use std::path::PathBuf;

    fn preflight(board: &str) -> BuildManifest {
        let shared = std::env::var_os("MACRESCUE_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")));
        BuildManifest::from_path(&shared.join(format!(
            "fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests/{board}.BuildManifest.plist"
        )))
        .unwrap()
    }

    fn up(c: &str) -> Step {
        Step::upload(c)
    }
    fn cmd(c: &str) -> Step {
        Step::cmd(c)
    }
    fn fw(c: &str) -> [Step; 2] {
        [up(c), cmd("firmware")]
    }

    fn stage1_expected(stage1_fw: &[&str]) -> Vec<Step> {
        let mut v = vec![
            Step::SetConfiguration(1),
            up("Ap,LocalPolicy"),
            cmd("lpolrestore"),
            Step::Getenv {
                name: "boot-stage",
                check: EnvCheck::Expect("1"),
            },
        ];
        for c in stage1_fw {
            v.extend(fw(c));
        }
        v.extend([
            cmd("setenv auto-boot false"),
            cmd("saveenv"),
            cmd("setenvnp boot-args rd=md0 nand-enable-reformat=1 -progress -restore"),
            up("RestoreLogo"),
            cmd("setpicture 4"),
            cmd("bgcolor 0 0 0"),
            up("iBEC"),
            Step::Sleep(Duration::from_secs(1)),
            cmd("go"),
            Step::Await(Await::AfterIbec),
        ]);
        v
    }

    fn stage2_expected(stage2_fw: &[&str], sep: bool) -> Vec<Step> {
        let mut v = vec![
            Step::Getenv {
                name: "build-version",
                check: EnvCheck::Log,
            },
            Step::Getenv {
                name: "build-style",
                check: EnvCheck::Log,
            },
            Step::Getenv {
                name: "boot-stage",
                check: EnvCheck::Expect("2"),
            },
            Step::Getenv {
                name: "radio-error",
                check: EnvCheck::RadioError,
            },
            cmd("setenv auto-boot false"),
            cmd("saveenv"),
            up("RestoreLogo"),
            cmd("setpicture 4"),
            cmd("bgcolor 0 0 0"),
        ];
        for c in stage2_fw {
            v.extend(fw(c));
        }
        v.extend([
            Step::Getenv {
                name: "ramdisk-size",
                check: EnvCheck::Log,
            },
            up("RestoreRamDisk"),
            cmd("getenv ramdisk-delay"),
            cmd("ramdisk"),
            Step::Sleep(Duration::from_secs(2)),
            up("RestoreDeviceTree"),
            cmd("devicetree"),
        ]);
        if sep {
            v.extend([up("RestoreSEP"), cmd("rsepfirmware")]);
        }
        v.extend([
            up("RestoreKernelCache"),
            Step::KernelCacheNotify,
            cmd("setenv boot-args rd=md0 nand-enable-reformat=1 -progress -restore"),
            cmd("bootx"),
            Step::Await(Await::AfterBootx),
        ]);
        v
    }

    #[test]
    fn j274ap_mac_mini_m1() {
        let m = preflight("J274AP");
        let id = m
            .select_boot_identity("j274ap", RestoreBehavior::Update)
            .unwrap();
        assert_eq!(
            dfu(id).unwrap(),
            vec![
                Step::DfuUpload {
                    component: "iBSS".into()
                },
                Step::Await(Await::AfterIbss)
            ]
        );
        assert_eq!(
            stage1(id, true).unwrap(),
            stage1_expected(&["Ap,RestoreCIO", "Ap,RestoreTMU", "RestoreANS", "RestoreDCP"])
        );
        assert_eq!(
            stage2(id).unwrap(),
            stage2_expected(
                &[
                    "ANE",
                    "AOP",
                    "AVE",
                    "Ap,RestoreDCP2",
                    "GFX",
                    "PMP",
                    "RestoreTrustCache",
                    "SIO",
                    "iBootData"
                ],
                true
            )
        );
    }

    #[test]
    fn j704ap_macbook_pro_m5() {
        let m = preflight("J704AP");
        let id = m
            .select_boot_identity("j704ap", RestoreBehavior::Update)
            .unwrap();
        assert_eq!(
            stage1(id, true).unwrap(),
            stage1_expected(&["Ap,RestoreCIO", "Ap,RestoreTMU", "RestoreANS", "RestoreDCP"])
        );
        assert_eq!(
            stage2(id).unwrap(),
            stage2_expected(
                &[
                    "ANE",
                    "AOP",
                    "AOP2",
                    "AVE",
                    "Ap,ApplePMCFirmware",
                    "Ap,GFX1Firmware",
                    "Ap,RestoreDCP2",
                    "Ap,RestoreMSRFirmware",
                    "Ap,RestoreSecureM3Firmware",
                    "Ap,RestoreSecurePageTableMonitor",
                    "Ap,RestoreTrustedExecutionMonitor",
                    "Ap,RestorecL4",
                    "GFX",
                    "ISP",
                    "MtpFirmware",
                    "PMP",
                    "RestoreTrustCache",
                    "SIO",
                    "iBootData"
                ],
                true
            )
        );
    }

    #[test]
    fn recovery_start_sends_ibec_go_and_notify() {
        let m = preflight("J293AP");
        let id = m
            .select_boot_identity("j293ap", RestoreBehavior::Update)
            .unwrap();
        assert_eq!(
            recovery_ibec(id).unwrap(),
            vec![
                up("iBEC"),
                cmd("go"),
                Step::KernelCacheNotify,
                Step::Await(Await::AfterIbecFromRecovery)
            ]
        );
    }

    #[test]
    fn stage1_without_recovery_pid_sends_no_go() {
        let m = preflight("J313AP");
        let id = m
            .select_boot_identity("j313ap", RestoreBehavior::Update)
            .unwrap();
        let steps = stage1(id, false).unwrap();
        assert_eq!(steps[steps.len() - 2], up("iBEC"));
        assert_eq!(steps[steps.len() - 1], Step::Await(Await::AfterIbec));
        assert!(!steps.contains(&cmd("go")));
    }

    /// Over every Apple Silicon Preflight manifest: each plan has the fixed skeleton, every
    /// stage-1 firmware is flagged Stage1, every stage-2 one is not, and no component is
    /// uploaded twice across stages.
    #[test]
    fn every_mac_manifest_yields_consistent_plans() {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared"))
            .join("fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests");
        let dir = std::env::var_os("MACRESCUE_SHARED")
            .map(|s| {
                PathBuf::from(s).join("fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests")
            })
            .unwrap_or(dir);
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let m = BuildManifest::from_path(&e.unwrap().path()).unwrap();
            let board = m.identities[0].info.device_class.clone();
            let Ok(id) = m.select_boot_identity(&board, RestoreBehavior::Update) else {
                assert!(board == "j160ap" || board == "x86legacyap", "{board}");
                continue;
            };
            n += 1;
            let s1 = stage1(id, true).unwrap();
            let s2 = stage2(id).unwrap();
            let s1_fw: Vec<&str> = id.stage1_components().map(|c| c.name.as_str()).collect();
            assert_eq!(s1, stage1_expected(&s1_fw), "{board}");
            let s2_fw: Vec<&str> = id.stage2_components().map(|c| c.name.as_str()).collect();
            assert_eq!(s2, stage2_expected(&s2_fw, id.has("RestoreSEP")), "{board}");
            for c in &s1_fw {
                assert!(!s2_fw.contains(c), "{board}: {c} in both stages");
            }
            let all = components(&[&dfu(id).unwrap(), &s1, &s2]);
            assert_eq!(all[0], "iBSS");
            assert_eq!(all[1], "Ap,LocalPolicy");
            assert_eq!(all.iter().filter(|c| *c == "RestoreLogo").count(), 1);
        }
        assert_eq!(n, 43);
    }

    #[test]
    fn missing_required_components_are_named() {
        let xml = crate::manifest::tests::manifest_xml(&[("j274ap", "X", None, false)]);
        let m = BuildManifest::from_bytes(xml.as_bytes()).unwrap();
        let id = &m.identities[0];
        let err = dfu(id).unwrap_err();
        assert_eq!(
            err,
            PlanError::MissingComponent {
                board: "j274ap".into(),
                variant: "X".into(),
                component: "iBSS",
                stage: Stage::Dfu
            }
        );
        assert!(err.to_string().contains("has no iBSS"));
        assert!(matches!(
            stage2(id),
            Err(PlanError::MissingComponent {
                component: "RestoreRamDisk",
                ..
            })
        ));
    }
}
