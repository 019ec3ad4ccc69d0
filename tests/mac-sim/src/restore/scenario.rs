//! Scenario files: what the simulated restore OS sends, in order, and what it expects back.
//! The format (TOML) is documented in `tests/mac-sim/README.md`.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("scenario {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Expected `AuthInstallRestoreBehavior`: "Update" or "Erase".
    pub behavior: String,
    #[serde(default = "default_protocol_version")]
    pub restore_protocol_version: u64,
    /// usbmux major version the device answers with (1 or 2).
    #[serde(default = "default_mux_version")]
    pub mux_version: u32,
    #[serde(default)]
    pub reverse_proxy: ReverseProxy,
    /// DataTypes restored's `is_host_compatible` requires in `SupportedDataTypes`.
    #[serde(default)]
    pub required_data_types: Vec<String>,
    /// MsgTypes it requires in `SupportedMessageTypes`.
    #[serde(default)]
    pub required_message_types: Vec<String>,
    pub image: ImageSpec,
    #[serde(default)]
    pub asr: AsrSpec,
    #[serde(default)]
    pub faults: ScenarioFaults,
    #[serde(rename = "step", default)]
    pub steps: Vec<Step>,
}

fn default_protocol_version() -> u64 {
    15
}
fn default_mux_version() -> u32 {
    2
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReverseProxy {
    /// The device does not listen on 1082.
    #[default]
    Off,
    /// The host must open the control channel (BeginCtrl/HelloCtrl) before StartRestore.
    Ctrl,
    /// As `ctrl`, and the device also opens one connection channel and pings it.
    Ping,
}

/// The system image the ASR sink expects.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Bytes. With `seed`, the image is generated (see [`fill_image`]).
    pub size: u64,
    pub seed: Option<u64>,
    /// A file to compare against instead of a generator (relative paths: to the scenario).
    pub path: Option<PathBuf>,
    /// Expected SHA-1 of the whole image (hex), checked after the payload.
    pub sha1: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsrSpec {
    #[serde(default = "yes")]
    pub checksum_chunks: bool,
    /// OOB reads the device issues before the payload: [offset, length] pairs. Negative
    /// offsets count from the end of the image.
    #[serde(default = "default_oob")]
    pub oob: Vec<[i64; 2]>,
    /// Send Initiate a second time (iBridgeOS 9+ behaviour, §8 step 3).
    #[serde(default)]
    pub reinitiate: bool,
}

impl Default for AsrSpec {
    fn default() -> Self {
        AsrSpec {
            checksum_chunks: true,
            oob: default_oob(),
            reinitiate: false,
        }
    }
}

fn yes() -> bool {
    true
}
fn default_oob() -> Vec<[i64; 2]> {
    vec![[0, 4096], [-4096, 4096]]
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFaults {
    /// Delay every device ACK by this many milliseconds.
    #[serde(default)]
    pub ack_delay_ms: u64,
    /// Drop off the bus after this many ASR payload bytes.
    pub disconnect_after_asr_bytes: Option<u64>,
    /// RST the ASR connection after this many payload bytes (then fail the restore).
    pub rst_asr_after_bytes: Option<u64>,
    /// RST the main restored connection (62078) after this many steps.
    pub rst_main_after_step: Option<usize>,
}

/// One thing the device does.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "msg", deny_unknown_fields)]
pub enum Step {
    DataRequestMsg(DataRequest),
    AsyncDataRequestMsg(DataRequest),
    ProgressMsg {
        operation: u64,
        progress: i64,
    },
    CheckpointMsg {
        id: u64,
        name: String,
        #[serde(default)]
        result: i64,
        #[serde(default = "yes")]
        complete: bool,
        error: Option<String>,
        warning: Option<String>,
    },
    StatusMsg {
        status: u64,
        log: Option<String>,
        amr_error: Option<u64>,
    },
    PreviousRestoreLogMsg {
        log: String,
    },
    RestoredCrash {
        backtrace: Vec<String>,
    },
    RestoreAttestation,
    AsyncWait,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataRequest {
    pub data_type: String,
    /// `Arguments`; string values starting with `hex:` are sent as data.
    #[serde(default)]
    pub arguments: toml::Table,
    /// The host must answer on a new connection to this device port.
    pub data_port: Option<u16>,
    /// BuildIdentityDict: substring the returned identity's `Info.Variant` must contain.
    pub expect_variant: Option<String>,
    /// The host must not answer but abort (an unknown DataType).
    #[serde(default)]
    pub expect_host_abort: bool,
    /// FirmwareUpdaterData: the ticket `FirmwareResponseData` must carry (e.g. `Timer,Ticket`),
    /// signed with the test key for the coprocessor and nonce in `MessageArgInfo`.
    pub expect_ticket: Option<String>,
    /// FirmwareUpdaterData: the shape `FirmwareData` must have: `"ftab"` (an RTKit table whose
    /// last entry is `rrko`), `"data"` (non-empty bytes) or `"none"` (absent).
    pub expect_firmware: Option<String>,
}

impl Scenario {
    pub fn parse(text: &str, origin: &Path) -> Result<Scenario, ScenarioError> {
        let mut s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        let bad = |message: String| ScenarioError::Parse {
            path: origin.to_path_buf(),
            message,
        };
        if !matches!(s.behavior.as_str(), "Update" | "Erase") {
            return Err(bad(format!(
                "behavior must be \"Update\" or \"Erase\", not {:?}",
                s.behavior
            )));
        }
        if !matches!(s.mux_version, 1 | 2) {
            return Err(bad(format!(
                "mux_version must be 1 or 2, not {}",
                s.mux_version
            )));
        }
        if s.image.seed.is_none() && s.image.path.is_none() {
            return Err(bad("[image] needs a seed or a path".into()));
        }
        if let (Some(p), Some(dir)) = (s.image.path.as_mut(), origin.parent()) {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(s)
    }

    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Scenario::parse(&text, path)
    }

    /// A shipped scenario from `tests/mac-sim/scenarios/`.
    pub fn shipped(name: &str) -> Result<Scenario, ScenarioError> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        Scenario::load(&dir.join(format!("{name}.toml")))
    }
}

fn mix(seed: u64, k: u64) -> u64 {
    let mut z = seed ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The generated image's bytes at `offset`: 8-byte little-endian words, word `k` a hash of
/// (`seed`, `k`). Random access, so host and device can produce any range independently.
pub fn fill_image(seed: u64, offset: u64, out: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    while i < out.len() {
        let within = (pos % 8) as usize;
        let v = mix(seed, pos / 8).to_le_bytes();
        let n = (8 - within).min(out.len() - i);
        out[i..i + n].copy_from_slice(&v[within..within + n]);
        i += n;
        pos += n as u64;
    }
}

/// Random access to the expected image.
#[derive(Debug)]
pub enum ImageSource {
    Generated { seed: u64, size: u64 },
    File { file: File, size: u64 },
}

impl ImageSource {
    pub fn open(spec: &ImageSpec) -> io::Result<ImageSource> {
        if let Some(p) = &spec.path {
            let file = File::open(p)?;
            let size = file.metadata()?.len();
            if size != spec.size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} has {size} bytes, the scenario says {}",
                        p.display(),
                        spec.size
                    ),
                ));
            }
            return Ok(ImageSource::File { file, size });
        }
        Ok(ImageSource::Generated {
            seed: spec.seed.unwrap_or(0),
            size: spec.size,
        })
    }

    pub fn size(&self) -> u64 {
        match self {
            ImageSource::Generated { size, .. } | ImageSource::File { size, .. } => *size,
        }
    }

    pub fn read_at(&mut self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        match self {
            ImageSource::Generated { seed, .. } => {
                fill_image(*seed, offset, out);
                Ok(())
            }
            ImageSource::File { file, .. } => {
                file.seek(SeekFrom::Start(offset))?;
                file.read_exact(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_random_access() {
        let mut whole = vec![0; 100];
        fill_image(9, 0, &mut whole);
        let mut part = vec![0; 37];
        fill_image(9, 13, &mut part);
        assert_eq!(&whole[13..50], &part[..]);
        assert_ne!(whole[..8], whole[8..16]);
    }

    #[test]
    fn file_images_are_read_at_offsets_and_size_checked() {
        let path = std::env::temp_dir().join(format!("mac-sim-image-{}", std::process::id()));
        std::fs::write(&path, (0..=255u8).cycle().take(1000).collect::<Vec<_>>()).unwrap();
        let spec = |size| ImageSpec {
            size,
            seed: None,
            path: Some(path.clone()),
            sha1: None,
        };
        let mut img = ImageSource::open(&spec(1000)).unwrap();
        let mut b = [0u8; 3];
        img.read_at(255, &mut b).unwrap();
        assert_eq!(b, [255, 0, 1]);
        let e = ImageSource::open(&spec(999)).unwrap_err();
        assert!(e.to_string().contains("the scenario says 999"), "{e}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn shipped_scenarios_parse() {
        for name in ["mac-revive", "mac-erase", "mac-firmware-updaters"] {
            let s = Scenario::shipped(name).unwrap();
            assert!(!s.steps.is_empty(), "{name}");
        }
    }

    #[test]
    fn misspelt_step_fields_are_rejected() {
        let base = "name='x'\nbehavior='Erase'\n[image]\nsize=1\nseed=1\n[[step]]\n";
        for step in [
            "msg='DataRequestMsg'\ndata_type='X'\nexpect_host_abot=true\n",
            "msg='ProgressMsg'\noperation=1\nprogres=2\n",
            "msg='NoSuchMsg'\n",
        ] {
            let text = format!("{base}{step}");
            assert!(
                Scenario::parse(&text, Path::new("x.toml")).is_err(),
                "accepted: {step}"
            );
        }
        let ok = format!("{base}msg='DataRequestMsg'\ndata_type='X'\nexpect_host_abort=true\n");
        let s = Scenario::parse(&ok, Path::new("x.toml")).unwrap();
        assert!(matches!(&s.steps[0], Step::DataRequestMsg(r) if r.expect_host_abort));
    }

    #[test]
    fn bad_behavior_is_rejected() {
        let e = Scenario::parse(
            "name='x'\nbehavior='Revive'\n[image]\nsize=1\nseed=1\n",
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("behavior must be"), "{e}");
    }
}
