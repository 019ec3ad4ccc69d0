//! The mux state machine: handshake, packet routing, TCP emulation and the transmit queue.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use tracing::{debug, error, info, trace, warn};

use super::conn::{Conn, ConnId, ConnInfo, ConnState};
use super::rx::{Reassembler, RxOutcome};
use super::wire::{
    clean_text, tcp_flags, ControlLevel, ControlPayload, HeaderVersion, MuxPacket, Protocol,
    TcpHeader, VersionPayload, MUX_MAGIC, SETUP_PAYLOAD,
};
use super::{ConnError, Event, MuxConfig, MuxError};

/// Where the mux link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Our VERSION is queued or sent; waiting for the device's.
    Handshake,
    /// Versions agreed; `header` is the layout used from now on.
    Active { version: u32, header: HeaderVersion },
    /// The device is unusable (unsupported version).
    Failed,
}

/// Counters for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MuxStats {
    pub packets_in: u64,
    pub packets_out: u64,
    pub zlps_out: u64,
    /// Incoming packets or transfers thrown away (each one logged with its reason).
    pub dropped_in: u64,
    /// RSTs sent for packets that matched no connection.
    pub anonymous_rsts: u64,
}

/// A packet waiting for the OUT endpoint. The header layout is fixed when queued (the first
/// VERSION must use v1 even if the reply arrives before it is polled); the v2 sequence fields
/// are filled in when it is actually handed out, as usbmuxd does.
#[derive(Debug)]
struct Queued {
    protocol: Protocol,
    header: HeaderVersion,
    body: Vec<u8>,
}

/// Host side of one usbmux link. See the module documentation for how an edge drives it.
#[derive(Debug)]
pub struct Mux {
    config: MuxConfig,
    phase: Phase,
    tx_seq: u16,
    rx_seq: u16,
    queue: VecDeque<Queued>,
    zlp_due: bool,
    rx: Reassembler,
    conns: BTreeMap<ConnId, Conn>,
    /// Live connections by our source port (unique per device, as in usbmuxd).
    by_port: HashMap<u16, ConnId>,
    next_sport: u16,
    next_id: u32,
    /// Round-robin position so one busy connection cannot starve the others.
    rr_after: Option<ConnId>,
    events: VecDeque<Event>,
    ack_deadline: Option<Instant>,
    stats: MuxStats,
}

