//! Listening sockets and accept loops.
//!
//! Each worker has its own listening socket per TCP address, all bound
//! with SO_REUSEPORT so the kernel spreads new connections over the
//! workers. The node keeps those sockets for as long as some generation
//! lists the address. A new generation gets duplicates of the same sockets
//! (same accept queues), so a reload never closes a socket that has
//! connections waiting in its queue (a closed member of a SO_REUSEPORT
//! group drops its queue). Only new addresses are bound. A Unix socket is
//! one socket whose duplicates every worker accepts from; a stale socket
//! file left by a process that is gone is replaced, a live one is an
//! address in use.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, UnixListener};

use crate::config::{ListenAddr, ListenerConfig};
use crate::generation::{Generation, ListenerService};
use crate::lifecycle::ConnectionGuard;
use crate::stream::ClientStream;
use crate::workers::Workers;

/// A listening socket the node holds.
enum Held {
    Tcp(StdListener),
    Unix(StdUnixListener),
}

impl Held {
    fn try_clone(&self) -> io::Result<Held> {
        Ok(match self {
            Held::Tcp(socket) => Held::Tcp(socket.try_clone()?),
            Held::Unix(socket) => Held::Unix(socket.try_clone()?),
        })
    }

    fn local_addr(&self, configured: &ListenAddr) -> io::Result<ListenAddr> {
        match self {
            Held::Tcp(socket) => socket.local_addr().map(ListenAddr::Tcp),
            Held::Unix(_) => Ok(configured.clone()),
        }
    }
}

/// Unix clients have no IP address; they are local, and appear as the
/// loopback address in X-Forwarded-For and to the balancers.
const UNIX_PEER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

const BACKLOG: i32 = 4096;

/// The sockets the node holds, by configured address: one per worker.
pub struct SocketRegistry {
    workers: usize,
    sockets: HashMap<SocketKey, Vec<Held>>,
}

/// What identifies a listening socket across configs: its address, and for
/// port 0 (any free port) also the listener's name, since every such
/// listener gets a port of its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SocketKey {
    addr: ListenAddr,
    ephemeral_owner: Option<String>,
}

impl SocketKey {
    fn of(listener: &ListenerConfig) -> Self {
        SocketKey {
            addr: listener.listen.clone(),
            ephemeral_owner: matches!(listener.listen, ListenAddr::Tcp(addr) if addr.port() == 0)
                .then(|| listener.name.clone()),
        }
    }
}

/// A socket for each listener of a config being applied, not yet in force.
pub struct PreparedSockets {
    /// In listener order; one socket per worker.
    sockets: Vec<(SocketKey, Vec<Held>)>,
}

/// A listener whose address could not be bound.
#[derive(Debug)]
pub struct BindFailure {
    pub listener_index: usize,
    pub addr: ListenAddr,
    pub error: io::Error,
}

impl SocketRegistry {
    /// A registry that binds one socket per address for each of `workers`.
    pub fn new(workers: usize) -> Self {
        SocketRegistry {
            workers: workers.max(1),
            sockets: HashMap::new(),
        }
    }

    /// Sockets for `listeners`: duplicates of the held sockets where the
    /// address is unchanged, fresh binds otherwise. The registry itself is
    /// untouched until `commit`, so a failure changes nothing.
    pub fn prepare(
        &self,
        listeners: &[ListenerConfig],
    ) -> Result<PreparedSockets, Vec<BindFailure>> {
        let mut sockets = Vec::with_capacity(listeners.len());
        let mut failures = Vec::new();
        for (listener_index, listener) in listeners.iter().enumerate() {
            let addr = listener.listen.clone();
            let key = SocketKey::of(listener);
            let socket = match self.sockets.get(&key) {
                Some(held) => held.iter().map(Held::try_clone).collect(),
                None => bind(&addr, self.workers),
            };
            match socket {
                Ok(socket) => sockets.push((key, socket)),
                Err(error) => failures.push(BindFailure {
                    listener_index,
                    addr,
                    error,
                }),
            }
        }
        if failures.is_empty() {
            Ok(PreparedSockets { sockets })
        } else {
            Err(failures)
        }
    }

    /// Holds exactly the prepared sockets from now on. Addresses no longer
    /// listed are released here; the retiring generation's duplicates keep
    /// them open until it stops accepting.
    pub fn commit(&mut self, prepared: &PreparedSockets) -> io::Result<()> {
        let mut next = HashMap::with_capacity(prepared.sockets.len());
        for (key, sockets) in &prepared.sockets {
            let held = sockets
                .iter()
                .map(Held::try_clone)
                .collect::<io::Result<_>>()?;
            next.insert(key.clone(), held);
        }
        self.sockets = next;
        Ok(())
    }

    pub fn release_all(&mut self) {
        self.sockets.clear();
    }
}

impl PreparedSockets {
    pub fn local_addrs(&self) -> io::Result<Vec<ListenAddr>> {
        self.sockets
            .iter()
            .map(|(key, sockets)| sockets[0].local_addr(&key.addr))
            .collect()
    }

