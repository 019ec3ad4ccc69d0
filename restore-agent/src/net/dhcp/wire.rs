//! DHCPv4 messages (RFC 2131/2132) as bytes: parse and emit, symmetric, never panicking.
//!
//! Only the options the rescue image uses are decoded; the rest are skipped. Options split
//! over several instances (RFC 3396) are concatenated before decoding.

use std::net::Ipv4Addr;

use super::DhcpError;

/// Fixed BOOTP header length before the magic cookie.
const HEADER_LEN: usize = 236;
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Ethernet hardware type and address length.
const HTYPE_ETHER: u8 = 1;
const HLEN_ETHER: u8 = 6;
/// Servers must reply to a broadcast address when this flag is set: before it is bound, our
/// UDP socket cannot receive unicast to an address the interface does not have yet.
const FLAG_BROADCAST: u16 = 0x8000;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;

mod code {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const HOSTNAME: u8 = 12;
    pub const DOMAIN: u8 = 15;
    pub const NTP: u8 = 42;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const PARAM_REQUEST: u8 = 55;
    pub const MAX_SIZE: u8 = 57;
    pub const T1: u8 = 58;
    pub const T2: u8 = 59;
    pub const CLIENT_ID: u8 = 61;
    pub const END: u8 = 255;
}

/// The options we ask servers for (option 55).
pub const REQUESTED_PARAMS: [u8; 8] = [
    code::SUBNET_MASK,
    code::ROUTER,
    code::DNS,
    code::DOMAIN,
    code::NTP,
    code::LEASE_TIME,
    code::T1,
    code::T2,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Request,
    Reply,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover,
    Offer,
    Request,
    Decline,
    Ack,
    Nak,
    Release,
    Inform,
}

impl MessageType {
    fn code(self) -> u8 {
        match self {
            Self::Discover => 1,
            Self::Offer => 2,
            Self::Request => 3,
            Self::Decline => 4,
            Self::Ack => 5,
            Self::Nak => 6,
            Self::Release => 7,
            Self::Inform => 8,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            7 => Self::Release,
            8 => Self::Inform,
            _ => return None,
        })
    }
}

/// The options a message carries (the ones we understand).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub message_type: Option<MessageType>,
    pub subnet_mask: Option<Ipv4Addr>,
    pub routers: Vec<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub ntp: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub hostname: Option<String>,
    pub requested_ip: Option<Ipv4Addr>,
    pub lease_time: Option<u32>,
    pub server_id: Option<Ipv4Addr>,
    pub param_request: Vec<u8>,
    pub max_size: Option<u16>,
    pub renewal_time: Option<u32>,
    pub rebinding_time: Option<u32>,
    pub client_id: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub op: Op,
    pub xid: u32,
    pub secs: u16,
    pub broadcast: bool,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: [u8; 6],
    pub options: Options,
}

impl Message {
    /// A client message with every address field zero.
    pub fn request(xid: u32, chaddr: [u8; 6], options: Options) -> Self {
        Self {
            op: Op::Request,
            xid,
            secs: 0,
            broadcast: false,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr,
            options,
        }
    }

    pub fn parse(b: &[u8]) -> Result<Self, DhcpError> {
        if b.len() < HEADER_LEN + MAGIC_COOKIE.len() {
            return Err(DhcpError::Malformed("shorter than a BOOTP header"));
        }
        let op = match b[0] {
            1 => Op::Request,
            2 => Op::Reply,
            _ => return Err(DhcpError::Malformed("unknown op")),
        };
        if b[1] != HTYPE_ETHER || b[2] != HLEN_ETHER {
            return Err(DhcpError::Malformed("not an Ethernet hardware address"));
        }
        if b[HEADER_LEN..HEADER_LEN + 4] != MAGIC_COOKIE {
            return Err(DhcpError::Malformed("no DHCP magic cookie"));
        }
        let u32_at = |o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let ip_at = |o: usize| Ipv4Addr::from(u32_at(o));
        let mut chaddr = [0u8; 6];
        chaddr.copy_from_slice(&b[28..34]);
        Ok(Self {
            op,
            xid: u32_at(4),
            secs: u16::from_be_bytes([b[8], b[9]]),
            broadcast: u16::from_be_bytes([b[10], b[11]]) & FLAG_BROADCAST != 0,
            ciaddr: ip_at(12),
            yiaddr: ip_at(16),
            siaddr: ip_at(20),
            giaddr: ip_at(24),
            chaddr,
            options: parse_options(&b[HEADER_LEN + 4..])?,
        })
    }

