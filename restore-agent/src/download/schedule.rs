//! Which byte range each connection fetches next: parts from a queue, retries with backoff,
//! and tail racing. Sans-IO: the edge reports progress and outcomes and asks what to do.
//!
//! A *part* is a fixed slice of the file; an *attempt* is one HTTP request for (a rest of) a
//! part. A part normally has one attempt at a time; near the end of the download an idle
//! connection may start a second, racing attempt for the slowest part's remaining bytes. Both
//! write the same bytes at the same offsets, so whichever finishes first completes the part and
//! the other is cancelled: the file is never corrupted by the race.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::ranges::{split, ByteRange, RangeSet};

pub type AttemptId = u64;

/// Knobs of the scheduler (defaults in [`super::DownloadOptions`]).
#[derive(Debug, Clone)]
pub struct SchedulePolicy {
    /// Consecutive failed attempts of one part (without any progress) before giving up.
    pub max_failures: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Race a part once the queue is empty and its estimated time left exceeds this.
    pub tail_race_after: Duration,
    /// An attempt younger than this has no trustworthy rate yet and is never raced.
    pub race_min_age: Duration,
}

/// What a connection should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Fetch `range` as attempt `id`; `race` when it duplicates a running attempt.
    Fetch {
        id: AttemptId,
        range: ByteRange,
        race: bool,
    },
    /// Nothing to start now; ask again at `until` (or on any change if None).
    Wait { until: Option<Instant> },
    /// Every byte is on disk.
    Finished,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// All bytes of its range were written.
    Completed,
    /// Failed; `backoff` false for failures worth retrying at once (a stall: the connection is
    /// stuck, not the server overloaded).
    Failed { backoff: bool },
    /// Stopped because a racing attempt won, or the download is ending.
    Cancelled,
}

/// What the edge must do after an attempt ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AfterEnd {
    /// Attempts racing for a part that is now complete: stop them.
    pub cancel: Vec<AttemptId>,
    /// The part failed too often: abort the download with the last error.
    pub give_up: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartState {
    Queued { not_before: Option<Instant> },
    Active,
    Done,
}

#[derive(Debug)]
struct Part {
    range: ByteRange,
    state: PartState,
    failures: u32,
}

#[derive(Debug)]
struct Attempt {
    part: usize,
    range: ByteRange,
    pos: u64,
    started: Instant,
    bytes: u64,
}

#[derive(Debug)]
pub struct Scheduler {
    total: u64,
    done: RangeSet,
    parts: Vec<Part>,
    attempts: HashMap<AttemptId, Attempt>,
    next_id: AttemptId,
    policy: SchedulePolicy,
    /// Smoothed rate of completed attempts (bytes/s): what a healthy connection achieves.
    typical_rate: Option<f64>,
    /// Parts a reader is waiting for (a restore reading the file while it downloads), most
    /// recent request first: handed out before the rest of the queue.
    urgent: VecDeque<usize>,
    /// Part indices by file offset: the queue order (parts split by [`Self::prioritize`] are
    /// appended to `parts` but keep their place in the file).
    order: Vec<usize>,
}

impl Scheduler {
    /// Plan the bytes of `0..total` not yet in `have`, in parts of at most `chunk` bytes.
    pub fn new(total: u64, have: RangeSet, chunk: u64, policy: SchedulePolicy) -> Scheduler {
        let missing = have.gaps(ByteRange::new(0, total));
        let parts = split(&missing, chunk)
            .into_iter()
            .map(|range| Part {
                range,
                state: PartState::Queued { not_before: None },
                failures: 0,
            })
            .collect::<Vec<_>>();
        let n = parts.len();
        Scheduler {
            total,
            done: have,
            parts,
            attempts: HashMap::new(),
            next_id: 1,
            policy,
            typical_rate: None,
            urgent: VecDeque::new(),
            order: (0..n).collect(),
        }
    }

