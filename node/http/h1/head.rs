//! The request heads the HTTP/1 fast path serves itself, and the head it
//! writes upstream for them. Only the plainest shape is taken: HTTP/1.1,
//! an origin-form target, one `Host`, at most one `Content-Length` of
//! digits, no `Transfer-Encoding`, `Upgrade` or `Expect`, and CRLF line
//! ends. Anything else goes to hyper as it arrived, so this path is never
//! more lenient than hyper. Two shapes hyper would take are refused: a
//! bare LF, and `Transfer-Encoding` beside `Content-Length` (hyper lets
//! chunked win); parsers that disagree on those are how requests get
//! smuggled.

use std::mem::MaybeUninit;

use http::{HeaderMap, Method, Version};
use httparse::{Header, Status};

use crate::http::headers::is_hop_by_hop;
use crate::telemetry::request::RequestView;

/// As many header lines as hyper takes.
pub const MAX_HEADERS: usize = 100;
/// Header names a `Connection` header may list besides close/keep-alive.
const MAX_CONNECTION_TOKENS: usize = 8;

pub type HeaderSlots<'b> = [MaybeUninit<Header<'b>>; MAX_HEADERS];

pub fn header_slots<'b>() -> HeaderSlots<'b> {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

// Lives for one call on the stack; boxing the head would allocate per request.
#[allow(clippy::large_enum_variant)]
pub enum Parsed<'b> {
    /// The head has not all arrived.
    Partial,
    /// Not a shape served here: hyper serves the connection from this
    /// request on.
    HandOff,
    /// Refused outright, for this reason.
    Refused(&'static str),
    Complete(RequestHead<'b>),
}

pub struct RequestHead<'b> {
    /// Bytes of the head, up to and including the empty line.
    pub len: usize,
    pub method: &'b str,
    /// Path and query, in origin form.
    pub target: &'b str,
    pub host: &'b str,
    pub headers: &'b [Header<'b>],
    pub body_len: usize,
    /// `Connection: close`.
    pub close: bool,
    pub tokens: ConnectionTokens<'b>,
}

/// The header names a `Connection` header lists (hop-by-hop for this
/// message only, RFC 9110 §7.6.1).
#[derive(Default)]
pub struct ConnectionTokens<'b> {
    names: [&'b [u8]; MAX_CONNECTION_TOKENS],
    len: usize,
}

impl<'b> ConnectionTokens<'b> {
    /// Adds the tokens of one `Connection` value; answers whether it said
    /// `close`, or None when there are more names than this path keeps or
    /// the value asks for an upgrade.
    pub fn add(&mut self, value: &'b [u8]) -> Option<bool> {
        let mut close = false;
        for token in value.split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.is_empty() || token.eq_ignore_ascii_case(b"keep-alive") {
                continue;
            }
            if token.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") || self.len == self.names.len() {
                return None;
            } else {
                self.names[self.len] = token;
                self.len += 1;
            }
        }
        Some(close)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names[..self.len]
            .iter()
            .any(|token| token.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// Whether a line of `head` ends in LF without CR.
pub fn has_bare_lf(head: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', head).any(|at| at == 0 || head[at - 1] != b'\r')
}

/// A `Content-Length` value: digits only, no sign, no list.
pub fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

pub fn parse_request<'b>(buf: &'b [u8], slots: &'b mut HeaderSlots<'b>) -> Parsed<'b> {
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(buf, slots) {
        Ok(Status::Complete(len)) => len,
        Ok(Status::Partial) => return Parsed::Partial,
        // hyper answers these the way it always has.
        Err(_) => return Parsed::HandOff,
    };
    if has_bare_lf(&buf[..len]) {
        return Parsed::Refused("a line ends in a bare LF");
    }
    let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version)
    else {
        return Parsed::HandOff;
    };
    if method == "CONNECT" || !target.starts_with('/') {
        return Parsed::HandOff;
    }
    let headers: &'b [Header<'b>] = request.headers;
    let mut host = None;
    let mut body_len = None;
    let mut close = false;
    let mut tokens = ConnectionTokens::default();
    let mut hand_off = false;
    let mut chunked = false;
    for header in headers {
        let name = header.name;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Parsed::HandOff;
            }
            match std::str::from_utf8(header.value) {
                Ok(value) if !value.is_empty() => host = Some(value),
                _ => return Parsed::HandOff,
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            match content_length(header.value).and_then(|n| usize::try_from(n).ok()) {
                Some(n) if body_len.is_none() => body_len = Some(n),
                _ => hand_off = true,
            }
        } else if name.eq_ignore_ascii_case("connection") {
            match tokens.add(header.value) {
                Some(said_close) => close |= said_close,
                None => return Parsed::HandOff,
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("upgrade") || name.eq_ignore_ascii_case("expect") {
            return Parsed::HandOff;
        }
    }
    if chunked && (body_len.is_some() || hand_off) {
        return Parsed::Refused("Transfer-Encoding with Content-Length");
    }
    if chunked || hand_off {
        return Parsed::HandOff;
    }
    let Some(host) = host else {
        return Parsed::HandOff;
    };
    Parsed::Complete(RequestHead {
        len,
        method,
        target,
        host,
        headers,
        body_len: body_len.unwrap_or(0),
        close,
        tokens,
    })
}

impl RequestHead<'_> {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or(self.target)
    }

    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}

