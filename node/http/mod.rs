//! The HTTP listener: HTTP/1.1 and HTTP/2 (prior knowledge) on one socket,
//! routing, then a proxied upstream or static files.

mod activity;
pub mod body;
mod h1;
mod headers;
mod proxy;
pub mod respond;
mod server;
mod static_files;
mod upgrade;

use std::collections::BTreeMap;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

pub use headers::remove_hop_by_hop;
pub use server::serve_connection;

use crate::config::{HostPattern, HttpSettings, ListenerConfig, RouteAction, StaticConfig};
use crate::pki::PkiError;
use crate::route::Router;
use crate::telemetry::access_log::{AccessLog, AccessLogError};
use crate::telemetry::request::RouteLabels;
use crate::upstream::Upstream;

/// Where a route sends its requests.
pub enum RouteTarget {
    Upstream(Arc<Upstream>),
    /// `prefix` is removed from the request path before it is looked up
    /// under the root: route `/assets/` + `/assets/app.js` → `ROOT/app.js`.
    Static {
        prefix: String,
        files: StaticConfig,
    },
}

/// A route: where it goes, and how telemetry names it.
pub struct Route {
    pub target: RouteTarget,
    pub labels: Arc<RouteLabels>,
}

/// Why an HTTP listener cannot be set up from a validated config: what it
/// loads when it is built can have changed since validation.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error(transparent)]
    Tls(#[from] PkiError),
    #[error(transparent)]
    AccessLog(#[from] AccessLogError),
}

pub struct HttpListener {
    /// The listener's name, for metrics and logs.
    pub name: Arc<str>,
    pub router: Router<Route>,
    pub access_log: Option<AccessLog>,
    /// Metric labels of requests no route matched.
    pub unrouted: RouteLabels,
    pub settings: HttpSettings,
    /// `https` listeners terminate TLS before HTTP.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// For X-Forwarded-Proto.
    pub scheme: &'static str,
    connections: auto::Builder<TokioExecutor>,
}

impl HttpListener {
    pub fn new(
        config: &ListenerConfig,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
    ) -> Result<Self, ListenerError> {
        let tls = config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
        let router = Router::new(config.routes.iter().map(|route| {
            let target = match &route.action {
                RouteAction::Upstream(name) => RouteTarget::Upstream(upstreams[name].clone()),
                RouteAction::Static(files) => RouteTarget::Static {
                    prefix: route.path_prefix.clone(),
                    files: files.clone(),
                },
            };
            let host = match &route.host {
                HostPattern::Any => "*".to_owned(),
                HostPattern::Exact(name) => name.clone(),
                HostPattern::Wildcard(suffix) => format!("*{suffix}"),
            };
            let labels = Arc::new(RouteLabels::new(
                &config.name,
                format!("{host}{}", route.path_prefix).into(),
                match &route.action {
                    RouteAction::Upstream(name) => Some(name.as_str().into()),
                    RouteAction::Static(_) => None,
                },
            ));
            let route_value = Route { target, labels };
            (route.host.clone(), route.path_prefix.clone(), route_value)
        }));
        let access_log = config
            .access_log
            .as_ref()
            .map(AccessLog::open)
            .transpose()?;
        let settings = config.http.clone();
        let mut connections = auto::Builder::new(TokioExecutor::new());
        connections
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .max_buf_size(settings.max_header_bytes)
            .keep_alive(true);
        connections
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(settings.max_header_bytes as u32)
            // WebSocket over HTTP/2 (RFC 8441).
            .enable_connect_protocol()
            .keep_alive_interval(Some(std::time::Duration::from_secs(30)));
        Ok(HttpListener {
            name: config.name.as_str().into(),
            unrouted: RouteLabels::unrouted(&config.name),
            router,
            access_log,
            settings,
            scheme: if tls.is_some() { "https" } else { "http" },
            tls,
            connections,
        })
    }
}
