//! DFU upload to the SecureROM (05ac:1227) or to a USB-C port controller in Port DFU (05ac:f014),
//! as a sans-IO state machine (protocol.md §2.1–§2.3).
//!
//! GET_STATUS follows every DNLOAD, as §2.2 states — including the lone last data block when the
//! suffix goes in its own transfer. libirecovery skips the status read between those two
//! transfers (Apple's ROM tolerates both); asking is what DFU 1.1 requires of a host, so a
//! stricter device is served too.
//!
//! The machine hands out one [`DfuAction`] at a time; the caller performs it on a transport and
//! feeds the outcome back with [`DfuUpload::on_reply`]. Nothing in here touches USB or sleeps, so
//! every byte it asks for can be checked in tests.

use std::ops::Range;
use std::time::Duration;

use crate::usb::{ControlSetup, TransportError};

/// Block size of a SecureROM DFU upload.
pub const DFU_BLOCK_SIZE: usize = 0x800;
/// Block size of a Port DFU upload (libirecovery's `SMALL_PKT`).
pub const PORT_DFU_BLOCK_SIZE: usize = 0x40;
/// How many extra GET_STATUS polls (1 s apart) a block may take to reach dfuDNLOAD-IDLE.
pub const STATUS_POLLS: u32 = 20;
/// Pause between two GET_STATUS polls.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The 12 fixed bytes of the DFU 1.1 suffix: bcdDevice 0xFFFF, idProduct 0xFFFF, idVendor 0x05AC,
/// bcdDFU 0x0100, signature "UFD", bLength 16. The CRC follows (§2.3).
pub const DFU_SUFFIX_FIXED: [u8; 12] = [
    0xFF, 0xFF, 0xFF, 0xFF, 0xAC, 0x05, 0x00, 0x01, 0x55, 0x46, 0x44, 0x10,
];

pub const REQ_DNLOAD: u8 = 0x01;
pub const REQ_GET_STATUS: u8 = 0x03;
pub const REQ_CLR_STATUS: u8 = 0x04;
pub const REQ_GET_STATE: u8 = 0x05;
pub const REQ_ABORT: u8 = 0x06;

pub const STATE_DFU_IDLE: u8 = 2;
pub const STATE_DNLOAD_IDLE: u8 = 5;
pub const STATE_MANIFEST_WAIT_RESET: u8 = 8;
pub const STATE_DFU_ERROR: u8 = 10;

const OUT: u8 = 0x21; // class, interface, host-to-device
const IN: u8 = 0xA1; // class, interface, device-to-host

/// Options of one upload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DfuOptions {
    /// Port DFU (USB-C port controller): 0x40-byte blocks and no DFU suffix.
    pub port_dfu: bool,
}

/// What the caller must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DfuAction {
    /// Control transfer device-to-host; reply with [`DfuReply::Data`].
    ControlIn { setup: ControlSetup, length: u16 },
    /// Control transfer host-to-device; reply with [`DfuReply::Written`].
    ControlOut { setup: ControlSetup, data: Vec<u8> },
    /// USB port reset; reply with [`DfuReply::Done`]. The device vanishing is fine.
    Reset,
    /// Wait, then reply with [`DfuReply::Done`].
    Sleep(Duration),
    /// The upload is complete; the device is re-enumerating.
    Done,
}

/// The outcome of a [`DfuAction`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DfuReply {
    Data(Vec<u8>),
    Written(usize),
    Done,
}

