//! Responses the node writes itself: short plain-text bodies that name the
//! status, as nginx does, with the detail left to the log.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::ProxyBody;

/// The body of a response the node writes itself; none for the statuses
/// that cannot have one.
pub fn status_body(status: StatusCode, detail: Option<&str>) -> String {
    if status.is_informational()
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::NO_CONTENT
    {
        return String::new();
    }
    let reason = status.canonical_reason().unwrap_or("");
    match detail {
        Some(detail) => format!("{} {reason}: {detail}\n", status.as_u16()),
        None => format!("{} {reason}\n", status.as_u16()),
    }
}

pub const STATUS_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

pub fn status_response(status: StatusCode) -> Response<ProxyBody> {
    status_with(status, None)
}

/// A status with a one-line explanation for the client, e.g. why every
/// server of an upstream is unavailable.
pub fn status_with_reason(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    status_with(status, Some(reason))
}

fn status_with(status: StatusCode, detail: Option<&str>) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(status_body(status, detail)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(STATUS_CONTENT_TYPE),
    );
    response
}
