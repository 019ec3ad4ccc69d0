//! A small restore host written for these tests from protocol.md §6–§8 (not from
//! restore-agent): host-side usbmux over the simulated bulk endpoints, a restored client that
//! answers every DataType of the shipped scenarios, and an ASR streamer. Knobs make it break
//! rules on purpose so the simulator's checks can be seen to fire.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mac_sim::img4::{build_im4m, build_im4p, stitch, FourCc, TicketSpec};
use mac_sim::restore::restored::DeviceInfo;
use mac_sim::restore::scenario::fill_image;
use mac_sim::restore::RestoreOs;
use mac_sim::wire::Reply;
use plist::{Dictionary, Value};
use sha1::{Digest, Sha1};

/// Ways the host can misbehave.
#[derive(Debug, Clone, Default)]
pub struct Bad {
    pub skip_zlp: bool,
    pub ignore_window: bool,
    pub wrong_variant: bool,
    pub ticket_wrong_board: bool,
    pub lpol_wrong_fourcc: bool,
    pub big_file_chunk: bool,
    pub urlasset_xml: bool,
    pub cpio_no_trailer: bool,
    pub asr_corrupt_byte: Option<u64>,
    pub asr_bad_chunk_sha: bool,
    pub asr_bad_oob: bool,
    pub asr_wrong_size: bool,
    pub missing_required_type: Option<String>,
    pub behavior: Option<String>,
    pub no_final_ack: bool,
    /// Speak the v1 (HelloCtrl) reverse-proxy control protocol.
    pub proxy_v1: bool,
    /// Skip the reverse proxy although the scenario wants it.
    pub skip_proxy: bool,
    /// Open and close one QueryType session first, like usbmuxd's preflight (§6.8).
    pub preflight: bool,
    /// Open one QueryType session first and reset it without Goodbye, as Debian 12's
    /// usbmuxd 1.1.1 preflight does (seen in ci/vm/xcheck-test.sh).
    pub preflight_reset: bool,
}

struct HConn {
    dport: u16,
    seq: u32,
    ack: u32,
    peer_acked: u32,
    peer_window: u32,
    rx: VecDeque<u8>,
    open: bool,
    dead: Option<String>,
}

pub struct Host {
    os: Arc<RestoreOs>,
    v2: bool,
    tx_seq: u16,
    rx_seq: u16,
    conns: HashMap<u16, HConn>,
    next_port: u16,
    pub bad: Bad,
    pub timeout: Duration,
    pub log: Vec<String>,
}

const MAX_PAYLOAD: usize = 49_152 - 16 - 20;

impl Host {
    pub fn new(os: Arc<RestoreOs>, bad: Bad) -> Host {
        Host {
            os,
            v2: false,
            tx_seq: 0,
            rx_seq: 0xFFFF,
            conns: HashMap::new(),
            next_port: 1,
            bad,
            timeout: Duration::from_secs(10),
            log: Vec::new(),
        }
    }

    fn out(&mut self, data: &[u8]) -> Result<(), String> {
        match self.os.bulk_out(data) {
            Reply::Ack(_) => Ok(()),
            _ => Err("bulk OUT stalled: the Mac is gone".into()),
        }
    }

    fn send_pkt(&mut self, proto: u32, body: &[u8]) -> Result<(), String> {
        let hl = if self.v2 { 16 } else { 8 };
        let mut p = proto.to_be_bytes().to_vec();
        p.extend_from_slice(&((hl + body.len()) as u32).to_be_bytes());
        if self.v2 {
            p.extend_from_slice(&0xFEED_FACEu32.to_be_bytes());
            p.extend_from_slice(&self.tx_seq.to_be_bytes());
            p.extend_from_slice(&self.rx_seq.to_be_bytes());
            self.tx_seq = self.tx_seq.wrapping_add(1);
        }
        p.extend_from_slice(body);
        self.out(&p)?;
        if p.len() % 512 == 0 && !self.bad.skip_zlp {
            self.out(&[])?;
        }
        Ok(())
    }

