//! Firmware catalogs: which restore images (IPSWs) exist for a Mac's product type.
//!
//! Two sources (protocol.md §9.1, §9.2), both parsed here from bytes the caller fetched:
//! * Apple's mesu macOS IPSW catalog (XML plist), the first-party source;
//! * the ipsw.me v4 device JSON, a third-party mirror that also covers older builds.
//!
//! Neither source decides whether a build is *signed* for a given Mac: only TSS does (§9.4),
//! so ipsw.me's `signed` flag is deliberately ignored. Parsing is sans-IO: no HTTP here.

use std::cmp::Ordering;

use plist::{Dictionary, Value};
use thiserror::Error;

/// Where Apple publishes the macOS IPSW catalog (§9.2).
pub const MESU_MACOS_IPSW_CATALOG_URL: &str =
    "https://mesu.apple.com/assets/macos/com_apple_macOSIPSW/com_apple_macOSIPSW.xml";

/// The ipsw.me v4 endpoint listing every firmware of one product type (§9.1).
pub fn ipsw_me_device_url(product_type: &str) -> String {
    format!("https://api.ipsw.me/v4/device/{product_type}")
}

/// The file name Apple gives a macOS restore image (§9.3).
pub fn ipsw_file_name(product_version: &str, build: &str) -> String {
    format!("UniversalMac_{product_version}_{build}_Restore.ipsw")
}

/// One restore image offered for a product type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareEntry {
    /// macOS version, e.g. `26.3.1`.
    pub version: String,
    /// Build, e.g. `25D2128`.
    pub build: String,
    /// Where to download the IPSW.
    pub url: String,
    /// SHA-1 of the whole IPSW. Apple omits it for some product types (`VirtualMac2,1`), in
    /// which case the download cannot be verified against the catalog.
    pub sha1: Option<[u8; 20]>,
}

impl FirmwareEntry {
    /// The SHA-1 as 40 lowercase hex digits, as catalogs and `shasum` print it.
    pub fn sha1_hex(&self) -> Option<String> {
        self.sha1.map(hex::encode)
    }

    /// The last path segment of the URL: the name to store the download under.
    pub fn file_name(&self) -> Option<&str> {
        let path = self.url.split(['?', '#']).next().unwrap_or_default();
        path.rsplit('/').next().filter(|name| !name.is_empty())
    }

    /// Newest first: by version components, then by build.
    fn newest_first(a: &Self, b: &Self) -> Ordering {
        compare_versions(&b.version, &a.version).then_with(|| compare_builds(&b.build, &a.build))
    }
}

/// Errors of catalog parsing; every message says what the technician can do next.
#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("Apple's IPSW catalog is not a readable property list ({0}): fetch it again, or pass --ipsw")]
    Plist(#[from] plist::Error),
    #[error("the ipsw.me answer is not JSON ({0}): try again later, or pass --ipsw")]
    Json(#[from] serde_json::Error),
    #[error(
        "the catalog has no {missing}: it is not Apple's macOS IPSW catalog \
         (a software-update or MobileAsset catalog lists no restore images); pass --ipsw"
    )]
    NotAnIpswCatalog { missing: &'static str },
    #[error("{product_type} is not in Apple's catalog: pass --ipsw or --build")]
    UnknownProductType { product_type: String },
    #[error("{product_type} has no usable restore image in the catalog ({reason}): pass --ipsw or --build")]
    NoUsableEntries {
        product_type: String,
        reason: String,
    },
    #[error(
        "ipsw.me answered for {found:?} while {expected} was asked: \
         the answer is not for this Mac; pass --ipsw"
    )]
    WrongDevice { expected: String, found: String },
}

/// Apple's mesu macOS IPSW catalog, parsed down to the software-versions dictionary.
#[derive(Debug, Clone)]
pub struct MesuCatalog {
    /// `MobileDeviceSoftwareVersions` of the newest schema version: ProductType → build → entry.
    versions: Dictionary,
}

