//! `mac-sim make-ipsw`: a synthetic IPSW with the real ZIP layout of a macOS IPSW (§9.5, §9.7).
//!
//! Entries, in archive order:
//! 1. `BuildManifest.plist` — the board's real fixture manifest (or `--manifest`), whole, with
//!    the `Digest` of every component that has an IM4P here rewritten to match it;
//! 2. `Restore.plist`, `RestoreVersion.plist`, `SystemVersion.plist` — built from the manifest;
//! 3. the OS image at `Manifest.OS.Info.Path` (every distinct OS path of the manifest): `os_size`
//!    bytes from [`os_fill`], stored by default (`--deflate-os` deflates it). It comes before the
//!    components on purpose: with an OS image over 4 GiB every later entry needs a ZIP64 offset,
//!    which is what a reader of a real IPSW meets;
//! 4. one IM4P per other `Info.Path` of the manifest (sorted), see below;
//! 5. `Firmware/Manifests/restore/<MacOSVariant or Variant>/apticket.<DeviceClass>.im4m` per
//!    identity with components: a global ticket (ECID 0, no nonce) signed by the test key.
//!
//! IM4P files: `SEQUENCE { "IM4P", 4cc, "mac-sim <path>", OCTET STRING payload }` with a small
//! deterministic payload derived from the path. A file shared by several components (e.g.
//! `kernelcache.release.*` for `KernelCache` and `RestoreKernelCache`) is stored with the 4CC of
//! the component that is *not* rewritten by the host (§5.2), and each component's manifest
//! `Digest` is SHA-384 of the IM4P **as delivered**: with the host's rewritten 4CC for the
//! `Restore*` names of §5.2, as stored for the others. So the TSS (which compares request
//! digests with the manifest) and the simulated Mac (which compares the ticket's DGST with the
//! IM4P it receives) agree end to end. The OS image keeps the fixture's digest (it is not an
//! IM4P and hashing many GiB would make tests slow).
//!
//! ZIP: written by [`zip::ZipWriter`] below, streaming, never holding an entry as large as the OS
//! image in memory: local headers carry known sizes (the CRC is patched in after the data, the
//! compressed size too when deflating), ZIP64 extra fields for any size/offset ≥ 4 GiB (or all
//! of them with `force_zip64`), a central directory, and ZIP64 end records when needed. All
//! timestamps are 1980-01-01 so output is byte-for-byte reproducible.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use plist::{Dictionary, Value};
use sha2::{Digest, Sha256};

use crate::ftab;
use crate::images::{fourcc_for, RESTORE_REWRITES};
use crate::img4::{build_im4p, FourCc};
use crate::ticket::{self, TicketSpec};

