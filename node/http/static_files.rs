//! Static files: GET/HEAD of files under a root directory, with an index
//! file, Content-Type by extension, ETag/Last-Modified validation (304) and
//! single byte ranges (206). Nothing outside the root is ever served: `..`
//! segments (plain or percent-encoded) are refused and the resolved path,
//! symlinks followed, must stay inside the canonical root.

use std::io::SeekFrom;
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use percent_encoding::percent_decode_str;
use tokio::io::AsyncSeekExt;

use super::body::ProxyBody;
use super::respond::status_response;
use crate::config::StaticConfig;

/// Serves `sub_path` (the request path below the route's prefix) from `files`.
pub async fn serve(
    method: &Method,
    request_path: &str,
    sub_path: &str,
    headers: &HeaderMap,
    files: &StaticConfig,
) -> Response<ProxyBody> {
    if method != Method::GET && method != Method::HEAD {
        let mut response = status_response(StatusCode::METHOD_NOT_ALLOWED);
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let relative = match relative_path(sub_path) {
        Ok(relative) => relative,
        Err(status) => return status_response(status),
    };
    let mut path = files.root.join(&relative);
    let Ok(mut resolved) = tokio::fs::canonicalize(&path).await else {
        return status_response(StatusCode::NOT_FOUND);
    };
    if !resolved.starts_with(&files.root) {
        return status_response(StatusCode::FORBIDDEN);
    }
    let Ok(mut metadata) = tokio::fs::metadata(&resolved).await else {
        return status_response(StatusCode::NOT_FOUND);
    };
    if metadata.is_dir() {
        if !request_path.ends_with('/') {
            return redirect_to_directory(request_path);
        }
        path = resolved.join(&files.index);
        resolved = match tokio::fs::canonicalize(&path).await {
            Ok(index) if index.starts_with(&files.root) => index,
            Ok(_) => return status_response(StatusCode::FORBIDDEN),
            Err(_) => return status_response(StatusCode::NOT_FOUND),
        };
        metadata = match tokio::fs::metadata(&resolved).await {
            Ok(m) if m.is_file() => m,
            _ => return status_response(StatusCode::NOT_FOUND),
        };
    }
    if !metadata.is_file() {
        return status_response(StatusCode::NOT_FOUND);
    }
    let Ok(file) = tokio::fs::File::open(&resolved).await else {
        return status_response(StatusCode::FORBIDDEN);
    };
    let len = metadata.len();
    let modified = metadata.modified().unwrap_or(UNIX_EPOCH);
    let etag = entity_tag(modified, len);
    let validators = Validators {
        etag: &etag,
        modified,
    };

    if validators.not_modified(headers) {
        let mut response = status_response(StatusCode::NOT_MODIFIED);
        *response.body_mut() = ProxyBody::empty();
        validators.write(response.headers_mut());
        return response;
    }

    let range = match headers.get(header::RANGE) {
        Some(value) if validators.if_range_allows(headers) => parse_range(value.as_bytes(), len),
        _ => RangeRequest::Full,
    };
    let (status, start, count) = match range {
        RangeRequest::Full => (StatusCode::OK, 0, len),
        RangeRequest::Partial { start, end } => {
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        RangeRequest::Unsatisfiable => {
            let mut response = status_response(StatusCode::RANGE_NOT_SATISFIABLE);
            let value = HeaderValue::try_from(format!("bytes */{len}")).expect("ascii");
            response.headers_mut().insert(header::CONTENT_RANGE, value);
            return response;
        }
    };
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type(&resolved))
        .header(header::CONTENT_LENGTH, count)
        .header(header::ACCEPT_RANGES, "bytes");
    if status == StatusCode::PARTIAL_CONTENT {
        builder = builder.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", start + count - 1),
        );
    }
    let mut response = builder
        .body(ProxyBody::empty())
        .expect("valid static response");
    validators.write(response.headers_mut());
    if method == Method::HEAD {
        return response;
    }
    let mut file = file;
    if start > 0 && file.seek(SeekFrom::Start(start)).await.is_err() {
        return status_response(StatusCode::INTERNAL_SERVER_ERROR);
    }
    *response.body_mut() = ProxyBody::file(file, count);
    response
}

/// Decodes the URL path and keeps only normal components. `..` anywhere is
/// refused (403) rather than resolved, as nginx does.
fn relative_path(sub_path: &str) -> Result<PathBuf, StatusCode> {
    let decoded = percent_decode_str(sub_path)
        .decode_utf8()
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    if decoded.contains('\0') {
        return Err(StatusCode::BAD_REQUEST);
    }
    let mut relative = PathBuf::new();
    for component in Path::new(decoded.as_ref()).components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return Err(StatusCode::FORBIDDEN),
        }
    }
    Ok(relative)
}

