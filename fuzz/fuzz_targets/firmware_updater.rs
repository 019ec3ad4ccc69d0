#![no_main]

use libfuzzer_sys::fuzz_target;

// Each target uses one of the harness entry points.
#[allow(dead_code)]
#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::firmware_updater(data));
