//! The USB/IP server against a small independent client over 127.0.0.1, with test devices of
//! our own (the real device model is exercised elsewhere), plus a cross-check with Debian's
//! `usbip` tool when it is installed.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mac_sim::usbip::{ExportOptions, Server};
use mac_sim::wire::{Enumeration, LinkChange, Reply, Setup, SimDevice, Speed};

/// Knobs the test turns while the server runs the device.
#[derive(Default)]
struct Knobs {
    bulk_in: VecDeque<Vec<u8>>,
    bulk_out_seen: Vec<Vec<u8>>,
    control_out_seen: Vec<Vec<u8>>,
    schedule: VecDeque<(Instant, LinkChange)>,
}

struct TestDevice {
    pid: u16,
    next_pid: u16,
    attached: bool,
    knobs: Arc<Mutex<Knobs>>,
}

impl TestDevice {
    fn new(pid: u16, next_pid: u16) -> (Self, Arc<Mutex<Knobs>>) {
        let knobs = Arc::new(Mutex::new(Knobs::default()));
        let dev = TestDevice {
            pid,
            next_pid,
            attached: true,
            knobs: knobs.clone(),
        };
        (dev, knobs)
    }

    fn device_descriptor(&self) -> Vec<u8> {
        let p = self.pid.to_le_bytes();
        vec![
            18, 1, 0x00, 0x02, 0, 0, 0, 64, 0xac, 0x05, p[0], p[1], 0x01, 0x00, 1, 2, 3, 1,
        ]
    }

    fn configuration(&self) -> Vec<u8> {
        vec![
            9, 2, 32, 0, 1, 1, 0, 0x80, 250, // configuration 1
            9, 4, 0, 0, 2, 0xff, 0xfe, 0x01, 0, // vendor interface, two endpoints
            7, 5, 0x81, 2, 0, 2, 0, // bulk IN 1
            7, 5, 0x02, 2, 0, 2, 0, // bulk OUT 2
        ]
    }
}

impl SimDevice for TestDevice {
    fn enumeration(&self) -> Enumeration {
        Enumeration {
            vendor_id: 0x05ac,
            product_id: self.pid,
            speed: Speed::High,
            device_descriptor: self.device_descriptor(),
            configurations: vec![self.configuration()],
        }
    }

    fn control(&mut self, setup: &Setup, data_out: &[u8]) -> Reply {
        match (setup.request_type, setup.request, setup.value) {
            (0x80, 6, 0x0100) => Reply::Ack(self.device_descriptor()),
            (0x80, 6, 0x0200) => Reply::Ack(self.configuration()),
            (0xc0, 0x01, _) => Reply::Ack(b"hello from the sim".to_vec()),
            (0x40, 0x02, _) => {
                self.knobs
                    .lock()
                    .unwrap()
                    .control_out_seen
                    .push(data_out.to_vec());
                Reply::Ack(Vec::new())
            }
            // "Reboot": leave the bus now, come back 30 ms later as another product.
            (0x40, 0x03, _) => {
                let now = Instant::now();
                let mut k = self.knobs.lock().unwrap();
                k.schedule.push_back((now, LinkChange::Detach));
                k.schedule
                    .push_back((now + Duration::from_millis(30), LinkChange::Attach));
                Reply::Ack(Vec::new())
            }
            _ => Reply::Stall,
        }
    }

    fn bulk_out(&mut self, endpoint: u8, data: &[u8]) -> Reply {
        if endpoint != 0x02 {
            return Reply::Stall;
        }
        self.knobs.lock().unwrap().bulk_out_seen.push(data.to_vec());
        Reply::Ack(Vec::new())
    }

    fn bulk_in(&mut self, endpoint: u8, max_len: usize) -> Reply {
        if endpoint != 0x81 {
            return Reply::Stall;
        }
        match self.knobs.lock().unwrap().bulk_in.pop_front() {
            Some(mut d) => {
                d.truncate(max_len);
                Reply::Ack(d)
            }
            None => Reply::Nak,
        }
    }

