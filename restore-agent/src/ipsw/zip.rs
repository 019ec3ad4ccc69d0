//! A random-access ZIP reader for IPSWs (protocol.md §9.5, §9.7).
//!
//! Built for a source that may be remote: opening costs one read of the tail (End of Central
//! Directory, ZIP64 locator), at most one read of the ZIP64 record, and one read of the central
//! directory. Entry data is then read in bounded chunks. Stored entries are random-access (ASR
//! seeks in the OS image); deflated ones stream through a decompressor with a CRC-32 check.
//!
//! The record parsers below are pure functions over byte slices; `ZipArchive` only schedules
//! reads. Every length and offset from the file is checked before use: a damaged or partial
//! IPSW yields an error, never a panic or an oversized allocation.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufReader, Read};

use thiserror::Error;

use super::random_access::RandomAccess;

const EOCD_SIGNATURE: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIGNATURE: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIGNATURE: u32 = 0x0606_4b50;
const CENTRAL_HEADER_SIGNATURE: u32 = 0x0201_4b50;
const LOCAL_HEADER_SIGNATURE: u32 = 0x0403_4b50;

const EOCD_LEN: usize = 22;
const ZIP64_LOCATOR_LEN: usize = 20;
const ZIP64_EOCD_LEN: usize = 56;
const CENTRAL_HEADER_LEN: usize = 46;
const LOCAL_HEADER_LEN: usize = 30;
const MAX_COMMENT_LEN: usize = u16::MAX as usize;
const ZIP64_EXTRA_ID: u16 = 0x0001;

/// An IPSW's central directory is well under a megabyte (a few thousand entries); anything
/// far larger is damage, and refusing it bounds the one allocation a header could inflate.
pub const MAX_CENTRAL_DIRECTORY_LEN: u64 = 64 << 20;

/// Size of each read while streaming entry data: large enough that a remote source makes few
/// requests, small enough to keep memory flat.
pub const READ_CHUNK: usize = 256 << 10;

/// How an entry's data is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Stored,
    Deflated,
    Other(u16),
}

impl Method {
    fn from_code(code: u16) -> Self {
        match code {
            0 => Self::Stored,
            8 => Self::Deflated,
            other => Self::Other(other),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stored => f.write_str("stored"),
            Self::Deflated => f.write_str("deflated"),
            Self::Other(code) => write!(f, "compression method {code}"),
        }
    }
}

/// One central-directory entry, with ZIP64 values already applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipEntry {
    pub name: String,
    pub method: Method,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub crc32: u32,
    /// Offset of the entry's local file header from the start of the archive.
    pub local_header_offset: u64,
    /// General-purpose flags (bit 0: encrypted, bit 3: data descriptor, bit 11: UTF-8 name).
    pub flags: u16,
}

impl ZipEntry {
    pub fn is_dir(&self) -> bool {
        self.name.ends_with('/')
    }

    pub fn is_encrypted(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// Errors of the ZIP layer; messages tell a technician what to do about the IPSW.
#[derive(Debug, Error)]
pub enum ZipError {
    #[error("cannot open the IPSW {path}: {source}; check the path given with --ipsw")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the IPSW failed: {0}")]
    Io(#[source] io::Error),
    #[error("the IPSW is truncated (download incomplete?): {0}; download it again")]
    Truncated(String),
    #[error(
        "the file is not a ZIP archive, so not an IPSW ({0}): check the path given with --ipsw"
    )]
    NotZip(String),
    #[error("the IPSW is damaged ({0}): download it again")]
    Corrupt(String),
    #[error("the IPSW is a split (multi-part) ZIP, which no Apple IPSW is: download it again")]
    MultiDisk,
    #[error("IPSW entry {name} uses {what}, which an Apple IPSW never does: download it again")]
    Unsupported { name: String, what: String },
    #[error("the IPSW has no {name}: it is not a complete macOS restore image; check the file or download it again")]
    NoSuchEntry { name: String },
    #[error("IPSW entry {name} is damaged (CRC-32 {actual:08x}, expected {expected:08x}): download the IPSW again")]
    CrcMismatch {
        name: String,
        expected: u32,
        actual: u32,
    },
    #[error("IPSW entry {name} is {size} bytes, more than the {limit} bytes allowed for it: the IPSW is not a usable restore image")]
    TooLarge { name: String, size: u64, limit: u64 },
    #[error("read of {len} bytes at offset {offset} is outside IPSW entry {name} ({size} bytes)")]
    OutOfRange {
        name: String,
        offset: u64,
        len: u64,
        size: u64,
    },
}

impl ZipError {
    /// Wraps the error for `io::Read`, from which [`ZipError::from_io`] recovers it.
    fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, self)
    }

    /// Recovers a `ZipError` carried through `io::Read`, or wraps a plain I/O error.
    pub fn from_io(err: io::Error) -> Self {
        if err.get_ref().is_some_and(|inner| inner.is::<ZipError>()) {
            // The check above proves the downcast succeeds.
            match err.into_inner().map(|inner| inner.downcast::<ZipError>()) {
                Some(Ok(zip)) => return *zip,
                _ => unreachable!("inner error was checked to be a ZipError"),
            }
        }
        if err.kind() == io::ErrorKind::UnexpectedEof {
            return ZipError::Truncated(format!("a read went past the end of the file ({err})"));
        }
        ZipError::Io(err)
    }
}

