//! An IPSW read over HTTP range requests, so a restore can start — and run — without the
//! 13–20 GiB file on the station's disk (issue 3 item 3).
//!
//! [`RemoteFile`] implements [`RandomAccess`]: the ZIP reader asks for bounded ranges, which
//! are served from a small LRU cache of fixed, aligned blocks. Missing blocks are fetched with
//! one range request per run of adjacent blocks; when reads are sequential (ASR streaming the
//! OS image) the next blocks are prefetched in parallel while the caller consumes the current
//! ones. Reads larger than half the cache bypass it and go straight into the caller's buffer.
//! Memory is bounded by `(cache_blocks + read_ahead) × block_size` plus one read in flight.
//!
//! A dropped connection or a 5xx is retried with backoff; every answer is checked against the
//! ETag / Last-Modified / length seen at open, so a file replaced on the server mid-restore is
//! a clear error instead of a silently mixed image.
//!
//! `RandomAccess` is synchronous, so each `RemoteFile` owns a small tokio runtime (two
//! workers: prefetches make progress while the caller is not inside a read). Calling
//! `read_at` from inside another async runtime is refused with an error (use
//! `spawn_blocking`), because blocking there would stall that runtime.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::{self, HeaderMap};
use reqwest::StatusCode;
use tokio::sync::watch;

use super::{Ipsw, RandomAccess, ZipError};
use crate::http::{describe_error, HttpConfig, HttpError};

/// How a remote IPSW is read.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Cache block size; each block is one aligned range of the file.
    pub block_size: usize,
    /// Blocks kept (least recently used evicted first).
    pub cache_blocks: usize,
    /// Blocks prefetched after a sequential read.
    pub read_ahead: usize,
    /// Attempts per range when the connection drops or the server answers 5xx.
    pub max_attempts: u32,
    /// Pause after the first failed attempt, doubled for each further one (capped at 8×).
    pub retry_delay: Duration,
    pub http: HttpConfig,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            block_size: 1 << 20,
            cache_blocks: 16,
            read_ahead: 4,
            max_attempts: 6,
            retry_delay: Duration::from_millis(500),
            http: HttpConfig::default(),
        }
    }
}

/// Errors reading a remote IPSW; carried through `io::Error` by [`RandomAccess`].
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("cannot start the network runtime for the remote IPSW: {0}")]
    Runtime(String),
    #[error(
        "the remote IPSW {url} could not be read after {attempts} attempt(s) ({reason}); check \
         the station's network, or download the IPSW and pass it with --ipsw"
    )]
    Unreachable {
        url: String,
        attempts: u32,
        reason: String,
    },
    #[error(
        "the server of {url} answered HTTP {status}; the link may have expired: fetch the \
         firmware list again, or download the IPSW and pass it with --ipsw"
    )]
    Status { url: String, status: u16 },
    #[error("the server of {url} does not say how large the IPSW is; it cannot be read remotely: download it and pass it with --ipsw")]
    NoLength { url: String },
    #[error("the server of {url} does not support range requests ({detail}); it cannot be read remotely: download the IPSW and pass it with --ipsw")]
    NoRanges { url: String, detail: String },
    #[error(
        "the IPSW at {url} changed on the server while it was being read ({detail}); restart \
         the restore so it reads one consistent file"
    )]
    Changed { url: String, detail: String },
    #[error("the server of {url} sent a wrong range ({detail}); try again, or download the IPSW and pass it with --ipsw")]
    BadRange { url: String, detail: String },
    #[error("a remote IPSW was read from inside an async task; use spawn_blocking (this is a macrescue bug: report it with the log)")]
    InsideRuntime,
}

impl RemoteError {
    fn into_io(self) -> io::Error {
        let kind = match &self {
            RemoteError::Unreachable { .. } => io::ErrorKind::TimedOut,
            RemoteError::InsideRuntime => io::ErrorKind::Other,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }
}

/// Request counters, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemoteStats {
    /// HTTP requests sent (HEAD and GET, retries included).
    pub requests: u64,
    /// Body bytes received.
    pub bytes: u64,
    /// Attempts repeated after a transient failure.
    pub retries: u64,
}

