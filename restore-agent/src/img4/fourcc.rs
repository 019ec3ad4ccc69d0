//! Which IMG4 type tag (4CC) belongs to which build-manifest component.

/// Components whose IM4P type tag must be replaced before stitching (§5.2): the IPSW ships the
/// same payload for the normal and the restore boot, but the ticket's entry for the `Restore*`
/// component is keyed by the restore 4CC, so the payload must carry that tag for iBoot to
/// find its digest in the ticket.
const RESTORE_REWRITES: &[(&str, &[u8; 4])] = &[
    ("RestoreKernelCache", b"rkrn"),
    ("RestoreDeviceTree", b"rdtr"),
    ("RestoreSEP", b"rsep"),
    ("RestoreLogo", b"rlgo"),
    ("RestoreTrustCache", b"rtsc"),
    ("RestoreDCP", b"rdcp"),
    ("Ap,RestoreDCP2", b"rdc2"),
    ("Ap,RestoreTMU", b"rtmu"),
    ("Ap,RestoreCIO", b"rcio"),
    ("Ap,DCP2", b"dcp2"),
    ("Ap,RestoreSecureM3Firmware", b"rsm3"),
    ("Ap,RestoreSecurePageTableMonitor", b"rspt"),
    ("Ap,RestoreTrustedExecutionMonitor", b"rtrx"),
    ("Ap,RestorecL4", b"rxcl"),
];

/// The 4CC a component's IM4P must carry when it is stitched, for exactly the components the
/// restore tools rewrite; `None` means "leave the IM4P's own tag alone".
pub fn restore_rewrite(component: &str) -> Option<[u8; 4]> {
    RESTORE_REWRITES
        .iter()
        .find(|(name, _)| *name == component)
        .map(|(_, tag)| **tag)
}

/// Component name → 4CC as used in tickets and payloads (§5.7). Manifests may override this
/// with `Info.Img4PayloadType`; use [`component_fourcc`] to honour that.
const COMPONENTS: &[(&str, &[u8; 4])] = &[
    ("ACIBT", b"acib"),
    ("ACIBTLPEM", b"lpbt"),
    ("ACIWIFI", b"aciw"),
    ("ANE", b"anef"),
    ("ANS", b"ansf"),
    ("AOP", b"aopf"),
    ("AVE", b"avef"),
    ("Alamo", b"almo"),
    ("Ap,ANE1", b"ane1"),
    ("Ap,ANE2", b"ane2"),
    ("Ap,ANE3", b"ane3"),
    ("Ap,AudioAccessibilityBootChime", b"auac"),
    ("Ap,AudioBootChime", b"aubt"),
    ("Ap,AudioPowerAttachChime", b"aupr"),
    ("Ap,BootabilityBrainTrustCache", b"trbb"),
    ("Ap,CIO", b"ciof"),
    ("Ap,DCP2", b"dcp2"),
    ("Ap,HapticAssets", b"hpas"),
    ("Ap,LocalBoot", b"lobo"),
    ("Ap,LocalPolicy", b"lpol"),
    ("Ap,NextStageIM4MHash", b"nsih"),
    ("Ap,RecoveryOSPolicyNonceHash", b"ronh"),
    ("Ap,RestoreANE1", b"ran1"),
    ("Ap,RestoreANE2", b"ran2"),
    ("Ap,RestoreANE3", b"ran3"),
    ("Ap,RestoreCIO", b"rcio"),
    ("Ap,RestoreDCP2", b"rdc2"),
    ("Ap,RestoreTMU", b"rtmu"),
    ("Ap,Scorpius", b"scpf"),
    ("Ap,RestoreSecureM3Firmware", b"rsm3"),
    ("Ap,RestoreSecurePageTableMonitor", b"rspt"),
    ("Ap,RestoreTrustedExecutionMonitor", b"rtrx"),
    ("Ap,RestorecL4", b"rxcl"),
    ("Ap,SystemVolumeCanonicalMetadata", b"msys"),
    ("Ap,TMU", b"tmuf"),
    ("Ap,VolumeUUID", b"vuid"),
    ("Ap,rOSLogo1", b"rlg1"),
    ("Ap,rOSLogo2", b"rlg2"),
    ("AppleLogo", b"logo"),
    ("AudioCodecFirmware", b"acfw"),
    ("BatteryCharging", b"glyC"),
    ("BatteryCharging0", b"chg0"),
    ("BatteryCharging1", b"chg1"),
    ("BatteryFull", b"batF"),
    ("BatteryLow0", b"bat0"),
    ("BatteryLow1", b"bat1"),
    ("BatteryPlugin", b"glyP"),
    ("CFELoader", b"cfel"),
    ("CrownFirmware", b"crwn"),
    ("DCP", b"dcpf"),
    ("Dali", b"dali"),
    ("DeviceTree", b"dtre"),
    ("Diags", b"diag"),
    ("EngineeringTrustCache", b"dtrs"),
    ("ExtDCP", b"edcp"),
    ("GFX", b"gfxf"),
    ("Hamm", b"hamf"),
    ("Homer", b"homr"),
    ("ISP", b"ispf"),
    ("InputDevice", b"ipdf"),
    ("KernelCache", b"krnl"),
    ("LLB", b"illb"),
    ("LeapHaptics", b"lphp"),
    ("Liquid", b"liqd"),
    ("LoadableTrustCache", b"ltrs"),
    ("LowPowerWallet0", b"lpw0"),
    ("LowPowerWallet1", b"lpw1"),
    ("LowPowerWallet2", b"lpw2"),
    ("MacEFI", b"mefi"),
    ("MtpFirmware", b"mtpf"),
    ("Multitouch", b"mtfw"),
    ("NeedService", b"nsrv"),
    ("OS", b"OS\0\0"),
    ("OSRamdisk", b"osrd"),
    ("PEHammer", b"hmmr"),
    ("PERTOS", b"pert"),
    ("PHLEET", b"phlt"),
    ("PMP", b"pmpf"),
    ("PersonalizedDMG", b"pdmg"),
    ("RBM", b"rmbt"),
    ("RTP", b"rtpf"),
    ("Rap,SoftwareBinaryDsp1", b"sbd1"),
    ("Rap,RTKitOS", b"rkos"),
    ("Rap,RestoreRTKitOS", b"rrko"),
    ("RecoveryMode", b"recm"),
    ("RestoreANS", b"rans"),
    ("RestoreDCP", b"rdcp"),
    ("RestoreDeviceTree", b"rdtr"),
    ("RestoreExtDCP", b"recp"),
    ("RestoreKernelCache", b"rkrn"),
    ("RestoreLogo", b"rlgo"),
    ("RestoreRTP", b"rrtp"),
    ("RestoreRamDisk", b"rdsk"),
    ("RestoreSEP", b"rsep"),
    ("RestoreTrustCache", b"rtsc"),
    ("SCE", b"scef"),
    ("SCE1Firmware", b"sc1f"),
    ("SEP", b"sepi"),
    ("SIO", b"siof"),
    ("StaticTrustCache", b"trst"),
    ("SystemLocker", b"lckr"),
    ("SystemVolume", b"isys"),
    ("WCHFirmwareUpdater", b"wchf"),
    ("ftap", b"ftap"),
    ("ftsp", b"ftsp"),
    ("rfta", b"rfta"),
    ("rfts", b"rfts"),
    ("iBEC", b"ibec"),
    ("iBSS", b"ibss"),
    ("iBoot", b"ibot"),
    ("iBootData", b"ibdt"),
    ("iBootDataStage1", b"ibd1"),
    ("iBootTest", b"itst"),
];

