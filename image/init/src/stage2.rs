//! The image's second stage: programs the kernel need not unpack before it starts `/init`.
//!
//! The kernel unpacks the whole initramfs before it runs `/init`, and a built-in crypto
//! self-test (the SP800-108 KDF's) waits for that unpacking even earlier, in the middle of the
//! kernel's own start. Every byte the kernel decompresses there delays the USB host
//! controllers' drivers — and with them the kernel's fixed USB timers on the way to the stick.
//! So the compressed boot archive holds only this init and the drivers; the station's agent and
//! the emergency shell come as lz4 frames under [`DIR`], in an uncompressed part of the
//! initramfs the kernel merely copies, and this module inflates them on another CPU while the
//! USB hubs settle. The station and the shell start only after [`inflate_all`] has finished.
//!
//! Layout: `DIR/<path>.lz4` becomes `/<path>`, mode 0755 (every file there is a program;
//! symlinks to them, such as busybox's applets, are in the boot archive). Each file is written
//! beside its target and renamed into place, and its `.lz4` is removed: no half-written
//! program is ever visible, and the RAM the compressed copy took is given back.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

/// Where the compressed programs are, relative to the root.
pub const DIR: &str = "lib/macrescue/stage2";
const SUFFIX: &str = ".lz4";

#[derive(Debug, Error)]
pub enum Stage2Error {
    #[error("cannot list {}: {source}", path.display())]
    List { path: PathBuf, source: io::Error },
    #[error(
        "{} is not a program of the image's second stage (expected DIR/PATH.lz4): \
         the image was built wrongly; build it again with image/build.sh",
        path.display()
    )]
    Unexpected { path: PathBuf },
    #[error(
        "cannot unpack {}: {source}; the stick or SD card is damaged or was written \
         incompletely: write the image again",
        path.display()
    )]
    Inflate { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {source} (is RAM full?)", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// What [`inflate_all`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Inflated {
    pub files: usize,
    /// Bytes written (the programs' unpacked size).
    pub bytes: u64,
}

/// Where the file at `rel` (relative to [`DIR`]) goes, relative to the root: `bin/sh.lz4` →
/// `bin/sh`. `None` for anything else: no `.lz4` suffix, an empty name, or a component that
/// would leave the root (`..`, an absolute path).
pub fn target(rel: &Path) -> Option<PathBuf> {
    let name = rel.file_name()?.to_str()?;
    let stem = name.strip_suffix(SUFFIX).filter(|s| !s.is_empty())?;
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(rel.with_file_name(stem))
}

/// Inflate every program under `root/DIR` into `root`. Without that directory (an image built
/// before the second stage existed, or already inflated) there is nothing to do.
pub fn inflate_all(root: &Path) -> Result<Inflated, Stage2Error> {
    let dir = root.join(DIR);
    let mut done = Inflated::default();
    if !dir.is_dir() {
        return Ok(done);
    }
    let mut files = Vec::new();
    list(&dir, Path::new(""), &mut files)?;
    files.sort();
    for rel in files {
        let Some(to) = target(&rel) else {
            return Err(Stage2Error::Unexpected {
                path: dir.join(rel),
            });
        };
        done.bytes += inflate(&dir.join(&rel), &root.join(to))?;
        done.files += 1;
    }
    // Only empty directories are left; a failure here costs nothing but a few inodes.
    let _ = remove_empty_dirs(&dir);
    Ok(done)
}

fn list(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), Stage2Error> {
    let err = |source| Stage2Error::List {
        path: dir.to_path_buf(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let kind = entry.file_type().map_err(err)?;
        let rel = rel.join(entry.file_name());
        if kind.is_dir() {
            list(&entry.path(), &rel, out)?;
        } else {
            out.push(rel);
        }
    }
    Ok(())
}

/// Inflate one lz4 frame file to `to` (through `to.part`), then remove `from`. Read and
/// write failures name their own side.
fn inflate(from: &Path, to: &Path) -> Result<u64, Stage2Error> {
    let part = to.with_extension("part");
    let write_err = |source| Stage2Error::Write {
        path: to.to_path_buf(),
        source,
    };
    let read_err = |source| Stage2Error::Inflate {
        path: from.to_path_buf(),
        source,
    };
    let input = File::open(from).map_err(read_err)?;
    let result = (|| {
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(write_err)?;
        }
        let mut frames = lz4_flex::frame::FrameDecoder::new(BufReader::new(input));
        let mut out = BufWriter::new(File::create(&part).map_err(write_err)?);
        let mut buf = vec![0u8; 64 * 1024];
        let mut n = 0u64;
        loop {
            // Corrupt input, a bad checksum and a truncated frame are all read errors here.
            let got = match frames.read(&mut buf) {
                Ok(0) => break,
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(read_err(source)),
            };
            out.write_all(&buf[..got]).map_err(write_err)?;
            n += got as u64;
        }
        let file = out.into_inner().map_err(|e| write_err(e.into_error()))?;
        file.set_permissions(fs::Permissions::from_mode(0o755))
            .map_err(write_err)?;
        fs::rename(&part, to).map_err(write_err)?;
        Ok(n)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&part);
    } else {
        // The compressed copy is RAM in an initramfs; it is not needed any more.
        let _ = fs::remove_file(from);
    }
    result
}

