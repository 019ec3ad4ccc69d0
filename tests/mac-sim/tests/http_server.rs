//! The simulated services' HTTP core against a real client (reqwest with rustls).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use mac_sim::services::http::{handler, Server};
use mac_sim::services::pki::TestPki;

fn client(ca_pem: Option<&str>) -> reqwest::Client {
    let mut b = reqwest::Client::builder().use_rustls_tls().no_proxy();
    if let Some(pem) = ca_pem {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

#[tokio::test]
async fn serves_keep_alive_requests_over_tls_with_the_test_ca() {
    let pki = TestPki::generate(&[]).unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&connections);
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        Some(pki.server_config.clone()),
        handler(move |req, resp| {
            seen.fetch_max(req.connection as usize, Ordering::Relaxed);
            async move {
                let body = format!("{} {} {}", req.method, req.path, req.query);
                resp.send(
                    200,
                    &[("Content-Type", "text/plain".into())],
                    body.as_bytes(),
                )
                .await
            }
        }),
    )
    .await
    .unwrap();
    assert!(server.url().starts_with("https://127.0.0.1:"));
    let c = client(Some(&pki.ca_pem));
    for i in 0..3 {
        let t = c
            .get(format!("{}/a/b?x={i}", server.url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(t, format!("GET /a/b x={i}"));
    }
    // Keep-alive: one connection carried all three requests.
    assert_eq!(connections.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn an_untrusted_ca_is_refused() {
    let pki = TestPki::generate(&[]).unwrap();
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        Some(pki.server_config.clone()),
        handler(|_req, resp| async move { resp.send(200, &[], b"x").await }),
    )
    .await
    .unwrap();
    let err = client(None).get(server.url()).send().await.unwrap_err();
    assert!(err.is_connect() || err.is_request(), "{err}");
}

#[tokio::test]
async fn a_body_cut_mid_way_is_an_error_for_the_client() {
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        None,
        handler(|_req, mut resp| async move {
            resp.head(200, &[], Some(1000)).await?;
            resp.body(&[7u8; 100]).await?;
            resp.abort();
            Ok(())
        }),
    )
    .await
    .unwrap();
    let r = client(None).get(server.url()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.bytes().await.is_err(),
        "a truncated body must not look complete"
    );
}

#[tokio::test]
async fn posts_carry_their_body() {
    let server = Server::start(
        "127.0.0.1:0".parse().unwrap(),
        None,
        handler(|req, resp| async move {
            let n = req.body.len().to_string();
            resp.send(200, &[], n.as_bytes()).await
        }),
    )
    .await
    .unwrap();
    let t = client(None)
        .post(format!("{}/TSS/controller?action=2", server.url()))
        .body(vec![1u8; 70_000])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(t, "70000");
}
