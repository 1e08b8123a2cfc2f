//! Load-balancing policies. One trait, one small type per policy; every
//! policy skips servers that are down and returns `None` only when all are.

use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rand::Rng;

use super::{PickContext, Server};
use crate::config::BalancePolicy;

/// Which servers a pick may choose (by index): normally those available
/// and not yet tried for this request.
pub type Eligible<'a> = &'a dyn Fn(usize) -> bool;

pub trait Balancer: Send + Sync {
    /// Index into `servers` of the server for this request, among the
    /// eligible ones; `None` when none is.
    fn pick(
        &self,
        servers: &[Arc<Server>],
        context: &PickContext,
        eligible: Eligible,
    ) -> Option<usize>;
}

pub fn for_policy(policy: &BalancePolicy, servers: &[Arc<Server>]) -> Box<dyn Balancer> {
    match policy {
        BalancePolicy::RoundRobin => Box::new(RoundRobin::default()),
        BalancePolicy::WeightedRoundRobin => Box::new(SmoothWeighted::new(servers.len())),
        BalancePolicy::LeastConn => Box::new(LeastConn::default()),
        BalancePolicy::ConsistentHash(_) => Box::new(HashRing::new(servers)),
        BalancePolicy::PowerOfTwo => Box::new(PowerOfTwo),
    }
}

/// Each available server in turn, ignoring weights.
#[derive(Default)]
struct RoundRobin {
    next: AtomicUsize,
}

impl Balancer for RoundRobin {
    fn pick(&self, servers: &[Arc<Server>], _: &PickContext, eligible: Eligible) -> Option<usize> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..servers.len())
            .map(|offset| (start + offset) % servers.len())
            .find(|&i| eligible(i))
    }
}

/// nginx's smooth weighted round robin: weights 5,1,1 give a a b a c a a,
/// spreading the heavy server's turns instead of sending them in a burst.
struct SmoothWeighted {
    current: Mutex<Vec<i64>>,
}

impl SmoothWeighted {
    fn new(len: usize) -> Self {
        SmoothWeighted {
            current: Mutex::new(vec![0; len]),
        }
    }
}

impl Balancer for SmoothWeighted {
    fn pick(&self, servers: &[Arc<Server>], _: &PickContext, eligible: Eligible) -> Option<usize> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, server) in servers.iter().enumerate() {
            if !eligible(i) {
                continue;
            }
            let weight = i64::from(server.weight);
            current[i] += weight;
            total += weight;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        current[best] -= total;
        Some(best)
    }
}

/// Fewest requests in flight relative to weight; ties rotate.
#[derive(Default)]
struct LeastConn {
    next: AtomicUsize,
}

impl Balancer for LeastConn {
    fn pick(&self, servers: &[Arc<Server>], _: &PickContext, eligible: Eligible) -> Option<usize> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..servers.len())
            .map(|offset| (start + offset) % servers.len())
            .filter(|&i| eligible(i))
            .min_by(|&a, &b| load(&servers[a]).total_cmp(&load(&servers[b])))
    }
}

fn load(server: &Server) -> f64 {
    server.active_requests() as f64 / f64::from(server.weight)
}

/// Two random available servers, the less loaded of them. Close to
/// least-connections without scanning every server.
struct PowerOfTwo;

impl Balancer for PowerOfTwo {
    fn pick(
        &self,
        servers: &[Arc<Server>],
        context: &PickContext,
        eligible: Eligible,
    ) -> Option<usize> {
        let mut rng = rand::rng();
        let n = servers.len();
        if n == 0 {
            return None;
        }
        let a = rng.random_range(0..n);
        let b = if n > 1 {
            (a + rng.random_range(1..n)) % n
        } else {
            a
        };
        match (eligible(a), eligible(b)) {
            (true, true) => Some(if load(&servers[b]) < load(&servers[a]) {
                b
            } else {
                a
            }),
            (true, false) => Some(a),
            (false, true) => Some(b),
            (false, false) => LeastConn::default().pick(servers, context, eligible),
        }
    }
}

/// Ketama-style consistent hashing: each server owns `100 × weight` points
/// on a ring; a key goes to the first point at or after its hash. Adding or
/// removing a server moves only the keys of its points.
struct HashRing {
    points: Vec<(u64, usize)>,
}

const POINTS_PER_WEIGHT: u32 = 100;

impl HashRing {
    fn new(servers: &[Arc<Server>]) -> Self {
        let total: u64 = servers.iter().map(|s| u64::from(s.weight)).sum();
        let mut points = Vec::with_capacity((total * u64::from(POINTS_PER_WEIGHT)) as usize);
        let mut name = Vec::with_capacity(128);
        for (index, server) in servers.iter().enumerate() {
            for replica in 0..server.weight.saturating_mul(POINTS_PER_WEIGHT) {
                // "ADDR-REPLICA": the point's name, the same on every node.
                name.clear();
                let _ = write!(name, "{}-{replica}", server.addr);
                points.push((hash_bytes(&name), index));
            }
        }
        points.sort_unstable();
        HashRing { points }
    }
}

