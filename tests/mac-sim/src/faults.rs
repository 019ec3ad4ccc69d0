//! Faults a test can inject into the simulated Mac.
//!
//! Placeholder so `iboot.rs` compiles on its own branch; the device model's branch owns the real
//! definition (with at least this field) and replaces this file at merge.

/// Injected misbehaviour.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Stall the EP0 request that carries this iBoot command (matched against the whole
    /// command line or its first word).
    pub stall_command: Option<String>,
}
