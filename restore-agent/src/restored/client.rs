//! A restored session: identify, StartRestore, then the message loop (protocol.md §7.2–§7.9).
//!
//! Synchronous `DataRequestMsg`s are served in order on the loop, as idevicerestore does (the
//! device waits for them; mux flow control holds its other messages meanwhile).
//! `AsyncDataRequestMsg`s run on their own tasks while the loop keeps reading; a failing one
//! fails the restore.

use std::sync::Arc;
use std::time::Duration;

use plist::{Dictionary, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::asr::{self, AsrConfig, AsrStats};
use crate::reverse_proxy::{self, ProxyConfig};

use super::context::{Connector, RestoreContext};
use super::events::RestoreEvent;
use super::framing::{self, Encoding, FramedReader};
use super::handlers::{self, Destination, Reply, FILE_DATA_CHUNK};
use super::messages::{self, DataRequest, DeviceMessage};
use super::options::{self, StartRestoreParams};
use super::{RestoredError, RESTORED_PORT};

/// Tunables of a session.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// The Mac's ECID; the restore-mode device must report the same `UniqueChipID`.
    pub expected_ecid: Option<u64>,
    pub asr: AsrConfig,
    /// Attempts to connect to a device port (restored, DataPorts, ASR) before giving up.
    pub connect_attempts: u32,
    pub connect_retry_delay: Duration,
    /// How long restored may take to answer QueryType/QueryValue (the message loop itself has
    /// no timeout: restored can be silent for minutes while it works).
    pub query_timeout: Duration,
    /// Run the reverse proxy on device port 1082 (§7.10).
    pub reverse_proxy: bool,
    pub proxy: ProxyConfig,
}

impl Default for RestoreConfig {
    fn default() -> Self {
        Self {
            expected_ecid: None,
            asr: AsrConfig::default(),
            // idevicerestore: ASR 30 × 2 s; the others fewer. One generous setting for all.
            connect_attempts: 30,
            connect_retry_delay: Duration::from_secs(2),
            query_timeout: Duration::from_secs(30),
            reverse_proxy: true,
            proxy: ProxyConfig::default(),
        }
    }
}

/// How a successful restore went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RestoreOutcome {
    pub restore_protocol_version: u64,
    /// Data types served, in completion order.
    pub data_served: Vec<String>,
    pub asr_sessions: Vec<AsrStats>,
}

type MainWriter<S> = Arc<Mutex<WriteHalf<S>>>;

struct Shared<C, K> {
    ctx: Arc<C>,
    connector: Arc<K>,
    config: RestoreConfig,
}

/// One session with restored on port 62078.
pub struct RestoredClient<C, K: Connector> {
    shared: Arc<Shared<C, K>>,
    reader: FramedReader<ReadHalf<K::Stream>>,
    main: MainWriter<K::Stream>,
    protocol_version: u64,
}

pub(crate) async fn connect_retrying<K: Connector>(
    connector: &K,
    port: u16,
    attempts: u32,
    delay: Duration,
    purpose: &str,
) -> Result<K::Stream, RestoredError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match connector.connect(port).await {
            Ok(s) => return Ok(s),
            Err(e)
                if attempt < attempts.max(1)
                    && e.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                debug!(port, attempt, "port not open yet: {e}");
                tokio::time::sleep(delay).await;
            }
            Err(source) => {
                return Err(RestoredError::Connect {
                    port,
                    purpose: purpose.to_owned(),
                    source,
                })
            }
        }
    }
}

impl<C: RestoreContext, K: Connector> RestoredClient<C, K> {
    /// Opens the restored connection (and nothing else).
    pub async fn connect(
        ctx: Arc<C>,
        connector: Arc<K>,
        config: RestoreConfig,
    ) -> Result<Self, RestoredError> {
        let stream = connect_retrying(
            &*connector,
            RESTORED_PORT,
            config.connect_attempts,
            config.connect_retry_delay,
            "restored",
        )
        .await?;
        let (r, w) = tokio::io::split(stream);
        Ok(Self {
            shared: Arc::new(Shared {
                ctx,
                connector,
                config,
            }),
            reader: FramedReader::new(r),
            main: Arc::new(Mutex::new(w)),
            protocol_version: 0,
        })
    }

    async fn send(&self, d: &Dictionary) -> Result<(), RestoredError> {
        let mut w = self.main.lock().await;
        framing::write_message(&mut *w, d, Encoding::Xml).await?;
        Ok(())
    }

