//! The fleet as JSON, the same for `tether fleet --json` and the
//! dashboard's HTTP API: nodes, versions, events.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::{json, Value};

use crate::proto::v1::fleet_event::Event;
use crate::proto::v1::{self as pb};

pub fn time(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp
        .and_then(|t| SystemTime::try_from(*t).ok())
        .map(httpdate::fmt_http_date)
        .unwrap_or_default()
}

pub fn errors_json(errors: &[pb::ConfigError]) -> Value {
    errors
        .iter()
        .map(
            |e| json!({ "path": e.path, "line": e.line, "column": e.column, "message": e.message }),
        )
        .collect()
}

pub fn node_json(node: &pb::NodeStatus) -> Value {
    json!({
        "id": node.id,
        "labels": node.labels.iter().collect::<BTreeMap<_, _>>(),
        "connected": node.connected,
        "last_seen": time(node.last_seen.as_ref()),
        "address": node.address,
        "build": node.build,
        "desired_version": node.desired_version,
        "version": node.version,
        "generation": node.generation,
        "last_nack": node.last_nack.as_ref().map(|nack| json!({
            "version": nack.version,
            "reason": nack.reason,
            "errors": errors_json(&nack.errors),
            "at": time(nack.at.as_ref()),
        })),
        "servers_up": node.servers_up,
        "servers_down": node.servers_down,
        "down": node.down,
        "up": node.up,
    })
}

pub fn version_json(info: &pb::VersionInfo) -> Value {
    json!({
        "version": info.version,
        "selector": info.selector,
        "comment": info.comment,
        "author": info.author,
        "published_at": time(info.published_at.as_ref()),
        "checksum": info.checksum,
        "rollback_of": info.rollback_of,
        "all_at_once_reason": info.all_at_once_reason,
        "rollout": info.rollout.as_ref().map(rollout_json),
    })
}

pub fn rollout_json(status: &pb::RolloutStatus) -> Value {
    json!({
        "state": status.state,
        "released": status.released,
        "waves": status.waves,
        "wave_nodes": status.wave_nodes,
        "wave_running": status.wave_running,
        "baking_since": time(status.baking_since.as_ref()),
        "bake_ms": status.bake_ms,
        "reason": status.reason,
        "answers": {
            "new_version": { "answered": status.wave_answered, "server_errors": status.wave_server_errors },
            "previous_version": { "answered": status.baseline_answered, "server_errors": status.baseline_server_errors },
            "max_5xx_increase_percent": status.max_5xx_increase,
        },
    })
}

pub fn event_json(event: &pb::FleetEvent) -> Value {
    let (kind, detail) = match &event.event {
        Some(Event::Connected(c)) => (
            "connected",
            json!({ "labels": c.labels.iter().collect::<BTreeMap<_, _>>(), "version": c.version, "address": c.address }),
        ),
        Some(Event::Disconnected(d)) => ("disconnected", json!({ "reason": d.reason })),
        Some(Event::Published(info)) => ("published", version_json(info)),
        Some(Event::Acked(ack)) => (
            "ack",
            json!({ "version": ack.version, "nonce": ack.nonce, "generation": ack.generation }),
        ),
        Some(Event::Nacked(nack)) => (
            "nack",
            json!({ "version": nack.version, "nonce": nack.nonce, "reason": nack.reason, "errors": errors_json(&nack.errors) }),
        ),
        Some(Event::Health(t)) => (
            "health",
            json!({ "upstream": t.upstream, "server": t.server, "from": health_name(t.from), "to": health_name(t.to), "reason": t.reason }),
        ),
        Some(Event::EventsMissed(m)) => ("events_missed", json!({ "count": m.count })),
        Some(Event::Rollout(r)) => (
            "rollout",
            json!({ "version": r.version, "status": r.status.as_ref().map(rollout_json) }),
        ),
        None => ("unknown", Value::Null),
    };
    json!({ "at": time(event.at.as_ref()), "node": event.node_id, "event": kind, "detail": detail })
}

pub fn health_name(state: i32) -> &'static str {
    match pb::HealthState::try_from(state) {
        Ok(pb::HealthState::Healthy) => "healthy",
        Ok(pb::HealthState::Unhealthy) => "unhealthy",
        _ => "unknown",
    }
}
