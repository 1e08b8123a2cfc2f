//! Upstream pools: the servers of one `[upstream.NAME]`, how one is chosen
//! for a request (`balance`), and the pooled connections to them (`client`).

mod balance;
mod client;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use http::uri::Authority;

pub use balance::{hash_of as balance_hash, Balancer};
pub use client::{ClientKey, ClientRegistry, UpstreamClient};

use crate::config::{HashKey, UpstreamConfig};

/// Health of one server as the balancers see it. Active checks (and passive
/// ejection) move it; `Unknown` servers take traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    Unknown = 0,
    Healthy = 1,
    Unhealthy = 2,
}

/// One server of an upstream, shared by every request that uses it.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    pub weight: u32,
    /// `addr` as a URI authority, built once.
    pub authority: Authority,
    active: AtomicU64,
    health: AtomicU8,
}

impl Server {
    pub fn new(addr: SocketAddr, weight: u32) -> Self {
        Server {
            addr,
            weight,
            authority: Authority::try_from(addr.to_string())
                .expect("a socket address is an authority"),
            active: AtomicU64::new(0),
            health: AtomicU8::new(Health::Unknown as u8),
        }
    }

    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    pub fn set_health(&self, health: Health) -> Health {
        match self.health.swap(health as u8, Ordering::Relaxed) {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    pub fn is_available(&self) -> bool {
        self.health() != Health::Unhealthy
    }

    pub fn active_requests(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a request against this server until the guard drops.
    pub fn begin_request(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(self.clone())
    }
}

/// Held for the lifetime of a proxied exchange (until the response body ends).
pub struct ActiveRequest(Arc<Server>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a balancer may look at to pick a server.
pub struct PickContext {
    pub client_ip: IpAddr,
    /// Hash of the consistent-hash key, when the policy uses one.
    pub key_hash: Option<u64>,
}

/// An upstream as one generation uses it.
pub struct Upstream {
    pub config: UpstreamConfig,
    pub servers: Vec<Arc<Server>>,
    pub client: UpstreamClient,
    balancer: Box<dyn Balancer>,
}

impl Upstream {
    /// `previous` is the same-named upstream of the generation in force: its
    /// servers (active counts, health) are kept for addresses still listed.
    pub fn new(
        config: UpstreamConfig,
        previous: Option<&Upstream>,
        clients: &mut ClientRegistry,
    ) -> Self {
        let servers: Vec<Arc<Server>> = config
            .servers
            .iter()
            .map(|s| {
                previous
                    .and_then(|p| {
                        p.servers
                            .iter()
                            .find(|old| old.addr == s.addr && old.weight == s.weight)
                    })
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Server::new(s.addr, s.weight)))
            })
            .collect();
        let balancer = balance::for_policy(&config.balance, &servers);
        let client = clients.get(ClientKey::of(&config));
        Upstream {
            config,
            servers,
            client,
            balancer,
        }
    }

    pub fn hash_key(&self) -> Option<&HashKey> {
        match &self.config.balance {
            crate::config::BalancePolicy::ConsistentHash(key) => Some(key),
            _ => None,
        }
    }

    /// Picks an available server, or `None` when every server is down.
    pub fn pick(&self, context: &PickContext) -> Option<&Arc<Server>> {
        self.balancer
            .pick(&self.servers, context)
            .map(|i| &self.servers[i])
    }
}
