//! The restored server on port 62078 (protocol.md §7) and the scenario player: answers the
//! host's queries, checks StartRestore like `is_host_compatible` would, then sends the
//! scenario's messages and validates every reply per DataType.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use plist::{Dictionary, Value};

use super::asr::{self, AsrFailure};
use super::link::{MuxLink, Stream};
use super::proxy::{self, ProxyReport};
use super::scenario::{DataRequest, ImageSource, ReverseProxy, Scenario, Step};
use crate::img4::{Im4m, Img4};

pub const RESTORED_PORT: u16 = 62078;
pub const ASR_PORT: u16 = 12345;
/// Largest FileData chunk (§7.7).
pub const FILE_DATA_MAX: usize = 8192;

/// Who the simulated Mac is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub board_config: String,
    pub cpid: u32,
    pub bdid: u32,
    pub ecid: u64,
    pub serial_number: String,
}

impl DeviceInfo {
    /// The identity a `SimMac` shows.
    pub fn of(board: &crate::board::Board, id: &crate::descriptors::Identity) -> DeviceInfo {
        DeviceInfo {
            board_config: board.board_config.clone(),
            cpid: board.cpid,
            bdid: board.bdid,
            ecid: id.ecid,
            serial_number: id.serial_number.clone(),
        }
    }
}

/// How a scenario ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Running,
    /// Status 0 sent and `ReceivedFinalStatusMsg` received.
    Succeeded,
    /// The scenario's own error StatusMsg was sent (a device-side failure).
    DeviceFailed {
        status: u64,
    },
    /// A host reply (or the StartRestore request) was wrong; the device failed the restore.
    Rejected {
        step: String,
        reason: String,
    },
    /// The host aborted as the scenario expected (unknown DataType).
    HostAborted {
        data_type: String,
    },
    /// A fault knob fired.
    Fault(String),
    /// The host went silent, disconnected or closed at the wrong time.
    Broken(String),
}

/// What tests read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub outcome: Outcome,
    /// Every DataType whose reply validated, in order.
    pub served: Vec<String>,
    /// Sessions on 62078 (more than one: a preflight-like host, §6.8).
    pub main_sessions: u32,
    pub asr: Option<asr::AsrResult>,
    pub proxy: Option<ProxyReport>,
    /// Human-readable log of what the device did and saw.
    pub log: Vec<String>,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            outcome: Outcome::Running,
            served: Vec::new(),
            main_sessions: 0,
            asr: None,
            proxy: None,
            log: Vec::new(),
        }
    }
}

#[derive(Debug)]
enum Stop {
    /// Fail the restore like restored: error StatusMsg with a Log, then end.
    Reject(String),
    Broken(String),
    Fault(String),
    Done(Outcome),
}

fn io_broken(e: std::io::Error) -> Stop {
    Stop::Broken(e.to_string())
}

/// 4-byte BE length + plist (§6.6). Accepts XML or binary.
fn read_frame(s: &Stream, timeout: Duration) -> Result<Dictionary, Stop> {
    let mut len = [0u8; 4];
    s.read_exact_timeout(&mut len, timeout).map_err(io_broken)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 16 << 20 {
        return Err(Stop::Reject(format!(
            "plist frame of {len} bytes is implausible"
        )));
    }
    let mut buf = vec![0; len];
    s.read_exact_timeout(&mut buf, timeout).map_err(io_broken)?;
    if !buf.starts_with(b"bplist00") && !buf.starts_with(b"<?xml") {
        return Err(Stop::Reject(
            "a restored plist frame must start with bplist00 or <?xml".into(),
        ));
    }
    let v: Value = plist::from_bytes(&buf)
        .map_err(|e| Stop::Reject(format!("host plist does not parse: {e}")))?;
    v.into_dictionary()
        .ok_or_else(|| Stop::Reject("host plist is not a dictionary".into()))
}

/// Like [`read_frame`] but keeps the raw bytes (URLAsset must be binary).
fn read_frame_raw(s: &Stream, timeout: Duration) -> Result<(Dictionary, Vec<u8>), Stop> {
    let mut len = [0u8; 4];
    s.read_exact_timeout(&mut len, timeout).map_err(io_broken)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 16 << 20 {
        return Err(Stop::Reject(format!(
            "plist frame of {len} bytes is implausible"
        )));
    }
    let mut buf = vec![0; len];
    s.read_exact_timeout(&mut buf, timeout).map_err(io_broken)?;
    let v: Value = plist::from_bytes(&buf)
        .map_err(|e| Stop::Reject(format!("host plist does not parse: {e}")))?;
    let d = v
        .into_dictionary()
        .ok_or_else(|| Stop::Reject("host plist is not a dictionary".into()))?;
    Ok((d, buf))
}

fn write_frame(s: &Stream, d: Dictionary) -> Result<(), Stop> {
    let mut buf = Vec::new();
    plist::to_writer_xml(&mut buf, &Value::Dictionary(d))
        .map_err(|e| Stop::Broken(e.to_string()))?;
    let mut out = (buf.len() as u32).to_be_bytes().to_vec();
    out.extend(buf);
    s.write_all(&out).map_err(io_broken)
}

