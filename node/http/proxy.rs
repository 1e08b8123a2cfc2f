//! Forwarding one request to an upstream server and streaming the answer
//! back. Failures map to the statuses operators expect: no server available
//! → 503, refused or reset → 502, no response in time → 504. A request
//! without a body whose connection attempt failed is sent to another server
//! (`retries`); one whose body has started to flow never is.

use std::net::IpAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;

use super::body::ProxyBody;
use super::h1::client::{self, WireBody};
use super::headers::{add_forwarded, add_via, remove_hop_by_hop};
use super::respond::{status_response, status_with_reason};
use super::upgrade;
use super::HttpListener;
use crate::config::{HashKey, UpstreamProtocol};
use crate::lifecycle::Lifecycle;
use crate::telemetry::request::Observation;
use crate::upstream::{
    hash_bytes, hash_ip, PickContext, RequestBody, SendError, Upstream, UpstreamBody,
};

pub async fn forward(
    mut request: Request<Incoming>,
    upstream: &Upstream,
    client_ip: IpAddr,
    client_header: &HeaderValue,
    listener: &HttpListener,
    lifecycle: &Arc<Lifecycle>,
    observation: &mut Observation,
) -> Response<ProxyBody> {
    let mut upgrade = upgrade::take(&mut request);
    if upgrade.as_ref().is_some_and(|u| u.is_extended_connect())
        && upstream.config.protocol != UpstreamProtocol::Http1
    {
        let reason = "WebSocket over HTTP/2 is proxied to protocol = \"http1\" upstreams only";
        return status_with_reason(StatusCode::NOT_IMPLEMENTED, reason);
    }
    let key_hash = upstream.hash_key().map(|key| match key {
        HashKey::ClientIp => hash_ip(client_ip),
        HashKey::Header(name) => request
            .headers()
            .get(name)
            .map_or_else(|| hash_ip(client_ip), |value| hash_bytes(value.as_bytes())),
    });
    let context = PickContext {
        client_ip,
        key_hash,
    };
    let (mut parts, body) = request.into_parts();

    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    // HTTP/2 clients may send :authority instead of Host.
    let host = match parts.headers.get(header::HOST) {
        Some(host) => Some(host.clone()),
        None => parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    remove_hop_by_hop(&mut parts.headers);
    add_forwarded(
        &mut parts.headers,
        client_header,
        listener.scheme,
        host.as_ref(),
    );
    if listener.settings.via {
        add_via(&mut parts.headers);
    }
    if let Some(host) = host {
        parts.headers.insert(header::HOST, host);
    }
    observation.propagate(&mut parts.headers);
    if let Some(upgrade) = &upgrade {
        upgrade.prepare(&mut parts);
    }
    let version = match upstream.config.protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::H2c => Version::HTTP_2,
        // ALPN decides; hyper sets the version of the connection it gets.
        UpstreamProtocol::H2 => Version::HTTP_11,
    };

    // Only a request with no body can be sent twice.
    let replayable =
        upstream.config.retries > 0 && parts.method.is_idempotent() && body.is_end_stream();
    let (body, client_body_failed) = RequestBody::from_client(body);
    let mut body = (!replayable).then_some(body);
    let mut tried: Vec<usize> = Vec::new();
    loop {
        let Some(index) = upstream.pick(&context, &tried) else {
            if tried.is_empty() {
                let reason = format!(
                    "no server of upstream {:?} is available",
                    upstream.config.name
                );
                return status_with_reason(StatusCode::SERVICE_UNAVAILABLE, &reason);
            }
            return status_response(StatusCode::BAD_GATEWAY);
        };
        let server = &upstream.servers[index];
        observation.server = Some(server.addr.clone());
        let active = server.begin_request();
        // A retry needs the headers again, so they are cloned only when a
        // retry is possible: retries left and another server to try.
        let may_retry = replayable
            && (tried.len() as u32) < upstream.config.retries
            && tried.len() + 1 < upstream.servers.len();
        let mut outgoing = Request::new(body.take().unwrap_or(RequestBody::Empty));
        *outgoing.method_mut() = parts.method.clone();
        *outgoing.uri_mut() = Uri::from(path_and_query.clone());
        *outgoing.version_mut() = version;
        *outgoing.headers_mut() = if may_retry {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };

        let response = tokio::time::timeout(
            upstream.config.read_timeout,
            send(upstream, &server.authority, outgoing, upgrade.is_some()),
        )
        .await;
        match response {
            Ok(Ok(mut response)) => {
                upstream.record(server, response.status().is_server_error());
                if let Some(upgrade) = upgrade.take() {
                    if upgrade.complete(&mut response, lifecycle) {
                        let (parts, _) = response.into_parts();
                        return Response::from_parts(parts, ProxyBody::empty());
                    }
                }
                let (mut parts, body) = response.into_parts();
                // The node answers in its own HTTP version, whatever the
                // server spoke (RFC 9110 §6.2); HTTP/2 ignores the field.
                parts.version = Version::HTTP_11;
                remove_hop_by_hop(&mut parts.headers);
                if listener.settings.via {
                    add_via(&mut parts.headers);
                }
                let body = match body {
                    Reply::Hyper(body) => ProxyBody::Upstream {
                        body,
                        _active: active,
                    },
                    Reply::Wire(body) => ProxyBody::Wire {
                        body,
                        _active: active,
                    },
                };
                return Response::from_parts(parts, body);
            }
            Ok(Err(error)) if client_body_failed.get() => {
                tracing::debug!(
                    upstream = %upstream.config.name,
                    error = %crate::report::error_chain(&error),
                    "the client's request body could not be read"
                );
                return status_response(StatusCode::BAD_REQUEST);
            }
            Ok(Err(error)) => {
                let retry = may_retry && error.is_connect();
                upstream.request_failed(server, &error, retry);
                if retry {
                    tried.push(index);
                    continue;
                }
                return status_response(StatusCode::BAD_GATEWAY);
            }
            Err(_) if client_body_failed.get() => {
                return status_response(StatusCode::BAD_REQUEST);
            }
            Err(_) => {
                upstream.timed_out(server);
                return status_response(StatusCode::GATEWAY_TIMEOUT);
            }
        }
    }
}

/// A response body from either of the node's HTTP/1 clients.
enum Reply {
    Hyper(UpstreamBody),
    Wire(WireBody),
}

/// Sends `request` to the server at `authority`: a bodiless request to a
/// plain HTTP/1.1 upstream over a bare pooled connection, anything else
/// through hyper's clients.
async fn send(
    upstream: &Upstream,
    authority: &Authority,
    request: Request<RequestBody>,
    upgrade: bool,
) -> Result<Response<Reply>, SendError> {
    let clients = upstream.clients.here();
    match &clients.raw {
        Some(pool) if !upgrade && request.body().is_end_stream() => {
            let response = client::send(pool, authority, &request).await?;
            Ok(response.map(Reply::Wire))
        }
        _ => {
            let tls = upstream.config.tls.is_some();
            let response = clients.send(request, authority, tls, upgrade).await?;
            Ok(response.map(Reply::Hyper))
        }
    }
}
