//! An upstream's response head as the HTTP/1 fast path reads it, and the
//! head it writes to the client in its place: hop-by-hop headers dropped,
//! the body's framing kept (a chunked body is relayed as it comes),
//! `Via`, a `Date` when the server sent none, `Connection: close` when the
//! client connection ends after it. A response hyper's client would refuse
//! (two lengths, length with chunked, an unknown coding) is a 502 here.

use std::cell::RefCell;
use std::ops::Range;
use std::time::{SystemTime, UNIX_EPOCH};

use http::StatusCode;
use httparse::{Header, Status};

use super::chunked::ChunkedScanner;
use super::head::{content_length, header_slots, push_header, ConnectionTokens, HeaderSlots};
use crate::http::headers::is_hop_by_hop;
use crate::http::respond::{status_body, STATUS_CONTENT_TYPE};

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the server closes: sent on to the client chunked.
    UntilClose,
}

/// Where the response body ends.
pub struct BodyEnd {
    pub framing: Framing,
    left: u64,
    chunks: Option<ChunkedScanner>,
    pub done: bool,
}

impl BodyEnd {
    pub fn new(framing: Framing) -> Self {
        BodyEnd {
            framing,
            left: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunks: (framing == Framing::Chunked).then(ChunkedScanner::new),
            done: matches!(framing, Framing::Empty | Framing::Length(0)),
        }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// How many of `bytes` belong to the body.
    pub fn take(&mut self, bytes: &[u8]) -> Result<usize, &'static str> {
        if self.done {
            return Ok(0);
        }
        match self.framing {
            Framing::Empty => Ok(0),
            Framing::Length(_) => {
                let used = self.left.min(bytes.len() as u64);
                self.left -= used;
                self.done = self.left == 0;
                Ok(used as usize)
            }
            Framing::Chunked => {
                let scanner = self.chunks.as_mut().expect("a chunked body has a scanner");
                let used = scanner
                    .scan(bytes)
                    .map_err(|_| "malformed chunked encoding")?;
                self.done = scanner.is_done();
                Ok(used)
            }
            Framing::UntilClose => Ok(bytes.len()),
        }
    }

    /// Like `take`, and also where in the bytes taken the body's data is
    /// (chunk framing left out).
    pub fn data(&mut self, bytes: &[u8]) -> Result<(usize, Option<Range<usize>>), &'static str> {
        if self.framing != Framing::Chunked || self.done {
            let used = self.take(bytes)?;
            return Ok((used, Some(0..used)));
        }
        let scanner = self.chunks.as_mut().expect("a chunked body has a scanner");
        let next = scanner
            .next(bytes)
            .map_err(|_| "malformed chunked encoding")?;
        self.done = scanner.is_done();
        Ok(next)
    }

    /// Body bytes still to come, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self.framing {
            Framing::Empty => Some(0),
            Framing::Length(_) => Some(self.left),
            _ if self.done => Some(0),
            _ => None,
        }
    }
}

/// Where reading a response head stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<T> {
    Partial,
    Malformed(&'static str),
    /// A 1xx other than 101, `len` bytes long: skipped, the real head follows.
    Interim(usize),
    Complete(T),
}

pub type Parsed = Step<Answer>;

/// What the exchange needs once the client's head is written.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub len: usize,
    pub status: u16,
    pub framing: Framing,
    /// The server keeps the connection open after this response.
    pub reusable: bool,
    pub content_length: Option<u64>,
    /// The client connection ends after this response.
    pub close: bool,
}

/// A complete response head, read.
pub struct ResponseHead<'b> {
    pub len: usize,
    pub status: u16,
    pub reason: &'b str,
    pub headers: &'b [Header<'b>],
    pub framing: Framing,
    pub reusable: bool,
    pub content_length: Option<u64>,
    has_date: bool,
    tokens: ConnectionTokens<'b>,
}

impl ResponseHead<'_> {
    /// Whether a header crosses to the client (it is not hop-by-hop).
    pub fn passes(&self, name: &str) -> bool {
        !is_hop_by_hop(name) && !self.tokens.contains(name)
    }
}

/// Reads a response head from `buf`.
pub fn read_response<'b>(
    buf: &'b [u8],
    head_request: bool,
    slots: &'b mut HeaderSlots<'b>,
) -> Step<ResponseHead<'b>> {
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        slots,
    );
    let len = match parsed {
        Ok(Status::Complete(len)) => len,
        Ok(Status::Partial) => return Step::Partial,
        Err(_) => return Step::Malformed("malformed response head"),
    };
    let (Some(version), Some(status), reason) = (response.version, response.code, response.reason)
    else {
        return Step::Malformed("malformed status line");
    };
    if status == 101 {
        return Step::Malformed("101 without an upgrade asked for");
    }
    if (100..200).contains(&status) {
        return Step::Interim(len);
    }
    let headers: &'b [Header<'b>] = response.headers;
    let mut tokens = ConnectionTokens::default();
    let mut server_close = version == 0;
    let mut length = None;
    let mut chunked = false;
    let mut has_date = false;
    for header in headers {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return Step::Malformed("more than one Content-Length");
            }
            match content_length(header.value) {
                Some(n) => length = Some(n),
                None => return Step::Malformed("invalid Content-Length"),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !header.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Step::Malformed("a transfer coding other than chunked");
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            match tokens.add(header.value) {
                Some(said_close) => server_close |= said_close,
                None => server_close = true,
            }
        } else if name.eq_ignore_ascii_case("date") {
            has_date = true;
        }
    }
    if chunked && length.is_some() {
        return Step::Malformed("both Content-Length and chunked");
    }
    let framing = if head_request || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    Step::Complete(ResponseHead {
        len,
        status,
        reason: reason.unwrap_or(""),
        headers,
        framing,
        reusable: !server_close && framing != Framing::UntilClose,
        content_length: length,
        has_date,
        tokens,
    })
}

