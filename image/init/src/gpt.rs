//! Growing the last partition of a GPT or MBR disk to the end of the medium (sans-IO).
//!
//! The image is a few hundred MiB; written to a 64 GB stick, its backup GPT sits in the middle
//! of the stick and the data partition ends there too. On first boot the init moves the backup
//! GPT (header + entry array) to the medium's last sectors and extends the data partition's
//! last LBA, keeping every other field, so a tool reading either copy sees the same table.
//!
//! The caller reads sectors and applies the returned [`Write`]s in order (backup first, the
//! primary header last: a crash in between leaves the old primary table, which is still valid).
//! Nothing here trusts the disk: every field is checked before use and the parsers never panic.

use thiserror::Error;

/// Bytes to write at a byte offset of the whole disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub offset: u64,
    pub data: Vec<u8>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum GptError {
    #[error("the disk has no GPT header at LBA 1 (signature missing)")]
    NoGpt,
    #[error("the GPT header is damaged ({0}); leaving the partition table alone — check the stick with a partitioning tool")]
    BadHeader(&'static str),
    #[error("the GPT partition entry array does not match its checksum; leaving the partition table alone")]
    BadEntries,
    #[error("no partition named {0} in the GPT")]
    NotFound(String),
    #[error("partition {name} is not the last one on the disk (partition {other} ends after it); not growing it")]
    NotLast { name: String, other: u32 },
    #[error("the MBR has no valid signature or partition {0} is empty")]
    BadMbr(u32),
    #[error("MBR partition {0} is not the last one on the disk; not growing it")]
    MbrNotLast(u32),
}

/// What [`plan_gpt`] decided for a partition that can grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Growth {
    /// 1-based partition number (as the kernel's `partN`).
    pub number: u32,
    pub first_lba: u64,
    pub old_last_lba: u64,
    pub new_last_lba: u64,
    /// In order; the last one makes the new table visible.
    pub writes: Vec<Write>,
}

impl Growth {
    /// The partition's new length in sectors.
    pub fn sectors(&self) -> u64 {
        self.new_last_lba - self.first_lba + 1
    }
}

/// The fields of a GPT header this module uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub size: u32,
    pub my_lba: u64,
    pub alternate_lba: u64,
    pub first_usable: u64,
    pub last_usable: u64,
    pub entries_lba: u64,
    pub entry_count: u32,
    pub entry_size: u32,
    pub entries_crc: u32,
}

fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}
fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Entry arrays larger than this are refused (the standard one is 16 KiB).
const MAX_ENTRIES_BYTES: u64 = 1 << 20;

impl Header {
    /// Parse and verify the header in `sector` (one logical sector, LBA 1 or the last LBA).
    pub fn parse(sector: &[u8]) -> Result<Header, GptError> {
        if sector.get(0..8) != Some(b"EFI PART") {
            return Err(GptError::NoGpt);
        }
        let size = le32(sector, 12);
        if size < 92 || size as usize > sector.len() {
            return Err(GptError::BadHeader("header size out of range"));
        }
        let mut copy = sector[..size as usize].to_vec();
        put32(&mut copy, 16, 0);
        if crc32fast::hash(&copy) != le32(sector, 16) {
            return Err(GptError::BadHeader("header checksum mismatch"));
        }
        let h = Header {
            size,
            my_lba: le64(sector, 24),
            alternate_lba: le64(sector, 32),
            first_usable: le64(sector, 40),
            last_usable: le64(sector, 48),
            entries_lba: le64(sector, 72),
            entry_count: le32(sector, 80),
            entry_size: le32(sector, 84),
            entries_crc: le32(sector, 88),
        };
        if h.entry_size < 128 || h.entry_size % 8 != 0 {
            return Err(GptError::BadHeader("partition entry size"));
        }
        if h.entries_bytes() > MAX_ENTRIES_BYTES || h.entry_count == 0 {
            return Err(GptError::BadHeader("partition entry count"));
        }
        if h.first_usable > h.last_usable {
            return Err(GptError::BadHeader("usable range"));
        }
        Ok(h)
    }

    /// Size of the partition entry array in bytes.
    pub fn entries_bytes(&self) -> u64 {
        u64::from(self.entry_count) * u64::from(self.entry_size)
    }

