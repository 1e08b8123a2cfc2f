//! Each worker thread keeps a few spare byte buffers: a connection holds
//! one only while it reads or relays, so an idle keep-alive connection
//! holds none, and a busy worker allocates none per request.

use std::cell::RefCell;

/// Bytes read from a client or server at a time.
pub const BUFFER: usize = 16 * 1024;
/// Spares kept per thread; more are freed.
const SPARES: usize = 64;

thread_local! {
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer of at least `BUFFER` bytes of capacity.
pub fn take() -> Vec<u8> {
    SPARE
        .with(|spare| spare.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(BUFFER))
}

/// Returns a buffer; one grown past its usual size is freed.
pub fn give(mut buffer: Vec<u8>) {
    if buffer.capacity() > 4 * BUFFER {
        return;
    }
    buffer.clear();
    SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < SPARES {
            spare.push(buffer);
        }
    });
}
