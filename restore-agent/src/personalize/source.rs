//! Where the unpersonalized IM4P payloads come from: the IPSW itself, or (tests, unpacked
//! firmware) a directory laid out like it. Paths are the manifest's `Info.Path` values.

use std::path::{Component, Path, PathBuf};

use crate::ipsw::{Ipsw, LocalFile, RandomAccess, ZipError};

/// The largest firmware file read into memory. Restore ramdisks are the biggest boot-chain
/// files (100+ MB, §9.7); the cap keeps a damaged size field from exhausting the small
/// rescue image's memory. The OS image is streamed, never read through this.
pub const MAX_COMPONENT_LEN: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("{path} is not in {source_name}; the IPSW is incomplete or not the one this BuildManifest belongs to: download it again")]
    Missing { path: String, source_name: String },
    #[error("cannot read {path} from {source_name}: {reason}")]
    Unreadable {
        path: String,
        source_name: String,
        reason: String,
    },
    #[error("the manifest path {path:?} points outside the firmware ({why}); the BuildManifest may be damaged: download the IPSW again")]
    BadPath { path: String, why: &'static str },
}

/// Read access to firmware files by their manifest path (`Firmware/dfu/iBSS.j274.RELEASE.im4p`).
///
/// `&self` so one opened IPSW can serve the provider and, later, restore mode at once.
pub trait ComponentSource {
    /// The whole file.
    fn read(&self, path: &str) -> Result<Vec<u8>, SourceError>;

    /// Whether the file exists, without reading it (a directory lookup, not a download).
    fn contains(&self, path: &str) -> Result<bool, SourceError>;

    /// How to name this source in messages (the IPSW's file name, the directory).
    fn name(&self) -> String;
}

impl<T: ComponentSource + ?Sized> ComponentSource for &T {
    fn read(&self, path: &str) -> Result<Vec<u8>, SourceError> {
        (**self).read(path)
    }
    fn contains(&self, path: &str) -> Result<bool, SourceError> {
        (**self).contains(path)
    }
    fn name(&self) -> String {
        (**self).name()
    }
}

impl<T: ComponentSource + ?Sized> ComponentSource for Box<T> {
    fn read(&self, path: &str) -> Result<Vec<u8>, SourceError> {
        (**self).read(path)
    }
    fn contains(&self, path: &str) -> Result<bool, SourceError> {
        (**self).contains(path)
    }
    fn name(&self) -> String {
        (**self).name()
    }
}

/// A directory holding the IPSW's files at their manifest paths.
///
/// Software-update bundles keep their BuildManifest in `AssetData/boot/` and name some files
/// relative to it with `..` (`../usr/standalone/update/ramdisk/…`); [`DirSource::within`]
/// allows that as long as the path stays inside the bundle.
#[derive(Debug, Clone)]
pub struct DirSource {
    /// Where relative paths start.
    root: PathBuf,
    /// What they may not leave (`root` or an ancestor of it).
    jail: PathBuf,
    /// `root` relative to `jail`, as path components.
    start: Vec<std::ffi::OsString>,
}

impl DirSource {
    /// Paths resolve against `root` and may not leave it.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Self {
            jail: root.clone(),
            root,
            start: Vec::new(),
        }
    }

    /// Paths resolve against `root` and may climb with `..` up to `jail`. When `root` is not
    /// inside `jail`, `root` itself is the limit.
    pub fn within(root: impl Into<PathBuf>, jail: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let jail = jail.into();
        match root.strip_prefix(&jail) {
            Ok(rel) => {
                let start = rel
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(n) => Some(n.to_os_string()),
                        _ => None,
                    })
                    .collect();
                Self { root, jail, start }
            }
            Err(_) => Self::new(root),
        }
    }

    /// The file for a manifest path, resolved lexically (symlinks are not followed up).
    /// Absolute paths and paths that climb out of the allowed directory are refused rather
    /// than followed, because the manifest comes from a file the station did not make.
    pub fn path_for(&self, path: &str) -> Result<PathBuf, SourceError> {
        let bad = |why| SourceError::BadPath {
            path: path.to_string(),
            why,
        };
        if path.is_empty() {
            return Err(bad("it is empty"));
        }
        let mut parts = self.start.clone();
        for c in Path::new(path).components() {
            match c {
                Component::Normal(n) => parts.push(n.to_os_string()),
                Component::CurDir => {}
                Component::ParentDir => {
                    if parts.pop().is_none() {
                        return Err(bad("it climbs out with .."));
                    }
                }
                Component::RootDir | Component::Prefix(_) => return Err(bad("it is absolute")),
            }
        }
        let mut out = self.jail.clone();
        out.extend(parts);
        Ok(out)
    }
}