    /// A reader needs `want` now: the queued bytes of it become parts of their own, fetched
    /// before anything else. Bytes already on disk or in flight are left alone (an attempt in
    /// flight reaches them at its connection's speed; parts are small enough for that).
    pub fn prioritize(&mut self, want: ByteRange) {
        let want = ByteRange::new(want.start.min(self.total), want.end.min(self.total));
        if want.is_empty() {
            return;
        }
        let mut found = Vec::new();
        for i in 0..self.parts.len() {
            let p = &self.parts[i];
            if !matches!(p.state, PartState::Queued { .. })
                || p.range.end <= want.start
                || p.range.start >= want.end
            {
                continue;
            }
            let (range, failures) = (p.range, p.failures);
            let mid = ByteRange::new(range.start.max(want.start), range.end.min(want.end));
            // The part itself keeps the wanted middle (no attempt refers to a queued part, so
            // its index may be reused); the rest goes back to the queue as new parts.
            self.parts[i].range = mid;
            self.parts[i].state = PartState::Queued { not_before: None };
            for rest in [
                ByteRange::new(range.start, mid.start),
                ByteRange::new(mid.end, range.end),
            ] {
                if !rest.is_empty() {
                    let idx = self.parts.len();
                    self.parts.push(Part {
                        range: rest,
                        state: PartState::Queued { not_before: None },
                        failures,
                    });
                    let parts = &self.parts;
                    let at = self
                        .order
                        .partition_point(|&j| parts[j].range.start < rest.start);
                    self.order.insert(at, idx);
                }
            }
            found.push(i);
        }
        self.urgent.retain(|i| !found.contains(i));
        for i in found.into_iter().rev() {
            self.urgent.push_front(i);
        }
    }

    /// Whether a reader is waiting for a part nobody fetches yet.
    pub fn has_urgent(&self) -> bool {
        self.urgent
            .iter()
            .any(|&i| matches!(self.parts[i].state, PartState::Queued { .. }))
    }

    /// Like [`Self::next`] but only for parts a reader waits for: the connection kept free for
    /// them, so the first bytes a restore needs never queue behind the bulk of the file.
    pub fn next_urgent(&mut self, now: Instant) -> Next {
        if let Some(n) = self.take_urgent(now) {
            return n;
        }
        if self.is_finished() {
            return Next::Finished;
        }
        Next::Wait { until: None }
    }

