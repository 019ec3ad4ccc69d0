//! USB/IP server front end: exports [`SimDevice`]s so a Linux kernel's `vhci-hcd` sees them as
//! real USB devices (and libusb, the agent, the kernel's own enumeration all talk to them).
//!
//! Protocol v1.1.1 as the kernel's `usbip` tools speak it; every integer is big-endian.
//! Connection life cycle: a client sends OP_REQ_DEVLIST (answered, then closed) or
//! OP_REQ_IMPORT naming a bus id; after a successful import the same TCP connection carries
//! CMD_SUBMIT/CMD_UNLINK from the kernel and RET_SUBMIT/RET_UNLINK back.
//!
//! Each device is owned by one driver thread that executes URBs, keeps bulk transfers the device
//! NAKs pending (a pending IN must never complete empty: the host would read it as a
//! zero-length packet, which is protocol), and polls [`SimDevice::poll_link`] after every
//! transfer and every [`TICK`]. A `Detach` closes the device's connection, which the kernel
//! reports as an unplug; an `Attach` exports the device under the same bus id (its port) with
//! a new device number and, with [`ExportOptions::attach`], plugs it into the local vhci-hcd
//! again, preferring the vhci port it had before (a Mac re-enumerating stays on its physical
//! port). Remote clients (the agent's `usbip` module) do the same by bus id.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::wire::{Enumeration, LinkChange, Reply, Setup, SimDevice, Speed};

/// Protocol version 1.1.1.
pub const USBIP_VERSION: u16 = 0x0111;
pub const OP_REQ_DEVLIST: u16 = 0x8005;
pub const OP_REP_DEVLIST: u16 = 0x0005;
pub const OP_REQ_IMPORT: u16 = 0x8003;
pub const OP_REP_IMPORT: u16 = 0x0003;
pub const CMD_SUBMIT: u32 = 1;
pub const CMD_UNLINK: u32 = 2;
pub const RET_SUBMIT: u32 = 3;
pub const RET_UNLINK: u32 = 4;
/// URB status for a stalled endpoint.
pub const EPIPE: i32 = -32;
/// URB status for a request cancelled by CMD_UNLINK.
pub const ECONNRESET: i32 = -104;
/// OP_REP status: device not available.
const ST_NA: u32 = 1;

/// Size of `struct usbip_usb_device` on the wire.
pub const DEVICE_RECORD_LEN: usize = 312;
/// Size of every CMD_*/RET_* header.
pub const URB_HEADER_LEN: usize = 48;

/// Idle period between link polls and retries of pending transfers.
pub const TICK: Duration = Duration::from_millis(10);

/// Largest transfer buffer accepted from a client; anything larger is a corrupt stream.
const MAX_TRANSFER: u32 = 16 << 20;

/// `enum usb_device_speed` values used by USB/IP and the vhci `attach` file.
const SPEED_FULL: u32 = 2;
const SPEED_HIGH: u32 = 3;

/// vhci port state "free" in `status` (VDEV_ST_NULL).
const VHCI_PORT_FREE: &str = "004";

/// How long a re-attaching device waits for its previous vhci port to be released (by
/// vhci-hcd and by the USB core; a hub thread held up by a 5 s control timeout must not move
/// the device).
const SAME_PORT_WAIT: Duration = Duration::from_secs(20);

pub const DEFAULT_VHCI: &str = "/sys/devices/platform/vhci_hcd.0";

/// How [`serve`] exports its devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// Where to accept USB/IP clients (`127.0.0.1:3240` is the usbip default port).
    pub listen: SocketAddr,
    /// Also attach every device that is on the bus to the local vhci-hcd.
    pub attach: bool,
    /// The vhci-hcd sysfs directory (holds `status` and `attach`).
    pub vhci: PathBuf,
}

impl ExportOptions {
    pub fn new(listen: SocketAddr, attach: bool) -> Self {
        Self {
            listen,
            attach,
            vhci: PathBuf::from(DEFAULT_VHCI),
        }
    }
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self::new(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 3240),
            false,
        )
    }
}

/// Export `devices` and block serving them.
pub fn serve(devices: Vec<Box<dyn SimDevice>>, opts: ExportOptions) -> io::Result<()> {
    Server::bind(devices, opts)?.run()
}

/// A bound, not yet running server (lets callers learn the port before blocking).
pub struct Server {
    listener: TcpListener,
    devices: Vec<Box<dyn SimDevice>>,
    opts: ExportOptions,
}

