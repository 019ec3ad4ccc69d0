//! Other USB disks as IPSW sources (issue #5 §3): every USB mass-storage partition that is not
//! on the station's own stick is mounted read-only at `/media/<dev>` when it appears and
//! unmounted when it goes; the station looks for `*.ipsw` there (`--ipsw-dir /media`).
//!
//! Read-only because a technician's disk is theirs: the station never writes to it, and a disk
//! pulled without warning cannot be left damaged. The decision ([`classify`],
//! [`on_station_disk`], [`detect_fs`]) is pure; [`Media`] is the edge that mounts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tracing::{info, warn};

use crate::datapart::{self, Partition};
use crate::uevent::Uevent;

pub const MEDIA_DIR: &str = "/media";

/// What a kernel uevent means for `/media`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaEvent {
    /// A USB block device appeared: look for a file system on it.
    Probe {
        devname: String,
        /// The whole disk (`sdb` for `sdb1`; itself for a disk without partitions).
        disk: String,
    },
    /// A block device went away: unmount it if it was ours.
    Gone { devname: String },
}

/// Classifies a uevent. `data_label` is the station's own data partition (never touched here).
pub fn classify(ev: &Uevent, data_label: Option<&str>) -> Option<MediaEvent> {
    if ev.get("SUBSYSTEM") != Some("block") {
        return None;
    }
    let devname = ev.get("DEVNAME").filter(|d| is_plain_name(d))?.to_string();
    match ev.action.as_str() {
        "remove" => Some(MediaEvent::Gone { devname }),
        "add" => {
            // USB mass storage hangs below a USB interface in sysfs; NVMe, SATA, loop, zram and
            // the like do not and are no technician's IPSW disk.
            if !ev.devpath.split('/').any(|c| c.starts_with("usb")) {
                return None;
            }
            let partname = ev.get("PARTNAME");
            if let (Some(p), Some(l)) = (partname, data_label) {
                if p.eq_ignore_ascii_case(l) {
                    return None;
                }
            }
            let disk = match ev.get("DEVTYPE")? {
                "disk" => devname.clone(),
                // …/block/sdb/sdb1: the parent directory is the disk.
                "partition" => {
                    let mut parts = ev.devpath.rsplit('/');
                    parts.next();
                    parts.next().filter(|d| is_plain_name(d))?.to_string()
                }
                _ => return None,
            };
            Some(MediaEvent::Probe { devname, disk })
        }
        _ => None,
    }
}

/// A device name that is safe as one path component (`sdb1`, not `../x`).
fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `disk` is the station's own stick: one of its partitions carries the data label.
/// Its ESP (and the data partition) must not show up as an IPSW source.
pub fn on_station_disk(parts: &[Partition], disk: &str, data_label: Option<&str>) -> bool {
    let Some(label) = data_label else {
        return false;
    };
    parts.iter().any(|p| {
        is_partition_of(&p.devname, disk)
            && p.partname
                .as_deref()
                .is_some_and(|n| n.eq_ignore_ascii_case(label))
    })
}

/// `sdb1` and `mmcblk0p1`/`nvme0n1p2` are partitions of `sdb`/`mmcblk0`/`nvme0n1`.
pub fn is_partition_of(devname: &str, disk: &str) -> bool {
    let Some(rest) = devname.strip_prefix(disk) else {
        return false;
    };
    let digits = rest.strip_prefix('p').unwrap_or(rest);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// The file system on a device from its first 4 KiB: what the data partition accepts, plus
/// NTFS (Windows disks; mounted with the kernel's ntfs3 when the image has it).
pub fn detect_fs(head: &[u8]) -> Option<&'static str> {
    if head.get(3..11) == Some(b"NTFS    ") {
        return Some("ntfs3");
    }
    datapart::detect_fs(head)
}

/// Mount options: read-only, nothing executable, UTF-8 names; ext4's journal is not replayed
/// (that would write to the disk).
pub fn mount_options(fstype: &str) -> Option<&'static str> {
    match fstype {
        "exfat" | "vfat" => Some("iocharset=utf8"),
        "ntfs3" => Some("iocharset=utf8"),
        "ext4" => Some("noload"),
        _ => None,
    }
}

