//! What the node's parts tell each other and their watchers: events, the
//! identity of the config in force, the health of a server. A leaf of the
//! module graph: the supervisor, generations, health checks, upstreams,
//! telemetry and the control service all import it, and it imports only
//! the config's types.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use crate::config::ServerAddr;

/// Something the node did, for watchers (`WatchHealth`, the controller).
#[derive(Debug, Clone)]
pub enum NodeEvent {
    ConfigApplied {
        generation: u64,
        info: ConfigInfo,
        previous_generation: u64,
    },
    GenerationDrained {
        generation: u64,
        closed_at_timeout: u64,
    },
    HealthChanged {
        upstream: String,
        server: ServerAddr,
        from: Health,
        to: Health,
        reason: String,
    },
    /// A reverse tunnel's connections came up, went down or were refused.
    TunnelChanged(TunnelStatus),
}

/// Which end of a reverse tunnel this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelRole {
    /// Behind NAT: dials out, serves its local services through it.
    Dial,
    /// Public: accepts the tunnel, reaches the services through it.
    Accept,
}

impl TunnelRole {
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelRole::Dial => "dial",
            TunnelRole::Accept => "accept",
        }
    }
}

/// One reverse tunnel as an operator sees it. On the dialing node it is a
/// `[[tunnel]]`; on the public node, the connections of one tunnel of one
/// node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelStatus {
    pub role: TunnelRole,
    /// The `[[tunnel]]` name.
    pub name: String,
    /// Dial: the public node's address. Accept: the dialing node's id.
    pub peer: String,
    pub services: Vec<String>,
    /// On the public node, connections a replaced tunnel is still
    /// finishing its streams on count too.
    pub connections_up: u32,
    /// Dial: `connections`; accept: as many as are up.
    pub connections_wanted: u32,
    pub open_streams: u64,
    /// Why the last connection failed or was refused; empty when none did.
    pub last_error: String,
}

/// Where a config came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    Inline,
    Controller(ControllerVersion),
}

/// What identifies a version a controller pushed. The number alone does
/// not: a controller started on a fresh or restored store numbers its
/// versions from where that store is, so the same number can name other
/// content. A node runs version N of a controller only when the store and
/// the checksum agree too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControllerVersion {
    pub number: u64,
    /// "sha256:…" of the pushed text.
    pub checksum: String,
    /// The identity of the controller's store that numbered it.
    pub store_id: String,
}

impl ConfigSource {
    pub fn as_str(&self) -> &'static str {
        match self {
            ConfigSource::File(_) => "file",
            ConfigSource::Inline => "inline",
            ConfigSource::Controller(_) => "controller",
        }
    }
}

/// What the node records about the config a generation runs.
#[derive(Debug, Clone)]
pub struct ConfigInfo {
    /// Content hash for files and inline text, the controller's version for
    /// pushed configs.
    pub version: String,
    pub source: ConfigSource,
    pub applied_at: SystemTime,
    pub text: Arc<str>,
}

/// Health of one server as the balancers see it. Active checks (and passive
/// ejection) move it; `Unknown` servers take traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    Unknown = 0,
    Healthy = 1,
    Unhealthy = 2,
}

impl Health {
    pub fn from_u8(value: u8) -> Health {
        match value {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }
}
