//! A simulated firmware catalog: Apple's mesu macOS IPSW catalog (an XML plist) and the
//! ipsw.me v4 device API (JSON), both from the same configured builds, so an agent's primary
//! source and its fallback can be exercised against each other.
//!
//! The catalog is either generated from [`CatalogBuild`]s or a real catalog file served byte
//! for byte (`--fixture`); the ipsw.me answer mirrors whatever the mesu side lists. Each
//! source has its own [`Fault`], switchable while running, and counts its requests.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plist::{Dictionary, Value};

use super::http::{handler, Handler, Request, Responder, Server};

/// Path of the catalog on mesu.apple.com (protocol.md §9.2).
pub const MESU_PATH: &str = "/assets/macos/com_apple_macOSIPSW/com_apple_macOSIPSW.xml";
/// Prefix of the ipsw.me v4 device endpoint (§9.1); the product type follows.
pub const IPSW_ME_DEVICE_PREFIX: &str = "/v4/device/";

/// Errors setting up the catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogServiceError {
    #[error("--build {0:?} is not PRODUCT:VERSION:BUILD:URL:SHA1 (SHA1 may be empty)")]
    BadBuild(String),
    #[error("SHA-1 {0:?} is not 40 hex digits")]
    BadSha1(String),
    #[error("the fixture catalog is not a plist: {0}")]
    Fixture(String),
    #[error("unknown fault {0:?}: use none, 500 (any status), garbage, html, stall=MS or drop")]
    BadFault(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Pki(#[from] super::pki::PkiError),
}

/// One restore image offered for a product type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogBuild {
    pub product_type: String,
    pub version: String,
    pub build: String,
    pub url: String,
    /// 40 lowercase hex digits, or `None` (Apple omits it for `VirtualMac2,1`).
    pub sha1: Option<String>,
}

impl FromStr for CatalogBuild {
    type Err = CatalogServiceError;

    /// `PRODUCT:VERSION:BUILD:URL:SHA1`; the URL may contain colons, the SHA-1 is after the
    /// last one.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CatalogServiceError::BadBuild(s.to_string());
        let mut parts = s.splitn(4, ':');
        let (Some(product_type), Some(version), Some(build), Some(rest)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let (url, sha1) = rest.rsplit_once(':').ok_or_else(bad)?;
        if [product_type, version, build, url]
            .iter()
            .any(|p| p.is_empty())
            || !url.contains("://")
        {
            return Err(bad());
        }
        let sha1 = match sha1 {
            "" => None,
            h if h.len() == 40 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Some(h.to_ascii_lowercase())
            }
            h => return Err(CatalogServiceError::BadSha1(h.to_string())),
        };
        Ok(CatalogBuild {
            product_type: product_type.into(),
            version: version.into(),
            build: build.into(),
            url: url.into(),
            sha1,
        })
    }
}

/// What a source does instead of answering properly.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// Answer with this HTTP status and a short text body.
    Status(u16),
    /// 200 with bytes that are neither a plist nor JSON.
    Garbage,
    /// 200 with an HTML error page, as CDNs and captive portals do.
    Html,
    /// Send the headers, then nothing for this long, then close (a read timeout).
    Stall(Duration),
    /// Close the connection without answering.
    Drop,
}

impl FromStr for Fault {
    type Err = CatalogServiceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CatalogServiceError::BadFault(s.to_string());
        Ok(match s {
            "none" => Fault::None,
            "garbage" => Fault::Garbage,
            "html" => Fault::Html,
            "drop" => Fault::Drop,
            _ => {
                if let Some(ms) = s.strip_prefix("stall=") {
                    Fault::Stall(Duration::from_millis(ms.parse().map_err(|_| bad())?))
                } else {
                    let status: u16 = s.parse().map_err(|_| bad())?;
                    if !(100..=599).contains(&status) {
                        return Err(bad());
                    }
                    Fault::Status(status)
                }
            }
        })
    }
}

/// Which half of the service a request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Mesu,
    IpswMe,
}

