//! Route netlink (rtnetlink) without the `ip` binary: the few requests the rescue image needs
//! (links up, addresses, default routes, dumps) and the link/address event stream.
//!
//! Message encoding and decoding are plain functions over bytes (tested without a kernel);
//! [`Rtnl`] and [`RtnlEvents`] are the socket edges.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::NetError;

const NLMSG_HDR: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;

pub const RTM_NEWLINK: u16 = 16;
pub const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;

const IFF_UP: u32 = 0x1;
const IFF_LOOPBACK: u32 = 0x8;
/// The driver reports carrier (IFF_LOWER_UP): a cable is plugged in.
const IFF_LOWER_UP: u32 = 0x1_0000;
const ARPHRD_ETHER: u16 = 1;
const RT_TABLE_MAIN: u8 = 254;
/// `proto dhcp` in `ip route`, so a person can tell our routes from others.
const RTPROT_DHCP: u8 = 16;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

/// Multicast groups for [`RtnlEvents`].
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub up: bool,
    pub carrier: bool,
    pub loopback: bool,
    /// Ethernet-like (ARPHRD_ETHER); Wi-Fi also reports this, see [`Link::is_wired`].
    pub ether: bool,
}

impl Link {
    /// Wired Ethernet by the kernel's naming: Wi-Fi interfaces are named `wl*` (predictable
    /// names) or `wlan*`; the rescue image has no other way to tell without sysfs lookups.
    pub fn is_wired(&self) -> bool {
        self.ether && !self.loopback && !self.name.starts_with("wl")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Link(Link),
    LinkGone(u32),
    AddressesChanged,
}

// ---- encoding ----

fn nlmsg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDR + payload.len();
    let mut b = Vec::with_capacity(align(len));
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(payload);
    b
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

fn attr(b: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    b.extend_from_slice(&(len as u16).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(data);
    b.resize(align(b.len()), 0);
}

fn ifinfomsg(index: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    b[0] = libc::AF_UNSPEC as u8;
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

fn addr_payload(index: u32, addr: Ipv4Addr, prefix_len: u8) -> Vec<u8> {
    let mut b = vec![libc::AF_INET as u8, prefix_len, 0, RT_SCOPE_UNIVERSE];
    b.extend_from_slice(&index.to_ne_bytes());
    attr(&mut b, IFA_LOCAL, &addr.octets());
    attr(&mut b, IFA_ADDRESS, &addr.octets());
    if prefix_len < 31 {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0);
        let bcast = Ipv4Addr::from(u32::from(addr) | !mask);
        attr(&mut b, IFA_BROADCAST, &bcast.octets());
    }
    b
}

fn default_route_payload(index: u32, gateway: Ipv4Addr, metric: u32) -> Vec<u8> {
    let mut b = vec![
        libc::AF_INET as u8,
        0, // dst_len: the default route
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_DHCP,
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
    ];
    b.extend_from_slice(&0u32.to_ne_bytes());
    attr(&mut b, RTA_DST, &[0, 0, 0, 0]);
    attr(&mut b, RTA_GATEWAY, &gateway.octets());
    attr(&mut b, RTA_OIF, &index.to_ne_bytes());
    attr(&mut b, RTA_PRIORITY, &metric.to_ne_bytes());
    b
}

// ---- decoding ----

/// Splits a datagram into (type, payload) messages; stops at the first malformed header.
fn messages(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < NLMSG_HDR || len > b.len() {
            break;
        }
        out.push((u16::from_ne_bytes([b[4], b[5]]), &b[NLMSG_HDR..len]));
        b = &b[align(len).min(b.len())..];
    }
    out
}

fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        if len < 4 || len > b.len() {
            break;
        }
        // Nested/byte-order flags live in the top bits of the type.
        out.push((u16::from_ne_bytes([b[2], b[3]]) & 0x3fff, &b[4..len]));
        b = &b[align(len).min(b.len())..];
    }
    out
}

pub fn parse_link(p: &[u8]) -> Option<Link> {
    if p.len() < 16 {
        return None;
    }
    let ty = u16::from_ne_bytes([p[2], p[3]]);
    let index = u32::from_ne_bytes([p[4], p[5], p[6], p[7]]);
    let flags = u32::from_ne_bytes([p[8], p[9], p[10], p[11]]);
    let mut link = Link {
        index,
        name: String::new(),
        mac: None,
        up: flags & IFF_UP != 0,
        carrier: flags & IFF_LOWER_UP != 0,
        loopback: flags & IFF_LOOPBACK != 0,
        ether: ty == ARPHRD_ETHER,
    };
    for (t, v) in attrs(&p[16..]) {
        match t {
            IFLA_IFNAME => {
                let v = v.split(|&c| c == 0).next().unwrap_or(v);
                link.name = String::from_utf8_lossy(v).into_owned();
            }
            IFLA_ADDRESS => link.mac = <[u8; 6]>::try_from(v).ok(),
            _ => {}
        }
    }
    Some(link)
}

