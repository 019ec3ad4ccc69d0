//! The device side of DFU as the SecureROM (and the port controller's Port DFU) speaks it:
//! USB DFU 1.1 class requests on interface 0 (protocol.md §2), sans-IO.
//!
//! Only what a ROM needs: DNLOAD with sequence checks, the 16-byte suffix with its CRC,
//! manifestation on a zero-length DNLOAD, and the status/state requests. Everything invalid
//! stalls and (as DFU 1.1 requires) leaves the machine in dfuERROR until CLR_STATUS.

use crate::wire::{Reply, Setup};

pub const DFU_DETACH: u8 = 0;
pub const DFU_DNLOAD: u8 = 1;
pub const DFU_UPLOAD: u8 = 2;
pub const DFU_GETSTATUS: u8 = 3;
pub const DFU_CLRSTATUS: u8 = 4;
pub const DFU_GETSTATE: u8 = 5;
pub const DFU_ABORT: u8 = 6;

/// The fixed part of the DFU suffix libirecovery appends (bcdDevice, idProduct, idVendor,
/// bcdDFU, "UFD", bLength), before the 4 CRC bytes.
pub const SUFFIX_FIXED: [u8; 12] = [
    0xff, 0xff, 0xff, 0xff, 0xac, 0x05, 0x00, 0x01, 0x55, 0x46, 0x44, 0x10,
];
pub const SUFFIX_LEN: usize = 16;

/// DFU 1.1 `bState` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DfuState {
    AppIdle = 0,
    AppDetach = 1,
    Idle = 2,
    DnloadSync = 3,
    DnBusy = 4,
    DnloadIdle = 5,
    ManifestSync = 6,
    Manifest = 7,
    ManifestWaitReset = 8,
    UploadIdle = 9,
    Error = 10,
}

/// DFU 1.1 `bStatus` values the ROM reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DfuStatus {
    Ok = 0x00,
    ErrTarget = 0x01,
    ErrFile = 0x02,
    ErrVerify = 0x07,
    ErrNotDone = 0x09,
    ErrFirmware = 0x0a,
    ErrStalledPkt = 0x0f,
}

/// libirecovery's DFU CRC: reflected CRC-32 from 0xFFFFFFFF over image then the 12 fixed
/// suffix bytes, without the final inversion — i.e. the complement of zlib's CRC-32.
pub fn libirecovery_crc(image: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(image);
    h.update(&SUFFIX_FIXED);
    !h.finalize()
}

/// The 16-byte suffix a well-behaved host appends to `image`.
pub fn suffix_for(image: &[u8]) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..12].copy_from_slice(&SUFFIX_FIXED);
    s[12..].copy_from_slice(&libirecovery_crc(image).to_le_bytes());
    s
}

/// How one DFU implementation behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DfuConfig {
    /// wTransferSize: longer DNLOADs stall.
    pub transfer_size: u16,
    /// The upload ends with the 16-byte suffix (SecureROM); Port DFU sends none.
    pub expects_suffix: bool,
    pub verify_crc: bool,
}

impl DfuConfig {
    pub fn secure_rom(verify_crc: bool) -> Self {
        DfuConfig {
            transfer_size: crate::descriptors::DFU_TRANSFER_SIZE,
            expects_suffix: true,
            verify_crc,
        }
    }

    pub fn port_dfu() -> Self {
        DfuConfig {
            transfer_size: crate::descriptors::PORT_DFU_TRANSFER_SIZE,
            expects_suffix: false,
            verify_crc: false,
        }
    }
}

/// Why a complete upload was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRejected {
    #[error("upload is shorter than the 16-byte DFU suffix")]
    TooShort,
    #[error("upload does not end with the DFU suffix")]
    NoSuffix,
    #[error("DFU suffix CRC {got:08x} does not match {want:08x}")]
    BadCrc { got: u32, want: u32 },
    #[error("the image does not boot: {0}")]
    Invalid(String),
}

#[derive(Debug)]
pub struct DfuMachine {
    config: DfuConfig,
    state: DfuState,
    status: DfuStatus,
    /// Block number the next data DNLOAD must carry.
    next_block: u16,
    /// Data blocks received (a suffix-only transfer may repeat the last block number).
    blocks: u32,
    data: Vec<u8>,
    /// The accepted image after a successful manifestation.
    image: Option<Vec<u8>>,
    last_rejection: Option<ImageRejected>,
}

