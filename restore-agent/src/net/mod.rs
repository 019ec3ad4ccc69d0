//! Networking in the rescue image, done by the agent itself (no udev, systemd or dhclient):
//! every wired link up, DHCPv4 with renewal, kernel SLAAC for IPv6, `/etc/resolv.conf`, the
//! clock set by SNTP before any TLS, and a [`NetStatus`] for the dashboard.
//!
//! Protocols are sans-IO ([`dhcp::wire`], [`dhcp::client`], [`sntp`]); [`rtnl`],
//! [`dhcp::edge`] and [`clock`] are the edges; [`start`] runs them all.

pub mod clock;
pub mod dhcp;
pub mod resolv;
pub mod rtnl;
pub mod slaac;
pub mod sntp;
pub mod status;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use clock::{ClockSetter, ClockSync, DryRunClock, SystemClock};
pub use status::{ClockState, DhcpStatus, LinkStatus, NetStatus, Reachability};

use dhcp::edge::LeaseEvent;
use dhcp::Lease;
use rtnl::{Event, Link, Rtnl, RtnlEvents};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink: cannot {0}: {1} (is the agent running as root?)")]
    Netlink(&'static str, #[source] std::io::Error),
    #[error("link {0} has no hardware address; DHCP needs one")]
    NoMac(String),
    #[error("DHCP socket on {0}: {1} (is another DHCP client running?)")]
    DhcpSocket(String, #[source] std::io::Error),
    #[error("time server {0}: {1}")]
    Sntp(SocketAddr, #[source] std::io::Error),
    #[error("time server {0} did not answer (is UDP port 123 blocked?)")]
    SntpTimeout(SocketAddr),
    #[error("time server {0}: {1}")]
    SntpRejected(SocketAddr, #[source] sntp::SntpError),
    #[error("cannot set the clock: {0} (the agent needs CAP_SYS_TIME)")]
    SetClock(#[source] std::io::Error),
    #[error(
        "the clock could not be set from any time server ({0}); HTTPS would fail certificate \
         checks. Check the network cable and that UDP port 123 is allowed, or name a reachable \
         NTP server in the config file"
    )]
    ClockNotSet(String),
    #[error("the network task stopped")]
    Stopped,
}

/// How the agent runs networking. Defaults are the rescue image's; tests point paths at
/// temporary files and servers at 127.0.0.1.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Only these links (by name); `None`: every wired link.
    pub interfaces: Option<Vec<String>>,
    pub dhcp: bool,
    /// Renew leases at least this soon (see [`dhcp::ClientConfig::renew_cap`]).
    pub dhcp_renew_cap: Option<Duration>,
    pub resolv_conf: PathBuf,
    pub ipv6_conf_dir: PathBuf,
    /// Set the clock by SNTP at all (off while the station has not read its settings yet: it
    /// does not know which time servers it may ask).
    pub set_clock: bool,
    /// Time servers from the config file (`host` or `host:port`), tried after DHCP's.
    pub ntp_servers: Vec<String>,
    /// Tried last.
    pub ntp_fallback: Option<String>,
    pub sntp_timeout: Duration,
    /// How long to wait for a DHCP lease (which may name time servers) before trying the
    /// configured ones.
    pub ntp_wait_for_dhcp: Duration,
    /// Re-synchronise this often once set.
    pub ntp_resync: Duration,
    /// `host:port` targets for the "Apple reachable?" check; none: no check.
    pub reachability_targets: Vec<String>,
    pub reachability_interval: Duration,
    pub reachability_timeout: Duration,
    /// The HTTP(S) proxy from the config file (`http::HttpConfig::proxy`).
    pub proxy: Option<String>,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            interfaces: None,
            dhcp: true,
            dhcp_renew_cap: None,
            resolv_conf: "/etc/resolv.conf".into(),
            ipv6_conf_dir: "/proc/sys/net/ipv6/conf".into(),
            set_clock: true,
            ntp_servers: Vec::new(),
            ntp_fallback: Some("time.apple.com".into()),
            sntp_timeout: Duration::from_secs(3),
            ntp_wait_for_dhcp: Duration::from_secs(10),
            ntp_resync: Duration::from_secs(6 * 3600),
            // The TSS signing server and the software catalogue: what a restore needs.
            reachability_targets: vec!["gs.apple.com:443".into(), "mesu.apple.com:443".into()],
            reachability_interval: Duration::from_secs(30),
            reachability_timeout: Duration::from_secs(5),
            proxy: None,
        }
    }
}

