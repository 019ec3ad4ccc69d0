//! Reassembly of mux packets from bulk IN transfers (protocol.md §6.2).
//!
//! The host reads in 16 384-byte transfers. A device packet larger than that arrives as a
//! full-size transfer followed by more transfers; usbmuxd glues them together when the first
//! transfer is exactly full and its header announces more, and stops at the announced length or
//! at the first short transfer. We follow the same rule so that we accept exactly what it accepts.

use std::borrow::Cow;

/// Size of every bulk IN transfer the edge must submit ("USB_MRU").
pub const RX_TRANSFER_SIZE: usize = 16_384;
/// Largest mux packet accepted from the device ("DEV_MRU").
pub const MAX_RX_PACKET: usize = 65_536;

/// What one completed IN transfer produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RxOutcome<'a> {
    /// A whole packet (still to be length-checked by the parser).
    Packet(Cow<'a, [u8]>),
    /// More transfers are needed, or the transfer was skipped (an empty one, or the tail of a
    /// packet already dropped).
    Pending,
    /// The bytes gathered so far were thrown away.
    Dropped(RxDrop),
}

/// Why reassembly threw bytes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxDrop {
    /// The header announced a packet larger than the device may send.
    TooLarge { declared: usize },
    /// Continuation transfers went past the 64 KiB limit.
    Overflow { gathered: usize },
}

impl std::fmt::Display for RxDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge { declared } => write!(
                f,
                "device announced a {declared}-byte mux packet, above the \
                 {MAX_RX_PACKET}-byte limit"
            ),
            Self::Overflow { gathered } => write!(
                f,
                "continuation transfers reached {gathered} bytes, above the \
                 {MAX_RX_PACKET}-byte limit"
            ),
        }
    }
}

/// Gathers multi-transfer packets.
#[derive(Debug, Default)]
pub struct Reassembler {
    buf: Vec<u8>,
    expected: usize,
    /// Skipping the rest of a dropped oversized packet until a short transfer ends it.
    discarding: bool,
}

impl Reassembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// True while a packet is partially gathered.
    pub fn in_progress(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Feeds one completed bulk IN transfer.
    pub fn push<'a>(&mut self, transfer: &'a [u8]) -> RxOutcome<'a> {
        let full = transfer.len() == RX_TRANSFER_SIZE;
        if self.discarding {
            if !full {
                self.discarding = false;
            }
            return RxOutcome::Pending;
        }
        if self.in_progress() {
            let gathered = self.buf.len() + transfer.len();
            if gathered > MAX_RX_PACKET {
                self.buf.clear();
                self.discarding = full;
                return RxOutcome::Dropped(RxDrop::Overflow { gathered });
            }
            self.buf.extend_from_slice(transfer);
            if self.buf.len() >= self.expected || !full {
                return RxOutcome::Packet(Cow::Owned(std::mem::take(&mut self.buf)));
            }
            return RxOutcome::Pending;
        }
        if transfer.is_empty() {
            // A zero-length packet ends a transfer that was a multiple of the packet size; it
            // carries nothing.
            return RxOutcome::Pending;
        }
        if full {
            let declared = declared_length(transfer);
            if declared > RX_TRANSFER_SIZE {
                if declared > MAX_RX_PACKET {
                    self.discarding = true;
                    return RxOutcome::Dropped(RxDrop::TooLarge { declared });
                }
                self.buf.extend_from_slice(transfer);
                self.expected = declared;
                return RxOutcome::Pending;
            }
        }
        RxOutcome::Packet(Cow::Borrowed(transfer))
    }
}

/// The mux header's length field (bytes 4..8 in both header versions); only called on a full
/// 16 384-byte transfer, so the bytes exist.
fn declared_length(transfer: &[u8]) -> usize {
    match transfer.get(4..8) {
        Some(&[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]) as usize,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(len: usize) -> Vec<u8> {
        let mut p: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        p[4..8].copy_from_slice(&(len as u32).to_be_bytes());
        p
    }

    fn owned(outcome: RxOutcome<'_>) -> Option<Vec<u8>> {
        match outcome {
            RxOutcome::Packet(p) => Some(p.into_owned()),
            _ => None,
        }
    }

    #[test]
    fn small_packet_passes_through() {
        let mut rx = Reassembler::new();
        let p = packet(36);
        assert_eq!(owned(rx.push(&p)), Some(p));
        assert!(!rx.in_progress());
    }

    #[test]
    fn forty_thousand_bytes_in_three_transfers() {
        let mut rx = Reassembler::new();
        let p = packet(40_000);
        assert_eq!(rx.push(&p[..16_384]), RxOutcome::Pending);
        assert_eq!(rx.push(&p[16_384..32_768]), RxOutcome::Pending);
        assert_eq!(owned(rx.push(&p[32_768..])), Some(p));
        assert!(!rx.in_progress());
    }

    #[test]
    fn exact_multiple_completes_without_short_transfer() {
        let mut rx = Reassembler::new();
        let p = packet(32_768);
        assert_eq!(rx.push(&p[..16_384]), RxOutcome::Pending);
        assert_eq!(owned(rx.push(&p[16_384..])), Some(p));
        // the device's trailing ZLP is ignored
        assert_eq!(rx.push(&[]), RxOutcome::Pending);
    }

    #[test]
    fn full_transfer_that_is_the_whole_packet() {
        let mut rx = Reassembler::new();
        let p = packet(16_384);
        assert_eq!(owned(rx.push(&p)), Some(p));
    }

    #[test]
    fn short_transfer_ends_an_incomplete_packet() {
        let mut rx = Reassembler::new();
        let p = packet(40_000);
        assert_eq!(rx.push(&p[..16_384]), RxOutcome::Pending);
        // the device gave up after 20 000 bytes: hand over what we have; the parser's length
        // check then drops it
        let got = owned(rx.push(&p[16_384..20_000])).unwrap();
        assert_eq!(got.len(), 20_000);
        assert!(!rx.in_progress());
    }

    #[test]
    fn oversized_declaration_is_skipped_until_short_transfer() {
        let mut rx = Reassembler::new();
        let mut first = vec![0u8; 16_384];
        first[4..8].copy_from_slice(&100_000u32.to_be_bytes());
        assert_eq!(
            rx.push(&first),
            RxOutcome::Dropped(RxDrop::TooLarge { declared: 100_000 })
        );
        assert_eq!(rx.push(&[0u8; 16_384]), RxOutcome::Pending);
        assert_eq!(rx.push(&[0u8; 100]), RxOutcome::Pending);
        let p = packet(20);
        assert_eq!(owned(rx.push(&p)), Some(p));
    }

    #[test]
    fn overflow_of_continuations_is_dropped() {
        let mut rx = Reassembler::new();
        let mut first = vec![0u8; 16_384];
        first[4..8].copy_from_slice(&65_536u32.to_be_bytes());
        assert_eq!(rx.push(&first), RxOutcome::Pending);
        assert_eq!(rx.push(&[0u8; 16_384]), RxOutcome::Pending);
        assert_eq!(rx.push(&[0u8; 16_384]), RxOutcome::Pending);
        // 49 152 + 20 000 > 65 536
        assert_eq!(
            rx.push(&[0u8; 20_000]),
            RxOutcome::Dropped(RxDrop::Overflow { gathered: 69_152 })
        );
        assert!(!rx.in_progress());
    }
}
