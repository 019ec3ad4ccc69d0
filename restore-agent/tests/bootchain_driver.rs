//! The boot-chain driver end to end against a scripted Mac that answers like the real thing at
//! the USB level: real descriptors (so the production `identity::read_identity` and the model
//! table pick the board), DFU class requests, iBoot vendor requests and bulk uploads, and
//! re-enumeration with new addresses and PIDs. Images come from a `PersonalizedDir`.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use restore_agent::bootchain::{
    BootchainError, Driver, DriverOptions, PersonalizedDir, Progress, Timeouts,
};
use restore_agent::identity;
use restore_agent::manifest::{BuildManifest, RestoreBehavior};
use restore_agent::usb::descriptor::{emit_language_ids, emit_string, DeviceDescriptor};
use restore_agent::usb::{
    ControlSetup, DeviceInfo, HotplugEvent, TransportError, UsbBus, UsbLocation, UsbTransport,
};

/// MacBook Air (M1, 2020): j313ap, CPID 8103, BDID 26.
const SERIAL_DFU: &str = "CPID:8103 CPRV:11 CPFM:03 SCEP:01 BDID:26 ECID:0005681C34D3001E IBFL:3C SRTG:[iBoot-4479.0.0.100.4]";
const SERIAL_IBOOT: &str = "SDOM:01 CPID:8103 CPRV:11 CPFM:03 SCEP:01 BDID:26 ECID:0005681C34D3001E IBFL:3C SRNM:[C02XXXXXXXXX]";
const NONCES_1: &str = "NONC:8f2b4c6d8e0a1b3c5d7e9f0a2b4c6d8e0f1a3b5c7d9e0f2a4b6c8d0e1f3a5b7c SNON:1a2b3c4d5e6f708192a3b4c5d6e7f80910a1b2c3";
const NONCES_2: &str = "NONC:0000000000000000000000000000000000000000000000000000000000000001 SNON:1a2b3c4d5e6f708192a3b4c5d6e7f80910a1b2c3";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fw {
    Rom,
    Ibss,
    Ibec,
    Gone,
}

struct Mac {
    fw: Fw,
    address: u8,
    pid: u16,
    nonces: &'static str,
    senders: Vec<Sender<HotplugEvent>>,
    commands: Vec<String>,
    uploads: Vec<Vec<u8>>,
    dfu_bytes: usize,
    getenv: Option<String>,
    bootx_to: u16,
}

impl Mac {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            location: UsbLocation {
                bus: 3,
                ports: vec![1, 2],
            },
            address: self.address,
            vendor_id: 0x05ac,
            product_id: self.pid,
        }
    }

    fn reenumerate(&mut self, fw: Fw, pid: u16) {
        let old = self.info();
        self.senders
            .retain(|s| s.send(HotplugEvent::Left(old.clone())).is_ok());
        self.fw = fw;
        self.pid = pid;
        self.address += 3;
        let new = self.info();
        self.senders
            .retain(|s| s.send(HotplugEvent::Arrived(new.clone())).is_ok());
    }

    fn descriptor(&self, kind: u8, index: u8) -> Option<Vec<u8>> {
        match (kind, index) {
            (1, 0) => Some(
                DeviceDescriptor {
                    bcd_usb: 0x0200,
                    device_class: 0,
                    device_subclass: 0,
                    device_protocol: 0,
                    max_packet_size0: 64,
                    vendor_id: 0x05ac,
                    product_id: self.pid,
                    bcd_device: 0,
                    manufacturer_index: 2,
                    product_index: 3,
                    serial_number_index: 4,
                    num_configurations: 1,
                }
                .emit()
                .to_vec(),
            ),
            (3, 0) => Some(emit_language_ids(&[0x0409]).unwrap()),
            (3, 1) => Some(emit_string(self.nonces).unwrap()),
            (3, 4) if self.fw == Fw::Rom => Some(emit_string(SERIAL_DFU).unwrap()),
            (3, 4) => Some(emit_string(SERIAL_IBOOT).unwrap()),
            _ => None,
        }
    }
}

type Shared = Arc<Mutex<Mac>>;

struct Bus(Shared);

struct Handle {
    mac: Shared,
    info: DeviceInfo,
}

impl Handle {
    fn live(&self) -> Result<std::sync::MutexGuard<'_, Mac>, TransportError> {
        let m = self.mac.lock().unwrap();
        if m.fw == Fw::Gone || m.info() != self.info {
            return Err(TransportError::Disconnected);
        }
        Ok(m)
    }
}