impl NetConfig {
    fn manages(&self, l: &Link) -> bool {
        match &self.interfaces {
            Some(names) => names.contains(&l.name),
            None => l.is_wired(),
        }
    }

    /// With a proxy every request goes through it, so it is what must be reachable.
    fn reach_targets(&self) -> Vec<String> {
        if let Some(p) = &self.proxy {
            if let Ok(u) = reqwest::Url::parse(p) {
                if let (Some(h), Some(port)) = (u.host_str(), u.port_or_known_default()) {
                    return vec![format!("{h}:{port}")];
                }
            }
        }
        self.reachability_targets.clone()
    }
}

/// The running network stack. Dropping it stops everything.
pub struct NetHandle {
    status: watch::Receiver<NetStatus>,
    task: JoinHandle<Result<(), NetError>>,
    control: mpsc::UnboundedSender<(NetConfig, oneshot::Sender<()>)>,
}

impl Drop for NetHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl NetHandle {
    pub fn status(&self) -> watch::Receiver<NetStatus> {
        self.status.clone()
    }

    /// Waits until SNTP has set the clock; the station calls this before its first HTTPS
    /// request.
    pub async fn wait_for_clock(&self, timeout: Duration) -> Result<ClockSync, NetError> {
        wait_for_clock(&mut self.status(), timeout).await
    }

    /// Applies settings that arrived after the start (the station starts networking before
    /// the data partition with its config file is mounted). Links the new settings do not
    /// manage lose their DHCP client and address; newly managed ones start DHCP; the time
    /// servers, proxy and reachability targets are the new ones from now on. Returns once
    /// applied.
    pub async fn reconfigure(&self, cfg: NetConfig) -> Result<(), NetError> {
        let (done_tx, done_rx) = oneshot::channel();
        self.control
            .send((cfg, done_tx))
            .map_err(|_| NetError::Stopped)?;
        done_rx.await.map_err(|_| NetError::Stopped)
    }

    /// Stops networking and removes the addresses its DHCP clients configured.
    pub async fn stop(self) {
        let off = NetConfig {
            interfaces: Some(Vec::new()),
            ..NetConfig::default()
        };
        let _ = self.reconfigure(off).await;
    }
}

/// Waits until the status says the clock is set.
pub async fn wait_for_clock(
    rx: &mut watch::Receiver<NetStatus>,
    timeout: Duration,
) -> Result<ClockSync, NetError> {
    let synced = |s: &NetStatus| match &s.clock {
        ClockState::Synced { server, step_secs } => Some(ClockSync {
            server: *server,
            step_secs: *step_secs,
        }),
        _ => None,
    };
    let waited = tokio::time::timeout(timeout, async {
        rx.wait_for(|s| synced(s).is_some())
            .await
            .map(|s| synced(&s))
    })
    .await;
    match waited {
        Ok(Ok(s)) => s.ok_or(NetError::Stopped),
        Ok(Err(_)) => Err(NetError::Stopped),
        Err(_) => {
            let why = match &rx.borrow().clock {
                ClockState::Failing(m) => m.clone(),
                _ => "no time server answered yet".into(),
            };
            Err(NetError::ClockNotSet(why))
        }
    }
}

struct Tracked {
    link: Link,
    task: Option<JoinHandle<Result<(), NetError>>>,
    lease: Option<Lease>,
    renewals: u32,
}

impl Tracked {
    /// Stop the link's DHCP client and remove the address it configured.
    fn stop_dhcp(&mut self) {
        if let Some(h) = self.task.take() {
            h.abort();
        }
        if let Some(lease) = self.lease.take() {
            dhcp::edge::withdraw(self.link.index, &lease);
        }
    }
}

