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
use toml::de::{DeTable, DeValue, ValueDeserializer};

mod proxy;
mod upstream;

use super::error::{KeyPath, Locator, Problem};
use super::raw::*;
use super::*;

const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_DRAIN_IDLE_GRACE: Duration = Duration::from_millis(500);
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

const SECTIONS: &[&str] = &["node", "control", "listener", "upstream"];

pub fn parse(text: &str, base_dir: &Path) -> Result<Config, Vec<ConfigError>> {
    let (root, syntax_errors) = DeTable::parse_recoverable(text);
    let locator = Locator::new(text, &root);
    if !syntax_errors.is_empty() {
        return Err(syntax_errors
            .iter()
            .map(|e| locator.locate_toml_error(&KeyPath::root(), e))
            .collect());
    }
    let mut errors = Vec::new();
    let mut problems = Vec::new();
    let mut sections = Sections::default();
    for (key, value) in root.get_ref().iter() {
        let name = key.get_ref().as_ref();
        let path = KeyPath::root().key(name);
        match name {
            "node" => sections.node = decode(&locator, &path, value, &mut errors),
            "control" => sections.control = decode(&locator, &path, value, &mut errors),
            "listener" => sections.listeners = decode_array(&locator, &path, value, &mut errors),
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
        problems: &mut problems,
        base_dir,
        upstream_names: std::mem::take(&mut sections.upstream_names),
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
    listeners: Vec<(KeyPath, RawListener)>,
    upstreams: Vec<(KeyPath, String, RawUpstream)>,
    /// Every name under [upstream], including entries that failed to
    /// decode, so a route naming one is not reported a second time.
    upstream_names: HashSet<String>,
}

fn decode<T: DeserializeOwned>(
    locator: &Locator,
    path: &KeyPath,
    value: &Spanned<DeValue>,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    T::deserialize(ValueDeserializer::from(value.clone()))
        .map_err(|e| errors.push(locator.locate_toml_error(path, &e)))
        .ok()
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
    problems: &'a mut Vec<Problem>,
    base_dir: &'a Path,
    upstream_names: HashSet<String>,
}

impl Validator<'_> {
    fn problem(&mut self, path: KeyPath, message: impl Into<String>) {
        self.problems.push(Problem {
            path,
            message: message.into(),
        });
    }

    fn config(&mut self, sections: Sections) -> Config {
        let node = self.node(sections.node.unwrap_or_default());
        let control = self.control(sections.control.unwrap_or_default());
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
            .collect();
        Config {
            node,
            control,
            listeners,
            upstreams,
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
        NodeSettings {
            id,
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
        let min_version = match raw.min_version.as_deref() {
            None | Some("1.2") => TlsVersion::V1_2,
            Some("1.3") => TlsVersion::V1_3,
            Some(other) => {
                self.problem(
                    path.key("min_version"),
                    format!("invalid TLS version {other:?}: write \"1.2\" or \"1.3\""),
                );
                return None;
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
            if let Err(message) = crate::tls::certified_key(&chain_pem, &key_pem) {
                self.problem(path.key("key"), message);
                continue;
            }
            certificates.push(CertificateConfig {
                names,
                chain_pem,
                key_pem,
            });
        }
        Some(TlsSettings {
            min_version,
            certificates,
        })
    }

    /// Reads a PEM file (relative to the config's directory) and checks
    /// that it holds what it should.
    fn read_pem(&mut self, path: &KeyPath, file: &str, expect: pem::Expect) -> Option<Vec<u8>> {
        let full = self.base_dir.join(file);
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
            Some(socket) => Some(ListenAddr::Unix(self.base_dir.join(socket))),
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
        };
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
        if max_header_bytes < MIN_MAX_HEADER_BYTES {
            self.problem(
                path.key("max_header_bytes"),
                format!("max_header_bytes must be at least {MIN_MAX_HEADER_BYTES}"),
            );
        }
        let tls = match (protocol, raw.tls) {
            (Protocol::Https | Protocol::Tcp, Some(tls)) => {
                Some(self.listener_tls(&path.key("tls"), tls)?)
            }
            (Protocol::Https, None) => {
                self.problem(
                    path.key("protocol"),
                    "protocol = \"https\" needs [listener.tls] with at least one [[listener.tls.certificate]]",
                );
                return None;
            }
            (_, Some(_)) => {
                self.problem(
                    path.key("tls"),
                    "[listener.tls] applies only to protocol = \"https\" or \"tcp\"",
                );
                return None;
            }
            (_, None) => None,
        };
        Some(ListenerConfig {
            name: raw.name,
            listen: listen?,
            protocol,
            routes,
            http: HttpSettings {
                header_read_timeout: raw
                    .header_read_timeout
                    .map_or(DEFAULT_HEADER_READ_TIMEOUT, |d| d.0),
                max_header_bytes,
                via: raw.via.unwrap_or(false),
            },
            tls,
            tcp: match protocol {
                Protocol::Tcp => Some(tcp?),
                _ => None,
            },
            proxy,
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
        if protocol != Protocol::Tcp {
            for (key, present) in [
                ("upstream", raw.upstream.is_some()),
                ("idle_timeout", raw.idle_timeout.is_some()),
            ] {
                if present {
                    self.problem(
                        path.key(key),
                        format!("`{key}` applies only to protocol = \"tcp\"; HTTP listeners name upstreams in their routes"),
                    );
                }
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
        let root = self.base_dir.join(&raw.root);
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
        let index = raw.index.unwrap_or_else(|| "index.html".to_owned());
        if index.is_empty() || index.contains('/') || index == ".." {
            self.problem(
                path.key("index"),
                "index must be a plain file name such as \"index.html\"",
            );
        }
        Some(StaticConfig { root, index })
    }
}

fn hostname() -> String {
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
