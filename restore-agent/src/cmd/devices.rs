//! `restore-agent devices`: list the Apple devices on the bus (DFU, Port DFU, Recovery, restore
//! mode) with their identity, once or as a live hotplug feed.
//!
//! One device failing to open (permissions, it just left) never stops the listing: its line
//! carries the error instead of the identity.

use std::collections::HashSet;
use std::io::Write;
use std::thread;
use std::time::Duration;

use anyhow::Context;
use restore_agent::identity::{
    self, report::hex_ecid, AppleMode, DeviceIdentity, IdentityError, IdentityReport, Situation,
};
use restore_agent::usb::rusb_edge::RusbBus;
use restore_agent::usb::{DeviceInfo, HotplugEvent, TransportError, UsbBus};
use serde::Serialize;

use super::identify::mode_label;

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON (an array; with --watch, one object per line).
    #[arg(long)]
    pub json: bool,
    /// Keep running and print one line per device arriving or leaving.
    #[arg(long)]
    pub watch: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let bus = RusbBus::new().context("cannot access USB")?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.watch {
        watch(&bus, &mut out, args.json, &WatchOptions::default())
    } else {
        list(&bus, &mut out, args.json)
    }
}

/// How hard to try opening a device that just arrived.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Extra attempts after the first when opening fails for a reason that may pass (udev has
    /// not applied permissions yet, the kernel still holds the device).
    pub open_retries: u32,
    pub retry_delay: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            open_retries: 5,
            retry_delay: Duration::from_millis(200),
        }
    }
}

/// One device and what reading its identity gave.
pub struct Entry {
    pub info: DeviceInfo,
    pub identity: Result<DeviceIdentity, IdentityError>,
}

/// Probe every Apple device present now.
pub fn survey(bus: &dyn UsbBus) -> Result<Vec<Entry>, TransportError> {
    let mut devices: Vec<DeviceInfo> = bus
        .devices()?
        .into_iter()
        .filter(identity::is_apple_mode_device)
        .collect();
    devices.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(devices
        .into_iter()
        .map(|info| Entry {
            identity: identity::probe(bus, &info),
            info,
        })
        .collect())
}