impl Balancer for HashRing {
    fn pick(&self, _: &[Arc<Server>], context: &PickContext, eligible: Eligible) -> Option<usize> {
        let hash = context
            .key_hash
            .unwrap_or_else(|| hash_ip(context.client_ip));
        let start = self.points.partition_point(|&(point, _)| point < hash);
        let len = self.points.len();
        (0..len)
            .map(|offset| self.points[(start + offset) % len].1)
            .find(|&i| eligible(i))
    }
}

/// XXH3-64 (seed 0): a published algorithm that no toolchain or release
/// changes, so every node, whatever built it, sends a key to the same
/// server. (std's `DefaultHasher` promises no such thing.)
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// The hash of a client address: of its octets, an IPv4-mapped IPv6
/// address as the IPv4 address it is.
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => hash_bytes(&v4.octets()),
        IpAddr::V6(v6) => hash_bytes(&v6.octets()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Health;
    use super::*;
    use std::collections::HashMap;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use crate::config::ServerAddr;

    // Computed with the reference XXH3 (Python's xxhash 3.x) and the same
    // point names, independently of this code.
    const EXPECTED_HASH_OF_TETHER: u64 = 5_989_835_927_888_215_092;
    const EXPECTED_OWNERS: [usize; 16] = [3, 0, 1, 1, 3, 1, 1, 3, 3, 0, 0, 0, 3, 0, 2, 1];
    const EXPECTED_USER_42: usize = 1;

    fn servers(weights: &[u32]) -> Vec<Arc<Server>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let addr = SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16));
                Arc::new(Server::new(ServerAddr::Tcp(addr), w))
            })
            .collect()
    }

    fn context(ip: u8) -> PickContext {
        PickContext {
            client_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, ip)),
            key_hash: None,
        }
    }

    fn available(servers: &[Arc<Server>]) -> impl Fn(usize) -> bool + '_ {
        |i| servers[i].is_available()
    }

    fn sequence(balancer: &dyn Balancer, servers: &[Arc<Server>], n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| {
                balancer
                    .pick(servers, &context(1), &available(servers))
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn smooth_weighted_interleaves_like_nginx() {
        let s = servers(&[5, 1, 1]);
        let b = SmoothWeighted::new(3);
        assert_eq!(sequence(&b, &s, 7), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn every_policy_skips_down_servers_and_fails_when_all_are_down() {
        let s = servers(&[1, 2, 1]);
        for policy in [
            BalancePolicy::RoundRobin,
            BalancePolicy::WeightedRoundRobin,
            BalancePolicy::LeastConn,
            BalancePolicy::ConsistentHash(crate::config::HashKey::ClientIp),
            BalancePolicy::PowerOfTwo,
        ] {
            let b = for_policy(&policy, &s);
            s[1].set_health(Health::Unhealthy);
            let picks = sequence(b.as_ref(), &s, 50);
            assert!(!picks.contains(&1), "{policy:?} picked a down server");
            for server in &s {
                server.set_health(Health::Unhealthy);
            }
            assert_eq!(b.pick(&s, &context(1), &available(&s)), None, "{policy:?}");
            for server in &s {
                server.set_health(Health::Unknown);
            }
        }
    }

    #[test]
    fn consistent_hash_moves_only_the_removed_servers_keys() {
        let four = servers(&[1, 1, 1, 1]);
        let ring = HashRing::new(&four);
        let before: HashMap<u8, usize> = (0..=255)
            .map(|ip| {
                (
                    ip,
                    ring.pick(&four, &context(ip), &available(&four)).unwrap(),
                )
            })
            .collect();
        four[2].set_health(Health::Unhealthy);
        for ip in 0..=255u8 {
            let after = ring.pick(&four, &context(ip), &available(&four)).unwrap();
            if before[&ip] != 2 {
                assert_eq!(after, before[&ip], "key {ip} moved without reason");
            }
        }
        let owners: std::collections::HashSet<usize> = before.values().copied().collect();
        assert_eq!(owners.len(), 4, "256 keys should reach all four servers");
    }

    /// The ring's assignments are part of the product: nodes of different
    /// builds must agree, so a change of hash or point naming fails here.
    #[test]
    fn consistent_hash_assignments_are_fixed() {
        assert_eq!(hash_bytes(b"tether"), EXPECTED_HASH_OF_TETHER);
        let four = servers(&[1, 2, 1, 1]);
        let ring = HashRing::new(&four);
        let owners: Vec<usize> = (0..16)
            .map(|ip| ring.pick(&four, &context(ip), &available(&four)).unwrap())
            .collect();
        assert_eq!(owners, EXPECTED_OWNERS);
        let by_header = PickContext {
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            key_hash: Some(hash_bytes(b"user-42")),
        };
        assert_eq!(
            ring.pick(&four, &by_header, &available(&four)),
            Some(EXPECTED_USER_42)
        );
    }

    #[test]
    fn least_conn_prefers_the_idle_server() {
        let s = servers(&[1, 1]);
        let _busy = s[0].begin_request();
        let b = LeastConn::default();
        assert_eq!(sequence(&b, &s, 5), vec![1; 5]);
    }
}