    /// The answer to a query, within the query timeout.
    async fn receive(&mut self) -> Result<Dictionary, RestoredError> {
        let timeout = self.shared.config.query_timeout;
        tokio::time::timeout(timeout, self.reader.read_message())
            .await
            .map_err(|_| RestoredError::NoAnswer(timeout))??
            .ok_or(RestoredError::ConnectionLost)
    }

    /// QueryType; requires `com.apple.mobile.restored`. Returns the whole answer.
    pub async fn query_type(&mut self) -> Result<Dictionary, RestoredError> {
        self.send(&options::request("QueryType")).await?;
        let answer = self.receive().await?;
        let kind = answer.get("Type").and_then(Value::as_string).unwrap_or("");
        if kind != "com.apple.mobile.restored" {
            return Err(RestoredError::NotRestoreMode {
                found: kind.to_owned(),
            });
        }
        self.protocol_version = answer
            .get("RestoreProtocolVersion")
            .and_then(Value::as_unsigned_integer)
            .ok_or(RestoredError::MissingValue("RestoreProtocolVersion"))?;
        info!(version = self.protocol_version, "restored is up");
        Ok(answer)
    }

    /// QueryValue `key`; the value (restored answers `{key: value}`).
    pub async fn query_value(&mut self, key: &str) -> Result<Option<Value>, RestoredError> {
        let mut req = options::request("QueryValue");
        req.insert("QueryKey".into(), Value::String(key.into()));
        self.send(&req).await?;
        let mut answer = self.receive().await?;
        Ok(answer.remove(key).or_else(|| answer.remove("Value")))
    }

    /// QueryType, HardwareInfo (checks the ECID), SavedDebugInfo (reported as an event).
    pub async fn identify(&mut self) -> Result<u64, RestoredError> {
        self.query_type().await?;
        let hw = self
            .query_value("HardwareInfo")
            .await?
            .and_then(Value::into_dictionary)
            .ok_or(RestoredError::MissingValue("HardwareInfo"))?;
        let ecid = hw
            .get("UniqueChipID")
            .and_then(Value::as_unsigned_integer)
            .ok_or(RestoredError::MissingValue("HardwareInfo.UniqueChipID"))?;
        if let Some(expected) = self.shared.config.expected_ecid {
            if expected != ecid {
                return Err(RestoredError::WrongMac {
                    expected,
                    found: ecid,
                });
            }
        }
        info!(
            ecid = format_args!("{ecid:#x}"),
            "restore-mode Mac identified"
        );
        if let Some(Value::Dictionary(saved)) = self.query_value("SavedDebugInfo").await? {
            info!(keys = %messages::summary(&saved), "saved debug info from the previous run");
            self.shared.ctx.event(RestoreEvent::SavedDebugInfo(saved));
        }
        Ok(self.protocol_version)
    }

    /// Sends StartRestore (`params.restore_protocol_version` is taken from QueryType if that
    /// ran).
    pub async fn start_restore(
        &mut self,
        mut params: StartRestoreParams,
    ) -> Result<(), RestoredError> {
        if self.protocol_version != 0 {
            params.restore_protocol_version = self.protocol_version;
        } else {
            self.protocol_version = params.restore_protocol_version;
        }
        info!(behavior = params.behavior.as_str(), uuid = %params.uuid, "starting the restore");
        self.send(&options::start_restore_request(&params)).await
    }

    /// The whole session: identify, reverse proxy, StartRestore, message loop.
    pub async fn restore(
        mut self,
        params: StartRestoreParams,
    ) -> Result<RestoreOutcome, RestoredError> {
        self.identify().await?;
        let proxy = self.shared.config.reverse_proxy.then(|| {
            let connector = self.shared.connector.clone();
            let cfg = self.shared.config.proxy.clone();
            tokio::spawn(async move {
                if let Err(e) = reverse_proxy::run(&*connector, &cfg).await {
                    warn!("reverse proxy stopped: {e}");
                }
            })
        });
        self.start_restore(params).await?;
        let result = self.run().await;
        if let Some(p) = proxy {
            p.abort();
        }
        result
    }