    pub fn emit(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0] = match self.op {
            Op::Request => 1,
            Op::Reply => 2,
        };
        b[1] = HTYPE_ETHER;
        b[2] = HLEN_ETHER;
        b[4..8].copy_from_slice(&self.xid.to_be_bytes());
        b[8..10].copy_from_slice(&self.secs.to_be_bytes());
        let flags = if self.broadcast { FLAG_BROADCAST } else { 0 };
        b[10..12].copy_from_slice(&flags.to_be_bytes());
        b[12..16].copy_from_slice(&self.ciaddr.octets());
        b[16..20].copy_from_slice(&self.yiaddr.octets());
        b[20..24].copy_from_slice(&self.siaddr.octets());
        b[24..28].copy_from_slice(&self.giaddr.octets());
        b[28..34].copy_from_slice(&self.chaddr);
        b.extend_from_slice(&MAGIC_COOKIE);
        emit_options(&self.options, &mut b);
        // Some relays and old servers drop BOOTP messages shorter than 300 bytes.
        if b.len() < 300 {
            b.resize(300, code::PAD);
        }
        b
    }
}

fn parse_options(mut b: &[u8]) -> Result<Options, DhcpError> {
    // Concatenate split options (RFC 3396) per code before decoding them.
    let mut raw: Vec<(u8, Vec<u8>)> = Vec::new();
    while let Some((&c, rest)) = b.split_first() {
        match c {
            code::PAD => b = rest,
            code::END => break,
            _ => {
                let (&len, rest) = rest
                    .split_first()
                    .ok_or(DhcpError::Malformed("option without a length"))?;
                let len = usize::from(len);
                if rest.len() < len {
                    return Err(DhcpError::Malformed("option runs past the message"));
                }
                match raw.iter_mut().find(|(k, _)| *k == c) {
                    Some((_, v)) => v.extend_from_slice(&rest[..len]),
                    None => raw.push((c, rest[..len].to_vec())),
                }
                b = &rest[len..];
            }
        }
    }
    let mut o = Options::default();
    for (c, v) in raw {
        match c {
            code::MESSAGE_TYPE => {
                o.message_type = v.first().and_then(|&t| MessageType::from_code(t))
            }
            code::SUBNET_MASK => o.subnet_mask = ip(&v),
            code::ROUTER => o.routers = ips(&v),
            code::DNS => o.dns = ips(&v),
            code::NTP => o.ntp = ips(&v),
            code::DOMAIN => o.domain = text(&v),
            code::HOSTNAME => o.hostname = text(&v),
            code::REQUESTED_IP => o.requested_ip = ip(&v),
            code::LEASE_TIME => o.lease_time = be32(&v),
            code::SERVER_ID => o.server_id = ip(&v),
            code::PARAM_REQUEST => o.param_request = v,
            code::MAX_SIZE => o.max_size = (v.len() == 2).then(|| u16::from_be_bytes([v[0], v[1]])),
            code::T1 => o.renewal_time = be32(&v),
            code::T2 => o.rebinding_time = be32(&v),
            code::CLIENT_ID => o.client_id = v,
            _ => {}
        }
    }
    Ok(o)
}

fn be32(v: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(v).ok().map(u32::from_be_bytes)
}

fn ip(v: &[u8]) -> Option<Ipv4Addr> {
    be32(v).map(Ipv4Addr::from)
}

fn ips(v: &[u8]) -> Vec<Ipv4Addr> {
    v.chunks_exact(4)
        .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
        .collect()
}

fn text(v: &[u8]) -> Option<String> {
    // Some servers include the C string terminator.
    let v = v.strip_suffix(&[0]).unwrap_or(v);
    std::str::from_utf8(v).ok().map(str::to_owned)
}

