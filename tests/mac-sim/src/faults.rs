//! Misbehaviours the simulated Mac can be told to show, so tests can check how the agent copes
//! with a Mac that drops off the bus, stalls, refuses an image or changes its nonce.
//!
//! Every knob is a public field (tests build [`Faults`] directly); the CLI feeds
//! `--fault key[=value]` strings through [`Faults::apply`].

use std::fmt;
use std::str::FromStr;

/// The mode a simulated Mac is in when it is first plugged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartMode {
    /// SecureROM DFU, 05ac:1227.
    #[default]
    Dfu,
    /// The USB-C port controller's DFU, 05ac:f014.
    PortDfu,
    /// The Mac is already in Recovery, running iBoot stage 1 (05ac:1281).
    Recovery,
    /// The Mac already booted its restore ramdisk (05ac:1901, usbmux): restore-mode tests
    /// start here instead of walking the boot chain. Needs `SimMac::with_restore`.
    Restore,
}

impl FromStr for StartMode {
    type Err = FaultError;
    fn from_str(s: &str) -> Result<Self, FaultError> {
        match s.to_ascii_lowercase().as_str() {
            "dfu" => Ok(StartMode::Dfu),
            "portdfu" | "port-dfu" => Ok(StartMode::PortDfu),
            "recovery" => Ok(StartMode::Recovery),
            "restore" => Ok(StartMode::Restore),
            _ => Err(FaultError::BadValue {
                key: "start".into(),
                value: s.into(),
                expected: "dfu, portdfu, recovery or restore",
            }),
        }
    }
}

impl fmt::Display for StartMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StartMode::Dfu => "dfu",
            StartMode::PortDfu => "portdfu",
            StartMode::Recovery => "recovery",
            StartMode::Restore => "restore",
        })
    }
}

/// A point in the boot chain where the Mac can be made to vanish from the bus for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// On the first DFU class request (SecureROM or Port DFU).
    Dfu,
    /// On the first iBoot request or bulk transfer while iBSS (boot-stage 1) runs.
    Stage1,
    /// On the first iBoot request or bulk transfer while iBEC (boot-stage 2) runs.
    Stage2,
    /// Right after `bootx`: the restore OS never appears.
    AfterBootx,
}

impl FromStr for Stage {
    type Err = FaultError;
    fn from_str(s: &str) -> Result<Self, FaultError> {
        match s.to_ascii_lowercase().as_str() {
            "dfu" => Ok(Stage::Dfu),
            "stage1" | "ibss" => Ok(Stage::Stage1),
            "stage2" | "ibec" => Ok(Stage::Stage2),
            "bootx" | "after-bootx" => Ok(Stage::AfterBootx),
            _ => Err(FaultError::BadValue {
                key: "disconnect-at".into(),
                value: s.into(),
                expected: "dfu, stage1, stage2 or bootx",
            }),
        }
    }
}

