//! A generation: everything built from one config (listeners' routing
//! tables, upstream pools) plus the lifecycle that lets it retire without
//! dropping work: stop accepting, drain in-flight connections up to a
//! deadline, then close what is left.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

use tokio::sync::broadcast;

use crate::config::{Config, ListenAddr, ListenerConfig, Protocol};
use crate::health::PreparedChecks;
use crate::http::HttpListener;
use crate::proxy::forward::ForwardProxy;
use crate::proxy::socks5::Socks5Proxy;
use crate::supervisor::NodeEvent;
use crate::tcp_proxy::TcpProxy;
use crate::upstream::{ClientRegistry, Upstream};

/// What a generation is built from besides its config: state the node
/// keeps across generations.
pub struct Shared<'a> {
    /// The health cell of every checked (address, check).
    pub checks: &'a PreparedChecks,
    /// Pooled upstream connections.
    pub clients: &'a mut ClientRegistry,
    pub events: &'a broadcast::Sender<NodeEvent>,
}

/// Where a config came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    Inline,
    Controller(ControllerVersion),
}

/// What identifies a version a controller pushed. The number alone does
/// not: a controller started on a fresh or restored store numbers its
/// versions from where that store is, so the same number can name other
/// content. A node runs version N of a controller only when the store and
/// the checksum agree too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControllerVersion {
    pub number: u64,
    /// "sha256:…" of the pushed text.
    pub checksum: String,
    /// The identity of the controller's store that numbered it.
    pub store_id: String,
}

impl ConfigSource {
    pub fn as_str(&self) -> &'static str {
        match self {
            ConfigSource::File(_) => "file",
            ConfigSource::Inline => "inline",
            ConfigSource::Controller(_) => "controller",
        }
    }
}

/// What the node records about the config a generation runs.
#[derive(Debug, Clone)]
pub struct ConfigInfo {
    /// Content hash for files and inline text, the controller's version for
    /// pushed configs.
    pub version: String,
    pub source: ConfigSource,
    pub applied_at: SystemTime,
    pub text: Arc<str>,
}

pub struct Generation {
    pub number: u64,
    pub info: ConfigInfo,
    pub config: Arc<Config>,
    pub listeners: Vec<ListenerRuntime>,
    pub upstreams: BTreeMap<String, Arc<Upstream>>,
    pub lifecycle: Lifecycle,
}

/// One listener as a generation runs it.
pub struct ListenerRuntime {
    pub config: ListenerConfig,
    /// The address actually bound (differs from the config for port 0).
    pub bound: ListenAddr,
    pub service: ListenerService,
    open_connections: AtomicU64,
}

/// What a listener does with an accepted connection; one variant per
/// `protocol`. Binding, accepting and draining are shared by all.
pub enum ListenerService {
    Http(Arc<HttpListener>),
    Tcp(TcpProxy),
    Forward(Arc<ForwardProxy>),
    Socks5(Arc<Socks5Proxy>),
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
    ) -> Result<Generation, (usize, String)> {
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
                        shared.events.clone(),
                    )),
                )
            })
            .collect();
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for (index, (listener, bound)) in config.listeners.iter().zip(bound).enumerate() {
            let service = match listener.protocol {
                Protocol::Http | Protocol::Https => ListenerService::Http(Arc::new(
                    HttpListener::new(listener, &upstreams).map_err(|e| (index, e))?,
                )),
                Protocol::Tcp => ListenerService::Tcp(
                    TcpProxy::new(listener, &upstreams).map_err(|e| (index, e))?,
                ),
                Protocol::Forward | Protocol::Socks5 => {
                    let settings = listener
                        .proxy
                        .clone()
                        .ok_or((index, "a proxy listener without proxy settings".to_owned()))?;
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
                open_connections: AtomicU64::new(0),
            });
        }
        Ok(Generation {
            number,
            info,
            config,
            listeners,
            upstreams,
            lifecycle: Lifecycle::default(),
        })
    }
}

