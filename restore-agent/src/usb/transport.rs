//! The seam between protocol code and whatever moves USB bytes.
//!
//! Everything above this module (identity, DFU, iBoot recovery, the boot-chain driver) talks to a
//! device only through [`UsbTransport`] and finds devices only through [`UsbBus`]. The real
//! implementation is [`super::rusb_edge`]; tests plug in the in-process simulated Mac; fuzzers plug
//! in scripted byte sources. Keep this trait small: every method here must be implementable on
//! libusb, on a simulator and on a fuzzer without cheating.

use std::fmt;
use std::sync::mpsc::Receiver;
use std::time::Duration;

/// A USB control request's setup fields (wLength travels separately: it is the buffer length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ControlSetup {
    pub request_type: u8,
    pub request: u8,
    pub value: u16,
    pub index: u16,
}

impl ControlSetup {
    pub const fn new(request_type: u8, request: u8, value: u16, index: u16) -> Self {
        Self {
            request_type,
            request,
            value,
            index,
        }
    }
}

/// Where a device sits on the host: bus number plus the chain of hub port numbers.
///
/// A Mac keeps its physical port across re-enumerations while its address, PID and serial change,
/// so the port path is how the boot-chain driver follows "the same Mac" between stages.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct UsbLocation {
    pub bus: u8,
    pub ports: Vec<u8>,
}

impl fmt::Display for UsbLocation {
    /// Linux sysfs naming (`1-1.4`), which is also what QEMU's `hostbus`/`hostport` take.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-", self.bus)?;
        if self.ports.is_empty() {
            return write!(f, "0");
        }
        for (i, p) in self.ports.iter().enumerate() {
            if i > 0 {
                write!(f, ".")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// What is known about a device without opening it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct DeviceInfo {
    pub location: UsbLocation,
    /// Bus address; changes at every enumeration.
    pub address: u8,
    pub vendor_id: u16,
    pub product_id: u16,
}

/// Hotplug notifications from a [`UsbBus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HotplugEvent {
    Arrived(DeviceInfo),
    Left(DeviceInfo),
}

/// Failures of the transport itself. Protocol layers wrap these with what they were doing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("the device refused the request (USB stall)")]
    Stall,
    #[error("the device did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the device is gone from the bus (unplugged, or re-enumerating)")]
    Disconnected,
    #[error("no permission to open the USB device: run as root, or install a udev rule for 05ac")]
    Access,
    #[error("the USB device is in use by another program or kernel driver")]
    Busy,
    #[error("the device sent more data than asked for (babble)")]
    Overflow,
    #[error("USB is not available on this system: {0}")]
    Unavailable(String),
    #[error("USB I/O error: {0}")]
    Io(String),
}

impl TransportError {
    /// True when the error means the device left (or is leaving) the bus, which during a
    /// stage change is expected rather than a failure.
    pub fn is_gone(&self) -> bool {
        matches!(self, TransportError::Disconnected)
    }
}

/// One opened USB device.
///
/// Methods block for at most their timeout. Implementations must never panic on device
/// behaviour (short replies, stalls, vanishing mid-transfer): they return an error instead.
pub trait UsbTransport: Send {
    /// The device as it was when it was opened.
    fn info(&self) -> &DeviceInfo;

    /// Control transfer, device-to-host. Returns at most `length` bytes (fewer is legal).
    fn control_in(
        &mut self,
        setup: ControlSetup,
        length: u16,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError>;

    /// Control transfer, host-to-device (`data` may be empty). Returns bytes accepted.
    fn control_out(
        &mut self,
        setup: ControlSetup,
        data: &[u8],
        timeout: Duration,
    ) -> Result<usize, TransportError>;

    /// Bulk OUT on `endpoint` (address without the direction bit, e.g. `0x04`).
    /// An empty `data` sends a zero-length packet.
    fn bulk_out(
        &mut self,
        endpoint: u8,
        data: &[u8],
        timeout: Duration,
    ) -> Result<usize, TransportError>;

    /// Bulk IN on `endpoint` (address with the direction bit, e.g. `0x81`), up to `max_len` bytes.
    fn bulk_in(
        &mut self,
        endpoint: u8,
        max_len: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError>;

    /// SET_CONFIGURATION through the OS (the kernel must know; never as a raw control request).
    fn set_configuration(&mut self, configuration: u8) -> Result<(), TransportError>;

    /// Claim `interface` (detaching a kernel driver if one is bound) and select `alt_setting`.
    fn claim_interface(&mut self, interface: u8, alt_setting: u8) -> Result<(), TransportError>;

    /// Release an interface claimed earlier.
    fn release_interface(&mut self, interface: u8) -> Result<(), TransportError>;

    /// USB port reset. The device may vanish as a result; that is reported as `Ok` or
    /// `Disconnected`, never as a hang.
    fn reset(&mut self) -> Result<(), TransportError>;

    /// A second handle on the same opened device for bulk transfers on another thread, so one
    /// thread can block in `bulk_in` while another sends `bulk_out` (usbmux streams the system
    /// image out while it waits for the Mac's ACKs). Control requests, configuration and
    /// claiming stay with the original handle. `None` (the default) when the implementation
    /// cannot share the device; callers then take turns on the one handle, which costs
    /// throughput but not correctness.
    fn bulk_handle(&self) -> Option<Box<dyn UsbTransport>> {
        None
    }
}

/// A source of USB devices and hotplug events.
pub trait UsbBus: Send + Sync {
    /// Devices present now.
    fn devices(&self) -> Result<Vec<DeviceInfo>, TransportError>;

    /// Open a device returned by [`UsbBus::devices`] or an [`HotplugEvent::Arrived`].
    fn open(&self, device: &DeviceInfo) -> Result<Box<dyn UsbTransport>, TransportError>;

    /// Subscribe to arrivals and departures from now on. Every subscriber gets every event.
    /// Devices already present are not replayed: call [`UsbBus::devices`] after subscribing.
    fn watch(&self) -> Result<Receiver<HotplugEvent>, TransportError>;
}