pub fn parse_address(p: &[u8]) -> Option<Address> {
    if p.len() < 8 {
        return None;
    }
    let fam = i32::from(p[0]);
    let prefix_len = p[1];
    let index = u32::from_ne_bytes([p[4], p[5], p[6], p[7]]);
    let mut local = None;
    let mut address = None;
    for (t, v) in attrs(&p[8..]) {
        let a = match (fam, v.len()) {
            (libc::AF_INET, 4) => Some(IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3]))),
            (libc::AF_INET6, 16) => <[u8; 16]>::try_from(v)
                .ok()
                .map(|o| IpAddr::V6(Ipv6Addr::from(o))),
            _ => None,
        };
        match t {
            IFA_LOCAL => local = a,
            IFA_ADDRESS => address = a,
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS otherwise.
    Some(Address {
        index,
        addr: local.or(address)?,
        prefix_len,
    })
}

fn parse_event(ty: u16, p: &[u8]) -> Option<Event> {
    match ty {
        RTM_NEWLINK => parse_link(p).map(Event::Link),
        RTM_DELLINK => parse_link(p).map(|l| Event::LinkGone(l.index)),
        RTM_NEWADDR | RTM_DELADDR => Some(Event::AddressesChanged),
        _ => None,
    }
}

// ---- sockets ----

