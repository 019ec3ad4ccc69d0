//! The tokio usbmux edge over a fake `UsbTransport` that runs a tiny device-side mux written
//! here from protocol.md §6 (its own byte handling): descriptor walk and claim, the v2
//! handshake, one echo connection carrying a few hundred KiB, a refused port, ZLP rules, and
//! the device vanishing.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use restore_agent::usb::descriptor::{
    AltSetting, ConfigDescriptor, DeviceDescriptor, EndpointDescriptor, Interface,
};
use restore_agent::usb::{ControlSetup, DeviceInfo, TransportError, UsbLocation, UsbTransport};
use restore_agent::usbmux::edge::{find_interface, EdgeConfig, MuxHandle, MuxInterface};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ECHO_PORT: u16 = 7777;
const ASR_PORT: u16 = 12345;
const IMAGE_LEN: u64 = 4 * 1024 * 1024 + 4321;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

fn ep(address: u8, max: u16) -> EndpointDescriptor {
    EndpointDescriptor {
        address,
        attributes: 2,
        max_packet_size: max,
        interval: 0,
        tail: vec![],
        extra: vec![],
    }
}

fn iface(number: u8, class: (u8, u8, u8), endpoints: Vec<EndpointDescriptor>) -> Interface {
    Interface {
        number,
        alt_settings: vec![AltSetting {
            alternate_setting: 0,
            class: class.0,
            subclass: class.1,
            protocol: class.2,
            interface_index: 0,
            tail: vec![],
            extra: vec![],
            endpoints,
        }],
    }
}

fn config(value: u8, index: u8, interfaces: Vec<Interface>) -> ConfigDescriptor {
    ConfigDescriptor {
        configuration_value: value,
        configuration_index: index,
        attributes: 0x80,
        max_power: 250,
        tail: vec![],
        extra: vec![],
        interfaces,
    }
}

/// Config 1: a plain usbmux interface. Config 2 (the highest, walked first): a decoy with the
/// right class but three endpoints, a vendor interface of another class, and the real one.
fn configs() -> Vec<ConfigDescriptor> {
    vec![
        config(
            1,
            0,
            vec![iface(
                0,
                (0xFF, 0xFE, 0x02),
                vec![ep(0x81, 512), ep(0x02, 512)],
            )],
        ),
        config(
            2,
            1,
            vec![
                iface(
                    0,
                    (0xFF, 0xFE, 0x02),
                    vec![ep(0x81, 512), ep(0x02, 512), ep(0x83, 512)],
                ),
                iface(1, (0xFF, 0x2A, 0xFF), vec![ep(0x84, 512), ep(0x05, 512)]),
                iface(2, (0xFF, 0xFE, 0x02), vec![ep(0x06, 512), ep(0x87, 512)]),
            ],
        ),
    ]
}

#[test]
fn interface_selection_walks_configurations_from_the_highest() {
    assert_eq!(
        find_interface(&configs()),
        Some(MuxInterface {
            configuration: 2,
            interface: 2,
            ep_in: 0x87,
            ep_out: 0x06,
            out_max_packet_size: 512
        })
    );
    // Without config 2 the first one is used.
    assert_eq!(
        find_interface(&configs()[..1]).map(|i| (i.configuration, i.interface)),
        Some((1, 0))
    );
    // Interrupt endpoints do not count.
    let mut c = configs();
    c.truncate(1);
    c[0].interfaces[0].alt_settings[0].endpoints[0].attributes = 3;
    assert_eq!(find_interface(&c), None);
}

#[derive(Default)]
struct Dev {
    to_host: VecDeque<Vec<u8>>,
    v2: bool,
    host_tx: u16,
    zlp_owed: bool,
    zlps: usize,
    violations: Vec<String>,
    /// (host port) → (device seq, expected host seq)
    conns: Vec<(u16, u32, u32)>,
    echoed: usize,
    configured: Option<u8>,
    claimed: Option<u8>,
    vendor_requests: Vec<ControlSetup>,
    gone: bool,
    my_tx: u16,
    asr: Option<AsrSink>,
}

/// The device half of an ASR session, verifying every byte it receives.
#[derive(Default)]
struct AsrSink {
    host_port: u16,
    buf: Vec<u8>,
    phase: u8,
    verified: u64,
    done: bool,
}

fn gen_byte(offset: u64) -> u8 {
    let x = offset.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 29) as u8 ^ (offset >> 17) as u8
}

struct Gen;

