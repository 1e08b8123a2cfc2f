//! Plain HTTP/1.1 to upstream servers, driven inside the request's own
//! task. hyper-util's pooled client runs each upstream connection in a
//! task of its own, so every request crossed from the client connection's
//! task to that task and back (two wake-ups and a channel each way). Here
//! the request's future polls the upstream connection itself until the
//! response head arrives, and the response body keeps polling it until the
//! last byte; then the connection goes back to this worker's idle pool.
//!
//! Upstreams over TLS or HTTP/2, and upgrades, keep the pooled client.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use tower_service::Service;

use super::client::RequestBody;
use super::connect::{UpstreamConnector, UpstreamIo};
use super::idle::{IdlePool, Reusable};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One upstream connection: hyper's two halves.
struct Exchange {
    sender: SendRequest<RequestBody>,
    connection: Connection<UpstreamIo, RequestBody>,
}

impl Reusable for Box<Exchange> {
    fn poll_reusable(&mut self, cx: &mut Context<'_>) -> bool {
        // One poll finishes the previous exchange's bookkeeping; a
        // connection that has ended, or is still busy with it (a request
        // body the server stopped reading), is not reused.
        !self.sender.is_closed()
            && Pin::new(&mut self.connection).poll(cx).is_pending()
            && matches!(self.sender.poll_ready(cx), Poll::Ready(Ok(())))
    }
}

/// Why a request could not be exchanged with a server.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect: {0}")]
    Connect(BoxError),
    #[error(transparent)]
    Exchange(#[from] hyper::Error),
    /// From hyper-util's pooled client.
    #[error(transparent)]
    Pooled(hyper_util::client::legacy::Error),
    #[error("cannot make the upstream URI: {0}")]
    Uri(http::uri::InvalidUriParts),
    /// From a bare pooled connection (the node's own HTTP/1 client).
    #[error("{0}")]
    Wire(BoxError),
}

impl SendError {
    /// The server was never reached: a request may go to another one.
    pub fn is_connect(&self) -> bool {
        match self {
            SendError::Connect(_) => true,
            SendError::Exchange(_) | SendError::Uri(_) | SendError::Wire(_) => false,
            SendError::Pooled(error) => error.is_connect(),
        }
    }
}

/// One worker's idle connections to the servers of one set of settings.
pub struct InlinePool {
    connector: UpstreamConnector,
    idle: Arc<IdlePool<Box<Exchange>>>,
}

impl InlinePool {
    pub fn new(
        connector: UpstreamConnector,
        idle_timeout: Duration,
        max_idle_per_server: usize,
    ) -> Self {
        InlinePool {
            connector,
            idle: Arc::new(IdlePool::new(idle_timeout, max_idle_per_server)),
        }
    }

    /// Sends `request` (its URI in origin form) to the server at
    /// `authority` on an idle connection, or a new one. A request that a
    /// reused connection did not take (the server had just closed it) goes
    /// on a new connection.
    pub async fn send(
        &self,
        mut request: Request<RequestBody>,
        authority: &Authority,
    ) -> Result<Response<InlineBody>, SendError> {
        if let Some(exchange) = self.idle.checkout(authority) {
            match exchange_on(exchange, request).await {
                Ok((response, exchange)) => {
                    return Ok(self.body_of(response, exchange, authority.clone()))
                }
                Err(Failed::NotSent(again)) => request = *again,
                Err(Failed::Error(error)) => return Err(error.into()),
            }
        }
        let exchange = self.connect(authority).await?;
        match exchange_on(exchange, request).await {
            Ok((response, exchange)) => Ok(self.body_of(response, exchange, authority.clone())),
            Err(Failed::NotSent(_)) => Err(SendError::Connect(
                "the new connection closed before the request was sent".into(),
            )),
            Err(Failed::Error(error)) => Err(error.into()),
        }
    }

    fn body_of(
        &self,
        response: Response<Incoming>,
        exchange: Box<Exchange>,
        authority: Authority,
    ) -> Response<InlineBody> {
        let pool = Arc::downgrade(&self.idle);
        response.map(|body| InlineBody {
            ended: body.is_end_stream(),
            body,
            exchange: Some(exchange),
            home: Some((pool, authority)),
        })
    }

    async fn connect(&self, authority: &Authority) -> Result<Box<Exchange>, SendError> {
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| SendError::Connect(e.into()))?;
        let mut connector = self.connector.clone();
        let io = connector.call(uri).await.map_err(SendError::Connect)?;
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        Ok(Box::new(Exchange { sender, connection }))
    }
}

enum Failed {
    /// The connection ended before it took the request.
    NotSent(Box<Request<RequestBody>>),
    Error(hyper::Error),
}

/// Sends `request` on `exchange` and drives the connection until the
/// response head arrives.
async fn exchange_on(
    mut exchange: Box<Exchange>,
    request: Request<RequestBody>,
) -> Result<(Response<Incoming>, Box<Exchange>), Failed> {
    let mut response = std::pin::pin!(exchange.sender.try_send_request(request));
    let mut connection_done = false;
    let result = poll_fn(|cx| {
        if !connection_done {
            // Ends on its own only when the server closes or fails; the
            // response future then resolves with the reason.
            connection_done = Pin::new(&mut exchange.connection).poll(cx).is_ready();
        }
        response.as_mut().poll(cx)
    })
    .await;
    match result {
        Ok(response) => Ok((response, exchange)),
        Err(mut error) => match error.take_message() {
            Some(request) => Err(Failed::NotSent(Box::new(request))),
            None => Err(Failed::Error(error.into_error())),
        },
    }
}

/// A response body that drives its upstream connection, and hands the
/// connection back to its pool once the body has ended.
pub struct InlineBody {
    body: Incoming,
    /// The body has been read to its end.
    ended: bool,
    exchange: Option<Box<Exchange>>,
    home: Option<(Weak<IdlePool<Box<Exchange>>>, Authority)>,
}

impl Body for InlineBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(exchange) = &mut this.exchange {
            if Pin::new(&mut exchange.connection).poll(cx).is_ready() {
                // Ended (closed after this response, or failed): the body
                // gets the rest or the error, and nothing goes back.
                this.exchange = None;
            }
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for InlineBody {
    fn drop(&mut self) {
        // Only a connection whose response was read to the end can carry
        // another; one dropped mid-body is closed.
        if !self.is_end_stream() {
            return;
        }
        if let (Some(exchange), Some((pool, authority))) = (self.exchange.take(), self.home.take())
        {
            if let Some(pool) = pool.upgrade() {
                pool.checkin(&authority, exchange);
            }
        }
    }
}