    fn reset(&mut self) {}

    fn poll_link(&mut self, now: Instant) -> Option<LinkChange> {
        let mut k = self.knobs.lock().unwrap();
        match k.schedule.front() {
            Some((at, _)) if *at <= now => {
                let (_, change) = k.schedule.pop_front()?;
                match change {
                    LinkChange::Detach => self.attached = false,
                    LinkChange::Attach => {
                        self.attached = true;
                        self.pid = self.next_pid;
                    }
                }
                Some(change)
            }
            _ => None,
        }
    }

    fn attached(&self) -> bool {
        self.attached
    }
}

fn start(devices: Vec<Box<dyn SimDevice>>) -> SocketAddr {
    let opts = ExportOptions::new("127.0.0.1:0".parse().unwrap(), false);
    let server = Server::bind(devices, opts).expect("bind on loopback");
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || server.run());
    addr
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    busid: String,
    devid: u32,
    vid: u16,
    pid: u16,
    class: u8,
    config_value: u8,
    interfaces: Vec<[u8; 4]>,
}

fn parse_record(r: &[u8]) -> Listed {
    Listed {
        busid: cstr(&r[256..288]),
        devid: (be32(r, 288) << 16) | be32(r, 292),
        vid: u16::from_be_bytes([r[300], r[301]]),
        pid: u16::from_be_bytes([r[302], r[303]]),
        class: r[306],
        config_value: r[309],
        interfaces: Vec::new(),
    }
}

fn devlist(addr: SocketAddr) -> Vec<Listed> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&[0x01, 0x11, 0x80, 0x05, 0, 0, 0, 0]).unwrap();
    let mut h = [0u8; 12];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..8], &[0x01, 0x11, 0x00, 0x05, 0, 0, 0, 0]);
    let n = be32(&h, 8);
    let mut out = Vec::new();
    for _ in 0..n {
        let mut r = vec![0u8; 312];
        s.read_exact(&mut r).unwrap();
        let mut l = parse_record(&r);
        for _ in 0..r[311] {
            let mut i = [0u8; 4];
            s.read_exact(&mut i).unwrap();
            l.interfaces.push(i);
        }
        out.push(l);
    }
    // The server closes a DEVLIST connection after answering.
    assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0);
    out
}

/// OP_REQ_IMPORT; `Ok` carries the URB connection and the record.
fn import(addr: SocketAddr, busid: &str) -> Result<(TcpStream, Listed), u32> {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = vec![0x01, 0x11, 0x80, 0x03, 0, 0, 0, 0];
    let mut id = [0u8; 32];
    id[..busid.len()].copy_from_slice(busid.as_bytes());
    req.extend_from_slice(&id);
    s.write_all(&req).unwrap();
    let mut h = [0u8; 8];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..4], &[0x01, 0x11, 0x00, 0x03]);
    let status = be32(&h, 4);
    if status != 0 {
        return Err(status);
    }
    let mut r = vec![0u8; 312];
    s.read_exact(&mut r).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    Ok((s, parse_record(&r)))
}

fn submit(
    s: &mut TcpStream,
    seq: u32,
    dir_in: bool,
    ep: u32,
    len: u32,
    setup: [u8; 8],
    out: &[u8],
) {
    let mut m = Vec::new();
    for w in [1, seq, 0x0001_0002, dir_in as u32, ep, 0, len, 0, 0, 0] {
        m.extend_from_slice(&w.to_be_bytes());
    }
    m.extend_from_slice(&setup);
    m.extend_from_slice(out);
    s.write_all(&m).unwrap();
}

fn unlink(s: &mut TcpStream, seq: u32, victim: u32) {
    let mut m = Vec::new();
    for w in [2, seq, 0x0001_0002, 0, 0, victim, 0, 0, 0, 0, 0, 0] {
        m.extend_from_slice(&w.to_be_bytes());
    }
    s.write_all(&m).unwrap();
}

