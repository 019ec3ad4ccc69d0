//! Station mode: what the rescue image runs. Notices every Apple device plugged in, gives each
//! Mac its own task running the per-Mac job (the restore engine), shows a dashboard, and keeps a
//! report and a log per Mac.
//!
//! The station tracks a Mac by its port (and, once known, its ECID) while its job runs: a Mac
//! re-enumerating from DFU to iBoot to restore mode is the same Mac, and its job — not the
//! station — follows it. When a job ends its port is left alone until the device leaves it, so
//! a failed Mac sitting in DFU is not restarted in a loop; the slot goes to the next Mac.
//!
//! Erase confirmation reaches jobs only through [`api::EraseConfirmer`] implementations in
//! [`confirm`], which read local ttys and GPIO lines. This module opens no sockets.

pub mod api;
pub mod confirm;
pub mod dashboard;
pub mod demo;
pub mod gpio;
pub mod netinfo;
pub mod report;
pub mod settings;
pub mod usage;

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::identity::{self, AppleMode};
use crate::usb::{DeviceInfo, HotplugEvent, TransportError, UsbBus, UsbLocation};
use api::{EngineEvent, EraseConfirmer, EraseDecision};
use dashboard::{Board, Row};
use report::{unix_secs, Store};

/// The per-Mac work the station runs, one task per Mac. Production wires it to the restore
/// engine; tests plug scripted jobs. The future resolves to the engine's report (any
/// serialisable value), which the station wraps with its own facts.
pub type JobFuture = Pin<Box<dyn Future<Output = serde_json::Value> + Send>>;

pub trait MacJob: Send + Sync {
    fn start(
        &self,
        bus: Arc<dyn UsbBus>,
        device: DeviceInfo,
        confirmer: Arc<dyn EraseConfirmer>,
        events: UnboundedSender<EngineEvent>,
    ) -> JobFuture;
}

/// Station facts owned by others (the networking helper fills in the address and link).
pub trait StationInfo: Send + Sync {
    fn network(&self) -> String;
}

pub struct NoNetwork;

