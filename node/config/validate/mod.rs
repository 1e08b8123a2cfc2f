//! Raw file types → validated `Config`, collecting every error on the way.
//!
//! Each section (and each listener and upstream) is deserialized on its own
//! so that one bad entry does not hide the errors of the others.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::HeaderName;
use serde::de::DeserializeOwned;
use serde_spanned::Spanned;
use toml::de::{DeValue, ValueDeserializer};

mod proxy;
mod tunnel;
mod upstream;

use super::error::{parse_document, KeyPath, Locator, Problem};
use super::raw::*;
use super::*;

const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_DRAIN_IDLE_GRACE: Duration = Duration::from_millis(500);
/// More worker threads than this is a typo, not a machine.
const MAX_WORKERS: u32 = 1024;
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);
const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// hyper refuses a smaller read buffer for HTTP/1.
const MIN_MAX_HEADER_BYTES: usize = 8192;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_MAX_IDLE_PER_SERVER: usize = 512;
const DEFAULT_RETRIES: u32 = 1;
const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;
const DEFAULT_EXPECT_STATUS: (u16, u16) = (200, 399);
const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
const DEFAULT_EJECTION: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);
const DEFAULT_MAX_EJECTED_PERCENT: u32 = 50;

// The documented range of every number a config holds (README, "Limits").
const WEIGHTS: std::ops::RangeInclusive<u32> = 1..=1000;
/// The sum of a consistent-hash upstream's weights (100 ring points each).
const MAX_HASH_RING_WEIGHT: u64 = 10_000;
const RETRIES: std::ops::RangeInclusive<u32> = 0..=10;
const MAX_IDLE_PER_SERVER: std::ops::RangeInclusive<usize> = 0..=65_536;
const RISE_FALL: std::ops::RangeInclusive<u32> = 1..=100;
const CONSECUTIVE_FAILURES: std::ops::RangeInclusive<u32> = 1..=1000;
const MAX_HEADER_BYTES: std::ops::RangeInclusive<usize> = MIN_MAX_HEADER_BYTES..=1024 * 1024;

const SECTIONS: &[&str] = &[
    "node",
    "control",
    "controller",
    "telemetry",
    "listener",
    "upstream",
    "tunnel",
];

/// `base_dir` is where relative file names point; `None` validates
/// without reading any file (`Config::parse_portable`).
pub fn parse(text: &str, base_dir: Option<&Path>) -> Result<Config, Vec<ConfigError>> {
    let root = parse_document(text)?;
    let locator = Locator::new(text, &root);
    let mut errors = Vec::new();
    let mut problems = Vec::new();
    let mut sections = Sections::default();
    for (key, value) in root.get_ref().iter() {
        let name = key.get_ref().as_ref();
        let path = KeyPath::root().key(name);
        match name {
            "node" => sections.node = decode(&locator, &path, value, &mut errors),
            "control" => sections.control = decode(&locator, &path, value, &mut errors),
            "controller" => sections.controller = decode(&locator, &path, value, &mut errors),
            "telemetry" => sections.telemetry = decode(&locator, &path, value, &mut errors),
            "listener" => sections.listeners = decode_array(&locator, &path, value, &mut errors),
            "tunnel" => sections.tunnels = decode_array(&locator, &path, value, &mut errors),
            "upstream" => {
                if let DeValue::Table(table) = value.get_ref() {
                    sections.upstream_names =
                        table.iter().map(|(k, _)| k.get_ref().to_string()).collect();
                }
                sections.upstreams = decode_table(&locator, &path, value, &mut errors);
            }
            _ => problems.push(Problem {
                path,
                message: format!(
                    "unknown section `{name}`, expected one of: {}",
                    SECTIONS.join(", ")
                ),
            }),
        }
    }
    let config = Validator {
        locator: &locator,
        problems: &mut problems,
        base_dir,
        upstream_names: std::mem::take(&mut sections.upstream_names),
        tunnel_targets: Vec::new(),
    }
    .config(sections);
    errors.extend(problems.into_iter().map(|p| locator.locate(p)));
    if errors.is_empty() {
        Ok(config)
    } else {
        errors.sort_by_key(|e| (e.line, e.column));
        Err(errors)
    }
}

