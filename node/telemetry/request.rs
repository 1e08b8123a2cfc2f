//! One HTTP request as telemetry sees it: a server span (HTTP semantic
//! conventions, parent taken from the client's `traceparent`, passed on to
//! the upstream), the request counter and duration histogram, and the
//! access log line. Everything it records is decided when the request
//! arrives; when tracing is off, or the request is not sampled, no span is
//! made at all.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::{header, HeaderMap, Method, Request, Response, StatusCode, Version};
use opentelemetry::metrics::{BoundCounter, BoundHistogram};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;

use super::access_log::{AccessLog, Entry};
use super::metrics::{node, status_class};
use super::tracer;

/// The route a request matched: its labels, and its request series bound
/// once per status class so a request records without looking its labels
/// up.
pub struct RouteLabels {
    listener: Arc<str>,
    /// `host/path-prefix` as configured (`*` host for any).
    pub route: Arc<str>,
    pub upstream: Option<Arc<str>>,
    series: [OnceLock<Series>; 5],
}

struct Series {
    requests: BoundCounter<u64>,
    duration: BoundHistogram<f64>,
}

impl RouteLabels {
    pub fn new(listener: &str, route: Arc<str>, upstream: Option<Arc<str>>) -> RouteLabels {
        RouteLabels {
            listener: listener.into(),
            route,
            upstream,
            series: Default::default(),
        }
    }

    /// What requests no route matched count under.
    pub fn unrouted(listener: &str) -> RouteLabels {
        Self::new(listener, "(none)".into(), None)
    }

    fn series(&self, status: u16) -> &Series {
        let class = status_class(status);
        let index = usize::from((status / 100).clamp(1, 5) - 1);
        self.series[index].get_or_init(|| {
            let attributes = [
                KeyValue::new("listener", self.listener.clone()),
                KeyValue::new("route", self.route.clone()),
                KeyValue::new(
                    "upstream",
                    self.upstream.clone().unwrap_or_else(|| "".into()),
                ),
                KeyValue::new("status_class", class),
            ];
            let metrics = node();
            Series {
                requests: metrics.requests.bind(&attributes),
                duration: metrics.request_duration.bind(&attributes),
            }
        })
    }
}

/// What telemetry reads from a request head, whichever parser read it
/// (hyper's `Request`, or the HTTP/1 fast path's head).
pub trait RequestView {
    fn method(&self) -> Method;
    fn version(&self) -> Version;
    fn path(&self) -> &str;
    /// The path and query as the client sent them.
    fn target(&self) -> &str;
    /// `Host`, or the URI's host when there is none.
    fn host(&self) -> Option<&str>;
    /// The first value of header `name` (lowercase).
    fn header(&self, name: &str) -> Option<&[u8]>;
}

impl<B> RequestView for Request<B> {
    fn method(&self) -> Method {
        self.method().clone()
    }
    fn version(&self) -> Version {
        self.version()
    }
    fn path(&self) -> &str {
        self.uri().path()
    }
    fn target(&self) -> &str {
        self.uri()
            .path_and_query()
            .map_or_else(|| self.uri().path(), |pq| pq.as_str())
    }
    fn host(&self) -> Option<&str> {
        self.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| self.uri().host())
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers().get(name).map(|v| v.as_bytes())
    }
}

/// A request head as an OpenTelemetry carrier.
struct HeadExtractor<'a, R: ?Sized>(&'a R);

impl<R: RequestView + ?Sized> Extractor for HeadExtractor<'_, R> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header(key).and_then(|v| std::str::from_utf8(v).ok())
    }
    fn keys(&self) -> Vec<&str> {
        ["traceparent", "tracestate"]
            .into_iter()
            .filter(|key| self.0.header(key).is_some())
            .collect()
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
    pub route: Option<Arc<RouteLabels>>,
    /// The upstream server that answered.
    pub server: Option<crate::config::ServerAddr>,
}

fn text<R: RequestView + ?Sized>(request: &R, name: &str) -> String {
    request
        .header(name)
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or_default()
        .to_owned()
}

