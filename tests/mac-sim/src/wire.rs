//! The USB wire as the simulated Mac sees it: setup packets in, replies out, and link changes.
//!
//! The device model ([`crate::device`]) implements [`SimDevice`]; front ends (in-process bus,
//! USB/IP server) only move these values around. Nothing here knows about Apple protocols.

use std::time::Instant;

/// An 8-byte USB setup packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Setup {
    pub request_type: u8,
    pub request: u8,
    pub value: u16,
    pub index: u16,
    pub length: u16,
}

impl Setup {
    pub fn from_bytes(b: [u8; 8]) -> Self {
        Self {
            request_type: b[0],
            request: b[1],
            value: u16::from_le_bytes([b[2], b[3]]),
            index: u16::from_le_bytes([b[4], b[5]]),
            length: u16::from_le_bytes([b[6], b[7]]),
        }
    }

    pub fn to_bytes(&self) -> [u8; 8] {
        let v = self.value.to_le_bytes();
        let i = self.index.to_le_bytes();
        let l = self.length.to_le_bytes();
        [
            self.request_type,
            self.request,
            v[0],
            v[1],
            i[0],
            i[1],
            l[0],
            l[1],
        ]
    }

    /// Data stage direction: device-to-host.
    pub fn is_in(&self) -> bool {
        self.request_type & 0x80 != 0
    }
}

/// How the device answers one transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Completed. For IN transfers the data (front ends truncate to the requested length);
    /// for OUT transfers the number of bytes accepted is the request's length, data is empty.
    Ack(Vec<u8>),
    /// Protocol stall (EPIPE on the host).
    Stall,
    /// Nothing to send yet (bulk IN only): the front end keeps the request pending and asks again.
    Nak,
}

/// Link speed reported at attach time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speed {
    Full,
    High,
}

/// Everything a host reads at enumeration, for the device's current incarnation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enumeration {
    pub vendor_id: u16,
    pub product_id: u16,
    pub speed: Speed,
    /// The 18-byte device descriptor.
    pub device_descriptor: Vec<u8>,
    /// Full configuration descriptors (config + interfaces + endpoints + class descriptors),
    /// index 0 = configuration value 1.
    pub configurations: Vec<Vec<u8>>,
}

/// A link-level change the device wants the front end to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkChange {
    /// Drop off the bus (the host sees an unplug).
    Detach,
    /// Appear on the bus with the descriptors of [`SimDevice::enumeration`].
    Attach,
}

/// A simulated USB device as front ends drive it.
///
/// Front ends call [`SimDevice::poll_link`] after every transfer and at least every 10 ms while
/// idle; the device uses it to detach and re-attach itself on its own schedule (a Mac rebooting
/// into the next stage).
pub trait SimDevice: Send {
    fn enumeration(&self) -> Enumeration;
    fn control(&mut self, setup: &Setup, data_out: &[u8]) -> Reply;
    fn bulk_out(&mut self, endpoint: u8, data: &[u8]) -> Reply;
    fn bulk_in(&mut self, endpoint: u8, max_len: usize) -> Reply;
    /// A USB port reset reached the device (front ends that cannot see resets never call this).
    fn reset(&mut self);
    fn poll_link(&mut self, now: Instant) -> Option<LinkChange>;
    /// Whether the device is currently on the bus.
    fn attached(&self) -> bool;
}
