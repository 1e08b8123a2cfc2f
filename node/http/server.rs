//! One client connection: hyper serves it (HTTP/1.1 or HTTP/2 by the first
//! bytes), every request goes through `handle`, and a retiring generation
//! closes the connection without losing a request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::stream::ClientStream;

use super::activity::{Activity, Idle};
use super::body::ProxyBody;
use super::h1::{self, Rewind};
use super::respond::status_response;
use super::static_files;
use super::{proxy, HttpListener, RouteTarget};
use crate::lifecycle::{ConnectionGuard, RequestGuard};
use crate::telemetry::request::Observation;

pub async fn serve_connection(
    stream: ClientStream,
    peer: SocketAddr,
    connection: ConnectionGuard,
    http: Arc<HttpListener>,
) {
    // What the fast path does not serve is boxed: hyper's connection state
    // and TLS's are many KiB, and a task reserves room for its largest
    // state, so every idle plain connection would hold that much.
    if let Some(acceptor) = http.tls.clone() {
        return Box::pin(serve_tls(acceptor, stream, peer, connection, http)).await;
    }
    if let Some(rest) = h1::serve(stream, peer, &connection, &http).await {
        Box::pin(serve(TokioIo::new(rest), peer, connection, http.clone())).await
    }
}

async fn serve_tls(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: ClientStream,
    peer: SocketAddr,
    connection: ConnectionGuard,
    http: Arc<HttpListener>,
) {
    let lifecycle = connection.lifecycle().clone();
    // The handshake shares the request-head deadline (slowloris).
    let handshake =
        tokio::time::timeout(http.settings.header_read_timeout, acceptor.accept(stream));
    let stream = tokio::select! {
        accepted = handshake => match accepted {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "TLS handshake failed");
                return;
            }
            Err(_) => return,
        },
        _ = lifecycle.killed() => return,
    };
    let rest = if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        Rewind::new(bytes::Bytes::new(), stream)
    } else {
        match h1::serve(stream, peer, &connection, &http).await {
            Some(rest) => rest,
            None => return,
        }
    };
    serve(TokioIo::new(rest), peer, connection, http.clone()).await
}

/// hyper serves the connection: HTTP/2, and HTTP/1 from the first request
/// the fast path (`h1`) leaves to it.
async fn serve<I>(io: I, peer: SocketAddr, connection: ConnectionGuard, http: Arc<HttpListener>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let lifecycle = connection.lifecycle().clone();
    let activity = Arc::new(Activity::new());
    let context = Arc::new(Context {
        connection,
        peer,
        peer_header: super::headers::client_header_value(peer.ip()),
        http: http.clone(),
        activity: activity.clone(),
    });
    let service = service_fn(move |request| {
        let context = context.clone();
        // Boxed: hyper keeps a slot the size of this future for as long as
        // the connection lives, and a proxied request's future is tens of
        // KiB; idle keep-alive connections would hold that much each.
        Box::pin(async move {
            // The request stays open on its connection until the last byte
            // of its response body: a long download is not idleness.
            let open = OpenRequest::new(context.activity.clone());
            let response = context.handle(request).await;
            Ok::<_, Infallible>(response.map(|body| TrackedBody { body, _open: open }))
        })
    });
    let conn = http.connections.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);

    let idle_timeout = http.settings.header_read_timeout;
    let idle = tokio::select! {
        _ = lifecycle.drive_connection(conn.as_mut(), |conn| conn.graceful_shutdown()) => return,
        idle = activity.idle(idle_timeout) => idle,
    };
    if idle == Idle::NeverUsed {
        tracing::debug!(%peer, timeout = ?idle_timeout, "closing a connection that sent no request");
        return;
    }
    // No request is open: GOAWAY (HTTP/2) or close (HTTP/1). A peer that
    // does not even take that within another timeout is dropped.
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn => {}
        _ = tokio::time::sleep(idle_timeout) => {}
        _ = lifecycle.killed() => {}
    }
}

struct Context {
    connection: ConnectionGuard,
    peer: SocketAddr,
    /// The peer's address as X-Forwarded-For lists it, written once.
    peer_header: HeaderValue,
    http: Arc<HttpListener>,
    activity: Arc<Activity>,
}

/// Marks a request open on its connection until dropped.
struct OpenRequest(Arc<Activity>);

impl OpenRequest {
    fn new(activity: Arc<Activity>) -> Self {
        activity.request_started();
        OpenRequest(activity)
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.request_done();
    }
}

/// A response body that keeps its request open until it is done.
struct TrackedBody {
    body: ProxyBody,
    _open: OpenRequest,
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = <ProxyBody as http_body::Body>::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Context {
    async fn handle(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        let lifecycle = self.connection.lifecycle();
        let _in_flight = RequestGuard::new(lifecycle);
        let version = request.version();
        let http = &*self.http;
        let mut observation =
            Observation::start(&request, self.peer, http.scheme, http.access_log.is_some());
        let mut response = self.route(request, &mut observation).await;
        observation.finish(
            &response,
            &http.name,
            &http.unrouted,
            http.access_log.as_ref(),
        );
        if version < Version::HTTP_2 && lifecycle.is_retired() {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    async fn route(
        &self,
        mut request: Request<Incoming>,
        observation: &mut Observation,
    ) -> Response<ProxyBody> {
        let http = &*self.http;
        // An HTTP/1 absolute-form target's authority wins over Host and
        // replaces it (RFC 9112 §3.2.2). In HTTP/2, where :authority is
        // always there, Host wins when both are sent, as in nginx.
        if request.version() < Version::HTTP_2 {
            let authority = request.uri().authority().map(|a| a.as_str());
            if let Some(host) = authority.and_then(|a| HeaderValue::from_str(a).ok()) {
                request.headers_mut().insert(header::HOST, host);
            }
        }
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| request.uri().host());
        let Some(route) = http.router.find(host, request.uri().path()) else {
            return status_response(StatusCode::NOT_FOUND);
        };
        observation.route = Some(route.labels.clone());
        match &route.target {
            RouteTarget::Upstream(upstream) => {
                let lifecycle = self.connection.lifecycle();
                let client = self.peer.ip();
                proxy::forward(
                    request,
                    upstream,
                    client,
                    &self.peer_header,
                    http,
                    lifecycle,
                    observation,
                )
                .await
            }
            RouteTarget::Static { prefix, files } => {
                let path = request.uri().path();
                let sub_path = path.strip_prefix(prefix.as_str()).unwrap_or(path);
                static_files::serve(request.method(), path, sub_path, request.headers(), files)
                    .await
            }
        }
    }
}