fn redirect_to_directory(request_path: &str) -> Response<ProxyBody> {
    let mut response = status_response(StatusCode::MOVED_PERMANENTLY);
    if let Ok(location) = HeaderValue::try_from(format!("{request_path}/")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

fn content_type(path: &Path) -> HeaderValue {
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    let text_like = mime.type_() == mime_guess::mime::TEXT
        || mime.subtype() == "javascript"
        || mime.subtype() == "json";
    let value = if text_like && mime.get_param("charset").is_none() {
        format!("{mime}; charset=utf-8")
    } else {
        mime.to_string()
    };
    HeaderValue::try_from(value).unwrap_or(HeaderValue::from_static("application/octet-stream"))
}

/// nginx's ETag shape: hex mtime and hex length.
fn entity_tag(modified: SystemTime, len: u64) -> String {
    let secs = modified
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("\"{secs:x}-{len:x}\"")
}

struct Validators<'a> {
    etag: &'a str,
    modified: SystemTime,
}

impl Validators<'_> {
    fn write(&self, headers: &mut HeaderMap) {
        if let Ok(etag) = HeaderValue::try_from(self.etag) {
            headers.insert(header::ETAG, etag);
        }
        if let Ok(date) = HeaderValue::try_from(httpdate::fmt_http_date(self.modified)) {
            headers.insert(header::LAST_MODIFIED, date);
        }
    }

    /// RFC 9110 §13.2.2: If-None-Match decides when present; otherwise
    /// If-Modified-Since.
    fn not_modified(&self, headers: &HeaderMap) -> bool {
        if let Some(value) = headers.get(header::IF_NONE_MATCH) {
            let value = value.to_str().unwrap_or("");
            return value.trim() == "*"
                || value
                    .split(',')
                    .any(|tag| tag.trim().trim_start_matches("W/") == self.etag);
        }
        headers
            .get(header::IF_MODIFIED_SINCE)
            .and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok())
            .is_some_and(|since| whole_seconds(self.modified) <= whole_seconds(since))
    }

    /// A Range is honoured only if If-Range (when sent) still matches.
    fn if_range_allows(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) else {
            return true;
        };
        if value.starts_with('"') {
            return value == self.etag;
        }
        httpdate::parse_http_date(value)
            .is_ok_and(|date| whole_seconds(date) == whole_seconds(self.modified))
    }
}

fn whole_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    Full,
    /// Inclusive byte positions.
    Partial {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
}

/// One `bytes=` range. Several ranges, or a header we do not understand,
/// get the whole file, which RFC 9110 §14.2 allows.
fn parse_range(value: &[u8], len: u64) -> RangeRequest {
    let Some(spec) = std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let range = match (first.parse::<u64>(), last.parse::<u64>()) {
        (Ok(start), Ok(end)) if start <= end => Some((start, end.min(len.saturating_sub(1)))),
        (Ok(_), Ok(_)) => return RangeRequest::Full,
        (Ok(start), Err(_)) if last.is_empty() => Some((start, len.saturating_sub(1))),
        (Err(_), Ok(suffix)) if first.is_empty() => {
            if suffix == 0 {
                None
            } else {
                Some((len.saturating_sub(suffix), len.saturating_sub(1)))
            }
        }
        _ => return RangeRequest::Full,
    };
    match range {
        Some((start, end)) if start < len && len > 0 => RangeRequest::Partial { start, end },
        _ => RangeRequest::Unsatisfiable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeRequest::*;
        assert_eq!(parse_range(b"bytes=0-9", 100), Partial { start: 0, end: 9 });
        assert_eq!(
            parse_range(b"bytes=90-", 100),
            Partial { start: 90, end: 99 }
        );
        assert_eq!(
            parse_range(b"bytes=-10", 100),
            Partial { start: 90, end: 99 }
        );
        assert_eq!(
            parse_range(b"bytes=95-200", 100),
            Partial { start: 95, end: 99 }
        );
        assert_eq!(parse_range(b"bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range(b"bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range(b"bytes=0-1,5-6", 100), Full);
        assert_eq!(parse_range(b"items=0-1", 100), Full);
        assert_eq!(parse_range(b"bytes=5-1", 100), Full);
    }

    #[test]
    fn traversal_is_refused_before_touching_the_disk() {
        assert_eq!(
            relative_path("/a/../../etc/passwd"),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            relative_path("/%2e%2e/etc/passwd"),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            relative_path("/a%2f..%2f..%2fsecret"),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(relative_path("/a/./b/"), Ok(PathBuf::from("a/b")));
        assert_eq!(relative_path("/bad%00"), Err(StatusCode::BAD_REQUEST));
    }
}