/// What identifies the file version read at open.
#[derive(Debug, Clone, Default)]
struct Validator {
    etag: Option<String>,
    last_modified: Option<String>,
}

/// A fetch result shared by every reader waiting on it: the bytes of a run of blocks.
type Shared = Option<Result<Bytes, Arc<RemoteError>>>;

enum Slot {
    Ready {
        data: Bytes,
        used: u64,
    },
    /// Being fetched as part of the run starting at `first` block.
    Loading {
        first: u64,
        rx: watch::Receiver<Shared>,
    },
}

#[derive(Default)]
struct Cache {
    slots: HashMap<u64, Slot>,
    tick: u64,
    /// End of the previous read, to detect sequential access.
    last_end: Option<u64>,
}

struct Inner {
    url: String,
    len: u64,
    validator: Validator,
    client: reqwest::Client,
    config: RemoteConfig,
    cache: Mutex<Cache>,
    requests: AtomicU64,
    bytes: AtomicU64,
    retries: AtomicU64,
}

/// An IPSW (or any file) on an HTTP(S) server, read by ranges.
pub struct RemoteFile {
    inner: Arc<Inner>,
    /// Always `Some` until drop.
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for RemoteFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteFile")
            .field("url", &self.inner.url)
            .field("len", &self.inner.len)
            .finish_non_exhaustive()
    }
}

impl RemoteFile {
    /// Opens `url`: learns the size and version (ETag / Last-Modified) with one HEAD (or a
    /// one-byte range GET when HEAD is not usable) and checks that ranges are supported.
    pub fn open(url: &str, config: RemoteConfig) -> Result<Self, RemoteError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(RemoteError::InsideRuntime);
        }
        let config = RemoteConfig {
            block_size: config.block_size.max(4096),
            cache_blocks: config.cache_blocks.max(2),
            max_attempts: config.max_attempts.max(1),
            ..config
        };
        let client = config.http.client()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("remote-ipsw")
            .enable_all()
            .build()
            .map_err(|e| RemoteError::Runtime(e.to_string()))?;
        let mut inner = Inner {
            url: url.to_string(),
            len: 0,
            validator: Validator::default(),
            client,
            config,
            cache: Mutex::new(Cache::default()),
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        };
        let (len, validator) = runtime.block_on(inner.probe())?;
        inner.len = len;
        inner.validator = validator;
        tracing::info!(url, len, etag = ?inner.validator.etag, "opened remote IPSW");
        Ok(Self {
            inner: Arc::new(inner),
            runtime: Some(runtime),
        })
    }

    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The ETag the file had at open, if the server sent one.
    pub fn etag(&self) -> Option<&str> {
        self.inner.validator.etag.as_deref()
    }

    pub fn stats(&self) -> RemoteStats {
        RemoteStats {
            requests: self.inner.requests.load(Ordering::Relaxed),
            bytes: self.inner.bytes.load(Ordering::Relaxed),
            retries: self.inner.retries.load(Ordering::Relaxed),
        }
    }

    /// Blocks held in the cache right now (ready or loading); never above
    /// `cache_blocks + read_ahead` plus one read's blocks.
    pub fn cached_blocks(&self) -> usize {
        lock(&self.inner.cache).slots.len()
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        // Set in `open`, taken only in `drop`.
        self.runtime.as_ref().expect("runtime present until drop")
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), RemoteError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(RemoteError::InsideRuntime);
        }
        let inner = &self.inner;
        let bypass = inner.config.block_size * (inner.config.cache_blocks / 2).max(1);
        if buf.len() > bypass {
            return self.runtime().block_on(inner.read_direct(offset, buf));
        }
        let inner = Arc::clone(&self.inner);
        self.runtime().block_on(inner.read_cached(offset, buf))
    }
}

impl Ipsw<RemoteFile> {
    /// Opens an IPSW on an HTTP(S) server: size and version, then the ZIP directory, all by
    /// range requests.
    pub fn open_url(url: &str, config: RemoteConfig) -> Result<Self, ZipError> {
        let file = RemoteFile::open(url, config).map_err(|e| ZipError::Open {
            path: url.into(),
            source: e.into_io(),
        })?;
        Self::open(file)
    }
}