/// Starts networking on the current tokio runtime.
pub fn start(cfg: NetConfig, clock: Arc<dyn ClockSetter>) -> Result<NetHandle, NetError> {
    let (tx, rx) = watch::channel(NetStatus {
        proxy: cfg.proxy.clone(),
        ..NetStatus::default()
    });
    let tx = Arc::new(tx);
    // Subscribe before the first scan so no link appearing in between is missed.
    let events = RtnlEvents::open()?;
    let rtnl = Rtnl::open()?;
    let (ntp_tx, ntp_rx) = watch::channel(None::<Vec<Ipv4Addr>>);
    let clock_task = cfg
        .set_clock
        .then(|| tokio::spawn(clock_loop(cfg.clone(), clock.clone(), ntp_rx, tx.clone())));
    let (control, control_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut o = Orchestrator {
            cfg,
            rtnl,
            tracked: BTreeMap::new(),
            tx,
            ntp_tx,
            seed: seed(),
            resolv_written: None,
            clock,
            clock_task,
        };
        let r = o.run(events, control_rx).await;
        if let Some(t) = &o.clock_task {
            t.abort();
        }
        if let Err(e) = &r {
            tracing::error!("networking stopped: {e}");
        }
        r
    });
    Ok(NetHandle {
        status: rx,
        task,
        control,
    })
}

/// A transaction-id seed that differs between boots and stations (no RNG crate needed).
fn seed() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.subsec_nanos() ^ (t.as_secs() as u32) ^ std::process::id().rotate_left(16)
}

struct Orchestrator {
    cfg: NetConfig,
    rtnl: Rtnl,
    tracked: BTreeMap<u32, Tracked>,
    tx: Arc<watch::Sender<NetStatus>>,
    ntp_tx: watch::Sender<Option<Vec<Ipv4Addr>>>,
    seed: u32,
    resolv_written: Option<String>,
    clock: Arc<dyn ClockSetter>,
    clock_task: Option<JoinHandle<()>>,
}

impl Orchestrator {
    async fn run(
        &mut self,
        mut events: RtnlEvents,
        mut control: mpsc::UnboundedReceiver<(NetConfig, oneshot::Sender<()>)>,
    ) -> Result<(), NetError> {
        let (lease_tx, mut lease_rx) = mpsc::unbounded_channel();
        self.rescan(&lease_tx)?;
        let mut reach = reach_interval(&self.cfg);
        let (reach_tx, mut reach_rx) = mpsc::unbounded_channel();
        loop {
            tokio::select! {
                evs = events.next() => {
                    for ev in evs? {
                        match ev {
                            Event::Link(l) => self.on_link(l, &lease_tx)?,
                            Event::LinkGone(0) => self.rescan(&lease_tx)?,
                            Event::LinkGone(i) => self.on_link_gone(i),
                            Event::AddressesChanged => {}
                        }
                    }
                    self.refresh_addresses()?;
                }
                Some(ev) = lease_rx.recv() => {
                    self.on_lease(ev);
                    self.refresh_addresses()?;
                    reach.reset_immediately();
                }
                _ = reach.tick() => {
                    // No targets (networking started before its settings): nothing to check.
                    let targets = self.cfg.reach_targets();
                    let timeout = self.cfg.reachability_timeout;
                    let tx = reach_tx.clone();
                    // Off the main loop: a slow connect must not delay link events.
                    if !targets.is_empty() {
                        tokio::spawn(async move {
                            let _ = tx.send(status::check_reachable(&targets, timeout).await);
                        });
                    }
                }
                Some(r) = reach_rx.recv() => {
                    self.tx.send_if_modified(|s| {
                        let changed = s.apple != r;
                        s.apple = r;
                        changed
                    });
                }
                Some((cfg, done)) = control.recv() => {
                    self.reconfigure(cfg, &lease_tx)?;
                    reach = reach_interval(&self.cfg);
                    let _ = done.send(());
                }
            }
        }
    }

    fn reconfigure(
        &mut self,
        cfg: NetConfig,
        lease_tx: &mpsc::UnboundedSender<LeaseEvent>,
    ) -> Result<(), NetError> {
        let dropped: Vec<u32> = self
            .tracked
            .values()
            .filter(|t| !t.link.loopback && (!cfg.manages(&t.link) || !cfg.dhcp))
            .map(|t| t.link.index)
            .collect();
        for index in dropped {
            if let Some(mut t) = self.tracked.remove(&index) {
                tracing::info!(link = %t.link.name, "no longer managed: dropping its DHCP lease");
                t.stop_dhcp();
            }
        }
        if !cfg.set_clock || self.clock_task.is_none() || clock_settings_differ(&self.cfg, &cfg) {
            // A fresh clock loop with the new servers; it picks up DHCP's from the channel.
            if let Some(t) = self.clock_task.take() {
                t.abort();
            }
            self.clock_task = cfg.set_clock.then(|| {
                tokio::spawn(clock_loop(
                    cfg.clone(),
                    self.clock.clone(),
                    self.ntp_tx.subscribe(),
                    self.tx.clone(),
                ))
            });
        }
        self.tx.send_modify(|s| s.proxy = cfg.proxy.clone());
        self.cfg = cfg;
        self.publish_leases();
        self.rescan(lease_tx)
    }

