//! `restore-agent firmwares` end to end: the real binary against the simulated catalog on
//! 127.0.0.1, including the fallback note and the `--signed` check, which reads each build's
//! BuildManifest from a remote IPSW over range requests and asks a test TSS responder.

use std::io::{Cursor, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mac_sim::services::catalog::{self as sim, CatalogBuild, CatalogService, Fault, Source};
use mac_sim::services::http::{handler, Request, Responder, Server};
use plist::Value;
use zip::write::SimpleFileOptions;

const SHA_A: &str = "f034b05ce26abe3c8e5ae8f1f6574119b10cafbe";
const SHA_B: &str = "0b60b702fa2b7665161d80582ac60e2ed284df6f";
/// base64 of the UniqueBuildID the "unsigned" build carries (20 × 0xEE).
const UNSIGNED_MARKER: &str = "7u7u7u7u7u7u";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_restore-agent"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn builds(ipsw_base: &str) -> Vec<CatalogBuild> {
    [
        format!("Mac14,2:26.2:25C56:{ipsw_base}/UniversalMac_26.2_25C56_Restore.ipsw:{SHA_A}"),
        format!(
            "Mac14,2:26.3.1:25D2128:{ipsw_base}/UniversalMac_26.3.1_25D2128_Restore.ipsw:{SHA_B}"
        ),
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect()
}

fn start_catalog(
    rt: &tokio::runtime::Runtime,
    builds: Vec<CatalogBuild>,
) -> (CatalogService, Server) {
    let service = CatalogService::from_builds(builds);
    let server = rt.block_on(service.start(any_port(), None)).unwrap();
    (service, server)
}

#[test]
fn json_lists_the_builds_newest_first() {
    let rt = runtime();
    let (service, server) = start_catalog(&rt, builds("https://cdn.invalid"));
    let out = agent(&[
        "firmwares",
        "--model",
        "Mac14,2",
        "--catalog-url",
        &sim::mesu_url(&server),
        "--fallback-url",
        &server.url(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json,
        serde_json::json!([
            {"version": "26.3.1", "build": "25D2128",
             "url": "https://cdn.invalid/UniversalMac_26.3.1_25D2128_Restore.ipsw", "sha1": SHA_B},
            {"version": "26.2", "build": "25C56",
             "url": "https://cdn.invalid/UniversalMac_26.2_25C56_Restore.ipsw", "sha1": SHA_A},
        ])
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(service.requests(Source::IpswMe), 0);

    // The human table names the source.
    let out = agent(&[
        "firmwares",
        "--model",
        "Mac14,2",
        "--catalog-url",
        &sim::mesu_url(&server),
        "--no-fallback",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("Builds for Mac14,2 (from Apple's catalog):"),
        "{text}"
    );
    assert!(text.contains(SHA_B), "{text}");
}

#[test]
fn the_fallback_is_used_and_announced() {
    let rt = runtime();
    let (service, server) = start_catalog(&rt, builds("https://cdn.invalid"));
    service.set_fault(Source::Mesu, Fault::Status(500));
    let out = agent(&[
        "firmwares",
        "--model",
        "Mac14,2",
        "--catalog-url",
        &sim::mesu_url(&server),
        "--fallback-url",
        &server.url(),
        "--json",
    ]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HTTP status 500"), "{stderr}");
    assert!(stderr.contains("using the fallback ipsw.me"), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    assert_eq!(json[0]["build"], "25D2128");

    service.set_fault(Source::IpswMe, Fault::Html);
    let out = agent(&[
        "firmwares",
        "--model",
        "Mac14,2",
        "--catalog-url",
        &sim::mesu_url(&server),
        "--fallback-url",
        &server.url(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no firmware list"), "{stderr}");
    assert!(stderr.contains("ipsw.me"), "{stderr}");
    assert!(out.stdout.is_empty());
}

/// A zip holding `BuildManifest.plist`.
fn ipsw_with(manifest: &[u8]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    w.start_file("BuildManifest.plist", SimpleFileOptions::default())
        .unwrap();
    w.write_all(manifest).unwrap();
    w.finish().unwrap().into_inner()
}

fn fixture_manifest() -> Vec<u8> {
    let shared = std::env::var_os("MACRESCUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")));
    std::fs::read(shared.join(
        "fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests/J274AP.BuildManifest.plist",
    ))
    .unwrap()
}

/// Serves two IPSWs by path, with ranges.
fn start_cdn(rt: &tokio::runtime::Runtime, files: Vec<(String, Vec<u8>)>) -> Server {
    let files = Arc::new(files);
    let h = handler(move |req: Request, mut resp: Responder| {
        let files = Arc::clone(&files);
        async move {
            let Some((_, data)) = files.iter().find(|(p, _)| *p == req.path) else {
                return resp.send(404, &[], b"").await;
            };
            let len = data.len();
            let etag = ("ETag", format!("\"{len}\""));
            if req.method == "HEAD" {
                resp.head(200, &[etag], Some(len as u64)).await?;
                return resp.finish().await;
            }
            let range = req
                .header("range")
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.split_once('-'))
                .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
            match range {
                Some((a, b)) if a <= b && b < len => {
                    let cr = ("Content-Range", format!("bytes {a}-{b}/{len}"));
                    resp.send(206, &[etag, cr], &data[a..=b]).await
                }
                _ => resp.send(416, &[], b"").await,
            }
        }
    });
    rt.block_on(Server::start(any_port(), None, h)).unwrap()
}

#[test]
fn signed_asks_tss_with_each_builds_manifest() {
    let rt = runtime();
    let signed = fixture_manifest();
    let mut unsigned: Value = plist::from_bytes(&signed).unwrap();
    for id in unsigned
        .as_dictionary_mut()
        .unwrap()
        .get_mut("BuildIdentities")
        .unwrap()
        .as_array_mut()
        .unwrap()
    {
        id.as_dictionary_mut()
            .unwrap()
            .insert("UniqueBuildID".into(), Value::Data(vec![0xEE; 20]));
    }
    let mut unsigned_bytes = Vec::new();
    plist::to_writer_xml(&mut unsigned_bytes, &unsigned).unwrap();
    let cdn = start_cdn(
        &rt,
        vec![
            (
                "/UniversalMac_26.2_25C56_Restore.ipsw".into(),
                ipsw_with(&signed),
            ),
            (
                "/UniversalMac_26.3.1_25D2128_Restore.ipsw".into(),
                ipsw_with(&unsigned_bytes),
            ),
        ],
    );

    let tss_hits = Arc::new(AtomicU64::new(0));
    let hits = Arc::clone(&tss_hits);
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&bodies);
    let tss = handler(move |req: Request, resp: Responder| {
        hits.fetch_add(1, Ordering::SeqCst);
        let body = String::from_utf8_lossy(&req.body).into_owned();
        seen.lock().unwrap().push(body.clone());
        async move {
            let answer = if body.contains(UNSIGNED_MARKER) {
                "STATUS=94&MESSAGE=This device isn't eligible for the requested build.".to_string()
            } else {
                "STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING=<?xml version=\"1.0\"?><plist version=\"1.0\"><dict><key>ApImg4Ticket</key><data>MAA=</data></dict></plist>".to_string()
            };
            resp.send(200, &[], answer.as_bytes()).await
        }
    });
    let tss_server = rt.block_on(Server::start(any_port(), None, tss)).unwrap();

    let (_service, catalog) = start_catalog(&rt, builds(&cdn.url()));
    let out = agent(&[
        "firmwares",
        "--model",
        "Mac14,2",
        "--catalog-url",
        &sim::mesu_url(&catalog),
        "--no-fallback",
        "--json",
        "--signed",
        "--ecid",
        "70B0C0D0E0F70",
        "--board",
        "j274ap",
        "--tss-url",
        &tss_server.url(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["build"], "25D2128");
    assert_eq!(json[0]["signed"], false);
    assert_eq!(json[1]["build"], "25C56");
    assert_eq!(json[1]["signed"], true);
    assert_eq!(tss_hits.load(Ordering::SeqCst), 2);
    for body in bodies.lock().unwrap().iter() {
        // ECID 0x70B0C0D0E0F70 as the request's integer.
        assert!(
            body.contains("<integer>1982471223512944</integer>"),
            "{body}"
        );
    }

    // A board the manifest does not know: "unknown", with the reason, not a crash.
    let out = agent(&[
        "firmwares",
        "--model",
        "Mac14,2",
        "--catalog-url",
        &sim::mesu_url(&catalog),
        "--no-fallback",
        "--json",
        "--signed",
        "--ecid",
        "70B0C0D0E0F70",
        "--board",
        "j999ap",
        "--tss-url",
        &tss_server.url(),
    ]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["signed"], serde_json::Value::Null);
    assert!(
        json[0]["signing_error"]
            .as_str()
            .unwrap()
            .contains("j999ap"),
        "{json}"
    );
    assert_eq!(
        tss_hits.load(Ordering::SeqCst),
        2,
        "no TSS request without an identity"
    );
}
