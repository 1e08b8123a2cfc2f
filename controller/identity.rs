//! Who is calling, from the mTLS client certificate: nodes carry the URI
//! SAN `spiffe://tether/node/<id>`, operators `spiffe://tether/operator/<name>`.
//! Without TLS nobody is identified, and the controller is reachable on
//! loopback only (or wherever `--insecure` put it).

use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

pub const NODE_PREFIX: &str = "spiffe://tether/node/";
pub const OPERATOR_PREFIX: &str = "spiffe://tether/operator/";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The controller runs without TLS.
    Anonymous,
    Node(String),
    Operator(String),
}

impl Identity {
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
                if let Some(name) = uri.strip_prefix(OPERATOR_PREFIX).filter(|n| !n.is_empty()) {
                    return Ok(Identity::Operator(name.to_owned()));
                }
            }
        }
        Err(Status::permission_denied(format!(
            "the client certificate names neither a node ({NODE_PREFIX}<id>) nor an operator \
             ({OPERATOR_PREFIX}<name>)"
        )))
    }
}
