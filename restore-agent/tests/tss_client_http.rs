//! The TSS HTTP client against a tiny responder on 127.0.0.1 (plain and TLS with a test CA):
//! headers and body as §4.1 says, ticket replies, refusals that must not be retried, and
//! network failures that must be retried exactly up to the configured limit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mac_sim::services::http::{handler, Request, Server};
use mac_sim::services::pki::TestPki;
use plist::{Dictionary, Value};
use restore_agent::http::HttpConfig;
use restore_agent::tss::{TssError, TssParams};
use restore_agent::tss_client::{
    BlockingTssClient, Signing, TssClient, TssClientConfig, TssClientError,
};

const TICKET_PLIST: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\">\
    <dict><key>ApImg4Ticket</key><data>MAMCAQE=</data></dict></plist>";

/// What the responder answers, and what it saw.
#[derive(Clone)]
enum Answer {
    Body(u16, String),
    /// Close the connection without any answer.
    Drop,
}

struct Responder {
    server: Server,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Request>>>,
    _pki: Option<TestPki>,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn start(rt: &tokio::runtime::Runtime, answer: Answer, tls: bool) -> Responder {
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let pki = tls.then(|| TestPki::generate(&[]).unwrap());
    let (h, s) = (Arc::clone(&hits), Arc::clone(&seen));
    let handle = handler(move |req: Request, resp| {
        h.fetch_add(1, Ordering::SeqCst);
        s.lock().unwrap().push(req);
        let answer = answer.clone();
        async move {
            match answer {
                Answer::Body(status, body) => resp.send(status, &[], body.as_bytes()).await,
                Answer::Drop => {
                    resp.abort();
                    Ok(())
                }
            }
        }
    });
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let config = pki.as_ref().map(|p| Arc::clone(&p.server_config));
    let server = rt.block_on(Server::start(addr, config, handle)).unwrap();
    Responder {
        server,
        hits,
        seen,
        _pki: pki,
    }
}

fn ca_file(pki: &TestPki, tag: &str) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("macrescue-tss-ca-{tag}-{}.pem", std::process::id()));
    std::fs::write(&path, &pki.ca_pem).unwrap();
    path
}

fn config(server: String, attempts: usize) -> TssClientConfig {
    TssClientConfig {
        server: Some(server),
        max_attempts: attempts,
        retry_delay: Duration::from_millis(1),
        http: HttpConfig {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            ..HttpConfig::default()
        },
    }
}

fn identity() -> Dictionary {
    let shared = std::env::var_os("MACRESCUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")));
    let path = shared.join(
        "fixtures/manifests/macOS_26.2_25C56_PreflightBuildManifests/J274AP.BuildManifest.plist",
    );
    let manifest: Dictionary = plist::from_file(path).unwrap();
    manifest["BuildIdentities"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_dictionary)
        .find(|id| {
            id.get("Manifest")
                .and_then(Value::as_dictionary)
                .is_some_and(|m| m.contains_key("iBSS"))
        })
        .unwrap()
        .clone()
}

fn params() -> TssParams {
    TssParams::new(0x1C2B3A4D5E6F70, Some(vec![0xAA; 32]), Some(vec![0xBB; 20]))
}

