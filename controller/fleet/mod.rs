//! The fleet as the controller sees it: published versions, every node it
//! has heard from, and the open Sync sessions.
//!
//! One lock guards the maps; nothing awaits while holding it. Each session
//! holds a `watch` of the version its node should run: a publish only
//! overwrites that value, so it never waits on a node, and a slow node that
//! misses intermediate versions just gets the newest one.

mod remote;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::error_rate::{Counts, Tally};
use super::rollout::{
    self, Action, NodeView, State as RolloutState, Step, StoredRollout, WaveSize,
};
use super::selector::Selector;
use super::store::{
    Record, Remote, Store, StoredConfigError, StoredHealth, StoredNack, StoredNode, StoredVersion,
};
use crate::proto::v1::{self as pb, fleet_event::Event};
use crate::telemetry::{metrics, spans};
use opentelemetry::trace::{SpanKind, TraceContextExt};
use opentelemetry::KeyValue;

/// Fleet events kept for watchers that fall behind; past this they get
/// EventsMissed.
const EVENT_BUFFER: usize = 16 * 1024;

/// A published version, ready to push.
#[derive(Debug)]
pub struct Version {
    pub number: u64,
    /// The config text, shared by every stream it is pushed on.
    pub config: Bytes,
    pub checksum: String,
    pub selector: Selector,
    pub comment: String,
    pub author: String,
    pub published_at: SystemTime,
    pub rollback_of: u64,
    /// The publish span's trace context, carried by every push of it.
    pub traceparent: String,
    pub idempotency_key: String,
    pub all_at_once_reason: String,
}

impl Version {
    fn from_stored(stored: StoredVersion) -> Result<Version, String> {
        Ok(Version {
            number: stored.version,
            selector: Selector::parse(&stored.selector)
                .map_err(|e| format!("version {}: {e}", stored.version))?,
            config: Bytes::from(stored.config),
            checksum: stored.checksum,
            comment: stored.comment,
            author: stored.author,
            published_at: from_millis(stored.published_at),
            rollback_of: stored.rollback_of,
            traceparent: String::new(),
            idempotency_key: stored.idempotency_key,
            all_at_once_reason: stored.all_at_once_reason,
        })
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.config).expect("versions are stored as UTF-8 text")
    }

    pub fn info(&self) -> pb::VersionInfo {
        pb::VersionInfo {
            version: self.number,
            selector: self.selector.to_string(),
            comment: self.comment.clone(),
            author: self.author.clone(),
            published_at: Some(self.published_at.into()),
            checksum: self.checksum.clone(),
            rollback_of: self.rollback_of,
            rollout: None,
            all_at_once_reason: self.all_at_once_reason.clone(),
        }
    }
}

/// What to publish.
pub struct Publication {
    pub config: String,
    pub selector: Selector,
    pub comment: String,
    pub author: String,
    pub rollback_of: u64,
    /// Empty: none. A publication whose key a stored version has answers
    /// that version.
    pub idempotency_key: String,
    /// Staged in waves; `None`: the controller's default (see
    /// `all_at_once_reason`).
    pub rollout: Option<Plan>,
    /// Set: every matching node at once, even when publishes are staged by
    /// default, for this reason.
    pub all_at_once_reason: String,
}

/// What a publish stored.
pub struct Published {
    pub version: u64,
    /// Every node its selector matches, connected or not.
    pub targets: Vec<String>,
    /// How it started, when staged.
    pub rollout: Option<pb::RolloutStatus>,
}

/// How a version is staged (see `rollout`).
#[derive(Debug, Clone)]
pub struct Plan {
    pub waves: Vec<WaveSize>,
    /// One wave per value of this label instead (`waves` is then empty).
    pub by_label: Option<String>,
    pub bake: Duration,
    pub ack_timeout: Duration,
    /// The error-rate gate's margin, in hundredths of a point.
    pub max_5xx_increase_bp: u32,
}

impl Publication {
    /// `earlier` published again, for all the nodes it was for; the comment
    /// says so unless the operator gave one.
    pub fn rollback(
        earlier: &Version,
        comment: String,
        author: String,
        idempotency_key: String,
    ) -> Publication {
        let comment = if comment.is_empty() {
            format!("rollback to version {}", earlier.number)
        } else {
            comment
        };
        Publication {
            config: earlier.text().to_owned(),
            selector: earlier.selector.clone(),
            comment,
            author,
            rollback_of: earlier.number,
            idempotency_key,
            // A rollback is how an outage ends: never staged by default.
            rollout: None,
            all_at_once_reason: String::new(),
        }
    }
}

/// Why a publish stored nothing.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot store the version: {0}")]
    Store(#[from] std::io::Error),
    #[error(
        "idempotency key {key:?} was used by version {version} for another config or selector"
    )]
    KeyReused { key: String, version: u64 },
}

