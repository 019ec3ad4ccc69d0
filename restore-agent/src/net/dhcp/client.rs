//! The DHCPv4 client state machine (RFC 2131 §4.4), sans-IO: messages and time in, messages to
//! send and lease events out. The edge owns the socket, the clock and applying the lease.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::wire::{Message, MessageType, Op, Options, REQUESTED_PARAMS};

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub mac: [u8; 6],
    /// Seed for transaction ids; the edge passes something different per boot and link.
    pub xid_seed: u32,
    /// First retransmission delay; doubled up to `max_retransmit`. RFC 2131 suggests 4 s; a
    /// rescue station wants an address fast, so the default starts lower.
    pub initial_retransmit: Duration,
    pub max_retransmit: Duration,
    /// REQUESTs sent in REQUESTING before starting over with a DISCOVER.
    pub request_attempts: u32,
    pub hostname: Option<String>,
    /// Renew at least this soon after binding, whatever the server says (tests, and stations
    /// that want to notice a dead server early).
    pub renew_cap: Option<Duration>,
}

impl ClientConfig {
    pub fn new(mac: [u8; 6], xid_seed: u32) -> Self {
        Self {
            mac,
            xid_seed,
            initial_retransmit: Duration::from_secs(2),
            max_retransmit: Duration::from_secs(32),
            request_attempts: 4,
            hostname: Some("macrescue".into()),
            renew_cap: None,
        }
    }
}

