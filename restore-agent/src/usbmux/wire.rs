//! Byte layouts of usbmux packets (protocol.md §6.3–§6.5): the mux header in its two versions,
//! the VERSION and CONTROL payloads and the 20-byte TCP header the mux uses for its connections.
//!
//! Every type here parses from and emits to plain byte slices. Parsing never panics: short or
//! inconsistent input yields a [`WireError`] so the mux can drop the packet and log why.

use thiserror::Error;

/// Size of the version-1 mux header: `protocol u32, length u32`.
pub const MUX_HEADER_V1_LEN: usize = 8;
/// Size of the version-2 mux header: v1 plus `magic u32, tx_seq u16, rx_seq u16`.
pub const MUX_HEADER_V2_LEN: usize = 16;
/// Magic value of every version-2 header.
pub const MUX_MAGIC: u32 = 0xFEED_FACE;
/// Size of the TCP header the mux emulates (no options).
pub const TCP_HEADER_LEN: usize = 20;
/// Data-offset byte of a 20-byte TCP header: five 32-bit words in the upper nibble.
pub const TCP_DATA_OFFSET: u8 = 0x50;
/// Size of the VERSION payload: `major u32, minor u32, padding u32`.
pub const VERSION_PAYLOAD_LEN: usize = 12;
/// The only SETUP payload usbmuxd ever sends (meaning unknown; devices expect it).
pub const SETUP_PAYLOAD: u8 = 0x07;

/// Why bytes could not be read as a usbmux structure.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("{what} needs {needed} bytes but only {got} arrived (truncated USB transfer?)")]
    Truncated {
        what: &'static str,
        needed: usize,
        got: usize,
    },
    #[error(
        "mux header says the packet is {declared} bytes but the transfer held {got}; \
         packet dropped"
    )]
    LengthMismatch { declared: usize, got: usize },
    #[error("mux header length {declared} is shorter than the header itself ({header})")]
    LengthTooSmall { declared: usize, header: usize },
    #[error("TCP data offset byte is {0:#04x}, expected 0x50 (20-byte header without options)")]
    BadDataOffset(u8),
    #[error("CONTROL packet has no payload (no message type byte)")]
    EmptyControl,
}

/// Mux-level protocol numbers (first field of the mux header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Version,
    Control,
    Setup,
    Tcp,
    /// Any other value, kept so unknown packets can be logged by number.
    Other(u32),
}

impl Protocol {
    pub fn from_u32(value: u32) -> Self {
        match value {
            0 => Self::Version,
            1 => Self::Control,
            2 => Self::Setup,
            6 => Self::Tcp,
            other => Self::Other(other),
        }
    }

    pub fn to_u32(self) -> u32 {
        match self {
            Self::Version => 0,
            Self::Control => 1,
            Self::Setup => 2,
            Self::Tcp => 6,
            Self::Other(other) => other,
        }
    }
}

/// Which header layout a packet uses. The host uses V1 for the very first VERSION exchange
/// (neither side knows the other's version yet) and the negotiated one afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderVersion {
    V1,
    V2,
}

impl HeaderVersion {
    pub fn header_len(self) -> usize {
        match self {
            Self::V1 => MUX_HEADER_V1_LEN,
            Self::V2 => MUX_HEADER_V2_LEN,
        }
    }
}

/// A mux header. `magic`, `tx_seq` and `rx_seq` exist only in version 2 headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MuxHeader {
    pub protocol: Protocol,
    /// Total packet length, header included.
    pub length: u32,
    pub v2: Option<MuxSeq>,
}

/// The version-2 additions to the mux header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MuxSeq {
    pub magic: u32,
    pub tx_seq: u16,
    pub rx_seq: u16,
}

impl MuxHeader {
    pub fn version(&self) -> HeaderVersion {
        if self.v2.is_some() {
            HeaderVersion::V2
        } else {
            HeaderVersion::V1
        }
    }

