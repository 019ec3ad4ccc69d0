//! USB edge: the transport seam, descriptor parsing, and the libusb implementation.

pub mod descriptor;
pub mod rusb_edge;
pub mod transport;

pub use transport::{
    ControlSetup, DeviceInfo, HotplugEvent, TransportError, UsbBus, UsbLocation, UsbTransport,
};
