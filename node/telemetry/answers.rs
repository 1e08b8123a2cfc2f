//! Every HTTP answer the node sends, and how many were 5xx: what the
//! controller's error-rate gate compares between nodes on a new version and
//! nodes still on the old one. Always counted, whether or not metrics are
//! exported: each thread adds to counters of its own (no cache line shared
//! between workers on the request path), and a report adds them up.

use std::cell::OnceCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::StatusCode;

#[derive(Default)]
struct ThreadCounts {
    answered: AtomicU64,
    server_errors: AtomicU64,
}

/// Every thread's counters, kept after the thread ends so nothing counted
/// is lost.
static ALL: Mutex<Vec<Arc<ThreadCounts>>> = Mutex::new(Vec::new());

thread_local! {
    static OWN: OnceCell<Arc<ThreadCounts>> = const { OnceCell::new() };
}

pub fn record(status: StatusCode) {
    OWN.with(|own| {
        let counts = own.get_or_init(|| {
            let counts = Arc::new(ThreadCounts::default());
            ALL.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(counts.clone());
            counts
        });
        // Errors first: a reader never sees more errors than answers.
        if status.is_server_error() {
            counts.server_errors.fetch_add(1, Ordering::Relaxed);
        }
        counts.answered.fetch_add(1, Ordering::Relaxed);
    });
}

/// Since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Answered {
    pub answered: u64,
    pub server_errors: u64,
}

pub fn counted() -> Answered {
    let all = ALL.lock().unwrap_or_else(|e| e.into_inner());
    let mut total = Answered::default();
    for counts in all.iter() {
        total.answered += counts.answered.load(Ordering::Relaxed);
        total.server_errors += counts.server_errors.load(Ordering::Relaxed);
    }
    total.answered = total.answered.max(total.server_errors);
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_from_every_thread_add_up() {
        let before = counted();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    for status in [200, 502, 404, 500] {
                        record(StatusCode::from_u16(status).unwrap());
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let after = counted();
        // Other tests in this process may answer too: at least these.
        assert!(after.answered - before.answered >= 16);
        assert!(after.server_errors - before.server_errors >= 8);
    }
}
