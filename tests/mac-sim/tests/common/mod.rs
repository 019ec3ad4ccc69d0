//! A host driving one SimMac with raw setup packets on a simulated clock (no sleeping).

#![allow(dead_code)] // each test file uses a different part

use std::time::{Duration, Instant};

use mac_sim::board::Board;
use mac_sim::device::{BootStage, SimMac, StageFactory, Timing};
use mac_sim::dfu::suffix_for;
use mac_sim::faults::{Faults, StartMode};
use mac_sim::iboot::IbootEvent;
use mac_sim::wire::{LinkChange, Reply, Setup, SimDevice};

pub const ECID: u64 = 0x001C2B3A4D5E6F70;
pub const GOOD: &[u8] = b"GOOD-IBSS";

pub struct Host {
    pub mac: SimMac,
    pub now: Instant,
    pub link: Vec<LinkChange>,
}

/// iBSS images for the test check: valid iff they start with `GOOD`.
pub fn ibss(valid: bool, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
    let tag = if valid { GOOD } else { b"EVIL-IBSS" };
    v[..tag.len()].copy_from_slice(tag);
    v
}

/// Stage 1/2 firmware that follows the agreed iBoot events without checking images:
/// `go` after an upload jumps, `bootx` after an upload boots, `bootx` without fails.
struct Scripted {
    stage: u8,
    uploaded: usize,
    reply: Vec<u8>,
}

impl BootStage for Scripted {
    fn control(&mut self, setup: &Setup, data: &[u8]) -> (Reply, Option<IbootEvent>) {
        match (setup.request_type, setup.request) {
            (0x40, 0 | 1) => {
                let cmd = String::from_utf8_lossy(data.split(|b| *b == 0).next().unwrap());
                let ev = match &*cmd {
                    "go" if self.uploaded > 0 => Some(IbootEvent::JumpToNextStage),
                    "go" => Some(IbootEvent::BootFailed("no iBEC".into())),
                    "bootx" if self.uploaded > 0 => Some(IbootEvent::BootRestoreOs),
                    "bootx" => Some(IbootEvent::BootFailed("no kernel".into())),
                    "reboot" => Some(IbootEvent::Reboot),
                    "getenv boot-stage" => {
                        self.reply = format!("{}\0", self.stage).into_bytes();
                        None
                    }
                    _ => None,
                };
                (Reply::Ack(vec![]), ev)
            }
            (0xc0, 0) => (Reply::Ack(std::mem::take(&mut self.reply)), None),
            (0x41, 0) | (0x21, 1) => (Reply::Ack(vec![]), None),
            _ => (Reply::Stall, None),
        }
    }
    fn bulk_out(&mut self, _: u8, data: &[u8]) -> (Reply, Option<IbootEvent>) {
        self.uploaded += data.len();
        (Reply::Ack(vec![]), None)
    }
    fn bulk_in(&mut self, _: u8, _: usize) -> Reply {
        Reply::Ack(b"] ".to_vec())
    }
    fn env(&self, name: &str) -> Option<String> {
        (name == "boot-stage").then(|| self.stage.to_string())
    }
}

pub fn scripted() -> StageFactory {
    Box::new(|stage, _, _, _| {
        Box::new(Scripted {
            stage,
            uploaded: 0,
            reply: vec![],
        })
    })
}

pub fn new_mac(start: StartMode, faults: Faults) -> SimMac {
    SimMac::new(
        Board::load("j274ap").unwrap(),
        ECID,
        start,
        faults,
        Timing::fast(),
    )
    .with_ibss_check(Box::new(|img, board| {
        assert_eq!(board.board_config, "j274ap");
        if img.starts_with(GOOD) {
            Ok(())
        } else {
            Err("not signed for this Mac".into())
        }
    }))
    .with_stage_factory(scripted())
}

pub fn setup(request_type: u8, request: u8, value: u16, index: u16, length: u16) -> Setup {
    Setup {
        request_type,
        request,
        value,
        index,
        length,
    }
}

impl Host {
    pub fn new(start: StartMode, faults: Faults) -> Host {
        Host::with(new_mac(start, faults))
    }

    pub fn with(mac: SimMac) -> Host {
        Host {
            mac,
            now: Instant::now(),
            link: vec![],
        }
    }

    fn poll(&mut self) {
        while let Some(c) = self.mac.poll_link(self.now) {
            self.link.push(c);
        }
    }

    /// One control transfer, then a link poll (as front ends do). IN data is cut to wLength.
    pub fn control(&mut self, s: Setup, data: &[u8]) -> Reply {
        assert!(self.mac.attached(), "host talks to a detached device");
        let mut r = self.mac.control(&s, data);
        if let Reply::Ack(d) = &mut r {
            if s.is_in() {
                d.truncate(s.length.into());
            }
        }
        self.poll();
        r
    }

    pub fn bulk_out(&mut self, ep: u8, data: &[u8]) -> Reply {
        let r = self.mac.bulk_out(ep, data);
        self.poll();
        r
    }

    pub fn reset(&mut self) {
        self.mac.reset();
        self.poll();
    }

    /// Let simulated time pass in 1 ms steps; returns (and consumes) the link changes seen.
    pub fn advance(&mut self, ms: u64) -> Vec<LinkChange> {
        let start = self.link.len();
        for _ in 0..ms {
            self.now += Duration::from_millis(1);
            self.poll();
        }
        self.link.split_off(start)
    }