    /// Serves restored's messages until the final status.
    pub async fn run(mut self) -> Result<RestoreOutcome, RestoredError> {
        let mut outcome = RestoreOutcome {
            restore_protocol_version: self.protocol_version,
            ..RestoreOutcome::default()
        };
        let mut tasks: JoinSet<Result<(String, Option<AsrStats>), RestoredError>> = JoinSet::new();
        let result = loop {
            let msg = tokio::select! {
                m = self.reader.read_message() => m,
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    match joined {
                        Ok(Ok((dt, stats))) => {
                            outcome.data_served.push(dt);
                            outcome.asr_sessions.extend(stats);
                            continue;
                        }
                        Ok(Err(e)) => break Err(e),
                        Err(j) => break Err(RestoredError::Task(j.to_string())),
                    }
                }
            };
            let dict = match msg {
                Ok(Some(d)) => d,
                Ok(None) => break Err(RestoredError::ConnectionLost),
                Err(e) => break Err(e.into()),
            };
            let message = match DeviceMessage::parse(dict) {
                Ok(m) => m,
                Err(e) => break Err(e.into()),
            };
            match self.on_message(message, &mut tasks, &mut outcome).await {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(e) => break Err(e),
            }
        };
        tasks.abort_all();
        result.map(|()| outcome)
    }

    /// Handles one message; `Ok(true)` when the restore is finished.
    async fn on_message(
        &mut self,
        message: DeviceMessage,
        tasks: &mut JoinSet<Result<(String, Option<AsrStats>), RestoredError>>,
        outcome: &mut RestoreOutcome,
    ) -> Result<bool, RestoredError> {
        let ctx = &self.shared.ctx;
        match message {
            DeviceMessage::DataRequest(req) => {
                info!(data_type = %req.data_type, port = ?req.port, is_async = req.is_async, "data request");
                if req.is_async {
                    let shared = self.shared.clone();
                    let main = self.main.clone();
                    tasks.spawn(async move { serve(&shared, &main, req).await });
                } else {
                    let (dt, stats) = serve(&self.shared, &self.main, req).await?;
                    outcome.data_served.push(dt);
                    outcome.asr_sessions.extend(stats);
                }
            }
            DeviceMessage::Progress {
                operation,
                progress,
            } => {
                let name = messages::progress_operation_name(operation, self.protocol_version);
                let percent = u8::try_from(progress).ok().filter(|p| *p <= 100);
                debug!(operation, name, ?percent, "progress");
                ctx.event(RestoreEvent::Progress {
                    operation,
                    name,
                    percent,
                });
            }
            DeviceMessage::Checkpoint(cp) => {
                let hint = cp.error.as_deref().and_then(messages::checkpoint_hint);
                if cp.error.is_some() || cp.result != 0 {
                    warn!(id = cp.id, name = ?cp.name, result = cp.result, error = ?cp.error, "checkpoint reported a problem");
                } else {
                    debug!(id = cp.id, name = ?cp.name, complete = cp.complete, "checkpoint");
                }
                ctx.event(RestoreEvent::Checkpoint {
                    checkpoint: cp,
                    hint,
                });
            }
            DeviceMessage::Status {
                status,
                amr_error,
                log,
            } => {
                ctx.event(RestoreEvent::FinalStatus {
                    status,
                    amr_error,
                    log: log.clone(),
                });
                return match messages::status_cause(status) {
                    None => {
                        info!("the Mac reports the restore finished");
                        let mut d = Dictionary::new();
                        d.insert(
                            "MsgType".into(),
                            Value::String("ReceivedFinalStatusMsg".into()),
                        );
                        self.send(&d).await?;
                        Ok(true)
                    }
                    Some(cause) => Err(RestoredError::DeviceFailed {
                        status,
                        amr_error,
                        cause,
                        missing_required: log
                            .as_deref()
                            .map(messages::missing_required_types)
                            .unwrap_or_default(),
                        log,
                    }),
                };
            }
            DeviceMessage::PreviousRestoreLog(log) => {
                info!(len = log.len(), "previous restore log received");
                ctx.event(RestoreEvent::PreviousRestoreLog(log));
            }
            DeviceMessage::RestoredCrash { backtrace } => {
                warn!(lines = backtrace.len(), "restored crashed");
                ctx.event(RestoreEvent::Crash { backtrace });
            }
            DeviceMessage::BasebandUpdaterOutputData { port } => {
                if let Some(port) = port {
                    let c = &self.shared.config;
                    let mut s = connect_retrying(
                        &*self.shared.connector,
                        port,
                        c.connect_attempts,
                        c.connect_retry_delay,
                        "baseband updater output",
                    )
                    .await?;
                    let mut out = Vec::new();
                    s.read_to_end(&mut out).await?;
                    ctx.event(RestoreEvent::BasebandUpdaterOutput(out));
                }
            }
            DeviceMessage::RestoreAttestation => {
                let mut d = Dictionary::new();
                d.insert("RestoreShouldAttest".into(), Value::Boolean(false));
                self.send(&d).await?;
            }
            DeviceMessage::AsyncWait => debug!("restored: AsyncWait"),
            DeviceMessage::BasebandUpdateStatus(d) => {
                debug!(keys = %messages::summary(&d), "baseband update status")
            }
            DeviceMessage::RestoreProtocol(d) => {
                info!(keys = %messages::summary(&d), "restored: RestoreProtocol")
            }
            DeviceMessage::Unknown { msg_type, message } => {
                warn!(%msg_type, keys = %messages::summary(&message), "unknown restored message ignored");
                ctx.event(RestoreEvent::UnknownMessage(msg_type));
            }
        }
        Ok(false)
    }
}

