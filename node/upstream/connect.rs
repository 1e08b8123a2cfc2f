//! Connections to upstream servers: over TCP, a Unix socket, or a reverse
//! tunnel.
//!
//! hyper's client pools connections by URI authority, and neither a Unix
//! socket path nor a tunnel service is one: each such server gets a stable
//! synthetic authority (`s<hash>.invalid`, `.invalid` being reserved so it
//! can never resolve), recorded here, and the connector maps it back to
//! the address.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Authority;
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;

use crate::config::ServerAddr;
use crate::stream::Socket;
use crate::tunnel::Hub;

const SYNTHETIC_SUFFIX: &str = ".invalid";

fn synthetic_authorities() -> &'static Mutex<HashMap<String, ServerAddr>> {
    static AUTHORITIES: OnceLock<Mutex<HashMap<String, ServerAddr>>> = OnceLock::new();
    AUTHORITIES.get_or_init(Default::default)
}

/// The URI authority requests to `addr` carry.
pub fn authority(addr: &ServerAddr) -> Authority {
    match addr {
        ServerAddr::Tcp(addr) => {
            Authority::try_from(addr.to_string()).expect("a socket address is an authority")
        }
        ServerAddr::Unix(_) | ServerAddr::Tunnel(_) => {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            addr.hash(&mut hasher);
            let host = format!("s{:016x}{SYNTHETIC_SUFFIX}", hasher.finish());
            synthetic_authorities()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(host.clone(), addr.clone());
            Authority::try_from(host).expect("a synthetic host is an authority")
        }
    }
}

fn synthetic_addr(uri: &Uri) -> Option<ServerAddr> {
    let host = uri.host()?;
    if !host.ends_with(SYNTHETIC_SUFFIX) {
        return None;
    }
    synthetic_authorities()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(host)
        .cloned()
}

/// hyper's connector: TCP through its HttpConnector (timeouts, keepalive,
/// nodelay), Unix sockets and tunnels for the synthetic authorities.
#[derive(Clone)]
pub struct UpstreamConnector {
    pub tcp: HttpConnector,
    pub connect_timeout: Duration,
    pub tunnels: Arc<Hub>,
}

/// A connection the pool can hold.
pub struct UpstreamIo(TokioIo<Socket>);

impl UpstreamIo {
    pub fn into_socket(self) -> Socket {
        self.0.into_inner()
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        if let Some(addr) = synthetic_addr(&uri) {
            let timeout = self.connect_timeout;
            let tunnels = self.tunnels.clone();
            return Box::pin(async move {
                let socket = tokio::time::timeout(timeout, tunnels.connect(&addr))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
                Ok(UpstreamIo(TokioIo::new(socket)))
            });
        }
        let connecting = self.tcp.call(uri);
        Box::pin(async move {
            let stream = connecting.await?.into_inner();
            Ok(UpstreamIo(TokioIo::new(Socket::Tcp(stream))))
        })
    }
}
