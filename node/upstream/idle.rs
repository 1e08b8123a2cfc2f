//! One worker's idle keep-alive connections to upstream servers, by server:
//! the most recently used is taken first, a connection past `idle_timeout`
//! or closed by its server is never handed out, and a reaper closes those
//! while the pool lives.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use http::uri::Authority;

/// A connection that can wait in the pool.
pub trait Reusable: Send + 'static {
    /// Lets the connection make progress without waiting; answers false
    /// once it cannot carry another request (the server closed it, it
    /// failed, or it is still busy with the last one).
    fn poll_reusable(&mut self, cx: &mut Context<'_>) -> bool;
}

struct Idle<C> {
    connection: C,
    since: Instant,
}

pub struct IdlePool<C> {
    idle_timeout: Duration,
    max_idle_per_server: usize,
    /// foldhash: SipHash showed up in profiles at two lookups a request.
    idle: Mutex<HashMap<Authority, Vec<Idle<C>>, foldhash::fast::RandomState>>,
    reaper_started: AtomicBool,
}

impl<C: Reusable> IdlePool<C> {
    pub fn new(idle_timeout: Duration, max_idle_per_server: usize) -> Self {
        IdlePool {
            idle_timeout,
            max_idle_per_server,
            idle: Mutex::default(),
            reaper_started: AtomicBool::new(false),
        }
    }

    /// The most recently used reusable idle connection to `authority`.
    pub fn checkout(&self, authority: &Authority) -> Option<C> {
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            let idle = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                idle.get_mut(authority)?.pop()?
            };
            let mut connection = idle.connection;
            if idle.since.elapsed() < self.idle_timeout && connection.poll_reusable(&mut cx) {
                return Some(connection);
            }
        }
    }

    /// The most recently used idle connection to `authority` within its
    /// idle timeout, without asking it whether it is still open: for
    /// callers that send a request again on a new connection when a reused
    /// one turns out closed (asking costs a system call per request).
    pub fn take_recent(&self, authority: &Authority) -> Option<C> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(authority)?;
        while let Some(entry) = list.pop() {
            if entry.since.elapsed() < self.idle_timeout {
                return Some(entry.connection);
            }
        }
        None
    }

    /// Keeps a connection whose exchange ended cleanly.
    pub fn checkin(self: &Arc<Self>, authority: &Authority, connection: C) {
        if self.max_idle_per_server == 0 {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = match idle.get_mut(authority) {
            Some(list) => list,
            None => idle.entry(authority.clone()).or_default(),
        };
        if list.len() >= self.max_idle_per_server {
            list.remove(0);
        }
        list.push(Idle {
            connection,
            since: Instant::now(),
        });
        drop(idle);
        // Once per pool; the check-ins after the first pay one load.
        if self.reaper_started.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            if !self.reaper_started.swap(true, Ordering::Relaxed) {
                runtime.spawn(reap(Arc::downgrade(self)));
            }
        }
    }
}

/// Closes idle connections past their timeout or closed by the server,
/// while the pool exists.
async fn reap<C: Reusable>(pool: Weak<IdlePool<C>>) {
    loop {
        let period = match pool.upgrade() {
            Some(pool) => pool.idle_timeout.min(Duration::from_secs(5)),
            None => return,
        };
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let mut cx = Context::from_waker(Waker::noop());
        let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        for list in idle.values_mut() {
            list.retain_mut(|entry| {
                entry.since.elapsed() < pool.idle_timeout && entry.connection.poll_reusable(&mut cx)
            });
        }
        idle.retain(|_, list| !list.is_empty());
    }
}
