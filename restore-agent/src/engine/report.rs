//! The per-Mac report: what was done to which Mac, how long each stage took, and every erase
//! decision. Serialized as one JSON line by the CLI and kept by the station.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{Behavior, EraseDecision, Stage};

/// Seconds since the Unix epoch with milliseconds; reports are read by people and scripts.
pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| (d.as_millis() as f64) / 1000.0)
        .unwrap_or(0.0)
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageTiming {
    pub stage: Stage,
    /// Which attempt (1 = revive, 2 = erase after a confirmation).
    pub attempt: u32,
    pub behavior: Behavior,
    pub start: f64,
    pub end: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointRecord {
    pub attempt: u32,
    pub name: String,
    pub result: i64,
}

/// One erase decision: asked because of `reason`, answered `decision` at `at` via `how`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EraseRecord {
    pub reason: String,
    pub code: String,
    pub asked_at: f64,
    /// `confirmed`, `refused`, `timed out`, or `not needed` (an erase was never asked for).
    pub decision: String,
    pub how: Option<String>,
    pub at: f64,
}

impl EraseRecord {
    pub fn new(reason: &str, code: &str, asked: SystemTime, d: &EraseDecision) -> EraseRecord {
        let now = SystemTime::now();
        let (decision, how, at) = match d {
            EraseDecision::Confirmed { how, at } => ("confirmed", Some(how.clone()), *at),
            EraseDecision::Refused { how } => ("refused", Some(how.clone()), now),
            EraseDecision::TimedOut => ("timed out", None, now),
        };
        EraseRecord {
            reason: reason.to_string(),
            code: code.to_string(),
            asked_at: unix_seconds(asked),
            decision: decision.to_string(),
            how,
            at: unix_seconds(at),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MacReport {
    /// Marketing name (`MacBook Pro (14-inch, M3)`), when known.
    pub model: Option<String>,
    pub product_type: Option<String>,
    pub board: Option<String>,
    /// The ECID as 16 hex digits (the way Apple tools print it).
    pub ecid: Option<String>,
    pub version: Option<String>,
    pub build: Option<String>,
    /// The behaviour of the last attempt.
    pub behavior: Behavior,
    pub stages: Vec<StageTiming>,
    pub checkpoints: Vec<CheckpointRecord>,
    /// `succeeded` or `failed`.
    pub result: String,
    pub failure: Option<FailureRecord>,
    /// Failure of the revive when an erase followed (the final `failure` is the erase's).
    pub revive_failure: Option<FailureRecord>,
    pub erase_decision: Option<EraseRecord>,
    /// When the IPSW was downloaded during the restore: how that download ended (checked
    /// against the catalog's SHA-1 or not, or why the restore's result is a failure).
    pub firmware_download: Option<String>,
    pub started: f64,
    pub finished: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailureRecord {
    pub cause: String,
    pub next_step: String,
    pub erase_could_fix: bool,
}

impl MacReport {
    pub fn new(behavior: Behavior) -> MacReport {
        let now = unix_seconds(SystemTime::now());
        MacReport {
            model: None,
            product_type: None,
            board: None,
            ecid: None,
            version: None,
            build: None,
            behavior,
            stages: Vec::new(),
            checkpoints: Vec::new(),
            result: "failed".into(),
            failure: None,
            revive_failure: None,
            erase_decision: None,
            firmware_download: None,
            started: now,
            finished: now,
        }
    }

    pub fn succeeded(&self) -> bool {
        self.result == "succeeded"
    }

    /// Closes the running stage and opens `stage`.
    pub fn enter(&mut self, stage: Stage, attempt: u32, behavior: Behavior) {
        let now = unix_seconds(SystemTime::now());
        self.close_stage(now);
        self.stages.push(StageTiming {
            stage,
            attempt,
            behavior,
            start: now,
            end: None,
        });
    }

    pub fn close_stage(&mut self, now: f64) {
        if let Some(last) = self.stages.last_mut() {
            if last.end.is_none() {
                last.end = Some(now);
            }
        }
    }

    pub fn to_json_line(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}
