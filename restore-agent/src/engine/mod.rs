//! The per-Mac restore engine: one flow from "a Mac appeared on the cable" to a named success
//! or failure, for the one-shot CLI and for the station that restores many Macs at once.
//!
//! identify → pick build → firmware → tickets → DFU → stage 1 → stage 2 → restore mode.
//! The default is a *revive* (the Update identity, keeping user data). When a revive fails in a
//! way an erase can fix ([`failure`] lists them), the engine asks an [`EraseConfirmer`] — a
//! person at the station — and erases only on [`EraseDecision::Confirmed`]. Every decision is
//! recorded in the [`MacReport`].
//!
//! The boot chain runs on a blocking thread (the driver is synchronous); restore mode runs on
//! the async runtime over [`crate::usbmux::edge::MuxHandle`].

mod context;
pub mod failure;
mod firmware;
mod flow;
mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::catalog_fetch::CatalogFetchConfig;
use crate::http::HttpConfig;
use crate::tss_client::TssClientConfig;
use crate::usb::{DeviceInfo, UsbBus};

pub use context::EngineContext;
pub use failure::Failure;
pub use firmware::{DownloadHub, DownloadTuning};
pub use report::{EraseRecord, MacReport, StageTiming};

/// Which macOS build to install.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BuildPin {
    /// The newest build in the catalog that Apple still signs for this Mac.
    #[default]
    Latest,
    /// A build number from the catalog, e.g. `25C56`.
    Build(String),
    /// A given IPSW.
    Ipsw(PathOrUrl),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathOrUrl {
    Path(PathBuf),
    Url(String),
}

impl PathOrUrl {
    /// `http://` / `https://` are URLs, anything else a local path.
    pub fn parse(s: &str) -> PathOrUrl {
        if s.starts_with("http://") || s.starts_with("https://") {
            PathOrUrl::Url(s.to_string())
        } else {
            PathOrUrl::Path(PathBuf::from(s))
        }
    }
}

/// How long to wait for what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// DFU, stage 1, stage 2 and the wait for restore mode.
    pub bootchain: crate::bootchain::Timeouts,
    /// Connecting to restored and its data ports: attempts and the pause between them.
    pub restored_connect_attempts: u32,
    pub restored_connect_retry: Duration,
    /// restored's answers to queries.
    pub restored_query: Duration,
    /// The usbmux handshake with the restore-mode Mac.
    pub mux_handshake: Duration,
    /// After the technician confirmed an erase: how long to wait for the Mac to be back in DFU.
    pub back_in_dfu: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            bootchain: crate::bootchain::Timeouts::default(),
            restored_connect_attempts: 30,
            restored_connect_retry: Duration::from_secs(2),
            restored_query: Duration::from_secs(30),
            mux_handshake: Duration::from_secs(10),
            back_in_dfu: Duration::from_secs(600),
        }
    }
}

impl Timeouts {
    /// The USB waits (boot chain, usbmux, restored) multiplied by `factor`, for hosts where
    /// the Mac's USB is many times slower than a real port (see the station's
    /// `usb_timeout_scale`). The wait for a technician's Mac to come back in DFU stays.
    pub fn scaled(&self, factor: f64) -> Timeouts {
        Timeouts {
            bootchain: self.bootchain.scaled(factor),
            restored_connect_attempts: self.restored_connect_attempts,
            restored_connect_retry: self.restored_connect_retry.mul_f64(factor),
            restored_query: self.restored_query.mul_f64(factor),
            mux_handshake: self.mux_handshake.mul_f64(factor),
            back_in_dfu: self.back_in_dfu,
        }
    }
}

/// Everything the engine needs besides the Mac.
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    /// Where IPSWs are kept (`<cache>/<file name of the URL>`); `None`: stream from the URL.
    /// A missing IPSW is downloaded there while the Mac is restored from the partial file.
    pub cache_dir: Option<PathBuf>,
    /// Other places with IPSWs (USB disks the init mounted under `/media`): a catalog build is
    /// taken from there, or from `cache_dir`, when a file's BuildManifest matches the Mac.
    pub local_ipsw_dirs: Vec<PathBuf>,
    pub download: DownloadTuning,
    /// Running downloads, shared by every Mac restored with this configuration.
    pub downloads: Arc<DownloadHub>,
    pub catalog: CatalogFetchConfig,
    pub tss: TssClientConfig,
    pub http: HttpConfig,
    pub pin: BuildPin,
    pub timeouts: Timeouts,
    /// Accept a Mac that is in Recovery instead of DFU.
    pub allow_recovery_start: bool,
}

/// Revive keeps user data (the Update identity); Erase wipes the Mac.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Behavior {
    Revive,
    Erase,
}

