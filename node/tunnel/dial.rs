//! The dialing node's side: each `[[tunnel]]` keeps `connections` TLS
//! connections open to the public node, each an HTTP/2 server whose
//! CONNECT streams go to the local address of the service they name.
//! A connection that fails or closes is dialed again after a jittered,
//! doubling backoff (up to `max_backoff`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{broadcast, watch};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::hello::{self, Answer, Hello};
use super::hub::ERROR_HEADER;
use crate::config::{ServerAddr, TunnelConfig};
use crate::events::{NodeEvent, TunnelRole, TunnelStatus};
use crate::stream::Socket;
use crate::workers::Workers;

/// How long a service's local address may take to accept.
const SERVICE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A stream with no byte either way for this long is closed (the public
/// node's own timeouts are normally shorter).
const STREAM_IDLE: Duration = Duration::from_secs(24 * 3600);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// How long a changed tunnel's old connections wait for a new one to come
/// up before they drain anyway.
const REPLACE_WAIT: Duration = Duration::from_secs(10);

/// The tunnels this node dials, by name.
pub struct Dialers {
    running: HashMap<String, Arc<Dialed>>,
    events: broadcast::Sender<NodeEvent>,
}

/// One `[[tunnel]]` being dialed.
struct Dialed {
    config: TunnelConfig,
    node_id: String,
    /// Cancelled to drain: connections finish their streams and are not
    /// dialed again.
    stop: CancellationToken,
    drain: Mutex<Duration>,
    up: watch::Sender<u32>,
    open_streams: Arc<AtomicU64>,
    last_error: Mutex<String>,
    events: broadcast::Sender<NodeEvent>,
}

impl Dialers {
    pub fn new(events: broadcast::Sender<NodeEvent>) -> Dialers {
        Dialers {
            running: HashMap::new(),
            events,
        }
    }

    pub fn apply(
        &mut self,
        tunnels: &[TunnelConfig],
        node_id: &str,
        workers: &Workers,
        drain: Duration,
    ) {
        let mut next = HashMap::with_capacity(tunnels.len());
        for config in tunnels {
            let old = self.running.remove(&config.name);
            match old {
                Some(old) if old.config == *config && old.node_id == node_id => {
                    *old.drain.lock().unwrap_or_else(|e| e.into_inner()) = drain;
                    next.insert(config.name.clone(), old);
                }
                old => {
                    let dialed =
                        Dialed::start(config.clone(), node_id, workers, drain, &self.events);
                    if let Some(old) = old {
                        old.drain_when_up(&dialed);
                    }
                    next.insert(config.name.clone(), dialed);
                }
            }
        }
        for (_, removed) in self.running.drain() {
            tracing::info!(tunnel = %removed.config.name, "tunnel removed; draining its connections");
            removed.stop.cancel();
        }
        self.running = next;
    }

    pub fn statuses(&self) -> Vec<TunnelStatus> {
        let mut statuses: Vec<TunnelStatus> = self.running.values().map(|d| d.status()).collect();
        statuses.sort_by(|a, b| a.name.cmp(&b.name));
        statuses
    }

    pub fn stop_all(&mut self, drain: Duration) {
        for (_, dialed) in self.running.drain() {
            *dialed.drain.lock().unwrap_or_else(|e| e.into_inner()) = drain;
            dialed.stop.cancel();
        }
    }
}

impl Dialed {
    fn start(
        config: TunnelConfig,
        node_id: &str,
        workers: &Workers,
        drain: Duration,
        events: &broadcast::Sender<NodeEvent>,
    ) -> Arc<Dialed> {
        let dialed = Arc::new(Dialed {
            node_id: node_id.to_owned(),
            stop: CancellationToken::new(),
            drain: Mutex::new(drain),
            up: watch::channel(0).0,
            open_streams: Arc::default(),
            last_error: Mutex::default(),
            events: events.clone(),
            config,
        });
        let tls = match tls_connector(&dialed.config) {
            Ok(tls) => tls,
            Err(error) => {
                // Validated with the config; unreachable in practice.
                dialed.failed(format!("TLS settings unusable: {error}"));
                return dialed;
            }
        };
        // Spread over the workers, like the connections they accept.
        let handles: Vec<_> = workers.handles().collect();
        for index in 0..dialed.config.connections {
            let worker = handles[index % handles.len()];
            worker.spawn(keep_connected(dialed.clone(), tls.clone(), index));
        }
        dialed
    }

    /// Drains this (replaced) tunnel once `successor` has a connection up,
    /// or after `REPLACE_WAIT`: the public node always has one to use.
    fn drain_when_up(self: Arc<Self>, successor: &Arc<Dialed>) {
        let mut up = successor.up.subscribe();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REPLACE_WAIT, up.wait_for(|n| *n > 0)).await;
            tracing::info!(tunnel = %self.config.name, "tunnel changed; draining the old connections");
            self.stop.cancel();
        });
    }

    fn status(&self) -> TunnelStatus {
        TunnelStatus {
            role: TunnelRole::Dial,
            name: self.config.name.clone(),
            peer: self.config.connect.clone(),
            services: self
                .config
                .services
                .iter()
                .map(|s| s.name.clone())
                .collect(),
            connections_up: *self.up.borrow(),
            connections_wanted: self.config.connections as u32,
            open_streams: self.open_streams.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    fn announce(&self) {
        let _ = self.events.send(NodeEvent::TunnelChanged(self.status()));
    }

    fn connection_up(&self) {
        self.up.send_modify(|n| *n += 1);
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.announce();
    }

    fn connection_down(&self, reason: String) {
        self.up.send_modify(|n| *n = n.saturating_sub(1));
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = reason;
        self.announce();
    }

    /// A dial that failed; said once per distinct reason.
    fn failed(&self, reason: String) {
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        if *last == reason {
            return;
        }
        tracing::warn!(tunnel = %self.config.name, connect = %self.config.connect, %reason, "tunnel not up");
        *last = reason;
        drop(last);
        self.announce();
    }
}

fn tls_connector(config: &TunnelConfig) -> Result<(TlsConnector, ServerName<'static>), String> {
    let mut tls = crate::pki::client_config(
        Some(&config.ca_pem),
        Some((&config.cert_pem, &config.key_pem)),
    )
    .map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![super::ALPN.to_vec()];
    let name = ServerName::try_from(config.server_name.clone()).map_err(|e| e.to_string())?;
    Ok((TlsConnector::from(Arc::new(tls)), name))
}

/// One of a tunnel's connections: dialed, served, dialed again, until the
/// tunnel drains.
async fn keep_connected(
    dialed: Arc<Dialed>,
    tls: (TlsConnector, ServerName<'static>),
    index: usize,
) {
    let mut failures = 0u32;
    loop {
        let attempt = tokio::select! {
            _ = dialed.stop.cancelled() => return,
            attempt = tokio::time::timeout(super::HANDSHAKE_TIMEOUT, dial(&dialed, &tls)) => attempt,
        };
        match attempt {
            Ok(Ok(stream)) => {
                failures = 0;
                tracing::info!(tunnel = %dialed.config.name, connection = index, connect = %dialed.config.connect, "tunnel connection up");
                dialed.connection_up();
                let reason = serve(&dialed, stream).await;
                tracing::info!(tunnel = %dialed.config.name, connection = index, %reason, "tunnel connection ended");
                dialed.connection_down(reason);
            }
            Ok(Err(Dial::Failed(reason))) => {
                failures = failures.saturating_add(1);
                dialed.failed(reason);
            }
            Ok(Err(Dial::Refused(reason))) => {
                // Only a change of the public node's config helps: wait
                // the longest, not flooding its log.
                failures = u32::MAX;
                dialed.failed(reason);
            }
            Err(_) => {
                failures = failures.saturating_add(1);
                dialed.failed("timed out connecting".to_owned());
            }
        }
        let delay = backoff(failures, dialed.config.max_backoff);
        tokio::select! {
            _ = dialed.stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// 100 ms doubling per failure up to `max`, each between half and all of
/// it, so that nodes cut off together do not come back together.
fn backoff(failures: u32, max: Duration) -> Duration {
    let full = FIRST_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(max);
    full.mul_f64(rand::random_range(0.5..=1.0))
}

/// Why a dial did not give a connection.
enum Dial {
    Failed(String),
    /// The public node answered the hello with a refusal.
    Refused(String),
}

async fn dial(
    dialed: &Dialed,
    (connector, name): &(TlsConnector, ServerName<'static>),
) -> Result<TlsStream<TcpStream>, Dial> {
    let config = &dialed.config;
    let tcp = TcpStream::connect(&config.connect)
        .await
        .map_err(|e| Dial::Failed(format!("cannot connect to {}: {e}", config.connect)))?;
    let _ = tcp.set_nodelay(true);
    let mut tls = connector
        .connect(name.clone(), tcp)
        .await
        .map_err(|e| Dial::Failed(format!("TLS handshake with {} failed: {e}", config.connect)))?;
    let hello = Hello {
        node: dialed.node_id.clone(),
        tunnel: config.name.clone(),
        services: config.services.iter().map(|s| s.name.clone()).collect(),
    };
    hello::write(&mut tls, &hello).await.map_err(Dial::Failed)?;
    let answer: Answer = hello::read(&mut tls).await.map_err(Dial::Failed)?;
    match answer.error {
        Some(reason) => Err(Dial::Refused(format!(
            "refused by {}: {reason}",
            config.connect
        ))),
        None => Ok(tls),
    }
}

/// Serves one connection until it closes (the reason) or the tunnel
/// drains (GOAWAY, then its streams may finish within the drain timeout).
async fn serve(dialed: &Arc<Dialed>, stream: TlsStream<TcpStream>) -> String {
    let services: Arc<HashMap<String, ServerAddr>> = Arc::new(
        dialed
            .config
            .services
            .iter()
            .map(|s| (s.name.clone(), s.addr.clone()))
            .collect(),
    );
    let remote = stream
        .get_ref()
        .0
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let open = dialed.open_streams.clone();
    let service = hyper::service::service_fn(move |request| {
        open_stream(request, services.clone(), open.clone(), remote)
    });
    let keepalive = dialed.config.keepalive;
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME)
        .max_concurrent_streams(super::MAX_STREAMS)
        .keep_alive_interval(keepalive)
        .keep_alive_timeout(keepalive)
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        _ = dialed.stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let drain = *dialed.drain.lock().unwrap_or_else(|e| e.into_inner());
            match tokio::time::timeout(drain, connection.as_mut()).await {
                Ok(_) => return "drained".to_owned(),
                Err(_) => return "drain deadline passed; closed".to_owned(),
            }
        }
    };
    match ended {
        Ok(()) => "closed by the public node".to_owned(),
        Err(error) => crate::report::error_chain(&error),
    }
}

type Answered = Response<Empty<Bytes>>;

/// A CONNECT stream for a service: connected to the service's address,
/// then joined to it byte for byte.
async fn open_stream(
    mut request: Request<Incoming>,
    services: Arc<HashMap<String, ServerAddr>>,
    open: Arc<AtomicU64>,
    remote: SocketAddr,
) -> Result<Answered, std::convert::Infallible> {
    if request.method() != Method::CONNECT {
        return Ok(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "only CONNECT streams",
        ));
    }
    let name = request.uri().host().unwrap_or_default();
    let Some(addr) = services.get(name) else {
        let reason = format!("this node does not serve {name:?} on this tunnel");
        return Ok(refuse(StatusCode::NOT_FOUND, &reason));
    };
    let socket: Socket =
        match tokio::time::timeout(SERVICE_CONNECT_TIMEOUT, crate::stream::connect(addr)).await {
            Ok(Ok(socket)) => socket,
            Ok(Err(error)) => {
                return Ok(refuse(StatusCode::BAD_GATEWAY, &format!("{addr}: {error}")))
            }
            Err(_) => {
                return Ok(refuse(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("{addr}: connect timed out"),
                ))
            }
        };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let stream = crate::stream::TunnelStream::new(upgraded, open);
                crate::relay::run(Socket::Tunnel(stream), socket, STREAM_IDLE, remote).await;
            }
            Err(error) => tracing::debug!(%error, "tunnel stream ended before it opened"),
        }
    });
    Ok(Response::new(Empty::new()))
}

fn refuse(status: StatusCode, reason: &str) -> Answered {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(reason) {
        response.headers_mut().insert(ERROR_HEADER, value);
    }
    response
}
