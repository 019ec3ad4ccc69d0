//! Shared pieces of the restored tests: an in-memory `RestoreContext`, a `Connector` whose
//! connections are `tokio::io::duplex` pipes handed to a scripted device, and the device's own
//! framing (written here from protocol.md §6.6, not reusing the agent's codec).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plist::{Dictionary, Value};
use restore_agent::asr::ImageSource;
use restore_agent::ipsw::RandomAccess;
use restore_agent::restored::{
    Connector, ContextError, LocalPolicyArgs, RestoreContext, RestoreEvent, UrlRequest, UrlResponse,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

pub const ECID: u64 = 0x0011_2233_4455_6677;

pub fn dict(pairs: Vec<(&str, Value)>) -> Dictionary {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// A component of the test identity.
fn component(path: &str, flags: &[&str]) -> Value {
    let mut info = dict(vec![("Path", Value::String(path.into()))]);
    for f in flags {
        info.insert((*f).into(), Value::Boolean(true));
    }
    Value::Dictionary(dict(vec![
        ("Digest", Value::Data(vec![1, 2, 3])),
        ("Info", Value::Dictionary(info)),
    ]))
}

pub fn identity(variant: &str) -> Dictionary {
    let manifest = dict(vec![
        (
            "LLB",
            component(
                "Firmware/all_flash/LLB.j313.RELEASE.im4p",
                &["IsFirmwarePayload"],
            ),
        ),
        (
            "AppleLogo",
            component("Firmware/all_flash/applelogo.im4p", &["IsFirmwarePayload"]),
        ),
        (
            "iBoot",
            component(
                "Firmware/all_flash/iBoot.j313.RELEASE.im4p",
                &["IsFirmwarePayload"],
            ),
        ),
        (
            "DeviceTree",
            component(
                "Firmware/all_flash/DeviceTree.j313ap.im4p",
                &["IsSecondaryFirmwarePayload", "IsLoadedByiBoot"],
            ),
        ),
        (
            "RestoreSEP",
            component(
                "Firmware/all_flash/sep-firmware.j313.RELEASE.im4p",
                &["IsFirmwarePayload"],
            ),
        ),
        (
            "SEP",
            component("Firmware/all_flash/sep-firmware.j313.RELEASE.im4p", &[]),
        ),
        ("KernelCache", component("kernelcache.release.mac13g", &[])),
        ("OS", component("090-00000-000.dmg", &[])),
        (
            "Ap,AudioFUD",
            component(
                "Firmware/fud/audio.im4p",
                &["IsFUDFirmware", "IsEarlyAccessFirmware"],
            ),
        ),
        (
            "Ap,OtherFUD",
            component(
                "Firmware/fud/other.im4p",
                &["IsFUDFirmware", "IsCustomThing"],
            ),
        ),
    ]);
    dict(vec![
        (
            "Info",
            Value::Dictionary(dict(vec![
                ("DeviceClass", Value::String("j313ap".into())),
                ("Variant", Value::String(variant.into())),
                ("MacOSVariant", Value::String("macOS Customer".into())),
            ])),
        ),
        ("Manifest", Value::Dictionary(manifest)),
    ])
}

/// An image generated from its offset: no buffer of the whole image exists anywhere.
pub struct GenImage {
    pub len: u64,
}

pub fn gen_byte(offset: u64) -> u8 {
    let x = offset.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 29) as u8 ^ (offset >> 17) as u8
}

impl RandomAccess for GenImage {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset + buf.len() as u64 > self.len {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "past end"));
        }
        for (i, b) in buf.iter_mut().enumerate() {
            *b = gen_byte(offset + i as u64);
        }
        Ok(())
    }
}

#[derive(Default)]
pub struct MemContext {
    pub files: BTreeMap<String, Vec<u8>>,
    pub events: Mutex<Vec<RestoreEvent>>,
    pub image_len: u64,
    pub fail_personalize: Option<String>,
}

