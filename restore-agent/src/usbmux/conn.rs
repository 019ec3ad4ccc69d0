//! One emulated TCP connection over the mux (protocol.md §6.5): its sequence state and its
//! inbound/outbound buffers. The [`super::Mux`] owns these and decides when packets go out.

use std::collections::VecDeque;
use std::fmt;

use super::wire::{tcp_flags, TcpHeader};

/// Largest TCP payload per packet: 49 152 (mux packet limit) − 16 (v2 header) − 20 (TCP).
pub const MAX_TCP_PAYLOAD: usize = 49_116;
/// usbmuxd also caps each send at its outbound buffer size.
pub const MAX_SEND_CHUNK: usize = 65_536;

/// Handle for one connection of one [`super::Mux`]. Never reused within a mux, unlike the
/// 16-bit source ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub(crate) u32);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mux connection #{}", self.0)
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    /// SYN sent, waiting for SYN|ACK.
    Connecting,
    /// Data flows both ways.
    Connected,
    /// The caller closed it; unsent data still goes out, then a RST.
    Closing,
    /// The device reset it; buffered inbound data can still be read.
    Reset(String),
}

/// A read-only view of a connection, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub state: ConnState,
    pub src_port: u16,
    pub dst_port: u16,
    /// Next sequence number the host sends.
    pub tx_seq: u32,
    /// Ack number the host reports: device bytes delivered to the consumer.
    pub tx_ack: u32,
    /// The device's latest ack of host bytes.
    pub peer_ack: u32,
    /// The device's latest advertised window, in bytes.
    pub peer_window: u32,
    /// Bytes received and not yet read by the consumer.
    pub inbound_len: usize,
    /// Bytes accepted from the consumer and not yet sent.
    pub unsent_len: usize,
    /// Bytes sent and not yet acknowledged by the device.
    pub unacked_len: usize,
}

/// `Debug` is written by hand so that logging a mux never dumps up to 320 KiB of buffers.
pub(crate) struct Conn {
    pub state: ConnState,
    pub src_port: u16,
    pub dst_port: u16,
    pub tx_seq: u32,
    pub tx_ack: u32,
    /// The ack number in the last packet we queued; differs from `tx_ack` while an ACK is owed.
    pub tx_acked: u32,
    /// Sequence number we expect next from the device (only used to log gaps).
    pub rx_next: u32,
    pub peer_ack: u32,
    pub peer_window: u32,
    pub inbound: VecDeque<u8>,
    pub outbound: VecDeque<u8>,
    /// A `send` was cut short; tell the consumer when space frees up.
    pub write_blocked: bool,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.info(), f)
    }
}

impl Conn {
    pub fn new(src_port: u16, dst_port: u16) -> Self {
        Self {
            state: ConnState::Connecting,
            src_port,
            dst_port,
            tx_seq: 0,
            tx_ack: 0,
            tx_acked: 0,
            rx_next: 0,
            peer_ack: 0,
            peer_window: 0,
            inbound: VecDeque::new(),
            outbound: VecDeque::new(),
            write_blocked: false,
        }
    }

    pub fn unacked(&self) -> usize {
        self.tx_seq.wrapping_sub(self.peer_ack) as usize
    }

    /// Room in the outbound buffer: data in flight counts until the device acknowledges it.
    pub fn outbound_space(&self, capacity: usize) -> usize {
        capacity.saturating_sub(self.outbound.len() + self.unacked())
    }

    /// Payload size the next data packet may carry.
    pub fn sendable(&self) -> usize {
        let window = (self.peer_window as usize).saturating_sub(self.unacked());
        self.outbound
            .len()
            .min(window)
            .min(MAX_SEND_CHUNK)
            .min(MAX_TCP_PAYLOAD)
    }

    pub fn ack_pending(&self) -> bool {
        self.tx_ack != self.tx_acked
    }

    /// A header from this connection's current state; records that the ack went out.
    pub fn header(&mut self, flags: u8, window_field: u16) -> TcpHeader {
        self.tx_acked = self.tx_ack;
        TcpHeader {
            src_port: self.src_port,
            dst_port: self.dst_port,
            seq: self.tx_seq,
            ack: self.tx_ack,
            flags,
            window: window_field,
        }
    }

