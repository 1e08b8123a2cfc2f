//! Responses the node writes itself: short plain-text bodies that name the
//! status, as nginx does, with the detail left to the log.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::ProxyBody;

pub fn status_response(status: StatusCode) -> Response<ProxyBody> {
    let reason = status.canonical_reason().unwrap_or("");
    let body = if status.is_informational()
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::NO_CONTENT
    {
        String::new()
    } else {
        format!("{} {reason}\n", status.as_u16())
    };
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A status with a one-line explanation for the client, e.g. why every
/// server of an upstream is unavailable.
pub fn status_with_reason(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    let mut response = status_response(status);
    let body = format!(
        "{} {}: {reason}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    *response.body_mut() = ProxyBody::full(body);
    response
}
