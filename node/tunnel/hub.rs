//! The public node's side: the tunnel connections nodes behind NAT keep
//! open to it, which of them may stay (the tunnel listeners in force),
//! and streams opened through them to a node's service.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::broadcast;

use super::hello::Hello;
use crate::config::{ListenerConfig, ServerAddr, TunnelPeer, TunnelTarget};
use crate::events::{NodeEvent, TunnelRole, TunnelStatus};
use crate::identity::CertIdentity;
use crate::stream::{Socket, TunnelStream};

/// The header in which a dialing node says why it could not open a
/// stream to one of its services.
pub const ERROR_HEADER: &str = "tether-tunnel-error";

pub struct Hub {
    state: Mutex<State>,
    events: broadcast::Sender<NodeEvent>,
    next_link: AtomicU64,
    /// Spreads streams over links with as many open streams.
    turn: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Live tunnel connections by node id.
    links: HashMap<String, Vec<Arc<Link>>>,
    /// How many live links offer each service; servers at that address
    /// are down while it is 0.
    liveness: HashMap<TunnelTarget, Arc<AtomicU32>>,
    /// The tunnel listeners in force: listener name → who may dial in.
    policy: HashMap<String, Vec<TunnelPeer>>,
}

/// One accepted tunnel connection.
struct Link {
    id: u64,
    listener: String,
    hello: Hello,
    remote: SocketAddr,
    sender: SendRequest<Empty<Bytes>>,
    open: Arc<AtomicU64>,
}

