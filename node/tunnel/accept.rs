//! A `protocol = "tunnel"` listener: mutual TLS, the hello checked against
//! the listener's peers, then the connection handed to the hub. The
//! handshake belongs to the generation that accepted it; the tunnel
//! itself outlives generations (a reload of the public node keeps every
//! tunnel whose node is still allowed).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use super::hello::{self, Answer, Hello};
use super::Hub;
use crate::config::ListenerConfig;
use crate::identity::CertIdentity;
use crate::pki::PkiError;
use crate::stream::ClientStream;

pub struct TunnelListener {
    name: String,
    acceptor: TlsAcceptor,
    hub: Arc<Hub>,
}

impl TunnelListener {
    pub fn new(config: &ListenerConfig, hub: Arc<Hub>) -> Result<TunnelListener, PkiError> {
        // Validation guarantees both for a tunnel listener.
        let tls = config.tls.as_ref().expect("a tunnel listener has TLS");
        let tunnel = config
            .tunnel
            .as_ref()
            .expect("a tunnel listener has tunnel settings");
        Ok(TunnelListener {
            name: config.name.clone(),
            acceptor: crate::tls::mtls_acceptor(tls, &tunnel.client_ca_pem, super::ALPN)?,
            hub,
        })
    }

    /// Runs the handshake within `HANDSHAKE_TIMEOUT`, then serves the
    /// tunnel in a task of its own, outside the generation.
    pub async fn serve_connection(self: Arc<Self>, stream: ClientStream, remote: SocketAddr) {
        let handshake = tokio::time::timeout(super::HANDSHAKE_TIMEOUT, self.handshake(stream));
        let (tls, hello) = match handshake.await {
            Ok(Ok(accepted)) => accepted,
            // Anything that speaks no TLS (a port scan, a health probe of
            // the port) is not worth a warning; a refused node is.
            Ok(Err(Refused::Tls(reason))) => {
                tracing::debug!(listener = %self.name, %remote, %reason, "tunnel TLS handshake failed");
                return;
            }
            Ok(Err(Refused::Hello(reason))) => {
                tracing::warn!(listener = %self.name, %remote, %reason, "tunnel refused");
                return;
            }
            Err(_) => {
                tracing::warn!(listener = %self.name, %remote, "tunnel handshake timed out");
                return;
            }
        };
        let hub = self.hub.clone();
        let listener = self.name.clone();
        tokio::spawn(async move { hub.run_link(listener, hello, tls, remote).await });
    }

    async fn handshake(
        &self,
        stream: ClientStream,
    ) -> Result<(tokio_rustls::server::TlsStream<ClientStream>, Hello), Refused> {
        let mut tls = self
            .acceptor
            .accept(stream)
            .await
            .map_err(|e| Refused::Tls(e.to_string()))?;
        let identity = {
            let (_, session) = tls.get_ref();
            let leaf = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .ok_or_else(|| Refused::Tls("no client certificate".to_owned()))?;
            CertIdentity::of_certificate(leaf.as_ref())
        };
        let hello: Hello = hello::read(&mut tls).await.map_err(Refused::Hello)?;
        let verdict = identity.and_then(|identity| self.hub.admit(&self.name, &identity, &hello));
        let answer = Answer {
            error: verdict.as_ref().err().cloned(),
        };
        hello::write(&mut tls, &answer)
            .await
            .map_err(Refused::Hello)?;
        verdict.map_err(|reason| Refused::Hello(format!("node {:?}: {reason}", hello.node)))?;
        Ok((tls, hello))
    }
}

/// Why a connection did not become a tunnel.
enum Refused {
    /// No TLS session with a verified client certificate.
    Tls(String),
    /// The hello was missing, malformed or not allowed.
    Hello(String),
}