impl Observation {
    pub fn start<R: RequestView + ?Sized>(
        request: &R,
        client: SocketAddr,
        scheme: &'static str,
        access_log: bool,
    ) -> Observation {
        let host = || request.host().unwrap_or_default().to_owned();
        let traced = super::tracing_enabled()
            && super::sampling::sample_request(request.header("traceparent"));
        let method = request.method();
        let context = traced.then(|| {
            let parent = TraceContextPropagator::new().extract(&HeadExtractor(request));
            let mut span = tracer()
                .span_builder(method.as_str().to_owned())
                .with_kind(SpanKind::Server)
                .start_with_context(tracer(), &parent);
            // Unsampled spans (most, at low ratios) skip the attributes.
            if span.is_recording() {
                span.set_attribute(KeyValue::new(
                    "http.request.method",
                    method.as_str().to_owned(),
                ));
                span.set_attribute(KeyValue::new("url.path", request.path().to_owned()));
                span.set_attribute(KeyValue::new("url.scheme", scheme));
                span.set_attribute(KeyValue::new("server.address", host()));
                span.set_attribute(KeyValue::new("client.address", client.ip().to_string()));
                span.set_attribute(KeyValue::new(
                    "network.protocol.version",
                    protocol_version(request.version()),
                ));
                if let Some(agent) = request
                    .header("user-agent")
                    .and_then(|v| std::str::from_utf8(v).ok())
                {
                    span.set_attribute(KeyValue::new("user_agent.original", agent.to_owned()));
                }
            }
            parent.with_span(span)
        });
        let head = access_log.then(|| Head {
            target: request.target().to_owned(),
            host: host(),
            referer: text(request, "referer"),
            user_agent: text(request, "user-agent"),
        });
        Observation {
            started: Instant::now(),
            method,
            version: request.version(),
            client,
            context,
            head,
            route: None,
            server: None,
        }
    }

    /// Whether the request is traced: its upstream request then carries
    /// the span's `traceparent` in place of the client's.
    pub fn is_traced(&self) -> bool {
        self.context.is_some()
    }

    /// Adds `traceparent` (and `tracestate`) for the upstream request: the
    /// upstream's spans become children of this request's span.
    pub fn propagate(&self, headers: &mut HeaderMap) {
        if let Some(context) = &self.context {
            TraceContextPropagator::new().inject_context(context, &mut HeaderInjector(headers));
        }
    }

    /// Records the answer: metrics, span end, access log line.
    /// `unrouted` counts requests that matched no route.
    pub fn finish<B>(
        self,
        response: &Response<B>,
        listener: &Arc<str>,
        unrouted: &RouteLabels,
        log: Option<&AccessLog>,
    ) {
        let bytes = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        self.finish_with(response.status(), bytes, listener, unrouted, log);
    }

    /// `finish` for an answer that is not a `Response`: its status and
    /// `Content-Length`.
    pub fn finish_with(
        self,
        status: StatusCode,
        bytes: Option<u64>,
        listener: &Arc<str>,
        unrouted: &RouteLabels,
        log: Option<&AccessLog>,
    ) {
        let duration = self.started.elapsed();
        let route = self.route.as_deref().unwrap_or(unrouted);
        super::answers::record(status);
        if super::metrics_enabled() {
            let series = route.series(status.as_u16());
            series.requests.add(1);
            series.duration.record(duration.as_secs_f64());
        }
        let route_name = route.route.clone();
        let upstream = route.upstream.clone();
        let trace_id = self.context.as_ref().map(|context| {
            let span = context.span();
            let trace_id = span.span_context().trace_id().to_string();
            if !span.is_recording() {
                return trace_id;
            }
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
            if let Some(server) = &self.server {
                span.set_attribute(KeyValue::new("tether.upstream.address", server.to_string()));
            }
            if status.is_server_error() {
                span.set_status(Status::error(status.to_string()));
            }
            span.end();
            trace_id
        });
        if let (Some(log), Some(head)) = (log, &self.head) {
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
