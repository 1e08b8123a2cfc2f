//! `tether controller --dashboard ADDR`: the fleet over plain HTTP, for
//! browsers and scripts.
//!
//! - `GET /api/fleet`: a JSON snapshot, every node (as `tether fleet nodes
//!   --json` shows it) and every version, newest first.
//! - `GET /api/events`: Server-Sent Events, the events WatchFleet streams,
//!   each with an id. A client that reconnects with `Last-Event-ID` gets
//!   the events it missed; when those are no longer kept (or the
//!   controller restarted since), it gets a `reset` event and reads the
//!   snapshot again.
//!
//! Read-only, and loopback only until it has authentication.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

use super::fleet::Fleet;
use super::json::{event_json, node_json, version_json};
use super::selector::Selector;

/// Events kept for clients that reconnect.
const KEPT: usize = 10_000;

/// How long a client has to send its request head.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

type Body = BoxBody<Bytes, Infallible>;

/// Checks the address before anything starts.
pub fn check_address(addr: SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    Err(format!(
        "--dashboard {addr}: the dashboard has no authentication yet, so it listens on \
         loopback only; bind it to 127.0.0.1 and reach it through a tunnel or a proxy you trust"
    ))
}

/// Serves the dashboard on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, fleet: Arc<Fleet>) {
    let feed = Feed::start(&fleet);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors, most likely: back off, don't spin.
                tracing::warn!(%error, "dashboard: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (fleet, feed) = (fleet.clone(), feed.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let answer = route(&request, &fleet, &feed);
                async move { Ok::<_, Infallible>(answer) }
            });
            // HTTP/1.1 only (enough for JSON and SSE), so the request-head
            // deadline holds from the first byte: a client that sends
            // nothing in time is dropped.
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(request: &Request<Incoming>, fleet: &Fleet, feed: &Arc<Feed>) -> Response<Body> {
    if request.method() != Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "read-only: GET only\n");
    }
    match request.uri().path() {
        "/api/fleet" => snapshot(fleet),
        "/api/events" => {
            let last = request
                .headers()
                .get("last-event-id")
                .and_then(|v| v.to_str().ok());
            feed.subscribe(last)
        }
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(text.as_bytes())).boxed())
        .expect("a valid response")
}

fn snapshot(fleet: &Fleet) -> Response<Body> {
    let nodes: Vec<_> = fleet
        .nodes(&Selector::default())
        .iter()
        .map(node_json)
        .collect();
    let versions: Vec<_> = fleet.versions().iter().map(version_json).collect();
    let body = json!({ "nodes": nodes, "versions": versions }).to_string();
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("a valid response")
}

/// The fleet's events, numbered, the most recent kept for reconnects.
struct Feed {
    /// Tells this run's ids from an earlier run's.
    run: String,
    kept: Mutex<Kept>,
    live: broadcast::Sender<Message>,
}

struct Kept {
    next: u64,
    recent: VecDeque<Message>,
}

#[derive(Clone)]
struct Message {
    number: u64,
    /// The whole SSE message, `id:` and `data:` lines included.
    text: Bytes,
}

impl Feed {
    fn start(fleet: &Fleet) -> Arc<Feed> {
        let feed = Arc::new(Feed {
            run: format!("{:016x}", rand::random::<u64>()),
            kept: Mutex::new(Kept {
                next: 1,
                recent: VecDeque::new(),
            }),
            live: broadcast::channel(1024).0,
        });
        let mut events = fleet.events();
        let weak = Arc::downgrade(&feed);
        tokio::spawn(async move {
            loop {
                let event = match events.recv().await {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(count)) => Fleet::events_missed(count),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let Some(feed) = weak.upgrade() else {
                    return;
                };
                feed.add(&event_json(&event).to_string());
            }
        });
        feed
    }

    fn add(&self, data: &str) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let number = kept.next;
        kept.next += 1;
        let message = Message {
            number,
            text: Bytes::from(format!("id: {}-{number}\ndata: {data}\n\n", self.run)),
        };
        if kept.recent.len() == KEPT {
            kept.recent.pop_front();
        }
        kept.recent.push_back(message.clone());
        // Sent under the lock: a subscriber that replays `recent` and then
        // listens misses nothing and sees nothing twice.
        let _ = self.live.send(message);
    }

    /// An SSE stream from after `last_event_id`, or from now.
    fn subscribe(&self, last_event_id: Option<&str>) -> Response<Body> {
        let (replay, live, after) = {
            let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            let live = self.live.subscribe();
            let resume = last_event_id.map(|id| self.resume_after(id, &kept));
            let replay: Vec<Bytes> = match resume {
                Some(Some(after)) => kept
                    .recent
                    .iter()
                    .filter(|m| m.number > after)
                    .map(|m| m.text.clone())
                    .collect(),
                Some(None) => vec![reset()],
                None => Vec::new(),
            };
            (replay, live, kept.next - 1)
        };
        let replay = futures_util::stream::iter(replay);
        let live = futures_util::stream::unfold(live, move |mut live| async move {
            loop {
                match live.recv().await {
                    Ok(message) if message.number <= after => continue,
                    Ok(message) => return Some((message.text, live)),
                    // Too slow to keep up: start over from the snapshot.
                    Err(broadcast::error::RecvError::Lagged(_)) => return Some((reset(), live)),
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        let frames = replay
            .chain(live)
            .map(|text| Ok::<_, Infallible>(Frame::data(text)));
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-store")
            .body(BodyExt::boxed(StreamBody::new(frames)))
            .expect("a valid response")
    }

    /// The number after which a client with this `Last-Event-ID` resumes,
    /// when the events it missed are all still kept.
    fn resume_after(&self, id: &str, kept: &Kept) -> Option<u64> {
        let (run, number) = id.trim().split_once('-')?;
        let number: u64 = number.parse().ok()?;
        if run != self.run || number >= kept.next {
            return None;
        }
        let oldest = kept.recent.front().map_or(kept.next, |m| m.number);
        (number + 1 >= oldest).then_some(number)
    }
}

fn reset() -> Bytes {
    Bytes::from_static(b"event: reset\ndata: {}\n\n")
}