    pub fn header_len(&self) -> usize {
        self.version().header_len()
    }

    /// Reads a header of the given layout from the start of `bytes`.
    pub fn parse(bytes: &[u8], version: HeaderVersion) -> Result<Self, WireError> {
        let needed = version.header_len();
        if bytes.len() < needed {
            return Err(WireError::Truncated {
                what: "mux header",
                needed,
                got: bytes.len(),
            });
        }
        let protocol = Protocol::from_u32(be_u32(bytes, 0));
        let length = be_u32(bytes, 4);
        let v2 = match version {
            HeaderVersion::V1 => None,
            HeaderVersion::V2 => Some(MuxSeq {
                magic: be_u32(bytes, 8),
                tx_seq: be_u16(bytes, 12),
                rx_seq: be_u16(bytes, 14),
            }),
        };
        Ok(Self {
            protocol,
            length,
            v2,
        })
    }

    /// Appends the header's bytes to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.protocol.to_u32().to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
        if let Some(seq) = self.v2 {
            out.extend_from_slice(&seq.magic.to_be_bytes());
            out.extend_from_slice(&seq.tx_seq.to_be_bytes());
            out.extend_from_slice(&seq.rx_seq.to_be_bytes());
        }
    }
}

/// A whole mux packet borrowed from one reassembled USB transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MuxPacket<'a> {
    pub header: MuxHeader,
    pub payload: &'a [u8],
}

impl<'a> MuxPacket<'a> {
    /// Parses a packet that must fill `bytes` exactly: usbmuxd drops any packet whose declared
    /// length differs from what the transfer held, and so do we.
    pub fn parse(bytes: &'a [u8], version: HeaderVersion) -> Result<Self, WireError> {
        let header = MuxHeader::parse(bytes, version)?;
        let declared = header.length as usize;
        if declared < version.header_len() {
            return Err(WireError::LengthTooSmall {
                declared,
                header: version.header_len(),
            });
        }
        if declared != bytes.len() {
            return Err(WireError::LengthMismatch {
                declared,
                got: bytes.len(),
            });
        }
        Ok(Self {
            header,
            payload: &bytes[version.header_len()..],
        })
    }

    /// Builds a complete packet; the header's length is computed from the parts.
    pub fn build(protocol: Protocol, seq: Option<(u16, u16)>, parts: &[&[u8]]) -> Vec<u8> {
        let header_len = if seq.is_some() {
            MUX_HEADER_V2_LEN
        } else {
            MUX_HEADER_V1_LEN
        };
        let body: usize = parts.iter().map(|p| p.len()).sum();
        let total = header_len + body;
        let mut out = Vec::with_capacity(total);
        MuxHeader {
            protocol,
            // Packets are bounded far below 4 GiB by the 49 152-byte transfer limit.
            length: u32::try_from(total).unwrap_or(u32::MAX),
            v2: seq.map(|(tx_seq, rx_seq)| MuxSeq {
                magic: MUX_MAGIC,
                tx_seq,
                rx_seq,
            }),
        }
        .emit(&mut out);
        for part in parts {
            out.extend_from_slice(part);
        }
        out
    }
}

/// VERSION payload, identical in both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionPayload {
    pub major: u32,
    pub minor: u32,
    pub padding: u32,
}

impl VersionPayload {
    pub fn parse(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() < VERSION_PAYLOAD_LEN {
            return Err(WireError::Truncated {
                what: "VERSION payload",
                needed: VERSION_PAYLOAD_LEN,
                got: bytes.len(),
            });
        }
        Ok(Self {
            major: be_u32(bytes, 0),
            minor: be_u32(bytes, 4),
            padding: be_u32(bytes, 8),
        })
    }

