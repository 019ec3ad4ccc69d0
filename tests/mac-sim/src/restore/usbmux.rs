//! The device side of usbmux (protocol.md §6), as strict as a Mac in restore mode would be.
//!
//! Sans-IO: bulk OUT transfers go in through [`DeviceMux::on_bulk_out`], bulk IN transfers come
//! out of [`DeviceMux::poll_bulk_in`]; services talk to connections with [`DeviceMux::send`] and
//! [`DeviceMux::recv`]. Every rule the host breaks is logged and counted in [`Violations`], so
//! tests can assert that a host is clean, or that a broken host is caught.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

pub const PROTO_VERSION: u32 = 0;
pub const PROTO_CONTROL: u32 = 1;
pub const PROTO_SETUP: u32 = 2;
pub const PROTO_TCP: u32 = 6;
/// Largest mux packet (header included) a host may send (§6.2 "USB_MTU").
pub const MAX_HOST_PACKET: usize = 49_152;
/// wMaxPacketSize of the bulk OUT endpoint at high speed (descriptors.rs).
pub const OUT_MAX_PACKET_SIZE: usize = 512;
pub const V2_MAGIC: u32 = 0xFEED_FACE;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
const TCP_HEADER: usize = 20;

/// How the simulated device's mux behaves.
#[derive(Debug, Clone)]
pub struct MuxConfig {
    /// Mux protocol major version the device answers VERSION with (1 or 2).
    pub version: u32,
    /// Receive window the device advertises per connection, in bytes (multiple of 256).
    pub window: u32,
    /// Largest TCP payload the device puts in one packet towards the host.
    pub max_payload: usize,
    /// Outbound bytes a connection buffers before [`DeviceMux::send`] pushes back.
    pub send_buffer: usize,
    /// Hold every ACK this long before sending it (fault knob "slow ACKs").
    pub ack_delay: Duration,
}

impl Default for MuxConfig {
    fn default() -> Self {
        MuxConfig {
            version: 2,
            window: 131_072,
            max_payload: 16_384 - 16 - TCP_HEADER,
            send_buffer: 262_144,
            ack_delay: Duration::ZERO,
        }
    }
}

/// A rule of §6 the host broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Violation {
    /// A bulk OUT transfer that was a multiple of wMaxPacketSize was not followed by a ZLP.
    MissingZlp,
    /// A mux packet longer than 49 152 bytes.
    Oversize,
    /// Header length differs from the bytes of the transfer.
    LengthMismatch,
    /// Too short for a header, or a TCP packet too short for its TCP header.
    Truncated,
    /// Anything but VERSION before the handshake, or a VERSION with a bad payload.
    Handshake,
    /// v2 packet without 0xFEEDFACE.
    BadMagic,
    /// v2 `tx_seq` not the next in order (SETUP starts at 0).
    TxSeq,
    /// v2 `rx_seq` naming a device packet not yet delivered.
    RxSeq,
    /// Unknown mux protocol number.
    UnknownProtocol,
    /// TCP flags other than SYN, ACK, RST (alone or RST|ACK).
    BadFlags,
    /// TCP sequence number not the next expected byte.
    Seq,
    /// TCP ack number acknowledging bytes the device never sent, or going backwards.
    Ack,
    /// More unacknowledged data than the window the device advertised.
    Window,
    /// Data or a second SYN on a connection not in a state to take it.
    State,
}

/// Counters tests assert on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Violations {
    pub counts: BTreeMap<Violation, u64>,
    /// Human-readable log of every violation (also emitted with `tracing::warn!`).
    pub log: Vec<String>,
}

impl Violations {
    pub fn count(&self, v: Violation) -> u64 {
        self.counts.get(&v).copied().unwrap_or(0)
    }
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

/// Non-violation statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MuxStats {
    pub packets_in: u64,
    pub packets_out: u64,
    pub payload_in: u64,
    pub payload_out: u64,
    pub pure_acks_out: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    /// SYNs to ports nobody listens on (answered with RST).
    pub refused: u64,
    /// Non-RST packets for connections that do not exist (answered with RST).
    pub unknown_connection: u64,
}