impl ListenerRuntime {
    pub fn open_connections(&self) -> u64 {
        self.open_connections.load(Ordering::Relaxed)
    }
}

/// The states a generation goes through: serving → retired (not accepting,
/// draining) → killed (drain deadline passed: connections are dropped).
#[derive(Default)]
pub struct Lifecycle {
    retired: CancellationToken,
    killed: CancellationToken,
    retired_at: OnceLock<SystemTime>,
    /// Accept loops and connection tasks.
    tasks: TaskTracker,
    connections: AtomicU64,
    requests_in_flight: AtomicU64,
}

impl Lifecycle {
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    pub fn retired(&self) -> WaitForCancellationFuture<'_> {
        self.retired.cancelled()
    }

    pub fn is_retired(&self) -> bool {
        self.retired.is_cancelled()
    }

    pub fn retired_at(&self) -> Option<SystemTime> {
        self.retired_at.get().copied()
    }

    pub fn killed(&self) -> WaitForCancellationFuture<'_> {
        self.killed.cancelled()
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn requests_in_flight(&self) -> u64 {
        self.requests_in_flight.load(Ordering::Relaxed)
    }

    /// Stops accepting and starts the drain of every open connection.
    pub fn retire(&self) {
        let _ = self.retired_at.set(SystemTime::now());
        self.retired.cancel();
        self.tasks.close();
    }

    /// Runs a connection (an HTTP server connection future) through this
    /// generation's life: until it ends by itself, or, once retired, until
    /// `grace` has passed (a request already on its way is still served and
    /// answered with `Connection: close`), then asks it to finish
    /// gracefully, and drops it if the drain deadline comes first. Closing
    /// an idle keep-alive connection at once would reset a client that sent
    /// its next request a moment before.
    pub async fn drive_connection<F: Future>(
        &self,
        mut connection: Pin<&mut F>,
        graceful_shutdown: impl FnOnce(Pin<&mut F>),
        grace: Duration,
    ) {
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = self.retired() => {}
        }
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = tokio::time::sleep(grace) => {}
            _ = self.killed() => return,
        }
        graceful_shutdown(connection.as_mut());
        tokio::select! {
            _ = connection => {}
            _ = self.killed() => {}
        }
    }

    /// Waits for the retired generation's connections to finish, up to
    /// `deadline`; then closes the rest. Answers how many were closed.
    pub async fn drain(&self, deadline: Duration) -> u64 {
        debug_assert!(self.is_retired());
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.connections();
        self.killed.cancel();
        self.tasks.wait().await;
        left
    }
}

/// Counts a connection against its generation and listener while alive.
pub struct ConnectionGuard {
    generation: Arc<Generation>,
    listener: usize,
}

impl ConnectionGuard {
    pub fn new(generation: Arc<Generation>, listener: usize) -> Self {
        generation
            .lifecycle
            .connections
            .fetch_add(1, Ordering::Relaxed);
        generation.listeners[listener]
            .open_connections
            .fetch_add(1, Ordering::Relaxed);
        ConnectionGuard {
            generation,
            listener,
        }
    }

    pub fn generation(&self) -> &Arc<Generation> {
        &self.generation
    }

    pub fn listener_index(&self) -> usize {
        self.listener
    }

    pub fn listener(&self) -> &ListenerRuntime {
        &self.generation.listeners[self.listener]
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.generation
            .lifecycle
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        self.generation.listeners[self.listener]
            .open_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a request in flight on its generation while alive.
pub struct RequestGuard<'a>(&'a Lifecycle);

impl<'a> RequestGuard<'a> {
    pub fn new(lifecycle: &'a Lifecycle) -> Self {
        lifecycle.requests_in_flight.fetch_add(1, Ordering::Relaxed);
        RequestGuard(lifecycle)
    }
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        self.0.requests_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
