//! Simulated Apple services (catalog, CDN, TSS) for tests and the VM demo.
//!
//! `http` is a small HTTP/1.1 server written for fault injection: handlers get the raw
//! connection through a [`http::Responder`] so they can cut a body at byte N, stall, or lie
//! about content. `pki` makes a throwaway test CA and server certificate at run time.

pub mod catalog;
pub mod cdn;
pub mod http;
pub mod pki;
pub mod tss;
pub mod tss_updater;
