//! HTTP/1.1 Upgrade pass-through (WebSocket and other upgraded protocols):
//! the Upgrade handshake is proxied like any request; once the upstream
//! answers 101, both connections become one byte tunnel until either side
//! closes. A tunnel is in-flight work of its generation: a drain waits for
//! it up to drain_timeout, then closes it.

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::lifecycle::Lifecycle;

/// A client's request to switch protocols.
pub struct UpgradeRequest {
    protocol: HeaderValue,
    client: OnUpgrade,
}

/// Takes the upgrade out of an HTTP/1.1 request that asks for one.
pub fn take(request: &mut Request<Incoming>) -> Option<UpgradeRequest> {
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
    })
}

impl UpgradeRequest {
    /// Puts back the two headers that hop-by-hop removal took out.
    pub fn restore(&self, headers: &mut http::HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.protocol.clone());
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
        let protocol = response
            .headers()
            .get(header::UPGRADE)
            .cloned()
            .unwrap_or(self.protocol.clone());
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        response.headers_mut().insert(header::UPGRADE, protocol);
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