/// Little-endian field reader over a record; `None` when the record is too short.
struct Le<'a> {
    bytes: &'a [u8],
}

impl<'a> Le<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// The End of Central Directory record (ZIP64 values not yet applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eocd {
    /// Offset of the record within the searched tail.
    pub position: usize,
    pub disk: u16,
    pub central_directory_disk: u16,
    pub entries: u16,
    pub central_directory_len: u32,
    pub central_directory_offset: u32,
}

impl Eocd {
    fn needs_zip64(&self) -> bool {
        self.entries == u16::MAX
            || self.central_directory_len == u32::MAX
            || self.central_directory_offset == u32::MAX
    }
}

/// Finds the EOCD in the last bytes of an archive. Prefers a record whose comment runs exactly
/// to the end (a signature inside a comment cannot pass that), else the last plausible one.
pub fn find_eocd(tail: &[u8]) -> Option<Eocd> {
    let last = tail.len().checked_sub(EOCD_LEN)?;
    let first = last.saturating_sub(MAX_COMMENT_LEN);
    let signature = EOCD_SIGNATURE.to_le_bytes();
    let candidates = || {
        (first..=last)
            .rev()
            .filter(move |&p| tail.get(p..p + 4) == Some(&signature[..]))
    };
    let comment_len = |p: usize| -> Option<usize> {
        let mut le = Le::new(tail.get(p + 20..)?);
        Some(usize::from(le.u16()?))
    };
    let exact = candidates().find(|&p| comment_len(p) == Some(tail.len() - p - EOCD_LEN));
    let position = exact.or_else(|| {
        candidates().find(|&p| comment_len(p).is_some_and(|c| c <= tail.len() - p - EOCD_LEN))
    })?;
    let mut le = Le::new(tail.get(position + 4..)?);
    Some(Eocd {
        position,
        disk: le.u16()?,
        central_directory_disk: le.u16()?,
        entries: {
            let _entries_on_disk = le.u16()?;
            le.u16()?
        },
        central_directory_len: le.u32()?,
        central_directory_offset: le.u32()?,
    })
}

/// The ZIP64 locator that sits right before the EOCD: where the ZIP64 record is, and the
/// disk count.
pub fn parse_zip64_locator(bytes: &[u8]) -> Option<(u64, u32)> {
    let mut le = Le::new(bytes);
    if le.u32()? != ZIP64_LOCATOR_SIGNATURE {
        return None;
    }
    let _record_disk = le.u32()?;
    let record_offset = le.u64()?;
    let disks = le.u32()?;
    Some((record_offset, disks))
}

/// The ZIP64 End of Central Directory record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Zip64Eocd {
    pub disk: u32,
    pub central_directory_disk: u32,
    pub entries: u64,
    pub central_directory_len: u64,
    pub central_directory_offset: u64,
}

pub fn parse_zip64_eocd(bytes: &[u8]) -> Result<Zip64Eocd, ZipError> {
    let short = || ZipError::Corrupt("the ZIP64 end record is cut short".into());
    let mut le = Le::new(bytes);
    if le.u32().ok_or_else(short)? != ZIP64_EOCD_SIGNATURE {
        return Err(ZipError::Corrupt(
            "the ZIP64 locator points at no ZIP64 end record".into(),
        ));
    }
    let _record_len = le.u64().ok_or_else(short)?;
    let _versions = le.u32().ok_or_else(short)?;
    let disk = le.u32().ok_or_else(short)?;
    let central_directory_disk = le.u32().ok_or_else(short)?;
    let _entries_on_disk = le.u64().ok_or_else(short)?;
    Ok(Zip64Eocd {
        disk,
        central_directory_disk,
        entries: le.u64().ok_or_else(short)?,
        central_directory_len: le.u64().ok_or_else(short)?,
        central_directory_offset: le.u64().ok_or_else(short)?,
    })
}

