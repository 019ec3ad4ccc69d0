//! Station mode with a fake bus and scripted per-Mac jobs: one task and one report per Mac,
//! re-enumeration is not a new Mac, slots free up, line mode prints exact lines, and erase
//! decisions (including fleet arming) land in the reports.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use restore_agent::station::api::{erase_code, EngineEvent, EraseConfirmer, EraseDecision, Stage};
use restore_agent::station::confirm::ArmingConfirmer;
use restore_agent::station::demo::{dfu_device, FakeBus};
use restore_agent::station::{
    Display, JobFuture, MacJob, NoNetwork, Station, StationConfig, Summary,
};
use restore_agent::usb::{DeviceInfo, UsbBus};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::{oneshot, Barrier, Notify};

#[derive(Clone, Default)]
struct Out(Arc<Mutex<Vec<u8>>>);
impl Write for Out {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
impl Out {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// What every scripted job does; the knobs are per test.
#[derive(Default)]
struct Script {
    /// All jobs meet here before finishing (proves they ran at the same time).
    barrier: Option<Barrier>,
    /// Jobs wait for this before finishing (the test re-enumerates meanwhile).
    gate: Option<Notify>,
    /// Told when a job is running.
    running: Notify,
    ask_erase: bool,
    fail: bool,
}

#[derive(Default)]
struct Counters {
    current: AtomicUsize,
    max: AtomicUsize,
    starts: Mutex<HashMap<String, u32>>,
}

struct ScriptedJob {
    script: Arc<Script>,
    counters: Arc<Counters>,
}

fn ecid_for(dev: &DeviceInfo) -> u64 {
    0x1000 + u64::from(dev.location.ports[0])
}

impl MacJob for ScriptedJob {
    fn start(
        &self,
        _bus: Arc<dyn UsbBus>,
        device: DeviceInfo,
        confirmer: Arc<dyn EraseConfirmer>,
        events: UnboundedSender<EngineEvent>,
    ) -> JobFuture {
        let script = Arc::clone(&self.script);
        let counters = Arc::clone(&self.counters);
        *counters
            .starts
            .lock()
            .unwrap()
            .entry(device.location.to_string())
            .or_default() += 1;
        Box::pin(async move {
            let now = counters.current.fetch_add(1, Ordering::SeqCst) + 1;
            counters.max.fetch_max(now, Ordering::SeqCst);
            let ecid = ecid_for(&device);
            let _ = events.send(EngineEvent::Stage {
                stage: Stage::Identify,
            });
            let _ = events.send(EngineEvent::Identified {
                ecid,
                product_type: "Mac14,2".into(),
                board: "J413AP".into(),
                name: "MacBook Air (M2, 2022)".into(),
            });
            let _ = events.send(EngineEvent::Stage { stage: Stage::Dfu });
            let _ = events.send(EngineEvent::Progress {
                what: "iBSS".into(),
                done: 512,
                total: Some(1024),
                rate_bps: Some(1024.0),
            });
            script.running.notify_one();
            if let Some(b) = &script.barrier {
                b.wait().await;
            }
            if let Some(g) = &script.gate {
                g.notified().await;
            }
            let mut erased = Value::Null;
            if script.ask_erase {
                let c = Arc::clone(&confirmer);
                let d = tokio::task::spawn_blocking(move || {
                    c.confirm_erase(
                        ecid,
                        &erase_code(ecid),
                        "revive failed: the data volume is damaged",
                    )
                })
                .await
                .unwrap();
                erased = json!(matches!(d, EraseDecision::Confirmed { .. }));
            }
            counters.current.fetch_sub(1, Ordering::SeqCst);
            if script.fail {
                let _ = events.send(EngineEvent::Failed {
                    cause: "the Mac came back in Recovery after bootx".into(),
                    next_step: "put it in DFU again".into(),
                    erase_could_fix: false,
                });
            } else {
                let _ = events.send(EngineEvent::Stage { stage: Stage::Done });
                let _ = events.send(EngineEvent::Succeeded);
            }
            json!({ "ecid": ecid, "erased": erased })
        })
    }
}

struct Run {
    summary: Summary,
    out: String,
    counters: Arc<Counters>,
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("station-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

async fn run_station(
    bus: Arc<FakeBus>,
    script: Script,
    cfg: StationConfig,
    confirmer: Arc<dyn EraseConfirmer>,
    during: impl FnOnce(
        Arc<FakeBus>,
        Arc<Script>,
        Arc<Mutex<Summary>>,
        Out,
    ) -> tokio::task::JoinHandle<()>,
) -> Run {
    let out = Out::default();
    let script = Arc::new(script);
    let counters = Arc::new(Counters::default());
    let station = Station::new(
        cfg,
        bus.clone(),
        Arc::new(ScriptedJob {
            script: Arc::clone(&script),
            counters: Arc::clone(&counters),
        }),
        confirmer,
        Arc::new(NoNetwork),
        Box::new(out.clone()),
    );
    let summary = station.summary();
    let driver = during(bus, script, summary, out.clone());
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        station.run(async {
            let _ = stop_rx.await;
        }),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the station did not finish in time; it printed:\n{}",
            out.text()
        )
    })
    .expect("the station ran");
    drop(stop_tx);
    driver.await.unwrap();
    Run {
        summary: result,
        out: out.text(),
        counters,
    }
}

fn lines_cfg(exit_after: u32, data: Option<PathBuf>) -> StationConfig {
    StationConfig {
        data_dir: data,
        display: Display::Lines,
        probe_ecid: false,
        exit_after: Some(exit_after),
        ..StationConfig::default()
    }
}

fn nothing(
    _: Arc<FakeBus>,
    _: Arc<Script>,
    _: Arc<Mutex<Summary>>,
    _: Out,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {})
}

