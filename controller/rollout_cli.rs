//! `tether fleet rollout …` and `publish --waves … --wait`: a rollout's
//! progress, wave by wave, as lines (or JSON objects with `--json`).

use std::time::Duration;

use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::Status;

use super::json::{rollout_json, time};
use crate::proto::v1::fleet_service_client::FleetServiceClient;
use crate::proto::v1::{self as pb};

/// How often a followed rollout is read.
const POLL: Duration = Duration::from_millis(250);

/// How a followed rollout ended.
pub enum Ended {
    Completed,
    /// Failed, aborted or superseded: the reason.
    Stopped(String),
}

/// `v3 rollout running: wave 2 of 3 released; wave 1 1/1, wave 2 2/3 running`.
pub fn status_line(version: u64, status: &pb::RolloutStatus) -> String {
    let waves: Vec<String> = status
        .wave_nodes
        .iter()
        .zip(&status.wave_running)
        .enumerate()
        .map(|(i, (nodes, running))| format!("wave {} {running}/{nodes}", i + 1))
        .collect();
    let mut line = format!(
        "v{version} rollout {}: wave {} of {} released; {} running",
        status.state,
        status.released,
        status.waves,
        waves.join(", ")
    );
    if status.state == "running" && status.baking_since.is_some() {
        line.push_str(&format!(
            "; baking since {} for {} ms",
            time(status.baking_since.as_ref()),
            status.bake_ms
        ));
    }
    if !status.reason.is_empty() {
        line.push_str(&format!("; {}", status.reason));
    }
    line
}

pub fn status_json(version: u64, status: &pb::RolloutStatus) -> Value {
    let mut value = rollout_json(status);
    value["version"] = json!(version);
    value
}

/// The rollout of `version`, or of the newest version that has one.
pub async fn status(
    client: &mut FleetServiceClient<Channel>,
    version: Option<u64>,
) -> Result<(u64, pb::RolloutStatus), Status> {
    let versions = client
        .list_versions(pb::ListVersionsRequest {})
        .await?
        .into_inner()
        .versions;
    versions
        .into_iter()
        .filter(|v| version.is_none_or(|n| n == v.version))
        .find_map(|v| v.rollout.map(|status| (v.version, status)))
        .ok_or_else(|| match version {
            Some(n) => Status::not_found(format!("version {n} has no rollout")),
            None => Status::not_found("no version has a rollout"),
        })
}

/// Prints each change of the rollout until it ends.
pub async fn follow(
    client: &mut FleetServiceClient<Channel>,
    version: u64,
    json: bool,
) -> Result<Ended, Status> {
    let mut last = None;
    loop {
        let (_, current) = status(client, Some(version)).await?;
        // The bake start is printed once, not as a changing countdown.
        let shown = pb::RolloutStatus {
            baking_since: current.baking_since,
            ..current.clone()
        };
        if last.as_ref() != Some(&shown) {
            if json {
                println!("{}", status_json(version, &current));
            } else {
                println!("{}", status_line(version, &current));
            }
            last = Some(shown);
        }
        match current.state.as_str() {
            "running" => tokio::time::sleep(POLL).await,
            "completed" => return Ok(Ended::Completed),
            _ => {
                return Ok(Ended::Stopped(format!(
                    "v{version} rollout {}: {}",
                    current.state, current.reason
                )))
            }
        }
    }
}
