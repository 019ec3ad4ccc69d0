//! The edge that runs a [`Mux`] over a real (or simulated) USB device, for tokio.
//!
//! Layout: two blocking threads and no task. The reader thread waits on bulk IN and feeds each
//! transfer to the mux itself; the writer thread pulls the mux's next bulk OUT transfer, writes
//! it, and when there is nothing to send sleeps until it is kicked or the mux's ACK timer is
//! due. Each connection is a [`MuxStream`] (`AsyncRead + AsyncWrite`) that calls into the mux
//! directly under a short lock and kicks the writer; backpressure is the mux's own (its
//! `send`/`recv` return 0 and the `Readable`/`Writable` events wake the stream).
//!
//! Nothing hops through a queue or a task on the way: at USB line rate the image is ~1 300
//! mux packets a second, and a thread wake-up per packet and direction cost more host CPU
//! than the packets themselves. The only copies of the payload are the stream's write into
//! the connection buffer and the mux building each transfer from it.
//!
//! When the transport offers a second handle ([`UsbTransport::bulk_handle`]) the reader owns it
//! and reads and writes overlap freely. Otherwise the two threads take turns on the one handle
//! behind a mutex: the reader polls with a short timeout and steps aside whenever the writer
//! is waiting, which bounds a write's wait to one poll — correct, but slower.
//!
//! Only what the restore asks for is opened: no preflight connection, and never Apple's
//! GET_MODE/SET_MODE vendor requests (§6.1, §6.8).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use super::{ConnError, ConnId, Event, Mux, MuxConfig, MuxError, RX_TRANSFER_SIZE};
use crate::usb::descriptor::{self, ConfigDescriptor, DescriptorError};
use crate::usb::{TransportError, UsbTransport};

/// The usbmux interface of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MuxInterface {
    pub configuration: u8,
    pub interface: u8,
    /// Bulk IN endpoint address (with the direction bit).
    pub ep_in: u8,
    /// Bulk OUT endpoint address (without the direction bit).
    pub ep_out: u8,
    pub out_max_packet_size: u16,
}

/// Picks the usbmux interface: configurations from the highest value down, the first alt-0
/// interface with class 0xFF, subclass 0xFE, protocol 0x02 and exactly two bulk endpoints
/// (one IN, one OUT). usbmuxd accepts any one of the three class values (an OR); we require
/// all three so no other vendor interface is ever taken for the mux.
pub fn find_interface(configs: &[ConfigDescriptor]) -> Option<MuxInterface> {
    let mut sorted: Vec<&ConfigDescriptor> = configs.iter().collect();
    sorted.sort_by_key(|c| std::cmp::Reverse(c.configuration_value));
    for config in sorted {
        for iface in &config.interfaces {
            let Some(alt) = iface.alt_settings.iter().find(|a| a.alternate_setting == 0) else {
                continue;
            };
            if (alt.class, alt.subclass, alt.protocol) != (0xFF, 0xFE, 0x02) {
                continue;
            }
            if alt.endpoints.len() != 2 || alt.endpoints.iter().any(|e| e.transfer_type() != 2) {
                continue;
            }
            let ep_in = alt.endpoints.iter().find(|e| e.is_in());
            let ep_out = alt.endpoints.iter().find(|e| !e.is_in());
            if let (Some(i), Some(o)) = (ep_in, ep_out) {
                return Some(MuxInterface {
                    configuration: config.configuration_value,
                    interface: iface.number,
                    ep_in: i.address,
                    ep_out: o.address & 0x7F,
                    out_max_packet_size: o.max_packet_size & 0x7FF,
                });
            }
        }
    }
    None
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("cannot read the restore-mode Mac's USB descriptors: {0}")]
    Descriptor(#[from] DescriptorError),
    #[error(
        "the device has no usbmux interface (class FF/FE/02 with two bulk endpoints): it is not \
         a Mac in restore mode; check that the boot chain reached bootx"
    )]
    NoInterface,
    #[error("cannot set up the usbmux interface: {0}")]
    Transport(#[from] TransportError),
    #[error(
        "the Mac did not complete the usbmux handshake within {0:?}: the restore ramdisk may not \
         have started; replug the cable and restore from DFU again"
    )]
    HandshakeTimeout(Duration),
    #[error("usbmux failed: {0}")]
    Mux(#[from] MuxError),
    #[error("the Mac left USB during the usbmux handshake: {0}")]
    Gone(String),
}

