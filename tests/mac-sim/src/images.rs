//! The boot-chain images of a simulated Mac: which 4CC each component carries, how iBoot checks
//! that an uploaded image is personalized for this board, and generation of a complete set of
//! personalized test images (`write_bootchain`).
//!
//! Simulator conventions (not Apple's):
//! * tickets are signed with the simulator's test key, not Apple's (see [`crate::ticket`]); the
//!   simulated ROM and iBoot trust only that key, so real Apple-signed images are refused;
//! * a ticket `ECID` of 0 means "any ECID", so generated images work for any simulated unit;
//!   generated boot chains carry no `BNCH`, so they work whatever the Mac's nonce;
//! * components whose 4CC neither the manifest nor the §5.7 table states get a synthetic 4CC
//!   (`z` + three letters derived from the name), see [`fourcc_for`].

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256, Sha384};

use crate::board::{Board, Component};
use crate::img4::{self, FourCc, Img4};
use crate::ticket::{self, TicketError};

/// Ticket ECID meaning "valid on any unit" (simulator convention).
pub const ECID_ANY: u64 = 0;

/// The 22-byte local-policy IM4P shipped inside idevicerestore/pymobiledevice3 (§5.5).
pub const LPOL_IM4P: [u8; 22] = [
    0x30, 0x14, 0x16, 0x04, 0x49, 0x4D, 0x34, 0x50, 0x16, 0x04, 0x6C, 0x70, 0x6F, 0x6C, 0x16, 0x03,
    0x31, 0x2E, 0x30, 0x04, 0x01, 0x00,
];

/// Name under which the local policy travels; it is not a manifest entry of the restore identity.
pub const LOCAL_POLICY: &str = "Ap,LocalPolicy";

/// Component → 4CC (protocol.md §5.7).
const FOURCC_TABLE: &[(&str, &str)] = &[
    ("ACIBT", "acib"),
    ("ACIBTLPEM", "lpbt"),
    ("ACIWIFI", "aciw"),
    ("ANE", "anef"),
    ("ANS", "ansf"),
    ("AOP", "aopf"),
    ("AVE", "avef"),
    ("Alamo", "almo"),
    ("Ap,ANE1", "ane1"),
    ("Ap,ANE2", "ane2"),
    ("Ap,ANE3", "ane3"),
    ("Ap,AudioAccessibilityBootChime", "auac"),
    ("Ap,AudioBootChime", "aubt"),
    ("Ap,AudioPowerAttachChime", "aupr"),
    ("Ap,BootabilityBrainTrustCache", "trbb"),
    ("Ap,CIO", "ciof"),
    ("Ap,DCP2", "dcp2"),
    ("Ap,HapticAssets", "hpas"),
    ("Ap,LocalBoot", "lobo"),
    ("Ap,LocalPolicy", "lpol"),
    ("Ap,NextStageIM4MHash", "nsih"),
    ("Ap,RecoveryOSPolicyNonceHash", "ronh"),
    ("Ap,RestoreANE1", "ran1"),
    ("Ap,RestoreANE2", "ran2"),
    ("Ap,RestoreANE3", "ran3"),
    ("Ap,RestoreCIO", "rcio"),
    ("Ap,RestoreDCP2", "rdc2"),
    ("Ap,RestoreTMU", "rtmu"),
    ("Ap,Scorpius", "scpf"),
    ("Ap,RestoreSecureM3Firmware", "rsm3"),
    ("Ap,RestoreSecurePageTableMonitor", "rspt"),
    ("Ap,RestoreTrustedExecutionMonitor", "rtrx"),
    ("Ap,RestorecL4", "rxcl"),
    ("Ap,SystemVolumeCanonicalMetadata", "msys"),
    ("Ap,TMU", "tmuf"),
    ("Ap,VolumeUUID", "vuid"),
    ("Ap,rOSLogo1", "rlg1"),
    ("Ap,rOSLogo2", "rlg2"),
    ("AppleLogo", "logo"),
    ("AudioCodecFirmware", "acfw"),
    ("BatteryCharging", "glyC"),
    ("BatteryCharging0", "chg0"),
    ("BatteryCharging1", "chg1"),
    ("BatteryFull", "batF"),
    ("BatteryLow0", "bat0"),
    ("BatteryLow1", "bat1"),
    ("BatteryPlugin", "glyP"),
    ("CFELoader", "cfel"),
    ("CrownFirmware", "crwn"),
    ("DCP", "dcpf"),
    ("Dali", "dali"),
    ("DeviceTree", "dtre"),
    ("Diags", "diag"),
    ("EngineeringTrustCache", "dtrs"),
    ("ExtDCP", "edcp"),
    ("GFX", "gfxf"),
    ("Hamm", "hamf"),
    ("Homer", "homr"),
    ("ISP", "ispf"),
    ("InputDevice", "ipdf"),
    ("KernelCache", "krnl"),
    ("LLB", "illb"),
    ("LeapHaptics", "lphp"),
    ("Liquid", "liqd"),
    ("LoadableTrustCache", "ltrs"),
    ("LowPowerWallet0", "lpw0"),
    ("LowPowerWallet1", "lpw1"),
    ("LowPowerWallet2", "lpw2"),
    ("MacEFI", "mefi"),
    ("MtpFirmware", "mtpf"),
    ("Multitouch", "mtfw"),
    ("NeedService", "nsrv"),
    ("OS", "OS\0\0"),
    ("OSRamdisk", "osrd"),
    ("PEHammer", "hmmr"),
    ("PERTOS", "pert"),
    ("PHLEET", "phlt"),
    ("PMP", "pmpf"),
    ("PersonalizedDMG", "pdmg"),
    ("RBM", "rmbt"),
    ("RTP", "rtpf"),
    ("Rap,SoftwareBinaryDsp1", "sbd1"),
    ("Rap,RTKitOS", "rkos"),
    ("Rap,RestoreRTKitOS", "rrko"),
    ("RecoveryMode", "recm"),
    ("RestoreANS", "rans"),
    ("RestoreDCP", "rdcp"),
    ("RestoreDeviceTree", "rdtr"),
    ("RestoreExtDCP", "recp"),
    ("RestoreKernelCache", "rkrn"),
    ("RestoreLogo", "rlgo"),
    ("RestoreRTP", "rrtp"),
    ("RestoreRamDisk", "rdsk"),
    ("RestoreSEP", "rsep"),
    ("RestoreTrustCache", "rtsc"),
    ("SCE", "scef"),
    ("SCE1Firmware", "sc1f"),
    ("SEP", "sepi"),
    ("SIO", "siof"),
    ("StaticTrustCache", "trst"),
    ("SystemLocker", "lckr"),
    ("SystemVolume", "isys"),
    ("WCHFirmwareUpdater", "wchf"),
    ("ftap", "ftap"),
    ("ftsp", "ftsp"),
    ("rfta", "rfta"),
    ("rfts", "rfts"),
    ("iBEC", "ibec"),
    ("iBSS", "ibss"),
    ("iBoot", "ibot"),
    ("iBootData", "ibdt"),
    ("iBootDataStage1", "ibd1"),
    ("iBootTest", "itst"),
];

