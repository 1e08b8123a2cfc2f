//! The supervisor owns the generation in force and is the only place that
//! applies config. Startup, SIGHUP, the control service and controller
//! pushes all send it an apply request; requests are handled one at a
//! time, and a request still queued when a newer one arrives is superseded.
//!
//! Apply: parse + validate → bind new addresses → build generation N+1 →
//! N+1 accepts → N retires (stops accepting, drains up to its
//! drain_timeout) → N is dropped. Any failure before the switch leaves N
//! in force, untouched.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

use crate::config::{compose_pushed, content_version, Config, ConfigError, ListenerConfig};
use crate::events::{ConfigInfo, ConfigSource, ControllerVersion, NodeEvent};
use crate::generation::{self, Generation};
use crate::health::HealthRegistry;
use crate::listen::SocketRegistry;
use crate::telemetry::spans;
use crate::tunnel::Tunnels;
use crate::upstream::{ClientKey, ClientRegistry};
use crate::workers::Workers;
use opentelemetry::trace::SpanKind;

/// What to apply.
#[derive(Debug, Clone)]
pub enum ApplySource {
    /// Re-read the node's config file.
    File,
    /// Config text given directly (control service).
    Inline(String),
    /// Traffic config pushed by a controller (or its last acknowledged
    /// push, at start); the node-local sections come from the config file.
    Controller {
        version: ControllerVersion,
        text: String,
        /// The publish's trace context, so the apply joins its trace.
        traceparent: String,
    },
}

/// The outcome of a successful apply.
#[derive(Debug, Clone)]
pub struct Applied {
    pub generation: u64,
    pub info: ConfigInfo,
    pub duration: Duration,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApplyError {
    #[error("invalid config:\n{}", join(.0))]
    Invalid(Vec<ConfigError>),
    #[error("cannot bind:\n{}", join(.0))]
    Bind(Vec<ConfigError>),
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("a newer config arrived before this one was applied")]
    Superseded,
    #[error("the node is stopping")]
    Stopping,
    #[error("cannot start {workers} worker threads: {reason}")]
    Workers { workers: usize, reason: String },
    #[error("the node has no config file to re-read; it was started with inline config")]
    NoConfigFile,
}