impl Mux {
    /// A mux for a freshly claimed interface; its VERSION packet is already queued.
    pub fn new(config: MuxConfig) -> Self {
        if (config.rx_window as usize) > config.inbound_capacity {
            // The device may legitimately fill the advertised window; a smaller buffer would
            // make us reset connections for the device's correct behaviour.
            warn!(
                rx_window = config.rx_window,
                inbound_capacity = config.inbound_capacity,
                "usbmux receive window larger than the inbound buffer"
            );
        }
        let mut mux = Self {
            config,
            phase: Phase::Handshake,
            tx_seq: 0,
            rx_seq: 0,
            queue: VecDeque::new(),
            zlp_due: false,
            rx: Reassembler::new(),
            conns: BTreeMap::new(),
            by_port: HashMap::new(),
            next_sport: 1,
            next_id: 0,
            rr_after: None,
            events: VecDeque::new(),
            ack_deadline: None,
            stats: MuxStats::default(),
        };
        // Neither side knows the other's version yet, so this goes out with the 8-byte header.
        let version = VersionPayload {
            major: 2,
            minor: 0,
            padding: 0,
        };
        mux.queue.push_back(Queued {
            protocol: Protocol::Version,
            header: HeaderVersion::V1,
            body: version.to_bytes().to_vec(),
        });
        mux
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn stats(&self) -> MuxStats {
        self.stats
    }

    /// The v2 header sequence fields (`tx_seq` for the next packet, `rx_seq` as last stored).
    pub fn mux_seq(&self) -> (u16, u16) {
        (self.tx_seq, self.rx_seq)
    }

    pub fn conn_info(&self, conn: ConnId) -> Option<ConnInfo> {
        self.conns.get(&conn).map(Conn::info)
    }

    /// Number of connections the mux still tracks (including reset ones not yet closed).
    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    // ----- input -------------------------------------------------------------------------

    /// Feeds one completed bulk IN transfer.
    ///
    /// Only a fatal link problem is an error; malformed or unexpected packets are dropped,
    /// logged and counted in [`MuxStats::dropped_in`], as usbmuxd does.
    pub fn on_usb_in(&mut self, transfer: &[u8]) -> Result<(), MuxError> {
        if self.phase == Phase::Failed {
            return Err(MuxError::Failed);
        }
        let packet = match self.rx.push(transfer) {
            RxOutcome::Pending => return Ok(()),
            RxOutcome::Dropped(why) => {
                self.drop_in(format_args!("{why}"));
                return Ok(());
            }
            RxOutcome::Packet(packet) => packet,
        };
        self.on_packet(&packet)
    }

    fn on_packet(&mut self, bytes: &[u8]) -> Result<(), MuxError> {
        let layout = match self.phase {
            Phase::Active { header, .. } => header,
            // The device answers VERSION with the 8-byte header (protocol.md §6.4).
            _ => HeaderVersion::V1,
        };
        let packet = match MuxPacket::parse(bytes, layout) {
            Ok(packet) => packet,
            Err(e) => {
                self.drop_in(format_args!("{e}"));
                return Ok(());
            }
        };
        self.stats.packets_in += 1;
        if let Some(seq) = packet.header.v2 {
            if seq.magic != MUX_MAGIC {
                warn!(magic = seq.magic, "usbmux v2 header with unexpected magic");
            }
            // usbmuxd stores the device's rx_seq field, not its tx_seq (protocol.md §6.3).
            self.rx_seq = seq.rx_seq;
        }
        match packet.header.protocol {
            Protocol::Version => self.on_version(packet.payload),
            Protocol::Control => {
                self.on_control(packet.payload);
                Ok(())
            }
            Protocol::Tcp => {
                if matches!(self.phase, Phase::Active { .. }) {
                    self.on_tcp(packet.payload);
                } else {
                    self.drop_in(format_args!("TCP packet before the version handshake"));
                }
                Ok(())
            }
            other => {
                self.drop_in(format_args!(
                    "unexpected mux protocol {} from the device",
                    other.to_u32()
                ));
                Ok(())
            }
        }
    }

    fn on_version(&mut self, payload: &[u8]) -> Result<(), MuxError> {
        if self.phase != Phase::Handshake {
            self.drop_in(format_args!("VERSION packet after the handshake"));
            return Ok(());
        }
        let version = match VersionPayload::parse(payload) {
            Ok(v) => v,
            Err(e) => {
                self.drop_in(format_args!("{e}"));
                return Ok(());
            }
        };
        let header = match version.major {
            1 => HeaderVersion::V1,
            2 => HeaderVersion::V2,
            major => {
                let err = MuxError::UnsupportedVersion {
                    major,
                    minor: version.minor,
                };
                error!("{err}");
                self.phase = Phase::Failed;
                return Err(err);
            }
        };
        info!(
            major = version.major,
            minor = version.minor,
            "usbmux version agreed"
        );
        self.phase = Phase::Active {
            version: version.major,
            header,
        };
        if header == HeaderVersion::V2 {
            self.queue.push_back(Queued {
                protocol: Protocol::Setup,
                header,
                body: vec![SETUP_PAYLOAD],
            });
        }
        self.events.push_back(Event::Ready {
            version: version.major,
        });
        Ok(())
    }

    fn on_control(&mut self, payload: &[u8]) {
        let control = match ControlPayload::parse(payload) {
            Ok(c) => c,
            Err(e) => {
                self.drop_in(format_args!("{e}"));
                return;
            }
        };
        let text = control.text_lossy();
        match control.level {
            ControlLevel::Error => error!(message = %text, "usbmux device error"),
            ControlLevel::Warning => warn!(message = %text, "usbmux device warning"),
            ControlLevel::Info => info!(message = %text, "usbmux device info"),
            ControlLevel::Unknown(kind) => {
                warn!(kind, message = %text, "usbmux device control message of unknown type")
            }
        }
        self.events.push_back(Event::Control {
            level: control.level,
            text,
        });
    }

    fn on_tcp(&mut self, payload: &[u8]) {
        let (th, data) = match TcpHeader::parse(payload) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.drop_in(format_args!("{e}"));
                return;
            }
        };
        trace!(
            sport = th.src_port,
            dport = th.dst_port,
            seq = th.seq,
            ack = th.ack,
            flags = th.flags,
            window = th.window_bytes(),
            len = data.len(),
            "[IN]"
        );
        let found = self.by_port.get(&th.dst_port).copied().filter(|id| {
            self.conns
                .get(id)
                .is_some_and(|c| c.dst_port == th.src_port)
        });
        let Some(id) = found else {
            if th.flags & tcp_flags::RST == 0 {
                debug!(
                    sport = th.dst_port,
                    dport = th.src_port,
                    "packet for no connection; answering RST"
                );
                let rst = TcpHeader {
                    src_port: th.dst_port,
                    dst_port: th.src_port,
                    seq: 0,
                    ack: th.seq,
                    flags: tcp_flags::RST,
                    window: 0,
                };
                self.queue_tcp(rst, &[]);
                self.stats.anonymous_rsts += 1;
            }
            return;
        };
        let window_field = self.window_field();
        let capacity_in = self.config.inbound_capacity;
        let capacity_out = self.config.outbound_capacity;
        // `found` came from `conns`, so the entry exists.
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.peer_window = th.window_bytes();
        match conn.state {
            ConnState::Connecting => {
                conn.peer_ack = th.ack;
                if Conn::is_syn_ack(th.flags) {
                    if th.seq != 0 {
                        // usbmuxd assumes ISN 0 and so do we (protocol.md §12 item 3); if a
                        // restore stalls, this log line is the first lead.
                        warn!(%id, seq = th.seq, "device SYN|ACK with a non-zero ISN");
                    }
                    conn.tx_seq = conn.tx_seq.wrapping_add(1);
                    conn.tx_ack = conn.tx_ack.wrapping_add(1);
                    conn.rx_next = conn.tx_ack;
                    conn.state = ConnState::Connected;
                    let ack = conn.header(tcp_flags::ACK, window_field);
                    let port = conn.dst_port;
                    self.queue_tcp(ack, &[]);
                    debug!(%id, port, "mux connection established");
                    self.events.push_back(Event::Connected(id));
                } else {
                    let port = conn.dst_port;
                    let reason = if th.flags & tcp_flags::RST != 0 {
                        let text = clean_text(data);
                        if text.is_empty() {
                            format!(
                                "the Mac refused a connection to port {port} \
                                 (nothing listening there yet)"
                            )
                        } else {
                            text
                        }
                    } else {
                        // Not a refusal the device sent us: tear it down on its side too.
                        let rst = conn.header(tcp_flags::RST, window_field);
                        self.queue_tcp(rst, &[]);
                        format!(
                            "device answered the connection request with TCP flags {:#04x} \
                             instead of SYN|ACK",
                            th.flags
                        )
                    };
                    info!(%id, port, %reason, "mux connection refused");
                    self.forget(id);
                    self.events.push_back(Event::Refused {
                        conn: id,
                        port,
                        reason,
                    });
                }
            }
            ConnState::Connected | ConnState::Closing => {
                let closing = conn.state == ConnState::Closing;
                if th.flags != tcp_flags::ACK {
                    let reason = if th.flags & tcp_flags::RST != 0 {
                        let text = clean_text(data);
                        if text.is_empty() {
                            "connection reset by the device".to_string()
                        } else {
                            text
                        }
                    } else {
                        let rst = conn.header(tcp_flags::RST, window_field);
                        self.queue_tcp(rst, &[]);
                        format!(
                            "device sent TCP flags {:#04x} on an open connection",
                            th.flags
                        )
                    };
                    self.reset(id, reason, closing);
                    return;
                }
                // Only an ack within what is in flight moves the window. An older one is a
                // harmless duplicate; one beyond what the host sent would make the in-flight
                // count wrap to ~4 GiB and silently stall the connection for good.
                let in_flight = conn.tx_seq.wrapping_sub(conn.peer_ack);
                let advance = th.ack.wrapping_sub(conn.peer_ack);
                if advance <= in_flight {
                    conn.peer_ack = th.ack;
                } else if (advance as i32) > 0 {
                    let rst = conn.header(tcp_flags::RST, window_field);
                    self.queue_tcp(rst, &[]);
                    let reason = format!(
                        "the Mac acknowledged {} bytes the host never sent on this connection \
                         (usbmux protocol error); unplug and replug the Mac and retry",
                        advance - in_flight
                    );
                    self.reset(id, reason, closing);
                    return;
                }
                if conn.write_blocked && conn.outbound_space(capacity_out) > 0 {
                    conn.write_blocked = false;
                    self.events.push_back(Event::Writable(id));
                }
                if data.is_empty() {
                    return;
                }
                if th.seq != conn.rx_next {
                    // USB does not reorder; log it but take the bytes like usbmuxd does.
                    warn!(%id, expected = conn.rx_next, got = th.seq, "mux TCP sequence gap");
                }
                conn.rx_next = th.seq.wrapping_add(data.len() as u32);
                if closing {
                    // Nobody will read it: count it as delivered so the device is not stalled.
                    conn.tx_ack = conn.tx_ack.wrapping_add(data.len() as u32);
                } else if conn.inbound.len() + data.len() > capacity_in {
                    let reason = format!(
                        "device sent {} bytes beyond the {capacity_in}-byte receive buffer \
                         (it ignored the advertised window)",
                        conn.inbound.len() + data.len() - capacity_in
                    );
                    let rst = conn.header(tcp_flags::RST, window_field);
                    self.queue_tcp(rst, &[]);
                    self.reset(id, reason, false);
                    return;
                } else {
                    conn.inbound.extend(data);
                    self.events.push_back(Event::Readable(id));
                }
                // "Device likes it best when we are promptly ACKing data" (usbmuxd).
                let ack = conn.header(tcp_flags::ACK, window_field);
                self.queue_tcp(ack, &[]);
            }
            ConnState::Reset(_) => {}
        }
    }

    /// Ends a live connection the device reset or that broke the rules.
    fn reset(&mut self, id: ConnId, reason: String, silently: bool) {
        if silently {
            // The caller already closed it and expects no more news.
            self.forget(id);
            return;
        }
        info!(%id, %reason, "mux connection closed");
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.state = ConnState::Reset(reason.clone());
            conn.outbound.clear();
            self.by_port.remove(&conn.src_port);
        }
        self.events.push_back(Event::Closed { conn: id, reason });
    }

    fn forget(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.remove(&id) {
            if self.by_port.get(&conn.src_port) == Some(&id) {
                self.by_port.remove(&conn.src_port);
            }
        }
    }

    fn drop_in(&mut self, why: std::fmt::Arguments<'_>) {
        warn!("usbmux: dropped incoming data: {why}");
        self.stats.dropped_in += 1;
    }

    // ----- connections -------------------------------------------------------------------

    /// Opens a connection to `port` on the device. The answer arrives as
    /// [`Event::Connected`] or [`Event::Refused`]; data may be queued with [`Mux::send`]
    /// meanwhile.
    pub fn connect(&mut self, port: u16) -> Result<ConnId, MuxError> {
        match self.phase {
            Phase::Active { .. } => {}
            Phase::Handshake => return Err(MuxError::NotReady),
            Phase::Failed => return Err(MuxError::Failed),
        }
        let sport = self.find_sport().ok_or(MuxError::NoFreePort)?;
        let id = ConnId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        let mut conn = Conn::new(sport, port);
        let syn = conn.header(tcp_flags::SYN, self.window_field());
        self.conns.insert(id, conn);
        self.by_port.insert(sport, id);
        self.queue_tcp(syn, &[]);
        debug!(%id, sport, port, "mux connection requested");
        Ok(id)
    }

    fn find_sport(&mut self) -> Option<u16> {
        if self.by_port.len() >= usize::from(u16::MAX) {
            return None;
        }
        loop {
            let candidate = self.next_sport;
            self.next_sport = self.next_sport.wrapping_add(1).max(1);
            if candidate != 0 && !self.by_port.contains_key(&candidate) {
                return Some(candidate);
            }
        }
    }

    /// Queues bytes for the device; returns how many were accepted (0 = buffer full, wait for
    /// [`Event::Writable`]).
    pub fn send(&mut self, id: ConnId, data: &[u8]) -> Result<usize, ConnError> {
        let capacity = self.config.outbound_capacity;
        let conn = self.conns.get_mut(&id).ok_or(ConnError::Unknown(id))?;
        match &conn.state {
            ConnState::Reset(reason) => {
                return Err(ConnError::Reset {
                    reason: reason.clone(),
                })
            }
            ConnState::Closing => return Err(ConnError::Unknown(id)),
            ConnState::Connecting | ConnState::Connected => {}
        }
        let n = data.len().min(conn.outbound_space(capacity));
        conn.outbound.extend(&data[..n]);
        if n < data.len() {
            conn.write_blocked = true;
        }
        Ok(n)
    }

    /// Reads received bytes. `Ok(0)` with a non-empty `buf` means nothing yet (wait for
    /// [`Event::Readable`]); once a reset connection is drained the reset is reported.
    pub fn recv(&mut self, id: ConnId, buf: &mut [u8]) -> Result<usize, ConnError> {
        let conn = self.readable_conn(id)?;
        Ok(conn.read_into(buf))
    }

    /// The received bytes not yet consumed, as the two halves of a ring buffer.
    pub fn peek(&self, id: ConnId) -> Result<(&[u8], &[u8]), ConnError> {
        let conn = self.conns.get(&id).ok_or(ConnError::Unknown(id))?;
        if conn.state == ConnState::Closing {
            return Err(ConnError::Unknown(id));
        }
        Ok(conn.inbound.as_slices())
    }

    /// Marks `n` received bytes as delivered (after [`Mux::peek`]); returns how many were.
    pub fn consume(&mut self, id: ConnId, n: usize) -> Result<usize, ConnError> {
        let conn = self.readable_conn(id)?;
        Ok(conn.consume(n))
    }

    fn readable_conn(&mut self, id: ConnId) -> Result<&mut Conn, ConnError> {
        let conn = self.conns.get_mut(&id).ok_or(ConnError::Unknown(id))?;
        match &conn.state {
            ConnState::Closing => Err(ConnError::Unknown(id)),
            ConnState::Reset(reason) if conn.inbound.is_empty() => Err(ConnError::Reset {
                reason: reason.clone(),
            }),
            _ => Ok(conn),
        }
    }

    /// Closes a connection: data already accepted by [`Mux::send`] still goes out, then a RST
    /// (usbmux has no FIN). Unread received data is discarded. After this the id is gone.
    pub fn close(&mut self, id: ConnId) -> Result<(), ConnError> {
        let conn = self.conns.get_mut(&id).ok_or(ConnError::Unknown(id))?;
        match conn.state {
            ConnState::Connected if !conn.outbound.is_empty() => {
                conn.state = ConnState::Closing;
                conn.inbound.clear();
                conn.write_blocked = false;
            }
            ConnState::Closing => {}
            ConnState::Connecting | ConnState::Connected => return self.abort(id),
            ConnState::Reset(_) => self.forget(id),
        }
        Ok(())
    }

    /// Closes a connection at once with a RST, discarding unsent data.
    pub fn abort(&mut self, id: ConnId) -> Result<(), ConnError> {
        let window_field = self.window_field();
        let conn = self.conns.get_mut(&id).ok_or(ConnError::Unknown(id))?;
        if !matches!(conn.state, ConnState::Reset(_)) {
            let rst = conn.header(tcp_flags::RST, window_field);
            self.queue_tcp(rst, &[]);
            debug!(%id, "mux connection closed by us");
        }
        self.forget(id);
        Ok(())
    }

    // ----- timers ------------------------------------------------------------------------

    /// When [`Mux::on_timer`] must run next, if at all. `now` starts the ACK delay for ACKs
    /// that became owed since the last call (reading data makes an ACK owed).
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Instant> {
        if !self.any_ack_pending() {
            self.ack_deadline = None;
            return None;
        }
        Some(
            *self
                .ack_deadline
                .get_or_insert_with(|| now + self.config.ack_delay),
        )
    }

    /// Sends the ACKs that waited long enough: window updates after the consumer read data.
    pub fn on_timer(&mut self, now: Instant) {
        match self.ack_deadline {
            Some(deadline) if now >= deadline => {}
            Some(_) => return,
            None => {
                if self.any_ack_pending() {
                    self.ack_deadline = Some(now + self.config.ack_delay);
                }
                return;
            }
        }
        self.ack_deadline = None;
        let window_field = self.window_field();
        let mut acks = Vec::new();
        for conn in self.conns.values_mut() {
            if conn.state == ConnState::Connected && conn.ack_pending() {
                acks.push(conn.header(tcp_flags::ACK, window_field));
            }
        }
        for ack in acks {
            self.queue_tcp(ack, &[]);
        }
    }

    fn any_ack_pending(&self) -> bool {
        self.conns
            .values()
            .any(|c| c.state == ConnState::Connected && c.ack_pending())
    }

    // ----- output ------------------------------------------------------------------------

    /// Next event for the caller.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next bulk OUT transfer, at most [`super::MAX_TX_PACKET`] bytes. An empty buffer is
    /// a zero-length packet: it follows any transfer whose length is a multiple of the OUT
    /// endpoint's `wMaxPacketSize` and must be sent as its own transfer.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        if self.zlp_due {
            self.zlp_due = false;
            self.stats.zlps_out += 1;
            return Some(Vec::new());
        }
        let packet = match self.queue.pop_front() {
            Some(q) => {
                let seq = self.next_seq(q.header, q.protocol);
                MuxPacket::build(q.protocol, seq, &[&q.body])
            }
            None => self.next_data_packet()?,
        };
        let max_packet = match self.config.out_max_packet_size {
            0 => 64,
            n => n,
        };
        if packet.len() % max_packet == 0 {
            self.zlp_due = true;
        }
        self.stats.packets_out += 1;
        Some(packet)
    }

    /// The v2 sequence fields of the packet handed out now (none with the v1 layout).
    fn next_seq(&mut self, header: HeaderVersion, protocol: Protocol) -> Option<(u16, u16)> {
        match header {
            HeaderVersion::V1 => None,
            HeaderVersion::V2 => {
                if protocol == Protocol::Setup {
                    self.tx_seq = 0;
                    self.rx_seq = 0xFFFF;
                }
                let seq = (self.tx_seq, self.rx_seq);
                self.tx_seq = self.tx_seq.wrapping_add(1);
                Some(seq)
            }
        }
    }

    /// Builds one data packet from the next connection (round robin) that may send, or the
    /// RST of a closing connection whose data is all out. The payload is copied once, straight
    /// from the connection's buffer into the transfer: at USB line rate every extra pass over
    /// the image costs CPU the host could otherwise spend elsewhere.
    fn next_data_packet(&mut self) -> Option<Vec<u8>> {
        let header = match self.phase {
            Phase::Active { header, .. } => header,
            _ => return None,
        };
        let window_field = self.window_field();
        let start = self.rr_after;
        let candidates = self
            .conns
            .iter()
            .filter(|(id, _)| start.map_or(true, |s| **id > s))
            .chain(
                self.conns
                    .iter()
                    .filter(|(id, _)| start.is_some_and(|s| **id <= s)),
            );
        let mut chosen = None;
        for (id, conn) in candidates {
            let ready = match conn.state {
                ConnState::Connected => conn.sendable() > 0,
                ConnState::Closing => conn.sendable() > 0 || conn.outbound.is_empty(),
                _ => false,
            };
            if ready {
                chosen = Some(*id);
                break;
            }
        }
        let id = chosen?;
        self.rr_after = Some(id);
        let seq = self.next_seq(header, Protocol::Tcp);
        let conn = self.conns.get_mut(&id)?;
        let n = conn.sendable();
        if n == 0 {
            // A closing connection with everything sent: finish it.
            let rst = conn.header(tcp_flags::RST, window_field);
            self.forget(id);
            return Some(MuxPacket::build(Protocol::Tcp, seq, &[&rst.to_bytes()]));
        }
        let th = conn.header(tcp_flags::ACK, window_field);
        // n ≤ 49 116, so the cast is lossless.
        conn.tx_seq = conn.tx_seq.wrapping_add(n as u32);
        let (front, back) = conn.outbound.as_slices();
        let from_front = n.min(front.len());
        let packet = MuxPacket::build(
            Protocol::Tcp,
            seq,
            &[
                &th.to_bytes(),
                &front[..from_front],
                &back[..n - from_front],
            ],
        );
        // Dropping a drain from the front only moves the ring's head.
        conn.outbound.drain(..n);
        trace!(%id, seq = th.seq, ack = th.ack, len = n, "[OUT] data");
        Some(packet)
    }

    fn queue_tcp(&mut self, th: TcpHeader, data: &[u8]) {
        let header = match self.phase {
            Phase::Active { header, .. } => header,
            // TCP is only ever queued once active.
            _ => HeaderVersion::V2,
        };
        trace!(
            sport = th.src_port,
            dport = th.dst_port,
            seq = th.seq,
            ack = th.ack,
            flags = th.flags,
            "[OUT]"
        );
        self.queue.push_back(tcp_queued(header, th, data));
    }

    fn window_field(&self) -> u16 {
        TcpHeader::window_field(self.config.rx_window)
    }
}

