//! A running node's generations → `tether.v1` messages (the shared
//! vocabulary's conversions are in `wire`).

use crate::events::TunnelStatus;
use crate::generation::Generation;
use crate::proto::v1 as pb;
use crate::upstream::Upstream;
pub use crate::wire::*;

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

/// The node's tunnels as GetConfig and a health snapshot list them.
pub fn tunnel_statuses(tunnels: Vec<TunnelStatus>) -> Vec<pb::TunnelStatus> {
    tunnels.into_iter().map(tunnel_status).collect()
}

pub fn tunnel_status(status: TunnelStatus) -> pb::TunnelStatus {
    pb::TunnelStatus {
        role: status.role.as_str().to_owned(),
        name: status.name,
        peer: status.peer,
        services: status.services,
        connections_up: status.connections_up,
        connections_wanted: status.connections_wanted,
        open_streams: status.open_streams,
        last_error: status.last_error,
    }
}
