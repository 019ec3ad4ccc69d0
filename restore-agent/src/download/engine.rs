//! The tokio + reqwest edge of the downloader: runs the [`Scheduler`]'s decisions over HTTP
//! connections and writes bytes through a [`PartWriter`].

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use super::live::{Live, LiveEnd};
use super::ranges::{chunk_size, ByteRange, RangeSet};
use super::rate::RateMeter;
use super::response::{check_head, check_part, looks_like_html, Problem, RemoteFile, ResponseHead};
use super::schedule::{AttemptEnd, AttemptId, Next, SchedulePolicy, Scheduler};
use super::state::{save_atomic, SavedState};
use super::storage::{
    free_space, is_disk_full, sha1_file, sync_dir, CacheLock, FileWriter, PartWriter,
};
use super::{
    check_file_name, file_name_from_url, DownloadError, DownloadOptions, Downloaded, Event,
    Progress,
};
use crate::http::HttpConfig;

/// Receives [`Event`]s; called from the download's tasks, so keep it quick.
pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

/// Opens the partial file (path, size). Tests substitute writers that fail.
pub type WriterFactory = Arc<dyn Fn(&Path, u64) -> io::Result<Arc<dyn PartWriter>> + Send + Sync>;

/// Bytes gathered from the network before one positional write: large enough to keep syscalls
/// rare, small enough that 8 connections stay far below the memory budget.
const WRITE_BUF: usize = 256 * 1024;

/// Runs one download; see the module documentation of [`super`].
pub struct Downloader {
    client: reqwest::Client,
    opts: DownloadOptions,
    events: Option<EventSink>,
    writer: WriterFactory,
    live: Option<Arc<Live>>,
}

impl Downloader {
    pub fn new(http: &HttpConfig, opts: DownloadOptions) -> Result<Downloader, DownloadError> {
        let client = http
            .builder()?
            // HTTP/2 would multiplex every range over one TCP connection, and the CDN's
            // per-connection limit would then cap the whole download.
            .http1_only()
            .pool_max_idle_per_host(opts.connections.max(1) * 2)
            .build()
            .map_err(|e| crate::http::HttpError::Client(e.to_string()))?;
        Ok(Downloader {
            client,
            opts,
            events: None,
            live: None,
            writer: Arc::new(|path: &Path, size: u64| {
                Ok(Arc::new(FileWriter::open(path, size)?) as Arc<dyn PartWriter>)
            }),
        })
    }

    pub fn on_event(mut self, sink: EventSink) -> Downloader {
        self.events = Some(sink);
        self
    }

    pub fn with_writer(mut self, factory: WriterFactory) -> Downloader {
        self.writer = factory;
        self
    }

    /// Share progress with readers of the partial file ([`crate::ipsw::PartialFile`]): ranges
    /// they wait for are fetched before the rest, on a connection kept free for them.
    pub fn with_live(mut self, live: Arc<Live>) -> Downloader {
        self.live = Some(live);
        self
    }

    pub async fn run(&self) -> Result<Downloaded, DownloadError> {
        let result = self.run_inner().await;
        if let Some(live) = &self.live {
            live.end(match &result {
                Ok(d) => {
                    live.completed(&d.path, d.size);
                    LiveEnd::Complete {
                        path: d.path.clone(),
                        verified: self.opts.sha1.is_some(),
                    }
                }
                Err(e @ DownloadError::Sha1Mismatch { .. }) => LiveEnd::Corrupt {
                    message: e.to_string(),
                },
                Err(e) => LiveEnd::Failed {
                    message: e.to_string(),
                },
            });
        }
        result
    }

    fn emit(&self, e: Event) {
        if let Some(s) = &self.events {
            s(&e);
        }
    }