impl DfuMachine {
    pub fn new(config: DfuConfig) -> Self {
        DfuMachine {
            config,
            state: DfuState::Idle,
            status: DfuStatus::Ok,
            next_block: 0,
            blocks: 0,
            data: Vec::new(),
            image: None,
            last_rejection: None,
        }
    }

    pub fn state(&self) -> DfuState {
        self.state
    }

    pub fn status(&self) -> DfuStatus {
        self.status
    }

    /// Bytes received so far in the current download (suffix included).
    pub fn received(&self) -> usize {
        self.data.len()
    }

    /// The manifested image (suffix stripped) once a zero-length DNLOAD accepted it.
    pub fn accepted_image(&self) -> Option<&[u8]> {
        self.image.as_deref()
    }

    pub fn last_rejection(&self) -> Option<&ImageRejected> {
        self.last_rejection.as_ref()
    }

    /// A USB reset: returns the image to boot if manifestation succeeded; otherwise the ROM
    /// starts over in dfuIDLE (nothing is booted, the Mac stays in DFU).
    pub fn reset(&mut self) -> Option<Vec<u8>> {
        let image = self.image.take();
        let config = self.config;
        *self = DfuMachine::new(config);
        image
    }

    fn fail(&mut self, status: DfuStatus) -> Reply {
        self.state = DfuState::Error;
        self.status = status;
        self.data.clear();
        Reply::Stall
    }

    /// One class request on EP0. `validate` decides whether a complete image (suffix
    /// already checked and stripped) boots.
    pub fn control(
        &mut self,
        setup: &Setup,
        data: &[u8],
        validate: impl FnOnce(&[u8]) -> Result<(), String>,
    ) -> Reply {
        // Class request to interface 0 only; anything else is not ours to answer.
        if setup.request_type & 0x7f != 0x21 || setup.index != 0 {
            return self.fail(DfuStatus::ErrStalledPkt);
        }
        match (setup.request_type, setup.request) {
            (0xa1, DFU_GETSTATUS) => self.get_status(),
            (0xa1, DFU_GETSTATE) => Reply::Ack(vec![self.state as u8]),
            (0x21, DFU_DNLOAD) => self.dnload(setup, data, validate),
            (0x21, DFU_CLRSTATUS) if self.state == DfuState::Error => {
                self.state = DfuState::Idle;
                self.status = DfuStatus::Ok;
                self.reset_download();
                Reply::Ack(Vec::new())
            }
            (0x21, DFU_ABORT)
                if matches!(
                    self.state,
                    DfuState::Idle
                        | DfuState::DnloadSync
                        | DfuState::DnloadIdle
                        | DfuState::ManifestSync
                        | DfuState::UploadIdle
                ) =>
            {
                self.state = DfuState::Idle;
                self.reset_download();
                Reply::Ack(Vec::new())
            }
            // DETACH, UPLOAD (the ROM does not read back), CLR_STATUS/ABORT in the wrong state,
            // wrong directions.
            _ => self.fail(DfuStatus::ErrStalledPkt),
        }
    }

    fn reset_download(&mut self) {
        self.data.clear();
        self.next_block = 0;
        self.blocks = 0;
        self.image = None;
    }

    fn get_status(&mut self) -> Reply {
        // The reply carries the state the request moves to (DFU 1.1 state diagram: the
        // sync states resolve on GET_STATUS).
        self.state = match self.state {
            DfuState::DnloadSync | DfuState::DnBusy => DfuState::DnloadIdle,
            DfuState::ManifestSync => DfuState::Manifest,
            DfuState::Manifest => DfuState::ManifestWaitReset,
            s => s,
        };
        Reply::Ack(vec![self.status as u8, 0, 0, 0, self.state as u8, 0])
    }

