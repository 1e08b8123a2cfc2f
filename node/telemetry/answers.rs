//! Every HTTP answer the node sends, and how many were 5xx: what the
//! controller's error-rate gate compares between nodes on a new version and
//! nodes still on the old one. Always counted (two relaxed atomic adds),
//! whether or not metrics are exported.

use std::sync::atomic::{AtomicU64, Ordering};

use http::StatusCode;

static ANSWERED: AtomicU64 = AtomicU64::new(0);
static SERVER_ERRORS: AtomicU64 = AtomicU64::new(0);

pub fn record(status: StatusCode) {
    ANSWERED.fetch_add(1, Ordering::Relaxed);
    if status.is_server_error() {
        SERVER_ERRORS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Answered {
    pub answered: u64,
    pub server_errors: u64,
}

pub fn counted() -> Answered {
    // Errors first: a reader never sees more errors than answers.
    let server_errors = SERVER_ERRORS.load(Ordering::Relaxed);
    Answered {
        answered: ANSWERED.load(Ordering::Relaxed).max(server_errors),
        server_errors,
    }
}
