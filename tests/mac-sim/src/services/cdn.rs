//! A simulated firmware CDN: files over HTTP(S) with byte ranges, a per-connection rate limit
//! (Apple's CDN limits each flow, which is why downloaders open several), and the faults a real
//! CDN and a flaky link produce: cut connections, stalls, corrupted bytes, HTML error pages
//! served with status 200, and 503s.
//!
//! Generated files cost no disk or memory: their content is a pure function of the offset
//! ([`generated_fill`]), so a test can serve a multi-GiB "IPSW" and compute its SHA-1 itself.
//! Every body byte sent is logged per response ([`Cdn::served`]) so tests can prove a resumed
//! download fetched nothing twice.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::http::{handler, Request, Responder, Server};

/// Largest body write in one go; also the granularity of rate limiting and faults.
const CHUNK: usize = 16 * 1024;

/// Fixed `Last-Modified` of every file (tests do not care about the date, only that it is
/// stable).
const LAST_MODIFIED: &str = "Tue, 01 Jul 2025 00:00:00 GMT";

/// Where a file's bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Deterministic content of `size` bytes (see [`generated_fill`]); never stored.
    Generated { size: u64, seed: u64 },
    /// A file on disk.
    Path(PathBuf),
    /// Bytes in memory (small test files).
    Bytes(Arc<Vec<u8>>),
}

/// One file the CDN serves at `/<name>`.
#[derive(Debug, Clone)]
pub struct CdnFile {
    pub name: String,
    pub source: Source,
}

impl CdnFile {
    pub fn generated(name: &str, size: u64, seed: u64) -> CdnFile {
        CdnFile {
            name: name.to_string(),
            source: Source::Generated { size, seed },
        }
    }

    fn size(&self) -> io::Result<u64> {
        Ok(match &self.source {
            Source::Generated { size, .. } => *size,
            Source::Path(p) => std::fs::metadata(p)?.len(),
            Source::Bytes(b) => b.len() as u64,
        })
    }

    fn etag(&self, size: u64) -> String {
        match &self.source {
            Source::Generated { seed, .. } => format!("\"gen-{seed:x}-{size:x}\""),
            Source::Path(p) => {
                let mtime = std::fs::metadata(p)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                format!("\"file-{mtime:x}-{size:x}\"")
            }
            Source::Bytes(b) => {
                let d = <sha1::Sha1 as sha1::Digest>::digest(b.as_slice());
                format!("\"mem-{}\"", hex::encode(&d[..8]))
            }
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match &self.source {
            Source::Generated { seed, .. } => {
                generated_fill(*seed, offset, buf);
                Ok(())
            }
            Source::Path(p) => {
                use std::os::unix::fs::FileExt;
                std::fs::File::open(p)?.read_exact_at(buf, offset)
            }
            Source::Bytes(b) => {
                let start = offset as usize;
                buf.copy_from_slice(&b[start..start + buf.len()]);
                Ok(())
            }
        }
    }
}

/// The content of a generated file: byte `i` depends only on `seed` and `i`, so any range can
/// be produced (and checked) without the rest of the file.
pub fn generated_fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let word = splitmix64(seed ^ (pos / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let bytes = word.to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&bytes[start..start + n]);
        i += n;
        pos += n as u64;
    }
}