/// The 4CC of a component from the fixed table alone.
pub fn table_fourcc(component: &str) -> Option<[u8; 4]> {
    COMPONENTS
        .iter()
        .find(|(name, _)| *name == component)
        .map(|(_, tag)| **tag)
}

/// The 4CC of a component, preferring the manifest's `Info.Img4PayloadType` (a 4-character
/// string) when the entry carries one, because newer components are only named there.
pub fn component_fourcc(component: &str, img4_payload_type: Option<&str>) -> Option<[u8; 4]> {
    img4_payload_type
        .and_then(|s| <[u8; 4]>::try_from(s.as_bytes()).ok())
        .or_else(|| table_fourcc(component))
}

/// The component a 4CC belongs to in the fixed table (for showing what a ticket covers).
pub fn component_for_fourcc(fourcc: [u8; 4]) -> Option<&'static str> {
    COMPONENTS
        .iter()
        .find(|(_, tag)| **tag == fourcc)
        .map(|(name, _)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_cover_exactly_the_spec_components() {
        assert_eq!(restore_rewrite("RestoreKernelCache"), Some(*b"rkrn"));
        assert_eq!(restore_rewrite("Ap,RestorecL4"), Some(*b"rxcl"));
        assert_eq!(restore_rewrite("Ap,DCP2"), Some(*b"dcp2"));
        assert_eq!(restore_rewrite("RestoreRamDisk"), None);
        assert_eq!(restore_rewrite("iBSS"), None);
        assert_eq!(restore_rewrite("KernelCache"), None);
        assert_eq!(RESTORE_REWRITES.len(), 14);
        // Every rewrite agrees with the general table.
        for (name, tag) in RESTORE_REWRITES {
            assert_eq!(table_fourcc(name), Some(**tag), "{name}");
        }
    }

    #[test]
    fn table_lookups() {
        assert_eq!(table_fourcc("iBSS"), Some(*b"ibss"));
        assert_eq!(table_fourcc("OS"), Some(*b"OS\0\0"));
        assert_eq!(table_fourcc("LLB"), Some(*b"illb"));
        assert_eq!(table_fourcc("NoSuchThing"), None);
        assert_eq!(component_for_fourcc(*b"sepi"), Some("SEP"));
        assert_eq!(component_fourcc("Whatever", Some("abcd")), Some(*b"abcd"));
        assert_eq!(component_fourcc("SEP", Some("toolong")), Some(*b"sepi"));
    }
}
