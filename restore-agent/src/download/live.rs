//! A download that is read while it runs: the restore reads the partial file through
//! [`crate::ipsw::PartialFile`], which asks this shared record whether a range is on disk yet
//! and, when it is not, puts the range at the head of the downloader's queue and waits.
//!
//! Threads: the readers are blocking threads (the ZIP reader, personalization, ASR's
//! read-ahead); the downloader is async. A `Mutex` + `Condvar` serves the former, a tokio
//! `Notify` wakes the latter's connections.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard};

use super::ranges::{ByteRange, RangeSet};
use crate::ipsw::Arrivals;

/// How a download ended, as a reader of its bytes sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveEnd {
    /// Every byte is on disk and matched the catalog's SHA-1 (when one was given); the file
    /// was moved to `path`.
    Complete { path: PathBuf, verified: bool },
    /// The finished file did not match the catalog's SHA-1 and was deleted: bytes a reader
    /// already used may have been damaged.
    Corrupt { message: String },
    /// The download stopped (network, disk, server) before every byte was fetched.
    Failed { message: String },
}

#[derive(Debug, Default)]
struct State {
    /// The file being written (or the finished file) and its total length, once known.
    file: Option<(PathBuf, u64)>,
    done: RangeSet,
    /// Ranges readers wait for, not yet handed to the scheduler.
    wanted: Vec<ByteRange>,
    end: Option<LiveEnd>,
}

/// The record one download shares with its readers.
#[derive(Debug, Default)]
pub struct Live {
    state: Mutex<State>,
    arrived: Condvar,
    /// Wakes the downloader's idle connections when a reader wants something.
    pub(super) kick: tokio::sync::Notify,
}

impl Live {
    pub fn new() -> Live {
        Live::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code that can panic runs under this lock, so a poisoned one is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The downloader opened `path` (`total` bytes) with `have` already on disk.
    pub(super) fn opened(&self, path: PathBuf, total: u64, have: &RangeSet) {
        let mut s = self.lock();
        s.file = Some((path, total));
        s.done = have.clone();
        drop(s);
        self.arrived.notify_all();
    }

    /// `r` is written (readable through the file).
    pub(super) fn arrived(&self, r: ByteRange) {
        self.lock().done.insert(r);
        self.arrived.notify_all();
    }

    /// Ranges readers asked for since the last call.
    pub(super) fn take_wanted(&self) -> Vec<ByteRange> {
        std::mem::take(&mut self.lock().wanted)
    }

    /// The download ended; the first end reported stands.
    pub fn end(&self, end: LiveEnd) {
        let mut s = self.lock();
        if s.end.is_none() {
            s.end = Some(end);
        }
        drop(s);
        self.arrived.notify_all();
        self.kick.notify_waiters();
    }

    /// Every byte of the file (`size` bytes) is at `path`.
    pub(super) fn completed(&self, path: &std::path::Path, size: u64) {
        let mut s = self.lock();
        s.file = Some((path.to_path_buf(), size));
        s.done.insert(ByteRange::new(0, size));
    }

    /// How the download ended, if it has.
    pub fn outcome(&self) -> Option<LiveEnd> {
        self.lock().end.clone()
    }

    /// Blocks until the download ends.
    pub fn wait_end(&self) -> LiveEnd {
        let mut s = self.lock();
        loop {
            if let Some(e) = &s.end {
                return e.clone();
            }
            s = self.arrived.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Bytes on disk so far and the total, once known.
    pub fn progress(&self) -> Option<(u64, u64)> {
        let s = self.lock();
        s.file.as_ref().map(|(_, total)| (s.done.covered(), *total))
    }

    fn unavailable(end: &LiveEnd) -> std::io::Error {
        let why = match end {
            LiveEnd::Corrupt { message } | LiveEnd::Failed { message } => message.clone(),
            LiveEnd::Complete { .. } => "the download ended".into(),
        };
        std::io::Error::other(format!("the firmware download stopped: {why}"))
    }
}

impl Arrivals for Live {
    fn file(&self) -> std::io::Result<(PathBuf, u64)> {
        let mut s = self.lock();
        loop {
            if let Some(f) = &s.file {
                return Ok(f.clone());
            }
            if let Some(e) = &s.end {
                return Err(Live::unavailable(e));
            }
            s = self.arrived.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn wait_for(&self, need: Range<u64>, want: Range<u64>) -> std::io::Result<()> {
        let need = ByteRange::new(need.start, need.end);
        let mut s = self.lock();
        if s.done.contains(need) {
            return Ok(());
        }
        let want = ByteRange::new(want.start.min(need.start), want.end.max(need.end));
        tracing::debug!(
            "waiting for bytes {}-{} of the firmware download",
            need.start,
            need.end
        );
        s.wanted.push(want);
        drop(s);
        self.kick.notify_waiters();
        let mut s = self.lock();
        loop {
            if s.done.contains(need) {
                return Ok(());
            }
            if let Some(e) = &s.end {
                return Err(Live::unavailable(e));
            }
            s = self.arrived.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_waits_for_its_range_and_asks_for_it() {
        let live = std::sync::Arc::new(Live::new());
        live.opened("/x.part".into(), 100, &RangeSet::new());
        let reader = {
            let l = std::sync::Arc::clone(&live);
            std::thread::spawn(move || l.wait_for(10..20, 10..60))
        };
        // The request reaches the downloader's side before any byte arrives.
        let wanted = loop {
            let w = live.take_wanted();
            if !w.is_empty() {
                break w;
            }
            std::thread::yield_now();
        };
        assert_eq!(wanted, vec![ByteRange::new(10, 60)]);
        live.arrived(ByteRange::new(0, 15));
        live.arrived(ByteRange::new(15, 20));
        reader.join().unwrap().unwrap();
        assert_eq!(live.progress(), Some((20, 100)));
    }

    #[test]
    fn a_failed_download_wakes_its_readers_with_the_reason() {
        let live = std::sync::Arc::new(Live::new());
        let reader = {
            let l = std::sync::Arc::clone(&live);
            std::thread::spawn(move || l.file())
        };
        live.end(LiveEnd::Failed {
            message: "HTTP 404".into(),
        });
        let e = reader.join().unwrap().unwrap_err();
        assert_eq!(e.to_string(), "the firmware download stopped: HTTP 404");
        assert!(live.wait_for(0..1, 0..1).is_err());
    }
}
