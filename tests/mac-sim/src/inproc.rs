//! An in-process USB bus for tests: simulated devices on numbered ports, a background thread
//! that lets them reboot on their own schedule, hotplug events to subscribers, and synchronous
//! transfers that fail with [`BusError::Gone`] while a device is off the bus.
//!
//! Test code (including the agent's own tests) adapts this to whatever USB trait it uses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::wire::{Enumeration, LinkChange, Reply, Setup, SimDevice};

/// How often the bus lets idle devices act (the [`SimDevice`] contract asks for ≤ 10 ms).
pub const POLL_INTERVAL: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusEvent {
    Attached {
        port: usize,
        enumeration: Enumeration,
    },
    Detached {
        port: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("there is no device on simulated port {0}")]
    NoSuchPort(usize),
    #[error("the device on simulated port {0} is not on the bus (rebooting or unplugged)")]
    Gone(usize),
}

struct Port {
    device: Box<dyn SimDevice>,
    /// What the bus last announced (the device's own `attached()` may run ahead).
    announced: bool,
}

#[derive(Default)]
struct Inner {
    ports: Mutex<Vec<Port>>,
    subscribers: Mutex<Vec<Sender<BusEvent>>>,
    stop: AtomicBool,
}

/// A poisoned lock only means a test thread panicked mid-call; the data is still usable
/// for the remaining assertions, so recover it instead of cascading panics.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn emit(&self, ev: BusEvent) {
        tracing::debug!(?ev, "sim bus event");
        lock(&self.subscribers).retain(|s| s.send(ev.clone()).is_ok());
    }

    /// Let one device act and announce what changed.
    fn poll_port(&self, index: usize, port: &mut Port, now: Instant) {
        // A device may detach and re-attach within one poll interval; drain every change.
        while let Some(change) = port.device.poll_link(now) {
            match change {
                LinkChange::Detach => {
                    if port.announced {
                        port.announced = false;
                        self.emit(BusEvent::Detached { port: index + 1 });
                    }
                }
                LinkChange::Attach => {
                    port.announced = true;
                    self.emit(BusEvent::Attached {
                        port: index + 1,
                        enumeration: port.device.enumeration(),
                    });
                }
            }
        }
    }

    fn poll_all(&self) {
        let now = Instant::now();
        let mut ports = lock(&self.ports);
        for (i, p) in ports.iter_mut().enumerate() {
            self.poll_port(i, p, now);
        }
    }
}

/// The bus. Dropping it stops the polling thread.
pub struct SimBus {
    inner: Arc<Inner>,
    poller: Option<JoinHandle<()>>,
}

impl Default for SimBus {
    fn default() -> Self {
        Self::new()
    }
}

impl SimBus {
    pub fn new() -> SimBus {
        let inner = Arc::new(Inner::default());
        let bg = Arc::clone(&inner);
        let poller = std::thread::Builder::new()
            .name("sim-bus".into())
            .spawn(move || {
                while !bg.stop.load(Ordering::Relaxed) {
                    bg.poll_all();
                    std::thread::sleep(POLL_INTERVAL);
                }
            })
            .ok();
        if poller.is_none() {
            tracing::warn!("cannot start the sim bus thread; devices only act during transfers");
        }
        SimBus { inner, poller }
    }

    /// Plug a device in; returns its port number (from 1). Subscribers see `Attached` if the
    /// device is on the bus.
    pub fn plug(&self, device: Box<dyn SimDevice>) -> usize {
        let mut ports = lock(&self.inner.ports);
        let announced = device.attached();
        let enumeration = device.enumeration();
        ports.push(Port { device, announced });
        let port = ports.len();
        // Emitted under the ports lock (as every event is) so `subscribe` never replays and
        // receives the same attach.
        if announced {
            self.inner.emit(BusEvent::Attached { port, enumeration });
        }
        drop(ports);
        port
    }

