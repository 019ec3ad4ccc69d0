//! Which Mac is being simulated: chip, board and the components its BuildManifest says iBoot
//! loads, read from the real BuildManifests in `shared/fixtures`.

use std::path::{Path, PathBuf};

/// One manifest entry the simulated iBoot cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    /// Manifest key, e.g. `iBEC`, `RestoreKernelCache`, `Ap,RestoreDCP2`.
    pub name: String,
    /// `Info.Path` inside the IPSW.
    pub path: String,
    /// `Info.Img4PayloadType` when the manifest states one.
    pub payload_type: Option<String>,
    /// `Info.IsLoadedByiBoot`, when present.
    pub loaded_by_iboot: Option<bool>,
    /// `Info.IsLoadedByiBootStage1 == true`.
    pub loaded_by_stage1: bool,
}

/// A simulated Mac model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Board {
    /// Lowercase board config, e.g. `j274ap`.
    pub board_config: String,
    pub cpid: u32,
    pub bdid: u32,
    pub security_domain: u32,
    /// The identity's `Info.Variant` the components were taken from.
    pub variant: String,
    /// Manifest entries of that identity, in manifest order.
    pub components: Vec<Component>,
}

#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("cannot read BuildManifest {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: plist::Error,
    },
    #[error("BuildManifest {path} is malformed: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("no fixture BuildManifest for board {0:?}; known boards: {1}")]
    UnknownBoard(String, String),
}

/// `shared/` beside the repository (CI clones with it there); `MACRESCUE_SHARED` overrides.
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("MACRESCUE_SHARED") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
    }
}

pub fn manifests_dir() -> PathBuf {
    shared_dir().join("fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests")
}

fn uint(v: Option<&plist::Value>) -> Option<u64> {
    match v? {
        plist::Value::Integer(i) => i.as_unsigned(),
        plist::Value::String(s) => {
            let s = s.trim();
            match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => s.parse().ok(),
            }
        }
        _ => None,
    }
}

impl Board {
    /// Every Apple Silicon Mac board with a fixture manifest, sorted by board config.
    pub fn fixture_boards() -> Result<Vec<String>, BoardError> {
        let dir = manifests_dir();
        let rd = std::fs::read_dir(&dir).map_err(|e| BoardError::Malformed {
            path: dir.clone(),
            what: e.to_string(),
        })?;
        let mut out: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n.strip_suffix(".BuildManifest.plist")
                    .map(|b| b.to_ascii_lowercase())
            })
            // x86legacyap and j160ap are Intel Macs' manifests: no DFU-able Apple silicon there.
            .filter(|b| b.starts_with('j') && b != "j160ap" || b == "vma2macosap")
            .collect();
        out.sort();
        Ok(out)
    }

    /// Load a board from its fixture manifest.
    pub fn load(board_config: &str) -> Result<Board, BoardError> {
        let want = board_config.to_ascii_lowercase();
        let dir = manifests_dir();
        let file = std::fs::read_dir(&dir)
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".BuildManifest.plist"))
                    .is_some_and(|b| b.eq_ignore_ascii_case(&want))
            });
        match file {
            Some(f) => Board::from_manifest(&f, &want),
            None => Err(BoardError::UnknownBoard(
                want,
                Board::fixture_boards().unwrap_or_default().join(", "),
            )),
        }
    }

    /// Read `board_config`'s identity from a BuildManifest: the first identity for the board
    /// that carries `iBSS` (the DFU restore identity, not the `macOS Customer` one).
    pub fn from_manifest(path: &Path, board_config: &str) -> Result<Board, BoardError> {
        let malformed = |what: &str| BoardError::Malformed {
            path: path.to_path_buf(),
            what: what.to_string(),
        };
        let root = plist::Value::from_file(path).map_err(|source| BoardError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let ids = root
            .as_dictionary()
            .and_then(|d| d.get("BuildIdentities"))
            .and_then(|v| v.as_array())
            .ok_or_else(|| malformed("no BuildIdentities array"))?;
        let identity = ids
            .iter()
            .filter_map(|v| v.as_dictionary())
            .find(|id| {
                let class = id
                    .get("Info")
                    .and_then(|i| i.as_dictionary())
                    .and_then(|i| i.get("DeviceClass"))
                    .and_then(|c| c.as_string());
                let has_ibss = id
                    .get("Manifest")
                    .and_then(|m| m.as_dictionary())
                    .is_some_and(|m| m.contains_key("iBSS"));
                class.is_some_and(|c| c.eq_ignore_ascii_case(board_config)) && has_ibss
            })
            .ok_or_else(|| malformed(&format!("no restore identity for {board_config}")))?;
        let cpid = uint(identity.get("ApChipID")).ok_or_else(|| malformed("no ApChipID"))?;
        let bdid = uint(identity.get("ApBoardID")).ok_or_else(|| malformed("no ApBoardID"))?;
        let security_domain = uint(identity.get("ApSecurityDomain")).unwrap_or(1);
        let variant = identity
            .get("Info")
            .and_then(|i| i.as_dictionary())
            .and_then(|i| i.get("Variant"))
            .and_then(|v| v.as_string())
            .unwrap_or_default()
            .to_string();
        let manifest = identity
            .get("Manifest")
            .and_then(|m| m.as_dictionary())
            .ok_or_else(|| malformed("identity has no Manifest"))?;
        let components = manifest
            .iter()
            .filter_map(|(name, entry)| {
                let info = entry.as_dictionary()?.get("Info")?.as_dictionary()?;
                Some(Component {
                    name: name.clone(),
                    path: info.get("Path")?.as_string()?.to_string(),
                    payload_type: info
                        .get("Img4PayloadType")
                        .and_then(|v| v.as_string())
                        .map(str::to_string),
                    loaded_by_iboot: info.get("IsLoadedByiBoot").and_then(|v| v.as_boolean()),
                    loaded_by_stage1: info
                        .get("IsLoadedByiBootStage1")
                        .and_then(|v| v.as_boolean())
                        .unwrap_or(false),
                })
            })
            .collect();
        Ok(Board {
            board_config: board_config.to_ascii_lowercase(),
            cpid: u32::try_from(cpid).map_err(|_| malformed("ApChipID out of range"))?,
            bdid: u32::try_from(bdid).map_err(|_| malformed("ApBoardID out of range"))?,
            security_domain: u32::try_from(security_domain).unwrap_or(1),
            variant,
            components,
        })
    }

    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_mac_mini_m1() {
        let b = Board::load("j274ap").unwrap();
        assert_eq!((b.cpid, b.bdid), (0x8103, 0x22));
        assert_eq!(b.variant, "Customer Software Update");
        assert!(b.component("iBSS").is_some());
        let stage1: Vec<_> = b
            .components
            .iter()
            .filter(|c| c.loaded_by_stage1)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            stage1,
            ["Ap,RestoreCIO", "Ap,RestoreTMU", "RestoreANS", "RestoreDCP"]
        );
    }

    #[test]
    fn every_fixture_board_loads() {
        let boards = Board::fixture_boards().unwrap();
        assert!(boards.len() >= 40, "{boards:?}");
        for b in boards {
            let board = Board::load(&b).unwrap();
            assert!(board.component("iBEC").is_some(), "{b}");
        }
    }

    #[test]
    fn unknown_board_lists_known_ones() {
        let e = Board::load("j999ap").unwrap_err().to_string();
        assert!(e.contains("j274ap"), "{e}");
    }
}
