//! Header rewriting between client and upstream: hop-by-hop headers are
//! removed (RFC 9110 §7.6.1) and the X-Forwarded-* family is set the way
//! nginx and Envoy users expect.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Connection-scoped headers that never cross the proxy (RFC 9110
/// §7.6.1), whatever their letter case.
pub fn is_hop_by_hop(name: &str) -> bool {
    let candidates: &[&str] = match name.len() {
        2 => &["te"],
        7 => &["trailer", "upgrade"],
        10 => &["connection", "keep-alive"],
        16 => &["proxy-connection"],
        17 => &["transfer-encoding"],
        18 => &["proxy-authenticate"],
        _ => return false,
    };
    candidates.iter().any(|c| c.eq_ignore_ascii_case(name))
}

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static VIA_VALUE: HeaderValue = HeaderValue::from_static("1.1 tether");

/// Removes hop-by-hop headers, including those the `Connection` header
/// names. `TE: trailers` survives: HTTP/2 upstreams (gRPC) need it.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of these: one pass over the few names they
    // have, and nothing else.
    if !headers.keys().any(|name| is_hop_by_hop(name.as_str())) {
        return;
    }
    // Names listed in Connection are rare; collect only when present.
    if let Some(connection) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = connection
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|name| HeaderName::try_from(name.trim()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    let te_is_trailers = headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let hop_by_hop: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name.as_str()))
        .filter(|name| !(*name == header::TE && te_is_trailers))
        .cloned()
        .collect();
    for name in hop_by_hop {
        headers.remove(name);
    }
}

/// Appends the client (its address as `client_header_value` wrote it, once
/// per connection) to `X-Forwarded-For` and sets `X-Forwarded-Proto` and
/// `X-Forwarded-Host` (the client's values of those two are not trusted).
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    proto: &'static str,
    host: Option<&HeaderValue>,
) {
    let client = client.clone();
    // Several header lines are one comma-separated list (RFC 9110 §5.3).
    let mut existing = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
    let forwarded_for = if existing.peek().is_none() {
        client
    } else {
        let mut joined = Vec::with_capacity(64);
        for value in existing {
            joined.extend_from_slice(value.as_bytes());
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(client.as_bytes());
        HeaderValue::from_bytes(&joined).unwrap_or(client)
    };
    headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    match host {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host.clone()),
        None => headers.remove(&X_FORWARDED_HOST),
    };
}

pub fn add_via(headers: &mut HeaderMap) {
    headers.append(header::VIA, VIA_VALUE.clone());
}

/// A client address as X-Forwarded-For lists it.
pub fn client_header_value(ip: IpAddr) -> HeaderValue {
    let mut buf = [0u8; 45];
    let len = {
        use std::io::Write;
        let mut cursor = std::io::Cursor::new(&mut buf[..]);
        let _ = write!(cursor, "{ip}");
        cursor.position() as usize
    };
    HeaderValue::from_bytes(&buf[..len]).expect("an IP address is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));

        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        remove_hop_by_hop(&mut h);
        assert!(h.contains_key(header::TE));
    }

    #[test]
    fn appends_to_forwarded_for_and_overrides_proto_and_host() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        let host = HeaderValue::from_static("example.com");
        let client = client_header_value("10.1.2.3".parse().unwrap());
        add_forwarded(&mut h, &client, "http", Some(&host));
        assert_eq!(h[&X_FORWARDED_FOR], "203.0.113.7, 10.1.2.3");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "example.com");
    }

    #[test]
    fn joins_every_forwarded_for_line_before_appending() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
        h.append(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("198.51.100.1, 192.0.2.9"),
        );
        let client = client_header_value("10.1.2.3".parse().unwrap());
        add_forwarded(&mut h, &client, "http", None);
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(
            h[&X_FORWARDED_FOR],
            "203.0.113.7, 198.51.100.1, 192.0.2.9, 10.1.2.3"
        );
    }
}
