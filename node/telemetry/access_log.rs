//! Access logs: one line per request, written by a thread of its own so a
//! slow disk never holds a request. Lines wait in a bounded queue; when it
//! is full they are dropped and counted (`tether.access_log.dropped`).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode, Version};
use serde_json::json;

use crate::config::{AccessLogDestination, AccessLogFormat, AccessLogSettings};

/// Lines waiting for the writer.
const QUEUE: usize = 16 * 1024;

pub struct AccessLog {
    lines: SyncSender<String>,
    format: AccessLogFormat,
}

/// What one line says.
pub struct Entry<'a> {
    pub client: SocketAddr,
    pub method: &'a Method,
    pub target: &'a str,
    pub version: Version,
    pub host: &'a str,
    pub status: StatusCode,
    /// Response body size when the response declared it.
    pub bytes: Option<u64>,
    pub referer: &'a str,
    pub user_agent: &'a str,
    pub listener: &'a str,
    pub upstream: Option<&'a str>,
    pub server: Option<crate::config::ServerAddr>,
    pub duration: Duration,
    pub trace_id: Option<String>,
}

/// Why an access log cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("cannot open access log {}: {error}", path.display())]
    Open {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("cannot start the access log writer: {0}")]
    Writer(std::io::Error),
}

impl AccessLog {
    /// Opens the destination (a file is appended to) and starts its writer.
    pub fn open(settings: &AccessLogSettings) -> Result<AccessLog, AccessLogError> {
        let mut sink: Box<dyn Write + Send> = match &settings.destination {
            AccessLogDestination::Stdout => Box::new(std::io::stdout()),
            AccessLogDestination::Stderr => Box::new(std::io::stderr()),
            AccessLogDestination::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|error| AccessLogError::Open {
                        path: path.clone(),
                        error,
                    })?,
            ),
        };
        let (lines, queue) = sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("tether-access-log".into())
            .spawn(move || {
                // Ends when the listener's generation is dropped.
                while let Ok(line) = queue.recv() {
                    let _ = sink.write_all(line.as_bytes());
                    for line in queue.try_iter() {
                        let _ = sink.write_all(line.as_bytes());
                    }
                    let _ = sink.flush();
                }
            })
            .map_err(AccessLogError::Writer)?;
        Ok(AccessLog {
            lines,
            format: settings.format,
        })
    }

    pub fn write(&self, entry: &Entry<'_>) {
        let line = match self.format {
            AccessLogFormat::Combined => combined(entry),
            AccessLogFormat::Json => json_line(entry),
        };
        if let Err(TrySendError::Full(_)) = self.lines.try_send(line) {
            super::metrics::node().access_log_dropped.add(1, &[]);
        }
    }
}

fn version(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

fn or_dash(value: &str) -> &str {
    if value.is_empty() {
        "-"
    } else {
        value
    }
}

/// nginx's `combined`, then the listener, upstream server and seconds taken.
fn combined(entry: &Entry<'_>) -> String {
    let time = httpdate::fmt_http_date(SystemTime::now());
    format!(
        "{} - - [{time}] \"{} {} {}\" {} {} \"{}\" \"{}\" listener={} upstream={} time={:.3}\n",
        entry.client.ip(),
        entry.method,
        entry.target,
        version(entry.version),
        entry.status.as_u16(),
        entry
            .bytes
            .map_or_else(|| "-".to_owned(), |b| b.to_string()),
        or_dash(entry.referer).replace('"', "\\\""),
        or_dash(entry.user_agent).replace('"', "\\\""),
        entry.listener,
        entry
            .server
            .as_ref()
            .map_or_else(|| "-".to_owned(), |s| s.to_string()),
        entry.duration.as_secs_f64(),
    )
}

fn json_line(entry: &Entry<'_>) -> String {
    let mut line = json!({
        "time": httpdate::fmt_http_date(SystemTime::now()),
        "client": entry.client.ip().to_string(),
        "method": entry.method.as_str(),
        "target": entry.target,
        "protocol": version(entry.version),
        "host": entry.host,
        "status": entry.status.as_u16(),
        "bytes": entry.bytes,
        "referer": entry.referer,
        "user_agent": entry.user_agent,
        "listener": entry.listener,
        "upstream": entry.upstream,
        "server": entry.server.as_ref().map(|s| s.to_string()),
        "duration_ms": entry.duration.as_secs_f64() * 1000.0,
        "trace_id": entry.trace_id,
    })
    .to_string();
    line.push('\n');
    line
}
