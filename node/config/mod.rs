//! The node's configuration: a TOML file parsed into raw serde types
//! (`raw`), then validated into a `Config` that cannot hold an invalid state
//! (`validate`). Every error carries its key path and line:column.

mod duration;
mod error;
mod pem;
mod pushed;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;
use sha2::{Digest, Sha256};

pub use duration::{format_duration, parse_duration};
pub use error::{ConfigError, Location};
pub use pushed::{check_pushed, compose_pushed, NODE_LOCAL_SECTIONS};
pub use validate::hostname;

/// Where the control service listens unless `[control] listen` says otherwise.
pub const DEFAULT_CONTROL_LISTEN: &str = "127.0.0.1:8837";

/// A validated node config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub node: NodeSettings,
    pub control: ControlSettings,
    /// Set when the node takes its traffic config from a controller.
    pub controller: Option<ControllerSettings>,
    pub telemetry: TelemetrySettings,
    pub listeners: Vec<ListenerConfig>,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// `[[tunnel]]`: this node, behind NAT, dials public nodes.
    pub tunnels: Vec<TunnelConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeSettings {
    pub id: String,
    /// How long in-flight work of a retired generation may take.
    pub drain_timeout: Duration,
    /// How long a retired generation's idle keep-alive connection stays open
    /// for a request already on its way; that request is answered with
    /// `Connection: close`.
    pub drain_idle_grace: Duration,
    /// Threads serving connections, each with its own listening sockets and
    /// upstream pools (`[node] workers`; default: the CPUs the process may
    /// run on). Read when the node starts.
    pub workers: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ControlSettings {
    pub listen: SocketAddr,
    /// Required off loopback: clients must present a certificate signed by
    /// `client_ca`.
    pub tls: Option<ControlTls>,
}

/// PEM material for a gRPC server's mTLS (the control service, the
/// controller), read up front so a missing or unreadable file is reported
/// before anything listens.
#[derive(Clone, PartialEq, Eq)]
pub struct ControlTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Vec<u8>,
}

impl std::fmt::Debug for ControlTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("ControlTls").finish_non_exhaustive()
    }
}

/// `[controller]`: where the node subscribes for its traffic config.
#[derive(Debug, Clone, PartialEq)]
pub struct ControllerSettings {
    /// Each `http://` (loopback only) or `https://` with `tls`: replicas
    /// of one controller, tried in turn.
    pub urls: Vec<String>,
    /// From `labels_file` (the Kubernetes downward API format), then `labels`.
    pub labels: BTreeMap<String, String>,
    /// Where the last acknowledged config is kept across restarts.
    pub state_dir: PathBuf,
    /// How often the node's answer counts go to the controller.
    pub report_interval: Duration,
    pub tls: Option<ControllerTls>,
}

/// PEM material to reach the controller: the CA that signed its
/// certificate, and the node's own certificate (its identity).
#[derive(Clone, PartialEq, Eq)]
pub struct ControllerTls {
    pub ca_pem: Vec<u8>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ControllerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    /// HTTP/1.1 and HTTP/2 (by ALPN) over TLS.
    Https,
    /// Plain TCP (L4) proxying, optionally behind TLS.
    Tcp,
    /// An HTTP forward proxy: absolute-form requests and CONNECT tunnels.
    Forward,
    /// A SOCKS5 proxy (CONNECT).
    Socks5,
    /// Reverse tunnels from nodes behind NAT dial in here (mTLS).
    Tunnel,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Tcp => "tcp",
            Protocol::Forward => "forward",
            Protocol::Socks5 => "socks5",
            Protocol::Tunnel => "tunnel",
        }
    }
}

/// TLS termination settings of a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub min_version: TlsVersion,
    /// The first is the default: served when the client sends no SNI name
    /// or one that no certificate lists.
    pub certificates: Vec<CertificateConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

/// A certificate chain and key, read from disk when the config is loaded
/// (so a reload picks up replaced files), and the SNI names it serves.
#[derive(Clone)]
pub struct CertificateConfig {
    pub names: Vec<HostPattern>,
    pub chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// The chain and key as rustls serves them, made when the files were
    /// validated; `None` for a config validated without its files.
    pub certified: Option<std::sync::Arc<rustls::sign::CertifiedKey>>,
}

/// The same files make the same certificate.
impl PartialEq for CertificateConfig {
    fn eq(&self, other: &Self) -> bool {
        self.names == other.names
            && self.chain_pem == other.chain_pem
            && self.key_pem == other.key_pem
    }
}

impl Eq for CertificateConfig {}

impl std::fmt::Debug for CertificateConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("CertificateConfig")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// Where a listener listens: a TCP address, or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: ListenAddr,
    pub protocol: Protocol,
    pub routes: Vec<RouteConfig>,
    pub http: HttpSettings,
    /// TLS termination: always for `https`, optional for `tcp`.
    pub tls: Option<TlsSettings>,
    /// For `tcp` listeners.
    pub tcp: Option<TcpSettings>,
    /// For `forward` and `socks5` listeners.
    pub proxy: Option<ProxySettings>,
    /// One line per request (HTTP listeners).
    pub access_log: Option<AccessLogSettings>,
    /// For `tunnel` listeners.
    pub tunnel: Option<TunnelListenerSettings>,
    /// Where the listener is written, for errors found when it is applied.
    pub location: ListenerLocation,
}

