//! The HTTP/1.1 fast path: the node reads plain request heads itself
//! (httparse), writes them to a pooled upstream connection, and relays the
//! response without building a request or response object, for the shape
//! almost all proxied traffic has. hyper stays for everything else: the
//! first request this path does not take (HTTP/2's preface, an upgrade, a
//! chunked or unfinished body, static files, TLS or HTTP/2 upstreams, any
//! head it would not parse exactly as hyper does) is handed to hyper with
//! the bytes read so far, and hyper serves the connection from there on.

mod buffers;
mod chunked;
pub mod client;
mod exchange;
mod head;
mod response;
mod rewind;
mod send;

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

pub use rewind::Rewind;

use self::exchange::Plan;
use self::head::{Forwarding, Parsed, RequestHead};
use super::{HttpListener, RouteTarget};
use crate::config::HashKey;
use crate::lifecycle::{ConnectionGuard, Lifecycle, RequestGuard};
use crate::stream::ClientStream;
use crate::telemetry::request::{Observation, RequestView};
use crate::upstream::{hash_bytes, hash_ip, PickContext};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client connection the fast path can serve.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin {
    /// Ready when a read may find bytes: an idle connection waits for its
    /// next request without holding a buffer. Streams that buffer inside
    /// (TLS) are always ready.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ClientIo for ClientStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ClientStream::poll_read_ready(self, cx)
    }
}

impl ClientIo for tokio_rustls::server::TlsStream<ClientStream> {
    fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Serves requests until the connection ends (None) or hyper is to take
/// over (the stream, with what was read of it and not yet served).
pub async fn serve<I: ClientIo>(
    mut io: I,
    peer: SocketAddr,
    connection: &ConnectionGuard,
    http: &HttpListener,
) -> Option<Rewind<I>> {
    let lifecycle = connection.lifecycle();
    let client = super::headers::client_header_value(peer.ip());
    let timeout = http.settings.header_read_timeout;
    let mut input = Input::default();
    let mut waits = Waits {
        killed: pin!(lifecycle.killed()),
        retired: pin!(lifecycle.retired()),
        timer: pin!(tokio::time::sleep(timeout)),
        idle_until: None,
    };
    let mut served = 0u64;
    loop {
        let deadline = Instant::now() + timeout;
        let decision = loop {
            if !input.is_empty() {
                match decide(input.bytes(), http, peer, client.as_bytes(), lifecycle) {
                    Decision::NeedMore => {}
                    decision => break decision,
                }
            }
            match waits.fill(&mut io, &mut input, deadline, lifecycle).await {
                Filled::Data => {}
                Filled::End => return None,
                Filled::TimedOut => {
                    if served == 0 && input.is_empty() {
                        tracing::debug!(%peer, ?timeout, "closing a connection that sent no request");
                    }
                    return None;
                }
            }
        };
        let _in_flight = RequestGuard::new(lifecycle);
        let keep = match decision {
            Decision::NeedMore => unreachable!("more bytes are read above"),
            Decision::HandOff => return Some(Rewind::new(input.into_bytes(), io)),
            Decision::Refuse(status) => {
                let mut out = buffers::take_head();
                response::write_status(status, None, true, &mut out);
                let _ = io.write_all(&out).await;
                buffers::give(out);
                false
            }
            Decision::Forward(consumed, plan) => {
                input.consume(consumed);
                tokio::select! {
                    keep = exchange::forward(&mut io, plan, http, lifecycle) => keep,
                    _ = waits.killed.as_mut() => return None,
                }
            }
        };
        served += 1;
        if !keep {
            let _ = tokio::time::timeout(timeout, io.shutdown()).await;
            return None;
        }
    }
}

// Lives for one call on the stack; boxing the plan would allocate per request.
#[allow(clippy::large_enum_variant)]
enum Decision<'h> {
    NeedMore,
    HandOff,
    /// Refused with this status; the connection closes.
    Refuse(StatusCode),
    /// Bytes of input the request used, and what to do with it.
    Forward(usize, Plan<'h>),
}

fn decide<'h>(
    bytes: &[u8],
    http: &'h HttpListener,
    peer: SocketAddr,
    client: &[u8],
    lifecycle: &Lifecycle,
) -> Decision<'h> {
    let preface = bytes.len().min(H2_PREFACE.len());
    if bytes[..preface] == H2_PREFACE[..preface] {
        return if preface < H2_PREFACE.len() {
            Decision::NeedMore
        } else {
            Decision::HandOff
        };
    }
    let max_head = http.settings.max_header_bytes;
    let mut slots = head::header_slots();
    let head = match head::parse_request(bytes, &mut slots) {
        Parsed::Complete(head) => head,
        Parsed::Partial if bytes.len() < max_head => return Decision::NeedMore,
        Parsed::Partial | Parsed::HandOff => return Decision::HandOff,
        Parsed::Refused(why) => {
            tracing::debug!(%peer, why, "request refused");
            return Decision::Refuse(StatusCode::BAD_REQUEST);
        }
    };
    if head.len > max_head {
        return Decision::HandOff;
    }
    let consumed = head.len + head.body_len;
    if consumed > bytes.len() {
        // A small body on its way is waited for; a large one streams
        // through hyper.
        return if head.body_len <= buffers::BODY {
            Decision::NeedMore
        } else {
            Decision::HandOff
        };
    }
    let route = http.router.find(Some(head.host), head.path());
    let upstream = match route.map(|route| &route.target) {
        Some(RouteTarget::Upstream(upstream)) => upstream,
        // Static files, and the 404 of no route, are hyper's.
        _ => return Decision::HandOff,
    };
    let Some(pool) = upstream.clients.here().raw.as_ref() else {
        return Decision::HandOff;
    };
    let mut observation = Observation::start(&head, peer, http.scheme, http.access_log.is_some());
    observation.route = route.map(|route| route.labels.clone());
    let trace = observation.is_traced().then(|| {
        let mut headers = HeaderMap::new();
        observation.propagate(&mut headers);
        headers
    });
    let mut request = buffers::take_head();
    let forwarding = Forwarding {
        client,
        scheme: http.scheme,
        via: http.settings.via,
        trace: trace.as_ref(),
    };
    head::write_upstream_head(&head, &forwarding, &mut request);
    request.extend_from_slice(&bytes[head.len..consumed]);
    let idempotent = Method::from_bytes(head.method.as_bytes()).is_ok_and(|m| m.is_idempotent());
    let plan = Plan {
        upstream,
        pool,
        request,
        pick: pick_context(&head, peer, upstream.hash_key()),
        replayable: upstream.config.retries > 0 && idempotent && head.body_len == 0,
        head_request: head.is_head(),
        close: head.close || lifecycle.is_retired(),
        observation,
    };
    Decision::Forward(consumed, plan)
}