    pub fn take_link(&mut self) -> Vec<LinkChange> {
        std::mem::take(&mut self.link)
    }

    pub fn in_data(&mut self, s: Setup) -> Vec<u8> {
        match self.control(s, &[]) {
            Reply::Ack(d) => d,
            r => panic!("{s:?} answered {r:?}"),
        }
    }

    pub fn descriptor(&mut self, kind: u8, index: u8, langid: u16, len: u16) -> Reply {
        self.control(
            setup(
                0x80,
                6,
                u16::from(kind) << 8 | u16::from(index),
                langid,
                len,
            ),
            &[],
        )
    }

    pub fn string(&mut self, index: u8) -> String {
        let d = match self.descriptor(3, index, 0x0409, 255) {
            Reply::Ack(d) => d,
            r => panic!("string {index}: {r:?}"),
        };
        assert_eq!(d[0] as usize, d.len());
        assert_eq!(d[1], 3);
        let units: Vec<u16> = d[2..]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16(&units).unwrap()
    }

    pub fn serial(&mut self) -> String {
        self.string(4)
    }

    pub fn product_id(&self) -> u16 {
        self.mac.enumeration().product_id
    }

    pub fn dfu_status(&mut self) -> Vec<u8> {
        self.in_data(setup(0xa1, 3, 0, 0, 6))
    }

    pub fn dfu_state(&mut self) -> u8 {
        self.in_data(setup(0xa1, 5, 0, 0, 1))[0]
    }

    pub fn dnload(&mut self, block: u16, data: &[u8]) -> Reply {
        self.control(setup(0x21, 1, block, 0, data.len() as u16), data)
    }

    /// libirecovery's DFU upload (protocol.md §2.2) without the final reset. Returns every
    /// GET_STATUS answer in order.
    pub fn dfu_upload(&mut self, image: &[u8], block: usize, with_suffix: bool) -> Vec<Vec<u8>> {
        assert_eq!(self.dfu_state(), 2);
        let mut statuses = vec![];
        let chunks: Vec<&[u8]> = image.chunks(block).collect();
        let n = chunks.len();
        for (i, c) in chunks.iter().enumerate() {
            let mut data = c.to_vec();
            let last = i + 1 == n;
            let mut separate_suffix = false;
            if last && with_suffix {
                if data.len() + 16 > block {
                    separate_suffix = true;
                } else {
                    data.extend(suffix_for(image));
                }
            }
            assert_eq!(
                self.dnload(i as u16, &data),
                Reply::Ack(vec![]),
                "block {i}"
            );
            statuses.push(self.dfu_status());
            if separate_suffix {
                assert_eq!(
                    self.dnload(i as u16, &suffix_for(image)),
                    Reply::Ack(vec![])
                );
                statuses.push(self.dfu_status());
            }
        }
        assert_eq!(self.dnload(n as u16, &[]), Reply::Ack(vec![]));
        statuses.push(self.dfu_status());
        statuses.push(self.dfu_status());
        statuses
    }

    /// Send an iBoot command (`40/bReq`, NUL-terminated).
    pub fn command(&mut self, cmd: &str, breq: u8) -> Reply {
        let mut d = cmd.as_bytes().to_vec();
        d.push(0);
        self.control(setup(0x40, breq, 0, 0, d.len() as u16), &d)
    }

    /// Recovery-mode file upload (protocol.md §3.2).
    pub fn upload(&mut self, data: &[u8]) {
        assert_eq!(
            self.control(setup(0x41, 0, 0, 0, 0), &[]),
            Reply::Ack(vec![])
        );
        for c in data.chunks(0x8000) {
            assert_eq!(self.bulk_out(0x04, c), Reply::Ack(vec![]));
        }
        if data.len() % 512 == 0 {
            assert_eq!(self.bulk_out(0x04, &[]), Reply::Ack(vec![]));
        }
    }

    /// `getenv NAME` then `C0/00`, up to the NUL.
    pub fn getenv(&mut self, name: &str) -> String {
        assert_eq!(
            self.command(&format!("getenv {name}"), 0),
            Reply::Ack(vec![])
        );
        let r = self.in_data(setup(0xc0, 0, 0, 0, 255));
        let end = r.iter().position(|b| *b == 0).unwrap_or(r.len());
        String::from_utf8_lossy(&r[..end]).into_owned()
    }

    /// The return value of the last command (`C0/00`, first byte).
    pub fn getret(&mut self) -> u8 {
        self.in_data(setup(0xc0, 0, 0, 0, 255))[0]
    }

    pub fn set_configuration(&mut self, v: u16) -> Reply {
        self.control(setup(0x00, 9, v, 0, 0), &[])
    }

    /// Upload a valid iBSS, reset, and wait until iBSS answers in Recovery.
    pub fn boot_to_stage1(&mut self) {
        self.dfu_upload(&ibss(true, 3000), 0x800, true);
        self.reset();
        self.advance(30);
        assert_eq!(self.product_id(), 0x1281);
        assert!(self.mac.attached());
        self.set_configuration(1);
        self.take_link();
    }

    pub fn boot_to_stage2(&mut self) {
        self.boot_to_stage1();
        self.upload(b"personalized iBEC");
        assert_eq!(self.command("go", 1), Reply::Ack(vec![]));
        self.advance(30);
        assert_eq!(self.mac.env("boot-stage").as_deref(), Some("2"));
        self.set_configuration(1);
        self.take_link();
    }
}