impl Server {
    pub fn bind(devices: Vec<Box<dyn SimDevice>>, opts: ExportOptions) -> io::Result<Server> {
        let listener = TcpListener::bind(opts.listen)?;
        Ok(Server {
            listener,
            devices,
            opts,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Start the device drivers and accept clients forever.
    pub fn run(self) -> io::Result<()> {
        let mut local = self.listener.local_addr()?;
        if local.ip().is_unspecified() {
            local.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        let mut slots = Vec::with_capacity(self.devices.len());
        for (index, device) in self.devices.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let slot = Arc::new(Slot {
                busnum: index as u32 + 1,
                state: Mutex::new(SlotState::default()),
                to_driver: tx,
            });
            let attacher = self.opts.attach.then(|| Attacher {
                server: local,
                vhci: self.opts.vhci.clone(),
                last_port: Arc::new(Mutex::new(None)),
            });
            let driver = Driver {
                slot: slot.clone(),
                device,
                rx,
                conn: None,
                pending: VecDeque::new(),
                attacher,
            };
            std::thread::Builder::new()
                .name(format!("usbip-dev{}", index + 1))
                .spawn(move || driver.run())?;
            slots.push(slot);
        }
        let slots = Arc::new(slots);
        let mut next_conn = 0u64;
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("usbip: accept failed: {e}");
                    continue;
                }
            };
            next_conn += 1;
            let (slots, conn) = (slots.clone(), next_conn);
            std::thread::spawn(move || {
                if let Err(e) = handle_client(stream, &slots, conn) {
                    tracing::debug!("usbip: connection {conn} ended: {e}");
                }
            });
        }
        Ok(())
    }
}

/// What a device currently exports while it is on the bus.
#[derive(Debug, Clone)]
struct Export {
    busid: String,
    devnum: u32,
    generation: u64,
    enumeration: Enumeration,
}

#[derive(Debug, Default)]
struct SlotState {
    export: Option<Export>,
    /// A client holds the current export (it cannot be imported twice).
    imported: bool,
    generation: u64,
}