impl Drop for RemoteFile {
    fn drop(&mut self) {
        // Dropping a runtime inside another one panics; background shutdown never does, and
        // pending prefetches are simply abandoned.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl RandomAccess for RemoteFile {
    fn len(&self) -> u64 {
        self.inner.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let past_end = match offset.checked_add(buf.len() as u64) {
            Some(end) => end > self.inner.len,
            None => true,
        };
        if past_end {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at {offset} is past the end of the remote IPSW ({} bytes)",
                    buf.len(),
                    self.inner.len
                ),
            ));
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.read(offset, buf).map_err(RemoteError::into_io)
    }
}

fn lock(m: &Mutex<Cache>) -> std::sync::MutexGuard<'_, Cache> {
    // A panic while holding the lock leaves a consistent map (every change is one insert or
    // remove), so the cache stays usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A failure worth another attempt (connection dropped, 5xx), or a final one.
enum Attempt {
    Transient(String),
    Final(RemoteError),
}

impl Inner {
    fn block_range(&self, block: u64) -> (u64, u64) {
        let bs = self.config.block_size as u64;
        let start = block * bs;
        (start, (start + bs).min(self.len))
    }

    async fn probe(&self) -> Result<(u64, Validator), RemoteError> {
        let head = self
            .with_retries(|| async {
                self.requests.fetch_add(1, Ordering::Relaxed);
                let r = self
                    .client
                    .head(&self.url)
                    .send()
                    .await
                    .map_err(|e| Attempt::Transient(describe_error(&e)))?;
                Ok((r.status(), r.headers().clone()))
            })
            .await?;
        let (status, headers) = head;
        let length = header_str(&headers, header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
        let ranges = header_str(&headers, header::ACCEPT_RANGES);
        if status.is_success() && ranges.is_some_and(|r| r.eq_ignore_ascii_case("none")) {
            return Err(RemoteError::NoRanges {
                url: self.url.clone(),
                detail: "Accept-Ranges: none".into(),
            });
        }
        if status.is_success() {
            if let Some(len) = length {
                return Ok((len, validator(&headers)));
            }
        } else if !matches!(
            status,
            StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED | StatusCode::FORBIDDEN
        ) {
            return Err(RemoteError::Status {
                url: self.url.clone(),
                status: status.as_u16(),
            });
        }
        // HEAD unusable (refused, or no length): a one-byte range tells size and version.
        let (total, validator) = self
            .with_retries(|| async {
                self.requests.fetch_add(1, Ordering::Relaxed);
                let r = self
                    .client
                    .get(&self.url)
                    .header(header::RANGE, "bytes=0-0")
                    .send()
                    .await
                    .map_err(|e| Attempt::Transient(describe_error(&e)))?;
                if r.status() != StatusCode::PARTIAL_CONTENT {
                    return Err(classify_status(&self.url, r.status()));
                }
                let total = header_str(r.headers(), header::CONTENT_RANGE)
                    .and_then(parse_content_range)
                    .and_then(|(_, _, total)| total);
                Ok((total, validator(r.headers())))
            })
            .await?;
        let len = total.ok_or_else(|| RemoteError::NoLength {
            url: self.url.clone(),
        })?;
        Ok((len, validator))
    }

    async fn with_retries<T, F, Fut>(&self, mut op: F) -> Result<T, RemoteError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Attempt>>,
    {
        let max = self.config.max_attempts;
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(Attempt::Final(e)) => return Err(e),
                Err(Attempt::Transient(reason)) if attempt >= max => {
                    return Err(RemoteError::Unreachable {
                        url: self.url.clone(),
                        attempts: attempt,
                        reason,
                    })
                }
                Err(Attempt::Transient(reason)) => {
                    let factor = 1u32 << (attempt - 1).min(3);
                    let delay = self.config.retry_delay * factor;
                    tracing::warn!(url = %self.url, attempt, %reason, ?delay, "range read failed; retrying");
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    /// `[start, end)` of the file, retried; the answer is checked against the open-time version.
    async fn fetch_range(&self, start: u64, end: u64) -> Result<Bytes, RemoteError> {
        self.with_retries(|| self.try_range(start, end)).await
    }

    async fn try_range(&self, start: u64, end: u64) -> Result<Bytes, Attempt> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let transient = |e: reqwest::Error| Attempt::Transient(describe_error(&e));
        let mut response = self
            .client
            .get(&self.url)
            .header(header::RANGE, format!("bytes={start}-{}", end - 1))
            .send()
            .await
            .map_err(transient)?;
        let status = response.status();
        let whole_file = start == 0 && end == self.len;
        if status == StatusCode::OK && !whole_file {
            return Err(Attempt::Final(RemoteError::NoRanges {
                url: self.url.clone(),
                detail: "it answered a range request with the whole file".into(),
            }));
        }
        if status == StatusCode::RANGE_NOT_SATISFIABLE {
            return Err(Attempt::Final(self.changed(format!(
                "bytes {start}-{} no longer exist; it was {} bytes",
                end - 1,
                self.len
            ))));
        }
        if !status.is_success() {
            return Err(classify_status(&self.url, status));
        }
        self.check_version(response.headers())
            .map_err(Attempt::Final)?;
        if status == StatusCode::PARTIAL_CONTENT {
            let range =
                header_str(response.headers(), header::CONTENT_RANGE).and_then(parse_content_range);
            match range {
                Some((_, _, Some(total))) if total != self.len => {
                    return Err(Attempt::Final(self.changed(format!(
                        "its size is now {total} bytes, it was {}",
                        self.len
                    ))))
                }
                Some((a, b, _)) if a == start && b + 1 == end => {}
                other => {
                    return Err(Attempt::Final(RemoteError::BadRange {
                        url: self.url.clone(),
                        detail: format!("asked for {start}-{}, got {other:?}", end - 1),
                    }))
                }
            }
        }
        let want = (end - start) as usize;
        let mut body = BytesMut::with_capacity(want);
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    self.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    if body.len() + chunk.len() > want {
                        return Err(Attempt::Final(RemoteError::BadRange {
                            url: self.url.clone(),
                            detail: format!("more than the {want} bytes asked for"),
                        }));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(Attempt::Transient(format!(
                        "connection dropped after {} of {want} bytes: {}",
                        body.len(),
                        describe_error(&e)
                    )))
                }
            }
        }
        if body.len() != want {
            return Err(Attempt::Transient(format!(
                "connection closed after {} of {want} bytes",
                body.len()
            )));
        }
        Ok(body.freeze())
    }

