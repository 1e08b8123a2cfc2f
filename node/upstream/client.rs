//! Pooled connections to upstream servers. One hyper client per distinct
//! set of connection settings and per worker (a worker's connections are
//! driven on its own thread), kept across generations so a reload keeps
//! every warm keep-alive connection.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::ServerName;

use super::connect::UpstreamConnector;
use super::inline::{InlineBody, InlinePool, SendError};
use super::raw::RawPool;
use crate::config::{UpstreamConfig, UpstreamProtocol, UpstreamTls};
use crate::tunnel::Hub;

pub type UpstreamClient = Client<HttpsConnector<UpstreamConnector>, RequestBody>;

/// A request body on its way upstream: the client's, streamed through, or
/// none, which lets a bodiless request be sent again to another server.
pub enum RequestBody {
    Streaming(Incoming, ClientBodyFailed),
    Empty,
}

impl RequestBody {
    /// The client's body, and the flag that tells afterwards whether it
    /// failed to arrive.
    pub fn from_client(body: Incoming) -> (RequestBody, ClientBodyFailed) {
        // Most requests have no body: they pay for no flag.
        let failed = ClientBodyFailed((!body.is_end_stream()).then(Arc::default));
        (RequestBody::Streaming(body, failed.clone()), failed)
    }
}

/// Set when the client's request body could not be read (malformed
/// chunked encoding, a connection cut short): the exchange failed through
/// the client's fault, so it is the client's `400` and never counts
/// against the server.
#[derive(Clone, Default)]
pub struct ClientBodyFailed(Option<Arc<AtomicBool>>);

