//! Messages restored sends once StartRestore is accepted (protocol.md §7.6), parsed from their
//! plist dictionaries, and the plain-language meaning of its status codes (§7.8, §7.9, §11).

use plist::{Dictionary, Value};

/// One message from restored.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceMessage {
    /// `DataRequestMsg` (`is_async` false) or `AsyncDataRequestMsg` (true).
    DataRequest(DataRequest),
    Progress {
        operation: u64,
        /// 0–100; anything else means "indeterminate".
        progress: i64,
    },
    Status {
        status: u64,
        amr_error: Option<i64>,
        log: Option<String>,
    },
    Checkpoint(Checkpoint),
    PreviousRestoreLog(String),
    BasebandUpdateStatus(Dictionary),
    BasebandUpdaterOutputData {
        port: Option<u16>,
    },
    RestoredCrash {
        backtrace: Vec<String>,
    },
    AsyncWait,
    RestoreAttestation,
    /// macOS 27's `RestoreProtocol` (§7.11): log and continue.
    RestoreProtocol(Dictionary),
    /// A `MsgType` this host does not know; logged, the restore continues (restored does not
    /// wait for an answer to informational messages).
    Unknown {
        msg_type: String,
        message: Dictionary,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct DataRequest {
    pub data_type: String,
    pub port: Option<u16>,
    pub arguments: Dictionary,
    pub is_async: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub id: i64,
    pub name: Option<String>,
    pub result: i64,
    pub complete: bool,
    pub warning: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MessageError {
    #[error("restored sent a message without MsgType: {0}")]
    NoMsgType(String),
    #[error("restored sent a {msg_type} without {field}")]
    MissingField {
        msg_type: &'static str,
        field: &'static str,
    },
    #[error("restored sent a {msg_type} with an invalid {field}")]
    BadField {
        msg_type: &'static str,
        field: &'static str,
    },
}

fn uint(v: &Value) -> Option<u64> {
    v.as_unsigned_integer()
        .or_else(|| v.as_signed_integer().and_then(|i| u64::try_from(i).ok()))
}

fn int(v: &Value) -> Option<i64> {
    v.as_signed_integer()
        .or_else(|| v.as_unsigned_integer().map(|u| u as i64))
}

fn string(d: &Dictionary, k: &str) -> Option<String> {
    d.get(k).and_then(Value::as_string).map(str::to_owned)
}

fn port(d: &Dictionary, msg_type: &'static str) -> Result<Option<u16>, MessageError> {
    match d.get("DataPort") {
        None => Ok(None),
        Some(v) => {
            uint(v)
                .and_then(|p| u16::try_from(p).ok())
                .map(Some)
                .ok_or(MessageError::BadField {
                    msg_type,
                    field: "DataPort",
                })
        }
    }
}

/// A short description of a message for logs (never the whole plist: FileData can be big).
pub fn summary(d: &Dictionary) -> String {
    let mut keys: Vec<&str> = d.keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys.join(",")
}

impl DeviceMessage {
    pub fn parse(d: Dictionary) -> Result<Self, MessageError> {
        let Some(msg_type) = string(&d, "MsgType") else {
            return Err(MessageError::NoMsgType(summary(&d)));
        };
        Ok(match msg_type.as_str() {
            "DataRequestMsg" | "AsyncDataRequestMsg" => {
                let is_async = msg_type == "AsyncDataRequestMsg";
                let name: &'static str = if is_async {
                    "AsyncDataRequestMsg"
                } else {
                    "DataRequestMsg"
                };
                let data_type = string(&d, "DataType").ok_or(MessageError::MissingField {
                    msg_type: name,
                    field: "DataType",
                })?;
                DeviceMessage::DataRequest(DataRequest {
                    data_type,
                    port: port(&d, name)?,
                    arguments: d
                        .get("Arguments")
                        .and_then(Value::as_dictionary)
                        .cloned()
                        .unwrap_or_default(),
                    is_async,
                })
            }
            "ProgressMsg" => DeviceMessage::Progress {
                operation: d
                    .get("Operation")
                    .and_then(uint)
                    .ok_or(MessageError::MissingField {
                        msg_type: "ProgressMsg",
                        field: "Operation",
                    })?,
                progress: d.get("Progress").and_then(int).unwrap_or(-1),
            },
            "StatusMsg" => DeviceMessage::Status {
                status: d
                    .get("Status")
                    .and_then(|v| v.as_unsigned_integer().or_else(|| int(v).map(|i| i as u64)))
                    .ok_or(MessageError::MissingField {
                        msg_type: "StatusMsg",
                        field: "Status",
                    })?,
                amr_error: d.get("AMRError").and_then(int),
                log: string(&d, "Log"),
            },
            "CheckpointMsg" => DeviceMessage::Checkpoint(Checkpoint {
                id: d.get("CHECKPOINT_ID").and_then(int).unwrap_or(-1),
                name: string(&d, "CHECKPOINT_NAME"),
                result: d.get("CHECKPOINT_RESULT").and_then(int).unwrap_or(0),
                complete: d
                    .get("CHECKPOINT_COMPLETE")
                    .and_then(Value::as_boolean)
                    .unwrap_or(false),
                warning: string(&d, "CHECKPOINT_WARNING"),
                error: string(&d, "CHECKPOINT_ERROR"),
            }),
            "PreviousRestoreLogMsg" => DeviceMessage::PreviousRestoreLog(
                string(&d, "PreviousRestoreLog").unwrap_or_default(),
            ),
            "BBUpdateStatusMsg" => DeviceMessage::BasebandUpdateStatus(d),
            "BasebandUpdaterOutputData" => DeviceMessage::BasebandUpdaterOutputData {
                port: port(&d, "BasebandUpdaterOutputData")?,
            },
            "RestoredCrash" => DeviceMessage::RestoredCrash {
                backtrace: match d.get("RestoredBacktrace") {
                    Some(Value::String(s)) => vec![s.clone()],
                    Some(Value::Array(a)) => a
                        .iter()
                        .filter_map(Value::as_string)
                        .map(str::to_owned)
                        .collect(),
                    _ => Vec::new(),
                },
            },
            "AsyncWait" => DeviceMessage::AsyncWait,
            "RestoreAttestation" => DeviceMessage::RestoreAttestation,
            "RestoreProtocol" => DeviceMessage::RestoreProtocol(d),
            _ => DeviceMessage::Unknown {
                msg_type,
                message: d,
            },
        })
    }
}

/// Plain-language cause of a final `StatusMsg` (§7.9). `None` for 0 (success).
pub fn status_cause(status: u64) -> Option<&'static str> {
    Some(match status {
        0 => return None,
        u64::MAX => {
            "the Mac could not verify the restored system (verification error): the image may be \
             corrupt — check the IPSW's SHA-1 and restore again"
        }
        10 => {
            "restored rejected this host (is_host_compatible, \"This host version is unsupported\"): \
             the Mac's restore image needs message types this agent does not offer yet — update \
             macrescue, or restore an older macOS"
        }
        6 => "the Mac's internal disk failed during the restore (disk failure): try an Erase restore; if it repeats, the SSD needs service",
        14 => "restored reported a general failure: read the device log below for the step that failed",
        27 => "the Mac failed to mount its file systems: try an Erase restore",
        50 | 51 => "the Mac failed to load its Secure Enclave firmware: the firmware may not match this Mac, or personalization failed; fetch fresh tickets and retry",
        53 => "the Mac failed to recover its factory (FDR) data: it needs network access through this host; check the uplink and retry",
        1015 => "the baseband (cellular modem) update failed",
        _ => "restored reported an unknown failure status: read the device log below",
    })
}

