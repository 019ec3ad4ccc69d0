//! FTAB, the firmware table RTKit coprocessors (USB-C retimers, Rose) ship in: a 48-byte
//! header, one 16-byte record per entry, then the entries' bytes. The restore hands such a
//! coprocessor its `RTKitOS` table with the `rrko` entry of `RestoreRTKitOS` appended
//! (protocol.md §4.9), so we read one table and write another.
//!
//! Layout (integers little-endian; tags and the magic are 4CCs stored in reading order):
//!
//! | offset | field |
//! |---|---|
//! | 0x00 | u32 = 1 |
//! | 0x04 | u32 = 0xFFFFFFFF |
//! | 0x08..0x20 | zeros |
//! | 0x20 | table tag (e.g. `rkos`) |
//! | 0x24 | magic `ftab` |
//! | 0x28 | u32 entry count |
//! | 0x2C | u32 padding |
//! | 0x30 + 16·i | entry: tag, u32 offset, u32 size, u32 padding |

/// Size of the fixed header.
pub const HEADER_LEN: usize = 0x30;
/// Size of one entry record.
pub const ENTRY_LEN: usize = 16;
/// The magic at 0x24.
pub const MAGIC: [u8; 4] = *b"ftab";
/// Tables declaring more entries than this are not firmware tables (real ones have a handful).
const MAX_ENTRIES: u32 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FtabError {
    #[error("the firmware table is {0} bytes, shorter than its {HEADER_LEN}-byte header")]
    TooShort(usize),
    #[error("the file is not a firmware table (FTAB): magic {0:02x?} instead of \"ftab\"")]
    BadMagic([u8; 4]),
    #[error("the firmware table claims {0} entries; the file is damaged")]
    TooManyEntries(u32),
    #[error("firmware-table entry {index} ({tag}) lies outside the file (offset {offset}, {size} bytes, file {len} bytes); the file is damaged")]
    EntryOutOfBounds {
        index: usize,
        tag: String,
        offset: u32,
        size: u32,
        len: usize,
    },
    #[error("the firmware table would exceed 4 GiB")]
    TooLarge,
}

/// One entry: its tag and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FtabEntry {
    pub tag: [u8; 4],
    pub data: Vec<u8>,
}

/// A parsed (or to-be-written) firmware table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ftab {
    /// The table's tag at 0x20 (`rkos` for RTKit firmware).
    pub tag: [u8; 4],
    pub entries: Vec<FtabEntry>,
}

/// A tag as text for messages (`rkos`, or hex when not printable).
pub fn tag_text(tag: [u8; 4]) -> String {
    if tag.iter().all(|b| b.is_ascii_graphic()) {
        String::from_utf8_lossy(&tag).into_owned()
    } else {
        format!("0x{}", hex::encode(tag))
    }
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    // Callers only read inside bounds they checked against `data.len()`.
    let mut b = [0u8; 4];
    b.copy_from_slice(&data[at..at + 4]);
    u32::from_le_bytes(b)
}

fn tag_at(data: &[u8], at: usize) -> [u8; 4] {
    let mut b = [0u8; 4];
    b.copy_from_slice(&data[at..at + 4]);
    b
}

