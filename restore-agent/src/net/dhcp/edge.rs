//! Runs the DHCP [`Client`] for one link over a UDP socket bound to that link, and applies
//! leases (address, default route) through rtnetlink.
//!
//! A UDP socket on 0.0.0.0:68 with SO_BINDTODEVICE and SO_BROADCAST is enough on Linux: we set
//! the broadcast flag until bound, so replies reach us before the interface has an address.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket as StdUdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::client::{Client, ClientConfig, Destination, Lease, Output};
use super::wire::{self, Message};
use crate::net::rtnl::{Link, Rtnl};
use crate::net::NetError;

/// What a link's DHCP task tells the orchestrator (after applying it to the kernel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    Bound { index: u32, lease: Lease },
    Renewed { index: u32, lease: Lease },
    Lost { index: u32 },
}

/// Route metric: several wired links may each have a default route; the lower index wins and
/// the others stay as fallbacks.
fn metric(index: u32) -> u32 {
    100 + index
}

fn setsockopt_int(fd: &OwnedFd, opt: libc::c_int, v: libc::c_int) -> std::io::Result<()> {
    // SAFETY: v lives for the call; the length matches its type.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The client socket for one link.
pub fn bind_socket(link: &str) -> std::io::Result<UdpSocket> {
    // SAFETY: plain socket(2); checked before being owned.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Several links each have a socket on port 68; SO_BINDTODEVICE keeps them apart.
    setsockopt_int(&fd, libc::SO_REUSEADDR, 1)?;
    setsockopt_int(&fd, libc::SO_BROADCAST, 1)?;
    let name = link.as_bytes();
    // SAFETY: name is valid for its length; the kernel copies it.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            name.len() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let std = unsafe {
        // SAFETY: ownership of the descriptor moves into the std socket.
        StdUdpSocket::from_raw_fd(fd.into_raw_fd())
    };
    let sa = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, wire::CLIENT_PORT);
    // bind(2) on the already-created socket, through the std type.
    bind_std(&std, sa)?;
    UdpSocket::from_std(std)
}

fn bind_std(s: &StdUdpSocket, sa: SocketAddrV4) -> std::io::Result<()> {
    // SAFETY: sockaddr_in is plain data; zeroed is valid, then filled in.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_port = sa.port().to_be();
    addr.sin_addr.s_addr = u32::from(*sa.ip()).to_be();
    // SAFETY: addr is a valid sockaddr_in of the given length.
    let r = unsafe {
        libc::bind(
            s.as_raw_fd(),
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn apply(rtnl: &mut Rtnl, index: u32, old: Option<&Lease>, new: &Lease) -> Result<(), NetError> {
    if let Some(old) = old {
        if old.address != new.address || old.prefix_len != new.prefix_len {
            remove(rtnl, index, old);
        }
    }
    rtnl.add_address(index, new.address, new.prefix_len)?;
    if let Some(gw) = new.routers.first() {
        rtnl.replace_default_route(index, *gw, metric(index))?;
    }
    Ok(())
}

fn remove(rtnl: &mut Rtnl, index: u32, lease: &Lease) {
    if let Some(gw) = lease.routers.first() {
        // The kernel drops the route with the address; a failure here only means it is gone.
        let _ = rtnl.del_default_route(index, *gw, metric(index));
    }
    if let Err(e) = rtnl.del_address(index, lease.address, lease.prefix_len) {
        tracing::debug!("removing the old DHCP address: {e}");
    }
}

/// Runs DHCP on `link` until the task is aborted (link gone or carrier lost) or the socket
/// fails. The lease stays applied when aborted; the orchestrator removes it.
pub async fn run(
    link: Link,
    xid_seed: u32,
    renew_cap: Option<std::time::Duration>,
    events: mpsc::UnboundedSender<LeaseEvent>,
) -> Result<(), NetError> {
    let mac = link.mac.ok_or_else(|| NetError::NoMac(link.name.clone()))?;
    let sock = bind_socket(&link.name).map_err(|e| NetError::DhcpSocket(link.name.clone(), e))?;
    let mut rtnl = Rtnl::open()?;
    let mut cfg = ClientConfig::new(mac, xid_seed);
    cfg.renew_cap = renew_cap;
    let mut client = Client::new(cfg, Instant::now());
    let mut buf = vec![0u8; 1500];
    let server = |d: Destination| match d {
        Destination::Broadcast => SocketAddrV4::new(Ipv4Addr::BROADCAST, wire::SERVER_PORT),
        Destination::Unicast(a) => SocketAddrV4::new(a, wire::SERVER_PORT),
    };
    let index = link.index;
    loop {
        while let Some(out) = client.poll_output() {
            match out {
                Output::Transmit(m, d) => {
                    tracing::debug!(link = %link.name, ty = ?m.options.message_type, to = ?d, "DHCP send");
                    if let Err(e) = sock.send_to(&m.emit(), server(d)).await {
                        // ENETUNREACH while a cable settles: the retransmission timer retries.
                        tracing::debug!(link = %link.name, "DHCP send failed: {e}");
                    }
                }
                Output::Bound(lease) => {
                    tracing::info!(link = %link.name, address = %lease.address, prefix = lease.prefix_len, "DHCP lease");
                    apply(&mut rtnl, index, None, &lease)?;
                    let _ = events.send(LeaseEvent::Bound { index, lease });
                }
                Output::Renewed(lease) => {
                    tracing::info!(link = %link.name, address = %lease.address, "DHCP lease renewed");
                    apply(&mut rtnl, index, None, &lease)?;
                    let _ = events.send(LeaseEvent::Renewed { index, lease });
                }
                Output::Lost(why) => {
                    tracing::warn!(link = %link.name, "DHCP lease lost: {why}");
                    // The client already forgot the lease; ask the orchestrator to clean up.
                    let _ = events.send(LeaseEvent::Lost { index });
                }
            }
        }
        let deadline = client.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let (n, _) = r.map_err(|e| NetError::DhcpSocket(link.name.clone(), e))?;
                match Message::parse(&buf[..n]) {
                    Ok(m) => client.handle_message(Instant::now(), &m),
                    Err(e) => tracing::debug!(link = %link.name, "ignoring a datagram on port 68: {e}"),
                }
            }
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => client.handle_timeout(Instant::now()),
        }
    }
}

/// Removes a lease's address and route (link lost its carrier or the lease ended).
pub fn withdraw(index: u32, lease: &Lease) {
    match Rtnl::open() {
        Ok(mut r) => remove(&mut r, index, lease),
        Err(e) => tracing::warn!("cannot remove the old DHCP address: {e}"),
    }
}