/// Message types restored reports as missing and *required* in its compatibility check (the
/// device log says "…is not supported (required): BootabilityBundleV2").
pub fn missing_required_types(log: &str) -> Vec<String> {
    const MARK: &str = "is not supported (required):";
    let mut out: Vec<String> = Vec::new();
    for line in log.lines() {
        if let Some(i) = line.find(MARK) {
            let name = line[i + MARK.len()..].trim();
            if !name.is_empty() && !out.iter().any(|n| n == name) {
                out.push(name.to_owned());
            }
        }
    }
    out
}

/// Plain-language hint for a checkpoint error text (§11), if a known one.
pub fn checkpoint_hint(error: &str) -> Option<&'static str> {
    let e = error.to_ascii_lowercase();
    if e.contains("host version is unsupported") {
        Some("restored rejected this host's capabilities: the macOS being restored is newer than this agent supports; update macrescue")
    } else if e.contains("firmware update failed") || e.contains("update_aht") {
        Some("a device-side firmware updater failed; retry the restore, and if it repeats the named component needs service")
    } else if e.contains("personaliz") || e.contains("img4") || e.contains("ticket") {
        Some("image personalization failed: the tickets may be stale; fetch fresh tickets (network/TSS) and retry")
    } else if e.contains("network") || e.contains("fdr") || e.contains("server") {
        Some("the Mac could not reach Apple's servers through this host: check the uplink")
    } else {
        None
    }
}

