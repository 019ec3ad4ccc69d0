//! Finding and mounting the data partition (IPSW cache, reports, logs, config).
//!
//! The image's second GPT partition is named `MACRESCUE` and formatted exFAT, so a person can
//! fill it from Windows or macOS (files over 4 GiB). We find it by the GPT partition name the
//! kernel publishes (`PARTNAME` in the partition's uevent), which survives reformatting, and
//! mount it with the file system its first sectors show.

use std::path::{Path, PathBuf};

/// A partition in `/sys/class/block`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// `sda2` (the node is `/dev/sda2`).
    pub devname: String,
    pub partname: Option<String>,
}

/// `KEY=VALUE` lines of a sysfs `uevent` file.
pub fn parse_sysfs_uevent(text: &str) -> Vec<(&str, &str)> {
    text.lines().filter_map(|l| l.split_once('=')).collect()
}

/// The partition described by a sysfs `uevent` file, if it is one.
pub fn partition_from_uevent(text: &str) -> Option<Partition> {
    let vars = parse_sysfs_uevent(text);
    let get = |k: &str| vars.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    if get("DEVTYPE") != Some("partition") {
        return None;
    }
    Some(Partition {
        devname: get("DEVNAME")?.to_string(),
        partname: get("PARTNAME").map(str::to_string),
    })
}

/// The first partition whose GPT name is `label` (ASCII case-insensitive, as people type it).
pub fn select<'a>(parts: &'a [Partition], label: &str) -> Option<&'a Partition> {
    parts.iter().find(|p| {
        p.partname
            .as_deref()
            .is_some_and(|n| n.eq_ignore_ascii_case(label))
    })
}

/// The kernel file-system type to mount, from the first 2 KiB of the partition.
pub fn detect_fs(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(3, b"EXFAT   ") {
        Some("exfat")
    } else if at(82, b"FAT32   ") || at(54, b"FAT16   ") || at(54, b"FAT12   ") {
        Some("vfat")
    } else if at(1024 + 56, &[0x53, 0xEF]) {
        Some("ext4")
    } else {
        None
    }
}

/// Every partition the kernel knows now (edge: reads sysfs).
pub fn scan(sys_class_block: &Path) -> Vec<Partition> {
    let Ok(dir) = std::fs::read_dir(sys_class_block) else {
        return Vec::new();
    };
    let mut parts: Vec<Partition> = dir
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("uevent")).ok())
        .filter_map(|t| partition_from_uevent(&t))
        .collect();
    parts.sort_by(|a, b| a.devname.cmp(&b.devname));
    parts
}

/// Ask every SCSI host (USB sticks are SCSI hosts) to scan for devices again (edge: sysfs).
///
/// The image boots with `usb-storage.delay_use=0`, so the stick is probed the moment it
/// enumerates instead of a second later; a stick that is not ready that early answers nothing
/// and gets no disk. A rescan (what the kernel's delayed scan would have been) finds it then.
/// Hosts whose devices are already there are unaffected. Returns how many hosts were asked.
pub fn rescan_scsi_hosts(sys_class_scsi_host: &Path) -> usize {
    let Ok(dir) = std::fs::read_dir(sys_class_scsi_host) else {
        return 0;
    };
    dir.flatten()
        .filter(|e| std::fs::write(e.path().join("scan"), "- - -").is_ok())
        .count()
}

/// `/dev/NAME` for a partition.
pub fn node(p: &Partition) -> PathBuf {
    Path::new("/dev").join(&p.devname)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_partition_by_gpt_name() {
        let esp =
            "MAJOR=8\nMINOR=1\nDEVNAME=sda1\nDEVTYPE=partition\nDISKSEQ=9\nPARTN=1\nPARTNAME=ESP\n";
        let data =
            "MAJOR=8\nMINOR=2\nDEVNAME=sda2\nDEVTYPE=partition\nPARTN=2\nPARTNAME=MACRESCUE\n";
        let disk = "MAJOR=8\nMINOR=0\nDEVNAME=sda\nDEVTYPE=disk\n";
        assert_eq!(partition_from_uevent(disk), None);
        let parts: Vec<_> = [esp, data]
            .iter()
            .filter_map(|t| partition_from_uevent(t))
            .collect();
        assert_eq!(
            select(&parts, "macrescue"),
            Some(&Partition {
                devname: "sda2".into(),
                partname: Some("MACRESCUE".into())
            })
        );
        assert_eq!(select(&parts, "OTHER"), None);
        assert_eq!(node(&parts[1]), PathBuf::from("/dev/sda2"));
        assert_eq!(partition_from_uevent("DEVTYPE=partition\n"), None);
    }

    #[test]
    fn detects_file_systems_by_their_magic() {
        let mut exfat = vec![0u8; 2048];
        exfat[3..11].copy_from_slice(b"EXFAT   ");
        assert_eq!(detect_fs(&exfat), Some("exfat"));
        let mut fat32 = vec![0u8; 512];
        fat32[82..90].copy_from_slice(b"FAT32   ");
        assert_eq!(detect_fs(&fat32), Some("vfat"));
        let mut ext4 = vec![0u8; 2048];
        ext4[1080..1082].copy_from_slice(&[0x53, 0xEF]);
        assert_eq!(detect_fs(&ext4), Some("ext4"));
        assert_eq!(detect_fs(&[0u8; 2048]), None);
        assert_eq!(detect_fs(&[]), None);
        assert_eq!(detect_fs(&exfat[..8]), None);
    }
}
