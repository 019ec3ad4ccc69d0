//! FTAB firmware tables (the container of RTKit coprocessor firmware such as the USB-C
//! retimers', protocol.md §4.9): `make-ipsw` writes them for components the manifest marks
//! `IsFTAB`, and the simulated restored checks the table the host returns for a retimer.
//!
//! Header (0x30 bytes): u32 LE 1, u32 LE 0xFFFFFFFF, 24 zero bytes, the table tag (4CC, e.g.
//! `rkos`), the magic `ftab`, u32 LE entry count, 4 bytes padding; then per entry the 4CC tag,
//! u32 LE offset, u32 LE size, 4 bytes padding; then the entries' bytes.

const HEADER: usize = 0x30;
const RECORD: usize = 16;

/// A table: its tag and `(tag, bytes)` entries in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub tag: [u8; 4],
    pub entries: Vec<([u8; 4], Vec<u8>)>,
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn four(b: &[u8], at: usize) -> Option<[u8; 4]> {
    b.get(at..at + 4)?.try_into().ok()
}

impl Table {
    /// Serialize; entries follow the records back to back.
    pub fn write(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&0xFFFF_FFFFu32.to_le_bytes());
        out.extend_from_slice(&[0; 24]);
        out.extend_from_slice(&self.tag);
        out.extend_from_slice(b"ftab");
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let mut at = HEADER + RECORD * self.entries.len();
        for (tag, data) in &self.entries {
            out.extend_from_slice(tag);
            out.extend_from_slice(&(at as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&[0; 4]);
            at += data.len();
        }
        for (_, data) in &self.entries {
            out.extend_from_slice(data);
        }
        out
    }

    /// Parse, or say what is wrong. Never panics.
    pub fn parse(b: &[u8]) -> Result<Table, String> {
        if b.len() < HEADER {
            return Err(format!("{} bytes is shorter than an FTAB header", b.len()));
        }
        if b.get(0x24..0x28) != Some(&b"ftab"[..]) {
            return Err("no ftab magic at 0x24".into());
        }
        let count = le32(b, 0x28).unwrap_or(0) as usize;
        if count > 1024 {
            return Err(format!("{count} entries is implausible"));
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let r = HEADER + i * RECORD;
            let (Some(tag), Some(off), Some(len)) = (four(b, r), le32(b, r + 4), le32(b, r + 8))
            else {
                return Err(format!("entry record {i} is cut off"));
            };
            let data = (off as usize)
                .checked_add(len as usize)
                .and_then(|end| b.get(off as usize..end))
                .ok_or_else(|| format!("entry {i} lies outside the table"))?;
            entries.push((tag, data.to_vec()));
        }
        Ok(Table {
            tag: four(b, 0x20).unwrap_or_default(),
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let t = Table {
            tag: *b"rkos",
            entries: vec![(*b"rkos", vec![1, 2, 3]), (*b"rrko", vec![4])],
        };
        let bytes = t.write();
        assert_eq!(bytes.len(), 0x30 + 32 + 4);
        assert_eq!(&bytes[0x20..0x28], b"rkosftab");
        assert_eq!(Table::parse(&bytes).unwrap(), t);
        assert!(Table::parse(&bytes[..0x2f]).is_err());
        let mut bad = bytes.clone();
        bad[0x34] = 0xFF;
        assert!(Table::parse(&bad).is_err());
        for n in 0..bytes.len() {
            let _ = Table::parse(&bytes[..n]);
        }
    }
}