    fn dnload(
        &mut self,
        setup: &Setup,
        data: &[u8],
        validate: impl FnOnce(&[u8]) -> Result<(), String>,
    ) -> Reply {
        if usize::from(setup.length) != data.len() {
            return self.fail(DfuStatus::ErrStalledPkt);
        }
        // pymobiledevice3 sends blocks without GET_STATUS in between and works with real
        // ROMs, so DNLOAD-SYNC accepts the next block too.
        let in_download = matches!(self.state, DfuState::DnloadSync | DfuState::DnloadIdle);
        if !in_download && self.state != DfuState::Idle {
            return self.fail(DfuStatus::ErrStalledPkt);
        }
        if data.is_empty() {
            if !in_download {
                // Manifest request with nothing downloaded.
                return self.fail(DfuStatus::ErrNotDone);
            }
            if setup.value != self.next_block {
                return self.fail(DfuStatus::ErrStalledPkt);
            }
            return self.manifest(validate);
        }
        if data.len() > usize::from(self.config.transfer_size) {
            return self.fail(DfuStatus::ErrStalledPkt);
        }
        let repeats_last = self.blocks > 0 && setup.value == self.next_block.wrapping_sub(1);
        // libirecovery sends the suffix alone, with the last block's number, when it does not
        // fit beside the last data block.
        let suffix_only = self.config.expects_suffix
            && repeats_last
            && data.len() == SUFFIX_LEN
            && data[..12] == SUFFIX_FIXED;
        if setup.value != self.next_block && !suffix_only {
            tracing::debug!(
                want = self.next_block,
                got = setup.value,
                "DFU block out of sequence"
            );
            return self.fail(DfuStatus::ErrStalledPkt);
        }
        if !suffix_only {
            self.next_block = self.next_block.wrapping_add(1);
            self.blocks += 1;
        }
        self.data.extend_from_slice(data);
        self.state = DfuState::DnloadSync;
        Reply::Ack(Vec::new())
    }

    fn manifest(&mut self, validate: impl FnOnce(&[u8]) -> Result<(), String>) -> Reply {
        let data = std::mem::take(&mut self.data);
        match self.check(&data).and_then(|image| {
            validate(image)
                .map(|()| image.to_vec())
                .map_err(ImageRejected::Invalid)
        }) {
            Ok(image) => {
                self.image = Some(image);
                self.last_rejection = None;
                self.state = DfuState::ManifestSync;
                Reply::Ack(Vec::new())
            }
            Err(e) => {
                tracing::info!(error = %e, "ROM rejects the uploaded image");
                let status = match e {
                    ImageRejected::Invalid(_) => DfuStatus::ErrFirmware,
                    ImageRejected::BadCrc { .. } => DfuStatus::ErrVerify,
                    _ => DfuStatus::ErrFile,
                };
                self.last_rejection = Some(e);
                // The ZLP itself completed; the rejection shows in the next GET_STATUS.
                self.state = DfuState::Error;
                self.status = status;
                Reply::Ack(Vec::new())
            }
        }
    }