    pub fn to_bytes(&self) -> [u8; VERSION_PAYLOAD_LEN] {
        let mut out = [0u8; VERSION_PAYLOAD_LEN];
        out[0..4].copy_from_slice(&self.major.to_be_bytes());
        out[4..8].copy_from_slice(&self.minor.to_be_bytes());
        out[8..12].copy_from_slice(&self.padding.to_be_bytes());
        out
    }
}

/// Severity of a CONTROL message from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlLevel {
    Error,
    Warning,
    Info,
    /// A type byte usbmuxd does not know either.
    Unknown(u8),
}

impl ControlLevel {
    pub fn from_u8(value: u8) -> Self {
        match value {
            3 => Self::Error,
            5 => Self::Warning,
            7 => Self::Info,
            other => Self::Unknown(other),
        }
    }

    pub fn to_u8(self) -> u8 {
        match self {
            Self::Error => 3,
            Self::Warning => 5,
            Self::Info => 7,
            Self::Unknown(other) => other,
        }
    }
}

/// CONTROL payload: one type byte, then free text.
///
/// usbmuxd looks for this payload 16 bytes into the packet whatever the header version; with a
/// v2 header (the only case seen with real devices) that is exactly the payload, so we read it
/// right after the header actually used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPayload {
    pub level: ControlLevel,
    pub text: Vec<u8>,
}

impl ControlPayload {
    pub fn parse(bytes: &[u8]) -> Result<Self, WireError> {
        let (&kind, text) = bytes.split_first().ok_or(WireError::EmptyControl)?;
        Ok(Self {
            level: ControlLevel::from_u8(kind),
            text: text.to_vec(),
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.text.len());
        out.push(self.level.to_u8());
        out.extend_from_slice(&self.text);
        out
    }

    /// The text as a technician should read it: lossy UTF-8 without trailing NULs/newlines.
    pub fn text_lossy(&self) -> String {
        clean_text(&self.text)
    }
}

/// Turns device-supplied text (CONTROL messages, RST reasons) into a printable string: lossy
/// UTF-8, trailing NULs and line breaks removed (usbmuxd strips the one trailing '\n' too).
pub fn clean_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_end_matches(['\0', '\n', '\r'])
        .to_string()
}

/// TCP flags the mux uses. FIN is never used: connections end with RST.
pub mod tcp_flags {
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// The emulated TCP header. `window` is the raw 16-bit field: bytes >> 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpHeader {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
}

impl TcpHeader {
    /// Reads the 20-byte header at the start of `bytes`; the rest is the payload.
    ///
    /// Checksum and urgent pointer are ignored (usbmuxd sends zero and never checks them). A
    /// data offset other than 0x50 would move the payload, so it is rejected.
    pub fn parse(bytes: &[u8]) -> Result<(Self, &[u8]), WireError> {
        if bytes.len() < TCP_HEADER_LEN {
            return Err(WireError::Truncated {
                what: "TCP header",
                needed: TCP_HEADER_LEN,
                got: bytes.len(),
            });
        }
        if bytes[12] != TCP_DATA_OFFSET {
            return Err(WireError::BadDataOffset(bytes[12]));
        }
        let header = Self {
            src_port: be_u16(bytes, 0),
            dst_port: be_u16(bytes, 2),
            seq: be_u32(bytes, 4),
            ack: be_u32(bytes, 8),
            flags: bytes[13],
            window: be_u16(bytes, 14),
        };
        Ok((header, &bytes[TCP_HEADER_LEN..]))
    }

