//! Fetching the firmware catalog over HTTP: Apple's mesu catalog first, ipsw.me as fallback
//! (protocol.md §9.1, §9.2). Parsing is [`crate::catalog`]'s job; this is the network edge
//! that decides which source answered and explains every failure.
//!
//! Any failure of the primary source (network, HTTP status, a body that is no catalog, a
//! product type missing from it) falls back, and the result says so: a technician should know
//! that the list came from a third-party mirror. Signing status is not taken from either
//! source; see [`crate::tss_client::TssClient::is_signed`].

use std::fmt;
use std::time::Duration;

use crate::catalog::{self, CatalogError, FirmwareEntry};
use crate::http::{describe_error, HttpConfig, HttpError};

/// Default base of the ipsw.me API (§9.1).
pub const IPSW_ME_BASE_URL: &str = "https://api.ipsw.me";

/// Largest catalog body accepted. Real ones are 0.1–2 MB; the cap stops a misbehaving proxy
/// from filling the rescue image's memory.
pub const MAX_CATALOG_LEN: usize = 32 << 20;

/// Where to look and how long to wait.
#[derive(Debug, Clone)]
pub struct CatalogFetchConfig {
    /// The mesu catalog URL.
    pub catalog_url: String,
    /// The ipsw.me API: a base URL (`/v4/device/<ProductType>` is appended) or a URL
    /// containing `{model}`. `None` disables the fallback.
    pub fallback_url: Option<String>,
    /// Whole-request limit per source (connect + answer + body).
    pub timeout: Duration,
    pub http: HttpConfig,
}

impl Default for CatalogFetchConfig {
    fn default() -> Self {
        Self {
            catalog_url: catalog::MESU_MACOS_IPSW_CATALOG_URL.to_string(),
            fallback_url: Some(IPSW_ME_BASE_URL.to_string()),
            timeout: Duration::from_secs(60),
            http: HttpConfig::default(),
        }
    }
}

/// The ipsw.me device URL for `product_type` from a configured base or template.
pub fn ipsw_me_url(base: &str, product_type: &str) -> String {
    if base.contains("{model}") {
        base.replace("{model}", product_type)
    } else {
        format!("{}/v4/device/{product_type}", base.trim_end_matches('/'))
    }
}

/// Which source a list came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogSource {
    /// Apple's mesu catalog: first party.
    Apple,
    /// ipsw.me: a third-party mirror.
    IpswMe,
}

impl fmt::Display for CatalogSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CatalogSource::Apple => "Apple's catalog",
            CatalogSource::IpswMe => "ipsw.me",
        })
    }
}

/// Why one source gave no list.
#[derive(Debug, thiserror::Error)]
pub enum FailureReason {
    #[error("no answer ({0})")]
    Network(String),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("the answer is larger than {MAX_CATALOG_LEN} bytes")]
    TooLarge,
    #[error("{0}")]
    Catalog(#[from] CatalogError),
}

/// One source's failure, naming the source and URL.
#[derive(Debug, thiserror::Error)]
#[error("{source_name} ({url}) failed: {reason}")]
pub struct SourceFailure {
    pub source_name: CatalogSource,
    pub url: String,
    pub reason: FailureReason,
}

/// Errors of catalog fetching.
#[derive(Debug, thiserror::Error)]
pub enum CatalogFetchError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(
        "{0}; no fallback is configured: check the station's network, or pass --fallback-url, \
         or give the IPSW with --ipsw"
    )]
    PrimaryFailed(Box<SourceFailure>),
    #[error(
        "no firmware list: {primary}; the fallback {fallback}. Check the station's network \
         (cable, DNS, proxy, clock), or give the IPSW with --ipsw"
    )]
    BothFailed {
        primary: Box<SourceFailure>,
        fallback: Box<SourceFailure>,
    },
}

/// The builds offered for one product type, and where they came from.
#[derive(Debug)]
pub struct FetchedBuilds {
    pub source: CatalogSource,
    pub url: String,
    /// Newest first.
    pub entries: Vec<FirmwareEntry>,
    /// Set when the list came from the fallback: why the primary failed.
    pub primary_failure: Option<SourceFailure>,
}