/// Why an upload failed. Messages are for the technician at the bench.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DfuError {
    #[error("nothing to upload: the image is empty")]
    EmptyImage,
    #[error("the image is too large for DFU ({0} bytes; at most 65535 blocks)")]
    ImageTooLarge(usize),
    #[error("the Mac's ROM reported an error (dfuERROR); CLR_STATUS sent — unplug/replug the USB-C cable and retry")]
    RomError,
    #[error("the Mac is waiting for a reset from an earlier upload (dfuMANIFEST-WAIT-RESET): re-enter DFU (hold the DFU key combination again) and retry")]
    WaitingForReset,
    #[error("the Mac's ROM is in DFU state {0}, not idle; ABORT sent — re-enter DFU and retry")]
    NotIdle(u8),
    #[error("the Mac's ROM did not accept block {block}: state {state} after {polls} status polls (expected 5, dfuDNLOAD-IDLE) — re-enter DFU and retry")]
    BlockNotAccepted { block: u16, state: u8, polls: u32 },
    #[error("the Mac's ROM gave a malformed reply to {request} ({got} bytes)")]
    ShortReply { request: &'static str, got: usize },
    #[error("the Mac accepted only {accepted} of {sent} bytes of block {block}")]
    ShortWrite {
        block: u16,
        sent: usize,
        accepted: usize,
    },
    #[error("USB failed during the DFU upload ({during}): {source}")]
    Transport {
        during: &'static str,
        #[source]
        source: TransportError,
    },
    #[error("the DFU upload was driven out of order: {0}")]
    Protocol(&'static str),
}

/// One DNLOAD transfer: a slice of the image, optionally followed by the suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Transfer {
    value: u16,
    range: Range<usize>,
    with_suffix: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cleanup {
    ClrStatus,
    Abort(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    GetState,
    Cleanup(Cleanup),
    Dnload(usize),
    /// GET_STATUS after transfer `.0`; `.1` = polls done beyond the first.
    Status(usize, u32),
    Wait(usize, u32),
    Finish,
    FinishStatus(u8),
    Reset,
    Done,
    Failed,
}

/// A DFU upload in progress.
#[derive(Debug)]
pub struct DfuUpload {
    image: Vec<u8>,
    suffix: [u8; 16],
    transfers: Vec<Transfer>,
    blocks: u16,
    phase: Phase,
    sent: usize,
}

impl DfuUpload {
    pub fn new(image: Vec<u8>, options: DfuOptions) -> Result<Self, DfuError> {
        if image.is_empty() {
            return Err(DfuError::EmptyImage);
        }
        let block = if options.port_dfu {
            PORT_DFU_BLOCK_SIZE
        } else {
            DFU_BLOCK_SIZE
        };
        let count = image.len().div_ceil(block);
        let blocks = u16::try_from(count).map_err(|_| DfuError::ImageTooLarge(image.len()))?;
        let mut transfers = Vec::with_capacity(count + 1);
        for i in 0..count {
            let start = i * block;
            let end = (start + block).min(image.len());
            // `i < count <= u16::MAX`, checked just above.
            let value = i as u16;
            let last = i + 1 == count;
            if !last || options.port_dfu {
                transfers.push(Transfer {
                    value,
                    range: start..end,
                    with_suffix: false,
                });
            } else if end - start + 16 > block {
                // The suffix does not fit: the data goes alone and the suffix follows in its own
                // transfer with the same block number (libirecovery does exactly this).
                transfers.push(Transfer {
                    value,
                    range: start..end,
                    with_suffix: false,
                });
                transfers.push(Transfer {
                    value,
                    range: end..end,
                    with_suffix: true,
                });
            } else {
                transfers.push(Transfer {
                    value,
                    range: start..end,
                    with_suffix: true,
                });
            }
        }
        let mut suffix = [0u8; 16];
        suffix[..12].copy_from_slice(&DFU_SUFFIX_FIXED);
        suffix[12..].copy_from_slice(&dfu_crc(&image).to_le_bytes());
        Ok(Self {
            image,
            suffix,
            transfers,
            blocks,
            phase: Phase::GetState,
            sent: 0,
        })
    }

    /// Image bytes accepted by the device so far (suffix not counted).
    pub fn bytes_sent(&self) -> usize {
        self.sent
    }

    /// Image size.
    pub fn total(&self) -> usize {
        self.image.len()
    }

    /// The 16-byte suffix this upload appends (meaningless for Port DFU, which sends none).
    pub fn suffix(&self) -> [u8; 16] {
        self.suffix
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The next thing to do. Calling it twice without [`Self::on_reply`] repeats the action.
    pub fn next(&self) -> DfuAction {
        match self.phase {
            Phase::GetState => DfuAction::ControlIn {
                setup: ControlSetup::new(IN, REQ_GET_STATE, 0, 0),
                length: 1,
            },
            Phase::Cleanup(Cleanup::ClrStatus) => DfuAction::ControlOut {
                setup: ControlSetup::new(OUT, REQ_CLR_STATUS, 0, 0),
                data: Vec::new(),
            },
            Phase::Cleanup(Cleanup::Abort(_)) => DfuAction::ControlOut {
                setup: ControlSetup::new(OUT, REQ_ABORT, 0, 0),
                data: Vec::new(),
            },
            Phase::Dnload(i) => {
                let t = &self.transfers[i];
                let mut data = self.image[t.range.clone()].to_vec();
                if t.with_suffix {
                    data.extend_from_slice(&self.suffix);
                }
                DfuAction::ControlOut {
                    setup: ControlSetup::new(OUT, REQ_DNLOAD, t.value, 0),
                    data,
                }
            }
            Phase::Status(..) | Phase::FinishStatus(_) => DfuAction::ControlIn {
                setup: ControlSetup::new(IN, REQ_GET_STATUS, 0, 0),
                length: 6,
            },
            Phase::Wait(..) => DfuAction::Sleep(POLL_INTERVAL),
            Phase::Finish => DfuAction::ControlOut {
                setup: ControlSetup::new(OUT, REQ_DNLOAD, self.blocks, 0),
                data: Vec::new(),
            },
            Phase::Reset => DfuAction::Reset,
            Phase::Done | Phase::Failed => DfuAction::Done,
        }
    }

    /// Feed back the outcome of the action [`Self::next`] returned.
    pub fn on_reply(&mut self, reply: Result<DfuReply, TransportError>) -> Result<(), DfuError> {
        match self.step(reply) {
            Ok(phase) => {
                self.phase = phase;
                Ok(())
            }
            Err(e) => {
                self.phase = Phase::Failed;
                Err(e)
            }
        }
    }

    fn step(&mut self, reply: Result<DfuReply, TransportError>) -> Result<Phase, DfuError> {
        let transport = |during| move |source| DfuError::Transport { during, source };
        match self.phase {
            Phase::GetState => {
                let data = expect_data(reply.map_err(transport("GET_STATE"))?)?;
                let state = *data.first().ok_or(DfuError::ShortReply {
                    request: "GET_STATE",
                    got: 0,
                })?;
                match state {
                    STATE_DFU_IDLE => Ok(Phase::Dnload(0)),
                    STATE_DFU_ERROR => Ok(Phase::Cleanup(Cleanup::ClrStatus)),
                    STATE_MANIFEST_WAIT_RESET => Err(DfuError::WaitingForReset),
                    other => Ok(Phase::Cleanup(Cleanup::Abort(other))),
                }
            }
            Phase::Cleanup(kind) => {
                // The cleanup request is a courtesy to the ROM; whether it went through does not
                // change what the technician must do.
                if let Err(e) = reply {
                    tracing::debug!("DFU cleanup request failed: {e}");
                }
                Err(match kind {
                    Cleanup::ClrStatus => DfuError::RomError,
                    Cleanup::Abort(state) => DfuError::NotIdle(state),
                })
            }
            Phase::Dnload(i) => {
                let t = &self.transfers[i];
                let expected = t.range.len() + if t.with_suffix { 16 } else { 0 };
                let accepted = expect_written(reply.map_err(transport("DNLOAD"))?)?;
                if accepted != expected {
                    return Err(DfuError::ShortWrite {
                        block: t.value,
                        sent: expected,
                        accepted,
                    });
                }
                self.sent += t.range.len();
                Ok(Phase::Status(i, 0))
            }
            Phase::Status(i, polls) => {
                let data = expect_data(reply.map_err(transport("GET_STATUS"))?)?;
                if data.len() < 6 {
                    return Err(DfuError::ShortReply {
                        request: "GET_STATUS",
                        got: data.len(),
                    });
                }
                let state = data[4];
                if state == STATE_DNLOAD_IDLE {
                    Ok(if i + 1 < self.transfers.len() {
                        Phase::Dnload(i + 1)
                    } else {
                        Phase::Finish
                    })
                } else if polls < STATUS_POLLS {
                    Ok(Phase::Wait(i, polls + 1))
                } else {
                    Err(DfuError::BlockNotAccepted {
                        block: self.transfers[i].value,
                        state,
                        polls,
                    })
                }
            }
            Phase::Wait(i, polls) => {
                expect_done(reply)?;
                Ok(Phase::Status(i, polls))
            }
            Phase::Finish => {
                reply.map_err(transport("the final zero-length DNLOAD"))?;
                Ok(Phase::FinishStatus(0))
            }
            Phase::FinishStatus(n) => {
                // The ROM is already manifesting; libirecovery ignores these results too.
                if let Err(e) = reply {
                    tracing::debug!("GET_STATUS after the final DNLOAD failed (ignored): {e}");
                }
                Ok(if n == 0 {
                    Phase::FinishStatus(1)
                } else {
                    Phase::Reset
                })
            }
            Phase::Reset => match reply {
                Ok(_) | Err(TransportError::Disconnected) => Ok(Phase::Done),
                // A reset makes the device drop off the bus; any error while it does so means
                // the same thing and must not fail an upload the ROM already accepted.
                Err(e) => {
                    tracing::debug!("USB reset after DFU upload reported {e} (ignored)");
                    Ok(Phase::Done)
                }
            },
            Phase::Done | Phase::Failed => Err(DfuError::Protocol("reply after the upload ended")),
        }
    }
}

fn expect_data(reply: DfuReply) -> Result<Vec<u8>, DfuError> {
    match reply {
        DfuReply::Data(d) => Ok(d),
        _ => Err(DfuError::Protocol(
            "expected data from a control IN transfer",
        )),
    }
}

fn expect_written(reply: DfuReply) -> Result<usize, DfuError> {
    match reply {
        DfuReply::Written(n) => Ok(n),
        _ => Err(DfuError::Protocol(
            "expected a byte count from a control OUT transfer",
        )),
    }
}

fn expect_done(reply: Result<DfuReply, TransportError>) -> Result<(), DfuError> {
    match reply {
        Ok(DfuReply::Done) => Ok(()),
        _ => Err(DfuError::Protocol("expected the sleep to complete")),
    }
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// libirecovery's DFU CRC (§2.3): reflected CRC-32 from 0xFFFFFFFF over the image and the 12
/// fixed suffix bytes, without the final inversion.
pub fn dfu_crc(image: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in image.iter().chain(DFU_SUFFIX_FIXED.iter()) {
        crc = CRC_TABLE[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get_state() -> DfuAction {
        DfuAction::ControlIn {
            setup: ControlSetup::new(0xA1, 5, 0, 0),
            length: 1,
        }
    }
    fn get_status() -> DfuAction {
        DfuAction::ControlIn {
            setup: ControlSetup::new(0xA1, 3, 0, 0),
            length: 6,
        }
    }
    fn dnload(value: u16, data: Vec<u8>) -> DfuAction {
        DfuAction::ControlOut {
            setup: ControlSetup::new(0x21, 1, value, 0),
            data,
        }
    }
    fn status(state: u8) -> DfuReply {
        DfuReply::Data(vec![0, 0, 0, 0, state, 0])
    }

    /// Drive an upload against a device that is idle and accepts everything; return every action.
    fn run_happy(image: &[u8], options: DfuOptions) -> Vec<DfuAction> {
        let mut up = DfuUpload::new(image.to_vec(), options).unwrap();
        let mut actions = Vec::new();
        loop {
            let a = up.next();
            actions.push(a.clone());
            let reply = match &a {
                DfuAction::ControlIn { setup, .. } if setup.request == REQ_GET_STATE => {
                    DfuReply::Data(vec![2])
                }
                DfuAction::ControlIn { .. } => status(5),
                DfuAction::ControlOut { data, .. } => DfuReply::Written(data.len()),
                DfuAction::Reset | DfuAction::Sleep(_) => DfuReply::Done,
                DfuAction::Done => break,
            };
            up.on_reply(Ok(reply)).unwrap();
        }
        assert!(up.is_done());
        assert_eq!(up.bytes_sent(), image.len());
        actions
    }

    fn suffix_for(image: &[u8]) -> Vec<u8> {
        let mut h = crc32fast::Hasher::new();
        h.update(image);
        h.update(&DFU_SUFFIX_FIXED);
        let crc = !h.finalize();
        let mut s = DFU_SUFFIX_FIXED.to_vec();
        s.extend_from_slice(&crc.to_le_bytes());
        s
    }

    fn finish(blocks: u16) -> Vec<DfuAction> {
        vec![
            dnload(blocks, vec![]),
            get_status(),
            get_status(),
            DfuAction::Reset,
            DfuAction::Done,
        ]
    }

    #[test]
    fn crc_matches_inverted_zlib_crc32() {
        for image in [&b""[..], b"a", b"123456789", &[0u8; 5000][..]] {
            let mut h = crc32fast::Hasher::new();
            h.update(image);
            h.update(&DFU_SUFFIX_FIXED);
            assert_eq!(dfu_crc(image), !h.finalize());
        }
        // A fixed point so a change in both the code and the test's reference shows up.
        let mut h = crc32fast::Hasher::new();
        h.update(b"123456789");
        h.update(&DFU_SUFFIX_FIXED);
        assert_eq!(!dfu_crc(b"123456789"), h.finalize());
    }

    #[test]
    fn small_image_single_block_with_suffix() {
        let image = b"hello iBSS".to_vec();
        let mut expected_data = image.clone();
        expected_data.extend_from_slice(&suffix_for(&image));
        assert_eq!(expected_data.len(), 26);
        assert_eq!(&expected_data[10..22], &DFU_SUFFIX_FIXED);
        let mut expected = vec![get_state(), dnload(0, expected_data), get_status()];
        expected.extend(finish(1));
        assert_eq!(run_happy(&image, DfuOptions::default()), expected);
    }

    #[test]
    fn suffix_fits_exactly_at_0x800_minus_16() {
        let image: Vec<u8> = (0..(0x800 + 0x800 - 16)).map(|i| i as u8).collect();
        let mut last = image[0x800..].to_vec();
        last.extend_from_slice(&suffix_for(&image));
        assert_eq!(last.len(), 0x800);
        let mut expected = vec![
            get_state(),
            dnload(0, image[..0x800].to_vec()),
            get_status(),
            dnload(1, last),
            get_status(),
        ];
        expected.extend(finish(2));
        assert_eq!(run_happy(&image, DfuOptions::default()), expected);
    }

    #[test]
    fn single_block_of_0x800_minus_16_carries_the_suffix() {
        let image = vec![0x3C; 0x800 - 16];
        let mut last = image.clone();
        last.extend_from_slice(&suffix_for(&image));
        let mut expected = vec![get_state(), dnload(0, last), get_status()];
        expected.extend(finish(1));
        assert_eq!(run_happy(&image, DfuOptions::default()), expected);
    }

    #[test]
    fn single_full_block_sends_suffix_separately() {
        let image = vec![0x3C; 0x800];
        let mut expected = vec![
            get_state(),
            dnload(0, image.clone()),
            get_status(),
            dnload(0, suffix_for(&image)),
            get_status(),
        ];
        expected.extend(finish(1));
        assert_eq!(run_happy(&image, DfuOptions::default()), expected);
    }

    #[test]
    fn suffix_split_at_0x800_minus_15() {
        let image: Vec<u8> = (0..(0x800 - 15)).map(|i| (i * 7) as u8).collect();
        let mut expected = vec![
            get_state(),
            dnload(0, image.clone()),
            get_status(),
            dnload(0, suffix_for(&image)),
            get_status(),
        ];
        expected.extend(finish(1));
        assert_eq!(run_happy(&image, DfuOptions::default()), expected);
    }

    #[test]
    fn exact_multiple_sends_suffix_separately_with_last_block_number() {
        let image: Vec<u8> = (0..3 * 0x800).map(|i| (i >> 3) as u8).collect();
        let mut expected = vec![get_state()];
        for b in 0..3u16 {
            let s = b as usize * 0x800;
            expected.push(dnload(b, image[s..s + 0x800].to_vec()));
            expected.push(get_status());
        }
        expected.push(dnload(2, suffix_for(&image)));
        expected.push(get_status());
        expected.extend(finish(3));
        assert_eq!(run_happy(&image, DfuOptions::default()), expected);
    }

    #[test]
    fn port_dfu_uses_64_byte_blocks_without_suffix() {
        let image: Vec<u8> = (0..130).map(|i| i as u8).collect();
        let mut expected = vec![
            get_state(),
            dnload(0, image[..64].to_vec()),
            get_status(),
            dnload(1, image[64..128].to_vec()),
            get_status(),
            dnload(2, image[128..].to_vec()),
            get_status(),
        ];
        expected.extend(finish(3));
        assert_eq!(run_happy(&image, DfuOptions { port_dfu: true }), expected);
    }

    #[test]
    fn port_dfu_exact_multiple_has_no_extra_transfer() {
        let image = vec![0x5A; 128];
        let actions = run_happy(&image, DfuOptions { port_dfu: true });
        let dnloads: Vec<_> = actions
            .iter()
            .filter_map(|a| match a {
                DfuAction::ControlOut { setup, data } if setup.request == 1 => {
                    Some((setup.value, data.len()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(dnloads, vec![(0, 64), (1, 64), (2, 0)]);
    }

    #[test]
    fn polls_status_one_second_apart_until_dnload_idle() {
        let mut up = DfuUpload::new(vec![1, 2, 3], DfuOptions::default()).unwrap();
        up.on_reply(Ok(DfuReply::Data(vec![2]))).unwrap();
        up.on_reply(Ok(DfuReply::Written(19))).unwrap();
        assert_eq!(up.next(), get_status());
        up.on_reply(Ok(status(4))).unwrap(); // dfuDNBUSY
        assert_eq!(up.next(), DfuAction::Sleep(Duration::from_secs(1)));
        up.on_reply(Ok(DfuReply::Done)).unwrap();
        assert_eq!(up.next(), get_status());
        up.on_reply(Ok(status(5))).unwrap();
        assert_eq!(up.next(), dnload(1, vec![]));
    }

    #[test]
    fn gives_up_after_twenty_more_polls() {
        let mut up = DfuUpload::new(vec![1, 2, 3], DfuOptions::default()).unwrap();
        up.on_reply(Ok(DfuReply::Data(vec![2]))).unwrap();
        up.on_reply(Ok(DfuReply::Written(19))).unwrap();
        let mut polls = 0;
        let err = loop {
            assert_eq!(up.next(), get_status());
            match up.on_reply(Ok(status(4))) {
                Ok(()) => {
                    polls += 1;
                    assert_eq!(up.next(), DfuAction::Sleep(POLL_INTERVAL));
                    up.on_reply(Ok(DfuReply::Done)).unwrap();
                }
                Err(e) => break e,
            }
        };
        assert_eq!(polls, 20);
        assert_eq!(
            err,
            DfuError::BlockNotAccepted {
                block: 0,
                state: 4,
                polls: 20
            }
        );
    }

    #[test]
    fn dfu_error_state_sends_clr_status_then_fails() {
        let mut up = DfuUpload::new(vec![1], DfuOptions::default()).unwrap();
        up.on_reply(Ok(DfuReply::Data(vec![10]))).unwrap();
        assert_eq!(
            up.next(),
            DfuAction::ControlOut {
                setup: ControlSetup::new(0x21, 4, 0, 0),
                data: vec![]
            }
        );
        let err = up.on_reply(Ok(DfuReply::Written(0))).unwrap_err();
        assert_eq!(err, DfuError::RomError);
        assert!(err.to_string().contains("CLR_STATUS sent"));
        assert!(err.to_string().contains("unplug/replug"));
        assert_eq!(up.next(), DfuAction::Done);
    }

    #[test]
    fn manifest_wait_reset_fails_without_sending_anything() {
        let mut up = DfuUpload::new(vec![1], DfuOptions::default()).unwrap();
        let err = up.on_reply(Ok(DfuReply::Data(vec![8]))).unwrap_err();
        assert_eq!(err, DfuError::WaitingForReset);
        assert!(err
            .to_string()
            .starts_with("the Mac is waiting for a reset from an earlier upload"));
        assert_eq!(up.next(), DfuAction::Done);
    }

    #[test]
    fn other_state_sends_abort_then_fails() {
        for state in [0u8, 1, 3, 4, 5, 6, 7, 9, 200] {
            let mut up = DfuUpload::new(vec![1], DfuOptions::default()).unwrap();
            up.on_reply(Ok(DfuReply::Data(vec![state]))).unwrap();
            assert_eq!(
                up.next(),
                DfuAction::ControlOut {
                    setup: ControlSetup::new(0x21, 6, 0, 0),
                    data: vec![]
                }
            );
            // Even if the ABORT itself fails, the error names the state.
            let err = up
                .on_reply(Err(TransportError::Stall))
                .expect_err("must fail");
            assert_eq!(err, DfuError::NotIdle(state));
        }
    }

    #[test]
    fn malformed_replies_are_errors() {
        let mut up = DfuUpload::new(vec![1], DfuOptions::default()).unwrap();
        assert_eq!(
            up.on_reply(Ok(DfuReply::Data(vec![]))),
            Err(DfuError::ShortReply {
                request: "GET_STATE",
                got: 0
            })
        );
        let mut up = DfuUpload::new(vec![1], DfuOptions::default()).unwrap();
        up.on_reply(Ok(DfuReply::Data(vec![2]))).unwrap();
        assert_eq!(
            up.on_reply(Ok(DfuReply::Written(3))),
            Err(DfuError::ShortWrite {
                block: 0,
                sent: 17,
                accepted: 3
            })
        );
        let mut up = DfuUpload::new(vec![1], DfuOptions::default()).unwrap();
        up.on_reply(Ok(DfuReply::Data(vec![2]))).unwrap();
        up.on_reply(Ok(DfuReply::Written(17))).unwrap();
        assert_eq!(
            up.on_reply(Ok(DfuReply::Data(vec![0, 0, 0]))),
            Err(DfuError::ShortReply {
                request: "GET_STATUS",
                got: 3
            })
        );
        assert!(matches!(
            up.on_reply(Ok(DfuReply::Done)),
            Err(DfuError::Protocol(_))
        ));
    }

    #[test]
    fn transport_error_during_block_fails() {
        let mut up = DfuUpload::new(vec![1], DfuOptions::default()).unwrap();
        up.on_reply(Ok(DfuReply::Data(vec![2]))).unwrap();
        let err = up.on_reply(Err(TransportError::Stall)).unwrap_err();
        assert_eq!(
            err,
            DfuError::Transport {
                during: "DNLOAD",
                source: TransportError::Stall
            }
        );
    }

    #[test]
    fn finish_ignores_status_errors_and_a_vanishing_device() {
        let mut up = DfuUpload::new(vec![1], DfuOptions::default()).unwrap();
        up.on_reply(Ok(DfuReply::Data(vec![2]))).unwrap();
        up.on_reply(Ok(DfuReply::Written(17))).unwrap();
        up.on_reply(Ok(status(5))).unwrap();
        assert_eq!(up.next(), dnload(1, vec![]));
        up.on_reply(Ok(DfuReply::Written(0))).unwrap();
        up.on_reply(Err(TransportError::Stall)).unwrap();
        up.on_reply(Ok(status(7))).unwrap();
        assert_eq!(up.next(), DfuAction::Reset);
        up.on_reply(Err(TransportError::Disconnected)).unwrap();
        assert!(up.is_done());
    }

    #[test]
    fn empty_image_is_rejected() {
        assert_eq!(
            DfuUpload::new(vec![], DfuOptions::default()).unwrap_err(),
            DfuError::EmptyImage
        );
    }
}
