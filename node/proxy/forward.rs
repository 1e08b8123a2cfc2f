//! The HTTP forward proxy: `CONNECT host:port` tunnels and absolute-form
//! requests (`GET http://host/path`), with optional Basic proxy
//! authentication (407 without it) and the destination policy (403).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::stream::ClientStream;

use super::{authenticate, connect, policy, Destination, Refusal, HANDSHAKE_TIMEOUT};
use crate::config::ProxySettings;
use crate::http::body::ProxyBody;
use crate::http::respond::{status_response, status_with_reason};
use crate::lifecycle::{ConnectionGuard, Lifecycle};
use crate::upstream::RequestBody;

pub struct ForwardProxy {
    settings: ProxySettings,
    client: Client<HttpConnector, RequestBody>,
}

impl ForwardProxy {
    pub fn new(settings: ProxySettings) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        ForwardProxy { settings, client }
    }

    pub async fn serve_connection(
        self: Arc<Self>,
        stream: ClientStream,
        peer: SocketAddr,
        connection: ConnectionGuard,
    ) {
        let lifecycle = connection.lifecycle().clone();
        let proxy = self.clone();
        let service = service_fn(move |request| {
            let (proxy, lifecycle) = (proxy.clone(), lifecycle.clone());
            async move { Ok::<_, Infallible>(proxy.handle(request, peer, &lifecycle).await) }
        });
        let lifecycle = connection.lifecycle().clone();
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HANDSHAKE_TIMEOUT);
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        tokio::pin!(conn);
        lifecycle
            .drive_connection(conn.as_mut(), |conn| conn.graceful_shutdown())
            .await;
        drop(connection);
    }

    async fn handle(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
        lifecycle: &Arc<Lifecycle>,
    ) -> Response<ProxyBody> {
        if !self.authorized(&request) {
            let mut response = status_response(StatusCode::PROXY_AUTHENTICATION_REQUIRED);
            response.headers_mut().insert(
                header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"tether\""),
            );
            return response;
        }
        if request.method() == Method::CONNECT {
            return self.tunnel(request, peer, lifecycle).await;
        }
        match request.uri().scheme_str() {
            Some("http") => self.forward(request).await,
            Some(_) => status_with_reason(StatusCode::BAD_REQUEST, "use CONNECT for https"),
            None => status_with_reason(
                StatusCode::BAD_REQUEST,
                "a forward proxy needs an absolute URI or CONNECT",
            ),
        }
    }

    fn authorized(&self, request: &Request<Incoming>) -> bool {
        if self.settings.users.is_empty() {
            return true;
        }
        let Some(credentials) = request
            .headers()
            .get(header::PROXY_AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|v| {
                base64::engine::general_purpose::STANDARD
                    .decode(v.trim())
                    .ok()
            })
        else {
            return false;
        };
        let mut parts = credentials.splitn(2, |&b| b == b':');
        let (name, password) = (parts.next().unwrap_or(&[]), parts.next().unwrap_or(&[]));
        authenticate(&self.settings, name, password)
    }

    /// CONNECT: check, connect, answer 200, then join the connections.
    async fn tunnel(
        &self,
        mut request: Request<Incoming>,
        peer: SocketAddr,
        lifecycle: &Arc<Lifecycle>,
    ) -> Response<ProxyBody> {
        let Some(destination) = request
            .uri()
            .authority()
            .and_then(|a| Destination::parse(a.host(), a.port_u16()?))
        else {
            return status_with_reason(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
        };
        let upstream = match connect(&self.settings, &destination).await {
            Ok((upstream, _)) => upstream,
            Err(refusal) => return refused(&destination, refusal),
        };
        let client = hyper::upgrade::on(&mut request);
        let idle = self.settings.idle_timeout;
        let owner = lifecycle.clone();
        lifecycle.tasks().spawn(async move {
            tokio::select! {
                upgraded = client => {
                    if let Ok(upgraded) = upgraded {
                        let tunnel = crate::relay::run(TokioIo::new(upgraded), upstream, idle, peer);
                        tokio::select! {
                            _ = tunnel => {}
                            _ = owner.killed() => {}
                        }
                    }
                }
                _ = owner.killed() => {}
            }
        });
        Response::new(ProxyBody::empty())
    }

    /// An absolute-form request, sent to the checked address of its host.
    async fn forward(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        let (mut parts, body) = request.into_parts();
        let Some(authority) = parts.uri.authority().cloned() else {
            return status_response(StatusCode::BAD_REQUEST);
        };
        let Some(destination) =
            Destination::parse(authority.host(), authority.port_u16().unwrap_or(80))
        else {
            return status_response(StatusCode::BAD_REQUEST);
        };
        let addr = match policy::resolve(&self.settings, &destination).await {
            Ok(addrs) => addrs[0],
            Err(refusal) => return refused(&destination, refusal),
        };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let Ok(uri) = Uri::try_from(format!("http://{addr}{path}")) else {
            return status_response(StatusCode::BAD_REQUEST);
        };
        parts.headers.remove(header::PROXY_AUTHORIZATION);
        parts.headers.remove("proxy-connection");
        crate::http::remove_hop_by_hop(&mut parts.headers);
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            parts.headers.insert(header::HOST, host);
        }
        parts.uri = uri;
        let (body, client_body_failed) = RequestBody::from_client(body);
        let outgoing = Request::from_parts(parts, body);
        match tokio::time::timeout(
            self.settings.connect_timeout * 12,
            self.client.request(outgoing),
        )
        .await
        {
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                crate::http::remove_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, ProxyBody::Stream(body))
            }
            Ok(Err(_)) if client_body_failed.get() => status_response(StatusCode::BAD_REQUEST),
            Ok(Err(error)) => {
                tracing::info!(%destination, error = %crate::report::error_chain(&error), "forward request failed");
                status_response(StatusCode::BAD_GATEWAY)
            }
            Err(_) => status_response(StatusCode::GATEWAY_TIMEOUT),
        }
    }
}

fn refused(destination: &Destination, refusal: Refusal) -> Response<ProxyBody> {
    tracing::info!(%destination, ?refusal, "forward proxy refused a destination");
    match refusal {
        Refusal::Denied(reason) => status_with_reason(StatusCode::FORBIDDEN, &reason),
        Refusal::Unresolvable(reason) | Refusal::Unreachable(reason) => {
            status_with_reason(StatusCode::BAD_GATEWAY, &reason)
        }
    }
}
