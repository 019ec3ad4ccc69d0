//! The host side of usbmux (protocol.md §6), the multiplexer a Mac in restore mode speaks on its
//! vendor bulk interface, as a sans-IO state machine.
//!
//! [`Mux`] never touches USB. The edge that owns the bulk endpoints drives it:
//!
//! * submit bulk IN transfers of [`RX_TRANSFER_SIZE`] bytes and hand every completed one to
//!   [`Mux::on_usb_in`];
//! * after every call into the mux, drain [`Mux::poll_transmit`] and write each returned buffer
//!   as **one** bulk OUT transfer, in order — an empty buffer is a zero-length packet and must be
//!   sent as such;
//! * drain [`Mux::poll_event`] and wake the tasks waiting on the named connections;
//! * keep one timer armed at [`Mux::poll_timeout`] and call [`Mux::on_timer`] when it fires.
//!
//! Connections are byte streams: [`Mux::send`] / [`Mux::recv`] map directly onto
//! `AsyncWrite::poll_write` / `AsyncRead::poll_read` (`Ok(0)` = wait for
//! [`Event::Writable`] / [`Event::Readable`]).
//!
//! The mux only opens connections its caller asks for; it never sends Apple's mode-switch
//! requests nor usbmuxd's lockdown "preflight" (§6.8: both are suspected of breaking Mac
//! restores).

mod conn;
pub mod edge;
mod mux;
pub mod rx;
pub mod wire;

use std::time::Duration;

use thiserror::Error;

pub use conn::{ConnId, ConnInfo, ConnState, MAX_SEND_CHUNK, MAX_TCP_PAYLOAD};
pub use mux::{Mux, MuxStats, Phase};
pub use rx::{MAX_RX_PACKET, RX_TRANSFER_SIZE};
pub use wire::ControlLevel;

/// Largest bulk OUT transfer the mux emits ("USB_MTU", 3 × 16 384).
pub const MAX_TX_PACKET: usize = 49_152;

/// Tunables of a [`Mux`]. The defaults are usbmuxd's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MuxConfig {
    /// `wMaxPacketSize` of the bulk OUT endpoint; a transfer that is a multiple of it must be
    /// followed by a zero-length packet. 0 means unknown and falls back to 64 like usbmuxd.
    pub out_max_packet_size: usize,
    /// Receive window advertised on every TCP packet, in bytes (sent as `>> 8`).
    pub rx_window: u32,
    /// Per-connection buffer for device bytes not yet read.
    pub inbound_capacity: usize,
    /// Per-connection buffer for caller bytes not yet sent or not yet acknowledged.
    pub outbound_capacity: usize,
    /// How long an ACK owed after the consumer read data may wait for a packet to ride on.
    pub ack_delay: Duration,
}

impl Default for MuxConfig {
    fn default() -> Self {
        Self {
            out_max_packet_size: 512,
            rx_window: 131_072,
            inbound_capacity: 262_144,
            outbound_capacity: 65_536,
            ack_delay: Duration::from_millis(30),
        }
    }
}

/// Something the caller of a [`Mux`] should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The handshake finished; connections may be opened. `version` is the device's major.
    Ready { version: u32 },
    /// The device accepted the connection.
    Connected(ConnId),
    /// The device refused the connection (nothing listens on the port yet, usually).
    Refused {
        conn: ConnId,
        port: u16,
        reason: String,
    },
    /// Data arrived for the connection.
    Readable(ConnId),
    /// Outbound buffer space freed up after a short `send`.
    Writable(ConnId),
    /// The device ended the connection (or broke its rules and we ended it). Data already
    /// received can still be read; then [`Mux::recv`] reports the reset.
    Closed { conn: ConnId, reason: String },
    /// A CONTROL message from the device; already logged, passed on for the restore log.
    Control { level: ControlLevel, text: String },
}

/// Errors of the mux as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MuxError {
    #[error(
        "unsupported usbmux version {major} (minor {minor}): the Mac speaks a mux protocol this \
         agent does not know (only 1 and 2 are); report the Mac model and macOS version"
    )]
    UnsupportedVersion { major: u32, minor: u32 },
    #[error(
        "the usbmux handshake has not finished; wait for the Ready event before opening \
         connections"
    )]
    NotReady,
    #[error(
        "the usbmux link failed earlier and cannot be used; unplug and replug the USB-C cable, \
         then start the restore again"
    )]
    Failed,
    #[error("all 65 535 mux source ports are in use; close connections that are finished")]
    NoFreePort,
}

/// Errors of one connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConnError {
    #[error("{0} does not exist (already closed, or refused)")]
    Unknown(ConnId),
    #[error("the Mac reset the connection: {reason}")]
    Reset { reason: String },
}
