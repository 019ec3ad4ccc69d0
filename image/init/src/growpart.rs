//! Growing the data partition to fill the medium: the partition table first ([`crate::gpt`]),
//! then the exFAT file system inside it ([`crate::exfat`]).
//!
//! The two steps are independent and each is a no-op when there is nothing to do, so a boot
//! interrupted between them finishes the job on the next one. [`grow_table`] and [`grow_fs`]
//! work on any [`Disk`] (the init's block devices, `macrescue-datapart grow` on an image file,
//! memory in tests); [`on_boot`] is the init's edge: sysfs, `/dev`, and telling the kernel.

use std::path::Path;

use thiserror::Error;
use tracing::{debug, info, warn};

use crate::blkdev;
use crate::exfat::{self, Disk, ExfatError, Grown, Limit};
use crate::gpt::{self, GptError, Growth};

/// Don't touch the table for less than this: a stick is never exactly the image's size, and a
/// few MiB are not worth a write to the partition table.
pub const MIN_GAIN_BYTES: u64 = 64 << 20;
/// Partition ends stay on 1 MiB boundaries (flash erase blocks).
pub const ALIGN_BYTES: u64 = 1 << 20;

#[derive(Debug, Error)]
pub enum GrowError {
    #[error("cannot read or write {0}: {1}")]
    Io(String, std::io::Error),
    #[error(transparent)]
    Table(#[from] GptError),
    #[error(transparent)]
    Fs(#[from] ExfatError),
    #[error("{0}")]
    Sysfs(String),
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> GrowError + '_ {
    move |e| GrowError::Io(what.to_string(), e)
}

/// Extend partition `label` (GPT name) or, on an MBR disk, partition `number` to the end of a
/// disk of `disk_bytes`, writing the new table to `disk`. `Ok(None)`: already as large as it
/// can usefully get.
pub fn grow_table(
    disk: &mut impl Disk,
    disk_bytes: u64,
    sector: u64,
    label: &str,
    number: Option<u32>,
) -> Result<Option<Growth>, GrowError> {
    let sectors = disk_bytes / sector;
    let mut head = vec![0u8; 2 * sector as usize];
    disk.read_at(0, &mut head)
        .map_err(io("the partition table"))?;
    let (mbr, lba1) = head.split_at(sector as usize);
    let geo = gpt::Geometry {
        disk_sectors: sectors,
        sector_size: sector,
        align: ALIGN_BYTES / sector,
        min_gain: MIN_GAIN_BYTES / sector,
    };
    let plan = match gpt::Header::parse(lba1) {
        Ok(h) => {
            let mut entries = vec![0u8; h.entries_bytes() as usize];
            disk.read_at(h.entries_lba.saturating_mul(sector), &mut entries)
                .map_err(io("the GPT partition entries"))?;
            gpt::plan_gpt(mbr, lba1, &entries, &geo, label)?
        }
        Err(GptError::NoGpt) => match number {
            Some(n) => gpt::plan_mbr(mbr, n, &geo)?,
            None => return Err(GptError::NoGpt.into()),
        },
        Err(e) => return Err(e.into()),
    };
    if let Some(g) = &plan {
        for w in &g.writes {
            disk.write_at(w.offset, &w.data)
                .map_err(io("the partition table"))?;
        }
    }
    Ok(plan)
}

/// Grow the exFAT file system at `base` to `part_bytes`.
pub fn grow_fs(disk: &mut impl Disk, base: u64, part_bytes: u64) -> Result<Grown, GrowError> {
    Ok(exfat::grow(disk, base, part_bytes)?)
}

/// "64.0 MiB", "59.6 GiB": sizes as the console shows them.
pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

/// The console line for a grown file system ([`crate::markers::DATA_GROWN`]).
pub fn describe(g: &Grown, part_bytes: u64) -> String {
    let mut s = format!(
        "{} from {} to {}",
        crate::markers::DATA_GROWN,
        human(g.old_bytes()),
        human(g.new_bytes())
    );
    let why = match g.limit {
        None => None,
        Some(Limit::Fat) => Some("its FAT has no room for more clusters"),
        Some(Limit::Bitmap) => Some("its allocation bitmap has no room for more clusters"),
        Some(Limit::Format) => Some("exFAT allows no more clusters"),
    };
    if let Some(why) = why {
        s += &format!(
            " (the partition is {}; {why}: reformat it with `macrescue-datapart format` to use it all)",
            human(part_bytes)
        );
    }
    s
}

fn sysfs_u64(path: &Path) -> Result<u64, GrowError> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| GrowError::Sysfs(format!("cannot read {}", path.display())))
}