/// Every fault knob. `Faults::default()` is a well-behaved Mac.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Faults {
    /// Drop off the bus (and stay off) when this stage is reached.
    pub disconnect_at: Option<Stage>,
    /// Drop off the bus once this many payload bytes (DFU DNLOAD data plus bulk OUT data,
    /// counted over the whole session) have been received.
    pub disconnect_after_bytes: Option<u64>,
    /// In restore mode: drop off the bus once this many usbmux bytes (bulk OUT, counted over
    /// every restore-mode boot of this Mac) have been received — a cable pulled during the ASR
    /// stream. Fires once.
    pub disconnect_in_restore_after_bytes: Option<u64>,
    /// Stall every iBoot command (EP0 `40/00` or `40/01`) starting with this text, e.g. `"go"`
    /// or `"setenv auto-boot"` (the device model checks the prefix for any stage firmware; the
    /// simulated iBoot itself also matches the whole line or its first word).
    pub stall_command: Option<String>,
    /// Stall every DFU class request with this bRequest (e.g. 3 = GET_STATUS, 1 = DNLOAD).
    pub stall_dfu_request: Option<u8>,
    /// Overrides the start mode the device was built with.
    pub start: Option<StartMode>,
    /// Present a fresh ApNonce and SepNonce on every boot (otherwise they survive reboots).
    pub change_nonce_on_boot: bool,
    /// The ROM rejects every iBSS, valid or not: the Mac stays in DFU.
    pub refuse_ibss: bool,
    /// Check the DFU suffix CRC (libirecovery's variant). Off mimics a ROM that ignores it.
    pub verify_crc: bool,
    /// Enumerate in restore mode with this PID instead of 0x1901, as some Macs do (an M1
    /// MacBook Pro showed 05ac:12ac); lets usbmuxd releases that only know the iOS range see it.
    pub restore_pid: Option<u16>,
    /// After the cable was pulled (a disconnect fault), it is plugged back in this long
    /// later, the Mac in DFU again (a technician re-entering DFU). The fault fires once.
    pub replug_after: Option<std::time::Duration>,
    /// After a restore that ended with a device failure, the Mac is put back into DFU (what
    /// a technician does when the station asks for an erase).
    pub dfu_after_failure: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            disconnect_at: None,
            disconnect_after_bytes: None,
            disconnect_in_restore_after_bytes: None,
            stall_command: None,
            stall_dfu_request: None,
            start: None,
            change_nonce_on_boot: false,
            refuse_ibss: false,
            verify_crc: true,
            restore_pid: None,
            replug_after: None,
            dfu_after_failure: false,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FaultError {
    #[error("unknown fault {0:?}; known: {KNOWN}")]
    Unknown(String),
    #[error("fault {key} needs a value ({expected}), e.g. --fault {key}=…")]
    MissingValue { key: String, expected: &'static str },
    #[error("fault {key}={value:?} is not valid; expected {expected}")]
    BadValue {
        key: String,
        value: String,
        expected: &'static str,
    },
}

const KNOWN: &str = "disconnect-at=dfu|stage1|stage2|bootx, disconnect-after-bytes=N, \
    disconnect-in-restore-after-bytes=N, \
    stall-command=TEXT, stall-dfu=getstatus|getstate|dnload|clrstatus|abort|N, \
    start=dfu|portdfu|recovery, change-nonce, refuse-ibss, no-crc-check, crc-check=on|off, \
    restore-pid=0xNNNN, replug-after=MS, dfu-after-failure";

fn parse_pid(key: &str, v: &str) -> Result<u16, FaultError> {
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16),
        None => v.parse(),
    };
    parsed.map_err(|_| FaultError::BadValue {
        key: key.into(),
        value: v.into(),
        expected: "a USB product ID such as 0x12ac",
    })
}

fn parse_bool(key: &str, v: Option<&str>) -> Result<bool, FaultError> {
    match v.map(str::to_ascii_lowercase).as_deref() {
        None | Some("on") | Some("true") | Some("yes") | Some("1") => Ok(true),
        Some("off") | Some("false") | Some("no") | Some("0") => Ok(false),
        Some(other) => Err(FaultError::BadValue {
            key: key.into(),
            value: other.into(),
            expected: "on or off",
        }),
    }
}

fn parse_dfu_request(v: &str) -> Result<u8, FaultError> {
    let bad = || FaultError::BadValue {
        key: "stall-dfu".into(),
        value: v.into(),
        expected: "getstatus, getstate, dnload, clrstatus, abort or a bRequest number",
    };
    match v.to_ascii_lowercase().replace(['_', '-'], "").as_str() {
        "detach" => Ok(0),
        "dnload" | "download" => Ok(1),
        "upload" => Ok(2),
        "getstatus" => Ok(3),
        "clrstatus" => Ok(4),
        "getstate" => Ok(5),
        "abort" => Ok(6),
        n => n.parse().map_err(|_| bad()),
    }
}

