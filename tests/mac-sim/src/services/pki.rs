//! A test certificate authority generated at run time: never committed, never trusted by
//! anything but the test that made it.

use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating the test certificates failed: {0}")]
    Generate(String),
    #[error("building the TLS server configuration failed: {0}")]
    Tls(String),
}

/// A CA and one server certificate for `localhost` and 127.0.0.1 (plus any extra names).
pub struct TestPki {
    /// PEM of the CA certificate: what the agent must trust (`--ca-file`).
    pub ca_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

impl TestPki {
    pub fn generate(extra_names: &[&str]) -> Result<TestPki, PkiError> {
        let gen = |e: rcgen::Error| PkiError::Generate(e.to_string());
        let ca_key = rcgen::KeyPair::generate().map_err(gen)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "macrescue test CA");
        let ca = ca_params.self_signed(&ca_key).map_err(gen)?;

        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
        names.extend(extra_names.iter().map(|s| s.to_string()));
        let key = rcgen::KeyPair::generate().map_err(gen)?;
        let params = rcgen::CertificateParams::new(names).map_err(gen)?;
        let cert = params.signed_by(&key, &ca, &ca_key).map_err(gen)?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| PkiError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone(), ca.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        Ok(TestPki {
            ca_pem: ca.pem(),
            server_config: Arc::new(server_config),
        })
    }
}