#[test]
fn a_ticket_reply_is_parsed_and_the_request_follows_the_transport_rules() {
    let rt = runtime();
    let body = format!("STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING={TICKET_PLIST}");
    let r = start(&rt, Answer::Body(200, body.clone()), false);
    // A bare host gets the TSS path appended.
    let client = BlockingTssClient::new(config(r.server.url(), 3)).unwrap();
    let reply = client.post(b"<?xml version=\"1.0\"?><plist/>").unwrap();
    assert_eq!(
        reply.ap_img4_ticket().unwrap(),
        &[0x30, 0x03, 0x02, 0x01, 0x01]
    );
    assert_eq!(client.request(b"x").unwrap(), body.as_bytes());
    assert_eq!(r.hits.load(Ordering::SeqCst), 2);

    let seen = r.seen.lock().unwrap();
    let req = &seen[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/TSS/controller");
    assert_eq!(req.query, "action=2");
    assert_eq!(
        req.header("content-type"),
        Some("text/xml; charset=\"utf-8\"")
    );
    assert_eq!(req.header("cache-control"), Some("no-cache"));
    assert_eq!(req.header("user-agent"), Some("InetURL/1.0"));
    assert_eq!(req.body, b"<?xml version=\"1.0\"?><plist/>");
}

#[test]
fn signing_check_sends_the_main_ap_request_and_reads_status_0_as_signed() {
    let rt = runtime();
    let body = format!("STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING={TICKET_PLIST}");
    let r = start(&rt, Answer::Body(200, body), false);
    let client = BlockingTssClient::new(config(r.server.url(), 1)).unwrap();
    assert_eq!(
        client.is_signed(&identity(), &params()).unwrap(),
        Signing::Signed
    );
    let seen = r.seen.lock().unwrap();
    let sent = Value::from_reader_xml(std::io::Cursor::new(&seen[0].body)).unwrap();
    let sent = sent.as_dictionary().unwrap();
    assert_eq!(sent["ApECID"].as_unsigned_integer(), Some(0x1C2B3A4D5E6F70));
    assert_eq!(sent["ApNonce"].as_data(), Some(&[0xAA; 32][..]));
    assert_eq!(sent["@ApImg4Ticket"].as_boolean(), Some(true));
    assert!(sent.contains_key("iBSS"), "main AP request lists iBSS");
}

#[test]
fn status_94_and_69_mean_not_signed_and_are_not_retried() {
    let rt = runtime();
    for status in [94, 69] {
        let r = start(
            &rt,
            Answer::Body(
                200,
                format!("STATUS={status}&MESSAGE=This device isn't eligible"),
            ),
            false,
        );
        let client = BlockingTssClient::new(config(r.server.url(), 5)).unwrap();
        assert_eq!(
            client.is_signed(&identity(), &params()).unwrap(),
            Signing::NotSigned {
                status,
                message: "This device isn't eligible".into()
            }
        );
        let err = client.post(b"x").unwrap_err();
        assert!(
            matches!(err, TssClientError::Tss(TssError::NotSigned { status: s, .. }) if s == status),
            "{err}"
        );
        assert!(
            err.to_string().contains("pick another, current build"),
            "{err}"
        );
        assert_eq!(
            r.hits.load(Ordering::SeqCst),
            2,
            "one request each, no retry"
        );
    }
}

#[test]
fn status_100_is_a_malformed_request_and_is_not_retried() {
    let rt = runtime();
    let r = start(
        &rt,
        Answer::Body(200, "STATUS=100&MESSAGE=An internal error occurred.".into()),
        false,
    );
    let client = BlockingTssClient::new(config(r.server.url(), 5)).unwrap();
    let err = client.is_signed(&identity(), &params()).unwrap_err();
    assert!(
        matches!(
            err,
            TssClientError::Tss(TssError::MalformedRequest { status: 100, .. })
        ),
        "{err}"
    );
    assert_eq!(r.hits.load(Ordering::SeqCst), 1);
}

#[test]
fn garbage_without_status_is_retried_up_to_the_limit() {
    let rt = runtime();
    let r = start(
        &rt,
        Answer::Body(502, "<html><body>502 Bad Gateway</body></html>".into()),
        false,
    );
    let client = BlockingTssClient::new(config(r.server.url(), 4)).unwrap();
    let err = client.post(b"x").unwrap_err();
    match &err {
        TssClientError::Unreachable {
            attempts, reason, ..
        } => {
            assert_eq!(*attempts, 4);
            assert!(reason.contains("502 Bad Gateway"), "{reason}");
        }
        other => panic!("expected Unreachable, got {other}"),
    }
    assert_eq!(r.hits.load(Ordering::SeqCst), 4);
    assert!(err.to_string().contains("4 attempt(s)"), "{err}");
}

#[test]
fn a_garbled_ticket_after_success_is_not_retried() {
    let rt = runtime();
    let r = start(
        &rt,
        Answer::Body(
            200,
            "STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING=<?xml garbage".into(),
        ),
        false,
    );
    let client = BlockingTssClient::new(config(r.server.url(), 4)).unwrap();
    let err = client.post(b"x").unwrap_err();
    assert!(
        matches!(err, TssClientError::Tss(TssError::GarbledResponse(_))),
        "{err}"
    );
    assert_eq!(r.hits.load(Ordering::SeqCst), 1);
}

#[test]
fn dropped_connections_are_retried() {
    let rt = runtime();
    let r = start(&rt, Answer::Drop, false);
    let client = BlockingTssClient::new(config(r.server.url(), 3)).unwrap();
    let err = client.post(b"x").unwrap_err();
    assert!(
        matches!(err, TssClientError::Unreachable { attempts: 3, .. }),
        "{err}"
    );
    assert_eq!(r.hits.load(Ordering::SeqCst), 3);
}

#[test]
fn connection_refused_is_retried_then_reported_with_the_url() {
    // Bind and release a port so nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let client = BlockingTssClient::new(config(url.clone(), 3)).unwrap();
    let err = client.post(b"x").unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, TssClientError::Unreachable { attempts: 3, .. }),
        "{text}"
    );
    assert!(
        text.contains(&format!("{url}/TSS/controller?action=2")),
        "{text}"
    );
    assert!(text.contains("could not connect"), "{text}");
}

