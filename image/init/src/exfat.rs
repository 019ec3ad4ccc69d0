//! Our exFAT formatter and in-place grower for the data partition (Microsoft's exFAT
//! specification; no standard tool resizes exFAT, exfatprogs included).
//!
//! Growing needs room in the FAT, which cannot move (cluster numbers are positions in the
//! heap that follows it). So [`format`] reserves a FAT for a large maximum size (2 TiB with
//! 1 MiB clusters is 8 MiB of FAT, all zeros in the image download) and puts the allocation
//! bitmap in a cluster big enough for that maximum. [`grow`] then only has to raise
//! VolumeLength/ClusterCount in both boot regions and extend the bitmap in place; it never
//! moves data, so files copied onto the small partition before first boot stay where they are.
//! A volume someone reformatted (FAT sized for its size) grows only as far as its FAT and
//! bitmap allow, and [`Grown::limit`] says why.
//!
//! The logic runs over [`Disk`] (byte reads and writes at offsets), implemented for a file or
//! block device by the edge and for a `Vec<u8>` in tests.

use thiserror::Error;

/// Random-access bytes: the block device, an image file, or memory in tests.
pub trait Disk {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()>;
}

impl Disk for Vec<u8> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let o = usize::try_from(offset).map_err(|_| eof())?;
        let src = self.get(o..o + buf.len()).ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let o = usize::try_from(offset).map_err(|_| eof())?;
        let dst = self.get_mut(o..o + data.len()).ok_or_else(eof)?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

fn eof() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::UnexpectedEof)
}

impl Disk for std::fs::File {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, data, offset)
    }
}

#[derive(Debug, Error)]
pub enum ExfatError {
    #[error("cannot read or write the data partition: {0}")]
    Io(#[from] std::io::Error),
    #[error("not an exFAT file system we can grow: {0}")]
    Layout(&'static str),
    #[error("the exFAT boot region checksum does not match; run a file-system check (chkdsk on Windows, First Aid on macOS, fsck.exfat on Linux)")]
    Checksum,
    #[error("the exFAT file system was not cleanly unmounted; run a file-system check (chkdsk, First Aid or fsck.exfat) before it can grow")]
    Dirty,
    #[error("cannot format: {0}")]
    Format(String),
}

/// Why a volume did not grow to the whole partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The FAT was sized for fewer clusters (formatted by another tool, or the medium is
    /// larger than the maximum reserved at build time).
    Fat,
    /// The allocation bitmap's clusters hold no more bits.
    Bitmap,
    /// exFAT's own maximum cluster count.
    Format,
}

/// The result of [`grow`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grown {
    pub cluster_bytes: u64,
    pub old_clusters: u32,
    pub new_clusters: u32,
    pub limit: Option<Limit>,
}

impl Grown {
    pub fn old_bytes(&self) -> u64 {
        u64::from(self.old_clusters) * self.cluster_bytes
    }
    pub fn new_bytes(&self) -> u64 {
        u64::from(self.new_clusters) * self.cluster_bytes
    }
    pub fn changed(&self) -> bool {
        self.new_clusters != self.old_clusters
    }
}

/// The exFAT maximum cluster count (spec §3.1.9: 2^32 − 11).
const MAX_CLUSTERS: u64 = 0xFFFF_FFF5;
const VOLUME_DIRTY: u16 = 0x0002;
const ACTIVE_FAT: u16 = 0x0001;
const EOC: u32 = 0xFFFF_FFFF;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The boot-region checksum (spec §3.4) over sectors 0–10, skipping VolumeFlags and
/// PercentInUse, which change without rewriting the region.
pub fn boot_checksum(region: &[u8], bytes_per_sector: usize) -> u32 {
    let mut sum = 0u32;
    for (i, &b) in region[..11 * bytes_per_sector].iter().enumerate() {
        if i == 106 || i == 107 || i == 112 {
            continue;
        }
        sum = sum.rotate_right(1).wrapping_add(u32::from(b));
    }
    sum
}

