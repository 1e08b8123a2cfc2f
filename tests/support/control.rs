//! What a test does with a node through its control service, whether the
//! node runs as a process (`Node`) or in the test (`LocalNode`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tether::proto::v1::control_service_client::ControlServiceClient;
use tether::proto::v1::{self as pb, reload_request};
use tonic::transport::Channel;

use super::node::with_ephemeral_control;

#[allow(async_fn_in_trait)]
pub trait ControlClient {
    fn control_addr(&self) -> SocketAddr;

    async fn control(&self) -> ControlServiceClient<Channel> {
        ControlServiceClient::connect(format!("http://{}", self.control_addr()))
            .await
            .expect("connect to the control service")
    }

    async fn get_config(&self) -> pb::GetConfigResponse {
        self.control()
            .await
            .get_config(pb::GetConfigRequest {})
            .await
            .expect("GetConfig")
            .into_inner()
    }

    /// The bound address of the listener called `name`.
    async fn listener(&self, name: &str) -> SocketAddr {
        let config = self.get_config().await;
        let listener = config
            .listeners
            .iter()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("no listener {name}: {:?}", config.listeners));
        listener.bound.parse().expect("bound address")
    }

    /// Applies `config` inline through the control service.
    async fn reload(&self, config: &str) -> Result<pb::ReloadResponse, tonic::Status> {
        let request = pb::ReloadRequest {
            source: Some(reload_request::Source::ConfigText(with_ephemeral_control(
                config,
            ))),
        };
        self.control()
            .await
            .reload(request)
            .await
            .map(|r| r.into_inner())
    }

    /// Opens a WatchHealth stream.
    async fn watch_health(&self) -> tonic::Streaming<pb::NodeEvent> {
        self.control()
            .await
            .watch_health(pb::WatchHealthRequest {})
            .await
            .expect("WatchHealth")
            .into_inner()
    }

    /// Waits until no retired generation is left draining.
    async fn wait_drained(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.get_config().await.draining.is_empty() {
            assert!(
                Instant::now() < deadline,
                "old generations did not finish draining within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The health GetConfig reports for `addr` in `upstream`.
    async fn server_health(&self, upstream: &str, addr: &str) -> pb::HealthState {
        let config = self.get_config().await;
        let upstream = config
            .upstreams
            .iter()
            .find(|u| u.name == upstream)
            .unwrap_or_else(|| panic!("no upstream {upstream}"));
        let server = upstream
            .servers
            .iter()
            .find(|s| s.address == addr)
            .unwrap_or_else(|| panic!("no server {addr} in {:?}", upstream.servers));
        pb::HealthState::try_from(server.health).unwrap_or(pb::HealthState::Unspecified)
    }

    /// Polls until the server's health is `state`; answers how long it took.
    async fn wait_health(
        &self,
        upstream: &str,
        addr: &str,
        state: pb::HealthState,
        within: Duration,
    ) -> Duration {
        let started = Instant::now();
        while self.server_health(upstream, addr).await != state {
            assert!(
                started.elapsed() < within,
                "{addr} did not become {state:?} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        started.elapsed()
    }
}
