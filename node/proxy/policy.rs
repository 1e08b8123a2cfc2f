//! Where a forward or SOCKS5 client may go. Deny rules win; when there are
//! allow rules a destination must match one; a destination that resolves to
//! an address that is not globally reachable (loopback, private,
//! link-local, shared, documentation, reserved: IANA's special-purpose
//! registries), or to one of the node's own addresses, needs an allow rule
//! that names it (by name or address). Names are normalized before they
//! are matched (case, a trailing dot) and resolved here, and the checked
//! addresses are the ones connected to, so DNS cannot point around a rule.
//! IPv6 addresses that stand for or carry an IPv4 address (mapped,
//! IPv4-compatible, NAT64, 6to4, Teredo) are checked as that IPv4 address
//! too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{DestinationHost, DestinationRule, HostPattern, ProxySettings};

/// A destination as a client named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A host name, normalized by `Destination::parse`.
    Name(String, u16),
    Addr(SocketAddr),
}

impl Destination {
    /// The destination a client named as `host` (a name, an IP address, or
    /// an IPv6 address in brackets). A name is lowercased and loses a
    /// trailing dot, so `Secret.Test.` is `secret.test` to every rule; it
    /// must be ASCII (an internationalized name in its `xn--` form), which
    /// is what a resolver looks up. `None`: not a host.
    pub fn parse(host: &str, port: u16) -> Option<Destination> {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let bare = bare.strip_suffix('.').unwrap_or(bare);
        if let Ok(ip) = bare.parse() {
            return Some(Destination::Addr(SocketAddr::new(ip, port)));
        }
        let is_label = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if bare.is_empty() || bare.len() > 253 || !bare.split('.').all(is_label) {
            return None;
        }
        Some(Destination::Name(bare.to_ascii_lowercase(), port))
    }

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
        Destination::Name(name, _) => Some(name.as_str()),
        Destination::Addr(_) => None,
    };
    let named = |rules: &[DestinationRule]| {
        name.is_some_and(|name| {
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
            let ip = addr.ip();
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
            settings.allow.is_empty() && is_public(ip) && !is_own_address(ip)
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

/// Whether `ip`, or an IPv4 address it stands for or carries, is in the
/// rule's network. An IPv4 network is compared with IPv4 forms, an IPv6
/// network with IPv6 forms (an IPv4 address as `::ffff:a.b.c.d`).
fn ip_matches(host: &DestinationHost, ip: IpAddr) -> bool {
    let DestinationHost::Network(network, bits) = host else {
        return false;
    };
    match *network {
        IpAddr::V4(net) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(*bits)).unwrap_or(0);
            ipv4_forms(ip)
                .into_iter()
                .flatten()
                .any(|v4| u32::from(net) & mask == u32::from(v4) & mask)
        }
        IpAddr::V6(net) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(*bits)).unwrap_or(0);
            let v6 = match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            let canonical = match canonical(ip) {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            [v6, canonical]
                .iter()
                .any(|form| u128::from(net) & mask == u128::from(*form) & mask)
        }
    }
}

/// The IPv4 address an IPv6 address is only another spelling of:
/// IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`, deprecated)
/// and the well-known NAT64 prefix (`64:ff9b::/96`, RFC 6052).
fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let bits = u128::from(v6);
    let low = Ipv4Addr::from(bits as u32);
    let compatible = bits >> 32 == 0 && bits > 1;
    let nat64 = bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000;
    if compatible || nat64 {
        IpAddr::V4(low)
    } else {
        ip
    }
}

/// Every IPv4 address `ip` is or carries: itself (or its `canonical`
/// form), and for 6to4 (`2002::/16`, RFC 3056) and Teredo (`2001::/32`,
/// RFC 4380: the server, and the client XOR-obfuscated) the embedded ones.
fn ipv4_forms(ip: IpAddr) -> [Option<Ipv4Addr>; 3] {
    match canonical(ip) {
        IpAddr::V4(v4) => [Some(v4), None, None],
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let segments = v6.segments();
            if segments[0] == 0x2002 {
                [Some(Ipv4Addr::from((bits >> 80) as u32)), None, None]
            } else if segments[0] == 0x2001 && segments[1] == 0 {
                let server = Ipv4Addr::from((bits >> 64) as u32);
                let client = Ipv4Addr::from(!(bits as u32));
                [None, Some(server), Some(client)]
            } else {
                [None, None, None]
            }
        }
    }
}

/// Globally reachable: not in a range IANA's special-purpose address
/// registries mark as not globally reachable, and for IPv6 addresses that
/// carry an IPv4 address, that address globally reachable too.
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            is_public_v6(v6)
                && ipv4_forms(IpAddr::V6(v6))
                    .into_iter()
                    .flatten()
                    .all(is_public_v4)
        }
    }
}

