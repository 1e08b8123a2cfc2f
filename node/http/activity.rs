//! How long a client connection may sit without a request. hyper bounds an
//! HTTP/1 request head once it starts reading one, but nothing bounds the
//! phases before it (protocol detection, the HTTP/2 preface and SETTINGS)
//! nor an HTTP/2 connection with no open stream. A connection that goes
//! `header_read_timeout` with no request in flight is closed here: at once
//! if it never sent a request, gracefully (GOAWAY, `Connection: close`)
//! otherwise.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

pub struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    /// Milliseconds from `opened` to the end of the last request.
    last_done_ms: AtomicU64,
}

/// Why a connection was found idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// No request ever arrived: close it, there is nothing to finish.
    NeverUsed,
    /// It served requests and has none open now: finish gracefully.
    BetweenRequests,
}

impl Activity {
    pub fn new() -> Self {
        Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            last_done_ms: AtomicU64::new(0),
        }
    }

    pub fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn request_done(&self) {
        let since_open = self.opened.elapsed().as_millis() as u64;
        self.last_done_ms.store(since_open, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Resolves once the connection has had no request in flight for
    /// `timeout`.
    pub async fn idle(&self, timeout: Duration) -> Idle {
        loop {
            let last_done =
                self.opened + Duration::from_millis(self.last_done_ms.load(Ordering::Relaxed));
            let deadline = if self.in_flight.load(Ordering::Relaxed) > 0 {
                Instant::now() + timeout
            } else {
                last_done + timeout
            };
            tokio::time::sleep_until(deadline).await;
            let last_done =
                self.opened + Duration::from_millis(self.last_done_ms.load(Ordering::Relaxed));
            if self.in_flight.load(Ordering::Relaxed) == 0 && last_done + timeout <= Instant::now()
            {
                return if self.requests.load(Ordering::Relaxed) == 0 {
                    Idle::NeverUsed
                } else {
                    Idle::BetweenRequests
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_requests_is_idle_after_the_timeout() {
        let activity = Activity::new();
        let started = Instant::now();
        assert_eq!(activity.idle(Duration::from_secs(2)).await, Idle::NeverUsed);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_keeps_the_connection_busy() {
        let activity = std::sync::Arc::new(Activity::new());
        activity.request_started();
        let watcher = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle(Duration::from_secs(2)).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!watcher.is_finished());
        activity.request_done();
        let done = Instant::now();
        assert_eq!(watcher.await.unwrap(), Idle::BetweenRequests);
        assert!(
            done.elapsed() >= Duration::from_secs(2),
            "{:?}",
            done.elapsed()
        );
    }
}