fn emit_options(o: &Options, b: &mut Vec<u8>) {
    let mut put = |c: u8, v: &[u8]| {
        // Long values are split into several instances of the same option (RFC 3396).
        for chunk in v.chunks(255) {
            b.push(c);
            b.push(chunk.len() as u8); // chunks(255) bounds the length
            b.extend_from_slice(chunk);
        }
    };
    let flat = |v: &[Ipv4Addr]| v.iter().flat_map(|a| a.octets()).collect::<Vec<_>>();
    if let Some(t) = o.message_type {
        put(code::MESSAGE_TYPE, &[t.code()]);
    }
    if !o.client_id.is_empty() {
        put(code::CLIENT_ID, &o.client_id);
    }
    if let Some(a) = o.requested_ip {
        put(code::REQUESTED_IP, &a.octets());
    }
    if let Some(a) = o.server_id {
        put(code::SERVER_ID, &a.octets());
    }
    if let Some(t) = o.lease_time {
        put(code::LEASE_TIME, &t.to_be_bytes());
    }
    if let Some(t) = o.renewal_time {
        put(code::T1, &t.to_be_bytes());
    }
    if let Some(t) = o.rebinding_time {
        put(code::T2, &t.to_be_bytes());
    }
    if let Some(a) = o.subnet_mask {
        put(code::SUBNET_MASK, &a.octets());
    }
    for (c, v) in [
        (code::ROUTER, &o.routers),
        (code::DNS, &o.dns),
        (code::NTP, &o.ntp),
    ] {
        if !v.is_empty() {
            put(c, &flat(v));
        }
    }
    if let Some(d) = &o.domain {
        put(code::DOMAIN, d.as_bytes());
    }
    if let Some(h) = &o.hostname {
        put(code::HOSTNAME, h.as_bytes());
    }
    if !o.param_request.is_empty() {
        put(code::PARAM_REQUEST, &o.param_request);
    }
    if let Some(m) = o.max_size {
        put(code::MAX_SIZE, &m.to_be_bytes());
    }
    b.push(code::END);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        let mut m = Message::request(
            0xdead_beef,
            [2, 0, 0, 0, 0, 1],
            Options {
                message_type: Some(MessageType::Ack),
                subnet_mask: Some(Ipv4Addr::new(255, 255, 255, 0)),
                routers: vec![Ipv4Addr::new(10, 0, 0, 1)],
                dns: vec![Ipv4Addr::new(10, 0, 0, 53), Ipv4Addr::new(9, 9, 9, 9)],
                ntp: vec![Ipv4Addr::new(10, 0, 0, 123)],
                domain: Some("lab.example".into()),
                lease_time: Some(3600),
                renewal_time: Some(1800),
                rebinding_time: Some(3150),
                server_id: Some(Ipv4Addr::new(10, 0, 0, 1)),
                ..Options::default()
            },
        );
        m.op = Op::Reply;
        m.yiaddr = Ipv4Addr::new(10, 0, 0, 42);
        m.broadcast = true;
        m
    }

    #[test]
    fn emit_then_parse_is_identity() {
        let m = sample();
        let b = m.emit();
        assert_eq!(Message::parse(&b).unwrap(), m);
    }

    #[test]
    fn emits_exact_header_bytes() {
        let b = sample().emit();
        assert_eq!(&b[..4], &[2, 1, 6, 0]);
        assert_eq!(&b[4..8], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(&b[10..12], &[0x80, 0]);
        assert_eq!(&b[16..20], &[10, 0, 0, 42]);
        assert_eq!(&b[236..240], &MAGIC_COOKIE);
        // The message type comes first: some servers look only there.
        assert_eq!(&b[240..243], &[53, 1, 5]);
        assert!(b.len() >= 300);
    }

    #[test]
    fn split_options_are_joined() {
        let mut b = sample().emit();
        b.truncate(240);
        b.extend_from_slice(&[6, 4, 1, 1, 1, 1, 0, 6, 4, 8, 8, 8, 8, 255]);
        let m = Message::parse(&b).unwrap();
        assert_eq!(
            m.options.dns,
            vec![Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(8, 8, 8, 8)]
        );
    }

    #[test]
    fn long_option_round_trips() {
        let mut m = sample();
        m.options.domain = Some("d".repeat(300));
        let b = m.emit();
        assert_eq!(Message::parse(&b).unwrap(), m);
    }

    #[test]
    fn rejects_bad_input_without_panicking() {
        assert!(matches!(Message::parse(&[]), Err(DhcpError::Malformed(_))));
        let mut b = sample().emit();
        b[236] = 0;
        assert!(matches!(Message::parse(&b), Err(DhcpError::Malformed(_))));
        let mut b = sample().emit();
        b.truncate(240);
        b.extend_from_slice(&[6, 8, 1, 2]);
        assert!(matches!(Message::parse(&b), Err(DhcpError::Malformed(_))));
        // Every truncation and every single-byte corruption must be an error or a value.
        let full = sample().emit();
        for n in 0..full.len() {
            let _ = Message::parse(&full[..n]);
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut c = full.clone();
                c[n] = v;
                let _ = Message::parse(&c);
            }
        }
    }

    #[test]
    fn odd_length_address_lists_drop_the_tail() {
        let mut b = sample().emit();
        b.truncate(240);
        b.extend_from_slice(&[3, 5, 10, 0, 0, 1, 7, 51, 3, 0, 0, 1, 255]);
        let m = Message::parse(&b).unwrap();
        assert_eq!(m.options.routers, vec![Ipv4Addr::new(10, 0, 0, 1)]);
        assert_eq!(m.options.lease_time, None);
    }
}