    /// Sectors the entry array occupies.
    pub fn entries_sectors(&self, sector_size: u64) -> u64 {
        self.entries_bytes().div_ceil(sector_size)
    }
}

/// The partition name of a GPT entry (UTF-16LE, NUL-terminated).
fn entry_name(entry: &[u8]) -> String {
    let units: Vec<u16> = (0..36)
        .map(|i| le16(entry, 56 + 2 * i))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

fn is_used(entry: &[u8]) -> bool {
    entry.get(0..16).is_some_and(|t| t.iter().any(|&b| b != 0))
}

/// The medium and the growth policy, in logical sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub disk_sectors: u64,
    pub sector_size: u64,
    /// Partition ends are aligned down to a multiple of this.
    pub align: u64,
    /// Grow only by at least this much.
    pub min_gain: u64,
}

/// Plan growing the partition named `name` to the end of a disk of `geo.disk_sectors` logical
/// sectors of `geo.sector_size` bytes. `lba1` is the primary header's sector and `entries` the
/// primary entry array (`header.entries_bytes()` bytes from `header.entries_lba`); `mbr` is LBA
/// 0 (its protective entry's size is updated). The new end is aligned down to `align` sectors
/// (1 MiB keeps flash erase blocks aligned). `Ok(None)`: the partition already ends within
/// `geo.min_gain` sectors of where it could.
pub fn plan_gpt(
    mbr: &[u8],
    lba1: &[u8],
    entries: &[u8],
    geo: &Geometry,
    name: &str,
) -> Result<Option<Growth>, GptError> {
    let Geometry {
        disk_sectors,
        sector_size,
        align,
        min_gain,
    } = *geo;
    let h = Header::parse(lba1)?;
    if h.my_lba != 1 {
        return Err(GptError::BadHeader("primary header not at LBA 1"));
    }
    let ebytes = h.entries_bytes() as usize;
    if entries.len() < ebytes {
        return Err(GptError::BadEntries);
    }
    let entries = &entries[..ebytes];
    if crc32fast::hash(entries) != h.entries_crc {
        return Err(GptError::BadEntries);
    }
    let esec = h.entries_sectors(sector_size);
    // The primary entry array must lie between the header and the first usable LBA.
    if h.entries_lba < 2 || h.entries_lba.saturating_add(esec) > h.first_usable {
        return Err(GptError::BadHeader("entry array position"));
    }
    // Room for the backup array + header after the last usable LBA, and nothing beyond the disk.
    if h.alternate_lba >= disk_sectors || h.last_usable.saturating_add(esec) >= h.alternate_lba {
        return Err(GptError::BadHeader("backup header position"));
    }
    let esize = h.entry_size as usize;
    let mut target = None;
    let mut last_end = 0u64;
    let mut last_owner = 0u32;
    for (i, e) in entries.chunks_exact(esize).enumerate() {
        if !is_used(e) {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        if first > last || first < h.first_usable || last > h.last_usable {
            return Err(GptError::BadHeader(
                "a partition lies outside the usable range",
            ));
        }
        let number = i as u32 + 1;
        if last >= last_end {
            last_end = last;
            last_owner = number;
        }
        if target.is_none() && entry_name(e).eq_ignore_ascii_case(name) {
            target = Some((i, first, last));
        }
    }
    let Some((index, first, old_last)) = target else {
        return Err(GptError::NotFound(name.to_string()));
    };
    let number = index as u32 + 1;
    if last_owner != number {
        return Err(GptError::NotLast {
            name: name.to_string(),
            other: last_owner,
        });
    }
    // New layout: backup header on the last sector, its array just before it.
    let backup_lba = disk_sectors - 1;
    let backup_entries = match backup_lba.checked_sub(esec) {
        Some(l) if l > h.first_usable => l,
        _ => return Err(GptError::BadHeader("disk too small")),
    };
    let last_usable = backup_entries - 1;
    let align = align.max(1);
    let new_last = ((last_usable + 1) / align * align).saturating_sub(1);
    if new_last < old_last.saturating_add(min_gain) {
        return Ok(None);
    }

    let mut new_entries = entries.to_vec();
    put64(&mut new_entries[index * esize..], 40, new_last);
    let entries_crc = crc32fast::hash(&new_entries);
    let header = |my: u64, alt: u64, arr: u64| -> Vec<u8> {
        let mut s = lba1.to_vec();
        put64(&mut s, 24, my);
        put64(&mut s, 32, alt);
        put64(&mut s, 48, last_usable);
        put64(&mut s, 72, arr);
        put32(&mut s, 88, entries_crc);
        put32(&mut s, 16, 0);
        let crc = crc32fast::hash(&s[..h.size as usize]);
        put32(&mut s, 16, crc);
        s
    };
    let mut writes = vec![
        Write {
            offset: backup_entries * sector_size,
            data: new_entries.clone(),
        },
        Write {
            offset: backup_lba * sector_size,
            data: header(backup_lba, 1, backup_entries),
        },
        Write {
            offset: h.entries_lba * sector_size,
            data: new_entries,
        },
    ];
    if let Some(pmbr) = updated_mbr(mbr, disk_sectors, first, new_last) {
        writes.push(Write {
            offset: 0,
            data: pmbr,
        });
    }
    writes.push(Write {
        offset: sector_size,
        data: header(1, backup_lba, h.entries_lba),
    });
    // The old backup header now lies inside the grown partition: wipe its signature so no tool
    // mistakes it for a table (the file system will overwrite it anyway).
    if h.alternate_lba != backup_lba && h.alternate_lba > old_last {
        writes.push(Write {
            offset: h.alternate_lba * sector_size,
            data: vec![0; lba1.len()],
        });
    }
    Ok(Some(Growth {
        number,
        first_lba: first,
        old_last_lba: old_last,
        new_last_lba: new_last,
        writes,
    }))
}

/// (first, last) LBA of the used entry named `name` in a GPT entry array.
pub fn find(entries: &[u8], entry_size: usize, name: &str) -> Option<(u64, u64)> {
    if entry_size < 128 {
        return None;
    }
    entries
        .chunks_exact(entry_size)
        .find(|e| is_used(e) && entry_name(e).eq_ignore_ascii_case(name))
        .map(|e| (le64(e, 32), le64(e, 40)))
}

/// LBA 0 after the growth, if it changes: a protective (0xEE) first entry now covers the new
/// disk, and in a hybrid MBR (the Raspberry Pi card: the firmware and Windows read the MBR,
/// Linux the GPT) the entry that starts where the grown partition starts grows with it — else
/// those readers would see the old, smaller partition under a file system that says it is
/// bigger, and could write past its end.
fn updated_mbr(mbr: &[u8], disk_sectors: u64, first: u64, new_last: u64) -> Option<Vec<u8>> {
    if mbr.len() < 512 || mbr[510..512] != [0x55, 0xAA] {
        return None;
    }
    let mut m = mbr.to_vec();
    if m[446 + 4] == 0xEE {
        let size = (disk_sectors - 1).min(u64::from(u32::MAX)) as u32;
        put32(&mut m, 446 + 12, size);
    }
    for i in 0..4 {
        let e = 446 + 16 * i;
        let kind = m[e + 4];
        if kind == 0 || kind == 0xEE || u64::from(le32(&m, e + 8)) != first {
            continue;
        }
        let size = (new_last - first + 1).min(u64::from(u32::MAX)) as u32;
        put32(&mut m, e + 12, size);
    }
    (m != mbr[..512]).then_some(m)
}

/// Plan growing MBR partition `number` (1–4, primary) to the end of the disk (Raspberry Pi SD
/// images use an MBR). Sizes are capped at 2^32 − 1 sectors, the MBR's limit.
pub fn plan_mbr(mbr: &[u8], number: u32, geo: &Geometry) -> Result<Option<Growth>, GptError> {
    let Geometry {
        disk_sectors,
        align,
        min_gain,
        ..
    } = *geo;
    if mbr.len() < 512 || mbr[510..512] != [0x55, 0xAA] || !(1..=4).contains(&number) {
        return Err(GptError::BadMbr(number));
    }
    let entry = |n: usize| &mbr[446 + 16 * n..446 + 16 * (n + 1)];
    let span = |e: &[u8]| (u64::from(le32(e, 8)), u64::from(le32(e, 12)));
    let me = entry(number as usize - 1);
    let (first, len) = span(me);
    if me[4] == 0 || me[4] == 0xEE || len == 0 {
        return Err(GptError::BadMbr(number));
    }
    let old_last = first + len - 1;
    for n in 0..4 {
        let e = entry(n);
        let (s, l) = span(e);
        if n + 1 != number as usize && e[4] != 0 && l != 0 && s + l - 1 > old_last {
            return Err(GptError::MbrNotLast(number));
        }
    }
    let align = align.max(1);
    let end = disk_sectors.min(first + u64::from(u32::MAX));
    let new_last = (end / align * align).saturating_sub(1);
    if new_last < old_last.saturating_add(min_gain) {
        return Ok(None);
    }
    let mut m = mbr[..512].to_vec();
    put32(
        &mut m,
        446 + 16 * (number as usize - 1) + 12,
        (new_last - first + 1) as u32,
    );
    Ok(Some(Growth {
        number,
        first_lba: first,
        old_last_lba: old_last,
        new_last_lba: new_last,
        writes: vec![Write { offset: 0, data: m }],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SS: u64 = 512;

    /// A disk like image/build.sh makes: ESP at 2048 (64 MiB), MACRESCUE after it (64 MiB),
    /// 1 MiB slack, backup GPT at the end — built by hand here, checked against sfdisk in the
    /// integration test.
    fn disk(sectors: u64) -> Vec<u8> {
        let mut d = vec![0u8; (sectors * SS) as usize];
        let mut mbr = [0u8; 512];
        mbr[446 + 4] = 0xEE;
        put32(&mut mbr, 446 + 8, 1);
        put32(&mut mbr, 446 + 12, (sectors - 1) as u32);
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        d[..512].copy_from_slice(&mbr);
        let mut entries = vec![0u8; 128 * 128];
        let mut part = |i: usize, first: u64, last: u64, name: &str| {
            let e = &mut entries[i * 128..(i + 1) * 128];
            e[0] = 0xAA;
            e[16] = i as u8 + 1;
            put64(e, 32, first);
            put64(e, 40, last);
            for (k, u) in name.encode_utf16().enumerate() {
                e[56 + 2 * k..58 + 2 * k].copy_from_slice(&u.to_le_bytes());
            }
        };
        part(0, 2048, 2048 + 131072 - 1, "ESP");
        part(1, 133120, 133120 + 131072 - 1, "MACRESCUE");
        let crc = crc32fast::hash(&entries);
        let last = sectors - 1;
        let mk = |my: u64, alt: u64, arr: u64| {
            let mut h = vec![0u8; 512];
            h[..8].copy_from_slice(b"EFI PART");
            put32(&mut h, 8, 0x0001_0000);
            put32(&mut h, 12, 92);
            put64(&mut h, 24, my);
            put64(&mut h, 32, alt);
            put64(&mut h, 40, 2048);
            put64(&mut h, 48, last - 33);
            put64(&mut h, 72, arr);
            put32(&mut h, 80, 128);
            put32(&mut h, 84, 128);
            put32(&mut h, 88, crc);
            let c = crc32fast::hash(&h[..92]);
            put32(&mut h, 16, c);
            h
        };
        d[512..1024].copy_from_slice(&mk(1, last, 2));
        d[1024..1024 + entries.len()].copy_from_slice(&entries);
        let b = ((last - 32) * SS) as usize;
        d[b..b + entries.len()].copy_from_slice(&entries);
        d[(last * SS) as usize..].copy_from_slice(&mk(last, 1, last - 32));
        d
    }

    const BUILT: u64 = 133120 + 131072 + 2048;

    fn geo(disk_sectors: u64, align: u64, min_gain: u64) -> Geometry {
        Geometry {
            disk_sectors,
            sector_size: SS,
            align,
            min_gain,
        }
    }

    fn plan(d: &[u8], sectors: u64) -> Result<Option<Growth>, GptError> {
        let g = geo(sectors, 2048, 131072);
        plan_gpt(
            &d[..512],
            &d[512..1024],
            &d[1024..1024 + 16384],
            &g,
            "MACRESCUE",
        )
    }

    fn apply(d: &mut [u8], g: &Growth) {
        for w in &g.writes {
            let o = w.offset as usize;
            d[o..o + w.data.len()].copy_from_slice(&w.data);
        }
    }

    #[test]
    fn grows_the_last_partition_and_moves_the_backup_to_the_end() {
        let mut d = disk(BUILT);
        let big = BUILT + 256 * 2048; // + 256 MiB, as after dd to a bigger stick
        d.resize((big * SS) as usize, 0);
        let g = plan(&d, big).unwrap().unwrap();
        assert_eq!(g.number, 2);
        assert_eq!(g.first_lba, 133120);
        assert_eq!(g.old_last_lba, 264191);
        // Last usable = big - 34; aligned down to 1 MiB.
        assert_eq!(g.new_last_lba, (big - 33) / 2048 * 2048 - 1);
        apply(&mut d, &g);
        let p = Header::parse(&d[512..1024]).unwrap();
        assert_eq!(
            (p.my_lba, p.alternate_lba, p.last_usable),
            (1, big - 1, big - 34)
        );
        let b = Header::parse(&d[((big - 1) * SS) as usize..]).unwrap();
        assert_eq!(
            (b.my_lba, b.alternate_lba, b.entries_lba),
            (big - 1, 1, big - 33)
        );
        let be = &d[((big - 33) * SS) as usize..((big - 1) * SS) as usize];
        assert_eq!(be, &d[1024..1024 + 16384]);
        assert_eq!(le64(&d[1024 + 128..], 40), g.new_last_lba);
        assert_eq!(le64(&d[1024..], 40), 2048 + 131072 - 1, "ESP untouched");
        assert_eq!(le32(&d, 446 + 12), (big - 1) as u32);
        // The old backup header is gone.
        assert_ne!(&d[((BUILT - 1) * SS) as usize..][..8], b"EFI PART");
        // A second run finds nothing to do.
        assert_eq!(plan(&d, big).unwrap(), None);
    }

    /// Regression: on the Raspberry Pi card's hybrid MBR (boot FAT, data exFAT, 0xEE over the
    /// GPT), growing the GPT partition left the MBR's data entry at its old size.
    #[test]
    fn grows_the_matching_entry_of_a_hybrid_mbr() {
        let mut d = disk(BUILT);
        let entry = |d: &mut [u8], i: usize, start: u32, size: u32, kind: u8| {
            let e = 446 + 16 * i;
            d[e..e + 16].fill(0);
            d[e + 4] = kind;
            put32(d, e + 8, start);
            put32(d, e + 12, size);
        };
        entry(&mut d, 0, 2048, 131072, 0x0c);
        entry(&mut d, 1, 133120, 131072, 0x07);
        entry(&mut d, 2, 1, 2047, 0xEE);
        let big = BUILT + 256 * 2048;
        d.resize((big * SS) as usize, 0);
        let g = plan(&d, big).unwrap().unwrap();
        apply(&mut d, &g);
        let size = |d: &[u8], i: usize| le32(d, 446 + 16 * i + 12);
        assert_eq!(size(&d, 0), 131072, "boot entry untouched");
        assert_eq!(
            u64::from(size(&d, 1)),
            g.new_last_lba - g.first_lba + 1,
            "data entry follows the GPT partition"
        );
        assert_eq!(
            size(&d, 2),
            2047,
            "the hybrid's 0xEE entry only covers the GPT"
        );
        assert_eq!(le32(&d, 446 + 16 + 8), 133120);
    }

    #[test]
    fn leaves_small_gains_and_same_size_disks_alone() {
        let d = disk(BUILT);
        assert_eq!(plan(&d, BUILT).unwrap(), None);
        let mut d = disk(BUILT);
        d.resize(((BUILT + 2048 * 10) * SS) as usize, 0);
        assert_eq!(plan(&d, BUILT + 2048 * 10).unwrap(), None);
    }

    #[test]
    fn refuses_damaged_or_unexpected_tables() {
        let d = disk(BUILT);
        let big = BUILT + (1 << 22);
        let mut bad = d.clone();
        bad[512 + 40] ^= 1;
        assert_eq!(
            plan(&bad, big),
            Err(GptError::BadHeader("header checksum mismatch"))
        );
        let mut bad = d.clone();
        bad[1024 + 200] ^= 1;
        assert_eq!(plan(&bad, big), Err(GptError::BadEntries));
        assert_eq!(plan(&vec![0u8; 40000], big), Err(GptError::NoGpt));
        let r = plan_gpt(
            &d[..512],
            &d[512..1024],
            &d[1024..1024 + 16384],
            &geo(big, 1, 1),
            "DATA",
        );
        assert_eq!(r, Err(GptError::NotFound("DATA".into())));
        let r = plan_gpt(
            &d[..512],
            &d[512..1024],
            &d[1024..1024 + 16384],
            &geo(big, 1, 1),
            "esp",
        );
        assert_eq!(
            r,
            Err(GptError::NotLast {
                name: "esp".into(),
                other: 2
            })
        );
        // A disk smaller than the table says (image written to a too-small stick).
        assert_eq!(
            plan(&d, BUILT - 100),
            Err(GptError::BadHeader("backup header position"))
        );
        // Truncated inputs never panic.
        for n in [0, 8, 91, 100, 511] {
            let _ = Header::parse(&d[512..512 + n]);
            let _ = plan_gpt(
                &d[..n],
                &d[512..512 + n],
                &d[1024..1024 + n],
                &geo(big, 1, 1),
                "X",
            );
        }
    }

    /// Hostile tables with valid checksums: entries and header fields changed, CRCs fixed.
    #[test]
    fn never_panics_on_mutated_tables() {
        let base = disk(BUILT);
        let big = BUILT + (1 << 22);
        let mut x = 0x2545_F491u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..500 {
            let mut d = base[..1024 + 16384].to_vec();
            for _ in 0..1 + next() % 3 {
                let at = if next() % 2 == 0 {
                    512 + 24 + next() as usize % 68
                } else {
                    1024 + next() as usize % 256
                };
                d[at] = next() as u8;
            }
            let crc = crc32fast::hash(&d[1024..1024 + 16384]);
            put32(&mut d, 512 + 88, crc);
            put32(&mut d, 512 + 16, 0);
            let crc = crc32fast::hash(&d[512..512 + 92]);
            put32(&mut d, 512 + 16, crc);
            let sectors = if next() % 2 == 0 {
                big
            } else {
                u64::from(next())
            };
            let g = geo(
                sectors,
                1 + u64::from(next() % 4096),
                u64::from(next() % 100_000),
            );
            if let Ok(Some(p)) = plan_gpt(&d[..512], &d[512..1024], &d[1024..], &g, "MACRESCUE") {
                assert!(p.new_last_lba < sectors && p.new_last_lba > p.old_last_lba);
            }
        }
    }

    fn mbr(parts: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut m = vec![0u8; 512];
        for (i, &(t, s, l)) in parts.iter().enumerate() {
            m[446 + 16 * i + 4] = t;
            put32(&mut m, 446 + 16 * i + 8, s);
            put32(&mut m, 446 + 16 * i + 12, l);
        }
        m[510] = 0x55;
        m[511] = 0xAA;
        m
    }

    #[test]
    fn grows_the_last_mbr_partition() {
        let m = mbr(&[(0x0c, 2048, 262144), (0x07, 264192, 131072)]);
        let g = plan_mbr(&m, 2, &geo(62_333_952, 2048, 131072))
            .unwrap()
            .unwrap();
        // A 32 GB card is not a whole number of MiB: the end is aligned down.
        assert_eq!(g.new_last_lba, 62_332_928 - 1);
        assert_eq!(le32(&g.writes[0].data, 446 + 16 + 12), 62_332_928 - 264192);
        assert_eq!(le32(&g.writes[0].data, 446 + 12), 262144, "first untouched");
        assert_eq!(
            plan_mbr(&m, 2, &geo(264192 + 131072 + 100, 2048, 1)),
            Ok(None)
        );
        assert_eq!(
            plan_mbr(&m, 1, &geo(1 << 30, 2048, 1)),
            Err(GptError::MbrNotLast(1))
        );
        assert_eq!(
            plan_mbr(&m, 3, &geo(1 << 30, 2048, 1)),
            Err(GptError::BadMbr(3))
        );
        assert_eq!(
            plan_mbr(&m[..100], 2, &geo(1 << 30, 2048, 1)),
            Err(GptError::BadMbr(2))
        );
        // Beyond 2 TiB the MBR can't express the size: capped at 2^32 - 1 sectors from the start.
        let g = plan_mbr(&m, 2, &geo(1 << 40, 1, 1)).unwrap().unwrap();
        assert_eq!(le32(&g.writes[0].data, 446 + 16 + 12), u32::MAX);
    }
}
