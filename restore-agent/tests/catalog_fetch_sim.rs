//! Catalog fetching against mac-sim's simulated catalog service on 127.0.0.1: Apple's catalog
//! first, ipsw.me when it fails (and saying so), a clear error when both fail, HTTPS with a test
//! CA, and every fixture catalog served byte for byte.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mac_sim::services::catalog::{self as sim, CatalogBuild, CatalogService, Fault, Source};
use mac_sim::services::http::Server;
use mac_sim::services::pki::TestPki;
use restore_agent::catalog::CatalogError;
use restore_agent::catalog_fetch::{
    CatalogFetchConfig, CatalogFetchError, CatalogFetcher, CatalogSource, FailureReason,
};
use restore_agent::http::HttpConfig;

const SHA_A: &str = "f034b05ce26abe3c8e5ae8f1f6574119b10cafbe";
const SHA_B: &str = "0b60b702fa2b7665161d80582ac60e2ed284df6f";

fn shared() -> PathBuf {
    std::env::var_os("MACRESCUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn builds() -> Vec<CatalogBuild> {
    [
        format!("Mac14,2:26.2:25C56:https://cdn.invalid/UniversalMac_26.2_25C56_Restore.ipsw:{SHA_A}"),
        format!(
            "Mac14,2:26.3.1:25D2128:https://cdn.invalid/UniversalMac_26.3.1_25D2128_Restore.ipsw:{SHA_B}"
        ),
        "Mac14,2:26.10:25Z1:https://cdn.invalid/UniversalMac_26.10_25Z1_Restore.ipsw:".to_string(),
        format!("Mac13,1:26.2:25C56:https://cdn.invalid/UniversalMac_26.2_25C56_Restore.ipsw:{SHA_A}"),
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect()
}

fn start(rt: &tokio::runtime::Runtime, service: &CatalogService, pki: Option<&TestPki>) -> Server {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    rt.block_on(service.start(addr, pki.map(|p| p.server_config.clone())))
        .unwrap()
}

fn config(server: &Server) -> CatalogFetchConfig {
    CatalogFetchConfig {
        catalog_url: sim::mesu_url(server),
        fallback_url: Some(server.url()),
        timeout: Duration::from_secs(5),
        http: HttpConfig::default(),
    }
}

fn fetch(
    rt: &tokio::runtime::Runtime,
    config: CatalogFetchConfig,
    product: &str,
) -> Result<restore_agent::catalog_fetch::FetchedBuilds, CatalogFetchError> {
    let fetcher = CatalogFetcher::new(config).unwrap();
    rt.block_on(fetcher.builds_for(product))
}

#[test]
fn apple_catalog_is_used_when_it_answers() {
    let rt = runtime();
    let service = CatalogService::from_builds(builds());
    let server = start(&rt, &service, None);
    let got = fetch(&rt, config(&server), "Mac14,2").unwrap();
    assert_eq!(got.source, CatalogSource::Apple);
    assert!(got.primary_failure.is_none());
    assert_eq!(got.fallback_note(), None);
    let listed: Vec<(&str, &str, Option<String>)> = got
        .entries
        .iter()
        .map(|e| (e.version.as_str(), e.build.as_str(), e.sha1_hex()))
        .collect();
    assert_eq!(
        listed,
        [
            ("26.10", "25Z1", None),
            ("26.3.1", "25D2128", Some(SHA_B.to_string())),
            ("26.2", "25C56", Some(SHA_A.to_string())),
        ]
    );
    assert_eq!(
        got.entries[1].url,
        "https://cdn.invalid/UniversalMac_26.3.1_25D2128_Restore.ipsw"
    );
    assert_eq!(service.requests(Source::Mesu), 1);
    assert_eq!(service.requests(Source::IpswMe), 0);
}

#[test]
fn every_primary_fault_falls_back_to_ipsw_me_and_says_why() {
    let rt = runtime();
    let service = CatalogService::from_builds(builds());
    let server = start(&rt, &service, None);
    let mut cfg = config(&server);
    cfg.timeout = Duration::from_millis(300);
    let cases: [(Fault, &str); 5] = [
        (Fault::Status(500), "HTTP status 500"),
        (Fault::Garbage, "not a readable property list"),
        (Fault::Html, "not a readable property list"),
        (
            Fault::Stall(Duration::from_secs(2)),
            "no complete answer within",
        ),
        (Fault::Drop, "no answer"),
    ];
    for (fault, why) in cases {
        service.set_fault(Source::Mesu, fault.clone());
        let got = fetch(&rt, cfg.clone(), "Mac14,2").unwrap();
        assert_eq!(got.source, CatalogSource::IpswMe, "{fault:?}");
        assert_eq!(got.url, format!("{}/v4/device/Mac14,2", server.url()));
        let note = got.fallback_note().unwrap();
        assert!(note.contains("Apple's catalog"), "{note}");
        assert!(note.contains(why), "{fault:?}: {note}");
        assert!(note.contains("using the fallback ipsw.me"), "{note}");
        let builds: Vec<&str> = got.entries.iter().map(|e| e.build.as_str()).collect();
        assert_eq!(builds, ["25Z1", "25D2128", "25C56"], "{fault:?}");
    }
    assert_eq!(service.requests(Source::IpswMe), 5);
}

#[test]
fn a_product_type_missing_from_apple_falls_back() {
    let rt = runtime();
    let mut all = builds();
    let service_builds: Vec<_> = all.drain(..3).collect();
    // ipsw.me knows Mac13,1, Apple's catalog does not.
    let service = CatalogService::from_fixture(sim::render_mesu(&service_builds), all).unwrap();
    let server = start(&rt, &service, None);
    let got = fetch(&rt, config(&server), "Mac13,1").unwrap();
    assert_eq!(got.source, CatalogSource::IpswMe);
    assert!(matches!(
        got.primary_failure.as_ref().unwrap().reason,
        FailureReason::Catalog(CatalogError::UnknownProductType { .. })
    ));
    assert_eq!(got.entries.len(), 1);
}

#[test]
fn both_sources_failing_is_one_clear_error() {
    let rt = runtime();
    let service = CatalogService::from_builds(builds());
    let server = start(&rt, &service, None);
    service.set_fault(Source::Mesu, Fault::Status(503));
    service.set_fault(Source::IpswMe, Fault::Garbage);
    let err = fetch(&rt, config(&server), "Mac14,2").unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            &err,
            CatalogFetchError::BothFailed { primary, fallback }
                if matches!(primary.reason, FailureReason::Status(503))
                && matches!(fallback.reason, FailureReason::Catalog(CatalogError::Json(_)))
        ),
        "{text}"
    );
    assert!(text.contains("Apple's catalog"), "{text}");
    assert!(text.contains("HTTP status 503"), "{text}");
    assert!(text.contains("ipsw.me"), "{text}");
    assert!(text.contains("--ipsw"), "{text}");

    // An unknown device on ipsw.me is a 404.
    service.set_fault(Source::IpswMe, Fault::None);
    let err = fetch(&rt, config(&server), "Mac99,9").unwrap_err();
    assert!(err.to_string().contains("HTTP status 404"), "{err}");
}

