//! Validation of reverse tunnels: `[[tunnel]]` on a node behind NAT, the
//! `protocol = "tunnel"` listener of a public node, and the
//! `tunnel:NODE/SERVICE` servers that reach through it.

use super::*;

const DEFAULT_TUNNEL_KEEPALIVE: Duration = Duration::from_secs(10);
const DEFAULT_TUNNEL_MAX_BACKOFF: Duration = Duration::from_secs(10);
const TUNNEL_CONNECTIONS: std::ops::RangeInclusive<u32> = 1..=16;
/// Node ids and service names travel in the tunnel's handshake and as an
/// HTTP/2 authority: one DNS-label-like word.
const MAX_NAME_LEN: usize = 63;

/// Whether `name` is a word a tunnel can carry: letters, digits, `-`,
/// `_` and `.`, at most 63 of them.
pub fn tunnel_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Validator<'_> {
    fn tunnel_word(&mut self, path: KeyPath, name: &str, what: &str) -> bool {
        if tunnel_name_ok(name) {
            return true;
        }
        self.problem(
            path,
            format!(
                "invalid {what} {name:?}: write 1 to {MAX_NAME_LEN} letters, digits, `-`, `_` or `.`"
            ),
        );
        false
    }

    /// `NODE/SERVICE` after `tunnel:` in a server address.
    pub(super) fn tunnel_target(&mut self, path: &KeyPath, text: &str) -> Option<TunnelTarget> {
        let Some((node, service)) = text.split_once('/') else {
            self.problem(
                path.clone(),
                format!("invalid tunnel address \"tunnel:{text}\": write \"tunnel:NODE/SERVICE\""),
            );
            return None;
        };
        let node_ok = self.tunnel_word(path.clone(), node, "node id");
        let service_ok = self.tunnel_word(path.clone(), service, "service name");
        if !(node_ok && service_ok) {
            return None;
        }
        let target = TunnelTarget {
            node: node.to_owned(),
            service: service.to_owned(),
        };
        self.tunnel_targets.push((path.clone(), target.clone()));
        Some(target)
    }

    /// `[listener.tunnel]`: required by and only for `protocol = "tunnel"`.
    /// As `valid_section` takes it: `None` when absent, `Some(None)` when
    /// invalid.
    pub(super) fn tunnel_listener(
        &mut self,
        path: &KeyPath,
        protocol: Protocol,
        raw: Option<RawTunnelListener>,
    ) -> Option<Option<TunnelListenerSettings>> {
        let path = path.key("tunnel");
        let raw = match (protocol, raw) {
            (Protocol::Tunnel, Some(raw)) => raw,
            (Protocol::Tunnel, None) => {
                self.problem(
                    path,
                    "protocol = \"tunnel\" needs [listener.tunnel] with client_ca and at least one [[listener.tunnel.peer]]",
                );
                return Some(None);
            }
            (_, Some(_)) => {
                self.problem(
                    path,
                    "[listener.tunnel] applies only to protocol = \"tunnel\"",
                );
                return Some(None);
            }
            (_, None) => return None,
        };
        let client_ca = self.read_pem(
            &path.key("client_ca"),
            &raw.client_ca,
            pem::Expect::Certificates,
        );
        if raw.peer.is_empty() {
            self.problem(
                path.clone(),
                "add at least one [[listener.tunnel.peer]] with the node id that may dial in",
            );
        }
        let mut nodes = HashSet::new();
        let mut ok = true;
        let mut peers = Vec::with_capacity(raw.peer.len());
        for (i, peer) in raw.peer.into_iter().enumerate() {
            let path = path.key("peer").index(i);
            ok &= self.tunnel_word(path.key("node"), &peer.node, "node id");
            if !nodes.insert(peer.node.clone()) {
                self.problem(
                    path.key("node"),
                    format!("node {:?} is listed twice", peer.node),
                );
                ok = false;
            }
            let mut services = HashSet::new();
            for (s, service) in peer.services.iter().enumerate() {
                let path = path.key("services").index(s);
                ok &= self.tunnel_word(path.clone(), service, "service name");
                if !services.insert(service) {
                    self.problem(path, format!("service {service:?} is listed twice"));
                    ok = false;
                }
            }
            peers.push(TunnelPeer {
                node: peer.node,
                services: peer.services,
            });
        }
        let settings = client_ca
            .filter(|_| ok)
            .map(|client_ca_pem| TunnelListenerSettings {
                client_ca_pem,
                peers,
            });
        Some(settings)
    }

    /// Every `tunnel:NODE/SERVICE` server must be one a tunnel listener
    /// expects: a typo would otherwise wait forever for a tunnel.
    pub(super) fn check_tunnel_targets(&mut self, listeners: &[ListenerConfig]) {
        let offered: HashSet<(&str, &str)> = listeners
            .iter()
            .filter_map(|l| l.tunnel.as_ref())
            .flat_map(|t| &t.peers)
            .flat_map(|peer| {
                peer.services
                    .iter()
                    .map(|service| (peer.node.as_str(), service.as_str()))
            })
            .collect();
        let targets = std::mem::take(&mut self.tunnel_targets);
        for (path, target) in targets {
            if !offered.contains(&(target.node.as_str(), target.service.as_str())) {
                self.problem(
                    path,
                    format!(
                        "no tunnel listener expects service {:?} from node {:?}: add it to a \
                         [[listener.tunnel.peer]] of a protocol = \"tunnel\" listener",
                        target.service, target.node
                    ),
                );
            }
        }
    }

    pub(super) fn tunnels(
        &mut self,
        raw: Vec<(KeyPath, RawTunnel)>,
        node_id: &str,
    ) -> Vec<TunnelConfig> {
        if !raw.is_empty() && !tunnel_name_ok(node_id) {
            self.problem(
                KeyPath::root().key("node").key("id"),
                format!(
                    "node id {node_id:?} cannot dial a tunnel: write 1 to {MAX_NAME_LEN} letters, \
                     digits, `-`, `_` or `.`"
                ),
            );
        }
        let mut names = HashSet::new();
        raw.into_iter()
            .filter_map(|(path, raw)| {
                if !names.insert(raw.name.clone()) {
                    let message = format!("tunnel name {:?} is used twice", raw.name);
                    self.problem(path.key("name"), message);
                }
                self.tunnel(&path, raw)
            })
            .collect()
    }

    fn tunnel(&mut self, path: &KeyPath, raw: RawTunnel) -> Option<TunnelConfig> {
        let mut ok = self.tunnel_word(path.key("name"), &raw.name, "tunnel name");
        let host = match raw.connect.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
                Some(
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned(),
                )
            }
            _ => {
                self.problem(
                    path.key("connect"),
                    format!(
                        "invalid address {:?}: write HOST:PORT of the public node's tunnel listener",
                        raw.connect
                    ),
                );
                None
            }
        };
        let connections = raw.connections.unwrap_or(1);
        ok &= self.in_range(path.key("connections"), connections, TUNNEL_CONNECTIONS);
        let keepalive = raw.keepalive.map_or(DEFAULT_TUNNEL_KEEPALIVE, |d| d.0);
        ok &= self.positive(path.key("keepalive"), keepalive);
        let max_backoff = raw.max_backoff.map_or(DEFAULT_TUNNEL_MAX_BACKOFF, |d| d.0);
        ok &= self.positive(path.key("max_backoff"), max_backoff);
        let tls_path = path.key("tls");
        let ca = self.read_pem(&tls_path.key("ca"), &raw.tls.ca, pem::Expect::Certificates);
        let cert = self.read_pem(
            &tls_path.key("cert"),
            &raw.tls.cert,
            pem::Expect::Certificates,
        );
        let key = self.read_pem(&tls_path.key("key"), &raw.tls.key, pem::Expect::PrivateKey);
        if raw.service.is_empty() {
            self.problem(
                path.clone(),
                "a tunnel needs at least one [[tunnel.service]] with name and addr",
            );
            ok = false;
        }
        let mut seen = HashSet::new();
        let mut services = Vec::with_capacity(raw.service.len());
        for (i, service) in raw.service.into_iter().enumerate() {
            let path = path.key("service").index(i);
            ok &= self.tunnel_word(path.key("name"), &service.name, "service name");
            if !seen.insert(service.name.clone()) {
                self.problem(
                    path.key("name"),
                    format!("service {:?} is listed twice", service.name),
                );
                ok = false;
            }
            let addr = match service.addr.strip_prefix("unix:") {
                Some(socket) if !socket.is_empty() => Some(ServerAddr::Unix(self.path(socket))),
                _ => self
                    .socket_addr(&path.key("addr"), &service.addr)
                    .map(ServerAddr::Tcp),
            };
            match addr {
                Some(addr) => services.push(TunnelService {
                    name: service.name,
                    addr,
                }),
                None => ok = false,
            }
        }
        if !ok {
            return None;
        }
        Some(TunnelConfig {
            name: raw.name,
            server_name: raw.server_name.or(host)?,
            connect: raw.connect,
            connections: connections as usize,
            keepalive,
            max_backoff,
            ca_pem: ca?,
            cert_pem: cert?,
            key_pem: key?,
            services,
        })
    }
}
