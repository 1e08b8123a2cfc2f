//! Node state → `tether.v1` messages.

use std::time::SystemTime;

use prost_types::Timestamp;

use crate::config::ConfigError;
use crate::generation::{ConfigInfo, ConfigSource, Generation};
use crate::proto::v1 as pb;
use crate::upstream::{Health, Upstream};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

pub fn timestamp(time: SystemTime) -> Timestamp {
    Timestamp::from(time)
}

pub fn config_info(generation: u64, info: &ConfigInfo) -> pb::ConfigInfo {
    let (source, detail) = match &info.source {
        ConfigSource::File(path) => (pb::ConfigSource::File, path.display().to_string()),
        ConfigSource::Inline => (pb::ConfigSource::Inline, String::new()),
        ConfigSource::Controller(_) => (pb::ConfigSource::Controller, String::new()),
    };
    pb::ConfigInfo {
        version: info.version.clone(),
        source: source as i32,
        source_detail: detail,
        generation,
        applied_at: Some(timestamp(info.applied_at)),
    }
}

pub fn config_error(error: &ConfigError) -> pb::ConfigError {
    pb::ConfigError {
        path: error.path.clone(),
        line: error.line,
        column: error.column,
        message: error.message.clone(),
    }
}

/// Config errors as a status: the message lists every error; the details
/// carry them as google.rpc.BadRequest field violations.
pub fn config_errors_status(code: Code, message: String, errors: &[ConfigError]) -> Status {
    if errors.is_empty() {
        return Status::new(code, message);
    }
    let violations: Vec<FieldViolation> = errors
        .iter()
        .map(|e| {
            FieldViolation::new(
                e.path.clone(),
                format!("{}:{}: {}", e.line, e.column, e.message),
            )
        })
        .collect();
    Status::with_error_details(code, message, ErrorDetails::with_bad_request(violations))
}

pub fn health_transition(
    upstream: String,
    server: crate::config::ServerAddr,
    from: Health,
    to: Health,
    reason: String,
) -> pb::HealthTransition {
    pb::HealthTransition {
        upstream,
        server: server.to_string(),
        from: health(from) as i32,
        to: health(to) as i32,
        reason,
    }
}

pub fn health(health: Health) -> pb::HealthState {
    match health {
        Health::Unknown => pb::HealthState::Unknown,
        Health::Healthy => pb::HealthState::Healthy,
        Health::Unhealthy => pb::HealthState::Unhealthy,
    }
}

pub fn upstream(upstream: &Upstream) -> pb::UpstreamStatus {
    pb::UpstreamStatus {
        name: upstream.config.name.clone(),
        balance: upstream.config.balance.name().to_owned(),
        servers: upstream
            .servers
            .iter()
            .map(|server| pb::ServerStatus {
                address: server.addr.to_string(),
                weight: server.weight,
                health: health(server.health()) as i32,
                active_requests: server.active_requests(),
            })
            .collect(),
    }
}

pub fn upstreams(generation: Option<&Generation>) -> Vec<pb::UpstreamStatus> {
    generation
        .map(|g| g.upstreams.values().map(|u| upstream(u)).collect())
        .unwrap_or_default()
}

pub fn listeners(generation: &Generation) -> Vec<pb::ListenerStatus> {
    generation
        .listeners
        .iter()
        .map(|listener| pb::ListenerStatus {
            name: listener.config.name.clone(),
            listen: listener.config.listen.to_string(),
            bound: listener.bound.to_string(),
            protocol: listener.config.protocol.as_str().to_owned(),
            routes: listener.config.routes.len() as u32,
            open_connections: listener.open_connections(),
        })
        .collect()
}

pub fn draining(generation: &Generation) -> pb::DrainingGeneration {
    pb::DrainingGeneration {
        generation: generation.number,
        version: generation.info.version.clone(),
        open_connections: generation.lifecycle.connections(),
        requests_in_flight: generation.lifecycle.requests_in_flight(),
        draining_since: generation.lifecycle.retired_at().map(timestamp),
    }
}
