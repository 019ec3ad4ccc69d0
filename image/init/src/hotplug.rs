//! Hotplug without udev: the kernel's uevent multicast on a netlink socket (edge).
//!
//! The socket is opened before coldplug so no device added while coldplug runs is missed.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::sys::socket::{
    bind, recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use tracing::{debug, info, warn};

use crate::kmod::{self, Loader};
use crate::uevent::Uevent;

/// Multicast group 1 carries the kernel's own events (udevd's re-broadcast is group 2).
const KERNEL_GROUP: u32 = 1;

pub struct UeventSocket(OwnedFd);

impl UeventSocket {
    pub fn open() -> nix::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkKObjectUEvent,
        )?;
        // Loading one host controller adds dozens of devices at once; a small buffer would drop
        // events (ENOBUFS) and with them the drivers those devices needed.
        if setsockopt(&fd, sockopt::RcvBufForce, &(4 << 20)).is_err() {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &(4 << 20));
        }
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP))?;
        Ok(Self(fd))
    }

    /// Load drivers for every device the kernel announces, forever, on its own thread; every
    /// event is also handed to `on_event` (USB disks for `/media`).
    pub fn spawn(
        self,
        loader: Arc<Loader>,
        hold: Arc<BootHold>,
        mut on_event: impl FnMut(&Uevent) + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("hotplug".into())
            .spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match recv(self.0.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                        Ok(n) => match Uevent::parse(&buf[..n]) {
                            Ok(ev) => {
                                if let Some(alias) =
                                    ev.modalias_to_load().filter(|a| !hold.hold(a))
                                {
                                    // Only news: a line per device whose driver was already
                                    // there (USB/IP's sixteen root hubs) is console time at
                                    // boot (a framebuffer scrolls slowly under emulation).
                                    if loader.load_alias_counted(alias).inserted > 0 {
                                        info!("hotplug: drivers for {} ({alias})", ev.devpath);
                                    }
                                }
                                on_event(&ev);
                            }
                            Err(e) => debug!("{e}"),
                        },
                        // Overrun: events were lost; a rescan catches their devices.
                        Err(nix::errno::Errno::ENOBUFS) => {
                            warn!("uevent buffer overrun; rescanning devices");
                            loader.coldplug(std::path::Path::new("/sys/devices"));
                        }
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => {
                            warn!("uevent socket failed ({e}); hotplugged devices will get no drivers");
                            return;
                        }
                    }
                }
            })
    }
}

/// Modaliases held back while the init waits for the data partition ([`kmod::waits_for_data`]),
/// loaded once it is handled: on the way to `/data` the CPU belongs to the stick.
#[derive(Default)]
pub struct BootHold {
    /// `Some` while holding.
    held: Mutex<Option<Vec<String>>>,
}

impl BootHold {
    pub fn holding() -> Self {
        Self {
            held: Mutex::new(Some(Vec::new())),
        }
    }

    /// Keep `modalias` for later if still holding and it is one to hold; false: load it now.
    pub fn hold(&self, modalias: &str) -> bool {
        if !kmod::waits_for_data(modalias) {
            return false;
        }
        match self.held.lock() {
            Ok(mut g) => match g.as_mut() {
                Some(list) => {
                    list.push(modalias.to_string());
                    true
                }
                None => false,
            },
            Err(_) => false,
        }
    }

    /// Stop holding; returns what was held (each once, in arrival order).
    pub fn release(&self) -> Vec<String> {
        let mut list = self
            .held
            .lock()
            .ok()
            .and_then(|mut g| g.take())
            .unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        list.retain(|a| seen.insert(a.clone()));
        list
    }
}

/// Wakes a thread waiting for a device (the data partition) when the kernel announces one,
/// instead of it polling sysfs: under emulation every 100 ms poll period is boot time lost.
#[derive(Default)]
pub struct Wakeup {
    /// Events seen so far; a waiter compares against the count it last saw, so an event that
    /// arrives between its sysfs scan and its wait is not lost.
    seen: Mutex<u64>,
    cv: Condvar,
}

impl Wakeup {
    pub fn notify(&self) {
        if let Ok(mut n) = self.seen.lock() {
            *n += 1;
            self.cv.notify_all();
        }
    }

    /// The current count, to pass to [`Wakeup::wait_past`] after looking.
    pub fn count(&self) -> u64 {
        self.seen.lock().map(|n| *n).unwrap_or(0)
    }

    /// Wait until an event after `seen` arrives or `timeout` passes; returns the new count.
    pub fn wait_past(&self, seen: u64, timeout: Duration) -> u64 {
        let Ok(guard) = self.seen.lock() else {
            std::thread::sleep(timeout);
            return seen;
        };
        match self.cv.wait_timeout_while(guard, timeout, |n| *n == seen) {
            Ok((n, _)) => *n,
            Err(_) => seen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_keyboards_until_released_and_never_the_stick() {
        let h = BootHold::holding();
        let kbd = "usb:v0627p0001d0000dc00dsc00dp00ic03isc01ip01in00";
        assert!(h.hold(kbd));
        assert!(h.hold("hid:b0003g0001v00000627p00000001"));
        assert!(h.hold(kbd), "a second keyboard like the first");
        assert!(!h.hold("usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00"));
        assert!(!h.hold("scsi:t-0x00"));
        assert_eq!(h.release(), vec![kbd, "hid:b0003g0001v00000627p00000001"]);
        // After the release everything loads at once.
        assert!(!h.hold(kbd));
        assert!(h.release().is_empty());
        assert!(!BootHold::default().hold(kbd), "the default does not hold");
    }

    #[test]
    fn a_notify_before_the_wait_is_not_lost() {
        let w = Wakeup::default();
        let seen = w.count();
        w.notify();
        assert_eq!(w.wait_past(seen, Duration::from_secs(30)), seen + 1);
    }

    #[test]
    fn a_notify_from_another_thread_ends_the_wait() {
        let w = Arc::new(Wakeup::default());
        let seen = w.count();
        let n = w.clone();
        let h = std::thread::spawn(move || n.notify());
        assert_eq!(w.wait_past(seen, Duration::from_secs(30)), seen + 1);
        h.join().unwrap();
    }

    #[test]
    fn without_events_the_wait_times_out_unchanged() {
        let w = Wakeup::default();
        assert_eq!(w.wait_past(w.count(), Duration::from_millis(1)), 0);
    }
}