/// Tunables of the edge.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Mux settings; `out_max_packet_size` is replaced by the endpoint's value.
    pub mux: MuxConfig,
    /// Bulk IN poll timeout with a handle of its own (bounds only how fast the reader notices
    /// a shutdown; long, because a timed-out transfer may lose a partial packet).
    pub read_poll: Duration,
    /// Bulk IN poll timeout when reader and writer share one handle: the longest a write waits
    /// for the reader to step aside.
    pub shared_read_poll: Duration,
    /// Bulk OUT timeout: a device that takes longer to accept 48 KiB is stuck.
    pub write_timeout: Duration,
    pub handshake_timeout: Duration,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            mux: MuxConfig {
                // usbmuxd's 64 KiB counts bytes in flight, so it can never fill the 128 KiB
                // window a Mac advertises (usbmuxd traces: `window=131072[512]`); with room
                // for two windows the next packets are ready the moment an ACK arrives.
                outbound_capacity: 262_144,
                ..MuxConfig::default()
            },
            read_poll: Duration::from_millis(200),
            shared_read_poll: Duration::from_millis(5),
            write_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Selects, configures and claims the usbmux interface.
pub fn claim(transport: &mut dyn UsbTransport) -> Result<MuxInterface, EdgeError> {
    let device = descriptor::read_device_descriptor(transport)?;
    let mut configs = Vec::new();
    for index in 0..device.num_configurations {
        configs.push(descriptor::read_config_descriptor(transport, index)?);
    }
    let iface = find_interface(&configs).ok_or(EdgeError::NoInterface)?;
    transport.set_configuration(iface.configuration)?;
    transport.claim_interface(iface.interface, 0)?;
    info!(?iface, "usbmux interface claimed");
    Ok(iface)
}

#[derive(Default)]
struct ConnSlot {
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    connect: Option<oneshot::Sender<io::Result<()>>>,
}

struct Core {
    mux: Mux,
    conns: HashMap<ConnId, ConnSlot>,
    /// Why the link is dead, once it is.
    failed: Option<String>,
}

impl Core {
    fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            warn!("usbmux link lost: {why}");
            self.failed = Some(why.clone());
        }
        for (_, slot) in self.conns.iter_mut() {
            wake(&mut slot.read_waker);
            wake(&mut slot.write_waker);
            if let Some(tx) = slot.connect.take() {
                let _ = tx.send(Err(gone(&why)));
            }
        }
    }

    fn dispatch_events(&mut self, ready: &watch::Sender<Option<u32>>) {
        while let Some(ev) = self.mux.poll_event() {
            match ev {
                Event::Ready { version } => {
                    info!(version, "usbmux ready");
                    let _ = ready.send(Some(version));
                }
                Event::Connected(id) => {
                    if let Some(tx) = self.conns.get_mut(&id).and_then(|s| s.connect.take()) {
                        let _ = tx.send(Ok(()));
                    }
                }
                Event::Refused { conn, port, reason } => {
                    if let Some(slot) = self.conns.remove(&conn) {
                        if let Some(tx) = slot.connect {
                            let _ = tx.send(Err(io::Error::new(
                                io::ErrorKind::ConnectionRefused,
                                format!(
                                    "the Mac refused a connection to port {port}{}",
                                    suffix(&reason)
                                ),
                            )));
                        }
                    }
                }
                Event::Readable(id) => {
                    if let Some(s) = self.conns.get_mut(&id) {
                        wake(&mut s.read_waker);
                    }
                }
                Event::Writable(id) => {
                    if let Some(s) = self.conns.get_mut(&id) {
                        wake(&mut s.write_waker);
                    }
                }
                Event::Closed { conn, reason } => {
                    debug!(%conn, %reason, "mux connection closed by the Mac");
                    if let Some(s) = self.conns.get_mut(&conn) {
                        wake(&mut s.read_waker);
                        wake(&mut s.write_waker);
                        if let Some(tx) = s.connect.take() {
                            let _ = tx.send(Err(io::Error::new(
                                io::ErrorKind::ConnectionReset,
                                format!("the Mac reset the connection{}", suffix(&reason)),
                            )));
                        }
                    }
                }
                Event::Control { level, text } => {
                    debug!(?level, %text, "usbmux control message");
                }
            }
        }
    }
}