#[derive(Default)]
struct Sections {
    node: Option<RawNode>,
    control: Option<RawControl>,
    controller: Option<RawController>,
    telemetry: Option<RawTelemetry>,
    listeners: Vec<(KeyPath, RawListener)>,
    tunnels: Vec<(KeyPath, RawTunnel)>,
    upstreams: Vec<(KeyPath, String, RawUpstream)>,
    /// Every name under [upstream], including entries that failed to
    /// decode, so a route naming one is not reported a second time.
    upstream_names: HashSet<String>,
}

/// Decodes one section or entry. serde stops at its first error, so on an
/// error the offending key is left out and the entry decoded again, until
/// it decodes: every bad value is reported at once, and the rest of the
/// entry is still validated (the config is refused all the same).
fn decode<T: DeserializeOwned>(
    locator: &Locator,
    path: &KeyPath,
    value: &Spanned<DeValue>,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    const MOST_ERRORS_PER_ENTRY: usize = 64;
    let attempt = |value: &Spanned<DeValue>| T::deserialize(ValueDeserializer::from(value.clone()));
    // The common case, a good entry, costs one copy; the copy that keys
    // are removed from is made only after an error.
    let mut error = match attempt(value) {
        Ok(decoded) => return Some(decoded),
        Err(error) => error,
    };
    let mut value = value.clone();
    let mut removed_any = false;
    for _ in 0..MOST_ERRORS_PER_ENTRY {
        // A required key we left out ourselves is not the user's error.
        if removed_any && error.message().starts_with("missing field") {
            return None;
        }
        errors.push(locator.locate_toml_error(path, &error));
        match error.span() {
            Some(span) if remove_entry_at(&mut value, span.start) => removed_any = true,
            _ => return None,
        }
        error = match attempt(&value) {
            Ok(decoded) => return Some(decoded),
            Err(error) => error,
        };
    }
    None
}

/// An optional section as validated: absent is fine (`Some(None)`), present
/// but invalid is not (`None`).
fn valid_section<T>(section: Option<Option<T>>) -> Option<Option<T>> {
    match section {
        None => Some(None),
        Some(Some(valid)) => Some(Some(valid)),
        Some(None) => None,
    }
}

/// Removes the table entry whose value holds byte offset `at` (the
/// innermost one); false when no entry does. Containers are searched
/// whatever their own span says: a `[header]` table's span covers only its
/// header line.
fn remove_entry_at(value: &mut Spanned<DeValue>, at: usize) -> bool {
    match value.get_mut() {
        DeValue::Table(table) => {
            let mut found = None;
            for (key, child) in table.iter_mut() {
                if remove_entry_at(child, at) {
                    return true;
                }
                if child.span().contains(&at) {
                    found = Some(key.clone());
                    break;
                }
            }
            found.is_some_and(|key| table.remove(&key).is_some())
        }
        DeValue::Array(items) => items.iter_mut().any(|item| remove_entry_at(item, at)),
        _ => false,
    }
}

fn decode_array<T: DeserializeOwned>(
    locator: &Locator,
    path: &KeyPath,
    value: &Spanned<DeValue>,
    errors: &mut Vec<ConfigError>,
) -> Vec<(KeyPath, T)> {
    let DeValue::Array(items) = value.get_ref() else {
        let message = format!("expected an array of tables (`[[{path}]]`)");
        errors.push(locator.error(path.to_string(), value.span(), message));
        return Vec::new();
    };
    items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| {
            let path = path.index(i);
            decode(locator, &path, item, errors).map(|raw| (path, raw))
        })
        .collect()
}

fn decode_table<T: DeserializeOwned>(
    locator: &Locator,
    path: &KeyPath,
    value: &Spanned<DeValue>,
    errors: &mut Vec<ConfigError>,
) -> Vec<(KeyPath, String, T)> {
    let DeValue::Table(table) = value.get_ref() else {
        let message = format!("expected a table of named entries (`[{path}.NAME]`)");
        errors.push(locator.error(path.to_string(), value.span(), message));
        return Vec::new();
    };
    table
        .iter()
        .filter_map(|(key, item)| {
            let name = key.get_ref().to_string();
            let path = path.key(&name);
            decode(locator, &path, item, errors).map(|raw| (path, name, raw))
        })
        .collect()
}

