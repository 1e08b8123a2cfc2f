//! The response body type: an upstream's body streamed through, a file
//! streamed from disk, or a small in-memory body. An enum rather than a
//! boxed trait object, so no response pays for an allocation.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::fs::File;
use tokio_util::io::poll_read_buf;

use super::h1::client::WireBody;
use crate::upstream::{ActiveRequest, UpstreamBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

const FILE_CHUNK: usize = 64 * 1024;

pub enum ProxyBody {
    /// An upstream response body; the guard counts the request against its
    /// server until the body is done.
    Upstream {
        body: UpstreamBody,
        _active: ActiveRequest,
    },
    /// An upstream response body read by the node's own HTTP/1 client.
    Wire {
        body: WireBody,
        _active: ActiveRequest,
    },
    /// A body streamed through with nothing to count (forward proxy).
    Stream(Incoming),
    File {
        file: File,
        remaining: u64,
        buf: BytesMut,
    },
    Full(Option<Bytes>),
}

impl ProxyBody {
    pub fn empty() -> Self {
        ProxyBody::Full(None)
    }

    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        ProxyBody::Full((!bytes.is_empty()).then_some(bytes))
    }

    /// `remaining` bytes of `file` from its current position.
    pub fn file(file: File, remaining: u64) -> Self {
        ProxyBody::File {
            file,
            remaining,
            buf: BytesMut::new(),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Upstream { body, .. } => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ProxyBody::Wire { body, .. } => Pin::new(body).poll_frame(cx),
            ProxyBody::Stream(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::File {
                file,
                remaining,
                buf,
            } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let want = (*remaining).min(FILE_CHUNK as u64) as usize;
                buf.reserve(want);
                let read = match poll_read_buf(Pin::new(file), cx, &mut (&mut *buf).limit(want)) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                    Poll::Ready(Ok(0)) => {
                        let message = "file shorter than its length when the response began";
                        return Poll::Ready(Some(Err(message.into())));
                    }
                    Poll::Ready(Ok(n)) => n,
                };
                *remaining -= read as u64;
                let chunk = buf.split_to(read).freeze();
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Wire { body, .. } => body.is_end_stream(),
            ProxyBody::Stream(body) => body.is_end_stream(),
            ProxyBody::File { remaining, .. } => *remaining == 0,
            ProxyBody::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Wire { body, .. } => body.size_hint(),
            ProxyBody::Stream(body) => body.size_hint(),
            ProxyBody::File { remaining, .. } => SizeHint::with_exact(*remaining),
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}
