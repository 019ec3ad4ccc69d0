//! USB/IP client: Macs plugged into a remote machine's `usbipd` (or the simulated Macs of
//! `mac-sim world`) appear on this station's USB bus through the kernel's vhci-hcd, exactly as
//! if they were on a local cable.
//!
//! [`wire`] is the sans-IO protocol half; this module is the edge: it polls each server's
//! device list, imports every device not attached here yet, and hands the connected socket to
//! `/sys/devices/platform/vhci_hcd.0/attach` — from then on the kernel speaks CMD_SUBMIT over
//! it. A Mac re-enumerating (DFU → iBoot → restore mode) is, on a real usbipd, the old device
//! leaving and a new one (same bus id = physical port, new device number) arriving; the server
//! closes the old connection, the kernel reports an unplug, and the next poll imports the new
//! device — on the vhci port the bus id had before, so the agent sees one USB location.

pub mod ports;
pub mod wire;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use thiserror::Error;

pub use ports::Attached;
use ports::PortChoice;
pub use wire::{Exported, UsbipWireError, VhciPort};

pub const DEFAULT_VHCI: &str = "/sys/devices/platform/vhci_hcd.0";

#[derive(Debug, Error)]
pub enum UsbipError {
    #[error("USB/IP server {server}: {source} (is usbipd running there, and is TCP port 3240 reachable?)")]
    Connect {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("USB/IP server {server}: {source}")]
    Io {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("USB/IP server {server}: {source}")]
    Wire {
        server: String,
        #[source]
        source: UsbipWireError,
    },
    #[error("vhci-hcd ({path}): {source}; load the vhci-hcd kernel module")]
    Vhci {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("vhci-hcd has no free {0} port for another device; detach one first")]
    NoFreePort(&'static str),
}

#[derive(Debug, Clone)]
pub struct UsbipConfig {
    /// `host:port` of each server (port 3240 when omitted).
    pub servers: Vec<String>,
    pub vhci: PathBuf,
    /// How often each server's device list is read.
    pub poll: Duration,
    /// How long a re-enumerated device waits for its previous vhci port to be released (by
    /// vhci-hcd and by the USB core, see [`ports`]) before it takes another one.
    pub same_port_wait: Duration,
    pub io_timeout: Duration,
}

impl Default for UsbipConfig {
    fn default() -> Self {
        UsbipConfig {
            servers: Vec::new(),
            vhci: PathBuf::from(DEFAULT_VHCI),
            poll: Duration::from_millis(200),
            // Longer than the hub thread can be held up: a reset of a departing device costs
            // it 5 s control timeouts (seen in the VM demo), and moving the Mac to another
            // port would not make it appear any sooner.
            same_port_wait: Duration::from_secs(20),
            io_timeout: Duration::from_secs(5),
        }
    }
}

pub struct UsbipClient {
    cfg: UsbipConfig,
    /// (server, bus id) → the incarnation attached last.
    attached: HashMap<(String, String), Attached>,
    /// Servers whose last poll failed (logged once per outage).
    failing: HashMap<String, String>,
    /// Devices to import that wait for a usable port.
    waiting: HashMap<(String, String), PortWait>,
}

/// A device's wait for a usable vhci port.
struct PortWait {
    since: Instant,
    /// The wait was logged (once per wait).
    said: bool,
}

impl UsbipClient {
    pub fn new(cfg: UsbipConfig) -> Self {
        UsbipClient {
            cfg,
            attached: HashMap::new(),
            failing: HashMap::new(),
            waiting: HashMap::new(),
        }
    }

    /// Run forever on a thread of its own.
    pub fn spawn(cfg: UsbipConfig) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("usbip-client".into())
            .spawn(move || {
                let mut c = UsbipClient::new(cfg);
                c.ensure_vhci();
                loop {
                    c.poll_all();
                    std::thread::sleep(c.cfg.poll);
                }
            })
    }

