//! A simulated Apple Silicon Mac for macrescue's tests.
//!
//! It implements the device side of DFU, Port DFU and the iBoot recovery protocol on its own,
//! from `shared/docs/protocol.md`, and deliberately shares no code with `restore-agent`: a
//! misunderstanding of the protocol in one must not be mirrored in the other.

pub mod board;
pub mod descriptors;
pub mod device;
pub mod dfu;
pub mod faults;
pub mod ftab;
pub mod iboot;
pub mod images;
pub mod img4;
pub mod inproc;
pub mod ipsw;
pub mod restore;
pub mod services;
pub mod ticket;
pub mod usbip;
pub mod wire;
