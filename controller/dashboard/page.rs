//! The page itself: plain HTML, CSS and a JavaScript module, embedded in
//! the binary. The Content-Security-Policy allows only these files' own
//! script and style, so text that reaches the page from the fleet (node
//! ids, labels, comments, NACK reasons) can never run as script even if
//! it were ever put in as markup.

use bytes::Bytes;
use http::{header, Response};
use http_body_util::{BodyExt, Full};

use super::Body;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// The asset at `path`, if there is one.
pub fn asset(path: &str) -> Option<Response<Body>> {
    let (text, content_type) = match path {
        "/" | "/index.html" => (include_str!("page/index.html"), "text/html; charset=utf-8"),
        "/app.js" => (
            include_str!("page/app.js"),
            "text/javascript; charset=utf-8",
        ),
        "/style.css" => (include_str!("page/style.css"), "text/css; charset=utf-8"),
        _ => return None,
    };
    let response = Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_SECURITY_POLICY, CSP)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::REFERRER_POLICY, "no-referrer")
        // The binary is the version: a new controller serves new files.
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Full::new(Bytes::from_static(text.as_bytes())).boxed())
        .expect("a valid response");
    Some(response)
}
