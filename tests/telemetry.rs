//! Telemetry as a backend sees it: an in-process OTLP receiver (the
//! opentelemetry-proto crate's generated collector services, decoding the
//! real wire format) receives the node's spans and metrics; the Prometheus
//! endpoint is scraped and parsed; the access log is read back.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use support::*;
use tokio_stream::wrappers::TcpListenerStream;

/// A received span with its resource's attributes.
type ReceivedSpan = (Vec<KeyValue>, Span);

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let attributes = resource.resource.map(|r| r.attributes).unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push((attributes.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Receiver {
    async fn start() -> (Receiver, std::net::SocketAddr) {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .add_service(MetricsServiceServer::new(receiver.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        (receiver, addr)
    }

    async fn wait_for<T>(&self, what: &str, find: impl Fn(&Receiver) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(found) = find(self) {
                return found;
            }
            assert!(Instant::now() < deadline, "{what} never arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The sum of a counter's latest data points whose attributes include `with`.
    fn counter(&self, name: &str, with: (&str, &str)) -> Option<u64> {
        let exports = self.metrics.lock().unwrap();
        let last = exports.iter().rev().find_map(|export| {
            export
                .resource_metrics
                .iter()
                .flat_map(|r| &r.scope_metrics)
                .flat_map(|s| &s.metrics)
                .find(|m| m.name == name)
                .cloned()
        })?;
        let Some(Data::Sum(sum)) = last.data else {
            return None;
        };
        let total = sum
            .data_points
            .iter()
            .filter(|p| attribute(&p.attributes, with.0) == Some(with.1.to_owned()))
            .map(|p| match p.value {
                Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(
                    v,
                )) => v as u64,
                Some(
                    opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(v),
                ) => v as u64,
                None => 0,
            })
            .sum();
        Some(total)
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match &value.value {
        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
        Some(any_value::Value::IntValue(i)) => Some(i.to_string()),
        Some(other) => Some(format!(
            "{:?}",
            AnyValue {
                value: Some(other.clone())
            }
        )),
        None => None,
    }
}

fn config(endpoint: std::net::SocketAddr, origin: &Origin, extra: &str) -> String {
    format!(
        r#"
[node]
id = "otel-node"

[telemetry]
otlp_endpoint = "http://{endpoint}"
metrics_interval = "300ms"
prometheus = "127.0.0.1:0"

[[listener]]
name = "web"
listen = "127.0.0.1:0"
{extra}

[[listener.route]]
path = "/api/"
upstream = "api"

[upstream.api]
servers = [{{ addr = "{}" }}]
"#,
        origin.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_request_is_one_span_with_its_attributes_and_the_trace_reaches_the_upstream() {
    let (receiver, endpoint) = Receiver::start().await;
    let origin = Origin::start("api").await;
    let node = Node::start(&config(endpoint, &origin, ""));
    let addr = node.listener("web").await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{parent}-01");
    let answer = get_with(
        &http1_client(),
        addr,
        Some("shop.example"),
        "/api/items?page=2",
        &[("traceparent", &traceparent), ("user-agent", "otel-test")],
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200);

    // The upstream got the same trace, with the node's span as parent.
    let seen = origin.seen();
    let forwarded = seen[0].headers["traceparent"].to_str().unwrap().to_owned();
    let parts: Vec<&str> = forwarded.split('-').collect();
    assert_eq!(parts[1], trace_id, "{forwarded}");
    assert_ne!(
        parts[2], parent,
        "the node's own span is the upstream's parent"
    );

    let (resource, span) = receiver
        .wait_for("the request span", |r| {
            r.spans
                .lock()
                .unwrap()
                .iter()
                .find(|(_, s)| s.kind == SpanKind::Server as i32 && hex(&s.trace_id) == trace_id)
                .cloned()
        })
        .await;
    assert_eq!(hex(&span.parent_span_id), parent);
    assert_eq!(
        hex(&span.span_id),
        parts[2],
        "the span the upstream saw is the exported one"
    );
    assert_eq!(span.name, "GET */api/");
    let attr = |key: &str| attribute(&span.attributes, key);
    assert_eq!(attr("http.request.method").as_deref(), Some("GET"));
    assert_eq!(attr("http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attr("http.route").as_deref(), Some("*/api/"));
    assert_eq!(attr("url.path").as_deref(), Some("/api/items"));
    assert_eq!(attr("server.address").as_deref(), Some("shop.example"));
    assert_eq!(attr("user_agent.original").as_deref(), Some("otel-test"));
    assert_eq!(attr("tether.upstream").as_deref(), Some("api"));
    assert_eq!(
        attr("tether.upstream.address"),
        Some(origin.addr.to_string())
    );
    assert_eq!(
        attribute(&resource, "service.name").as_deref(),
        Some("tether-node")
    );
    assert_eq!(
        attribute(&resource, "service.instance.id").as_deref(),
        Some("otel-node")
    );

    // The config apply at start was traced too.
    receiver
        .wait_for("the config.apply span", |r| {
            r.spans
                .lock()
                .unwrap()
                .iter()
                .any(|(_, s)| s.name == "config.apply")
                .then_some(())
        })
        .await;

    // And counted: requests by listener, route, upstream and status class.
    let requests = receiver
        .wait_for("tether.requests", |r| {
            r.counter("tether.requests", ("status_class", "2xx"))
                .filter(|n| *n >= 1)
        })
        .await;
    assert_eq!(requests, 1);
}

/// At `trace_sample_ratio = 0.5` about half of new traces are sampled,
/// with the SDK's rule; a request that is not gets no span and sends no
/// `traceparent` of the node's upstream, and a client's unsampled
/// `traceparent` goes upstream unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_are_not_sampled_get_no_span_and_no_trace_context() {
    let (receiver, endpoint) = Receiver::start().await;
    let origin = Origin::start("api").await;
    let node = Node::start(&config(endpoint, &origin, "").replace(
        "metrics_interval",
        "trace_sample_ratio = 0.5\nmetrics_interval",
    ));
    let addr = node.listener("web").await;
    let client = http1_client();
    for _ in 0..300 {
        assert_eq!(get(&client, addr, None, "/api/x").await.status, 200);
    }
    let unsampled_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let answer = get_with(
        &client,
        addr,
        None,
        "/api/y",
        &[("traceparent", unsampled_parent)],
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200);

    let seen = origin.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.headers["traceparent"], unsampled_parent);
    let propagated: Vec<String> = seen[..300]
        .iter()
        .filter_map(|s| s.headers.get("traceparent"))
        .map(|v| v.to_str().unwrap().split('-').nth(2).unwrap().to_owned())
        .collect();
    assert!(
        (90..=210).contains(&propagated.len()),
        "{} of 300 requests sampled at 50%",
        propagated.len()
    );
    // Every request that went upstream with a trace context is one
    // exported span, and no other request is.
    let exported = receiver
        .wait_for("every sampled request's span", |r| {
            let spans = r.spans.lock().unwrap();
            let ids: Vec<String> = spans
                .iter()
                .filter(|(_, s)| s.kind == SpanKind::Server as i32)
                .map(|(_, s)| hex(&s.span_id))
                .collect();
            (ids.len() >= propagated.len()).then_some(ids)
        })
        .await;
    let mut exported = exported;
    exported.sort();
    let mut propagated = propagated;
    propagated.sort();
    assert_eq!(exported, propagated);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Scrapes the node's Prometheus endpoint and parses it.
async fn scrape(addr: std::net::SocketAddr) -> prometheus_parse::Scrape {
    let answer = get(&http1_client(), addr, None, "/metrics").await;
    assert_eq!(answer.status, 200);
    assert!(answer
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = answer.text();
    // Every line is a comment or a well-formed sample.
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (_, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
    }
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text")
}

fn requests_total(scrape: &prometheus_parse::Scrape, status_class: &str) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == "tether_requests_total")
        .filter(|s| s.labels.get("status_class") == Some(status_class))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prometheus_endpoint_shows_the_counters_moving_and_the_access_log_has_every_request() {
    let origin = Origin::start("api").await;
    // No OTLP backend listening at all: the node must not care.
    let dead = free_addr();
    let node = Node::start(&config(
        dead,
        &origin,
        "access_log = \"access.log\"\naccess_log_format = \"json\"",
    ));
    let addr = node.listener("web").await;
    let prometheus = address_in(
        node.log()
            .lines()
            .find(|l| l.contains("prometheus endpoint listening"))
            .expect("the Prometheus endpoint is announced"),
    );
    let client = http1_client();
    assert_eq!(get(&client, addr, None, "/api/one").await.status, 200);
    assert_eq!(get(&client, addr, None, "/nowhere").await.status, 404);
    let before = scrape(prometheus).await;
    assert_eq!(requests_total(&before, "2xx"), 1.0);
    assert_eq!(requests_total(&before, "4xx"), 1.0);
    for _ in 0..3 {
        assert_eq!(get(&client, addr, None, "/api/more").await.status, 200);
    }
    let after = scrape(prometheus).await;
    assert_eq!(requests_total(&after, "2xx"), 4.0);

    let names: Vec<&str> = after.samples.iter().map(|s| s.metric.as_str()).collect();
    for expected in [
        "tether_request_duration_seconds_count",
        "tether_bytes_total",
        "tether_connections_active",
        "tether_upstream_server_health",
        "tether_config_generation",
        "tether_config_applies_total",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let generation = after
        .samples
        .iter()
        .find(|s| s.metric == "tether_config_generation")
        .unwrap();
    assert!(generation
        .labels
        .get("version")
        .unwrap()
        .starts_with("sha256:"));

    // One JSON line per request, written by its own thread.
    let log_path = node.path("access.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect();
        if lines.len() >= 5 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["target"], "/api/one");
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["upstream"], "api");
    assert_eq!(lines[0]["server"], origin.addr.to_string());
    assert_eq!(lines[1]["status"], 404);
}
