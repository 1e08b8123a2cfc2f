//! One request on the fast path: sent to a server on a pooled or new
//! connection, the response head rewritten for the client, the body
//! relayed as it comes. Failures map as on hyper's path: no server → 503,
//! refused, reset or malformed → 502, no response head in `read_timeout`
//! → 504; a bodiless idempotent request whose connection failed goes to
//! another server (`retries`), and one that finds a reused connection
//! closed by its server is sent again on a new one.

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::buffers;
use super::response::{self, Answer, BodyEnd, Framing};
use super::send::{self, Failure};
use super::ClientIo;
use crate::http::HttpListener;
use crate::lifecycle::Lifecycle;
use crate::stream::Socket;
use crate::telemetry::request::Observation;
use crate::upstream::{PickContext, RawPool, Server, Upstream};

/// A request ready to go upstream.
pub struct Plan<'h> {
    pub upstream: &'h Upstream,
    pub pool: &'h RawPool,
    /// The upstream request head and body.
    pub request: Vec<u8>,
    pub pick: PickContext,
    /// Bodiless and idempotent: may go to another server.
    pub replayable: bool,
    pub head_request: bool,
    /// The client connection ends after this response.
    pub close: bool,
    pub observation: Observation,
}

/// Forwards the request and relays the answer; answers whether the client
/// connection can carry another request.
pub async fn forward<I: ClientIo>(
    io: &mut I,
    plan: Plan<'_>,
    http: &HttpListener,
    lifecycle: &Lifecycle,
) -> bool {
    let Plan {
        upstream,
        pool,
        request,
        pick,
        replayable,
        head_request,
        close,
        mut observation,
    } = plan;
    let closing = Closing {
        asked: close,
        lifecycle,
    };
    let via = http.settings.via;
    let mut out = buffers::take_head();
    let mut tried: Vec<usize> = Vec::new();
    let keep = loop {
        let Some(index) = upstream.pick(&pick, &tried) else {
            let status = if tried.is_empty() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::BAD_GATEWAY
            };
            let detail = tried.is_empty().then(|| {
                format!(
                    "no server of upstream {:?} is available",
                    upstream.config.name
                )
            });
            break respond(
                io,
                status,
                detail.as_deref(),
                &closing,
                observation,
                http,
                out,
            )
            .await;
        };
        let server = &upstream.servers[index];
        observation.server = Some(server.addr.clone());
        let _active = server.begin_request();
        let may_retry = replayable
            && (tried.len() as u32) < upstream.config.retries
            && tried.len() + 1 < upstream.servers.len();
        let mut response = buffers::take_body();
        let sent = tokio::time::timeout(
            upstream.config.read_timeout,
            send::exchange(pool, &server.authority, &request, &mut response, |head| {
                // Only a complete head writes to `out`.
                out.clear();
                response::parse_response(head, head_request, via, closing.now(), &mut out)
            }),
        )
        .await;
        // Every way this can fail ends the same: the server's failure is
        // counted and the client answered, unless another server is tried.
        let (status, retry) = match sent {
            Ok(Ok((socket, answer))) => {
                let mut body = BodyEnd::new(answer.framing);
                // What arrived with the head goes out with the client's
                // head; if it is already broken, nothing has gone out yet.
                let arrived = &response[answer.len..];
                match body.take(arrived) {
                    Ok(used) => {
                        upstream.record(server, answer.status >= 500);
                        let status =
                            StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
                        observation.finish_with(
                            status,
                            answer.content_length,
                            &http.name,
                            &http.unrouted,
                            http.access_log.as_ref(),
                        );
                        let exchange = Relay {
                            socket,
                            answer: &answer,
                            body,
                            first: used,
                            pool,
                            server,
                            upstream,
                        };
                        break exchange.run(io, response, out).await && !answer.close;
                    }
                    Err(why) => {
                        upstream.record(server, true);
                        body_failed(upstream, server, why);
                        (StatusCode::BAD_GATEWAY, false)
                    }
                }
            }
            Ok(Err(failure)) => {
                let retry = may_retry && matches!(failure, Failure::Connect(_));
                upstream.request_failed(server, &failure, retry);
                (StatusCode::BAD_GATEWAY, retry)
            }
            Err(_) => {
                upstream.timed_out(server);
                (StatusCode::GATEWAY_TIMEOUT, false)
            }
        };
        buffers::give(response);
        out.clear();
        if retry {
            tried.push(index);
            continue;
        }
        break respond(io, status, None, &closing, observation, http, out).await;
    };
    buffers::give(request);
    keep
}