#[test]
fn https_with_the_test_ca_works_and_without_it_fails() {
    let rt = runtime();
    let body = format!("STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING={TICKET_PLIST}");
    let r = start(&rt, Answer::Body(200, body), true);
    let url = format!("https://localhost:{}", r.server.addr.port());

    let mut trusted = config(url.clone(), 1);
    let ca = ca_file(r._pki.as_ref().unwrap(), "tss");
    trusted.http.extra_ca = Some(ca.clone());
    let client = BlockingTssClient::new(trusted).unwrap();
    client.post(b"x").unwrap();

    // Without the CA the TLS handshake fails: a network-level failure, so retried.
    let untrusted = BlockingTssClient::new(config(url, 2)).unwrap();
    let err = untrusted.post(b"x").unwrap_err();
    assert!(
        matches!(err, TssClientError::Unreachable { attempts: 2, .. }),
        "{err}"
    );
    let _ = std::fs::remove_file(ca);
}

#[test]
fn the_async_client_works_inside_a_runtime() {
    let rt = runtime();
    let body = format!("STATUS=0&MESSAGE=SUCCESS&REQUEST_STRING={TICKET_PLIST}");
    let r = start(&rt, Answer::Body(200, body), false);
    let client = TssClient::new(config(r.server.url(), 1)).unwrap();
    let reply = rt.block_on(client.post(b"x")).unwrap();
    assert_eq!(reply.status, 0);
}