struct Slot {
    busnum: u32,
    state: Mutex<SlotState>,
    to_driver: Sender<ToDriver>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // The state is plain data, valid after any panic of a holder.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

enum ToDriver {
    Connected {
        conn: u64,
        generation: u64,
        stream: TcpStream,
    },
    Command {
        conn: u64,
        cmd: Command,
    },
    Closed {
        conn: u64,
    },
}

/// A decoded CMD_SUBMIT or CMD_UNLINK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Submit {
        seqnum: u32,
        devid: u32,
        /// Data stage device-to-host.
        dir_in: bool,
        /// Endpoint number without the direction bit.
        ep: u8,
        length: u32,
        setup: [u8; 8],
        /// OUT data (empty for IN).
        data: Vec<u8>,
    },
    Unlink {
        seqnum: u32,
        devid: u32,
        victim: u32,
    },
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_be_bytes(w)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Read one URB command from a client (the kernel's vhci-hcd).
pub fn read_command(r: &mut impl Read) -> io::Result<Command> {
    let mut h = [0u8; URB_HEADER_LEN];
    r.read_exact(&mut h)?;
    let (command, seqnum, devid) = (be32(&h, 0), be32(&h, 4), be32(&h, 8));
    let dir_in = be32(&h, 12) == 1;
    let ep = be32(&h, 16);
    match command {
        CMD_SUBMIT => {
            let length = be32(&h, 24);
            let packets = be32(&h, 32);
            if length > MAX_TRANSFER || ep > 15 {
                return Err(invalid(format!(
                    "CMD_SUBMIT with ep {ep} and length {length}: corrupt stream"
                )));
            }
            let mut data = vec![0u8; if dir_in { 0 } else { length as usize }];
            r.read_exact(&mut data)?;
            // Isochronous packet descriptors: not used by any simulated device; skip them so
            // the stream stays in sync.
            if packets != 0 && packets != u32::MAX {
                if packets > 1024 {
                    return Err(invalid(format!("CMD_SUBMIT with {packets} iso packets")));
                }
                io::copy(&mut r.take(u64::from(packets) * 16), &mut io::sink())?;
            }
            let mut setup = [0u8; 8];
            setup.copy_from_slice(&h[40..48]);
            Ok(Command::Submit {
                seqnum,
                devid,
                dir_in,
                ep: ep as u8,
                length,
                setup,
                data,
            })
        }
        CMD_UNLINK => Ok(Command::Unlink {
            seqnum,
            devid,
            victim: be32(&h, 20),
        }),
        other => Err(invalid(format!("unknown USB/IP command {other:#x}"))),
    }
}

/// RET_SUBMIT header plus IN data.
pub fn encode_ret_submit(seqnum: u32, status: i32, actual: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(URB_HEADER_LEN + data.len());
    for w in [RET_SUBMIT, seqnum, 0, 0, 0] {
        v.extend_from_slice(&w.to_be_bytes());
    }
    v.extend_from_slice(&status.to_be_bytes());
    // actual_length, start_frame, number_of_packets, error_count, 8 bytes padding
    for w in [actual, 0, 0, 0, 0, 0] {
        v.extend_from_slice(&w.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

pub fn encode_ret_unlink(seqnum: u32, status: i32) -> Vec<u8> {
    let mut v = Vec::with_capacity(URB_HEADER_LEN);
    for w in [RET_UNLINK, seqnum, 0, 0, 0] {
        v.extend_from_slice(&w.to_be_bytes());
    }
    v.extend_from_slice(&status.to_be_bytes());
    v.extend_from_slice(&[0u8; 24]);
    v
}

fn op_header(code: u16, status: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(8);
    v.extend_from_slice(&USBIP_VERSION.to_be_bytes());
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&status.to_be_bytes());
    v
}

/// The `usbip_usb_device` record for one export, as DEVLIST and IMPORT send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub path: String,
    pub busid: String,
    pub busnum: u32,
    pub devnum: u32,
    pub speed: u32,
    pub vendor_id: u16,
    pub product_id: u16,
    pub bcd_device: u16,
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
    pub configuration_value: u8,
    pub num_configurations: u8,
    pub num_interfaces: u8,
    /// (class, subclass, protocol) of each interface's alternate setting 0.
    pub interfaces: Vec<[u8; 3]>,
}

impl DeviceRecord {
    /// Built from what the device reports at enumeration; short or odd descriptors give zeros
    /// rather than a panic (the simulated device may be deliberately broken).
    pub fn from_enumeration(e: &Enumeration, busid: &str, busnum: u32, devnum: u32) -> Self {
        let dd = &e.device_descriptor;
        let at = |i: usize| dd.get(i).copied().unwrap_or(0);
        let config = e.configurations.first().map(Vec::as_slice).unwrap_or(&[]);
        let interfaces = interface_classes(config);
        DeviceRecord {
            path: format!("/sys/devices/platform/mac-sim/usb{busnum}/{busid}"),
            busid: busid.to_string(),
            busnum,
            devnum,
            speed: match e.speed {
                Speed::Full => SPEED_FULL,
                Speed::High => SPEED_HIGH,
            },
            vendor_id: e.vendor_id,
            product_id: e.product_id,
            bcd_device: u16::from_le_bytes([at(12), at(13)]),
            class: at(4),
            subclass: at(5),
            protocol: at(6),
            configuration_value: config.get(5).copied().unwrap_or(0),
            num_configurations: e.configurations.len().min(255) as u8,
            num_interfaces: config
                .get(4)
                .copied()
                .unwrap_or(interfaces.len().min(255) as u8),
            interfaces,
        }
    }

    pub fn devid(&self) -> u32 {
        (self.busnum << 16) | (self.devnum & 0xffff)
    }

    /// The 312-byte record, followed by 4 bytes per interface when `with_interfaces`
    /// (DEVLIST form).
    pub fn encode(&self, with_interfaces: bool) -> Vec<u8> {
        let mut v = Vec::with_capacity(DEVICE_RECORD_LEN + 4 * self.interfaces.len());
        let mut fixed = |s: &str, n: usize| {
            // NUL-terminated within the field, truncated if too long.
            let b = s.as_bytes();
            let k = b.len().min(n - 1);
            v.extend_from_slice(&b[..k]);
            v.resize(v.len() + n - k, 0);
        };
        fixed(&self.path, 256);
        fixed(&self.busid, 32);
        for w in [self.busnum, self.devnum, self.speed] {
            v.extend_from_slice(&w.to_be_bytes());
        }
        for h in [self.vendor_id, self.product_id, self.bcd_device] {
            v.extend_from_slice(&h.to_be_bytes());
        }
        v.extend_from_slice(&[
            self.class,
            self.subclass,
            self.protocol,
            self.configuration_value,
            self.num_configurations,
            self.num_interfaces,
        ]);
        if with_interfaces {
            for i in &self.interfaces {
                v.extend_from_slice(&[i[0], i[1], i[2], 0]);
            }
        }
        v
    }
}

/// Class triples of the alternate-setting-0 interfaces in a configuration descriptor.
fn interface_classes(config: &[u8]) -> Vec<[u8; 3]> {
    let mut out = Vec::new();
    let mut i = 0usize;
    while let (Some(&len), Some(&kind)) = (config.get(i), config.get(i + 1)) {
        if len < 2 {
            break; // a zero length would loop forever; the rest is garbage
        }
        if kind == 4 && len >= 9 {
            if let Some(d) = config.get(i..i + 9) {
                if d[3] == 0 {
                    out.push([d[5], d[6], d[7]]);
                }
            }
        }
        i += usize::from(len);
    }
    out
}

fn record_of(slot: &Slot, export: &Export) -> DeviceRecord {
    DeviceRecord::from_enumeration(
        &export.enumeration,
        &export.busid,
        slot.busnum,
        export.devnum,
    )
}

/// One client connection: a DEVLIST query, or an IMPORT followed by the URB stream.
fn handle_client(mut stream: TcpStream, slots: &[Arc<Slot>], conn: u64) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut h = [0u8; 8];
    stream.read_exact(&mut h)?;
    let version = u16::from_be_bytes([h[0], h[1]]);
    let code = u16::from_be_bytes([h[2], h[3]]);
    if version != USBIP_VERSION {
        tracing::warn!("usbip: client speaks version {version:#06x}, we speak 0x0111");
    }
    match code {
        OP_REQ_DEVLIST => {
            let mut body = Vec::new();
            let mut count = 0u32;
            for slot in slots {
                if let Some(export) = &slot.lock().export {
                    body.extend_from_slice(&record_of(slot, export).encode(true));
                    count += 1;
                }
            }
            let mut reply = op_header(OP_REP_DEVLIST, 0);
            reply.extend_from_slice(&count.to_be_bytes());
            reply.extend_from_slice(&body);
            stream.write_all(&reply)
        }
        OP_REQ_IMPORT => {
            let mut busid = [0u8; 32];
            stream.read_exact(&mut busid)?;
            let end = busid.iter().position(|&b| b == 0).unwrap_or(32);
            let wanted = String::from_utf8_lossy(&busid[..end]).into_owned();
            let found = slots.iter().find_map(|slot| {
                let mut st = slot.lock();
                let export = st.export.clone()?;
                if export.busid != wanted || st.imported {
                    return None;
                }
                st.imported = true;
                Some((slot.clone(), export))
            });
            let Some((slot, export)) = found else {
                tracing::info!("usbip: import of {wanted:?} refused: not exported or in use");
                return stream.write_all(&op_header(OP_REP_IMPORT, ST_NA));
            };
            let mut reply = op_header(OP_REP_IMPORT, 0);
            reply.extend_from_slice(&record_of(&slot, &export).encode(false));
            let hand_over = stream.write_all(&reply).and_then(|()| stream.try_clone());
            let writer = match hand_over {
                Ok(w) => w,
                Err(e) => {
                    slot.lock().imported = false;
                    return Err(e);
                }
            };
            tracing::info!("usbip: {wanted} imported (connection {conn})");
            let _ = slot.to_driver.send(ToDriver::Connected {
                conn,
                generation: export.generation,
                stream: writer,
            });
            let result = loop {
                match read_command(&mut stream) {
                    Ok(cmd) => {
                        if slot
                            .to_driver
                            .send(ToDriver::Command { conn, cmd })
                            .is_err()
                        {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            let _ = slot.to_driver.send(ToDriver::Closed { conn });
            result
        }
        other => Err(invalid(format!("unknown USB/IP operation {other:#06x}"))),
    }
}

/// A transfer the device has not finished yet.
struct Pending {
    seqnum: u32,
    ep: u8,
    dir_in: bool,
    length: u32,
    data: Vec<u8>,
}

/// Owns one device: executes its URBs in order and carries out its link changes.
struct Driver {
    slot: Arc<Slot>,
    device: Box<dyn SimDevice>,
    rx: Receiver<ToDriver>,
    conn: Option<(u64, TcpStream)>,
    pending: VecDeque<Pending>,
    attacher: Option<Attacher>,
}

impl Driver {
    fn run(mut self) {
        if self.device.attached() {
            self.attach();
        }
        loop {
            match self.rx.recv_timeout(TICK) {
                Ok(msg) => self.handle(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.service_pending();
            if let Some(change) = self.device.poll_link(Instant::now()) {
                match change {
                    LinkChange::Detach => self.detach(),
                    LinkChange::Attach => self.attach(),
                }
            }
        }
    }

    fn handle(&mut self, msg: ToDriver) {
        match msg {
            ToDriver::Connected {
                conn,
                generation,
                stream,
            } => {
                let current = self.slot.lock().export.as_ref().map(|e| e.generation);
                if current != Some(generation) {
                    // Imported just before the device left: that incarnation is gone.
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
                self.drop_connection();
                self.conn = Some((conn, stream));
                self.slot.lock().imported = true;
            }
            ToDriver::Closed { conn } => {
                if self.conn.as_ref().map(|c| c.0) == Some(conn) {
                    tracing::info!("usbip: client closed connection {conn}");
                    self.drop_connection();
                }
            }
            ToDriver::Command { conn, cmd } => {
                if self.conn.as_ref().map(|c| c.0) == Some(conn) {
                    self.execute(cmd);
                }
            }
        }
    }

    fn execute(&mut self, cmd: Command) {
        match cmd {
            Command::Submit {
                seqnum,
                dir_in,
                ep: 0,
                length,
                setup,
                data,
                ..
            } => {
                let setup = Setup::from_bytes(setup);
                let reply = if is_port_reset(&setup) {
                    // usbip-host's convention for forwarding a port reset.
                    self.device.reset();
                    Reply::Ack(Vec::new())
                } else {
                    self.device.control(&setup, &data)
                };
                let limit = length.min(u32::from(setup.length));
                let out = match reply {
                    Reply::Ack(mut d) if dir_in => {
                        d.truncate(limit as usize);
                        encode_ret_submit(seqnum, 0, d.len() as u32, &d)
                    }
                    Reply::Ack(_) => encode_ret_submit(seqnum, 0, data.len() as u32, &[]),
                    Reply::Stall => encode_ret_submit(seqnum, EPIPE, 0, &[]),
                    Reply::Nak => {
                        tracing::warn!("usbip: device NAKed control request {setup:?}; stalling");
                        encode_ret_submit(seqnum, EPIPE, 0, &[])
                    }
                };
                self.send(&out);
            }
            Command::Submit {
                seqnum,
                dir_in,
                ep,
                length,
                data,
                ..
            } => {
                self.pending.push_back(Pending {
                    seqnum,
                    ep,
                    dir_in,
                    length,
                    data,
                });
                self.service_pending();
            }
            Command::Unlink { seqnum, victim, .. } => {
                let status = match self.pending.iter().position(|p| p.seqnum == victim) {
                    Some(i) => {
                        self.pending.remove(i);
                        ECONNRESET
                    }
                    // Already completed (its RET_SUBMIT is on the wire) or never seen.
                    None => 0,
                };
                self.send(&encode_ret_unlink(seqnum, status));
            }
        }
    }

    /// Offer every pending transfer to the device once, in order; a NAK blocks later transfers
    /// on the same endpoint so their order is kept.
    fn service_pending(&mut self) {
        let mut blocked: Vec<(u8, bool)> = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            let p = &self.pending[i];
            let key = (p.ep, p.dir_in);
            if blocked.contains(&key) {
                i += 1;
                continue;
            }
            let reply = if p.dir_in {
                self.device.bulk_in(p.ep | 0x80, p.length as usize)
            } else {
                self.device.bulk_out(p.ep, &p.data)
            };
            let out = match reply {
                Reply::Nak => {
                    blocked.push(key);
                    i += 1;
                    continue;
                }
                Reply::Ack(mut d) if p.dir_in => {
                    d.truncate(p.length as usize);
                    encode_ret_submit(p.seqnum, 0, d.len() as u32, &d)
                }
                Reply::Ack(_) => encode_ret_submit(p.seqnum, 0, p.data.len() as u32, &[]),
                Reply::Stall => encode_ret_submit(p.seqnum, EPIPE, 0, &[]),
            };
            self.pending.remove(i);
            self.send(&out);
            if self.conn.is_none() {
                return;
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        if let Some((conn, stream)) = &mut self.conn {
            if let Err(e) = stream.write_all(bytes) {
                tracing::info!("usbip: connection {conn} lost while replying: {e}");
                self.drop_connection();
            }
        }
    }

    fn drop_connection(&mut self) {
        if let Some((_, stream)) = self.conn.take() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        self.pending.clear();
        self.slot.lock().imported = false;
    }

    fn detach(&mut self) {
        tracing::info!("usbip: device {} detaches", self.slot.busnum);
        self.drop_connection();
        self.slot.lock().export = None;
    }

    fn attach(&mut self) {
        self.drop_connection();
        let enumeration = self.device.enumeration();
        let export = {
            let mut st = self.slot.lock();
            st.generation += 1;
            // A new device number per incarnation, as a real re-enumeration gives; the bus id
            // names the physical port on a real usbipd (`1-1.2`), so it stays: clients use it
            // to keep a re-enumerating Mac on the same vhci port.
            let devnum = 1 + st.generation as u32;
            let export = Export {
                busid: format!("{}-1", self.slot.busnum),
                devnum,
                generation: st.generation,
                enumeration,
            };
            st.export = Some(export.clone());
            st.imported = false;
            export
        };
        tracing::info!(
            "usbip: exporting {:04x}:{:04x} as {}",
            export.enumeration.vendor_id,
            export.enumeration.product_id,
            export.busid
        );
        if let Some(attacher) = &self.attacher {
            let attacher = attacher.clone();
            let speed = match export.enumeration.speed {
                Speed::Full => SPEED_FULL,
                Speed::High => SPEED_HIGH,
            };
            let slot = self.slot.clone();
            let current = move || {
                slot.lock().export.as_ref().map(|e| e.generation) == Some(export.generation)
            };
            let busid = export.busid.clone();
            std::thread::spawn(move || attacher.attach(&busid, speed, current));
        }
    }
}

fn is_port_reset(s: &Setup) -> bool {
    s.request_type == 0x23 && s.request == 3 && s.value == 4
}

/// Plugs exports into the local vhci-hcd the way `usbip attach` does.
#[derive(Clone)]
struct Attacher {
    server: SocketAddr,
    vhci: PathBuf,
    /// The vhci port this device used last, so a re-enumeration keeps its location.
    last_port: Arc<Mutex<Option<u32>>>,
}

impl Attacher {
    /// Retries while `current` says this export is still the device's incarnation.
    fn attach(&self, busid: &str, speed: u32, current: impl Fn() -> bool) {
        for attempt in 1..=10 {
            if !current() {
                tracing::debug!("usbip: {busid} left the bus before it was attached");
                return;
            }
            match self.try_attach(busid, speed) {
                Ok(port) => {
                    tracing::info!("usbip: {busid} attached to vhci port {port}");
                    *self.last_port.lock().unwrap_or_else(|e| e.into_inner()) = Some(port);
                    return;
                }
                Err(e) => {
                    tracing::warn!("usbip: attaching {busid} (attempt {attempt}) failed: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        tracing::error!(
            "usbip: giving up attaching {busid}: check {}",
            vhci_hint(&self.vhci)
        );
    }

    fn try_attach(&self, busid: &str, speed: u32) -> io::Result<u32> {
        let mut s = TcpStream::connect(self.server)?;
        let mut req = op_header(OP_REQ_IMPORT, 0);
        let mut id = [0u8; 32];
        let n = busid.len().min(31);
        id[..n].copy_from_slice(&busid.as_bytes()[..n]);
        req.extend_from_slice(&id);
        s.write_all(&req)?;
        let mut h = [0u8; 8];
        s.read_exact(&mut h)?;
        if be32(&h, 4) != 0 {
            return Err(io::Error::other(format!("import of {busid} refused")));
        }
        let mut rec = [0u8; DEVICE_RECORD_LEN];
        s.read_exact(&mut rec)?;
        let devid = (be32(&rec, 288) << 16) | (be32(&rec, 292) & 0xffff);
        let preferred = *self.last_port.lock().unwrap_or_else(|e| e.into_inner());
        let port = self.free_port(speed, preferred)?;
        let line = format!("{port} {} {devid} {speed}", s.as_raw_fd());
        std::fs::write(self.vhci.join("attach"), line)?;
        // The kernel now holds its own reference to the socket; ours can close.
        Ok(port)
    }

    /// A free port of the right kind, the previous one if it frees up in time.
    ///
    /// Free means: vhci-hcd's `status` says so *and* the USB core has dropped the device it had
    /// there. vhci-hcd frees a port the moment the connection closes, before the hub thread
    /// has seen the disconnect; a device attached in that gap finds the port still "enabled"
    /// with the old device registered, and when the descriptors are the same (iBSS → iBEC)
    /// the kernel keeps the old device and reports nothing.
    fn free_port(&self, speed: u32, preferred: Option<u32>) -> io::Result<u32> {
        let hub = if speed >= 5 { "ss" } else { "hs" };
        let deadline = Instant::now() + SAME_PORT_WAIT;
        loop {
            let status = std::fs::read_to_string(self.vhci.join("status"))?;
            let free: Vec<u32> = free_ports(&status, hub)
                .into_iter()
                .filter(|&p| !self.usb_device_on(&status, p))
                .collect();
            match preferred {
                Some(p) if free.contains(&p) => return Ok(p),
                Some(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    return free.first().copied().ok_or_else(|| {
                        io::Error::other(format!("no free {hub} port on {}", self.vhci.display()))
                    })
                }
            }
        }
    }

    /// Is the USB core's device for vhci port `port` still registered (`usbB/B-P` below the
    /// vhci platform device, B the root hub of the port's kind)?
    fn usb_device_on(&self, status: &str, port: u32) -> bool {
        let Some((hub, rhport)) = root_hub_port(status, port) else {
            return false;
        };
        let Ok(dir) = std::fs::read_dir(&self.vhci) else {
            return false;
        };
        dir.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(bus) = name
                .strip_prefix("usb")
                .filter(|b| b.parse::<u32>().is_ok())
            else {
                return false;
            };
            let mbps: u32 = std::fs::read_to_string(e.path().join("speed"))
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            let kind = if mbps >= 5000 { "ss" } else { "hs" };
            mbps > 0 && kind == hub && e.path().join(format!("{bus}-{rhport}")).exists()
        })
    }
}

/// The hub kind and 1-based root-hub port of vhci port `port`: `status` lists each kind's
/// ports in order, so it is the row's position among the rows of its kind.
pub fn root_hub_port(status: &str, port: u32) -> Option<(String, u32)> {
    let rows: Vec<(String, u32)> = status
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                [hub @ ("hs" | "ss"), p, ..] => Some((hub.to_string(), p.parse().ok()?)),
                _ => None,
            }
        })
        .collect();
    let hub = rows.iter().find(|(_, p)| *p == port)?.0.clone();
    let index = rows
        .iter()
        .filter(|(h, _)| *h == hub)
        .position(|(_, p)| *p == port)?;
    Some((hub, u32::try_from(index).ok()? + 1))
}

/// Free port numbers of hub kind `hub` ("hs"/"ss") in a vhci `status` file.
pub fn free_ports(status: &str, hub: &str) -> Vec<u32> {
    status
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 2 && f[0] == hub && f[2] == VHCI_PORT_FREE {
                f[1].parse().ok()
            } else {
                None
            }
        })
        .collect()
}

/// Where a vhci sysfs directory is expected, for messages.
fn vhci_hint(path: &Path) -> String {
    format!(
        "{} (load it with `modprobe vhci-hcd`)",
        path.join("attach").display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enumeration() -> Enumeration {
        Enumeration {
            vendor_id: 0x05ac,
            product_id: 0x1227,
            speed: Speed::High,
            device_descriptor: vec![
                18, 1, 0x00, 0x02, 0, 0, 0, 64, 0xac, 0x05, 0x27, 0x12, 0x34, 0x12, 1, 2, 3, 1,
            ],
            configurations: vec![vec![
                9, 2, 27, 0, 1, 1, 0, 0x80, 250, // config 1, one interface
                9, 4, 0, 0, 0, 0xfe, 0x01, 0x02, 0, // DFU interface
                9, 0x21, 0x0b, 0, 0, 0x00, 0x08, 0x10, 0x01,
            ]],
        }
    }

    #[test]
    fn device_record_has_the_kernel_layout() {
        let r = DeviceRecord::from_enumeration(&enumeration(), "1-1", 1, 2);
        let b = r.encode(true);
        assert_eq!(b.len(), DEVICE_RECORD_LEN + 4);
        assert!(b[..256].starts_with(b"/sys/devices/platform/mac-sim/usb1/1-1\0"));
        assert_eq!(&b[256..260], b"1-1\0");
        assert_eq!(&b[288..300], &[0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3]);
        assert_eq!(&b[300..306], &[0x05, 0xac, 0x12, 0x27, 0x12, 0x34]);
        assert_eq!(&b[306..312], &[0, 0, 0, 1, 1, 1]);
        assert_eq!(&b[312..], &[0xfe, 0x01, 0x02, 0]);
        assert_eq!(r.devid(), 0x0001_0002);
        assert_eq!(r.encode(false).len(), DEVICE_RECORD_LEN);
    }

    #[test]
    fn device_record_survives_garbage_descriptors() {
        let mut e = enumeration();
        e.device_descriptor = vec![1];
        e.configurations = vec![vec![9, 2, 0, 0], vec![0, 4, 0]];
        let r = DeviceRecord::from_enumeration(&e, &"x".repeat(100), 9, 9);
        assert_eq!(r.class, 0);
        assert!(r.interfaces.is_empty());
        assert_eq!(r.num_configurations, 2);
        assert_eq!(r.encode(true).len(), DEVICE_RECORD_LEN);
        assert_eq!(interface_classes(&[0, 0, 0]), Vec::<[u8; 3]>::new());
        assert_eq!(
            interface_classes(&[9, 4, 0, 0, 0, 1]),
            Vec::<[u8; 3]>::new()
        );
    }

    #[test]
    fn ret_messages_are_48_byte_headers() {
        let r = encode_ret_submit(7, EPIPE, 0, &[]);
        assert_eq!(r.len(), 48);
        assert_eq!(&r[0..8], &[0, 0, 0, 3, 0, 0, 0, 7]);
        assert_eq!(&r[20..24], &(-32i32).to_be_bytes());
        let r = encode_ret_submit(8, 0, 2, &[0xaa, 0xbb]);
        assert_eq!(&r[24..28], &[0, 0, 0, 2]);
        assert_eq!(&r[48..], &[0xaa, 0xbb]);
        let u = encode_ret_unlink(9, ECONNRESET);
        assert_eq!(u.len(), 48);
        assert_eq!(&u[0..8], &[0, 0, 0, 4, 0, 0, 0, 9]);
        assert_eq!(&u[20..24], &[0xff, 0xff, 0xff, 0x98]);
    }

    #[test]
    fn read_command_decodes_submit_and_unlink() {
        let mut m = Vec::new();
        for w in [1u32, 5, 0x10002, 0, 4, 0, 3, 0, 0, 0] {
            m.extend_from_slice(&w.to_be_bytes());
        }
        m.extend_from_slice(&[0x40, 1, 0, 0, 0, 0, 3, 0]);
        m.extend_from_slice(&[1, 2, 3]);
        for w in [2u32, 6, 0x10002, 0, 0, 5, 0, 0, 0, 0, 0, 0] {
            m.extend_from_slice(&w.to_be_bytes());
        }
        let mut r = &m[..];
        assert_eq!(
            read_command(&mut r).unwrap(),
            Command::Submit {
                seqnum: 5,
                devid: 0x10002,
                dir_in: false,
                ep: 4,
                length: 3,
                setup: [0x40, 1, 0, 0, 0, 0, 3, 0],
                data: vec![1, 2, 3],
            }
        );
        assert_eq!(
            read_command(&mut r).unwrap(),
            Command::Unlink {
                seqnum: 6,
                devid: 0x10002,
                victim: 5
            }
        );
        assert_eq!(
            read_command(&mut r).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn read_command_rejects_corrupt_headers() {
        let mut m = Vec::new();
        for w in [1u32, 5, 0, 0, 0, 0, MAX_TRANSFER + 1, 0, 0, 0, 0, 0] {
            m.extend_from_slice(&w.to_be_bytes());
        }
        assert_eq!(
            read_command(&mut &m[..]).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let mut m = [0u8; 48];
        m[3] = 9;
        assert_eq!(
            read_command(&mut &m[..]).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn free_ports_reads_the_vhci_status_table() {
        let status = "hub port sta spd dev      sockfd local_busid\n\
            hs  0000 006 003 00010002 000003 1-1\n\
            hs  0001 004 000 00000000 000000 0-0\n\
            hs  0002 004 000 00000000 000000 0-0\n\
            ss  0008 004 000 00000000 000000 0-0\n";
        assert_eq!(free_ports(status, "hs"), vec![1, 2]);
        assert_eq!(free_ports(status, "ss"), vec![8]);
        assert!(free_ports("garbage\n\n", "hs").is_empty());
        assert_eq!(root_hub_port(status, 0), Some(("hs".to_string(), 1)));
        assert_eq!(root_hub_port(status, 2), Some(("hs".to_string(), 3)));
        assert_eq!(root_hub_port(status, 8), Some(("ss".to_string(), 1)));
        assert_eq!(root_hub_port(status, 9), None);
    }

    #[test]
    fn a_freed_port_is_not_used_while_the_usb_core_still_has_its_device() {
        let dir = std::env::temp_dir().join(format!("mac-sim-vhci-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("usb3/3-1")).unwrap();
        std::fs::write(dir.join("usb3/speed"), "480\n").unwrap();
        std::fs::create_dir_all(dir.join("usb4")).unwrap();
        std::fs::write(dir.join("usb4/speed"), "5000\n").unwrap();
        std::fs::write(
            dir.join("status"),
            "hub port sta spd dev      sockfd local_busid\n\
             hs  0000 004 000 00000000 000000 0-0\n\
             hs  0001 004 000 00000000 000000 0-0\n\
             ss  0002 004 000 00000000 000000 0-0\n",
        )
        .unwrap();
        let a = Attacher {
            server: "127.0.0.1:1".parse().unwrap(),
            vhci: dir.clone(),
            last_port: Arc::default(),
        };
        // Port 0 is free in the table but its old device (3-1) is still registered.
        assert_eq!(a.free_port(SPEED_HIGH, None).unwrap(), 1);
        std::fs::remove_dir_all(dir.join("usb3/3-1")).unwrap();
        assert_eq!(a.free_port(SPEED_HIGH, Some(0)).unwrap(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
