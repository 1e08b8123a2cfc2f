//! Who is calling, from the mTLS client certificate: a node carries the URI
//! SAN `spiffe://tether/node/<id>`, a group of nodes that share one
//! certificate (the pods of a Deployment) `spiffe://tether/nodes/<prefix>`,
//! allowing every id that starts with the prefix, and operators
//! `spiffe://tether/operator/<name>`.
//! Without TLS nobody is identified, and the controller is reachable on
//! loopback only (or wherever `--insecure` put it).

use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

pub use crate::grpc::{NODE_GROUP_PREFIX, NODE_PREFIX, OPERATOR_PREFIX};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The controller runs without TLS.
    Anonymous,
    Node(String),
    /// Any node whose id starts with this prefix.
    NodeGroup(String),
    Operator(String),
}

impl Identity {
    /// Whether this caller may speak for node `id`.
    pub fn may_be_node(&self, id: &str) -> bool {
        match self {
            Identity::Anonymous => true,
            Identity::Node(own) => own == id,
            Identity::NodeGroup(prefix) => id.starts_with(prefix.as_str()),
            Identity::Operator(_) => false,
        }
    }

    pub fn of<T>(request: &Request<T>) -> Result<Identity, Status> {
        let Some(certificates) = request.peer_certs() else {
            return Ok(Identity::Anonymous);
        };
        let leaf = certificates
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let (_, certificate) = X509Certificate::from_der(leaf.as_ref())
            .map_err(|e| Status::unauthenticated(format!("unreadable client certificate: {e}")))?;
        let names = certificate
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| san.value.general_names.clone())
            .unwrap_or_default();
        for name in names {
            if let GeneralName::URI(uri) = name {
                if let Some(id) = uri.strip_prefix(NODE_PREFIX).filter(|id| !id.is_empty()) {
                    return Ok(Identity::Node(id.to_owned()));
                }
                if let Some(prefix) = uri
                    .strip_prefix(NODE_GROUP_PREFIX)
                    .filter(|p| !p.is_empty())
                {
                    return Ok(Identity::NodeGroup(prefix.to_owned()));
                }
                if let Some(name) = uri.strip_prefix(OPERATOR_PREFIX).filter(|n| !n.is_empty()) {
                    return Ok(Identity::Operator(name.to_owned()));
                }
            }
        }
        Err(Status::permission_denied(format!(
            "the client certificate names no node ({NODE_PREFIX}<id>), node group \
             ({NODE_GROUP_PREFIX}<prefix>) or operator ({OPERATOR_PREFIX}<name>)"
        )))
    }
}