/// Why an IPSW could not be made.
#[derive(Debug, thiserror::Error)]
pub enum IpswError {
    #[error("cannot read the BuildManifest {path}: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: plist::Error,
    },
    #[error("BuildManifest {0} is malformed: {1}")]
    Malformed(PathBuf, String),
    #[error("no fixture BuildManifest for board {0:?}: run `mac-sim boards` for the list, or pass --manifest")]
    UnknownBoard(String),
    #[error("writing the IPSW failed: {0} (is the disk full?)")]
    Io(#[from] io::Error),
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct IpswOptions {
    /// Board config, e.g. `j274ap` (case-insensitive).
    pub board: String,
    /// A BuildManifest to use instead of the board's fixture.
    pub manifest: Option<PathBuf>,
    pub os_size: u64,
    pub deflate_os: bool,
    /// Write ZIP64 extra fields and end records even when nothing needs them (tests the ZIP64
    /// path on a small file).
    pub force_zip64: bool,
    /// OS image content: mostly zeros written as holes, so a multi-GiB IPSW costs little disk.
    pub sparse_os: bool,
    /// More entries (path, content), stored after the generated ones: what a test's restore
    /// asks for beyond the boot chain (e.g. the BootabilityBundle).
    pub extra_entries: Vec<(String, Vec<u8>)>,
    /// The fixtures are preflight manifests with one bootable identity; a full Mac IPSW has
    /// Erase, Upgrade and `macOS Customer` identities (protocol.md §10). Derive them.
    pub mac_identities: bool,
    /// Add the BootabilityBundle a full IPSW carries (restored asks for it, §7.7).
    pub bootability_bundle: bool,
}

impl IpswOptions {
    pub fn new(board: &str) -> IpswOptions {
        IpswOptions {
            board: board.to_string(),
            manifest: None,
            os_size: 1 << 20,
            deflate_os: false,
            force_zip64: false,
            sparse_os: false,
            extra_entries: Vec::new(),
            mac_identities: false,
            bootability_bundle: false,
        }
    }
}

/// Entries of the BootabilityBundle (content is opaque to the host).
pub const BOOTABILITY_FILES: [(&str, &[u8]); 2] = [
    (
        "BootabilityBundle/Restore/Bootability/Bootability.dmg",
        &[0xB0; 3000],
    ),
    (
        "BootabilityBundle/Restore/Firmware/Bootability.dmg.trustcache",
        b"trustcache",
    ),
];

/// Replace the identities by Erase, Update and `macOS Customer` ones derived from the first
/// bootable identity (the one with an iBSS).
fn derive_mac_identities(m: &mut Dictionary) {
    let Some(base) = identities(m)
        .find(|i| {
            i.get("Manifest")
                .and_then(Value::as_dictionary)
                .is_some_and(|mf| mf.contains_key("iBSS"))
        })
        .cloned()
    else {
        return;
    };
    let with = |variant: &str, behavior: &str| {
        let mut id = base.clone();
        if let Some(Value::Dictionary(info)) = id.get_mut("Info") {
            info.insert("Variant".into(), variant.into());
            info.insert("RestoreBehavior".into(), behavior.into());
            info.insert("MacOSVariant".into(), "macOS Customer".into());
        }
        Value::Dictionary(id)
    };
    m.insert(
        "BuildIdentities".into(),
        Value::Array(vec![
            with("Customer Erase Install (IPSW)", "Erase"),
            with("Customer Upgrade Install (IPSW)", "Update"),
            with("macOS Customer", "Erase"),
        ]),
    );
}

/// What was written.
#[derive(Debug, Clone)]
pub struct IpswSummary {
    /// The BuildManifest as written (digests rewritten).
    pub manifest: Dictionary,
    /// OS image entry names.
    pub os_paths: Vec<String>,
    /// Every entry: name → uncompressed size.
    pub entries: BTreeMap<String, u64>,
}

/// The dense generator restarts every `OS_BLOCK` bytes, so any range is cheap to regenerate.
pub const OS_BLOCK: u64 = 64 << 10;
/// Sparse layout: of every `SPARSE_PERIOD` bytes only the first [`SPARSE_HEAD`] carry data.
pub const SPARSE_PERIOD: u64 = 16 << 20;
pub const SPARSE_HEAD: u64 = 4096;

fn xorshift(mut s: u64) -> impl FnMut() -> u64 {
    s |= 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

/// The OS image byte at `offset` (what [`os_fill`] writes), for tests that spot-check.
pub fn os_byte(offset: u64, sparse: bool) -> u8 {
    let mut b = [0u8];
    os_fill(offset, &mut b, sparse);
    b[0]
}

/// Fill `buf` with the OS image bytes at `offset`. Returns true when the range is all zeros;
/// then `buf` is left untouched so the writer can leave a hole.
///
/// Dense: the 8-byte words of each [`OS_BLOCK`] are a xorshift64 stream seeded by the block
/// index (little-endian). Sparse: dense bytes where `offset % SPARSE_PERIOD < SPARSE_HEAD`,
/// zeros elsewhere.
pub fn os_fill(offset: u64, buf: &mut [u8], sparse: bool) -> bool {
    let len = buf.len() as u64;
    if sparse {
        let in_period = offset % SPARSE_PERIOD;
        if in_period >= SPARSE_HEAD && in_period + len <= SPARSE_PERIOD {
            return true;
        }
    }
    let mut pos = 0usize;
    while pos < buf.len() {
        let o = offset + pos as u64;
        let block = o / OS_BLOCK;
        let in_block = o % OS_BLOCK;
        let n = ((OS_BLOCK - in_block) as usize).min(buf.len() - pos);
        let mut next = xorshift(block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x05_1A6E);
        for _ in 0..in_block / 8 {
            next();
        }
        let mut word = next().to_le_bytes();
        let mut wi = (in_block % 8) as usize;
        for (i, b) in buf[pos..pos + n].iter_mut().enumerate() {
            if wi == 8 {
                word = next().to_le_bytes();
                wi = 0;
            }
            *b = if sparse && (o + i as u64) % SPARSE_PERIOD >= SPARSE_HEAD {
                0
            } else {
                word[wi]
            };
            wi += 1;
        }
        pos += n;
    }
    false
}

fn payload(path: &str) -> Vec<u8> {
    let h = Sha256::digest(path.as_bytes());
    let len = 1024 + usize::from(u16::from_le_bytes([h[0], h[1]]) % 3072);
    let mut next = xorshift(u64::from_le_bytes([
        h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9],
    ]));
    (0..len).map(|_| (next() >> 32) as u8).collect()
}

/// The 4CC the host puts into `name`'s IM4P before sending it (§5.2), if it rewrites.
fn rewrite_of(name: &str) -> Option<FourCc> {
    RESTORE_REWRITES
        .iter()
        .find(|(n, _)| *n == name)
        .and_then(|(_, cc)| FourCc::parse(cc))
}

/// An IM4P with its type string replaced (same length, so only those four bytes change).
pub fn with_fourcc(im4p: &[u8], fourcc: FourCc) -> Vec<u8> {
    let mut out = im4p.to_vec();
    // The type string directly follows the "IM4P" magic: `16 04 IM4P 16 04 <type>`.
    let magic = [0x16, 0x04, b'I', b'M', b'4', b'P', 0x16, 0x04];
    if let Some(i) = out.windows(8).position(|w| w == magic) {
        out[i + 8..i + 12].copy_from_slice(&fourcc.0);
    }
    out
}

struct Comp {
    name: String,
    path: String,
    payload_type: Option<String>,
    /// `Info.IsFTAB`: the file is an RTKit firmware table, not an IM4P.
    ftab: bool,
}

fn identities(manifest: &Dictionary) -> impl Iterator<Item = &Dictionary> {
    manifest
        .get("BuildIdentities")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_dictionary)
}