/// The up-case table checksum (spec §7.2.2), the same rotate-and-add over every byte.
pub fn table_checksum(data: &[u8]) -> u32 {
    data.iter()
        .fold(0u32, |s, &b| s.rotate_right(1).wrapping_add(u32::from(b)))
}

/// The fields of the main boot sector this module uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    pub volume_length: u64,
    pub fat_offset: u32,
    pub fat_length: u32,
    pub heap_offset: u32,
    pub cluster_count: u32,
    pub root_cluster: u32,
    pub flags: u16,
    pub sector_shift: u8,
    pub cluster_shift: u8,
    pub fats: u8,
}

impl Boot {
    /// Parse and sanity-check a boot sector (at least 512 bytes).
    pub fn parse(s: &[u8]) -> Result<Boot, ExfatError> {
        if s.len() < 512 || &s[3..11] != b"EXFAT   " {
            return Err(ExfatError::Layout("no exFAT boot sector"));
        }
        if s[510..512] != [0x55, 0xAA] {
            return Err(ExfatError::Layout("boot signature missing"));
        }
        let b = Boot {
            volume_length: le64(s, 72),
            fat_offset: le32(s, 80),
            fat_length: le32(s, 84),
            heap_offset: le32(s, 88),
            cluster_count: le32(s, 92),
            root_cluster: le32(s, 96),
            flags: le16(s, 106),
            sector_shift: s[108],
            cluster_shift: s[109],
            fats: s[110],
        };
        if !(9..=12).contains(&b.sector_shift)
            || u32::from(b.sector_shift) + u32::from(b.cluster_shift) > 25
        {
            return Err(ExfatError::Layout("sector or cluster size out of range"));
        }
        if b.fats != 1 || b.flags & ACTIVE_FAT != 0 {
            return Err(ExfatError::Layout("two FATs (TexFAT)"));
        }
        let heap = u64::from(b.heap_offset);
        if b.fat_offset < 24
            || u64::from(b.fat_offset) + u64::from(b.fat_length) > heap
            || b.cluster_count == 0
            || u64::from(b.cluster_count) > MAX_CLUSTERS
            || heap + (u64::from(b.cluster_count) << b.cluster_shift) > b.volume_length
            || (u64::from(b.cluster_count) + 2) * 4 > u64::from(b.fat_length) * b.sector_bytes()
            || b.root_cluster < 2
            || b.root_cluster > b.cluster_count + 1
        {
            return Err(ExfatError::Layout("inconsistent boot sector fields"));
        }
        Ok(b)
    }

    pub fn sector_bytes(&self) -> u64 {
        1 << self.sector_shift
    }
    pub fn cluster_bytes(&self) -> u64 {
        1 << (self.sector_shift + self.cluster_shift)
    }
    /// Clusters the FAT has entries for.
    pub fn fat_capacity(&self) -> u64 {
        (u64::from(self.fat_length) * self.sector_bytes() / 4).saturating_sub(2)
    }
    fn cluster_offset(&self, cluster: u32) -> u64 {
        u64::from(self.heap_offset) * self.sector_bytes()
            + u64::from(cluster - 2) * self.cluster_bytes()
    }
    fn fat_entry_offset(&self, cluster: u32) -> u64 {
        u64::from(self.fat_offset) * self.sector_bytes() + u64::from(cluster) * 4
    }
}

/// Follow a FAT chain from `first`; refuses loops and clusters outside the heap.
fn chain(disk: &mut impl Disk, base: u64, b: &Boot, first: u32) -> Result<Vec<u32>, ExfatError> {
    let mut out = Vec::new();
    let mut c = first;
    loop {
        if c < 2 || c > b.cluster_count + 1 || out.len() > b.cluster_count as usize {
            return Err(ExfatError::Layout("broken cluster chain"));
        }
        out.push(c);
        let mut e = [0u8; 4];
        disk.read_at(base + b.fat_entry_offset(c), &mut e)?;
        c = u32::from_le_bytes(e);
        if c == EOC {
            return Ok(out);
        }
    }
}