struct State {
    mesu: Vec<u8>,
    /// Product type → builds, for the ipsw.me side.
    devices: BTreeMap<String, Vec<CatalogBuild>>,
    mesu_fault: Mutex<Fault>,
    ipsw_me_fault: Mutex<Fault>,
    mesu_hits: AtomicU64,
    ipsw_me_hits: AtomicU64,
}

/// The simulated catalog service. Cheap to clone; clones share faults and counters.
#[derive(Clone)]
pub struct CatalogService {
    state: Arc<State>,
}

impl CatalogService {
    /// A service listing `builds`, with the mesu catalog generated from them.
    pub fn from_builds(builds: Vec<CatalogBuild>) -> Self {
        let mesu = render_mesu(&builds);
        Self::with(mesu, builds)
    }

    /// A service serving a real catalog file as is; the ipsw.me side mirrors its entries plus
    /// any extra `builds`.
    pub fn from_fixture(
        catalog: Vec<u8>,
        extra: Vec<CatalogBuild>,
    ) -> Result<Self, CatalogServiceError> {
        let mut builds = builds_in_catalog(&catalog)?;
        builds.extend(extra);
        Ok(Self::with(catalog, builds))
    }

    fn with(mesu: Vec<u8>, builds: Vec<CatalogBuild>) -> Self {
        let mut devices: BTreeMap<String, Vec<CatalogBuild>> = BTreeMap::new();
        for b in builds {
            let list = devices.entry(b.product_type.clone()).or_default();
            if !list.iter().any(|x| x.build == b.build) {
                list.push(b);
            }
        }
        Self {
            state: Arc::new(State {
                mesu,
                devices,
                mesu_fault: Mutex::new(Fault::None),
                ipsw_me_fault: Mutex::new(Fault::None),
                mesu_hits: AtomicU64::new(0),
                ipsw_me_hits: AtomicU64::new(0),
            }),
        }
    }

    /// The exact bytes served as the mesu catalog.
    pub fn mesu_bytes(&self) -> &[u8] {
        &self.state.mesu
    }

    /// Builds listed for `product_type` on the ipsw.me side.
    pub fn builds(&self, product_type: &str) -> &[CatalogBuild] {
        self.state
            .devices
            .get(product_type)
            .map_or(&[], Vec::as_slice)
    }

