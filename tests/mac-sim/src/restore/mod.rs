//! The simulated Mac's restore OS (protocol.md §6–§8): usbmux device side over the bulk
//! endpoints, restored on 62078 playing a scenario, an ASR sink, and the reverse-proxy
//! control channel on 1082.
//!
//! [`RestoreOs`] is what the USB half ([`crate::device::SimMac`]) forwards bulk transfers to;
//! [`RestoreHandle`] is what tests keep to read the outcome and the strictness counters.

pub mod asr;
pub mod link;
pub mod proxy;
pub mod restored;
pub mod scenario;
pub mod usbmux;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::wire::Reply;
use link::MuxLink;
use restored::{DeviceInfo, Outcome, Player, Report};
use scenario::Scenario;
use usbmux::{DeviceMux, MuxConfig, MuxStats, Violations};

/// Settings besides the scenario.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// How long the device waits for the host at any point before giving up.
    pub timeout: Duration,
    /// Overrides for the mux (the scenario sets version and ACK delay).
    pub mux: MuxConfig,
}

impl Default for RestoreConfig {
    fn default() -> Self {
        RestoreConfig {
            timeout: Duration::from_secs(10),
            mux: MuxConfig::default(),
        }
    }
}

/// What tests keep: outcome, report, counters.
#[derive(Debug, Clone)]
pub struct RestoreHandle {
    link: MuxLink,
    report: Arc<Mutex<Report>>,
}

impl RestoreHandle {
    pub fn report(&self) -> Report {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn outcome(&self) -> Outcome {
        self.report().outcome
    }

    pub fn violations(&self) -> Violations {
        self.link.with_mux(|m| m.violations().clone())
    }

    pub fn stats(&self) -> MuxStats {
        self.link.with_mux(|m| m.stats().clone())
    }

    /// Wait for the scenario to end (anything but Running).
    pub fn wait(&self, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        loop {
            let o = self.outcome();
            if o != Outcome::Running || Instant::now() >= deadline {
                return o;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn link(&self) -> &MuxLink {
        &self.link
    }
}

/// The restore OS as the USB front end sees it.
#[derive(Debug)]
pub struct RestoreOs {
    handle: RestoreHandle,
}

impl Drop for RestoreOs {
    /// The Mac left restore mode (reboot, unplug): the scenario thread must not linger
    /// waiting for a host that can no longer reach it.
    fn drop(&mut self) {
        self.handle.link.set_gone();
    }
}

impl RestoreOs {
    /// Boot the restore OS: the scenario player starts on its own thread and waits for the
    /// host's mux handshake.
    pub fn start(scenario: Scenario, info: DeviceInfo, cfg: RestoreConfig) -> RestoreOs {
        let mut mux_cfg = cfg.mux.clone();
        mux_cfg.version = scenario.mux_version;
        mux_cfg.ack_delay = Duration::from_millis(scenario.faults.ack_delay_ms);
        let link = MuxLink::new(DeviceMux::new(mux_cfg), cfg.timeout);
        let report = Arc::new(Mutex::new(Report::default()));
        // restored listens before the USB interface comes up: a host connecting at once
        // must not be refused.
        link.listen(restored::RESTORED_PORT);
        if scenario.reverse_proxy != scenario::ReverseProxy::Off {
            link.listen(proxy::CTRL_PORT);
        }
        let player = Player::new(link.clone(), scenario, info, report.clone());
        std::thread::Builder::new()
            .name("mac-sim-restored".into())
            .spawn(move || player.run())
            // Spawning fails only when the OS is out of threads; a test cannot go on then.
            .expect("spawn the simulated restored thread");
        RestoreOs {
            handle: RestoreHandle { link, report },
        }
    }

    /// A factory for [`crate::device::SimMac::with_restore`]: every boot into restore mode
    /// plays `scenario`; the handle of the latest boot is stored in `latest`.
    pub fn factory(
        scenario: Scenario,
        cfg: RestoreConfig,
        latest: Arc<Mutex<Option<RestoreHandle>>>,
    ) -> crate::device::RestoreFactory {
        Box::new(move |board, id| {
            let os = RestoreOs::start(scenario.clone(), DeviceInfo::of(board, id), cfg.clone());
            *latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(os.handle());
            os
        })
    }

    pub fn handle(&self) -> RestoreHandle {
        self.handle.clone()
    }

    /// The Mac dropped off the bus (fault knob).
    pub fn gone(&self) -> bool {
        self.handle.link.is_gone()
    }

    pub fn bulk_out(&self, data: &[u8]) -> Reply {
        if self.gone() {
            return Reply::Stall;
        }
        self.handle.link.with_mux(|m| m.on_bulk_out(data));
        Reply::Ack(Vec::new())
    }

    pub fn bulk_in(&self, max_len: usize) -> Reply {
        if self.gone() {
            return Reply::Stall;
        }
        match self
            .handle
            .link
            .with_mux(|m| m.poll_bulk_in(max_len, Instant::now()))
        {
            Some(d) => Reply::Ack(d),
            None => Reply::Nak,
        }
    }
}