/// Reads a response head from `buf`; once complete, writes the client's
/// head into `out`. `close`: the client connection ends after this
/// response.
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    via: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Parsed {
    let mut slots = header_slots();
    let head = match read_response(buf, head_request, &mut slots) {
        Step::Complete(head) => head,
        Step::Partial => return Step::Partial,
        Step::Malformed(why) => return Step::Malformed(why),
        Step::Interim(len) => return Step::Interim(len),
    };
    out.extend_from_slice(b"HTTP/1.1 ");
    // Three digits: httparse accepts nothing else.
    let digits = [head.status / 100, head.status / 10 % 10, head.status % 10];
    out.extend(digits.map(|d| b'0' + d as u8));
    out.push(b' ');
    out.extend_from_slice(head.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for header in head.headers {
        if head.passes(header.name) {
            push_header(out, header.name.as_bytes(), header.value);
        }
    }
    // A body that ends when the server closes is chunked for the client,
    // whose connection then lives on (as hyper does).
    if matches!(head.framing, Framing::Chunked | Framing::UntilClose) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if via {
        out.extend_from_slice(b"via: 1.1 tether\r\n");
    }
    if !head.has_date {
        write_date(out);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Step::Complete(Answer {
        len: head.len,
        status: head.status,
        framing: head.framing,
        reusable: head.reusable,
        content_length: head.content_length,
        close,
    })
}

/// Writes a response of the node's own (see `respond`); answers the
/// length of its body.
pub fn write_status(
    status: StatusCode,
    detail: Option<&str>,
    close: bool,
    out: &mut Vec<u8>,
) -> u64 {
    let body = status_body(status, detail);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    push_header(out, b"content-type", STATUS_CONTENT_TYPE.as_bytes());
    push_header(out, b"content-length", body.len().to_string().as_bytes());
    write_date(out);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    body.len() as u64
}

/// Writes `date: <IMF-fixdate>`, formatted once a second per thread.
pub fn write_date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second || cached.1.is_empty() {
            *cached = (second, httpdate::fmt_http_date(now));
        }
        push_header(out, b"date", cached.1.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &str, head_request: bool, close: bool) -> (Parsed, String) {
        let mut out = Vec::new();
        let parsed = parse_response(head.as_bytes(), head_request, false, close, &mut out);
        (parsed, String::from_utf8(out).unwrap())
    }

    fn answer(head: &str) -> Answer {
        match parse(head, false, false).0 {
            Parsed::Complete(answer) => answer,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reads_the_framing_the_way_rfc_9112_says() {
        let a = answer("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDate: x\r\n\r\nhello");
        assert_eq!(
            (a.framing, a.reusable, a.len),
            (Framing::Length(5), true, 47)
        );
        let a = answer("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nDate: x\r\n\r\n");
        assert_eq!((a.framing, a.reusable), (Framing::Chunked, true));
        let a = answer("HTTP/1.1 200 OK\r\nDate: x\r\n\r\n");
        assert_eq!((a.framing, a.reusable), (Framing::UntilClose, false));
        let a = answer("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(a.framing, Framing::Empty);
        let a = answer("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n");
        assert!(!a.reusable);
        let a = answer("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n");
        assert!(!a.reusable);
        let (parsed, _) = parse("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true, false);
        assert!(matches!(
            parsed,
            Parsed::Complete(Answer {
                framing: Framing::Empty,
                ..
            })
        ));
        assert_eq!(
            parse("HTTP/1.1 100 Continue\r\n\r\n", false, false).0,
            Step::Interim(25)
        );
    }

    #[test]
    fn refuses_ambiguous_framing() {
        for head in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        ] {
            assert!(
                matches!(parse(head, false, false).0, Parsed::Malformed(_)),
                "{head}"
            );
        }
    }

    #[test]
    fn writes_the_clients_head_without_hop_by_hop_headers() {
        let (_, out) = parse(
            "HTTP/1.1 200 Fine\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\n\
             Keep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nServer: origin\r\n\
             Date: Mon, 07 Dec 2026 00:00:00 GMT\r\n\r\n",
            false,
            true,
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 Fine\r\nServer: origin\r\nDate: Mon, 07 Dec 2026 00:00:00 GMT\r\n\
             transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        let (_, out) = parse("HTTP/1.1 204 No Content\r\n\r\n", false, false);
        assert!(
            out.starts_with("HTTP/1.1 204 No Content\r\ndate: "),
            "{out}"
        );
        let (_, out) = parse("HTTP/1.0 200 OK\r\nDate: x\r\n\r\n", false, false);
        assert!(
            out.ends_with("transfer-encoding: chunked\r\n\r\n"),
            "until close: {out}"
        );
    }
}