fn pick_context(head: &RequestHead<'_>, peer: SocketAddr, key: Option<&HashKey>) -> PickContext {
    let client_ip = peer.ip();
    let key_hash = key.map(|key| match key {
        HashKey::ClientIp => hash_ip(client_ip),
        HashKey::Header(name) => head
            .header(name.as_str())
            .map_or_else(|| hash_ip(client_ip), hash_bytes),
    });
    PickContext {
        client_ip,
        key_hash,
    }
}

/// Bytes read from the client and not yet served; no buffer while empty.
#[derive(Default)]
struct Input {
    buffer: Option<Vec<u8>>,
    start: usize,
}

impl Input {
    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref().map_or(&[], |b| &b[self.start..])
    }

    fn is_empty(&self) -> bool {
        self.bytes().is_empty()
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.is_empty() {
            self.start = 0;
            if let Some(buffer) = self.buffer.take() {
                buffers::give(buffer);
            }
        }
    }

    fn into_bytes(mut self) -> Bytes {
        let bytes = Bytes::copy_from_slice(self.bytes());
        if let Some(buffer) = self.buffer.take() {
            buffers::give(buffer);
        }
        bytes
    }

    /// Reads what the client sent. Pending with no buffer held when
    /// nothing is there and nothing was kept.
    fn poll_fill<I: ClientIo>(
        &mut self,
        io: &mut I,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if self.buffer.is_none() {
            ready!(io.poll_read_ready(cx))?;
        }
        let buffer = self.buffer.get_or_insert_with(buffers::take_head);
        if self.start > 0 {
            buffer.drain(..self.start);
            self.start = 0;
        }
        if buffer.capacity() - buffer.len() < 1024 {
            buffer.reserve(buffers::HEAD);
        }
        let read = tokio_util::io::poll_read_buf(Pin::new(io), cx, buffer);
        if read.is_pending() && buffer.is_empty() {
            if let Some(buffer) = self.buffer.take() {
                buffers::give(buffer);
            }
        }
        read
    }
}

enum Filled {
    Data,
    /// The client closed, or the generation's drain deadline passed.
    End,
    TimedOut,
}

/// What a connection waits on beside its client.
struct Waits<'a, K, R> {
    killed: Pin<&'a mut K>,
    retired: Pin<&'a mut R>,
    /// One timer per connection, moved only when it fires early: the
    /// deadline moves with every request, the timer need not.
    timer: Pin<&'a mut tokio::time::Sleep>,
    /// Once retired: when an idle connection closes.
    idle_until: Option<Instant>,
}

impl<K: Future, R: Future> Waits<'_, K, R> {
    async fn fill<I: ClientIo>(
        &mut self,
        io: &mut I,
        input: &mut Input,
        deadline: Instant,
        lifecycle: &Lifecycle,
    ) -> Filled {
        poll_fn(|cx| {
            if self.killed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Filled::End);
            }
            if self.idle_until.is_none() && self.retired.as_mut().poll(cx).is_ready() {
                self.idle_until = Some(Instant::now() + lifecycle.drain_idle_grace());
            }
            match input.poll_fill(io, cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Filled::End),
                Poll::Ready(Ok(_)) => return Poll::Ready(Filled::Data),
                Poll::Pending => {}
            }
            let due = match self.idle_until {
                Some(idle_until) if input.is_empty() => deadline.min(idle_until),
                _ => deadline,
            };
            loop {
                if due < self.timer.deadline() {
                    self.timer.as_mut().reset(due);
                }
                if self.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if Instant::now() >= due {
                    return Poll::Ready(Filled::TimedOut);
                }
                self.timer.as_mut().reset(due);
            }
        })
        .await
    }
}