impl Hub {
    pub fn new(events: broadcast::Sender<NodeEvent>) -> Hub {
        Hub {
            state: Mutex::default(),
            events,
            next_link: AtomicU64::new(1),
            turn: AtomicU64::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The number of live links offering `target`, shared with the
    /// servers at that address.
    pub fn liveness(&self, target: &TunnelTarget) -> Arc<AtomicU32> {
        self.state()
            .liveness
            .entry(target.clone())
            .or_default()
            .clone()
    }

    /// Connects to `addr`: through a tunnel when it names one.
    pub async fn connect(&self, addr: &ServerAddr) -> io::Result<Socket> {
        match addr {
            ServerAddr::Tunnel(target) => self.open(target).await.map(Socket::Tunnel),
            other => crate::stream::connect(other).await,
        }
    }

    /// Puts the tunnel listeners of a config in force. Connections they no
    /// longer allow take no new streams and close once their streams end.
    pub fn set_policy(&self, listeners: &[ListenerConfig]) {
        let policy: HashMap<String, Vec<TunnelPeer>> = listeners
            .iter()
            .filter_map(|l| Some((l.name.clone(), l.tunnel.as_ref()?.peers.clone())))
            .collect();
        let mut state = self.state();
        state.policy = policy;
        let refused: Vec<(u64, String)> = state
            .links
            .values()
            .flatten()
            .filter_map(|link| {
                let reason = allowed(&state.policy, &link.listener, &link.hello).err()?;
                Some((link.id, reason))
            })
            .collect();
        drop(state);
        for (id, reason) in refused {
            tracing::warn!(link = id, %reason, "tunnel no longer allowed; it takes no new streams");
            self.unregister(id, &reason);
        }
    }

    /// Whether the listener in force lets `identity` dial in with `hello`;
    /// why not otherwise.
    pub fn admit(
        &self,
        listener: &str,
        identity: &CertIdentity,
        hello: &Hello,
    ) -> Result<(), String> {
        if !identity.may_be_node(&hello.node) {
            return Err(format!(
                "the client certificate ({identity}) is not node {:?}'s",
                hello.node
            ));
        }
        allowed(&self.state().policy, listener, hello)
    }

    /// Serves a tunnel connection whose handshake passed, until it closes:
    /// the HTTP/2 client end, registered so streams can be opened on it.
    pub async fn run_link<S>(&self, listener: String, hello: Hello, io: S, remote: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let handshake = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(super::STREAM_WINDOW)
            .initial_connection_window_size(super::CONNECTION_WINDOW)
            .max_frame_size(super::MAX_FRAME)
            .keep_alive_interval(super::ACCEPT_KEEPALIVE)
            .keep_alive_timeout(super::ACCEPT_KEEPALIVE)
            .keep_alive_while_idle(true)
            .handshake::<_, Empty<Bytes>>(TokioIo::new(io))
            .await;
        let (sender, connection) = match handshake {
            Ok(parts) => parts,
            Err(error) => {
                tracing::warn!(node = %hello.node, %remote, %error, "tunnel HTTP/2 handshake failed");
                return;
            }
        };
        let id = self.next_link.fetch_add(1, Ordering::Relaxed);
        let (node, tunnel) = (hello.node.clone(), hello.tunnel.clone());
        // Only the hub holds the link (and its request sender): once it is
        // unregistered, the connection closes when its last stream ends.
        let link = Link {
            id,
            listener,
            hello,
            remote,
            sender,
            open: Arc::default(),
        };
        if !self.register(Arc::new(link)) {
            return;
        }
        let ended = connection.await;
        let reason = match &ended {
            Ok(()) => "closed".to_owned(),
            Err(error) => crate::report::error_chain(error),
        };
        tracing::info!(%node, %tunnel, %remote, %reason, "tunnel connection ended");
        self.unregister(id, &reason);
    }

    /// Adds a link, unless the policy changed since its handshake.
    fn register(&self, link: Arc<Link>) -> bool {
        let mut state = self.state();
        if let Err(reason) = allowed(&state.policy, &link.listener, &link.hello) {
            tracing::warn!(node = %link.hello.node, %reason, "tunnel refused");
            return false;
        }
        for service in &link.hello.services {
            let target = TunnelTarget {
                node: link.hello.node.clone(),
                service: service.clone(),
            };
            state
                .liveness
                .entry(target)
                .or_default()
                .fetch_add(1, Ordering::Relaxed);
        }
        let (node, tunnel) = (link.hello.node.clone(), link.hello.tunnel.clone());
        tracing::info!(%node, %tunnel, remote = %link.remote, services = ?link.hello.services, "tunnel connection up");
        state.links.entry(node.clone()).or_default().push(link);
        let status = status_of(&state, &node, &tunnel, "");
        drop(state);
        let _ = self.events.send(NodeEvent::TunnelChanged(status));
        true
    }

    fn unregister(&self, id: u64, reason: &str) {
        let mut state = self.state();
        let mut removed = None;
        for links in state.links.values_mut() {
            if let Some(at) = links.iter().position(|l| l.id == id) {
                removed = Some(links.remove(at));
                break;
            }
        }
        let Some(link) = removed else {
            return;
        };
        state.links.retain(|_, links| !links.is_empty());
        for service in &link.hello.services {
            let target = TunnelTarget {
                node: link.hello.node.clone(),
                service: service.clone(),
            };
            if let Some(live) = state.liveness.get(&target) {
                live.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let status = status_of(&state, &link.hello.node, &link.hello.tunnel, reason);
        drop(state);
        let _ = self.events.send(NodeEvent::TunnelChanged(status));
    }

    /// Opens a stream to `target` on the live link with the fewest open
    /// streams; a link that will take no more (it was drained) passes the
    /// request to the next.
    pub async fn open(&self, target: &TunnelTarget) -> io::Result<TunnelStream> {
        let mut links: Vec<Arc<Link>> = self
            .state()
            .links
            .get(&target.node)
            .into_iter()
            .flatten()
            .filter(|l| l.hello.services.contains(&target.service) && !l.sender.is_closed())
            .cloned()
            .collect();
        if links.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!(
                    "no tunnel from node {} offering {} is up",
                    target.node, target.service
                ),
            ));
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed) as usize;
        let count = links.len();
        links.rotate_left(turn % count);
        links.sort_by_key(|l| l.open.load(Ordering::Relaxed));
        let mut last_error = String::new();
        for link in links {
            let mut sender = link.sender.clone();
            if let Err(error) = sender.ready().await {
                last_error = error.to_string();
                continue;
            }
            let request = Request::builder()
                .method(Method::CONNECT)
                .uri(format!("{}:1", target.service))
                .body(Empty::new())
                .map_err(io::Error::other)?;
            let response = match sender.send_request(request).await {
                Ok(response) => response,
                Err(error) => {
                    last_error = error.to_string();
                    continue;
                }
            };
            if response.status() != StatusCode::OK {
                let reason = response
                    .headers()
                    .get(ERROR_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_else(|| response.status().canonical_reason().unwrap_or(""))
                    .to_owned();
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "node {} cannot reach its service {}: {reason}",
                        target.node, target.service
                    ),
                ));
            }
            let upgraded = hyper::upgrade::on(response)
                .await
                .map_err(io::Error::other)?;
            return Ok(TunnelStream::new(upgraded, link.open.clone()));
        }
        Err(io::Error::new(
            io::ErrorKind::NotConnected,
            format!(
                "no tunnel from node {} took the stream to {}: {last_error}",
                target.node, target.service
            ),
        ))
    }

    /// One status per (node, tunnel) with a live connection.
    pub fn statuses(&self) -> Vec<TunnelStatus> {
        let state = self.state();
        let keys: std::collections::BTreeSet<(String, String)> = state
            .links
            .values()
            .flatten()
            .map(|l| (l.hello.node.clone(), l.hello.tunnel.clone()))
            .collect();
        keys.into_iter()
            .map(|(node, tunnel)| status_of(&state, &node, &tunnel, ""))
            .collect()
    }

    /// Takes no new streams on any link; each closes once its streams end.
    pub fn close_all(&self) {
        let ids: Vec<u64> = self
            .state()
            .links
            .values()
            .flatten()
            .map(|l| l.id)
            .collect();
        for id in ids {
            self.unregister(id, "the node is stopping");
        }
    }
}

