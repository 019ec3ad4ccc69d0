//! The real USB edge: [`UsbBus`] and [`UsbTransport`] on libusb (through `rusb`).
//!
//! # Hotplug without udev
//!
//! The rescue image runs no udev daemon. libusb has two Linux hotplug backends: `linux_udev.c`
//! (needs libudev *and* a running udevd that re-broadcasts events) and `linux_netlink.c` (listens
//! to the kernel's own `NETLINK_KOBJECT_UEVENT` messages). The vendored libusb that `rusb`'s
//! `vendored` feature builds picks udev only when `pkg-config` finds `libudev` at build time; our
//! static musl builds never do (and `ci/vm/static.sh` sets `LIBUDEV_NO_PKG_CONFIG=1` to make
//! sure). So hotplug comes straight from the kernel, which is exactly what works in a udev-less
//! initramfs. Do not add a libudev dependency: it would compile, then silently never deliver an
//! event on the target.
//!
//! Should libusb still report no hotplug capability, [`RusbBus::watch`] falls back to listing
//! devices every [`POLL_INTERVAL`] and diffing.
//!
//! # Contexts
//!
//! Only a private `rusb::Context` is used: `rusb`'s global context panics when `libusb_init`
//! fails (a machine or container without USB), and a panic is not an answer a technician can
//! act on.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rusb::UsbContext;

use super::transport::{
    ControlSetup, DeviceInfo, HotplugEvent, TransportError, UsbBus, UsbLocation, UsbTransport,
};

/// How often the polling fallback lists devices.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// How long the event thread blocks in libusb before checking whether the bus was dropped.
const EVENT_WAKEUP: Duration = Duration::from_millis(200);

/// libusb treats a timeout of 0 as "wait forever"; a caller asking for "no time at all" must
/// not hang the agent, so the shortest wait we pass down is 1 ms.
const MIN_TIMEOUT: Duration = Duration::from_millis(1);

/// Maps a libusb error to the transport's vocabulary. `timeout` is what the caller asked for.
pub fn map_error(err: rusb::Error, timeout: Duration) -> TransportError {
    match err {
        rusb::Error::Pipe => TransportError::Stall,
        rusb::Error::Timeout => TransportError::Timeout(timeout),
        rusb::Error::NoDevice => TransportError::Disconnected,
        rusb::Error::Access => TransportError::Access,
        rusb::Error::Busy => TransportError::Busy,
        rusb::Error::Overflow => TransportError::Overflow,
        other => TransportError::Io(other.to_string()),
    }
}

/// [`map_error`] for calls that carry no timeout of their own.
fn map(err: rusb::Error) -> TransportError {
    map_error(err, Duration::ZERO)
}

/// Sends every hotplug event to every live subscriber; subscribers that hung up are dropped.
#[derive(Default)]
pub struct Fanout {
    subscribers: Mutex<Vec<Sender<HotplugEvent>>>,
}

impl Fanout {
    pub fn subscribe(&self) -> Receiver<HotplugEvent> {
        let (tx, rx) = mpsc::channel();
        self.lock().push(tx);
        rx
    }

    pub fn publish(&self, event: HotplugEvent) {
        self.lock().retain(|tx| tx.send(event.clone()).is_ok());
    }

