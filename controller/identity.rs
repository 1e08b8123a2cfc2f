//! Who is calling, from the mTLS client certificate: a node carries the URI
//! SAN `spiffe://tether/node/<id>`, a group of nodes that share one
//! certificate (the pods of a Deployment) `spiffe://tether/nodes/<prefix>`,
//! allowing every id that starts with the prefix, and operators
//! `spiffe://tether/operator/<name>`.
//! Without TLS nobody is identified, and the controller is reachable on
//! loopback only (or wherever `--insecure` put it).

use tonic::{Request, Status};

use crate::identity::CertIdentity;
pub use crate::identity::{NODE_GROUP_PREFIX, NODE_PREFIX, OPERATOR_PREFIX};

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
        match CertIdentity::of_certificate(leaf.as_ref()) {
            Ok(CertIdentity::Node(id)) => Ok(Identity::Node(id)),
            Ok(CertIdentity::NodeGroup(prefix)) => Ok(Identity::NodeGroup(prefix)),
            Ok(CertIdentity::Operator(name)) => Ok(Identity::Operator(name)),
            Err(message) if message.starts_with("unreadable") => {
                Err(Status::unauthenticated(message))
            }
            Err(message) => Err(Status::permission_denied(message)),
        }
    }
}
