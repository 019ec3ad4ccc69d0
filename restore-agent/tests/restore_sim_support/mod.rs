//! Host side of the end-to-end restore tests and benchmark: a `RestoreContext` that answers
//! from a synthetic IPSW (mac-sim's `make_ipsw`, read with the agent's own `ipsw` reader) with
//! tickets signed by mac-sim's test key, and a plugged-in simulated Mac in restore mode.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mac_sim::board::Board;
use mac_sim::device::{SimMac, Timing};
use mac_sim::faults::{Faults, StartMode};
use mac_sim::ipsw::{make_ipsw, IpswOptions};
use mac_sim::restore::scenario::{fill_image, Scenario};
use mac_sim::restore::{RestoreConfig as SimRestoreConfig, RestoreHandle, RestoreOs};
use mac_sim::ticket::{sign_im4m, TicketSpec};
use plist::{Dictionary, Value};
use restore_agent::asr::{AsrConfig, ImageSource};
use restore_agent::img4;
use restore_agent::ipsw::{Ipsw, LocalFile, RandomAccess};
use restore_agent::manifest::{BuildIdentity, BuildManifest, RestoreBehavior as ManifestBehavior};
use restore_agent::restored::options::{random_uuid, RestoreBehavior, StartRestoreParams};
use restore_agent::restored::{
    ContextError, LocalPolicyArgs, RestoreConfig, RestoreContext, RestoreEvent, UrlRequest,
    UrlResponse,
};
use restore_agent::tss_client::TssClient;
use restore_agent::usb::{DeviceInfo, UsbBus};

use crate::support::SimUsb;

pub const BOARD: &str = "j274ap";
pub const ECID: u64 = 0x0012_3456_789a_bcde;
/// Apple's restore-mode product ID for Apple Silicon (protocol.md §1).
pub const PID_RESTORE: u16 = 0x1901;

/// A generated image: the scenario's `seed` generator, so the device can check every byte
/// without anything multi-GiB existing anywhere.
pub struct SeedImage {
    pub seed: u64,
    pub len: u64,
}

impl RandomAccess for SeedImage {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if !offset
            .checked_add(buf.len() as u64)
            .is_some_and(|e| e <= self.len)
        {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "past the end"));
        }
        fill_image(self.seed, offset, buf);
        Ok(())
    }
}

/// A unique scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!(
            "macrescue-restore-{tag}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The shared fixtures hold software-update (preflight) manifests only. A full IPSW's manifest
/// has erase, upgrade and `macOS Customer` identities (protocol.md §10); derive them from the
/// fixture's identities so the device sees the variants a full IPSW would give.
pub fn full_ipsw_manifest(dir: &Scratch) -> std::path::PathBuf {
    full_ipsw_manifest_for(dir, BOARD)
}

/// [`full_ipsw_manifest`] of another board's fixture (`j413ap` → `J413AP.BuildManifest.plist`).
pub fn full_ipsw_manifest_for(dir: &Scratch, board: &str) -> std::path::PathBuf {
    let fixture = mac_sim::board::manifests_dir()
        .join(format!("{}.BuildManifest.plist", board.to_uppercase()));
    let mut manifest: plist::Dictionary = plist::from_file(&fixture).unwrap();
    let identities = manifest
        .get("BuildIdentities")
        .and_then(plist::Value::as_array)
        .unwrap()
        .clone();
    let with = |base: &plist::Value, variant: &str, behavior: &str| {
        let mut id = base.as_dictionary().unwrap().clone();
        let info = id
            .get_mut("Info")
            .and_then(plist::Value::as_dictionary_mut)
            .unwrap();
        info.insert("Variant".into(), variant.into());
        info.insert("RestoreBehavior".into(), behavior.into());
        // Where the global ticket lives: Firmware/Manifests/restore/<MacOSVariant>/ (§7.7).
        info.insert("MacOSVariant".into(), "macOS Customer".into());
        plist::Value::Dictionary(id)
    };
    let full = identities
        .iter()
        .find(|i| {
            i.as_dictionary()
                .and_then(|d| d.get("Manifest"))
                .and_then(plist::Value::as_dictionary)
                .is_some_and(|m| m.len() > 40)
        })
        .unwrap_or(&identities[0]);
    let ros = identities
        .iter()
        .min_by_key(|i| {
            i.as_dictionary()
                .and_then(|d| d.get("Manifest"))
                .and_then(plist::Value::as_dictionary)
                .map_or(usize::MAX, |m| m.len())
        })
        .unwrap();
    manifest.insert(
        "BuildIdentities".into(),
        plist::Value::Array(vec![
            with(full, "Customer Erase Install (IPSW)", "Erase"),
            with(full, "Customer Upgrade Install (IPSW)", "Update"),
            with(ros, "macOS Customer", "Erase"),
        ]),
    );
    let path = dir.0.join("BuildManifest.plist");
    plist::to_file_xml(&path, &manifest).unwrap();
    path
}

/// A synthetic IPSW for the board, with the OS image stored (random access for ASR).
pub fn synthetic_ipsw(dir: &Scratch, os_size: u64) -> std::path::PathBuf {
    synthetic_ipsw_for(dir, BOARD, os_size)
}