/// Parses a whole central directory. Offsets are checked later, against the archive.
pub fn parse_central_directory(bytes: &[u8]) -> Result<Vec<ZipEntry>, ZipError> {
    let mut entries = Vec::with_capacity(bytes.len() / CENTRAL_HEADER_LEN);
    let mut rest = bytes;
    while !rest.is_empty() {
        let (entry, used) = parse_central_header(rest, entries.len())?;
        entries.push(entry);
        rest = &rest[used..];
    }
    Ok(entries)
}

fn parse_central_header(bytes: &[u8], index: usize) -> Result<(ZipEntry, usize), ZipError> {
    let short = || ZipError::Corrupt(format!("central directory entry #{index} is cut short"));
    let mut le = Le::new(bytes);
    if le.u32().ok_or_else(short)? != CENTRAL_HEADER_SIGNATURE {
        return Err(ZipError::Corrupt(format!(
            "central directory entry #{index} has no header signature"
        )));
    }
    let mut fixed = Le::new(le.take(CENTRAL_HEADER_LEN - 4).ok_or_else(short)?);
    // Fixed part is present, so these reads cannot fail; `short` keeps it panic-free anyway.
    let _made_by = fixed.u16().ok_or_else(short)?;
    let _needed = fixed.u16().ok_or_else(short)?;
    let flags = fixed.u16().ok_or_else(short)?;
    let method = fixed.u16().ok_or_else(short)?;
    let _time_date = fixed.u32().ok_or_else(short)?;
    let crc32 = fixed.u32().ok_or_else(short)?;
    let compressed32 = fixed.u32().ok_or_else(short)?;
    let uncompressed32 = fixed.u32().ok_or_else(short)?;
    let name_len = usize::from(fixed.u16().ok_or_else(short)?);
    let extra_len = usize::from(fixed.u16().ok_or_else(short)?);
    let comment_len = usize::from(fixed.u16().ok_or_else(short)?);
    let disk16 = fixed.u16().ok_or_else(short)?;
    let _internal = fixed.u16().ok_or_else(short)?;
    let _external = fixed.u32().ok_or_else(short)?;
    let offset32 = fixed.u32().ok_or_else(short)?;

    let name_bytes = le.take(name_len).ok_or_else(short)?;
    let extra = le.take(extra_len).ok_or_else(short)?;
    le.take(comment_len).ok_or_else(short)?;
    let used = CENTRAL_HEADER_LEN + name_len + extra_len + comment_len;

    // Apple's names are ASCII; anything else is shown, not interpreted.
    let name = String::from_utf8_lossy(name_bytes).into_owned();

    let mut zip64 = Zip64Fields {
        uncompressed: (uncompressed32 == u32::MAX).then_some(0),
        compressed: (compressed32 == u32::MAX).then_some(0),
        offset: (offset32 == u32::MAX).then_some(0),
        disk: (disk16 == u16::MAX).then_some(0),
    };
    if zip64.any_needed() {
        apply_zip64_extra(extra, &mut zip64)
            .map_err(|what| ZipError::Corrupt(format!("entry {name}: {what}")))?;
    }
    if zip64.disk.unwrap_or(u32::from(disk16)) != 0 {
        return Err(ZipError::MultiDisk);
    }

    let entry = ZipEntry {
        method: Method::from_code(method),
        compressed_size: zip64.compressed.unwrap_or(u64::from(compressed32)),
        uncompressed_size: zip64.uncompressed.unwrap_or(u64::from(uncompressed32)),
        crc32,
        local_header_offset: zip64.offset.unwrap_or(u64::from(offset32)),
        flags,
        name,
    };
    Ok((entry, used))
}

/// ZIP64 values, `Some` for each 32-bit field that was saturated and so must be replaced.
struct Zip64Fields {
    uncompressed: Option<u64>,
    compressed: Option<u64>,
    offset: Option<u64>,
    disk: Option<u32>,
}

impl Zip64Fields {
    fn any_needed(&self) -> bool {
        self.uncompressed.is_some()
            || self.compressed.is_some()
            || self.offset.is_some()
            || self.disk.is_some()
    }
}