fn components(id: &Dictionary) -> Vec<Comp> {
    id.get("Manifest")
        .and_then(Value::as_dictionary)
        .into_iter()
        .flatten()
        .filter_map(|(name, e)| {
            let info = e.as_dictionary()?.get("Info")?.as_dictionary()?;
            Some(Comp {
                name: name.clone(),
                path: info.get("Path")?.as_string()?.to_string(),
                payload_type: info
                    .get("Img4PayloadType")
                    .and_then(Value::as_string)
                    .map(str::to_string),
                ftab: info.get("IsFTAB").and_then(Value::as_boolean) == Some(true),
            })
        })
        .collect()
}

fn uint(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::Integer(i) => i.as_unsigned(),
        Value::String(s) => {
            let s = s.trim();
            match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => s.parse().ok(),
            }
        }
        _ => None,
    }
}

fn find_manifest(board: &str) -> Result<PathBuf, IpswError> {
    let dir = crate::board::manifests_dir();
    std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".BuildManifest.plist"))
                .is_some_and(|b| b.eq_ignore_ascii_case(board))
        })
        .ok_or_else(|| IpswError::UnknownBoard(board.to_string()))
}

fn plist_bytes(d: &Dictionary) -> Vec<u8> {
    let mut out = Vec::new();
    // Serializing an in-memory dictionary into a Vec cannot fail.
    let _ = plist::to_writer_xml(&mut out, &Value::Dictionary(d.clone()));
    out
}

/// The component files of `manifest`: path → (stored IM4P, the digest per component name).
type Files = BTreeMap<String, (Vec<u8>, Vec<(String, Vec<u8>)>)>;