fn tcp_queued(header: HeaderVersion, th: TcpHeader, data: &[u8]) -> Queued {
    let mut body = Vec::with_capacity(th.to_bytes().len() + data.len());
    body.extend_from_slice(&th.to_bytes());
    body.extend_from_slice(data);
    Queued {
        protocol: Protocol::Tcp,
        header,
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const DEVICE_V2: [u8; 20] = [0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0];

    fn active_v2() -> Mux {
        let mut mux = Mux::new(MuxConfig::default());
        mux.on_usb_in(&DEVICE_V2).unwrap();
        while mux.poll_transmit().is_some() {}
        mux
    }

    #[test]
    fn version_is_queued_with_v1_header_even_if_polled_late() {
        let mut mux = Mux::new(MuxConfig::default());
        // The reply arrives before our VERSION was even taken from the queue.
        mux.on_usb_in(&DEVICE_V2).unwrap();
        let version = mux.poll_transmit().unwrap();
        assert_eq!(version.len(), 20);
        let setup = mux.poll_transmit().unwrap();
        assert_eq!(setup.len(), 17);
        assert_eq!(mux.mux_seq(), (1, 0xFFFF));
    }

    #[test]
    fn second_version_is_dropped() {
        let mut mux = active_v2();
        let stats = mux.stats();
        let mut v2_version = vec![0, 0, 0, 0, 0, 0, 0, 28, 0xFE, 0xED, 0xFA, 0xCE, 0, 0, 0, 0];
        v2_version.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]);
        mux.on_usb_in(&v2_version).unwrap();
        assert_eq!(mux.stats().dropped_in, stats.dropped_in + 1);
        assert_eq!(mux.poll_event(), Some(Event::Ready { version: 2 }));
        assert_eq!(mux.poll_event(), None);
    }

    #[test]
    fn mux_tx_seq_wraps() {
        let mut mux = active_v2();
        mux.tx_seq = 0xFFFF;
        mux.connect(1).unwrap();
        let syn = mux.poll_transmit().unwrap();
        assert_eq!(&syn[12..14], &[0xFF, 0xFF]);
        assert_eq!(mux.mux_seq().0, 0);
    }

    #[test]
    fn source_ports_wrap_past_65535_and_skip_zero_and_used_ones() {
        let mut mux = active_v2();
        let a = mux.connect(1).unwrap();
        assert_eq!(mux.conn_info(a).unwrap().src_port, 1);
        mux.next_sport = 0xFFFF;
        let b = mux.connect(1).unwrap();
        assert_eq!(mux.conn_info(b).unwrap().src_port, 0xFFFF);
        // 0 is never used and 1 is taken.
        let c = mux.connect(1).unwrap();
        assert_eq!(mux.conn_info(c).unwrap().src_port, 2);
    }

    #[test]
    fn timer_arms_itself_when_not_asked_first() {
        let mut mux = active_v2();
        let id = mux.connect(1).unwrap();
        // SYN|ACK, then 4 data bytes.
        let mut p = vec![0, 0, 0, 6, 0, 0, 0, 36, 0xFE, 0xED, 0xFA, 0xCE, 0, 0, 0, 0];
        p.extend_from_slice(&[
            0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0x50, 0x12, 2, 0, 0, 0, 0, 0,
        ]);
        mux.on_usb_in(&p).unwrap();
        let mut d = vec![0, 0, 0, 6, 0, 0, 0, 40, 0xFE, 0xED, 0xFA, 0xCE, 0, 1, 0, 0];
        d.extend_from_slice(&[
            0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 2, 0, 0, 0, 0, 0,
        ]);
        d.extend_from_slice(b"data");
        mux.on_usb_in(&d).unwrap();
        while mux.poll_transmit().is_some() {}
        let mut buf = [0u8; 4];
        assert_eq!(mux.recv(id, &mut buf).unwrap(), 4);
        let t0 = Instant::now();
        mux.on_timer(t0);
        assert_eq!(mux.poll_transmit(), None, "first call only arms the delay");
        mux.on_timer(t0 + Duration::from_millis(30));
        let ack = mux.poll_transmit().unwrap();
        // ack field of the TCP header: 1 + 4 delivered bytes
        assert_eq!(&ack[16 + 8..16 + 12], &[0, 0, 0, 5]);
        assert_eq!(mux.poll_timeout(t0), None);
    }

    #[test]
    fn tcp_before_handshake_is_dropped() {
        let mut mux = Mux::new(MuxConfig::default());
        let mut p = vec![0, 0, 0, 6, 0, 0, 0, 28];
        p.extend_from_slice(&[
            0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0x50, 0x10, 2, 0, 0, 0, 0, 0,
        ]);
        mux.on_usb_in(&p).unwrap();
        assert_eq!(mux.stats().dropped_in, 1);
        assert_eq!(mux.phase(), Phase::Handshake);
    }
}