/// The ZIP64 extra field holds, in this fixed order, only the values whose 32-bit slots are
/// saturated (APPNOTE 4.5.3).
fn apply_zip64_extra(mut extra: &[u8], fields: &mut Zip64Fields) -> Result<(), &'static str> {
    while extra.len() >= 4 {
        let mut le = Le::new(extra);
        let (Some(id), Some(len)) = (le.u16(), le.u16()) else {
            break;
        };
        let Some(data) = le.take(usize::from(len)) else {
            return Err("an extra field runs past its header");
        };
        extra = le.bytes;
        if id != ZIP64_EXTRA_ID {
            continue;
        }
        let mut values = Le::new(data);
        let missing = "its ZIP64 extra field lacks a size or offset";
        for slot in [
            &mut fields.uncompressed,
            &mut fields.compressed,
            &mut fields.offset,
        ] {
            if slot.is_some() {
                *slot = Some(values.u64().ok_or(missing)?);
            }
        }
        if fields.disk.is_some() {
            fields.disk = Some(values.u32().ok_or(missing)?);
        }
        return Ok(());
    }
    Err("its sizes need a ZIP64 extra field, which is missing")
}

/// Returns the length of name + extra field from a local file header, which locates the
/// entry's data (the central directory's copies may differ from the local ones).
pub fn parse_local_header(bytes: &[u8]) -> Option<u64> {
    let mut le = Le::new(bytes);
    if le.u32()? != LOCAL_HEADER_SIGNATURE {
        return None;
    }
    le.take(22)?;
    let name_len = le.u16()?;
    let extra_len = le.u16()?;
    Some(u64::from(name_len) + u64::from(extra_len))
}

/// A ZIP archive opened over a [`RandomAccess`] source, with its central directory in memory.
#[derive(Debug)]
pub struct ZipArchive<R> {
    source: R,
    entries: Vec<ZipEntry>,
    by_name: HashMap<String, usize>,
    /// Entry data must end before the central directory starts.
    data_limit: u64,
}