impl FetchedBuilds {
    /// A one-line note for the technician when the fallback was used.
    pub fn fallback_note(&self) -> Option<String> {
        self.primary_failure
            .as_ref()
            .map(|f| format!("{f}; using the fallback {} ({})", self.source, self.url))
    }
}

/// Fetches catalogs with one shared HTTP client.
#[derive(Debug, Clone)]
pub struct CatalogFetcher {
    config: CatalogFetchConfig,
    client: reqwest::Client,
}

impl CatalogFetcher {
    pub fn new(config: CatalogFetchConfig) -> Result<Self, CatalogFetchError> {
        let client = config.http.client()?;
        Ok(Self { config, client })
    }

    pub fn config(&self) -> &CatalogFetchConfig {
        &self.config
    }

    /// Every build offered for `product_type`, newest first: from Apple's catalog, or from
    /// the fallback if Apple's fails for any reason.
    pub async fn builds_for(&self, product_type: &str) -> Result<FetchedBuilds, CatalogFetchError> {
        let primary_url = self.config.catalog_url.clone();
        let primary = self
            .get(&primary_url)
            .await
            .and_then(|body| Ok(catalog::MesuCatalog::parse(&body)?.builds_for(product_type)?));
        let primary_failure = match primary {
            Ok(entries) => {
                tracing::info!(url = %primary_url, count = entries.len(), "catalog fetched");
                return Ok(FetchedBuilds {
                    source: CatalogSource::Apple,
                    url: primary_url,
                    entries,
                    primary_failure: None,
                });
            }
            Err(reason) => SourceFailure {
                source_name: CatalogSource::Apple,
                url: primary_url,
                reason,
            },
        };
        let Some(base) = &self.config.fallback_url else {
            return Err(CatalogFetchError::PrimaryFailed(Box::new(primary_failure)));
        };
        // Info, not warn: the result carries the note, and the CLI prints it once.
        tracing::info!(%primary_failure, "falling back to ipsw.me");
        let url = ipsw_me_url(base, product_type);
        let fallback = self
            .get(&url)
            .await
            .and_then(|body| Ok(catalog::parse_ipsw_me_device(&body, product_type)?));
        match fallback {
            Ok(entries) => Ok(FetchedBuilds {
                source: CatalogSource::IpswMe,
                url,
                entries,
                primary_failure: Some(primary_failure),
            }),
            Err(reason) => Err(CatalogFetchError::BothFailed {
                primary: Box::new(primary_failure),
                fallback: Box::new(SourceFailure {
                    source_name: CatalogSource::IpswMe,
                    url,
                    reason,
                }),
            }),
        }
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, FailureReason> {
        let timeout = self.config.timeout;
        let fetch = async {
            let net = |e: reqwest::Error| {
                if e.is_timeout() {
                    FailureReason::Timeout(timeout)
                } else {
                    FailureReason::Network(describe_error(&e))
                }
            };
            let mut response = self.client.get(url).send().await.map_err(net)?;
            if !response.status().is_success() {
                return Err(FailureReason::Status(response.status().as_u16()));
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(net)? {
                if body.len() + chunk.len() > MAX_CATALOG_LEN {
                    return Err(FailureReason::TooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(body)
        };
        tokio::time::timeout(timeout, fetch)
            .await
            .unwrap_or(Err(FailureReason::Timeout(timeout)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipsw_me_urls() {
        assert_eq!(
            ipsw_me_url("https://api.ipsw.me/", "Mac14,2"),
            "https://api.ipsw.me/v4/device/Mac14,2"
        );
        assert_eq!(
            ipsw_me_url("http://mirror/x/{model}?type=ipsw", "Mac14,2"),
            "http://mirror/x/Mac14,2?type=ipsw"
        );
    }

    #[test]
    fn defaults_point_at_apple_then_ipsw_me() {
        let c = CatalogFetchConfig::default();
        assert_eq!(c.catalog_url, catalog::MESU_MACOS_IPSW_CATALOG_URL);
        assert_eq!(c.fallback_url.as_deref(), Some(IPSW_ME_BASE_URL));
    }
}
