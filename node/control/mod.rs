//! The node's gRPC control API: `tether.v1.ControlService`, with server
//! reflection (v1 and v1alpha, so every grpcurl works without a .proto)
//! and the standard `grpc.health.v1` service for probes.

pub mod convert;
mod service;

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::config::ControlTls;
use crate::proto::v1::control_service_server::ControlServiceServer;
use crate::supervisor::NodeHandle;

pub use service::ControlApi;

/// Serves the control API on `listener` until `shutdown` resolves; then
/// answers the calls in progress and returns. With `tls`, every client must
/// present a certificate signed by its client CA.
pub async fn serve(
    listener: TcpListener,
    tls: Option<&ControlTls>,
    node: NodeHandle,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ControlServiceServer<ControlApi>>()
        .await;
    let (reflection_v1, reflection_v1alpha) = crate::grpc::reflection();
    let mut server = Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(crate::grpc::mtls_server(tls))?;
    }
    server
        .add_service(ControlServiceServer::new(ControlApi::new(node)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