/// Whether the client connection ends after the response being written:
/// the client asked, or the generation retired meanwhile.
struct Closing<'a> {
    asked: bool,
    lifecycle: &'a Lifecycle,
}

impl Closing<'_> {
    fn now(&self) -> bool {
        self.asked || self.lifecycle.is_retired()
    }
}

/// A response whose head has been read and whose first bytes are known
/// to be good.
struct Relay<'a> {
    socket: Socket,
    answer: &'a Answer,
    body: BodyEnd,
    /// Bytes of the body that arrived with the head.
    first: usize,
    pool: &'a RawPool,
    server: &'a Server,
    upstream: &'a Upstream,
}

impl Relay<'_> {
    /// Writes the client's head and relays the body; keeps the server
    /// connection when the body ended cleanly. Answers whether the client
    /// got the whole response.
    async fn run<I: ClientIo>(self, io: &mut I, mut response: Vec<u8>, mut out: Vec<u8>) -> bool {
        let Relay {
            mut socket,
            answer,
            mut body,
            first,
            pool,
            server,
            upstream,
        } = self;
        let arrived = &response[answer.len..];
        let mut reusable = answer.reusable && first == arrived.len();
        // A body that ends at the server's close goes to the client chunked.
        let rechunk = answer.framing == Framing::UntilClose;
        push_body(&mut out, &arrived[..first], rechunk);
        let mut delivered = io.write_all(&out).await.is_ok();
        while delivered && !body.is_done() {
            response.clear();
            let read =
                tokio::time::timeout(upstream.config.read_timeout, socket.read_buf(&mut response))
                    .await;
            let chunk = match read {
                Ok(Ok(0)) if rechunk => {
                    body.done = true;
                    reusable = false;
                    delivered = io.write_all(b"0\r\n\r\n").await.is_ok();
                    break;
                }
                Ok(Ok(0)) => Err("the server closed the connection mid-body"),
                Ok(Ok(_)) => body.take(&response),
                Ok(Err(_)) => Err("the connection failed mid-body"),
                Err(_) => Err("the server stopped sending the body"),
            };
            let used = match chunk {
                Ok(used) => used,
                Err(why) => {
                    body_failed(upstream, server, why);
                    delivered = false;
                    break;
                }
            };
            reusable &= used == response.len();
            delivered = if rechunk {
                out.clear();
                push_body(&mut out, &response[..used], true);
                io.write_all(&out).await.is_ok()
            } else {
                io.write_all(&response[..used]).await.is_ok()
            };
        }
        buffers::give(response);
        buffers::give(out);
        delivered = delivered && io.flush().await.is_ok();
        if delivered && body.is_done() && reusable {
            pool.keep(&server.authority, socket);
        }
        delivered && body.is_done()
    }
}

/// Appends body bytes for the client, as one chunk when `chunk`.
fn push_body(out: &mut Vec<u8>, bytes: &[u8], chunk: bool) {
    if !chunk {
        out.extend_from_slice(bytes);
        return;
    }
    if bytes.is_empty() {
        // A zero-length chunk would end the body.
        return;
    }
    use std::io::Write;
    let _ = write!(out, "{:x}\r\n", bytes.len());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

fn body_failed(upstream: &Upstream, server: &Server, why: &str) {
    tracing::warn!(
        upstream = %upstream.config.name,
        server = %server.addr,
        error = why,
        "upstream response body failed"
    );
}

/// Writes a response of the node's own and records it.
async fn respond<I: ClientIo>(
    io: &mut I,
    status: StatusCode,
    detail: Option<&str>,
    closing: &Closing<'_>,
    observation: Observation,
    http: &HttpListener,
    mut out: Vec<u8>,
) -> bool {
    let close = closing.now();
    let length = response::write_status(status, detail, close, &mut out);
    observation.finish_with(
        status,
        Some(length),
        &http.name,
        &http.unrouted,
        http.access_log.as_ref(),
    );
    let written = io.write_all(&out).await.is_ok() && io.flush().await.is_ok();
    buffers::give(out);
    written && !close
}