fn dict(pairs: Vec<(&str, Value)>) -> Dictionary {
    let mut d = Dictionary::new();
    for (k, v) in pairs {
        d.insert(k.into(), v);
    }
    d
}

fn s(v: &str) -> Value {
    Value::String(v.into())
}

fn u(v: u64) -> Value {
    Value::Integer(v.into())
}

fn toml_to_plist(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(t) => match t.strip_prefix("hex:") {
            Some(h) => Value::Data(hex::decode(h).unwrap_or_default()),
            None => s(t),
        },
        toml::Value::Integer(i) => Value::Integer((*i).into()),
        toml::Value::Float(f) => Value::Real(*f),
        toml::Value::Boolean(b) => Value::Boolean(*b),
        toml::Value::Datetime(d) => s(&d.to_string()),
        toml::Value::Array(a) => Value::Array(a.iter().map(toml_to_plist).collect()),
        toml::Value::Table(t) => Value::Dictionary(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_plist(v)))
                .collect(),
        ),
    }
}

/// The player: one per restore-mode boot.
pub struct Player {
    link: MuxLink,
    scenario: Scenario,
    info: DeviceInfo,
    report: Arc<Mutex<Report>>,
    timeout: Duration,
}

impl Player {
    pub fn new(
        link: MuxLink,
        scenario: Scenario,
        info: DeviceInfo,
        report: Arc<Mutex<Report>>,
    ) -> Player {
        let timeout = link.timeout;
        Player {
            link,
            scenario,
            info,
            report,
            timeout,
        }
    }

    fn note(&self, line: String) {
        tracing::info!(target: "mac_sim::restored", "{line}");
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .log
            .push(line);
    }

    fn set_outcome(&self, o: Outcome) {
        self.note(format!("outcome: {o:?}"));
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .outcome = o;
    }

    /// Run to the end; the outcome lands in the report.
    pub fn run(self) {
        self.link.listen(RESTORED_PORT);
        let proxy_thread = match self.scenario.reverse_proxy {
            ReverseProxy::Off => None,
            mode => {
                self.link.listen(proxy::CTRL_PORT);
                let link = self.link.clone();
                let report = self.report.clone();
                let t = self.timeout;
                Some(std::thread::spawn(move || {
                    let r = proxy::serve(&link, mode == ReverseProxy::Ping, t);
                    report.lock().unwrap_or_else(|e| e.into_inner()).proxy = Some(r);
                }))
            }
        };
        let outcome = match self.run_inner(proxy_thread) {
            Ok(o) | Err(Stop::Done(o)) => o,
            Err(Stop::Broken(why)) => Outcome::Broken(why),
            Err(Stop::Fault(why)) => Outcome::Fault(why),
            Err(Stop::Reject(why)) => Outcome::Broken(format!("before StartRestore: {why}")),
        };
        self.set_outcome(outcome);
    }

    fn run_inner(
        &self,
        proxy_thread: Option<std::thread::JoinHandle<()>>,
    ) -> Result<Outcome, Stop> {
        let main = loop {
            let main = self
                .link
                .accept(RESTORED_PORT, self.timeout)
                .map_err(io_broken)?;
            self.report
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .main_sessions += 1;
            if let Some(options) = self.serve_requests(&main)? {
                if let Some(t) = proxy_thread {
                    let _ = t.join();
                    let proxy = self
                        .report
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .proxy
                        .clone();
                    if let Some(err) = proxy.and_then(|p| p.error) {
                        let why = format!(
                            "the reverse proxy on device port 1082 did not come up before \
                             StartRestore: {err}"
                        );
                        return self.reject(&main, "StartRestore", why, 10);
                    }
                }
                if let Err(why) = self.check_start_restore(&options) {
                    return self.reject(&main, "StartRestore", why, 10);
                }
                break main;
            }
        };
        for (i, step) in self.scenario.steps.iter().enumerate() {
            if self.scenario.faults.rst_main_after_step == Some(i) {
                main.reset("restored: simulated connection reset");
                return Err(Stop::Fault(format!(
                    "fault: device reset the restored connection after {i} steps"
                )));
            }
            let label = format!("step {} ({})", i + 1, step_name(step));
            match self.play(&main, step) {
                Ok(()) => {}
                Err(Stop::Reject(why)) => return self.reject(&main, &label, why, 14),
                Err(Stop::Done(o)) => return Ok(o),
                Err(Stop::Broken(why)) => return Err(Stop::Broken(format!("{label}: {why}"))),
                Err(Stop::Fault(why)) => return Err(Stop::Fault(why)),
            }
        }
        Err(Stop::Broken(
            "the scenario ended without a StatusMsg".into(),
        ))
    }

    /// Fail the restore as restored does: StatusMsg with the reason in Log.
    fn reject(
        &self,
        main: &Stream,
        step: &str,
        reason: String,
        status: u64,
    ) -> Result<Outcome, Stop> {
        self.note(format!("rejecting at {step}: {reason}"));
        let _ = write_frame(
            main,
            dict(vec![
                ("MsgType", s("StatusMsg")),
                ("Status", u(status)),
                ("Log", s(&format!("CHECKPOINT FAILURE: {step}: {reason}\n"))),
            ]),
        );
        Ok(Outcome::Rejected {
            step: step.to_string(),
            reason,
        })
    }