    pub fn subscriber_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Sender<HotplugEvent>>> {
        // A subscriber list stays consistent even if a holder panicked: recover it.
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Events that turn the device set `before` into `after` (departures first, then arrivals, so a
/// device that re-enumerated at the same location reads "left, arrived").
pub fn diff_devices(
    before: &BTreeSet<DeviceKey>,
    after: &BTreeSet<DeviceKey>,
) -> Vec<HotplugEvent> {
    let left = before
        .difference(after)
        .map(|k| HotplugEvent::Left(k.0.clone()));
    let arrived = after
        .difference(before)
        .map(|k| HotplugEvent::Arrived(k.0.clone()));
    left.chain(arrived).collect()
}

/// A [`DeviceInfo`] with a total order, so snapshots can be diffed as sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKey(pub DeviceInfo);

impl DeviceKey {
    fn tuple(&self) -> (&UsbLocation, u8, u16, u16) {
        let d = &self.0;
        (&d.location, d.address, d.vendor_id, d.product_id)
    }
}

impl PartialOrd for DeviceKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for DeviceKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.tuple().cmp(&other.tuple())
    }
}

/// What identifies a device incarnation on the host, read without opening it.
fn device_info<T: UsbContext>(device: &rusb::Device<T>) -> Result<DeviceInfo, rusb::Error> {
    // The descriptor is cached by libusb at enumeration, so this is no I/O (and is allowed
    // inside hotplug callbacks, also for a device that already left).
    let desc = device.device_descriptor()?;
    Ok(DeviceInfo {
        location: UsbLocation {
            bus: device.bus_number(),
            // Root hubs have no port path; an error here means the same.
            ports: device.port_numbers().unwrap_or_default(),
        },
        address: device.address(),
        vendor_id: desc.vendor_id(),
        product_id: desc.product_id(),
    })
}

/// The background machinery behind [`RusbBus::watch`], started on first use.
struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // The thread wakes up at least every EVENT_WAKEUP / POLL_INTERVAL.
            let _ = t.join();
        }
    }
}

/// The libusb-backed device source.
pub struct RusbBus {
    context: rusb::Context,
    fanout: Arc<Fanout>,
    watcher: Mutex<Option<Watcher>>,
    force_polling: bool,
}

impl RusbBus {
    pub fn new() -> Result<RusbBus, TransportError> {
        Self::with_hotplug(true)
    }

    /// A bus whose [`UsbBus::watch`] always polls, even when libusb has hotplug: the fallback
    /// path must be testable on machines where hotplug works.
    pub fn new_polling() -> Result<RusbBus, TransportError> {
        Self::with_hotplug(false)
    }

    fn with_hotplug(hotplug: bool) -> Result<RusbBus, TransportError> {
        let context = rusb::Context::new().map_err(|e| {
            TransportError::Unavailable(format!(
                "libusb could not start ({e}); is /dev/bus/usb present and usbfs mounted?"
            ))
        })?;
        Ok(RusbBus {
            context,
            fanout: Arc::new(Fanout::default()),
            watcher: Mutex::new(None),
            force_polling: !hotplug,
        })
    }

    fn find(&self, info: &DeviceInfo) -> Result<rusb::Device<rusb::Context>, TransportError> {
        let list = self.context.devices().map_err(map)?;
        list.iter()
            .find(|d| {
                d.bus_number() == info.location.bus
                    && d.address() == info.address
                    && d.port_numbers().unwrap_or_default() == info.location.ports
            })
            // Same place but a different address means it re-enumerated: the one asked for is gone.
            .ok_or(TransportError::Disconnected)
    }

