//! The life of one generation, as every connection it accepted sees it:
//! serving → retired (not accepting, draining) → killed (the drain deadline
//! passed: connections are dropped). Protocols hold a `ConnectionGuard` and
//! ask it when to finish; they never need the generation itself, so they
//! sit below it in the module graph.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// The states a generation goes through: serving → retired (not accepting,
/// draining) → killed (drain deadline passed: connections are dropped).
pub struct Lifecycle {
    /// How long a retired generation's idle keep-alive connection stays
    /// open for a request already on its way.
    drain_idle_grace: Duration,
    retired: CancellationToken,
    killed: CancellationToken,
    retired_at: OnceLock<SystemTime>,
    /// Accept loops and connection tasks.
    tasks: TaskTracker,
    connections: AtomicU64,
    requests_in_flight: AtomicU64,
}

impl Lifecycle {
    pub fn new(drain_idle_grace: Duration) -> Lifecycle {
        Lifecycle {
            drain_idle_grace,
            retired: CancellationToken::new(),
            killed: CancellationToken::new(),
            retired_at: OnceLock::new(),
            tasks: TaskTracker::new(),
            connections: AtomicU64::new(0),
            requests_in_flight: AtomicU64::new(0),
        }
    }

    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    pub fn retired(&self) -> WaitForCancellationFuture<'_> {
        self.retired.cancelled()
    }

    pub fn is_retired(&self) -> bool {
        self.retired.is_cancelled()
    }

    /// How long an idle keep-alive connection stays open once retired.
    pub fn drain_idle_grace(&self) -> Duration {
        self.drain_idle_grace
    }

    pub fn retired_at(&self) -> Option<SystemTime> {
        self.retired_at.get().copied()
    }

    pub fn killed(&self) -> WaitForCancellationFuture<'_> {
        self.killed.cancelled()
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn requests_in_flight(&self) -> u64 {
        self.requests_in_flight.load(Ordering::Relaxed)
    }

    /// Stops accepting and starts the drain of every open connection.
    pub fn retire(&self) {
        let _ = self.retired_at.set(SystemTime::now());
        self.retired.cancel();
        self.tasks.close();
    }

    /// Runs a connection (an HTTP server connection future) through this
    /// generation's life: until it ends by itself, or, once retired, until
    /// `drain_idle_grace` has passed (a request already on its way is still served and
    /// answered with `Connection: close`), then asks it to finish
    /// gracefully, and drops it if the drain deadline comes first. Closing
    /// an idle keep-alive connection at once would reset a client that sent
    /// its next request a moment before.
    pub async fn drive_connection<F: Future>(
        &self,
        mut connection: Pin<&mut F>,
        graceful_shutdown: impl FnOnce(Pin<&mut F>),
    ) {
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = self.retired() => {}
        }
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = tokio::time::sleep(self.drain_idle_grace) => {}
            _ = self.killed() => return,
        }
        graceful_shutdown(connection.as_mut());
        tokio::select! {
            _ = connection => {}
            _ = self.killed() => {}
        }
    }

    /// Waits for the retired generation's connections to finish, up to
    /// `deadline`; then closes the rest. Answers how many were closed.
    pub async fn drain(&self, deadline: Duration) -> u64 {
        debug_assert!(self.is_retired());
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.connections();
        self.killed.cancel();
        self.tasks.wait().await;
        left
    }
}

/// Counts a connection against its generation and listener while alive.
pub struct ConnectionGuard {
    lifecycle: Arc<Lifecycle>,
    listener_open: Arc<AtomicU64>,
}

impl ConnectionGuard {
    /// `listener_open`: the listener's count of open connections.
    pub fn new(lifecycle: Arc<Lifecycle>, listener_open: Arc<AtomicU64>) -> Self {
        lifecycle.connections.fetch_add(1, Ordering::Relaxed);
        listener_open.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard {
            lifecycle,
            listener_open,
        }
    }

    /// The life of the generation that accepted the connection.
    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.lifecycle.connections.fetch_sub(1, Ordering::Relaxed);
        self.listener_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a request in flight on its generation while alive.
pub struct RequestGuard<'a>(&'a Lifecycle);

impl<'a> RequestGuard<'a> {
    pub fn new(lifecycle: &'a Lifecycle) -> Self {
        lifecycle.requests_in_flight.fetch_add(1, Ordering::Relaxed);
        RequestGuard(lifecycle)
    }
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        self.0.requests_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
