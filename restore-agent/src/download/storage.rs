//! The disk side of a download: positional writes into the partial file, flushes, space checks,
//! the cache lock, and hashing the finished file.
//!
//! [`PartWriter`] is a seam so tests can make writes fail (disk full) without filling a disk.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Where downloaded bytes go.
pub trait PartWriter: Send + Sync {
    /// Write all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write durable (before a state record claims it).
    fn sync(&self) -> io::Result<()>;
}

/// The `.part` file.
pub struct FileWriter {
    file: File,
}

impl FileWriter {
    /// Open (or create) the partial file, sized to `size` and with its blocks reserved so a
    /// full disk shows up now rather than hours into the download.
    pub fn open(path: &Path, size: u64) -> io::Result<FileWriter> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let fresh = file.metadata()?.len() == 0;
        if file.metadata()?.len() != size {
            file.set_len(size)?;
        }
        if let Err(e) = reserve(&file, size) {
            // Give back whatever a half-done reservation took; a fresh file holds no data.
            if fresh {
                drop(file);
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
        Ok(FileWriter { file })
    }
}

impl PartWriter for FileWriter {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

fn reserve(file: &File, size: u64) -> io::Result<()> {
    let Ok(len) = libc::off_t::try_from(size) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    if len == 0 {
        return Ok(());
    }
    // SAFETY: plain syscall on an fd we own for the duration of the call.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    match rc {
        0 => Ok(()),
        // Filesystems without preallocation: the writes themselves will report ENOSPC.
        libc::EOPNOTSUPP | libc::EINVAL => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Is this the "no space left" family of errors?
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Bytes available to us on the filesystem holding `dir`.
pub fn free_space(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs fills the zeroed struct we pass; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// An exclusive `flock` on `<name>.lock`, released when dropped (or when the process dies,
/// which is why flock and not a marker file: a crashed station never leaves a stale lock).
pub struct CacheLock {
    _file: File,
}

impl CacheLock {
    /// Take the lock if nobody holds it.
    pub fn try_acquire(path: &Path) -> io::Result<Option<CacheLock>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        // SAFETY: plain syscall on an fd we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(CacheLock { _file: file }));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

/// SHA-1 and length of a file, read with a small buffer; `progress` gets bytes hashed so far.
pub fn sha1_file(path: &Path, mut progress: impl FnMut(u64)) -> io::Result<([u8; 20], u64)> {
    use sha1::Digest;
    let mut f = File::open(path)?;
    let mut h = sha1::Sha1::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
        progress(total);
    }
    Ok((h.finalize().into(), total))
}

/// fsync a directory so a rename in it survives a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("macrescue-storage-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn writes_land_at_their_offsets() {
        let d = tmp("write");
        let p = d.join("f.part");
        let w = FileWriter::open(&p, 10).unwrap();
        w.write_at(b"world", 5).unwrap();
        w.write_at(b"hello", 0).unwrap();
        w.sync().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"helloworld");
        let (sha, len) = sha1_file(&p, |_| {}).unwrap();
        assert_eq!(len, 10);
        assert_eq!(hex::encode(sha), "6adfb183a4a2c94a2f92dab5ade762a47889a5a1");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_lock_is_exclusive_and_released_on_drop() {
        let d = tmp("lock");
        let p = d.join("f.lock");
        let a = CacheLock::try_acquire(&p).unwrap();
        assert!(a.is_some());
        assert!(CacheLock::try_acquire(&p).unwrap().is_none());
        drop(a);
        assert!(CacheLock::try_acquire(&p).unwrap().is_some());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn disk_full_errors_are_recognised() {
        assert!(is_disk_full(&io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(!is_disk_full(&io::Error::from_raw_os_error(libc::EIO)));
        assert!(free_space(Path::new("/")).unwrap() > 0);
    }
}