    fn rescan(&mut self, lease_tx: &mpsc::UnboundedSender<LeaseEvent>) -> Result<(), NetError> {
        let links = self.rtnl.links()?;
        let present: Vec<u32> = links.iter().map(|l| l.index).collect();
        let gone: Vec<u32> = self
            .tracked
            .keys()
            .copied()
            .filter(|i| !present.contains(i))
            .collect();
        for i in gone {
            self.on_link_gone(i);
        }
        for l in links {
            self.on_link(l, lease_tx)?;
        }
        self.refresh_addresses()
    }

    fn on_link(
        &mut self,
        l: Link,
        lease_tx: &mpsc::UnboundedSender<LeaseEvent>,
    ) -> Result<(), NetError> {
        if l.loopback {
            if !l.up {
                self.rtnl.set_up(l.index)?;
            }
            self.tracked
                .entry(l.index)
                .or_insert(Tracked {
                    link: l.clone(),
                    task: None,
                    lease: None,
                    renewals: 0,
                })
                .link = l.clone();
            return Ok(());
        }
        if !self.cfg.manages(&l) {
            return Ok(());
        }
        if !self.tracked.contains_key(&l.index) {
            tracing::info!(link = %l.name, "new wired link");
            if let Err(e) = slaac::enable(&self.cfg.ipv6_conf_dir, &l.name) {
                tracing::warn!(link = %l.name, "cannot enable IPv6 autoconfiguration: {e}");
            }
        }
        if !l.up {
            self.rtnl.set_up(l.index)?;
        }
        let t = self.tracked.entry(l.index).or_insert(Tracked {
            link: l.clone(),
            task: None,
            lease: None,
            renewals: 0,
        });
        t.link = l.clone();
        let running = t.task.as_ref().is_some_and(|h| !h.is_finished());
        if l.carrier && !running && self.cfg.dhcp {
            tracing::info!(link = %l.name, "carrier up: starting DHCP");
            self.seed = self.seed.wrapping_add(0x9e37_79b9);
            let name = l.name.clone();
            let run = dhcp::edge::run(l, self.seed, self.cfg.dhcp_renew_cap, lease_tx.clone());
            t.task = Some(tokio::spawn(async move {
                let r = run.await;
                // The next link event for this link starts DHCP again.
                if let Err(e) = &r {
                    tracing::error!(link = %name, "DHCP stopped: {e}");
                }
                r
            }));
        } else if !l.carrier && running {
            tracing::info!(link = %l.name, "carrier lost: dropping the DHCP lease");
            t.stop_dhcp();
            self.publish_leases();
        }
        Ok(())
    }

    fn on_link_gone(&mut self, index: u32) {
        if let Some(t) = self.tracked.remove(&index) {
            tracing::info!(link = %t.link.name, "link removed");
            if let Some(h) = t.task {
                h.abort();
            }
            self.publish_leases();
        }
    }

    fn on_lease(&mut self, ev: LeaseEvent) {
        match ev {
            LeaseEvent::Bound { index, lease } => {
                if let Some(t) = self.tracked.get_mut(&index) {
                    t.lease = Some(lease);
                    t.renewals = 0;
                }
            }
            LeaseEvent::Renewed { index, lease } => {
                if let Some(t) = self.tracked.get_mut(&index) {
                    t.lease = Some(lease);
                    t.renewals += 1;
                }
            }
            LeaseEvent::Lost { index } => {
                if let Some(t) = self.tracked.get_mut(&index) {
                    if let Some(lease) = t.lease.take() {
                        dhcp::edge::withdraw(index, &lease);
                    }
                }
            }
        }
        self.publish_leases();
    }

