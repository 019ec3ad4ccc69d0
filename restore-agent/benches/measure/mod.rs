//! What the benchmarks measure with, shared by them (a subfolder, so cargo does not take it for
//! a benchmark of its own).

#![allow(dead_code)] // each benchmark uses its own part

pub const MIB: u64 = 1 << 20;

/// A benchmark knob from the environment, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Peak resident set size of this process in KiB (VmHWM).
pub fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Start a new peak measurement (Linux: writing 5 to clear_refs resets VmHWM).
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
