//! The resume record kept next to a partial download (`<name>.state`): which file it is and
//! which bytes are already on disk, so a restarted station fetches only the rest.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ranges::{ByteRange, RangeSet};
use super::response::RemoteFile;

const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    pub version: u32,
    pub url: String,
    pub size: u64,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// Byte ranges written *and* flushed to disk before this record was written.
    pub completed: Vec<ByteRange>,
}

impl SavedState {
    pub fn new(url: &str, file: &RemoteFile, completed: &RangeSet) -> SavedState {
        SavedState {
            version: VERSION,
            url: url.to_string(),
            size: file.size,
            etag: file.etag.clone(),
            last_modified: file.last_modified.clone(),
            completed: completed.ranges().to_vec(),
        }
    }

    /// The completed bytes if this record describes `file` at `url`; otherwise why not (the
    /// download then starts over).
    pub fn resume(&self, url: &str, file: &RemoteFile) -> Result<RangeSet, String> {
        if self.version != VERSION {
            return Err(format!("state format {} is not {VERSION}", self.version));
        }
        if self.url != url {
            return Err(format!("it was for another URL ({})", self.url));
        }
        if self.size != file.size {
            return Err(format!(
                "the file's size changed from {} to {} bytes",
                self.size, file.size
            ));
        }
        // Without any validator on either side, size is all there is; SHA-1 catches the rest.
        if let (Some(a), Some(b)) = (&self.etag, &file.etag) {
            if a != b {
                return Err(format!("the file's ETag changed from {a} to {b}"));
            }
        } else if let (Some(a), Some(b)) = (&self.last_modified, &file.last_modified) {
            if a != b {
                return Err(format!("the file changed on the server ({a} → {b})"));
            }
        }
        let set = RangeSet::from_ranges(self.completed.iter().copied());
        if set.ranges().last().is_some_and(|r| r.end > self.size) {
            return Err("it lists bytes beyond the end of the file".into());
        }
        Ok(set)
    }

    /// Parse a state file's text; junk (a torn or foreign file) is an `Err` with the reason.
    pub fn parse(text: &[u8]) -> Result<SavedState, String> {
        serde_json::from_slice(text).map_err(|e| e.to_string())
    }
}

/// Write `state` to `path` so that a crash at any point leaves either the old or the new
/// record: temporary file, fsync, rename, fsync of the directory.
pub fn save_atomic(path: &Path, state: &SavedState) -> io::Result<()> {
    let tmp = path.with_extension("state.tmp");
    let json = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote() -> RemoteFile {
        RemoteFile {
            size: 100,
            etag: Some("\"e1\"".into()),
            last_modified: Some("Mon".into()),
        }
    }

    #[test]
    fn round_trips_and_resumes() {
        let done = RangeSet::from_ranges([ByteRange::new(0, 10), ByteRange::new(50, 60)]);
        let s = SavedState::new("http://x/f", &remote(), &done);
        let text = serde_json::to_vec(&s).unwrap();
        let back = SavedState::parse(&text).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.resume("http://x/f", &remote()), Ok(done));
    }

    #[test]
    fn a_changed_file_starts_over() {
        let s = SavedState::new("http://x/f", &remote(), &RangeSet::new());
        let mut other = remote();
        other.etag = Some("\"e2\"".into());
        assert!(s.resume("http://x/f", &other).unwrap_err().contains("ETag"));
        let mut bigger = remote();
        bigger.size = 101;
        assert!(s
            .resume("http://x/f", &bigger)
            .unwrap_err()
            .contains("size"));
        assert!(s
            .resume("http://y/f", &remote())
            .unwrap_err()
            .contains("URL"));
        let mut no_etag = remote();
        no_etag.etag = None;
        no_etag.last_modified = Some("Tue".into());
        assert!(s.resume("http://x/f", &no_etag).is_err());
    }

    #[test]
    fn junk_and_out_of_range_records_are_refused() {
        assert!(SavedState::parse(b"{\"version\":1,").is_err());
        let mut s = SavedState::new("u", &remote(), &RangeSet::new());
        s.completed = vec![ByteRange::new(90, 120)];
        assert!(s.resume("u", &remote()).is_err());
    }

    #[test]
    fn saves_atomically() {
        let dir = std::env::temp_dir().join(format!("macrescue-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.state");
        let s = SavedState::new(
            "u",
            &remote(),
            &RangeSet::from_ranges([ByteRange::new(0, 5)]),
        );
        save_atomic(&p, &s).unwrap();
        assert_eq!(SavedState::parse(&std::fs::read(&p).unwrap()).unwrap(), s);
        assert!(!dir.join("f.state.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