fn suffix(reason: &str) -> String {
    let r = reason.trim();
    if r.is_empty() {
        String::new()
    } else {
        format!(": {r}")
    }
}

fn wake(w: &mut Option<Waker>) {
    if let Some(w) = w.take() {
        w.wake();
    }
}

fn gone(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        format!("the Mac's USB link is gone ({why}); check the cable and the Mac, then restart from DFU"),
    )
}

struct Shared {
    core: Mutex<Core>,
    ready: watch::Sender<Option<u32>>,
    /// Published by the writer whenever it found nothing left to send: (idle pass number,
    /// true). [`MuxHandle::close`] waits on it so the last bytes (restored's
    /// `ReceivedFinalStatusMsg`, a connection's close) reach the Mac before the link stops.
    flushed: watch::Sender<(u64, bool)>,
    stop: AtomicBool,
    /// Something may be ready to send: the writer must look again before it sleeps.
    kicked: AtomicBool,
    writer: OnceLock<thread::Thread>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock is a bug in the mux; keep serving what is left.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the writer after anything that may have given the mux something to send (new
    /// data, an ACK that opened the window, a close, a timer to re-arm). Cheap when the writer
    /// is busy: it only sets a flag.
    fn kick(&self) {
        self.kicked.store(true, Ordering::Release);
        if let Some(t) = self.writer.get() {
            t.unpark();
        }
    }

    /// Stops both threads; what is still queued is dropped.
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// The link is dead (device gone, protocol error): fail every stream, wake a handshake
    /// still waiting, stop both threads.
    fn fail(&self, why: String) {
        let mut core = self.lock();
        core.fail(why);
        core.dispatch_events(&self.ready);
        drop(core);
        self.ready.send_modify(|_| {});
        self.stop();
    }
}

/// Stops the link when the last handle and stream are gone, so the threads never outlive it.
struct Guard(Arc<Shared>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.lock().fail("the host closed the usbmux link".into());
        self.0.stop();
    }
}

/// A running usbmux link. Cheap to clone; [`MuxHandle::shutdown`] stops it, and so does
/// dropping the last handle and stream.
#[derive(Clone)]
pub struct MuxHandle {
    shared: Arc<Shared>,
    guard: Arc<Guard>,
    version: u32,
}

impl std::fmt::Debug for MuxHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxHandle")
            .field("version", &self.version)
            .finish()
    }
}