/// Print the current devices once.
pub fn list(bus: &dyn UsbBus, out: &mut dyn Write, json: bool) -> anyhow::Result<()> {
    let entries = survey(bus).context("cannot list USB devices")?;
    if json {
        let lines: Vec<DeviceLine> = entries.iter().map(|e| DeviceLine::new(None, e)).collect();
        serde_json::to_writer_pretty(&mut *out, &lines)?;
        writeln!(out)?;
    } else if entries.is_empty() {
        writeln!(
            out,
            "no Apple device in DFU, Port DFU, Recovery or restore mode found"
        )?;
    } else {
        for e in &entries {
            write_human(out, None, e)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Print the devices present now as arrivals, then one line per hotplug event until the bus
/// stops delivering events. Each line is flushed at once (scripts follow this output live).
pub fn watch(
    bus: &dyn UsbBus,
    out: &mut dyn Write,
    json: bool,
    options: &WatchOptions,
) -> anyhow::Result<()> {
    // Subscribe before listing so nothing arriving in between is missed; `present` drops the
    // duplicate such a race produces.
    let events = bus.watch().context("cannot watch USB hotplug events")?;
    let mut present: HashSet<DeviceInfo> = HashSet::new();
    let mut initial: Vec<DeviceInfo> = bus
        .devices()
        .context("cannot list USB devices")?
        .into_iter()
        .filter(identity::is_apple_mode_device)
        .collect();
    initial.sort_by(|a, b| a.location.cmp(&b.location));
    for info in initial {
        present.insert(info.clone());
        let entry = probe_with_retries(bus, info, options);
        emit(out, json, Some(Event::Arrived), &entry)?;
    }
    for event in events {
        match event {
            HotplugEvent::Arrived(info) => {
                if !identity::is_apple_mode_device(&info) || !present.insert(info.clone()) {
                    continue;
                }
                let entry = probe_with_retries(bus, info, options);
                emit(out, json, Some(Event::Arrived), &entry)?;
            }
            HotplugEvent::Left(info) => {
                if !identity::is_apple_mode_device(&info) {
                    continue;
                }
                present.remove(&info);
                write_left(out, json, &info)?;
            }
        }
    }
    Ok(())
}

fn probe_with_retries(bus: &dyn UsbBus, info: DeviceInfo, options: &WatchOptions) -> Entry {
    let mut attempt = 0;
    loop {
        let identity = identity::probe(bus, &info);
        let transient = matches!(
            &identity,
            Err(IdentityError::Transport(
                TransportError::Access | TransportError::Busy | TransportError::Io(_)
            ))
        );
        if !transient || attempt >= options.open_retries {
            return Entry { info, identity };
        }
        attempt += 1;
        tracing::debug!(
            "opening {} failed ({:?}), retry {attempt}",
            info.location,
            identity.err()
        );
        thread::sleep(options.retry_delay);
    }
}

#[derive(Clone, Copy)]
enum Event {
    Arrived,
    Left,
}

impl Event {
    fn as_str(self) -> &'static str {
        match self {
            Event::Arrived => "arrived",
            Event::Left => "left",
        }
    }
}

/// The JSON object for one device (and event).
#[derive(Serialize)]
struct DeviceLine {
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'static str>,
    location: String,
    vendor_id: String,
    product_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<AppleMode>,
    #[serde(flatten)]
    identity: Option<IdentityReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl DeviceLine {
    fn bare(event: Option<Event>, info: &DeviceInfo) -> Self {
        DeviceLine {
            event: event.map(Event::as_str),
            location: info.location.to_string(),
            vendor_id: format!("{:#06x}", info.vendor_id),
            product_id: format!("{:#06x}", info.product_id),
            mode: AppleMode::from_ids(info.vendor_id, info.product_id),
            identity: None,
            error: None,
        }
    }

    fn new(event: Option<Event>, entry: &Entry) -> Self {
        let mut line = Self::bare(event, &entry.info);
        match &entry.identity {
            Ok(id) => {
                let mut report = id.report();
                // Location and mode are the line's own keys; flattening them twice would
                // duplicate JSON keys.
                report.location = None;
                report.mode = None;
                line.identity = Some(report);
            }
            Err(e) => line.error = Some(e.to_string()),
        }
        line
    }
}

fn emit(
    out: &mut dyn Write,
    json: bool,
    event: Option<Event>,
    entry: &Entry,
) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, &DeviceLine::new(event, entry))?;
        writeln!(out)?;
    } else {
        write_human(out, event, entry)?;
    }
    out.flush()?;
    Ok(())
}

fn write_left(out: &mut dyn Write, json: bool, info: &DeviceInfo) -> anyhow::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, &DeviceLine::bare(Some(Event::Left), info))?;
        writeln!(out)?;
    } else {
        writeln!(out, "left     {}", head(info))?;
    }
    out.flush()?;
    Ok(())
}

fn head(info: &DeviceInfo) -> String {
    let mode = AppleMode::from_ids(info.vendor_id, info.product_id)
        .map(mode_label)
        .unwrap_or("?");
    format!(
        "{}  {:04x}:{:04x}  {}",
        info.location, info.vendor_id, info.product_id, mode
    )
}

