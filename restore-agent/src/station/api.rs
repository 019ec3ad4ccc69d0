//! The per-Mac engine API the station builds on (issue #7 item 1): the engine's own types,
//! re-exported so the station and its tests name one place.

pub use crate::engine::{erase_code, EngineEvent, EraseConfirmer, EraseDecision, Stage};