impl Ftab {
    /// Read a table. Never panics, whatever the bytes.
    pub fn parse(data: &[u8]) -> Result<Ftab, FtabError> {
        if data.len() < HEADER_LEN {
            return Err(FtabError::TooShort(data.len()));
        }
        let magic = tag_at(data, 0x24);
        if magic != MAGIC {
            return Err(FtabError::BadMagic(magic));
        }
        let count = u32_at(data, 0x28);
        let table_end = (count as usize)
            .checked_mul(ENTRY_LEN)
            .and_then(|n| n.checked_add(HEADER_LEN));
        if count > MAX_ENTRIES || !matches!(table_end, Some(end) if end <= data.len()) {
            return Err(FtabError::TooManyEntries(count));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for index in 0..count as usize {
            let at = HEADER_LEN + index * ENTRY_LEN;
            let tag = tag_at(data, at);
            let offset = u32_at(data, at + 4);
            let size = u32_at(data, at + 8);
            let end = (offset as usize).checked_add(size as usize);
            let Some(bytes) = end.and_then(|end| data.get(offset as usize..end)) else {
                return Err(FtabError::EntryOutOfBounds {
                    index,
                    tag: tag_text(tag),
                    offset,
                    size,
                    len: data.len(),
                });
            };
            entries.push(FtabEntry {
                tag,
                data: bytes.to_vec(),
            });
        }
        Ok(Ftab {
            tag: tag_at(data, 0x20),
            entries,
        })
    }

    /// The bytes of the entry tagged `tag` (the last one when a tag repeats, as the
    /// reference tools pick it).
    pub fn entry(&self, tag: [u8; 4]) -> Option<&[u8]> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.tag == tag)
            .map(|e| e.data.as_slice())
    }

    /// Append an entry at the end of the table.
    pub fn push(&mut self, tag: [u8; 4], data: Vec<u8>) {
        self.entries.push(FtabEntry { tag, data });
    }

    /// Write the table: header, records, then the entries' bytes in order, back to back.
    pub fn to_bytes(&self) -> Result<Vec<u8>, FtabError> {
        let count = u32::try_from(self.entries.len()).map_err(|_| FtabError::TooLarge)?;
        let mut offset = HEADER_LEN + self.entries.len() * ENTRY_LEN;
        let total = self
            .entries
            .iter()
            .try_fold(offset, |n, e| n.checked_add(e.data.len()))
            .filter(|&n| u32::try_from(n).is_ok())
            .ok_or(FtabError::TooLarge)?;
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&u32::MAX.to_le_bytes());
        out.extend_from_slice(&[0u8; 0x18]);
        out.extend_from_slice(&self.tag);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
        for e in &self.entries {
            // `total` fits in u32, so every offset and size below it does too.
            out.extend_from_slice(&e.tag);
            out.extend_from_slice(&(offset as u32).to_le_bytes());
            out.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
            out.extend_from_slice(&[0u8; 4]);
            offset += e.data.len();
        }
        for e in &self.entries {
            out.extend_from_slice(&e.data);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Ftab {
        Ftab {
            tag: *b"rkos",
            entries: vec![
                FtabEntry {
                    tag: *b"rkos",
                    data: b"kernel".to_vec(),
                },
                FtabEntry {
                    tag: *b"rrko",
                    data: b"restore".to_vec(),
                },
            ],
        }
    }

    #[test]
    fn writes_the_documented_layout() {
        let bytes = sample().to_bytes().unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(&[1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
        want.extend_from_slice(&[0; 0x18]);
        want.extend_from_slice(b"rkosftab");
        want.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(b"rkos");
        want.extend_from_slice(&[0x50, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(b"rrko");
        want.extend_from_slice(&[0x56, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(b"kernelrestore");
        assert_eq!(bytes, want);
        assert_eq!(Ftab::parse(&bytes).unwrap(), sample());
    }

    #[test]
    fn append_and_lookup() {
        let mut t = sample();
        assert_eq!(t.entry(*b"rrko"), Some(&b"restore"[..]));
        t.push(*b"rrko", b"newer".to_vec());
        assert_eq!(t.entry(*b"rrko"), Some(&b"newer"[..]));
        assert_eq!(t.entry(*b"none"), None);
        let back = Ftab::parse(&t.to_bytes().unwrap()).unwrap();
        assert_eq!(back.entries.len(), 3);
        assert_eq!(back.entries[2].data, b"newer");
    }

    #[test]
    fn damaged_tables_are_named() {
        let good = sample().to_bytes().unwrap();
        assert_eq!(Ftab::parse(&good[..10]), Err(FtabError::TooShort(10)));
        let mut bad = good.clone();
        bad[0x24..0x28].copy_from_slice(b"IM4P");
        assert!(matches!(Ftab::parse(&bad), Err(FtabError::BadMagic(m)) if &m == b"IM4P"));
        let mut many = good.clone();
        many[0x28..0x2C].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Ftab::parse(&many), Err(FtabError::TooManyEntries(u32::MAX)));
        let mut oob = good.clone();
        oob[0x34..0x38].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Ftab::parse(&oob),
            Err(FtabError::EntryOutOfBounds { index: 0, ref tag, .. }) if tag == "rkos"
        ));
        // Every truncation and every single-byte corruption is an error or a table, never a panic.
        for n in 0..good.len() {
            let _ = Ftab::parse(&good[..n]);
        }
        for i in 0..good.len() {
            let mut c = good.clone();
            c[i] ^= 0xA5;
            let _ = Ftab::parse(&c);
        }
    }
}