    /// DNS, time servers and per-link DHCP status from the current leases.
    fn publish_leases(&mut self) {
        let leases: Vec<&Lease> = self
            .tracked
            .values()
            .filter_map(|t| t.lease.as_ref())
            .collect();
        let dns: Vec<Ipv4Addr> = leases.iter().flat_map(|l| l.dns.iter().copied()).collect();
        let domains: Vec<String> = leases.iter().filter_map(|l| l.domain.clone()).collect();
        let ntp: Vec<Ipv4Addr> = leases.iter().flat_map(|l| l.ntp.iter().copied()).collect();
        if !leases.is_empty() {
            // Keep the last resolv.conf when every lease is gone: a stale resolver beats none.
            let text = resolv::render(&dns, &domains);
            // Address events are frequent (SLAAC); rewrite only what changed.
            if self.resolv_written.as_deref() != Some(text.as_str()) {
                match resolv::write(&self.cfg.resolv_conf, &text) {
                    Ok(()) => self.resolv_written = Some(text),
                    Err(e) => tracing::warn!(
                        path = %self.cfg.resolv_conf.display(),
                        "cannot write resolv.conf: {e}"
                    ),
                }
            }
            self.ntp_tx.send_if_modified(|n| {
                let changed = n.as_ref() != Some(&ntp);
                *n = Some(ntp);
                changed
            });
        }
        let tracked = &self.tracked;
        self.tx.send_modify(|s| {
            s.dns = dns;
            for ls in &mut s.links {
                ls.dhcp = tracked.get(&ls.index).and_then(|t| {
                    let l = t.lease.as_ref()?;
                    Some(DhcpStatus {
                        address: l.address,
                        prefix_len: l.prefix_len,
                        gateway: l.routers.first().copied(),
                        server: l.server,
                        dns: l.dns.clone(),
                        ntp: l.ntp.clone(),
                        domain: l.domain.clone(),
                        lease_secs: l.lease_time.as_secs(),
                        renew_secs: l.renew_after.as_secs(),
                        renewals: t.renewals,
                    })
                });
            }
        });
    }

    fn refresh_addresses(&mut self) -> Result<(), NetError> {
        let addrs = self.rtnl.addresses()?;
        let links: Vec<LinkStatus> = self
            .tracked
            .values()
            .map(|t| LinkStatus {
                index: t.link.index,
                name: t.link.name.clone(),
                carrier: t.link.carrier,
                addresses: addrs
                    .iter()
                    .filter(|a| a.index == t.link.index)
                    .map(|a| (a.addr, a.prefix_len))
                    .collect(),
                dhcp: None,
            })
            .collect();
        self.tx.send_modify(|s| {
            let old = std::mem::replace(&mut s.links, links);
            for l in &mut s.links {
                l.dhcp = old
                    .iter()
                    .find(|o| o.index == l.index)
                    .and_then(|o| o.dhcp.clone());
            }
        });
        // Links that appeared since the last publish get their DHCP status too.
        let tracked = &self.tracked;
        if tracked.values().any(|t| t.lease.is_some()) {
            self.publish_leases();
        }
        Ok(())
    }
}

/// The reachability check's timer; its first tick is at once.
fn reach_interval(cfg: &NetConfig) -> tokio::time::Interval {
    let mut reach = tokio::time::interval(cfg.reachability_interval);
    reach.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    reach
}

fn clock_settings_differ(a: &NetConfig, b: &NetConfig) -> bool {
    a.ntp_servers != b.ntp_servers
        || a.ntp_fallback != b.ntp_fallback
        || a.sntp_timeout != b.sntp_timeout
        || a.ntp_wait_for_dhcp != b.ntp_wait_for_dhcp
        || a.ntp_resync != b.ntp_resync
}