/// Grow the exFAT file system at byte `base` of `disk` to `new_bytes` as far as
/// its FAT and bitmap allow. Never moves data; writes the new bitmap bits and FAT entries, then
/// the bitmap's directory entry, then the main and backup boot regions (the last write makes
/// the new clusters part of the volume).
pub fn grow(disk: &mut impl Disk, base: u64, new_bytes: u64) -> Result<Grown, ExfatError> {
    let mut head = [0u8; 512];
    disk.read_at(base, &mut head)?;
    let b = Boot::parse(&head)?;
    let ss = b.sector_bytes() as usize;
    let mut region = vec![0u8; 12 * ss];
    disk.read_at(base, &mut region)?;
    let sum = boot_checksum(&region, ss);
    if region[11 * ss..]
        .chunks_exact(4)
        .any(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) != sum)
    {
        return Err(ExfatError::Checksum);
    }
    if b.flags & VOLUME_DIRTY != 0 {
        return Err(ExfatError::Dirty);
    }
    let cb = b.cluster_bytes();
    let old = b.cluster_count;
    let new_sectors = new_bytes >> b.sector_shift;
    let want = new_sectors
        .saturating_sub(u64::from(b.heap_offset))
        .checked_shr(u32::from(b.cluster_shift))
        .unwrap_or(0);
    let unchanged = |limit| Grown {
        cluster_bytes: cb,
        old_clusters: old,
        new_clusters: old,
        limit,
    };
    if want <= u64::from(old) {
        return Ok(unchanged(None));
    }

    // The root directory's allocation bitmap entry (exactly one with a single FAT).
    let mut bitmap_entry = None;
    'dir: for c in chain(disk, base, &b, b.root_cluster)? {
        let mut buf = vec![0u8; cb as usize];
        disk.read_at(base + b.cluster_offset(c), &mut buf)?;
        for (i, e) in buf.chunks_exact(32).enumerate() {
            match e[0] {
                0x00 => break 'dir,
                0x81 if bitmap_entry.is_some() => {
                    return Err(ExfatError::Layout("more than one allocation bitmap"))
                }
                0x81 => {
                    bitmap_entry = Some((
                        b.cluster_offset(c) + 32 * i as u64,
                        le32(e, 20),
                        le64(e, 24),
                    ))
                }
                _ => {}
            }
        }
    }
    let Some((entry_off, bm_first, bm_len)) = bitmap_entry else {
        return Err(ExfatError::Layout("no allocation bitmap"));
    };
    let old_bytes = u64::from(old).div_ceil(8);
    if bm_len < old_bytes {
        return Err(ExfatError::Layout(
            "allocation bitmap shorter than the volume",
        ));
    }
    let bm_chain = chain(disk, base, &b, bm_first)?;

    let mut new = want;
    let mut limit = None;
    for (cap, why) in [
        (b.fat_capacity(), Limit::Fat),
        (bm_chain.len() as u64 * cb * 8, Limit::Bitmap),
        (MAX_CLUSTERS, Limit::Format),
    ] {
        if cap < new {
            new = cap;
            limit = Some(why);
        }
    }
    if new <= u64::from(old) {
        return Ok(unchanged(limit));
    }
    let new = new as u32;

    // 1. Bitmap: clear bits past the old end (they must be zero already), extend with zeros.
    let new_bytes = u64::from(new).div_ceil(8);
    let mut bitmap = vec![0u8; new_bytes as usize];
    let mut at = 0usize;
    for &c in &bm_chain {
        if at >= old_bytes as usize {
            break;
        }
        let n = (cb as usize).min(old_bytes as usize - at);
        disk.read_at(base + b.cluster_offset(c), &mut bitmap[at..at + n])?;
        at += n;
    }
    if old % 8 != 0 {
        bitmap[(old / 8) as usize] &= (1u8 << (old % 8)) - 1;
    }
    let used: u64 = bitmap.iter().map(|x| u64::from(x.count_ones())).sum();
    let from = u64::from(old / 8);
    let mut pos = from;
    while pos < new_bytes {
        let c = bm_chain[(pos / cb) as usize];
        let in_cluster = pos % cb;
        let n = (cb - in_cluster).min(new_bytes - pos);
        disk.write_at(
            base + b.cluster_offset(c) + in_cluster,
            &bitmap[pos as usize..(pos + n) as usize],
        )?;
        pos += n;
    }

    // 2. FAT entries of the new clusters: free (zero) whatever the region held.
    let fat_from = b.fat_entry_offset(old + 2);
    let fat_len = u64::from(new - old) * 4;
    let mut done = 0u64;
    while done < fat_len {
        let n = (fat_len - done).min(1 << 20) as usize;
        let mut buf = vec![0u8; n];
        disk.read_at(base + fat_from + done, &mut buf)?;
        if buf.iter().any(|&x| x != 0) {
            disk.write_at(base + fat_from + done, &vec![0u8; n])?;
        }
        done += n as u64;
    }

    // 3. The bitmap's DataLength (its entry has no set checksum).
    disk.write_at(base + entry_off + 24, &new_bytes.to_le_bytes())?;

    // 4. Boot regions, main then backup.
    region[72..80].copy_from_slice(&new_sectors.to_le_bytes());
    region[92..96].copy_from_slice(&new.to_le_bytes());
    region[112] = (used * 100 / u64::from(new)).min(100) as u8;
    let sum = boot_checksum(&region, ss);
    for c in region[11 * ss..].chunks_exact_mut(4) {
        c.copy_from_slice(&sum.to_le_bytes());
    }
    disk.write_at(base, &region)?;
    disk.write_at(base + 12 * ss as u64, &region)?;
    Ok(Grown {
        cluster_bytes: cb,
        old_clusters: old,
        new_clusters: new,
        limit,
    })
}