/// The edge: mounts and unmounts, remembering what it mounted.
pub struct Media {
    root: PathBuf,
    data_label: Option<String>,
    mounted: Mutex<BTreeMap<String, PathBuf>>,
}

impl Media {
    pub fn new(data_label: Option<String>) -> Self {
        Self {
            root: PathBuf::from(MEDIA_DIR),
            data_label,
            mounted: Mutex::new(BTreeMap::new()),
        }
    }

    /// Acts on one uevent (called from the hotplug thread).
    pub fn handle(&self, ev: &Uevent) {
        match classify(ev, self.data_label.as_deref()) {
            Some(MediaEvent::Probe { devname, disk }) => self.probe(&devname, &disk),
            Some(MediaEvent::Gone { devname }) => self.gone(&devname),
            None => {}
        }
    }

    fn probe(&self, devname: &str, disk: &str) {
        let parts = datapart::scan(Path::new("/sys/class/block"));
        if on_station_disk(&parts, disk, self.data_label.as_deref()) {
            return;
        }
        let dev = Path::new("/dev").join(devname);
        let mut head = vec![0u8; 4096];
        let n = match std::fs::File::open(&dev).and_then(|mut f| {
            use std::io::Read;
            f.read(&mut head)
        }) {
            Ok(n) => n,
            // A card reader without a card, or a disk already gone.
            Err(_) => return,
        };
        let Some(fstype) = detect_fs(&head[..n]) else {
            return;
        };
        let target = self.root.join(devname);
        let _ = std::fs::create_dir_all(&target);
        let flags = MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC
            | MsFlags::MS_NOATIME;
        match mount(
            Some(&dev),
            &target,
            Some(fstype),
            flags,
            mount_options(fstype),
        ) {
            Ok(()) => {
                info!(
                    "USB disk {} ({fstype}) mounted read-only at {}: its *.ipsw are offered to the station",
                    dev.display(),
                    target.display()
                );
                if let Ok(mut m) = self.mounted.lock() {
                    m.insert(devname.to_string(), target);
                }
            }
            Err(e) => {
                let _ = std::fs::remove_dir(&target);
                let next = if e == nix::errno::Errno::ENODEV {
                    "this image's kernel cannot read it; copy the IPSW to an exFAT disk"
                } else {
                    "check the disk on another computer"
                };
                warn!(
                    "cannot mount the USB disk {} ({fstype}): {e}; {next}",
                    dev.display()
                );
            }
        }
    }

