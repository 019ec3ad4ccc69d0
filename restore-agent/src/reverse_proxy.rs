//! The reverse proxy the restore ramdisk uses to reach the Internet through the host
//! (protocol.md §7.10, device port 1082).
//!
//! A control channel (protocol v2 tried first, then v1) tells us the device's connection port;
//! each "new connection" command opens a connection channel there, which answers Pings and
//! relays one proxied TCP connection (`00 03 <len> <host> <port BE>`) to the Internet.
//!
//! Framing on these channels: fixed ASCII greetings, little-endian lengths and binary plists.
//! Replies (`Pong`) use the same LE-u32 + binary plist framing the device's commands use.

use std::time::Duration;

use plist::{Dictionary, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::restored::Connector;

/// Control port of the device's reverse-proxy service.
pub const CONTROL_PORT: u16 = 1082;
/// Largest plist we accept on a proxy channel.
pub const MAX_PLIST: usize = 1024 * 1024;
/// Command word on a connection channel: a plist follows.
pub const CMD_PLIST: u16 = 0xBBAA;
/// Command word on a connection channel: a proxy request follows.
pub const CMD_PROXY: u16 = 0x0105;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// How long to wait for the device's handshake answers (libimobiledevice: 20 s).
    pub handshake_timeout: Duration,
    /// How long to wait for a proxied host to accept the TCP connection.
    pub connect_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot connect to the Mac's reverse-proxy port {port}: {source}")]
    Connect { port: u16, source: std::io::Error },
    #[error("the Mac's reverse proxy sent an unexpected greeting {0:?}")]
    BadGreeting(Vec<u8>),
    #[error("the Mac's reverse proxy sent a bad plist: {0}")]
    BadPlist(String),
    #[error("the Mac's reverse proxy did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the Mac's reverse proxy sent a plist of {0} bytes, more than allowed")]
    TooLarge(usize),
    #[error("the Mac asked the proxy for an unsupported request {0:02x?}")]
    BadRequest(Vec<u8>),
    #[error("cannot reach {host}:{port} for the Mac: {source}; check this host's network uplink")]
    Upstream {
        host: String,
        port: u16,
        source: std::io::Error,
    },
    #[error("reverse proxy I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Which control protocol the device speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoVersion {
    V1,
    V2,
}

