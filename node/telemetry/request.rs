//! One HTTP request as telemetry sees it: a server span (HTTP semantic
//! conventions, parent taken from the client's `traceparent`, passed on to
//! the upstream), the request counter and duration histogram, and the
//! access log line. Everything it records is decided when the request
//! arrives; when tracing is off no span is made at all.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::{header, HeaderMap, Method, Request, Response, Version};
use opentelemetry::global::BoxedTracer;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};

use super::access_log::{AccessLog, Entry};
use super::metrics::{node, status_class};

fn tracer() -> &'static BoxedTracer {
    static TRACER: OnceLock<BoxedTracer> = OnceLock::new();
    TRACER.get_or_init(|| opentelemetry::global::tracer("tether"))
}

/// The route a request matched, as metric labels.
#[derive(Debug, Clone)]
pub struct RouteLabels {
    /// `host/path-prefix` as configured (`*` host for any).
    pub route: Arc<str>,
    pub upstream: Option<Arc<str>>,
}

/// Headers as an OpenTelemetry carrier.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(key.as_bytes()),
            header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// What the access log needs from the request head.
struct Head {
    target: String,
    host: String,
    referer: String,
    user_agent: String,
}

pub struct Observation {
    started: Instant,
    method: Method,
    version: Version,
    client: SocketAddr,
    /// The server span's context, when tracing.
    context: Option<Context>,
    head: Option<Head>,
    pub route: Option<RouteLabels>,
    /// The upstream server that answered.
    pub server: Option<SocketAddr>,
}

fn text(headers: &HeaderMap, name: header::HeaderName) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

impl Observation {
    pub fn start<B>(
        request: &Request<B>,
        client: SocketAddr,
        scheme: &'static str,
        access_log: bool,
    ) -> Observation {
        let headers = request.headers();
        let host = || {
            headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .or_else(|| request.uri().host())
                .unwrap_or_default()
                .to_owned()
        };
        let context = super::tracing_enabled().then(|| {
            let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
                propagator.extract(&HeaderExtractor(headers))
            });
            let mut attributes = vec![
                KeyValue::new("http.request.method", request.method().as_str().to_owned()),
                KeyValue::new("url.path", request.uri().path().to_owned()),
                KeyValue::new("url.scheme", scheme),
                KeyValue::new("server.address", host()),
                KeyValue::new("client.address", client.ip().to_string()),
                KeyValue::new(
                    "network.protocol.version",
                    protocol_version(request.version()),
                ),
            ];
            if let Some(agent) = headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
            {
                attributes.push(KeyValue::new("user_agent.original", agent.to_owned()));
            }
            let span = tracer()
                .span_builder(request.method().as_str().to_owned())
                .with_kind(SpanKind::Server)
                .with_attributes(attributes)
                .start_with_context(tracer(), &parent);
            parent.with_span(span)
        });
        let head = access_log.then(|| Head {
            target: request
                .uri()
                .path_and_query()
                .map_or_else(|| request.uri().path().to_owned(), |pq| pq.to_string()),
            host: host(),
            referer: text(headers, header::REFERER),
            user_agent: text(headers, header::USER_AGENT),
        });
        Observation {
            started: Instant::now(),
            method: request.method().clone(),
            version: request.version(),
            client,
            context,
            head,
            route: None,
            server: None,
        }
    }

    /// Adds `traceparent` (and `tracestate`) for the upstream request: the
    /// upstream's spans become children of this request's span.
    pub fn propagate(&self, headers: &mut HeaderMap) {
        if let Some(context) = &self.context {
            opentelemetry::global::get_text_map_propagator(|propagator| {
                propagator.inject_context(context, &mut HeaderInjector(headers))
            });
        }
    }

    /// Records the answer: metrics, span end, access log line.
    pub fn finish<B>(self, response: &Response<B>, listener: &Arc<str>, log: Option<&AccessLog>) {
        let duration = self.started.elapsed();
        let status = response.status();
        let route = self.route.as_ref();
        let route_name = route.map_or_else(|| Arc::from("(none)"), |r| r.route.clone());
        let upstream = route.and_then(|r| r.upstream.clone());
        if super::metrics_enabled() {
            let attributes = [
                KeyValue::new("listener", listener.clone()),
                KeyValue::new("route", route_name.clone()),
                KeyValue::new(
                    "upstream",
                    upstream.clone().unwrap_or_else(|| Arc::from("")),
                ),
                KeyValue::new("status_class", status_class(status.as_u16())),
            ];
            let metrics = node();
            metrics.requests.add(1, &attributes);
            metrics
                .request_duration
                .record(duration.as_secs_f64(), &attributes);
        }
        let trace_id = self.context.as_ref().map(|context| {
            let span = context.span();
            span.update_name(format!("{} {}", self.method, route_name));
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status.as_u16()),
            ));
            span.set_attribute(KeyValue::new("http.route", route_name.clone()));
            span.set_attribute(KeyValue::new("tether.listener", listener.clone()));
            if let Some(upstream) = &upstream {
                span.set_attribute(KeyValue::new("tether.upstream", upstream.clone()));
            }
            if let Some(server) = self.server {
                span.set_attribute(KeyValue::new("tether.upstream.address", server.to_string()));
            }
            if status.is_server_error() {
                span.set_status(Status::error(status.to_string()));
            }
            span.end();
            span.span_context().trace_id().to_string()
        });
        if let (Some(log), Some(head)) = (log, &self.head) {
            let bytes = response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            log.write(&Entry {
                client: self.client,
                method: &self.method,
                target: &head.target,
                version: self.version,
                host: &head.host,
                status,
                bytes,
                referer: &head.referer,
                user_agent: &head.user_agent,
                listener,
                upstream: upstream.as_deref(),
                server: self.server,
                duration,
                trace_id,
            });
        }
    }
}

fn protocol_version(version: Version) -> &'static str {
    match version {
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        _ => "1.1",
    }
}