/// [`synthetic_ipsw`] for another board.
pub fn synthetic_ipsw_for(dir: &Scratch, board: &str, os_size: u64) -> std::path::PathBuf {
    let path = dir.0.join("test.ipsw");
    let mut opts = IpswOptions::new(board);
    opts.manifest = Some(full_ipsw_manifest_for(dir, board));
    opts.os_size = os_size;
    make_ipsw(&opts, &path).unwrap();
    path
}

/// The firmware side of a restore, answered from a synthetic IPSW.
pub struct IpswContext {
    ipsw: Ipsw<Arc<LocalFile>>,
    identity: BuildIdentity,
    recovery_identity: BuildIdentity,
    ticket: Vec<u8>,
    image: ImageSource,
    /// Files a full IPSW has that `make_ipsw` does not write (the BootabilityBundle, §7.7.1).
    overlay: BTreeMap<String, Vec<u8>>,
    /// When set, firmware-updater requests (§4.9) go to this TSS, as the engine sends them;
    /// otherwise they are echoed back.
    tss: Option<TssClient>,
    pub events: Mutex<Vec<RestoreEvent>>,
}

impl IpswContext {
    /// Opens `ipsw_path` for `behavior`; the OS image streamed is the identity's stored OS
    /// entry unless `image` overrides it.
    pub fn open(
        ipsw_path: &Path,
        behavior: RestoreBehavior,
        image: Option<ImageSource>,
    ) -> IpswContext {
        Self::open_for(BOARD, ipsw_path, behavior, image)
    }

    /// [`IpswContext::open`] for an IPSW of another board.
    pub fn open_for(
        board_config: &str,
        ipsw_path: &Path,
        behavior: RestoreBehavior,
        image: Option<ImageSource>,
    ) -> IpswContext {
        let board = Board::load(board_config).unwrap();
        let ipsw = Ipsw::open(Arc::new(LocalFile::open(ipsw_path).unwrap())).unwrap();
        let manifest = BuildManifest::from_bytes(&ipsw.build_manifest().unwrap()).unwrap();
        let mb = match behavior {
            RestoreBehavior::Erase => ManifestBehavior::Erase,
            RestoreBehavior::Update => ManifestBehavior::Update,
        };
        let identity = manifest.select_identity(board_config, mb).unwrap().clone();
        let recovery_identity = manifest
            .macos_customer_identity(board_config)
            .unwrap()
            .clone();
        let ticket = sign_im4m(&TicketSpec::simple(
            board.cpid,
            board.bdid,
            ECID,
            board.security_domain,
            Vec::new(),
        ));
        let image = image.unwrap_or_else(|| {
            let path = identity.component("OS").unwrap().path.clone().unwrap();
            let entry = ipsw.archive().require(&path).unwrap();
            Arc::new(ipsw.archive().stored_owned(entry).unwrap())
        });
        let overlay = BTreeMap::from([
            (
                "BootabilityBundle/Restore/Bootability/bootability.plist".to_owned(),
                b"<plist version=\"1.0\"><dict/></plist>".to_vec(),
            ),
            (
                "BootabilityBundle/Restore/Bootability/usr/standalone/update/ramdisk".to_owned(),
                vec![0xa5; 3000],
            ),
            (
                "BootabilityBundle/Restore/Firmware/Bootability.dmg.trustcache".to_owned(),
                vec![0x01; 64],
            ),
        ]);
        IpswContext {
            ipsw,
            identity,
            recovery_identity,
            ticket,
            image,
            overlay,
            tss: None,
            events: Mutex::new(Vec::new()),
        }
    }

    /// Send firmware-updater requests to `client` (the simulated TSS in tests).
    pub fn with_tss(mut self, client: TssClient) -> IpswContext {
        self.tss = Some(client);
        self
    }

    pub fn image(&self) -> ImageSource {
        self.image.clone()
    }

    pub fn params(&self, behavior: RestoreBehavior) -> StartRestoreParams {
        let info = self.identity.raw.get("Info").and_then(Value::as_dictionary);
        StartRestoreParams {
            behavior,
            macos_variant: self
                .identity
                .info
                .macos_variant
                .clone()
                .unwrap_or_else(|| "macOS Customer".into()),
            minimum_system_partition: info
                .and_then(|i| i.get("MinimumSystemPartition"))
                .and_then(Value::as_unsigned_integer),
            system_partition_padding: info
                .and_then(|i| i.get("SystemPartitionPadding"))
                .and_then(Value::as_dictionary)
                .cloned(),
            restore_protocol_version: 0,
            uuid: random_uuid(),
        }
    }

    fn identity_for(&self, is_recovery_os: bool) -> &BuildIdentity {
        if is_recovery_os {
            &self.recovery_identity
        } else {
            &self.identity
        }
    }

    fn file(&self, path: &str) -> Result<Vec<u8>, ContextError> {
        if let Some(data) = self.overlay.get(path) {
            return Ok(data.clone());
        }
        self.ipsw
            .read_small(path, 64 << 20)
            .map_err(|e| ContextError::NotFound(format!("{path} ({e})")))
    }
}