/// The in-place 4CC rewrites a host applies to `Restore*` components when stitching (§5.2).
pub const RESTORE_REWRITES: &[(&str, &str)] = &[
    ("RestoreKernelCache", "rkrn"),
    ("RestoreDeviceTree", "rdtr"),
    ("RestoreSEP", "rsep"),
    ("RestoreLogo", "rlgo"),
    ("RestoreTrustCache", "rtsc"),
    ("RestoreDCP", "rdcp"),
    ("Ap,RestoreDCP2", "rdc2"),
    ("Ap,RestoreTMU", "rtmu"),
    ("Ap,RestoreCIO", "rcio"),
    ("Ap,DCP2", "dcp2"),
    ("Ap,RestoreSecureM3Firmware", "rsm3"),
    ("Ap,RestoreSecurePageTableMonitor", "rspt"),
    ("Ap,RestoreTrustedExecutionMonitor", "rtrx"),
    ("Ap,RestorecL4", "rxcl"),
];

/// The 4CC a component's personalized image must carry: `Info.Img4PayloadType`, else the §5.2
/// rewrite, else the §5.7 table, else a synthetic simulator 4CC (`z` + 3 letters from a hash of
/// the name) for components no source names (e.g. `AOP2`, `Ap,ApplePMCFirmware`).
pub fn fourcc_for(name: &str, payload_type: Option<&str>) -> FourCc {
    if let Some(cc) = payload_type.and_then(FourCc::parse) {
        return cc;
    }
    let lookup = |table: &[(&str, &str)]| {
        table
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, cc)| FourCc::parse(cc))
    };
    if let Some(cc) = lookup(RESTORE_REWRITES).or_else(|| lookup(FOURCC_TABLE)) {
        return cc;
    }
    let h = Sha256::digest(name.as_bytes());
    FourCc([b'z', b'a' + h[0] % 26, b'a' + h[1] % 26, b'a' + h[2] % 26])
}