/// SHA-1 of a whole generated file (what a catalog would list for it).
pub fn generated_sha1(seed: u64, size: u64) -> [u8; 20] {
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        generated_fill(seed, off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.finalize().into()
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A misbehaviour of the CDN or the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Cut the connection just before sending file byte `offset`, the first `times` times a
    /// response reaches it.
    DropAt { offset: u64, times: u32 },
    /// Every `nth` GET (counted over the whole server) is cut after `after` body bytes.
    DropEvery { nth: u64, after: u64 },
    /// Stop sending just before file byte `offset` for `pause` (None: forever, holding the
    /// connection open), the first `times` times a response reaches it.
    StallAt {
        offset: u64,
        pause: Option<Duration>,
        times: u32,
    },
    /// Bytes `offset..offset+len` of the file are served inverted, every time.
    WrongBytes { offset: u64, len: u64 },
    /// Answer with an HTML error page and status 200: every request including HEAD
    /// (`every == 0`), or every `every`-th GET.
    Html200 { every: u64 },
    /// Answer the first `count` requests with 503.
    Status503 { count: u64 },
    /// Serve the `nth` GET at `rate` bytes/s (a slow path, for tail racing).
    Slow { nth: u64, rate: u64 },
}

#[derive(Debug, thiserror::Error)]
#[error("bad CDN fault {spec:?}: {why} (forms: drop-at=OFFSET[:TIMES], drop-every=N:AFTER, stall-at=OFFSET[:MS|forever[:TIMES]], wrong-bytes=OFFSET:LEN, html200, html200-every=N, 503=COUNT, slow=NTH:RATE)")]
pub struct FaultSpecError {
    pub spec: String,
    pub why: String,
}

impl Fault {
    /// Parse a `--fault` argument (sizes accept K/M/G binary suffixes).
    pub fn parse(spec: &str) -> Result<Fault, FaultSpecError> {
        let err = |why: &str| FaultSpecError {
            spec: spec.to_string(),
            why: why.to_string(),
        };
        let (key, value) = spec.split_once('=').unwrap_or((spec, ""));
        let args: Vec<&str> = if value.is_empty() {
            Vec::new()
        } else {
            value.split(':').collect()
        };
        let num = |i: usize| -> Result<u64, FaultSpecError> {
            let s = args.get(i).ok_or_else(|| err("missing a number"))?;
            parse_size(s).ok_or_else(|| err("not a number"))
        };
        let opt = |i: usize, default: u64| -> Result<u64, FaultSpecError> {
            if args.len() > i {
                num(i)
            } else {
                Ok(default)
            }
        };
        let times = |v: u64| u32::try_from(v).map_err(|_| err("count too large"));
        Ok(match key {
            "drop-at" => Fault::DropAt {
                offset: num(0)?,
                times: times(opt(1, 1)?)?,
            },
            "drop-every" => {
                let nth = num(0)?;
                if nth == 0 {
                    return Err(err("N must be at least 1"));
                }
                Fault::DropEvery {
                    nth,
                    after: opt(1, 0)?,
                }
            }
            "stall-at" => {
                let pause = match args.get(1) {
                    None | Some(&"forever") => None,
                    Some(_) => Some(Duration::from_millis(num(1)?)),
                };
                Fault::StallAt {
                    offset: num(0)?,
                    pause,
                    times: times(opt(2, 1)?)?,
                }
            }
            "wrong-bytes" => Fault::WrongBytes {
                offset: num(0)?,
                len: opt(1, 1)?,
            },
            "html200" => Fault::Html200 { every: 0 },
            "html200-every" => {
                let every = num(0)?;
                if every == 0 {
                    return Err(err("N must be at least 1"));
                }
                Fault::Html200 { every }
            }
            "503" => Fault::Status503 { count: opt(0, 1)? },
            "slow" => Fault::Slow {
                nth: num(0)?,
                rate: num(1)?.max(1),
            },
            _ => return Err(err("unknown fault")),
        })
    }
}

/// `123`, `64K`, `16M`, `2G` (binary multiples).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

/// How the CDN behaves.
#[derive(Debug, Clone, Default)]
pub struct CdnConfig {
    pub files: Vec<CdnFile>,
    /// Per-TCP-connection limit in bytes per second (None: as fast as possible).
    pub rate: Option<u64>,
    pub faults: Vec<Fault>,
}

impl CdnConfig {
    /// Serve every regular file in `dir` under its file name.
    pub fn add_dir(&mut self, dir: &Path) -> io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                self.files.push(CdnFile {
                    name: entry.file_name().to_string_lossy().into_owned(),
                    source: Source::Path(entry.path()),
                });
            }
        }
        Ok(())
    }
}

/// Body bytes one response actually sent: file offsets `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub start: u64,
    pub end: u64,
    pub connection: u64,
}

#[derive(Default)]
struct Counters {
    requests: u64,
    gets: u64,
    heads: u64,
    /// Per fault index: how many times it fired.
    fired: HashMap<usize, u64>,
    served: HashMap<String, Vec<Served>>,
    connections: std::collections::HashSet<u64>,
    buckets: HashMap<u64, Bucket>,
}

