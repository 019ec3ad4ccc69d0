//! The file systems PID 1 mounts itself (edge).

use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tracing::warn;

/// proc, sysfs, devtmpfs (Debian's kernel does not auto-mount it), devpts, /run and /tmp.
pub fn early() {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let table: [(&str, &str, &str, MsFlags, &str); 6] = [
        ("proc", "/proc", "proc", nosuid, ""),
        ("sysfs", "/sys", "sysfs", nosuid, ""),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            "mode=0755",
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            "gid=5,mode=620,ptmxmode=666",
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=0755",
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=1777",
        ),
    ];
    for (src, target, fstype, flags, data) in table {
        let _ = std::fs::create_dir_all(target);
        match mount(Some(src), target, Some(fstype), flags, Some(data)) {
            // Already there (e.g. a kernel that mounts devtmpfs itself).
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => warn!("cannot mount {fstype} on {target}: {e}"),
        }
    }
}

/// Mount the data partition; no exec, no device nodes: it holds files people copied there.
pub fn data(dev: &Path, fstype: &str, target: &Path) -> nix::Result<()> {
    std::fs::create_dir_all(target).map_err(|_| Errno::EIO)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_NOATIME;
    let data = match fstype {
        // UTF-8 names: IPSW names are ASCII, but people's folders are not.
        "exfat" | "vfat" => Some("iocharset=utf8"),
        _ => None,
    };
    mount(Some(dev), target, Some(fstype), flags, data)
}

/// Unmount for shutdown; fall back to read-only so the file system is at least clean.
/// Returns whether the unmount itself worked.
pub fn release(target: &Path) -> bool {
    if umount2(target, MntFlags::empty()).is_ok() {
        return true;
    }
    let _ = mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    false
}
