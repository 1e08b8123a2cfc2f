//! A request's bytes sent to a server on a pooled connection or a new one,
//! and the response head read back. A pooled connection the server closed
//! while it sat idle (the request met the end of the stream or a reset
//! before any byte of an answer) is replaced by a new one and the request
//! sent again: the server never saw it.

use std::io;

use http::uri::Authority;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::buffers::BODY;
use super::response::Step;
use crate::stream::Socket;
use crate::upstream::RawPool;

/// The longest response head taken from a server.
const MAX_RESPONSE_HEAD: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("cannot connect: {0}")]
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The connection ended before any byte of a response.
    #[error("the server closed the connection without answering")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("{0}")]
    Protocol(&'static str),
}

/// Sends `request` and reads into `response` until `head` finds a whole
/// response head in it (1xx heads are dropped on the way).
pub async fn exchange<T>(
    pool: &RawPool,
    authority: &Authority,
    request: &[u8],
    response: &mut Vec<u8>,
    mut head: impl FnMut(&[u8]) -> Step<T>,
) -> Result<(Socket, T), Failure> {
    let mut idle = pool.take(authority);
    loop {
        let reused = idle.is_some();
        let mut socket = match idle.take() {
            Some(socket) => socket,
            None => pool.connect(authority).await.map_err(Failure::Connect)?,
        };
        match send(&mut socket, request, response, &mut head).await {
            Ok(head) => return Ok((socket, head)),
            Err(Failure::Closed) if reused => response.clear(),
            Err(failure) => return Err(failure),
        }
    }
}

async fn send<T>(
    socket: &mut Socket,
    request: &[u8],
    response: &mut Vec<u8>,
    head: &mut impl FnMut(&[u8]) -> Step<T>,
) -> Result<T, Failure> {
    socket
        .write_all(request)
        .await
        .map_err(|_| Failure::Closed)?;
    loop {
        if response.capacity() - response.len() < 1024 {
            if response.len() >= MAX_RESPONSE_HEAD {
                return Err(Failure::Protocol("the response head is too large"));
            }
            response.reserve(BODY);
        }
        match socket.read_buf(response).await {
            Ok(0) | Err(_) if response.is_empty() => return Err(Failure::Closed),
            Ok(0) => {
                return Err(Failure::Protocol(
                    "the server closed the connection mid-head",
                ))
            }
            Ok(_) => {}
            Err(error) => return Err(error.into()),
        }
        loop {
            match head(response) {
                Step::Partial => break,
                Step::Malformed(why) => return Err(Failure::Protocol(why)),
                Step::Interim(len) => {
                    response.drain(..len);
                }
                Step::Complete(head) => return Ok(head),
            }
        }
    }
}