    pub fn set_fault(&self, source: Source, fault: Fault) {
        let slot = match source {
            Source::Mesu => &self.state.mesu_fault,
            Source::IpswMe => &self.state.ipsw_me_fault,
        };
        // A poisoned lock only means a test panicked elsewhere; the value is still usable.
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    /// Requests received by one source so far.
    pub fn requests(&self, source: Source) -> u64 {
        match source {
            Source::Mesu => self.state.mesu_hits.load(Ordering::SeqCst),
            Source::IpswMe => self.state.ipsw_me_hits.load(Ordering::SeqCst),
        }
    }

    /// The HTTP handler (to mount on a [`Server`]).
    pub fn handler(&self) -> Handler {
        let state = Arc::clone(&self.state);
        handler(move |req, resp| {
            let state = Arc::clone(&state);
            async move { serve(&state, req, resp).await }
        })
    }

    /// Listens on `addr` (port 0 for any). Must be called inside a tokio runtime.
    pub async fn start(
        &self,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> io::Result<Server> {
        Server::start(addr, tls, self.handler()).await
    }
}

/// The catalog URL on a running server.
pub fn mesu_url(server: &Server) -> String {
    format!("{}{MESU_PATH}", server.url())
}

async fn serve(state: &State, req: Request, resp: Responder) -> io::Result<()> {
    if req.method != "GET" && req.method != "HEAD" {
        return resp.send(405, &[], b"GET only\n").await;
    }
    let (source, fault) = if req.path == MESU_PATH {
        state.mesu_hits.fetch_add(1, Ordering::SeqCst);
        (Source::Mesu, lock(&state.mesu_fault))
    } else if req.path.starts_with(IPSW_ME_DEVICE_PREFIX) {
        state.ipsw_me_hits.fetch_add(1, Ordering::SeqCst);
        (Source::IpswMe, lock(&state.ipsw_me_fault))
    } else {
        return resp.send(404, &[], b"not found\n").await;
    };
    tracing::debug!(?source, path = %req.path, ?fault, "catalog request");
    match fault {
        Fault::None => {}
        Fault::Status(status) => {
            let body = format!("simulated error {status}\n");
            return resp.send(status, &[], body.as_bytes()).await;
        }
        Fault::Garbage => {
            return resp
                .send(200, &[], b"\x00\xff\xfenot a catalog\x01{[<")
                .await
        }
        Fault::Html => {
            let html =
                b"<html><head><title>Error</title></head><body>Service unavailable</body></html>";
            return resp
                .send(200, &[("Content-Type", "text/html".into())], html)
                .await;
        }
        Fault::Stall(d) => {
            let mut resp = resp;
            resp.head(200, &[], Some(1 << 20)).await?;
            tokio::time::sleep(d).await;
            resp.abort();
            return Ok(());
        }
        Fault::Drop => {
            resp.abort();
            return Ok(());
        }
    }
    let (status, content_type, body) = match source {
        Source::Mesu => (200, "application/xml", state.mesu.clone()),
        Source::IpswMe => {
            let product_type = percent_decode(&req.path[IPSW_ME_DEVICE_PREFIX.len()..]);
            match state.devices.get(&product_type) {
                Some(builds) => (200, "application/json", ipsw_me_json(&product_type, builds)),
                None => (
                    404,
                    "application/json",
                    br#"{"message":"Device not found"}"#.to_vec(),
                ),
            }
        }
    };
    let headers = [("Content-Type", content_type.to_string())];
    if req.method == "HEAD" {
        let mut resp = resp;
        resp.head(status, &headers, Some(body.len() as u64)).await?;
        return resp.finish().await;
    }
    resp.send(status, &headers, &body).await
}

fn lock(m: &Mutex<Fault>) -> Fault {
    m.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// `%2C` → `,` (clients may escape the comma of a product type).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mesu schema (§9.2): `MobileDeviceSoftwareVersionsByVersion/1/MobileDeviceSoftwareVersions
/// /<ProductType>/<Build>/Restore`.
pub fn render_mesu(builds: &[CatalogBuild]) -> Vec<u8> {
    let mut versions = Dictionary::new();
    for b in builds {
        let mut restore = Dictionary::new();
        restore.insert("BuildVersion".into(), b.build.clone().into());
        restore.insert("DocumentationURL".into(), String::new().into());
        if let Some(sha1) = &b.sha1 {
            restore.insert("FirmwareSHA1".into(), sha1.clone().into());
        }
        restore.insert("FirmwareURL".into(), b.url.clone().into());
        restore.insert("ProductVersion".into(), b.version.clone().into());
        let mut entry = Dictionary::new();
        entry.insert("Restore".into(), Value::Dictionary(restore));
        if !versions.contains_key(&b.product_type) {
            versions.insert(b.product_type.clone(), Value::Dictionary(Dictionary::new()));
        }
        if let Some(d) = versions
            .get_mut(&b.product_type)
            .and_then(Value::as_dictionary_mut)
        {
            d.insert(b.build.clone(), Value::Dictionary(entry));
        }
    }
    let mut schema = Dictionary::new();
    schema.insert(
        "MobileDeviceSoftwareVersions".into(),
        Value::Dictionary(versions),
    );
    let mut by_version = Dictionary::new();
    by_version.insert("1".into(), Value::Dictionary(schema));
    let mut root = Dictionary::new();
    root.insert(
        "MobileDeviceSoftwareVersionsByVersion".into(),
        Value::Dictionary(by_version),
    );
    let mut out = Vec::new();
    // Writing a plist into a Vec cannot fail: no I/O error is possible and every value is a
    // plain string or dictionary.
    plist::to_writer_xml(&mut out, &Value::Dictionary(root)).expect("plist into memory");
    out
}

/// Every restore image a mesu-format catalog lists (newest schema only), as this simulator
/// reads it: `<Build>/Restore` and `Unknown/Universal/Restore`.
pub fn builds_in_catalog(catalog: &[u8]) -> Result<Vec<CatalogBuild>, CatalogServiceError> {
    let root = Value::from_reader(io::Cursor::new(catalog))
        .map_err(|e| CatalogServiceError::Fixture(e.to_string()))?;
    let schemas = root
        .as_dictionary()
        .and_then(|d| d.get("MobileDeviceSoftwareVersionsByVersion"))
        .and_then(Value::as_dictionary);
    let newest = schemas.and_then(|d| {
        d.iter()
            .filter_map(|(k, v)| Some((k.parse::<u64>().ok()?, v)))
            .max_by_key(|(k, _)| *k)
            .map(|(_, v)| v)
    });
    let Some(products) = newest
        .and_then(Value::as_dictionary)
        .and_then(|d| d.get("MobileDeviceSoftwareVersions"))
        .and_then(Value::as_dictionary)
    else {
        // Not an IPSW catalog (e.g. a MobileAsset catalog): serve it, list nothing.
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (product_type, builds) in products {
        let Some(builds) = builds.as_dictionary() else {
            continue;
        };
        for (key, entry) in builds {
            let entry = entry.as_dictionary();
            let restore = entry
                .and_then(|e| e.get("Restore"))
                .or_else(|| {
                    (key == "Unknown")
                        .then(|| entry?.get("Universal")?.as_dictionary()?.get("Restore"))
                        .flatten()
                })
                .and_then(Value::as_dictionary);
            let Some(r) = restore else { continue };
            let s = |k: &str| r.get(k).and_then(Value::as_string).map(str::to_string);
            let (Some(version), Some(build), Some(url)) =
                (s("ProductVersion"), s("BuildVersion"), s("FirmwareURL"))
            else {
                continue;
            };
            out.push(CatalogBuild {
                product_type: product_type.clone(),
                version,
                build,
                url,
                sha1: s("FirmwareSHA1").filter(|h| !h.is_empty()),
            });
        }
    }
    Ok(out)
}

/// The ipsw.me v4 `/device/<id>` answer (§9.1 field names).
pub fn ipsw_me_json(product_type: &str, builds: &[CatalogBuild]) -> Vec<u8> {
    let firmwares: Vec<serde_json::Value> = builds
        .iter()
        .map(|b| {
            serde_json::json!({
                "identifier": product_type,
                "version": b.version,
                "buildid": b.build,
                "sha1sum": b.sha1.clone().unwrap_or_default(),
                "md5sum": "",
                "filesize": 0,
                "url": b.url,
                "releasedate": null,
                "uploaddate": null,
                "signed": true,
            })
        })
        .collect();
    let device = serde_json::json!({
        "name": product_type,
        "identifier": product_type,
        "boardconfig": "",
        "platform": "",
        "cpid": 0,
        "bdid": 0,
        "firmwares": firmwares,
    });
    device.to_string().into_bytes()
}

/// `mac-sim catalog` arguments.
#[derive(Debug, clap::Args)]
pub struct CliArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Serve this catalog file as is (e.g. one from shared/fixtures/catalogs).
    #[arg(long)]
    pub fixture: Option<std::path::PathBuf>,
    /// PRODUCT:VERSION:BUILD:URL:SHA1 (repeatable; SHA1 may be empty).
    #[arg(long = "build")]
    pub builds: Vec<CatalogBuild>,
    /// Serve HTTPS with a freshly generated test CA.
    #[arg(long)]
    pub tls: bool,
    /// Where to write the test CA (PEM) for the agent's --ca-file.
    #[arg(long, requires = "tls")]
    pub ca_out: Option<std::path::PathBuf>,
    /// Fault of the mesu catalog: none, 500, garbage, html, stall=MS, drop.
    #[arg(long, default_value = "none")]
    pub fault_mesu: Fault,
    /// Fault of the ipsw.me API (same values).
    #[arg(long, default_value = "none")]
    pub fault_ipsw_me: Fault,
}

/// Runs `mac-sim catalog` until the process is killed; `ready` gets the mesu catalog URL and
/// the ipsw.me base URL once listening.
pub fn run_cli(args: CliArgs, ready: impl FnOnce(&str, &str)) -> Result<(), CatalogServiceError> {
    let io_err = |what: &str| {
        let what = what.to_string();
        move |source| CatalogServiceError::Io { what, source }
    };
    let service = match &args.fixture {
        Some(path) => {
            let bytes =
                std::fs::read(path).map_err(io_err(&format!("reading {}", path.display())))?;
            CatalogService::from_fixture(bytes, args.builds)?
        }
        None => CatalogService::from_builds(args.builds),
    };
    service.set_fault(Source::Mesu, args.fault_mesu);
    service.set_fault(Source::IpswMe, args.fault_ipsw_me);
    let tls = if args.tls {
        let pki = super::pki::TestPki::generate(&[])?;
        if let Some(path) = &args.ca_out {
            std::fs::write(path, &pki.ca_pem)
                .map_err(io_err(&format!("writing {}", path.display())))?;
        }
        Some(pki.server_config)
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io_err("starting the runtime"))?;
    runtime.block_on(async {
        let server = service
            .start(args.listen, tls)
            .await
            .map_err(io_err(&format!("listening on {}", args.listen)))?;
        ready(&mesu_url(&server), &server.url());
        std::future::pending::<()>().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "f034b05ce26abe3c8e5ae8f1f6574119b10cafbe";

    #[test]
    fn build_specs_allow_colons_in_the_url() {
        let b: CatalogBuild = format!("Mac14,2:26.2:25C56:http://127.0.0.1:8080/a.ipsw:{SHA}")
            .parse()
            .unwrap();
        assert_eq!(b.product_type, "Mac14,2");
        assert_eq!(b.url, "http://127.0.0.1:8080/a.ipsw");
        assert_eq!(b.sha1.as_deref(), Some(SHA));
        let no_sha: CatalogBuild = "Mac14,2:26.2:25C56:http://h/a.ipsw:".parse().unwrap();
        assert_eq!(no_sha.sha1, None);
        assert!("Mac14,2:26.2:25C56".parse::<CatalogBuild>().is_err());
        assert!("Mac14,2:26.2:25C56:nourl:".parse::<CatalogBuild>().is_err());
        assert!(matches!(
            "Mac14,2:26.2:25C56:http://h/a:abc".parse::<CatalogBuild>(),
            Err(CatalogServiceError::BadSha1(_))
        ));
    }

    #[test]
    fn faults_parse() {
        assert_eq!("500".parse::<Fault>().unwrap(), Fault::Status(500));
        assert_eq!(
            "stall=250".parse::<Fault>().unwrap(),
            Fault::Stall(Duration::from_millis(250))
        );
        assert_eq!("html".parse::<Fault>().unwrap(), Fault::Html);
        assert!("5000".parse::<Fault>().is_err());
        assert!("stall=x".parse::<Fault>().is_err());
    }

    #[test]
    fn generated_catalog_reads_back() {
        let builds = vec![
            format!("Mac14,2:26.2:25C56:http://h/a.ipsw:{SHA}")
                .parse::<CatalogBuild>()
                .unwrap(),
            "VirtualMac2,1:26.2:25C56:http://h/a.ipsw:".parse().unwrap(),
        ];
        let service = CatalogService::from_builds(builds.clone());
        let mut back = builds_in_catalog(service.mesu_bytes()).unwrap();
        back.sort_by(|a, b| a.product_type.cmp(&b.product_type));
        assert_eq!(back, builds);
        let json: serde_json::Value =
            serde_json::from_slice(&ipsw_me_json("Mac14,2", service.builds("Mac14,2"))).unwrap();
        assert_eq!(json["identifier"], "Mac14,2");
        assert_eq!(json["firmwares"][0]["sha1sum"], SHA);
        assert_eq!(json["firmwares"][0]["buildid"], "25C56");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("Mac14%2C2"), "Mac14,2");
        assert_eq!(percent_decode("Mac14,2"), "Mac14,2");
        assert_eq!(percent_decode("bad%2"), "bad%2");
        assert_eq!(percent_decode("%"), "%");
    }
}
