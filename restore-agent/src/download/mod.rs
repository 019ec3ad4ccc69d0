//! Fetching a firmware file (13–20 GiB) onto the station fast and safely.
//!
//! Apple's CDN limits each TCP flow, so the file is fetched as parallel HTTP range requests
//! (8 connections by default), each streamed straight to its offset in `<name>.part` with small
//! buffers. Progress is recorded in `<name>.state` (atomically, after an fsync of the data) so
//! a dropped connection resumes where it stopped and a restarted station fetches only the
//! missing ranges. A `flock` on `<name>.lock` makes two restores of the same build share one
//! download. The finished file is checked against the catalog's SHA-1 before it is renamed to
//! `<name>`; a mismatch deletes it.
//!
//! Layers: [`ranges`], [`schedule`], [`rate`], [`response`] and [`state`] are sans-IO and unit
//! tested; [`storage`] is the disk edge; `engine` is the tokio + reqwest edge.

mod engine;
pub mod live;
pub mod ranges;
pub mod rate;
pub mod response;
pub mod schedule;
pub mod state;
pub mod storage;

use std::path::PathBuf;
use std::time::Duration;

pub use engine::{Downloader, EventSink, WriterFactory};
pub use live::{Live, LiveEnd};

/// What to download and how.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    pub url: String,
    /// The shared cache directory (the data partition on a station).
    pub cache_dir: PathBuf,
    /// File name in the cache; default: the URL's last path segment.
    pub file_name: Option<String>,
    /// The catalog's SHA-1; without it the file is only checked for size.
    pub sha1: Option<[u8; 20]>,
    /// Parallel connections (each one range request at a time).
    pub connections: usize,
    /// Part size; default from [`ranges::chunk_size`].
    pub chunk_size: Option<u64>,
    /// No bytes on a connection for this long: cancel it and fetch the part again.
    pub stall_timeout: Duration,
    /// Near the end, race a part whose estimated time left exceeds this.
    pub tail_race_after: Duration,
    /// Consecutive failures of one part (without progress) before giving up.
    pub max_failures: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How often the resume record is flushed (data fsync + state file).
    pub save_every: Duration,
    /// How often [`Event::Progress`] is reported.
    pub progress_every: Duration,
    /// How often a waiting downloader checks whether the other one has finished.
    pub lock_poll: Duration,
}

impl DownloadOptions {
    pub fn new(url: impl Into<String>, cache_dir: impl Into<PathBuf>) -> DownloadOptions {
        DownloadOptions {
            url: url.into(),
            cache_dir: cache_dir.into(),
            file_name: None,
            sha1: None,
            connections: 8,
            chunk_size: None,
            stall_timeout: Duration::from_secs(20),
            tail_race_after: Duration::from_secs(5),
            max_failures: 8,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            save_every: Duration::from_secs(2),
            progress_every: Duration::from_secs(1),
            lock_poll: Duration::from_millis(500),
        }
    }
}

/// Something a technician (or a UI) may want to show.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Another restore is downloading the same file; this one waits and then uses it.
    WaitingForOtherDownload {
        lock: PathBuf,
    },
    /// The file is already in the cache (and matched the SHA-1 if one was given).
    AlreadyCached {
        path: PathBuf,
    },
    /// A previous download of this file is continued.
    Resuming {
        have: u64,
        total: u64,
    },
    /// A previous partial download could not be continued.
    StartingOver {
        reason: String,
    },
    Progress(Progress),
    /// A request failed and will be retried.
    Retrying {
        offset: u64,
        reason: String,
    },
    /// Near the end, a slow part is fetched a second time on a new connection; the first copy
    /// to finish wins.
    Racing {
        range: ranges::ByteRange,
    },
    /// Checking the SHA-1 of the finished file.
    Verifying {
        done: u64,
        total: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Bytes on disk (including those from before a restart).
    pub done: u64,
    pub total: u64,
    /// Recent rate in bytes per second.
    pub bytes_per_sec: f64,
    pub eta: Option<Duration>,
    /// Requests in flight.
    pub connections: usize,
}

/// A finished download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub path: PathBuf,
    pub size: u64,
    pub sha1: [u8; 20],
    /// Body bytes received in this run (0 when the cache already had the file).
    pub fetched: u64,
    pub from_cache: bool,
}

const GIB: f64 = (1u64 << 30) as f64;

fn gib(n: u64) -> String {
    // At least 0.1 so "free 0.0 GiB" never appears for a real shortfall.
    let v = n as f64 / GIB;
    if n > 0 && v < 0.1 {
        "0.1".into()
    } else {
        format!("{v:.1}")
    }
}