/// The init's first-boot step for partition `devname` (`sda2`), before it is mounted:
/// returns the console line when something grew. Errors leave the partition as it was.
pub fn on_boot(devname: &str, label: &str) -> Result<Option<String>, GrowError> {
    let sys = Path::new("/sys/class/block").join(devname);
    let real = std::fs::canonicalize(&sys)
        .map_err(|_| GrowError::Sysfs(format!("no {}", sys.display())))?;
    let disk_name = real
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .ok_or_else(|| GrowError::Sysfs(format!("no parent disk for {devname}")))?
        .to_string();
    let disk_sys = Path::new("/sys/class/block").join(&disk_name);
    let number = sysfs_u64(&sys.join("partition"))? as u32;
    let start = sysfs_u64(&sys.join("start"))? * 512;
    let disk_bytes = sysfs_u64(&disk_sys.join("size"))? * 512;
    let sector = sysfs_u64(&disk_sys.join("queue/logical_block_size")).unwrap_or(512);
    let disk_dev = Path::new("/dev").join(&disk_name);
    let part_dev = Path::new("/dev").join(devname);

    let mut disk = blkdev::open_rw(&disk_dev).map_err(io(&disk_name))?;
    if let Some(g) = grow_table(&mut disk, disk_bytes, sector, label, Some(number))? {
        if g.number != number || g.first_lba * sector != start {
            // The kernel and the table disagree about which partition this is: stop before
            // the file system is touched. The table is consistent; the next boot re-reads it.
            return Err(GrowError::Sysfs(format!(
                "{devname} is partition {number} at byte {start}, the table says {} at {}",
                g.number,
                g.first_lba * sector
            )));
        }
        disk.sync_all().map_err(io(&disk_name))?;
        info!(
            "partition table: {devname} now ends at sector {} (was {})",
            g.new_last_lba, g.old_last_lba
        );
        if let Err(e) = blkdev::resize_partition(&disk, number, start, g.sectors() * sector) {
            warn!(
                "the kernel did not take the new size of {devname} ({e}); \
                 the file system grows on the next boot"
            );
            return Ok(None);
        }
    }
    drop(disk);
    let part_bytes = sysfs_u64(&sys.join("size"))? * 512;
    let mut part = blkdev::open_rw(&part_dev).map_err(io(devname))?;
    let grown = grow_fs(&mut part, 0, part_bytes)?;
    if !grown.changed() {
        debug!(
            "{devname}: file system already fills what it can ({} clusters)",
            grown.old_clusters
        );
        return Ok(None);
    }
    part.sync_all().map_err(io(devname))?;
    Ok(Some(describe(&grown, part_bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exfat::FormatOptions;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human(64 << 20), "64.0 MiB");
        assert_eq!(human(59_600_000_000), "55.5 GiB");
        assert_eq!(human(100), "100.0 B");
    }

    #[test]
    fn describes_a_limited_growth() {
        let g = Grown {
            cluster_bytes: 1 << 20,
            old_clusters: 54,
            new_clusters: 126,
            limit: Some(Limit::Fat),
        };
        assert_eq!(
            describe(&g, 300 << 20),
            "MACRESCUE: data partition grown from 54.0 MiB to 126.0 MiB (the partition is \
             300.0 MiB; its FAT has no room for more clusters: reformat it with \
             `macrescue-datapart format` to use it all)"
        );
    }

    #[test]
    fn table_then_fs_on_an_mbr_disk() {
        // MBR: partition 1 at 1 MiB, 64 MiB, exFAT; the medium is 512 MiB.
        let mut d = vec![0u8; 512 << 20];
        d[446 + 4] = 0x07;
        d[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        d[446 + 12..446 + 16].copy_from_slice(&131072u32.to_le_bytes());
        d[510] = 0x55;
        d[511] = 0xAA;
        exfat::format(&mut d, 1 << 20, 64 << 20, &FormatOptions::default()).unwrap();
        let g = grow_table(&mut d, 512 << 20, 512, "MACRESCUE", Some(1))
            .unwrap()
            .unwrap();
        assert_eq!(g.new_last_lba, (512 << 11) - 1);
        let grown = grow_fs(&mut d, 1 << 20, g.sectors() * 512).unwrap();
        assert_eq!((grown.old_clusters, grown.new_clusters), (54, 501));
        // Without a partition number an MBR disk is left alone.
        assert!(matches!(
            grow_table(&mut d, 512 << 20, 512, "MACRESCUE", None),
            Err(GrowError::Table(GptError::NoGpt))
        ));
    }
}