impl UsbTransport for Handle {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn control_in(
        &mut self,
        setup: ControlSetup,
        length: u16,
        _: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let mut m = self.live()?;
        let reply = match (setup.request_type, setup.request) {
            (0x80, 6) => m
                .descriptor((setup.value >> 8) as u8, setup.value as u8)
                .ok_or(TransportError::Stall)?,
            (0xA1, 5) => vec![2],
            (0xA1, 3) => vec![0, 0, 0, 0, 5, 0],
            (0xC0, 0) => {
                let value = match (m.getenv.take().as_deref(), m.fw) {
                    (Some("boot-stage"), Fw::Ibss) => "1",
                    (Some("boot-stage"), Fw::Ibec) => "2",
                    (Some("radio-error"), _) => "0",
                    _ => "x",
                };
                format!("{value}\0").into_bytes()
            }
            _ => return Err(TransportError::Stall),
        };
        Ok(reply[..reply.len().min(usize::from(length))].to_vec())
    }

    fn control_out(
        &mut self,
        setup: ControlSetup,
        data: &[u8],
        _: Duration,
    ) -> Result<usize, TransportError> {
        let mut m = self.live()?;
        match (setup.request_type, setup.request, m.fw) {
            (0x21, 1, Fw::Rom) => m.dfu_bytes += data.len(),
            (0x21, 1, _) => m.commands.push("<21/01>".into()),
            (0x41, 0, _) => m.uploads.push(Vec::new()),
            (0x40, _, fw) => {
                let text = std::str::from_utf8(&data[..data.len() - 1])
                    .unwrap()
                    .to_string();
                if let Some(name) = text.strip_prefix("getenv ") {
                    m.getenv = Some(name.to_string());
                }
                m.commands.push(text.clone());
                match (text.as_str(), fw) {
                    ("go", Fw::Ibss) => m.reenumerate(Fw::Ibec, 0x1281),
                    ("bootx", Fw::Ibec) => {
                        let pid = m.bootx_to;
                        m.reenumerate(if pid == 0x1281 { Fw::Ibss } else { Fw::Gone }, pid);
                        if pid != 0x1281 {
                            // A usbmux device: present, but no longer speaking iBoot.
                            m.fw = Fw::Gone;
                        }
                    }
                    _ => {}
                }
            }
            _ => return Err(TransportError::Stall),
        }
        Ok(data.len())
    }

    fn bulk_out(
        &mut self,
        endpoint: u8,
        data: &[u8],
        _: Duration,
    ) -> Result<usize, TransportError> {
        let mut m = self.live()?;
        assert_eq!(endpoint, 0x04);
        m.uploads.last_mut().unwrap().extend_from_slice(data);
        Ok(data.len())
    }

    fn bulk_in(&mut self, _: u8, _: usize, _: Duration) -> Result<Vec<u8>, TransportError> {
        Err(TransportError::Stall)
    }

    fn set_configuration(&mut self, _: u8) -> Result<(), TransportError> {
        self.live().map(|_| ())
    }

    fn claim_interface(&mut self, _: u8, _: u8) -> Result<(), TransportError> {
        self.live().map(|_| ())
    }

    fn release_interface(&mut self, _: u8) -> Result<(), TransportError> {
        self.live().map(|_| ())
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        let mut m = self.live()?;
        m.nonces = NONCES_2;
        m.reenumerate(Fw::Ibss, 0x1281);
        Err(TransportError::Disconnected)
    }
}

impl UsbBus for Bus {
    fn devices(&self) -> Result<Vec<DeviceInfo>, TransportError> {
        Ok(vec![self.0.lock().unwrap().info()])
    }

    fn open(&self, device: &DeviceInfo) -> Result<Box<dyn UsbTransport>, TransportError> {
        if self.0.lock().unwrap().info() != *device {
            return Err(TransportError::Disconnected);
        }
        Ok(Box::new(Handle {
            mac: self.0.clone(),
            info: device.clone(),
        }))
    }

    fn watch(&self) -> Result<Receiver<HotplugEvent>, TransportError> {
        let (tx, rx) = channel();
        self.0.lock().unwrap().senders.push(tx);
        Ok(rx)
    }
}

fn shared() -> PathBuf {
    std::env::var_os("MACRESCUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")))
}

fn new_mac(bootx_to: u16) -> Shared {
    Arc::new(Mutex::new(Mac {
        fw: Fw::Rom,
        address: 4,
        pid: 0x1227,
        nonces: NONCES_1,
        senders: Vec::new(),
        commands: Vec::new(),
        uploads: Vec::new(),
        dfu_bytes: 0,
        getenv: None,
        bootx_to,
    }))
}

fn options() -> DriverOptions {
    let t = Duration::from_millis(300);
    DriverOptions {
        behavior: RestoreBehavior::Update,
        allow_recovery_start: false,
        wait_for_restore: true,
        timeouts: Timeouts {
            discovery: t,
            ibss_disconnect: t,
            ibss_reconnect: t,
            ibec_disconnect: t,
            ibec_reconnect: t,
            recovery_ibec_disconnect: t,
            recovery_ibec_reconnect: t,
            bootx_leave: t,
            restore_mode: t,
            transfer: t,
            open_attempts: 2,
            open_interval: Duration::ZERO,
            max_pause: Duration::ZERO,
        },
        read_identity: identity::read_identity,
    }
}

