//! The node as a library: `Node::start` runs what `tether node` runs (the
//! first config, or the last one its controller pushed; the control
//! service; the controller agent) and answers a handle that reports every
//! bound address, so a caller (the command line, a test) needs no log line
//! and no guessed port. Process concerns (signals, telemetry export, the
//! Prometheus endpoint) stay with the command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError, ListenAddr};
use crate::supervisor::{self, Applied, ApplyError, ApplySource, NodeHandle, StopReport};

/// How long the control service may take to answer its last calls once
/// the node has drained.
const CONTROL_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The first config did not apply (invalid, a listener cannot bind, the
    /// file cannot be read).
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("cannot bind the control service to {addr}: {error}")]
    ControlBind {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

impl StartError {
    /// The config errors, located, when the first config was refused.
    pub fn config_errors(&self) -> Option<&[ConfigError]> {
        match self {
            StartError::Apply(ApplyError::Invalid(errors) | ApplyError::Bind(errors)) => {
                Some(errors)
            }
            _ => None,
        }
    }
}

/// A running node.
pub struct Node {
    handle: NodeHandle,
    control_addr: SocketAddr,
    control: JoinHandle<()>,
    agent: Option<JoinHandle<()>>,
}

impl Node {
    /// Starts a node on the config file at `config_path`: its listeners
    /// accept, its control service answers, and with `[controller]` its
    /// agent connects, before this returns.
    pub async fn start(config_path: &Path) -> Result<Node, StartError> {
        let local = local_config(config_path);
        let handle = start_supervisor(config_path, local.as_ref()).await?;
        let generation = handle.current().expect("a started node has a generation");
        let control_settings = generation.config.control.clone();
        let listen = control_settings.listen;
        let control_listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(listener) => listener,
            Err(error) => {
                handle.stop(Some(Duration::ZERO)).await;
                return Err(StartError::ControlBind {
                    addr: listen,
                    error,
                });
            }
        };
        let control_addr = control_listener.local_addr().unwrap_or(listen);
        // `[controller]` is read once, at start: the agent's connection is
        // not re-pointed by a reload.
        let agent = generation.config.controller.clone().map(|settings| {
            let id = generation.config.node.id.clone();
            tokio::spawn(crate::agent::run(handle.clone(), settings, id))
        });
        let control = tokio::spawn({
            let node = handle.clone();
            async move {
                let stopped = node.clone();
                let tls = control_settings.tls.as_ref();
                let until_stopped = async move { stopped.stopped().await };
                if let Err(e) =
                    crate::control::serve(control_listener, tls, node, until_stopped).await
                {
                    tracing::error!(error = %e, "control service failed");
                }
            }
        });
        Ok(Node {
            handle,
            control_addr,
            control,
            agent,
        })
    }

    /// The supervisor's handle: apply, watch events, read the generations.
    pub fn handle(&self) -> &NodeHandle {
        &self.handle
    }

    /// Where the control service listens.
    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }

    /// The bound address of each listener of the config in force, by name
    /// (port 0 resolved).
    pub fn listeners(&self) -> Vec<(String, ListenAddr)> {
        self.handle
            .current()
            .map(|generation| {
                generation
                    .listeners
                    .iter()
                    .map(|l| (l.config.name.clone(), l.bound.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The bound TCP address of the listener called `name`.
    pub fn listener(&self, name: &str) -> Option<SocketAddr> {
        self.listeners()
            .into_iter()
            .find_map(|(listener, addr)| match addr {
                ListenAddr::Tcp(addr) if listener == name => Some(addr),
                _ => None,
            })
    }

    /// Re-reads the config file (SIGHUP).
    pub async fn reload(&self) -> Result<Applied, ApplyError> {
        self.handle.apply(ApplySource::File).await
    }

    /// Resolves once the node has stopped (a `Stop` call, or `shutdown`).
    pub async fn stopped(&self) {
        self.handle.stopped().await
    }

    /// Stops accepting, drains up to `drain` (default: the config's
    /// `drain_timeout`), and ends the control service and the agent.
    pub async fn shutdown(self, drain: Option<Duration>) -> Option<StopReport> {
        let report = self.handle.stop(drain).await;
        self.handle.stopped().await;
        // Lets the control service finish answering (a Stop call, say), but
        // a client that keeps its connection open does not hold the exit.
        let _ = tokio::time::timeout(CONTROL_SHUTDOWN_GRACE, self.control).await;
        if let Some(agent) = self.agent {
            agent.abort();
        }
        report
    }
}

/// The node's own file, parsed for its node-local settings; `None` if it
/// does not parse (the first apply reports why).
pub fn local_config(config_path: &Path) -> Option<Config> {
    let text = std::fs::read_to_string(config_path).ok()?;
    let base_dir = config_path.parent().unwrap_or(Path::new("."));
    Config::parse(&text, base_dir).ok()
}

/// Starts the supervisor on the last config its controller pushed, if it
/// has one, so that a restart while the controller is down serves what the
/// fleet last agreed on; otherwise (or if that config no longer applies
/// here) on the config file.
async fn start_supervisor(
    config_path: &Path,
    local: Option<&Config>,
) -> Result<NodeHandle, ApplyError> {
    let file: Option<PathBuf> = Some(config_path.to_path_buf());
    let last_acked = local
        .and_then(|config| config.controller.clone())
        .and_then(
            |controller| match crate::agent::state::load(&controller.state_dir) {
                Ok(state) => state,
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring the saved controller config");
                    None
                }
            },
        );
    if let Some(state) = last_acked {
        let source = ApplySource::Controller {
            version: state.controller_version(),
            text: state.config,
            traceparent: String::new(),
        };
        match supervisor::start(file.clone(), source).await {
            Ok(node) => {
                tracing::info!(
                    version = state.version,
                    "serving the last config acknowledged to the controller"
                );
                return Ok(node);
            }
            Err(e) => {
                tracing::warn!(error = %e, version = state.version, "the saved controller config does not apply; starting from the file")
            }
        }
    }
    supervisor::start(file, ApplySource::File).await
}
