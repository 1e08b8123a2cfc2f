//! The controller: stores config versions (`store`), knows the fleet
//! (`fleet`), pushes versions down each node's Sync stream (`sync`) and
//! answers operators (`api`, driven by `tether fleet`, `fleet_cli`).
//! Callers are identified by their client certificates (`identity`).

pub mod api;
mod dashboard;
pub mod error_rate;
#[cfg(feature = "etcd")]
pub mod etcd_store;
pub mod fleet;
pub mod fleet_cli;
pub mod identity;
mod json;
mod progress;
mod publish_wait;
pub mod rollout;
mod rollout_cli;
pub mod selector;
pub mod store;
pub mod sync;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::AbortOnDropHandle;

use clap::Args;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::config::ControlTls;
use crate::proto::v1::controller_service_server::ControllerServiceServer;
use crate::proto::v1::fleet_service_server::FleetServiceServer;
use dashboard::Dashboard;
use fleet::Fleet;
use store::{Damaged, Store};

/// Where the controller listens unless `--listen` says otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8840";
/// Where `tether fleet` finds it by default: `DEFAULT_LISTEN` as a URL.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8840";

#[derive(Args, Debug, Clone)]
pub struct ControllerArgs {
    /// Address for node streams and operators.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Directory of the durable store (versions and node states), for a
    /// single controller.
    #[arg(long, required_unless_present = "store", conflicts_with = "store")]
    pub data: Option<PathBuf>,
    /// A store shared by several controller replicas:
    /// etcd://HOST:PORT,HOST:PORT/PREFIX (builds with the `etcd` feature).
    #[arg(long)]
    pub store: Option<String>,
    /// etcd's CA (PEM), for https endpoints.
    #[arg(long, requires = "store")]
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate (PEM) for etcd, with --etcd-key.
    #[arg(long, requires_all = ["store", "etcd_key"])]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// This replica's name among the replicas of a shared store (default:
    /// the host name and the listen port).
    #[arg(long, requires = "store")]
    pub replica: Option<String>,
    /// Server certificate chain (PEM); with --key and --client-ca, enables mTLS.
    #[arg(long, requires_all = ["key", "client_ca"])]
    pub cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// CA that signs node and operator certificates (PEM).
    #[arg(long, requires = "cert")]
    pub client_ca: Option<PathBuf>,
    /// Allow listening off loopback without TLS (anyone who reaches the
    /// port can publish).
    #[arg(long)]
    pub insecure: bool,
    /// Serve Prometheus metrics on this address (`/metrics`). OTLP export
    /// follows the standard OTEL_EXPORTER_OTLP_* variables.
    #[arg(long)]
    pub prometheus: Option<SocketAddr>,
    /// Also serve grpc.health.v1 alone, without TLS, on this address: for
    /// Kubernetes gRPC probes, which cannot present a client certificate.
    #[arg(long)]
    pub health_listen: Option<SocketAddr>,
    /// Start on a damaged store: keep a copy of its log, cut it at the
    /// last good record, and serve what remains.
    #[arg(long)]
    pub repair: bool,
    /// Serve the fleet's web page on this address, with its JSON snapshot
    /// (`/api/fleet`) and live events (`/api/events`, Server-Sent Events).
    /// Off loopback it needs --dashboard-tokens, and TLS (--cert/--key)
    /// or --insecure.
    #[arg(long)]
    pub dashboard: Option<SocketAddr>,
    /// Operators who may sign in to the dashboard: `NAME TOKEN` per line.
    /// Signed-in operators can roll back, and are recorded as the author.
    #[arg(long, requires = "dashboard")]
    pub dashboard_tokens: Option<PathBuf>,
    /// Stage every publish that brings no plan of its own, e.g.
    /// 1,10%,50%,100% (see `tether fleet publish --waves`); publishing at
    /// once then takes `--all-at-once --reason TEXT`, recorded in the
    /// history. Rollbacks always go at once.
    #[arg(long)]
    pub default_waves: Option<String>,
    /// With --default-waves: each wave's bake.
    #[arg(long, default_value = "30s", requires = "default_waves", value_parser = crate::config::parse_duration)]
    pub default_bake: Duration,
    /// With --default-waves: how long each wave has to ACK.
    #[arg(long, default_value = "60s", requires = "default_waves", value_parser = crate::config::parse_duration)]
    pub default_ack_timeout: Duration,
    /// With --default-waves: the error-rate gate's margin.
    #[arg(long, default_value = "1%", requires = "default_waves")]
    pub default_max_5xx_increase: String,
}

impl ControllerArgs {
    /// How publishes without a plan are staged, from --default-*.
    pub fn default_plan(&self) -> Result<Option<fleet::Plan>, String> {
        let Some(waves) = &self.default_waves else {
            return Ok(None);
        };
        let plan = crate::proto::v1::RolloutPlan {
            waves: vec![waves.clone()],
            bake_ms: self.default_bake.as_millis() as u64,
            ack_timeout_ms: self.default_ack_timeout.as_millis() as u64,
            waves_by: String::new(),
            max_5xx_increase: self.default_max_5xx_increase.clone(),
        };
        api::plan(&plan)
            .map(Some)
            .map_err(|status| format!("--default-*: {}", status.message()))
    }

