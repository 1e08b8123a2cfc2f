//! `tether.v1.FleetService`: what operators (and `tether fleet`) call.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use super::error_rate::{parse_max_increase, DEFAULT_MAX_INCREASE_BP};
use super::fleet::{Fleet, Plan, Publication, PublishError};
use super::identity::Identity;
use super::rollout::{parse_waves, Action};
use super::selector::Selector;
use crate::config::{check_pushed, Config};
use crate::proto::v1::fleet_service_server::FleetService;
use crate::proto::v1::{self as pb};
use crate::wire::config_errors_status;

pub struct FleetApi {
    fleet: Arc<Fleet>,
}

impl FleetApi {
    pub fn new(fleet: Arc<Fleet>) -> FleetApi {
        FleetApi { fleet }
    }
}

/// Only operators (or anyone, without TLS) may call FleetService; returns
/// the name to record as author, if the certificate gives one.
fn operator<T>(request: &Request<T>) -> Result<Option<String>, Status> {
    match Identity::of(request)? {
        Identity::Anonymous => Ok(None),
        Identity::Operator(name) => Ok(Some(name)),
        Identity::Node(id) | Identity::NodeGroup(id) => Err(Status::permission_denied(format!(
            "node certificate {id:?} cannot call FleetService; use an operator certificate"
        ))),
    }
}

fn selector(text: &str) -> Result<Selector, Status> {
    Selector::parse(text).map_err(|e| Status::invalid_argument(format!("selector: {e}")))
}

/// Checks a config as a node would before anything is stored: node-local
/// sections refused, everything else validated without reading files
/// (they live on the nodes).
fn validate(text: &str) -> Result<(), Status> {
    let errors = match check_pushed(text) {
        Err(errors) => errors,
        Ok(()) => match Config::parse_portable(text) {
            Ok(_) => return Ok(()),
            Err(errors) => errors,
        },
    };
    let message = format!(
        "invalid config ({} error{}):\n{}",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" },
        errors
            .iter()
            .map(|e| format!("  {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Err(config_errors_status(
        Code::InvalidArgument,
        message,
        &errors,
    ))
}

/// The longest bake or ACK timeout a rollout takes.
const MAX_ROLLOUT_WAIT: Duration = Duration::from_secs(24 * 3600);
/// The ACK timeout when a plan gives none.
const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) fn plan(plan: &pb::RolloutPlan) -> Result<Plan, Status> {
    let (waves, by_label) = match (plan.waves.is_empty(), plan.waves_by.as_str()) {
        (true, "") => return Err(Status::invalid_argument("rollout: give waves or waves_by")),
        (false, "") => (
            parse_waves(&plan.waves)
                .map_err(|e| Status::invalid_argument(format!("rollout: {e}")))?,
            None,
        ),
        (true, label) => (Vec::new(), Some(label.to_owned())),
        (false, _) => {
            return Err(Status::invalid_argument(
                "rollout: waves or waves_by, not both",
            ))
        }
    };
    let bake = Duration::from_millis(plan.bake_ms);
    let ack_timeout = match plan.ack_timeout_ms {
        0 => DEFAULT_ACK_TIMEOUT,
        ms => Duration::from_millis(ms),
    };
    if bake > MAX_ROLLOUT_WAIT || ack_timeout > MAX_ROLLOUT_WAIT {
        return Err(Status::invalid_argument(
            "rollout: bake and ACK timeout are at most 24h",
        ));
    }
    let max_5xx_increase_bp = match plan.max_5xx_increase.as_str() {
        "" => DEFAULT_MAX_INCREASE_BP,
        text => parse_max_increase(text)
            .map_err(|e| Status::invalid_argument(format!("rollout: {e}")))?,
    };
    Ok(Plan {
        waves,
        by_label,
        bake,
        ack_timeout,
        max_5xx_increase_bp,
    })
}

type FleetEvents = Pin<Box<dyn Stream<Item = Result<pb::FleetEvent, Status>> + Send>>;