    fn changed(&self, detail: String) -> RemoteError {
        RemoteError::Changed {
            url: self.url.clone(),
            detail,
        }
    }

    fn check_version(&self, headers: &HeaderMap) -> Result<(), RemoteError> {
        let now = validator(headers);
        if let (Some(was), Some(is)) = (&self.validator.etag, &now.etag) {
            if was != is {
                return Err(self.changed(format!("ETag {was} became {is}")));
            }
        }
        if let (Some(was), Some(is)) = (&self.validator.last_modified, &now.last_modified) {
            if was != is {
                return Err(self.changed(format!("Last-Modified {was} became {is}")));
            }
        }
        Ok(())
    }

    /// Large reads: straight into the caller's buffer, in pieces of a few blocks, uncached.
    async fn read_direct(&self, offset: u64, buf: &mut [u8]) -> Result<(), RemoteError> {
        let piece = self.config.block_size * 4;
        let mut done = 0;
        while done < buf.len() {
            let n = piece.min(buf.len() - done);
            let start = offset + done as u64;
            let data = self.fetch_range(start, start + n as u64).await?;
            buf[done..done + n].copy_from_slice(&data);
            done += n;
        }
        Ok(())
    }

    async fn read_cached(self: Arc<Self>, offset: u64, buf: &mut [u8]) -> Result<(), RemoteError> {
        let bs = self.config.block_size as u64;
        let end = offset + buf.len() as u64;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let last_block = (self.len - 1) / bs;

        // Under the lock: decide, per block, where its bytes come from; start fetches.
        let mut sources = Vec::new();
        {
            let mut cache = lock(&self.cache);
            let sequential = cache.last_end == Some(offset);
            cache.last_end = Some(end);
            cache.tick += 1;
            let tick = cache.tick;
            let mut block = first;
            while block <= last {
                match cache.slots.get_mut(&block) {
                    Some(Slot::Ready { data, used }) => {
                        *used = tick;
                        sources.push((block, block, Source::Ready(data.clone())));
                        block += 1;
                    }
                    Some(Slot::Loading { first, rx }) => {
                        sources.push((block, *first, Source::Wait(rx.clone())));
                        block += 1;
                    }
                    None => {
                        // One request for the whole run of missing blocks.
                        let mut run_end = block;
                        while run_end < last && !cache.slots.contains_key(&(run_end + 1)) {
                            run_end += 1;
                        }
                        let rx = self.spawn_fetch(&mut cache, block, run_end);
                        for b in block..=run_end {
                            sources.push((b, block, Source::Wait(rx.clone())));
                        }
                        block = run_end + 1;
                    }
                }
            }
            if sequential {
                let ahead_end = (last + self.config.read_ahead as u64).min(last_block);
                for b in last + 1..=ahead_end {
                    if !cache.slots.contains_key(&b) {
                        // One request per block: they run in parallel on separate connections.
                        self.spawn_fetch(&mut cache, b, b);
                    }
                }
            }
            evict(&mut cache, self.config.cache_blocks);
        }

        for (block, run_first, source) in sources {
            let data = match source {
                Source::Ready(data) => data,
                Source::Wait(mut rx) => {
                    let shared = rx
                        .wait_for(Option::is_some)
                        .await
                        .map_err(|_| RemoteError::Runtime("a range fetch was abandoned".into()))?
                        .clone();
                    match shared {
                        Some(Ok(run)) => {
                            let skip = ((block - run_first) * bs) as usize;
                            let (s, e) = self.block_range(block);
                            run.slice(skip..skip + (e - s) as usize)
                        }
                        Some(Err(e)) => return Err(clone_error(&e)),
                        None => unreachable!("wait_for returned only once the value is Some"),
                    }
                }
            };
            let (block_start, _) = self.block_range(block);
            let from = offset.max(block_start);
            let to = end.min(block_start + data.len() as u64);
            let src = &data[(from - block_start) as usize..(to - block_start) as usize];
            let dst = (from - offset) as usize;
            buf[dst..dst + src.len()].copy_from_slice(src);
        }
        Ok(())
    }