/// What a server granted us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub server: Ipv4Addr,
    pub routers: Vec<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub ntp: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub lease_time: Duration,
    pub renew_after: Duration,
    pub rebind_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Init,
    Selecting,
    Requesting,
    Bound,
    Renewing,
    Rebinding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Broadcast,
    Unicast(Ipv4Addr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Transmit(Message, Destination),
    /// A new lease (first, or a different address after starting over): apply it.
    Bound(Lease),
    /// The same address was extended; routes/DNS may have changed.
    Renewed(Lease),
    /// The lease is gone (NAK or expiry): remove the address and routes.
    Lost(&'static str),
}

pub struct Client {
    cfg: ClientConfig,
    state: State,
    xid: u32,
    /// When the current exchange started, for the `secs` field.
    exchange_start: Instant,
    next_send: Option<Instant>,
    backoff: Duration,
    attempts: u32,
    offer: Option<(Ipv4Addr, Ipv4Addr)>,
    lease: Option<(Lease, Instant)>,
    out: Vec<Output>,
}

impl Client {
    pub fn new(cfg: ClientConfig, now: Instant) -> Self {
        let mut c = Self {
            xid: cfg.xid_seed,
            backoff: cfg.initial_retransmit,
            cfg,
            state: State::Init,
            exchange_start: now,
            next_send: Some(now),
            attempts: 0,
            offer: None,
            lease: None,
            out: Vec::new(),
        };
        c.restart(now);
        c
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref().map(|(l, _)| l)
    }

    /// The earliest time `handle_timeout` must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.next_send;
        if let Some((l, at)) = &self.lease {
            let phase = match self.state {
                State::Bound => Some(*at + l.renew_after),
                State::Renewing => Some(*at + l.rebind_after),
                State::Rebinding => Some(*at + l.lease_time),
                _ => None,
            };
            t = match (t, phase) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        t
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.remove(0))
        }
    }

    /// Forget everything and start with a DISCOVER (link came back, or the edge gave up).
    pub fn restart(&mut self, now: Instant) {
        if self.lease.take().is_some() {
            self.out.push(Output::Lost("the client restarted"));
        }
        self.state = State::Init;
        self.offer = None;
        self.new_exchange(now);
        self.next_send = Some(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        // Lease phases first: an expiry outranks a pending retransmission.
        if let Some((l, at)) = self.lease.clone() {
            let elapsed = now.saturating_duration_since(at);
            if elapsed >= l.lease_time {
                self.lease = None;
                self.out
                    .push(Output::Lost("the lease expired without a renewal"));
                self.state = State::Init;
                self.new_exchange(now);
                self.next_send = Some(now);
            } else if elapsed >= l.rebind_after && self.state != State::Rebinding {
                self.state = State::Rebinding;
                self.new_exchange(now);
                self.next_send = Some(now);
            } else if elapsed >= l.renew_after && self.state == State::Bound {
                self.state = State::Renewing;
                self.new_exchange(now);
                self.next_send = Some(now);
            }
        }
        if self.next_send.is_some_and(|t| now >= t) {
            self.send(now);
        }
    }

    pub fn handle_message(&mut self, now: Instant, m: &Message) {
        if m.op != Op::Reply || m.xid != self.xid || m.chaddr != self.cfg.mac {
            return;
        }
        match (self.state, m.options.message_type) {
            (State::Selecting, Some(MessageType::Offer)) => {
                let Some(server) = m.options.server_id else {
                    tracing::debug!("ignoring a DHCP offer without a server id");
                    return;
                };
                if m.yiaddr.is_unspecified() {
                    return;
                }
                self.offer = Some((m.yiaddr, server));
                self.state = State::Requesting;
                self.attempts = 0;
                self.backoff = self.cfg.initial_retransmit;
                self.next_send = Some(now);
                self.send(now);
            }
            (State::Requesting | State::Renewing | State::Rebinding, Some(MessageType::Ack)) => {
                let Some(mut lease) = lease_from(m) else {
                    tracing::warn!("ignoring a DHCP ACK without an address or lease time");
                    return;
                };
                if let Some(cap) = self.cfg.renew_cap {
                    lease.renew_after = lease.renew_after.min(cap);
                }
                let renewal = self.state != State::Requesting
                    && self.lease().is_some_and(|l| l.address == lease.address);
                self.lease = Some((lease.clone(), now));
                self.state = State::Bound;
                self.next_send = None;
                self.offer = None;
                self.out.push(if renewal {
                    Output::Renewed(lease)
                } else {
                    Output::Bound(lease)
                });
            }
            (State::Requesting | State::Renewing | State::Rebinding, Some(MessageType::Nak)) => {
                tracing::info!("the DHCP server refused our address (NAK); starting over");
                if self.lease.take().is_some() {
                    self.out
                        .push(Output::Lost("the DHCP server refused the address"));
                }
                self.state = State::Init;
                self.new_exchange(now);
                // A short pause so a misbehaving server cannot make us spin.
                self.next_send = Some(now + self.cfg.initial_retransmit);
            }
            _ => {}
        }
    }

    fn new_exchange(&mut self, now: Instant) {
        self.xid = self.xid.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        self.exchange_start = now;
        self.attempts = 0;
        self.backoff = self.cfg.initial_retransmit;
    }

    fn send(&mut self, now: Instant) {
        let (mut options, ciaddr, dest) = match self.state {
            State::Init | State::Selecting => {
                self.state = State::Selecting;
                (
                    self.base_options(MessageType::Discover),
                    None,
                    Destination::Broadcast,
                )
            }
            State::Requesting => {
                if self.attempts >= self.cfg.request_attempts {
                    tracing::info!("no DHCP ACK for our REQUEST; starting over");
                    self.state = State::Selecting;
                    self.offer = None;
                    self.new_exchange(now);
                    return self.send(now);
                }
                let mut o = self.base_options(MessageType::Request);
                if let Some((addr, server)) = self.offer {
                    o.requested_ip = Some(addr);
                    o.server_id = Some(server);
                }
                (o, None, Destination::Broadcast)
            }
            State::Renewing | State::Rebinding => {
                let Some((l, _)) = &self.lease else {
                    return;
                };
                let dest = if self.state == State::Renewing {
                    Destination::Unicast(l.server)
                } else {
                    Destination::Broadcast
                };
                (
                    self.base_options(MessageType::Request),
                    Some(l.address),
                    dest,
                )
            }
            State::Bound => return,
        };
        options.max_size = Some(1500);
        let mut m = Message::request(self.xid, self.cfg.mac, options);
        m.secs = now
            .saturating_duration_since(self.exchange_start)
            .as_secs()
            .min(u64::from(u16::MAX)) as u16; // clamped just above
        match ciaddr {
            Some(a) => m.ciaddr = a,
            None => m.broadcast = true,
        }
        self.out.push(Output::Transmit(m, dest));
        self.attempts += 1;
        self.next_send = Some(now + self.retransmit_delay(now));
    }

    fn retransmit_delay(&mut self, now: Instant) -> Duration {
        match (&self.lease, self.state) {
            // RFC 2131 §4.4.5: half the time left until T2 (or expiry), at least 60 s.
            (Some((l, at)), State::Renewing | State::Rebinding) => {
                let phase_end = if self.state == State::Renewing {
                    *at + l.rebind_after
                } else {
                    *at + l.lease_time
                };
                let half = phase_end.saturating_duration_since(now) / 2;
                half.max(Duration::from_secs(60))
                    .min(phase_end.saturating_duration_since(now))
                    .max(Duration::from_secs(1))
            }
            _ => {
                let d = self.backoff;
                self.backoff = (self.backoff * 2).min(self.cfg.max_retransmit);
                d
            }
        }
    }

    fn base_options(&self, t: MessageType) -> Options {
        let mut client_id = vec![1u8];
        client_id.extend_from_slice(&self.cfg.mac);
        Options {
            message_type: Some(t),
            param_request: REQUESTED_PARAMS.to_vec(),
            client_id,
            hostname: self.cfg.hostname.clone(),
            ..Options::default()
        }
    }
}

