//! Plain HTTP/1.1 connections to upstream servers as bare sockets, for the
//! node's own HTTP/1 path (`http::h1`), which writes requests and reads
//! responses on them itself. Pooled per worker like the others.

use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::Context;
use std::time::Duration;

use http::uri::Authority;
use http::Uri;
use tokio::io::{AsyncRead, ReadBuf};
use tower_service::Service;

use super::connect::UpstreamConnector;
use super::idle::{IdlePool, Reusable};
use crate::stream::Socket;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Reusable for Socket {
    fn poll_reusable(&mut self, cx: &mut Context<'_>) -> bool {
        // Between exchanges a server sends nothing: any byte, the end of
        // the stream or an error means the connection is done.
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        Pin::new(self).poll_read(cx, &mut buf).is_pending()
    }
}

pub struct RawPool {
    connector: UpstreamConnector,
    idle: Arc<IdlePool<Socket>>,
}

impl RawPool {
    pub fn new(
        connector: UpstreamConnector,
        idle_timeout: Duration,
        max_idle_per_server: usize,
    ) -> Self {
        RawPool {
            connector,
            idle: Arc::new(IdlePool::new(idle_timeout, max_idle_per_server)),
        }
    }

    /// An idle connection to `authority`, which may turn out closed.
    pub fn take(&self, authority: &Authority) -> Option<Socket> {
        self.idle.take_recent(authority)
    }

    /// A new connection to `authority` (connect timeout included).
    pub async fn connect(&self, authority: &Authority) -> Result<Socket, BoxError> {
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query("/")
            .build()?;
        let mut connector = self.connector.clone();
        Ok(connector.call(uri).await?.into_socket())
    }

    /// Keeps a connection whose last response was read to its end.
    pub fn keep(&self, authority: &Authority, socket: Socket) {
        self.idle.checkin(authority, socket);
    }

    /// Where a connection to `authority` goes back to once a response body
    /// read elsewhere has ended, while the pool lives.
    pub fn home(&self, authority: &Authority) -> Home {
        Home {
            idle: Arc::downgrade(&self.idle),
            authority: authority.clone(),
        }
    }
}

pub struct Home {
    idle: Weak<IdlePool<Socket>>,
    authority: Authority,
}

impl Home {
    pub fn keep(self, socket: Socket) {
        if let Some(idle) = self.idle.upgrade() {
            idle.checkin(&self.authority, socket);
        }
    }
}