/// How [`format`] lays out a volume.
#[derive(Debug, Clone)]
pub struct FormatOptions {
    pub label: String,
    pub serial: u32,
    /// log2 of the cluster size in bytes (20: 1 MiB).
    pub cluster_shift: u8,
    /// The largest volume the FAT and bitmap are reserved for, in bytes.
    pub max_bytes: u64,
}

impl Default for FormatOptions {
    fn default() -> Self {
        Self {
            label: "MACRESCUE".into(),
            serial: 0x4d52_4553,
            cluster_shift: 20,
            max_bytes: 2 << 40,
        }
    }
}

const SECTOR: u64 = 512;

/// Format `bytes` at `base` of `disk` as exFAT (512-byte sectors). Every byte written is a
/// function of the options: the same options give the same file system.
pub fn format(
    disk: &mut impl Disk,
    base: u64,
    bytes: u64,
    o: &FormatOptions,
) -> Result<Grown, ExfatError> {
    let bad = |m: String| Err(ExfatError::Format(m));
    if !(12..=25).contains(&o.cluster_shift) {
        return bad("cluster size must be 4 KiB to 32 MiB".into());
    }
    let label: Vec<u16> = o.label.encode_utf16().collect();
    if label.len() > 11 {
        return bad(format!("label {:?} is longer than 11 characters", o.label));
    }
    let cb = 1u64 << o.cluster_shift;
    let spc_shift = o.cluster_shift - 9;
    let spc = cb / SECTOR;
    let max_clusters = (o.max_bytes / cb).clamp(16, MAX_CLUSTERS - 2);
    if max_clusters.div_ceil(8) > cb {
        return bad("the bitmap for the maximum size would not fit one cluster: use larger clusters or a smaller maximum".into());
    }
    // FAT and heap on cluster (and so 1 MiB flash erase block) boundaries.
    let fat_offset = spc.max(2048);
    let fat_length = ((max_clusters + 2) * 4).div_ceil(cb) * spc;
    let heap_offset = fat_offset + fat_length;
    let sectors = bytes / SECTOR;
    let count = (sectors.saturating_sub(heap_offset) >> spc_shift).min(max_clusters);
    let upcase = upcase_table();
    let up_clusters = (upcase.len() as u64).div_ceil(cb);
    if count < 2 + up_clusters {
        return bad(format!(
            "{bytes} bytes is too small: the FAT reserved for {} GiB needs {} MiB",
            o.max_bytes >> 30,
            (heap_offset * SECTOR) >> 20
        ));
    }
    let count = count as u32;
    let (bm_cluster, up_cluster) = (2u32, 3u32);
    let root = up_cluster + up_clusters as u32;

    let mut s = vec![0u8; SECTOR as usize];
    s[0..3].copy_from_slice(&[0xEB, 0x76, 0x90]);
    s[3..11].copy_from_slice(b"EXFAT   ");
    s[72..80].copy_from_slice(&sectors.to_le_bytes());
    s[80..84].copy_from_slice(&(fat_offset as u32).to_le_bytes());
    s[84..88].copy_from_slice(&(fat_length as u32).to_le_bytes());
    s[88..92].copy_from_slice(&(heap_offset as u32).to_le_bytes());
    s[92..96].copy_from_slice(&count.to_le_bytes());
    s[96..100].copy_from_slice(&root.to_le_bytes());
    s[100..104].copy_from_slice(&o.serial.to_le_bytes());
    s[104..106].copy_from_slice(&0x0100u16.to_le_bytes());
    s[108] = 9;
    s[109] = spc_shift;
    s[110] = 1;
    s[111] = 0x80;
    let used = 2 + up_clusters;
    s[112] = (used * 100 / u64::from(count)) as u8;
    s[510] = 0x55;
    s[511] = 0xAA;
    let mut region = s;
    for _ in 1..=8 {
        let mut ext = vec![0u8; SECTOR as usize];
        ext[508..512].copy_from_slice(&[0x00, 0x00, 0x55, 0xAA]);
        region.extend_from_slice(&ext);
    }
    region.resize(11 * SECTOR as usize, 0);
    let sum = boot_checksum(&region, SECTOR as usize);
    for _ in 0..SECTOR / 4 {
        region.extend_from_slice(&sum.to_le_bytes());
    }
    disk.write_at(base, &region)?;
    disk.write_at(base + 12 * SECTOR, &region)?;

    // FAT: media and reserved entries, then one chain per system file.
    let mut fat = vec![0u8; (fat_length * SECTOR) as usize];
    let mut put =
        |c: u32, v: u32| fat[c as usize * 4..c as usize * 4 + 4].copy_from_slice(&v.to_le_bytes());
    put(0, 0xFFFF_FFF8);
    put(1, EOC);
    put(bm_cluster, EOC);
    for c in up_cluster..root {
        put(c, if c + 1 == root { EOC } else { c + 1 });
    }
    put(root, EOC);
    disk.write_at(base + fat_offset * SECTOR, &fat)?;

    let heap = base + heap_offset * SECTOR;
    let at = |c: u32| heap + u64::from(c - 2) * cb;
    let mut bitmap = vec![0u8; cb as usize];
    for c in 0..used {
        bitmap[(c / 8) as usize] |= 1 << (c % 8);
    }
    disk.write_at(at(bm_cluster), &bitmap)?;
    let mut up = upcase.clone();
    up.resize((up_clusters * cb) as usize, 0);
    disk.write_at(at(up_cluster), &up)?;

    let mut dir = vec![0u8; cb as usize];
    dir[0] = 0x83;
    dir[1] = label.len() as u8;
    for (i, u) in label.iter().enumerate() {
        dir[2 + 2 * i..4 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    let e = &mut dir[32..64];
    e[0] = 0x81;
    e[20..24].copy_from_slice(&bm_cluster.to_le_bytes());
    e[24..32].copy_from_slice(&u64::from(count).div_ceil(8).to_le_bytes());
    let e = &mut dir[64..96];
    e[0] = 0x82;
    e[4..8].copy_from_slice(&table_checksum(&upcase).to_le_bytes());
    e[20..24].copy_from_slice(&up_cluster.to_le_bytes());
    e[24..32].copy_from_slice(&(upcase.len() as u64).to_le_bytes());
    disk.write_at(at(root), &dir)?;
    Ok(Grown {
        cluster_bytes: cb,
        old_clusters: 0,
        new_clusters: count,
        limit: None,
    })
}

/// The compressed up-case table (spec §7.2.5): every BMP character mapped to its simple
/// upper case (Rust's Unicode tables), identity runs written as 0xFFFF + length. The first
/// 128 entries are the mandatory ASCII mapping.
pub fn upcase_table() -> Vec<u8> {
    let map = |c: u32| -> u32 {
        let Some(ch) = char::from_u32(c) else {
            return c;
        };
        let mut up = ch.to_uppercase();
        match (up.next(), up.next()) {
            (Some(u), None) if (u as u32) < 0xFFFF => u as u32,
            _ => c,
        }
    };
    let mut out: Vec<u16> = Vec::new();
    let mut c = 0u32;
    while c <= 0xFFFF {
        let mut run = 0u32;
        while c + run <= 0xFFFF && map(c + run) == c + run {
            run += 1;
        }
        if run >= 3 {
            out.extend([0xFFFF, run.min(0xFFFF) as u16]);
            c += run.min(0xFFFF);
        } else if run > 0 {
            out.push(c as u16);
            c += 1;
        } else {
            out.push(map(c) as u16);
            c += 1;
        }
    }
    out.iter().flat_map(|u| u.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn fresh(bytes: u64) -> Vec<u8> {
        let mut d = vec![0u8; bytes as usize];
        format(&mut d, 0, bytes, &FormatOptions::default()).unwrap();
        d
    }

    #[test]
    fn formats_the_reserved_layout() {
        let d = fresh(64 * MIB);
        let b = Boot::parse(&d).unwrap();
        assert_eq!(
            (
                b.fat_offset,
                b.fat_length,
                b.heap_offset,
                b.cluster_count,
                b.root_cluster
            ),
            (2048, 9 * 2048, 10 * 2048, 54, 4)
        );
        assert_eq!(b.fat_capacity(), 9 * MIB / 4 - 2);
        assert_eq!(boot_checksum(&d, 512), le32(&d, 11 * 512));
        assert_eq!(&d[..12 * 512], &d[12 * 512..24 * 512], "backup boot region");
        assert_eq!(le32(&d, 2048 * 512), 0xFFFF_FFF8);
        assert_eq!(le32(&d, 2048 * 512 + 4 * 4), EOC, "root chain ends");
        assert_eq!(d[10 * MIB as usize], 0b111, "bitmap, up-case, root in use");
        assert_eq!(d[112], (3 * 100 / 54) as u8);
    }

    #[test]
    fn upcase_table_maps_ascii_and_round_trips() {
        let t = upcase_table();
        // Expand as the spec (and Linux) do.
        let units: Vec<u16> = t.chunks_exact(2).map(|c| le16(c, 0)).collect();
        let mut map = vec![0u16; 0x10000];
        let (mut i, mut k) = (0usize, 0usize);
        while k < units.len() {
            if units[k] == 0xFFFF && k + 1 < units.len() {
                for j in 0..units[k + 1] as usize {
                    map[i + j] = (i + j) as u16;
                }
                i += units[k + 1] as usize;
                k += 2;
            } else {
                map[i] = units[k];
                i += 1;
                k += 1;
            }
        }
        assert_eq!(i, 0x10000);
        assert_eq!(map[b'a' as usize], b'A' as u16);
        assert_eq!(map[b'A' as usize], b'A' as u16);
        assert_eq!(map[b'{' as usize], b'{' as u16);
        assert_eq!(map[0xE9], 0xC9, "é → É");
        assert_eq!(map[0x3C9], 0x3A9, "ω → Ω");
        assert!(t.len() < 8192, "compressed: {}", t.len());
    }

    fn put_file_cluster(d: &mut [u8], b: &Boot, c: u32) {
        // Mark cluster c used in the bitmap at cluster 2, as a file would.
        let off = b.cluster_offset(2) as usize;
        d[off + (c as usize - 2) / 8] |= 1 << ((c - 2) % 8);
    }

    #[test]
    fn grows_in_place_keeping_data() {
        let mut d = fresh(64 * MIB);
        let b = Boot::parse(&d).unwrap();
        put_file_cluster(&mut d, &b, 50);
        let data_at = b.cluster_offset(50) as usize;
        d[data_at..data_at + 4].copy_from_slice(b"IPSW");
        d.resize((256 * MIB) as usize, 0);
        let g = grow(&mut d, 0, 256 * MIB).unwrap();
        assert_eq!((g.old_clusters, g.new_clusters, g.limit), (54, 246, None));
        assert_eq!(g.new_bytes(), 246 * MIB);
        let nb = Boot::parse(&d).unwrap();
        assert_eq!(nb.cluster_count, 246);
        assert_eq!(nb.volume_length, 256 * MIB / 512);
        assert_eq!(boot_checksum(&d, 512), le32(&d, 11 * 512));
        assert_eq!(&d[..12 * 512], &d[12 * 512..24 * 512]);
        assert_eq!(&d[data_at..data_at + 4], b"IPSW");
        let bm = b.cluster_offset(2) as usize;
        assert_eq!(d[bm], 0b111);
        assert_eq!(d[bm + 6], 1 << 0, "cluster 50 still used");
        // The bitmap entry covers the new clusters.
        let root = b.cluster_offset(4) as usize;
        assert_eq!(le64(&d, root + 32 + 24), 246u64.div_ceil(8));
        assert_eq!(d[112], (4 * 100 / 246) as u8);
        // Nothing more to do the second time.
        assert!(!grow(&mut d, 0, 256 * MIB).unwrap().changed());
    }

    #[test]
    fn stops_where_the_fat_ends_and_says_so() {
        let o = FormatOptions {
            max_bytes: 100 * MIB,
            ..FormatOptions::default()
        };
        let mut d = vec![0u8; (300 * MIB) as usize];
        format(&mut d, 0, 64 * MIB, &o).unwrap();
        let b = Boot::parse(&d).unwrap();
        // A one-cluster FAT (1 MiB) has room for 262142 clusters; the max is 100.
        assert_eq!(b.fat_length, 2048);
        let g = grow(&mut d, 0, 300 * MIB).unwrap();
        assert_eq!(g.new_clusters, 298);
        let mut d = vec![0u8; (64 * MIB) as usize];
        format(&mut d, 0, 64 * MIB, &o).unwrap();
        // Shrink the FAT field to what a plain formatter would write for 64 MiB.
        d[84..88].copy_from_slice(&1u32.to_le_bytes());
        d[92..96].copy_from_slice(&200u32.to_le_bytes());
        let sum = boot_checksum(&d, 512);
        for i in 0..128 {
            d[11 * 512 + 4 * i..11 * 512 + 4 * i + 4].copy_from_slice(&sum.to_le_bytes());
        }
        assert!(matches!(
            grow(&mut d, 0, 300 * MIB),
            Err(ExfatError::Layout("inconsistent boot sector fields"))
        ));
        d[92..96].copy_from_slice(&60u32.to_le_bytes());
        let sum = boot_checksum(&d, 512);
        for i in 0..128 {
            d[11 * 512 + 4 * i..11 * 512 + 4 * i + 4].copy_from_slice(&sum.to_le_bytes());
        }
        d.resize((300 * MIB) as usize, 0);
        let g = grow(&mut d, 0, 300 * MIB).unwrap();
        assert_eq!((g.new_clusters, g.limit), (126, Some(Limit::Fat)));
    }

    #[test]
    fn refuses_dirty_damaged_or_foreign_volumes() {
        let mut d = fresh(64 * MIB);
        d[106] |= VOLUME_DIRTY as u8;
        d.resize((128 * MIB) as usize, 0);
        assert!(matches!(grow(&mut d, 0, 128 * MIB), Err(ExfatError::Dirty)));
        let mut d = fresh(64 * MIB);
        d[100] ^= 1;
        assert!(matches!(
            grow(&mut d, 0, 1 << 29),
            Err(ExfatError::Checksum)
        ));
        let mut d = fresh(64 * MIB);
        d[3] = b'N';
        assert!(matches!(
            grow(&mut d, 0, 1 << 29),
            Err(ExfatError::Layout(_))
        ));
        // Truncated disks and garbage fail cleanly.
        let mut d = vec![0u8; 100];
        assert!(grow(&mut d, 0, 1 << 29).is_err());
        let mut d = fresh(64 * MIB);
        d.truncate(4 * MIB as usize);
        assert!(matches!(grow(&mut d, 0, 1 << 29), Err(ExfatError::Io(_))));
        let mut junk: Vec<u8> = (0..64 * 1024u32).map(|i| ((i * 7919) >> 3) as u8).collect();
        junk[3..11].copy_from_slice(b"EXFAT   ");
        junk[510] = 0x55;
        junk[511] = 0xAA;
        assert!(grow(&mut junk, 0, 1 << 29).is_err());
    }

    /// A hostile disk: any byte of the boot region (with its checksum made valid again), the
    /// FAT or the root directory changed. grow must answer Ok or Err, never panic.
    #[test]
    fn never_panics_on_mutated_volumes() {
        let o = FormatOptions {
            cluster_shift: 12,
            max_bytes: 16 * MIB,
            ..FormatOptions::default()
        };
        let mut base = vec![0u8; (4 * MIB) as usize];
        format(&mut base, 0, 4 * MIB, &o).unwrap();
        let b = Boot::parse(&base).unwrap();
        let root = b.cluster_offset(b.root_cluster) as usize;
        let fat = (b.fat_offset as usize) * 512;
        let mut x = 0x9E37_79B9u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for i in 0..150 {
            let mut d = base.clone();
            let (at, span) = match i % 3 {
                0 => (0, 120),
                1 => (fat, 64),
                _ => (root, 96),
            };
            for _ in 0..1 + next() % 3 {
                d[at + (next() as usize % span)] = next() as u8;
            }
            let sum = boot_checksum(&d, 512);
            for k in 0..128 {
                d[11 * 512 + 4 * k..11 * 512 + 4 * k + 4].copy_from_slice(&sum.to_le_bytes());
            }
            d.resize((8 * MIB) as usize, 0);
            let _ = grow(&mut d, 0, 8 * MIB);
        }
    }

    #[test]
    fn format_is_deterministic_and_checks_its_options() {
        assert_eq!(fresh(64 * MIB), fresh(64 * MIB));
        let mut d = vec![0u8; (8 * MIB) as usize];
        assert!(format(&mut d, 0, 8 * MIB, &FormatOptions::default()).is_err());
        let o = FormatOptions {
            label: "A LABEL TOO LONG".into(),
            ..FormatOptions::default()
        };
        assert!(format(&mut d, 0, 8 * MIB, &o).is_err());
    }
}