#[test]
fn without_a_fallback_the_primary_failure_is_reported() {
    let rt = runtime();
    let service = CatalogService::from_builds(builds());
    let server = start(&rt, &service, None);
    service.set_fault(Source::Mesu, Fault::Status(500));
    let mut cfg = config(&server);
    cfg.fallback_url = None;
    let err = fetch(&rt, cfg, "Mac14,2").unwrap_err();
    assert!(matches!(err, CatalogFetchError::PrimaryFailed(_)), "{err}");
    assert!(
        err.to_string().contains("no fallback is configured"),
        "{err}"
    );
    assert_eq!(service.requests(Source::IpswMe), 0);
}

#[test]
fn connection_refused_on_both_names_both() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rt = runtime();
    let cfg = CatalogFetchConfig {
        catalog_url: format!("http://127.0.0.1:{port}/catalog.xml"),
        fallback_url: Some(format!("http://127.0.0.1:{port}")),
        timeout: Duration::from_secs(5),
        http: HttpConfig::default(),
    };
    let err = fetch(&rt, cfg, "Mac14,2").unwrap_err().to_string();
    assert!(
        err.contains(&format!("127.0.0.1:{port}/catalog.xml")),
        "{err}"
    );
    assert!(
        err.contains(&format!("127.0.0.1:{port}/v4/device/Mac14,2")),
        "{err}"
    );
    assert!(err.contains("could not connect"), "{err}");
}

