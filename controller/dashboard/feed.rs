//! The fleet's events as Server-Sent Events: one numbered log, the most
//! recent kept, and each client a cursor in it. A client that reconnects
//! with `Last-Event-ID`, or falls behind during a burst (a publish to
//! thousands of nodes), is sent what it missed from the log; only when
//! that is gone does it get a `reset` and read the snapshot again.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{header, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::{broadcast, watch};

use super::Body;
use crate::controller::fleet::Fleet;
use crate::controller::json::event_json;

/// Events kept for clients that reconnect or fall behind.
const KEPT: usize = 10_000;
/// How often a quiet stream carries a comment.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// Events sent to a client in one write, at most.
const BATCH: usize = 512;

/// The fleet's events, numbered, the most recent kept.
pub struct Feed {
    /// Tells this run's ids from an earlier run's.
    run: String,
    kept: Mutex<Kept>,
    /// The number of the newest event.
    newest: watch::Sender<u64>,
}

struct Kept {
    /// The number the next event gets; events are numbered from 1 with
    /// no gaps, so an event's place in `recent` follows from its number.
    next: u64,
    /// Each event as a whole SSE message, `id:` and `data:` lines included.
    recent: VecDeque<Bytes>,
}

impl Kept {
    fn oldest(&self) -> u64 {
        self.next - self.recent.len() as u64
    }
}

/// What a client is sent next.
enum Next {
    Events(Bytes, u64),
    /// What it missed is no longer kept.
    Reset(u64),
    Wait,
}

impl Feed {
    fn new() -> Arc<Feed> {
        Arc::new(Feed {
            run: format!("{:016x}", rand::random::<u64>()),
            kept: Mutex::new(Kept {
                next: 1,
                recent: VecDeque::new(),
            }),
            newest: watch::channel(0).0,
        })
    }

    /// A feed of `fleet`'s events from now on.
    pub fn start(fleet: &Fleet) -> Arc<Feed> {
        let feed = Feed::new();
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
        if kept.recent.len() == KEPT {
            kept.recent.pop_front();
        }
        let text = format!("id: {}-{number}\ndata: {data}\n\n", self.run);
        kept.recent.push_back(Bytes::from(text));
        drop(kept);
        self.newest.send_replace(number);
    }

    /// The id of the newest event, as clients see ids.
    pub fn newest_id(&self) -> String {
        format!("{}-{}", self.run, *self.newest.borrow())
    }

    /// An SSE stream from after `last_event_id`, or from now.
    pub fn subscribe(self: &Arc<Self>, last_event_id: Option<&str>) -> Response<Body> {
        let (cursor, first) = {
            let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            let newest = kept.next - 1;
            match last_event_id.map(|id| self.resume_after(id, &kept)) {
                None => (newest, None),
                Some(Some(after)) => (after, None),
                Some(None) => (newest, Some(reset())),
            }
        };
        let state = (self.clone(), self.newest.subscribe(), cursor);
        let events = futures_util::stream::unfold(state, |(feed, mut newest, cursor)| async move {
            loop {
                match feed.after(cursor) {
                    Next::Events(text, last) => return Some((text, (feed, newest, last))),
                    Next::Reset(last) => return Some((reset(), (feed, newest, last))),
                    Next::Wait => {
                        if newest.changed().await.is_err() {
                            return None;
                        }
                    }
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
        let frames = futures_util::stream::iter(first)
            .chain(futures_util::stream::select(events, heartbeats))
            .map(|text| Ok::<_, Infallible>(Frame::data(text)));
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-store")
            .body(BodyExt::boxed(StreamBody::new(frames)))
            .expect("a valid response")
    }

    /// The events after `cursor`, up to a batch, in one buffer.
    fn after(&self, cursor: u64) -> Next {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if cursor + 1 >= kept.next {
            return Next::Wait;
        }
        if cursor + 1 < kept.oldest() {
            return Next::Reset(kept.next - 1);
        }
        let start = (cursor + 1 - kept.oldest()) as usize;
        let end = kept.recent.len().min(start + BATCH);
        let mut text = BytesMut::new();
        for message in kept.recent.range(start..end) {
            text.extend_from_slice(message);
        }
        Next::Events(text.freeze(), kept.oldest() + end as u64 - 1)
    }

    /// The number after which a client with this `Last-Event-ID` resumes,
    /// when the events it missed are all still kept.
    fn resume_after(&self, id: &str, kept: &Kept) -> Option<u64> {
        let (run, number) = id.trim().split_once('-')?;
        let number: u64 = number.parse().ok()?;
        if run != self.run || number >= kept.next {
            return None;
        }
        (number + 1 >= kept.oldest()).then_some(number)
    }
}

fn reset() -> Bytes {
    Bytes::from_static(b"event: reset\ndata: {}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ids (the numbers after the run) and resets a client is sent,
    /// until `count` events have come or the stream goes quiet.
    async fn received(body: &mut Body, count: usize) -> Vec<String> {
        let mut text = String::new();
        let mut seen = Vec::new();
        while seen.len() < count {
            let frame = tokio::time::timeout(Duration::from_millis(200), body.frame()).await;
            let Ok(Some(Ok(frame))) = frame else {
                break;
            };
            text.push_str(std::str::from_utf8(frame.data_ref().unwrap()).unwrap());
            while let Some(end) = text.find("\n\n") {
                let message: String = text.drain(..end + 2).collect();
                if message.starts_with("event: reset") {
                    seen.push("reset".to_owned());
                } else if let Some(id) = message.strip_prefix("id: ") {
                    let id = id.lines().next().unwrap();
                    seen.push(id.split_once('-').unwrap().1.to_owned());
                }
            }
        }
        seen
    }

    fn numbers(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
        range.map(|n| n.to_string()).collect()
    }

    #[tokio::test]
    async fn a_client_behind_by_thousands_of_events_gets_every_one_in_order() {
        let feed = Feed::new();
        let mut client = feed.subscribe(None).into_body();
        // A publish to 5,000 nodes: their ACKs arrive faster than the
        // client reads.
        for n in 1..=5_000 {
            feed.add(&format!("{{\"n\":{n}}}"));
        }
        assert_eq!(received(&mut client, 5_000).await, numbers(1..=5_000));
    }

    #[tokio::test]
    async fn a_client_resumes_after_its_last_id_or_starts_over_when_that_is_gone() {
        let feed = Feed::new();
        for n in 1..=10 {
            feed.add(&format!("{{\"n\":{n}}}"));
        }
        let id = |n: u64| format!("{}-{n}", feed.run);
        let from = |id: &str| feed.subscribe(Some(id)).into_body();
        assert_eq!(received(&mut from(&id(7)), 3).await, numbers(8..=10));
        assert_eq!(received(&mut from(&id(10)), 1).await, Vec::<String>::new());
        assert_eq!(received(&mut from("another-run-3"), 1).await, ["reset"]);
        for n in 11..=(KEPT as u64 + 20) {
            feed.add(&format!("{{\"n\":{n}}}"));
        }
        // Event 8 is no longer kept.
        assert_eq!(received(&mut from(&id(7)), 1).await, ["reset"]);
        // A client that fell that far behind starts over, then follows.
        let mut slow = feed.subscribe(None).into_body();
        for n in 1..=(KEPT as u64 + 5) {
            feed.add(&format!("{{\"n\":{n}}}"));
        }
        assert_eq!(received(&mut slow, 1).await, ["reset"]);
        feed.add("{}");
        let newest = (2 * KEPT as u64 + 26).to_string();
        assert_eq!(received(&mut slow, 1).await, [newest]);
    }
}