#[derive(Debug, PartialEq, Eq)]
struct Ret {
    command: u32,
    seq: u32,
    status: i32,
    actual: u32,
    data: Vec<u8>,
}

/// Read one RET_*; `in_seqs` says which submissions were IN (their data follows the header).
fn read_ret(s: &mut TcpStream, in_seqs: &[u32]) -> Ret {
    let mut h = [0u8; 48];
    s.read_exact(&mut h).unwrap();
    let (command, seq) = (be32(&h, 0), be32(&h, 4));
    let status = be32(&h, 20) as i32;
    let actual = be32(&h, 24);
    let mut data = Vec::new();
    if command == 3 && in_seqs.contains(&seq) {
        data = vec![0u8; actual as usize];
        s.read_exact(&mut data).unwrap();
    }
    Ret {
        command,
        seq,
        status,
        actual,
        data,
    }
}

fn setup(rt: u8, req: u8, value: u16, len: u16) -> [u8; 8] {
    let v = value.to_le_bytes();
    let l = len.to_le_bytes();
    [rt, req, v[0], v[1], 0, 0, l[0], l[1]]
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn devlist_lists_every_device_with_its_descriptors() {
    let (a, _) = TestDevice::new(0x1227, 0x1281);
    let (b, _) = TestDevice::new(0x1281, 0x1281);
    let addr = start(vec![Box::new(a), Box::new(b)]);
    let list = wait_for("two exports", || {
        let l = devlist(addr);
        (l.len() == 2).then_some(l)
    });
    assert_eq!(list[0].busid, "1-1");
    assert_eq!(list[1].busid, "2-1");
    assert_eq!((list[0].vid, list[0].pid), (0x05ac, 0x1227));
    assert_eq!((list[1].vid, list[1].pid), (0x05ac, 0x1281));
    assert_eq!(list[0].config_value, 1);
    assert_eq!(list[0].interfaces, vec![[0xff, 0xfe, 0x01, 0]]);
    assert_eq!(list[1].devid, 0x0002_0002);
}

#[test]
fn control_transfers_reach_the_device() {
    let (dev, knobs) = TestDevice::new(0x1227, 0x1281);
    let addr = start(vec![Box::new(dev)]);
    let (mut s, rec) = wait_for("export", || import(addr, "1-1").ok());
    assert_eq!(rec.pid, 0x1227);

    // GET_DESCRIPTOR(device) with wLength 8: truncated to 8 bytes.
    submit(&mut s, 1, true, 0, 8, setup(0x80, 6, 0x0100, 8), &[]);
    let r = read_ret(&mut s, &[1]);
    assert_eq!((r.command, r.seq, r.status, r.actual), (3, 1, 0, 8));
    assert_eq!(r.data, vec![18, 1, 0x00, 0x02, 0, 0, 0, 64]);

    submit(&mut s, 2, true, 0, 64, setup(0xc0, 1, 0, 64), &[]);
    assert_eq!(read_ret(&mut s, &[2]).data, b"hello from the sim".to_vec());

    submit(&mut s, 3, false, 0, 4, setup(0x40, 2, 0, 4), &[9, 8, 7, 6]);
    let r = read_ret(&mut s, &[]);
    assert_eq!((r.seq, r.status, r.actual), (3, 0, 4));
    assert_eq!(
        knobs.lock().unwrap().control_out_seen,
        vec![vec![9, 8, 7, 6]]
    );

    // Unknown request: stall = -EPIPE.
    submit(&mut s, 4, true, 0, 2, setup(0xc0, 0x77, 0, 2), &[]);
    let r = read_ret(&mut s, &[4]);
    assert_eq!((r.seq, r.status, r.actual), (4, -32, 0));

    // The device is imported: a second import is refused.
    assert_eq!(import(addr, "1-1").err(), Some(1));
    assert_eq!(import(addr, "9-9").err(), Some(1));
}

#[test]
fn bulk_in_stays_pending_until_data_and_unlink_cancels_it() {
    let (dev, knobs) = TestDevice::new(0x1281, 0x1281);
    let addr = start(vec![Box::new(dev)]);
    let (mut s, _) = wait_for("export", || import(addr, "1-1").ok());

    submit(&mut s, 10, false, 2, 3, [0; 8], b"abc");
    let r = read_ret(&mut s, &[]);
    assert_eq!((r.seq, r.status, r.actual), (10, 0, 3));
    assert_eq!(knobs.lock().unwrap().bulk_out_seen, vec![b"abc".to_vec()]);

    // Nothing to read: the IN must not complete; the next answer is the later control request.
    submit(&mut s, 11, true, 1, 512, [0; 8], &[]);
    submit(&mut s, 12, true, 0, 64, setup(0xc0, 1, 0, 64), &[]);
    let r = read_ret(&mut s, &[11, 12]);
    assert_eq!(r.seq, 12);

    knobs
        .lock()
        .unwrap()
        .bulk_in
        .push_back(b"late reply".to_vec());
    let r = read_ret(&mut s, &[11, 12]);
    assert_eq!((r.seq, r.status), (11, 0));
    assert_eq!(r.data, b"late reply".to_vec());

    // A pending IN that gets unlinked: -ECONNRESET and never a RET_SUBMIT.
    submit(&mut s, 13, true, 1, 512, [0; 8], &[]);
    unlink(&mut s, 14, 13);
    let r = read_ret(&mut s, &[13]);
    assert_eq!((r.command, r.seq, r.status), (4, 14, -104));
    // Unlinking what already completed: status 0.
    unlink(&mut s, 15, 11);
    let r = read_ret(&mut s, &[]);
    assert_eq!((r.command, r.seq, r.status), (4, 15, 0));
    knobs.lock().unwrap().bulk_in.push_back(b"for 16".to_vec());
    submit(&mut s, 16, true, 1, 512, [0; 8], &[]);
    let r = read_ret(&mut s, &[16]);
    assert_eq!((r.seq, r.data), (16, b"for 16".to_vec()));

    // Stalled endpoint: -EPIPE.
    submit(&mut s, 17, true, 3, 8, [0; 8], &[]);
    let r = read_ret(&mut s, &[17]);
    assert_eq!((r.seq, r.status), (17, -32));
}

#[test]
fn detach_closes_the_connection_and_attach_exports_the_new_identity() {
    let (dev, _) = TestDevice::new(0x1227, 0x1281);
    let addr = start(vec![Box::new(dev)]);
    let (mut s, first) = wait_for("export", || import(addr, "1-1").ok());
    assert_eq!(first.pid, 0x1227);

    submit(&mut s, 1, false, 0, 0, setup(0x40, 3, 0, 0), &[]);
    let r = read_ret(&mut s, &[]);
    assert_eq!((r.seq, r.status), (1, 0));
    // The kernel would now see an unplug: the server closed the connection.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    let again = wait_for("re-export", || {
        devlist(addr).into_iter().find(|l| l.pid == 0x1281)
    });
    // Same port (bus id), new device number: what a real usbipd shows for a re-enumeration.
    assert_eq!(again.busid, first.busid);
    assert_ne!(again.devid, first.devid);
    let (mut s, rec) = import(addr, &again.busid).unwrap();
    assert_eq!(rec.pid, 0x1281);
    submit(&mut s, 1, true, 0, 18, setup(0x80, 6, 0x0100, 18), &[]);
    let r = read_ret(&mut s, &[1]);
    assert_eq!(&r.data[10..12], &[0x81, 0x12]);
}