/// Whether `listener`'s peers include `hello.node` with every service it
/// offers.
fn allowed(
    policy: &HashMap<String, Vec<TunnelPeer>>,
    listener: &str,
    hello: &Hello,
) -> Result<(), String> {
    let Some(peers) = policy.get(listener) else {
        return Err(format!(
            "tunnel listener {listener:?} is no longer configured"
        ));
    };
    let Some(peer) = peers.iter().find(|p| p.node == hello.node) else {
        return Err(format!(
            "node {:?} is not a [[listener.tunnel.peer]] of listener {listener:?}",
            hello.node
        ));
    };
    if let Some(service) = hello.services.iter().find(|s| !peer.services.contains(s)) {
        return Err(format!(
            "service {service:?} of node {:?} is not expected by listener {listener:?} (expected: {})",
            hello.node,
            peer.services.join(", ")
        ));
    }
    Ok(())
}

fn status_of(state: &State, node: &str, tunnel: &str, last_error: &str) -> TunnelStatus {
    let links: Vec<&Arc<Link>> = state
        .links
        .get(node)
        .into_iter()
        .flatten()
        .filter(|l| l.hello.tunnel == tunnel)
        .collect();
    let services: BTreeMap<&str, ()> = links
        .iter()
        .flat_map(|l| l.hello.services.iter().map(|s| (s.as_str(), ())))
        .collect();
    TunnelStatus {
        role: TunnelRole::Accept,
        name: tunnel.to_owned(),
        peer: node.to_owned(),
        services: services.into_keys().map(str::to_owned).collect(),
        connections_up: links.len() as u32,
        connections_wanted: links.len() as u32,
        open_streams: links.iter().map(|l| l.open.load(Ordering::Relaxed)).sum(),
        last_error: last_error.to_owned(),
    }
}
