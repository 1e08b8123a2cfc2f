//! `tether fleet rollout …` and `publish --waves … --wait`: a rollout's
//! progress, wave by wave, as lines (or JSON objects with `--json`).

use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::Status;

use super::json::{rollout_json, time};
use super::progress::{self, Bars, Mode};
use crate::proto::v1::fleet_event::Event;
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
    if let Some(answers) = progress::answers_text(status) {
        line.push_str(&format!("; {answers}"));
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

/// Shows the rollout until it ends: bars on a terminal, a line per change
/// otherwise (a JSON object with `--json`), and each NACK of the version as
/// it arrives.
pub async fn follow(
    client: &mut FleetServiceClient<Channel>,
    version: u64,
    mode: Mode,
) -> Result<Ended, Status> {
    // NACKs come from the fleet's events; without them (an older
    // controller), the rollout's reason still names them at the end.
    let mut events = client
        .watch_fleet(pb::WatchFleetRequest {})
        .await
        .ok()
        .map(|r| r.into_inner());
    let mut view = View::new(mode, version);
    let mut poll = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            event = next_event(&mut events) => match event {
                Some(pb::FleetEvent { node_id, event: Some(Event::Nacked(nack)), .. })
                    if nack.version == version => view.nack(&node_id, &nack),
                Some(_) => {}
                None => events = None,
            },
            _ = poll.tick() => {
                let (_, current) = status(client, Some(version)).await?;
                view.status(&current);
                match current.state.as_str() {
                    "running" | "paused" => {}
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
    }
}

async fn next_event(
    events: &mut Option<tonic::Streaming<pb::FleetEvent>>,
) -> Option<pb::FleetEvent> {
    match events {
        Some(stream) => stream.message().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

/// A followed rollout, as the output mode shows it.
enum View {
    Bars {
        version: u64,
        bars: Bars,
    },
    Lines {
        version: u64,
        json: bool,
        last: Option<pb::RolloutStatus>,
    },
}

impl View {
    fn new(mode: Mode, version: u64) -> View {
        match mode {
            Mode::Terminal => View::Bars {
                version,
                bars: Bars::new(),
            },
            Mode::Lines | Mode::Json => View::Lines {
                version,
                json: mode == Mode::Json,
                last: None,
            },
        }
    }

    fn status(&mut self, status: &pb::RolloutStatus) {
        match self {
            View::Bars { version, bars } => {
                let mut headline = format!(
                    "v{version} rollout {}: wave {} of {} released",
                    status.state, status.released, status.waves
                );
                if let Some(answers) = progress::answers_text(status) {
                    headline.push_str(&format!("; {answers}"));
                }
                let now = SystemTime::now();
                for (index, (nodes, running)) in status
                    .wave_nodes
                    .iter()
                    .zip(&status.wave_running)
                    .enumerate()
                {
                    bars.bar(
                        index,
                        format!("wave {}", index + 1),
                        u64::from(*running),
                        u64::from(*nodes),
                        progress::wave_text(status, index, now),
                    );
                }
                if matches!(status.state.as_str(), "running" | "paused") {
                    bars.headline(headline);
                } else {
                    bars.finish(status_line(*version, status));
                }
            }
            View::Lines {
                version,
                json,
                last,
            } => {
                // A line when something moved: not for the bake's clock or
                // the answer counts alone.
                let shown = pb::RolloutStatus {
                    wave_answered: 0,
                    wave_server_errors: 0,
                    baseline_answered: 0,
                    baseline_server_errors: 0,
                    ..status.clone()
                };
                if last.as_ref() == Some(&shown) {
                    return;
                }
                if *json {
                    println!("{}", status_json(*version, status));
                } else {
                    println!("{}", status_line(*version, status));
                }
                *last = Some(shown);
            }
        }
    }

    fn nack(&mut self, node: &str, nack: &pb::Nack) {
        let reason = progress::nack_reason(&nack.reason, &nack.errors);
        match self {
            View::Bars { version, bars } => {
                bars.println(&progress::nacked_line(node, *version, &reason))
            }
            View::Lines {
                version,
                json: true,
                ..
            } => println!(
                "{}",
                json!({ "event": "nacked", "node": node, "version": version, "reason": reason })
            ),
            View::Lines { version, .. } => {
                println!("{}", progress::nacked_line(node, *version, &reason))
            }
        }
    }
}
