//! The ZIP reader over HTTP range requests: a real archive (stored + deflated entries, written
//! by the independent `zip` crate) served by a small range server on 127.0.0.1 that counts
//! requests, drops connections on demand and can swap the file mid-read.

use std::io::{Cursor, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mac_sim::services::http::{handler, Request, Responder, Server};
use mac_sim::services::pki::TestPki;
use restore_agent::http::HttpConfig;
use restore_agent::ipsw::{Ipsw, RandomAccess, RemoteConfig, RemoteError, RemoteFile, ZipError};
use zip::write::SimpleFileOptions;
use zip::CompressionMethod;

const BLOCK: usize = 64 << 10;
const OS_IMAGE: &str = "090-12345-678.dmg";
const OS_LEN: usize = 3 << 20;

/// Deterministic, incompressible-ish bytes.
fn pseudo(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

struct Archive {
    bytes: Vec<u8>,
    entries: Vec<(String, Vec<u8>)>,
}

fn archive(seed: u32) -> Archive {
    let deflated = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    let stored = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    let manifest = format!(
        "<?xml version=\"1.0\"?><plist version=\"1.0\"><dict><key>ProductBuildVersion</key><string>25C56</string>{}</dict></plist>",
        "<key>x</key><string>padding</string>".repeat(20_000)
    )
    .into_bytes();
    let entries = vec![
        ("BuildManifest.plist".to_string(), manifest),
        (OS_IMAGE.to_string(), pseudo(OS_LEN, seed)),
        (
            "Firmware/dfu/iBSS.j274.RELEASE.im4p".to_string(),
            pseudo(300_000, seed + 1),
        ),
        ("Restore.plist".to_string(), b"<plist/>".to_vec()),
    ];
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, data) in &entries {
        let options = if name == OS_IMAGE || name.ends_with(".im4p") {
            stored
        } else {
            deflated
        };
        writer.start_file(name.as_str(), options).unwrap();
        writer.write_all(data).unwrap();
    }
    let bytes = writer.finish().unwrap().into_inner();
    Archive { bytes, entries }
}

/// What the range server serves, and its faults.
struct Served {
    data: Arc<Vec<u8>>,
    etag: String,
}

struct RangeServer {
    server: Server,
    served: Arc<Mutex<Served>>,
    gets: Arc<AtomicU64>,
    heads: Arc<AtomicU64>,
    /// The next N range answers are cut in the middle of the body.
    drops: Arc<AtomicU64>,
    ranges: Arc<Mutex<Vec<(u64, u64)>>>,
    _pki: Option<TestPki>,
}

impl RangeServer {
    fn url(&self) -> String {
        format!("{}/UniversalMac_26.2_25C56_Restore.ipsw", self.server.url())
    }

    fn replace(&self, data: Vec<u8>, etag: &str) {
        let mut s = self.served.lock().unwrap();
        s.data = Arc::new(data);
        s.etag = etag.to_string();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Ranges,
    /// Ignores Range and always sends the whole file.
    NoRanges,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn start(rt: &tokio::runtime::Runtime, data: Vec<u8>, mode: Mode, tls: bool) -> RangeServer {
    let served = Arc::new(Mutex::new(Served {
        data: Arc::new(data),
        etag: "\"v1\"".into(),
    }));
    let gets = Arc::new(AtomicU64::new(0));
    let heads = Arc::new(AtomicU64::new(0));
    let drops = Arc::new(AtomicU64::new(0));
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let (s, g, h, d, r) = (
        served.clone(),
        gets.clone(),
        heads.clone(),
        drops.clone(),
        ranges.clone(),
    );
    let handle = handler(move |req: Request, resp: Responder| {
        let (data, etag) = {
            let s = s.lock().unwrap();
            (Arc::clone(&s.data), s.etag.clone())
        };
        if req.method == "HEAD" {
            h.fetch_add(1, Ordering::SeqCst);
        } else {
            g.fetch_add(1, Ordering::SeqCst);
        }
        let drop_this = req.method == "GET"
            && d.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        let range = req.header("range").and_then(parse_range);
        if let Some(range) = range {
            r.lock().unwrap().push(range);
        }
        async move { answer(req, resp, &data, etag, range, mode, drop_this).await }
    });
    let pki = tls.then(|| TestPki::generate(&[]).unwrap());
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = rt
        .block_on(Server::start(
            addr,
            pki.as_ref().map(|p| p.server_config.clone()),
            handle,
        ))
        .unwrap();
    RangeServer {
        server,
        served,
        gets,
        heads,
        drops,
        ranges,
        _pki: pki,
    }
}

fn parse_range(v: &str) -> Option<(u64, u64)> {
    let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

async fn answer(
    req: Request,
    mut resp: Responder,
    data: &[u8],
    etag: String,
    range: Option<(u64, u64)>,
    mode: Mode,
    drop_this: bool,
) -> std::io::Result<()> {
    let len = data.len() as u64;
    let mut headers = vec![("ETag", etag)];
    if mode == Mode::Ranges {
        headers.push(("Accept-Ranges", "bytes".into()));
    }
    if req.method == "HEAD" {
        resp.head(200, &headers, Some(len)).await?;
        return resp.finish().await;
    }
    let (status, body) = match (range, mode) {
        (Some((a, b)), Mode::Ranges) => {
            if a > b || b >= len {
                headers.push(("Content-Range", format!("bytes */{len}")));
                return resp.send(416, &headers, b"").await;
            }
            headers.push(("Content-Range", format!("bytes {a}-{b}/{len}")));
            (206, &data[a as usize..=b as usize])
        }
        _ => (200, data),
    };
    if drop_this {
        resp.head(status, &headers, Some(body.len() as u64)).await?;
        resp.body(&body[..body.len() / 2]).await?;
        resp.abort();
        return Ok(());
    }
    resp.send(status, &headers, body).await
}

fn config() -> RemoteConfig {
    RemoteConfig {
        block_size: BLOCK,
        cache_blocks: 8,
        read_ahead: 2,
        max_attempts: 3,
        retry_delay: Duration::from_millis(5),
        http: HttpConfig {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            ..HttpConfig::default()
        },
    }
}

#[test]
fn the_central_directory_is_read_with_few_requests_and_every_entry_matches() {
    let rt = runtime();
    let a = archive(1);
    assert!(a.bytes.len() > 50 * BLOCK, "the archive spans many blocks");
    let srv = start(&rt, a.bytes.clone(), Mode::Ranges, false);
    let remote = RemoteFile::open(&srv.url(), config()).unwrap();
    assert_eq!(remote.len(), a.bytes.len() as u64);
    assert_eq!(remote.etag(), Some("\"v1\""));

    let ipsw = Ipsw::open(remote).unwrap();
    let stats = ipsw.archive().source().stats();
    // HEAD + one range for the tail (which holds this small directory).
    assert_eq!(srv.heads.load(Ordering::SeqCst), 1);
    assert!(stats.requests <= 2, "{stats:?}");
    assert_eq!(ipsw.archive().entries().len(), a.entries.len());

    for (name, data) in &a.entries {
        let entry = ipsw.archive().require(name).unwrap();
        let got = ipsw.archive().read_to_vec(entry, u64::MAX).unwrap();
        assert_eq!(&got, data, "{name}");
    }
    let manifest = ipsw.build_manifest().unwrap();
    assert_eq!(manifest, a.entries[0].1);

    // Nothing but the tail, the entries and their headers was fetched: each byte about once.
    let stats = ipsw.archive().source().stats();
    assert_eq!(stats.retries, 0);
    assert!(
        stats.bytes <= a.bytes.len() as u64 + 4 * BLOCK as u64,
        "{stats:?} for {} bytes",
        a.bytes.len()
    );
    assert_eq!(srv.gets.load(Ordering::SeqCst) + 1, stats.requests);
}

#[test]
fn a_stored_entry_is_random_access_at_any_offset() {
    let rt = runtime();
    let a = archive(2);
    let srv = start(&rt, a.bytes.clone(), Mode::Ranges, false);
    let ipsw = Ipsw::open(RemoteFile::open(&srv.url(), config()).unwrap()).unwrap();
    let entry = ipsw.archive().require(OS_IMAGE).unwrap();
    let stored = ipsw.archive().stored(entry).unwrap();
    let os = &a.entries[1].1;
    assert_eq!(stored.len(), OS_LEN as u64);
    for (offset, len) in [
        (0usize, 10usize),
        (OS_LEN - 7, 7),
        (BLOCK - 3, 6),
        (5 * BLOCK + 17, 3 * BLOCK),
        (1_000_003, 1),
        // Larger than half the cache: bypasses it.
        (100, 5 * BLOCK + 1),
    ] {
        let mut buf = vec![0; len];
        stored.read_at(offset as u64, &mut buf).unwrap();
        assert_eq!(buf, os[offset..offset + len], "{offset}+{len}");
    }
    let mut buf = [0u8; 8];
    let err = stored.read_at(OS_LEN as u64 - 4, &mut buf).unwrap_err();
    assert!(err.to_string().contains("outside IPSW entry"), "{err}");
    // A past-the-end read of the file itself never reaches the server.
    let before = srv.gets.load(Ordering::SeqCst);
    let remote = ipsw.archive().source();
    assert!(remote.read_at(remote.len() - 1, &mut buf).is_err());
    assert_eq!(srv.gets.load(Ordering::SeqCst), before);
}

#[test]
fn streaming_reads_ahead_with_bounded_memory_and_no_refetch() {
    let rt = runtime();
    let a = archive(3);
    let srv = start(&rt, a.bytes.clone(), Mode::Ranges, false);
    let cfg = config();
    let ipsw = Ipsw::open(RemoteFile::open(&srv.url(), cfg.clone()).unwrap()).unwrap();
    let entry = ipsw.archive().require(OS_IMAGE).unwrap();
    let mut reader = ipsw.archive().reader(entry).unwrap();
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 200_000];
    let mut peak = 0;
    loop {
        let n = reader.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
        peak = peak.max(ipsw.archive().source().cached_blocks());
    }
    assert_eq!(got, a.entries[1].1);
    // Cache + read-ahead + the blocks of one read (256 KiB ZIP chunks span ≤ 5 blocks).
    assert!(
        peak <= cfg.cache_blocks + cfg.read_ahead + 5,
        "peak {peak} blocks"
    );
    // Every range requested is distinct: nothing fetched twice while streaming.
    let ranges = srv.ranges.lock().unwrap().clone();
    let mut sorted = ranges.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), ranges.len(), "{ranges:?}");
    // Read-ahead fetched single blocks ahead of the reader.
    assert!(
        ranges
            .iter()
            .filter(|(a, b)| b - a + 1 == BLOCK as u64)
            .count()
            > 10,
        "{ranges:?}"
    );
}

#[test]
fn dropped_connections_mid_body_are_retried() {
    let rt = runtime();
    let a = archive(4);
    let srv = start(&rt, a.bytes.clone(), Mode::Ranges, false);
    let ipsw = Ipsw::open(RemoteFile::open(&srv.url(), config()).unwrap()).unwrap();
    let entry = ipsw.archive().require(OS_IMAGE).unwrap();
    let stored = ipsw.archive().stored(entry).unwrap();
    srv.drops.store(2, Ordering::SeqCst);
    let mut buf = vec![0; 2 * BLOCK];
    stored.read_at(10 * BLOCK as u64, &mut buf).unwrap();
    assert_eq!(buf, a.entries[1].1[10 * BLOCK..12 * BLOCK]);
    let stats = ipsw.archive().source().stats();
    assert_eq!(stats.retries, 2, "{stats:?}");
    assert_eq!(srv.drops.load(Ordering::SeqCst), 0);

    // More drops than attempts: a clear error naming the attempts.
    srv.drops.store(10, Ordering::SeqCst);
    let err = stored.read_at(30 * BLOCK as u64, &mut buf).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("after 3 attempt(s)"), "{text}");
    assert!(text.contains("connection"), "{text}");
    let inner = err
        .get_ref()
        .unwrap()
        .downcast_ref::<RemoteError>()
        .unwrap();
    assert!(matches!(
        inner,
        RemoteError::Unreachable { attempts: 3, .. }
    ));
}

