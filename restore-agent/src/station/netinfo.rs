//! The dashboard header's network facts: address, whether the firmware servers are reachable,
//! and how the clock was set — read from the networking task's [`NetStatus`].

use std::sync::Mutex;

use tokio::sync::watch;

use super::StationInfo;
use crate::net::{ClockState, NetStatus, Reachability};

pub struct NetInfo {
    status: watch::Receiver<NetStatus>,
    /// Who the servers are, for the header ("Apple" or "configured servers").
    servers: String,
    /// Set when the station decided to go on with the RTC (no time server answered).
    clock_note: Mutex<Option<String>>,
}

impl NetInfo {
    pub fn new(status: watch::Receiver<NetStatus>, servers: impl Into<String>) -> NetInfo {
        NetInfo {
            status,
            servers: servers.into(),
            clock_note: Mutex::new(None),
        }
    }

    pub fn set_clock_note(&self, note: Option<String>) {
        *self.clock_note.lock().unwrap_or_else(|p| p.into_inner()) = note;
    }
}

impl StationInfo for NetInfo {
    fn network(&self) -> String {
        let st = self.status.borrow().clone();
        let note = self
            .clock_note
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        summary(&st, &self.servers, note.as_deref())
    }
}

/// One line: `10.0.2.15/24 (DHCP, eth0) · Apple reachable · clock SNTP 10.0.2.2:123`.
pub fn summary(st: &NetStatus, servers: &str, clock_note: Option<&str>) -> String {
    let address = st
        .links
        .iter()
        .find_map(|l| {
            let d = l.dhcp.as_ref()?;
            Some(format!("{}/{} (DHCP, {})", d.address, d.prefix_len, l.name))
        })
        .or_else(|| st.primary_address().map(|a| a.to_string()))
        .unwrap_or_else(|| {
            if st.links.iter().any(|l| l.carrier) {
                "waiting for DHCP".into()
            } else {
                "no cable".into()
            }
        });
    let reach = match &st.apple {
        Reachability::Unknown => format!("{servers}: not checked yet"),
        Reachability::Reachable => format!("{servers} reachable"),
        Reachability::Unreachable(why) => format!("{servers} NOT reachable ({why})"),
    };
    let clock = match (&st.clock, clock_note) {
        (ClockState::Synced { server, .. }, _) => format!("clock SNTP {server}"),
        (_, Some(note)) => format!("clock {note}"),
        (ClockState::Unsynced, None) => "clock not set yet".into(),
        (ClockState::Failing(m), None) => format!("clock not set ({m})"),
    };
    let proxy = st
        .proxy
        .as_ref()
        .map(|p| format!(" · proxy {p}"))
        .unwrap_or_default();
    format!("{address} · {reach} · {clock}{proxy}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{DhcpStatus, LinkStatus};

    #[test]
    fn summary_names_address_reachability_and_clock() {
        let mut st = NetStatus::default();
        assert_eq!(
            summary(&st, "Apple", None),
            "no cable · Apple: not checked yet · clock not set yet"
        );
        st.links.push(LinkStatus {
            index: 2,
            name: "eth0".into(),
            carrier: true,
            addresses: vec![],
            dhcp: None,
        });
        st.clock = ClockState::Failing("10.0.2.2:123 did not answer".into());
        assert_eq!(
            summary(&st, "Apple", None),
            "waiting for DHCP · Apple: not checked yet · clock not set (10.0.2.2:123 did not answer)"
        );
        st.links[0].dhcp = Some(DhcpStatus {
            address: "10.0.2.15".parse().unwrap(),
            prefix_len: 24,
            gateway: Some("10.0.2.2".parse().unwrap()),
            server: "10.0.2.2".parse().unwrap(),
            dns: vec![],
            ntp: vec![],
            domain: None,
            lease_secs: 86400,
            renew_secs: 43200,
            renewals: 0,
        });
        st.apple = Reachability::Unreachable("10.0.2.100:443: refused".into());
        st.proxy = Some("http://p:3128".into());
        assert_eq!(
            summary(&st, "configured servers", Some("RTC (no time server answered)")),
            "10.0.2.15/24 (DHCP, eth0) · configured servers NOT reachable (10.0.2.100:443: refused) \
             · clock RTC (no time server answered) · proxy http://p:3128"
        );
        st.apple = Reachability::Reachable;
        st.clock = ClockState::Synced {
            server: "10.0.2.2:123".parse().unwrap(),
            step_secs: 0.5,
        };
        assert_eq!(
            summary(&st, "Apple", Some("ignored once synced")),
            "10.0.2.15/24 (DHCP, eth0) · Apple reachable · clock SNTP 10.0.2.2:123 · proxy http://p:3128"
        );
    }
}
