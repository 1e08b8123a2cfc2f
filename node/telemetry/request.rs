//! One HTTP request as telemetry sees it: a server span (HTTP semantic
//! conventions, parent taken from the client's `traceparent`, passed on to
//! the upstream), the request counter and duration histogram, and the
//! access log line. Everything it records is decided when the request
//! arrives; when tracing is off, or the request is not sampled, no span is
//! made at all.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::{header, HeaderMap, Method, Request, Response, Version};
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
    pub route: Option<Arc<RouteLabels>>,
    /// The upstream server that answered.
    pub server: Option<crate::config::ServerAddr>,
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
        let traced = super::tracing_enabled() && super::sampling::sample_request(headers);
        let context = traced.then(|| {
            let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
            let mut span = tracer()
                .span_builder(request.method().as_str().to_owned())
                .with_kind(SpanKind::Server)
                .start_with_context(tracer(), &parent);
            // Unsampled spans (most, at low ratios) skip the attributes.
            if span.is_recording() {
                span.set_attribute(KeyValue::new(
                    "http.request.method",
                    request.method().as_str().to_owned(),
                ));
                span.set_attribute(KeyValue::new("url.path", request.uri().path().to_owned()));
                span.set_attribute(KeyValue::new("url.scheme", scheme));
                span.set_attribute(KeyValue::new("server.address", host()));
                span.set_attribute(KeyValue::new("client.address", client.ip().to_string()));
                span.set_attribute(KeyValue::new(
                    "network.protocol.version",
                    protocol_version(request.version()),
                ));
                if let Some(agent) = headers
                    .get(header::USER_AGENT)
                    .and_then(|v| v.to_str().ok())
                {
                    span.set_attribute(KeyValue::new("user_agent.original", agent.to_owned()));
                }
            }
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
        let duration = self.started.elapsed();
        let status = response.status();
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
