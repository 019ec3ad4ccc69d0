//! The HTTP(S) edge every network client of the agent shares: catalog, CDN downloads, remote
//! IPSW ranges, TSS.
//!
//! TLS is rustls with ring and the Mozilla roots compiled in (webpki-roots): the rescue image has
//! no system trust store, and a station's clock is set by SNTP before the first TLS handshake.
//! Tests and private mirrors add their own CA with [`HttpConfig::extra_ca`].

use std::path::PathBuf;
use std::time::Duration;

/// How the agent talks HTTP. Built once per process and shared.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// PEM file with one or more extra trusted CA certificates.
    pub extra_ca: Option<PathBuf>,
    /// `http://host:port` proxy for every request (from the station config).
    pub proxy: Option<String>,
    pub user_agent: String,
    pub connect_timeout: Duration,
    /// No bytes for this long on a response body = stalled.
    pub read_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            extra_ca: None,
            proxy: None,
            user_agent: format!("macrescue/{}", env!("CARGO_PKG_VERSION")),
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot read the extra CA certificate {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("the proxy setting {0:?} is not a valid URL")]
    Proxy(String),
    #[error("cannot set up the HTTP client: {0}")]
    Client(String),
}

impl HttpConfig {
    /// A reqwest client with our TLS roots, proxy and timeouts.
    pub fn client(&self) -> Result<reqwest::Client, HttpError> {
        self.builder()?
            .build()
            .map_err(|e| HttpError::Client(e.to_string()))
    }

    /// The configured builder, for clients that need more (the downloader forces HTTP/1.1 so
    /// its parallel ranges are separate TCP connections, each with its own CDN rate limit).
    pub fn builder(&self) -> Result<reqwest::ClientBuilder, HttpError> {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .user_agent(self.user_agent.clone())
            .connect_timeout(self.connect_timeout)
            .read_timeout(self.read_timeout);
        if let Some(path) = &self.extra_ca {
            for cert in read_ca(path)? {
                b = b.add_root_certificate(cert);
            }
        }
        match &self.proxy {
            Some(p) => {
                let proxy = reqwest::Proxy::all(p).map_err(|_| HttpError::Proxy(p.clone()))?;
                b = b.proxy(proxy);
            }
            // Never pick up a proxy from the environment implicitly: a station is configured
            // by its config file, and tests must never leave loopback.
            None => b = b.no_proxy(),
        }
        Ok(b)
    }
}

/// reqwest's top-level message hides the cause (refused, DNS, TLS); walk the chain.
pub fn describe_error(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "could not connect".to_string()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn read_ca(path: &PathBuf) -> Result<Vec<reqwest::Certificate>, HttpError> {
    let err = |reason: String| HttpError::Ca {
        path: path.clone(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in the file".into()));
    }
    certs
        .iter()
        .map(|c| reqwest::Certificate::from_der(c.as_ref()).map_err(|e| err(e.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_client_builds() {
        HttpConfig::default().client().unwrap();
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let cfg = HttpConfig {
            extra_ca: Some("/nonexistent/ca.pem".into()),
            ..HttpConfig::default()
        };
        let e = cfg.client().unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let p = std::env::temp_dir().join(format!("macrescue-empty-ca-{}.pem", std::process::id()));
        std::fs::write(&p, b"not a certificate\n").unwrap();
        let cfg = HttpConfig {
            extra_ca: Some(p.clone()),
            ..HttpConfig::default()
        };
        let e = cfg.client().unwrap_err().to_string();
        let _ = std::fs::remove_file(&p);
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