    /// Queries until StartRestore (Some(options)), or Goodbye or a host reset (None).
    fn serve_requests(&self, main: &Stream) -> Result<Option<Dictionary>, Stop> {
        loop {
            let req = match read_frame(main, self.timeout) {
                Ok(req) => req,
                // usbmuxd's preflight (1.1.1 with libimobiledevice 1.3.0, seen in
                // ci/vm/xcheck-test.sh) asks QueryType and then resets the connection without a
                // Goodbye; restored keeps waiting for the session that restores.
                Err(Stop::Broken(why)) if main.closed_by_host() => {
                    self.note(format!(
                        "session ended by the host before StartRestore: {why}"
                    ));
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            let name = req.get("Request").and_then(Value::as_string).unwrap_or("");
            self.note(format!("request {name}"));
            match name {
                "QueryType" => write_frame(
                    main,
                    dict(vec![
                        ("Type", s("com.apple.mobile.restored")),
                        (
                            "RestoreProtocolVersion",
                            u(self.scenario.restore_protocol_version),
                        ),
                        ("HardwareModel", s(&self.info.board_config.to_uppercase())),
                        ("SerialNumber", s(&self.info.serial_number)),
                    ]),
                )?,
                "QueryValue" => {
                    let key = req.get("QueryKey").and_then(Value::as_string).unwrap_or("");
                    let value = match key {
                        "HardwareInfo" => Value::Dictionary(dict(vec![
                            ("BoardID", u(self.info.bdid.into())),
                            ("ChipID", u(self.info.cpid.into())),
                            ("UniqueChipID", u(self.info.ecid)),
                            ("ProductionMode", Value::Boolean(true)),
                            ("SupportsImage4", Value::Boolean(true)),
                        ])),
                        "SavedDebugInfo" => Value::Dictionary(dict(vec![
                            ("PreviousExitStatus", u(0)),
                            ("USBLog", s("")),
                            ("PanicLog", s("")),
                        ])),
                        _ => {
                            write_frame(main, dict(vec![("Error", s("MissingValue"))]))?;
                            continue;
                        }
                    };
                    write_frame(main, dict(vec![(key, value)]))?;
                }
                "Goodbye" => {
                    write_frame(main, dict(vec![("Result", s("Success"))]))?;
                    return Ok(None);
                }
                "StartRestore" => return Ok(Some(req)),
                other => {
                    self.note(format!("unknown request {other:?}"));
                    write_frame(main, dict(vec![("Error", s("UnknownRequest"))]))?;
                }
            }
        }
    }

    /// §7.4/§7.5 and `is_host_compatible`.
    fn check_start_restore(&self, req: &Dictionary) -> Result<(), String> {
        let want_version = self.scenario.restore_protocol_version;
        if req
            .get("RestoreProtocolVersion")
            .and_then(Value::as_unsigned_integer)
            != Some(want_version)
        {
            return Err(format!(
                "RestoreProtocolVersion is {:?}, QueryType said {want_version}",
                req.get("RestoreProtocolVersion")
            ));
        }
        let opts = req
            .get("RestoreOptions")
            .and_then(Value::as_dictionary)
            .ok_or("StartRestore has no RestoreOptions dictionary")?;
        let mut problems = Vec::new();
        let b = |k: &str| opts.get(k).and_then(Value::as_boolean);
        for (k, want) in [
            ("AddSystemPartitionPadding", true),
            ("AllowUntetheredRestore", false),
            ("AuthInstallEnableSso", false),
            ("CreateFilesystemPartitions", true),
            ("FlashNOR", true),
            ("FormatForAPFS", true),
            ("InstallRecoveryOS", true),
            ("MacOSSwapPerformed", true),
            ("MacOSVariantPresent", true),
            ("RecoveryOSUnpack", true),
            ("ShouldRestoreSystemImage", true),
            ("SystemImage", true),
        ] {
            if b(k) != Some(want) {
                problems.push(format!("{k} is {:?}, expected {want}", opts.get(k)));
            }
        }
        let n = |k: &str| opts.get(k).and_then(Value::as_unsigned_integer);
        if n("AutoBootDelay") != Some(0) {
            problems.push(format!(
                "AutoBootDelay is {:?}, expected 0",
                opts.get("AutoBootDelay")
            ));
        }
        if n("recoveryOSPartitionSize") != Some(58201) {
            problems.push(format!(
                "recoveryOSPartitionSize is {:?}, expected 58201",
                opts.get("recoveryOSPartitionSize")
            ));
        }
        let behavior = opts
            .get("AuthInstallRestoreBehavior")
            .and_then(Value::as_string);
        if behavior != Some(self.scenario.behavior.as_str()) {
            problems.push(format!(
                "AuthInstallRestoreBehavior is {behavior:?}, this scenario is {:?}",
                self.scenario.behavior
            ));
        }
        for k in ["AuthInstallRecoveryOSVariant", "UUID", "RestoreBootArgs"] {
            if opts.get(k).and_then(Value::as_string).is_none() {
                problems.push(format!("{k} missing or not a string"));
            }
        }
        for k in [
            "BootImageType",
            "SystemImageFormat",
            "RestoreBundlePath",
            "KernelCacheType",
        ] {
            if opts.contains_key(k) {
                problems.push(format!(
                    "{k} is an iOS-only option and must not be sent to a Mac"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(format!("RestoreOptions wrong: {}", problems.join("; ")));
        }
        // is_host_compatible: presence of the key advertises support (§7.5).
        for (table, required, what) in [
            (
                "SupportedDataTypes",
                &self.scenario.required_data_types,
                "data type",
            ),
            (
                "SupportedMessageTypes",
                &self.scenario.required_message_types,
                "message",
            ),
        ] {
            let Some(t) = opts.get(table).and_then(Value::as_dictionary) else {
                return Err(format!("{table} missing from RestoreOptions"));
            };
            for r in required {
                if !t.contains_key(r) {
                    return Err(format!(
                        "host/device compatibility check found that a {what} is missing or is \
                         not supported (required): {r}. This host version is unsupported."
                    ));
                }
            }
        }
        Ok(())
    }

    fn send(&self, main: &Stream, d: Dictionary) -> Result<(), Stop> {
        write_frame(main, d)
    }

    fn play(&self, main: &Stream, step: &Step) -> Result<(), Stop> {
        match step {
            Step::DataRequestMsg(r) => self.data_request(main, r, "DataRequestMsg"),
            Step::AsyncDataRequestMsg(r) => self.data_request(main, r, "AsyncDataRequestMsg"),
            Step::ProgressMsg {
                operation,
                progress,
            } => self.send(
                main,
                dict(vec![
                    ("MsgType", s("ProgressMsg")),
                    ("Operation", u(*operation)),
                    ("Progress", Value::Integer((*progress).into())),
                ]),
            ),
            Step::CheckpointMsg {
                id,
                name,
                result,
                complete,
                error,
                warning,
            } => {
                let mut d = dict(vec![
                    ("MsgType", s("CheckpointMsg")),
                    ("CHECKPOINT_ID", u(*id)),
                    ("CHECKPOINT_NAME", s(name)),
                    ("CHECKPOINT_RESULT", Value::Integer((*result).into())),
                    ("CHECKPOINT_COMPLETE", Value::Boolean(*complete)),
                ]);
                if let Some(e) = error {
                    d.insert("CHECKPOINT_ERROR".into(), s(e));
                }
                if let Some(w) = warning {
                    d.insert("CHECKPOINT_WARNING".into(), s(w));
                }
                self.send(main, d)
            }
            Step::PreviousRestoreLogMsg { log } => self.send(
                main,
                dict(vec![
                    ("MsgType", s("PreviousRestoreLogMsg")),
                    ("PreviousRestoreLog", s(log)),
                ]),
            ),
            Step::RestoredCrash { backtrace } => self.send(
                main,
                dict(vec![
                    ("MsgType", s("RestoredCrash")),
                    (
                        "RestoredBacktrace",
                        Value::Array(backtrace.iter().map(|l| s(l)).collect()),
                    ),
                ]),
            ),
            Step::AsyncWait => self.send(main, dict(vec![("MsgType", s("AsyncWait"))])),
            Step::RestoreAttestation => {
                self.send(main, dict(vec![("MsgType", s("RestoreAttestation"))]))?;
                let r = read_frame(main, self.timeout)?;
                if r.get("RestoreShouldAttest").and_then(Value::as_boolean) != Some(false) {
                    return Err(Stop::Reject(format!(
                        "RestoreAttestation answered with {r:?}, expected {{RestoreShouldAttest: false}}"
                    )));
                }
                self.served("RestoreAttestation");
                Ok(())
            }
            Step::StatusMsg {
                status,
                log,
                amr_error,
            } => {
                let mut d = dict(vec![("MsgType", s("StatusMsg")), ("Status", u(*status))]);
                if let Some(l) = log {
                    d.insert("Log".into(), s(l));
                }
                if let Some(a) = amr_error {
                    d.insert("AMRError".into(), u(*a));
                }
                self.send(main, d)?;
                if *status != 0 {
                    // The host must have the failure before the Mac goes (a `dfu-after-failure`
                    // Mac re-enumerates at once): a link dropped with the StatusMsg still in
                    // flight reads as a pulled cable, and the erase that could fix the Mac is
                    // never offered. A host that stopped reading only costs the timeout.
                    let _ = main.flush_acked(self.timeout);
                    return Err(Stop::Done(Outcome::DeviceFailed { status: *status }));
                }
                let r = read_frame(main, self.timeout)?;
                if r.get("MsgType").and_then(Value::as_string) != Some("ReceivedFinalStatusMsg") {
                    return Err(Stop::Broken(format!(
                        "after StatusMsg 0 the host sent {r:?}, expected ReceivedFinalStatusMsg"
                    )));
                }
                Err(Stop::Done(Outcome::Succeeded))
            }
        }
    }

    fn served(&self, what: &str) {
        self.note(format!("{what}: reply valid"));
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .served
            .push(what.to_string());
    }

    fn data_request(&self, main: &Stream, r: &DataRequest, msg: &str) -> Result<(), Stop> {
        let dt = r.data_type.as_str();
        let asr = matches!(dt, "SystemImageData" | "RecoveryOSASRImage");
        let port = r.data_port.or(asr.then_some(ASR_PORT));
        if let Some(p) = port {
            self.link.listen(p);
        }
        let mut d = dict(vec![("MsgType", s(msg)), ("DataType", s(dt))]);
        if !r.arguments.is_empty() {
            d.insert(
                "Arguments".into(),
                toml_to_plist(&toml::Value::Table(r.arguments.clone())),
            );
        }
        if let Some(p) = r.data_port {
            d.insert("DataPort".into(), u(p.into()));
        }
        self.note(format!("{msg} {dt} (port {port:?})"));
        self.send(main, d)?;
        if r.expect_host_abort {
            // The host must fail at once, naming the DataType; any answer or a hang is wrong.
            return match read_frame(main, self.timeout) {
                Ok(reply) => Err(Stop::Reject(format!(
                    "the host answered the unknown DataType {dt} with {reply:?} instead of failing"
                ))),
                Err(Stop::Broken(why))
                    if why.contains("timed out") || why.contains("sent nothing") =>
                {
                    Err(Stop::Broken(format!(
                        "the host hung on the unknown DataType {dt}"
                    )))
                }
                Err(_) => Err(Stop::Done(Outcome::HostAborted {
                    data_type: dt.to_string(),
                })),
            };
        }
        let data_conn = match port {
            Some(p) => Some(self.link.accept(p, self.timeout).map_err(io_broken)?),
            None => None,
        };
        let conn = data_conn.as_ref().unwrap_or(main);
        let result = if asr {
            self.run_asr(main, conn)
        } else {
            self.validate_reply(conn, r)
        };
        if let Some(p) = port {
            self.link.unlisten(p);
        }
        if let (Err(Stop::Reject(why)), Some(c)) = (&result, &data_conn) {
            // restored drops the data connection when it refuses what came over it, so a
            // host still streaming sees the reason at once instead of a stalled window.
            c.reset(why);
        }
        result?;
        self.served(dt);
        Ok(())
    }

    fn run_asr(&self, main: &Stream, conn: &Stream) -> Result<(), Stop> {
        let mut image = ImageSource::open(&self.scenario.image)
            .map_err(|e| Stop::Broken(format!("the scenario's image: {e}")))?;
        let mut progress_err = None;
        let link = self.link.clone();
        let res = asr::run(
            conn,
            &self.scenario.asr,
            &mut image,
            &self.scenario.faults,
            |op, pct| {
                let d = dict(vec![
                    ("MsgType", s("ProgressMsg")),
                    ("Operation", u(op)),
                    ("Progress", Value::Integer(pct.into())),
                ]);
                if let Err(e) = write_frame(main, d) {
                    progress_err = Some(e);
                }
            },
            || link.set_gone(),
        );
        match res {
            Ok(r) => {
                if let Some(want) = &self.scenario.image.sha1 {
                    if !want.eq_ignore_ascii_case(&r.sha1) {
                        return Err(Stop::Reject(format!(
                            "restored image SHA-1 {} differs from the expected {want}",
                            r.sha1
                        )));
                    }
                }
                self.note(format!(
                    "ASR: {} bytes, {} chunks, sha1 {}",
                    r.bytes, r.chunks, r.sha1
                ));
                self.report.lock().unwrap_or_else(|e| e.into_inner()).asr = Some(r);
                match progress_err {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            }
            Err(AsrFailure::Invalid(why)) => Err(Stop::Reject(why)),
            Err(AsrFailure::Io(why)) => Err(Stop::Broken(format!("ASR: {why}"))),
            Err(AsrFailure::Fault(why)) => {
                if !self.link.is_gone() {
                    // A real Mac fails the restore when its ASR stream breaks.
                    let _ = write_frame(
                        main,
                        dict(vec![
                            ("MsgType", s("StatusMsg")),
                            ("Status", u(14)),
                            ("Log", s(&format!("ASR failed: {why}\n"))),
                        ]),
                    );
                }
                Err(Stop::Fault(why))
            }
        }
    }

    fn validate_reply(&self, conn: &Stream, r: &DataRequest) -> Result<(), Stop> {
        let dt = r.data_type.as_str();
        let board = (self.info.cpid, self.info.bdid, self.info.ecid);
        let reject = |m: String| Err(Stop::Reject(format!("{dt}: {m}")));
        match dt {
            "BootabilityBundle" | "BootabilityBundleV2" => {
                let n = read_cpio(conn, self.timeout)?;
                self.note(format!("{dt}: {n} cpio entries"));
                Ok(())
            }
            "URLAsset" | "StreamedImageDecryptionKey" => {
                let (d, raw) = read_frame_raw(conn, self.timeout)?;
                if !raw.starts_with(b"bplist00") {
                    return reject("the reply must be a binary plist".into());
                }
                if d.get("ResponseBody").and_then(Value::as_data).is_none()
                    || d.get("ResponseBodyDone").and_then(Value::as_boolean) != Some(true)
                    || d.get("ResponseStatus")
                        .and_then(Value::as_unsigned_integer)
                        .is_none()
                    || d.get("ResponseHeaders")
                        .and_then(Value::as_dictionary)
                        .is_none()
                {
                    return reject(format!(
                        "needs ResponseBody (data), ResponseBodyDone true, ResponseStatus, \
                         ResponseHeaders; got keys {:?}",
                        d.keys().collect::<Vec<_>>()
                    ));
                }
                Ok(())
            }
            "PersonalizedBootObjectV3" | "SourceBootObjectV4" | "SourceBootObjectV5" => {
                let data = read_file_data(conn, self.timeout)?;
                let name = r
                    .arguments
                    .get("ImageName")
                    .and_then(|v| v.as_str())
                    .unwrap_or("");
                match name {
                    "__GlobalManifest__" => check_ticket(&data, board).or_else(reject),
                    "__RestoreVersion__" | "__SystemVersion__" => plist::from_bytes::<Value>(&data)
                        .map(|_| ())
                        .or_else(|e| reject(format!("{name} is not a plist: {e}"))),
                    _ if dt == "PersonalizedBootObjectV3" => match Img4::parse(&data) {
                        Ok(img) if img.im4m.is_some() => Ok(()),
                        Ok(_) => reject(format!("{name} is an IMG4 without a ticket")),
                        Err(e) => reject(format!("{name} is not a personalized IMG4: {e}")),
                    },
                    _ if data.is_empty() => reject(format!("{name}: no bytes")),
                    _ => Ok(()),
                }
            }
            _ => {
                let d = read_frame(conn, self.timeout)?;
                self.validate_dict(dt, &d, r, board)
                    .map_err(|m| Stop::Reject(format!("{dt}: {m}")))
            }
        }
    }

    fn validate_dict(
        &self,
        dt: &str,
        d: &Dictionary,
        r: &DataRequest,
        board: (u32, u32, u64),
    ) -> Result<(), String> {
        let data = |k: &str| {
            d.get(k).and_then(Value::as_data).ok_or_else(|| {
                format!(
                    "reply needs {k} (data); got keys {:?}",
                    d.keys().collect::<Vec<_>>()
                )
            })
        };
        match dt {
            "RootTicket" => check_ticket(data("RootTicketData")?, board),
            "RecoveryOSRootTicketData" => {
                let t = d
                    .get("RootTicketData")
                    .or_else(|| d.get("RecoveryOSRootTicketData"))
                    .and_then(Value::as_data)
                    .ok_or("reply needs RootTicketData (data)")?;
                check_ticket(t, board)
            }
            "RecoveryOSLocalPolicy" | "RestoreLocalPolicy" => {
                let img = data("Ap,LocalPolicy")?;
                let p = Img4::parse(img).map_err(|e| format!("Ap,LocalPolicy is not IMG4: {e}"))?;
                if &p.im4p.fourcc.0 != b"lpol" {
                    return Err(format!(
                        "Ap,LocalPolicy payload is {:?}, expected lpol",
                        p.im4p.fourcc
                    ));
                }
                match &p.im4m {
                    Some(m) => check_ticket(m.raw, board),
                    None => Err("Ap,LocalPolicy has no ticket".into()),
                }
            }
            "BuildIdentityDict" => {
                let id = d
                    .get("BuildIdentityDict")
                    .and_then(Value::as_dictionary)
                    .ok_or("reply needs BuildIdentityDict (dict)")?;
                if d.get("Variant").and_then(Value::as_string).is_none() {
                    return Err("reply needs Variant (string)".into());
                }
                let variant = id
                    .get("Info")
                    .and_then(Value::as_dictionary)
                    .and_then(|i| i.get("Variant"))
                    .and_then(Value::as_string)
                    .ok_or("BuildIdentityDict has no Info.Variant")?;
                let recovery = r
                    .arguments
                    .get("IsRecoveryOS")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
                let want = r.expect_variant.clone().unwrap_or_else(|| {
                    if recovery {
                        "macOS Customer".into()
                    } else if self.scenario.behavior == "Erase" {
                        "Erase Install".into()
                    } else {
                        "Upgrade Install".into()
                    }
                });
                if !variant.contains(&want) {
                    return Err(format!(
                        "identity variant {variant:?} does not contain {want:?}"
                    ));
                }
                if id.get("Manifest").and_then(Value::as_dictionary).is_none() {
                    return Err("BuildIdentityDict has no Manifest".into());
                }
                Ok(())
            }
            "ReceiptManifest" => match d.get("ReceiptManifest").and_then(Value::as_dictionary) {
                Some(m) if !m.is_empty() => Ok(()),
                _ => Err("reply needs a non-empty ReceiptManifest dictionary".into()),
            },
            "FirmwareUpdaterPreflight" | "DeviceRestoreInfoPreflight" | "FDRTrustData" => {
                if d.is_empty() {
                    Ok(())
                } else {
                    Err(format!("expected an empty dictionary, got {d:?}"))
                }
            }
            "FirmwareUpdaterData" => check_firmware_response(d, r),
            "HostSystemTime" => {
                let t = match d.get("SetHostTimeOnDevice") {
                    Some(Value::Real(r)) => *r,
                    Some(Value::Integer(i)) => i.as_signed().unwrap_or(0) as f64,
                    _ => return Err("reply needs SetHostTimeOnDevice (seconds)".into()),
                };
                if t < 1_577_836_800.0 {
                    return Err(format!("SetHostTimeOnDevice {t} is before 2020"));
                }
                Ok(())
            }
            other => Err(format!(
                "the simulator has no validator for DataType {other}; mark the step \
                 expect_host_abort or add one"
            )),
        }
    }
}

fn step_name(s: &Step) -> String {
    match s {
        Step::DataRequestMsg(r) => format!("DataRequestMsg {}", r.data_type),
        Step::AsyncDataRequestMsg(r) => format!("AsyncDataRequestMsg {}", r.data_type),
        Step::ProgressMsg { .. } => "ProgressMsg".into(),
        Step::CheckpointMsg { name, .. } => format!("CheckpointMsg {name}"),
        Step::StatusMsg { .. } => "StatusMsg".into(),
        Step::PreviousRestoreLogMsg { .. } => "PreviousRestoreLogMsg".into(),
        Step::RestoredCrash { .. } => "RestoredCrash".into(),
        Step::RestoreAttestation => "RestoreAttestation".into(),
        Step::AsyncWait => "AsyncWait".into(),
    }
}

/// The coprocessor chip and nonce a firmware-updater request reported (§4.9), which the
/// ticket in the reply must be bound to.
fn updater_binding(args: &Dictionary) -> (Option<u64>, Option<Vec<u8>>) {
    let name = args
        .get("MessageArgUpdaterName")
        .and_then(Value::as_string)
        .unwrap_or_default();
    let info = args.get("MessageArgInfo").and_then(Value::as_dictionary);
    let (src, chip, nonce) = match name {
        "AppleTypeCRetimer" => (
            info.and_then(|i| i.get("InfoArray"))
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .and_then(Value::as_dictionary)
                .and_then(|e| e.get("HardwareID"))
                .and_then(Value::as_dictionary),
            "ChipID",
            "Nonce",
        ),
        "AppleTCON" => (info, "Baobab,ChipID", "Baobab,UpdateNonce"),
        "T200" => (info, "ChipID", "Nonce"),
        "Rose" => (info, "Rap,ChipID", "Rap,Nonce"),
        _ => (None, "", ""),
    };
    (
        src.and_then(|s| s.get(chip))
            .and_then(Value::as_unsigned_integer),
        src.and_then(|s| s.get(nonce))
            .and_then(Value::as_data)
            .map(<[u8]>::to_vec),
    )
}

/// Validate a `FirmwareUpdaterData` reply: `FirmwareResponseData` present; with
/// `expect_ticket`, that ticket signed with the test key for the reported coprocessor and
/// nonce; with `expect_firmware`, `FirmwareData` of that shape.
pub fn check_firmware_response(reply: &Dictionary, r: &DataRequest) -> Result<(), String> {
    let resp = match reply.get("FirmwareResponseData") {
        Some(Value::Dictionary(d)) => d,
        Some(_) if r.expect_ticket.is_none() && r.expect_firmware.is_none() => return Ok(()),
        Some(_) => return Err("FirmwareResponseData is not a dictionary".into()),
        None => return Err("reply needs FirmwareResponseData".into()),
    };
    if let Some(key) = &r.expect_ticket {
        let raw = resp.get(key).and_then(Value::as_data).ok_or_else(|| {
            format!(
                "FirmwareResponseData has no {key} (data); keys {:?}",
                resp.keys().collect::<Vec<_>>()
            )
        })?;
        let m = Im4m::parse(raw).map_err(|e| format!("{key} is not an IM4M: {e}"))?;
        let sig = m.signature.ok_or_else(|| format!("{key} is not signed"))?;
        if !crate::ticket::verify_signature(m.signed_set, sig) {
            return Err(format!("{key} is not signed by the trusted (test) key"));
        }
        let args = match toml_to_plist(&toml::Value::Table(r.arguments.clone())) {
            Value::Dictionary(d) => d,
            _ => Dictionary::new(),
        };
        let (chip, nonce) = updater_binding(&args);
        if let Some(chip) = chip {
            if m.manp_uint("CHIP") != Some(chip) {
                return Err(format!(
                    "{key} is for CHIP {:?}, the coprocessor is {chip:#x}",
                    m.manp_uint("CHIP")
                ));
            }
        }
        if let Some(nonce) = nonce {
            if m.manp_data("BNCH") != Some(nonce.as_slice()) {
                return Err(format!(
                    "{key} is not bound to the coprocessor's nonce {}",
                    hex::encode(&nonce)
                ));
            }
        }
    }
    match (r.expect_firmware.as_deref(), resp.get("FirmwareData")) {
        (None, _) => Ok(()),
        (Some("none"), None) => Ok(()),
        (Some("none"), Some(_)) => Err("FirmwareData was sent but not asked for".into()),
        (Some(_), None) => Err("FirmwareResponseData has no FirmwareData".into()),
        (Some("data"), Some(Value::Data(b))) if !b.is_empty() => Ok(()),
        (Some("ftab"), Some(Value::Data(b))) => {
            let t = crate::ftab::Table::parse(b).map_err(|e| format!("FirmwareData: {e}"))?;
            if &t.tag != b"rkos" {
                return Err(format!("FirmwareData table tag is {:?}, not rkos", t.tag));
            }
            match t.entries.last() {
                Some((tag, data)) if tag == b"rrko" && !data.is_empty() => Ok(()),
                _ => Err("FirmwareData does not end with the restore OS (rrko) entry".into()),
            }
        }
        (Some(shape), Some(v)) => Err(format!("FirmwareData {v:?} is not of shape {shape}")),
    }
}

/// An IM4M for this Mac: CHIP and BORD must match, ECID too unless the ticket says 0.
pub fn check_ticket(data: &[u8], (cpid, bdid, ecid): (u32, u32, u64)) -> Result<(), String> {
    let m = Im4m::parse(data).map_err(|e| format!("ticket is not an IM4M: {e}"))?;
    let chip = m.manp_uint("CHIP");
    let bord = m.manp_uint("BORD");
    if chip != Some(cpid.into()) || bord != Some(bdid.into()) {
        return Err(format!(
            "ticket is for CHIP {chip:?} BORD {bord:?}, this Mac is CHIP {cpid:#x} BORD {bdid:#x}"
        ));
    }
    if let Some(e) = m.manp_uint("ECID") {
        if e != 0 && e != ecid {
            return Err(format!("ticket is for ECID {e:#x}, this Mac is {ecid:#x}"));
        }
    }
    Ok(())
}

/// `{FileData: ≤8192}`… then `{FileDataDone: true}`.
fn read_file_data(conn: &Stream, timeout: Duration) -> Result<Vec<u8>, Stop> {
    let mut out = Vec::new();
    loop {
        let d = read_frame(conn, timeout)?;
        if d.get("FileDataDone").and_then(Value::as_boolean) == Some(true) {
            return Ok(out);
        }
        let chunk = d.get("FileData").and_then(Value::as_data).ok_or_else(|| {
            Stop::Reject(format!(
                "expected FileData or FileDataDone, got keys {:?}",
                d.keys().collect::<Vec<_>>()
            ))
        })?;
        if chunk.len() > FILE_DATA_MAX {
            return Err(Stop::Reject(format!(
                "FileData chunk of {} bytes exceeds {FILE_DATA_MAX}",
                chunk.len()
            )));
        }
        out.extend_from_slice(chunk);
        if out.len() > 256 << 20 {
            return Err(Stop::Reject("FileData stream exceeds 256 MiB".into()));
        }
    }
}

fn octal(field: &[u8]) -> Option<u64> {
    u64::from_str_radix(std::str::from_utf8(field).ok()?, 8).ok()
}

/// A cpio odc stream ending in TRAILER!!! then EOF (§7.7.1); returns the entry count.
fn read_cpio(conn: &Stream, timeout: Duration) -> Result<usize, Stop> {
    let bad = |m: String| Stop::Reject(format!("BootabilityBundle: {m}"));
    let mut entries = 0;
    loop {
        let mut h = [0u8; 76];
        if let Err(e) = conn.read_exact_timeout(&mut h, timeout) {
            if conn.closed_by_host() {
                return Err(bad(format!(
                    "the host closed the stream after {entries} entries without TRAILER!!!"
                )));
            }
            return Err(io_broken(e));
        }
        if &h[..6] != b"070707" {
            return Err(bad(format!(
                "entry {entries} has magic {:?}, expected 070707",
                &h[..6]
            )));
        }
        let (Some(namesize), Some(filesize)) = (octal(&h[59..65]), octal(&h[65..76])) else {
            return Err(bad(format!("entry {entries} has non-octal size fields")));
        };
        if octal(&h[24..30]) != Some(0) || octal(&h[30..36]) != Some(0) {
            return Err(bad(format!("entry {entries} uid/gid must be 0")));
        }
        if namesize == 0 || namesize > 4096 {
            return Err(bad(format!("entry {entries} namesize {namesize}")));
        }
        let mut name = vec![0u8; namesize as usize];
        conn.read_exact_timeout(&mut name, timeout)
            .map_err(io_broken)?;
        if name.pop() != Some(0) {
            return Err(bad(format!("entry {entries} name is not NUL-terminated")));
        }
        let mut left = filesize;
        let mut buf = [0u8; 8192];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            conn.read_exact_timeout(&mut buf[..n], timeout)
                .map_err(io_broken)?;
            left -= n as u64;
        }
        if name == b"TRAILER!!!" {
            if filesize != 0 {
                return Err(bad("TRAILER!!! must have size 0".into()));
            }
            if entries == 0 {
                return Err(bad("the stream has no entries before TRAILER!!!".into()));
            }
            // The host closes the data connection after the trailer.
            conn.wait_closed(timeout)
                .map_err(|_| bad("the host kept the connection open after TRAILER!!!".into()))?;
            return Ok(entries);
        }
        entries += 1;
    }
}