impl restore_agent::ipsw::RandomAccess for Gen {
    fn len(&self) -> u64 {
        IMAGE_LEN
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = gen_byte(offset + i as u64);
        }
        Ok(())
    }
}

fn asr_cmd(body: &str) -> Vec<u8> {
    format!("<?xml version=\"1.0\"?>\n<plist version=\"1.0\"><dict>{body}</dict></plist>\n")
        .into_bytes()
}

impl AsrSink {
    /// Consumes host bytes; returns a command to send, if any.
    fn feed(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        use sha1::{Digest, Sha1};
        self.buf.extend_from_slice(data);
        match self.phase {
            0 => {
                let end = self.buf.windows(9).position(|w| w == b"</plist>\n")? + 9;
                let text = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                assert!(
                    text.contains(&format!("<integer>{IMAGE_LEN}</integer>")),
                    "{text}"
                );
                self.buf.drain(..end);
                self.phase = 1;
                Some(asr_cmd("<key>Command</key><string>OOBData</string><key>OOB Offset</key><integer>10</integer><key>OOB Length</key><integer>100</integer>"))
            }
            1 if self.buf.len() >= 100 => {
                assert!(self.buf[..100]
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == gen_byte(10 + i as u64)));
                self.buf.drain(..100);
                self.phase = 2;
                Some(asr_cmd("<key>Command</key><string>Payload</string>"))
            }
            2 => {
                loop {
                    let n = (IMAGE_LEN - self.verified).min(131_072) as usize;
                    if n == 0 || self.buf.len() < n + 20 {
                        break;
                    }
                    let chunk = &self.buf[..n];
                    assert_eq!(&self.buf[n..n + 20], Sha1::digest(chunk).as_slice());
                    assert!(chunk
                        .iter()
                        .enumerate()
                        .all(|(i, b)| *b == gen_byte(self.verified + i as u64)));
                    self.verified += n as u64;
                    self.buf.drain(..n + 20);
                }
                self.done = self.verified == IMAGE_LEN;
                None
            }
            _ => None,
        }
    }
}

impl Dev {
    fn packet(&mut self, protocol: u32, body: &[u8], v2: bool) {
        let hl = if v2 { 16 } else { 8 };
        let mut p = Vec::new();
        p.extend_from_slice(&protocol.to_be_bytes());
        p.extend_from_slice(&((hl + body.len()) as u32).to_be_bytes());
        if v2 {
            p.extend_from_slice(&0xFEED_FACEu32.to_be_bytes());
            p.extend_from_slice(&self.my_tx.to_be_bytes());
            p.extend_from_slice(&0u16.to_be_bytes());
            self.my_tx = self.my_tx.wrapping_add(1);
        }
        p.extend_from_slice(body);
        for c in p.chunks(16384) {
            self.to_host.push_back(c.to_vec());
        }
    }

    fn tcp(&mut self, dport_host: u16, sport_dev: u16, seq: u32, ack: u32, flags: u8, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&sport_dev.to_be_bytes());
        b.extend_from_slice(&dport_host.to_be_bytes());
        b.extend_from_slice(&seq.to_be_bytes());
        b.extend_from_slice(&ack.to_be_bytes());
        b.push(0x50);
        b.push(flags);
        b.extend_from_slice(&512u16.to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(data);
        self.packet(6, &b, true);
    }

