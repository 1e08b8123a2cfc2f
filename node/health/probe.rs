//! One health probe: an HTTP request or a TCP connect (with optional bytes
//! sent and expected). The caller bounds it with the check's timeout.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::Request;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_util::task::AbortOnDropHandle;

use crate::config::{CheckKind, HttpCheck, ServerAddr, TcpCheck, UpstreamTls};
use crate::stream::Socket;
use crate::tunnel::Hub;

/// The most a probe reads looking for an expected body or bytes.
const READ_LIMIT: usize = 64 * 1024;

/// A probe of one server, ready to run every interval. TLS settings
/// (trust roots, client certificate) are turned into a connector once, when
/// the checker starts, not on every probe: with no `ca` that means reading
/// the system trust store, which is slow and may change under a running node.
pub struct Probe {
    addr: ServerAddr,
    tunnels: Arc<Hub>,
    kind: CheckKind,
    /// For HTTP checks over TLS: the connector and the name to verify, or
    /// why there is none (every probe then fails with that reason).
    tls: Option<Result<(TlsConnector, ServerName<'static>), String>>,
}

impl Probe {
    pub fn new(addr: ServerAddr, kind: CheckKind, tunnels: Arc<Hub>) -> Probe {
        let tls = match &kind {
            CheckKind::Http(HttpCheck { tls: Some(tls), .. }) => Some(tls_connector(&addr, tls)),
            _ => None,
        };
        Probe {
            addr,
            tunnels,
            kind,
            tls,
        }
    }

    /// Ok, or the reason the probe failed (for logs and health events).
    pub async fn run(&self) -> Result<(), String> {
        let stream = self
            .tunnels
            .connect(&self.addr)
            .await
            .map_err(|e| format!("connect failed: {e}"))?;
        match (&self.kind, &self.tls) {
            (CheckKind::Http(check), None) => http_over(stream, &self.addr, check).await,
            (CheckKind::Http(check), Some(tls)) => {
                let (connector, name) = tls.as_ref().map_err(Clone::clone)?;
                let stream = connector
                    .connect(name.clone(), stream)
                    .await
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                http_over(stream, &self.addr, check).await
            }
            (CheckKind::Tcp(check), _) => tcp(stream, check).await,
        }
    }
}

fn tls_connector(
    addr: &ServerAddr,
    tls: &UpstreamTls,
) -> Result<(TlsConnector, ServerName<'static>), String> {
    let config = tls.client_config().map_err(|e| e.to_string())?;
    let name = match &tls.server_name {
        Some(name) => ServerName::try_from(name.clone()).map_err(|e| e.to_string())?,
        None => match addr {
            ServerAddr::Tcp(addr) => ServerName::IpAddress(addr.ip().into()),
            ServerAddr::Unix(_) | ServerAddr::Tunnel(_) => {
                return Err(format!(
                    "TLS to {addr} needs the upstream's tls.server_name"
                ))
            }
        },
    };
    Ok((TlsConnector::from(Arc::new(config)), name))
}

async fn http_over<S>(stream: S, addr: &ServerAddr, check: &HttpCheck) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    // Drives the connection; aborted with the probe so nothing outlives it.
    let driver = AbortOnDropHandle::new(tokio::spawn(connection));
    let host = check.host.clone().unwrap_or_else(|| match addr {
        ServerAddr::Tcp(addr) => addr.to_string(),
        ServerAddr::Unix(_) | ServerAddr::Tunnel(_) => "localhost".to_owned(),
    });
    let request = Request::builder()
        .method(check.method.clone())
        .uri(&check.path)
        .header(
            header::HOST,
            HeaderValue::try_from(host).map_err(|e| e.to_string())?,
        )
        .header(header::USER_AGENT, "tether-health-check")
        .header(header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status().as_u16();
    if !check
        .expect_status
        .iter()
        .any(|&(low, high)| (low..=high).contains(&status))
    {
        return Err(format!("status {status} is not expected"));
    }
    if let Some(expected) = &check.expect_body {
        let body = Limited::new(response.into_body(), READ_LIMIT)
            .collect()
            .await
            .map_err(|e| format!("reading the body failed: {e}"))?
            .to_bytes();
        if !contains(&body, expected.as_bytes()) {
            return Err(format!("body does not contain {expected:?}"));
        }
    }
    drop(driver);
    Ok(())
}

async fn tcp(mut stream: Socket, check: &TcpCheck) -> Result<(), String> {
    if let Some(send) = &check.send {
        stream
            .write_all(send)
            .await
            .map_err(|e| format!("send failed: {e}"))?;
    }
    let Some(expected) = &check.expect else {
        return Ok(());
    };
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    while !contains(&received, expected) {
        let read = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read failed: {e}"))?;
        if read == 0 || received.len() >= READ_LIMIT {
            return Err(format!(
                "did not receive {:?}",
                String::from_utf8_lossy(expected)
            ));
        }
        received.extend_from_slice(&chunk[..read]);
    }
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}