fn component_files(manifest: &Dictionary, os_paths: &BTreeSet<String>) -> Files {
    // Every component that uses a path, across identities.
    let mut users: BTreeMap<String, BTreeMap<String, Option<String>>> = BTreeMap::new();
    let mut ftabs = BTreeSet::new();
    for id in identities(manifest) {
        for c in components(id) {
            if os_paths.contains(&c.path) {
                continue;
            }
            if c.ftab {
                ftabs.insert(c.path.clone());
            }
            users
                .entry(c.path)
                .or_default()
                .insert(c.name, c.payload_type);
        }
    }
    let mut files = Files::new();
    for (path, names) in users {
        if ftabs.contains(&path) {
            // An RTKit firmware table as real IPSWs ship it (`Firmware/rt13m0/Release/ftab.bin`
            // serves both RTKitOS and RestoreRTKitOS): the OS and the restore OS as entries.
            let table = ftab::Table {
                tag: *b"rkos",
                entries: vec![
                    (*b"rkos", payload(&path)),
                    (*b"rrko", payload(&format!("{path}#restore"))),
                ],
            }
            .write();
            let digest = ticket::sha384(&table);
            let digests = names.keys().map(|n| (n.clone(), digest.clone())).collect();
            files.insert(path, (table, digests));
            continue;
        }
        // Stored 4CC: a component the host does not rewrite, if any uses the file.
        let stored = names
            .iter()
            .find(|(n, _)| rewrite_of(n).is_none())
            .or_else(|| names.iter().next())
            .map(|(n, t)| fourcc_for(n, t.as_deref()))
            .unwrap_or(FourCc(*b"data"));
        let im4p = build_im4p(stored, &format!("mac-sim {path}"), &payload(&path));
        let digests = names
            .keys()
            .map(|n| {
                let delivered = match rewrite_of(n) {
                    Some(cc) => with_fourcc(&im4p, cc),
                    None => im4p.clone(),
                };
                (n.clone(), ticket::sha384(&delivered))
            })
            .collect();
        files.insert(path, (im4p, digests));
    }
    files
}

/// Write the IPSW to `out`.
pub fn make_ipsw(opts: &IpswOptions, out: &Path) -> Result<IpswSummary, IpswError> {
    let mpath = match &opts.manifest {
        Some(p) => p.clone(),
        None => find_manifest(&opts.board)?,
    };
    let mut manifest = Value::from_file(&mpath)
        .map_err(|source| IpswError::Manifest {
            path: mpath.clone(),
            source,
        })?
        .into_dictionary()
        .ok_or_else(|| IpswError::Malformed(mpath.clone(), "not a dictionary".into()))?;
    if identities(&manifest).next().is_none() {
        return Err(IpswError::Malformed(mpath, "no BuildIdentities".into()));
    }
    if opts.mac_identities {
        derive_mac_identities(&mut manifest);
    }
    let os_paths: BTreeSet<String> = identities(&manifest)
        .flat_map(components)
        .filter(|c| c.name == "OS")
        .map(|c| c.path)
        .collect();
    let files = component_files(&manifest, &os_paths);

    // Rewrite digests.
    let mut tickets = Vec::new();
    if let Some(Value::Array(ids)) = manifest.get_mut("BuildIdentities") {
        for id in ids.iter_mut().filter_map(Value::as_dictionary_mut) {
            let mut digests = Vec::new();
            let comps = components(id);
            if let Some(Value::Dictionary(m)) = id.get_mut("Manifest") {
                for c in &comps {
                    let Some((_, ds)) = files.get(&c.path) else {
                        continue;
                    };
                    let Some((_, d)) = ds.iter().find(|(n, _)| *n == c.name) else {
                        continue;
                    };
                    if let Some(Value::Dictionary(e)) = m.get_mut(&c.name) {
                        if e.contains_key("Digest") {
                            e.insert("Digest".into(), Value::Data(d.clone()));
                        }
                    }
                    let cc = rewrite_of(&c.name)
                        .unwrap_or_else(|| fourcc_for(&c.name, c.payload_type.as_deref()));
                    if !digests.iter().any(|(x, _)| *x == cc) {
                        digests.push((cc, d.clone()));
                    }
                }
            }
            tickets.push((global_ticket_path(id), id.clone(), digests));
        }
    }

    let file = std::fs::File::create(out)?;
    let mut zip = zip::ZipWriter::new(io::BufWriter::with_capacity(1 << 20, file));
    zip.force_zip64 = opts.force_zip64;
    let mut entries = BTreeMap::new();
    fn add<W: Write + io::Seek>(
        (zip, entries): (&mut zip::ZipWriter<W>, &mut BTreeMap<String, u64>),
        name: &str,
        data: &[u8],
    ) -> io::Result<()> {
        entries.insert(name.to_string(), data.len() as u64);
        zip.add_bytes(name, data)
    }
    add(
        (&mut zip, &mut entries),
        "BuildManifest.plist",
        &plist_bytes(&manifest),
    )?;
    add(
        (&mut zip, &mut entries),
        "Restore.plist",
        &plist_bytes(&restore_plist(&manifest, &os_paths)),
    )?;
    add(
        (&mut zip, &mut entries),
        "RestoreVersion.plist",
        &plist_bytes(&restore_version(&manifest)),
    )?;
    add(
        (&mut zip, &mut entries),
        "SystemVersion.plist",
        &plist_bytes(&system_version(&manifest)),
    )?;
    for p in &os_paths {
        zip.add_stream(p, opts.os_size, opts.deflate_os, |off, buf| {
            os_fill(off, buf, opts.sparse_os)
        })?;
        entries.insert(p.clone(), opts.os_size);
    }
    for (path, (im4p, _)) in &files {
        add((&mut zip, &mut entries), path, im4p)?;
    }
    for (path, id, digests) in tickets {
        let Some(path) = path else { continue };
        if digests.is_empty() || entries.contains_key(&path) {
            continue;
        }
        let spec = TicketSpec::simple(
            uint(id.get("ApChipID")).unwrap_or(0) as u32,
            uint(id.get("ApBoardID")).unwrap_or(0) as u32,
            0,
            uint(id.get("ApSecurityDomain")).unwrap_or(1) as u32,
            digests,
        );
        add((&mut zip, &mut entries), &path, &ticket::sign_im4m(&spec))?;
    }
    for (path, data) in &opts.extra_entries {
        add((&mut zip, &mut entries), path, data)?;
    }
    if opts.bootability_bundle {
        for (name, data) in BOOTABILITY_FILES {
            add((&mut zip, &mut entries), name, data)?;
        }
    }
    let mut w = zip.finish()?;
    w.flush()?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(IpswSummary {
        manifest,
        os_paths: os_paths.into_iter().collect(),
        entries,
    })
}

