//! Where the boot chain gets its personalized images from.
//!
//! Personalization (TSS + IMG4 stitching) is a later issue; until then images arrive already
//! personalized, one file per component.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("no personalized image for {component}: {path} is missing — put the personalized IMG4 for {component} there (file name = manifest component name + .img4)")]
    Missing { component: String, path: String },
    #[error("cannot read the personalized image {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("the personalized image {path} is empty")]
    Empty { path: String },
    #[error("cannot personalize {component}: {reason}")]
    Personalization { component: String, reason: String },
}

/// Source of personalized images (IMG4) by manifest component name.
pub trait ImageProvider {
    /// The personalized image of `component` (e.g. `iBSS`, `Ap,LocalPolicy`).
    fn personalized(&mut self, component: &str) -> Result<Vec<u8>, ImageError>;

    /// The device reported new nonces after a re-enumeration: tickets made for the old ApNonce
    /// no longer apply.
    fn nonces_changed(
        &mut self,
        ap_nonce: &[u8],
        sep_nonce: Option<&[u8]>,
    ) -> Result<(), ImageError>;

    /// Cheap check, before the boot chain starts, that `component` can be provided; so a missing
    /// file stops the run before the Mac is half-booted. Default: assume yes.
    fn check_available(&self, _component: &str) -> Result<(), ImageError> {
        Ok(())
    }
}

/// Already-personalized images in a directory: `<dir>/<component>.img4`.
#[derive(Debug, Clone)]
pub struct PersonalizedDir {
    dir: PathBuf,
}

impl PersonalizedDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_for(&self, component: &str) -> PathBuf {
        self.dir.join(format!("{component}.img4"))
    }
}

impl ImageProvider for PersonalizedDir {
    fn personalized(&mut self, component: &str) -> Result<Vec<u8>, ImageError> {
        self.check_available(component)?;
        let path = self.path_for(component);
        let bytes = std::fs::read(&path).map_err(|e| ImageError::Unreadable {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if bytes.is_empty() {
            return Err(ImageError::Empty {
                path: path.display().to_string(),
            });
        }
        Ok(bytes)
    }

    fn nonces_changed(
        &mut self,
        ap_nonce: &[u8],
        _sep_nonce: Option<&[u8]>,
    ) -> Result<(), ImageError> {
        // Pre-made images cannot be re-personalized; if the ticket was made for the old nonce
        // the Mac will refuse the next image, and the driver reports that failure then.
        tracing::warn!(
            "the Mac's ApNonce changed to {}; images in {} were personalized beforehand and are used as they are",
            hex::encode(ap_nonce),
            self.dir.display()
        );
        Ok(())
    }

    fn check_available(&self, component: &str) -> Result<(), ImageError> {
        let path = self.path_for(component);
        if path.is_file() {
            Ok(())
        } else {
            Err(ImageError::Missing {
                component: component.to_string(),
                path: path.display().to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("macrescue-images-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_component_files_by_manifest_name() {
        let d = tempdir("read");
        std::fs::write(d.join("Ap,LocalPolicy.img4"), b"lpol").unwrap();
        std::fs::write(d.join("iBSS.img4"), b"ibss").unwrap();
        std::fs::write(d.join("RestoreLogo.img4"), b"").unwrap();
        let mut p = PersonalizedDir::new(&d);
        assert_eq!(p.personalized("Ap,LocalPolicy").unwrap(), b"lpol");
        assert_eq!(p.personalized("iBSS").unwrap(), b"ibss");
        assert!(p.check_available("iBSS").is_ok());
        let err = p.personalized("iBEC").unwrap_err();
        assert_eq!(
            err,
            ImageError::Missing {
                component: "iBEC".into(),
                path: d.join("iBEC.img4").display().to_string()
            }
        );
        assert!(err.to_string().contains("iBEC.img4"));
        assert!(matches!(
            p.personalized("RestoreLogo"),
            Err(ImageError::Empty { .. })
        ));
        assert!(p.nonces_changed(&[1, 2], None).is_ok());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
