//! Getting the IPSW while the Mac is already being restored.
//!
//! With a cache directory and no finished copy in it, the engine starts the downloader and
//! reads the partial file through [`PartialFile`]: whatever the restore reads first (the ZIP
//! directory, the BuildManifest, the boot-chain components, then the OS image) is fetched
//! first, on a connection kept free for it, while the other connections fill in the rest of
//! the file in order. DFU and the iBoot stages therefore start after a few MiB, and the total
//! time approaches max(download, restore).
//!
//! One download per cache file serves every Mac of the station ([`DownloadHub`]); across
//! processes the downloader's cache lock does the same, and its resume record keeps every
//! byte across a restart.
//!
//! The SHA-1 of the whole file can only be checked when the last byte has arrived, which may be
//! after a restore already used the bytes. The engine then waits for the download before it
//! calls the Mac done, and a mismatch (or a download that stopped) turns the result into a
//! named failure: the Mac may hold damaged data, the corrupt copy is deleted, and running the
//! restore again downloads afresh. A wrong boot-chain byte cannot slip through unnoticed either
//! way: the Mac checks every component against the signed ticket.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use crate::download::{DownloadError, DownloadOptions, Downloader, Live, LiveEnd};
use crate::http::HttpConfig;

use super::context::lock_pub as lock;

/// How the engine downloads a firmware it reads while downloading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadTuning {
    /// Parallel connections for the bulk of the file (one more serves the restore's reads).
    pub connections: usize,
    /// Part size: small enough that a read waiting on a part in flight waits briefly.
    pub chunk_size: u64,
    /// How much past a missing read is requested at once.
    pub read_ahead: u64,
    /// How often the resume record is written: what a crash or power cut can cost at most.
    pub save_every: std::time::Duration,
}

impl Default for DownloadTuning {
    fn default() -> Self {
        Self {
            connections: 8,
            chunk_size: 8 << 20,
            read_ahead: 8 << 20,
            save_every: std::time::Duration::from_secs(2),
        }
    }
}

/// The downloads of one station (or one CLI run): at most one per cache file.
#[derive(Debug, Default)]
pub struct DownloadHub {
    active: Mutex<HashMap<PathBuf, Arc<Live>>>,
}

impl DownloadHub {
    /// The download of `url` into `cache_dir`: the one already running (or finished) in this
    /// process, or a new one spawned on the current tokio runtime.
    pub fn join_or_start(
        &self,
        url: &str,
        cache_dir: &std::path::Path,
        sha1: Option<[u8; 20]>,
        http: &HttpConfig,
        tuning: &DownloadTuning,
    ) -> Result<Arc<Live>, DownloadError> {
        let name = crate::download::file_name_from_url(url)?;
        let key = cache_dir.join(&name);
        let mut active = lock(&self.active);
        if let Some(live) = active.get(&key) {
            // A failed or corrupt download is not joined: this Mac starts it again (resuming
            // what is on disk, or from scratch after a SHA-1 mismatch deleted it). Another
            // process downloading the same file holds the cache lock: this one's readers then
            // wait until that download is complete.
            let usable = match live.outcome() {
                None => true,
                // Deleted from the cache since: fetch it again.
                Some(LiveEnd::Complete { path, .. }) => path.is_file(),
                Some(_) => false,
            };
            if usable {
                info!("joining the running download of {name}");
                return Ok(Arc::clone(live));
            }
        }
        let mut o = DownloadOptions::new(url, cache_dir);
        o.sha1 = sha1;
        o.connections = tuning.connections.max(1);
        o.chunk_size = Some(tuning.chunk_size.max(64 << 10));
        o.save_every = tuning.save_every;
        let live = Arc::new(Live::new());
        let downloader = Downloader::new(http, o)?.with_live(Arc::clone(&live));
        let guard = EndOnDrop(Arc::clone(&live));
        tokio::spawn(async move {
            let _guard = guard;
            match downloader.run().await {
                Ok(d) => info!("{} is complete ({} bytes)", d.path.display(), d.size),
                Err(e) => warn!("the firmware download stopped: {e}"),
            }
        });
        active.insert(key, Arc::clone(&live));
        Ok(live)
    }
}

/// Readers of a download whose task was dropped (runtime shut down) or panicked must not wait
/// forever; after a normal end this does nothing (the first end stands).
struct EndOnDrop(Arc<Live>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.end(LiveEnd::Failed {
            message: "the download task stopped".into(),
        });
    }
}

/// What the restore of a Mac means once its firmware download has ended.
pub fn settle(end: &LiveEnd) -> Result<Option<String>, super::Failure> {
    match end {
        LiveEnd::Complete { verified: true, .. } => Ok(Some(
            "the firmware download is complete and matched the catalog's SHA-1".into(),
        )),
        LiveEnd::Complete {
            verified: false, ..
        } => Ok(Some(
            "the firmware download is complete (the catalog gave no SHA-1 to check it against)"
                .into(),
        )),
        LiveEnd::Corrupt { message } => Err(super::Failure::new(
            format!(
                "the restore ran, but the firmware it read while downloading failed its SHA-1 check afterwards ({message}); the Mac may have been given damaged data"
            ),
            "restore the Mac again: the firmware is downloaded afresh",
        )),
        LiveEnd::Failed { message } => Err(super::Failure::new(
            format!(
                "the restore ran, but the firmware download stopped before the whole file could be checked ({message}), so what the Mac received is unverified"
            ),
            "check the station's network and restore the Mac again: the download resumes where it stopped",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_or_unfinished_download_fails_the_restore_with_the_reason() {
        let f = settle(&LiveEnd::Corrupt {
            message: "SHA-1 differs".into(),
        })
        .unwrap_err();
        assert!(f
            .cause
            .contains("failed its SHA-1 check afterwards (SHA-1 differs)"));
        assert!(!f.erase_could_fix);
        let f = settle(&LiveEnd::Failed {
            message: "HTTP 503".into(),
        })
        .unwrap_err();
        assert!(f.cause.contains("unverified"), "{}", f.cause);
        assert!(f.next_step.contains("resumes"));
        assert!(settle(&LiveEnd::Complete {
            path: "/c/x.ipsw".into(),
            verified: true
        })
        .unwrap()
        .unwrap()
        .contains("matched"));
    }
}
