//! The HTTP edge to Apple's signing server (TSS, protocol.md §4.1): posts the XML requests
//! built by [`crate::tss`] and hands the reply to [`tss::parse_response`].
//!
//! It lives outside `tss/` because that module is sans-IO. Two front ends share one retry
//! policy:
//! * [`TssClient`] is async, for code already running on tokio;
//! * [`BlockingTssClient`] owns a dedicated current-thread runtime and a client bound to it,
//!   for synchronous callers such as the boot-chain driver thread. reqwest's own `blocking`
//!   feature is not enabled (it would pull a second runtime per client anyway), and a client's
//!   pooled connections belong to the runtime that opened them, so the blocking client never
//!   shares its `reqwest::Client` with another runtime.
//!
//! Retry policy (§4.1): only a reply without `STATUS=` (network failure, proxy error page,
//! dropped connection) is retried; any STATUS the server sends is final. Without an explicit
//! server the attempts rotate through [`tss::transport::SERVER_URLS`].

use std::time::Duration;

use plist::Dictionary;

use crate::http::{describe_error, HttpConfig, HttpError};
use crate::personalize::{TssTransport, TssTransportError};
use crate::tss::{self, transport, RequestUuid, TssError, TssParams, TssResponse};

/// Largest reply accepted: real ones are tens of KiB; a cap keeps a broken proxy that streams
/// forever from exhausting the rescue image's memory.
const MAX_REPLY: usize = 16 << 20;

/// Longest pause between attempts; the delay doubles from [`TssClientConfig::retry_delay`] up
/// to this many times the base.
const MAX_BACKOFF_FACTOR: u32 = 4;

/// Where and how persistently to ask for tickets.
#[derive(Debug, Clone)]
pub struct TssClientConfig {
    /// An explicit server (`--tss-url`); a URL with no path gets `/TSS/controller?action=2`.
    /// `None` rotates through Apple's servers.
    pub server: Option<String>,
    /// Attempts when no STATUS comes back.
    pub max_attempts: usize,
    /// Pause after the first failed attempt; doubled for each further one (capped at 4×).
    pub retry_delay: Duration,
    /// TLS roots, extra CA, proxy and timeouts.
    pub http: HttpConfig,
}

impl Default for TssClientConfig {
    fn default() -> Self {
        Self {
            server: None,
            max_attempts: transport::MAX_ATTEMPTS,
            retry_delay: transport::RETRY_DELAY,
            http: HttpConfig::default(),
        }
    }
}

impl TssClientConfig {
    /// The URL of attempt `n` (0-based).
    pub fn url_for_attempt(&self, n: usize) -> String {
        match &self.server {
            Some(custom) => transport::server_url(custom),
            None => transport::url_for_attempt(n).to_string(),
        }
    }

    fn delay_before_retry(&self, failed_attempts: usize) -> Duration {
        let shift = failed_attempts.saturating_sub(1).min(31) as u32;
        let factor = 1u32.checked_shl(shift).unwrap_or(u32::MAX);
        self.retry_delay * factor.min(MAX_BACKOFF_FACTOR)
    }
}

/// Errors of the TSS HTTP edge.
#[derive(Debug, thiserror::Error)]
pub enum TssClientError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(
        "Apple's signing server did not answer after {attempts} attempt(s) (last: {last_url}: \
         {reason}); check the station's network cable, DNS, proxy and clock, then try again"
    )]
    Unreachable {
        attempts: usize,
        last_url: String,
        reason: String,
    },
    /// The server answered with a STATUS: not signed, malformed request, … (never retried).
    #[error(transparent)]
    Tss(#[from] TssError),
    #[error(
        "the blocking TSS client was called from inside an async task; use TssClient there \
         (this is a macrescue bug: report it with the log)"
    )]
    InsideRuntime,
    #[error("cannot start the network runtime for TSS requests: {0}")]
    Runtime(String),
    /// A firmware-updater request (§4.9) failed after it was built: which coprocessor.
    #[error("the {updater} firmware ticket request failed: {source}")]
    Updater {
        updater: String,
        #[source]
        source: Box<TssClientError>,
    },
}

/// Whether Apple signs a build for one Mac right now (§9.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signing {
    /// STATUS 0: a ticket was issued.
    Signed,
    /// STATUS 69 or 94: the Mac is not eligible for this build.
    NotSigned { status: i64, message: String },
}

/// Async TSS client.
#[derive(Debug, Clone)]
pub struct TssClient {
    config: TssClientConfig,
    client: reqwest::Client,
}

impl TssClient {
    pub fn new(config: TssClientConfig) -> Result<Self, TssClientError> {
        let client = config.http.client()?;
        Ok(Self { config, client })
    }