#[test]
fn closing_the_client_frees_the_device_for_a_new_import() {
    let (dev, _) = TestDevice::new(0x1227, 0x1227);
    let addr = start(vec![Box::new(dev)]);
    let (s, _) = wait_for("export", || import(addr, "1-1").ok());
    drop(s);
    let (mut s, _) = wait_for("release", || import(addr, "1-1").ok());
    submit(&mut s, 1, true, 0, 64, setup(0xc0, 1, 0, 64), &[]);
    assert_eq!(read_ret(&mut s, &[1]).status, 0);
}

#[test]
fn debian_usbip_tool_lists_the_device() {
    let tool = ["/usr/sbin/usbip", "/usr/bin/usbip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(tool) = tool else {
        println!("skipped: Debian's usbip tool is not installed (apt-get install -y usbip)");
        return;
    };
    let (dev, _) = TestDevice::new(0x1227, 0x1281);
    let addr = start(vec![Box::new(dev)]);
    wait_for("export", || (!devlist(addr).is_empty()).then_some(()));
    let out = std::process::Command::new(tool)
        .args([
            "--tcp-port",
            &addr.port().to_string(),
            "list",
            "-r",
            "127.0.0.1",
        ])
        .output()
        .expect("run usbip");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "usbip failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(text.contains("1-1"), "{text}");
    assert!(text.contains("05ac:1227"), "{text}");
}

