//! Where a forward or SOCKS5 client may go. Deny rules win; when there are
//! allow rules a destination must match one; a destination that resolves to
//! a private, loopback or link-local address needs an allow rule that names
//! it (by name or address). Names are resolved here and the checked
//! addresses are the ones connected to, so DNS cannot point around a rule.

use std::net::{IpAddr, SocketAddr};

use crate::config::{DestinationHost, DestinationRule, HostPattern, ProxySettings};

/// A destination as a client named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Name(String, u16),
    Addr(SocketAddr),
}

impl Destination {
    pub fn port(&self) -> u16 {
        match self {
            Destination::Name(_, port) => *port,
            Destination::Addr(addr) => addr.port(),
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Name(name, port) => write!(f, "{name}:{port}"),
            Destination::Addr(addr) => write!(f, "{addr}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The policy forbids it.
    Denied(String),
    /// The name does not resolve.
    Unresolvable(String),
    /// Allowed, but no address answered.
    Unreachable(String),
}

/// The addresses of `destination` the policy allows, in resolver order.
pub async fn resolve(
    settings: &ProxySettings,
    destination: &Destination,
) -> Result<Vec<SocketAddr>, Refusal> {
    let port = destination.port();
    let name = match destination {
        Destination::Name(name, _) => Some(name.to_ascii_lowercase()),
        Destination::Addr(_) => None,
    };
    let named = |rules: &[DestinationRule]| {
        name.as_deref().is_some_and(|name| {
            rules
                .iter()
                .any(|rule| port_matches(rule, port) && name_matches(&rule.host, name))
        })
    };
    if named(&settings.deny) {
        return Err(Refusal::Denied(format!("{destination} is denied")));
    }
    let allowed_by_name = named(&settings.allow);
    let addrs: Vec<SocketAddr> = match destination {
        Destination::Addr(addr) => vec![*addr],
        Destination::Name(name, port) => tokio::net::lookup_host((name.as_str(), *port))
            .await
            .map_err(|e| Refusal::Unresolvable(format!("{name}: {e}")))?
            .collect(),
    };
    let allowed: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|addr| {
            let ip = canonical(addr.ip());
            let by_ip = |rules: &[DestinationRule]| {
                rules
                    .iter()
                    .any(|rule| port_matches(rule, port) && ip_matches(&rule.host, ip))
            };
            if by_ip(&settings.deny) {
                return false;
            }
            if allowed_by_name || by_ip(&settings.allow) {
                return true;
            }
            settings.allow.is_empty() && is_public(ip)
        })
        .collect();
    if allowed.is_empty() {
        return Err(Refusal::Denied(format!(
            "{destination} is not an allowed destination"
        )));
    }
    Ok(allowed)
}

fn port_matches(rule: &DestinationRule, port: u16) -> bool {
    rule.port.is_none_or(|p| p == port)
}

fn name_matches(host: &DestinationHost, name: &str) -> bool {
    match host {
        DestinationHost::Name(HostPattern::Exact(exact)) => exact == name,
        DestinationHost::Name(HostPattern::Wildcard(suffix)) => name.ends_with(suffix.as_str()),
        DestinationHost::Name(HostPattern::Any) => true,
        DestinationHost::Network(..) => false,
    }
}

fn ip_matches(host: &DestinationHost, ip: IpAddr) -> bool {
    let DestinationHost::Network(network, bits) = host else {
        return false;
    };
    match (canonical(*network), ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let mask = if *bits == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(*bits))
            };
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let mask = if *bits == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(*bits))
            };
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

/// IPv4-mapped IPv6 addresses are checked as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Not loopback, private, link-local, shared (CGNAT), unspecified or
/// multicast.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_loopback_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["203.0.113.7", "8.8.8.8", "2001:db8::1"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn networks_match_by_prefix() {
        let net = DestinationHost::Network("10.0.0.0".parse().unwrap(), 8);
        assert!(ip_matches(&net, "10.200.0.1".parse().unwrap()));
        assert!(!ip_matches(&net, "11.0.0.1".parse().unwrap()));
        assert!(ip_matches(
            &net,
            canonical("::ffff:10.0.0.1".parse().unwrap())
        ));
    }
}