    pub fn handshake(&mut self) -> Result<u32, String> {
        let mut v = 0u32.to_be_bytes().to_vec();
        v.extend_from_slice(&20u32.to_be_bytes());
        v.extend_from_slice(&2u32.to_be_bytes());
        v.extend_from_slice(&[0; 8]);
        self.out(&v)?;
        let deadline = Instant::now() + self.timeout;
        let reply = loop {
            match self.os.bulk_in(16384) {
                Reply::Ack(d) => break d,
                Reply::Nak if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(200))
                }
                other => return Err(format!("no VERSION reply: {other:?}")),
            }
        };
        if reply.len() != 20 || reply[..4] != [0, 0, 0, 0] {
            return Err(format!("bad VERSION reply {reply:02x?}"));
        }
        let major = u32::from_be_bytes([reply[8], reply[9], reply[10], reply[11]]);
        if major >= 2 {
            self.v2 = true;
            self.tx_seq = 0;
            self.rx_seq = 0xFFFF;
            self.send_pkt(2, &[7])?;
        }
        Ok(major)
    }

    fn tcp(&mut self, sport: u16, flags: u8, data: &[u8]) -> Result<(), String> {
        let c = &self.conns[&sport];
        let mut b = Vec::with_capacity(20 + data.len());
        b.extend_from_slice(&sport.to_be_bytes());
        b.extend_from_slice(&c.dport.to_be_bytes());
        b.extend_from_slice(&c.seq.to_be_bytes());
        b.extend_from_slice(&c.ack.to_be_bytes());
        b.push(0x50);
        b.push(flags);
        b.extend_from_slice(&512u16.to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(data);
        self.send_pkt(6, &b)
    }

    /// One bulk IN; false if NAK.
    fn pump(&mut self) -> Result<bool, String> {
        let d = match self.os.bulk_in(16384) {
            Reply::Ack(d) => d,
            Reply::Nak => return Ok(false),
            Reply::Stall => return Err("bulk IN stalled: the Mac is gone".into()),
        };
        let hl = if self.v2 { 16 } else { 8 };
        if d.len() < hl {
            return Err(format!("short mux packet {}", d.len()));
        }
        let proto = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
        if self.v2 {
            // usbmuxd stores the received header's rx_seq field (§6.3).
            self.rx_seq = u16::from_be_bytes([d[14], d[15]]);
        }
        let body = &d[hl..];
        if proto == 1 {
            self.log
                .push(format!("CONTROL {:?}", String::from_utf8_lossy(body)));
            return Ok(true);
        }
        if proto != 6 || body.len() < 20 {
            return Err(format!("unexpected mux packet proto {proto}"));
        }
        let dport = u16::from_be_bytes([body[2], body[3]]);
        let seq = u32::from_be_bytes(body[4..8].try_into().unwrap());
        let ack = u32::from_be_bytes(body[8..12].try_into().unwrap());
        let flags = body[13];
        let window = u32::from(u16::from_be_bytes([body[14], body[15]])) << 8;
        let payload = &body[20..];
        let Some(c) = self.conns.get_mut(&dport) else {
            return Ok(true);
        };
        if flags & 0x04 != 0 {
            // Later RSTs answer our packets still in flight; the first carries the reason.
            if c.dead.is_some() {
                return Ok(true);
            }
            c.dead = Some(format!(
                "device reset port {}: {}",
                c.dport,
                String::from_utf8_lossy(payload).trim_end()
            ));
            return Ok(true);
        }
        c.peer_acked = ack;
        c.peer_window = window;
        if flags == 0x12 {
            c.open = true;
            c.seq = 1;
            c.ack = seq.wrapping_add(1);
            self.tcp(dport, 0x10, &[])?;
            return Ok(true);
        }
        if !payload.is_empty() {
            c.rx.extend(payload);
        }
        Ok(true)
    }

    fn wait_step(&mut self, deadline: Instant) -> Result<(), String> {
        if !self.pump()? {
            if Instant::now() > deadline {
                return Err("timed out".into());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    }

    pub fn connect(&mut self, port: u16) -> Result<u16, String> {
        let sport = self.next_port;
        self.next_port += 1;
        self.conns.insert(
            sport,
            HConn {
                dport: port,
                seq: 0,
                ack: 0,
                peer_acked: 0,
                peer_window: 0,
                rx: VecDeque::new(),
                open: false,
                dead: None,
            },
        );
        self.tcp(sport, 0x02, &[])?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let c = &self.conns[&sport];
            if c.open {
                return Ok(sport);
            }
            if let Some(d) = &c.dead {
                return Err(format!("connect to {port} refused: {d}"));
            }
            self.wait_step(deadline)
                .map_err(|e| format!("connect to {port}: {e}"))?;
        }
    }

    pub fn write(&mut self, sport: u16, mut data: &[u8]) -> Result<(), String> {
        let deadline = Instant::now() + self.timeout;
        while !data.is_empty() {
            let c = &self.conns[&sport];
            if let Some(d) = &c.dead {
                return Err(d.clone());
            }
            let inflight = c.seq.wrapping_sub(c.peer_acked) as usize;
            let room = if self.bad.ignore_window {
                MAX_PAYLOAD
            } else {
                (c.peer_window as usize).saturating_sub(inflight)
            };
            let n = room.min(MAX_PAYLOAD).min(data.len());
            if n == 0 {
                self.wait_step(deadline)
                    .map_err(|e| format!("write: window closed: {e}"))?;
                continue;
            }
            self.tcp(sport, 0x10, &data[..n])?;
            self.conns.get_mut(&sport).unwrap().seq += n as u32;
            data = &data[n..];
            // Keep the device's ACKs flowing.
            while self.pump()? {}
        }
        Ok(())
    }

    pub fn read_exact(&mut self, sport: u16, n: usize) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let c = &self.conns[&sport];
            if c.rx.len() >= n {
                break;
            }
            if let Some(d) = &c.dead {
                return Err(d.clone());
            }
            let dport = c.dport;
            self.wait_step(deadline)
                .map_err(|e| format!("read on port {dport}: {e}"))?;
        }
        let c = self.conns.get_mut(&sport).unwrap();
        let out: Vec<u8> = c.rx.drain(..n).collect();
        c.ack = c.ack.wrapping_add(n as u32);
        self.tcp(sport, 0x10, &[])?;
        Ok(out)
    }

    /// Read until `needle` (inclusive) plus one optional newline already buffered.
    pub fn read_until(&mut self, sport: u16, needle: &[u8]) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let c = &self.conns[&sport];
            let buf: Vec<u8> = c.rx.iter().copied().collect();
            if let Some(i) = buf.windows(needle.len()).position(|w| w == needle) {
                let mut end = i + needle.len();
                if buf.get(end) == Some(&b'\n') {
                    end += 1;
                }
                return self.read_exact(sport, end);
            }
            if let Some(d) = &c.dead {
                return Err(d.clone());
            }
            self.wait_step(deadline)?;
        }
    }

    pub fn close(&mut self, sport: u16) -> Result<(), String> {
        if self.conns[&sport].dead.is_none() {
            self.tcp(sport, 0x04, &[])?;
        }
        self.conns.remove(&sport);
        Ok(())
    }

    // ---- restored framing ----

    pub fn send_plist(&mut self, sport: u16, d: Dictionary, binary: bool) -> Result<(), String> {
        let mut buf = Vec::new();
        if binary {
            plist::to_writer_binary(&mut buf, &Value::Dictionary(d)).unwrap();
        } else {
            plist::to_writer_xml(&mut buf, &Value::Dictionary(d)).unwrap();
        }
        let mut out = (buf.len() as u32).to_be_bytes().to_vec();
        out.extend(buf);
        self.write(sport, &out)
    }

    pub fn recv_plist(&mut self, sport: u16) -> Result<Dictionary, String> {
        let len = self.read_exact(sport, 4)?;
        let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
        let body = self.read_exact(sport, len)?;
        plist::from_bytes::<Value>(&body)
            .map_err(|e| e.to_string())?
            .into_dictionary()
            .ok_or_else(|| "not a dict".into())
    }
}