/// The node's side of an open Sync stream.
pub struct Session {
    pub id: u64,
    pub node_id: String,
    /// The version the node should run; `None` while nothing matches or it
    /// already runs the desired one.
    pub desired: watch::Receiver<Option<Arc<Version>>>,
    /// Cancelled when a newer stream of the same node replaces this one.
    pub replaced: CancellationToken,
    /// The store's identity, carried by every push.
    pub store_id: String,
}

struct Connection {
    session: u64,
    desired: watch::Sender<Option<Arc<Version>>>,
    replaced: CancellationToken,
    address: String,
}

struct NodeEntry {
    stored: StoredNode,
    connection: Option<Connection>,
    /// The replica of a shared store that holds the node's stream, when
    /// another one does.
    elsewhere: Option<String>,
    /// (upstream, server) → pb::HealthState, as the node last reported.
    health: BTreeMap<(String, String), i32>,
    answers: AnswerReports,
}

impl NodeEntry {
    fn new(stored: StoredNode) -> NodeEntry {
        let health = stored
            .health
            .iter()
            .map(|h| ((h.upstream.clone(), h.server.clone()), h.state))
            .collect();
        NodeEntry {
            stored,
            connection: None,
            elsewhere: None,
            health,
            answers: AnswerReports::default(),
        }
    }

    /// Its stream is open, here or on another replica.
    fn connected(&self) -> bool {
        self.connection.is_some() || self.elsewhere.is_some()
    }

    /// What is stored of it: the record, with its health.
    fn record(&self) -> Record {
        let mut stored = self.stored.clone();
        stored.health = self
            .health
            .iter()
            .map(|((upstream, server), state)| StoredHealth {
                upstream: upstream.clone(),
                server: server.clone(),
                state: *state,
            })
            .collect();
        Record::Node(stored)
    }
}

/// A node's answer counts, as its current stream reported them.
#[derive(Default)]
struct AnswerReports {
    /// How often it reports (0: it does not).
    every_ms: u64,
    /// When it last reported (or connected), ms since the Unix epoch.
    last_ms: u64,
    /// Its counters in that report.
    last: Option<Counts>,
}

#[derive(Default)]
struct Inner {
    versions: BTreeMap<u64, Arc<Version>>,
    /// Idempotency key → the version it stored.
    keys: std::collections::HashMap<String, u64>,
    nodes: BTreeMap<String, NodeEntry>,
    /// Staged rollouts by version.
    rollouts: BTreeMap<u64, StoredRollout>,
    /// Answers counted for each live rollout's error-rate gate, from the
    /// nodes held here.
    answers: BTreeMap<u64, Tally>,
    /// The same, from other replicas of a shared store: version → replica
    /// → what it counted.
    shared_answers: BTreeMap<u64, BTreeMap<String, Tally>>,
}

impl Inner {
    fn add_version(&mut self, version: Arc<Version>) {
        if !version.idempotency_key.is_empty() {
            self.keys
                .insert(version.idempotency_key.clone(), version.number);
        }
        self.versions.insert(version.number, version);
    }

    /// The newest version for node `id` with `labels`: its selector
    /// matches, and a rollout of it, if any, has released it to the node.
    fn desired_for(&self, id: &str, labels: &BTreeMap<String, String>) -> Option<&Arc<Version>> {
        self.versions.values().rev().find(|version| {
            version.selector.matches(labels)
                && self
                    .rollouts
                    .get(&version.number)
                    .is_none_or(|rollout| rollout.releases_to(id, labels))
        })
    }

    /// Tells every connected node whose desired version changed.
    fn push_desired(&self) {
        for (id, node) in &self.nodes {
            let Some(connection) = &node.connection else {
                continue;
            };
            let desired = self.desired_for(id, &node.stored.labels);
            let current = connection.desired.borrow().as_ref().map(|v| v.number);
            let wanted = desired.map(|v| v.number);
            let runs = Some(node.stored.version);
            if wanted != current && !(wanted == runs && current.is_none()) {
                connection.desired.send_replace(desired.cloned());
            }
        }
    }

    /// A rollout's answer counts: this replica's and the others'.
    fn all_answers(&self, version: u64) -> Tally {
        let mut all = self.answers.get(&version).cloned().unwrap_or_default();
        for tally in self
            .shared_answers
            .get(&version)
            .into_iter()
            .flat_map(|by| by.values())
        {
            all.merge(tally);
        }
        all
    }

