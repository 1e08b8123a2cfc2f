//! A generation: everything built from one config (listeners' routing
//! tables, upstream pools) plus the lifecycle that lets it retire without
//! dropping work: stop accepting, drain in-flight connections up to a
//! deadline, then close what is left.

use std::collections::BTreeMap;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::config::{Config, ListenAddr, ListenerConfig, Protocol};
use crate::events::{ConfigInfo, NodeEvent};
use crate::health::PreparedChecks;
use crate::http::HttpListener;
use crate::lifecycle::Lifecycle;
use crate::proxy::forward::ForwardProxy;
use crate::proxy::socks5::Socks5Proxy;
use crate::tcp_proxy::TcpProxy;
use crate::tunnel::{Hub, TunnelListener};
use crate::upstream::{ClientRegistry, Upstream};

/// What a generation is built from besides its config: state the node
/// keeps across generations.
pub struct Shared<'a> {
    /// The health cell of every checked (address, check).
    pub checks: &'a PreparedChecks,
    /// Pooled upstream connections.
    pub clients: &'a mut ClientRegistry,
    /// Reverse tunnels: accepted ones, and the way to their services.
    pub tunnels: &'a Arc<Hub>,
    pub events: &'a broadcast::Sender<NodeEvent>,
}

/// A listener of a validated config that could not be set up (its TLS
/// material or access log changed since validation).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{error}")]
    Http {
        listener: usize,
        #[source]
        error: crate::http::ListenerError,
    },
    #[error("{error}")]
    Tls {
        listener: usize,
        #[source]
        error: crate::pki::PkiError,
    },
}

impl BuildError {
    /// The index of the listener that failed.
    pub fn listener(&self) -> usize {
        match self {
            BuildError::Http { listener, .. } | BuildError::Tls { listener, .. } => *listener,
        }
    }
}

pub struct Generation {
    pub number: u64,
    pub info: ConfigInfo,
    pub config: Arc<Config>,
    pub listeners: Vec<ListenerRuntime>,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub lifecycle: Arc<Lifecycle>,
}

/// One listener as a generation runs it.
pub struct ListenerRuntime {
    pub config: ListenerConfig,
    /// The address actually bound (differs from the config for port 0).
    pub bound: ListenAddr,
    pub service: ListenerService,
    open_connections: Arc<AtomicU64>,
}

/// What a listener does with an accepted connection; one variant per
/// `protocol`. Binding, accepting and draining are shared by all.
pub enum ListenerService {
    Http(Arc<HttpListener>),
    Tcp(TcpProxy),
    Forward(Arc<ForwardProxy>),
    Socks5(Arc<Socks5Proxy>),
    /// Reverse tunnels dial in here.
    Tunnel(Arc<TunnelListener>),
}

impl Generation {
    /// Builds generation `number` from `config`. Upstreams reuse the
    /// server state of `previous` (in-flight counts, passive health) and the
    /// pooled connections and health cells in `shared`. Fails, naming the
    /// listener, if a listener cannot be set up (its TLS material).
    pub fn build(
        number: u64,
        config: Arc<Config>,
        info: ConfigInfo,
        bound: &[ListenAddr],
        previous: Option<&Generation>,
        shared: Shared,
    ) -> Result<Generation, BuildError> {
        let upstreams: BTreeMap<String, Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|(name, upstream)| {
                let old = previous
                    .and_then(|p| p.upstreams.get(name))
                    .map(Arc::as_ref);
                (
                    name.clone(),
                    Arc::new(Upstream::new(
                        upstream.clone(),
                        old,
                        shared.checks,
                        shared.clients,
                        shared.tunnels,
                        shared.events.clone(),
                    )),
                )
            })
            .collect();
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for (index, (listener, bound)) in config.listeners.iter().zip(bound).enumerate() {
            let service = match listener.protocol {
                Protocol::Http | Protocol::Https => ListenerService::Http(Arc::new(
                    HttpListener::new(listener, &upstreams).map_err(|error| BuildError::Http {
                        listener: index,
                        error,
                    })?,
                )),
                Protocol::Tcp => ListenerService::Tcp(
                    TcpProxy::new(listener, &upstreams, shared.tunnels.clone()).map_err(
                        |error| BuildError::Tls {
                            listener: index,
                            error,
                        },
                    )?,
                ),
                Protocol::Tunnel => ListenerService::Tunnel(Arc::new(
                    TunnelListener::new(listener, shared.tunnels.clone()).map_err(|error| {
                        BuildError::Tls {
                            listener: index,
                            error,
                        }
                    })?,
                )),
                Protocol::Forward | Protocol::Socks5 => {
                    let settings = listener
                        .proxy
                        .clone()
                        .expect("a validated proxy listener has proxy settings");
                    if listener.protocol == Protocol::Forward {
                        ListenerService::Forward(Arc::new(ForwardProxy::new(settings)))
                    } else {
                        ListenerService::Socks5(Arc::new(Socks5Proxy::new(settings)))
                    }
                }
            };
            listeners.push(ListenerRuntime {
                config: listener.clone(),
                bound: bound.clone(),
                service,
                open_connections: Arc::default(),
            });
        }
        let lifecycle = Arc::new(Lifecycle::new(config.node.drain_idle_grace));
        Ok(Generation {
            number,
            info,
            config,
            listeners,
            upstreams,
            lifecycle,
        })
    }
}

impl ListenerRuntime {
    pub fn open_connections(&self) -> u64 {
        self.open_connections.load(Ordering::Relaxed)
    }

    /// The count a `ConnectionGuard` keeps for this listener.
    pub fn open_connections_counter(&self) -> Arc<AtomicU64> {
        self.open_connections.clone()
    }
}