/// LE-u32 length + binary plist.
pub fn encode_plist(d: &Dictionary) -> Vec<u8> {
    let mut body = Vec::new();
    // Serializing plain values into memory cannot fail.
    Value::Dictionary(d.clone())
        .to_writer_binary(&mut body)
        .expect("binary plist into memory");
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

async fn read_plist<R: AsyncRead + Unpin>(r: &mut R) -> Result<Dictionary, ProxyError> {
    let len = r.read_u32_le().await? as usize;
    if len > MAX_PLIST {
        return Err(ProxyError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Value::from_reader(std::io::Cursor::new(body))
        .map_err(|e| ProxyError::BadPlist(e.to_string()))?
        .into_dictionary()
        .ok_or_else(|| ProxyError::BadPlist("not a dictionary".into()))
}

async fn timed<T>(
    t: Duration,
    f: impl std::future::Future<Output = Result<T, ProxyError>>,
) -> Result<T, ProxyError> {
    tokio::time::timeout(t, f)
        .await
        .map_err(|_| ProxyError::Timeout(t))?
}

async fn connect<K: Connector>(connector: &K, port: u16) -> Result<K::Stream, ProxyError> {
    connector
        .connect(port)
        .await
        .map_err(|source| ProxyError::Connect { port, source })
}

/// Opens the control channel: v2, else v1. Returns the stream, version and connection port.
pub async fn open_control<K: Connector>(
    connector: &K,
    cfg: &ProxyConfig,
) -> Result<(K::Stream, ProtoVersion, u16), ProxyError> {
    let mut s = connect(connector, CONTROL_PORT).await?;
    let v2 = timed(cfg.handshake_timeout, async {
        s.write_all(b"BeginCtrl\0").await?;
        let mut d = Dictionary::new();
        d.insert("Command".into(), Value::String("BeginCtrl".into()));
        d.insert("CtrlProtoVersion".into(), Value::Integer(2.into()));
        s.write_all(&encode_plist(&d)).await?;
        s.flush().await?;
        let answer = read_plist(&mut s).await?;
        answer
            .get("ConnPort")
            .and_then(Value::as_unsigned_integer)
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| ProxyError::BadPlist("no ConnPort".into()))
    })
    .await;
    match v2 {
        Ok(port) => return Ok((s, ProtoVersion::V2, port)),
        Err(e) => debug!("reverse proxy v2 handshake failed ({e}); trying v1"),
    }
    drop(s);
    let mut s = connect(connector, CONTROL_PORT).await?;
    let port = timed(cfg.handshake_timeout, async {
        s.write_all(b"HelloCtrl\0").await?;
        s.flush().await?;
        let mut hello = [0u8; 9];
        s.read_exact(&mut hello).await?;
        if &hello != b"HelloCtrl" {
            return Err(ProxyError::BadGreeting(hello.to_vec()));
        }
        Ok(s.read_u16_le().await?)
    })
    .await?;
    Ok((s, ProtoVersion::V1, port))
}

/// Runs the proxy until the device shuts it down or closes the control channel.
pub async fn run<K: Connector>(connector: &K, cfg: &ProxyConfig) -> Result<(), ProxyError> {
    let (mut control, version, conn_port) = open_control(connector, cfg).await?;
    info!(?version, conn_port, "reverse proxy control channel up");
    let mut channels = JoinSet::new();
    loop {
        let mut cmd = [0u8; 4];
        tokio::select! {
            r = control.read_exact(&mut cmd) => {
                if let Err(e) = r {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        info!("reverse proxy control channel closed by the Mac");
                        return Ok(());
                    }
                    return Err(e.into());
                }
            }
            Some(done) = channels.join_next(), if !channels.is_empty() => {
                if let Ok(Err(e)) = done {
                    warn!("reverse proxy connection ended: {e}");
                }
                continue;
            }
        }
        // pymobiledevice3 reads a u16 command and 2 spare bytes: the same as a LE u32 below
        // 0x10000.
        match u32::from_le_bytes(cmd) & 0xFFFF {
            1 => {
                let stream = connect(connector, conn_port).await?;
                let cfg = cfg.clone();
                channels.spawn(async move { connection_channel(stream, version, &cfg).await });
            }
            2 => {
                info!("reverse proxy shut down by the Mac");
                return Ok(());
            }
            other => warn!(
                command = other,
                "unknown reverse proxy control command ignored"
            ),
        }
    }
}

/// Serves one connection channel (greeting, Pings, one proxied connection).
pub async fn connection_channel<S>(
    mut s: S,
    version: ProtoVersion,
    cfg: &ProxyConfig,
) -> Result<(), ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    s.write_all(b"HelloConn\0").await?;
    s.flush().await?;
    timed(cfg.handshake_timeout, async {
        match version {
            ProtoVersion::V2 => {
                let d = read_plist(&mut s).await?;
                if d.get("Command").and_then(Value::as_string) != Some("HelloConn") {
                    return Err(ProxyError::BadPlist("expected HelloConn".into()));
                }
                debug!(identifier = ?d.get("Identifier"), "reverse proxy connection channel");
            }
            ProtoVersion::V1 => {
                let mut hello = [0u8; 10];
                s.read_exact(&mut hello).await?;
                if &hello != b"HelloConn\0" {
                    return Err(ProxyError::BadGreeting(hello.to_vec()));
                }
            }
        }
        Ok(())
    })
    .await?;
    loop {
        let cmd = match s.read_u16_le().await {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match cmd {
            CMD_PLIST => {
                let d = read_plist(&mut s).await?;
                if d.get("Command").and_then(Value::as_string) == Some("Ping") {
                    let mut pong = Dictionary::new();
                    pong.insert("Pong".into(), Value::Boolean(true));
                    s.write_all(&encode_plist(&pong)).await?;
                    s.flush().await?;
                } else {
                    debug!(keys = ?d.keys().collect::<Vec<_>>(), "reverse proxy plist ignored");
                }
            }
            CMD_PROXY => return proxy(s, cfg).await,
            other => {
                return Err(ProxyError::BadRequest(other.to_le_bytes().to_vec()));
            }
        }
    }
}

async fn proxy<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    cfg: &ProxyConfig,
) -> Result<(), ProxyError> {
    let mut head = [0u8; 3];
    s.read_exact(&mut head).await?;
    if head[..2] != [0x00, 0x03] {
        return Err(ProxyError::BadRequest(head.to_vec()));
    }
    let mut rest = vec![0u8; usize::from(head[2]) + 2];
    s.read_exact(&mut rest).await?;
    let (host, port) = rest.split_at(usize::from(head[2]));
    let host = String::from_utf8_lossy(host).into_owned();
    let port = u16::from_be_bytes([port[0], port[1]]);
    s.write_all(&5u16.to_le_bytes()).await?;
    s.write_all(&head).await?;
    s.write_all(&rest).await?;
    s.flush().await?;
    info!(%host, port, "reverse proxy: the Mac opens a connection");
    let upstream = tokio::time::timeout(
        cfg.connect_timeout,
        TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| ProxyError::Upstream {
        host: host.clone(),
        port,
        source: std::io::ErrorKind::TimedOut.into(),
    })?
    .map_err(|source| ProxyError::Upstream {
        host: host.clone(),
        port,
        source,
    })?;
    let mut upstream = upstream;
    match tokio::io::copy_bidirectional(&mut s, &mut upstream).await {
        Ok((to_net, to_mac)) => debug!(%host, port, to_net, to_mac, "proxied connection finished"),
        Err(e) => debug!(%host, port, "proxied connection ended: {e}"),
    }
    Ok(())
}
