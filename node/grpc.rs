//! gRPC plumbing shared by the node's control service, the controller and
//! their clients: server reflection and client endpoints with optional mTLS.

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

use crate::config::ControlTls;

use crate::proto::FILE_DESCRIPTOR_SET;

/// Reflection v1 and v1alpha over every tether service and grpc.health.v1
/// (grpcurl 1.8 speaks only v1alpha).
pub fn reflection() -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // google.rpc.BadRequest and the other error details, so grpcurl
        // can print the field violations of a refused config.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor set is valid");
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the embedded descriptor set is valid");
    (v1, v1alpha)
}

/// A server that requires client certificates signed by `tls.client_ca_pem`.
pub fn mtls_server(tls: &ControlTls) -> ServerTlsConfig {
    ServerTlsConfig::new()
        .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
        .client_ca_root(Certificate::from_pem(&tls.client_ca_pem))
}

/// TLS material a client presents and trusts.
pub struct ClientTls<'a> {
    pub ca_pem: &'a [u8],
    /// Certificate chain and key: the client's identity for mTLS.
    pub identity: Option<(&'a [u8], &'a [u8])>,
    /// Name the server's certificate must carry (default: the url's host).
    pub server_name: Option<&'a str>,
}

/// An endpoint for `url` (`http://` or `https://`), with TLS when given.
pub fn endpoint(url: &str, tls: Option<ClientTls<'_>>) -> Result<Endpoint, String> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("invalid url {url:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        let uri = endpoint.uri().clone();
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(tls.ca_pem))
            .domain_name(tls.server_name.unwrap_or(host));
        if let Some((cert, key)) = tls.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(config).map_err(|e| e.to_string())?;
    }
    Ok(endpoint)
}

/// `--ca`, `--cert`, `--key` and `--server-name`: mTLS for the command-line
/// clients (`tether ctl`, `tether fleet`).
#[derive(clap::Args, Debug, Clone)]
pub struct ClientTlsArgs {
    /// CA that signed the server's certificate; with --cert and --key,
    /// enables mTLS.
    #[arg(long, global = true, requires_all = ["cert", "key"])]
    pub ca: Option<PathBuf>,
    /// Client certificate (for `tether fleet`, an operator certificate:
    /// URI SAN spiffe://tether/operator/NAME).
    #[arg(long, global = true)]
    pub cert: Option<PathBuf>,
    /// Client private key.
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,
    /// Name to verify the server's certificate against (default: the host).
    #[arg(long, global = true)]
    pub server_name: Option<String>,
}

impl ClientTlsArgs {
    pub fn enabled(&self) -> bool {
        self.ca.is_some()
    }

    /// Connects to `url`, with mTLS when the files were given.
    pub async fn connect(&self, url: &str) -> Result<Channel, String> {
        let read =
            |path: &PathBuf| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
        let endpoint = match (&self.ca, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => {
                let (ca, cert, key) = (read(ca)?, read(cert)?, read(key)?);
                let tls = ClientTls {
                    ca_pem: &ca,
                    identity: Some((&cert, &key)),
                    server_name: self.server_name.as_deref(),
                };
                endpoint(url, Some(tls))?
            }
            _ => endpoint(url, None)?,
        };
        endpoint
            .connect()
            .await
            .map_err(|e| crate::report::error_chain(&e))
    }
}

/// The identities the fleet's certificates carry as URI SANs: a node
/// (`…/node/ID`), a group of nodes sharing a certificate (`…/nodes/PREFIX`,
/// e.g. a Deployment's pods), an operator (`…/operator/NAME`). `tether
/// certs` issues them and the controller reads them.
pub const NODE_PREFIX: &str = "spiffe://tether/node/";
pub const NODE_GROUP_PREFIX: &str = "spiffe://tether/nodes/";
pub const OPERATOR_PREFIX: &str = "spiffe://tether/operator/";
