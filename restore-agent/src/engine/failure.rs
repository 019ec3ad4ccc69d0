//! Named failures: what went wrong, what the technician does next, and whether an erase could
//! fix it.
//!
//! ## When an erase can fix a failed revive
//!
//! A revive (Update identity, protocol.md §10) installs over what is on the internal disk; an
//! erase re-creates the partition map, the APFS containers and the volumes first. So an erase
//! can fix exactly the failures that come from what is *on* the disk, and nothing that happens
//! before restored touches it (DFU, tickets, USB, host software). The list:
//!
//! * final `StatusMsg` 6 (disk failure during restore) and 27 (file systems failed to mount) —
//!   restored's own advice for both is an erase (§7.9; `restored::messages::status_cause`);
//! * a failed checkpoint, or a final status whose device log, names the data volume or file
//!   system: `data volume`, `apfs`, `filesystem`/`file system`, `fsck`, `mount`, `container`,
//!   `partition`, `keybag`, `volume group`, `snapshot` (restored fails `create_system_keybag`,
//!   `mount_filesystems`, `check_filesystems`, `fixup_var` on an inconsistent data volume);
//! * unless the device log names a data request (restored rejected what the host sent), the
//!   last progress operation before a failure was one of the disk steps of §7.8: 11
//!   creating partition map, 12 creating filesystem, 15 checking filesystems, 16 mounting
//!   filesystems, 29 unmounting filesystems, 41 migrating data, 50 creating system keybag,
//!   52 resizing system partition.
//!
//! Never erase-fixable: Recovery instead of DFU, Port DFU / wrong port, anything at the boot
//! chain (a reboot after `bootx` is a personalization failure), TSS refusals (94), network,
//! ASR stream errors (host side: the image or the link), USB link drops, host-compatibility
//! status 10, SEP (50/51) and FDR (53) failures.

use crate::bootchain::BootchainError;
use crate::restored::RestoredError;

/// A failure for the technician.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub cause: String,
    pub next_step: String,
    pub erase_could_fix: bool,
}

impl Failure {
    pub fn new(cause: impl Into<String>, next_step: impl Into<String>) -> Failure {
        Failure {
            cause: cause.into(),
            next_step: next_step.into(),
            erase_could_fix: false,
        }
    }

    pub fn erasable(mut self) -> Failure {
        self.erase_could_fix = true;
        self
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} — {}", self.cause, self.next_step)
    }
}

/// Words in a checkpoint error or device log that point at the data volume / file system.
const DISK_WORDS: &[&str] = &[
    "data volume",
    "apfs",
    "filesystem",
    "file system",
    "fsck",
    "mount",
    "container",
    "partition",
    "keybag",
    "volume group",
    "snapshot",
];

/// Final statuses restored itself attributes to the disk's contents.
pub const ERASE_FIXABLE_STATUSES: &[u64] = &[6, 27];

/// §7.8 progress operations that work on the disk's contents.
pub const DISK_OPERATIONS: &[u64] = &[11, 12, 15, 16, 29, 41, 50, 52];

/// Whether a text (checkpoint error, device log) names the data volume or file system.
pub fn mentions_disk(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    DISK_WORDS.iter().any(|w| t.contains(w))
}

/// What happened in restore mode besides the error itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreTrail {
    /// Errors of failed checkpoints (name and error text).
    pub failed_checkpoints: Vec<String>,
    /// The last §7.8 progress operation seen.
    pub last_operation: Option<u64>,
}

impl RestoreTrail {
    fn points_at_disk(&self) -> bool {
        self.failed_checkpoints.iter().any(|c| mentions_disk(c))
            || self
                .last_operation
                .is_some_and(|op| DISK_OPERATIONS.contains(&op))
    }
}

/// A boot-chain error (DFU, stage 1, stage 2, wait for restore mode) as a named failure.
pub fn bootchain(e: &BootchainError) -> Failure {
    use BootchainError as B;
    let cause = e.to_string();
    let next = match e {
        B::InRecovery => "shut the Mac down, then enter DFU: hold the DFU key combination while connecting the DFU port (support.apple.com/108900)",
        B::PortDfu => "connect the Mac's DFU port (not this one) to the station, then enter DFU again (support.apple.com/120694)",
        B::NoDevice(_) => "connect the Mac's DFU port to this station and put it in DFU mode",
        B::WrongStartMode(..) => "put the Mac in DFU mode and run again",
        B::NotAMac(_) | B::Identity(_) | B::NoChipIds(_) => "check that the device is an Apple Silicon Mac in DFU mode; unplug/replug and retry",
        B::RebootedAfterBootx(_) => "image personalization failed: put the Mac back in DFU and run again (fresh tickets are fetched); if it repeats, try another macOS build",
        B::StillInDfu | B::UnexpectedMode { .. } => "the Mac rejected a personalized image: put it back in DFU and run again (fresh tickets are fetched)",
        B::Transport { .. } | B::ShortUpload { .. } | B::DidNotLeave { .. } | B::DidNotReturn { .. } => "the USB link dropped or the Mac did not come back: check the cable (USB-C, data-capable, no hub), re-enter DFU and run again",
        B::NoRestoreMode(_) => "the Mac did not start its restore system: re-enter DFU and run again; if it repeats, try another macOS build",
        B::Image(_) => "the firmware could not be personalized: check the station's network, re-enter DFU and run again",
        B::Manifest(_) | B::Plan(_) => "this IPSW cannot restore this Mac: use the IPSW for this Mac (or --latest)",
        B::Dfu(_) | B::Recovery(_) => "unplug/replug the Mac, re-enter DFU and run again",
        B::Hotplug(_) | B::Internal(_) => "restart the station software and run again; report it if it repeats",
    };
    Failure::new(cause, next)
}

