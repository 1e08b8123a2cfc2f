//! Each worker thread keeps a few spare byte buffers in two sizes: heads
//! (requests read and written, client heads) and bodies relayed from
//! servers. A connection holds them only while it reads or relays, so an
//! idle keep-alive connection holds none, a busy worker allocates none per
//! request, and a request in flight holds about 28 KiB.

use std::cell::RefCell;

/// A head buffer's capacity: most request and response heads fit.
pub const HEAD: usize = 4 * 1024;
/// Bytes read from a server at a time.
pub const BODY: usize = 16 * 1024;
/// Spares kept per thread and size; more are freed.
const SPARES: usize = 64;

thread_local! {
    static SPARE: RefCell<[Vec<Vec<u8>>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
}

fn take_sized(class: usize, capacity: usize) -> Vec<u8> {
    SPARE
        .with(|spare| spare.borrow_mut()[class].pop())
        .unwrap_or_else(|| Vec::with_capacity(capacity))
}

/// An empty buffer for a head, of at least `HEAD` bytes.
pub fn take_head() -> Vec<u8> {
    take_sized(0, HEAD)
}

/// An empty buffer for a body, of at least `BODY` bytes.
pub fn take_body() -> Vec<u8> {
    take_sized(1, BODY)
}

/// Returns a buffer to the spares of its size; one grown well past its
/// size is freed.
pub fn give(mut buffer: Vec<u8>) {
    let class = match buffer.capacity() {
        0 => return,
        c if c < BODY => 0,
        c if c <= 4 * BODY => 1,
        _ => return,
    };
    buffer.clear();
    SPARE.with(|spare| {
        let list = &mut spare.borrow_mut()[class];
        if list.len() < SPARES {
            list.push(buffer);
        }
    });
}
