//! `tether.v1.ControlService`: every call goes to the node's supervisor,
//! so a Reload here is exactly a SIGHUP or a controller push.

use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use super::convert;
use crate::config::{Config, ConfigError};
use crate::events::NodeEvent;
use crate::proto::v1 as pb;
use crate::proto::v1::control_service_server::ControlService;
use crate::supervisor::{ApplyError, ApplySource, NodeHandle};

/// Events queued for one WatchHealth client; past this the client is
/// behind and gets EventsMissed plus a fresh snapshot instead.
const WATCH_QUEUE: usize = 64;

pub struct ControlApi {
    node: NodeHandle,
}

impl ControlApi {
    pub fn new(node: NodeHandle) -> Self {
        ControlApi { node }
    }

    fn snapshot(&self) -> pb::NodeEvent {
        let current = self.node.current();
        let snapshot = pb::HealthSnapshot {
            upstreams: convert::upstreams(current.as_deref()),
            config: current
                .as_ref()
                .map(|g| convert::config_info(g.number, &g.info)),
            tunnels: convert::tunnel_statuses(self.node.tunnels()),
        };
        event(pb::node_event::Event::Snapshot(snapshot))
    }
}

fn event(event: pb::node_event::Event) -> pb::NodeEvent {
    pb::NodeEvent {
        at: Some(convert::timestamp(SystemTime::now())),
        event: Some(event),
    }
}

fn node_event(node_event: NodeEvent) -> pb::NodeEvent {
    use pb::node_event::Event;
    event(match node_event {
        NodeEvent::ConfigApplied {
            generation,
            info,
            previous_generation,
        } => Event::ConfigApplied(pb::ConfigApplied {
            config: Some(convert::config_info(generation, &info)),
            previous_generation,
        }),
        NodeEvent::GenerationDrained {
            generation,
            closed_at_timeout,
        } => Event::GenerationDrained(pb::GenerationDrained {
            generation,
            closed_at_timeout,
        }),
        NodeEvent::HealthChanged {
            upstream,
            server,
            from,
            to,
            reason,
        } => Event::Transition(convert::health_transition(
            upstream, server, from, to, reason,
        )),
        NodeEvent::TunnelChanged(status) => Event::Tunnel(convert::tunnel_status(status)),
    })
}

/// A failed apply as a status: the message lists every error; the details
/// carry them as google.rpc.BadRequest field violations.
fn apply_status(error: ApplyError) -> Status {
    let (code, errors) = match &error {
        ApplyError::Invalid(errors) => (Code::InvalidArgument, errors.as_slice()),
        ApplyError::Bind(errors) => (Code::FailedPrecondition, errors.as_slice()),
        ApplyError::Read { .. } | ApplyError::NoConfigFile => (Code::FailedPrecondition, &[][..]),
        ApplyError::Superseded => (Code::Aborted, &[][..]),
        ApplyError::Stopping => (Code::Unavailable, &[][..]),
        ApplyError::Workers { .. } => (Code::Internal, &[][..]),
    };
    convert::config_errors_status(code, error.to_string(), errors)
}

fn validate_response(result: Result<Config, Vec<ConfigError>>) -> pb::ValidateResponse {
    match result {
        Ok(config) => pb::ValidateResponse {
            valid: true,
            errors: Vec::new(),
            summary: config.summary(),
        },
        Err(errors) => pb::ValidateResponse {
            valid: false,
            summary: format!(
                "{} error{}",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" }
            ),
            errors: errors.iter().map(convert::config_error).collect(),
        },
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::NodeEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ControlService for ControlApi {
    async fn reload(
        &self,
        request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        use pb::reload_request::Source;
        let source = match request.into_inner().source {
            Some(Source::ConfigText(text)) => ApplySource::Inline(text),
            Some(Source::FromFile(_)) | None => ApplySource::File,
        };
        let applied = self.node.apply(source).await.map_err(apply_status)?;
        Ok(Response::new(pb::ReloadResponse {
            config: Some(convert::config_info(applied.generation, &applied.info)),
            apply_duration: prost_types::Duration::try_from(applied.duration).ok(),
        }))
    }

    async fn validate(
        &self,
        request: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        use pb::validate_request::Source;
        let base_dir = self
            .node
            .config_path()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let result = match request.into_inner().source {
            Some(Source::ConfigText(text)) => Config::parse(&text, &base_dir),
            Some(Source::Path(path)) => {
                let path = Path::new(&path);
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Status::failed_precondition(format!("cannot read {}: {e}", path.display()))
                })?;
                Config::parse(&text, path.parent().unwrap_or(Path::new(".")))
            }
            None => return Err(Status::invalid_argument("give config_text or path")),
        };
        Ok(Response::new(validate_response(result)))
    }

    async fn get_config(
        &self,
        _: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::GetConfigResponse>, Status> {
        let current = self
            .node
            .current()
            .ok_or_else(|| Status::unavailable("the node is stopping"))?;
        Ok(Response::new(pb::GetConfigResponse {
            node_id: current.config.node.id.clone(),
            config: Some(convert::config_info(current.number, &current.info)),
            config_text: current.info.text.to_string(),
            listeners: convert::listeners(&current),
            upstreams: convert::upstreams(Some(&current)),
            draining: self
                .node
                .draining()
                .iter()
                .map(|g| convert::draining(g))
                .collect(),
            runtime_tasks: (tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
                + self.node.worker_tasks()) as u64,
            tunnels: convert::tunnel_statuses(self.node.tunnels()),
        }))
    }

    async fn stop(
        &self,
        request: Request<pb::StopRequest>,
    ) -> Result<Response<pb::StopResponse>, Status> {
        let drain = match request.into_inner().drain {
            Some(drain) => Some(
                Duration::try_from(drain)
                    .map_err(|_| Status::invalid_argument("drain must not be negative"))?,
            ),
            None => None,
        };
        let report = self
            .node
            .stop(drain)
            .await
            .ok_or_else(|| Status::unavailable("the node is already stopping"))?;
        Ok(Response::new(pb::StopResponse {
            generation: report.generation,
            open_connections: report.open_connections,
        }))
    }

    type WatchHealthStream = EventStream;

    async fn watch_health(
        &self,
        _: Request<pb::WatchHealthRequest>,
    ) -> Result<Response<EventStream>, Status> {
        // Subscribe before the snapshot so no event falls between the two.
        let mut events = self.node.events();
        let (sender, receiver) = mpsc::channel(WATCH_QUEUE);
        let first = self.snapshot();
        let api = ControlApi::new(self.node.clone());
        tokio::spawn(async move {
            if sender.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                let received = tokio::select! {
                    _ = sender.closed() => return,
                    // The stream ends with the node.
                    _ = api.node.stopped() => return,
                    received = events.recv() => received,
                };
                let next = match received {
                    Ok(e) => node_event(e),
                    Err(broadcast::error::RecvError::Lagged(count)) => {
                        let missed = event(pb::node_event::Event::EventsMissed(pb::EventsMissed {
                            count,
                        }));
                        if sender.send(Ok(missed)).await.is_err() {
                            return;
                        }
                        api.snapshot()
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if sender.send(Ok(next)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}