    /// Marks blocks `first..=last` loading and fetches them in the background; the receiver
    /// yields the bytes of the whole run.
    fn spawn_fetch(
        self: &Arc<Self>,
        cache: &mut Cache,
        first: u64,
        last: u64,
    ) -> watch::Receiver<Shared> {
        let (tx, rx) = watch::channel(None);
        for b in first..=last {
            cache.slots.insert(
                b,
                Slot::Loading {
                    first,
                    rx: rx.clone(),
                },
            );
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let (start, _) = this.block_range(first);
            let (_, end) = this.block_range(last);
            let result = this.fetch_range(start, end).await;
            {
                let mut cache = lock(&this.cache);
                cache.tick += 1;
                let tick = cache.tick;
                for b in first..=last {
                    match &result {
                        Ok(run) => {
                            let skip = ((b - first) * this.config.block_size as u64) as usize;
                            let (s, e) = this.block_range(b);
                            let data = run.slice(skip..skip + (e - s) as usize);
                            cache.slots.insert(b, Slot::Ready { data, used: tick });
                        }
                        Err(_) => {
                            cache.slots.remove(&b);
                        }
                    }
                }
                evict(&mut cache, this.config.cache_blocks);
            }
            let _ = tx.send(Some(result.map_err(Arc::new)));
        });
        rx
    }
}

enum Source {
    Ready(Bytes),
    Wait(watch::Receiver<Shared>),
}