impl MemContext {
    pub fn new() -> Self {
        let mut files = BTreeMap::new();
        files.insert(
            "Firmware/Manifests/restore/macOS Customer/apticket.j313ap.im4m".into(),
            b"GLOBAL-MANIFEST".to_vec(),
        );
        files.insert(
            "RestoreVersion.plist".into(),
            b"<restore-version/>".to_vec(),
        );
        files.insert("SystemVersion.plist".into(), b"<system-version/>".to_vec());
        files.insert("kernelcache.release.mac13g".into(), vec![0x4B; 20_000]);
        files.insert(
            "BootabilityBundle/Restore/Bootability/a.txt".into(),
            b"alpha".to_vec(),
        );
        files.insert(
            "BootabilityBundle/Restore/Bootability/sub/b.bin".into(),
            vec![7; 3],
        );
        files.insert(
            "BootabilityBundle/Restore/Firmware/Bootability.dmg.trustcache".into(),
            b"TC".to_vec(),
        );
        Self {
            files,
            image_len: 3 * 131_072 + 777,
            ..Self::default()
        }
    }

    pub fn events(&self) -> Vec<RestoreEvent> {
        self.events.lock().unwrap().clone()
    }
}

/// What `personalized` returns for a component: recognisable and longer than one FileData.
pub fn img4(component: &str, is_recovery_os: bool) -> Vec<u8> {
    let mut v = format!("IMG4:{component}:{is_recovery_os}:").into_bytes();
    v.resize(v.len() + if component == "iBoot" { 9000 } else { 10 }, b'.');
    v
}

impl RestoreContext for MemContext {
    async fn root_ticket(&self) -> Result<Vec<u8>, ContextError> {
        Ok(b"APTICKET".to_vec())
    }
    async fn recovery_os_root_ticket(&self) -> Result<Vec<u8>, ContextError> {
        Ok(b"ROS-TICKET".to_vec())
    }
    async fn local_policy(&self, args: LocalPolicyArgs) -> Result<Vec<u8>, ContextError> {
        let mut v = b"LPOL".to_vec();
        v.extend(args.next_stage_im4m_hash);
        v.extend(args.recovery_os_policy_nonce_hash);
        v.extend(args.volume_uuid);
        Ok(v)
    }
    async fn build_identity(
        &self,
        is_recovery_os: bool,
        _variant: Option<String>,
    ) -> Result<Dictionary, ContextError> {
        Ok(identity(if is_recovery_os {
            "macOS Customer"
        } else {
            "Customer Erase Install (IPSW)"
        }))
    }
    async fn personalized(
        &self,
        component: String,
        is_recovery_os: bool,
    ) -> Result<Vec<u8>, ContextError> {
        if self.fail_personalize.as_deref() == Some(component.as_str()) {
            return Err(ContextError::Failed(format!("TSS refused {component}")));
        }
        Ok(img4(&component, is_recovery_os))
    }
    async fn raw_file(&self, path: String) -> Result<Vec<u8>, ContextError> {
        self.files
            .get(&path)
            .cloned()
            .ok_or(ContextError::NotFound(path))
    }
    async fn list_files(&self, prefix: String) -> Result<Vec<String>, ContextError> {
        Ok(self
            .files
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect())
    }
    async fn os_image(&self) -> Result<ImageSource, ContextError> {
        Ok(Arc::new(GenImage {
            len: self.image_len,
        }))
    }
    async fn firmware_updater(&self, arguments: Dictionary) -> Result<Value, ContextError> {
        Ok(Value::Dictionary(dict(vec![(
            "Echo",
            Value::Dictionary(arguments),
        )])))
    }
    async fn url_request(&self, request: UrlRequest) -> Result<UrlResponse, ContextError> {
        Ok(UrlResponse {
            status: 200,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: format!("{} {}", request.method, request.url).into_bytes(),
        })
    }
    fn event(&self, event: RestoreEvent) {
        self.events.lock().unwrap().push(event);
    }
}

/// Connections go to the scripted device through a channel; closed ports are refused.
pub struct PipeConnector {
    tx: mpsc::UnboundedSender<(u16, DuplexStream)>,
    pub refuse: Mutex<Vec<u16>>,
}

impl Connector for PipeConnector {
    type Stream = DuplexStream;
    async fn connect(&self, port: u16) -> io::Result<DuplexStream> {
        if self.refuse.lock().unwrap().contains(&port) {
            return Err(io::Error::new(io::ErrorKind::ConnectionRefused, "refused"));
        }
        let (host, device) = tokio::io::duplex(1 << 20);
        self.tx
            .send((port, device))
            .map_err(|_| io::Error::new(io::ErrorKind::NotConnected, "device gone"))?;
        Ok(host)
    }
}

/// The device end.
pub struct Device {
    rx: mpsc::UnboundedReceiver<(u16, DuplexStream)>,
    pub main: Option<DuplexStream>,
}