    /// Checks the arguments and reads the TLS files.
    pub fn tls(&self) -> Result<Option<ControlTls>, String> {
        let (Some(cert), Some(key), Some(client_ca)) = (&self.cert, &self.key, &self.client_ca)
        else {
            if !self.listen.ip().is_loopback() {
                if !self.insecure {
                    return Err(format!(
                        "{} is not loopback: give --cert, --key and --client-ca for mTLS, or \
                         --insecure to accept anyone who can reach it",
                        self.listen
                    ));
                }
                tracing::warn!(listen = %self.listen, "no TLS off loopback (--insecure): anyone who reaches this port can publish configs");
            }
            return Ok(None);
        };
        let read =
            |path: &PathBuf| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
        Ok(Some(ControlTls {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: read(client_ca)?,
        }))
    }
}

/// Opens the store the arguments name: the log in `--data`, or the shared
/// store of `--store` (whose other replicas' writes are then followed).
async fn open_store(
    args: &ControllerArgs,
    default_plan: Option<fleet::Plan>,
) -> Result<(Arc<Fleet>, Option<AbortOnDropHandle<()>>), String> {
    let damaged = if args.repair {
        Damaged::Repair
    } else {
        Damaged::Refuse
    };
    if let Some(data) = &args.data {
        return Ok((open(data, damaged, default_plan)?, None));
    }
    let url = args.store.as_deref().unwrap_or_default();
    open_shared(args, url, default_plan).await
}