/// Write one small image per component the J313 plans need; returns the directory.
fn images_dir(tag: &str, manifest: &BuildManifest, skip: Option<&str>) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("macrescue-bootchain-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let id = manifest
        .select_boot_identity("j313ap", RestoreBehavior::Update)
        .unwrap();
    let mut names: Vec<String> = id.components.iter().map(|c| c.name.clone()).collect();
    names.push("Ap,LocalPolicy".into());
    for name in names {
        if Some(name.as_str()) == skip {
            continue;
        }
        let mut bytes = format!("IMG4:{name}:").into_bytes();
        bytes.resize(700, 0x42);
        std::fs::write(dir.join(format!("{name}.img4")), bytes).unwrap();
    }
    dir
}

fn manifest() -> BuildManifest {
    BuildManifest::from_path(&shared().join(
        "fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests/J313AP.BuildManifest.plist",
    ))
    .unwrap()
}

#[test]
fn boots_a_macbook_air_from_dfu_to_restore_mode() {
    let m = manifest();
    let dir = images_dir("ok", &m, None);
    let mac = new_mac(0x1901);
    let bus = Bus(mac.clone());
    let mut images = PersonalizedDir::new(&dir);
    let mut progress = Vec::new();
    let device = bus.devices().unwrap()[0].clone();
    let outcome = {
        let mut cb = |p: &Progress| progress.push(p.clone());
        Driver::new(&bus, &mut images, &mut cb, options())
            .run(&device, &m)
            .unwrap()
    };
    assert_eq!(outcome.board, "j313ap");
    assert_eq!(outcome.ecid, Some(0x0005_681C_34D3_001E));
    assert_eq!(outcome.variant, "Customer Software Update");
    assert_eq!(outcome.restore_device.unwrap().product_id, 0x1901);
    assert!(progress.contains(&Progress::ApNonceChanged));

    let mac = mac.lock().unwrap();
    // iBSS: 700 bytes + 16-byte suffix in one block.
    assert_eq!(mac.dfu_bytes, 716);
    let first: Vec<&str> = mac.commands.iter().take(3).map(String::as_str).collect();
    assert_eq!(first, ["lpolrestore", "getenv boot-stage", "firmware"]);
    let tail: Vec<&str> = mac
        .commands
        .iter()
        .rev()
        .take(3)
        .map(String::as_str)
        .collect();
    assert_eq!(
        tail,
        [
            "bootx",
            "setenv boot-args rd=md0 nand-enable-reformat=1 -progress -restore",
            "<21/01>"
        ]
    );
    assert!(mac.commands.contains(&"go".to_string()));
    // The first recovery upload is the local policy, from `Ap,LocalPolicy.img4`.
    assert!(mac.uploads[0].starts_with(b"IMG4:Ap,LocalPolicy:"));
    assert!(mac
        .uploads
        .iter()
        .any(|u| u.starts_with(b"IMG4:RestoreKernelCache:")));
    drop(mac);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rebooting_into_recovery_after_bootx_is_reported() {
    let m = manifest();
    let dir = images_dir("rec", &m, None);
    let mac = new_mac(0x1281);
    let bus = Bus(mac);
    let mut images = PersonalizedDir::new(&dir);
    let mut cb = |_: &Progress| {};
    let device = bus.devices().unwrap()[0].clone();
    let err = Driver::new(&bus, &mut images, &mut cb, options())
        .run(&device, &m)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the Mac rebooted into Recovery after bootx: image personalization most likely failed"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_image_file_is_named_before_dfu() {
    let m = manifest();
    let dir = images_dir("missing", &m, Some("RestoreDCP"));
    let mac = new_mac(0x1901);
    let bus = Bus(mac.clone());
    let mut images = PersonalizedDir::new(&dir);
    let mut cb = |_: &Progress| {};
    let device = bus.devices().unwrap()[0].clone();
    let err = Driver::new(&bus, &mut images, &mut cb, options())
        .run(&device, &m)
        .unwrap_err();
    assert!(matches!(err, BootchainError::Image(_)), "{err}");
    assert!(err.to_string().contains("RestoreDCP.img4"), "{err}");
    assert_eq!(mac.lock().unwrap().dfu_bytes, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_ipsw_for_another_device_is_refused_before_dfu() {
    let m = BuildManifest::from_path(
        &shared().join("fixtures/manifests/iOS_26.2.1_23C71_iPhone13,2/BuildManifest.plist"),
    )
    .unwrap();
    let dir = images_dir("ios", &manifest(), None);
    let mac = new_mac(0x1901);
    let bus = Bus(mac.clone());
    let mut images = PersonalizedDir::new(&dir);
    let mut cb = |_: &Progress| {};
    let device = bus.devices().unwrap()[0].clone();
    let err = Driver::new(&bus, &mut images, &mut cb, options())
        .run(&device, &m)
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("this IPSW is not for a MacBookAir10,1"),
        "{err}"
    );
    assert_eq!(mac.lock().unwrap().dfu_bytes, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