impl MuxHandle {
    /// Claims the usbmux interface of `transport`, starts the I/O threads and waits for the
    /// handshake. Must be called inside a tokio runtime.
    pub async fn open(
        mut transport: Box<dyn UsbTransport>,
        config: EdgeConfig,
    ) -> Result<MuxHandle, EdgeError> {
        let (transport, iface) = tokio::task::spawn_blocking(move || {
            let r = claim(transport.as_mut());
            (transport, r)
        })
        .await
        .map_err(|e| EdgeError::Gone(e.to_string()))?;
        let iface = iface?;
        let mut mux_config = config.mux.clone();
        mux_config.out_max_packet_size = usize::from(iface.out_max_packet_size);
        let (ready_tx, mut ready_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                mux: Mux::new(mux_config),
                conns: HashMap::new(),
                failed: None,
            }),
            ready: ready_tx,
            flushed: watch::channel((0, false)).0,
            stop: AtomicBool::new(false),
            kicked: AtomicBool::new(true),
            writer: OnceLock::new(),
        });
        let (reader, writer, poll) = match transport.bulk_handle() {
            Some(second) => (Bulk::Own(second), Bulk::Own(transport), config.read_poll),
            None => {
                debug!("transport offers no second handle; reads and writes take turns");
                let t = Arc::new(Mutex::new(transport));
                let waiting = Arc::new(AtomicUsize::new(0));
                (
                    Bulk::Shared(t.clone(), waiting.clone()),
                    Bulk::Shared(t, waiting),
                    config.shared_read_poll,
                )
            }
        };
        spawn_reader(reader, &shared, iface.ep_in, poll);
        spawn_writer(writer, &shared, iface.ep_out, config.write_timeout);

        let wait = async {
            loop {
                if let Some(v) = *ready_rx.borrow_and_update() {
                    return Ok(v);
                }
                if let Some(why) = shared.lock().failed.clone() {
                    return Err(EdgeError::Gone(why));
                }
                if ready_rx.changed().await.is_err() {
                    return Err(EdgeError::Gone("the usbmux threads stopped".into()));
                }
            }
        };
        let version = match tokio::time::timeout(config.handshake_timeout, wait).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                shared.stop();
                return Err(e);
            }
            Err(_) => {
                shared.stop();
                return Err(EdgeError::HandshakeTimeout(config.handshake_timeout));
            }
        };
        let guard = Arc::new(Guard(shared.clone()));
        Ok(MuxHandle {
            shared,
            guard,
            version,
        })
    }

    /// The device's usbmux major version (1 or 2).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Opens a connection to `port` on the Mac.
    pub async fn connect(&self, port: u16) -> io::Result<MuxStream> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut core = self.shared.lock();
            if let Some(why) = &core.failed {
                return Err(gone(why));
            }
            let id = core.mux.connect(port).map_err(|e| match e {
                MuxError::Failed => gone("the link failed earlier"),
                other => io::Error::other(other.to_string()),
            })?;
            core.conns.insert(
                id,
                ConnSlot {
                    connect: Some(tx),
                    ..ConnSlot::default()
                },
            );
            id
        };
        self.shared.kick();
        let stream = MuxStream {
            shared: self.shared.clone(),
            _guard: self.guard.clone(),
            id,
            port,
            closed: false,
        };
        match rx.await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => {
                // Refused/reset connections are gone from the mux already.
                let mut s = stream;
                s.closed = true;
                Err(e)
            }
            Err(_) => Err(gone("the driver stopped")),
        }
    }

    /// True once the link failed (device gone or protocol error).
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().failed.clone()
    }

    /// Stops the link once everything already sent on it has been handed to USB (at most
    /// `timeout`), then like [`MuxHandle::shutdown`]. Use it at the end of a session: a bare
    /// shutdown can drop the last message or a connection close still queued.
    pub async fn close(&self, timeout: Duration) {
        if self.shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let mut rx = self.shared.flushed.subscribe();
        let start = rx.borrow_and_update().0;
        self.shared.kick();
        let flushed = rx.wait_for(|&(pass, idle)| pass > start && idle);
        if tokio::time::timeout(timeout, flushed).await.is_err() {
            debug!(?timeout, "usbmux output not flushed before closing");
        }
        self.shutdown();
    }

    /// Stops the threads at once; what is still queued is dropped and open streams fail from
    /// now on.
    pub fn shutdown(&self) {
        self.shared
            .lock()
            .fail("the host closed the usbmux link".into());
        self.shared.stop();
    }
}