/// A stand-in for `/sys/devices/platform/vhci_hcd.0`: `status` we write, `attach` we read.
struct FakeVhci(std::path::PathBuf);

impl FakeVhci {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mac-sim-vhci-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        FakeVhci(dir)
    }

    fn set_status(&self, busy: &[u32]) {
        let mut s = String::from("hub port sta spd dev      sockfd local_busid\n");
        for port in 0..8u32 {
            let sta = if busy.contains(&port) { "006" } else { "004" };
            s.push_str(&format!("hs  {port:04} {sta} 000 00000000 000000 0-0\n"));
        }
        for port in 8..16u32 {
            s.push_str(&format!("ss  {port:04} 004 000 00000000 000000 0-0\n"));
        }
        std::fs::write(self.0.join("status"), s).unwrap();
    }

    /// The fields of the last line written to `attach`: port, sockfd, devid, speed.
    fn take_attach(&self) -> Option<Vec<u32>> {
        let path = self.0.join("attach");
        let line = std::fs::read_to_string(&path).ok()?;
        std::fs::remove_file(&path).ok()?;
        Some(
            line.split_whitespace()
                .map(|f| f.parse().unwrap())
                .collect(),
        )
    }
}

impl Drop for FakeVhci {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn attach_imports_itself_and_keeps_the_vhci_port_across_reenumeration() {
    let vhci = FakeVhci::new("attach");
    vhci.set_status(&[]);
    let (dev, _) = TestDevice::new(0x1227, 0x1281);
    let mut opts = ExportOptions::new("127.0.0.1:0".parse().unwrap(), true);
    opts.vhci = vhci.0.clone();
    let server = Server::bind(vec![Box::new(dev)], opts).unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || server.run());

    // "port sockfd devid speed": first free high-speed port, busnum 1 / devnum 2, high speed.
    let first = wait_for("attach", || vhci.take_attach());
    assert_eq!(first.len(), 4);
    assert_eq!((first[0], first[2], first[3]), (0, 0x0001_0002, 3));

    // Nobody kept the attached socket here (the kernel would), so the export is free again.
    let (mut s, _) = wait_for("release", || import(addr, "1-1").ok());
    // Port 0 still looks busy while the device reboots; it must wait for it, not take port 1.
    vhci.set_status(&[0]);
    submit(&mut s, 1, false, 0, 0, setup(0x40, 3, 0, 0), &[]);
    assert_eq!(read_ret(&mut s, &[]).status, 0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vhci.take_attach(), None);
    vhci.set_status(&[]);
    let second = wait_for("re-attach", || vhci.take_attach());
    assert_eq!((second[0], second[2], second[3]), (0, 0x0001_0003, 3));
}
