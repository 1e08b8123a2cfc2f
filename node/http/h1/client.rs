//! Bodiless plain HTTP/1.1 upstream requests from hyper's side of the node
//! (HTTP/2 clients, and HTTP/1 requests the fast path left to hyper), over
//! the same bare pooled sockets as the fast path: the head written from the
//! request's parts, the response head read with httparse into a
//! `Response`, the body decoded as it arrives. hyper's HTTP/1 client (a
//! dispatcher, a channel and a body channel per request) stays for
//! requests with a body and for upgrades.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::uri::Authority;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};

use super::buffers;
use super::head::{header_slots, push_header};
use super::response::{read_response, BodyEnd, Framing, Step};
use super::send::{self, Failure};
use crate::stream::Socket;
use crate::upstream::{Home, RawPool, SendError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Sends a request whose body is empty; the response's body reads from
/// the connection, which goes back to the pool when the body has ended.
pub async fn send<B>(
    pool: &RawPool,
    authority: &Authority,
    request: &Request<B>,
) -> Result<Response<WireBody>, SendError> {
    let mut head = buffers::take_head();
    write_request_head(request, &mut head);
    let head_request = request.method() == http::Method::HEAD;
    let mut buffer = buffers::take_body();
    let sent = send::exchange(pool, authority, &head, &mut buffer, |bytes| {
        let mut slots = header_slots();
        match read_response(bytes, head_request, &mut slots) {
            Step::Complete(head) => match response_parts(&head) {
                Some(parts) => Step::Complete((parts, head.len, head.framing, head.reusable)),
                None => Step::Malformed("a header hyper cannot represent"),
            },
            Step::Partial => Step::Partial,
            Step::Malformed(why) => Step::Malformed(why),
            Step::Interim(len) => Step::Interim(len),
        }
    })
    .await;
    buffers::give(head);
    let (socket, (response, len, framing, reusable)) = match sent {
        Ok(sent) => sent,
        Err(failure) => {
            buffers::give(buffer);
            return Err(match failure {
                Failure::Connect(error) => SendError::Connect(error),
                other => SendError::Wire(other.into()),
            });
        }
    };
    let body = WireBody {
        socket: Some(socket),
        buffer,
        at: len,
        end: BodyEnd::new(framing),
        reusable,
        home: Some(pool.home(authority)),
    };
    let mut body = body;
    body.keep_if_done();
    Ok(response.map(|()| body))
}

fn write_request_head<B>(request: &Request<B>, out: &mut Vec<u8>) {
    out.extend_from_slice(request.method().as_str().as_bytes());
    out.push(b' ');
    let target = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in request.headers() {
        push_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    // A method that usually carries a body says it has none.
    let method = request.method();
    let usually_has_body = !matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::DELETE | http::Method::OPTIONS
    );
    if usually_has_body && !request.headers().contains_key(http::header::CONTENT_LENGTH) {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn response_parts(head: &super::response::ResponseHead<'_>) -> Option<Response<()>> {
    let mut headers = HeaderMap::with_capacity(head.headers.len());
    for header in head.headers {
        // The body is decoded here: its framing does not go on.
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            continue;
        }
        let name = HeaderName::from_bytes(header.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(header.value).ok()?;
        headers.append(name, value);
    }
    let mut response = Response::new(());
    *response.status_mut() = StatusCode::from_u16(head.status).ok()?;
    *response.version_mut() = Version::HTTP_11;
    *response.headers_mut() = headers;
    Some(response)
}

/// A response body read from a bare upstream connection.
pub struct WireBody {
    socket: Option<Socket>,
    buffer: Vec<u8>,
    /// Where the unread bytes in `buffer` start.
    at: usize,
    end: BodyEnd,
    reusable: bool,
    home: Option<Home>,
}

impl WireBody {
    /// Once the body has ended cleanly, the connection goes back.
    fn keep_if_done(&mut self) {
        if !self.end.is_done() {
            return;
        }
        let clean = self.reusable && self.at == self.buffer.len();
        if let (true, Some(socket), Some(home)) = (clean, self.socket.take(), self.home.take()) {
            home.keep(socket);
        }
        self.socket = None;
    }

    fn fail(&mut self, why: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.socket = None;
        self.end.done = true;
        self.reusable = false;
        Poll::Ready(Some(Err(why.into())))
    }
}

impl Body for WireBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.end.is_done() {
                this.keep_if_done();
                return Poll::Ready(None);
            }
            if this.at < this.buffer.len() {
                let start = this.at;
                let (used, data) = match this.end.data(&this.buffer[start..]) {
                    Ok(next) => next,
                    Err(why) => return this.fail(why),
                };
                this.at += used;
                if let Some(data) = data.filter(|data| !data.is_empty()) {
                    let bytes = Bytes::copy_from_slice(&this.buffer[start..][data]);
                    this.keep_if_done();
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                continue;
            }
            let Some(socket) = this.socket.as_mut() else {
                return this.fail("the upstream connection is gone");
            };
            this.buffer.clear();
            this.at = 0;
            match tokio_util::io::poll_read_buf(Pin::new(socket), cx, &mut this.buffer) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if this.end.framing == Framing::UntilClose => {
                    this.end.done = true;
                    this.reusable = false;
                }
                Poll::Ready(Ok(0)) => {
                    return this.fail("the server closed the connection mid-body")
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(_)) => return this.fail("the upstream connection failed mid-body"),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.end.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.end.remaining() {
            Some(left) => SizeHint::with_exact(left),
            None => SizeHint::default(),
        }
    }
}

impl Drop for WireBody {
    fn drop(&mut self) {
        // A body dropped before its end takes its connection with it.
        self.keep_if_done();
        buffers::give(std::mem::take(&mut self.buffer));
    }
}
