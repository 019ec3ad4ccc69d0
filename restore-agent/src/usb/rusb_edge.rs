//! PLACEHOLDER (identity branch): the real libusb edge is written on another branch and replaces
//! this file at merge. Only the constructor signature the `devices` command needs is kept.

use std::sync::mpsc::Receiver;

use super::{DeviceInfo, HotplugEvent, TransportError, UsbBus, UsbTransport};

pub struct RusbBus;

impl RusbBus {
    pub fn new() -> Result<RusbBus, TransportError> {
        Err(TransportError::Unavailable(
            "libusb edge not built into this branch".into(),
        ))
    }
}

impl UsbBus for RusbBus {
    fn devices(&self) -> Result<Vec<DeviceInfo>, TransportError> {
        Ok(Vec::new())
    }

    fn open(&self, _device: &DeviceInfo) -> Result<Box<dyn UsbTransport>, TransportError> {
        Err(TransportError::Disconnected)
    }

    fn watch(&self) -> Result<Receiver<HotplugEvent>, TransportError> {
        Err(TransportError::Unavailable("no hotplug".into()))
    }
}
