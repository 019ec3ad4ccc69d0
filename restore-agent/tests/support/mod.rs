//! Adapts mac-sim's in-process bus to the agent's USB seam, so integration tests run the real
//! agent code (identity, DFU, recovery, boot-chain driver) against the simulated Mac.
//!
//! It behaves like libusb where the agent can tell the difference: a handle opened before a
//! re-enumeration stops working (`Disconnected`), bus addresses change at every attach, a bulk
//! IN with nothing to read waits until its timeout, and SET_CONFIGURATION/SET_INTERFACE reach
//! the device as the standard requests the kernel would send.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mac_sim::inproc::{BusError, BusEvent, SimBus};
use mac_sim::wire::{Reply, Setup, SimDevice};
use restore_agent::bootchain::driver::Timeouts;
use restore_agent::usb::{
    ControlSetup, DeviceInfo, HotplugEvent, TransportError, UsbBus, UsbLocation, UsbTransport,
};

/// What the adapter knows about a port's current incarnation.
#[derive(Clone)]
struct Incarnation {
    info: DeviceInfo,
    generation: u64,
}

#[derive(Default)]
struct State {
    present: HashMap<usize, Incarnation>,
    subscribers: Vec<Sender<HotplugEvent>>,
    next_address: u8,
    generation: u64,
}

pub struct SimUsb {
    bus: Arc<SimBus>,
    state: Arc<Mutex<State>>,
}

fn location(port: usize) -> UsbLocation {
    UsbLocation {
        bus: 1,
        ports: vec![u8::try_from(port).unwrap_or(u8::MAX)],
    }
}

impl SimUsb {
    pub fn new() -> SimUsb {
        let bus = Arc::new(SimBus::new());
        let state = Arc::new(Mutex::new(State {
            next_address: 2,
            ..State::default()
        }));
        let rx = bus.subscribe();
        let st = Arc::clone(&state);
        std::thread::spawn(move || {
            for ev in rx {
                let mut s = st.lock().unwrap();
                let hot = match ev {
                    BusEvent::Attached { port, enumeration } => {
                        let address = s.next_address;
                        s.next_address = if address >= 127 { 2 } else { address + 1 };
                        s.generation += 1;
                        let info = DeviceInfo {
                            location: location(port),
                            address,
                            vendor_id: enumeration.vendor_id,
                            product_id: enumeration.product_id,
                        };
                        let generation = s.generation;
                        s.present.insert(
                            port,
                            Incarnation {
                                info: info.clone(),
                                generation,
                            },
                        );
                        HotplugEvent::Arrived(info)
                    }
                    BusEvent::Detached { port } => match s.present.remove(&port) {
                        Some(inc) => HotplugEvent::Left(inc.info),
                        None => continue,
                    },
                };
                s.subscribers.retain(|tx| tx.send(hot.clone()).is_ok());
            }
        });
        SimUsb { bus, state }
    }

    /// Plug a simulated device in and wait until the adapter has seen it arrive.
    pub fn plug(&self, device: Box<dyn SimDevice>) -> usize {
        let port = self.bus.plug(device);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.state.lock().unwrap().present.contains_key(&port) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        port
    }

    pub fn sim(&self) -> &SimBus {
        &self.bus
    }
}

impl Default for SimUsb {
    fn default() -> Self {
        Self::new()
    }
}

impl UsbBus for SimUsb {
    fn devices(&self) -> Result<Vec<DeviceInfo>, TransportError> {
        let s = self.state.lock().unwrap();
        let mut v: Vec<_> = s.present.values().map(|i| i.info.clone()).collect();
        v.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(v)
    }

    fn open(&self, device: &DeviceInfo) -> Result<Box<dyn UsbTransport>, TransportError> {
        let s = self.state.lock().unwrap();
        let port = usize::from(
            *device
                .location
                .ports
                .first()
                .ok_or(TransportError::Disconnected)?,
        );
        match s.present.get(&port) {
            Some(inc) if inc.info.address == device.address => Ok(Box::new(SimTransport {
                bus: Arc::clone(&self.bus),
                state: Arc::clone(&self.state),
                port,
                generation: inc.generation,
                info: inc.info.clone(),
            })),
            _ => Err(TransportError::Disconnected),
        }
    }

    fn watch(&self) -> Result<Receiver<HotplugEvent>, TransportError> {
        let (tx, rx) = channel();
        self.state.lock().unwrap().subscribers.push(tx);
        Ok(rx)
    }
}

pub struct SimTransport {
    bus: Arc<SimBus>,
    state: Arc<Mutex<State>>,
    port: usize,
    generation: u64,
    info: DeviceInfo,
}

impl SimTransport {
    /// A handle belongs to one enumeration; after a re-attach libusb reports ENODEV.
    fn check_current(&self) -> Result<(), TransportError> {
        let s = self.state.lock().unwrap();
        match s.present.get(&self.port) {
            Some(inc) if inc.generation == self.generation => Ok(()),
            _ => Err(TransportError::Disconnected),
        }
    }

    fn control(
        &mut self,
        setup: ControlSetup,
        length: u16,
        data: &[u8],
    ) -> Result<Vec<u8>, TransportError> {
        self.check_current()?;
        let s = Setup {
            request_type: setup.request_type,
            request: setup.request,
            value: setup.value,
            index: setup.index,
            length,
        };
        match self.bus.control(self.port, &s, data).map_err(gone)? {
            Reply::Ack(d) => Ok(d),
            Reply::Stall => Err(TransportError::Stall),
            Reply::Nak => Err(TransportError::Timeout(Duration::ZERO)),
        }
    }
}

