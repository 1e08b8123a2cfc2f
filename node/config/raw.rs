//! The config file exactly as written: serde types that mirror the TOML.
//! Unknown keys are errors. `validate.rs` turns these into a `Config`.

use serde::Deserialize;

use super::duration::ConfigDuration;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    pub id: Option<String>,
    pub drain_timeout: Option<ConfigDuration>,
    pub drain_idle_grace: Option<ConfigDuration>,
    pub workers: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawControl {
    pub listen: Option<String>,
    pub tls: Option<RawControlTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawControlTls {
    pub cert: String,
    pub key: String,
    pub client_ca: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawController {
    pub url: RawUrls,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    pub labels_file: Option<String>,
    pub state_dir: Option<String>,
    pub report_interval: Option<ConfigDuration>,
    pub tls: Option<RawControllerTls>,
    /// Allows a plaintext `http://` url off loopback.
    pub insecure: Option<bool>,
}

/// One controller url, or several (replicas, tried in turn).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawUrls {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawControllerTls {
    pub ca: String,
    pub cert: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawProtocol {
    #[default]
    Http,
    Https,
    Tcp,
    Forward,
    Socks5,
    Tunnel,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    #[serde(default)]
    pub users: Vec<RawUser>,
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
    pub connect_timeout: Option<ConfigDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    pub name: String,
    pub password: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListenerTls {
    pub min_version: Option<String>,
    #[serde(default)]
    pub certificate: Vec<RawCertificate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: String,
    pub key: String,
    #[serde(default)]
    pub names: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: String,
    pub listen: String,
    #[serde(default)]
    pub protocol: RawProtocol,
    #[serde(default)]
    pub route: Vec<RawRoute>,
    pub header_read_timeout: Option<ConfigDuration>,
    pub max_header_bytes: Option<usize>,
    pub via: Option<bool>,
    pub tls: Option<RawListenerTls>,
    /// protocol = "tcp": where connections go, and when an idle one closes.
    pub upstream: Option<String>,
    pub idle_timeout: Option<ConfigDuration>,
    /// protocol = "forward" or "socks5".
    pub proxy: Option<RawProxy>,
    /// "stdout", "stderr" or a file path; HTTP listeners only.
    pub access_log: Option<String>,
    /// "combined" (default) or "json".
    pub access_log_format: Option<String>,
    /// protocol = "tunnel": who may dial in, and what they may offer.
    pub tunnel: Option<RawTunnelListener>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTunnelListener {
    pub client_ca: String,
    #[serde(default)]
    pub peer: Vec<RawTunnelPeer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTunnelPeer {
    pub node: String,
    #[serde(default)]
    pub services: Vec<String>,
}

/// `[[tunnel]]`: a node behind NAT dials out to a public node.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTunnel {
    pub name: String,
    pub connect: String,
    pub server_name: Option<String>,
    pub connections: Option<u32>,
    pub keepalive: Option<ConfigDuration>,
    pub max_backoff: Option<ConfigDuration>,
    pub tls: RawTunnelTls,
    #[serde(default)]
    pub service: Vec<RawTunnelService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTunnelTls {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTunnelService {
    pub name: String,
    pub addr: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
    pub trace_sample_ratio: Option<f64>,
    pub metrics_interval: Option<ConfigDuration>,
    pub prometheus: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub host: Option<String>,
    pub path: Option<String>,
    pub upstream: Option<String>,
    #[serde(rename = "static")]
    pub static_files: Option<RawStatic>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStatic {
    pub root: String,
    pub index: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawBalance {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    LeastConn,
    ConsistentHash,
    PowerOfTwo,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawUpstreamProtocol {
    #[default]
    Http1,
    H2c,
    H2,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub servers: Vec<RawServer>,
    #[serde(default)]
    pub balance: RawBalance,
    pub hash_on: Option<String>,
    #[serde(default)]
    pub protocol: RawUpstreamProtocol,
    pub connect_timeout: Option<ConfigDuration>,
    pub read_timeout: Option<ConfigDuration>,
    pub idle_timeout: Option<ConfigDuration>,
    pub max_idle_per_server: Option<usize>,
    pub retries: Option<u32>,
    pub all_down: Option<RawAllDown>,
    pub health: Option<RawHealth>,
    pub passive: Option<RawPassive>,
    pub tls: Option<RawUpstreamTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub ca: Option<String>,
    pub server_name: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawAllDown {
    Fail,
    TryAll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawCheckType {
    Http,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawInitialHealth {
    Unknown,
    Unhealthy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    #[serde(rename = "type")]
    pub kind: RawCheckType,
    pub interval: Option<ConfigDuration>,
    pub timeout: Option<ConfigDuration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub jitter: Option<ConfigDuration>,
    pub initial: Option<RawInitialHealth>,
    // type = "http"
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub expect_status: Option<Vec<String>>,
    pub expect_body: Option<String>,
    pub tls: Option<bool>,
    // type = "tcp"
    pub send: Option<String>,
    pub expect: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassive {
    pub consecutive_failures: Option<u32>,
    pub ejection: Option<ConfigDuration>,
    pub max_ejection: Option<ConfigDuration>,
    pub max_ejected_percent: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub addr: String,
    pub weight: Option<u32>,
}
