//! TSS personalization requests (§4 of the protocol notes), sans-IO.
//!
//! This module builds the request plists Apple's signing server (`gs.apple.com`) expects and
//! parses its answers; it never opens a connection. The HTTP client that posts the requests
//! uses the facts in [`transport`] and feeds the raw body to [`parse_response`].
//!
//! Build identities are taken as raw `plist::Dictionary`s (one element of `BuildIdentities`)
//! so this module does not depend on how the manifest is modelled elsewhere.

mod params;
mod request;
mod response;
pub mod rules;
pub mod transport;
pub mod updater;

pub use params::{parse_volume_uuid, IdentityParams, RequestUuid, TssParams};
pub use request::{
    local_policy_request, main_ap_request, recovery_os_local_policy_request,
    recovery_os_root_request, to_xml, RecoveryOsLocalPolicyArgs, HOST_PLATFORM_INFO, VERSION_INFO,
};
pub use response::{parse_response, TssResponse};
pub use updater::{
    firmware_response, updater_request, FirmwarePlan, UpdaterArgs, UpdaterKind, UpdaterPlan,
};

/// Everything that can go wrong building a TSS request or reading Apple's answer.
#[derive(Debug, thiserror::Error)]
pub enum TssError {
    #[error("the build identity has no usable `{key}` ({why}); the BuildManifest may be damaged: download the IPSW again")]
    BadIdentity {
        key: &'static str,
        why: &'static str,
    },
    #[error("no ApNonce was read from the Mac; re-read its identity (replug the cable) before requesting a ticket")]
    MissingApNonce,
    #[error("`{0}` is not a volume UUID (expected XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX)")]
    BadVolumeUuid(String),
    #[error("`{0}` is not a request UUID (expected 36 uppercase hex characters and dashes)")]
    BadRequestUuid(String),
    #[error("could not encode the TSS request as XML: {0}")]
    Encode(String),
    #[error("no answer from Apple's signing server (no STATUS in the reply); check the Mac-side network connection: the request will be retried")]
    NoStatus,
    #[error("Apple will not sign this macOS build for this Mac (status {status}: {message}); the build is no longer signed or not for this model: pick another, current build")]
    NotSigned { status: i64, message: String },
    #[error("Apple's signing server rejected the request as malformed (status {status}: {message}); re-download the IPSW, and if this persists report it with the log")]
    MalformedRequest { status: i64, message: String },
    #[error("Apple's signing server reported a server or baseband-data error (status {status}: {message}); wait a few minutes and try again")]
    ServerError { status: i64, message: String },
    #[error("Apple's signing server refused the request (status {status}: {message})")]
    Refused { status: i64, message: String },
    #[error("Apple's signing server sent a reply that cannot be read ({0}); try again")]
    GarbledResponse(String),
    #[error("the signing server's reply has no `{0}`; the build may not support this Mac: pick another build")]
    MissingTicket(String),
    #[error("restored's firmware-updater request for {updater} is malformed ({what}); the restore ramdisk may be newer than this agent: report it with the log")]
    UpdaterArguments { updater: String, what: String },
    #[error("cannot build the {updater} firmware-updater TSS request: {what}; the IPSW may not be for this Mac: check the model and re-download it")]
    UpdaterRequest { updater: String, what: String },
    #[error("cannot assemble the {updater} firmware for the Mac: {what}; the IPSW may be damaged: re-download it")]
    UpdaterFirmware { updater: String, what: String },
}

impl TssError {
    /// Whether sending the same request again may help (only when no STATUS came back, as
    /// libtatsu does: any answer from the server is final).
    pub fn is_retryable(&self) -> bool {
        matches!(self, TssError::NoStatus)
    }
}
