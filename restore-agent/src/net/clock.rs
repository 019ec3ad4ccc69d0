//! Setting the wall clock from SNTP before any TLS: a Raspberry Pi boots in 1970 and a PC's RTC
//! may be years off, and certificate validation fails either way.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::UdpSocket;

use super::sntp::{self, Reply, Timestamp};
use super::NetError;

/// Reads and sets the wall clock. Tests use [`DryRunClock`] so the host's clock is never touched.
pub trait ClockSetter: Send + Sync {
    fn now(&self) -> SystemTime;
    fn set(&self, t: SystemTime) -> std::io::Result<()>;
}

/// The real clock: `clock_settime(CLOCK_REALTIME)` (needs CAP_SYS_TIME).
pub struct SystemClock;

impl ClockSetter for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn set(&self, t: SystemTime) -> std::io::Result<()> {
        let d = t
            .duration_since(UNIX_EPOCH)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let ts = libc::timespec {
            // `as _` rather than naming `libc::time_t`, which musl's libc marks deprecated (its width
            // is changing there); the field's own type is what clock_settime takes.
            tv_sec: d.as_secs() as _,
            tv_nsec: d.subsec_nanos() as _,
        };
        // SAFETY: ts is a valid timespec for the duration of the call.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Reports the host clock and records what would have been set.
#[derive(Default)]
pub struct DryRunClock {
    pub set_to: Mutex<Vec<SystemTime>>,
}

impl ClockSetter for DryRunClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn set(&self, t: SystemTime) -> std::io::Result<()> {
        tracing::info!(?t, "dry run: would set the clock");
        self.set_to
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(t);
        Ok(())
    }
}

/// The earliest believable time: `SOURCE_DATE_EPOCH` at build time if the build set it, else
/// a date shortly before this code was written.
pub fn build_floor() -> SystemTime {
    const WRITTEN: u64 = 1_763_942_400; // 2025-11-24
    let secs = option_env!("SOURCE_DATE_EPOCH")
        .and_then(|s| s.parse().ok())
        .unwrap_or(WRITTEN);
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// What a successful synchronisation did.
#[derive(Debug, Clone, PartialEq)]
pub struct ClockSync {
    pub server: SocketAddr,
    /// Seconds the clock moved (positive: forward).
    pub step_secs: f64,
}

/// Asks one server and sets the clock from its answer.
pub async fn sync_once(
    server: SocketAddr,
    clock: &dyn ClockSetter,
    timeout: Duration,
    floor: SystemTime,
) -> Result<ClockSync, NetError> {
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let io = |e| NetError::Sntp(server, e);
    let sock = UdpSocket::bind(bind).await.map_err(io)?;
    sock.connect(server).await.map_err(io)?;
    let sent_at = clock.now();
    let sent = Timestamp::from_system(sent_at);
    sock.send(&sntp::request(sent)).await.map_err(io)?;
    let mut buf = [0u8; 128];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            Ok(r) => r.map_err(io)?,
            Err(_) => return Err(NetError::SntpTimeout(server)),
        };
        let received_at = clock.now();
        let reply = match Reply::parse(&buf[..n]) {
            Ok(r) => r,
            Err(e @ sntp::SntpError::Kiss(_)) => return Err(NetError::SntpRejected(server, e)),
            Err(e) => {
                tracing::debug!(%server, "ignoring a bad SNTP reply: {e}");
                continue;
            }
        };
        let t = match sntp::corrected_time(&reply, sent, sent_at, received_at, floor) {
            Ok(t) => t,
            Err(sntp::SntpError::Mismatch) => continue,
            Err(e) => return Err(NetError::SntpRejected(server, e)),
        };
        let step_secs = match t.duration_since(received_at) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        };
        clock.set(t).map_err(NetError::SetClock)?;
        tracing::info!(%server, step_secs, "clock set from SNTP");
        return Ok(ClockSync { server, step_secs });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dry_run_records() {
        let c = DryRunClock::default();
        c.set(UNIX_EPOCH).unwrap();
        assert_eq!(*c.set_to.lock().unwrap(), vec![UNIX_EPOCH]);
        assert!(build_floor() > UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    }
}