/// One line per device, plus an indented advice line when the device is not ready as it is.
fn write_human(out: &mut dyn Write, event: Option<Event>, entry: &Entry) -> std::io::Result<()> {
    if let Some(e) = event {
        write!(out, "{:<8} ", e.as_str())?;
    }
    write!(out, "{}", head(&entry.info))?;
    let id = match &entry.identity {
        Ok(id) => id,
        Err(e) => return writeln!(out, "  error: {e}"),
    };
    if let Some(m) = id.model {
        write!(out, "  {}  {}  {}", m.product_type, m.board_config, m.name)?;
    } else if let (Some(c), Some(b)) = (id.cpid, id.bdid) {
        write!(out, "  CPID {c:#06x} BDID {b:#04x}")?;
    }
    if let Some(ecid) = id.ecid {
        write!(out, "  ECID {}", hex_ecid(ecid))?;
    }
    if let Some(n) = &id.ap_nonce {
        write!(out, "  ApNonce {}", hex::encode(n))?;
    }
    if let Some(n) = &id.sep_nonce {
        write!(out, "  SepNonce {}", hex::encode(n))?;
    }
    writeln!(out)?;
    let situation = id.situation();
    if !matches!(situation, Situation::MacInDfu(_)) {
        writeln!(out, "    {situation}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use restore_agent::usb::descriptor::{emit_language_ids, emit_string, DeviceDescriptor};
    use restore_agent::usb::{ControlSetup, UsbLocation, UsbTransport};
    use std::collections::HashMap;
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::sync::Mutex;

    /// A device answering only the descriptor reads `read_identity` makes.
    struct FakeDevice {
        info: DeviceInfo,
        strings: HashMap<u8, String>,
    }

    impl UsbTransport for FakeDevice {
        fn info(&self) -> &DeviceInfo {
            &self.info
        }
        fn control_in(
            &mut self,
            setup: ControlSetup,
            length: u16,
            _: Duration,
        ) -> Result<Vec<u8>, TransportError> {
            let (kind, index) = ((setup.value >> 8) as u8, setup.value as u8);
            let bytes = match (kind, index) {
                (1, 0) => DeviceDescriptor {
                    bcd_usb: 0x200,
                    device_class: 0,
                    device_subclass: 0,
                    device_protocol: 0,
                    max_packet_size0: 64,
                    vendor_id: self.info.vendor_id,
                    product_id: self.info.product_id,
                    bcd_device: 0,
                    manufacturer_index: 2,
                    product_index: 3,
                    serial_number_index: 4,
                    num_configurations: 1,
                }
                .emit()
                .to_vec(),
                (3, 0) => emit_language_ids(&[0x0409]).unwrap(),
                (3, i) => match self.strings.get(&i) {
                    Some(s) => emit_string(s).unwrap(),
                    None => return Err(TransportError::Stall),
                },
                _ => return Err(TransportError::Stall),
            };
            Ok(bytes[..bytes.len().min(usize::from(length))].to_vec())
        }
        fn control_out(
            &mut self,
            _: ControlSetup,
            _: &[u8],
            _: Duration,
        ) -> Result<usize, TransportError> {
            Err(TransportError::Stall)
        }
        fn bulk_out(&mut self, _: u8, _: &[u8], _: Duration) -> Result<usize, TransportError> {
            Err(TransportError::Stall)
        }
        fn bulk_in(&mut self, _: u8, _: usize, _: Duration) -> Result<Vec<u8>, TransportError> {
            Err(TransportError::Stall)
        }
        fn set_configuration(&mut self, _: u8) -> Result<(), TransportError> {
            Ok(())
        }
        fn claim_interface(&mut self, _: u8, _: u8) -> Result<(), TransportError> {
            Ok(())
        }
        fn release_interface(&mut self, _: u8) -> Result<(), TransportError> {
            Ok(())
        }
        fn reset(&mut self) -> Result<(), TransportError> {
            Ok(())
        }
    }

    /// A device on the fake bus: its strings, and the errors its next opens fail with.
    type FakeSlot = (DeviceInfo, HashMap<u8, String>, Vec<TransportError>);

    #[derive(Default)]
    struct FakeBus {
        devices: Mutex<Vec<FakeSlot>>,
        watchers: Mutex<Vec<Sender<HotplugEvent>>>,
    }

    impl FakeBus {
        fn add(
            &self,
            info: DeviceInfo,
            serial: &str,
            nonces: Option<&str>,
            open_errors: Vec<TransportError>,
        ) {
            let mut strings = HashMap::from([(4, serial.to_string())]);
            if let Some(n) = nonces {
                strings.insert(1, n.to_string());
            }
            self.devices
                .lock()
                .unwrap()
                .push((info, strings, open_errors));
        }
    }

    impl UsbBus for FakeBus {
        fn devices(&self) -> Result<Vec<DeviceInfo>, TransportError> {
            Ok(self
                .devices
                .lock()
                .unwrap()
                .iter()
                .map(|d| d.0.clone())
                .collect())
        }
        fn open(&self, device: &DeviceInfo) -> Result<Box<dyn UsbTransport>, TransportError> {
            let mut devices = self.devices.lock().unwrap();
            let d = devices
                .iter_mut()
                .find(|d| &d.0 == device)
                .ok_or(TransportError::Disconnected)?;
            if !d.2.is_empty() {
                return Err(d.2.remove(0));
            }
            Ok(Box::new(FakeDevice {
                info: d.0.clone(),
                strings: d.1.clone(),
            }))
        }
        fn watch(&self) -> Result<Receiver<HotplugEvent>, TransportError> {
            let (tx, rx) = channel();
            self.watchers.lock().unwrap().push(tx);
            Ok(rx)
        }
    }

    fn info(ports: &[u8], pid: u16) -> DeviceInfo {
        DeviceInfo {
            location: UsbLocation {
                bus: 1,
                ports: ports.to_vec(),
            },
            address: 5,
            vendor_id: 0x05ac,
            product_id: pid,
        }
    }

    const AIR: &str = "CPID:8112 CPRV:10 BDID:28 ECID:001C30603EC0C01E IBFL:3C SRTG:[iBoot-8419]";

    fn no_retry() -> WatchOptions {
        WatchOptions {
            open_retries: 0,
            retry_delay: Duration::ZERO,
        }
    }

    #[test]
    fn human_list_with_an_error_and_a_recovery_mac() {
        let bus = FakeBus::default();
        bus.add(info(&[2], 0x1227), AIR, Some("NONC:0a0b SNON:0c"), vec![]);
        bus.add(
            info(&[1, 4], 0x1281),
            "CPID:8103 BDID:26 ECID:01",
            None,
            vec![],
        );
        bus.add(info(&[3], 0x1227), AIR, None, vec![TransportError::Access]);
        // Not an Apple restore-related device: ignored.
        bus.add(
            DeviceInfo {
                vendor_id: 0x046d,
                ..info(&[4], 0xc52b)
            },
            "",
            None,
            vec![],
        );
        let mut out = Vec::new();
        list(&bus, &mut out, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "1-1.4  05ac:1281  Recovery  MacBookAir10,1  j313ap  MacBook Air (M1, 2020)  ECID 0x0000000000000001"
        );
        assert!(
            lines[1].starts_with("    the Mac is in Recovery, not DFU (MacBook Air (M1, 2020) ["),
            "{}",
            lines[1]
        );
        assert!(lines[1].contains("in Recovery, not DFU"), "{}", lines[1]);
        assert_eq!(
            lines[2],
            "1-2  05ac:1227  DFU  Mac14,2  j413ap  MacBook Air (M2, 2022)  ECID 0x001c30603ec0c01e  ApNonce 0a0b  SepNonce 0c"
        );
        assert!(
            lines[3].starts_with("1-3  05ac:1227  DFU  error: "),
            "{}",
            lines[3]
        );
        assert!(lines[3].contains("no permission"), "{}", lines[3]);
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn json_list() {
        let bus = FakeBus::default();
        bus.add(info(&[2], 0x1227), AIR, Some("NONC:0a0b"), vec![]);
        bus.add(
            info(&[3], 0x1227),
            AIR,
            None,
            vec![TransportError::Disconnected],
        );
        let mut out = Vec::new();
        list(&bus, &mut out, true).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let a = v.as_array().unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0]["location"], "1-2");
        assert_eq!(a[0]["vendor_id"], "0x05ac");
        assert_eq!(a[0]["product_id"], "0x1227");
        assert_eq!(a[0]["mode"], "dfu");
        assert_eq!(a[0]["product_type"], "Mac14,2");
        assert_eq!(a[0]["board_config"], "j413ap");
        assert_eq!(a[0]["ecid"], "0x001c30603ec0c01e");
        assert_eq!(a[0]["ap_nonce"], "0a0b");
        assert!(a[0].get("error").is_none());
        assert!(a[0].get("event").is_none());
        assert_eq!(a[1]["mode"], "dfu");
        assert!(a[1]["error"]
            .as_str()
            .unwrap()
            .contains("gone from the bus"));
        assert!(a[1].get("product_type").is_none());

        let empty = FakeBus::default();
        let mut out = Vec::new();
        list(&empty, &mut out, true).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "[]\n");
        let mut out = Vec::new();
        list(&empty, &mut out, false).unwrap();
        assert!(String::from_utf8(out)
            .unwrap()
            .starts_with("no Apple device"));
    }

    #[test]
    fn watch_json_lines() {
        let bus = FakeBus::default();
        bus.add(info(&[2], 0x1227), AIR, None, vec![]);
        let mut out = Vec::new();
        std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                let mut out = Vec::new();
                watch(&bus, &mut out, true, &no_retry()).unwrap();
                out
            });
            // Wait until the watcher has subscribed.
            while bus.watchers.lock().unwrap().is_empty() {
                std::thread::yield_now();
            }
            let tx = bus.watchers.lock().unwrap()[0].clone();
            // The already-present device arriving again (subscribe/list race): no duplicate.
            tx.send(HotplugEvent::Arrived(info(&[2], 0x1227))).unwrap();
            bus.add(
                info(&[5], 0xf014),
                "CPID:1 BDID:2A813200",
                Some("NONC:0102"),
                vec![],
            );
            tx.send(HotplugEvent::Arrived(info(&[5], 0xf014))).unwrap();
            tx.send(HotplugEvent::Left(info(&[2], 0x1227))).unwrap();
            // Not Apple: ignored.
            tx.send(HotplugEvent::Left(DeviceInfo {
                vendor_id: 0x1234,
                ..info(&[9], 1)
            }))
            .unwrap();
            drop(tx);
            bus.watchers.lock().unwrap().clear();
            out = watcher.join().unwrap();
        });
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0]["event"], "arrived");
        assert_eq!(lines[0]["location"], "1-2");
        assert_eq!(lines[0]["product_id"], "0x1227");
        assert_eq!(lines[0]["mode"], "dfu");
        assert_eq!(lines[0]["product_type"], "Mac14,2");
        assert_eq!(lines[1]["event"], "arrived");
        assert_eq!(lines[1]["mode"], "port_dfu");
        assert_eq!(lines[1]["product_id"], "0xf014");
        assert_eq!(lines[1]["board_config"], "j773gap");
        assert_eq!(lines[1]["ap_nonce_tss"], "0201");
        assert_eq!(
            lines[2],
            serde_json::json!({
                "event": "left",
                "location": "1-2",
                "vendor_id": "0x05ac",
                "product_id": "0x1227",
                "mode": "dfu"
            })
        );
        // Every line is exactly one JSON object with unique keys.
        assert!(
            text.lines().all(|l| l.matches("\"mode\"").count() == 1),
            "{text}"
        );
    }

    #[test]
    fn watch_retries_a_device_not_yet_accessible() {
        let bus = FakeBus::default();
        bus.add(
            info(&[2], 0x1227),
            AIR,
            None,
            vec![TransportError::Access, TransportError::Busy],
        );
        let options = WatchOptions {
            open_retries: 2,
            retry_delay: Duration::ZERO,
        };
        // Dropping the bus's senders once watch() has subscribed ends its event loop after the
        // initial listing.
        let bus_ref = &bus;
        let out = std::thread::scope(|s| {
            let h = s.spawn(move || {
                let mut out = Vec::new();
                watch(bus_ref, &mut out, false, &options).unwrap();
                out
            });
            while bus.watchers.lock().unwrap().is_empty() {
                std::thread::yield_now();
            }
            bus.watchers.lock().unwrap().clear();
            h.join().unwrap()
        });
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "arrived  1-2  05ac:1227  DFU  Mac14,2  j413ap  MacBook Air (M2, 2022)  ECID 0x001c30603ec0c01e\n"
        );

        // Without retries the error is shown.
        let bus = FakeBus::default();
        bus.add(info(&[2], 0x1227), AIR, None, vec![TransportError::Access]);
        let entry = probe_with_retries(&bus, info(&[2], 0x1227), &no_retry());
        assert_eq!(
            entry.identity.unwrap_err(),
            IdentityError::Transport(TransportError::Access)
        );
    }
}
