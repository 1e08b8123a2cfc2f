//! `tether.v1.ControllerService.Sync`: one stream per node. The node's
//! Hello is checked against its certificate, then the stream sends a Push
//! each time the node's desired version changes, and the node's answers and
//! health reports update the fleet.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, Stream};
use tonic::{Request, Response, Status, Streaming};

use super::fleet::{Fleet, Session};
use super::identity::Identity;
use crate::proto::v1::controller_message::Message as Down;
use crate::proto::v1::controller_service_server::ControllerService;
use crate::proto::v1::node_message::Message as Up;
use crate::proto::v1::{self as pb};

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct SyncService {
    fleet: Arc<Fleet>,
}

impl SyncService {
    pub fn new(fleet: Arc<Fleet>) -> SyncService {
        SyncService { fleet }
    }
}

type PushStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl ControllerService for SyncService {
    type SyncStream = PushStream;

    async fn sync(
        &self,
        request: Request<Streaming<pb::NodeMessage>>,
    ) -> Result<Response<PushStream>, Status> {
        let identity = Identity::of(&request)?;
        let address = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10s"))??;
        let Some(pb::NodeMessage {
            message: Some(Up::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument("the first message must be Hello"));
        };
        if hello.node_id.is_empty() {
            return Err(Status::invalid_argument("Hello has no node_id"));
        }
        if !identity.may_be_node(&hello.node_id) {
            tracing::warn!(certificate = ?identity, claimed = %hello.node_id, %address, "Hello refused: node id does not match its certificate");
            let own = match &identity {
                Identity::Node(id) => format!("node {id:?}"),
                Identity::NodeGroup(prefix) => format!("for nodes {prefix:?}*"),
                Identity::Operator(name) => format!("operator {name:?}"),
                Identity::Anonymous => "anonymous".to_owned(),
            };
            return Err(Status::permission_denied(format!(
                "this certificate is {own}; it cannot speak for node {:?}",
                hello.node_id
            )));
        }
        let session = Arc::new(self.fleet.connect(hello, address));
        tokio::spawn(receive(self.fleet.clone(), session.clone(), inbound));
        Ok(Response::new(Box::pin(pushes(session))))
    }
}

/// The node's answers and health reports, until its stream ends.
async fn receive(
    fleet: Arc<Fleet>,
    session: Arc<Session>,
    mut inbound: Streaming<pb::NodeMessage>,
) {
    let reason = loop {
        let message = tokio::select! {
            message = inbound.message() => message,
            _ = session.replaced.cancelled() => break "replaced by a newer stream".to_owned(),
        };
        match message {
            Ok(Some(pb::NodeMessage {
                message: Some(message),
            })) => match message {
                Up::Ack(ack) => fleet.ack(&session, ack),
                Up::Nack(nack) => fleet.nack(&session, nack),
                Up::Health(report) => fleet.health(&session, report),
                Up::Traffic(report) => fleet.traffic(&session, report),
                Up::Hello(_) => tracing::debug!(node = %session.node_id, "ignoring a second Hello"),
            },
            Ok(Some(_)) => {}
            Ok(None) => break "the node closed the stream".to_owned(),
            Err(status) => break format!("{:?}: {}", status.code(), status.message()),
        }
    };
    fleet.disconnect(&session, reason);
}

/// A Push each time the desired version changes (first: the one due at
/// connect, if any). Polled only when HTTP/2 flow control lets the stream
/// send, so a stuck node holds at most one pending version.
fn pushes(session: Arc<Session>) -> impl Stream<Item = Result<pb::ControllerMessage, Status>> {
    let mut desired = session.desired.clone();
    // The value at connect counts as a change.
    desired.mark_changed();
    stream::unfold(Some((session, desired)), |state| async move {
        let (session, mut desired) = state?;
        loop {
            tokio::select! {
                biased;
                _ = session.replaced.cancelled() => {
                    let refused = pb::Refused {
                        reason: "replaced by a newer stream from the same node".to_owned(),
                    };
                    let message = pb::ControllerMessage { message: Some(Down::Refused(refused)) };
                    return Some((Ok(message), None));
                }
                changed = desired.changed() => changed.ok()?,
            }
            let Some(version) = desired.borrow_and_update().clone() else {
                continue;
            };
            let push = pb::Push {
                version: version.number,
                nonce: format!("{:016x}", rand::random::<u64>()),
                config: version.config.clone(),
                checksum: version.checksum.clone(),
                traceparent: version.traceparent.clone(),
                store_id: session.store_id.clone(),
            };
            crate::telemetry::metrics::controller().pushes.add(1, &[]);
            tracing::debug!(node = %session.node_id, version = version.number, "push");
            let message = pb::ControllerMessage {
                message: Some(Down::Push(push)),
            };
            return Some((Ok(message), Some((session, desired))));
        }
    })
}
