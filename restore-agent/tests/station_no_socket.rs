//! The erase invariant: nothing reachable over a network can confirm, arm or force an erase.
//! The station (with its console confirmer asking a question) must not open any socket, and the
//! station's sources must not name one. Its own test binary, so no other test's sockets count.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use restore_agent::station::api::{EngineEvent, EraseConfirmer, EraseDecision};
use restore_agent::station::confirm::{ArmingConfirmer, ConsoleConfirmer, ConsolePort};
use restore_agent::station::demo::{dfu_device, DemoJob, FakeBus};
use restore_agent::station::{Display, JobFuture, MacJob, NoNetwork, Station, StationConfig};
use restore_agent::usb::{DeviceInfo, UsbBus};
use tokio::sync::mpsc::UnboundedSender;

fn socket_fds() -> BTreeSet<String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.starts_with("socket:"))
        .collect()
}

/// Socket inodes listening in this network namespace (TCP and UDP, v4 and v6).
fn listening_inodes() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for f in ["tcp", "tcp6", "udp", "udp6"] {
        let Ok(t) = std::fs::read_to_string(format!("/proc/self/net/{f}")) else {
            continue;
        };
        for l in t.lines().skip(1) {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // TCP LISTEN is state 0A; an unconnected UDP socket (07) is one that could listen.
            if cols.len() > 9 && (cols[3] == "0A" || (f.starts_with("udp") && cols[3] == "07")) {
                out.insert(format!("socket:[{}]", cols[9]));
            }
        }
    }
    out
}

/// Asks the console a question while the station runs, then lets the demo job finish.
struct AskingJob(DemoJob);

impl MacJob for AskingJob {
    fn start(
        &self,
        bus: Arc<dyn UsbBus>,
        device: DeviceInfo,
        confirmer: Arc<dyn EraseConfirmer>,
        events: UnboundedSender<EngineEvent>,
    ) -> JobFuture {
        let inner = self.0.start(bus, device, Arc::clone(&confirmer), events);
        Box::pin(async move {
            let d =
                tokio::task::spawn_blocking(move || confirmer.confirm_erase(1, "424242", "test"))
                    .await
                    .unwrap();
            assert_eq!(d, EraseDecision::TimedOut);
            inner.await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_station_opens_no_socket_and_listens_on_nothing() {
    let before = socket_fds();
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fresh fds, which we own from here on.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (r, mut w) = unsafe {
        (
            OwnedFd::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let console = ConsolePort::from_parts("tty-test", r, Box::new(std::io::sink())).unwrap();
    let confirmer = Arc::new(ArmingConfirmer::new(Arc::new(ConsoleConfirmer::new(
        vec![console],
        Duration::from_millis(200),
    ))));
    let station = Station::new(
        StationConfig {
            display: Display::Lines,
            probe_ecid: false,
            exit_after: Some(2),
            ..StationConfig::default()
        },
        Arc::new(FakeBus::new(vec![dfu_device(1, 2), dfu_device(2, 3)])),
        Arc::new(AskingJob(DemoJob {
            step: Duration::from_millis(5),
        })),
        confirmer,
        Arc::new(NoNetwork),
        Box::new(std::io::sink()),
    );
    let running = tokio::spawn(station.run(std::future::pending()));
    // Look while the jobs run and the console question is open.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let during = socket_fds();
    let listening = listening_inodes();
    let summary = running.await.unwrap().unwrap();
    let _ = w.write_all(b"\n");
    assert_eq!(summary.done, 2);
    assert_eq!(during, before, "the station opened a socket");
    assert!(
        during.is_disjoint(&listening),
        "a socket of this process listens: {during:?}"
    );
}

#[test]
fn station_sources_name_no_socket_api() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/station");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.push(concat!(env!("CARGO_MANIFEST_DIR"), "/src/cmd/station.rs").into());
    for f in files {
        let src = std::fs::read_to_string(&f).unwrap();
        for banned in [
            "std::net",
            "tokio::net",
            "TcpListener",
            "TcpStream",
            "UdpSocket",
            "UnixListener",
            "UnixStream",
            "libc::socket",
            "libc::bind",
            "reqwest",
            "hyper",
        ] {
            assert!(!src.contains(banned), "{} uses {banned}", f.display());
        }
    }
}