fn join(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(|e| format!("  {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What `Stop` reports when it begins.
#[derive(Debug, Clone, Copy)]
pub struct StopReport {
    pub generation: u64,
    pub open_connections: u64,
}

enum Command {
    Apply(ApplySource, oneshot::Sender<Result<Applied, ApplyError>>),
    Stop(Option<Duration>, oneshot::Sender<StopReport>),
}

/// State readers share with the supervisor.
struct Shared {
    current: RwLock<Option<Arc<Generation>>>,
    draining: Mutex<Vec<Arc<Generation>>>,
    events: broadcast::Sender<NodeEvent>,
    stopped: watch::Sender<bool>,
    config_path: Option<PathBuf>,
    /// Started with the first config; `[node] workers` is read then.
    workers: OnceLock<Arc<Workers>>,
    /// Reverse tunnels, dialed and accepted, kept across generations.
    tunnels: Arc<Tunnels>,
}

/// The controller push in force, so that re-reading the file (SIGHUP)
/// refreshes the node-local sections and keeps the pushed traffic config.
struct Pushed {
    version: ControllerVersion,
    text: String,
}

/// A cheap handle to a running node.
#[derive(Clone)]
pub struct NodeHandle {
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

const EVENT_BUFFER: usize = 1024;

/// Starts a node: applies the config at `config_path` (or `inline` text)
/// and keeps serving it until stopped. Fails, with nothing left running,
/// if the first config cannot be applied.
pub async fn start(
    config_path: Option<PathBuf>,
    first: ApplySource,
) -> Result<NodeHandle, ApplyError> {
    let (commands, receiver) = mpsc::unbounded_channel();
    let events = broadcast::channel(EVENT_BUFFER).0;
    let tunnels = Arc::new(Tunnels::new(events.clone()));
    let shared = Arc::new(Shared {
        current: RwLock::new(None),
        draining: Mutex::new(Vec::new()),
        events,
        stopped: watch::channel(false).0,
        config_path,
        workers: OnceLock::new(),
        tunnels: tunnels.clone(),
    });
    let mut supervisor = Supervisor {
        health: HealthRegistry::new(shared.events.clone(), tunnels.hub.clone()),
        shared: shared.clone(),
        sockets: SocketRegistry::new(1),
        clients: ClientRegistry::new(1, tunnels.hub.clone()),
        next_generation: 1,
        drains: TaskTracker::new(),
        pushed: None,
    };
    supervisor.apply(first).await?;
    tokio::spawn(supervisor.run(receiver));
    Ok(NodeHandle { commands, shared })
}

impl NodeHandle {
    pub async fn apply(&self, source: ApplySource) -> Result<Applied, ApplyError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Apply(source, reply))
            .map_err(|_| ApplyError::Stopping)?;
        answer.await.unwrap_or(Err(ApplyError::Stopping))
    }

    /// Begins a graceful stop: the node stops accepting and drains up to
    /// `drain` (default: the config's drain_timeout). `stopped` resolves
    /// once every generation has drained.
    pub async fn stop(&self, drain: Option<Duration>) -> Option<StopReport> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Stop(drain, reply)).ok()?;
        answer.await.ok()
    }

    pub async fn stopped(&self) {
        let mut stopped = self.shared.stopped.subscribe();
        let _ = stopped.wait_for(|s| *s).await;
    }

    pub fn current(&self) -> Option<Arc<Generation>> {
        self.shared
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Retired generations whose connections are still draining.
    pub fn draining(&self) -> Vec<Arc<Generation>> {
        self.shared
            .draining
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.shared.events.subscribe()
    }

    pub fn config_path(&self) -> Option<&Path> {
        self.shared.config_path.as_deref()
    }

    /// The node's reverse tunnels, dialed and accepted.
    pub fn tunnels(&self) -> Vec<crate::events::TunnelStatus> {
        self.shared.tunnels.statuses()
    }

    /// Tasks alive on the worker threads.
    pub fn worker_tasks(&self) -> usize {
        self.shared.workers.get().map_or(0, |w| w.alive_tasks())
    }

    /// Publishes a health change to watchers.
    pub fn publish(&self, event: NodeEvent) {
        let _ = self.shared.events.send(event);
    }
}

struct Supervisor {
    shared: Arc<Shared>,
    /// Active health checkers, kept across generations.
    health: HealthRegistry,
    sockets: SocketRegistry,
    clients: ClientRegistry,
    next_generation: u64,
    /// One task per retired generation, draining it.
    drains: TaskTracker,
    pushed: Option<Pushed>,
}

impl Supervisor {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        while let Some(first) = commands.recv().await {
            let mut batch = vec![first];
            while let Ok(next) = commands.try_recv() {
                batch.push(next);
            }
            if let Some(index) = batch.iter().position(|c| matches!(c, Command::Stop(..))) {
                let Command::Stop(drain, reply) = batch.remove(index) else {
                    unreachable!()
                };
                for command in batch {
                    if let Command::Apply(_, reply) = command {
                        let _ = reply.send(Err(ApplyError::Stopping));
                    }
                }
                self.stop(drain, reply).await;
                break;
            }
            let mut applies: Vec<_> = batch
                .into_iter()
                .map(|c| match c {
                    Command::Apply(source, reply) => (source, reply),
                    Command::Stop(..) => unreachable!(),
                })
                .collect();
            let (source, reply) = applies.pop().expect("a batch has one command");
            for (_, superseded) in applies {
                let _ = superseded.send(Err(ApplyError::Superseded));
            }
            let _ = reply.send(self.apply(source).await);
        }
        // Every handle dropped or stopped: nothing more to apply.
        self.sockets.release_all();
        self.health.stop_all();
        self.drains.close();
        self.drains.wait().await;
        if let Some(workers) = self.shared.workers.get() {
            workers.stop();
        }
        // send_replace: the value must change even if nobody watches yet
        // (`send` drops it then, and a later `stopped()` would wait forever).
        self.shared.stopped.send_replace(true);
    }

    fn read_file(&self) -> Result<(String, PathBuf), ApplyError> {
        let path = self
            .shared
            .config_path
            .clone()
            .ok_or(ApplyError::NoConfigFile)?;
        let text = std::fs::read_to_string(&path).map_err(|e| ApplyError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok((text, path))
    }

    /// The text to apply, where it came from, the directory its relative
    /// file names are under, and the push it carries (if any).
    fn read_source(&self, source: ApplySource) -> Result<SourceText, ApplyError> {
        let base_dir = |path: &Path| path.parent().map(Path::to_path_buf).unwrap_or_default();
        match source {
            ApplySource::File => match &self.pushed {
                Some(pushed) => self.read_source(ApplySource::Controller {
                    version: pushed.version.clone(),
                    text: pushed.text.clone(),
                    traceparent: String::new(),
                }),
                None => {
                    let (text, path) = self.read_file()?;
                    let base = base_dir(&path);
                    Ok((text, ConfigSource::File(path), base, None))
                }
            },
            ApplySource::Inline(text) => {
                let base = match &self.shared.config_path {
                    Some(path) => base_dir(path),
                    None => std::env::current_dir().unwrap_or_default(),
                };
                Ok((text, ConfigSource::Inline, base, None))
            }
            ApplySource::Controller { version, text, .. } => {
                let (local, path) = self.read_file()?;
                let composed = compose_pushed(&text, &local).map_err(ApplyError::Invalid)?;
                let source = ConfigSource::Controller(version.clone());
                let pushed = Pushed { version, text };
                Ok((composed, source, base_dir(&path), Some(pushed)))
            }
        }
    }

    async fn apply(&mut self, source: ApplySource) -> Result<Applied, ApplyError> {
        let started = Instant::now();
        let traceparent = match &source {
            ApplySource::Controller { traceparent, .. } => traceparent.as_str(),
            _ => "",
        };
        let span = spans::start(
            "config.apply".to_owned(),
            SpanKind::Internal,
            traceparent,
            Vec::new(),
        );
        let result = self
            .read_source(source)
            .and_then(|(text, source, base_dir, pushed)| {
                let result = self.apply_text(text, source, &base_dir);
                if result.is_ok() {
                    // An inline Reload replaces a pushed config until the next push.
                    self.pushed = pushed;
                }
                result
            });
        record_apply(&result, started.elapsed());
        spans::end(span, result.as_ref().err().map(ToString::to_string));
        match &result {
            Ok(applied) => tracing::info!(
                generation = applied.generation,
                source = applied.info.source.as_str(),
                version = %applied.info.version,
                duration = ?started.elapsed(),
                "config applied"
            ),
            Err(error) => {
                tracing::warn!(%error, duration = ?started.elapsed(), "config refused; the config in force is unchanged")
            }
        }
        result
    }

    fn apply_text(
        &mut self,
        text: String,
        source: ConfigSource,
        base_dir: &Path,
    ) -> Result<Applied, ApplyError> {
        let started = Instant::now();
        let config = Arc::new(Config::parse(&text, base_dir).map_err(ApplyError::Invalid)?);
        let workers = self.workers(&config)?;
        let listeners = &config.listeners;
        let prepared = self
            .sockets
            .prepare(listeners)
            .map_err(|failures| ApplyError::Bind(bind_errors(listeners, failures)))?;
        let bound = prepared
            .local_addrs()
            .map_err(|e| bind_failed(listeners, e))?;
        let previous = self.current();
        let number = self.next_generation;
        let text: Arc<str> = text.into();
        let info = ConfigInfo {
            version: match source {
                ConfigSource::Controller(ref version) => format!("v{}", version.number),
                _ => content_version(&text),
            },
            source,
            applied_at: SystemTime::now(),
            text: text.clone(),
        };
        let checks = self.health.prepare(&config);
        let built = Generation::build(
            number,
            config.clone(),
            info,
            &bound,
            previous.as_deref(),
            generation::Shared {
                checks: &checks,
                clients: &mut self.clients,
                tunnels: &self.shared.tunnels.hub,
                events: &self.shared.events,
            },
        );
        let generation = match built {
            Ok(generation) => Arc::new(generation),
            Err(error) => {
                let listener = &config.listeners[error.listener()];
                let located = listener.location.entry.error(error.to_string());
                return Err(ApplyError::Invalid(vec![located]));
            }
        };
        self.sockets
            .commit(&prepared)
            .map_err(|e| bind_failed(&config.listeners, e))?;
        // Before the new listeners accept: tunnels dialing in are admitted
        // by the config that takes force.
        self.shared.tunnels.hub.set_policy(&config.listeners);
        if let Err(e) = prepared.start_accepting(&generation, &workers) {
            generation.lifecycle.retire();
            return Err(bind_failed(&config.listeners, e));
        }
        // Switch: N+1 accepts from here on; N stops and drains.
        self.next_generation += 1;
        *self
            .shared
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(generation.clone());
        let in_use: Vec<ClientKey> = generation
            .upstreams
            .values()
            .map(|u| ClientKey::of(&u.config))
            .collect();
        self.clients.retain(&in_use);
        self.health.commit(checks, &generation.config);
        self.shared.tunnels.dial(
            &config.tunnels,
            &config.node.id,
            &workers,
            config.node.drain_timeout,
        );
        let previous_generation = previous.as_ref().map_or(0, |p| p.number);
        // Announced before the old generation retires, so watchers never
        // see it drained before they see what replaced it.
        let _ = self.shared.events.send(NodeEvent::ConfigApplied {
            generation: number,
            info: generation.info.clone(),
            previous_generation,
        });
        if let Some(previous) = previous {
            self.retire(previous, None);
        }
        Ok(Applied {
            generation: number,
            info: generation.info.clone(),
            duration: started.elapsed(),
        })
    }

    /// The worker threads, started with the first config.
    fn workers(&mut self, config: &Config) -> Result<Arc<Workers>, ApplyError> {
        let wanted = config.node.workers;
        if let Some(workers) = self.shared.workers.get() {
            if workers.len() != wanted {
                tracing::warn!(
                    running = workers.len(),
                    configured = wanted,
                    "[node] workers changes only when the node restarts"
                );
            }
            return Ok(workers.clone());
        }
        let workers = Workers::start(wanted).map_err(|error| ApplyError::Workers {
            workers: wanted,
            reason: error.to_string(),
        })?;
        let workers = Arc::new(workers);
        self.sockets = SocketRegistry::new(workers.len());
        self.clients = ClientRegistry::new(workers.len(), self.shared.tunnels.hub.clone());
        let _ = self.shared.workers.set(workers.clone());
        Ok(workers)
    }

    fn current(&self) -> Option<Arc<Generation>> {
        self.shared
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Retires `generation` and drains it in the background.
    fn retire(&self, generation: Arc<Generation>, deadline: Option<Duration>) {
        generation.lifecycle.retire();
        let deadline = deadline.unwrap_or(generation.config.node.drain_timeout);
        self.shared
            .draining
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(generation.clone());
        let shared = self.shared.clone();
        self.drains.spawn(async move {
            let closed_at_timeout = generation.lifecycle.drain(deadline).await;
            let number = generation.number;
            if closed_at_timeout > 0 {
                tracing::warn!(
                    generation = number,
                    closed_at_timeout,
                    "drain deadline passed; closed the remaining connections"
                );
            } else {
                tracing::info!(generation = number, "generation drained");
            }
            shared
                .draining
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|g| g.number != number);
            let _ = shared.events.send(NodeEvent::GenerationDrained {
                generation: number,
                closed_at_timeout,
            });
        });
    }

    async fn stop(&mut self, drain: Option<Duration>, reply: oneshot::Sender<StopReport>) {
        let current = self
            .shared
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let report = StopReport {
            generation: current.as_ref().map_or(0, |g| g.number),
            open_connections: current.as_ref().map_or(0, |g| g.lifecycle.connections()),
        };
        tracing::info!(
            generation = report.generation,
            open_connections = report.open_connections,
            "stopping: no longer accepting, draining"
        );
        let tunnel_drain = drain.unwrap_or_else(|| {
            current
                .as_ref()
                .map_or(Duration::ZERO, |g| g.config.node.drain_timeout)
        });
        self.shared.tunnels.stop(tunnel_drain);
        if let Some(current) = current {
            self.retire(current, drain);
        }
        let _ = reply.send(report);
    }
}

fn record_apply(result: &Result<Applied, ApplyError>, duration: Duration) {
    let outcome = match result {
        Ok(_) => "applied",
        Err(ApplyError::Invalid(_)) => "invalid",
        Err(ApplyError::Bind(_)) => "bind",
        Err(ApplyError::Read { .. } | ApplyError::NoConfigFile) => "read",
        Err(ApplyError::Superseded) => "superseded",
        Err(ApplyError::Stopping) => "stopping",
        Err(ApplyError::Workers { .. }) => "workers",
    };
    let metrics = crate::telemetry::metrics::node();
    metrics
        .config_applies
        .add(1, &[opentelemetry::KeyValue::new("result", outcome)]);
    metrics
        .config_apply_duration
        .record(duration.as_secs_f64(), &[]);
}

type SourceText = (String, ConfigSource, PathBuf, Option<Pushed>);

fn bind_errors(
    listeners: &[ListenerConfig],
    failures: Vec<crate::listen::BindFailure>,
) -> Vec<ConfigError> {
    failures
        .into_iter()
        .map(|f| {
            let listen = &listeners[f.listener_index].location.listen;
            listen.error(format!("cannot bind {}: {}", f.addr, f.error))
        })
        .collect()
}

/// A listening socket that failed after it was bound (rare: the system
/// ran out of something), placed at the first listener.
fn bind_failed(listeners: &[ListenerConfig], error: std::io::Error) -> ApplyError {
    let message = format!("cannot set up a listening socket: {error}");
    let located = match listeners.first() {
        Some(listener) => listener.location.entry.error(message),
        None => ConfigError {
            path: "listener".to_owned(),
            line: 0,
            column: 0,
            message,
        },
    };
    ApplyError::Bind(vec![located])
}

/// The node's gauges (telemetry) read the generations through this.
impl crate::telemetry::metrics::NodeGauges for NodeHandle {
    fn each_server_health(&self, each: &mut dyn FnMut(&str, String, crate::events::Health)) {
        let Some(generation) = self.current() else {
            return;
        };
        for upstream in generation.upstreams.values() {
            for server in &upstream.servers {
                each(
                    &upstream.config.name,
                    server.addr.to_string(),
                    server.health(),
                );
            }
        }
    }

    fn generation(&self) -> Option<(u64, String, ConfigSource)> {
        self.current().map(|generation| {
            (
                generation.number,
                generation.info.version.clone(),
                generation.info.source.clone(),
            )
        })
    }

    fn draining(&self) -> u64 {
        NodeHandle::draining(self).len() as u64
    }

    fn each_listener_connections(&self, each: &mut dyn FnMut(&str, u64)) {
        for generation in self.current().into_iter().chain(NodeHandle::draining(self)) {
            for listener in &generation.listeners {
                each(&listener.config.name, listener.open_connections());
            }
        }
    }
}
