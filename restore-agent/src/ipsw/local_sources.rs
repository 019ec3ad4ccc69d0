//! IPSWs already on the station's disks: the data partition's cache and any other USB disk the
//! image's init mounted under `/media` (issue #5 §3). A technician who copied the right IPSW to
//! a stick saves a 15 GB download; one that does not match the Mac is never used.
//!
//! Only each ZIP's central directory and its `BuildManifest.plist` are read, so looking through
//! a disk full of IPSWs costs a few small reads per file, not a scan of gigabytes.

use std::path::{Path, PathBuf};

use thiserror::Error;
use tracing::{debug, info, warn};

use super::{Ipsw, ZipError};
use crate::manifest::{BuildManifest, ManifestError};

/// How deep below each directory to look: `/media/<disk>/<folder>/x.ipsw` is depth 2. People
/// put IPSWs in a folder or two; walking a whole multi-TB disk would stall the Mac's restore.
pub const MAX_DEPTH: usize = 3;

/// Why one file cannot serve as the IPSW for this Mac.
#[derive(Debug, Error)]
pub enum LocalIpswError {
    #[error("{path} is not a readable IPSW ({source}); copy it again or delete it")]
    Zip { path: PathBuf, source: ZipError },
    #[error("{path} has a damaged BuildManifest ({source}); copy it again or delete it")]
    Manifest {
        path: PathBuf,
        source: ManifestError,
    },
}

/// What a candidate file holds, from its BuildManifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalIpsw {
    pub path: PathBuf,
    pub build: Option<String>,
    pub product_types: Vec<String>,
}

impl LocalIpsw {
    /// Same build, and the manifest is made for this Mac's product type.
    pub fn serves(&self, product_type: &str, build: &str) -> bool {
        self.build
            .as_deref()
            .is_some_and(|b| b.eq_ignore_ascii_case(build))
            && self.product_types.iter().any(|p| p == product_type)
    }
}

/// Every readable `*.ipsw` below `dirs` (in the order given, then by path), with what its
/// BuildManifest says. Unreadable files are skipped with a warning. Callers that try several
/// builds look them up in this list instead of reading the disks once per build.
pub fn local_ipsws(dirs: &[PathBuf]) -> Vec<LocalIpsw> {
    let mut out = Vec::new();
    for dir in dirs {
        for path in ipsw_files(dir) {
            match inspect(&path) {
                Ok(found) => {
                    debug!(
                        "{} is build {:?} for {:?}",
                        path.display(),
                        found.build,
                        found.product_types
                    );
                    out.push(found);
                }
                Err(e) => warn!("{e}"),
            }
        }
    }
    out
}

/// The first of `found` (see [`local_ipsws`]) that is build `build` for `product_type`.
pub fn pick_local_ipsw(found: &[LocalIpsw], product_type: &str, build: &str) -> Option<PathBuf> {
    let hit = found.iter().find(|l| l.serves(product_type, build))?;
    info!(
        "using the local IPSW {} (build {build} for {product_type})",
        hit.path.display()
    );
    Some(hit.path.clone())
}

/// The first `*.ipsw` below `dirs` (in the order given, then by path) whose BuildManifest is
/// build `build` for `product_type`. Unreadable files are skipped with a warning.
pub fn find_local_ipsw(dirs: &[PathBuf], product_type: &str, build: &str) -> Option<PathBuf> {
    pick_local_ipsw(&local_ipsws(dirs), product_type, build)
}

/// Reads one file's BuildManifest (nothing else).
pub fn inspect(path: &Path) -> Result<LocalIpsw, LocalIpswError> {
    let zip = |source| LocalIpswError::Zip {
        path: path.to_owned(),
        source,
    };
    let ipsw = Ipsw::open_path(path).map_err(zip)?;
    let bytes = ipsw.build_manifest().map_err(zip)?;
    let manifest =
        BuildManifest::from_bytes(&bytes).map_err(|source| LocalIpswError::Manifest {
            path: path.to_owned(),
            source,
        })?;
    Ok(LocalIpsw {
        path: path.to_owned(),
        build: manifest.product_build_version,
        product_types: manifest.supported_product_types,
    })
}

