//! What a restore reports while it runs.

use super::messages::Checkpoint;

/// An observation for the UI and the restore log.
#[derive(Debug, Clone, PartialEq)]
pub enum RestoreEvent {
    /// `ProgressMsg`: `name` from §7.8; `percent` is `None` when indeterminate.
    Progress {
        operation: u64,
        name: &'static str,
        percent: Option<u8>,
    },
    Checkpoint {
        checkpoint: Checkpoint,
        /// Plain-language hint for an error, when one is known.
        hint: Option<&'static str>,
    },
    /// A data request was served.
    DataServed {
        data_type: String,
        is_async: bool,
    },
    /// ASR progress (bytes of the system image sent).
    ImageProgress {
        sent: u64,
        total: u64,
    },
    PreviousRestoreLog(String),
    Crash {
        backtrace: Vec<String>,
    },
    /// Baseband updater output bytes read from their DataPort.
    BasebandUpdaterOutput(Vec<u8>),
    /// A message type this host does not know (already logged).
    UnknownMessage(String),
    /// `SavedDebugInfo` from before this restore.
    SavedDebugInfo(plist::Dictionary),
    /// The Mac reported the final status; `status` 0 = success.
    FinalStatus {
        status: u64,
        amr_error: Option<i64>,
        log: Option<String>,
    },
}