/// Identifies one emulated TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u32);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MuxEvent {
    Accepted {
        conn: ConnId,
        port: u16,
    },
    /// The connection is dead: the host reset it, or the device did (`by_host` false).
    Closed {
        conn: ConnId,
        by_host: bool,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MuxError {
    #[error("connection {0:?} is closed")]
    Closed(ConnId),
    #[error("no such connection {0:?}")]
    Unknown(ConnId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// SYN|ACK sent; waiting for the host's ACK.
    SynReceived,
    Established,
    Closed,
}

#[derive(Debug)]
struct Conn {
    host_port: u16,
    device_port: u16,
    state: State,
    /// Next host byte expected.
    rx_next: u32,
    /// Received, not yet consumed by the service.
    rx_buf: VecDeque<u8>,
    /// Ack number and window of the last packet sent to the host (what the host may rely on).
    ack_sent: u32,
    window_sent: u32,
    /// When an ACK became due (consumption advanced), for the slow-ACK knob.
    ack_due_since: Option<Instant>,
    /// Next device sequence number to send.
    tx_next: u32,
    /// Highest ack received from the host.
    host_acked: u32,
    /// Window the host advertised, in bytes.
    host_window: u32,
    tx_buf: VecDeque<u8>,
    /// Control packets (SYN|ACK, RST) to send before any data.
    pending_flags: Option<(u8, Vec<u8>)>,
}

impl Conn {
    /// Ack number that reflects what the service consumed (flow control by consumption, §6.5).
    fn ack_value(&self) -> u32 {
        self.rx_next.wrapping_sub(self.rx_buf.len() as u32)
    }
}

/// Decoded TCP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpHeader {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
}

impl TcpHeader {
    pub fn parse(b: &[u8]) -> Option<TcpHeader> {
        if b.len() < TCP_HEADER {
            return None;
        }
        let u16at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let u32at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Some(TcpHeader {
            sport: u16at(0),
            dport: u16at(2),
            seq: u32at(4),
            ack: u32at(8),
            flags: b[13],
            window: u16at(14),
        })
    }

    pub fn encode(&self) -> [u8; TCP_HEADER] {
        let mut h = [0u8; TCP_HEADER];
        h[0..2].copy_from_slice(&self.sport.to_be_bytes());
        h[2..4].copy_from_slice(&self.dport.to_be_bytes());
        h[4..8].copy_from_slice(&self.seq.to_be_bytes());
        h[8..12].copy_from_slice(&self.ack.to_be_bytes());
        h[12] = 0x50;
        h[13] = self.flags;
        h[14..16].copy_from_slice(&self.window.to_be_bytes());
        h
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the host's VERSION.
    AwaitVersion,
    /// v2: VERSION answered, waiting for SETUP.
    AwaitSetup,
    Active,
}

/// The device's half of the mux.
#[derive(Debug)]
pub struct DeviceMux {
    cfg: MuxConfig,
    phase: Phase,
    listening: Vec<u16>,
    conns: BTreeMap<ConnId, Conn>,
    by_ports: HashMap<(u16, u16), ConnId>,
    next_id: u32,
    events: VecDeque<MuxEvent>,
    /// Packets whose payload is complete (VERSION, CONTROL, RSTs to unknown connections).
    urgent: VecDeque<(u32, Vec<u8>)>,
    /// Bytes of the bulk OUT transfer being assembled (ended by a short packet or ZLP).
    transfer: Vec<u8>,
    /// The remainder of a packet larger than the host's bulk IN request.
    in_rest: VecDeque<Vec<u8>>,
    /// v2 counters.
    tx_seq: u16,
    /// Next `tx_seq` expected from the host.
    host_tx_expected: u16,
    /// `rx_seq` field of the last device packet the host has read (None: none yet).
    delivered_rx_seq: Option<u16>,
    last_host_tx: u16,
    round_robin: u32,
    violations: Violations,
    stats: MuxStats,
}

impl DeviceMux {
    pub fn new(cfg: MuxConfig) -> DeviceMux {
        DeviceMux {
            cfg,
            phase: Phase::AwaitVersion,
            listening: Vec::new(),
            conns: BTreeMap::new(),
            by_ports: HashMap::new(),
            next_id: 1,
            events: VecDeque::new(),
            urgent: VecDeque::new(),
            transfer: Vec::new(),
            in_rest: VecDeque::new(),
            tx_seq: 0,
            host_tx_expected: 0,
            delivered_rx_seq: None,
            last_host_tx: 0xFFFF,
            round_robin: 0,
            violations: Violations::default(),
            stats: MuxStats::default(),
        }
    }

    pub fn config(&self) -> &MuxConfig {
        &self.cfg
    }

    pub fn listen(&mut self, port: u16) {
        if !self.listening.contains(&port) {
            self.listening.push(port);
        }
    }

    pub fn unlisten(&mut self, port: u16) {
        self.listening.retain(|p| *p != port);
    }

    pub fn violations(&self) -> &Violations {
        &self.violations
    }

    pub fn stats(&self) -> &MuxStats {
        &self.stats
    }

    /// Whether the VERSION (and for v2 SETUP) handshake is done.
    pub fn active(&self) -> bool {
        self.phase == Phase::Active
    }

    pub fn poll_event(&mut self) -> Option<MuxEvent> {
        self.events.pop_front()
    }

    fn header_len(&self) -> usize {
        if self.cfg.version >= 2 && self.phase != Phase::AwaitVersion {
            16
        } else {
            8
        }
    }

    fn violation(&mut self, v: Violation, detail: String) {
        tracing::warn!(violation = ?v, "usbmux host violation: {detail}");
        *self.violations.counts.entry(v).or_default() += 1;
        self.violations.log.push(format!("{v:?}: {detail}"));
    }

    /// One bulk OUT transfer from the host, as the USB stack completed it.
    pub fn on_bulk_out(&mut self, data: &[u8]) {
        if data.is_empty() {
            // A ZLP ends a transfer whose length was a multiple of wMaxPacketSize.
            if !self.transfer.is_empty() {
                let t = std::mem::take(&mut self.transfer);
                self.on_transfer(&t);
            }
            return;
        }
        if !self.transfer.is_empty() {
            // The previous transfer ended on a full packet. Legitimate only if its mux
            // packet is still incomplete (one packet spread over several transfers).
            if let Some(len) = self.peek_len(&self.transfer) {
                if len <= self.transfer.len() {
                    let detail = format!(
                        "a {}-byte bulk OUT transfer (a multiple of {OUT_MAX_PACKET_SIZE}) was not \
                         followed by a zero-length packet; the next {} bytes ran into it",
                        self.transfer.len(),
                        data.len()
                    );
                    self.violation(Violation::MissingZlp, detail);
                    let t = std::mem::take(&mut self.transfer);
                    // A real device sees one merged transfer whose length does not match
                    // its header: the whole thing is dropped.
                    self.reset_named_in(&t, "missing ZLP");
                    return;
                }
            }
        }
        self.transfer.extend_from_slice(data);
        if let Some(len) = self.peek_len(&self.transfer) {
            if len > MAX_HOST_PACKET {
                let detail = format!("mux packet of {len} bytes exceeds the 49152-byte limit");
                self.violation(Violation::Oversize, detail);
                let t = std::mem::take(&mut self.transfer);
                self.reset_named_in(&t, "oversized packet");
                return;
            }
        }
        if data.len() % OUT_MAX_PACKET_SIZE != 0 {
            let t = std::mem::take(&mut self.transfer);
            self.on_transfer(&t);
        }
    }

    fn peek_len(&self, b: &[u8]) -> Option<usize> {
        (b.len() >= 8).then(|| u32::from_be_bytes([b[4], b[5], b[6], b[7]]) as usize)
    }

    /// RST the connection a broken packet belonged to, when its header says which.
    fn reset_named_in(&mut self, pkt: &[u8], why: &str) {
        let hl = self.header_len();
        if pkt.len() < hl + TCP_HEADER || self.phase != Phase::Active {
            return;
        }
        let proto = u32::from_be_bytes([pkt[0], pkt[1], pkt[2], pkt[3]]);
        if proto != PROTO_TCP {
            return;
        }
        if let Some(h) = TcpHeader::parse(&pkt[hl..]) {
            if let Some(id) = self.by_ports.get(&(h.sport, h.dport)).copied() {
                self.reset(id, &format!("protocol violation: {why}"));
            }
        }
    }

    /// One complete USB transfer: must be exactly one mux packet.
    fn on_transfer(&mut self, pkt: &[u8]) {
        let Some(len) = self.peek_len(pkt) else {
            self.violation(
                Violation::Truncated,
                format!("{}-byte transfer is shorter than a mux header", pkt.len()),
            );
            return;
        };
        if len != pkt.len() {
            let detail = format!(
                "mux header says {len} bytes but the transfer carried {}",
                pkt.len()
            );
            self.violation(Violation::LengthMismatch, detail);
            self.reset_named_in(pkt, "length mismatch");
            return;
        }
        self.stats.packets_in += 1;
        let proto = u32::from_be_bytes([pkt[0], pkt[1], pkt[2], pkt[3]]);
        match self.phase {
            Phase::AwaitVersion => self.on_version(proto, pkt),
            Phase::AwaitSetup | Phase::Active => {
                let hl = self.header_len();
                if pkt.len() < hl {
                    self.violation(
                        Violation::Truncated,
                        format!("{}-byte packet is shorter than the v2 header", pkt.len()),
                    );
                    return;
                }
                if hl == 16 && !self.check_v2(proto, pkt) {
                    self.reset_named_in(pkt, "bad v2 header");
                    return;
                }
                let body = &pkt[hl..];
                match (self.phase, proto) {
                    (Phase::AwaitSetup, PROTO_SETUP) => {
                        if body != [0x07] {
                            self.violation(
                                Violation::Handshake,
                                format!("SETUP payload {body:02x?}, expected [07]"),
                            );
                        }
                        tracing::debug!("usbmux SETUP received; device active");
                        self.phase = Phase::Active;
                    }
                    (Phase::AwaitSetup, p) => self.violation(
                        Violation::Handshake,
                        format!("protocol {p} packet before SETUP"),
                    ),
                    (_, PROTO_TCP) => self.on_tcp(body),
                    (_, PROTO_VERSION | PROTO_SETUP) => self.violation(
                        Violation::Handshake,
                        format!("protocol {proto} packet after the handshake"),
                    ),
                    (_, p) => {
                        self.violation(Violation::UnknownProtocol, format!("mux protocol {p}"))
                    }
                }
            }
        }
    }

    fn on_version(&mut self, proto: u32, pkt: &[u8]) {
        if proto != PROTO_VERSION || pkt.len() != 20 {
            let detail = format!(
                "expected a 20-byte VERSION packet with the 8-byte header first, got protocol \
                 {proto} of {} bytes",
                pkt.len()
            );
            self.violation(Violation::Handshake, detail);
            return;
        }
        let major = u32::from_be_bytes([pkt[8], pkt[9], pkt[10], pkt[11]]);
        if major < self.cfg.version {
            let detail = format!(
                "host offers mux version {major}, device needs {}",
                self.cfg.version
            );
            self.violation(Violation::Handshake, detail);
        }
        let mut payload = Vec::with_capacity(12);
        payload.extend_from_slice(&self.cfg.version.to_be_bytes());
        payload.extend_from_slice(&[0; 8]);
        // The reply uses the 8-byte header: the host does not know the version yet (§6.4).
        let mut reply = Vec::with_capacity(20);
        reply.extend_from_slice(&PROTO_VERSION.to_be_bytes());
        reply.extend_from_slice(&20u32.to_be_bytes());
        reply.extend_from_slice(&payload);
        self.in_rest.push_back(reply);
        self.phase = if self.cfg.version >= 2 {
            Phase::AwaitSetup
        } else {
            Phase::Active
        };
    }

    fn check_v2(&mut self, proto: u32, pkt: &[u8]) -> bool {
        let magic = u32::from_be_bytes([pkt[8], pkt[9], pkt[10], pkt[11]]);
        let tx = u16::from_be_bytes([pkt[12], pkt[13]]);
        let rx = u16::from_be_bytes([pkt[14], pkt[15]]);
        if magic != V2_MAGIC {
            self.violation(Violation::BadMagic, format!("v2 magic {magic:#010x}"));
            return false;
        }
        if proto == PROTO_SETUP && self.phase == Phase::AwaitSetup {
            // SETUP resets the host's counters (§6.3).
            self.host_tx_expected = 0;
            if rx != 0xFFFF {
                self.violation(
                    Violation::RxSeq,
                    format!("SETUP carries rx_seq {rx:#06x}, expected 0xffff"),
                );
            }
        }
        if tx != self.host_tx_expected {
            let detail = format!("host tx_seq {tx}, expected {}", self.host_tx_expected);
            self.violation(Violation::TxSeq, detail);
            self.host_tx_expected = tx.wrapping_add(1);
            return false;
        }
        self.host_tx_expected = tx.wrapping_add(1);
        self.last_host_tx = tx;
        // usbmuxd echoes the rx_seq field of the last device packet it read (§6.3); a value
        // the device has not yet delivered cannot be an echo.
        if proto != PROTO_SETUP && rx != 0xFFFF {
            let ok = match self.delivered_rx_seq {
                Some(d) => d.wrapping_sub(rx) < 0x8000,
                None => false,
            };
            if !ok {
                // Counted, not fatal: whether real Macs enforce rx_seq is unknown (§12 item 3),
                // so a host that acknowledges differently is flagged without being broken.
                let detail = format!(
                    "host rx_seq {rx} is not an echo of a delivered device packet (last {:?})",
                    self.delivered_rx_seq
                );
                self.violation(Violation::RxSeq, detail);
            }
        }
        true
    }

    fn on_tcp(&mut self, body: &[u8]) {
        let Some(h) = TcpHeader::parse(body) else {
            self.violation(
                Violation::Truncated,
                format!("TCP packet of {} bytes", body.len()),
            );
            return;
        };
        let payload = &body[TCP_HEADER..];
        let Some(id) = self.by_ports.get(&(h.sport, h.dport)).copied() else {
            self.on_tcp_no_conn(h, payload);
            return;
        };
        if h.flags & TCP_RST != 0 {
            let reason = String::from_utf8_lossy(payload).trim_end().to_string();
            tracing::debug!(port = h.dport, %reason, "host reset the connection");
            self.stats.resets_received += 1;
            self.close(id, true, reason);
            return;
        }
        let expected_flags = TCP_ACK;
        if h.flags == TCP_SYN {
            self.violation(
                Violation::State,
                format!("second SYN on the open connection {}→{}", h.sport, h.dport),
            );
            self.reset(id, "SYN on an open connection");
            return;
        }
        if h.flags != expected_flags {
            self.violation(
                Violation::BadFlags,
                format!("TCP flags {:#04x} (only ACK carries data)", h.flags),
            );
            self.reset(id, "bad TCP flags");
            return;
        }
        let Some(c) = self.conns.get(&id) else { return };
        if c.state == State::Closed {
            return;
        }
        let (rx_next, tx_next, host_acked, ack_sent, window_sent) = (
            c.rx_next,
            c.tx_next,
            c.host_acked,
            c.ack_sent,
            c.window_sent,
        );
        if h.seq != rx_next {
            let detail = format!(
                "port {}: TCP seq {} but the next byte expected is {rx_next}",
                h.dport, h.seq
            );
            self.violation(Violation::Seq, detail);
            self.reset(id, "sequence error");
            return;
        }
        let ahead = h.ack.wrapping_sub(host_acked) as i32;
        let unsent = h.ack.wrapping_sub(tx_next) as i32;
        if ahead < 0 || unsent > 0 {
            let detail = format!(
                "port {}: ack {} outside [{host_acked}, {tx_next}]",
                h.dport, h.ack
            );
            self.violation(Violation::Ack, detail);
            self.reset(id, "acknowledgement error");
            return;
        }
        let in_flight = h
            .seq
            .wrapping_add(payload.len() as u32)
            .wrapping_sub(ack_sent);
        if !payload.is_empty() && in_flight > window_sent {
            let detail = format!(
                "port {}: {in_flight} bytes unacknowledged but the device advertised {window_sent}",
                h.dport
            );
            self.violation(Violation::Window, detail);
            self.reset(id, "window overrun");
            return;
        }
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        c.host_acked = h.ack;
        c.host_window = u32::from(h.window) << 8;
        if c.state == State::SynReceived {
            if h.ack != 1 {
                // Unreachable after the ack-range check (tx_next is 1 here); kept explicit.
                return;
            }
            c.state = State::Established;
            let port = c.device_port;
            self.events.push_back(MuxEvent::Accepted { conn: id, port });
        }
        if !payload.is_empty() {
            c.rx_next = c.rx_next.wrapping_add(payload.len() as u32);
            c.rx_buf.extend(payload);
            self.stats.payload_in += payload.len() as u64;
        }
    }

    fn on_tcp_no_conn(&mut self, h: TcpHeader, payload: &[u8]) {
        if h.flags & TCP_RST != 0 {
            return;
        }
        if h.flags == TCP_SYN {
            if !payload.is_empty() {
                self.violation(Violation::State, "SYN carrying data".into());
            }
            if !self.listening.contains(&h.dport) {
                tracing::debug!(port = h.dport, "SYN to a closed port: RST");
                self.stats.refused += 1;
                self.raw_tcp(
                    h.dport,
                    h.sport,
                    0,
                    h.seq.wrapping_add(1),
                    TCP_RST | TCP_ACK,
                    b"",
                );
                return;
            }
            let id = ConnId(self.next_id);
            self.next_id += 1;
            let rx_next = h.seq.wrapping_add(1);
            let conn = Conn {
                host_port: h.sport,
                device_port: h.dport,
                state: State::SynReceived,
                rx_next,
                rx_buf: VecDeque::new(),
                ack_sent: rx_next,
                window_sent: self.cfg.window,
                ack_due_since: None,
                tx_next: 0,
                host_acked: 0,
                host_window: u32::from(h.window) << 8,
                tx_buf: VecDeque::new(),
                pending_flags: Some((TCP_SYN | TCP_ACK, Vec::new())),
            };
            self.conns.insert(id, conn);
            self.by_ports.insert((h.sport, h.dport), id);
            return;
        }
        self.stats.unknown_connection += 1;
        tracing::debug!(port = h.dport, "packet for no connection: RST");
        self.raw_tcp(h.dport, h.sport, 0, h.seq, TCP_RST, b"");
    }

    fn raw_tcp(&mut self, sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, data: &[u8]) {
        let h = TcpHeader {
            sport,
            dport,
            seq,
            ack,
            flags,
            window: (self.cfg.window >> 8) as u16,
        };
        let mut body = h.encode().to_vec();
        body.extend_from_slice(data);
        if flags & TCP_RST != 0 {
            self.stats.resets_sent += 1;
        }
        self.urgent.push_back((PROTO_TCP, body));
    }

    fn close(&mut self, id: ConnId, by_host: bool, reason: String) {
        if let Some(c) = self.conns.get_mut(&id) {
            if c.state != State::Closed {
                c.state = State::Closed;
                c.tx_buf.clear();
                let key = (c.host_port, c.device_port);
                self.by_ports.remove(&key);
                self.events.push_back(MuxEvent::Closed {
                    conn: id,
                    by_host,
                    reason,
                });
            }
        }
    }

    /// Device-initiated RST with a reason string (the host shows it).
    pub fn reset(&mut self, id: ConnId, reason: &str) {
        let Some(c) = self.conns.get(&id) else { return };
        if c.state == State::Closed {
            return;
        }
        let (dp, hp, seq, ack) = (c.device_port, c.host_port, c.tx_next, c.ack_value());
        let mut text = reason.as_bytes().to_vec();
        text.push(b'\n');
        self.raw_tcp(dp, hp, seq, ack, TCP_RST, &text);
        self.close(id, false, reason.to_string());
    }

    /// A CONTROL message to the host (3 error, 5 warning, 7 info, §6.4).
    pub fn control(&mut self, kind: u8, text: &str) {
        let mut body = vec![kind];
        body.extend_from_slice(text.as_bytes());
        self.urgent.push_back((PROTO_CONTROL, body));
    }

    /// Queue data; returns how many bytes fit in the send buffer.
    pub fn send(&mut self, id: ConnId, data: &[u8]) -> Result<usize, MuxError> {
        let cap = self.cfg.send_buffer;
        let c = self.conns.get_mut(&id).ok_or(MuxError::Unknown(id))?;
        if c.state == State::Closed {
            return Err(MuxError::Closed(id));
        }
        let n = data.len().min(cap.saturating_sub(c.tx_buf.len()));
        c.tx_buf.extend(&data[..n]);
        Ok(n)
    }

    /// Consume received bytes; the ack the host sees advances by what was consumed here.
    /// `Ok(0)` with a non-empty `buf` means nothing buffered yet.
    pub fn recv(&mut self, id: ConnId, buf: &mut [u8], now: Instant) -> Result<usize, MuxError> {
        let c = self.conns.get_mut(&id).ok_or(MuxError::Unknown(id))?;
        let n = buf.len().min(c.rx_buf.len());
        if n == 0 && c.state == State::Closed {
            return Err(MuxError::Closed(id));
        }
        let (a, b) = c.rx_buf.as_slices();
        let from_a = a.len().min(n);
        buf[..from_a].copy_from_slice(&a[..from_a]);
        buf[from_a..n].copy_from_slice(&b[..n - from_a]);
        c.rx_buf.drain(..n);
        if n > 0 && c.ack_due_since.is_none() {
            c.ack_due_since = Some(now);
        }
        Ok(n)
    }

    /// Bytes received and not yet consumed.
    pub fn available(&self, id: ConnId) -> usize {
        self.conns.get(&id).map_or(0, |c| c.rx_buf.len())
    }

    pub fn is_open(&self, id: ConnId) -> bool {
        self.conns
            .get(&id)
            .is_some_and(|c| c.state != State::Closed)
    }

    /// Unsent or unacknowledged outbound bytes.
    pub fn unsent(&self, id: ConnId) -> usize {
        self.conns.get(&id).map_or(0, |c| {
            c.tx_buf.len() + c.tx_next.wrapping_sub(c.host_acked) as usize
        })
    }

    /// Whether `now` is past every pending ACK delay (used by drivers to know when to poll).
    pub fn next_ack_deadline(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(|c| c.ack_due_since)
            .min()
            .map(|t| t + self.cfg.ack_delay)
    }

    /// The next bulk IN transfer, at most `max_len` bytes, or None (NAK).
    pub fn poll_bulk_in(&mut self, max_len: usize, now: Instant) -> Option<Vec<u8>> {
        let max_len = max_len.max(1);
        if let Some(mut p) = self.in_rest.pop_front() {
            if p.len() > max_len {
                let rest = p.split_off(max_len);
                self.in_rest.push_front(rest);
            }
            return Some(p);
        }
        let pkt = self.next_packet(now)?;
        self.stats.packets_out += 1;
        self.in_rest.push_back(pkt);
        self.poll_bulk_in(max_len, now)
    }

    fn encode(&mut self, proto: u32, body: &[u8]) -> Vec<u8> {
        let hl = self.header_len();
        let mut p = Vec::with_capacity(hl + body.len());
        p.extend_from_slice(&proto.to_be_bytes());
        p.extend_from_slice(&((hl + body.len()) as u32).to_be_bytes());
        if hl == 16 {
            p.extend_from_slice(&V2_MAGIC.to_be_bytes());
            p.extend_from_slice(&self.tx_seq.to_be_bytes());
            p.extend_from_slice(&self.last_host_tx.to_be_bytes());
            self.tx_seq = self.tx_seq.wrapping_add(1);
            // The host reads packets in order, so once queued for bulk IN this is what it
            // can echo.
            self.delivered_rx_seq = Some(self.last_host_tx);
        }
        p.extend_from_slice(body);
        p
    }

    fn next_packet(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.phase != Phase::Active {
            return None;
        }
        if let Some((proto, body)) = self.urgent.pop_front() {
            return Some(self.encode(proto, &body));
        }
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        if ids.is_empty() {
            return None;
        }
        let start = self.round_robin as usize % ids.len();
        for i in 0..ids.len() {
            let id = ids[(start + i) % ids.len()];
            if let Some(body) = self.conn_packet(id, now) {
                self.round_robin = self.round_robin.wrapping_add(i as u32 + 1);
                return Some(self.encode(PROTO_TCP, &body));
            }
        }
        // Forget closed connections that have nothing left to say.
        // Data received before a host RST stays readable (hosts close right after writing).
        self.conns.retain(|_, c| {
            c.state != State::Closed || c.pending_flags.is_some() || !c.rx_buf.is_empty()
        });
        None
    }

    fn conn_packet(&mut self, id: ConnId, now: Instant) -> Option<Vec<u8>> {
        let window = self.cfg.window;
        let delay = self.cfg.ack_delay;
        let max_payload = self.cfg.max_payload;
        let c = self.conns.get_mut(&id)?;
        let ack = c.ack_value();
        let header = |c: &Conn, seq: u32, flags: u8| TcpHeader {
            sport: c.device_port,
            dport: c.host_port,
            seq,
            ack,
            flags,
            window: (window >> 8) as u16,
        };
        if let Some((flags, data)) = c.pending_flags.take() {
            let h = header(c, c.tx_next, flags);
            if flags & TCP_SYN != 0 {
                c.tx_next = c.tx_next.wrapping_add(1);
            }
            c.ack_sent = ack;
            c.window_sent = window;
            let mut body = h.encode().to_vec();
            body.extend_from_slice(&data);
            return Some(body);
        }
        if c.state != State::Established {
            return None;
        }
        let in_flight = c.tx_next.wrapping_sub(c.host_acked);
        let can = (c.host_window.saturating_sub(in_flight) as usize)
            .min(c.tx_buf.len())
            .min(max_payload);
        let ack_ready = ack != c.ack_sent
            && c.ack_due_since
                .is_some_and(|t| now.saturating_duration_since(t) >= delay);
        if can == 0 && !ack_ready {
            return None;
        }
        // With a slow-ACK fault, data also waits so it cannot carry the ACK early.
        if can > 0 && ack != c.ack_sent && !ack_ready {
            return None;
        }
        let h = header(c, c.tx_next, TCP_ACK);
        let mut body = h.encode().to_vec();
        body.extend(c.tx_buf.drain(..can));
        c.tx_next = c.tx_next.wrapping_add(can as u32);
        c.ack_sent = ack;
        c.window_sent = window;
        c.ack_due_since = None;
        self.stats.payload_out += can as u64;
        if can == 0 {
            self.stats.pure_acks_out += 1;
        }
        Some(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1_header(proto: u32, len: usize) -> Vec<u8> {
        let mut h = proto.to_be_bytes().to_vec();
        h.extend_from_slice(&(len as u32).to_be_bytes());
        h
    }

    fn version_packet(major: u32) -> Vec<u8> {
        let mut p = v1_header(PROTO_VERSION, 20);
        p.extend_from_slice(&major.to_be_bytes());
        p.extend_from_slice(&[0; 8]);
        p
    }

    fn v2(proto: u32, tx: u16, rx: u16, body: &[u8]) -> Vec<u8> {
        let mut p = v1_header(proto, 16 + body.len());
        p.extend_from_slice(&V2_MAGIC.to_be_bytes());
        p.extend_from_slice(&tx.to_be_bytes());
        p.extend_from_slice(&rx.to_be_bytes());
        p.extend_from_slice(body);
        p
    }

    fn tcp(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, data: &[u8]) -> Vec<u8> {
        let mut b = TcpHeader {
            sport,
            dport,
            seq,
            ack,
            flags,
            window: 512,
        }
        .encode()
        .to_vec();
        b.extend_from_slice(data);
        b
    }

    fn handshake(version: u32) -> DeviceMux {
        let mut m = DeviceMux::new(MuxConfig {
            version,
            ..MuxConfig::default()
        });
        m.listen(62078);
        m.on_bulk_out(&version_packet(2));
        let now = Instant::now();
        let reply = m.poll_bulk_in(16384, now).unwrap();
        assert_eq!(reply, {
            let mut r = v1_header(0, 20);
            r.extend_from_slice(&version.to_be_bytes());
            r.extend_from_slice(&[0; 8]);
            r
        });
        if version == 2 {
            m.on_bulk_out(&v2(PROTO_SETUP, 0, 0xFFFF, &[7]));
        }
        assert!(m.active());
        m
    }

    #[test]
    fn syn_to_listening_port_gets_syn_ack_then_accept() {
        let mut m = handshake(2);
        m.on_bulk_out(&v2(
            PROTO_TCP,
            1,
            0xFFFF,
            &tcp(1, 62078, 0, 0, TCP_SYN, b""),
        ));
        let now = Instant::now();
        let p = m.poll_bulk_in(16384, now).unwrap();
        assert_eq!(p.len(), 36);
        assert_eq!(&p[12..16], &[0, 0, 0, 1]); // device tx_seq 0, rx_seq = host tx 1
        let h = TcpHeader::parse(&p[16..]).unwrap();
        assert_eq!((h.seq, h.ack, h.flags, h.window), (0, 1, 0x12, 512));
        m.on_bulk_out(&v2(PROTO_TCP, 2, 1, &tcp(1, 62078, 1, 1, TCP_ACK, b"abcd")));
        assert_eq!(
            m.poll_event(),
            Some(MuxEvent::Accepted {
                conn: ConnId(1),
                port: 62078
            })
        );
        assert_eq!(m.violations().total(), 0);
        // Nothing consumed yet: no ACK.
        assert_eq!(m.poll_bulk_in(16384, now), None);
        let mut buf = [0; 8];
        assert_eq!(m.recv(ConnId(1), &mut buf, now).unwrap(), 4);
        let p = m.poll_bulk_in(16384, now).unwrap();
        let h = TcpHeader::parse(&p[16..]).unwrap();
        assert_eq!((h.seq, h.ack, h.flags), (1, 5, TCP_ACK));
    }

    #[test]
    fn closed_port_is_refused_with_rst() {
        let mut m = handshake(1);
        m.on_bulk_out(&{
            let b = tcp(3, 999, 0, 0, TCP_SYN, b"");
            let mut p = v1_header(PROTO_TCP, 8 + b.len());
            p.extend(b);
            p
        });
        let p = m.poll_bulk_in(16384, Instant::now()).unwrap();
        let h = TcpHeader::parse(&p[8..]).unwrap();
        assert_eq!(h.flags & TCP_RST, TCP_RST);
        assert_eq!(m.stats().refused, 1);
    }

    #[test]
    fn missing_zlp_is_a_violation() {
        let mut m = handshake(2);
        // A 512-byte mux packet (multiple of wMaxPacketSize) not followed by a ZLP.
        let body = tcp(1, 62078, 0, 0, TCP_SYN, &[0; 512 - 16 - 20]);
        let p = v2(PROTO_TCP, 1, 0xFFFF, &body);
        assert_eq!(p.len(), 512);
        m.on_bulk_out(&p);
        m.on_bulk_out(&v2(
            PROTO_TCP,
            2,
            0xFFFF,
            &tcp(1, 62078, 1, 1, TCP_ACK, b""),
        ));
        assert_eq!(m.violations().count(Violation::MissingZlp), 1);
    }

    #[test]
    fn zlp_after_full_packet_is_accepted() {
        let mut m = handshake(2);
        let p = v2(PROTO_TCP, 1, 0xFFFF, &tcp(1, 62078, 0, 0, TCP_SYN, b""));
        m.on_bulk_out(&p);
        let now = Instant::now();
        m.poll_bulk_in(16384, now).unwrap();
        m.on_bulk_out(&v2(PROTO_TCP, 2, 0, &tcp(1, 62078, 1, 1, TCP_ACK, b"")));
        let data = vec![9u8; 1024 - 36];
        let p = v2(PROTO_TCP, 3, 0, &tcp(1, 62078, 1, 1, TCP_ACK, &data));
        assert_eq!(p.len(), 1024);
        m.on_bulk_out(&p);
        assert_eq!(
            m.available(ConnId(1)),
            0,
            "transfer not ended before the ZLP"
        );
        m.on_bulk_out(&[]);
        assert_eq!(m.available(ConnId(1)), data.len());
        assert_eq!(m.violations().total(), 0, "{:?}", m.violations().log);
    }

    #[test]
    fn oversize_wrong_seq_and_tx_seq_are_caught() {
        let mut m = handshake(2);
        let mut big = v1_header(PROTO_TCP, 60_000);
        big.extend(vec![0; 512 * 2 - 8]);
        m.on_bulk_out(&big);
        assert_eq!(m.violations().count(Violation::Oversize), 1);

        let mut m = handshake(2);
        m.on_bulk_out(&v2(
            PROTO_TCP,
            5,
            0xFFFF,
            &tcp(1, 62078, 0, 0, TCP_SYN, b""),
        ));
        assert_eq!(m.violations().count(Violation::TxSeq), 1);

        let mut m = handshake(2);
        let now = Instant::now();
        m.on_bulk_out(&v2(
            PROTO_TCP,
            1,
            0xFFFF,
            &tcp(1, 62078, 0, 0, TCP_SYN, b""),
        ));
        m.poll_bulk_in(16384, now).unwrap();
        m.on_bulk_out(&v2(PROTO_TCP, 2, 1, &tcp(1, 62078, 1, 1, TCP_ACK, b"")));
        m.on_bulk_out(&v2(PROTO_TCP, 3, 1, &tcp(1, 62078, 7, 1, TCP_ACK, b"x")));
        assert_eq!(m.violations().count(Violation::Seq), 1);
        let p = m.poll_bulk_in(16384, now).unwrap();
        let h = TcpHeader::parse(&p[16..]).unwrap();
        assert_eq!(h.flags, TCP_RST);
        assert_eq!(&p[36..], b"sequence error\n");
    }

    #[test]
    fn rx_seq_from_the_future_is_counted_but_not_fatal() {
        let mut m = handshake(2);
        let now = Instant::now();
        m.on_bulk_out(&v2(
            PROTO_TCP,
            1,
            0xFFFF,
            &tcp(1, 62078, 0, 0, TCP_SYN, b""),
        ));
        m.poll_bulk_in(16384, now).unwrap(); // carries rx_seq 1
        m.on_bulk_out(&v2(PROTO_TCP, 2, 9, &tcp(1, 62078, 1, 1, TCP_ACK, b"")));
        assert_eq!(m.violations().count(Violation::RxSeq), 1);
        assert!(matches!(m.poll_event(), Some(MuxEvent::Accepted { .. })));
    }

    #[test]
    fn window_overrun_is_caught() {
        let mut m = DeviceMux::new(MuxConfig {
            window: 1024,
            ..MuxConfig::default()
        });
        m.listen(1);
        m.on_bulk_out(&version_packet(2));
        let now = Instant::now();
        m.poll_bulk_in(100, now).unwrap();
        m.on_bulk_out(&v2(PROTO_SETUP, 0, 0xFFFF, &[7]));
        m.on_bulk_out(&v2(PROTO_TCP, 1, 0xFFFF, &tcp(1, 1, 0, 0, TCP_SYN, b"")));
        m.poll_bulk_in(100, now).unwrap();
        m.on_bulk_out(&v2(PROTO_TCP, 2, 1, &tcp(1, 1, 1, 1, TCP_ACK, &[1; 1000])));
        m.on_bulk_out(&v2(
            PROTO_TCP,
            3,
            1,
            &tcp(1, 1, 1001, 1, TCP_ACK, &[1; 100]),
        ));
        assert_eq!(m.violations().count(Violation::Window), 1);
    }

    #[test]
    fn slow_acks_wait_for_the_delay() {
        let mut m = DeviceMux::new(MuxConfig {
            ack_delay: Duration::from_millis(50),
            ..MuxConfig::default()
        });
        m.listen(1);
        m.on_bulk_out(&version_packet(2));
        let t0 = Instant::now();
        m.poll_bulk_in(100, t0).unwrap();
        m.on_bulk_out(&v2(PROTO_SETUP, 0, 0xFFFF, &[7]));
        m.on_bulk_out(&v2(PROTO_TCP, 1, 0xFFFF, &tcp(1, 1, 0, 0, TCP_SYN, b"")));
        m.poll_bulk_in(100, t0).unwrap();
        m.on_bulk_out(&v2(PROTO_TCP, 2, 1, &tcp(1, 1, 1, 1, TCP_ACK, b"hi")));
        let mut b = [0; 2];
        m.recv(ConnId(1), &mut b, t0).unwrap();
        assert_eq!(m.poll_bulk_in(100, t0 + Duration::from_millis(10)), None);
        assert!(m
            .poll_bulk_in(100, t0 + Duration::from_millis(60))
            .is_some());
    }

    #[test]
    fn control_message_is_framed_with_the_v2_header() {
        let mut m = handshake(2);
        m.control(7, "hello");
        let p = m.poll_bulk_in(16384, Instant::now()).unwrap();
        assert_eq!(&p[0..4], &[0, 0, 0, 1]);
        assert_eq!(&p[16..], b"\x07hello");
    }

    #[test]
    fn garbage_never_panics() {
        let mut m = handshake(2);
        let mut s = 7u64;
        for n in 0..2000usize {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (s >> 33) as usize % 700;
            let data: Vec<u8> = (0..len).map(|i| (s >> (i % 56)) as u8 ^ n as u8).collect();
            m.on_bulk_out(&data);
            let _ = m.poll_bulk_in(64, Instant::now());
        }
    }
}