impl StationInfo for NoNetwork {
    fn network(&self) -> String {
        "not configured".into()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// Redrawn in place with ANSI escapes.
    Terminal { width: Option<usize> },
    /// One plain line per change, for serial consoles and logs.
    Lines,
}

#[derive(Debug, Clone)]
pub struct StationConfig {
    pub data_dir: Option<PathBuf>,
    pub max_macs: usize,
    pub display: Display,
    /// Shown in the header (the firmware cache directory).
    pub cache_label: String,
    pub redraw: Duration,
    /// Read each new device's ECID before starting a job (real buses); off for fake buses.
    pub probe_ecid: bool,
    /// Stop once this many Macs have finished and nothing else is running or waiting.
    pub exit_after: Option<u32>,
    /// A device back on a finished Mac's port within this time of leaving it is that Mac
    /// re-enumerating (rebooting after its job), not a new Mac.
    pub replug_grace: Duration,
}

impl Default for StationConfig {
    fn default() -> Self {
        StationConfig {
            data_dir: None,
            max_macs: 8,
            display: Display::Lines,
            cache_label: "none".into(),
            redraw: Duration::from_millis(250),
            probe_ecid: true,
            exit_after: None,
            replug_grace: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StationError {
    #[error("cannot watch the USB bus for Macs being plugged in: {0}")]
    Watch(TransportError),
    #[error("cannot list the USB devices: {0}")]
    List(TransportError),
}

/// Running totals, readable while the station runs.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub started: u32,
    pub done: u32,
    pub failed: u32,
    /// Reports written (empty without a data dir).
    pub reports: Vec<PathBuf>,
    /// Every report, as written or printed.
    pub report_values: Vec<serde_json::Value>,
}

enum Msg {
    Hotplug(HotplugEvent),
    Probed(DeviceInfo, Option<u64>),
    Event(u64, EngineEvent),
    EraseAsked(u64, String),
    EraseDecided(u64, serde_json::Value),
    Done(u64, serde_json::Value),
}

struct Slot {
    /// The agent's CPU time and the clock when the job started (benchmark fields).
    cpu_at_start: Duration,
    clock_at_start: Instant,
    device: DeviceInfo,
    ecid: Option<u64>,
    row: usize,
    started: SystemTime,
    stages: Vec<serde_json::Value>,
    erase: Vec<serde_json::Value>,
    result: Option<serde_json::Value>,
    /// Log lines kept until the ECID names the log file.
    unlogged: Vec<String>,
    /// When the Mac left its port and has not come back (a cable pulled mid-job): the
    /// finished port then waits for a re-plug instead of treating the Mac as still there.
    left: Option<Instant>,
}

pub struct Station {
    cfg: StationConfig,
    bus: Arc<dyn UsbBus>,
    job: Arc<dyn MacJob>,
    confirmer: Arc<dyn EraseConfirmer>,
    info: Arc<dyn StationInfo>,
    out: Box<dyn Write + Send>,
    summary: Arc<Mutex<Summary>>,
    ready: Option<tokio::sync::watch::Sender<bool>>,
}

impl Station {
    pub fn new(
        cfg: StationConfig,
        bus: Arc<dyn UsbBus>,
        job: Arc<dyn MacJob>,
        confirmer: Arc<dyn EraseConfirmer>,
        info: Arc<dyn StationInfo>,
        out: Box<dyn Write + Send>,
    ) -> Station {
        Station {
            cfg,
            bus,
            job,
            confirmer,
            info,
            out,
            summary: Arc::default(),
            ready: None,
        }
    }

    /// Set to `true` once the station watches USB and has said it is ready: what announces
    /// the station to a technician or a boot test must not come before.
    pub fn with_ready(mut self, ready: tokio::sync::watch::Sender<bool>) -> Station {
        self.ready = Some(ready);
        self
    }

    pub fn summary(&self) -> Arc<Mutex<Summary>> {
        Arc::clone(&self.summary)
    }

    /// Run until `shutdown` resolves (or `exit_after` Macs are finished).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<Summary, StationError> {
        let (tx, rx) = unbounded_channel();
        let watch = self.bus.watch().map_err(StationError::Watch)?;
        let hot_tx = tx.clone();
        // The bus hands out a blocking receiver; a plain thread bridges it (it ends with the
        // bus's sender, or at the first event after the station is gone).
        std::thread::spawn(move || {
            for ev in watch {
                if hot_tx.send(Msg::Hotplug(ev)).is_err() {
                    break;
                }
            }
        });
        for dev in self.bus.devices().map_err(StationError::List)? {
            let _ = tx.send(Msg::Hotplug(HotplugEvent::Arrived(dev)));
        }
        let ready = self.ready;
        let mut run = Running {
            store: Store::new(self.cfg.data_dir.clone()),
            cfg: self.cfg,
            bus: self.bus,
            job: self.job,
            confirmer: self.confirmer,
            info: self.info,
            out: self.out,
            summary: self.summary,
            tx,
            board: Board::default(),
            slots: HashMap::new(),
            pending: Vec::new(),
            finished: Vec::new(),
            next_slot: 1,
            dirty: true,
        };
        run.board.header.cache = run.cfg.cache_label.clone();
        if matches!(run.cfg.display, Display::Terminal { .. }) {
            let _ = run.out.write_all(b"\x1b[2J\x1b[?25l");
        } else {
            run.emit(vec![format!(
                "station: ready, up to {} Macs at once; network {}",
                run.cfg.max_macs,
                run.info.network()
            )]);
        }
        if let Some(r) = ready {
            let _ = r.send(true);
        }
        run.event_loop(rx, shutdown).await;
        let summary = run
            .summary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(summary)
    }
}

struct Running {
    cfg: StationConfig,
    bus: Arc<dyn UsbBus>,
    job: Arc<dyn MacJob>,
    confirmer: Arc<dyn EraseConfirmer>,
    info: Arc<dyn StationInfo>,
    out: Box<dyn Write + Send>,
    summary: Arc<Mutex<Summary>>,
    store: Store,
    tx: UnboundedSender<Msg>,
    board: Board,
    slots: HashMap<u64, Slot>,
    pending: Vec<DeviceInfo>,
    /// Ports whose job ended, with when their device left (None: still there).
    finished: Vec<(UsbLocation, Option<Instant>)>,
    next_slot: u64,
    dirty: bool,
}

impl Running {
    async fn event_loop(
        &mut self,
        mut rx: UnboundedReceiver<Msg>,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut tick = tokio::time::interval(self.cfg.redraw);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                msg = rx.recv() => match msg {
                    Some(m) => self.handle(m),
                    None => break,
                },
                _ = tick.tick() => self.redraw(),
            }
            if self.is_finished() {
                break;
            }
        }
        self.dirty = true;
        self.redraw();
        if matches!(self.cfg.display, Display::Terminal { .. }) {
            let _ = self.out.write_all(b"\x1b[?25h\r\n");
        }
        let _ = self.out.flush();
    }