struct Validator<'a> {
    /// Places kept with the validated config (`ListenerLocation`).
    locator: &'a Locator<'a>,
    problems: &'a mut Vec<Problem>,
    /// `None`: file names are checked for shape only, never opened.
    base_dir: Option<&'a Path>,
    upstream_names: HashSet<String>,
    /// Every `tunnel:NODE/SERVICE` server, checked against the tunnel
    /// listeners once they are validated.
    tunnel_targets: Vec<(KeyPath, TunnelTarget)>,
}

impl Validator<'_> {
    fn problem(&mut self, path: KeyPath, message: impl Into<String>) {
        self.problems.push(Problem {
            path,
            message: message.into(),
        });
    }

    /// Whether `value` is in its documented range; a problem if not.
    fn in_range<T: PartialOrd + std::fmt::Display>(
        &mut self,
        path: KeyPath,
        value: T,
        range: std::ops::RangeInclusive<T>,
    ) -> bool {
        if range.contains(&value) {
            return true;
        }
        let message = format!(
            "{value} is out of range: write {} to {}",
            range.start(),
            range.end()
        );
        self.problem(path, message);
        false
    }

    /// Whether a timeout is more than zero; a problem if not.
    fn positive(&mut self, path: KeyPath, value: Duration) -> bool {
        if !value.is_zero() {
            return true;
        }
        self.problem(path, "must be more than 0");
        false
    }

    fn config(&mut self, sections: Sections) -> Config {
        let node = self.node(sections.node.unwrap_or_default());
        let control = self.control(sections.control.unwrap_or_default());
        let controller = sections.controller.and_then(|raw| self.controller(raw));
        let telemetry = self.telemetry(sections.telemetry.unwrap_or_default());
        let upstreams: BTreeMap<String, UpstreamConfig> = sections
            .upstreams
            .into_iter()
            .filter_map(|(path, name, raw)| {
                let upstream = self.upstream(&path, name.clone(), raw)?;
                Some((name, upstream))
            })
            .collect();
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        let listeners = sections
            .listeners
            .into_iter()
            .filter_map(|(path, raw)| {
                let listener = self.listener(&path, raw, &upstreams)?;
                if !names.insert(listener.name.clone()) {
                    let message = format!("listener name {:?} is used twice", listener.name);
                    self.problem(path.key("name"), message);
                }
                // Port 0 asks for any free port: each such listener gets its own.
                let ephemeral =
                    matches!(listener.listen, ListenAddr::Tcp(addr) if addr.port() == 0);
                if !ephemeral && !addresses.insert(listener.listen.clone()) {
                    let message =
                        format!("address {} is used by another listener", listener.listen);
                    self.problem(path.key("listen"), message);
                }
                Some(listener)
            })
            .collect::<Vec<_>>();
        self.check_tunnel_targets(&listeners);
        let tunnels = self.tunnels(sections.tunnels, &node.id);
        Config {
            node,
            control,
            controller,
            telemetry,
            listeners,
            upstreams,
            tunnels,
        }
    }

    fn node(&mut self, raw: RawNode) -> NodeSettings {
        let id = raw.id.unwrap_or_else(hostname);
        if id.trim().is_empty() {
            self.problem(
                KeyPath::root().key("node").key("id"),
                "node id must not be empty",
            );
        }
        let workers = match raw.workers {
            Some(workers) => {
                let path = KeyPath::root().key("node").key("workers");
                self.in_range(path, workers, 1..=MAX_WORKERS);
                workers.clamp(1, MAX_WORKERS) as usize
            }
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        NodeSettings {
            id,
            workers,
            drain_timeout: raw.drain_timeout.map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.0),
            drain_idle_grace: raw
                .drain_idle_grace
                .map_or(DEFAULT_DRAIN_IDLE_GRACE, |d| d.0),
        }
    }

    fn control(&mut self, raw: RawControl) -> ControlSettings {
        let path = KeyPath::root().key("control").key("listen");
        let text = raw.listen.as_deref().unwrap_or(DEFAULT_CONTROL_LISTEN);
        let listen = self.socket_addr(&path, text).unwrap_or_else(|| {
            DEFAULT_CONTROL_LISTEN
                .parse()
                .expect("default control address")
        });
        let tls = raw.tls.and_then(|tls| {
            let tls_path = KeyPath::root().key("control").key("tls");
            let cert = self.read_pem(&tls_path.key("cert"), &tls.cert, pem::Expect::Certificates);
            let key = self.read_pem(&tls_path.key("key"), &tls.key, pem::Expect::PrivateKey);
            let ca = self.read_pem(
                &tls_path.key("client_ca"),
                &tls.client_ca,
                pem::Expect::Certificates,
            );
            Some(ControlTls {
                cert_pem: cert?,
                key_pem: key?,
                client_ca_pem: ca?,
            })
        });
        if !listen.ip().is_loopback() && tls.is_none() {
            self.problem(
                path,
                format!(
                    "control listen address {listen} is not loopback: off loopback the control \
                     service requires mTLS; add [control.tls] with cert, key and client_ca, or \
                     bind it to 127.0.0.1"
                ),
            );
        }
        ControlSettings { listen, tls }
    }

    fn listener_tls(&mut self, path: &KeyPath, raw: RawListenerTls) -> Option<TlsSettings> {
        // An error here does not stop the checks below: every error at once.
        let min_version = match raw.min_version.as_deref() {
            None | Some("1.2") => Some(TlsVersion::V1_2),
            Some("1.3") => Some(TlsVersion::V1_3),
            Some(other) => {
                self.problem(
                    path.key("min_version"),
                    format!("invalid TLS version {other:?}: write \"1.2\" or \"1.3\""),
                );
                None
            }
        };
        if raw.certificate.is_empty() {
            self.problem(
                path.clone(),
                "add at least one [[listener.tls.certificate]] with cert and key",
            );
            return None;
        }
        let mut certificates = Vec::new();
        for (i, certificate) in raw.certificate.into_iter().enumerate() {
            let path = path.key("certificate").index(i);
            let names: Vec<HostPattern> = certificate
                .names
                .iter()
                .enumerate()
                .filter_map(|(n, name)| self.host_pattern(&path.key("names").index(n), name))
                .collect();
            let chain = self.read_pem(
                &path.key("cert"),
                &certificate.cert,
                pem::Expect::Certificates,
            );
            let key = self.read_pem(&path.key("key"), &certificate.key, pem::Expect::PrivateKey);
            let (Some(chain_pem), Some(key_pem)) = (chain, key) else {
                continue;
            };
            // Parsed once here and served from the result: the listener's
            // acceptor does not read the PEM again.
            let certified = match self.base_dir {
                None => None,
                Some(_) => match crate::pki::certified_key(&chain_pem, &key_pem) {
                    Ok(certified) => Some(std::sync::Arc::new(certified)),
                    Err(message) => {
                        self.problem(path.key("key"), message.to_string());
                        continue;
                    }
                },
            };
            certificates.push(CertificateConfig {
                names,
                chain_pem,
                key_pem,
                certified,
            });
        }
        Some(TlsSettings {
            min_version: min_version?,
            certificates,
        })
    }

    /// Reads a PEM file (relative to the config's directory) and checks
    /// that it holds what it should.
    fn read_pem(&mut self, path: &KeyPath, file: &str, expect: pem::Expect) -> Option<Vec<u8>> {
        let Some(base_dir) = self.base_dir else {
            return Some(Vec::new());
        };
        let full = base_dir.join(file);
        match std::fs::read(&full) {
            Ok(bytes) => match pem::check(&bytes, expect) {
                Ok(()) => Some(bytes),
                Err(message) => {
                    self.problem(path.clone(), format!("{}: {message}", full.display()));
                    None
                }
            },
            Err(e) => {
                self.problem(path.clone(), format!("cannot read {}: {e}", full.display()));
                None
            }
        }
    }

    fn socket_addr(&mut self, path: &KeyPath, text: &str) -> Option<SocketAddr> {
        match text.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                let message = format!(
                    "invalid socket address {text:?}: write IP:PORT, e.g. \"127.0.0.1:8080\" or \"[::1]:8080\""
                );
                self.problem(path.clone(), message);
                None
            }
        }
    }

    fn listener(
        &mut self,
        path: &KeyPath,
        mut raw: RawListener,
        upstreams: &BTreeMap<String, UpstreamConfig>,
    ) -> Option<ListenerConfig> {
        if raw.name.trim().is_empty() {
            self.problem(path.key("name"), "listener name must not be empty");
        }
        let listen = match raw.listen.strip_prefix("unix:") {
            Some("") => {
                self.problem(
                    path.key("listen"),
                    "write a socket path after `unix:`, e.g. \"unix:/run/tether/web.sock\"",
                );
                None
            }
            Some(socket) => Some(ListenAddr::Unix(self.path(socket))),
            None => self
                .socket_addr(&path.key("listen"), &raw.listen)
                .map(ListenAddr::Tcp),
        };
        let protocol = match raw.protocol {
            RawProtocol::Http => Protocol::Http,
            RawProtocol::Https => Protocol::Https,
            RawProtocol::Tcp => Protocol::Tcp,
            RawProtocol::Forward => Protocol::Forward,
            RawProtocol::Socks5 => Protocol::Socks5,
            RawProtocol::Tunnel => Protocol::Tunnel,
        };
        let tunnel = self.tunnel_listener(path, protocol, raw.tunnel.take());
        let proxy_protocol = matches!(protocol, Protocol::Forward | Protocol::Socks5);
        let tcp = self.tcp_settings(path, protocol, &raw, upstreams);
        if raw.route.is_empty() && matches!(protocol, Protocol::Http | Protocol::Https) {
            self.problem(
                path.clone(),
                "listener has no routes: add at least one [[listener.route]]",
            );
        }
        if !raw.route.is_empty() && !matches!(protocol, Protocol::Http | Protocol::Https) {
            self.problem(
                path.key("route"),
                format!("a {} listener has no routes", protocol.as_str()),
            );
        }
        if raw.proxy.is_some() && !proxy_protocol {
            self.problem(
                path.key("proxy"),
                "[listener.proxy] applies only to protocol = \"forward\" or \"socks5\"",
            );
        }
        let proxy = if proxy_protocol {
            Some(self.proxy_settings(
                &path.key("proxy"),
                raw.proxy.take().unwrap_or_default(),
                raw.idle_timeout,
            )?)
        } else {
            None
        };
        let mut seen = HashSet::new();
        let routes: Vec<RouteConfig> = raw
            .route
            .into_iter()
            .enumerate()
            .filter_map(|(i, route)| {
                let path = path.key("route").index(i);
                let route = self.route(&path, route, upstreams)?;
                if !seen.insert((route.host.clone(), route.path_prefix.clone())) {
                    self.problem(
                        path,
                        "another route of this listener has the same host and path",
                    );
                }
                Some(route)
            })
            .collect();
        let max_header_bytes = raw.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES);
        let mut ok = self.in_range(
            path.key("max_header_bytes"),
            max_header_bytes,
            MAX_HEADER_BYTES,
        );
        let header_read_timeout = raw
            .header_read_timeout
            .map_or(DEFAULT_HEADER_READ_TIMEOUT, |d| d.0);
        ok &= self.positive(path.key("header_read_timeout"), header_read_timeout);
        let tls = match (protocol, raw.tls) {
            (Protocol::Https | Protocol::Tcp | Protocol::Tunnel, Some(tls)) => {
                Some(self.listener_tls(&path.key("tls"), tls))
            }
            (Protocol::Tunnel, None) => {
                self.problem(
                    path.key("protocol"),
                    "protocol = \"tunnel\" needs [listener.tls] with the public node's [[listener.tls.certificate]]",
                );
                Some(None)
            }
            (Protocol::Https, None) => {
                self.problem(
                    path.key("protocol"),
                    "protocol = \"https\" needs [listener.tls] with at least one [[listener.tls.certificate]]",
                );
                Some(None)
            }
            (_, Some(_)) => {
                self.problem(
                    path.key("tls"),
                    "[listener.tls] applies only to protocol = \"https\", \"tcp\" or \"tunnel\"",
                );
                Some(None)
            }
            (_, None) => None,
        };
        let access_log = self.access_log(path, raw.access_log, raw.access_log_format, protocol);
        if !ok {
            return None;
        }
        let tls = valid_section(tls)?;
        let tunnel = valid_section(tunnel)?;
        Some(ListenerConfig {
            tunnel,
            access_log,
            name: raw.name,
            listen: listen?,
            protocol,
            routes,
            http: HttpSettings {
                header_read_timeout,
                max_header_bytes,
                via: raw.via.unwrap_or(false),
            },
            tls,
            tcp: match protocol {
                Protocol::Tcp => Some(tcp?),
                _ => None,
            },
            proxy,
            location: ListenerLocation {
                entry: self.locator.location(path),
                listen: self.locator.location(&path.key("listen")),
            },
        })
    }

    /// `upstream` and `idle_timeout` belong to tcp listeners only.
    fn tcp_settings(
        &mut self,
        path: &KeyPath,
        protocol: Protocol,
        raw: &RawListener,
        upstreams: &BTreeMap<String, UpstreamConfig>,
    ) -> Option<TcpSettings> {
        if let Some(idle) = raw.idle_timeout {
            if matches!(protocol, Protocol::Http | Protocol::Https) {
                self.problem(
                    path.key("idle_timeout"),
                    "`idle_timeout` applies to tcp, forward and socks5 listeners; an HTTP listener's idle connections are bounded by header_read_timeout",
                );
            } else {
                self.positive(path.key("idle_timeout"), idle.0);
            }
        }
        if protocol != Protocol::Tcp {
            if raw.upstream.is_some() {
                self.problem(
                    path.key("upstream"),
                    "`upstream` applies only to protocol = \"tcp\"; HTTP listeners name upstreams in their routes",
                );
            }
            return None;
        }
        let Some(name) = &raw.upstream else {
            self.problem(path.clone(), "a tcp listener needs `upstream = \"NAME\"`");
            return None;
        };
        self.upstream_exists(&path.key("upstream"), name, upstreams)?;
        Some(TcpSettings {
            upstream: name.clone(),
            idle_timeout: raw.idle_timeout.map_or(DEFAULT_TCP_IDLE_TIMEOUT, |d| d.0),
        })
    }

    fn route(
        &mut self,
        path: &KeyPath,
        raw: RawRoute,
        upstreams: &BTreeMap<String, UpstreamConfig>,
    ) -> Option<RouteConfig> {
        let host = match raw.host.as_deref() {
            None => Some(HostPattern::Any),
            Some(text) => self.host_pattern(&path.key("host"), text),
        };
        let path_prefix = raw.path.unwrap_or_else(|| "/".to_owned());
        if !path_prefix.starts_with('/') {
            self.problem(
                path.key("path"),
                format!("path {path_prefix:?} must start with \"/\""),
            );
        }
        let action = match (raw.upstream, raw.static_files) {
            (Some(name), None) => {
                self.upstream_exists(&path.key("upstream"), &name, upstreams)?;
                RouteAction::Upstream(name)
            }
            (None, Some(files)) => {
                RouteAction::Static(self.static_files(&path.key("static"), files)?)
            }
            (Some(_), Some(_)) => {
                self.problem(
                    path.clone(),
                    "a route has either `upstream` or `static`, not both",
                );
                return None;
            }
            (None, None) => {
                self.problem(
                    path.clone(),
                    "a route needs `upstream = \"NAME\"` or `static = { root = \"DIR\" }`",
                );
                return None;
            }
        };
        Some(RouteConfig {
            host: host?,
            path_prefix,
            action,
        })
    }

    /// Whether `name` is a valid upstream. An upstream that is declared
    /// but invalid was reported at its own section, so not again here.
    fn upstream_exists(
        &mut self,
        path: &KeyPath,
        name: &str,
        upstreams: &BTreeMap<String, UpstreamConfig>,
    ) -> Option<()> {
        if upstreams.contains_key(name) {
            return Some(());
        }
        if !self.upstream_names.contains(name) {
            let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
            self.problem(
                path.clone(),
                format!(
                    "no upstream named {name:?}; defined upstreams: [{}]",
                    known.join(", ")
                ),
            );
        }
        None
    }

    fn host_pattern(&mut self, path: &KeyPath, text: &str) -> Option<HostPattern> {
        let lower = text.to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let valid_label = |label: &str| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || !name.split('.').all(valid_label) {
            self.problem(
                path.clone(),
                format!(
                    "invalid host {text:?}: write a name such as \"example.com\" or \"*.example.com\" (no port, `*` only as the first label)"
                ),
            );
            return None;
        }
        Some(if wildcard {
            HostPattern::Wildcard(format!(".{name}"))
        } else {
            HostPattern::Exact(name.to_owned())
        })
    }

    fn static_files(&mut self, path: &KeyPath, raw: RawStatic) -> Option<StaticConfig> {
        let index = raw.index.unwrap_or_else(|| "index.html".to_owned());
        if index.is_empty() || index.contains('/') || index == ".." {
            self.problem(
                path.key("index"),
                "index must be a plain file name such as \"index.html\"",
            );
        }
        let Some(base_dir) = self.base_dir else {
            let root = PathBuf::from(raw.root);
            return Some(StaticConfig { root, index });
        };
        let root = base_dir.join(&raw.root);
        let root = match root.canonicalize() {
            Ok(root) if root.is_dir() => root,
            Ok(_) => {
                self.problem(
                    path.key("root"),
                    format!("{:?} is not a directory", raw.root),
                );
                return None;
            }
            Err(e) => {
                self.problem(
                    path.key("root"),
                    format!(
                        "cannot open static root {:?}: {e}",
                        root.display().to_string()
                    ),
                );
                return None;
            }
        };
        Some(StaticConfig { root, index })
    }

    /// A file name from the config, relative to the config's directory.
    fn path(&self, name: &str) -> PathBuf {
        match self.base_dir {
            Some(base_dir) => base_dir.join(name),
            None => PathBuf::from(name),
        }
    }

    fn controller(&mut self, raw: RawController) -> Option<ControllerSettings> {
        let path = KeyPath::root().key("controller");
        let tls = raw.tls.map(|tls| {
            let tls_path = path.key("tls");
            let ca = self.read_pem(&tls_path.key("ca"), &tls.ca, pem::Expect::Certificates);
            let identity = match (tls.cert, tls.key) {
                (Some(cert), Some(key)) => {
                    let cert =
                        self.read_pem(&tls_path.key("cert"), &cert, pem::Expect::Certificates);
                    let key = self.read_pem(&tls_path.key("key"), &key, pem::Expect::PrivateKey);
                    cert.zip(key)
                }
                (None, None) => None,
                _ => {
                    self.problem(
                        tls_path.clone(),
                        "cert and key go together: set both or neither",
                    );
                    None
                }
            };
            ControllerTls {
                ca_pem: ca.unwrap_or_default(),
                identity,
            }
        });
        let texts = match &raw.url {
            RawUrls::One(url) => vec![(path.key("url"), url.clone())],
            RawUrls::Many(urls) if urls.is_empty() => {
                self.problem(path.key("url"), "give at least one controller url");
                Vec::new()
            }
            RawUrls::Many(urls) => urls
                .iter()
                .enumerate()
                .map(|(i, url)| (path.key("url").index(i), url.clone()))
                .collect(),
        };
        let mut urls = Vec::new();
        for (url_path, text) in texts {
            if let Some(url) = self.controller_url(url_path, &text, tls.is_some(), raw.insecure) {
                urls.push(url);
            }
        }
        let mut labels = BTreeMap::new();
        if let (Some(file), Some(_)) = (&raw.labels_file, self.base_dir) {
            let full = self.path(file);
            match std::fs::read_to_string(&full) {
                Ok(text) => labels.extend(downward_api_labels(&text)),
                Err(e) => self.problem(
                    path.key("labels_file"),
                    format!("cannot read {}: {e}", full.display()),
                ),
            }
        }
        labels.extend(raw.labels);
        for key in labels.keys() {
            if key.is_empty() || key.contains([',', '=', ' ']) {
                self.problem(
                    path.key("labels").key(key),
                    "a label name is not empty and has no ',', '=' or space",
                );
            }
        }
        for (key, value) in &labels {
            if value.contains(',') {
                self.problem(path.key("labels").key(key), "a label value has no ','");
            }
        }
        let state_dir = self.path(raw.state_dir.as_deref().unwrap_or(DEFAULT_STATE_DIR));
        let report_interval = raw.report_interval.map_or(DEFAULT_REPORT_INTERVAL, |d| d.0);
        if report_interval < MIN_REPORT_INTERVAL {
            self.problem(
                path.key("report_interval"),
                "at least 100ms: every report is a message to the controller",
            );
        }
        if urls.is_empty() {
            return None;
        }
        Some(ControllerSettings {
            urls,
            labels,
            state_dir,
            report_interval,
            tls,
        })
    }
}