impl MesuCatalog {
    /// Parses the catalog's bytes (XML or binary plist).
    pub fn parse(bytes: &[u8]) -> Result<Self, CatalogError> {
        let root = Value::from_reader(std::io::Cursor::new(bytes))?;
        let by_version = root
            .as_dictionary()
            .and_then(|d| d.get("MobileDeviceSoftwareVersionsByVersion"))
            .and_then(Value::as_dictionary)
            .ok_or(CatalogError::NotAnIpswCatalog {
                missing: "MobileDeviceSoftwareVersionsByVersion",
            })?;
        // Keys are schema versions as decimal strings; newer schemas get larger numbers.
        let newest = by_version
            .iter()
            .filter_map(|(key, value)| Some((key.trim().parse::<u64>().ok()?, value)))
            .max_by_key(|(n, _)| *n)
            .map(|(_, value)| value)
            .ok_or(CatalogError::NotAnIpswCatalog {
                missing: "numeric schema version under MobileDeviceSoftwareVersionsByVersion",
            })?;
        let versions = newest
            .as_dictionary()
            .and_then(|d| d.get("MobileDeviceSoftwareVersions"))
            .and_then(Value::as_dictionary)
            .ok_or(CatalogError::NotAnIpswCatalog {
                missing: "MobileDeviceSoftwareVersions",
            })?
            .clone();
        Ok(Self { versions })
    }

    /// Every product type the catalog names, in catalog order.
    pub fn product_types(&self) -> impl Iterator<Item = &str> {
        self.versions.keys().map(String::as_str)
    }

    /// Every build offered for `product_type`, newest first, without duplicates.
    pub fn builds_for(&self, product_type: &str) -> Result<Vec<FirmwareEntry>, CatalogError> {
        let builds = self
            .versions
            .get(product_type)
            .and_then(Value::as_dictionary)
            .ok_or_else(|| CatalogError::UnknownProductType {
                product_type: product_type.to_owned(),
            })?;

        let mut entries = Vec::new();
        let mut rejected = Vec::new();
        for (key, value) in builds {
            let Some(restore) = restore_dict(builds, key, value) else {
                // Update-only entries and shapes we do not know carry no restore image.
                tracing::debug!(product_type, key, "catalog entry without a Restore image");
                continue;
            };
            match mesu_entry(restore) {
                Ok(entry) => entries.push(entry),
                Err(reason) => {
                    tracing::warn!(product_type, key, %reason, "skipping a catalog entry");
                    rejected.push(format!("{key}: {reason}"));
                }
            }
        }
        finish(product_type, entries, rejected)
    }
}

/// The `Restore` dictionary of one build entry, following `SameAs` aliases and the
/// `Unknown/Universal/Restore` shape that names the current build.
fn restore_dict<'a>(builds: &'a Dictionary, key: &str, value: &'a Value) -> Option<&'a Dictionary> {
    let mut current = value.as_dictionary()?;
    // A SameAs chain longer than the dictionary must loop; stop instead of spinning.
    for _ in 0..=builds.len() {
        if let Some(restore) = current.get("Restore").and_then(Value::as_dictionary) {
            return Some(restore);
        }
        if let Some(alias) = current.get("SameAs").and_then(Value::as_string) {
            current = builds.get(alias)?.as_dictionary()?;
            continue;
        }
        if key == "Unknown" {
            return current
                .get("Universal")
                .and_then(Value::as_dictionary)?
                .get("Restore")
                .and_then(Value::as_dictionary);
        }
        return None;
    }
    None
}

fn mesu_entry(restore: &Dictionary) -> Result<FirmwareEntry, String> {
    let field = |name: &str| restore.get(name).and_then(Value::as_string);
    let build = field("BuildVersion").ok_or("no BuildVersion")?;
    let version = field("ProductVersion").ok_or("no ProductVersion")?;
    let url = field("FirmwareURL").ok_or("no FirmwareURL")?;
    let sha1 = match field("FirmwareSHA1") {
        None | Some("") => None,
        Some(text) => Some(parse_sha1(text)?),
    };
    make_entry(version, build, url, sha1)
}

