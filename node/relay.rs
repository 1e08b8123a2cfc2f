//! A byte relay between two streams (TCP sessions, CONNECT and SOCKS5
//! tunnels, reverse-tunnel streams): both directions copied at once, a
//! half-close passed on, and the relay closed once no byte has moved
//! either way for `idle`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Per direction. tokio's default of 8 KiB costs a system call per 8 KiB on
/// bulk transfers; 64 KiB measured 1.4× the throughput (bench/protocols.sh).
const BUFFER: usize = 64 * 1024;

/// Copies until both sides are done, an error, or `idle` without traffic.
pub async fn run<A, B>(a: A, b: B, idle: Duration, peer: SocketAddr)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(Activity::new());
    let mut a = Tracked {
        inner: a,
        activity: activity.clone(),
    };
    let mut b = Tracked {
        inner: b,
        activity: activity.clone(),
    };
    tokio::select! {
        result = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, BUFFER, BUFFER) => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "tunnel ended with an error");
            }
        }
        _ = activity.idle_for(idle) => {
            tracing::debug!(%peer, ?idle, "tunnel idle; closing");
        }
    }
}

/// When bytes last moved, in milliseconds since `start`.
struct Activity {
    start: Instant,
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
            let quiet_until = self.start + last + idle;
            if Instant::now() >= quiet_until {
                return;
            }
            tokio::time::sleep_until(quiet_until.into()).await;
        }
    }
}

/// A stream that records activity on every read.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
