//! Where a station keeps what happened to each Mac: `<data>/reports/<time>-<ECID>.json`
//! (written atomically) and `<data>/logs/<ECID>.log`. Without a data dir nothing is kept.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct Store {
    data: Option<PathBuf>,
}

impl Store {
    pub fn new(data: Option<PathBuf>) -> Store {
        Store { data }
    }

    pub fn keeps(&self) -> bool {
        self.data.is_some()
    }

    /// Append lines to the Mac's log (`key` is its ECID, or its port before it is known).
    pub fn log(&self, key: &str, lines: &[String]) -> io::Result<()> {
        let Some(data) = &self.data else {
            return Ok(());
        };
        let dir = data.join("logs");
        fs::create_dir_all(&dir)?;
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{key}.log")))?;
        let t = unix_secs(SystemTime::now());
        for l in lines {
            writeln!(f, "{t} {l}")?;
        }
        Ok(())
    }

    /// Write the report; returns its path. A temporary file renamed into place, so a power cut
    /// leaves either the old state or the whole report, never half of it.
    pub fn report(&self, key: &str, report: &serde_json::Value) -> io::Result<Option<PathBuf>> {
        let Some(data) = &self.data else {
            return Ok(None);
        };
        let dir = data.join("reports");
        fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}-{key}.json", unix_secs(SystemTime::now())));
        write_atomic(
            &path,
            &serde_json::to_vec_pretty(report).map_err(io::Error::other)?,
        )?;
        Ok(Some(path))
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
