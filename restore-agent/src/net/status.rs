//! What the dashboard shows about the network, published over a `tokio::sync::watch` channel.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NetStatus {
    pub links: Vec<LinkStatus>,
    pub dns: Vec<Ipv4Addr>,
    pub clock: ClockState,
    pub apple: Reachability,
    /// The configured HTTP(S) proxy, if any (every request goes through it).
    pub proxy: Option<String>,
}

impl NetStatus {
    /// The first default gateway of any link.
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.links.iter().find_map(|l| l.dhcp.as_ref()?.gateway)
    }

    /// Any global address, for "reach this station at …" on the dashboard.
    pub fn primary_address(&self) -> Option<IpAddr> {
        self.links
            .iter()
            .flat_map(|l| l.addresses.iter())
            .map(|a| a.0)
            .find(|a| {
                !a.is_loopback()
                    && !matches!(a, IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80)
            })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkStatus {
    pub index: u32,
    pub name: String,
    pub carrier: bool,
    /// Every address the kernel reports (DHCP, SLAAC, link-local), with prefix length.
    pub addresses: Vec<(IpAddr, u8)>,
    pub dhcp: Option<DhcpStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DhcpStatus {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub server: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub ntp: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub lease_secs: u64,
    /// When the lease is renewed (T1), in seconds from when it was granted.
    pub renew_secs: u64,
    /// Successful renewals of this lease, for the dashboard and tests.
    pub renewals: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub enum ClockState {
    #[default]
    Unsynced,
    Synced {
        server: SocketAddr,
        step_secs: f64,
    },
    /// Every server failed last round; retrying. The message says why.
    Failing(String),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub enum Reachability {
    #[default]
    Unknown,
    Reachable,
    Unreachable(String),
}

/// `host:port` of a server URL: what [`check_reachable`] connects to.
pub fn reach_target(url: &str) -> Option<String> {
    let u = reqwest::Url::parse(url).ok()?;
    Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?))
}

/// Apple reachability, cheaply: a TCP connect to each target (through the proxy when there
/// is one, since direct connections may be blocked there).
pub async fn check_reachable(targets: &[String], timeout: Duration) -> Reachability {
    for t in targets {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(t.as_str())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Reachability::Unreachable(format!("{t}: {e}")),
            Err(_) => {
                return Reachability::Unreachable(format!("{t}: no answer within {timeout:?}"))
            }
        }
    }
    Reachability::Reachable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reach_targets_of_urls() {
        assert_eq!(
            reach_target("https://10.0.2.100:40003/TSS/controller?action=2").as_deref(),
            Some("10.0.2.100:40003")
        );
        assert_eq!(
            reach_target("https://gs.apple.com/TSS/controller").as_deref(),
            Some("gs.apple.com:443")
        );
        assert_eq!(reach_target("not a url"), None);
    }

    #[tokio::test]
    async fn reachability_against_loopback() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = l.local_addr().unwrap().to_string();
        let closed = {
            let c = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            c.local_addr().unwrap().to_string()
        };
        let t = Duration::from_secs(5);
        assert_eq!(
            check_reachable(std::slice::from_ref(&open), t).await,
            Reachability::Reachable
        );
        let r = check_reachable(&[open, closed.clone()], t).await;
        assert!(
            matches!(&r, Reachability::Unreachable(m) if m.starts_with(&closed)),
            "{r:?}"
        );
    }

    #[test]
    fn primary_address_skips_loopback_and_link_local() {
        let mut s = NetStatus::default();
        s.links.push(LinkStatus {
            index: 1,
            name: "lo".into(),
            carrier: true,
            addresses: vec![("127.0.0.1".parse().unwrap(), 8)],
            dhcp: None,
        });
        s.links.push(LinkStatus {
            index: 2,
            name: "eth0".into(),
            carrier: true,
            addresses: vec![
                ("fe80::1".parse().unwrap(), 64),
                ("10.1.2.3".parse().unwrap(), 24),
            ],
            dhcp: None,
        });
        assert_eq!(s.primary_address(), Some("10.1.2.3".parse().unwrap()));
    }
}
