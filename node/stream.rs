//! Byte streams over TCP or a Unix socket: a client connection as the
//! protocols see it, counting the bytes that cross it into its listener's
//! `tether.bytes` counters (every protocol alike; one relaxed atomic add
//! per read or write, and only when metrics are on), and connections to
//! servers (upstreams, health probes).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::config::ServerAddr;
use crate::telemetry::metrics::ByteCounters;

pub struct ClientStream {
    io: Socket,
    traffic: Option<Arc<ByteCounters>>,
}

impl ClientStream {
    /// `listener` names the connection in metrics.
    pub fn tcp(stream: TcpStream, listener: &str) -> ClientStream {
        Self::new(Socket::Tcp(stream), listener)
    }

    pub fn unix(stream: UnixStream, listener: &str) -> ClientStream {
        Self::new(Socket::Unix(stream), listener)
    }

    fn new(io: Socket, listener: &str) -> ClientStream {
        let traffic = crate::telemetry::metrics_enabled()
            .then(|| crate::telemetry::metrics::byte_counters(listener));
        ClientStream { io, traffic }
    }

    /// Ready when a read may find bytes (or the end): lets a connection
    /// wait for its next request without holding a buffer.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.io {
            Socket::Tcp(stream) => stream.poll_read_ready(cx),
            Socket::Unix(stream) => stream.poll_read_ready(cx),
            Socket::Tunnel(_) => Poll::Ready(Ok(())),
        }
    }

    fn count(&self, read: usize, written: usize) {
        if let Some(traffic) = &self.traffic {
            if read > 0 {
                traffic.received.fetch_add(read as u64, Ordering::Relaxed);
            }
            if written > 0 {
                traffic.sent.fetch_add(written as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Connects to `addr` (TCP with no delay). A tunnel address is reached
/// through the node's tunnels (`tunnel::Hub::connect`), never here.
pub async fn connect(addr: &ServerAddr) -> io::Result<Socket> {
    match addr {
        ServerAddr::Tcp(addr) => {
            let stream = TcpStream::connect(addr).await?;
            let _ = stream.set_nodelay(true);
            Ok(Socket::Tcp(stream))
        }
        ServerAddr::Unix(path) => Ok(Socket::Unix(UnixStream::connect(path).await?)),
        ServerAddr::Tunnel(target) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "tunnel:{}/{} is reached through the node's tunnels",
                target.node, target.service
            ),
        )),
    }
}

/// A TCP or Unix-domain stream: clients on either kind of listener, and
/// upstream servers at any kind of address.
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A stream of a reverse tunnel (an HTTP/2 CONNECT stream).
    Tunnel(TunnelStream),
}

/// One stream of a reverse tunnel, counted open until dropped.
pub struct TunnelStream {
    io: TokioIo<Upgraded>,
    _open: OpenStream,
}

impl TunnelStream {
    /// `open` is incremented now and decremented when the stream drops.
    pub fn new(upgraded: Upgraded, open: Arc<AtomicU64>) -> TunnelStream {
        open.fetch_add(1, Ordering::Relaxed);
        TunnelStream {
            io: TokioIo::new(upgraded),
            _open: OpenStream(open),
        }
    }
}

struct OpenStream(Arc<AtomicU64>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tunnel(s) => Pin::new(&mut s.io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, data),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, data),
            Socket::Tunnel(s) => Pin::new(&mut s.io).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Socket::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Socket::Tunnel(s) => Pin::new(&mut s.io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Socket::Tcp(s) => s.is_write_vectored(),
            Socket::Unix(s) => s.is_write_vectored(),
            Socket::Tunnel(s) => s.io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
            Socket::Tunnel(s) => Pin::new(&mut s.io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tunnel(s) => Pin::new(&mut s.io).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.io).poll_read(cx, buf);
        this.count(buf.filled().len() - before, 0);
        poll
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, data);
        if let Poll::Ready(Ok(written)) = &poll {
            this.count(0, *written);
        }
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(written)) = &poll {
            this.count(0, *written);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
