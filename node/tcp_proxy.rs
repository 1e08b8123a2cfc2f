//! The TCP (L4) listener: each accepted connection, after an optional TLS
//! handshake, goes to one server of the listener's upstream (the same
//! balancers and health as HTTP; a refused connect tries the next server),
//! and bytes are copied both ways until both sides have finished. A
//! half-close is passed on. A session with no bytes either way for
//! `idle_timeout` is closed, and so is every session of a generation whose
//! drain deadline passes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::stream::ClientStream;
use tokio_rustls::TlsAcceptor;

use crate::pki::PkiError;

use crate::config::ListenerConfig;
use crate::lifecycle::ConnectionGuard;
use crate::tunnel::Hub;
use crate::upstream::{PickContext, Upstream};

/// How long a client may take to finish a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct TcpProxy {
    upstream: Arc<Upstream>,
    tunnels: Arc<Hub>,
    tls: Option<TlsAcceptor>,
    idle_timeout: Duration,
}

impl TcpProxy {
    pub fn new(
        config: &ListenerConfig,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        tunnels: Arc<Hub>,
    ) -> Result<Self, PkiError> {
        // Validation guarantees both: a tcp listener has its settings, and
        // its upstream exists.
        let settings = config
            .tcp
            .as_ref()
            .expect("a validated tcp listener has tcp settings");
        let upstream = upstreams[&settings.upstream].clone();
        Ok(TcpProxy {
            upstream,
            tunnels,
            tls: config.tls.as_ref().map(crate::tls::acceptor).transpose()?,
            idle_timeout: settings.idle_timeout,
        })
    }

    pub async fn serve_connection(
        self,
        stream: ClientStream,
        peer: SocketAddr,
        connection: ConnectionGuard,
    ) {
        let lifecycle = connection.lifecycle().clone();
        let session = async {
            match &self.tls {
                None => self.relay(stream, peer).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => self.relay(stream, peer).await,
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        };
        tokio::select! {
            _ = session => {}
            _ = lifecycle.killed() => {}
        }
    }

    async fn relay<S: AsyncRead + AsyncWrite + Unpin>(&self, client: S, peer: SocketAddr) {
        let upstream = &self.upstream;
        let context = PickContext {
            client_ip: peer.ip(),
            key_hash: None,
        };
        let mut tried = Vec::new();
        let (server, server_stream) = loop {
            let Some(index) = upstream.pick(&context, &tried) else {
                tracing::warn!(upstream = %upstream.config.name, %peer, "no server available; closing the connection");
                return;
            };
            let server = &upstream.servers[index];
            let connect = tokio::time::timeout(
                upstream.config.connect_timeout,
                self.tunnels.connect(&server.addr),
            )
            .await;
            match connect {
                Ok(Ok(stream)) => {
                    upstream.record(server, false);
                    break (server, stream);
                }
                Ok(Err(error)) => {
                    tracing::warn!(upstream = %upstream.config.name, server = %server.addr, %error, "connect failed")
                }
                Err(_) => {
                    tracing::warn!(upstream = %upstream.config.name, server = %server.addr, "connect timed out")
                }
            }
            upstream.record(server, true);
            tried.push(index);
            if tried.len() as u32 > upstream.config.retries {
                return;
            }
        };
        let _active = server.begin_request();
        crate::relay::run(client, server_stream, self.idle_timeout, peer).await;
    }
}