    fn on_out(&mut self, t: &[u8]) {
        if self.zlp_owed {
            if !t.is_empty() {
                self.violations.push("missing ZLP".into());
            } else {
                self.zlps += 1;
            }
            self.zlp_owed = false;
            return;
        }
        if t.is_empty() {
            self.violations.push("ZLP not owed".into());
            return;
        }
        if t.len() > 49152 {
            self.violations.push(format!("transfer of {}", t.len()));
        }
        self.zlp_owed = t.len() % 512 == 0;
        let be32 = |a: usize| u32::from_be_bytes(t[a..a + 4].try_into().unwrap());
        let be16 = |a: usize| u16::from_be_bytes(t[a..a + 2].try_into().unwrap());
        let protocol = be32(0);
        if be32(4) as usize != t.len() {
            self.violations.push("length field".into());
        }
        if protocol == 0 {
            self.packet(0, &[0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0], false);
            return;
        }
        if be32(8) != 0xFEED_FACE {
            self.violations.push("v2 magic".into());
        }
        let tx = be16(12);
        if protocol == 2 {
            self.v2 = true;
            self.host_tx = 1;
            if tx != 0 {
                self.violations.push("SETUP tx_seq".into());
            }
            return;
        }
        if tx != self.host_tx {
            self.violations
                .push(format!("host tx_seq {tx} != {}", self.host_tx));
        }
        self.host_tx = tx.wrapping_add(1);
        let b = &t[16..];
        let sport = be16(16);
        let dport = be16(18);
        let seq = u32::from_be_bytes(b[4..8].try_into().unwrap());
        let flags = b[13];
        let payload = b[20..].to_vec();
        if flags == SYN {
            if dport == ASR_PORT {
                self.conns.push((sport, 1, 1));
                self.tcp(sport, dport, 0, 1, SYN | ACK, &[]);
                let initiate = asr_cmd(
                    "<key>Command</key><string>Initiate</string><key>Checksum Chunks</key><true/>",
                );
                self.conns.last_mut().unwrap().1 += initiate.len() as u32;
                self.tcp(sport, dport, 1, 1, ACK, &initiate);
                self.asr = Some(AsrSink {
                    host_port: sport,
                    ..AsrSink::default()
                });
                return;
            }
            if dport == ECHO_PORT {
                self.conns.push((sport, 1, 1));
                self.tcp(sport, dport, 0, 1, SYN | ACK, &[]);
            } else {
                self.tcp(sport, dport, 0, 0, RST, b"nothing listens\n");
            }
            return;
        }
        if flags & RST != 0 {
            self.conns.retain(|c| c.0 != sport);
            return;
        }
        let Some(i) = self.conns.iter().position(|c| c.0 == sport) else {
            return;
        };
        if seq != self.conns[i].2 {
            self.violations.push("host seq".into());
        }
        if dport == ASR_PORT && !payload.is_empty() {
            self.conns[i].2 = self.conns[i].2.wrapping_add(payload.len() as u32);
            let (dseq, hseq) = (self.conns[i].1, self.conns[i].2);
            let sink = self.asr.as_mut().expect("ASR session");
            assert_eq!(sink.host_port, sport);
            match sink.feed(&payload) {
                Some(cmd) => {
                    self.conns[i].1 = dseq.wrapping_add(cmd.len() as u32);
                    self.tcp(sport, dport, dseq, hseq, ACK, &cmd);
                }
                // A prompt pure ACK opens the window again.
                None => self.tcp(sport, dport, dseq, hseq, ACK, &[]),
            }
            return;
        }
        if !payload.is_empty() {
            self.conns[i].2 = self.conns[i].2.wrapping_add(payload.len() as u32);
            let (dseq, hseq) = (self.conns[i].1, self.conns[i].2);
            self.conns[i].1 = dseq.wrapping_add(payload.len() as u32);
            self.echoed += payload.len();
            // Echo (the host window is 128 KiB and the test writes in small steps).
            self.tcp(sport, dport, dseq, hseq, ACK, &payload);
        }
    }
}

#[derive(Clone)]
struct Fake {
    info: DeviceInfo,
    dev: Arc<(Mutex<Dev>, Condvar)>,
    /// Offer a second handle (reads and writes overlap), like libusb can.
    second_handle: bool,
}

impl Fake {
    fn new() -> Self {
        Self {
            info: DeviceInfo {
                location: UsbLocation {
                    bus: 1,
                    ports: vec![1],
                },
                address: 5,
                vendor_id: 0x05AC,
                product_id: 0x1901,
            },
            dev: Arc::new((Mutex::new(Dev::default()), Condvar::new())),
            second_handle: false,
        }
    }
}