impl<R: RandomAccess> ZipArchive<R> {
    /// Reads the archive's structure: tail, optional ZIP64 record, central directory.
    pub fn open(source: R) -> Result<Self, ZipError> {
        let file_len = source.len();
        let tail_len = file_len.min((EOCD_LEN + MAX_COMMENT_LEN + ZIP64_LOCATOR_LEN) as u64);
        let tail_start = file_len - tail_len;
        // tail_len is at most ~64 KiB, so it fits in usize.
        let mut tail = vec![0u8; tail_len as usize];
        read(&source, tail_start, &mut tail)?;

        let Some(eocd) = find_eocd(&tail) else {
            return Err(missing_eocd(&source, &tail, tail_start));
        };
        if eocd.disk != 0 || eocd.central_directory_disk != 0 {
            return Err(ZipError::MultiDisk);
        }
        let directory = locate_directory(&source, &tail, tail_start, &eocd)?;
        let (cd_offset, cd_len) = (directory.offset, directory.len);
        if cd_len > MAX_CENTRAL_DIRECTORY_LEN {
            return Err(ZipError::Corrupt(format!(
                "a {cd_len}-byte central directory is far larger than any IPSW's"
            )));
        }
        // Bounded by MAX_CENTRAL_DIRECTORY_LEN just above.
        let mut cd = vec![0u8; cd_len as usize];
        // Small archives have their directory inside the tail already read.
        match slice_of(&tail, tail_start, cd_offset, cd.len()) {
            Some(bytes) => cd.copy_from_slice(bytes),
            None => read(&source, cd_offset, &mut cd)?,
        }

        let entries = parse_central_directory(&cd)?;
        let parsed = entries.len() as u64;
        // Without ZIP64 the 16-bit count wraps for >65535 entries; the directory itself is
        // the authority then.
        let count_matches = if directory.zip64 {
            parsed == directory.entries
        } else {
            parsed % 0x1_0000 == directory.entries
        };
        if !count_matches {
            return Err(ZipError::Corrupt(format!(
                "the central directory holds {parsed} entries but the end record says {}",
                directory.entries
            )));
        }

        let mut by_name = HashMap::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            // First entry wins, as in `unzip`.
            by_name.entry(entry.name.clone()).or_insert(index);
        }
        tracing::debug!(entries = entries.len(), cd_offset, cd_len, "opened ZIP");
        Ok(Self {
            source,
            entries,
            by_name,
            data_limit: cd_offset,
        })
    }

    pub fn source(&self) -> &R {
        &self.source
    }

    pub fn entries(&self) -> &[ZipEntry] {
        &self.entries
    }

    /// Looks an entry up by its exact path (a leading `/` or `./` is ignored).
    pub fn entry(&self, name: &str) -> Option<&ZipEntry> {
        let name = name.trim_start_matches("./").trim_start_matches('/');
        self.by_name.get(name).map(|&index| &self.entries[index])
    }

    /// Like [`Self::entry`], with an error naming what is missing.
    pub fn require(&self, name: &str) -> Result<&ZipEntry, ZipError> {
        self.entry(name).ok_or_else(|| ZipError::NoSuchEntry {
            name: name.to_owned(),
        })
    }

    /// Where the entry's (compressed) data starts: one read of its local header.
    pub fn data_offset(&self, entry: &ZipEntry) -> Result<u64, ZipError> {
        let header_end = entry
            .local_header_offset
            .checked_add(LOCAL_HEADER_LEN as u64)
            .filter(|&end| end <= self.data_limit)
            .ok_or_else(|| {
                ZipError::Corrupt(format!(
                    "entry {}'s header offset {} lies past the data",
                    entry.name, entry.local_header_offset
                ))
            })?;
        let mut header = [0u8; LOCAL_HEADER_LEN];
        read(&self.source, entry.local_header_offset, &mut header)?;
        let variable = parse_local_header(&header).ok_or_else(|| {
            ZipError::Corrupt(format!(
                "no local header for {} at offset {}",
                entry.name, entry.local_header_offset
            ))
        })?;
        let start = header_end.saturating_add(variable);
        start
            .checked_add(entry.compressed_size)
            .filter(|&end| end <= self.data_limit)
            .ok_or_else(|| {
                ZipError::Corrupt(format!(
                    "entry {} ({} bytes at {start}) overlaps the central directory",
                    entry.name, entry.compressed_size
                ))
            })?;
        Ok(start)
    }

    /// Random access to a stored (uncompressed) entry, e.g. the OS image for ASR.
    pub fn stored(&self, entry: &ZipEntry) -> Result<StoredEntry<&R>, ZipError> {
        self.stored_with(entry, &self.source)
    }

    /// Like [`ZipArchive::stored`], but the entry owns a clone of the source (an `Arc`), so it
    /// can outlive the archive and move to ASR's reader thread.
    pub fn stored_owned(&self, entry: &ZipEntry) -> Result<StoredEntry<R>, ZipError>
    where
        R: Clone,
    {
        self.stored_with(entry, self.source.clone())
    }

    fn stored_with<S>(&self, entry: &ZipEntry, source: S) -> Result<StoredEntry<S>, ZipError> {
        check_readable(entry)?;
        if entry.method != Method::Stored {
            return Err(ZipError::Unsupported {
                name: entry.name.clone(),
                what: format!("{} where random access needs stored", entry.method),
            });
        }
        if entry.compressed_size != entry.uncompressed_size {
            return Err(ZipError::Corrupt(format!(
                "stored entry {} has different compressed and uncompressed sizes",
                entry.name
            )));
        }
        Ok(StoredEntry {
            source,
            name: entry.name.clone(),
            start: self.data_offset(entry)?,
            len: entry.uncompressed_size,
        })
    }

    /// Streams an entry's uncompressed bytes. The CRC-32 and size are checked as the last byte
    /// is delivered; errors surface as `io::Error`s that [`ZipError::from_io`] turns back.
    pub fn reader(&self, entry: &ZipEntry) -> Result<EntryReader<'_, R>, ZipError> {
        check_readable(entry)?;
        let start = self.data_offset(entry)?;
        let range = RangeReader {
            source: &self.source,
            position: start,
            end: start + entry.compressed_size,
        };
        let inner = match entry.method {
            Method::Stored => {
                if entry.compressed_size != entry.uncompressed_size {
                    return Err(ZipError::Corrupt(format!(
                        "stored entry {} has different compressed and uncompressed sizes",
                        entry.name
                    )));
                }
                // Buffered so that small caller reads still become chunk-sized source reads.
                Inner::Stored(BufReader::with_capacity(READ_CHUNK, range))
            }
            Method::Deflated => Inner::Deflated(Box::new(flate2::bufread::DeflateDecoder::new(
                BufReader::with_capacity(READ_CHUNK, range),
            ))),
            Method::Other(_) => unreachable!("check_readable refuses other methods"),
        };
        Ok(EntryReader {
            name: entry.name.clone(),
            inner,
            hasher: crc32fast::Hasher::new(),
            produced: 0,
            expected_len: entry.uncompressed_size,
            expected_crc: entry.crc32,
            verified: false,
        })
    }

    /// Reads a whole entry into memory, refusing entries larger than `limit` bytes.
    pub fn read_to_vec(&self, entry: &ZipEntry, limit: u64) -> Result<Vec<u8>, ZipError> {
        if entry.uncompressed_size > limit {
            return Err(ZipError::TooLarge {
                name: entry.name.clone(),
                size: entry.uncompressed_size,
                limit,
            });
        }
        let mut reader = self.reader(entry)?;
        // Bounded by `limit` above; the reader refuses to produce more than declared.
        let mut out = Vec::with_capacity(entry.uncompressed_size as usize);
        reader.read_to_end(&mut out).map_err(ZipError::from_io)?;
        Ok(out)
    }
}