pub fn pair() -> (Arc<PipeConnector>, Device) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Arc::new(PipeConnector {
            tx,
            refuse: Mutex::new(vec![]),
        }),
        Device { rx, main: None },
    )
}

pub async fn send_on(s: &mut DuplexStream, d: &Dictionary, binary: bool) {
    let mut body = Vec::new();
    if binary {
        Value::Dictionary(d.clone())
            .to_writer_binary(&mut body)
            .unwrap();
    } else {
        Value::Dictionary(d.clone())
            .to_writer_xml(&mut body)
            .unwrap();
    }
    s.write_all(&(body.len() as u32).to_be_bytes())
        .await
        .unwrap();
    s.write_all(&body).await.unwrap();
}

/// Next framed plist; `None` at EOF.
pub async fn recv_on(s: &mut DuplexStream) -> Option<Dictionary> {
    let mut len = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut len))
        .await
        .expect("host answers in time")
        .ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    Some(
        Value::from_reader(io::Cursor::new(body))
            .unwrap()
            .into_dictionary()
            .unwrap(),
    )
}

impl Device {
    pub async fn accept(&mut self, port: u16) -> DuplexStream {
        let (p, s) = tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("host connects in time")
            .expect("connector alive");
        assert_eq!(p, port, "host connected to the wrong port");
        s
    }
    pub async fn accept_main(&mut self) {
        let s = self.accept(62078).await;
        self.main = Some(s);
    }
    pub async fn send(&mut self, d: Dictionary) {
        send_on(self.main.as_mut().unwrap(), &d, false).await
    }
    pub async fn recv(&mut self) -> Option<Dictionary> {
        recv_on(self.main.as_mut().unwrap()).await
    }
    /// QueryType, HardwareInfo, SavedDebugInfo; returns the StartRestore request.
    pub async fn handshake(&mut self, ecid: u64) -> Dictionary {
        self.accept_main().await;
        let q = self.recv().await.unwrap();
        assert_eq!(
            q.get("Request").and_then(Value::as_string),
            Some("QueryType")
        );
        self.send(dict(vec![
            ("Type", "com.apple.mobile.restored".into()),
            ("RestoreProtocolVersion", Value::Integer(15.into())),
        ]))
        .await;
        let q = self.recv().await.unwrap();
        assert_eq!(
            q.get("QueryKey").and_then(Value::as_string),
            Some("HardwareInfo")
        );
        self.send(dict(vec![(
            "HardwareInfo",
            Value::Dictionary(dict(vec![
                ("UniqueChipID", Value::Integer(ecid.into())),
                ("ChipID", Value::Integer(0x8103.into())),
            ])),
        )]))
        .await;
        let q = self.recv().await.unwrap();
        assert_eq!(
            q.get("QueryKey").and_then(Value::as_string),
            Some("SavedDebugInfo")
        );
        self.send(dict(vec![(
            "SavedDebugInfo",
            Value::Dictionary(dict(vec![("PreviousExitStatus", "none".into())])),
        )]))
        .await;
        let start = self.recv().await.unwrap();
        assert_eq!(
            start.get("Request").and_then(Value::as_string),
            Some("StartRestore")
        );
        start
    }
    pub async fn request(
        &mut self,
        data_type: &str,
        port: Option<u16>,
        args: Dictionary,
        is_async: bool,
    ) {
        let mut d = dict(vec![
            (
                "MsgType",
                if is_async {
                    "AsyncDataRequestMsg"
                } else {
                    "DataRequestMsg"
                }
                .into(),
            ),
            ("DataType", data_type.into()),
            ("Arguments", Value::Dictionary(args)),
        ]);
        if let Some(p) = port {
            d.insert("DataPort".into(), Value::Integer(u64::from(p).into()));
        }
        self.send(d).await;
    }
}

/// Reads a FileData stream until FileDataDone.
pub async fn read_file_data(s: &mut DuplexStream) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut frames = 0;
    loop {
        let d = recv_on(s)
            .await
            .expect("FileData stream ends with FileDataDone");
        if d.get("FileDataDone").and_then(Value::as_boolean) == Some(true) {
            return (out, frames);
        }
        let chunk = d
            .get("FileData")
            .and_then(Value::as_data)
            .expect("FileData");
        assert!(chunk.len() <= 8192, "FileData chunk of {}", chunk.len());
        out.extend_from_slice(chunk);
        frames += 1;
    }
}