/// A token bucket in debt form: sending `n` bytes costs `n` tokens; a negative balance is paid
/// back by waiting.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn reserve(&mut self, rate: u64, n: usize, now: Instant) -> Duration {
        let rate = rate as f64;
        // A small burst allowance keeps the limit smooth without letting idle connections
        // bank a large credit.
        let cap = (rate / 20.0).max(CHUNK as f64);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(cap);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

struct Inner {
    config: CdnConfig,
    counters: Mutex<Counters>,
}

/// A running simulated CDN.
#[derive(Clone)]
pub struct Cdn {
    inner: Arc<Inner>,
    pub addr: SocketAddr,
    pub tls: bool,
}

/// Totals since start (or the last [`Cdn::take_served`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CdnTotals {
    pub requests: u64,
    pub gets: u64,
    pub heads: u64,
    pub body_bytes: u64,
    pub connections: u64,
}

impl Cdn {
    /// Start serving on `addr` (port 0 for any); must be called inside a tokio runtime.
    pub async fn start(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        config: CdnConfig,
    ) -> io::Result<Cdn> {
        let inner = Arc::new(Inner {
            config,
            counters: Mutex::new(Counters::default()),
        });
        let i2 = Arc::clone(&inner);
        let server = Server::start(
            addr,
            tls,
            handler(move |req, resp| {
                let inner = Arc::clone(&i2);
                async move { serve(inner, req, resp).await }
            }),
        )
        .await?;
        Ok(Cdn {
            inner,
            addr: server.addr,
            tls: server.tls,
        })
    }

