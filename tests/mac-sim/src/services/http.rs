//! A minimal HTTP/1.1 server (optionally TLS) with full control over each response's bytes.
//!
//! Enough of HTTP for reqwest and curl: request line, headers, `Content-Length` bodies,
//! keep-alive. Handlers write their response through [`Responder`], which can also stall,
//! throttle, or drop the connection mid-body — the faults a CDN and a flaky link produce.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// Largest request head or body the simulated services accept (TSS requests are ~100 KiB).
const MAX_REQUEST: usize = 8 << 20;

/// One parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Query string without `?` (empty if none).
    pub query: String,
    /// Header names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Which TCP connection this came on (per-connection limits and faults use it).
    pub connection: u64,
    pub peer: SocketAddr,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

type Stream = Box<dyn AsyncWrite + Unpin + Send>;

/// Writes one response. Dropping it without [`Responder::finish`] closes the connection.
pub struct Responder {
    stream: Stream,
    keep_alive: bool,
    back: Option<tokio::sync::oneshot::Sender<Stream>>,
}

impl Responder {
    /// A complete response with `Content-Length`.
    pub async fn send(
        mut self,
        status: u16,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> io::Result<()> {
        self.head(status, headers, Some(body.len() as u64)).await?;
        self.stream.write_all(body).await?;
        self.finish().await
    }

    /// Status line and headers; `content_length` None means the body ends when the
    /// connection closes.
    pub async fn head(
        &mut self,
        status: u16,
        headers: &[(&str, String)],
        content_length: Option<u64>,
    ) -> io::Result<()> {
        let mut h = format!("HTTP/1.1 {status} {}\r\n", reason(status));
        for (k, v) in headers {
            h.push_str(&format!("{k}: {v}\r\n"));
        }
        match content_length {
            Some(n) => h.push_str(&format!("Content-Length: {n}\r\n")),
            None => self.keep_alive = false,
        }
        if !self.keep_alive {
            h.push_str("Connection: close\r\n");
        }
        h.push_str("\r\n");
        self.stream.write_all(h.as_bytes()).await
    }

    /// Raw body bytes (after [`Responder::head`]).
    pub async fn body(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data).await
    }

    /// The response is complete; on keep-alive the connection carries the next request.
    pub async fn finish(mut self) -> io::Result<()> {
        self.stream.flush().await?;
        if self.keep_alive {
            if let Some(tx) = self.back.take() {
                let _ = tx.send(self.stream);
                return Ok(());
            }
        }
        self.stream.shutdown().await
    }

    /// Cut the connection now (a dropped link).
    pub fn abort(self) {}
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// What a service does with a request.
pub type Handler = Arc<
    dyn Fn(Request, Responder) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send>>
        + Send
        + Sync,
>;

/// Wrap an async fn/closure as a [`Handler`].
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request, Responder) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<()>> + Send + 'static,
{
    Arc::new(move |req, resp| Box::pin(f(req, resp)))
}

/// A running server. Dropping the handle does not stop it; the runtime's end does.
pub struct Server {
    pub addr: SocketAddr,
    pub tls: bool,
}

impl Server {
    /// `https://127.0.0.1:PORT` or `http://…`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    /// Listen on `addr` (use port 0 for any) and serve every connection with `handler`.
    /// Must be called inside a tokio runtime.
    pub async fn start(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        handler: Handler,
    ) -> io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let is_tls = tls.is_some();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let counter = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let connection = counter.fetch_add(1, Ordering::Relaxed) + 1;
                let handler = Arc::clone(&handler);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let r = match acceptor {
                        Some(a) => match a.accept(tcp).await {
                            Ok(s) => serve(s, peer, connection, handler).await,
                            Err(e) => Err(e),
                        },
                        None => serve(tcp, peer, connection, handler).await,
                    };
                    if let Err(e) = r {
                        tracing::debug!("connection {connection} from {peer} ended: {e}");
                    }
                });
            }
        });
        Ok(Server { addr, tls: is_tls })
    }
}

async fn serve<S>(stream: S, peer: SocketAddr, connection: u64, handler: Handler) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    let mut reader = BufReader::new(r);
    let mut writer: Option<Stream> = Some(Box::new(w));
    loop {
        let Some(req) = read_request(&mut reader, peer, connection).await? else {
            return Ok(());
        };
        let keep_alive = !req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let stream = writer.take().ok_or_else(|| io::Error::other("no writer"))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let resp = Responder {
            stream,
            keep_alive,
            back: Some(tx),
        };
        if let Err(e) = handler(req, resp).await {
            tracing::debug!("handler ended connection {connection}: {e}");
            return Ok(());
        }
        // The write half comes back only from a finished keep-alive response; otherwise the
        // connection ends here, which is how a handler drops a link mid-body.
        match rx.await {
            Ok(w) => writer = Some(w),
            Err(_) => return Ok(()),
        }
    }
}

async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    peer: SocketAddr,
    connection: u64,
) -> io::Result<Option<Request>> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(_version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target.to_string(), String::new()),
    };
    let mut headers = Vec::new();
    let mut head_len = line.len();
    loop {
        let mut h = String::new();
        let n = reader.read_line(&mut h).await?;
        head_len += n;
        if n == 0 || head_len > MAX_REQUEST {
            return Err(bad("request head too long or cut off"));
        }
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse::<usize>().map_err(|_| bad("bad Content-Length")))
        .transpose()?
        .unwrap_or(0);
    if len > MAX_REQUEST {
        return Err(bad("request body too large"));
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).await?;
    Ok(Some(Request {
        method: method.to_string(),
        path,
        query,
        headers,
        body,
        connection,
        peer,
    }))
}