fn d(pairs: Vec<(&str, Value)>) -> Dictionary {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn st(s: &str) -> Value {
    Value::String(s.into())
}

/// What the host restores.
pub struct Job {
    pub info: DeviceInfo,
    pub behavior: String,
    pub image_seed: u64,
    pub image_size: u64,
    pub proxy: bool,
    /// The device will ask for a connection channel and ping it.
    pub proxy_ping: bool,
}

fn ticket(job: &Job, bad: &Bad) -> Vec<u8> {
    build_im4m(&TicketSpec {
        chip: job.info.cpid,
        board: if bad.ticket_wrong_board {
            job.info.bdid + 1
        } else {
            job.info.bdid
        },
        ecid: job.info.ecid,
        security_domain: 1,
        production: true,
        security: true,
        digests: vec![],
    })
}

fn capability_tables(bad: &Bad) -> (Dictionary, Dictionary) {
    let t = |names: &[&str], v: bool| -> Vec<(String, Value)> {
        names
            .iter()
            .map(|n| (n.to_string(), Value::Boolean(v)))
            .collect()
    };
    // §7.5, byte for byte.
    let mut dt: Dictionary = t(
        &[
            "AuthInstallCACert",
            "Cryptex1LocalPolicy",
            "FirmwareUpdaterDataV3",
            "FirmwareUpdaterPreflight",
            "HostSystemTime",
            "MessageUseStreamedImageFile",
            "NitrogenFWData",
            "OverlayRootDataForKey",
            "OverlayRootDataForKeyIndex",
            "PeppyFWData",
            "PersonalizedData",
            "RamdiskFWData",
            "ReceiptManifest",
            "RecoveryOSASRImage",
            "RecoveryOSAppleLogo",
            "RecoveryOSDeviceTree",
            "RecoveryOSFileAssetImage",
            "RecoveryOSIBEC",
            "RecoveryOSIBootFWFilesImages",
            "RecoveryOSImage",
            "RecoveryOSKernelCache",
            "RecoveryOSLocalPolicy",
            "RecoveryOSRootTicketData",
            "RecoveryOSStaticTrustCache",
            "RecoveryOSVersionData",
            "RestoreLocalPolicy",
            "URLAsset",
            "UpdateVolumeOverlayRootDataCount",
        ],
        true,
    )
    .into_iter()
    .chain(t(
        &[
            "BasebandBootData",
            "BasebandData",
            "BasebandStackData",
            "BasebandUpdaterOutputData",
            "BootabilityBundle",
            "BuildIdentityDict",
            "BuildIdentityDictV2",
            "DataType",
            "DiagData",
            "EANData",
            "FDRMemoryCommit",
            "FDRTrustData",
            "FUDData",
            "FileData",
            "FileDataDone",
            "FirmwareUpdaterData",
            "FirmwareUpdaterDataV2",
            "GrapeFWData",
            "HPMFWData",
            "KernelCache",
            "NORData",
            "OpalFWData",
            "OverlayRootDataCount",
            "PersonalizedBootObjectV3",
            "ProvisioningData",
            "RecoveryOSOverlayRootDataCount",
            "RootData",
            "RootTicket",
            "S3EOverride",
            "SourceBootObjectV3",
            "SourceBootObjectV4",
            "SsoServiceTicket",
            "StockholmPostflight",
            "SystemImageCanonicalMetadata",
            "SystemImageData",
            "SystemImageRootHash",
            "USBCFWData",
            "USBCOverride",
        ],
        false,
    ))
    .collect();
    let mt: Dictionary = t(
        &[
            "AsyncDataRequestMsg",
            "AsyncWait",
            "CheckpointMsg",
            "CrashLog",
            "FDRSubmit",
            "RestoreAttestation",
            "RestoredCrash",
        ],
        true,
    )
    .into_iter()
    .chain(t(
        &[
            "BBUpdateStatusMsg",
            "DataRequestMsg",
            "MsgType",
            "PreviousRestoreLogMsg",
            "ProgressMsg",
            "ProvisioningAck",
            "ProvisioningInfo",
            "ProvisioningStatusMsg",
            "ReceivedFinalStatusMsg",
            "StatusMsg",
        ],
        false,
    ))
    .collect();
    if let Some(m) = &bad.missing_required_type {
        dt.remove(m);
    }
    (dt, mt)
}

fn restore_options(job: &Job, bad: &Bad) -> Dictionary {
    let (dt, mt) = capability_tables(bad);
    let b = Value::Boolean;
    let behavior = bad.behavior.clone().unwrap_or_else(|| job.behavior.clone());
    d(vec![
        ("AutoBootDelay", Value::Integer(0.into())),
        ("SupportedDataTypes", Value::Dictionary(dt)),
        ("SupportedMessageTypes", Value::Dictionary(mt)),
        ("AddSystemPartitionPadding", b(true)),
        ("AllowUntetheredRestore", b(false)),
        ("AuthInstallEnableSso", b(false)),
        ("AuthInstallRecoveryOSVariant", st("macOS Customer")),
        ("AuthInstallRestoreBehavior", st(&behavior)),
        ("BasebandUpdaterOutputPath", b(true)),
        ("DisableUserAuthentication", b(true)),
        ("FitSystemPartitionToContent", b(true)),
        ("FlashNOR", b(true)),
        ("FormatForAPFS", b(true)),
        ("FormatForLwVM", b(false)),
        ("InstallDiags", b(false)),
        ("InstallRecoveryOS", b(true)),
        ("MacOSSwapPerformed", b(true)),
        ("MacOSVariantPresent", b(true)),
        ("MinimumBatteryVoltage", Value::Integer(0.into())),
        ("RecoveryOSUnpack", b(true)),
        ("ShouldRestoreSystemImage", b(true)),
        ("SkipPreflightPersonalization", b(false)),
        ("UpdateBaseband", b(true)),
        ("recoveryOSPartitionSize", Value::Integer(58201.into())),
        ("RootToInstall", b(false)),
        ("UUID", st("6B29FC40-CA47-1067-B31D-00DD010662DA")),
        ("CreateFilesystemPartitions", b(true)),
        ("SystemImage", b(true)),
        (
            "RestoreBootArgs",
            st("rd=md0 nand-enable-reformat=1 -progress -restore"),
        ),
    ])
}

fn cpio_entry(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = format!(
        "070707{:06o}{:06o}{:06o}{:06o}{:06o}{:06o}{:06o}{:011o}{:06o}{:011o}",
        0,
        1,
        0o100644,
        0,
        0,
        1,
        0,
        0,
        name.len() + 1,
        data.len()
    )
    .into_bytes();
    h.extend_from_slice(name.as_bytes());
    h.push(0);
    h.extend_from_slice(data);
    h
}

impl Host {
    /// Run a whole restore; Ok(()) when the Mac reported success.
    pub fn restore(&mut self, job: &Job) -> Result<(), String> {
        self.handshake()?;
        if self.bad.preflight {
            let pre = self.connect(62078)?;
            self.send_plist(pre, d(vec![("Request", st("QueryType"))]), false)?;
            self.recv_plist(pre)?;
            self.send_plist(pre, d(vec![("Request", st("Goodbye"))]), false)?;
            self.recv_plist(pre)?;
            self.close(pre)?;
        }
        if self.bad.preflight_reset {
            let pre = self.connect(62078)?;
            self.send_plist(pre, d(vec![("Request", st("QueryType"))]), false)?;
            self.recv_plist(pre)?;
            self.close(pre)?;
        }
        let main = self.connect(62078)?;
        self.send_plist(
            main,
            d(vec![("Request", st("QueryType")), ("Label", st("test"))]),
            false,
        )?;
        let t = self.recv_plist(main)?;
        if t.get("Type").and_then(Value::as_string) != Some("com.apple.mobile.restored") {
            return Err(format!("not restored: {t:?}"));
        }
        let version = t.get("RestoreProtocolVersion").cloned().unwrap();
        for key in ["HardwareInfo", "SavedDebugInfo"] {
            self.send_plist(
                main,
                d(vec![("Request", st("QueryValue")), ("QueryKey", st(key))]),
                false,
            )?;
            let v = self.recv_plist(main)?;
            if key == "HardwareInfo" {
                let hw = v[key].as_dictionary().unwrap();
                assert_eq!(
                    hw["UniqueChipID"].as_unsigned_integer(),
                    Some(job.info.ecid)
                );
            }
        }
        if job.proxy && !self.bad.skip_proxy {
            self.reverse_proxy(job)?;
        }
        self.start_restore(job, main, version)
    }

    fn le_bplist(&mut self, c: u16, d: Dictionary) -> Result<(), String> {
        let mut buf = Vec::new();
        plist::to_writer_binary(&mut buf, &Value::Dictionary(d)).unwrap();
        let mut out = (buf.len() as u32).to_le_bytes().to_vec();
        out.extend(buf);
        self.write(c, &out)
    }

    fn read_le_bplist(&mut self, c: u16) -> Result<Dictionary, String> {
        let len = self.read_exact(c, 4)?;
        let body = self.read_exact(c, u32::from_le_bytes(len.try_into().unwrap()) as usize)?;
        if !body.starts_with(b"bplist00") {
            return Err("proxy plist not binary".into());
        }
        plist::from_bytes::<Value>(&body)
            .map_err(|e| e.to_string())?
            .into_dictionary()
            .ok_or_else(|| "not a dict".into())
    }

    /// §7.10, host side, single-threaded: control handshake, then (ping) one connection.
    fn reverse_proxy(&mut self, job: &Job) -> Result<(), String> {
        let ctrl = self.connect(1082)?;
        let conn_port = if self.bad.proxy_v1 {
            self.write(ctrl, b"HelloCtrl\0")?;
            let r = self.read_exact(ctrl, 11)?;
            if &r[..9] != b"HelloCtrl" {
                return Err(format!("bad HelloCtrl reply {r:02x?}"));
            }
            u16::from_le_bytes([r[9], r[10]])
        } else {
            self.write(ctrl, b"BeginCtrl\0")?;
            self.le_bplist(
                ctrl,
                d(vec![
                    ("Command", st("BeginCtrl")),
                    ("CtrlProtoVersion", Value::Integer(2.into())),
                ]),
            )?;
            let r = self.read_le_bplist(ctrl)?;
            r.get("ConnPort")
                .and_then(Value::as_unsigned_integer)
                .ok_or("no ConnPort")? as u16
        };
        if !job.proxy_ping {
            return Ok(());
        }
        let cmd = self.read_exact(ctrl, 4)?;
        if cmd != 1u32.to_le_bytes() {
            return Err(format!("proxy command {cmd:02x?}"));
        }
        let c = self.connect(conn_port)?;
        self.write(c, b"HelloConn\0")?;
        if self.bad.proxy_v1 {
            self.read_exact(c, 10)?;
        } else {
            self.read_le_bplist(c)?;
        }
        let op = self.read_exact(c, 2)?;
        if op != 0xBBAAu16.to_le_bytes() {
            return Err(format!("proxy op {op:02x?}"));
        }
        let ping = self.read_le_bplist(c)?;
        if ping.get("Command").and_then(Value::as_string) != Some("Ping") {
            return Err(format!("expected Ping, got {ping:?}"));
        }
        self.le_bplist(c, d(vec![("Pong", Value::Boolean(true))]))
    }

    fn start_restore(&mut self, job: &Job, main: u16, version: Value) -> Result<(), String> {
        self.send_plist(
            main,
            d(vec![
                ("Request", st("StartRestore")),
                ("Label", st("test")),
                (
                    "RestoreOptions",
                    Value::Dictionary(restore_options(job, &self.bad)),
                ),
                ("RestoreProtocolVersion", version),
            ]),
            false,
        )?;
        loop {
            let m = self.recv_plist(main)?;
            let ty = m
                .get("MsgType")
                .and_then(Value::as_string)
                .unwrap_or("")
                .to_string();
            match ty.as_str() {
                "DataRequestMsg" | "AsyncDataRequestMsg" => {
                    let dt = m["DataType"].as_string().unwrap().to_string();
                    let args = m
                        .get("Arguments")
                        .and_then(Value::as_dictionary)
                        .cloned()
                        .unwrap_or_default();
                    let port = m
                        .get("DataPort")
                        .and_then(Value::as_unsigned_integer)
                        .map(|p| p as u16);
                    if let Err(e) = self.data_request(job, main, &dt, &args, port) {
                        let _ = self.close(main);
                        return Err(e);
                    }
                }
                "StatusMsg" => {
                    let status = m["Status"].as_unsigned_integer().unwrap();
                    if status == 0 {
                        if !self.bad.no_final_ack {
                            self.send_plist(
                                main,
                                d(vec![("MsgType", st("ReceivedFinalStatusMsg"))]),
                                false,
                            )?;
                        }
                        // Let the device read it before the test looks at the outcome.
                        for _ in 0..50 {
                            self.pump()?;
                        }
                        return Ok(());
                    }
                    let log = m.get("Log").and_then(Value::as_string).unwrap_or("");
                    return Err(format!("restore failed with status {status}: {log}"));
                }
                "RestoreAttestation" => self.send_plist(
                    main,
                    d(vec![("RestoreShouldAttest", Value::Boolean(false))]),
                    false,
                )?,
                _ => self.log.push(format!("{ty}: {m:?}")),
            }
        }
    }

    fn data_request(
        &mut self,
        job: &Job,
        main: u16,
        dt: &str,
        args: &Dictionary,
        port: Option<u16>,
    ) -> Result<(), String> {
        let bad = self.bad.clone();
        let arg = |k: &str| {
            args.get(k)
                .and_then(Value::as_string)
                .unwrap_or("")
                .to_string()
        };
        let reply = match dt {
            "SystemImageData" | "RecoveryOSASRImage" => {
                let c = self.connect(port.unwrap_or(12345))?;
                let r = self.asr(job, c);
                let _ = self.close(c);
                return r;
            }
            "BootabilityBundle" => {
                let c = self.connect(port.ok_or("BootabilityBundle without DataPort")?)?;
                let mut s = cpio_entry("Bootability.trustcache", &[0xAB; 3000]);
                s.extend(cpio_entry("usr/standalone/bootability.plist", b"<plist/>"));
                if !bad.cpio_no_trailer {
                    s.extend(cpio_entry("TRAILER!!!", b""));
                }
                self.write(c, &s)?;
                return self.close(c);
            }
            "BuildIdentityDict" => {
                let recovery = args.get("IsRecoveryOS").and_then(Value::as_boolean) == Some(true);
                let variant = if bad.wrong_variant {
                    "Customer Research Install"
                } else if recovery {
                    "macOS Customer"
                } else if job.behavior == "Erase" {
                    "Customer Erase Install (IPSW)"
                } else {
                    "Customer Upgrade Install (IPSW)"
                };
                d(vec![
                    (
                        "BuildIdentityDict",
                        Value::Dictionary(d(vec![
                            ("Info", Value::Dictionary(d(vec![("Variant", st(variant))]))),
                            (
                                "Manifest",
                                Value::Dictionary(d(vec![(
                                    "OS",
                                    Value::Dictionary(Dictionary::new()),
                                )])),
                            ),
                        ])),
                    ),
                    ("Variant", {
                        let v = arg("Variant");
                        st(if v.is_empty() { "Erase" } else { &v })
                    }),
                ])
            }
            "RecoveryOSRootTicketData" | "RootTicket" => {
                d(vec![("RootTicketData", Value::Data(ticket(job, &bad)))])
            }
            "RecoveryOSLocalPolicy" => {
                let cc = if bad.lpol_wrong_fourcc {
                    *b"krnl"
                } else {
                    *b"lpol"
                };
                let im4p = build_im4p(FourCc(cc), "lpol", &[1; 22]);
                d(vec![(
                    "Ap,LocalPolicy",
                    Value::Data(stitch(&im4p, &ticket(job, &bad), None)),
                )])
            }
            "PersonalizedBootObjectV3" | "SourceBootObjectV4" => {
                let name = arg("ImageName");
                let data = match name.as_str() {
                    "__GlobalManifest__" => ticket(job, &bad),
                    "__RestoreVersion__" | "__SystemVersion__" => {
                        let mut b = Vec::new();
                        plist::to_writer_xml(
                            &mut b,
                            &Value::Dictionary(d(vec![("ProductBuildVersion", st("25C56"))])),
                        )
                        .unwrap();
                        b
                    }
                    _ => {
                        let im4p = build_im4p(FourCc(*b"rkrn"), "kernel", &vec![7u8; 20_000]);
                        stitch(&im4p, &ticket(job, &bad), None)
                    }
                };
                let c = match port {
                    Some(p) => self.connect(p)?,
                    None => main,
                };
                let step = if bad.big_file_chunk { 9000 } else { 8192 };
                for chunk in data.chunks(step) {
                    self.send_plist(c, d(vec![("FileData", Value::Data(chunk.to_vec()))]), false)?;
                }
                self.send_plist(c, d(vec![("FileDataDone", Value::Boolean(true))]), false)?;
                return Ok(());
            }
            "ReceiptManifest" => d(vec![(
                "ReceiptManifest",
                Value::Dictionary(d(vec![("OS", Value::Dictionary(Dictionary::new()))])),
            )]),
            "FirmwareUpdaterPreflight" => Dictionary::new(),
            "FirmwareUpdaterData" => d(vec![(
                "FirmwareResponseData",
                Value::Dictionary(d(vec![("ticket", Value::Data(vec![1, 2, 3]))])),
            )]),
            "HostSystemTime" => d(vec![("SetHostTimeOnDevice", Value::Real(1.8e9))]),
            "URLAsset" => {
                let r = d(vec![
                    ("ResponseBody", Value::Data(b"ok".to_vec())),
                    ("ResponseBodyDone", Value::Boolean(true)),
                    ("ResponseHeaders", Value::Dictionary(Dictionary::new())),
                    ("ResponseStatus", Value::Integer(200.into())),
                ]);
                let c = match port {
                    Some(p) => self.connect(p)?,
                    None => main,
                };
                return self.send_plist(c, r, !bad.urlasset_xml);
            }
            other => {
                return Err(format!(
                    "the Mac asked for DataType {other}, which this host does not support"
                ))
            }
        };
        let c = match port {
            Some(p) => self.connect(p)?,
            None => main,
        };
        self.send_plist(c, reply, false)
    }

    fn asr_plist(&mut self, c: u16) -> Result<Dictionary, String> {
        let raw = self.read_until(c, b"</plist>")?;
        plist::from_bytes::<Value>(&raw)
            .map_err(|e| e.to_string())?
            .into_dictionary()
            .ok_or_else(|| "ASR plist not a dict".into())
    }

    fn asr(&mut self, job: &Job, c: u16) -> Result<(), String> {
        let bad = self.bad.clone();
        let init = self.asr_plist(c)?;
        assert_eq!(init["Command"].as_string(), Some("Initiate"));
        let checksum = init.get("Checksum Chunks").and_then(Value::as_boolean) == Some(true);
        let mut info = d(vec![
            ("FEC Slice Stride", Value::Integer(40.into())),
            ("Packet Payload Size", Value::Integer(1450.into())),
            ("Packets Per FEC", Value::Integer(25.into())),
            (
                "Payload",
                Value::Dictionary(d(vec![
                    ("Port", Value::Integer(1.into())),
                    (
                        "Size",
                        Value::Integer((job.image_size + u64::from(bad.asr_wrong_size)).into()),
                    ),
                ])),
            ),
            ("Stream ID", Value::Integer(1.into())),
            ("Version", Value::Integer(1.into())),
        ]);
        if checksum {
            info.insert("Checksum Chunk Size".into(), Value::Integer(131072.into()));
        }
        let send_info = |h: &mut Host, info: &Dictionary| -> Result<(), String> {
            let mut b = Vec::new();
            plist::to_writer_xml(&mut b, &Value::Dictionary(info.clone())).unwrap();
            b.push(b'\n');
            h.write(c, &b)
        };
        send_info(self, &info)?;
        loop {
            let cmd = self.asr_plist(c)?;
            match cmd["Command"].as_string().unwrap_or("") {
                "OOBData" => {
                    let off = cmd["OOB Offset"].as_unsigned_integer().unwrap();
                    let len = cmd["OOB Length"].as_unsigned_integer().unwrap() as usize;
                    let mut b = vec![0; len];
                    fill_image(job.image_seed, off, &mut b);
                    if bad.asr_bad_oob {
                        b[0] ^= 1;
                    }
                    self.write(c, &b)?;
                }
                "Initiate" => send_info(self, &info)?,
                "Payload" => break,
                other => return Err(format!("ASR command {other}")),
            }
        }
        let mut off = 0u64;
        let mut chunk = vec![0u8; 131072];
        while off < job.image_size {
            let n = (job.image_size - off).min(131072) as usize;
            fill_image(job.image_seed, off, &mut chunk[..n]);
            let sum: [u8; 20] = Sha1::digest(&chunk[..n]).into();
            if let Some(at) = bad.asr_corrupt_byte {
                if (off..off + n as u64).contains(&at) {
                    chunk[(at - off) as usize] ^= 0xFF;
                }
            }
            self.write(c, &chunk[..n])?;
            if checksum {
                let mut s = sum;
                if bad.asr_bad_chunk_sha && off > 0 {
                    s[0] ^= 1;
                }
                self.write(c, &s)?;
            }
            off += n as u64;
        }
        Ok(())
    }
}