    pub fn config(&self) -> &TssClientConfig {
        &self.config
    }

    /// Posts an XML request and returns the parsed ticket reply; a refusal (any STATUS other
    /// than success) is a [`TssClientError::Tss`] error.
    pub async fn post(&self, xml: &[u8]) -> Result<TssResponse, TssClientError> {
        let body = self.request(xml).await?;
        Ok(tss::parse_response(&body)?)
    }

    /// Posts an XML request and returns the raw body of the first reply that carries a
    /// STATUS, whatever it says (`STATUS=94&…` included): the caller parses it. Only replies
    /// without STATUS are retried. This is the contract of the personalization helper's
    /// `TssTransport::request`.
    pub async fn request(&self, xml: &[u8]) -> Result<Vec<u8>, TssClientError> {
        let attempts = self.config.max_attempts.max(1);
        let mut last_url = String::new();
        let mut reason = String::new();
        for attempt in 0..attempts {
            if attempt > 0 {
                let delay = self.config.delay_before_retry(attempt);
                tracing::info!(attempt, ?delay, %reason, "retrying the TSS request");
                tokio::time::sleep(delay).await;
            }
            last_url = self.config.url_for_attempt(attempt);
            match self.attempt(&last_url, xml).await {
                Ok(body) => match tss::parse_response(&body) {
                    Err(TssError::NoStatus) => {
                        reason = format!("reply without STATUS: {}", snippet(&body));
                    }
                    // Any STATUS is Apple's final word (§4.1), success or not.
                    _ => {
                        tracing::info!(url = %last_url, "TSS server answered");
                        return Ok(body);
                    }
                },
                Err(e) => reason = e,
            }
            tracing::warn!(url = %last_url, attempt, %reason, "TSS attempt failed");
        }
        Err(TssClientError::Unreachable {
            attempts,
            last_url,
            reason,
        })
    }

    /// Encodes and posts a request dictionary (from `tss::*_request`).
    pub async fn send(&self, request: &Dictionary) -> Result<TssResponse, TssClientError> {
        let xml = tss::to_xml(request)?;
        self.post(&xml).await
    }

    /// Answers one `FirmwareUpdaterData` request end to end (§4.9): the updater's request is
    /// built from the restore's build `identity` and restored's `arguments`, sent, and
    /// `FirmwareResponseData` assembled from the reply and the component files `read` returns
    /// (it is given IPSW paths). Every failure names the updater.
    pub async fn firmware_updater<F, Fut>(
        &self,
        identity: &Dictionary,
        arguments: &Dictionary,
        read: F,
    ) -> Result<Dictionary, TssClientError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<u8>, String>>,
    {
        let args = tss::UpdaterArgs::parse(arguments)?;
        let plan = tss::updater_request(identity, &args, &RequestUuid::random())?;
        tracing::info!(updater = %plan.updater, ticket = %plan.ticket, "requesting a firmware-updater ticket");
        let response = self
            .send(&plan.request)
            .await
            .map_err(|e| TssClientError::Updater {
                updater: plan.updater.clone(),
                source: Box::new(e),
            })?;
        let mut files = std::collections::BTreeMap::new();
        for component in plan.firmware.components() {
            let fail = |what: String| TssError::UpdaterFirmware {
                updater: plan.updater.clone(),
                what,
            };
            let path = tss::updater::component_path(identity, component)
                .ok_or_else(|| fail(format!("the build identity gives no path for {component}")))?;
            let bytes = read(path.clone())
                .await
                .map_err(|e| fail(format!("cannot read {component} ({path}): {e}")))?;
            files.insert(component.to_string(), bytes);
        }
        Ok(tss::firmware_response(&plan, &response, &files)?)
    }

    /// Asks Apple whether `identity` (one element of `BuildIdentities`) is signed for the Mac
    /// described by `params`, with the main AP request (§4.4, §9.4).
    pub async fn is_signed(
        &self,
        identity: &Dictionary,
        params: &TssParams,
    ) -> Result<Signing, TssClientError> {
        let request = tss::main_ap_request(identity, params, &RequestUuid::random())?;
        match self.send(&request).await {
            Ok(_) => Ok(Signing::Signed),
            Err(TssClientError::Tss(TssError::NotSigned { status, message })) => {
                Ok(Signing::NotSigned { status, message })
            }
            Err(e) => Err(e),
        }
    }