    fn start_watcher(&self) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        // `has_hotplug` goes through rusb's global context, which panics only if libusb_init
        // fails; our own context initialised fine a moment ago, so it will not.
        if self.force_polling {
            tracing::info!("polling for devices every {POLL_INTERVAL:?} (hotplug not used)");
        } else if rusb::has_hotplug() {
            match self.start_hotplug_thread(stop.clone()) {
                Ok(thread) => {
                    return Watcher {
                        stop,
                        thread: Some(thread),
                    }
                }
                Err(e) => {
                    tracing::warn!("libusb hotplug registration failed ({e}); polling instead")
                }
            }
        } else {
            tracing::info!("libusb reports no hotplug support; polling for devices");
        }
        let thread = self.start_poll_thread(stop.clone());
        Watcher {
            stop,
            thread: Some(thread),
        }
    }

    fn start_hotplug_thread(&self, stop: Arc<AtomicBool>) -> Result<JoinHandle<()>, rusb::Error> {
        let registration = rusb::HotplugBuilder::new().register::<rusb::Context, _>(
            &self.context,
            Box::new(HotplugForwarder {
                fanout: self.fanout.clone(),
            }),
        )?;
        let context = self.context.clone();
        std::thread::Builder::new()
            .name("usb-hotplug".into())
            .spawn(move || {
                // Keep the registration alive exactly as long as events are being handled.
                let _registration = registration;
                while !stop.load(Ordering::SeqCst) {
                    if let Err(e) = context.handle_events(Some(EVENT_WAKEUP)) {
                        if e != rusb::Error::Interrupted {
                            tracing::warn!("libusb event handling failed: {e}");
                            std::thread::sleep(EVENT_WAKEUP);
                        }
                    }
                }
            })
            // Thread creation fails only when the process is out of resources.
            .map_err(|_| rusb::Error::NoMem)
    }

    fn start_poll_thread(&self, stop: Arc<AtomicBool>) -> JoinHandle<()> {
        let context = self.context.clone();
        let fanout = self.fanout.clone();
        let snapshot = move || -> Option<BTreeSet<DeviceKey>> {
            let list = context.devices().ok()?;
            Some(
                list.iter()
                    .filter_map(|d| device_info(&d).ok().map(DeviceKey))
                    .collect(),
            )
        };
        let mut known = snapshot().unwrap_or_default();
        let spawned = std::thread::Builder::new()
            .name("usb-poll".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(POLL_INTERVAL);
                    // A failed listing is transient (e.g. ENOMEM); keep the old view.
                    if let Some(now) = snapshot() {
                        for ev in diff_devices(&known, &now) {
                            fanout.publish(ev);
                        }
                        known = now;
                    }
                }
            });
        match spawned {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("cannot start the USB polling thread: {e}");
                // A finished thread keeps `Watcher` uniform; subscribers then see no events.
                std::thread::spawn(|| {})
            }
        }
    }
}

struct HotplugForwarder {
    fanout: Arc<Fanout>,
}

impl rusb::Hotplug<rusb::Context> for HotplugForwarder {
    fn device_arrived(&mut self, device: rusb::Device<rusb::Context>) {
        match device_info(&device) {
            Ok(info) => self.fanout.publish(HotplugEvent::Arrived(info)),
            Err(e) => tracing::debug!("ignoring an arrival without a readable descriptor: {e}"),
        }
    }

    fn device_left(&mut self, device: rusb::Device<rusb::Context>) {
        match device_info(&device) {
            Ok(info) => self.fanout.publish(HotplugEvent::Left(info)),
            Err(e) => tracing::debug!("ignoring a departure without a cached descriptor: {e}"),
        }
    }
}

impl UsbBus for RusbBus {
    fn devices(&self) -> Result<Vec<DeviceInfo>, TransportError> {
        let list = self.context.devices().map_err(map)?;
        let mut out = Vec::with_capacity(list.len());
        for d in list.iter() {
            match device_info(&d) {
                Ok(info) => out.push(info),
                Err(e) => tracing::debug!(
                    "skipping bus {} address {}: no device descriptor ({e})",
                    d.bus_number(),
                    d.address()
                ),
            }
        }
        Ok(out)
    }

    fn open(&self, device: &DeviceInfo) -> Result<Box<dyn UsbTransport>, TransportError> {
        let handle = self.find(device)?.open().map_err(map)?;
        Ok(Box::new(RusbTransport {
            info: device.clone(),
            handle: Arc::new(handle),
        }))
    }

    fn watch(&self) -> Result<Receiver<HotplugEvent>, TransportError> {
        // Subscribe before the machinery starts so the first events cannot be missed.
        let rx = self.fanout.subscribe();
        let mut watcher = self.watcher.lock().unwrap_or_else(|e| e.into_inner());
        if watcher.is_none() {
            *watcher = Some(self.start_watcher());
        }
        Ok(rx)
    }
}

