//! Test and demonstration only: a bus with N fake Macs in DFU and a job that walks them through
//! the stages with made-up progress. Reached from the CLI only through the hidden
//! `--demo-fake-macs` flag, so the dashboard can be checked in a real terminal without USB.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc::UnboundedSender;

use super::api::{EngineEvent, EraseConfirmer, Stage};
use super::{JobFuture, MacJob};
use crate::usb::{DeviceInfo, HotplugEvent, TransportError, UsbBus, UsbLocation, UsbTransport};

/// A bus whose devices are whatever the test says; opening one always fails (no USB here).
pub struct FakeBus {
    devices: Mutex<Vec<DeviceInfo>>,
    watchers: Mutex<Vec<Sender<HotplugEvent>>>,
}

/// A Mac in DFU on bus 1, port `port`.
pub fn dfu_device(port: u8, address: u8) -> DeviceInfo {
    DeviceInfo {
        location: UsbLocation {
            bus: 1,
            ports: vec![port],
        },
        address,
        vendor_id: 0x05ac,
        product_id: 0x1227,
    }
}

impl FakeBus {
    pub fn new(devices: Vec<DeviceInfo>) -> FakeBus {
        FakeBus {
            devices: Mutex::new(devices),
            watchers: Mutex::new(Vec::new()),
        }
    }

    pub fn plug(&self, dev: DeviceInfo) {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(dev.clone());
        self.send(HotplugEvent::Arrived(dev));
    }

    pub fn unplug(&self, dev: &DeviceInfo) {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|d| d != dev);
        self.send(HotplugEvent::Left(dev.clone()));
    }

    fn send(&self, ev: HotplugEvent) {
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|w| w.send(ev.clone()).is_ok());
    }
}

impl UsbBus for FakeBus {
    fn devices(&self) -> Result<Vec<DeviceInfo>, TransportError> {
        Ok(self
            .devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }

    fn open(&self, _device: &DeviceInfo) -> Result<Box<dyn UsbTransport>, TransportError> {
        Err(TransportError::Unavailable(
            "fake bus: no real device".into(),
        ))
    }

    fn watch(&self) -> Result<Receiver<HotplugEvent>, TransportError> {
        let (tx, rx) = channel();
        self.watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        Ok(rx)
    }
}

/// Walks a fake Mac through every stage; `step` paces it.
pub struct DemoJob {
    pub step: Duration,
}

impl MacJob for DemoJob {
    fn start(
        &self,
        _bus: Arc<dyn UsbBus>,
        device: DeviceInfo,
        _confirmer: Arc<dyn EraseConfirmer>,
        events: UnboundedSender<EngineEvent>,
    ) -> JobFuture {
        let step = self.step;
        Box::pin(async move {
            let port = device.location.ports.first().copied().unwrap_or(0);
            let ecid = 0x0005_681c_34d3_0000 + u64::from(port);
            let send = |e| {
                let _ = events.send(e);
            };
            send(EngineEvent::Stage {
                stage: Stage::Identify,
            });
            send(EngineEvent::Identified {
                ecid,
                product_type: "MacBookAir10,1".into(),
                board: "J313AP".into(),
                name: "MacBook Air (M1, 2020)".into(),
            });
            send(EngineEvent::Build {
                version: "26.2".into(),
                build: "25C56".into(),
            });
            for stage in [
                Stage::Firmware,
                Stage::Tickets,
                Stage::Dfu,
                Stage::Stage1,
                Stage::Stage2,
                Stage::RestoreMode,
            ] {
                send(EngineEvent::Stage { stage });
                let total = 100u64 << 20;
                for i in 1..=10u64 {
                    tokio::time::sleep(step).await;
                    send(EngineEvent::Progress {
                        what: format!("{stage:?}").to_lowercase(),
                        done: total / 10 * i,
                        total: Some(total),
                        rate_bps: Some(12.5 * 1024.0 * 1024.0),
                    });
                }
            }
            send(EngineEvent::Stage { stage: Stage::Done });
            send(EngineEvent::Succeeded);
            json!({ "demo": true, "ecid": format!("0x{ecid:016X}") })
        })
    }
}
