//! Who a peer is, from its mTLS client certificate: the URI SANs that
//! `tether certs` issues. A node carries `spiffe://tether/node/<id>`, a
//! group of nodes sharing one certificate (the pods of a Deployment)
//! `spiffe://tether/nodes/<prefix>`, allowing every id that starts with the
//! prefix, and operators `spiffe://tether/operator/<name>`. The controller
//! reads it from node and operator streams, a public node from the
//! reverse tunnels that dial in.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

pub use crate::grpc::{NODE_GROUP_PREFIX, NODE_PREFIX, OPERATOR_PREFIX};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertIdentity {
    Node(String),
    /// Any node whose id starts with this prefix.
    NodeGroup(String),
    Operator(String),
}

impl CertIdentity {
    /// Reads the identity from a DER certificate (the peer's leaf).
    pub fn of_certificate(der: &[u8]) -> Result<CertIdentity, String> {
        let (_, certificate) = X509Certificate::from_der(der)
            .map_err(|e| format!("unreadable client certificate: {e}"))?;
        let names = certificate
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| san.value.general_names.clone())
            .unwrap_or_default();
        for name in names {
            if let GeneralName::URI(uri) = name {
                if let Some(id) = uri.strip_prefix(NODE_PREFIX).filter(|id| !id.is_empty()) {
                    return Ok(CertIdentity::Node(id.to_owned()));
                }
                if let Some(prefix) = uri
                    .strip_prefix(NODE_GROUP_PREFIX)
                    .filter(|p| !p.is_empty())
                {
                    return Ok(CertIdentity::NodeGroup(prefix.to_owned()));
                }
                if let Some(name) = uri.strip_prefix(OPERATOR_PREFIX).filter(|n| !n.is_empty()) {
                    return Ok(CertIdentity::Operator(name.to_owned()));
                }
            }
        }
        Err(format!(
            "the client certificate names no node ({NODE_PREFIX}<id>), node group \
             ({NODE_GROUP_PREFIX}<prefix>) or operator ({OPERATOR_PREFIX}<name>)"
        ))
    }

    /// Whether this certificate may speak for node `id`.
    pub fn may_be_node(&self, id: &str) -> bool {
        match self {
            CertIdentity::Node(own) => own == id,
            CertIdentity::NodeGroup(prefix) => id.starts_with(prefix.as_str()),
            CertIdentity::Operator(_) => false,
        }
    }
}

impl std::fmt::Display for CertIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertIdentity::Node(id) => write!(f, "{NODE_PREFIX}{id}"),
            CertIdentity::NodeGroup(prefix) => write!(f, "{NODE_GROUP_PREFIX}{prefix}"),
            CertIdentity::Operator(name) => write!(f, "{OPERATOR_PREFIX}{name}"),
        }
    }
}