    /// `http(s)://127.0.0.1:PORT/<name>`.
    pub fn url(&self, name: &str) -> String {
        format!(
            "{}://{}/{name}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    /// Every body range sent for `name` so far, in the order responses started.
    pub fn served(&self, name: &str) -> Vec<Served> {
        let c = self.lock();
        c.served.get(name).cloned().unwrap_or_default()
    }

    /// Like [`Cdn::served`], and forget them (to compare two runs).
    pub fn take_served(&self, name: &str) -> Vec<Served> {
        self.lock().served.remove(name).unwrap_or_default()
    }

    pub fn totals(&self) -> CdnTotals {
        let c = self.lock();
        CdnTotals {
            requests: c.requests,
            gets: c.gets,
            heads: c.heads,
            body_bytes: c.served.values().flatten().map(|s| s.end - s.start).sum(),
            connections: c.connections.len() as u64,
        }
    }

    /// How many times fault number `index` (in the config's order) fired.
    pub fn fired(&self, index: usize) -> u64 {
        self.lock().fired.get(&index).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        lock(&self.inner.counters)
    }
}

fn lock(m: &Mutex<Counters>) -> std::sync::MutexGuard<'_, Counters> {
    // A panicking handler cannot leave the counters half-updated in a way that matters to a
    // simulation, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bytes counted in more than one of `ranges` (a download's duplicate fetches).
pub fn bytes_served_twice(ranges: &[Served]) -> u64 {
    let mut events: Vec<(u64, i64)> = Vec::new();
    for r in ranges.iter().filter(|r| r.end > r.start) {
        events.push((r.start, 1));
        events.push((r.end, -1));
    }
    events.sort();
    let (mut depth, mut last, mut twice) = (0i64, 0u64, 0u64);
    for (pos, d) in events {
        if depth > 1 {
            twice += (pos - last) * (depth as u64 - 1);
        }
        depth += d;
        last = pos;
    }
    twice
}

/// Bytes present in both `a` and `b` (re-fetched by a second run).
pub fn overlap(a: &[Served], b: &[Served]) -> u64 {
    let mut total = 0;
    for x in a {
        for y in b {
            let s = x.start.max(y.start);
            let e = x.end.min(y.end);
            if e > s {
                total += e - s;
            }
        }
    }
    total
}

enum Range {
    Whole,
    Part(u64, u64),
    Unsatisfiable,
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n`; anything else (multi-range, junk) is ignored and the
/// whole file served, which is what many servers do.
fn parse_range(h: Option<&str>, size: u64) -> Range {
    let Some(spec) = h.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Range::Whole;
    };
    if spec.contains(',') {
        return Range::Whole;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Range::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let parsed = if a.is_empty() {
        b.parse::<u64>()
            .ok()
            .map(|n| (size.saturating_sub(n), size.saturating_sub(1)))
    } else {
        match (a.parse::<u64>(), b) {
            (Ok(s), "") => Some((s, size.saturating_sub(1))),
            (Ok(s), b) => b
                .parse::<u64>()
                .ok()
                .map(|e| (s, e.min(size.saturating_sub(1)))),
            _ => None,
        }
    };
    match parsed {
        None => Range::Whole,
        Some((s, e)) if s >= size || e < s => Range::Unsatisfiable,
        Some((s, e)) => Range::Part(s, e + 1),
    }
}

const HTML_PAGE: &[u8] = b"<html><head><title>Error</title></head><body><h1>Access Denied</h1>\
<p>You don't have permission to access this resource. Reference #18.4f2e.</p></body></html>\n";

async fn serve(inner: Arc<Inner>, req: Request, mut resp: Responder) -> io::Result<()> {
    let cfg = &inner.config;
    let is_head = req.method == "HEAD";
    if !is_head && req.method != "GET" {
        return resp.send(405, &[], b"").await;
    }
    let (get_no, fault_503, html) = {
        let mut c = lock(&inner.counters);
        c.requests += 1;
        c.connections.insert(req.connection);
        let get_no = if is_head {
            c.heads += 1;
            0
        } else {
            c.gets += 1;
            c.gets
        };
        let mut fault_503 = false;
        let mut html = false;
        for (i, f) in cfg.faults.iter().enumerate() {
            match f {
                Fault::Status503 { count } if c.fired.get(&i).copied().unwrap_or(0) < *count => {
                    *c.fired.entry(i).or_default() += 1;
                    fault_503 = true;
                }
                Fault::Html200 { every: 0 } => {
                    *c.fired.entry(i).or_default() += 1;
                    html = true;
                }
                Fault::Html200 { every } if !is_head && get_no % every == 0 => {
                    *c.fired.entry(i).or_default() += 1;
                    html = true;
                }
                _ => {}
            }
        }
        (get_no, fault_503, html)
    };
    if fault_503 {
        return resp
            .send(503, &[("Retry-After", "0".into())], b"busy\n")
            .await;
    }
    if html {
        let headers = [("Content-Type", "text/html; charset=UTF-8".to_string())];
        if is_head {
            resp.head(200, &headers, Some(HTML_PAGE.len() as u64))
                .await?;
            return resp.finish().await;
        }
        return resp.send(200, &headers, HTML_PAGE).await;
    }
    let name = req.path.trim_start_matches('/');
    let Some(file) = cfg.files.iter().find(|f| f.name == name) else {
        return resp
            .send(
                404,
                &[("Content-Type", "text/plain".into())],
                b"not found\n",
            )
            .await;
    };
    let size = file.size()?;
    let mut headers = vec![
        ("Accept-Ranges", "bytes".to_string()),
        ("ETag", file.etag(size)),
        ("Last-Modified", LAST_MODIFIED.to_string()),
    ];
    let (status, start, end) = match parse_range(req.header("range"), size) {
        Range::Whole => (200, 0, size),
        Range::Part(s, e) => {
            headers.push(("Content-Range", format!("bytes {s}-{}/{size}", e - 1)));
            (206, s, e)
        }
        Range::Unsatisfiable => {
            headers.push(("Content-Range", format!("bytes */{size}")));
            return resp.send(416, &headers, b"").await;
        }
    };
    headers.push(("Content-Type", "application/octet-stream".to_string()));
    resp.head(status, &headers, Some(end - start)).await?;
    if is_head {
        return resp.finish().await;
    }
    send_body(&inner, file, &req, &mut resp, get_no, start, end).await?;
    resp.finish().await
}

/// Stream `start..end` of `file`, applying the rate limit and faults. An `Err` (or a dropped
/// responder) cuts the connection.
async fn send_body(
    inner: &Inner,
    file: &CdnFile,
    req: &Request,
    resp: &mut Responder,
    get_no: u64,
    start: u64,
    end: u64,
) -> io::Result<()> {
    let cfg = &inner.config;
    let mut rate = cfg.rate;
    let mut cut_after: Option<u64> = None;
    for f in &cfg.faults {
        match f {
            Fault::DropEvery { nth, after } if get_no % nth == 0 => cut_after = Some(*after),
            Fault::Slow { nth, rate: r } if get_no == *nth => rate = Some(*r),
            _ => {}
        }
    }
    let record = {
        let mut c = lock(&inner.counters);
        let v = c.served.entry(file.name.clone()).or_default();
        v.push(Served {
            start,
            end: start,
            connection: req.connection,
        });
        v.len() - 1
    };
    let mut buf = vec![0u8; CHUNK];
    let mut pos = start;
    while pos < end {
        // Faults that trigger at a file offset fire when the response reaches it.
        let mut boundary = end.min(pos + CHUNK as u64);
        if let Some(after) = cut_after {
            let cut = start + after;
            if pos >= cut {
                return Err(io::Error::other("fault: drop-every"));
            }
            boundary = boundary.min(cut);
        }
        for (i, f) in cfg.faults.iter().enumerate() {
            match f {
                Fault::DropAt { offset, times } | Fault::StallAt { offset, times, .. } => {
                    if *offset == pos {
                        let fire = {
                            let mut c = lock(&inner.counters);
                            let n = c.fired.entry(i).or_default();
                            if *n < u64::from(*times) {
                                *n += 1;
                                true
                            } else {
                                false
                            }
                        };
                        if fire {
                            if let Fault::StallAt { pause, .. } = f {
                                tracing::debug!("cdn: stalling at {pos}");
                                match pause {
                                    Some(p) => tokio::time::sleep(*p).await,
                                    None => std::future::pending::<()>().await,
                                }
                            } else {
                                tracing::debug!("cdn: dropping the connection at {pos}");
                                return Err(io::Error::other("fault: drop-at"));
                            }
                        }
                    } else if *offset > pos {
                        boundary = boundary.min(*offset);
                    }
                }
                Fault::WrongBytes { offset, len } => {
                    if *offset > pos {
                        boundary = boundary.min(*offset);
                    }
                    if offset + len > pos {
                        boundary = boundary.min(offset + len);
                    }
                }
                _ => {}
            }
        }
        let n = (boundary - pos) as usize;
        let chunk = &mut buf[..n];
        file.read(pos, chunk)?;
        for f in &cfg.faults {
            if let Fault::WrongBytes { offset, len } = f {
                if pos >= *offset && pos < offset + len {
                    chunk.iter_mut().for_each(|b| *b = !*b);
                }
            }
        }
        if let Some(rate) = rate {
            let wait = {
                let mut c = lock(&inner.counters);
                let now = Instant::now();
                c.buckets
                    .entry(req.connection)
                    .or_insert(Bucket {
                        tokens: 0.0,
                        last: now,
                    })
                    .reserve(rate, n, now)
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        resp.body(chunk).await?;
        pos += n as u64;
        let mut c = lock(&inner.counters);
        if let Some(s) = c.served.get_mut(&file.name).and_then(|v| v.get_mut(record)) {
            s.end = pos;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_content_is_a_function_of_the_offset() {
        let mut whole = vec![0u8; 1000];
        generated_fill(7, 0, &mut whole);
        let mut part = vec![0u8; 333];
        generated_fill(7, 101, &mut part);
        assert_eq!(&whole[101..434], &part[..]);
        let mut other = vec![0u8; 1000];
        generated_fill(8, 0, &mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn ranges_parse_like_http() {
        assert!(matches!(
            parse_range(Some("bytes=0-9"), 100),
            Range::Part(0, 10)
        ));
        assert!(matches!(
            parse_range(Some("bytes=90-"), 100),
            Range::Part(90, 100)
        ));
        assert!(matches!(
            parse_range(Some("bytes=-5"), 100),
            Range::Part(95, 100)
        ));
        assert!(matches!(
            parse_range(Some("bytes=50-500"), 100),
            Range::Part(50, 100)
        ));
        assert!(matches!(
            parse_range(Some("bytes=100-"), 100),
            Range::Unsatisfiable
        ));
        assert!(matches!(
            parse_range(Some("bytes=0-1,5-6"), 100),
            Range::Whole
        ));
        assert!(matches!(parse_range(None, 100), Range::Whole));
    }

    #[test]
    fn fault_specs_parse() {
        assert_eq!(
            Fault::parse("drop-at=1M:2").unwrap(),
            Fault::DropAt {
                offset: 1 << 20,
                times: 2
            }
        );
        assert_eq!(
            Fault::parse("stall-at=100").unwrap(),
            Fault::StallAt {
                offset: 100,
                pause: None,
                times: 1
            }
        );
        assert_eq!(
            Fault::parse("stall-at=100:250:3").unwrap(),
            Fault::StallAt {
                offset: 100,
                pause: Some(Duration::from_millis(250)),
                times: 3
            }
        );
        assert_eq!(
            Fault::parse("html200").unwrap(),
            Fault::Html200 { every: 0 }
        );
        assert_eq!(
            Fault::parse("503=3").unwrap(),
            Fault::Status503 { count: 3 }
        );
        assert!(Fault::parse("drop-every=0").is_err());
        assert!(Fault::parse("explode").is_err());
    }

    #[test]
    fn overlap_counting() {
        let s = |start, end| Served {
            start,
            end,
            connection: 0,
        };
        assert_eq!(bytes_served_twice(&[s(0, 10), s(5, 20), s(20, 30)]), 5);
        assert_eq!(bytes_served_twice(&[s(0, 10), s(0, 10), s(0, 10)]), 20);
        assert_eq!(overlap(&[s(0, 10)], &[s(8, 12), s(20, 30)]), 2);
    }

    #[test]
    fn serves_ranges_heads_and_faults_over_http() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let cfg = CdnConfig {
                files: vec![
                    CdnFile::generated("g.bin", 1000, 5),
                    CdnFile {
                        name: "m.bin".into(),
                        source: Source::Bytes(Arc::new(b"0123456789".to_vec())),
                    },
                ],
                rate: None,
                faults: vec![
                    Fault::Status503 { count: 1 },
                    Fault::WrongBytes { offset: 3, len: 2 },
                ],
            };
            let cdn = Cdn::start("127.0.0.1:0".parse().unwrap(), None, cfg)
                .await
                .unwrap();
            let c = reqwest::Client::builder().no_proxy().build().unwrap();
            let get = |name: &str, range: Option<&str>| {
                let mut r = c.get(cdn.url(name));
                if let Some(v) = range {
                    r = r.header("Range", v);
                }
                r.send()
            };
            assert_eq!(get("m.bin", None).await.unwrap().status(), 503);
            let r = get("m.bin", Some("bytes=2-6")).await.unwrap();
            assert_eq!(r.status(), 206);
            assert_eq!(r.headers()["content-range"], "bytes 2-6/10");
            assert!(r.headers().contains_key("etag"));
            // Bytes 3 and 4 are served inverted.
            let body = r.bytes().await.unwrap();
            assert_eq!(&body[..], &[b'2', !b'3', !b'4', b'5', b'6']);
            let r = get("m.bin", Some("bytes=10-")).await.unwrap();
            assert_eq!(r.status(), 416);
            assert_eq!(r.headers()["content-range"], "bytes */10");
            let r = c.head(cdn.url("g.bin")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["content-length"], "1000");
            let body = get("g.bin", Some("bytes=100-199"))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let mut want = vec![0u8; 100];
            generated_fill(5, 100, &mut want);
            assert_eq!(&body[..], &want[..]);
            assert_eq!(get("nope", None).await.unwrap().status(), 404);
            assert_eq!(
                cdn.served("g.bin"),
                vec![Served {
                    start: 100,
                    end: 200,
                    connection: cdn.served("g.bin")[0].connection
                }]
            );
            let t = cdn.totals();
            assert_eq!((t.gets, t.heads, t.body_bytes), (5, 1, 105));
        });
    }

    #[test]
    fn the_bucket_paces_to_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket {
            tokens: 0.0,
            last: t0,
        };
        // 1 MiB/s: sending 64 KiB right away costs 1/16 s of waiting.
        let w = b.reserve(1 << 20, 64 * 1024, t0);
        assert_eq!(w.as_millis(), 62);
    }
}
