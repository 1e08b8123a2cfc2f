//! Worker threads, the way nginx runs worker processes: each worker is one
//! thread with its own single-threaded runtime, its own listening socket
//! per listener (SO_REUSEPORT: the kernel spreads new connections over
//! them) and its own upstream connection pools. A connection lives on the
//! worker that accepted it, so nothing on the request path crosses threads
//! or takes a lock; state that must be global (balancer counts, health,
//! the generation's lifecycle) is atomics shared by all workers.
//!
//! The node's own work (control service, controller agent, health checks,
//! applying configs) runs on the main runtime, not on the workers.

use std::cell::Cell;
use std::io;
use std::sync::Mutex;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

thread_local! {
    /// Which worker this thread is; 0 on any other thread.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker running the caller, for per-worker state;
/// 0 outside the workers (the main runtime, tests).
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// The running worker threads. `stop` (or dropping this) stops them, and
/// with them every task still running on them.
pub struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: Handle,
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

impl Workers {
    /// Starts `count` workers (at least one).
    pub fn start(count: usize) -> io::Result<Workers> {
        let mut workers = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("tether-worker-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    // Returns when told to stop or when `Workers` is gone.
                    let _ = runtime.block_on(stopped);
                })?;
            workers.push(Worker {
                handle,
                stop: Mutex::new(Some(stop)),
            });
        }
        Ok(Workers { workers })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The runtime of each worker, by index.
    pub fn handles(&self) -> impl Iterator<Item = &Handle> {
        self.workers.iter().map(|worker| &worker.handle)
    }

    /// Tasks alive on all workers (connections, accept loops, upstream
    /// connections).
    pub fn alive_tasks(&self) -> usize {
        self.handles()
            .map(|handle| handle.metrics().num_alive_tasks())
            .sum()
    }

    /// Stops every worker; tasks still running on them are dropped.
    pub fn stop(&self) {
        for worker in &self.workers {
            let stop = worker.stop.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(stop) = stop {
                let _ = stop.send(());
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_knows_its_index_and_runs_its_own_tasks() {
        let workers = Workers::start(3).unwrap();
        let seen: Vec<usize> = workers
            .handles()
            .map(|handle| {
                let (tx, rx) = std::sync::mpsc::channel();
                handle.spawn(async move { tx.send(current()).unwrap() });
                rx.recv().unwrap()
            })
            .collect();
        assert_eq!(seen, vec![0, 1, 2]);
    }

    #[test]
    fn dropping_the_workers_stops_their_tasks() {
        let workers = Workers::start(1).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let handle = workers.handles().next().unwrap().clone();
        handle.spawn(async move {
            let _held = tx;
            std::future::pending::<()>().await
        });
        drop(workers);
        // The task and the sender it held are dropped with the runtime.
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
    }
}