pub fn component_fourcc(c: &Component) -> FourCc {
    fourcc_for(&c.name, c.payload_type.as_deref())
}

/// Components the host sends to iBSS with `firmware` (§3.3 step 4): `IsLoadedByiBootStage1`
/// with an `IsLoadedByiBoot` boolean present, in manifest order.
pub fn stage1_components(board: &Board) -> Vec<&Component> {
    board
        .components
        .iter()
        .filter(|c| c.loaded_by_stage1 && c.loaded_by_iboot.is_some())
        .collect()
}

/// Components the host sends to iBEC with `firmware` (§3.4 step 5).
pub fn stage2_components(board: &Board) -> Vec<&Component> {
    board
        .components
        .iter()
        .filter(|c| c.loaded_by_iboot == Some(true) && !c.loaded_by_stage1)
        .collect()
}

/// Every component of the boot chain in the order a host sends them (§3.3, §3.4), iBSS first.
/// `Ap,LocalPolicy` is included by name; optional entries the board lacks are skipped.
pub fn bootchain_names(board: &Board) -> Vec<String> {
    let mut names = vec!["iBSS".to_string(), LOCAL_POLICY.to_string()];
    names.extend(stage1_components(board).iter().map(|c| c.name.clone()));
    names.push("RestoreLogo".into());
    names.push("iBEC".into());
    names.extend(stage2_components(board).iter().map(|c| c.name.clone()));
    for n in [
        "RestoreRamDisk",
        "RestoreDeviceTree",
        "RestoreSEP",
        "RestoreKernelCache",
    ] {
        names.push(n.into());
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| (n == LOCAL_POLICY || board.component(n).is_some()) && seen.insert(n.clone()));
    names
}

/// Why iBoot refuses an uploaded image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("not a valid IMG4: {0}")]
    Format(#[from] img4::Img4Error),
    #[error("the IMG4 has no ticket (IM4M): the image was not personalized")]
    NoTicket,
    #[error("image type is '{found}', expected {expected}")]
    WrongType { found: FourCc, expected: String },
    #[error(transparent)]
    Ticket(#[from] TicketError),
    #[error("ticket has no entry for '{0}': the image is not covered by this ticket")]
    NotInTicket(FourCc),
    #[error("digest of the '{0}' payload does not match the ticket: wrong or altered image")]
    DigestMismatch(FourCc),
}

/// What iBoot learned from an image it accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedImage {
    pub fourcc: FourCc,
    pub payload_len: usize,
}

/// Check an uploaded image the way the simulated boot ROM / iBoot does: well-formed IMG4, a
/// ticket signed by the test key for this chip, board and security domain (and `ecid`, unless
/// the ticket says "any"), a type among `expected` (empty = any) and a digest matching the
/// ticket. The ticket's `BNCH` is not checked here (see [`verify_image_with_nonce`]).
pub fn verify_image(
    data: &[u8],
    board: &Board,
    ecid: Option<u64>,
    expected: &[FourCc],
) -> Result<VerifiedImage, ImageError> {
    verify_image_with_nonce(data, board, ecid, None, expected)
}

/// [`verify_image`], and when `ap_nonce` is given and the ticket carries `BNCH`, the two must
/// be equal (a ticket issued for an earlier nonce is refused).
pub fn verify_image_with_nonce(
    data: &[u8],
    board: &Board,
    ecid: Option<u64>,
    ap_nonce: Option<&[u8]>,
    expected: &[FourCc],
) -> Result<VerifiedImage, ImageError> {
    let img = Img4::parse(data)?;
    let fourcc = img.im4p.fourcc;
    if !expected.is_empty() && !expected.contains(&fourcc) {
        let list: Vec<String> = expected.iter().map(|c| format!("'{c}'")).collect();
        return Err(ImageError::WrongType {
            found: fourcc,
            expected: list.join(" or "),
        });
    }
    let m = img.im4m.as_ref().ok_or(ImageError::NoTicket)?;
    ticket::check(
        m,
        &ticket::Expect {
            chip: board.cpid,
            board: board.bdid,
            security_domain: board.security_domain,
            ecid,
            ap_nonce,
        },
    )?;
    let dgst = m.digest_of(fourcc).ok_or(ImageError::NotInTicket(fourcc))?;
    if dgst != img.im4p.digest() {
        return Err(ImageError::DigestMismatch(fourcc));
    }
    Ok(VerifiedImage {
        fourcc,
        payload_len: img.im4p.payload.len(),
    })
}