    fn is_finished(&self) -> bool {
        let s = self.summary.lock().unwrap_or_else(|p| p.into_inner());
        self.cfg.exit_after.is_some_and(|n| {
            s.done + s.failed >= n && self.slots.is_empty() && self.pending.is_empty()
        })
    }

    fn redraw(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        if let Display::Terminal { width } = self.cfg.display {
            self.board.header.network = self.info.network();
            let width = width.unwrap_or_else(dashboard::terminal_width);
            let screen = self.board.render_ansi(width);
            let _ = self.out.write_all(screen.as_bytes());
            let _ = self.out.flush();
        }
    }

    /// Line mode prints the lines; the terminal shows them as notes only when they are not
    /// already in a row.
    fn emit(&mut self, lines: Vec<String>) {
        self.dirty = true;
        if self.cfg.display == Display::Lines {
            for l in lines {
                let _ = writeln!(self.out, "{l}");
            }
            let _ = self.out.flush();
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Hotplug(HotplugEvent::Arrived(dev)) => self.arrived(dev),
            Msg::Hotplug(HotplugEvent::Left(dev)) => {
                self.pending.retain(|p| p.location != dev.location);
                for (l, left) in &mut self.finished {
                    if *l == dev.location {
                        *left = Some(Instant::now());
                    }
                }
                for slot in self.slots.values_mut() {
                    if slot.device.location == dev.location {
                        slot.left = Some(Instant::now());
                    }
                }
                self.refresh_counts();
            }
            Msg::Probed(dev, ecid) => self.probed(dev, ecid),
            Msg::Event(id, ev) => self.job_event(id, ev),
            Msg::EraseAsked(id, code) => {
                let text =
                    format!("ERASE? type {code} + Enter at the console (or hold the button)");
                self.slot_note(id, text);
            }
            Msg::EraseDecided(id, record) => {
                let text = format!(
                    "erase decision: {}",
                    record["decision"].as_str().unwrap_or("?")
                );
                if let Some(s) = self.slots.get_mut(&id) {
                    s.erase.push(record);
                }
                self.slot_note(id, text);
            }
            Msg::Done(id, report) => self.job_done(id, report),
        }
    }