    /// A rollout's status, with its waves counted over the known nodes.
    fn rollout_status(&self, rollout: &StoredRollout) -> pb::RolloutStatus {
        let waves = rollout.waves();
        let mut wave_nodes = vec![0u32; waves];
        let mut wave_running = vec![0u32; waves];
        if let Some(version) = self.versions.get(&rollout.version) {
            for (id, node) in &self.nodes {
                if !version.selector.matches(&node.stored.labels) {
                    continue;
                }
                let wave = rollout.wave_of(id, &node.stored.labels);
                wave_nodes[wave] += 1;
                if node.connected() && node.stored.version == rollout.version {
                    wave_running[wave] += 1;
                }
            }
        }
        let answers = self.all_answers(rollout.version);
        let reached = answers.reached_total();
        let not_reached = answers.not_reached_total();
        pb::RolloutStatus {
            wave_answered: reached.answered,
            wave_server_errors: reached.server_errors,
            baseline_answered: not_reached.answered,
            baseline_server_errors: not_reached.server_errors,
            max_5xx_increase: f64::from(rollout.max_5xx_increase_bp) / 100.0,
            state: rollout.state.name().to_owned(),
            released: rollout.released as u32,
            waves: waves as u32,
            wave_nodes,
            wave_running,
            baking_since: (rollout.baking_since != 0)
                .then(|| from_millis(rollout.baking_since).into()),
            bake_ms: rollout.bake_ms,
            reason: rollout.reason.clone(),
        }
    }
}

pub struct Fleet {
    inner: Mutex<Inner>,
    store: Store,
    /// The store's identity, sent with every push.
    store_id: String,
    events: broadcast::Sender<pb::FleetEvent>,
    /// Publishes are numbered and stored one at a time.
    publishing: tokio::sync::Mutex<()>,
    /// Woken by what can move a rollout (ACKs, NACKs, health, streams
    /// coming and going), so a wave that is done does not wait for the
    /// next tick.
    rollout_nudge: tokio::sync::Notify,
    next_session: AtomicU64,
    /// How a publish with no plan of its own is staged (`None`: at once).
    default_plan: Option<Plan>,
}