    /// Hotplug events. Devices already on the bus are announced first (like libusb's
    /// hotplug ENUMERATE flag), so no attach is missed.
    pub fn subscribe(&self) -> Receiver<BusEvent> {
        let (tx, rx) = channel();
        // Hold the ports lock while registering so no event slips between replay and live.
        let ports = lock(&self.inner.ports);
        for (i, p) in ports.iter().enumerate() {
            if p.announced {
                let _ = tx.send(BusEvent::Attached {
                    port: i + 1,
                    enumeration: p.device.enumeration(),
                });
            }
        }
        lock(&self.inner.subscribers).push(tx);
        drop(ports);
        rx
    }

    /// Ports with a device on the bus now.
    pub fn attached(&self) -> Vec<(usize, Enumeration)> {
        lock(&self.inner.ports)
            .iter()
            .enumerate()
            .filter(|(_, p)| p.announced)
            .map(|(i, p)| (i + 1, p.device.enumeration()))
            .collect()
    }

    fn with_port<R>(
        &self,
        port: usize,
        f: impl FnOnce(&mut dyn SimDevice) -> R,
    ) -> Result<R, BusError> {
        let mut ports = lock(&self.inner.ports);
        let index = port.checked_sub(1).ok_or(BusError::NoSuchPort(port))?;
        let p = ports.get_mut(index).ok_or(BusError::NoSuchPort(port))?;
        if !p.announced || !p.device.attached() {
            return Err(BusError::Gone(port));
        }
        let r = f(p.device.as_mut());
        // Front ends poll after every transfer: a `go` or a fault acts at once.
        self.inner.poll_port(index, p, Instant::now());
        Ok(r)
    }

    pub fn enumeration(&self, port: usize) -> Result<Enumeration, BusError> {
        self.with_port(port, |d| d.enumeration())
    }

    pub fn control(&self, port: usize, setup: &Setup, data_out: &[u8]) -> Result<Reply, BusError> {
        self.with_port(port, |d| {
            let mut r = d.control(setup, data_out);
            // Like a host controller: an IN data stage never returns more than wLength.
            if let Reply::Ack(data) = &mut r {
                if setup.is_in() {
                    data.truncate(setup.length.into());
                }
            }
            r
        })
    }

    pub fn bulk_out(&self, port: usize, endpoint: u8, data: &[u8]) -> Result<Reply, BusError> {
        self.with_port(port, |d| d.bulk_out(endpoint, data))
    }

    pub fn bulk_in(&self, port: usize, endpoint: u8, max_len: usize) -> Result<Reply, BusError> {
        self.with_port(port, |d| {
            let mut r = d.bulk_in(endpoint, max_len);
            if let Reply::Ack(data) = &mut r {
                data.truncate(max_len);
            }
            r
        })
    }

    /// A USB port reset (libusb_reset_device).
    pub fn reset(&self, port: usize) -> Result<(), BusError> {
        self.with_port(port, |d| d.reset())
    }

    /// Wait for the next event on `rx` that `pred` accepts, up to `timeout`.
    pub fn wait_for(
        rx: &Receiver<BusEvent>,
        timeout: Duration,
        mut pred: impl FnMut(&BusEvent) -> bool,
    ) -> Option<BusEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match rx.recv_timeout(left) {
                Ok(ev) if pred(&ev) => return Some(ev),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
}

impl Drop for SimBus {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.poller.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Speed;

    /// A device that reboots into a new product ID whenever asked by a control request,
    /// and can be unplugged.
    struct Toy {
        pid: u16,
        attached: bool,
        pending: Option<LinkChange>,
        back_at: Option<Instant>,
    }

    impl SimDevice for Toy {
        fn enumeration(&self) -> Enumeration {
            Enumeration {
                vendor_id: 0x05ac,
                product_id: self.pid,
                speed: Speed::High,
                device_descriptor: vec![18, 1],
                configurations: vec![],
            }
        }
        fn control(&mut self, setup: &Setup, _data: &[u8]) -> Reply {
            match setup.request {
                // "reboot"
                1 => {
                    self.pending = Some(LinkChange::Detach);
                    Reply::Ack(vec![])
                }
                _ => Reply::Ack(vec![0xaa; 64]),
            }
        }
        fn bulk_out(&mut self, _: u8, _: &[u8]) -> Reply {
            Reply::Ack(vec![])
        }
        fn bulk_in(&mut self, _: u8, _: usize) -> Reply {
            Reply::Ack(vec![1; 100])
        }
        fn reset(&mut self) {}
        fn poll_link(&mut self, now: Instant) -> Option<LinkChange> {
            if let Some(LinkChange::Detach) = self.pending.take() {
                self.attached = false;
                self.back_at = Some(now + Duration::from_millis(10));
                return Some(LinkChange::Detach);
            }
            if self.back_at.is_some_and(|t| now >= t) {
                self.back_at = None;
                self.attached = true;
                self.pid += 1;
                return Some(LinkChange::Attach);
            }
            None
        }
        fn attached(&self) -> bool {
            self.attached
        }
    }