    fn check<'a>(&self, data: &'a [u8]) -> Result<&'a [u8], ImageRejected> {
        if !self.config.expects_suffix {
            return Ok(data);
        }
        if data.len() < SUFFIX_LEN {
            return Err(ImageRejected::TooShort);
        }
        let (image, suffix) = data.split_at(data.len() - SUFFIX_LEN);
        if suffix[..12] != SUFFIX_FIXED {
            return Err(ImageRejected::NoSuffix);
        }
        if self.config.verify_crc {
            let got = u32::from_le_bytes([suffix[12], suffix[13], suffix[14], suffix[15]]);
            let want = libirecovery_crc(image);
            if got != want {
                return Err(ImageRejected::BadCrc { got, want });
            }
        }
        Ok(image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(rt: u8, req: u8, value: u16, len: u16) -> Setup {
        Setup {
            request_type: rt,
            request: req,
            value,
            index: 0,
            length: len,
        }
    }

    fn ok(_: &[u8]) -> Result<(), String> {
        Ok(())
    }

    fn dnload(m: &mut DfuMachine, block: u16, data: &[u8]) -> Reply {
        m.control(&setup(0x21, DFU_DNLOAD, block, data.len() as u16), data, ok)
    }

    fn status(m: &mut DfuMachine) -> Vec<u8> {
        match m.control(&setup(0xa1, DFU_GETSTATUS, 0, 6), &[], ok) {
            Reply::Ack(v) => v,
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn crc_is_complement_of_zlib_crc() {
        // zlib CRC-32 of "123456789" is CBF43926; ours also covers the suffix bytes.
        let mut all = b"123456789".to_vec();
        all.extend(SUFFIX_FIXED);
        let mut h = crc32fast::Hasher::new();
        h.update(&all);
        assert_eq!(libirecovery_crc(b"123456789"), !h.finalize());
        assert_eq!(libirecovery_crc(b""), !crc32fast::hash(&SUFFIX_FIXED));
    }

    #[test]
    fn libirecovery_style_upload_with_split_suffix() {
        let mut m = DfuMachine::new(DfuConfig::secure_rom(true));
        let image: Vec<u8> = (0..0x800 + 0x7f8).map(|i| i as u8).collect();
        assert_eq!(
            m.control(&setup(0xa1, DFU_GETSTATE, 0, 1), &[], ok),
            Reply::Ack(vec![2])
        );
        assert_eq!(dnload(&mut m, 0, &image[..0x800]), Reply::Ack(vec![]));
        assert_eq!(m.state(), DfuState::DnloadSync);
        assert_eq!(status(&mut m), [0, 0, 0, 0, 5, 0]);
        // last block 0x7f8 + 16 > 0x800: block alone, then suffix with the same wValue.
        assert_eq!(dnload(&mut m, 1, &image[0x800..]), Reply::Ack(vec![]));
        assert_eq!(status(&mut m), [0, 0, 0, 0, 5, 0]);
        assert_eq!(dnload(&mut m, 1, &suffix_for(&image)), Reply::Ack(vec![]));
        assert_eq!(status(&mut m), [0, 0, 0, 0, 5, 0]);
        let mut seen = Vec::new();
        let r = m.control(&setup(0x21, DFU_DNLOAD, 2, 0), &[], |img| {
            seen = img.to_vec();
            Ok(())
        });
        assert_eq!(r, Reply::Ack(vec![]));
        assert_eq!(seen, image);
        assert_eq!(status(&mut m), [0, 0, 0, 0, 7, 0]);
        assert_eq!(status(&mut m), [0, 0, 0, 0, 8, 0]);
        assert_eq!(m.reset(), Some(image));
        assert_eq!(m.state(), DfuState::Idle);
    }

    #[test]
    fn suffix_in_last_block_and_no_getstatus_between_blocks() {
        let mut m = DfuMachine::new(DfuConfig::secure_rom(true));
        let image = vec![0x42u8; 100];
        let mut last = image.clone();
        last.extend(suffix_for(&image));
        assert_eq!(dnload(&mut m, 0, &last), Reply::Ack(vec![]));
        assert_eq!(
            m.control(&setup(0x21, DFU_DNLOAD, 1, 0), &[], ok),
            Reply::Ack(vec![])
        );
        assert_eq!(m.accepted_image(), Some(&image[..]));
    }

    #[test]
    fn bad_sequence_stalls_into_error_until_clrstatus() {
        let mut m = DfuMachine::new(DfuConfig::secure_rom(true));
        assert_eq!(dnload(&mut m, 0, &[1; 64]), Reply::Ack(vec![]));
        assert_eq!(dnload(&mut m, 5, &[1; 64]), Reply::Stall);
        assert_eq!(m.state(), DfuState::Error);
        assert_eq!(status(&mut m), [0x0f, 0, 0, 0, 10, 0]);
        // A repeated block number that is not a suffix is out of sequence too.
        let mut m2 = DfuMachine::new(DfuConfig::secure_rom(true));
        dnload(&mut m2, 0, &[1; 64]);
        assert_eq!(dnload(&mut m2, 0, &[1; 64]), Reply::Stall);
        // Nothing but CLR_STATUS / status requests leaves dfuERROR.
        assert_eq!(dnload(&mut m, 0, &[1; 64]), Reply::Stall);
        assert_eq!(
            m.control(&setup(0x21, DFU_ABORT, 0, 0), &[], ok),
            Reply::Stall
        );
        assert_eq!(
            m.control(&setup(0x21, DFU_CLRSTATUS, 0, 0), &[], ok),
            Reply::Ack(vec![])
        );
        assert_eq!(status(&mut m), [0, 0, 0, 0, 2, 0]);
        assert_eq!(dnload(&mut m, 0, &[1; 64]), Reply::Ack(vec![]));
    }

    #[test]
    fn oversize_block_wrong_length_and_unsupported_requests_stall() {
        let mut m = DfuMachine::new(DfuConfig::secure_rom(true));
        assert_eq!(dnload(&mut m, 0, &[0; 0x801]), Reply::Stall);
        let mut m = DfuMachine::new(DfuConfig::secure_rom(true));
        let r = m.control(&setup(0x21, DFU_DNLOAD, 0, 10), &[0; 4], ok);
        assert_eq!(r, Reply::Stall);
        for (rt, req) in [
            (0xa1, DFU_UPLOAD),
            (0x21, DFU_DETACH),
            (0x21, DFU_CLRSTATUS),
            (0x21, DFU_GETSTATUS),
            (0xa1, 0x42),
        ] {
            let mut m = DfuMachine::new(DfuConfig::secure_rom(true));
            assert_eq!(m.control(&setup(rt, req, 0, 0), &[], ok), Reply::Stall);
            assert_eq!(m.state(), DfuState::Error, "{rt:x}/{req}");
        }
        let mut m = DfuMachine::new(DfuConfig::secure_rom(true));
        let mut s = setup(0xa1, DFU_GETSTATE, 0, 1);
        s.index = 1;
        assert_eq!(m.control(&s, &[], ok), Reply::Stall);
    }

    #[test]
    fn zlp_without_data_is_not_done() {
        let mut m = DfuMachine::new(DfuConfig::secure_rom(true));
        assert_eq!(
            m.control(&setup(0x21, DFU_DNLOAD, 0, 0), &[], ok),
            Reply::Stall
        );
        assert_eq!(status(&mut m), [0x09, 0, 0, 0, 10, 0]);
    }

    #[test]
    fn abort_discards_the_download() {
        let mut m = DfuMachine::new(DfuConfig::secure_rom(true));
        dnload(&mut m, 0, &[1; 64]);
        assert_eq!(
            m.control(&setup(0x21, DFU_ABORT, 0, 0), &[], ok),
            Reply::Ack(vec![])
        );
        assert_eq!(m.received(), 0);
        assert_eq!(dnload(&mut m, 0, &[1; 64]), Reply::Ack(vec![]));
    }

    #[test]
    fn rejections_show_in_status() {
        let image = vec![7u8; 40];
        let cases: [(Vec<u8>, bool, u8); 4] = [
            (image.clone(), true, 0x02), // no suffix
            (
                {
                    let mut v = image.clone();
                    let mut s = suffix_for(&image);
                    s[15] ^= 1;
                    v.extend(s);
                    v
                },
                true,
                0x07,
            ),
            (vec![1, 2, 3], true, 0x02), // too short
            (
                {
                    let mut v = image.clone();
                    v.extend(suffix_for(&image));
                    v
                },
                false,
                0x0a,
            ),
        ];
        for (data, validate_ok, want_status) in cases {
            let mut m = DfuMachine::new(DfuConfig::secure_rom(true));
            dnload(&mut m, 0, &data);
            let r = m.control(&setup(0x21, DFU_DNLOAD, 1, 0), &[], |_| {
                if validate_ok {
                    Ok(())
                } else {
                    Err("not an iBSS".into())
                }
            });
            assert_eq!(r, Reply::Ack(vec![]));
            assert_eq!(status(&mut m), [want_status, 0, 0, 0, 10, 0]);
            assert!(m.last_rejection().is_some());
            assert_eq!(m.reset(), None, "a rejected image never boots");
        }
    }

    #[test]
    fn crc_check_can_be_off() {
        let image = vec![7u8; 40];
        let mut data = image.clone();
        data.extend(SUFFIX_FIXED);
        data.extend([0, 0, 0, 0]);
        let mut m = DfuMachine::new(DfuConfig::secure_rom(false));
        dnload(&mut m, 0, &data);
        m.control(&setup(0x21, DFU_DNLOAD, 1, 0), &[], ok);
        assert_eq!(m.accepted_image(), Some(&image[..]));
    }

    #[test]
    fn port_dfu_small_blocks_without_suffix() {
        let mut m = DfuMachine::new(DfuConfig::port_dfu());
        let payload: Vec<u8> = (0..200u8).collect();
        assert_eq!(dnload(&mut m, 0, &[0; 0x41]), Reply::Stall);
        let mut m = DfuMachine::new(DfuConfig::port_dfu());
        for (i, c) in payload.chunks(0x40).enumerate() {
            assert_eq!(dnload(&mut m, i as u16, c), Reply::Ack(vec![]));
            assert_eq!(status(&mut m)[4], 5);
        }
        m.control(&setup(0x21, DFU_DNLOAD, 4, 0), &[], ok);
        assert_eq!(m.accepted_image(), Some(&payload[..]));
    }
}