/// Drops least recently used ready blocks until at most `capacity` remain (loading blocks
/// are never dropped: a reader waits on them).
fn evict(cache: &mut Cache, capacity: usize) {
    while cache.slots.len() > capacity {
        let oldest = cache
            .slots
            .iter()
            .filter_map(|(b, s)| match s {
                Slot::Ready { used, .. } => Some((*used, *b)),
                Slot::Loading { .. } => None,
            })
            .min();
        match oldest {
            Some((_, b)) => {
                cache.slots.remove(&b);
            }
            None => break,
        }
    }
}

/// Errors are shared by every reader of a run; each gets its own copy.
fn clone_error(e: &RemoteError) -> RemoteError {
    match e {
        RemoteError::Unreachable {
            url,
            attempts,
            reason,
        } => RemoteError::Unreachable {
            url: url.clone(),
            attempts: *attempts,
            reason: reason.clone(),
        },
        RemoteError::Status { url, status } => RemoteError::Status {
            url: url.clone(),
            status: *status,
        },
        RemoteError::NoLength { url } => RemoteError::NoLength { url: url.clone() },
        RemoteError::NoRanges { url, detail } => RemoteError::NoRanges {
            url: url.clone(),
            detail: detail.clone(),
        },
        RemoteError::Changed { url, detail } => RemoteError::Changed {
            url: url.clone(),
            detail: detail.clone(),
        },
        RemoteError::BadRange { url, detail } => RemoteError::BadRange {
            url: url.clone(),
            detail: detail.clone(),
        },
        RemoteError::InsideRuntime => RemoteError::InsideRuntime,
        RemoteError::Http(e) => RemoteError::Runtime(e.to_string()),
        RemoteError::Runtime(s) => RemoteError::Runtime(s.clone()),
    }
}

fn classify_status(url: &str, status: StatusCode) -> Attempt {
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        Attempt::Transient(format!("HTTP {status}"))
    } else if status == StatusCode::PRECONDITION_FAILED {
        Attempt::Final(RemoteError::Changed {
            url: url.to_string(),
            detail: "HTTP 412 Precondition Failed".into(),
        })
    } else {
        Attempt::Final(RemoteError::Status {
            url: url.to_string(),
            status: status.as_u16(),
        })
    }
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn validator(headers: &HeaderMap) -> Validator {
    Validator {
        etag: header_str(headers, header::ETAG).map(str::to_string),
        last_modified: header_str(headers, header::LAST_MODIFIED).map(str::to_string),
    }
}

/// `bytes A-B/TOTAL` (TOTAL may be `*`).
fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    if b < a {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((a, b, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse_strictly() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some((0, 99, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5, None)));
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes 0-x/2"), None);
        assert_eq!(parse_content_range(""), None);
    }

    #[test]
    fn eviction_keeps_loading_blocks_and_drops_the_oldest() {
        let (_tx, rx) = watch::channel(None);
        let mut cache = Cache::default();
        for (b, used) in [(0u64, 5u64), (1, 1), (2, 3)] {
            cache.slots.insert(
                b,
                Slot::Ready {
                    data: Bytes::from_static(b"x"),
                    used,
                },
            );
        }
        cache.slots.insert(3, Slot::Loading { first: 3, rx });
        evict(&mut cache, 2);
        let mut left: Vec<u64> = cache.slots.keys().copied().collect();
        left.sort();
        assert_eq!(left, [0, 3]);
        evict(&mut cache, 0);
        assert_eq!(cache.slots.keys().copied().collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn status_classes() {
        assert!(matches!(
            classify_status("u", StatusCode::BAD_GATEWAY),
            Attempt::Transient(_)
        ));
        assert!(matches!(
            classify_status("u", StatusCode::NOT_FOUND),
            Attempt::Final(RemoteError::Status { status: 404, .. })
        ));
        assert!(matches!(
            classify_status("u", StatusCode::PRECONDITION_FAILED),
            Attempt::Final(RemoteError::Changed { .. })
        ));
    }

    #[test]
    fn opening_inside_a_runtime_is_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = rt
            .block_on(async { RemoteFile::open("http://127.0.0.1:9/x", RemoteConfig::default()) })
            .unwrap_err();
        assert!(matches!(err, RemoteError::InsideRuntime));
    }
}