    fn gone(&self, devname: &str) {
        let Some(target) = self.mounted.lock().ok().and_then(|mut m| m.remove(devname)) else {
            return;
        };
        // The device is already gone: detach so a station still reading a file cannot block it.
        match umount2(&target, MntFlags::MNT_DETACH) {
            Ok(()) => info!(
                "USB disk /dev/{devname} removed; unmounted {}",
                target.display()
            ),
            Err(e) => warn!("cannot unmount {}: {e}", target.display()),
        }
        let _ = std::fs::remove_dir(&target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(msg: &str) -> Uevent {
        Uevent::parse(msg.replace('|', "\0").as_bytes()).unwrap()
    }

    const USB: &str =
        "/devices/pci0000:00/0000:00:04.0/usb2/2-1/2-1:1.0/host1/target1:0:0/1:0:0:0/block";

    #[test]
    fn usb_partitions_and_whole_disks_are_probed() {
        let part = ev(&format!(
            "add@{USB}/sdb/sdb1|ACTION=add|SUBSYSTEM=block|DEVTYPE=partition|DEVNAME=sdb1|PARTN=1|PARTNAME=Basic data partition"
        ));
        assert_eq!(
            classify(&part, Some("MACRESCUE")),
            Some(MediaEvent::Probe {
                devname: "sdb1".into(),
                disk: "sdb".into()
            })
        );
        // A stick formatted without a partition table.
        let disk = ev(&format!(
            "add@{USB}/sdc|ACTION=add|SUBSYSTEM=block|DEVTYPE=disk|DEVNAME=sdc"
        ));
        assert_eq!(
            classify(&disk, None),
            Some(MediaEvent::Probe {
                devname: "sdc".into(),
                disk: "sdc".into()
            })
        );
        let gone = ev(&format!(
            "remove@{USB}/sdb/sdb1|ACTION=remove|SUBSYSTEM=block|DEVTYPE=partition|DEVNAME=sdb1"
        ));
        assert_eq!(
            classify(&gone, Some("MACRESCUE")),
            Some(MediaEvent::Gone {
                devname: "sdb1".into()
            })
        );
    }

    #[test]
    fn the_station_disk_and_non_usb_devices_are_left_alone() {
        let data = ev(&format!(
            "add@{USB}/sda/sda2|ACTION=add|SUBSYSTEM=block|DEVTYPE=partition|DEVNAME=sda2|PARTNAME=macrescue"
        ));
        assert_eq!(classify(&data, Some("MACRESCUE")), None);
        let nvme = ev("add@/devices/pci0000:00/0000:00:1d.0/nvme/nvme0/nvme0n1/nvme0n1p1|ACTION=add|SUBSYSTEM=block|DEVTYPE=partition|DEVNAME=nvme0n1p1");
        assert_eq!(classify(&nvme, None), None);
        let lp = ev("add@/devices/virtual/block/loop0|ACTION=add|SUBSYSTEM=block|DEVTYPE=disk|DEVNAME=loop0");
        assert_eq!(classify(&lp, None), None);
        let iface = ev("add@/devices/pci0000:00/usb2/2-1/2-1:1.0|ACTION=add|SUBSYSTEM=usb|DEVTYPE=usb_interface");
        assert_eq!(classify(&iface, None), None);
        let change = ev(&format!(
            "change@{USB}/sdb|ACTION=change|SUBSYSTEM=block|DEVTYPE=disk|DEVNAME=sdb"
        ));
        assert_eq!(classify(&change, None), None);
        // A name that would climb out of /media is refused.
        let evil = ev(&format!(
            "add@{USB}/sdb/..|ACTION=add|SUBSYSTEM=block|DEVTYPE=disk|DEVNAME=.."
        ));
        assert_eq!(classify(&evil, None), None);

        // The stick's ESP: its sibling is the data partition.
        let parts = vec![
            Partition {
                devname: "sda1".into(),
                partname: Some("ESP".into()),
            },
            Partition {
                devname: "sda2".into(),
                partname: Some("MACRESCUE".into()),
            },
            Partition {
                devname: "sdb1".into(),
                partname: Some("MACRESCUE-old".into()),
            },
        ];
        assert!(on_station_disk(&parts, "sda", Some("macrescue")));
        assert!(!on_station_disk(&parts, "sdb", Some("macrescue")));
        assert!(!on_station_disk(&parts, "sda", None));
    }

    #[test]
    fn partition_names_belong_to_their_disk() {
        assert!(is_partition_of("sdb1", "sdb"));
        assert!(is_partition_of("sdb12", "sdb"));
        assert!(is_partition_of("mmcblk0p1", "mmcblk0"));
        assert!(!is_partition_of("sdb", "sdb"));
        assert!(!is_partition_of("sdba1", "sdb"));
        assert!(!is_partition_of("sda1", "sdb"));
        assert!(!is_partition_of("sdbp", "sdb"));
    }

    #[test]
    fn file_systems_and_their_read_only_options() {
        let mut ntfs = vec![0u8; 4096];
        ntfs[3..11].copy_from_slice(b"NTFS    ");
        assert_eq!(detect_fs(&ntfs), Some("ntfs3"));
        let mut exfat = vec![0u8; 4096];
        exfat[3..11].copy_from_slice(b"EXFAT   ");
        assert_eq!(detect_fs(&exfat), Some("exfat"));
        let mut ext4 = vec![0u8; 4096];
        ext4[1080..1082].copy_from_slice(&[0x53, 0xEF]);
        assert_eq!(detect_fs(&ext4), Some("ext4"));
        // A partition table alone (protective MBR) is no file system.
        let mut mbr = vec![0u8; 512];
        mbr[510..512].copy_from_slice(&[0x55, 0xAA]);
        assert_eq!(detect_fs(&mbr), None);
        assert_eq!(detect_fs(&[]), None);
        assert_eq!(mount_options("ext4"), Some("noload"));
        assert_eq!(mount_options("exfat"), Some("iocharset=utf8"));
        assert_eq!(mount_options("btrfs"), None);
    }
}