#[test]
fn https_with_the_test_ca() {
    let rt = runtime();
    let pki = TestPki::generate(&[]).unwrap();
    let service = CatalogService::from_builds(builds());
    let server = start(&rt, &service, Some(&pki));
    let ca = std::env::temp_dir().join(format!("macrescue-catalog-ca-{}.pem", std::process::id()));
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let mut cfg = config(&server);
    cfg.http.extra_ca = Some(ca.clone());
    let got = fetch(&rt, cfg, "Mac14,2").unwrap();
    assert_eq!(got.source, CatalogSource::Apple);
    assert!(got.url.starts_with("https://"));

    // Without the CA both TLS handshakes fail, and the error says so per source.
    let err = fetch(&rt, config(&server), "Mac14,2").unwrap_err();
    assert!(matches!(err, CatalogFetchError::BothFailed { .. }), "{err}");
    let _ = std::fs::remove_file(ca);
}

#[test]
fn every_fixture_catalog_served_by_the_simulator_parses() {
    let rt = runtime();
    let dir = shared().join("fixtures/catalogs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "xml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 4,
        "fixture catalogs missing in {}",
        dir.display()
    );
    let mut ipsw_catalogs = 0;
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        let service = CatalogService::from_fixture(bytes.clone(), Vec::new()).unwrap();
        assert_eq!(service.mesu_bytes(), bytes.as_slice());
        let server = start(&rt, &service, None);
        // The simulator's own reading of the catalog is the reference.
        let expected = sim::builds_in_catalog(&bytes).unwrap();
        if expected.is_empty() {
            // A MobileAsset (software update) catalog lists no restore images: a clear error.
            let mut cfg = config(&server);
            cfg.fallback_url = None;
            let err = fetch(&rt, cfg, "Mac14,2").unwrap_err().to_string();
            assert!(err.contains("not Apple's macOS IPSW catalog"), "{err}");
            continue;
        }
        ipsw_catalogs += 1;
        let products: BTreeSet<&str> = expected.iter().map(|b| b.product_type.as_str()).collect();
        for product in products {
            let got = fetch(&rt, config(&server), product)
                .unwrap_or_else(|e| panic!("{}: {product}: {e}", file.display()));
            assert_eq!(got.source, CatalogSource::Apple, "{}", file.display());
            let want: BTreeSet<(&str, &str)> = expected
                .iter()
                .filter(|b| b.product_type == product)
                .map(|b| (b.build.as_str(), b.url.as_str()))
                .collect();
            let have: BTreeSet<(&str, &str)> = got
                .entries
                .iter()
                .map(|e| (e.build.as_str(), e.url.as_str()))
                .collect();
            assert_eq!(have, want, "{}: {product}", file.display());
            for e in &got.entries {
                let sim_sha = expected
                    .iter()
                    .find(|b| b.product_type == product && b.build == e.build)
                    .and_then(|b| b.sha1.clone());
                assert_eq!(e.sha1_hex(), sim_sha, "{}: {product}", file.display());
            }
            // The ipsw.me mirror of the same catalog gives the same list.
            service.set_fault(Source::Mesu, Fault::Status(500));
            let mirrored = fetch(&rt, config(&server), product).unwrap();
            service.set_fault(Source::Mesu, Fault::None);
            assert_eq!(mirrored.source, CatalogSource::IpswMe);
            assert_eq!(
                mirrored.entries,
                got.entries,
                "{}: {product}",
                file.display()
            );
        }
    }
    assert!(ipsw_catalogs >= 3);
}