fn remove_empty_dirs(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_empty_dirs(&entry.path())?;
        }
    }
    fs::remove_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as the `lz4` tool writes it (content checksum on, its default).
    fn frame(data: &[u8]) -> Vec<u8> {
        let info = lz4_flex::frame::FrameInfo::new().content_checksum(true);
        let mut enc = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn root() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "macrescue-stage2-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fs::create_dir_all(dir.join(DIR)).unwrap();
        dir
    }

    fn put(root: &Path, rel: &str, bytes: &[u8]) {
        let p = root.join(DIR).join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
    }

    #[test]
    fn targets_strip_the_suffix_and_stay_under_the_root() {
        assert_eq!(
            target(Path::new("bin/restore-agent.lz4")),
            Some(PathBuf::from("bin/restore-agent"))
        );
        assert_eq!(target(Path::new("busybox.lz4")), Some("busybox".into()));
        assert_eq!(target(Path::new("bin/busybox")), None);
        assert_eq!(target(Path::new("bin/.lz4")), None);
        assert_eq!(target(Path::new("../bin/x.lz4")), None);
        assert_eq!(target(Path::new("/bin/x.lz4")), None);
        assert_eq!(target(Path::new("bin/./x.lz4")), Some("bin/x".into()));
    }

    #[test]
    fn inflates_programs_executable_and_removes_the_archive() {
        let root = root();
        let agent: Vec<u8> = (0..300_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        put(&root, "bin/restore-agent.lz4", &frame(&agent));
        put(&root, "bin/busybox.lz4", &frame(b"#!/bin/true\n"));
        let done = inflate_all(&root).unwrap();
        assert_eq!(done.files, 2);
        assert_eq!(done.bytes, agent.len() as u64 + 12);
        assert_eq!(fs::read(root.join("bin/restore-agent")).unwrap(), agent);
        let mode = fs::metadata(root.join("bin/busybox"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(
            !root.join(DIR).exists(),
            "the compressed copies stay in RAM"
        );
        assert!(!root.join("bin/restore-agent.part").exists());
        // Nothing left to do the second time.
        assert_eq!(inflate_all(&root).unwrap(), Inflated::default());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_damaged_frame_names_the_file_and_leaves_no_program_behind() {
        let root = root();
        let mut bytes = frame(&vec![7u8; 100_000]);
        let half = bytes.len() / 2;
        bytes.truncate(half);
        put(&root, "bin/restore-agent.lz4", &bytes);
        let err = inflate_all(&root).unwrap_err();
        assert!(matches!(err, Stage2Error::Inflate { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("restore-agent.lz4"), "{msg}");
        assert!(msg.contains("write the image again"), "{msg}");
        assert!(!root.join("bin/restore-agent").exists());
        assert!(!root.join("bin/restore-agent.part").exists());

        // Flipped bytes inside the frame: the content checksum catches them.
        let mut bytes = frame(&(0..50_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let n = bytes.len();
        bytes[n / 2] ^= 0x55;
        put(&root, "bin/restore-agent.lz4", &bytes);
        assert!(matches!(
            inflate_all(&root),
            Err(Stage2Error::Inflate { .. })
        ));
        assert!(!root.join("bin/restore-agent").exists());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_file_without_the_suffix_is_refused() {
        let root = root();
        put(&root, "bin/busybox", b"plain");
        let err = inflate_all(&root).unwrap_err();
        assert!(matches!(err, Stage2Error::Unexpected { .. }), "{err:?}");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn an_image_without_a_second_stage_needs_nothing() {
        let root = root();
        fs::remove_dir_all(root.join(DIR)).unwrap();
        assert_eq!(inflate_all(&root).unwrap(), Inflated::default());
        fs::remove_dir_all(root).unwrap();
    }
}