struct Refuse;
impl EraseConfirmer for Refuse {
    fn confirm_erase(&self, _: u64, _: &str, _: &str) -> EraseDecision {
        EraseDecision::Refused {
            how: "wrong code typed at /dev/tty1".into(),
        }
    }
}

async fn macs_at_once(n: u8) {
    let data = temp_dir(&format!("at-once-{n}"));
    let bus = Arc::new(FakeBus::new(
        (1..=n).map(|p| dfu_device(p, p + 1)).collect(),
    ));
    let script = Script {
        barrier: Some(Barrier::new(usize::from(n))),
        ..Script::default()
    };
    let run = run_station(
        bus,
        script,
        lines_cfg(u32::from(n), Some(data.clone())),
        Arc::new(Refuse),
        nothing,
    )
    .await;
    assert_eq!(run.summary.done, u32::from(n));
    assert_eq!(run.summary.failed, 0);
    assert_eq!(run.counters.max.load(Ordering::SeqCst), usize::from(n));
    let mut reports: Vec<String> = std::fs::read_dir(data.join("reports"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    reports.sort();
    assert_eq!(reports.len(), usize::from(n), "{reports:?}");
    for p in 1..=n {
        let ecid = 0x1000 + u64::from(p);
        let name = reports
            .iter()
            .find(|r| r.ends_with(&format!("-{ecid:016X}.json")))
            .unwrap_or_else(|| panic!("no report for port {p}: {reports:?}"));
        let v: Value =
            serde_json::from_slice(&std::fs::read(data.join("reports").join(name)).unwrap())
                .unwrap();
        assert_eq!(v["station"]["port"], format!("1-{p}"));
        assert_eq!(v["station"]["ecid"], format!("0x{ecid:016X}"));
        assert_eq!(v["station"]["model"], "Mac14,2");
        assert_eq!(v["station"]["outcome"]["result"], "succeeded");
        assert_eq!(v["engine"]["ecid"], ecid);
        let stages: Vec<&str> = v["station"]["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["stage"].as_str().unwrap())
            .collect();
        assert_eq!(stages, ["Identify", "Dfu", "Done"]);
        let log =
            std::fs::read_to_string(data.join("logs").join(format!("{ecid:016X}.log"))).unwrap();
        assert!(
            log.contains(&format!("mac 1-{p}: plugged in (Some(Dfu))")),
            "{log}"
        );
        assert!(log.contains(&format!("mac 1-{p}: done, restored")), "{log}");
        assert!(
            run.out.contains(&format!(
                "mac 1-{p}: identified MacBook Air (M2, 2022) (Mac14,2, J413AP) ECID 0x{ecid:016X}"
            )),
            "{}",
            run.out
        );
    }
    assert!(
        !data.join("reports").read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")),
        "no temporary files left"
    );
    std::fs::remove_dir_all(&data).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_macs_at_once_each_get_a_task_row_and_report() {
    macs_at_once(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_macs_at_once_each_get_a_task_row_and_report() {
    macs_at_once(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_enumeration_is_the_same_mac_and_a_finished_port_is_left_alone() {
    let first = dfu_device(1, 2);
    let bus = Arc::new(FakeBus::new(vec![first.clone()]));
    let script = Script {
        gate: Some(Notify::new()),
        ..Script::default()
    };
    let cfg = lines_cfg(2, None);
    let run = run_station(
        bus,
        script,
        cfg,
        Arc::new(Refuse),
        move |bus, script, summary, out| {
            tokio::spawn(async move {
                script.running.notified().await;
                // DFU → iBoot: leaves and comes back on the same port with a new address and PID.
                bus.unplug(&first);
                let mut recovery = first.clone();
                recovery.address = 9;
                recovery.product_id = 0x1281;
                bus.plug(recovery.clone());
                bus.plug(recovery.clone()); // a duplicate arrival changes nothing either
                                            // Only once the station has seen both arrivals does the job finish.
                while out
                    .text()
                    .matches("mac 1-1: re-enumerated as Recovery")
                    .count()
                    < 2
                {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                script.gate.as_ref().unwrap().notify_one();
                wait_for(&summary, |s| s.done == 1).await;
                // After its job the Mac sits on its port; it re-enumerates once more.
                let mut again = recovery.clone();
                again.address = 10;
                bus.plug(again);
                // A different Mac on another port is new.
                bus.plug(dfu_device(2, 11));
                script.running.notified().await;
                script.gate.as_ref().unwrap().notify_one();
            })
        },
    )
    .await;
    let starts = run.counters.starts.lock().unwrap().clone();
    assert_eq!(starts.get("1-1"), Some(&1), "{starts:?}");
    assert_eq!(starts.get("1-2"), Some(&1), "{starts:?}");
    assert_eq!(run.summary.started, 2);
}

/// Polls the summary (the station runs on other tasks) until `cond`.
async fn wait_for(summary: &Arc<Mutex<Summary>>, cond: impl Fn(&Summary) -> bool) {
    loop {
        if cond(&summary.lock().unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_mac_frees_its_slot_for_the_next() {
    let bus = Arc::new(FakeBus::new(
        (1..=3).map(|p| dfu_device(p, p + 1)).collect(),
    ));
    let mut cfg = lines_cfg(3, None);
    cfg.max_macs = 1;
    let script = Script {
        fail: true,
        ..Script::default()
    };
    let run = run_station(bus, script, cfg, Arc::new(Refuse), nothing).await;
    assert_eq!(run.summary.failed, 3);
    assert_eq!(run.summary.started, 3);
    assert_eq!(run.counters.max.load(Ordering::SeqCst), 1);
    assert!(
        run.out
            .contains("mac 1-2: waiting for a free slot (1 Macs at once)"),
        "{}",
        run.out
    );
    assert!(run.out.contains(
        "mac 1-1: FAILED: the Mac came back in Recovery after bootx; next: put it in DFU again"
    ));
    for v in &run.summary.report_values {
        assert_eq!(v["station"]["outcome"]["result"], "failed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_mode_prints_exact_lines_and_the_report_without_a_data_dir() {
    let bus = Arc::new(FakeBus::new(vec![dfu_device(3, 4)]));
    let run = run_station(
        bus,
        Script::default(),
        lines_cfg(1, None),
        Arc::new(Refuse),
        nothing,
    )
    .await;
    let lines: Vec<&str> = run.out.lines().collect();
    assert_eq!(
        &lines[..8],
        [
            "station: ready, up to 8 Macs at once; network not configured",
            "mac 1-3: plugged in (Some(Dfu)), starting",
            "mac 1-3: stage Identify",
            "mac 1-3: identified MacBook Air (M2, 2022) (Mac14,2, J413AP) ECID 0x0000000000001003",
            "mac 1-3: stage Dfu",
            "mac 1-3: iBSS 50% (512/1024 bytes)",
            "mac 1-3: stage Done",
            "mac 1-3: done, restored",
        ]
    );
    assert_eq!(lines.len(), 9, "{}", run.out);
    let report = lines[8]
        .strip_prefix("mac 1-3: report ")
        .expect("the report line");
    let v: Value = serde_json::from_str(report).unwrap();
    assert_eq!(v["station"]["ecid"], "0x0000000000001003");
    assert!(
        run.summary.reports.is_empty(),
        "nothing kept without a data dir"
    );
    assert!(!run.out.contains('\x1b'));
}

struct ButtonHeld;
impl EraseConfirmer for ButtonHeld {
    fn confirm_erase(&self, _: u64, _: &str, _: &str) -> EraseDecision {
        EraseDecision::Confirmed {
            how: "button held 3 s (GPIO /dev/gpiochip0 line 17)".into(),
            at: SystemTime::now(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_decisions_are_in_the_report() {
    let bus = Arc::new(FakeBus::new(vec![dfu_device(1, 2)]));
    let script = Script {
        ask_erase: true,
        ..Script::default()
    };
    let run = run_station(
        bus,
        script,
        lines_cfg(1, None),
        Arc::new(ButtonHeld),
        nothing,
    )
    .await;
    let v = &run.summary.report_values[0];
    let d = &v["station"]["erase_decisions"][0];
    assert_eq!(d["decision"], "confirmed");
    assert_eq!(d["how"], "button held 3 s (GPIO /dev/gpiochip0 line 17)");
    assert_eq!(d["reason"], "revive failed: the data volume is damaged");
    assert!(d["at"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(v["engine"]["erased"], true);
    let code = erase_code(0x1001);
    assert!(
        run.out.contains(&format!(
            "mac 1-1: ERASE? type {code} + Enter at the console (or hold the button)"
        )),
        "{}",
        run.out
    );
    assert!(run.out.contains("mac 1-1: erase decision: confirmed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_arming_covers_the_next_n_macs_only() {
    struct Once;
    impl EraseConfirmer for Once {
        fn confirm_erase(&self, _: u64, code: &str, _: &str) -> EraseDecision {
            if code == "ARM" {
                ButtonHeld.confirm_erase(0, "", "")
            } else {
                EraseDecision::TimedOut
            }
        }
    }
    let arming = Arc::new(ArmingConfirmer::new(Arc::new(Once)));
    assert!(matches!(
        arming.arm("ARM", Some(2), None),
        EraseDecision::Confirmed { .. }
    ));
    let bus = Arc::new(FakeBus::new(
        (1..=3).map(|p| dfu_device(p, p + 1)).collect(),
    ));
    let script = Script {
        ask_erase: true,
        ..Script::default()
    };
    let run = run_station(bus, script, lines_cfg(3, None), arming, nothing).await;
    let mut decisions: Vec<String> = run
        .summary
        .report_values
        .iter()
        .map(|v| {
            let d = &v["station"]["erase_decisions"][0];
            format!(
                "{} {}",
                d["decision"].as_str().unwrap(),
                d["how"].as_str().unwrap_or("")
            )
        })
        .collect();
    decisions.sort();
    assert_eq!(
        decisions,
        [
            "confirmed armed (fleet) by button held 3 s (GPIO /dev/gpiochip0 line 17)",
            "confirmed armed (fleet) by button held 3 s (GPIO /dev/gpiochip0 line 17)",
            "timed out ",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mac_replugged_after_its_job_is_started_again() {
    let first = dfu_device(1, 2);
    let bus = Arc::new(FakeBus::new(vec![first.clone()]));
    let mut cfg = lines_cfg(2, None);
    cfg.replug_grace = Duration::ZERO;
    let run = run_station(
        bus,
        Script::default(),
        cfg,
        Arc::new(Refuse),
        move |bus, _, summary, _| {
            tokio::spawn(async move {
                wait_for(&summary, |s| s.done == 1).await;
                bus.unplug(&first);
                let mut back = first.clone();
                back.address = 7;
                bus.plug(back);
            })
        },
    )
    .await;
    assert_eq!(run.counters.starts.lock().unwrap().get("1-1"), Some(&2));
    assert_eq!(run.summary.done, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mac_pulled_during_its_job_and_replugged_is_started_again() {
    let first = dfu_device(1, 2);
    let bus = Arc::new(FakeBus::new(vec![first.clone()]));
    let script = Script {
        gate: Some(Notify::new()),
        fail: true,
        ..Script::default()
    };
    let mut cfg = lines_cfg(2, None);
    cfg.replug_grace = Duration::ZERO;
    let run = run_station(
        bus,
        script,
        cfg,
        Arc::new(Refuse),
        move |bus, script, summary, _| {
            tokio::spawn(async move {
                script.running.notified().await;
                // The cable is pulled while the job still runs; the job fails after that.
                bus.unplug(&first);
                tokio::time::sleep(Duration::from_millis(50)).await;
                script.gate.as_ref().unwrap().notify_one();
                wait_for(&summary, |s| s.failed == 1).await;
                let mut back = first.clone();
                back.address = 7;
                bus.plug(back);
                script.running.notified().await;
                script.gate.as_ref().unwrap().notify_one();
            })
        },
    )
    .await;
    assert_eq!(run.counters.starts.lock().unwrap().get("1-1"), Some(&2));
    assert_eq!(run.summary.failed, 2);
}

/// What announces the station (the `MACRESCUE: station ready, address …` line a boot test and
/// a technician wait for) waits for this signal: it comes once the station watches USB and has
/// printed its own ready line, never before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ready_signal_comes_after_the_station_watches_usb() {
    let out = Out::default();
    let (ready_tx, mut ready_rx) = tokio::sync::watch::channel(false);
    let station = Station::new(
        lines_cfg(1, None),
        Arc::new(FakeBus::new(Vec::new())),
        Arc::new(ScriptedJob {
            script: Arc::new(Script::default()),
            counters: Arc::new(Counters::default()),
        }),
        Arc::new(Refuse),
        Arc::new(NoNetwork),
        Box::new(out.clone()),
    )
    .with_ready(ready_tx);
    assert!(!*ready_rx.borrow());
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let run = tokio::spawn(station.run(async {
        let _ = stop_rx.await;
    }));
    tokio::time::timeout(Duration::from_secs(10), ready_rx.wait_for(|r| *r))
        .await
        .expect("the station never said it was ready")
        .unwrap();
    assert!(
        out.text()
            .starts_with("station: ready, up to 8 Macs at once; network not configured"),
        "{}",
        out.text()
    );
    drop(stop_tx);
    run.await.unwrap().unwrap();
}
