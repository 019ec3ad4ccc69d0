//! The `restore-agent download` command as separate processes against the simulated CDN: a
//! station killed mid-download resumes without re-fetching what it had, and two restores of the
//! same build in two processes download it once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mac_sim::services::cdn::{
    bytes_served_twice, generated_sha1, overlap, Cdn, CdnConfig, CdnFile,
};

const MIB: u64 = 1 << 20;
const NAME: &str = "UniversalMac_26.2_25C56_Restore.ipsw";
const AGENT: &str = env!("CARGO_BIN_EXE_restore-agent");

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("macrescue-dlp-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn agent(url: &str, cache: &Path, connections: u32, sha1: &[u8; 20]) -> Child {
    Command::new(AGENT)
        .args(["download", "--url", url, "--cache"])
        .arg(cache)
        .args(["--connections", &connections.to_string()])
        .args(["--sha1", &hex::encode(sha1)])
        .args(["--save-every-ms", "50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finished(child: Child) -> Output {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "restore-agent failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn a_killed_download_resumes_without_refetching_what_it_had() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let size = 16 * MIB;
    let connections = 4u64;
    // 1 MiB/s per connection: about 4 s for the whole file, so the kill lands mid-file.
    let cdn: Cdn = rt
        .block_on(Cdn::start(
            "127.0.0.1:0".parse().unwrap(),
            None,
            CdnConfig {
                files: vec![CdnFile::generated(NAME, size, 21)],
                rate: Some(MIB),
                faults: vec![],
            },
        ))
        .unwrap();
    let dir = scratch("kill");
    let sha1 = generated_sha1(21, size);
    let url = cdn.url(NAME);

    let mut child = agent(&url, &dir, connections as u32, &sha1);
    let deadline = Instant::now() + Duration::from_secs(60);
    while cdn.totals().body_bytes < 6 * MIB {
        assert!(Instant::now() < deadline, "the download never got going");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL: no chance to save anything more
    child.wait().unwrap();
    let first = cdn.take_served(NAME);
    assert!(dir.join(format!("{NAME}.state")).exists());
    assert!(!dir.join(NAME).exists());

    let out = finished(agent(&url, &dir, connections as u32, &sha1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout.trim(), dir.join(NAME).display().to_string());
    assert!(stderr.contains("resuming:"), "{stderr}");
    assert!(stderr.contains(&hex::encode(sha1)), "{stderr}");
    let second = cdn.take_served(NAME);

    // Parts in flight at the kill may be fetched again (from their last recorded point); no
    // other byte may be. The default part size for this file is 1 MiB.
    let refetched = overlap(&first, &second);
    let in_flight = connections * MIB;
    eprintln!("re-fetched after the kill: {refetched} bytes (bound {in_flight})");
    assert!(
        refetched <= in_flight,
        "{refetched} > {in_flight}\nfirst run: {first:?}\nsecond run: {second:?}"
    );
    assert_eq!(bytes_served_twice(&second), 0);
    let first_total: u64 = first.iter().map(|s| s.end - s.start).sum();
    let second_total: u64 = second.iter().map(|s| s.end - s.start).sum();
    assert_eq!(first_total + second_total - refetched, size);
    assert_eq!(
        std::fs::metadata(dir.join(NAME)).unwrap().len(),
        size,
        "complete file in place"
    );
    assert!(!dir.join(format!("{NAME}.state")).exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_processes_downloading_one_file_fetch_it_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let size = 4 * MIB;
    let cdn: Cdn = rt
        .block_on(Cdn::start(
            "127.0.0.1:0".parse().unwrap(),
            None,
            CdnConfig {
                files: vec![CdnFile::generated(NAME, size, 22)],
                rate: Some(2 * MIB),
                faults: vec![],
            },
        ))
        .unwrap();
    let dir = scratch("two");
    let sha1 = generated_sha1(22, size);
    let url = cdn.url(NAME);
    let a = agent(&url, &dir, 4, &sha1);
    let b = agent(&url, &dir, 4, &sha1);
    let (a, b) = (finished(a), finished(b));
    assert_eq!(a.stdout, b.stdout);
    assert_eq!(
        String::from_utf8_lossy(&a.stdout).trim(),
        dir.join(NAME).display().to_string()
    );
    let waited = [&a, &b]
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.stderr).contains("another restore is downloading"))
        .count();
    assert_eq!(waited, 1);
    assert_eq!(cdn.totals().body_bytes, size, "downloaded once");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn model_and_build_are_looked_up_in_the_catalog() {
    use mac_sim::services::catalog::{mesu_url, CatalogBuild, CatalogService};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let size = 2 * MIB + 5;
    let sha1 = generated_sha1(23, size);
    let (cdn, catalog_url) = rt.block_on(async {
        let cdn = Cdn::start(
            "127.0.0.1:0".parse().unwrap(),
            None,
            CdnConfig {
                files: vec![CdnFile::generated(NAME, size, 23)],
                rate: None,
                faults: vec![],
            },
        )
        .await
        .unwrap();
        let service = CatalogService::from_builds(vec![CatalogBuild {
            product_type: "Mac14,2".into(),
            version: "26.2".into(),
            build: "25C56".into(),
            url: cdn.url(NAME),
            sha1: Some(hex::encode(sha1)),
        }]);
        let server = service
            .start("127.0.0.1:0".parse().unwrap(), None)
            .await
            .unwrap();
        (cdn, mesu_url(&server))
    });
    let dir = scratch("model");
    let run = |build: &str| {
        Command::new(AGENT)
            .args(["download", "--model", "Mac14,2", "--build", build])
            .args(["--catalog-url", &catalog_url, "--no-fallback", "--cache"])
            .arg(&dir)
            .output()
            .unwrap()
    };
    let out = run("25C56");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        dir.join(NAME).display().to_string()
    );
    // The catalog's SHA-1 was checked (it is what the agent reports).
    assert!(stderr.contains(&hex::encode(sha1)), "{stderr}");
    assert_eq!(cdn.totals().body_bytes, size);

    let out = run("25A1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("offers no build 25A1 for Mac14,2 (it offers: 25C56)"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