/// Parses the ipsw.me v4 `/device/<ProductType>` JSON and returns every firmware listed,
/// newest first. `signed` is ignored: signing is decided by TSS, not by a mirror.
pub fn parse_ipsw_me_device(
    json: &[u8],
    product_type: &str,
) -> Result<Vec<FirmwareEntry>, CatalogError> {
    let root: serde_json::Value = serde_json::from_slice(json)?;
    let identifier = root
        .get("identifier")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default();
    if identifier != product_type {
        return Err(CatalogError::WrongDevice {
            expected: product_type.to_owned(),
            found: identifier.to_owned(),
        });
    }
    let firmwares = root
        .get("firmwares")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| CatalogError::NoUsableEntries {
            product_type: product_type.to_owned(),
            reason: "ipsw.me lists no firmwares".to_owned(),
        })?;

    let mut entries = Vec::new();
    let mut rejected = Vec::new();
    for (index, firmware) in firmwares.iter().enumerate() {
        match ipsw_me_entry(firmware) {
            Ok(entry) => entries.push(entry),
            Err(reason) => {
                tracing::warn!(product_type, index, %reason, "skipping an ipsw.me firmware");
                rejected.push(format!("firmware #{index}: {reason}"));
            }
        }
    }
    finish(product_type, entries, rejected)
}

fn ipsw_me_entry(firmware: &serde_json::Value) -> Result<FirmwareEntry, String> {
    let field = |name: &str| firmware.get(name).and_then(serde_json::Value::as_str);
    let version = field("version").ok_or("no version")?;
    let build = field("buildid").ok_or("no buildid")?;
    let url = field("url").ok_or("no url")?;
    let sha1 = match field("sha1sum") {
        None | Some("") => None,
        Some(text) => Some(parse_sha1(text)?),
    };
    make_entry(version, build, url, sha1)
}

fn make_entry(
    version: &str,
    build: &str,
    url: &str,
    sha1: Option<[u8; 20]>,
) -> Result<FirmwareEntry, String> {
    if version.trim().is_empty() || build.trim().is_empty() {
        return Err("empty version or build".to_owned());
    }
    // idevicerestore refuses `protected:` URLs (§9.1); anything not HTTP cannot be fetched.
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(format!("URL {url:?} is not an http(s) URL"));
    }
    Ok(FirmwareEntry {
        version: version.trim().to_owned(),
        build: build.trim().to_owned(),
        url: url.to_owned(),
        sha1,
    })
}

fn finish(
    product_type: &str,
    mut entries: Vec<FirmwareEntry>,
    rejected: Vec<String>,
) -> Result<Vec<FirmwareEntry>, CatalogError> {
    entries.sort_by(FirmwareEntry::newest_first);
    // The mesu catalog repeats the current build under `Unknown/Universal`.
    entries.dedup_by(|later, earlier| later.build == earlier.build && later.url == earlier.url);
    if entries.is_empty() {
        let reason = if rejected.is_empty() {
            "no entry has a restore image".to_owned()
        } else {
            rejected.join("; ")
        };
        return Err(CatalogError::NoUsableEntries {
            product_type: product_type.to_owned(),
            reason,
        });
    }
    Ok(entries)
}

/// Accepts exactly 40 hex digits (either case), the form both catalogs use.
pub fn parse_sha1(text: &str) -> Result<[u8; 20], String> {
    let text = text.trim();
    let mut digest = [0u8; 20];
    if text.len() != 40 || hex::decode_to_slice(text, &mut digest).is_err() {
        return Err(format!("SHA-1 {text:?} is not 40 hex digits"));
    }
    Ok(digest)
}