/// Plain advice for an HTTP status from the firmware server.
fn status_advice(status: u16) -> &'static str {
    match status {
        404 | 410 => {
            "the firmware is not (or no longer) at this address: refresh the catalog and pick a current build"
        }
        401 | 403 => "the server refused this station: check the network's proxy or firewall rules",
        408 | 429 | 500..=599 => {
            "the server is overloaded or failing: run the download again in a few minutes (it resumes)"
        }
        _ => "the server gave an unexpected answer: check the URL",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("the data partition is full: free {} GiB in {} (the download needs {} GiB more, {} GiB are free) and run the download again; it resumes where it stopped", gib(*.shortfall), .dir.display(), gib(*.needed), gib(*.available))]
    DiskFull {
        dir: PathBuf,
        needed: u64,
        available: u64,
        shortfall: u64,
    },
    #[error("the firmware server answered HTTP {status} for {url}: {}", status_advice(*.status))]
    HttpStatus { url: String, status: u16 },
    #[error("the CDN sent a web page (HTML with status 200) instead of the firmware for {url}: it is blocking or redirecting this station; check the network or proxy and run the download again later (it resumes)")]
    HtmlInsteadOfFile { url: String },
    #[error("cannot download {url}: {reason}; check the station's network and run the download again (it resumes)")]
    Network { url: String, reason: String },
    #[error("the server for {url} presented a TLS certificate this station does not trust ({reason}): check the station's clock (a wrong date makes valid certificates look expired) and whether a proxy intercepts HTTPS; for a private mirror pass its CA with --ca-file")]
    Untrusted { url: String, reason: String },
    #[error("the download of {url} stalled: no data for {} s on every retry; check the network and run the download again (it resumes)", .secs)]
    Stalled { url: String, secs: u64 },
    #[error("the firmware at {url} changed on the server during the download ({why}); run the download again to start over")]
    Changed { url: String, why: String },
    #[error("the server for {url} does not support range requests, which parallel and resumable downloads need; use another mirror")]
    NoRangeSupport { url: String },
    #[error("the server for {url} answers ranges wrongly ({why}); use another mirror")]
    BadResponse { url: String, why: String },
    #[error("the downloaded file's SHA-1 is {actual} but the catalog says {expected}: the copy was corrupted in transit (or the CDN served another file) and has been deleted; run the download again")]
    Sha1Mismatch { expected: String, actual: String },
    #[error("the download of {url} ended with {got} bytes instead of {expected}; run the download again")]
    SizeMismatch {
        url: String,
        expected: u64,
        got: u64,
    },
    #[error("the URL {0:?} does not name a file (nothing after the last '/')")]
    BadUrl(String),
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
}

/// The cache file name for a URL: its last path segment, which must be a plain name.
pub fn file_name_from_url(url: &str) -> Result<String, DownloadError> {
    let bad = || DownloadError::BadUrl(url.to_string());
    let parsed = reqwest::Url::parse(url).map_err(|_| bad())?;
    let name = parsed
        .path_segments()
        .and_then(|mut s| s.next_back())
        .unwrap_or("");
    check_file_name(name).map_err(|_| bad())?;
    Ok(name.to_string())
}

/// A name that stays inside the cache directory.
fn check_file_name(name: &str) -> Result<(), ()> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
        return Err(());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_url() {
        assert_eq!(
            file_name_from_url(
                "https://updates.cdn-apple.com/2025/fullrestores/x/UniversalMac_26.2_25C56_Restore.ipsw"
            )
            .unwrap(),
            "UniversalMac_26.2_25C56_Restore.ipsw"
        );
        assert!(file_name_from_url("https://host/dir/").is_err());
        assert!(file_name_from_url("not a url").is_err());
    }

    #[test]
    fn disk_full_tells_how_much_to_free() {
        let e = DownloadError::DiskFull {
            dir: "/cache".into(),
            needed: 14 << 30,
            available: 10 << 30,
            shortfall: 4 << 30,
        };
        let m = e.to_string();
        assert!(
            m.starts_with("the data partition is full: free 4.0 GiB in /cache"),
            "{m}"
        );
        assert!(m.contains("needs 14.0 GiB more, 10.0 GiB are free"), "{m}");
        assert_eq!(gib(1), "0.1");
    }

    #[test]
    fn status_errors_carry_advice() {
        let e = DownloadError::HttpStatus {
            url: "u".into(),
            status: 404,
        };
        assert!(e.to_string().contains("refresh the catalog"));
        let e = DownloadError::HttpStatus {
            url: "u".into(),
            status: 503,
        };
        assert!(e.to_string().contains("in a few minutes"));
    }
}
