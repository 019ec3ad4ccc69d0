//! DHCPv4: the wire format and the client state machine (sans-IO), and the per-link edge that
//! runs them over a UDP socket and applies leases.

pub mod client;
pub mod edge;
pub mod wire;

pub use client::{Client, ClientConfig, Destination, Lease, Output, State};

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("malformed DHCP message: {0}")]
    Malformed(&'static str),
}