/// Human name of a ProgressMsg operation (§7.8), adjusting for protocol versions < 14.
pub fn progress_operation_name(operation: u64, protocol_version: u64) -> &'static str {
    let op = if protocol_version < 14 && operation > 35 {
        operation + 1
    } else {
        operation
    };
    match op {
        11 => "creating partition map",
        12 => "creating filesystem",
        13 => "restoring image",
        14 => "verifying restore",
        15 => "checking filesystems",
        16 => "mounting filesystems",
        17 => "fixing up /var",
        18 => "flashing firmware",
        19 => "updating baseband",
        20 => "setting boot stage",
        21 => "rebooting device",
        22 => "shutting down device",
        23 => "turning on accessory power",
        24 => "clearing persistent boot-args",
        25 => "modifying persistent boot-args",
        26 => "installing root",
        27 => "installing kernelcache",
        28 => "waiting for NAND",
        29 => "unmounting filesystems",
        30 => "setting date and time",
        31 => "executing iBEC to bootstrap update",
        32 => "finalizing NAND epoch update",
        33 => "checking inappropriate boot partitions",
        34 => "creating factory restore marker",
        35 => "loading firmware to flash",
        36 => "requesting FUD data",
        37 => "removing activation record",
        38 => "checking battery voltage",
        39 => "waiting for battery charge",
        40 => "closing modem tickets",
        41 => "migrating data",
        42 => "wiping storage device",
        43 => "sending Apple logo",
        44 => "checking logs",
        46 => "clearing NVRAM",
        47 => "updating gas gauge",
        48 => "preparing baseband update",
        49 => "booting baseband",
        50 => "creating system keybag",
        51 => "updating IR MCU firmware",
        52 => "resizing system partition",
        53 => "collecting updater output",
        54 => "pairing Stockholm",
        55 => "updating Stockholm",
        56 => "updating SWDHID",
        57 => "certifying SEP",
        58 => "updating NAND firmware",
        59 => "updating SE firmware",
        60 => "updating Savage",
        61 => "installing DeviceTree",
        62 => "certifying Savage",
        63 => "submitting provinfo",
        64 => "certifying Yonkers",
        65 => "updating Rose",
        66 => "updating Veridian",
        67 => "creating protected volume",
        68 => "resizing main filesystem partition",
        69 => "creating recovery OS volume",
        70 => "installing recovery OS files",
        71 => "installing recovery OS image",
        74 => "requesting EAN data",
        77 => "sealing system volume",
        81 => "updating AppleTCON",
        _ => "unknown operation",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(pairs: Vec<(&str, Value)>) -> Dictionary {
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    #[test]
    fn parses_each_kind() {
        let m = DeviceMessage::parse(d(vec![
            ("MsgType", "DataRequestMsg".into()),
            ("DataType", "SystemImageData".into()),
            ("DataPort", Value::Integer(12345.into())),
        ]))
        .unwrap();
        assert_eq!(
            m,
            DeviceMessage::DataRequest(DataRequest {
                data_type: "SystemImageData".into(),
                port: Some(12345),
                arguments: Dictionary::new(),
                is_async: false
            })
        );
        let m = DeviceMessage::parse(d(vec![
            ("MsgType", "StatusMsg".into()),
            ("Status", Value::Integer(0.into())),
        ]))
        .unwrap();
        assert!(matches!(m, DeviceMessage::Status { status: 0, .. }));
        let m = DeviceMessage::parse(d(vec![
            ("MsgType", "RestoredCrash".into()),
            (
                "RestoredBacktrace",
                Value::Array(vec!["a".into(), "b".into()]),
            ),
        ]))
        .unwrap();
        assert_eq!(
            m,
            DeviceMessage::RestoredCrash {
                backtrace: vec!["a".into(), "b".into()]
            }
        );
        assert!(matches!(
            DeviceMessage::parse(d(vec![("MsgType", "Whatever".into())])).unwrap(),
            DeviceMessage::Unknown { .. }
        ));
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(matches!(
            DeviceMessage::parse(Dictionary::new()),
            Err(MessageError::NoMsgType(_))
        ));
        assert_eq!(
            DeviceMessage::parse(d(vec![("MsgType", "DataRequestMsg".into())])),
            Err(MessageError::MissingField {
                msg_type: "DataRequestMsg",
                field: "DataType"
            })
        );
        assert_eq!(
            DeviceMessage::parse(d(vec![
                ("MsgType", "DataRequestMsg".into()),
                ("DataType", "X".into()),
                ("DataPort", Value::Integer(70000.into()))
            ])),
            Err(MessageError::BadField {
                msg_type: "DataRequestMsg",
                field: "DataPort"
            })
        );
    }

    #[test]
    fn status_and_progress_names() {
        assert_eq!(status_cause(0), None);
        assert!(status_cause(6).unwrap().contains("disk failure"));
        assert!(status_cause(u64::MAX).unwrap().contains("verification"));
        assert!(status_cause(12345).unwrap().contains("unknown"));
        assert_eq!(progress_operation_name(13, 15), "restoring image");
        assert_eq!(progress_operation_name(36, 15), "requesting FUD data");
        assert_eq!(
            progress_operation_name(36, 13),
            "removing activation record"
        );
        assert!(checkpoint_hint("ramrod firmware update failed ... update_aht").is_some());
        assert!(checkpoint_hint("fine").is_none());
        assert!(status_cause(10).unwrap().contains("is_host_compatible"));
        // From issue #786's device log (macOS 27 beta).
        let log = "host/device compatibility check found that a message is missing or is not supported (optional): RestoreProtocol\n\
                   host/device compatibility check found that a message is missing or is not supported (required): BootabilityBundleV2\n";
        assert_eq!(missing_required_types(log), ["BootabilityBundleV2"]);
        assert!(checkpoint_hint(
            "[0]D(This host version is unsupported. You may need to update your host tools.)"
        )
        .is_some());
    }
}
