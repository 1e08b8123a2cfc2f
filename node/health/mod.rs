//! Active health checks. One checker task per distinct (server address,
//! check), however many upstreams list that server with that check; its
//! state lives in a `HealthCell` that every such server shares, and that
//! outlives reloads as long as some generation still uses the pair.

mod probe;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::ServerAddr;
use crate::config::{Config, HealthCheck, InitialHealth};
use crate::events::{Health, NodeEvent};
use crate::tunnel::Hub;

/// The health one checker reports, shared by every server it covers.
#[derive(Debug)]
pub struct HealthCell {
    state: AtomicU8,
    /// Successful probes so far: a passive ejection ends at the next one.
    passes: AtomicU64,
    /// Upstreams whose servers use this cell, for events.
    users: Mutex<Vec<String>>,
}

impl HealthCell {
    pub fn new(initial: Health) -> Self {
        HealthCell {
            state: AtomicU8::new(initial as u8),
            passes: AtomicU64::new(0),
            users: Mutex::new(Vec::new()),
        }
    }

    pub fn get(&self) -> Health {
        Health::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Answers the previous state.
    pub fn set(&self, health: Health) -> Health {
        Health::from_u8(self.state.swap(health as u8, Ordering::Relaxed))
    }

    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }
}

pub type CheckKey = (ServerAddr, HealthCheck);

struct Checker {
    cell: Arc<HealthCell>,
    stop: CancellationToken,
}

/// The checkers of the node, kept by the supervisor across generations.
pub struct HealthRegistry {
    checkers: HashMap<CheckKey, Checker>,
    events: broadcast::Sender<NodeEvent>,
    /// Probes of `tunnel:` servers go through the node's tunnels.
    tunnels: Arc<Hub>,
}

/// Cells for a config being applied; new ones start checking on `commit`.
pub struct PreparedChecks {
    cells: HashMap<CheckKey, Arc<HealthCell>>,
}

impl PreparedChecks {
    pub fn cell(&self, addr: &ServerAddr, check: &HealthCheck) -> Option<Arc<HealthCell>> {
        self.cells.get(&(addr.clone(), check.clone())).cloned()
    }
}

impl HealthRegistry {
    pub fn new(events: broadcast::Sender<NodeEvent>, tunnels: Arc<Hub>) -> Self {
        HealthRegistry {
            checkers: HashMap::new(),
            events,
            tunnels,
        }
    }

    /// The cell of every (address, check) in `config`: the running one
    /// where it exists, a new one otherwise. Nothing starts yet.
    pub fn prepare(&self, config: &Config) -> PreparedChecks {
        let mut cells = HashMap::new();
        for upstream in config.upstreams.values() {
            let Some(check) = &upstream.health else {
                continue;
            };
            for server in &upstream.servers {
                let key = (server.addr.clone(), check.clone());
                cells
                    .entry(key.clone())
                    .or_insert_with(|| match self.checkers.get(&key) {
                        Some(checker) => checker.cell.clone(),
                        None => Arc::new(HealthCell::new(match check.initial {
                            InitialHealth::Unknown => Health::Unknown,
                            InitialHealth::Unhealthy => Health::Unhealthy,
                        })),
                    });
            }
        }
        PreparedChecks { cells }
    }

    /// Makes `prepared` the checks in force: starts the new checkers, stops
    /// those no longer listed, and records which upstreams use each.
    pub fn commit(&mut self, prepared: PreparedChecks, config: &Config) {
        let mut users: HashMap<CheckKey, Vec<String>> = HashMap::new();
        for upstream in config.upstreams.values() {
            let Some(check) = &upstream.health else {
                continue;
            };
            for server in &upstream.servers {
                users
                    .entry((server.addr.clone(), check.clone()))
                    .or_default()
                    .push(upstream.name.clone());
            }
        }
        self.checkers.retain(|key, checker| {
            let keep = prepared.cells.contains_key(key);
            if !keep {
                checker.stop.cancel();
            }
            keep
        });
        for (key, cell) in prepared.cells {
            *cell.users.lock().unwrap_or_else(|e| e.into_inner()) =
                users.remove(&key).unwrap_or_default();
            self.checkers.entry(key.clone()).or_insert_with(|| {
                let stop = CancellationToken::new();
                tokio::spawn(run_checker(
                    key,
                    cell.clone(),
                    self.events.clone(),
                    self.tunnels.clone(),
                    stop.clone(),
                ));
                Checker { cell, stop }
            });
        }
    }

    /// Number of checker tasks running.
    pub fn len(&self) -> usize {
        self.checkers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.checkers.is_empty()
    }

    pub fn stop_all(&mut self) {
        for checker in self.checkers.values() {
            checker.stop.cancel();
        }
        self.checkers.clear();
    }
}

/// Probes every interval (plus jitter) until stopped. A probe never takes
/// longer than the check's timeout, so a hung server costs one timeout.
async fn run_checker(
    key: CheckKey,
    cell: Arc<HealthCell>,
    events: broadcast::Sender<NodeEvent>,
    tunnels: Arc<Hub>,
    stop: CancellationToken,
) {
    let (addr, check) = key;
    let probe = probe::Probe::new(addr.clone(), check.kind.clone(), tunnels);
    let mut successes = 0u32;
    let mut failures = 0u32;
    let mut delay = random_up_to(check.jitter);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        let result = match tokio::time::timeout(check.timeout, probe.run()).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {:?}", check.timeout)),
        };
        if stop.is_cancelled() {
            return;
        }
        crate::telemetry::metrics::node().health_checks.add(
            1,
            &[
                opentelemetry::KeyValue::new("server", addr.to_string()),
                opentelemetry::KeyValue::new(
                    "result",
                    if result.is_ok() { "pass" } else { "fail" },
                ),
            ],
        );
        let current = cell.get();
        let next = match &result {
            Ok(()) => {
                cell.passes.fetch_add(1, Ordering::Relaxed);
                successes += 1;
                failures = 0;
                match current {
                    Health::Unknown => Some(Health::Healthy),
                    Health::Unhealthy if successes >= check.rise => Some(Health::Healthy),
                    _ => None,
                }
            }
            Err(_) => {
                failures += 1;
                successes = 0;
                (current != Health::Unhealthy && failures >= check.fall)
                    .then_some(Health::Unhealthy)
            }
        };
        if let Some(next) = next {
            let from = cell.set(next);
            let reason = match &result {
                Ok(()) => format!("{successes} consecutive successful checks"),
                Err(e) => format!("{failures} consecutive failed checks, last: {e}"),
            };
            let users = cell.users.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for upstream in users {
                tracing::info!(%upstream, server = %addr, ?from, to = ?next, %reason, "health changed");
                let _ = events.send(NodeEvent::HealthChanged {
                    upstream,
                    server: addr.clone(),
                    from,
                    to: next,
                    reason: reason.clone(),
                });
            }
        }
        delay = check.interval + random_up_to(check.jitter);
    }
}

fn random_up_to(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    Duration::from_millis(rand::rng().random_range(0..=max.as_millis() as u64))
}
