//! Pooled connections to upstream servers. One hyper client per distinct
//! set of connection settings, kept across generations so a reload keeps
//! every warm keep-alive connection.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{UpstreamConfig, UpstreamProtocol};

pub type UpstreamClient = Client<HttpConnector, RequestBody>;

/// A request body on its way upstream: the client's, streamed through, or
/// none, which lets a bodiless request be sent again to another server.
pub enum RequestBody {
    Streaming(Incoming),
    Empty,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streaming(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streaming(body) => body.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streaming(body) => body.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// The settings that shape a client's connections; upstreams that agree on
/// them share one pool (hyper pools per server address inside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey {
    protocol: UpstreamProtocol,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_server: usize,
}

impl ClientKey {
    pub fn of(config: &UpstreamConfig) -> Self {
        ClientKey {
            protocol: config.protocol,
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            max_idle_per_server: config.max_idle_per_server,
        }
    }

    fn build(&self) -> UpstreamClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(self.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(self.idle_timeout)
            .pool_max_idle_per_host(self.max_idle_per_server)
            .http2_only(self.protocol == UpstreamProtocol::H2c);
        builder.build(connector)
    }
}

#[derive(Default)]
pub struct ClientRegistry {
    clients: HashMap<ClientKey, UpstreamClient>,
}

impl ClientRegistry {
    /// The client for these settings, made on first use.
    pub fn get(&mut self, key: ClientKey) -> UpstreamClient {
        self.clients
            .entry(key)
            .or_insert_with(|| key.build())
            .clone()
    }

    /// Forgets clients no upstream of the generation in force uses; their
    /// pools close once the generations still holding them drain.
    pub fn retain(&mut self, in_use: &[ClientKey]) {
        self.clients.retain(|key, _| in_use.contains(key));
    }
}
