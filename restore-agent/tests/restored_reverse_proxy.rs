//! The reverse proxy (protocol.md §7.10) against a scripted device: control channel v2 and
//! the v1 fallback, connection channels, Ping/Pong, and a proxied connection relayed to a
//! 127.0.0.1 echo listener.

mod restored_support;

use std::time::Duration;

use plist::{Dictionary, Value};
use restore_agent::reverse_proxy::{self, ProtoVersion, ProxyConfig, ProxyError};
use restored_support::{dict, pair};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;

async fn send_plist(s: &mut DuplexStream, d: Dictionary) {
    let mut body = Vec::new();
    Value::Dictionary(d).to_writer_binary(&mut body).unwrap();
    s.write_all(&(body.len() as u32).to_le_bytes())
        .await
        .unwrap();
    s.write_all(&body).await.unwrap();
}

async fn recv_plist(s: &mut DuplexStream) -> Dictionary {
    let len = s.read_u32_le().await.unwrap();
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body).await.unwrap();
    assert!(body.starts_with(b"bplist00"));
    Value::from_reader(std::io::Cursor::new(body))
        .unwrap()
        .into_dictionary()
        .unwrap()
}

async fn echo_listener() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

fn proxy_request(port: u16) -> Vec<u8> {
    let host = b"127.0.0.1";
    let mut r = vec![0x00, 0x03, host.len() as u8];
    r.extend_from_slice(host);
    r.extend_from_slice(&port.to_be_bytes());
    r
}

/// Ping, then a proxied connection through the channel.
async fn exercise_channel(ch: &mut DuplexStream, echo_port: u16) {
    ch.write_all(&0xBBAAu16.to_le_bytes()).await.unwrap();
    send_plist(ch, dict(vec![("Command", "Ping".into())])).await;
    assert_eq!(recv_plist(ch).await, dict(vec![("Pong", true.into())]));

    ch.write_all(&0x0105u16.to_le_bytes()).await.unwrap();
    let req = proxy_request(echo_port);
    ch.write_all(&req).await.unwrap();
    assert_eq!(ch.read_u16_le().await.unwrap(), 5);
    let mut echo = vec![0u8; req.len()];
    ch.read_exact(&mut echo).await.unwrap();
    assert_eq!(echo, req);
    ch.write_all(b"hello through the Mac's proxy")
        .await
        .unwrap();
    let mut back = vec![0u8; 29];
    tokio::time::timeout(Duration::from_secs(5), ch.read_exact(&mut back))
        .await
        .expect("relayed")
        .unwrap();
    assert_eq!(&back, b"hello through the Mac's proxy");
}

#[tokio::test]
async fn control_v2_with_ping_and_proxy() {
    let echo_port = echo_listener().await;
    let (conn, mut dev) = pair();
    let host =
        tokio::spawn(async move { reverse_proxy::run(&*conn, &ProxyConfig::default()).await });

    let mut ctrl = dev.accept(1082).await;
    let mut hello = [0u8; 10];
    ctrl.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello, b"BeginCtrl\0");
    let begin = recv_plist(&mut ctrl).await;
    assert_eq!(
        begin.get("Command").and_then(Value::as_string),
        Some("BeginCtrl")
    );
    assert_eq!(
        begin
            .get("CtrlProtoVersion")
            .and_then(Value::as_unsigned_integer),
        Some(2)
    );
    send_plist(
        &mut ctrl,
        dict(vec![("ConnPort", Value::Integer(1083.into()))]),
    )
    .await;

    ctrl.write_all(&1u32.to_le_bytes()).await.unwrap();
    let mut ch = dev.accept(1083).await;
    ch.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello, b"HelloConn\0");
    send_plist(
        &mut ch,
        dict(vec![
            ("Command", "HelloConn".into()),
            ("Identifier", "abc".into()),
        ]),
    )
    .await;
    exercise_channel(&mut ch, echo_port).await;

    ctrl.write_all(&2u32.to_le_bytes()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), host)
        .await
        .expect("shutdown ends the proxy")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn control_v1_fallback() {
    let echo_port = echo_listener().await;
    let (conn, mut dev) = pair();
    let host =
        tokio::spawn(async move { reverse_proxy::run(&*conn, &ProxyConfig::default()).await });

    // A v1 device does not understand BeginCtrl and drops the connection.
    let mut first = dev.accept(1082).await;
    let mut hello = [0u8; 10];
    first.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello, b"BeginCtrl\0");
    drop(first);

    let mut ctrl = dev.accept(1082).await;
    ctrl.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello, b"HelloCtrl\0");
    ctrl.write_all(b"HelloCtrl").await.unwrap();
    ctrl.write_all(&2000u16.to_le_bytes()).await.unwrap();

    ctrl.write_all(&1u32.to_le_bytes()).await.unwrap();
    let mut ch = dev.accept(2000).await;
    ch.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello, b"HelloConn\0");
    ch.write_all(b"HelloConn\0").await.unwrap();
    exercise_channel(&mut ch, echo_port).await;

    // The device closing the control channel ends the proxy quietly.
    drop(ctrl);
    tokio::time::timeout(Duration::from_secs(5), host)
        .await
        .expect("EOF ends the proxy")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn unreachable_upstream_and_bad_requests_are_named() {
    // A port nothing listens on.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let (host, mut dev) = tokio::io::duplex(4096);
    let task = tokio::spawn(async move {
        reverse_proxy::connection_channel(host, ProtoVersion::V1, &ProxyConfig::default()).await
    });
    let mut hello = [0u8; 10];
    dev.read_exact(&mut hello).await.unwrap();
    dev.write_all(b"HelloConn\0").await.unwrap();
    dev.write_all(&0x0105u16.to_le_bytes()).await.unwrap();
    dev.write_all(&proxy_request(closed)).await.unwrap();
    let err = task.await.unwrap().unwrap_err();
    assert!(
        matches!(err, ProxyError::Upstream { port, .. } if port == closed),
        "{err:?}"
    );
    assert!(err.to_string().contains("uplink"), "{err}");

    let (host, mut dev) = tokio::io::duplex(4096);
    let task = tokio::spawn(async move {
        reverse_proxy::connection_channel(host, ProtoVersion::V1, &ProxyConfig::default()).await
    });
    dev.read_exact(&mut hello).await.unwrap();
    dev.write_all(b"HelloConn\0").await.unwrap();
    dev.write_all(&0x0105u16.to_le_bytes()).await.unwrap();
    dev.write_all(&[0x05, 0x01, 0x00]).await.unwrap();
    assert!(matches!(
        task.await.unwrap(),
        Err(ProxyError::BadRequest(_))
    ));

    // A wrong v1 greeting.
    let (host, mut dev) = tokio::io::duplex(4096);
    let task = tokio::spawn(async move {
        reverse_proxy::connection_channel(host, ProtoVersion::V1, &ProxyConfig::default()).await
    });
    dev.read_exact(&mut hello).await.unwrap();
    dev.write_all(b"GoodbyeXX\0").await.unwrap();
    assert!(matches!(
        task.await.unwrap(),
        Err(ProxyError::BadGreeting(_))
    ));
}
