//! The init's settings and where they come from.
//!
//! Precedence: built-in defaults < kernel command line (`macrescue.KEY=VALUE`) < the `[init]`
//! section of `/data/macrescue/config.toml`. The command line of a unified kernel image is baked
//! in by the image build, so it carries the *image's* defaults; the config file is the owner's
//! per-stick choice and wins. Settings needed before the data partition is mounted (`data`,
//! `data_wait`) can only come from the command line.

use std::time::Duration;

use thiserror::Error;

use crate::cmdline;

/// The command the init supervises unless told otherwise.
pub const DEFAULT_STATION: &str = "restore-agent station";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Program and arguments of the station (searched in `/bin`, `/sbin`).
    pub station: Vec<String>,
    /// Console for the emergency shell (`tty2`), `None` for no shell.
    pub shell: Option<String>,
    /// GPT partition name (or file-system label) of the data partition; `None`: do not mount.
    pub data_label: Option<String>,
    /// How long to wait for the data partition to appear (USB storage enumerates late).
    pub data_wait: Duration,
    /// Longest pause between restarts of a station that keeps dying.
    pub restart_max: Duration,
    /// How long the station must have run before the init reports it ready.
    pub ready_after: Duration,
    /// Modules to load at boot besides what coldplug finds (`exfat,nls_utf8`).
    pub modules: Vec<String>,
    /// Log debug messages too.
    pub debug: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            station: cmdline::split(DEFAULT_STATION),
            shell: Some("tty2".to_string()),
            data_label: Some("MACRESCUE".to_string()),
            data_wait: Duration::from_secs(10),
            restart_max: Duration::from_secs(30),
            ready_after: Duration::from_millis(100),
            modules: Vec::new(),
            debug: false,
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SettingError {
    #[error("unknown setting {0:?}; it is ignored (known: station, shell, data, data_wait, restart_max, ready_after, modules, debug)")]
    Unknown(String),
    #[error("setting {0} only works on the kernel command line (macrescue.{0}=…): the config file is read after the data partition is mounted")]
    CommandLineOnly(String),
    #[error("setting {key}: {value:?} is not valid ({expected}); the default is kept")]
    Invalid {
        key: String,
        value: String,
        expected: &'static str,
    },
}

/// "off", "none", "no", "false", "0" and the empty string switch an optional feature off.
fn is_off(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "" | "off" | "none" | "no" | "false" | "0"
    )
}

impl Settings {
    /// Apply one `key = value` (key without the `macrescue.`/`init.` prefix).
    pub fn apply(&mut self, key: &str, value: &str) -> Result<(), SettingError> {
        let invalid = |expected| SettingError::Invalid {
            key: key.to_string(),
            value: value.to_string(),
            expected,
        };
        match key {
            "station" => {
                let words = cmdline::split(value);
                if words.is_empty() {
                    return Err(invalid("a command such as \"restore-agent station\""));
                }
                self.station = words;
            }
            "shell" => {
                self.shell = if is_off(value) {
                    None
                } else if valid_tty(value) {
                    Some(value.trim_start_matches("/dev/").to_string())
                } else {
                    return Err(invalid("a console name such as tty2 or ttyS1, or off"));
                }
            }
            "data" => {
                self.data_label = if is_off(value) {
                    None
                } else {
                    Some(value.to_string())
                }
            }
            "data_wait" => self.data_wait = seconds(value).ok_or_else(|| invalid("seconds"))?,
            "restart_max" => {
                self.restart_max = seconds(value)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| invalid("seconds, at least 1"))?
            }
            "ready_after" => {
                self.ready_after = value
                    .parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| invalid("milliseconds"))?
            }
            "modules" => self.modules = module_list(value),
            "debug" => {
                self.debug = match value {
                    "true" | "1" | "yes" | "on" => true,
                    v if is_off(v) => false,
                    _ => return Err(invalid("true or false")),
                }
            }
            _ => return Err(SettingError::Unknown(key.to_string())),
        }
        Ok(())
    }

    /// Apply every `[init]` entry of a parsed config file; other sections belong to the agent.
    pub fn apply_config(&mut self, entries: &[crate::config::Entry]) -> Vec<SettingError> {
        entries
            .iter()
            .filter_map(|e| Some((e.key.strip_prefix("init.")?, e.value.as_str())))
            .filter_map(|(key, value)| match key {
                "data" | "data_wait" => Some(SettingError::CommandLineOnly(key.to_string())),
                _ => self.apply(key, value).err(),
            })
            .collect()
    }
}

/// Whether the station will import Macs over USB/IP (`--usbip` on its command line, or
/// `usbip` under `[station]` in the config file, as a string or an array): then it needs
/// vhci-hcd, which no device asks for by modalias. Without USB/IP the boot skips it (sixteen
/// virtual root hubs: work no real station needs).
pub fn station_uses_usbip(station: &[String], config: &[crate::config::Entry]) -> bool {
    station
        .iter()
        .any(|a| a == "--usbip" || a.starts_with("--usbip="))
        || config
            .iter()
            .any(|e| e.key == "station.usbip" && !is_off(&e.value))
}

