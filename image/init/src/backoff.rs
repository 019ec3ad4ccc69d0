//! When to restart a station that exited.
//!
//! A station that crashes right after starting (bad config, missing hardware) must not spin the
//! CPU or flood the console, but one that ran fine for a while and then died should come back at
//! once: the delay doubles for quick deaths up to a ceiling and resets after a stable run.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    /// A run at least this long counts as healthy and resets the delay.
    stable: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration, stable: Duration) -> Self {
        let max = max.max(min);
        Self {
            min,
            max,
            stable,
            next: min,
        }
    }

    /// The station exited after running for `ran`: how long to wait before starting it again.
    pub fn on_exit(&mut self, ran: Duration) -> Duration {
        if ran >= self.stable {
            self.next = self.min;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_for_quick_deaths_and_resets_after_a_stable_run() {
        let s = Duration::from_secs;
        let mut b = Backoff::new(Duration::from_millis(500), s(8), s(60));
        let quick = Duration::from_millis(10);
        let delays: Vec<_> = (0..7).map(|_| b.on_exit(quick)).collect();
        assert_eq!(
            delays,
            vec![
                Duration::from_millis(500),
                s(1),
                s(2),
                s(4),
                s(8),
                s(8),
                s(8)
            ]
        );
        assert_eq!(b.on_exit(s(60)), Duration::from_millis(500));
        assert_eq!(b.on_exit(quick), s(1));
    }

    #[test]
    fn ceiling_below_floor_is_raised_to_the_floor() {
        let mut b = Backoff::new(
            Duration::from_secs(2),
            Duration::from_secs(1),
            Duration::MAX,
        );
        assert_eq!(b.on_exit(Duration::ZERO), Duration::from_secs(2));
        assert_eq!(b.on_exit(Duration::ZERO), Duration::from_secs(2));
    }
}