/// Sets the clock: DHCP's time servers first, then configured ones, then the fallback;
/// retries with backoff until one works, then re-synchronises now and then.
async fn clock_loop(
    cfg: NetConfig,
    clock: Arc<dyn ClockSetter>,
    mut ntp_rx: watch::Receiver<Option<Vec<Ipv4Addr>>>,
    tx: Arc<watch::Sender<NetStatus>>,
) {
    // Give DHCP a moment to name the local time servers (often the only ones allowed).
    let _ = tokio::time::timeout(cfg.ntp_wait_for_dhcp, ntp_rx.wait_for(|n| n.is_some())).await;
    let mut backoff = Duration::from_secs(1);
    let mut repeats = RepeatedWarning::default();
    loop {
        let from_dhcp = ntp_rx.borrow().clone().unwrap_or_default();
        let mut candidates: Vec<String> = from_dhcp
            .iter()
            .map(|a| format!("{a}:{}", sntp::PORT))
            .collect();
        candidates.extend(cfg.ntp_servers.iter().cloned());
        candidates.extend(cfg.ntp_fallback.iter().cloned());
        let mut errors = Vec::new();
        let mut synced = None;
        'servers: for c in &candidates {
            let with_port = if c.contains(':') {
                c.clone()
            } else {
                format!("{c}:{}", sntp::PORT)
            };
            let addrs = match tokio::net::lookup_host(&with_port).await {
                Ok(a) => a.collect::<Vec<_>>(),
                Err(e) => {
                    errors.push(format!("{c}: {e}"));
                    continue;
                }
            };
            for a in addrs {
                match clock::sync_once(a, clock.as_ref(), cfg.sntp_timeout, clock::build_floor())
                    .await
                {
                    Ok(s) => {
                        synced = Some(s);
                        break 'servers;
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        match synced {
            Some(s) => {
                tx.send_modify(|st| {
                    st.clock = ClockState::Synced {
                        server: s.server,
                        step_secs: s.step_secs,
                    }
                });
                backoff = Duration::from_secs(1);
                repeats = RepeatedWarning::default();
                tokio::time::sleep(cfg.ntp_resync).await;
            }
            None => {
                let why = if errors.is_empty() {
                    "no time server configured".into()
                } else {
                    errors.join("; ")
                };
                if repeats.is_new(&why) {
                    tracing::warn!("clock not set yet: {why}");
                } else {
                    tracing::debug!("clock still not set: {why}");
                }
                tx.send_modify(|st| {
                    // Once set, a failed re-sync does not make the clock wrong again.
                    if !matches!(st.clock, ClockState::Synced { .. }) {
                        st.clock = ClockState::Failing(why);
                    }
                });
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = ntp_rx.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Remembers the last warning of a retry loop, so a station whose time servers stay silent
/// logs the reason once (and again when it changes), not every few seconds for hours.
#[derive(Default)]
struct RepeatedWarning {
    last: Option<String>,
}

impl RepeatedWarning {
    fn is_new(&mut self, why: &str) -> bool {
        if self.last.as_deref() == Some(why) {
            return false;
        }
        self.last = Some(why.to_owned());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_clock_warning_is_logged_once_until_it_changes() {
        let mut r = RepeatedWarning::default();
        assert!(r.is_new("no time server configured"));
        assert!(!r.is_new("no time server configured"));
        assert!(!r.is_new("no time server configured"));
        assert!(r.is_new("10.0.2.2:123: timed out"));
        assert!(r.is_new("no time server configured"));
    }

    #[test]
    fn proxy_replaces_the_reachability_targets() {
        let mut c = NetConfig::default();
        assert_eq!(
            c.reach_targets(),
            vec!["gs.apple.com:443", "mesu.apple.com:443"]
        );
        c.proxy = Some("http://proxy.lab:3128".into());
        assert_eq!(c.reach_targets(), vec!["proxy.lab:3128"]);
        c.proxy = Some("http://proxy.lab".into());
        assert_eq!(c.reach_targets(), vec!["proxy.lab:80"]);
    }

    #[tokio::test]
    async fn wait_for_clock_times_out_with_the_reason() {
        let (tx, mut rx) = watch::channel(NetStatus::default());
        tx.send_modify(|s| s.clock = ClockState::Failing("time.apple.com: no answer".into()));
        let e = wait_for_clock(&mut rx, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("time.apple.com: no answer"), "{e}");
        let server: SocketAddr = "127.0.0.1:123".parse().unwrap();
        tx.send_modify(|s| {
            s.clock = ClockState::Synced {
                server,
                step_secs: 2.0,
            }
        });
        let s = wait_for_clock(&mut rx, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(
            s,
            ClockSync {
                server,
                step_secs: 2.0
            }
        );
    }
}
