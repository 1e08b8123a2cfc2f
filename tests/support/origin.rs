//! A real upstream HTTP server (hyper) on an ephemeral loopback port.
//!
//! Paths choose the behaviour:
//! - `/slow/MS`: answers after MS milliseconds
//! - `/hang`: never answers
//! - `/bytes/N`: streams N bytes (with Content-Length)
//! - `/chunked/N`: streams N bytes in chunked encoding
//! - `/upload`: reads the whole request body and answers its length
//! - `/status/CODE`: answers with that status
//! - anything else: answers the origin's name
//!
//! Every answer carries `x-origin: NAME`; every request is recorded.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
}

pub struct Origin {
    pub addr: SocketAddr,
    pub name: String,
    requests: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    failing: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Origin {
    pub async fn start(name: &str) -> Origin {
        Self::start_on("127.0.0.1:0".parse().unwrap(), name).await
    }

    /// Starts on a given address (to bring a stopped origin back).
    pub async fn start_on(addr: SocketAddr, name: &str) -> Origin {
        let listener = TcpListener::bind(addr).await.expect("bind origin");
        let addr = listener.local_addr().unwrap();
        let origin = Origin {
            addr,
            name: name.to_owned(),
            requests: Arc::default(),
            connections: Arc::default(),
            seen: Arc::default(),
            failing: Arc::default(),
            stop: CancellationToken::new(),
        };
        let connections = origin.connections.clone();
        let (name, requests, seen, stop, failing) = (
            origin.name.clone(),
            origin.requests.clone(),
            origin.seen.clone(),
            origin.stop.clone(),
            origin.failing.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                connections.fetch_add(1, Ordering::SeqCst);
                let (name, requests, seen, stop, failing) = (
                    name.clone(),
                    requests.clone(),
                    seen.clone(),
                    stop.clone(),
                    failing.clone(),
                );
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        requests.fetch_add(1, Ordering::SeqCst);
                        let failing = failing.load(Ordering::SeqCst);
                        handle(name.clone(), seen.clone(), failing, request)
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        origin
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests that were health probes (by their User-Agent).
    pub fn probes(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| {
                s.headers
                    .get("user-agent")
                    .is_some_and(|ua| ua == "tether-health-check")
            })
            .count()
    }

    /// Requests that were not health probes.
    pub fn traffic(&self) -> usize {
        let total = self.seen.lock().unwrap().len();
        total - self.probes()
    }

    /// While failing, every request is answered 502.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Stops listening and closes every open connection.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn handle(
    name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    failing: bool,
    request: Request<Incoming>,
) -> Result<Response<OriginBody>, Infallible> {
    seen.lock().unwrap().push(Seen {
        method: request.method().clone(),
        uri: request.uri().clone(),
        headers: request.headers().clone(),
    });
    if failing {
        let mut response = Response::new(full(format!("{name} is failing")));
        *response.status_mut() = StatusCode::BAD_GATEWAY;
        return Ok(response);
    }
    let path = request.uri().path().to_owned();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (first, arg) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let body: OriginBody = match first {
        "slow" => {
            tokio::time::sleep(Duration::from_millis(arg.parse().unwrap_or(100))).await;
            full(name.clone())
        }
        "hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            full(name.clone())
        }
        "bytes" | "chunked" => {
            let total: u64 = arg.parse().unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let chunks = (0..total.div_ceil(chunk.len() as u64)).map(move |i| {
                let start = i * chunk.len() as u64;
                let len = (total - start).min(chunk.len() as u64) as usize;
                Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
            });
            let stream = futures_util::stream::iter(chunks);
            let mut response = Response::builder().header("x-origin", &name);
            if first == "bytes" {
                response = response.header("content-length", total);
            }
            let response = response
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap();
            return Ok(response);
        }
        "upload" => {
            let mut body = request.into_body();
            let mut total = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => total += frame.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => break,
                }
            }
            full(total.to_string())
        }
        "status" => {
            let status = StatusCode::from_u16(arg.parse().unwrap_or(500)).unwrap();
            let mut response = Response::new(full(name.clone()));
            *response.status_mut() = status;
            response
                .headers_mut()
                .insert("x-origin", name.parse().unwrap());
            return Ok(response);
        }
        _ => full(name.clone()),
    };
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert("x-origin", name.parse().unwrap());
    // A hop-by-hop header the proxy must not pass on.
    response
        .headers_mut()
        .insert("keep-alive", "timeout=5".parse().unwrap());
    Ok(response)
}

fn full(text: String) -> OriginBody {
    BodyExt::boxed(Full::new(Bytes::from(text)))
}