    async fn run_inner(&self) -> Result<Downloaded, DownloadError> {
        let o = &self.opts;
        let name = match &o.file_name {
            Some(n) => {
                check_file_name(n).map_err(|_| DownloadError::BadUrl(o.url.clone()))?;
                n.clone()
            }
            None => file_name_from_url(&o.url)?,
        };
        let dir = o.cache_dir.clone();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| io_err("create the cache directory", &dir, e))?;
        let paths = Paths {
            done: dir.join(&name),
            part: dir.join(format!("{name}.part")),
            state: dir.join(format!("{name}.state")),
            lock: dir.join(format!("{name}.lock")),
        };

        let _lock = self.lock(&paths.lock).await?;
        if tokio::fs::try_exists(&paths.done).await.unwrap_or(false) {
            if let Some(found) = self.reuse(&paths.done).await? {
                return Ok(found);
            }
        }

        let remote = self.probe().await?;
        let have = self.resume_point(&paths, &remote).await?;
        if have.covered() > 0 {
            self.emit(Event::Resuming {
                have: have.covered(),
                total: remote.size,
            });
        }
        // Check before reserving: a failed reservation can leave blocks allocated, and a
        // station whose disk is full fails in worse ways than a refused download.
        let needed = remote.size - have.covered();
        if let Ok(available) = free_space(&dir) {
            if available < needed {
                return Err(DownloadError::DiskFull {
                    dir,
                    needed,
                    available,
                    shortfall: needed - available,
                });
            }
        }
        let writer = {
            let factory = Arc::clone(&self.writer);
            let part = paths.part.clone();
            let size = remote.size;
            tokio::task::spawn_blocking(move || factory(&part, size))
                .await
                .map_err(|e| io_err("open", &paths.part, io::Error::other(e)))?
                .map_err(|e| self.write_error(e, &paths.part, remote.size - have.covered()))?
        };
        if let Some(live) = &self.live {
            live.opened(paths.part.clone(), remote.size, &have);
        }
        let fetched = self.fetch(&paths, &remote, have, &writer).await?;
        drop(writer);
        self.finish(&paths, &remote, fetched).await
    }

    /// Wait for the cache lock; while another downloader holds it, it is fetching this file.
    async fn lock(&self, path: &Path) -> Result<CacheLock, DownloadError> {
        let mut announced = false;
        loop {
            let p = path.to_path_buf();
            let got = tokio::task::spawn_blocking(move || CacheLock::try_acquire(&p))
                .await
                .map_err(|e| io_err("lock", path, io::Error::other(e)))?
                .map_err(|e| io_err("lock", path, e))?;
            if let Some(l) = got {
                return Ok(l);
            }
            if !announced {
                tracing::info!(
                    "{} is being downloaded by another restore; waiting",
                    path.display()
                );
                self.emit(Event::WaitingForOtherDownload {
                    lock: path.to_path_buf(),
                });
                announced = true;
            }
            tokio::time::sleep(self.opts.lock_poll).await;
        }
    }

    /// A finished file already in the cache: use it if it matches the catalog's SHA-1.
    async fn reuse(&self, path: &Path) -> Result<Option<Downloaded>, DownloadError> {
        let (sha1, size) = self.hash(path).await?;
        match self.opts.sha1 {
            Some(want) if want != sha1 => {
                tracing::warn!(
                    "cached {} has SHA-1 {} instead of {}; downloading it again",
                    path.display(),
                    hex::encode(sha1),
                    hex::encode(want)
                );
                tokio::fs::remove_file(path)
                    .await
                    .map_err(|e| io_err("delete", path, e))?;
                Ok(None)
            }
            _ => {
                self.emit(Event::AlreadyCached {
                    path: path.to_path_buf(),
                });
                Ok(Some(Downloaded {
                    path: path.to_path_buf(),
                    size,
                    sha1,
                    fetched: 0,
                    from_cache: true,
                }))
            }
        }
    }

    async fn hash(&self, path: &Path) -> Result<([u8; 20], u64), DownloadError> {
        let p = path.to_path_buf();
        let total = tokio::fs::metadata(path)
            .await
            .map_err(|e| io_err("read", path, e))?
            .len();
        let events = self.events.clone();
        tokio::task::spawn_blocking(move || {
            let mut last = 0u64;
            sha1_file(&p, |done| {
                // Report every 256 MiB: verifying 15 GiB takes long enough to need a sign of life.
                if done - last >= 256 << 20 || done == total {
                    last = done;
                    if let Some(s) = &events {
                        s(&Event::Verifying { done, total });
                    }
                }
            })
        })
        .await
        .map_err(|e| io_err("read", path, io::Error::other(e)))?
        .map_err(|e| io_err("read", path, e))
    }

    /// Size and validators of the remote file, retrying transient failures.
    async fn probe(&self) -> Result<RemoteFile, DownloadError> {
        let o = &self.opts;
        let mut failures = 0u32;
        loop {
            let r = self.probe_once().await;
            let e = match r {
                Ok(f) => return Ok(f),
                Err(e) => e,
            };
            let transient = match &e {
                AttemptError::Problem(p) => p.is_transient(),
                AttemptError::Network(_) | AttemptError::Stalled => true,
                _ => false,
            };
            failures += 1;
            if !transient || failures > o.max_failures {
                return Err(self.attempt_error(e));
            }
            self.emit(Event::Retrying {
                offset: 0,
                reason: e.describe(),
            });
            let policy = self.policy();
            tokio::time::sleep(super::schedule::backoff_delay(&policy, failures)).await;
        }
    }

    async fn probe_once(&self) -> Result<RemoteFile, AttemptError> {
        let stall = self.opts.stall_timeout;
        let resp = tokio::time::timeout(stall, self.client.head(&self.opts.url).send())
            .await
            .map_err(|_| AttemptError::Stalled)?
            .map_err(AttemptError::network)?;
        let head = response_head(&resp);
        // Some servers refuse HEAD; a one-byte range answers the same questions.
        if head.status != 405 && head.status != 501 {
            if let Some(f) = check_head(&head).map_err(AttemptError::Problem)? {
                return Ok(f);
            }
        }
        let resp = tokio::time::timeout(
            stall,
            self.client
                .get(&self.opts.url)
                .header(reqwest::header::RANGE, "bytes=0-0")
                .send(),
        )
        .await
        .map_err(|_| AttemptError::Stalled)?
        .map_err(AttemptError::network)?;
        let head = response_head(&resp);
        if head.status == 200 {
            check_head(&head).map_err(AttemptError::Problem)?;
            return Err(AttemptError::Problem(Problem::RangeIgnored));
        }
        if head.status != 206 {
            return Err(AttemptError::Problem(match head.status {
                408 | 429 | 500..=599 => Problem::Busy(head.status),
                s => Problem::Status(s),
            }));
        }
        let total = head
            .content_range
            .as_deref()
            .and_then(super::response::parse_content_range)
            .and_then(|(_, _, t)| t)
            .ok_or_else(|| {
                AttemptError::Problem(Problem::WrongRange {
                    why: "no total size in Content-Range".into(),
                })
            })?;
        Ok(RemoteFile {
            size: total,
            etag: head.etag,
            last_modified: head.last_modified,
        })
    }

    /// Bytes already on disk from an earlier run, if its record describes this file.
    async fn resume_point(
        &self,
        paths: &Paths,
        remote: &RemoteFile,
    ) -> Result<RangeSet, DownloadError> {
        let part_len = tokio::fs::metadata(&paths.part).await.ok().map(|m| m.len());
        let verdict = match tokio::fs::read(&paths.state).await {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(None),
            Err(e) => Err(Some(format!("its record cannot be read: {e}"))),
            Ok(text) => SavedState::parse(&text)
                .map_err(|e| format!("its record is damaged: {e}"))
                .and_then(|s| s.resume(&self.opts.url, remote))
                .and_then(|set| match part_len {
                    Some(l) if l == remote.size => Ok(set),
                    _ => Err("the partial file is missing or has the wrong size".to_string()),
                })
                .map_err(Some),
        };
        match verdict {
            Ok(set) => return Ok(set),
            Err(Some(reason)) => {
                tracing::warn!("starting {} over: {reason}", self.opts.url);
                self.emit(Event::StartingOver { reason });
            }
            Err(None) => {}
        }
        for p in [&paths.state, &paths.part] {
            match tokio::fs::remove_file(p).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("delete", p, e)),
            }
        }
        Ok(RangeSet::new())
    }

    fn policy(&self) -> SchedulePolicy {
        let o = &self.opts;
        SchedulePolicy {
            max_failures: o.max_failures,
            backoff_base: o.backoff_base,
            backoff_max: o.backoff_max,
            tail_race_after: o.tail_race_after,
            race_min_age: o.tail_race_after.min(Duration::from_secs(1)),
        }
    }

    /// Fetch every missing byte. Returns the body bytes received in this run.
    async fn fetch(
        &self,
        paths: &Paths,
        remote: &RemoteFile,
        have: RangeSet,
        writer: &Arc<dyn PartWriter>,
    ) -> Result<u64, DownloadError> {
        let o = &self.opts;
        let connections = o.connections.max(1);
        let chunk = o
            .chunk_size
            .unwrap_or_else(|| chunk_size(remote.size, connections));
        let sched = Scheduler::new(remote.size, have, chunk, self.policy());
        let ctx = Arc::new(Ctx {
            client: self.client.clone(),
            url: o.url.clone(),
            remote: remote.clone(),
            writer: Arc::clone(writer),
            stall: o.stall_timeout,
            sched: Mutex::new(sched),
            changed: Notify::new(),
            cancels: Mutex::new(HashMap::new()),
            failure: Mutex::new(None),
            stop: AtomicBool::new(false),
            fetched: AtomicU64::new(0),
            events: self.events.clone(),
            live: self.live.clone(),
        });
        self.save(&ctx, paths).await?;

        let mut workers = JoinSet::new();
        for _ in 0..connections {
            workers.spawn(worker(Arc::clone(&ctx), false));
        }
        if self.live.is_some() {
            // One more connection only for ranges a reader waits for: the boot chain and the
            // next bytes ASR needs never queue behind parts of the bulk in flight.
            workers.spawn(worker(Arc::clone(&ctx), true));
        }
        let tick_every = o
            .save_every
            .min(o.progress_every)
            .max(Duration::from_millis(10));
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut meter = RateMeter::new(Duration::from_secs(10));
        let (mut last_save, mut last_progress) = (Instant::now(), Instant::now());
        let mut saved_covered = ctx.lock().done().covered();
        loop {
            tokio::select! {
                joined = workers.join_next() => match joined {
                    None => break,
                    Some(Ok(())) => {}
                    Some(Err(e)) => ctx.fail(AttemptError::Write(io::Error::other(format!("a download task failed: {e}")))),
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    meter.record(now, ctx.fetched.load(Ordering::Relaxed));
                    if now.duration_since(last_progress) >= o.progress_every {
                        last_progress = now;
                        self.emit(Event::Progress(ctx.progress(&meter)));
                    }
                    let covered = ctx.lock().done().covered();
                    if now.duration_since(last_save) >= o.save_every && covered != saved_covered {
                        last_save = now;
                        saved_covered = covered;
                        if let Err(e) = self.save(&ctx, paths).await {
                            ctx.fail(AttemptError::Fatal(e));
                        }
                    }
                }
            }
        }
        // Record everything written, also (especially) when giving up, so the next run resumes.
        let saved = self.save(&ctx, paths).await;
        let failure = ctx.failure.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(e) = failure {
            return Err(match e {
                AttemptError::Write(io) => {
                    let left = remote.size - ctx.lock().done().covered();
                    self.write_error(io, &paths.part, left)
                }
                other => self.attempt_error(other),
            });
        }
        saved?;
        let progress = ctx.progress(&meter);
        self.emit(Event::Progress(progress));
        Ok(ctx.fetched.load(Ordering::Relaxed))
    }

    /// Flush the data, then record what is on disk.
    async fn save(&self, ctx: &Arc<Ctx>, paths: &Paths) -> Result<(), DownloadError> {
        // Snapshot first: every range in it was written before the sync below starts.
        let snapshot = ctx.lock().done().clone();
        let state = SavedState::new(&self.opts.url, &ctx.remote, &snapshot);
        let writer = Arc::clone(&ctx.writer);
        let path = paths.state.clone();
        let left = ctx.remote.size - snapshot.covered();
        tokio::task::spawn_blocking(move || {
            writer.sync()?;
            save_atomic(&path, &state)
        })
        .await
        .map_err(|e| io_err("save", &paths.state, io::Error::other(e)))?
        .map_err(|e| self.write_error(e, &paths.state, left))
    }

    /// Verify the complete `.part` and move it into place.
    async fn finish(
        &self,
        paths: &Paths,
        remote: &RemoteFile,
        fetched: u64,
    ) -> Result<Downloaded, DownloadError> {
        let (sha1, size) = self.hash(&paths.part).await?;
        if size != remote.size {
            return Err(DownloadError::SizeMismatch {
                url: self.opts.url.clone(),
                expected: remote.size,
                got: size,
            });
        }
        if let Some(want) = self.opts.sha1 {
            if want != sha1 {
                for p in [&paths.part, &paths.state] {
                    let _ = tokio::fs::remove_file(p).await;
                }
                return Err(DownloadError::Sha1Mismatch {
                    expected: hex::encode(want),
                    actual: hex::encode(sha1),
                });
            }
        }
        tokio::fs::rename(&paths.part, &paths.done)
            .await
            .map_err(|e| io_err("rename", &paths.part, e))?;
        if let Some(dir) = paths.done.parent() {
            sync_dir(dir).map_err(|e| io_err("sync", dir, e))?;
        }
        let _ = tokio::fs::remove_file(&paths.state).await;
        tracing::info!(
            "downloaded {} ({} bytes, SHA-1 {})",
            paths.done.display(),
            size,
            hex::encode(sha1)
        );
        Ok(Downloaded {
            path: paths.done.clone(),
            size,
            sha1,
            fetched,
            from_cache: false,
        })
    }

    fn write_error(&self, e: io::Error, path: &Path, needed: u64) -> DownloadError {
        if is_disk_full(&e) {
            let dir = self.opts.cache_dir.clone();
            let available = free_space(&dir).unwrap_or(0);
            // If the disk now shows room (other files were deleted meanwhile), the whole rest
            // is still the honest figure to ask for.
            let shortfall = if needed > available {
                needed - available
            } else {
                needed
            };
            return DownloadError::DiskFull {
                dir,
                needed,
                available,
                shortfall,
            };
        }
        io_err("write", path, e)
    }

    fn attempt_error(&self, e: AttemptError) -> DownloadError {
        let url = self.opts.url.clone();
        match e {
            AttemptError::Problem(p) => match p {
                Problem::Html => DownloadError::HtmlInsteadOfFile { url },
                Problem::Busy(status) | Problem::Status(status) => {
                    DownloadError::HttpStatus { url, status }
                }
                Problem::Changed { why } => DownloadError::Changed { url, why },
                Problem::RangeIgnored => DownloadError::NoRangeSupport { url },
                Problem::WrongRange { why } => DownloadError::BadResponse { url, why },
                Problem::Short { .. } => DownloadError::Network {
                    url,
                    reason: "the connection kept breaking off".into(),
                },
            },
            AttemptError::Network(reason) => DownloadError::Network { url, reason },
            AttemptError::Untrusted(reason) => DownloadError::Untrusted { url, reason },
            AttemptError::Stalled => DownloadError::Stalled {
                url,
                secs: self.opts.stall_timeout.as_secs().max(1),
            },
            AttemptError::Write(e) => self.write_error(e, &self.opts.cache_dir, 0),
            AttemptError::Fatal(d) => d,
            AttemptError::Cancelled => DownloadError::Network {
                url,
                reason: "the download was cancelled".into(),
            },
        }
    }
}

