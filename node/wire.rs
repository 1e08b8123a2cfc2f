//! The shared vocabulary (config errors, health, the config in force) as
//! `tether.v1` messages and gRPC statuses: used by the control service, the
//! controller agent and the controller alike, so none of them imports
//! another's internals.

use std::time::SystemTime;

use prost_types::Timestamp;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::config::ConfigError;
use crate::events::{ConfigInfo, ConfigSource, Health};
use crate::proto::v1 as pb;

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