fn socket(groups: u32, nonblocking: bool) -> io::Result<OwnedFd> {
    let mut ty = libc::SOCK_RAW | libc::SOCK_CLOEXEC;
    if nonblocking {
        ty |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: plain socket(2) call; the result is checked before it is owned.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, ty, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    sa.nl_groups = groups;
    // SAFETY: sa is a valid sockaddr_nl of the given length.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Blocking request/response socket. Requests are quick kernel calls, so async callers may
/// use it directly.
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> Result<Self, NetError> {
        Ok(Self {
            fd: socket(0, false).map_err(|e| NetError::Netlink("open a netlink socket", e))?,
            seq: 1,
        })
    }

    fn request(
        &mut self,
        what: &'static str,
        ty: u16,
        flags: u16,
        payload: &[u8],
    ) -> Result<Vec<Vec<u8>>, NetError> {
        self.seq = self.seq.wrapping_add(1);
        let msg = nlmsg(ty, flags | NLM_F_REQUEST, self.seq, payload);
        // SAFETY: msg is a valid buffer; the kernel is the destination (pid 0, default).
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(NetError::Netlink(what, io::Error::last_os_error()));
        }
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = recv(&self.fd, &mut buf).map_err(|e| NetError::Netlink(what, e))?;
            for (t, p) in messages(&buf[..n]) {
                match t {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = p
                            .get(..4)
                            .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                            .unwrap_or(0);
                        if code == 0 {
                            if !dump {
                                return Ok(out);
                            }
                        } else {
                            return Err(NetError::Netlink(
                                what,
                                io::Error::from_raw_os_error(-code),
                            ));
                        }
                    }
                    _ => out.push(p.to_vec()),
                }
            }
        }
    }

    pub fn links(&mut self) -> Result<Vec<Link>, NetError> {
        let rs = self.request(
            "list network links",
            RTM_GETLINK,
            NLM_F_DUMP,
            &ifinfomsg(0, 0, 0),
        )?;
        Ok(rs.iter().filter_map(|p| parse_link(p)).collect())
    }

    pub fn addresses(&mut self) -> Result<Vec<Address>, NetError> {
        let rs = self.request(
            "list addresses",
            RTM_GETADDR,
            NLM_F_DUMP,
            &[libc::AF_UNSPEC as u8, 0, 0, 0, 0, 0, 0, 0],
        )?;
        Ok(rs.iter().filter_map(|p| parse_address(p)).collect())
    }

    pub fn set_up(&mut self, index: u32) -> Result<(), NetError> {
        self.request(
            "bring a link up",
            RTM_NEWLINK,
            NLM_F_ACK,
            &ifinfomsg(index, IFF_UP, IFF_UP),
        )
        .map(drop)
    }

    pub fn add_address(
        &mut self,
        index: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetError> {
        self.request(
            "add an address",
            RTM_NEWADDR,
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            &addr_payload(index, addr, prefix_len),
        )
        .map(drop)
    }

    pub fn del_address(
        &mut self,
        index: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetError> {
        self.request(
            "remove an address",
            RTM_DELADDR,
            NLM_F_ACK,
            &addr_payload(index, addr, prefix_len),
        )
        .map(drop)
    }

    pub fn replace_default_route(
        &mut self,
        index: u32,
        gateway: Ipv4Addr,
        metric: u32,
    ) -> Result<(), NetError> {
        self.request(
            "set the default route",
            RTM_NEWROUTE,
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            &default_route_payload(index, gateway, metric),
        )
        .map(drop)
    }

    pub fn del_default_route(
        &mut self,
        index: u32,
        gateway: Ipv4Addr,
        metric: u32,
    ) -> Result<(), NetError> {
        self.request(
            "remove the default route",
            RTM_DELROUTE,
            NLM_F_ACK,
            &default_route_payload(index, gateway, metric),
        )
        .map(drop)
    }
}

/// Link and address change notifications.
pub struct RtnlEvents {
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
    buf: Vec<u8>,
}

impl RtnlEvents {
    pub fn open() -> Result<Self, NetError> {
        let fd = socket(RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR, true)
            .map_err(|e| NetError::Netlink("subscribe to link events", e))?;
        Ok(Self {
            // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open (and the same
            // descriptor) for its whole life.
            fd: unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            }
            .map_err(|e| {
                NetError::Netlink("subscribe to link events", io::Error::other(e.to_string()))
            })?,
            buf: vec![0u8; 64 * 1024],
        })
    }

    /// The next batch of events. An overrun (ENOBUFS) is reported as a link change of index 0
    /// so the caller rescans everything.
    pub async fn next(&mut self) -> Result<Vec<Event>, NetError> {
        loop {
            let mut guard = self
                .fd
                .readable()
                .await
                .map_err(|e| NetError::Netlink("read link events", e))?;
            match guard.try_io(|fd| recv(fd.get_ref(), &mut self.buf)) {
                Ok(Ok(n)) => {
                    return Ok(messages(&self.buf[..n])
                        .into_iter()
                        .filter_map(|(t, p)| parse_event(t, p))
                        .collect())
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Ok(vec![Event::LinkGone(0)]);
                }
                Ok(Err(e)) => return Err(NetError::Netlink("read link events", e)),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_route_request_bytes() {
        let p = default_route_payload(3, Ipv4Addr::new(10, 0, 0, 1), 100);
        assert_eq!(&p[..8], &[2, 0, 0, 0, 254, 16, 0, 1]);
        let a = attrs(&p[12..]);
        assert_eq!(a.len(), 4);
        assert_eq!(a[1], (RTA_GATEWAY, &[10u8, 0, 0, 1][..]));
        assert_eq!(a[2], (RTA_OIF, &3u32.to_ne_bytes()[..]));
        assert_eq!(a[3], (RTA_PRIORITY, &100u32.to_ne_bytes()[..]));
    }

    #[test]
    fn address_request_carries_the_broadcast() {
        let p = addr_payload(2, Ipv4Addr::new(192, 168, 1, 20), 24);
        assert_eq!(&p[..4], &[2, 24, 0, 0]);
        let parsed = parse_address(&p).unwrap();
        assert_eq!(
            parsed,
            Address {
                index: 2,
                addr: "192.168.1.20".parse().unwrap(),
                prefix_len: 24
            }
        );
        let a = attrs(&p[8..]);
        assert_eq!(a[2], (IFA_BROADCAST, &[192u8, 168, 1, 255][..]));
    }

    #[test]
    fn parses_a_link_message() {
        let mut p = ifinfomsg(4, IFF_UP | IFF_LOWER_UP, 0);
        p[2..4].copy_from_slice(&ARPHRD_ETHER.to_ne_bytes());
        attr(&mut p, IFLA_IFNAME, b"enp0s1\0");
        attr(&mut p, IFLA_ADDRESS, &[2, 1, 2, 3, 4, 5]);
        let msg = nlmsg(RTM_NEWLINK, 0, 1, &p);
        let ms = messages(&msg);
        assert_eq!(ms.len(), 1);
        let Some(Event::Link(l)) = parse_event(ms[0].0, ms[0].1) else {
            panic!("not a link event");
        };
        assert_eq!(l.name, "enp0s1");
        assert_eq!(l.mac, Some([2, 1, 2, 3, 4, 5]));
        assert!(l.up && l.carrier && l.is_wired());
        let wifi = Link {
            name: "wlan0".into(),
            ..l
        };
        assert!(!wifi.is_wired());
    }

    #[test]
    fn garbage_never_panics() {
        for n in 0..64 {
            let b: Vec<u8> = (0..n).map(|i| (i * 37 + n) as u8).collect();
            for (t, p) in messages(&b) {
                let _ = parse_event(t, p);
            }
            let _ = parse_link(&b);
            let _ = parse_address(&b);
            let _ = attrs(&b);
        }
    }
}