impl ComponentSource for DirSource {
    fn read(&self, path: &str) -> Result<Vec<u8>, SourceError> {
        let file = self.path_for(path)?;
        std::fs::read(&file).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                SourceError::Missing {
                    path: path.to_string(),
                    source_name: self.name(),
                }
            } else {
                SourceError::Unreadable {
                    path: path.to_string(),
                    source_name: self.name(),
                    reason: e.to_string(),
                }
            }
        })
    }

    fn contains(&self, path: &str) -> Result<bool, SourceError> {
        Ok(self.path_for(path)?.is_file())
    }

    fn name(&self) -> String {
        self.root.display().to_string()
    }
}

/// Firmware read straight out of an IPSW (local file, or a remote one behind [`RandomAccess`]).
#[derive(Debug)]
pub struct IpswSource<R> {
    ipsw: Ipsw<R>,
    name: String,
}

impl<R: RandomAccess> IpswSource<R> {
    /// `name` is how messages call the IPSW (its file name or URL).
    pub fn new(ipsw: Ipsw<R>, name: impl Into<String>) -> Self {
        Self {
            ipsw,
            name: name.into(),
        }
    }

    pub fn ipsw(&self) -> &Ipsw<R> {
        &self.ipsw
    }
}

impl IpswSource<LocalFile> {
    /// Open an IPSW on disk.
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self, ZipError> {
        let path = path.as_ref();
        Ok(Self::new(
            Ipsw::open_path(path)?,
            path.display().to_string(),
        ))
    }
}

impl<R: RandomAccess> ComponentSource for IpswSource<R> {
    fn read(&self, path: &str) -> Result<Vec<u8>, SourceError> {
        self.ipsw
            .read_small(path, MAX_COMPONENT_LEN)
            .map_err(|e| match e {
                ZipError::NoSuchEntry { .. } => SourceError::Missing {
                    path: path.to_string(),
                    source_name: self.name(),
                },
                other => SourceError::Unreadable {
                    path: path.to_string(),
                    source_name: self.name(),
                    reason: other.to_string(),
                },
            })
    }

    fn contains(&self, path: &str) -> Result<bool, SourceError> {
        Ok(self.ipsw.archive().entry(path).is_some())
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_source_reads_by_manifest_path_and_refuses_escapes() {
        let d = std::env::temp_dir().join(format!("macrescue-source-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("Firmware/dfu")).unwrap();
        std::fs::write(d.join("Firmware/dfu/iBSS.j274.RELEASE.im4p"), b"ibss").unwrap();
        let s = DirSource::new(&d);
        assert_eq!(
            s.read("Firmware/dfu/iBSS.j274.RELEASE.im4p").unwrap(),
            b"ibss"
        );
        assert!(s.contains("Firmware/dfu/iBSS.j274.RELEASE.im4p").unwrap());
        assert!(!s.contains("Firmware/dfu/iBEC.j274.RELEASE.im4p").unwrap());
        assert_eq!(
            s.read("Firmware/dfu/iBEC.j274.RELEASE.im4p").unwrap_err(),
            SourceError::Missing {
                path: "Firmware/dfu/iBEC.j274.RELEASE.im4p".into(),
                source_name: d.display().to_string()
            }
        );
        for bad in ["../Restore/x.dmg", "/etc/passwd", "", "Firmware/../../x"] {
            assert!(
                matches!(s.read(bad), Err(SourceError::BadPath { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            s.path_for("Firmware/./dfu/../x").unwrap(),
            d.join("Firmware/x")
        );

        // An update bundle: the manifest in AssetData/boot names files one level up.
        let boot = d.join("AssetData/boot");
        let u = DirSource::within(&boot, d.join("AssetData"));
        assert_eq!(
            u.path_for("../usr/standalone/update/ramdisk/x.dmg")
                .unwrap(),
            d.join("AssetData/usr/standalone/update/ramdisk/x.dmg")
        );
        assert_eq!(u.path_for("Firmware/a").unwrap(), boot.join("Firmware/a"));
        assert!(matches!(
            u.path_for("../../x"),
            Err(SourceError::BadPath { .. })
        ));
        // A jail that is not an ancestor falls back to the root itself.
        let v = DirSource::within(&boot, d.join("elsewhere"));
        assert!(v.path_for("../x").is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
