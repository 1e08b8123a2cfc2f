//! `tether fleet publish --wait`: after a publish, follows the target nodes
//! until each has answered the version. Every ACK and NACK is printed as
//! it arrives (one JSON object per line with `--json`), with a progress
//! line when the count changes (a bar on a terminal). It succeeds when every target runs the
//! version, and fails on the first answer that is not an ACK: a NACK, or a
//! node that has not answered within the timeout (a disconnected node
//! counts as one that has not answered).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::json;
use tonic::transport::Channel;

use super::progress::{self, Bars, Mode};
use crate::config::format_duration;
use crate::proto::v1::fleet_service_client::FleetServiceClient;
use crate::proto::v1::{self as pb};

/// How often the nodes' state is read.
const POLL: Duration = Duration::from_millis(250);

/// Why the wait ended without every target running the version.
pub enum NotApplied {
    /// Some targets NACKed (node → reason), and no target is left waiting.
    Nacked(BTreeMap<String, String>),
    /// These targets had not answered when the time was up.
    TimedOut(BTreeSet<String>),
    /// The controller stopped answering.
    Unreachable(tonic::Status),
}

impl NotApplied {
    pub fn message(&self, version: u64, timeout: Duration) -> String {
        match self {
            NotApplied::Nacked(nacks) => format!(
                "v{version} was NACKed by {}: {}",
                join(nacks.keys()),
                nacks
                    .iter()
                    .map(|(node, reason)| format!("{node}: {reason}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            NotApplied::TimedOut(pending) => format!(
                "v{version}: no answer within {} from {}",
                format_duration(timeout),
                join(pending.iter())
            ),
            NotApplied::Unreachable(status) => {
                format!(
                    "v{version}: lost the controller while waiting: {}",
                    status.message()
                )
            }
        }
    }
}

fn join<'a>(names: impl Iterator<Item = &'a String>) -> String {
    names.map(String::as_str).collect::<Vec<_>>().join(", ")
}

/// Follows `targets` (the nodes `selector` matched) until each runs
/// `version` (or a newer one) or has NACKed it, for at most `timeout`.
pub async fn wait_for_answers(
    client: &mut FleetServiceClient<Channel>,
    version: u64,
    selector: &str,
    targets: &[String],
    timeout: Duration,
    mode: Mode,
) -> Result<(), NotApplied> {
    let json = mode == Mode::Json;
    let mut bars = (mode == Mode::Terminal).then(Bars::new);
    let report = |bars: &Option<Bars>, event: &str, node: &str, reason: Option<&str>| match bars {
        Some(bars) => {
            if let Some(reason) = reason {
                bars.println(&progress::nacked_line(node, version, reason));
            }
        }
        None => report(json, event, node, version, reason),
    };
    let targets: BTreeSet<String> = targets.iter().cloned().collect();
    let deadline = Instant::now() + timeout;
    let mut acked = BTreeSet::new();
    let mut nacked = BTreeMap::new();
    let mut progress = String::new();
    loop {
        let nodes = client
            .list_nodes(pb::ListNodesRequest {
                selector: selector.to_owned(),
            })
            .await
            .map_err(NotApplied::Unreachable)?
            .into_inner()
            .nodes;
        for node in nodes.iter().filter(|n| targets.contains(&n.id)) {
            if acked.contains(&node.id) || nacked.contains_key(&node.id) {
                continue;
            }
            if node.version >= version {
                acked.insert(node.id.clone());
                report(&bars, "acked", &node.id, None);
            } else if let Some(nack) = node.last_nack.as_ref().filter(|n| n.version == version) {
                let reason = progress::nack_reason(&nack.reason, &nack.errors);
                report(&bars, "nacked", &node.id, Some(&reason));
                nacked.insert(node.id.clone(), reason);
            }
        }
        if let Some(bars) = &mut bars {
            let nacks = match nacked.len() {
                0 => String::new(),
                n => format!(", {n} NACKed"),
            };
            bars.headline(format!(
                "v{version}: waiting for the nodes to answer{nacks}"
            ));
            bars.bar(
                0,
                format!("v{version}"),
                acked.len() as u64,
                targets.len() as u64,
                "ACKed".to_owned(),
            );
        } else if !json {
            let line = format!(
                "v{version}: {} of {} nodes ACKed{}",
                acked.len(),
                targets.len(),
                if nacked.is_empty() {
                    String::new()
                } else {
                    format!(", {} NACKed", nacked.len())
                }
            );
            if line != progress {
                println!("{line}");
                progress = line;
            }
        }
        let answered = acked.len() + nacked.len();
        let done = answered == targets.len() || Instant::now() >= deadline;
        if let (Some(bars), true) = (&bars, done) {
            bars.finish(format!(
                "v{version}: {} of {} nodes ACKed{}",
                acked.len(),
                targets.len(),
                match nacked.len() {
                    0 => String::new(),
                    n => format!(", {n} NACKed"),
                }
            ));
        }
        if answered == targets.len() {
            return if nacked.is_empty() {
                Ok(())
            } else {
                Err(NotApplied::Nacked(nacked))
            };
        }
        if Instant::now() >= deadline {
            let pending = targets
                .iter()
                .filter(|id| !acked.contains(*id) && !nacked.contains_key(*id))
                .cloned()
                .collect();
            return Err(NotApplied::TimedOut(pending));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn report(json: bool, event: &str, node: &str, version: u64, reason: Option<&str>) {
    if json {
        println!(
            "{}",
            json!({ "event": event, "node": node, "version": version, "reason": reason })
        );
    } else {
        match reason {
            Some(reason) => println!("{}", progress::nacked_line(node, version, reason)),
            None => println!("{node} runs v{version}"),
        }
    }
}
