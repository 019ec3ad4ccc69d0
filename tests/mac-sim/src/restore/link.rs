//! Blocking streams over the sans-IO [`DeviceMux`], for the restore OS's service threads.
//!
//! The USB front end drives the mux under a mutex (bulk OUT in, bulk IN out) and wakes the
//! services through a condition variable; each service reads and writes its connections like
//! sockets. Keeping the services as straight-line blocking code makes scenarios easy to follow.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::usbmux::{ConnId, DeviceMux, MuxEvent};

#[derive(Debug)]
struct Shared {
    mux: DeviceMux,
    /// Accepted connections not yet taken, per port.
    accepted: Vec<(u16, ConnId)>,
    /// Reasons of connections that were closed, for messages.
    closed: Vec<(ConnId, bool, String)>,
    /// The device dropped off the bus (fault): every blocking call fails.
    gone: bool,
}

/// The mux plus the condition variable services wait on.
#[derive(Debug, Clone)]
pub struct MuxLink {
    inner: Arc<(Mutex<Shared>, Condvar)>,
    /// How long a blocking read or accept waits before failing with TimedOut.
    pub timeout: Duration,
}

impl MuxLink {
    pub fn new(mux: DeviceMux, timeout: Duration) -> MuxLink {
        MuxLink {
            inner: Arc::new((
                Mutex::new(Shared {
                    mux,
                    accepted: Vec::new(),
                    closed: Vec::new(),
                    gone: false,
                }),
                Condvar::new(),
            )),
            timeout,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A poisoned lock means a service thread panicked; the state is still usable for
        // reporting, so take it rather than cascade the panic into the USB front end.
        self.inner.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` on the mux (front ends, tests), then wake the services.
    pub fn with_mux<R>(&self, f: impl FnOnce(&mut DeviceMux) -> R) -> R {
        let mut g = self.lock();
        let r = f(&mut g.mux);
        Self::drain_events(&mut g);
        drop(g);
        self.inner.1.notify_all();
        r
    }

    fn drain_events(g: &mut Shared) {
        while let Some(ev) = g.mux.poll_event() {
            match ev {
                MuxEvent::Accepted { conn, port } => g.accepted.push((port, conn)),
                MuxEvent::Closed {
                    conn,
                    by_host,
                    reason,
                } => g.closed.push((conn, by_host, reason)),
            }
        }
    }

    /// The Mac dropped off the bus: wake everyone with an error.
    pub fn set_gone(&self) {
        self.lock().gone = true;
        self.inner.1.notify_all();
    }

    pub fn is_gone(&self) -> bool {
        self.lock().gone
    }

    fn wait<'a>(
        &self,
        g: MutexGuard<'a, Shared>,
        deadline: Instant,
    ) -> io::Result<MutexGuard<'a, Shared>> {
        let now = Instant::now();
        if now >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "timed out waiting for the host",
            ));
        }
        // Short slices so ACK deadlines (slow-ACK fault) are noticed by the front end's polls.
        let slice = (deadline - now).min(Duration::from_millis(20));
        let (g, _) = self
            .inner
            .1
            .wait_timeout(g, slice)
            .unwrap_or_else(|e| e.into_inner());
        Ok(g)
    }

    /// Wait for the host to connect to `port` (which must be listened on).
    pub fn accept(&self, port: u16, timeout: Duration) -> io::Result<Stream> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            if g.gone {
                return Err(gone());
            }
            if let Some(i) = g.accepted.iter().position(|(p, _)| *p == port) {
                let (_, conn) = g.accepted.remove(i);
                return Ok(Stream {
                    link: self.clone(),
                    conn,
                    port,
                });
            }
            g = self.wait(g, deadline).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the host did not connect to device port {port} within {timeout:?}"),
                )
            })?;
        }
    }

    pub fn listen(&self, port: u16) {
        self.with_mux(|m| m.listen(port));
    }

    pub fn unlisten(&self, port: u16) {
        self.with_mux(|m| m.unlisten(port));
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the simulated Mac is off the bus",
    )
}

/// One accepted connection.
#[derive(Debug)]
pub struct Stream {
    link: MuxLink,
    conn: ConnId,
    port: u16,
}

impl Stream {
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn id(&self) -> ConnId {
        self.conn
    }

    fn closed_error(&self, g: &Shared) -> io::Error {
        let why = g
            .closed
            .iter()
            .find(|(c, _, _)| *c == self.conn)
            .map(|(_, by_host, r)| {
                if *by_host {
                    format!("the host reset port {} ({r})", self.port)
                } else {
                    format!("the device reset port {} ({r})", self.port)
                }
            })
            .unwrap_or_else(|| format!("port {} closed", self.port));
        io::Error::new(io::ErrorKind::ConnectionReset, why)
    }

    /// Device-side RST with a reason.
    pub fn reset(&self, reason: &str) {
        self.link.with_mux(|m| m.reset(self.conn, reason));
    }

    /// Whether the host closed (reset) this connection.
    pub fn closed_by_host(&self) -> bool {
        let g = self.link.lock();
        g.closed
            .iter()
            .any(|(c, by_host, _)| *c == self.conn && *by_host)
    }

    /// Wait until the host resets the connection (Ok) or `timeout` passes (Err).
    pub fn wait_closed(&self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut g = self.link.lock();
        loop {
            if g.gone || !g.mux.is_open(self.conn) {
                return Ok(());
            }
            g = self.link.wait(g, deadline)?;
        }
    }

    /// Wait until everything written was acknowledged by the host.
    pub fn flush_acked(&self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut g = self.link.lock();
        loop {
            if g.gone {
                return Err(gone());
            }
            if !g.mux.is_open(self.conn) || g.mux.unsent(self.conn) == 0 {
                return Ok(());
            }
            g = self.link.wait(g, deadline)?;
        }
    }

    pub fn read_some(&self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        let deadline = Instant::now() + timeout;
        let mut g = self.link.lock();
        loop {
            if g.gone {
                return Err(gone());
            }
            match g.mux.recv(self.conn, buf, Instant::now()) {
                Ok(0) if !buf.is_empty() => {}
                Ok(n) => {
                    drop(g);
                    self.link.inner.1.notify_all();
                    return Ok(n);
                }
                Err(_) => return Err(self.closed_error(&g)),
            }
            g = self.link.wait(g, deadline).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the host sent nothing on port {} for {timeout:?}",
                        self.port
                    ),
                )
            })?;
        }
    }

    pub fn read_exact_timeout(&self, buf: &mut [u8], timeout: Duration) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            done += self.read_some(&mut buf[done..], timeout)?;
        }
        Ok(())
    }

    pub fn read_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        self.read_exact_timeout(buf, self.link.timeout)
    }

    pub fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        let deadline = Instant::now() + self.link.timeout;
        let mut g = self.link.lock();
        while !data.is_empty() {
            if g.gone {
                return Err(gone());
            }
            match g.mux.send(self.conn, data) {
                Ok(n) => data = &data[n..],
                Err(_) => return Err(self.closed_error(&g)),
            }
            if data.is_empty() {
                break;
            }
            g = self.link.wait(g, deadline)?;
        }
        drop(g);
        self.link.inner.1.notify_all();
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        self.link.timeout
    }
}
