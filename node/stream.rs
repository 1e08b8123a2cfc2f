//! A client connection as the protocols see it: TCP or a Unix socket,
//! counting the bytes that cross it for `tether.bytes` (every protocol
//! alike). Counts are kept in the connection and added to the metric every
//! `FLUSH_BYTES` and when it closes, so the request path touches no shared
//! counter.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use opentelemetry::KeyValue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Bytes counted before they are added to the shared metric.
const FLUSH_BYTES: u64 = 1 << 20;

pub struct ClientStream {
    io: Io,
    traffic: Option<Traffic>,
}

enum Io {
    Tcp(TcpStream),
    Unix(UnixStream),
}

struct Traffic {
    listener: Arc<str>,
    /// From the client, not yet added to the metric.
    read: u64,
    /// To the client, not yet added to the metric.
    written: u64,
}

impl Traffic {
    fn flush(&mut self) {
        let bytes = &crate::telemetry::metrics::node().bytes;
        for (direction, count) in [("in", &mut self.read), ("out", &mut self.written)] {
            if *count > 0 {
                let attributes = [
                    KeyValue::new("listener", self.listener.clone()),
                    KeyValue::new("direction", direction),
                ];
                bytes.add(std::mem::take(count), &attributes);
            }
        }
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        if let Some(traffic) = &mut self.traffic {
            traffic.flush();
        }
    }
}

impl ClientStream {
    /// `listener` names the connection in metrics; bytes are counted only
    /// when metrics are on.
    pub fn tcp(stream: TcpStream, listener: &Arc<str>) -> ClientStream {
        Self::new(Io::Tcp(stream), listener)
    }

    pub fn unix(stream: UnixStream, listener: &Arc<str>) -> ClientStream {
        Self::new(Io::Unix(stream), listener)
    }

    fn new(io: Io, listener: &Arc<str>) -> ClientStream {
        let traffic = crate::telemetry::metrics_enabled().then(|| Traffic {
            listener: listener.clone(),
            read: 0,
            written: 0,
        });
        ClientStream { io, traffic }
    }

    fn count(&mut self, read: usize, written: usize) {
        if let Some(traffic) = &mut self.traffic {
            traffic.read += read as u64;
            traffic.written += written as u64;
            if traffic.read + traffic.written >= FLUSH_BYTES {
                traffic.flush();
            }
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
        let poll = match &mut this.io {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
        };
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
        let poll = match &mut this.io {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, data),
            Io::Unix(s) => Pin::new(s).poll_write(cx, data),
        };
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
        let poll = match &mut this.io {
            Io::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        };
        if let Poll::Ready(Ok(written)) = &poll {
            this.count(0, *written);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Tcp(s) => s.is_write_vectored(),
            Io::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