impl Behavior {
    pub fn manifest(self) -> crate::manifest::RestoreBehavior {
        match self {
            Behavior::Revive => crate::manifest::RestoreBehavior::Update,
            Behavior::Erase => crate::manifest::RestoreBehavior::Erase,
        }
    }

    pub fn restored(self) -> crate::restored::options::RestoreBehavior {
        match self {
            Behavior::Revive => crate::restored::options::RestoreBehavior::Update,
            Behavior::Erase => crate::restored::options::RestoreBehavior::Erase,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Stage {
    Identify,
    PickBuild,
    Firmware,
    Tickets,
    Dfu,
    Stage1,
    Stage2,
    RestoreMode,
    Done,
}

/// What the engine reports while it works (for dashboards and progress lines).
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    Stage {
        stage: Stage,
    },
    Identified {
        ecid: u64,
        product_type: String,
        board: String,
        name: String,
    },
    Build {
        version: String,
        build: String,
    },
    Progress {
        what: String,
        done: u64,
        total: Option<u64>,
        rate_bps: Option<f64>,
    },
    Checkpoint {
        name: String,
        result: i64,
    },
    Message(String),
    Failed {
        cause: String,
        next_step: String,
        erase_could_fix: bool,
    },
    Succeeded,
}

/// Asks a person at the station before a Mac is erased.
pub trait EraseConfirmer: Send + Sync {
    /// Blocks until a person at the station confirms erasing this Mac, refuses, or times out.
    /// Only physical consoles/GPIO implement it — never anything reachable over a network.
    fn confirm_erase(&self, ecid: u64, code: &str, reason: &str) -> EraseDecision;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EraseDecision {
    /// `how`: "console tty1", "serial ttyS0", "gpio 17", "armed (fleet)".
    Confirmed {
        how: String,
        at: SystemTime,
    },
    Refused {
        how: String,
    },
    TimedOut,
}

/// A confirmer that always refuses: for callers that must never erase.
#[derive(Debug, Clone, Default)]
pub struct NeverErase;

impl EraseConfirmer for NeverErase {
    fn confirm_erase(&self, _ecid: u64, _code: &str, _reason: &str) -> EraseDecision {
        EraseDecision::Refused {
            how: "no confirmer at this station".into(),
        }
    }
}

/// The short code shown beside a Mac (and typed back to confirm erasing it): 6 characters from
/// an alphabet without look-alikes (no 0/O, 1/I/L), derived from the ECID so the same Mac always
/// shows the same code and two Macs on one station almost never share one.
pub fn erase_code(ecid: u64) -> String {
    const ALPHABET: &[u8; 31] = b"23456789ABCDEFGHJKMNPQRSTUVWXYZ";
    // The ECID is mixed first (SplitMix64 finaliser): neighbouring ECIDs from one production
    // batch would otherwise share most of their code.
    let mut x = ecid.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (0..6)
        .map(|i| ALPHABET[((x >> (i * 8)) % 31) as usize] as char)
        .collect()
}

/// Restores one Mac: revive first, then — only after a person confirmed it — erase.
///
/// Never panics and never returns early without a report: every failure is named in the
/// report and sent as [`EngineEvent::Failed`].
pub async fn restore_mac(
    cfg: Arc<EngineConfig>,
    bus: Arc<dyn UsbBus>,
    device: DeviceInfo,
    confirmer: Arc<dyn EraseConfirmer>,
    events: tokio::sync::mpsc::UnboundedSender<EngineEvent>,
) -> MacReport {
    flow::run(cfg, bus, device, confirmer, events, Behavior::Revive).await
}

/// Like [`restore_mac`] but starting with `first` (the CLI's `--erase`, which still needs a
/// confirmation before anything is erased).
pub async fn restore_mac_with(
    cfg: Arc<EngineConfig>,
    bus: Arc<dyn UsbBus>,
    device: DeviceInfo,
    confirmer: Arc<dyn EraseConfirmer>,
    events: tokio::sync::mpsc::UnboundedSender<EngineEvent>,
    first: Behavior,
) -> MacReport {
    flow::run(cfg, bus, device, confirmer, events, first).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erase_code_is_stable_short_and_unambiguous() {
        let a = erase_code(0x0011_2233_4455_6677);
        assert_eq!(a.len(), 6);
        assert_eq!(a, erase_code(0x0011_2233_4455_6677));
        assert_ne!(a, erase_code(0x0011_2233_4455_6678));
        for c in a.chars() {
            assert!(!"01OIL".contains(c), "{a}");
        }
    }

    #[test]
    fn path_or_url() {
        assert_eq!(
            PathOrUrl::parse("https://x/y.ipsw"),
            PathOrUrl::Url("https://x/y.ipsw".into())
        );
        assert_eq!(
            PathOrUrl::parse("/tmp/y.ipsw"),
            PathOrUrl::Path("/tmp/y.ipsw".into())
        );
    }
}
