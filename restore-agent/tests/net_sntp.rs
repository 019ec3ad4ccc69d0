//! The clock path end to end against a tiny SNTP server on 127.0.0.1: `net::start` with no
//! managed links, a configured server, `wait_for_clock`, and a dry-run clock (the host clock is
//! never touched).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use restore_agent::net::sntp::{self, Reply, Timestamp};
use restore_agent::net::{self, ClockState, DryRunClock, NetConfig, Reachability};
use tokio::net::UdpSocket;

/// Answers every request with `now + skew`, or with a kiss-of-death when `kiss` is set.
async fn sntp_server(skew: Duration, kiss: bool) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 128];
        while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
            if n < sntp::PACKET_LEN {
                continue;
            }
            let mut origin = [0u8; 8];
            origin.copy_from_slice(&buf[40..48]);
            let t = Timestamp::from_system(SystemTime::now() + skew);
            let mut reply = Reply {
                leap: 0,
                stratum: if kiss { 0 } else { 2 },
                origin: Timestamp(u64::from_be_bytes(origin)),
                receive: t,
                transmit: t,
            }
            .emit();
            if kiss {
                reply[12..16].copy_from_slice(b"DENY");
            }
            let _ = sock.send_to(&reply, peer).await;
        }
    });
    addr
}

fn config(ntp: SocketAddr, reach: String) -> NetConfig {
    NetConfig {
        // No links are managed: this test only reads the host's netlink state.
        interfaces: Some(Vec::new()),
        dhcp: false,
        resolv_conf: std::env::temp_dir().join("macrescue-unused-resolv.conf"),
        ntp_servers: vec![ntp.to_string()],
        ntp_fallback: None,
        sntp_timeout: Duration::from_secs(2),
        ntp_wait_for_dhcp: Duration::ZERO,
        reachability_targets: vec![reach],
        reachability_interval: Duration::from_millis(200),
        ..NetConfig::default()
    }
}

#[tokio::test]
async fn clock_is_set_from_a_configured_server_before_tls() {
    let skew = Duration::from_secs(3 * 86_400);
    let ntp = sntp_server(skew, false).await;
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reach = tcp.local_addr().unwrap().to_string();
    let clock = Arc::new(DryRunClock::default());
    let handle = net::start(config(ntp, reach), clock.clone()).unwrap();
    let sync = handle
        .wait_for_clock(Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(sync.server, ntp);
    // Three days forward, give or take scheduling on a busy CI machine.
    assert!(
        (sync.step_secs - skew.as_secs_f64()).abs() < 5.0,
        "{sync:?}"
    );
    let set = clock.set_to.lock().unwrap().clone();
    assert_eq!(set.len(), 1);
    let off = set[0].duration_since(SystemTime::now()).unwrap();
    assert!(
        off > skew - Duration::from_secs(5) && off < skew + Duration::from_secs(1),
        "{off:?}"
    );

    let mut rx = handle.status();
    let st = tokio::time::timeout(
        Duration::from_secs(20),
        rx.wait_for(|s| s.apple == Reachability::Reachable),
    )
    .await
    .expect("the reachability check never succeeded")
    .unwrap()
    .clone();
    assert!(matches!(st.clock, ClockState::Synced { .. }));
    assert_eq!(st.proxy, None);
}

#[tokio::test]
async fn a_refusing_server_is_reported_and_the_clock_untouched() {
    let ntp = sntp_server(Duration::ZERO, true).await;
    let clock = Arc::new(DryRunClock::default());
    let cfg = config(ntp, "127.0.0.1:9".into());
    let handle = net::start(cfg, clock.clone()).unwrap();
    let mut rx = handle.status();
    let st = tokio::time::timeout(
        Duration::from_secs(20),
        rx.wait_for(|s| matches!(s.clock, ClockState::Failing(_))),
    )
    .await
    .expect("no failure was reported")
    .unwrap()
    .clone();
    let ClockState::Failing(why) = st.clock else {
        unreachable!()
    };
    assert!(why.contains("kiss code DENY"), "{why}");
    let e = handle
        .wait_for_clock(Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("UDP port 123"), "{e}");
    assert!(clock.set_to.lock().unwrap().is_empty());
}
