//! The controller agent: keeps one `Sync` stream open to the controller,
//! applies each push through the supervisor (the same apply path as a
//! SIGHUP), answers ACK or NACK naming the push's version and nonce,
//! persists what it acknowledged, and sends health transitions and answer
//! counts up.
//!
//! The node keeps serving whatever it runs while the controller is away;
//! the agent reconnects with jittered exponential backoff.

pub mod state;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::config::{content_version, ConfigError, ControllerSettings, ServerAddr};
use crate::events::{ConfigSource, ControllerVersion, Health, NodeEvent};
use crate::grpc::{self, ClientTls};
use crate::proto::v1::controller_message::Message as Down;
use crate::proto::v1::controller_service_client::ControllerServiceClient;
use crate::proto::v1::node_message::Message as Up;
use crate::proto::v1::{self as pb};
use crate::supervisor::{ApplyError, ApplySource, NodeHandle};
use crate::wire;

use state::LastAcked;

const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(15);
/// A stream that stayed up this long resets the backoff.
const STABLE_STREAM: Duration = Duration::from_secs(30);
/// Messages waiting to go up the stream; past this, health reports are
/// dropped (the next Hello carries a full snapshot).
const UPSTREAM_QUEUE: usize = 256;

/// Runs the agent until the node stops. With several controller urls
/// (replicas), a stream that ends or cannot open moves on to the next one
/// at once; after a round of them all, the backoff applies.
pub async fn run(node: NodeHandle, settings: ControllerSettings, node_id: String) {
    let mut backoff = Backoff::default();
    let mut next = 0;
    loop {
        let started = Instant::now();
        let url = &settings.urls[next % settings.urls.len()];
        next += 1;
        let outcome = tokio::select! {
            outcome = session(&node, &settings, url, &node_id) => outcome,
            _ = node.stopped() => return,
        };
        match outcome {
            Ok(()) => tracing::warn!(controller = %url, "controller closed the stream"),
            Err(reason) => {
                tracing::warn!(controller = %url, %reason, "controller unreachable")
            }
        }
        if next % settings.urls.len() != 0 {
            continue;
        }
        let delay = backoff.after(started.elapsed());
        tracing::info!(delay = ?delay, "reconnecting to the controller");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = node.stopped() => return,
        }
    }
}

/// Reconnect delays: doubling from 200 ms to 15 s, back to the start after
/// a stream that stayed up, each jittered to between half and all of it so
/// that a fleet that lost its controller does not reconnect in lockstep.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: FIRST_RETRY }
    }
}

impl Backoff {
    /// The delay before the next attempt, after a stream that lasted
    /// `stream_lasted`.
    fn after(&mut self, stream_lasted: Duration) -> Duration {
        if stream_lasted >= STABLE_STREAM {
            self.next = FIRST_RETRY;
        }
        let delay = self.next.mul_f64(rand::random_range(0.5..=1.0));
        self.next = (self.next * 2).min(MAX_RETRY);
        delay
    }
}

async fn connect(settings: &ControllerSettings, url: &str) -> Result<Channel, String> {
    let tls = settings.tls.as_ref().map(|tls| ClientTls {
        ca_pem: &tls.ca_pem,
        identity: tls
            .identity
            .as_ref()
            .map(|(cert, key)| (cert.as_slice(), key.as_slice())),
        server_name: None,
    });
    grpc::endpoint(url, tls)?
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| crate::report::error_chain(&e))
}

