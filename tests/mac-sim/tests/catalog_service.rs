//! `mac-sim catalog` as a process: prints its URLs, serves the generated or fixture catalog,
//! its ipsw.me mirror, faults, and HTTPS with the CA it writes out.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

struct Running {
    child: Child,
    mesu: String,
    ipsw_me: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Only the child this test started.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[&str]) -> Running {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mac-sim"))
        .arg("catalog")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = |prefix: &str| {
        let line = lines.next().unwrap().unwrap();
        line.strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{line:?} does not start with {prefix:?}"))
            .to_string()
    };
    let mesu = next("mesu: ");
    let ipsw_me = next("ipsw.me: ");
    Running {
        child,
        mesu,
        ipsw_me,
    }
}

fn get(client: &reqwest::Client, url: &str) -> (u16, Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = client.get(url).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.bytes().await.unwrap().to_vec())
    })
}

fn plain() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

const SHA: &str = "f034b05ce26abe3c8e5ae8f1f6574119b10cafbe";

#[test]
fn generated_catalog_with_a_faulty_primary() {
    let build = format!("Mac14,2:26.2:25C56:http://cdn.invalid:8080/a.ipsw:{SHA}");
    let sim = start(&["--build", &build, "--fault-mesu", "503"]);
    assert!(sim.mesu.ends_with(mac_sim::services::catalog::MESU_PATH));
    let client = plain();
    assert_eq!(get(&client, &sim.mesu).0, 503);
    let (status, body) = get(&client, &format!("{}/v4/device/Mac14,2", sim.ipsw_me));
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["identifier"], "Mac14,2");
    assert_eq!(
        json["firmwares"][0]["url"],
        "http://cdn.invalid:8080/a.ipsw"
    );
    assert_eq!(json["firmwares"][0]["sha1sum"], SHA);
    let (status, _) = get(&client, &format!("{}/v4/device/Mac99,1", sim.ipsw_me));
    assert_eq!(status, 404);
}

#[test]
fn a_fixture_is_served_byte_for_byte_over_tls() {
    let shared = std::env::var_os("MACRESCUE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared")));
    let fixture = shared.join("fixtures/catalogs/com_apple_macOSIPSW.2025-12-21.26.2_25C56.xml");
    let ca = std::env::temp_dir().join(format!("mac-sim-catalog-ca-{}.pem", std::process::id()));
    let sim = start(&[
        "--fixture",
        fixture.to_str().unwrap(),
        "--tls",
        "--ca-out",
        ca.to_str().unwrap(),
    ]);
    assert!(sim.mesu.starts_with("https://"));
    let pem = std::fs::read(&ca).unwrap();
    let client = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let (status, body) = get(&client, &sim.mesu);
    assert_eq!(status, 200);
    assert_eq!(body, std::fs::read(&fixture).unwrap());
    // The mirror lists the fixture's Macmini9,1 build with its SHA-1.
    let (status, body) = get(&client, &format!("{}/v4/device/Macmini9,1", sim.ipsw_me));
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["firmwares"][0]["buildid"], "25C56");
    assert_eq!(json["firmwares"][0]["sha1sum"], SHA);
    let _ = std::fs::remove_file(ca);
}
