//! A minimal Apple-looking test device served over USB/IP, for `ci/vm/transport-test.sh`: it
//! has the plain behaviours the libusb edge must survive that a Mac model lacks. It enumerates as a DFU-mode device
//! (05ac:1227 by default), and one second after the host configured it "reboots": it leaves
//! the bus and comes back shortly after with another product id (a Mac going from DFU to
//! iBSS recovery). As recovery its bulk IN endpoint never has data, so reads must time out
//! (the URB stays pending until the host unlinks it).
//!
//! usage: usbip-demo [--listen ADDR] [--attach] [--first-pid HEX] [--second-pid HEX]
//!                   [--reboot-after-ms N] [--gap-ms N]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use mac_sim::usbip::{serve, ExportOptions};
use mac_sim::wire::{Enumeration, LinkChange, Reply, Setup, SimDevice, Speed};

const SERIAL: &str =
    "CPID:8103 CPRV:11 CPFM:03 SCEP:01 BDID:22 ECID:0000000000000001 IBFL:3C SRTG:[iBoot-7459.101.2]";

struct Demo {
    pid: u16,
    second_pid: u16,
    attached: bool,
    rebooted: bool,
    configured_at: Option<Instant>,
    detached_at: Option<Instant>,
    reboot_after: Duration,
    gap: Duration,
}

impl Demo {
    fn dfu(&self) -> bool {
        !self.rebooted
    }

    fn device_descriptor(&self) -> Vec<u8> {
        let p = self.pid.to_le_bytes();
        vec![
            18, 1, 0x00, 0x02, 0, 0, 0, 64, 0xac, 0x05, p[0], p[1], 0x00, 0x00, 1, 2, 3, 1,
        ]
    }

    fn configuration(&self) -> Vec<u8> {
        if self.dfu() {
            vec![
                9, 2, 27, 0, 1, 1, 0, 0x80, 250, // one interface
                9, 4, 0, 0, 0, 0xfe, 0x01, 0x02, 0, // DFU
                9, 0x21, 0x0b, 0, 0, 0x00, 0x08, 0x10, 0x01, // DFU functional
            ]
        } else {
            vec![
                9, 2, 32, 0, 1, 1, 0, 0x80, 250, // one interface
                9, 4, 0, 0, 2, 0xff, 0xff, 0, 0, // vendor (recovery)
                7, 5, 0x04, 0x02, 0x00, 0x02, 0, // bulk OUT 4
                7, 5, 0x81, 0x02, 0x00, 0x02, 0, // bulk IN 1: never has data (NAKs)
            ]
        }
    }

    fn string(&self, index: u8) -> Option<Vec<u8>> {
        let s = match index {
            0 => return Some(vec![4, 3, 0x09, 0x04]),
            1 => "Apple Inc.",
            2 if self.dfu() => "Apple Mobile Device (DFU Mode)",
            2 => "Apple Mobile Device (Recovery Mode)",
            3 => SERIAL,
            _ => return None,
        };
        let mut v = vec![0u8, 3];
        for u in s.encode_utf16() {
            v.extend_from_slice(&u.to_le_bytes());
        }
        v[0] = v.len() as u8;
        Some(v)
    }
}

impl SimDevice for Demo {
    fn enumeration(&self) -> Enumeration {
        Enumeration {
            vendor_id: 0x05ac,
            product_id: self.pid,
            speed: Speed::High,
            device_descriptor: self.device_descriptor(),
            configurations: vec![self.configuration()],
        }
    }

    fn control(&mut self, setup: &Setup, _data_out: &[u8]) -> Reply {
        let reply = match (setup.request_type, setup.request, (setup.value >> 8) as u8) {
            (0x80, 6, 1) => Some(self.device_descriptor()),
            (0x80, 6, 2) => Some(self.configuration()),
            (0x80, 6, 3) => self.string(setup.value as u8),
            (0x80, 0, _) => Some(vec![0x80, 0]),
            (0x80, 8, _) => Some(vec![1]),
            (0x00, 9, _) => {
                self.configured_at.get_or_insert_with(Instant::now);
                Some(Vec::new())
            }
            (0x01, 11, _) => Some(Vec::new()),
            _ => None,
        };
        match reply {
            Some(d) => Reply::Ack(d),
            None => Reply::Stall,
        }
    }

    fn bulk_out(&mut self, _endpoint: u8, _data: &[u8]) -> Reply {
        Reply::Ack(Vec::new())
    }

    fn bulk_in(&mut self, _endpoint: u8, _max_len: usize) -> Reply {
        Reply::Nak
    }

    fn reset(&mut self) {}

    fn poll_link(&mut self, now: Instant) -> Option<LinkChange> {
        if self.rebooted {
            let left = self.detached_at?;
            if !self.attached && now >= left + self.gap {
                self.attached = true;
                self.pid = self.second_pid;
                eprintln!("usbip-demo: back as 05ac:{:04x}", self.pid);
                return Some(LinkChange::Attach);
            }
            return None;
        }
        let configured = self.configured_at?;
        if now >= configured + self.reboot_after {
            self.rebooted = true;
            self.attached = false;
            self.detached_at = Some(now);
            eprintln!("usbip-demo: rebooting (leaving the bus)");
            return Some(LinkChange::Detach);
        }
        None
    }

    fn attached(&self) -> bool {
        self.attached
    }
}

fn parse_hex(s: &str) -> Option<u16> {
    u16::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let mut opts = ExportOptions::default();
    let mut demo = Demo {
        pid: 0x1227,
        second_pid: 0x1281,
        attached: true,
        rebooted: false,
        configured_at: None,
        detached_at: None,
        reboot_after: Duration::from_millis(1000),
        gap: Duration::from_millis(300),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        let ok = match a.as_str() {
            "--attach" => {
                opts.attach = true;
                true
            }
            "--listen" => value()
                .parse::<SocketAddr>()
                .map(|l| opts.listen = l)
                .is_ok(),
            "--first-pid" => parse_hex(&value()).map(|p| demo.pid = p).is_some(),
            "--second-pid" => parse_hex(&value()).map(|p| demo.second_pid = p).is_some(),
            "--reboot-after-ms" => value()
                .parse()
                .map(|ms| demo.reboot_after = Duration::from_millis(ms))
                .is_ok(),
            "--gap-ms" => value()
                .parse()
                .map(|ms| demo.gap = Duration::from_millis(ms))
                .is_ok(),
            _ => false,
        };
        if !ok {
            eprintln!("usbip-demo: bad argument {a:?} (see the source header for usage)");
            return ExitCode::from(2);
        }
    }
    eprintln!(
        "usbip-demo: serving 05ac:{:04x} on {} (attach: {})",
        demo.pid, opts.listen, opts.attach
    );
    match serve(vec![Box::new(demo)], opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usbip-demo: {e}");
            ExitCode::FAILURE
        }
    }
}
