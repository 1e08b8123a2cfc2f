//! TLS termination with rustls: certificates chosen by SNI (exact names,
//! then the longest wildcard, then the default), ALPN offering h2 and
//! http/1.1 so one listener serves both, TLS 1.2 and 1.3; for reverse
//! tunnels, client certificates required and one ALPN protocol.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_rustls::TlsAcceptor;

use crate::config::{HostPattern, TlsSettings, TlsVersion};
use crate::pki::{certified_key, PkiError};

/// Builds the acceptor for a listener's TLS settings. The settings were
/// validated when the config was loaded, so failures here are unexpected.
pub fn acceptor(settings: &TlsSettings) -> Result<TlsAcceptor, PkiError> {
    let mut config = builder(settings)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver(settings)?));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// An acceptor that requires a client certificate signed by
/// `client_ca_pem` and agrees only on `alpn` (reverse tunnels).
pub fn mtls_acceptor(
    settings: &TlsSettings,
    client_ca_pem: &[u8],
    alpn: &[u8],
) -> Result<TlsAcceptor, PkiError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(client_ca_pem) {
        let cert = cert.map_err(|e| PkiError::CaPem(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| PkiError::UnusableCa(e.to_string()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| PkiError::UnusableCa(e.to_string()))?;
    let mut config = builder(settings)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(resolver(settings)?));
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn builder(
    settings: &TlsSettings,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, PkiError> {
    let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .map_err(|e| PkiError::Rustls(e.to_string()))
}

fn resolver(settings: &TlsSettings) -> Result<SniResolver, PkiError> {
    let mut resolver = SniResolver::default();
    for (i, certificate) in settings.certificates.iter().enumerate() {
        let key = match &certificate.certified {
            Some(certified) => certified.clone(),
            None => Arc::new(certified_key(&certificate.chain_pem, &certificate.key_pem)?),
        };
        if i == 0 {
            resolver.default = Some(key.clone());
        }
        for name in &certificate.names {
            match name {
                HostPattern::Exact(host) => {
                    resolver.exact.entry(host.clone()).or_insert(key.clone())
                }
                HostPattern::Wildcard(suffix) => resolver
                    .wildcard
                    .entry(suffix.clone())
                    .or_insert(key.clone()),
                HostPattern::Any => continue,
            };
        }
    }
    Ok(resolver)
}

#[derive(Debug, Default)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By suffix, e.g. ".example.com".
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return self.default.clone();
        };
        let name = name.to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return Some(key.clone());
        }
        name.match_indices('.')
            .find_map(|(i, _)| self.wildcard.get(&name[i..]))
            .or(self.default.as_ref())
            .cloned()
    }
}