impl Validator<'_> {
    /// One controller url: http:// on loopback (or `insecure`), https://
    /// with TLS settings.
    fn controller_url(
        &mut self,
        path: KeyPath,
        text: &str,
        tls: bool,
        insecure: Option<bool>,
    ) -> Option<String> {
        let uri = match text.parse::<http::Uri>() {
            Ok(uri)
                if uri.host().is_some() && matches!(uri.scheme_str(), Some("http" | "https")) =>
            {
                uri
            }
            _ => {
                self.problem(
                    path,
                    format!(
                        "invalid controller url {text:?}: write http://HOST:PORT (loopback) or \
                         https://HOST:PORT with [controller.tls]"
                    ),
                );
                return None;
            }
        };
        let https = uri.scheme_str() == Some("https");
        if https && !tls {
            self.problem(
                path.clone(),
                "an https:// controller needs [controller.tls] with its ca",
            );
        }
        if !https && tls {
            self.problem(
                path.clone(),
                "[controller.tls] is set: write the url as https://",
            );
        }
        let host = uri.host().unwrap_or_default();
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !https && !loopback && insecure != Some(true) {
            self.problem(
                path,
                format!(
                    "a plaintext controller url must be on loopback, and {host} is not: \
                     use https:// with [controller.tls], or set insecure = true"
                ),
            );
        }
        Some(uri.to_string().trim_end_matches('/').to_owned())
    }
}

