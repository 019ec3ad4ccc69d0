//! A macOS restore image (IPSW): a ZIP archive (protocol.md §9.5, §9.7) read through a
//! [`RandomAccess`] source, so the same code serves a local file and, later, a remote one.

pub mod local_sources;
mod partial;
mod random_access;
pub mod remote;
pub mod zip;

pub use local_sources::{find_local_ipsw, local_ipsws, pick_local_ipsw, LocalIpsw};
pub use partial::{Arrivals, PartialFile};
pub use random_access::{LocalFile, RandomAccess};
pub use remote::{RemoteConfig, RemoteError, RemoteFile, RemoteStats};
pub use zip::{EntryReader, Method, StoredEntry, ZipArchive, ZipEntry, ZipError};

/// The IPSW entry listing build identities and component paths (§9.5, §9.6).
pub const BUILD_MANIFEST: &str = "BuildManifest.plist";
pub const RESTORE_PLIST: &str = "Restore.plist";
pub const RESTORE_VERSION_PLIST: &str = "RestoreVersion.plist";
pub const SYSTEM_VERSION_PLIST: &str = "SystemVersion.plist";

/// Real BuildManifests are a few MB; a cap keeps a damaged size field from exhausting memory
/// on the small rescue image.
pub const MAX_MANIFEST_LEN: u64 = 64 << 20;

/// An opened IPSW.
#[derive(Debug)]
pub struct Ipsw<R> {
    archive: ZipArchive<R>,
}

impl<R: RandomAccess> Ipsw<R> {
    pub fn open(source: R) -> Result<Self, ZipError> {
        Ok(Self {
            archive: ZipArchive::open(source)?,
        })
    }

    pub fn archive(&self) -> &ZipArchive<R> {
        &self.archive
    }

    /// The raw `BuildManifest.plist`; its absence means the file is no restore image.
    pub fn build_manifest(&self) -> Result<Vec<u8>, ZipError> {
        self.read_small(BUILD_MANIFEST, MAX_MANIFEST_LEN)
    }

    /// Reads a whole entry (a plist, a firmware component) into memory, up to `limit` bytes.
    pub fn read_small(&self, path: &str, limit: u64) -> Result<Vec<u8>, ZipError> {
        let entry = self.archive.require(path)?;
        self.archive.read_to_vec(entry, limit)
    }
}

impl Ipsw<LocalFile> {
    /// Opens an IPSW on disk.
    pub fn open_path(path: impl AsRef<std::path::Path>) -> Result<Self, ZipError> {
        let path = path.as_ref();
        let file = LocalFile::open(path).map_err(|source| ZipError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::open(file)
    }
}
