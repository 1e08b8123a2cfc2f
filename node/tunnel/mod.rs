//! Reverse tunnels: a node behind NAT (the dialing node, `[[tunnel]]`)
//! keeps TLS connections open to a public node's `protocol = "tunnel"`
//! listener, and the public node reaches the services it offers as
//! upstream servers `tunnel:NODE/SERVICE`.
//!
//! One tunnel connection is mutual TLS (the dialing node's certificate
//! names it, as for the controller), a one-line handshake (`hello`: which
//! node, which tunnel, which services; the public node answers yes or why
//! not), then HTTP/2 with the roles turned around: the public node is the
//! client and opens one CONNECT stream per connection it wants to a
//! service; the dialing node is the server and joins each stream to a
//! fresh connection to the service's local address. HTTP/2 gives every
//! stream its own flow-control window, so a stream whose reader stalls
//! holds at most its own window and never the others; bytes are never
//! dropped, only held back.
//!
//! What travels in a stream is what the public node would have sent over
//! TCP: HTTP/1.1 from its upstream pools (keep-alive, upgrades and
//! WebSockets included), TLS to the service, or a TCP listener's bytes.
//! So balancing, retries, passive ejection and active health checks work
//! on tunnel servers as on any other.

mod accept;
mod dial;
mod hello;
mod hub;

use std::sync::Mutex;
use std::time::Duration;

pub use accept::TunnelListener;
pub use dial::Dialers;
pub use hub::Hub;

use crate::config::TunnelConfig;
use crate::events::TunnelStatus;
use crate::workers::Workers;

/// The ALPN protocol of a tunnel connection: nothing else is agreed on
/// a tunnel listener.
pub const ALPN: &[u8] = b"tether-tunnel/1";

/// Each stream's HTTP/2 window: what one stalled stream may hold back.
const STREAM_WINDOW: u32 = 1024 * 1024;
/// The connection's window: 16 streams' worth, so a few stalled readers
/// leave the rest moving.
const CONNECTION_WINDOW: u32 = 16 * STREAM_WINDOW;
/// Larger frames than HTTP/2's 16 KiB default: fewer frames per byte on
/// bulk transfers.
const MAX_FRAME: u32 = 64 * 1024;
/// Streams one tunnel connection carries at once.
const MAX_STREAMS: u32 = 4096;
/// TCP connect, TLS and the hello, together.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The public node's PINGs on an accepted tunnel.
const ACCEPT_KEEPALIVE: Duration = Duration::from_secs(10);

/// Both ends of the node's reverse tunnels, kept across generations: the
/// connections this node accepted (`hub`) and those it dials (`dialers`).
pub struct Tunnels {
    pub hub: std::sync::Arc<Hub>,
    dialers: Mutex<Dialers>,
}

impl Tunnels {
    pub fn new(events: tokio::sync::broadcast::Sender<crate::events::NodeEvent>) -> Tunnels {
        Tunnels {
            hub: std::sync::Arc::new(Hub::new(events.clone())),
            dialers: Mutex::new(Dialers::new(events)),
        }
    }

    /// Dials the `[[tunnel]]`s of a config being put in force: unchanged
    /// ones keep their connections, changed ones are dialed anew and the
    /// old connections drain once a new one is up, removed ones drain.
    pub fn dial(
        &self,
        tunnels: &[TunnelConfig],
        node_id: &str,
        workers: &Workers,
        drain: Duration,
    ) {
        self.dialers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .apply(tunnels, node_id, workers, drain);
    }

    /// Every tunnel, dialed and accepted.
    pub fn statuses(&self) -> Vec<TunnelStatus> {
        let mut statuses = self
            .dialers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .statuses();
        statuses.extend(self.hub.statuses());
        statuses
    }

    /// The node stops: dialed tunnels drain, accepted ones take no new
    /// streams.
    pub fn stop(&self, drain: Duration) {
        self.dialers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stop_all(drain);
        self.hub.close_all();
    }
}