/// Builds and delivers the reply to one request.
async fn serve<C: RestoreContext, K: Connector>(
    shared: &Shared<C, K>,
    main: &MainWriter<K::Stream>,
    req: DataRequest,
) -> Result<(String, Option<AsrStats>), RestoredError> {
    let reply = handlers::handle(&*shared.ctx, &req).await?;
    let c = &shared.config;
    let connect = |port: u16| {
        connect_retrying(
            &*shared.connector,
            port,
            c.connect_attempts,
            c.connect_retry_delay,
            &req.data_type,
        )
    };
    let mut stats = None;
    match reply {
        Reply::Asr => {
            let port = req.port.unwrap_or(handlers::DEFAULT_ASR_PORT);
            let image = shared
                .ctx
                .os_image()
                .await
                .map_err(|source| RestoredError::Context {
                    data_type: req.data_type.clone(),
                    source,
                })?;
            let mut stream = connect(port).await?;
            let ctx = shared.ctx.clone();
            let mut progress =
                move |sent, total| ctx.event(RestoreEvent::ImageProgress { sent, total });
            let s = asr::stream_image(&mut stream, image, &c.asr, &mut progress)
                .await
                .map_err(|source| RestoredError::Asr {
                    data_type: req.data_type.clone(),
                    source,
                })?;
            stream.shutdown().await.ok();
            stats = Some(s);
        }
        Reply::Raw(bytes) => {
            // A missing DataPort was rejected by the handler.
            let port = req.port.unwrap_or_default();
            let mut stream = connect(port).await?;
            stream.write_all(&bytes).await?;
            stream.flush().await?;
            stream.shutdown().await.ok();
        }
        Reply::Plists(dest, dicts) => {
            let frames = dicts
                .iter()
                .map(|d| framing::encode(d, Encoding::Xml))
                .collect::<Result<Vec<_>, _>>()?;
            send_frames(dest, req.port, frames, main, &connect).await?;
        }
        Reply::BinaryPlist(dest, d) => {
            let frames = vec![framing::encode(&d, Encoding::Binary)?];
            send_frames(dest, req.port, frames, main, &connect).await?;
        }
        Reply::FileData(dest, data) => {
            let mut frames = Vec::with_capacity(data.len() / FILE_DATA_CHUNK + 2);
            for chunk in data.chunks(FILE_DATA_CHUNK) {
                let mut d = Dictionary::new();
                d.insert("FileData".into(), Value::Data(chunk.to_vec()));
                frames.push(framing::encode(&d, Encoding::Xml)?);
            }
            let mut done = Dictionary::new();
            done.insert("FileDataDone".into(), Value::Boolean(true));
            frames.push(framing::encode(&done, Encoding::Xml)?);
            send_frames(dest, req.port, frames, main, &connect).await?;
        }
    }
    shared.ctx.event(RestoreEvent::DataServed {
        data_type: req.data_type.clone(),
        is_async: req.is_async,
    });
    Ok((req.data_type, stats))
}

async fn send_frames<S, F, Fut>(
    dest: Destination,
    port: Option<u16>,
    frames: Vec<Vec<u8>>,
    main: &MainWriter<S>,
    connect: &F,
) -> Result<(), RestoredError>
where
    S: tokio::io::AsyncWrite,
    F: Fn(u16) -> Fut,
    Fut: std::future::Future<Output = Result<S, RestoredError>>,
    S: tokio::io::AsyncRead + Unpin,
{
    match (dest, port) {
        (Destination::DataPortOrMain, Some(port)) => {
            let mut s = connect(port).await?;
            for f in &frames {
                s.write_all(f).await?;
            }
            s.flush().await?;
            s.shutdown().await.ok();
        }
        _ => {
            // Holding the lock for all frames keeps a FileData stream contiguous.
            let mut w = main.lock().await;
            for f in &frames {
                w.write_all(f).await?;
            }
            w.flush().await?;
        }
    }
    Ok(())
}
