//! Sets of byte ranges: which parts of a file are on disk, which are missing.

use serde::{Deserialize, Serialize};

/// A half-open byte range `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn new(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// Disjoint, sorted, non-adjacent ranges (adjacent ones are merged, so a finished download is
/// one range however it was fetched).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<ByteRange>,
}

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// From untrusted input (a state file): overlapping, unsorted or empty ranges are fine.
    pub fn from_ranges(ranges: impl IntoIterator<Item = ByteRange>) -> RangeSet {
        let mut s = RangeSet::new();
        for r in ranges {
            s.insert(r);
        }
        s
    }

    pub fn ranges(&self) -> &[ByteRange] {
        &self.ranges
    }

    /// Total bytes covered.
    pub fn covered(&self) -> u64 {
        self.ranges.iter().map(ByteRange::len).sum()
    }

    pub fn insert(&mut self, r: ByteRange) {
        if r.is_empty() {
            return;
        }
        // First range that ends at or after r.start (touching counts, to merge).
        let i = self.ranges.partition_point(|x| x.end < r.start);
        let mut merged = r;
        let mut j = i;
        while j < self.ranges.len() && self.ranges[j].start <= merged.end {
            merged.start = merged.start.min(self.ranges[j].start);
            merged.end = merged.end.max(self.ranges[j].end);
            j += 1;
        }
        self.ranges.splice(i..j, [merged]);
    }

    /// True if every byte of `r` is in the set.
    pub fn contains(&self, r: ByteRange) -> bool {
        if r.is_empty() {
            return true;
        }
        let i = self.ranges.partition_point(|x| x.end <= r.start);
        self.ranges
            .get(i)
            .is_some_and(|x| x.start <= r.start && x.end >= r.end)
    }

    /// The parts of `within` not in the set, in order.
    pub fn gaps(&self, within: ByteRange) -> Vec<ByteRange> {
        let mut out = Vec::new();
        let mut pos = within.start;
        for x in &self.ranges {
            if x.end <= pos {
                continue;
            }
            if x.start >= within.end {
                break;
            }
            if x.start > pos {
                out.push(ByteRange::new(pos, x.start.min(within.end)));
            }
            pos = pos.max(x.end);
            if pos >= within.end {
                break;
            }
        }
        if pos < within.end {
            out.push(ByteRange::new(pos, within.end));
        }
        out
    }
}

/// Cut `missing` into parts of at most `chunk` bytes (the unit of one request and of
/// re-fetching after a crash).
pub fn split(missing: &[ByteRange], chunk: u64) -> Vec<ByteRange> {
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    for r in missing {
        let mut s = r.start;
        while s < r.end {
            let e = r.end.min(s.saturating_add(chunk));
            out.push(ByteRange::new(s, e));
            s = e;
        }
    }
    out
}

/// Part size for a file: about four parts per connection so a slow part is a small share of
/// the tail, within 1–64 MiB so requests are neither chatty nor huge to redo.
pub fn chunk_size(total: u64, connections: usize) -> u64 {
    const MIN: u64 = 1 << 20;
    const MAX: u64 = 64 << 20;
    let per = total / (connections.max(1) as u64 * 4);
    let c = per.clamp(MIN, MAX);
    // Round up to 64 KiB so part boundaries stay page-aligned.
    c.div_ceil(64 << 10) * (64 << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: u64, e: u64) -> ByteRange {
        ByteRange::new(s, e)
    }

    #[test]
    fn inserts_merge_overlaps_and_neighbours() {
        let mut s = RangeSet::new();
        s.insert(r(10, 20));
        s.insert(r(30, 40));
        assert_eq!(s.ranges(), &[r(10, 20), r(30, 40)]);
        s.insert(r(20, 30));
        assert_eq!(s.ranges(), &[r(10, 40)]);
        s.insert(r(0, 5));
        s.insert(r(3, 12));
        assert_eq!(s.ranges(), &[r(0, 40)]);
        s.insert(r(50, 50));
        assert_eq!(s.covered(), 40);
    }

    #[test]
    fn untrusted_ranges_normalise() {
        let s = RangeSet::from_ranges([r(30, 40), r(0, 10), r(5, 15), r(9, 3)]);
        assert_eq!(s.ranges(), &[r(0, 15), r(30, 40)]);
    }

    #[test]
    fn gaps_within_a_window() {
        let s = RangeSet::from_ranges([r(10, 20), r(30, 40)]);
        assert_eq!(s.gaps(r(0, 50)), vec![r(0, 10), r(20, 30), r(40, 50)]);
        assert_eq!(s.gaps(r(15, 35)), vec![r(20, 30)]);
        assert_eq!(s.gaps(r(12, 18)), vec![]);
        assert_eq!(RangeSet::new().gaps(r(5, 9)), vec![r(5, 9)]);
    }

    #[test]
    fn containment() {
        let s = RangeSet::from_ranges([r(10, 20)]);
        assert!(s.contains(r(10, 20)));
        assert!(s.contains(r(12, 13)));
        assert!(!s.contains(r(9, 11)));
        assert!(!s.contains(r(19, 21)));
        assert!(s.contains(r(7, 7)));
    }

    #[test]
    fn splitting_respects_the_chunk() {
        assert_eq!(
            split(&[r(0, 25), r(30, 35)], 10),
            vec![r(0, 10), r(10, 20), r(20, 25), r(30, 35)]
        );
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(10 << 20, 8), 1 << 20);
        assert_eq!(chunk_size(256 << 20, 8), 8 << 20);
        assert_eq!(chunk_size(15 << 30, 8), 64 << 20);
        assert_eq!(chunk_size(0, 0), 1 << 20);
    }
}