#[test]
fn the_blocking_client_is_the_personalizers_transport() {
    use restore_agent::personalize::{TssTransport, TssTransportError};
    let rt = runtime();
    let r = start(
        &rt,
        Answer::Body(200, "STATUS=94&MESSAGE=not eligible".into()),
        false,
    );
    let mut client = BlockingTssClient::new(config(r.server.url(), 2)).unwrap();
    let transport: &mut dyn TssTransport = &mut client;
    // A refusal is an answer: handed back raw for the personalizer to parse.
    assert_eq!(
        transport.request(b"x").unwrap(),
        b"STATUS=94&MESSAGE=not eligible"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut dead = BlockingTssClient::new(config(format!("http://127.0.0.1:{port}"), 2)).unwrap();
    match TssTransport::request(&mut dead, b"x") {
        Err(TssTransportError::Unreachable(why)) => {
            assert!(why.starts_with("no answer after 2 attempt(s)"), "{why}");
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

/// The iPhone13,2 manifest carries BMU (T200) and Rap (Rose) firmware; mac-sim's TSS signs
/// both. Built, sent over HTTP, and answered with FirmwareData, as restore mode would.
#[test]
fn bmu_and_rose_updaters_go_through_the_simulated_tss() {
    use mac_sim::services::tss::{TssConfig, TssService};
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/manifests/iOS_26.2.1_23C71_iPhone13,2/BuildManifest.plist"
    ));
    let path = std::env::var_os("MACRESCUE_SHARED")
        .map(|s| {
            PathBuf::from(s)
                .join("fixtures/manifests/iOS_26.2.1_23C71_iPhone13,2/BuildManifest.plist")
        })
        .unwrap_or(path);
    let manifest: Dictionary = plist::from_file(&path).unwrap();
    let identity = manifest["BuildIdentities"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_dictionary)
        .find(|i| {
            i["Manifest"]
                .as_dictionary()
                .unwrap()
                .contains_key("BMU,FirmwareMap")
        })
        .unwrap()
        .clone();
    let rt = runtime();
    let tss = Arc::new(TssService::new(TssConfig {
        manifests: vec![manifest],
        ..TssConfig::default()
    }));
    let server = rt
        .block_on(tss.start("127.0.0.1:0".parse().unwrap(), None))
        .unwrap();
    let client = TssClient::new(config(server.url(), 1)).unwrap();
    let dict = |pairs: Vec<(&str, Value)>| -> Dictionary {
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    };
    let args = |name: &str, info: Dictionary, ticket: &str| {
        dict(vec![
            ("MessageArgType", Value::from("FirmwareResponseData")),
            ("MessageArgUpdaterName", Value::from(name)),
            ("MessageArgInfo", Value::Dictionary(info)),
            (
                "DeviceGeneratedTags",
                Value::Dictionary(dict(vec![(
                    "ResponseTags",
                    Value::Array(vec![Value::from(ticket), Value::from("FirmwareData")]),
                )])),
            ),
        ])
    };
    let map = b"<?xml version=\"1.0\"?><plist version=\"1.0\"><dict><key>fw</key><string>x</string></dict></plist>".to_vec();
    let ftab = restore_agent::ftab::Ftab {
        tag: *b"rkos",
        entries: vec![restore_agent::ftab::FtabEntry {
            tag: *b"rkos",
            data: vec![1, 2, 3],
        }],
    }
    .to_bytes()
    .unwrap();
    let read = |path: String| {
        let (map, ftab) = (map.clone(), ftab.clone());
        async move {
            if path.ends_with("FirmwareMap.plist") {
                Ok(map)
            } else if path.contains("Rose") {
                Ok(ftab)
            } else {
                Err(format!("unexpected file {path}"))
            }
        }
    };

    let bmu = args(
        "T200",
        dict(vec![
            ("ChipID", Value::from(57601u64)),
            ("Nonce", Value::Data(vec![5; 32])),
            ("ProductionMode", Value::Boolean(true)),
            ("UniqueID", Value::from(0x1122u64)),
        ]),
        "BMU,Ticket",
    );
    let out = rt
        .block_on(client.firmware_updater(&identity, &bmu, read))
        .unwrap();
    assert!(out["BMU,Ticket"].as_data().unwrap().len() > 100);
    let fw: Dictionary = plist::from_bytes(out["FirmwareData"].as_data().unwrap()).unwrap();
    assert!(fw.contains_key("fw_map_digest") && fw.contains_key("fw"));

    let rose = args(
        "Rose",
        dict(vec![
            ("Rap,ChipID", Value::from(8198u64)),
            ("Rap,ECID", Value::from(0x77u64)),
            ("Rap,Nonce", Value::Data(vec![7; 32])),
            ("Rap,ProductionMode", Value::Boolean(true)),
            ("Rap,SecurityMode", Value::Boolean(true)),
        ]),
        "Rap,Ticket",
    );
    let out = rt
        .block_on(client.firmware_updater(&identity, &rose, read))
        .unwrap();
    assert!(out.contains_key("Rap,Ticket"));
    let t = restore_agent::ftab::Ftab::parse(out["FirmwareData"].as_data().unwrap()).unwrap();
    assert_eq!(t.entries[0].data, vec![1, 2, 3]);

    // Refused: the error names the coprocessor and the status.
    tss.faults.always_94.store(true, Ordering::Relaxed);
    let e = rt
        .block_on(client.firmware_updater(&identity, &bmu, read))
        .unwrap_err();
    assert!(matches!(&e, TssClientError::Updater { updater, .. } if updater == "T200"));
    assert!(
        e.to_string().contains("T200") && e.to_string().contains("94"),
        "{e}"
    );
}