impl Validator<'_> {
    fn telemetry(&mut self, raw: RawTelemetry) -> TelemetrySettings {
        let path = KeyPath::root().key("telemetry");
        if let Some(endpoint) = &raw.otlp_endpoint {
            let valid = endpoint.parse::<http::Uri>().is_ok_and(|uri| {
                uri.host().is_some() && matches!(uri.scheme_str(), Some("http" | "https"))
            });
            if !valid {
                self.problem(
                    path.key("otlp_endpoint"),
                    format!("invalid OTLP endpoint {endpoint:?}: write http://HOST:4317"),
                );
            }
        }
        if let Some(ratio) = raw.trace_sample_ratio {
            if !(0.0..=1.0).contains(&ratio) {
                self.problem(
                    path.key("trace_sample_ratio"),
                    "a sampling ratio is between 0.0 and 1.0",
                );
            }
        }
        if let Some(interval) = raw.metrics_interval {
            self.positive(path.key("metrics_interval"), interval.0);
        }
        let prometheus = raw
            .prometheus
            .as_deref()
            .and_then(|text| self.socket_addr(&path.key("prometheus"), text));
        TelemetrySettings {
            otlp_endpoint: raw.otlp_endpoint,
            service_name: raw.service_name,
            trace_sample_ratio: raw.trace_sample_ratio,
            metrics_interval: raw.metrics_interval.map(|d| d.0),
            prometheus,
        }
    }

    fn access_log(
        &mut self,
        path: &KeyPath,
        destination: Option<String>,
        format: Option<String>,
        protocol: Protocol,
    ) -> Option<AccessLogSettings> {
        let format = match format.as_deref() {
            None | Some("combined") => AccessLogFormat::Combined,
            Some("json") => AccessLogFormat::Json,
            Some(other) => {
                self.problem(
                    path.key("access_log_format"),
                    format!("unknown access log format {other:?}: write \"combined\" or \"json\""),
                );
                AccessLogFormat::Combined
            }
        };
        let destination = match destination?.as_str() {
            "stdout" => AccessLogDestination::Stdout,
            "stderr" => AccessLogDestination::Stderr,
            "" => {
                self.problem(
                    path.key("access_log"),
                    "write \"stdout\", \"stderr\" or a file path",
                );
                return None;
            }
            file => AccessLogDestination::File(self.path(file)),
        };
        if !matches!(protocol, Protocol::Http | Protocol::Https) {
            self.problem(
                path.key("access_log"),
                "access logs are written by http and https listeners",
            );
        }
        Some(AccessLogSettings {
            destination,
            format,
        })
    }
}

/// Where a node keeps its last acknowledged config unless
/// `[controller] state_dir` says otherwise.
const DEFAULT_STATE_DIR: &str = "/var/lib/tether";

/// How often a node tells the controller how many answers it sent.
const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(5);
const MIN_REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// Parses the Kubernetes downward API labels file: `key="value"` lines.
fn downward_api_labels(text: &str) -> impl Iterator<Item = (String, String)> + '_ {
    text.lines().filter_map(|line| {
        let (key, value) = line.split_once('=')?;
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        Some((key.trim().to_owned(), value.replace("\\\"", "\"")))
    })
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // within it or truncates.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "tether-node".to_owned();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