    pub fn to_bytes(&self) -> [u8; TCP_HEADER_LEN] {
        let mut out = [0u8; TCP_HEADER_LEN];
        out[0..2].copy_from_slice(&self.src_port.to_be_bytes());
        out[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
        out[4..8].copy_from_slice(&self.seq.to_be_bytes());
        out[8..12].copy_from_slice(&self.ack.to_be_bytes());
        out[12] = TCP_DATA_OFFSET;
        out[13] = self.flags;
        out[14..16].copy_from_slice(&self.window.to_be_bytes());
        // checksum (16..18) and urgent pointer (18..20) stay zero
        out
    }

    /// The window in bytes (the field is scaled by 256).
    pub fn window_bytes(&self) -> u32 {
        u32::from(self.window) << 8
    }

    /// The raw field for a window in bytes (usbmuxd's `win >> 8`, saturating at 0xFFFF).
    pub fn window_field(bytes: u32) -> u16 {
        u16::try_from(bytes >> 8).unwrap_or(u16::MAX)
    }
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_version_packet_bytes() {
        let payload = VersionPayload {
            major: 2,
            minor: 0,
            padding: 0,
        }
        .to_bytes();
        let packet = MuxPacket::build(Protocol::Version, None, &[&payload]);
        assert_eq!(
            packet,
            [0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let parsed = MuxPacket::parse(&packet, HeaderVersion::V1).unwrap();
        assert_eq!(parsed.header.protocol, Protocol::Version);
        assert_eq!(
            VersionPayload::parse(parsed.payload).unwrap(),
            VersionPayload {
                major: 2,
                minor: 0,
                padding: 0
            }
        );
    }

    #[test]
    fn setup_packet_v2_bytes() {
        let packet = MuxPacket::build(Protocol::Setup, Some((0, 0xFFFF)), &[&[SETUP_PAYLOAD]]);
        assert_eq!(
            packet,
            [0, 0, 0, 2, 0, 0, 0, 17, 0xFE, 0xED, 0xFA, 0xCE, 0, 0, 0xFF, 0xFF, 7]
        );
        let parsed = MuxPacket::parse(&packet, HeaderVersion::V2).unwrap();
        assert_eq!(
            parsed.header.v2,
            Some(MuxSeq {
                magic: MUX_MAGIC,
                tx_seq: 0,
                rx_seq: 0xFFFF
            })
        );
        assert_eq!(parsed.payload, &[7]);
    }

    #[test]
    fn mux_header_round_trip_both_versions() {
        for header in [
            MuxHeader {
                protocol: Protocol::Tcp,
                length: 36,
                v2: None,
            },
            MuxHeader {
                protocol: Protocol::Other(0xDEAD_BEEF),
                length: 0x0102_0304,
                v2: Some(MuxSeq {
                    magic: 0x1234_5678,
                    tx_seq: 0xABCD,
                    rx_seq: 1,
                }),
            },
        ] {
            let mut out = Vec::new();
            header.emit(&mut out);
            assert_eq!(out.len(), header.header_len());
            assert_eq!(MuxHeader::parse(&out, header.version()).unwrap(), header);
        }
    }

    #[test]
    fn protocol_numbers() {
        for (p, n) in [
            (Protocol::Version, 0),
            (Protocol::Control, 1),
            (Protocol::Setup, 2),
            (Protocol::Tcp, 6),
            (Protocol::Other(3), 3),
        ] {
            assert_eq!(p.to_u32(), n);
            assert_eq!(Protocol::from_u32(n), p);
        }
    }

    #[test]
    fn packet_length_checks() {
        let packet = MuxPacket::build(Protocol::Tcp, Some((1, 2)), &[&[1, 2, 3]]);
        assert_eq!(
            MuxPacket::parse(&packet[..18], HeaderVersion::V2),
            Err(WireError::LengthMismatch {
                declared: 19,
                got: 18
            })
        );
        let mut longer = packet.clone();
        longer.push(0);
        assert_eq!(
            MuxPacket::parse(&longer, HeaderVersion::V2),
            Err(WireError::LengthMismatch {
                declared: 19,
                got: 20
            })
        );
        assert_eq!(
            MuxPacket::parse(&packet[..5], HeaderVersion::V2),
            Err(WireError::Truncated {
                what: "mux header",
                needed: 16,
                got: 5
            })
        );
        let tiny = [0, 0, 0, 6, 0, 0, 0, 4];
        assert_eq!(
            MuxPacket::parse(&tiny, HeaderVersion::V1),
            Err(WireError::LengthTooSmall {
                declared: 4,
                header: 8
            })
        );
    }

    #[test]
    fn tcp_header_matches_usbmuxd_trace() {
        // usbmuxd issue #96: "[OUT] dev=1 sport=2 dport=62078 seq=0 ack=0 flags=0x2
        // window=131072[512] len=0"
        let syn = TcpHeader {
            src_port: 2,
            dst_port: 62078,
            seq: 0,
            ack: 0,
            flags: tcp_flags::SYN,
            window: TcpHeader::window_field(131_072),
        };
        let bytes = syn.to_bytes();
        assert_eq!(
            bytes,
            [0, 2, 0xF2, 0x7E, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x02, 0x02, 0x00, 0, 0, 0, 0]
        );
        let (parsed, payload) = TcpHeader::parse(&bytes).unwrap();
        assert_eq!(parsed, syn);
        assert!(payload.is_empty());
        assert_eq!(parsed.window_bytes(), 131_072);
    }

    #[test]
    fn tcp_header_round_trip_with_payload() {
        let header = TcpHeader {
            src_port: 62078,
            dst_port: 1,
            seq: 1885,
            ack: 2402,
            flags: tcp_flags::ACK,
            window: 512,
        };
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(b"hello");
        let (parsed, payload) = TcpHeader::parse(&bytes).unwrap();
        assert_eq!(parsed, header);
        assert_eq!(payload, b"hello");
    }

    #[test]
    fn tcp_header_rejects_bad_input() {
        assert_eq!(
            TcpHeader::parse(&[0; 19]).map(|(h, _)| h),
            Err(WireError::Truncated {
                what: "TCP header",
                needed: 20,
                got: 19
            })
        );
        let mut bytes = [0u8; 20];
        bytes[12] = 0x60;
        assert_eq!(
            TcpHeader::parse(&bytes).map(|(h, _)| h),
            Err(WireError::BadDataOffset(0x60))
        );
    }

    #[test]
    fn window_field_scaling() {
        assert_eq!(TcpHeader::window_field(131_072), 512);
        assert_eq!(TcpHeader::window_field(255), 0);
        assert_eq!(TcpHeader::window_field(u32::MAX), u16::MAX);
    }

    #[test]
    fn control_payload_round_trip() {
        for (byte, level) in [
            (3, ControlLevel::Error),
            (5, ControlLevel::Warning),
            (7, ControlLevel::Info),
            (9, ControlLevel::Unknown(9)),
        ] {
            let c = ControlPayload {
                level,
                text: b"Hello\n\0".to_vec(),
            };
            let bytes = c.to_bytes();
            assert_eq!(bytes[0], byte);
            let parsed = ControlPayload::parse(&bytes).unwrap();
            assert_eq!(parsed, c);
            assert_eq!(parsed.text_lossy(), "Hello");
        }
        assert_eq!(ControlPayload::parse(&[]), Err(WireError::EmptyControl));
    }

    #[test]
    fn version_payload_truncated() {
        assert_eq!(
            VersionPayload::parse(&[0; 11]),
            Err(WireError::Truncated {
                what: "VERSION payload",
                needed: 12,
                got: 11
            })
        );
    }

    #[test]
    fn parsers_never_panic_on_any_short_input() {
        // Every prefix length of a pseudo-random buffer, through every parser.
        let mut state = 0x9E37_79B9_u32;
        let bytes: Vec<u8> = (0..64)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect();
        for end in 0..=bytes.len() {
            let b = &bytes[..end];
            let _ = MuxPacket::parse(b, HeaderVersion::V1);
            let _ = MuxPacket::parse(b, HeaderVersion::V2);
            let _ = TcpHeader::parse(b);
            let _ = VersionPayload::parse(b);
            let _ = ControlPayload::parse(b);
        }
    }
}