/// One opened device.
///
/// The handle is shared so [`UsbTransport::bulk_handle`] can give the usbmux reader thread its
/// own transport: libusb transfers on one handle are thread-safe, and every `DeviceHandle`
/// method rusb exposes takes `&self`. The device closes when the last clone is dropped.
pub struct RusbTransport {
    info: DeviceInfo,
    handle: Arc<rusb::DeviceHandle<rusb::Context>>,
}

impl UsbTransport for RusbTransport {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn control_in(
        &mut self,
        setup: ControlSetup,
        length: u16,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let mut buf = vec![0u8; usize::from(length)];
        let n = self
            .handle
            .read_control(
                setup.request_type | 0x80,
                setup.request,
                setup.value,
                setup.index,
                &mut buf,
                timeout.max(MIN_TIMEOUT),
            )
            .map_err(|e| map_error(e, timeout))?;
        buf.truncate(n);
        Ok(buf)
    }

    fn control_out(
        &mut self,
        setup: ControlSetup,
        data: &[u8],
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        self.handle
            .write_control(
                setup.request_type & 0x7f,
                setup.request,
                setup.value,
                setup.index,
                data,
                timeout.max(MIN_TIMEOUT),
            )
            .map_err(|e| map_error(e, timeout))
    }

    fn bulk_out(
        &mut self,
        endpoint: u8,
        data: &[u8],
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        self.handle
            .write_bulk(endpoint & 0x7f, data, timeout.max(MIN_TIMEOUT))
            .map_err(|e| map_error(e, timeout))
    }

    fn bulk_in(
        &mut self,
        endpoint: u8,
        max_len: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let mut buf = vec![0u8; max_len];
        let n = self
            .handle
            .read_bulk(endpoint | 0x80, &mut buf, timeout.max(MIN_TIMEOUT))
            .map_err(|e| map_error(e, timeout))?;
        buf.truncate(n);
        Ok(buf)
    }

    fn set_configuration(&mut self, configuration: u8) -> Result<(), TransportError> {
        // Re-selecting the active configuration makes the kernel reset every interface's
        // state (and Apple's boot ROM does not need it), so only switch when it differs.
        match self.handle.active_configuration() {
            Ok(active) if active == configuration => Ok(()),
            _ => self
                .handle
                .set_active_configuration(configuration)
                .map_err(map),
        }
    }

    fn claim_interface(&mut self, interface: u8, alt_setting: u8) -> Result<(), TransportError> {
        // NotSupported (no kernel drivers on this platform) or NotFound (none bound) mean there
        // is nothing to detach; claim_interface reports any real problem.
        if let Ok(true) = self.handle.kernel_driver_active(interface) {
            self.handle.detach_kernel_driver(interface).map_err(map)?;
        }
        self.handle.claim_interface(interface).map_err(map)?;
        match self.handle.set_alternate_setting(interface, alt_setting) {
            Ok(()) => Ok(()),
            // Interfaces with a single alternate setting may stall SET_INTERFACE; alt 0 is
            // then what they already use.
            Err(rusb::Error::Pipe) if alt_setting == 0 => Ok(()),
            Err(e) => Err(map(e)),
        }
    }

    fn release_interface(&mut self, interface: u8) -> Result<(), TransportError> {
        self.handle.release_interface(interface).map_err(map)
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        match self.handle.reset() {
            Ok(()) => Ok(()),
            // libusb says NotFound when the device must re-enumerate after the reset: it left.
            Err(rusb::Error::NotFound) | Err(rusb::Error::NoDevice) => {
                Err(TransportError::Disconnected)
            }
            Err(e) => Err(map(e)),
        }
    }

