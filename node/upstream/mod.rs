//! Upstream pools: the servers of one `[upstream.NAME]`, how one is chosen
//! for a request (`balance`), their health as checks and real traffic see
//! it, and the pooled connections to them (`client`).

mod balance;
mod client;
pub mod connect;
mod idle;
mod inline;
mod raw;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::uri::Authority;
use tokio::sync::broadcast;

pub use balance::{hash_bytes, hash_ip, Balancer};
pub use client::{
    ClientBodyFailed, ClientKey, ClientRegistry, RequestBody, UpstreamBody, UpstreamClient,
    WorkerClient, WorkerClients,
};
pub use inline::SendError;
pub use raw::{Home, RawPool};

use crate::config::{AllDown, HashKey, PassiveCheck, ServerAddr, UpstreamConfig};
use crate::events::{Health, NodeEvent};
use crate::health::{HealthCell, PreparedChecks};
use crate::tunnel::Hub;

/// One server of an upstream, shared by every request that uses it.
#[derive(Debug)]
pub struct Server {
    pub addr: ServerAddr,
    pub weight: u32,
    /// `addr` as a URI authority, built once.
    pub authority: Authority,
    active: AtomicU64,
    /// The active check's verdict, shared with every server that has the
    /// same address and check; a private cell when there is no check.
    health: Arc<HealthCell>,
    passive: Ejection,
    /// For `tunnel:` servers: how many tunnel connections offer the
    /// service. None up means down, whatever the checks said last.
    tunnel_links: Option<Arc<AtomicU32>>,
}

/// Passive outlier detection state, counted from real traffic.
#[derive(Debug, Default)]
struct Ejection {
    consecutive_failures: AtomicU32,
    /// Milliseconds since `epoch()`; 0 when not ejected.
    ejected_until: AtomicU64,
    /// The health cell's passes when ejected: a passing active check since
    /// then ends the ejection early.
    passes_at_ejection: AtomicU64,
    ejections: AtomicU32,
}

/// A monotonic origin for ejection deadlines kept in atomics.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_millis() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

/// What a passive check did with a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Kept,
    Ejected(Duration),
}

impl Server {
    pub fn new(addr: ServerAddr, weight: u32) -> Self {
        Self::with_health(addr, weight, Arc::new(HealthCell::new(Health::Unknown)))
    }

    pub fn with_health(addr: ServerAddr, weight: u32, health: Arc<HealthCell>) -> Self {
        Server {
            authority: connect::authority(&addr),
            addr,
            weight,
            active: AtomicU64::new(0),
            health,
            passive: Ejection::default(),
            tunnel_links: None,
        }
    }

    /// A server reached through a tunnel: down while no tunnel offers it.
    pub fn through_tunnel(mut self, links: Arc<AtomicU32>) -> Self {
        self.tunnel_links = Some(links);
        self
    }

    fn tunnel_down(&self) -> bool {
        self.tunnel_links
            .as_ref()
            .is_some_and(|links| links.load(Ordering::Relaxed) == 0)
    }

    /// The active check's verdict, overridden by a passive ejection.
    pub fn health(&self) -> Health {
        if self.is_ejected() || self.tunnel_down() {
            Health::Unhealthy
        } else {
            self.health.get()
        }
    }

    pub fn set_health(&self, health: Health) -> Health {
        self.health.set(health)
    }

    pub fn is_available(&self) -> bool {
        self.health() != Health::Unhealthy
    }

    pub fn is_ejected(&self) -> bool {
        let until = self.passive.ejected_until.load(Ordering::Relaxed);
        until != 0
            && now_millis() < until
            && self.health.passes() == self.passive.passes_at_ejection.load(Ordering::Relaxed)
    }

    /// A request to this server succeeded.
    pub fn record_success(&self) {
        if self.passive.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.passive
                .consecutive_failures
                .store(0, Ordering::Relaxed);
        }
    }

    /// A request failed (connect error, timeout, 5xx). Ejects the server
    /// when `check` says so and the upstream can spare it (`share_after`:
    /// the percentage of its servers ejected if this one were too).
    pub fn record_failure(
        &self,
        check: &PassiveCheck,
        share_after: impl FnOnce() -> u32,
    ) -> Outcome {
        let failures = self
            .passive
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if failures < check.consecutive_failures || self.is_ejected() {
            return Outcome::Kept;
        }
        if share_after() > check.max_ejected_percent {
            return Outcome::Kept;
        }
        let repeat = self
            .passive
            .ejections
            .fetch_add(1, Ordering::Relaxed)
            .min(16);
        let period = check
            .ejection
            .saturating_mul(1 << repeat)
            .min(check.max_ejection);
        self.passive
            .passes_at_ejection
            .store(self.health.passes(), Ordering::Relaxed);
        self.passive
            .ejected_until
            .store(now_millis() + period.as_millis() as u64, Ordering::Relaxed);
        self.passive
            .consecutive_failures
            .store(0, Ordering::Relaxed);
        Outcome::Ejected(period)
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
    /// Pooled connections, per worker.
    pub clients: WorkerClients,
    balancer: Box<dyn Balancer>,
    /// Where passive ejections are announced.
    events: broadcast::Sender<NodeEvent>,
}

