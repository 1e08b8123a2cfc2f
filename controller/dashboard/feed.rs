//! The fleet's events as Server-Sent Events, numbered, the most recent
//! kept so that a client that reconnects with `Last-Event-ID` gets what it
//! missed, or a `reset` when that is gone.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::broadcast;

use super::Body;
use crate::controller::fleet::Fleet;
use crate::controller::json::event_json;

/// Events kept for clients that reconnect.
const KEPT: usize = 10_000;
/// How often a quiet stream carries a comment.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(15);

/// The fleet's events, numbered, the most recent kept for reconnects.
pub struct Feed {
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
    pub fn start(fleet: &Fleet) -> Arc<Feed> {
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
    pub fn subscribe(&self, last_event_id: Option<&str>) -> Response<Body> {
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
        // A comment now and then keeps proxies and tunnels on the way
        // (kubectl port-forward, an nginx in front) from closing a quiet
        // stream, and lets a client notice one that died.
        let heartbeats = futures_util::stream::unfold((), |()| async {
            tokio::time::sleep(HEARTBEAT).await;
            Some((Bytes::from_static(b": keepalive\n\n"), ()))
        });
        let frames = futures_util::stream::select(replay.chain(live), heartbeats)
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