fn info_str<'a>(id: &'a Dictionary, key: &str) -> Option<&'a str> {
    id.get("Info")?.as_dictionary()?.get(key)?.as_string()
}

fn global_ticket_path(id: &Dictionary) -> Option<String> {
    let variant = info_str(id, "MacOSVariant").or_else(|| info_str(id, "Variant"))?;
    let class = info_str(id, "DeviceClass")?;
    Some(format!(
        "Firmware/Manifests/restore/{variant}/apticket.{class}.im4m"
    ))
}

fn top_str(m: &Dictionary, k: &str) -> Value {
    m.get(k).cloned().unwrap_or(Value::String(String::new()))
}

fn restore_plist(m: &Dictionary, os_paths: &BTreeSet<String>) -> Dictionary {
    let mut d = Dictionary::new();
    d.insert(
        "ProductBuildVersion".into(),
        top_str(m, "ProductBuildVersion"),
    );
    d.insert("ProductVersion".into(), top_str(m, "ProductVersion"));
    d.insert(
        "SupportedProductTypes".into(),
        m.get("SupportedProductTypes")
            .cloned()
            .unwrap_or(Value::Array(vec![])),
    );
    let mut map = Vec::new();
    let mut seen = BTreeSet::new();
    for id in identities(m) {
        let Some(class) = info_str(id, "DeviceClass") else {
            continue;
        };
        if !seen.insert(class.to_string()) {
            continue;
        }
        let mut e = Dictionary::new();
        e.insert("BoardConfig".into(), class.into());
        let cpid = uint(id.get("ApChipID")).unwrap_or(0);
        e.insert("BDID".into(), uint(id.get("ApBoardID")).unwrap_or(0).into());
        e.insert("CPID".into(), cpid.into());
        e.insert("Platform".into(), format!("t{cpid:x}").into());
        map.push(Value::Dictionary(e));
    }
    d.insert("DeviceMap".into(), Value::Array(map));
    let mut fs = Dictionary::new();
    for p in os_paths {
        fs.insert(p.clone(), "apfs".into());
    }
    d.insert(
        "SystemRestoreImageFileSystems".into(),
        Value::Dictionary(fs),
    );
    d
}

fn restore_version(m: &Dictionary) -> Dictionary {
    let mut d = Dictionary::new();
    d.insert(
        "ProductBuildVersion".into(),
        top_str(m, "ProductBuildVersion"),
    );
    d.insert("ProductVersion".into(), top_str(m, "ProductVersion"));
    let long = identities(m)
        .find_map(|id| id.get("Ap,OSLongVersion").cloned())
        .unwrap_or(Value::String(String::new()));
    d.insert("RestoreLongVersion".into(), long);
    d.insert("RestoreReleaseType".into(), "User".into());
    d
}