#[test]
fn a_file_changed_on_the_server_is_a_clear_error() {
    let rt = runtime();
    let a = archive(5);
    let srv = start(&rt, a.bytes.clone(), Mode::Ranges, false);
    let ipsw = Ipsw::open(RemoteFile::open(&srv.url(), config()).unwrap()).unwrap();
    let entry = ipsw.archive().require(OS_IMAGE).unwrap().clone();

    // Same size, new version: caught by the ETag.
    srv.replace(archive(6).bytes, "\"v2\"");
    let err = ipsw.archive().read_to_vec(&entry, u64::MAX).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ZipError::Io(_)), "{text}");
    assert!(text.contains("changed on the server"), "{text}");
    assert!(text.contains("ETag \"v1\" became \"v2\""), "{text}");

    // Shrunk file with the old ETag: caught by the length.
    let mut shorter = a.bytes.clone();
    shorter.truncate(a.bytes.len() - 100);
    srv.replace(shorter, "\"v1\"");
    let mut buf = [0u8; 16];
    let err = ipsw
        .archive()
        .source()
        .read_at(40 * BLOCK as u64, &mut buf)
        .unwrap_err();
    assert!(err.to_string().contains("changed on the server"), "{err}");
    assert!(err.to_string().contains("its size is now"), "{err}");
}