#[tonic::async_trait]
impl FleetService for FleetApi {
    async fn publish_config(
        &self,
        request: Request<pb::PublishConfigRequest>,
    ) -> Result<Response<pb::PublishConfigResponse>, Status> {
        let certified = operator(&request)?;
        let request = request.into_inner();
        validate(&request.config)?;
        let publication = Publication {
            config: request.config,
            selector: selector(&request.selector)?,
            comment: request.comment,
            author: certified.unwrap_or(request.author),
            rollback_of: 0,
            idempotency_key: request.idempotency_key,
            rollout: request.rollout.as_ref().map(plan).transpose()?,
            all_at_once_reason: request.all_at_once_reason,
        };
        if publication.rollout.is_some() && !publication.all_at_once_reason.is_empty() {
            return Err(Status::invalid_argument(
                "a rollout plan or all at once, not both",
            ));
        }
        self.publish(publication).await
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        operator(&request)?;
        let selector = selector(&request.get_ref().selector)?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: self.fleet.nodes(&selector),
        }))
    }

    async fn list_versions(
        &self,
        request: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        operator(&request)?;
        Ok(Response::new(pb::ListVersionsResponse {
            versions: self.fleet.versions(),
        }))
    }

    async fn get_version(
        &self,
        request: Request<pb::GetVersionRequest>,
    ) -> Result<Response<pb::GetVersionResponse>, Status> {
        operator(&request)?;
        let number = request.get_ref().version;
        let version = self
            .fleet
            .version(number)
            .ok_or_else(|| Status::not_found(format!("no version {number}")))?;
        Ok(Response::new(pb::GetVersionResponse {
            info: Some(version.info()),
            config: version.text().to_owned(),
        }))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::PublishConfigResponse>, Status> {
        let certified = operator(&request)?;
        let request = request.into_inner();
        let earlier = self
            .fleet
            .version(request.version)
            .ok_or_else(|| Status::not_found(format!("no version {}", request.version)))?;
        let publication = Publication::rollback(
            &earlier,
            request.comment,
            certified.unwrap_or(request.author),
            request.idempotency_key,
        );
        self.publish(publication).await
    }

    async fn fleet_health(
        &self,
        request: Request<pb::FleetHealthRequest>,
    ) -> Result<Response<pb::FleetHealthResponse>, Status> {
        operator(&request)?;
        Ok(Response::new(pb::FleetHealthResponse {
            servers: self.fleet.fleet_health(&request.get_ref().upstream),
        }))
    }

    async fn control_rollout(
        &self,
        request: Request<pb::ControlRolloutRequest>,
    ) -> Result<Response<pb::ControlRolloutResponse>, Status> {
        let operator = operator(&request)?;
        let request = request.into_inner();
        let action = match pb::RolloutAction::try_from(request.action) {
            Ok(pb::RolloutAction::Abort) => Action::Abort,
            Ok(pb::RolloutAction::Pause) => Action::Pause,
            Ok(pb::RolloutAction::Resume) => Action::Resume,
            Ok(pb::RolloutAction::Promote) => Action::Promote,
            _ => {
                return Err(Status::invalid_argument(
                    "action: abort, pause, resume or promote",
                ))
            }
        };
        let status = self
            .fleet
            .control_rollout(
                request.version,
                action,
                operator.as_deref(),
                &request.reason,
            )
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::ControlRolloutResponse {
            status: Some(status),
        }))
    }

    type WatchFleetStream = FleetEvents;

    async fn watch_fleet(
        &self,
        request: Request<pb::WatchFleetRequest>,
    ) -> Result<Response<FleetEvents>, Status> {
        operator(&request)?;
        let events = self.fleet.events();
        let stream = futures_util::stream::unfold(events, |mut events| async move {
            let event = match events.recv().await {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(count)) => Fleet::events_missed(count),
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((Ok(event), events))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

impl FleetApi {
    async fn publish(
        &self,
        publication: Publication,
    ) -> Result<Response<pb::PublishConfigResponse>, Status> {
        let published = self.fleet.publish(publication).await.map_err(|e| match e {
            // A shared store that cannot be reached now.
            PublishError::Store(ref io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::NotConnected | std::io::ErrorKind::TimedOut
                ) =>
            {
                Status::unavailable(e.to_string())
            }
            PublishError::Store(ref io) if io.kind() == std::io::ErrorKind::InvalidInput => {
                Status::invalid_argument(e.to_string())
            }
            PublishError::Store(_) => Status::internal(e.to_string()),
            PublishError::KeyReused { .. } => Status::already_exists(e.to_string()),
        })?;
        Ok(Response::new(pb::PublishConfigResponse {
            version: published.version,
            targets: published.targets,
            rollout: published.rollout,
        }))
    }
}