struct Paths {
    done: PathBuf,
    part: PathBuf,
    state: PathBuf,
    lock: PathBuf,
}

fn io_err(action: &'static str, path: &Path, source: io::Error) -> DownloadError {
    DownloadError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn response_head(r: &reqwest::Response) -> ResponseHead {
    let h = r.headers();
    let s = |name: reqwest::header::HeaderName| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    ResponseHead {
        status: r.status().as_u16(),
        content_type: s(reqwest::header::CONTENT_TYPE),
        content_length: s(reqwest::header::CONTENT_LENGTH).and_then(|v| v.trim().parse().ok()),
        content_range: s(reqwest::header::CONTENT_RANGE),
        etag: s(reqwest::header::ETAG),
        last_modified: s(reqwest::header::LAST_MODIFIED),
    }
}

/// Why one attempt (request) ended early.
#[derive(Debug)]
enum AttemptError {
    Cancelled,
    Stalled,
    Network(String),
    Problem(Problem),
    /// The TLS certificate is not trusted: retrying cannot help.
    Untrusted(String),
    Write(io::Error),
    Fatal(DownloadError),
}

/// Is a rustls certificate rejection anywhere in the chain? (io::Error hides its payload from
/// `source()`, so it is unwrapped by hand.)
fn is_untrusted(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let inner = err
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .map(|b| b as &(dyn std::error::Error + 'static));
        for candidate in [Some(err), inner].into_iter().flatten() {
            if matches!(
                candidate.downcast_ref::<rustls::Error>(),
                Some(rustls::Error::InvalidCertificate(_))
            ) {
                return true;
            }
            // Layers between reqwest and rustls may re-wrap the error as text; rustls words
            // every certificate rejection this way.
            if candidate
                .to_string()
                .starts_with("invalid peer certificate")
            {
                return true;
            }
        }
        cur = inner.and_then(|i| i.source()).or_else(|| err.source());
    }
    false
}

impl AttemptError {
    fn network(e: reqwest::Error) -> AttemptError {
        // The innermost cause names what actually broke (refused, reset, TLS, DNS).
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg = s.to_string();
            src = s.source();
        }
        if is_untrusted(&e) {
            return AttemptError::Untrusted(msg);
        }
        AttemptError::Network(msg)
    }

    fn describe(&self) -> String {
        match self {
            AttemptError::Cancelled => "cancelled".into(),
            AttemptError::Stalled => "no data (stalled)".into(),
            AttemptError::Network(m) | AttemptError::Untrusted(m) => m.clone(),
            AttemptError::Problem(p) => match p {
                Problem::Html => "the CDN sent an HTML page".into(),
                Problem::Busy(s) | Problem::Status(s) => format!("HTTP {s}"),
                Problem::Changed { why } => why.clone(),
                Problem::RangeIgnored => "range ignored".into(),
                Problem::WrongRange { why } => why.clone(),
                Problem::Short { expected, got } => {
                    format!("body ended after {got} of {expected} bytes")
                }
            },
            AttemptError::Write(e) => e.to_string(),
            AttemptError::Fatal(e) => e.to_string(),
        }
    }
}

/// State shared by the connections of one download.
struct Ctx {
    client: reqwest::Client,
    url: String,
    remote: RemoteFile,
    writer: Arc<dyn PartWriter>,
    stall: Duration,
    sched: Mutex<Scheduler>,
    /// Signalled whenever the scheduler's state changes (a waiting connection may have work).
    changed: Notify,
    cancels: Mutex<HashMap<AttemptId, watch::Sender<bool>>>,
    failure: Mutex<Option<AttemptError>>,
    stop: AtomicBool,
    fetched: AtomicU64,
    events: Option<EventSink>,
    live: Option<Arc<Live>>,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections never panic mid-update (no user code runs under these locks), so a
    // poisoned lock still holds consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ctx {
    fn lock(&self) -> MutexGuard<'_, Scheduler> {
        relock(&self.sched)
    }

    fn emit(&self, e: Event) {
        if let Some(s) = &self.events {
            s(&e);
        }
    }

    fn progress(&self, meter: &RateMeter) -> Progress {
        let s = self.lock();
        let done = s.done().covered();
        Progress {
            done,
            total: s.total(),
            bytes_per_sec: meter.rate(),
            eta: meter.eta(s.total() - done),
            connections: s.active_attempts(),
        }
    }

    /// Stop the whole download; the first failure is the one reported.
    fn fail(&self, e: AttemptError) {
        {
            let mut f = relock(&self.failure);
            if f.is_none() {
                *f = Some(e);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        for tx in relock(&self.cancels).values() {
            let _ = tx.send(true);
        }
        self.changed.notify_waiters();
    }

    fn cancel(&self, ids: &[AttemptId]) {
        let c = relock(&self.cancels);
        for id in ids {
            if let Some(tx) = c.get(id) {
                let _ = tx.send(true);
            }
        }
    }
}

/// One connection: ask the scheduler for work until the download is finished or stopped.
/// An `urgent` connection only fetches ranges readers wait for.
async fn worker(ctx: Arc<Ctx>, urgent: bool) {
    loop {
        if ctx.stop.load(Ordering::SeqCst) {
            return;
        }
        let notified = ctx.changed.notified();
        let kicked = ctx.live.as_ref().map(|l| l.kick.notified());
        let next = {
            let mut sched = ctx.lock();
            if let Some(live) = &ctx.live {
                for want in live.take_wanted() {
                    sched.prioritize(want);
                }
            }
            if urgent {
                sched.next_urgent(Instant::now())
            } else {
                sched.next(Instant::now())
            }
        };
        match next {
            Next::Finished => {
                ctx.changed.notify_waiters();
                return;
            }
            Next::Wait { until } => {
                // Also wake periodically: racing decisions depend on time passing.
                let mut wait = Duration::from_millis(200);
                if let Some(t) = until {
                    wait = wait.min(t.saturating_duration_since(Instant::now()));
                }
                match kicked {
                    Some(kicked) => {
                        let _ = tokio::time::timeout(wait, async {
                            tokio::select! {
                                _ = notified => {}
                                _ = kicked => {}
                            }
                        })
                        .await;
                    }
                    None => {
                        let _ = tokio::time::timeout(wait, notified).await;
                    }
                }
            }
            Next::Fetch { id, range, race } => {
                if race {
                    tracing::info!(
                        "racing bytes {}-{} on a new connection",
                        range.start,
                        range.end
                    );
                    ctx.emit(Event::Racing { range });
                }
                let (tx, rx) = watch::channel(false);
                relock(&ctx.cancels).insert(id, tx);
                let result = attempt(&ctx, id, range, rx).await;
                relock(&ctx.cancels).remove(&id);
                let end = match &result {
                    Ok(()) => AttemptEnd::Completed,
                    Err(AttemptError::Cancelled) => AttemptEnd::Cancelled,
                    Err(AttemptError::Stalled) => AttemptEnd::Failed { backoff: false },
                    Err(_) => AttemptEnd::Failed { backoff: true },
                };
                let after = ctx.lock().on_end(id, end, Instant::now());
                ctx.cancel(&after.cancel);
                if let Err(e) = result {
                    let fatal = match &e {
                        AttemptError::Cancelled => false,
                        AttemptError::Stalled | AttemptError::Network(_) => false,
                        AttemptError::Problem(p) => !p.is_transient(),
                        AttemptError::Untrusted(_)
                        | AttemptError::Write(_)
                        | AttemptError::Fatal(_) => true,
                    };
                    if fatal || after.give_up {
                        ctx.fail(e);
                    } else if !matches!(e, AttemptError::Cancelled) {
                        tracing::info!(
                            "bytes {}-{}: {}; retrying",
                            range.start,
                            range.end,
                            e.describe()
                        );
                        ctx.emit(Event::Retrying {
                            offset: range.start,
                            reason: e.describe(),
                        });
                    }
                }
                ctx.changed.notify_waiters();
            }
        }
    }
}

/// One range request, streamed to disk.
async fn attempt(
    ctx: &Ctx,
    id: AttemptId,
    range: ByteRange,
    mut cancel: watch::Receiver<bool>,
) -> Result<(), AttemptError> {
    let request = ctx
        .client
        .get(&ctx.url)
        .header(
            reqwest::header::RANGE,
            format!("bytes={}-{}", range.start, range.end - 1),
        )
        .send();
    let resp = tokio::select! {
        _ = cancel.wait_for(|c| *c) => return Err(AttemptError::Cancelled),
        r = tokio::time::timeout(ctx.stall, request) => r
            .map_err(|_| AttemptError::Stalled)?
            .map_err(AttemptError::network)?,
    };
    check_part(&response_head(&resp), range, &ctx.remote).map_err(AttemptError::Problem)?;
    let mut resp = resp;
    let mut buf: Vec<u8> = Vec::with_capacity(WRITE_BUF);
    // File offset of buf[0].
    let mut at = range.start;
    let mut sniffed = false;
    let end = loop {
        let next = tokio::select! {
            _ = cancel.wait_for(|c| *c) => break Err(AttemptError::Cancelled),
            r = tokio::time::timeout(ctx.stall, resp.chunk()) => r,
        };
        let chunk = match next {
            Err(_) => break Err(AttemptError::Stalled),
            Ok(Err(e)) => break Err(AttemptError::network(e)),
            Ok(Ok(None)) => break Ok(()),
            Ok(Ok(Some(c))) => c,
        };
        ctx.fetched.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        let room = (range.end - at) as usize - buf.len();
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if !sniffed && (buf.len() >= 16 || at + buf.len() as u64 == range.end) {
            sniffed = true;
            if looks_like_html(&buf) {
                return Err(AttemptError::Problem(Problem::Html));
            }
        }
        if buf.len() >= WRITE_BUF {
            at = flush(ctx, id, &mut buf, at).await?;
        }
    };
    // Keep what arrived before a break-off: the retry continues after it.
    if sniffed && !buf.is_empty() {
        at = flush(ctx, id, &mut buf, at).await?;
    }
    end?;
    if at < range.end {
        return Err(AttemptError::Problem(Problem::Short {
            expected: range.len(),
            got: at - range.start,
        }));
    }
    Ok(())
}

/// Write `buf` at `at` and report it; returns the offset after it.
async fn flush(ctx: &Ctx, id: AttemptId, buf: &mut Vec<u8>, at: u64) -> Result<u64, AttemptError> {
    let data = std::mem::take(buf);
    let writer = Arc::clone(&ctx.writer);
    let (data, r) = tokio::task::spawn_blocking(move || {
        let r = writer.write_at(&data, at);
        (data, r)
    })
    .await
    .map_err(|e| AttemptError::Write(io::Error::other(e)))?;
    r.map_err(AttemptError::Write)?;
    let written = ByteRange::new(at, at + data.len() as u64);
    ctx.lock().on_progress(id, written);
    if let Some(live) = &ctx.live {
        live.arrived(written);
    }
    *buf = data;
    buf.clear();
    Ok(written.end)
}
