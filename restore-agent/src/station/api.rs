//! The per-Mac engine API the station builds on, as agreed with the engine (issue #7 item 1).
//!
//! Stand-in until `crate::engine` lands on this branch: the station only needs the event and
//! confirmation types, so it compiles and is tested on its own. When the engine is merged this
//! file becomes a re-export of `crate::engine`'s items of the same names.

use std::time::SystemTime;

/// The stages of one Mac's restore, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Stage {
    Identify,
    PickBuild,
    Firmware,
    Tickets,
    Dfu,
    Stage1,
    Stage2,
    RestoreMode,
    Done,
}

/// What the engine tells the station about one Mac while it works on it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum EngineEvent {
    Stage {
        stage: Stage,
    },
    Identified {
        ecid: u64,
        product_type: String,
        board: String,
        name: String,
    },
    Build {
        version: String,
        build: String,
    },
    Progress {
        what: String,
        done: u64,
        total: Option<u64>,
        rate_bps: Option<f64>,
    },
    Checkpoint {
        name: String,
        result: i64,
    },
    Message(String),
    Failed {
        cause: String,
        next_step: String,
        erase_could_fix: bool,
    },
    Succeeded,
}

/// Asks a person at the station whether a Mac may be erased. Implementations only ever read
/// local, physical inputs (a tty, a GPIO button): see ARCHITECTURE.md, "erase invariant".
pub trait EraseConfirmer: Send + Sync {
    fn confirm_erase(&self, ecid: u64, code: &str, reason: &str) -> EraseDecision;
}

/// The answer to one erase question, recorded in the Mac's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EraseDecision {
    Confirmed { how: String, at: SystemTime },
    Refused { how: String },
    TimedOut,
}

/// The short code a person types to confirm erasing the Mac with this ECID: six digits, so it
/// is quick to type yet tied to the Mac on screen (a code read off another row won't match).
pub fn erase_code(ecid: u64) -> String {
    let mixed = (ecid ^ (ecid >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!("{:06}", (mixed >> 20) % 1_000_000)
}