    fn bulk_handle(&self) -> Option<Box<dyn UsbTransport>> {
        Some(Box::new(RusbTransport {
            info: self.info.clone(),
            handle: Arc::clone(&self.handle),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(bus: u8, ports: &[u8], address: u8, pid: u16) -> DeviceInfo {
        DeviceInfo {
            location: UsbLocation {
                bus,
                ports: ports.to_vec(),
            },
            address,
            vendor_id: 0x05ac,
            product_id: pid,
        }
    }

    #[test]
    fn errors_map_to_transport_vocabulary() {
        let t = Duration::from_millis(1500);
        assert_eq!(map_error(rusb::Error::Pipe, t), TransportError::Stall);
        assert_eq!(
            map_error(rusb::Error::Timeout, t),
            TransportError::Timeout(t)
        );
        assert_eq!(
            map_error(rusb::Error::NoDevice, t),
            TransportError::Disconnected
        );
        assert_eq!(map_error(rusb::Error::Access, t), TransportError::Access);
        assert_eq!(map_error(rusb::Error::Busy, t), TransportError::Busy);
        assert_eq!(
            map_error(rusb::Error::Overflow, t),
            TransportError::Overflow
        );
        assert_eq!(
            map_error(rusb::Error::Io, t),
            TransportError::Io("Input/Output Error".into())
        );
        assert!(matches!(
            map_error(rusb::Error::NotFound, t),
            TransportError::Io(_)
        ));
        assert!(!map_error(rusb::Error::Other, t).is_gone());
        assert!(map_error(rusb::Error::NoDevice, t).is_gone());
    }

    #[test]
    fn diff_reports_reenumeration_as_left_then_arrived() {
        let hub = DeviceKey(info(1, &[], 1, 0x8006));
        let dfu = DeviceKey(info(1, &[2], 3, 0x1227));
        let rec = DeviceKey(info(1, &[2], 4, 0x1281));
        let before: BTreeSet<_> = [hub.clone(), dfu.clone()].into();
        let after: BTreeSet<_> = [hub, rec.clone()].into();
        assert_eq!(
            diff_devices(&before, &after),
            vec![HotplugEvent::Left(dfu.0), HotplugEvent::Arrived(rec.0)]
        );
        assert!(diff_devices(&after, &after).is_empty());
    }

    #[test]
    fn diff_sees_new_address_at_same_place_as_a_new_device() {
        let a = DeviceKey(info(2, &[1, 4], 5, 0x1227));
        let b = DeviceKey(info(2, &[1, 4], 6, 0x1227));
        let ev = diff_devices(&[a.clone()].into(), &[b.clone()].into());
        assert_eq!(
            ev,
            vec![HotplugEvent::Left(a.0), HotplugEvent::Arrived(b.0)]
        );
    }

    #[test]
    fn fanout_reaches_every_subscriber_and_forgets_dropped_ones() {
        let f = Fanout::default();
        let a = f.subscribe();
        let b = f.subscribe();
        let ev = HotplugEvent::Arrived(info(1, &[1], 2, 0x1227));
        f.publish(ev.clone());
        assert_eq!(a.try_recv(), Ok(ev.clone()));
        assert_eq!(b.try_recv(), Ok(ev.clone()));
        drop(b);
        f.publish(ev.clone());
        assert_eq!(f.subscriber_count(), 1);
        assert_eq!(a.try_recv(), Ok(ev));
    }

    #[test]
    fn new_without_usb_is_an_error_not_a_panic() {
        // On a machine without USB (CI containers) libusb_init fails; with USB it succeeds and
        // listing must work. Either way: no panic, and a technician-readable message.
        for bus in [RusbBus::new(), RusbBus::new_polling()] {
            check_bus(bus);
        }
    }

    fn check_bus(bus: Result<RusbBus, TransportError>) {
        match bus {
            Ok(bus) => {
                let devices = bus.devices().expect("listing devices on a working libusb");
                let rx = bus.watch().expect("watch on a working libusb");
                drop(devices);
                drop(rx);
            }
            Err(TransportError::Unavailable(msg)) => assert!(msg.contains("libusb")),
            Err(other) => panic!("unexpected error kind: {other:?}"),
        }
    }
}