/// Where a listener and its address are in the config text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerLocation {
    /// `listener[N]`: TLS material and access logs that fail to load.
    pub entry: Location,
    /// `listener[N].listen`: an address that cannot be bound.
    pub listen: Location,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogSettings {
    pub destination: AccessLogDestination,
    pub format: AccessLogFormat,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogDestination {
    Stdout,
    Stderr,
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// nginx's `combined`, plus the upstream server and the time taken.
    Combined,
    Json,
}

/// `[telemetry]`: where traces and metrics go. Unset values fall back to
/// the standard OTEL_* environment variables.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TelemetrySettings {
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
    pub trace_sample_ratio: Option<f64>,
    pub metrics_interval: Option<Duration>,
    /// Address of the Prometheus text endpoint (`/metrics`).
    pub prometheus: Option<SocketAddr>,
}

/// Who may use a forward or SOCKS5 listener, and where to.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxySettings {
    /// When not empty, clients must authenticate as one of these.
    pub users: Vec<(String, String)>,
    pub allow: Vec<DestinationRule>,
    pub deny: Vec<DestinationRule>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

impl std::fmt::Debug for ProxySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print passwords.
        f.debug_struct("ProxySettings")
            .field(
                "users",
                &self.users.iter().map(|(name, _)| name).collect::<Vec<_>>(),
            )
            .field("allow", &self.allow)
            .field("deny", &self.deny)
            .finish_non_exhaustive()
    }
}