impl Fleet {
    pub fn new(
        store: Store,
        loaded: super::store::Loaded,
        default_plan: Option<Plan>,
    ) -> Result<Fleet, String> {
        let mut inner = Inner::default();
        for stored in loaded.versions {
            let version = Version::from_stored(stored)?;
            inner.add_version(Arc::new(version));
        }
        let now = millis(SystemTime::now());
        for (version, mut rollout) in loaded.rollouts {
            // Nodes reconnect after a restart: their ACK clock starts anew.
            if rollout.state == RolloutState::Running {
                rollout.wave_started = rollout.wave_started.max(now);
            }
            inner.rollouts.insert(version, rollout);
        }
        for (id, stored) in loaded.nodes {
            inner.nodes.insert(id, NodeEntry::new(stored));
        }
        Ok(Fleet {
            inner: Mutex::new(inner),
            store,
            store_id: loaded.store_id,
            events: broadcast::channel(EVENT_BUFFER).0,
            publishing: tokio::sync::Mutex::new(()),
            rollout_nudge: tokio::sync::Notify::new(),
            next_session: AtomicU64::new(1),
            default_plan,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn events(&self) -> broadcast::Receiver<pb::FleetEvent> {
        self.events.subscribe()
    }

    /// What a watcher that fell behind gets in place of `count` events.
    pub fn events_missed(count: u64) -> pb::FleetEvent {
        pb::FleetEvent {
            at: Some(SystemTime::now().into()),
            node_id: String::new(),
            event: Some(Event::EventsMissed(pb::EventsMissed { count })),
        }
    }

    fn emit(&self, node_id: &str, event: Event) {
        let _ = self.events.send(pb::FleetEvent {
            at: Some(SystemTime::now().into()),
            node_id: node_id.to_owned(),
            event: Some(event),
        });
    }

    /// Stores a new version durably, then hands it to every connected node
    /// it targets, or to its first wave.
    pub async fn publish(&self, publication: Publication) -> Result<Published, PublishError> {
        let _one_at_a_time = self.publishing.lock().await;
        let at_once = !publication.all_at_once_reason.is_empty() || publication.rollback_of > 0;
        let plan = match &publication.rollout {
            Some(plan) => Some(plan),
            None if at_once => None,
            None => self.default_plan.as_ref(),
        };
        // With a shared store another replica may take the number first:
        // then it arrives through the store, and the next one is tried.
        let (number, targets, rollout, stored) = loop {
            if let Some(earlier) = self.published_with_key(&publication)? {
                tracing::info!(version = earlier.number, key = %publication.idempotency_key, "publish repeated; answering the version it stored");
                return Ok(self.published(earlier.number, self.targets(&earlier)));
            }
            let number = self.lock().versions.keys().next_back().map_or(1, |n| n + 1);
            let targets = self.targets_for(&publication.selector);
            let now = millis(SystemTime::now());
            let rollout = plan.map(|plan| self.start_plan(plan, number, &targets, now));
            let stored = StoredVersion {
                version: number,
                checksum: crate::config::content_version(&publication.config),
                config: publication.config.clone(),
                selector: publication.selector.to_string(),
                comment: publication.comment.clone(),
                author: publication.author.clone(),
                published_at: now,
                rollback_of: publication.rollback_of,
                idempotency_key: publication.idempotency_key.clone(),
                rollout: rollout.clone(),
                all_at_once_reason: publication.all_at_once_reason.clone(),
            };
            match self
                .store
                .append_durable(Record::Version(stored.clone()))
                .await
            {
                Ok(()) => break (number, targets, rollout, stored),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    tracing::info!(
                        version = number,
                        "another replica published this number first; taking the next"
                    );
                    self.wait_for_version(number).await?;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let span = spans::start(
            format!("publish v{number}"),
            SpanKind::Server,
            "",
            vec![
                KeyValue::new("tether.version", number as i64),
                KeyValue::new("tether.selector", stored.selector.clone()),
            ],
        );
        let mut version = Version::from_stored(stored).map_err(std::io::Error::other)?;
        version.traceparent = spans::traceparent(span.as_ref());
        let version = Arc::new(version);
        metrics::controller().publishes.add(1, &[]);
        if let Some(rollout) = rollout {
            self.start_rollout(rollout, &targets);
        }
        let mut inner = self.lock();
        inner.add_version(version.clone());
        inner.push_desired();
        drop(inner);
        tracing::info!(version = number, selector = %version.selector, targets = targets.len(), "version published");
        if let Some(span) = &span {
            span.span()
                .set_attribute(KeyValue::new("tether.targets", targets.len() as i64));
        }
        spans::end(span, None);
        self.emit("", Event::Published(version.info()));
        Ok(self.published(number, targets))
    }

    /// A rollout of version `number` by `plan`, starting `now`.
    fn start_plan(&self, plan: &Plan, number: u64, targets: &[String], now: u64) -> StoredRollout {
        let rollout = match &plan.by_label {
            Some(label) => {
                let inner = self.lock();
                let labels: Vec<&BTreeMap<String, String>> = targets
                    .iter()
                    .filter_map(|id| inner.nodes.get(id).map(|n| &n.stored.labels))
                    .collect();
                StoredRollout::start_by_label(
                    number,
                    label,
                    plan.bake,
                    plan.ack_timeout,
                    &labels,
                    now,
                )
            }
            None => {
                let ids: Vec<&str> = targets.iter().map(String::as_str).collect();
                StoredRollout::start(number, &plan.waves, plan.bake, plan.ack_timeout, &ids, now)
            }
        };
        StoredRollout {
            max_5xx_increase_bp: plan.max_5xx_increase_bp,
            ..rollout
        }
    }

    /// Waits until version `number`, stored by another replica, has
    /// arrived here.
    async fn wait_for_version(&self, number: u64) -> Result<(), PublishError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.lock().versions.contains_key(&number) {
            if tokio::time::Instant::now() >= deadline {
                return Err(PublishError::Store(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("version {number} was taken by another replica and has not arrived here within 5 s"),
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn published(&self, version: u64, targets: Vec<String>) -> Published {
        let inner = self.lock();
        let rollout = inner
            .rollouts
            .get(&version)
            .map(|rollout| inner.rollout_status(rollout));
        Published {
            version,
            targets,
            rollout,
        }
    }

    /// The version an earlier publish with the same idempotency key stored.
    fn published_with_key(
        &self,
        publication: &Publication,
    ) -> Result<Option<Arc<Version>>, PublishError> {
        let key = &publication.idempotency_key;
        if key.is_empty() {
            return Ok(None);
        }
        let inner = self.lock();
        let Some(earlier) = inner.keys.get(key).and_then(|n| inner.versions.get(n)) else {
            return Ok(None);
        };
        let same = earlier.config == publication.config.as_bytes()
            && earlier.selector.to_string() == publication.selector.to_string()
            && earlier.rollback_of == publication.rollback_of;
        if !same {
            return Err(PublishError::KeyReused {
                key: key.clone(),
                version: earlier.number,
            });
        }
        Ok(Some(earlier.clone()))
    }

    /// Every known node `version` targets.
    fn targets(&self, version: &Version) -> Vec<String> {
        self.targets_for(&version.selector)
    }

    /// Every known node `selector` matches.
    fn targets_for(&self, selector: &Selector) -> Vec<String> {
        self.lock()
            .nodes
            .iter()
            .filter(|(_, node)| selector.matches(&node.stored.labels))
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub fn version(&self, number: u64) -> Option<Arc<Version>> {
        self.lock().versions.get(&number).cloned()
    }

    /// Newest first, each with its rollout's status.
    pub fn versions(&self) -> Vec<pb::VersionInfo> {
        let inner = self.lock();
        inner
            .versions
            .values()
            .rev()
            .map(|v| pb::VersionInfo {
                rollout: inner
                    .rollouts
                    .get(&v.number)
                    .map(|r| inner.rollout_status(r)),
                ..v.info()
            })
            .collect()
    }

    /// Starts `rollout` (stored with its version), and stops the running
    /// rollouts it overlaps: they keep the waves they reached.
    fn start_rollout(&self, rollout: StoredRollout, targets: &[String]) {
        let number = rollout.version;
        let superseded: Vec<StoredRollout> = {
            let inner = self.lock();
            inner
                .rollouts
                .values()
                // Its own rollout may be here already: a shared store
                // hands every replica the version, this one included.
                .filter(|r| r.state == RolloutState::Running && r.version != number)
                .filter(|r| {
                    inner.versions.get(&r.version).is_some_and(|older| {
                        inner.nodes.iter().any(|(id, n)| {
                            older.selector.matches(&n.stored.labels) && targets.contains(id)
                        })
                    })
                })
                .map(|r| StoredRollout {
                    state: RolloutState::Superseded,
                    reason: format!("superseded by v{number}"),
                    ..r.clone()
                })
                .collect()
        };
        let mut inner = self.lock();
        for stopped in superseded {
            tracing::info!(version = stopped.version, by = number, "rollout superseded");
            self.store.append(Record::Rollout(stopped.clone()));
            self.emit_rollout(stopped.version, inner.rollout_status(&stopped));
            inner.rollouts.insert(stopped.version, stopped);
        }
        tracing::info!(version = number, waves = rollout.waves(), "rollout started");
        inner.rollouts.insert(number, rollout);
    }

    /// Runs the gates of every running rollout, for as long as the fleet
    /// lives.
    pub async fn drive_rollouts(self: Arc<Self>) {
        let mut tick = tokio::time::interval(rollout::STEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A burst of answers wakes it once (Notify keeps one permit).
            tokio::select! {
                _ = tick.tick() => {}
                () = self.rollout_nudge.notified() => {}
            }
            // With a shared store, one replica drives them; the others
            // learn each move from the store.
            if self.store.is_leader() {
                self.step_rollouts(millis(SystemTime::now()));
            }
            // A step looks at every target node: during a burst of ACKs
            // it runs at most this often, the rest coalesce.
            tokio::time::sleep(rollout::MIN_STEP_GAP).await;
        }
    }

    fn step_rollouts(&self, now: u64) {
        let mut inner = self.lock();
        let running: Vec<u64> = inner
            .rollouts
            .values()
            .filter(|r| r.state == RolloutState::Running)
            .map(|r| r.version)
            .collect();
        for number in running {
            let (Some(rollout), Some(version)) =
                (inner.rollouts.get(&number), inner.versions.get(&number))
            else {
                continue;
            };
            let targets: Vec<(&String, &NodeEntry)> = inner
                .nodes
                .iter()
                .filter(|(_, n)| version.selector.matches(&n.stored.labels))
                .collect();
            // Only nodes with a server down allocate anything here.
            let downs: Vec<Vec<String>> = targets
                .iter()
                .map(|(_, n)| {
                    n.health
                        .iter()
                        .filter(|(_, state)| **state == pb::HealthState::Unhealthy as i32)
                        .map(|((upstream, server), _)| format!("{upstream}/{server}"))
                        .collect()
                })
                .collect();
            let views: Vec<NodeView> = targets
                .iter()
                .zip(&downs)
                .map(|((id, n), down)| NodeView {
                    id,
                    labels: &n.stored.labels,
                    connected: n.connected(),
                    version: n.stored.version,
                    nacked: n
                        .stored
                        .last_nack
                        .as_ref()
                        .map(|nack| (nack.version, nack.reason.as_str())),
                    down,
                    reports_every_ms: n.answers.every_ms,
                    silent_ms: now.saturating_sub(n.answers.last_ms),
                })
                .collect();
            let all_answers = inner.all_answers(number);
            let answers = &all_answers;
            // Steps that need no wait follow each other at once (with no
            // bake, a wave that is done releases the next right away).
            let mut next = rollout.clone();
            let mut changes = Vec::new();
            loop {
                match rollout::evaluate(&next, &views, answers, now) {
                    Step::Wait => break,
                    Step::StartBake => next.baking_since = now,
                    Step::Release => {
                        next.released += 1;
                        next.wave_started = now;
                        next.baking_since = 0;
                        tracing::info!(
                            version = number,
                            wave = next.released,
                            "rollout: next wave released"
                        );
                    }
                    Step::Complete => {
                        next.state = RolloutState::Completed;
                        tracing::info!(version = number, "rollout completed");
                    }
                    Step::Fail(reason) => {
                        tracing::warn!(version = number, %reason, "rollout failed; withdrawing the version");
                        next.state = RolloutState::Failed;
                        next.reason = reason;
                    }
                }
                changes.push(next.clone());
                if next.state != RolloutState::Running {
                    break;
                }
            }
            drop(views);
            drop(targets);
            if changes.is_empty() {
                continue;
            }
            for change in changes {
                self.store.append(Record::Rollout(change));
            }
            let status = inner.rollout_status(&next);
            inner.rollouts.insert(number, next);
            inner.push_desired();
            self.emit_rollout(number, status);
        }
        let Inner {
            rollouts,
            answers,
            shared_answers,
            ..
        } = &mut *inner;
        let live = |number: &u64| {
            rollouts
                .get(number)
                .is_some_and(|r| matches!(r.state, RolloutState::Running | RolloutState::Paused))
        };
        answers.retain(|number, _| live(number));
        shared_answers.retain(|number, _| live(number));
    }

    fn emit_rollout(&self, version: u64, status: pb::RolloutStatus) {
        self.emit(
            "",
            Event::Rollout(pb::RolloutChanged {
                version,
                status: Some(status),
            }),
        );
    }

    /// Aborts (withdrawing the version from the waves it reached), pauses,
    /// resumes or promotes a rollout, for `operator` (when known); an
    /// abort records them and their `reason`.
    pub fn control_rollout(
        &self,
        number: u64,
        action: Action,
        operator: Option<&str>,
        reason: &str,
    ) -> Result<pb::RolloutStatus, String> {
        let by = operator.map_or(String::new(), |name| format!(" by {name}"));
        let reason = match reason {
            "" => format!("aborted{by}"),
            given => format!("aborted{by}: {given}"),
        };
        let mut inner = self.lock();
        let Some(rollout) = inner.rollouts.get(&number) else {
            return Err(format!("version {number} has no rollout"));
        };
        let next = rollout.after(action, reason, millis(SystemTime::now()))?;
        tracing::warn!(version = number, ?action, reason = %next.reason, state = next.state.name(), "rollout changed by an operator");
        self.store.append(Record::Rollout(next.clone()));
        inner.rollouts.insert(number, next.clone());
        inner.push_desired();
        let status = inner.rollout_status(&next);
        drop(inner);
        self.rollout_nudge.notify_one();
        self.emit_rollout(number, status.clone());
        Ok(status)
    }

    /// A node opened a Sync stream and said Hello. A stream the node had
    /// open before is ended.
    pub fn connect(&self, hello: pb::Hello, address: String) -> Session {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let labels: BTreeMap<String, String> = hello.labels.into_iter().collect();
        let replaced = CancellationToken::new();
        let mut inner = self.lock();
        // The node runs our version N only if it came from this store with
        // N's content; a number from another store, or with other content,
        // is not ours (0), and the node is pushed what it should run.
        let runs = inner
            .versions
            .get(&hello.version)
            .filter(|version| hello.store_id == self.store_id && hello.checksum == version.checksum)
            .map_or(0, |version| version.number);
        if runs != hello.version {
            tracing::warn!(node = %hello.node_id, claimed = hello.version, store = %hello.store_id, checksum = %hello.checksum, "the node runs a version this store did not give it; counting it as none");
        }
        let desired = inner
            .desired_for(&hello.node_id, &labels)
            .filter(|version| version.number != runs)
            .cloned();
        let (desired_sender, desired_receiver) = watch::channel(desired);
        let entry = inner.nodes.entry(hello.node_id.clone()).or_insert_with(|| {
            NodeEntry::new(StoredNode {
                id: hello.node_id.clone(),
                ..StoredNode::default()
            })
        });
        if let Some(previous) = entry.connection.take() {
            previous.replaced.cancel();
        }
        entry.connection = Some(Connection {
            session: id,
            desired: desired_sender,
            replaced: replaced.clone(),
            address: address.clone(),
        });
        entry.stored.labels = labels.clone();
        entry.stored.version = runs;
        entry.stored.generation = hello.generation;
        entry.stored.build = hello.build;
        entry.stored.last_seen = millis(SystemTime::now());
        entry.answers = AnswerReports {
            every_ms: hello.traffic_report_ms,
            last_ms: entry.stored.last_seen,
            last: None,
        };
        entry.health = hello
            .health
            .into_iter()
            .map(|h| ((h.upstream, h.server), h.state))
            .collect();
        entry.elsewhere = None;
        self.store.append(entry.record());
        self.store.hold_stream(&hello.node_id, true);
        drop(inner);
        tracing::info!(node = %hello.node_id, session = id, version = runs, %address, "node connected");
        self.emit(
            &hello.node_id,
            Event::Connected(pb::NodeConnected {
                labels: labels.into_iter().collect(),
                version: runs,
                address,
            }),
        );
        Session {
            id,
            node_id: hello.node_id,
            desired: desired_receiver,
            replaced,
            store_id: self.store_id.clone(),
        }
    }

    /// Runs `change` on the node's entry if `session` is still its
    /// current stream, then stores the entry.
    fn update(&self, session: &Session, change: impl FnOnce(&mut NodeEntry)) -> bool {
        let mut inner = self.lock();
        let Some(entry) = inner.nodes.get_mut(&session.node_id) else {
            return false;
        };
        if entry.connection.as_ref().map(|c| c.session) != Some(session.id) {
            return false;
        }
        change(entry);
        entry.stored.last_seen = millis(SystemTime::now());
        self.store.append(entry.record());
        true
    }

    pub fn ack(&self, session: &Session, ack: pb::Ack) {
        let applied = self.update(session, |entry| {
            entry.stored.version = ack.version;
            entry.stored.generation = ack.generation;
            if entry
                .stored
                .last_nack
                .as_ref()
                .is_some_and(|nack| nack.version <= ack.version)
            {
                entry.stored.last_nack = None;
            }
        });
        if applied {
            self.record_answer(session, ack.version, "ack", None);
            tracing::info!(node = %session.node_id, version = ack.version, generation = ack.generation, "ACK");
            self.emit(&session.node_id, Event::Acked(ack));
        }
        self.rollout_nudge.notify_one();
    }

    pub fn nack(&self, session: &Session, nack: pb::Nack) {
        let record = StoredNack {
            version: nack.version,
            reason: nack.reason.clone(),
            errors: nack
                .errors
                .iter()
                .map(|e| StoredConfigError {
                    path: e.path.clone(),
                    line: e.line,
                    column: e.column,
                    message: e.message.clone(),
                })
                .collect(),
            at: millis(SystemTime::now()),
        };
        if self.update(session, |entry| entry.stored.last_nack = Some(record)) {
            self.record_answer(session, nack.version, "nack", Some(nack.reason.clone()));
            tracing::warn!(node = %session.node_id, version = nack.version, reason = %nack.reason, errors = nack.errors.len(), "NACK");
            self.emit(&session.node_id, Event::Nacked(nack));
        }
        self.rollout_nudge.notify_one();
    }

    /// Counts an ACK or NACK and adds it to the publish's trace.
    fn record_answer(
        &self,
        session: &Session,
        version: u64,
        result: &'static str,
        error: Option<String>,
    ) {
        let metrics = metrics::controller();
        metrics.answers.add(1, &[KeyValue::new("result", result)]);
        let Some(published) = self.version(version) else {
            return;
        };
        if result == "ack" {
            let latency = published.published_at.elapsed().unwrap_or_default();
            metrics.publish_to_ack.record(latency.as_secs_f64(), &[]);
        }
        let span = spans::start(
            format!("{result} v{version}"),
            SpanKind::Server,
            &published.traceparent,
            vec![KeyValue::new("tether.node", session.node_id.clone())],
        );
        spans::end(span, error);
    }

    pub fn health(&self, session: &Session, report: pb::HealthReport) {
        let mut inner = self.lock();
        let Some(entry) = inner.nodes.get_mut(&session.node_id) else {
            return;
        };
        for transition in &report.transitions {
            let key = (transition.upstream.clone(), transition.server.clone());
            // Unknown: the node no longer checks it (its config dropped it).
            if transition.to == pb::HealthState::Unknown as i32 {
                entry.health.remove(&key);
            } else {
                entry.health.insert(key, transition.to);
            }
        }
        // Other replicas' gates and listings need it; a single controller
        // keeps health in memory only (a node's Hello brings it again).
        if self.store.is_shared() {
            self.store.append(entry.record());
        }
        drop(inner);
        for transition in report.transitions {
            self.emit(&session.node_id, Event::Health(transition));
        }
        self.rollout_nudge.notify_one();
    }

    /// A node's answer counters: what changed since its last report goes
    /// to the tally of each live rollout it is a target of, on the side of
    /// the new version when the rollout reached it and it ran that version,
    /// on the old side when neither.
    pub fn traffic(&self, session: &Session, report: pb::TrafficReport) {
        let now = millis(SystemTime::now());
        let mut inner = self.lock();
        let Inner {
            nodes,
            versions,
            rollouts,
            answers,
            ..
        } = &mut *inner;
        let Some(entry) = nodes.get_mut(&session.node_id) else {
            return;
        };
        if entry.connection.as_ref().map(|c| c.session) != Some(session.id) {
            return;
        }
        let counted = Counts {
            answered: report.answered,
            server_errors: report.server_errors,
        };
        entry.answers.last_ms = now;
        let Some(earlier) = entry.answers.last.replace(counted) else {
            return;
        };
        let new = counted.since(earlier);
        if new.answered == 0 {
            return;
        }
        let (id, labels) = (&session.node_id, &entry.stored.labels);
        for rollout in rollouts.values() {
            if !matches!(rollout.state, RolloutState::Running | RolloutState::Paused)
                || !versions
                    .get(&rollout.version)
                    .is_some_and(|v| v.selector.matches(labels))
            {
                continue;
            }
            let reached = rollout.releases_to(id, labels);
            if reached == (report.version == rollout.version) {
                answers
                    .entry(rollout.version)
                    .or_default()
                    .add(id, reached, new);
            }
        }
    }

    /// The stream ended. A stream already replaced by a newer one changes
    /// nothing.
    pub fn disconnect(&self, session: &Session, reason: String) {
        let mut inner = self.lock();
        let Some(entry) = inner.nodes.get_mut(&session.node_id) else {
            return;
        };
        if entry.connection.as_ref().map(|c| c.session) != Some(session.id) {
            return;
        }
        entry.connection = None;
        entry.stored.last_seen = millis(SystemTime::now());
        self.store.append(entry.record());
        self.store.hold_stream(&session.node_id, false);
        drop(inner);
        tracing::info!(node = %session.node_id, session = session.id, %reason, "node disconnected");
        self.emit(
            &session.node_id,
            Event::Disconnected(pb::NodeDisconnected { reason }),
        );
        self.rollout_nudge.notify_one();
    }

    pub fn nodes(&self, selector: &Selector) -> Vec<pb::NodeStatus> {
        let inner = self.lock();
        inner
            .nodes
            .values()
            .filter(|node| selector.matches(&node.stored.labels))
            .map(|node| {
                let stored = &node.stored;
                let down: Vec<String> = node
                    .health
                    .iter()
                    .filter(|(_, state)| **state == pb::HealthState::Unhealthy as i32)
                    .map(|((upstream, server), _)| format!("{upstream}/{server}"))
                    .collect();
                let up: Vec<String> = node
                    .health
                    .iter()
                    .filter(|(_, state)| **state == pb::HealthState::Healthy as i32)
                    .map(|((upstream, server), _)| format!("{upstream}/{server}"))
                    .collect();
                pb::NodeStatus {
                    id: stored.id.clone(),
                    labels: stored.labels.clone().into_iter().collect(),
                    connected: node.connected(),
                    last_seen: Some(from_millis(stored.last_seen).into()),
                    desired_version: inner
                        .desired_for(&stored.id, &stored.labels)
                        .map_or(0, |v| v.number),
                    version: stored.version,
                    generation: stored.generation,
                    last_nack: stored.last_nack.as_ref().map(|nack| pb::NackRecord {
                        version: nack.version,
                        reason: nack.reason.clone(),
                        errors: wire_errors(&nack.errors),
                        at: Some(from_millis(nack.at).into()),
                    }),
                    servers_up: up.len() as u32,
                    up,
                    servers_down: down.len() as u32,
                    down,
                    build: stored.build.clone(),
                    address: node
                        .connection
                        .as_ref()
                        .map(|c| c.address.clone())
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Each upstream server (of `upstream`, or all) as the connected
    /// nodes report it.
    pub fn fleet_health(&self, upstream: &str) -> Vec<pb::ServerFleetHealth> {
        let inner = self.lock();
        let mut servers: BTreeMap<(String, String), pb::ServerFleetHealth> = BTreeMap::new();
        for (id, node) in &inner.nodes {
            if !node.connected() {
                continue;
            }
            for ((name, server), state) in &node.health {
                if !upstream.is_empty() && name != upstream {
                    continue;
                }
                let entry = servers
                    .entry((name.clone(), server.clone()))
                    .or_insert_with(|| pb::ServerFleetHealth {
                        upstream: name.clone(),
                        server: server.clone(),
                        ..Default::default()
                    });
                let seen = match pb::HealthState::try_from(*state) {
                    Ok(pb::HealthState::Healthy) => &mut entry.up,
                    Ok(pb::HealthState::Unhealthy) => &mut entry.down,
                    _ => &mut entry.unknown,
                };
                seen.push(id.clone());
            }
        }
        servers.into_values().collect()
    }

    pub fn connected(&self) -> usize {
        self.lock()
            .nodes
            .values()
            .filter(|n| n.connection.is_some())
            .count()
    }
}

/// A stored NACK's errors as the API gives them.
fn wire_errors(errors: &[StoredConfigError]) -> Vec<pb::ConfigError> {
    errors
        .iter()
        .map(|e| pb::ConfigError {
            path: e.path.clone(),
            line: e.line,
            column: e.column,
            message: e.message.clone(),
        })
        .collect()
}

fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_millis(millis: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis)
}