/// The 12 fixed bytes of the DFU suffix a host appends to the last DFU block (§2.3).
const DFU_SUFFIX_FIXED: [u8; 12] = [
    0xFF, 0xFF, 0xFF, 0xFF, 0xAC, 0x05, 0x00, 0x01, 0x55, 0x46, 0x44, 0x10,
];

/// What the SecureROM accepts over DFU: a personalized `ibss` image for this board. `data` may
/// end with the 16-byte DFU suffix (as received over DFU); its CRC is not checked because the
/// ROM apparently does not check it either (§2.3: idevicerestore and pymobiledevice3 compute
/// different values and both work).
pub fn validate_ibss(data: &[u8], board: &Board) -> Result<(), String> {
    validate_ibss_for(data, board, None, None)
}

/// [`validate_ibss`] bound to one unit: the ticket must be for `ecid` (or any) and, when it
/// carries `BNCH`, for the nonce the ROM currently shows.
pub fn validate_ibss_for(
    data: &[u8],
    board: &Board,
    ecid: Option<u64>,
    ap_nonce: Option<&[u8]>,
) -> Result<(), String> {
    let image = match data.len().checked_sub(16) {
        Some(n) if data[n..n + 12] == DFU_SUFFIX_FIXED => &data[..n],
        _ => data,
    };
    verify_image_with_nonce(image, board, ecid, ap_nonce, &[FourCc(*b"ibss")])
        .map(|_| ())
        .map_err(|e| format!("iBSS rejected: {e}"))
}

