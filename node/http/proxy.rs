//! Forwarding one request to an upstream server and streaming the answer
//! back. Failures map to the statuses operators expect: no server available
//! → 503, refused or reset → 502, no response in time → 504.

use std::net::IpAddr;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use super::body::ProxyBody;
use super::headers::{add_forwarded, add_via, remove_hop_by_hop};
use super::respond::{status_response, status_with_reason};
use crate::config::{HashKey, HttpSettings, UpstreamProtocol};
use crate::upstream::{balance_hash, PickContext, Upstream};

pub async fn forward(
    mut request: Request<Incoming>,
    upstream: &Upstream,
    client_ip: IpAddr,
    settings: &HttpSettings,
) -> Response<ProxyBody> {
    let key_hash = upstream.hash_key().map(|key| match key {
        HashKey::ClientIp => balance_hash(&client_ip),
        HashKey::Header(name) => request.headers().get(name).map_or_else(
            || balance_hash(&client_ip),
            |value| balance_hash(value.as_bytes()),
        ),
    });
    let Some(server) = upstream.pick(&PickContext {
        client_ip,
        key_hash,
    }) else {
        let reason = format!(
            "no server of upstream {:?} is available",
            upstream.config.name
        );
        return status_with_reason(StatusCode::SERVICE_UNAVAILABLE, &reason);
    };
    let active = server.begin_request();

    let path_and_query = request
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    let uri = Uri::builder()
        .scheme("http")
        .authority(server.authority.clone())
        .path_and_query(path_and_query)
        .build();
    let Ok(uri) = uri else {
        return status_response(StatusCode::BAD_REQUEST);
    };
    // HTTP/2 clients send :authority instead of Host.
    let host = match request.headers().get(header::HOST) {
        Some(host) => Some(host.clone()),
        None => request
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    let headers = request.headers_mut();
    remove_hop_by_hop(headers);
    add_forwarded(headers, client_ip, "http", host.as_ref());
    if settings.via {
        add_via(headers);
    }
    if let Some(host) = host {
        headers.insert(header::HOST, host);
    }
    *request.uri_mut() = uri;
    *request.version_mut() = match upstream.config.protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::H2c => Version::HTTP_2,
    };

    let response = tokio::time::timeout(
        upstream.config.read_timeout,
        upstream.client.request(request),
    )
    .await;
    match response {
        Ok(Ok(response)) => {
            let (mut parts, body) = response.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            if settings.via {
                add_via(&mut parts.headers);
            }
            Response::from_parts(
                parts,
                ProxyBody::Upstream {
                    body,
                    _active: active,
                },
            )
        }
        Ok(Err(error)) => {
            tracing::warn!(
                upstream = %upstream.config.name,
                server = %server.addr,
                error = %error_chain(&error),
                "upstream request failed"
            );
            status_response(StatusCode::BAD_GATEWAY)
        }
        Err(_) => {
            tracing::warn!(
                upstream = %upstream.config.name,
                server = %server.addr,
                timeout = ?upstream.config.read_timeout,
                "upstream did not answer in time"
            );
            status_response(StatusCode::GATEWAY_TIMEOUT)
        }
    }
}

/// "client error (Connect): tcp connect error: Connection refused": the
/// whole cause chain, which hyper's own Display leaves out.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