    /// Starts, on each worker, one accept loop per listener of
    /// `generation`, in its task set. Connections are served on the worker
    /// that accepted them.
    pub fn start_accepting(
        self,
        generation: &Arc<Generation>,
        workers: &Workers,
    ) -> io::Result<()> {
        for (index, (_, sockets)) in self.sockets.into_iter().enumerate() {
            for (socket, worker) in sockets.into_iter().zip(workers.handles()) {
                // Registered with the worker's reactor, not the caller's.
                let _entered = worker.enter();
                let listener = match socket {
                    Held::Tcp(socket) => Accepting::Tcp(TcpListener::from_std(socket)?),
                    Held::Unix(socket) => Accepting::Unix(UnixListener::from_std(socket)?),
                };
                generation
                    .lifecycle
                    .tasks()
                    .spawn_on(accept_loop(listener, index, generation.clone()), worker);
            }
        }
        Ok(())
    }
}

/// `workers` sockets for `addr`: a SO_REUSEPORT group on one port (the
/// port the first one got, for port 0), or duplicates of one Unix socket.
fn bind(addr: &ListenAddr, workers: usize) -> io::Result<Vec<Held>> {
    match addr {
        ListenAddr::Tcp(addr) => {
            let first = bind_tcp(*addr)?;
            let bound = first.local_addr()?;
            let mut sockets = vec![Held::Tcp(first)];
            for _ in 1..workers {
                sockets.push(Held::Tcp(bind_tcp(bound)?));
            }
            Ok(sockets)
        }
        ListenAddr::Unix(path) => {
            let socket = Held::Unix(bind_unix(path)?);
            let mut sockets = Vec::with_capacity(workers);
            for _ in 1..workers {
                sockets.push(socket.try_clone()?);
            }
            sockets.push(socket);
            Ok(sockets)
        }
    }
}

fn bind_unix(path: &Path) -> io::Result<StdUnixListener> {
    if path.exists() {
        if StdUnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process is listening on this socket",
            ));
        }
        // Left behind by a process that is gone.
        std::fs::remove_file(path)?;
    }
    let listener = StdUnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn bind_tcp(addr: SocketAddr) -> io::Result<StdListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

enum Accepting {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Accepting {
    async fn accept(&self, name: &str) -> io::Result<(ClientStream, SocketAddr)> {
        match self {
            Accepting::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok((ClientStream::tcp(stream, name), peer))
            }
            Accepting::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                Ok((ClientStream::unix(stream, name), UNIX_PEER))
            }
        }
    }
}

async fn accept_loop(listener: Accepting, index: usize, generation: Arc<Generation>) {
    let lifecycle = &generation.lifecycle;
    let name = generation.listeners[index].config.name.clone();
    let mut backoff = Duration::from_millis(10);
    let mut failures = AcceptFailures::default();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = lifecycle.retired() => return,
            accepted = listener.accept(&name) => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                let connection = ConnectionGuard::new(
                    generation.lifecycle.clone(),
                    generation.listeners[index].open_connections_counter(),
                );
                let tasks = lifecycle.tasks();
                match &generation.listeners[index].service {
                    ListenerService::Http(http) => {
                        tasks.spawn(crate::http::serve_connection(
                            stream,
                            peer,
                            connection,
                            http.clone(),
                        ));
                    }
                    ListenerService::Tcp(tcp) => {
                        tasks.spawn(tcp.clone().serve_connection(stream, peer, connection));
                    }
                    ListenerService::Forward(forward) => {
                        tasks.spawn(forward.clone().serve_connection(stream, peer, connection));
                    }
                    ListenerService::Socks5(socks5) => {
                        tasks.spawn(socks5.clone().serve_connection(stream, peer, connection));
                    }
                    ListenerService::Tunnel(tunnel) => {
                        // Counted while its handshake runs; the tunnel
                        // then lives outside the generation.
                        let tunnel = tunnel.clone();
                        tasks.spawn(async move {
                            tunnel.serve_connection(stream, peer).await;
                            drop(connection);
                        });
                    }
                }
            }
            // The peer gave up before we accepted: nothing to do.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                // Out of file descriptors or memory: back off instead of
                // spinning, keep serving the connections we have, and say
                // so at most once a second.
                failures.note(&generation.listeners[index].config.name, &e);
                tokio::select! {
                    _ = lifecycle.retired() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Accept errors, logged at most once a second with how many there were.
#[derive(Default)]
struct AcceptFailures {
    last_logged: Option<std::time::Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    fn note(&mut self, listener: &str, error: &io::Error) {
        self.unlogged += 1;
        if self
            .last_logged
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        tracing::error!(
            listener,
            %error,
            failures = self.unlogged,
            "accept failed; serving the open connections and retrying"
        );
        self.last_logged = Some(std::time::Instant::now());
        self.unlogged = 0;
    }
}