fn failed(e: impl std::fmt::Display) -> ContextError {
    ContextError::Failed(e.to_string())
}

impl RestoreContext for IpswContext {
    async fn root_ticket(&self) -> Result<Vec<u8>, ContextError> {
        Ok(self.ticket.clone())
    }

    async fn recovery_os_root_ticket(&self) -> Result<Vec<u8>, ContextError> {
        Ok(self.ticket.clone())
    }

    async fn local_policy(&self, _args: LocalPolicyArgs) -> Result<Vec<u8>, ContextError> {
        img4::stitch("Ap,LocalPolicy", &img4::LPOL_IM4P, &self.ticket, None).map_err(failed)
    }

    async fn build_identity(
        &self,
        is_recovery_os: bool,
        _variant: Option<String>,
    ) -> Result<Dictionary, ContextError> {
        Ok(self.identity_for(is_recovery_os).raw.clone())
    }

    async fn personalized(
        &self,
        component: String,
        is_recovery_os: bool,
    ) -> Result<Vec<u8>, ContextError> {
        let path = self
            .identity_for(is_recovery_os)
            .component(&component)
            .and_then(|c| c.path.clone())
            .ok_or_else(|| ContextError::NotFound(format!("component {component}")))?;
        let im4p = self.file(&path)?;
        img4::stitch(&component, &im4p, &self.ticket, None).map_err(failed)
    }

    async fn raw_file(&self, path: String) -> Result<Vec<u8>, ContextError> {
        self.file(&path)
    }

    async fn list_files(&self, prefix: String) -> Result<Vec<String>, ContextError> {
        let mut names: Vec<String> = self
            .ipsw
            .archive()
            .entries()
            .iter()
            .map(|e| e.name.clone())
            .chain(self.overlay.keys().cloned())
            .filter(|n| n.starts_with(&prefix) && !n.ends_with('/'))
            .collect();
        names.sort();
        Ok(names)
    }

    async fn os_image(&self) -> Result<ImageSource, ContextError> {
        Ok(self.image.clone())
    }

    async fn firmware_updater(&self, arguments: Dictionary) -> Result<Value, ContextError> {
        if let Some(tss) = &self.tss {
            let response = tss
                .firmware_updater(&self.identity.raw, &arguments, |path| async move {
                    self.file(&path).map_err(|e| e.to_string())
                })
                .await
                .map_err(failed)?;
            return Ok(Value::Dictionary(response));
        }
        let mut d = Dictionary::new();
        d.insert("Echo".into(), Value::Dictionary(arguments));
        Ok(Value::Dictionary(d))
    }

    async fn url_request(&self, request: UrlRequest) -> Result<UrlResponse, ContextError> {
        Ok(UrlResponse {
            status: 200,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: format!("{} {}", request.method, request.url).into_bytes(),
        })
    }

    fn event(&self, event: RestoreEvent) {
        self.events.lock().unwrap().push(event);
    }
}

/// Host settings with short, bounded waits.
pub fn host_config() -> RestoreConfig {
    RestoreConfig {
        expected_ecid: Some(ECID),
        asr: AsrConfig {
            retry_delay: Duration::from_millis(5),
            command_timeout: Duration::from_secs(20),
            ..AsrConfig::default()
        },
        connect_attempts: 50,
        connect_retry_delay: Duration::from_millis(20),
        query_timeout: Duration::from_secs(10),
        ..RestoreConfig::default()
    }
}

/// A simulated Mac already in restore mode, playing `scenario`, on a fresh bus.
pub struct Rig {
    pub usb: SimUsb,
    latest: Arc<Mutex<Option<RestoreHandle>>>,
}

impl Rig {
    pub fn plug(scenario: Scenario, device_timeout: Duration) -> Rig {
        Self::plug_board(BOARD, scenario, device_timeout)
    }

    /// [`Rig::plug`] with a Mac of another board.
    pub fn plug_board(board: &str, scenario: Scenario, device_timeout: Duration) -> Rig {
        let usb = SimUsb::new();
        let latest = Arc::new(Mutex::new(None));
        let cfg = SimRestoreConfig {
            timeout: device_timeout,
            ..SimRestoreConfig::default()
        };
        let mac = SimMac::new(
            Board::load(board).unwrap(),
            ECID,
            StartMode::Restore,
            Faults::default(),
            Timing::fast(),
        )
        .with_restore(RestoreOs::factory(scenario, cfg, latest.clone()));
        usb.plug(Box::new(mac));
        Rig { usb, latest }
    }

    /// The restore-mode Mac as the agent discovers it.
    pub fn device(&self) -> DeviceInfo {
        self.usb
            .devices()
            .unwrap()
            .into_iter()
            .find(|d| d.vendor_id == 0x05ac && d.product_id == PID_RESTORE)
            .expect("the simulated Mac is in restore mode")
    }

    pub fn handle(&self) -> RestoreHandle {
        self.latest
            .lock()
            .unwrap()
            .clone()
            .expect("the restore OS booted")
    }
}