    fn take_urgent(&mut self, now: Instant) -> Option<Next> {
        while let Some(&i) = self.urgent.front() {
            if !matches!(self.parts[i].state, PartState::Queued { .. }) {
                self.urgent.pop_front();
                continue;
            }
            let Some(gap) = self.done.gaps(self.parts[i].range).first().copied() else {
                self.parts[i].state = PartState::Done;
                self.urgent.pop_front();
                continue;
            };
            // Backoff is ignored on purpose: someone is waiting, and a failed urgent part is
            // retried by the next free connection.
            self.urgent.pop_front();
            self.parts[i].state = PartState::Active;
            return Some(self.start(i, gap, false, now));
        }
        None
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes written so far (including those present at start).
    pub fn done(&self) -> &RangeSet {
        &self.done
    }

    pub fn active_attempts(&self) -> usize {
        self.attempts.len()
    }

    pub fn is_finished(&self) -> bool {
        self.parts.iter().all(|p| p.state == PartState::Done)
    }

    pub fn next(&mut self, now: Instant) -> Next {
        if let Some(n) = self.take_urgent(now) {
            return n;
        }
        let mut wake: Option<Instant> = None;
        let mut queued = false;
        for k in 0..self.order.len() {
            let i = self.order[k];
            let PartState::Queued { not_before } = self.parts[i].state else {
                continue;
            };
            // Racing attempts may have written parts of a queued part already; fetch only its
            // first gap (the rest is queued again when that attempt completes).
            let Some(gap) = self.done.gaps(self.parts[i].range).first().copied() else {
                self.parts[i].state = PartState::Done;
                continue;
            };
            queued = true;
            if let Some(t) = not_before.filter(|t| *t > now) {
                wake = Some(wake.map_or(t, |w| w.min(t)));
                continue;
            }
            self.parts[i].state = PartState::Active;
            return self.start(i, gap, false, now);
        }
        if self.is_finished() {
            return Next::Finished;
        }
        if !queued {
            if let Some((i, range)) = self.race_candidate(now) {
                return self.start(i, range, true, now);
            }
        }
        Next::Wait { until: wake }
    }

    fn start(&mut self, part: usize, range: ByteRange, race: bool, now: Instant) -> Next {
        let id = self.next_id;
        self.next_id += 1;
        self.attempts.insert(
            id,
            Attempt {
                part,
                range,
                pos: range.start,
                started: now,
                bytes: 0,
            },
        );
        Next::Fetch { id, range, race }
    }

    /// The running attempt expected to finish last, if it is worth racing: it must be slow
    /// (no bytes yet, or under half of what healthy connections achieve) as well as far from
    /// done. Racing a healthy part would only fetch its bytes twice at the same speed.
    fn race_candidate(&self, now: Instant) -> Option<(usize, ByteRange)> {
        let mut per_part: HashMap<usize, usize> = HashMap::new();
        for a in self.attempts.values() {
            *per_part.entry(a.part).or_default() += 1;
        }
        let mut best: Option<(f64, usize, ByteRange)> = None;
        for a in self.attempts.values() {
            if per_part[&a.part] != 1 || self.parts[a.part].state != PartState::Active {
                continue;
            }
            let age = now.saturating_duration_since(a.started);
            if age < self.policy.race_min_age {
                continue;
            }
            let rest = ByteRange::new(a.pos, a.range.end);
            let eta = eta_secs(rest.len(), a.bytes, age);
            if rest.is_empty() || eta <= self.policy.tail_race_after.as_secs_f64() {
                continue;
            }
            let rate = a.bytes as f64 / age.as_secs_f64();
            let slow = a.bytes == 0 || self.typical_rate.is_some_and(|t| rate < t / 2.0);
            if !slow {
                continue;
            }
            let better = match &best {
                None => true,
                Some((e, _, _)) => eta > *e,
            };
            if better {
                best = Some((eta, a.part, rest));
            }
        }
        best.map(|(_, part, rest)| (part, rest))
    }

    /// Attempt `id` wrote `written` to the file.
    pub fn on_progress(&mut self, id: AttemptId, written: ByteRange) {
        self.done.insert(written);
        if let Some(a) = self.attempts.get_mut(&id) {
            a.pos = a.pos.max(written.end);
            a.bytes += written.len();
            self.parts[a.part].failures = 0;
        }
    }

    pub fn on_end(&mut self, id: AttemptId, end: AttemptEnd, now: Instant) -> AfterEnd {
        let mut after = AfterEnd::default();
        let Some(a) = self.attempts.remove(&id) else {
            return after;
        };
        let others: Vec<AttemptId> = self
            .attempts
            .iter()
            .filter(|(_, o)| o.part == a.part)
            .map(|(k, _)| *k)
            .collect();
        if end == AttemptEnd::Completed {
            let secs = now.saturating_duration_since(a.started).as_secs_f64();
            if secs > 0.0 && a.bytes > 0 {
                let r = a.bytes as f64 / secs;
                self.typical_rate = Some(match self.typical_rate {
                    None => r,
                    Some(t) => 0.7 * t + 0.3 * r,
                });
            }
        }
        let part = &mut self.parts[a.part];
        if self.done.contains(part.range) {
            part.state = PartState::Done;
            after.cancel = others;
            for o in &after.cancel {
                self.attempts.remove(o);
            }
            return after;
        }
        let mut not_before = None;
        if let AttemptEnd::Failed { backoff } = end {
            part.failures += 1;
            if part.failures > self.policy.max_failures {
                after.give_up = true;
            }
            if backoff {
                not_before = Some(now + backoff_delay(&self.policy, part.failures));
            }
        }
        // A sibling attempt still running carries the part on; it is re-queued (for whatever
        // gaps remain) when the last attempt ends.
        if others.is_empty() && part.state != PartState::Done {
            part.state = PartState::Queued { not_before };
        }
        after
    }
}

/// Seconds left for `rest` bytes at the rate seen so far (infinite with no bytes yet).
fn eta_secs(rest: u64, bytes: u64, age: Duration) -> f64 {
    let secs = age.as_secs_f64();
    if bytes == 0 || secs <= 0.0 {
        return f64::INFINITY;
    }
    rest as f64 / (bytes as f64 / secs)
}

/// Exponential backoff: base, 2×base, 4×base, … up to max.
pub fn backoff_delay(p: &SchedulePolicy, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    p.backoff_base
        .saturating_mul(1u32 << exp)
        .min(p.backoff_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> SchedulePolicy {
        SchedulePolicy {
            max_failures: 3,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            tail_race_after: Duration::from_secs(2),
            race_min_age: Duration::from_secs(1),
        }
    }

    fn r(s: u64, e: u64) -> ByteRange {
        ByteRange::new(s, e)
    }

    fn fetch(n: Next) -> (AttemptId, ByteRange, bool) {
        match n {
            Next::Fetch { id, range, race } => (id, range, race),
            other => panic!("expected a fetch, got {other:?}"),
        }
    }

    #[test]
    fn hands_out_parts_in_order_then_waits_then_finishes() {
        let t = Instant::now();
        let mut s = Scheduler::new(25, RangeSet::new(), 10, policy());
        let (a, ra, _) = fetch(s.next(t));
        let (b, rb, _) = fetch(s.next(t));
        let (c, rc, _) = fetch(s.next(t));
        assert_eq!((ra, rb, rc), (r(0, 10), r(10, 20), r(20, 25)));
        assert_eq!(s.next(t), Next::Wait { until: None });
        for (id, range) in [(a, ra), (b, rb), (c, rc)] {
            s.on_progress(id, range);
            assert_eq!(s.on_end(id, AttemptEnd::Completed, t), AfterEnd::default());
        }
        assert_eq!(s.next(t), Next::Finished);
        assert_eq!(s.done().covered(), 25);
    }

    #[test]
    fn a_wanted_range_is_fetched_before_the_queue_and_the_rest_keeps_file_order() {
        let t = Instant::now();
        let mut s = Scheduler::new(100, RangeSet::new(), 40, policy());
        let (a, ra, _) = fetch(s.next(t));
        assert_eq!(ra, r(0, 40));
        // 50..55 lies in the queued part 40..80; 38..42 partly in the running one.
        s.prioritize(r(38, 42));
        s.prioritize(r(50, 55));
        assert!(s.has_urgent());
        assert_eq!(
            fetch(s.next_urgent(t)).1,
            r(50, 55),
            "the latest wish first"
        );
        assert_eq!(fetch(s.next(t)).1, r(40, 42));
        assert!(!s.has_urgent());
        assert_eq!(s.next_urgent(t), Next::Wait { until: None });
        // The remainder in file order: 42..50, 55..80, 80..100.
        assert_eq!(fetch(s.next(t)).1, r(42, 50));
        assert_eq!(fetch(s.next(t)).1, r(55, 80));
        assert_eq!(fetch(s.next(t)).1, r(80, 100));
        s.on_progress(a, ra);
        s.on_end(a, AttemptEnd::Completed, t);
        // Bytes on disk or past the end are never asked for again.
        s.prioritize(r(0, 10));
        s.prioritize(r(100, 120));
        assert!(!s.has_urgent());
    }

    #[test]
    fn resumes_only_the_missing_bytes() {
        let t = Instant::now();
        let have = RangeSet::from_ranges([r(0, 12), r(20, 30)]);
        let mut s = Scheduler::new(30, have, 100, policy());
        assert_eq!(fetch(s.next(t)).1, r(12, 20));
        assert_eq!(s.next(t), Next::Wait { until: None });
    }

    #[test]
    fn a_failed_attempt_resumes_where_it_stopped_after_backoff() {
        let t = Instant::now();
        let mut s = Scheduler::new(100, RangeSet::new(), 100, policy());
        let (id, _, _) = fetch(s.next(t));
        s.on_progress(id, r(0, 40));
        let after = s.on_end(id, AttemptEnd::Failed { backoff: true }, t);
        assert!(!after.give_up);
        let wake = t + Duration::from_millis(100);
        assert_eq!(s.next(t), Next::Wait { until: Some(wake) });
        let (_, range, race) = fetch(s.next(wake));
        assert_eq!((range, race), (r(40, 100), false));
    }

    #[test]
    fn a_stalled_attempt_is_retried_at_once() {
        let t = Instant::now();
        let mut s = Scheduler::new(100, RangeSet::new(), 100, policy());
        let (id, _, _) = fetch(s.next(t));
        s.on_end(id, AttemptEnd::Failed { backoff: false }, t);
        assert_eq!(fetch(s.next(t)).1, r(0, 100));
    }

    #[test]
    fn gives_up_after_repeated_failures_without_progress() {
        let t = Instant::now();
        let mut s = Scheduler::new(100, RangeSet::new(), 100, policy());
        let mut now = t;
        for i in 1..=4 {
            let (id, _, _) = fetch(s.next(now));
            let after = s.on_end(id, AttemptEnd::Failed { backoff: true }, now);
            assert_eq!(after.give_up, i == 4, "failure {i}");
            now += Duration::from_secs(10);
        }
    }

    #[test]
    fn progress_resets_the_failure_count() {
        let t = Instant::now();
        let mut s = Scheduler::new(100, RangeSet::new(), 100, policy());
        let mut now = t;
        for i in 0..10u64 {
            let (id, range, _) = fetch(s.next(now));
            assert_eq!(range.start, i * 5);
            s.on_progress(id, r(i * 5, i * 5 + 5));
            assert!(
                !s.on_end(id, AttemptEnd::Failed { backoff: true }, now)
                    .give_up
            );
            now += Duration::from_secs(10);
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = policy();
        let d: Vec<u128> = (1..=6).map(|f| backoff_delay(&p, f).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn races_the_slowest_part_once_the_queue_is_empty() {
        let t = Instant::now();
        let mut s = Scheduler::new(3000, RangeSet::new(), 1000, policy());
        let (fast, _, _) = fetch(s.next(t));
        let (slow, _, _) = fetch(s.next(t));
        let (steady, _, _) = fetch(s.next(t));
        // A healthy connection: 1000 B/s.
        s.on_progress(fast, r(0, 1000));
        s.on_end(fast, AttemptEnd::Completed, t + Duration::from_secs(1));
        let later = t + Duration::from_secs(3);
        s.on_progress(slow, r(1000, 1030)); // 10 B/s, 970 left: 97 s
        s.on_progress(steady, r(2000, 2600)); // 200 B/s, 400 left: 2 s
        let (racer, range, race) = fetch(s.next(later));
        assert!(race);
        assert_eq!(range, r(1030, 2000));
        // A part already raced is not raced again, and the steady one is not worth it.
        assert_eq!(s.next(later), Next::Wait { until: None });
        // The racer wins: the original is cancelled and the part is done.
        s.on_progress(racer, r(1030, 2000));
        let after = s.on_end(racer, AttemptEnd::Completed, later);
        assert_eq!(after.cancel, vec![slow]);
        s.on_progress(steady, r(2600, 3000));
        s.on_end(steady, AttemptEnd::Completed, later);
        // The cancelled original reporting in changes nothing.
        assert_eq!(
            s.on_end(slow, AttemptEnd::Cancelled, later),
            AfterEnd::default()
        );
        assert_eq!(s.next(later), Next::Finished);
    }

    #[test]
    fn healthy_parts_are_not_raced_however_long_they_take() {
        let t = Instant::now();
        let mut s = Scheduler::new(3000, RangeSet::new(), 1000, policy());
        let (a, _, _) = fetch(s.next(t));
        let (b, _, _) = fetch(s.next(t));
        let (c, _, _) = fetch(s.next(t));
        s.on_progress(a, r(0, 1000));
        s.on_end(a, AttemptEnd::Completed, t + Duration::from_secs(100));
        // 10 B/s everywhere: slow, but as fast as this link goes.
        let later = t + Duration::from_secs(10);
        s.on_progress(b, r(1000, 1100));
        s.on_progress(c, r(2000, 2100));
        assert_eq!(s.next(later), Next::Wait { until: None });
    }

    #[test]
    fn a_failing_original_leaves_the_racer_in_charge() {
        let t = Instant::now();
        let mut s = Scheduler::new(1000, RangeSet::new(), 1000, policy());
        let (orig, _, _) = fetch(s.next(t));
        // Nothing at all for 5 s: raced even before any rate is known.
        let later = t + Duration::from_secs(5);
        let (racer, range, _) = fetch(s.next(later));
        assert_eq!(range, r(0, 1000));
        s.on_progress(orig, r(0, 20));
        s.on_end(orig, AttemptEnd::Failed { backoff: true }, later);
        // Not re-queued while the racer runs.
        assert_eq!(s.next(later), Next::Wait { until: None });
        s.on_progress(racer, r(0, 1000));
        assert!(s
            .on_end(racer, AttemptEnd::Completed, later)
            .cancel
            .is_empty());
        assert_eq!(s.next(later), Next::Finished);
    }

    #[test]
    fn young_or_quick_attempts_are_not_raced() {
        let t = Instant::now();
        let mut s = Scheduler::new(1000, RangeSet::new(), 1000, policy());
        let (id, _, _) = fetch(s.next(t));
        assert_eq!(
            s.next(t + Duration::from_millis(500)),
            Next::Wait { until: None }
        );
        s.on_progress(id, r(0, 900));
        assert_eq!(
            s.next(t + Duration::from_secs(2)),
            Next::Wait { until: None }
        );
    }
}
