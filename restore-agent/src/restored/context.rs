//! What the restore needs from the rest of the agent, as two small traits.
//!
//! [`RestoreContext`] is everything that knows about firmware: tickets, the build identities,
//! IPSW files, personalization, TSS and HTTP. The engine implements it over the IPSW and the
//! TSS client; tests implement it from memory. [`Connector`] opens device ports (a
//! [`crate::usbmux::edge::MuxHandle`] in production, in-memory pipes in tests).

use std::future::Future;
use std::io;

use plist::Dictionary;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::asr::ImageSource;

use super::events::RestoreEvent;

/// Why the context could not provide something. The message is shown to the technician.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("{0} is not in the firmware (IPSW)")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
}

/// Arguments of a `RecoveryOSLocalPolicy` request (§7.7, ticket per §4.8).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalPolicyArgs {
    pub next_stage_im4m_hash: Vec<u8>,
    pub recovery_os_policy_nonce_hash: Vec<u8>,
    pub volume_uuid: Vec<u8>,
}

/// An HTTP request restored asks the host to make (`URLAsset`, `StreamedImageDecryptionKey`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Firmware-side services of a restore session.
///
/// "Identity" is the selected build identity dictionary: the Erase or Update identity
/// (`is_recovery_os == false`) or the `macOS Customer` one (`true`), as §7.7 and §10 describe.
/// Handlers find component paths in it themselves (`Manifest.<name>.Info.Path`).
pub trait RestoreContext: Send + Sync + 'static {
    /// The main `ApImg4Ticket` (§4.4).
    fn root_ticket(&self) -> impl Future<Output = Result<Vec<u8>, ContextError>> + Send;

    /// The recovery-OS root ticket (§4.7).
    fn recovery_os_root_ticket(&self)
        -> impl Future<Output = Result<Vec<u8>, ContextError>> + Send;

    /// The local-policy IMG4 (lpol IM4P stitched with the §4.8 ticket) for these arguments.
    fn local_policy(
        &self,
        args: LocalPolicyArgs,
    ) -> impl Future<Output = Result<Vec<u8>, ContextError>> + Send;

    /// The build identity dictionary; `variant` is the device's `Variant` argument, if any.
    fn build_identity(
        &self,
        is_recovery_os: bool,
        variant: Option<String>,
    ) -> impl Future<Output = Result<Dictionary, ContextError>> + Send;

    /// `component` of the chosen identity, personalized (stitched IMG4 with the main ticket).
    fn personalized(
        &self,
        component: String,
        is_recovery_os: bool,
    ) -> impl Future<Output = Result<Vec<u8>, ContextError>> + Send;

    /// A file of the IPSW by path, unmodified.
    fn raw_file(&self, path: String) -> impl Future<Output = Result<Vec<u8>, ContextError>> + Send;

    /// IPSW entry paths (files only) starting with `prefix`, sorted.
    fn list_files(
        &self,
        prefix: String,
    ) -> impl Future<Output = Result<Vec<String>, ContextError>> + Send;

    /// The system image to stream with ASR (`Manifest.OS` of the selected identity; also used
    /// for `RecoveryOSASRImage`, §12.7).
    fn os_image(&self) -> impl Future<Output = Result<ImageSource, ContextError>> + Send;

    /// `FirmwareResponseData` for a `FirmwareUpdaterData` request's arguments (§4.9).
    fn firmware_updater(
        &self,
        arguments: Dictionary,
    ) -> impl Future<Output = Result<plist::Value, ContextError>> + Send;

    /// Performs an HTTP request on the device's behalf.
    fn url_request(
        &self,
        request: UrlRequest,
    ) -> impl Future<Output = Result<UrlResponse, ContextError>> + Send;

    /// Something happened (progress, checkpoint, log, crash); default: nothing beyond tracing.
    fn event(&self, event: RestoreEvent) {
        let _ = event;
    }
}

/// Opens TCP-like connections to device ports.
pub trait Connector: Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn connect(&self, port: u16) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}