fn system_version(m: &Dictionary) -> Dictionary {
    let mut d = Dictionary::new();
    d.insert(
        "ProductBuildVersion".into(),
        top_str(m, "ProductBuildVersion"),
    );
    d.insert("ProductName".into(), "macOS".into());
    d.insert("ProductVersion".into(), top_str(m, "ProductVersion"));
    d.insert(
        "ProductCopyright".into(),
        "mac-sim synthetic IPSW (not Apple's)".into(),
    );
    d
}

/// A streaming ZIP writer (APPNOTE 6.3): stored and deflated entries, ZIP64 where needed.
pub mod zip {
    use std::io::{self, Seek, SeekFrom, Write};

    const LOCAL_SIG: u32 = 0x0403_4b50;
    const CENTRAL_SIG: u32 = 0x0201_4b50;
    const EOCD_SIG: u32 = 0x0605_4b50;
    const EOCD64_SIG: u32 = 0x0606_4b50;
    const LOCATOR_SIG: u32 = 0x0706_4b50;
    const ZIP64_EXTRA: u16 = 0x0001;
    const MAX32: u64 = 0xFFFF_FFFF;
    /// 1980-01-01 00:00 in DOS format.
    const DOS_DATE: u16 = (1 << 5) | 1;
    const DOS_TIME: u16 = 0;
    const STREAM_CHUNK: usize = 64 << 10;

    struct Central {
        name: String,
        method: u16,
        crc: u32,
        csize: u64,
        ulen: u64,
        offset: u64,
    }

    /// Writes entries one after the other, then the central directory.
    pub struct ZipWriter<W: Write + Seek> {
        w: W,
        pos: u64,
        entries: Vec<Central>,
        /// ZIP64 extra fields and end records even when no value needs them.
        pub force_zip64: bool,
    }

    fn le16(v: &mut Vec<u8>, x: u16) {
        v.extend_from_slice(&x.to_le_bytes());
    }
    fn le32(v: &mut Vec<u8>, x: u32) {
        v.extend_from_slice(&x.to_le_bytes());
    }
    fn le64(v: &mut Vec<u8>, x: u64) {
        v.extend_from_slice(&x.to_le_bytes());
    }

    /// CRC states of zero runs, by length: holes repeat the same few lengths, and combining a
    /// cached state is far cheaper than hashing gigabytes of zeros.
    #[derive(Default)]
    struct ZeroCrcs(Vec<(u64, crc32fast::Hasher)>);

