//! Where the unpersonalized IM4P payloads come from: the IPSW itself, or (tests, unpacked
//! firmware) a directory laid out like it. Paths are the manifest's `Info.Path` values.

use std::path::{Component, Path, PathBuf};

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
#[derive(Debug, Clone)]
pub struct DirSource {
    root: PathBuf,
}

impl DirSource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The file for a manifest path. Manifest paths are relative and stay inside the IPSW; a
    /// path that climbs out (`..`) or is absolute is refused rather than followed, because the
    /// manifest is read from a file the station did not make.
    pub fn path_for(&self, path: &str) -> Result<PathBuf, SourceError> {
        let rel = Path::new(path);
        if path.is_empty() {
            return Err(SourceError::BadPath {
                path: path.to_string(),
                why: "it is empty",
            });
        }
        for c in rel.components() {
            match c {
                Component::Normal(_) | Component::CurDir => {}
                Component::ParentDir => {
                    return Err(SourceError::BadPath {
                        path: path.to_string(),
                        why: "it climbs out with ..",
                    })
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(SourceError::BadPath {
                        path: path.to_string(),
                        why: "it is absolute",
                    })
                }
            }
        }
        Ok(self.root.join(rel))
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
        std::fs::remove_dir_all(&d).unwrap();
    }
}
