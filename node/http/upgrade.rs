//! Upgrade pass-through (WebSocket and other upgraded protocols): the
//! HTTP/1.1 Upgrade handshake is proxied like any request; once the
//! upstream answers 101, both connections become one byte tunnel until
//! either side closes. WebSocket over HTTP/2 (RFC 8441: an extended CONNECT
//! with `:protocol = websocket`, the stream then carrying the WebSocket
//! bytes) goes to the upstream as an HTTP/1.1 Upgrade, and its 101 is the
//! client's 200. A tunnel is in-flight work of its generation: a drain
//! waits for it up to drain_timeout, then closes it.

use base64::Engine as _;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::ext::Protocol;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::lifecycle::Lifecycle;

static SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
static SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");

/// A client's request to switch protocols.
pub struct UpgradeRequest {
    protocol: HeaderValue,
    client: OnUpgrade,
    /// Asked as an HTTP/2 extended CONNECT (RFC 8441), not an HTTP/1.1
    /// Upgrade.
    extended_connect: bool,
}

/// Takes the upgrade out of a request that asks for one: an HTTP/1.1
/// Upgrade, or an HTTP/2 extended CONNECT for WebSocket.
pub fn take(request: &mut Request<Incoming>) -> Option<UpgradeRequest> {
    if request.version() == Version::HTTP_2 {
        let websocket = request.method() == Method::CONNECT
            && request
                .extensions()
                .get::<Protocol>()
                .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
        return websocket.then(|| UpgradeRequest {
            protocol: HeaderValue::from_static("websocket"),
            client: hyper::upgrade::on(request),
            extended_connect: true,
        });
    }
    if request.version() != Version::HTTP_11 {
        return None;
    }
    let asks = request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let protocol = request.headers().get(header::UPGRADE)?.clone();
    asks.then(|| UpgradeRequest {
        protocol,
        client: hyper::upgrade::on(request),
        extended_connect: false,
    })
}

impl UpgradeRequest {
    /// Asked as WebSocket over HTTP/2, which only an HTTP/1.1 upstream can
    /// be asked for here.
    pub fn is_extended_connect(&self) -> bool {
        self.extended_connect
    }

    /// Makes the upstream request an HTTP/1.1 Upgrade: puts back the two
    /// headers hop-by-hop removal took out, and turns an extended CONNECT
    /// into the GET with a `Sec-WebSocket-Key` that RFC 6455 asks for.
    pub fn prepare(&self, parts: &mut Parts) {
        let headers = &mut parts.headers;
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.protocol.clone());
        if self.extended_connect {
            parts.method = Method::GET;
            let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
            let key = HeaderValue::from_str(&key).expect("base64 is a valid header value");
            headers.insert(SEC_WEBSOCKET_KEY.clone(), key);
        }
    }

    /// When the upstream agreed (101), joins the two connections in a task
    /// of the generation whose `lifecycle` is given, and answers true; otherwise leaves things as they are.
    pub fn complete<B>(
        self,
        response: &mut Response<B>,
        lifecycle: &std::sync::Arc<Lifecycle>,
    ) -> bool {
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return false;
        }
        let upstream = hyper::upgrade::on(&mut *response);
        if self.extended_connect {
            // An HTTP/2 stream says yes with 200 and carries no
            // connection-specific headers; the accept key answered a key
            // the client never sent.
            *response.status_mut() = StatusCode::OK;
            let headers = response.headers_mut();
            headers.remove(header::CONNECTION);
            headers.remove(header::UPGRADE);
            headers.remove(&SEC_WEBSOCKET_ACCEPT);
        } else {
            let protocol = response
                .headers()
                .get(header::UPGRADE)
                .cloned()
                .unwrap_or(self.protocol.clone());
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            response.headers_mut().insert(header::UPGRADE, protocol);
        }
        let owner = lifecycle.clone();
        let client = self.client;
        lifecycle.tasks().spawn(async move {
            let tunnel = async {
                let (client, upstream) = tokio::try_join!(client, upstream)?;
                let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            };
            tokio::select! {
                result = tunnel => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "upgraded connection ended with an error");
                    }
                }
                _ = owner.killed() => {}
            }
        });
        true
    }
}