/// `etcd://HOST:PORT,HOST:PORT/PREFIX`: the endpoints and the key prefix
/// (default `/tether`).
pub fn store_url(url: &str) -> Result<(Vec<String>, String), String> {
    let rest = url
        .strip_prefix("etcd://")
        .ok_or_else(|| format!("{url:?}: write etcd://HOST:PORT[,HOST:PORT…][/PREFIX]"))?;
    let (hosts, prefix) = match rest.find('/') {
        Some(at) => (&rest[..at], rest[at..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let endpoints: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("http://{h}"))
        .collect();
    if endpoints.is_empty() {
        return Err(format!("{url:?}: no etcd endpoint"));
    }
    let prefix = if prefix.is_empty() { "/tether" } else { prefix };
    Ok((endpoints, prefix.to_owned()))
}

#[cfg(feature = "etcd")]
async fn open_shared(
    args: &ControllerArgs,
    url: &str,
    default_plan: Option<fleet::Plan>,
) -> Result<(Arc<Fleet>, Option<AbortOnDropHandle<()>>), String> {
    let (endpoints, prefix) = store_url(url)?;
    let read = |path: &PathBuf| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    let endpoints = match &args.etcd_ca {
        Some(_) => endpoints
            .into_iter()
            .map(|e| e.replacen("http://", "https://", 1))
            .collect(),
        None => endpoints,
    };
    let settings = etcd_store::Settings {
        endpoints,
        prefix,
        ca: args.etcd_ca.as_ref().map(read).transpose()?,
        identity: match (&args.etcd_cert, &args.etcd_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        },
        replica: args
            .replica
            .clone()
            .unwrap_or_else(|| format!("{}:{}", crate::config::hostname(), args.listen.port())),
    };
    let (store, loaded, remote) = etcd_store::open(settings).await?;
    tracing::info!(
        store = %store.describe(),
        store_id = %loaded.store_id,
        versions = loaded.versions.len(),
        nodes = loaded.nodes.len(),
        "store opened"
    );
    let fleet = Arc::new(Fleet::new(store, loaded, default_plan)?);
    let following = tokio::spawn({
        let fleet = fleet.clone();
        async move {
            tokio::join!(fleet.clone().follow_store(remote), fleet.share_answers());
        }
    });
    Ok((fleet, Some(AbortOnDropHandle::new(following))))
}

#[cfg(not(feature = "etcd"))]
async fn open_shared(
    _args: &ControllerArgs,
    url: &str,
    _default_plan: Option<fleet::Plan>,
) -> Result<(Arc<Fleet>, Option<AbortOnDropHandle<()>>), String> {
    store_url(url)?;
    Err(format!(
        "--store {url}: this build has no etcd store; build with `cargo build --features etcd` \
         (it needs protoc: Debian's protobuf-compiler), or use --data DIR"
    ))
}

/// Opens the store in `data`. Fails if it is damaged, unless told to
/// repair it.
pub fn open(
    data: &std::path::Path,
    damaged: Damaged,
    default_plan: Option<fleet::Plan>,
) -> Result<Arc<Fleet>, String> {
    let (store, loaded) = Store::open(data, damaged)?;
    tracing::info!(
        path = %store.describe(),
        store_id = %loaded.store_id,
        versions = loaded.versions.len(),
        nodes = loaded.nodes.len(),
        "store opened"
    );
    Ok(Arc::new(Fleet::new(store, loaded, default_plan)?))
}

/// Serves ControllerService, FleetService, grpc.health.v1 and reflection
/// until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: Option<ControlTls>,
    fleet: Arc<Fleet>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ControllerServiceServer<sync::SyncService>>()
        .await;
    health
        .set_serving::<FleetServiceServer<api::FleetApi>>()
        .await;
    let (reflection_v1, reflection_v1alpha) = crate::grpc::reflection();
    let mut server = Server::builder()
        // Half-dead node streams are found and closed.
        .http2_keepalive_interval(Some(Duration::from_secs(15)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        server = server.tls_config(crate::grpc::mtls_server(&tls))?;
    }
    server
        .add_service(ControllerServiceServer::new(sync::SyncService::new(
            fleet.clone(),
        )))
        .add_service(FleetServiceServer::new(api::FleetApi::new(fleet)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}

/// `tether controller`: runs until SIGTERM or SIGINT.
pub async fn run(args: ControllerArgs) -> Result<(), String> {
    let tls = args.tls()?;
    let default_plan = args.default_plan()?;
    let settings = crate::config::TelemetrySettings {
        prometheus: args.prometheus,
        ..Default::default()
    };
    let instance = crate::config::hostname();
    let identity = crate::telemetry::Identity {
        service: "tether-controller",
        instance_id: &instance,
    };
    let dashboard = match args.dashboard {
        Some(addr) => {
            let settings = dashboard::Settings {
                addr,
                tokens: args.dashboard_tokens.clone(),
            };
            Some((
                addr,
                Dashboard::new(&settings, tls.as_ref(), args.insecure)?,
            ))
        }
        None => None,
    };
    let mut telemetry = crate::telemetry::start(&settings, identity)?;
    telemetry.serve_prometheus(Arc::new(|| true)).await?;
    let _health = match args.health_listen {
        Some(addr) => Some(side_service(addr, "health service", serve_health).await?),
        None => None,
    };
    let (fleet, _following) = open_store(&args, default_plan).await?;
    let _dashboard = match dashboard {
        Some((addr, dashboard)) => {
            let fleet = fleet.clone();
            let serve = move |listener| dashboard.serve(listener, fleet);
            Some(side_service(addr, "dashboard", serve).await?)
        }
        None => None,
    };
    let _rollouts = AbortOnDropHandle::new(tokio::spawn(fleet.clone().drive_rollouts()));
    {
        let fleet = fleet.clone();
        crate::telemetry::metrics::observe_controller(Arc::new(move || fleet.connected()));
    }
    let result = serve_until_terminated(args.listen, tls, fleet).await;
    telemetry.shutdown();
    result
}

/// Binds `addr` and runs `serve` on it until the handle is dropped: the
/// services beside the controller's own port.
async fn side_service<F, Fut>(
    addr: SocketAddr,
    what: &'static str,
    serve: F,
) -> Result<AbortOnDropHandle<()>, String>
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} ({what}): {e}"))?;
    let address = listener.local_addr().unwrap_or(addr);
    tracing::info!(%address, "{what} listening");
    Ok(AbortOnDropHandle::new(tokio::spawn(serve(listener))))
}

/// grpc.health.v1 only: SERVING while the process runs.
async fn serve_health(listener: TcpListener) {
    let (health, service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ControllerServiceServer<sync::SyncService>>()
        .await;
    let result = Server::builder()
        .add_service(service)
        .serve_with_incoming(TcpListenerStream::new(listener))
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "health service failed");
    }
}

async fn serve_until_terminated(
    listen: SocketAddr,
    tls: Option<ControlTls>,
    fleet: Arc<Fleet>,
) -> Result<(), String> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    tracing::info!(
        address = %listener.local_addr().unwrap_or(listen),
        mtls = tls.is_some(),
        "controller listening"
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = serve(listener, tls, fleet, stop.clone().cancelled_owned());
    tokio::pin!(serving);
    tokio::select! {
        result = &mut serving => return result.map_err(|e| crate::report::error_chain(&e)),
        _ = termination() => {}
    }
    tracing::info!("stopping");
    stop.cancel();
    // Node streams never end on their own: give unary calls a moment, then
    // close what is left (nodes reconnect to the next controller).
    match tokio::time::timeout(SHUTDOWN_GRACE, serving).await {
        Ok(result) => result.map_err(|e| crate::report::error_chain(&e)),
        Err(_) => Ok(()),
    }
}

const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut terminate), Ok(mut interrupt)) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::store_url;

    #[test]
    fn store_urls_name_endpoints_and_a_prefix() {
        assert_eq!(
            store_url("etcd://a:2379,b:2379/fleet/prod/"),
            Ok((
                vec!["http://a:2379".to_owned(), "http://b:2379".to_owned()],
                "/fleet/prod".to_owned()
            ))
        );
        assert_eq!(
            store_url("etcd://127.0.0.1:2379"),
            Ok((
                vec!["http://127.0.0.1:2379".to_owned()],
                "/tether".to_owned()
            ))
        );
        assert!(store_url("http://a:2379").is_err());
        assert!(store_url("etcd:///x").is_err());
    }
}