/// Compares dotted versions numerically (`26.10` > `26.9`, `26.3` == `26.3.0`).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let mut left = a.trim().split('.');
    let mut right = b.trim().split('.');
    loop {
        match (left.next(), right.next()) {
            (None, None) => return Ordering::Equal,
            (l, r) => {
                let ord = compare_version_part(l.unwrap_or("0"), r.unwrap_or("0"));
                if ord != Ordering::Equal {
                    return ord;
                }
            }
        }
    }
}

fn compare_version_part(a: &str, b: &str) -> Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        // Non-numeric parts (betas, garbage) sort by text, after numbers of the same slot.
        (Ok(_), Err(_)) => Ordering::Greater,
        (Err(_), Ok(_)) => Ordering::Less,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

/// Compares Apple build numbers: `<major><train letter><number><suffix>`, e.g. `25D2128` <
/// `25D2140` and `25C56` < `25D125`; numbers compare numerically, letters by text.
pub fn compare_builds(a: &str, b: &str) -> Ordering {
    let (ka, kb) = (build_key(a), build_key(b));
    ka.cmp(&kb).then_with(|| a.cmp(b))
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum BuildPart<'a> {
    Number(u64),
    Text(&'a str),
}

fn build_key(build: &str) -> Vec<BuildPart<'_>> {
    let mut parts = Vec::new();
    let mut rest = build.trim();
    while let Some(first) = rest.chars().next() {
        let digit = first.is_ascii_digit();
        let end = rest
            .find(|c: char| c.is_ascii_digit() != digit)
            .unwrap_or(rest.len());
        let (part, tail) = rest.split_at(end);
        parts.push(match part.parse::<u64>() {
            Ok(n) if digit => BuildPart::Number(n),
            _ => BuildPart::Text(part),
        });
        rest = tail;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(compare_versions("26.10", "26.9"), Ordering::Greater);
        assert_eq!(compare_versions("26.3", "26.3.0"), Ordering::Equal);
        assert_eq!(compare_versions("26.3.1", "26.3"), Ordering::Greater);
        assert_eq!(compare_versions("15.4.1", "26.2"), Ordering::Less);
        assert_eq!(compare_versions("", "1"), Ordering::Less);
    }

    #[test]
    fn builds_compare_by_parts() {
        assert_eq!(compare_builds("25D2140", "25D2128"), Ordering::Greater);
        assert_eq!(compare_builds("25D125", "25C56"), Ordering::Greater);
        assert_eq!(compare_builds("25C56", "25C100"), Ordering::Less);
        assert_eq!(compare_builds("24A335", "24A335a"), Ordering::Less);
        assert_eq!(compare_builds("", ""), Ordering::Equal);
        // 20+ digit runs overflow u64 and fall back to text without panicking.
        assert_ne!(
            compare_builds("99999999999999999999999A", "1A"),
            Ordering::Equal
        );
    }

    #[test]
    fn sha1_must_be_40_hex_digits() {
        assert_eq!(
            parse_sha1("0B60B702FA2B7665161D80582AC60E2ED284DF6F").map(hex::encode),
            Ok("0b60b702fa2b7665161d80582ac60e2ed284df6f".to_owned())
        );
        assert!(parse_sha1("0b60b702").is_err());
        assert!(parse_sha1("zz60b702fa2b7665161d80582ac60e2ed284df6f").is_err());
        assert!(parse_sha1("é0b60b702fa2b7665161d80582ac60e2ed284df").is_err());
    }

    #[test]
    fn file_name_is_last_url_segment() {
        let entry = FirmwareEntry {
            version: "26.2".into(),
            build: "25C56".into(),
            url: "https://example.invalid/a/UniversalMac_26.2_25C56_Restore.ipsw?x=1".into(),
            sha1: None,
        };
        assert_eq!(
            entry.file_name(),
            Some(ipsw_file_name("26.2", "25C56").as_str())
        );
        let bare = FirmwareEntry {
            url: "https://example.invalid/".into(),
            ..entry
        };
        assert_eq!(bare.file_name(), None);
    }
}