impl Faults {
    /// Apply one `key[=value]` fault spec, as given to `--fault`.
    pub fn apply(&mut self, spec: &str) -> Result<(), FaultError> {
        let (key, value) = match spec.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (spec.trim(), None),
        };
        let need = |expected: &'static str| {
            value.ok_or_else(|| FaultError::MissingValue {
                key: key.into(),
                expected,
            })
        };
        match key.to_ascii_lowercase().as_str() {
            "disconnect-at" => self.disconnect_at = Some(need("dfu|stage1|stage2|bootx")?.parse()?),
            "disconnect-after-bytes" => {
                let v = need("a byte count")?;
                self.disconnect_after_bytes = Some(v.parse().map_err(|_| FaultError::BadValue {
                    key: key.into(),
                    value: v.into(),
                    expected: "a byte count",
                })?)
            }
            "disconnect-in-restore-after-bytes" => {
                let v = need("a byte count")?;
                self.disconnect_in_restore_after_bytes =
                    Some(v.parse().map_err(|_| FaultError::BadValue {
                        key: key.into(),
                        value: v.into(),
                        expected: "a byte count",
                    })?)
            }
            "stall-command" => self.stall_command = Some(need("an iBoot command")?.to_string()),
            "stall-dfu" => self.stall_dfu_request = Some(parse_dfu_request(need("a request")?)?),
            "start" => self.start = Some(need("dfu|portdfu|recovery")?.parse()?),
            "change-nonce" => self.change_nonce_on_boot = parse_bool(key, value)?,
            "refuse-ibss" => self.refuse_ibss = parse_bool(key, value)?,
            "crc-check" => self.verify_crc = parse_bool(key, value)?,
            "replug-after" => {
                let v = need("milliseconds")?;
                let ms: u64 = v.parse().map_err(|_| FaultError::BadValue {
                    key: key.into(),
                    value: v.into(),
                    expected: "milliseconds",
                })?;
                self.replug_after = Some(std::time::Duration::from_millis(ms))
            }
            "dfu-after-failure" => self.dfu_after_failure = parse_bool(key, value)?,
            "no-crc-check" => self.verify_crc = !parse_bool(key, value)?,
            "restore-pid" => self.restore_pid = Some(parse_pid(key, need("a product ID")?)?),
            _ => return Err(FaultError::Unknown(spec.into())),
        }
        Ok(())
    }

    /// Build from several specs (the CLI's repeated `--fault`).
    pub fn from_specs<S: AsRef<str>>(specs: &[S]) -> Result<Faults, FaultError> {
        let mut f = Faults::default();
        for s in specs {
            f.apply(s.as_ref())?;
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_well_behaved() {
        let f = Faults::default();
        assert!(f.verify_crc);
        assert_eq!(f.disconnect_at, None);
        assert!(!f.refuse_ibss && !f.change_nonce_on_boot);
    }

    #[test]
    fn parses_every_knob() {
        let f = Faults::from_specs(&[
            "disconnect-at=stage1",
            "disconnect-after-bytes=100000",
            "disconnect-in-restore-after-bytes=2097152",
            "stall-command=setenv auto-boot",
            "stall-dfu=getstatus",
            "start=portdfu",
            "change-nonce",
            "refuse-ibss",
            "no-crc-check",
            "restore-pid=0x12ac",
            "replug-after=8000",
            "dfu-after-failure",
        ])
        .unwrap();
        assert_eq!(
            f,
            Faults {
                disconnect_at: Some(Stage::Stage1),
                disconnect_after_bytes: Some(100_000),
                disconnect_in_restore_after_bytes: Some(2 << 20),
                stall_command: Some("setenv auto-boot".into()),
                stall_dfu_request: Some(3),
                start: Some(StartMode::PortDfu),
                change_nonce_on_boot: true,
                refuse_ibss: true,
                verify_crc: false,
                restore_pid: Some(0x12ac),
                replug_after: Some(std::time::Duration::from_secs(8)),
                dfu_after_failure: true,
            }
        );
        assert_eq!(
            Faults::from_specs(&["restore-pid=6401"])
                .unwrap()
                .restore_pid,
            Some(0x1901)
        );
        assert!(matches!(
            Faults::from_specs(&["replug-after=soon"]),
            Err(FaultError::BadValue { .. })
        ));
        let f =
            Faults::from_specs(&["crc-check=off", "stall-dfu=1", "disconnect-at=bootx"]).unwrap();
        assert!(!f.verify_crc);
        assert_eq!(f.stall_dfu_request, Some(1));
        assert_eq!(f.disconnect_at, Some(Stage::AfterBootx));
        let f = Faults::from_specs(&["change-nonce=off", "start=recovery"]).unwrap();
        assert!(!f.change_nonce_on_boot);
        assert_eq!(f.start, Some(StartMode::Recovery));
    }

    #[test]
    fn rejects_bad_specs_with_hints() {
        assert!(matches!(
            Faults::from_specs(&["explode"]),
            Err(FaultError::Unknown(_))
        ));
        let e = Faults::from_specs(&["disconnect-at"]).unwrap_err();
        assert!(matches!(e, FaultError::MissingValue { .. }), "{e}");
        let e = Faults::from_specs(&["disconnect-at=stage9"]).unwrap_err();
        assert!(e.to_string().contains("stage1"), "{e}");
        assert!(Faults::from_specs(&["disconnect-after-bytes=lots"]).is_err());
        assert!(Faults::from_specs(&["stall-dfu=frobnicate"]).is_err());
        assert!(Faults::from_specs(&["change-nonce=maybe"]).is_err());
        assert!(Faults::from_specs(&["start=normal"]).is_err());
        assert!(Faults::from_specs(&["restore-pid=0x10000"]).is_err());
        assert!(Faults::from_specs(&["restore-pid=apple"]).is_err());
    }
}
