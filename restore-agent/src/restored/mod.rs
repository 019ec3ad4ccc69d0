//! The restored client (protocol.md §7): identifies the restore-mode Mac, starts the restore
//! with the Mac option set, and serves every request restored makes until its final status.
//!
//! * [`framing`] — 4-byte length + plist codec (sans-IO + async helpers);
//! * [`options`] — StartRestore options and capability tables;
//! * [`messages`] — device messages and the meaning of status codes;
//! * [`handlers`] — one handler per DataType;
//! * [`client`] — the session and message loop over any [`Connector`];
//! * [`context`] — what the firmware side must provide ([`RestoreContext`]).

pub mod client;
pub mod context;
pub mod cpio;
pub mod events;
pub mod framing;
pub mod handlers;
pub mod messages;
pub mod options;

pub use client::{RestoreConfig, RestoreOutcome, RestoredClient};
pub use context::{
    Connector, ContextError, LocalPolicyArgs, RestoreContext, UrlRequest, UrlResponse,
};
pub use events::RestoreEvent;

/// restored's TCP port.
pub const RESTORED_PORT: u16 = 62078;

/// Why a restore-mode session failed. Messages are for the technician.
#[derive(Debug, thiserror::Error)]
pub enum RestoredError {
    #[error(transparent)]
    Framing(#[from] framing::FramingError),
    #[error(transparent)]
    Message(#[from] messages::MessageError),
    #[error(
        "the device answers on port 62078 as {found:?}, not as restored: the Mac did not boot its \
         restore ramdisk; put it back in DFU and run the restore again"
    )]
    NotRestoreMode { found: String },
    #[error(
        "the restore-mode device has ECID {found:#x}, not the Mac being restored ({expected:#x}): \
         disconnect other Apple devices and run again"
    )]
    WrongMac { expected: u64, found: u64 },
    #[error("restored did not report {0}")]
    MissingValue(&'static str),
    #[error(
        "restored asked for data type {0:?}, which this agent does not support, so the restore \
         cannot continue; report the Mac model and macOS version to the macrescue developers"
    )]
    UnknownDataType(String),
    #[error("restored asked for data type {data_type:?}, which cannot be served: {why}")]
    UnsupportedRequest {
        data_type: String,
        why: &'static str,
    },
    #[error("restored's {data_type} request has no valid {field}")]
    BadRequest {
        data_type: String,
        field: &'static str,
    },
    #[error("cannot answer restored's {data_type} request: {source}")]
    Context {
        data_type: String,
        source: ContextError,
    },
    #[error("cannot connect to port {port} on the Mac for {purpose}: {source}")]
    Connect {
        port: u16,
        purpose: String,
        source: std::io::Error,
    },
    #[error("streaming the system image ({data_type}) failed: {source}")]
    Asr {
        data_type: String,
        source: crate::asr::AsrError,
    },
    #[error(
        "the Mac reported restore failure {status}{}: {cause}{}{}",
        amr_error.map(|a| format!(" (AMRError {a})")).unwrap_or_default(),
        if missing_required.is_empty() {
            String::new()
        } else {
            format!(" (restored requires: {})", missing_required.join(", "))
        },
        log.as_deref().map(|l| format!("\ndevice log:\n{l}")).unwrap_or_default()
    )]
    DeviceFailed {
        status: u64,
        amr_error: Option<i64>,
        cause: &'static str,
        /// Message types the device log names as missing and required.
        missing_required: Vec<String>,
        log: Option<String>,
    },
    #[error(
        "the connection to restored ended before the Mac reported its final status: the Mac \
         rebooted or the cable was pulled; check the Mac's screen, then restart from DFU"
    )]
    ConnectionLost,
    #[error(
        "restored did not answer within {0:?}: the restore ramdisk may have hung; check the \
         Mac's screen, then restart from DFU"
    )]
    NoAnswer(std::time::Duration),
    #[error("I/O error talking to restored: {0}")]
    Io(#[from] std::io::Error),
    #[error("a background request failed unexpectedly: {0}")]
    Task(String),
}
