//! `mac-sim tss` and `mac-sim make-ipsw` as a script or the VM demo runs them.

mod tss_request;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use mac_sim::board::manifests_dir;
use mac_sim::services::tss::parse_reply_body;
use plist::Value;

/// Kills the server even when an assertion fails.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn tss_subcommand_serves_https_with_the_ca_it_wrote() {
    let dir = std::env::temp_dir().join(format!("mac-sim-tss-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    let manifest = manifests_dir().join("J274AP.BuildManifest.plist");
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_mac-sim"))
            .args([
                "tss",
                "--listen",
                "127.0.0.1:0",
                "--tls",
                "--signed-build",
                "25C56",
            ])
            .arg("--manifest")
            .arg(&manifest)
            .arg("--ca-out")
            .arg(&ca)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().to_string();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    assert!(url.ends_with("/TSS/controller?action=2"), "{url}");
    let pem = std::fs::read(&ca).unwrap();
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let id = Value::from_file(&manifest)
        .unwrap()
        .as_dictionary()
        .unwrap()["BuildIdentities"]
        .as_array()
        .unwrap()[1]
        .as_dictionary()
        .unwrap()
        .clone();
    let req = tss_request::main_request(&id, 0x42, &[1; 32], true, false);
    let body = client
        .post(&url)
        .body(tss_request::xml(&req))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let (status, message, plist) = parse_reply_body(&body).unwrap();
    assert_eq!((status, message.as_str()), (0, "SUCCESS"));
    assert!(plist.unwrap().contains_key("ApImg4Ticket"));
    drop(child);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn tss_subcommand_faults_and_unsigned_builds() {
    let manifest = manifests_dir().join("J274AP.BuildManifest.plist");
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_mac-sim"))
            .args(["tss", "--drop-first", "1", "--signed-build", "24A1"])
            .arg("--manifest")
            .arg(&manifest)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let id = Value::from_file(&manifest)
        .unwrap()
        .as_dictionary()
        .unwrap()["BuildIdentities"]
        .as_array()
        .unwrap()[1]
        .as_dictionary()
        .unwrap()
        .clone();
    let body = tss_request::xml(&tss_request::main_request(&id, 0x42, &[1; 32], true, false));
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    assert!(client.post(&url).body(body.clone()).send().await.is_err());
    let text = client
        .post(&url)
        .body(body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        text,
        "STATUS=94&MESSAGE=This device isn't eligible for the requested build."
    );
}

#[test]
fn make_ipsw_subcommand_writes_a_zip() {
    let out = std::env::temp_dir().join(format!("mac-sim-cli-{}.ipsw", std::process::id()));
    let st = Command::new(env!("CARGO_BIN_EXE_mac-sim"))
        .args([
            "make-ipsw",
            "--board",
            "j414sap",
            "--os-size",
            "70000",
            "--deflate-os",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let z = zip::ZipArchive::new(std::fs::File::open(&out).unwrap()).unwrap();
    assert!(z.file_names().any(|n| n == "BuildManifest.plist"));
    assert!(z
        .file_names()
        .any(|n| n == "Firmware/dfu/iBSS.j414s.RELEASE.im4p"));
    std::fs::remove_file(&out).unwrap();
    // An unknown board is explained.
    let st = Command::new(env!("CARGO_BIN_EXE_mac-sim"))
        .args([
            "make-ipsw",
            "--board",
            "j999ap",
            "--out",
            "/nonexistent/x.ipsw",
        ])
        .output()
        .unwrap();
    assert!(!st.status.success());
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(err.contains("mac-sim boards"), "{err}");
}