    impl ZeroCrcs {
        fn of(&mut self, len: u64) -> &crc32fast::Hasher {
            let i = match self.0.iter().position(|(l, _)| *l == len) {
                Some(i) => i,
                None => {
                    let zeros = vec![0u8; STREAM_CHUNK];
                    let mut h = crc32fast::Hasher::new();
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(STREAM_CHUNK as u64) as usize;
                        h.update(&zeros[..n]);
                        left -= n as u64;
                    }
                    self.0.push((len, h));
                    self.0.len() - 1
                }
            };
            &self.0[i].1
        }
    }

    /// Counts what a deflater emits, for the compressed size.
    struct Counter<'a, W: Write> {
        w: &'a mut W,
        n: u64,
    }
    impl<W: Write> Write for Counter<'_, W> {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let n = self.w.write(b)?;
            self.n += n as u64;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.w.flush()
        }
    }

    impl<W: Write + Seek> ZipWriter<W> {
        pub fn new(mut w: W) -> ZipWriter<W> {
            let pos = w.stream_position().unwrap_or(0);
            ZipWriter {
                w,
                pos,
                entries: Vec::new(),
                force_zip64: false,
            }
        }

        /// Local header; returns the offset of its CRC field and of the ZIP64 sizes (if any).
        fn local_header(
            &mut self,
            name: &str,
            method: u16,
            crc: u32,
            csize: u64,
            ulen: u64,
            zip64: bool,
        ) -> io::Result<(u64, Option<u64>)> {
            let mut h = Vec::with_capacity(30 + name.len() + 20);
            le32(&mut h, LOCAL_SIG);
            le16(&mut h, if zip64 { 45 } else { 20 });
            le16(&mut h, 0);
            le16(&mut h, method);
            le16(&mut h, DOS_TIME);
            le16(&mut h, DOS_DATE);
            le32(&mut h, crc);
            if zip64 {
                le32(&mut h, MAX32 as u32);
                le32(&mut h, MAX32 as u32);
            } else {
                le32(&mut h, csize as u32);
                le32(&mut h, ulen as u32);
            }
            le16(&mut h, name.len() as u16);
            le16(&mut h, if zip64 { 20 } else { 0 });
            h.extend_from_slice(name.as_bytes());
            if zip64 {
                le16(&mut h, ZIP64_EXTRA);
                le16(&mut h, 16);
                le64(&mut h, ulen);
                le64(&mut h, csize);
            }
            let start = self.pos;
            self.w.write_all(&h)?;
            self.pos += h.len() as u64;
            let sizes64 = zip64.then_some(start + 30 + name.len() as u64 + 4);
            Ok((start + 14, sizes64))
        }

        /// A small entry held in memory, stored.
        pub fn add_bytes(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
            let crc = crc32fast::hash(data);
            let offset = self.pos;
            let len = data.len() as u64;
            let zip64 = self.force_zip64 || len >= MAX32;
            self.local_header(name, 0, crc, len, len, zip64)?;
            self.w.write_all(data)?;
            self.pos += len;
            self.entries.push(Central {
                name: name.to_string(),
                method: 0,
                crc,
                csize: len,
                ulen: len,
                offset,
            });
            Ok(())
        }

        /// A large entry of `size` bytes produced by `fill(offset, buf)` (which returns true for
        /// an all-zero chunk it did not write). Stored zero chunks become holes in the file.
        pub fn add_stream(
            &mut self,
            name: &str,
            size: u64,
            deflate: bool,
            mut fill: impl FnMut(u64, &mut [u8]) -> bool,
        ) -> io::Result<()> {
            let offset = self.pos;
            let method = if deflate { 8 } else { 0 };
            // Deflate may grow incompressible data slightly; leave room for that.
            let zip64 = self.force_zip64 || size.saturating_add(size / 100 + 4096) >= MAX32;
            let (crc_at, sizes_at) = self.local_header(name, method, 0, size, size, zip64)?;
            let mut hasher = crc32fast::Hasher::new();
            let mut buf = vec![0u8; STREAM_CHUNK];
            let mut done = 0u64;
            let csize;
            if deflate {
                let counter = Counter {
                    w: &mut self.w,
                    n: 0,
                };
                let mut enc =
                    flate2::write::DeflateEncoder::new(counter, flate2::Compression::fast());
                while done < size {
                    let n = (size - done).min(STREAM_CHUNK as u64) as usize;
                    if fill(done, &mut buf[..n]) {
                        buf[..n].fill(0);
                    }
                    hasher.update(&buf[..n]);
                    enc.write_all(&buf[..n])?;
                    done += n as u64;
                }
                let counter = enc.finish()?;
                csize = counter.n;
            } else {
                let mut zeros = ZeroCrcs::default();
                let mut hole = 0u64;
                while done < size {
                    let n = (size - done).min(STREAM_CHUNK as u64) as usize;
                    if fill(done, &mut buf[..n]) {
                        hole += n as u64;
                    } else {
                        if hole > 0 {
                            hasher.combine(zeros.of(hole));
                            self.w.seek(SeekFrom::Current(hole as i64))?;
                            hole = 0;
                        }
                        hasher.update(&buf[..n]);
                        self.w.write_all(&buf[..n])?;
                    }
                    done += n as u64;
                }
                if hole > 0 {
                    hasher.combine(zeros.of(hole));
                    // The file must reach the entry's end even if it ends in a hole: write its
                    // last byte (a zero) explicitly.
                    self.w.seek(SeekFrom::Current(hole as i64 - 1))?;
                    self.w.write_all(&[0])?;
                }
                csize = size;
            }
            let crc = hasher.finalize();
            self.pos += csize;
            // Patch CRC and sizes, then return to the end.
            self.w.seek(SeekFrom::Start(crc_at))?;
            let mut p = crc.to_le_bytes().to_vec();
            if !zip64 {
                p.extend_from_slice(&(csize as u32).to_le_bytes());
                p.extend_from_slice(&(size as u32).to_le_bytes());
            }
            self.w.write_all(&p)?;
            if let Some(at) = sizes_at {
                self.w.seek(SeekFrom::Start(at))?;
                let mut s = size.to_le_bytes().to_vec();
                s.extend_from_slice(&csize.to_le_bytes());
                self.w.write_all(&s)?;
            }
            self.w.seek(SeekFrom::Start(self.pos))?;
            self.entries.push(Central {
                name: name.to_string(),
                method,
                crc,
                csize,
                ulen: size,
                offset,
            });
            Ok(())
        }

        /// Central directory and end records; returns the inner writer.
        pub fn finish(mut self) -> io::Result<W> {
            let cd_start = self.pos;
            let mut cd = Vec::new();
            for e in &self.entries {
                let big_u = self.force_zip64 || e.ulen >= MAX32;
                let big_c = self.force_zip64 || e.csize >= MAX32;
                let big_o = self.force_zip64 || e.offset >= MAX32;
                let mut extra = Vec::new();
                if big_u || big_c || big_o {
                    let mut body = Vec::new();
                    if big_u {
                        le64(&mut body, e.ulen);
                    }
                    if big_c {
                        le64(&mut body, e.csize);
                    }
                    if big_o {
                        le64(&mut body, e.offset);
                    }
                    le16(&mut extra, ZIP64_EXTRA);
                    le16(&mut extra, body.len() as u16);
                    extra.extend(body);
                }
                let zip64 = !extra.is_empty();
                le32(&mut cd, CENTRAL_SIG);
                le16(&mut cd, if zip64 { 45 } else { 20 }); // made by (MS-DOS, spec 4.5/2.0)
                le16(&mut cd, if zip64 { 45 } else { 20 });
                le16(&mut cd, 0);
                le16(&mut cd, e.method);
                le16(&mut cd, DOS_TIME);
                le16(&mut cd, DOS_DATE);
                le32(&mut cd, e.crc);
                le32(&mut cd, if big_c { MAX32 as u32 } else { e.csize as u32 });
                le32(&mut cd, if big_u { MAX32 as u32 } else { e.ulen as u32 });
                le16(&mut cd, e.name.len() as u16);
                le16(&mut cd, extra.len() as u16);
                le16(&mut cd, 0); // comment
                le16(&mut cd, 0); // disk
                le16(&mut cd, 0); // internal attributes
                le32(&mut cd, 0); // external attributes
                le32(&mut cd, if big_o { MAX32 as u32 } else { e.offset as u32 });
                cd.extend_from_slice(e.name.as_bytes());
                cd.extend(extra);
            }
            self.w.write_all(&cd)?;
            let cd_size = cd.len() as u64;
            let count = self.entries.len() as u64;
            let mut tail = Vec::new();
            let need64 =
                self.force_zip64 || count >= 0xFFFF || cd_start >= MAX32 || cd_size >= MAX32;
            if need64 {
                let eocd64_at = cd_start + cd_size;
                le32(&mut tail, EOCD64_SIG);
                le64(&mut tail, 44);
                le16(&mut tail, 45);
                le16(&mut tail, 45);
                le32(&mut tail, 0);
                le32(&mut tail, 0);
                le64(&mut tail, count);
                le64(&mut tail, count);
                le64(&mut tail, cd_size);
                le64(&mut tail, cd_start);
                le32(&mut tail, LOCATOR_SIG);
                le32(&mut tail, 0);
                le64(&mut tail, eocd64_at);
                le32(&mut tail, 1);
            }
            le32(&mut tail, EOCD_SIG);
            le16(&mut tail, 0);
            le16(&mut tail, 0);
            let c16 = if need64 { 0xFFFF } else { count as u16 };
            le16(&mut tail, c16);
            le16(&mut tail, c16);
            le32(
                &mut tail,
                if need64 { MAX32 as u32 } else { cd_size as u32 },
            );
            le32(
                &mut tail,
                if need64 {
                    MAX32 as u32
                } else {
                    cd_start as u32
                },
            );
            le16(&mut tail, 0);
            self.w.write_all(&tail)?;
            self.pos += cd_size + tail.len() as u64;
            Ok(self.w)
        }
    }
}
