//! An IPSW read while it is still downloading. Reads of bytes already on disk go straight to
//! the partial file; a read of missing bytes asks the download for them (ahead of the rest of
//! the file) and blocks until they are written. The ZIP reader, personalization and ASR read
//! through it unchanged, so a restore can start with the boot chain while the OS image is still
//! arriving.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::RandomAccess;

/// Where the bytes of a file being downloaded stand. Implemented by the downloader
/// ([`crate::download::Live`]); kept as a trait so the IPSW layer does not depend on HTTP.
pub trait Arrivals: Send + Sync {
    /// The file being written (and later the finished file) and its total length; blocks until
    /// the download knows them. An error when the download stopped before.
    fn file(&self) -> io::Result<(PathBuf, u64)>;

    /// Blocks until `need` is on disk. When it is not yet, `want` (which contains `need`) is
    /// requested first — a read-ahead so a sequential reader does not wait on every read. An
    /// error when the download stopped before `need` arrived.
    fn wait_for(&self, need: Range<u64>, want: Range<u64>) -> io::Result<()>;
}

impl<T: Arrivals + ?Sized> Arrivals for std::sync::Arc<T> {
    fn file(&self) -> io::Result<(PathBuf, u64)> {
        (**self).file()
    }
    fn wait_for(&self, need: Range<u64>, want: Range<u64>) -> io::Result<()> {
        (**self).wait_for(need, want)
    }
}

/// [`RandomAccess`] over a partially downloaded file.
#[derive(Debug)]
pub struct PartialFile<A> {
    arrivals: A,
    file: File,
    len: u64,
    path: PathBuf,
    read_ahead: u64,
}

impl<A: Arrivals> PartialFile<A> {
    /// Opens the download's file (waiting until the download has created it). `read_ahead`:
    /// how much past a missing read to request at once.
    pub fn open(arrivals: A, read_ahead: u64) -> io::Result<Self> {
        let (path, len) = arrivals.file()?;
        // The descriptor stays valid when the finished file is renamed into place, so a reader
        // opened on `<name>.part` keeps working after the download completes.
        let file = File::open(&path)?;
        Ok(Self {
            arrivals,
            file,
            len,
            path,
            read_ahead,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn arrivals(&self) -> &A {
        &self.arrivals
    }
}

impl<A: Arrivals> RandomAccess for PartialFile<A> {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "read of {} bytes at {offset} is past the end ({} bytes)",
                        buf.len(),
                        self.len
                    ),
                )
            })?;
        if buf.is_empty() {
            return Ok(());
        }
        let ahead = end
            .max(offset.saturating_add(self.read_ahead))
            .min(self.len);
        self.arrivals.wait_for(offset..end, offset..ahead)?;
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Bytes "arrive" when asked for: records every request.
    struct Recorder {
        path: PathBuf,
        len: u64,
        asked: Mutex<Vec<(Range<u64>, Range<u64>)>>,
    }

    impl Arrivals for Recorder {
        fn file(&self) -> io::Result<(PathBuf, u64)> {
            Ok((self.path.clone(), self.len))
        }
        fn wait_for(&self, need: Range<u64>, want: Range<u64>) -> io::Result<()> {
            self.asked.lock().unwrap().push((need, want));
            Ok(())
        }
    }

    #[test]
    fn reads_ask_for_their_range_with_read_ahead_clamped_to_the_file() {
        let path = std::env::temp_dir().join(format!("partial-file-{}", std::process::id()));
        std::fs::write(&path, b"0123456789").unwrap();
        let p = PartialFile::open(
            Recorder {
                path: path.clone(),
                len: 10,
                asked: Mutex::default(),
            },
            4,
        )
        .unwrap();
        let mut buf = [0u8; 2];
        p.read_at(1, &mut buf).unwrap();
        assert_eq!(&buf, b"12");
        p.read_at(8, &mut buf).unwrap();
        assert_eq!(&buf, b"89");
        let err = p.read_at(9, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(
            *p.arrivals().asked.lock().unwrap(),
            vec![(1..3, 1..5), (8..10, 8..10)]
        );
        std::fs::remove_file(&path).unwrap();
    }
}