/// Regular files named `*.ipsw` (any case) up to [`MAX_DEPTH`] below `dir`, sorted by path.
/// Hidden entries are skipped: macOS leaves `._x.ipsw` resource forks on exFAT and FAT disks.
pub fn ipsw_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(dir, MAX_DEPTH, &mut out);
    out.sort();
    out
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        // file_type() does not follow symlinks: a link loop on a disk cannot trap the walk.
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        if kind.is_dir() && depth > 1 {
            walk(&path, depth - 1, out);
        } else if kind.is_file() && name.to_ascii_lowercase().ends_with(".ipsw") {
            out.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mac_sim::ipsw::{make_ipsw, IpswOptions};

    fn shared() -> PathBuf {
        std::env::var_os("MACRESCUE_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared").into())
    }

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir()
                .join(format!("macrescue-local-ipsw-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A J274 (Macmini9,1) manifest with its build number replaced by `build`.
    fn manifest_with_build(dir: &Path, build: &str) -> PathBuf {
        let src = shared()
            .join("fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests/J274AP.BuildManifest.plist");
        let mut v = plist::Value::from_file(&src).unwrap();
        v.as_dictionary_mut()
            .unwrap()
            .insert("ProductBuildVersion".into(), build.into());
        let out = dir.join(format!("manifest-{build}.plist"));
        v.to_file_xml(&out).unwrap();
        out
    }

    fn ipsw(dir: &Path, name: &str, build: &str) -> PathBuf {
        let mut opts = IpswOptions::new("j274ap");
        opts.os_size = 4096;
        opts.manifest = Some(manifest_with_build(dir, build));
        let out = dir.join(name);
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        make_ipsw(&opts, &out).unwrap();
        out
    }

    #[test]
    fn finds_the_matching_build_for_the_product_type() {
        let t = TempDir::new("match");
        let media = t.0.join("media");
        let old = ipsw(
            &t.0,
            "media/sdb1/UniversalMac_26.1_25B78_Restore.ipsw",
            "25B78",
        );
        let want = ipsw(
            &t.0,
            "media/sdb1/ipsw/UniversalMac_26.2_25C56_Restore.IPSW",
            "25C56",
        );
        // Same build elsewhere: the first directory given wins.
        let cache = t.0.join("cache");
        let cached = ipsw(&t.0, "cache/x.ipsw", "25C56");
        std::fs::write(media.join("sdb1/notes.txt"), b"hi").unwrap();

        let inspected = inspect(&old).unwrap();
        assert_eq!(inspected.build.as_deref(), Some("25B78"));
        assert!(inspected.product_types.iter().any(|p| p == "Macmini9,1"));

        assert_eq!(
            find_local_ipsw(std::slice::from_ref(&media), "Macmini9,1", "25C56"),
            Some(want.clone())
        );
        assert_eq!(
            find_local_ipsw(std::slice::from_ref(&media), "Macmini9,1", "25b78"),
            Some(old)
        );
        assert_eq!(
            find_local_ipsw(&[cache.clone(), media.clone()], "Macmini9,1", "25C56"),
            Some(cached)
        );
        assert_eq!(
            find_local_ipsw(&[media.clone(), cache], "Macmini9,1", "25C56"),
            Some(want)
        );
        // Another Mac or another build: nothing, so the engine downloads.
        assert_eq!(
            find_local_ipsw(std::slice::from_ref(&media), "iPhone15,2", "25C56"),
            None
        );
        assert_eq!(find_local_ipsw(&[media], "Macmini9,1", "24A335"), None);
        assert_eq!(
            find_local_ipsw(&[t.0.join("absent")], "Macmini9,1", "25C56"),
            None
        );
    }

    #[test]
    fn skips_damaged_hidden_and_too_deep_files() {
        let t = TempDir::new("skip");
        let root = t.0.join("disk");
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        // A truncated copy and a macOS resource fork next to nothing usable.
        std::fs::write(root.join("broken.ipsw"), b"PK\x03\x04 not a whole zip").unwrap();
        std::fs::write(root.join("._good.ipsw"), b"resource fork").unwrap();
        let deep = ipsw(&t.0, "disk/a/b/c/deep.ipsw", "25C56");
        assert!(matches!(
            inspect(&root.join("broken.ipsw")),
            Err(LocalIpswError::Zip { .. })
        ));
        assert_eq!(ipsw_files(&root), vec![root.join("broken.ipsw")]);
        assert_eq!(
            find_local_ipsw(std::slice::from_ref(&root), "Macmini9,1", "25C56"),
            None
        );
        // Within reach once the search starts one level lower.
        assert_eq!(
            find_local_ipsw(&[root.join("a")], "Macmini9,1", "25C56"),
            Some(deep)
        );
    }

    #[test]
    fn a_zip_without_a_manifest_is_not_an_ipsw() {
        let t = TempDir::new("nomanifest");
        let path = t.0.join("photos.ipsw");
        let f = std::fs::File::create(&path).unwrap();
        let mut z = zip::ZipWriter::new(f);
        z.start_file("Restore.plist", zip::write::SimpleFileOptions::default())
            .unwrap();
        std::io::Write::write_all(&mut z, b"<plist/>").unwrap();
        z.finish().unwrap();
        assert!(matches!(inspect(&path), Err(LocalIpswError::Zip { .. })));
        let e = inspect(&path).unwrap_err().to_string();
        assert!(
            e.contains("photos.ipsw") && e.contains("copy it again"),
            "{e}"
        );
        assert_eq!(
            find_local_ipsw(std::slice::from_ref(&t.0), "Macmini9,1", "25C56"),
            None
        );
    }
}