fn gone(_: BusError) -> TransportError {
    TransportError::Disconnected
}

impl UsbTransport for SimTransport {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn control_in(
        &mut self,
        setup: ControlSetup,
        length: u16,
        _timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        self.control(setup, length, &[])
    }

    fn control_out(
        &mut self,
        setup: ControlSetup,
        data: &[u8],
        _timeout: Duration,
    ) -> Result<usize, TransportError> {
        let len = u16::try_from(data.len()).map_err(|_| TransportError::Overflow)?;
        self.control(setup, len, data).map(|_| data.len())
    }

    fn bulk_out(
        &mut self,
        endpoint: u8,
        data: &[u8],
        _timeout: Duration,
    ) -> Result<usize, TransportError> {
        self.check_current()?;
        // An empty `data` goes through as is: it is a zero-length packet, which the simulated
        // device counts (usbmux must end a packet that fills whole USB packets with one).
        match self.bus.bulk_out(self.port, endpoint, data).map_err(gone)? {
            Reply::Ack(_) => Ok(data.len()),
            Reply::Stall => Err(TransportError::Stall),
            Reply::Nak => Err(TransportError::Timeout(Duration::ZERO)),
        }
    }

    fn bulk_in(
        &mut self,
        endpoint: u8,
        max_len: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let deadline = Instant::now() + timeout;
        let mut naks = 0u32;
        loop {
            self.check_current()?;
            match self
                .bus
                .bulk_in(self.port, endpoint, max_len)
                .map_err(gone)?
            {
                Reply::Ack(d) => return Ok(d),
                Reply::Stall => return Err(TransportError::Stall),
                Reply::Nak if Instant::now() >= deadline => {
                    return Err(TransportError::Timeout(timeout))
                }
                Reply::Nak => {
                    // A real host controller completes the transfer the moment the device has
                    // data. Polling with a flat 1 ms sleep would cap usbmux at one window per
                    // millisecond, so back off from yielding to at most 1 ms.
                    naks = naks.saturating_add(1);
                    if naks < 64 {
                        std::thread::yield_now();
                    } else {
                        let us = u64::from(naks - 63).saturating_mul(20).min(1000);
                        std::thread::sleep(Duration::from_micros(us));
                    }
                }
            }
        }
    }

    fn set_configuration(&mut self, configuration: u8) -> Result<(), TransportError> {
        self.control(
            ControlSetup::new(0x00, 0x09, u16::from(configuration), 0),
            0,
            &[],
        )
        .map(|_| ())
    }

    fn claim_interface(&mut self, interface: u8, alt_setting: u8) -> Result<(), TransportError> {
        self.control(
            ControlSetup::new(0x01, 0x0b, u16::from(alt_setting), u16::from(interface)),
            0,
            &[],
        )
        .map(|_| ())
    }

    fn release_interface(&mut self, _interface: u8) -> Result<(), TransportError> {
        self.check_current()
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        if self.check_current().is_err() {
            return Ok(());
        }
        match self.bus.reset(self.port) {
            Ok(()) | Err(BusError::Gone(_)) => Ok(()),
            Err(e) => Err(gone(e)),
        }
    }

    /// Like libusb, one opened device serves transfers from several threads; the clone stays
    /// tied to the same incarnation, so it too reports `Disconnected` after a re-attach.
    fn bulk_handle(&self) -> Option<Box<dyn UsbTransport>> {
        Some(Box::new(SimTransport {
            bus: Arc::clone(&self.bus),
            state: Arc::clone(&self.state),
            port: self.port,
            generation: self.generation,
            info: self.info.clone(),
        }))
    }
}

/// `shared/` beside the repository (CI clones with it there); `MACRESCUE_SHARED` overrides.
pub fn shared() -> PathBuf {
    std::env::var_os("MACRESCUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
}

/// The fixture BuildManifest of `board` (file names vary in case, e.g. `J314cAP`).
pub fn manifest_path(board: &str) -> PathBuf {
    let dir = shared().join("fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests");
    std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".BuildManifest.plist"))
                .is_some_and(|b| b.eq_ignore_ascii_case(board))
        })
        .unwrap_or_else(|| panic!("no fixture manifest for {board}"))
}

/// Short waits for the boot-chain driver: the simulated Mac reboots in tens of milliseconds.
pub fn fast_timeouts() -> Timeouts {
    Timeouts {
        discovery: Duration::from_secs(2),
        ibss_disconnect: Duration::from_secs(2),
        ibss_reconnect: Duration::from_secs(2),
        ibec_disconnect: Duration::from_secs(2),
        ibec_reconnect: Duration::from_secs(2),
        recovery_ibec_disconnect: Duration::from_secs(2),
        recovery_ibec_reconnect: Duration::from_secs(2),
        bootx_leave: Duration::from_secs(2),
        restore_mode: Duration::from_secs(2),
        transfer: Duration::from_secs(2),
        open_attempts: 5,
        open_interval: Duration::from_millis(20),
        max_pause: Duration::from_millis(5),
    }
}

/// A scratch directory removed on drop, however the test ends.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "macrescue-test-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