fn lease_from(m: &Message) -> Option<Lease> {
    let o = &m.options;
    if m.yiaddr.is_unspecified() {
        return None;
    }
    let secs = o.lease_time?;
    let lease_time = Duration::from_secs(u64::from(secs));
    let renew = o
        .renewal_time
        .map(|t| Duration::from_secs(u64::from(t)))
        .filter(|t| *t < lease_time)
        .unwrap_or(lease_time / 2);
    let rebind = o
        .rebinding_time
        .map(|t| Duration::from_secs(u64::from(t)))
        .filter(|t| *t < lease_time && *t > renew)
        .unwrap_or(lease_time * 7 / 8)
        .max(renew);
    let prefix_len = o
        .subnet_mask
        .map(|m| u32::from(m).leading_ones() as u8) // at most 32
        .unwrap_or_else(|| classful_prefix(m.yiaddr));
    Some(Lease {
        address: m.yiaddr,
        prefix_len,
        server: o.server_id.unwrap_or(m.siaddr),
        routers: o.routers.clone(),
        dns: o.dns.clone(),
        ntp: o.ntp.clone(),
        domain: o.domain.clone(),
        lease_time,
        renew_after: renew,
        rebind_after: rebind,
    })
}

/// Servers that omit the subnet mask still expect the classful default (RFC 2132 §3.3).
fn classful_prefix(a: Ipv4Addr) -> u8 {
    match a.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 42);

    fn drain(c: &mut Client) -> Vec<Output> {
        std::iter::from_fn(|| c.poll_output()).collect()
    }

    fn sent(c: &mut Client) -> Vec<(Message, Destination)> {
        drain(c)
            .into_iter()
            .filter_map(|o| match o {
                Output::Transmit(m, d) => Some((m, d)),
                _ => None,
            })
            .collect()
    }

    fn reply(to: &Message, t: MessageType, lease: u32) -> Message {
        let mut m = Message::request(
            to.xid,
            MAC,
            Options {
                message_type: Some(t),
                server_id: Some(SERVER),
                lease_time: Some(lease),
                subnet_mask: Some(Ipv4Addr::new(255, 255, 255, 0)),
                routers: vec![SERVER],
                dns: vec![Ipv4Addr::new(10, 0, 0, 53)],
                ntp: vec![Ipv4Addr::new(10, 0, 0, 123)],
                ..Options::default()
            },
        );
        m.op = Op::Reply;
        m.yiaddr = ADDR;
        m
    }

    fn bound_client(t0: Instant) -> Client {
        let mut c = Client::new(ClientConfig::new(MAC, 7), t0);
        c.handle_timeout(t0);
        let (discover, _) = sent(&mut c).remove(0);
        c.handle_message(t0, &reply(&discover, MessageType::Offer, 100));
        let (request, _) = sent(&mut c).remove(0);
        c.handle_message(t0, &reply(&request, MessageType::Ack, 100));
        assert!(matches!(drain(&mut c)[..], [Output::Bound(_)]));
        c
    }

    #[test]
    fn discover_offer_request_ack() {
        let t0 = Instant::now();
        let mut c = Client::new(ClientConfig::new(MAC, 7), t0);
        assert_eq!(c.poll_timeout(), Some(t0));
        c.handle_timeout(t0);
        let s = sent(&mut c);
        assert_eq!(s.len(), 1);
        let (discover, dest) = &s[0];
        assert_eq!(*dest, Destination::Broadcast);
        assert_eq!(discover.options.message_type, Some(MessageType::Discover));
        assert!(discover.broadcast);
        assert_eq!(c.state(), State::Selecting);

        // A reply to someone else's transaction is ignored.
        let mut stray = reply(discover, MessageType::Offer, 100);
        stray.xid ^= 1;
        c.handle_message(t0, &stray);
        assert_eq!(c.state(), State::Selecting);

        c.handle_message(t0, &reply(discover, MessageType::Offer, 100));
        let (request, dest) = sent(&mut c).remove(0);
        assert_eq!(dest, Destination::Broadcast);
        assert_eq!(request.options.message_type, Some(MessageType::Request));
        assert_eq!(request.options.requested_ip, Some(ADDR));
        assert_eq!(request.options.server_id, Some(SERVER));
        assert_eq!(c.state(), State::Requesting);

        c.handle_message(t0, &reply(&request, MessageType::Ack, 100));
        let out = drain(&mut c);
        let Output::Bound(l) = &out[0] else {
            panic!("expected Bound, got {out:?}");
        };
        assert_eq!(l.address, ADDR);
        assert_eq!(l.prefix_len, 24);
        assert_eq!(l.ntp, vec![Ipv4Addr::new(10, 0, 0, 123)]);
        assert_eq!(l.renew_after, Duration::from_secs(50));
        assert_eq!(l.rebind_after, Duration::from_millis(87_500));
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(50)));
    }

    #[test]
    fn discover_backs_off_exponentially_to_the_cap() {
        let t0 = Instant::now();
        let mut c = Client::new(ClientConfig::new(MAC, 1), t0);
        let mut now = t0;
        let mut gaps = Vec::new();
        for _ in 0..7 {
            c.handle_timeout(now);
            assert_eq!(sent(&mut c).len(), 1);
            let next = c.poll_timeout().unwrap();
            gaps.push((next - now).as_secs());
            now = next;
        }
        assert_eq!(gaps, vec![2, 4, 8, 16, 32, 32, 32]);
    }

    #[test]
    fn renews_by_unicast_at_t1_then_rebinds_then_expires() {
        let t0 = Instant::now();
        let mut c = bound_client(t0);
        c.handle_timeout(t0 + Duration::from_secs(49));
        assert!(drain(&mut c).is_empty());
        let t1 = t0 + Duration::from_secs(50);
        c.handle_timeout(t1);
        assert_eq!(c.state(), State::Renewing);
        let (m, dest) = sent(&mut c).remove(0);
        assert_eq!(dest, Destination::Unicast(SERVER));
        assert_eq!(m.ciaddr, ADDR);
        assert!(!m.broadcast);
        assert_eq!(m.options.requested_ip, None);
        assert_eq!(m.options.server_id, None);

        let t2 = t0 + Duration::from_millis(87_500);
        c.handle_timeout(t2);
        assert_eq!(c.state(), State::Rebinding);
        let (_, dest) = sent(&mut c).remove(0);
        assert_eq!(dest, Destination::Broadcast);

        c.handle_timeout(t0 + Duration::from_secs(100));
        let out = drain(&mut c);
        assert!(matches!(out[0], Output::Lost(_)), "{out:?}");
        assert!(
            matches!(&out[1], Output::Transmit(m, _) if m.options.message_type == Some(MessageType::Discover))
        );
        assert_eq!(c.lease(), None);
    }

    #[test]
    fn renew_cap_shortens_t1_only() {
        let t0 = Instant::now();
        let mut cfg = ClientConfig::new(MAC, 7);
        cfg.renew_cap = Some(Duration::from_secs(3));
        let mut c = Client::new(cfg, t0);
        c.handle_timeout(t0);
        let (d, _) = sent(&mut c).remove(0);
        c.handle_message(t0, &reply(&d, MessageType::Offer, 100));
        let (r, _) = sent(&mut c).remove(0);
        c.handle_message(t0, &reply(&r, MessageType::Ack, 100));
        let l = c.lease().unwrap();
        assert_eq!(l.renew_after, Duration::from_secs(3));
        assert_eq!(l.rebind_after, Duration::from_millis(87_500));
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(3)));
    }

    #[test]
    fn renewal_ack_extends_the_lease() {
        let t0 = Instant::now();
        let mut c = bound_client(t0);
        let t1 = t0 + Duration::from_secs(50);
        c.handle_timeout(t1);
        let (m, _) = sent(&mut c).remove(0);
        c.handle_message(t1, &reply(&m, MessageType::Ack, 100));
        assert!(matches!(drain(&mut c)[..], [Output::Renewed(_)]));
        assert_eq!(c.state(), State::Bound);
        assert_eq!(c.poll_timeout(), Some(t1 + Duration::from_secs(50)));
    }

    #[test]
    fn nak_while_renewing_drops_the_lease_and_restarts() {
        let t0 = Instant::now();
        let mut c = bound_client(t0);
        let t1 = t0 + Duration::from_secs(50);
        c.handle_timeout(t1);
        let (m, _) = sent(&mut c).remove(0);
        c.handle_message(t1, &reply(&m, MessageType::Nak, 0));
        assert!(matches!(drain(&mut c)[..], [Output::Lost(_)]));
        assert_eq!(c.state(), State::Init);
        assert_eq!(c.poll_timeout(), Some(t1 + Duration::from_secs(2)));
        c.handle_timeout(t1 + Duration::from_secs(2));
        let (m, _) = sent(&mut c).remove(0);
        assert_eq!(m.options.message_type, Some(MessageType::Discover));
    }

    #[test]
    fn unanswered_requests_fall_back_to_discover() {
        let t0 = Instant::now();
        let mut c = Client::new(ClientConfig::new(MAC, 3), t0);
        c.handle_timeout(t0);
        let (d, _) = sent(&mut c).remove(0);
        c.handle_message(t0, &reply(&d, MessageType::Offer, 100));
        let mut types = vec![];
        for _ in 0..6 {
            for (m, _) in sent(&mut c) {
                types.push(m.options.message_type.unwrap());
            }
            let now = c.poll_timeout().unwrap();
            c.handle_timeout(now);
        }
        use MessageType::{Discover, Request};
        assert_eq!(types[..5], [Request, Request, Request, Request, Discover]);
    }

    #[test]
    fn ack_without_lease_time_is_ignored() {
        let t0 = Instant::now();
        let mut c = Client::new(ClientConfig::new(MAC, 3), t0);
        c.handle_timeout(t0);
        let (d, _) = sent(&mut c).remove(0);
        c.handle_message(t0, &reply(&d, MessageType::Offer, 100));
        let (r, _) = sent(&mut c).remove(0);
        let mut ack = reply(&r, MessageType::Ack, 100);
        ack.options.lease_time = None;
        c.handle_message(t0, &ack);
        assert_eq!(c.state(), State::Requesting);
        assert!(drain(&mut c).is_empty());
    }
}