/// Where the central directory is, from the end record and, when present, the ZIP64 record.
struct DirectoryLocation {
    entries: u64,
    offset: u64,
    len: u64,
    zip64: bool,
}

fn locate_directory<R: RandomAccess>(
    source: &R,
    tail: &[u8],
    tail_start: u64,
    eocd: &Eocd,
) -> Result<DirectoryLocation, ZipError> {
    let eocd_offset = tail_start + eocd.position as u64;
    let locator = eocd
        .position
        .checked_sub(ZIP64_LOCATOR_LEN)
        .and_then(|at| parse_zip64_locator(tail.get(at..eocd.position)?));
    // The directory must end before the first end record that follows it.
    let (location, records_start) = match locator {
        Some((record_offset, disks)) => {
            if disks > 1 {
                return Err(ZipError::MultiDisk);
            }
            let locator_offset = eocd_offset - ZIP64_LOCATOR_LEN as u64;
            record_offset
                .checked_add(ZIP64_EOCD_LEN as u64)
                .filter(|&end| end <= locator_offset)
                .ok_or_else(|| {
                    ZipError::Corrupt("the ZIP64 locator points outside the file".into())
                })?;
            let mut record = [0u8; ZIP64_EOCD_LEN];
            // Usually the record sits right before the locator, inside the tail.
            match slice_of(tail, tail_start, record_offset, ZIP64_EOCD_LEN) {
                Some(bytes) => record.copy_from_slice(bytes),
                None => read(source, record_offset, &mut record)?,
            }
            let z = parse_zip64_eocd(&record)?;
            if z.disk != 0 || z.central_directory_disk != 0 {
                return Err(ZipError::MultiDisk);
            }
            let location = DirectoryLocation {
                entries: z.entries,
                offset: z.central_directory_offset,
                len: z.central_directory_len,
                zip64: true,
            };
            (location, record_offset)
        }
        None if eocd.needs_zip64() => {
            return Err(ZipError::Corrupt(
                "the end record needs a ZIP64 record, which is missing".into(),
            ))
        }
        None => {
            let location = DirectoryLocation {
                entries: u64::from(eocd.entries),
                offset: u64::from(eocd.central_directory_offset),
                len: u64::from(eocd.central_directory_len),
                zip64: false,
            };
            (location, eocd_offset)
        }
    };
    let (offset, len) = (location.offset, location.len);
    offset
        .checked_add(len)
        .filter(|&end| end <= records_start)
        .ok_or_else(|| {
            ZipError::Corrupt(format!(
                "the central directory ({len} bytes at {offset}) runs past its end records \
                 at {records_start}"
            ))
        })?;
    Ok(location)
}

fn check_readable(entry: &ZipEntry) -> Result<(), ZipError> {
    if entry.is_encrypted() {
        return Err(ZipError::Unsupported {
            name: entry.name.clone(),
            what: "encryption".into(),
        });
    }
    if let Method::Other(code) = entry.method {
        return Err(ZipError::Unsupported {
            name: entry.name.clone(),
            what: format!("compression method {code}"),
        });
    }
    Ok(())
}

/// `len` bytes at absolute `offset`, if they lie inside `window` (which starts at `start`).
fn slice_of(window: &[u8], start: u64, offset: u64, len: usize) -> Option<&[u8]> {
    let at = usize::try_from(offset.checked_sub(start)?).ok()?;
    window.get(at..at.checked_add(len)?)
}

fn read<R: RandomAccess + ?Sized>(source: &R, offset: u64, buf: &mut [u8]) -> Result<(), ZipError> {
    let end = offset.checked_add(buf.len() as u64);
    if !matches!(end, Some(end) if end <= source.len()) {
        return Err(ZipError::Truncated(format!(
            "{} bytes at offset {offset} are past the end of the {}-byte file",
            buf.len(),
            source.len()
        )));
    }
    source.read_at(offset, buf).map_err(ZipError::from_io)
}