impl ClientBodyFailed {
    pub fn get(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|failed| failed.load(Ordering::Relaxed))
    }

    fn set(&self) {
        if let Some(failed) = &self.0 {
            failed.store(true, Ordering::Relaxed);
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streaming(body, failed) => {
                let frame = Pin::new(body).poll_frame(cx);
                if let Poll::Ready(Some(Err(_))) = &frame {
                    failed.set();
                }
                frame
            }
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streaming(body, _) => body.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streaming(body, _) => body.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// The settings that shape a client's connections; upstreams that agree on
/// them share one pool (hyper pools per server address inside it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKey {
    protocol: UpstreamProtocol,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_server: usize,
    tls: Option<UpstreamTls>,
}

impl ClientKey {
    pub fn of(config: &UpstreamConfig) -> Self {
        ClientKey {
            protocol: config.protocol,
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            max_idle_per_server: config.max_idle_per_server,
            tls: config.tls.clone(),
        }
    }

    fn build(&self, tunnels: &Arc<Hub>) -> WorkerClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(self.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        connector.enforce_http(false);
        let connector = UpstreamConnector {
            tcp: connector,
            connect_timeout: self.connect_timeout,
            tunnels: tunnels.clone(),
        };
        let plain_http1 = self.protocol == UpstreamProtocol::Http1 && self.tls.is_none();
        let inline = plain_http1.then(|| {
            Arc::new(InlinePool::new(
                connector.clone(),
                self.idle_timeout,
                self.max_idle_per_server,
            ))
        });
        let raw = plain_http1.then(|| {
            RawPool::new(
                connector.clone(),
                self.idle_timeout,
                self.max_idle_per_server,
            )
        });
        let tls_config = match &self.tls {
            Some(tls) => tls.client_config().unwrap_or_else(|error| {
                // Validated when the config was loaded; unreachable in practice.
                tracing::error!(%error, "upstream TLS settings unusable; connections will fail");
                crate::pki::empty_client_config()
            }),
            None => crate::pki::empty_client_config(),
        };
        let builder = HttpsConnectorBuilder::new()
            .with_tls_config(tls_config)
            .https_or_http();
        let name = self.tls.as_ref().and_then(|t| t.server_name.clone());
        let builder = match name.and_then(|n| ServerName::try_from(n).ok()) {
            Some(name) => builder.with_server_name_resolver(FixedServerNameResolver::new(name)),
            None => builder,
        };
        let connector = match self.protocol {
            UpstreamProtocol::H2 => builder.enable_all_versions().wrap_connector(connector),
            UpstreamProtocol::Http1 | UpstreamProtocol::H2c => {
                builder.enable_http1().wrap_connector(connector)
            }
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(self.idle_timeout)
            .pool_max_idle_per_host(self.max_idle_per_server)
            .http2_only(self.protocol == UpstreamProtocol::H2c);
        WorkerClient {
            pooled: builder.build(connector),
            inline,
            raw,
        }
    }
}

/// One worker's connections for one set of settings.
pub struct WorkerClient {
    /// hyper-util's pool: TLS, HTTP/2, upgrades.
    pub pooled: UpstreamClient,
    /// Plain HTTP/1.1, driven in the request's task.
    pub inline: Option<Arc<InlinePool>>,
    /// Plain HTTP/1.1 as bare sockets, for the node's own HTTP/1 path.
    pub raw: Option<RawPool>,
}

/// One client per worker, for one set of settings.
#[derive(Clone)]
pub struct WorkerClients(Arc<[WorkerClient]>);

impl WorkerClient {
    /// Sends `request` (its URI in origin form) to the server at
    /// `authority`: inline when the settings allow it and the request does
    /// not ask to switch protocols.
    pub async fn send(
        &self,
        mut request: Request<RequestBody>,
        authority: &Authority,
        tls: bool,
        upgrade: bool,
    ) -> Result<Response<UpstreamBody>, SendError> {
        match &self.inline {
            Some(inline) if !upgrade => Ok(inline
                .send(request, authority)
                .await?
                .map(UpstreamBody::Inline)),
            _ => {
                // hyper-util's client finds its pool by the absolute URI.
                let mut parts = std::mem::take(request.uri_mut()).into_parts();
                parts.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
                parts.authority = Some(authority.clone());
                *request.uri_mut() = Uri::from_parts(parts).map_err(SendError::Uri)?;
                match self.pooled.request(request).await {
                    Ok(response) => Ok(response.map(UpstreamBody::Pooled)),
                    Err(error) => Err(SendError::Pooled(error)),
                }
            }
        }
    }
}

/// An upstream's response body, from either kind of connection.
pub enum UpstreamBody {
    Pooled(Incoming),
    Inline(InlineBody),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Pooled(body) => Pin::new(body).poll_frame(cx),
            UpstreamBody::Inline(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Pooled(body) => body.is_end_stream(),
            UpstreamBody::Inline(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Pooled(body) => body.size_hint(),
            UpstreamBody::Inline(body) => body.size_hint(),
        }
    }
}

impl WorkerClients {
    /// The client whose pools belong to the calling worker.
    pub fn here(&self) -> &WorkerClient {
        &self.0[crate::workers::current() % self.0.len()]
    }
}

pub struct ClientRegistry {
    workers: usize,
    clients: HashMap<ClientKey, WorkerClients>,
    tunnels: Arc<Hub>,
}

impl ClientRegistry {
    /// A registry that makes one client per worker of `workers`.
    pub fn new(workers: usize, tunnels: Arc<Hub>) -> Self {
        ClientRegistry {
            workers: workers.max(1),
            clients: HashMap::new(),
            tunnels,
        }
    }

    /// The clients for these settings, made on first use.
    pub fn get(&mut self, key: ClientKey) -> WorkerClients {
        if let Some(clients) = self.clients.get(&key) {
            return clients.clone();
        }
        let clients = WorkerClients(
            (0..self.workers)
                .map(|_| key.build(&self.tunnels))
                .collect(),
        );
        self.clients.insert(key, clients.clone());
        clients
    }

    /// Forgets clients no upstream of the generation in force uses; their
    /// pools close once the generations still holding them drain.
    pub fn retain(&mut self, in_use: &[ClientKey]) {
        self.clients.retain(|key, _| in_use.contains(key));
    }
}