    /// One POST; `Err` is a network-level failure described for the technician.
    async fn attempt(&self, url: &str, xml: &[u8]) -> Result<Vec<u8>, String> {
        let mut request = self.client.post(url).body(xml.to_vec());
        for (name, value) in transport::HEADERS {
            request = request.header(name, value);
        }
        let mut response = request.send().await.map_err(|e| describe_error(&e))?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| describe_error(&e))? {
            if body.len() + chunk.len() > MAX_REPLY {
                return Err(format!("reply larger than {MAX_REPLY} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            tracing::debug!(%status, "TSS server answered with an HTTP error");
        }
        Ok(body)
    }
}

/// Synchronous TSS client for threads that are not async (the boot-chain driver).
#[derive(Debug)]
pub struct BlockingTssClient {
    runtime: tokio::runtime::Runtime,
    inner: TssClient,
}

impl BlockingTssClient {
    pub fn new(config: TssClientConfig) -> Result<Self, TssClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TssClientError::Runtime(e.to_string()))?;
        let inner = TssClient::new(config)?;
        Ok(Self { runtime, inner })
    }

    pub fn config(&self) -> &TssClientConfig {
        self.inner.config()
    }

    /// See [`TssClient::post`].
    pub fn post(&self, xml: &[u8]) -> Result<TssResponse, TssClientError> {
        self.block_on(self.inner.post(xml))
    }

    /// See [`TssClient::request`].
    pub fn request(&self, xml: &[u8]) -> Result<Vec<u8>, TssClientError> {
        self.block_on(self.inner.request(xml))
    }

    /// See [`TssClient::send`].
    pub fn send(&self, request: &Dictionary) -> Result<TssResponse, TssClientError> {
        self.block_on(self.inner.send(request))
    }

    /// See [`TssClient::is_signed`].
    pub fn is_signed(
        &self,
        identity: &Dictionary,
        params: &TssParams,
    ) -> Result<Signing, TssClientError> {
        self.block_on(self.inner.is_signed(identity, params))
    }

    fn block_on<T>(
        &self,
        future: impl std::future::Future<Output = Result<T, TssClientError>>,
    ) -> Result<T, TssClientError> {
        // Runtime::block_on panics inside another runtime; report it instead.
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(TssClientError::InsideRuntime);
        }
        self.runtime.block_on(future)
    }
}

/// The personalizing image provider's transport: the boot-chain driver thread asks for tickets
/// through this.
impl TssTransport for BlockingTssClient {
    fn request(&mut self, request_xml: &[u8]) -> Result<Vec<u8>, TssTransportError> {
        // `request` returns refusals as bodies; every error left means no usable answer.
        BlockingTssClient::request(self, request_xml).map_err(|e| match e {
            // The transport error adds its own advice; pass only the facts.
            TssClientError::Unreachable {
                attempts,
                last_url,
                reason,
            } => TssTransportError::Unreachable(format!(
                "no answer after {attempts} attempt(s), last {last_url}: {reason}"
            )),
            other => TssTransportError::Unreachable(other.to_string()),
        })
    }
}

/// A short, printable start of a body for error messages (proxies answer with HTML pages).
fn snippet(body: &[u8]) -> String {
    if body.is_empty() {
        return "empty body".to_string();
    }
    let text: String = String::from_utf8_lossy(&body[..body.len().min(80)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("{:?}", text.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_servers_get_the_tss_path_and_default_rotates() {
        let custom = TssClientConfig {
            server: Some("http://127.0.0.1:9".into()),
            ..TssClientConfig::default()
        };
        assert_eq!(
            custom.url_for_attempt(3),
            "http://127.0.0.1:9/TSS/controller?action=2"
        );
        let default = TssClientConfig::default();
        assert_eq!(default.url_for_attempt(0), transport::SERVER_URLS[0]);
        assert_eq!(default.url_for_attempt(4), transport::SERVER_URLS[4]);
        assert_eq!(default.max_attempts, 15);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let c = TssClientConfig {
            retry_delay: Duration::from_secs(2),
            ..TssClientConfig::default()
        };
        let delays: Vec<u64> = (1..=5).map(|n| c.delay_before_retry(n).as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 8, 8]);
        assert_eq!(c.delay_before_retry(usize::MAX).as_secs(), 8);
    }

    #[test]
    fn snippets_are_short_and_printable() {
        assert_eq!(snippet(b""), "empty body");
        assert_eq!(snippet(b"<html>\r\n502</html>"), "\"<html>  502</html>\"");
        assert_eq!(snippet(&[b'a'; 200]).len(), 82);
    }

    #[tokio::test]
    async fn the_blocking_client_refuses_to_run_inside_a_runtime() {
        let client = BlockingTssClient::new(TssClientConfig::default());
        // Building is fine; only blocking calls are refused.
        let client = client.unwrap();
        assert!(matches!(
            client.post(b"<plist/>"),
            Err(TssClientError::InsideRuntime)
        ));
        // Dropping a runtime inside another one panics; leak it instead in this test.
        std::mem::forget(client);
    }
}