    /// vhci-hcd has no device to match by modalias, so nothing loads it on demand.
    fn ensure_vhci(&self) {
        if self.cfg.vhci.exists() {
            return;
        }
        match std::process::Command::new("modprobe")
            .arg("vhci-hcd")
            .status()
        {
            Ok(s) if s.success() => tracing::info!("usbip: loaded vhci-hcd"),
            Ok(s) => tracing::warn!("usbip: modprobe vhci-hcd failed ({s})"),
            Err(e) => tracing::warn!("usbip: cannot run modprobe vhci-hcd: {e}"),
        }
    }

    /// One round over every server; errors are logged (once per outage), not fatal.
    pub fn poll_all(&mut self) {
        for server in self.cfg.servers.clone() {
            match self.poll(&server) {
                Ok(()) => {
                    if self.failing.remove(&server).is_some() {
                        tracing::info!("usbip: {server} reachable again");
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    if self.failing.get(&server) != Some(&text) {
                        tracing::warn!("usbip: {text}");
                        self.failing.insert(server.clone(), text);
                    }
                }
            }
        }
    }

    /// Import every device of `server` that is new, or whose connection the kernel dropped,
    /// as soon as a vhci port is usable for it. A device waiting for its previous port (see
    /// [`ports`]) is looked at again on the next poll; it never holds up the others.
    pub fn poll(&mut self, server: &str) -> Result<(), UsbipError> {
        let list = self.devlist(server)?;
        // A device that left the server while waiting for a port starts a new wait when it
        // comes back.
        self.waiting
            .retain(|k, _| k.0 != server || list.iter().any(|d| d.busid == k.1));
        let mut rows = self.vhci_ports()?;
        for dev in list {
            let key = (server.to_string(), dev.busid.clone());
            let current = self.attached.get(&key).copied();
            if !ports::needs_import(current, dev.devid(), &rows) {
                self.waiting.remove(&key);
                continue;
            }
            let hub = wire::hub_for_speed(dev.speed);
            let preferred = current.map(|a| a.port);
            let since = self
                .waiting
                .entry(key.clone())
                .or_insert_with(|| PortWait {
                    since: Instant::now(),
                    said: false,
                })
                .since;
            let keep_waiting = since.elapsed() < self.cfg.same_port_wait;
            let lingering = |port| self.kernel_device_at(&rows, port);
            let port = match ports::choose_port(&rows, hub, preferred, lingering, keep_waiting) {
                PortChoice::Use(port) => port,
                PortChoice::Wait => {
                    if let Some(w) = self.waiting.get_mut(&key).filter(|w| !w.said) {
                        tracing::debug!(
                            "usbip: {server} {} waits for its vhci port {} to come free (in vhci-hcd and in the USB core)",
                            dev.busid,
                            preferred.unwrap_or_default()
                        );
                        w.said = true;
                    }
                    continue;
                }
                PortChoice::NoneFree => return Err(UsbipError::NoFreePort(hub)),
            };
            match self.import(server, &dev, port) {
                Ok(a) => {
                    tracing::info!(
                        "usbip: {server} {} ({:04x}:{:04x}) attached on vhci port {}",
                        dev.busid,
                        dev.vendor_id,
                        dev.product_id,
                        a.port
                    );
                    if preferred.is_some_and(|p| p != a.port) {
                        tracing::warn!(
                            "usbip: {server} {} moved from vhci port {} to {}: its old port did not come free within {:?}",
                            dev.busid,
                            preferred.unwrap_or_default(),
                            a.port,
                            self.cfg.same_port_wait
                        );
                    }
                    self.attached.insert(key.clone(), a);
                    self.waiting.remove(&key);
                    // The port just used is not free any more.
                    rows = self.vhci_ports()?;
                }
                // Refused: another client holds it, or our kernel still holds the previous
                // connection; the next poll tries again.
                Err(UsbipError::Wire {
                    source: UsbipWireError::ImportRefused { .. },
                    ..
                }) => tracing::debug!("usbip: {server} {} busy", dev.busid),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn connect(&self, server: &str) -> Result<TcpStream, UsbipError> {
        let with_port = if server
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            server.to_string()
        } else {
            format!("{server}:3240")
        };
        let err = |source| UsbipError::Connect {
            server: server.to_string(),
            source,
        };
        let addr: SocketAddr = with_port
            .to_socket_addrs()
            .map_err(err)?
            .next()
            .ok_or_else(|| err(std::io::Error::other("no address")))?;
        let s = TcpStream::connect_timeout(&addr, self.cfg.io_timeout).map_err(err)?;
        let io = |source| UsbipError::Io {
            server: server.to_string(),
            source,
        };
        s.set_read_timeout(Some(self.cfg.io_timeout)).map_err(io)?;
        s.set_write_timeout(Some(self.cfg.io_timeout)).map_err(io)?;
        s.set_nodelay(true).map_err(io)?;
        Ok(s)
    }

    pub fn devlist(&self, server: &str) -> Result<Vec<Exported>, UsbipError> {
        let mut s = self.connect(server)?;
        let io = |source| UsbipError::Io {
            server: server.to_string(),
            source,
        };
        s.write_all(&wire::devlist_request()).map_err(io)?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).map_err(io)?;
            buf.extend_from_slice(&chunk[..n]);
            let parsed = wire::parse_devlist(&buf).map_err(|source| UsbipError::Wire {
                server: server.to_string(),
                source,
            })?;
            match parsed {
                Some(list) => return Ok(list),
                None if n == 0 => {
                    return Err(io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the device list ended early",
                    )))
                }
                None => {}
            }
        }
    }

    fn vhci_ports(&self) -> Result<Vec<VhciPort>, UsbipError> {
        let path = self.cfg.vhci.join("status");
        std::fs::read_to_string(&path)
            .map(|t| wire::parse_vhci_status(&t))
            .map_err(|source| UsbipError::Vhci {
                path: path.display().to_string(),
                source,
            })
    }

    /// Import `dev` and hand its connection to vhci-hcd on `port`.
    fn import(&self, server: &str, dev: &Exported, port: u32) -> Result<Attached, UsbipError> {
        let mut s = self.connect(server)?;
        let io = |source| UsbipError::Io {
            server: server.to_string(),
            source,
        };
        s.write_all(&wire::import_request(&dev.busid)).map_err(io)?;
        // Read exactly the reply: whatever follows belongs to the kernel.
        let mut buf = vec![0u8; wire::IMPORT_REPLY_LEN];
        let mut got = 0;
        let imported = loop {
            let n = s.read(&mut buf[got..]).map_err(io)?;
            got += n;
            let parsed =
                wire::parse_import(&buf[..got], &dev.busid).map_err(|source| UsbipError::Wire {
                    server: server.to_string(),
                    source,
                })?;
            match parsed {
                Some(d) => break d,
                None if n == 0 => {
                    return Err(io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the import reply ended early",
                    )))
                }
                None => {}
            }
        };
        let line = wire::attach_line(port, s.as_raw_fd(), imported.devid(), imported.speed);
        let attach = self.cfg.vhci.join("attach");
        std::fs::write(&attach, line).map_err(|source| UsbipError::Vhci {
            path: attach.display().to_string(),
            source,
        })?;
        // The kernel holds its own reference to the socket now; ours may close.
        Ok(Attached {
            devid: imported.devid(),
            port,
        })
    }

    /// Does the USB core still have a device on vhci port `port`? Its sysfs directory
    /// (`usbB/B-P` under the vhci platform device) exists from enumeration until the hub thread
    /// handled the disconnect. When the layout is not what we know, say no: the old behaviour
    /// (trust the `status` table) is better than never attaching.
    fn kernel_device_at(&self, rows: &[VhciPort], port: u32) -> bool {
        let Some((hub, rhport)) = ports::root_hub_port(rows, port) else {
            return false;
        };
        let Ok(entries) = std::fs::read_dir(&self.cfg.vhci) else {
            return false;
        };
        entries.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(bus) = name
                .strip_prefix("usb")
                .filter(|b| b.parse::<u32>().is_ok())
            else {
                return false;
            };
            let speed = std::fs::read_to_string(e.path().join("speed")).unwrap_or_default();
            ports::hub_of_root_speed(&speed) == Some(hub)
                && e.path().join(format!("{bus}-{rhport}")).exists()
        })
    }
}