    /// Takes up to `buf.len()` inbound bytes and counts them as delivered (advancing the ack).
    pub fn read_into(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.inbound.len());
        let (front, back) = self.inbound.as_slices();
        let from_front = n.min(front.len());
        buf[..from_front].copy_from_slice(&front[..from_front]);
        buf[from_front..n].copy_from_slice(&back[..n - from_front]);
        self.inbound.drain(..n);
        self.delivered(n);
        n
    }

    pub fn consume(&mut self, n: usize) -> usize {
        let n = n.min(self.inbound.len());
        self.inbound.drain(..n);
        self.delivered(n);
        n
    }

    fn delivered(&mut self, n: usize) {
        // n ≤ 262 144, so the cast is lossless; sequence space wraps by design.
        self.tx_ack = self.tx_ack.wrapping_add(n as u32);
    }

    pub fn info(&self) -> ConnInfo {
        ConnInfo {
            state: self.state.clone(),
            src_port: self.src_port,
            dst_port: self.dst_port,
            tx_seq: self.tx_seq,
            tx_ack: self.tx_ack,
            peer_ack: self.peer_ack,
            peer_window: self.peer_window,
            inbound_len: self.inbound.len(),
            unsent_len: self.outbound.len(),
            unacked_len: self.unacked(),
        }
    }

    /// Whether `flags` is exactly the SYN|ACK that opens a connection.
    pub fn is_syn_ack(flags: u8) -> bool {
        flags == tcp_flags::SYN | tcp_flags::ACK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sendable_respects_window_unacked_and_caps() {
        let mut c = Conn::new(1, 62078);
        c.state = ConnState::Connected;
        c.tx_seq = 1;
        c.peer_ack = 1;
        c.peer_window = 131_072;
        c.outbound.extend(std::iter::repeat(0u8).take(60_000));
        assert_eq!(c.sendable(), MAX_TCP_PAYLOAD);
        c.tx_seq = 1 + 100_000;
        assert_eq!(c.unacked(), 100_000);
        assert_eq!(c.sendable(), 31_072);
        c.peer_window = 65_536; // the device shrank its window below what is in flight
        assert_eq!(c.sendable(), 0);
    }

    #[test]
    fn outbound_space_counts_in_flight_bytes() {
        let mut c = Conn::new(1, 2);
        c.outbound.extend([1, 2, 3]);
        c.tx_seq = 1000;
        c.peer_ack = 900;
        assert_eq!(c.outbound_space(65_536), 65_536 - 103);
        assert_eq!(c.outbound_space(50), 0);
    }

    #[test]
    fn reading_advances_ack_and_marks_it_pending() {
        let mut c = Conn::new(1, 2);
        c.tx_ack = 1;
        c.tx_acked = 1;
        c.inbound.extend(b"hello world");
        let mut buf = [0u8; 5];
        assert_eq!(c.read_into(&mut buf), 5);
        assert_eq!(&buf, b"hello");
        assert_eq!(c.tx_ack, 6);
        assert!(c.ack_pending());
        assert_eq!(c.consume(100), 6);
        assert_eq!(c.tx_ack, 12);
        let h = c.header(tcp_flags::ACK, 512);
        assert_eq!(h.ack, 12);
        assert!(!c.ack_pending());
    }

    #[test]
    fn reads_across_the_ring_buffers_wrap_keep_byte_order() {
        let mut c = Conn::new(1, 2);
        c.inbound.reserve_exact(8);
        let cap = c.inbound.capacity();
        // Fill, then take from the front and append so the data wraps around the ring.
        c.inbound.extend((0..cap).map(|i| i as u8));
        c.inbound.drain(..cap - 3);
        c.inbound.extend([200, 201, 202, 203]);
        assert!(
            !c.inbound.as_slices().1.is_empty(),
            "the test needs a wrapped ring"
        );
        let want: Vec<u8> = c.inbound.iter().copied().collect();
        let mut buf = vec![0u8; want.len() + 5];
        assert_eq!(c.read_into(&mut buf), want.len());
        assert_eq!(&buf[..want.len()], &want[..]);
        assert_eq!(c.tx_ack, want.len() as u32);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut c = Conn::new(1, 2);
        c.tx_ack = u32::MAX - 1;
        c.inbound.extend([0u8; 4]);
        c.consume(4);
        assert_eq!(c.tx_ack, 2);
        c.tx_seq = 3;
        c.peer_ack = u32::MAX - 2;
        assert_eq!(c.unacked(), 6);
    }
}