/// Deterministic pseudo-random payload bytes for a component.
fn payload(name: &str, len: usize) -> Vec<u8> {
    let seed = Sha256::digest(name.as_bytes());
    let mut s = u64::from_le_bytes([
        seed[0], seed[1], seed[2], seed[3], seed[4], seed[5], seed[6], seed[7],
    ]) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// Exact IMG4 file sizes for components that exercise upload edge cases: RestoreRamDisk fills two
/// full 0x8000 chunks (multiple of 512 → ZLP after the second chunk), RestoreDeviceTree is one
/// short chunk that is still a multiple of 512 (ZLP after a single chunk).
const EXACT_SIZES: &[(&str, usize)] = &[
    ("RestoreRamDisk", 0x8000 * 2),
    ("RestoreDeviceTree", 0x2000),
];

fn payload_len(name: &str) -> usize {
    // A few KiB, different per component.
    let h = Sha256::digest(name.as_bytes());
    2048 + usize::from(u16::from_le_bytes([h[0], h[1]]) % 4096)
}

/// The personalized images of `board`'s boot chain, in host order: (component, IMG4 bytes).
/// All share one main ticket; `Ap,LocalPolicy` has its own ticket, as with a real TSS (§5.3).
pub fn bootchain_images(board: &Board, ecid: u64) -> Vec<(String, Vec<u8>)> {
    let names = bootchain_names(board);
    let spec = |digests| {
        ticket::TicketSpec::simple(board.cpid, board.bdid, ecid, board.security_domain, digests)
    };
    let fourcc_of = |name: &str| match board.component(name) {
        Some(c) => component_fourcc(c),
        None => fourcc_for(name, None),
    };
    let build_im4p = |name: &str, len: usize| {
        img4::build_im4p(
            fourcc_of(name),
            &format!("mac-sim {name} for {}", board.board_config),
            &payload(name, len),
        )
    };
    let mut im4ps: Vec<(String, Vec<u8>)> = names
        .iter()
        .filter(|n| *n != LOCAL_POLICY)
        .map(|n| (n.clone(), build_im4p(n, payload_len(n))))
        .collect();
    let ticket_for = |im4ps: &[(String, Vec<u8>)]| {
        ticket::sign_im4m(&spec(
            im4ps
                .iter()
                .map(|(name, p)| (fourcc_of(name), Sha384::digest(p).to_vec()))
                .collect(),
        ))
    };
    // Everything else must end with a short packet, so only the planned files need a ZLP. The
    // ticket's length does not depend on the digests' values, so any current ticket measures.
    let probe_ticket = ticket_for(&im4ps);
    for (name, p) in im4ps.iter_mut() {
        if EXACT_SIZES.iter().any(|(n, _)| n == name) {
            continue;
        }
        let mut len = payload_len(name);
        while img4::stitch(p, &probe_ticket, None).len() % 512 == 0 {
            len += 1;
            *p = build_im4p(name, len);
        }
    }
    // Payload sizes for exact-size files: the container overhead depends on the lengths' encodings
    // and the ticket, so converge on the payload length by re-measuring.
    for &(name, target) in EXACT_SIZES {
        let Some(i) = im4ps.iter().position(|(n, _)| n == name) else {
            continue;
        };
        let mut len = target.saturating_sub(4096);
        for _ in 0..8 {
            im4ps[i].1 = build_im4p(name, len);
            let total = img4::stitch(&im4ps[i].1, &probe_ticket, None).len();
            if total == target {
                break;
            }
            len = (len + target).saturating_sub(total);
        }
    }
    let main_ticket = ticket_for(&im4ps);
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    for name in &names {
        if name == LOCAL_POLICY {
            let digest = Sha384::digest(LPOL_IM4P).to_vec();
            let ticket = ticket::sign_im4m(&spec(vec![(FourCc(*b"lpol"), digest)]));
            out.push((name.clone(), img4::stitch(&LPOL_IM4P, &ticket, None)));
        } else if let Some((_, p)) = im4ps.iter().find(|(n, _)| n == name) {
            out.push((name.clone(), img4::stitch(p, &main_ticket, None)));
        }
    }
    out
}

/// Write `<Component>.img4` for every boot-chain component of `board` into `dir` (created if
/// missing), personalized for any ECID. Returns the paths in the order a host sends them.
pub fn write_bootchain(board: &Board, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut paths = Vec::new();
    for (name, bytes) in bootchain_images(board, ECID_ANY) {
        let p = dir.join(format!("{name}.img4"));
        std::fs::write(&p, bytes)?;
        paths.push(p);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_agree_with_the_table() {
        for (name, cc) in RESTORE_REWRITES {
            let t = FOURCC_TABLE.iter().find(|(n, _)| n == name).map(|x| x.1);
            assert_eq!(t, Some(*cc), "{name}");
        }
    }

    #[test]
    fn fourcc_sources_in_priority_order() {
        assert_eq!(fourcc_for("RestoreKernelCache", None), FourCc(*b"rkrn"));
        assert_eq!(fourcc_for("iBEC", None), FourCc(*b"ibec"));
        assert_eq!(fourcc_for("OS", None), FourCc(*b"OS\0\0"));
        assert_eq!(fourcc_for("ANE", Some("xane")), FourCc(*b"xane"));
        let synthetic = fourcc_for("AOP2", None);
        assert_eq!(synthetic.0[0], b'z');
        assert_eq!(synthetic, fourcc_for("AOP2", None), "deterministic");
    }

    #[test]
    fn iboot_loaded_fourccs_are_unique_on_every_board() {
        for b in Board::fixture_boards().unwrap() {
            let board = Board::load(&b).unwrap();
            let names = bootchain_names(&board);
            let mut ccs: Vec<FourCc> = names
                .iter()
                .map(|n| match board.component(n) {
                    Some(c) => component_fourcc(c),
                    None => fourcc_for(n, None),
                })
                .collect();
            let n = ccs.len();
            ccs.sort();
            ccs.dedup();
            assert_eq!(ccs.len(), n, "{b}: {names:?}");
        }
    }

    #[test]
    fn bootchain_order_for_j274ap() {
        let b = Board::load("j274ap").unwrap();
        assert_eq!(
            bootchain_names(&b),
            [
                "iBSS",
                "Ap,LocalPolicy",
                "Ap,RestoreCIO",
                "Ap,RestoreTMU",
                "RestoreANS",
                "RestoreDCP",
                "RestoreLogo",
                "iBEC",
                "ANE",
                "AOP",
                "AVE",
                "Ap,RestoreDCP2",
                "GFX",
                "PMP",
                "RestoreTrustCache",
                "SIO",
                "iBootData",
                "RestoreRamDisk",
                "RestoreDeviceTree",
                "RestoreSEP",
                "RestoreKernelCache",
            ]
        );
    }

    #[test]
    fn j414sap_stage1_includes_iboot_data_stage1() {
        let b = Board::load("j414sap").unwrap();
        let s1: Vec<_> = stage1_components(&b).iter().map(|c| &c.name).collect();
        assert_eq!(
            s1,
            [
                "Ap,RestoreCIO",
                "Ap,RestoreTMU",
                "RestoreANS",
                "RestoreDCP",
                "iBootDataStage1"
            ]
        );
    }

    #[test]
    fn generated_images_verify_and_have_the_planned_sizes() {
        let b = Board::load("j274ap").unwrap();
        let imgs = bootchain_images(&b, ECID_ANY);
        for (name, data) in &imgs {
            let want = match b.component(name) {
                Some(c) => component_fourcc(c),
                None => FourCc(*b"lpol"),
            };
            let v = verify_image(data, &b, Some(0x1234), &[want]).unwrap();
            assert_eq!(v.fourcc, want, "{name}");
        }
        let size = |n: &str| imgs.iter().find(|(x, _)| x == n).unwrap().1.len();
        assert_eq!(size("RestoreRamDisk"), 0x10000);
        assert_eq!(size("RestoreDeviceTree"), 0x2000);
        for (n, d) in &imgs {
            if !EXACT_SIZES.iter().any(|(x, _)| x == n) {
                assert_ne!(d.len() % 512, 0, "{n} would need a ZLP");
            }
        }
        let lpol = Img4::parse(&imgs[1].1).unwrap();
        assert_eq!(lpol.im4p.raw, LPOL_IM4P);
        assert!(validate_ibss(&imgs[0].1, &b).is_ok());
        // As received over DFU: with the suffix (CRC not checked).
        let mut with_suffix = imgs[0].1.clone();
        with_suffix.extend_from_slice(&DFU_SUFFIX_FIXED);
        with_suffix.extend_from_slice(&[1, 2, 3, 4]);
        assert!(validate_ibss(&with_suffix, &b).is_ok());
        // Other trailing bytes are not a suffix.
        let mut junk = imgs[0].1.clone();
        junk.extend_from_slice(&[0; 16]);
        assert!(validate_ibss(&junk, &b).is_err());
    }

    #[test]
    fn verification_failures() {
        let b = Board::load("j274ap").unwrap();
        let other = Board::load("j414sap").unwrap();
        let imgs = bootchain_images(&b, 0x42);
        let ibss = &imgs[0].1;
        assert!(matches!(
            verify_image(ibss, &other, None, &[]),
            Err(ImageError::Ticket(TicketError::WrongDevice {
                what: "CHIP",
                ..
            }))
        ));
        assert!(matches!(
            verify_image(ibss, &b, Some(0x43), &[]),
            Err(ImageError::Ticket(TicketError::WrongDevice {
                what: "ECID",
                ..
            }))
        ));
        assert!(verify_image(ibss, &b, Some(0x42), &[]).is_ok());
        let e = validate_ibss(&imgs[1].1, &b).unwrap_err();
        assert_eq!(e, "iBSS rejected: image type is 'lpol', expected 'ibss'");
        // Flip one payload byte: digest mismatch.
        let mut bad = ibss.clone();
        let idx = bad.len() / 4;
        bad[idx] ^= 1;
        assert_eq!(
            verify_image(&bad, &b, None, &[]),
            Err(ImageError::DigestMismatch(FourCc(*b"ibss")))
        );
        // A bare IM4P is not personalized.
        let p = img4::build_im4p(FourCc(*b"ibss"), "", b"x");
        assert!(matches!(
            verify_image(&p, &b, None, &[]),
            Err(ImageError::Format(_))
        ));
        // The real, Apple-signed PyIMG4 image: wrong chip for this board.
        let real =
            std::fs::read(crate::board::shared_dir().join("fixtures/tss/PyIMG4-IMG4-test.der"))
                .unwrap();
        // The Mac trusts only the test key, so Apple's signature is refused first.
        assert_eq!(
            verify_image(&real, &b, None, &[]),
            Err(ImageError::Ticket(TicketError::BadSignature))
        );
    }

    #[test]
    fn write_bootchain_writes_named_files() {
        let dir = std::env::temp_dir().join(format!("mac-sim-bootchain-{}", std::process::id()));
        let b = Board::load("j414sap").unwrap();
        let paths = write_bootchain(&b, &dir).unwrap();
        let names: Vec<_> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
            .collect();
        assert_eq!(names[0], "iBSS.img4");
        assert_eq!(names[1], "Ap,LocalPolicy.img4");
        assert!(names.contains(&"iBootDataStage1.img4".to_string()));
        assert_eq!(names.last().unwrap(), "RestoreKernelCache.img4");
        let ibss = std::fs::read(&paths[0]).unwrap();
        assert!(validate_ibss(&ibss, &b).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
