//! The agent's own resource use, for the per-Mac report and the demo's benchmark: CPU time
//! (what the agent itself computes, as opposed to waiting on the Mac or the network) and peak
//! resident memory, from `getrusage(RUSAGE_SELF)`.

use std::time::Duration;

/// User + system CPU time of the whole process so far.
pub fn cpu_time() -> Duration {
    rusage()
        .map(|r| tv(r.ru_utime) + tv(r.ru_stime))
        .unwrap_or_default()
}

/// Peak resident set size of the process so far, in KiB (Linux reports `ru_maxrss` in KiB).
pub fn peak_rss_kib() -> u64 {
    rusage()
        .map(|r| u64::try_from(r.ru_maxrss).unwrap_or(0))
        .unwrap_or(0)
}

fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
        + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
}

fn rusage() -> Option<libc::rusage> {
    // SAFETY: getrusage only writes the struct we pass; zeroed is a valid rusage.
    unsafe {
        let mut r: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_SELF, &mut r) == 0).then_some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_grows_with_work_and_rss_is_reported() {
        let before = cpu_time();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(cpu_time() > before);
        assert!(peak_rss_kib() > 0);
    }
}
