//! Validation of `[upstream.NAME]`: servers, balancing, TLS to the
//! servers, active and passive health checks.

use super::*;

impl Validator<'_> {
    pub(super) fn upstream(
        &mut self,
        path: &KeyPath,
        name: String,
        raw: RawUpstream,
    ) -> Option<UpstreamConfig> {
        if raw.servers.is_empty() {
            self.problem(path.key("servers"), "an upstream needs at least one server");
        }
        let mut seen = HashSet::new();
        let mut servers = Vec::with_capacity(raw.servers.len());
        let mut weights_ok = true;
        for (i, server) in raw.servers.into_iter().enumerate() {
            let path = path.key("servers").index(i);
            let weight = server.weight.unwrap_or(1);
            weights_ok &= self.in_range(path.key("weight"), weight, WEIGHTS);
            let addr = if let Some(target) = server.addr.strip_prefix("tunnel:") {
                match self.tunnel_target(&path.key("addr"), target) {
                    Some(target) => ServerAddr::Tunnel(target),
                    None => continue,
                }
            } else {
                match server.addr.strip_prefix("unix:") {
                    Some(socket) if !socket.is_empty() => ServerAddr::Unix(self.path(socket)),
                    _ => match self.socket_addr(&path.key("addr"), &server.addr) {
                        Some(addr) => ServerAddr::Tcp(addr),
                        None => continue,
                    },
                }
            };
            if !seen.insert(addr.clone()) {
                self.problem(path.key("addr"), format!("server {addr} is listed twice"));
            }
            servers.push(ServerConfig { addr, weight });
        }
        let balance = match (raw.balance, raw.hash_on.as_deref()) {
            (RawBalance::ConsistentHash, Some(key)) => {
                let ring_weight: u64 = servers.iter().map(|s| u64::from(s.weight)).sum();
                if weights_ok && ring_weight > MAX_HASH_RING_WEIGHT {
                    self.problem(
                        path.key("servers"),
                        format!("consistent_hash: the servers' weights add up to {ring_weight}, at most {MAX_HASH_RING_WEIGHT} (the ring holds 100 points per weight)"),
                    );
                }
                self.hash_key(&path.key("hash_on"), key)
                    .map(BalancePolicy::ConsistentHash)
            }
            (RawBalance::ConsistentHash, None) => {
                self.problem(
                    path.key("balance"),
                    "consistent_hash needs `hash_on = \"client_ip\"` or `hash_on = \"header:NAME\"`",
                );
                None
            }
            (_, Some(_)) => {
                self.problem(
                    path.key("hash_on"),
                    "hash_on applies only to balance = \"consistent_hash\"",
                );
                None
            }
            (RawBalance::RoundRobin, None) => Some(BalancePolicy::RoundRobin),
            (RawBalance::WeightedRoundRobin, None) => Some(BalancePolicy::WeightedRoundRobin),
            (RawBalance::LeastConn, None) => Some(BalancePolicy::LeastConn),
            (RawBalance::PowerOfTwo, None) => Some(BalancePolicy::PowerOfTwo),
        };
        // Each part is checked even when another failed: every error at once.
        let tls = raw.tls.map(|tls| self.upstream_tls(&path.key("tls"), tls));
        let health = raw.health.map(|health| {
            let tls = tls.as_ref().and_then(Option::as_ref);
            self.health_check(&path.key("health"), health, tls)
        });
        let tls_configured = tls.is_some();
        let protocol_ok = match (raw.protocol, tls_configured) {
            (RawUpstreamProtocol::H2, false) => {
                self.problem(path.key("protocol"), "protocol = \"h2\" is HTTP/2 over TLS: add [upstream.NAME.tls] (or use \"h2c\")");
                false
            }
            (RawUpstreamProtocol::H2c, true) => {
                self.problem(
                    path.key("protocol"),
                    "h2c is cleartext; with [upstream.NAME.tls] use protocol = \"h2\"",
                );
                false
            }
            _ => true,
        };
        let passive = raw
            .passive
            .map(|passive| self.passive_check(&path.key("passive"), passive));
        let retries = raw.retries.unwrap_or(DEFAULT_RETRIES);
        let mut ok = self.in_range(path.key("retries"), retries, RETRIES);
        let max_idle_per_server = raw
            .max_idle_per_server
            .unwrap_or(DEFAULT_MAX_IDLE_PER_SERVER);
        ok &= self.in_range(
            path.key("max_idle_per_server"),
            max_idle_per_server,
            MAX_IDLE_PER_SERVER,
        );
        let connect_timeout = raw.connect_timeout.map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0);
        ok &= self.positive(path.key("connect_timeout"), connect_timeout);
        let read_timeout = raw.read_timeout.map_or(DEFAULT_READ_TIMEOUT, |d| d.0);
        ok &= self.positive(path.key("read_timeout"), read_timeout);
        let idle_timeout = raw
            .idle_timeout
            .map_or(DEFAULT_UPSTREAM_IDLE_TIMEOUT, |d| d.0);
        ok &= self.positive(path.key("idle_timeout"), idle_timeout);
        if !ok || !protocol_ok {
            return None;
        }
        Some(UpstreamConfig {
            name,
            servers,
            balance: balance?,
            retries,
            all_down: match raw.all_down {
                Some(RawAllDown::TryAll) => AllDown::TryAll,
                Some(RawAllDown::Fail) | None => AllDown::Fail,
            },
            health: valid_section(health)?,
            passive: valid_section(passive)?,
            protocol: match raw.protocol {
                RawUpstreamProtocol::Http1 => UpstreamProtocol::Http1,
                RawUpstreamProtocol::H2c => UpstreamProtocol::H2c,
                RawUpstreamProtocol::H2 => UpstreamProtocol::H2,
            },
            tls: valid_section(tls)?,
            connect_timeout,
            read_timeout,
            idle_timeout,
            max_idle_per_server,
        })
    }

    fn upstream_tls(&mut self, path: &KeyPath, raw: RawUpstreamTls) -> Option<UpstreamTls> {
        let ca_pem = match &raw.ca {
            Some(ca) => Some(self.read_pem(&path.key("ca"), ca, pem::Expect::Certificates)?),
            None => None,
        };
        let client = match (&raw.cert, &raw.key) {
            (Some(cert), Some(key)) => {
                let chain = self.read_pem(&path.key("cert"), cert, pem::Expect::Certificates);
                let key = self.read_pem(&path.key("key"), key, pem::Expect::PrivateKey);
                let (chain, key) = (chain?, key?);
                if let Err(message) = crate::pki::certified_key(&chain, &key) {
                    self.problem(path.key("key"), message.to_string());
                    return None;
                }
                Some((chain, key))
            }
            (None, None) => None,
            _ => {
                self.problem(
                    path.clone(),
                    "a client certificate needs both `cert` and `key`",
                );
                return None;
            }
        };
        if let Some(name) = &raw.server_name {
            if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
                self.problem(
                    path.key("server_name"),
                    format!("invalid server name {name:?}"),
                );
                return None;
            }
        }
        let tls = UpstreamTls {
            ca_pem,
            server_name: raw.server_name,
            client,
        };
        if let Err(message) = tls.client_config() {
            self.problem(path.clone(), message.to_string());
            return None;
        }
        Some(tls)
    }

    /// `tls`: the upstream's TLS settings, which an http check with
    /// `tls = true` uses.
    fn health_check(
        &mut self,
        path: &KeyPath,
        raw: RawHealth,
        tls: Option<&UpstreamTls>,
    ) -> Option<HealthCheck> {
        let interval = raw.interval.map_or(DEFAULT_CHECK_INTERVAL, |d| d.0);
        let timeout = raw
            .timeout
            .map_or(DEFAULT_CHECK_TIMEOUT.min(interval), |d| d.0);
        let mut ok = true;
        if interval.is_zero() {
            self.problem(path.key("interval"), "interval must be more than 0");
            ok = false;
        }
        if timeout > interval || timeout.is_zero() {
            self.problem(
                path.key("timeout"),
                "timeout must be more than 0 and at most the interval",
            );
            ok = false;
        }
        for (key, value) in [("rise", raw.rise), ("fall", raw.fall)] {
            if let Some(value) = value {
                ok &= self.in_range(path.key(key), value, RISE_FALL);
            }
        }
        let http_keys = [
            ("method", raw.method.is_some()),
            ("path", raw.path.is_some()),
            ("host", raw.host.is_some()),
            ("expect_status", raw.expect_status.is_some()),
            ("expect_body", raw.expect_body.is_some()),
            ("tls", raw.tls.is_some()),
        ];
        let tcp_keys = [
            ("send", raw.send.is_some()),
            ("expect", raw.expect.is_some()),
        ];
        let (wrong_keys, kind_name): (&[(&str, bool)], &str) = match raw.kind {
            RawCheckType::Http => (&tcp_keys, "http"),
            RawCheckType::Tcp => (&http_keys, "tcp"),
        };
        for (key, present) in wrong_keys {
            if *present {
                self.problem(
                    path.key(key),
                    format!("`{key}` does not apply to type = \"{kind_name}\""),
                );
                ok = false;
            }
        }
        let kind = match raw.kind {
            RawCheckType::Http => {
                let method = raw.method.as_deref().unwrap_or("GET");
                let method = match http::Method::from_bytes(method.as_bytes()) {
                    Ok(method) => method,
                    Err(_) => {
                        self.problem(
                            path.key("method"),
                            format!("invalid HTTP method {method:?}"),
                        );
                        return None;
                    }
                };
                let check_path = raw.path.unwrap_or_else(|| "/".to_owned());
                if !check_path.starts_with('/') {
                    self.problem(
                        path.key("path"),
                        format!("path {check_path:?} must start with \"/\""),
                    );
                    ok = false;
                }
                let expect_status = match raw.expect_status {
                    None => vec![DEFAULT_EXPECT_STATUS],
                    Some(ranges) => {
                        let mut parsed = Vec::new();
                        for (i, range) in ranges.iter().enumerate() {
                            match parse_status_range(range) {
                                Some(range) => parsed.push(range),
                                None => {
                                    self.problem(
                                        path.key("expect_status").index(i),
                                        format!("invalid status range {range:?}: write \"200\", \"200-299\" or \"2xx\""),
                                    );
                                    ok = false;
                                }
                            }
                        }
                        parsed
                    }
                };
                let tls = match (raw.tls.unwrap_or(false), tls) {
                    (false, _) => None,
                    (true, Some(tls)) => Some(tls.clone()),
                    (true, None) => {
                        self.problem(path.key("tls"), "tls = true checks with the upstream's [upstream.NAME.tls] settings: add that section");
                        return None;
                    }
                };
                CheckKind::Http(HttpCheck {
                    method,
                    path: check_path,
                    host: raw.host,
                    expect_status,
                    expect_body: raw.expect_body,
                    tls,
                })
            }
            RawCheckType::Tcp => CheckKind::Tcp(TcpCheck {
                send: raw.send.map(String::into_bytes),
                expect: raw.expect.map(String::into_bytes),
            }),
        };
        ok.then_some(HealthCheck {
            kind,
            interval,
            timeout,
            rise: raw.rise.unwrap_or(DEFAULT_RISE),
            fall: raw.fall.unwrap_or(DEFAULT_FALL),
            jitter: raw.jitter.map_or(interval / 10, |d| d.0),
            initial: match raw.initial {
                Some(RawInitialHealth::Unhealthy) => InitialHealth::Unhealthy,
                Some(RawInitialHealth::Unknown) | None => InitialHealth::Unknown,
            },
        })
    }

    fn passive_check(&mut self, path: &KeyPath, raw: RawPassive) -> Option<PassiveCheck> {
        let check = PassiveCheck {
            consecutive_failures: raw
                .consecutive_failures
                .unwrap_or(DEFAULT_CONSECUTIVE_FAILURES),
            ejection: raw.ejection.map_or(DEFAULT_EJECTION, |d| d.0),
            max_ejection: raw.max_ejection.map_or(DEFAULT_MAX_EJECTION, |d| d.0),
            max_ejected_percent: raw
                .max_ejected_percent
                .unwrap_or(DEFAULT_MAX_EJECTED_PERCENT),
        };
        let mut ok = true;
        ok &= self.in_range(
            path.key("consecutive_failures"),
            check.consecutive_failures,
            CONSECUTIVE_FAILURES,
        );
        if check.max_ejection < check.ejection {
            self.problem(
                path.key("max_ejection"),
                "max_ejection must be at least ejection",
            );
            ok = false;
        }
        ok &= self.in_range(
            path.key("max_ejected_percent"),
            check.max_ejected_percent,
            0..=100,
        );
        ok.then_some(check)
    }

    fn hash_key(&mut self, path: &KeyPath, text: &str) -> Option<HashKey> {
        if text == "client_ip" {
            return Some(HashKey::ClientIp);
        }
        if let Some(name) = text.strip_prefix("header:") {
            if let Ok(name) = HeaderName::try_from(name) {
                return Some(HashKey::Header(name));
            }
        }
        self.problem(
            path.clone(),
            format!("invalid hash_on {text:?}: write \"client_ip\" or \"header:NAME\""),
        );
        None
    }
}

/// "200" → (200, 200); "200-299" → (200, 299); "2xx" → (200, 299).
fn parse_status_range(text: &str) -> Option<(u16, u16)> {
    let valid = |code: u16| (100..=599).contains(&code);
    let text = text.trim();
    if let Some(class) = text.strip_suffix("xx") {
        let class: u16 = class.parse().ok()?;
        return (1..=5)
            .contains(&class)
            .then_some((class * 100, class * 100 + 99));
    }
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (low.trim().parse().ok()?, high.trim().parse().ok()?),
        None => {
            let code = text.parse().ok()?;
            (code, code)
        }
    };
    (valid(low) && valid(high) && low <= high).then_some((low, high))
}
