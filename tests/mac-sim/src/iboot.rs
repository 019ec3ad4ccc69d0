//! STAND-IN for the sim-iboot branch's simulated iBoot (agreed API only); replaced at merge.
//! Accepts any non-empty upload before `go`/`bootx`.

use crate::board::Board;
use crate::faults::Faults;
use crate::wire::{Reply, Setup};

pub enum IbootStage {
    Stage1,
    Stage2,
}

pub enum IbootEvent {
    JumpToNextStage,
    BootRestoreOs,
    BootFailed(String),
    Reboot,
}

pub struct Iboot {
    stage: &'static str,
    upload: Vec<u8>,
    reply: Vec<u8>,
}

impl Iboot {
    pub fn new(stage: IbootStage, _board: &Board, _faults: &Faults) -> Iboot {
        let stage = match stage {
            IbootStage::Stage1 => "1",
            IbootStage::Stage2 => "2",
        };
        Iboot {
            stage,
            upload: Vec::new(),
            reply: Vec::new(),
        }
    }

    pub fn control(&mut self, setup: &Setup, data: &[u8]) -> (Reply, Option<IbootEvent>) {
        match (setup.request_type, setup.request) {
            (0x40, 0 | 1) => {
                let cmd = String::from_utf8_lossy(data.split(|b| *b == 0).next().unwrap_or(&[]))
                    .to_string();
                let have = !self.upload.is_empty();
                let ev = match cmd.as_str() {
                    "go" if have => Some(IbootEvent::JumpToNextStage),
                    "bootx" if have => Some(IbootEvent::BootRestoreOs),
                    "bootx" => Some(IbootEvent::BootFailed("no kernelcache".into())),
                    "reboot" => Some(IbootEvent::Reboot),
                    c if c.starts_with("getenv ") => {
                        self.reply = self.env(&c[7..]).unwrap_or("").as_bytes().to_vec();
                        self.reply.push(0);
                        None
                    }
                    _ => None,
                };
                (Reply::Ack(Vec::new()), ev)
            }
            (0xc0, 0) => (Reply::Ack(std::mem::take(&mut self.reply)), None),
            (0x41, 0) => {
                self.upload.clear();
                (Reply::Ack(Vec::new()), None)
            }
            (0x21, 1) => (Reply::Ack(Vec::new()), None),
            _ => (Reply::Stall, None),
        }
    }

    pub fn bulk_out(&mut self, _endpoint: u8, data: &[u8]) -> (Reply, Option<IbootEvent>) {
        self.upload.extend_from_slice(data);
        (Reply::Ack(Vec::new()), None)
    }

    pub fn bulk_in(&mut self, _endpoint: u8, _max_len: usize) -> Reply {
        Reply::Nak
    }

    pub fn env(&self, name: &str) -> Option<&str> {
        match name {
            "boot-stage" => Some(self.stage),
            _ => None,
        }
    }
}