/// Without an end record, a file that starts like a ZIP was cut short; anything else is not
/// a ZIP at all.
fn missing_eocd<R: RandomAccess>(source: &R, tail: &[u8], tail_start: u64) -> ZipError {
    let mut magic = [0u8; 4];
    let available = source.len().min(4) as usize;
    let head = if tail_start == 0 {
        tail.get(..available).map(<[u8]>::to_vec)
    } else {
        read(source, 0, &mut magic[..available])
            .ok()
            .map(|()| magic[..available].to_vec())
    };
    let local = LOCAL_HEADER_SIGNATURE.to_le_bytes();
    match head {
        Some(head) if head.is_empty() => ZipError::Truncated("the file is empty".into()),
        Some(head) if local.starts_with(&head) => ZipError::Truncated(format!(
            "it has no end record ({} bytes present)",
            source.len()
        )),
        _ => ZipError::NotZip("no ZIP signature at its start or end".into()),
    }
}

/// Random access into a stored entry: offsets are relative to the entry's first byte. `S` is
/// the archive's source, borrowed ([`ZipArchive::stored`]) or owned
/// ([`ZipArchive::stored_owned`]).
#[derive(Debug)]
pub struct StoredEntry<S> {
    source: S,
    name: String,
    start: u64,
    len: u64,
}

impl<S: RandomAccess> StoredEntry<S> {
    /// Offset of the entry's first byte in the archive.
    pub fn data_offset(&self) -> u64 {
        self.start
    }

    /// Reads exactly `buf.len()` bytes at `offset` within the entry.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ZipError> {
        let len = buf.len() as u64;
        if !matches!(offset.checked_add(len), Some(end) if end <= self.len) {
            return Err(ZipError::OutOfRange {
                name: self.name.clone(),
                offset,
                len,
                size: self.len,
            });
        }
        read(&self.source, self.start + offset, buf)
    }
}

/// A stored entry is itself a random-access source (ASR reads the OS image this way).
impl<S: RandomAccess> RandomAccess for StoredEntry<S> {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_exact_at(offset, buf).map_err(|e| match e {
            ZipError::Io(io) => io,
            other => other.into_io(),
        })
    }
}

/// Sequential `Read` over a byte range of the source, in bounded reads.
struct RangeReader<'a, R> {
    source: &'a R,
    position: u64,
    end: u64,
}

impl<R: RandomAccess> Read for RangeReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let remaining = self.end - self.position;
        let n = (buf.len() as u64).min(remaining).min(READ_CHUNK as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        read(self.source, self.position, &mut buf[..n]).map_err(ZipError::into_io)?;
        self.position += n as u64;
        Ok(n)
    }
}

enum Inner<'a, R> {
    Stored(BufReader<RangeReader<'a, R>>),
    Deflated(Box<flate2::bufread::DeflateDecoder<BufReader<RangeReader<'a, R>>>>),
}

/// Streams one entry's uncompressed bytes, checking size and CRC-32.
pub struct EntryReader<'a, R> {
    name: String,
    inner: Inner<'a, R>,
    hasher: crc32fast::Hasher,
    produced: u64,
    expected_len: u64,
    expected_crc: u32,
    verified: bool,
}

impl<R> fmt::Debug for EntryReader<'_, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntryReader")
            .field("name", &self.name)
            .field("produced", &self.produced)
            .field("expected_len", &self.expected_len)
            .finish_non_exhaustive()
    }
}

impl<R: RandomAccess> EntryReader<'_, R> {
    /// Bytes delivered so far.
    pub fn position(&self) -> u64 {
        self.produced
    }

    fn verify(&mut self) -> io::Result<()> {
        self.verified = true;
        let actual = self.hasher.clone().finalize();
        if actual != self.expected_crc {
            return Err(ZipError::CrcMismatch {
                name: self.name.clone(),
                expected: self.expected_crc,
                actual,
            }
            .into_io());
        }
        Ok(())
    }
}