impl crate::restored::Connector for MuxHandle {
    type Stream = MuxStream;
    async fn connect(&self, port: u16) -> io::Result<MuxStream> {
        MuxHandle::connect(self, port).await
    }
}

/// The reader's or the writer's way to the device.
enum Bulk {
    /// A handle of its own.
    Own(Box<dyn UsbTransport>),
    /// One handle shared by both threads; the counter says a writer is waiting for it.
    Shared(Arc<Mutex<Box<dyn UsbTransport>>>, Arc<AtomicUsize>),
}

impl Bulk {
    fn bulk_in(&mut self, ep: u8, timeout: Duration) -> Result<Vec<u8>, TransportError> {
        match self {
            Bulk::Own(t) => t.bulk_in(ep, RX_TRANSFER_SIZE, timeout),
            Bulk::Shared(t, writer_waiting) => {
                // Let a waiting writer in first: reads poll, writes carry the image.
                while writer_waiting.load(Ordering::SeqCst) > 0 {
                    thread::yield_now();
                }
                let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
                t.bulk_in(ep, RX_TRANSFER_SIZE, timeout)
            }
        }
    }

    fn bulk_out(
        &mut self,
        ep: u8,
        data: &[u8],
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        match self {
            Bulk::Own(t) => t.bulk_out(ep, data, timeout),
            Bulk::Shared(t, writer_waiting) => {
                writer_waiting.fetch_add(1, Ordering::SeqCst);
                let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
                writer_waiting.fetch_sub(1, Ordering::SeqCst);
                t.bulk_out(ep, data, timeout)
            }
        }
    }
}

/// Feeds every bulk IN transfer to the mux on this thread: the device's ACKs open the window
/// for the writer without a detour through another thread.
fn spawn_reader(mut bulk: Bulk, shared: &Arc<Shared>, ep_in: u8, poll: Duration) {
    let shared = shared.clone();
    thread::Builder::new()
        .name("usbmux-rx".into())
        .spawn(move || {
            while !shared.stop.load(Ordering::SeqCst) {
                match bulk.bulk_in(ep_in, poll) {
                    Ok(data) => {
                        let mut core = shared.lock();
                        let result = core.mux.on_usb_in(&data);
                        core.dispatch_events(&shared.ready);
                        drop(core);
                        if let Err(e) = result {
                            shared.fail(e.to_string());
                            return;
                        }
                        shared.kick();
                    }
                    Err(TransportError::Timeout(_)) => {}
                    Err(e) => {
                        shared.fail(e.to_string());
                        return;
                    }
                }
            }
        })
        // Thread creation fails only when the OS is out of resources; nothing sensible remains.
        .expect("spawn usbmux reader thread");
}

