//! The HTTP listener: HTTP/1.1 and HTTP/2 (prior knowledge) on one socket,
//! routing, then a proxied upstream or static files.

pub mod body;
mod headers;
mod proxy;
pub mod respond;
mod server;
mod upgrade;

use std::collections::BTreeMap;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

pub use headers::remove_hop_by_hop;
pub use server::serve_connection;

use crate::config::{HttpSettings, ListenerConfig, RouteAction, StaticConfig};
use crate::route::Router;
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

pub struct HttpListener {
    pub router: Router<RouteTarget>,
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
    ) -> Result<Self, String> {
        let tls = config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
        let router = Router::new(config.routes.iter().map(|route| {
            let target = match &route.action {
                RouteAction::Upstream(name) => RouteTarget::Upstream(upstreams[name].clone()),
                RouteAction::Static(files) => RouteTarget::Static {
                    prefix: route.path_prefix.clone(),
                    files: files.clone(),
                },
            };
            (route.host.clone(), route.path_prefix.clone(), target)
        }));
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
            .keep_alive_interval(Some(std::time::Duration::from_secs(30)));
        Ok(HttpListener {
            router,
            settings,
            scheme: if tls.is_some() { "https" } else { "http" },
            tls,
            connections,
        })
    }
}
