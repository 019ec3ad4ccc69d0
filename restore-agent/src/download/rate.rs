//! Download rate and time left, from samples of bytes done over a sliding window (a rate over
//! the whole run would hide a link that just slowed down).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct RateMeter {
    window: Duration,
    samples: VecDeque<(Instant, u64)>,
}

impl RateMeter {
    pub fn new(window: Duration) -> RateMeter {
        RateMeter {
            window,
            samples: VecDeque::new(),
        }
    }

    /// `done` bytes were fetched (this run) by `now`.
    pub fn record(&mut self, now: Instant, done: u64) {
        self.samples.push_back((now, done));
        // Keep one sample older than the window so the rate always spans a full window.
        while self.samples.len() > 2
            && now.saturating_duration_since(self.samples[1].0) >= self.window
        {
            self.samples.pop_front();
        }
    }

    /// Bytes per second over the window (0 until two samples exist).
    pub fn rate(&self) -> f64 {
        let (Some(first), Some(last)) = (self.samples.front(), self.samples.back()) else {
            return 0.0;
        };
        let secs = last.0.saturating_duration_since(first.0).as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        last.1.saturating_sub(first.1) as f64 / secs
    }

    /// Time to fetch `remaining` bytes at the current rate (None while the rate is unknown).
    pub fn eta(&self, remaining: u64) -> Option<Duration> {
        let rate = self.rate();
        if remaining == 0 {
            return Some(Duration::ZERO);
        }
        if rate <= 0.0 {
            return None;
        }
        Some(Duration::from_secs_f64(remaining as f64 / rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_eta_over_the_window() {
        let t = Instant::now();
        let mut m = RateMeter::new(Duration::from_secs(5));
        assert_eq!(m.rate(), 0.0);
        assert_eq!(m.eta(100), None);
        m.record(t, 0);
        m.record(t + Duration::from_secs(1), 1000);
        m.record(t + Duration::from_secs(2), 2000);
        assert_eq!(m.rate(), 1000.0);
        assert_eq!(m.eta(5000), Some(Duration::from_secs(5)));
        assert_eq!(m.eta(0), Some(Duration::ZERO));
    }

    #[test]
    fn old_samples_fall_out_of_the_window() {
        let t = Instant::now();
        let mut m = RateMeter::new(Duration::from_secs(2));
        m.record(t, 0);
        m.record(t + Duration::from_secs(1), 10_000); // a fast start
        for s in 2..=10 {
            m.record(t + Duration::from_secs(s), 10_000 + (s - 1) * 100);
        }
        assert_eq!(m.rate(), 100.0);
    }
}
