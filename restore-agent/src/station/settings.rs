//! The station's part of the data partition's config file, `/data/macrescue/config.toml`.
//!
//! One file, three owners: `macrescue-init` reads `[init]`; the station reads `[station]` and
//! `[net]`; each ignores the other's sections. Command-line flags override the file. Lists
//! may be written as TOML arrays or as one comma-separated string (the init's reader only
//! understands strings, so strings keep the file readable by both without warnings).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// Where the config file lives on the data partition.
pub const CONFIG_PATH: &str = "macrescue/config.toml";

#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid TOML: {message}; fix the file (the station starts with built-in settings until then)")]
    Parse { path: String, message: String },
}

/// A list given as an array or as `"a, b"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct List(pub Vec<String>);

impl<'de> Deserialize<'de> for List {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        Ok(List(match Raw::deserialize(d)? {
            Raw::One(s) => s
                .split([',', ' '])
                .filter(|w| !w.is_empty())
                .map(str::to_string)
                .collect(),
            Raw::Many(v) => v,
        }))
    }
}

/// `[station]`: where firmware comes from and how Macs are handled.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct StationSection {
    /// Apple's macOS IPSW catalog (or a mirror).
    pub catalog_url: Option<String>,
    /// The ipsw.me-style fallback; `"off"` disables it.
    pub fallback_url: Option<String>,
    /// The TSS signing server.
    pub tss_url: Option<String>,
    /// PEM file with an extra trusted CA (relative: to the data partition).
    pub ca_file: Option<String>,
    /// `http://host:port` proxy for every request.
    pub proxy: Option<String>,
    /// `latest`, a build number (`25C56`), or an IPSW path/URL.
    pub build: Option<String>,
    /// Local ttys for erase confirmation (`/dev/ttyS0`); default: the init's consoles.
    #[serde(default)]
    pub consoles: List,
    /// USB/IP servers whose devices are imported (`10.0.2.100:3240`).
    #[serde(default)]
    pub usbip: List,
    pub max_macs: Option<usize>,
    pub confirm_timeout: Option<u64>,
    pub allow_recovery: Option<bool>,
    /// Multiplies every USB wait (re-enumeration after iBSS/iBEC, restore mode, transfers):
    /// `1` for real Macs; QEMU without acceleration needs far more.
    pub usb_timeout_scale: Option<f64>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, toml::Value>,
}

/// `[net]`: networking (links, DHCP, time).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct NetSection {
    /// `false`: the station does not touch the network (links configured by someone else).
    pub enabled: Option<bool>,
    /// Time servers (`host` or `host:port`), tried after DHCP's.
    #[serde(default)]
    pub ntp: List,
    /// The last-resort time server; `"off"` disables it.
    pub ntp_fallback: Option<String>,
    /// `false`: when no time server answers within `clock_wait`, continue with the RTC.
    pub require_clock: Option<bool>,
    /// Seconds to wait for SNTP before deciding.
    pub clock_wait: Option<u64>,
    /// Only these links; default every wired one.
    #[serde(default)]
    pub interfaces: List,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct FileSettings {
    #[serde(default)]
    pub station: StationSection,
    #[serde(default)]
    pub net: NetSection,
    /// `[init]` and anything else: not ours.
    #[serde(flatten)]
    pub others: BTreeMap<String, toml::Value>,
}

impl FileSettings {
    pub fn parse(text: &str, path: &Path) -> Result<FileSettings, SettingsError> {
        toml::from_str(text).map_err(|e| SettingsError::Parse {
            path: path.display().to_string(),
            message: e.message().to_string(),
        })
    }

    /// The file, or defaults when it does not exist.
    pub fn load(path: &Path) -> Result<FileSettings, SettingsError> {
        match std::fs::read_to_string(path) {
            Ok(t) => Self::parse(&t, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileSettings::default()),
            Err(source) => Err(SettingsError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Keys of our sections we do not know (typos), for a warning each.
    pub fn unknown_keys(&self) -> Vec<String> {
        let s = self.station.unknown.keys().map(|k| format!("station.{k}"));
        let n = self.net.unknown.keys().map(|k| format!("net.{k}"));
        s.chain(n).collect()
    }
}

/// A path from the file: relative ones are on the data partition.
pub fn resolve(data_dir: Option<&Path>, p: &str) -> PathBuf {
    let path = PathBuf::from(p);
    match data_dir {
        Some(d) if path.is_relative() => d.join(path),
        _ => path,
    }
}

/// "off", "none", "no", "false" and "" switch an optional URL or server off.
pub fn is_off(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "" | "off" | "none" | "no" | "false"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_sections_and_ignores_the_inits() {
        let text = r#"
[init]
modules = "vhci-hcd"
station = "restore-agent station --data /data"

[station]
catalog_url = "https://10.0.2.100:8001/catalog.xml"
fallback_url = "off"
tss_url = "https://10.0.2.100:8003/TSS/controller?action=2"
ca_file = "macrescue/test-ca.pem"
usbip = "10.0.2.100:3240, 10.0.2.101"
consoles = ["/dev/ttyS0", "/dev/tty1"]
build = "25C56"
max_macs = 2
colour = "blue"

[net]
require_clock = false
clock_wait = 5
ntp = "10.0.2.2"
"#;
        let f = FileSettings::parse(text, Path::new("c.toml")).unwrap();
        assert_eq!(
            f.station.catalog_url.as_deref(),
            Some("https://10.0.2.100:8001/catalog.xml")
        );
        assert!(is_off(f.station.fallback_url.as_deref().unwrap()));
        assert_eq!(f.station.usbip.0, vec!["10.0.2.100:3240", "10.0.2.101"]);
        assert_eq!(f.station.consoles.0, vec!["/dev/ttyS0", "/dev/tty1"]);
        assert_eq!(f.station.max_macs, Some(2));
        assert_eq!(f.net.require_clock, Some(false));
        assert_eq!(f.net.clock_wait, Some(5));
        assert_eq!(f.net.ntp.0, vec!["10.0.2.2"]);
        assert_eq!(f.unknown_keys(), vec!["station.colour"]);
        assert!(f.others.contains_key("init"));
        assert_eq!(
            resolve(
                Some(Path::new("/data")),
                f.station.ca_file.as_deref().unwrap()
            ),
            PathBuf::from("/data/macrescue/test-ca.pem")
        );
        assert_eq!(resolve(None, "/etc/ca.pem"), PathBuf::from("/etc/ca.pem"));
    }

    #[test]
    fn usb_timeout_scale_takes_integers_and_fractions() {
        let f = |t: &str| {
            FileSettings::parse(t, Path::new("c.toml"))
                .unwrap()
                .station
                .usb_timeout_scale
        };
        assert_eq!(f("[station]\nusb_timeout_scale = 20\n"), Some(20.0));
        assert_eq!(f("[station]\nusb_timeout_scale = 2.5\n"), Some(2.5));
        assert_eq!(f("[station]\n"), None);
        let e = FileSettings::parse(
            "[station]\nusb_timeout_scale = \"slow\"\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("c.toml is not valid TOML: "), "{e}");
    }

    #[test]
    fn bad_files_are_named_and_missing_ones_are_defaults() {
        let e = FileSettings::parse("[station]\nmax_macs = \"two\"\n", Path::new("/d/c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/d/c.toml is not valid TOML: "), "{e}");
        assert_eq!(
            FileSettings::load(Path::new("/nonexistent/macrescue/config.toml")).unwrap(),
            FileSettings::default()
        );
    }
}
