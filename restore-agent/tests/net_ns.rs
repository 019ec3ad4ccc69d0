//! The agent's networking against a real DHCP server (Debian's dnsmasq) in network namespaces
//! this test creates: a veth pair between a "station" namespace and a "LAN" namespace. The
//! agent brings the link up, leases an address, sets the default route, writes resolv.conf
//! (to a temporary path), renews, sets the (dry-run) clock from the time server DHCP named,
//! and drops the lease when the cable is pulled. No traffic leaves the test's namespaces.
//!
//! Skips (printing why) when not root or when `ip`/`dnsmasq` are missing.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use restore_agent::net::sntp::{self, Reply, Timestamp};
use restore_agent::net::{self, ClockState, DryRunClock, NetConfig, NetStatus, Reachability};

const LAN_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const REACH_PORT: u16 = 8443;

struct Namespaces {
    station: String,
    lan: String,
    dnsmasq: Option<Child>,
    dir: PathBuf,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        if let Some(mut c) = self.dnsmasq.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.station, &self.lan] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn output(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -4 addr` of the station's link, as the kernel has it.
fn ipv4_addrs(station: &str) -> String {
    output(&[
        "ip",
        "-n",
        station,
        "-4",
        "addr",
        "show",
        "dev",
        "eth-rescue",
    ])
}

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: network namespaces need CAP_SYS_ADMIN".into());
    }
    for tool in ["ip", "dnsmasq"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "`{tool}` is not installed (apt-get install iproute2 dnsmasq-base)"
            ));
        }
    }
    let probe = format!("mr-probe-{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &probe])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _ = Command::new("ip")
        .args(["netns", "del", &probe])
        .stderr(Stdio::null())
        .status();
    (!ok).then(|| "network namespaces are unavailable here (`ip netns add` failed)".into())
}

/// Namespaces for one test; `tag` keeps the tests of one run apart.
fn setup(tag: &str) -> Namespaces {
    let id = format!("{tag}{}", std::process::id() % 100_000);
    let dir = std::env::temp_dir().join(format!("macrescue-net-ns-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let ns = Namespaces {
        station: format!("mr-st-{id}"),
        lan: format!("mr-lan-{id}"),
        dnsmasq: None,
        dir,
    };
    run(&["ip", "netns", "add", &ns.station]);
    run(&["ip", "netns", "add", &ns.lan]);
    // The station end stays down: bringing it up is the agent's job.
    run(&[
        "ip",
        "-n",
        &ns.station,
        "link",
        "add",
        "eth-rescue",
        "type",
        "veth",
        "peer",
        "name",
        "eth-lan",
        "netns",
        &ns.lan,
    ]);
    run(&[
        "ip",
        "-n",
        &ns.lan,
        "addr",
        "add",
        "10.77.0.1/24",
        "dev",
        "eth-lan",
    ]);
    run(&["ip", "-n", &ns.lan, "link", "set", "eth-lan", "up"]);
    run(&["ip", "-n", &ns.lan, "link", "set", "lo", "up"]);
    ns
}

fn start_dnsmasq(ns: &mut Namespaces) {
    let leases = ns.dir.join("leases");
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.lan,
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
            "--port=0",
        ])
        .args([
            "--interface=eth-lan",
            "--bind-interfaces",
            "--user=root",
            "--dhcp-authoritative",
            // No ping probe before an offer: the LAN is the test's own; it would cost seconds.
            "--no-ping",
        ])
        .args(["--dhcp-range=10.77.0.50,10.77.0.60,255.255.255.0,2m"])
        .args([
            "--dhcp-option=option:router,10.77.0.1",
            "--dhcp-option=option:dns-server,10.77.0.53",
        ])
        .args([
            "--dhcp-option=option:ntp-server,10.77.0.1",
            "--dhcp-option=option:domain-name,rescue.test",
        ])
        .arg(format!("--dhcp-leasefile={}", leases.display()))
        .arg(format!("--pid-file={}", ns.dir.join("pid").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dnsmasq");
    ns.dnsmasq = Some(child);
}

/// Moves the calling thread into a named namespace; sockets it opens afterwards live there.
fn enter(ns: &str) {
    let f = File::open(Path::new("/run/netns").join(ns)).unwrap();
    // SAFETY: f is an open namespace file; setns affects only this thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
}

/// The LAN's time server (and a TCP port standing in for Apple), in the LAN namespace.
fn lan_services(lan: String, skew: Duration) {
    std::thread::spawn(move || {
        enter(&lan);
        let tcp = std::net::TcpListener::bind((LAN_IP, REACH_PORT)).unwrap();
        std::thread::spawn(move || for _ in tcp.incoming() {});
        let udp = std::net::UdpSocket::bind((LAN_IP, sntp::PORT)).unwrap();
        let mut buf = [0u8; 128];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            if n < sntp::PACKET_LEN {
                continue;
            }
            let mut origin = [0u8; 8];
            origin.copy_from_slice(&buf[40..48]);
            let t = Timestamp::from_system(SystemTime::now() + skew);
            let reply = Reply {
                leap: 0,
                stratum: 1,
                origin: Timestamp(u64::from_be_bytes(origin)),
                receive: t,
                transmit: t,
            };
            let _ = udp.send_to(&reply.emit(), peer);
        }
    });
}

async fn wait(
    rx: &mut tokio::sync::watch::Receiver<NetStatus>,
    what: &str,
    f: impl FnMut(&NetStatus) -> bool,
) -> NetStatus {
    let got = tokio::time::timeout(Duration::from_secs(60), async {
        rx.wait_for(f).await.map(|s| s.clone())
    })
    .await;
    match got {
        Ok(Ok(s)) => s,
        _ => panic!(
            "timed out waiting for {what}; last status: {:#?}",
            *rx.borrow()
        ),
    }
}

#[test]
fn dhcp_lease_route_dns_renewal_and_clock_in_namespaces() {
    if let Some(why) = skip_reason() {
        println!("SKIPPED net_ns: {why}");
        return;
    }
    let mut ns = setup("a");
    start_dnsmasq(&mut ns);
    let skew = Duration::from_secs(86_400);
    lan_services(ns.lan.clone(), skew);

    let resolv = ns.dir.join("resolv.conf");
    let ipv6 = ns.dir.join("ipv6-conf");
    std::fs::create_dir_all(ipv6.join("eth-rescue")).unwrap();
    for k in ["accept_ra", "autoconf"] {
        std::fs::write(ipv6.join("eth-rescue").join(k), "0").unwrap();
    }
    let cfg = NetConfig {
        interfaces: Some(vec!["eth-rescue".into()]),
        // dnsmasq's shortest lease is 2 minutes (T1 = 60 s); renew sooner to see a renewal.
        dhcp_renew_cap: Some(Duration::from_secs(2)),
        resolv_conf: resolv.clone(),
        // A stand-in tree: the real sysctls of the station namespace are not the test's subject.
        ipv6_conf_dir: ipv6.clone(),
        ntp_fallback: None,
        ntp_wait_for_dhcp: Duration::from_secs(60),
        reachability_targets: vec![format!("{LAN_IP}:{REACH_PORT}")],
        reachability_interval: Duration::from_millis(300),
        ..NetConfig::default()
    };
    let station = ns.station.clone();
    let lan = ns.lan.clone();
    let clock = Arc::new(DryRunClock::default());
    let clock2 = clock.clone();
    let result = std::thread::spawn(move || {
        enter(&station);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let handle = net::start(cfg, clock2).unwrap();
            let mut rx = handle.status();
            let st = wait(&mut rx, "a DHCP lease", |s| {
                s.links.iter().any(|l| l.dhcp.is_some())
            })
            .await;
            let link = st.links.iter().find(|l| l.name == "eth-rescue").unwrap();
            let d = link.dhcp.clone().unwrap();
            let octets = d.address.octets();
            assert_eq!(&octets[..3], &[10, 77, 0]);
            assert!((50..=60).contains(&octets[3]), "{}", d.address);
            assert_eq!(d.prefix_len, 24);
            assert_eq!(d.gateway, Some(LAN_IP));
            assert_eq!(d.dns, vec![Ipv4Addr::new(10, 77, 0, 53)]);
            assert_eq!(d.ntp, vec![LAN_IP]);
            assert_eq!(d.domain.as_deref(), Some("rescue.test"));
            assert_eq!(st.gateway(), Some(LAN_IP));
            assert_eq!((d.lease_secs, d.renew_secs), (120, 2));

            // The kernel has what the status claims.
            let addrs = ipv4_addrs(&station);
            assert!(addrs.contains(&format!("inet {}/24", d.address)), "{addrs}");
            let routes = output(&["ip", "-n", &station, "route", "show", "default"]);
            assert!(
                routes.contains("default via 10.77.0.1 dev eth-rescue proto dhcp"),
                "{routes}"
            );
            assert_eq!(
                std::fs::read_to_string(&resolv).unwrap(),
                "# written by restore-agent from DHCP\nnameserver 10.77.0.53\nsearch rescue.test\n"
            );
            assert_eq!(
                std::fs::read_to_string(ipv6.join("eth-rescue/accept_ra")).unwrap(),
                "1"
            );
            assert_eq!(
                std::fs::read_to_string(ipv6.join("eth-rescue/autoconf")).unwrap(),
                "1"
            );
            // Loopback is up too (the agent's own services listen there).
            let lo = output(&["ip", "-n", &station, "link", "show", "lo"]);
            assert!(lo.contains(",UP") || lo.contains("<LOOPBACK,UP"), "{lo}");

            // The clock comes from the time server DHCP named.
            let sync = handle
                .wait_for_clock(Duration::from_secs(30))
                .await
                .unwrap();
            assert_eq!(sync.server, SocketAddr::from((LAN_IP, sntp::PORT)));
            assert!(
                (sync.step_secs - skew.as_secs_f64()).abs() < 5.0,
                "{sync:?}"
            );

            let st = wait(&mut rx, "Apple reachable", |s| {
                s.apple == Reachability::Reachable
            })
            .await;
            assert!(matches!(st.clock, ClockState::Synced { .. }));

            let st = wait(&mut rx, "a renewal", |s| {
                s.links
                    .iter()
                    .any(|l| l.dhcp.as_ref().is_some_and(|d| d.renewals >= 1))
            })
            .await;
            let renewed = st.links[0..].iter().find_map(|l| l.dhcp.clone()).unwrap();
            assert_eq!(renewed.address, d.address, "a renewal keeps the address");

            // Pull the cable: the lease, address and route go; plug it back: a lease again.
            run(&["ip", "-n", &lan, "link", "set", "eth-lan", "down"]);
            wait(&mut rx, "the lease to be dropped", |s| {
                s.links
                    .iter()
                    .any(|l| l.name == "eth-rescue" && !l.carrier && l.dhcp.is_none())
            })
            .await;
            let addrs = ipv4_addrs(&station);
            assert!(!addrs.contains("inet "), "{addrs}");
            run(&["ip", "-n", &lan, "link", "set", "eth-lan", "up"]);
            wait(&mut rx, "a lease after the cable came back", |s| {
                s.links.iter().any(|l| l.carrier && l.dhcp.is_some())
            })
            .await;
        });
    })
    .join();
    let set = clock.set_to.lock().unwrap().clone();
    drop(ns);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert!(!set.is_empty(), "the dry-run clock was never set");
}

/// The station starts networking before its config file is readable and applies the file's
/// `[net]` settings later: a link it no longer manages loses its lease and address at once, a
/// link it manages again gets one, and stopping removes what DHCP configured.
#[test]
fn settings_applied_after_the_start_take_links_away_and_back() {
    if let Some(why) = skip_reason() {
        println!("SKIPPED net_ns: {why}");
        return;
    }
    let mut ns = setup("b");
    start_dnsmasq(&mut ns);
    lan_services(ns.lan.clone(), Duration::ZERO);
    let ipv6 = ns.dir.join("ipv6-conf");
    std::fs::create_dir_all(ipv6.join("eth-rescue")).unwrap();
    let base = NetConfig {
        resolv_conf: ns.dir.join("resolv.conf"),
        ipv6_conf_dir: ipv6,
        ntp_fallback: None,
        reachability_targets: vec![format!("{LAN_IP}:{REACH_PORT}")],
        ..NetConfig::default()
    };
    let only = |name: &str| NetConfig {
        interfaces: Some(vec![name.to_string()]),
        ..base.clone()
    };
    // As the station starts before its config file: no clock, no targets to check yet.
    let early = NetConfig {
        set_clock: false,
        reachability_targets: Vec::new(),
        ..only("eth-rescue")
    };
    let elsewhere = only("eth-other");
    let back = only("eth-rescue");
    let station = ns.station.clone();
    let inet = move || ipv4_addrs(&station);
    let station = ns.station.clone();
    let result = std::thread::spawn(move || {
        enter(&station);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let clock = Arc::new(DryRunClock::default());
            let handle = net::start(early, clock.clone()).unwrap();
            let mut rx = handle.status();
            let leased = |s: &NetStatus| s.links.iter().any(|l| l.dhcp.is_some());
            wait(&mut rx, "a lease with the early settings", leased).await;
            assert!(inet().contains("inet 10.77.0."), "{}", inet());
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(
                rx.borrow().apple,
                Reachability::Unknown,
                "nothing is checked without targets"
            );
            assert_eq!(
                rx.borrow().clock,
                ClockState::Unsynced,
                "no time server is asked before the settings allow it"
            );

            handle.reconfigure(elsewhere).await.unwrap();
            let st = rx.borrow().clone();
            assert!(
                st.links.iter().all(|l| l.name != "eth-rescue"),
                "a link the settings do not name is not reported: {st:#?}"
            );
            assert!(!inet().contains("inet "), "its address is gone: {}", inet());

            handle.reconfigure(back).await.unwrap();
            wait(&mut rx, "a lease once the link is managed again", leased).await;
            assert!(inet().contains("inet 10.77.0."), "{}", inet());
            wait(&mut rx, "the new settings' target checked", |s| {
                s.apple == Reachability::Reachable
            })
            .await;
            let sync = handle
                .wait_for_clock(Duration::from_secs(30))
                .await
                .unwrap();
            assert_eq!(sync.server, SocketAddr::from((LAN_IP, sntp::PORT)));

            handle.stop().await;
            assert!(!inet().contains("inet "), "stop removes it: {}", inet());
        });
    })
    .join();
    drop(ns);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
