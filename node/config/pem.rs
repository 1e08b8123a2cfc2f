//! Checks that PEM files hold what the config says they hold, so a swapped
//! cert and key or an empty file is a config error, not a failed handshake.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, Clone, Copy)]
pub enum Expect {
    Certificates,
    PrivateKey,
}

pub fn check(bytes: &[u8], expect: Expect) -> Result<(), String> {
    match expect {
        Expect::Certificates => {
            let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(bytes).collect();
            match certs {
                Ok(certs) if !certs.is_empty() => Ok(()),
                Ok(_) => {
                    Err("no PEM certificate found (expected -----BEGIN CERTIFICATE-----)".into())
                }
                Err(e) => Err(format!("invalid PEM: {e}")),
            }
        }
        Expect::PrivateKey => PrivateKeyDer::from_pem_slice(bytes)
            .map(|_| ())
            .map_err(|e| format!("no usable private key (PKCS#8, RSA or EC PEM): {e}")),
    }
}
