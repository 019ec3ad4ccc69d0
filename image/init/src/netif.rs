//! Bringing up the loopback interface (edge). Other links belong to the agent's networking.

use std::os::fd::AsRawFd;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// Set `lo` up; the kernel then assigns 127.0.0.1/8 and ::1 to it by itself.
pub fn loopback_up() -> nix::Result<()> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain data; all-zero is a valid value (empty name, no flags).
    let mut req: nix::libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as nix::libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write only the ifreq we pass, which outlives
    // the calls; the socket fd is open.
    unsafe {
        if nix::libc::ioctl(sock.as_raw_fd(), nix::libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            return Err(nix::errno::Errno::last());
        }
        // The ioctl request type is c_ulong on glibc and c_int on musl, hence `as _`.
        req.ifr_ifru.ifru_flags |= (nix::libc::IFF_UP | nix::libc::IFF_RUNNING) as i16;
        if nix::libc::ioctl(sock.as_raw_fd(), nix::libc::SIOCSIFFLAGS as _, &req) < 0 {
            return Err(nix::errno::Errno::last());
        }
    }
    Ok(())
}