impl UsbTransport for Fake {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn control_in(
        &mut self,
        setup: ControlSetup,
        length: u16,
        _timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let mut d = self.dev.0.lock().unwrap();
        if setup.request_type != 0x80 || setup.request != 6 {
            d.vendor_requests.push(setup);
            return Err(TransportError::Stall);
        }
        let kind = (setup.value >> 8) as u8;
        let index = setup.value as u8;
        let bytes = match kind {
            1 => DeviceDescriptor {
                bcd_usb: 0x200,
                device_class: 0,
                device_subclass: 0,
                device_protocol: 0,
                max_packet_size0: 64,
                vendor_id: 0x05AC,
                product_id: 0x1901,
                bcd_device: 0x100,
                manufacturer_index: 1,
                product_index: 2,
                serial_number_index: 3,
                num_configurations: 2,
            }
            .emit()
            .to_vec(),
            2 => configs()[usize::from(index)].emit().unwrap(),
            _ => return Err(TransportError::Stall),
        };
        Ok(bytes[..bytes.len().min(usize::from(length))].to_vec())
    }
    fn control_out(
        &mut self,
        setup: ControlSetup,
        _data: &[u8],
        _timeout: Duration,
    ) -> Result<usize, TransportError> {
        self.dev.0.lock().unwrap().vendor_requests.push(setup);
        Err(TransportError::Stall)
    }
    fn bulk_out(
        &mut self,
        endpoint: u8,
        data: &[u8],
        _t: Duration,
    ) -> Result<usize, TransportError> {
        let (m, cv) = &*self.dev;
        let mut d = m.lock().unwrap();
        if d.gone {
            return Err(TransportError::Disconnected);
        }
        if endpoint != 0x06 {
            d.violations.push(format!("bulk OUT on {endpoint:#x}"));
        }
        d.on_out(data);
        cv.notify_all();
        Ok(data.len())
    }
    fn bulk_in(
        &mut self,
        endpoint: u8,
        max_len: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let (m, cv) = &*self.dev;
        let mut d = m.lock().unwrap();
        if endpoint != 0x87 || max_len != 16384 {
            d.violations
                .push(format!("bulk IN on {endpoint:#x} for {max_len}"));
        }
        if d.to_host.is_empty() && !d.gone {
            d = cv.wait_timeout(d, timeout).unwrap().0;
        }
        if d.gone {
            return Err(TransportError::Disconnected);
        }
        d.to_host
            .pop_front()
            .ok_or(TransportError::Timeout(timeout))
    }
    fn set_configuration(&mut self, configuration: u8) -> Result<(), TransportError> {
        self.dev.0.lock().unwrap().configured = Some(configuration);
        Ok(())
    }
    fn claim_interface(&mut self, interface: u8, alt: u8) -> Result<(), TransportError> {
        assert_eq!(alt, 0);
        self.dev.0.lock().unwrap().claimed = Some(interface);
        Ok(())
    }
    fn release_interface(&mut self, _interface: u8) -> Result<(), TransportError> {
        Ok(())
    }
    fn reset(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
    fn bulk_handle(&self) -> Option<Box<dyn UsbTransport>> {
        self.second_handle
            .then(|| Box::new(self.clone()) as Box<dyn UsbTransport>)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_connection_over_the_edge() {
    echo_connection(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_connection_with_a_second_handle() {
    echo_connection(true).await;
}

async fn echo_connection(second_handle: bool) {
    let mut fake = Fake::new();
    fake.second_handle = second_handle;
    let dev = fake.dev.clone();
    let mux = MuxHandle::open(Box::new(fake), EdgeConfig::default())
        .await
        .expect("handshake");
    assert_eq!(mux.version(), 2);
    {
        let d = dev.0.lock().unwrap();
        assert_eq!((d.configured, d.claimed), (Some(2), Some(2)));
        assert!(
            d.conns.is_empty(),
            "no connection opened before we asked (no preflight)"
        );
    }

    let err = mux.connect(62078).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(err.to_string().contains("62078"), "{err}");
    assert!(err.to_string().contains("nothing listens"), "{err}");
    assert!(
        dev.0.lock().unwrap().v2,
        "SETUP went out before the first SYN"
    );

    let mut s = mux.connect(ECHO_PORT).await.expect("echo connects");
    // 300 KiB in uneven pieces, read back as it comes; includes a 512-multiple write.
    let data: Vec<u8> = (0..300 * 1024u32)
        .map(|i| (i * 7 + i / 1000) as u8)
        .collect();
    let mut back = Vec::new();
    let mut sent = 0;
    let sizes = [1usize, 511, 4096, 49116 - 16 + 16, 512 * 40, 70000];
    let mut k = 0;
    while sent < data.len() {
        let n = sizes[k % sizes.len()].min(data.len() - sent);
        k += 1;
        s.write_all(&data[sent..sent + n]).await.unwrap();
        sent += n;
        while back.len() < sent {
            let mut buf = vec![0u8; 65536];
            let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
                .await
                .expect("echo arrives")
                .unwrap();
            assert!(r > 0);
            back.extend_from_slice(&buf[..r]);
        }
    }
    assert_eq!(back, data);
    drop(s);
    // The RST goes out asynchronously; give a loaded machine time.
    for _ in 0..500 {
        if dev.0.lock().unwrap().conns.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    {
        let d = dev.0.lock().unwrap();
        assert_eq!(d.violations, Vec::<String>::new());
        assert_eq!(d.echoed, data.len());
        assert!(d.conns.is_empty(), "drop sends RST");
        assert!(
            d.vendor_requests.is_empty(),
            "no vendor requests (no GET_MODE/SET_MODE)"
        );
    }

    // The device vanishes: an open stream and new connections fail with a clear error.
    let mut s = mux.connect(ECHO_PORT).await.unwrap();
    {
        let (m, cv) = &*dev;
        m.lock().unwrap().gone = true;
        cv.notify_all();
    }
    let mut buf = [0u8; 16];
    let e = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("no hang")
        .unwrap_err();
    assert!(e.to_string().contains("USB link is gone"), "{e}");
    let e = mux.connect(ECHO_PORT).await.unwrap_err();
    assert!(e.to_string().contains("gone"), "{e}");
    assert!(mux.failure().is_some());
}

#[tokio::test]
async fn no_usbmux_interface_is_a_named_error() {
    struct Empty(Fake);
    impl UsbTransport for Empty {
        fn info(&self) -> &DeviceInfo {
            self.0.info()
        }
        fn control_in(
            &mut self,
            s: ControlSetup,
            l: u16,
            t: Duration,
        ) -> Result<Vec<u8>, TransportError> {
            if (s.value >> 8) == 2 {
                let c = config(1, 0, vec![iface(0, (0xFE, 0x01, 0x00), vec![])]);
                let b = c.emit().unwrap();
                return Ok(b[..b.len().min(usize::from(l))].to_vec());
            }
            self.0.control_in(s, l, t)
        }
        fn control_out(
            &mut self,
            s: ControlSetup,
            d: &[u8],
            t: Duration,
        ) -> Result<usize, TransportError> {
            self.0.control_out(s, d, t)
        }
        fn bulk_out(&mut self, e: u8, d: &[u8], t: Duration) -> Result<usize, TransportError> {
            self.0.bulk_out(e, d, t)
        }
        fn bulk_in(&mut self, e: u8, m: usize, t: Duration) -> Result<Vec<u8>, TransportError> {
            self.0.bulk_in(e, m, t)
        }
        fn set_configuration(&mut self, c: u8) -> Result<(), TransportError> {
            self.0.set_configuration(c)
        }
        fn claim_interface(&mut self, i: u8, a: u8) -> Result<(), TransportError> {
            self.0.claim_interface(i, a)
        }
        fn release_interface(&mut self, i: u8) -> Result<(), TransportError> {
            self.0.release_interface(i)
        }
        fn reset(&mut self) -> Result<(), TransportError> {
            Ok(())
        }
    }
    let e = MuxHandle::open(Box::new(Empty(Fake::new())), EdgeConfig::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no usbmux interface"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asr_streams_through_the_edge_sharing_one_handle() {
    asr_through_the_edge(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asr_streams_through_the_edge_with_a_second_handle() {
    asr_through_the_edge(true).await;
}

async fn asr_through_the_edge(second_handle: bool) {
    let mut fake = Fake::new();
    fake.second_handle = second_handle;
    let dev = fake.dev.clone();
    let mux = MuxHandle::open(Box::new(fake), EdgeConfig::default())
        .await
        .unwrap();
    let mut s = mux.connect(ASR_PORT).await.unwrap();
    let started = std::time::Instant::now();
    let mut progress = |_: u64, _: u64| {};
    let stats = restore_agent::asr::stream_image(
        &mut s,
        Arc::new(Gen),
        &restore_agent::asr::AsrConfig::default(),
        &mut progress,
    )
    .await
    .expect("ASR over usbmux");
    assert_eq!(stats.payload_bytes, IMAGE_LEN);
    // The mux delivers what it accepted; wait until the device has verified everything.
    for _ in 0..500 {
        if dev.0.lock().unwrap().asr.as_ref().is_some_and(|a| a.done) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let d = dev.0.lock().unwrap();
    assert_eq!(d.violations, Vec::<String>::new());
    assert_eq!(d.asr.as_ref().unwrap().verified, IMAGE_LEN);
    eprintln!(
        "ASR through the edge (second handle: {second_handle}; debug build, byte-checking fake device): {:.1} MB/s",
        IMAGE_LEN as f64 / started.elapsed().as_secs_f64() / 1e6
    );
}