impl<R: RandomAccess> Read for EntryReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = match &mut self.inner {
            Inner::Stored(range) => range.read(buf)?,
            Inner::Deflated(decoder) => decoder.read(buf).map_err(|e| {
                // flate2 reports bad streams as InvalidInput; ours pass through unchanged.
                if e.get_ref().is_some_and(|inner| inner.is::<ZipError>()) {
                    e
                } else {
                    ZipError::Corrupt(format!("entry {} does not decompress: {e}", self.name))
                        .into_io()
                }
            })?,
        };
        let produced = self.produced + n as u64;
        if produced > self.expected_len {
            return Err(ZipError::Corrupt(format!(
                "entry {} decompresses to more than its declared {} bytes",
                self.name, self.expected_len
            ))
            .into_io());
        }
        if n == 0 {
            if self.produced < self.expected_len {
                return Err(ZipError::Corrupt(format!(
                    "entry {} ends after {} of its {} bytes",
                    self.name, self.produced, self.expected_len
                ))
                .into_io());
            }
            if !self.verified {
                self.verify()?;
            }
            return Ok(0);
        }
        self.hasher.update(&buf[..n]);
        self.produced = produced;
        // Check as soon as the last byte arrives, so callers that stop at the declared size
        // still get a verified entry.
        if self.produced == self.expected_len {
            self.verify()?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eocd(comment: &[u8]) -> Vec<u8> {
        let mut r = EOCD_SIGNATURE.to_le_bytes().to_vec();
        r.extend_from_slice(&[0, 0, 0, 0, 2, 0, 2, 0]);
        r.extend_from_slice(&100u32.to_le_bytes());
        r.extend_from_slice(&7u32.to_le_bytes());
        r.extend_from_slice(&(comment.len() as u16).to_le_bytes());
        r.extend_from_slice(comment);
        r
    }

    #[test]
    fn end_record_found_with_and_without_comment() {
        let mut tail = vec![0xee; 50];
        tail.extend(eocd(b""));
        let found = find_eocd(&tail).unwrap();
        assert_eq!(found.position, 50);
        assert_eq!(found.entries, 2);
        assert_eq!(found.central_directory_len, 100);
        assert_eq!(found.central_directory_offset, 7);

        // A fake record inside the comment whose length does not reach the end is ignored.
        let fake = eocd(b"");
        let mut comment = fake.clone();
        comment.extend_from_slice(b"trailing");
        let mut tail = vec![0xee; 10];
        tail.extend(eocd(&comment));
        assert_eq!(find_eocd(&tail).unwrap().position, 10);

        assert_eq!(find_eocd(&[]), None);
        assert_eq!(find_eocd(&EOCD_SIGNATURE.to_le_bytes()), None);
    }

    #[test]
    fn zip64_extra_supplies_only_saturated_fields() {
        let mut extra = Vec::new();
        extra.extend_from_slice(&0x000au16.to_le_bytes());
        extra.extend_from_slice(&2u16.to_le_bytes());
        extra.extend_from_slice(&[9, 9]);
        extra.extend_from_slice(&ZIP64_EXTRA_ID.to_le_bytes());
        extra.extend_from_slice(&16u16.to_le_bytes());
        extra.extend_from_slice(&(5u64 << 32).to_le_bytes());
        extra.extend_from_slice(&(6u64 << 32).to_le_bytes());
        let mut fields = Zip64Fields {
            uncompressed: None,
            compressed: Some(0),
            offset: Some(0),
            disk: None,
        };
        apply_zip64_extra(&extra, &mut fields).unwrap();
        assert_eq!(fields.uncompressed, None);
        assert_eq!(fields.compressed, Some(5 << 32));
        assert_eq!(fields.offset, Some(6 << 32));

        let mut fields = Zip64Fields {
            uncompressed: Some(0),
            compressed: Some(0),
            offset: Some(0),
            disk: None,
        };
        assert!(apply_zip64_extra(&extra, &mut fields).is_err());
        assert!(apply_zip64_extra(&extra[..10], &mut fields).is_err());
        assert!(apply_zip64_extra(&[], &mut fields).is_err());
    }

    #[test]
    fn parsers_survive_arbitrary_bytes() {
        let mut state = 0x1234_5678u32;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|i| {
                    state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    // Seed signatures now and then so the parsers get past their first check.
                    match (i, state % 4) {
                        (0, 0) => 0x50,
                        (1, 0) => 0x4b,
                        (2, 0) => 0x01,
                        (3, 0) => 0x02,
                        _ => (state >> 16) as u8,
                    }
                })
                .collect();
            let _ = find_eocd(&bytes);
            let _ = parse_zip64_locator(&bytes);
            let _ = parse_zip64_eocd(&bytes);
            let _ = parse_central_directory(&bytes);
            let _ = parse_local_header(&bytes);
        }
    }

    #[test]
    fn io_errors_round_trip() {
        let err = ZipError::from_io(ZipError::MultiDisk.into_io());
        assert!(matches!(err, ZipError::MultiDisk));
        let err = ZipError::from_io(io::ErrorKind::UnexpectedEof.into());
        assert!(matches!(err, ZipError::Truncated(_)));
        let err = ZipError::from_io(io::ErrorKind::PermissionDenied.into());
        assert!(matches!(err, ZipError::Io(_)));
    }
}
