//! Finds where a chunked body ends (RFC 9112 §7.1) while its bytes are
//! relayed as they are (chunk sizes, data, the last chunk and the trailer
//! section), or picks out its data for a decoder. A size line or trailer section past its bound, or a chunk not
//! followed by CRLF, is malformed and ends the exchange.

use std::ops::Range;

/// Longest chunk-size line, extensions included.
const MAX_SIZE_LINE: usize = 4096;
/// Longest trailer section.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a chunk-size line; `line` holds what has arrived of it.
    Size,
    Data(u64),
    /// The CR, then the LF, after a chunk's data.
    DataCr,
    DataLf,
    /// After the last chunk: at the start of a trailer line (an empty one
    /// ends the body), or inside one.
    TrailerStart,
    TrailerLine,
    /// The empty line's LF.
    EndLf,
    Done,
}

pub struct ChunkedScanner {
    state: State,
    line: Vec<u8>,
    trailer_bytes: usize,
}

impl Default for ChunkedScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedScanner {
    pub fn new() -> Self {
        ChunkedScanner {
            state: State::Size,
            line: Vec::new(),
            trailer_bytes: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Takes the next bytes of the body; answers how many of them belong to
    /// it (all of them until the end is found; bytes past the end belong
    /// to whatever follows).
    pub fn scan(&mut self, bytes: &[u8]) -> Result<usize, Malformed> {
        let mut at = 0;
        while at < bytes.len() && !self.is_done() {
            at += self.next(&bytes[at..])?.0;
        }
        Ok(at)
    }

    /// Takes bytes up to and including the next piece of chunk data, or all
    /// of them when none comes: answers how many it took, and where in them
    /// the data is (for a decoder that passes on the data alone).
    pub fn next(&mut self, bytes: &[u8]) -> Result<(usize, Option<Range<usize>>), Malformed> {
        let mut at = 0;
        while at < bytes.len() {
            match self.state {
                State::Size => {
                    let rest = &bytes[at..];
                    let Some(lf) = memchr::memchr(b'\n', rest) else {
                        self.line.extend_from_slice(rest);
                        if self.line.len() > MAX_SIZE_LINE {
                            return Err(Malformed);
                        }
                        return Ok((bytes.len(), None));
                    };
                    self.line.extend_from_slice(&rest[..=lf]);
                    at += lf + 1;
                    if self.line.len() > MAX_SIZE_LINE || !self.line.ends_with(b"\r\n") {
                        return Err(Malformed);
                    }
                    let size = match httparse::parse_chunk_size(&self.line) {
                        Ok(httparse::Status::Complete((_, size))) => size,
                        _ => return Err(Malformed),
                    };
                    self.line.clear();
                    self.state = if size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data(size)
                    };
                }
                State::Data(left) => {
                    let take = left.min((bytes.len() - at) as u64);
                    self.state = if take == left {
                        State::DataCr
                    } else {
                        State::Data(left - take)
                    };
                    let data = at..at + take as usize;
                    return Ok((data.end, Some(data)));
                }
                State::DataCr | State::DataLf | State::EndLf => {
                    let (expected, next) = match self.state {
                        State::DataCr => (b'\r', State::DataLf),
                        State::DataLf => (b'\n', State::Size),
                        _ => (b'\n', State::Done),
                    };
                    if bytes[at] != expected {
                        return Err(Malformed);
                    }
                    at += 1;
                    self.state = next;
                    if next == State::Done {
                        return Ok((at, None));
                    }
                }
                State::TrailerStart => {
                    if bytes[at] == b'\r' {
                        at += 1;
                        self.state = State::EndLf;
                    } else {
                        self.state = State::TrailerLine;
                    }
                }
                State::TrailerLine => {
                    let rest = &bytes[at..];
                    let (used, ended) = match memchr::memchr(b'\n', rest) {
                        Some(lf) => (lf + 1, true),
                        None => (rest.len(), false),
                    };
                    self.trailer_bytes += used;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err(Malformed);
                    }
                    at += used;
                    if ended {
                        self.state = State::TrailerStart;
                    }
                }
                State::Done => return Ok((at, None)),
            }
        }
        Ok((at, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` in pieces of `step` bytes; answers where it ended.
    fn end_of(body: &[u8], step: usize) -> Result<Option<usize>, Malformed> {
        let mut scanner = ChunkedScanner::new();
        let mut offset = 0;
        for piece in body.chunks(step) {
            let used = scanner.scan(piece)?;
            offset += used;
            if scanner.is_done() {
                return Ok(Some(offset));
            }
            assert_eq!(used, piece.len());
        }
        Ok(None)
    }

    #[test]
    fn finds_the_end_of_a_body_in_any_split() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nx-sum: 1\r\n\r\nNEXT";
        for step in 1..body.len() {
            assert_eq!(end_of(body, step), Ok(Some(body.len() - 4)), "step {step}");
        }
        assert_eq!(end_of(b"0\r\n\r\n", 100), Ok(Some(5)));
        assert_eq!(end_of(b"3\r\nabc\r\n", 100), Ok(None));
    }

    #[test]
    fn picks_out_the_data_in_any_split() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nx-sum: 1\r\n\r\n";
        for step in 1..body.len() {
            let mut scanner = ChunkedScanner::new();
            let mut data = Vec::new();
            for piece in body.chunks(step) {
                let mut at = 0;
                while at < piece.len() {
                    let (used, range) = scanner.next(&piece[at..]).unwrap();
                    if let Some(range) = range {
                        data.extend_from_slice(&piece[at..][range]);
                    }
                    at += used;
                }
            }
            assert!(scanner.is_done(), "step {step}");
            assert_eq!(data, b"hello0123456789abcdef", "step {step}");
        }
    }

    #[test]
    fn refuses_malformed_framing() {
        assert_eq!(end_of(b"5\r\nhelloXX0\r\n\r\n", 100), Err(Malformed));
        assert_eq!(end_of(b"zz\r\n", 100), Err(Malformed));
        assert_eq!(end_of(b"5\nhello\r\n", 100), Err(Malformed));
        let long = vec![b'a'; MAX_SIZE_LINE + 10];
        assert_eq!(end_of(&long, 100), Err(Malformed));
        let mut trailers = b"0\r\n".to_vec();
        trailers.extend(std::iter::repeat_n(b'x', MAX_TRAILERS + 1));
        assert_eq!(end_of(&trailers, 1000), Err(Malformed));
    }
}