    fn arrived(&mut self, dev: DeviceInfo) {
        let Some(mode) = AppleMode::from_ids(dev.vendor_id, dev.product_id) else {
            return;
        };
        if mode == AppleMode::Wtf {
            return;
        }
        if let Some((&id, slot)) = self
            .slots
            .iter_mut()
            .find(|(_, s)| s.device.location == dev.location)
        {
            slot.left = None;
            // Its own job follows it through re-enumerations; only the log hears of it.
            let line = format!("re-enumerated as {mode:?} (address {})", dev.address);
            self.slot_note(id, line);
            return;
        }
        if let Some(i) = self.finished.iter().position(|(l, _)| *l == dev.location) {
            let grace = self.cfg.replug_grace;
            match self.finished[i].1 {
                // Never left, or back quickly: the finished Mac itself.
                None => return,
                Some(left) if left.elapsed() < grace => {
                    self.finished[i].1 = None;
                    return;
                }
                Some(_) => {
                    self.finished.remove(i);
                }
            }
        }
        if let Some(p) = self.pending.iter_mut().find(|p| p.location == dev.location) {
            *p = dev;
            return;
        }
        if !self.cfg.probe_ecid {
            self.probed(dev, None);
            return;
        }
        let bus = Arc::clone(&self.bus);
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            let ecid = identity::probe(bus.as_ref(), &dev)
                .ok()
                .and_then(|id| id.ecid);
            let _ = tx.send(Msg::Probed(dev, ecid));
        });
    }

    fn probed(&mut self, dev: DeviceInfo, ecid: Option<u64>) {
        if self
            .slots
            .values()
            .any(|s| s.device.location == dev.location)
            || self.pending.iter().any(|p| p.location == dev.location)
            || self.finished.iter().any(|(l, _)| *l == dev.location)
        {
            return;
        }
        if let Some(e) = ecid {
            if self.slots.values().any(|s| s.ecid == Some(e)) {
                // The same Mac showing up on another port while its job runs (a hub
                // re-enumerating it elsewhere): still its job's Mac.
                return;
            }
        }
        if self.slots.len() < self.cfg.max_macs.max(1) {
            self.start(dev, ecid);
        } else {
            let line = format!(
                "mac {}: waiting for a free slot ({} Macs at once)",
                dev.location, self.cfg.max_macs
            );
            self.pending.push(dev);
            self.board.push_note(line.clone());
            self.emit(vec![line]);
            self.refresh_counts();
        }
    }

    fn start(&mut self, dev: DeviceInfo, ecid: Option<u64>) {
        let id = self.next_slot;
        self.next_slot += 1;
        let port = dev.location.to_string();
        let row = Row::new(port.clone(), ecid);
        let row_idx = match self.board.rows.iter().position(|r| r.port == port) {
            // A new Mac on a port whose last Mac is done takes over its row.
            Some(i) => {
                self.board.rows[i] = row;
                i
            }
            None => {
                self.board.rows.push(row);
                self.board.rows.len() - 1
            }
        };
        self.slots.insert(
            id,
            Slot {
                device: dev.clone(),
                ecid,
                row: row_idx,
                started: SystemTime::now(),
                cpu_at_start: usage::cpu_time(),
                clock_at_start: Instant::now(),
                stages: Vec::new(),
                erase: Vec::new(),
                result: None,
                unlogged: Vec::new(),
                left: None,
            },
        );
        self.summary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .started += 1;
        let mode = AppleMode::from_ids(dev.vendor_id, dev.product_id);
        self.slot_log(id, vec![format!("mac {port}: plugged in ({mode:?})")]);
        self.emit(vec![format!("mac {port}: plugged in ({mode:?}), starting")]);
        self.refresh_counts();

        let (ev_tx, mut ev_rx) = unbounded_channel();
        let confirmer: Arc<dyn EraseConfirmer> = Arc::new(SlotConfirmer {
            inner: Arc::clone(&self.confirmer),
            slot: id,
            tx: Mutex::new(self.tx.clone()),
        });
        let fut = self.job.start(Arc::clone(&self.bus), dev, confirmer, ev_tx);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let job = tokio::spawn(fut);
            // Forward every event before the report, so the report sees the final state.
            while let Some(ev) = ev_rx.recv().await {
                let _ = tx.send(Msg::Event(id, ev));
            }
            let report = match job.await {
                Ok(r) => r,
                Err(e) => json!({ "error": format!("the job for this Mac crashed: {e}") }),
            };
            let _ = tx.send(Msg::Done(id, report));
        });
    }

    fn job_event(&mut self, id: u64, ev: EngineEvent) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        match &ev {
            EngineEvent::Stage { stage } => slot.stages.push(json!({
                "stage": stage,
                "at": unix_secs(SystemTime::now()),
            })),
            EngineEvent::Identified { ecid, .. } => slot.ecid = Some(*ecid),
            EngineEvent::Failed {
                cause,
                next_step,
                erase_could_fix,
            } => {
                slot.result = Some(json!({
                    "result": "failed", "cause": cause, "next_step": next_step,
                    "erase_could_fix": erase_could_fix,
                }))
            }
            EngineEvent::Succeeded => slot.result = Some(json!({ "result": "succeeded" })),
            _ => {}
        }
        let lines = self.board.rows[slot.row].apply(&ev);
        if !lines.is_empty() {
            self.slot_log(id, lines.clone());
        }
        self.emit(lines);
    }

    fn slot_note(&mut self, id: u64, text: String) {
        let Some(slot) = self.slots.get(&id) else {
            return;
        };
        let line = self.board.rows[slot.row].note(text);
        self.slot_log(id, vec![line.clone()]);
        self.emit(vec![line]);
    }

    fn slot_log(&mut self, id: u64, lines: Vec<String>) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        let Some(ecid) = slot.ecid else {
            slot.unlogged.extend(lines);
            return;
        };
        let mut all = std::mem::take(&mut slot.unlogged);
        all.extend(lines);
        if let Err(e) = self.store.log(&format!("{ecid:016X}"), &all) {
            tracing::warn!("cannot write the Mac's log: {e}");
        }
    }

    fn job_done(&mut self, id: u64, engine_report: serde_json::Value) {
        // Flush buffered lines into a port-named log if the ECID never became known.
        if let Some(slot) = self.slots.get_mut(&id) {
            if slot.ecid.is_none() && !slot.unlogged.is_empty() {
                let key = format!("port-{}", slot.device.location);
                let _ = self.store.log(&key, &std::mem::take(&mut slot.unlogged));
            }
        }
        let Some(slot) = self.slots.remove(&id) else {
            return;
        };
        let row = &mut self.board.rows[slot.row];
        let succeeded = slot
            .result
            .as_ref()
            .is_some_and(|r| r["result"] == "succeeded");
        if row.result.is_none() {
            // The job ended without saying how: that is a failure the technician must see.
            row.result = Some(succeeded);
            if !succeeded {
                row.last = "FAILED: the job ended without a result".into();
            }
        }
        let ecid_label = slot
            .ecid
            .map(|e| format!("{e:016X}"))
            .unwrap_or_else(|| format!("port-{}", slot.device.location));
        let report = json!({
            "station": {
                "port": slot.device.location.to_string(),
                "ecid": slot.ecid.map(|e| format!("0x{e:016X}")),
                "model": row.model,
                "started": unix_secs(slot.started),
                "finished": unix_secs(SystemTime::now()),
                "stages": slot.stages,
                "erase_decisions": slot.erase,
                "outcome": slot.result.clone().unwrap_or_else(|| json!({"result": "failed", "cause": "the job ended without a result"})),
                // The agent's own work during this job (all Macs' jobs if several overlap)
                // against its wall time: the rest was spent waiting on the Mac or the network.
                "agent_cpu_s": (usage::cpu_time().saturating_sub(slot.cpu_at_start)).as_secs_f64(),
                "agent_wall_s": slot.clock_at_start.elapsed().as_secs_f64(),
                "agent_peak_rss_kib": usage::peak_rss_kib(),
            },
            "engine": engine_report,
        });
        let port = row.port.clone();
        self.finished
            .push((slot.device.location.clone(), slot.left));
        let line = match self.store.report(&ecid_label, &report) {
            Ok(Some(path)) => {
                self.summary
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .reports
                    .push(path.clone());
                // Also the whole report on the console: a station without a screen (serial,
                // CI) is read there, and the file may be on a stick nobody opens.
                format!(
                    "mac {port}: report written to {}\nmac {port}: report {report}",
                    path.display()
                )
            }
            Ok(None) => format!("mac {port}: report {report}"),
            Err(e) => format!("mac {port}: cannot write the report ({e}): {report}"),
        };
        {
            let mut s = self.summary.lock().unwrap_or_else(|p| p.into_inner());
            if succeeded {
                s.done += 1;
            } else {
                s.failed += 1;
            }
            s.report_values.push(report);
        }
        let lines: Vec<String> = line.lines().map(str::to_string).collect();
        self.board
            .push_note(lines.first().cloned().unwrap_or_default());
        self.emit(lines);
        // The freed slot goes to the Mac that waited longest.
        while self.slots.len() < self.cfg.max_macs.max(1) && !self.pending.is_empty() {
            let dev = self.pending.remove(0);
            self.start(dev, None);
        }
        self.refresh_counts();
    }

    fn refresh_counts(&mut self) {
        let s = self.summary.lock().unwrap_or_else(|p| p.into_inner());
        self.board.header.done = s.done;
        self.board.header.failed = s.failed;
        self.board.header.waiting = self.pending.len();
        self.dirty = true;
    }
}

/// Tells the dashboard and the report about each erase question and its answer.
struct SlotConfirmer {
    inner: Arc<dyn EraseConfirmer>,
    slot: u64,
    tx: Mutex<UnboundedSender<Msg>>,
}

impl EraseConfirmer for SlotConfirmer {
    fn confirm_erase(&self, ecid: u64, code: &str, reason: &str) -> EraseDecision {
        let send = |m| {
            let _ = self.tx.lock().unwrap_or_else(|p| p.into_inner()).send(m);
        };
        send(Msg::EraseAsked(self.slot, code.to_string()));
        let decision = self.inner.confirm_erase(ecid, code, reason);
        let record = match &decision {
            EraseDecision::Confirmed { how, at } => json!({
                "decision": "confirmed", "how": how, "at": unix_secs(*at), "reason": reason,
            }),
            EraseDecision::Refused { how } => json!({
                "decision": "refused", "how": how, "at": unix_secs(SystemTime::now()), "reason": reason,
            }),
            EraseDecision::TimedOut => json!({
                "decision": "timed out", "at": unix_secs(SystemTime::now()), "reason": reason,
            }),
        };
        send(Msg::EraseDecided(self.slot, record));
        decision
    }
}
