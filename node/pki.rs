//! Certificates and keys as rustls takes them: a server's chain and key
//! checked to belong together, the client side of TLS with a CA (or the
//! system roots) and an optional client certificate. Below both the config
//! (which checks TLS material when it validates) and `tls` (which serves it).

use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS material is unusable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PkiError {
    #[error("invalid certificate PEM: {0}")]
    CertificatePem(String),
    #[error("invalid key PEM: {0}")]
    KeyPem(String),
    #[error("unsupported private key: {0}")]
    UnsupportedKey(String),
    #[error("the key does not belong to the certificate: {0}")]
    KeyMismatch(String),
    #[error("invalid CA PEM: {0}")]
    CaPem(String),
    #[error("unusable CA certificate: {0}")]
    UnusableCa(String),
    #[error("no CA given and no system root certificates found")]
    NoRoots,
    #[error("invalid client certificate PEM: {0}")]
    ClientCertificatePem(String),
    #[error("invalid client key PEM: {0}")]
    ClientKeyPem(String),
    #[error("{0}")]
    Rustls(String),
}

/// Parses a chain and key and checks that they belong together.
pub fn certified_key(chain_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, PkiError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| PkiError::CertificatePem(e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| PkiError::KeyPem(e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| PkiError::UnsupportedKey(e.to_string()))?;
    let certified = CertifiedKey::new(chain, key);
    certified
        .keys_match()
        .map_err(|e| PkiError::KeyMismatch(e.to_string()))?;
    Ok(certified)
}

/// The client side of TLS to upstream servers: the configured CA (or the
/// system roots) and, for mTLS, a client certificate.
pub fn client_config(
    ca_pem: Option<&[u8]>,
    identity: Option<(&[u8], &[u8])>,
) -> Result<rustls::ClientConfig, PkiError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| PkiError::CaPem(e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| PkiError::UnusableCa(e.to_string()))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(PkiError::NoRoots);
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| PkiError::Rustls(e.to_string()))?
    .with_root_certificates(roots);
    match identity {
        Some((chain_pem, key_pem)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
                .collect::<Result<_, _>>()
                .map_err(|e| PkiError::ClientCertificatePem(e.to_string()))?;
            let key = PrivateKeyDer::from_pem_slice(key_pem)
                .map_err(|e| PkiError::ClientKeyPem(e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| PkiError::Rustls(e.to_string()))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// For clients that never speak TLS (plain-HTTP upstreams).
pub fn empty_client_config() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
}