/// Pulls transfers from the mux and writes them, one at a time and in order; owns the mux's
/// ACK timer while there is nothing to send.
fn spawn_writer(mut bulk: Bulk, shared: &Arc<Shared>, ep_out: u8, timeout: Duration) {
    let shared_for_thread = shared.clone();
    let handle = thread::Builder::new()
        .name("usbmux-tx".into())
        .spawn(move || {
            let shared = shared_for_thread;
            let mut idle_passes = 0u64;
            let mut publish_idle = |shared: &Shared| {
                idle_passes += 1;
                if shared.flushed.receiver_count() > 0 {
                    shared.flushed.send_replace((idle_passes, true));
                }
            };
            loop {
                if shared.stop.load(Ordering::SeqCst) {
                    publish_idle(&shared);
                    return;
                }
                let (packet, deadline) = {
                    let mut core = shared.lock();
                    if core.failed.is_some() {
                        drop(core);
                        publish_idle(&shared);
                        return;
                    }
                    let now = Instant::now();
                    core.mux.on_timer(now);
                    let packet = core.mux.poll_transmit();
                    core.dispatch_events(&shared.ready);
                    let deadline = match packet {
                        Some(_) => None,
                        None => {
                            // Published under the lock: whatever a stream sends after this
                            // point is only flushed by a later idle pass.
                            publish_idle(&shared);
                            core.mux.poll_timeout(now)
                        }
                    };
                    (packet, deadline)
                };
                let Some(data) = packet else {
                    if !shared.kicked.swap(false, Ordering::AcqRel) {
                        // Kicks unpark us; the timeout only bounds how late a stop is seen.
                        let wait = deadline.map_or(Duration::from_millis(200), |d| {
                            d.saturating_duration_since(Instant::now())
                        });
                        thread::park_timeout(wait);
                    }
                    continue;
                };
                let failure = match bulk.bulk_out(ep_out, &data, timeout) {
                    Ok(n) if n == data.len() => continue,
                    Ok(n) => format!(
                        "the Mac accepted only {n} of {} bytes of a USB transfer",
                        data.len()
                    ),
                    Err(e) => e.to_string(),
                };
                shared.fail(failure);
                publish_idle(&shared);
                return;
            }
        })
        // As for the reader.
        .expect("spawn usbmux writer thread");
    // Kicks before this only set the flag, which the writer checks before it ever sleeps.
    let _ = shared.writer.set(handle.thread().clone());
}

/// One connection to a port on the Mac.
pub struct MuxStream {
    shared: Arc<Shared>,
    _guard: Arc<Guard>,
    id: ConnId,
    port: u16,
    closed: bool,
}

impl std::fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxStream")
            .field("id", &self.id)
            .field("port", &self.port)
            .finish()
    }
}

impl MuxStream {
    pub fn port(&self) -> u16 {
        self.port
    }

    fn close_now(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        {
            let mut core = self.shared.lock();
            core.conns.remove(&self.id);
            let _ = core.mux.close(self.id);
        }
        self.shared.kick();
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection was closed by this host",
            )));
        }
        let mut core = this.shared.lock();
        let dst = buf.initialize_unfilled();
        if dst.is_empty() {
            return Poll::Ready(Ok(()));
        }
        match core.mux.recv(this.id, dst) {
            Ok(0) => {
                if let Some(why) = &core.failed {
                    return Poll::Ready(Err(gone(why)));
                }
                if let Some(slot) = core.conns.get_mut(&this.id) {
                    slot.read_waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Ok(n) => {
                buf.advance(n);
                drop(core);
                // Reading frees window: the driver may owe an ACK.
                this.shared.kick();
                Poll::Ready(Ok(()))
            }
            // usbmux has no FIN: the device ends a stream with a RST, which reads as EOF.
            Err(ConnError::Reset { reason }) => {
                debug!(port = this.port, %reason, "mux connection ended by the Mac");
                Poll::Ready(Ok(()))
            }
            Err(ConnError::Unknown(_)) => Poll::Ready(match &core.failed {
                Some(why) => Err(gone(why)),
                None => Ok(()),
            }),
        }
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection was closed by this host",
            )));
        }
        let mut core = this.shared.lock();
        if let Some(why) = &core.failed {
            return Poll::Ready(Err(gone(why)));
        }
        match core.mux.send(this.id, data) {
            Ok(0) if !data.is_empty() => {
                if let Some(slot) = core.conns.get_mut(&this.id) {
                    slot.write_waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Ok(n) => {
                drop(core);
                this.shared.kick();
                Poll::Ready(Ok(n))
            }
            Err(ConnError::Reset { reason }) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!(
                    "the Mac reset the connection to port {}{}",
                    this.port,
                    suffix(&reason)
                ),
            ))),
            Err(ConnError::Unknown(_)) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("the connection to port {} is closed", this.port),
            ))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Accepted bytes are the mux's to deliver (like a TCP socket's send buffer).
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // usbmux has no half-close: data already accepted goes out, then a RST.
        self.get_mut().close_now();
        Poll::Ready(Ok(()))
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        self.close_now();
    }
}