impl RequestView for RequestHead<'_> {
    fn method(&self) -> Method {
        Method::from_bytes(self.method.as_bytes()).unwrap_or_default()
    }
    fn version(&self) -> Version {
        Version::HTTP_11
    }
    fn path(&self) -> &str {
        RequestHead::path(self)
    }
    fn target(&self) -> &str {
        self.target
    }
    fn host(&self) -> Option<&str> {
        Some(self.host)
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// What the node adds to a request on its way upstream.
pub struct Forwarding<'a> {
    /// The client's address as X-Forwarded-For lists it.
    pub client: &'a [u8],
    /// `http` or `https`, for X-Forwarded-Proto.
    pub scheme: &'static str,
    pub via: bool,
    /// The span's `traceparent`/`tracestate`, replacing the client's.
    pub trace: Option<&'a HeaderMap>,
}

/// Writes the request head for the upstream into `out`: the client's
/// request line and headers minus the hop-by-hop ones, then
/// X-Forwarded-For (the client's list with the client appended),
/// X-Forwarded-Proto, X-Forwarded-Host, Via and the trace context.
pub fn write_upstream_head(head: &RequestHead<'_>, forwarding: &Forwarding<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut forwarded_for: Option<Vec<u8>> = None;
    for header in head.headers {
        let name = header.name;
        if is_hop_by_hop(name) {
            // TE: trailers is end-to-end in practice (gRPC needs it).
            if !(name.eq_ignore_ascii_case("te") && header.value.eq_ignore_ascii_case(b"trailers"))
            {
                continue;
            }
        }
        if head.tokens.contains(name) {
            continue;
        }
        if name.len() > 11 && name[..11].eq_ignore_ascii_case("x-forwarded") {
            if name.eq_ignore_ascii_case("x-forwarded-for") {
                let list = forwarded_for.get_or_insert_with(|| Vec::with_capacity(64));
                list.extend_from_slice(header.value);
                list.extend_from_slice(b", ");
                continue;
            }
            if name.eq_ignore_ascii_case("x-forwarded-proto")
                || name.eq_ignore_ascii_case("x-forwarded-host")
            {
                continue;
            }
        }
        if forwarding.trace.is_some()
            && (name.eq_ignore_ascii_case("traceparent") || name.eq_ignore_ascii_case("tracestate"))
        {
            continue;
        }
        push_header(out, name.as_bytes(), header.value);
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(list) = forwarded_for {
        out.extend_from_slice(&list);
    }
    out.extend_from_slice(forwarding.client);
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    out.extend_from_slice(forwarding.scheme.as_bytes());
    out.extend_from_slice(b"\r\n");
    push_header(out, b"x-forwarded-host", head.host.as_bytes());
    if forwarding.via {
        out.extend_from_slice(b"via: 1.1 tether\r\n");
    }
    if let Some(trace) = forwarding.trace {
        for (name, value) in trace {
            push_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
}

pub fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &str) -> Parsed<'_> {
        let slots = Box::leak(Box::new(header_slots()));
        parse_request(head.as_bytes(), slots)
    }

    fn complete(head: &str) -> RequestHead<'_> {
        match parse(head) {
            Parsed::Complete(head) => head,
            _ => panic!("not served here: {head:?}"),
        }
    }

    fn handed_off(head: &str) -> bool {
        matches!(parse(head), Parsed::HandOff)
    }

    #[test]
    fn takes_plain_requests() {
        let head = complete("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nrest");
        assert_eq!(
            (head.method, head.target, head.host),
            ("GET", "/a?b=1", "x")
        );
        assert_eq!((head.len, head.body_len, head.close), (51, 0, true));
        assert_eq!(head.path(), "/a");
        let head = complete("POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello");
        assert_eq!(head.body_len, 5);
        assert!(matches!(
            parse("GET / HTTP/1.1\r\nHost: x\r\n"),
            Parsed::Partial
        ));
    }

    #[test]
    fn leaves_every_unusual_or_ambiguous_shape_to_hyper() {
        for head in [
            "GET / HTTP/1.0\r\nHost: x\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nab",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\na",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 1\r\n\r\na",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        ] {
            assert!(handed_off(head), "{head:?}");
        }
    }

    #[test]
    fn refuses_bare_lf_and_a_length_beside_chunked() {
        for head in [
            "GET / HTTP/1.1\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\n\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(matches!(parse(head), Parsed::Refused(_)), "{head:?}");
        }
    }

    #[test]
    fn forwards_end_to_end_headers_and_sets_the_forwarding_ones() {
        let head = complete(
            "GET /p HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive, X-Secret\r\n\
             X-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nX-Forwarded-For: 203.0.113.7\r\n\
             x-forwarded-for: 198.51.100.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n\
             Accept: */*\r\n\r\n",
        );
        let mut out = Vec::new();
        let forwarding = Forwarding {
            client: b"10.1.2.3",
            scheme: "http",
            via: true,
            trace: None,
        };
        write_upstream_head(&head, &forwarding, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p HTTP/1.1\r\nHost: example.com\r\nTE: trailers\r\nAccept: */*\r\n\
             x-forwarded-for: 203.0.113.7, 198.51.100.1, 10.1.2.3\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: example.com\r\nvia: 1.1 tether\r\n\r\n"
        );
    }
}