impl Upstream {
    /// `previous` is the same-named upstream of the generation in force: its
    /// servers (in-flight counts, passive state) are kept where address,
    /// weight and health cell are unchanged. Active health comes from
    /// `checks`, shared by every upstream that checks the same way.
    pub fn new(
        config: UpstreamConfig,
        previous: Option<&Upstream>,
        checks: &PreparedChecks,
        clients: &mut ClientRegistry,
        tunnels: &Hub,
        events: broadcast::Sender<NodeEvent>,
    ) -> Self {
        let servers: Vec<Arc<Server>> = config
            .servers
            .iter()
            .map(|s| {
                let cell = config
                    .health
                    .as_ref()
                    .and_then(|check| checks.cell(&s.addr, check));
                let reusable = |old: &&Arc<Server>| {
                    old.addr == s.addr
                        && old.weight == s.weight
                        && match &cell {
                            Some(cell) => Arc::ptr_eq(cell, &old.health),
                            None => previous.is_some_and(|p| p.config.health.is_none()),
                        }
                };
                previous
                    .and_then(|p| p.servers.iter().find(reusable))
                    .cloned()
                    .unwrap_or_else(|| {
                        let server = match cell {
                            Some(cell) => Server::with_health(s.addr.clone(), s.weight, cell),
                            None => Server::new(s.addr.clone(), s.weight),
                        };
                        Arc::new(match &s.addr {
                            ServerAddr::Tunnel(target) => {
                                server.through_tunnel(tunnels.liveness(target))
                            }
                            _ => server,
                        })
                    })
            })
            .collect();
        let balancer = balance::for_policy(&config.balance, &servers);
        let clients = clients.get(ClientKey::of(&config));
        Upstream {
            config,
            servers,
            clients,
            balancer,
            events,
        }
    }

    pub fn hash_key(&self) -> Option<&HashKey> {
        match &self.config.balance {
            crate::config::BalancePolicy::ConsistentHash(key) => Some(key),
            _ => None,
        }
    }

    /// Picks an available server not in `tried`. When every server is down
    /// and `all_down = "try_all"`, health is ignored. `None`: no server.
    pub fn pick(&self, context: &PickContext, tried: &[usize]) -> Option<usize> {
        let servers = &self.servers;
        let available = |i: usize| !tried.contains(&i) && servers[i].is_available();
        self.balancer
            .pick(servers, context, &available)
            .or_else(|| match self.config.all_down {
                AllDown::TryAll => self
                    .balancer
                    .pick(servers, context, &|i| !tried.contains(&i)),
                AllDown::Fail => None,
            })
    }

    /// A request that failed on `server` (its `retry` on another server or
    /// not): counted against the server, and logged.
    pub fn request_failed(&self, server: &Server, error: &dyn std::error::Error, retry: bool) {
        self.record(server, true);
        tracing::warn!(
            upstream = %self.config.name,
            server = %server.addr,
            error = %crate::report::error_chain(error),
            retry,
            "upstream request failed"
        );
    }

    /// `server` did not start its response within `read_timeout`: counted
    /// against it, and logged.
    pub fn timed_out(&self, server: &Server) {
        self.record(server, true);
        tracing::warn!(
            upstream = %self.config.name,
            server = %server.addr,
            timeout = ?self.config.read_timeout,
            "upstream did not answer in time"
        );
    }

    /// Feeds a request's outcome to passive outlier detection, if on.
    pub fn record(&self, server: &Server, failed: bool) {
        let Some(check) = &self.config.passive else {
            return;
        };
        if !failed {
            server.record_success();
            return;
        }
        let share_after = || {
            let ejected = self.servers.iter().filter(|s| s.is_ejected()).count() + 1;
            (ejected * 100 / self.servers.len().max(1)) as u32
        };
        if let Outcome::Ejected(period) = server.record_failure(check, share_after) {
            let reason = format!(
                "ejected for {period:?} after {} consecutive failed requests",
                check.consecutive_failures
            );
            tracing::warn!(upstream = %self.config.name, server = %server.addr, %reason, "server ejected");
            let _ = self.events.send(NodeEvent::HealthChanged {
                upstream: self.config.name.clone(),
                server: server.addr.clone(),
                from: server.health.get(),
                to: Health::Unhealthy,
                reason,
            });
        }
    }
}