fn is_public_v4(v4: Ipv4Addr) -> bool {
    let [a, b, c, _] = v4.octets();
    !(v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || v4.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast (deprecated)
        || (a == 198 && (b & 0xfe) == 18) // benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(v6: Ipv6Addr) -> bool {
    let s = v6.segments();
    !(v6.is_loopback()
        || v6.is_unspecified()
        || v6.is_multicast()
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // local-use NAT64
        || (s[0] == 0x100 && s[1] == 0 && s[2] == 0 && s[3] == 0) // discard-only
        || (s[0] == 0x2001 && s[1] < 0x200 && s[1] != 0) // IETF protocol assignments
        || (s[0] == 0x2001 && s[1] == 0xdb8) // documentation
        || (s[0] & 0xfff0) == 0x3ff0 // documentation (3fff::/20)
        || s[0] == 0x5f00 // segment routing SIDs
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0) // site-local (deprecated)
}

/// Whether `ip` is one of this machine's own addresses: a service bound to
/// 0.0.0.0 on the node's host must not be reachable through its proxies.
/// The interfaces are read at most once a second.
fn is_own_address(ip: IpAddr) -> bool {
    static OWN: Mutex<Option<(Instant, Vec<IpAddr>)>> = Mutex::new(None);
    let mut own = OWN.lock().unwrap_or_else(|e| e.into_inner());
    let stale = own
        .as_ref()
        .is_none_or(|(read, _)| read.elapsed() > Duration::from_secs(1));
    if stale {
        let addrs = if_addrs::get_if_addrs()
            .map(|interfaces| interfaces.iter().map(|i| i.ip()).collect())
            .unwrap_or_default();
        *own = Some((Instant::now(), addrs));
    }
    let ip = canonical(ip);
    own.as_ref()
        .is_some_and(|(_, addrs)| addrs.iter().any(|own| canonical(*own) == ip))
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
        for ip in ["93.184.215.14", "8.8.8.8", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn ipv6_forms_of_a_private_ipv4_address_are_not_public() {
        for ip in [
            "64:ff9b::a9fe:a9fe",                   // NAT64 of 169.254.169.254
            "64:ff9b::7f00:1",                      // NAT64 of 127.0.0.1
            "::10.0.0.1",                           // IPv4-compatible
            "::127.0.0.1",                          //
            "2002:a9fe:a9fe::1",                    // 6to4 of 169.254.169.254
            "2002:7f00:1::",                        // 6to4 of 127.0.0.1
            "2001:0:4136:e378:8000:63bf:f5ff:fffe", // Teredo, client 10.0.0.1
            "2001:0:a00:1::1",                      // Teredo, server 10.0.0.1
            "fec0::1",                              // site-local
            "64:ff9b:1::1",                         // local-use NAT64
            "100::1",                               // discard-only
            "2001:db8::1",                          // documentation
            "192.0.2.1",                            // TEST-NET-1
            "198.18.0.1",                           // benchmarking
            "240.0.0.1",                            // reserved
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        // The same forms around public IPv4 addresses are public.
        for ip in ["64:ff9b::808:808", "2002:808:808::1"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn rules_see_the_ipv4_address_inside_ipv6_forms() {
        let metadata = DestinationHost::Network("169.254.0.0".parse().unwrap(), 16);
        assert!(ip_matches(&metadata, "64:ff9b::a9fe:a9fe".parse().unwrap()));
        assert!(ip_matches(
            &metadata,
            "::ffff:169.254.169.254".parse().unwrap()
        ));
        assert!(ip_matches(&metadata, "2002:a9fe:a9fe::".parse().unwrap()));
    }

    #[test]
    fn ipv4_mapped_networks_with_short_prefixes_match() {
        let all_mapped = DestinationHost::Network("::ffff:0.0.0.0".parse().unwrap(), 96);
        assert!(ip_matches(&all_mapped, "10.1.2.3".parse().unwrap()));
        assert!(ip_matches(&all_mapped, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(!ip_matches(&all_mapped, "2606:4700::1".parse().unwrap()));
        let everything = DestinationHost::Network("::".parse().unwrap(), 0);
        assert!(ip_matches(&everything, "10.1.2.3".parse().unwrap()));
        let any_v4 = DestinationHost::Network("0.0.0.0".parse().unwrap(), 0);
        assert!(ip_matches(&any_v4, "10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn names_are_normalized_before_matching() {
        assert_eq!(
            Destination::parse("Secret.Test.", 443),
            Some(Destination::Name("secret.test".into(), 443))
        );
        assert_eq!(
            Destination::parse("127.0.0.1.", 80),
            Some(Destination::Addr("127.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            Destination::parse("[::1]", 80),
            Some(Destination::Addr("[::1]:80".parse().unwrap()))
        );
        for bad in ["", ".", "a..b", "exämple.com", "a b", "a/b"] {
            assert_eq!(Destination::parse(bad, 80), None, "{bad:?}");
        }
    }

    #[test]
    fn networks_match_by_prefix() {
        let net = DestinationHost::Network("10.0.0.0".parse().unwrap(), 8);
        assert!(ip_matches(&net, "10.200.0.1".parse().unwrap()));
        assert!(!ip_matches(&net, "11.0.0.1".parse().unwrap()));
        assert!(ip_matches(&net, "::ffff:10.0.0.1".parse().unwrap()));
    }

    /// Compared with what `ip` (iproute2) lists, not with the crate the
    /// check itself uses.
    #[test]
    fn the_machines_own_addresses_are_recognised() {
        let Ok(output) = std::process::Command::new("ip")
            .args(["-o", "addr"])
            .output()
        else {
            eprintln!("skipped: no `ip` command to list this machine's addresses");
            return;
        };
        let listed: Vec<IpAddr> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let mut words = line
                    .split_whitespace()
                    .skip_while(|w| !w.starts_with("inet"));
                words.nth(1)?.split('/').next()?.parse().ok()
            })
            .collect();
        assert!(!listed.is_empty());
        for ip in listed {
            assert!(is_own_address(ip), "{ip}");
        }
        assert!(!is_own_address("8.8.8.8".parse().unwrap()));
    }
}
