//! Block-device ioctls the data-partition growth needs (edge).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `BLKPG` (`_IO(0x12, 105)`) and its resize operation (linux/blkpg.h).
const BLKPG: nix::libc::c_ulong = 0x1269;
const BLKPG_RESIZE_PARTITION: i32 = 3;

#[repr(C)]
struct BlkpgPartition {
    start: i64,
    length: i64,
    pno: i32,
    devname: [u8; 64],
    volname: [u8; 64],
}

#[repr(C)]
struct BlkpgIoctlArg {
    op: i32,
    flags: i32,
    datalen: i32,
    data: *mut BlkpgPartition,
}

/// Open a block device for reading and writing.
pub fn open_rw(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
}

/// Tell the kernel partition `number` of `disk` now has `length` bytes from `start`, without
/// re-reading the whole table (which fails while any partition of the disk is in use).
pub fn resize_partition(disk: &File, number: u32, start: u64, length: u64) -> std::io::Result<()> {
    let too_big = || std::io::Error::from(std::io::ErrorKind::InvalidInput);
    let mut part = BlkpgPartition {
        start: i64::try_from(start).map_err(|_| too_big())?,
        length: i64::try_from(length).map_err(|_| too_big())?,
        pno: i32::try_from(number).map_err(|_| too_big())?,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as i32,
        data: &mut part,
    };
    // SAFETY: BLKPG reads a blkpg_ioctl_arg whose data points at a blkpg_partition of datalen
    // bytes; both live on this stack frame for the duration of the call.
    let rc = unsafe { nix::libc::ioctl(disk.as_raw_fd(), BLKPG as _, &mut arg) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
