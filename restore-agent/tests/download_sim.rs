//! The downloader against the simulated CDN over 127.0.0.1: correctness, resume, faults,
//! shared-cache locking. Every download's bytes are checked by SHA-1 against the generator, and
//! the CDN's log of served ranges shows what was fetched twice.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mac_sim::services::cdn::{
    bytes_served_twice, generated_sha1, overlap, Cdn, CdnConfig, CdnFile, Fault,
};
use mac_sim::services::pki::TestPki;
use restore_agent::download::storage::{FileWriter, PartWriter};
use restore_agent::download::{DownloadError, DownloadOptions, Downloader, Event};
use restore_agent::http::HttpConfig;

const MIB: u64 = 1 << 20;
const NAME: &str = "UniversalMac_26.2_25C56_Restore.ipsw";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("macrescue-dl-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(size: u64, seed: u64, rate: Option<u64>, faults: Vec<Fault>) -> CdnConfig {
    CdnConfig {
        files: vec![CdnFile::generated(NAME, size, seed)],
        rate,
        faults,
    }
}

async fn start(cfg: CdnConfig) -> Cdn {
    Cdn::start("127.0.0.1:0".parse().unwrap(), None, cfg)
        .await
        .unwrap()
}

/// Short timings so fault tests finish in well under a second each.
fn options(url: &str, cache: &Path) -> DownloadOptions {
    let mut o = DownloadOptions::new(url, cache);
    o.connections = 4;
    o.chunk_size = Some(512 * 1024);
    o.stall_timeout = Duration::from_millis(400);
    o.backoff_base = Duration::from_millis(10);
    o.backoff_max = Duration::from_millis(100);
    o.max_failures = 4;
    o.save_every = Duration::from_millis(20);
    o.progress_every = Duration::from_millis(20);
    o.lock_poll = Duration::from_millis(20);
    o
}

type Events = Arc<Mutex<Vec<Event>>>;

fn downloader(o: DownloadOptions, http: &HttpConfig) -> (Downloader, Events) {
    let events: Events = Arc::default();
    let e2 = Arc::clone(&events);
    let d = Downloader::new(http, o)
        .unwrap()
        .on_event(Arc::new(move |e: &Event| {
            e2.lock().unwrap().push(e.clone())
        }));
    (d, events)
}