/// A destination pattern: a host name, `*.suffix`, an address or a
/// network, with an optional port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationRule {
    pub host: DestinationHost,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestinationHost {
    Name(HostPattern),
    Network(std::net::IpAddr, u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSettings {
    pub upstream: String,
    /// A session with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    /// Time allowed for a client to send a complete request head. It also
    /// bounds how long an idle keep-alive connection waits for its next
    /// request (the wait for a request head starts right away).
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    /// Add a `Via` header to proxied requests and responses.
    pub via: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// No `host` key: matches every host.
    Any,
    /// `example.com`, stored lowercase.
    Exact(String),
    /// `*.example.com`, stored as the suffix `.example.com`.
    Wildcard(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub host: HostPattern,
    pub path_prefix: String,
    pub action: RouteAction,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RouteAction {
    Upstream(String),
    Static(StaticConfig),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticConfig {
    /// Canonical (symlinks resolved) directory the files are served from.
    pub root: PathBuf,
    pub index: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    pub servers: Vec<ServerConfig>,
    pub balance: BalancePolicy,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    /// Time allowed for the upstream to start its response.
    pub read_timeout: Duration,
    /// How long an idle pooled upstream connection is kept.
    pub idle_timeout: Duration,
    pub max_idle_per_server: usize,
    /// Further servers to try when connecting fails, for idempotent
    /// requests without a body.
    pub retries: u32,
    pub all_down: AllDown,
    pub health: Option<HealthCheck>,
    pub passive: Option<PassiveCheck>,
    pub tls: Option<UpstreamTls>,
}

/// What to do when every server of an upstream is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllDown {
    /// Answer 503 at once.
    Fail,
    /// Ignore health and try the servers anyway.
    TryAll,
}

/// An active health check. Equal checks on the same address share one
/// checker, however many upstreams list the address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes for an unhealthy server to become healthy.
    pub rise: u32,
    /// Consecutive failures for a healthy (or unknown) server to go down.
    pub fall: u32,
    /// Up to this much random delay is added to every interval, so a fleet
    /// restarted together does not check in lockstep.
    pub jitter: Duration,
    pub initial: InitialHealth,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CheckKind {
    Http(HttpCheck),
    Tcp(TcpCheck),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HttpCheck {
    pub method: http::Method,
    pub path: String,
    /// Host header; the server address when unset.
    pub host: Option<String>,
    /// Inclusive status ranges that count as success.
    pub expect_status: Vec<(u16, u16)>,
    pub expect_body: Option<String>,
    /// Probe over TLS with these settings (the upstream's).
    pub tls: Option<UpstreamTls>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TcpCheck {
    pub send: Option<Vec<u8>>,
    pub expect: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InitialHealth {
    /// Used, and reported unknown, until the first check result.
    Unknown,
    /// Takes no traffic until `rise` checks pass.
    Unhealthy,
}

/// Outlier detection from real traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveCheck {
    /// Consecutive connect failures, timeouts or 5xx that eject a server.
    pub consecutive_failures: u32,
    /// First ejection period; it doubles on each repeat ejection...
    pub ejection: Duration,
    /// ...up to this.
    pub max_ejection: Duration,
    /// Never eject more than this share of an upstream's servers.
    pub max_ejected_percent: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerConfig {
    pub addr: ServerAddr,
    pub weight: u32,
}

/// Where an upstream server listens: `IP:PORT`, `unix:PATH`, or
/// `tunnel:NODE/SERVICE` (a service of a node behind NAT, reached through
/// the reverse tunnel it dialed).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServerAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
    Tunnel(TunnelTarget),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TunnelTarget {
    pub node: String,
    pub service: String,
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddr::Tcp(addr) => write!(f, "{addr}"),
            ServerAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            ServerAddr::Tunnel(target) => write!(f, "tunnel:{}/{}", target.node, target.service),
        }
    }
}

/// `protocol = "tunnel"`: the nodes that may dial in (identified by their
/// client certificate) and the services each may offer.
#[derive(Clone, PartialEq, Eq)]
pub struct TunnelListenerSettings {
    pub client_ca_pem: Vec<u8>,
    pub peers: Vec<TunnelPeer>,
}

impl std::fmt::Debug for TunnelListenerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelListenerSettings")
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelPeer {
    pub node: String,
    pub services: Vec<String>,
}

/// `[[tunnel]]`: connections this node keeps open to a public node, and
/// the local services it serves through them.
#[derive(Clone, PartialEq, Eq)]
pub struct TunnelConfig {
    pub name: String,
    /// The public node's tunnel listener, `HOST:PORT`.
    pub connect: String,
    /// The name the public node's certificate must carry.
    pub server_name: String,
    /// Parallel connections kept open.
    pub connections: usize,
    /// HTTP/2 PINGs this often; a connection that misses the answer for as
    /// long again is closed and dialed anew.
    pub keepalive: Duration,
    /// The longest wait between two attempts to dial.
    pub max_backoff: Duration,
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub services: Vec<TunnelService>,
}

impl std::fmt::Debug for TunnelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelConfig")
            .field("name", &self.name)
            .field("connect", &self.connect)
            .field("connections", &self.connections)
            .field("services", &self.services)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelService {
    pub name: String,
    /// Where the service listens on the inner node's side.
    pub addr: ServerAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BalancePolicy {
    RoundRobin,
    WeightedRoundRobin,
    LeastConn,
    ConsistentHash(HashKey),
    PowerOfTwo,
}

impl BalancePolicy {
    pub fn name(&self) -> &'static str {
        match self {
            BalancePolicy::RoundRobin => "round_robin",
            BalancePolicy::WeightedRoundRobin => "weighted_round_robin",
            BalancePolicy::LeastConn => "least_conn",
            BalancePolicy::ConsistentHash(_) => "consistent_hash",
            BalancePolicy::PowerOfTwo => "power_of_two",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Header(HeaderName),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    Http1,
    /// HTTP/2 with prior knowledge, cleartext.
    H2c,
    /// HTTP/2 over TLS, agreed by ALPN (HTTP/1.1 if the server declines).
    H2,
}

/// TLS to an upstream's servers.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UpstreamTls {
    /// PEM CA bundle to verify servers against; the system roots when unset.
    pub ca_pem: Option<Vec<u8>>,
    /// SNI and verification name; the server's address when unset.
    pub server_name: Option<String>,
    /// Client certificate chain and key, for servers that require mTLS.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl UpstreamTls {
    /// The client side of TLS to the servers: the configured CA (or the
    /// system roots) and, for mTLS, the client certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, crate::pki::PkiError> {
        let identity = self
            .client
            .as_ref()
            .map(|(chain, key)| (chain.as_slice(), key.as_slice()));
        crate::pki::client_config(self.ca_pem.as_deref(), identity)
    }
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .field("custom_ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

impl Config {
    /// Parses and validates config text. Relative paths (static roots) are
    /// resolved against `base_dir`, normally the config file's directory.
    /// On failure every error found is returned, each with its location.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, Vec<ConfigError>> {
        validate::parse(text, Some(base_dir))
    }

    /// Validates without touching the filesystem: certificate files and
    /// static roots are named but not read. What a controller checks
    /// before it stores a config meant for nodes whose files it cannot see.
    pub fn parse_portable(text: &str) -> Result<Config, Vec<ConfigError>> {
        validate::parse(text, None)
    }

    /// One line for `tether check` and `Validate`.
    pub fn summary(&self) -> String {
        let routes: usize = self.listeners.iter().map(|l| l.routes.len()).sum();
        let servers: usize = self.upstreams.values().map(|u| u.servers.len()).sum();
        format!(
            "{} listener{}, {} route{}, {} upstream{} ({} server{})",
            self.listeners.len(),
            plural(self.listeners.len()),
            routes,
            plural(routes),
            self.upstreams.len(),
            plural(self.upstreams.len()),
            servers,
            plural(servers),
        ) + &match self.tunnels.len() {
            0 => String::new(),
            n => format!(", {n} tunnel{}", plural(n)),
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The version of a config that did not come from a controller: a hash of
/// its text, so the same file always has the same version.
pub fn content_version(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!("sha256:{}", &hex::encode(digest)[..16])
}