    fn toy() -> Box<Toy> {
        Box::new(Toy {
            pid: 0x1227,
            attached: true,
            pending: None,
            back_at: None,
        })
    }

    fn setup(request: u8, length: u16) -> Setup {
        Setup {
            request_type: 0xc0,
            request,
            value: 0,
            index: 0,
            length,
        }
    }

    #[test]
    fn attach_detach_reattach_with_new_descriptors() {
        let bus = SimBus::new();
        let early = bus.subscribe();
        let p1 = bus.plug(toy());
        let p2 = bus.plug(toy());
        assert_eq!((p1, p2), (1, 2));
        let late = bus.subscribe();
        for rx in [&early, &late] {
            for want in [1, 2] {
                match rx.recv_timeout(Duration::from_secs(1)).unwrap() {
                    BusEvent::Attached { port, enumeration } => {
                        assert_eq!((port, enumeration.product_id), (want, 0x1227))
                    }
                    e => panic!("{e:?}"),
                }
            }
        }
        // IN data is cut to wLength like a real host controller does.
        assert_eq!(
            bus.control(2, &setup(0, 8), &[]).unwrap(),
            Reply::Ack(vec![0xaa; 8])
        );
        assert_eq!(bus.bulk_in(1, 0x81, 10).unwrap(), Reply::Ack(vec![1; 10]));
        // Reboot port 2: detach is immediate, transfers fail until it is back.
        assert_eq!(
            bus.control(2, &setup(1, 0), &[]).unwrap(),
            Reply::Ack(vec![])
        );
        assert_eq!(
            early.recv_timeout(Duration::from_secs(1)).unwrap(),
            BusEvent::Detached { port: 2 }
        );
        assert_eq!(bus.control(2, &setup(0, 8), &[]), Err(BusError::Gone(2)));
        assert_eq!(bus.bulk_out(2, 4, &[1]), Err(BusError::Gone(2)));
        assert_eq!(bus.reset(2), Err(BusError::Gone(2)));
        assert_eq!(bus.attached().len(), 1);
        // The poll thread brings it back with the new identity.
        match SimBus::wait_for(&early, Duration::from_secs(2), |_| true).unwrap() {
            BusEvent::Attached { port, enumeration } => {
                assert_eq!((port, enumeration.product_id), (2, 0x1228))
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(bus.enumeration(2).unwrap().product_id, 0x1228);
        assert!(bus.control(2, &setup(0, 8), &[]).is_ok());
        assert_eq!(
            bus.control(3, &setup(0, 8), &[]),
            Err(BusError::NoSuchPort(3))
        );
        assert_eq!(
            bus.control(0, &setup(0, 8), &[]),
            Err(BusError::NoSuchPort(0))
        );
    }

    #[test]
    fn ports_are_usable_from_several_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<SimBus>();
        let bus = Arc::new(SimBus::new());
        let ports: Vec<usize> = (0..4).map(|_| bus.plug(toy())).collect();
        let handles: Vec<_> = ports
            .into_iter()
            .map(|p| {
                let bus = Arc::clone(&bus);
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        assert_eq!(bus.bulk_in(p, 0x81, 3).unwrap(), Reply::Ack(vec![1; 3]));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn dropped_subscribers_do_not_block_events() {
        let bus = SimBus::new();
        drop(bus.subscribe());
        let rx = bus.subscribe();
        bus.plug(toy());
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(1)),
            Ok(BusEvent::Attached { port: 1, .. })
        ));
        assert_eq!(lock(&bus.inner.subscribers).len(), 1);
    }
}