#[test]
fn downloads_a_whole_file_over_http_with_parallel_ranges() {
    let rt = runtime();
    rt.block_on(async {
        let size = 8 * MIB + 12345;
        let cdn = start(config(size, 1, None, vec![])).await;
        let dir = scratch("whole");
        let mut o = options(&cdn.url(NAME), &dir);
        o.sha1 = Some(generated_sha1(1, size));
        let (d, events) = downloader(o, &HttpConfig::default());
        let done = d.run().await.unwrap();
        assert_eq!(done.path, dir.join(NAME));
        assert_eq!(done.size, size);
        assert_eq!(done.sha1, generated_sha1(1, size));
        assert_eq!(done.fetched, size);
        assert!(!done.from_cache);
        assert_eq!(std::fs::metadata(&done.path).unwrap().len(), size);
        assert!(!dir.join(format!("{NAME}.part")).exists());
        assert!(!dir.join(format!("{NAME}.state")).exists());
        let served = cdn.served(NAME);
        assert_eq!(bytes_served_twice(&served), 0);
        assert_eq!(served.len(), 17, "one request per 512 KiB part");
        assert!(
            cdn.totals().connections >= 2,
            "parts used parallel connections"
        );
        let last = events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Event::Progress(p) => Some(*p),
                _ => None,
            })
            .next_back()
            .unwrap();
        assert_eq!((last.done, last.total), (size, size));

        // A second download of the same file is served from the cache after a SHA-1 check.
        let mut o = options(&cdn.url(NAME), &dir);
        o.sha1 = Some(generated_sha1(1, size));
        let (d, _) = downloader(o, &HttpConfig::default());
        let again = d.run().await.unwrap();
        assert!(again.from_cache);
        assert_eq!(again.fetched, 0);
        assert_eq!(cdn.totals().body_bytes, size);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn downloads_over_https_with_an_extra_ca() {
    let rt = runtime();
    rt.block_on(async {
        let size = 3 * MIB + 7;
        let pki = TestPki::generate(&[]).unwrap();
        let cdn = Cdn::start(
            "127.0.0.1:0".parse().unwrap(),
            Some(pki.server_config.clone()),
            config(size, 2, None, vec![]),
        )
        .await
        .unwrap();
        let dir = scratch("https");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        let url = cdn.url(NAME);
        assert!(url.starts_with("https://"));

        // Without the test CA the certificate is refused at once: retrying cannot fix trust.
        let (d, events) = downloader(options(&url, &dir.join("cache")), &HttpConfig::default());
        let e = d.run().await.unwrap_err();
        assert!(matches!(e, DownloadError::Untrusted { .. }), "{e}");
        assert!(e.to_string().contains("--ca-file"), "{e}");
        assert!(events.lock().unwrap().is_empty(), "no retries");

        let http = HttpConfig {
            extra_ca: Some(ca),
            ..HttpConfig::default()
        };
        let mut o = options(&url, &dir.join("cache"));
        o.sha1 = Some(generated_sha1(2, size));
        let (d, _) = downloader(o, &http);
        let done = d.run().await.unwrap();
        assert_eq!(done.sha1, generated_sha1(2, size));
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn a_dropped_connection_resumes_where_it_stopped() {
    let rt = runtime();
    rt.block_on(async {
        let size = 4 * MIB;
        let faults = vec![
            Fault::DropAt {
                offset: MIB + 100_000,
                times: 1,
            },
            Fault::DropEvery {
                nth: 3,
                after: 200_000,
            },
        ];
        let cdn = start(config(size, 3, None, faults)).await;
        let dir = scratch("drop");
        let mut o = options(&cdn.url(NAME), &dir);
        o.sha1 = Some(generated_sha1(3, size));
        o.max_failures = 20;
        let (d, events) = downloader(o, &HttpConfig::default());
        let done = d.run().await.unwrap();
        assert_eq!(done.sha1, generated_sha1(3, size));
        assert_eq!(cdn.fired(0), 1);
        let served = cdn.served(NAME);
        // The cut response sent bytes up to the drop; the retry starts exactly there.
        let cut = served
            .iter()
            .find(|s| s.end == MIB + 100_000)
            .expect("a response ends at the drop");
        assert_eq!(cut.start, MIB);
        assert!(
            served.iter().any(|s| s.start == MIB + 100_000),
            "{served:?}"
        );
        assert_eq!(bytes_served_twice(&served), 0, "{served:?}");
        let retries = events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, Event::Retrying { .. }))
            .count();
        assert!(retries >= 2, "{retries}");
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn a_stalled_connection_is_cancelled_and_the_part_fetched_again() {
    let rt = runtime();
    rt.block_on(async {
        let size = 2 * MIB;
        let faults = vec![Fault::StallAt {
            offset: 700_000,
            pause: None,
            times: 1,
        }];
        let cdn = start(config(size, 4, None, faults)).await;
        let dir = scratch("stall");
        let mut o = options(&cdn.url(NAME), &dir);
        o.sha1 = Some(generated_sha1(4, size));
        let (d, events) = downloader(o, &HttpConfig::default());
        let done = d.run().await.unwrap();
        assert_eq!(done.sha1, generated_sha1(4, size));
        assert_eq!(cdn.fired(0), 1);
        let served = cdn.served(NAME);
        assert!(served.iter().any(|s| s.start == 700_000), "{served:?}");
        assert!(events.lock().unwrap().iter().any(
            |e| matches!(e, Event::Retrying { offset: 512_000.., reason } if reason.contains("stalled"))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn the_slowest_part_is_raced_near_the_end() {
    let rt = runtime();
    rt.block_on(async {
        let size = 2 * MIB;
        // The second GET crawls at 32 KiB/s: 16 s for its 512 KiB if nobody races it.
        let faults = vec![Fault::Slow {
            nth: 2,
            rate: 32 * 1024,
        }];
        let cdn = start(config(size, 5, None, faults)).await;
        let dir = scratch("race");
        let mut o = options(&cdn.url(NAME), &dir);
        o.sha1 = Some(generated_sha1(5, size));
        o.stall_timeout = Duration::from_secs(30);
        o.tail_race_after = Duration::from_millis(300);
        let (d, events) = downloader(o, &HttpConfig::default());
        let done = d.run().await.unwrap();
        assert_eq!(done.sha1, generated_sha1(5, size));
        let raced: Vec<_> = events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Event::Racing { range } => Some(*range),
                _ => None,
            })
            .collect();
        assert_eq!(raced.len(), 1, "{raced:?}");
        let served = cdn.served(NAME);
        assert_eq!(served.len(), 5, "four parts and one racer: {served:?}");
        // The racer fetched the slow part's rest; the slow response was cut off before its end.
        // How many bytes the slow response got out before the race is timing (none at all on
        // an idle machine), so it may have started exactly where the racer did.
        let r = raced[0];
        assert!(
            served.iter().any(|s| s.start == r.start && s.end == r.end),
            "{served:?}"
        );
        assert!(
            served
                .iter()
                .any(|s| s.start <= r.start && s.end >= r.start && s.end < r.end),
            "{served:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn corrupted_bytes_fail_the_sha1_check_and_are_deleted() {
    let rt = runtime();
    rt.block_on(async {
        let size = MIB + 3;
        let faults = vec![Fault::WrongBytes {
            offset: 600_000,
            len: 10,
        }];
        let cdn = start(config(size, 6, None, faults)).await;
        let dir = scratch("corrupt");
        let mut o = options(&cdn.url(NAME), &dir);
        o.sha1 = Some(generated_sha1(6, size));
        let (d, _) = downloader(o, &HttpConfig::default());
        let e = d.run().await.unwrap_err();
        match &e {
            DownloadError::Sha1Mismatch { expected, actual } => {
                assert_eq!(*expected, hex::encode(generated_sha1(6, size)));
                assert_ne!(expected, actual);
            }
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("has been deleted"), "{e}");
        for f in [
            NAME.to_string(),
            format!("{NAME}.part"),
            format!("{NAME}.state"),
        ] {
            assert!(!dir.join(&f).exists(), "{f} left behind");
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn an_html_page_with_status_200_is_named() {
    let rt = runtime();
    rt.block_on(async {
        let cdn = start(config(MIB, 7, None, vec![Fault::Html200 { every: 0 }])).await;
        let dir = scratch("html");
        let mut o = options(&cdn.url(NAME), &dir);
        o.max_failures = 1;
        let (d, _) = downloader(o, &HttpConfig::default());
        let e = d.run().await.unwrap_err();
        assert!(matches!(e, DownloadError::HtmlInsteadOfFile { .. }), "{e}");
        assert!(e.to_string().contains("web page"), "{e}");
        assert_eq!(cdn.totals().requests, 2, "tried twice");
        assert_eq!(cdn.fired(0), 2);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn occasional_html_pages_and_503s_are_retried() {
    let rt = runtime();
    rt.block_on(async {
        let size = 3 * MIB;
        let faults = vec![Fault::Html200 { every: 3 }, Fault::Status503 { count: 3 }];
        let cdn = start(config(size, 8, None, faults)).await;
        let dir = scratch("retry");
        let mut o = options(&cdn.url(NAME), &dir);
        o.sha1 = Some(generated_sha1(8, size));
        o.max_failures = 10;
        let (d, _) = downloader(o, &HttpConfig::default());
        let done = d.run().await.unwrap();
        assert_eq!(done.sha1, generated_sha1(8, size));
        assert!(cdn.fired(0) >= 2, "html pages served: {}", cdn.fired(0));
        assert_eq!(cdn.fired(1), 3);
        // The HTML bodies never reached the file (the SHA-1 above), and no byte of the file
        // was fetched twice.
        assert_eq!(bytes_served_twice(&cdn.served(NAME)), 0);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn a_missing_file_is_a_plain_404() {
    let rt = runtime();
    rt.block_on(async {
        let cdn = start(config(MIB, 9, None, vec![])).await;
        let dir = scratch("404");
        let (d, _) = downloader(options(&cdn.url("nope.ipsw"), &dir), &HttpConfig::default());
        let e = d.run().await.unwrap_err();
        assert!(
            matches!(e, DownloadError::HttpStatus { status: 404, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("refresh the catalog"), "{e}");
        assert_eq!(cdn.totals().requests, 1, "a 404 is not retried");
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn two_concurrent_downloads_of_one_file_fetch_it_once() {
    let rt = runtime();
    rt.block_on(async {
        let size = 3 * MIB;
        // Slow enough that the second downloader certainly starts while the first runs.
        let cdn = start(config(size, 10, Some(2 * MIB), vec![])).await;
        let dir = scratch("twice");
        let mk = || {
            let mut o = options(&cdn.url(NAME), &dir);
            o.sha1 = Some(generated_sha1(10, size));
            downloader(o, &HttpConfig::default())
        };
        let ((a, ea), (b, eb)) = (mk(), mk());
        let (ra, rb) = tokio::join!(a.run(), b.run());
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra.path, rb.path);
        assert_eq!(ra.sha1, rb.sha1);
        assert_eq!(
            u8::from(ra.from_cache) + u8::from(rb.from_cache),
            1,
            "exactly one downloaded"
        );
        assert_eq!(cdn.totals().body_bytes, size);
        let waited = |e: &Events| {
            e.lock()
                .unwrap()
                .iter()
                .any(|e| matches!(e, Event::WaitingForOtherDownload { .. }))
        };
        assert!(waited(&ea) ^ waited(&eb));
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// Writes through to the real file until `budget` bytes, then reports a full disk.
struct FillingWriter {
    inner: FileWriter,
    budget: AtomicU64,
    accepted: Arc<AtomicU64>,
}

impl PartWriter for FillingWriter {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let n = buf.len() as u64;
        let ok = self
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(n))
            .is_ok();
        if !ok {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        self.inner.write_at(buf, offset)?;
        self.accepted.fetch_add(n, Ordering::SeqCst);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
}

#[test]
fn a_full_disk_is_reported_and_the_download_resumes_afterwards() {
    let rt = runtime();
    rt.block_on(async {
        let size = 6 * MIB;
        let cdn = start(config(size, 11, None, vec![])).await;
        let dir = scratch("full");
        let mut o = options(&cdn.url(NAME), &dir);
        o.sha1 = Some(generated_sha1(11, size));
        let accepted = Arc::new(AtomicU64::new(0));
        let (d, _) = downloader(o.clone(), &HttpConfig::default());
        let acc = Arc::clone(&accepted);
        let d = d.with_writer(Arc::new(move |path: &Path, size: u64| {
            Ok(Arc::new(FillingWriter {
                inner: FileWriter::open(path, size)?,
                budget: AtomicU64::new(2 * MIB),
                accepted: Arc::clone(&acc),
            }) as Arc<dyn PartWriter>)
        }));
        let e = d.run().await.unwrap_err();
        assert!(matches!(e, DownloadError::DiskFull { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("the data partition is full: free "),
            "{msg}"
        );
        assert!(msg.contains("GiB"), "{msg}");
        let first = cdn.take_served(NAME);

        // Space freed, the station runs the download again: only the rest is fetched.
        let (d, events) = downloader(o, &HttpConfig::default());
        let done = d.run().await.unwrap();
        assert_eq!(done.sha1, generated_sha1(11, size));
        let have = events
            .lock()
            .unwrap()
            .iter()
            .find_map(|e| match e {
                Event::Resuming { have, .. } => Some(*have),
                _ => None,
            })
            .expect("resumed");
        let accepted = accepted.load(Ordering::SeqCst);
        assert!(accepted > MIB && accepted <= 2 * MIB, "{accepted}");
        assert_eq!(
            have, accepted,
            "exactly the bytes written before the disk filled"
        );
        let second = cdn.take_served(NAME);
        let refetched = overlap(&first, &second);
        // Only bytes that arrived but could not be written are fetched again.
        let first_total: u64 = first.iter().map(|s| s.end - s.start).sum();
        assert_eq!(refetched, first_total - accepted, "{first:?} / {second:?}");
        assert_eq!(done.fetched, size - accepted);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn a_changed_file_on_the_server_starts_over() {
    let rt = runtime();
    rt.block_on(async {
        let size = 2 * MIB;
        let cdn = start(config(size, 12, None, vec![])).await;
        let dir = scratch("changed");
        let o = options(&cdn.url(NAME), &dir);
        let (d, _) = downloader(o.clone(), &HttpConfig::default());
        let d = d.with_writer(Arc::new(|path: &Path, size: u64| {
            Ok(Arc::new(FillingWriter {
                inner: FileWriter::open(path, size)?,
                budget: AtomicU64::new(MIB),
                accepted: Arc::default(),
            }) as Arc<dyn PartWriter>)
        }));
        assert!(d.run().await.is_err());
        // Pretend the CDN now has another build under the same name.
        let state = dir.join(format!("{NAME}.state"));
        let text = std::fs::read_to_string(&state).unwrap();
        assert!(text.contains("gen-c-200000"), "{text}");
        std::fs::write(&state, text.replace("gen-c-200000", "gen-old")).unwrap();
        cdn.take_served(NAME);

        let (d, events) = downloader(o, &HttpConfig::default());
        let done = d.run().await.unwrap();
        assert_eq!(done.sha1, generated_sha1(12, size));
        assert!(events
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, Event::StartingOver { reason } if reason.contains("ETag"))));
        assert_eq!(done.fetched, size);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn a_file_larger_than_the_free_space_is_refused_before_reserving_anything() {
    let rt = runtime();
    rt.block_on(async {
        // 1 PiB: no test machine has that free, and generated content costs the CDN nothing.
        let size = 1 << 50;
        let cdn = start(config(size, 13, None, vec![])).await;
        let dir = scratch("huge");
        let (d, _) = downloader(options(&cdn.url(NAME), &dir), &HttpConfig::default());
        let e = d.run().await.unwrap_err();
        match &e {
            DownloadError::DiskFull {
                needed, shortfall, ..
            } => {
                assert_eq!(*needed, size);
                assert!(*shortfall > 0 && *shortfall <= size);
            }
            other => panic!("{other}"),
        }
        assert!(e
            .to_string()
            .starts_with("the data partition is full: free "));
        assert!(!dir.join(format!("{NAME}.part")).exists());
        assert_eq!(cdn.totals().body_bytes, 0);
        let _ = std::fs::remove_dir_all(&dir);
    });
}