/// A restore-mode error as a named failure; `trail` decides whether an erase could fix it.
pub fn restored(e: &RestoredError, trail: &RestoreTrail) -> Failure {
    use RestoredError as R;
    let cause = e.to_string();
    match e {
        R::DeviceFailed { status, log, .. } => {
            // A device log that names a data request says restored rejected what this host
            // sent: erasing the Mac cannot change that, whatever step the disk was at.
            let host_data = log.as_deref().is_some_and(|l| l.contains("DataRequestMsg"));
            let disk = ERASE_FIXABLE_STATUSES.contains(status)
                || log.as_deref().is_some_and(mentions_disk)
                || (!host_data && trail.points_at_disk());
            if disk {
                Failure::new(
                    cause,
                    "the data volume or file system on the Mac's disk is damaged: an Erase restore re-creates it (all data on the Mac is lost)",
                )
                .erasable()
            } else {
                Failure::new(cause, "read the device log, put the Mac back in DFU and run again")
            }
        }
        R::Asr { .. } => Failure::new(
            cause,
            "writing the system image failed: check the cable, verify the IPSW (re-download it), re-enter DFU and run again",
        ),
        R::ConnectionLost | R::Io(_) | R::Connect { .. } | R::NoAnswer(_) => Failure::new(
            cause,
            "the USB link to the Mac dropped: check the cable (no hub), re-enter DFU and run again",
        ),
        R::NotRestoreMode { .. } | R::WrongMac { .. } => {
            Failure::new(cause, "disconnect other Apple devices, re-enter DFU and run again")
        }
        R::Context { .. } => {
            if trail.points_at_disk() {
                Failure::new(cause, "re-enter DFU and run again").erasable()
            } else {
                Failure::new(
                    cause,
                    "the station could not provide what the Mac asked for: check the network and the IPSW, re-enter DFU and run again",
                )
            }
        }
        _ => Failure::new(
            cause,
            "re-enter DFU and run again; if it repeats, report it with the log",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device_failed(status: u64, log: Option<&str>) -> RestoredError {
        RestoredError::DeviceFailed {
            status,
            amr_error: None,
            cause: "x",
            missing_required: vec![],
            log: log.map(str::to_string),
        }
    }

    #[test]
    fn disk_statuses_and_logs_are_erase_fixable() {
        let t = RestoreTrail::default();
        assert!(restored(&device_failed(27, None), &t).erase_could_fix);
        assert!(restored(&device_failed(6, None), &t).erase_could_fix);
        assert!(
            restored(
                &device_failed(14, Some("APFS: failed to mount the Data volume")),
                &t
            )
            .erase_could_fix
        );
        assert!(!restored(&device_failed(14, Some("baseband died")), &t).erase_could_fix);
        assert!(!restored(&device_failed(10, None), &t).erase_could_fix);
        assert!(!restored(&device_failed(53, None), &t).erase_could_fix);
    }

    #[test]
    fn the_trail_decides_for_a_general_failure() {
        let t = RestoreTrail {
            failed_checkpoints: vec![],
            last_operation: Some(16),
        };
        assert!(restored(&device_failed(14, None), &t).erase_could_fix);
        let t = RestoreTrail {
            failed_checkpoints: vec!["update_NAND_firmware: timeout".into()],
            last_operation: Some(18),
        };
        assert!(!restored(&device_failed(14, None), &t).erase_could_fix);
        let t = RestoreTrail {
            failed_checkpoints: vec![],
            last_operation: Some(12),
        };
        let host = device_failed(14, Some("step 18 (DataRequestMsg BootabilityBundle): bad"));
        assert!(!restored(&host, &t).erase_could_fix);
        let t = RestoreTrail {
            failed_checkpoints: vec!["create_system_keybag: keybag error".into()],
            last_operation: None,
        };
        assert!(restored(&device_failed(14, None), &t).erase_could_fix);
    }

    #[test]
    fn link_and_boot_failures_are_never_erase_fixable() {
        let t = RestoreTrail {
            failed_checkpoints: vec!["mount failed".into()],
            last_operation: Some(16),
        };
        assert!(!restored(&RestoredError::ConnectionLost, &t).erase_could_fix);
        let f = bootchain(&BootchainError::InRecovery);
        assert!(!f.erase_could_fix);
        assert!(f.next_step.contains("DFU"));
        assert!(bootchain(&BootchainError::PortDfu)
            .next_step
            .contains("DFU port"));
    }
}
