//! macrescue's restore agent as a library: everything the `restore-agent` binary does, layered
//! as described in `ARCHITECTURE.md` at the repository root.
//!
//! Protocol modules (`identity`, `dfu`, `recovery`, `manifest`, `bootchain::plan`) are sans-IO:
//! they never touch USB themselves. Only `usb::rusb_edge` talks to libusb, and only
//! `bootchain::driver` executes plans against a [`usb::UsbTransport`].

pub mod asr;
pub mod bootchain;
pub mod catalog;
pub mod catalog_fetch;
pub mod dfu;
pub mod download;
pub mod engine;
pub mod ftab;
pub mod http;
pub mod identity;
pub mod img4;
pub mod ipsw;
pub mod manifest;
pub mod net;
pub mod personalize;
pub mod recovery;
pub mod restored;
pub mod reverse_proxy;
pub mod station;
pub mod tss;
pub mod tss_client;
pub mod usb;
pub mod usbip;
pub mod usbmux;