/// One connection: Hello, then pushes down and answers and health up,
/// until the stream ends. Err carries why it ended.
async fn session(
    node: &NodeHandle,
    settings: &ControllerSettings,
    url: &str,
    node_id: &str,
) -> Result<(), String> {
    let channel = connect(settings, url).await?;
    // Subscribed before the Hello snapshot so that no transition falls
    // between the two.
    let mut events = node.events();
    let (up, up_queue) = mpsc::channel(UPSTREAM_QUEUE);
    up.try_send(hello(node, settings, node_id))
        .expect("the queue is empty");
    let response = ControllerServiceClient::new(channel)
        .sync(ReceiverStream::new(up_queue))
        .await
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
    tracing::info!(controller = %url, node = node_id, "connected to the controller");
    let mut pushes = response.into_inner();
    // Only the newest push matters: one that arrives while another is
    // being applied replaces any still waiting.
    let (latest, waiting) = watch::channel(None);
    let applier = tokio::spawn(apply_pushes(
        node.clone(),
        settings.state_dir.clone(),
        waiting,
        up.clone(),
    ));
    let mut report_due = tokio::time::interval(settings.report_interval);
    report_due.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ended = loop {
        tokio::select! {
            _ = report_due.tick() => {
                if up.try_send(traffic_report(node)).is_err() {
                    tracing::debug!("controller stream backed up; traffic report dropped");
                }
            }
            message = pushes.message() => match message {
                Ok(Some(pb::ControllerMessage { message: Some(Down::Push(push)) })) => {
                    tracing::info!(version = push.version, nonce = %push.nonce, "push received");
                    // Replaces a push still waiting, if any.
                    latest.send_replace(Some(push));
                }
                Ok(Some(pb::ControllerMessage { message: Some(Down::Refused(refused)) })) => {
                    break Err(format!("refused: {}", refused.reason));
                }
                Ok(Some(_)) => {}
                Ok(None) => break Ok(()),
                Err(status) => break Err(format!("{:?}: {}", status.code(), status.message())),
            },
            event = events.recv() => match event {
                Ok(NodeEvent::HealthChanged { upstream, server, from, to, reason }) => {
                    let report = pb::HealthReport {
                        transitions: vec![wire::health_transition(upstream, server, from, to, reason)],
                    };
                    if up.try_send(message(Up::Health(report))).is_err() {
                        tracing::debug!("controller stream backed up; health report dropped");
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break Ok(()),
            },
        }
    };
    // The applier finishes a push it has started (and persists it), then
    // ends: the watch sender is gone.
    drop(latest);
    let _ = applier.await;
    ended
}

fn message(message: Up) -> pb::NodeMessage {
    pb::NodeMessage {
        message: Some(message),
    }
}

fn hello(node: &NodeHandle, settings: &ControllerSettings, node_id: &str) -> pb::NodeMessage {
    let current = node.current();
    let (version, content, generation) = match &current {
        Some(generation) => (
            controller_version(&generation.info.source),
            content_version(&generation.info.text),
            generation.number,
        ),
        None => (ControllerVersion::default(), String::new(), 0),
    };
    let health = current
        .iter()
        .flat_map(|generation| generation.upstreams.values())
        .flat_map(|upstream| {
            upstream.servers.iter().map(|server| pb::ServerHealth {
                upstream: upstream.config.name.clone(),
                server: server.addr.to_string(),
                state: wire::health(server.health()) as i32,
            })
        })
        .collect();
    message(Up::Hello(pb::Hello {
        node_id: node_id.to_owned(),
        labels: settings.labels.clone().into_iter().collect(),
        version: version.number,
        content_version: content,
        generation,
        build: concat!("tether ", env!("CARGO_PKG_VERSION")).to_owned(),
        health,
        checksum: version.checksum,
        store_id: version.store_id,
        traffic_report_ms: settings.report_interval.as_millis() as u64,
    }))
}

/// The answers counted so far, under the version in force.
fn traffic_report(node: &NodeHandle) -> pb::NodeMessage {
    let version = node.current().map_or(0, |generation| {
        controller_version(&generation.info.source).number
    });
    let counted = crate::telemetry::answers::counted();
    message(Up::Traffic(pb::TrafficReport {
        answered: counted.answered,
        server_errors: counted.server_errors,
        version,
    }))
}

/// The controller version a generation runs; number 0 when its config did
/// not come from a controller.
fn controller_version(source: &ConfigSource) -> ControllerVersion {
    match source {
        ConfigSource::Controller(version) => version.clone(),
        _ => ControllerVersion::default(),
    }
}

async fn apply_pushes(
    node: NodeHandle,
    state_dir: std::path::PathBuf,
    mut waiting: watch::Receiver<Option<pb::Push>>,
    up: mpsc::Sender<pb::NodeMessage>,
) {
    while waiting.changed().await.is_ok() {
        let Some(push) = waiting.borrow_and_update().clone() else {
            continue;
        };
        let before = checked_servers(&node);
        // What the version in force served up to now is counted under it;
        // what follows an ACK, under the new one.
        let served_before = traffic_report(&node);
        let answer = apply_push(&node, &state_dir, push).await;
        // Servers the new config dropped are no longer checked: said
        // before the ACK, so the controller's view of this node's health
        // (and a rollout's health gate) never holds a server it lost.
        if matches!(answer, Up::Ack(_)) {
            if up.send(served_before).await.is_err() {
                return;
            }
            let after = checked_servers(&node);
            let transitions: Vec<pb::HealthTransition> = before
                .into_iter()
                .filter(|(key, _)| !after.contains_key(key))
                .map(|((upstream, server), health)| {
                    wire::health_transition(
                        upstream,
                        server,
                        health,
                        Health::Unknown,
                        "no longer in the config".to_owned(),
                    )
                })
                .collect();
            if !transitions.is_empty()
                && up
                    .send(message(Up::Health(pb::HealthReport { transitions })))
                    .await
                    .is_err()
            {
                return;
            }
        }
        // A full queue means the stream is stuck: waiting here is right,
        // the answer must not be lost while the stream lives.
        if up.send(message(answer)).await.is_err() {
            return;
        }
    }
}

/// Every (upstream, server) of the generation in force, with its health.
fn checked_servers(node: &NodeHandle) -> BTreeMap<(String, ServerAddr), Health> {
    node.current()
        .iter()
        .flat_map(|generation| generation.upstreams.values())
        .flat_map(|upstream| {
            upstream.servers.iter().map(|server| {
                (
                    (upstream.config.name.clone(), server.addr.clone()),
                    server.health(),
                )
            })
        })
        .collect()
}

async fn apply_push(node: &NodeHandle, state_dir: &std::path::Path, push: pb::Push) -> Up {
    let nack = |errors: Vec<ConfigError>, reason: String| {
        tracing::warn!(version = push.version, %reason, errors = errors.len(), "push refused (NACK)");
        Up::Nack(pb::Nack {
            version: push.version,
            nonce: push.nonce.clone(),
            errors: errors.iter().map(wire::config_error).collect(),
            reason,
        })
    };
    let Ok(text) = std::str::from_utf8(&push.config) else {
        return nack(Vec::new(), "the pushed config is not UTF-8".to_owned());
    };
    let checksum = content_version(text);
    if checksum != push.checksum {
        return nack(
            Vec::new(),
            format!(
                "checksum mismatch: the push says {}, the text is {checksum}",
                push.checksum
            ),
        );
    }
    let pushed = ControllerVersion {
        number: push.version,
        checksum: checksum.clone(),
        store_id: push.store_id.clone(),
    };
    // Already serving this very version (a push repeated after a
    // reconnect): acknowledge without building a new generation. The same
    // number from another store, or with other content, is applied.
    if let Some(current) = node.current() {
        if controller_version(&current.info.source) == pushed {
            return ack(&push, current.number);
        }
    }
    let source = ApplySource::Controller {
        version: pushed,
        text: text.to_owned(),
        traceparent: push.traceparent.clone(),
    };
    match node.apply(source).await {
        Ok(applied) => {
            let state = LastAcked {
                version: push.version,
                checksum,
                store_id: push.store_id.clone(),
                config: text.to_owned(),
            };
            if let Err(e) = state::save(state_dir, &state) {
                tracing::warn!(error = %e, dir = %state_dir.display(), "cannot persist the acknowledged config; a restart without the controller falls back to the file");
            }
            tracing::info!(
                version = push.version,
                generation = applied.generation,
                "push applied (ACK)"
            );
            ack(&push, applied.generation)
        }
        Err(ApplyError::Invalid(errors)) => {
            let reason = format!("invalid config: {}", count(&errors));
            nack(errors, reason)
        }
        Err(ApplyError::Bind(errors)) => {
            let reason = format!("cannot bind: {}", count(&errors));
            nack(errors, reason)
        }
        Err(other) => nack(Vec::new(), other.to_string()),
    }
}

fn count(errors: &[ConfigError]) -> String {
    format!(
        "{} error{}",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    )
}

fn ack(push: &pb::Push, generation: u64) -> Up {
    Up::Ack(pb::Ack {
        version: push.version,
        nonce: push.nonce.clone(),
        generation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_back_off_to_fifteen_seconds_with_jitter_and_reset_after_a_stable_stream() {
        let mut backoff = Backoff::default();
        let short = Duration::from_secs(1);
        let mut ceiling = FIRST_RETRY;
        for _ in 0..10 {
            let delay = backoff.after(short);
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "{delay:?} vs {ceiling:?}"
            );
            ceiling = (ceiling * 2).min(MAX_RETRY);
        }
        assert_eq!(ceiling, MAX_RETRY);
        let delay = backoff.after(STABLE_STREAM);
        assert!(delay <= FIRST_RETRY, "a stable stream resets: {delay:?}");
    }
}