/// `vhci-hcd,exfat` or `vhci-hcd exfat`.
fn module_list(v: &str) -> Vec<String> {
    v.split([',', ' '])
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .collect()
}

fn seconds(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn valid_tty(v: &str) -> bool {
    let name = v.trim_start_matches("/dev/");
    name.starts_with("tty")
        && name.len() > 3
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    #[test]
    fn defaults_run_the_station_with_a_shell_on_tty2() {
        let s = Settings::default();
        assert_eq!(s.station, vec!["restore-agent", "station"]);
        assert_eq!(s.shell.as_deref(), Some("tty2"));
        assert_eq!(s.data_label.as_deref(), Some("MACRESCUE"));
    }

    #[test]
    fn config_file_overrides_the_command_line() {
        let mut s = Settings::default();
        let cmd = cmdline::parse(
            "console=ttyS0 macrescue.station=\"restore-agent devices --watch\" \
             macrescue.shell=off macrescue.data_wait=3 macrescue.modules=exfat,nls_utf8",
        );
        for (k, v) in &cmd.settings {
            s.apply(k, v).unwrap();
        }
        assert_eq!(s.station, vec!["restore-agent", "devices", "--watch"]);
        assert_eq!(s.shell, None);
        assert_eq!(s.data_wait, Duration::from_secs(3));
        assert_eq!(s.modules, vec!["exfat", "nls_utf8"]);

        let (entries, errs) = config::parse(
            "proxy = \"x\"\n[init]\nstation = \"restore-agent station\"\nshell = \"/dev/tty3\"\n\
             restart_max = 0\nbogus = 1\ndata_wait = 99\n",
        );
        assert!(errs.is_empty());
        let errors = s.apply_config(&entries);
        assert_eq!(s.station, vec!["restore-agent", "station"]);
        assert_eq!(s.shell.as_deref(), Some("tty3"));
        assert_eq!(s.restart_max, Duration::from_secs(30), "0 is rejected");
        assert_eq!(
            errors,
            vec![
                SettingError::Invalid {
                    key: "restart_max".into(),
                    value: "0".into(),
                    expected: "seconds, at least 1"
                },
                SettingError::Unknown("bogus".into()),
                SettingError::CommandLineOnly("data_wait".into()),
            ]
        );
        assert_eq!(s.data_wait, Duration::from_secs(3));
    }

    #[test]
    fn usbip_servers_in_flags_or_config_ask_for_vhci() {
        let plain = cmdline::split("restore-agent station --data /data");
        let config = |text: &str| crate::config::parse(text).0;
        assert!(!station_uses_usbip(&plain, &config("")));
        assert!(station_uses_usbip(
            &cmdline::split("restore-agent station --usbip 10.0.2.100:40005"),
            &config("")
        ));
        assert!(station_uses_usbip(
            &cmdline::split("restore-agent station --usbip=h:1"),
            &config("")
        ));
        // What ci/demo writes, an array, a dotted key; and what must not count.
        assert!(station_uses_usbip(
            &plain,
            &config("[init]\nmodules = \"vhci-hcd\"\n[station]\nusbip = \"10.0.2.100:40005\"\n")
        ));
        assert!(station_uses_usbip(
            &plain,
            &config("[station] # the lab\nusbip = [\"a:1\", \"b:2\"]\n")
        ));
        assert!(station_uses_usbip(
            &plain,
            &config("station.usbip = 'a:1'\n")
        ));
        assert!(!station_uses_usbip(
            &plain,
            &config("[station]\nusbip = \"\"\n")
        ));
        assert!(!station_uses_usbip(
            &plain,
            &config("[station]\nusbip = []\n")
        ));
        assert!(!station_uses_usbip(
            &plain,
            &config("[station]\nusbip = \"off\"\n")
        ));
        assert!(!station_uses_usbip(
            &plain,
            &config("[net]\nusbip = \"a:1\"\n")
        ));
        assert!(!station_uses_usbip(
            &plain,
            &config("[station]\n# usbip = \"a:1\"\n")
        ));
    }

    #[test]
    fn rejects_bad_values_and_keeps_defaults() {
        let mut s = Settings::default();
        assert!(s.apply("station", "  ").is_err());
        assert!(s.apply("shell", "sda1").is_err());
        assert!(s.apply("shell", "tty../x").is_err());
        assert!(s.apply("data_wait", "ten").is_err());
        assert!(s.apply("debug", "maybe").is_err());
        assert_eq!(s, Settings::default());
        s.apply("data", "off").unwrap();
        assert_eq!(s.data_label, None);
        s.apply("ready_after", "1500").unwrap();
        assert_eq!(s.ready_after, Duration::from_millis(1500));
    }
}