#[test]
fn a_server_without_ranges_or_file_is_refused_clearly() {
    let rt = runtime();
    let a = archive(7);
    let srv = start(&rt, a.bytes.clone(), Mode::NoRanges, false);
    let remote = RemoteFile::open(&srv.url(), config()).unwrap();
    let err = Ipsw::open(remote).unwrap_err().to_string();
    assert!(err.contains("does not support range requests"), "{err}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = RemoteFile::open(&format!("http://127.0.0.1:{port}/x.ipsw"), config()).unwrap_err();
    assert!(
        matches!(err, RemoteError::Unreachable { attempts: 3, .. }),
        "{err}"
    );
}

#[test]
fn https_with_the_test_ca() {
    let rt = runtime();
    let a = archive(8);
    let srv = start(&rt, a.bytes.clone(), Mode::Ranges, true);
    let ca = std::env::temp_dir().join(format!("macrescue-remote-ca-{}.pem", std::process::id()));
    std::fs::write(&ca, &srv._pki.as_ref().unwrap().ca_pem).unwrap();
    let mut cfg = config();
    cfg.http.extra_ca = Some(ca.clone());
    let url = srv.url().replace("127.0.0.1", "localhost");
    let ipsw = Ipsw::open(RemoteFile::open(&url, cfg).unwrap()).unwrap();
    assert_eq!(ipsw.build_manifest().unwrap(), a.entries[0].1);
    let _ = std::fs::remove_file(ca);
}

#[test]
fn a_missing_file_names_the_status() {
    let rt = runtime();
    let handle =
        handler(
            |_req: Request, resp: Responder| async move { resp.send(404, &[], b"Not Found").await },
        );
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = rt.block_on(Server::start(addr, None, handle)).unwrap();
    let err = RemoteFile::open(&format!("{}/gone.ipsw", server.url()), config()).unwrap_err();
    assert!(
        matches!(err, RemoteError::Status { status: 404, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("fetch the firmware list again"),
        "{err}"
    );
}

#[test]
fn the_personalizer_reads_components_from_a_remote_ipsw() {
    use restore_agent::personalize::{ComponentSource, IpswSource};
    let rt = runtime();
    let a = archive(9);
    let srv = start(&rt, a.bytes.clone(), Mode::Ranges, false);
    let ipsw = Ipsw::open_url(&srv.url(), config()).unwrap();
    let source = IpswSource::new(ipsw, srv.url());
    assert_eq!(
        source.read("Firmware/dfu/iBSS.j274.RELEASE.im4p").unwrap(),
        a.entries[2].1
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/x.ipsw");
    let err = Ipsw::open_url(&url, config()).unwrap_err().to_string();
    assert!(err.contains(&url), "{err}");
    assert!(err.contains("after 3 attempt(s)"), "{err}");
}

#[test]
fn a_large_central_directory_still_takes_few_requests() {
    let rt = runtime();
    // Thousands of entries make a directory far larger than the 64 KiB tail read.
    let stored = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    writer.start_file("big.dmg", stored).unwrap();
    writer.write_all(&pseudo(2 << 20, 11)).unwrap();
    for i in 0..3000 {
        writer
            .start_file(format!("Firmware/all_flash/{i:0>90}.im4p"), stored)
            .unwrap();
        writer
            .write_all(format!("component {i}").as_bytes())
            .unwrap();
    }
    let bytes = writer.finish().unwrap().into_inner();
    let srv = start(&rt, bytes, Mode::Ranges, false);

    // Default 1 MiB blocks: HEAD, then one range covering the tail and the directory.
    let defaults = RemoteConfig {
        max_attempts: 1,
        ..RemoteConfig::default()
    };
    let ipsw = Ipsw::open_url(&srv.url(), defaults).unwrap();
    assert_eq!(ipsw.archive().entries().len(), 3001);
    let stats = ipsw.archive().source().stats();
    assert!(stats.requests <= 2, "{stats:?}");
    let name = format!("Firmware/all_flash/{:0>90}.im4p", 1234);
    assert_eq!(ipsw.read_small(&name, 100).unwrap(), b"component 1234");

    // Small blocks: the directory read bypasses the cache, still in a handful of ranges.
    let ipsw = Ipsw::open_url(&srv.url(), config()).unwrap();
    let stats = ipsw.archive().source().stats();
    assert!(stats.requests <= 4, "{stats:?}");
    assert_eq!(ipsw.read_small(&name, 100).unwrap(), b"component 1234");
}
