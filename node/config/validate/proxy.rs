//! Validation of `[listener.proxy]` for forward and SOCKS5 listeners.

use super::*;

impl Validator<'_> {
    pub(super) fn proxy_settings(
        &mut self,
        path: &KeyPath,
        raw: RawProxy,
        idle: Option<super::duration::ConfigDuration>,
    ) -> Option<ProxySettings> {
        let mut ok = true;
        let mut rules = |key: &str,
                         texts: &[String],
                         validator: &mut Self|
         -> Vec<DestinationRule> {
            texts
                .iter()
                .enumerate()
                .filter_map(|(i, text)| match parse_destination_rule(text) {
                    Some(rule) => Some(rule),
                    None => {
                        validator.problem(
                            path.key(key).index(i),
                            format!("invalid destination {text:?}: write a host (\"example.com\", \"*.example.com\"), an address or network (\"10.0.0.0/8\"), optionally with :PORT"),
                        );
                        ok = false;
                        None
                    }
                })
                .collect()
        };
        let allow = rules("allow", &raw.allow, self);
        let deny = rules("deny", &raw.deny, self);
        for (i, user) in raw.users.iter().enumerate() {
            if user.name.is_empty()
                || user.name.len() > 255
                || user.password.is_empty()
                || user.password.len() > 255
            {
                self.problem(
                    path.key("users").index(i),
                    "user name and password must be 1 to 255 bytes",
                );
                ok = false;
            }
        }
        let connect_timeout = raw.connect_timeout.map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0);
        ok &= self.positive(path.key("connect_timeout"), connect_timeout);
        ok.then(|| ProxySettings {
            users: raw
                .users
                .into_iter()
                .map(|u| (u.name, u.password))
                .collect(),
            allow,
            deny,
            connect_timeout,
            idle_timeout: idle.map_or(DEFAULT_TCP_IDLE_TIMEOUT, |d| d.0),
        })
    }
}

/// "example.com", "*.example.com:443", "10.0.0.0/8", "[::1]:8080", "::1".
fn parse_destination_rule(text: &str) -> Option<DestinationRule> {
    let text = text.trim();
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        (host, port)
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') => (host, Some(port.parse().ok()?)),
            _ => (text, None),
        }
    };
    let host = if let Some((network, bits)) = host.split_once('/') {
        let network: std::net::IpAddr = network.parse().ok()?;
        let bits: u8 = bits.parse().ok()?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        (bits <= max).then_some(DestinationHost::Network(network, bits))?
    } else if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        DestinationHost::Network(ip, if ip.is_ipv4() { 32 } else { 128 })
    } else {
        // Matched against normalized destinations: lowercase, no trailing dot.
        let lower = host.to_ascii_lowercase();
        let lower = lower.strip_suffix('.').map(str::to_owned).unwrap_or(lower);
        let valid = |name: &str| {
            !name.is_empty()
                && name.split('.').all(|l| {
                    !l.is_empty()
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
        };
        match lower.strip_prefix("*.") {
            Some(suffix) if valid(suffix) => {
                DestinationHost::Name(HostPattern::Wildcard(format!(".{suffix}")))
            }
            None if valid(&lower) => DestinationHost::Name(HostPattern::Exact(lower)),
            _ => return None,
        }
    };
    Some(DestinationRule { host, port })
}
